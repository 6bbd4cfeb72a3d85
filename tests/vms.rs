//! Real guests on a three-node cluster: `migrator vm` defines a VM on a LUN, its owner node's
//! csvd runs it in QEMU (TCG here), the guest's agent writes sequence records through QEMU's
//! iSCSI initiator onto the shared volume, a crashed QEMU is restarted, a restarted csvd
//! adopts the running guest, and `vm stop` powers the guest off. Skips with a clear line when
//! QEMU or the test guest (scripts/build-guest) is missing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{migrator, stderr, stdout, wait_until};

fn vm_json(endpoint: &str, name: &str) -> serde_json::Value {
    let out = migrator(&["--endpoint", endpoint, "--json", "vm", "show", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn qemu_pid(node_dir: &Path, vm: &str) -> i32 {
    std::fs::read_to_string(node_dir.join("vms").join(vm).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_vm_lifecycle_on_a_lun() {
    let Some(guest) = common::test_guest() else {
        return;
    };
    let (mut cluster, _, lun) =
        common::lun_cluster_with(512 << 20, "64M", "disk1", &["--accel", "tcg"]).await;
    let image = cluster.tmp.path().join("shared.img");
    let ep = cluster.nodes[0].endpoint();
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initrd.img");
    let create = |name: &str, memory: &str, extra: &[&str]| {
        let mut args = vec![
            "--endpoint",
            &ep,
            "vm",
            "create",
            name,
            "--memory",
            memory,
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            "console=ttyS0 quiet panic=-1 csvd.period_ms=50",
        ];
        args.extend_from_slice(extra);
        migrator(&args)
    };

    // Refused before anything exists, each with its reason.
    let out = create("bad", "128", &["--disk", "nosuch"]);
    assert!(
        stderr(&out).contains("no LUN named or with id \"nosuch\""),
        "{}",
        stderr(&out)
    );
    let out = create(
        "bad",
        "128",
        &["--disk", "disk1", "--nic", "dmz", "--node", "2"],
    );
    assert!(
        stderr(&out).contains("node 2 has no virtual switch \"dmz\" (it has: lan)"),
        "{}",
        stderr(&out)
    );
    let out = create("bad", "1000000", &["--disk", "disk1", "--node", "2"]);
    assert!(
        stderr(&out).contains("not enough memory on node 2"),
        "{}",
        stderr(&out)
    );

    // Defined on node 2, stopped.
    let out = create("g1", "128", &["--disk", "disk1", "--node", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = vm_json(&ep, "g1");
    assert_eq!(v["owner"], 2);
    assert_eq!(v["state"], "stopped");
    let id = v["id"].as_str().unwrap().to_string();

    // Started: node 2 runs it, and says so through any node.
    let out = migrator(&[
        "--endpoint",
        &cluster.nodes[2].endpoint(),
        "vm",
        "start",
        "g1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = vm_json(&cluster.nodes[2].endpoint(), "g1");
    assert_eq!(v["state"], "running");
    assert_eq!(v["runtime"]["node"], 2);
    assert_eq!(v["runtime"]["detail"], "tcg");
    let node2 = cluster.nodes[1].dir.clone();
    let serial = node2.join("vms").join(&id).join("serial.log");

    // The guest's records reach the shared volume through QEMU's iSCSI initiator and node
    // 2's portal: contiguous sequence numbers from one boot.
    let client = cluster.nodes[0].client();
    let disk = client.clone().state().await.unwrap().disks[&lun].clone();
    let first = wait_until(
        "guest records on the volume",
        Duration::from_secs(120),
        || {
            let (image, disk) = (image.clone(), disk.clone());
            async move {
                let r = common::guest_records(&image, &disk);
                (r.len() >= 20).then_some(r)
            }
        },
    )
    .await;
    let boot = first[0].0;
    assert!(first.iter().all(|r| r.0 == boot), "records from one boot");
    for w in first.windows(2) {
        assert_eq!(w[1].1, w[0].1 + 1, "contiguous sequence numbers");
        assert_eq!(w[1].2, w[0].2 + 1, "the counter follows the sequence");
    }
    assert!(
        std::fs::read_to_string(&serial)
            .unwrap()
            .contains(&format!("boot={boot:016x}"))
    );

    // The console, through any node: a command typed into the guest's shell answers.
    let typed = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(sleep 1; echo 'echo hello-$((6*7))'; sleep 1) | {} --endpoint {} vm console g1 --history 200 --linger-ms 3000",
            common::bin("migrator").display(),
            cluster.nodes[0].endpoint()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&typed.stdout);
    assert!(typed.status.success(), "{}", stderr(&typed));
    assert!(text.contains("hello-42"), "{text}");
    assert!(
        text.contains("csvd-agent boot="),
        "the history comes first: {text}"
    );

    // Paused: the guest's processors stop (its counter stands still) while QEMU stays. It
    // moves paused (pre-copy to node 3, quick back to node 2; post-copy, which needs a
    // running guest, is refused) and stays paused; resumed, it goes on from where it stood.
    let pid = qemu_pid(&node2, &id);
    let out = migrator(&["--endpoint", &ep, "vm", "pause", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = vm_json(&ep, "g1");
    assert_eq!(v["state"], "paused", "{v}");
    assert_eq!(v["desired"], "paused", "{v}");
    let still = common::agent_lines(&serial);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        common::agent_lines(&serial),
        still,
        "a paused guest prints nothing"
    );
    let migrate = |to: &str, policy: &str| {
        migrator(&[
            "--endpoint",
            &ep,
            "migrate",
            "g1",
            "--to",
            to,
            "--policy",
            policy,
        ])
    };
    let out = migrate("3", "postcopy");
    assert!(
        stderr(&out).contains("is paused: post-copy needs the guest running"),
        "{}",
        stderr(&out)
    );
    let node3 = cluster.nodes[2].dir.clone();
    for (to, policy) in [("3", "precopy"), ("2", "quick")] {
        let out = migrate(to, policy);
        assert!(out.status.success(), "{policy}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("(paused, as it stays)"),
            "{}",
            stdout(&out)
        );
        let v = vm_json(&ep, "g1");
        assert_eq!(
            (&v["owner"], &v["state"], &v["desired"]),
            (
                &to.parse::<u64>().unwrap().into(),
                &"paused".into(),
                &"paused".into()
            ),
            "{v}"
        );
    }
    // It never ran meanwhile: nothing printed on node 3, nothing more on node 2.
    let serial3 = node3.join("vms").join(&id).join("serial.log");
    assert!(common::agent_lines(&serial3).is_empty());
    assert_eq!(common::agent_lines(&serial), still);
    assert_ne!(
        qemu_pid(&node2, &id),
        pid,
        "node 2 runs the QEMU it received"
    );
    let pid = qemu_pid(&node2, &id);
    let out = migrator(&["--endpoint", &ep, "vm", "resume", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(vm_json(&ep, "g1")["state"], "running");
    let on = wait_until("the resumed guest's agent", Duration::from_secs(30), || {
        let lines = common::agent_lines(&serial);
        let n = still.len();
        async move { (lines.len() > n).then_some(lines) }
    })
    .await;
    let (last, next) = (&still[still.len() - 1], &on[still.len()]);
    assert_eq!(next.0, last.0, "same boot");
    assert_eq!(next.1, last.1 + 1, "the counter goes on");
    assert_eq!(qemu_pid(&node2, &id), pid, "the same QEMU");
    let out = migrator(&["--endpoint", &ep, "vm", "resume", "g1"]);
    assert!(stderr(&out).contains("is not paused"), "{}", stderr(&out));

    // QEMU crashes: node 2 starts it again and counts the restart.
    let pid = qemu_pid(&node2, &id);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_until(
        "the crashed guest to run again",
        Duration::from_secs(60),
        || {
            let ep = ep.clone();
            async move {
                let v = vm_json(&ep, "g1");
                (v["state"] == "running" && v["runtime"]["restarts"] == 1).then_some(())
            }
        },
    )
    .await;
    let pid = qemu_pid(&node2, &id);

    // csvd on node 2 restarts: the guest keeps running and is adopted.
    cluster.node(2).terminate();
    cluster.node(2).restart();
    wait_until("node 2 to adopt the guest", Duration::from_secs(60), || {
        let log = cluster.nodes[1].log();
        async move { log.contains("adopted a running guest").then_some(()) }
    })
    .await;
    assert_eq!(qemu_pid(&node2, &id), pid, "the same QEMU runs on");

    // A LUN in use cannot be deleted; a running VM cannot be deleted.
    let out = migrator(&["--endpoint", &ep, "lun", "delete", "disk1"]);
    assert!(
        stderr(&out).contains("attached to VM g1"),
        "{}",
        stderr(&out)
    );
    let out = migrator(&["--endpoint", &ep, "vm", "delete", "g1"]);
    assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));

    // Stopped: the guest powers off when asked.
    let out = migrator(&["--endpoint", &ep, "vm", "stop", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(vm_json(&ep, "g1")["state"], "stopped");
    assert!(
        std::fs::read_to_string(&serial)
            .unwrap()
            .contains("power button: powering off"),
        "the guest shut down cleanly; serial log ends:\n{}",
        std::fs::read_to_string(&serial)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("csvd-agent boot="))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let out = migrator(&["--endpoint", &ep, "vm", "delete", "g1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrator(&["--endpoint", &ep, "vm", "list"]);
    assert!(!stdout(&out).contains("g1"), "{}", stdout(&out));
}
