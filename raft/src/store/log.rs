//! The Raft log and vote, stored in one redb database (`raft-log.redb`).
//!
//! Every mutation commits a redb write transaction with `Durability::Immediate` (fsync) before
//! openraft is told it is done, so an acknowledged vote or entry survives power loss.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{decode, encode, io_err};
use crate::TypeConfig;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// The redb-backed Raft log. Cheap to clone; clones share the database.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Bytes of entries appended since the last purge: drives the size-based snapshot policy.
    unpurged_bytes: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens (or creates) the log database at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::create(path)
            .map_err(|e| io_err(&format!("opening {}", path.display()), e))?;
        let txn = db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        {
            txn.open_table(LOGS)
                .map_err(|e| io_err("creating the log table", e))?;
            txn.open_table(META)
                .map_err(|e| io_err("creating the meta table", e))?;
        }
        txn.commit().map_err(|e| io_err("committing", e))?;
        let store = Self {
            db: Arc::new(db),
            unpurged_bytes: Arc::new(AtomicU64::new(0)),
        };
        store
            .unpurged_bytes
            .store(store.stored_bytes()?, Ordering::Relaxed);
        Ok(store)
    }

    /// Bytes of log entries stored since the last purge (approximate, encoded size).
    pub fn unpurged_bytes(&self) -> u64 {
        self.unpurged_bytes.load(Ordering::Relaxed)
    }

    fn stored_bytes(&self) -> io::Result<u64> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| io_err("starting a read", e))?;
        let table = txn
            .open_table(LOGS)
            .map_err(|e| io_err("opening the log table", e))?;
        let mut total = 0u64;
        for row in table.iter().map_err(|e| io_err("reading the log", e))? {
            let (_, v) = row.map_err(|e| io_err("reading the log", e))?;
            total += v.value().len() as u64;
        }
        Ok(total)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| io_err("starting a read", e))?;
        let table = txn
            .open_table(META)
            .map_err(|e| io_err("opening the meta table", e))?;
        match table.get(key).map_err(|e| io_err("reading meta", e))? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes one meta value durably.
    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> io::Result<()> {
        let bytes = encode(key, value)?;
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| io_err("setting durability", e))?;
        {
            let mut table = txn
                .open_table(META)
                .map_err(|e| io_err("opening the meta table", e))?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| io_err("writing meta", e))?;
        }
        txn.commit().map_err(|e| io_err("committing meta", e))
    }

    /// Runs blocking redb work off the async runtime's worker threads.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(LogStore) -> io::Result<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(this))
            .await
            .map_err(|e| io_err("storage task", e))?
    }

    /// Deletes every entry whose index lies in `range`; returns the bytes removed.
    fn delete_range(
        &self,
        range: impl RangeBounds<u64>,
        durability: Durability,
    ) -> io::Result<u64> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        txn.set_durability(durability)
            .map_err(|e| io_err("setting durability", e))?;
        let mut removed = 0u64;
        {
            let mut table = txn
                .open_table(LOGS)
                .map_err(|e| io_err("opening the log table", e))?;
            let gone = table
                .extract_from_if(range, |_, _| true)
                .map_err(|e| io_err("deleting log entries", e))?;
            for row in gone {
                let (_, v) = row.map_err(|e| io_err("deleting log entries", e))?;
                removed += v.value().len() as u64;
            }
        }
        txn.commit().map_err(|e| io_err("committing", e))?;
        Ok(removed)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        self.blocking(move |s| {
            let txn =
                s.db.begin_read()
                    .map_err(|e| io_err("starting a read", e))?;
            let table = txn
                .open_table(LOGS)
                .map_err(|e| io_err("opening the log table", e))?;
            let mut out = Vec::new();
            for row in table
                .range::<u64>((start, end))
                .map_err(|e| io_err("reading the log", e))?
            {
                let (_, v) = row.map_err(|e| io_err("reading the log", e))?;
                out.push(decode::<EntryOf<TypeConfig>>("log entry", v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogIdOf<TypeConfig>> = self.get_meta(KEY_PURGED)?;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| io_err("starting a read", e))?;
        let table = txn
            .open_table(LOGS)
            .map_err(|e| io_err("opening the log table", e))?;
        let last = match table.last().map_err(|e| io_err("reading the log", e))? {
            Some((_, v)) => Some(decode::<EntryOf<TypeConfig>>("log entry", v.value())?.log_id()),
            None => None,
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        let vote = *vote;
        self.blocking(move |s| s.put_meta(KEY_VOTE, &vote)).await
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        self.blocking(move |s| s.put_meta(KEY_COMMITTED, &committed))
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .get_meta::<Option<LogIdOf<TypeConfig>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((entry.index(), encode("log entry", &entry)?));
        }
        let res = self
            .blocking(move |s| {
                let mut txn =
                    s.db.begin_write()
                        .map_err(|e| io_err("starting a write", e))?;
                txn.set_durability(Durability::Immediate)
                    .map_err(|e| io_err("setting durability", e))?;
                let mut bytes = 0u64;
                {
                    let mut table = txn
                        .open_table(LOGS)
                        .map_err(|e| io_err("opening the log table", e))?;
                    for (index, value) in &encoded {
                        table
                            .insert(*index, value.as_slice())
                            .map_err(|e| io_err("appending to the log", e))?;
                        bytes += value.len() as u64;
                    }
                }
                txn.commit().map_err(|e| io_err("committing the log", e))?;
                s.unpurged_bytes.fetch_add(bytes, Ordering::Relaxed);
                Ok(())
            })
            .await;
        // The entries are on disk (or the write failed) before openraft hears about it.
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        let removed = self
            .blocking(move |s| s.delete_range(from.., Durability::Immediate))
            .await?;
        self.unpurged_bytes
            .fetch_sub(removed.min(self.unpurged_bytes()), Ordering::Relaxed);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        let upto = log_id.index();
        // Record the purge point first: a crash between the two steps leaves extra entries,
        // which are harmless, never a gap.
        let removed = self
            .blocking(move |s| {
                s.put_meta(KEY_PURGED, &log_id)?;
                s.delete_range(..=upto, Durability::Immediate)
            })
            .await?;
        self.unpurged_bytes
            .fetch_sub(removed.min(self.unpurged_bytes()), Ordering::Relaxed);
        Ok(())
    }
}
