//! SPC-4 parameter data: INQUIRY and its VPD pages, REPORT LUNS, REQUEST SENSE, READ
//! CAPACITY, REPORT SUPPORTED OPERATION CODES, REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS,
//! REPORT TARGET PORT GROUPS and READ DEFECT DATA, built as pure functions of the CDB and
//! the LUN.
//!
//! Every function returns the full parameter data cut to the CDB's allocation length.

use super::cdb::{self, OPS, Op, OpInfo, THIN_ONLY, be16, be32};
use super::limits;
use super::sense::{Sense, codes};
use super::xcopy;
use crate::backend::{AluaState, LunInfo, Nexus, PortGroup};

/// T10 vendor identification.
pub(crate) const VENDOR: &[u8; 8] = b"CSVD    ";
/// Product identification.
pub(crate) const PRODUCT: &[u8; 16] = b"VIRTUAL-DISK    ";

/// Cuts parameter data to the allocation length.
fn cut(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}

/// Copies `s` into `dst`, replacing anything but printable ASCII and padding with spaces.
fn put_ascii(dst: &mut [u8], s: &[u8]) {
    for (i, d) in dst.iter_mut().enumerate() {
        *d = match s.get(i) {
            Some(&c) if (0x20..0x7f).contains(&c) => c,
            Some(_) => b'_',
            None => b' ',
        };
    }
}

/// The product revision level: the crate's major and minor version.
fn revision() -> [u8; 4] {
    let v = concat!(
        env!("CARGO_PKG_VERSION_MAJOR"),
        ".",
        env!("CARGO_PKG_VERSION_MINOR")
    );
    let mut r = [b' '; 4];
    put_ascii(&mut r, v.as_bytes());
    r
}

/// The unit serial number: the LUN's uuid in hex, the same through every node's portal.
pub(crate) fn serial(lu: &LunInfo) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = [0u8; 32];
    for (i, b) in lu.uuid.iter().enumerate() {
        s[2 * i] = HEX[usize::from(b >> 4)];
        s[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    s
}

/// The NAA designator of a LUN.
///
/// NAA 3h ("locally assigned" in SPC-4) holds a 60-bit value the owner assigns
/// without an IEEE company id; csvd has no OUI, so an NAA 5h or 6h designator would claim
/// someone else's. The value is the first 60 bits of the LUN's uuid (random v4 bits), the
/// same on every node; the full uuid is also in the T10 vendor id designator and the
/// serial number.
pub(crate) fn naa(lu: &LunInfo) -> [u8; 8] {
    let mut v = [0u8; 8];
    v.copy_from_slice(&lu.uuid[..8]);
    let x = (u64::from_be_bytes(v) >> 4) | (0x3 << 60);
    x.to_be_bytes()
}

/// Standard INQUIRY data (96 bytes). `lu` is `None` for a LUN that does not exist here:
/// peripheral qualifier 011b, device type 1Fh.
///
/// RMB is 0: the medium is not removable, so the commands and tests that need removable
/// media (PREVENT ALLOW MEDIUM REMOVAL with PREVENT set, START STOP UNIT ejecting, libiscsi's
/// NoMedia and PreventAllow suites) do not apply; PREVENT ALLOW MEDIUM REMOVAL and START STOP
/// UNIT complete without effect.
pub(crate) fn standard_inquiry(lu: Option<&LunInfo>, multiport: bool) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = if lu.is_some() { 0x00 } else { 0x7f };
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    // TPGS = 01b: implicit ALUA only; 3PC: EXTENDED COPY is supported.
    d[5] = 0x10 | 0x08;
    d[6] = if multiport { 0x10 } else { 0x00 }; // MULTIP
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(&revision());
    // Vendor specific: the disk's name.
    put_ascii(&mut d[36..56], lu.map(|l| l.name.as_bytes()).unwrap_or(b""));
    // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
    for (i, v) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// The VPD pages, in ascending order.
const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2];

