//! A real network partition: node 3 runs in its own network namespace, reaching the others
//! over a veth link that the test cuts. Node 3 coordinates the volume; node 2 sends its I/O
//! there (redirected). When the link goes down, node 3 loses the quorum, fences itself (its
//! I/O is held, nothing reaches the device) *before* the majority moves the coordinator role
//! to node 1, after which node 2's redirected I/O resumes there. When the link comes back,
//! node 3 rejoins and its held write completes. Needs root and `ip netns`; prints a skip line
//! otherwise.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Cluster, block, create_lun, create_volume, device_block, free_port, migrator, shared_image,
    stderr, wait_until,
};
use csvd_csv_fs::engine::BufSlice;
use csvd_csv_fs::redirect::BlockClient;
use csvd_raft::volume::{IoMode, RedirectReason};

const BLOCK: u64 = 4096;

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace with two veth links to the host: `cluster` (Raft and API traffic,
/// the one that gets cut) and `io` (block I/O from the test to node 3). Deleted on drop.
struct Netns {
    name: String,
    cluster_host: String,
    /// Host side and namespace side addresses of the cluster link.
    cluster_ips: (String, String),
    /// Namespace side address of the I/O link.
    io_ip: String,
}

impl Netns {
    fn create() -> Option<Netns> {
        let k = std::process::id() % 200 + 20;
        let name = format!("csvdpart{k}");
        let (ch, cn, ih, inn) = (
            format!("cpc{k}h"),
            format!("cpc{k}n"),
            format!("cpi{k}h"),
            format!("cpi{k}n"),
        );
        let _ = ip(&["netns", "del", &name]);
        if !ip(&["netns", "add", &name]) {
            eprintln!("skip: cannot create a network namespace (needs root and `ip netns`)");
            return None;
        }
        let ns = Netns {
            name: name.clone(),
            cluster_host: ch.clone(),
            cluster_ips: (format!("10.77.{k}.1"), format!("10.77.{k}.2")),
            io_ip: format!("10.78.{k}.2"),
        };
        for (host, inner, net) in [(&ch, &cn, 77), (&ih, &inn, 78)] {
            let ok = ip(&["link", "add", host, "type", "veth", "peer", "name", inner])
                && ip(&["link", "set", inner, "netns", &name])
                && ip(&["addr", "add", &format!("10.{net}.{k}.1/24"), "dev", host])
                && ip(&["link", "set", host, "up"])
                && ip(&[
                    "netns",
                    "exec",
                    &name,
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{net}.{k}.2/24"),
                    "dev",
                    inner,
                ])
                && ip(&["netns", "exec", &name, "ip", "link", "set", inner, "up"]);
            if !ok {
                eprintln!("skip: cannot set up veth links");
                return None;
            }
        }
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    fn cut(&self, down: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.cluster_host,
            if down { "down" } else { "up" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The timestamp at the start of the first log line containing `needle` (RFC 3339, so
/// timestamps of one machine compare as strings).
fn logged_at(log: &str, needle: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let plain: String = {
        let mut out = String::new();
        let mut esc = false;
        for ch in line.chars() {
            match (esc, ch) {
                (false, '\u{1b}') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    };
    plain.split_whitespace().next().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_partitioned_coordinator_fences_itself_before_failover() {
    let Some(ns) = Netns::create() else { return };
    let mut cluster = Cluster::new(3);
    let root = cluster.tmp.path().to_path_buf();
    let image = shared_image(&root, 128 << 20, 1..=3);
    // Nodes 1 and 2 on the host side of the cluster link, node 3 inside the namespace.
    for n in cluster.nodes.iter_mut() {
        let ip = if n.id == 3 {
            &ns.cluster_ips.1
        } else {
            &ns.cluster_ips.0
        };
        n.grpc = format!("{ip}:{}", free_port());
        n.iscsi = format!("{ip}:{}", free_port());
        n.migration = format!("{ip}:{}", free_port());
    }
    cluster.nodes[2].prefix = vec!["ip".into(), "netns".into(), "exec".into(), ns.name.clone()];
    let io3 = format!("{}:{}", ns.io_ip, free_port());
    let io3_flag = io3.clone();
    cluster
        .start_initialized_each(|id| {
            let mut a = vec![
                "--devices".into(),
                format!("{}/paths/n{id}/*.img", root.display()),
            ];
            if id == 3 {
                a.extend(["--io-addr".into(), io3_flag.clone()]);
            }
            a
        })
        .await;

    // Node 3 creates the volume, so it coordinates it; node 2 redirects.
    let volume = create_volume(
        &cluster.nodes[2].endpoint(),
        &root.join("paths/n3/shared.img"),
        "csv1",
    );
    let ep1 = cluster.nodes[0].endpoint();
    let disk = create_lun(&ep1, "csv1", "16M", "d");
    let out = migrator(&[
        "--endpoint",
        &ep1,
        "volume",
        "set-mode",
        "csv1",
        "--node",
        "2",
        "--mode",
        "redirected",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c1 = cluster.nodes[0].client();
    let mode_of = |id: u64, want: IoMode| {
        let c1 = c1.clone();
        async move {
            wait_until(
                &format!("node {id} in {want}"),
                Duration::from_secs(30),
                || {
                    let mut c = c1.clone();
                    async move {
                        let s = c.state().await.ok()?;
                        let v = s.volumes.get(&volume)?;
                        let n = v.nodes.get(&id)?;
                        (n.mode == want && n.acked_epoch == v.epoch).then_some(s)
                    }
                },
            )
            .await
        }
    };
    mode_of(1, IoMode::Direct).await;
    mode_of(3, IoMode::Direct).await;
    let state = mode_of(2, IoMode::Redirected(RedirectReason::UserRequest)).await;
    assert_eq!(state.volumes[&volume].coordinator, 3);
    let at = state.disks[&disk].extents[0].device_offset;
    let device_block = |offset| device_block(&image, offset);
    let b2 = BlockClient::new(
        state.nodes[&2].spec.io_addr.clone(),
        Duration::from_secs(90),
    );
    let b3 = BlockClient::new(io3.clone(), Duration::from_secs(90));
    b3.write(disk, 0, BufSlice::from(block(1)), true)
        .await
        .unwrap();
    b2.write(disk, BLOCK, BufSlice::from(block(10)), true)
        .await
        .unwrap();

    // Cut node 3 off the cluster (its block-I/O link stays up for the test).
    let cut_at = Instant::now();
    ns.cut(true);
    let log3 = cluster.nodes[2].log_path();
    wait_until("node 3 to fence itself", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log3).unwrap_or_default();
        async move { text.contains("shared-volume I/O paused").then_some(()) }
    })
    .await;
    let fenced_after = cut_at.elapsed();
    // A write through node 3 is held, not issued.
    let held = tokio::spawn(async move {
        b3.write(disk, 0, BufSlice::from(block(2)), true)
            .await
            .map(|()| b3)
    });
    // Node 2's redirected write waits for a coordinator and completes once the majority has
    // moved the role to node 1.
    b2.write(disk, BLOCK, BufSlice::from(block(11)), true)
        .await
        .unwrap();
    let resumed_after = cut_at.elapsed();
    let state = c1.clone().state().await.unwrap();
    assert_eq!(
        state.volumes[&volume].coordinator, 1,
        "the majority took over"
    );
    assert!(
        !held.is_finished(),
        "node 3 must hold its write while fenced"
    );
    assert!(
        device_block(at) == block(1)[..],
        "a fenced node issued a write"
    );
    assert!(device_block(at + BLOCK) == block(11)[..]);
    // Node 3 stopped before anyone treated it as gone.
    let paused = logged_at(&std::fs::read_to_string(&log3).unwrap(), "I/O paused").unwrap();
    let moved = cluster
        .nodes
        .iter()
        .filter_map(|n| logged_at(&n.log(), "moved the volume's coordinator"))
        .min()
        .expect("a coordinator move is logged");
    assert!(
        paused < moved,
        "node 3 paused at {paused}, the coordinator moved at {moved}"
    );
    eprintln!(
        "fenced {fenced_after:?} after the cut; redirected I/O resumed {resumed_after:?} after it"
    );

    // Heal: node 3 rejoins, its held write completes.
    ns.cut(false);
    let b3 = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the held write completes once node 3 is back")
        .unwrap()
        .unwrap();
    assert!(device_block(at) == block(2)[..]);
    assert!(b3.read(disk, BLOCK, BLOCK).await.unwrap()[..] == block(11)[..]);
}
