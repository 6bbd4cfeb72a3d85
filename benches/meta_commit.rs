//! End-to-end metadata commit benchmark: csvd's Raft service against etcd, in one run.
//!
//! The driver starts real processes on 127.0.0.1 with data directories in fresh temporary
//! directories: a 1-node and a 3-node csvd cluster (the release `csvd` binary cargo builds for
//! this bench), then a 1-member and a 3-member etcd cluster (Debian's `etcd-server`; skipped with
//! a message when it is not installed). Against each it measures
//!
//! - one client issuing writes one after another (warm-up, then a fixed count), and
//! - 64 concurrent clients, each on its own connection, each issuing a fixed count of writes,
//!
//! sent to the leader, and on 3 nodes also through a follower (which forwards to the leader). A
//! csvd write is one `Heartbeat` command committed through Raft (one log entry, fsync'd on a
//! majority before the reply); an etcd write is one `Put` of a small key and value. Latency is
//! measured around each call by the client; throughput is completed writes over the wall time
//! from the start signal to the last reply.
//!
//! Run with `cargo bench --bench meta_commit`, optionally followed by `--` and
//!
//! - `--runs N`: start every cluster N times; each cell reports its best run (highest writes/s);
//! - `--quick`: 500 sequential writes and 64 x 40 concurrent ones, for a smoke test;
//! - `--nodes 1|3`, `--only csvd|etcd`: measure a subset (for profiling one side).
//!
//! The table goes to stdout in markdown; progress goes to stderr. Every process is killed when
//! its guard is dropped, also when the driver panics.
//!
//! Both clients use the same transport: tonic over one HTTP/2 connection per client, with
//! `TCP_NODELAY`. The etcd calls are made with hand-declared `prost` messages for the two RPCs
//! used (`KV.Put`, `Maintenance.Status`), so building this bench needs no system `protoc`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csvd_raft::api::{ClusterClient, ClusterStatus, Role};
use csvd_raft::command::Command;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// Writes done before measuring, per cell (spread over the clients).
const WARMUP: usize = 200;
/// Clients of the concurrent cells.
const CONCURRENT_CLIENTS: usize = 64;
/// Longest a measured cell may run; it stops early and is marked when it would run longer.
const CELL_CAP: Duration = Duration::from_secs(60);
/// Deadline of one write.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The value of every etcd Put.
const ETCD_VALUE: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Protobuf messages of the etcd v3 API used here, declared from `etcdserverpb/rpc.proto`
/// (only the fields this driver reads or writes; others are skipped when decoding).
mod etcdpb {
    pub const PUT: &str = "/etcdserverpb.KV/Put";
    pub const STATUS: &str = "/etcdserverpb.Maintenance/Status";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and results

/// What one invocation measures.
struct Settings {
    runs: usize,
    /// Cluster sizes to measure.
    nodes: Vec<usize>,
    /// Measure csvd / etcd.
    csvd: bool,
    etcd: bool,
    sequential_writes: usize,
    concurrent_per_client: usize,
}

impl Settings {
    /// Reads `--runs N`, `--quick`, `--nodes 1|3` and `--only csvd|etcd`; ignores the `--bench`
    /// flag cargo passes and anything else.
    fn from_args() -> Self {
        let mut s = Settings {
            runs: 1,
            nodes: vec![1, 3],
            csvd: true,
            etcd: true,
            sequential_writes: 3000,
            concurrent_per_client: 200,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "--runs" => {
                    s.runs = args
                        .get(i + 1)
                        .and_then(|v| v.parse().ok())
                        .filter(|n| *n >= 1)
                        .unwrap_or_else(|| fail("--runs needs a number of at least 1"));
                    i += 1;
                }
                "--nodes" => {
                    s.nodes = match args.get(i + 1).map(String::as_str) {
                        Some("1") => vec![1],
                        Some("3") => vec![3],
                        _ => fail("--nodes takes 1 or 3"),
                    };
                    i += 1;
                }
                "--only" => {
                    match args.get(i + 1).map(String::as_str) {
                        Some("csvd") => s.etcd = false,
                        Some("etcd") => s.csvd = false,
                        _ => fail("--only takes csvd or etcd"),
                    }
                    i += 1;
                }
                "--quick" => {
                    s.sequential_writes = 500;
                    s.concurrent_per_client = 40;
                }
                _ => {}
            }
            i += 1;
        }
        s
    }
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Csvd,
    Etcd,
}

/// Where the writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Leader,
    Follower,
}

