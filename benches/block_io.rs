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
//! The csv-fs sides are driven by this process: `qd` tasks each keep one I/O in flight (random
//! offsets from a per-task xorshift; sequential ones from a shared cursor, like one fio job
//! with that depth). Both nodes and the driver share this process and its runtime.
//!
//! Run: `cargo bench --bench block_io -- [--seconds N] [--file PATH] [--size-gib N] [--runs N]
//! [--only TEXT] [--no-raw] [--no-redirected]` (`--only` keeps the workloads whose name
//! contains TEXT; the `--no-*` flags skip a side, for profiling the other).
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
    fn better(self, other: Rate) -> Rate {
        if other.iops > self.iops { other } else { self }
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

async fn drive(node: CsvNode<DirectEngine>, size: u64, w: Workload, seconds: u64) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let cursor = Arc::new(AtomicU64::new(0));
    let data = BufSlice::from(AlignedBuf::zeroed(w.bs).unwrap());
    let blocks = size / w.bs as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..w.qd)
        .map(|t| {
            let (node, stop, done, cursor, data) = (
                node.clone(),
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
                    let offset = block * w.bs as u64;
                    if w.write {
                        node.write(1, offset, data.clone(), false).await.unwrap();
                    } else {
                        node.read(1, offset, w.bs as u64).await.unwrap();
                    }
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

fn apply(state: &mut ClusterState, cmd: Command) {
    state.apply(&Request::new(cmd)).expect("command applies");
}

async fn nodes(file: &Path, size: u64) -> (CsvNode<DirectEngine>, CsvNode<DirectEngine>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
                        listener.local_addr().unwrap().to_string()
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
    let volume = Uuid::from_u128(2);
    apply(
        &mut state,
        Command::RegisterVolume {
            id: volume,
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
            volume,
            size_bytes: size,
        },
    );
    apply(
        &mut state,
        Command::SetVolumeMode {
            volume,
            node: 2,
            redirected: true,
        },
    );
    let make = |id| {
        let n =
            csvd_csv_fs::node::CsvNode::new(id, Arc::new(|p: &Path| DirectEngine::open(p, 128)));
        n.renew_lease(Instant::now() + Duration::from_secs(86_400));
        n
    };
    let (a, b) = (make(1), make(2));
    for n in [&a, &b] {
        n.apply(&state).await;
        n.attach(volume, file).await.expect("attach the bench file");
    }
    tokio::spawn(csvd_csv_fs::redirect::serve(listener, a.clone()));
    (a, b)
}

fn main() {
    let a = args();
    prepare(&a.file, a.size);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (direct, redirected) = rt.block_on(nodes(&a.file, a.size));
    let mut rows = Vec::new();
    for w in WORKLOADS {
        if a.only
            .as_ref()
            .is_some_and(|o| !w.name.contains(o.as_str()))
        {
            continue;
        }
        let (mut raw, mut dir, mut red) = (None::<Rate>, Rate::default(), Rate::default());
        for run in 0..a.runs {
            eprintln!("{} (run {})", w.name, run + 1);
            if a.no_raw {
            } else if let Some(r) = fio(&a.file, a.size, &w, a.seconds) {
                raw = Some(raw.unwrap_or_default().better(r));
            }
            dir = dir.better(rt.block_on(drive(direct.clone(), a.size, w, a.seconds)));
            if !a.no_redirected {
                red = red.better(rt.block_on(drive(redirected.clone(), a.size, w, a.seconds)));
            }
        }
        rows.push((w, raw, dir, red));
    }
    println!(
        "| workload | raw file (fio io_uring) | csv-fs direct | direct / raw | csv-fs redirected | redirected / direct |"
    );
    println!("|---|---|---|---|---|---|");
    for (w, raw, dir, red) in rows {
        let (raw_s, ratio) = match raw {
            Some(r) => (r.show(&w), format!("{:.2}", dir.iops / r.iops)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.2} |",
            w.name,
            raw_s,
            dir.show(&w),
            ratio,
            red.show(&w),
            red.iops / dir.iops
        );
    }
}
