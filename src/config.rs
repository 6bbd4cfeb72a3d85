//! Node configuration: a TOML file, every key also a kebab-case flag, flags winning.
//!
//! A node's effective configuration is saved as `node.toml` in its data directory on first
//! start, so a restarted node needs only `--data-dir` to come back with the same identity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

/// Name of the effective configuration saved in the data directory.
pub const SAVED_CONFIG: &str = "node.toml";

/// Command-line flags of `csvd`. Every configuration key is also a flag.
#[derive(Debug, Parser)]
#[command(
    name = "csvd",
    version,
    about = "csvd node daemon: cluster metadata, shared volumes, iSCSI, VMs"
)]
pub struct Flags {
    /// TOML configuration file; flags given on the command line override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id (1 or more, unique in the cluster).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Directory for this node's Raft log, snapshots and saved configuration.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the gRPC server (Raft and cluster API), IP:port.
    #[arg(long)]
    pub grpc_addr: Option<String>,
    /// Address of the iSCSI portal, IP:port.
    #[arg(long)]
    pub iscsi_addr: Option<String>,
    /// Accept iSCSI logins without CHAP on a portal reachable from the network (`true` or
    /// `false`; loopback portals never require CHAP).
    #[arg(long)]
    pub iscsi_allow_no_auth: Option<bool>,
    /// Address QEMU listens on for incoming live migrations, IP:port.
    #[arg(long)]
    pub migration_addr: Option<String>,
    /// Address of the block-I/O listener (redirected I/O from peers), IP:port; by default
    /// a free port on the gRPC address's IP.
    #[arg(long)]
    pub io_addr: Option<String>,
    /// Glob of shared device paths to scan for volumes (repeatable).
    #[arg(long = "devices")]
    pub devices: Vec<String>,
    /// Name of a virtual switch this node provides (repeatable).
    #[arg(long = "switches")]
    pub switches: Vec<String>,
    /// gRPC address (IP:port) of any cluster member to join on first start.
    #[arg(long)]
    pub join: Option<String>,
    /// The cluster this node must belong to; joining any other is refused.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Log format: `human` (default) or `json`. Verbosity comes from RUST_LOG.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Build a Raft snapshot after this many log entries.
    #[arg(long)]
    pub snapshot_every_entries: Option<u64>,
    /// Threads serving iSCSI connections, each connection wholly on one of them (1 to 256;
    /// by default one per CPU).
    #[arg(long)]
    pub iscsi_threads: Option<usize>,
    /// The daemon's scheduling niceness, -20 to 19 (default -10: Raft, the I/O lease and
    /// the iSCSI target stay responsive next to busy guests, whose QEMUs run at 0).
    #[arg(long, allow_hyphen_values = true)]
    pub nice: Option<i32>,
    /// The QEMU system emulator guests run in (a path, or a name looked up in PATH).
    #[arg(long)]
    pub qemu: Option<String>,
    /// How guests execute: `auto` (KVM when a probe guest really runs under it, else TCG),
    /// `kvm` or `tcg`.
    #[arg(long)]
    pub accel: Option<String>,
    /// Kernel image the KVM probe boots (by default the running kernel's /boot image).
    #[arg(long)]
    pub probe_kernel: Option<PathBuf>,
}

/// The configuration file's keys. Unknown keys are an error, not ignored.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iscsi_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iscsi_allow_no_auth: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switches: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_every_entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iscsi_threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_kernel: Option<PathBuf>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The validated configuration a node runs with.
/// The daemon's default niceness: above the guests (0), like a cluster stack's daemons.
pub const DEFAULT_NICE: i32 = -10;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub iscsi_addr: Option<SocketAddr>,
    pub iscsi_allow_no_auth: bool,
    pub migration_addr: Option<SocketAddr>,
    pub io_addr: Option<SocketAddr>,
    pub devices: Vec<String>,
    pub switches: Vec<String>,
    pub join: Option<SocketAddr>,
    pub cluster_id: Option<uuid::Uuid>,
    pub log_format: LogFormat,
    pub snapshot_every_entries: u64,
    pub iscsi_threads: usize,
    pub nice: i32,
    pub qemu: PathBuf,
    pub accel: csvd_hypervisor::accel::AccelChoice,
    pub probe_kernel: Option<PathBuf>,
}

