//! `migrator migrate` is refused before anything starts when the destination cannot take the
//! guest, each time with its own reason, on one real cluster with a real (TCG) guest:
//!
//! - node 2 declares no virtual switch `lan`, which the VM's NIC uses;
//! - node 3's usable memory is taken by a big VM meant to run there (really running, with a
//!   `mem=` kernel argument so that QEMU's lazily allocated RAM stays small);
//! - node 4 runs guests under KVM (`accel = "kvm"` in its configuration file) while the VM
//!   runs under TCG. Needs a usable `/dev/kvm`; without one this case alone is skipped, with
//!   a line saying so.
//!
//! Then node 3 goes down (its daemon frozen with SIGSTOP, so it stops heartbeating) right
//! after a migration to it was admitted: the Raft leader ends that stranded migration as
//! failed once node 3 counts as down, and a new migration to node 3 is refused because it is
//! down; the guest runs on in node 1's QEMU throughout. Once thawed, node 3 starts no QEMU
//! for the guest.
//!
//! After each refusal: no migration record exists, no QEMU runs (nor ran: no run directory)
//! for the VM on the destination, and the guest still runs on node 1 in the same QEMU. At the
//! end, with node 3's big VM stopped, the same migration to node 3 goes through, so the
//! refusals were the checks' doing and the observations above do see a migration when there
//! is one. Skips with a clear line when QEMU, the test guest or the bridge `lan` is missing.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Cluster, Node, migrator, stderr, stdout, wait_until};

/// Whether QEMU could use KVM here at all: `/dev/kvm` opens for reading and writing.
fn kvm_device() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// First start of `node` with every address as a flag and `extra` (its switches, its
/// accelerator): like `Node::start_fresh`, which always declares the switch `lan`.
fn start_node(node: &mut Node, join: Option<&str>, extra: &[String]) {
    let mut args: Vec<String> = vec![
        "--node-id".into(),
        node.id.to_string(),
        "--grpc-addr".into(),
        node.grpc.clone(),
        "--iscsi-addr".into(),
        node.iscsi.clone(),
        "--migration-addr".into(),
        node.migration.clone(),
        "--io-addr".into(),
        format!("127.0.0.1:{}", common::free_port()),
    ];
    if let Some(j) = join {
        args.extend(["--join".into(), j.into()]);
    }
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.start_with(&args);
}

/// Starts node 1, initializes the cluster, starts the others joining it, and waits until all
/// are members with one leader.
async fn start_cluster(cluster: &mut Cluster, extra: impl Fn(u64) -> Vec<String>) {
    start_node(&mut cluster.nodes[0], None, &extra(1));
    let c = cluster.nodes[0].client();
    wait_until("cluster init", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move { c.init().await.ok() }
    })
    .await;
    let join = cluster.nodes[0].grpc.clone();
    for n in cluster.nodes.iter_mut().skip(1) {
        let mine = extra(n.id);
        start_node(n, Some(&join), &mine);
    }
    cluster.wait_members().await;
}

/// `migrator --endpoint EP --json ARGS`, which must succeed; its output as JSON.
fn json(ep: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--endpoint", ep, "--json"];
    a.extend_from_slice(args);
    let out = migrator(&a);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// `migrator --endpoint EP --json ARGS`: its output as JSON, or `None` if it failed.
fn try_json(ep: &str, args: &[&str]) -> Option<serde_json::Value> {
    let mut a = vec!["--endpoint", ep, "--json"];
    a.extend_from_slice(args);
    let out = migrator(&a);
    out.status
        .success()
        .then(|| serde_json::from_str(&stdout(&out)).ok())?
}

/// Processes whose command line names `needle` (the VM's uuid is QEMU's `-uuid`): (pid,
/// command line).
fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(needle).then_some((pid, cmd))
        })
        .collect()
}

struct Setup {
    cluster: Cluster,
    ep: String,
    vm_id: String,
    /// The cluster's next migration id before the refusals.
    next_migration_id: u64,
}

impl Setup {
    fn dir(&self, node: u64) -> PathBuf {
        self.cluster.nodes[node as usize - 1].dir.clone()
    }

    fn run_dir(&self, node: u64) -> PathBuf {
        self.dir(node).join("vms").join(&self.vm_id)
    }

    fn serial(&self, node: u64) -> PathBuf {
        self.run_dir(node).join("serial.log")
    }

