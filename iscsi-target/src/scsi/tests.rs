//! Command-level tests: [`Scsi::execute`] over a [`MemBackend`].

use std::sync::Arc;

use proptest::prelude::*;

use super::cdb::{OPS, be16, be32, be64};
use super::sense::{Sense, codes, key};
use super::*;
use crate::backend::{AluaState, Backend, BackendError, LunInfo, Nexus, PortGroup, WriteFence};
use crate::mem::{Faults, MemBackend};

const T: &str = "iqn.2024-01.test:target";
const BS: usize = 4096;

fn nexus(initiator: &str, isid: u8) -> Nexus {
    Nexus {
        initiator: initiator.into(),
        isid: [isid; 6],
        target: T.into(),
        tpgt: 1,
        relative_port: 1,
    }
}

fn lun_info(lun: u64, blocks: u64, thin: bool) -> LunInfo {
    lun_info_bs(lun, blocks, thin, BS)
}

/// LUN `lun` with `blocks` logical blocks of `bs` bytes.
fn lun_info_bs(lun: u64, blocks: u64, thin: bool, bs: usize) -> LunInfo {
    LunInfo {
        block_size: bs as u32,
        lun,
        uuid: [lun as u8 + 1; 16],
        name: format!("disk{lun}"),
        size_bytes: blocks * bs as u64,
        thin,
        write_protected: false,
        write_fence: None,
    }
}

struct Fixture {
    scsi: Scsi<MemBackend>,
    mem: Arc<MemBackend>,
    n: Nexus,
}

impl Fixture {
    fn new(thin: bool, blocks: u64) -> Fixture {
        Fixture::with_block_size(thin, blocks, BS)
    }

    /// A fixture whose LUN 0 has `blocks` logical blocks of `bs` bytes.
    fn with_block_size(thin: bool, blocks: u64, bs: usize) -> Fixture {
        let mem = Arc::new(MemBackend::new());
        mem.add_lun(T, lun_info_bs(0, blocks, thin, bs));
        Fixture {
            scsi: Scsi::new(mem.clone()),
            mem,
            n: nexus("iqn.i1", 1),
        }
    }

    async fn run_on(
        &self,
        n: &Nexus,
        lun: u64,
        cdb: &[u8],
        data: Option<Vec<u8>>,
    ) -> Response<Vec<u8>> {
        let expected_length = data.as_ref().map_or(0, |d| d.len() as u32);
        self.scsi
            .execute(Command {
                nexus: n,
                lun,
                cdb,
                data_out: data,
                expected_length,
            })
            .await
    }

    async fn run(&self, cdb: &[u8], data: Option<Vec<u8>>) -> Response<Vec<u8>> {
        self.run_on(&self.n, 0, cdb, data).await
    }

    /// A fixture whose nexus has seen its power-on unit attention on LUN 0.
    async fn ready(thin: bool, blocks: u64) -> Fixture {
        Fixture::ready_bs(thin, blocks, BS).await
    }

    /// As [`Fixture::ready`] with `bs`-byte logical blocks.
    async fn ready_bs(thin: bool, blocks: u64, bs: usize) -> Fixture {
        let f = Fixture::with_block_size(thin, blocks, bs);
        let r = f.run(&[0, 0, 0, 0, 0, 0], None).await;
        assert_eq!(r.sense, Some(codes::RESET_OCCURRED));
        good(&f.run(&[0, 0, 0, 0, 0, 0], None).await);
        f
    }

    fn lun(&self) -> LunInfo {
        self.mem.luns(T).remove(0)
    }
}

fn good(r: &Response<Vec<u8>>) -> Vec<u8> {
    assert_eq!(r.status, status::GOOD, "sense {:?}", r.sense);
    match &r.data {
        DataIn::None => Vec::new(),
        DataIn::Owned(d) | DataIn::Buf(d) => d.clone(),
    }
}

fn check(r: &Response<Vec<u8>>) -> Sense {
    assert_eq!(r.status, status::CHECK_CONDITION);
    r.sense.expect("CHECK CONDITION carries sense")
}

fn asc(r: &Response<Vec<u8>>) -> (u8, u8, u8) {
    let s = check(r);
    (s.key, s.asc, s.ascq)
}

fn cdb10(op: u8, flags: u8, lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn cdb12(op: u8, flags: u8, lba: u32, n: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&n.to_be_bytes());
    c
}

fn cdb16(op: u8, flags: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn caw(lba: u64, n: u8, flags: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = n;
    c
}

const ILLEGAL: u8 = key::ILLEGAL_REQUEST;

#[tokio::test]
async fn test_execute_power_on_reported_once() {
    let f = Fixture::new(false, 100);
    // INQUIRY does not report it, TEST UNIT READY does, once.
    good(&f.run(&[0x12, 0, 0, 0, 96, 0], None).await);
    assert_eq!(
        asc(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        (key::UNIT_ATTENTION, 0x29, 0x00)
    );
    good(&f.run(&[0, 0, 0, 0, 0, 0], None).await);
    // Another nexus of the same initiator has its own.
    let other = nexus("iqn.i1", 2);
    assert_eq!(
        check(
            &f.run_on(&other, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None)
                .await
        ),
        codes::RESET_OCCURRED
    );
}

#[tokio::test]
async fn test_execute_request_sense_returns_and_clears_ua() {
    let f = Fixture::new(false, 100);
    let d = good(&f.run(&[0x03, 0, 0, 0, 252, 0], None).await);
    assert_eq!((d[2], d[12], d[13]), (key::UNIT_ATTENTION, 0x29, 0x00));
    let d = good(&f.run(&[0x03, 0, 0, 0, 252, 0], None).await);
    assert_eq!((d[2], d[12], d[13]), (0, 0, 0));
    // Descriptor format on request.
    let d = good(&f.run(&[0x03, 1, 0, 0, 252, 0], None).await);
    assert_eq!(d[0], 0x72);
}

#[tokio::test]
async fn test_execute_unknown_lun() {
    let f = Fixture::ready(false, 100).await;
    let r = f.run_on(&f.n, 3, &[0, 0, 0, 0, 0, 0], None).await;
    assert_eq!(check(&r), codes::LUN_NOT_SUPPORTED);
    let d = good(&f.run_on(&f.n, 3, &[0x12, 0, 0, 0, 36, 0], None).await);
    assert_eq!((d[0], d.len()), (0x7f, 36));
    assert_eq!(
        check(&f.run_on(&f.n, 3, &[0x12, 1, 0x80, 0, 36, 0], None).await),
        codes::LUN_NOT_SUPPORTED
    );
    let d = good(&f.run_on(&f.n, 3, &[0x03, 0, 0, 0, 18, 0], None).await);
    assert_eq!((d[2], d[12]), (ILLEGAL, 0x25));
    // REPORT LUNS answers on any LUN number.
    let d = good(
        &f.run_on(&f.n, 3, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    assert_eq!(be32(&d, 0), 8);
}

#[tokio::test]
async fn test_execute_report_luns_with_acl() {
    let f = Fixture::ready(false, 100).await;
    f.mem.add_lun(T, lun_info(1, 10, false));
    f.mem.add_lun(T, lun_info(2, 10, false));
    f.mem.set_acl(T, 1, Some(vec!["iqn.someone-else".into()]));
    let d = good(&f.run(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None).await);
    assert_eq!(be32(&d, 0), 16);
    assert_eq!(d[9], 0);
    assert_eq!(d[17], 2);
    assert_eq!(
        check(&f.run_on(&f.n, 1, &[0, 0, 0, 0, 0, 0], None).await),
        codes::LUN_NOT_SUPPORTED
    );
    // Allocation length below the header still answers, cut.
    assert_eq!(
        good(&f.run(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], None).await).len(),
        4
    );
    assert_eq!(
        asc(&f
            .run(&[0xa0, 0, 0x10, 0, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await),
        (ILLEGAL, 0x24, 0)
    );
}

#[tokio::test]
async fn test_execute_luns_changed_ua_cleared_by_report_luns() {
    let f = Fixture::ready(false, 100).await;
    f.mem.add_lun(T, lun_info(1, 10, false));
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::LUNS_CHANGED
    );
    good(&f.run(&[0, 0, 0, 0, 0, 0], None).await);
    f.mem.remove_lun(T, 1);
    // INQUIRY neither reports nor clears it; REPORT LUNS clears it.
    good(&f.run(&[0x12, 0, 0, 0, 36, 0], None).await);
    good(&f.run(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None).await);
    good(&f.run(&[0, 0, 0, 0, 0, 0], None).await);
}

/// capacity changed ua on a LUN with `bs`-byte logical blocks.
async fn capacity_changed_ua(bs: usize) {
    let f = Fixture::ready_bs(false, 100, bs).await;
    f.mem.resize_lun(T, 0, 200 * bs as u64);
    assert_eq!(
        check(&f.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None).await),
        codes::CAPACITY_CHANGED
    );
    let d = good(&f.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None).await);
    assert_eq!(be32(&d, 0), 199);
    assert_eq!(be32(&d, 4), bs as u32);
}

#[tokio::test]
async fn test_execute_capacity_changed_ua() {
    capacity_changed_ua(BS).await;
}

#[tokio::test]
async fn test_execute_capacity_changed_ua_512() {
    capacity_changed_ua(512).await;
}

#[tokio::test]
async fn test_execute_read_capacity16() {
    // 4 KiB blocks: one logical block per physical block; LBPRZ is not reported (QEMU).
    let f = Fixture::ready(true, 100).await;
    let d = good(&f.run(&cdb16(0x9e, 0x10, 0, 32), None).await);
    assert_eq!(
        (be64(&d, 0), be32(&d, 8), d[13], d[14]),
        (99, 4096, 0, 0x80)
    );
    assert!(good(&f.run(&cdb16(0x9e, 0x10, 0, 0), None).await).is_empty());
    assert_eq!(
        good(&f.run(&cdb16(0x9e, 0x10, 0, 12), None).await).len(),
        12
    );
    let d = good(&f.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None).await);
    assert_eq!((be32(&d, 0), be32(&d, 4)), (99, 4096));
}

#[tokio::test]
async fn test_execute_read_capacity16_512() {
    // 512-byte blocks: eight per 4 KiB physical block, LBPRZ on a thin LUN.
    let f = Fixture::ready_bs(true, 800, 512).await;
    let d = good(&f.run(&cdb16(0x9e, 0x10, 0, 32), None).await);
    assert_eq!(
        (be64(&d, 0), be32(&d, 8), d[13], d[14]),
        (799, 512, 3, 0xc0)
    );
    let d = good(&f.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None).await);
    assert_eq!((be32(&d, 0), be32(&d, 4)), (799, 512));
    // A fully provisioned LUN: neither LBPME nor LBPRZ.
    let f = Fixture::ready_bs(false, 800, 512).await;
    let d = good(&f.run(&cdb16(0x9e, 0x10, 0, 32), None).await);
    assert_eq!((d[13], d[14]), (3, 0));
}

/// write read round trip on a LUN with `bs`-byte logical blocks.
async fn write_read_round_trip(bs: usize) {
    let f = Fixture::ready_bs(false, 300, bs).await;
    let data: Vec<u8> = (0..2 * bs).map(|i| (i % 251) as u8).collect();
    good(&f.run(&cdb10(0x2a, 0, 5, 2), Some(data.clone())).await);
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 5, 2), None).await), data);
    assert_eq!(good(&f.run(&cdb12(0xa8, 0, 5, 2), None).await), data);
    assert_eq!(good(&f.run(&cdb16(0x88, 0x18, 5, 2), None).await), data);
    // READ (6) of zero blocks reads 256.
    assert_eq!(
        good(&f.run(&[0x08, 0, 0, 0, 0, 0], None).await).len(),
        256 * bs
    );
    // WRITE (6), then WRITE (16) with FUA.
    good(&f.run(&[0x0a, 0, 0, 9, 1, 0], Some(vec![7; bs])).await);
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 9, 1), None).await), vec![7; bs]);
    good(&f.run(&cdb16(0x8a, 0x08, 10, 1), Some(vec![8; bs])).await);
    assert_eq!(f.mem.flushes().1, 1);
}

