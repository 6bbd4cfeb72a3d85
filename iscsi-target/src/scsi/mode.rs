//! Mode parameters (SPC-4 7.5, SBC-3 6.4): MODE SENSE and MODE SELECT over the caching,
//! control and informational exceptions pages.
//!
//! One mode parameter is changeable: the control page's SOFTWARE WRITE PROTECT (SWP), which is
//! the LUN's cluster-wide write protection ([`LunInfo::write_protected`]); while it is set the
//! mode parameter header's WP bit is set too. [`mode_select`] only decodes the SWP value a
//! parameter list asks for; the SCSI layer stores it through the backend. Saving is not
//! supported (the setting is always kept, in the cluster metadata).
//!
//! Everything else is fixed. The caching page reports WCE = 1: writes complete once the
//! backend has them and SYNCHRONIZE CACHE (or FUA) makes them durable, and the target does not
//! offer a write-through mode. MODE SELECT accepts a parameter list that repeats the current
//! values of the other fields and rejects any change to them with INVALID FIELD IN PARAMETER
//! LIST, so a MODE SENSE / MODE SELECT round trip works and nothing is silently ignored.
//!
//! The block descriptor reports the LUN's logical block size (512 or 4096 bytes) and capacity
//! in those blocks; MODE SELECT accepts only that block length.

use super::cdb::{self, be16, be24, be32, be64};
use super::sense::{Sense, codes};
use crate::backend::LunInfo;

/// Page control: which values MODE SENSE returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// The supported pages, in the order MODE SENSE returns them.
const PAGES: [u8; 3] = [0x08, 0x0a, 0x1c];

/// The control page's code.
const CONTROL: u8 = 0x0a;
/// SOFTWARE WRITE PROTECT: byte 4, bit 3 of the control page.
const SWP_BYTE: usize = 4;
const SWP: u8 = 0x08;
/// The mode parameter header's WP bit, in its device-specific parameter.
const WP: u8 = 0x80;
/// DPOFUA, in the device-specific parameter: DPO and FUA are supported.
const DPOFUA: u8 = 0x10;

