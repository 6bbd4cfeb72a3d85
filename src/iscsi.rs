//! The node's iSCSI target: every virtual disk of the cluster is a LUN of one cluster-wide
//! target, served by every node's portal with the same identity.
//!
//! - The target is `iqn.2025-11.org.csvd:<cluster id>`; a disk's LUN number is its disk id,
//!   and its SCSI identity (NAA designator, serial number) derives from the cluster id and
//!   the disk id, so every portal presents the same device and multipath joins the paths.
//! - Each node's portal is one ALUA target port group (its id is the node id). Its state for
//!   a LUN follows the node's csv-fs mode for the LUN's volume, as the cluster records it:
//!   direct is active/optimized, redirected active/non-optimized, paused unavailable.
//! - Data goes through csv-fs (direct or redirected); reservations, LUN access lists and
//!   software write protect are cluster metadata, so a registration made (or SWP set) through
//!   one node holds on every other.
//! - Never two writers: a disk attached to VMs is fenced ([`write_fence`]) so that of the
//!   csvd node initiators (`iqn.2025-11.org.csvd:<cluster>:node-<id>`, the names the nodes'
//!   QEMUs log in with) only those of the VMs' owners may write; a stale QEMU on a node that
//!   no longer owns the VM (after a migration's switchover) gets RESERVATION CONFLICT.
//!   Other initiators are governed by the access list alone.

use std::net::SocketAddr;
use std::time::Duration;

use csvd_csv_fs::engine::AlignedBuf;
use csvd_csv_fs::node::IoError;
use csvd_csv_fs::serial::CompareResult;
use csvd_iscsi_target::backend::{
    AluaState, Backend, BackendError, CompareOutcome, LunInfo, PortGroup, WriteFence,
};
use csvd_iscsi_target::login::ChapSecrets;
use csvd_iscsi_target::scsi::pr::PrState;
use csvd_iscsi_target::server::Directory;
use csvd_raft::command::Command;
use csvd_raft::node::{MetaNode, NodeError};
use csvd_raft::state::ApplyError;
use csvd_raft::vm::node_initiator_name;
use csvd_raft::volume::{DiskId, IoMode, iscsi_target_name as target_name, lun_uuid};
use csvd_raft::{ClusterState, NodeId};

use crate::shared::Shared;

/// The ALUA target port group (and relative target port) of a node.
pub fn port_group(node: u64) -> u16 {
    (node & 0xffff) as u16
}

/// csv-fs and the cluster metadata as the iSCSI target's backend.
#[derive(Clone)]
pub struct CsvBackend {
    meta: MetaNode,
    csv: Shared,
    /// Decoded reservation states by disk, with the version they were decoded at: every
    /// command consults the state, and it changes rarely.
    decoded: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<DiskId, PrState>>>,
}

impl std::fmt::Debug for CsvBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvBackend").finish_non_exhaustive()
    }
}

impl CsvBackend {
    /// Commits `cmd`, a change of `lun`'s state that starts an epoch of its volume, and waits
    /// until it holds on every portal ([`CsvBackend::wait_everywhere`]). `Ok(false)` when a
    /// compare-and-set found another change first.
    async fn commit_everywhere(&self, lun: &LunInfo, cmd: Command) -> Result<bool, BackendError> {
        match self.meta.write(cmd).await {
            Ok((_, index)) => {
                self.wait_everywhere(lun.lun, index).await;
                Ok(true)
            }
            Err(NodeError::Rejected(ApplyError::PreconditionFailed { .. })) => Ok(false),
            Err(NodeError::Rejected(ApplyError::UnknownDisk { .. })) => {
                Err(BackendError::OutOfRange)
            }
            Err(e) => Err(BackendError::NotReady(e.to_string())),
        }
    }

    /// A backend over this node's metadata replica and csv-fs.
    pub fn new(meta: MetaNode, csv: Shared) -> CsvBackend {
        CsvBackend {
            meta,
            csv,
            decoded: Default::default(),
        }
    }

    fn disk(lun: &LunInfo) -> DiskId {
        lun.lun
    }
}

fn io_error(e: IoError, writing: bool) -> BackendError {
    match e {
        IoError::NoSuchDisk(_) | IoError::OutOfRange { .. } => BackendError::OutOfRange,
        IoError::Paused(m) | IoError::Unavailable(m) | IoError::NotCoordinator(m) => {
            BackendError::NotReady(m)
        }
        IoError::Unaligned(m) | IoError::BadRequest(m) => BackendError::Medium(m),
        IoError::Device(m) => {
            if writing {
                BackendError::Medium(format!("write failed: {m}"))
            } else {
                BackendError::Medium(m)
            }
        }
    }
}

