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
        vec!["lun", "protect", "missing"],
    ] {
        let e0 = ep(0);
        let mut args = vec!["--endpoint", e0.as_str()];
        args.extend(bad.iter().copied());
        let out = migrator(&args);
        assert!(!out.status.success());
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
}

/// `volume create` writes a checksummed superblock naming this cluster on the device, makes the
/// serving node the coordinator, refuses to take the same device twice, refuses a non-blank
/// device without --force, and never touches a device owned by another cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_volume_create_on_a_device() {
    use csvd_csv_fs::superblock::Superblock;
    use std::os::unix::fs::FileExt;

    let mut cluster = Cluster::new(2);
    let glob = format!("{}/*.img", cluster.tmp.path().display());
    let cluster_id = cluster.start_initialized(&["--devices", &glob]).await;
    let dev = cluster.tmp.path().join("shared.img");
    std::fs::File::create(&dev)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let dev_s = dev.to_str().unwrap();
    let ep = |i: usize| cluster.nodes[i].endpoint();

    // A device the node's `devices` globs do not match: it would be lost after a restart.
    let stray = cluster.tmp.path().join("stray.raw");
    std::fs::File::create(&stray)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = migrator(&[
        "--endpoint",
        &ep(1),
        "volume",
        "create",
        "--device",
        stray.to_str().unwrap(),
        "--name",
        "stray",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not matched"), "{}", stderr(&out));
    assert!(std::fs::read(&stray).unwrap().iter().all(|b| *b == 0));

    let out = migrator(&[
        "--endpoint",
        &ep(1),
        "--json",
        "volume",
        "create",
        "--device",
        dev_s,
        "--name",
        "shared",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let created: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let sb = Superblock::decode(&std::fs::read(&dev).unwrap()[..4096]).unwrap();
    assert_eq!(sb.cluster_id.to_string(), cluster_id);
    assert_eq!(sb.volume_id.to_string(), created["id"].as_str().unwrap());
    assert_eq!(sb.device_bytes, 256 << 20);

    let out = migrator(&["--endpoint", &ep(0), "--json", "volume", "list"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v[0]["name"], "shared");
    assert_eq!(v[0]["coordinator"], 2);

    // The same device again, under any name.
    let out = migrator(&[
        "--endpoint",
        &ep(1),
        "volume",
        "create",
        "--device",
        dev_s,
        "--name",
        "again",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already holds volume"),
        "{}",
        stderr(&out)
    );

    // A device with other data: refused unless forced.
    let other = cluster.tmp.path().join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&other)
        .unwrap()
        .write_all_at(b"precious", 8192)
        .unwrap();
    let other_s = other.to_str().unwrap();
    let out = migrator(&[
        "--endpoint",
        &ep(0),
        "volume",
        "create",
        "--device",
        other_s,
        "--name",
        "o",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    let mut head = [0u8; 8];
    std::fs::File::open(&other)
        .unwrap()
        .read_exact_at(&mut head, 8192)
        .unwrap();
    assert_eq!(&head, b"precious", "a refused create must not write");

    // A device owned by another cluster: refused even with --force, untouched.
    let foreign = cluster.tmp.path().join("foreign.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let theirs = Superblock::new(
        Uuid::from_u128(7),
        Uuid::from_u128(8),
        64 << 20,
        "theirs",
        0,
    )
    .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&foreign)
        .unwrap()
        .write_all_at(&theirs.encode().unwrap(), 0)
        .unwrap();
    let out = migrator(&[
        "--endpoint",
        &ep(0),
        "volume",
        "create",
        "--device",
        foreign.to_str().unwrap(),
        "--name",
        "f",
        "--force",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("left untouched"), "{}", stderr(&out));
    assert_eq!(
        Superblock::decode(&std::fs::read(&foreign).unwrap()[..4096]).unwrap(),
        theirs
    );

    // A missing device path (matched by the globs): one clear line.
    let missing = cluster.tmp.path().join("missing.img");
    let out = migrator(&[
        "--endpoint",
        &ep(0),
        "volume",
        "create",
        "--device",
        missing.to_str().unwrap(),
        "--name",
        "x",
    ]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1);
    assert!(stderr(&out).contains("cannot open"), "{}", stderr(&out));
}