#[tokio::test]
async fn test_execute_write_read_round_trip() {
    write_read_round_trip(BS).await;
}

#[tokio::test]
async fn test_execute_write_read_round_trip_512() {
    write_read_round_trip(512).await;
}

/// block range errors on a LUN with `bs`-byte logical blocks.
async fn block_range_errors(bs: usize) {
    let f = Fixture::ready_bs(false, 100, bs).await;
    let oob = (ILLEGAL, 0x21, 0x00);
    assert_eq!(asc(&f.run(&cdb10(0x28, 0, 99, 2), None).await), oob);
    assert_eq!(asc(&f.run(&cdb10(0x28, 0, u32::MAX, 1), None).await), oob);
    assert_eq!(asc(&f.run(&cdb16(0x88, 0, u64::MAX, 0), None).await), oob);
    assert_eq!(asc(&f.run(&cdb16(0x8a, 0, 101, 0), None).await), oob);
    assert_eq!(
        asc(&f.run(&cdb10(0x2a, 0, 100, 1), Some(vec![0; bs])).await),
        oob
    );
    assert_eq!(
        asc(&f.run(&[0x08, 0x1f, 0xff, 0xff, 1, 0], None).await),
        oob
    );
    // Zero-length transfers in range are GOOD.
    good(&f.run(&cdb10(0x28, 0, 0, 0), None).await);
    good(&f.run(&cdb10(0x2a, 0, 100, 0), None).await);
    good(&f.run(&cdb16(0x8e, 0, 0, 0), None).await);
    // Beyond the maximum transfer length.
    let s = check(
        &f.run(
            &cdb10(
                0x28,
                0,
                0,
                limits::max_transfer_blocks(bs as u32) as u16 + 1,
            ),
            None,
        )
        .await,
    );
    assert_eq!(s, codes::INVALID_FIELD_IN_CDB.in_cdb(7, None));
    // RDPROTECT / WRPROTECT: no protection information.
    for p in 1..8u8 {
        let s = check(&f.run(&cdb10(0x28, p << 5, 0, 1), None).await);
        assert_eq!((s.asc, s.field.map(|f| f.1)), (0x24, Some(1)));
        let s = check(&f.run(&cdb16(0x8a, p << 5, 0, 1), Some(vec![0; bs])).await);
        assert_eq!(s.asc, 0x24);
    }
}

#[tokio::test]
async fn test_execute_block_range_errors() {
    block_range_errors(BS).await;
}

#[tokio::test]
async fn test_execute_block_range_errors_512() {
    block_range_errors(512).await;
}

/// write data out shorter or longer on a LUN with `bs`-byte logical blocks.
async fn write_data_out_shorter_or_longer(bs: usize) {
    let f = Fixture::ready_bs(false, 100, bs).await;
    good(&f.run(&cdb10(0x2a, 0, 0, 2), Some(vec![b'a'; 2 * bs])).await);
    // One block of Data-Out for two: the first block is written.
    good(&f.run(&cdb10(0x2a, 0, 0, 2), Some(vec![b'b'; bs])).await);
    let d = good(&f.run(&cdb10(0x28, 0, 0, 2), None).await);
    assert!(d[..bs].iter().all(|&x| x == b'b') && d[bs..].iter().all(|&x| x == b'a'));
    // A partial block is refused and nothing is written.
    assert_eq!(
        check(&f.run(&cdb10(0x2a, 0, 0, 1), Some(vec![b'c'; 200])).await),
        codes::INVALID_FIELD_IN_IU
    );
    // No Data-Out at all writes nothing.
    good(&f.run(&cdb10(0x2a, 0, 0, 1), None).await);
    // More Data-Out than needed: only the transfer length is written.
    good(
        &f.run(&cdb10(0x2a, 0, 0, 1), Some(vec![b'd'; 2 * bs + 500]))
            .await,
    );
    let d = good(&f.run(&cdb10(0x28, 0, 0, 2), None).await);
    assert!(d[..bs].iter().all(|&x| x == b'd') && d[bs..].iter().all(|&x| x == b'a'));
}

#[tokio::test]
async fn test_execute_write_data_out_shorter_or_longer() {
    write_data_out_shorter_or_longer(BS).await;
}

#[tokio::test]
async fn test_execute_write_data_out_shorter_or_longer_512() {
    write_data_out_shorter_or_longer(512).await;
}

/// verify and write verify on a LUN with `bs`-byte logical blocks.
async fn verify_and_write_verify(bs: usize) {
    let f = Fixture::ready_bs(false, 100, bs).await;
    let data: Vec<u8> = (0..3 * bs).map(|i| (i % 13) as u8).collect();
    good(&f.run(&cdb10(0x2e, 0x02, 4, 3), Some(data.clone())).await);
    assert_eq!(f.mem.flushes().1, 1);
    good(&f.run(&cdb10(0x2f, 0x02, 4, 3), Some(data.clone())).await);
    good(&f.run(&cdb12(0xaf, 0x12, 4, 3), Some(data.clone())).await);
    let mut bad = data.clone();
    let at = bs + bs / 4;
    bad[at] ^= 0xff;
    let s = check(&f.run(&cdb16(0x8f, 0x02, 4, 3), Some(bad.clone())).await);
    assert_eq!(
        (s.key, s.asc, s.information),
        (key::MISCOMPARE, 0x1d, Some(at as u64))
    );
    // BYTCHK 0 does not compare.
    good(&f.run(&cdb10(0x2f, 0, 4, 3), Some(bad)).await);
    // BYTCHK 3: one block against each.
    good(&f.run(&cdb10(0x2a, 0, 20, 2), Some(vec![9; 2 * bs])).await);
    good(&f.run(&cdb10(0x2f, 0x06, 20, 2), Some(vec![9; bs])).await);
    let s = check(&f.run(&cdb10(0x2f, 0x06, 19, 2), Some(vec![9; bs])).await);
    assert_eq!(s.information, Some(0));
    // BYTCHK 2 is reserved; VRPROTECT is not supported.
    assert_eq!(
        check(&f.run(&cdb10(0x2f, 0x04, 0, 1), None).await).asc,
        0x24
    );
    assert_eq!(
        check(&f.run(&cdb10(0x2f, 0x22, 0, 1), Some(vec![0; bs])).await).asc,
        0x24
    );
    assert_eq!(
        asc(&f
            .run(&cdb10(0x2f, 0x02, 99, 2), Some(vec![0; 2 * bs]))
            .await),
        (ILLEGAL, 0x21, 0)
    );
}

#[tokio::test]
async fn test_execute_verify_and_write_verify() {
    verify_and_write_verify(BS).await;
}

#[tokio::test]
async fn test_execute_verify_and_write_verify_512() {
    verify_and_write_verify(512).await;
}

/// write same replicates and unmaps on a LUN with `bs`-byte logical blocks.
async fn write_same_replicates_and_unmaps(bs: usize) {
    let f = Fixture::ready_bs(true, 600, bs).await;
    let lu = f.lun();
    good(&f.run(&cdb10(0x41, 0, 10, 3), Some(vec![0x5a; bs])).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 10, 3), None).await),
        vec![0x5a; 3 * bs]
    );
    assert!(f.mem.is_mapped(&lu.uuid, 12));
    // UNMAP deallocates on a thin LUN, whatever the block holds.
    good(&f.run(&cdb10(0x41, 0x08, 10, 3), Some(vec![0xff; bs])).await);
    assert!(!f.mem.is_mapped(&lu.uuid, 11));
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 10, 3), None).await),
        vec![0; 3 * bs]
    );
    // More than 256 blocks of a pattern (several buffers), with WRITE SAME (16).
    good(&f.run(&cdb16(0x93, 0, 100, 300), Some(vec![1; bs])).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 399, 1), None).await),
        vec![1; bs]
    );
    // Zero blocks: to the end of the LUN.
    good(&f.run(&cdb16(0x93, 0, 590, 0), Some(vec![3; bs])).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 599, 1), None).await),
        vec![3; bs]
    );
    // NDOB writes zeroes without Data-Out.
    good(&f.run(&cdb16(0x93, 0x01, 590, 10), None).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 599, 1), None).await),
        vec![0; bs]
    );
    // Errors.
    assert_eq!(
        asc(&f.run(&cdb10(0x41, 0, 599, 2), Some(vec![0; bs])).await),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        asc(&f.run(&cdb10(0x41, 0, 601, 0), Some(vec![0; bs])).await),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        check(&f.run(&cdb10(0x41, 0x10, 0, 1), Some(vec![0; bs])).await).asc,
        0x24
    );
    assert_eq!(
        check(&f.run(&cdb10(0x41, 0x18, 0, 1), Some(vec![0; bs])).await).asc,
        0x24
    );
    assert_eq!(
        check(&f.run(&cdb10(0x41, 0x20, 0, 1), Some(vec![0; bs])).await).asc,
        0x24
    );
    assert_eq!(
        check(&f.run(&cdb10(0x41, 0, 0, 1), Some(vec![0; bs / 2])).await).key,
        ILLEGAL
    );
    assert_eq!(
        check(&f.run(&cdb10(0x41, 0, 0, 1), Some(vec![0; 2 * bs])).await).key,
        ILLEGAL
    );
}

#[tokio::test]
async fn test_execute_write_same_replicates_and_unmaps() {
    write_same_replicates_and_unmaps(BS).await;
}

#[tokio::test]
async fn test_execute_write_same_replicates_and_unmaps_512() {
    write_same_replicates_and_unmaps(512).await;
}

/// write same length limit on a LUN with `bs`-byte logical blocks.
async fn write_same_length_limit(bs: usize) {
    let blocks = limits::MAX_WRITE_SAME_BLOCKS + 10;
    let f = Fixture::ready_bs(true, blocks, bs).await;
    // Zero blocks from LBA 0 would exceed the maximum; from 10 it is exactly the maximum.
    assert_eq!(
        check(&f.run(&cdb16(0x93, 0x08, 0, 0), Some(vec![0; bs])).await),
        codes::INVALID_FIELD_IN_CDB.in_cdb(10, None)
    );
    good(&f.run(&cdb16(0x93, 0x08, 10, 0), Some(vec![0; bs])).await);
    let over = limits::MAX_WRITE_SAME_BLOCKS as u32 + 1;
    assert_eq!(
        check(&f.run(&cdb16(0x93, 0x08, 0, over), Some(vec![0; bs])).await).asc,
        0x24
    );
}

#[tokio::test]
async fn test_execute_write_same_length_limit() {
    write_same_length_limit(BS).await;
}

#[tokio::test]
async fn test_execute_write_same_length_limit_512() {
    write_same_length_limit(512).await;
}

/// unmap validation on a LUN with `bs`-byte logical blocks.
async fn unmap_validation(bs: usize) {
    let f = Fixture::ready_bs(true, 100, bs).await;
    let lu = f.lun();
    good(&f.run(&cdb10(0x2a, 0, 0, 8), Some(vec![1; 8 * bs])).await);
    let list = |descs: &[(u64, u32)]| {
        let mut p = vec![0u8; 8];
        for &(lba, n) in descs {
            p.extend_from_slice(&lba.to_be_bytes());
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&[0; 4]);
        }
        let len = p.len();
        p[0..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
        p[2..4].copy_from_slice(&((len - 8) as u16).to_be_bytes());
        p
    };
    let unmap = |len: usize| cdb10(0x42, 0, 0, len as u16);
    let p = list(&[(1, 2), (5, 1), (100, 0)]);
    good(&f.run(&unmap(p.len()), Some(p)).await);
    assert!(
        f.mem.is_mapped(&lu.uuid, 0)
            && !f.mem.is_mapped(&lu.uuid, 1)
            && !f.mem.is_mapped(&lu.uuid, 2)
    );
    assert!(f.mem.is_mapped(&lu.uuid, 3) && !f.mem.is_mapped(&lu.uuid, 5));
    // Parameter list length zero: nothing to do.
    good(&f.run(&unmap(0), None).await);
    // Shorter than the header.
    assert_eq!(
        check(&f.run(&unmap(4), Some(vec![0; 4])).await),
        codes::PARAMETER_LIST_LENGTH
    );
    // Descriptor data length beyond the list.
    let mut p = list(&[(0, 1)]);
    p[3] = 32;
    assert_eq!(
        check(&f.run(&unmap(p.len()), Some(p)).await),
        codes::PARAMETER_LIST_LENGTH
    );
    // A range out of the LUN: nothing is unmapped.
    let p = list(&[(6, 1), (99, 2)]);
    assert_eq!(
        asc(&f.run(&unmap(p.len()), Some(p)).await),
        (ILLEGAL, 0x21, 0)
    );
    assert!(f.mem.is_mapped(&lu.uuid, 6));
    // Too many descriptors.
    let many: Vec<(u64, u32)> = (0..=limits::MAX_UNMAP_DESCRIPTORS as u64)
        .map(|i| (i % 100, 0))
        .collect();
    let p = list(&many);
    assert_eq!(check(&f.run(&unmap(p.len()), Some(p)).await).asc, 0x26);
    // ANCHOR is not supported.
    let p = list(&[(0, 1)]);
    assert_eq!(
        check(&f.run(&cdb10(0x42, 1, 0, p.len() as u16), Some(p)).await).asc,
        0x24
    );
}

