//! Shared helpers for cluster scenarios: start real `csvd` processes on loopback with
//! temporary data directories, stop and kill them, wait for conditions, run `migrator`.

#![allow(dead_code)]

pub mod initiator;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use csvd_raft::api::{ClusterClient, ClusterStatus};

/// Path of a binary built by this workspace (`csvd` or `migrator`).
pub fn bin(name: &str) -> PathBuf {
    if name == "csvd" {
        return PathBuf::from(env!("CARGO_BIN_EXE_csvd"));
    }
    // Other packages' binaries sit next to ours in the target directory.
    let dir = Path::new(env!("CARGO_BIN_EXE_csvd"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (the test command does)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range (32768 and up): a port
/// taken from that range is free only until the next outgoing connection or `bind(0)` of any
/// process reuses it, which made concurrent cluster tests start nodes on each other's ports.
///
/// Test processes run side by side and a node binds its ports only when it starts, seconds
/// after they were chosen; so the ports are handed out in turn from a counter that all test
/// processes share (a file under the temporary directory, locked while it is read and
/// advanced). Two tests never get the same port until 12000 have been handed out.
pub fn free_port() -> u16 {
    use std::io::{Read, Seek, Write};
    let path = std::env::temp_dir().join("csvd-test-ports");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    f.lock().unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    let mut next: u32 = text.trim().parse().unwrap_or(0);
    let port = loop {
        let port = 20_000 + (next % 12_000) as u16;
        next = next.wrapping_add(1);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            break port;
        }
    };
    f.set_len(0).unwrap();
    f.rewind().unwrap();
    write!(f, "{next}").unwrap();
    // Unlocked when `f` closes.
    port
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One csvd node: its addresses, data dir and (while running) its process.
pub struct Node {
    pub id: u64,
    pub grpc: String,
    pub iscsi: String,
    pub migration: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub starts: u32,
    /// A command the daemon runs under, like `ip netns exec NS` (empty: none).
    pub prefix: Vec<String>,
}

impl Node {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn client(&self) -> ClusterClient {
        ClusterClient::new(&self.grpc, None)
            .unwrap()
            .with_timeout(Duration::from_secs(10))
    }

    /// The log file of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("csvd-{}.log", self.starts))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process with `args` after the common flags.
    pub fn start_with(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("csvd"));
                c
            }
            None => Command::new(bin("csvd")),
        };
        let child = cmd
            .args(["--data-dir", self.dir.to_str().unwrap()])
            .args(args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn csvd");
        self.child = Some(child);
    }

    /// First start: every address as a flag.
    pub fn start_fresh(&mut self, join: Option<&str>, extra: &[&str]) {
        let id = self.id.to_string();
        let (grpc, iscsi, migration) = (
            self.grpc.clone(),
            self.iscsi.clone(),
            self.migration.clone(),
        );
        let mut args = vec![
            "--node-id",
            &id,
            "--grpc-addr",
            &grpc,
            "--iscsi-addr",
            &iscsi,
            "--migration-addr",
            &migration,
            "--switches",
            "lan",
        ];
        if let Some(j) = join {
            args.extend(["--join", j]);
        }
        // The block-I/O listener on a chosen port too, not a kernel-picked one.
        let ip = grpc.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip);
        let io = format!("{ip}:{}", free_port());
        if !extra.contains(&"--io-addr") {
            args.extend(["--io-addr", &io]);
        }
        args.extend(extra);
        self.start_with(&args);
    }

    /// Restart: the data dir alone.
    pub fn restart(&mut self) {
        self.start_with(&[]);
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends the daemon `sig`, spelled as `kill` takes it ("-STOP", "-CONT").
    pub fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("node not running")
            .id()
            .to_string();
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid} (node {})", self.id);
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("node not running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!(
                    "node {} did not stop within 20 s of SIGTERM\n{}",
                    self.id,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit on its own; returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait().unwrap()
            {
                self.child = None;
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "node {} did not exit\n{}",
                self.id,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn local_status(&self) -> Option<ClusterStatus> {
        self.client().local_status().await.ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        // Guests run daemonized so that they outlive csvd; a test's guests must not outlive
        // the test. Their QEMU command lines name files in the node's data dir.
        if self.dir.join("vms").is_dir() {
            let _ = Command::new("pkill")
                .args([
                    "-KILL",
                    "-f",
                    &format!("qemu-system-x86_64 .*{}/vms/", self.dir.display()),
                ])
                .status();
        }
    }
}

/// A set of nodes on loopback sharing one temporary directory.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub tmp: tempfile::TempDir,
}

impl Cluster {
    /// Allocates `n` nodes (ids 1..=n) without starting them.
    pub fn new(n: u64) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let nodes = (1..=n).map(|id| Self::make_node(tmp.path(), id)).collect();
        Self { nodes, tmp }
    }

    fn make_node(root: &Path, id: u64) -> Node {
        let dir = root.join(format!("node{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        Node {
            id,
            grpc: format!("127.0.0.1:{}", free_port()),
            iscsi: format!("127.0.0.1:{}", free_port()),
            // Each node's migration network on an address of its own (loopback has all of
            // 127/8), so that a test can cut one node's migration network whole.
            migration: format!("127.0.0.{}:{}", 10 + id, free_port()),
            dir,
            child: None,
            starts: 0,
            prefix: Vec::new(),
        }
    }

    /// Adds one more (unstarted) node.
    pub fn add_node(&mut self) -> usize {
        let id = self.nodes.len() as u64 + 1;
        self.nodes.push(Self::make_node(self.tmp.path(), id));
        self.nodes.len() - 1
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    /// Starts node 1, runs `cluster init` on it, starts the others with `--join` node 1 and
    /// waits until all are voters with one leader. Returns the cluster id.
    pub async fn start_initialized(&mut self, extra: &[&str]) -> String {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        self.start_initialized_each(|_| extra.clone()).await
    }

    /// Like [`Cluster::start_initialized`], with flags chosen per node id.
    pub async fn start_initialized_each(&mut self, extra: impl Fn(u64) -> Vec<String>) -> String {
        let args = |id: u64| extra(id);
        let first = args(self.nodes[0].id);
        let first: Vec<&str> = first.iter().map(String::as_str).collect();
        self.nodes[0].start_fresh(None, &first);
        let mut c = self.nodes[0].client();
        let cluster_id = wait_until("cluster init", Duration::from_secs(20), || {
            let mut c = c.clone();
            async move { c.init().await.ok() }
        })
        .await;
        let join = self.nodes[0].grpc.clone();
        for n in self.nodes.iter_mut().skip(1) {
            let mine = args(n.id);
            let mine: Vec<&str> = mine.iter().map(String::as_str).collect();
            n.start_fresh(Some(&join), &mine);
        }
        self.wait_members().await;
        let _ = &mut c;
        cluster_id
    }

    /// Waits until every node is a member, as many voters as desired, with one leader;
    /// panics after 60 s with the last status and the end of every node's log.
    pub async fn wait_members(&self) {
        let mut c = self.nodes[0].client();
        let want = self.nodes.len();
        let voters = csvd_raft::node::desired_voters(want);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while std::time::Instant::now() < deadline {
            match c.status().await {
                Ok(s) => {
                    let v = s
                        .members
                        .iter()
                        .filter(|m| m.role == csvd_raft::api::Role::Voter)
                        .count();
                    if s.members.len() == want && v == voters && s.leader.is_some() {
                        return;
                    }
                    last = format!("{s:?}");
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let log = n.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- node {} ({}):\n{}", n.id, n.grpc, tail.join("\n"))
            })
            .collect();
        panic!(
            "timed out after 60s waiting for all nodes to be members; last status: {last}\n{}",
            logs.join("\n")
        );
    }

    /// Waits until every running node has applied what the cluster had committed when this
    /// was called. A node's own decisions (its portal's, its agents') follow what it has
    /// applied, which may lag behind the leader that acknowledged a write.
    pub async fn wait_applied_everywhere(&self) {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let mut c = running.first().expect("a running node").client();
        let committed = wait_until("the committed index", Duration::from_secs(30), || {
            let mut c = c.clone();
            async move { c.status().await.ok().map(|s| s.committed_index) }
        })
        .await;
        for n in running {
            wait_until(
                &format!("node {} to apply index {committed}", n.id),
                Duration::from_secs(30),
                || async move {
                    n.local_status()
                        .await
                        .is_some_and(|s| s.applied_index >= committed)
                        .then_some(())
                },
            )
            .await;
        }
        let _ = &mut c;
    }

    /// Waits for a leader seen from `via`; returns (leader id, status).
    pub async fn leader_via(&self, via: u64) -> (u64, ClusterStatus) {
        let client = self.nodes.iter().find(|n| n.id == via).unwrap().client();
        wait_until("a leader", Duration::from_secs(30), || {
            let mut c = client.clone();
            async move {
                let s = c.status().await.ok()?;
                s.leader.map(|l| (l, s))
            }
        })
        .await
    }
}

/// Runs `migrator` with `args`; returns its output.
pub fn migrator(args: &[&str]) -> Output {
    migrator_command(args).output().expect("run migrator")
}

/// `migrator ARGS` to run as the caller likes (in the background, say), with no endpoint
/// or cluster id from the environment.
pub fn migrator_command(args: &[&str]) -> Command {
    let mut c = Command::new(bin("migrator"));
    c.args(args)
        .env_remove("CSVD_ENDPOINT")
        .env_remove("CSVD_CLUSTER_ID");
    c
}

/// stderr of a finished process as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout of a finished process as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A sparse file of `bytes` at `root/shared.img`, the shared device, and one symlink to it per
/// node id in `ids` at `root/paths/n<id>/shared.img`: each node finds the volume through its
/// own path (`--devices root/paths/n<id>/*.img`), as nodes of a SAN would.
pub fn shared_image(root: &Path, bytes: u64, ids: std::ops::RangeInclusive<u64>) -> PathBuf {
    let image = root.join("shared.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    for id in ids {
        let dir = root.join(format!("paths/n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&image, dir.join("shared.img")).unwrap();
    }
    image
}

/// `migrator volume create` through `endpoint`; returns the volume id.
pub fn create_volume(endpoint: &str, device: &Path, name: &str) -> uuid::Uuid {
    let out = migrator(&[
        "--endpoint",
        endpoint,
        "--json",
        "volume",
        "create",
        "--device",
        device.to_str().unwrap(),
        "--name",
        name,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["id"].as_str().unwrap().parse().unwrap()
}

/// `migrator lun create` through `endpoint`; returns the disk id.
pub fn create_lun(endpoint: &str, volume: &str, size: &str, name: &str) -> u64 {
    let out = migrator(&[
        "--endpoint",
        endpoint,
        "--json",
        "lun",
        "create",
        "--volume",
        volume,
        "--size",
        size,
        "--name",
        name,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["id"].as_u64().unwrap()
}

/// 4 KiB whose content depends on `seq`: distinct per block, checkable on its own.
pub fn block(seq: u64) -> csvd_csv_fs::engine::AlignedBuf {
    let mut b = csvd_csv_fs::engine::AlignedBuf::zeroed(4096).unwrap();
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    b
}

/// 4 KiB of `image` at `offset`, read with O_DIRECT: what the device holds.
pub fn device_block(image: &Path, offset: u64) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
        .unwrap();
    let mut buf = csvd_csv_fs::engine::AlignedBuf::zeroed(4096).unwrap();
    f.read_exact_at(&mut buf, offset).unwrap();
    buf.to_vec()
}

/// A three-node cluster sharing one volume (a sparse file of `device_bytes`, each node through
/// its own path) with one LUN of `lun_size` named `lun_name`, waited until every node does
/// direct I/O on it. Returns the cluster, the iSCSI target name and the LUN number.
pub async fn lun_cluster(
    device_bytes: u64,
    lun_size: &str,
    lun_name: &str,
) -> (Cluster, String, u64) {
    lun_cluster_with(device_bytes, lun_size, lun_name, &[]).await
}

/// Like [`lun_cluster`], each node started with `extra` flags too. The shared device is
/// `cluster.tmp/shared.img`.
pub async fn lun_cluster_with(
    device_bytes: u64,
    lun_size: &str,
    lun_name: &str,
    extra: &[&str],
) -> (Cluster, String, u64) {
    let mut cluster = Cluster::new(3);
    let root = cluster.tmp.path().to_path_buf();
    shared_image(&root, device_bytes, 1..=3);
    let cluster_id = cluster
        .start_initialized_each(|id| {
            let glob = root.join(format!("paths/n{id}/*.img"));
            let mut args = vec!["--devices".to_string(), glob.display().to_string()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        })
        .await;
    let endpoint = cluster.nodes[0].endpoint();
    create_volume(&endpoint, &root.join("paths/n1/shared.img"), "vol");
    let lun = create_lun(&endpoint, "vol", lun_size, lun_name);
    let c = cluster.nodes[0].client();
    wait_until(
        "every node direct on the volume",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            async move {
                let s = c.state().await.ok()?;
                let v = s.volumes.values().next()?;
                // Direct, and past the epoch that added the LUN: a node may report a mode
                // it probed before it applied the LUN's creation.
                (v.nodes.len() == 3
                    && v.nodes.values().all(|n| {
                        n.mode == csvd_raft::volume::IoMode::Direct && n.acked_epoch == v.epoch
                    }))
                .then_some(())
            }
        },
    )
    .await;
    (cluster, format!("iqn.2025-11.org.csvd:{cluster_id}"), lun)
}

/// The test guest's directory (scripts/build-guest), when QEMU and the guest are there;
/// otherwise `None` after a skip line.
pub fn test_guest() -> Option<PathBuf> {
    let qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu {
        eprintln!("skip: qemu-system-x86_64 is not installed (scripts/install-deps installs it)");
        return None;
    }
    let dir = std::env::var_os("CSVD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/csvd-guest"));
    if !dir.join("vmlinuz").is_file() {
        eprintln!(
            "skip: no test guest in {} (run scripts/build-guest)",
            dir.display()
        );
        return None;
    }
    Some(dir)
}

/// One sequence record of the test guest's agent: (boot id, sequence number, counter), if
/// `block` holds one with a valid checksum (layout in guest/agent.c).
pub fn guest_record(block: &[u8]) -> Option<(u64, u64, u64)> {
    if block.len() < 48 || &block[..8] != b"CSVDSEQ1" {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(block[i..i + 8].try_into().unwrap());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &block[..40] {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h == word(40)).then(|| (word(8), word(16), word(24)))
}

/// The agent's records on a LUN (its first 1024 blocks, read from the shared device),
/// sorted by sequence number.
pub fn guest_records(image: &Path, disk: &csvd_raft::volume::DiskRecord) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = (0..1024u64)
        .filter_map(|slot| {
            let (at, _) = disk.map(slot * 4096, 4096).expect("within the LUN")[0];
            guest_record(&device_block(image, at))
        })
        .collect();
    out.sort_by_key(|r| r.1);
    out
}

/// (boot id, counter) of each line the agent printed in a serial log, in order.
pub fn agent_lines(log: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("csvd-agent boot=")?;
            let boot = rest.split_whitespace().next()?.to_string();
            let counter = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("counter="))?
                .parse()
                .ok()?;
            Some((boot, counter))
        })
        .collect()
}

/// A bridge named `lan` for test VMs' NICs (test nodes declare the switch `lan`); false when
/// it cannot be made (not root).
pub fn ensure_bridge() -> bool {
    if Path::new("/sys/class/net/lan/bridge").is_dir() {
        return true;
    }
    std::process::Command::new("ip")
        .args(["link", "add", "lan", "type", "bridge"])
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new("ip")
            .args(["link", "set", "lan", "up"])
            .status()
            .is_ok_and(|s| s.success())
}

/// `migrator --endpoint EP --json vm create NAME --memory MIB --node N` booting the test guest
/// in `guest` (its kernel and initramfs, with `append`), plus `extra` flags.
pub fn create_guest_vm(
    ep: &str,
    guest: &Path,
    name: &str,
    memory: &str,
    node: &str,
    append: &str,
    extra: &[&str],
) -> Output {
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initrd.img");
    let mut args = vec![
        "--endpoint",
        ep,
        "--json",
        "vm",
        "create",
        name,
        "--memory",
        memory,
        "--node",
        node,
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        append,
    ];
    args.extend_from_slice(extra);
    migrator(&args)
}
