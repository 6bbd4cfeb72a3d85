//! Cluster scenarios with real `csvd` processes on 127.0.0.1: bootstrap and joins, writes
//! through followers, leader failure, restarts, graceful shutdown, snapshots, membership
//! changes and refusals.

mod common;

use std::time::Duration;

use common::{Cluster, wait_until};
use csvd_raft::api::{ClientError, Role};
use csvd_raft::command::{Command, Outcome};
use csvd_raft::state::{ApplyError, NodeAdminState, NodeSpec};

const LONG: Duration = Duration::from_secs(60);

fn state_of(s: &csvd_raft::api::ClusterStatus, id: u64) -> String {
    s.members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.state.clone())
        .unwrap_or_default()
}

/// Proves the core promise of the metadata service: three processes form one cluster, a write
/// through a follower commits, the cluster survives `kill -9` of its leader, the killed node
/// catches up after a restart, and a full stop and restart keeps every committed change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_nodes_survive_leader_crash_and_full_restart() {
    let mut cluster = Cluster::new(3);
    let cluster_id = cluster.start_initialized(&[]).await;

    let (leader, status) = cluster.leader_via(1).await;
    assert_eq!(status.cluster_id.as_deref(), Some(cluster_id.as_str()));
    assert_eq!(status.members.len(), 3);
    assert!(status.members.iter().all(|m| m.role == Role::Voter));
    assert!(
        status
            .members
            .iter()
            .all(|m| m.version == csvd_raft::CSVD_VERSION)
    );
    assert!(
        status
            .members
            .iter()
            .all(|m| m.protocol_version == csvd_raft::PROTOCOL_VERSION)
    );

    // A write through a follower is committed and visible in a linearizable read.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut fc = cluster.node(follower).client();
    let (outcome, index) = fc
        .write(Command::SetNodeState {
            id: leader,
            state: NodeAdminState::Draining,
        })
        .await
        .expect("write via follower");
    assert_eq!(outcome, Outcome::Applied);
    assert!(index > 0);
    let s = cluster.node(leader).client().status().await.unwrap();
    assert_eq!(state_of(&s, leader), "draining");
    assert!(s.committed_index >= index);

    // Rejections come back typed, through a follower too.
    let err = fc.write(Command::RemoveNode { id: 99 }).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected(ApplyError::UnknownNode { id: 99 })
        ),
        "{err:?}"
    );

    // The CLI's stale-but-quorum-free view answers from the node itself.
    let out = common::migrator(&[
        "--endpoint",
        &cluster.node(follower).endpoint(),
        "--json",
        "cluster",
        "status",
        "--local",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(v["served_by"], follower);

    // kill -9 the leader: the others elect a new one and keep committing.
    cluster.node(leader).kill9();
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    let (new_leader, s2) = wait_until("a new leader", LONG, || {
        let mut c = cluster.nodes[(survivor - 1) as usize].client();
        async move {
            let s = c.status().await.ok()?;
            s.leader.filter(|l| *l != leader).map(|l| (l, s))
        }
    })
    .await;
    assert_ne!(new_leader, leader);
    assert!(s2.term > status.term);
    let (_, index2) = cluster
        .node(survivor)
        .client()
        .write(Command::SetNodeState {
            id: survivor,
            state: NodeAdminState::Draining,
        })
        .await
        .expect("write after leader crash");
    assert!(index2 > index);
    // The new leader retries the dead node with a pause, not in a tight loop (which once
    // logged thousands of lines a second).
    let attempts = || {
        cluster.nodes[(new_leader - 1) as usize]
            .log()
            .matches("Unreachable")
            .count()
    };
    let before = attempts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_2s = attempts() - before;
    assert!(
        per_2s < 100,
        "{per_2s} unreachable reports in 2 s: the leader retries a dead follower in a loop"
    );

    // The crashed node restarts from its data dir alone and catches up.
    cluster.node(leader).restart();
    let caught_up = wait_until("the restarted node to catch up", LONG, || {
        let n = &cluster.nodes[(leader - 1) as usize];
        async move {
            let s = n.local_status().await?;
            (s.applied_index >= index2).then_some(s)
        }
    })
    .await;
    assert_eq!(state_of(&caught_up, survivor), "draining");

    // Stop everything, start everything: committed state is intact.
    for id in 1..=3 {
        assert!(
            cluster.node(id).terminate().success(),
            "clean exit of node {id}"
        );
    }
    for id in 1..=3 {
        cluster.node(id).restart();
    }
    let (_, s3) = cluster.leader_via(1).await;
    assert_eq!(s3.cluster_id.as_deref(), Some(cluster_id.as_str()));
    assert!(s3.committed_index >= index2);
    assert_eq!(state_of(&s3, leader), "draining");
    assert_eq!(state_of(&s3, survivor), "draining");
    assert_eq!(s3.members.len(), 3);
}

/// A follower frozen (SIGSTOP) for longer than the election timeout and then thawed does
/// not unseat the leader: before it starts an election it asks whether it could win
/// (Pre-Vote), and with a leader in touch with the rest it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_thawed_follower_does_not_unseat_the_leader() {
    let mut cluster = Cluster::new(3);
    cluster.start_initialized(&[]).await;
    cluster.wait_members().await;
    let (leader, before) = cluster.leader_via(1).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.node(follower).signal("-STOP");
    // Longer than the longest election timeout (2 s by default).
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.node(follower).signal("-CONT");
    // Its election timer ran out while it was frozen: time for it to act on that, and for
    // the others to answer.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (now_leader, after) = cluster.leader_via(leader).await;
    assert_eq!(now_leader, leader, "the leader stays");
    assert_eq!(after.term, before.term, "no election was held");
    let (seen, s) = cluster.leader_via(follower).await;
    assert_eq!(
        (seen, s.term),
        (leader, before.term),
        "the thawed follower follows the same leader in the same term"
    );
}

