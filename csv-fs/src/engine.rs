//! The direct I/O engine: reads, writes (optionally FUA) and flushes against one device,
//! bypassing the page cache (`O_DIRECT`), so no node ever reads stale data another node wrote.
//!
//! Two back ends share one API:
//! - **io_uring** (preferred): the task that issues an I/O puts it on the submission queue
//!   and submits it itself (no hand-off to another thread); the ring signals completions on an
//!   eventfd that a reaper on the tokio runtime (or, outside one, a thread) watches, and the
//!   reaper completes every finished I/O and refills the queue from the backlog when it was
//!   full. Many I/Os are in flight, none has a thread. FUA writes carry `RWF_DSYNC`; a flush is
//!   `IORING_OP_FSYNC` with `DATASYNC`; discard and write-zeroes are `IORING_OP_FALLOCATE`
//!   (punch hole, zero range).
//! - **pread/pwrite** (fallback, chosen at start with a log line when io_uring is unavailable):
//!   a few threads doing positional I/O; FUA writes go through a second `O_DSYNC` descriptor.
//!
//! Every offset and length must be a multiple of [`ALIGN`]; buffers are [`AlignedBuf`]s. Writes
//! take a [`BufSlice`], a shared view of one, so a caller can keep the data to retry the write
//! elsewhere (redirected I/O) without copying it.
//! `unsafe` lives only in this module, each block with a `SAFETY` comment.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

/// Alignment of offsets, lengths and buffers for direct I/O.
pub const ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`ALIGN`], whose length is a multiple of it.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it between threads
// moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; `len` must be a non-zero multiple of [`ALIGN`].
    pub fn zeroed(len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(ALIGN) {
            return Err(unaligned("buffer length", len as u64));
        }
        let layout = Layout::from_size_align(len, ALIGN).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (checked above).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| io::Error::other("out of memory"))?;
        Ok(Self { ptr, len })
    }

    /// A buffer of `len` bytes whose content the caller will overwrite: a recycled one when
    /// one of that size is free (holding bytes of an earlier use, never uninitialized memory),
    /// else a zeroed one. Fresh large allocations cost a page fault per 4 KiB, which at
    /// gigabytes per second is most of the CPU time of a transfer.
    pub fn for_overwrite(len: usize) -> io::Result<Self> {
        match pool::take(len) {
            Some(ptr) => Ok(Self { ptr, len }),
            None => Self::zeroed(len),
        }
    }

    /// A buffer holding a copy of `data` (whose length must be a multiple of [`ALIGN`]).
    pub fn from_slice(data: &[u8]) -> io::Result<Self> {
        let mut b = Self::zeroed(data.len())?;
        b.copy_from_slice(data);
        Ok(b)
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialized (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if pool::give(self.ptr, self.len) {
            return;
        }
        // SAFETY: allocated in `zeroed` with exactly this layout (size and alignment were valid
        // then, so they are now).
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            )
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Recycled buffer allocations, by exact length.
mod pool {
    use std::collections::HashMap;
    use std::ptr::NonNull;
    use std::sync::Mutex;

    /// Largest length kept.
    const MAX_LEN: usize = 16 << 20;
    /// Bytes kept per length.
    const BYTES_PER_LEN: usize = 64 << 20;
    /// Buffers kept per length, whatever their size.
    const COUNT_PER_LEN: usize = 256;
    /// Bytes kept in all.
    const BYTES_TOTAL: usize = 256 << 20;

    #[derive(Default)]
    struct Free {
        by_len: HashMap<usize, Vec<NonNull<u8>>>,
        bytes: usize,
    }
    // SAFETY: the pointers are allocations nobody else references (their AlignedBuf was
    // dropped); whoever takes one out owns it, like a Box moved between threads.
    unsafe impl Send for Free {}

    static FREE: Mutex<Option<Free>> = Mutex::new(None);

    /// An allocation of exactly `len` bytes, if one is free.
    pub(super) fn take(len: usize) -> Option<NonNull<u8>> {
        let mut guard = FREE.lock().unwrap_or_else(|p| p.into_inner());
        let free = guard.as_mut()?;
        let ptr = free.by_len.get_mut(&len)?.pop()?;
        free.bytes -= len;
        Some(ptr)
    }

    /// Keeps an allocation of `len` bytes for reuse; false when the pool is full.
    pub(super) fn give(ptr: NonNull<u8>, len: usize) -> bool {
        if len > MAX_LEN {
            return false;
        }
        let mut guard = FREE.lock().unwrap_or_else(|p| p.into_inner());
        let free = guard.get_or_insert_with(Free::default);
        if free.bytes + len > BYTES_TOTAL {
            return false;
        }
        let list = free.by_len.entry(len).or_default();
        if list.len() >= COUNT_PER_LEN || (list.len() + 1) * len > BYTES_PER_LEN {
            return false;
        }
        list.push(ptr);
        free.bytes += len;
        true
    }
}

/// A shared, read-only window of an [`AlignedBuf`] whose start and length are multiples of
/// [`ALIGN`]. Cloning it is cheap.
#[derive(Clone)]
pub struct BufSlice {
    buf: Arc<AlignedBuf>,
    start: usize,
    len: usize,
}

impl BufSlice {
    /// The window `start..start + len` of this slice; `None` when it is not inside it or not
    /// aligned.
    pub fn slice(&self, start: usize, len: usize) -> Option<BufSlice> {
        let aligned = start.is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN) && len > 0;
        (aligned && start.checked_add(len)? <= self.len).then(|| BufSlice {
            buf: self.buf.clone(),
            start: self.start + start,
            len,
        })
    }
}