/// One row of the table: a cluster size, an entry point and a client count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    nodes: usize,
    path: Entry,
    clients: usize,
}

impl Cell {
    fn label(&self) -> String {
        let nodes = if self.nodes == 1 {
            "1 node".to_string()
        } else {
            format!("{} nodes", self.nodes)
        };
        match self.path {
            Entry::Leader => nodes,
            Entry::Follower => format!("{nodes}, via follower"),
        }
    }
}

/// The measured writes of one cell in one run.
struct Sample {
    /// Latency of each successful measured write, sorted.
    latencies: Vec<Duration>,
    /// Wall time from the start signal to the last reply.
    elapsed: Duration,
    /// Failed writes (warm-up and measured), with the first failure's message.
    errors: usize,
    first_error: Option<String>,
    /// The cell hit [`CELL_CAP`] before finishing its count.
    capped: bool,
}

impl Sample {
    fn writes_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank =
            ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1]
    }

    fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "{:.0} writes/s, p50 {} ms, p99 {} ms, max {} ms ({} writes{}{})",
            self.writes_per_sec(),
            ms(self.quantile(0.50)),
            ms(self.quantile(0.99)),
            ms(self.max()),
            self.latencies.len(),
            if self.errors > 0 {
                format!(", {} errors", self.errors)
            } else {
                String::new()
            },
            if self.capped { ", time cap hit" } else { "" },
        )
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("meta_commit: {msg}");
    std::process::exit(2);
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Where one system's writes go.
#[derive(Clone)]
enum Target {
    /// A csvd node's gRPC address; writes are heartbeats of `node` (a registered node).
    Csvd { addr: String, node: u64 },
    /// An etcd member's client address.
    Etcd { addr: String },
}

/// One client with its own connection.
enum Writer {
    Csvd {
        client: Box<ClusterClient>,
        node: u64,
    },
    Etcd {
        grpc: tonic::client::Grpc<Channel>,
        key: Vec<u8>,
    },
}

impl Writer {
    /// A client of `target`; client number `n` (etcd clients each write their own key).
    /// Connects on the first write, like [`ClusterClient`].
    fn new(target: &Target, n: usize) -> Result<Self, String> {
        match target {
            Target::Csvd { addr, node } => Ok(Writer::Csvd {
                client: Box::new(
                    ClusterClient::new(addr, None)
                        .map_err(|e| e.to_string())?
                        .with_timeout(CALL_TIMEOUT),
                ),
                node: *node,
            }),
            Target::Etcd { addr } => Ok(Writer::Etcd {
                grpc: tonic::client::Grpc::new(etcd_channel(addr)?),
                key: format!("bench/client-{n:03}").into_bytes(),
            }),
        }
    }

    /// One write, committed when this returns `Ok`.
    async fn write(&mut self, seq: u64) -> Result<(), String> {
        match self {
            Writer::Csvd { client, node } => client
                .write(Command::Heartbeat {
                    id: *node,
                    at_ms: seq,
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Writer::Etcd { grpc, key } => {
                let req = etcdpb::PutRequest {
                    key: key.clone(),
                    value: ETCD_VALUE.to_vec(),
                };
                let _: etcdpb::PutResponse = etcd_call(grpc, etcdpb::PUT, req).await?;
                Ok(())
            }
        }
    }
}

/// A lazily connected channel to an etcd member, set up like [`ClusterClient`]'s.
fn etcd_channel(addr: &str) -> Result<Channel, String> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .timeout(CALL_TIMEOUT)
        .connect_lazy())
}

async fn etcd_call<Req, Resp>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    req: Req,
) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready().await.map_err(|e| e.to_string())?;
    grpc.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

