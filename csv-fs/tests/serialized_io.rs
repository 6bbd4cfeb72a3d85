//! Compare-and-write and 512-byte sector I/O on the two-node rig (`common`): node 1
//! coordinates and runs these operations for everyone, node 2 sends them over TCP whether it is
//! direct or redirected. The scenarios check what the operations promise across nodes: one
//! winner per compare-and-write race, no lost sectors when two nodes patch one 4 KiB block,
//! refusals that write nothing, no second run of a compare-and-write that may have run, and a
//! new coordinator that waits for the old one to let go. Needs O_DIRECT on the temp directory's
//! filesystem; prints a skip line when it is missing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Rig, VOL, apply, bytes, pattern, rig};
use csvd_csv_fs::engine::BufSlice;
use csvd_csv_fs::node::{CompareResult, IoError, SerialRequest};
use csvd_csv_fs::redirect::{BlockClient, CallError};
use csvd_csv_fs::wire::{
    FLAG_LOCAL, MAX_COMPARE, Op, REQUEST_BYTES, RESPONSE_BYTES, RequestHeader, ResponseHeader,
    Status, decode_miscompare,
};
use csvd_raft::command::Command;
use csvd_raft::volume::{ALLOCATION_UNIT, IoMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads `len` bytes at `offset` of disk 1 (any 512-byte-aligned range) through node `i`.
async fn read_any(rig: &Rig, i: usize, offset: u64, len: usize) -> Vec<u8> {
    let start = offset / 4096 * 4096;
    let end = (offset + len as u64).div_ceil(4096) * 4096;
    let whole = rig.nodes[i].read(1, start, end - start).await.unwrap();
    let at = (offset - start) as usize;
    whole[at..at + len].to_vec()
}

/// Fills `0..len` of disk 1 with `pattern(seed)` through node 1; returns the bytes.
async fn prefill(rig: &Rig, seed: u64, len: usize) -> Vec<u8> {
    let data = pattern(seed, len);
    let copy = data.to_vec();
    rig.nodes[0]
        .write(1, 0, BufSlice::from(data), false)
        .await
        .unwrap();
    copy
}

#[tokio::test]
async fn test_compare_and_write_writes_on_match_and_reports_the_first_difference() {
    let Some(mut rig) = rig().await else { return };
    let mut model = prefill(&rig, 1, 65536).await;
    // Node 1 runs it locally (it coordinates), node 2 sends it; then node 2 redirected.
    for (round, i) in [(0u64, 0usize), (1, 1), (2, 1)] {
        if round == 2 {
            rig.set_redirected(2, true).await;
        }
        let before = rig.faults[1].count();
        // Sub-block, then crossing a block boundary, then whole blocks.
        for (k, (offset, len)) in [(1024u64, 1024usize), (7680, 1024), (16384, 8192)]
            .into_iter()
            .enumerate()
        {
            let at = offset as usize;
            let expected = model[at..at + len].to_vec();
            let new = bytes(100 + round * 10 + k as u64, len);
            // A difference at byte 700 of the compared range: nothing is written.
            let mut wrong = expected.clone();
            wrong[700] ^= 0x5a;
            let got = rig.nodes[i]
                .compare_and_write(1, offset, &wrong, &new)
                .await
                .unwrap();
            assert_eq!(got, CompareResult::Miscompare { offset: 700 });
            assert_eq!(read_any(&rig, 0, 0, 65536).await, model);
            let got = rig.nodes[i]
                .compare_and_write(1, offset, &expected, &new)
                .await
                .unwrap();
            assert_eq!(got, CompareResult::Written);
            model[at..at + len].copy_from_slice(&new);
            assert_eq!(read_any(&rig, 1, 0, 65536).await, model, "round {round}");
        }
        if round == 2 {
            assert_eq!(
                rig.faults[1].count(),
                before,
                "a redirected node must not touch its device"
            );
        }
    }
    // Across the end of disk 1's first extent, which is not next to its second on the device.
    let offset = ALLOCATION_UNIT - 512;
    let old = read_any(&rig, 0, offset, 1024).await;
    let new = bytes(77, 1024);
    let got = rig.nodes[1]
        .compare_and_write(1, offset, &old, &new)
        .await
        .unwrap();
    assert_eq!(got, CompareResult::Written);
    assert_eq!(read_any(&rig, 0, offset, 1024).await, new);
}

/// Both nodes race compare-and-writes with the same expected data on one sector, round after
/// round: exactly one wins each round, the others see a miscompare at the right offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_racing_compare_and_writes_have_exactly_one_winner() {
    let Some(rig) = rig().await else { return };
    const OFFSET: u64 = 8192 + 1536;
    const TRIES_PER_NODE: u64 = 3;
    let mut current = vec![0u8; 512];
    for round in 0..60u64 {
        let mut tasks = Vec::new();
        for (i, node) in rig.nodes.iter().enumerate() {
            for k in 0..TRIES_PER_NODE {
                let node = node.clone();
                let expected = current.clone();
                let new = bytes(round * 100 + i as u64 * 10 + k + 1, 512);
                tasks.push(tokio::spawn(async move {
                    let r = node.compare_and_write(1, OFFSET, &expected, &new).await;
                    (r.unwrap(), new)
                }));
            }
        }
        let mut winners = Vec::new();
        let mut misses = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (CompareResult::Written, new) => winners.push(new),
                (CompareResult::Miscompare { offset }, _) => misses.push(offset),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: one winner");
        let winner = winners.pop().unwrap();
        let first_diff = current
            .iter()
            .zip(&winner)
            .position(|(a, b)| a != b)
            .unwrap();
        assert!(
            misses.iter().all(|&m| m == first_diff as u64),
            "round {round}: {misses:?}"
        );
        assert_eq!(read_any(&rig, 1, OFFSET, 512).await, winner);
        current = winner;
    }
    // The rest of the block was never disturbed.
    let block = read_any(&rig, 0, 8192, 4096).await;
    assert!(block[..1536].iter().chain(&block[2048..]).all(|b| *b == 0));
}