    fn source_pid(&self) -> u32 {
        let p = self.run_dir(1).join("qemu.pid");
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// `migrator migrate g1 --to N`, which must fail; its stderr.
    fn refused(&self, to: u64) -> String {
        let to = to.to_string();
        let start = Instant::now();
        let out = migrator(&["--endpoint", &self.ep, "migrate", "g1", "--to", &to]);
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "migrating g1 to node {to} was not refused: {}{err}",
            stdout(&out)
        );
        // Refused up front, not after a failed attempt.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the refusal took {:?}",
            start.elapsed()
        );
        err
    }

    /// Nothing started for the refused migration of g1 to `dest`, and g1 still runs on node 1
    /// in the QEMU with pid `pid`.
    async fn assert_nothing_started(&self, dest: u64, pid: u32) {
        let list = json(&self.ep, &["migration", "list"]);
        let records = list.as_array().expect("a list of migrations");
        assert!(
            records
                .iter()
                .all(|m| m["vm_name"] != "g1" && m["vm"] != self.vm_id.as_str()),
            "a migration record exists for g1: {list}"
        );
        let state = self.cluster.nodes[0].client().state().await.unwrap();
        assert_eq!(
            state.next_migration_id, self.next_migration_id,
            "no migration id was handed out: {:?}",
            state.migrations
        );
        // No QEMU on the destination: it would live in (and name) its run directory there.
        let run_dir = self.run_dir(dest);
        assert!(
            !run_dir.exists(),
            "node {dest} has a run directory for g1: {}",
            run_dir.display()
        );
        let qemus = processes_naming(&self.vm_id);
        let source = self.dir(1).join("vms").join(&self.vm_id);
        assert_eq!(
            qemus.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![pid],
            "exactly node 1's QEMU runs g1: {qemus:#?}"
        );
        assert!(qemus[0].1.contains(source.to_str().unwrap()), "{qemus:#?}");
        assert_eq!(self.source_pid(), pid, "the same QEMU on node 1");
        let v = json(&self.ep, &["vm", "show", "g1"]);
        assert_eq!(v["owner"], 1, "{v}");
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["runtime"]["node"], 1, "{v}");
        // And the guest goes on: its agent keeps printing on node 1's console.
        let serial = self.serial(1);
        let seen = common::agent_lines(&serial).len();
        wait_until(
            "g1's agent to go on printing on node 1",
            Duration::from_secs(30),
            || {
                let n = common::agent_lines(&serial).len();
                async move { (n > seen + 2).then_some(()) }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_migrate_is_refused_before_anything_starts() {
    if !common::ensure_bridge() {
        eprintln!("skip: cannot create the bridge lan (needs root)");
        return;
    }
    let Some(guest) = common::test_guest() else {
        return;
    };
    // Node 4, the KVM node, only where QEMU can open /dev/kvm at all. (On this machine KVM
    // cannot boot Linux, which does not matter: nothing is started there.)
    let kvm = kvm_device();
    if let Err(e) = &kvm {
        eprintln!(
            "skip: the accelerator case (a node forced to KVM) is not run: {e}; the other cases run"
        );
    }
    let mut cluster = Cluster::new(if kvm.is_ok() { 4 } else { 3 });
    let kvm_config = cluster.tmp.path().join("node4.toml");
    std::fs::write(&kvm_config, "accel = \"kvm\"\nswitches = [\"lan\"]\n").unwrap();
    start_cluster(&mut cluster, |id| match id {
        // Node 2 has a switch, just not `lan`.
        2 => ["--switches", "wan", "--accel", "tcg"]
            .map(String::from)
            .to_vec(),
        4 => vec!["--config".into(), kvm_config.display().to_string()],
        _ => ["--switches", "lan", "--accel", "tcg"]
            .map(String::from)
            .to_vec(),
    })
    .await;
    let n = cluster.nodes.len() as u64;
    let ep = cluster.nodes[0].endpoint();

    // Every node reports what its guests run on; node 4 says KVM.
    let client = cluster.nodes[0].client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let cpus = loop {
        let state = client.clone().state().await.unwrap();
        if state.node_cpus.len() as u64 == n {
            break state.node_cpus;
        }
        if Instant::now() > deadline {
            panic!(
                "not every node reported its CPU: {:?}\nnode {n}'s log:\n{}",
                state.node_cpus,
                cluster.nodes[n as usize - 1].log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (node, cpu) in &cpus {
        let want = if *node == 4 { "kvm" } else { "tcg" };
        assert_eq!(cpu.accel, want, "node {node}: {cpu:?}");
    }
    let members = json(&ep, &["node", "list"]);
    let member = |id: u64| {
        members
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("node {id} in {members}"))
            .clone()
    };
    assert_eq!(member(2)["switches"], serde_json::json!(["wan"]));
    assert_eq!(member(3)["switches"], serde_json::json!(["lan"]));
    if kvm.is_ok() {
        assert_eq!(member(4)["switches"], serde_json::json!(["lan"]));
    }

    // g1: the test guest, 128 MiB, one NIC on `lan`, running on node 1 under TCG.
    let create = |name: &str, memory: &str, node: &str, nic: Option<&str>, append: &str| {
        let extra = nic.map(|n| vec!["--nic", n]).unwrap_or_default();
        let out = common::create_guest_vm(&ep, &guest, name, memory, node, append, &extra);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()
    };
    let v = create(
        "g1",
        "128",
        "1",
        Some("lan"),
        "console=ttyS0 quiet panic=-1 csvd.period_ms=100",
    );
    let vm_id = v["id"].as_str().unwrap().to_string();
    let out = migrator(&["--endpoint", &ep, "vm", "start", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // big: node 3's usable memory (its memory less an eighth, at most 1 GiB) but 64 MiB, meant
    // to run there, so g1's 128 MiB do not fit next to it. It really runs; the guest kernel
    // uses 160 MiB of it (`mem=`), and QEMU allocates guest RAM only as it is touched.
    let total_mib = member(3)["memory_bytes"].as_u64().unwrap() >> 20;
    let usable_mib = total_mib - (total_mib / 8).min(1024);
    let big_mib = usable_mib - 64;
    create(
        "big",
        &big_mib.to_string(),
        "3",
        None,
        "console=ttyS0 quiet panic=-1 mem=160M csvd.period_ms=1000",
    );
    let out = migrator(&["--endpoint", &ep, "vm", "start", "big"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let big = json(&ep, &["vm", "show", "big"]);
    assert_eq!(
        (&big["owner"], &big["state"]),
        (&3.into(), &"running".into()),
        "{big}\nnode 3's log:\n{}",
        cluster.nodes[2].log()
    );

    let next_migration_id = client.clone().state().await.unwrap().next_migration_id;
    let s = Setup {
        cluster,
        ep: ep.clone(),
        vm_id,
        next_migration_id,
    };
    let serial = s.serial(1);
    wait_until("g1's agent on node 1", Duration::from_secs(120), || {
        let n = common::agent_lines(&serial).len();
        async move { (n >= 5).then_some(()) }
    })
    .await;
    let v = json(&ep, &["vm", "show", "g1"]);
    assert_eq!(v["runtime"]["detail"], "tcg", "{v}");
    let pid = s.source_pid();

    // 1. Node 2 lacks the switch.
    let err = s.refused(2);
    assert!(
        err.contains("node 2 has no virtual switch \"lan\" (it has: wan)"),
        "{err}"
    );
    s.assert_nothing_started(2, pid).await;

    // 2. Node 3 lacks the memory.
    let err = s.refused(3);
    let want = format!(
        "not enough memory on node 3: the VM needs 128 MiB; {big_mib} MiB of {usable_mib} MiB \
         usable are taken by VMs meant to run there"
    );
    assert!(err.contains(&want), "{err}\nwanted: {want}");
    s.assert_nothing_started(3, pid).await;

    // 3. Node 4 runs guests under KVM, g1 runs under TCG.
    if kvm.is_ok() {
        let err = s.refused(4);
        assert!(
            err.contains(
                "node 4 runs guests under kvm, but VM \"g1\" runs under tcg on node 1: its \
                 processor state cannot move between accelerators"
            ),
            "{err}"
        );
        s.assert_nothing_started(4, pid).await;
    }

    let out = migrator(&["--endpoint", &ep, "vm", "stop", "big"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // 4. Node 3 goes down just after a migration to it was admitted.
    s.cluster.nodes[2].signal("-STOP");
    let out = migrator(&[
        "--endpoint",
        &ep,
        "--json",
        "migrate",
        "g1",
        "--to",
        "3",
        "--no-wait",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let stranded: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let stranded_id = stranded["migration"].as_u64().unwrap().to_string();
    let failed = wait_until(
        "the leader to end the migration to the frozen node 3",
        Duration::from_secs(60),
        || {
            // (A transient error while leadership moves is retried.)
            let m = try_json(&ep, &["migration", "show", &stranded_id]);
            async move { m.filter(|m| m["phase"] != "preparing") }
        },
    )
    .await;
    assert_eq!(failed["phase"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the destination (node 3) went down during the preparing phase"),
        "{failed}"
    );
    // Down now: refused up front.
    let err = s.refused(3);
    assert!(
        err.contains("node 3 (the destination) is down: no heartbeat in the last 10 s"),
        "{err}"
    );
    assert_eq!(s.source_pid(), pid, "the same QEMU on node 1");
    let v = json(&ep, &["vm", "show", "g1"]);
    assert_eq!(
        (&v["owner"], &v["state"]),
        (&1.into(), &"running".into()),
        "{v}"
    );
    // Thawed, node 3 sees the migration ended and starts nothing for it.
    s.cluster.nodes[2].signal("-CONT");
    wait_until("node 3 to be up again", Duration::from_secs(60), || {
        // (A transient error, should one come, is retried.)
        let members = try_json(&ep, &["node", "list"]);
        async move {
            members?
                .as_array()?
                .iter()
                .any(|m| m["id"] == 3 && m["state"] == "up")
                .then_some(())
        }
    })
    .await;
    // (Its first look is at its stale view, which still shows the migration preparing: it
    // asks the leader before starting anything.)
    let dir3 = s.dir(3).display().to_string();
    let vm_id = s.vm_id.clone();
    wait_until("no QEMU for g1 on node 3", Duration::from_secs(30), || {
        let on3 = processes_naming(&vm_id)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&dir3))
            .count();
        async move { (on3 == 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let on3: Vec<_> = processes_naming(&s.vm_id)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&dir3))
        .collect();
    assert!(on3.is_empty(), "node 3 runs a QEMU for g1: {on3:#?}");
    assert!(
        !s.run_dir(3).exists(),
        "node 3 started g1's QEMU after thawing; its log:\n{}",
        s.cluster.nodes[2].log()
    );
    assert_eq!(
        json(&ep, &["migration", "show", &stranded_id])["phase"],
        "failed"
    );
    assert_eq!(s.source_pid(), pid, "the same QEMU on node 1");

    // The same migration to node 3 now goes through, and shows where the checks above would
    // have seen it: a record, a run directory on node 3, g1 owned there.
    let out = migrator(&["--endpoint", &ep, "--json", "migrate", "g1", "--to", "3"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let list = json(&ep, &["migration", "list"]);
    let records: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["vm_name"] == "g1")
        .collect();
    assert_eq!(records.len(), 2, "{list}");
    assert_eq!(records[0]["phase"], "failed", "{list}");
    assert_eq!(records[1]["phase"], "completed", "{list}");
    assert_eq!(records[1]["dest"], 3, "{list}");
    assert!(s.run_dir(3).join("qemu.pid").is_file());
    let v = json(&ep, &["vm", "show", "g1"]);
    assert_eq!(
        (&v["owner"], &v["state"]),
        (&3.into(), &"running".into()),
        "{v}\nnode 3's log:\n{}\nnode 3's console, without the agent's lines:\n{}",
        s.cluster.nodes[2].log(),
        std::fs::read_to_string(s.serial(3))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("csvd-agent boot="))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Moved live: the same boot of the guest goes on there.
    let boot = common::agent_lines(&s.serial(1)).last().unwrap().0.clone();
    let serial3 = s.serial(3);
    let after = wait_until("g1's agent on node 3", Duration::from_secs(30), || {
        let lines = common::agent_lines(&serial3);
        async move { (!lines.is_empty()).then_some(lines) }
    })
    .await;
    assert!(
        after.iter().all(|(b, _)| *b == boot),
        "{boot} then {after:?}"
    );
    wait_until("node 1's QEMU to end", Duration::from_secs(30), || {
        let left: Vec<u32> = processes_naming(&s.vm_id)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        async move { (!left.contains(&pid)).then_some(()) }
    })
    .await;
    // The refused destinations never ran g1.
    for dest in (2..=n).filter(|d| *d != 3) {
        assert!(!s.run_dir(dest).exists(), "node {dest} ran g1");
    }
    let out = migrator(&["--endpoint", &ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