/// SIGTERM on the leader hands leadership to another voter before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sigterm_transfers_leadership() {
    let mut cluster = Cluster::new(3);
    cluster.start_initialized(&[]).await;
    let (leader, before) = cluster.leader_via(1).await;
    assert!(cluster.node(leader).terminate().success());
    assert!(
        cluster
            .node(leader)
            .log()
            .contains("transferring leadership"),
        "{}",
        cluster.node(leader).log()
    );
    let other = (1..=3).find(|id| *id != leader).unwrap();
    let (new_leader, after) = cluster.leader_via(other).await;
    assert_ne!(new_leader, leader);
    assert!(after.term > before.term);
}

/// Compaction and catch-up: a node that was down while the log grew catches up after a
/// restart, and a node that joins after the leader compacted its log receives the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_lagging_and_new_nodes_catch_up_after_compaction() {
    let mut cluster = Cluster::new(3);
    cluster
        .start_initialized(&["--snapshot-every-entries", "20"])
        .await;
    let (leader, _) = cluster.leader_via(1).await;
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    cluster.node(lagging).terminate();
    let mut c = cluster.node(leader).client();
    let mut write_many = async |n: u64| {
        let mut last = 0;
        for i in 0..n {
            let state = if i % 2 == 0 {
                NodeAdminState::Draining
            } else {
                NodeAdminState::Active
            };
            last = c
                .write(Command::SetNodeState { id: leader, state })
                .await
                .unwrap()
                .1;
        }
        last
    };
    let last = write_many(400).await;
    cluster.node(lagging).restart();
    wait_until("the lagging node to catch up", LONG, || {
        let n = &cluster.nodes[(lagging - 1) as usize];
        async move { (n.local_status().await?.applied_index >= last).then_some(()) }
    })
    .await;

    // With every member caught up the leader purges its log; a new node then cannot be
    // served from the log and must install the snapshot.
    let last = write_many(101).await; // odd count: the last write sets draining
    let leader_log = cluster.node(leader).log();
    assert!(leader_log.contains("built a snapshot"), "{leader_log}");
    let i = cluster.add_node();
    let join = cluster.node(leader).grpc.clone();
    cluster.nodes[i].start_fresh(Some(&join), &["--snapshot-every-entries", "20"]);
    let newcomer = cluster.nodes[i].id;
    wait_until("the new node to catch up", LONG, || {
        let n = &cluster.nodes[i];
        async move { (n.local_status().await?.applied_index >= last).then_some(()) }
    })
    .await;
    let log = cluster.node(newcomer).log();
    assert!(
        log.contains("installed a snapshot"),
        "expected a snapshot install:\n{log}"
    );
    let s = cluster.node(newcomer).local_status().await.unwrap();
    assert_eq!(state_of(&s, leader), "draining");
}

