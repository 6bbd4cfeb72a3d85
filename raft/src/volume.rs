//! Shared volumes and the virtual disks carved from them, as replicated metadata.
//!
//! A volume is one shared device, named by the UUID in its on-device superblock. Its data area
//! is handed out to virtual disks in extents of [`ALLOCATION_UNIT`] bytes. Allocation happens
//! inside [`crate::state::ClusterState::apply`], so it is deterministic: every node computes the
//! same extent maps from the same log, and every node caches them. Each change of a volume's
//! layout, of its coordinator or of a requested I/O mode bumps its `epoch`; every node drains
//! its in-flight I/O for the volume, adopts the change and acknowledges the epoch.
//!
//! The allocator is first fit over the free gaps between allocated extents, lowest device
//! offset first; a disk may own several extents. A request that does not fit fails whole:
//! nothing is half-created. Space freed by a deleted disk is held back ([`PendingFree`]) until
//! every node has acknowledged the epoch of the deletion, so a node still running with the old
//! map can never write into a disk that reuses the space.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::NodeId;

/// Granularity of allocation and of disk sizes: 1 MiB.
pub const ALLOCATION_UNIT: u64 = 1 << 20;

/// Identifier of a virtual disk (a future LUN); assigned by the state machine, never reused.
pub type DiskId = u64;

/// A run of a virtual disk mapped onto its volume's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Offset within the virtual disk.
    pub disk_offset: u64,
    /// Offset on the device.
    pub device_offset: u64,
    /// Length in bytes (a multiple of [`ALLOCATION_UNIT`]).
    pub len: u64,
}

/// A registered volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The UUID in the device's superblock.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Device size in bytes.
    pub device_bytes: u64,
    /// First byte extents may use.
    pub data_offset: u64,
    /// The node that executes redirected I/O for this volume.
    pub coordinator: NodeId,
    /// Bumped on every change nodes must adopt behind a barrier: a disk created, resized or
    /// deleted, a new coordinator, a requested mode change.
    #[serde(alias = "layout_epoch")]
    pub epoch: u64,
    /// When it was registered (proposer's clock).
    pub created_at_ms: u64,
    /// What each node last reported about its access to this volume.
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, VolumeNodeState>,
    /// Nodes an operator asked to use redirected I/O for this volume.
    #[serde(default)]
    pub redirect_requested: BTreeSet<NodeId>,
    /// Freed space not yet reusable: waiting for every node to acknowledge `epoch`.
    #[serde(default)]
    pub pending_free: Vec<PendingFree>,
}

/// Freed extents and the epoch every node must acknowledge before they are reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFree {
    /// The volume epoch that removed them from their disk.
    pub epoch: u64,
    /// The space.
    pub extent: Extent,
}

/// Why a node sends a volume's I/O to the coordinator instead of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectReason {
    /// The node cannot open or read the device (automatic; a health probe returns it to
    /// direct I/O when the path heals).
    NoDevicePath,
    /// An operator asked for it (`migrator volume set-mode`).
    UserRequest,
    /// A snapshot or backup is in progress.
    Snapshot,
}

/// Why a node holds a volume's I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// The node cannot reach the Raft quorum: it fenced itself.
    NoQuorum,
}

/// How a node does I/O to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "mode", content = "reason", rename_all = "snake_case")]
pub enum IoMode {
    /// io_uring with `O_DIRECT` on the node's own path to the device.
    Direct,
    /// Shipped to the volume's coordinator.
    Redirected(RedirectReason),
    /// Held: no I/O is issued.
    Paused(PauseReason),
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoMode::Direct => f.write_str("direct"),
            IoMode::Redirected(r) => write!(
                f,
                "redirected({})",
                match r {
                    RedirectReason::NoDevicePath => "no_device_path",
                    RedirectReason::UserRequest => "user_request",
                    RedirectReason::Snapshot => "snapshot",
                }
            ),
            IoMode::Paused(PauseReason::NoQuorum) => f.write_str("paused(no_quorum)"),
        }
    }
}

