//! `migrator volume ...` and `migrator lun ...`: shared volumes and the virtual disks carved
//! from them.

use csvd_raft::ClusterState;
use csvd_raft::api::ClusterClient;
use csvd_raft::command::{Command, Outcome};
use csvd_raft::volume::{
    ChapAuth, DiskRecord, IoMode, VolumeRecord, free_gaps, iscsi_target_name, lun_uuid,
    used_extents,
};
use serde::Serialize;

use crate::cli::{LunCmd, TargetCmd, VolumeCmd};

/// A volume as listed.
#[derive(Debug, Serialize)]
struct VolumeRow<'a> {
    #[serde(flatten)]
    volume: &'a VolumeRecord,
    free_bytes: u64,
    disks: usize,
}

fn volume_row<'a>(state: &ClusterState, v: &'a VolumeRecord) -> VolumeRow<'a> {
    let gaps = free_gaps(v, &used_extents(&state.disks, v));
    VolumeRow {
        volume: v,
        free_bytes: gaps.iter().map(|g| g.1).sum(),
        disks: state.disks.values().filter(|d| d.volume == v.id).count(),
    }
}

fn find_volume<'a>(state: &'a ClusterState, key: &str) -> Result<&'a VolumeRecord, String> {
    state
        .volumes
        .values()
        .find(|v| v.name == key || v.id.to_string() == key)
        .ok_or_else(|| format!("no volume named or with id {key:?}"))
}

pub(crate) fn find_disk<'a>(state: &'a ClusterState, key: &str) -> Result<&'a DiskRecord, String> {
    state
        .disks
        .values()
        .find(|d| d.name == key || d.id.to_string() == key)
        .ok_or_else(|| format!("no LUN named or with id {key:?}"))
}

/// Human-readable bytes in binary units.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.first().map(|r| r.len()).unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a `volume` subcommand.
pub async fn run(
    client: &mut ClusterClient,
    cmd: &VolumeCmd,
    as_json: bool,
) -> Result<String, String> {
    let key = match cmd {
        VolumeCmd::Create {
            device,
            name,
            force,
        } => {
            let id = client
                .create_volume(device, name, *force)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(if as_json {
                json(&serde_json::json!({ "id": id, "name": name, "device": device }))
            } else {
                format!("created volume {name} ({id}) on {device}")
            });
        }
        VolumeCmd::List => None,
        VolumeCmd::Show { volume } => Some(volume),
        VolumeCmd::SetMode { volume, node, mode } => {
            let state = client.state().await.map_err(|e| e.to_string())?;
            let v = find_volume(&state, volume)?;
            let redirected = mode == "redirected";
            client
                .write(Command::SetVolumeMode {
                    volume: v.id,
                    node: *node,
                    redirected,
                })
                .await
                .map_err(|e| e.to_string())?;
            return Ok(if as_json {
                json(&serde_json::json!({ "volume": v.id, "node": node, "mode": mode }))
            } else if redirected {
                format!(
                    "node {node} sends its I/O for volume {} to the coordinator",
                    v.name
                )
            } else {
                format!(
                    "node {node} does direct I/O on volume {} whenever it has a device path",
                    v.name
                )
            });
        }
    };
    let state = client.state().await.map_err(|e| e.to_string())?;
    match key {
        None => {
            let rows: Vec<VolumeRow> = state
                .volumes
                .values()
                .map(|v| volume_row(&state, v))
                .collect();
            if as_json {
                return Ok(json(&rows));
            }
            let mut t = vec![vec![
                "NAME".into(),
                "ID".into(),
                "SIZE".into(),
                "FREE".into(),
                "DISKS".into(),
                "COORDINATOR".into(),
                "NODES".into(),
            ]];
            for r in &rows {
                t.push(vec![
                    r.volume.name.clone(),
                    r.volume.id.to_string(),
                    human(r.volume.device_bytes),
                    human(r.free_bytes),
                    r.disks.to_string(),
                    format!("node {}", r.volume.coordinator),
                    mode_summary(&state, r.volume),
                ]);
            }
            Ok(table(t))
        }
        Some(volume) => {
            let v = find_volume(&state, volume)?;
            let row = volume_row(&state, v);
            let disks: Vec<&DiskRecord> =
                state.disks.values().filter(|d| d.volume == v.id).collect();
            if as_json {
                return Ok(json(&serde_json::json!({ "volume": row, "disks": disks })));
            }
            let mut out = format!(
                "volume       {}\nid           {}\nsize         {}\nfree         {}\ncoordinator  node {}\nepoch        {}\n",
                v.name,
                v.id,
                human(v.device_bytes),
                human(row.free_bytes),
                v.coordinator,
                v.epoch
            );
            let pending = state.pending_bytes(v.id);
            if pending > 0 {
                out.push_str(&format!(
                    "releasing    {} (freed; reusable once every node acknowledges epoch {})\n",
                    human(pending),
                    v.pending_free.iter().map(|p| p.epoch).max().unwrap_or(0)
                ));
            }
            out.push('\n');
            out.push_str(&node_table(&state, v));
            out.push('\n');
            if !disks.is_empty() {
                out.push('\n');
                out.push_str(&disk_table(&disks));
            }
            Ok(out.trim_end().to_string())
        }
    }
}

