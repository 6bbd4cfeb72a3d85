//! SBC-3 block commands: reads, writes, verification, WRITE SAME, UNMAP, COMPARE AND WRITE,
//! ORWRITE, SYNCHRONIZE CACHE and GET LBA STATUS.
//!
//! Every LBA and length is in logical blocks of the LUN ([`LunInfo::block_size`], 512 or
//! 4096 bytes) and turned into byte offsets for the backend here.
//!
//! Data-Out shorter than the CDB asks for (the Expected Data Transfer Length is smaller than
//! the SCSI transfer length) is processed as far as it goes when it holds whole blocks, as
//! FCP-4 and iSCSI allow: the blocks it carries are written and the iSCSI layer reports the
//! overflow. A partial block cannot be written and gets INVALID FIELD IN COMMAND
//! INFORMATION UNIT. Data-Out longer than needed is used up to the transfer length.

use super::cdb::{self, BlockRange, Op, be16, be32, be64};
use super::limits;
use super::sense::{Sense, codes};
use super::{DataIn, Failure, Scsi, backend_sense};
use crate::backend::{Backend, CompareOutcome, LunInfo, Provisioning};

/// Bytes per buffer when WRITE SAME replicates a non-zero block (1 MiB).
const WRITE_SAME_CHUNK_BYTES: u64 = 1 << 20;

/// The length of an optional Data-Out buffer.
fn len_of<T: AsRef<[u8]>>(data: &Option<T>) -> u64 {
    data.as_ref().map_or(0, |d| d.as_ref().len() as u64)
}

/// How many of the `wanted` blocks of `bs` bytes the Data-Out carries: all of them, or the
/// whole blocks of a shorter buffer; a partial block is an error.
fn usable_blocks(have: u64, wanted: u64, bs: u64) -> Result<u64, Sense> {
    if have >= wanted * bs {
        Ok(wanted)
    } else if have.is_multiple_of(bs) {
        Ok(have / bs)
    } else {
        Err(codes::INVALID_FIELD_IN_IU)
    }
}

/// The byte offset of the first difference between `a` and `b`.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

impl<B: Backend> Scsi<B> {
    /// A buffer holding exactly the first `len` bytes of `data`, without a copy when `data`
    /// is that long already.
    fn exact(&self, data: B::Buf, len: u64) -> B::Buf {
        if data.as_ref().len() as u64 == len {
            return data;
        }
        let len = len as usize;
        let mut buf = self.backend.buffer(len);
        buf.as_mut()[..len].copy_from_slice(&data.as_ref()[..len]);
        buf
    }

    /// READ (6), (10), (12), (16).
    pub(super) async fn read(
        &self,
        lu: &LunInfo,
        op: Op,
        cdb: &[u8],
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r = cdb::block_range(op, cdb);
        let bs = lu.block_bytes();
        cdb::check_transfer(&r, lu.block_size)?;
        cdb::check_range(r.lba, r.blocks, lu.blocks())?;
        if r.blocks == 0 {
            return Ok(DataIn::None);
        }
        let buf = self
            .backend
            .read(lu, r.lba * bs, r.blocks * bs)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        Ok(DataIn::Buf(buf))
    }

    /// WRITE (6), (10), (12), (16) and, with `verify`, WRITE AND VERIFY (10), (12), (16).
    ///
    /// WRITE AND VERIFY writes with FUA; with BYTCHK it reads the blocks back and compares
    /// them with the Data-Out.
    pub(super) async fn write(
        &self,
        lu: &LunInfo,
        op: Op,
        cdb: &[u8],
        data: Option<B::Buf>,
        verify: bool,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r = cdb::block_range(op, cdb);
        if verify && r.bytchk > 1 {
            return Err(cdb::invalid_bit(1, 0x04).into());
        }
        let bs = lu.block_bytes();
        cdb::check_transfer(&r, lu.block_size)?;
        cdb::check_range(r.lba, r.blocks, lu.blocks())?;
        let blocks = usable_blocks(len_of(&data), r.blocks, bs)?;
        let Some(data) = data.filter(|_| blocks > 0) else {
            return Ok(DataIn::None);
        };
        let buf = self.exact(data, blocks * bs);
        let expect = (verify && r.bytchk == 1).then(|| buf.as_ref().to_vec());
        let offset = r.lba * bs;
        self.backend
            .write(lu, offset, buf, r.fua || verify)
            .await
            .map_err(|e| backend_sense(&e, true))?;
        if let Some(expect) = expect {
            let back = self
                .backend
                .read(lu, offset, blocks * bs)
                .await
                .map_err(|e| backend_sense(&e, false))?;
            if let Some(at) = first_difference(back.as_ref(), &expect) {
                return Err(codes::MISCOMPARE.with_information(at as u64).into());
            }
        }
        Ok(DataIn::None)
    }

