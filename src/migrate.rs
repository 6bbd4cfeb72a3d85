//! A node's part in a live migration (the record and its phases: `csvd_raft::migration`).
//!
//! - As destination: start the VM's QEMU paused, waiting for the incoming state on the
//!   node's migration address, with the same capabilities and parameters as the source; say
//!   `ready`. Once the switchover is committed (the VM is this node's), resume the guest and
//!   end the migration with its total time and downtime.
//! - As source: send the state, reporting progress every second and honouring a cancel; when
//!   QEMU completes (the guest is paused for good here), commit the switchover; then stop
//!   QEMU. If the commit is refused (cancelled meanwhile) or cannot be confirmed, first make
//!   the commit impossible by recording the failure, then resume the guest here.

use std::time::{Duration, Instant};

use csvd_hypervisor::process::Instance;
use csvd_hypervisor::qmp::{MigrationInfo, Qmp, RunState};
use csvd_raft::command::Command;
use csvd_raft::migration::{
    MigrationId, MigrationParams, MigrationPhase, MigrationPolicy, MigrationProgress,
    MigrationRecord,
};
use csvd_raft::node::now_ms;
use csvd_raft::volume::DiskId;
use csvd_raft::{ApplyError, MetaNode};
use serde_json::json;

use crate::shared::Shared;

/// How often the source asks QEMU how the copy goes, besides on each of QEMU's MIGRATION
/// events.
const POLL: Duration = Duration::from_millis(100);
/// How often the source records progress in the cluster state.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// When the source records its first progress (and the phase `copying`).
const FIRST_REPORT: Duration = Duration::from_millis(250);
/// A copy that sends nothing for this long is given up (the migration network is cut, or
/// the destination stopped reading); QEMU alone would wait for TCP to time out. Long
/// enough that a destination starved of CPU for a while is not taken for a cut one.
pub const STALL: Duration = Duration::from_secs(20);
/// Plain pre-copy is given up when this many passes over memory in a row have not left less
/// to send than the best one before them.
const NO_CONVERGENCE_PASSES: u64 = 5;
/// The bandwidth QEMU may use when the operator sets none: no cap worth the name (QEMU's
/// own default is 128 MiB/s).
const UNCAPPED_BYTES_PER_SEC: u64 = 100 << 30;

/// Capabilities and parameters both QEMUs get, from the operator's choices.
pub fn qemu_settings(p: &MigrationParams) -> (serde_json::Value, serde_json::Value) {
    let caps = json!([
        { "capability": "events", "state": true },
        { "capability": "auto-converge", "state": p.policy == MigrationPolicy::AutoConverge },
        { "capability": "postcopy-ram", "state": p.policy == MigrationPolicy::Postcopy },
    ]);
    let params = json!({
        "max-bandwidth": p.bandwidth_mibps.map_or(UNCAPPED_BYTES_PER_SEC, |m| m << 20),
        // Post-copy's background stream too (0: uncapped); the pages the running guest
        // waits for jump the queue either way.
        "max-postcopy-bandwidth": p.bandwidth_mibps.map_or(0, |m| m << 20),
        "downtime-limit": p.downtime_ms,
    });
    (caps, params)
}

/// Gives QEMU the capabilities and parameters of a migration (both sides; the source's while
/// the destination starts).
pub async fn configure(qmp: &Qmp, p: &MigrationParams) -> Result<(), String> {
    let (caps, params) = qemu_settings(p);
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": caps })),
    )
    .await
    .map_err(|e| e.to_string())?;
    qmp.execute("migrate-set-parameters", Some(params))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// How many ports a destination tries, from its node's migration port up. A QEMU keeps its
/// port until its migration ends, so when several migrations arrive at once (a per-node
/// limit above 1) each listens on the next free one.
pub const INCOMING_PORTS: u16 = 32;

/// Held from choosing a port until QEMU listens on it, so that two migrations arriving at
/// once do not both choose the same free port. (QEMU cannot be asked to try another: a
/// failed `migrate-incoming` leaves its incoming side unusable.)
static CHOOSING_PORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The destination's QEMU (started with `-incoming defer -S`) listens on `listen`, the
/// node's migration address, or on the first free port above it; returns the address it
/// listens on (`None` for a quick migration, whose state comes from the shared volume
/// after the switchover: see [`restore_from_volume`]).
pub async fn listen_incoming(
    qmp: &Qmp,
    m: &MigrationRecord,
    listen: &str,
) -> Result<Option<String>, String> {
    configure(qmp, &m.params).await?;
    if m.params.policy == MigrationPolicy::Quick {
        return Ok(None);
    }
    listen_on_free_port(qmp, listen, "migrate-incoming")
        .await
        .map(Some)
}

/// Has QEMU listen for a migration stream with `command` (`migrate-incoming`, or
/// `migrate-recover` for a resumed post-copy stream) on `listen` or the first free port
/// above it; returns the address.
async fn listen_on_free_port(qmp: &Qmp, listen: &str, command: &str) -> Result<String, String> {
    let _choosing = CHOOSING_PORT.lock().await;
    let addr = free_incoming_addr(listen)?;
    qmp.execute(command, Some(json!({ "uri": format!("tcp:{addr}") })))
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(addr)
}