impl From<AlignedBuf> for BufSlice {
    fn from(buf: AlignedBuf) -> Self {
        let len = buf.len;
        Self {
            buf: Arc::new(buf),
            start: 0,
            len,
        }
    }
}

impl std::ops::Deref for BufSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for BufSlice {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for BufSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufSlice({}+{} bytes)", self.start, self.len)
    }
}

/// `fallocate` mode of a discard: deallocate, reads return zeroes, size unchanged.
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode of write-zeroes: the range reads as zeroes, space stays allocated.
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn unaligned(what: &str, value: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} {value} is not a multiple of {ALIGN} bytes, as direct I/O requires"),
    )
}

/// `lseek(2)` from `pos` with `whence` (`SEEK_DATA` or `SEEK_HOLE`): the offset found, or
/// `None` on `ENXIO` (no data at or after `pos` for `SEEK_DATA`, `pos` at or past the end).
/// Only the returned offset is used: the engine's reads and writes carry their own offsets,
/// so moving the descriptor's file position is harmless.
fn seek(file: &File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let at = libc::off_t::try_from(pos)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
    // SAFETY: lseek(2) takes a descriptor and integers, no pointers; the descriptor stays open
    // while `file` is borrowed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Which back end an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring.
    IoUring,
    /// Positional reads and writes on a few threads.
    Pread,
}

enum Op {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: oneshot::Sender<io::Result<AlignedBuf>>,
    },
    Write {
        offset: u64,
        buf: BufSlice,
        fua: bool,
        done: oneshot::Sender<io::Result<()>>,
    },
    Flush {
        done: oneshot::Sender<io::Result<()>>,
    },
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// Where an engine's operations go.
#[derive(Clone)]
enum Sink {
    /// Straight onto the ring; `_open` tells the reaper to stop when the last clone is gone.
    Ring {
        ring: Arc<Ring>,
        _open: Arc<OpenHandle>,
    },
    /// To the pread/pwrite threads.
    Threads(mpsc::Sender<Op>),
}

thread_local! {
    /// Rings of the threads that serve their own I/O (see [`use_thread_rings`]): `None` on
    /// every other thread.
    static THREAD_RINGS: std::cell::RefCell<Option<Vec<ThreadRing>>> =
        const { std::cell::RefCell::new(None) };
}

/// A thread's own ring on one engine's device.
struct ThreadRing {
    /// The engine's handle: the entry is dropped once the engine is gone.
    engine: std::sync::Weak<OpenHandle>,
    ring: Arc<Ring>,
    _open: Arc<OpenHandle>,
}