/// One page's default values (SWP clear).
fn default_page(code: u8) -> Option<&'static [u8]> {
    Some(match code {
        // Caching: WCE.
        0x08 => &[
            0x08, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        // Control: GLTSD; queue algorithm modifier 1 (unrestricted reordering); D_SENSE 0.
        CONTROL => &[0x0a, 0x0a, 0x02, 0x10, 0, 0, 0, 0, 0, 0, 0, 0],
        // Informational exceptions control: DEXCPT (no informational exceptions).
        0x1c => &[0x1c, 0x0a, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        _ => return None,
    })
}

/// One page's current values for `lu`: the defaults, with SWP from the LUN.
fn current_page(code: u8, lu: &LunInfo) -> Option<Vec<u8>> {
    let mut p = default_page(code)?.to_vec();
    if code == CONTROL && lu.write_protected {
        p[SWP_BYTE] |= SWP;
    }
    Some(p)
}

/// One page's changeable values: its page code and length, then a mask of the bits MODE
/// SELECT may change (SWP of the control page, nothing else).
fn changeable_page(code: u8) -> Option<Vec<u8>> {
    let p = default_page(code)?;
    let mut m = vec![0u8; p.len()];
    m[..2].copy_from_slice(&p[..2]);
    if code == CONTROL {
        m[SWP_BYTE] = SWP;
    }
    Some(m)
}

/// Appends one page as `pc` asks for it.
fn put_page(d: &mut Vec<u8>, code: u8, pc: Pc, lu: &LunInfo) {
    let p = match pc {
        Pc::Current => current_page(code, lu),
        Pc::Changeable => changeable_page(code),
        Pc::Default => default_page(code).map(<[u8]>::to_vec),
    };
    if let Some(p) = p {
        d.extend_from_slice(&p);
    }
}

/// MODE SENSE (6) or (10) parameter data for `lu`.
pub(crate) fn mode_sense(cdb: &[u8], ten: bool, lu: &LunInfo) -> Result<Vec<u8>, Sense> {
    let (blocks, block_size) = (lu.blocks(), lu.block_size);
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = match cdb[2] >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(codes::SAVING_NOT_SUPPORTED.in_cdb(2, Some(7))),
    };
    let code = cdb[2] & 0x3f;
    let sub = cdb[3];
    let pages: &[u8] = if code == 0x3f {
        if sub != 0x00 && sub != 0xff {
            return Err(cdb::invalid_byte(3));
        }
        &PAGES
    } else {
        let Some(i) = PAGES.iter().position(|&p| p == code) else {
            return Err(cdb::invalid_bit(2, 0x20));
        };
        if sub != 0x00 && sub != 0xff {
            return Err(cdb::invalid_byte(3));
        }
        &PAGES[i..=i]
    };
    let bd_len: usize = match (dbd, llbaa) {
        (true, _) => 0,
        (false, false) => 8,
        (false, true) => 16,
    };
    let hdr = if ten { 8 } else { 4 };
    let mut d = vec![0u8; hdr];
    // Device-specific parameter: WP while software write protected, and DPOFUA.
    let device_specific = DPOFUA | if lu.write_protected { WP } else { 0 };
    if ten {
        d[3] = device_specific;
        d[4] = u8::from(llbaa && !dbd); // LONGLBA
        d[6..8].copy_from_slice(&(bd_len as u16).to_be_bytes());
    } else {
        d[2] = device_specific;
        d[3] = bd_len as u8;
    }
    match bd_len {
        8 => {
            d.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            d.push(0);
            d.extend_from_slice(&block_size.to_be_bytes()[1..]);
        }
        16 => {
            d.extend_from_slice(&blocks.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&block_size.to_be_bytes());
        }
        _ => {}
    }
    for &p in pages {
        put_page(&mut d, p, pc, lu);
    }
    let alloc = if ten {
        let len = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&len.to_be_bytes());
        usize::from(be16(cdb, 7))
    } else {
        d[0] = (d.len() - 1) as u8;
        usize::from(cdb[4])
    };
    d.truncate(alloc);
    Ok(d)
}

/// INVALID FIELD IN PARAMETER LIST pointing at byte `at`.
fn bad_param(at: usize) -> Sense {
    codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(at as u16, None)
}

/// What a valid MODE SELECT parameter list sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Selected {
    /// SOFTWARE WRITE PROTECT as the list's (last) control page gives it; `None` without a
    /// control page.
    pub swp: Option<bool>,
}

