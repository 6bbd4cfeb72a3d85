//! The `migrator` command line: parsing, calls to a node's cluster API, human and JSON output.
//!
//! Every failure prints exactly one line on stderr and exits non-zero: 1 for an operation
//! that failed, 2 for bad arguments.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use csvd_raft::api::{ClusterClient, ClusterStatus};

use crate::volumes;

/// Operator CLI for a csvd cluster.
#[derive(Debug, Parser)]
#[command(
    name = "migrator",
    version,
    about = "Operate a csvd cluster: membership, volumes, LUNs, VMs, live migration"
)]
pub struct Cli {
    /// gRPC endpoint of any cluster node.
    #[arg(
        long,
        global = true,
        env = "CSVD_ENDPOINT",
        default_value = "http://127.0.0.1:7001"
    )]
    pub endpoint: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Refuse to act unless the endpoint belongs to this cluster.
    #[arg(long, global = true, env = "CSVD_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    #[command(subcommand)]
    pub command: Noun,
}

/// What to operate on.
#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Shared volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Virtual disks (LUNs) carved from volumes.
    #[command(subcommand)]
    Lun(LunCmd),
    /// The cluster's iSCSI target: its name, portals and CHAP credentials.
    #[command(subcommand)]
    Target(TargetCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Live-migrate a running VM to another node: only memory and device state move.
    Migrate {
        /// VM name or id.
        vm: String,
        /// Destination node id.
        #[arg(long)]
        to: u64,
        /// Bandwidth cap in MiB/s (default: none).
        #[arg(long)]
        bandwidth: Option<u64>,
        /// The longest pause QEMU may take at switchover, in ms (default 300).
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// precopy; postcopy (after one pass over memory the guest moves and fetches the
        /// pages it still lacks from the source: always finishes, but the guest is lost if
        /// either node fails before the last page arrives); auto-converge (throttles a guest
        /// that dirties memory too fast); or quick (pauses the guest, then copies: always
        /// finishes, the guest stands still meanwhile).
        #[arg(long, default_value = "precopy", value_parser = crate::migrate::parse_policy)]
        policy: csvd_raft::migration::MigrationPolicy,
        /// Return once the migration is recorded (it runs, or queues, in the cluster).
        #[arg(long)]
        no_wait: bool,
    },
    /// Live migrations: list, show, cancel.
    #[command(subcommand)]
    Migration(MigrationCmd),
}

/// `migrator migration ...`
#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    /// List migrations (running, queued and ended).
    List,
    /// Show one migration (by id, or the latest of a VM by its name).
    Show {
        /// Migration id or VM name.
        migration: String,
    },
    /// Cancel a migration before its switchover: the VM stays on its source.
    Cancel {
        /// Migration id or VM name.
        migration: String,
    },
    /// Show or set how many migrations run at once (the rest queue in order).
    Limits {
        /// Migrations a node takes part in at once, as source or destination (default 1).
        #[arg(long)]
        per_node: Option<u32>,
        /// Migrations in the whole cluster at once.
        #[arg(long, conflicts_with = "no_cluster_cap")]
        cluster: Option<u32>,
        /// Remove the cluster-wide cap.
        #[arg(long)]
        no_cluster_cap: bool,
    },
}