/// INQUIRY for an existing LUN: standard data or a VPD page.
pub(crate) fn inquiry(
    cdb: &[u8],
    lu: &LunInfo,
    nexus: &Nexus,
    multiport: bool,
) -> Result<Vec<u8>, Sense> {
    let alloc = usize::from(be16(cdb, 3));
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    if !evpd {
        if page != 0 {
            return Err(cdb::invalid_byte(2));
        }
        return Ok(cut(standard_inquiry(Some(lu), multiport), alloc));
    }
    let mut d = vec![0x00, page, 0, 0];
    match page {
        0x00 => d.extend_from_slice(&VPD_PAGES),
        0x80 => d.extend_from_slice(&serial(lu)),
        0x83 => device_identification(&mut d, lu, nexus),
        0x8f => xcopy::third_party_copy_vpd(&mut d, lu.block_size),
        0xb0 => block_limits(&mut d, lu),
        0xb1 => {
            // Block device characteristics: non-rotating medium. WABEREQ and WACEREQ (reads
            // after a sanitize erase) are 0: SANITIZE is not offered.
            d.resize(64, 0);
            d[4..6].copy_from_slice(&1u16.to_be_bytes());
        }
        0xb2 => {
            // Logical block provisioning.
            d.resize(8, 0);
            if lu.thin {
                d[5] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
                if lbprz(lu) {
                    d[5] |= 0x04; // LBPRZ = 001b
                }
                d[6] = 0x02; // thin provisioned
            }
        }
        _ => return Err(cdb::invalid_byte(2)),
    }
    let len = (d.len() - 4) as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(cut(d, alloc))
}

/// Appends one designation descriptor.
fn designator(d: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, value: &[u8]) {
    d.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, value.len() as u8]);
    d.extend_from_slice(value);
}

/// Device identification VPD page body (0x83).
fn device_identification(d: &mut Vec<u8>, lu: &LunInfo, nexus: &Nexus) {
    // Logical unit: NAA 3h, binary.
    designator(d, 0x01, 0x03, &naa(lu));
    // Logical unit: T10 vendor id, ASCII: vendor then the uuid in hex.
    let mut t10 = Vec::with_capacity(40);
    t10.extend_from_slice(VENDOR);
    t10.extend_from_slice(&serial(lu));
    designator(d, 0x02, 0x01, &t10);
    // Target port (iSCSI, PIV): relative target port identifier.
    let mut rp = [0u8; 4];
    rp[2..].copy_from_slice(&nexus.relative_port.to_be_bytes());
    designator(d, 0x51, 0x94, &rp);
    // Target port: target port group.
    let mut tpg = [0u8; 4];
    tpg[2..].copy_from_slice(&nexus.tpgt.to_be_bytes());
    designator(d, 0x51, 0x95, &tpg);
    // Target port: SCSI name string "<iqn>,t,0x<tpgt>", NUL-terminated, padded to 4.
    designator(
        d,
        0x53,
        0x98,
        &name_string(&format!("{},t,0x{:04x}", nexus.target, nexus.tpgt)),
    );
    // Target device: SCSI name string "<iqn>".
    designator(d, 0x53, 0xa8, &name_string(&nexus.target));
}

