//! The metadata node's API in one process with its real gRPC server: bootstrap, the change
//! subscription node agents use, typed rejections, and the size-based snapshot trigger.

use std::time::Duration;

use csvd_raft::command::{Command, Outcome};
use csvd_raft::node::{MetaNode, MetaOptions};
use csvd_raft::pb::cluster_server::ClusterServer;
use csvd_raft::pb::raft_server::RaftServer;
use csvd_raft::service::ClusterService;
use csvd_raft::state::{ApplyError, NodeAdminState, NodeSpec};
use csvd_raft::{CSVD_VERSION, PROTOCOL_VERSION};
use openraft::type_config::async_runtime::WatchReceiver;

async fn start_node(dir: &std::path::Path, tune: impl FnOnce(&mut MetaOptions)) -> MetaNode {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let spec = NodeSpec {
        id: 1,
        grpc_addr: addr,
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
