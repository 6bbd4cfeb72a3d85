//! An async client for QEMU's machine protocol (QMP) on a Unix socket.
//!
//! ```text
//!   connect:  ◄── greeting {"QMP": {"version": …}}
//!             ──► {"execute": "qmp_capabilities", "id": 0}
//!             ◄── {"return": {}, "id": 0}                        (now in command mode)
//!
//!   Qmp::execute ─ register id ──► pending: id ─► oneshot ◄──────────────┐
//!        │                                                                │ reply, by "id"
//!        └─ one JSON line, under the writer lock ──► QEMU ──► reader task ┤
//!                                                                         │ event
//!                                  Qmp::events() subscribers ◄─ broadcast ◄┘
//! ```
//!
//! Every message is one JSON object on one line, both ways. Commands carry an `id` (a `u64`,
//! unique per connection, counting from 1; 0 is the capabilities negotiation) that QEMU echoes
//! in the reply, so any number of commands may be in flight and replies may come in any order.
//! Events (`SHUTDOWN`, `STOP`, `MIGRATION`, …) arrive at any time, interleaved with replies.
//!
//! One reader task per connection owns the read half: it hands each reply to the caller
//! waiting on its id and broadcasts each event. What QEMU sends is input from another process:
//! a line that is not JSON, not an object of a known shape, or a reply to an id nobody waits
//! for is logged and skipped. A line longer than 16 MiB ends the connection.
//!
//! When the socket reaches end of file or fails, the connection is closed: every command
//! waiting for a reply and every later command fails with [`QmpError::Closed`], and
//! [`Qmp::closed`] resolves. Dropping the last [`Qmp`] clone stops the reader task and closes
//! the socket.
//!
//! Classifying a received line (`parse_message`) and framing a command (`encode_command`)
//! are pure functions; the tokio part only moves lines.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long [`Qmp::execute`] waits for a command's reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line accepted from QEMU; a longer one ends the connection.
const MAX_LINE: usize = 16 << 20;

/// Events buffered for each subscriber; one that falls further behind loses the oldest
/// (its receiver reports `Lagged`) instead of holding up the reader.
const EVENT_CAPACITY: usize = 256;

/// The pause between attempts of [`Qmp::connect_retry`].
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// The id of the `qmp_capabilities` command sent while connecting; commands count from 1.
const CAPABILITIES_ID: u64 = 0;

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to, reading from or writing to the socket failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// The connection has ended (QEMU quit or died, or the socket failed) before the reply
    /// arrived, or had already ended when the command was issued.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// No reply within the time allowed. The command may still run in QEMU; its late reply
    /// is dropped.
    #[error("QMP command {command} got no answer within {timeout:?}")]
    Timeout {
        /// The command that was sent.
        command: String,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// QEMU ran the command and answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// QEMU sent something this client cannot make sense of where it needed an answer (a bad
    /// greeting, a reply of the wrong shape, an overlong line).
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// A QEMU version, as announced in the QMP greeting. Orders by major, minor, then micro, so
/// feature checks read `qmp.version() >= QemuVersion { major: 9, minor: 1, micro: 0 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major version, e.g. 10 in 10.0.2.
    pub major: u32,
    /// Minor version, e.g. 0 in 10.0.2.
    pub minor: u32,
    /// Micro version, e.g. 2 in 10.0.2.
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    /// Formats as `major.minor.micro`, e.g. `10.0.2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// An asynchronous event from QEMU, e.g. `SHUTDOWN`, `STOP`, `RESUME`, `MIGRATION`.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// The event's name, e.g. `SHUTDOWN`.
    pub name: String,
    /// The event's `data` member, [`Value::Null`] when the event has none.
    pub data: Value,
    /// When QEMU emitted the event, in microseconds since the Unix epoch (0 when QEMU gave
    /// no usable timestamp).
    pub timestamp_us: u64,
}

/// QEMU's run state: the `status` of `query-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// `running`: the guest's CPUs run.
    Running,
    /// `paused`: stopped by `stop` (or `-S` after `cont` then `stop`).
    Paused,
    /// `prelaunch`: started with `-S`, never run yet.
    Prelaunch,
    /// `inmigrate`: waiting for or receiving an incoming migration.
    InMigrate,
    /// `postmigrate`: the source after a completed outgoing migration.
    PostMigrate,
    /// `finish-migrate`: the source in the final, stopped phase of a migration.
    FinishMigrate,
    /// `shutdown`: the guest shut down (QEMU stays because of `-no-shutdown`).
    Shutdown,
    /// `guest-panicked`: the guest reported a panic.
    GuestPanicked,
    /// `internal-error`: an emulation error stopped the guest.
    InternalError,
    /// `io-error`: a disk error stopped the guest (`werror=stop`/`rerror=stop`).
    IoError,
    /// `suspended`: the guest suspended itself (S3).
    Suspended,
    /// `watchdog`: a watchdog fired with action `pause`.
    Watchdog,
    /// `save-vm`: a snapshot is being saved.
    SaveVm,
    /// `restore-vm`: a snapshot is being restored.
    RestoreVm,
    /// `debug`: stopped by the gdb stub.
    Debug,
    /// `colo`: in COLO fault-tolerance mode.
    ColoState,
    /// A state this client does not know, kept verbatim.
    Other(String),
}

impl RunState {
    /// The state as QMP spells it, e.g. `finish-migrate`.
    pub fn as_str(&self) -> &str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Prelaunch => "prelaunch",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Shutdown => "shutdown",
            RunState::GuestPanicked => "guest-panicked",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::SaveVm => "save-vm",
            RunState::RestoreVm => "restore-vm",
            RunState::Debug => "debug",
            RunState::ColoState => "colo",
            RunState::Other(s) => s,
        }
    }
}

