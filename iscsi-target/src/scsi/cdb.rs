//! CDB decoding: the table of commands the target supports, the checks every CDB goes
//! through before it runs, and the fields of the block commands.
//!
//! Each supported command carries its CDB usage data (SPC-4, REPORT SUPPORTED OPERATION CODES): a bit map of the CDB
//! bits the device server looks at. REPORT SUPPORTED OPERATION CODES returns it as is, and
//! [`validate`] rejects any other bit set with INVALID FIELD IN CDB pointing at it, so what
//! the target advertises and what it accepts cannot drift apart.

use super::limits;
use super::sense::{Sense, codes};

/// What a command is, once its operation code (and service action) is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    TestUnitReady,
    RequestSense,
    Read6,
    Write6,
    Inquiry,
    ModeSelect6,
    Reserve6,
    Release6,
    ModeSense6,
    StartStopUnit,
    PreventAllow,
    ReadCapacity10,
    Read10,
    Write10,
    WriteVerify10,
    Verify10,
    PreFetch10,
    SyncCache10,
    ReadDefect10,
    WriteSame10,
    Unmap,
    ModeSelect10,
    Reserve10,
    Release10,
    ModeSense10,
    PrIn,
    PrOut,
    Read16,
    CompareAndWrite,
    Write16,
    WriteVerify16,
    Verify16,
    PreFetch16,
    SyncCache16,
    WriteSame16,
    ReadCapacity16,
    GetLbaStatus,
    ReportLuns,
    ReportTargetPortGroups,
    ReportOpcodes,
    ReportTmf,
    Read12,
    Write12,
    WriteVerify12,
    Verify12,
    ReadDefect12,
    ExtendedCopy,
    ReceiveCopyResults,
    OrWrite,
}

/// Not subject to unit attention conditions (SAM-5: INQUIRY, REPORT LUNS and REQUEST SENSE,
/// the last one returning the condition instead).
pub(crate) const NO_UA: u8 = 1 << 0;
/// Runs while this port's access state is unavailable (SPC-4, unavailable access state).
pub(crate) const UNAVAILABLE_OK: u8 = 1 << 1;
/// Runs while this port's access state is transitioning (SPC-4, transitioning access state).
pub(crate) const TRANSITIONING_OK: u8 = 1 << 2;
/// Not checked against reservations.
pub(crate) const NO_PR: u8 = 1 << 3;
/// Only on thin-provisioned LUNs (UNMAP).
pub(crate) const THIN_ONLY: u8 = 1 << 4;
/// Changes the medium: refused while the LUN is software write protected (EXTENDED COPY,
/// which writes only to its destination LUNs, checks them itself).
pub(crate) const WRITES: u8 = 1 << 5;

/// One supported command.
#[derive(Debug)]
pub(crate) struct OpInfo {
    /// Which command.
    pub op: Op,
    /// Its service action, for commands that have one.
    pub sa: Option<u8>,
    /// CDB usage data: byte 0 is the operation code, the service action bits hold the
    /// service action; every other set bit is a field the device server uses. Its length is
    /// the CDB length.
    pub usage: &'static [u8],
    /// [`NO_UA`], [`UNAVAILABLE_OK`], [`TRANSITIONING_OK`], [`NO_PR`], [`THIN_ONLY`],
    /// [`WRITES`].
    pub flags: u8,
    /// The recommended command timeout reported with RCTD, in seconds.
    pub timeout: u32,
}

impl OpInfo {
    /// The operation code.
    pub fn opcode(&self) -> u8 {
        self.usage[0]
    }

    /// The CDB length.
    pub fn cdb_len(&self) -> usize {
        self.usage.len()
    }