#[tokio::test]
async fn test_execute_unmap_validation() {
    unmap_validation(BS).await;
}

#[tokio::test]
async fn test_execute_unmap_validation_512() {
    unmap_validation(512).await;
}

#[tokio::test]
async fn test_execute_unmap_refused_on_thick_lun() {
    let f = Fixture::ready(false, 100).await;
    assert_eq!(
        check(&f.run(&cdb10(0x42, 0, 0, 0), None).await),
        codes::INVALID_OPCODE
    );
    let rsoc = good(
        &f.run(&[0xa3, 0x0c, 0x01, 0x42, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    assert_eq!(rsoc[1], 0x01);
}

/// compare and write on a LUN with `bs`-byte logical blocks.
async fn compare_and_write(bs: usize) {
    let f = Fixture::ready_bs(false, 100, bs).await;
    good(&f.run(&cdb10(0x2a, 0, 7, 1), Some(vec![b'A'; bs])).await);
    let mut d = vec![b'A'; bs];
    d.extend_from_slice(&vec![b'B'; bs]);
    good(&f.run(&caw(7, 1, 0x08), Some(d.clone())).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 7, 1), None).await),
        vec![b'B'; bs]
    );
    assert_eq!(f.mem.flushes().0, 1);
    // Miscompare: the offset of the first difference, nothing written.
    let mut d = vec![b'B'; bs];
    d[bs / 2 + 1] = b'Z';
    d.extend_from_slice(&vec![b'C'; bs]);
    let s = check(&f.run(&caw(7, 1, 0), Some(d)).await);
    assert_eq!(
        (s.key, s.asc, s.ascq, s.information),
        (key::MISCOMPARE, 0x1d, 0, Some(bs as u64 / 2 + 1))
    );
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 7, 1), None).await),
        vec![b'B'; bs]
    );
    // Above the maximum, wrong Data-Out size, out of range, zero blocks.
    assert_eq!(
        check(&f.run(&caw(0, 2, 0), Some(vec![0; 4 * bs])).await),
        codes::INVALID_FIELD_IN_CDB.in_cdb(13, None)
    );
    assert_eq!(
        check(&f.run(&caw(0, 1, 0), Some(vec![0; 4 * bs])).await).key,
        ILLEGAL
    );
    assert_eq!(
        check(&f.run(&caw(0, 1, 0), Some(vec![0; bs])).await),
        codes::INVALID_FIELD_IN_IU
    );
    assert_eq!(
        asc(&f.run(&caw(100, 1, 0), Some(vec![0; 2 * bs])).await),
        (ILLEGAL, 0x21, 0)
    );
    good(&f.run(&caw(0, 0, 0), None).await);
    assert_eq!(
        check(&f.run(&caw(0, 0, 0), Some(vec![0; 2 * bs])).await).asc,
        0x24
    );
}

#[tokio::test]
async fn test_execute_compare_and_write() {
    compare_and_write(BS).await;
}

#[tokio::test]
async fn test_execute_compare_and_write_512() {
    compare_and_write(512).await;
}

#[tokio::test]
async fn test_execute_write_same_unmap_refused_on_thick_lun() {
    let f = Fixture::ready(false, 100).await;
    let s = check(&f.run(&cdb16(0x93, 0x08, 0, 2), Some(vec![6; BS])).await);
    assert_eq!(s, codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(3)));
    good(&f.run(&cdb16(0x93, 0, 0, 2), Some(vec![6; BS])).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 0, 2), None).await),
        vec![6; 2 * BS]
    );
    let one = good(
        &f.run(&[0xa3, 0x0c, 0x01, 0x93, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    assert_eq!(one[5], 0x01);
}

/// get lba status on a LUN with `bs`-byte logical blocks.
async fn get_lba_status(bs: usize) {
    let f = Fixture::ready_bs(true, 100, bs).await;
    good(&f.run(&cdb10(0x2a, 0, 10, 5), Some(vec![1; 5 * bs])).await);
    let d = good(&f.run(&cdb16(0x9e, 0x12, 0, 64), None).await);
    assert_eq!(be32(&d, 0) as usize, 4 + 3 * 16);
    let descs: Vec<(u64, u32, u8)> = (0..3)
        .map(|i| (be64(&d, 8 + 16 * i), be32(&d, 16 + 16 * i), d[20 + 16 * i]))
        .collect();
    assert_eq!(descs, vec![(0, 10, 1), (10, 5, 0), (15, 85, 1)]);
    // The allocation length limits the descriptors; the first one starts at the LBA asked.
    let d = good(&f.run(&cdb16(0x9e, 0x12, 12, 24), None).await);
    assert_eq!(d.len(), 24);
    assert_eq!((be64(&d, 8), be32(&d, 16), d[20]), (12, 3, 0));
    assert_eq!(
        asc(&f.run(&cdb16(0x9e, 0x12, 100, 24), None).await),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        asc(&f.run(&cdb16(0x9e, 0x12, u64::MAX, 24), None).await),
        (ILLEGAL, 0x21, 0)
    );
}

#[tokio::test]
async fn test_execute_get_lba_status() {
    get_lba_status(BS).await;
}

#[tokio::test]
async fn test_execute_get_lba_status_512() {
    get_lba_status(512).await;
}

#[tokio::test]
async fn test_execute_sync_cache_and_prefetch() {
    let f = Fixture::ready(false, 100).await;
    good(&f.run(&cdb10(0x35, 0, 0, 0), None).await);
    good(&f.run(&cdb16(0x91, 0x02, 50, 50), None).await);
    assert_eq!(f.mem.flushes().0, 2);
    assert_eq!(
        asc(&f.run(&cdb10(0x35, 0, 99, 2), None).await),
        (ILLEGAL, 0x21, 0)
    );
    good(&f.run(&cdb10(0x34, 0x02, 0, 10), None).await);
    let mut c = cdb10(0x34, 0, 0, 1);
    c[6] = 3; // group number
    good(&f.run(&c, None).await);
    assert_eq!(
        asc(&f.run(&cdb16(0x90, 0, 101, 0), None).await),
        (ILLEGAL, 0x21, 0)
    );
}

#[tokio::test]
async fn test_execute_inquiry_pages() {
    let f = Fixture::ready(true, 100).await;
    let d = good(&f.run(&[0x12, 0, 0, 1, 4, 0], None).await);
    assert_eq!((d[0], d[2], d[5]), (0, 6, 0x18));
    let d = good(&f.run(&[0x12, 1, 0x83, 0, 255, 0], None).await);
    assert_eq!(d[1], 0x83);
    let d = good(&f.run(&[0x12, 1, 0x80, 0, 255, 0], None).await);
    assert_eq!(&d[4..], &spc::serial(&f.lun())[..]);
    assert_eq!(
        check(&f.run(&[0x12, 1, 0x99, 0, 255, 0], None).await),
        codes::INVALID_FIELD_IN_CDB.in_cdb(2, None)
    );
    assert_eq!(check(&f.run(&[0x12, 0, 1, 1, 0, 0], None).await).asc, 0x24);
    assert_eq!(check(&f.run(&[0x12, 2, 0, 1, 0, 0], None).await).asc, 0x24);
}

#[tokio::test]
async fn test_execute_mode_sense_select() {
    let f = Fixture::ready(false, 100).await;
    let d = good(&f.run(&[0x1a, 0, 0x3f, 0, 255, 0], None).await);
    assert_eq!(usize::from(d[0]) + 1, d.len());
    assert_eq!(d[2] & 0x90, 0x10);
    let d = good(
        &f.run(&[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], None)
            .await,
    );
    let mut params = d.clone();
    params[0] = 0;
    params[1] = 0;
    good(
        &f.run(
            &[0x55, 0x10, 0, 0, 0, 0, 0, 0, params.len() as u8, 0],
            Some(params.clone()),
        )
        .await,
    );
    params[10] = 0; // clear WCE
    assert_eq!(
        check(
            &f.run(
                &[0x55, 0x10, 0, 0, 0, 0, 0, 0, params.len() as u8, 0],
                Some(params)
            )
            .await
        )
        .asc,
        0x26
    );
    assert_eq!(
        asc(&f.run(&[0x1a, 0, 0xc8, 0, 255, 0], None).await),
        (ILLEGAL, 0x39, 0)
    );
}

#[tokio::test]
async fn test_execute_report_opcodes_matches_validation() {
    let f = Fixture::ready(true, 100).await;
    let d = good(
        &f.run(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], None)
            .await,
    );
    let n = be32(&d, 0) as usize / 8;
    assert_eq!(n, OPS.len());
    for i in 0..n {
        let at = 4 + 8 * i;
        let (op, sa, servactv) = (d[at], be16(&d, at + 2), d[at + 5] & 1 != 0);
        let opt = if servactv { 2 } else { 1 };
        let c = [
            0xa3,
            0x0c,
            opt,
            op,
            (sa >> 8) as u8,
            sa as u8,
            0,
            0,
            1,
            0,
            0,
            0,
        ];
        let one = good(&f.run(&c, None).await);
        assert_eq!((one[1] & 7, one[4]), (3, op));
        let wrong = [
            0xa3,
            0x0c,
            3 - opt,
            op,
            (sa >> 8) as u8,
            sa as u8,
            0,
            0,
            1,
            0,
            0,
            0,
        ];
        let s = check(&f.run(&wrong, None).await);
        assert_eq!(s.asc, 0x24);
        assert_ne!(s.field.map(|f| f.1), Some(1));
    }
    let d = good(
        &f.run(&[0xa3, 0x0d, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0], None)
            .await,
    );
    assert_eq!((d.len(), d[3]), (16, 0x0c));
}

#[tokio::test]
async fn test_execute_alua_unavailable_and_transitioning() {
    let f = Fixture::ready(false, 100).await;
    f.mem.set_port_groups(vec![
        PortGroup {
            id: 1,
            state: AluaState::ActiveOptimized,
            relative_ports: vec![1],
        },
        PortGroup {
            id: 2,
            state: AluaState::ActiveNonOptimized,
            relative_ports: vec![2],
        },
    ]);
    f.mem.set_alua_state(1, AluaState::Unavailable);
    // The change is reported first.
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::ALUA_CHANGED
    );
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::PORT_UNAVAILABLE
    );
    assert_eq!(
        check(&f.run(&cdb10(0x28, 0, 0, 1), None).await),
        codes::PORT_UNAVAILABLE
    );
    good(&f.run(&[0x12, 0, 0, 0, 96, 0], None).await);
    good(&f.run(&[0x1a, 0, 0x3f, 0, 255, 0], None).await);
    good(&f.run(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None).await);
    let d = good(&f.run(&[0x03, 0, 0, 0, 18, 0], None).await);
    assert_eq!((d[2], d[12], d[13]), (key::NOT_READY, 0x04, 0x0c));
    let d = good(
        &f.run(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    assert_eq!((d[4] & 0x0f, d[16] & 0x0f), (0x3, 0x1));
    f.mem.set_alua_state(1, AluaState::Transitioning);
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::ALUA_CHANGED
    );
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::PORT_TRANSITIONING
    );
    assert_eq!(
        check(&f.run(&[0x1a, 0, 0x3f, 0, 255, 0], None).await),
        codes::PORT_TRANSITIONING
    );
    good(
        &f.run(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    f.mem.set_alua_state(1, AluaState::ActiveOptimized);
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::ALUA_CHANGED
    );
    good(&f.run(&[0, 0, 0, 0, 0, 0], None).await);
}

