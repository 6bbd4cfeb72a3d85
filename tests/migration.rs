//! Live migration with real guests (QEMU under TCG here) on a three-node cluster: the test
//! guest's agent keeps a counter and writes sequence records to its LUN while `migrator
//! migrate` moves it between nodes. The counter continues across the switch (no reboot),
//! the records on the shared volume stay contiguous, the downtime is reported. A cancelled
//! migration, one whose destination QEMU is killed, and one whose migration network is cut
//! (nftables drops the destination's migration port) leave the VM running on its source; one
//! whose source QEMU is killed fails, and the guest boots again on its source.
//! Skips with a clear line when QEMU, the test guest (scripts/build-guest) or, for the cut,
//! a working `nft` is missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Cluster, migrator, stderr, stdout, wait_until};

struct Setup {
    cluster: Cluster,
    ep: String,
    image: PathBuf,
    vm_id: String,
    lun: u64,
}

impl Setup {
    fn serial(&self, node: u64) -> PathBuf {
        self.cluster.nodes[node as usize - 1]
            .dir
            .join("vms")
            .join(&self.vm_id)
            .join("serial.log")
    }

    fn vm(&self) -> serde_json::Value {
        let out = migrator(&["--endpoint", &self.ep, "--json", "vm", "show", "g1"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    }

    fn qemu_alive(&self, node: u64) -> bool {
        let pidfile = self.cluster.nodes[node as usize - 1]
            .dir
            .join("vms")
            .join(&self.vm_id)
            .join("qemu.pid");
        std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
            })
    }

    /// Waits for the guest's agent on node `to`, then asserts that the guest went on from
    /// node `from`'s console to node `to`'s without a restart (same boot, the counter one
    /// past the last one there); returns the boot id.
    async fn continues_on(&self, from: u64, to: u64) -> String {
        let serial = self.serial(to);
        wait_until(
            &format!("the guest's agent on node {to}"),
            Duration::from_secs(60),
            || {
                let n = common::agent_lines(&serial).len();
                async move { (n >= 10).then_some(()) }
            },
        )
        .await;
        let before = common::agent_lines(&self.serial(from));
        let after = common::agent_lines(&self.serial(to));
        let (boot, last_there) = before.last().unwrap().clone();
        assert_eq!(after[0].0, boot, "same boot on the destination");
        assert_eq!(
            after[0].1,
            last_there + 1,
            "the counter continues: {:?} then {:?}",
            before.last(),
            after.first()
        );
        assert!(after.iter().all(|(b, _)| *b == boot));
        boot
    }

    /// `migrator --json migrate g1 --to N ARGS`.
    fn migrate_output(&self, to: u64, args: &[&str]) -> std::process::Output {
        let to = to.to_string();
        let mut a = vec![
            "--endpoint",
            &self.ep,
            "--json",
            "migrate",
            "g1",
            "--to",
            &to,
        ];
        a.extend_from_slice(args);
        migrator(&a)
    }

