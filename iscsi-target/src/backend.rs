//! What the target serves: LUNs, their data and their cluster-wide state.
//!
//! The target calls a [`Backend`] for everything that is not protocol: the LUN table of each
//! target, block I/O, this node's ALUA state, and the persistent-reservation state, which the
//! cluster keeps in one place so every node's portal sees the same registrations.

use std::future::Future;

/// The logical block size of every LUN, in bytes.
///
/// Shared volumes do direct I/O in 4 KiB units, so LUNs use 4 KiB logical blocks: every SCSI
/// write maps to whole device blocks and no node ever read-modify-writes a block another node
/// may be writing.
pub const BLOCK_SIZE: u32 = 4096;

/// A LUN as the target presents it. The same on every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunInfo {
    /// The LUN number within its target.
    pub lun: u64,
    /// The virtual disk's cluster-wide id: the NAA designator and the serial number derive
    /// from it, so multipath sees one device behind every portal.
    pub uuid: [u8; 16],
    /// The disk's name (shown as the product revision's neighbour in INQUIRY's vendor area).
    pub name: String,
    /// Size in bytes, a multiple of [`BLOCK_SIZE`].
    pub size_bytes: u64,
    /// Whether UNMAP and WRITE SAME with UNMAP deallocate (thin provisioning).
    pub thin: bool,
}

impl LunInfo {
    /// The number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.size_bytes / u64::from(BLOCK_SIZE)
    }
}

/// The I_T nexus a command arrives on: which initiator port, through which target port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexus {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The initiator session id; name and ISID together name the initiator port.
    pub isid: [u8; 6],
    /// The target's iSCSI name.
    pub target: String,
    /// The target portal group tag, which is also this node's ALUA target port group.
    pub tpgt: u16,
    /// The relative target port identifier of this node's port (non-zero).
    pub relative_port: u16,
}

impl Nexus {
    /// The initiator port's TransportID name, `iqn...,i,0x<isid>` (SPC-4 7.6.4.6).
    pub fn initiator_port_name(&self) -> String {
        let isid: String = self.isid.iter().map(|b| format!("{b:02x}")).collect();
        format!("{},i,0x{isid}", self.initiator)
    }
}

/// An ALUA target port group's asymmetric access state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AluaState {
    /// The node does direct I/O to the device.
    ActiveOptimized,
    /// The node's I/O is redirected through another node.
    ActiveNonOptimized,
    /// The node has no quorum or no way to the data.
    Unavailable,
    /// A change is in progress.
    Transitioning,
}

/// One target port group: one node's portal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroup {
    /// Target port group id (the node's TPGT).
    pub id: u16,
    /// Its state for the LUN asked about.
    pub state: AluaState,
    /// Relative target port ids in the group.
    pub relative_ports: Vec<u16>,
}

/// A backend failure, mapped to sense data by the SCSI layer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The LUN is gone or the range is outside it.
    #[error("the range is outside the LUN")]
    OutOfRange,
    /// The data cannot be reached now (no quorum, no path, fenced); the initiator should retry,
    /// maybe on another path. Maps to NOT READY / LOGICAL UNIT NOT ACCESSIBLE.
    #[error("the logical unit is not accessible now: {0}")]
    NotReady(String),
    /// The device failed the I/O. Maps to MEDIUM ERROR (read) or HARDWARE ERROR.
    #[error("the device failed: {0}")]
    Medium(String),
    /// Writes from this node are refused (for instance, the LUN belongs to a guest another
    /// node runs). Maps to DATA PROTECT / WRITE PROTECTED.
    #[error("writes to this LUN are not allowed from this node: {0}")]
    WriteProtected(String),
}

/// The outcome of COMPARE AND WRITE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOutcome {
    /// The data compared equal and the write was done.
    Written,
    /// The data differed at this byte offset of the compared range; nothing was written.
    Miscompare {
        /// Byte offset of the first difference.
        offset: u64,
    },
}

/// What the target serves. Implemented by the csvd daemon over csv-fs and Raft, and by an
/// in-memory store in tests.
pub trait Backend: Send + Sync + 'static {
    /// A data buffer: filled by reads, and received into for writes so data goes from the
    /// socket to the device without a copy.
    type Buf: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static;

    /// A buffer of `len` bytes that the caller overwrites completely (its initial contents may
    /// be anything).
    fn buffer(&self, len: usize) -> Self::Buf;

    /// The names of the targets this node serves.
    fn targets(&self) -> Vec<String>;

    /// The LUNs of `target` now, in LUN order. Empty when the target does not exist.
    fn luns(&self, target: &str) -> Vec<LunInfo>;

    /// Whether `initiator` may see the LUNs of `target` (the LUN ACL). Default: everyone.
    fn allows(&self, _target: &str, _lun: &LunInfo, _initiator: &str) -> bool {
        true
    }

    /// Every target port group (one per node) with its state for `lun`.
    fn port_groups(&self, lun: &LunInfo) -> Vec<PortGroup>;

    /// Reads `len` bytes at byte `offset`.
    fn read(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Self::Buf, BackendError>> + Send;

    /// Writes `data` at byte `offset`; with `fua` it is durable when this returns.
    fn write(
        &self,
        lun: &LunInfo,
        offset: u64,
        data: Self::Buf,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes completed writes durable.
    fn flush(&self, lun: &LunInfo) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deallocates `len` bytes at `offset`; they read back as zeroes.
    fn unmap(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Writes zeroes to `len` bytes at `offset` (the backend may deallocate them).
    fn write_zeroes(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Atomically, across every node of the cluster: compares `compare` with the data at
    /// `offset` and, only when equal, writes `write` there.
    fn compare_and_write(
        &self,
        lun: &LunInfo,
        offset: u64,
        compare: Self::Buf,
        write: Self::Buf,
    ) -> impl Future<Output = Result<CompareOutcome, BackendError>> + Send;

    /// The LUN's reservation state as last seen by this node, with its generation.
    fn reservations(
        &self,
        lun: &LunInfo,
    ) -> impl Future<Output = Result<crate::scsi::pr::PrState, BackendError>> + Send;

    /// Replaces the LUN's reservation state if its generation is still `expected`; returns
    /// `false` (and changes nothing) when another change came first. The change is visible
    /// to every node's portal before this returns `true`.
    fn update_reservations(
        &self,
        lun: &LunInfo,
        expected: u64,
        new: crate::scsi::pr::PrState,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
}