#[tokio::test]
async fn test_execute_rtpg_without_port_groups() {
    let f = Fixture::ready(false, 100).await;
    f.mem.set_port_groups(Vec::new());
    let d = good(
        &f.run(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    assert_eq!(be32(&d, 0), 12);
    assert_eq!((d[4], be16(&d, 6), d[11], be16(&d, 14)), (0, 1, 1, 1));
}

#[tokio::test]
async fn test_execute_backend_errors_map_to_sense() {
    let f = Fixture::ready(false, 100).await;
    f.mem.set_faults(Faults {
        write: Some(BackendError::Medium("x".into())),
        ..Faults::default()
    });
    assert_eq!(
        check(&f.run(&cdb10(0x2a, 0, 0, 1), Some(vec![0; BS])).await),
        codes::WRITE_ERROR
    );
    f.mem.set_faults(Faults {
        write: Some(BackendError::WriteProtected("x".into())),
        ..Faults::default()
    });
    assert_eq!(
        check(&f.run(&cdb10(0x2a, 0, 0, 1), Some(vec![0; BS])).await),
        codes::WRITE_PROTECTED
    );
    assert_eq!(
        check(&f.run(&cdb10(0x35, 0, 0, 0), None).await),
        codes::WRITE_PROTECTED
    );
    f.mem.set_faults(Faults {
        read: Some(BackendError::Medium("x".into())),
        ..Faults::default()
    });
    // The reservation read fails first, as a read.
    assert_eq!(
        check(&f.run(&cdb10(0x28, 0, 0, 1), None).await),
        codes::READ_ERROR
    );
    f.mem.set_faults(Faults {
        read: Some(BackendError::NotReady("x".into())),
        ..Faults::default()
    });
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::PORT_UNAVAILABLE
    );
    // INQUIRY needs no backend I/O; port groups and sense data do not need reservations.
    good(&f.run(&[0x12, 0, 0, 0, 96, 0], None).await);
    good(
        &f.run(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None)
            .await,
    );
    good(&f.run(&[0x03, 0, 0, 0, 18, 0], None).await);
}

#[tokio::test]
async fn test_execute_invalid_opcode_and_service_action() {
    let f = Fixture::ready(false, 100).await;
    for op in [0x3bu8, 0x8c, 0x9d, 0x7f, 0xa4, 0x04] {
        let mut c = [0u8; 16];
        c[0] = op;
        assert_eq!(
            check(&f.run(&c, None).await),
            codes::INVALID_OPCODE,
            "opcode {op:#x}"
        );
    }
    let s = check(&f.run(&cdb16(0x9e, 0x13, 0, 0), None).await);
    assert_eq!(s, codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)));
    // EXTENDED COPY exists, with service actions.
    let s = check(&f.run(&cdb16(0x83, 0x01, 0, 0), None).await);
    assert_eq!(s, codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)));
    // NACA is not supported.
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0x04], None).await).field,
        Some((true, 5, Some(2)))
    );
}

#[tokio::test]
async fn test_execute_sanitize_and_write_atomic_not_offered() {
    for thin in [true, false] {
        let f = Fixture::ready(thin, 100).await;
        // SANITIZE OVERWRITE (service action 01h) and WRITE ATOMIC (16) of one block.
        let sanitize = [0x48, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        let atomic = cdb16(0x9c, 0, 0, 1);
        for (c, d) in [(&sanitize[..], None), (&atomic[..], Some(vec![7; BS]))] {
            let s = check(&f.run(c, d).await);
            assert_eq!(s, codes::INVALID_OPCODE, "opcode {:#x}", c[0]);
            assert_eq!((s.key, s.asc, s.ascq), (ILLEGAL, 0x20, 0x00));
            assert_eq!(f.scsi.data_out_length(T, 0, c), None);
        }
        assert_eq!(good(&f.run(&cdb10(0x28, 0, 0, 1), None).await), vec![0; BS]);
        // Not listed by REPORT SUPPORTED OPERATION CODES.
        let all = good(
            &f.run(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], None)
                .await,
        );
        assert_eq!(be32(&all, 0) as usize, all.len() - 4);
        assert!(!all[4..].chunks(8).any(|c| matches!(c[0], 0x48 | 0x9c)));
        // Nor reported supported one by one: by operation code, or by operation code and
        // service action (SUPPORT 001b); SANITIZE has no service actions to ask for.
        for (op, sa) in [(0x48u8, 0x01u8), (0x9c, 0x00)] {
            for option in [0x01u8, 0x03] {
                let c = [0xa3, 0x0c, option, op, 0, sa, 0, 0, 1, 0, 0, 0];
                let one = good(&f.run(&c, None).await);
                assert_eq!((one[1] & 0x07, one.len()), (0x01, 4), "{op:#x} {option}");
            }
        }
        let c = [0xa3, 0x0c, 0x02, 0x48, 0, 0x01, 0, 0, 1, 0, 0, 0];
        assert_eq!(
            check(&f.run(&c, None).await),
            codes::INVALID_FIELD_IN_CDB.in_cdb(3, None)
        );
    }
}

#[tokio::test]
async fn test_execute_lun_reset_reaches_every_nexus() {
    let f = Fixture::ready(false, 100).await;
    let other = nexus("iqn.i2", 1);
    f.run_on(&other, 0, &[0, 0, 0, 0, 0, 0], None).await;
    f.scsi.lun_reset(&f.n, 0).await;
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::RESET_OCCURRED
    );
    assert_eq!(
        check(&f.run_on(&other, 0, &[0, 0, 0, 0, 0, 0], None).await),
        codes::RESET_OCCURRED
    );
    good(&f.run(&[0, 0, 0, 0, 0, 0], None).await);
    f.scsi.target_reset(&other).await;
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::RESET_OCCURRED
    );
    // A lost nexus starts afresh.
    f.scsi.nexus_lost(&f.n).await;
    assert_eq!(
        check(&f.run(&[0, 0, 0, 0, 0, 0], None).await),
        codes::RESET_OCCURRED
    );
}

#[tokio::test]
async fn test_change_reservations_retries_then_busy() {
    let f = Fixture::ready(false, 100).await;
    let lu = f.lun();
    let mut aborts = f.scsi.aborts();
    let decide = |s: &pr::PrState| OutOutcome::Done {
        state: Some(pr::PrState {
            version: s.version + 1,
            ..s.clone()
        }),
        abort: vec!["iqn.x,i,0x01".into()],
    };
    f.mem.set_faults(Faults {
        lost_races: 3,
        ..Faults::default()
    });
    let state = f.mem.reservation_state(&lu.uuid);
    let r = f.scsi.change_reservations(&f.n, &lu, state, decide).await;
    assert!(matches!(r, Ok(DataIn::None)));
    assert_eq!(f.mem.reservation_state(&lu.uuid).version, 1);
    let ab = aborts.try_recv().unwrap();
    assert_eq!(
        (ab.target.as_str(), ab.lun, ab.initiator_ports.len()),
        (T, 0, 1)
    );
    f.mem.set_faults(Faults {
        lost_races: 1000,
        ..Faults::default()
    });
    let state = f.mem.reservation_state(&lu.uuid);
    let r = f.scsi.change_reservations(&f.n, &lu, state, decide).await;
    assert!(matches!(r, Err(Failure::Busy)));
    assert!(aborts.try_recv().is_err());
    let r = f
        .scsi
        .change_reservations(&f.n, &lu, pr::PrState::default(), |_| OutOutcome::Conflict)
        .await;
    assert!(matches!(r, Err(Failure::Conflict)));
}

/// A backend that leaves every optional method to its default, as a daemon may.
#[derive(Debug)]
struct Plain(Arc<MemBackend>);

impl Backend for Plain {
    type Buf = Vec<u8>;
    fn buffer(&self, len: usize) -> Vec<u8> {
        self.0.buffer(len)
    }
    fn targets(&self) -> Vec<String> {
        self.0.targets()
    }
    fn luns(&self, target: &str) -> Vec<LunInfo> {
        self.0.luns(target)
    }
    fn allows(&self, target: &str, lun: &LunInfo, initiator: &str) -> bool {
        self.0.allows(target, lun, initiator)
    }
    fn port_groups(&self, lun: &LunInfo) -> Vec<PortGroup> {
        self.0.port_groups(lun)
    }
    async fn read(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        self.0.read(lun, offset, len).await
    }
    async fn write(
        &self,
        lun: &LunInfo,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), BackendError> {
        self.0.write(lun, offset, data, fua).await
    }
    async fn flush(&self, lun: &LunInfo) -> Result<(), BackendError> {
        self.0.flush(lun).await
    }
    async fn unmap(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.unmap(lun, offset, len).await
    }
    async fn write_zeroes(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.write_zeroes(lun, offset, len).await
    }
    async fn compare_and_write(
        &self,
        lun: &LunInfo,
        offset: u64,
        compare: Vec<u8>,
        write: Vec<u8>,
    ) -> Result<crate::backend::CompareOutcome, BackendError> {
        self.0.compare_and_write(lun, offset, compare, write).await
    }
    async fn reservations(&self, lun: &LunInfo) -> Result<pr::PrState, BackendError> {
        self.0.reservations(lun).await
    }
    async fn update_reservations(
        &self,
        lun: &LunInfo,
        expected: u64,
        new: pr::PrState,
    ) -> Result<bool, BackendError> {
        self.0.update_reservations(lun, expected, new).await
    }
    async fn set_write_protect(&self, lun: &LunInfo, on: bool) -> Result<(), BackendError> {
        self.0.set_write_protect(lun, on).await
    }
}

#[tokio::test]
async fn test_execute_backend_without_optional_methods() {
    let mem = Arc::new(MemBackend::new());
    mem.add_lun(T, lun_info(0, 100, true));
    let scsi = Scsi::new(Arc::new(Plain(mem.clone())));
    let n = nexus("iqn.i1", 1);
    let run = |cdb: Vec<u8>, data: Option<Vec<u8>>| {
        let n = n.clone();
        let scsi = &scsi;
        async move {
            let expected_length = data.as_ref().map_or(0, |d| d.len() as u32);
            scsi.execute(Command {
                nexus: &n,
                lun: 0,
                cdb: &cdb,
                data_out: data,
                expected_length,
            })
            .await
        }
    };
    assert_eq!(check(&run(vec![0; 6], None).await), codes::RESET_OCCURRED);
    good(&run(cdb10(0x2a, 0, 3, 1).to_vec(), Some(vec![4; BS])).await);
    assert_eq!(
        good(&run(cdb10(0x28, 0, 3, 1).to_vec(), None).await),
        vec![4; BS]
    );
    // The LUN table is read for each command, so changes show.
    mem.resize_lun(T, 0, 200 * BS as u64);
    assert_eq!(check(&run(vec![0; 6], None).await), codes::CAPACITY_CHANGED);
    mem.add_lun(T, lun_info(1, 10, false));
    assert_eq!(check(&run(vec![0; 6], None).await), codes::LUNS_CHANGED);
    good(&run(vec![0; 6], None).await);
    // Everything is reported mapped by default.
    let d = good(&run(cdb16(0x9e, 0x12, 0, 24).to_vec(), None).await);
    assert_eq!((be32(&d, 16), d[20]), (200, 0));
    // The access state comes from the port groups.
    mem.set_alua_state(1, AluaState::Unavailable);
    assert_eq!(check(&run(vec![0; 6], None).await), codes::ALUA_CHANGED);
    assert_eq!(check(&run(vec![0; 6], None).await), codes::PORT_UNAVAILABLE);
}

