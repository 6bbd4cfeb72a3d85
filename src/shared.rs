//! The node's shared-volume agent: it keeps csv-fs in step with the cluster.
//!
//! - **follow**: every committed change of the metadata is adopted by csv-fs (layouts,
//!   coordinators, requested modes; each a barrier) and acknowledged at once.
//! - **lease**: every [`RENEW_EVERY`] the node reads the state linearizably, which needs the
//!   Raft quorum; a success renews the I/O lease for [`LEASE`] from when the read began. A node
//!   that cannot reach the quorum stops issuing I/O when its lease ends (`paused(no_quorum)`)
//!   and resumes only after it reaches the quorum again and has adopted the current state.
//! - **devices**: every [`PROBE_EVERY`] the node scans its `devices` globs for superblocks,
//!   attaches volumes it finds, and detaches one whose path stopped answering (it turns
//!   `redirected(no_device_path)`; the next good probe returns it to direct).
//! - **reports**: the node's mode, path and adopted epoch per volume go to Raft when they change.
//! - **coordinator failover** (on the Raft leader): a volume whose coordinator was removed, has
//!   not heartbeated for [`DOWN_AFTER`](csvd_raft::node::DOWN_AFTER), or reports no device path gets a new coordinator among
//!   the nodes that have a path. `DOWN_AFTER` (10 s) is longer than [`LEASE`] (5 s) plus the
//!   heartbeat interval (2 s), so an unreachable coordinator has stopped its own I/O before
//!   another node takes over.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csvd_csv_fs::engine::DirectEngine;
use csvd_csv_fs::node::CsvNode;
use csvd_csv_fs::scan;
use csvd_raft::ClusterState;
use csvd_raft::command::Command;
use csvd_raft::node::{MetaNode, now_ms};
use csvd_raft::volume::IoMode;

/// How long one successful quorum read allows I/O.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often the lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often devices are scanned and probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Queue depth of each device's io_uring.
pub const QUEUE_DEPTH: u32 = 128;

/// The csv-fs node as the daemon runs it.
pub type Shared = CsvNode<DirectEngine>;

/// A csv-fs node that opens devices with the io_uring engine.
pub fn new_node(id: u64) -> Shared {
    CsvNode::new(id, Arc::new(|p| DirectEngine::open(p, QUEUE_DEPTH)))
}

/// Starts the agent's tasks; abort the handles to stop them.
pub fn spawn(
    node: MetaNode,
    csv: Shared,
    devices: Vec<String>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(lease(node.clone(), csv.clone())),
        tokio::spawn(follow_devices_and_reports(node, csv, devices)),
    ]
}

async fn lease(node: MetaNode, csv: Shared) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        tick.tick().await;
        let start = Instant::now();
        match tokio::time::timeout(LEASE, node.read_state()).await {
            Ok(Ok(state)) => {
                csv.apply(&state).await;
                csv.renew_lease(start + LEASE);
                if !held {
                    tracing::info!("reached the quorum: I/O lease held");
                    held = true;
                }
            }
            Ok(Err(e)) if held && csv.fenced() => {
                tracing::warn!(error = %e, "I/O lease expired without quorum: shared-volume I/O paused");
                held = false;
            }
            Err(_) if held && csv.fenced() => {
                tracing::warn!("I/O lease expired without quorum: shared-volume I/O paused");
                held = false;
            }
            _ => {}
        }
    }
}

/// Follows committed changes, and each [`PROBE_EVERY`] probes devices, reports and (on the
/// leader) moves coordinators.
async fn follow_devices_and_reports(node: MetaNode, csv: Shared, globs: Vec<String>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told: HashSet<(PathBuf, String)> = HashSet::new();
    // Views are shared, never copied: each change would otherwise copy the whole state.
    let mut states = node.subscribe();
    let first = states.borrow_and_update().clone();
    csv.apply(&first.state).await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let view = node.local_view();
                probe(&csv, &view.state, &globs, &mut told).await;
                report(&node, &csv, &view.state).await;
                if node.current_leader() == Some(node.id()) {
                    failover(&node, &view.state).await;
                }
            }
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                // Adopt the change and acknowledge it at once: freed space waits for every
                // node's acknowledgement.
                let view = states.borrow_and_update().clone();
                csv.apply(&view.state).await;
                report(&node, &csv, &view.state).await;
            }
        }
    }
}

