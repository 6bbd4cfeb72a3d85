//! The SCSI command set (SPC-4, SBC-3) served by the target.
//!
//! [`Scsi::execute`] takes one command's CDB and its complete Data-Out buffer and returns the
//! status, sense and Data-In; the iSCSI layer around it deals with PDUs, R2Ts and residuals.
//!
//! Every command goes through the same steps, in this order:
//!
//! 1. decode: the operation code and service action must be supported (`cdb::lookup`) and
//!    no reserved or unsupported CDB bit may be set;
//! 2. the LUN must exist and the initiator must be allowed to see it (REPORT LUNS, and
//!    INQUIRY and REQUEST SENSE for a missing LUN, answer without one);
//! 3. unit attention: a pending condition of this I_T nexus is reported instead of running
//!    the command (except for INQUIRY, REPORT LUNS and REQUEST SENSE, which returns it);
//! 4. ALUA: in the unavailable or transitioning state only the commands SPC-4 allows run;
//! 5. reservations: [`pr::access`] on the LUN's cluster-wide reservation state;
//! 6. write fence: a command that would change the medium (flagged `cdb::WRITES`) from an
//!    initiator the LUN's [`WriteFence`](crate::backend::WriteFence) shuts out
//!    ([`LunInfo::may_write`]) fails with RESERVATION CONFLICT;
//! 7. software write protect: while the LUN's SWP is set ([`LunInfo::write_protected`], the
//!    same on every node), a command that would change the medium fails with DATA PROTECT,
//!    LOGICAL UNIT SOFTWARE WRITE PROTECTED;
//! 8. the command itself, which checks its fields, ranges and Data-Out length.
//!
//! EXTENDED COPY is not flagged `cdb::WRITES` (the LUN it is sent to may be only its
//! source): it applies steps 5 to 7 to each LUN it writes once it has resolved the copy
//! targets, in the same order.
//!
//! The write fence comes after the reservation check and before SWP because it is a
//! reservation the target keeps for the initiator group rather than one an initiator made:
//! a fenced initiator gets RESERVATION CONFLICT whether or not the LUN is also write
//! protected (its writes would be refused either way, and the conflict is what tells it that
//! it lost the LUN), while an initiator the fence lets through still gets DATA PROTECT from
//! SWP. Like a persistent reservation, the fence neither hides the LUN (access control, step
//! 2, does that) nor refuses reads.
//!
//! Every LBA, transfer length and limit is in logical blocks of the LUN's own block size
//! ([`LunInfo::block_size`], 512 or 4096 bytes); the physical block is always
//! [`BLOCK_SIZE`].
//!
//! Two commands are not offered, and are refused like any unsupported operation code:
//!
//! - SANITIZE: a virtual disk on a shared volume cannot give its guarantees. The state of a
//!   sanitize in progress (every path refusing I/O while it runs, the failure mode
//!   persisting) would be one node's, and the medium underneath is shared. An operator
//!   deletes the LUN instead, which releases its extent.
//! - WRITE ATOMIC (16): the only write the device performs atomically is one aligned
//!   physical block, and atomicity of more than that across power loss and across nodes
//!   cannot be promised. The atomic fields of the Block Limits VPD page are zero.

mod cdb;
mod mode;
pub mod pr;
mod sbc;
pub mod sense;
mod spc;
mod ua;
mod xcopy;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::broadcast;

use crate::backend::{AluaState, BLOCK_SIZE, Backend, BackendError, LunInfo, Nexus, PortGroup};
use cdb::Op;
use pr::{Access, OutOutcome, PrState};
use sense::{Sense, codes};

pub use cdb::data_out_length_for;

/// The number of Data-Out bytes the command in `cdb` asks for on a LUN with 4096-byte
/// logical blocks.
#[deprecated(
    note = "wrong for 512-byte LUNs: use Scsi::data_out_length, which looks up the LUN's \
            block size, or data_out_length_for"
)]
pub fn data_out_length(cdb: &[u8]) -> Option<u64> {
    data_out_length_for(cdb, BLOCK_SIZE)
}