/// The write fence of a disk that VMs owned by `owners` use: of the csvd node initiators of
/// `cluster` (names starting with `iqn.2025-11.org.csvd:<cluster>:node-`), only the owners'
/// may write. `None` (no fence) when no VM uses the disk.
fn write_fence(
    cluster: uuid::Uuid,
    owners: impl IntoIterator<Item = NodeId>,
) -> Option<WriteFence> {
    let owners: std::collections::BTreeSet<NodeId> = owners.into_iter().collect();
    if owners.is_empty() {
        return None;
    }
    Some(WriteFence {
        prefix: format!("iqn.2025-11.org.csvd:{cluster}:node-"),
        allowed: owners
            .into_iter()
            .map(|n| node_initiator_name(cluster, n))
            .collect(),
    })
}

fn luns_of(state: &ClusterState) -> Vec<LunInfo> {
    let Some(cluster) = state.cluster_id else {
        return Vec::new();
    };
    // The owners of the VMs using each disk, in one pass over the VMs.
    let mut owners: std::collections::BTreeMap<DiskId, Vec<NodeId>> = Default::default();
    for vm in state.vms.values() {
        for &disk in &vm.spec.disks {
            owners.entry(disk).or_default().push(vm.owner);
        }
    }
    state
        .disks
        .values()
        .map(|d| LunInfo {
            lun: d.id,
            uuid: *lun_uuid(cluster, d.id).as_bytes(),
            name: d.name.clone(),
            size_bytes: d.size_bytes,
            block_size: d.block_size,
            thin: true,
            write_protected: d.write_protected,
            write_fence: write_fence(cluster, owners.remove(&d.id).unwrap_or_default()),
        })
        .collect()
}

fn alua(mode: Option<&IoMode>) -> AluaState {
    match mode {
        Some(IoMode::Direct) => AluaState::ActiveOptimized,
        Some(IoMode::Redirected(_)) => AluaState::ActiveNonOptimized,
        Some(IoMode::Paused(_)) | None => AluaState::Unavailable,
    }
}

/// The device's block size: csv-fs reads and writes whole 4 KiB blocks.
const PHYSICAL: u64 = csvd_csv_fs::engine::ALIGN as u64;

/// A buffer of the target: block data in direct-I/O-aligned memory, anything else (parameter
/// lists, empty transfers) in plain memory.
#[derive(Debug)]
pub enum Buf {
    /// Whole blocks, ready for the device.
    Aligned(AlignedBuf),
    /// Any other length.
    Plain(Vec<u8>),
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        match self {
            Buf::Aligned(b) => b,
            Buf::Plain(v) => v,
        }
    }
}

impl AsMut<[u8]> for Buf {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Aligned(b) => b,
            Buf::Plain(v) => v,
        }
    }
}

impl Buf {
    /// The data as an aligned buffer (copied if it is not one; empty or partial blocks are
    /// an error).
    fn into_aligned(self) -> Result<AlignedBuf, BackendError> {
        match self {
            Buf::Aligned(b) => Ok(b),
            Buf::Plain(v) => AlignedBuf::from_slice(&v)
                .map_err(|e| BackendError::Medium(format!("not whole blocks: {e}"))),
        }
    }
}

impl Backend for CsvBackend {
    type Buf = Buf;

    fn buffer(&self, len: usize) -> Buf {
        if len > 0 && len.is_multiple_of(csvd_csv_fs::engine::ALIGN) {
            // Allocation failure is out of memory, which the process cannot survive anyway.
            Buf::Aligned(
                AlignedBuf::for_overwrite(len)
                    .unwrap_or_else(|e| panic!("cannot allocate {len} bytes: {e}")),
            )
        } else {
            Buf::Plain(vec![0; len])
        }
    }

    fn targets(&self) -> Vec<String> {
        self.meta
            .local_view()
            .state
            .cluster_id
            .map(target_name)
            .into_iter()
            .collect()
    }

    fn luns(&self, target: &str) -> Vec<LunInfo> {
        let view = self.meta.local_view();
        match view.state.cluster_id {
            Some(c) if target_name(c) == target => luns_of(&view.state),
            _ => Vec::new(),
        }
    }

    fn allows(&self, _target: &str, lun: &LunInfo, initiator: &str) -> bool {
        let view = self.meta.local_view();
        view.state.disks.get(&lun.lun).is_some_and(|d| {
            d.allowed_initiators.is_empty() || d.allowed_initiators.iter().any(|i| i == initiator)
        })
    }