/// `listen`, or the first port above it (of [`INCOMING_PORTS`]) that nothing listens on.
fn free_incoming_addr(listen: &str) -> Result<String, String> {
    let Ok(base) = listen.parse::<std::net::SocketAddr>() else {
        return Ok(listen.to_string());
    };
    let candidates =
        (0..INCOMING_PORTS).filter_map(|k| base.port().checked_add(k).map(|p| (base.ip(), p)));
    for addr in candidates.map(std::net::SocketAddr::from) {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => return Ok(addr.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
    Err(format!(
        "cannot listen for the migration: {listen} and the {} ports above it are all in use",
        INCOMING_PORTS - 1
    ))
}

/// Writes `cmd`, retrying while the cluster has no leader; `Err(Some(e))` when the state
/// machine refused it, `Err(None)` when the outcome is unknown.
pub async fn write(node: &MetaNode, cmd: Command) -> Result<(), Option<ApplyError>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match node.write(cmd.clone()).await {
            Ok(_) => return Ok(()),
            Err(csvd_raft::node::NodeError::Rejected(e)) => return Err(Some(e)),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, cmd = cmd.name(), "migration step not recorded yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, cmd = cmd.name(), "migration step not recorded");
                return Err(None);
            }
        }
    }
}

/// Ends migration `id` before its switchover, with `phase` and `error`.
pub async fn give_up(
    node: &MetaNode,
    id: MigrationId,
    phase: MigrationPhase,
    error: Option<String>,
) -> Result<(), Option<ApplyError>> {
    write(
        node,
        Command::FinishMigration {
            id,
            phase,
            error,
            total_ms: None,
            downtime_ms: None,
            now_ms: now_ms(),
            committed: false,
        },
    )
    .await
}

fn progress(info: &MigrationInfo, elapsed: Duration) -> MigrationProgress {
    let ram = info.ram.clone().unwrap_or_default();
    MigrationProgress {
        transferred_bytes: ram.transferred,
        remaining_bytes: ram.remaining,
        total_bytes: ram.total,
        dirty_pages_rate: ram.dirty_pages_rate,
        page_size: ram.page_size,
        bytes_per_sec: (ram.mbps * 1e6 / 8.0) as u64,
        expected_downtime_ms: info.expected_downtime.unwrap_or(0),
        iterations: ram.dirty_sync_count,
        elapsed_ms: elapsed.as_millis() as u64,
    }
}

/// Waits for QEMU's next MIGRATION event (or forever once the connection is gone).
pub async fn migration_event(
    events: &mut tokio::sync::broadcast::Receiver<csvd_hypervisor::qmp::QmpEvent>,
) {
    event(events, &["MIGRATION"]).await
}

/// Waits for QEMU's next event named one of `names` (or forever once the connection is
/// gone).
async fn event(
    events: &mut tokio::sync::broadcast::Receiver<csvd_hypervisor::qmp::QmpEvent>,
    names: &[&str],
) {
    loop {
        match events.recv().await {
            Ok(e) if names.contains(&e.name.as_str()) => return,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// How the source's part ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEnd {
    /// The VM is the destination's; this QEMU was stopped.
    Moved,
    /// The VM stays (and runs) here.
    Stayed,
}

/// On the Raft leader, every [`csvd_raft::node::AGENT_INTERVAL`]: ends as failed each
/// migration stranded by a node that went down before the switchover (see
/// [`csvd_raft::ClusterState::stranded_migrations`]). Its source, if up, sees the failure,
/// cancels the copy and resumes the guest; a destination that comes back stops its QEMU.
/// Without this a migration whose other node died would hold both nodes' migration slots,
/// and its VM, for good (a saved-state disk with them).
pub fn spawn_watchdog(node: MetaNode) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(csvd_raft::node::AGENT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if node.current_leader() != Some(node.id()) {
                continue;
            }
            let now = now_ms();
            let stranded = node.local_view().state.stranded_migrations(now);
            for (id, why) in stranded {
                tracing::warn!(migration = id, reason = %why, "ending a stranded migration");
                match give_up(&node, id, MigrationPhase::Failed, Some(why)).await {
                    Ok(()) | Err(Some(_)) => {}
                    Err(None) => break,
                }
            }
        }
    })
}

/// Resumes the guest here if QEMU paused it (after a completed copy whose switchover did not
/// happen), unless the VM was paused before its migration `m`: then it stays so.
async fn resume_here(inst: &Instance, m: &MigrationRecord) {
    if m.paused {
        return;
    }
    if let Ok(state) = inst.qmp.query_status().await
        && state != RunState::Running
        && let Err(e) = inst.qmp.cont().await
    {
        tracing::error!(error = %e, "cannot resume the guest on the source");
    }
}

