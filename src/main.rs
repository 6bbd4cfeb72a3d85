//! `csvd`: the node daemon. It wires the metadata service (Raft) to its gRPC server and runs
//! the node's agents; later layers (csv-fs, the iSCSI target, the hypervisor) hang off it.

mod config;
mod console;
mod host;
mod iscsi;
mod migrate;
mod saved_state;
mod shared;
mod vms;
mod volumes;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use csvd_raft::api::ClusterClient;
use csvd_raft::node::{LEFT_MARKER, MetaNode, MetaOptions};
use csvd_raft::pb::cluster_server::ClusterServer;
use csvd_raft::pb::raft_server::RaftServer;
use csvd_raft::service::ClusterService;
use csvd_raft::state::NodeSpec;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, Flags, LogFormat};

/// Largest gRPC message accepted (snapshots travel in one message).
const MAX_MESSAGE: usize = 256 << 20;

fn main() -> ExitCode {
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) => return clap_exit(e),
    };
    let (config, effective) = match config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("csvd: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    // Before any thread starts: they all inherit it.
    set_niceness(config.nice);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("csvd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, effective)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("csvd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets this thread's scheduling niceness (threads started later inherit it). The daemon
/// runs above its guests by default, so that Raft heartbeats, the I/O lease and the iSCSI
/// target are not queued behind busy guests' processors; QEMU is started at 0 whatever
/// this is (see `csvd_hypervisor::spawn`). Without the privilege to raise it, the daemon
/// runs on at its inherited niceness and says so.
fn set_niceness(nice: i32) {
    if let Err(error) = csvd_hypervisor::spawn::set_thread_niceness(nice) {
        tracing::warn!(
            nice,
            %error,
            "cannot set the daemon's niceness; it runs at the inherited one"
        );
    }
}

/// Prints a command-line error as one line (help and version print in full).
fn clap_exit(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let line = csvd_migrator::cli::one_line_error(&e);
    eprintln!("csvd: {line} (see csvd --help)");
    ExitCode::from(2)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=error,h2=warn,tower=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn node_spec(
    config: &Config,
    io_addr: std::net::SocketAddr,
    iscsi_addr: std::net::SocketAddr,
) -> NodeSpec {
    let (cpu_model, cpu_flags) = host::cpu();
    NodeSpec {
        id: config.node_id,
        grpc_addr: config.grpc_addr.to_string(),
        iscsi_addr: iscsi_addr.to_string(),
        migration_addr: config
            .migration_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        io_addr: io_addr.to_string(),
        cpu_model,
        cpu_flags,
        switches: config.switches.clone(),
        memory_bytes: host::memory_bytes(),
        version: csvd_raft::CSVD_VERSION.to_string(),
        protocol_version: csvd_raft::PROTOCOL_VERSION,
    }
}

async fn run(config: Config, effective: config::FileConfig) -> Result<(), String> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("{}: cannot create the data dir: {e}", dir.display()))?;
    let marker = dir.join(LEFT_MARKER);
    if marker.exists() {
        let cluster = std::fs::read_to_string(&marker).unwrap_or_default();
        return Err(format!(
            "{}: this node left cluster {cluster}; empty the data dir to use it again",
            dir.display()
        ));
    }
    config::save(dir, &effective)
        .map_err(|e| format!("{}: cannot save the configuration: {e}", dir.display()))?;

    let listener = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on grpc_addr {}: {e}", config.grpc_addr))?;
    let io_listener = shared::bind(config.io_addr, config.grpc_addr.ip()).await?;
    let io_addr = io_listener
        .local_addr()
        .map_err(|e| format!("io_addr: {e}"))?;

    let iscsi_listener = TcpListener::bind(
        config
            .iscsi_addr
            .unwrap_or(std::net::SocketAddr::new(config.grpc_addr.ip(), 0)),
    )
    .await
    .map_err(|e| format!("cannot listen on iscsi_addr: {e}"))?;
    let iscsi_addr = iscsi_listener
        .local_addr()
        .map_err(|e| format!("iscsi_addr: {e}"))?;

    let mut opts = MetaOptions::new(node_spec(&config, io_addr, iscsi_addr), dir.clone());
    opts.snapshot_every_entries = config.snapshot_every_entries;
    let node = MetaNode::open(opts).await.map_err(|e| e.to_string())?;

    if let Some(expected) = config.cluster_id
        && let Some(actual) = node.local_view().state.cluster_id
        && actual != expected
    {
        return Err(format!(
            "wrong cluster: the data dir belongs to cluster {actual}, not {expected}"
        ));
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let raft = RaftServer::new(node.raft_service())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let volumes = csvd_raft::pb::volumes_server::VolumesServer::new(
            volumes::VolumeService::new(node.clone(), config.devices.clone()),
        );
        let cluster = ClusterServer::new(ClusterService::new(node.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let guests = csvd_raft::pb::guests_server::GuestsServer::new(console::GuestService::new(
            node.clone(),
            dir.to_path_buf(),
        ));
        let mut stop = stop_rx.clone();
        let incoming = tokio_stream_from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(raft)
                .add_service(cluster)
                .add_service(volumes)
                .add_service(guests)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        )
    };
    let csv = shared::new_node(config.node_id);
    let io_server = tokio::spawn(csvd_csv_fs::redirect::serve(io_listener, csv.clone()));
    let target = csvd_iscsi_target::server::Target::new(
        std::sync::Arc::new(iscsi::CsvBackend::new(node.clone(), csv.clone())),
        std::sync::Arc::new(iscsi::CsvDirectory::new(
            node.clone(),
            config.node_id,
            iscsi_addr,
            config.iscsi_allow_no_auth,
        )),
        csvd_iscsi_target::server::Config {
            portal_group_tag: iscsi::port_group(config.node_id),
            relative_port: iscsi::port_group(config.node_id),
            ..Default::default()
        },
    );
    let iscsi_runtimes = iscsi_threads(config.iscsi_threads)?;
    let iscsi_server = tokio::spawn(target.clone().serve_on(iscsi_listener, iscsi_runtimes));
    tracing::info!(node = config.node_id, grpc = %config.grpc_addr, io = %io_addr,
        iscsi = %iscsi_addr, "csvd is serving");

    if !node.is_initialized().await.map_err(|e| e.to_string())? {
        match config.join {
            Some(join) => {
                join_cluster(&node, &config, io_addr, iscsi_addr, &join.to_string()).await?
            }
            None => tracing::info!(
                "not in a cluster yet: waiting for `migrator cluster init` or a restart with --join"
            ),
        }
    }

    let agents = node.spawn_agents();
    let shared_agents = shared::spawn(node.clone(), csv.clone(), config.devices.clone());
    let vm_agent = vms::spawn(
        node.clone(),
        vms::VmHostConfig {
            node_id: config.node_id,
            data_dir: dir.to_path_buf(),
            qemu: config.qemu.clone(),
            accel: config.accel,
            probe_kernel: config.probe_kernel.clone(),
            iscsi_addr,
            csv,
        },
    );
    let migration_watchdog = migrate::spawn_watchdog(node.clone());
    let mut removed = node.removed();
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = removed.wait_for(|r| *r) => tracing::info!("removed from the cluster: shutting down"),
    }
    // Guests keep running: a restarted csvd adopts them.
    vm_agent.abort();
    migration_watchdog.abort();
    for a in shared_agents {
        a.abort();
    }
    io_server.abort();
    // Sessions ask their initiators to log out (and move to another node's portal).
    target.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    iscsi_server.abort();
    node.shutdown().await;
    agents.abort();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    tracing::info!("stopped");
    Ok(())
}

/// Asks the cluster at `join` to admit this node, retrying while it is unreachable or
/// between leaders. A refusal (wrong cluster, duplicate id, incompatible version) is final.
async fn join_cluster(
    node: &MetaNode,
    config: &Config,
    io_addr: std::net::SocketAddr,
    iscsi_addr: std::net::SocketAddr,
    join: &str,
) -> Result<(), String> {
    let spec = node_spec(config, io_addr, iscsi_addr);
    let expected = config.cluster_id.map(|c| c.to_string());
    let mut client = ClusterClient::new(join, None).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match client.join(&spec, expected.as_deref()).await {
            Ok((cluster_id, role)) => {
                tracing::info!(%cluster_id, %role, via = join, "joined the cluster");
                node.cluster_cell().set(cluster_id);
                return Ok(());
            }
            Err(e) if e.is_unavailable() => {
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("could not join via {join}: {e}"));
                }
                tracing::warn!(error = %e, "join not possible yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(format!("join refused by {join}: {e}")),
        }
    }
}

/// Accepted connections with Nagle's algorithm off: Raft and API messages are small and
/// latency-bound, and Nagle plus delayed ACKs would add ~40 ms to every round trip.
fn tokio_stream_from(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Starts `n` threads, each running a current-thread runtime that serves whole iSCSI
/// connections and does their device I/O on rings of its own (see
/// [`csvd_csv_fs::engine::use_thread_rings`]). They live as long as the process.
fn iscsi_threads(n: usize) -> Result<Vec<tokio::runtime::Handle>, String> {
    (0..n)
        .map(|i| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("csvd-iscsi-{i}"))
                .spawn(move || {
                    csvd_csv_fs::engine::use_thread_rings();
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                })
                .map_err(|e| format!("cannot start an iSCSI thread: {e}"))?;
            rx.recv()
                .map_err(|_| "an iSCSI thread ended at start".to_string())?
                .map_err(|e| format!("cannot start an iSCSI thread's runtime: {e}"))
        })
        .collect()
}