    fn port_groups(&self, lun: &LunInfo) -> Vec<PortGroup> {
        let view = self.meta.local_view();
        let state = &view.state;
        let volume = state
            .disks
            .get(&lun.lun)
            .and_then(|d| state.volumes.get(&d.volume));
        state
            .nodes
            .keys()
            .map(|&id| PortGroup {
                id: port_group(id),
                state: alua(volume.and_then(|v| v.nodes.get(&id)).map(|n| &n.mode)),
                relative_ports: vec![port_group(id)],
            })
            .collect()
    }

    fn luns_generation(&self, _target: &str) -> Option<u64> {
        // Any applied change may touch the LUN table; between changes the table is reused.
        Some(self.meta.local_view().applied_index())
    }

    fn alua_state(&self, lun: &LunInfo, group: u16) -> Option<AluaState> {
        let view = self.meta.local_view();
        let state = &view.state;
        let node = state
            .nodes
            .keys()
            .copied()
            .find(|&id| port_group(id) == group)?;
        let volume = state
            .disks
            .get(&lun.lun)
            .and_then(|d| state.volumes.get(&d.volume));
        Some(alua(
            volume.and_then(|v| v.nodes.get(&node)).map(|n| &n.mode),
        ))
    }

    async fn read(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<Buf, BackendError> {
        let disk = Self::disk(lun);
        if offset.is_multiple_of(PHYSICAL) && len.is_multiple_of(PHYSICAL) {
            return self
                .csv
                .read(disk, offset, len)
                .await
                .map(Buf::Aligned)
                .map_err(|e| io_error(e, false));
        }
        // Logical blocks smaller than the device's: read the covering blocks and cut.
        let start = offset / PHYSICAL * PHYSICAL;
        let end = (offset + len).div_ceil(PHYSICAL) * PHYSICAL;
        let whole = self
            .csv
            .read(disk, start, end - start)
            .await
            .map_err(|e| io_error(e, false))?;
        let at = (offset - start) as usize;
        Ok(Buf::Plain(whole[at..at + len as usize].to_vec()))
    }

    async fn write(
        &self,
        lun: &LunInfo,
        offset: u64,
        data: Buf,
        fua: bool,
    ) -> Result<(), BackendError> {
        let disk = Self::disk(lun);
        let len = data.as_ref().len() as u64;
        if !(offset.is_multiple_of(PHYSICAL) && len.is_multiple_of(PHYSICAL)) {
            // Part of a 4 KiB block: read-modify-write, serialized at the coordinator.
            return self
                .csv
                .write_partial(disk, offset, data.as_ref(), fua)
                .await
                .map_err(|e| io_error(e, true));
        }
        let data = data.into_aligned()?;
        self.csv
            .write(disk, offset, data.into(), fua)
            .await
            .map_err(|e| io_error(e, true))
    }

    async fn flush(&self, lun: &LunInfo) -> Result<(), BackendError> {
        self.csv
            .flush(Self::disk(lun))
            .await
            .map_err(|e| io_error(e, true))
    }

    async fn unmap(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        self.csv
            .discard(Self::disk(lun), offset, len)
            .await
            .map_err(|e| io_error(e, true))
    }

    async fn write_zeroes(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        self.csv
            .write_zeroes(Self::disk(lun), offset, len)
            .await
            .map_err(|e| io_error(e, true))
    }

    async fn provisioning(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> Result<(csvd_iscsi_target::backend::Provisioning, u64), BackendError> {
        use csvd_iscsi_target::backend::Provisioning;
        // csv-fs answers in 4 KiB device blocks: on a 512-byte LUN a block that is a hole
        // covers 8 logical blocks, and a run ends on a block boundary or at `offset + len`.
        let (allocated, run) = self
            .csv
            .allocation(Self::disk(lun), offset, len)
            .await
            .map_err(|e| io_error(e, false))?;
        let bs = lun.block_bytes();
        let run = (run / bs * bs).clamp(bs.min(len), len);
        let status = if allocated {
            Provisioning::Mapped
        } else {
            Provisioning::Deallocated
        };
        Ok((status, run))
    }

    async fn compare_and_write(
        &self,
        lun: &LunInfo,
        offset: u64,
        compare: Buf,
        write: Buf,
    ) -> Result<CompareOutcome, BackendError> {
        // Executed by the volume's coordinator, one at a time per disk, whichever node
        // received it: two initiators racing through different nodes never both win.
        match self
            .csv
            .compare_and_write(Self::disk(lun), offset, compare.as_ref(), write.as_ref())
            .await
            .map_err(|e| io_error(e, true))?
        {
            CompareResult::Written => Ok(CompareOutcome::Written),
            CompareResult::Miscompare { offset } => Ok(CompareOutcome::Miscompare { offset }),
        }
    }

    fn reset_count(&self, lun: &LunInfo) -> u64 {
        self.meta
            .local_view()
            .state
            .disks
            .get(&lun.lun)
            .map_or(0, |d| d.resets)
    }

    async fn count_reset(&self, lun: &LunInfo) -> Result<u64, BackendError> {
        self.commit_everywhere(lun, Command::CountReset { disk: lun.lun })
            .await?;
        Ok(self.reset_count(lun))
    }

    async fn reservations(&self, lun: &LunInfo) -> Result<PrState, BackendError> {
        let view = self.meta.local_view();
        match view.state.reservations.get(&lun.lun) {
            None => Ok(PrState::default()),
            Some(r) => {
                let mut cache = self.decoded.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = cache.get(&lun.lun).filter(|s| s.version == r.version) {
                    return Ok(s.clone());
                }
                let mut s: PrState = serde_json::from_str(&r.data).map_err(|e| {
                    BackendError::Medium(format!("the stored reservation state is unreadable: {e}"))
                })?;
                s.version = r.version;
                cache.insert(lun.lun, s.clone());
                Ok(s)
            }
        }
    }

    async fn update_reservations(
        &self,
        lun: &LunInfo,
        expected: u64,
        new: PrState,
    ) -> Result<bool, BackendError> {
        let data = serde_json::to_string(&new)
            .map_err(|e| BackendError::Medium(format!("cannot encode reservations: {e}")))?;
        let cmd = Command::SetReservations {
            disk: lun.lun,
            expected,
            data,
        };
        self.commit_everywhere(lun, cmd).await
    }

    async fn set_write_protect(&self, lun: &LunInfo, on: bool) -> Result<(), BackendError> {
        // Waited for like a reservation change (the command starts a volume epoch): a
        // follower applies the commit later than the leader, and until it does its portal
        // still accepts writes. Without the wait, an initiator that protects the LUN through
        // one path (say, to copy a stable image) could still write through another after
        // MODE SELECT reported GOOD. Every node drains the writes it admitted before adopting
        // the epoch.
        let cmd = Command::SetDiskWriteProtect { id: lun.lun, on };
        self.commit_everywhere(lun, cmd).await.map(drop)
    }
}

/// How long a reservation or write-protect change waits for every node to adopt it.
const ADOPT_WAIT: Duration = Duration::from_secs(10);

impl CsvBackend {
    /// Waits until the change committed at `index` holds on every portal: this node has
    /// applied it, and every node that runs I/O on the disk's volume has drained and
    /// acknowledged the volume epoch the change started. A node that stopped heartbeating
    /// is not waited for: it has lost its I/O lease (csv-fs stops issuing I/O when it does).
    async fn wait_everywhere(&self, disk: DiskId, index: u64) {
        let mut views = self.meta.subscribe();
        let adopted = |v: &csvd_raft::store::StateView| {
            if v.applied_index() < index {
                return false;
            }
            let state = &v.state;
            let Some(vol) = state
                .disks
                .get(&disk)
                .and_then(|d| state.volumes.get(&d.volume))
            else {
                return true;
            };
            let now = csvd_raft::node::now_ms();
            vol.nodes
                .iter()
                .all(|(id, n)| !state.node_up(*id, now) || n.acked_epoch >= vol.epoch)
        };
        let waited = tokio::time::timeout(ADOPT_WAIT, async {
            loop {
                if adopted(&views.borrow_and_update()) {
                    return;
                }
                // Heartbeat ages change without a state change: look again now and then.
                let _ = tokio::time::timeout(Duration::from_millis(500), views.changed()).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(
                disk,
                "a LUN state change is not acknowledged by every node yet"
            );
        }
    }
}

/// Portals, CHAP and access rules from the cluster metadata.
#[derive(Clone)]
pub struct CsvDirectory {
    meta: MetaNode,
    node: u64,
    /// Whether this node's portal is reachable from other hosts (not loopback).
    exposed: bool,
    /// Allow logins without CHAP on an exposed portal.
    allow_no_auth: bool,
}

impl std::fmt::Debug for CsvDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvDirectory")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl CsvDirectory {
    /// The directory for node `node` whose portal listens on `portal`.
    pub fn new(meta: MetaNode, node: u64, portal: SocketAddr, allow_no_auth: bool) -> Self {
        CsvDirectory {
            meta,
            node,
            exposed: !portal.ip().is_loopback(),
            allow_no_auth,
        }
    }
}

impl Directory for CsvDirectory {
    fn portals(&self, _target: &str) -> Vec<(String, u16)> {
        let view = self.meta.local_view();
        let mut out: Vec<(u64, String)> = view
            .state
            .nodes
            .iter()
            .filter(|(_, n)| !n.spec.iscsi_addr.is_empty())
            .map(|(id, n)| (*id, n.spec.iscsi_addr.clone()))
            .collect();
        out.sort_by_key(|(id, _)| (*id != self.node, *id));
        out.into_iter().map(|(id, a)| (a, port_group(id))).collect()
    }

    fn chap(&self, _target: Option<&str>) -> Option<ChapSecrets> {
        let view = self.meta.local_view();
        view.state.iscsi_chap.as_ref().map(|c| ChapSecrets {
            user: c.user.clone(),
            secret: c.secret.as_bytes().to_vec(),
            mutual: c
                .mutual
                .as_ref()
                .map(|(n, s)| (n.clone(), s.as_bytes().to_vec())),
        })
    }

    fn initiator_allowed(&self, _target: &str, initiator: &str) -> bool {
        if self.exposed && !self.allow_no_auth && self.meta.local_view().state.iscsi_chap.is_none()
        {
            tracing::warn!(
                %initiator,
                "iscsi: login refused: the portal is reachable from the network and no CHAP \
                 credentials are set (`migrator target chap`), or set iscsi_allow_no_auth"
            );
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_write_fence_allows_the_owners_node_initiators_only() {
        let cluster = uuid::Uuid::from_u128(0x1234);
        assert_eq!(write_fence(cluster, []), None, "no VM: no fence");
        let fence = write_fence(cluster, [3, 1, 3]).expect("a fence");
        let name = |n: NodeId| node_initiator_name(cluster, n);
        assert!(name(1).starts_with(&fence.prefix), "{}", fence.prefix);
        // Deduplicated, one per owner.
        assert_eq!(fence.allowed, vec![name(1), name(3)]);
        assert!(fence.allows(&name(1)) && fence.allows(&name(3)));
        assert!(!fence.allows(&name(2)));
        assert!(!fence.allows(&name(31)), "node 31 is not node 3");
        // Another cluster's nodes and other initiators are not fenced.
        assert!(fence.allows(&node_initiator_name(uuid::Uuid::from_u128(7), 2)));
        assert!(fence.allows("iqn.2025-11.org.example:tool"));
    }

    /// A VM in the replicated state's JSON form, owned by `owner`, using `disks`.
    fn vm(n: u128, owner: NodeId, disks: &[u64]) -> serde_json::Value {
        serde_json::json!({
            "id": uuid::Uuid::from_u128(n), "name": format!("vm{n}"), "owner": owner,
            "desired": "stopped", "created_at_ms": 0,
            "spec": {"vcpus": 1, "memory_mib": 64, "cpu": "host", "disks": disks, "nics": [],
                     "boot": {"kind": "disk"}},
        })
    }

    #[test]
    fn test_luns_of_fences_disks_attached_to_vms() {
        let cluster = uuid::Uuid::from_u128(0xc1);
        let disk = |id: u64| {
            serde_json::json!({"id": id, "name": format!("d{id}"), "volume": uuid::Uuid::nil(),
                               "size_bytes": 1 << 20, "extents": []})
        };
        let (a, b, c) = (vm(1, 2, &[1, 2]), vm(2, 3, &[2]), vm(3, 2, &[2]));
        let state: ClusterState = serde_json::from_value(serde_json::json!({
            "cluster_id": cluster, "nodes": {},
            "disks": {"1": disk(1), "2": disk(2), "3": disk(3)},
            "vms": {a["id"].as_str().unwrap(): a, b["id"].as_str().unwrap(): b,
                    c["id"].as_str().unwrap(): c},
        }))
        .expect("a cluster state");
        let luns = luns_of(&state);
        let fence = |lun: u64| {
            luns.iter()
                .find(|l| l.lun == lun)
                .unwrap()
                .write_fence
                .clone()
        };
        let name = |n: NodeId| node_initiator_name(cluster, n);
        assert_eq!(fence(1).unwrap().allowed, vec![name(2)]);
        // A shared disk: every owner of a VM using it, once.
        assert_eq!(fence(2).unwrap().allowed, vec![name(2), name(3)]);
        assert_eq!(fence(3), None, "attached to no VM");
    }
}