/// The run directory of `inst` (its sockets live there).
fn run_dir(inst: &Instance) -> std::path::PathBuf {
    inst.paths
        .qmp
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// The saved-state disk of quick migration `m` and its size.
fn state_disk(node: &MetaNode, m: &MigrationRecord) -> Result<(DiskId, u64), String> {
    let disk = m
        .state_disk
        .ok_or("the migration has no saved-state disk")?;
    let size = node
        .local_view()
        .state
        .disks
        .get(&disk)
        .map(|d| d.size_bytes)
        .ok_or_else(|| format!("the saved-state disk {disk} is gone"))?;
    Ok((disk, size))
}

/// Starts saving the (paused) guest of quick migration `m` into its disk on the shared
/// volume: returns the URI for QEMU's `migrate` and the task that copies the stream.
fn start_saving(
    node: &MetaNode,
    csv: &Shared,
    inst: &Instance,
    m: &MigrationRecord,
) -> Result<(String, tokio::task::JoinHandle<Result<u64, String>>), String> {
    let (disk, size) = state_disk(node, m)?;
    let sock = run_dir(inst).join("save.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    let (csv, id) = (csv.clone(), m.id);
    let task = tokio::spawn(async move {
        let accepted = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await;
        let _ = std::fs::remove_file(&sock);
        let (stream, _) = accepted
            .map_err(|_| "QEMU did not connect to save the guest".to_string())?
            .map_err(|e| format!("accepting QEMU's saved state: {e}"))?;
        crate::saved_state::save(&csv, disk, size, id, stream).await
    });
    Ok((
        format!("unix:{}", run_dir(inst).join("save.sock").display()),
        task,
    ))
}

/// The destination's part of a quick migration after the switchover: QEMU (waiting with
/// `-incoming defer`) loads the guest that the source saved on the shared volume.
pub async fn restore_from_volume(
    node: &MetaNode,
    csv: &Shared,
    inst: &Instance,
    m: &MigrationRecord,
) -> Result<(), String> {
    let (disk, size) = state_disk(node, m)?;
    let sock = run_dir(inst).join("restore.sock");
    let _ = std::fs::remove_file(&sock);
    inst.qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", sock.display()) })),
        )
        .await
        .map_err(|e| format!("QEMU cannot take the saved state: {e}"))?;
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| format!("cannot reach QEMU at {}: {e}", sock.display()))?;
    let bytes = crate::saved_state::restore(csv, disk, size, m.id, stream).await?;
    tracing::info!(
        migration = m.id,
        bytes,
        "restored the guest from the shared volume"
    );
    Ok(())
}

/// Whether `inst`'s QEMU is sending (or has sent) migration `m` already: its migration
/// status, if so. Asked by a restarted daemon, which cannot know whether the earlier one
/// began the copy. A QEMU keeps the status of its last outgoing migration, so an earlier
/// attempt's end must not pass for this one's: a completed copy whose guest runs again
/// was an earlier attempt (whose switchover was refused); a failed or cancelled one counts
/// as this one's only once the record says the copy began.
async fn under_way(inst: &Instance, m: &MigrationRecord) -> Option<String> {
    let status = inst.qmp.query_migrate().await.ok()?.status?;
    let ours = match status.as_str() {
        "completed" => inst
            .qmp
            .query_status()
            .await
            .is_ok_and(|s| s != RunState::Running),
        "failed" | "cancelled" => m.phase == MigrationPhase::Copying,
        "none" => false,
        _ => true,
    };
    ours.then_some(status)
}