/// `migrator vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Define a VM (stopped) on a node: by default the active node with the most free
    /// memory that has every virtual switch its NICs use.
    Create {
        /// Unique name.
        name: String,
        /// Memory in MiB.
        #[arg(long)]
        memory: u64,
        /// Virtual processors.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// CPU model: `host`, `cluster-baseline` (the features every node has) or a QEMU
        /// model name.
        #[arg(long, default_value = "host")]
        cpu: String,
        /// A LUN (name or id) as a disk, in boot order (repeatable).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// A NIC on a virtual switch: SWITCH or SWITCH,mac=MAC (repeatable).
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// Boot this kernel instead of the first disk (a path every node can read).
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        /// Initial ramdisk for --kernel.
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        /// Kernel command line for --kernel.
        #[arg(long, allow_hyphen_values = true)]
        append: Option<String>,
        /// The node that runs it.
        #[arg(long)]
        node: Option<u64>,
    },
    /// List the VMs with their owner node and state.
    List,
    /// Show one VM (by name or id).
    Show {
        /// VM name or id.
        vm: String,
    },
    /// Start a VM on its owner node and wait until it runs.
    Start {
        /// VM name or id.
        vm: String,
        /// Return once the request is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Pause a running VM: its processors stop, its memory and devices stay (the guest
    /// does not notice, apart from the time that passed).
    Pause {
        /// VM name or id.
        vm: String,
        /// Return once the request is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Resume a paused VM.
    Resume {
        /// VM name or id.
        vm: String,
        /// Return once the request is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Shut a VM down (ACPI power button; QEMU is stopped if the guest does not power off
    /// within 30 s) and wait until it is stopped.
    Stop {
        /// VM name or id.
        vm: String,
        /// Return once the request is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Attach to a VM's serial console (through the node that runs it): first the end of
    /// what it printed, then live. On a terminal, Ctrl-] leaves; otherwise stdin is sent and
    /// output printed until --linger-ms after stdin ends.
    Console {
        /// VM name or id.
        vm: String,
        /// Bytes of the console's log to show first.
        #[arg(long, default_value_t = 4096)]
        history: u32,
        /// Without a terminal: how long to keep printing after stdin ends.
        #[arg(long, default_value_t = 1000)]
        linger_ms: u64,
    },
    /// Delete a stopped VM's definition; its disks remain.
    Delete {
        /// VM name or id.
        vm: String,
    },
}

/// `migrator target ...`
#[derive(Debug, Subcommand)]
pub enum TargetCmd {
    /// Show the target name, every node's portal and whether CHAP is set.
    Show,
    /// Set the CHAP credentials initiators must log in with (or remove them with --clear).
    Chap {
        /// The user name initiators authenticate as.
        #[arg(long, required_unless_present = "clear")]
        user: Option<String>,
        /// The secret (12 to 255 characters); prefer the environment variable.
        #[arg(long, env = "MIGRATOR_CHAP_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Mutual CHAP: the name the target answers with.
        #[arg(long, requires = "mutual_secret")]
        mutual_user: Option<String>,
        /// Mutual CHAP: the target's secret.
        #[arg(long, env = "MIGRATOR_CHAP_MUTUAL_SECRET", hide_env_values = true)]
        mutual_secret: Option<String>,
        /// Remove the credentials: logins need no authentication (loopback portals, or
        /// nodes with iscsi_allow_no_auth).
        #[arg(long, conflicts_with_all = ["user", "mutual_user"])]
        clear: bool,
    },
}

/// `migrator volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Write a csv-fs superblock on a shared device and register the volume. The device path
    /// is on the endpoint node, which becomes the volume's coordinator.
    Create {
        /// Device path on the endpoint node (a block device or a file).
        #[arg(long)]
        device: String,
        /// Unique volume name.
        #[arg(long)]
        name: String,
        /// Overwrite a device whose first MiB is not blank (never one of another cluster).
        #[arg(long)]
        force: bool,
    },
    /// List the volumes with their size, free space and coordinator.
    List,
    /// Show one volume (by name or UUID): each node's I/O mode and path, and its disks.
    Show {
        /// Volume name or UUID.
        volume: String,
    },
    /// Ask a node to send its I/O for a volume to the coordinator (`redirected`), or to go
    /// back to its own device path (`direct`, when it has one).
    SetMode {
        /// Volume name or UUID.
        volume: String,
        /// The node.
        #[arg(long)]
        node: u64,
        /// `direct` or `redirected`.
        #[arg(long, value_parser = ["direct", "redirected"])]
        mode: String,
    },
}

/// `migrator lun ...`
#[derive(Debug, Subcommand)]
pub enum LunCmd {
    /// Carve a new virtual disk from a volume.
    Create {
        /// The volume (name or UUID).
        #[arg(long)]
        volume: String,
        /// Size, like 10G, 512M or a byte count; a multiple of 1 MiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Initiator name allowed to use the LUN (repeatable); by default every initiator.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Logical block size: 512 (4 KiB physical; what most initiators expect) or 4096.
        #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
        block_size: u32,
    },
    /// Set which initiators may use a LUN.
    Allow {
        /// Disk name or id.
        lun: String,
        /// Initiator name (repeatable); replaces the current list.
        #[arg(long = "initiator", required_unless_present = "any")]
        initiators: Vec<String>,
        /// Allow every initiator.
        #[arg(long, conflicts_with = "initiators")]
        any: bool,
    },
    /// Write-protect a LUN: through every node's portal initiators can still read it, and
    /// every write fails (SCSI software write protect, which MODE SELECT can also set).
    Protect {
        /// Disk name or id.
        lun: String,
    },
    /// Make a write-protected LUN writable again.
    Unprotect {
        /// Disk name or id.
        lun: String,
    },
    /// List the virtual disks.
    List,
    /// Show one virtual disk (by name or id) with its extents.
    Show {
        /// Disk name or id.
        lun: String,
    },
    /// Grow a virtual disk.
    Resize {
        /// Disk name or id.
        lun: String,
        /// New size (not smaller than the current one).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a virtual disk; its space becomes free.
    Delete {
        /// Disk name or id.
        lun: String,
    },
}

/// Parses a LUN block size: 512 or 4096.
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.trim() {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        other => Err(format!("{other:?} is not a block size (512 or 4096)")),
    }
}

/// Parses sizes like `10G`, `512M`, `1T`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 10G"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `migrator cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Bootstrap a new cluster on the endpoint node.
    Init,
    /// Show the leader, term, commit index and every member.
    Status {
        /// Answer from the endpoint node's own state without asking the leader: works without
        /// a quorum, but may be stale.
        #[arg(long)]
        local: bool,
    },
    /// Remove a node from the cluster (the endpoint node unless --node is given).
    Leave {
        /// Id of the node to remove (for example a dead one).
        #[arg(long)]
        node: Option<u64>,
    },
}

/// `migrator node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the nodes with their role, state, addresses and version.
    List,
    /// Maintenance: the node takes no new VMs, and every VM it owns moves to the best other
    /// node (running ones live, within the migration limits; stopped ones by ownership).
    Drain {
        /// The node's id.
        node: u64,
        /// Return once the migrations are recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// End maintenance: the node takes VMs again.
    Resume {
        /// The node's id.
        node: u64,
    },
}

/// The first line of a command-line error, for tools that report failures in one line.
pub fn one_line_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string()
}

