//! The metadata node's API in one process with its real gRPC server: bootstrap, the change
//! subscription node agents use, typed rejections, the size-based snapshot trigger, and
//! the migration watch `migrator` follows.

use std::time::Duration;

use csvd_raft::api::ClusterClient;
use csvd_raft::command::{Command, Outcome};
use csvd_raft::migration::{DEFAULT_DOWNTIME_MS, MigrationParams, MigrationPhase, MigrationPolicy};
use csvd_raft::node::{MetaNode, MetaOptions};
use csvd_raft::pb::cluster_server::ClusterServer;
use csvd_raft::pb::raft_server::RaftServer;
use csvd_raft::service::ClusterService;
use csvd_raft::state::{ApplyError, NodeAdminState, NodeSpec};
use csvd_raft::vm::{VmBoot, VmDesired, VmSpec, VmState};
use csvd_raft::volume::{ALLOCATION_UNIT, IoMode};
use csvd_raft::{CSVD_VERSION, PROTOCOL_VERSION};
use openraft::type_config::async_runtime::WatchReceiver;

async fn start_node(dir: &std::path::Path, tune: impl FnOnce(&mut MetaOptions)) -> MetaNode {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let spec = NodeSpec {
        id: 1,
        grpc_addr: addr,
        memory_bytes: 4 << 30,
        version: CSVD_VERSION.into(),
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    let mut opts = MetaOptions::new(spec, dir.to_path_buf());
    tune(&mut opts);
    let node = MetaNode::open(opts).await.unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(RaftServer::new(node.raft_service()))
        .add_service(ClusterServer::new(ClusterService::new(node.clone())))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_subscription_sees_committed_changes() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let cluster_id = node.init().await.unwrap();
    let mut rx = node.subscribe();
    assert_eq!(rx.borrow_and_update().state.cluster_id, Some(cluster_id));

    let (outcome, index) = node
        .write(Command::SetNodeState {
            id: 1,
            state: NodeAdminState::Draining,
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Applied);
    // The watcher sees the change no later than the writer got its answer.
    let view = rx.borrow_and_update().clone();
    assert!(view.applied_index() >= index);
    assert_eq!(view.state.nodes[&1].admin_state, NodeAdminState::Draining);

    // A rejected command is typed and changes nothing the watcher sees.
    let before = node.local_view().state.clone();
    let err = node
        .write(Command::RemoveNode { id: 42 })
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        csvd_raft::node::NodeError::Rejected(ApplyError::UnknownNode { id: 42 })
    ));
    assert_eq!(node.local_view().state, before);

    let status = node.status().await.unwrap();
    assert_eq!(status.leader, Some(1));
    assert!(status.committed_index >= index);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_log_size_limit_triggers_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |o| {
        o.snapshot_every_entries = 1_000_000;
        o.snapshot_every_bytes = 4 << 10;
    })
    .await;
    node.init().await.unwrap();
    let _agents = node.spawn_agents();
    for i in 0..100u64 {
        node.write(Command::Heartbeat {
            id: 1,
            at_ms: 10_000_000_000_000 + i,
        })
        .await
        .unwrap();
    }
    // The agent sees the log over 4 KiB and snapshots; openraft then purges the log.
    let mut metrics = node.raft().metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let snap = metrics.borrow_and_update().snapshot;
        if snap.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot was built"
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), metrics.changed()).await;
    }
    node.shutdown().await;
}

