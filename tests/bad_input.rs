//! Bad input at every boundary gets one clear error and changes nothing: configuration
//! files and flags, command-line arguments, and undecodable or misdirected gRPC payloads.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::{Cluster, bin, migrator, stderr, stdout};
use csvd_raft::pb::raft_client::RaftClient;
use csvd_raft::pb::{self, RaftMessage};
use tonic::Code;

fn csvd(args: &[&str]) -> std::process::Output {
    Command::new(bin("csvd"))
        .args(args)
        .output()
        .expect("run csvd")
}

/// Asserts a failed run printed exactly one line on stderr containing every `want`.
fn one_line_error(out: &std::process::Output, want: &[&str]) {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        stdout(out)
    );
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got:\n{err}");
    for w in want {
        assert!(lines[0].contains(w), "{:?} should contain {w:?}", lines[0]);
    }
}

#[test]
fn test_csvd_rejects_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p.to_str().unwrap().to_string()
    };
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();

    let malformed = write(
        "malformed.toml",
        "node_id = 1\ngrpc_addr = \"127.0.0.1:1\nx",
    );
    let out = csvd(&["--config", &malformed]);
    one_line_error(&out, &["malformed.toml", "line 2"]);
    assert_eq!(out.status.code(), Some(2));

    let unknown = write(
        "unknown.toml",
        "node_id = 1\ndata_dir = \"/tmp/x\"\ngprc_addr = \"127.0.0.1:1\"\n",
    );
    one_line_error(
        &csvd(&["--config", &unknown]),
        &["unknown.toml", "line 3", "unknown key `gprc_addr`"],
    );

    let wrong_type = write("type.toml", "node_id = \"one\"\n");
    one_line_error(&csvd(&["--config", &wrong_type]), &["type.toml", "line 1"]);

    let bad_addr = write(
        "addr.toml",
        &format!("node_id = 1\ndata_dir = \"{data}\"\ngrpc_addr = \"localhost:7001\"\n"),
    );
    one_line_error(
        &csvd(&["--config", &bad_addr]),
        &["addr.toml", "`grpc_addr`", "IP:port"],
    );

    one_line_error(
        &csvd(&["--config", "/nonexistent/node.toml"]),
        &["/nonexistent/node.toml", "cannot read"],
    );
    one_line_error(
        &csvd(&["--node-id", "1", "--data-dir", data]),
        &["`grpc_addr` is required"],
    );
    one_line_error(
        &csvd(&[
            "--node-id",
            "0",
            "--data-dir",
            data,
            "--grpc-addr",
            "127.0.0.1:1",
        ]),
        &["`node_id`", "reserved"],
    );
    one_line_error(
        &csvd(&[
            "--node-id",
            "1",
            "--data-dir",
            data,
            "--grpc-addr",
            "127.0.0.1:1",
            "--join",
            "somewhere",
        ]),
        &["`join`"],
    );
    one_line_error(&csvd(&["--node-id", "x"]), &["invalid value"]);
    one_line_error(&csvd(&["--frobnicate"]), &["--frobnicate"]);
    // Nothing was created for configurations that never validated.
    assert!(!dir.path().join("data").exists());
}

#[test]
fn test_csvd_reports_busy_port() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = csvd(&[
        "--node-id",
        "1",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--grpc-addr",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot listen on grpc_addr {addr}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn test_migrator_argument_and_endpoint_errors() {
    let out = migrator(&["cluster", "frobnicate"]);
    one_line_error(&out, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));

    let port = common::free_port();
    let out = migrator(&[
        "--endpoint",
        &format!("http://127.0.0.1:{port}"),
        "cluster",
        "status",
    ]);
    one_line_error(&out, &["cannot reach", &port.to_string()]);
    assert_eq!(out.status.code(), Some(1));

    one_line_error(
        &migrator(&["--endpoint", "not a url", "cluster", "status"]),
        &["not a url"],
    );
    one_line_error(
        &migrator(&["--endpoint", "http://127.0.0.1", "node", "list"]),
        &["port"],
    );
    one_line_error(
        &migrator(&["--cluster-id", "nope", "cluster", "status"]),
        &["not a UUID"],
    );
}