/// Runs the source's part of migration `m` (which is `ready` or `copying`) on `inst`.
pub async fn drive_source(
    node: MetaNode,
    csv: Shared,
    inst: Instance,
    m: MigrationRecord,
    dest_addr: String,
    configured: Option<tokio::task::JoinHandle<Result<(), String>>>,
) -> SourceEnd {
    let id = m.id;
    let fail = |why: String| {
        let node = node.clone();
        async move {
            tracing::warn!(migration = id, error = %why, "migration failed");
            let _ = give_up(&node, id, MigrationPhase::Failed, Some(why)).await;
        }
    };
    let started = Instant::now();
    // A quick migration's copy of the stream into the shared volume.
    let mut saving: Option<tokio::task::JoinHandle<Result<u64, String>>> = None;
    // A migration this daemon saw being prepared has not been sent yet (`configured`);
    // otherwise (this daemon restarted) QEMU tells whether it was.
    let under_way = if configured.is_some() {
        None
    } else {
        under_way(&inst, &m).await
    };
    if let Some(status) = under_way {
        // This daemon restarted while its QEMU was sending: take up where it stands.
        if m.params.policy == MigrationPolicy::Quick {
            // The copy onto the volume died with the earlier daemon: the saved state is not
            // known to be whole, so the guest stays here.
            if status != "completed" {
                let _ = inst.qmp.execute("migrate_cancel", None).await;
            }
            resume_here(&inst, &m).await;
            fail("source: the daemon restarted while saving the guest".into()).await;
            return SourceEnd::Stayed;
        }
        tracing::info!(migration = id, %status, "taking up a migration under way");
    } else if m.phase == MigrationPhase::Copying {
        resume_here(&inst, &m).await;
        fail("source: QEMU is not sending, though the copy began".into()).await;
        return SourceEnd::Stayed;
    } else {
        // Given while the destination started, else now.
        let done = match configured {
            Some(task) => matches!(task.await, Ok(Ok(()))),
            None => false,
        };
        if !done && let Err(e) = configure(&inst.qmp, &m.params).await {
            fail(format!("source: {e}")).await;
            return SourceEnd::Stayed;
        }
        let uri = if m.params.policy == MigrationPolicy::Quick {
            // The guest stands still from here on; its state goes to the shared volume.
            if let Err(e) = inst.qmp.stop().await {
                fail(format!("source: cannot pause the guest: {e}")).await;
                return SourceEnd::Stayed;
            }
            match start_saving(&node, &csv, &inst, &m) {
                Ok((uri, task)) => {
                    saving = Some(task);
                    uri
                }
                Err(e) => {
                    resume_here(&inst, &m).await;
                    fail(format!("source: {e}")).await;
                    return SourceEnd::Stayed;
                }
            }
        } else {
            format!("tcp:{dest_addr}")
        };
        if let Err(e) = inst
            .qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .await
        {
            if let Some(t) = saving.take() {
                t.abort();
            }
            resume_here(&inst, &m).await;
            fail(format!("source: cannot send to {uri}: {e}")).await;
            return SourceEnd::Stayed;
        }
    }
    // The first progress report also records the phase `copying`; a copy done before it
    // needs no command until the switchover.
    let mut next_report = Instant::now() + FIRST_REPORT;
    let mut events = inst.qmp.events();
    let mut cancelling = false;
    // Why this node cancelled the copy itself, when it did.
    let mut stalled: Option<String> = None;
    let mut last_sent = (0u64, Instant::now());
    let postcopy = m.params.policy == MigrationPolicy::Postcopy;
    // Plain pre-copy: the least memory left at the start of a pass so far, and at which
    // pass; and the last pass seen.
    let mut least_left: Option<(u64, u64)> = None;
    let mut pass_seen = 0u64;
    let info = loop {
        // QEMU announces each change of the migration's status (the `events` capability):
        // the end of the copy is seen at once, not at the next poll.
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = migration_event(&mut events) => {}
        }
        let info = match inst.qmp.query_migrate().await {
            Ok(i) => i,
            Err(e) => {
                // QEMU is gone: the guest is gone with it; the crash handling takes over.
                fail(format!("source QEMU: {e}")).await;
                return SourceEnd::Stayed;
            }
        };
        match info.status.as_deref() {
            Some("completed") => break info,
            // Post-copy: after the first pass over memory the guest leaves the source. It is
            // paused here first, so that the switchover is committed before it runs there.
            Some("active")
                if postcopy
                    && !cancelling
                    && info.ram.as_ref().is_some_and(|r| r.dirty_sync_count >= 2) =>
            {
                if let Err(e) = inst.qmp.stop().await {
                    fail(format!("source: cannot pause the guest: {e}")).await;
                    let _ = inst.qmp.execute("migrate_cancel", None).await;
                    return SourceEnd::Stayed;
                }
                break info;
            }
            Some("failed") => {
                let why = info
                    .error_desc
                    .clone()
                    .unwrap_or_else(|| "QEMU reported a failure".into());
                if let Some(t) = saving.take() {
                    t.abort();
                }
                resume_here(&inst, &m).await;
                fail(format!("copy failed: {why}")).await;
                return SourceEnd::Stayed;
            }
            Some("cancelled") => {
                if let Some(t) = saving.take() {
                    t.abort();
                }
                resume_here(&inst, &m).await;
                match stalled {
                    Some(why) => fail(why).await,
                    None => {
                        let _ = give_up(&node, id, MigrationPhase::Cancelled, None).await;
                    }
                }
                return SourceEnd::Stayed;
            }
            _ => {}
        }
        // Plain pre-copy of a guest that rewrites its memory faster than it is sent never
        // ends: once passes no longer leave less to send, it is given up, the guest still
        // running here, with a word on the policies that move such a guest.
        if let Some(ram) = info.ram.as_ref()
            && m.params.policy == MigrationPolicy::Precopy
            && !cancelling
            && ram.dirty_sync_count >= 2
            && ram.dirty_sync_count != pass_seen
        {
            // Shortly after the pass began, what is left is about what the last one found
            // dirty; only a clear gain (a tenth) counts as progress.
            pass_seen = ram.dirty_sync_count;
            match least_left {
                Some((least, _)) if ram.remaining >= least - least / 10 => {}
                _ => least_left = Some((ram.remaining, ram.dirty_sync_count)),
            }
            if let Some((least, at)) = least_left
                && ram.dirty_sync_count >= at + NO_CONVERGENCE_PASSES
            {
                cancelling = true;
                let why = format!(
                    "pre-copy does not converge: after {} passes {} MiB are still left to send \
                     (the guest dirties {} MiB/s; {:.0} MiB/s sent); --policy auto-converge or \
                     postcopy moves a guest this busy",
                    ram.dirty_sync_count,
                    least >> 20,
                    (ram.dirty_pages_rate * ram.page_size) >> 20,
                    ram.mbps / 8.0 / 1.048576
                );
                tracing::warn!(migration = id, "{why}; cancelling the copy");
                // Recorded first: the destination's QEMU ends with the stream, and its own
                // report of that must not stand for the reason.
                fail(why.clone()).await;
                stalled = Some(why);
                let _ = inst.qmp.execute("migrate_cancel", None).await;
            }
        }
        let sent = info.ram.as_ref().map_or(0, |r| r.transferred);
        if sent != last_sent.0 {
            last_sent = (sent, Instant::now());
        } else if !cancelling && last_sent.1.elapsed() >= STALL {
            cancelling = true;
            let why = if m.params.policy == MigrationPolicy::Quick {
                format!(
                    "the copy stalled: nothing saved to the shared volume for {} s",
                    STALL.as_secs()
                )
            } else {
                format!(
                    "the copy stalled: nothing sent to {dest_addr} for {} s (migration network cut?)",
                    STALL.as_secs()
                )
            };
            tracing::warn!(migration = id, "{why}; cancelling the copy");
            fail(why.clone()).await;
            stalled = Some(why);
            let _ = inst.qmp.execute("migrate_cancel", None).await;
        }
        let record = node.local_view().state.migrations.get(&id).cloned();
        if !cancelling
            && record
                .as_ref()
                .is_none_or(|r| r.cancel_requested || r.phase.is_terminal())
        {
            cancelling = true;
            tracing::info!(migration = id, "cancelling the copy");
            let _ = inst.qmp.execute("migrate_cancel", None).await;
        }
        if Instant::now() >= next_report {
            next_report = Instant::now() + REPORT_EVERY;
            let p = progress(&info, started.elapsed());
            let node = node.clone();
            tokio::spawn(async move {
                let _ = node
                    .write(Command::ReportMigration { id, progress: p })
                    .await;
            });
        }
    };
    // A quick migration's state must be on the volume, whole, before the switchover.
    if let Some(t) = saving.take() {
        match t.await {
            Ok(Ok(bytes)) => {
                tracing::info!(
                    migration = id,
                    bytes,
                    "saved the guest to the shared volume"
                )
            }
            Ok(Err(e)) => {
                resume_here(&inst, &m).await;
                fail(format!("source: {e}")).await;
                return SourceEnd::Stayed;
            }
            Err(e) => {
                resume_here(&inst, &m).await;
                fail(format!("source: saving the guest ended: {e}")).await;
                return SourceEnd::Stayed;
            }
        }
    }
    // QEMU completed, or (post-copy) the guest was paused for the switch: the guest is
    // paused here for good unless the switchover fails.
    let switchover_at = now_ms();
    let completed = info.status.as_deref() == Some("completed");
    tracing::info!(
        migration = id,
        completed,
        qemu_total_ms = info.total_time,
        qemu_setup_ms = info.setup_time,
        qemu_downtime_ms = info.downtime,
        passes = info.ram.as_ref().map(|r| r.dirty_sync_count),
        sent_bytes = info.ram.as_ref().map(|r| r.transferred),
        "copy done: committing the switchover"
    );
    let commit = write(
        &node,
        Command::CommitMigration {
            id,
            // A quick migration's guest stood still from the start of the copy.
            qemu_downtime_ms: match m.params.policy {
                MigrationPolicy::Quick => started.elapsed().as_millis() as u64,
                // Paused just now; the destination counts the rest.
                _ if !completed => 0,
                _ => info.downtime.unwrap_or(0),
            },
            switchover_at_ms: switchover_at,
        },
    )
    .await;
    let moved = match commit {
        Ok(()) => true,
        Err(refused) => {
            // Make the switchover impossible before resuming here: whichever of the commit
            // and this failure the log holds first wins.
            let why = match &refused {
                Some(e) => format!("switchover refused: {e}"),
                None => "switchover could not be confirmed".to_string(),
            };
            let cancelled = node
                .local_view()
                .state
                .migrations
                .get(&id)
                .is_some_and(|r| r.cancel_requested);
            let (phase, error) = if cancelled {
                (MigrationPhase::Cancelled, None)
            } else {
                (MigrationPhase::Failed, Some(why))
            };
            match give_up(&node, id, phase, error).await {
                Ok(()) => false,
                // Refused because the commit came first: the VM has moved.
                Err(Some(_)) => node
                    .local_view()
                    .state
                    .migrations
                    .get(&id)
                    .is_some_and(|r| {
                        r.phase >= MigrationPhase::Committed
                            && r.phase != MigrationPhase::Failed
                            && r.phase != MigrationPhase::Cancelled
                    }),
                // Unknown: keep the guest paused (never two runners); an operator decides.
                Err(None) => {
                    tracing::error!(
                        migration = id,
                        "neither the switchover nor its failure could be recorded: the guest stays paused on the source"
                    );
                    return SourceEnd::Stayed;
                }
            }
        }
    };
    if moved && !completed {
        finish_postcopy(&node, &inst, id).await;
    }
    if moved {
        tracing::info!(
            migration = id,
            total_ms = started.elapsed().as_millis() as u64,
            "switched over: stopping the source QEMU"
        );
        // This node's view must show the new owner before its QEMU ends, or the end would
        // look like a crash of a VM this node still owns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while node
            .local_view()
            .state
            .vms
            .get(&m.vm)
            .is_some_and(|v| v.owner == m.source)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if inst.qmp.quit().await.is_err() || !inst.wait_exit(Duration::from_secs(10)).await {
            inst.kill().await;
        }
        SourceEnd::Moved
    } else {
        if !completed {
            let _ = inst.qmp.execute("migrate_cancel", None).await;
        }
        resume_here(&inst, &m).await;
        SourceEnd::Stayed
    }
}