fn pr_out(sa: u8, type_code: u8) -> [u8; 10] {
    [0x5f, sa, type_code, 0, 0, 0, 0, 0, 24, 0]
}

fn pr_params(key: u64, sa_key: u64) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

#[tokio::test]
async fn test_execute_reserve6_conflicts_and_release_on_nexus_loss() {
    let f = Fixture::ready(false, 100).await;
    let lu = f.lun();
    let b = nexus("iqn.i2", 1);
    f.run_on(&b, 0, &[0, 0, 0, 0, 0, 0], None).await;
    good(&f.run(&[0x16, 0, 0, 0, 0, 0], None).await);
    good(&f.run(&[0x16, 0, 0, 0, 0, 0], None).await);
    assert_eq!(
        f.run_on(&b, 0, &[0x16, 0, 0, 0, 0, 0], None).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        f.run_on(&b, 0, &[0x1a, 0, 0x3f, 0, 255, 0], None)
            .await
            .status,
        status::RESERVATION_CONFLICT
    );
    // RELEASE from a non-holder does nothing; INQUIRY is always allowed.
    good(&f.run_on(&b, 0, &[0x17, 0, 0, 0, 0, 0], None).await);
    good(&f.run_on(&b, 0, &[0x12, 0, 0, 0, 36, 0], None).await);
    good(&f.run(&[0x1a, 0, 0x3f, 0, 255, 0], None).await);
    // The holder's nexus goes away: its reservation is released by the time the call
    // completes, so another initiator's RESERVE right after does not conflict.
    f.scsi.nexus_lost(&f.n).await;
    assert!(f.mem.reservation_state(&lu.uuid).legacy.is_none());
    good(&f.run_on(&b, 0, &[0x16, 0, 0, 0, 0, 0], None).await);
    // A LUN reset releases it too, whoever holds it.
    f.scsi.lun_reset(&f.n, 0).await;
    assert!(f.mem.reservation_state(&lu.uuid).legacy.is_none());
    assert_eq!(
        check(&f.run_on(&b, 0, &[0, 0, 0, 0, 0, 0], None).await),
        codes::RESET_OCCURRED
    );
    good(&f.run_on(&b, 0, &[0x17, 0, 0, 0, 0, 0], None).await);
}

#[tokio::test]
async fn test_execute_persistent_reservation_preempt_and_abort() {
    let f = Fixture::ready(false, 100).await;
    let b = nexus("iqn.i2", 1);
    f.run_on(&b, 0, &[0, 0, 0, 0, 0, 0], None).await;
    let mut aborts = f.scsi.aborts();
    // Both register; A takes Write Exclusive.
    good(&f.run(&pr_out(0x00, 0), Some(pr_params(0, 0xa))).await);
    good(
        &f.run_on(&b, 0, &pr_out(0x00, 0), Some(pr_params(0, 0xb)))
            .await,
    );
    good(&f.run(&pr_out(0x01, 0x01), Some(pr_params(0xa, 0))).await);
    let keys = good(&f.run(&[0x5e, 0x00, 0, 0, 0, 0, 0, 0, 64, 0], None).await);
    assert_eq!(be32(&keys, 4), 16);
    // B may read but not write.
    good(&f.run_on(&b, 0, &cdb10(0x28, 0, 0, 1), None).await);
    let r = f
        .run_on(&b, 0, &cdb10(0x2a, 0, 0, 1), Some(vec![0; BS]))
        .await;
    assert_eq!((r.status, r.sense), (status::RESERVATION_CONFLICT, None));
    // A preempts B and aborts its tasks; B learns of it by unit attention.
    good(&f.run(&pr_out(0x05, 0x01), Some(pr_params(0xa, 0xb))).await);
    let ab = aborts.try_recv().unwrap();
    assert_eq!(
        (ab.lun, ab.initiator_ports),
        (0, vec![b.initiator_port_name()])
    );
    // INQUIRY does not take the attention; TEST UNIT READY does, once.
    good(&f.run_on(&b, 0, &[0x12, 0, 0, 0, 36, 0], None).await);
    assert_eq!(
        check(&f.run_on(&b, 0, &[0, 0, 0, 0, 0, 0], None).await),
        codes::REGISTRATIONS_PREEMPTED
    );
    good(&f.run_on(&b, 0, &[0, 0, 0, 0, 0, 0], None).await);
    // Reservation commands are refused while persistent registrations exist.
    assert_eq!(
        f.run_on(&b, 0, &[0x16, 0, 0, 0, 0, 0], None).await.status,
        status::RESERVATION_CONFLICT
    );
    // Clean up: A clears everything.
    good(&f.run(&pr_out(0x03, 0), Some(pr_params(0xa, 0))).await);
    assert!(
        f.mem
            .reservation_state(&f.lun().uuid)
            .registrations
            .is_empty()
    );
}

#[tokio::test]
async fn test_execute_request_sense_takes_reservation_attention() {
    let f = Fixture::ready(false, 100).await;
    let b = nexus("iqn.i2", 1);
    f.run_on(&b, 0, &[0, 0, 0, 0, 0, 0], None).await;
    good(&f.run(&pr_out(0x00, 0), Some(pr_params(0, 0xa))).await);
    good(
        &f.run_on(&b, 0, &pr_out(0x00, 0), Some(pr_params(0, 0xb)))
            .await,
    );
    good(&f.run(&pr_out(0x04, 0x03), Some(pr_params(0xa, 0xb))).await);
    let d = good(&f.run_on(&b, 0, &[0x03, 0, 0, 0, 18, 0], None).await);
    assert_eq!((d[2], d[12], d[13]), (key::UNIT_ATTENTION, 0x2a, 0x05));
    let d = good(&f.run_on(&b, 0, &[0x03, 0, 0, 0, 18, 0], None).await);
    assert_eq!(d[2], 0);
    good(&f.run(&pr_out(0x03, 0), Some(pr_params(0xa, 0))).await);
}

/// A backend over a [`MemBackend`] whose reads and writes yield to the scheduler first (so
/// concurrent commands interleave at every I/O).
#[derive(Debug)]
struct Slow {
    mem: Arc<MemBackend>,
}

impl Backend for Slow {
    type Buf = Vec<u8>;
    fn buffer(&self, len: usize) -> Vec<u8> {
        self.mem.buffer(len)
    }
    fn targets(&self) -> Vec<String> {
        self.mem.targets()
    }
    fn luns(&self, target: &str) -> Vec<LunInfo> {
        self.mem.luns(target)
    }
    fn luns_generation(&self, target: &str) -> Option<u64> {
        self.mem.luns_generation(target)
    }
    fn port_groups(&self, lun: &LunInfo) -> Vec<PortGroup> {
        self.mem.port_groups(lun)
    }
    async fn provisioning(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> Result<(crate::backend::Provisioning, u64), BackendError> {
        self.mem.provisioning(lun, offset, len).await
    }
    async fn read(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        tokio::task::yield_now().await;
        self.mem.read(lun, offset, len).await
    }
    async fn write(
        &self,
        lun: &LunInfo,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), BackendError> {
        tokio::task::yield_now().await;
        self.mem.write(lun, offset, data, fua).await
    }
    async fn flush(&self, lun: &LunInfo) -> Result<(), BackendError> {
        self.mem.flush(lun).await
    }
    async fn unmap(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        self.mem.unmap(lun, offset, len).await
    }
    async fn write_zeroes(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        self.mem.write_zeroes(lun, offset, len).await
    }
    async fn compare_and_write(
        &self,
        lun: &LunInfo,
        offset: u64,
        compare: Vec<u8>,
        write: Vec<u8>,
    ) -> Result<crate::backend::CompareOutcome, BackendError> {
        self.mem
            .compare_and_write(lun, offset, compare, write)
            .await
    }
    async fn reservations(&self, lun: &LunInfo) -> Result<pr::PrState, BackendError> {
        self.mem.reservations(lun).await
    }
    async fn update_reservations(
        &self,
        lun: &LunInfo,
        expected: u64,
        new: pr::PrState,
    ) -> Result<bool, BackendError> {
        self.mem.update_reservations(lun, expected, new).await
    }
    async fn set_write_protect(&self, lun: &LunInfo, on: bool) -> Result<(), BackendError> {
        self.mem.set_write_protect(lun, on).await
    }
}

/// A SCSI layer over a [`Slow`] backend with LUN 0 of `blocks` blocks of `bs` bytes (thin),
/// and the nexus past its power-on unit attention.
async fn slow(blocks: u64, bs: usize) -> (Arc<Scsi<Slow>>, Nexus) {
    let mem = Arc::new(MemBackend::new());
    mem.add_lun(T, lun_info_bs(0, blocks, true, bs));
    let scsi = Arc::new(Scsi::new(Arc::new(Slow { mem })));
    let n = nexus("iqn.i1", 1);
    let r = exec(&scsi, &n, &[0; 6], None).await;
    assert_eq!(r.sense, Some(codes::RESET_OCCURRED));
    (scsi, n)
}

async fn exec<B: Backend<Buf = Vec<u8>>>(
    scsi: &Scsi<B>,
    n: &Nexus,
    cdb: &[u8],
    data: Option<Vec<u8>>,
) -> Response<Vec<u8>> {
    let expected_length = data.as_ref().map_or(0, |d| d.len() as u32);
    scsi.execute(Command {
        nexus: n,
        lun: 0,
        cdb,
        data_out: data,
        expected_length,
    })
    .await
}

fn orwrite(lba: u64, n: u32, flags: u8) -> [u8; 16] {
    cdb16(0x8b, flags, lba, n)
}

/// ORWRITE on a LUN with `bs`-byte blocks.
async fn orwrite_ors_data_in(bs: usize) {
    let f = Fixture::ready_bs(false, 100, bs).await;
    good(&f.run(&cdb10(0x2a, 0, 3, 2), Some(vec![0x0f; 2 * bs])).await);
    good(&f.run(&orwrite(3, 2, 0), Some(vec![0x30; 2 * bs])).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 3, 2), None).await),
        vec![0x3f; 2 * bs]
    );
    // An unwritten block ORs with zeroes; DPO and FUA are accepted, FUA makes it durable.
    good(&f.run(&orwrite(99, 1, 0x18), Some(vec![0xa5; bs])).await);
    assert_eq!(f.mem.flushes().1, 1);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 99, 1), None).await),
        vec![0xa5; bs]
    );
    // Zero blocks, out of range, ORPROTECT, a partial block.
    good(&f.run(&orwrite(0, 0, 0), None).await);
    assert_eq!(
        asc(&f.run(&orwrite(101, 0, 0), None).await),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        asc(&f.run(&orwrite(99, 2, 0), Some(vec![0; 2 * bs])).await),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        asc(&f.run(&orwrite(1 << 63, 1, 0), Some(vec![0; bs])).await),
        (ILLEGAL, 0x21, 0)
    );
    for p in 1..8u8 {
        let s = check(&f.run(&orwrite(0, 1, p << 5), Some(vec![0; bs])).await);
        assert_eq!((s.asc, s.field.map(|f| f.1)), (0x24, Some(1)));
    }
    assert_eq!(
        check(&f.run(&orwrite(0, 1, 0), Some(vec![0; bs / 2])).await),
        codes::INVALID_FIELD_IN_IU
    );
}

#[tokio::test]
async fn test_execute_orwrite_ors_data_in() {
    orwrite_ors_data_in(BS).await;
}

#[tokio::test]
async fn test_execute_orwrite_ors_data_in_512() {
    orwrite_ors_data_in(512).await;
}

#[tokio::test]
async fn test_execute_orwrite_concurrent_do_not_interleave() {
    // Reads and writes yield, so without the lock both ORWRITEs would read zeroes and the
    // second write would drop the first one's bits.
    let (scsi, n) = slow(64, 512).await;
    let bits = [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20];
    let runs = bits.map(|b| {
        let scsi = scsi.clone();
        let n = n.clone();
        tokio::spawn(async move { exec(&scsi, &n, &orwrite(8, 4, 0), Some(vec![b; 2048])).await })
    });
    for r in runs {
        good(&r.await.unwrap());
    }
    let d = good(&exec(&scsi, &n, &cdb10(0x28, 0, 8, 4), None).await);
    assert_eq!(d, vec![0x3f; 2048]);
}

