//! The cluster metadata state and the pure function that applies commands to it.
//!
//! [`ClusterState::apply`] is deterministic and never panics: a command that does not fit the
//! current state is rejected with an [`ApplyError`] that is returned to the proposer and
//! leaves the state untouched. Every node applies the same log and holds the same state.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::command::{COMMAND_VERSION, Command, Outcome, Request};
use crate::volume::{
    ALLOCATION_UNIT, ChapAuth, DiskId, DiskRecord, PendingFree, ReservationRecord, VolumeNodeState,
    VolumeRecord, allocate, free_gaps, used_extents,
};
use crate::{MIN_PROTOCOL_VERSION, NodeId, PROTOCOL_VERSION};

/// What a node reports about itself when it joins or restarts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node's id (never 0).
    pub id: NodeId,
    /// Address of the node's gRPC server (Raft and cluster API), `host:port`.
    pub grpc_addr: String,
    /// Address of the node's iSCSI portal, `host:port`.
    pub iscsi_addr: String,
    /// Address QEMU listens on for incoming live migrations, `host:port`.
    pub migration_addr: String,
    /// Address of the node's block-I/O listener (redirected I/O), `host:port`.
    #[serde(default)]
    pub io_addr: String,
    /// The processor model name.
    pub cpu_model: String,
    /// The processor feature flags, sorted.
    pub cpu_flags: Vec<String>,
    /// Names of the virtual switches this node has.
    pub switches: Vec<String>,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// The csvd software version.
    pub version: String,
    /// The node-to-node protocol version the node speaks.
    pub protocol_version: u32,
}

/// A node's administrative state, set by operators; liveness is derived from heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAdminState {
    /// Takes part in everything.
    #[default]
    Active,
    /// In maintenance: takes no new work.
    Draining,
}

impl std::fmt::Display for NodeAdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeAdminState::Active => "active",
            NodeAdminState::Draining => "draining",
        })
    }
}

/// One row of the node table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What the node last reported about itself. Shared, so copying the state (once per
    /// applied batch, for watchers) does not copy every node's processor flags.
    pub spec: Arc<NodeSpec>,
    /// Administrative state.
    pub admin_state: NodeAdminState,
    /// When the node was registered (proposer's clock, ms since the Unix epoch).
    pub joined_at_ms: u64,
    /// The node's clock at its last committed heartbeat, if any.
    pub last_heartbeat_ms: Option<u64>,
}

/// The whole replicated metadata.
///
/// Each kind of object lives in its own map keyed by id, so later kinds (volumes, LUNs,
/// reservations, VMs, migrations) are siblings of `nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster's identity, set once by [`Command::InitCluster`].
    pub cluster_id: Option<Uuid>,
    /// The node table.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Shared volumes, by the UUID in their superblock.
    #[serde(default)]
    pub volumes: BTreeMap<Uuid, VolumeRecord>,
    /// Virtual disks, by id.
    #[serde(default)]
    pub disks: BTreeMap<DiskId, DiskRecord>,
    /// The id the next disk gets (ids are never reused).
    #[serde(default)]
    pub next_disk_id: DiskId,
    /// SCSI reservation state of each disk that has any.
    #[serde(default)]
    pub reservations: BTreeMap<DiskId, ReservationRecord>,
    /// CHAP credentials of the iSCSI target, if set.
    #[serde(default)]
    pub iscsi_chap: Option<ChapAuth>,
    /// Virtual machines, by id.
    #[serde(default)]
    pub vms: BTreeMap<Uuid, crate::vm::VmRecord>,
    /// Live migrations, by id (the newest [`MIGRATION_HISTORY`] ended ones stay, as
    /// history).
    ///
    /// [`MIGRATION_HISTORY`]: crate::migration::MIGRATION_HISTORY
    #[serde(default)]
    pub migrations: BTreeMap<crate::migration::MigrationId, crate::migration::MigrationRecord>,
    /// The id the next migration gets.
    #[serde(default)]
    pub next_migration_id: crate::migration::MigrationId,
    /// How many migrations run at once.
    #[serde(default)]
    pub migration_limits: crate::migration::MigrationLimits,
    /// What each node's guests run on, as the node last reported it.
    #[serde(default)]
    pub node_cpus: BTreeMap<NodeId, crate::vm::NodeCpu>,
}

/// Why a command was rejected. The messages are what the operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ApplyError {
    /// The command was encoded with a command-set version this node does not know.
    #[error(
        "command version {got} is not supported (this node applies versions up to {supported})"
    )]
    UnsupportedCommandVersion {
        /// The version in the log entry.
        got: u32,
        /// The newest version this node applies.
        supported: u32,
    },
    /// The cluster has no identity yet.
    #[error("the cluster is not initialized")]
    NotInitialized,
    /// The cluster already has an identity.
    #[error("the cluster is already initialized as {cluster_id}")]
    AlreadyInitialized {
        /// The existing identity.
        cluster_id: Uuid,
    },
    /// No node has this id.
    #[error("node {id} is not a member of the cluster")]
    UnknownNode {
        /// The id asked for.
        id: NodeId,
    },
    /// Another node already uses this id.
    #[error("node id {id} is already used by the node at {existing_addr}")]
    DuplicateNodeId {
        /// The contested id.
        id: NodeId,
        /// The gRPC address of the node that holds the id.
        existing_addr: String,
    },
    /// Another node already uses this address.
    #[error("address {addr} is already used by node {holder}")]
    DuplicateAddress {
        /// The contested address.
        addr: String,
        /// The node that holds it.
        holder: NodeId,
    },
    /// The node speaks a protocol version the cluster cannot speak.
    #[error(
        "node {id} speaks protocol version {got}; this cluster speaks versions \
         {min} to {max}: run matching csvd software on every node"
    )]
    IncompatibleProtocol {
        /// The node.
        id: NodeId,
        /// The version the node reported.
        got: u32,
        /// Oldest version the cluster speaks.
        min: u32,
        /// Newest version the cluster speaks.
        max: u32,
    },
    /// A field of the command is not acceptable on its own.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field.
        field: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The command does not fit the current state.
    #[error("precondition failed: {reason}")]
    PreconditionFailed {
        /// What does not fit.
        reason: String,
    },
    /// No volume has this id.
    #[error("volume {id} is not registered")]
    UnknownVolume {
        /// The id asked for.
        id: Uuid,
    },
    /// No virtual disk has this id.
    #[error("disk {id} does not exist")]
    UnknownDisk {
        /// The id asked for.
        id: DiskId,
    },
    /// No VM has this id.
    #[error("VM {id} does not exist")]
    UnknownVm {
        /// The id asked for.
        id: Uuid,
    },
    /// The name is taken.
    #[error("a {kind} named {name:?} already exists")]
    DuplicateName {
        /// "volume" or "disk".
        kind: String,
        /// The name.
        name: String,
    },
    /// The volume has too little free space; nothing was allocated.
    #[error(
        "volume {volume} has {free} bytes free, {need} are needed{}",
        if *pending > 0 {
            format!(" ({pending} more bytes are freed and become reusable once every node has acknowledged the deletion)")
        } else {
            String::new()
        }
    )]
    VolumeFull {
        /// The volume.
        volume: Uuid,
        /// Bytes requested.
        need: u64,
        /// Bytes free.
        free: u64,
        /// Bytes freed but held back until every node has acknowledged the deletion.
        #[serde(default)]
        pending: u64,
    },
}

impl ClusterState {
    /// Whether node `id` committed a heartbeat within [`crate::node::DOWN_AFTER`] of `now_ms`
    /// (node clocks are assumed to agree, as NTP keeps them).
    pub fn node_up(&self, id: NodeId, now_ms: u64) -> bool {
        self.nodes
            .get(&id)
            .and_then(|n| n.last_heartbeat_ms)
            .is_some_and(|t| now_ms.saturating_sub(t) <= crate::node::DOWN_AFTER.as_millis() as u64)
    }

