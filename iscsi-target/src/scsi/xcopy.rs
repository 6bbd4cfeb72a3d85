//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): the copy manager.
//!
//! The target copies between LUNs of the same target that the initiator may see: each
//! target (CSCD) descriptor is an identification descriptor (E4h) naming a LUN by the NAA
//! designator of its Device Identification VPD page, and each segment is a block device to
//! block device copy (02h). The copy reads from and writes to the backend in
//! [`CHUNK_BYTES`](super::limits::xcopy::CHUNK_BYTES) pieces, so a segment of any length takes
//! one bounded buffer; an overlapping copy within one LUN runs backwards when it must.
//!
//! ```text
//! parameter list (LID1)
//! 0        list identifier
//! 1        STR | LIST ID USAGE (bits 4-3) | PRIORITY
//! 2..4     CSCD descriptor list length
//! 8..12    segment descriptor list length
//! 12..16   inline data length (0: none supported)
//! 16..     CSCD descriptors (32 bytes each: E4h, LU ID type/NUL/peripheral type,
//!          relative initiator port, designation descriptor (4..24), block device
//!          parameters (24..32: PAD at byte 28 bit 2, DISK BLOCK LENGTH at 29..32))
//!   ..     segment descriptors (28 bytes each: 02h, DC/CAT, descriptor length 0018h,
//!          source index, destination index, number of blocks (10..12), source LBA
//!          (12..20), destination LBA (20..28))
//! ```
//!
//! The whole list is validated before any data moves, in this order: lengths (PARAMETER LIST
//! LENGTH ERROR, also for lists beyond the maximum descriptor list length), descriptor counts
//! (TOO MANY TARGET / SEGMENT DESCRIPTORS), descriptor type codes (UNSUPPORTED TARGET /
//! SEGMENT DESCRIPTOR TYPE CODE) and fields (INVALID FIELD IN PARAMETER LIST), then the copy
//! targets (COPY ABORTED, UNREACHABLE COPY TARGET for an index or a designator that names
//! nothing) and the segment ranges (COPY ABORTED, with the segment pointer). An error while
//! copying is COPY ABORTED with the backend's additional sense code.
//!
//! Reservations of the other LUNs are honoured as if the initiator read the source and wrote
//! the destination itself; a destination (the command's own LUN or another) whose write
//! fence shuts the initiator out refuses the copy with RESERVATION CONFLICT, and a software
//! write protected one with DATA PROTECT, LOGICAL UNIT SOFTWARE WRITE PROTECTED, before any
//! data moves. The source is only read: neither its fence nor its SWP matters. RECEIVE COPY RESULTS reports OPERATING PARAMETERS and the COPY
//! STATUS of copies with LIST ID USAGE 00b (kept until reported, at most
//! [`KEPT_RESULTS`](super::limits::xcopy::KEPT_RESULTS) per I_T nexus) or 10b (while they
//! run). Copies and their results are this node's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::cdb::{be16, be24, be32, be64};
use super::limits::xcopy as lim;
use super::sense::{Sense, codes, key};
use super::{DataIn, Failure, Scsi, backend_sense, pr, spc};
use crate::backend::{AluaState, Backend, LunInfo, Nexus};

/// The parameter list header length.
const HEADER: usize = 16;
/// The length of an identification descriptor target descriptor.
const TARGET_DESCRIPTOR: usize = 32;
/// The length of a block to block segment descriptor.
const SEGMENT_DESCRIPTOR: usize = 28;
/// The identification descriptor target descriptor type code.
const IDENTIFICATION: u8 = 0xe4;
/// The block device to block device segment descriptor type code.
const BLOCK_TO_BLOCK: u8 = 0x02;

/// What the copy manager keeps of a copy for RECEIVE COPY RESULTS (LIST ID USAGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListIdUsage {
    /// 00b: the status is kept after the copy until reported.
    Hold,
    /// 10b: the status is kept while the copy runs.
    NoHold,
    /// 11b: the list identifier is not used (it must be zero).
    None,
}

/// One identification descriptor target descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TargetDescriptor {
    /// Its byte offset in the parameter list.
    pub at: usize,
    /// The designator's code set.
    pub code_set: u8,
    /// The designator type.
    pub designator_type: u8,
    /// The designator.
    pub designator: Vec<u8>,
    /// DISK BLOCK LENGTH.
    pub block_len: u32,
}

/// One block to block segment descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Its byte offset in the parameter list.
    pub at: usize,
    /// Source and destination target descriptor indexes.
    pub source: u16,
    pub destination: u16,
    /// DC: the number of blocks counts destination blocks (else source blocks).
    pub dc: bool,
    pub blocks: u16,
    pub source_lba: u64,
    pub destination_lba: u64,
}