impl FromStr for RunState {
    type Err = Infallible;

    /// Parses QMP's spelling; an unknown state becomes [`RunState::Other`], so this never
    /// fails.
    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "prelaunch" => RunState::Prelaunch,
            "inmigrate" => RunState::InMigrate,
            "postmigrate" => RunState::PostMigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "shutdown" => RunState::Shutdown,
            "guest-panicked" => RunState::GuestPanicked,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            "suspended" => RunState::Suspended,
            "watchdog" => RunState::Watchdog,
            "save-vm" => RunState::SaveVm,
            "restore-vm" => RunState::RestoreVm,
            "debug" => RunState::Debug,
            "colo" => RunState::ColoState,
            other => RunState::Other(other.to_owned()),
        })
    }
}

impl From<&str> for RunState {
    /// Same as [`FromStr`]: unknown states become [`RunState::Other`].
    fn from(s: &str) -> Self {
        match s.parse() {
            Ok(state) => state,
            Err(never) => match never {},
        }
    }
}

impl fmt::Display for RunState {
    /// Formats as QMP spells the state.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of `query-migrate` a migration orchestrator needs. Every field is optional in
/// QEMU's reply (before any migration the reply is `{}`); absent fields take their defaults
/// and unknown ones are ignored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MigrationInfo {
    /// `none` (or absent), `setup`, `active`, `pre-switchover`, `device`, `postcopy-active`,
    /// `completed`, `failed`, `cancelling`, `cancelled`, `wait-unplug`, …
    pub status: Option<String>,
    /// Milliseconds since the migration started (or its total once completed).
    #[serde(rename = "total-time")]
    pub total_time: Option<u64>,
    /// The guest's actual downtime in milliseconds, once completed.
    pub downtime: Option<u64>,
    /// QEMU's estimate of the downtime in milliseconds, while active.
    #[serde(rename = "expected-downtime")]
    pub expected_downtime: Option<u64>,
    /// Milliseconds spent in the setup phase.
    #[serde(rename = "setup-time")]
    pub setup_time: Option<u64>,
    /// Why the migration failed, when it did.
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
    /// RAM transfer statistics, once the migration is past setup.
    pub ram: Option<RamStats>,
}

/// RAM statistics of `query-migrate`; absent fields are 0.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RamStats {
    /// Bytes transferred so far.
    pub transferred: u64,
    /// Bytes still to transfer (dirty RAM).
    pub remaining: u64,
    /// The guest's total RAM in bytes.
    pub total: u64,
    /// Pages found to be all zeroes (sent without their contents).
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    /// Pages dirtied per second, as last measured.
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Passes over the dirty bitmap so far.
    #[serde(rename = "dirty-sync-count")]
    pub dirty_sync_count: u64,
    /// The target page size in bytes.
    #[serde(rename = "page-size")]
    pub page_size: u64,
    /// Bytes sent during the precopy phase.
    #[serde(rename = "precopy-bytes")]
    pub precopy_bytes: u64,
    /// Bytes sent during the postcopy phase.
    #[serde(rename = "postcopy-bytes")]
    pub postcopy_bytes: u64,
}

/// A connection to one QEMU's QMP socket. Cheap to clone: all clones share the connection,
/// and it closes when the last one is dropped.
#[derive(Clone, Debug)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl Qmp {
    /// Connects to the socket at `path`, reads the greeting and negotiates capabilities, all
    /// within `timeout`. A server that does not finish the handshake in time gives
    /// [`QmpError::Timeout`] for `qmp_capabilities`; a missing socket or a refused connection
    /// gives [`QmpError::Io`] at once.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        match tokio::time::timeout(timeout, handshake(path)).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                command: "qmp_capabilities".to_owned(),
                timeout,
            }),
        }
    }

    /// Connects like [`Qmp::connect`], retrying every 50 ms while the socket does not exist
    /// yet or refuses connections (QEMU still starting), until `timeout` has passed in all.
    /// Other errors end the attempts at once. When time runs out, returns the last attempt's
    /// error.
    pub async fn connect_retry(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match Qmp::connect(path, left).await {
                Ok(qmp) => return Ok(qmp),
                Err(QmpError::Io(e)) if is_not_listening(&e) => QmpError::Io(e),
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(err);
            }
            tracing::debug!(path = %path.display(), error = %err, "qmp: not listening yet");
            tokio::time::sleep(RETRY_INTERVAL.min(deadline - now)).await;
        }
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.inner.version
    }

    /// Runs `command` with `arguments` (`None`: the request has no `arguments` member) and
    /// returns its `return` value, waiting at most [`DEFAULT_TIMEOUT`] (30 s).
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_TIMEOUT)
            .await
    }

    /// Runs `command` with `arguments` (`None`: no `arguments` member) and returns its
    /// `return` value, waiting at most `timeout` for it.
    ///
    /// An error reply gives [`QmpError::Command`]; no reply in time gives
    /// [`QmpError::Timeout`] (QEMU may still run the command; the late reply is dropped). A
    /// closed connection gives [`QmpError::Closed`]. If QEMU stops reading its socket so that
    /// the timeout strikes in the middle of writing the command, the stream can no longer be
    /// framed and the connection is closed.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let shared = &*self.inner.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let line = encode_command(command, arguments.as_ref(), id);
        let reply = shared.register(id)?;
        // Removes the entry however this ends: reply, timeout, error or the caller giving up.
        let _pending = PendingGuard { shared, id };
        tracing::trace!(command, id, "qmp: execute");
        let outcome = tokio::time::timeout(timeout, async {
            self.inner.write_line(&line).await?;
            reply.await.map_err(|_| QmpError::Closed)
        })
        .await;
        match outcome {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(failure))) => Err(failure.into_error(command)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                timeout,
            }),
        }
    }

    /// Subscribes to the events received from now on. A subscriber that falls more than 256
    /// events behind loses the oldest (`RecvError::Lagged`). Once the connection has closed,
    /// the receiver yields what it had buffered, then `RecvError::Closed`.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        match lock(&self.inner.shared.events).as_ref() {
            Some(events) => events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Resolves when the connection has ended (QEMU quit or died, or the socket failed);
    /// at once if it already has.
    pub async fn closed(&self) {
        let mut closed = self.inner.shared.closed.subscribe();
        // The sender lives as long as `self`, so this only returns once closed.
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed.borrow()
    }

    /// QEMU's run state (`query-status`).
    pub async fn query_status(&self) -> Result<RunState, QmpError> {
        let status = self.execute("query-status", None).await?;
        match status.get("status").and_then(Value::as_str) {
            Some(state) => Ok(RunState::from(state)),
            None => Err(QmpError::Protocol(format!(
                "query-status returned no status: {status}"
            ))),
        }
    }

    /// Pauses the guest's CPUs (`stop`).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes the guest's CPUs (`cont`), also the first start of a guest begun with `-S`.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// Asks the guest to power off, like pressing its power button (`system_powerdown`).
    /// Returns once QEMU has injected the request, not when the guest is down.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// Makes QEMU exit at once (`quit`). QEMU may close the socket before or after it replies:
    /// both are success. A connection that had already closed before the command was sent
    /// gives [`QmpError::Closed`], since then this call did not make QEMU quit.
    pub async fn quit(&self) -> Result<(), QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The state and statistics of the current or last outgoing migration (`query-migrate`).
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        let info = self.execute("query-migrate", None).await?;
        serde_json::from_value(info)
            .map_err(|e| QmpError::Protocol(format!("query-migrate returned {e}")))
    }
}

