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
}