    /// Applies one log entry's request. On error the state is unchanged.
    pub fn apply(&mut self, req: &Request) -> Result<Outcome, ApplyError> {
        if req.v > COMMAND_VERSION || req.v == 0 {
            return Err(ApplyError::UnsupportedCommandVersion {
                got: req.v,
                supported: COMMAND_VERSION,
            });
        }
        match &req.cmd {
            Command::InitCluster { cluster_id } => self.init_cluster(*cluster_id),
            Command::RegisterNode { spec, now_ms } => {
                self.require_initialized()?;
                self.register_node(spec, *now_ms)
            }
            Command::UpdateNode { spec } => {
                self.require_initialized()?;
                self.update_node(spec)
            }
            Command::Heartbeat { id, at_ms } => {
                self.require_initialized()?;
                let node = self.node_mut(*id)?;
                // Clocks of different nodes are not compared; a heartbeat only moves forward.
                if node.last_heartbeat_ms.is_some_and(|t| t >= *at_ms) {
                    return Ok(Outcome::Unchanged);
                }
                node.last_heartbeat_ms = Some(*at_ms);
                Ok(Outcome::Applied)
            }
            Command::SetNodeState { id, state } => {
                self.require_initialized()?;
                let node = self.node_mut(*id)?;
                if node.admin_state == *state {
                    return Ok(Outcome::Unchanged);
                }
                node.admin_state = *state;
                Ok(Outcome::Applied)
            }
            Command::RemoveNode { id } => {
                self.require_initialized()?;
                let owned: Vec<&str> = self
                    .vms
                    .values()
                    .filter(|v| v.owner == *id)
                    .map(|v| v.name.as_str())
                    .collect();
                if !owned.is_empty() {
                    return Err(ApplyError::PreconditionFailed {
                        reason: format!(
                            "node {id} still owns VMs {}: move or delete them first",
                            owned.join(", ")
                        ),
                    });
                }
                self.node_cpus.remove(id);
                if self.nodes.remove(id).is_none() {
                    return Err(ApplyError::UnknownNode { id: *id });
                }
                let vols: Vec<Uuid> = self.volumes.keys().copied().collect();
                for v in vols {
                    if let Some(vol) = self.volumes.get_mut(&v) {
                        vol.nodes.remove(id);
                        vol.redirect_requested.remove(id);
                    }
                    self.release_freed(v);
                }
                Ok(Outcome::Applied)
            }
            Command::RegisterVolume {
                id,
                name,
                device_bytes,
                data_offset,
                coordinator,
                now_ms,
            } => {
                self.require_initialized()?;
                let v = VolumeRecord {
                    id: *id,
                    name: name.clone(),
                    device_bytes: *device_bytes,
                    data_offset: *data_offset,
                    coordinator: *coordinator,
                    epoch: 0,
                    created_at_ms: *now_ms,
                    nodes: BTreeMap::new(),
                    redirect_requested: Default::default(),
                    pending_free: Vec::new(),
                };
                self.register_volume(v)
            }
            Command::CreateDisk {
                name,
                volume,
                size_bytes,
                block_size,
            } => {
                self.require_initialized()?;
                let block_size = block_size.unwrap_or(512);
                if block_size != 512 && block_size != 4096 {
                    return Err(ApplyError::InvalidArgument {
                        field: "block_size".into(),
                        reason: format!("{block_size} is not 512 or 4096"),
                    });
                }
                self.create_disk(name, *volume, *size_bytes, block_size)
            }
            Command::ResizeDisk { id, size_bytes } => {
                self.require_initialized()?;
                self.resize_disk(*id, *size_bytes)
            }
            Command::DeleteDisk { id } => {
                self.require_initialized()?;
                let users: Vec<&str> = self
                    .vms_using_disk(*id)
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(ApplyError::PreconditionFailed {
                        reason: format!(
                            "disk {id} is attached to VM {}: delete the VM first",
                            users.join(", ")
                        ),
                    });
                }
                if let Some(m) = self.migrations.values().find(|m| m.state_disk == Some(*id)) {
                    return Err(ApplyError::PreconditionFailed {
                        reason: format!(
                            "disk {id} holds the saved state of migration {} (VM {:?}): it goes away when the migration ends",
                            m.id, m.vm_name
                        ),
                    });
                }
                self.delete_disk(*id)
            }
            Command::ReportVolume {
                volume,
                node,
                mode,
                path,
                acked_epoch,
                at_ms,
            } => {
                self.require_initialized()?;
                if !self.nodes.contains_key(node) {
                    return Err(ApplyError::UnknownNode { id: *node });
                }
                let vol = self.volume_mut(*volume)?;
                if *acked_epoch > vol.epoch {
                    return Err(invalid(
                        "acked_epoch",
                        format!(
                            "{acked_epoch} is newer than the volume's epoch {}",
                            vol.epoch
                        ),
                    ));
                }
                let new = VolumeNodeState {
                    mode: *mode,
                    path: path.clone(),
                    acked_epoch: *acked_epoch,
                    at_ms: *at_ms,
                };
                let old = vol.nodes.get(node);
                // Reports only move forward: a delayed one never undoes a newer one.
                if old.is_some_and(|o| o.at_ms >= *at_ms || o.acked_epoch > *acked_epoch) {
                    return Ok(Outcome::Unchanged);
                }
                vol.nodes.insert(*node, new);
                self.release_freed(*volume);
                Ok(Outcome::Applied)
            }
            Command::SetVolumeMode {
                volume,
                node,
                redirected,
            } => {
                self.require_initialized()?;
                if !self.nodes.contains_key(node) {
                    return Err(ApplyError::UnknownNode { id: *node });
                }
                let vol = self.volume_mut(*volume)?;
                let changed = if *redirected {
                    vol.redirect_requested.insert(*node)
                } else {
                    vol.redirect_requested.remove(node)
                };
                if !changed {
                    return Ok(Outcome::Unchanged);
                }
                vol.epoch += 1;
                Ok(Outcome::Applied)
            }
            Command::SetCoordinator {
                volume,
                node,
                expected,
            } => {
                self.require_initialized()?;
                if !self.nodes.contains_key(node) {
                    return Err(ApplyError::UnknownNode { id: *node });
                }
                let vol = self.volume_mut(*volume)?;
                if vol.coordinator == *node {
                    return Ok(Outcome::Unchanged);
                }
                if vol.coordinator != *expected {
                    return Err(ApplyError::PreconditionFailed {
                        reason: format!(
                            "volume {volume} is coordinated by node {}, not {expected}",
                            vol.coordinator
                        ),
                    });
                }
                vol.coordinator = *node;
                vol.epoch += 1;
                Ok(Outcome::Applied)
            }
            Command::SetReservations {
                disk,
                expected,
                data,
            } => {
                self.require_initialized()?;
                let volume = self
                    .disks
                    .get(disk)
                    .ok_or(ApplyError::UnknownDisk { id: *disk })?
                    .volume;
                let current = self.reservations.get(disk).map_or(0, |r| r.version);
                if current != *expected {
                    return Err(ApplyError::PreconditionFailed {
                        reason: format!(
                            "disk {disk}'s reservations are at version {current}, not {expected}"
                        ),
                    });
                }
                self.reservations.insert(
                    *disk,
                    ReservationRecord {
                        version: current + 1,
                        data: data.clone(),
                    },
                );
                // A new epoch for the volume: every node drains the I/O it admitted under the
                // old reservations and acknowledges, so the change can be known to hold on
                // every portal before the command that made it completes.
                if let Some(v) = self.volumes.get_mut(&volume) {
                    v.epoch += 1;
                }
                Ok(Outcome::Applied)
            }
            Command::CountReset { disk } => {
                self.require_initialized()?;
                let d = self
                    .disks
                    .get_mut(disk)
                    .ok_or(ApplyError::UnknownDisk { id: *disk })?;
                d.resets += 1;
                // Like a reservation change: every node drains and acknowledges, so the reset
                // is known everywhere before the task management request completes.
                let volume = d.volume;
                if let Some(v) = self.volumes.get_mut(&volume) {
                    v.epoch += 1;
                }
                Ok(Outcome::Applied)
            }
            Command::SetDiskAccess { id, initiators } => {
                self.require_initialized()?;
                let disk = self
                    .disks
                    .get_mut(id)
                    .ok_or(ApplyError::UnknownDisk { id: *id })?;
                let mut list = initiators.clone();
                list.sort();
                list.dedup();
                if disk.allowed_initiators == list {
                    return Ok(Outcome::Unchanged);
                }
                disk.allowed_initiators = list;
                Ok(Outcome::Applied)
            }
            Command::SetDiskWriteProtect { id, on } => {
                self.require_initialized()?;
                let disk = self
                    .disks
                    .get_mut(id)
                    .ok_or(ApplyError::UnknownDisk { id: *id })?;
                if disk.write_protected == *on {
                    return Ok(Outcome::Unchanged);
                }
                disk.write_protected = *on;
                // Like a reservation change: every node drains the writes it admitted before
                // and acknowledges, so the protection can be known to hold on every portal
                // before the command that set it completes.
                let volume = disk.volume;
                if let Some(v) = self.volumes.get_mut(&volume) {
                    v.epoch += 1;
                }
                Ok(Outcome::Applied)
            }
            Command::CreateVm {
                id,
                name,
                spec,
                owner,
                now_ms,
            } => {
                self.require_initialized()?;
                self.create_vm(*id, name, spec, *owner, *now_ms)
            }
            Command::DeleteVm { id } => {
                self.require_initialized()?;
                self.delete_vm(*id)
            }
            Command::SetVmDesired { id, desired } => {
                self.require_initialized()?;
                self.set_vm_desired(*id, *desired)
            }
            Command::SetVmOwner {
                id,
                owner,
                expected,
            } => {
                self.require_initialized()?;
                self.set_vm_owner(*id, *owner, *expected)
            }
            Command::ReportVm {
                id,
                node,
                state,
                detail,
                restarts,
                at_ms,
            } => {
                self.require_initialized()?;
                self.report_vm(*id, *node, *state, detail, *restarts, *at_ms)
            }
            Command::StartMigration {
                vm,
                dest,
                params,
                now_ms,
            } => {
                self.require_initialized()?;
                self.start_migration(*vm, *dest, params, *now_ms)
            }
            Command::AdvanceMigration {
                id,
                from,
                to,
                at_ms,
                listen,
            } => {
                self.require_initialized()?;
                self.advance_migration(*id, *from, *to, *at_ms, listen.clone())
            }
            Command::ReportMigration { id, progress } => {
                self.require_initialized()?;
                self.report_migration(*id, progress)
            }
            Command::RecoverPostcopy {
                id,
                attempt,
                listen,
                now_ms,
            } => {
                self.require_initialized()?;
                self.recover_postcopy(*id, *attempt, listen.as_deref(), *now_ms)
            }
            Command::CommitMigration {
                id,
                qemu_downtime_ms,
                switchover_at_ms,
            } => {
                self.require_initialized()?;
                self.commit_migration(*id, *qemu_downtime_ms, *switchover_at_ms)
            }
            Command::FinishMigration {
                id,
                phase,
                error,
                total_ms,
                downtime_ms,
                now_ms,
                committed,
            } => {
                self.require_initialized()?;
                self.finish_migration(
                    *id,
                    *phase,
                    error.as_deref(),
                    *total_ms,
                    *downtime_ms,
                    *now_ms,
                    *committed,
                )
            }
            Command::CancelMigration { id, now_ms } => {
                self.require_initialized()?;
                self.cancel_migration(*id, *now_ms)
            }
            Command::SetMigrationLimits { limits, now_ms } => {
                self.require_initialized()?;
                self.set_migration_limits(*limits, *now_ms)
            }
            Command::ReportNodeCpu { node, cpu } => {
                self.require_initialized()?;
                if !self.nodes.contains_key(node) {
                    return Err(ApplyError::UnknownNode { id: *node });
                }
                if self.node_cpus.get(node) == Some(cpu) {
                    return Ok(Outcome::Unchanged);
                }
                self.node_cpus.insert(*node, cpu.clone());
                Ok(Outcome::Applied)
            }
            Command::SetIscsiAuth { chap } => {
                self.require_initialized()?;
                if let Some(c) = chap
                    && (c.user.is_empty() || c.secret.len() < 12 || c.secret.len() > 255)
                {
                    return Err(ApplyError::InvalidArgument {
                        field: "chap".into(),
                        reason: "CHAP needs a user name and a secret of 12 to 255 characters"
                            .into(),
                    });
                }
                if self.iscsi_chap == *chap {
                    return Ok(Outcome::Unchanged);
                }
                self.iscsi_chap = chap.clone();
                Ok(Outcome::Applied)
            }
        }
    }

    fn volume_mut(&mut self, id: Uuid) -> Result<&mut VolumeRecord, ApplyError> {
        self.volumes
            .get_mut(&id)
            .ok_or(ApplyError::UnknownVolume { id })
    }

    /// Makes freed space reusable once every node in the node table has acknowledged the
    /// epoch that freed it.
    fn release_freed(&mut self, volume: Uuid) {
        let Some(vol) = self.volumes.get_mut(&volume) else {
            return;
        };
        let acked = self
            .nodes
            .keys()
            .map(|n| vol.nodes.get(n).map_or(0, |s| s.acked_epoch))
            .min()
            .unwrap_or(u64::MAX);
        vol.pending_free.retain(|p| p.epoch > acked);
    }

    /// Bytes of `volume` freed but not yet reusable.
    pub fn pending_bytes(&self, volume: Uuid) -> u64 {
        self.volumes
            .get(&volume)
            .map_or(0, |v| v.pending_free.iter().map(|p| p.extent.len).sum())
    }

    /// Bytes of `volume` a new disk can have now.
    pub fn volume_free_bytes(&self, volume: Uuid) -> u64 {
        self.volumes.get(&volume).map_or(0, |vol| {
            free_gaps(vol, &used_extents(&self.disks, vol))
                .iter()
                .map(|g| g.1)
                .sum()
        })
    }

    fn register_volume(&mut self, v: VolumeRecord) -> Result<Outcome, ApplyError> {
        validate_name("volume name", &v.name)?;
        if v.id.is_nil() {
            return Err(invalid("volume id", "the nil UUID".into()));
        }
        if !v.data_offset.is_multiple_of(4096) || v.device_bytes < v.data_offset + ALLOCATION_UNIT {
            return Err(invalid(
                "device size",
                format!(
                    "{} bytes leave no room for data after {} bytes",
                    v.device_bytes, v.data_offset
                ),
            ));
        }
        if !self.nodes.contains_key(&v.coordinator) {
            return Err(ApplyError::UnknownNode { id: v.coordinator });
        }
        if let Some(existing) = self.volumes.get(&v.id) {
            if existing.name == v.name && existing.device_bytes == v.device_bytes {
                return Ok(Outcome::Unchanged);
            }
            return Err(ApplyError::PreconditionFailed {
                reason: format!(
                    "volume {} is already registered as {:?}",
                    v.id, existing.name
                ),
            });
        }
        if self.volumes.values().any(|o| o.name == v.name) {
            return Err(ApplyError::DuplicateName {
                kind: "volume".into(),
                name: v.name,
            });
        }
        self.volumes.insert(v.id, v);
        Ok(Outcome::Applied)
    }

    pub(crate) fn create_disk(
        &mut self,
        name: &str,
        volume: Uuid,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<Outcome, ApplyError> {
        validate_name("disk name", name)?;
        validate_disk_size(size_bytes)?;
        let vol = self
            .volumes
            .get(&volume)
            .ok_or(ApplyError::UnknownVolume { id: volume })?;
        if self.disks.values().any(|d| d.name == name) {
            return Err(ApplyError::DuplicateName {
                kind: "disk".into(),
                name: name.into(),
            });
        }
        let gaps = free_gaps(vol, &used_extents(&self.disks, vol));
        let extents = allocate(&gaps, size_bytes, 0).ok_or_else(|| ApplyError::VolumeFull {
            volume,
            need: size_bytes,
            free: gaps.iter().map(|g| g.1).sum(),
            pending: self.pending_bytes(volume),
        })?;
        let id = self.next_disk_id.max(1);
        self.next_disk_id = id + 1;
        self.disks.insert(
            id,
            DiskRecord {
                id,
                name: name.into(),
                volume,
                size_bytes,
                extents,
                allowed_initiators: Vec::new(),
                block_size,
                resets: 0,
                write_protected: false,
            },
        );
        if let Some(v) = self.volumes.get_mut(&volume) {
            v.epoch += 1;
        }
        Ok(Outcome::Created { id })
    }

    /// Removes disk `id`; its space becomes free once every node has acknowledged the
    /// deletion's epoch.
    pub(crate) fn delete_disk(&mut self, id: DiskId) -> Result<Outcome, ApplyError> {
        let disk = self
            .disks
            .remove(&id)
            .ok_or(ApplyError::UnknownDisk { id })?;
        self.reservations.remove(&id);
        if let Some(v) = self.volumes.get_mut(&disk.volume) {
            v.epoch += 1;
            let epoch = v.epoch;
            v.pending_free.extend(
                disk.extents
                    .iter()
                    .map(|&extent| PendingFree { epoch, extent }),
            );
        }
        self.release_freed(disk.volume);
        Ok(Outcome::Applied)
    }

    fn resize_disk(&mut self, id: DiskId, size_bytes: u64) -> Result<Outcome, ApplyError> {
        validate_disk_size(size_bytes)?;
        let disk = self.disks.get(&id).ok_or(ApplyError::UnknownDisk { id })?;
        if size_bytes == disk.size_bytes {
            return Ok(Outcome::Unchanged);
        }
        if size_bytes < disk.size_bytes {
            return Err(ApplyError::PreconditionFailed {
                reason: format!(
                    "disk {id} is {} bytes; shrinking to {size_bytes} would destroy data (only growing is supported)",
                    disk.size_bytes
                ),
            });
        }
        let volume = disk.volume;
        let vol = self
            .volumes
            .get(&volume)
            .ok_or(ApplyError::UnknownVolume { id: volume })?;
        let grow = size_bytes - disk.size_bytes;
        let gaps = free_gaps(vol, &used_extents(&self.disks, vol));
        let more =
            allocate(&gaps, grow, disk.size_bytes).ok_or_else(|| ApplyError::VolumeFull {
                volume,
                need: grow,
                free: gaps.iter().map(|g| g.1).sum(),
                pending: self.pending_bytes(volume),
            })?;
        let disk = self
            .disks
            .get_mut(&id)
            .ok_or(ApplyError::UnknownDisk { id })?;
        disk.extents.extend(more);
        disk.size_bytes = size_bytes;
        if let Some(v) = self.volumes.get_mut(&volume) {
            v.epoch += 1;
        }
        Ok(Outcome::Applied)
    }

    fn require_initialized(&self) -> Result<Uuid, ApplyError> {
        self.cluster_id.ok_or(ApplyError::NotInitialized)
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut NodeRecord, ApplyError> {
        self.nodes
            .get_mut(&id)
            .ok_or(ApplyError::UnknownNode { id })
    }

    fn init_cluster(&mut self, cluster_id: Uuid) -> Result<Outcome, ApplyError> {
        match self.cluster_id {
            Some(existing) if existing == cluster_id => Ok(Outcome::Unchanged),
            Some(existing) => Err(ApplyError::AlreadyInitialized {
                cluster_id: existing,
            }),
            None if cluster_id.is_nil() => Err(ApplyError::InvalidArgument {
                field: "cluster_id".into(),
                reason: "the nil UUID is not a cluster identity".into(),
            }),
            None => {
                self.cluster_id = Some(cluster_id);
                Ok(Outcome::Applied)
            }
        }
    }

    fn register_node(&mut self, spec: &NodeSpec, now_ms: u64) -> Result<Outcome, ApplyError> {
        validate_spec(spec)?;
        if let Some(existing) = self.nodes.get(&spec.id) {
            if existing.spec.grpc_addr != spec.grpc_addr {
                return Err(ApplyError::DuplicateNodeId {
                    id: spec.id,
                    existing_addr: existing.spec.grpc_addr.clone(),
                });
            }
            // The same node asking again (a retried join): refresh what it reports.
            return self.update_node(spec);
        }
        self.check_addresses_free(spec)?;
        self.nodes.insert(
            spec.id,
            NodeRecord {
                spec: Arc::new(spec.clone()),
                admin_state: NodeAdminState::Active,
                joined_at_ms: now_ms,
                // Registering is proof of life: the node is up until heartbeats say otherwise.
                last_heartbeat_ms: Some(now_ms),
            },
        );
        Ok(Outcome::Applied)
    }

    fn update_node(&mut self, spec: &NodeSpec) -> Result<Outcome, ApplyError> {
        validate_spec(spec)?;
        if !self.nodes.contains_key(&spec.id) {
            return Err(ApplyError::UnknownNode { id: spec.id });
        }
        self.check_addresses_free(spec)?;
        let node = self.node_mut(spec.id)?;
        if *node.spec == *spec {
            return Ok(Outcome::Unchanged);
        }
        node.spec = Arc::new(spec.clone());
        Ok(Outcome::Applied)
    }

    /// Rejects a spec whose addresses another node already uses.
    fn check_addresses_free(&self, spec: &NodeSpec) -> Result<(), ApplyError> {
        for (other_id, other) in &self.nodes {
            if *other_id == spec.id {
                continue;
            }
            let theirs = [
                &other.spec.grpc_addr,
                &other.spec.iscsi_addr,
                &other.spec.migration_addr,
                &other.spec.io_addr,
            ];
            for addr in [
                &spec.grpc_addr,
                &spec.iscsi_addr,
                &spec.migration_addr,
                &spec.io_addr,
            ] {
                if !addr.is_empty() && theirs.contains(&addr) {
                    return Err(ApplyError::DuplicateAddress {
                        addr: addr.clone(),
                        holder: *other_id,
                    });
                }
            }
        }
        Ok(())
    }
}

fn invalid(field: &str, reason: String) -> ApplyError {
    ApplyError::InvalidArgument {
        field: field.into(),
        reason,
    }
}

/// Names of volumes and disks: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `-`.
pub(crate) fn validate_name(field: &str, name: &str) -> Result<(), ApplyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} must be 1 to 64 of A-Z a-z 0-9 . _ - (not starting with -)"),
        ))
    }
}