/// A configuration problem: which file, which key, and why, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {detail}")]
pub struct ConfigError {
    source_name: String,
    detail: String,
}

impl ConfigError {
    fn new(source_name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            source_name: source_name.into(),
            detail: detail.into(),
        }
    }
}

/// Reads a TOML configuration file; errors name the file, the line and the key.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&name, format!("cannot read: {e}")))?;
    parse_file(&name, &text)
}

/// Parses configuration text; `name` is used in error messages.
pub fn parse_file(name: &str, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                format!(
                    "line {}: ",
                    text[..s.start.min(text.len())].matches('\n').count() + 1
                )
            })
            .unwrap_or_default();
        let msg = e
            .message()
            .replace("unknown field", "unknown key")
            .replace('\n', " ");
        ConfigError::new(name, format!("{line}{msg}"))
    })
}

impl Flags {
    /// Overlays the flags on a file configuration.
    fn overlay(&self, mut f: FileConfig) -> FileConfig {
        macro_rules! take {
            ($($k:ident),*) => { $( if self.$k.is_some() { f.$k = self.$k.clone(); } )* };
        }
        take!(
            node_id,
            data_dir,
            grpc_addr,
            iscsi_addr,
            iscsi_allow_no_auth,
            migration_addr,
            io_addr,
            join,
            cluster_id,
            log_format,
            snapshot_every_entries,
            iscsi_threads,
            nice,
            qemu,
            accel,
            probe_kernel
        );
        if !self.devices.is_empty() {
            f.devices = self.devices.clone();
        }
        if !self.switches.is_empty() {
            f.switches = self.switches.clone();
        }
        f
    }
}

/// Builds the effective configuration: saved config in the data dir (if any), then the
/// `--config` file, then flags.
pub fn load(flags: &Flags) -> Result<(Config, FileConfig), ConfigError> {
    let mut merged = FileConfig::default();
    let mut source = String::from("command line");
    if let Some(path) = &flags.config {
        merged = read_file(path)?;
        source = path.display().to_string();
    }
    // A data dir from the flags or the file may hold the saved configuration of an earlier
    // start; it fills in whatever was not given now.
    let data_dir = flags.data_dir.clone().or(merged.data_dir.clone());
    if let Some(dir) = &data_dir {
        let saved = dir.join(SAVED_CONFIG);
        if saved.exists() {
            let old = read_file(&saved)?;
            merged = fill_missing(merged, old);
        }
    }
    let merged = flags.overlay(merged);
    let config = validate(&source, &merged)?;
    Ok((config, merged))
}

fn fill_missing(mut new: FileConfig, old: FileConfig) -> FileConfig {
    macro_rules! fill {
        ($($k:ident),*) => { $( if new.$k.is_none() { new.$k = old.$k; } )* };
    }
    fill!(
        node_id,
        data_dir,
        grpc_addr,
        iscsi_addr,
        iscsi_allow_no_auth,
        migration_addr,
        io_addr,
        join,
        cluster_id,
        log_format,
        snapshot_every_entries,
        iscsi_threads,
        nice,
        qemu,
        accel,
        probe_kernel
    );
    if new.devices.is_empty() {
        new.devices = old.devices;
    }
    if new.switches.is_empty() {
        new.switches = old.switches;
    }
    new
}

fn addr(source: &str, key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        ConfigError::new(
            source,
            format!("key `{key}`: {v:?} is not an IP:port address"),
        )
    })
}

