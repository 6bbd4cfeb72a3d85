//! Runs openraft's own storage conformance suite against the redb log store and the state
//! machine, and checks that what they acknowledged survives closing and reopening the files.

use csvd_raft::store::{LogStore, StateMachine};
use csvd_raft::{Command, Request, TypeConfig};
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{EntryPayload, StorageError};
use tempfile::TempDir;
use uuid::Uuid;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft-log.redb")).expect("log store");
        let sm = StateMachine::open(&dir.path().join("raft-sm.redb")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_storage_conformance_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}

fn log_id(term: u64, node: u64, index: u64) -> LogIdOf<TypeConfig> {
    openraft::testing::log_id::<TypeConfig>(term, node, index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_log_and_vote_survive_reopen() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft-log.redb");
    {
        let mut log = LogStore::open(&path).unwrap();
        log.save_vote(&VoteOf::<TypeConfig>::new(3, 1))
            .await
            .unwrap();
        let entries: Vec<EntryOf<TypeConfig>> = (1..=5)
            .map(|i| EntryOf::<TypeConfig> {
                log_id: log_id(3, 1, i),
                payload: EntryPayload::Normal(Request::new(Command::InitCluster {
                    cluster_id: Uuid::from_u128(i as u128),
                })),
            })
            .collect();
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        log.save_committed(Some(log_id(3, 1, 4))).await.unwrap();
        log.purge(log_id(3, 1, 2)).await.unwrap();
    }
    let mut log = LogStore::open(&path).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(3, 1, 5)));
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 1, 2)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3, 1, 4)));
    use openraft::RaftLogReader;
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(VoteOf::<TypeConfig>::new(3, 1))
    );
    let got = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_snapshot_restores_state_after_reopen() {
    use openraft::RaftSnapshotBuilder;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft-sm.redb");
    let cluster_id = Uuid::from_u128(42);
    {
        let mut sm = StateMachine::open(&path).unwrap();
        let entry = EntryOf::<TypeConfig> {
            log_id: log_id(1, 1, 1),
            payload: EntryPayload::Normal(Request::new(Command::InitCluster { cluster_id })),
        };
        let stream = futures::stream::iter(vec![Ok((entry, None))]);
        sm.apply(stream).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        let snap = builder.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 1)));
    }
    let mut sm = StateMachine::open(&path).unwrap();
    assert_eq!(sm.view().state.cluster_id, Some(cluster_id));
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1, 1)));
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}

#[test]
fn test_earlier_log_format_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft-log.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("logs");
            let mut t = txn.open_table(def).unwrap();
            t.insert(1, b"old entry".as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = LogStore::open(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("earlier csvd build"), "{err}");
}
