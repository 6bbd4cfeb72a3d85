//! Allocation queries through the extent map: a node writes, discards a range, and asks which
//! parts of a disk hold data on the shared device file (`lseek` `SEEK_DATA` / `SEEK_HOLE`).
//! Disk 1 of the rig spans two extents, so runs are checked across the extent boundary.
//! Needs O_DIRECT and hole punching on the temp directory's filesystem; prints a skip line
//! when either is missing.

mod common;

use common::{VOL, pattern, rig};
use csvd_csv_fs::engine::BufSlice;
use csvd_csv_fs::node::IoError;
use csvd_raft::volume::ALLOCATION_UNIT;

const B: u64 = 4096;

#[tokio::test]
async fn test_allocation_reports_discarded_holes_across_extents() {
    let Some(mut rig) = rig().await else { return };
    let a = &rig.nodes[0];
    let size = 3 * ALLOCATION_UNIT;
    // Disk 1's first extent ends at ALLOCATION_UNIT; write 64 KiB on each side of it.
    let at = ALLOCATION_UNIT - 64 * 1024;
    a.write(1, at, BufSlice::from(pattern(3, 128 << 10)), true)
        .await
        .unwrap();
    let (allocated, run) = a.allocation(1, at, size - at).await.unwrap();
    if !allocated {
        eprintln!("skip: the temp directory's filesystem does not report holes");
        return;
    }
    assert_eq!(run, 128 << 10, "data runs across the extent boundary");
    // Nothing was ever written before it: a hole up to the data.
    assert_eq!(a.allocation(1, 0, size).await.unwrap(), (false, at));
    assert_eq!(
        a.allocation(1, at + (128 << 10), size - at - (128 << 10))
            .await
            .unwrap(),
        (false, size - at - (128 << 10)),
        "a hole to the end of the disk"
    );

    // Discard 16 KiB on each side of the boundary: the data now ends at the hole, which runs
    // into the second extent.
    let hole = ALLOCATION_UNIT - 4 * B;
    a.discard(1, hole, 8 * B).await.unwrap();
    assert_eq!(
        a.allocation(1, at, size - at).await.unwrap(),
        (true, hole - at)
    );
    assert_eq!(
        a.allocation(1, hole, size - hole).await.unwrap(),
        (false, 8 * B)
    );
    assert_eq!(
        a.allocation(1, ALLOCATION_UNIT, size - ALLOCATION_UNIT)
            .await
            .unwrap(),
        (false, 4 * B),
        "from the second extent's first block"
    );
    // Clamped to the length asked about.
    assert_eq!(a.allocation(1, hole, 2 * B).await.unwrap(), (false, 2 * B));
    assert_eq!(
        a.allocation(1, hole + 8 * B, 4 * B).await.unwrap(),
        (true, 4 * B)
    );

    // 512-byte sectors take their block's status: the run counts from the sector.
    assert_eq!(
        a.allocation(1, hole + 512, size - hole - 512)
            .await
            .unwrap(),
        (false, 8 * B - 512)
    );
    assert_eq!(
        a.allocation(1, hole + 8 * B + 1536, 1024).await.unwrap(),
        (true, 1024)
    );

    // A discard of sectors zeroes partial blocks (they stay allocated) and deallocates the
    // whole blocks between them.
    let data = ALLOCATION_UNIT + 8 * B;
    a.discard(1, data + 512, 2 * B).await.unwrap();
    assert_eq!(a.allocation(1, data, size - data).await.unwrap(), (true, B));
    assert_eq!(
        a.allocation(1, data + B, size - data - B).await.unwrap(),
        (false, B)
    );
    assert_eq!(
        a.allocation(1, data + 2 * B, size - data - 2 * B)
            .await
            .unwrap(),
        (true, 6 * B),
        "the block holding the discard's tail stays allocated, up to the end of the write"
    );

    // A node redirected by request still has its device and asks it; a node without a path
    // answers that the whole range is allocated.
    rig.set_redirected(2, true).await;
    let b = &rig.nodes[1];
    assert_eq!(b.allocation(1, hole, 8 * B).await.unwrap(), (false, 8 * B));
    b.detach(VOL, "test: the path is gone".into()).await;
    assert_eq!(b.allocation(1, hole, 8 * B).await.unwrap(), (true, 8 * B));
}

#[tokio::test]
async fn test_allocation_refuses_bad_ranges() {
    let Some(rig) = rig().await else { return };
    let n = &rig.nodes[0];
    let size = 3 * ALLOCATION_UNIT;
    assert!(matches!(
        n.allocation(1, size - B, 2 * B).await,
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        n.allocation(1, 100, 512).await,
        Err(IoError::Unaligned(_))
    ));
    assert!(matches!(
        n.allocation(1, 0, 0).await,
        Err(IoError::BadRequest(_))
    ));
    assert!(matches!(
        n.allocation(9, 0, B).await,
        Err(IoError::NoSuchDisk(9))
    ));
}
