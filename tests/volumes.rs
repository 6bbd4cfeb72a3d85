//! Volume and LUN metadata through the CLI on a real cluster: LUNs are carved, grown, listed
//! from any node and deleted, space is reused, and a full volume is refused with one line.
//! (The volume is registered through the API here; writing its superblock on a device is the
//! daemon's `volume create`, not part of this scenario.)

mod common;

use common::{Cluster, migrator, stderr, stdout};
use csvd_raft::command::Command;
use csvd_raft::volume::ALLOCATION_UNIT;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_lun_lifecycle_through_cli() {
    let mut cluster = Cluster::new(3);
    cluster.start_initialized(&[]).await;
    let volume = Uuid::from_u128(0x5151);
    cluster.nodes[0]
        .client()
        .write(Command::RegisterVolume {
            id: volume,
            name: "vol1".into(),
            device_bytes: 65 * ALLOCATION_UNIT,
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            now_ms: 1,
        })
        .await
        .unwrap();
    let ep = |i: usize| cluster.nodes[i].endpoint();

    let out = migrator(&[
        "--endpoint",
        &ep(1),
        "lun",
        "create",
        "--volume",
        "vol1",
        "--size",
        "40M",
        "--name",
        "web",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("created LUN 1"), "{}", stdout(&out));

    // Full: 24 MiB left.
    let out = migrator(&[
        "--endpoint",
        &ep(2),
        "lun",
        "create",
        "--volume",
        "vol1",
        "--size",
        "30M",
        "--name",
        "db",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("bytes free"), "{err}");

    let out = migrator(&[
        "--endpoint",
        &ep(2),
        "lun",
        "create",
        "--volume",
        &volume.to_string(),
        "--size",
        "20M",
        "--name",
        "db",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrator(&[
        "--endpoint",
        &ep(2),
        "lun",
        "resize",
        "web",
        "--size",
        "44M",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrator(&[
        "--endpoint",
        &ep(2),
        "lun",
        "resize",
        "web",
        "--size",
        "10M",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("only growing"), "{}", stderr(&out));

    let out = migrator(&["--endpoint", &ep(0), "--json", "lun", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let luns = v.as_array().unwrap();
    assert_eq!(luns.len(), 2);
    assert_eq!(luns[0]["name"], "web");
    assert_eq!(luns[0]["size_bytes"], 44 * ALLOCATION_UNIT);

    let out = migrator(&["--endpoint", &ep(0), "lun", "delete", "db"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrator(&["--endpoint", &ep(1), "--json", "volume", "show", "vol1"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["volume"]["free_bytes"], 20 * ALLOCATION_UNIT);
    assert_eq!(v["disks"].as_array().unwrap().len(), 1);

    for bad in [
        vec![
            "lun", "create", "--volume", "nope", "--size", "1M", "--name", "x",
        ],
        vec![
            "lun", "create", "--volume", "vol1", "--size", "1X", "--name", "x",
        ],
        vec!["lun", "show", "missing"],
    ] {
        let e0 = ep(0);
        let mut args = vec!["--endpoint", e0.as_str()];
        args.extend(bad.iter().copied());
        let out = migrator(&args);
        assert!(!out.status.success());
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
}