/// The state shared by a connection's handles and its reader task.
#[derive(Debug)]
struct Shared {
    /// The socket, for log messages.
    path: PathBuf,
    pending: Mutex<Pending>,
    /// The next command id.
    next_id: AtomicU64,
    /// Taken (dropped) when the connection closes, which ends every subscriber's stream.
    events: Mutex<Option<broadcast::Sender<QmpEvent>>>,
    /// Becomes true, once, when the connection closes.
    closed: watch::Sender<bool>,
}

/// A command's outcome as the reader delivers it.
type Reply = Result<Value, CommandFailure>;

/// Commands waiting for their reply.
#[derive(Debug, Default)]
struct Pending {
    /// Set when the connection closes; nothing registers after that.
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
}

impl Shared {
    /// Registers a waiter for the reply to `id`, unless the connection has closed.
    fn register(&self, id: u64) -> Result<oneshot::Receiver<Reply>, QmpError> {
        let mut pending = lock(&self.pending);
        if pending.closed {
            return Err(QmpError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        pending.waiters.insert(id, tx);
        Ok(rx)
    }

    /// Ends the connection: fails every waiting command with [`QmpError::Closed`] (by
    /// dropping its sender), ends event streams and wakes [`Qmp::closed`]. Idempotent.
    fn close(&self) {
        let waiters = {
            let mut pending = lock(&self.pending);
            pending.closed = true;
            std::mem::take(&mut pending.waiters)
        };
        drop(waiters);
        lock(&self.events).take();
        self.closed.send_replace(true);
    }

    /// Acts on one line from QEMU.
    fn dispatch(&self, line: &[u8]) {
        let message = match parse_message(line) {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, line = %excerpt(line),
                    "qmp: skipping a line from QEMU");
                return;
            }
        };
        match message {
            Message::Reply { id, result } => {
                let Some(id) = id.as_ref().and_then(Value::as_u64) else {
                    tracing::warn!(path = %self.path.display(), line = %excerpt(line),
                        "qmp: skipping a reply without a usable id");
                    return;
                };
                let waiter = lock(&self.pending).waiters.remove(&id);
                match waiter {
                    // The caller may have just given up; then nobody wants the reply.
                    Some(waiter) => drop(waiter.send(result)),
                    None if id < self.next_id.load(Ordering::Relaxed) => {
                        tracing::debug!(path = %self.path.display(), id,
                            "qmp: dropping the late reply to an abandoned command");
                    }
                    None => {
                        tracing::warn!(path = %self.path.display(), id,
                            "qmp: skipping a reply to a command never sent");
                    }
                }
            }
            Message::Event(event) => {
                tracing::debug!(path = %self.path.display(), event = %event.name, "qmp: event");
                if let Some(events) = lock(&self.events).as_ref() {
                    // An error only means nobody is subscribed.
                    let _ = events.send(event);
                }
            }
            Message::Greeting(_) => {
                tracing::warn!(path = %self.path.display(),
                    "qmp: skipping a second greeting");
            }
        }
    }
}