    /// Whether a flag is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

const fn op(op: Op, sa: Option<u8>, usage: &'static [u8], flags: u8, timeout: u32) -> OpInfo {
    OpInfo {
        op,
        sa,
        usage,
        flags,
        timeout,
    }
}

const SPC: u8 = UNAVAILABLE_OK | TRANSITIONING_OK;
const FF: u8 = 0xff;

/// Every supported command, ordered by operation code and service action (the order REPORT
/// SUPPORTED OPERATION CODES lists them in).
#[rustfmt::skip]
pub(crate) static OPS: &[OpInfo] = &[
    op(Op::TestUnitReady, None, &[0x00, 0, 0, 0, 0, 0], 0, 10),
    op(Op::RequestSense, None, &[0x03, 0x01, 0, 0, FF, 0], NO_UA | NO_PR | SPC, 10),
    op(Op::Read6, None, &[0x08, 0x1f, FF, FF, FF, 0], 0, 30),
    op(Op::Write6, None, &[0x0a, 0x1f, FF, FF, FF, 0], WRITES, 30),
    op(Op::Inquiry, None, &[0x12, 0x01, FF, FF, FF, 0], NO_UA | NO_PR | SPC, 10),
    op(Op::ModeSelect6, None, &[0x15, 0x11, 0, 0, FF, 0], UNAVAILABLE_OK, 10),
    op(Op::Reserve6, None, &[0x16, 0, 0, 0, 0, 0], 0, 30),
    op(Op::Release6, None, &[0x17, 0, 0, 0, 0, 0], 0, 30),
    op(Op::ModeSense6, None, &[0x1a, 0x08, FF, FF, FF, 0], UNAVAILABLE_OK, 10),
    op(Op::StartStopUnit, None, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0], 0, 30),
    op(Op::PreventAllow, None, &[0x1e, 0, 0, 0, 0x03, 0], 0, 10),
    op(Op::ReadCapacity10, None, &[0x25, 0, FF, FF, FF, FF, 0, 0, 0x01, 0], 0, 10),
    op(Op::Read10, None, &[0x28, 0x1e, FF, FF, FF, FF, 0x3f, FF, FF, 0], 0, 30),
    op(Op::Write10, None, &[0x2a, 0x1a, FF, FF, FF, FF, 0x3f, FF, FF, 0], WRITES, 30),
    op(Op::WriteVerify10, None, &[0x2e, 0x12, FF, FF, FF, FF, 0x3f, FF, FF, 0], WRITES, 30),
    op(Op::Verify10, None, &[0x2f, 0x16, FF, FF, FF, FF, 0x3f, FF, FF, 0], 0, 30),
    op(Op::PreFetch10, None, &[0x34, 0x02, FF, FF, FF, FF, 0x3f, FF, FF, 0], 0, 30),
    op(Op::SyncCache10, None, &[0x35, 0x06, FF, FF, FF, FF, 0x3f, FF, FF, 0], 0, 60),
    op(Op::ReadDefect10, None, &[0x37, 0, 0x1f, 0, 0, 0, 0, FF, FF, 0], 0, 10),
    op(Op::WriteSame10, None, &[0x41, 0x08, FF, FF, FF, FF, 0x3f, FF, FF, 0], WRITES, 60),
    op(Op::Unmap, None, &[0x42, 0, 0, 0, 0, 0, 0x3f, FF, FF, 0], THIN_ONLY | WRITES, 60),
    op(Op::ModeSelect10, None, &[0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, 0], UNAVAILABLE_OK, 10),
    op(Op::Reserve10, None, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 30),
    op(Op::Release10, None, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 30),
    op(Op::ModeSense10, None, &[0x5a, 0x18, FF, FF, 0, 0, 0, FF, FF, 0], UNAVAILABLE_OK, 10),
    op(Op::PrIn, Some(0x00), &[0x5e, 0x00, 0, 0, 0, 0, 0, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrIn, Some(0x01), &[0x5e, 0x01, 0, 0, 0, 0, 0, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrIn, Some(0x02), &[0x5e, 0x02, 0, 0, 0, 0, 0, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrIn, Some(0x03), &[0x5e, 0x03, 0, 0, 0, 0, 0, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x00), &[0x5f, 0x00, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x01), &[0x5f, 0x01, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x02), &[0x5f, 0x02, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x03), &[0x5f, 0x03, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x04), &[0x5f, 0x04, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x05), &[0x5f, 0x05, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x06), &[0x5f, 0x06, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::PrOut, Some(0x07), &[0x5f, 0x07, FF, 0, 0, FF, FF, FF, FF, 0], UNAVAILABLE_OK, 30),
    op(Op::ExtendedCopy, Some(0x00), &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0], 0, 600),
    op(Op::ReceiveCopyResults, Some(0x00), &[0x84, 0x00, FF, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0], 0, 10),
    op(Op::ReceiveCopyResults, Some(0x03), &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0], 0, 10),
    op(Op::Read16, None, &[0x88, 0x1e, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], 0, 30),
    op(Op::CompareAndWrite, None, &[0x89, 0x1a, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0x3f, 0], WRITES, 30),
    op(Op::Write16, None, &[0x8a, 0x1a, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], WRITES, 30),
    op(Op::OrWrite, None, &[0x8b, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], WRITES, 30),
    op(Op::WriteVerify16, None, &[0x8e, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], WRITES, 30),
    op(Op::Verify16, None, &[0x8f, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], 0, 30),
    op(Op::PreFetch16, None, &[0x90, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], 0, 30),
    op(Op::SyncCache16, None, &[0x91, 0x06, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], 0, 60),
    op(Op::WriteSame16, None, &[0x93, 0x09, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], WRITES, 60),
    op(Op::ReadCapacity16, Some(0x10), &[0x9e, 0x10, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x01, 0], 0, 10),
    op(Op::GetLbaStatus, Some(0x12), &[0x9e, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0], 0, 30),
    op(Op::ReportLuns, None, &[0xa0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0], NO_UA | NO_PR | SPC, 10),
    op(Op::ReportTargetPortGroups, Some(0x0a), &[0xa3, 0xea, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0], SPC, 10),
    op(Op::ReportOpcodes, Some(0x0c), &[0xa3, 0x0c, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0], SPC, 10),
    op(Op::ReportTmf, Some(0x0d), &[0xa3, 0x0d, 0x80, 0, 0, 0, FF, FF, FF, FF, 0, 0], SPC, 10),
    op(Op::Read12, None, &[0xa8, 0x1e, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], 0, 30),
    op(Op::Write12, None, &[0xaa, 0x1a, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], WRITES, 30),
    op(Op::WriteVerify12, None, &[0xae, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], WRITES, 30),
    op(Op::Verify12, None, &[0xaf, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, 0x3f, 0], 0, 30),
    op(Op::ReadDefect12, None, &[0xb7, 0x1f, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0], 0, 10),
];

/// Operation codes whose byte 1 holds a service action.
pub(crate) fn has_service_actions(opcode: u8) -> bool {
    matches!(opcode, 0x5e | 0x5f | 0x83 | 0x84 | 0x9e | 0xa3)
}

/// The supported command `cdb` starts with.
///
/// An unknown operation code is INVALID COMMAND OPERATION CODE; a known one with an unknown
/// service action is INVALID FIELD IN CDB pointing at the service action. Persistent
/// reservation commands accept any service action here: the reservation code decides.
pub(crate) fn lookup(cdb: &[u8]) -> Result<&'static OpInfo, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(codes::INVALID_OPCODE);
    };
    if has_service_actions(opcode) {
        let sa = cdb.get(1).copied().unwrap_or(0) & 0x1f;
        let mut first = None;
        for info in OPS.iter().filter(|i| i.opcode() == opcode) {
            if info.sa == Some(sa) {
                return Ok(info);
            }
            first.get_or_insert(info);
        }
        return match first {
            Some(info) if matches!(info.op, Op::PrIn | Op::PrOut) => Ok(info),
            Some(_) => Err(codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4))),
            None => Err(codes::INVALID_OPCODE),
        };
    }
    OPS.iter()
        .find(|i| i.opcode() == opcode)
        .ok_or(codes::INVALID_OPCODE)
}

