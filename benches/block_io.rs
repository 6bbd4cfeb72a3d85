//! End-to-end block I/O: the raw file under fio against a csv-fs virtual disk on the same file,
//! served directly and redirected to a coordinator over loopback, in one run.
//!
//! Workloads (each for `--seconds`, default 10):
//! - 4 KiB random read and random write at queue depth 32,
//! - 1 MiB sequential read and write at queue depth 8.
//!
//! Sides:
//! - **raw**: fio 3.x, `ioengine=io_uring`, `direct=1`, on the file's data area (fio must be
//!   installed; the side is skipped with a message otherwise);
//! - **csv-fs direct**: a node with the file attached as a volume's device, I/O through its
//!   public API (extent map, barrier gate, lease check, io_uring engine);
//! - **csv-fs redirected**: a second node in `redirected(user_request)`, whose every I/O goes
//!   over TCP on 127.0.0.1 to the first (the coordinator), which runs it on its engine.
//!
//! Each run measures every side once, one after the other; with `--runs N` the table shows each
//! side's median rate and, for each ratio, the median of the ratios taken within a run.
//!
//! The csv-fs sides are driven by this process: `qd` tasks each keep one I/O in flight (random
//! offsets from a per-task xorshift; sequential ones from a shared cursor, like one fio job
//! with that depth). Both nodes and the driver share this process and its runtime.
//!
//! Run: `cargo bench --bench block_io -- [--seconds N] [--file PATH] [--size-gib N] [--runs N]
//! [--only TEXT] [--no-raw] [--no-redirected] [--grpc] [--one-thread]` (`--only` keeps the
//! workloads whose name contains TEXT; the `--no-*` flags skip a side, for profiling the other;
//! `--grpc` adds the transport the redirect protocol was chosen over, below; `--one-thread`
//! runs the driver and the direct and redirected nodes on one thread, as fio runs its one job,
//! instead of on a two-worker runtime as the daemon does). The coordinator always runs on a
//! runtime thread of its own, as another node's process would.
//!
//! **Transport comparison** (`--grpc`): the same coordinator node also serves redirected I/O
//! as one unary gRPC call per I/O (tonic over one HTTP/2 connection, calls multiplexed, the
//! payload a protobuf `bytes` field with the same CRC-32 checks), executed exactly as the
//! redirect protocol executes it (`execute_as_coordinator`). The column compares it with the
//! redirect protocol.
//! The file (default `/var/tmp/csvd-block-io.img`, 1 GiB of data) is written once before the
//! runs so reads hit allocated blocks. The markdown table goes to stdout, progress to stderr.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use csvd_csv_fs::engine::{AlignedBuf, BufSlice, DirectEngine};
use csvd_csv_fs::node::CsvNode;
use csvd_raft::ClusterState;
use csvd_raft::command::{Command, Request};
use csvd_raft::state::NodeSpec;
use csvd_raft::volume::ALLOCATION_UNIT;
use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    bs: usize,
    qd: usize,
    random: bool,
    write: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random read, QD32",
        bs: 4096,
        qd: 32,
        random: true,
        write: false,
    },
    Workload {
        name: "4 KiB random write, QD32",
        bs: 4096,
        qd: 32,
        random: true,
        write: true,
    },
    Workload {
        name: "1 MiB sequential read, QD8",
        bs: 1 << 20,
        qd: 8,
        random: false,
        write: false,
    },
    Workload {
        name: "1 MiB sequential write, QD8",
        bs: 1 << 20,
        qd: 8,
        random: false,
        write: true,
    },
];

/// Completed I/Os per second and bytes per second.
#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    iops: f64,
    bytes: f64,
}

impl Rate {
    fn show(&self, w: &Workload) -> String {
        if w.bs >= 1 << 20 {
            format!("{:.2} GB/s", self.bytes / 1e9)
        } else {
            format!("{:.1}k IOPS", self.iops / 1e3)
        }
    }
}