/// Decodes MODE SELECT (6) or (10) with its parameter list for `lu`: checks every field and
/// returns what the list sets. Nothing is stored here; a list with any error sets nothing.
pub(crate) fn mode_select(
    cdb: &[u8],
    ten: bool,
    params: &[u8],
    lu: &LunInfo,
) -> Result<Selected, Sense> {
    let (blocks, block_size) = (lu.blocks(), lu.block_size);
    let mut selected = Selected::default();
    let pf = cdb[1] & 0x10 != 0;
    if cdb[1] & 0x01 != 0 {
        // SP: the pages cannot be saved.
        return Err(cdb::invalid_bit(1, 0x01));
    }
    let len = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if len == 0 {
        return Ok(selected);
    }
    let Some(p) = params.get(..len) else {
        return Err(codes::PARAMETER_LIST_LENGTH);
    };
    let hdr = if ten { 8 } else { 4 };
    if len < hdr {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    let (medium, bd_len, long) = if ten {
        (2, usize::from(be16(p, 6)), p[4] & 0x01 != 0)
    } else {
        (1, usize::from(p[3]), false)
    };
    if p[medium] != 0 {
        return Err(bad_param(medium));
    }
    if hdr + bd_len > len {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    let bd_at = if ten { 6 } else { 3 };
    match (bd_len, long) {
        (0, _) => {}
        (8, false) => {
            let n = u64::from(be32(p, hdr));
            if n != 0 && n != blocks.min(u64::from(u32::MAX)) {
                return Err(bad_param(hdr));
            }
            if be24(p, hdr + 5) != block_size {
                return Err(bad_param(hdr + 5));
            }
        }
        (16, true) => {
            let n = be64(p, hdr);
            if n != 0 && n != blocks {
                return Err(bad_param(hdr));
            }
            if be32(p, hdr + 12) != block_size {
                return Err(bad_param(hdr + 12));
            }
        }
        _ => return Err(bad_param(bd_at)),
    }
    let mut at = hdr + bd_len;
    if at < len && !pf {
        // Only the page format is understood.
        return Err(cdb::invalid_bit(1, 0x10));
    }
    while at < len {
        if p[at] & 0x40 != 0 {
            // Subpage format: no supported page has subpages.
            return Err(bad_param(at));
        }
        let code = p[at] & 0x3f;
        let (Some(cur), Some(changeable)) = (current_page(code, lu), changeable_page(code)) else {
            return Err(bad_param(at));
        };
        let Some(&plen) = p.get(at + 1) else {
            return Err(codes::PARAMETER_LIST_LENGTH);
        };
        let plen = usize::from(plen);
        if plen + 2 != cur.len() {
            return Err(bad_param(at + 1));
        }
        let Some(given) = p.get(at..at + 2 + plen) else {
            return Err(codes::PARAMETER_LIST_LENGTH);
        };
        // Every bit that is not changeable must repeat the current value.
        if let Some(i) = (2..cur.len()).find(|&i| (given[i] ^ cur[i]) & !changeable[i] != 0) {
            return Err(bad_param(at + i));
        }
        if code == CONTROL {
            selected.swp = Some(given[SWP_BYTE] & SWP != 0);
        }
        at += 2 + plen;
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writable LUN of `blocks` logical blocks of `block_size` bytes.
    fn lun(blocks: u64, block_size: u32) -> LunInfo {
        LunInfo {
            lun: 0,
            uuid: [1; 16],
            name: "d".into(),
            size_bytes: blocks * u64::from(block_size),
            block_size,
            thin: false,
            write_protected: false,
            write_fence: None,
        }
    }

    #[test]
    fn test_mode_sense6_all_pages_layout() {
        let d = mode_sense(&[0x1a, 0, 0x3f, 0, 255, 0], false, &lun(1000, 4096)).unwrap();
        assert_eq!(usize::from(d[0]) + 1, d.len());
        assert_eq!(d[2], 0x10);
        assert_eq!(d[3], 8);
        assert_eq!(be32(&d, 4), 1000);
        assert_eq!(be24(&d, 9), 4096);
        assert_eq!(d[12], 0x08);
        assert_eq!(d[14] & 0x04, 0x04);
        assert_eq!(d[32], 0x0a);
        assert_eq!(d[44], 0x1c);
        assert_eq!(d.len(), 12 + 20 + 12 + 12);
    }

    #[test]
    fn test_mode_sense_dbd_llbaa_and_truncation() {
        let d = mode_sense(&[0x1a, 0x08, 0x08, 0, 255, 0], false, &lun(1000, 4096)).unwrap();
        assert_eq!(d[3], 0);
        assert_eq!(d[4], 0x08);
        let d = mode_sense(
            &[0x5a, 0x10, 0x0a, 0, 0, 0, 0, 1, 0, 0],
            true,
            &lun(1 << 40, 4096),
        )
        .unwrap();
        assert_eq!(be16(&d, 0) as usize + 2, d.len());
        assert_eq!(d[4], 1);
        assert_eq!(be16(&d, 6), 16);
        assert_eq!(be64(&d, 8), 1 << 40);
        assert_eq!(be32(&d, 20), 4096);
        assert_eq!(d[24], 0x0a);
        let d = mode_sense(&[0x1a, 0, 0x3f, 0, 4, 0], false, &lun(1000, 4096)).unwrap();
        assert_eq!(d.len(), 4);
        // Short descriptor on a LUN too big for 32 bits.
        let d = mode_sense(&[0x1a, 0, 0x08, 0, 255, 0], false, &lun(1 << 40, 4096)).unwrap();
        assert_eq!(be32(&d, 4), u32::MAX);
    }

    #[test]
    fn test_mode_sense_page_control_and_errors() {
        let d = mode_sense(&[0x1a, 0x08, 0x48, 0, 255, 0], false, &lun(10, 4096)).unwrap();
        assert_eq!(&d[4..6], &[0x08, 0x12]);
        assert!(d[6..].iter().all(|&b| b == 0));
        let d = mode_sense(&[0x1a, 0x08, 0x88, 0, 255, 0], false, &lun(10, 4096)).unwrap();
        assert_eq!(d[6], 0x04);
        let e = mode_sense(&[0x1a, 0x08, 0xc8, 0, 255, 0], false, &lun(10, 4096)).unwrap_err();
        assert_eq!((e.asc, e.ascq), (0x39, 0));
        let e = mode_sense(&[0x1a, 0x08, 0x19, 0, 255, 0], false, &lun(10, 4096)).unwrap_err();
        assert_eq!(e, codes::INVALID_FIELD_IN_CDB.in_cdb(2, Some(5)));
        assert!(mode_sense(&[0x1a, 0x08, 0x08, 1, 255, 0], false, &lun(10, 4096)).is_err());
        assert!(mode_sense(&[0x1a, 0x08, 0x3f, 0xff, 255, 0], false, &lun(10, 4096)).is_ok());
    }

    #[test]
    fn test_mode_select_round_trip_accepted_change_rejected() {
        let sense = mode_sense(&[0x1a, 0, 0x08, 0, 255, 0], false, &lun(1000, 4096)).unwrap();
        let mut params = sense.clone();
        params[0] = 0;
        params[2] = 0;
        let cdb = [0x15, 0x10, 0, 0, params.len() as u8, 0];
        assert!(mode_select(&cdb, false, &params, &lun(1000, 4096)).is_ok());
        // Clearing WCE is a change.
        params[14] = 0;
        let e = mode_select(&cdb, false, &params, &lun(1000, 4096)).unwrap_err();
        assert_eq!(
            e,
            codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(14, None)
        );
        params[14] = 0x04;
        // Wrong block length.
        params[10] = 0x02;
        assert_eq!(
            mode_select(&cdb, false, &params, &lun(1000, 4096))
                .unwrap_err()
                .field,
            Some((false, 9, None))
        );
        params[10] = 0x10;
        assert!(mode_select(&cdb, false, &params, &lun(1000, 4096)).is_ok());
        // Number of blocks: zero or the capacity.
        params[7] = 0;
        assert!(mode_select(&cdb, false, &params, &lun(1000, 4096)).is_err());
        params[4..8].copy_from_slice(&[0; 4]);
        assert!(mode_select(&cdb, false, &params, &lun(1000, 4096)).is_ok());
        // Saving is not supported; a list shorter than its header is a length error.
        assert!(
            mode_select(
                &[0x15, 0x11, 0, 0, params.len() as u8, 0],
                false,
                &params,
                &lun(1000, 4096)
            )
            .is_err()
        );
        let e =
            mode_select(&[0x15, 0x10, 0, 0, 2, 0], false, &params, &lun(1000, 4096)).unwrap_err();
        assert_eq!(e, codes::PARAMETER_LIST_LENGTH);
        assert!(mode_select(&[0x15, 0x10, 0, 0, 0, 0], false, &[], &lun(1000, 4096)).is_ok());
        assert_eq!(
            mode_select(&cdb, false, &params[..8], &lun(1000, 4096)).unwrap_err(),
            codes::PARAMETER_LIST_LENGTH
        );
    }

    #[test]
    fn test_mode_select10_control_page() {
        let sense = mode_sense(
            &[0x5a, 0x08, 0x0a, 0, 0, 0, 0, 0, 255, 0],
            true,
            &lun(10, 4096),
        )
        .unwrap();
        let mut params = sense.clone();
        params[0] = 0;
        params[1] = 0;
        params[3] = 0;
        let cdb = [0x55, 0x10, 0, 0, 0, 0, 0, 0, params.len() as u8, 0];
        let writable = lun(10, 4096);
        assert_eq!(
            mode_select(&cdb, true, &params, &writable),
            Ok(Selected { swp: Some(false) })
        );
        params[12] |= 0x08; // SWP
        assert_eq!(
            mode_select(&cdb, true, &params, &writable),
            Ok(Selected { swp: Some(true) })
        );
        // Any other bit of the byte is not changeable.
        params[12] |= 0x40; // RAC
        assert_eq!(
            mode_select(&cdb, true, &params, &writable).unwrap_err(),
            codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(12, None)
        );
        params[12] = 0;
        params[9] = 0x0b; // page length
        assert_eq!(
            mode_select(&cdb, true, &params, &lun(10, 4096))
                .unwrap_err()
                .field,
            Some((false, 9, None))
        );
    }

    #[test]
    fn test_mode_sense_swp_current_changeable_and_wp() {
        let mut lu = lun(10, 4096);
        let control = |lu: &LunInfo, pc: u8| {
            mode_sense(&[0x1a, 0x08, pc | 0x0a, 0, 255, 0], false, lu).unwrap()
        };
        // Writable: SWP and WP clear; only SWP is changeable.
        let d = control(&lu, 0x00);
        assert_eq!((d[2], d[4 + SWP_BYTE] & SWP), (DPOFUA, 0));
        let ch = control(&lu, 0x40);
        assert_eq!(&ch[4..6], &[0x0a, 0x0a]);
        assert_eq!(ch[4 + SWP_BYTE], SWP);
        assert_eq!(ch[6..].iter().map(|b| b.count_ones()).sum::<u32>(), 1);
        lu.write_protected = true;
        let d = control(&lu, 0x00);
        assert_eq!((d[2], d[4 + SWP_BYTE] & SWP), (WP | DPOFUA, SWP));
        // The default value stays clear; MODE SENSE (10) shows WP too.
        assert_eq!(control(&lu, 0x80)[4 + SWP_BYTE] & SWP, 0);
        let d = mode_sense(&[0x5a, 0x08, 0x3f, 0, 0, 0, 0, 0, 255, 0], true, &lu).unwrap();
        assert_eq!(d[3], WP | DPOFUA);
        // Repeating the protected page is accepted; clearing SWP is asked for.
        let mut params = control(&lu, 0x00);
        params[0] = 0;
        params[2] = 0;
        let cdb = [0x15, 0x10, 0, 0, params.len() as u8, 0];
        assert_eq!(
            mode_select(&cdb, false, &params, &lu),
            Ok(Selected { swp: Some(true) })
        );
        params[4 + SWP_BYTE] &= !SWP;
        assert_eq!(
            mode_select(&cdb, false, &params, &lu),
            Ok(Selected { swp: Some(false) })
        );
        // A list without a control page sets nothing.
        let caching = mode_sense(&[0x1a, 0x08, 0x08, 0, 255, 0], false, &lu).unwrap();
        let mut params = caching.clone();
        params[0] = 0;
        params[2] = 0;
        let cdb = [0x15, 0x10, 0, 0, params.len() as u8, 0];
        assert_eq!(
            mode_select(&cdb, false, &params, &lu),
            Ok(Selected::default())
        );
    }

    #[test]
    fn test_mode_sense_select_512_byte_blocks() {
        let d = mode_sense(&[0x1a, 0, 0x08, 0, 255, 0], false, &lun(8000, 512)).unwrap();
        assert_eq!((be32(&d, 4), be24(&d, 9)), (8000, 512));
        let mut params = d.clone();
        params[0] = 0;
        params[2] = 0;
        let cdb = [0x15, 0x10, 0, 0, params.len() as u8, 0];
        assert!(mode_select(&cdb, false, &params, &lun(8000, 512)).is_ok());
        // The physical block size is not the logical one.
        assert!(mode_select(&cdb, false, &params, &lun(8000, 4096)).is_err());
    }
}