    /// VERIFY (10), (12), (16): BYTCHK 0 checks the range only (the backend reports failed
    /// reads on read); BYTCHK 1 compares the Data-Out with the blocks; BYTCHK 3 compares one
    /// Data-Out block with each block.
    pub(super) async fn verify(
        &self,
        lu: &LunInfo,
        op: Op,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r = cdb::block_range(op, cdb);
        if r.bytchk == 2 {
            return Err(cdb::invalid_bit(1, 0x04).into());
        }
        let bs = lu.block_bytes();
        if r.bytchk != 0 {
            cdb::check_transfer(&r, lu.block_size)?;
        }
        cdb::check_range(r.lba, r.blocks, lu.blocks())?;
        if r.bytchk == 0 || r.blocks == 0 {
            return Ok(DataIn::None);
        }
        let have = len_of(&data);
        let (blocks, pattern) = if r.bytchk == 3 {
            (
                if usable_blocks(have, 1, bs)? == 1 {
                    r.blocks
                } else {
                    0
                },
                true,
            )
        } else {
            (usable_blocks(have, r.blocks, bs)?, false)
        };
        let Some(data) = data.filter(|_| blocks > 0) else {
            return Ok(DataIn::None);
        };
        let data = data.as_ref();
        let back = self
            .backend
            .read(lu, r.lba * bs, blocks * bs)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        let back = back.as_ref();
        let bsz = bs as usize;
        let diff = if pattern {
            let block = &data[..bsz];
            back.chunks(bsz)
                .enumerate()
                .find_map(|(i, b)| first_difference(b, block).map(|at| i * bsz + at))
        } else {
            first_difference(back, data)
        };
        match diff {
            Some(at) => Err(codes::MISCOMPARE.with_information(at as u64).into()),
            None => Ok(DataIn::None),
        }
    }

    /// SYNCHRONIZE CACHE (10), (16): every completed write becomes durable (a range is
    /// checked, then the whole LUN is flushed).
    pub(super) async fn sync_cache(
        &self,
        lu: &LunInfo,
        op: Op,
        cdb: &[u8],
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r = cdb::block_range(op, cdb);
        cdb::check_range(r.lba, r.blocks, lu.blocks())?;
        self.backend
            .flush(lu)
            .await
            .map_err(|e| backend_sense(&e, true))?;
        Ok(DataIn::None)
    }

    /// WRITE SAME (10), (16).
    ///
    /// With UNMAP on a thin LUN the blocks are deallocated (they read back as zeroes, which
    /// 512-byte LUNs report with LBPRZ, whatever the Data-Out block holds); a fully
    /// provisioned LUN refuses UNMAP.
    /// Otherwise a zero block (or NDOB) writes zeroes, which the backend may
    /// deallocate, and any other block is replicated. A NUMBER OF LOGICAL BLOCKS of zero
    /// means up to the end of the LUN (WSNZ is 0).
    pub(super) async fn write_same(
        &self,
        lu: &LunInfo,
        op: Op,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r: BlockRange = cdb::block_range(op, cdb);
        let unmap = cdb[1] & 0x08 != 0;
        if unmap && !lu.thin {
            // A fully provisioned LUN has nothing to deallocate (LBPWS and LBPWS10 are 0).
            return Err(cdb::invalid_bit(1, 0x08).into());
        }
        let ndob = op == Op::WriteSame16 && cdb[1] & 0x01 != 0;
        let bs = lu.block_bytes();
        let capacity = lu.blocks();
        let count = if r.blocks == 0 {
            if r.lba > capacity {
                return Err(codes::LBA_OUT_OF_RANGE.into());
            }
            capacity - r.lba
        } else {
            r.blocks
        };
        if count > limits::MAX_WRITE_SAME_BLOCKS {
            return Err(cdb::invalid_byte(r.len_byte as usize).into());
        }
        cdb::check_range(r.lba, count, capacity)?;
        let block = if ndob {
            None
        } else {
            match len_of(&data) {
                n if n == bs => data,
                n if n < bs => return Err(codes::INVALID_FIELD_IN_IU.into()),
                _ => return Err(cdb::invalid_byte(r.len_byte as usize).into()),
            }
        };
        if count == 0 {
            return Ok(DataIn::None);
        }
        let (offset, len) = (r.lba * bs, count * bs);
        let zero = block
            .as_ref()
            .is_none_or(|b| b.as_ref().iter().all(|&x| x == 0));
        let done = match block {
            _ if unmap && lu.thin => self.backend.unmap(lu, offset, len).await,
            _ if zero => self.backend.write_zeroes(lu, offset, len).await,
            None => Ok(()),
            Some(block) => self.replicate(lu, r.lba, count, block.as_ref()).await,
        };
        done.map_err(|e| backend_sense(&e, true))?;
        Ok(DataIn::None)
    }

