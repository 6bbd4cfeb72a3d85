//! The baseline for the migration benchmark: two QEMUs migrated directly over QMP, with no
//! cluster around them. Starts the test guest in one QEMU, then moves it back and forth
//! between two QEMUs on this machine the way csvd does (destination started paused with
//! `-incoming defer`, the same capabilities and parameters on both, `migrate`, progress
//! polled every 100 ms and on each MIGRATION event, `cont` on the destination as soon as the source completes, the source
//! told to quit), and prints one JSON line per migration:
//!
//! ```text
//! {"run":1,"total_ms":512,"downtime_ms":41,"qemu_downtime_ms":38,"start_ms":70,"copy_ms":400}
//! ```
//!
//! `total_ms` runs from starting the destination QEMU to the guest running there (QEMU's
//! run state after `cont`); `downtime_ms` is QEMU's downtime plus the time from the source's
//! completion to then, as csvd measures it. `start_ms` is the destination's start (QEMU up,
//! listening), `copy_ms` from `migrate` to the completion seen.
//!
//! ```sh
//! cargo run --release -p csvd-hypervisor --example bare_migrate -- \
//!     GUEST_DIR MEMORY_MIB DIRTY_MIB RUNS DOWNTIME_MS [ISCSI_URL INITIATOR]
//! ```
//!
//! `MIGRATION_POLICY=auto-converge` in the environment turns on QEMU's auto-converge (as
//! `migrator migrate --policy auto-converge` does); otherwise it is plain pre-copy.
//!
//! With RUNS 0 it migrates once per line read on its standard input, until it ends (so that
//! a driver can interleave these migrations with others). The lines `stop` and `cont`
//! instead stop the running guest's QEMU (SIGSTOP) or let it go on (SIGCONT), and are
//! answered with a line `stopped` or `continued`, so that a driver can keep this guest from
//! running while another one migrates.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use csvd_hypervisor::accel::Accel;
use csvd_hypervisor::cmdline::{Boot, DiskAttach, LaunchSpec};
use csvd_hypervisor::process::Instance;
use csvd_hypervisor::qmp::RunState;
use rustix::process::{Pid, Signal, kill_process};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