/// The command with this operation code and service action, for REPORT SUPPORTED
/// OPERATION CODES.
pub(crate) fn find(opcode: u8, sa: Option<u8>) -> Option<&'static OpInfo> {
    OPS.iter().find(|i| i.opcode() == opcode && i.sa == sa)
}

/// Checks that `cdb` is long enough and sets no bit outside the command's usage data.
///
/// The control byte's NACA and LINK bits are not supported; its vendor-specific bits are
/// ignored.
pub(crate) fn validate(info: &OpInfo, cdb: &[u8]) -> Result<(), Sense> {
    let len = info.cdb_len();
    if cdb.len() < len {
        return Err(codes::INVALID_FIELD_IN_CDB);
    }
    for (i, (&b, &usage)) in cdb.iter().zip(info.usage).enumerate().take(len - 1).skip(1) {
        let allowed = if i == 1 && info.sa.is_some() {
            usage | 0x1f
        } else {
            usage
        };
        let bad = b & !allowed;
        if bad != 0 {
            return Err(invalid_bit(i, bad));
        }
    }
    let bad = cdb[len - 1] & 0x3f;
    if bad != 0 {
        return Err(invalid_bit(len - 1, bad));
    }
    Ok(())
}

/// INVALID FIELD IN CDB pointing at the highest bit of `bad` in byte `byte`.
pub(crate) fn invalid_bit(byte: usize, bad: u8) -> Sense {
    codes::INVALID_FIELD_IN_CDB.in_cdb(byte as u16, Some(7 - bad.leading_zeros() as u8))
}