/// A validated EXTENDED COPY parameter list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CopyList {
    pub list_id: u8,
    pub usage: ListIdUsage,
    pub targets: Vec<TargetDescriptor>,
    pub segments: Vec<Segment>,
}

fn bad(at: usize, bit: Option<u8>) -> Sense {
    codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(pointer(at), bit)
}

fn pointer(at: usize) -> u16 {
    u16::try_from(at).unwrap_or(u16::MAX)
}

/// Decodes and checks an EXTENDED COPY (LID1) parameter list of at least one byte (`params`
/// is cut to the CDB's PARAMETER LIST LENGTH).
pub(crate) fn parse(params: &[u8]) -> Result<CopyList, Sense> {
    let p = params;
    if p.len() < HEADER {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    let tdl = usize::from(be16(p, 2));
    let sdl = be32(p, 8) as usize;
    let inline = be32(p, 12) as usize;
    let needed = HEADER as u64 + tdl as u64 + sdl as u64 + inline as u64;
    if needed > p.len() as u64 {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    if (tdl + sdl) as u64 > u64::from(lim::MAX_DESCRIPTOR_LIST_LENGTH) {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    if inline > lim::MAX_INLINE_DATA as usize {
        return Err(bad(12, None));
    }
    let list_id = p[0];
    let usage = match (p[1] >> 3) & 0x03 {
        0 => ListIdUsage::Hold,
        2 => ListIdUsage::NoHold,
        3 if list_id == 0 => ListIdUsage::None,
        3 => return Err(bad(0, None)),
        _ => return Err(bad(1, Some(4))),
    };

    let mut targets = Vec::new();
    let mut at = HEADER;
    let end = HEADER + tdl;
    while at < end {
        if targets.len() == usize::from(lim::MAX_TARGET_DESCRIPTORS) {
            return Err(codes::TOO_MANY_TARGET_DESCRIPTORS.in_parameters(pointer(at), None));
        }
        if p[at] != IDENTIFICATION {
            return Err(codes::UNSUPPORTED_TARGET_DESCRIPTOR.in_parameters(pointer(at), None));
        }
        if at + TARGET_DESCRIPTOR > end {
            return Err(bad(2, None));
        }
        let d = &p[at..at + TARGET_DESCRIPTOR];
        // LU ID TYPE and NUL are ignored (SPC-4); only block devices (type 0) are copied.
        if d[1] & 0x1f != 0 {
            return Err(bad(at + 1, Some(4)));
        }
        if (d[5] >> 4) & 0x03 != 0 {
            // The designator must name a logical unit.
            return Err(bad(at + 5, Some(5)));
        }
        let dlen = usize::from(d[7]);
        if dlen > 16 {
            return Err(bad(at + 7, None));
        }
        targets.push(TargetDescriptor {
            at,
            code_set: d[4] & 0x0f,
            designator_type: d[5] & 0x0f,
            designator: d[8..8 + dlen].to_vec(),
            block_len: be24(d, 29),
        });
        at += TARGET_DESCRIPTOR;
    }

    let mut segments = Vec::new();
    let end = at + sdl;
    while at < end {
        if segments.len() == usize::from(lim::MAX_SEGMENT_DESCRIPTORS) {
            return Err(codes::TOO_MANY_SEGMENT_DESCRIPTORS.in_parameters(pointer(at), None));
        }
        if p[at] != BLOCK_TO_BLOCK {
            return Err(codes::UNSUPPORTED_SEGMENT_DESCRIPTOR.in_parameters(pointer(at), None));
        }
        if at + 4 > end || usize::from(be16(p, at + 2)) != SEGMENT_DESCRIPTOR - 4 {
            return Err(bad(at + 2, None));
        }
        if at + SEGMENT_DESCRIPTOR > end {
            return Err(bad(8, None));
        }
        let d = &p[at..at + SEGMENT_DESCRIPTOR];
        segments.push(Segment {
            at,
            source: be16(d, 4),
            destination: be16(d, 6),
            dc: d[1] & 0x02 != 0,
            blocks: be16(d, 10),
            source_lba: be64(d, 12),
            destination_lba: be64(d, 20),
        });
        at += SEGMENT_DESCRIPTOR;
    }
    Ok(CopyList {
        list_id,
        usage,
        targets,
        segments,
    })
}

/// One piece of a validated copy: bytes from one LUN to another.
#[derive(Clone, Debug)]
struct Step {
    /// The segment descriptor's offset, for the segment pointer.
    at: usize,
    source: LunInfo,
    destination: LunInfo,
    source_offset: u64,
    destination_offset: u64,
    bytes: u64,
}

/// The status of a copy, as COPY STATUS reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CopyStatus {
    /// COPY MANAGER STATUS: 00h done, 01h done with errors, 02h in progress.
    pub state: u8,
    /// SEGMENTS PROCESSED.
    pub segments: u16,
    /// Bytes written so far.
    pub bytes: u64,
}

#[derive(Debug)]
struct Entry {
    list_id: u8,
    usage: ListIdUsage,
    status: CopyStatus,
}

#[derive(Debug, Default)]
struct NexusCopies {
    running: usize,
    entries: Vec<Entry>,
}

/// The copies of this node: how many run, and their status by I_T nexus and list
/// identifier.
#[derive(Debug, Default)]
pub(crate) struct Copies {
    running: usize,
    nexuses: HashMap<Nexus, NexusCopies>,
}

impl Copies {
    /// Registers a copy about to run, or refuses it: INSUFFICIENT RESOURCES beyond the
    /// concurrent copies, OPERATION IN PROGRESS when the list identifier is in use.
    pub(crate) fn start(
        &mut self,
        nexus: &Nexus,
        list_id: u8,
        usage: ListIdUsage,
    ) -> Result<(), Sense> {
        let max = usize::from(lim::MAX_CONCURRENT_COPIES);
        let mine = self.nexuses.get(nexus).map_or(0, |n| n.running);
        if self.running >= max || mine >= max {
            return Err(codes::INSUFFICIENT_RESOURCES);
        }
        let n = self.nexuses.entry(nexus.clone()).or_default();
        if usage != ListIdUsage::None {
            if n.entries
                .iter()
                .any(|e| e.list_id == list_id && e.status.state == 0x02)
            {
                return Err(codes::OPERATION_IN_PROGRESS);
            }
            n.entries.retain(|e| e.list_id != list_id);
            n.entries.push(Entry {
                list_id,
                usage,
                status: CopyStatus {
                    state: 0x02,
                    segments: 0,
                    bytes: 0,
                },
            });
        }
        n.running += 1;
        self.running += 1;
        Ok(())
    }

    fn running_entry(&mut self, nexus: &Nexus, list_id: u8) -> Option<&mut Entry> {
        self.nexuses
            .get_mut(nexus)?
            .entries
            .iter_mut()
            .find(|e| e.list_id == list_id && e.status.state == 0x02)
    }

    /// Records the progress of a running copy.
    pub(crate) fn progress(&mut self, nexus: &Nexus, list_id: u8, segments: u16, bytes: u64) {
        if let Some(e) = self.running_entry(nexus, list_id) {
            e.status.segments = segments;
            e.status.bytes = bytes;
        }
    }

    /// A copy ended (`ok`: without errors).
    pub(crate) fn finish(&mut self, nexus: &Nexus, list_id: u8, usage: ListIdUsage, ok: bool) {
        self.running = self.running.saturating_sub(1);
        let Some(n) = self.nexuses.get_mut(nexus) else {
            return;
        };
        n.running = n.running.saturating_sub(1);
        if usage != ListIdUsage::None {
            let state = if ok { 0x00 } else { 0x01 };
            if let Some(e) = n
                .entries
                .iter_mut()
                .find(|e| e.list_id == list_id && e.status.state == 0x02)
            {
                e.status.state = state;
            }
            n.entries
                .retain(|e| e.status.state == 0x02 || e.usage == ListIdUsage::Hold);
            let done = n.entries.iter().filter(|e| e.status.state != 0x02).count();
            if done > lim::KEPT_RESULTS
                && let Some(i) = n.entries.iter().position(|e| e.status.state != 0x02)
            {
                n.entries.remove(i);
            }
        }
        if n.running == 0 && n.entries.is_empty() {
            self.nexuses.remove(nexus);
        }
    }

    /// The status of copy `list_id` of `nexus`. A finished copy's status is reported once:
    /// with `consume` it is dropped (unless the copy still runs).
    pub(crate) fn status(
        &mut self,
        nexus: &Nexus,
        list_id: u8,
        consume: bool,
    ) -> Option<CopyStatus> {
        let n = self.nexuses.get_mut(nexus)?;
        let i = n.entries.iter().position(|e| e.list_id == list_id)?;
        let status = n.entries[i].status;
        if consume && status.state != 0x02 {
            n.entries.remove(i);
        }
        Some(status)
    }

    /// The nexus is gone: its results go (running copies still end through
    /// [`Copies::finish`]).
    pub(crate) fn forget(&mut self, nexus: &Nexus) {
        if let Some(n) = self.nexuses.get_mut(nexus) {
            n.entries.clear();
            if n.running == 0 {
                self.nexuses.remove(nexus);
            }
        }
    }
}

/// Ends a registered copy when dropped, also when the command is aborted mid-copy.
struct Running {
    copies: Arc<Mutex<Copies>>,
    nexus: Nexus,
    list_id: u8,
    usage: ListIdUsage,
    ok: bool,
}

impl Running {
    fn progress(&self, segments: u16, bytes: u64) {
        if self.usage != ListIdUsage::None {
            self.copies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .progress(&self.nexus, self.list_id, segments, bytes);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish(&self.nexus, self.list_id, self.usage, self.ok);
    }
}

/// The length of COPY STATUS parameter data.
const COPY_STATUS_LEN: usize = 12;

/// COPY STATUS parameter data (12 bytes), the transfer count in the smallest unit that holds
/// it (bytes, KiB, MiB, ...).
pub(crate) fn copy_status_data(s: &CopyStatus) -> Vec<u8> {
    let mut unit = 0u8;
    let mut count = s.bytes;
    while count > u64::from(u32::MAX) {
        count >>= 10;
        unit += 1;
    }
    let mut d = vec![0u8; COPY_STATUS_LEN];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d[4] = s.state;
    d[5..7].copy_from_slice(&s.segments.to_be_bytes());
    d[7] = unit;
    d[8..12].copy_from_slice(&(count as u32).to_be_bytes());
    d
}

/// RECEIVE COPY RESULTS OPERATING PARAMETERS for a LUN with `block_size`-byte blocks.
pub(crate) fn operating_parameters(block_size: u32) -> Vec<u8> {
    let gran = block_size.max(1).trailing_zeros() as u8;
    let mut d = vec![0u8; 44];
    d[4] = 0x01; // SNLID: LIST ID USAGE 11b is supported
    d[8..10].copy_from_slice(&lim::MAX_TARGET_DESCRIPTORS.to_be_bytes());
    d[10..12].copy_from_slice(&lim::MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    d[12..16].copy_from_slice(&lim::MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
    d[16..20].copy_from_slice(&lim::MAX_SEGMENT_BYTES.to_be_bytes());
    d[20..24].copy_from_slice(&lim::MAX_INLINE_DATA.to_be_bytes());
    d[24..28].copy_from_slice(&lim::MAX_INLINE_DATA.to_be_bytes()); // held data limit
    // 28..32: maximum stream device transfer size, no stream devices.
    d[34..36].copy_from_slice(&lim::MAX_CONCURRENT_COPIES.to_be_bytes());
    d[36] = lim::MAX_CONCURRENT_COPIES as u8;
    d[37] = gran; // data segment granularity
    d[38] = gran; // inline data granularity
    d[39] = gran; // held data granularity
    d[43] = lim::DESCRIPTOR_TYPES.len() as u8;
    d.extend_from_slice(&lim::DESCRIPTOR_TYPES);
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d
}

/// Appends one third-party copy descriptor, padded to a multiple of four bytes.
fn tpc_descriptor(d: &mut Vec<u8>, kind: u16, body: &[u8]) {
    let padded = body.len().div_ceil(4) * 4;
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(&(padded as u16).to_be_bytes());
    d.extend_from_slice(body);
    d.resize(d.len() + padded - body.len(), 0);
}

/// The Third-party Copy VPD page body (8Fh): supported commands, parameter data, supported
/// descriptors, supported CSCD descriptor IDs (none) and general copy operations.
pub(crate) fn third_party_copy_vpd(d: &mut Vec<u8>, block_size: u32) {
    // EXTENDED COPY (LID1); RECEIVE COPY RESULTS COPY STATUS and OPERATING PARAMETERS.
    let commands = [0x83, 1, 0x00, 0x84, 2, 0x00, 0x03];
    let mut body = vec![commands.len() as u8];
    body.extend_from_slice(&commands);
    tpc_descriptor(d, 0x0001, &body);

    let mut body = vec![0u8; 28];
    body[4..6].copy_from_slice(&lim::MAX_TARGET_DESCRIPTORS.to_be_bytes());
    body[6..8].copy_from_slice(&lim::MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    body[8..12].copy_from_slice(&lim::MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
    body[12..16].copy_from_slice(&lim::MAX_INLINE_DATA.to_be_bytes());
    tpc_descriptor(d, 0x0004, &body);

    let mut body = vec![lim::DESCRIPTOR_TYPES.len() as u8];
    body.extend_from_slice(&lim::DESCRIPTOR_TYPES);
    tpc_descriptor(d, 0x0008, &body);

    tpc_descriptor(d, 0x000c, &[0, 0]);

    let gran = block_size.max(1).trailing_zeros() as u8;
    let mut body = vec![0u8; 32];
    body[0..4].copy_from_slice(&u32::from(lim::MAX_CONCURRENT_COPIES).to_be_bytes());
    body[4..8].copy_from_slice(&u32::from(lim::MAX_CONCURRENT_COPIES).to_be_bytes());
    body[8..12].copy_from_slice(&lim::MAX_SEGMENT_BYTES.to_be_bytes());
    body[12] = gran;
    body[13] = gran;
    tpc_descriptor(d, 0x8001, &body);
}

/// Whether target descriptor `t` names `lu` (by its NAA designator, binary code set).
fn names(t: &TargetDescriptor, lu: &LunInfo) -> bool {
    t.code_set == 0x01 && t.designator_type == 0x03 && t.designator == spc::naa(lu)
}

/// COPY ABORTED carrying the additional sense code of `s`, pointing at the segment at `at`.
fn aborted(s: Sense, at: usize) -> Sense {
    Sense::new(key::COPY_ABORTED, s.asc, s.ascq).in_parameters(pointer(at), None)
}

impl<B: Backend> Scsi<B> {
    /// EXTENDED COPY (LID1): validates the whole list, then copies segment after segment.
    pub(super) async fn extended_copy(
        &self,
        nexus: &Nexus,
        lu: &LunInfo,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let plen = be32(cdb, 10) as usize;
        if plen == 0 {
            // No parameter list: nothing to do, and not an error (SPC-4).
            return Ok(DataIn::None);
        }
        let params = data.as_ref().map(|d| d.as_ref()).unwrap_or(&[]);
        let Some(params) = params.get(..plen) else {
            return Err(codes::PARAMETER_LIST_LENGTH.into());
        };
        let list = parse(params)?;
        drop(data);
        let steps = self.plan(nexus, &list)?;
        for (i, step) in steps.iter().enumerate() {
            // The LUN the command came to passed every check for EXTENDED COPY already.
            let first = steps[..i].iter();
            if step.source.uuid != lu.uuid
                && !first.clone().any(|s| s.source.uuid == step.source.uuid)
            {
                self.check_copy_target(nexus, &step.source, false).await?;
            }
            if step.destination.uuid != lu.uuid
                && !first
                    .clone()
                    .any(|s| s.destination.uuid == step.destination.uuid)
            {
                self.check_copy_target(nexus, &step.destination, true)
                    .await?;
            }
            if !step.destination.may_write(&nexus.initiator) {
                return Err(Failure::Conflict);
            }
            if step.destination.write_protected {
                return Err(codes::SOFTWARE_WRITE_PROTECTED.into());
            }
        }
        self.lock_copies().start(nexus, list.list_id, list.usage)?;
        let mut running = Running {
            copies: self.copies.clone(),
            nexus: nexus.clone(),
            list_id: list.list_id,
            usage: list.usage,
            ok: false,
        };
        let mut moved = 0u64;
        for (i, step) in steps.iter().enumerate() {
            self.copy_step(step, |n| {
                moved += n;
                running.progress(i as u16, moved);
            })
            .await
            .map_err(|s| aborted(s, step.at))?;
            running.progress(i as u16 + 1, moved);
        }
        running.ok = true;
        Ok(DataIn::None)
    }

    /// Resolves the copy targets of every segment and checks the ranges.
    fn plan(&self, nexus: &Nexus, list: &CopyList) -> Result<Vec<Step>, Sense> {
        let view = self.view(&nexus.target);
        let visible: Vec<&LunInfo> = view
            .luns
            .iter()
            .filter(|l| self.backend.allows(&nexus.target, l, &nexus.initiator))
            .collect();
        let resolve = |index: u16, at: usize| -> Result<LunInfo, Sense> {
            let Some(t) = list.targets.get(usize::from(index)) else {
                return Err(codes::UNREACHABLE_COPY_TARGET.in_parameters(pointer(at), None));
            };
            let Some(lu) = visible.iter().find(|l| names(t, l)) else {
                return Err(codes::UNREACHABLE_COPY_TARGET.in_parameters(pointer(t.at + 4), None));
            };
            if t.block_len != lu.block_size {
                return Err(bad(t.at + 29, None));
            }
            Ok((*lu).clone())
        };
        let mut steps = Vec::with_capacity(list.segments.len());
        for s in &list.segments {
            let source = resolve(s.source, s.at + 4)?;
            let destination = resolve(s.destination, s.at + 6)?;
            let (sbs, dbs) = (source.block_bytes(), destination.block_bytes());
            let bytes = u64::from(s.blocks) * if s.dc { dbs } else { sbs };
            if !bytes.is_multiple_of(sbs) || !bytes.is_multiple_of(dbs) {
                return Err(bad(s.at + 10, None));
            }
            let in_range = |lba: u64, bs: u64, lu: &LunInfo| {
                lba.checked_add(bytes / bs)
                    .is_some_and(|end| end <= lu.blocks())
            };
            if !in_range(s.source_lba, sbs, &source) {
                return Err(codes::COPY_ABORTED.in_parameters(pointer(s.at + 12), None));
            }
            if !in_range(s.destination_lba, dbs, &destination) {
                return Err(codes::COPY_ABORTED.in_parameters(pointer(s.at + 20), None));
            }
            steps.push(Step {
                at: s.at,
                source_offset: s.source_lba * sbs,
                destination_offset: s.destination_lba * dbs,
                source,
                destination,
                bytes,
            });
        }
        Ok(steps)
    }

    /// Checks that `nexus` could read (or, `writing`, write) `target` itself: the port's
    /// access state, the reservations.
    async fn check_copy_target(
        &self,
        nexus: &Nexus,
        target: &LunInfo,
        writing: bool,
    ) -> Result<(), Failure> {
        let alua = self.backend.alua_state(target, nexus.tpgt);
        if matches!(
            alua,
            Some(AluaState::Unavailable | AluaState::Transitioning)
        ) {
            return Err(Failure::Check(codes::UNREACHABLE_COPY_TARGET));
        }
        let state = self
            .backend
            .reservations(target)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        // READ (16) or WRITE (16) stands for what the copy does to the LUN.
        let cdb = [if writing { 0x8a } else { 0x88 }];
        if !state.is_empty() && pr::access(&state, nexus, &cdb) == pr::Access::Conflict {
            return Err(Failure::Conflict);
        }
        Ok(())
    }

    /// Copies one step in bounded pieces, backwards when the destination overlaps the
    /// source from above; reports each piece's bytes to `moved`.
    async fn copy_step(&self, step: &Step, mut moved: impl FnMut(u64)) -> Result<(), Sense> {
        let bs = step
            .source
            .block_bytes()
            .max(step.destination.block_bytes());
        let chunk = (lim::CHUNK_BYTES / bs).max(1) * bs;
        let backwards = step.source.uuid == step.destination.uuid
            && step.destination_offset > step.source_offset
            && step.destination_offset < step.source_offset + step.bytes;
        let pieces = step.bytes.div_ceil(chunk);
        for k in 0..pieces {
            let i = if backwards { pieces - 1 - k } else { k };
            let at = i * chunk;
            let n = (step.bytes - at).min(chunk);
            let buf = self
                .backend
                .read(&step.source, step.source_offset + at, n)
                .await
                .map_err(|e| backend_sense(&e, false))?;
            self.backend
                .write(&step.destination, step.destination_offset + at, buf, false)
                .await
                .map_err(|e| backend_sense(&e, true))?;
            moved(n);
        }
        Ok(())
    }

    /// RECEIVE COPY RESULTS: OPERATING PARAMETERS, or the COPY STATUS of a copy of this
    /// I_T nexus (INVALID FIELD IN CDB for a list identifier with no status).
    pub(super) fn receive_copy_results(
        &self,
        nexus: &Nexus,
        lu: &LunInfo,
        cdb: &[u8],
    ) -> Result<Vec<u8>, Sense> {
        let alloc = be32(cdb, 10) as usize;
        let mut d = match cdb[1] & 0x1f {
            0x03 => operating_parameters(lu.block_size),
            _ => {
                // Reported (and dropped) only when the allocation length takes it all.
                let consume = alloc >= COPY_STATUS_LEN;
                let Some(status) = self.lock_copies().status(nexus, cdb[2], consume) else {
                    return Err(codes::INVALID_FIELD_IN_CDB.in_cdb(2, None));
                };
                copy_status_data(&status)
            }
        };
        d.truncate(alloc);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(list_id: u8, usage: u8, tdl: u16, sdl: u32) -> Vec<u8> {
        let mut p = vec![0u8; HEADER];
        p[0] = list_id;
        p[1] = usage << 3;
        p[2..4].copy_from_slice(&tdl.to_be_bytes());
        p[8..12].copy_from_slice(&sdl.to_be_bytes());
        p
    }

    fn target(naa: [u8; 8], block_len: u32) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[0] = IDENTIFICATION;
        d[4] = 0x01;
        d[5] = 0x03;
        d[7] = 8;
        d[8..16].copy_from_slice(&naa);
        d[29..32].copy_from_slice(&block_len.to_be_bytes()[1..]);
        d
    }

    fn segment(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
        let mut d = vec![0u8; 28];
        d[0] = BLOCK_TO_BLOCK;
        d[2..4].copy_from_slice(&24u16.to_be_bytes());
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&blocks.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        d
    }

    fn list(targets: usize, segments: usize) -> Vec<u8> {
        let mut p = header(1, 0, (32 * targets) as u16, (28 * segments) as u32);
        for _ in 0..targets {
            p.extend(target([0x30; 8], 512));
        }
        for _ in 0..segments {
            p.extend(segment(0, 0, 8, 0, 100));
        }
        p
    }

    #[test]
    fn test_xcopy_parse_simple_list() {
        let l = parse(&list(1, 1)).unwrap();
        assert_eq!((l.list_id, l.usage), (1, ListIdUsage::Hold));
        assert_eq!(l.targets.len(), 1);
        assert_eq!(
            (
                l.targets[0].at,
                l.targets[0].block_len,
                &l.targets[0].designator[..]
            ),
            (16, 512, &[0x30; 8][..])
        );
        assert_eq!(
            l.segments[0],
            Segment {
                at: 48,
                source: 0,
                destination: 0,
                dc: false,
                blocks: 8,
                source_lba: 0,
                destination_lba: 100
            }
        );
    }

    #[test]
    fn test_xcopy_parse_lengths_and_limits() {
        let p = list(1, 1);
        // Truncated target or segment descriptor.
        assert_eq!(parse(&p[..47]).unwrap_err(), codes::PARAMETER_LIST_LENGTH);
        assert_eq!(parse(&p[..75]).unwrap_err(), codes::PARAMETER_LIST_LENGTH);
        assert_eq!(parse(&p[..10]).unwrap_err(), codes::PARAMETER_LIST_LENGTH);
        let max_t = usize::from(lim::MAX_TARGET_DESCRIPTORS);
        let max_s = usize::from(lim::MAX_SEGMENT_DESCRIPTORS);
        assert!(parse(&list(max_t, max_s)).is_ok());
        assert_eq!(
            parse(&list(max_t + 1, 1)).unwrap_err().ascq,
            codes::TOO_MANY_TARGET_DESCRIPTORS.ascq
        );
        assert_eq!(
            parse(&list(1, max_s + 1)).unwrap_err().ascq,
            codes::TOO_MANY_SEGMENT_DESCRIPTORS.ascq
        );
        // Beyond the maximum descriptor list length: a length error first.
        let over = (lim::MAX_DESCRIPTOR_LIST_LENGTH as usize) / 28 + 1;
        assert_eq!(
            parse(&list(max_t + 1, over)).unwrap_err(),
            codes::PARAMETER_LIST_LENGTH
        );
        // Inline data is not supported.
        let mut p = list(1, 1);
        p[15] = 4;
        p.extend([0; 4]);
        assert_eq!(parse(&p).unwrap_err().field, Some((false, 12, None)));
    }

    #[test]
    fn test_xcopy_parse_descriptor_types_and_fields() {
        let mut p = list(1, 1);
        p[16] = 0xe0; // Fibre Channel N_Port_Name
        assert_eq!(
            parse(&p).unwrap_err(),
            codes::UNSUPPORTED_TARGET_DESCRIPTOR.in_parameters(16, None)
        );
        let mut p = list(1, 1);
        p[48] = 0x03; // stream to stream
        assert_eq!(
            parse(&p).unwrap_err(),
            codes::UNSUPPORTED_SEGMENT_DESCRIPTOR.in_parameters(48, None)
        );
        // LU ID TYPE and NUL are ignored; a peripheral type other than block is not.
        let mut p = list(1, 1);
        p[17] = 0xe0;
        assert!(parse(&p).is_ok());
        p[17] = 0x01;
        assert_eq!(parse(&p).unwrap_err().asc, 0x26);
        // A target port designator, a wrong segment descriptor length.
        let mut p = list(1, 1);
        p[21] = 0x13;
        assert_eq!(parse(&p).unwrap_err().asc, 0x26);
        let mut p = list(1, 1);
        p[51] = 20;
        assert_eq!(parse(&p).unwrap_err().field, Some((false, 50, None)));
        // LIST ID USAGE: 01b is reserved, 11b needs list identifier zero.
        let mut p = list(1, 1);
        p[1] = 1 << 3;
        assert!(parse(&p).is_err());
        p[1] = 3 << 3;
        assert!(parse(&p).is_err());
        p[0] = 0;
        assert_eq!(parse(&p).unwrap().usage, ListIdUsage::None);
    }

    fn nexus(isid: u8) -> Nexus {
        Nexus {
            initiator: "iqn.i".into(),
            isid: [isid; 6],
            target: "iqn.t".into(),
            tpgt: 1,
            relative_port: 1,
        }
    }

    #[test]
    fn test_xcopy_copies_status_kept_and_limits() {
        let mut c = Copies::default();
        let (a, b) = (nexus(1), nexus(2));
        assert_eq!(c.status(&a, 1, true), None);
        c.start(&a, 1, ListIdUsage::Hold).unwrap();
        assert_eq!(
            c.start(&a, 1, ListIdUsage::Hold).unwrap_err(),
            codes::OPERATION_IN_PROGRESS
        );
        // Another nexus has its own list identifiers.
        c.start(&b, 1, ListIdUsage::NoHold).unwrap();
        c.progress(&a, 1, 1, 4096);
        assert_eq!(
            c.status(&a, 1, true),
            Some(CopyStatus {
                state: 0x02,
                segments: 1,
                bytes: 4096
            })
        );
        c.finish(&a, 1, ListIdUsage::Hold, true);
        c.finish(&b, 1, ListIdUsage::NoHold, true);
        // Held until reported once; not held without LIST ID USAGE 00b.
        assert_eq!(c.status(&a, 1, true).map(|s| s.state), Some(0x00));
        assert_eq!(c.status(&a, 1, true), None);
        assert_eq!(c.status(&b, 1, true), None);
        assert_eq!(c.running, 0);
        // The concurrency limit, then a lost nexus.
        for _ in 0..lim::MAX_CONCURRENT_COPIES {
            c.start(&a, 0, ListIdUsage::None).unwrap();
        }
        assert_eq!(
            c.start(&b, 0, ListIdUsage::None).unwrap_err(),
            codes::INSUFFICIENT_RESOURCES
        );
        c.forget(&a);
        for _ in 0..lim::MAX_CONCURRENT_COPIES {
            c.finish(&a, 0, ListIdUsage::None, true);
        }
        assert_eq!(c.running, 0);
        assert!(c.nexuses.is_empty());
        // At most KEPT_RESULTS finished results per nexus.
        for id in 0..=lim::KEPT_RESULTS as u8 {
            c.start(&a, id, ListIdUsage::Hold).unwrap();
            c.finish(&a, id, ListIdUsage::Hold, false);
        }
        assert_eq!(c.status(&a, 0, true), None);
        assert_eq!(c.status(&a, 1, true).map(|s| s.state), Some(0x01));
    }

    #[test]
    fn test_xcopy_copy_status_units() {
        let d = copy_status_data(&CopyStatus {
            state: 0,
            segments: 2,
            bytes: 8192,
        });
        assert_eq!(d, vec![0, 0, 0, 8, 0, 0, 2, 0, 0, 0, 0x20, 0]);
        let d = copy_status_data(&CopyStatus {
            state: 0,
            segments: 1,
            bytes: 1 << 40,
        });
        assert_eq!((d[7], be32(&d, 8)), (1, 1 << 30));
    }

    #[test]
    fn test_xcopy_operating_parameters_and_vpd_layout() {
        let d = operating_parameters(512);
        assert_eq!(be32(&d, 0) as usize + 4, d.len());
        assert_eq!(
            (be16(&d, 8), be16(&d, 10), be32(&d, 12)),
            (
                lim::MAX_TARGET_DESCRIPTORS,
                lim::MAX_SEGMENT_DESCRIPTORS,
                lim::MAX_DESCRIPTOR_LIST_LENGTH
            )
        );
        assert_eq!((d[37], d[43], &d[44..]), (9, 2, &[0x02, 0xe4][..]));
        let mut v = Vec::new();
        third_party_copy_vpd(&mut v, 4096);
        // Walk the descriptors: types in order, each a multiple of four bytes long.
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < v.len() {
            let len = usize::from(be16(&v, at + 2));
            assert_eq!(len % 4, 0);
            kinds.push(be16(&v, at));
            at += 4 + len;
        }
        assert_eq!(at, v.len());
        assert_eq!(kinds, vec![0x0001, 0x0004, 0x0008, 0x000c, 0x8001]);
        // Supported commands: EXTENDED COPY (LID1), RECEIVE COPY RESULTS 00h and 03h.
        assert_eq!(&v[4..12], &[7, 0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]);
        assert_eq!(v[v.len() - 20], 12);
    }
}
