//! Live migrations in the replicated state: one record per migration with its phase, so any
//! node can show it and a restarted daemon knows where it stood; admission (how many
//! migrations a node and the cluster take part in at once, the rest queued in order); and
//! the switchover's commit, which moves the VM's ownership in the same command that ends
//! the copy, so exactly one node owns the VM at every point.
//!
//! ```text
//!  queued --admitted--> preparing --dest listens--> ready --source sends--> copying
//!     |                     |                          |                      |
//!     +-----cancel----------+----fail/cancel-----------+-------fail/cancel----+--> failed / cancelled
//!                                                                             |   (VM stays on the source)
//!                                                               commit (owner := dest)
//!                                                                             v
//!                                                            committed --dest resumes--> completed
//! ```
//!
//! Before the commit any failure leaves the VM on the source; after it, on the destination.
//! A failure report and the commit are both conditional on the phase, so whichever the log
//! orders first wins and the other is refused.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::NodeId;
use crate::command::Outcome;
use crate::state::{ApplyError, ClusterState, NodeAdminState};
use crate::vm::{VmDesired, VmState};
use crate::volume::{ALLOCATION_UNIT, DiskId};

/// A migration's id (never reused).
pub type MigrationId = u64;

/// Room a quick migration's saved state gets beyond the guest's memory (device state,
/// the header).
pub const STATE_HEADROOM_MIB: u64 = 64;
/// The only initiator a saved-state disk lists: none has it, so no portal shows the disk.
pub const STATE_DISK_INITIATOR: &str = "iqn.2025-11.org.csvd:internal.saved-state";

/// The name of quick migration `id`'s saved-state disk.
pub fn state_disk_name(id: MigrationId) -> String {
    format!("migration-{id}.state")
}

/// How many ended migrations the cluster state keeps as history (the newest); older ones
/// go when another migration ends, so the state every node holds, copies on each change and
/// snapshots stays bounded however many migrations a cluster runs.
pub const MIGRATION_HISTORY: usize = 256;

/// Default downtime QEMU aims for at switchover, in milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// How a migration copies memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPolicy {
    /// Copy memory while the guest runs, then pause it for the last dirty pages.
    Precopy,
    /// Pre-copy that throttles the guest's vCPUs when memory is dirtied faster than it is sent.
    AutoConverge,
    /// One pre-copy pass, then the switchover: the guest runs on the destination, which
    /// fetches the pages it still lacks from the source. It always finishes and its downtime
    /// does not grow with the dirty rate, but until the last page arrives the guest needs
    /// both nodes: the switchover is committed before the guest leaves the source, and a
    /// failure after it restarts the guest from its disk on the destination.
    Postcopy,
    /// Quick migration, for guests that cannot be moved live: the guest is paused first and
    /// its whole state copied while it stands still; it always finishes, and the downtime is
    /// the copy's duration.
    Quick,
}

impl MigrationPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPolicy::Precopy => "precopy",
            MigrationPolicy::AutoConverge => "auto-converge",
            MigrationPolicy::Postcopy => "postcopy",
            MigrationPolicy::Quick => "quick",
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParams {
    /// Bandwidth cap in MiB/s; `None`: as fast as the network goes.
    #[serde(default)]
    pub bandwidth_mibps: Option<u64>,
    /// The downtime QEMU may take at switchover, in milliseconds.
    pub downtime_ms: u64,
    pub policy: MigrationPolicy,
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Waiting for a node's or the cluster's migration slot.
    Queued,
    /// The destination starts its QEMU, waiting for the incoming state.
    Preparing,
    /// The destination listens; the source may send (and has begun, until its first
    /// progress report says so).
    Ready,
    /// The source sends memory and device state (recorded with its first progress report).
    Copying,
    /// The source finished and paused; the VM belongs to the destination, which resumes it.
    Committed,
    /// The VM runs on the destination.
    Completed,
    /// It did not happen; the VM runs where it ran (or, after the commit, on the destination).
    Failed,
    /// Cancelled before the switchover; the VM runs on the source.
    Cancelled,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Queued => "queued",
            MigrationPhase::Preparing => "preparing",
            MigrationPhase::Ready => "ready",
            MigrationPhase::Copying => "copying",
            MigrationPhase::Committed => "committed",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
        }
    }

    /// Ended, one way or another.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// Holding its nodes' migration slots.
    pub fn is_active(self) -> bool {
        self != MigrationPhase::Queued && !self.is_terminal()
    }
}

/// A post-copy migration whose stream broke after the switchover: the guest runs on the
/// destination but lacks pages that only the source has. Both QEMUs pause the stream, the
/// destination listens afresh, and the source resumes the stream there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyRecovery {
    /// Which break this is (1 for the first).
    pub attempt: u32,
    /// Where the destination listens for the resumed stream, once it does.
    pub listen: Option<String>,
    /// The source's clock at the first break, ms since the epoch.
    pub since_ms: u64,
}

/// The source's latest view of the copy (QEMU's query-migrate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    pub page_size: u64,
    /// Current transfer rate.
    pub bytes_per_sec: u64,
    /// QEMU's estimate of the downtime if it switched over now.
    pub expected_downtime_ms: u64,
    /// Passes over memory so far.
    pub iterations: u64,
    /// Milliseconds since the copy began.
    pub elapsed_ms: u64,
}

/// One live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: MigrationId,
    pub vm: Uuid,
    pub vm_name: String,
    pub source: NodeId,
    pub dest: NodeId,
    pub params: MigrationParams,
    pub phase: MigrationPhase,
    /// An operator asked to cancel; honoured until the commit.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub progress: Option<MigrationProgress>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// QEMU's downtime at the source, recorded with the commit.
    #[serde(default)]
    pub qemu_downtime_ms: Option<u64>,
    /// The destination's clock when it said `ready` (its QEMU up and listening).
    #[serde(default)]
    pub ready_at_ms: Option<u64>,
    /// Where the destination's QEMU listens (`host:port`), said with `ready`; absent (a
    /// destination that does not say), the destination node's migration address.
    #[serde(default)]
    pub listen_addr: Option<String>,
    /// Post-copy: the migration stream broke after the switchover and was (or is being)
    /// mended. `None` while it never broke.
    #[serde(default)]
    pub recovery: Option<PostcopyRecovery>,
    /// The source's clock when its QEMU completed (paused for good), ms since the epoch.
    #[serde(default)]
    pub switchover_at_ms: Option<u64>,
    /// A quick migration's saved state: a disk on the VM's (first disk's) volume, made at
    /// admission and deleted when the migration ends. The source saves the paused guest
    /// into it, the destination restores from it.
    #[serde(default)]
    pub state_disk: Option<DiskId>,
    /// The VM was paused when it was asked to move: it moves paused and stays paused on the
    /// destination (its wanted state cannot change while it migrates).
    #[serde(default)]
    pub paused: bool,
    /// From admission to the guest running (a paused VM's: loaded) on the destination.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// From the guest's pause on the source to its resumption on the destination.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    pub created_at_ms: u64,
    /// When it was admitted (left the queue).
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
}

/// How many migrations may run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationLimits {
    /// Per node, as source or destination.
    pub per_node: u32,
    /// In the whole cluster; `None`: only the per-node limit applies.
    #[serde(default)]
    pub cluster: Option<u32>,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits {
            per_node: 1,
            cluster: None,
        }
    }
}