/// The connection behind every clone of a [`Qmp`].
struct Inner {
    shared: Arc<Shared>,
    version: QemuVersion,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// The reader task, stopped when the last handle goes.
    reader: JoinHandle<()>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("path", &self.shared.path)
            .field("version", &self.version)
            .field("closed", &*self.shared.closed.borrow())
            .field("pending", &lock(&self.shared.pending).waiters.len())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Inner {
    /// Writes one framed command. A write that fails, or that the caller abandons after part
    /// of the line went out, leaves the stream unframeable: the connection is closed.
    async fn write_line(&self, line: &[u8]) -> Result<(), QmpError> {
        let mut writer = self.writer.lock().await;
        let mut progress = WriteProgress {
            inner: self,
            written: 0,
            len: line.len(),
        };
        while progress.written < line.len() {
            match writer.write(&line[progress.written..]).await {
                Ok(0) => {
                    self.fail("the socket accepts no more data");
                    return Err(QmpError::Closed);
                }
                Ok(n) => progress.written += n,
                Err(e) => {
                    self.fail(&format!("writing a command failed: {e}"));
                    return Err(match e.kind() {
                        std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::NotConnected => QmpError::Closed,
                        _ => QmpError::Io(e),
                    });
                }
            }
        }
        Ok(())
    }

    /// Closes the connection from this side after a failure of `reason`.
    fn fail(&self, reason: &str) {
        if !*self.shared.closed.borrow() {
            tracing::warn!(path = %self.shared.path.display(), reason,
                "qmp: closing the connection");
        }
        self.reader.abort();
        self.shared.close();
    }
}

/// How far a command's line got onto the socket; closes the connection if dropped part-way.
struct WriteProgress<'a> {
    inner: &'a Inner,
    written: usize,
    len: usize,
}

impl Drop for WriteProgress<'_> {
    fn drop(&mut self) {
        if self.written > 0 && self.written < self.len {
            self.inner
                .fail("a command was abandoned part-way through being written");
        }
    }
}

/// Removes a command's waiter when the command is done with, one way or another.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).waiters.remove(&self.id);
    }
}

/// Closes the connection when the reader task ends, however it ends.
struct CloseOnExit(Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Connects, reads the greeting, negotiates capabilities and starts the reader task.
async fn handshake(path: &Path) -> Result<Qmp, QmpError> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();

    if !read_line(&mut reader, &mut line, MAX_LINE).await? {
        return Err(QmpError::Closed);
    }
    let version = match parse_message(&line) {
        Ok(Some(Message::Greeting(version))) => version,
        Ok(_) => {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {}",
                excerpt(&line)
            )));
        }
        Err(e) => return Err(QmpError::Protocol(format!("bad QMP greeting: {e}"))),
    };

    write
        .write_all(&encode_command("qmp_capabilities", None, CAPABILITIES_ID))
        .await?;
    loop {
        if !read_line(&mut reader, &mut line, MAX_LINE).await? {
            return Err(QmpError::Closed);
        }
        match parse_message(&line) {
            Ok(Some(Message::Reply { id, result }))
                if id.as_ref().and_then(Value::as_u64) == Some(CAPABILITIES_ID) =>
            {
                result.map_err(|failure| failure.into_error("qmp_capabilities"))?;
                break;
            }
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::warn!(path = %path.display(), line = %excerpt(&line),
                    "qmp: skipping a message while negotiating capabilities");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, line = %excerpt(&line),
                    "qmp: skipping a line from QEMU");
            }
        }
    }

    let shared = Arc::new(Shared {
        path: path.to_owned(),
        pending: Mutex::new(Pending::default()),
        next_id: AtomicU64::new(CAPABILITIES_ID + 1),
        events: Mutex::new(Some(broadcast::channel(EVENT_CAPACITY).0)),
        closed: watch::channel(false).0,
    });
    let reader = tokio::spawn(read_messages(shared.clone(), reader));
    tracing::debug!(path = %path.display(), %version, "qmp: connected");
    Ok(Qmp {
        inner: Arc::new(Inner {
            shared,
            version,
            writer: tokio::sync::Mutex::new(write),
            reader,
        }),
    })
}

/// The reader task: dispatches lines until the socket ends, then closes the connection.
async fn read_messages(shared: Arc<Shared>, mut reader: BufReader<OwnedReadHalf>) {
    let _close = CloseOnExit(shared.clone());
    let mut line = Vec::with_capacity(4096);
    loop {
        match read_line(&mut reader, &mut line, MAX_LINE).await {
            Ok(true) => shared.dispatch(&line),
            Ok(false) => {
                tracing::debug!(path = %shared.path.display(), "qmp: QEMU closed the connection");
                return;
            }
            Err(e) => {
                tracing::warn!(path = %shared.path.display(), error = %e,
                    "qmp: the connection failed");
                return;
            }
        }
        // Give back the memory of an unusually long line.
        line.shrink_to(64 << 10);
    }
}

/// Reads one line (up to and including `\n`) into `line`, replacing its contents. Returns
/// false at end of file with nothing read; a last line without `\n` counts as a line. A
/// line longer than `max` bytes is a protocol error.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> Result<bool, QmpError> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(!line.is_empty());
        }
        let (take, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > max {
            return Err(QmpError::Protocol(format!(
                "QEMU sent a line longer than {max} bytes"
            )));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if complete {
            return Ok(true);
        }
    }
}

/// A command as QMP wants it on the wire.
#[derive(Serialize)]
struct Request<'a> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a Value>,
    id: u64,
}

/// Frames a command: one JSON object and `\n`. (JSON strings escape newlines, so the object
/// never spans lines.)
fn encode_command(command: &str, arguments: Option<&Value>, id: u64) -> Vec<u8> {
    let request = Request {
        execute: command,
        arguments,
        id,
    };
    // Serializing a `Value` and plain strings cannot fail: every map key is a string.
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    line
}

/// An error reply's contents, before it is tied to its command's name.
#[derive(Clone, Debug, PartialEq, Deserialize)]
struct CommandFailure {
    class: String,
    desc: String,
}

impl CommandFailure {
    fn into_error(self, command: &str) -> QmpError {
        QmpError::Command {
            command: command.to_owned(),
            class: self.class,
            desc: self.desc,
        }
    }
}