/// A node's report on one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeNodeState {
    /// Its I/O mode.
    pub mode: IoMode,
    /// Its path to the device, when it has one.
    pub path: Option<String>,
    /// The newest volume epoch it has adopted (drained and switched to).
    pub acked_epoch: u64,
    /// The node's clock when it reported.
    pub at_ms: u64,
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Its id.
    pub id: DiskId,
    /// Unique name.
    pub name: String,
    /// The volume it lives on.
    pub volume: Uuid,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Where its bytes are on the device, in disk order, covering `0..size_bytes`.
    pub extents: Vec<Extent>,
    /// iSCSI initiator names allowed to use the LUN; empty: every initiator.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    /// The LUN's logical block size: 512 (the default; 4 KiB physical) or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// SCSI LUN resets received so far, through any node.
    #[serde(default)]
    pub resets: u64,
    /// Software write protect (the SWP bit of the SCSI control mode page): while set, every
    /// node's portal refuses commands that would change the LUN's data. Set by MODE SELECT
    /// through any node, or by an operator (`migrator lun protect`).
    #[serde(default)]
    pub write_protected: bool,
}

fn default_block_size() -> u32 {
    512
}

impl DiskRecord {
    /// Maps `len` bytes at `offset` of the disk to runs on the device, in order. `None` when
    /// the range is not inside the disk.
    pub fn map(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let end = offset.checked_add(len)?;
        if end > self.size_bytes {
            return None;
        }
        let mut out = Vec::new();
        let mut at = offset;
        // First extent containing `at`: extents are sorted by disk_offset.
        let start = self
            .extents
            .partition_point(|e| e.disk_offset + e.len <= at);
        for e in &self.extents[start..] {
            if at >= end {
                break;
            }
            let within = at - e.disk_offset;
            let n = (e.len - within).min(end - at);
            out.push((e.device_offset + within, n));
            at += n;
        }
        (at == end).then_some(out)
    }
}

/// The free gaps of a volume's data area given the extents in use: `(device_offset, len)`.
pub fn free_gaps(volume: &VolumeRecord, used: &[Extent]) -> Vec<(u64, u64)> {
    let mut used: Vec<(u64, u64)> = used.iter().map(|e| (e.device_offset, e.len)).collect();
    used.sort_unstable();
    let usable_end = volume.data_offset
        + (volume.device_bytes - volume.data_offset) / ALLOCATION_UNIT * ALLOCATION_UNIT;
    let mut gaps = Vec::new();
    let mut at = volume.data_offset;
    for (off, len) in used {
        if off > at {
            gaps.push((at, off - at));
        }
        at = at.max(off + len);
    }
    if usable_end > at {
        gaps.push((at, usable_end - at));
    }
    gaps
}

/// Allocates `bytes` (a multiple of [`ALLOCATION_UNIT`]) first-fit from `gaps`, continuing a
/// disk at `disk_offset`. `None` when the gaps hold less than that.
pub fn allocate(gaps: &[(u64, u64)], bytes: u64, mut disk_offset: u64) -> Option<Vec<Extent>> {
    let mut need = bytes;
    let mut out = Vec::new();
    for (off, len) in gaps {
        if need == 0 {
            break;
        }
        let take = (*len).min(need);
        out.push(Extent {
            disk_offset,
            device_offset: *off,
            len: take,
        });
        disk_offset += take;
        need -= take;
    }
    (need == 0).then_some(out)
}