/// Two nodes write alternate 512-byte sectors of the same 4 KiB blocks at once, many times:
/// every sector ends up with its writer's latest bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_concurrent_sector_writes_from_two_nodes_all_land() {
    let Some(rig) = rig().await else { return };
    const BLOCKS: u64 = 4;
    let base = 65536u64;
    for round in 0..15u64 {
        let mut tasks = Vec::new();
        for block in 0..BLOCKS {
            for sector in 0..8u64 {
                let node = rig.nodes[(sector % 2) as usize].clone();
                let offset = base + block * 4096 + sector * 512;
                let data = bytes(round * 1000 + offset, 512);
                tasks.push(tokio::spawn(async move {
                    node.write_partial(1, offset, &data, sector == 7).await
                }));
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let got = read_any(&rig, 1, base, (BLOCKS * 4096) as usize).await;
        for (n, sector) in got.chunks(512).enumerate() {
            let offset = base + n as u64 * 512;
            assert_eq!(
                sector,
                &bytes(round * 1000 + offset, 512)[..],
                "round {round}, sector at {offset}"
            );
        }
    }
}

#[tokio::test]
async fn test_partial_writes_through_a_redirected_node() {
    let Some(mut rig) = rig().await else { return };
    rig.set_redirected(2, true).await;
    assert_eq!(
        rig.mode(1).await,
        IoMode::Redirected(csvd_raft::volume::RedirectReason::UserRequest)
    );
    let mut model = prefill(&rig, 5, 65536).await;
    let before = rig.faults[1].count();
    // A partial head, two whole blocks, a partial tail; a piece inside one block; a piece
    // across a block boundary without a whole block; whole blocks only.
    for (k, (offset, len)) in [(1536u64, 9216usize), (12800, 1024), (20000 - 32, 1024)]
        .into_iter()
        .chain([(24576, 8192)])
        .enumerate()
    {
        let offset = offset / 512 * 512;
        let data = bytes(50 + k as u64, len);
        rig.nodes[1]
            .write_partial(1, offset, &data, k == 0)
            .await
            .unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    assert_eq!(
        rig.faults[1].count(),
        before,
        "a redirected node must not touch its device"
    );
    assert_eq!(read_any(&rig, 0, 0, 65536).await, model);
    assert_eq!(read_any(&rig, 1, 0, 65536).await, model);
}

#[tokio::test]
async fn test_unaligned_discard_and_write_zeroes() {
    let Some(rig) = rig().await else { return };
    let mut model = prefill(&rig, 9, 65536).await;
    let (a, b) = (&rig.nodes[0], &rig.nodes[1]);
    // Node 2 is direct: the whole blocks are discarded on its own device, the partial ones
    // zeroed at the coordinator.
    let cases: [(&_, bool, u64, u64); 4] = [
        (b, true, 512, 8192 + 1024),
        (b, false, 16384 + 1024, 512),
        (a, true, 32768 + 3584, 1024),
        (a, false, 40960, 4096 + 1536),
    ];
    for (node, discard, offset, len) in cases {
        if discard {
            node.discard(1, offset, len).await.unwrap();
        } else {
            node.write_zeroes(1, offset, len).await.unwrap();
        }
        model[offset as usize..(offset + len) as usize].fill(0);
    }
    assert_eq!(read_any(&rig, 0, 0, 65536).await, model);
    assert_eq!(read_any(&rig, 1, 0, 65536).await, model);
}

/// Sends one raw request on `sock` and returns the answer's header and payload.
async fn raw_call(
    sock: &mut tokio::net::TcpStream,
    head: RequestHeader,
    payload: &[u8],
) -> (ResponseHeader, Vec<u8>) {
    sock.write_all(&head.encode()).await.unwrap();
    sock.write_all(payload).await.unwrap();
    let mut h = [0u8; RESPONSE_BYTES];
    sock.read_exact(&mut h).await.unwrap();
    let answer = ResponseHeader::decode(&h).unwrap();
    let mut body = vec![0u8; answer.len as usize];
    sock.read_exact(&mut body).await.unwrap();
    assert_eq!(crc32fast::hash(&body), answer.payload_crc);
    (answer, body)
}

#[tokio::test]
async fn test_bad_serialized_requests_are_refused_and_write_nothing() {
    let Some(rig) = rig().await else { return };
    let big = MAX_COMPARE as usize + 512;
    for node in &rig.nodes {
        let err = node
            .compare_and_write(1, 100, &[0; 512], &[1; 512])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, IoError::Unaligned(m) if m.contains("multiple of 512")),
            "{err}"
        );
        let err = node
            .compare_and_write(1, 0, &[0; 600], &[1; 600])
            .await
            .unwrap_err();
        assert!(matches!(err, IoError::Unaligned(_)), "{err}");
        let err = node
            .compare_and_write(1, 0, &[0; 512], &[1; 1024])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, IoError::BadRequest(m) if m.contains("512 and 1024")),
            "{err}"
        );
        let err = node
            .compare_and_write(1, 0, &vec![0; big], &vec![1; big])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, IoError::BadRequest(m) if m.contains("limit")),
            "{err}"
        );
        let err = node.compare_and_write(1, 0, &[], &[]).await.unwrap_err();
        assert!(matches!(err, IoError::BadRequest(_)), "{err}");
        let err = node
            .compare_and_write(99, 0, &[0; 512], &[1; 512])
            .await
            .unwrap_err();
        assert_eq!(err, IoError::NoSuchDisk(99));
        let err = node
            .write_partial(1, 512, &[1; 100], false)
            .await
            .unwrap_err();
        assert!(matches!(err, IoError::Unaligned(_)), "{err}");
        let err = node
            .write_partial(1, 3 * ALLOCATION_UNIT - 512, &[1; 1024], false)
            .await
            .unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
        let err = node
            .write_partial(1, u64::MAX - 511, &[1; 1024], false)
            .await
            .unwrap_err();
        assert!(matches!(err, IoError::BadRequest(_)), "{err}");
        let err = node.discard(1, 100, 512).await.unwrap_err();
        assert!(matches!(err, IoError::Unaligned(_)), "{err}");
        let err = node.write_zeroes(1, 0, 0).await.unwrap_err();
        assert!(matches!(err, IoError::BadRequest(_)), "{err}");
        let err = node
            .discard(2, ALLOCATION_UNIT - 512, 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err}");
    }

    // A local client: mismatched halves are refused before anything is sent.
    let client = BlockClient::new(rig.io_addr(1), Duration::from_secs(5));
    let bad = SerialRequest::CompareAndWrite {
        offset: 0,
        compare: vec![0; 512],
        data: vec![1; 1024],
        fua: false,
    };
    let err = client.call_serial(1, &bad).await.unwrap_err();
    assert!(
        matches!(err, CallError::Remote(Status::BadRequest, _)),
        "{err}"
    );

    // Raw requests: refused with their reason, and the connection stays usable.
    for flags in [0, FLAG_LOCAL] {
        let mut sock = tokio::net::TcpStream::connect(rig.io_addr(1))
            .await
            .unwrap();
        let caw = |id: u64, offset: u64, len: u64, payload: &[u8]| RequestHeader {
            op: Op::CompareAndWrite,
            flags,
            id,
            disk: 1,
            offset,
            len,
            epoch: 0,
            payload_crc: crc32fast::hash(payload),
        };
        let odd = vec![7u8; 200];
        let (a, msg) = raw_call(&mut sock, caw(1, 0, 100, &odd), &odd).await;
        assert_eq!((a.status, a.id), (Status::Unaligned, 1));
        assert!(String::from_utf8_lossy(&msg).contains("multiple of 512"));
        let payload = [vec![0u8; 512], vec![1u8; 512]].concat();
        let mut corrupt = caw(2, 0, 512, &payload);
        corrupt.payload_crc ^= 1;
        let (a, _) = raw_call(&mut sock, corrupt, &payload).await;
        assert_eq!((a.status, a.id), (Status::ChecksumMismatch, 2));
        let partial = RequestHeader {
            op: Op::WritePartial,
            len: 1024,
            offset: 3 * ALLOCATION_UNIT - 512,
            ..caw(3, 0, 0, &payload[..1024])
        };
        let (a, _) = raw_call(&mut sock, partial, &payload[..1024]).await;
        assert_eq!((a.status, a.id), (Status::OutOfRange, 3));
        // A well-formed compare-and-write against the zeroes on disk: a miscompare answer
        // naming the first differing byte.
        let mut expected = vec![0u8; 1024];
        expected[513] = 1;
        let payload = [expected, vec![2u8; 1024]].concat();
        let (a, body) = raw_call(&mut sock, caw(4, 512, 1024, &payload), &payload).await;
        assert_eq!((a.status, a.id), (Status::Miscompare, 4));
        assert_eq!(decode_miscompare(&body), Some(513));
    }
    assert!(rig.on_device().iter().all(|b| *b == 0), "nothing written");
}