/// An EXTENDED COPY (LID1) parameter list: list id and usage, identification descriptors
/// naming `targets` by NAA designator with their block sizes, block to block segments
/// `(source index, destination index, blocks, source LBA, destination LBA)`.
fn xcopy_list(
    id: u8,
    usage: u8,
    targets: &[(&LunInfo, u32)],
    segs: &[(u16, u16, u16, u64, u64)],
) -> Vec<u8> {
    let mut p = vec![0u8; 16];
    p[0] = id;
    p[1] = usage << 3;
    p[2..4].copy_from_slice(&((32 * targets.len()) as u16).to_be_bytes());
    p[8..12].copy_from_slice(&((28 * segs.len()) as u32).to_be_bytes());
    for (lu, bs) in targets {
        let mut d = vec![0u8; 32];
        d[0] = 0xe4;
        d[4] = 0x01;
        d[5] = 0x03;
        d[7] = 8;
        d[8..16].copy_from_slice(&spc::naa(lu));
        d[29..32].copy_from_slice(&bs.to_be_bytes()[1..]);
        p.extend(d);
    }
    for &(src, dst, n, src_lba, dst_lba) in segs {
        let mut d = vec![0u8; 28];
        d[0] = 0x02;
        d[2..4].copy_from_slice(&24u16.to_be_bytes());
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&n.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        p.extend(d);
    }
    p
}