/// SCSI status codes (SAM-5).
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data follows.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The limits the target advertises (Block Limits VPD page, RECEIVE COPY RESULTS, the
/// Third-party Copy VPD page) and enforces.
///
/// Sizes are set in bytes and advertised in logical blocks of each LUN
/// ([`LunInfo::block_size`]), so a 512-byte LUN and a 4096-byte LUN allow the same amount of
/// data per command.
pub mod limits {
    use crate::backend::BLOCK_SIZE;

    /// MAXIMUM TRANSFER LENGTH of READ, WRITE, VERIFY, WRITE AND VERIFY and ORWRITE, in bytes
    /// (8 MiB): larger transfers get INVALID FIELD IN CDB. The iSCSI layer holds a whole
    /// Data-Out in memory, so this also bounds the memory one command takes.
    pub const MAX_TRANSFER_BYTES: u64 = 8 << 20;
    /// OPTIMAL TRANSFER LENGTH, in bytes (1 MiB).
    pub const OPTIMAL_TRANSFER_BYTES: u64 = 1 << 20;
    /// MAXIMUM UNMAP LBA COUNT: logical blocks one UNMAP command may deallocate in total
    /// (4 GiB on 4 KiB LUNs, 512 MiB on 512-byte LUNs; initiators such as libiscsi take more
    /// than 2^20 blocks for a bogus value).
    pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
    /// MAXIMUM WRITE SAME LENGTH in logical blocks (just under 256 MiB on 4 KiB LUNs, 32 MiB
    /// on 512-byte LUNs). WSNZ is 0: a WRITE SAME of zero blocks covers the LUN from its LBA
    /// to the end, within this limit.
    pub const MAX_WRITE_SAME_BLOCKS: u64 = 0xffff;
    /// MAXIMUM COMPARE AND WRITE LENGTH, in logical blocks.
    pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 1;

    /// MAXIMUM TRANSFER LENGTH in logical blocks of `block_size` bytes.
    pub fn max_transfer_blocks(block_size: u32) -> u32 {
        blocks(MAX_TRANSFER_BYTES, block_size)
    }

    /// OPTIMAL TRANSFER LENGTH in logical blocks.
    pub fn optimal_transfer_blocks(block_size: u32) -> u32 {
        blocks(OPTIMAL_TRANSFER_BYTES, block_size)
    }

    /// Logical blocks per physical block ([`BLOCK_SIZE`]): OPTIMAL TRANSFER LENGTH
    /// GRANULARITY and OPTIMAL UNMAP GRANULARITY (8 for 512-byte LUNs, 1 for 4096-byte ones).
    pub fn physical_granularity(block_size: u32) -> u32 {
        (BLOCK_SIZE / block_size.clamp(1, BLOCK_SIZE)).max(1)
    }

    /// EXTENDED COPY (LID1), as RECEIVE COPY RESULTS OPERATING PARAMETERS and the
    /// Third-party Copy VPD page report them.
    pub mod xcopy {
        /// MAXIMUM CSCD (target) DESCRIPTOR COUNT.
        pub const MAX_TARGET_DESCRIPTORS: u16 = 8;
        /// MAXIMUM SEGMENT DESCRIPTOR COUNT.
        pub const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
        /// MAXIMUM DESCRIPTOR LIST LENGTH: target and segment descriptor lists together, in
        /// bytes (room for the maximum counts: 8 × 32 + 16 × 28 = 704).
        pub const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 1024;
        /// MAXIMUM SEGMENT LENGTH in bytes (256 MiB): more than a block-to-block segment can
        /// ask for (65535 blocks of 4 KiB).
        pub const MAX_SEGMENT_BYTES: u32 = 256 << 20;
        /// MAXIMUM INLINE DATA LENGTH and HELD DATA LIMIT: no inline or held data.
        pub const MAX_INLINE_DATA: u32 = 0;
        /// TOTAL CONCURRENT COPIES on this node, and MAXIMUM CONCURRENT COPIES of one I_T
        /// nexus; one more gets INSUFFICIENT RESOURCES.
        pub const MAX_CONCURRENT_COPIES: u16 = 16;
        /// Copy results of finished copies (LIST ID USAGE 00b) kept per I_T nexus for
        /// RECEIVE COPY RESULTS; the oldest is dropped beyond that.
        pub const KEPT_RESULTS: usize = 16;
        /// The bytes one read-then-write step of a copy moves (1 MiB): the memory a copy
        /// takes, whatever the segment length.
        pub const CHUNK_BYTES: u64 = 1 << 20;
        /// Implemented descriptor type codes: block to block segments (02h) and
        /// identification descriptor target descriptors (E4h).
        pub const DESCRIPTOR_TYPES: [u8; 2] = [0x02, 0xe4];
    }

    fn blocks(bytes: u64, block_size: u32) -> u32 {
        u32::try_from(bytes / u64::from(block_size.max(1))).unwrap_or(u32::MAX)
    }
}

/// How many times a reservation change is retried when another change came first.
const CAS_RETRIES: usize = 16;

/// Data a command returns to the initiator.
#[derive(Debug)]
pub enum DataIn<B> {
    /// No data.
    None,
    /// Generated data (INQUIRY, MODE SENSE, ...), already cut to the allocation length.
    Owned(Vec<u8>),
    /// Data read from the backend.
    Buf(B),
}

/// One SCSI command as the iSCSI layer hands it over.
#[derive(Debug)]
pub struct Command<'a, B> {
    /// Who sent it, through which port.
    pub nexus: &'a Nexus,
    /// The LUN number (decoded from the 8-byte LUN field).
    pub lun: u64,
    /// The CDB (6 to 16 bytes, or longer with an extended-CDB AHS).
    pub cdb: &'a [u8],
    /// The complete Data-Out, exactly the Expected Data Transfer Length, when the command
    /// has one.
    pub data_out: Option<B>,
    /// The Expected Data Transfer Length the initiator gave.
    pub expected_length: u32,
}