    /// Writes `block` to each of `count` blocks from `lba`.
    async fn replicate(
        &self,
        lu: &LunInfo,
        lba: u64,
        count: u64,
        block: &[u8],
    ) -> Result<(), crate::backend::BackendError> {
        let bs = lu.block_bytes();
        let per_chunk = (WRITE_SAME_CHUNK_BYTES / bs).max(1);
        let mut done = 0;
        while done < count {
            let n = (count - done).min(per_chunk);
            let mut buf = self.backend.buffer((n * bs) as usize);
            for chunk in buf.as_mut().chunks_mut(bs as usize) {
                chunk.copy_from_slice(block);
            }
            self.backend
                .write(lu, (lba + done) * bs, buf, false)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// UNMAP: validates the whole parameter list, then deallocates each range.
    pub(super) async fn unmap(
        &self,
        lu: &LunInfo,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let plen = usize::from(be16(cdb, 7));
        if plen == 0 {
            return Ok(DataIn::None);
        }
        let params = data.as_ref().map(|d| d.as_ref()).unwrap_or(&[]);
        let p = &params[..params.len().min(plen)];
        if p.len() < 8 {
            return Err(codes::PARAMETER_LIST_LENGTH.into());
        }
        let data_len = usize::from(be16(p, 0));
        let desc_len = usize::from(be16(p, 2));
        if data_len + 2 > p.len() || desc_len + 8 > p.len() {
            return Err(codes::PARAMETER_LIST_LENGTH.into());
        }
        // A trailing partial descriptor is ignored (SBC-3, UNMAP parameter list).
        let n = desc_len / 16;
        if n > limits::MAX_UNMAP_DESCRIPTORS as usize {
            return Err(codes::INVALID_FIELD_IN_PARAMETERS
                .in_parameters(2, None)
                .into());
        }
        let capacity = lu.blocks();
        let bs = lu.block_bytes();
        let max_total = u64::from(limits::MAX_UNMAP_BLOCKS);
        let mut total = 0u64;
        for i in 0..n {
            let at = 8 + 16 * i;
            let (lba, count) = (be64(p, at), u64::from(be32(p, at + 8)));
            cdb::check_range(lba, count, capacity)?;
            total += count;
            if total > max_total {
                return Err(codes::INVALID_FIELD_IN_PARAMETERS
                    .in_parameters((at + 8) as u16, None)
                    .into());
            }
        }
        for i in 0..n {
            let at = 8 + 16 * i;
            let (lba, count) = (be64(p, at), u64::from(be32(p, at + 8)));
            if count > 0 {
                self.backend
                    .unmap(lu, lba * bs, count * bs)
                    .await
                    .map_err(|e| backend_sense(&e, true))?;
            }
        }
        Ok(DataIn::None)
    }

    /// COMPARE AND WRITE: the Data-Out holds the blocks to compare, then the blocks to
    /// write; a difference is MISCOMPARE with the offset of the first differing byte in the
    /// INFORMATION field.
    pub(super) async fn compare_and_write(
        &self,
        lu: &LunInfo,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r = cdb::block_range(Op::CompareAndWrite, cdb);
        if r.blocks > u64::from(limits::MAX_COMPARE_AND_WRITE_BLOCKS) {
            return Err(cdb::invalid_byte(13).into());
        }
        cdb::check_range(r.lba, r.blocks, lu.blocks())?;
        // The Data-Out must be exactly the compare and the write blocks.
        let bs = lu.block_bytes();
        let half = r.blocks * bs;
        let have = len_of(&data);
        if have < 2 * half {
            return Err(codes::INVALID_FIELD_IN_IU.into());
        }
        if have > 2 * half {
            return Err(cdb::invalid_byte(13).into());
        }
        let Some(data) = data.filter(|_| r.blocks > 0) else {
            return Ok(DataIn::None);
        };
        let half = half as usize;
        let mut compare = self.backend.buffer(half);
        compare.as_mut()[..half].copy_from_slice(&data.as_ref()[..half]);
        let mut write = self.backend.buffer(half);
        write.as_mut()[..half].copy_from_slice(&data.as_ref()[half..2 * half]);
        let outcome = self
            .backend
            .compare_and_write(lu, r.lba * bs, compare, write)
            .await
            .map_err(|e| backend_sense(&e, true))?;
        match outcome {
            CompareOutcome::Written => {
                if r.fua {
                    self.backend
                        .flush(lu)
                        .await
                        .map_err(|e| backend_sense(&e, true))?;
                }
                Ok(DataIn::None)
            }
            CompareOutcome::Miscompare { offset } => {
                Err(codes::MISCOMPARE.with_information(offset).into())
            }
        }
    }

    /// ORWRITE (16): ORs the Data-Out into the blocks (read, OR, write).
    ///
    /// Two ORWRITEs to the same LUN through this node do not interleave: each holds the LUN's
    /// ORWRITE lock across its read and its write. Nothing more is promised: a WRITE, or an
    /// ORWRITE through another node's portal, may land between the read and the write (the
    /// cluster has no cross-node lock for ORWRITE; COMPARE AND WRITE is the atomic
    /// read-modify-write across nodes).
    pub(super) async fn orwrite(
        &self,
        lu: &LunInfo,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let r = cdb::block_range(Op::OrWrite, cdb);
        let bs = lu.block_bytes();
        cdb::check_transfer(&r, lu.block_size)?;
        cdb::check_range(r.lba, r.blocks, lu.blocks())?;
        let blocks = usable_blocks(len_of(&data), r.blocks, bs)?;
        let Some(data) = data.filter(|_| blocks > 0) else {
            return Ok(DataIn::None);
        };
        let (offset, len) = (r.lba * bs, blocks * bs);
        let mut out = self.exact(data, len);
        let lock = self.orwrite_lock(lu);
        let _held = lock.lock().await;
        let current = self
            .backend
            .read(lu, offset, len)
            .await
            .map_err(|e| backend_sense(&e, false))?;
        for (o, c) in out.as_mut().iter_mut().zip(current.as_ref()) {
            *o |= c;
        }
        self.backend
            .write(lu, offset, out, r.fua)
            .await
            .map_err(|e| backend_sense(&e, true))?;
        Ok(DataIn::None)
    }

    /// GET LBA STATUS: one descriptor per run of blocks with the same provisioning status,
    /// from the starting LBA, as many as the allocation length holds (at most 64).
    pub(super) async fn get_lba_status(
        &self,
        lu: &LunInfo,
        cdb: &[u8],
    ) -> Result<DataIn<B::Buf>, Failure> {
        let start = be64(cdb, 2);
        let alloc = be32(cdb, 10) as usize;
        let capacity = lu.blocks();
        let bs = lu.block_bytes();
        if start >= capacity {
            return Err(codes::LBA_OUT_OF_RANGE.into());
        }
        let max = (alloc.saturating_sub(8) / 16).clamp(1, 64);
        let mut d = vec![0u8; 8];
        let mut lba = start;
        let mut n = 0;
        while lba < capacity && n < max {
            let left = capacity - lba;
            let (status, len) = self
                .backend
                .provisioning(lu, lba * bs, left * bs)
                .await
                .map_err(|e| backend_sense(&e, false))?;
            let run = (len / bs).clamp(1, left).min(u64::from(u32::MAX));
            d.extend_from_slice(&lba.to_be_bytes());
            d.extend_from_slice(&(run as u32).to_be_bytes());
            d.push(match status {
                Provisioning::Mapped => 0,
                Provisioning::Deallocated => 1,
            });
            d.extend_from_slice(&[0; 3]);
            lba += run;
            n += 1;
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        d.truncate(alloc);
        Ok(DataIn::Owned(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_usable_blocks_truncation_rules() {
        assert_eq!(usable_blocks(8192, 2, 4096), Ok(2));
        assert_eq!(usable_blocks(10000, 1, 4096), Ok(1));
        assert_eq!(usable_blocks(4096, 2, 4096), Ok(1));
        assert_eq!(usable_blocks(0, 2, 4096), Ok(0));
        assert_eq!(usable_blocks(200, 1, 4096), Err(codes::INVALID_FIELD_IN_IU));
        assert_eq!(usable_blocks(1024, 4, 512), Ok(2));
        assert_eq!(usable_blocks(700, 4, 512), Err(codes::INVALID_FIELD_IN_IU));
    }

    #[test]
    fn test_first_difference_offsets() {
        assert_eq!(first_difference(b"abcd", b"abcd"), None);
        assert_eq!(first_difference(b"abcd", b"abXd"), Some(2));
    }
}