/// Makes the calling thread, which must run a current-thread tokio runtime, submit its I/O to
/// rings of its own (one per device, set up at its first I/O), whose completions are reaped
/// on this thread too: a thread that serves a connection from its socket to the device then
/// never waits for another thread to be scheduled.
pub fn use_thread_rings() {
    THREAD_RINGS.with(|t| {
        t.borrow_mut().get_or_insert_with(Vec::new);
    });
}

/// How many rings of its own the calling thread has (on engines still open), for tests and
/// diagnostics.
pub fn thread_rings() -> usize {
    THREAD_RINGS.with(|t| {
        t.borrow_mut().as_mut().map_or(0, |rings| {
            rings.retain(|r| r.engine.strong_count() > 0);
            rings.len()
        })
    })
}

/// Direct I/O against one device or file. Cheap to clone.
#[derive(Clone)]
pub struct DirectEngine {
    depth: u32,
    sink: Sink,
    backend: Backend,
    size: u64,
    /// A descriptor of the device for allocation queries (`lseek`), which need no ring.
    file: Arc<File>,
}

impl std::fmt::Debug for DirectEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectEngine")
            .field("backend", &self.backend)
            .field("size", &self.size)
            .finish()
    }
}

impl DirectEngine {
    /// Opens `path` for direct I/O with io_uring, or the pread/pwrite fallback when io_uring
    /// cannot be set up here (logged once).
    pub fn open(path: &Path, queue_depth: u32) -> io::Result<Self> {
        Self::open_with(path, queue_depth, None)
    }