/// The result of one command.
#[derive(Debug)]
pub struct Response<B> {
    /// The SCSI status.
    pub status: u8,
    /// Sense data for CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-In (the iSCSI layer cuts it to the Expected Data Transfer Length and reports
    /// the residual).
    pub data: DataIn<B>,
}

/// Tasks to abort after a PERSISTENT RESERVE OUT with PREEMPT AND ABORT: every task of
/// these initiator ports on this LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// The target's iSCSI name.
    pub target: String,
    /// The LUN.
    pub lun: u64,
    /// Initiator port names, as [`Nexus::initiator_port_name`] gives them.
    pub initiator_ports: Vec<String>,
}

/// Why a command did not complete with GOOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Failure {
    /// CHECK CONDITION with this sense data.
    #[error("check condition, sense key {:#x} asc {:#04x} ascq {:#04x}", .0.key, .0.asc, .0.ascq)]
    Check(Sense),
    /// RESERVATION CONFLICT.
    #[error("reservation conflict")]
    Conflict,
    /// BUSY: the reservation state kept changing under the command.
    #[error("the reservation state kept changing")]
    Busy,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Failure {
        Failure::Check(s)
    }
}

/// The sense data for a backend failure; `writing` picks WRITE ERROR over UNRECOVERED READ
/// ERROR for a medium error.
pub(crate) fn backend_sense(e: &BackendError, writing: bool) -> Sense {
    tracing::debug!(error = %e, "backend failure");
    match e {
        BackendError::OutOfRange => codes::LBA_OUT_OF_RANGE,
        // The initiator retries, through another path when it has one.
        BackendError::NotReady(_) => codes::PORT_UNAVAILABLE,
        BackendError::Medium(_) if writing => codes::WRITE_ERROR,
        BackendError::Medium(_) => codes::READ_ERROR,
        BackendError::WriteProtected(_) => codes::WRITE_PROTECTED,
    }
}

/// The 8-byte LUN field of a LUN number, as REPORT LUNS lists it.
pub(crate) fn encode_lun(lun: u64) -> [u8; 8] {
    crate::pdu::encode_lun(lun)
}

/// A target's LUN table as this node last read it.
#[derive(Debug)]
pub(crate) struct TargetView {
    /// Changes whenever the table's content changes.
    pub generation: u64,
    /// The backend's generation for the table, when it has one.
    pub backend_gen: Option<u64>,
    /// The LUNs in LUN order.
    pub luns: Vec<LunInfo>,
}

impl TargetView {
    /// The LUN numbered `lun`.
    pub fn find(&self, lun: u64) -> Option<&LunInfo> {
        self.luns
            .binary_search_by_key(&lun, |l| l.lun)
            .ok()
            .map(|i| &self.luns[i])
    }
}

