//! What the volume layer needs from a device, and a fault-injecting wrapper for recovery tests.
//!
//! [`BlockDevice`] is the direct I/O engine's API as a trait: the daemon runs on
//! [`DirectEngine`]; tests wrap it in [`FaultyDevice`] to fail the Nth I/O, lose the path, or
//! tear a write (persist only its first half, then fail), and check that the layer above
//! recovers.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::engine::{ALIGN, AlignedBuf, BufSlice, DirectEngine};

/// A device the volume layer reads and writes at device offsets. Offsets and lengths are
/// multiples of [`ALIGN`]; the caller checks bounds against the extent map first.
pub trait BlockDevice: Send + Sync + 'static {
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = io::Result<AlignedBuf>> + Send;
    /// Writes `data` at `offset`; with `fua`, durable when it completes.
    fn write(
        &self,
        offset: u64,
        data: BufSlice,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes completed writes durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Deallocates a range; it reads back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Zeroes a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether the [`ALIGN`]-byte block at `offset` is allocated, and the length in bytes of
    /// the run of blocks from `offset` sharing that status (a multiple of [`ALIGN`], at least
    /// one block, at most `len`). Default, for devices that cannot tell: all of `len` is
    /// allocated.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<(bool, u64)>> + Send {
        let _ = offset;
        std::future::ready(Ok((true, len)))
    }
}

impl BlockDevice for DirectEngine {
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = io::Result<AlignedBuf>> + Send {
        DirectEngine::read(self, offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: BufSlice,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        DirectEngine::write(self, offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        DirectEngine::flush(self)
    }
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        DirectEngine::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        DirectEngine::write_zeroes(self, offset, len)
    }
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<(bool, u64)>> + Send {
        DirectEngine::allocation(self, offset, len)
    }
}

/// The allocation run from the block at `offset` (see [`BlockDevice::allocation`]), given
/// `data_at(pos)`, the first data byte at or after `pos` (`None`: no data up to the end of
/// the device), and `hole_at(pos)`, the first hole byte at or after `pos` (`None`: none up to
/// the end). `offset` and `len` are non-zero multiples of [`ALIGN`]. Holes are counted in
/// whole blocks: a block holding any data byte is allocated.
pub(crate) fn allocation_run(
    offset: u64,
    len: u64,
    mut data_at: impl FnMut(u64) -> io::Result<Option<u64>>,
    mut hole_at: impl FnMut(u64) -> io::Result<Option<u64>>,
) -> io::Result<(bool, u64)> {
    let block = ALIGN as u64;
    let end = offset + len;
    // The block at `b` is a hole when the first data at or after `b` lies beyond it.
    let is_hole = |b: u64, data: Option<u64>| data.is_none_or(|d| d >= b + block);
    let mut data = data_at(offset)?;
    if is_hole(offset, data) {
        let stop = data.map_or(end, |d| d.min(end));
        return Ok((false, (stop - offset) / block * block));
    }
    // `at` is the start of a block holding data, `data` the first data byte in it.
    let mut at = offset;
    loop {
        let pos = data.map_or(at, |d| d.max(at));
        let hole = hole_at(pos)?.map_or(end, |h| h.max(pos + 1));
        // Every block up to the one holding the byte before `hole` has data.
        let next = hole.min(end).next_multiple_of(block).min(end);
        if next >= end {
            return Ok((true, len));
        }
        data = data_at(next)?;
        if is_hole(next, data) {
            return Ok((true, next - offset));
        }
        at = next;
    }
}

/// The faults a [`FaultyDevice`] injects; shared, so a test flips them while I/O runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Counts I/Os (every call).
    ios: AtomicU64,
    /// Fail the I/O whose 1-based number is this (0: never).
    fail_nth: AtomicU64,
    /// Every I/O fails, as when a path to a SAN is lost.
    lost: AtomicBool,
    /// The next write persists only its first half and then fails.
    tear_next_write: AtomicBool,
}

impl Faults {
    /// No faults.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The `n`-th I/O from now fails with EIO (1 = the next one).
    pub fn fail_nth(&self, n: u64) {
        let now = self.ios.load(Ordering::SeqCst);
        self.fail_nth.store(now + n, Ordering::SeqCst);
    }

    /// Loses (`true`) or restores (`false`) the path: every I/O fails while lost.
    pub fn set_lost(&self, lost: bool) {
        self.lost.store(lost, Ordering::SeqCst);
    }

    /// The next write persists only its first half (rounded down to [`ALIGN`]) and fails.
    pub fn tear_next_write(&self) {
        self.tear_next_write.store(true, Ordering::SeqCst);
    }