fn xcopy_cdb(len: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

fn copy_results(sa: u8, list_id: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x84;
    c[1] = sa;
    c[2] = list_id;
    c[10..14].copy_from_slice(&1024u32.to_be_bytes());
    c
}

/// EXTENDED COPY within LUN 0 of `bs`-byte blocks, then RECEIVE COPY RESULTS.
async fn xcopy_within_lun(bs: usize) {
    let f = Fixture::ready_bs(true, 4096, bs).await;
    let lu = f.lun();
    let n = 600usize;
    let data: Vec<u8> = (0..n * bs).map(|i| (i % 253) as u8).collect();
    good(
        &f.run(&cdb16(0x8a, 0, 0, n as u32), Some(data.clone()))
            .await,
    );
    // No status for list 1 yet.
    assert_eq!(
        check(&f.run(&copy_results(0x00, 1), None).await),
        codes::INVALID_FIELD_IN_CDB.in_cdb(2, None)
    );
    let p = xcopy_list(1, 0, &[(&lu, bs as u32)], &[(0, 0, n as u16, 0, 3000)]);
    good(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    assert_eq!(
        good(&f.run(&cdb16(0x88, 0, 3000, n as u32), None).await),
        data
    );
    // COPY STATUS: done without errors, one segment, every byte; then it is gone. A
    // shorter allocation length does not use it up.
    let mut short = copy_results(0x00, 1);
    short[10..14].copy_from_slice(&4u32.to_be_bytes());
    assert_eq!(good(&f.run(&short, None).await), vec![0, 0, 0, 8]);
    let d = good(&f.run(&copy_results(0x00, 1), None).await);
    assert_eq!(
        (be32(&d, 0), d[4], be16(&d, 5), d[7], be32(&d, 8)),
        (8, 0, 1, 0, (n * bs) as u32)
    );
    assert_eq!(check(&f.run(&copy_results(0x00, 1), None).await).asc, 0x24);
    // LIST ID USAGE 10b keeps nothing after the copy; 11b needs list identifier zero.
    let p = xcopy_list(2, 2, &[(&lu, bs as u32)], &[(0, 0, 1, 0, 1)]);
    good(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    assert_eq!(check(&f.run(&copy_results(0x00, 2), None).await).asc, 0x24);
    let p = xcopy_list(0, 3, &[(&lu, bs as u32)], &[(0, 0, 1, 0, 1)]);
    good(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    // Overlapping source and destination (forwards would smear the data).
    let p = xcopy_list(3, 2, &[(&lu, bs as u32)], &[(0, 0, n as u16, 3000, 3100)]);
    good(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    assert_eq!(
        good(&f.run(&cdb16(0x88, 0, 3100, n as u32), None).await),
        data
    );
    // OPERATING PARAMETERS.
    let d = good(&f.run(&copy_results(0x03, 0), None).await);
    assert_eq!(be32(&d, 0) as usize + 4, d.len());
    assert_eq!((be16(&d, 8), be16(&d, 10), be32(&d, 12)), (8, 16, 1024));
    assert_eq!(d[37], bs.trailing_zeros() as u8);
}

#[tokio::test]
async fn test_execute_xcopy_within_lun() {
    xcopy_within_lun(BS).await;
}

#[tokio::test]
async fn test_execute_xcopy_within_lun_512() {
    xcopy_within_lun(512).await;
}

#[tokio::test]
async fn test_execute_xcopy_between_luns_of_different_block_sizes() {
    let f = Fixture::ready(false, 1000).await;
    f.mem.add_lun(T, lun_info_bs(1, 8000, true, 512));
    assert_eq!(check(&f.run(&[0; 6], None).await), codes::LUNS_CHANGED);
    let (a, b) = (f.lun(), f.mem.luns(T)[1].clone());
    // More than a chunk (1 MiB): 300 blocks of 4 KiB.
    let data: Vec<u8> = (0..300 * BS).map(|i| (i % 241) as u8).collect();
    good(&f.run(&cdb16(0x8a, 0, 10, 300), Some(data.clone())).await);
    // 300 source blocks of 4 KiB make 2400 destination blocks of 512 bytes.
    let p = xcopy_list(1, 0, &[(&a, 4096), (&b, 512)], &[(0, 1, 300, 10, 16)]);
    good(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    assert_eq!(f.mem.read(&b, 16 * 512, 300 * 4096).await.unwrap(), data);
    // DC: the count is in destination blocks; 8 of 512 bytes are one source block.
    let p = xcopy_list(2, 0, &[(&b, 512), (&a, 4096)], &[(0, 1, 8, 16, 900)]);
    let mut p2 = p.clone();
    p2[16 + 64 + 1] = 0x02;
    good(&f.run(&xcopy_cdb(p2.len()), Some(p2)).await);
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 900, 1), None).await),
        data[..BS].to_vec()
    );
    // A count that does not fill whole destination blocks.
    let p = xcopy_list(3, 0, &[(&b, 512), (&a, 4096)], &[(0, 1, 3, 0, 0)]);
    assert_eq!(
        check(&f.run(&xcopy_cdb(p.len()), Some(p)).await),
        codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(16 + 64 + 10, None)
    );
    // The wrong disk block length for a LUN.
    let p = xcopy_list(4, 0, &[(&a, 512)], &[(0, 0, 1, 0, 1)]);
    assert_eq!(
        check(&f.run(&xcopy_cdb(p.len()), Some(p)).await),
        codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(16 + 29, None)
    );
}

#[tokio::test]
async fn test_execute_xcopy_validation() {
    let f = Fixture::ready(true, 100).await;
    let lu = f.lun();
    let unreachable = (key::COPY_ABORTED, 0x08, 0x04);
    // No parameter list: nothing to do.
    good(&f.run(&xcopy_cdb(0), None).await);
    // Truncated descriptors.
    let p = xcopy_list(1, 0, &[(&lu, 4096)], &[(0, 0, 1, 0, 50)]);
    for len in [47, 75] {
        assert_eq!(
            check(&f.run(&xcopy_cdb(len), Some(p[..len].to_vec())).await),
            codes::PARAMETER_LIST_LENGTH
        );
    }
    // The Data-Out is shorter than the parameter list length.
    assert_eq!(
        check(&f.run(&xcopy_cdb(76), Some(p[..60].to_vec())).await),
        codes::PARAMETER_LIST_LENGTH
    );
    // A destination index naming no descriptor.
    let p = xcopy_list(1, 0, &[(&lu, 4096)], &[(0, 1, 1, 0, 50)]);
    assert_eq!(asc(&f.run(&xcopy_cdb(p.len()), Some(p)).await), unreachable);
    // Beyond the destination's end: COPY ABORTED, and nothing copied.
    good(&f.run(&cdb10(0x2a, 0, 0, 1), Some(vec![7; BS])).await);
    let p = xcopy_list(1, 0, &[(&lu, 4096)], &[(0, 0, 1, 0, 60), (0, 0, 2, 0, 99)]);
    let s = check(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    assert_eq!((s.key, s.asc, s.ascq), (key::COPY_ABORTED, 0, 0));
    assert_eq!(s.field, Some((false, 16 + 32 + 28 + 20, None)));
    assert_eq!(
        good(&f.run(&cdb10(0x28, 0, 60, 1), None).await),
        vec![0; BS]
    );
    // A designator of no LUN, a LUN the initiator may not see.
    let mut other = lu.clone();
    other.uuid = [0x77; 16];
    let p = xcopy_list(1, 0, &[(&other, 4096)], &[(0, 0, 1, 0, 50)]);
    assert_eq!(asc(&f.run(&xcopy_cdb(p.len()), Some(p)).await), unreachable);
    f.mem.add_lun(T, lun_info(1, 100, true));
    f.mem.set_acl(T, 1, Some(vec!["iqn.someone-else".into()]));
    let hidden = f.mem.luns(T)[1].clone();
    let p = xcopy_list(1, 0, &[(&lu, 4096), (&hidden, 4096)], &[(0, 1, 1, 0, 0)]);
    assert_eq!(asc(&f.run(&xcopy_cdb(p.len()), Some(p)).await), unreachable);
}

#[tokio::test]
async fn test_execute_xcopy_honours_reservations_of_other_luns() {
    let f = Fixture::ready(true, 100).await;
    f.mem.add_lun(T, lun_info(1, 100, true));
    let (a, b) = (f.lun(), f.mem.luns(T)[1].clone());
    let other = nexus("iqn.i2", 1);
    f.run_on(&other, 1, &[0; 6], None).await;
    good(&f.run_on(&other, 1, &[0x16, 0, 0, 0, 0, 0], None).await);
    f.run(&[0; 6], None).await; // REPORTED LUNS DATA HAS CHANGED
    let p = xcopy_list(1, 0, &[(&a, 4096), (&b, 4096)], &[(0, 1, 1, 0, 0)]);
    let r = f.run(&xcopy_cdb(p.len()), Some(p)).await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    // Copying from the reserved LUN is refused as well (SPC-2 reservations exclude reads).
    let p = xcopy_list(1, 0, &[(&b, 4096), (&a, 4096)], &[(0, 1, 1, 0, 0)]);
    assert_eq!(
        f.run(&xcopy_cdb(p.len()), Some(p)).await.status,
        status::RESERVATION_CONFLICT
    );
    good(&f.run_on(&other, 1, &[0x17, 0, 0, 0, 0, 0], None).await);
    let p = xcopy_list(1, 0, &[(&a, 4096), (&b, 4096)], &[(0, 1, 1, 0, 0)]);
    good(&f.run(&xcopy_cdb(p.len()), Some(p)).await);
    // The copy results of a lost nexus go with it.
    f.scsi.nexus_lost(&f.n).await;
    f.run(&[0; 6], None).await;
    assert_eq!(check(&f.run(&copy_results(0x00, 1), None).await).asc, 0x24);
}

#[tokio::test]
async fn test_execute_third_party_copy_advertised() {
    let f = Fixture::ready(true, 100).await;
    let d = good(&f.run(&[0x12, 1, 0, 0, 255, 0], None).await);
    assert!(d[4..].contains(&0x8f));
    let d = good(&f.run(&[0x12, 1, 0x8f, 0, 255, 0], None).await);
    assert_eq!((d[1], be16(&d, 2) as usize + 4), (0x8f, d.len()));
    let all = good(
        &f.run(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], None)
            .await,
    );
    let listed: Vec<(u8, u16)> = all[4..].chunks(8).map(|c| (c[0], be16(c, 2))).collect();
    for want in [(0x83, 0), (0x84, 0), (0x84, 3), (0x8b, 0)] {
        assert!(listed.contains(&want), "{want:?}");
    }
}

#[tokio::test]
async fn test_execute_data_out_length_uses_lun_block_size() {
    let f = Fixture::ready_bs(true, 100, 512).await;
    f.mem.add_lun(T, lun_info(1, 100, true));
    let w = cdb10(0x2a, 0, 0, 8);
    assert_eq!(f.scsi.data_out_length(T, 0, &w), Some(4096));
    assert_eq!(f.scsi.data_out_length(T, 1, &w), Some(8 * 4096));
    assert_eq!(f.scsi.data_out_length(T, 9, &w), Some(8 * 4096));
    assert_eq!(f.scsi.data_out_length(T, 0, &[0x7e]), None);
}

/// Supported operation codes, to steer random CDBs towards code that parses them.
fn opcodes() -> Vec<u8> {
    OPS.iter().map(|o| o.usage[0]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn test_execute_random_cdbs_never_panic(
        pick in any::<prop::sample::Index>(),
        known in any::<bool>(),
        mut cdb in prop::collection::vec(any::<u8>(), 0..20),
        data in prop::option::of(prop::collection::vec(any::<u8>(), 0..3 * BS)),
        lun in 0u64..4,
    ) {
        let ops = opcodes();
        if known && !cdb.is_empty() {
            cdb[0] = ops[pick.index(ops.len())];
        }
        // Keep long block ranges in the LUN sometimes, so transfers happen.
        if cdb.len() >= 10 && cdb[0] & 0xe0 == 0x20 {
            let low = cdb[5] & 0x3f;
            cdb[2..6].copy_from_slice(&[0, 0, 0, low]);
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let f = Fixture::new(true, 300);
        f.mem.add_lun(T, lun_info(1, 64, false));
        f.mem.add_lun(T, lun_info_bs(2, 400, true, 512));
        let r = rt.block_on(f.run_on(&f.n.clone(), lun, &cdb, data.clone()));
        let r2 = rt.block_on(f.run_on(&f.n.clone(), lun, &cdb, data));
        for r in [r, r2] {
            match r.status {
                status::GOOD => prop_assert!(r.sense.is_none()),
                status::CHECK_CONDITION => prop_assert!(r.sense.is_some()),
                status::RESERVATION_CONFLICT | status::BUSY => prop_assert!(r.sense.is_none()),
                s => prop_assert!(false, "unexpected status {s:#x}"),
            }
        }
    }
}

/// MODE SENSE (6) of the control page without block descriptors; `pc` 0x00 asks for the
/// current values, 0x40 for the changeable ones.
fn control_page(pc: u8) -> [u8; 6] {
    [0x1a, 0x08, pc | 0x0a, 0, 255, 0]
}

/// Sets or clears SWP through `n` as libiscsi does: MODE SENSE (6) of the current control
/// page, SWP changed, MODE SELECT (6) of it.
async fn select_swp(f: &Fixture, n: &Nexus, on: bool) -> Response<Vec<u8>> {
    let mut p = good(&f.run_on(n, 0, &control_page(0x00), None).await);
    // Mode data length and device-specific parameter are reserved in MODE SELECT.
    p[0] = 0;
    p[2] = 0;
    // Byte 4 of the page, after the 4-byte header: SWP is bit 3.
    if on {
        p[8] |= 0x08;
    } else {
        p[8] &= !0x08;
    }
    f.run_on(n, 0, &[0x15, 0x10, 0, 0, p.len() as u8, 0], Some(p))
        .await
}

/// A command's name, CDB and Data-Out.
type NamedCommand = (&'static str, Vec<u8>, Option<Vec<u8>>);

/// Every command that changes the medium of `lu` (`bs`-byte blocks) at LBA 0 or 1, with its
/// Data-Out, named: WRITE 6/10/12/16, WRITE AND VERIFY 10/12/16, WRITE SAME 10/16 with and
/// without UNMAP, UNMAP, COMPARE AND WRITE (comparing with `at_lba0`, what LBA 0 holds, so
/// only a refusal stops it), ORWRITE, and an EXTENDED COPY within the LUN to LBA 50.
fn medium_changers(bs: usize, lu: &LunInfo, at_lba0: &[u8]) -> Vec<NamedCommand> {
    let block = vec![0xeeu8; bs];
    let mut unmap = vec![0u8; 8];
    unmap[0..2].copy_from_slice(&22u16.to_be_bytes());
    unmap[2..4].copy_from_slice(&16u16.to_be_bytes());
    unmap.extend_from_slice(&0u64.to_be_bytes());
    unmap.extend_from_slice(&2u32.to_be_bytes());
    unmap.extend_from_slice(&[0; 4]);
    let mut caw_data = at_lba0.to_vec();
    caw_data.extend_from_slice(&block);
    let copy = xcopy_list(1, 0, &[(lu, bs as u32)], &[(0, 0, 1, 0, 50)]);
    vec![
        ("WRITE (6)", vec![0x0a, 0, 0, 0, 1, 0], Some(block.clone())),
        (
            "WRITE (10)",
            cdb10(0x2a, 0, 0, 1).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE (12)",
            cdb12(0xaa, 0, 0, 1).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE (16)",
            cdb16(0x8a, 0, 0, 1).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE AND VERIFY (10)",
            cdb10(0x2e, 0, 0, 1).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE AND VERIFY (12)",
            cdb12(0xae, 0, 0, 1).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE AND VERIFY (16)",
            cdb16(0x8e, 0, 0, 1).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE SAME (10)",
            cdb10(0x41, 0, 0, 2).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE SAME (10) UNMAP",
            cdb10(0x41, 0x08, 0, 2).to_vec(),
            Some(vec![0; bs]),
        ),
        (
            "WRITE SAME (16)",
            cdb16(0x93, 0, 0, 2).to_vec(),
            Some(block.clone()),
        ),
        (
            "WRITE SAME (16) UNMAP",
            cdb16(0x93, 0x08, 0, 2).to_vec(),
            Some(vec![0; bs]),
        ),
        ("UNMAP", cdb10(0x42, 0, 0, 24).to_vec(), Some(unmap)),
        ("COMPARE AND WRITE", caw(0, 1, 0).to_vec(), Some(caw_data)),
        ("ORWRITE", orwrite(0, 1, 0).to_vec(), Some(block.clone())),
        ("EXTENDED COPY", xcopy_cdb(copy.len()).to_vec(), Some(copy)),
    ]
}

/// Software write protect on a thin LUN of `bs`-byte blocks: set with MODE SELECT, every
/// command that would change the medium refused, reads and the rest served, other nexuses
/// told, and cleared again.
async fn write_protect(bs: usize) {
    let f = Fixture::ready_bs(true, 100, bs).await;
    let lu = f.lun();
    let other = nexus("iqn.i2", 2);
    assert_eq!(
        check(&f.run_on(&other, 0, &[0; 6], None).await),
        codes::RESET_OCCURRED
    );
    // SWP is the one changeable bit of the control page.
    let ch = good(&f.run(&control_page(0x40), None).await);
    assert_eq!(&ch[4..6], &[0x0a, 0x0a]);
    for (i, &b) in ch.iter().enumerate().skip(6) {
        assert_eq!(b, if i == 8 { 0x08 } else { 0 }, "changeable byte {i}");
    }
    let data: Vec<u8> = (0..4 * bs).map(|i| (i % 251) as u8).collect();
    good(&f.run(&cdb10(0x2a, 0, 0, 4), Some(data.clone())).await);

    good(&select_swp(&f, &f.n, true).await);
    assert!(f.lun().write_protected);
    // The nexus that set it gets no unit attention; WP shows in both headers, SWP in the page.
    good(&f.run(&[0; 6], None).await);
    let d = good(&f.run(&control_page(0x00), None).await);
    assert_eq!((d[2], d[8] & 0x08), (0x90, 0x08));
    let d = good(
        &f.run(&[0x5a, 0x08, 0x3f, 0, 0, 0, 0, 0, 255, 0], None)
            .await,
    );
    assert_eq!(d[3], 0x90);
    // Another nexus hears MODE PARAMETERS CHANGED, once.
    assert_eq!(
        check(&f.run_on(&other, 0, &[0; 6], None).await),
        codes::MODE_PARAMETERS_CHANGED
    );
    good(&f.run_on(&other, 0, &[0; 6], None).await);

    let block = vec![0xeeu8; bs];
    let refused = medium_changers(bs, &lu, &data[..bs]);
    for (name, cdb, data_out) in &refused {
        for n in [&f.n, &other] {
            assert_eq!(
                asc(&f.run_on(n, 0, cdb, data_out.clone()).await),
                (key::DATA_PROTECT, 0x27, 0x02),
                "{name}"
            );
        }
    }
    // Reads and the commands that do not change the medium run.
    for cdb in [
        vec![0x08, 0, 0, 0, 4, 0],
        cdb10(0x28, 0, 0, 4).to_vec(),
        cdb12(0xa8, 0, 0, 4).to_vec(),
        cdb16(0x88, 0, 0, 4).to_vec(),
    ] {
        assert_eq!(good(&f.run(&cdb, None).await), data, "{cdb:02x?}");
    }
    good(&f.run(&cdb10(0x2f, 0, 0, 4), None).await); // VERIFY (10)
    good(&f.run(&cdb10(0x35, 0, 0, 0), None).await); // SYNCHRONIZE CACHE (10)
    good(&f.run(&cdb10(0x34, 0, 0, 4), None).await); // PRE-FETCH (10)
    good(&f.run(&cdb16(0x9e, 0x12, 0, 24), None).await); // GET LBA STATUS
    good(&f.run(&[0x5e, 0x00, 0, 0, 0, 0, 0, 0, 64, 0], None).await); // PR IN
    good(&f.run(&pr_out(0x00, 0), Some(pr_params(0, 0xa))).await); // PR OUT REGISTER
    good(&f.run(&pr_out(0x00, 0), Some(pr_params(0xa, 0))).await);
    // Nothing the refused commands carried reached the medium.
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 0, 4), None).await), data);
    assert!(!f.mem.is_mapped(&lu.uuid, 50));

    // Cleared through the other nexus: writes work again, and the first nexus is told.
    good(&select_swp(&f, &other, false).await);
    assert!(!f.lun().write_protected);
    assert_eq!(
        check(&f.run(&[0; 6], None).await),
        codes::MODE_PARAMETERS_CHANGED
    );
    let d = good(&f.run(&control_page(0x00), None).await);
    assert_eq!((d[2], d[8] & 0x08), (0x10, 0));
    good(&f.run(&cdb10(0x2a, 0, 1, 1), Some(block.clone())).await);
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 1, 1), None).await), block);
    // Selecting the value SWP already has changes nothing and tells nobody.
    good(&select_swp(&f, &f.n, false).await);
    good(&f.run_on(&other, 0, &[0; 6], None).await);
}

#[tokio::test]
async fn test_execute_write_protect() {
    write_protect(BS).await;
}

#[tokio::test]
async fn test_execute_write_protect_512() {
    write_protect(512).await;
}

#[tokio::test]
async fn test_execute_write_protect_backend_failure_changes_nothing() {
    let f = Fixture::ready(false, 100).await;
    f.mem.set_faults(Faults {
        write: Some(BackendError::NotReady("no quorum".into())),
        ..Faults::default()
    });
    // Reported like any backend failure of a write.
    assert_eq!(
        check(&select_swp(&f, &f.n, true).await),
        codes::PORT_UNAVAILABLE
    );
    f.mem.set_faults(Faults::default());
    assert!(!f.lun().write_protected);
    good(&f.run(&cdb10(0x2a, 0, 0, 1), Some(vec![1; BS])).await);
    // Any other change of the control page is refused as before, SWP or not.
    let mut p = good(&f.run(&control_page(0x00), None).await);
    p[0] = 0;
    p[2] = 0;
    p[8] |= 0x08 | 0x40; // SWP and RAC
    assert_eq!(
        check(&f.run(&[0x15, 0x10, 0, 0, p.len() as u8, 0], Some(p)).await),
        codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(8, None)
    );
    assert!(!f.lun().write_protected);
}