/// The SCSI layer of one node: serves every target's LUNs from `B`.
#[derive(Debug)]
pub struct Scsi<B> {
    backend: Arc<B>,
    /// Each target's LUN table.
    views: RwLock<HashMap<String, Arc<TargetView>>>,
    /// The last [`TargetView::generation`] handed out.
    view_gen: AtomicU64,
    /// Unit attention conditions per nexus.
    ua: Mutex<ua::UnitAttentions>,
    /// PREEMPT AND ABORT notifications.
    aborts: broadcast::Sender<Abort>,
    /// Per LUN (by uuid), the lock ORWRITE holds across its read and its write.
    orwrite_locks: Mutex<HashMap<[u8; 16], Arc<tokio::sync::Mutex<()>>>>,
    /// Per LUN (by uuid), the cluster's reset count this node has reported to its nexuses.
    resets_seen: Arc<Mutex<HashMap<[u8; 16], u64>>>,
    /// EXTENDED COPY commands running on this node and the results kept for RECEIVE COPY
    /// RESULTS.
    copies: Arc<Mutex<xcopy::Copies>>,
}

impl<B: Backend> Scsi<B> {
    /// A SCSI layer over `backend`.
    pub fn new(backend: Arc<B>) -> Scsi<B> {
        let (aborts, _) = broadcast::channel(64);
        Scsi {
            backend,
            views: RwLock::new(HashMap::new()),
            view_gen: AtomicU64::new(0),
            ua: Mutex::new(ua::UnitAttentions::default()),
            aborts,
            orwrite_locks: Mutex::default(),
            resets_seen: Arc::default(),
            copies: Arc::default(),
        }
    }

    /// The number of Data-Out bytes the command in `cdb` for `lun` of `target` asks for (its
    /// SCSI transfer length, in the LUN's logical blocks), or `None` when the CDB is not a
    /// supported command. The iSCSI layer compares it with the Expected Data Transfer Length
    /// to report write residuals. A LUN that does not exist counts 4096-byte blocks (the
    /// command fails anyway).
    pub fn data_out_length(&self, target: &str, lun: u64, cdb: &[u8]) -> Option<u64> {
        let view = self.view(target);
        let bs = view.find(lun).map_or(BLOCK_SIZE, |l| l.block_size);
        data_out_length_for(cdb, bs)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Notifications of tasks to abort (PREEMPT AND ABORT): the session layer aborts the
    /// listed initiator ports' tasks on that LUN.
    pub fn aborts(&self) -> broadcast::Receiver<Abort> {
        self.aborts.subscribe()
    }

    /// A LOGICAL UNIT RESET arrived on `nexus` (its tasks are already aborted).
    ///
    /// At the call, every nexus of the target this node knows, `nexus` included, gets POWER
    /// ON, RESET, OR BUS DEVICE RESET OCCURRED for the LUN (SAM-5: a logical unit reset sets
    /// a unit attention for every I_T nexus, the one that asked included; libiscsi's
    /// PreventAllow.LUNReset waits for it with TEST UNIT READY). The returned future releases
    /// the LUN's SPC-2 reservation in the cluster-wide state and completes once the release
    /// is stored (or the backend failed, which is logged): await it before answering the task
    /// management request, so the next command of any initiator sees the release.
    pub fn lun_reset(&self, nexus: &Nexus, lun: u64) -> impl Future<Output = ()> + Send + 'static {
        self.lock_ua().reset(&nexus.target, Some(lun));
        let luns: Vec<LunInfo> = self
            .backend
            .luns(&nexus.target)
            .into_iter()
            .filter(|l| l.lun == lun)
            .collect();
        let backend = self.backend.clone();
        let seen = self.resets_seen_handle();
        async move {
            for lu in &luns {
                change_and_store(&*backend, lu, &pr::logical_unit_reset).await;
                count_reset(&*backend, lu, &seen).await;
            }
        }
    }