/// Scans for volumes, attaches the ones found, detaches the ones whose path stopped answering.
async fn probe(
    csv: &Shared,
    state: &ClusterState,
    globs: &[String],
    told: &mut HashSet<(PathBuf, String)>,
) {
    let Some(cluster) = state.cluster_id else {
        return;
    };
    let g = globs.to_vec();
    let Ok(found) = tokio::task::spawn_blocking(move || scan::scan(&g, cluster)).await else {
        return;
    };
    for (path, why) in &found.skipped {
        if told.insert((path.clone(), why.clone())) {
            tracing::info!(path = %path.display(), reason = %why, "device skipped");
        }
    }
    let attached = csv.attached_paths().await;
    for vid in state.volumes.keys() {
        let now = found.found.get(vid).map(|(p, _)| p.clone());
        match (attached.get(vid), now) {
            (Some(have), Some(seen)) if *have == seen => {}
            (Some(have), seen) => {
                let why = found
                    .skipped
                    .iter()
                    .find(|(p, _)| p == have)
                    .map(|(_, w)| format!("{}: {w}", have.display()))
                    .unwrap_or_else(|| format!("{}: no longer holds the volume", have.display()));
                csv.detach(*vid, why).await;
                if let Some(seen) = seen {
                    let _ = csv.attach(*vid, &seen).await;
                }
            }
            (None, Some(seen)) => {
                if let Err(e) = csv.attach(*vid, &seen).await {
                    tracing::warn!(volume = %vid, path = %seen.display(), error = %e, "cannot open the device");
                }
            }
            (None, None) => {}
        }
    }
}

/// Sends this node's mode, path and adopted epoch for each volume that changed.
async fn report(node: &MetaNode, csv: &Shared, state: &ClusterState) {
    if csv.fenced() {
        return; // no quorum to report to
    }
    for r in csv.reports().await {
        let Some(vol) = state.volumes.get(&r.volume) else {
            continue;
        };
        if r.epoch > vol.epoch {
            continue;
        }
        let same = vol
            .nodes
            .get(&node.id())
            .is_some_and(|s| s.mode == r.mode && s.path == r.path && s.acked_epoch == r.epoch);
        if same {
            continue;
        }
        let cmd = Command::ReportVolume {
            volume: r.volume,
            node: node.id(),
            mode: r.mode,
            path: r.path.clone(),
            acked_epoch: r.epoch,
            at_ms: now_ms(),
        };
        match node.write(cmd).await {
            Ok(_) => {
                tracing::debug!(volume = %r.volume, mode = %r.mode, epoch = r.epoch, "reported")
            }
            Err(e) => tracing::debug!(error = %e, "volume report not committed"),
        }
    }
}

/// On the leader: moves the coordinator role off nodes that are gone or have no device path.
async fn failover(node: &MetaNode, state: &ClusterState) {
    let now = now_ms();
    let up = |id: &u64| state.node_up(*id, now);
    for (vid, vol) in &state.volumes {
        let c = vol.coordinator;
        let reason = if !state.nodes.contains_key(&c) {
            "it left the cluster"
        } else if !up(&c) {
            "it stopped heartbeating"
        } else if vol.nodes.get(&c).is_some_and(|s| s.path.is_none()) {
            "it has no path to the device"
        } else {
            continue;
        };
        // The best candidate: up, with a path; direct before user-redirected; lowest id.
        let candidate = vol
            .nodes
            .iter()
            .filter(|(id, s)| **id != c && up(id) && s.path.is_some())
            .min_by_key(|(id, s)| (s.mode != IoMode::Direct, **id))
            .map(|(id, _)| *id);
        let Some(next) = candidate else {
            continue;
        };
        let cmd = Command::SetCoordinator {
            volume: *vid,
            node: next,
            expected: c,
        };
        match node.write(cmd).await {
            Ok(_) => {
                tracing::warn!(volume = %vid, from = c, to = next, reason, "moved the volume's coordinator")
            }
            Err(e) => tracing::warn!(volume = %vid, error = %e, "could not move the coordinator"),
        }
    }
}

/// Binds the block-I/O listener: the configured address, or a free port on `ip`.
pub async fn bind(
    configured: Option<std::net::SocketAddr>,
    ip: std::net::IpAddr,
) -> Result<tokio::net::TcpListener, String> {
    let addr = configured.unwrap_or(std::net::SocketAddr::new(ip, 0));
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on io_addr {addr}: {e}"))
}

/// Whether `path` is matched by one of `globs` (a volume must be findable after a restart).
pub fn matched_by(globs: &[String], path: &std::path::Path) -> bool {
    globs
        .iter()
        .any(|g| glob::Pattern::new(g).is_ok_and(|p| p.matches_path(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_matched_by() {
        let globs = vec!["/dev/disk/by-id/wwn-*".to_string(), "/srv/a.img".into()];
        assert!(matched_by(
            &globs,
            std::path::Path::new("/dev/disk/by-id/wwn-0x5")
        ));
        assert!(matched_by(&globs, std::path::Path::new("/srv/a.img")));
        assert!(!matched_by(&globs, std::path::Path::new("/srv/b.img")));
    }

    #[test]
    fn test_timing_invariant() {
        // A coordinator that lost the quorum stops I/O before another node takes over.
        assert!(LEASE + csvd_raft::node::AGENT_INTERVAL < csvd_raft::node::DOWN_AFTER);
    }
}