/// Post-copy: a stream that sent nothing for this long while pages remain is broken (a cut
/// network tells neither QEMU anything): it is paused and resumed on a new connection.
const POSTCOPY_STALL: Duration = Duration::from_secs(5);

/// Post-copy: how long the source tries to resume a broken stream before it gives up and the
/// destination restarts the guest from its disk.
const RECOVERY_WINDOW: Duration = Duration::from_secs(60);

/// How long after starting to resume a stream the source waits before it counts a paused
/// stream as broken again.
const RESUME_GRACE: Duration = Duration::from_secs(2);

/// How long resuming a post-copy stream may take before the source tries afresh.
const RESUME_STUCK: Duration = Duration::from_secs(5);

/// After a post-copy switchover is committed: lets the guest go to the destination and
/// serves the pages it still lacks until QEMU has sent them all.
///
/// When the stream breaks (QEMU says so, or nothing is sent for [`POSTCOPY_STALL`]) the
/// source pauses it and records the break; the destination pauses its side too, listens
/// afresh and records where ([`Command::RecoverPostcopy`]); the source resumes the stream
/// there, and QEMU sends the pages still missing. Both guests' memory stays whole: the one
/// on the destination just waits for the pages it touches meanwhile. After
/// [`RECOVERY_WINDOW`] without success the source gives up.
async fn finish_postcopy(node: &MetaNode, inst: &Instance, id: MigrationId) {
    match inst.qmp.execute("migrate-start-postcopy", None).await {
        Ok(_) => tracing::info!(
            migration = id,
            "post-copy: the guest runs on the destination"
        ),
        // The paused guest's last pass may have completed the copy meanwhile.
        Err(e) => tracing::info!(migration = id, error = %e, "post-copy not started"),
    }
    let mut events = inst.qmp.events();
    let mut last_sent = (0u64, Instant::now());
    let mut broken_since: Option<Instant> = None;
    // The break whose stream this node last resumed, and when.
    let mut resumed: Option<(u32, Instant)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = migration_event(&mut events) => {}
        }
        let info = match inst.qmp.query_migrate().await {
            Ok(info) => info,
            Err(e) => {
                tracing::error!(migration = id, error = %e, "the source QEMU ended during post-copy");
                return;
            }
        };
        // A stream broken for longer than the window (paused, or being resumed): give up.
        if broken_since.is_some_and(|t| t.elapsed() >= RECOVERY_WINDOW)
            && info.status.as_deref() != Some("completed")
        {
            tracing::error!(
                migration = id,
                "post-copy: the stream could not be resumed within {} s: giving up; the destination restarts the guest",
                RECOVERY_WINDOW.as_secs()
            );
            return;
        }
        match info.status.as_deref().unwrap_or("") {
            "completed" => {
                if broken_since.is_some() || resumed.is_some() {
                    tracing::info!(
                        migration = id,
                        "post-copy: every page sent after the stream was resumed"
                    );
                }
                return;
            }
            s @ ("failed" | "cancelled") => {
                tracing::error!(
                    migration = id,
                    status = %s,
                    "post-copy broke off before the last page was sent: the destination restarts the guest"
                );
                return;
            }
            "postcopy-active" => {
                let sent = info.ram.as_ref().map_or(0, |r| r.transferred);
                if sent != last_sent.0 {
                    last_sent = (sent, Instant::now());
                    broken_since = None;
                } else if last_sent.1.elapsed() >= POSTCOPY_STALL {
                    tracing::warn!(
                        migration = id,
                        "post-copy: nothing sent for {} s: pausing the stream to resume it on a new connection",
                        POSTCOPY_STALL.as_secs()
                    );
                    let _ = inst.qmp.execute("migrate-pause", None).await;
                    last_sent.1 = Instant::now();
                }
            }
            "postcopy-paused" => {
                broken_since.get_or_insert_with(Instant::now);
                let recovery = node
                    .local_view()
                    .state
                    .migrations
                    .get(&id)
                    .and_then(|m| m.recovery.clone());
                let current = recovery.as_ref().map_or(0, |r| r.attempt);
                let listening = recovery.and_then(|r| r.listen);
                match (listening, resumed) {
                    // The destination listens for this break's stream: resume it there.
                    (Some(addr), r) if r.is_none_or(|(a, _)| a != current) => {
                        resumed = Some((current, Instant::now()));
                        tracing::info!(migration = id, to = %addr, attempt = current, "post-copy: resuming the stream");
                        let uri = format!("tcp:{addr}");
                        if let Err(e) = inst
                            .qmp
                            .execute("migrate", Some(json!({ "uri": uri, "resume": true })))
                            .await
                        {
                            tracing::warn!(migration = id, error = %e, "post-copy: the stream cannot be resumed yet");
                        }
                    }
                    // A break not recorded yet: the first, or the resumed stream broke again.
                    (None, None) if current == 0 => {
                        announce_break(node, id, 1).await;
                    }
                    (Some(_), Some((a, at))) if a == current && at.elapsed() >= RESUME_GRACE => {
                        announce_break(node, id, current + 1).await;
                    }
                    // Waiting for the destination to listen.
                    _ => {}
                }
            }
            // The stream is being resumed: connecting (`postcopy-recover-setup`: a network
            // still cut leaves TCP trying for two minutes, and the connection comes up on
            // its first try after the network is back), then the handshake, which QEMU can
            // be told to give up when it hangs. Both count against the window above.
            "postcopy-recover" => {
                if let Some((attempt, at)) = resumed
                    && at.elapsed() >= RESUME_STUCK
                {
                    tracing::warn!(
                        migration = id,
                        "post-copy: the resumed stream hangs; trying again"
                    );
                    let _ = inst.qmp.execute("migrate-pause", None).await;
                    // Counted as broken again once paused, but not kicked again at once.
                    let now = Instant::now();
                    resumed = Some((attempt, now.checked_sub(RESUME_GRACE).unwrap_or(now)));
                }
            }
            _ => {}
        }
    }
}

