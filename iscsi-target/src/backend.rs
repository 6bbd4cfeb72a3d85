//! What the target serves: LUNs, their data and their cluster-wide state.
//!
//! The target calls a [`Backend`] for everything that is not protocol: the LUN table of each
//! target, block I/O, this node's ALUA state, and the persistent-reservation and write-protect
//! state, which the cluster keeps in one place so every node's portal sees the same.

use std::future::Future;

/// The physical block size of every LUN, in bytes.
///
/// Shared volumes do direct I/O in 4 KiB units: this is every LUN's physical block size, and
/// the logical block size of LUNs made with 4 KiB blocks ([`LunInfo::block_size`] 4096). LUNs
/// with 512-byte logical blocks (512e, the default, for initiators that assume 512) address
/// 512-byte logical blocks and report 4 KiB physical blocks (READ CAPACITY (16) LOGICAL BLOCKS
/// PER PHYSICAL BLOCK EXPONENT 3): the daemon writes a part of a physical block by reading,
/// changing and writing the whole 4 KiB.
pub const BLOCK_SIZE: u32 = 4096;

/// The logical block sizes a LUN may have, in bytes.
pub const LOGICAL_BLOCK_SIZES: [u32; 2] = [512, 4096];

/// A LUN as the target presents it. The same on every node.
///
/// Every SCSI command addresses the LUN in logical blocks of [`LunInfo::block_size`] bytes
/// (LBAs, transfer lengths, capacities, the block limits); the backend is called with byte
/// offsets and lengths that are multiples of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunInfo {
    /// The LUN number within its target.
    pub lun: u64,
    /// The virtual disk's cluster-wide id: the NAA designator and the serial number derive
    /// from it, so multipath sees one device behind every portal.
    pub uuid: [u8; 16],
    /// The disk's name (shown as the product revision's neighbour in INQUIRY's vendor area).
    pub name: String,
    /// Size in bytes, a multiple of [`LunInfo::block_size`].
    pub size_bytes: u64,
    /// The logical block size in bytes: 512 or 4096 (see [`LOGICAL_BLOCK_SIZES`]). The
    /// physical block size is always [`BLOCK_SIZE`].
    pub block_size: u32,
    /// Whether UNMAP and WRITE SAME with UNMAP deallocate (thin provisioning).
    pub thin: bool,
    /// Software write protect (SWP in the control mode page), cluster-wide: while set, every
    /// command that would change the medium fails with DATA PROTECT, LOGICAL UNIT SOFTWARE
    /// WRITE PROTECTED, whichever node's portal it arrives through. Changed with
    /// [`Backend::set_write_protect`].
    pub write_protected: bool,
    /// Which initiators of a group may write ([`WriteFence`]); `None`: no fence, every
    /// initiator that may see the LUN may write (subject to reservations and
    /// [`LunInfo::write_protected`]). A fenced initiator's commands that would change the
    /// medium fail with RESERVATION CONFLICT; its reads, and every other initiator's commands,
    /// are not affected.
    pub write_fence: Option<WriteFence>,
}

/// A write fence: initiators whose names start with [`WriteFence::prefix`] may change the
/// medium of the LUN only if they are listed in [`WriteFence::allowed`].
///
/// A target fences a group of initiators it knows (for instance the hosts of a cluster, each
/// logging in with its own name under a common prefix) so that only the members entitled to
/// the LUN write to it, without restricting anyone outside the group: an initiator whose name
/// does not start with the prefix is not affected, and neither are reads. A fenced command
/// that would change the medium (WRITE, WRITE AND VERIFY, WRITE SAME, UNMAP, COMPARE AND
/// WRITE, ORWRITE, an EXTENDED COPY into the LUN) gets RESERVATION CONFLICT, as a
/// persistent-reservation fence answers it, and changes nothing. iSCSI names are compared
/// without regard to ASCII case.
///
/// ```
/// # use csvd_iscsi_target::backend::WriteFence;
/// let fence = WriteFence {
///     prefix: "iqn.2025-11.org.example:host-".into(),
///     allowed: vec!["iqn.2025-11.org.example:host-2".into()],
/// };
/// assert!(fence.allows("iqn.2025-11.org.example:host-2"));
/// assert!(!fence.allows("iqn.2025-11.org.example:host-1"));
/// // Outside the group: not fenced.
/// assert!(fence.allows("iqn.2025-11.org.example:backup-tool"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFence {
    /// The group of initiator names the fence applies to: every name that starts with it.
    pub prefix: String,
    /// The initiators of the group that may write. Empty: none of them may.
    pub allowed: Vec<String>,
}

