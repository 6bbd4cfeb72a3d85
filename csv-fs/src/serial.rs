//! Operations serialized at a volume's coordinator: COMPARE AND WRITE, and writes of 512-byte
//! sectors that do not cover whole 4 KiB blocks.
//!
//! csv-fs does direct I/O in whole [`ALIGN`]-byte blocks, and nodes write to the shared device
//! independently. Two operations need more than that:
//! - **compare-and-write** (SCSI COMPARE AND WRITE, the basis of VMware ATS and of cluster
//!   filesystems' on-disk locks): compare a range with expected bytes and write new bytes only
//!   if they are equal. Two nodes racing on one range must never both succeed.
//! - **sub-block writes**: a LUN with 512-byte logical blocks sends writes that start or end
//!   inside a 4 KiB block; the block must be read, patched and written back, and two such
//!   writes into one block from two nodes must not lose either's bytes.
//!
//! Both run at the volume's coordinator, one at a time per 4 KiB block: every node (the
//! coordinator included) sends them there, and the coordinator runs each under an exclusive
//! range lock (`range_lock`) on the blocks it touches: read the covering blocks, compare
//! or patch, write the covering blocks. See [`crate::node::CsvNode::compare_and_write`] and
//! [`crate::node::CsvNode::write_partial`] for the guarantees and their limits.
//!
//! This module holds the request types, the pure range arithmetic and the read-modify-write
//! itself (on a device, through a disk's extent map).

use std::io;

use csvd_raft::volume::DiskRecord;

use crate::device::BlockDevice;
use crate::engine::{ALIGN, AlignedBuf, BufSlice};
use crate::node::{IoError, IoReply, IoRequest, direct};
use crate::wire::{MAX_COMPARE, MAX_PAYLOAD};

/// The unit of compare-and-write, sub-block writes and sub-block discards: offsets and lengths
/// are multiples of it.
pub const SECTOR: u64 = 512;

const BLOCK: u64 = ALIGN as u64;

/// What a compare-and-write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    /// The data compared equal and the new data was written (also what a plain write that
    /// went through this path returns).
    Written,
    /// The data differed; nothing was written.
    Miscompare {
        /// Offset of the first differing byte within the compared range.
        offset: u64,
    },
}

/// An operation the coordinator runs under an exclusive lock on the blocks it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialRequest {
    /// Compare `compare` with the data at `offset`; only if equal, write `data` there.
    CompareAndWrite {
        /// Offset in the disk, a multiple of [`SECTOR`].
        offset: u64,
        /// The expected bytes; a multiple of [`SECTOR`], at most [`MAX_COMPARE`].
        compare: Vec<u8>,
        /// The new bytes, as long as `compare`.
        data: Vec<u8>,
        /// Durable on completion.
        fua: bool,
    },
    /// Write `data` at `offset`, patching the covering blocks (read-modify-write).
    WritePartial {
        /// Offset in the disk, a multiple of [`SECTOR`].
        offset: u64,
        /// The bytes; a multiple of [`SECTOR`], at most [`MAX_PAYLOAD`].
        data: Vec<u8>,
        /// Durable on completion.
        fua: bool,
    },
}

impl SerialRequest {
    /// Where the request starts.
    pub fn offset(&self) -> u64 {
        match self {
            SerialRequest::CompareAndWrite { offset, .. }
            | SerialRequest::WritePartial { offset, .. } => *offset,
        }
    }

    /// Bytes written (and, for a compare-and-write, compared).
    pub fn len(&self) -> u64 {
        self.data().len() as u64
    }

    /// Whether the request carries no data (never valid).
    pub fn is_empty(&self) -> bool {
        self.data().is_empty()
    }

    /// The bytes to write.
    pub fn data(&self) -> &[u8] {
        match self {
            SerialRequest::CompareAndWrite { data, .. }
            | SerialRequest::WritePartial { data, .. } => data,
        }
    }

    /// Whether the write is durable on completion.
    pub fn fua(&self) -> bool {
        match self {
            SerialRequest::CompareAndWrite { fua, .. }
            | SerialRequest::WritePartial { fua, .. } => *fua,
        }
    }

    /// Whether this is a compare-and-write, which is never run twice (see
    /// [`crate::node::CsvNode::compare_and_write`]).
    pub fn is_compare(&self) -> bool {
        matches!(self, SerialRequest::CompareAndWrite { .. })
    }