fn validate_disk_size(size_bytes: u64) -> Result<(), ApplyError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(ALLOCATION_UNIT) {
        return Err(invalid(
            "size",
            format!("{size_bytes} bytes is not a positive multiple of 1 MiB"),
        ));
    }
    Ok(())
}

/// Checks a node description on its own, before it is compared with the state.
pub fn validate_spec(spec: &NodeSpec) -> Result<(), ApplyError> {
    if spec.id == 0 {
        return Err(ApplyError::InvalidArgument {
            field: "node id".into(),
            reason: "0 is reserved; use 1 or more".into(),
        });
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&spec.protocol_version) {
        return Err(ApplyError::IncompatibleProtocol {
            id: spec.id,
            got: spec.protocol_version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    if spec.grpc_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApplyError::InvalidArgument {
            field: "grpc_addr".into(),
            reason: format!("{:?} is not an IP:port address", spec.grpc_addr),
        });
    }
    for (field, addr) in [
        ("iscsi_addr", &spec.iscsi_addr),
        ("migration_addr", &spec.migration_addr),
        ("io_addr", &spec.io_addr),
    ] {
        if !addr.is_empty() && addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ApplyError::InvalidArgument {
                field: field.into(),
                reason: format!("{addr:?} is not an IP:port address"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: NodeId) -> NodeSpec {
        NodeSpec {
            id,
            grpc_addr: format!("127.0.0.1:{}", 7000 + id),
            iscsi_addr: format!("127.0.0.1:{}", 3260 + id),
            migration_addr: format!("127.0.0.1:{}", 8000 + id),
            io_addr: format!("127.0.0.1:{}", 9000 + id),
            cpu_model: "test cpu".into(),
            cpu_flags: vec!["sse2".into()],
            switches: vec!["lan".into()],
            memory_bytes: 1 << 30,
            version: "0.1.0".into(),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    fn initialized() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Request::new(Command::InitCluster {
            cluster_id: Uuid::from_u128(7),
        }))
        .unwrap();
        s
    }

    fn apply(s: &mut ClusterState, cmd: Command) -> Result<Outcome, ApplyError> {
        s.apply(&Request::new(cmd))
    }

    /// Applies a command expected to fail and checks that the state did not change.
    fn rejected(s: &mut ClusterState, cmd: Command) -> ApplyError {
        let before = s.clone();
        let err = apply(s, cmd).unwrap_err();
        assert_eq!(
            *s, before,
            "a rejected command must leave the state unchanged"
        );
        err
    }

    #[test]
    fn test_apply_init_once() {
        let mut s = initialized();
        assert_eq!(s.cluster_id, Some(Uuid::from_u128(7)));
        assert_eq!(
            apply(
                &mut s,
                Command::InitCluster {
                    cluster_id: Uuid::from_u128(7)
                }
            ),
            Ok(Outcome::Unchanged)
        );
        assert_eq!(
            rejected(
                &mut s,
                Command::InitCluster {
                    cluster_id: Uuid::from_u128(8)
                }
            ),
            ApplyError::AlreadyInitialized {
                cluster_id: Uuid::from_u128(7)
            }
        );
    }

    #[test]
    fn test_apply_init_rejects_nil() {
        let mut s = ClusterState::default();
        assert!(matches!(
            rejected(
                &mut s,
                Command::InitCluster {
                    cluster_id: Uuid::nil()
                }
            ),
            ApplyError::InvalidArgument { .. }
        ));
    }

    #[test]
    fn test_apply_rejects_before_init() {
        let mut s = ClusterState::default();
        for cmd in [
            Command::RegisterNode {
                spec: spec(1),
                now_ms: 1,
            },
            Command::UpdateNode { spec: spec(1) },
            Command::Heartbeat { id: 1, at_ms: 1 },
            Command::SetNodeState {
                id: 1,
                state: NodeAdminState::Draining,
            },
            Command::RemoveNode { id: 1 },
        ] {
            assert_eq!(rejected(&mut s, cmd), ApplyError::NotInitialized);
        }
    }

    #[test]
    fn test_apply_rejects_unknown_version() {
        let mut s = initialized();
        let req = Request {
            v: COMMAND_VERSION + 1,
            cmd: Command::RemoveNode { id: 1 },
        };
        let before = s.clone();
        assert!(matches!(
            s.apply(&req),
            Err(ApplyError::UnsupportedCommandVersion { .. })
        ));
        assert_eq!(s, before);
        let req = Request {
            v: 0,
            cmd: Command::RemoveNode { id: 1 },
        };
        assert!(matches!(
            s.apply(&req),
            Err(ApplyError::UnsupportedCommandVersion { .. })
        ));
    }

    #[test]
    fn test_apply_register_and_retry() {
        let mut s = initialized();
        assert_eq!(
            apply(
                &mut s,
                Command::RegisterNode {
                    spec: spec(1),
                    now_ms: 5
                }
            ),
            Ok(Outcome::Applied)
        );
        assert_eq!(s.nodes[&1].joined_at_ms, 5);
        assert_eq!(s.nodes[&1].admin_state, NodeAdminState::Active);
        // A retried join of the same node is idempotent.
        assert_eq!(
            apply(
                &mut s,
                Command::RegisterNode {
                    spec: spec(1),
                    now_ms: 9
                }
            ),
            Ok(Outcome::Unchanged)
        );
        assert_eq!(s.nodes[&1].joined_at_ms, 5);
    }

    #[test]
    fn test_apply_register_rejects_duplicate_id() {
        let mut s = initialized();
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(1),
                now_ms: 1,
            },
        )
        .unwrap();
        let mut other = spec(1);
        other.grpc_addr = "127.0.0.2:7001".into();
        other.iscsi_addr = "127.0.0.2:3261".into();
        other.migration_addr = "127.0.0.2:8001".into();
        assert_eq!(
            rejected(
                &mut s,
                Command::RegisterNode {
                    spec: other,
                    now_ms: 1
                }
            ),
            ApplyError::DuplicateNodeId {
                id: 1,
                existing_addr: "127.0.0.1:7001".into()
            }
        );
    }

    #[test]
    fn test_apply_register_rejects_duplicate_address() {
        let mut s = initialized();
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(1),
                now_ms: 1,
            },
        )
        .unwrap();
        let mut clash = spec(2);
        clash.iscsi_addr = spec(1).iscsi_addr;
        assert_eq!(
            rejected(
                &mut s,
                Command::RegisterNode {
                    spec: clash,
                    now_ms: 1
                }
            ),
            ApplyError::DuplicateAddress {
                addr: "127.0.0.1:3261".into(),
                holder: 1
            }
        );
    }

    #[test]
    fn test_apply_register_rejects_bad_spec() {
        let mut s = initialized();
        let mut zero = spec(1);
        zero.id = 0;
        assert!(matches!(
            rejected(
                &mut s,
                Command::RegisterNode {
                    spec: zero,
                    now_ms: 1
                }
            ),
            ApplyError::InvalidArgument { .. }
        ));
        let mut bad_addr = spec(1);
        bad_addr.grpc_addr = "not-an-address".into();
        assert!(matches!(
            rejected(&mut s, Command::RegisterNode { spec: bad_addr, now_ms: 1 }),
            ApplyError::InvalidArgument { field, .. } if field == "grpc_addr"
        ));
        let mut bad_iscsi = spec(1);
        bad_iscsi.iscsi_addr = "1.2.3.4".into();
        assert!(matches!(
            rejected(&mut s, Command::RegisterNode { spec: bad_iscsi, now_ms: 1 }),
            ApplyError::InvalidArgument { field, .. } if field == "iscsi_addr"
        ));
    }

    #[test]
    fn test_apply_register_rejects_incompatible_protocol() {
        let mut s = initialized();
        let mut newer = spec(2);
        newer.protocol_version = PROTOCOL_VERSION + 1;
        let err = rejected(
            &mut s,
            Command::RegisterNode {
                spec: newer,
                now_ms: 1,
            },
        );
        assert!(matches!(
            err,
            ApplyError::IncompatibleProtocol { id: 2, .. }
        ));
        assert!(err.to_string().contains("matching csvd software"));
    }

    #[test]
    fn test_apply_update_node() {
        let mut s = initialized();
        assert_eq!(
            rejected(&mut s, Command::UpdateNode { spec: spec(1) }),
            ApplyError::UnknownNode { id: 1 }
        );
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(1),
                now_ms: 1,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(2),
                now_ms: 1,
            },
        )
        .unwrap();
        let mut upgraded = spec(1);
        upgraded.version = "0.2.0".into();
        assert_eq!(
            apply(&mut s, Command::UpdateNode { spec: upgraded }),
            Ok(Outcome::Applied)
        );
        assert_eq!(s.nodes[&1].spec.version, "0.2.0");
        let mut clash = spec(1);
        clash.grpc_addr = spec(2).grpc_addr;
        assert!(matches!(
            rejected(&mut s, Command::UpdateNode { spec: clash }),
            ApplyError::DuplicateAddress { holder: 2, .. }
        ));
    }

    #[test]
    fn test_apply_heartbeat_moves_forward() {
        let mut s = initialized();
        assert_eq!(
            rejected(&mut s, Command::Heartbeat { id: 3, at_ms: 1 }),
            ApplyError::UnknownNode { id: 3 }
        );
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(3),
                now_ms: 1,
            },
        )
        .unwrap();
        assert_eq!(
            apply(&mut s, Command::Heartbeat { id: 3, at_ms: 100 }),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            apply(&mut s, Command::Heartbeat { id: 3, at_ms: 50 }),
            Ok(Outcome::Unchanged)
        );
        assert_eq!(s.nodes[&3].last_heartbeat_ms, Some(100));
    }

    #[test]
    fn test_apply_set_state_and_remove() {
        let mut s = initialized();
        assert_eq!(
            rejected(
                &mut s,
                Command::SetNodeState {
                    id: 4,
                    state: NodeAdminState::Draining
                }
            ),
            ApplyError::UnknownNode { id: 4 }
        );
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(4),
                now_ms: 1,
            },
        )
        .unwrap();
        assert_eq!(
            apply(
                &mut s,
                Command::SetNodeState {
                    id: 4,
                    state: NodeAdminState::Draining
                }
            ),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            apply(
                &mut s,
                Command::SetNodeState {
                    id: 4,
                    state: NodeAdminState::Draining
                }
            ),
            Ok(Outcome::Unchanged)
        );
        assert_eq!(
            apply(&mut s, Command::RemoveNode { id: 4 }),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            rejected(&mut s, Command::RemoveNode { id: 4 }),
            ApplyError::UnknownNode { id: 4 }
        );
    }

    #[test]
    fn test_every_apply_error_serializes() {
        let all = [
            ApplyError::UnsupportedCommandVersion {
                got: 2,
                supported: 1,
            },
            ApplyError::NotInitialized,
            ApplyError::AlreadyInitialized {
                cluster_id: Uuid::from_u128(1),
            },
            ApplyError::UnknownNode { id: 1 },
            ApplyError::DuplicateNodeId {
                id: 1,
                existing_addr: "a".into(),
            },
            ApplyError::DuplicateAddress {
                addr: "a".into(),
                holder: 1,
            },
            ApplyError::IncompatibleProtocol {
                id: 1,
                got: 2,
                min: 1,
                max: 1,
            },
            ApplyError::InvalidArgument {
                field: "f".into(),
                reason: "r".into(),
            },
            ApplyError::PreconditionFailed { reason: "r".into() },
            ApplyError::UnknownVolume {
                id: Uuid::from_u128(1),
            },
            ApplyError::UnknownDisk { id: 1 },
            ApplyError::DuplicateName {
                kind: "disk".into(),
                name: "n".into(),
            },
            ApplyError::VolumeFull {
                volume: Uuid::from_u128(1),
                need: 2,
                free: 1,
                pending: 3,
            },
        ];
        for e in all {
            let r: crate::Response = Err(e.clone());
            let json = serde_json::to_string(&r).unwrap_or_else(|err| panic!("{e:?}: {err}"));
            assert_eq!(serde_json::from_str::<crate::Response>(&json).unwrap(), r);
        }
    }

    #[test]
    fn test_request_json_roundtrip() {
        let req = Request::new(Command::RegisterNode {
            spec: spec(1),
            now_ms: 3,
        });
        let json = serde_json::to_string(&req).unwrap();
        assert!(json.contains("\"op\":\"register_node\""), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let resp: crate::Response = Err(ApplyError::UnknownNode { id: 9 });
        let back: crate::Response =
            serde_json::from_str(&serde_json::to_string(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);
    }

    fn with_volume(units: u64) -> ClusterState {
        let mut s = initialized();
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(1),
                now_ms: 1,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::RegisterVolume {
                id: Uuid::from_u128(50),
                name: "vol".into(),
                device_bytes: ALLOCATION_UNIT * (units + 1),
                data_offset: ALLOCATION_UNIT,
                coordinator: 1,
                now_ms: 1,
            },
        )
        .unwrap();
        s
    }

    fn disk(name: &str, mib: u64) -> Command {
        Command::CreateDisk {
            name: name.into(),
            volume: Uuid::from_u128(50),
            size_bytes: mib * ALLOCATION_UNIT,
            block_size: None,
        }
    }

    #[test]
    fn test_apply_reservations_compare_and_set() {
        let mut s = with_volume(8);
        apply(&mut s, disk("a", 1)).unwrap();
        let set = |expected, data: &str| Command::SetReservations {
            disk: 1,
            expected,
            data: data.into(),
        };
        assert_eq!(apply(&mut s, set(0, "one")).unwrap(), Outcome::Applied);
        assert_eq!(s.reservations[&1].version, 1);
        // A writer that read version 0 lost the race and changes nothing.
        assert!(matches!(
            rejected(&mut s, set(0, "stale")),
            ApplyError::PreconditionFailed { .. }
        ));
        assert_eq!(s.reservations[&1].data, "one");
        apply(&mut s, set(1, "two")).unwrap();
        assert_eq!(s.reservations[&1].version, 2);
        assert!(matches!(
            rejected(
                &mut s,
                Command::SetReservations {
                    disk: 9,
                    expected: 0,
                    data: String::new()
                }
            ),
            ApplyError::UnknownDisk { id: 9 }
        ));
        apply(&mut s, Command::CountReset { disk: 1 }).unwrap();
        assert_eq!(s.disks[&1].resets, 1);
        // Deleting the disk drops its reservations.
        apply(&mut s, Command::DeleteDisk { id: 1 }).unwrap();
        assert!(s.reservations.is_empty());
    }

    #[test]
    fn test_apply_disk_access_and_chap() {
        let mut s = with_volume(8);
        apply(&mut s, disk("a", 1)).unwrap();
        let acl = |v: &[&str]| Command::SetDiskAccess {
            id: 1,
            initiators: v.iter().map(|x| x.to_string()).collect(),
        };
        assert_eq!(
            apply(&mut s, acl(&["iqn.b", "iqn.a", "iqn.b"])).unwrap(),
            Outcome::Applied
        );
        assert_eq!(s.disks[&1].allowed_initiators, vec!["iqn.a", "iqn.b"]);
        assert_eq!(
            apply(&mut s, acl(&["iqn.a", "iqn.b"])).unwrap(),
            Outcome::Unchanged
        );
        let chap = |user: &str, secret: &str| Command::SetIscsiAuth {
            chap: Some(ChapAuth {
                user: user.into(),
                secret: secret.into(),
                mutual: None,
            }),
        };
        assert!(matches!(
            rejected(&mut s, chap("u", "short")),
            ApplyError::InvalidArgument { .. }
        ));
        apply(&mut s, chap("u", "a-long-enough-secret")).unwrap();
        assert_eq!(s.iscsi_chap.as_ref().unwrap().user, "u");
        assert!(!format!("{:?}", s.iscsi_chap).contains("a-long-enough-secret"));
        apply(&mut s, Command::SetIscsiAuth { chap: None }).unwrap();
        assert!(s.iscsi_chap.is_none());
    }

    #[test]
    fn test_apply_disk_write_protect() {
        let mut s = with_volume(8);
        apply(&mut s, disk("a", 1)).unwrap();
        assert!(!s.disks[&1].write_protected, "a new disk is writable");
        let vol = Uuid::from_u128(50);
        let epoch = s.volumes[&vol].epoch;
        let protect = |on| Command::SetDiskWriteProtect { id: 1, on };
        assert_eq!(apply(&mut s, protect(true)).unwrap(), Outcome::Applied);
        assert!(s.disks[&1].write_protected);
        // Every node adopts the change behind the volume's barrier.
        assert_eq!(s.volumes[&vol].epoch, epoch + 1);
        assert_eq!(apply(&mut s, protect(true)).unwrap(), Outcome::Unchanged);
        assert_eq!(s.volumes[&vol].epoch, epoch + 1);
        apply(&mut s, protect(false)).unwrap();
        assert!(!s.disks[&1].write_protected);
        assert_eq!(
            rejected(&mut s, Command::SetDiskWriteProtect { id: 9, on: true }),
            ApplyError::UnknownDisk { id: 9 }
        );
        // A disk record stored before the field existed loads writable.
        let mut json = serde_json::to_value(&s.disks[&1]).unwrap();
        json.as_object_mut().unwrap().remove("write_protected");
        let old: crate::volume::DiskRecord = serde_json::from_value(json).unwrap();
        assert!(!old.write_protected);
    }

    #[test]
    fn test_apply_volume_registration_rules() {
        let mut s = with_volume(8);
        let vol = |id: u128, name: &str, coordinator| Command::RegisterVolume {
            id: Uuid::from_u128(id),
            name: name.into(),
            device_bytes: 9 * ALLOCATION_UNIT,
            data_offset: ALLOCATION_UNIT,
            coordinator,
            now_ms: 2,
        };
        assert_eq!(apply(&mut s, vol(50, "vol", 1)), Ok(Outcome::Unchanged));
        assert!(matches!(
            rejected(&mut s, vol(50, "other", 1)),
            ApplyError::PreconditionFailed { .. }
        ));
        assert!(matches!(
            rejected(&mut s, vol(51, "vol", 1)),
            ApplyError::DuplicateName { .. }
        ));
        assert_eq!(
            rejected(&mut s, vol(51, "v2", 9)),
            ApplyError::UnknownNode { id: 9 }
        );
        assert!(matches!(
            rejected(&mut s, vol(51, "bad name!", 1)),
            ApplyError::InvalidArgument { .. }
        ));
        assert!(matches!(
            rejected(&mut s, vol(0, "v2", 1)),
            ApplyError::InvalidArgument { .. }
        ));
        let tiny = Command::RegisterVolume {
            id: Uuid::from_u128(52),
            name: "tiny".into(),
            device_bytes: ALLOCATION_UNIT,
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            now_ms: 2,
        };
        assert!(matches!(
            rejected(&mut s, tiny),
            ApplyError::InvalidArgument { .. }
        ));
    }

    #[test]
    fn test_apply_disks_allocate_grow_delete_reuse() {
        let mut s = with_volume(8);
        assert_eq!(apply(&mut s, disk("a", 3)), Ok(Outcome::Created { id: 1 }));
        assert_eq!(apply(&mut s, disk("b", 3)), Ok(Outcome::Created { id: 2 }));
        let epoch = s.volumes[&Uuid::from_u128(50)].epoch;
        assert_eq!(epoch, 2);
        // Full: 2 MiB left, 3 asked; nothing half-created.
        assert!(matches!(
            rejected(&mut s, disk("c", 3)),
            ApplyError::VolumeFull { need, free, .. } if need == 3 * ALLOCATION_UNIT && free == 2 * ALLOCATION_UNIT
        ));
        assert!(matches!(
            rejected(&mut s, disk("a", 1)),
            ApplyError::DuplicateName { .. }
        ));
        assert!(matches!(
            rejected(
                &mut s,
                Command::CreateDisk {
                    name: "z".into(),
                    volume: Uuid::from_u128(50),
                    size_bytes: 4096,
                    block_size: None,
                }
            ),
            ApplyError::InvalidArgument { .. }
        ));
        assert!(matches!(
            rejected(
                &mut s,
                Command::CreateDisk {
                    name: "z".into(),
                    volume: Uuid::from_u128(9),
                    size_bytes: ALLOCATION_UNIT,
                    block_size: None,
                }
            ),
            ApplyError::UnknownVolume { .. }
        ));
        // Grow a across the free space, never shrink.
        assert_eq!(
            apply(
                &mut s,
                Command::ResizeDisk {
                    id: 1,
                    size_bytes: 5 * ALLOCATION_UNIT
                }
            ),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            s.disks[&1].extents.iter().map(|e| e.len).sum::<u64>(),
            5 * ALLOCATION_UNIT
        );
        assert!(s.disks[&1].map(0, 5 * ALLOCATION_UNIT).is_some());
        assert!(matches!(
            rejected(
                &mut s,
                Command::ResizeDisk {
                    id: 1,
                    size_bytes: ALLOCATION_UNIT
                }
            ),
            ApplyError::PreconditionFailed { .. }
        ));
        assert_eq!(
            rejected(
                &mut s,
                Command::ResizeDisk {
                    id: 7,
                    size_bytes: ALLOCATION_UNIT
                }
            ),
            ApplyError::UnknownDisk { id: 7 }
        );
        // Delete b: its space is held back until every node has adopted the deletion, then
        // reused; ids are not.
        assert_eq!(
            apply(&mut s, Command::DeleteDisk { id: 2 }),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            rejected(&mut s, Command::DeleteDisk { id: 2 }),
            ApplyError::UnknownDisk { id: 2 }
        );
        let epoch = s.volumes[&Uuid::from_u128(50)].epoch;
        assert!(matches!(
            rejected(&mut s, disk("c", 3)),
            ApplyError::VolumeFull { pending, .. } if pending == 3 * ALLOCATION_UNIT
        ));
        assert_eq!(
            apply(&mut s, report(1, epoch - 1, 10)),
            Ok(Outcome::Applied)
        );
        assert!(matches!(
            rejected(&mut s, disk("c", 3)),
            ApplyError::VolumeFull { .. }
        ));
        assert_eq!(apply(&mut s, report(1, epoch, 11)), Ok(Outcome::Applied));
        assert_eq!(s.pending_bytes(Uuid::from_u128(50)), 0);
        assert_eq!(apply(&mut s, disk("c", 3)), Ok(Outcome::Created { id: 3 }));
    }

    fn report(node: NodeId, acked_epoch: u64, at_ms: u64) -> Command {
        Command::ReportVolume {
            volume: Uuid::from_u128(50),
            node,
            mode: crate::volume::IoMode::Direct,
            path: Some("/dev/x".into()),
            acked_epoch,
            at_ms,
        }
    }

    #[test]
    fn test_apply_volume_reports_modes_and_coordinator() {
        use crate::volume::{IoMode, RedirectReason};
        let vol = Uuid::from_u128(50);
        let mut s = with_volume(8);
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(2),
                now_ms: 1,
            },
        )
        .unwrap();
        assert_eq!(apply(&mut s, disk("a", 2)), Ok(Outcome::Created { id: 1 }));
        // An epoch from the future and an unknown node are refused.
        assert!(matches!(
            rejected(&mut s, report(1, 99, 5)),
            ApplyError::InvalidArgument { .. }
        ));
        assert_eq!(
            rejected(&mut s, report(9, 0, 5)),
            ApplyError::UnknownNode { id: 9 }
        );
        assert_eq!(apply(&mut s, report(1, 1, 5)), Ok(Outcome::Applied));
        // A delayed, older report does not undo a newer one.
        assert_eq!(apply(&mut s, report(1, 0, 4)), Ok(Outcome::Unchanged));
        assert_eq!(s.volumes[&vol].nodes[&1].acked_epoch, 1);
        // Freed space waits for node 2 too.
        apply(&mut s, Command::DeleteDisk { id: 1 }).unwrap();
        apply(&mut s, report(1, 2, 6)).unwrap();
        assert_eq!(s.pending_bytes(vol), 2 * ALLOCATION_UNIT);
        // ...unless node 2 is removed from the cluster.
        apply(&mut s, Command::RemoveNode { id: 2 }).unwrap();
        assert_eq!(s.pending_bytes(vol), 0);
        apply(
            &mut s,
            Command::RegisterNode {
                spec: spec(2),
                now_ms: 7,
            },
        )
        .unwrap();
        // An operator's redirect request bumps the epoch once.
        let set = |redirected| Command::SetVolumeMode {
            volume: vol,
            node: 2,
            redirected,
        };
        let before = s.volumes[&vol].epoch;
        assert_eq!(apply(&mut s, set(true)), Ok(Outcome::Applied));
        assert_eq!(apply(&mut s, set(true)), Ok(Outcome::Unchanged));
        assert!(s.volumes[&vol].redirect_requested.contains(&2));
        assert_eq!(s.volumes[&vol].epoch, before + 1);
        assert_eq!(apply(&mut s, set(false)), Ok(Outcome::Applied));
        assert!(s.volumes[&vol].redirect_requested.is_empty());
        // Coordinator moves are compare-and-set.
        let mv = |node, expected| Command::SetCoordinator {
            volume: vol,
            node,
            expected,
        };
        assert!(matches!(
            rejected(&mut s, mv(2, 3)),
            ApplyError::PreconditionFailed { .. }
        ));
        assert_eq!(apply(&mut s, mv(2, 1)), Ok(Outcome::Applied));
        assert_eq!(s.volumes[&vol].coordinator, 2);
        assert_eq!(apply(&mut s, mv(2, 1)), Ok(Outcome::Unchanged));
        let mode = IoMode::Redirected(RedirectReason::NoDevicePath);
        assert_eq!(mode.to_string(), "redirected(no_device_path)");
        let json = serde_json::to_string(&mode).unwrap();
        assert_eq!(serde_json::from_str::<IoMode>(&json).unwrap(), mode);
    }

    mod model {
        use proptest::prelude::*;

        use super::*;

        fn arb_spec() -> impl Strategy<Value = NodeSpec> {
            (0u64..5, 0u16..4, 0u32..3).prop_map(|(id, port, proto)| NodeSpec {
                id,
                grpc_addr: format!("127.0.0.1:{}", 7000 + port),
                iscsi_addr: String::new(),
                migration_addr: String::new(),
                protocol_version: proto,
                ..Default::default()
            })
        }

        fn arb_cmd() -> impl Strategy<Value = Command> {
            prop_oneof![
                (0u128..3).prop_map(|c| Command::InitCluster {
                    cluster_id: Uuid::from_u128(c)
                }),
                (arb_spec(), 0u64..100)
                    .prop_map(|(spec, now_ms)| Command::RegisterNode { spec, now_ms }),
                arb_spec().prop_map(|spec| Command::UpdateNode { spec }),
                (0u64..5, 0u64..100).prop_map(|(id, at_ms)| Command::Heartbeat { id, at_ms }),
                (0u64..5, any::<bool>()).prop_map(|(id, d)| Command::SetNodeState {
                    id,
                    state: if d {
                        NodeAdminState::Draining
                    } else {
                        NodeAdminState::Active
                    },
                }),
                (0u64..5).prop_map(|id| Command::RemoveNode { id }),
                (0u128..3, 0u64..3, 1u64..40).prop_map(|(v, c, units)| Command::RegisterVolume {
                    id: Uuid::from_u128(v),
                    name: format!("vol{v}"),
                    device_bytes: units * ALLOCATION_UNIT + 4096,
                    data_offset: ALLOCATION_UNIT,
                    coordinator: c,
                    now_ms: 0,
                }),
                (0u8..6, 0u128..3, 0u64..12).prop_map(|(n, v, mib)| Command::CreateDisk {
                    name: format!("d{n}"),
                    volume: Uuid::from_u128(v),
                    size_bytes: mib * ALLOCATION_UNIT,
                    block_size: None,
                }),
                (0u64..6, 0u64..16).prop_map(|(id, mib)| Command::ResizeDisk {
                    id,
                    size_bytes: mib * ALLOCATION_UNIT
                }),
                (0u64..6).prop_map(|id| Command::DeleteDisk { id }),
                (0u64..6, any::<bool>())
                    .prop_map(|(id, on)| Command::SetDiskWriteProtect { id, on }),
                (0u128..3, 0u64..5, 0u64..8, 0u64..100).prop_map(
                    |(v, node, acked_epoch, at_ms)| {
                        Command::ReportVolume {
                            volume: Uuid::from_u128(v),
                            node,
                            mode: crate::volume::IoMode::Direct,
                            path: None,
                            acked_epoch,
                            at_ms,
                        }
                    }
                ),
                (0u128..3, 0u64..5, any::<bool>()).prop_map(|(v, node, redirected)| {
                    Command::SetVolumeMode {
                        volume: Uuid::from_u128(v),
                        node,
                        redirected,
                    }
                }),
                (0u128..3, 0u64..5, 0u64..5).prop_map(|(v, node, expected)| {
                    Command::SetCoordinator {
                        volume: Uuid::from_u128(v),
                        node,
                        expected,
                    }
                }),
            ]
        }

        proptest! {
            /// Any sequence of commands: no panic, a rejection changes nothing, and the node
            /// table stays consistent (keys match ids, no address used twice).
            #[test]
            fn test_apply_random_sequences(cmds in proptest::collection::vec(arb_cmd(), 0..150)) {
                let mut s = ClusterState::default();
                for cmd in cmds {
                    let before = s.clone();
                    let res = s.apply(&Request::new(cmd));
                    if res.is_err() {
                        prop_assert_eq!(&s, &before);
                    }
                    if s.cluster_id.is_none() {
                        prop_assert!(s.nodes.is_empty());
                    }
                    // Extents: inside their volume's data area, covering each disk exactly,
                    // never overlapping another disk's or freed space not yet released.
                    for (vid, v) in &s.volumes {
                        let mut spans: Vec<(u64, u64)> = v
                            .pending_free
                            .iter()
                            .map(|p| (p.extent.device_offset, p.extent.device_offset + p.extent.len))
                            .collect();
                        for d in s.disks.values().filter(|d| d.volume == *vid) {
                            prop_assert_eq!(d.extents.iter().map(|e| e.len).sum::<u64>(), d.size_bytes);
                            for e in &d.extents {
                                prop_assert!(e.device_offset >= v.data_offset);
                                prop_assert!(e.device_offset + e.len <= v.device_bytes);
                                spans.push((e.device_offset, e.device_offset + e.len));
                            }
                        }
                        spans.sort_unstable();
                        for w in spans.windows(2) {
                            prop_assert!(w[0].1 <= w[1].0, "overlapping extents {:?}", w);
                        }
                    }
                    let mut addrs = std::collections::BTreeSet::new();
                    for (id, n) in &s.nodes {
                        prop_assert_eq!(*id, n.spec.id);
                        prop_assert!(*id != 0);
                        prop_assert!(addrs.insert(n.spec.grpc_addr.clone()), "address used twice");
                    }
                }
            }
        }
    }
}
