//! The state machine: the applied [`ClusterState`] in memory, its snapshots in redb
//! (`raft-sm.redb`).
//!
//! Applying an entry changes only memory. Durability comes from the log: on restart the state
//! is restored from the last snapshot and openraft re-applies the committed entries after it
//! (the log keeps every entry after the snapshot, so nothing is lost). A snapshot is written
//! with fsync before openraft may purge the entries it covers.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{decode, encode, io_err};
use crate::TypeConfig;
use crate::command::Outcome;
use crate::state::ClusterState;

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const KEY_META: &str = "meta";
const KEY_DATA: &str = "data";

/// The applied metadata as of one log index, shared read-only with watchers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    /// The cluster metadata.
    pub state: ClusterState,
    /// The last log entry applied to `state`.
    pub last_applied: Option<LogIdOf<TypeConfig>>,
    /// The last membership configuration applied.
    pub membership: StoredMembershipOf<TypeConfig>,
}

impl StateView {
    /// Index of the last applied entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.last_applied.as_ref().map(|l| l.index()).unwrap_or(0)
    }
}

/// The metadata state machine. Cheap to clone; clones share state and storage.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    /// The latest view; copied on write only while a watcher still holds the previous one.
    current: Arc<Mutex<Arc<StateView>>>,
    changes: watch::Sender<Arc<StateView>>,
}

impl StateMachine {
    /// Opens (or creates) the snapshot database at `path` and restores the last snapshot.
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::create(path)
            .map_err(|e| io_err(&format!("opening {}", path.display()), e))?;
        let txn = db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        txn.open_table(SNAPSHOT)
            .map_err(|e| io_err("creating the snapshot table", e))?;
        txn.commit().map_err(|e| io_err("committing", e))?;
        let db = Arc::new(db);
        let view = match read_snapshot(&db)? {
            Some((meta, data)) => view_from_snapshot(&meta, &data)?,
            None => StateView::default(),
        };
        let view = Arc::new(view);
        let (changes, _) = watch::channel(view.clone());
        Ok(Self {
            db,
            current: Arc::new(Mutex::new(view)),
            changes,
        })
    }

    /// The latest applied view.
    pub fn view(&self) -> Arc<StateView> {
        self.lock().clone()
    }

    /// Subscribes to applied changes: the receiver sees every new view (coalesced if the
    /// subscriber is slower than the log).
    pub fn subscribe(&self) -> watch::Receiver<Arc<StateView>> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<StateView>> {
        // A poisoned lock means a panic while applying, which `apply` never does; recover the
        // data rather than cascade.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, view: Arc<StateView>) {
        *self.lock() = view.clone();
        self.changes.send_replace(view);
    }

    fn persist_snapshot(&self, meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> io::Result<()> {
        let meta = encode("snapshot meta", meta)?;
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| io_err("setting durability", e))?;
        {
            let mut t = txn
                .open_table(SNAPSHOT)
                .map_err(|e| io_err("opening the snapshot table", e))?;
            t.insert(KEY_META, meta.as_slice())
                .map_err(|e| io_err("writing the snapshot", e))?;
            t.insert(KEY_DATA, data)
                .map_err(|e| io_err("writing the snapshot", e))?;
        }
        txn.commit()
            .map_err(|e| io_err("committing the snapshot", e))
    }
}

fn read_snapshot(db: &Database) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, Vec<u8>)>> {
    let txn = db.begin_read().map_err(|e| io_err("starting a read", e))?;
    let t = txn
        .open_table(SNAPSHOT)
        .map_err(|e| io_err("opening the snapshot table", e))?;
    let meta = t
        .get(KEY_META)
        .map_err(|e| io_err("reading the snapshot", e))?;
    let data = t
        .get(KEY_DATA)
        .map_err(|e| io_err("reading the snapshot", e))?;
    match (meta, data) {
        (Some(m), Some(d)) => Ok(Some((
            decode("snapshot meta", m.value())?,
            d.value().to_vec(),
        ))),
        _ => Ok(None),
    }
}

fn view_from_snapshot(meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> io::Result<StateView> {
    Ok(StateView {
        state: decode("snapshot", data)?,
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
    })
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        let view = self.view();
        let data = encode("snapshot", &view.state)?;
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: view.last_applied,
            last_membership: view.membership.clone(),
        };
        let this = self.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || {
            this.persist_snapshot(&meta, &data).map(|()| (meta, data))
        })
        .await
        .map_err(|e| io_err("snapshot task", e))??;
        tracing::info!(
            index = view.applied_index(),
            bytes = data.len(),
            "built a snapshot"
        );
        Ok(SnapshotOf::<TypeConfig, Vec<u8>> {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let view = self.view();
        Ok((view.last_applied, view.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut view = self.view();
        let mut replies = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let v = Arc::make_mut(&mut view);
            v.last_applied = Some(entry.log_id());
            let response = match &entry.payload {
                EntryPayload::Blank => Ok(Outcome::Internal),
                EntryPayload::Normal(req) => {
                    let res = v.state.apply(req);
                    if let Err(e) = &res {
                        tracing::debug!(index = entry.index(), cmd = %req, error = %e, "command rejected");
                    }
                    res
                }
                EntryPayload::Membership(m) => {
                    v.membership =
                        StoredMembershipOf::<TypeConfig>::new(Some(entry.log_id()), m.clone());
                    Ok(Outcome::Internal)
                }
            };
            if let Some(r) = responder {
                replies.push((r, response));
            }
        }
        // Watchers see the new state no later than the proposer hears the result.
        self.publish(view);
        for (r, response) in replies {
            r.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let view = view_from_snapshot(meta, &snapshot)?;
        let this = self.clone();
        let meta_owned = meta.clone();
        tokio::task::spawn_blocking(move || this.persist_snapshot(&meta_owned, &snapshot))
            .await
            .map_err(|e| io_err("snapshot task", e))??;
        tracing::info!(
            index = view.applied_index(),
            "installed a snapshot from the leader"
        );
        self.publish(Arc::new(view));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        let db = self.db.clone();
        let found = tokio::task::spawn_blocking(move || read_snapshot(&db))
            .await
            .map_err(|e| io_err("snapshot task", e))??;
        Ok(found.map(|(meta, snapshot)| SnapshotOf::<TypeConfig, Vec<u8>> { meta, snapshot }))
    }
}