    /// I/Os seen so far.
    pub fn count(&self) -> u64 {
        self.ios.load(Ordering::SeqCst)
    }

    /// Counts one I/O and says whether it must fail.
    fn next_fails(&self) -> Option<io::Error> {
        let n = self.ios.fetch_add(1, Ordering::SeqCst) + 1;
        if self.lost.load(Ordering::SeqCst) {
            return Some(io::Error::new(
                io::ErrorKind::NotConnected,
                "injected: the path to the device is lost",
            ));
        }
        if self
            .fail_nth
            .compare_exchange(n, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Some(io::Error::other(format!("injected: I/O number {n} fails")));
        }
        None
    }
}

/// A device that fails on demand (see [`Faults`]).
#[derive(Debug, Clone)]
pub struct FaultyDevice<D> {
    inner: D,
    faults: Arc<Faults>,
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wraps `inner`; `faults` controls what fails.
    pub fn new(inner: D, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    async fn read(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        match self.faults.next_fails() {
            Some(e) => Err(e),
            None => self.inner.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: BufSlice, fua: bool) -> io::Result<()> {
        if let Some(e) = self.faults.next_fails() {
            return Err(e);
        }
        if self.faults.tear_next_write.swap(false, Ordering::SeqCst) {
            let half = data.len() / 2 / ALIGN * ALIGN;
            if let Some(first) = data.slice(0, half) {
                self.inner.write(offset, first, fua).await?;
            }
            return Err(io::Error::other(format!(
                "injected: torn write, {half} of {} bytes persisted",
                data.len()
            )));
        }
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        match self.faults.next_fails() {
            Some(e) => Err(e),
            None => self.inner.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.faults.next_fails() {
            Some(e) => Err(e),
            None => self.inner.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.faults.next_fails() {
            Some(e) => Err(e),
            None => self.inner.write_zeroes(offset, len).await,
        }
    }

    /// Asks the inner device; an allocation query moves no data, so it is neither counted
    /// as an I/O nor failed by injected faults.
    async fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.allocation(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = ALIGN as u64;

    /// [`allocation_run`] over a device of `size` bytes whose data lies in `extents`
    /// (`(start, end)` byte ranges, sorted, disjoint, not touching).
    fn run(extents: &[(u64, u64)], size: u64, offset: u64, len: u64) -> (bool, u64) {
        let data_at = |pos: u64| {
            Ok(extents
                .iter()
                .find(|&&(_, e)| e > pos)
                .map(|&(s, _)| s.max(pos)))
        };
        let hole_at = |pos: u64| {
            let h = match extents.iter().find(|&&(s, e)| s <= pos && pos < e) {
                Some(&(_, e)) => e,
                None => pos,
            };
            Ok((h < size).then_some(h))
        };
        allocation_run(offset, len, data_at, hole_at).unwrap()
    }

    #[test]
    fn test_allocation_run_whole_blocks() {
        let size = 64 * B;
        let ext = [(4 * B, 8 * B), (10 * B, 12 * B)];
        assert_eq!(run(&ext, size, 0, 64 * B), (false, 4 * B));
        assert_eq!(run(&ext, size, 0, 2 * B), (false, 2 * B), "clamped to len");
        assert_eq!(run(&ext, size, 4 * B, 60 * B), (true, 4 * B));
        assert_eq!(run(&ext, size, 5 * B, B), (true, B));
        assert_eq!(run(&ext, size, 8 * B, 56 * B), (false, 2 * B));
        assert_eq!(
            run(&ext, size, 12 * B, 52 * B),
            (false, 52 * B),
            "hole to the end"
        );
        assert_eq!(run(&[], size, 3 * B, 10 * B), (false, 10 * B));
        assert_eq!(run(&[(0, size)], size, 3 * B, 10 * B), (true, 10 * B));
    }

    #[test]
    fn test_allocation_run_partial_blocks_count_as_allocated() {
        let size = 64 * B;
        // Data in the last 1 KiB of block 2 and the first 512 bytes of block 3, a hole of
        // less than a block after it, then data from inside block 4 to inside block 5.
        let ext = [(3 * B - 1024, 3 * B + 512), (4 * B + 100, 5 * B + 1)];
        assert_eq!(run(&ext, size, 0, 64 * B), (false, 2 * B));
        // Blocks 2..=5 all hold some data; block 6 is a whole hole.
        assert_eq!(run(&ext, size, 2 * B, 62 * B), (true, 4 * B));
        assert_eq!(run(&ext, size, 6 * B, 58 * B), (false, 58 * B));
        // A hole shorter than a block before data is no hole.
        assert_eq!(run(&[(B - 512, 2 * B)], size, 0, 4 * B), (true, 2 * B));
    }
}