impl WriteFence {
    /// Whether `initiator` may change the medium under this fence: it is outside the group,
    /// or listed.
    pub fn allows(&self, initiator: &str) -> bool {
        let in_group = initiator
            .as_bytes()
            .get(..self.prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(self.prefix.as_bytes()));
        !in_group
            || self
                .allowed
                .iter()
                .any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

impl LunInfo {
    /// The number of logical blocks.
    ///
    /// ```
    /// # use csvd_iscsi_target::backend::LunInfo;
    /// let lun = LunInfo {
    ///     lun: 0,
    ///     uuid: [1; 16],
    ///     name: "d".into(),
    ///     size_bytes: 1 << 20,
    ///     block_size: 512,
    ///     thin: true,
    ///     write_protected: false,
    ///     write_fence: None,
    /// };
    /// assert_eq!(lun.blocks(), 2048);
    /// assert_eq!(lun.blocks_per_physical(), 8);
    /// assert!(lun.may_write("iqn.2025-11.org.example:any"));
    /// ```
    pub fn blocks(&self) -> u64 {
        self.size_bytes / u64::from(self.block_size.max(1))
    }

    /// Whether `initiator` may change the medium as far as the LUN's [`WriteFence`] goes
    /// (always, without one). Reservations and software write protect are checked apart.
    pub fn may_write(&self, initiator: &str) -> bool {
        self.write_fence
            .as_ref()
            .is_none_or(|f| f.allows(initiator))
    }

    /// The logical block size as a `u64`, for offset arithmetic.
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.block_size.max(1))
    }

    /// How many logical blocks make one physical block ([`BLOCK_SIZE`]): 8 for 512-byte
    /// LUNs, 1 for 4096-byte ones.
    pub fn blocks_per_physical(&self) -> u32 {
        (BLOCK_SIZE / self.block_size.clamp(1, BLOCK_SIZE)).max(1)
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

/// The provisioning status of a run of blocks, as GET LBA STATUS reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    /// The blocks are mapped (hold data).
    Mapped,
    /// The blocks are deallocated (read back as zeroes).
    Deallocated,
}

/// What the target serves. Implemented by the csvd daemon over csv-fs and Raft, and by an
/// in-memory store in tests.
///
/// # Data offsets and lengths
///
/// The `offset` and `len` (or buffer length) the SCSI layer passes to [`Backend::read`],
/// [`Backend::write`], [`Backend::unmap`], [`Backend::write_zeroes`],
/// [`Backend::compare_and_write`] and [`Backend::provisioning`] are multiples of the LUN's
/// logical block size ([`LunInfo::block_size`]: 512 or 4096), not necessarily of the 4 KiB
/// physical block ([`BLOCK_SIZE`]). On a 512-byte LUN the backend completes a partial physical
/// block itself (read, change, write the 4 KiB).
///
/// # Atomicity
///
/// The SCSI layer makes no atomicity assumption about [`Backend::write`] (WRITE ATOMIC is not
/// offered); COMPARE AND WRITE has its own method.
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

    /// A number that changes whenever the LUN table of `target` changes: a LUN added, removed
    /// or resized, or an ACL changed. While it stays the same the SCSI layer serves commands
    /// from its copy of the table instead of calling [`Backend::luns`] for each one. Default:
    /// `None`, the table is read for every command.
    fn luns_generation(&self, _target: &str) -> Option<u64> {
        None
    }

    /// The asymmetric access state of `lun` through target port group `group` (this node's
    /// TPGT), or `None` when no group has that id. Called for every command; the default asks
    /// [`Backend::port_groups`].
    fn alua_state(&self, lun: &LunInfo, group: u16) -> Option<AluaState> {
        self.port_groups(lun)
            .into_iter()
            .find(|g| g.id == group)
            .map(|g| g.state)
    }