/// A stand-in coordinator that reads each request whole and then drops the connection
/// without answering, so the sender cannot know whether it ran. Counts the requests.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut h = [0u8; REQUEST_BYTES];
                if sock.read_exact(&mut h).await.is_ok()
                    && let Ok(head) = RequestHeader::decode(&h)
                {
                    let mut body = vec![0u8; head.payload_len() as usize];
                    if sock.read_exact(&mut body).await.is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn test_compare_and_write_is_not_sent_again_once_it_may_have_run() {
    let Some(mut rig) = rig().await else { return };
    // The coordinator's device fails the write: the caller gets a device error, never a
    // miscompare from a second run, and nothing was written.
    rig.faults[0].fail_nth(2);
    let err = rig.nodes[1]
        .compare_and_write(1, 4096, &[0; 512], &[9; 512])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IoError::Device(m) if m.contains("old data, the new data")),
        "{err}"
    );
    rig.nodes[0].attach(VOL, &rig.path).await.unwrap();
    assert!(read_any(&rig, 0, 4096, 512).await.iter().all(|b| *b == 0));

    // A coordinator that takes requests and never answers (node 3, with no csv-fs behind it).
    let (addr, seen) = black_hole().await;
    apply(
        &mut rig.state,
        Command::RegisterNode {
            spec: csvd_raft::state::NodeSpec {
                id: 3,
                grpc_addr: "127.0.0.1:1003".into(),
                io_addr: addr,
                protocol_version: csvd_raft::PROTOCOL_VERSION,
                ..Default::default()
            },
            now_ms: 1,
        },
    );
    apply(
        &mut rig.state,
        Command::SetCoordinator {
            volume: VOL,
            node: 3,
            expected: 1,
        },
    );
    rig.sync().await;
    let started = Instant::now();
    let err = rig.nodes[1]
        .compare_and_write(1, 0, &[0; 512], &[1; 512])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IoError::Unavailable(m) if m.contains("not sent again")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting for a retry"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 1, "sent exactly once");
    // A sub-block write, by contrast, is retried until the I/O wait (3 s here) runs out.
    let err = rig.nodes[1]
        .write_partial(1, 0, &[1; 512], false)
        .await
        .unwrap_err();
    assert!(matches!(err, IoError::Unavailable(_)), "{err}");
    assert!(seen.load(Ordering::SeqCst) >= 3, "retried");
}

