//! The volume layer in one process: two nodes share one device file, node 1 coordinates, and
//! node 2 reaches it over a real TCP connection on loopback (the rig in `common`). Devices are
//! wrapped in the fault-injecting backend to check recovery: a failed I/O, a lost path, a torn
//! write. Needs O_DIRECT on the temp directory's filesystem; prints a skip line when it is
//! missing.

mod common;

use std::time::{Duration, Instant};

use common::{Dev, VOL, apply, pattern, rig};
use csvd_csv_fs::engine::BufSlice;
use csvd_csv_fs::node::{CsvNode, IoError};
use csvd_raft::ClusterState;
use csvd_raft::command::Command;
use csvd_raft::volume::{ALLOCATION_UNIT, IoMode, RedirectReason};
use uuid::Uuid;

#[tokio::test]
async fn test_direct_and_redirected_nodes_see_the_same_bytes() {
    let Some(mut rig) = rig().await else { return };
    assert_eq!(rig.mode(0).await, IoMode::Direct);
    // Node 2 asks for redirected I/O: its reads and writes go to node 1 over TCP.
    apply(
        &mut rig.state,
        Command::SetVolumeMode {
            volume: VOL,
            node: 2,
            redirected: true,
        },
    );
    rig.sync().await;
    assert_eq!(
        rig.mode(1).await,
        IoMode::Redirected(RedirectReason::UserRequest)
    );
    let (a, b) = (&rig.nodes[0], &rig.nodes[1]);
    // Disk 1 is 3 MiB in two extents; this write crosses from the first into the second.
    let data = pattern(7, 256 << 10);
    let at = ALLOCATION_UNIT - (128 << 10);
    let before = rig.faults[1].count();
    b.write(1, at, BufSlice::from(data), true).await.unwrap();
    assert_eq!(
        rig.faults[1].count(),
        before,
        "a redirected node must not touch its device"
    );
    let back = a.read(1, at, 256 << 10).await.unwrap();
    assert!(back[..] == pattern(7, 256 << 10)[..]);
    let back = b.read(1, at, 256 << 10).await.unwrap();
    assert!(back[..] == pattern(7, 256 << 10)[..]);
    // Direct write through node 1, redirected read through node 2; discard and write-zeroes.
    a.write(2, 0, BufSlice::from(pattern(9, 8192)), false)
        .await
        .unwrap();
    assert!(b.read(2, 0, 8192).await.unwrap()[..] == pattern(9, 8192)[..]);
    b.write_zeroes(2, 0, 4096).await.unwrap();
    b.discard(2, 4096, 4096).await.unwrap();
    b.flush(2).await.unwrap();
    assert!(a.read(2, 0, 8192).await.unwrap().iter().all(|x| *x == 0));
}

