//! Three real `csvd` processes share one sparse file as a volume and export its virtual disk
//! as one LUN from every node's portal. Real initiators check it: libiscsi's `iscsi-ls` finds
//! every portal through any one of them; `iscsi-inq` and `iscsi-readcapacity16` show the same
//! identity and size on each path; data QEMU's iSCSI driver (`qemu-io`) writes through one
//! node reads back through the others. A persistent reservation registered through node 1
//! refuses another initiator's write arriving through node 3, and so does write protection set
//! with the CLI through node 1. A LUN attached to a VM takes writes from the owner node's
//! initiator name only among the nodes' names. Tools that are missing are reported as a skip
//! line.

mod common;

use std::process::Command;
use std::time::Duration;

use common::initiator::{Initiator, cdb};
use common::{Cluster, migrator, stderr, stdout};

const DEVICE_BYTES: u64 = 512 << 20;

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skip: {tool} is not installed (scripts/install-deps installs it)");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect("run a tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

struct Setup {
    cluster: Cluster,
    target: String,
    lun: u64,
}

impl Setup {
    fn url(&self, node: usize) -> String {
        format!(
            "iscsi://{}/{}/{}",
            self.cluster.nodes[node].iscsi, self.target, self.lun
        )
    }
}

/// A three-node cluster with a volume on a shared file (each node through its own path) and
/// a 64 MiB LUN, waited until every node runs direct I/O on it.
async fn setup() -> Setup {
    let (cluster, target, lun) = common::lun_cluster(DEVICE_BYTES, "64M", "disk1").await;
    Setup {
        cluster,
        target,
        lun,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_one_lun_identity_on_every_portal() {
    if !have("iscsi-ls") || !have("iscsi-inq") || !have("iscsi-readcapacity16") {
        return;
    }
    let s = setup().await;
    let initiator = "iqn.2025-11.org.csvd.test:ls";

    // Discovery through node 2 lists the target with all three portals.
    let (ok, out) = run(
        "iscsi-ls",
        &[
            "-i",
            initiator,
            "-s",
            &format!("iscsi://{}", s.cluster.nodes[1].iscsi),
        ],
    );
    assert!(ok, "iscsi-ls: {out}");
    assert!(out.contains(&s.target), "{out}");
    for n in &s.cluster.nodes {
        assert!(out.contains(&n.iscsi), "portal {} missing: {out}", n.iscsi);
    }
    assert!(
        out.contains("Lun:1") || out.contains(&format!("Lun:{}", s.lun)),
        "{out}"
    );

    // The same serial number and designators on every path; the size is the LUN's.
    let mut serials = Vec::new();
    let mut ids = Vec::new();
    for node in 0..3 {
        let (ok, std) = run("iscsi-inq", &["-i", initiator, &s.url(node)]);
        assert!(
            ok && std.contains("CSVD"),
            "standard inquiry via node {node}: {std}"
        );
        let (ok, serial) = run(
            "iscsi-inq",
            &["-i", initiator, "-e", "1", "-c", "128", &s.url(node)],
        );
        assert!(ok, "{serial}");
        serials.push(serial);
        let (ok, devid) = run(
            "iscsi-inq",
            &["-i", initiator, "-e", "1", "-c", "131", &s.url(node)],
        );
        assert!(ok, "{devid}");
        // The logical unit's designators (NAA, T10 vendor id) are the same on every path;
        // only the target port name differs per node.
        assert!(
            devid.contains("NAA") && devid.contains("RELATIVE_TARGET_PORT"),
            "{devid}"
        );
        let shared: Vec<&str> = devid.lines().filter(|l| !l.contains(",t,0x")).collect();
        ids.push(shared.join("\n"));
        let (ok, cap) = run("iscsi-readcapacity16", &["-i", initiator, &s.url(node)]);
        assert!(ok, "{cap}");
        // 512-byte logical blocks (the default) on 4 KiB physical blocks.
        assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
        assert!(
            cap.contains("LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3"),
            "{cap}"
        );
        assert!(
            cap.contains(&format!("Total size:{}", 64u64 << 20)),
            "{cap}"
        );
    }
    assert_eq!(serials[0], serials[1]);
    assert_eq!(serials[0], serials[2]);
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
}

fn qemu_io(url: &str, initiator: &str, op: &str) -> (bool, String) {
    run(
        "qemu-io",
        &[
            "--image-opts",
            &format!(
                "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={initiator}",
                url_part(url, 0),
                url_part(url, 1),
                url_part(url, 2)
            ),
            "-c",
            op,
        ],
    )
}

/// Parts of `iscsi://portal/target/lun`.
fn url_part(url: &str, i: usize) -> String {
    url.trim_start_matches("iscsi://")
        .split('/')
        .nth(i)
        .unwrap()
        .to_string()
}

fn qemu_has_iscsi() -> bool {
    let ok = Command::new("qemu-io")
        .args(["--image-opts", "driver=iscsi,help"])
        .output()
        .is_ok_and(|o| !String::from_utf8_lossy(&o.stderr).contains("Unknown driver"));
    if !ok {
        eprintln!("skip: QEMU's iSCSI driver is missing (package qemu-block-extra)");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_qemu_writes_through_one_node_read_through_others() {
    if !have("qemu-io") || !qemu_has_iscsi() {
        return;
    }
    let s = setup().await;
    let (ok, out) = qemu_io(
        &s.url(0),
        "iqn.2025-11.org.csvd.test:qemu1",
        "write -P 0xa5 1M 3M",
    );
    assert!(ok && out.contains("wrote"), "write via node 1: {out}");
    let (ok, out) = qemu_io(
        &s.url(1),
        "iqn.2025-11.org.csvd.test:qemu2",
        "write -P 0x3c 8M 4k",
    );
    assert!(ok && out.contains("wrote"), "write via node 2: {out}");
    for node in 0..3 {
        let name = format!("iqn.2025-11.org.csvd.test:reader{node}");
        let (ok, out) = qemu_io(&s.url(node), &name, "read -P 0xa5 1M 3M");
        assert!(
            ok && !out.contains("Pattern verification failed"),
            "read via node {node}: {out}"
        );
        let (ok, out) = qemu_io(&s.url(node), &name, "read -P 0x3c 8M 4k");
        assert!(
            ok && !out.contains("Pattern verification failed"),
            "read via node {node}: {out}"
        );
        // Never written: zeroes (the file is sparse).
        let (ok, out) = qemu_io(&s.url(node), &name, "read -P 0 32M 1M");
        assert!(
            ok && !out.contains("Pattern verification failed"),
            "zeroes via node {node}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_reservation_through_one_node_holds_on_another() {
    let s = setup().await;
    let portal = |i: usize| s.cluster.nodes[i].iscsi.clone();
    let mut a = Initiator::login(
        &portal(0),
        "iqn.2025-11.org.csvd.test:a",
        [0x80, 0, 0, 0, 1, 1],
        Some(&s.target),
        &[],
    )
    .await
    .expect("login a via node 1");
    let mut b = Initiator::login(
        &portal(2),
        "iqn.2025-11.org.csvd.test:b",
        [0x80, 0, 0, 0, 2, 2],
        Some(&s.target),
        &[],
    )
    .await
    .expect("login b via node 3");
    // Clear any unit attention of a new session.
    for i in [&mut a, &mut b] {
        let _ = i.command(s.lun, &[0, 0, 0, 0, 0, 0], &[], 0).await;
    }
    let block = vec![0x11u8; 4096];
    let r = b.command(s.lun, &cdb::write16(10, 8), &block, 0).await;
    assert_eq!(r.status, 0, "b writes before any reservation: {r:?}");

    // a registers (all target ports) and reserves Write Exclusive through node 1.
    let r = a
        .command(
            s.lun,
            &cdb::prout(0x00, 0),
            &cdb::prout_params(0, 0xabc, true),
            0,
        )
        .await;
    assert_eq!(r.status, 0, "register: {r:?}");
    let r = a
        .command(
            s.lun,
            &cdb::prout(0x01, 0x01),
            &cdb::prout_params(0xabc, 0, false),
            0,
        )
        .await;
    assert_eq!(r.status, 0, "reserve: {r:?}");

    // Through node 3, b's write conflicts and a's key is visible.
    let r = b
        .command(s.lun, &cdb::write16(10, 8), &vec![0x22u8; 4096], 0)
        .await;
    assert_eq!(
        r.status, 0x18,
        "b's write through node 3 must conflict: {r:?}"
    );
    let r = b.command(s.lun, &cdb::prin_read_keys(), &[], 512).await;
    assert_eq!(r.status, 0);
    assert_eq!(
        &r.data[8..16],
        &0xabcu64.to_be_bytes(),
        "a's key through node 3"
    );
    let r = b.command(s.lun, &cdb::read16(10, 8), &[], 4096).await;
    assert_eq!(r.status, 0, "reads are allowed under Write Exclusive");
    assert!(r.data == block, "the conflicting write changed the data");

    // a releases through node 1; b may write through node 3 again.
    let r = a
        .command(
            s.lun,
            &cdb::prout(0x02, 0x01),
            &cdb::prout_params(0xabc, 0, false),
            0,
        )
        .await;
    assert_eq!(r.status, 0, "release: {r:?}");
    let r = b
        .command(s.lun, &cdb::write16(10, 8), &vec![0x33u8; 4096], 0)
        .await;
    assert_eq!(r.status, 0, "b writes after the release: {r:?}");
    assert_eq!(a.logout().await, 0);
    assert_eq!(b.logout().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_cli_shows_paths_and_access() {
    let s = setup().await;
    let endpoint = s.cluster.nodes[0].endpoint();
    let out = migrator(&["--endpoint", &endpoint, "lun", "show", "disk1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for n in &s.cluster.nodes {
        assert!(
            text.contains(&format!("iscsi://{}/{}/{}", n.iscsi, s.target, s.lun)),
            "{text}"
        );
    }
    assert!(text.contains("active/optimized"), "{text}");
    assert!(text.contains("writes  allowed"), "{text}");

    // Write protection set through node 1 holds on node 3's portal as soon as the command
    // returns: the session there is told MODE PARAMETERS CHANGED, writes then fail with
    // LOGICAL UNIT SOFTWARE WRITE PROTECTED, reads work, and unprotecting lets writes
    // through again (after the same unit attention).
    let mut via3 = Initiator::login(
        &s.cluster.nodes[2].iscsi,
        "iqn.2025-11.org.csvd.test:wp",
        [0x80, 0, 0, 0, 6, 6],
        Some(&s.target),
        &[],
    )
    .await
    .expect("login via node 3");
    let _ = via3.command(s.lun, &[0; 6], &[], 0).await; // the new nexus's unit attention
    let block = vec![0x44u8; 4096];
    let r = via3.command(s.lun, &cdb::write16(16, 8), &block, 0).await;
    assert_eq!(r.status, 0, "write before protecting: {r:?}");
    let out = migrator(&["--endpoint", &endpoint, "lun", "protect", "disk1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("write-protected on every node"),
        "{}",
        stdout(&out)
    );
    let out = migrator(&["--endpoint", &endpoint, "--json", "lun", "show", "disk1"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["write_protected"], true, "{v}");
    let r = via3
        .command(s.lun, &cdb::write16(16, 8), &vec![0x55u8; 4096], 0)
        .await;
    assert_eq!(
        r.sense_code(),
        Some((6, 0x2a, 0x01)),
        "first command: {r:?}"
    );
    let r = via3
        .command(s.lun, &cdb::write16(16, 8), &vec![0x55u8; 4096], 0)
        .await;
    assert_eq!(
        r.sense_code(),
        Some((7, 0x27, 0x02)),
        "write via node 3: {r:?}"
    );
    let r = via3.command(s.lun, &cdb::read16(16, 8), &[], 4096).await;
    assert_eq!(r.status, 0, "read via node 3: {r:?}");
    assert!(r.data == block, "the refused write changed the data");
    let out = migrator(&["--endpoint", &endpoint, "lun", "unprotect", "disk1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("writable on every node"),
        "{}",
        stdout(&out)
    );
    let r = via3.command(s.lun, &[0; 6], &[], 0).await;
    assert_eq!(
        r.sense_code(),
        Some((6, 0x2a, 0x01)),
        "after unprotecting: {r:?}"
    );
    let r = via3
        .command(s.lun, &cdb::write16(16, 8), &vec![0x55u8; 4096], 0)
        .await;
    assert_eq!(r.status, 0, "write after unprotecting: {r:?}");
    assert_eq!(via3.logout().await, 0);

    // An access list that leaves our initiator out hides the LUN from it.
    let out = migrator(&[
        "--endpoint",
        &endpoint,
        "lun",
        "allow",
        "disk1",
        "--initiator",
        "iqn.2025-11.org.csvd.test:only",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrator(&[
        "--endpoint",
        &endpoint,
        "lun",
        "allow",
        "disk1",
        "--initiator",
        "not a name",
    ]);
    assert!(!out.status.success());
    let mut other = Initiator::login(
        &s.cluster.nodes[1].iscsi,
        "iqn.2025-11.org.csvd.test:other",
        [0x80, 0, 0, 0, 3, 3],
        Some(&s.target),
        &[],
    )
    .await
    .expect("login");
    // Within a few seconds node 2 has the new list and refuses the LUN.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = other.command(s.lun, &cdb::read16(0, 1), &[], 4096).await;
        if r.status == 2 && r.sense_code().map(|c| (c.1, c.2)) == Some((0x25, 0)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the LUN is still served: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_chap_mutual_and_header_digests_with_libiscsi() {
    if !have("iscsi-inq") {
        return;
    }
    let s = setup().await;
    let endpoint = s.cluster.nodes[0].endpoint();
    let out = Command::new(common::bin("migrator"))
        .args([
            "--endpoint",
            &endpoint,
            "target",
            "chap",
            "--user",
            "alice",
            "--mutual-user",
            "csvd-target",
        ])
        .env("MIGRATOR_CHAP_SECRET", "alice-secret-123")
        .env("MIGRATOR_CHAP_MUTUAL_SECRET", "target-secret-456")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = migrator(&[
        "--endpoint",
        &endpoint,
        "target",
        "chap",
        "--user",
        "bob",
        "--secret",
        "short",
    ]);
    assert!(!out.status.success(), "a short secret is refused");
    let portal = &s.cluster.nodes[1].iscsi;
    let url =
        |creds: &str, args: &str| format!("iscsi://{creds}{portal}/{}/{}{args}", s.target, s.lun);
    let inq = |u: String| run("iscsi-inq", &["-i", "iqn.2025-11.org.csvd.test:chap", &u]);
    // Within a few seconds node 2 knows the credentials: logins without them fail.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while inq(url("", "")).0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a login without CHAP still works"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out) = inq(url("alice%wrong-secret-000@", ""));
    assert!(!ok, "a wrong secret logs in: {out}");
    let (ok, out) = inq(url("alice%alice-secret-123@", ""));
    assert!(ok && out.contains("CSVD"), "one-way CHAP: {out}");
    let (ok, out) = inq(url(
        "alice%alice-secret-123@",
        "?target_user=csvd-target&target_password=target-secret-456&header_digest=crc32c",
    ));
    assert!(
        ok && out.contains("CSVD"),
        "mutual CHAP with header digests: {out}"
    );
    let (ok, out) = inq(url(
        "alice%alice-secret-123@",
        "?target_user=csvd-target&target_password=not-the-target-secret",
    ));
    assert!(
        !ok,
        "the initiator accepted a target that does not know the mutual secret: {out}"
    );
    // Removing the credentials opens the (loopback) portal again.
    let out = migrator(&["--endpoint", &endpoint, "target", "chap", "--clear"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_bad_pdus_hurt_only_their_connection() {
    use csvd_iscsi_target::pdu::{Bhs, op};
    let s = setup().await;
    let portal = s.cluster.nodes[0].iscsi.clone();
    let login = |n: u8| {
        let portal = portal.clone();
        let target = s.target.clone();
        async move {
            Initiator::login(
                &portal,
                &format!("iqn.2025-11.org.csvd.test:bad{n}"),
                [0x80, 0, 0, 0, 9, n],
                Some(&target),
                &[
                    ("HeaderDigest", "CRC32C,None"),
                    ("DataDigest", "CRC32C,None"),
                ],
            )
            .await
            .expect("login")
        }
    };
    let mut good = login(1).await;
    assert!(
        good.framing.header_digest && good.framing.data_digest,
        "digests negotiated"
    );
    let _ = good.command(s.lun, &[0; 6], &[], 0).await;
    let data = vec![0x5au8; 8192];
    assert_eq!(
        good.command(s.lun, &cdb::write16(64, 16), &data, 0)
            .await
            .status,
        0
    );

    // 1. Garbage instead of a login: the connection is closed.
    let mut raw = tokio::net::TcpStream::connect(&portal).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(&[0xffu8; 300]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), raw.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(n, Ok(0) | Err(_))
            || n.as_ref()
                .is_ok_and(|&n| n >= 48 && buf[0] & 0x3f == op::LOGIN_RESPONSE),
        "{n:?}"
    );

    // 2. An opcode initiators never send, inside a session: Reject, and the session goes on.
    let mut other = login(2).await;
    let _ = other.command(s.lun, &[0; 6], &[], 0).await; // the new nexus's unit attention
    let mut b = Bhs::new(0x1c);
    b.put_u32(16, 0x77);
    other.send(&b, &[]).await;
    let r = other.recv().await.expect("a reject");
    assert_eq!(r.bhs.opcode(), op::REJECT);
    assert_eq!(r.bhs.0[2], csvd_iscsi_target::pdu::reject::NOT_SUPPORTED);
    assert_eq!(other.command(s.lun, &[0; 6], &[], 0).await.status, 0);

    // 3. A corrupted header digest: that connection ends.
    let mut b = Bhs::new(op::NOP_OUT);
    b.0[0] |= 0x40;
    b.0[1] = 0x80;
    b.put_u32(16, 0x99);
    let mut wire = Vec::new();
    other.framing.encode_into(&b, &[], &mut wire);
    wire[49] ^= 0xff;
    other.send_raw(&wire).await.unwrap();
    assert!(
        other.recv().await.is_none(),
        "the connection must close on a header digest error"
    );

    // 4. A data segment longer than negotiated: that connection ends too.
    let mut third = login(3).await;
    let mut b = Bhs::new(op::NOP_OUT);
    b.0[0] |= 0x40;
    b.0[1] = 0x80;
    b.put_u32(16, 0x98);
    b.set_data_len(16 << 20);
    let mut wire = Vec::new();
    let fr = csvd_iscsi_target::pdu::Framing {
        data_digest: false,
        ..third.framing
    };
    fr.encode_into(&b, &[], &mut wire);
    wire[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    if third.framing.header_digest {
        let d = csvd_iscsi_target::pdu::digest(&[&wire[..48]]);
        wire[48..52].copy_from_slice(&d);
    }
    third.send_raw(&wire).await.unwrap();
    assert!(
        third.recv().await.is_none(),
        "the connection must close on an oversized segment"
    );

    // The first session saw none of it: its data is intact and it still works.
    let r = good.command(s.lun, &cdb::read16(64, 16), &[], 8192).await;
    assert_eq!(r.status, 0);
    assert!(r.data == data, "the first session's data changed");
    assert_eq!(good.logout().await, 0);
}

/// REPORT TARGET PORT GROUPS: (group id, asymmetric access state) for every group.
fn port_groups(data: &[u8]) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut at = 4;
    while at + 8 <= data.len() {
        let state = data[at] & 0x0f;
        let id = u16::from_be_bytes([data[at + 2], data[at + 3]]);
        let ports = data[at + 7] as usize;
        out.push((id, state));
        at += 8 + 4 * ports;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_alua_follows_node_mode_and_sessions_reinstate() {
    let s = setup().await;
    let endpoint = s.cluster.nodes[0].endpoint();
    let isid = [0x80, 0, 0, 0, 4, 4];
    let name = "iqn.2025-11.org.csvd.test:alua";
    let mut via1 = Initiator::login(&s.cluster.nodes[0].iscsi, name, isid, Some(&s.target), &[])
        .await
        .unwrap();
    let mut via3 = Initiator::login(&s.cluster.nodes[2].iscsi, name, isid, Some(&s.target), &[])
        .await
        .unwrap();
    let rtpg = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    for i in [&mut via1, &mut via3] {
        let _ = i.command(s.lun, &[0; 6], &[], 0).await;
    }
    let r = via1.command(s.lun, &rtpg, &[], 1024).await;
    assert_eq!(r.status, 0);
    assert_eq!(
        port_groups(&r.data),
        vec![(1, 0), (2, 0), (3, 0)],
        "all active/optimized"
    );

    // Node 3 turns redirected: its group becomes active/non-optimized on every portal, and
    // the initiator on node 3 hears ASYMMETRIC ACCESS STATE CHANGED.
    let out = migrator(&[
        "--endpoint",
        &endpoint,
        "volume",
        "set-mode",
        "vol",
        "--node",
        "3",
        "--mode",
        "redirected",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = via1.command(s.lun, &rtpg, &[], 1024).await;
        if r.status == 0 && port_groups(&r.data) == vec![(1, 0), (2, 0), (3, 1)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "group 3 never turned non-optimized"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Node 1 having applied the change says nothing of node 3, which learns of it from its
    // own copy of the cluster state: until then its reads succeed as before.
    loop {
        let r = via3.command(s.lun, &cdb::read16(0, 8), &[], 4096).await;
        if r.sense_code() == Some((6, 0x2a, 0x06)) {
            break;
        }
        assert_eq!(
            r.status,
            0,
            "before the unit attention: {:?}",
            r.sense_code()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no unit attention on node 3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = via3.command(s.lun, &cdb::read16(0, 8), &[], 4096).await;
    assert_eq!(r.status, 0, "redirected I/O still works through node 3");

    // The same initiator name and ISID logging in again replaces the old session.
    let mut again = Initiator::login(&s.cluster.nodes[0].iscsi, name, isid, Some(&s.target), &[])
        .await
        .unwrap();
    assert!(
        via1.recv().await.is_none(),
        "the reinstated session's connection must close"
    );
    let _ = again.command(s.lun, &[0; 6], &[], 0).await;
    assert_eq!(again.command(s.lun, &[0; 6], &[], 0).await.status, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_outstanding_write_data_is_bounded() {
    use csvd_iscsi_target::pdu::{self, Bhs, op};
    let s = setup().await;
    let mut i = Initiator::login(
        &s.cluster.nodes[0].iscsi,
        "iqn.2025-11.org.csvd.test:flood",
        [0x80, 0, 0, 0, 5, 5],
        Some(&s.target),
        &[],
    )
    .await
    .unwrap();
    let _ = i.command(s.lun, &[0; 6], &[], 0).await;
    // Writes of 16 MiB each whose data never comes: the node holds 256 MiB of buffers for a
    // connection at most, and refuses the next one with TASK SET FULL instead of allocating.
    let edtl: u32 = 16 << 20;
    let (exp_stat_sn, first_sn) = (0u32, 100u32);
    let mut cmd_sn = None;
    for n in 0..17u32 {
        let mut b = Bhs::new(op::SCSI_COMMAND);
        b.0[1] = 0x80 | 0x20 | 0x01;
        b.0[8..16].copy_from_slice(&pdu::encode_lun(s.lun));
        b.put_u32(16, first_sn + n);
        b.put_u32(20, edtl);
        let sn = *cmd_sn.get_or_insert(i.next_cmd_sn());
        b.put_u32(24, sn + n);
        b.put_u32(28, exp_stat_sn);
        b.0[32..48].copy_from_slice(&cdb::write16(0, edtl / 512));
        i.send(&b, &[]).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let r = i.recv().await.expect("a PDU");
        if r.bhs.opcode() == op::SCSI_RESPONSE && r.bhs.itt() == first_sn + 16 {
            break r.bhs.0[3];
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer to the 17th write"
        );
    };
    assert_eq!(status, 0x28, "TASK SET FULL");
}

/// Writes `block` at `lba` through `i` until the status is `want`, for at most 10 s (the
/// portal's node applies a metadata change a moment after the CLI returns); returns the
/// last result.
async fn write_until(
    i: &mut Initiator,
    lun: u64,
    lba: u64,
    block: &[u8],
    want: u8,
) -> common::initiator::ScsiResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = i.command(lun, &cdb::write16(lba, 8), block, 0).await;
        if r.status == want || std::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Never two writers: once a VM owned by node 2 uses the LUN, the target takes writes to it
/// from node 2's initiator name (`iqn.2025-11.org.csvd:<cluster>:node-2`, the name node 2's
/// QEMU logs in with) but answers node 1's with RESERVATION CONFLICT, whichever portal
/// they come through; node 1 still reads, and initiators outside the nodes' names (an
/// operator's tool) write as before. Deleting the VM lifts the fence. The VM is never
/// started: the record alone decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_iscsi_vm_disk_takes_writes_from_owner_node_only() {
    let s = setup().await;
    let endpoint = s.cluster.nodes[0].endpoint();
    let cluster = s.cluster.nodes[0]
        .client()
        .state()
        .await
        .expect("the cluster state")
        .cluster_id
        .expect("a cluster id");
    let node_name = |n: u64| format!("iqn.2025-11.org.csvd:{cluster}:node-{n}");
    assert_eq!(node_name(2), csvd_raft::vm::node_initiator_name(cluster, 2));
    let login = |node: usize, name: String, n: u8| {
        let portal = s.cluster.nodes[node].iscsi.clone();
        let target = s.target.clone();
        async move {
            let mut i = Initiator::login(&portal, &name, [0x80, 0, 0, 0, 7, n], Some(&target), &[])
                .await
                .unwrap_or_else(|e| panic!("login as {name}: {e:?}"));
            let _ = i.command(s.lun, &[0; 6], &[], 0).await; // the new nexus's unit attention
            i
        }
    };
    let mut stale = login(0, node_name(1), 1).await;
    let mut owner = login(1, node_name(2), 2).await;
    let mut tool = login(2, "iqn.2025-11.org.example:tool".into(), 3).await;
    let block = vec![0x61u8; 4096];
    let r = stale.command(s.lun, &cdb::write16(0, 8), &block, 0).await;
    assert_eq!(r.status, 0, "node 1 writes while no VM uses the LUN: {r:?}");

    let out = migrator(&[
        "--endpoint",
        &endpoint,
        "vm",
        "create",
        "fenced",
        "--memory",
        "64",
        "--disk",
        "disk1",
        "--kernel",
        "/bin/sh",
        "--node",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Each portal fences by its own node's view of the VMs.
    s.cluster.wait_applied_everywhere().await;

    let r = stale
        .command(s.lun, &cdb::write16(0, 8), &vec![0x62u8; 4096], 0)
        .await;
    assert_eq!(r.status, 0x18, "node 1's write must conflict: {r:?}");
    let r = stale.command(s.lun, &cdb::read16(0, 8), &[], 4096).await;
    assert_eq!(r.status, 0, "node 1 still reads: {r:?}");
    assert!(r.data == block, "the refused write changed the data");
    // Through node 2's portal as well: the rule is the initiator's, not the portal's.
    let mut stale_via2 = login(1, node_name(1), 4).await;
    let r = stale_via2
        .command(s.lun, &cdb::write16(0, 8), &vec![0x63u8; 4096], 0)
        .await;
    assert_eq!(r.status, 0x18, "node 1's name through node 2: {r:?}");

    let owned = vec![0x64u8; 4096];
    let r = owner.command(s.lun, &cdb::write16(8, 8), &owned, 0).await;
    assert_eq!(r.status, 0, "the owner node writes: {r:?}");
    let tooled = vec![0x65u8; 4096];
    let r = tool.command(s.lun, &cdb::write16(16, 8), &tooled, 0).await;
    assert_eq!(
        r.status, 0,
        "an initiator outside the nodes' names writes: {r:?}"
    );
    let r = stale.command(s.lun, &cdb::read16(8, 16), &[], 8192).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.data[..4096] == owned[..] && r.data[4096..] == tooled[..]);

    let out = migrator(&["--endpoint", &endpoint, "vm", "delete", "fenced"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = write_until(&mut stale, s.lun, 0, &vec![0x66u8; 4096], 0).await;
    assert_eq!(r.status, 0, "node 1 writes once no VM uses the LUN: {r:?}");
    for i in [stale, stale_via2, owner, tool] {
        assert_eq!(i.logout().await, 0);
    }
}
