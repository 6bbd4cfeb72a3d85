//! One node's view of the shared volumes: extent maps, I/O modes, and the I/O path itself.
//!
//! [`CsvNode`] holds, per volume, the layout the node has adopted (epoch, disks and their
//! extents, coordinator) and the node's device for it, if any. Every I/O:
//! 1. looks its disk up and is checked against the extent map (bounds, alignment);
//! 2. runs in the node's current mode for the volume — **direct** on the node's own device,
//!    **redirected** to the coordinator over [`crate::redirect`], or, while **paused**, waits;
//! 3. on a device error, turns the node to `redirected(no_device_path)` and is retried there.
//!
//! Changes of layout or mode are barriers: [`CsvNode::apply`] takes the volume's gate
//! exclusively, which waits for in-flight direct I/O to drain and holds new I/O (queued in
//! arrival order, none failed) until the change is in place. The adopted epoch is what the node
//! acknowledges through Raft.
//!
//! A node does direct I/O only while it holds a lease ([`CsvNode::renew_lease`]), renewed by the
//! daemon each time it reaches the Raft quorum. The check happens at every I/O, against the
//! monotonic clock, so a node that stops hearing from the quorum (or was frozen) stops issuing
//! I/O the moment its lease ends, whatever its background tasks are doing.
//!
//! Writes are tracked in a [`WriteLog`]: a write retried after a failure (new coordinator,
//! path lost) skips any part that a newer write from this node has completed meanwhile, so a
//! stale retry never overwrites newer data.
//!
//! Compare-and-write and writes of 512-byte sectors that do not cover whole 4 KiB blocks
//! ([`crate::serial`]) always run at the coordinator, which reads, compares or patches and
//! writes the covering blocks under an exclusive range lock (`range_lock`). They go
//! through the same loop as any other I/O (same waits and retries), with one difference: a
//! compare-and-write is never sent again once the coordinator may have run it.
//!
//! Internally a request is a *job*, planned into *parts*: whole-block parts run where the
//! node's mode says (its own device when direct), sub-block parts at the coordinator. An
//! unaligned discard, for example, zeroes its partial head and tail blocks at the coordinator
//! and discards the whole blocks between them directly.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use csvd_raft::ClusterState;
use csvd_raft::NodeId;
use csvd_raft::volume::{DiskId, DiskRecord, IoMode, PauseReason, RedirectReason, VolumeRecord};
use futures::future::try_join_all;
use tokio::sync::watch;
use uuid::Uuid;

use crate::device::BlockDevice;
use crate::engine::{ALIGN, AlignedBuf, BufSlice};
use crate::range_lock::{RangeGuard, RangeLocks};
use crate::redirect::{CallError, Client};
pub use crate::serial::{CompareResult, SECTOR, SerialRequest};
use crate::serial::{covering, split_blocks, whole_blocks};
use crate::wire::{MAX_PAYLOAD, Status};

/// How long an I/O waits through a pause or a coordinator change before it fails.
pub const DEFAULT_IO_WAIT: Duration = Duration::from_secs(60);

/// How long a node that has just become a volume's coordinator holds compare-and-write and
/// sub-block writes when the previous coordinator has not acknowledged the change. It must
/// exceed the I/O lease a node grants itself (the daemon's is 5 s): a previous coordinator
/// that has not adopted the change stops serving when its lease ends, and any lease it renews
/// after the change was committed comes with the change adopted.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(6);