/// One line from QEMU, classified.
#[derive(Debug, PartialEq)]
enum Message {
    /// `{"QMP": {"version": {"qemu": …}, …}}`, sent once on connect.
    Greeting(QemuVersion),
    /// `{"return": …, "id": …}` or `{"error": {"class": …, "desc": …}, "id": …}`; `id` is
    /// whatever QEMU echoed, if anything.
    Reply { id: Option<Value>, result: Reply },
    /// `{"event": …, "data": …, "timestamp": …}`.
    Event(QmpEvent),
}

#[derive(Deserialize)]
struct Greeting {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
}

/// Classifies one line from QEMU. `Ok(None)` for a blank line; `Err` describes a line that
/// is not JSON or not an object of a known shape.
fn parse_message(line: &[u8]) -> Result<Option<Message>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err("not a JSON object".to_owned());
    };
    if let Some(greeting) = object.remove("QMP") {
        let greeting: Greeting =
            serde_json::from_value(greeting).map_err(|e| format!("malformed greeting: {e}"))?;
        return Ok(Some(Message::Greeting(greeting.version.qemu)));
    }
    if let Some(name) = object.remove("event") {
        let Value::String(name) = name else {
            return Err("an event whose name is not a string".to_owned());
        };
        let data = object.remove("data").unwrap_or(Value::Null);
        let timestamp_us = object.get("timestamp").map_or(0, timestamp_us);
        return Ok(Some(Message::Event(QmpEvent {
            name,
            data,
            timestamp_us,
        })));
    }
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(Some(Message::Reply {
            id,
            result: Ok(value),
        }));
    }
    if let Some(error) = object.remove("error") {
        let failure: CommandFailure =
            serde_json::from_value(error).map_err(|e| format!("malformed error reply: {e}"))?;
        return Ok(Some(Message::Reply {
            id,
            result: Err(failure),
        }));
    }
    Err("an object that is neither greeting, reply nor event".to_owned())
}

/// An event's `{"seconds": s, "microseconds": us}` in microseconds; 0 if unusable.
fn timestamp_us(timestamp: &Value) -> u64 {
    let part = |name| timestamp.get(name).and_then(Value::as_u64).unwrap_or(0);
    part("seconds")
        .saturating_mul(1_000_000)
        .saturating_add(part("microseconds"))
}

/// The start of a line, for log messages.
fn excerpt(line: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    let text = text.trim_end();
    if line.len() > MAX {
        format!("{text}… ({} bytes)", line.len())
    } else {
        text.to_owned()
    }
}