/// Records break `attempt` of a post-copy stream, for the destination to listen afresh.
async fn announce_break(node: &MetaNode, id: MigrationId, attempt: u32) {
    tracing::warn!(
        migration = id,
        attempt,
        "post-copy: the stream broke; asking the destination to listen again"
    );
    if let Err(e) = write(
        node,
        Command::RecoverPostcopy {
            id,
            attempt,
            listen: None,
            now_ms: now_ms(),
        },
    )
    .await
    {
        tracing::warn!(migration = id, error = ?e, "post-copy: the break was not recorded");
    }
}

/// The destination's part after the commit: resumes the guest, says it runs (with
/// `report`, once QEMU runs it), waits for a post-copy's last page, and ends the migration
/// with its total time and downtime. A VM that was paused before it moved is only waited
/// for until its state is loaded, and `report` then says it is paused. An error means the
/// guest cannot run here from the state it received; the caller ends the migration as
/// failed.
pub async fn resume_destination(
    node: &MetaNode,
    inst: &Instance,
    m: &MigrationRecord,
    report: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let qmp = &inst.qmp;
    let mut events = qmp.events();
    // While the state still loads, `cont` only tells QEMU to run the guest once it has.
    if !m.paused {
        qmp.cont()
            .await
            .map_err(|e| format!("cannot resume the guest: {e}"))?;
    }
    let deadline = Instant::now() + RESUME_TIMEOUT;
    let mut first = true;
    loop {
        // QEMU announces the guest's start (RESUME) and the end of the load (MIGRATION);
        // the poll is the fallback.
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = event(&mut events, &["RESUME", "MIGRATION"]) => {}
            }
        }
        match qmp.query_status().await {
            Ok(RunState::Running) if !m.paused => break,
            // Loaded, and paused as it was on the source.
            Ok(RunState::Paused) if m.paused => break,
            // Loaded but paused: QEMU gives the guest the run state it had on the source, and
            // a quick migration's guest was saved paused, whatever `cont` said meanwhile.
            Ok(RunState::Paused) if Instant::now() < deadline => {
                tracing::info!(
                    migration = m.id,
                    "the guest is loaded but paused: resuming it"
                );
                qmp.cont()
                    .await
                    .map_err(|e| format!("cannot resume the guest: {e}"))?;
            }
            Ok(_) if Instant::now() < deadline => {}
            Ok(state) => {
                return Err(format!(
                    "the guest did not {} within {} s of the switchover (QEMU: {state:?})",
                    if m.paused { "load" } else { "run" },
                    RESUME_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("QEMU ended before the guest ran: {e}")),
        }
    }
    let resumed = now_ms();
    report.await;
    // The migration's total ends with the guest running here, or with a post-copy's last page.
    let mut ended = resumed;
    if m.params.policy == MigrationPolicy::Postcopy {
        wait_last_page(node, inst, m).await?;
        ended = now_ms();
    }
    let qemu = m.qemu_downtime_ms.unwrap_or(0);
    // From the source's pause to the guest running here: QEMU's own downtime, plus the
    // commit and resume that followed the source's completion (node clocks are assumed to
    // agree, as NTP keeps them). A paused guest has none: it did not run before either.
    let downtime = (!m.paused).then(|| {
        qemu + m
            .switchover_at_ms
            .map_or(0, |at| resumed.saturating_sub(at))
    });
    let now = now_ms();
    let total = m.started_at_ms.map(|s| ended.saturating_sub(s));
    let _ = write(
        node,
        Command::FinishMigration {
            id: m.id,
            phase: MigrationPhase::Completed,
            error: None,
            total_ms: total,
            downtime_ms: downtime,
            now_ms: now,
            committed: true,
        },
    )
    .await;
    Ok(())
}