/// One I/O request against a virtual disk.
#[derive(Debug, Clone)]
pub enum IoRequest {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset in the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write `data` at `offset`.
    Write {
        /// Offset in the disk.
        offset: u64,
        /// The bytes.
        data: BufSlice,
        /// Durable on completion.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Deallocate a range (reads back zeroes). Offset and length are multiples of
    /// [`SECTOR`]; partial 4 KiB blocks at either end are zeroed by read-modify-write at the
    /// coordinator, the whole blocks between them deallocated.
    Discard {
        /// Offset in the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero a range. Offset and length are multiples of [`SECTOR`], as for `Discard`.
    WriteZeroes {
        /// Offset in the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl IoRequest {
    /// The byte range a write-like request changes.
    fn written_range(&self) -> Option<(u64, u64)> {
        match self {
            IoRequest::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            IoRequest::Discard { offset, len } | IoRequest::WriteZeroes { offset, len } => {
                Some((*offset, *len))
            }
            IoRequest::Read { .. } | IoRequest::Flush => None,
        }
    }

    /// Checks what can be checked without the disk: non-empty, aligned, within limits.
    fn check(&self) -> Result<(), IoError> {
        let (offset, len, unit) = match self {
            IoRequest::Flush => return Ok(()),
            IoRequest::Read { offset, len } => (*offset, *len, ALIGN as u64),
            IoRequest::Write { offset, data, .. } => (*offset, data.len() as u64, ALIGN as u64),
            IoRequest::Discard { offset, len } | IoRequest::WriteZeroes { offset, len } => {
                (*offset, *len, SECTOR)
            }
        };
        if len == 0 {
            return Err(IoError::BadRequest("an I/O of 0 bytes".into()));
        }
        if !offset.is_multiple_of(unit) || !len.is_multiple_of(unit) {
            return Err(IoError::Unaligned(format!(
                "offset {offset} and length {len} must each be a multiple of {unit} bytes"
            )));
        }
        if matches!(self, IoRequest::Read { .. } | IoRequest::Write { .. }) && len > MAX_PAYLOAD {
            return Err(IoError::BadRequest(format!(
                "{len} bytes is over the {MAX_PAYLOAD}-byte limit of one I/O"
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

/// A request as the data path runs it.
#[derive(Debug, Clone, Copy)]
enum Job<'a> {
    Io(&'a IoRequest),
    Serial(&'a SerialRequest),
}

/// One piece of a job.
#[derive(Debug)]
enum Part {
    /// Whole blocks, a read or a flush: on the node's own device when it is direct, else at
    /// the coordinator.
    Io(IoRequest),
    /// Serialized at the coordinator.
    Serial(SerialRequest),
}

/// What a job returned.
#[derive(Debug)]
enum Outcome {
    Reply(IoReply),
    Compared(CompareResult),
}

impl Outcome {
    /// Whether the job changed the bytes of its range (for the [`WriteLog`]).
    fn wrote(&self) -> bool {
        !matches!(self, Outcome::Compared(CompareResult::Miscompare { .. }))
    }
}

impl Job<'_> {
    fn check(&self) -> Result<(), IoError> {
        match self {
            Job::Io(r) => r.check(),
            Job::Serial(r) => r.check(),
        }
    }

    /// The byte range the job changes, if it writes.
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Job::Io(r) => r.written_range(),
            Job::Serial(r) => Some((r.offset(), r.len())),
        }
    }

    /// Checks the job against the disk's size (after [`Job::check`]).
    fn bounds(&self, rec: &DiskRecord) -> Result<(), IoError> {
        let (offset, len) = match self {
            Job::Io(IoRequest::Read { offset, len }) => (*offset, *len),
            _ => match self.range() {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        if offset.checked_add(len).is_none_or(|e| e > rec.size_bytes) {
            return Err(IoError::OutOfRange {
                disk: rec.id,
                offset,
                len,
                size: rec.size_bytes,
            });
        }
        Ok(())
    }

    /// What the job returns when nothing is left to do.
    fn nothing_left(&self) -> Outcome {
        match self {
            Job::Io(_) => Outcome::Reply(IoReply::Done),
            Job::Serial(_) => Outcome::Compared(CompareResult::Written),
        }
    }

    /// The job's parts, restricted to `pieces` of its range if given (a retry). A
    /// compare-and-write, a read and a flush are never split or restricted.
    fn plan(&self, pieces: Option<Vec<(u64, u64)>>) -> Result<Vec<Part>, IoError> {
        match *self {
            Job::Io(r @ (IoRequest::Read { .. } | IoRequest::Flush)) => {
                return Ok(vec![Part::Io(r.clone())]);
            }
            Job::Serial(r @ SerialRequest::CompareAndWrite { .. }) => {
                return Ok(vec![Part::Serial(r.clone())]);
            }
            _ => {}
        }
        let pieces = match (pieces, self.range()) {
            (Some(p), _) => p,
            (None, Some(r)) => vec![r],
            (None, None) => Vec::new(),
        };
        let mut parts = Vec::with_capacity(pieces.len());
        for (offset, len) in pieces {
            for (o, l) in split_blocks(offset, len) {
                parts.push(self.part(o, l)?);
            }
        }
        Ok(parts)
    }

    /// The job restricted to `o..o + l`, which is whole blocks or lies in partial ones.
    fn part(&self, o: u64, l: u64) -> Result<Part, IoError> {
        let whole = whole_blocks(o, l);
        let zeroes = |o: u64, l: u64| {
            Part::Serial(SerialRequest::WritePartial {
                offset: o,
                data: vec![0; l as usize],
                fua: false,
            })
        };
        Ok(match *self {
            Job::Io(IoRequest::Write { offset, data, fua }) => {
                let at = (o - offset) as usize;
                if whole {
                    let data = data.slice(at, l as usize).ok_or_else(|| {
                        IoError::BadRequest(format!("{o}+{l} is not inside the write"))
                    })?;
                    Part::Io(IoRequest::Write {
                        offset: o,
                        data,
                        fua: *fua,
                    })
                } else {
                    Part::Serial(SerialRequest::WritePartial {
                        offset: o,
                        data: data[at..at + l as usize].to_vec(),
                        fua: *fua,
                    })
                }
            }
            Job::Io(IoRequest::Discard { .. }) if whole => {
                Part::Io(IoRequest::Discard { offset: o, len: l })
            }
            Job::Io(IoRequest::WriteZeroes { .. }) if whole => {
                Part::Io(IoRequest::WriteZeroes { offset: o, len: l })
            }
            Job::Io(IoRequest::Discard { .. } | IoRequest::WriteZeroes { .. }) => zeroes(o, l),
            Job::Serial(SerialRequest::WritePartial { offset, data, fua }) => {
                let bytes = &data[(o - offset) as usize..][..l as usize];
                if whole {
                    let buf = AlignedBuf::from_slice(bytes).map_err(|e| {
                        IoError::Unavailable(format!("cannot allocate {l} bytes: {e}"))
                    })?;
                    Part::Io(IoRequest::Write {
                        offset: o,
                        data: BufSlice::from(buf),
                        fua: *fua,
                    })
                } else {
                    Part::Serial(SerialRequest::WritePartial {
                        offset: o,
                        data: bytes.to_vec(),
                        fua: *fua,
                    })
                }
            }
            Job::Io(r @ (IoRequest::Read { .. } | IoRequest::Flush)) => Part::Io(r.clone()),
            Job::Serial(r @ SerialRequest::CompareAndWrite { .. }) => Part::Serial(r.clone()),
        })
    }
}

/// The blocks a plan's writes touch, and whether any part needs them exclusively.
fn lock_span(parts: &[Part]) -> Option<(u64, u64, bool)> {
    let mut span: Option<(u64, u64, bool)> = None;
    for p in parts {
        let (offset, len, exclusive) = match p {
            Part::Io(r) => match r.written_range() {
                Some((o, l)) => (o, l, false),
                None => continue,
            },
            Part::Serial(r) => (r.offset(), r.len(), true),
        };
        let (s, e) = covering(offset, len);
        span = Some(match span {
            None => (s, e, exclusive),
            Some((a, b, x)) => (a.min(s), b.max(e), x || exclusive),
        });
    }
    span
}

/// What a successful I/O returns.
#[derive(Debug)]
pub enum IoReply {
    /// A read's data.
    Data(AlignedBuf),
    /// Anything else.
    Done,
}

/// Why an I/O failed. Bad requests are refused before anything is issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// No such disk (or not known to this node yet).
    #[error("disk {0} does not exist")]
    NoSuchDisk(DiskId),
    /// Beyond the end of the disk.
    #[error("I/O at {offset}+{len} is beyond the end of disk {disk} ({size} bytes)")]
    OutOfRange {
        /// The disk.
        disk: DiskId,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// Offset or length not a multiple of the block size.
    #[error("{0}")]
    Unaligned(String),
    /// Empty, too large, or otherwise not a valid request.
    #[error("{0}")]
    BadRequest(String),
    /// The node is fenced (no quorum) and the I/O waited in vain.
    #[error("paused: {0}")]
    Paused(String),
    /// Neither the device nor a coordinator could serve the I/O in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The receiver of a redirected I/O is not the coordinator.
    #[error("not the coordinator: {0}")]
    NotCoordinator(String),
    /// The device failed the I/O.
    #[error("device error: {0}")]
    Device(String),
}

impl IoError {
    /// The wire status for this error.
    pub fn status(&self) -> Status {
        match self {
            IoError::NoSuchDisk(_) => Status::NoSuchDisk,
            IoError::OutOfRange { .. } => Status::OutOfRange,
            IoError::Unaligned(_) => Status::Unaligned,
            IoError::BadRequest(_) => Status::BadRequest,
            IoError::Paused(_) => Status::Paused,
            IoError::Unavailable(_) => Status::Unavailable,
            IoError::NotCoordinator(_) => Status::NotCoordinator,
            IoError::Device(_) => Status::DeviceError,
        }
    }

    /// Rebuilds an error from a wire status and message.
    pub fn from_status(status: Status, message: String) -> IoError {
        match status {
            Status::Unaligned => IoError::Unaligned(message),
            Status::NoSuchDisk | Status::OutOfRange | Status::BadRequest => {
                IoError::BadRequest(message)
            }
            Status::Paused => IoError::Paused(message),
            Status::NotCoordinator => IoError::NotCoordinator(message),
            Status::DeviceError => IoError::Device(message),
            Status::Unavailable | Status::ChecksumMismatch | Status::Ok => {
                IoError::Unavailable(message)
            }
            // Only an answer to a compare-and-write, which is read before it gets here.
            Status::Miscompare => {
                IoError::Device(format!("unexpected miscompare answer: {message}"))
            }
        }
    }
}

/// What a node reports about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    /// The volume.
    pub volume: Uuid,
    /// The node's mode for it.
    pub mode: IoMode,
    /// The node's device path, if attached.
    pub path: Option<String>,
    /// The epoch the node has adopted.
    pub epoch: u64,
    /// Why the node has no device path, if it has none.
    pub path_error: Option<String>,
}

/// Opens a device for direct I/O.
pub type Opener<D> = Arc<dyn Fn(&Path) -> io::Result<D> + Send + Sync>;

/// The shared volumes as one node sees and serves them. Cheap to clone.
pub struct CsvNode<D: BlockDevice> {
    inner: Arc<Inner<D>>,
}

impl<D: BlockDevice> Clone for CsvNode<D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<D: BlockDevice> std::fmt::Debug for CsvNode<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvNode")
            .field("id", &self.inner.id)
            .finish()
    }
}

struct Inner<D> {
    id: NodeId,
    opener: Opener<D>,
    volumes: RwLock<HashMap<Uuid, Arc<Vol<D>>>>,
    disks: RwLock<HashMap<DiskId, Uuid>>,
    client: Client,
    writes: Mutex<WriteLog>,
    /// The blocks writes issued or served by this node are changing.
    ranges: RangeLocks,
    /// Direct I/O is allowed until then (`None`: never granted).
    lease_until: Mutex<Option<Instant>>,
    io_wait: Duration,
    handoff_wait: Mutex<Duration>,
    /// One [`CsvNode::apply`] at a time.
    applying: tokio::sync::Mutex<()>,
}

struct Vol<D> {
    gate: tokio::sync::RwLock<VolState<D>>,
    /// Bumped after every change, for I/O waiting on a pause or a new coordinator.
    changed: watch::Sender<u64>,
    /// Set while this node has just become the coordinator and the previous one may still be
    /// running serialized I/O.
    handoff: Mutex<Option<Handoff>>,
}

/// A coordinator change to this node that the previous coordinator has not acknowledged.
#[derive(Debug, Clone, Copy)]
struct Handoff {
    from: NodeId,
    epoch: u64,
    since: Instant,
}

struct VolState<D> {
    epoch: u64,
    disks: HashMap<DiskId, DiskRecord>,
    coordinator: NodeId,
    coordinator_addr: Option<String>,
    device: Option<Attached<D>>,
    path_error: Option<String>,
    user_redirect: bool,
}

struct Attached<D> {
    path: PathBuf,
    dev: Arc<D>,
}

impl<D: BlockDevice> CsvNode<D> {
    /// A node with id `id` that opens devices with `opener`. It has no lease: call
    /// [`CsvNode::renew_lease`] before direct I/O can run.
    pub fn new(id: NodeId, opener: Opener<D>) -> Self {
        Self::with_io_wait(id, opener, DEFAULT_IO_WAIT)
    }

    /// Like [`CsvNode::new`], with how long I/O waits through pauses and coordinator changes.
    pub fn with_io_wait(id: NodeId, opener: Opener<D>, io_wait: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                opener,
                volumes: RwLock::new(HashMap::new()),
                disks: RwLock::new(HashMap::new()),
                client: Client::new(),
                writes: Mutex::new(WriteLog::default()),
                ranges: RangeLocks::default(),
                lease_until: Mutex::new(None),
                io_wait,
                handoff_wait: Mutex::new(HANDOFF_WAIT),
                applying: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Sets how long serialized I/O waits, on a node that has just become a volume's
    /// coordinator, for the previous coordinator to acknowledge the change (default
    /// [`HANDOFF_WAIT`]; see there for the lower bound).
    pub fn set_handoff_wait(&self, wait: Duration) {
        *lock(&self.inner.handoff_wait) = wait;
    }

    /// Allows I/O until `until`. Called each time the node reaches the quorum.
    pub fn renew_lease(&self, until: Instant) {
        let was = self.fenced();
        *lock(&self.inner.lease_until) = Some(until);
        if was && !self.fenced() {
            self.notify_all();
        }
    }

    /// Whether the node's lease has run out (or was never granted).
    pub fn fenced(&self) -> bool {
        lock(&self.inner.lease_until).is_none_or(|t| Instant::now() >= t)
    }

    fn notify_all(&self) {
        for v in read(&self.inner.volumes).values() {
            v.changed.send_modify(|g| *g += 1);
        }
    }

    fn volume_of(&self, disk: DiskId) -> Result<Arc<Vol<D>>, IoError> {
        let vid = *read(&self.inner.disks)
            .get(&disk)
            .ok_or(IoError::NoSuchDisk(disk))?;
        read(&self.inner.volumes)
            .get(&vid)
            .cloned()
            .ok_or(IoError::NoSuchDisk(disk))
    }

    fn mode_of(&self, s: &VolState<D>) -> IoMode {
        if self.fenced() {
            IoMode::Paused(PauseReason::NoQuorum)
        } else if s.device.is_none() {
            IoMode::Redirected(RedirectReason::NoDevicePath)
        } else if s.user_redirect {
            IoMode::Redirected(RedirectReason::UserRequest)
        } else {
            IoMode::Direct
        }
    }

    /// Adopts the cluster state: new volumes, layouts, coordinators and requested modes. Each
    /// volume whose epoch or coordinator address changed goes through a barrier.
    pub async fn apply(&self, state: &ClusterState) {
        let _one = self.inner.applying.lock().await;
        // Volumes are only ever added (there is no command that removes one), and a volume
        // missing from `state` may only mean `state` is an older copy than one applied before
        // (the local view lags the leader's): it is kept.
        for (vid, v) in &state.volumes {
            let vol = {
                let mut vols = write(&self.inner.volumes);
                vols.entry(*vid)
                    .or_insert_with(|| {
                        Arc::new(Vol {
                            gate: tokio::sync::RwLock::new(VolState {
                                epoch: u64::MAX,
                                disks: HashMap::new(),
                                coordinator: 0,
                                coordinator_addr: None,
                                device: None,
                                path_error: Some("no device with this volume found yet".into()),
                                user_redirect: false,
                            }),
                            changed: watch::channel(0).0,
                            handoff: Mutex::new(None),
                        })
                    })
                    .clone()
            };
            self.adopt(&vol, *vid, v, state).await;
            // The previous coordinator has drained and switched once it acknowledges the
            // epoch that moved the role here (acknowledgements only move forward, so even an
            // older copy of the state is good evidence).
            let mut h = lock(&vol.handoff);
            if let Some(x) = *h
                && v.nodes
                    .get(&x.from)
                    .is_some_and(|n| n.acked_epoch >= x.epoch)
            {
                *h = None;
                drop(h);
                vol.changed.send_modify(|n| *n += 1);
            }
        }
        // The disk index follows what each volume adopted.
        let vols: Vec<(Uuid, Arc<Vol<D>>)> = read(&self.inner.volumes)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut index = HashMap::new();
        for (vid, vol) in vols {
            for d in vol.gate.read().await.disks.keys() {
                index.insert(*d, vid);
            }
        }
        *write(&self.inner.disks) = index;
    }

    /// Adopts one volume's layout, coordinator and requested mode, behind the barrier if any
    /// of them changed.
    async fn adopt(&self, vol: &Vol<D>, vid: Uuid, v: &VolumeRecord, state: &ClusterState) {
        let addr = state
            .nodes
            .get(&v.coordinator)
            .map(|n| n.spec.io_addr.clone())
            .filter(|a| !a.is_empty());
        let user_redirect = v.redirect_requested.contains(&self.inner.id);
        {
            let g = vol.gate.read().await;
            let adopted = g.epoch != u64::MAX;
            // An older state (a lagging local copy after a fresher one) never undoes a
            // newer layout.
            if adopted && g.epoch > v.epoch {
                return;
            }
            if g.epoch == v.epoch && g.coordinator_addr == addr && g.user_redirect == user_redirect
            {
                return;
            }
        }
        // The barrier: waits for in-flight I/O on this volume, holds new I/O.
        let mut g = vol.gate.write().await;
        let previous = (g.epoch != u64::MAX).then_some(g.coordinator);
        g.epoch = v.epoch;
        g.disks = state
            .disks
            .values()
            .filter(|d| d.volume == vid)
            .map(|d| (d.id, d.clone()))
            .collect();
        g.coordinator = v.coordinator;
        g.coordinator_addr = addr;
        g.user_redirect = user_redirect;
        {
            let mut h = lock(&vol.handoff);
            if v.coordinator != self.inner.id {
                *h = None;
            } else if let Some(from) = previous
                && from != self.inner.id
            {
                // The role moved here from another node, which may still be running
                // serialized I/O under the old epoch until it adopts this one.
                *h = Some(Handoff {
                    from,
                    epoch: v.epoch,
                    since: Instant::now(),
                });
            }
        }
        drop(g);
        vol.changed.send_modify(|n| *n += 1);
    }

    /// While this node has just become `vol`'s coordinator and the previous one has not
    /// acknowledged it: that node and when the wait ends.
    fn handoff_pending(&self, vol: &Vol<D>) -> Option<(NodeId, Instant)> {
        let h = (*lock(&vol.handoff))?;
        let until = h.since + *lock(&self.inner.handoff_wait);
        (Instant::now() < until).then_some((h.from, until))
    }

    /// Attaches the device at `path` to `volume` (a barrier), or records why it cannot.
    pub async fn attach(&self, volume: Uuid, path: &Path) -> io::Result<()> {
        let Some(vol) = read(&self.inner.volumes).get(&volume).cloned() else {
            return Err(io::Error::other(format!("volume {volume} is not known")));
        };
        let opened = (self.inner.opener)(path);
        let mut g = vol.gate.write().await;
        match opened {
            Ok(dev) => {
                g.device = Some(Attached {
                    path: path.to_path_buf(),
                    dev: Arc::new(dev),
                });
                g.path_error = None;
                drop(g);
                vol.changed.send_modify(|n| *n += 1);
                tracing::info!(%volume, path = %path.display(), "device attached: direct I/O");
                Ok(())
            }
            Err(e) => {
                g.path_error = Some(format!("{}: {e}", path.display()));
                Err(e)
            }
        }
    }

    /// Detaches `volume`'s device (a barrier): its I/O turns redirected(no_device_path).
    pub async fn detach(&self, volume: Uuid, why: String) {
        let Some(vol) = read(&self.inner.volumes).get(&volume).cloned() else {
            return;
        };
        let mut g = vol.gate.write().await;
        if g.device.take().is_some() {
            tracing::warn!(%volume, reason = %why, "device path lost: redirected I/O");
        }
        g.path_error = Some(why);
        drop(g);
        vol.changed.send_modify(|n| *n += 1);
    }

    /// The device path each volume is attached through.
    pub async fn attached_paths(&self) -> HashMap<Uuid, PathBuf> {
        let vols: Vec<(Uuid, Arc<Vol<D>>)> = read(&self.inner.volumes)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut out = HashMap::new();
        for (id, v) in vols {
            if let Some(a) = &v.gate.read().await.device {
                out.insert(id, a.path.clone());
            }
        }
        out
    }

    /// The node's mode, path and adopted epoch for every volume it knows.
    pub async fn reports(&self) -> Vec<VolumeReport> {
        let vols: Vec<(Uuid, Arc<Vol<D>>)> = read(&self.inner.volumes)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, v) in vols {
            let g = v.gate.read().await;
            out.push(VolumeReport {
                volume: id,
                mode: self.mode_of(&g),
                path: g.device.as_ref().map(|a| a.path.display().to_string()),
                epoch: g.epoch,
                path_error: g.path_error.clone(),
            });
        }
        out.sort_by_key(|r| r.volume);
        out
    }

    /// Serves one I/O from a client of this node, in the node's current mode.
    pub async fn execute(&self, disk: DiskId, req: IoRequest) -> Result<IoReply, IoError> {
        match self.run(disk, Job::Io(&req)).await? {
            Outcome::Reply(r) => Ok(r),
            Outcome::Compared(_) => Ok(IoReply::Done),
        }
    }

    /// Serves one serialized request (compare-and-write, sub-block write) from a client of
    /// this node: it runs at the volume's coordinator, which is this node or a peer. The
    /// whole 4 KiB blocks inside a sub-block write run like any write, directly when this node
    /// is direct.
    pub async fn execute_serial(
        &self,
        disk: DiskId,
        req: SerialRequest,
    ) -> Result<CompareResult, IoError> {
        match self.run(disk, Job::Serial(&req)).await? {
            Outcome::Compared(c) => Ok(c),
            Outcome::Reply(_) => Ok(CompareResult::Written),
        }
    }

    async fn run(&self, disk: DiskId, job: Job<'_>) -> Result<Outcome, IoError> {
        job.check()?;
        let seq = job
            .range()
            .map(|(off, len)| lock(&self.inner.writes).begin(disk, off, len));
        let res = self.run_tracked(disk, job, seq).await;
        if let Some(seq) = seq {
            let wrote = res.as_ref().is_ok_and(Outcome::wrote);
            lock(&self.inner.writes).finish(seq, wrote);
        }
        res
    }

    async fn run_tracked(
        &self,
        disk: DiskId,
        job: Job<'_>,
        seq: Option<u64>,
    ) -> Result<Outcome, IoError> {
        let deadline = Instant::now() + self.inner.io_wait;
        let mut attempt = 0u32;
        loop {
            let vol = self.volume_of(disk)?;
            let mut changed = vol.changed.subscribe();
            // A retry sends only what no newer write of this node has completed meanwhile
            // (a compare-and-write is never restricted: it is retried only when it cannot
            // have run).
            let pieces = match (attempt, seq, job.range()) {
                (1.., Some(seq), Some((off, len))) => {
                    Some(lock(&self.inner.writes).uncovered(seq, disk, off, len))
                }
                _ => None,
            };
            let parts = job.plan(pieces)?;
            if parts.is_empty() {
                return Ok(job.nothing_left());
            }
            attempt += 1;
            // The blocks first, then the gate: a task waiting for blocks never holds the gate,
            // so a barrier never waits behind a range held across a network call.
            let held = self.lock_blocks(disk, &parts).await;
            let g = vol.gate.read().await;
            let rec = g.disks.get(&disk).ok_or(IoError::NoSuchDisk(disk))?;
            job.bounds(rec)?;
            let mode = self.mode_of(&g);
            if let IoMode::Paused(_) = mode {
                drop((g, held));
                if !wait_change(&mut changed, deadline, Duration::from_millis(250)).await {
                    return Err(IoError::Paused(format!(
                        "node {} cannot reach the cluster quorum",
                        self.inner.id
                    )));
                }
                continue;
            }
            let here = g.coordinator == self.inner.id;
            let dev = g.device.as_ref().map(|a| a.dev.clone());
            // Whole blocks run on the node's own device when it is direct; the coordinator
            // serves everyone's I/O on its device, its own included. Serialized parts run
            // only at the coordinator.
            let (local, remote): (Vec<&Part>, Vec<&Part>) = parts.iter().partition(|p| {
                dev.is_some()
                    && match p {
                        Part::Io(_) => here || mode == IoMode::Direct,
                        Part::Serial(_) => here,
                    }
            });
            let addr = (!here).then(|| g.coordinator_addr.clone()).flatten();
            let epoch = g.epoch;
            if !remote.is_empty() && addr.is_none() {
                drop((g, held));
                if !wait_change(&mut changed, deadline, Duration::from_millis(250)).await {
                    return Err(IoError::Unavailable(if here {
                        "the coordinator has no path to the device".into()
                    } else {
                        "the coordinator's block-I/O address is not known".into()
                    }));
                }
                continue;
            }
            let serial_here = local.iter().any(|p| matches!(p, Part::Serial(_)));
            if serial_here && let Some((from, until)) = self.handoff_pending(&vol) {
                drop((g, held));
                if !wait_change(
                    &mut changed,
                    deadline,
                    until.saturating_duration_since(Instant::now()),
                )
                .await
                {
                    return Err(self.handoff_error(from));
                }
                continue;
            }
            let mut out = job.nothing_left();
            if let Some(dev) = dev.filter(|_| !local.is_empty()) {
                match run_parts(&*dev, rec, &local).await {
                    Ok(Some(o)) => out = o,
                    Ok(None) => {}
                    Err((e, ambiguous)) => {
                        drop((g, held));
                        let vid = *read(&self.inner.disks)
                            .get(&disk)
                            .ok_or(IoError::NoSuchDisk(disk))?;
                        self.detach(vid, format!("I/O failed: {e}")).await;
                        if ambiguous {
                            return Err(IoError::Device(format!(
                                "compare-and-write: node {}'s device failed the write ({e}); \
                                 the range may hold the old data, the new data or a mix",
                                self.inner.id
                            )));
                        }
                        continue;
                    }
                }
            }
            drop(g);
            let Some(addr) = addr.filter(|_| !remote.is_empty()) else {
                return Ok(out);
            };
            let mut retry = None;
            for part in remote {
                let res = match part {
                    Part::Io(req) => self
                        .inner
                        .client
                        .call(&addr, disk, epoch, req, false)
                        .await
                        .map(Outcome::Reply),
                    Part::Serial(req) => {
                        let res = self
                            .inner
                            .client
                            .call_serial(&addr, disk, epoch, req, false)
                            .await;
                        // Without an answer the coordinator may have run it: sending it again
                        // could report a miscompare against this very write.
                        if let Err(e @ (CallError::Lost(_) | CallError::Timeout(_))) = &res
                            && req.is_compare()
                        {
                            return Err(IoError::Unavailable(format!(
                                "compare-and-write sent to the coordinator at {addr} got no \
                                 answer ({e}); it may have run, so it is not sent again"
                            )));
                        }
                        res.map(Outcome::Compared)
                    }
                };
                match res {
                    Ok(o) => out = o,
                    Err(CallError::Remote(status, msg)) if !status.is_retryable() => {
                        return Err(IoError::from_status(status, msg));
                    }
                    Err(e) => {
                        retry = Some(e.to_string());
                        break;
                    }
                }
            }
            let Some(why) = retry else {
                return Ok(out);
            };
            drop(held);
            let why = format!("coordinator at {addr}: {why}");
            tracing::debug!(disk, error = %why, "redirected I/O will be retried");
            if !wait_change(&mut changed, deadline, Duration::from_millis(200)).await {
                return Err(IoError::Unavailable(why));
            }
        }
    }

    /// Locks the blocks `parts` write: exclusively if any part is serialized.
    async fn lock_blocks(&self, disk: DiskId, parts: &[Part]) -> Option<RangeGuard<'_>> {
        let (start, end, exclusive) = lock_span(parts)?;
        Some(self.inner.ranges.lock(disk, start, end, exclusive).await)
    }

    fn handoff_error(&self, from: NodeId) -> IoError {
        IoError::Unavailable(format!(
            "node {} has just become the coordinator and waits for node {from} to let go",
            self.inner.id
        ))
    }

    /// Serves one redirected I/O from a peer: only the coordinator, holding a lease and a
    /// device, executes it; anything else tells the peer to retry elsewhere or later.
    pub async fn execute_as_coordinator(
        &self,
        disk: DiskId,
        epoch: u64,
        req: IoRequest,
    ) -> Result<IoReply, IoError> {
        match self.serve(disk, epoch, Job::Io(&req)).await? {
            Outcome::Reply(r) => Ok(r),
            Outcome::Compared(_) => Ok(IoReply::Done),
        }
    }

    /// Serves one redirected serialized request from a peer, like
    /// [`CsvNode::execute_as_coordinator`]. A retryable refusal means the request did not
    /// run; once a compare-and-write's write has been issued, a failure is a
    /// [`IoError::Device`] (not retryable), so the peer never runs it twice.
    pub async fn execute_serial_as_coordinator(
        &self,
        disk: DiskId,
        epoch: u64,
        req: SerialRequest,
    ) -> Result<CompareResult, IoError> {
        match self.serve(disk, epoch, Job::Serial(&req)).await? {
            Outcome::Compared(c) => Ok(c),
            Outcome::Reply(_) => Ok(CompareResult::Written),
        }
    }

    async fn serve(&self, disk: DiskId, epoch: u64, job: Job<'_>) -> Result<Outcome, IoError> {
        job.check()?;
        let parts = job.plan(None)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let serial = parts.iter().any(|p| matches!(p, Part::Serial(_)));
        let writes = lock_span(&parts).is_some();
        let mut held = None;
        loop {
            let vol = self.volume_of(disk)?;
            let mut changed = vol.changed.subscribe();
            let g = vol.gate.read().await;
            // The peer knows a newer layout: catch up first.
            if g.epoch < epoch || g.epoch == u64::MAX {
                drop(g);
                if wait_change(&mut changed, deadline, Duration::from_millis(100)).await {
                    continue;
                }
                return Err(IoError::Unavailable(format!(
                    "node {} has not adopted epoch {epoch} yet",
                    self.inner.id
                )));
            }
            let rec = g.disks.get(&disk).ok_or(IoError::NoSuchDisk(disk))?;
            job.bounds(rec)?;
            if g.coordinator != self.inner.id {
                return Err(IoError::NotCoordinator(format!(
                    "node {} does not coordinate this volume (node {} does)",
                    self.inner.id, g.coordinator
                )));
            }
            if self.fenced() {
                return Err(IoError::Paused(format!(
                    "coordinator {} cannot reach the quorum",
                    self.inner.id
                )));
            }
            let Some(a) = &g.device else {
                return Err(IoError::Unavailable(format!(
                    "coordinator {} has no path to the device",
                    self.inner.id
                )));
            };
            if serial && let Some((from, until)) = self.handoff_pending(&vol) {
                drop(g);
                if wait_change(
                    &mut changed,
                    deadline,
                    until.saturating_duration_since(Instant::now()),
                )
                .await
                {
                    continue;
                }
                return Err(self.handoff_error(from));
            }
            // The blocks are locked only once this node knows it coordinates (a node that
            // does not answers at once), and without the gate held; then everything is
            // checked again.
            if writes && held.is_none() {
                drop(g);
                held = self.lock_blocks(disk, &parts).await;
                continue;
            }
            let dev = a.dev.clone();
            let all: Vec<&Part> = parts.iter().collect();
            return match run_parts(&*dev, rec, &all).await {
                Ok(o) => Ok(o.unwrap_or_else(|| job.nothing_left())),
                Err((e, ambiguous)) => {
                    drop((g, held));
                    let vid = *read(&self.inner.disks)
                        .get(&disk)
                        .ok_or(IoError::NoSuchDisk(disk))?;
                    self.detach(vid, format!("I/O failed: {e}")).await;
                    Err(if ambiguous {
                        IoError::Device(format!(
                            "compare-and-write: coordinator {}'s device failed the write \
                             ({e}); the range may hold the old data, the new data or a mix",
                            self.inner.id
                        ))
                    } else {
                        IoError::Unavailable(format!(
                            "coordinator {} lost its device path: {e}",
                            self.inner.id
                        ))
                    })
                }
            };
        }
    }

    /// Reads `len` bytes at `offset` of `disk`.
    pub async fn read(&self, disk: DiskId, offset: u64, len: u64) -> Result<AlignedBuf, IoError> {
        match self.execute(disk, IoRequest::Read { offset, len }).await? {
            IoReply::Data(d) => Ok(d),
            IoReply::Done => Err(IoError::Device("a read returned no data".into())),
        }
    }

    /// Writes `data` at `offset` of `disk`; offset and length are multiples of 4096 bytes
    /// (see [`CsvNode::write_partial`] for 512-byte sectors).
    pub async fn write(
        &self,
        disk: DiskId,
        offset: u64,
        data: BufSlice,
        fua: bool,
    ) -> Result<(), IoError> {
        self.execute(disk, IoRequest::Write { offset, data, fua })
            .await
            .map(drop)
    }

    /// Writes `data` at `offset` of `disk` in 512-byte sectors: offset and length are
    /// multiples of [`SECTOR`], the length at most [`MAX_PAYLOAD`].
    ///
    /// The whole 4 KiB blocks inside the range are written like [`CsvNode::write`] (directly
    /// when this node is direct); a partial block at either end is read, patched and written
    /// back by the volume's coordinator under an exclusive lock on the block. So two sub-block
    /// writes into one block, from any nodes, never lose each other's bytes, and neither
    /// loses bytes to a compare-and-write or to a whole-block write that this node or the
    /// coordinator issues meanwhile.
    ///
    /// Not covered: a whole-block write that *another* node (not the coordinator) issues
    /// directly on its own device, landing between the coordinator's read and write of the
    /// same block. The read-modify-write then puts back the bytes it read, and the other
    /// write's bytes outside this write's sectors are lost. Concurrent writers on one LUN from
    /// several nodes (cluster filesystems) should use 4096-byte logical blocks.
    ///
    /// A write retried after a failure skips what a newer write of this node has completed
    /// meanwhile, as every write does (see [`WriteLog`]).
    pub async fn write_partial(
        &self,
        disk: DiskId,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        let req = SerialRequest::WritePartial {
            offset,
            data: data.to_vec(),
            fua,
        };
        self.execute_serial(disk, req).await.map(drop)
    }

    /// Compares `compare` with the data at `offset` of `disk` and, only if they are equal,
    /// writes `data` there, atomically across the cluster: every node sends it to the
    /// volume's coordinator, which runs it under an exclusive lock on the covering 4 KiB
    /// blocks, so of several nodes racing with the same expected data exactly one succeeds.
    /// Offset and length are multiples of [`SECTOR`]; `compare` and `data` have the same
    /// length, at most [`crate::wire::MAX_COMPARE`].
    ///
    /// Returns [`CompareResult::Miscompare`] with the offset (within `compare`) of the first
    /// differing byte when the data differs; nothing is written then.
    ///
    /// It is sent again after a failure only when the coordinator cannot have run it
    /// (refused, not reachable, not the coordinator, paused). When it may have run (the
    /// connection broke or timed out after it was sent: [`IoError::Unavailable`]; the
    /// coordinator's device failed the write: [`IoError::Device`]) the error is returned
    /// instead, because a second run would compare against this write's own data and report
    /// a miscompare for a write that succeeded. The caller (the SCSI layer) reports a
    /// retryable error and the initiator decides.
    pub async fn compare_and_write(
        &self,
        disk: DiskId,
        offset: u64,
        compare: &[u8],
        data: &[u8],
    ) -> Result<CompareResult, IoError> {
        let req = SerialRequest::CompareAndWrite {
            offset,
            compare: compare.to_vec(),
            data: data.to_vec(),
            fua: false,
        };
        self.execute_serial(disk, req).await
    }

    /// Makes `disk`'s completed writes durable.
    pub async fn flush(&self, disk: DiskId) -> Result<(), IoError> {
        self.execute(disk, IoRequest::Flush).await.map(drop)
    }

    /// Deallocates a range of `disk` (it reads back as zeroes). Offset and length are
    /// multiples of [`SECTOR`]: partial 4 KiB blocks at either end are zeroed by
    /// read-modify-write at the coordinator (as [`CsvNode::write_partial`] writes), the whole
    /// blocks between them are deallocated.
    pub async fn discard(&self, disk: DiskId, offset: u64, len: u64) -> Result<(), IoError> {
        self.execute(disk, IoRequest::Discard { offset, len })
            .await
            .map(drop)
    }

    /// Zeroes a range of `disk`. Offset and length are multiples of [`SECTOR`], handled as in
    /// [`CsvNode::discard`].
    pub async fn write_zeroes(&self, disk: DiskId, offset: u64, len: u64) -> Result<(), IoError> {
        self.execute(disk, IoRequest::WriteZeroes { offset, len })
            .await
            .map(drop)
    }

    /// Which parts of `disk` hold data on the shared device, for thin-provisioning queries:
    /// whether the byte at `offset` lies in allocated space, and the length in bytes of the
    /// run from `offset` that shares that status (at least one [`SECTOR`], at most `len`).
    /// Offset and length are multiples of [`SECTOR`].
    ///
    /// The device answers in whole 4 KiB blocks (a block holding any data is allocated), so
    /// a sector's status is its block's, and a run ends at a block boundary or at
    /// `offset + len`. The disk offsets are mapped through the extent map; a run continues
    /// across extents while the status stays the same.
    ///
    /// Without a device of its own for the volume (redirected for lack of a path) the node
    /// answers that the whole range is allocated, which is always a safe answer: allocated
    /// space may read back as zeroes too. The query reads no data and takes no range locks,
    /// so it is a snapshot that writes and discards in flight may change at once.
    pub async fn allocation(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(bool, u64), IoError> {
        if len == 0 {
            return Err(IoError::BadRequest("an allocation query of 0 bytes".into()));
        }
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(IoError::Unaligned(format!(
                "offset {offset} and length {len} must each be a multiple of {SECTOR} bytes"
            )));
        }
        let vol = self.volume_of(disk)?;
        let g = vol.gate.read().await;
        let rec = g.disks.get(&disk).ok_or(IoError::NoSuchDisk(disk))?;
        let end = offset.checked_add(len).filter(|e| *e <= rec.size_bytes);
        let Some(end) = end else {
            return Err(IoError::OutOfRange {
                disk,
                offset,
                len,
                size: rec.size_bytes,
            });
        };
        let Some(dev) = g.device.as_ref().map(|a| a.dev.clone()) else {
            return Ok((true, len));
        };
        // The covering 4 KiB blocks (disk sizes are whole allocation units, so they fit).
        let block = ALIGN as u64;
        let start = offset / block * block;
        let stop = end.next_multiple_of(block).min(rec.size_bytes);
        let runs = rec.map(start, stop - start).ok_or_else(|| {
            IoError::Device(format!(
                "{start}+{} is outside the extent map",
                stop - start
            ))
        })?;
        let mut status = None;
        let mut total = 0u64;
        for (at, n) in runs {
            let (allocated, run) = dev
                .allocation(at, n)
                .await
                .map_err(|e| IoError::Device(format!("allocation query failed: {e}")))?;
            if status.is_some_and(|s| s != allocated) {
                break;
            }
            status = Some(allocated);
            total += run;
            if run < n {
                break;
            }
        }
        let allocated = status.unwrap_or(true);
        Ok((allocated, total.saturating_sub(offset - start).min(len)))
    }
}

/// Runs parts on the device in order. Returns the last part's outcome, or the device error
/// and whether it is ambiguous: a compare-and-write whose write had been issued.
async fn run_parts<D: BlockDevice>(
    dev: &D,
    rec: &DiskRecord,
    parts: &[&Part],
) -> Result<Option<Outcome>, (io::Error, bool)> {
    let mut out = None;
    for part in parts {
        out = Some(match part {
            Part::Io(req) => Outcome::Reply(direct(dev, rec, req).await.map_err(|e| (e, false))?),
            Part::Serial(req) => Outcome::Compared(
                crate::serial::run(dev, rec, req)
                    .await
                    .map_err(|f| (f.error, f.written && req.is_compare()))?,
            ),
        });
    }
    Ok(out)
}

/// Waits for a change or `step`, whichever is first; false once `deadline` has passed.
async fn wait_change(rx: &mut watch::Receiver<u64>, deadline: Instant, step: Duration) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    let _ = tokio::time::timeout(step.min(deadline - now), rx.changed()).await;
    true
}

/// Runs a checked, in-bounds request on the device through the disk's extent map.
pub(crate) async fn direct<D: BlockDevice>(
    dev: &D,
    rec: &DiskRecord,
    req: &IoRequest,
) -> io::Result<IoReply> {
    let runs = |offset: u64, len: u64| {
        rec.map(offset, len)
            .ok_or_else(|| io::Error::other("range outside the extent map"))
    };
    match req {
        IoRequest::Read { offset, len } => {
            let runs = runs(*offset, *len)?;
            if let [(at, n)] = runs[..] {
                return Ok(IoReply::Data(dev.read(at, n as usize).await?));
            }
            let parts = try_join_all(runs.iter().map(|(at, n)| dev.read(*at, *n as usize))).await?;
            let mut out = AlignedBuf::zeroed(*len as usize)?;
            let mut pos = 0;
            for p in parts {
                out[pos..pos + p.len()].copy_from_slice(&p);
                pos += p.len();
            }
            Ok(IoReply::Data(out))
        }
        IoRequest::Write { offset, data, fua } => {
            let runs = runs(*offset, data.len() as u64)?;
            let mut pos = 0usize;
            let mut writes = Vec::with_capacity(runs.len());
            for (at, n) in runs {
                let part = data
                    .slice(pos, n as usize)
                    .ok_or_else(|| io::Error::other("unaligned extent split"))?;
                writes.push(dev.write(at, part, *fua));
                pos += n as usize;
            }
            try_join_all(writes).await?;
            Ok(IoReply::Done)
        }
        IoRequest::Flush => {
            dev.flush().await?;
            Ok(IoReply::Done)
        }
        IoRequest::Discard { offset, len } => {
            let runs = runs(*offset, *len)?;
            try_join_all(runs.into_iter().map(|(at, n)| dev.discard(at, n))).await?;
            Ok(IoReply::Done)
        }
        IoRequest::WriteZeroes { offset, len } => {
            let runs = runs(*offset, *len)?;
            try_join_all(runs.into_iter().map(|(at, n)| dev.write_zeroes(at, n))).await?;
            Ok(IoReply::Done)
        }
    }
}

/// The writes this node has in flight, and the completed ones a retry must not undo.
#[derive(Debug, Default)]
pub struct WriteLog {
    next: u64,
    inflight: BTreeMap<u64, (DiskId, u64, u64)>,
    /// Completed writes newer than some write still in flight: `(seq, disk, offset, len)`.
    done: Vec<(u64, DiskId, u64, u64)>,
}

impl WriteLog {
    /// Registers a write of `len` bytes at `offset`; returns its sequence number.
    pub fn begin(&mut self, disk: DiskId, offset: u64, len: u64) -> u64 {
        self.next += 1;
        self.inflight.insert(self.next, (disk, offset, len));
        self.next
    }

    /// Records the end of write `seq`. A successful one is remembered only while an older
    /// write to an overlapping range is still in flight (the only writes whose retry it can
    /// make stale), so the log stays as small as the set of overlapping writes in flight.
    pub fn finish(&mut self, seq: u64, ok: bool) {
        let Some((disk, offset, len)) = self.inflight.remove(&seq) else {
            return;
        };
        let overlaps_older = self
            .inflight
            .range(..seq)
            .any(|(_, &(d, o, l))| d == disk && o < offset + len && offset < o + l);
        if ok && overlaps_older {
            self.done.push((seq, disk, offset, len));
        }
        match self.inflight.keys().next() {
            Some(&oldest) => self.done.retain(|d| d.0 > oldest),
            None => self.done.clear(),
        }
    }

    /// The parts of write `seq`'s range that no write issued after it has completed.
    pub fn uncovered(&self, seq: u64, disk: DiskId, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut parts = vec![(offset, offset + len)];
        for &(s, d, o, l) in &self.done {
            if s <= seq || d != disk {
                continue;
            }
            let (cs, ce) = (o, o + l);
            parts = parts
                .into_iter()
                .flat_map(|(ps, pe)| {
                    let mut keep = Vec::new();
                    if cs >= pe || ce <= ps {
                        keep.push((ps, pe));
                    } else {
                        if ps < cs {
                            keep.push((ps, cs));
                        }
                        if ce < pe {
                            keep.push((ce, pe));
                        }
                    }
                    keep
                })
                .collect();
        }
        parts.into_iter().map(|(s, e)| (s, e - s)).collect()
    }
}

/// Locks `m`, taking over a lock poisoned by a panic elsewhere (the data stays consistent:
/// every critical section here is a few field updates).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_write_log_skips_overwritten_parts() {
        let mut log = WriteLog::default();
        let a = log.begin(1, 0, 16384);
        let b = log.begin(1, 4096, 4096);
        let c = log.begin(2, 0, 16384);
        log.finish(b, true);
        log.finish(c, true);
        // a's retry skips what b (newer, same disk) completed; c is another disk.
        assert_eq!(log.uncovered(a, 1, 0, 16384), vec![(0, 4096), (8192, 8192)]);
        // b is not stale relative to itself or older writes.
        let d = log.begin(1, 0, 4096);
        assert_eq!(log.uncovered(d, 1, 0, 4096), vec![(0, 4096)]);
        log.finish(a, false);
        log.finish(d, true);
        assert!(log.done.is_empty() && log.inflight.is_empty());
        // Writes that overlap nothing older in flight are not remembered at all.
        let e = log.begin(1, 0, 4096);
        let f = log.begin(1, 8192, 4096);
        log.finish(f, true);
        assert!(log.done.is_empty());
        log.finish(e, true);
    }

    /// `(offset, len, serialized)` of each part of a plan.
    fn shape(parts: &[Part]) -> Vec<(u64, u64, bool)> {
        parts
            .iter()
            .map(|p| match p {
                Part::Io(r) => {
                    let (o, l) = r.written_range().unwrap_or((0, 0));
                    (o, l, false)
                }
                Part::Serial(r) => (r.offset(), r.len(), true),
            })
            .collect()
    }

    fn buf(seed: u8, len: usize) -> BufSlice {
        let mut b = AlignedBuf::zeroed(len).unwrap();
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_add(i as u8);
        }
        BufSlice::from(b)
    }

    #[test]
    fn test_plan_whole_blocks_stay_one_part() {
        let w = IoRequest::Write {
            offset: 4096,
            data: buf(1, 8192),
            fua: true,
        };
        let parts = Job::Io(&w).plan(None).unwrap();
        assert_eq!(shape(&parts), vec![(4096, 8192, false)]);
        assert_eq!(lock_span(&parts), Some((4096, 12288, false)));
        let r = IoRequest::Read {
            offset: 0,
            len: 4096,
        };
        let parts = Job::Io(&r).plan(None).unwrap();
        assert_eq!(lock_span(&parts), None, "reads lock nothing");
    }

    #[test]
    fn test_plan_retry_of_a_write_restricted_to_sectors_patches_partial_blocks() {
        // A newer sub-block write of this node covered 4608..5120: the retry of this older
        // write skips it, and the pieces that no longer cover whole blocks go by
        // read-modify-write, with the right bytes.
        let w = IoRequest::Write {
            offset: 4096,
            data: buf(3, 8192),
            fua: true,
        };
        let parts = Job::Io(&w)
            .plan(Some(vec![(4096, 512), (5120, 7168)]))
            .unwrap();
        assert_eq!(
            shape(&parts),
            vec![(4096, 512, true), (5120, 3072, true), (8192, 4096, false)]
        );
        let Part::Serial(SerialRequest::WritePartial { data, fua, .. }) = &parts[1] else {
            panic!("{parts:?}");
        };
        assert_eq!(&data[..], &w_data(&w)[1024..4096]);
        assert!(*fua);
        assert_eq!(lock_span(&parts), Some((4096, 12288, true)));
    }

    fn w_data(w: &IoRequest) -> Vec<u8> {
        match w {
            IoRequest::Write { data, .. } => data.to_vec(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn test_plan_unaligned_discard_zeroes_partial_blocks() {
        let d = IoRequest::Discard {
            offset: 512,
            len: 8192 + 1024,
        };
        let parts = Job::Io(&d).plan(None).unwrap();
        assert_eq!(
            shape(&parts),
            vec![(512, 3584, true), (4096, 4096, false), (8192, 1536, true)]
        );
        assert!(matches!(&parts[1], Part::Io(IoRequest::Discard { .. })));
        for p in [&parts[0], &parts[2]] {
            let Part::Serial(SerialRequest::WritePartial { data, .. }) = p else {
                panic!("{p:?}");
            };
            assert!(data.iter().all(|b| *b == 0));
        }
        let z = IoRequest::WriteZeroes {
            offset: 8192,
            len: 4096,
        };
        let parts = Job::Io(&z).plan(None).unwrap();
        assert!(matches!(
            &parts[..],
            [Part::Io(IoRequest::WriteZeroes { .. })]
        ));
    }

    #[test]
    fn test_plan_partial_write_sends_whole_blocks_directly() {
        let data: Vec<u8> = (0..9216u32).map(|i| i as u8).collect();
        let p = SerialRequest::WritePartial {
            offset: 1536,
            data: data.clone(),
            fua: false,
        };
        let parts = Job::Serial(&p).plan(None).unwrap();
        assert_eq!(
            shape(&parts),
            vec![(1536, 2560, true), (4096, 4096, false), (8192, 2560, true)]
        );
        let Part::Io(IoRequest::Write { data: middle, .. }) = &parts[1] else {
            panic!("{parts:?}");
        };
        assert_eq!(&middle[..], &data[2560..6656]);
    }

    #[test]
    fn test_plan_compare_and_write_is_never_split_or_restricted() {
        let c = SerialRequest::CompareAndWrite {
            offset: 512,
            compare: vec![0; 8192],
            data: vec![1; 8192],
            fua: false,
        };
        let job = Job::Serial(&c);
        for pieces in [None, Some(vec![]), Some(vec![(4096, 512)])] {
            let parts = job.plan(pieces).unwrap();
            assert_eq!(shape(&parts), vec![(512, 8192, true)]);
        }
        assert!(Outcome::Compared(CompareResult::Written).wrote());
        assert!(!Outcome::Compared(CompareResult::Miscompare { offset: 3 }).wrote());
    }

    #[test]
    fn test_io_request_checks() {
        let discard = |offset, len| IoRequest::Discard { offset, len };
        assert_eq!(discard(512, 1024).check(), Ok(()));
        assert!(
            matches!(discard(100, 512).check(), Err(IoError::Unaligned(m)) if m.contains("512"))
        );
        assert!(matches!(discard(0, 0).check(), Err(IoError::BadRequest(_))));
        assert!(matches!(
            discard(u64::MAX - 511, 1024).check(),
            Err(IoError::BadRequest(_))
        ));
        let read = IoRequest::Read {
            offset: 512,
            len: 4096,
        };
        assert!(matches!(read.check(), Err(IoError::Unaligned(m)) if m.contains("4096")));
    }

    #[test]
    fn test_write_log_failed_writes_cover_nothing() {
        let mut log = WriteLog::default();
        let a = log.begin(1, 0, 8192);
        let b = log.begin(1, 0, 8192);
        log.finish(b, false);
        assert_eq!(log.uncovered(a, 1, 0, 8192), vec![(0, 8192)]);
        let c = log.begin(1, 0, 8192);
        log.finish(c, true);
        assert!(log.uncovered(a, 1, 0, 8192).is_empty());
    }
}