    /// Starts `migrate g1 --to N` capped at 4 MiB/s, so that the copy lasts, without
    /// waiting; returns the migration's id.
    fn start_slow(&self, to: u64) -> u64 {
        let out = self.migrate_output(to, &["--bandwidth", "4", "--no-wait"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        v["migration"].as_u64().unwrap()
    }

    /// Runs `migrator --json migrate g1 --to N ARGS`; returns (success, last JSON line, stderr).
    fn migrate(&self, to: u64, args: &[&str]) -> (bool, serde_json::Value, String) {
        let out = self.migrate_output(to, args);
        let last = stdout(&out)
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(serde_json::Value::Null);
        (out.status.success(), last, stderr(&out))
    }
}

/// A three-node cluster with VM g1 (128 MiB, the test guest with `append`) running on node 1
/// and writing records to its LUN.
async fn setup(append: &str) -> Option<Setup> {
    setup_with(append, "128").await
}

/// [`setup`] with `memory` MiB for the guest.
async fn setup_with(append: &str, memory: &str) -> Option<Setup> {
    let guest = common::test_guest()?;
    // Room on the volume for a quick migration's saved state besides the LUN.
    let (cluster, _, lun) =
        common::lun_cluster_with(512 << 20, "64M", "disk1", &["--accel", "tcg"]).await;
    let image = cluster.tmp.path().join("shared.img");
    let ep = cluster.nodes[0].endpoint();
    let out = common::create_guest_vm(
        &ep,
        &guest,
        "g1",
        memory,
        "1",
        append,
        &["--disk", "disk1", "--nic", "lan"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let vm_id = v["id"].as_str().unwrap().to_string();
    let s = Setup {
        cluster,
        ep,
        image,
        vm_id,
        lun,
    };
    let out = migrator(&["--endpoint", &s.ep, "vm", "start", "g1"]);
    if stderr(&out).contains("no bridge named lan") {
        eprintln!("skip: this machine has no bridge named lan for the VM's NIC");
        return None;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let serial = s.serial(1);
    wait_until("the guest's agent", Duration::from_secs(120), || {
        let n = common::agent_lines(&serial).len();
        async move { (n >= 10).then_some(()) }
    })
    .await;
    Some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_migrate_a_writing_guest_there_and_back() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    let Some(s) = setup("console=ttyS0 quiet panic=-1 csvd.period_ms=50").await else {
        return;
    };
    // Refused before anything starts.
    let (ok, _, err) = s.migrate(1, &[]);
    assert!(!ok && err.contains("already runs on node 1"), "{err}");
    let (ok, _, err) = s.migrate(9, &[]);
    assert!(!ok && err.contains("node 9"), "{err}");

    let (ok, last, err) = s.migrate(2, &["--downtime-ms", "100"]);
    assert!(ok, "{err} {last}");
    assert_eq!(last["outcome"], "completed", "{last}");
    assert!(last["total_ms"].as_u64().unwrap() > 0, "{last}");
    let downtime = last["downtime_ms"].as_u64().expect("downtime reported");
    assert!(downtime < 10_000, "{last}");
    // The parts of the total: the destination's start, then the copy; the rest (switchover
    // and resumption) is what remains, and holds the downtime's tail.
    let total = last["total_ms"].as_u64().unwrap();
    let prepare = last["prepare_ms"].as_u64().expect("prepare_ms reported");
    let copy = last["copy_ms"].as_u64().expect("copy_ms reported");
    assert!(prepare > 0 && copy > 0, "{last}");
    assert!(prepare + copy <= total, "{last}");
    let shown = stdout(&migrator(&["--endpoint", &s.ep, "migration", "show", "g1"]));
    assert!(
        shown.contains(&format!(
            "total     {total} ms (destination ready {prepare} ms, copy {copy} ms"
        )),
        "{shown}"
    );
    let v = s.vm();
    assert_eq!(v["owner"], 2);
    assert_eq!(v["state"], "running");
    // The source's QEMU is gone; the destination's runs.
    wait_until("the source QEMU to end", Duration::from_secs(20), || {
        let gone = !s.qemu_alive(1);
        async move { gone.then_some(()) }
    })
    .await;
    assert!(s.qemu_alive(2));

    // The guest did not restart: same boot, and the counter goes on from where it was.
    s.continues_on(1, 2).await;

    // And back, with the default downtime limit.
    let (ok, last, err) = s.migrate(1, &[]);
    assert!(ok, "{err} {last}");
    assert_eq!(s.vm()["owner"], 1);

    // The records on the shared volume: one boot, no gap, through both switches.
    let disk = s.cluster.nodes[0].client().state().await.unwrap().disks[&s.lun].clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recs: Vec<(u64, u64)> = common::guest_records(&s.image, &disk)
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect();
    assert!(recs.len() >= 30, "{} records", recs.len());
    let boot_id = recs[0].0;
    assert!(recs.iter().all(|r| r.0 == boot_id), "one boot");
    for w in recs.windows(2) {
        assert_eq!(w[1].1, w[0].1 + 1, "contiguous sequence numbers");
    }
    let out = migrator(&["--endpoint", &s.ep, "migration", "list"]);
    assert!(
        stdout(&out).matches("completed").count() >= 2,
        "{}",
        stdout(&out)
    );
    let out = migrator(&["--endpoint", &s.ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cancelled_or_broken_migrations_leave_the_guest_on_its_source() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    // A busy guest and a 4 MiB/s cap: the copy takes long enough to interfere.
    let Some(s) = setup("console=ttyS0 quiet panic=-1 csvd.period_ms=50 csvd.dirty_mib=32").await
    else {
        return;
    };
    let copying = |s: &Setup| {
        let out = migrator(&["--endpoint", &s.ep, "--json", "migration", "show", "g1"]);
        let m: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        m["phase"] == "copying"
    };

    // Cancel mid-copy.
    s.start_slow(2);
    wait_until("the copy", Duration::from_secs(60), || {
        let c = copying(&s);
        async move { c.then_some(()) }
    })
    .await;
    let out = migrator(&["--endpoint", &s.ep, "migration", "cancel", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ep = s.ep.clone();
    wait_until("the cancel", Duration::from_secs(60), || {
        let out = migrator(&["--endpoint", &ep, "--json", "migration", "show", "g1"]);
        let m: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        async move { (m["phase"] == "cancelled").then_some(()) }
    })
    .await;
    let v = s.vm();
    assert_eq!(v["owner"], 1);
    assert_eq!(v["state"], "running");
    wait_until(
        "the destination QEMU to go",
        Duration::from_secs(30),
        || {
            let gone = !s.qemu_alive(2);
            async move { gone.then_some(()) }
        },
    )
    .await;
    let n = common::agent_lines(&s.serial(1)).len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        common::agent_lines(&s.serial(1)).len() > n,
        "the guest runs on node 1"
    );

    // The destination QEMU is killed mid-copy.
    s.start_slow(3);
    wait_until("the copy", Duration::from_secs(60), || {
        let c = copying(&s);
        async move { c.then_some(()) }
    })
    .await;
    let pidfile = s.cluster.nodes[2]
        .dir
        .join("vms")
        .join(&s.vm_id)
        .join("qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let ep = s.ep.clone();
    let failed = wait_until("the failure", Duration::from_secs(60), || {
        let out = migrator(&["--endpoint", &ep, "--json", "migration", "show", "g1"]);
        let m: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        async move { (m["phase"] == "failed").then_some(m) }
    })
    .await;
    assert!(failed["error"].as_str().is_some(), "{failed}");
    let v = s.vm();
    assert_eq!(v["owner"], 1);
    assert_eq!(v["state"], "running");
    let n = common::agent_lines(&s.serial(1)).len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        common::agent_lines(&s.serial(1)).len() > n,
        "the guest still runs on node 1"
    );
    // One boot throughout.
    let boots: std::collections::HashSet<String> = common::agent_lines(&s.serial(1))
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(boots.len(), 1, "{boots:?}");

    // Plain pre-copy of a guest this busy (32 MiB rewritten without pause) at 32 MiB/s
    // never converges: it is given up by policy, and the guest runs on on node 1.
    let (ok, last, _) = s.migrate(2, &["--policy", "precopy", "--bandwidth", "32"]);
    assert!(!ok, "{last}");
    assert_eq!(last["outcome"], "failed", "{last}");
    let m = migration_json(&s.ep, last["migration"].as_u64().unwrap());
    let error = m["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("pre-copy does not converge") && error.contains("auto-converge"),
        "{m}"
    );
    let v = s.vm();
    assert_eq!(
        (v["owner"].as_u64(), v["state"].as_str()),
        (Some(1), Some("running")),
        "{v}"
    );
    let n = common::agent_lines(&s.serial(1)).len();
    let serial = s.serial(1);
    wait_until(
        "the guest to go on on node 1",
        Duration::from_secs(30),
        || {
            let more = common::agent_lines(&serial).len() > n + 5;
            async move { more.then_some(()) }
        },
    )
    .await;

    // A busy guest still moves under auto-converge.
    let (ok, last, err) = s.migrate(2, &["--policy", "auto-converge"]);
    assert!(ok, "{err} {last}");
    assert_eq!(s.vm()["owner"], 2);
    // And under a quick migration: paused, copied, resumed; the guest stood still meanwhile,
    // which the downtime shows.
    let (ok, last, err) = s.migrate(3, &["--policy", "quick"]);
    assert!(ok, "{err} {last}");
    assert_eq!(s.vm()["owner"], 3);
    assert!(last["downtime_ms"].as_u64().unwrap() > 0, "{last}");
    // And under post-copy at a bandwidth that pre-copy alone could never converge at (the
    // guest dirties 32 MiB every 50 ms): after one pass the guest moves and fetches the rest.
    let (ok, last, err) = s.migrate(1, &["--policy", "postcopy", "--bandwidth", "32"]);
    assert!(ok, "{err} {last}");
    assert_eq!(last["outcome"], "completed", "{last}");
    assert_eq!(s.vm()["owner"], 1);
    let on_3 = common::agent_lines(&s.serial(3))
        .last()
        .map(|l| l.1)
        .unwrap();
    wait_until(
        "the guest's counter on node 1 again",
        Duration::from_secs(60),
        || {
            let last = common::agent_lines(&s.serial(1)).last().map(|l| l.1);
            async move { last.is_some_and(|c| c > on_3 + 5).then_some(()) }
        },
    )
    .await;
    let boots: std::collections::HashSet<String> = (1..=3)
        .flat_map(|n| common::agent_lines(&s.serial(n)))
        .map(|(b, _)| b)
        .collect();
    assert_eq!(boots.len(), 1, "{boots:?}");

    // The source QEMU is killed mid-copy: the guest is lost with it. The migration fails,
    // the destination's QEMU goes, and the restart policy boots the guest again on its
    // owner, the source.
    let boot = common::agent_lines(&s.serial(1)).last().unwrap().0.clone();
    let id = s.start_slow(2);
    wait_until("the copy", Duration::from_secs(60), || {
        let c = copying(&s);
        async move { c.then_some(()) }
    })
    .await;
    let pid = std::fs::read_to_string(
        s.cluster.nodes[0]
            .dir
            .join("vms")
            .join(&s.vm_id)
            .join("qemu.pid"),
    )
    .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Both nodes report the failure, each with what it saw: the destination's QEMU ends
    // with the stream, and the source's node says its QEMU is gone. Whichever comes first,
    // the record ends up naming the source.
    let failed = wait_until(
        "the failure, with the source's reason",
        Duration::from_secs(60),
        || {
            let m = migration_json(&s.ep, id);
            let named =
                m["phase"] == "failed" && m["error"].as_str().is_some_and(|e| e.contains("source"));
            async move { named.then_some(m) }
        },
    )
    .await;
    eprintln!("source QEMU killed: {}", failed["error"]);
    let serial = s.serial(1);
    let reboot = wait_until(
        "the guest booted again on node 1",
        Duration::from_secs(120),
        || {
            let last = common::agent_lines(&serial)
                .last()
                .filter(|(b, n)| *b != boot && *n >= 5)
                .map(|(b, _)| b.clone());
            async move { last }
        },
    )
    .await;
    let v = s.vm();
    assert_eq!(
        (v["owner"].as_u64(), v["state"].as_str()),
        (Some(1), Some("running")),
        "{v}"
    );
    wait_until("one QEMU for g1, node 1's", Duration::from_secs(30), || {
        let one = qemu_nodes(&s) == vec![1];
        async move { one.then_some(()) }
    })
    .await;
    assert!(
        common::agent_lines(&s.serial(2))
            .iter()
            .all(|(b, _)| *b != reboot),
        "the new boot ran on node 1 only"
    );

    let out = migrator(&["--endpoint", &s.ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_drain_moves_every_vm_one_at_a_time() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    let Some(s) = setup("console=ttyS0 quiet panic=-1 csvd.period_ms=100").await else {
        return;
    };
    let guest = common::test_guest().unwrap();
    let kernel = guest.join("vmlinuz");
    // g2 rewrites 48 MiB of its memory without pause.
    for (name, append) in [
        ("g2", "console=ttyS0 quiet panic=-1 csvd.dirty_mib=48"),
        ("g3", "console=ttyS0 quiet panic=-1"),
    ] {
        let out = common::create_guest_vm(&s.ep, &guest, name, "96", "1", append, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = migrator(&["--endpoint", &s.ep, "vm", "start", name]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // A paused VM moves paused.
    let out = migrator(&["--endpoint", &s.ep, "vm", "pause", "g3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A stopped VM moves too.
    let out = migrator(&[
        "--endpoint",
        &s.ep,
        "vm",
        "create",
        "g4",
        "--memory",
        "64",
        "--node",
        "1",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = migrator(&["--endpoint", &s.ep, "node", "drain", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let state = s.cluster.nodes[0].client().state().await.unwrap();
    assert!(
        state.vms.values().all(|v| v.owner != 1),
        "node 1 ends empty"
    );
    for v in state.vms.values().filter(|v| v.name != "g4") {
        let want = if v.name == "g3" {
            csvd_raft::vm::VmState::Paused
        } else {
            csvd_raft::vm::VmState::Running
        };
        assert_eq!(v.runtime.as_ref().unwrap().state, want, "{}", v.name);
    }
    assert!(
        state
            .migrations
            .values()
            .any(|m| m.vm_name == "g3" && m.paused),
        "g3 moved paused: {:?}",
        state.migrations
    );
    // Drained by auto-converge, which throttles a busy guest until it converges.
    assert!(
        state
            .migrations
            .values()
            .all(|m| m.params.policy == csvd_raft::migration::MigrationPolicy::AutoConverge),
        "{:?}",
        state.migrations
    );
    // One migration at a time on node 1: their active periods never overlap.
    let mut spans: Vec<(u64, u64)> = state
        .migrations
        .values()
        .map(|m| (m.started_at_ms.unwrap(), m.finished_at_ms.unwrap()))
        .collect();
    assert_eq!(spans.len(), 3);
    spans.sort();
    for w in spans.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "overlapping migrations on node 1: {spans:?}"
        );
    }
    // Draining: no new VM lands there.
    let out = migrator(&[
        "--endpoint",
        &s.ep,
        "vm",
        "create",
        "g5",
        "--memory",
        "64",
        "--node",
        "1",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert!(
        stderr(&out).contains("node 1 is draining"),
        "{}",
        stderr(&out)
    );
    let out = migrator(&["--endpoint", &s.ep, "node", "resume", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The limits are cluster settings.
    let limits = |args: &[&str]| {
        let mut a = vec!["--endpoint", &s.ep, "--json", "migration", "limits"];
        a.extend_from_slice(args);
        let out = migrator(&a);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()
    };
    assert_eq!(
        limits(&[]),
        serde_json::json!({ "per_node": 1, "cluster": null })
    );
    assert_eq!(
        limits(&["--per-node", "2", "--cluster", "3"]),
        serde_json::json!({ "per_node": 2, "cluster": 3 })
    );
    assert_eq!(
        limits(&["--no-cluster-cap"]),
        serde_json::json!({ "per_node": 2, "cluster": null })
    );
    let out = migrator(&[
        "--endpoint",
        &s.ep,
        "migration",
        "limits",
        "--per-node",
        "0",
    ]);
    assert!(stderr(&out).contains("a limit of 0"), "{}", stderr(&out));
    for name in ["g1", "g2", "g3"] {
        let out = migrator(&["--endpoint", &s.ep, "vm", "stop", name]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// Waits until migration of g1 is copying, returns its id.
async fn wait_copying(s: &Setup) -> u64 {
    let ep = s.ep.clone();
    wait_until("the copy", Duration::from_secs(60), || {
        let out = migrator(&["--endpoint", &ep, "--json", "migration", "show", "g1"]);
        let m: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        async move { (m["phase"] == "copying").then(|| m["id"].as_u64().unwrap()) }
    })
    .await
}

/// `migrator --json migration show ID` through `ep`; a refused read (a busy machine, a leader
/// change) reads as an empty record, "not yet" to the callers' waits.
fn migration_json(ep: &str, id: u64) -> serde_json::Value {
    let out = migrator(&[
        "--endpoint",
        ep,
        "--json",
        "migration",
        "show",
        &id.to_string(),
    ]);
    serde_json::from_str(&stdout(&out)).unwrap_or_default()
}

/// Waits until migration `id` ends; returns its record.
async fn wait_ended(s: &Setup, id: u64) -> serde_json::Value {
    let ep = s.ep.clone();
    wait_until("the migration to end", Duration::from_secs(120), || {
        let m = migration_json(&ep, id);
        let done =
            ["completed", "failed", "cancelled"].contains(&m["phase"].as_str().unwrap_or(""));
        async move { done.then_some(m) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_daemons_killed_mid_migration_leave_one_running_guest() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    let Some(mut s) = setup("console=ttyS0 quiet panic=-1 csvd.period_ms=50").await else {
        return;
    };
    // The destination's csvd dies mid-copy and comes back: its QEMU kept receiving, and the
    // restarted csvd adopts it as the migration's destination and resumes it.
    let out = migrator(&[
        "--endpoint",
        &s.ep,
        "migrate",
        "g1",
        "--to",
        "2",
        "--bandwidth",
        "8",
        "--no-wait",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = wait_copying(&s).await;
    s.cluster.node(2).kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.cluster.node(2).restart();
    let m = wait_ended(&s, id).await;
    assert_eq!(m["phase"], "completed", "{m}");
    let ep = s.ep.clone();
    wait_until("g1 running on node 2", Duration::from_secs(60), || {
        let out = migrator(&["--endpoint", &ep, "--json", "vm", "show", "g1"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        async move { (v["owner"] == 2 && v["state"] == "running").then_some(()) }
    })
    .await;
    // Node 1 stops its QEMU once it has applied the switchover, on its own time.
    wait_until("the source QEMU to end", Duration::from_secs(20), || {
        let gone = !s.qemu_alive(1);
        async move { gone.then_some(()) }
    })
    .await;

    // The source's csvd dies mid-copy and comes back: it takes the migration up again.
    let out = migrator(&[
        "--endpoint",
        &s.ep,
        "migrate",
        "g1",
        "--to",
        "3",
        "--bandwidth",
        "8",
        "--no-wait",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = wait_copying(&s).await;
    s.cluster.node(2).kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.cluster.node(2).restart();
    let m = wait_ended(&s, id).await;
    let v = s.vm();
    assert_eq!(v["state"], "running", "{v}");
    let owner = v["owner"].as_u64().unwrap();
    match m["phase"].as_str() {
        Some("completed") => {
            assert_eq!(owner, 3);
            // The restarted daemon saw from QEMU that the copy was under way.
            let log = s.cluster.nodes[1].log();
            assert!(log.contains("taking up a migration under way"), "{log}");
        }
        _ => assert_eq!(owner, 2, "{m}"),
    }
    // Exactly one QEMU runs the guest, once the other node has applied the migration's end
    // and stopped its own.
    wait_until("one QEMU for the guest", Duration::from_secs(30), || {
        let running: Vec<u64> = (1..=3).filter(|n| s.qemu_alive(*n)).collect();
        async move { (running == vec![owner]).then_some(()) }
    })
    .await;

    // The Raft leader dies mid-copy: a new one is elected and the switchover commits
    // through it (or the migration fails cleanly); the guest runs on exactly one node.
    let (leader, _) = s.cluster.leader_via(owner).await;
    let dest = (1..=3)
        .find(|n| *n != owner && *n != leader)
        .unwrap_or_else(|| (1..=3).find(|n| *n != owner).unwrap());
    let via = (1..=3).find(|n| *n != leader).unwrap();
    let ep = s.cluster.nodes[via as usize - 1].endpoint();
    s.ep = ep.clone();
    let to = dest.to_string();
    let out = migrator(&[
        "--endpoint",
        &ep,
        "migrate",
        "g1",
        "--to",
        &to,
        "--bandwidth",
        "8",
        "--no-wait",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = wait_copying(&s).await;
    s.cluster.node(leader).kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.cluster.node(leader).restart();
    let m = wait_ended(&s, id).await;
    let v = wait_until("g1 to report running", Duration::from_secs(60), || {
        let v = s.vm();
        async move { (v["state"] == "running").then_some(v) }
    })
    .await;
    let owner = v["owner"].as_u64().unwrap();
    match m["phase"].as_str() {
        Some("completed") => assert_eq!(owner, dest, "{m}"),
        _ => assert_ne!(owner, dest, "{m}"),
    }
    wait_until("one QEMU for the guest", Duration::from_secs(30), || {
        let running: Vec<u64> = (1..=3).filter(|n| s.qemu_alive(*n)).collect();
        async move { (running == vec![owner]).then_some(()) }
    })
    .await;

    // migrator follows a migration through the node it talks to (neither source nor
    // destination) dying and coming back: it watches afresh and reports the outcome.
    let dest = (1..=3).find(|n| *n != owner).unwrap();
    let via = (1..=3).find(|n| *n != owner && *n != dest).unwrap();
    let ep = s.cluster.nodes[via as usize - 1].endpoint();
    s.ep = s.cluster.nodes[owner as usize - 1].endpoint();
    let to = dest.to_string();
    let args = ["--endpoint", &ep, "--json", "migrate", "g1", "--to", &to];
    let follower = common::migrator_command(&args)
        .args(["--bandwidth", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run migrator");
    wait_copying(&s).await;
    s.cluster.node(via).kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.cluster.node(via).restart();
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let last: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap_or_default()).unwrap();
    assert_eq!(last["outcome"], "completed", "{last}");
    wait_until(
        "g1 running on its new node",
        Duration::from_secs(60),
        || {
            let v = s.vm();
            async move { (v["state"] == "running" && v["owner"] == dest).then_some(()) }
        },
    )
    .await;

    // One boot throughout: the guest was never restarted.
    let boots: std::collections::HashSet<String> = (1..=3)
        .flat_map(|n| common::agent_lines(&s.serial(n)))
        .map(|(b, _)| b)
        .collect();
    assert_eq!(boots.len(), 1, "{boots:?}");
    let out = migrator(&["--endpoint", &s.ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_two_migrations_at_once_on_four_nodes_and_a_third_queues() {
    let Some(guest) = common::test_guest() else {
        return;
    };
    let mut cluster = Cluster::new(4);
    let root = cluster.tmp.path().to_path_buf();
    common::shared_image(&root, 256 << 20, 1..=4);
    cluster
        .start_initialized_each(|id| {
            vec![
                "--devices".into(),
                root.join(format!("paths/n{id}/*.img"))
                    .display()
                    .to_string(),
                "--accel".into(),
                "tcg".into(),
            ]
        })
        .await;
    let ep = cluster.nodes[0].endpoint();
    // a on node 1, b on node 3, c on node 1: each copy is slowed down to take seconds.
    for (name, node) in [("a", "1"), ("b", "3"), ("c", "1")] {
        let append = "console=ttyS0 quiet panic=-1";
        let out = common::create_guest_vm(&ep, &guest, name, "128", node, append, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = migrator(&["--endpoint", &ep, "vm", "start", name]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let start = |vm: &str, to: &str| {
        let out = migrator(&[
            "--endpoint",
            &ep,
            "--json",
            "migrate",
            vm,
            "--to",
            to,
            "--bandwidth",
            "6",
            "--no-wait",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        (
            v["migration"].as_u64().unwrap(),
            v["phase"].as_str().unwrap().to_string(),
        )
    };
    // 1 -> 2 and 3 -> 4 share no node: both run. c (1 -> 4) involves busy nodes: it queues.
    let (ma, pa) = start("a", "2");
    let (mb, pb) = start("b", "4");
    let (mc, pc) = start("c", "4");
    assert_eq!(
        (pa.as_str(), pb.as_str(), pc.as_str()),
        ("preparing", "preparing", "queued")
    );
    let show = |id: u64| migration_json(&ep, id);
    // Both copy at the same time while c waits.
    wait_until("two copies at once", Duration::from_secs(60), || {
        let (a, b, c) = (show(ma), show(mb), show(mc));
        async move {
            (a["phase"] == "copying" && b["phase"] == "copying" && c["phase"] == "queued")
                .then_some(())
        }
    })
    .await;
    let list = migrator(&["--endpoint", &ep, "migration", "list"]);
    assert!(stdout(&list).contains("queued"), "{}", stdout(&list));
    // Everything ends, c after a slot freed.
    for id in [ma, mb, mc] {
        let m = wait_until("the migrations to end", Duration::from_secs(180), || {
            let m = show(id);
            async move { (m["phase"] == "completed").then_some(m) }
        })
        .await;
        assert!(m["total_ms"].as_u64().is_some(), "{m}");
    }
    let (a, b, c) = (show(ma), show(mb), show(mc));
    let started_c = c["started_at_ms"].as_u64().unwrap();
    let first_end = a["finished_at_ms"]
        .as_u64()
        .unwrap()
        .min(b["finished_at_ms"].as_u64().unwrap());
    assert!(
        started_c >= first_end,
        "c started only after a slot freed: {c}"
    );
    // The first migration into node 4 listened on its migration address.
    assert_eq!(
        b["listen_addr"].as_str(),
        Some(cluster.nodes[3].migration.as_str()),
        "{b}"
    );

    // Two per node: b and c leave node 4 for node 2 at once. A destination QEMU holds its
    // port until its migration ends, so the second listens on another port and both copy
    // side by side.
    let out = migrator(&["--endpoint", &ep, "migration", "limits", "--per-node", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (mb, pb) = start("b", "2");
    let (mc, pc) = start("c", "2");
    assert_eq!((pb.as_str(), pc.as_str()), ("preparing", "preparing"));
    wait_until(
        "two copies into node 2 at once",
        Duration::from_secs(60),
        || {
            let (b, c) = (show(mb), show(mc));
            async move { (b["phase"] == "copying" && c["phase"] == "copying").then_some(()) }
        },
    )
    .await;
    for id in [mb, mc] {
        let m = wait_until("the migrations to end", Duration::from_secs(180), || {
            let m = show(id);
            let done =
                ["completed", "failed", "cancelled"].contains(&m["phase"].as_str().unwrap_or(""));
            async move { done.then_some(m) }
        })
        .await;
        assert_eq!(m["phase"], "completed", "{m}");
    }
    let (b, c) = (show(mb), show(mc));
    let ports: std::collections::BTreeSet<&str> = [&b, &c]
        .iter()
        .map(|m| m["listen_addr"].as_str().expect("a listening address"))
        .collect();
    assert_eq!(ports.len(), 2, "one port each: {b} {c}");
    assert!(
        ports.contains(cluster.nodes[1].migration.as_str()),
        "one of them on node 2's migration address: {ports:?}"
    );
    for name in ["a", "b", "c"] {
        let out = migrator(&["--endpoint", &ep, "--json", "vm", "show", name]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        assert_eq!(v["owner"], 2, "{v}");
    }
    for name in ["a", "b", "c"] {
        let out = migrator(&["--endpoint", &ep, "vm", "stop", name]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// Whether `nft` works here (installed, nf_tables in the kernel, allowed to change rules);
/// otherwise prints a skip line.
fn nft_usable() -> bool {
    match std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
    {
        Err(e) => {
            eprintln!("skip: cannot run nft ({e}): scripts/install-deps installs nftables");
            false
        }
        Ok(o) if !o.status.success() => {
            eprintln!(
                "skip: nft cannot list tables (a kernel without nf_tables, or not root): {}",
                stderr(&o).trim()
            );
            false
        }
        Ok(_) => true,
    }
}

/// Runs `nft -f -` on `script`; returns its output.
fn nft_script(script: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The prefix of the nftables tables [`NetCut`] creates: `<prefix><test pid>_<port>`.
const CUT_TABLE_PREFIX: &str = "csvd_test_cut_";

/// A network cut: every TCP packet to and from one address (here a node's migration address)
/// is dropped, in an nftables table of its own that is deleted on drop. Only that address's
/// traffic stops: Raft, the API and iSCSI use other ports. The packets are dropped where they
/// arrive (the input hook; loopback traffic passes it once) so that, as with a cut cable,
/// the sender's stack sees no error: its data just never gets an answer.
struct NetCut {
    table: String,
}

impl NetCut {
    /// Cuts the TCP traffic of one address and port.
    fn new(addr: &str) -> NetCut {
        let addr: std::net::SocketAddr = addr.parse().expect("an IP address and port");
        Self::cut(addr.ip(), Some(addr.port()))
    }

    /// Cuts every TCP connection to or from `ip` (a node's whole migration network).
    fn ip(ip: std::net::IpAddr) -> NetCut {
        Self::cut(ip, None)
    }

    fn cut(ip: std::net::IpAddr, port: Option<u16>) -> NetCut {
        forget_stale_cuts();
        let table = format!(
            "{CUT_TABLE_PREFIX}{}_{}",
            std::process::id(),
            port.map_or_else(
                || ip.to_string().replace(['.', ':'], "x"),
                |p| p.to_string()
            )
        );
        let family = if ip.is_ipv4() { "ip" } else { "ip6" };
        let (dport, sport) = match port {
            Some(p) => (format!(" tcp dport {p}"), format!(" tcp sport {p}")),
            None => (
                " meta l4proto tcp".to_string(),
                " meta l4proto tcp".to_string(),
            ),
        };
        let script = format!(
            "table inet {table} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\t{family} daddr {ip}{dport} counter drop\n\
             \t\t{family} saddr {ip}{sport} counter drop\n\
             \t}}\n\
             }}\n"
        );
        let out = nft_script(&script);
        assert!(
            out.status.success(),
            "cannot add the cut: {}\n{script}",
            stderr(&out)
        );
        NetCut { table }
    }

    /// The table's rules as `nft` lists them, if the table exists.
    fn listing(table: &str) -> Option<String> {
        let out = std::process::Command::new("nft")
            .args(["list", "table", "inet", table])
            .output()
            .ok()?;
        out.status.success().then(|| stdout(&out))
    }

    /// How many packets the cut dropped so far.
    fn dropped_packets(&self) -> u64 {
        let listing = Self::listing(&self.table).expect("the cut's table exists");
        let words: Vec<&str> = listing.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }
}

impl Drop for NetCut {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// Deletes the cut tables of test processes that are gone (killed before their guard's
/// drop): a stale rule would silently cut the port of whichever later test gets it.
fn forget_stale_cuts() {
    let Ok(out) = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
    else {
        return;
    };
    for line in stdout(&out).lines() {
        let Some(table) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = table
            .strip_prefix(CUT_TABLE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", table])
                .status();
        }
    }
}

/// The live QEMU processes of g1 on this machine, as the ids of the nodes whose data dirs
/// their command lines name (0: none of the cluster's), sorted.
fn qemu_nodes(s: &Setup) -> Vec<u64> {
    let needle = format!("/vms/{}/", s.vm_id);
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A zombie's command line reads empty.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains("qemu-system") || !cmdline.contains(&needle) {
            continue;
        }
        let node = s
            .cluster
            .nodes
            .iter()
            .find(|n| cmdline.contains(&format!("{}{needle}", n.dir.display())))
            .map_or(0, |n| n.id);
        out.push(node);
    }
    out.sort();
    out
}

/// Milliseconds since the epoch on this machine's clock (the nodes' clock too).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Post-copy, with node 2's migration network cut right after the switchover, while the
/// guest already runs on node 2 but lacks most of the memory it keeps rewriting: the source
/// sees nothing sent, pauses the stream and records the break; node 2 pauses its end and
/// listens afresh. Once the network is back the stream resumes, the last pages arrive, and
/// the guest goes on where it was: same boot, counter, disk records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_post_copy_cut_after_the_switchover_resumes_when_the_network_is_back() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    if !nft_usable() {
        return;
    }
    let Some(s) = setup_with(
        "console=ttyS0 quiet panic=-1 csvd.period_ms=50 csvd.dirty_mib=96",
        "256",
    )
    .await
    else {
        return;
    };
    let dest: std::net::SocketAddr = s.cluster.nodes[1].migration.parse().unwrap();
    // Capped so that pre-copy alone would never converge: post-copy moves the guest after
    // one pass, with its rewritten memory still on node 1.
    let out = s.migrate_output(
        2,
        &["--policy", "postcopy", "--bandwidth", "16", "--no-wait"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = v["migration"].as_u64().unwrap();
    // Cut once the guest runs on node 2 (it reports so as soon as QEMU runs it there, while
    // its pages still come), before the last page arrived.
    let client = s.cluster.nodes[0].client();
    let vm_id: uuid::Uuid = s.vm_id.parse().unwrap();
    let cut = wait_until(
        "the guest running on node 2 during post-copy",
        Duration::from_secs(120),
        || {
            let mut c = client.clone();
            async move {
                let state = c.state().await.ok()?;
                let m = &state.migrations[&id];
                assert!(!m.phase.is_terminal(), "ended before the cut: {m:?}");
                let v = &state.vms[&vm_id];
                (m.phase == csvd_raft::migration::MigrationPhase::Committed
                    && v.owner == 2
                    && v.runtime
                        .as_ref()
                        .is_some_and(|r| r.node == 2 && r.state == csvd_raft::vm::VmState::Running))
                .then(|| NetCut::ip(dest.ip()))
            }
        },
    )
    .await;
    let cut_at = std::time::Instant::now();
    let answered = wait_until(
        "the break recorded and node 2 listening again",
        Duration::from_secs(60),
        || {
            let m = migration_json(&s.ep, id);
            async move { m["recovery"]["listen"].is_string().then_some(m) }
        },
    )
    .await;
    assert_eq!(answered["phase"], "committed", "{answered}");
    assert_eq!(answered["recovery"]["attempt"], 1, "{answered}");
    // Nothing gets through while the network is cut: the guest waits for its pages.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(migration_json(&s.ep, id)["phase"], "committed");
    let dropped = cut.dropped_packets();
    assert!(dropped > 0, "the cut dropped no packet");
    drop(cut);
    let cut_for = cut_at.elapsed();
    let done = wait_until("the migration to end", Duration::from_secs(120), || {
        let m = migration_json(&s.ep, id);
        let done =
            ["completed", "failed", "cancelled"].contains(&m["phase"].as_str().unwrap_or(""));
        async move { done.then_some(m) }
    })
    .await;
    assert_eq!(done["phase"], "completed", "{done}");
    eprintln!(
        "cut for {} ms ({dropped} packets dropped); ended {} ms after the cut was lifted; {}",
        cut_for.as_millis(),
        (cut_at.elapsed() - cut_for).as_millis(),
        done["recovery"]
    );
    let v = s.vm();
    assert_eq!(
        (v["owner"].as_u64(), v["state"].as_str()),
        (Some(2), Some("running")),
        "{v}"
    );
    // The same guest, on node 2 alone: its counter went on from node 1's and goes on.
    let boot = s.continues_on(1, 2).await;
    let serial = s.serial(2);
    let at_end = common::agent_lines(&serial).last().unwrap().1;
    wait_until("the guest to go on", Duration::from_secs(30), || {
        let now = common::agent_lines(&serial).last().map_or(0, |l| l.1);
        async move { (now > at_end + 20).then_some(()) }
    })
    .await;
    assert!(common::agent_lines(&serial).iter().all(|(b, _)| *b == boot));
    wait_until("one QEMU for g1, node 2's", Duration::from_secs(30), || {
        let one = qemu_nodes(&s) == vec![2];
        async move { one.then_some(()) }
    })
    .await;
    let disk = s.cluster.nodes[0].client().state().await.unwrap().disks[&s.lun].clone();
    let recs = common::guest_records(&s.image, &disk);
    let boot_id = u64::from_str_radix(&boot, 16).unwrap();
    assert!(recs.iter().all(|r| r.0 == boot_id), "one boot on the disk");
    for w in recs.windows(2) {
        assert_eq!(w[1].1, w[0].1 + 1, "contiguous sequence numbers");
    }
    let out = migrator(&["--endpoint", &s.ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_network_cut_mid_copy_leaves_the_guest_on_its_source() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    if !nft_usable() {
        return;
    }
    // A busy guest and a 4 MiB/s cap: the copy lasts long enough to be cut in the middle.
    let Some(s) = setup("console=ttyS0 quiet panic=-1 csvd.period_ms=50 csvd.dirty_mib=32").await
    else {
        return;
    };
    let dest_addr = s.cluster.nodes[1].migration.clone();
    let show = |id: u64| migration_json(&s.ep, id);
    let id = s.start_slow(2);
    let sent = wait_until(
        "the copy to send some bytes",
        Duration::from_secs(60),
        || {
            let m = show(id);
            async move {
                let sent = m["progress"]["transferred_bytes"].as_u64().unwrap_or(0);
                (m["phase"] == "copying" && sent > 0).then_some(sent)
            }
        },
    )
    .await;
    let (boot, at_cut) = common::agent_lines(&s.serial(1))
        .last()
        .cloned()
        .expect("agent lines before the cut");

    // Cut the migration network: node 2's migration address is unreachable from now on.
    let cut_at_ms = epoch_ms();
    let cut = NetCut::new(&dest_addr);
    let failed = wait_until(
        "the stalled copy to be given up",
        Duration::from_secs(90),
        || {
            let m = show(id);
            let done =
                ["completed", "failed", "cancelled"].contains(&m["phase"].as_str().unwrap_or(""));
            async move { done.then_some(m) }
        },
    )
    .await;
    assert_eq!(failed["phase"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or("");
    assert!(
        error.starts_with("the copy stalled") && error.contains(&dest_addr),
        "{failed}"
    );
    let finished = failed["finished_at_ms"].as_u64().expect("an end time");
    // Given up for a stall: no sooner than the stall limit after the cut (less the poll and
    // rate-limit granularity of the last sends before it).
    assert!(
        finished + 1_000 >= cut_at_ms + 20_000,
        "failed {} ms after the cut: {failed}",
        finished.saturating_sub(cut_at_ms)
    );
    // The cut is what stopped the copy: it dropped the migration stream's packets.
    let dropped = cut.dropped_packets();
    assert!(dropped > 0, "the cut dropped no packet");
    eprintln!(
        "cut after {sent} bytes sent; failed {} ms after the cut; {dropped} packets dropped",
        finished.saturating_sub(cut_at_ms)
    );

    // The VM stays node 1's and runs there; the destination's paused QEMU is gone.
    let ep = s.ep.clone();
    wait_until("g1 running on node 1", Duration::from_secs(30), || {
        let out = migrator(&["--endpoint", &ep, "--json", "vm", "show", "g1"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        async move { (v["owner"] == 1 && v["state"] == "running").then_some(()) }
    })
    .await;
    // (A QEMU that is exiting has no command line left but is not a zombie yet: both views
    // must agree.)
    wait_until("one QEMU for g1, node 1's", Duration::from_secs(30), || {
        let one = qemu_nodes(&s) == vec![1] && s.qemu_alive(1) && !s.qemu_alive(2);
        async move { one.then_some(()) }
    })
    .await;

    // The guest ran through the stall (precopy never paused it) and runs on after it: the
    // same boot, its counter going on, one line per period.
    let at_failure = common::agent_lines(&s.serial(1)).last().unwrap().1;
    assert!(
        at_failure > at_cut,
        "the guest made no progress during the stall ({at_cut} then {at_failure})"
    );
    let serial = s.serial(1);
    wait_until(
        "the guest to go on after the failure",
        Duration::from_secs(30),
        || {
            let now = common::agent_lines(&serial).last().map_or(0, |l| l.1);
            async move { (now > at_failure + 20).then_some(()) }
        },
    )
    .await;
    let lines = common::agent_lines(&serial);
    assert!(lines.iter().all(|(b, _)| *b == boot), "one boot: {boot}");
    // From the cut on (a line printed during boot can be garbled by the kernel's own
    // console messages; the disk records below cover the whole run).
    for w in lines.windows(2).filter(|w| w[0].1 >= at_cut) {
        assert_eq!(w[1].1, w[0].1 + 1, "the counter goes on one by one");
    }
    // The records on the shared volume: that boot, no gap, written after the failure too.
    let disk = s.cluster.nodes[0].client().state().await.unwrap().disks[&s.lun].clone();
    let recs = common::guest_records(&s.image, &disk);
    assert!(recs.len() >= 100, "{} records", recs.len());
    let boot_id = u64::from_str_radix(&boot, 16).unwrap();
    assert!(recs.iter().all(|r| r.0 == boot_id), "one boot on the disk");
    for w in recs.windows(2) {
        assert_eq!(w[1].1, w[0].1 + 1, "contiguous sequence numbers");
    }
    assert!(recs.last().unwrap().2 > at_failure, "{:?}", recs.last());

    // With node 2's migration network still cut, a quick migration moves the guest there
    // all the same: its state goes through the shared volume.
    let (ok, last, err) = s.migrate(2, &["--policy", "quick"]);
    assert!(ok, "{err} {last}");
    assert_eq!(last["outcome"], "completed", "{last}");
    let ep = s.ep.clone();
    wait_until("g1 running on node 2", Duration::from_secs(30), || {
        let out = migrator(&["--endpoint", &ep, "--json", "vm", "show", "g1"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        // Node 2's own report, not the source's last one.
        let mine = v["runtime"]["node"] == 2;
        async move { (v["owner"] == 2 && mine && v["state"] == "running").then_some(()) }
    })
    .await;
    wait_until("one QEMU for g1, node 2's", Duration::from_secs(30), || {
        let q = qemu_nodes(&s);
        async move { (q == vec![2]).then_some(()) }
    })
    .await;
    assert_eq!(
        s.continues_on(1, 2).await,
        boot,
        "same boot on the destination"
    );
    // The saved state's disk went with the migration.
    let state = s.cluster.nodes[0].client().state().await.unwrap();
    assert!(
        state.disks.values().all(|d| !d.name.ends_with(".state")),
        "{:?}",
        state.disks.values().map(|d| &d.name).collect::<Vec<_>>()
    );

    // The cut removed, the guest goes back over the network: nothing was left wedged.
    let table = cut.table.clone();
    drop(cut);
    assert!(NetCut::listing(&table).is_none(), "the cut's table is gone");
    let (ok, last, err) = s.migrate(1, &["--policy", "auto-converge"]);
    assert!(ok, "{err} {last}");
    assert_eq!(last["outcome"], "completed", "{last}");
    assert_eq!(s.vm()["owner"], 1);
    wait_until("one QEMU for g1, node 1's", Duration::from_secs(30), || {
        let q = qemu_nodes(&s);
        async move { (q == vec![1]).then_some(()) }
    })
    .await;
    let out = migrator(&["--endpoint", &s.ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