/// Whether connecting failed because nothing listens on the socket (yet).
fn is_not_listening(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// Locks a mutex, carrying on if a panic poisoned it (the protected maps stay consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::future::Future;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "v10.0.2"}, "capabilities": ["oob"]}}"#;

    /// Fails the test instead of hanging when `future` takes more than 5 s.
    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("timed out")
    }

    /// QEMU's side of one connection, past the handshake.
    struct FakeQemu {
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
    }

    impl FakeQemu {
        /// Accepts a client, greets it and answers its `qmp_capabilities`.
        async fn accept(listener: &UnixListener) -> FakeQemu {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, writer) = stream.into_split();
            let mut fake = FakeQemu {
                reader: BufReader::new(read),
                writer,
            };
            fake.send(GREETING).await;
            let caps = fake.recv().await;
            assert_eq!(caps["execute"], "qmp_capabilities");
            assert!(caps.get("arguments").is_none());
            fake.send(&json!({"return": {}, "id": caps["id"]}).to_string())
                .await;
            fake
        }

        /// The next command from the client.
        async fn recv(&mut self) -> Value {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.unwrap();
            assert!(n > 0, "the client closed the connection");
            assert!(line.ends_with('\n'));
            serde_json::from_str(&line).unwrap()
        }

        /// Sends `line` the way QEMU does, ended by CR LF.
        async fn send(&mut self, line: &str) {
            self.send_raw(format!("{line}\r\n").as_bytes()).await;
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.unwrap();
        }

        /// Answers `command` with `value`.
        async fn reply(&mut self, command: &Value, value: Value) {
            self.send(&json!({"return": value, "id": command["id"]}).to_string())
                .await;
        }
    }

    /// Binds a socket in a fresh directory and plays QEMU for one client with `script`.
    /// Keep the directory alive; await the task to surface the script's assertion failures.
    fn serve<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
    where
        F: FnOnce(FakeQemu) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move { script(FakeQemu::accept(&listener).await).await });
        (dir, path, task)
    }

    async fn connect(path: &Path) -> Qmp {
        Qmp::connect(path, Duration::from_secs(2)).await.unwrap()
    }

    // ---- pure protocol functions ----

    #[test]
    fn test_parse_message_greeting() {
        assert_eq!(
            parse_message(GREETING.as_bytes()).unwrap(),
            Some(Message::Greeting(QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            }))
        );
        assert!(parse_message(br#"{"QMP": {"version": {"qemu": {"major": 10}}}}"#).is_err());
    }

    #[test]
    fn test_parse_message_replies_and_events() {
        assert_eq!(
            parse_message(b"{\"return\": {\"a\": 1}, \"id\": 7}\r\n").unwrap(),
            Some(Message::Reply {
                id: Some(json!(7)),
                result: Ok(json!({"a": 1}))
            })
        );
        assert_eq!(
            parse_message(br#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "no"}}"#)
                .unwrap(),
            Some(Message::Reply {
                id: Some(json!(3)),
                result: Err(CommandFailure {
                    class: "CommandNotFound".into(),
                    desc: "no".into()
                })
            })
        );
        assert_eq!(
            parse_message(br#"{"return": {}}"#).unwrap(),
            Some(Message::Reply {
                id: None,
                result: Ok(json!({}))
            })
        );
        assert_eq!(
            parse_message(
                br#"{"timestamp": {"seconds": 1795676689, "microseconds": 679710}, "event": "SHUTDOWN", "data": {"guest": false}}"#
            )
            .unwrap(),
            Some(Message::Event(QmpEvent {
                name: "SHUTDOWN".into(),
                data: json!({"guest": false}),
                timestamp_us: 1_795_676_689_679_710,
            }))
        );
        assert_eq!(
            parse_message(br#"{"event": "STOP", "timestamp": {"seconds": -1}}"#).unwrap(),
            Some(Message::Event(QmpEvent {
                name: "STOP".into(),
                data: Value::Null,
                timestamp_us: 0,
            }))
        );
    }

    #[test]
    fn test_parse_message_rejects_unknown_shapes() {
        assert_eq!(parse_message(b"\r\n").unwrap(), None);
        for line in [
            &b"not json"[..],
            b"[1, 2]",
            b"42",
            b"{\"foo\": 1}",
            b"{\"event\": 5}",
            b"{\"error\": \"oops\", \"id\": 1}",
            b"{\"return\": 1",
            b"\xff\xfe",
        ] {
            assert!(
                parse_message(line).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn test_encode_command_frames_one_line() {
        assert_eq!(
            encode_command("stop", None, 4),
            b"{\"execute\":\"stop\",\"id\":4}\n"
        );
        let line = encode_command("x", Some(&json!({"s": "a\nb"})), 5);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"execute": "x", "arguments": {"s": "a\nb"}, "id": 5})
        );
    }

    #[tokio::test]
    async fn test_read_line_splits_and_caps_lines() {
        let mut input: &[u8] = b"{\"a\":1}\r\n\nlast";
        let mut line = Vec::new();
        assert!(read_line(&mut input, &mut line, 64).await.unwrap());
        assert_eq!(line, b"{\"a\":1}\r\n");
        assert!(read_line(&mut input, &mut line, 64).await.unwrap());
        assert_eq!(line, b"\n");
        assert!(read_line(&mut input, &mut line, 64).await.unwrap());
        assert_eq!(line, b"last");
        assert!(!read_line(&mut input, &mut line, 64).await.unwrap());

        let mut input: &[u8] = b"0123456789\n";
        assert!(read_line(&mut input, &mut line, 11).await.unwrap());
        let mut input: &[u8] = b"0123456789\n";
        assert!(matches!(
            read_line(&mut input, &mut line, 10).await,
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn test_run_state_round_trips() {
        for s in [
            "running",
            "paused",
            "prelaunch",
            "inmigrate",
            "postmigrate",
            "finish-migrate",
            "shutdown",
            "guest-panicked",
            "internal-error",
            "io-error",
            "suspended",
            "watchdog",
            "save-vm",
            "restore-vm",
            "debug",
            "colo",
        ] {
            let state = RunState::from(s);
            assert!(!matches!(state, RunState::Other(_)), "{s}");
            assert_eq!(state.as_str(), s);
            assert_eq!(state.to_string(), s);
        }
        assert_eq!(RunState::from("finish-migrate"), RunState::FinishMigrate);
        assert_eq!("colo".parse(), Ok(RunState::ColoState));
        assert_eq!(
            RunState::from("new-state"),
            RunState::Other("new-state".into())
        );
        assert_eq!(RunState::from("new-state").as_str(), "new-state");
    }

    #[test]
    fn test_qemu_version_display_and_order() {
        let v = |major, minor, micro| QemuVersion {
            major,
            minor,
            micro,
        };
        assert_eq!(v(10, 0, 2).to_string(), "10.0.2");
        assert!(v(10, 0, 2) > v(9, 2, 9));
        assert!(v(9, 1, 0) > v(9, 0, 5));
        assert!(v(9, 1, 1) > v(9, 1, 0));
    }

    #[test]
    fn test_migration_info_defaults_and_fields() {
        let empty: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty, MigrationInfo::default());

        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "active",
            "total-time": 1500,
            "expected-downtime": 300,
            "setup-time": 12,
            "blocked": false,
            "ram": {
                "transferred": 1000, "remaining": 2000, "total": 4096, "duplicate": 5,
                "normal": 6, "dirty-pages-rate": 7, "mbps": 812.5, "dirty-sync-count": 2,
                "page-size": 4096, "precopy-bytes": 900, "postcopy-bytes": 0,
                "normal-bytes": 24576, "multifd-bytes": 0
            }
        }))
        .unwrap();
        assert_eq!(info.status.as_deref(), Some("active"));
        assert_eq!(info.total_time, Some(1500));
        assert_eq!(info.expected_downtime, Some(300));
        assert_eq!(info.setup_time, Some(12));
        assert_eq!(info.downtime, None);
        assert_eq!(info.error_desc, None);
        let ram = info.ram.unwrap();
        assert_eq!(ram.transferred, 1000);
        assert_eq!(ram.remaining, 2000);
        assert_eq!(ram.dirty_pages_rate, 7);
        assert_eq!(ram.mbps, 812.5);
        assert_eq!(ram.dirty_sync_count, 2);
        assert_eq!(ram.page_size, 4096);
        assert_eq!(ram.precopy_bytes, 900);

        let ram: RamStats = serde_json::from_value(json!({"total": 1})).unwrap();
        assert_eq!(
            ram,
            RamStats {
                total: 1,
                ..RamStats::default()
            }
        );
    }

    // ---- against a fake QEMU ----

    #[tokio::test]
    async fn test_qmp_connect_reads_version() {
        let (_dir, path, server) = serve(|_fake| async {});
        let qmp = within(connect(&path)).await;
        assert_eq!(
            qmp.version(),
            QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            }
        );
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_execute_returns_value() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "query-version");
            assert!(cmd.get("arguments").is_none());
            fake.reply(&cmd, json!({"qemu": {"major": 10}})).await;
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "human-monitor-command");
            assert_eq!(cmd["arguments"], json!({"command-line": "info"}));
            assert_ne!(cmd["id"], json!(0));
            fake.reply(&cmd, json!("ok")).await;
            // Keep the socket open until the client is done.
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        let value = within(qmp.execute("query-version", None)).await.unwrap();
        assert_eq!(value, json!({"qemu": {"major": 10}}));
        let value = within(qmp.execute(
            "human-monitor-command",
            Some(json!({"command-line": "info"})),
        ))
        .await
        .unwrap();
        assert_eq!(value, json!("ok"));
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_error_reply_maps_to_command_error() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let cmd = fake.recv().await;
            let reply = json!({"id": cmd["id"], "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}});
            fake.send(&reply.to_string()).await;
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        let err = within(qmp.execute("device_del", Some(json!({"id": "x"}))))
            .await
            .unwrap_err();
        match err {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "device_del");
                assert_eq!(class, "DeviceNotFound");
                assert_eq!(desc, "Device 'x' not found");
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_replies_out_of_order() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let first = fake.recv().await;
            let second = fake.recv().await;
            assert_ne!(first["id"], second["id"]);
            // Answer the second first; each answer names its command.
            fake.reply(&second, second["execute"].clone()).await;
            fake.reply(&first, first["execute"].clone()).await;
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        let (a, b) =
            within(async { tokio::join!(qmp.execute("a", None), qmp.execute("b", None)) }).await;
        assert_eq!(a.unwrap(), json!("a"));
        assert_eq!(b.unwrap(), json!("b"));
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_event_before_reply_reaches_subscriber() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let cmd = fake.recv().await;
            fake.send(r#"{"timestamp": {"seconds": 10, "microseconds": 5}, "event": "STOP"}"#)
                .await;
            fake.reply(&cmd, json!({})).await;
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        let mut events = qmp.events();
        within(qmp.stop()).await.unwrap();
        let event = within(events.recv()).await.unwrap();
        assert_eq!(
            event,
            QmpEvent {
                name: "STOP".into(),
                data: Value::Null,
                timestamp_us: 10_000_005,
            }
        );
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_garbage_lines_skipped() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let cmd = fake.recv().await;
            fake.send_raw(b"not json\r\n\r\n[1,2]\r\n\xff\xfe\r\n{\"foo\": 1}\r\n")
                .await;
            fake.send(r#"{"return": 1, "id": 999999}"#).await;
            fake.send(r#"{"return": 1, "id": "text"}"#).await;
            fake.send(r#"{"return": 1}"#).await;
            fake.send(&json!({"error": "malformed", "id": 12345}).to_string())
                .await;
            fake.send(GREETING).await;
            fake.reply(&cmd, json!("fine")).await;
            let cmd = fake.recv().await;
            fake.reply(&cmd, json!("still fine")).await;
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        assert_eq!(
            within(qmp.execute("one", None)).await.unwrap(),
            json!("fine")
        );
        assert_eq!(
            within(qmp.execute("two", None)).await.unwrap(),
            json!("still fine")
        );
        assert!(!qmp.is_closed());
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_server_close_fails_pending_commands() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "query-status");
            // Drop the connection without answering.
        });
        let qmp = within(connect(&path)).await;
        let mut events = qmp.events();
        let err = within(qmp.query_status()).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
        within(qmp.closed()).await;
        assert!(qmp.is_closed());
        // Waiters arriving after the close, and clones, see it too.
        within(qmp.clone().closed()).await;
        let err = within(qmp.execute("cont", None)).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
        assert!(matches!(
            within(events.recv()).await,
            Err(broadcast::error::RecvError::Closed)
        ));
        assert!(matches!(
            within(qmp.events().recv()).await,
            Err(broadcast::error::RecvError::Closed)
        ));
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_timeout_then_later_command_works() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let slow = fake.recv().await;
            let fast = fake.recv().await;
            // The slow reply comes too late: it must be dropped, not confuse `fast`.
            fake.reply(&slow, json!("slow")).await;
            fake.reply(&fast, json!("fast")).await;
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        let started = Instant::now();
        let err = within(qmp.execute_timeout("slow", None, Duration::from_millis(200)))
            .await
            .unwrap_err();
        match err {
            QmpError::Timeout { command, timeout } => {
                assert_eq!(command, "slow");
                assert_eq!(timeout, Duration::from_millis(200));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(lock(&qmp.inner.shared.pending).waiters.len(), 0);
        assert_eq!(
            within(qmp.execute("fast", None)).await.unwrap(),
            json!("fast")
        );
        assert!(!qmp.is_closed());
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_timeout_mid_write_closes_connection() {
        const BIG: usize = 4 << 20;
        let (timed_out, wait) = tokio::sync::oneshot::channel::<()>();
        let (_dir, path, server) = serve(|mut fake| async move {
            // Read nothing while the client's write is stuck on a full socket buffer, until
            // its timeout has passed (however late a loaded machine runs the timer).
            let _ = wait.await;
            let mut rest = Vec::new();
            fake.reader.read_to_end(&mut rest).await.unwrap();
            assert!(rest.len() < BIG, "the whole command went out");
        });
        let qmp = within(connect(&path)).await;
        let big = Some(json!({ "blob": "x".repeat(BIG) }));
        let err = within(qmp.execute_timeout("stuck", big, Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        let _ = timed_out.send(());
        // Half a command is on the wire: the stream cannot be framed any more.
        assert!(qmp.is_closed());
        within(qmp.closed()).await;
        let err = within(qmp.execute("cont", None)).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_connect_retry_waits_for_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = tokio::spawn({
            let path = path.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let listener = UnixListener::bind(&path).unwrap();
                let mut fake = FakeQemu::accept(&listener).await;
                let _ = fake.reader.read_u8().await;
            }
        });
        let started = Instant::now();
        let qmp = within(Qmp::connect_retry(&path, Duration::from_secs(3)))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(qmp.version().major, 10);
        drop(qmp);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_connect_retry_gives_up_with_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let started = Instant::now();
        let err = within(Qmp::connect_retry(&path, Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, QmpError::Io(e) if e.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn test_qmp_connect_without_greeting_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            // Never greet; wait for the client to give up.
            let _ = stream.read_u8().await;
        });
        let started = Instant::now();
        let err = within(Qmp::connect(&path, Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_connect_rejects_bad_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"{\"return\": {}}\r\n").await.unwrap();
        });
        let err = within(Qmp::connect(&path, Duration::from_secs(2)))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_overlong_line_ends_connection() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let _cmd = fake.recv().await;
            let junk = vec![b'x'; MAX_LINE + 1];
            // The client hangs up part-way; that is the point.
            let _ = fake.writer.write_all(&junk).await;
        });
        let qmp = within(connect(&path)).await;
        let err = within(qmp.execute("query-status", None)).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
        assert!(qmp.is_closed());
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_drop_closes_socket() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let mut rest = Vec::new();
            // End of file once every handle is gone.
            fake.reader.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
        let qmp = within(connect(&path)).await;
        let clone = qmp.clone();
        drop(qmp);
        assert!(!clone.is_closed());
        drop(clone);
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_quit_accepts_close_without_reply() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "quit");
            fake.send(r#"{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#).await;
        });
        let qmp = within(connect(&path)).await;
        let mut events = qmp.events();
        within(qmp.quit()).await.unwrap();
        within(qmp.closed()).await;
        assert_eq!(within(events.recv()).await.unwrap().name, "SHUTDOWN");
        // Quitting a connection that was already gone did nothing.
        assert!(matches!(within(qmp.quit()).await, Err(QmpError::Closed)));
        within(server).await.unwrap();
    }

    #[tokio::test]
    async fn test_qmp_typed_helpers() {
        let (_dir, path, server) = serve(|mut fake| async move {
            let answers = [
                (
                    "query-status",
                    json!({"status": "paused", "running": false}),
                ),
                ("cont", json!({})),
                ("stop", json!({})),
                ("system_powerdown", json!({})),
                (
                    "query-migrate",
                    json!({"status": "completed", "total-time": 900, "downtime": 20,
                           "ram": {"transferred": 10, "mbps": 1.5}}),
                ),
                ("query-status", json!({"running": false})),
            ];
            for (command, answer) in answers {
                let cmd = fake.recv().await;
                assert_eq!(cmd["execute"], command);
                fake.reply(&cmd, answer).await;
            }
            let _ = fake.reader.read_u8().await;
        });
        let qmp = within(connect(&path)).await;
        assert_eq!(within(qmp.query_status()).await.unwrap(), RunState::Paused);
        within(qmp.cont()).await.unwrap();
        within(qmp.stop()).await.unwrap();
        within(qmp.system_powerdown()).await.unwrap();
        let info = within(qmp.query_migrate()).await.unwrap();
        assert_eq!(info.status.as_deref(), Some("completed"));
        assert_eq!(info.total_time, Some(900));
        assert_eq!(info.downtime, Some(20));
        let ram = info.ram.unwrap();
        assert_eq!(ram.transferred, 10);
        assert_eq!(ram.mbps, 1.5);
        assert!(matches!(
            within(qmp.query_status()).await,
            Err(QmpError::Protocol(_))
        ));
        drop(qmp);
        within(server).await.unwrap();
    }

    // ---- against real QEMU ----

    /// `program`'s path if it is on `PATH`.
    fn find_on_path(program: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    }

    #[tokio::test]
    async fn test_qmp_real_qemu() {
        let Some(qemu) = find_on_path("qemu-system-x86_64") else {
            println!("skipping: qemu-system-x86_64 not found");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let mut child = tokio::process::Command::new(qemu)
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-accel",
                "tcg",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .arg("-S")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        let qmp = Qmp::connect_retry(&socket, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(qmp.version().major >= 7, "{}", qmp.version());

        // -S: never run yet.
        assert_eq!(qmp.query_status().await.unwrap(), RunState::Prelaunch);

        let version = qmp.execute("query-version", None).await.unwrap();
        assert!(version["qemu"].is_object(), "{version}");
        assert_eq!(version["qemu"]["major"], json!(qmp.version().major));

        // No migration yet: QEMU answers {}.
        assert_eq!(qmp.query_migrate().await.unwrap().status, None);

        match qmp.execute("no-such-command", None).await {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("unexpected {other:?}"),
        }

        let mut events = qmp.events();
        qmp.quit().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                event = async {
                    loop {
                        match events.recv().await {
                            Ok(event) if event.name == "SHUTDOWN" => return Some(event),
                            Ok(_) => {}
                            Err(_) => return None,
                        }
                    }
                } => {
                    if let Some(event) = event {
                        assert_eq!(event.data["reason"], "host-qmp-quit");
                        assert!(event.timestamp_us > 0);
                    }
                }
                () = qmp.closed() => {}
            }
        })
        .await;
        assert!(ended.is_ok(), "neither SHUTDOWN nor a close within 10 s");
        within(qmp.closed()).await;

        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("QEMU did not exit after quit")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}