/// The role moves to node 2 while node 1 has not acknowledged the move: node 2 holds
/// serialized I/O until node 1's acknowledgement is committed (or the handoff wait runs out),
/// since node 1 may still be running some under the old epoch.
#[tokio::test]
async fn test_a_new_coordinator_waits_for_the_old_one_to_let_go() {
    let Some(mut rig) = rig().await else { return };
    rig.nodes[1].set_handoff_wait(Duration::from_secs(30));
    apply(
        &mut rig.state,
        Command::SetCoordinator {
            volume: VOL,
            node: 2,
            expected: 1,
        },
    );
    rig.sync().await;
    let epoch = rig.state.volumes[&VOL].epoch;
    let caw = |i: usize, seed: u64| {
        let node = rig.nodes[i].clone();
        tokio::spawn(async move {
            node.compare_and_write(1, 512, &[0; 512], &bytes(seed, 512))
                .await
        })
    };
    let (first, second) = (caw(1, 1), caw(0, 2));
    // Whole-block writes are not held.
    rig.nodes[1]
        .write(1, 65536, BufSlice::from(pattern(3, 4096)), false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!first.is_finished() && !second.is_finished(), "held");
    apply(
        &mut rig.state,
        Command::ReportVolume {
            volume: VOL,
            node: 1,
            mode: IoMode::Direct,
            path: Some(rig.path.display().to_string()),
            acked_epoch: epoch,
            at_ms: 10,
        },
    );
    rig.sync().await;
    let results = [first.await.unwrap(), second.await.unwrap()];
    let written = results
        .iter()
        .filter(|r| matches!(r, Ok(CompareResult::Written)))
        .count();
    assert_eq!(written, 1, "{results:?}");
    assert!(
        results.iter().all(|r| matches!(
            r,
            Ok(CompareResult::Written | CompareResult::Miscompare { .. })
        )),
        "{results:?}"
    );

    // Back to node 1, which never hears from node 2: it waits out the handoff wait.
    rig.nodes[0].set_handoff_wait(Duration::from_millis(600));
    apply(
        &mut rig.state,
        Command::SetCoordinator {
            volume: VOL,
            node: 1,
            expected: 2,
        },
    );
    rig.sync().await;
    let started = Instant::now();
    let now = read_any(&rig, 0, 512, 512).await;
    let got = rig.nodes[0]
        .compare_and_write(1, 512, &now, &[4; 512])
        .await
        .unwrap();
    assert_eq!(got, CompareResult::Written);
    assert!(started.elapsed() >= Duration::from_millis(500));
}