/// A SCSI name string: UTF-8, NUL-terminated, padded with NULs to a multiple of four, at
/// most 252 bytes (longer names are cut).
fn name_string(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.as_bytes().iter().copied().take(251).collect();
    v.push(0);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

/// Block limits VPD page body (0xB0), page length 0x3C, in the LUN's logical blocks.
fn block_limits(d: &mut Vec<u8>, lu: &LunInfo) {
    let bs = lu.block_size;
    let per_physical = limits::physical_granularity(bs);
    d.resize(64, 0);
    // WSNZ = 0: a WRITE SAME with NUMBER OF LOGICAL BLOCKS zero writes to the end.
    d[5] = limits::MAX_COMPARE_AND_WRITE_BLOCKS;
    // Optimal transfer length granularity: a physical block.
    d[6..8].copy_from_slice(&(per_physical as u16).to_be_bytes());
    d[8..12].copy_from_slice(&limits::max_transfer_blocks(bs).to_be_bytes());
    d[12..16].copy_from_slice(&limits::optimal_transfer_blocks(bs).to_be_bytes());
    if lu.thin {
        d[20..24].copy_from_slice(&limits::MAX_UNMAP_BLOCKS.to_be_bytes());
        d[24..28].copy_from_slice(&limits::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        // Optimal unmap granularity: a physical block, aligned at LBA 0 (UGAVALID).
        d[28..32].copy_from_slice(&per_physical.to_be_bytes());
        d[32] = 0x80;
    }
    d[36..44].copy_from_slice(&limits::MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    // MAXIMUM ATOMIC TRANSFER LENGTH, ATOMIC ALIGNMENT, ATOMIC TRANSFER LENGTH GRANULARITY
    // and the atomic boundary fields (44..64) stay zero: WRITE ATOMIC is not offered.
}

/// Whether the LUN reports LBPRZ (deallocated blocks read as zeroes): 512-byte thin LUNs
/// only.
///
/// Deallocated blocks do read as zeroes on every LUN, but a 4096-byte LUN reports LBPRZ 0:
/// QEMU 10's iSCSI block driver, when LBPRZ is 1, answers block-status queries with a length
/// that is only 512-byte aligned and aborts on an assertion for LUNs with 4 KiB blocks
/// (block/iscsi.c, `iscsi_co_block_status`), killing the guest. Without LBPRZ it does not
/// take that path.
pub(crate) fn lbprz(lu: &LunInfo) -> bool {
    lu.thin && lu.block_size < crate::backend::BLOCK_SIZE
}

/// REPORT LUNS parameter data for the LUN numbers in `luns` (already filtered by the ACL).
pub(crate) fn report_luns(cdb: &[u8], luns: &[u64]) -> Result<Vec<u8>, Sense> {
    let alloc = be32(cdb, 6) as usize;
    let select = cdb[2];
    let listed: &[u64] = match select {
        0x00 | 0x02 => luns,
        // Well-known logical units only: there are none.
        0x01 => &[],
        _ => return Err(cdb::invalid_byte(2)),
    };
    let mut d = Vec::with_capacity(8 + 8 * listed.len());
    d.extend_from_slice(&((8 * listed.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for &l in listed {
        d.extend_from_slice(&super::encode_lun(l));
    }
    Ok(cut(d, alloc))
}

/// REQUEST SENSE parameter data for `sense`, in the format the DESC bit asks for.
pub(crate) fn request_sense(cdb: &[u8], sense: &Sense) -> Vec<u8> {
    let alloc = usize::from(cdb[4]);
    let data = if cdb[1] & 0x01 != 0 {
        sense.to_descriptor()
    } else {
        sense.to_fixed().to_vec()
    };
    cut(data, alloc)
}

/// READ CAPACITY (10) parameter data.
pub(crate) fn read_capacity10(lu: &LunInfo) -> Vec<u8> {
    let last = lu.blocks().saturating_sub(1);
    let last = u32::try_from(last).unwrap_or(u32::MAX);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&last.to_be_bytes());
    d.extend_from_slice(&lu.block_size.to_be_bytes());
    d
}

/// READ CAPACITY (16) parameter data.
pub(crate) fn read_capacity16(cdb: &[u8], lu: &LunInfo) -> Vec<u8> {
    let alloc = be32(cdb, 10) as usize;
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lu.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lu.block_size.to_be_bytes());
    // No protection information. LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: 4 KiB physical
    // blocks (3 for 512-byte LUNs); the lowest aligned LBA is 0.
    d[13] = lu.blocks_per_physical().trailing_zeros() as u8;
    if lu.thin {
        d[14] = 0x80; // LBPME
        if lbprz(lu) {
            d[14] |= 0x40; // LBPRZ
        }
    }
    cut(d, alloc)
}

/// Whether a command (or service action) is supported on this LUN.
fn supported_here(info: &OpInfo, thin: bool) -> bool {
    thin || !info.has(THIN_ONLY)
}

/// The command timeouts descriptor (12 bytes).
fn timeouts(d: &mut Vec<u8>, info: &OpInfo) {
    d.extend_from_slice(&[0x00, 0x0a, 0, 0]);
    d.extend_from_slice(&0u32.to_be_bytes()); // nominal: not specified
    d.extend_from_slice(&info.timeout.to_be_bytes());
}

/// REPORT SUPPORTED OPERATION CODES parameter data.
pub(crate) fn report_opcodes(cdb: &[u8], thin: bool) -> Result<Vec<u8>, Sense> {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let opcode = cdb[3];
    let sa = be16(cdb, 4);
    let alloc = be32(cdb, 6) as usize;
    if options == 0 {
        let mut d = vec![0u8; 4];
        for info in OPS.iter().filter(|i| supported_here(i, thin)) {
            let sa = info.sa.unwrap_or(0);
            let flags = if rctd { 0x02 } else { 0 } | u8::from(info.sa.is_some());
            d.extend_from_slice(&[info.opcode(), 0, 0, sa, 0, flags]);
            d.extend_from_slice(&(info.cdb_len() as u16).to_be_bytes());
            if rctd {
                timeouts(&mut d, info);
            }
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        return Ok(cut(d, alloc));
    }
    let with_sa = cdb::has_service_actions(opcode);
    let wanted = match options {
        1 if with_sa => return Err(cdb::invalid_byte(3)),
        1 => cdb::find(opcode, None),
        2 if !with_sa => return Err(cdb::invalid_byte(3)),
        2 | 3 if with_sa => u8::try_from(sa)
            .ok()
            .and_then(|sa| cdb::find(opcode, Some(sa))),
        3 => cdb::find(opcode, None),
        _ => return Err(cdb::invalid_bit(2, options)),
    };
    let mut d = vec![0u8; 4];
    match wanted.filter(|i| supported_here(i, thin)) {
        Some(info) => {
            d[1] = if rctd { 0x80 } else { 0 } | 0x03;
            d[2..4].copy_from_slice(&(info.cdb_len() as u16).to_be_bytes());
            let at = d.len();
            d.extend_from_slice(info.usage);
            if !thin && matches!(info.op, Op::WriteSame10 | Op::WriteSame16) {
                // No UNMAP bit on a fully provisioned LUN.
                d[at + 1] &= !0x08;
            }
            if rctd {
                timeouts(&mut d, info);
            }
        }
        None => d[1] = 0x01, // not supported
    }
    Ok(cut(d, alloc))
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS parameter data: ABORT TASK, ABORT TASK SET,
/// CLEAR TASK SET, LOGICAL UNIT RESET and TARGET RESET.
pub(crate) fn report_tmf(cdb: &[u8]) -> Vec<u8> {
    let repd = cdb[2] & 0x80 != 0;
    let alloc = be32(cdb, 6) as usize;
    let mut d = vec![0u8; if repd { 16 } else { 4 }];
    d[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02; // ATS, ATSS, CTSS, LURS, TRS
    if repd {
        d[3] = 0x0c;
    }
    cut(d, alloc)
}

/// The asymmetric access state code of REPORT TARGET PORT GROUPS.
fn state_code(s: AluaState) -> u8 {
    match s {
        AluaState::ActiveOptimized => 0x0,
        AluaState::ActiveNonOptimized => 0x1,
        AluaState::Unavailable => 0x3,
        AluaState::Transitioning => 0xf,
    }
}

/// REPORT TARGET PORT GROUPS parameter data, in the length-only or the extended header
/// format.
pub(crate) fn report_target_port_groups(
    cdb: &[u8],
    groups: &[PortGroup],
) -> Result<Vec<u8>, Sense> {
    let format = cdb[1] >> 5;
    if format > 1 {
        return Err(cdb::invalid_bit(1, cdb[1] & 0xe0));
    }
    let alloc = be32(cdb, 6) as usize;
    let mut d = vec![0u8; 4];
    if format == 1 {
        // Extended header: format type 001b, implicit transition time not specified.
        d.extend_from_slice(&[0x10, 0, 0, 0]);
    }
    let mut sorted: Vec<&PortGroup> = groups.iter().collect();
    sorted.sort_by_key(|g| g.id);
    for g in sorted {
        let ports = &g.relative_ports[..g.relative_ports.len().min(255)];
        // Supported states: transitioning, unavailable, active/non-optimized, active/optimized.
        d.extend_from_slice(&[state_code(g.state), 0x80 | 0x08 | 0x02 | 0x01]);
        d.extend_from_slice(&g.id.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, ports.len() as u8]);
        for p in ports {
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&p.to_be_bytes());
        }
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(cut(d, alloc))
}

/// READ DEFECT DATA parameter data: an empty list in the requested format.
pub(crate) fn read_defect(cdb: &[u8], twelve: bool) -> Vec<u8> {
    if twelve {
        let alloc = be32(cdb, 6) as usize;
        let flags = cdb[1] & 0x1f;
        cut(vec![0, flags, 0, 0, 0, 0, 0, 0], alloc)
    } else {
        let alloc = usize::from(be16(cdb, 7));
        let flags = cdb[2] & 0x1f;
        cut(vec![0, flags, 0, 0], alloc)
    }
}

/// The sense data REQUEST SENSE reports when nothing is pending, from the port's state.
pub(crate) fn current_condition(state: AluaState) -> Sense {
    match state {
        AluaState::Unavailable => codes::PORT_UNAVAILABLE,
        AluaState::Transitioning => codes::PORT_TRANSITIONING,
        _ => codes::NO_SENSE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lun(thin: bool) -> LunInfo {
        LunInfo {
            block_size: crate::backend::BLOCK_SIZE,
            lun: 0,
            uuid: [0xab; 16],
            name: "disk-one".into(),
            size_bytes: 1 << 30,
            thin,
            write_protected: false,
            write_fence: None,
        }
    }

    fn nexus() -> Nexus {
        Nexus {
            initiator: "iqn.i".into(),
            isid: [0; 6],
            target: "iqn.t".into(),
            tpgt: 2,
            relative_port: 7,
        }
    }

    #[test]
    fn test_standard_inquiry_layout() {
        let d = standard_inquiry(Some(&lun(true)), true);
        assert_eq!(d.len(), 96);
        assert_eq!(&d[0..8], &[0x00, 0x00, 0x06, 0x12, 91, 0x18, 0x10, 0x02]);
        assert_eq!(&d[8..16], b"CSVD    ");
        assert_eq!(&d[16..32], b"VIRTUAL-DISK    ");
        assert_eq!(&d[36..44], b"disk-one");
        assert_eq!(&d[58..60], &[0x00, 0xa0]);
        assert_eq!(&d[62..64], &[0x04, 0xc0]);
        assert_eq!(standard_inquiry(None, false)[0], 0x7f);
    }

    #[test]
    fn test_inquiry_evpd_pages_and_errors() {
        let lu = lun(true);
        let n = nexus();
        let sup = inquiry(&[0x12, 1, 0, 0, 255, 0], &lu, &n, false).unwrap();
        assert_eq!(
            sup,
            vec![0, 0, 0, 7, 0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]
        );
        for p in VPD_PAGES {
            let d = inquiry(&[0x12, 1, p, 0, 255, 0], &lu, &n, false).unwrap();
            assert_eq!(d[1], p);
            assert_eq!(usize::from(be16(&d, 2)) + 4, d.len());
        }
        let bl = inquiry(&[0x12, 1, 0xb0, 0, 255, 0], &lu, &n, false).unwrap();
        assert_eq!(bl[3], 0x3c);
        let e = inquiry(&[0x12, 1, 0x86, 0, 255, 0], &lu, &n, false).unwrap_err();
        assert_eq!(e, codes::INVALID_FIELD_IN_CDB.in_cdb(2, None));
        let e = inquiry(&[0x12, 0, 1, 1, 0, 0], &lu, &n, false).unwrap_err();
        assert_eq!(e.asc, 0x24);
        // Allocation length cuts.
        assert_eq!(
            inquiry(&[0x12, 0, 0, 0, 5, 0], &lu, &n, false)
                .unwrap()
                .len(),
            5
        );
        assert_eq!(
            inquiry(&[0x12, 0, 0, 2, 0, 0], &lu, &n, false)
                .unwrap()
                .len(),
            96
        );
    }

    #[test]
    fn test_inquiry_device_identification_designators() {
        let lu = lun(false);
        let d = inquiry(&[0x12, 1, 0x83, 1, 0, 0], &lu, &nexus(), false).unwrap();
        let mut at = 4;
        let mut seen = Vec::new();
        while at < d.len() {
            seen.push((d[at], d[at + 1]));
            at += 4 + usize::from(d[at + 3]);
        }
        assert_eq!(at, d.len());
        assert_eq!(
            seen,
            vec![
                (0x01, 0x03),
                (0x02, 0x01),
                (0x51, 0x94),
                (0x51, 0x95),
                (0x53, 0x98),
                (0x53, 0xa8)
            ]
        );
        // NAA 3h.
        assert_eq!(d[8] >> 4, 3);
        let text = String::from_utf8_lossy(&d);
        assert!(text.contains("iqn.t,t,0x0002"));
    }

    #[test]
    fn test_vpd_provisioning_thin_and_thick() {
        let n = nexus();
        // 4 KiB blocks: no LBPRZ (QEMU's block status on 4 KiB LUNs), 512: LBPRZ.
        let thin = inquiry(&[0x12, 1, 0xb2, 0, 255, 0], &lun(true), &n, false).unwrap();
        assert_eq!((thin[5], thin[6]), (0xe0, 0x02));
        let mut small = lun(true);
        small.block_size = 512;
        let thin = inquiry(&[0x12, 1, 0xb2, 0, 255, 0], &small, &n, false).unwrap();
        assert_eq!((thin[5], thin[6]), (0xe4, 0x02));
        let thick = inquiry(&[0x12, 1, 0xb2, 0, 255, 0], &lun(false), &n, false).unwrap();
        assert_eq!(thick[5], 0);
        let bl = inquiry(&[0x12, 1, 0xb0, 0, 255, 0], &lun(false), &n, false).unwrap();
        assert_eq!(be32(&bl, 20), 0);
        assert_eq!(be32(&bl, 24), 0);
        // Non-rotating; WABEREQ and WACEREQ 0 (no SANITIZE).
        let bdc = inquiry(&[0x12, 1, 0xb1, 0, 255, 0], &lun(true), &n, false).unwrap();
        assert_eq!((be16(&bdc, 4), bdc[7]), (1, 0));
        let bdc = inquiry(&[0x12, 1, 0xb1, 0, 255, 0], &lun(false), &n, false).unwrap();
        assert_eq!(bdc[7], 0);
    }

    #[test]
    fn test_vpd_block_limits_in_logical_blocks() {
        let n = nexus();
        let mut lu = lun(true);
        let bl = inquiry(&[0x12, 1, 0xb0, 0, 255, 0], &lu, &n, false).unwrap();
        // 4 KiB: 8 MiB, 1 MiB, granularity 1, unmap granularity 1, no atomic writes.
        assert_eq!(
            (be16(&bl, 6), be32(&bl, 8), be32(&bl, 12), be32(&bl, 28)),
            (1, 2048, 256, 1)
        );
        assert_eq!((be32(&bl, 44), be32(&bl, 48), be32(&bl, 52)), (0, 0, 0));
        assert_eq!(crate::scsi::cdb::be64(&bl, 36), 0xffff);
        lu.block_size = 512;
        let bl = inquiry(&[0x12, 1, 0xb0, 0, 255, 0], &lu, &n, false).unwrap();
        // 512: the same bytes in 512-byte blocks, physical granularity 8, no atomic writes.
        assert_eq!(
            (be16(&bl, 6), be32(&bl, 8), be32(&bl, 12), be32(&bl, 28)),
            (8, 16384, 2048, 8)
        );
        assert_eq!((be32(&bl, 20), bl[32]), (1 << 20, 0x80));
        assert_eq!((be32(&bl, 44), be32(&bl, 48), be32(&bl, 52)), (0, 0, 0));
        assert_eq!(crate::scsi::cdb::be64(&bl, 36), 0xffff);
        assert_eq!((be32(&bl, 56), be32(&bl, 60)), (0, 0));
        assert_eq!((bl.len(), be16(&bl, 2)), (64, 0x3c));
    }

    #[test]
    fn test_report_luns_select_and_truncation() {
        let d = report_luns(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[0, 3, 300]).unwrap();
        assert_eq!(be32(&d, 0), 24);
        assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&d[16..18], &[0, 3]);
        assert_eq!(&d[24..26], &[0x41, 44]);
        let d = report_luns(&[0xa0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[0, 3]).unwrap();
        assert_eq!(d.len(), 8);
        assert!(report_luns(&[0xa0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[0]).is_err());
        let d = report_luns(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0], &[0, 1]).unwrap();
        assert_eq!(d.len(), 12);
    }

    #[test]
    fn test_read_capacity_large_and_thin() {
        let mut lu = lun(true);
        lu.size_bytes = (1u64 << 32) * 4096 * 2;
        assert_eq!(read_capacity10(&lu)[0..4], [0xff; 4]);
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        let d = read_capacity16(&c, &lu);
        assert_eq!(d.len(), 32);
        assert_eq!(crate::scsi::cdb::be64(&d, 0), (1u64 << 33) - 1);
        assert_eq!(be32(&d, 8), 4096);
        assert_eq!((d[13], d[14]), (0, 0x80));
        lu.block_size = 512;
        let d = read_capacity16(&c, &lu);
        assert_eq!((be32(&d, 8), d[13], d[14]), (512, 3, 0xc0));
        c[13] = 0;
        assert!(read_capacity16(&c, &lu).is_empty());
    }

    #[test]
    fn test_report_opcodes_formats() {
        let mut c = [0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
        let all = report_opcodes(&c, true).unwrap();
        let n = (be32(&all, 0) as usize) / 8;
        assert_eq!(n, OPS.len());
        let thick = report_opcodes(&c, false).unwrap();
        let thin_only = OPS.iter().filter(|i| i.has(THIN_ONLY)).count();
        assert_eq!(thin_only, 1);
        assert_eq!((be32(&thick, 0) as usize) / 8, OPS.len() - thin_only);
        c[2] = 0x80;
        let all = report_opcodes(&c, true).unwrap();
        assert_eq!((be32(&all, 0) as usize) / 20, OPS.len());
        assert_eq!(all[4 + 5], 0x02);
        // One command by opcode.
        c[2] = 0x01;
        c[3] = 0x2a;
        let one = report_opcodes(&c, true).unwrap();
        assert_eq!(one[1], 0x03);
        assert_eq!(be16(&one, 2), 10);
        assert_eq!(one[4], 0x2a);
        assert_eq!(one[5] & 0x18, 0x18);
        // An opcode with service actions needs option 2.
        c[3] = 0x9e;
        assert!(report_opcodes(&c, true).is_err());
        c[2] = 0x02;
        c[5] = 0x10;
        let one = report_opcodes(&c, true).unwrap();
        assert_eq!(&one[4..6], &[0x9e, 0x10]);
        c[3] = 0x28;
        assert_eq!(
            report_opcodes(&c, true).unwrap_err().field,
            Some((true, 3, None))
        );
        // Unsupported opcode.
        c[2] = 0x01;
        c[3] = 0x7e;
        assert_eq!(report_opcodes(&c, true).unwrap()[1], 0x01);
        c[2] = 0x05;
        assert!(report_opcodes(&c, true).is_err());
        // UNMAP: on thin LUNs only.
        c[2] = 0x01;
        c[3] = 0x42;
        assert_eq!(report_opcodes(&c, true).unwrap()[1], 0x03);
        assert_eq!(report_opcodes(&c, false).unwrap()[1], 0x01);
        // ORWRITE takes DPO and FUA.
        c[3] = 0x8b;
        let one = report_opcodes(&c, true).unwrap();
        assert_eq!((one[1], one[5] & 0x18), (0x03, 0x18));
    }

    #[test]
    fn test_report_target_port_groups_layout() {
        let groups = vec![
            PortGroup {
                id: 2,
                state: AluaState::Unavailable,
                relative_ports: vec![2],
            },
            PortGroup {
                id: 1,
                state: AluaState::ActiveOptimized,
                relative_ports: vec![1, 5],
            },
        ];
        let c = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let d = report_target_port_groups(&c, &groups).unwrap();
        assert_eq!(be32(&d, 0) as usize, d.len() - 4);
        assert_eq!(&d[4..12], &[0x00, 0x8b, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&d[12..20], &[0, 0, 0, 1, 0, 0, 0, 5]);
        assert_eq!(&d[20..28], &[0x03, 0x8b, 0, 2, 0, 0, 0, 1]);
        let ext = [0xa3, 0x2a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let d = report_target_port_groups(&ext, &groups).unwrap();
        assert_eq!(d[4], 0x10);
        assert_eq!(be32(&d, 0) as usize, d.len() - 4);
        let short = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0];
        assert_eq!(report_target_port_groups(&short, &groups).unwrap().len(), 4);
        assert!(
            report_target_port_groups(&[0xa3, 0x4a, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], &groups)
                .is_err()
        );
    }

    #[test]
    fn test_request_sense_formats() {
        let s = codes::LBA_OUT_OF_RANGE;
        let fixed = request_sense(&[0x03, 0, 0, 0, 252, 0], &s);
        assert_eq!(fixed.len(), 18);
        assert_eq!((fixed[0], fixed[2], fixed[12]), (0x70, 0x05, 0x21));
        let desc = request_sense(&[0x03, 1, 0, 0, 252, 0], &s);
        assert_eq!(&desc[..4], &[0x72, 0x05, 0x21, 0x00]);
        assert_eq!(request_sense(&[0x03, 0, 0, 0, 4, 0], &s).len(), 4);
    }
}