    /// Checks what can be checked without the disk: lengths, alignment to [`SECTOR`],
    /// limits. Bounds are checked against the disk by the caller.
    pub fn check(&self) -> Result<(), IoError> {
        let (offset, len) = (self.offset(), self.len());
        if let SerialRequest::CompareAndWrite { compare, data, .. } = self
            && compare.len() != data.len()
        {
            return Err(IoError::BadRequest(format!(
                "a compare-and-write needs as many bytes to compare as to write ({} and {})",
                compare.len(),
                data.len()
            )));
        }
        if len == 0 {
            return Err(IoError::BadRequest("an I/O of 0 bytes".into()));
        }
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(IoError::Unaligned(format!(
                "offset {offset} and length {len} must each be a multiple of {SECTOR} bytes"
            )));
        }
        let (max, what) = if self.is_compare() {
            (MAX_COMPARE, "a compare-and-write")
        } else {
            (MAX_PAYLOAD, "a write")
        };
        if len > max {
            return Err(IoError::BadRequest(format!(
                "{len} bytes is over the {max}-byte limit of {what}"
            )));
        }
        if offset.checked_add(len).is_none() {
            return Err(IoError::BadRequest(format!(
                "an I/O at {offset}+{len} runs past the largest offset"
            )));
        }
        Ok(())
    }
}

/// The whole blocks covering `offset..offset + len`, as `(start, end)`.
pub(crate) fn covering(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / BLOCK * BLOCK;
    let end = (offset + len).div_ceil(BLOCK) * BLOCK;
    (start, end)
}

/// Whether `offset..offset + len` is made of whole blocks.
pub(crate) fn whole_blocks(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK)
}

/// Splits `offset..offset + len` into pieces `(offset, len)`, in order: a partial head block,
/// the whole blocks, a partial tail block (each present only if non-empty). A range inside
/// partial blocks only (no whole block in it) stays one piece.
pub(crate) fn split_blocks(offset: u64, len: u64) -> Vec<(u64, u64)> {
    let end = offset + len;
    let first_whole = offset.next_multiple_of(BLOCK);
    let last_whole = end / BLOCK * BLOCK;
    if first_whole >= last_whole {
        return vec![(offset, len)];
    }
    let mut out = Vec::with_capacity(3);
    if offset < first_whole {
        out.push((offset, first_whole - offset));
    }
    out.push((first_whole, last_whole - first_whole));
    if last_whole < end {
        out.push((last_whole, end - last_whole));
    }
    out
}

/// Offset of the first byte where `a` and `b` differ (compared over the shorter of the two).
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// How a read-modify-write failed on the device.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The write had been issued: the covering blocks may hold old data, new data, or (if the
    /// device tore the write) some of each.
    pub written: bool,
    /// The device's error.
    pub error: io::Error,
}

fn before_write(error: io::Error) -> Failure {
    Failure {
        written: false,
        error,
    }
}

