//! Three real `csvd` processes share one sparse file as a volume, each through its own path
//! (a symlink per node, found by its superblock). Data written through one node reads back
//! identically through a direct and a forced-redirected node; a node whose path is cut turns
//! `redirected(no_device_path)` and keeps serving, then returns to direct when the path heals;
//! killing the coordinator during a redirected write stream loses no acknowledged write; and a
//! node cut off from the quorum pauses its I/O until it is back. Needs O_DIRECT on the temp
//! directory's filesystem; prints a skip line when it is missing.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Cluster, block, create_lun, create_volume, device_block, migrator, shared_image, stderr,
    stdout, wait_until,
};
use csvd_csv_fs::engine::{AlignedBuf, BufSlice};
use csvd_csv_fs::redirect::BlockClient;
use csvd_raft::ClusterState;
use csvd_raft::volume::{IoMode, RedirectReason};
use uuid::Uuid;

const DEVICE_BYTES: u64 = 256 << 20;
const BLOCK: u64 = 4096;

fn direct_io_works(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, vec![0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    if !ok {
        eprintln!("skip: O_DIRECT is not supported on {}", dir.display());
    }
    ok
}

struct Shared {
    cluster: Cluster,
    image: PathBuf,
    volume: Uuid,
    disk: u64,
}

impl Shared {
    /// The path node `id` sees the device through.
    fn path_of(&self, id: u64) -> PathBuf {
        self.cluster
            .tmp
            .path()
            .join(format!("paths/n{id}/shared.img"))
    }

    async fn state(&self, via: usize) -> ClusterState {
        let mut c = self.cluster.nodes[via].client();
        c.state().await.expect("state")
    }

    async fn client(&self, id: u64) -> BlockClient {
        // Ask any node that answers (one may have left or been killed).
        let mut state = None;
        for n in &self.cluster.nodes {
            if let Ok(s) = n.client().state().await {
                state = Some(s);
                break;
            }
        }
        let state = state.expect("a node answers");
        BlockClient::new(
            state.nodes[&id].spec.io_addr.clone(),
            Duration::from_secs(90),
        )
    }

    /// Waits until node `id` reports `mode` for the volume (asked through `via`).
    async fn wait_mode(&self, via: usize, id: u64, mode: IoMode) {
        let client = self.cluster.nodes[via].client();
        let volume = self.volume;
        wait_until(
            &format!("node {id} to report {mode}"),
            Duration::from_secs(30),
            || {
                let mut c = client.clone();
                async move {
                    let s = c.state().await.ok()?;
                    let v = s.volumes.get(&volume)?;
                    let n = v.nodes.get(&id)?;
                    (n.mode == mode && n.acked_epoch == v.epoch).then_some(())
                }
            },
        )
        .await;
    }
}

/// Starts three nodes, each finding the volume through its own symlink, creates the volume
/// through node 1 (its coordinator) and a 64 MiB LUN, and waits for every node to go direct.
async fn start() -> Option<Shared> {
    let mut cluster = Cluster::new(3);
    if !direct_io_works(cluster.tmp.path()) {
        return None;
    }
    let root = cluster.tmp.path().to_path_buf();
    let image = shared_image(&root, DEVICE_BYTES, 1..=3);
    cluster
        .start_initialized_each(|id| {
            vec![
                "--devices".into(),
                format!("{}/paths/n{id}/*.img", root.display()),
            ]
        })
        .await;
    let ep = cluster.nodes[0].endpoint();
    let volume = create_volume(&ep, &root.join("paths/n1/shared.img"), "csv1");
    let disk = create_lun(&ep, "csv1", "64M", "disk1");
    let shared = Shared {
        cluster,
        image,
        volume,
        disk,
    };
    for id in 1..=3 {
        shared.wait_mode(0, id, IoMode::Direct).await;
    }
    Some(shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_nodes_direct_redirected_path_loss_and_coordinator_crash() {
    let Some(mut s) = start().await else { return };
    let ep = |s: &Shared, i: usize| s.cluster.nodes[i].endpoint();
    let disk = s.disk;

    // Node 3 is told to redirect; node 2 stays direct.
    let out = migrator(&[
        "--endpoint",
        &ep(&s, 1),
        "volume",
        "set-mode",
        "csv1",
        "--node",
        "3",
        "--mode",
        "redirected",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    s.wait_mode(0, 3, IoMode::Redirected(RedirectReason::UserRequest))
        .await;
    let (a, b, c) = (s.client(1).await, s.client(2).await, s.client(3).await);

    // 4 MiB written through A (direct) reads back through B (direct) and C (redirected).
    let mut want = Vec::new();
    for i in 0..16u64 {
        let mut buf = AlignedBuf::zeroed(256 << 10).unwrap();
        for (j, chunk) in buf.chunks_mut(BLOCK as usize).enumerate() {
            chunk.copy_from_slice(&block(i * 64 + j as u64));
        }
        want.extend_from_slice(&buf);
        a.write(disk, i * (256 << 10), BufSlice::from(buf), false)
            .await
            .unwrap();
    }
    for (name, client) in [("B", &b), ("C", &c)] {
        let got = client.read(disk, 0, 4 << 20).await.unwrap();
        assert!(got[..] == want[..], "{name} reads what A wrote");
    }
    // And back: C writes (redirected), A and B read.
    c.write(disk, 8 << 20, BufSlice::from(block(7777)), true)
        .await
        .unwrap();
    for client in [&a, &b] {
        assert!(client.read(disk, 8 << 20, BLOCK).await.unwrap()[..] == block(7777)[..]);
    }

    // Cut B's path: B turns redirected(no_device_path) and keeps serving.
    std::fs::remove_file(s.path_of(2)).unwrap();
    s.wait_mode(0, 2, IoMode::Redirected(RedirectReason::NoDevicePath))
        .await;
    let out = migrator(&["--endpoint", &ep(&s, 0), "volume", "show", "csv1"]);
    assert!(
        stdout(&out).contains("redirected(no_device_path)"),
        "{}",
        stdout(&out)
    );
    b.write(disk, 9 << 20, BufSlice::from(block(8888)), false)
        .await
        .unwrap();
    assert!(a.read(disk, 9 << 20, BLOCK).await.unwrap()[..] == block(8888)[..]);
    assert!(b.read(disk, 0, 4 << 20).await.unwrap()[..] == want[..]);
    // Heal: back to direct.
    std::os::unix::fs::symlink(&s.image, s.path_of(2)).unwrap();
    s.wait_mode(0, 2, IoMode::Direct).await;
    assert!(b.read(disk, 9 << 20, BLOCK).await.unwrap()[..] == block(8888)[..]);

    // A redirected write stream through C; the coordinator (node 1) is killed in the middle.
    // Eight writers cycle over 8192 blocks; a block is only ever written by one writer, one
    // write at a time, and each write is retried until acknowledged, as an initiator would.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let base = 16u64 << 20;
    const BLOCKS: u64 = 8192;
    let c_addr = s.state(0).await.nodes[&3].spec.io_addr.clone();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let c = BlockClient::new(c_addr.clone(), Duration::from_secs(90));
            let acked = acked.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seq = w;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let at = base + (seq % BLOCKS) * BLOCK;
                    loop {
                        match c.write(disk, at, BufSlice::from(block(seq)), false).await {
                            Ok(()) => break,
                            Err(e) => {
                                eprintln!("write {seq} will be retried: {e}");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                    acked.lock().unwrap().push(seq);
                    seq += 8;
                }
            })
        })
        .collect();
    // The streams run: a few writes acknowledged before the coordinator dies.
    wait_until("writes before the crash", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 16).then_some(()) }
    })
    .await;
    let before_kill = acked.lock().unwrap().len();
    s.cluster.node(1).kill9();
    // A new coordinator takes over and the stream resumes.
    let client = s.cluster.nodes[1].client();
    let volume = s.volume;
    let new_coordinator = wait_until("a new coordinator", Duration::from_secs(60), || {
        let mut c = client.clone();
        async move {
            let st = c.state().await.ok()?;
            let v = st.volumes.get(&volume)?;
            (v.coordinator != 1).then_some(v.coordinator)
        }
    })
    .await;
    let resumed = Instant::now();
    let at_failover = acked.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() <= at_failover + 64 {
        assert!(
            Instant::now() < deadline,
            "writes did not resume after the failover\nnode 2:\n{}\nnode 3:\n{}",
            s.cluster.nodes[1].log(),
            s.cluster.nodes[2].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "coordinator moved to node {new_coordinator}; {} writes acknowledged ({before_kill} before the kill, resumed {:?} after the move)",
        acked.len(),
        resumed.elapsed()
    );
    // Every block holds its last acknowledged write, through both surviving nodes.
    let mut last = std::collections::BTreeMap::new();
    for seq in &acked {
        let e = last.entry(seq % BLOCKS).or_insert(*seq);
        *e = (*e).max(*seq);
    }
    for client in [&b, &c] {
        let mut got = Vec::new();
        for chunk in 0..8 {
            let part = client
                .read(
                    disk,
                    base + chunk * (BLOCKS / 8) * BLOCK,
                    BLOCKS / 8 * BLOCK,
                )
                .await
                .unwrap();
            got.extend_from_slice(&part);
        }
        for (blk, seq) in &last {
            let at = (blk * BLOCK) as usize;
            assert_eq!(
                crc32fast::hash(&got[at..at + BLOCK as usize]),
                crc32fast::hash(&block(*seq)),
                "block {blk} holds acknowledged write {seq}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_node_without_quorum_pauses_until_it_is_back() {
    let Some(mut s) = start().await else { return };
    let disk = s.disk;
    let state = s.state(0).await;
    let device_offset = state.disks[&disk].extents[0].device_offset;
    let c = s.client(3).await;
    c.write(disk, 0, BufSlice::from(block(1)), true)
        .await
        .unwrap();
    assert!(device_block(&s.image, device_offset) == block(1)[..]);

    // Freeze both peers: node 3 is alone, without quorum.
    let pid = |s: &mut Shared, id: u64| s.cluster.node(id).child.as_ref().unwrap().id();
    let peers = [pid(&mut s, 1), pid(&mut s, 2)];
    for p in peers {
        nix_signal(p, "STOP");
    }
    // Its lease runs out (5 s) and it says so.
    let log = s.cluster.nodes[2].log_path();
    wait_until("node 3 to pause", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("shared-volume I/O paused").then_some(()) }
    })
    .await;
    // A write now is held, not issued: the device keeps the old block.
    let held = tokio::spawn(async move {
        c.write(disk, 0, BufSlice::from(block(2)), true)
            .await
            .map(|()| c)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!held.is_finished(), "the write must wait while paused");
    assert!(
        device_block(&s.image, device_offset) == block(1)[..],
        "a paused node issued a write"
    );
    for p in peers {
        nix_signal(p, "CONT");
    }
    // Back in the quorum: the held write completes and lands.
    let c = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the held write completes after the quorum is back")
        .unwrap()
        .unwrap();
    assert!(device_block(&s.image, device_offset) == block(2)[..]);
    assert!(c.read(disk, 0, BLOCK).await.unwrap()[..] == block(2)[..]);

    // The coordinator (node 1) leaves the cluster: the role moves at once, no wait needed.
    let ep = s.cluster.nodes[1].endpoint();
    let out = migrator(&["--endpoint", &ep, "cluster", "leave", "--node", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let client = s.cluster.nodes[1].client();
    let volume = s.volume;
    let to = wait_until(
        "the coordinator to move off the node that left",
        Duration::from_secs(30),
        || {
            let mut c = client.clone();
            async move {
                let st = c.state().await.ok()?;
                let v = st.volumes.get(&volume)?;
                (!st.nodes.contains_key(&1) && v.coordinator != 1).then_some(v.coordinator)
            }
        },
    )
    .await;
    assert!(to == 2 || to == 3);
    let out = migrator(&[
        "--endpoint",
        &ep,
        "volume",
        "set-mode",
        "csv1",
        "--node",
        &(5 - to).to_string(),
        "--mode",
        "redirected",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    s.wait_mode(1, 5 - to, IoMode::Redirected(RedirectReason::UserRequest))
        .await;
    let other = s.client(5 - to).await;
    other
        .write(disk, BLOCK, BufSlice::from(block(3)), true)
        .await
        .unwrap();
    assert!(device_block(&s.image, device_offset + BLOCK) == block(3)[..]);
}

fn nix_signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Bad input reaches no device: garbage on the block-I/O port closes only that connection, a
/// corrupt write payload fails only its request, out-of-range and unaligned I/O is refused
/// with its reason, and a device path showing a corrupt or another cluster's superblock is
/// never attached (the node goes redirected) and never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_bad_block_io_and_bad_superblocks_write_nothing() {
    use csvd_csv_fs::redirect::CallError;
    use csvd_csv_fs::superblock::Superblock;
    use csvd_csv_fs::wire::{Op, RESPONSE_BYTES, RequestHeader, ResponseHeader, Status};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some(s) = start().await else { return };
    let disk = s.disk;
    let state = s.state(0).await;
    let addr = state.nodes[&1].spec.io_addr.clone();
    let a = s.client(1).await;

    // Garbage: the server closes the connection and keeps serving others.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sock.write_all(&[0x5a; 56]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
        .await
        .expect("the server closes a garbage connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to garbage");

    // A write whose payload does not match its checksum: refused, the connection lives on.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let payload = block(42);
    let head = RequestHeader {
        op: Op::Write,
        flags: csvd_csv_fs::wire::FLAG_LOCAL,
        id: 7,
        disk,
        offset: 0,
        len: BLOCK,
        epoch: 0,
        payload_crc: crc32fast::hash(&payload) ^ 1,
    };
    sock.write_all(&head.encode()).await.unwrap();
    sock.write_all(&payload).await.unwrap();
    let mut h = [0u8; RESPONSE_BYTES];
    sock.read_exact(&mut h).await.unwrap();
    let answer = ResponseHeader::decode(&h).unwrap();
    assert_eq!((answer.status, answer.id), (Status::ChecksumMismatch, 7));
    let mut msg = vec![0u8; answer.len as usize];
    sock.read_exact(&mut msg).await.unwrap();
    let read = RequestHeader {
        op: Op::Read,
        id: 8,
        payload_crc: 0,
        ..head
    };
    sock.write_all(&read.encode()).await.unwrap();
    sock.read_exact(&mut h).await.unwrap();
    let answer = ResponseHeader::decode(&h).unwrap();
    assert_eq!(
        (answer.status, answer.id, answer.len),
        (Status::Ok, 8, 4096)
    );
    let mut data = vec![0u8; 4096];
    sock.read_exact(&mut data).await.unwrap();
    assert!(
        data.iter().all(|b| *b == 0),
        "the corrupt write did not land"
    );

    // Out of range and unaligned, through a real node.
    let err = a.read(disk, 64 << 20, BLOCK).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Remote(Status::OutOfRange, m) if m.contains("beyond the end")),
        "{err}"
    );
    let err = a
        .write(disk, 100, BufSlice::from(block(1)), false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Remote(Status::Unaligned, m) if m.contains("multiple of 4096")),
        "{err}"
    );

    // Node 2's path now shows a superblock of another cluster, node 3's a corrupt one.
    let real = std::fs::read(&s.image).unwrap()[..4096].to_vec();
    let sb = Superblock::decode(&real).unwrap();
    let foreign = Superblock::new(
        sb.volume_id,
        Uuid::from_u128(0xf0e1),
        sb.device_bytes,
        &sb.name,
        1,
    )
    .unwrap()
    .encode()
    .unwrap();
    let mut corrupt = real.clone();
    corrupt[100] ^= 0xff; // inside the name: the checksum no longer matches
    for (id, head) in [(2u64, foreign.to_vec()), (3, corrupt.clone())] {
        let p = s.path_of(id);
        std::fs::remove_file(&p).unwrap();
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(DEVICE_BYTES).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &head, 0).unwrap();
    }
    s.wait_mode(0, 2, IoMode::Redirected(RedirectReason::NoDevicePath))
        .await;
    s.wait_mode(0, 3, IoMode::Redirected(RedirectReason::NoDevicePath))
        .await;
    // I/O through them still works, via the coordinator...
    let c = s.client(3).await;
    c.write(disk, 0, BufSlice::from(block(5)), true)
        .await
        .unwrap();
    assert!(a.read(disk, 0, BLOCK).await.unwrap()[..] == block(5)[..]);
    // ...and their stand-in devices were never written.
    for (id, want) in [(2u64, &foreign[..]), (3, &corrupt[..])] {
        let got = std::fs::read(s.path_of(id)).unwrap();
        assert!(got[..4096] == *want, "node {id} changed the superblock");
        assert!(
            got[4096..].iter().all(|b| *b == 0),
            "node {id} wrote to a bad device"
        );
    }
    let log = s.cluster.nodes[2].log();
    assert!(
        log.contains("checksum"),
        "the skip reason is logged:\n{log}"
    );
}