fn precondition(reason: impl Into<String>) -> ApplyError {
    ApplyError::PreconditionFailed {
        reason: reason.into(),
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ApplyError {
    ApplyError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ClusterState {
    /// The migration of `vm` that has not ended, if any.
    pub fn open_migration(&self, vm: Uuid) -> Option<&MigrationRecord> {
        self.migrations
            .values()
            .find(|m| m.vm == vm && !m.phase.is_terminal())
    }

    /// Migrations that cannot go on because a node they need is down (by `now_ms`): before
    /// the switchover, the source or the destination. Each with the reason to record as its
    /// failure. A committed migration is left to its destination, which finishes it when it
    /// is back (the VM is that node's).
    pub fn stranded_migrations(&self, now_ms: u64) -> Vec<(MigrationId, String)> {
        self.migrations
            .values()
            .filter(|m| !m.phase.is_terminal() && m.phase != MigrationPhase::Committed)
            .filter_map(|m| {
                let down = [(m.source, "source"), (m.dest, "destination")]
                    .into_iter()
                    .find(|(n, _)| !self.node_up(*n, now_ms))?;
                Some((
                    m.id,
                    format!(
                        "the {} (node {}) went down during the {} phase: no heartbeat in the last {} s",
                        down.1,
                        down.0,
                        m.phase.as_str(),
                        crate::node::DOWN_AFTER.as_secs()
                    ),
                ))
            })
            .collect()
    }

    /// Active migrations `node` takes part in.
    pub fn active_migrations_of(&self, node: NodeId) -> usize {
        self.migrations
            .values()
            .filter(|m| m.phase.is_active() && (m.source == node || m.dest == node))
            .count()
    }

    fn may_admit(&self, source: NodeId, dest: NodeId) -> bool {
        let limits = self.migration_limits;
        let active = self
            .migrations
            .values()
            .filter(|m| m.phase.is_active())
            .count();
        self.active_migrations_of(source) < limits.per_node as usize
            && self.active_migrations_of(dest) < limits.per_node as usize
            && limits.cluster.is_none_or(|c| active < c as usize)
    }

    /// Admits queued migrations, oldest first, while their nodes have room.
    fn admit_queued(&mut self, now_ms: u64) {
        let queued: Vec<MigrationId> = self
            .migrations
            .values()
            .filter(|m| m.phase == MigrationPhase::Queued)
            .map(|m| m.id)
            .collect();
        for id in queued {
            let (source, dest) = {
                let m = &self.migrations[&id];
                (m.source, m.dest)
            };
            if !self.may_admit(source, dest) {
                continue;
            }
            let state_disk = match self.make_state_disk(id) {
                Ok(disk) => disk,
                Err(e) => {
                    if let Some(m) = self.migrations.get_mut(&id) {
                        m.phase = MigrationPhase::Failed;
                        m.error = Some(e.to_string());
                        m.finished_at_ms = Some(now_ms);
                    }
                    continue;
                }
            };
            if let Some(m) = self.migrations.get_mut(&id) {
                m.phase = MigrationPhase::Preparing;
                m.started_at_ms = Some(now_ms);
                m.state_disk = state_disk;
            }
        }
    }

    /// Where a quick migration of `vm` saves the guest: the volume of its first disk, and
    /// the size the state needs (the guest's memory and room for device state).
    fn state_disk_place(&self, vm: Uuid) -> Result<(Uuid, u64), ApplyError> {
        let v = self.vms.get(&vm).ok_or(ApplyError::UnknownVm { id: vm })?;
        let disk = v
            .spec
            .disks
            .first()
            .and_then(|d| self.disks.get(d))
            .ok_or_else(|| {
                precondition(format!(
                    "VM {:?} has no disk: a quick migration saves the guest to its disk's volume",
                    v.name
                ))
            })?;
        let bytes = ((v.spec.memory_mib + STATE_HEADROOM_MIB) << 20).div_ceil(ALLOCATION_UNIT)
            * ALLOCATION_UNIT;
        Ok((disk.volume, bytes))
    }

    /// Carves the saved-state disk of quick migration `id` (none for other policies).
    fn make_state_disk(&mut self, id: MigrationId) -> Result<Option<DiskId>, ApplyError> {
        let m = &self.migrations[&id];
        if m.params.policy != MigrationPolicy::Quick {
            return Ok(None);
        }
        let (volume, bytes) = self.state_disk_place(m.vm)?;
        let name = state_disk_name(id);
        let made = self.create_disk(&name, volume, bytes, 4096).map_err(|e| {
            precondition(format!(
                "no room for the quick migration's saved state: {e}"
            ))
        })?;
        match made {
            Outcome::Created { id: disk } => {
                // No initiator is ever shown this disk; only csvd reads and writes it.
                if let Some(d) = self.disks.get_mut(&disk) {
                    d.allowed_initiators = vec![STATE_DISK_INITIATOR.into()];
                }
                Ok(Some(disk))
            }
            other => Err(precondition(format!(
                "the saved-state disk was not made: {other:?}"
            ))),
        }
    }

    /// The checks a migration of `vm` to `dest` must pass before anything starts.
    /// `now_ms` is the proposer's clock, against which the nodes' heartbeats are read.
    pub fn check_migration(&self, vm: Uuid, dest: NodeId, now_ms: u64) -> Result<(), ApplyError> {
        let v = self.vms.get(&vm).ok_or(ApplyError::UnknownVm { id: vm })?;
        if v.owner == dest {
            return Err(precondition(format!(
                "VM {:?} already runs on node {dest}",
                v.name
            )));
        }
        // A paused VM moves paused (its QEMU holds the guest, which just does not run).
        let started = match v.desired {
            VmDesired::Running => Some(VmState::Running),
            VmDesired::Paused => Some(VmState::Paused),
            VmDesired::Stopped => None,
        };
        let up = started.is_some_and(|want| {
            v.runtime
                .as_ref()
                .is_some_and(|r| r.node == v.owner && r.state == want)
        });
        if !up {
            return Err(precondition(format!(
                "VM {:?} is not running on node {}: only a running (or paused) VM migrates live",
                v.name, v.owner
            )));
        }
        if let Some(m) = self.open_migration(vm) {
            return Err(precondition(format!(
                "VM {:?} is already migrating (migration {}, {})",
                v.name,
                m.id,
                m.phase.as_str()
            )));
        }
        let node = self
            .nodes
            .get(&dest)
            .ok_or(ApplyError::UnknownNode { id: dest })?;
        if node.spec.migration_addr.is_empty() {
            return Err(precondition(format!(
                "node {dest} has no migration address (its migration_addr is not set)"
            )));
        }
        if node.admin_state == NodeAdminState::Draining {
            return Err(precondition(format!(
                "node {dest} is draining: it takes no VMs"
            )));
        }
        for (n, role) in [(dest, "the destination"), (v.owner, "the VM's owner")] {
            if !self.node_up(n, now_ms) {
                return Err(precondition(format!(
                    "node {n} ({role}) is down: no heartbeat in the last {} s",
                    crate::node::DOWN_AFTER.as_secs()
                )));
            }
        }
        // Switches and memory, as for a VM defined there.
        self.check_vm_fits(&v.spec, vm, dest)?;
        // The accelerator: a guest's state moves only between QEMUs that run it the same
        // way (KVM's and TCG's processor state differ).
        let accel = v
            .runtime
            .as_ref()
            .filter(|r| {
                matches!(r.state, VmState::Running | VmState::Paused)
                    && matches!(r.detail.as_str(), "kvm" | "tcg")
            })
            .map(|r| r.detail.as_str());
        if let (Some(accel), Some(cpu)) = (accel, self.node_cpus.get(&dest))
            && cpu.accel != accel
        {
            return Err(precondition(format!(
                "node {dest} runs guests under {}, but VM {:?} runs under {accel} on node {}: \
                 its processor state cannot move between accelerators",
                cpu.accel, v.name, v.owner
            )));
        }
        // The processor: a VM that sees the host's processor needs the same one there.
        let accel_kvm = accel == Some("kvm");
        if accel_kvm && v.spec.cpu == "host" {
            let src = &self.nodes[&v.owner].spec;
            let missing: Vec<&str> = src
                .cpu_flags
                .iter()
                .filter(|f| !node.spec.cpu_flags.contains(f))
                .map(String::as_str)
                .collect();
            if src.cpu_model != node.spec.cpu_model || !missing.is_empty() {
                return Err(precondition(format!(
                    "node {dest}'s processor ({}) cannot run VM {:?}, which sees node {}'s ({}){}; \
                     use the cluster-baseline CPU model to move between different processors",
                    node.spec.cpu_model,
                    v.name,
                    v.owner,
                    src.cpu_model,
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(" and needs {}", missing.join(" "))
                    }
                )));
            }
        }
        // A named model (or the baseline) must be one the destination's KVM can run.
        if accel_kvm && v.spec.cpu != "host" {
            let model = if v.spec.cpu == "cluster-baseline" {
                self.baseline_cpu().map(str::to_string)
            } else {
                Some(v.spec.cpu.clone())
            };
            if let (Some(model), Some(cpu)) = (model, self.node_cpus.get(&dest))
                && cpu.accel == "kvm"
                && !cpu.models.contains(&model)
            {
                return Err(precondition(format!(
                    "node {dest}'s processor cannot run VM {:?}'s CPU model {model}",
                    v.name
                )));
            }
        }
        // Every disk's volume must be reachable from there.
        for d in &v.spec.disks {
            let disk = self
                .disks
                .get(d)
                .ok_or(ApplyError::UnknownDisk { id: *d })?;
            let reachable = self
                .volumes
                .get(&disk.volume)
                .and_then(|vol| vol.nodes.get(&dest))
                .is_some_and(|n| !matches!(n.mode, crate::volume::IoMode::Paused(_)));
            if !reachable {
                return Err(precondition(format!(
                    "node {dest} cannot reach LUN {d} ({}): its volume is not attached there",
                    disk.name
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn start_migration(
        &mut self,
        vm: Uuid,
        dest: NodeId,
        params: &MigrationParams,
        now_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        if params.downtime_ms == 0 || params.downtime_ms > 60_000 {
            return Err(invalid(
                "downtime",
                format!("{} ms is not between 1 and 60000", params.downtime_ms),
            ));
        }
        if params.bandwidth_mibps == Some(0) {
            return Err(invalid("bandwidth", "0 MiB/s would never finish"));
        }
        self.check_migration(vm, dest, now_ms)?;
        let paused = self.vms[&vm].desired == VmDesired::Paused;
        if paused && params.policy == MigrationPolicy::Postcopy {
            return Err(precondition(format!(
                "VM {:?} is paused: post-copy needs the guest running on the destination to fetch its memory; use precopy or quick",
                self.vms[&vm].name
            )));
        }
        if params.policy == MigrationPolicy::Quick {
            let (volume, bytes) = self.state_disk_place(vm)?;
            let free = self.volume_free_bytes(volume);
            if free < bytes {
                return Err(precondition(format!(
                    "a quick migration saves the guest to volume {volume}, which has {} MiB free; it needs {} MiB",
                    free >> 20,
                    bytes >> 20
                )));
            }
        }
        let v = &self.vms[&vm];
        let id = self.next_migration_id.max(1);
        self.next_migration_id = id + 1;
        let record = MigrationRecord {
            id,
            vm,
            vm_name: v.name.clone(),
            source: v.owner,
            dest,
            params: params.clone(),
            phase: MigrationPhase::Queued,
            cancel_requested: false,
            progress: None,
            error: None,
            qemu_downtime_ms: None,
            ready_at_ms: None,
            listen_addr: None,
            recovery: None,
            switchover_at_ms: None,
            total_ms: None,
            downtime_ms: None,
            state_disk: None,
            paused,
            created_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
        };
        self.migrations.insert(id, record);
        self.admit_queued(now_ms);
        Ok(Outcome::Created { id })
    }

    fn migration_mut(&mut self, id: MigrationId) -> Result<&mut MigrationRecord, ApplyError> {
        self.migrations
            .get_mut(&id)
            .ok_or_else(|| precondition(format!("migration {id} does not exist")))
    }

    /// Moves a migration from `from` to `to` (preparing -> ready by the destination, ready
    /// -> copying by the source).
    pub(crate) fn advance_migration(
        &mut self,
        id: MigrationId,
        from: MigrationPhase,
        to: MigrationPhase,
        at_ms: Option<u64>,
        listen: Option<String>,
    ) -> Result<Outcome, ApplyError> {
        let allowed = matches!(
            (from, to),
            (MigrationPhase::Preparing, MigrationPhase::Ready)
                | (MigrationPhase::Ready, MigrationPhase::Copying)
        );
        if !allowed {
            return Err(invalid(
                "phase",
                format!("{} -> {} is not a step", from.as_str(), to.as_str()),
            ));
        }
        let m = self.migration_mut(id)?;
        if m.phase == to {
            return Ok(Outcome::Unchanged);
        }
        if m.phase != from {
            return Err(precondition(format!(
                "migration {id} is {}, not {}",
                m.phase.as_str(),
                from.as_str()
            )));
        }
        m.phase = to;
        if to == MigrationPhase::Ready {
            m.ready_at_ms = at_ms;
            m.listen_addr = listen;
        }
        Ok(Outcome::Applied)
    }

    pub(crate) fn report_migration(
        &mut self,
        id: MigrationId,
        progress: &MigrationProgress,
    ) -> Result<Outcome, ApplyError> {
        let m = self.migration_mut(id)?;
        if m.phase.is_terminal() {
            return Ok(Outcome::Unchanged);
        }
        // The source's first report says the copy is under way: it does not spend a
        // command of its own on that, which would cost every node work while QEMU copies.
        if m.phase == MigrationPhase::Ready {
            m.phase = MigrationPhase::Copying;
        }
        m.progress = Some(progress.clone());
        Ok(Outcome::Applied)
    }

    /// Post-copy after the switchover: the source reports break `attempt` of the migration
    /// stream (`listen` none), or the destination where it listens for the stream resumed
    /// after that break.
    pub(crate) fn recover_postcopy(
        &mut self,
        id: MigrationId,
        attempt: u32,
        listen: Option<&str>,
        now_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        let m = self.migration_mut(id)?;
        if m.phase != MigrationPhase::Committed || m.params.policy != MigrationPolicy::Postcopy {
            return Err(precondition(format!(
                "migration {id} is {} ({}): it has no post-copy stream to mend",
                m.phase.as_str(),
                m.params.policy.as_str()
            )));
        }
        let current = m.recovery.as_ref().map_or(0, |r| r.attempt);
        match listen {
            None if attempt == current => Ok(Outcome::Unchanged),
            None if attempt == current + 1 => {
                let since_ms = m.recovery.as_ref().map_or(now_ms, |r| r.since_ms);
                m.recovery = Some(PostcopyRecovery {
                    attempt,
                    listen: None,
                    since_ms,
                });
                Ok(Outcome::Applied)
            }
            None => Err(precondition(format!(
                "migration {id}: break {attempt} cannot follow break {current}"
            ))),
            Some(addr) => match m.recovery.as_mut() {
                Some(r) if r.attempt == attempt => {
                    if r.listen.as_deref() == Some(addr) {
                        return Ok(Outcome::Unchanged);
                    }
                    r.listen = Some(addr.to_string());
                    Ok(Outcome::Applied)
                }
                _ => Err(precondition(format!(
                    "migration {id}: break {attempt} is not the current one ({current})"
                ))),
            },
        }
    }

    /// The switchover: the source's QEMU completed and paused; the VM becomes the
    /// destination's. Refused once cancelled or failed.
    pub(crate) fn commit_migration(
        &mut self,
        id: MigrationId,
        qemu_downtime_ms: u64,
        switchover_at_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        let m = self.migration_mut(id)?;
        if m.phase == MigrationPhase::Committed {
            return Ok(Outcome::Unchanged);
        }
        // Ready: a copy that ended before the source's first progress report.
        if !matches!(m.phase, MigrationPhase::Ready | MigrationPhase::Copying) {
            return Err(precondition(format!(
                "migration {id} is {}: it cannot switch over",
                m.phase.as_str()
            )));
        }
        if m.cancel_requested {
            return Err(precondition(format!("migration {id} was cancelled")));
        }
        let (vm, source, dest) = (m.vm, m.source, m.dest);
        m.phase = MigrationPhase::Committed;
        m.qemu_downtime_ms = Some(qemu_downtime_ms);
        m.switchover_at_ms = Some(switchover_at_ms);
        self.set_vm_owner(vm, dest, source)?;
        Ok(Outcome::Applied)
    }

    /// Ends a migration. `Completed` only after the commit; `Failed` or `Cancelled` before
    /// it (after it a failure is recorded as `Failed`, and the VM stays the destination's).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish_migration(
        &mut self,
        id: MigrationId,
        phase: MigrationPhase,
        error: Option<&str>,
        total_ms: Option<u64>,
        downtime_ms: Option<u64>,
        now_ms: u64,
        expect_committed: bool,
    ) -> Result<Outcome, ApplyError> {
        if !phase.is_terminal() {
            return Err(invalid(
                "phase",
                format!("{} does not end a migration", phase.as_str()),
            ));
        }
        let m = self.migration_mut(id)?;
        if m.phase.is_terminal() {
            return if m.phase == phase {
                // Both nodes may report a failure, each with what it saw (the destination's
                // QEMU ends with the stream when the source's dies): the record keeps both.
                match (m.error.as_mut(), error) {
                    (Some(first), Some(more))
                        if phase == MigrationPhase::Failed && !first.contains(more) =>
                    {
                        *first = format!("{first}; {more}").chars().take(1024).collect();
                        Ok(Outcome::Applied)
                    }
                    _ => Ok(Outcome::Unchanged),
                }
            } else {
                Err(precondition(format!(
                    "migration {id} already ended: {}",
                    m.phase.as_str()
                )))
            };
        }
        let committed = m.phase == MigrationPhase::Committed;
        if committed != expect_committed {
            return Err(precondition(if committed {
                format!(
                    "migration {id} has switched over: the VM is node {}'s",
                    m.dest
                )
            } else {
                format!("migration {id} has not switched over")
            }));
        }
        if phase == MigrationPhase::Completed && !committed {
            return Err(precondition(format!(
                "migration {id} has not switched over"
            )));
        }
        m.phase = phase;
        m.error = error.map(|e| e.chars().take(512).collect());
        m.total_ms = total_ms;
        m.downtime_ms = downtime_ms;
        m.finished_at_ms = Some(now_ms);
        if let Some(disk) = m.state_disk.take() {
            let _ = self.delete_disk(disk);
        }
        self.admit_queued(now_ms);
        self.prune_migration_history();
        Ok(Outcome::Applied)
    }

    /// Drops the oldest ended migrations beyond [`MIGRATION_HISTORY`]. Ended ones hold no
    /// saved-state disk (it goes when they end), and open ones are never dropped.
    fn prune_migration_history(&mut self) {
        let ended: Vec<MigrationId> = self
            .migrations
            .values()
            .filter(|m| m.phase.is_terminal())
            .map(|m| m.id)
            .collect();
        let excess = ended.len().saturating_sub(MIGRATION_HISTORY);
        for id in &ended[..excess] {
            self.migrations.remove(id);
        }
    }

    pub(crate) fn cancel_migration(
        &mut self,
        id: MigrationId,
        now_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        let m = self.migration_mut(id)?;
        match m.phase {
            MigrationPhase::Queued => {
                m.phase = MigrationPhase::Cancelled;
                m.finished_at_ms = Some(now_ms);
                self.admit_queued(now_ms);
                self.prune_migration_history();
                Ok(Outcome::Applied)
            }
            MigrationPhase::Cancelled => Ok(Outcome::Unchanged),
            p if p.is_terminal() || p == MigrationPhase::Committed => Err(precondition(format!(
                "migration {id} is {}: too late to cancel",
                p.as_str()
            ))),
            _ if m.cancel_requested => Ok(Outcome::Unchanged),
            _ => {
                m.cancel_requested = true;
                Ok(Outcome::Applied)
            }
        }
    }

    pub(crate) fn set_migration_limits(
        &mut self,
        limits: MigrationLimits,
        now_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        if limits.per_node == 0 || limits.cluster == Some(0) {
            return Err(invalid("limits", "a limit of 0 would stop every migration"));
        }
        if self.migration_limits == limits {
            return Ok(Outcome::Unchanged);
        }
        self.migration_limits = limits;
        self.admit_queued(now_ms);
        Ok(Outcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::state::NodeSpec;
    use crate::vm::{VmBoot, VmSpec};
    use crate::volume::{ALLOCATION_UNIT, IoMode};

    use crate::vm::tests::apply;

    fn node(id: NodeId, switches: &[&str]) -> NodeSpec {
        crate::vm::tests::node(id, switches, 4)
    }

    /// Four nodes (node 4 without the "lan" switch), a volume every node reaches, a disk per
    /// VM, and VMs 1..=vms running on node 1 (VM i on disk i, 256 MiB, a NIC on "lan").
    fn cluster(vms: u128) -> ClusterState {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            Command::InitCluster {
                cluster_id: Uuid::from_u128(1),
            },
        )
        .unwrap();
        for (id, sw) in [(1, &["lan"][..]), (2, &["lan"]), (3, &["lan"]), (4, &[])] {
            apply(
                &mut s,
                Command::RegisterNode {
                    spec: node(id, sw),
                    now_ms: 1,
                },
            )
            .unwrap();
        }
        let volume = Uuid::from_u128(77);
        apply(
            &mut s,
            Command::RegisterVolume {
                id: volume,
                name: "vol".into(),
                device_bytes: 1024 * ALLOCATION_UNIT,
                data_offset: ALLOCATION_UNIT,
                coordinator: 1,
                now_ms: 1,
            },
        )
        .unwrap();
        for n in 1..=4 {
            apply(
                &mut s,
                Command::ReportVolume {
                    volume,
                    node: n,
                    mode: IoMode::Direct,
                    path: Some("/dev/x".into()),
                    acked_epoch: 0,
                    at_ms: 1,
                },
            )
            .unwrap();
        }
        for i in 1..=vms {
            apply(
                &mut s,
                Command::CreateDisk {
                    name: format!("d{i}"),
                    volume,
                    size_bytes: ALLOCATION_UNIT,
                    block_size: None,
                },
            )
            .unwrap();
            let id = Uuid::from_u128(100 + i);
            apply(
                &mut s,
                Command::CreateVm {
                    id,
                    name: format!("vm{i}"),
                    spec: VmSpec {
                        vcpus: 1,
                        memory_mib: 256,
                        cpu: "host".into(),
                        disks: vec![i as u64],
                        nics: vec![crate::vm::NicSpec {
                            switch: "lan".into(),
                            mac: format!("52:54:00:00:00:{i:02x}"),
                        }],
                        boot: VmBoot::Disk,
                    },
                    owner: 1,
                    now_ms: 1,
                },
            )
            .unwrap();
            apply(
                &mut s,
                Command::SetVmDesired {
                    id,
                    desired: VmDesired::Running,
                },
            )
            .unwrap();
            apply(
                &mut s,
                Command::ReportVm {
                    id,
                    node: 1,
                    state: VmState::Running,
                    detail: "tcg".into(),
                    restarts: 0,
                    at_ms: 1,
                },
            )
            .unwrap();
        }
        s
    }

    fn params() -> MigrationParams {
        MigrationParams {
            bandwidth_mibps: None,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            policy: MigrationPolicy::Precopy,
        }
    }

    fn start(s: &mut ClusterState, vm: u128, dest: NodeId) -> Result<MigrationId, ApplyError> {
        match apply(
            s,
            Command::StartMigration {
                vm: Uuid::from_u128(100 + vm),
                dest,
                params: params(),
                now_ms: 10,
            },
        )? {
            Outcome::Created { id } => Ok(id),
            other => panic!("{other:?}"),
        }
    }

    /// Takes migration `id` through `ready` and `copying` to its commit, at `at_ms`.
    fn switch_over(s: &mut ClusterState, id: MigrationId, at_ms: u64) {
        for (from, to) in [
            (MigrationPhase::Preparing, MigrationPhase::Ready),
            (MigrationPhase::Ready, MigrationPhase::Copying),
        ] {
            let step = Command::AdvanceMigration {
                id,
                from,
                to,
                at_ms: Some(at_ms),
                listen: None,
            };
            apply(s, step).unwrap();
        }
        let commit = Command::CommitMigration {
            id,
            qemu_downtime_ms: 1,
            switchover_at_ms: at_ms,
        };
        apply(s, commit).unwrap();
    }

    fn finish(
        s: &mut ClusterState,
        id: MigrationId,
        phase: MigrationPhase,
        committed: bool,
    ) -> Result<Outcome, ApplyError> {
        apply(
            s,
            Command::FinishMigration {
                id,
                phase,
                error: None,
                total_ms: Some(1),
                downtime_ms: Some(1),
                now_ms: 20,
                committed,
            },
        )
    }

    #[test]
    fn test_history_keeps_the_newest_ended_migrations_and_every_open_one() {
        let mut s = cluster(2);
        apply(
            &mut s,
            Command::SetMigrationLimits {
                limits: MigrationLimits {
                    per_node: 2,
                    cluster: None,
                },
                now_ms: 1,
            },
        )
        .unwrap();
        let open = start(&mut s, 2, 3).unwrap();
        assert_eq!(s.migrations[&open].phase, MigrationPhase::Preparing);
        let mut ended = vec![];
        for _ in 0..MIGRATION_HISTORY + 3 {
            let id = start(&mut s, 1, 2).unwrap();
            finish(&mut s, id, MigrationPhase::Failed, false).unwrap();
            ended.push(id);
        }
        assert_eq!(s.migrations.len(), MIGRATION_HISTORY + 1);
        assert!(s.migrations.contains_key(&open), "an open migration stays");
        assert!(!s.migrations[&open].phase.is_terminal());
        // The three oldest ended ones went; the newest stay, and ids are not reused.
        for id in &ended[..3] {
            assert!(!s.migrations.contains_key(id), "{id}");
        }
        for id in &ended[3..] {
            assert!(s.migrations.contains_key(id), "{id}");
        }
        let next = start(&mut s, 1, 2).unwrap();
        assert!(next > *ended.last().unwrap());
    }

    #[test]
    fn test_prechecks_refuse_before_anything_starts() {
        let mut s = cluster(1);
        let e = start(&mut s, 1, 4).unwrap_err().to_string();
        assert!(e.contains("node 4 has no virtual switch \"lan\""), "{e}");
        let e = start(&mut s, 1, 1).unwrap_err().to_string();
        assert!(e.contains("already runs on node 1"), "{e}");
        assert_eq!(start(&mut s, 1, 9), Err(ApplyError::UnknownNode { id: 9 }));
        apply(
            &mut s,
            Command::SetNodeState {
                id: 2,
                state: NodeAdminState::Draining,
            },
        )
        .unwrap();
        let e = start(&mut s, 1, 2).unwrap_err().to_string();
        assert!(e.contains("node 2 is draining"), "{e}");
        // Not enough memory on node 3: fill it with a big VM meant to run there.
        let mut big = s.vms[&Uuid::from_u128(101)].spec.clone();
        big.memory_mib = 3400;
        big.nics.clear();
        big.disks.clear();
        big.boot = VmBoot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            append: String::new(),
        };
        apply(
            &mut s,
            Command::CreateVm {
                id: Uuid::from_u128(999),
                name: "big".into(),
                spec: big,
                owner: 3,
                now_ms: 1,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::SetVmDesired {
                id: Uuid::from_u128(999),
                desired: VmDesired::Running,
            },
        )
        .unwrap();
        let e = start(&mut s, 1, 3).unwrap_err().to_string();
        assert!(e.contains("not enough memory on node 3"), "{e}");
        // A stopped VM does not migrate live.
        let id = Uuid::from_u128(999);
        let e = apply(
            &mut s,
            Command::StartMigration {
                vm: id,
                dest: 1,
                params: params(),
                now_ms: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not running"), "{e}");
        assert!(s.migrations.is_empty());
    }

    #[test]
    fn test_processor_check_for_host_model_under_kvm() {
        let mut s = cluster(1);
        let id = Uuid::from_u128(101);
        apply(
            &mut s,
            Command::ReportVm {
                id,
                node: 1,
                state: VmState::Running,
                detail: "kvm".into(),
                restarts: 0,
                at_ms: 2,
            },
        )
        .unwrap();
        let mut other = node(2, &["lan"]);
        other.cpu_model = "older cpu".into();
        apply(&mut s, Command::UpdateNode { spec: other }).unwrap();
        let e = start(&mut s, 1, 2).unwrap_err().to_string();
        assert!(
            e.contains("node 2's processor (older cpu) cannot run VM \"vm1\""),
            "{e}"
        );
        // Node 3 has the same processor.
        assert!(start(&mut s, 1, 3).is_ok());
    }

    #[test]
    fn test_named_cpu_model_must_run_on_the_destination() {
        let mut s = cluster(1);
        let id = Uuid::from_u128(101);
        // vm1 uses a named model under KVM.
        apply(
            &mut s,
            Command::SetVmDesired {
                id,
                desired: VmDesired::Stopped,
            },
        )
        .unwrap();
        s.vms.get_mut(&id).unwrap().spec.cpu = "Skylake-Server".into();
        apply(
            &mut s,
            Command::SetVmDesired {
                id,
                desired: VmDesired::Running,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::ReportVm {
                id,
                node: 1,
                state: VmState::Running,
                detail: "kvm".into(),
                restarts: 0,
                at_ms: 2,
            },
        )
        .unwrap();
        for (node, models) in [(2, vec!["Haswell"]), (3, vec!["Haswell", "Skylake-Server"])] {
            let cpu = crate::vm::NodeCpu {
                accel: "kvm".into(),
                models: models.into_iter().map(String::from).collect(),
            };
            apply(&mut s, Command::ReportNodeCpu { node, cpu }).unwrap();
        }
        let e = start(&mut s, 1, 2).unwrap_err().to_string();
        assert!(
            e.contains("node 2's processor cannot run VM \"vm1\"'s CPU model Skylake-Server"),
            "{e}"
        );
        assert!(start(&mut s, 1, 3).is_ok());
    }

    #[test]
    fn test_quick_migration_saves_the_guest_to_a_disk_on_its_volume() {
        let mut s = cluster(3);
        let quick = MigrationParams {
            policy: MigrationPolicy::Quick,
            ..params()
        };
        let start_quick = |s: &mut ClusterState, vm: u128| {
            apply(
                s,
                Command::StartMigration {
                    vm: Uuid::from_u128(100 + vm),
                    dest: 2,
                    params: quick.clone(),
                    now_ms: 10,
                },
            )
        };
        let a = match start_quick(&mut s, 1).unwrap() {
            Outcome::Created { id } => id,
            other => panic!("{other:?}"),
        };
        let disk = s.migrations[&a].state_disk.expect("a saved-state disk");
        let d = &s.disks[&disk];
        assert_eq!(d.name, "migration-1.state");
        // The guest's 256 MiB and room for device state, on the VM's volume.
        assert_eq!(d.size_bytes, (256 + STATE_HEADROOM_MIB) << 20);
        assert_eq!(d.volume, Uuid::from_u128(77));
        assert_eq!(d.allowed_initiators, vec![STATE_DISK_INITIATOR.to_string()]);
        let e = apply(&mut s, Command::DeleteDisk { id: disk })
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds the saved state of migration 1"), "{e}");
        // A second one from the same node queues, without a disk yet.
        let b = match start_quick(&mut s, 2).unwrap() {
            Outcome::Created { id } => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.migrations[&b].phase, MigrationPhase::Queued);
        assert_eq!(s.migrations[&b].state_disk, None);
        // The volume fills up meanwhile.
        let free = s.volume_free_bytes(Uuid::from_u128(77));
        apply(
            &mut s,
            Command::CreateDisk {
                name: "big".into(),
                volume: Uuid::from_u128(77),
                size_bytes: free - 200 * ALLOCATION_UNIT,
                block_size: None,
            },
        )
        .unwrap();
        // The first ends: its disk goes; the second cannot get one (the first one's space
        // is free only once every node has seen the deletion) and fails with the reason.
        finish(&mut s, a, MigrationPhase::Failed, false).unwrap();
        assert!(!s.disks.contains_key(&disk));
        assert_eq!(s.migrations[&a].state_disk, None);
        let m = &s.migrations[&b];
        assert_eq!(m.phase, MigrationPhase::Failed);
        assert!(
            m.error
                .as_deref()
                .unwrap_or("")
                .contains("no room for the quick migration's saved state"),
            "{m:?}"
        );
        // Refused up front when the room is not there.
        let e = start_quick(&mut s, 3).unwrap_err().to_string();
        assert!(e.contains("MiB free; it needs 320 MiB"), "{e}");
    }

    #[test]
    fn test_a_guest_stays_with_its_accelerator() {
        let mut s = cluster(1);
        let id = Uuid::from_u128(101);
        let report = |detail: &str| Command::ReportVm {
            id,
            node: 1,
            state: VmState::Running,
            detail: detail.into(),
            restarts: 0,
            at_ms: 2,
        };
        apply(&mut s, report("tcg")).unwrap();
        for (node, accel) in [(2, "kvm"), (3, "tcg")] {
            let cpu = crate::vm::NodeCpu {
                accel: accel.into(),
                models: vec![],
            };
            apply(&mut s, Command::ReportNodeCpu { node, cpu }).unwrap();
        }
        let e = start(&mut s, 1, 2).unwrap_err().to_string();
        assert!(
            e.contains("node 2 runs guests under kvm, but VM \"vm1\" runs under tcg on node 1"),
            "{e}"
        );
        assert!(start(&mut s, 1, 3).is_ok());
    }

    #[test]
    fn test_one_migration_per_node_and_the_rest_queue_in_order() {
        let mut s = cluster(3);
        // Node 1 is the source of all three: one runs, two queue.
        let a = start(&mut s, 1, 2).unwrap();
        let b = start(&mut s, 2, 3).unwrap();
        let c = start(&mut s, 3, 2).unwrap();
        assert_eq!(s.migrations[&a].phase, MigrationPhase::Preparing);
        assert_eq!(s.migrations[&b].phase, MigrationPhase::Queued);
        assert_eq!(s.migrations[&c].phase, MigrationPhase::Queued);
        // A VM migrates once at a time.
        let e = start(&mut s, 1, 3).unwrap_err().to_string();
        assert!(e.contains("already migrating"), "{e}");
        // When the first ends, the oldest queued one starts.
        finish(&mut s, a, MigrationPhase::Failed, false).unwrap();
        assert_eq!(s.migrations[&b].phase, MigrationPhase::Preparing);
        assert_eq!(s.migrations[&c].phase, MigrationPhase::Queued);
        // A cancelled queued migration leaves the queue at once.
        assert_eq!(
            apply(&mut s, Command::CancelMigration { id: c, now_ms: 5 }),
            Ok(Outcome::Applied)
        );
        assert_eq!(s.migrations[&c].phase, MigrationPhase::Cancelled);
    }

    #[test]
    fn test_limits_allow_two_at_once_on_four_nodes() {
        let mut s = cluster(2);
        // Move vm2 to node 3 first, so the two migrations share no node.
        let id2 = Uuid::from_u128(102);
        apply(
            &mut s,
            Command::SetVmDesired {
                id: id2,
                desired: VmDesired::Stopped,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::SetVmOwner {
                id: id2,
                owner: 3,
                expected: 1,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::SetVmDesired {
                id: id2,
                desired: VmDesired::Running,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::ReportVm {
                id: id2,
                node: 3,
                state: VmState::Running,
                detail: "tcg".into(),
                restarts: 0,
                at_ms: 3,
            },
        )
        .unwrap();
        let a = start(&mut s, 1, 2).unwrap();
        let mut big_node = node(4, &["lan"]);
        big_node.memory_bytes = 4 << 30;
        apply(&mut s, Command::UpdateNode { spec: big_node }).unwrap();
        let b = start(&mut s, 2, 4).unwrap();
        assert_eq!(s.migrations[&a].phase, MigrationPhase::Preparing);
        assert_eq!(s.migrations[&b].phase, MigrationPhase::Preparing);
        // A cluster cap of one queues the second... once limits change, queued ones follow.
        let mut s2 = s.clone();
        finish(&mut s2, b, MigrationPhase::Cancelled, false).unwrap();
        apply(
            &mut s2,
            Command::SetMigrationLimits {
                limits: MigrationLimits {
                    per_node: 1,
                    cluster: Some(1),
                },
                now_ms: 1,
            },
        )
        .unwrap();
        let again = start(&mut s2, 2, 4).unwrap();
        assert_eq!(s2.migrations[&again].phase, MigrationPhase::Queued);
        finish(&mut s2, a, MigrationPhase::Failed, false).unwrap();
        assert_eq!(s2.migrations[&again].phase, MigrationPhase::Preparing);
        assert!(
            apply(
                &mut s2,
                Command::SetMigrationLimits {
                    limits: MigrationLimits {
                        per_node: 0,
                        cluster: None
                    },
                    now_ms: 1
                }
            )
            .is_err()
        );
    }

    #[test]
    fn test_a_broken_post_copy_stream_is_mended_one_break_at_a_time() {
        let mut s = cluster(1);
        let id = match apply(
            &mut s,
            Command::StartMigration {
                vm: Uuid::from_u128(101),
                dest: 2,
                params: MigrationParams {
                    policy: MigrationPolicy::Postcopy,
                    ..params()
                },
                now_ms: 10,
            },
        ) {
            Ok(Outcome::Created { id }) => id,
            other => panic!("{other:?}"),
        };
        let recover = |s: &mut ClusterState, attempt, listen: Option<&str>, now_ms| {
            apply(
                s,
                Command::RecoverPostcopy {
                    id,
                    attempt,
                    listen: listen.map(str::to_string),
                    now_ms,
                },
            )
        };
        // Nothing to mend before the switchover.
        assert!(recover(&mut s, 1, None, 50).is_err());
        switch_over(&mut s, id, 40);
        assert_eq!(s.migrations[&id].recovery, None);
        // The destination cannot answer a break the source has not reported.
        assert!(recover(&mut s, 1, Some("127.0.0.1:8001"), 50).is_err());
        assert_eq!(recover(&mut s, 1, None, 50), Ok(Outcome::Applied));
        assert_eq!(
            recover(&mut s, 1, None, 51),
            Ok(Outcome::Unchanged),
            "a retry"
        );
        assert!(recover(&mut s, 3, None, 52).is_err(), "break 2 comes first");
        assert_eq!(
            recover(&mut s, 1, Some("127.0.0.1:8001"), 53),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            s.migrations[&id].recovery,
            Some(PostcopyRecovery {
                attempt: 1,
                listen: Some("127.0.0.1:8001".into()),
                since_ms: 50
            })
        );
        // The resumed stream broke again: a new break, the first one's time kept.
        assert_eq!(recover(&mut s, 2, None, 60), Ok(Outcome::Applied));
        assert_eq!(
            s.migrations[&id].recovery,
            Some(PostcopyRecovery {
                attempt: 2,
                listen: None,
                since_ms: 50
            })
        );
        assert!(
            recover(&mut s, 1, Some("127.0.0.1:8002"), 61).is_err(),
            "an answer to an earlier break"
        );
        finish(&mut s, id, MigrationPhase::Completed, true).unwrap();
        assert!(recover(&mut s, 3, None, 70).is_err(), "ended");
    }

    #[test]
    fn test_a_failure_keeps_what_each_node_reported() {
        let mut s = cluster(1);
        let id = start(&mut s, 1, 2).unwrap();
        let fail = |s: &mut ClusterState, why: &str| {
            apply(
                s,
                Command::FinishMigration {
                    id,
                    phase: MigrationPhase::Failed,
                    error: Some(why.into()),
                    total_ms: None,
                    downtime_ms: None,
                    now_ms: 20,
                    committed: false,
                },
            )
        };
        assert_eq!(
            fail(&mut s, "the destination QEMU ended"),
            Ok(Outcome::Applied)
        );
        assert_eq!(fail(&mut s, "source QEMU: gone"), Ok(Outcome::Applied));
        assert_eq!(
            fail(&mut s, "source QEMU: gone"),
            Ok(Outcome::Unchanged),
            "a retry"
        );
        assert_eq!(
            s.migrations[&id].error.as_deref(),
            Some("the destination QEMU ended; source QEMU: gone")
        );
        assert_eq!(s.migrations[&id].finished_at_ms, Some(20));
        assert!(finish(&mut s, id, MigrationPhase::Cancelled, false).is_err());
    }

    #[test]
    fn test_commit_moves_the_owner_and_races_with_failure_and_cancel() {
        let mut s = cluster(1);
        let vm = Uuid::from_u128(101);
        let id = start(&mut s, 1, 2).unwrap();
        let step = |s: &mut ClusterState, from, to| {
            apply(
                s,
                Command::AdvanceMigration {
                    id,
                    from,
                    to,
                    at_ms: None,
                    listen: None,
                },
            )
        };
        let commit = |s: &mut ClusterState| {
            apply(
                s,
                Command::CommitMigration {
                    id,
                    qemu_downtime_ms: 12,
                    switchover_at_ms: 30,
                },
            )
        };
        // No commit before copying.
        assert!(commit(&mut s).is_err());
        assert_eq!(
            step(&mut s, MigrationPhase::Preparing, MigrationPhase::Ready),
            Ok(Outcome::Applied)
        );
        assert!(
            step(&mut s, MigrationPhase::Preparing, MigrationPhase::Ready).is_ok(),
            "a retry"
        );
        assert!(
            step(&mut s, MigrationPhase::Copying, MigrationPhase::Committed).is_err(),
            "not a step"
        );
        // A copy that ends before the source's first report commits from `ready`.
        let mut quick_copy = s.clone();
        assert_eq!(commit(&mut quick_copy), Ok(Outcome::Applied));
        assert_eq!(quick_copy.vms[&vm].owner, 2);
        // The first progress report records the copy under way.
        assert_eq!(
            apply(
                &mut s,
                Command::ReportMigration {
                    id,
                    progress: MigrationProgress {
                        transferred_bytes: 1,
                        ..Default::default()
                    },
                },
            ),
            Ok(Outcome::Applied)
        );
        assert_eq!(s.migrations[&id].phase, MigrationPhase::Copying);
        assert_eq!(
            step(&mut s, MigrationPhase::Ready, MigrationPhase::Copying),
            Ok(Outcome::Unchanged)
        );
        // The VM can neither be stopped nor moved meanwhile.
        let e = apply(
            &mut s,
            Command::SetVmDesired {
                id: vm,
                desired: VmDesired::Stopped,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is migrating"), "{e}");

        // A failure report racing the commit: whichever comes first wins.
        let mut failed_first = s.clone();
        assert_eq!(
            finish(&mut failed_first, id, MigrationPhase::Failed, false),
            Ok(Outcome::Applied)
        );
        assert!(commit(&mut failed_first).is_err());
        assert_eq!(failed_first.vms[&vm].owner, 1);

        let mut cancelled = s.clone();
        apply(&mut cancelled, Command::CancelMigration { id, now_ms: 5 }).unwrap();
        assert!(
            commit(&mut cancelled).is_err(),
            "a cancelled migration never switches over"
        );
        assert_eq!(
            finish(&mut cancelled, id, MigrationPhase::Cancelled, false),
            Ok(Outcome::Applied)
        );

        assert_eq!(commit(&mut s), Ok(Outcome::Applied));
        assert_eq!(s.vms[&vm].owner, 2);
        assert_eq!(s.migrations[&id].qemu_downtime_ms, Some(12));
        assert!(
            finish(&mut s, id, MigrationPhase::Failed, false).is_err(),
            "the source may not fail it now"
        );
        assert!(
            apply(&mut s, Command::CancelMigration { id, now_ms: 5 }).is_err(),
            "too late to cancel"
        );
        // Only the old owner's reports are now refused.
        assert!(
            apply(
                &mut s,
                Command::ReportVm {
                    id: vm,
                    node: 1,
                    state: VmState::Stopped,
                    detail: String::new(),
                    restarts: 0,
                    at_ms: 9
                }
            )
            .is_err()
        );
        assert_eq!(
            finish(&mut s, id, MigrationPhase::Completed, true),
            Ok(Outcome::Applied)
        );
        assert_eq!(s.migrations[&id].phase, MigrationPhase::Completed);
        assert!(s.open_migration(vm).is_none());
    }

    #[test]
    fn test_migration_to_or_from_a_down_node_is_refused() {
        let mut s = cluster(2);
        let down = crate::node::DOWN_AFTER.as_millis() as u64;
        for n in [1, 3] {
            apply(
                &mut s,
                Command::Heartbeat {
                    id: n,
                    at_ms: 5_000,
                },
            )
            .unwrap();
        }
        let at = |s: &mut ClusterState, dest: NodeId, now_ms: u64| {
            apply(
                s,
                Command::StartMigration {
                    vm: Uuid::from_u128(101),
                    dest,
                    params: params(),
                    now_ms,
                },
            )
        };
        // Node 2 last heartbeat at 1: down by 5_000 + DOWN_AFTER.
        match at(&mut s, 2, 5_000 + down) {
            Err(ApplyError::PreconditionFailed { reason }) => {
                assert!(
                    reason.contains("node 2 (the destination) is down"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(s.migrations.is_empty());
        // Node 3 heartbeated at 5_000: up until DOWN_AFTER later, and the owner (1) too.
        assert!(matches!(
            at(&mut s, 3, 5_000 + down),
            Ok(Outcome::Created { .. })
        ));
        // The owner down: refused, with the owner named.
        let mut s = cluster(1);
        apply(
            &mut s,
            Command::Heartbeat {
                id: 2,
                at_ms: 5_000 + down,
            },
        )
        .unwrap();
        match at(&mut s, 2, 5_000 + down) {
            Err(ApplyError::PreconditionFailed { reason }) => {
                assert!(
                    reason.contains("node 1 (the VM's owner) is down"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_stranded_migrations_are_the_uncommitted_ones_with_a_down_node() {
        let mut s = cluster(3);
        let down = crate::node::DOWN_AFTER.as_millis() as u64;
        // Preparing (to 2), queued behind it (to 3: node 1 is busy), and one committed (to 2).
        let preparing = start(&mut s, 1, 2).unwrap();
        let queued = start(&mut s, 2, 3).unwrap();
        assert_eq!(s.migrations[&queued].phase, MigrationPhase::Queued);
        assert!(s.stranded_migrations(10).is_empty());
        // Everyone heartbeats except node 2.
        for n in [1, 3, 4] {
            apply(
                &mut s,
                Command::Heartbeat {
                    id: n,
                    at_ms: 2 * down,
                },
            )
            .unwrap();
        }
        let stranded = s.stranded_migrations(2 * down);
        assert_eq!(stranded.len(), 1, "{stranded:?}");
        assert_eq!(stranded[0].0, preparing);
        assert!(
            stranded[0]
                .1
                .contains("destination (node 2) went down during the preparing phase"),
            "{}",
            stranded[0].1
        );
        // Recorded as failed, the queued one is admitted; node 1 then goes down too.
        apply(
            &mut s,
            Command::FinishMigration {
                id: preparing,
                phase: MigrationPhase::Failed,
                error: Some(stranded[0].1.clone()),
                total_ms: None,
                downtime_ms: None,
                now_ms: 2 * down,
                committed: false,
            },
        )
        .unwrap();
        assert_eq!(s.migrations[&queued].phase, MigrationPhase::Preparing);
        for n in [3, 4] {
            apply(
                &mut s,
                Command::Heartbeat {
                    id: n,
                    at_ms: 4 * down,
                },
            )
            .unwrap();
        }
        let stranded = s.stranded_migrations(4 * down);
        assert_eq!(stranded.len(), 1);
        assert_eq!(stranded[0].0, queued);
        assert!(
            stranded[0].1.contains("source (node 1)"),
            "{}",
            stranded[0].1
        );
        // A committed migration is its destination's to finish, down or not.
        switch_over(&mut s, queued, 4 * down);
        assert!(s.stranded_migrations(8 * down).is_empty());
    }

    #[test]
    fn test_a_paused_vm_moves_paused_but_not_by_post_copy() {
        let mut s = cluster(1);
        let vm = Uuid::from_u128(101);
        apply(
            &mut s,
            Command::SetVmDesired {
                id: vm,
                desired: VmDesired::Paused,
            },
        )
        .unwrap();
        // Wanted paused but still reported running: not yet.
        let with = |s: &mut ClusterState, policy| {
            apply(
                s,
                Command::StartMigration {
                    vm,
                    dest: 2,
                    params: MigrationParams { policy, ..params() },
                    now_ms: 10,
                },
            )
        };
        match with(&mut s, MigrationPolicy::Precopy) {
            Err(ApplyError::PreconditionFailed { reason }) => {
                assert!(reason.contains("only a running (or paused) VM"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        apply(
            &mut s,
            Command::ReportVm {
                id: vm,
                node: 1,
                state: VmState::Paused,
                detail: "tcg".into(),
                restarts: 0,
                at_ms: 2,
            },
        )
        .unwrap();
        match with(&mut s, MigrationPolicy::Postcopy) {
            Err(ApplyError::PreconditionFailed { reason }) => {
                assert!(reason.contains("is paused: post-copy needs"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let Ok(Outcome::Created { id }) = with(&mut s, MigrationPolicy::Precopy) else {
            panic!("a paused VM moves by pre-copy");
        };
        assert!(s.migrations[&id].paused);
        // Its wanted state holds while it moves.
        assert!(
            apply(
                &mut s,
                Command::SetVmDesired {
                    id: vm,
                    desired: VmDesired::Running,
                },
            )
            .is_err()
        );
    }

    #[test]
    fn test_the_serving_node_stamps_a_migration_request_with_its_clock() {
        let mut s = cluster(1);
        let now = 3_600_000;
        for n in 1..=4 {
            apply(&mut s, Command::Heartbeat { id: n, at_ms: now }).unwrap();
        }
        // A client whose clock runs an hour ahead would read every node as down.
        let mut cmd = Command::StartMigration {
            vm: Uuid::from_u128(101),
            dest: 2,
            params: params(),
            now_ms: now + 3_600_000,
        };
        assert!(apply(&mut s.clone(), cmd.clone()).is_err());
        // The node that takes it from the client puts its own clock in.
        cmd.stamp_clock(now + 10);
        assert!(matches!(apply(&mut s, cmd), Ok(Outcome::Created { .. })));
        let mut other = Command::Heartbeat { id: 1, at_ms: 7 };
        other.stamp_clock(now);
        assert_eq!(other, Command::Heartbeat { id: 1, at_ms: 7 });
    }
}