/// Every extent of every disk on `volume`, and its freed space not yet reusable.
pub fn used_extents(disks: &BTreeMap<DiskId, DiskRecord>, volume: &VolumeRecord) -> Vec<Extent> {
    disks
        .values()
        .filter(|d| d.volume == volume.id)
        .flat_map(|d| d.extents.iter().copied())
        .chain(volume.pending_free.iter().map(|p| p.extent))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(units: u64) -> VolumeRecord {
        VolumeRecord {
            id: Uuid::from_u128(1),
            name: "v".into(),
            device_bytes: ALLOCATION_UNIT * (units + 1),
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            epoch: 0,
            created_at_ms: 0,
            nodes: BTreeMap::new(),
            redirect_requested: BTreeSet::new(),
            pending_free: Vec::new(),
        }
    }

    #[test]
    fn test_free_gaps_and_allocate() {
        let v = vol(10);
        assert_eq!(
            free_gaps(&v, &[]),
            vec![(ALLOCATION_UNIT, 10 * ALLOCATION_UNIT)]
        );
        let used = [Extent {
            disk_offset: 0,
            device_offset: 3 * ALLOCATION_UNIT,
            len: 2 * ALLOCATION_UNIT,
        }];
        let gaps = free_gaps(&v, &used);
        assert_eq!(
            gaps,
            vec![
                (ALLOCATION_UNIT, 2 * ALLOCATION_UNIT),
                (5 * ALLOCATION_UNIT, 6 * ALLOCATION_UNIT)
            ]
        );
        let ext = allocate(&gaps, 4 * ALLOCATION_UNIT, 0).unwrap();
        assert_eq!(ext.len(), 2, "spans two gaps: {ext:?}");
        assert_eq!(ext[1].disk_offset, 2 * ALLOCATION_UNIT);
        assert!(allocate(&gaps, 9 * ALLOCATION_UNIT, 0).is_none());
    }

    #[test]
    fn test_map_across_extents() {
        let d = DiskRecord {
            id: 1,
            name: "d".into(),
            volume: Uuid::from_u128(1),
            size_bytes: 3 * ALLOCATION_UNIT,
            extents: vec![
                Extent {
                    disk_offset: 0,
                    device_offset: 10 * ALLOCATION_UNIT,
                    len: ALLOCATION_UNIT,
                },
                Extent {
                    disk_offset: ALLOCATION_UNIT,
                    device_offset: 2 * ALLOCATION_UNIT,
                    len: 2 * ALLOCATION_UNIT,
                },
            ],
            allowed_initiators: Vec::new(),
            block_size: 512,
            resets: 0,
            write_protected: false,
        };
        assert_eq!(
            d.map(4096, 8192),
            Some(vec![(10 * ALLOCATION_UNIT + 4096, 8192)])
        );
        assert_eq!(
            d.map(ALLOCATION_UNIT - 4096, 8192),
            Some(vec![
                (11 * ALLOCATION_UNIT - 4096, 4096),
                (2 * ALLOCATION_UNIT, 4096)
            ])
        );
        assert_eq!(d.map(3 * ALLOCATION_UNIT - 4096, 8192), None);
        assert_eq!(d.map(u64::MAX, 2), None);
        assert_eq!(d.map(0, 0), Some(vec![]));
    }
}

/// A disk's SCSI reservation state (registrations, reservation holder), as the iSCSI target
/// encodes it, with the version compare-and-set changes check.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// Bumped by every change.
    pub version: u64,
    /// The encoded state.
    pub data: String,
}

/// CHAP credentials of the cluster's iSCSI target.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChapAuth {
    /// The name initiators authenticate as.
    pub user: String,
    /// The initiators' secret.
    pub secret: String,
    /// For mutual CHAP: the target's name and secret.
    #[serde(default)]
    pub mutual: Option<(String, String)>,
}

impl std::fmt::Debug for ChapAuth {
    /// Secrets are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapAuth")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|m| &m.0))
            .finish_non_exhaustive()
    }
}

/// The iSCSI name of a cluster's target: every disk is one of its LUNs, on every node's portal.
pub fn iscsi_target_name(cluster: Uuid) -> String {
    format!("iqn.2025-11.org.csvd:{cluster}")
}

/// A disk's cluster-wide SCSI identity (its NAA designator and serial number derive from it):
/// the same on every portal, never reused since disk ids are not.
pub fn lun_uuid(cluster: Uuid, disk: DiskId) -> Uuid {
    Uuid::new_v5(&cluster, &disk.to_be_bytes())
}