/// INVALID FIELD IN CDB pointing at byte `byte`.
pub(crate) fn invalid_byte(byte: usize) -> Sense {
    codes::INVALID_FIELD_IN_CDB.in_cdb(byte as u16, None)
}

/// Big-endian field readers that read zeroes past the end of the buffer.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

pub(crate) fn be24(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 3) {
        a[1..].copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// The addressing fields of a block command (READ, WRITE, VERIFY, WRITE AND VERIFY,
/// PRE-FETCH, SYNCHRONIZE CACHE, WRITE SAME, COMPARE AND WRITE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockRange {
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Byte of the CDB holding the length field, for sense field pointers.
    pub len_byte: u16,
    /// DPO (disable page out): accepted, there is no cache to spare.
    pub dpo: bool,
    /// FUA: the data is durable before the command completes.
    pub fua: bool,
    /// BYTCHK (VERIFY and WRITE AND VERIFY).
    pub bytchk: u8,
}

/// Decodes the LBA and length of a block command; the CDB must have passed [`validate`].
pub(crate) fn block_range(op: Op, cdb: &[u8]) -> BlockRange {
    let b1 = cdb.get(1).copied().unwrap_or(0);
    let (lba, blocks, len_byte) = match op {
        Op::Read6 | Op::Write6 => {
            let lba = (u64::from(b1 & 0x1f) << 16) | u64::from(be16(cdb, 2));
            // A transfer length of zero means 256 blocks in the 6-byte commands.
            let n = match cdb.get(4).copied().unwrap_or(0) {
                0 => 256,
                n => u64::from(n),
            };
            (lba, n, 4)
        }
        Op::Read10
        | Op::Write10
        | Op::WriteVerify10
        | Op::Verify10
        | Op::PreFetch10
        | Op::SyncCache10
        | Op::WriteSame10 => (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)), 7),
        Op::Read12 | Op::Write12 | Op::WriteVerify12 | Op::Verify12 => {
            (u64::from(be32(cdb, 2)), u64::from(be32(cdb, 6)), 6)
        }
        Op::CompareAndWrite => (
            be64(cdb, 2),
            u64::from(cdb.get(13).copied().unwrap_or(0)),
            13,
        ),
        _ => (be64(cdb, 2), u64::from(be32(cdb, 10)), 10),
    };
    let six = matches!(op, Op::Read6 | Op::Write6);
    BlockRange {
        lba,
        blocks,
        len_byte,
        dpo: !six && b1 & 0x10 != 0,
        fua: !six && b1 & 0x08 != 0,
        bytchk: (b1 >> 1) & 0x03,
    }
}