/// How many nodes are in each I/O mode for the volume, like `2 direct, 1 redirected`; nodes
/// that have not reported count as `unknown`.
fn mode_summary(state: &ClusterState, v: &VolumeRecord) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for id in state.nodes.keys() {
        let kind = match v.nodes.get(id).map(|s| s.mode) {
            Some(IoMode::Direct) => "direct",
            Some(IoMode::Redirected(_)) => "redirected",
            Some(IoMode::Paused(_)) => "paused",
            None => "unknown",
        };
        *counts.entry(kind).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each cluster node's access to the volume, as it last reported it.
fn node_table(state: &ClusterState, v: &VolumeRecord) -> String {
    let mut t = vec![vec![
        "NODE".into(),
        "MODE".into(),
        "EPOCH".into(),
        "PATH".into(),
    ]];
    for id in state.nodes.keys() {
        let role = if *id == v.coordinator {
            " (coordinator)"
        } else {
            ""
        };
        let (mode, epoch, path) = match v.nodes.get(id) {
            Some(s) => (
                s.mode.to_string(),
                s.acked_epoch.to_string(),
                s.path.clone().unwrap_or_else(|| "-".into()),
            ),
            None => ("not reported".into(), "-".into(), "-".into()),
        };
        t.push(vec![format!("{id}{role}"), mode, epoch, path]);
    }
    table(t)
}

fn disk_table(disks: &[&DiskRecord]) -> String {
    let mut t = vec![vec![
        "ID".into(),
        "NAME".into(),
        "SIZE".into(),
        "EXTENTS".into(),
        "WRITES".into(),
    ]];
    for d in disks {
        t.push(vec![
            d.id.to_string(),
            d.name.clone(),
            human(d.size_bytes),
            d.extents.len().to_string(),
            if d.write_protected {
                "protected"
            } else {
                "allowed"
            }
            .into(),
        ]);
    }
    table(t)
}

/// Runs a `lun` subcommand.
pub async fn run_lun(
    client: &mut ClusterClient,
    cmd: &LunCmd,
    as_json: bool,
) -> Result<String, String> {
    let state = client.state().await.map_err(|e| e.to_string())?;
    match cmd {
        LunCmd::Create {
            volume,
            size,
            name,
            allow,
            block_size,
        } => {
            let v = find_volume(&state, volume)?;
            if let Some(bad) = allow.iter().find(|i| !valid_iscsi_name(i)) {
                return Err(format!(
                    "{bad:?} is not an iSCSI name (iqn.…, eui.… or naa.…)"
                ));
            }
            let cmd = Command::CreateDisk {
                name: name.clone(),
                volume: v.id,
                size_bytes: *size,
                block_size: Some(*block_size),
            };
            let (outcome, _) = client.write(cmd).await.map_err(|e| e.to_string())?;
            let Outcome::Created { id } = outcome else {
                return Err(format!("unexpected outcome {outcome:?}"));
            };
            if !allow.is_empty() {
                client
                    .write(Command::SetDiskAccess {
                        id,
                        initiators: allow.clone(),
                    })
                    .await
                    .map_err(|e| {
                        format!("LUN {id} was created, but its access list was not set: {e}")
                    })?;
            }
            // Every node's portal offers the LUN once it has adopted the volume's new epoch:
            // wait for that, briefly, so the LUN answers everywhere when the command returns.
            let waiting = wait_adopted(client, v.id).await;
            Ok(if as_json {
                json(&serde_json::json!({
                    "id": id,
                    "name": name,
                    "volume": v.id,
                    "size_bytes": size,
                    "adopted_everywhere": waiting.as_ref().is_ok_and(|w| w.is_empty()),
                }))
            } else {
                format!(
                    "created LUN {id} ({name}, {}) on volume {}; {}",
                    human(*size),
                    v.name,
                    adoption(&waiting)
                )
            })
        }
        LunCmd::List => {
            let disks: Vec<&DiskRecord> = state.disks.values().collect();
            Ok(if as_json {
                json(&disks)
            } else {
                disk_table(&disks)
            })
        }
        LunCmd::Show { lun } => {
            let d = find_disk(&state, lun)?;
            if as_json {
                return Ok(json(d));
            }
            let mut out = format!(
                "LUN     {}\nname    {}\nvolume  {}\nsize    {} ({}-byte blocks)\naccess  {}\nwrites  {}\n",
                d.id,
                d.name,
                d.volume,
                human(d.size_bytes),
                d.block_size,
                if d.allowed_initiators.is_empty() {
                    "every initiator".to_string()
                } else {
                    d.allowed_initiators.join(", ")
                },
                if d.write_protected {
                    "refused (write-protected)"
                } else {
                    "allowed"
                }
            );
            if let Some(cluster) = state.cluster_id {
                let target = iscsi_target_name(cluster);
                out.push_str(&format!("serial  {}\n\n", lun_uuid(cluster, d.id).simple()));
                let mut t = vec![vec!["NODE".into(), "ISCSI URL".into(), "PATH STATE".into()]];
                let vol = state.volumes.get(&d.volume);
                for (id, n) in &state.nodes {
                    let mode = vol.and_then(|v| v.nodes.get(id)).map(|s| &s.mode);
                    let alua = match mode {
                        Some(IoMode::Direct) => "active/optimized",
                        Some(IoMode::Redirected(_)) => "active/non-optimized",
                        _ => "unavailable",
                    };
                    t.push(vec![
                        id.to_string(),
                        format!("iscsi://{}/{}/{}", n.spec.iscsi_addr, target, d.id),
                        alua.into(),
                    ]);
                }
                out.push_str(&table(t));
                out.push('\n');
            }
            out.push('\n');
            let mut t = vec![vec![
                "DISK OFFSET".into(),
                "DEVICE OFFSET".into(),
                "LENGTH".into(),
            ]];
            for e in &d.extents {
                t.push(vec![
                    e.disk_offset.to_string(),
                    e.device_offset.to_string(),
                    human(e.len),
                ]);
            }
            out.push_str(&table(t));
            Ok(out)
        }
        LunCmd::Allow {
            lun,
            initiators,
            any,
        } => {
            let d = find_disk(&state, lun)?;
            if let Some(bad) = initiators.iter().find(|i| !valid_iscsi_name(i)) {
                return Err(format!(
                    "{bad:?} is not an iSCSI name (iqn.…, eui.… or naa.…)"
                ));
            }
            let list = if *any { Vec::new() } else { initiators.clone() };
            client
                .write(Command::SetDiskAccess {
                    id: d.id,
                    initiators: list.clone(),
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(if as_json {
                json(&serde_json::json!({ "id": d.id, "allowed_initiators": list }))
            } else if list.is_empty() {
                format!("LUN {} ({}) is open to every initiator", d.id, d.name)
            } else {
                format!("LUN {} ({}) is open to {}", d.id, d.name, list.join(", "))
            })
        }
        LunCmd::Protect { lun } | LunCmd::Unprotect { lun } => {
            let on = matches!(cmd, LunCmd::Protect { .. });
            let d = find_disk(&state, lun)?;
            client
                .write(Command::SetDiskWriteProtect { id: d.id, on })
                .await
                .map_err(|e| e.to_string())?;
            // Every node adopts the change behind a barrier of the volume; wait for that,
            // briefly, so the protection holds on every portal when the command returns.
            let waiting = wait_adopted(client, d.volume).await;
            let what = if on { "write-protected" } else { "writable" };
            Ok(if as_json {
                json(&serde_json::json!({
                    "id": d.id,
                    "write_protected": on,
                    "adopted_everywhere": waiting.as_ref().is_ok_and(|w| w.is_empty()),
                }))
            } else if waiting.as_ref().is_ok_and(|w| w.is_empty()) {
                format!("LUN {} ({}) is {what} on every node", d.id, d.name)
            } else {
                format!(
                    "LUN {} ({}) is {what}; {}",
                    d.id,
                    d.name,
                    adoption(&waiting)
                )
            })
        }
        LunCmd::Resize { lun, size } => {
            let d = find_disk(&state, lun)?;
            client
                .write(Command::ResizeDisk {
                    id: d.id,
                    size_bytes: *size,
                })
                .await
                .map_err(|e| e.to_string())?;
            // Each portal reports the new capacity once its node has adopted it.
            let waiting = wait_adopted(client, d.volume).await;
            Ok(if as_json {
                json(&serde_json::json!({
                    "id": d.id,
                    "size_bytes": size,
                    "adopted_everywhere": waiting.as_ref().is_ok_and(|w| w.is_empty()),
                }))
            } else {
                format!(
                    "LUN {} ({}) is now {}; {}",
                    d.id,
                    d.name,
                    human(*size),
                    adoption(&waiting)
                )
            })
        }
        LunCmd::Delete { lun } => {
            let d = find_disk(&state, lun)?;
            client
                .write(Command::DeleteDisk { id: d.id })
                .await
                .map_err(|e| e.to_string())?;
            // The space becomes reusable once every node has adopted the deletion; wait
            // for that, briefly, so a create right after finds it free.
            let waiting = wait_released(client, d).await;
            let released = waiting.as_ref().is_ok_and(|w| w.is_empty());
            Ok(if as_json {
                json(&serde_json::json!({ "deleted": d.id, "space_released": released }))
            } else {
                match waiting {
                    Ok(w) if w.is_empty() => format!("deleted LUN {} ({})", d.id, d.name),
                    Ok(w) => format!(
                        "deleted LUN {} ({}); its space is reusable once node(s) {} acknowledge the change",
                        d.id,
                        d.name,
                        node_list(&w)
                    ),
                    Err(e) => format!(
                        "deleted LUN {} ({}); whether its space is reusable yet is unknown ({e})",
                        d.id, d.name
                    ),
                }
            })
        }
    }
}

/// Node ids as `1, 3`.
fn node_list(nodes: &[u64]) -> String {
    nodes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cluster state, read again while reading fails, until `deadline`.
async fn state_until(
    client: &mut ClusterClient,
    deadline: std::time::Instant,
) -> Result<ClusterState, String> {
    loop {
        match client.state().await {
            Ok(s) => return Ok(s),
            Err(e) if std::time::Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

/// Waits up to 15 s for the deleted disk's extents to be released; returns the nodes that have
/// not acknowledged the deletion yet (empty once released), or why that could not be checked.
async fn wait_released(client: &mut ClusterClient, d: &DiskRecord) -> Result<Vec<u64>, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let state = state_until(client, deadline).await?;
        let Some(v) = state.volumes.get(&d.volume) else {
            return Ok(Vec::new());
        };
        let held: Vec<_> = v
            .pending_free
            .iter()
            .filter(|p| d.extents.contains(&p.extent))
            .collect();
        let Some(epoch) = held.iter().map(|p| p.epoch).max() else {
            return Ok(Vec::new());
        };
        if std::time::Instant::now() > deadline {
            return Ok(behind(&state, v, epoch));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits up to 15 s for every node to acknowledge the volume's current epoch (the barrier
/// behind which it adopts a change); returns the nodes that have not (empty once all have),
/// or why that could not be checked.
async fn wait_adopted(client: &mut ClusterClient, volume: uuid::Uuid) -> Result<Vec<u64>, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut epoch = None;
    loop {
        let state = state_until(client, deadline).await?;
        let Some(v) = state.volumes.get(&volume) else {
            return Err("the volume is gone".into());
        };
        let want = *epoch.get_or_insert(v.epoch);
        let waiting = behind(&state, v, want);
        if waiting.is_empty() || std::time::Instant::now() > deadline {
            return Ok(waiting);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How far a change to a volume got, for the end of a command's message: `on every node`,
/// or which nodes have not adopted it yet.
fn adoption(waiting: &Result<Vec<u64>, String>) -> String {
    match waiting {
        Ok(w) if w.is_empty() => "on every node".into(),
        Ok(w) => format!("node(s) {} have not adopted the change yet", node_list(w)),
        Err(e) => format!("not confirmed on every node ({e})"),
    }
}

/// The cluster's nodes that have not acknowledged `epoch` of volume `v` yet.
fn behind(state: &ClusterState, v: &VolumeRecord, epoch: u64) -> Vec<u64> {
    state
        .nodes
        .keys()
        .filter(|n| v.nodes.get(n).is_none_or(|s| s.acked_epoch < epoch))
        .copied()
        .collect()
}

/// Whether `name` looks like an iSCSI name (RFC 7143 4.2.7): `iqn.`, `eui.` or `naa.`, no
/// spaces, at most 223 bytes.
pub fn valid_iscsi_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa."))
        && name.len() > 4
        && name.len() <= 223
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Runs a `target` subcommand.
pub async fn run_target(
    client: &mut ClusterClient,
    cmd: &TargetCmd,
    as_json: bool,
) -> Result<String, String> {
    let state = client.state().await.map_err(|e| e.to_string())?;
    let cluster = state
        .cluster_id
        .ok_or("the cluster is not initialized yet")?;
    let name = iscsi_target_name(cluster);
    match cmd {
        TargetCmd::Show => {
            let portals: Vec<(u64, String)> = state
                .nodes
                .iter()
                .map(|(id, n)| (*id, n.spec.iscsi_addr.clone()))
                .collect();
            let chap = state.iscsi_chap.as_ref();
            if as_json {
                return Ok(json(&serde_json::json!({
                    "target": name,
                    "portals": portals.iter().map(|(id, a)| serde_json::json!({"node": id, "portal": a, "tpgt": id})).collect::<Vec<_>>(),
                    "chap_user": chap.map(|c| c.user.clone()),
                    "mutual_chap": chap.is_some_and(|c| c.mutual.is_some()),
                })));
            }
            let mut out = format!(
                "target  {name}\nchap    {}\n\n",
                match chap {
                    None => "none".to_string(),
                    Some(c) if c.mutual.is_some() => format!("user {} (mutual)", c.user),
                    Some(c) => format!("user {}", c.user),
                }
            );
            let mut t = vec![vec!["NODE".into(), "PORTAL".into(), "TPG".into()]];
            for (id, a) in portals {
                t.push(vec![id.to_string(), a, id.to_string()]);
            }
            out.push_str(&table(t));
            Ok(out)
        }
        TargetCmd::Chap {
            user,
            secret,
            mutual_user,
            mutual_secret,
            clear,
        } => {
            let chap = if *clear {
                None
            } else {
                let user = user.clone().ok_or("--user is required")?;
                let secret = secret
                    .clone()
                    .ok_or("--secret (or MIGRATOR_CHAP_SECRET) is required")?;
                let mutual = match (mutual_user, mutual_secret) {
                    (Some(u), Some(s)) => Some((u.clone(), s.clone())),
                    (None, None) => None,
                    _ => return Err("--mutual-user and --mutual-secret go together".into()),
                };
                Some(ChapAuth {
                    user,
                    secret,
                    mutual,
                })
            };
            let set = chap.is_some();
            client
                .write(Command::SetIscsiAuth { chap })
                .await
                .map_err(|e| e.to_string())?;
            Ok(if as_json {
                json(&serde_json::json!({ "target": name, "chap": set }))
            } else if set {
                format!("CHAP is now required to log in to {name}")
            } else {
                format!("CHAP credentials removed from {name}")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_size;

    #[test]
    fn test_valid_iscsi_name() {
        assert!(valid_iscsi_name("iqn.2025-11.org.example:host1"));
        assert!(valid_iscsi_name("eui.02004567A425678D"));
        assert!(!valid_iscsi_name("iqn."));
        assert!(!valid_iscsi_name("host1"));
        assert!(!valid_iscsi_name("iqn.2025-11.org.example:has space"));
    }

    #[test]
    fn test_parse_size_units_and_errors() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn test_mode_summary_counts_every_node() {
        use csvd_raft::command::{Command, Request};
        use csvd_raft::state::NodeSpec;
        use csvd_raft::volume::{ALLOCATION_UNIT, RedirectReason};
        let mut s = ClusterState::default();
        let mut apply = |cmd| s.apply(&Request::new(cmd)).unwrap();
        apply(Command::InitCluster {
            cluster_id: uuid::Uuid::from_u128(1),
        });
        for id in 1..=3 {
            apply(Command::RegisterNode {
                spec: NodeSpec {
                    id,
                    grpc_addr: format!("127.0.0.1:{}", 7000 + id),
                    protocol_version: csvd_raft::PROTOCOL_VERSION,
                    ..Default::default()
                },
                now_ms: 1,
            });
        }
        let vol = uuid::Uuid::from_u128(2);
        apply(Command::RegisterVolume {
            id: vol,
            name: "v".into(),
            device_bytes: 4 * ALLOCATION_UNIT,
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            now_ms: 1,
        });
        for (node, mode) in [
            (1, IoMode::Direct),
            (2, IoMode::Redirected(RedirectReason::NoDevicePath)),
        ] {
            apply(Command::ReportVolume {
                volume: vol,
                node,
                mode,
                path: None,
                acked_epoch: 0,
                at_ms: 1,
            });
        }
        assert_eq!(
            mode_summary(&s, &s.volumes[&vol]),
            "1 direct, 1 redirected, 1 unknown"
        );
    }

    #[test]
    fn test_human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