    /// A TARGET RESET arrived on `nexus`: as [`Scsi::lun_reset`] for every LUN of the target.
    pub fn target_reset(&self, nexus: &Nexus) -> impl Future<Output = ()> + Send + 'static {
        self.lock_ua().reset(&nexus.target, None);
        let luns = self.backend.luns(&nexus.target);
        let backend = self.backend.clone();
        let seen = self.resets_seen_handle();
        async move {
            for lu in &luns {
                change_and_store(&*backend, lu, &pr::logical_unit_reset).await;
                count_reset(&*backend, lu, &seen).await;
            }
        }
    }

    /// The I_T nexus is gone (its session ended or its connection was lost).
    ///
    /// At the call its unit attention state and its EXTENDED COPY results are dropped. The
    /// returned future releases an SPC-2 reservation the nexus held, on every LUN of the
    /// target, and completes once that is stored: await it before the logout response is
    /// sent (and before a reinstating login proceeds), so a RESERVE from another initiator
    /// right after the logout does not conflict.
    pub fn nexus_lost(&self, nexus: &Nexus) -> impl Future<Output = ()> + Send + 'static {
        self.lock_ua().forget(nexus);
        self.lock_copies().forget(nexus);
        let luns = self.backend.luns(&nexus.target);
        let lost = nexus.clone();
        let backend = self.backend.clone();
        async move {
            for lu in &luns {
                change_and_store(&*backend, lu, &|s: &PrState| pr::nexus_loss(s, &lost)).await;
            }
        }
    }

    fn lock_copies(&self) -> MutexGuard<'_, xcopy::Copies> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock ORWRITE holds on `lu` across its read and its write.
    fn orwrite_lock(&self, lu: &LunInfo) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.orwrite_locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(lu.uuid).or_default().clone()
    }

    fn resets_seen_handle(&self) -> Arc<Mutex<HashMap<[u8; 16], u64>>> {
        self.resets_seen.clone()
    }

    fn lock_ua(&self) -> MutexGuard<'_, ua::UnitAttentions> {
        self.ua.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The LUN table of `target`, read again only when the backend's generation moved.
    fn view(&self, target: &str) -> Arc<TargetView> {
        let backend_gen = self.backend.luns_generation(target);
        if backend_gen.is_some() {
            let views = self.views.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = views.get(target).filter(|v| v.backend_gen == backend_gen) {
                return v.clone();
            }
        }
        let mut luns = self.backend.luns(target);
        luns.sort_by_key(|l| l.lun);
        {
            // Unchanged (the common case without a backend generation): no write lock.
            let views = self.views.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = views
                .get(target)
                .filter(|v| v.luns == luns && v.backend_gen == backend_gen)
            {
                return v.clone();
            }
        }
        let mut views = self.views.write().unwrap_or_else(|p| p.into_inner());
        let generation = match views.get(target) {
            Some(v) if v.luns == luns && v.backend_gen == backend_gen => return v.clone(),
            Some(v) if v.luns == luns => v.generation,
            _ => self.view_gen.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let v = Arc::new(TargetView {
            generation,
            backend_gen,
            luns,
        });
        views.insert(target.to_string(), v.clone());
        v
    }

    /// The LUN numbers of `view` the nexus's initiator may see.
    fn visible(&self, view: &TargetView, nexus: &Nexus) -> Vec<u64> {
        view.luns
            .iter()
            .filter(|l| self.backend.allows(&nexus.target, l, &nexus.initiator))
            .map(|l| l.lun)
            .collect()
    }

    /// Executes one command.
    pub async fn execute(&self, cmd: Command<'_, B::Buf>) -> Response<B::Buf> {
        let (status, sense, data) = match self.dispatch(cmd).await {
            Ok(data) => (status::GOOD, None, data),
            Err(Failure::Check(s)) => (status::CHECK_CONDITION, Some(s), DataIn::None),
            Err(Failure::Conflict) => (status::RESERVATION_CONFLICT, None, DataIn::None),
            Err(Failure::Busy) => (status::BUSY, None, DataIn::None),
        };
        Response {
            status,
            sense,
            data,
        }
    }

    async fn dispatch(&self, cmd: Command<'_, B::Buf>) -> Result<DataIn<B::Buf>, Failure> {
        let Command {
            nexus,
            lun,
            cdb,
            data_out,
            ..
        } = cmd;
        let info = cdb::lookup(cdb)?;
        cdb::validate(info, cdb)?;
        let view = self.view(&nexus.target);

        if info.op == Op::ReportLuns {
            let visible = self.visible(&view, nexus);
            let data = spc::report_luns(cdb, &visible)?;
            self.lock_ua().luns_reported(nexus, &view, &visible);
            return Ok(DataIn::Owned(data));
        }

        let lu = view
            .find(lun)
            .filter(|l| self.backend.allows(&nexus.target, l, &nexus.initiator));
        let Some(lu) = lu else {
            return match info.op {
                Op::Inquiry if cdb[1] & 0x01 == 0 && cdb[2] == 0 => {
                    let mut d = spc::standard_inquiry(None, false);
                    d.truncate(usize::from(cdb::be16(cdb, 3)));
                    Ok(DataIn::Owned(d))
                }
                Op::Inquiry if cdb[1] & 0x01 == 0 => Err(cdb::invalid_byte(2).into()),
                Op::RequestSense => Ok(DataIn::Owned(spc::request_sense(
                    cdb,
                    &codes::LUN_NOT_SUPPORTED,
                ))),
                _ => Err(codes::LUN_NOT_SUPPORTED.into()),
            };
        };
        if info.has(cdb::THIN_ONLY) && !lu.thin {
            // Not supported on a fully provisioned LUN.
            return Err(codes::INVALID_OPCODE.into());
        }

        // A reset that arrived through another node: this node's nexuses hear of it too.
        let resets = self.backend.reset_count(lu);
        let reset_elsewhere = {
            let mut seen = self.resets_seen.lock().unwrap_or_else(|p| p.into_inner());
            let known = seen.entry(lu.uuid).or_insert(resets);
            let grew = resets > *known;
            *known = (*known).max(resets);
            grew
        };
        if reset_elsewhere {
            self.lock_ua().reset(&nexus.target, Some(lu.lun));
        }

        // Unit attention conditions kept by this node.
        let alua = self
            .backend
            .alua_state(lu, nexus.tpgt)
            .unwrap_or(AluaState::ActiveOptimized);
        let take = !info.has(cdb::NO_UA) || info.op == Op::RequestSense;
        let pending =
            self.lock_ua()
                .check(nexus, &view, || self.visible(&view, nexus), lu, alua, take);
        if let Some(s) = pending {
            return match info.op {
                Op::RequestSense => Ok(DataIn::Owned(spc::request_sense(cdb, &s))),
                _ => Err(s.into()),
            };
        }

        if info.op == Op::Inquiry {
            let multiport = self
                .backend
                .port_groups(lu)
                .iter()
                .map(|g| g.relative_ports.len())
                .sum::<usize>()
                > 1;
            return Ok(DataIn::Owned(spc::inquiry(cdb, lu, nexus, multiport)?));
        }

        // The reservation state, read once; its unit attention conditions come next.
        // REPORT TARGET PORT GROUPS and REQUEST SENSE run whatever the reservations, so they
        // still answer when the reservation state cannot be read.
        let mut state = match self.backend.reservations(lu).await {
            Ok(s) => s,
            Err(_) if matches!(info.op, Op::ReportTargetPortGroups | Op::RequestSense) => {
                PrState::default()
            }
            Err(e) => return Err(backend_sense(&e, false).into()),
        };
        if take && !state.is_empty() {
            match self.take_pr_attention(lu, nexus, state).await? {
                Ok(s) => state = s,
                Err(s) if info.op == Op::RequestSense => {
                    return Ok(DataIn::Owned(spc::request_sense(cdb, &s)));
                }
                Err(s) => return Err(s.into()),
            }
        }
        if info.op == Op::RequestSense {
            return Ok(DataIn::Owned(spc::request_sense(
                cdb,
                &spc::current_condition(alua),
            )));
        }

        match alua {
            AluaState::Unavailable if !info.has(cdb::UNAVAILABLE_OK) => {
                return Err(codes::PORT_UNAVAILABLE.into());
            }
            AluaState::Transitioning if !info.has(cdb::TRANSITIONING_OK) => {
                return Err(codes::PORT_TRANSITIONING.into());
            }
            _ => {}
        }

        if !info.has(cdb::NO_PR)
            && !state.is_empty()
            && pr::access(&state, nexus, cdb) == Access::Conflict
        {
            return Err(Failure::Conflict);
        }

        if info.has(cdb::WRITES) && !lu.may_write(&nexus.initiator) {
            return Err(Failure::Conflict);
        }

        if info.has(cdb::WRITES) && lu.write_protected {
            return Err(codes::SOFTWARE_WRITE_PROTECTED.into());
        }

        let blocks = lu.blocks();
        let owned = |d: Vec<u8>| Ok(DataIn::Owned(d));
        match info.op {
            Op::TestUnitReady | Op::StartStopUnit | Op::PreventAllow => Ok(DataIn::None),
            Op::ReadCapacity10 => owned(spc::read_capacity10(lu)),
            Op::ReadCapacity16 => owned(spc::read_capacity16(cdb, lu)),
            Op::ModeSense6 => owned(mode::mode_sense(cdb, false, lu)?),
            Op::ModeSense10 => owned(mode::mode_sense(cdb, true, lu)?),
            Op::ModeSelect6 | Op::ModeSelect10 => {
                let params = data_out.as_ref().map(|b| b.as_ref()).unwrap_or(&[]);
                let selected = mode::mode_select(cdb, info.op == Op::ModeSelect10, params, lu)?;
                self.select_mode(nexus, lu, selected).await
            }
            Op::ReportOpcodes => owned(spc::report_opcodes(cdb, lu.thin)?),
            Op::ReportTmf => owned(spc::report_tmf(cdb)),
            Op::ReportTargetPortGroups => {
                let mut groups = self.backend.port_groups(lu);
                if groups.is_empty() {
                    // No ALUA configuration: this port alone, in its present state.
                    groups.push(PortGroup {
                        id: nexus.tpgt,
                        state: alua,
                        relative_ports: vec![nexus.relative_port],
                    });
                }
                owned(spc::report_target_port_groups(cdb, &groups)?)
            }
            Op::ReadDefect10 => owned(spc::read_defect(cdb, false)),
            Op::ReadDefect12 => owned(spc::read_defect(cdb, true)),
            Op::Read6 | Op::Read10 | Op::Read12 | Op::Read16 => self.read(lu, info.op, cdb).await,
            Op::Write6 | Op::Write10 | Op::Write12 | Op::Write16 => {
                self.write(lu, info.op, cdb, data_out, false).await
            }
            Op::WriteVerify10 | Op::WriteVerify12 | Op::WriteVerify16 => {
                self.write(lu, info.op, cdb, data_out, true).await
            }
            Op::Verify10 | Op::Verify12 | Op::Verify16 => {
                self.verify(lu, info.op, cdb, data_out).await
            }
            Op::PreFetch10 | Op::PreFetch16 => {
                let r = cdb::block_range(info.op, cdb);
                cdb::check_range(r.lba, r.blocks, blocks)?;
                // Nothing is cached here: GOOD rather than CONDITION MET.
                Ok(DataIn::None)
            }
            Op::SyncCache10 | Op::SyncCache16 => self.sync_cache(lu, info.op, cdb).await,
            Op::WriteSame10 | Op::WriteSame16 => self.write_same(lu, info.op, cdb, data_out).await,
            Op::Unmap => self.unmap(lu, cdb, data_out).await,
            Op::CompareAndWrite => self.compare_and_write(lu, cdb, data_out).await,
            Op::OrWrite => self.orwrite(lu, cdb, data_out).await,
            Op::GetLbaStatus => self.get_lba_status(lu, cdb).await,
            Op::ExtendedCopy => self.extended_copy(nexus, lu, cdb, data_out).await,
            Op::ReceiveCopyResults => owned(self.receive_copy_results(nexus, lu, cdb)?),
            Op::Reserve6 | Op::Reserve10 => {
                self.change_reservations(nexus, lu, state, |s| pr::reserve(s, nexus))
                    .await
            }
            Op::Release6 | Op::Release10 => {
                self.change_reservations(nexus, lu, state, |s| pr::release(s, nexus))
                    .await
            }
            Op::PrIn => owned(pr::reserve_in(&state, nexus, cdb)?),
            Op::PrOut => {
                let params = data_out.as_ref().map(|b| b.as_ref()).unwrap_or(&[]);
                self.change_reservations(nexus, lu, state, |s| {
                    pr::reserve_out(s, nexus, cdb, params)
                })
                .await
            }
            // Answered above.
            Op::Inquiry | Op::RequestSense | Op::ReportLuns => Ok(DataIn::None),
        }
    }

    /// Stores what a valid MODE SELECT sets: a new SWP goes to the backend, which makes it
    /// cluster-wide, and every other nexus of this node that uses the LUN hears MODE
    /// PARAMETERS CHANGED.
    async fn select_mode(
        &self,
        nexus: &Nexus,
        lu: &LunInfo,
        selected: mode::Selected,
    ) -> Result<DataIn<B::Buf>, Failure> {
        if let Some(on) = selected.swp
            && on != lu.write_protected
        {
            self.backend
                .set_write_protect(lu, on)
                .await
                .map_err(|e| backend_sense(&e, true))?;
            // Every other nexus, through any node, learns of it from the LUN table.
            self.lock_ua().write_protect_set(nexus, lu.lun, on);
        }
        Ok(DataIn::None)
    }

    /// Takes the reservation unit attention pending for `nexus`, clearing it in the
    /// cluster-wide state: `Err(sense)` when there was one, `Ok(state)` otherwise.
    async fn take_pr_attention(
        &self,
        lu: &LunInfo,
        nexus: &Nexus,
        mut state: PrState,
    ) -> Result<Result<PrState, Sense>, Failure> {
        for _ in 0..CAS_RETRIES {
            let Some(s) = pr::pending_attention(&state, nexus) else {
                return Ok(Ok(state));
            };
            let cleared = pr::clear_attention(&state, nexus);
            let stored = self
                .backend
                .update_reservations(lu, state.version, cleared)
                .await
                .map_err(|e| backend_sense(&e, true))?;
            if stored {
                return Ok(Err(s));
            }
            state = self
                .backend
                .reservations(lu)
                .await
                .map_err(|e| backend_sense(&e, false))?;
        }
        Err(Failure::Busy)
    }

    /// Applies a reservation change decided by `decide` from the state, storing it with a
    /// compare-and-set and deciding again from a fresh state when another change came
    /// first.
    async fn change_reservations(
        &self,
        nexus: &Nexus,
        lu: &LunInfo,
        mut state: PrState,
        decide: impl Fn(&PrState) -> OutOutcome,
    ) -> Result<DataIn<B::Buf>, Failure> {
        for _ in 0..CAS_RETRIES {
            let (new, abort) = match decide(&state) {
                OutOutcome::Conflict => return Err(Failure::Conflict),
                OutOutcome::Check(s) => return Err(s.into()),
                OutOutcome::Done { state: new, abort } => (new, abort),
            };
            if let Some(new) = new {
                let stored = self
                    .backend
                    .update_reservations(lu, state.version, new)
                    .await
                    .map_err(|e| backend_sense(&e, true))?;
                if !stored {
                    state = self
                        .backend
                        .reservations(lu)
                        .await
                        .map_err(|e| backend_sense(&e, false))?;
                    continue;
                }
            }
            if !abort.is_empty() {
                // Nobody listening means no session to abort tasks in.
                let _ = self.aborts.send(Abort {
                    target: nexus.target.clone(),
                    lun: lu.lun,
                    initiator_ports: abort,
                });
            }
            return Ok(DataIn::None);
        }
        Err(Failure::Busy)
    }
}