async fn etcd_status(addr: &str) -> Result<etcdpb::StatusResponse, String> {
    let mut grpc = tonic::client::Grpc::new(etcd_channel(addr)?);
    etcd_call(&mut grpc, etcdpb::STATUS, etcdpb::StatusRequest {}).await
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// Runs `clients` clients against `target`: [`WARMUP`] writes spread over them, then, from a
/// common start signal, `per_client` writes each.
async fn measure(target: &Target, clients: usize, per_client: usize) -> Sample {
    let start_line = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let warmup = WARMUP.div_ceil(clients);
    let mut tasks = Vec::with_capacity(clients);
    for n in 0..clients {
        let target = target.clone();
        let start_line = start_line.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            let mut errors = Vec::new();
            let mut writer = match Writer::new(&target, n) {
                Ok(w) => Some(w),
                Err(e) => {
                    errors.push(e);
                    None
                }
            };
            if let Some(w) = writer.as_mut() {
                for i in 0..warmup {
                    if let Err(e) = w.write(i as u64).await {
                        errors.push(e);
                    }
                }
            }
            // Every task reaches the start line, even one that could not connect.
            start_line.wait().await;
            let until = Instant::now() + CELL_CAP;
            let mut capped = false;
            if let Some(w) = writer.as_mut() {
                for i in 0..per_client {
                    if Instant::now() >= until {
                        capped = true;
                        break;
                    }
                    let t = Instant::now();
                    match w.write((warmup + i) as u64).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(e) => errors.push(e),
                    }
                }
            }
            (lat, errors, capped)
        }));
    }
    start_line.wait().await;
    let start = Instant::now();
    let mut sample = Sample {
        latencies: Vec::with_capacity(clients * per_client),
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
        capped: false,
    };
    for t in tasks {
        let (lat, errors, capped) = t.await.expect("a client task panicked");
        sample.latencies.extend(lat);
        sample.errors += errors.len();
        if sample.first_error.is_none() {
            sample.first_error = errors.into_iter().next();
        }
        sample.capped |= capped;
    }
    sample.elapsed = start.elapsed();
    sample.latencies.sort_unstable();
    sample
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that is killed (SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: String, cmd: &mut Process, log: PathBuf) -> Result<Self, String> {
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc { name, child, log })
    }

    /// `Err` with the end of its log if the process has exited.
    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); end of its log:\n{}",
                self.name,
                log_tail(&self.log)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (free when asked; the process binds it soon after).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

/// Polls `f` every 100 ms until it returns `Some`, failing early if a process exits.
async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    procs: &mut [Proc],
    mut f: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        for p in procs.iter_mut() {
            p.alive()?;
        }
        let last = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if start.elapsed() > timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what} (last: {last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running cluster of either system. Processes are dropped (killed) before the directory.
struct Cluster {
    procs: Vec<Proc>,
    leader: Target,
    follower: Option<Target>,
    _dir: tempfile::TempDir,
}

/// Starts an `n`-node csvd cluster: node 1, `init`, then the others with `--join`; returns once
/// all `n` are voters and there is a leader.
async fn start_csvd(bin: &Path, n: usize) -> Result<Cluster, String> {
    let dir = tempfile::Builder::new()
        .prefix("meta-commit-csvd-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let mut addrs = Vec::new();
    for _ in 0..n {
        addrs.push(format!("127.0.0.1:{}", free_port()?));
    }
    let spawn = |id: usize, join: Option<&str>| -> Result<Proc, String> {
        let data = dir.path().join(format!("node{id}"));
        let mut cmd = Process::new(bin);
        cmd.arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&data)
            .arg("--grpc-addr")
            .arg(&addrs[id - 1])
            .env_remove("RUST_LOG");
        if let Some(j) = join {
            cmd.arg("--join").arg(j);
        }
        Proc::spawn(
            format!("csvd node {id}"),
            &mut cmd,
            dir.path().join(format!("csvd-{id}.log")),
        )
    };
    let mut procs = vec![spawn(1, None)?];
    let first = ClusterClient::new(&addrs[0], None)
        .map_err(|e| e.to_string())?
        .with_timeout(Duration::from_secs(5));
    wait_for("csvd init", Duration::from_secs(30), &mut procs, || {
        let mut c = first.clone();
        async move {
            match c.init().await {
                Ok(id) => Ok(id),
                Err(e) if e.is_unavailable() => Err(e.to_string()),
                Err(e) => Err(format!("init refused: {e}")),
            }
        }
    })
    .await?;
    for id in 2..=n {
        procs.push(spawn(id, Some(&addrs[0]))?);
    }
    let status: ClusterStatus = wait_for(
        &format!("{n} voters and a leader"),
        Duration::from_secs(60),
        &mut procs,
        || {
            let mut c = first.clone();
            async move {
                let s = c.status().await.map_err(|e| e.to_string())?;
                let voters = s.members.iter().filter(|m| m.role == Role::Voter).count();
                if s.members.len() == n && voters == n && s.leader.is_some() {
                    Ok(s)
                } else {
                    Err(format!(
                        "{} members, {voters} voters, leader {:?}",
                        s.members.len(),
                        s.leader
                    ))
                }
            }
        },
    )
    .await?;
    let leader = status.leader.expect("checked above");
    let addr_of = |id: u64| {
        status
            .members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.grpc_addr.clone())
            .expect("a member of the status")
    };
    let follower = status
        .members
        .iter()
        .find(|m| m.id != leader)
        .map(|m| Target::Csvd {
            addr: m.grpc_addr.clone(),
            node: 1,
        });
    Ok(Cluster {
        procs,
        leader: Target::Csvd {
            addr: addr_of(leader),
            node: 1,
        },
        follower,
        _dir: dir,
    })
}

/// Starts an `n`-member etcd cluster with static bootstrap; returns once every member knows
/// the leader.
async fn start_etcd(bin: &Path, n: usize) -> Result<Cluster, String> {
    let dir = tempfile::Builder::new()
        .prefix("meta-commit-etcd-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let mut ports = Vec::new();
    for _ in 0..n {
        ports.push((free_port()?, free_port()?));
    }
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{}=http://127.0.0.1:{peer}", i + 1))
        .collect();
    let initial = initial.join(",");
    let mut procs = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let name = format!("m{}", i + 1);
        let mut cmd = Process::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(dir.path().join(&name))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-token")
            .arg("meta-commit-bench")
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr");
        procs.push(Proc::spawn(
            format!("etcd member {name}"),
            &mut cmd,
            dir.path().join(format!("etcd-{name}.log")),
        )?);
    }
    let addrs: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("127.0.0.1:{c}"))
        .collect();
    let statuses = wait_for(
        "every etcd member to know the leader",
        Duration::from_secs(60),
        &mut procs,
        || {
            let addrs = addrs.clone();
            async move {
                let mut out = Vec::new();
                for a in &addrs {
                    let s = etcd_status(a).await?;
                    if s.leader == 0 {
                        return Err(format!("{a} has no leader yet"));
                    }
                    out.push(s);
                }
                Ok(out)
            }
        },
    )
    .await?;
    let leader_id = statuses[0].leader;
    let member_id = |s: &etcdpb::StatusResponse| s.header.as_ref().map_or(0, |h| h.member_id);
    let leader = statuses
        .iter()
        .position(|s| member_id(s) == leader_id)
        .ok_or("no member reports itself as the leader")?;
    let follower = (0..n).find(|i| *i != leader).map(|i| Target::Etcd {
        addr: addrs[i].clone(),
    });
    Ok(Cluster {
        procs,
        leader: Target::Etcd {
            addr: addrs[leader].clone(),
        },
        follower,
        _dir: dir,
    })
}