/// Proves the gRPC boundary: undecodable Raft and cluster payloads are refused with
/// INVALID_ARGUMENT, raw garbage on the port is dropped, requests for another cluster are
/// refused, and the node keeps serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_garbage_grpc_payloads_are_refused() {
    let mut cluster = Cluster::new(1);
    let cluster_id = cluster.start_initialized(&[]).await;
    let addr = cluster.nodes[0].grpc.clone();
    let channel = csvd_raft::network::channel(&addr).unwrap();
    let mut raft = RaftClient::new(channel.clone());
    let garbage = || RaftMessage {
        json: b"\x00\xffnot json".to_vec(),
        data: vec![],
    };

    let s = raft.append_entries(garbage()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = raft
        .vote(RaftMessage {
            json: b"{\"vote\": 7}".to_vec(),
            data: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = raft.pre_vote(garbage()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = raft.transfer_leader(garbage()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = raft.install_snapshot(garbage()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // A replication stream that starts with garbage is closed without a reply.
    let garbage_stream = futures::stream::iter(vec![garbage(), garbage()]);
    let mut replies = raft
        .stream_append(garbage_stream)
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .unwrap();
    assert!(matches!(first, Ok(None)), "{first:?}");

    let mut api = pb::cluster_client::ClusterClient::new(channel.clone());
    let s = api
        .write(pb::WriteRequest {
            json: b"[1,2,3]".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = api
        .write(pb::WriteRequest {
            json: br#"{"v":1,"cmd":{"op":"launch_missiles"}}"#.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = api
        .join(pb::JoinRequest {
            node: None,
            expected_cluster_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // Requests stamped for another cluster are refused.
    let mut req = tonic::Request::new(pb::StatusRequest { local: false });
    req.metadata_mut().insert(
        csvd_raft::CLUSTER_ID_HEADER,
        "00000000-0000-4000-8000-000000000009".parse().unwrap(),
    );
    let s = api.status(req).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("wrong cluster"), "{}", s.message());
    let out = migrator(&[
        "--endpoint",
        &cluster.nodes[0].endpoint(),
        "--cluster-id",
        "00000000-0000-4000-8000-000000000009",
        "cluster",
        "status",
    ]);
    one_line_error(&out, &["wrong cluster"]);

    // Raw bytes that are not HTTP/2 at all.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        sock.write_all(&[0xde; 4096]).await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
    }

    // Still serving, same cluster, nothing changed.
    let s = cluster.nodes[0].client().status().await.unwrap();
    assert_eq!(s.cluster_id.as_deref(), Some(cluster_id.as_str()));
    assert_eq!(s.members.len(), 1);
    let out = migrator(&[
        "--endpoint",
        &cluster.nodes[0].endpoint(),
        "--cluster-id",
        &cluster_id,
        "cluster",
        "status",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `cluster status --json` prints one JSON object with the documented fields, and
/// `cluster init` refuses a node that is already initialized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_status_json_schema_and_double_init() {
    let mut cluster = Cluster::new(2);
    let cluster_id = cluster.start_initialized(&[]).await;
    let out = migrator(&[
        "--endpoint",
        &cluster.nodes[1].endpoint(),
        "--json",
        "cluster",
        "status",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("one JSON object");
    assert_eq!(v["cluster_id"], cluster_id.as_str());
    assert!(v["leader"].is_u64());
    assert!(v["term"].is_u64());
    assert!(v["committed_index"].is_u64());
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    for m in members {
        assert!(m["id"].is_u64());
        assert!(
            ["voter", "learner"].contains(&m["role"].as_str().unwrap()),
            "{m}"
        );
        assert!(m["grpc_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(
            ["up", "down", "draining", "joining"].contains(&m["state"].as_str().unwrap()),
            "{m}"
        );
        assert_eq!(m["version"], csvd_raft::CSVD_VERSION);
    }

    let out = migrator(&[
        "--endpoint",
        &cluster.nodes[0].endpoint(),
        "cluster",
        "init",
    ]);
    one_line_error(&out, &["already belongs to cluster", &cluster_id]);

    let out = migrator(&["--endpoint", &cluster.nodes[0].endpoint(), "node", "list"]);
    assert!(out.status.success());
    let table = stdout(&out);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
}

/// `--log-format json` writes one JSON object per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_json_logs() {
    let mut cluster = Cluster::new(1);
    cluster.start_initialized(&["--log-format", "json"]).await;
    let log = cluster.nodes[0].log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