    /// Like [`DirectEngine::open`], forcing a back end (tests and benchmarks).
    pub fn open_with(path: &Path, queue_depth: u32, force: Option<Backend>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: cannot open for direct I/O: {e}", path.display()),
                )
            })?;
        let size = file.metadata()?.len();
        let seek_file = Arc::new(file.try_clone()?);
        let want_uring = force != Some(Backend::Pread);
        let ring = if want_uring {
            Ring::start(file.try_clone()?, queue_depth.max(2), false).map_err(|e| e.to_string())
        } else {
            Err("pread back end requested".into())
        };
        let (sink, backend) = match ring {
            Ok((ring, open)) => (Sink::Ring { ring, _open: open }, Backend::IoUring),
            Err(why) => {
                if force == Some(Backend::IoUring) {
                    return Err(io::Error::other(format!("io_uring is unavailable: {why}")));
                }
                if force.is_none() {
                    tracing::warn!(reason = %why, "io_uring unavailable: using the pread/pwrite back end");
                }
                let dsync = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
                    .open(path)?;
                let (queue, rx) = mpsc::channel();
                let shared = Arc::new((file, dsync, Mutex::new(rx)));
                for i in 0..4 {
                    let shared = shared.clone();
                    std::thread::Builder::new()
                        .name(format!("csvfs-pio-{i}"))
                        .spawn(move || pread_loop(&shared.0, &shared.1, &shared.2))?;
                }
                (Sink::Threads(queue), Backend::Pread)
            }
        };
        Ok(Self {
            depth: queue_depth.max(2),
            sink,
            backend,
            size,
            file: seek_file,
        })
    }

    /// The back end in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Size of the device or file, in bytes, when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        self.check_range(offset, len as u64)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if !offset.is_multiple_of(ALIGN as u64) {
            return Err(unaligned("offset", offset));
        }
        if len == 0 || !len.is_multiple_of(ALIGN as u64) {
            return Err(unaligned("length", len));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "I/O at {offset}+{len} is beyond the end of the device ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn send(&self, op: Op) -> io::Result<()> {
        match &self.sink {
            Sink::Ring { ring, _open } => {
                match self.thread_ring(_open) {
                    Some(own) => own.submit(op),
                    None => ring.submit(op),
                }
                Ok(())
            }
            Sink::Threads(queue) => queue
                .send(op)
                .map_err(|_| io::Error::other("the I/O engine stopped")),
        }
    }

    /// This thread's own ring on the device, when the thread uses its own rings.
    fn thread_ring(&self, open: &Arc<OpenHandle>) -> Option<Arc<Ring>> {
        THREAD_RINGS.with(|t| {
            let mut t = t.borrow_mut();
            let rings = t.as_mut()?;
            if let Some(r) = rings
                .iter()
                .find(|r| std::ptr::eq(r.engine.as_ptr(), Arc::as_ptr(open)))
            {
                return Some(r.ring.clone());
            }
            // A new engine on this thread: drop the rings of engines that are gone.
            rings.retain(|r| r.engine.strong_count() > 0);
            let file = self.file.try_clone().ok()?;
            match Ring::start(file, self.depth, true) {
                Ok((ring, own)) => {
                    rings.push(ThreadRing {
                        engine: Arc::downgrade(open),
                        ring: ring.clone(),
                        _open: own,
                    });
                    Some(ring)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up this thread's ring: using the shared one");
                    None
                }
            }
        })
    }

    /// Queues the operation `make` builds around its completion channel and awaits it.
    async fn run<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Op,
    ) -> io::Result<T> {
        let (done, rx) = oneshot::channel();
        self.send(make(done))?;
        rx.await
            .map_err(|_| io::Error::other("the I/O engine stopped"))?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        self.check(offset, len)?;
        let buf = AlignedBuf::for_overwrite(len)?;
        self.run(|done| Op::Read { offset, buf, done }).await
    }

    /// Writes `buf` at `offset`; with `fua` the write is on stable storage when this returns.
    pub async fn write(&self, offset: u64, buf: BufSlice, fua: bool) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.run(|done| Op::Write {
            offset,
            buf,
            fua,
            done,
        })
        .await
    }

    /// Makes every completed write durable (fdatasync).
    pub async fn flush(&self) -> io::Result<()> {
        self.run(|done| Op::Flush { done }).await
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(offset, len, PUNCH_HOLE).await
    }

    /// Whether the [`ALIGN`]-byte block at `offset` is allocated on the device, and the
    /// length in bytes (a multiple of [`ALIGN`], at least one block, at most `len`) of the run
    /// of blocks from `offset` that share that status. A block is a hole only when all of it
    /// is: one holding any data is allocated. Answered with `lseek(2)` `SEEK_DATA` /
    /// `SEEK_HOLE` on the calling thread (a lookup in the filesystem's extent tree, no data
    /// I/O). A device that does not support these (`EINVAL`, `EOPNOTSUPP`) reports the whole
    /// range allocated; block devices report everything allocated as the kernel does.
    pub async fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.check_range(offset, len)?;
        let file = &*self.file;
        let run = crate::device::allocation_run(
            offset,
            len,
            |pos| seek(file, pos, libc::SEEK_DATA),
            |pos| seek(file, pos, libc::SEEK_HOLE),
        );
        match run {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                Ok((true, len))
            }
            r => r,
        }
    }

    /// Makes `len` bytes at `offset` read back as zeroes. Where the device cannot zero a range
    /// in place, zeroes are written.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(offset, len, ZERO_RANGE).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                const CHUNK: u64 = 1 << 20;
                let zeroes = BufSlice::from(AlignedBuf::zeroed(CHUNK.min(len) as usize)?);
                let mut at = offset;
                while at < offset + len {
                    let n = CHUNK.min(offset + len - at) as usize;
                    let part = zeroes.slice(0, n).ok_or_else(|| unaligned("length", len))?;
                    self.write(at, part, false).await?;
                    at += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.run(|done| Op::Fallocate {
            offset,
            len,
            mode,
            done,
        })
        .await
    }
}