#[tokio::test]
async fn test_bad_requests_are_refused_and_write_nothing() {
    let Some(rig) = rig().await else { return };
    for node in &rig.nodes {
        let err = node.read(1, 3 * ALLOCATION_UNIT, 4096).await.unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
        let err = node
            .write(
                2,
                ALLOCATION_UNIT - 4096,
                BufSlice::from(pattern(1, 8192)),
                false,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
        let err = node
            .write(1, 512, BufSlice::from(pattern(1, 4096)), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 4096"), "{err}");
        let err = node.read(1, 0, 0).await.unwrap_err();
        assert!(matches!(err, IoError::BadRequest(_)), "{err}");
        let err = node.read(99, 0, 4096).await.unwrap_err();
        assert_eq!(err, IoError::NoSuchDisk(99));
        let err = node.discard(1, 0, 4 * ALLOCATION_UNIT).await.unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
    }
    assert!(rig.on_device().iter().all(|b| *b == 0), "nothing written");
}

#[tokio::test]
async fn test_failed_io_turns_redirected_then_the_path_heals() {
    let Some(rig) = rig().await else { return };
    let b = &rig.nodes[1];
    // The next I/O on node 2's device fails: the write still succeeds, through node 1.
    rig.faults[1].fail_nth(1);
    b.write(1, 0, BufSlice::from(pattern(3, 65536)), false)
        .await
        .unwrap();
    assert_eq!(
        rig.mode(1).await,
        IoMode::Redirected(RedirectReason::NoDevicePath)
    );
    let r = &b.reports().await[0];
    assert!(
        r.path.is_none() && r.path_error.as_deref().unwrap_or("").contains("I/O number"),
        "{r:?}"
    );
    assert!(rig.nodes[0].read(1, 0, 65536).await.unwrap()[..] == pattern(3, 65536)[..]);
    // The path is lost for good: I/O keeps working, redirected.
    rig.faults[1].set_lost(true);
    b.write(1, 65536, BufSlice::from(pattern(4, 4096)), true)
        .await
        .unwrap();
    // Healed and re-attached (the daemon's probe does this): direct again.
    rig.faults[1].set_lost(false);
    b.attach(VOL, &rig.path).await.unwrap();
    assert_eq!(rig.mode(1).await, IoMode::Direct);
    let before = rig.faults[1].count();
    assert!(b.read(1, 65536, 4096).await.unwrap()[..] == pattern(4, 4096)[..]);
    assert_eq!(rig.faults[1].count(), before + 1, "read went to the device");
}

#[tokio::test]
async fn test_torn_write_is_completed_through_the_coordinator() {
    let Some(rig) = rig().await else { return };
    let b = &rig.nodes[1];
    b.write(1, 0, BufSlice::from(pattern(1, 131072)), false)
        .await
        .unwrap();
    rig.faults[1].tear_next_write();
    b.write(1, 0, BufSlice::from(pattern(2, 131072)), true)
        .await
        .unwrap();
    // All of the new data, none of the old, whoever reads it.
    for n in &rig.nodes {
        assert!(n.read(1, 0, 131072).await.unwrap()[..] == pattern(2, 131072)[..]);
    }
}

#[tokio::test]
async fn test_coordinator_losing_its_path_waits_for_a_new_coordinator() {
    let Some(mut rig) = rig().await else { return };
    rig.faults[0].set_lost(true);
    let a = rig.nodes[0].clone();
    // Node 1 coordinates but cannot reach the device: its I/O waits...
    let pending = tokio::spawn(async move {
        a.write(1, 8192, BufSlice::from(pattern(5, 4096)), false)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "I/O must wait, not fail");
    // ...until the role moves to node 2, which has a path.
    apply(
        &mut rig.state,
        Command::SetCoordinator {
            volume: VOL,
            node: 2,
            expected: 1,
        },
    );
    rig.sync().await;
    pending.await.unwrap().unwrap();
    assert!(rig.nodes[1].read(1, 8192, 4096).await.unwrap()[..] == pattern(5, 4096)[..]);
    // The old coordinator refuses redirected I/O it no longer owns.
    let err = rig.nodes[0]
        .execute_as_coordinator(
            1,
            0,
            csvd_csv_fs::node::IoRequest::Read {
                offset: 0,
                len: 4096,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, IoError::NotCoordinator(_)), "{err}");
}

#[tokio::test]
async fn test_no_lease_pauses_io_until_renewed() {
    let Some(rig) = rig().await else { return };
    let a = rig.nodes[0].clone();
    a.renew_lease(Instant::now());
    assert!(a.fenced());
    assert_eq!(
        rig.mode(0).await,
        IoMode::Paused(csvd_raft::volume::PauseReason::NoQuorum)
    );
    let before = rig.faults[0].count();
    let a2 = a.clone();
    let pending = tokio::spawn(async move {
        a2.write(1, 0, BufSlice::from(pattern(6, 4096)), false)
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!pending.is_finished());
    assert_eq!(rig.faults[0].count(), before, "no I/O while fenced");
    // A fenced coordinator refuses peers' I/O too.
    let err = rig.nodes[1]
        .execute(
            2,
            csvd_csv_fs::node::IoRequest::Read {
                offset: 0,
                len: 4096,
            },
        )
        .await;
    assert!(err.is_ok(), "node 2 is direct and unaffected: {err:?}");
    a.renew_lease(Instant::now() + Duration::from_secs(60));
    pending.await.unwrap().unwrap();
    // Without renewal, the wait ends with a clear error.
    a.renew_lease(Instant::now());
    let err = a.read(1, 0, 4096).await.unwrap_err();
    assert!(matches!(err, IoError::Paused(_)), "{err}");
}

#[tokio::test]
async fn test_layout_changes_are_barriers_for_io_in_flight() {
    let Some(mut rig) = rig().await else { return };
    let a = rig.nodes[0].clone();
    let b = rig.nodes[1].clone();
    // Writes stream through both nodes while the layout changes under them: disk 2 grows
    // (new epochs) and node 2 flips between direct and redirected.
    let writer = |node: CsvNode<Dev>, disk: u64| {
        tokio::spawn(async move {
            for i in 0..64u64 {
                node.write(
                    disk,
                    i * 4096,
                    BufSlice::from(pattern(i + disk, 4096)),
                    false,
                )
                .await
                .unwrap();
            }
        })
    };
    let w1 = writer(a.clone(), 1);
    let w2 = writer(b.clone(), 2);
    for round in 0..6u64 {
        apply(
            &mut rig.state,
            Command::ResizeDisk {
                id: 2,
                size_bytes: (2 + round) * ALLOCATION_UNIT,
            },
        );
        apply(
            &mut rig.state,
            Command::SetVolumeMode {
                volume: VOL,
                node: 2,
                redirected: round % 2 == 0,
            },
        );
        rig.sync().await;
        tokio::task::yield_now().await;
    }
    w1.await.unwrap();
    w2.await.unwrap();
    for (disk, node) in [(1u64, &b), (2, &a)] {
        for i in 0..64u64 {
            let got = node.read(disk, i * 4096, 4096).await.unwrap();
            assert!(
                got[..] == pattern(i + disk, 4096)[..],
                "disk {disk} block {i}"
            );
        }
    }
    let epoch = rig.state.volumes[&VOL].epoch;
    for n in &rig.nodes {
        assert_eq!(
            n.reports().await[0].epoch,
            epoch,
            "every node adopted the last epoch"
        );
    }
}

#[tokio::test]
async fn test_an_older_state_never_undoes_a_newer_one() {
    let Some(mut rig) = rig().await else { return };
    let older = rig.state.clone();
    // A disk created after `older`, then `older` applied again (a lagging local copy).
    let id = apply(
        &mut rig.state,
        Command::CreateDisk {
            name: "c".into(),
            volume: VOL,
            size_bytes: ALLOCATION_UNIT,
            block_size: None,
        },
    );
    rig.sync().await;
    let node = &rig.nodes[1];
    node.write(id, 0, BufSlice::from(pattern(8, 4096)), false)
        .await
        .unwrap();
    node.apply(&older).await;
    assert!(node.read(id, 0, 4096).await.unwrap()[..] == pattern(8, 4096)[..]);
    assert_eq!(node.reports().await[0].epoch, rig.state.volumes[&VOL].epoch);
    // Nor does a state that predates the volume itself.
    let mut before_volume = ClusterState::default();
    apply(
        &mut before_volume,
        Command::InitCluster {
            cluster_id: Uuid::from_u128(1),
        },
    );
    node.apply(&before_volume).await;
    assert_eq!(node.reports().await[0].mode, IoMode::Direct);
    assert!(node.read(id, 0, 4096).await.unwrap()[..] == pattern(8, 4096)[..]);
}