struct Args {
    seconds: u64,
    file: PathBuf,
    size: u64,
    runs: usize,
    /// Only the workloads whose name contains this.
    only: Option<String>,
    /// Skip the raw (fio) side.
    no_raw: bool,
    /// Skip the redirected side.
    no_redirected: bool,
    /// Also measure redirected I/O over gRPC.
    grpc: bool,
    /// Run the driver, both nodes and their engines on one thread (like fio's one job)
    /// instead of a two-worker runtime (like the daemon).
    one_thread: bool,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 10,
        file: PathBuf::from("/var/tmp/csvd-block-io.img"),
        size: 1 << 30,
        runs: 1,
        only: None,
        no_raw: false,
        no_redirected: false,
        grpc: false,
        one_thread: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--file" => a.file = PathBuf::from(value()),
            "--size-gib" => a.size = value().parse::<u64>().expect("--size-gib N") << 30,
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--only" => a.only = Some(value()),
            "--no-raw" => a.no_raw = true,
            "--no-redirected" => a.no_redirected = true,
            "--grpc" => a.grpc = true,
            "--one-thread" => a.one_thread = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Writes the data area once (so reads hit allocated blocks).
fn prepare(file: &Path, size: u64) {
    use std::io::Write;
    let total = ALLOCATION_UNIT + size;
    let ready = std::fs::metadata(file).is_ok_and(|m| m.len() == total);
    if ready {
        return;
    }
    eprintln!("writing {} MiB to {}", size >> 20, file.display());
    let mut f = std::fs::File::create(file).expect("create the bench file");
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    for _ in 0..total >> 20 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fio(file: &Path, size: u64, w: &Workload, seconds: u64) -> Option<Rate> {
    let rw = match (w.random, w.write) {
        (true, false) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (false, true) => "write",
    };
    let out = Process::new("fio")
        .args([
            "--name=raw",
            &format!("--filename={}", file.display()),
            &format!("--offset={ALLOCATION_UNIT}"),
            &format!("--size={size}"),
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={rw}"),
            &format!("--bs={}", w.bs),
            &format!("--iodepth={}", w.qd),
            &format!("--runtime={seconds}"),
            "--time_based",
            "--output-format=json",
        ])
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!("fio failed: {}", String::from_utf8_lossy(&o.stderr));
            return None;
        }
        Err(e) => {
            eprintln!("skip raw side: fio is not available ({e}); apt-get install fio");
            return None;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let side = &v["jobs"][0][if w.write { "write" } else { "read" }];
    Some(Rate {
        iops: side["iops"].as_f64()?,
        bytes: side["bw_bytes"].as_f64()?,
    })
}

/// Runs `w` for `seconds` through `io(offset, data)`: `qd` tasks, each with one I/O in flight.
async fn drive<F, Fut>(io: F, size: u64, w: Workload, seconds: u64) -> Rate
where
    F: Fn(u64, BufSlice) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let cursor = Arc::new(AtomicU64::new(0));
    let data = BufSlice::from(AlignedBuf::zeroed(w.bs).unwrap());
    let blocks = size / w.bs as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..w.qd)
        .map(|t| {
            let (io, stop, done, cursor, data) = (
                io.clone(),
                stop.clone(),
                done.clone(),
                cursor.clone(),
                data.clone(),
            );
            tokio::spawn(async move {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    let block = if w.random {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % blocks
                    } else {
                        cursor.fetch_add(1, Ordering::Relaxed) % blocks
                    };
                    io(block * w.bs as u64, data.clone()).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    Rate {
        iops: n as f64 / secs,
        bytes: n as f64 * w.bs as f64 / secs,
    }
}

/// Drives `w` through a csv-fs node's public API.
async fn drive_node(node: CsvNode<DirectEngine>, size: u64, w: Workload, seconds: u64) -> Rate {
    let io = move |offset: u64, data: BufSlice| {
        let node = node.clone();
        async move {
            if w.write {
                node.write(1, offset, data, false).await.unwrap();
            } else {
                node.read(1, offset, w.bs as u64).await.unwrap();
            }
        }
    };
    drive(io, size, w, seconds).await
}

/// Drives `w` through the gRPC alternative to the redirect protocol.
async fn drive_grpc(client: grpc::Client, size: u64, w: Workload, seconds: u64) -> Rate {
    let io = move |offset: u64, data: BufSlice| {
        let client = client.clone();
        async move {
            client
                .io(1, offset, w.bs as u64, w.write.then_some(data))
                .await;
        }
    };
    drive(io, size, w, seconds).await
}

fn apply(state: &mut ClusterState, cmd: Command) {
    state.apply(&Request::new(cmd)).expect("command applies");
}

/// The state every bench node adopts: node 1 coordinates the volume at `io_addr`, node 2 is in
/// `redirected(user_request)`, and one disk of `size` bytes covers the data area.
fn bench_state(io_addr: String, size: u64) -> ClusterState {
    let mut state = ClusterState::default();
    apply(
        &mut state,
        Command::InitCluster {
            cluster_id: Uuid::from_u128(1),
        },
    );
    for id in 1..=2u64 {
        apply(
            &mut state,
            Command::RegisterNode {
                spec: NodeSpec {
                    id,
                    grpc_addr: format!("127.0.0.1:{}", 1000 + id),
                    io_addr: if id == 1 {
                        io_addr.clone()
                    } else {
                        "127.0.0.1:9".into()
                    },
                    protocol_version: csvd_raft::PROTOCOL_VERSION,
                    ..Default::default()
                },
                now_ms: 1,
            },
        );
    }
    apply(
        &mut state,
        Command::RegisterVolume {
            id: VOLUME,
            name: "bench".into(),
            device_bytes: ALLOCATION_UNIT + size,
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            now_ms: 1,
        },
    );
    apply(
        &mut state,
        Command::CreateDisk {
            name: "disk".into(),
            volume: VOLUME,
            size_bytes: size,
            block_size: None,
        },
    );
    apply(
        &mut state,
        Command::SetVolumeMode {
            volume: VOLUME,
            node: 2,
            redirected: true,
        },
    );
    state
}

const VOLUME: Uuid = Uuid::from_u128(2);

/// A node with id `id` that has adopted `state` and attached `file`; its engine runs on the
/// runtime this is called on.
async fn node(id: u64, state: &ClusterState, file: &Path) -> CsvNode<DirectEngine> {
    let n = CsvNode::new(id, Arc::new(|p: &Path| DirectEngine::open(p, 128)));
    n.renew_lease(Instant::now() + Duration::from_secs(86_400));
    n.apply(state).await;
    n.attach(VOLUME, file).await.expect("attach the bench file");
    n
}

fn main() {
    let a = args();
    prepare(&a.file, a.size);
    let rt = if a.one_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    }
    .unwrap();
    // The coordinator runs on a runtime thread of its own, as another node's process would:
    // the redirect server, the gRPC alternative and its engine.
    let coordinator_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (state, grpc_addr) = coordinator_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = bench_state(listener.local_addr().unwrap().to_string(), a.size);
        let coordinator = node(1, &state, &a.file).await;
        tokio::spawn(csvd_csv_fs::redirect::serve(listener, coordinator.clone()));
        (state, grpc::serve(coordinator).await)
    });
    // The driver, the direct node (same id and state as the coordinator, its own engine) and
    // the redirected node share the measuring runtime.
    let (direct, redirected, grpc) = rt.block_on(async {
        (
            node(1, &state, &a.file).await,
            node(2, &state, &a.file).await,
            grpc::connect(grpc_addr).await,
        )
    });
    let mut rows = Vec::new();
    for w in WORKLOADS {
        if a.only
            .as_ref()
            .is_some_and(|o| !w.name.contains(o.as_str()))
        {
            continue;
        }
        let mut runs: Vec<[Option<Rate>; 4]> = Vec::new();
        for run in 0..a.runs {
            eprintln!("{} (run {})", w.name, run + 1);
            let raw = if a.no_raw {
                None
            } else {
                fio(&a.file, a.size, &w, a.seconds)
            };
            let dir = Some(rt.block_on(drive_node(direct.clone(), a.size, w, a.seconds)));
            let red = (!a.no_redirected)
                .then(|| rt.block_on(drive_node(redirected.clone(), a.size, w, a.seconds)));
            let gr = a
                .grpc
                .then(|| rt.block_on(drive_grpc(grpc.clone(), a.size, w, a.seconds)));
            runs.push([raw, dir, red, gr]);
        }
        rows.push((w, runs));
    }
    println!(
        "| workload | raw file (fio io_uring) | csv-fs direct | direct / raw | csv-fs redirected | redirected / direct |{}",
        if a.grpc {
            " redirected over gRPC | gRPC / ours |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|{}",
        if a.grpc { "---|---|" } else { "" }
    );
    for (w, runs) in rows {
        // Each side's median rate; each ratio the median of the ratios within a run, so
        // a side's good or bad run is only compared with the other side's run next to it.
        let side = |i: usize| median(runs.iter().filter_map(|r| r[i].map(|x| x.iops)));
        let ratio =
            |i: usize, j: usize| median(runs.iter().filter_map(|r| Some(r[i]?.iops / r[j]?.iops)));
        let show = |v: Option<f64>| {
            v.map(|iops| {
                Rate {
                    iops,
                    bytes: iops * w.bs as f64,
                }
                .show(&w)
            })
            .unwrap_or_else(|| "-".into())
        };
        let num = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let grpc_cols = if a.grpc {
            format!(" {} | {} |", show(side(3)), num(ratio(3, 2)))
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |{grpc_cols}",
            w.name,
            show(side(0)),
            show(side(1)),
            num(ratio(1, 0)),
            show(side(2)),
            num(ratio(2, 1)),
        );
    }
}

/// Redirected I/O over gRPC: the alternative the redirect protocol was measured against.
mod grpc {
    use csvd_csv_fs::engine::{AlignedBuf, BufSlice, DirectEngine};
    use csvd_csv_fs::node::{CsvNode, IoReply, IoRequest};
    use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};

    const PATH: &str = "/bench.BlockIo/Call";
    const MAX: usize = 64 << 20;

    /// One I/O.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IoCall {
        #[prost(uint64, tag = "1")]
        pub disk: u64,
        #[prost(uint64, tag = "2")]
        pub offset: u64,
        #[prost(uint64, tag = "3")]
        pub len: u64,
        #[prost(bool, tag = "4")]
        pub write: bool,
        #[prost(bytes = "bytes", tag = "5")]
        pub data: bytes::Bytes,
        #[prost(uint32, tag = "6")]
        pub crc: u32,
    }