/// Runs a checked, in-bounds request on `dev` through `rec`'s extent map: reads what it needs
/// of the covering blocks, compares, patches and writes them. The caller holds the exclusive
/// range lock on the covering blocks.
pub(crate) async fn run<D: BlockDevice>(
    dev: &D,
    rec: &DiskRecord,
    req: &SerialRequest,
) -> Result<CompareResult, Failure> {
    let (offset, len) = (req.offset(), req.len());
    let (start, end) = covering(offset, len);
    let read = |at: u64, n: u64| async move {
        match direct(dev, rec, &IoRequest::Read { offset: at, len: n }).await {
            Ok(IoReply::Data(d)) => Ok(d),
            Ok(IoReply::Done) => Err(io::Error::other("a read returned no data")),
            Err(e) => Err(e),
        }
    };
    let mut buf = match req {
        // The whole range is compared: read all of it.
        SerialRequest::CompareAndWrite { .. } => read(start, end - start).await,
        // Only the bytes the data does not cover: the partial head and tail blocks.
        SerialRequest::WritePartial { .. } => {
            let head = offset != start;
            let tail = offset + len != end && (end - BLOCK != start || !head);
            let mut buf =
                AlignedBuf::for_overwrite((end - start) as usize).map_err(before_write)?;
            let (h, t) = futures::try_join!(
                async {
                    if head {
                        read(start, BLOCK).await.map(Some)
                    } else {
                        Ok(None)
                    }
                },
                async {
                    if tail {
                        read(end - BLOCK, BLOCK).await.map(Some)
                    } else {
                        Ok(None)
                    }
                },
            )
            .map_err(before_write)?;
            let n = buf.len();
            if let Some(h) = h {
                buf[..ALIGN].copy_from_slice(&h);
            }
            if let Some(t) = t {
                buf[n - ALIGN..].copy_from_slice(&t);
            }
            Ok(buf)
        }
    }
    .map_err(before_write)?;
    let at = (offset - start) as usize;
    let range = at..at + len as usize;
    if let SerialRequest::CompareAndWrite { compare, .. } = req
        && let Some(i) = first_difference(&buf[range.clone()], compare)
    {
        return Ok(CompareResult::Miscompare { offset: i as u64 });
    }
    buf[range].copy_from_slice(req.data());
    let write = IoRequest::Write {
        offset: start,
        data: BufSlice::from(buf),
        fua: req.fua(),
    };
    direct(dev, rec, &write).await.map_err(|error| Failure {
        written: true,
        error,
    })?;
    Ok(CompareResult::Written)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn test_split_blocks_pieces() {
        assert_eq!(split_blocks(0, 8192), vec![(0, 8192)]);
        assert_eq!(split_blocks(512, 1024), vec![(512, 1024)]);
        // Across a block boundary but with no whole block: one piece.
        assert_eq!(split_blocks(3584, 1024), vec![(3584, 1024)]);
        assert_eq!(
            split_blocks(512, 8192),
            vec![(512, 3584), (4096, 4096), (8192, 512)]
        );
        assert_eq!(split_blocks(4096, 4608), vec![(4096, 4096), (8192, 512)]);
        assert_eq!(split_blocks(3584, 4608), vec![(3584, 512), (4096, 4096)]);
    }

    #[test]
    fn test_covering_blocks() {
        assert_eq!(covering(0, 4096), (0, 4096));
        assert_eq!(covering(512, 512), (0, 4096));
        assert_eq!(covering(3584, 1024), (0, 8192));
        assert!(whole_blocks(8192, 4096) && !whole_blocks(8192, 512));
    }

    #[test]
    fn test_first_difference_finds_the_first_byte() {
        assert_eq!(first_difference(b"abcd", b"abcd"), None);
        assert_eq!(first_difference(b"abcd", b"abxd"), Some(2));
        assert_eq!(first_difference(b"xbcd", b"abcx"), Some(0));
    }

    #[test]
    fn test_serial_request_checks() {
        let caw = |offset: u64, c: usize, d: usize| SerialRequest::CompareAndWrite {
            offset,
            compare: vec![0; c],
            data: vec![0; d],
            fua: false,
        };
        let partial = |offset: u64, n: usize| SerialRequest::WritePartial {
            offset,
            data: vec![0; n],
            fua: false,
        };
        assert_eq!(caw(512, 512, 512).check(), Ok(()));
        assert_eq!(partial(1536, 2560).check(), Ok(()));
        assert!(
            matches!(caw(0, 512, 1024).check(), Err(IoError::BadRequest(m)) if m.contains("512 and 1024"))
        );
        assert!(matches!(caw(0, 0, 0).check(), Err(IoError::BadRequest(_))));
        assert!(
            matches!(caw(100, 512, 512).check(), Err(IoError::Unaligned(m)) if m.contains("multiple of 512"))
        );
        assert!(matches!(
            partial(0, 100).check(),
            Err(IoError::Unaligned(_))
        ));
        let big = MAX_COMPARE as usize + 512;
        assert!(
            matches!(caw(0, big, big).check(), Err(IoError::BadRequest(m)) if m.contains("limit"))
        );
        assert!(matches!(
            partial(u64::MAX - 511, 1024).check(),
            Err(IoError::BadRequest(_))
        ));
    }

    proptest! {
        /// The pieces tile the range in order; every piece but a lone one that fits in
        /// partial blocks is either whole blocks or inside one block.
        #[test]
        fn test_split_blocks_tiles_the_range(first in 0u64..64, sectors in 1u64..64) {
            let (offset, len) = (first * SECTOR, sectors * SECTOR);
            let pieces = split_blocks(offset, len);
            let mut at = offset;
            for &(o, l) in &pieces {
                prop_assert_eq!(o, at);
                prop_assert!(l > 0);
                at += l;
                if pieces.len() > 1 {
                    let (s, e) = covering(o, l);
                    prop_assert!(whole_blocks(o, l) || e - s == BLOCK);
                }
            }
            prop_assert_eq!(at, offset + len);
            prop_assert!(pieces.iter().filter(|&&(o, l)| whole_blocks(o, l)).count() <= 1);
        }
    }
}
