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

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use csvd_raft::ClusterState;
use csvd_raft::NodeId;
use csvd_raft::volume::{DiskId, DiskRecord, IoMode, PauseReason, RedirectReason};
use futures::future::try_join_all;
use tokio::sync::watch;
use uuid::Uuid;

use crate::device::BlockDevice;
use crate::engine::{ALIGN, AlignedBuf, BufSlice};
use crate::redirect::{CallError, Client};
use crate::wire::{MAX_PAYLOAD, Status};

/// How long an I/O waits through a pause or a coordinator change before it fails.
pub const DEFAULT_IO_WAIT: Duration = Duration::from_secs(60);

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
    /// Deallocate a range (reads back zeroes).
    Discard {
        /// Offset in the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero a range.
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

    /// The same request restricted to `off..off + len` (inside its range).
    fn restricted(&self, off: u64, len: u64) -> Option<IoRequest> {
        Some(match self {
            IoRequest::Write { offset, data, fua } => IoRequest::Write {
                offset: off,
                data: data.slice((off - offset) as usize, len as usize)?,
                fua: *fua,
            },
            IoRequest::Discard { .. } => IoRequest::Discard { offset: off, len },
            IoRequest::WriteZeroes { .. } => IoRequest::WriteZeroes { offset: off, len },
            IoRequest::Read { .. } | IoRequest::Flush => return None,
        })
    }
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
    /// Direct I/O is allowed until then (`None`: never granted).
    lease_until: Mutex<Option<Instant>>,
    io_wait: Duration,
    /// One [`CsvNode::apply`] at a time.
    applying: tokio::sync::Mutex<()>,
}