// ---------------------------------------------------------------------------------------------
// The run

/// Path of `name` on `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn csvd_binary() -> PathBuf {
    // Cargo builds the package's binaries (with this bench's profile) before running a bench.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_csvd"));
    if !bin.is_file() {
        fail(&format!(
            "{} is missing: run `cargo build --release --workspace` first",
            bin.display()
        ));
    }
    bin
}

/// First line printed by `bin --version`.
fn version(bin: &Path) -> String {
    Process::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".into())
}

/// Filesystem type of the mount holding `dir` (from /proc/mounts).
fn fs_type(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2].to_string()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, t)| t)
}

type Results = BTreeMap<(Cell, System), Vec<Sample>>;

/// Measures every cell of one cluster and files the samples.
async fn measure_cluster(
    system: System,
    cluster: &mut Cluster,
    nodes: usize,
    settings: &Settings,
    results: &mut Results,
) -> Result<(), String> {
    let mut paths = vec![(Entry::Leader, cluster.leader.clone())];
    if let Some(f) = &cluster.follower {
        paths.push((Entry::Follower, f.clone()));
    }
    for (path, target) in paths {
        for (clients, per_client) in [
            (1, settings.sequential_writes),
            (CONCURRENT_CLIENTS, settings.concurrent_per_client),
        ] {
            let cell = Cell {
                nodes,
                path,
                clients,
            };
            let sample = measure(&target, clients, per_client).await;
            eprintln!(
                "  {system:?} {}, {clients} client(s): {}",
                cell.label(),
                sample.summary()
            );
            if let Some(e) = &sample.first_error {
                eprintln!("    first error: {e}");
            }
            for p in cluster.procs.iter_mut() {
                p.alive()?;
            }
            results.entry((cell, system)).or_default().push(sample);
        }
    }
    Ok(())
}

/// The best sample of a cell: the most writes per second.
fn best(results: &Results, cell: Cell, system: System) -> Option<&Sample> {
    results
        .get(&(cell, system))?
        .iter()
        .filter(|s| !s.latencies.is_empty())
        .max_by(|a, b| a.writes_per_sec().total_cmp(&b.writes_per_sec()))
}