    /// Its answer.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IoAnswer {
        #[prost(string, tag = "1")]
        pub error: String,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: bytes::Bytes,
        #[prost(uint32, tag = "3")]
        pub crc: u32,
    }

    #[derive(Clone)]
    struct Server(CsvNode<DirectEngine>);

    impl tonic::server::NamedService for Server {
        const NAME: &'static str = "bench.BlockIo";
    }

    struct Call(CsvNode<DirectEngine>);

    impl tonic::server::UnaryService<IoCall> for Call {
        type Response = IoAnswer;
        type Future = BoxFuture<tonic::Response<IoAnswer>, tonic::Status>;
        fn call(&mut self, req: tonic::Request<IoCall>) -> Self::Future {
            let node = self.0.clone();
            Box::pin(async move {
                let c = req.into_inner();
                if crc32fast::hash(&c.data) != c.crc {
                    return Err(tonic::Status::data_loss("payload checksum mismatch"));
                }
                let request = if c.write {
                    // The payload arrives in protobuf's buffer; the engine needs it aligned.
                    let mut b = AlignedBuf::for_overwrite(c.data.len())
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    b.copy_from_slice(&c.data);
                    IoRequest::Write {
                        offset: c.offset,
                        data: BufSlice::from(b),
                        fua: false,
                    }
                } else {
                    IoRequest::Read {
                        offset: c.offset,
                        len: c.len,
                    }
                };
                let answer = match node.execute_as_coordinator(c.disk, 0, request).await {
                    Ok(IoReply::Data(d)) => IoAnswer {
                        crc: crc32fast::hash(&d),
                        data: bytes::Bytes::from_owner(d),
                        error: String::new(),
                    },
                    Ok(IoReply::Done) => IoAnswer::default(),
                    Err(e) => IoAnswer {
                        error: e.to_string(),
                        ..Default::default()
                    },
                };
                Ok(tonic::Response::new(answer))
            })
        }
    }

    impl<B> Service<http::Request<B>> for Server
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            let node = self.0.clone();
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                    .apply_max_message_size_config(Some(MAX), Some(MAX));
                Ok(grpc.unary(Call(node), req).await)
            })
        }
    }

    /// A client of the gRPC side.
    #[derive(Clone)]
    pub struct Client(tonic::client::Grpc<tonic::transport::Channel>);

    impl Client {
        /// One I/O: a read when `data` is `None`.
        pub async fn io(&self, disk: u64, offset: u64, len: u64, data: Option<BufSlice>) {
            let data = data.map(bytes::Bytes::from_owner).unwrap_or_default();
            let call = IoCall {
                disk,
                offset,
                len,
                write: !data.is_empty(),
                crc: crc32fast::hash(&data),
                data,
            };
            let mut g = self.0.clone();
            g.ready().await.expect("gRPC channel ready");
            let answer: IoAnswer = g
                .unary(
                    tonic::Request::new(call),
                    http::uri::PathAndQuery::from_static(PATH),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .expect("gRPC call")
                .into_inner();
            assert!(answer.error.is_empty(), "{}", answer.error);
            assert_eq!(crc32fast::hash(&answer.data), answer.crc);
        }
    }

    /// Accepted connections with Nagle's algorithm off, as the daemon's gRPC server has them.
    fn async_stream_nodelay(
        listener: tokio::net::TcpListener,
    ) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        use futures::StreamExt;
        tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
            let c = c?;
            c.set_nodelay(true)?;
            Ok(c)
        })
    }

    /// Serves `node` over gRPC on a loopback port, on the current runtime; returns the address.
    pub async fn serve(node: CsvNode<DirectEngine>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = async_stream_nodelay(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Server(node))
                .serve_with_incoming(incoming),
        );
        addr
    }

    /// A client of the gRPC side at `addr`, its connection driven by the current runtime.
    pub async fn connect(addr: std::net::SocketAddr) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the gRPC side");
        Client(
            tonic::client::Grpc::new(channel)
                .max_decoding_message_size(MAX)
                .max_encoding_message_size(MAX),
        )
    }
}