fn usage() -> ! {
    eprintln!(
        "usage: bare_migrate GUEST_DIR MEMORY_MIB DIRTY_MIB RUNS DOWNTIME_MS [ISCSI_URL INITIATOR]"
    );
    std::process::exit(2);
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 && args.len() != 8 {
        usage();
    }
    let guest = PathBuf::from(&args[1]);
    let memory: u64 = arg(&args, 2);
    let dirty: u64 = arg(&args, 3);
    let runs: u32 = arg(&args, 4);
    let downtime: u64 = arg(&args, 5);
    let disks = match (args.get(6), args.get(7)) {
        (Some(url), Some(initiator)) => vec![DiskAttach {
            url: url.clone(),
            initiator_name: initiator.clone(),
            chap: None,
        }],
        _ => Vec::new(),
    };
    let tmp = std::env::temp_dir().join(format!("csvd-bare-migrate-{}", std::process::id()));
    let spec = |side: &str, incoming: bool| LaunchSpec {
        name: format!("bare-{side}"),
        uuid: "5e1f3b0c-8b8a-4c8e-9d57-2b0c4a3f9e11".into(),
        accel: Accel::Tcg,
        cpu: "max".into(),
        vcpus: 1,
        memory_mib: memory,
        disks: disks.clone(),
        nics: Vec::new(),
        boot: Boot::Kernel {
            kernel: guest.join("vmlinuz"),
            initrd: Some(guest.join("initrd.img")),
            append: format!(
                "console=ttyS0 quiet panic=-1 csvd.period_ms=100 csvd.dirty_mib={dirty}"
            ),
        },
        run_dir: tmp.join(side),
        incoming,
    };
    let qemu = PathBuf::from("qemu-system-x86_64");
    let timeout = Duration::from_secs(60);
    let mut src = Instance::start(&qemu, &spec("a", false), timeout)
        .await
        .unwrap_or_else(|e| panic!("cannot start the guest: {e}"));
    // Let the guest boot and its agent start dirtying memory.
    let log = src.paths.serial_log.clone();
    let booted = Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|s| s.contains("csvd-agent boot=")) {
        assert!(
            booted.elapsed() < Duration::from_secs(120),
            "the guest did not boot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // MIGRATION_POLICY=auto-converge throttles a busy guest, as `migrate --policy
    // auto-converge` does; anything else is plain pre-copy.
    let auto_converge = std::env::var("MIGRATION_POLICY").is_ok_and(|p| p == "auto-converge");
    let caps = json!({ "capabilities": [
        { "capability": "events", "state": true },
        { "capability": "auto-converge", "state": auto_converge },
    ]});
    let params = json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": downtime });
    let port = 18_990u16;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut run = 0;
    loop {
        run += 1;
        let go = if runs == 0 {
            match lines.next_line().await {
                Ok(Some(l)) if matches!(l.trim(), "stop" | "cont") => {
                    let (sig, said) = if l.trim() == "stop" {
                        (Signal::STOP, "stopped")
                    } else {
                        (Signal::CONT, "continued")
                    };
                    let pid = Pid::from_raw(src.pid).expect("a QEMU pid");
                    kill_process(pid, sig).unwrap_or_else(|e| panic!("cannot signal QEMU: {e}"));
                    println!("{said}");
                    run -= 1;
                    continue;
                }
                Ok(Some(_)) => true,
                _ => false,
            }
        } else {
            run <= runs
        };
        if !go {
            break;
        }
        let side = if run % 2 == 1 { "b" } else { "a" };
        let t0 = Instant::now();
        let dst = Instance::start(&qemu, &spec(side, true), timeout)
            .await
            .unwrap_or_else(|e| panic!("cannot start the destination: {e}"));
        for q in [&src.qmp, &dst.qmp] {
            q.execute("migrate-set-capabilities", Some(caps.clone()))
                .await
                .unwrap();
            q.execute("migrate-set-parameters", Some(params.clone()))
                .await
                .unwrap();
        }
        let uri = format!("tcp:127.0.0.1:{port}");
        dst.qmp
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .unwrap();
        let listening = Instant::now();
        let mut events = src.qmp.events();
        src.qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .await
            .unwrap();
        let info = loop {
            // Each change of the migration's status is announced; poll as well, like csvd.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = async {
                    while let Ok(e) = events.recv().await {
                        if e.name == "MIGRATION" {
                            return;
                        }
                    }
                    std::future::pending::<()>().await
                } => {}
            }
            let info = src.qmp.query_migrate().await.unwrap();
            match info.status.as_deref() {
                Some("completed") => break info,
                Some("failed" | "cancelled") => panic!("migration {run} failed: {info:?}"),
                _ => {}
            }
        };
        let completed = Instant::now();
        dst.qmp.cont().await.unwrap();
        // Resumed when QEMU says the guest runs (the state may still be loading), as csvd
        // measures it.
        while dst.qmp.query_status().await.unwrap() != RunState::Running {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let resumed = Instant::now();
        let qemu_downtime = info.downtime.unwrap_or(0);
        let downtime_ms = qemu_downtime + (resumed - completed).as_millis() as u64;
        println!(
            "{}",
            json!({
                "run": run,
                "total_ms": (resumed - t0).as_millis() as u64,
                "downtime_ms": downtime_ms,
                "qemu_downtime_ms": qemu_downtime,
                "start_ms": (listening - t0).as_millis() as u64,
                "copy_ms": (completed - listening).as_millis() as u64,
                "qemu_total_ms": info.total_time,
                "qemu_setup_ms": info.setup_time,
                "passes": info.ram.as_ref().map(|r| r.dirty_sync_count),
                "sent_bytes": info.ram.as_ref().map(|r| r.transferred),
            })
        );
        if src.qmp.quit().await.is_err() || !src.wait_exit(Duration::from_secs(10)).await {
            src.kill().await;
        }
        src = dst;
    }
    src.kill().await;
    let _ = std::fs::remove_dir_all(&tmp);
}
