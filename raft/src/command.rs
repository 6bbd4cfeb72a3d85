//! The typed, versioned command set of the metadata state machine.
//!
//! A [`Request`] is what goes into the Raft log: an envelope with the command-set version and
//! one [`Command`]. Commands carry every input their effect depends on (for example the
//! proposer's clock reading), so applying the same log on every node yields the same state.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::NodeId;
use crate::state::{ApplyError, NodeAdminState, NodeSpec};
use crate::volume::{DiskId, IoMode};

/// Version of the command encoding. Bumped when a command changes shape; a node refuses to
/// apply a version it does not know rather than guess.
pub const COMMAND_VERSION: u32 = 1;

/// A log entry's application payload: one versioned command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The command-set version the proposer encoded `cmd` with.
    pub v: u32,
    /// The command.
    pub cmd: Command,
}

impl Request {
    /// Wraps a command in the current envelope version.
    pub fn new(cmd: Command) -> Self {
        Self {
            v: COMMAND_VERSION,
            cmd,
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{} {}", self.v, self.cmd.name())
    }
}

/// A change to the cluster metadata.
///
/// Later layers add siblings here (volumes, LUNs, reservations, VMs, migrations); each is
/// validated in [`crate::state::ClusterState::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Names the cluster. Applied once, by the first node, right after bootstrap.
    InitCluster {
        /// The new cluster's identity.
        cluster_id: Uuid,
    },
    /// Adds a node to the node table (the first step of a join).
    RegisterNode {
        /// What the node reports about itself.
        spec: NodeSpec,
        /// The proposer's wall clock, in milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Refreshes what a registered node reports about itself (after a restart or upgrade).
    UpdateNode {
        /// The node's current description; `spec.id` names the node.
        spec: NodeSpec,
    },
    /// Records that a node is alive and can commit through the quorum.
    Heartbeat {
        /// The node.
        id: NodeId,
        /// The node's wall clock, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Changes a node's administrative state (for example to drain it for maintenance).
    SetNodeState {
        /// The node.
        id: NodeId,
        /// The new state.
        state: NodeAdminState,
    },
    /// Deletes a node from the node table (after it left the Raft membership).
    RemoveNode {
        /// The node.
        id: NodeId,
    },
    /// Registers a shared volume whose superblock has been written.
    RegisterVolume {
        /// The UUID in the volume's superblock.
        id: Uuid,
        /// Unique volume name.
        name: String,
        /// Device size in bytes.
        device_bytes: u64,
        /// First byte extents may use.
        data_offset: u64,
        /// The node that will execute redirected I/O.
        coordinator: NodeId,
        /// The proposer's wall clock, in milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Carves a virtual disk out of a volume.
    CreateDisk {
        /// Unique disk name.
        name: String,
        /// The volume.
        volume: Uuid,
        /// Size in bytes, a multiple of [`crate::volume::ALLOCATION_UNIT`].
        size_bytes: u64,
        /// Logical block size of its LUN, 512 or 4096 (`None`: 512).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_size: Option<u32>,
    },
    /// Grows a virtual disk.
    ResizeDisk {
        /// The disk.
        id: DiskId,
        /// The new size in bytes (not smaller than the current one).
        size_bytes: u64,
    },
    /// Deletes a virtual disk; its space becomes free once every node has acknowledged the
    /// deletion's epoch.
    DeleteDisk {
        /// The disk.
        id: DiskId,
    },
    /// A node's report on its access to a volume: its I/O mode, its device path and the
    /// newest epoch it has adopted.
    ReportVolume {
        /// The volume.
        volume: Uuid,
        /// The reporting node.
        node: NodeId,
        /// Its I/O mode.
        mode: IoMode,
        /// Its path to the device, if it has one.
        path: Option<String>,
        /// The newest epoch it has drained for and switched to.
        acked_epoch: u64,
        /// The node's clock, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// An operator's choice of redirected I/O for a node (or the end of it).
    SetVolumeMode {
        /// The volume.
        volume: Uuid,
        /// The node.
        node: NodeId,
        /// True: send this node's I/O to the coordinator; false: direct when it can.
        redirected: bool,
    },
    /// Moves a volume's coordinator role, if it is still held by `expected`.
    SetCoordinator {
        /// The volume.
        volume: Uuid,
        /// The new coordinator.
        node: NodeId,
        /// The coordinator the proposer saw; the command fails if it changed meanwhile.
        expected: NodeId,
    },
    /// Replaces a disk's SCSI reservation state if its version is still `expected`.
    SetReservations {
        /// The disk (LUN).
        disk: DiskId,
        /// The version the proposer read (0: none stored yet); the command fails if it
        /// changed meanwhile.
        expected: u64,
        /// The new state, encoded by the iSCSI target (opaque to the state machine).
        data: String,
    },
    /// Counts a SCSI LUN reset of a disk, received through any node's portal: every node
    /// reports it to the initiators connected to it.
    CountReset {
        /// The disk.
        disk: DiskId,
    },
    /// Sets which initiators may use a disk's LUN (empty: every initiator).
    SetDiskAccess {
        /// The disk.
        id: DiskId,
        /// iSCSI initiator names allowed.
        initiators: Vec<String>,
    },
    /// Sets or clears a disk's software write protect: while set, its LUN refuses writes
    /// through every node's portal.
    SetDiskWriteProtect {
        /// The disk.
        id: DiskId,
        /// True: refuse writes; false: allow them again.
        on: bool,
    },
    /// Defines a VM (stopped) on its owner node.
    CreateVm {
        /// The VM's identity.
        id: Uuid,
        /// Unique name.
        name: String,
        /// Its hardware and boot method.
        spec: crate::vm::VmSpec,
        /// The node that will run it.
        owner: NodeId,
        /// The proposer's wall clock, in milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Deletes a stopped VM's definition (its disks stay).
    DeleteVm {
        /// The VM.
        id: Uuid,
    },
    /// Sets whether a VM should run; its owner starts or stops it.
    SetVmDesired {
        /// The VM.
        id: Uuid,
        /// Running or stopped.
        desired: crate::vm::VmDesired,
    },
    /// Moves a VM to another node, if it is still owned by `expected` (a migration's
    /// switchover).
    SetVmOwner {
        /// The VM.
        id: Uuid,
        /// The new owner.
        owner: NodeId,
        /// The owner the proposer saw; the command fails if it changed meanwhile.
        expected: NodeId,
    },
    /// The owner's report on its VM's QEMU; refused from any other node.
    ReportVm {
        /// The VM.
        id: Uuid,
        /// The reporting node.
        node: NodeId,
        /// What runs.
        state: crate::vm::VmState,
        /// Detail for the operator.
        detail: String,
        /// Restarts after crashes since the last requested start.
        restarts: u32,
        /// The node's clock, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Asks for a live migration of a running VM to `dest`, after the checks (see
    /// [`crate::ClusterState::check_migration`]); it starts at once or queues.
    StartMigration {
        /// The VM.
        vm: Uuid,
        /// The destination node.
        dest: NodeId,
        /// Bandwidth, downtime and policy.
        params: crate::migration::MigrationParams,
        /// The proposer's wall clock, ms since the Unix epoch.
        now_ms: u64,
    },
    /// One step of a migration, if it is still at `from`.
    AdvanceMigration {
        /// The migration.
        id: crate::migration::MigrationId,
        /// The phase the proposer saw.
        from: crate::migration::MigrationPhase,
        /// The next phase.
        to: crate::migration::MigrationPhase,
        /// The proposer's wall clock, ms since the Unix epoch (recorded for `ready`).
        #[serde(default)]
        at_ms: Option<u64>,
        /// For `ready`: the address (`host:port`) the destination's QEMU listens on, which
        /// is the node's migration address or, with several migrations arriving at once, a
        /// port above it.
        #[serde(default)]
        listen: Option<String>,
    },
    /// The source's view of the copy.
    ReportMigration {
        /// The migration.
        id: crate::migration::MigrationId,
        /// Bytes, rates, estimates.
        progress: crate::migration::MigrationProgress,
    },
    /// Post-copy, after the switchover, when the migration stream broke: the source says
    /// it broke (break number `attempt`, no `listen`), then the destination says where it
    /// listens for the resumed stream (`listen`, for that break).
    RecoverPostcopy {
        /// The migration.
        id: crate::migration::MigrationId,
        /// Which break (1 for the first).
        attempt: u32,
        /// The destination's new listening address (`host:port`).
        listen: Option<String>,
        /// The proposer's wall clock, ms since the Unix epoch.
        now_ms: u64,
    },
    /// The switchover: the VM becomes the destination's, unless the migration was cancelled
    /// or failed first.
    CommitMigration {
        /// The migration.
        id: crate::migration::MigrationId,
        /// The downtime QEMU measured at the source.
        qemu_downtime_ms: u64,
        /// The source's clock when its QEMU completed, ms since the Unix epoch.
        switchover_at_ms: u64,
    },
    /// Ends a migration: completed (after the commit), failed or cancelled.
    FinishMigration {
        /// The migration.
        id: crate::migration::MigrationId,
        /// Completed, Failed or Cancelled.
        phase: crate::migration::MigrationPhase,
        /// Why it failed.
        error: Option<String>,
        /// From admission to the guest running on the destination.
        total_ms: Option<u64>,
        /// From the pause on the source to the resumption on the destination.
        downtime_ms: Option<u64>,
        /// The proposer's wall clock, ms since the Unix epoch.
        now_ms: u64,
        /// Whether the proposer expects the switchover to have been committed: a source
        /// that gives up before the commit must not end a committed migration.
        committed: bool,
    },
    /// Asks to cancel a migration (honoured until the switchover).
    CancelMigration {
        /// The migration.
        id: crate::migration::MigrationId,
        /// The proposer's wall clock, ms since the Unix epoch.
        now_ms: u64,
    },
    /// Sets how many migrations run at once.
    SetMigrationLimits {
        /// Per node and cluster-wide.
        limits: crate::migration::MigrationLimits,
        /// The proposer's wall clock, ms since the Unix epoch.
        now_ms: u64,
    },
    /// A node's report on what its guests run on (its accelerator and the QEMU CPU models
    /// it can run), for the `cluster-baseline` CPU model and migration checks.
    ReportNodeCpu {
        /// The node.
        node: NodeId,
        /// What it reports.
        cpu: crate::vm::NodeCpu,
    },
    /// Sets (or clears, with `None`) the CHAP credentials of the cluster's iSCSI target.
    SetIscsiAuth {
        /// The credentials.
        chap: Option<crate::volume::ChapAuth>,
    },
}

impl Command {
    /// Puts the clock of the node that takes the command from a client (`now_ms`) into it
    /// where the state machine judges by it: a migration's pre-checks read the nodes'
    /// heartbeats against it, and the client's clock (an operator's workstation) is not
    /// kept in step with the nodes'.
    pub fn stamp_clock(&mut self, now: u64) {
        if let Command::StartMigration { now_ms, .. } = self {
            *now_ms = now;
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init_cluster",
            Command::RegisterNode { .. } => "register_node",
            Command::UpdateNode { .. } => "update_node",
            Command::Heartbeat { .. } => "heartbeat",
            Command::SetNodeState { .. } => "set_node_state",
            Command::RemoveNode { .. } => "remove_node",
            Command::RegisterVolume { .. } => "register_volume",
            Command::CreateDisk { .. } => "create_disk",
            Command::ResizeDisk { .. } => "resize_disk",
            Command::DeleteDisk { .. } => "delete_disk",
            Command::ReportVolume { .. } => "report_volume",
            Command::SetVolumeMode { .. } => "set_volume_mode",
            Command::SetCoordinator { .. } => "set_coordinator",
            Command::SetReservations { .. } => "set_reservations",
            Command::SetDiskAccess { .. } => "set_disk_access",
            Command::SetDiskWriteProtect { .. } => "set_disk_write_protect",
            Command::CountReset { .. } => "count_reset",
            Command::SetIscsiAuth { .. } => "set_iscsi_auth",
            Command::CreateVm { .. } => "create_vm",
            Command::DeleteVm { .. } => "delete_vm",
            Command::SetVmDesired { .. } => "set_vm_desired",
            Command::SetVmOwner { .. } => "set_vm_owner",
            Command::ReportVm { .. } => "report_vm",
            Command::ReportNodeCpu { .. } => "report_node_cpu",
            Command::StartMigration { .. } => "start_migration",
            Command::AdvanceMigration { .. } => "advance_migration",
            Command::ReportMigration { .. } => "report_migration",
            Command::CommitMigration { .. } => "commit_migration",
            Command::RecoverPostcopy { .. } => "recover_postcopy",
            Command::FinishMigration { .. } => "finish_migration",
            Command::CancelMigration { .. } => "cancel_migration",
            Command::SetMigrationLimits { .. } => "set_migration_limits",
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The command changed the state.
    Applied,
    /// The command asked for what the state already holds (an idempotent retry).
    Unchanged,
    /// A log entry without a command (leader blank entry or membership change).
    Internal,
    /// The command created an object with this id (a virtual disk).
    Created {
        /// The new object's id.
        id: u64,
    },
}

/// The state machine's answer to one log entry.
pub type Response = Result<Outcome, ApplyError>;