/// A VM running on node 1 with one disk on a volume both nodes reach, and node 2 ready to
/// take it: just enough state for a migration to be admitted.
async fn vm_ready_to_move(node: &MetaNode) -> uuid::Uuid {
    let now = csvd_raft::node::now_ms();
    let dest = NodeSpec {
        id: 2,
        grpc_addr: "127.0.0.1:1".into(),
        migration_addr: "127.0.0.1:2".into(),
        memory_bytes: 4 << 30,
        version: CSVD_VERSION.into(),
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    let volume = uuid::Uuid::from_u128(7);
    let vm = uuid::Uuid::from_u128(8);
    let mut cmds = vec![
        Command::RegisterNode {
            spec: dest,
            now_ms: now,
        },
        Command::Heartbeat { id: 1, at_ms: now },
        Command::RegisterVolume {
            id: volume,
            name: "vol".into(),
            device_bytes: 64 * ALLOCATION_UNIT,
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            now_ms: now,
        },
    ];
    for n in [1, 2] {
        cmds.push(Command::ReportVolume {
            volume,
            node: n,
            mode: IoMode::Direct,
            path: Some("/dev/x".into()),
            acked_epoch: 0,
            at_ms: now,
        });
    }
    cmds.extend([
        Command::CreateDisk {
            name: "d".into(),
            volume,
            size_bytes: ALLOCATION_UNIT,
            block_size: None,
        },
        Command::CreateVm {
            id: vm,
            name: "g".into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 64,
                cpu: "qemu64".into(),
                disks: vec![1],
                nics: vec![],
                boot: VmBoot::Disk,
            },
            owner: 1,
            now_ms: now,
        },
        Command::SetVmDesired {
            id: vm,
            desired: VmDesired::Running,
        },
        Command::ReportVm {
            id: vm,
            node: 1,
            state: VmState::Running,
            detail: "tcg".into(),
            restarts: 0,
            at_ms: now,
        },
    ]);
    for cmd in cmds {
        node.write(cmd).await.unwrap();
    }
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_migration_watch_gets_each_change_and_ends_with_the_final_phase() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    node.init().await.unwrap();
    let vm = vm_ready_to_move(&node).await;
    let mut client = ClusterClient::new(&node.local_status().members[0].grpc_addr, None).unwrap();

    // An unknown migration is an error naming it, not a stream that never speaks.
    let mut unknown = client.watch_migration(99).await.unwrap();
    let err = unknown.next().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("no migration 99"), "{err}");

    let (outcome, _) = node
        .write(Command::StartMigration {
            vm,
            dest: 2,
            params: MigrationParams {
                bandwidth_mibps: None,
                downtime_ms: DEFAULT_DOWNTIME_MS,
                policy: MigrationPolicy::Precopy,
            },
            now_ms: csvd_raft::node::now_ms(),
        })
        .await
        .unwrap();
    let Outcome::Created { id } = outcome else {
        panic!("{outcome:?}")
    };
    let mut watch = client.watch_migration(id).await.unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!((first.id, first.vm), (id, vm));
    assert_eq!(first.phase, MigrationPhase::Preparing);

    // Each change arrives as it is applied; nothing is sent for a command that leaves the
    // record as it was.
    node.write(Command::Heartbeat {
        id: 2,
        at_ms: csvd_raft::node::now_ms(),
    })
    .await
    .unwrap();
    node.write(Command::AdvanceMigration {
        id,
        from: MigrationPhase::Preparing,
        to: MigrationPhase::Ready,
        at_ms: Some(csvd_raft::node::now_ms()),
        listen: Some("127.0.0.1:7100".into()),
    })
    .await
    .unwrap();
    let ready = watch.next().await.unwrap().unwrap();
    assert_eq!(ready.phase, MigrationPhase::Ready);
    assert_eq!(ready.listen_addr.as_deref(), Some("127.0.0.1:7100"));

    node.write(Command::CancelMigration {
        id,
        now_ms: csvd_raft::node::now_ms(),
    })
    .await
    .unwrap();
    let asked = watch.next().await.unwrap().unwrap();
    assert!(asked.cancel_requested && !asked.phase.is_terminal());
    node.write(Command::FinishMigration {
        id,
        phase: MigrationPhase::Cancelled,
        error: None,
        total_ms: None,
        downtime_ms: None,
        now_ms: csvd_raft::node::now_ms(),
        committed: false,
    })
    .await
    .unwrap();
    let mut seen = vec![];
    while let Some(m) = watch.next().await {
        seen.push(m.unwrap());
    }
    let last = seen.last().expect("the final record");
    assert!(last.phase.is_terminal(), "{seen:?}");
    // Only the last record is final, and the stream ended right after it.
    assert!(
        seen[..seen.len() - 1]
            .iter()
            .all(|m| !m.phase.is_terminal())
    );

    // Watching an ended migration gives its final record and ends.
    let mut again = client.watch_migration(id).await.unwrap();
    assert_eq!(again.next().await.unwrap().unwrap(), *last);
    assert!(again.next().await.is_none());
    node.shutdown().await;
}