/// Checks that `lba .. lba + blocks` lies within a LUN of `capacity` blocks.
pub(crate) fn check_range(lba: u64, blocks: u64, capacity: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity && lba <= capacity => Ok(()),
        _ => Err(codes::LBA_OUT_OF_RANGE),
    }
}

/// The number of Data-Out bytes the command in `cdb` asks for (its SCSI transfer length) on
/// a LUN with `block_size`-byte logical blocks, or `None` when the CDB is not a supported
/// command. The iSCSI layer compares it with the Expected Data Transfer Length to report
/// write residuals; [`Scsi::data_out_length`](super::Scsi::data_out_length) looks the block
/// size up.
///
/// ```
/// use csvd_iscsi_target::scsi::data_out_length_for;
/// // WRITE (10) of two blocks.
/// let cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0];
/// assert_eq!(data_out_length_for(&cdb, 4096), Some(8192));
/// assert_eq!(data_out_length_for(&cdb, 512), Some(1024));
/// ```
pub fn data_out_length_for(cdb: &[u8], block_size: u32) -> Option<u64> {
    let info = lookup(cdb).ok()?;
    if cdb.len() < info.cdb_len() {
        return None;
    }
    let bs = u64::from(block_size);
    let b1 = cdb[1];
    let n = match info.op {
        Op::Write6 | Op::Write10 | Op::Write12 | Op::Write16 | Op::OrWrite => {
            block_range(info.op, cdb).blocks * bs
        }
        Op::WriteVerify10 | Op::WriteVerify12 | Op::WriteVerify16 => {
            block_range(info.op, cdb).blocks * bs
        }
        Op::Verify10 | Op::Verify12 | Op::Verify16 => match (b1 >> 1) & 0x03 {
            0 => 0,
            3 => bs,
            _ => block_range(info.op, cdb).blocks * bs,
        },
        Op::WriteSame10 => bs,
        Op::WriteSame16 if b1 & 0x01 != 0 => 0,
        Op::WriteSame16 => bs,
        Op::CompareAndWrite => 2 * block_range(info.op, cdb).blocks * bs,
        Op::ModeSelect6 => u64::from(cdb[4]),
        Op::ModeSelect10 | Op::Unmap => u64::from(be16(cdb, 7)),
        Op::PrOut => u64::from(be32(cdb, 5)),
        Op::ExtendedCopy => u64::from(be32(cdb, 10)),
        _ => 0,
    };
    Some(n)
}