fn print_table(results: &Results, etcd: bool, csvd: bool) {
    let mut cells: Vec<Cell> = results.keys().map(|(c, _)| *c).collect();
    cells.dedup();
    println!(
        "| cluster | clients | csvd writes/s | csvd p50 / p99 / max ms | etcd writes/s | etcd p50 / p99 / max ms | csvd/etcd writes/s | csvd/etcd p50 |"
    );
    println!("|---|---:|---:|---|---:|---|---:|---:|");
    let lat = |s: &Sample| {
        format!(
            "{} / {} / {}",
            ms(s.quantile(0.5)),
            ms(s.quantile(0.99)),
            ms(s.max())
        )
    };
    let none = "n/a".to_string();
    for cell in cells {
        let c = best(results, cell, System::Csvd);
        let e = best(results, cell, System::Etcd);
        let flag = |s: &Sample| {
            let mut f = String::new();
            if s.errors > 0 {
                f.push_str(&format!(" ({} errors)", s.errors));
            }
            if s.capped {
                f.push_str(" (time cap)");
            }
            f
        };
        let tput = |s: Option<&Sample>, name: &str| match s {
            Some(s) => format!("{:.0}{}", s.writes_per_sec(), flag(s)),
            None if name == "etcd" && !etcd => "skipped".into(),
            None if name == "csvd" && !csvd => "skipped".into(),
            None => "failed".into(),
        };
        let (ratio_t, ratio_l) = match (c, e) {
            (Some(c), Some(e)) => (
                format!("{:.2}", c.writes_per_sec() / e.writes_per_sec()),
                format!(
                    "{:.2}",
                    c.quantile(0.5).as_secs_f64() / e.quantile(0.5).as_secs_f64().max(1e-9)
                ),
            ),
            _ => (none.clone(), none.clone()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            cell.label(),
            cell.clients,
            tput(c, "csvd"),
            c.map_or(none.clone(), lat),
            tput(e, "etcd"),
            e.map_or(none.clone(), lat),
            ratio_t,
            ratio_l,
        );
    }
}

async fn run(settings: Settings) -> bool {
    let csvd = csvd_binary();
    let etcd = on_path("etcd").filter(|_| settings.etcd);
    let tmp = std::env::temp_dir();
    println!("# meta_commit");
    println!();
    println!(
        "- machine: {} CPUs, Linux {}, data dirs under {} ({})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        tmp.display(),
        fs_type(&tmp),
    );
    println!("- csvd: {}", version(&csvd));
    match &etcd {
        Some(e) => println!("- etcd: {}", version(e)),
        None if !settings.etcd => println!("- etcd: not measured (--only csvd)"),
        None => {
            println!(
                "- skip: etcd-server not installed (apt-get install -y --no-install-recommends etcd-server etcd-client); measuring csvd only"
            );
            eprintln!("skip: etcd-server not installed");
        }
    }
    println!(
        "- workload: {WARMUP} warm-up writes, then {} sequential writes (1 client) and {CONCURRENT_CLIENTS} clients x {} writes; best of {} run(s) by writes/s",
        settings.sequential_writes, settings.concurrent_per_client, settings.runs
    );
    println!();

    let mut results = Results::new();
    let mut ok = true;
    for run in 1..=settings.runs {
        for nodes in settings.nodes.clone() {
            if settings.csvd {
                eprintln!("run {run}/{}: csvd, {nodes} node(s)", settings.runs);
                let outcome = match start_csvd(&csvd, nodes).await {
                    Ok(mut c) => {
                        measure_cluster(System::Csvd, &mut c, nodes, &settings, &mut results).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    eprintln!("csvd, {nodes} node(s): {e}");
                    ok = false;
                }
            }
            if let Some(bin) = &etcd {
                eprintln!("run {run}/{}: etcd, {nodes} member(s)", settings.runs);
                let outcome = match start_etcd(bin, nodes).await {
                    Ok(mut c) => {
                        measure_cluster(System::Etcd, &mut c, nodes, &settings, &mut results).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    eprintln!("etcd, {nodes} member(s): {e}");
                }
            }
        }
    }
    print_table(&results, etcd.is_some(), settings.csvd);
    ok
}

fn main() {
    let settings = Settings::from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start the async runtime: {e}")));
    if !runtime.block_on(run(settings)) {
        std::process::exit(1);
    }
}