/// `fallocate(2)` on `file`.
fn fallocate(file: &File, offset: u64, len: u64, mode: i32) -> io::Result<()> {
    let (off, n) = (
        libc::off_t::try_from(offset).map_err(io::Error::other)?,
        libc::off_t::try_from(len).map_err(io::Error::other)?,
    );
    // SAFETY: a plain system call on a descriptor `file` keeps open; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn pread_loop(file: &File, dsync: &File, rx: &Mutex<mpsc::Receiver<Op>>) {
    loop {
        let op = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(op) => op,
            Err(_) => return,
        };
        match op {
            Op::Read {
                offset,
                mut buf,
                done,
            } => {
                let _ = done.send(file.read_exact_at(&mut buf, offset).map(|()| buf));
            }
            Op::Write {
                offset,
                buf,
                fua,
                done,
            } => {
                let target = if fua { dsync } else { file };
                let _ = done.send(target.write_all_at(&buf, offset));
            }
            Op::Flush { done } => {
                let _ = done.send(file.sync_data());
            }
            Op::Fallocate {
                offset,
                len,
                mode,
                done,
            } => {
                let _ = done.send(fallocate(file, offset, len, mode));
            }
        }
    }
}

/// An operation in flight: it owns its buffer until the kernel is done with it.
enum InFlight {
    Read(AlignedBuf, oneshot::Sender<io::Result<AlignedBuf>>),
    Write(BufSlice, oneshot::Sender<io::Result<()>>),
    /// A flush or fallocate: no buffer, no byte count.
    Unit(oneshot::Sender<io::Result<()>>),
}

/// The ring's eventfd, as the reaper's AsyncFd sees it; keeps the ring (and so the fd) alive.
struct EventFd(Arc<Ring>);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.efd.as_raw_fd()
    }
}

/// Tells the reaper that the engine's last handle is gone.
struct OpenHandle(Arc<Ring>);

impl Drop for OpenHandle {
    fn drop(&mut self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.signal();
    }
}

/// An io_uring shared by the tasks that submit to it and the reaper that completes.
struct Ring {
    state: Mutex<RingState>,
    /// Signalled by the kernel on every completion (and by [`OpenHandle`] on close).
    efd: std::os::fd::OwnedFd,
    closed: std::sync::atomic::AtomicBool,
}

struct RingState {
    ring: io_uring::IoUring,
    file: File,
    inflight: HashMap<u64, InFlight>,
    /// Operations waiting for room in the submission queue.
    backlog: std::collections::VecDeque<Op>,
    next_id: u64,
    /// Set up with deferred task running: completions are posted only when asked for.
    defer: bool,
}