    /// How many LUN resets `lun` has had through any node's portal. A node that sees the
    /// count grow reports POWER ON, RESET, OR BUS DEVICE RESET OCCURRED to the initiators
    /// connected to it, as if the reset had arrived there. Default: always 0 (one node).
    fn reset_count(&self, _lun: &LunInfo) -> u64 {
        0
    }

    /// Counts one reset of `lun` for every node; completes when every node knows it, and
    /// returns the new count. Default: nothing to tell (one node).
    fn count_reset(
        &self,
        _lun: &LunInfo,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        std::future::ready(Ok(0))
    }

    /// The provisioning status of the block at byte `offset` and the length in bytes of the
    /// run of blocks from `offset` that share it (at least one block, at most `len`), for GET
    /// LBA STATUS. Default: everything is mapped.
    fn provisioning(
        &self,
        _lun: &LunInfo,
        _offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(Provisioning, u64), BackendError>> + Send {
        std::future::ready(Ok((Provisioning::Mapped, len)))
    }

    /// Reads `len` bytes at byte `offset` (both multiples of the logical block size).
    fn read(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Self::Buf, BackendError>> + Send;

    /// Writes `data` at byte `offset` (both multiples of the logical block size); with `fua`
    /// it is durable when this returns.
    fn write(
        &self,
        lun: &LunInfo,
        offset: u64,
        data: Self::Buf,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes completed writes durable.
    fn flush(&self, lun: &LunInfo) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deallocates `len` bytes at `offset` (multiples of the logical block size); they read
    /// back as zeroes. Parts of a physical block may be zeroed instead of deallocated.
    fn unmap(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Writes zeroes to `len` bytes at `offset` (multiples of the logical block size; the
    /// backend may deallocate them).
    fn write_zeroes(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Atomically, across every node of the cluster: compares `compare` with the data at
    /// `offset` and, only when equal, writes `write` there. The offset and the (equal) buffer
    /// lengths are multiples of the logical block size.
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

    /// Sets (`on`) or clears the LUN's software write protect ([`LunInfo::write_protected`])
    /// for every node's portal, as MODE SELECT of the control page's SWP asks.
    ///
    /// Cluster-wide and durable before it returns: the setting is stored, and every live
    /// node has adopted it, so [`Backend::luns`] reports it on every portal for the next
    /// command. After an error the setting may or may not have changed (a store that timed
    /// out can still commit); MODE SENSE shows which.
    fn set_write_protect(
        &self,
        lun: &LunInfo,
        on: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_write_fence_allows_outsiders_and_listed_members() {
        let fence = WriteFence {
            prefix: "iqn.2025-11.org.example:c1:node-".into(),
            allowed: vec!["iqn.2025-11.org.example:c1:node-2".into()],
        };
        // Members of the group: only the listed one, whatever the case of the name.
        assert!(fence.allows("iqn.2025-11.org.example:c1:node-2"));
        assert!(fence.allows("IQN.2025-11.ORG.EXAMPLE:C1:NODE-2"));
        assert!(!fence.allows("iqn.2025-11.org.example:c1:node-1"));
        assert!(!fence.allows("IQN.2025-11.org.example:c1:NODE-1"));
        assert!(!fence.allows("iqn.2025-11.org.example:c1:node-22"));
        assert!(!fence.allows("iqn.2025-11.org.example:c1:node-"));
        // Outside the group: a shorter name, another prefix, non-ASCII at the boundary.
        assert!(fence.allows("iqn.2025-11.org.example:c1:node"));
        assert!(fence.allows("iqn.2025-11.org.example:c2:node-1"));
        assert!(fence.allows("iqn.2025-11.org.example:c1:nodé-1"));
        assert!(fence.allows(""));
        // No one listed: every member is refused.
        let closed = WriteFence {
            allowed: Vec::new(),
            ..fence
        };
        assert!(!closed.allows("iqn.2025-11.org.example:c1:node-2"));
        let lun = LunInfo {
            lun: 0,
            uuid: [0; 16],
            name: "d".into(),
            size_bytes: 4096,
            block_size: 4096,
            thin: false,
            write_protected: false,
            write_fence: Some(closed),
        };
        assert!(!lun.may_write("iqn.2025-11.org.example:c1:node-2"));
        assert!(lun.may_write("iqn.2025-11.org.example:tool"));
    }
}