/// Runs the CLI with the process arguments.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            eprintln!("migrator: {} (see migrator --help)", one_line_error(&e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("migrator: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migrator: {}", e.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<String, String> {
    if let Some(id) = &cli.cluster_id
        && uuid::Uuid::parse_str(id).is_err()
    {
        return Err(format!("--cluster-id {id:?} is not a UUID"));
    }
    let mut client =
        ClusterClient::new(&cli.endpoint, cli.cluster_id.clone()).map_err(|e| e.to_string())?;
    match &cli.command {
        Noun::Cluster(ClusterCmd::Init) => {
            let id = client.init().await.map_err(|e| e.to_string())?;
            Ok(if cli.json {
                serde_json::json!({ "cluster_id": id }).to_string()
            } else {
                format!("initialized cluster {id}")
            })
        }
        Noun::Cluster(ClusterCmd::Status { local }) => {
            let status = if *local {
                client.local_status().await
            } else {
                client.status().await
            };
            let status = status.map_err(|e| e.to_string())?;
            Ok(if cli.json {
                to_json(&status)
            } else {
                render_status(&status)
            })
        }
        Noun::Cluster(ClusterCmd::Leave { node }) => {
            client
                .leave(node.unwrap_or(0))
                .await
                .map_err(|e| e.to_string())?;
            let who = node
                .map(|n| format!("node {n}"))
                .unwrap_or_else(|| format!("the node at {}", cli.endpoint));
            Ok(if cli.json {
                serde_json::json!({ "left": node }).to_string()
            } else {
                format!("{who} left the cluster")
            })
        }
        Noun::Node(NodeCmd::Drain { node, no_wait }) => {
            crate::migrate::drain(&mut client, *node, *no_wait, cli.json).await
        }
        Noun::Node(NodeCmd::Resume { node }) => {
            client
                .write(csvd_raft::command::Command::SetNodeState {
                    id: *node,
                    state: csvd_raft::state::NodeAdminState::Active,
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(if cli.json {
                serde_json::json!({ "node": node, "state": "active" }).to_string()
            } else {
                format!("node {node} takes VMs again")
            })
        }
        Noun::Node(NodeCmd::List) => {
            let status = client.status().await.map_err(|e| e.to_string())?;
            Ok(if cli.json {
                to_json(&status.members)
            } else {
                render_members(&status)
            })
        }
        Noun::Volume(cmd) => volumes::run(&mut client, cmd, cli.json).await,
        Noun::Lun(cmd) => volumes::run_lun(&mut client, cmd, cli.json).await,
        Noun::Target(cmd) => volumes::run_target(&mut client, cmd, cli.json).await,
        Noun::Vm(cmd) => crate::vms::run(&mut client, cmd, cli.json).await,
        Noun::Migrate {
            vm,
            to,
            bandwidth,
            downtime_ms,
            policy,
            no_wait,
        } => {
            crate::migrate::migrate(
                &mut client,
                vm,
                *to,
                *bandwidth,
                *downtime_ms,
                *policy,
                *no_wait,
                cli.json,
            )
            .await
        }
        Noun::Migration(cmd) => crate::migrate::run(&mut client, cmd, cli.json).await,
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Renders `cluster status` for people.
pub fn render_status(s: &ClusterStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "cluster   {}\nleader    {}\nterm      {}\ncommitted {}\n\n",
        s.cluster_id.as_deref().unwrap_or("(not initialized)"),
        s.leader
            .map(|l| format!("node {l}"))
            .unwrap_or_else(|| "none".into()),
        s.term,
        s.committed_index
    ));
    out.push_str(&render_members(s));
    out
}

/// Renders the member table.
pub fn render_members(s: &ClusterStatus) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "ROLE".into(),
        "STATE".into(),
        "GRPC".into(),
        "ISCSI".into(),
        "VERSION".into(),
        "HEARTBEAT".into(),
    ]];
    for m in &s.members {
        let leader = if s.leader == Some(m.id) { "*" } else { "" };
        rows.push([
            format!("{}{leader}", m.id),
            m.role.to_string(),
            m.state.clone(),
            m.grpc_addr.clone(),
            if m.iscsi_addr.is_empty() {
                "-".into()
            } else {
                m.iscsi_addr.clone()
            },
            format!(
                "{} (proto {})",
                if m.version.is_empty() {
                    "?"
                } else {
                    &m.version
                },
                m.protocol_version
            ),
            m.last_heartbeat_age_ms
                .map(|a| format!("{:.1}s ago", a as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    volumes::table(rows.into_iter().map(Vec::from).collect())
}