/// Checks every key; the first problem is reported.
pub fn validate(source: &str, f: &FileConfig) -> Result<Config, ConfigError> {
    let missing = |key: &str| {
        ConfigError::new(
            source,
            format!(
                "key `{key}` is required (or pass --{})",
                key.replace('_', "-")
            ),
        )
    };
    let node_id = f.node_id.ok_or_else(|| missing("node_id"))?;
    if node_id == 0 {
        return Err(ConfigError::new(
            source,
            "key `node_id`: 0 is reserved; use 1 or more",
        ));
    }
    let data_dir = f.data_dir.clone().ok_or_else(|| missing("data_dir"))?;
    let grpc_addr = addr(
        source,
        "grpc_addr",
        f.grpc_addr.as_deref().ok_or_else(|| missing("grpc_addr"))?,
    )?;
    let iscsi_addr = f
        .iscsi_addr
        .as_deref()
        .map(|v| addr(source, "iscsi_addr", v))
        .transpose()?;
    let migration_addr = f
        .migration_addr
        .as_deref()
        .map(|v| addr(source, "migration_addr", v))
        .transpose()?;
    let io_addr = f
        .io_addr
        .as_deref()
        .map(|v| addr(source, "io_addr", v))
        .transpose()?;
    let join = f
        .join
        .as_deref()
        .map(|v| addr(source, "join", v.trim_start_matches("http://")))
        .transpose()?;
    let cluster_id = match f.cluster_id.as_deref() {
        None => None,
        Some(v) => Some(v.parse::<uuid::Uuid>().map_err(|_| {
            ConfigError::new(source, format!("key `cluster_id`: {v:?} is not a UUID"))
        })?),
    };
    let log_format = match f.log_format.as_deref() {
        None | Some("human") => LogFormat::Human,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(ConfigError::new(
                source,
                format!("key `log_format`: {other:?} is not `human` or `json`"),
            ));
        }
    };
    let snapshot_every_entries = f.snapshot_every_entries.unwrap_or(5_000);
    if snapshot_every_entries == 0 {
        return Err(ConfigError::new(
            source,
            "key `snapshot_every_entries`: must be at least 1",
        ));
    }
    let iscsi_threads = match f.iscsi_threads {
        None => std::thread::available_parallelism().map_or(1, |n| n.get().min(256)),
        Some(n @ 1..=256) => n,
        Some(n) => {
            return Err(ConfigError::new(
                source,
                format!("key `iscsi_threads`: {n} is not between 1 and 256"),
            ));
        }
    };
    let nice = match f.nice {
        None => DEFAULT_NICE,
        Some(n @ -20..=19) => n,
        Some(n) => {
            return Err(ConfigError::new(
                source,
                format!("key `nice`: {n} is not between -20 and 19"),
            ));
        }
    };
    let accel = match f.accel.as_deref() {
        None => csvd_hypervisor::accel::AccelChoice::Auto,
        Some(v) => v
            .parse()
            .map_err(|e| ConfigError::new(source, format!("key `accel`: {e}")))?,
    };
    let qemu = match f.qemu.as_deref() {
        None => PathBuf::from("qemu-system-x86_64"),
        Some("") => return Err(ConfigError::new(source, "key `qemu`: empty")),
        Some(v) => PathBuf::from(v),
    };
    for (key, list) in [("devices", &f.devices), ("switches", &f.switches)] {
        if let Some(bad) = list.iter().find(|s| s.trim().is_empty()) {
            return Err(ConfigError::new(
                source,
                format!("key `{key}`: {bad:?} is empty"),
            ));
        }
    }
    let mut addrs = vec![("grpc_addr", grpc_addr)];
    addrs.extend(iscsi_addr.map(|a| ("iscsi_addr", a)));
    addrs.extend(migration_addr.map(|a| ("migration_addr", a)));
    addrs.extend(io_addr.map(|a| ("io_addr", a)));
    for (i, (k1, a1)) in addrs.iter().enumerate() {
        if let Some((k2, _)) = addrs[i + 1..].iter().find(|(_, a2)| a2 == a1) {
            return Err(ConfigError::new(
                source,
                format!("keys `{k1}` and `{k2}` both use {a1}"),
            ));
        }
    }
    Ok(Config {
        node_id,
        data_dir,
        grpc_addr,
        iscsi_addr,
        iscsi_allow_no_auth: f.iscsi_allow_no_auth.unwrap_or(false),
        migration_addr,
        io_addr,
        devices: f.devices.clone(),
        // A switch named twice is one switch.
        switches: f.switches.iter().fold(Vec::new(), |mut v, s| {
            if !v.contains(s) {
                v.push(s.clone());
            }
            v
        }),
        join,
        cluster_id,
        log_format,
        snapshot_every_entries,
        iscsi_threads,
        nice,
        qemu,
        accel,
        probe_kernel: f.probe_kernel.clone(),
    })
}