/// How long the destination waits for its guest to run after the commit.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);

/// How much longer than the source the destination waits for a broken post-copy stream to
/// be resumed, so that it never gives up on a stream the source still resumes.
const RECOVERY_SLACK: Duration = Duration::from_secs(15);

/// Waits until a post-copy destination has every page of the guest's memory. A stream that
/// breaks is resumed (see [`finish_postcopy`]): when the source records a break, this side
/// pauses its end, listens afresh on a free migration port and records where.
async fn wait_last_page(
    node: &MetaNode,
    inst: &Instance,
    m: &MigrationRecord,
) -> Result<(), String> {
    let mut events = inst.qmp.events();
    // The break whose resumed stream this node listens for.
    let mut answered = 0u32;
    let mut broken_since: Option<Instant> = None;
    loop {
        let status = match inst.qmp.query_migrate().await {
            Ok(info) => info.status,
            Err(e) => return Err(format!("QEMU ended during post-copy: {e}")),
        };
        match status.as_deref() {
            Some("completed") | None => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                return Err(format!(
                    "post-copy broke off ({s}) before every page arrived from the source"
                ));
            }
            Some(s) => {
                if s == "postcopy-active" {
                    broken_since = None;
                } else if broken_since.get_or_insert_with(Instant::now).elapsed()
                    >= RECOVERY_WINDOW + RECOVERY_SLACK
                {
                    return Err(format!(
                        "post-copy broke off ({s}) and was not resumed within {} s",
                        (RECOVERY_WINDOW + RECOVERY_SLACK).as_secs()
                    ));
                }
                let view = node.local_view();
                let asked = view
                    .state
                    .migrations
                    .get(&m.id)
                    .and_then(|r| r.recovery.as_ref())
                    .map_or(0, |r| r.attempt);
                if asked > answered {
                    match s {
                        // The source saw the stream break; a cut network may not have told
                        // this side.
                        "postcopy-active" => {
                            tracing::warn!(
                                migration = m.id,
                                "post-copy: the source reports the stream broken: pausing this end"
                            );
                            let _ = inst.qmp.execute("migrate-pause", None).await;
                        }
                        "postcopy-paused" => {
                            let base = view
                                .state
                                .nodes
                                .get(&node.id())
                                .map(|n| n.spec.migration_addr.clone())
                                .unwrap_or_default();
                            match listen_on_free_port(&inst.qmp, &base, "migrate-recover").await {
                                Ok(addr) => {
                                    answered = asked;
                                    tracing::info!(migration = m.id, %addr, attempt = asked, "post-copy: listening for the resumed stream");
                                    let _ = write(
                                        node,
                                        Command::RecoverPostcopy {
                                            id: m.id,
                                            attempt: asked,
                                            listen: Some(addr),
                                            now_ms: now_ms(),
                                        },
                                    )
                                    .await;
                                }
                                Err(e) => {
                                    tracing::warn!(migration = m.id, error = %e, "post-copy: cannot listen for the resumed stream yet")
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = migration_event(&mut events) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_incoming_port_is_the_first_free_one_from_the_migration_port() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = held.local_addr().unwrap();
        let got: std::net::SocketAddr = free_incoming_addr(&base.to_string())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(got.ip(), base.ip());
        assert!(
            got.port() > base.port() && got.port() < base.port() + INCOMING_PORTS,
            "{base} is taken: {got}"
        );
        drop(held);
        assert_eq!(free_incoming_addr(&base.to_string()), Ok(base.to_string()));
        // Not an IP address and port: used as given, for QEMU to resolve.
        assert_eq!(
            free_incoming_addr("node2.example:8000"),
            Ok("node2.example:8000".to_string())
        );
    }

    #[test]
    fn test_qemu_settings_follow_the_operator() {
        let p = MigrationParams {
            bandwidth_mibps: None,
            downtime_ms: 50,
            policy: MigrationPolicy::Precopy,
        };
        let (caps, params) = qemu_settings(&p);
        // No silent 128 MiB/s cap.
        assert_eq!(params["max-bandwidth"], UNCAPPED_BYTES_PER_SEC);
        assert_eq!(params["max-postcopy-bandwidth"], 0, "uncapped");
        assert_eq!(params["downtime-limit"], 50);
        assert_eq!(caps[1]["capability"], "auto-converge");
        assert_eq!(caps[1]["state"], false);
        let p = MigrationParams {
            bandwidth_mibps: Some(200),
            downtime_ms: 300,
            policy: MigrationPolicy::AutoConverge,
        };
        let (caps, params) = qemu_settings(&p);
        assert_eq!(params["max-bandwidth"], 200u64 << 20);
        assert_eq!(params["max-postcopy-bandwidth"], 200u64 << 20);
        assert_eq!(caps[1]["state"], true);
    }
}