#[tokio::test]
async fn test_execute_xcopy_refused_into_write_protected_lun() {
    let f = Fixture::ready(true, 100).await;
    f.mem.add_lun(T, lun_info(1, 100, true));
    assert_eq!(check(&f.run(&[0; 6], None).await), codes::LUNS_CHANGED);
    let (a, b) = (f.lun(), f.mem.luns(T)[1].clone());
    let data = vec![0x5au8; BS];
    good(&f.run(&cdb10(0x2a, 0, 0, 1), Some(data.clone())).await);
    f.mem.set_write_protect(&b, true).await.unwrap();
    // Sent to the writable LUN 0, copying into the protected LUN 1: refused.
    let p = xcopy_list(1, 0, &[(&a, 4096), (&b, 4096)], &[(0, 1, 1, 0, 0)]);
    assert_eq!(
        asc(&f.run(&xcopy_cdb(p.len()), Some(p)).await),
        (key::DATA_PROTECT, 0x27, 0x02)
    );
    assert!(!f.mem.is_mapped(&b.uuid, 0));
    // Out of the protected LUN into the writable one: a read of LUN 1 only.
    assert_eq!(
        check(&f.run_on(&f.n, 1, &[0; 6], None).await),
        codes::RESET_OCCURRED
    );
    let p = xcopy_list(2, 0, &[(&b, 4096), (&a, 4096)], &[(0, 1, 1, 0, 5)]);
    good(&f.run_on(&f.n, 1, &xcopy_cdb(p.len()), Some(p)).await);
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 5, 1), None).await), vec![0; BS]);
}

/// The initiator group the write fence tests fence: hosts named `iqn.2024-01.test:host-<n>`.
const HOSTS: &str = "iqn.2024-01.test:host-";

/// A fence on [`HOSTS`] letting `allowed` (names of the group) write.
fn host_fence(allowed: &[&Nexus]) -> WriteFence {
    WriteFence {
        prefix: HOSTS.into(),
        allowed: allowed.iter().map(|n| n.initiator.clone()).collect(),
    }
}

/// Runs TEST UNIT READY through `n` on `lun` until it is GOOD (clearing the unit attentions
/// of a new nexus).
async fn settle(f: &Fixture, n: &Nexus, lun: u64) {
    for _ in 0..4 {
        if f.run_on(n, lun, &[0; 6], None).await.status == status::GOOD {
            return;
        }
    }
    panic!("unit attentions keep coming for {}", n.initiator);
}

/// A write fence on a thin LUN of `bs`-byte blocks: a host of the fenced group that is not
/// allowed gets RESERVATION CONFLICT for every command that would change the medium, and
/// nothing changes; it still reads, verifies, flushes and uses reservations. The allowed host
/// and an initiator outside the group write. Removing the fence lets the host write again.
async fn write_fence(bs: usize) {
    let f = Fixture::ready_bs(true, 100, bs).await;
    let lu = f.lun();
    let owner = nexus("iqn.2024-01.test:host-2", 2);
    let stale = nexus("iqn.2024-01.test:host-1", 3);
    let outsider = &f.n; // iqn.i1: not a name of the group
    for n in [&owner, &stale] {
        settle(&f, n, 0).await;
    }
    let data: Vec<u8> = (0..4 * bs).map(|i| (i % 251) as u8).collect();
    good(
        &f.run_on(&stale, 0, &cdb10(0x2a, 0, 0, 4), Some(data.clone()))
            .await,
    );

    f.mem.set_write_fence(T, 0, Some(host_fence(&[&owner])));
    // Not a unit attention: the fence is no mode parameter, and the LUN stays visible.
    for n in [&owner, &stale, outsider] {
        good(&f.run_on(n, 0, &[0; 6], None).await);
    }

    for (name, cdb, data_out) in medium_changers(bs, &lu, &data[..bs]) {
        let r = f.run_on(&stale, 0, &cdb, data_out).await;
        assert_eq!(r.status, status::RESERVATION_CONFLICT, "{name}: {r:?}");
        assert!(r.sense.is_none(), "{name}");
    }
    // A name differing only in case is the same iSCSI name.
    let upper = nexus(&stale.initiator.to_ascii_uppercase(), 4);
    settle(&f, &upper, 0).await;
    let r = f
        .run_on(&upper, 0, &cdb10(0x2a, 0, 0, 1), Some(vec![1; bs]))
        .await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    // Nothing the refused commands carried reached the medium.
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 0, 4), None).await), data);
    assert!(!f.mem.is_mapped(&lu.uuid, 50));

    // The fenced host still reads and runs every command that does not change the medium.
    for cdb in [
        vec![0x08, 0, 0, 0, 4, 0],
        cdb10(0x28, 0, 0, 4).to_vec(),
        cdb12(0xa8, 0, 0, 4).to_vec(),
        cdb16(0x88, 0, 0, 4).to_vec(),
    ] {
        assert_eq!(
            good(&f.run_on(&stale, 0, &cdb, None).await),
            data,
            "{cdb:02x?}"
        );
    }
    good(&f.run_on(&stale, 0, &cdb10(0x2f, 0, 0, 4), None).await); // VERIFY (10)
    good(&f.run_on(&stale, 0, &cdb10(0x35, 0, 0, 0), None).await); // SYNCHRONIZE CACHE
    good(&f.run_on(&stale, 0, &cdb16(0x9e, 0x12, 0, 24), None).await); // GET LBA STATUS
    good(&f.run_on(&stale, 0, &control_page(0x00), None).await); // MODE SENSE
    good(
        &f.run_on(&stale, 0, &pr_out(0x00, 0), Some(pr_params(0, 0xb)))
            .await,
    );
    good(
        &f.run_on(&stale, 0, &pr_out(0x00, 0), Some(pr_params(0xb, 0)))
            .await,
    );

    // The allowed host and an initiator outside the group run every one of them.
    for n in [&owner, outsider] {
        for i in 0.. {
            let now = good(&f.run_on(n, 0, &cdb10(0x28, 0, 0, 1), None).await);
            let mut all = medium_changers(bs, &lu, &now);
            if i == all.len() {
                break;
            }
            let (name, cdb, data_out) = all.swap_remove(i);
            let r = f.run_on(n, 0, &cdb, data_out).await;
            assert_eq!(r.status, status::GOOD, "{name} by {}: {r:?}", n.initiator);
        }
    }
    assert!(f.mem.is_mapped(&lu.uuid, 50), "the copies landed");

    // Without the fence the host writes again.
    f.mem.set_write_fence(T, 0, None);
    good(
        &f.run_on(&stale, 0, &cdb10(0x2a, 0, 0, 1), Some(vec![9; bs]))
            .await,
    );
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 0, 1), None).await), vec![9; bs]);
}

#[tokio::test]
async fn test_execute_write_fence() {
    write_fence(BS).await;
}

#[tokio::test]
async fn test_execute_write_fence_512() {
    write_fence(512).await;
}

#[tokio::test]
async fn test_execute_write_fence_empty_group_refuses_every_host() {
    let f = Fixture::ready(true, 100).await;
    let host = nexus("iqn.2024-01.test:host-7", 2);
    settle(&f, &host, 0).await;
    f.mem.set_write_fence(T, 0, Some(host_fence(&[])));
    let r = f
        .run_on(&host, 0, &cdb16(0x8a, 0, 0, 1), Some(vec![1; BS]))
        .await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    good(&f.run(&cdb16(0x8a, 0, 0, 1), Some(vec![1; BS])).await);
}

/// The fence comes before software write protect: a fenced host gets RESERVATION CONFLICT
/// on a write-protected LUN, the allowed host and outsiders DATA PROTECT; and after the
/// reservation check: a host allowed by the fence is still bound by reservations.
#[tokio::test]
async fn test_execute_write_fence_before_swp_after_reservations() {
    let f = Fixture::ready(true, 100).await;
    let lu = f.lun();
    let owner = nexus("iqn.2024-01.test:host-2", 2);
    let stale = nexus("iqn.2024-01.test:host-1", 3);
    for n in [&owner, &stale] {
        settle(&f, n, 0).await;
    }
    f.mem.set_write_fence(T, 0, Some(host_fence(&[&owner])));
    f.mem.set_write_protect(&lu, true).await.unwrap();
    for n in [&owner, &stale, &f.n] {
        assert_eq!(
            check(&f.run_on(n, 0, &[0; 6], None).await),
            codes::MODE_PARAMETERS_CHANGED
        );
    }
    let write = cdb10(0x2a, 0, 0, 1);
    let r = f.run_on(&stale, 0, &write, Some(vec![1; BS])).await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT, "{r:?}");
    for n in [&owner, &f.n] {
        assert_eq!(
            check(&f.run_on(n, 0, &write, Some(vec![1; BS])).await),
            codes::SOFTWARE_WRITE_PROTECTED
        );
    }
    f.mem.set_write_protect(&lu, false).await.unwrap();
    for n in [&owner, &stale, &f.n] {
        settle(&f, n, 0).await;
    }
    // The outsider reserves (SPC-2 RESERVE): the owner's write conflicts although the fence
    // lets it through.
    good(&f.run(&[0x16, 0, 0, 0, 0, 0], None).await);
    let r = f.run_on(&owner, 0, &write, Some(vec![1; BS])).await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    good(&f.run(&[0x17, 0, 0, 0, 0, 0], None).await);
    good(&f.run_on(&owner, 0, &write, Some(vec![1; BS])).await);
}

/// EXTENDED COPY writes its destination: a fenced host cannot copy into a fenced LUN
/// (whichever LUN the command is sent to), but may copy out of one.
#[tokio::test]
async fn test_execute_xcopy_write_fence() {
    let f = Fixture::ready(true, 100).await;
    f.mem.add_lun(T, lun_info(1, 100, true));
    let (a, b) = (f.lun(), f.mem.luns(T)[1].clone());
    let owner = nexus("iqn.2024-01.test:host-2", 2);
    let stale = nexus("iqn.2024-01.test:host-1", 3);
    settle(&f, &f.n, 0).await; // REPORTED LUNS DATA HAS CHANGED
    for n in [&owner, &stale] {
        settle(&f, n, 0).await;
        settle(&f, n, 1).await;
    }
    let data = vec![0x5au8; BS];
    good(
        &f.run_on(&stale, 1, &cdb10(0x2a, 0, 0, 1), Some(data.clone()))
            .await,
    );
    f.mem.set_write_fence(T, 1, Some(host_fence(&[&owner])));

    // Sent to the unfenced LUN 0, copying into the fenced LUN 1; sent to LUN 1, within it.
    let into = xcopy_list(1, 0, &[(&a, 4096), (&b, 4096)], &[(0, 1, 1, 0, 7)]);
    let within = xcopy_list(2, 0, &[(&b, 4096)], &[(0, 0, 1, 0, 8)]);
    for (lun, p) in [(0, &into), (1, &within)] {
        let r = f
            .run_on(&stale, lun, &xcopy_cdb(p.len()), Some(p.clone()))
            .await;
        assert_eq!(
            r.status,
            status::RESERVATION_CONFLICT,
            "sent to LUN {lun}: {r:?}"
        );
    }
    assert!(!f.mem.is_mapped(&b.uuid, 7) && !f.mem.is_mapped(&b.uuid, 8));
    // Out of the fenced LUN into LUN 0: a read of LUN 1 only.
    let out = xcopy_list(3, 0, &[(&b, 4096), (&a, 4096)], &[(0, 1, 1, 0, 5)]);
    good(&f.run_on(&stale, 1, &xcopy_cdb(out.len()), Some(out)).await);
    assert_eq!(good(&f.run(&cdb10(0x28, 0, 5, 1), None).await), data);
    // The allowed host copies into it.
    for (lun, p) in [(0, into), (1, within)] {
        good(&f.run_on(&owner, lun, &xcopy_cdb(p.len()), Some(p)).await);
    }
    assert!(f.mem.is_mapped(&b.uuid, 7) && f.mem.is_mapped(&b.uuid, 8));
}