/// Saves the effective configuration into the data directory, durably: a restart depends on
/// it, so it is written to a temporary file, synced, renamed into place and the directory
/// synced.
pub fn save(dir: &Path, f: &FileConfig) -> std::io::Result<()> {
    use std::io::Write;
    let text = toml::to_string(f).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{SAVED_CONFIG}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(tmp, dir.join(SAVED_CONFIG))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("csvd").chain(args.iter().copied()))
    }

    #[test]
    fn test_config_from_flags_alone() {
        let (c, _) = load(&flags(&[
            "--node-id",
            "2",
            "--data-dir",
            "/tmp/x",
            "--grpc-addr",
            "127.0.0.1:7002",
        ]))
        .unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.grpc_addr, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(c.log_format, LogFormat::Human);
    }

    #[test]
    fn test_config_unknown_key_names_line() {
        let err = parse_file("n.toml", "node_id = 1\nbogus = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("n.toml: line 2: unknown key `bogus`"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn test_config_malformed_toml() {
        let err = parse_file("n.toml", "node_id = = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("n.toml: line 1:"), "{err}");
        let err = parse_file("n.toml", "node_id = \"one\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn test_config_rejects_bad_values() {
        let base = FileConfig {
            node_id: Some(1),
            data_dir: Some("/d".into()),
            grpc_addr: Some("127.0.0.1:7001".into()),
            ..Default::default()
        };
        assert!(validate("f", &base).is_ok());
        let cases: Vec<(FileConfig, &str)> = vec![
            (
                FileConfig {
                    node_id: None,
                    ..base.clone()
                },
                "key `node_id` is required",
            ),
            (
                FileConfig {
                    node_id: Some(0),
                    ..base.clone()
                },
                "0 is reserved",
            ),
            (
                FileConfig {
                    grpc_addr: Some("localhost".into()),
                    ..base.clone()
                },
                "`grpc_addr`: \"localhost\" is not an IP:port",
            ),
            (
                FileConfig {
                    iscsi_addr: Some("1.2.3.4:99999".into()),
                    ..base.clone()
                },
                "`iscsi_addr`",
            ),
            (
                FileConfig {
                    join: Some("nowhere".into()),
                    ..base.clone()
                },
                "`join`",
            ),
            (
                FileConfig {
                    cluster_id: Some("abc".into()),
                    ..base.clone()
                },
                "`cluster_id`",
            ),
            (
                FileConfig {
                    log_format: Some("xml".into()),
                    ..base.clone()
                },
                "`log_format`",
            ),
            (
                FileConfig {
                    migration_addr: Some("127.0.0.1:7001".into()),
                    ..base.clone()
                },
                "both use",
            ),
            (
                FileConfig {
                    switches: vec![" ".into()],
                    ..base.clone()
                },
                "`switches`",
            ),
            (
                FileConfig {
                    iscsi_threads: Some(0),
                    ..base.clone()
                },
                "key `iscsi_threads`: 0 is not between 1 and 256",
            ),
            (
                FileConfig {
                    nice: Some(-21),
                    ..base.clone()
                },
                "key `nice`: -21 is not between -20 and 19",
            ),
        ];
        assert_eq!(validate("f", &base).unwrap().nice, DEFAULT_NICE);
        let five = FileConfig {
            nice: Some(5),
            ..base.clone()
        };
        assert_eq!(validate("f", &five).unwrap().nice, 5);
        let threads = validate("f", &base).unwrap().iscsi_threads;
        assert!(
            threads >= 1,
            "one iSCSI thread per CPU by default, got {threads}"
        );
        for (cfg, want) in cases {
            let err = validate("f", &cfg).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn test_config_saved_fills_restart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let (_, eff) = load(&flags(&[
            "--node-id",
            "3",
            "--data-dir",
            d,
            "--grpc-addr",
            "127.0.0.1:7003",
            "--switches",
            "lan",
        ]))
        .unwrap();
        save(dir.path(), &eff).unwrap();
        let (c, _) = load(&flags(&["--data-dir", d])).unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.switches, vec!["lan".to_string()]);
        // Flags still win over the saved file.
        let (c, _) = load(&flags(&["--data-dir", d, "--grpc-addr", "127.0.0.1:7100"])).unwrap();
        assert_eq!(c.grpc_addr.port(), 7100);
    }
}