impl Ring {
    /// Sets up a ring on `file` with its completion eventfd, and starts its reaper: a task on
    /// the current tokio runtime, or a thread when there is none.
    ///
    /// A ring `private` to one thread (submitted to only there) whose reaper runs on that
    /// thread too (a current-thread runtime) is set up, where the kernel allows it, with
    /// single issuer and deferred task running: the kernel then does the completion work of
    /// its I/O only when the reaper asks for completions, instead of interrupting the thread
    /// for each one. (The kernel refuses those requests from any other thread.)
    fn start(file: File, depth: u32, private: bool) -> io::Result<(Arc<Ring>, Arc<OpenHandle>)> {
        let same_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let deferred = (private && same_thread)
            .then(|| {
                io_uring::IoUring::builder()
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .build(depth)
                    .ok()
            })
            .flatten();
        let defer = deferred.is_some();
        let ring = match deferred {
            Some(r) => r,
            None => io_uring::IoUring::new(depth)?,
        };
        let on_tokio = tokio::runtime::Handle::try_current().ok();
        let flags = libc::EFD_CLOEXEC
            | if on_tokio.is_some() {
                libc::EFD_NONBLOCK
            } else {
                0
            };
        // SAFETY: eventfd(2) takes no pointers; a negative result is an error.
        let raw = unsafe { libc::eventfd(0, flags) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let efd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let shared = Arc::new(Ring {
            state: Mutex::new(RingState {
                ring,
                file,
                inflight: HashMap::new(),
                backlog: std::collections::VecDeque::new(),
                next_id: 0,
                defer,
            }),
            efd,
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let open = Arc::new(OpenHandle(shared.clone()));
        let reaper = shared.clone();
        match on_tokio {
            Some(rt) => {
                // SAFETY: the registered descriptor is the eventfd owned by the `Ring` that
                // `EventFd` keeps alive, so it stays open (and is not replaced) for as long as
                // the AsyncFd holds the registration.
                let fd = unsafe { tokio::io::unix::AsyncFd::register(EventFd(reaper.clone()))? };
                rt.spawn(async move {
                    loop {
                        let Ok(mut ready) = fd.readable().await else {
                            return;
                        };
                        if ready.try_io(|_| reaper.drain_signal()).is_err() {
                            continue; // spurious: readiness cleared, wait again
                        }
                        if reaper.reap() {
                            return;
                        }
                    }
                });
            }
            None => {
                std::thread::Builder::new()
                    .name("csvfs-uring".into())
                    .spawn(move || {
                        while reaper.drain_signal().is_ok() {
                            if reaper.reap() {
                                return;
                            }
                        }
                    })?;
            }
        }
        Ok((shared, open))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads (and so resets) the eventfd counter.
    fn drain_signal(&self) -> io::Result<u64> {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into `n`, which is 8 bytes long and lives across the call.
        let rc = unsafe { libc::read(self.efd.as_raw_fd(), (&raw mut n).cast(), 8) };
        if rc == 8 {
            Ok(n)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Wakes the reaper.
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which lives across the call.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Queues `op` and submits what fits, from the calling thread.
    fn submit(&self, op: Op) {
        let failed = {
            let mut st = self.lock();
            st.backlog.push_back(op);
            st.push_and_submit()
        };
        finish(failed);
    }

    /// Completes every finished operation and refills the submission queue. True when the
    /// engine is closed and nothing is in flight any more (the reaper may stop).
    fn reap(&self) -> bool {
        let (done, failed, idle) = {
            let mut st = self.lock();
            let mut done = Vec::new();
            let mut failed = Vec::new();
            // Until the completion queue stays empty: a submit may flush completions the
            // kernel held back, and those raise no new signal.
            loop {
                if st.defer {
                    st.post_completions();
                }
                done.extend(st.take_completed());
                failed.extend(st.push_and_submit());
                if st.ring.completion().is_empty() {
                    break;
                }
            }
            let idle = st.inflight.is_empty() && st.backlog.is_empty();
            (done, failed, idle)
        };
        for (state, res) in done {
            complete(state, res);
        }
        finish(failed);
        idle && self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Fails operations the ring could not take.
fn finish(failed: Vec<(InFlight, io::Error)>) {
    for (state, e) in failed {
        fail(state, &e);
    }
}

/// `IORING_ENTER_GETEVENTS` of `linux/io_uring.h`.
const IORING_ENTER_GETEVENTS: u32 = 1;

impl RingState {
    /// Has the kernel post the completions it holds back on a ring with deferred task
    /// running (`io_uring_enter` with GETEVENTS, waiting for none).
    fn post_completions(&mut self) {
        // SAFETY: no argument is passed (`None`), so the kernel reads no memory of ours.
        let r = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
        };
        if let Err(e) = r
            && !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            )
        {
            tracing::warn!(error = %e, "io_uring: cannot collect completions");
        }
    }

    /// Removes the finished operations from the completion queue and the in-flight map.
    fn take_completed(&mut self) -> Vec<(InFlight, i32)> {
        let batch: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        batch
            .into_iter()
            .filter_map(|(id, res)| self.inflight.remove(&id).map(|s| (s, res)))
            .collect()
    }

    /// Moves backlog into the submission queue and submits it. A broken ring fails what was
    /// queued (returned, to be failed outside the lock).
    fn push_and_submit(&mut self) -> Vec<(InFlight, io::Error)> {
        use io_uring::{opcode, types};
        let fd = types::Fd(self.file.as_raw_fd());
        let mut pushed = false;
        // Never more in flight than the completion queue holds: an overflowing completion
        // queue would hold completions back from the reaper.
        let cq = self.ring.params().cq_entries() as usize;
        while let Some(op) = self.backlog.pop_front() {
            if self.ring.submission().is_full() || self.inflight.len() >= cq {
                self.backlog.push_front(op);
                break;
            }
            let id = self.next_id;
            self.next_id += 1;
            let (entry, state) = match op {
                Op::Read {
                    offset,
                    mut buf,
                    done,
                } => {
                    let e = opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                        .offset(offset)
                        .build();
                    (e, InFlight::Read(buf, done))
                }
                Op::Write {
                    offset,
                    buf,
                    fua,
                    done,
                } => {
                    let flags = if fua { libc::RWF_DSYNC } else { 0 };
                    let e = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build();
                    (e, InFlight::Write(buf, done))
                }
                Op::Flush { done } => {
                    let e = opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build();
                    (e, InFlight::Unit(done))
                }
                Op::Fallocate {
                    offset,
                    len,
                    mode,
                    done,
                } => {
                    let e = opcode::Fallocate::new(fd, len)
                        .offset(offset)
                        .mode(mode)
                        .build();
                    (e, InFlight::Unit(done))
                }
            };
            let entry = entry.user_data(id);
            // SAFETY: a read or write entry points into the heap allocation of the AlignedBuf
            // owned (for a write: kept alive through its Arc) by `state`; `state` stays in
            // `inflight` until the matching completion is reaped (the map may move the value,
            // never the allocation), and `RingState` does not drop the ring or the file while
            // anything is in flight (see its Drop).
            let ok = unsafe { self.ring.submission().push(&entry) }.is_ok();
            debug_assert!(ok, "checked is_full above");
            self.inflight.insert(id, state);
            pushed = true;
        }
        if !pushed {
            return Vec::new();
        }
        match self.ring.submit() {
            Ok(_) => Vec::new(),
            // The kernel is busy (completion queue full): the entries stay queued and go with
            // the next submit, after the reaper has made room.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
                ) =>
            {
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "io_uring submission failed");
                let mut failed: Vec<(InFlight, io::Error)> = self
                    .inflight
                    .drain()
                    .map(|(_, s)| (s, io::Error::new(e.kind(), e.to_string())))
                    .collect();
                failed.extend(
                    self.backlog
                        .drain(..)
                        .map(|op| (op.into(), io::Error::new(e.kind(), e.to_string()))),
                );
                failed
            }
        }
    }
}

impl Drop for RingState {
    fn drop(&mut self) {
        // The kernel may still write into buffers of operations in flight: wait for them
        // before the buffers are freed.
        while !self.inflight.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            for (state, res) in self.take_completed() {
                complete(state, res);
            }
        }
    }
}

/// The result of a read or write that moved `res` bytes (or failed with `-res`).
fn transferred<B: std::ops::Deref<Target = [u8]>>(
    buf: B,
    res: i32,
    what: &str,
    short: io::ErrorKind,
) -> io::Result<B> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else if res as usize != buf.len() {
        Err(io::Error::new(
            short,
            format!("short {what}: {res} of {} bytes", buf.len()),
        ))
    } else {
        Ok(buf)
    }
}

fn complete(state: InFlight, res: i32) {
    match state {
        InFlight::Read(buf, done) => {
            let _ = done.send(transferred(buf, res, "read", io::ErrorKind::UnexpectedEof));
        }
        InFlight::Write(buf, done) => {
            let _ = done.send(transferred(buf, res, "write", io::ErrorKind::WriteZero).map(drop));
        }
        InFlight::Unit(done) => {
            let _ = done.send(if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(())
            });
        }
    }
}

/// Fails an operation, queued or in flight, with a copy of `e`.
fn fail(state: InFlight, e: &io::Error) {
    let e = || io::Error::new(e.kind(), e.to_string());
    match state {
        InFlight::Read(_, d) => {
            let _ = d.send(Err(e()));
        }
        InFlight::Write(_, d) | InFlight::Unit(d) => {
            let _ = d.send(Err(e()));
        }
    }
}

impl From<Op> for InFlight {
    fn from(op: Op) -> Self {
        match op {
            Op::Read { buf, done, .. } => InFlight::Read(buf, done),
            Op::Write { buf, done, .. } => InFlight::Write(buf, done),
            Op::Flush { done } | Op::Fallocate { done, .. } => InFlight::Unit(done),
        }
    }
}