/// Membership: a dead node is removed by id, a live node leaves by itself and its daemon
/// stops, and its data dir refuses to come back as a stale member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_leave_and_remove_dead_node() {
    let mut cluster = Cluster::new(3);
    cluster.start_initialized(&[]).await;
    cluster.node(3).kill9();
    let out = common::migrator(&[
        "--endpoint",
        &cluster.nodes[0].endpoint(),
        "cluster",
        "leave",
        "--node",
        "3",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (_, s) = cluster.leader_via(1).await;
    assert_eq!(
        s.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Node 2 leaves by itself.
    let out = common::migrator(&[
        "--endpoint",
        &cluster.nodes[1].endpoint(),
        "cluster",
        "leave",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let st = cluster.node(2).wait_exit(Duration::from_secs(30)).await;
    assert!(st.success());
    let (_, s) = cluster.leader_via(1).await;
    assert_eq!(s.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1]);
    assert!(
        cluster
            .node(2)
            .dir
            .join(csvd_raft::node::LEFT_MARKER)
            .exists()
    );
    cluster.node(2).restart();
    let st = cluster.node(2).wait_exit(Duration::from_secs(10)).await;
    assert!(!st.success());
    assert!(
        cluster.node(2).log().contains("left cluster"),
        "{}",
        cluster.node(2).log()
    );

    // The last voter cannot leave.
    let out = common::migrator(&[
        "--endpoint",
        &cluster.nodes[0].endpoint(),
        "cluster",
        "leave",
    ]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("last voter"),
        "{}",
        common::stderr(&out)
    );
}

/// Joins beyond five voters become learners; voters stay odd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_six_nodes_five_voters_one_learner() {
    let mut cluster = Cluster::new(6);
    cluster.start_initialized(&[]).await;
    let (_, s) = cluster.leader_via(1).await;
    let voters = s.members.iter().filter(|m| m.role == Role::Voter).count();
    let learners = s.members.iter().filter(|m| m.role == Role::Learner).count();
    assert_eq!((voters, learners), (5, 1));
}

/// A node that expects another cluster, or speaks a protocol the cluster cannot, is refused
/// with a clear error and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_join_refusals() {
    let mut cluster = Cluster::new(1);
    cluster.start_initialized(&[]).await;
    let join = cluster.nodes[0].grpc.clone();

    let i = cluster.add_node();
    let other_cluster = "00000000-0000-4000-8000-000000000001";
    cluster.nodes[i].start_fresh(Some(&join), &["--cluster-id", other_cluster]);
    let st = cluster.nodes[i].wait_exit(Duration::from_secs(30)).await;
    assert!(!st.success());
    let log = cluster.nodes[i].log();
    assert!(log.contains("wrong cluster"), "{log}");
    assert!(log.contains(other_cluster), "{log}");

    // What a newer csvd would send: a protocol version this cluster does not speak.
    let spec = NodeSpec {
        id: 9,
        grpc_addr: format!("127.0.0.1:{}", common::free_port()),
        version: "9.0.0".into(),
        protocol_version: csvd_raft::PROTOCOL_VERSION + 1,
        ..Default::default()
    };
    let err = cluster.nodes[0]
        .client()
        .join(&spec, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("protocol version"), "{err}");
    assert!(err.to_string().contains("matching csvd software"), "{err}");

    // A second node claiming node 1's id is refused.
    let dup = NodeSpec {
        id: 1,
        grpc_addr: format!("127.0.0.1:{}", common::free_port()),
        protocol_version: csvd_raft::PROTOCOL_VERSION,
        ..Default::default()
    };
    let err = cluster.nodes[0]
        .client()
        .join(&dup, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");

    let (_, s) = cluster.leader_via(1).await;
    assert_eq!(
        s.members.len(),
        1,
        "refused joins must not change membership"
    );
}

/// Every write acknowledged before a `kill -9` is there after the restart: a client streams
/// writes with increasing values into a single node, the node is killed mid-stream, and the
/// restarted node's state holds at least the last acknowledged value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_acknowledged_writes_survive_kill9() {
    let mut cluster = Cluster::new(1);
    cluster.start_initialized(&[]).await;
    // Far above any wall clock, so the node's own heartbeats never overtake these values.
    const BASE: u64 = 10_000_000_000_000;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let acked = acked.clone();
        let mut c = cluster.nodes[0]
            .client()
            .with_timeout(Duration::from_secs(2));
        tokio::spawn(async move {
            for i in 1.. {
                match c
                    .write(Command::Heartbeat {
                        id: 1,
                        at_ms: BASE + i,
                    })
                    .await
                {
                    Ok(_) => acked.store(i, std::sync::atomic::Ordering::SeqCst),
                    Err(_) => return,
                }
            }
        })
    };
    wait_until("some acknowledged writes", LONG, || {
        let n = acked.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= 300).then_some(()) }
    })
    .await;
    cluster.node(1).kill9();
    let _ = writer.await;
    let last_acked = acked.load(std::sync::atomic::Ordering::SeqCst);
    cluster.node(1).restart();
    let s = wait_until("the restarted node to serve", LONG, || {
        let mut c = cluster.nodes[0].client();
        async move { c.status().await.ok() }
    })
    .await;
    // Heartbeats only move forward: re-sending the last acknowledged value changes nothing
    // exactly when that write survived.
    let mut c = cluster.nodes[0].client();
    let (outcome, _) = c
        .write(Command::Heartbeat {
            id: 1,
            at_ms: BASE + last_acked,
        })
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Unchanged,
        "write {last_acked} was acknowledged before the crash but is missing after it (status {s:?})"
    );
}