/// Counts a reset of `lu` cluster-wide and records the new count as already reported here
/// (this node's nexuses got their unit attention at the reset itself). A failure is logged:
/// the reset itself has happened on this node.
async fn count_reset<B: Backend>(backend: &B, lu: &LunInfo, seen: &Mutex<HashMap<[u8; 16], u64>>) {
    match backend.count_reset(lu).await {
        Ok(n) => {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            let known = seen.entry(lu.uuid).or_insert(n);
            *known = (*known).max(n);
        }
        Err(e) => {
            tracing::warn!(lun = lu.lun, error = %e, "a LUN reset could not be told to the other nodes")
        }
    }
}

/// Applies `change` to the reservation state of `lu` and stores it, retrying when another
/// change came first; a backend failure is logged and the state left as it is.
async fn change_and_store<B: Backend>(
    backend: &B,
    lu: &LunInfo,
    change: &(impl Fn(&PrState) -> Option<PrState> + Sync),
) {
    for _ in 0..CAS_RETRIES {
        let state = match backend.reservations(lu).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, lun = lu.lun, "cannot read the reservation state to release an SPC-2 reservation");
                return;
            }
        };
        let Some(new) = change(&state) else {
            return;
        };
        match backend.update_reservations(lu, state.version, new).await {
            Ok(true) => return,
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, lun = lu.lun, "cannot release the SPC-2 reservation");
                return;
            }
        }
    }
    tracing::warn!(
        lun = lu.lun,
        "the reservation state kept changing; the SPC-2 reservation was not released"
    );
}