/// Checks a block count against the maximum transfer length of a LUN with `block_size`-byte
/// blocks.
pub(crate) fn check_transfer(range: &BlockRange, block_size: u32) -> Result<(), Sense> {
    if range.blocks > u64::from(limits::max_transfer_blocks(block_size)) {
        return Err(invalid_byte(range.len_byte as usize));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ops_sorted_and_consistent() {
        for w in OPS.windows(2) {
            let a = (w[0].opcode(), w[0].sa);
            let b = (w[1].opcode(), w[1].sa);
            assert!(a < b, "{a:?} before {b:?}");
        }
        for info in OPS {
            let expect = match info.opcode() >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                _ => unreachable!(),
            };
            assert_eq!(info.cdb_len(), expect, "{:?}", info.op);
            if let Some(sa) = info.sa {
                assert_eq!(info.usage[1] & 0x1f, sa);
                assert!(has_service_actions(info.opcode()));
            }
        }
    }

    #[test]
    fn test_ops_writes_flag_marks_medium_changes() {
        let writes: Vec<Op> = OPS.iter().filter(|i| i.has(WRITES)).map(|i| i.op).collect();
        assert_eq!(
            writes,
            vec![
                Op::Write6,
                Op::Write10,
                Op::WriteVerify10,
                Op::WriteSame10,
                Op::Unmap,
                Op::CompareAndWrite,
                Op::Write16,
                Op::OrWrite,
                Op::WriteVerify16,
                Op::WriteSame16,
                Op::Write12,
                Op::WriteVerify12,
            ]
        );
    }

    #[test]
    fn test_lookup_unknown_opcode_and_service_action() {
        assert_eq!(
            lookup(&[0x7e, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err(),
            codes::INVALID_OPCODE
        );
        assert_eq!(lookup(&[0x83, 0x00]).unwrap().op, Op::ExtendedCopy);
        assert!(lookup(&[0x83, 0x01]).is_err());
        assert_eq!(lookup(&[0x84, 0x03]).unwrap().op, Op::ReceiveCopyResults);
        assert_eq!(lookup(&[]).unwrap_err(), codes::INVALID_OPCODE);
        let e = lookup(&[0x9e, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e, codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)));
        assert_eq!(lookup(&[0x9e, 0x10]).unwrap().op, Op::ReadCapacity16);
        // Reservation commands leave service actions to the reservation code.
        assert_eq!(lookup(&[0x5f, 0x1f]).unwrap().op, Op::PrOut);
    }

    #[test]
    fn test_validate_reserved_bits_point_at_field() {
        let info = lookup(&[0x28]).unwrap();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        assert!(validate(info, &cdb).is_ok());
        cdb[1] = 0x20; // RDPROTECT
        assert_eq!(
            validate(info, &cdb).unwrap_err(),
            codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(5))
        );
        cdb[1] = 0x18; // DPO, FUA
        assert!(validate(info, &cdb).is_ok());
        cdb[9] = 0x04; // NACA
        assert_eq!(
            validate(info, &cdb).unwrap_err(),
            codes::INVALID_FIELD_IN_CDB.in_cdb(9, Some(2))
        );
        cdb[9] = 0x80; // vendor specific
        assert!(validate(info, &cdb).is_ok());
        assert!(validate(info, &cdb[..9]).is_err());
    }

    #[test]
    fn test_block_range_decodes_each_size() {
        let r = block_range(Op::Read6, &[0x08, 0x1f, 0xff, 0xff, 0, 0]);
        assert_eq!((r.lba, r.blocks), (0x1f_ffff, 256));
        let r = block_range(Op::Write10, &[0x2a, 0x08, 0, 0, 1, 0, 0, 0, 2, 0]);
        assert_eq!((r.lba, r.blocks, r.fua, r.dpo), (256, 2, true, false));
        let mut c16 = [0u8; 16];
        c16[0] = 0x88;
        c16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c16[10..14].copy_from_slice(&7u32.to_be_bytes());
        let r = block_range(Op::Read16, &c16);
        assert_eq!((r.lba, r.blocks, r.len_byte), (u64::MAX, 7, 10));
        let r = block_range(Op::Verify12, &[0xaf, 0x02, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0]);
        assert_eq!((r.lba, r.blocks, r.bytchk), (9, 3, 1));
    }

    #[test]
    fn test_check_range_edges() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(9, 2, 10).is_err());
        assert!(check_range(11, 0, 10).is_err());
        assert!(check_range(u64::MAX, 1, 10).is_err());
    }

    #[test]
    fn test_data_out_length_per_command() {
        let len = |cdb: &[u8]| data_out_length_for(cdb, 4096);
        assert_eq!(len(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0]), Some(8192));
        assert_eq!(len(&[0x0a, 0, 0, 0, 0, 0]), Some(256 * 4096));
        assert_eq!(len(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]), Some(0));
        let mut caw = [0u8; 16];
        caw[0] = 0x89;
        caw[13] = 1;
        assert_eq!(len(&caw), Some(8192));
        assert_eq!(data_out_length_for(&caw, 512), Some(1024));
        assert_eq!(len(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), Some(24));
        let mut xcopy = [0u8; 16];
        xcopy[0] = 0x83;
        xcopy[13] = 76;
        assert_eq!(len(&xcopy), Some(76));
        let mut orwrite = [0u8; 16];
        orwrite[0] = 0x8b;
        orwrite[13] = 3;
        assert_eq!(data_out_length_for(&orwrite, 512), Some(1536));
        assert_eq!(len(&[0x7e]), None);
    }
}