struct Vol<D> {
    gate: tokio::sync::RwLock<VolState<D>>,
    /// Bumped after every change, for I/O waiting on a pause or a new coordinator.
    changed: watch::Sender<u64>,
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
                lease_until: Mutex::new(None),
                io_wait,
                applying: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
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
                        })
                    })
                    .clone()
            };
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
                    continue;
                }
                if g.epoch == v.epoch
                    && g.coordinator_addr == addr
                    && g.user_redirect == user_redirect
                {
                    continue;
                }
            }
            // The barrier: waits for in-flight I/O on this volume, holds new I/O.
            let mut g = vol.gate.write().await;
            g.epoch = v.epoch;
            g.disks = state
                .disks
                .values()
                .filter(|d| d.volume == *vid)
                .map(|d| (d.id, d.clone()))
                .collect();
            g.coordinator = v.coordinator;
            g.coordinator_addr = addr;
            g.user_redirect = user_redirect;
            drop(g);
            vol.changed.send_modify(|n| *n += 1);
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
        let seq = req
            .written_range()
            .map(|(off, len)| lock(&self.inner.writes).begin(disk, off, len));
        let res = self.execute_tracked(disk, &req, seq).await;
        if let Some(seq) = seq {
            lock(&self.inner.writes).finish(seq, res.is_ok());
        }
        res
    }

    async fn execute_tracked(
        &self,
        disk: DiskId,
        req: &IoRequest,
        seq: Option<u64>,
    ) -> Result<IoReply, IoError> {
        let deadline = Instant::now() + self.inner.io_wait;
        let mut attempt = 0u32;
        loop {
            let vol = self.volume_of(disk)?;
            let mut changed = vol.changed.subscribe();
            let g = vol.gate.read().await;
            let rec = g.disks.get(&disk).ok_or(IoError::NoSuchDisk(disk))?;
            validate(rec, req)?;
            // A retry sends only what no newer write of this node has overwritten meanwhile.
            let parts = match (attempt, seq) {
                (0, _) | (_, None) => vec![req.clone()],
                (_, Some(seq)) => {
                    let (off, len) = req.written_range().unwrap_or((0, 0));
                    lock(&self.inner.writes)
                        .uncovered(seq, disk, off, len)
                        .into_iter()
                        .filter_map(|(o, l)| req.restricted(o, l))
                        .collect()
                }
            };
            if parts.is_empty() {
                return Ok(IoReply::Done);
            }
            attempt += 1;
            let mode = self.mode_of(&g);
            let local = match (&g.device, mode) {
                (Some(a), IoMode::Direct) => Some(a.dev.clone()),
                // The coordinator serves everyone's I/O on its device, its own included.
                (Some(a), IoMode::Redirected(_)) if g.coordinator == self.inner.id => {
                    Some(a.dev.clone())
                }
                _ => None,
            };
            if let Some(dev) = local {
                let mut reply = IoReply::Done;
                let mut failed = None;
                for part in &parts {
                    match direct(&*dev, rec, part).await {
                        Ok(r) => reply = r,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                let Some(e) = failed else {
                    return Ok(reply);
                };
                drop(g);
                let vid = *read(&self.inner.disks)
                    .get(&disk)
                    .ok_or(IoError::NoSuchDisk(disk))?;
                self.detach(vid, format!("I/O failed: {e}")).await;
                continue;
            }
            if let IoMode::Paused(_) = mode {
                drop(g);
                if !wait_change(&mut changed, deadline, Duration::from_millis(250)).await {
                    return Err(IoError::Paused(format!(
                        "node {} cannot reach the cluster quorum",
                        self.inner.id
                    )));
                }
                continue;
            }
            let target = (g.coordinator != self.inner.id)
                .then(|| g.coordinator_addr.clone())
                .flatten();
            let epoch = g.epoch;
            drop(g);
            let Some(addr) = target else {
                // This node is the coordinator but has no device: wait for a new one.
                if !wait_change(&mut changed, deadline, Duration::from_millis(250)).await {
                    return Err(IoError::Unavailable(
                        "the coordinator has no path to the device".into(),
                    ));
                }
                continue;
            };
            let mut reply = IoReply::Done;
            let mut retry = None;
            for part in parts {
                match self
                    .inner
                    .client
                    .call(&addr, disk, epoch, &part, false)
                    .await
                {
                    Ok(r) => reply = r,
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
                return Ok(reply);
            };
            let why = format!("coordinator at {addr}: {why}");
            tracing::debug!(disk, error = %why, "redirected I/O will be retried");
            if !wait_change(&mut changed, deadline, Duration::from_millis(200)).await {
                return Err(IoError::Unavailable(why));
            }
        }
    }

    /// Serves one redirected I/O from a peer: only the coordinator, holding a lease and a
    /// device, executes it; anything else tells the peer to retry elsewhere or later.
    pub async fn execute_as_coordinator(
        &self,
        disk: DiskId,
        epoch: u64,
        req: IoRequest,
    ) -> Result<IoReply, IoError> {
        let deadline = Instant::now() + Duration::from_secs(5);
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
            validate(rec, &req)?;
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
            let dev = a.dev.clone();
            match direct(&*dev, rec, &req).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    drop(g);
                    let vid = *read(&self.inner.disks)
                        .get(&disk)
                        .ok_or(IoError::NoSuchDisk(disk))?;
                    self.detach(vid, format!("I/O failed: {e}")).await;
                    return Err(IoError::Unavailable(format!(
                        "coordinator {} lost its device path: {e}",
                        self.inner.id
                    )));
                }
            }
        }
    }

    /// Reads `len` bytes at `offset` of `disk`.
    pub async fn read(&self, disk: DiskId, offset: u64, len: u64) -> Result<AlignedBuf, IoError> {
        match self.execute(disk, IoRequest::Read { offset, len }).await? {
            IoReply::Data(d) => Ok(d),
            IoReply::Done => Err(IoError::Device("a read returned no data".into())),
        }
    }

    /// Writes `data` at `offset` of `disk`.
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

    /// Makes `disk`'s completed writes durable.
    pub async fn flush(&self, disk: DiskId) -> Result<(), IoError> {
        self.execute(disk, IoRequest::Flush).await.map(drop)
    }

    /// Deallocates a range of `disk`.
    pub async fn discard(&self, disk: DiskId, offset: u64, len: u64) -> Result<(), IoError> {
        self.execute(disk, IoRequest::Discard { offset, len })
            .await
            .map(drop)
    }

    /// Zeroes a range of `disk`.
    pub async fn write_zeroes(&self, disk: DiskId, offset: u64, len: u64) -> Result<(), IoError> {
        self.execute(disk, IoRequest::WriteZeroes { offset, len })
            .await
            .map(drop)
    }
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

/// Checks a request against the disk: aligned, non-empty, inside.
fn validate(rec: &DiskRecord, req: &IoRequest) -> Result<(), IoError> {
    let (offset, len) = match req {
        IoRequest::Flush => return Ok(()),
        IoRequest::Read { offset, len } => (*offset, *len),
        IoRequest::Write { offset, data, .. } => (*offset, data.len() as u64),
        IoRequest::Discard { offset, len } | IoRequest::WriteZeroes { offset, len } => {
            (*offset, *len)
        }
    };
    if len == 0 {
        return Err(IoError::BadRequest("an I/O of 0 bytes".into()));
    }
    let align = ALIGN as u64;
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(IoError::Unaligned(format!(
            "offset {offset} and length {len} must each be a multiple of {ALIGN} bytes"
        )));
    }
    if matches!(req, IoRequest::Read { .. } | IoRequest::Write { .. }) && len > MAX_PAYLOAD {
        return Err(IoError::BadRequest(format!(
            "{len} bytes is over the {MAX_PAYLOAD}-byte limit of one I/O"
        )));
    }
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

/// Runs a validated request on the device through the disk's extent map.
async fn direct<D: BlockDevice>(dev: &D, rec: &DiskRecord, req: &IoRequest) -> io::Result<IoReply> {
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
