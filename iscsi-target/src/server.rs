//! The tokio driver: a portal listener, the login phase, and per connection a reader (this
//! task) and a writer task joined by a channel.
//!
//! ```text
//!   socket ──► reader: parse PDU ─┬─ SCSI command ──► spawned task: Scsi::execute ──┐
//!                                 ├─ Data-Out ──► straight into the command's buffer  │
//!                                 └─ NOP / Text / TMF / Logout                        ▼
//!   socket ◄── writer: stamps StatSN, ExpCmdSN, MaxCmdSN; splits Data-In ◄── channel ◄┘
//! ```
//!
//! The writer numbers responses in the order it sends them, so StatSN is always in wire
//! order, and it batches whatever is queued into one flush. Sessions have one connection
//! (MaxConnections=1) and ErrorRecoveryLevel 0: any protocol error ends the connection, and
//! the initiator logs in again (reinstating the session by its ISID).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::backend::{Backend, Nexus};
use crate::login::{self, Login, LoginConfig, Outcome, SessionType, Step};
use crate::pdu::{self, BHS_LEN, Bhs, Framing, PduError, RESERVED_TAG, Request, op, tmf};
use crate::scsi::{self, DataIn, Scsi, status};
use crate::session::{Admit, CmdWindow, Transfer, WriteTransfer, data_in_pieces};
use crate::text;

/// What the target needs to know beyond the LUNs: where every node's portal is and who may
/// log in.
pub trait Directory: Send + Sync + 'static {
    /// Every portal serving `target`, as (`address:port`, target portal group tag), this
    /// node's first. SendTargets lists them all so initiators learn every path.
    fn portals(&self, target: &str) -> Vec<(String, u16)>;
    /// CHAP secrets required for a login to `target` (`None`: a discovery session), or
    /// `None` when no authentication is required.
    fn chap(&self, _target: Option<&str>) -> Option<login::ChapSecrets> {
        None
    }
    /// Whether `initiator` may log in to `target`.
    fn initiator_allowed(&self, _target: &str, _initiator: &str) -> bool {
        true
    }
}

/// The target's settings on this node.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's target portal group tag (also its ALUA target port group).
    pub portal_group_tag: u16,
    /// This node's relative target port identifier (non-zero).
    pub relative_port: u16,
    /// Login limits and preferences.
    pub limits: login::Limits,
    /// Commands a session may have in flight (the CmdSN window).
    pub queue_depth: u32,
    /// A connection idle this long gets a NOP-In ping.
    pub nop_interval: Duration,
    /// A pinged connection that sends nothing for this long is closed.
    pub nop_timeout: Duration,
    /// A login must complete within this time.
    pub login_timeout: Duration,
    /// The largest Expected Data Transfer Length of a write accepted (the buffer is
    /// allocated up front).
    pub max_write: u32,
    /// The most bytes of write buffers one connection may hold for commands still receiving
    /// their Data-Out; a write beyond it gets TASK SET FULL (the initiator retries later).
    pub max_pending_write_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            portal_group_tag: 1,
            relative_port: 1,
            limits: login::Limits::default(),
            queue_depth: 128,
            nop_interval: Duration::from_secs(10),
            nop_timeout: Duration::from_secs(20),
            login_timeout: Duration::from_secs(15),
            max_write: 16 << 20,
            max_pending_write_bytes: 256 << 20,
        }
    }
}

/// ABORTED COMMAND, DATA PHASE ERROR: a write's Data-Out broke the sequence it belonged to.
const DATA_PHASE_ERROR: scsi::sense::Sense =
    scsi::sense::Sense::new(scsi::sense::key::ABORTED_COMMAND, 0x4b, 0x00);

/// Identifies a session for reinstatement: initiator name, ISID and target.
type SessionKey = (String, [u8; 6], String);

#[derive(Debug)]
struct SessionEntry {
    tsih: u16,
    /// Set to end the session (reinstatement, cold reset, shutdown).
    stop: watch::Sender<bool>,
    /// Notified when the session has ended.
    ended: Arc<Notify>,
    done: Arc<AtomicBool>,
}

/// Target-wide events every session listens to.
#[derive(Clone, Debug)]
enum Event {
    /// Abort every task on this LUN of this target (LUN RESET), except the requester's
    /// tasks which it handles itself.
    AbortLun { target: String, lun: u64 },
    /// Abort every task of this target (TARGET RESET).
    AbortTarget { target: String },
}

/// The iSCSI target of one node.
#[derive(Debug)]
pub struct Target<B: Backend, D: Directory> {
    scsi: Arc<Scsi<B>>,
    dir: Arc<D>,
    config: Config,
    sessions: Mutex<HashMap<SessionKey, SessionEntry>>,
    next_tsih: AtomicU16,
    events: broadcast::Sender<Event>,
    stopping: watch::Sender<bool>,
}

impl<B: Backend, D: Directory> Target<B, D> {
    /// A target serving `backend`'s LUNs.
    pub fn new(backend: Arc<B>, dir: Arc<D>, config: Config) -> Arc<Self> {
        Arc::new(Target {
            scsi: Arc::new(Scsi::new(backend)),
            dir,
            config,
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            events: broadcast::channel(64).0,
            stopping: watch::channel(false).0,
        })
    }

    /// The SCSI layer.
    pub fn scsi(&self) -> &Arc<Scsi<B>> {
        &self.scsi
    }

    /// Normal sessions now logged in.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Ends every session and stops accepting.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Accepts connections on `listener` until [`Target::stop`], serving each on the
    /// runtime this runs on.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_on(listener, Vec::new()).await;
    }

    /// Accepts connections on `listener` until [`Target::stop`], handing them to `runtimes`
    /// in turn (the runtime this runs on when there are none). Given current-thread runtimes,
    /// every task of a connection (its reader, its writer, its commands and whatever they
    /// await) runs on one thread, so a command never waits for another thread to be
    /// scheduled on its way from the socket to the device and back.
    pub async fn serve_on(self: Arc<Self>, listener: TcpListener, runtimes: Vec<Handle>) {
        let mut stopping = self.stopping.subscribe();
        let mut next = 0usize;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let target = self.clone();
                        let Some(rt) = runtimes.get(next % runtimes.len().max(1)) else {
                            tokio::spawn(async move { target.connection(stream, peer).await });
                            continue;
                        };
                        next = next.wrapping_add(1);
                        // The socket moves to the other runtime's reactor, so its readiness
                        // wakes that runtime's thread directly.
                        match stream.into_std() {
                            Ok(std) => {
                                rt.spawn(async move {
                                    match TcpStream::from_std(std) {
                                        Ok(stream) => target.connection(stream, peer).await,
                                        Err(e) => tracing::warn!(%peer, error = %e,
                                            "iscsi: cannot hand the connection over"),
                                    }
                                });
                            }
                            Err(e) => tracing::warn!(%peer, error = %e,
                                "iscsi: cannot hand the connection over"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "iscsi: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = async { drop(stopping.wait_for(|s| *s).await) } => return,
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let login = tokio::time::timeout(
            self.config.login_timeout,
            self.login(&mut rd, &mut wr, local),
        )
        .await;
        let (session, first) = match login {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "iscsi: login ended");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "iscsi: login timed out");
                return;
            }
        };
        tracing::info!(%peer, initiator = %session.nexus.initiator,
            target = %session.nexus.target, "iscsi: session started");
        let key = session.key.clone();
        let tsih = session.tsih;
        let ended = session.ended.clone();
        let done = session.done.clone();
        let nexus = session.nexus.clone();
        let normal = session.normal;
        let result = self.clone().full_feature(session, first, rd, wr).await;
        match result {
            Ok(()) => tracing::info!(%peer, "iscsi: session ended"),
            Err(e) => tracing::info!(%peer, error = %e, "iscsi: connection closed"),
        }
        if normal {
            self.scsi.nexus_lost(&nexus).await;
            if let Ok(mut s) = self.sessions.lock()
                && s.get(&key).is_some_and(|e| e.tsih == tsih)
            {
                s.remove(&key);
            }
        }
        done.store(true, Ordering::SeqCst);
        ended.notify_waiters();
    }

    /// Runs the login phase. `Ok(None)` when the login was refused (the refusal is sent).
    async fn login<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        local: Option<SocketAddr>,
    ) -> Result<Option<(SessionState, u32)>, ConnError>
    where
        R: AsyncBufReadExt + Unpin,
        W: AsyncWrite + Unpin,
    {
        let framing = Framing::login();
        let mut machine = Login::new(LoginConfig {
            portal_group_tag: self.config.portal_group_tag,
            limits: self.config.limits.clone(),
        });
        let policy = Policy {
            backend: self.scsi.backend().as_ref(),
            dir: self.dir.as_ref(),
        };
        let mut stat_sn: u32 = 1;
        loop {
            let (bhs, _ahs, data) = read_plain_pdu(rd, &framing).await?;
            if bhs.opcode() != op::LOGIN {
                return Err(ConnError::Protocol("a PDU other than Login during login"));
            }
            let Request::Login(mut req) = Request::parse(&bhs, &[])? else {
                return Err(ConnError::Protocol("unparsable login"));
            };
            req.data = data;
            let window = CmdWindow::new(req.cmd_sn, self.config.queue_depth);
            let send = |resp: &login::LoginResponse, tsih: u16, stat_sn: u32| {
                let mut h = pdu::login_response(&req, resp, tsih);
                let mut w = window.clone();
                h.set_sequence(stat_sn, req.cmd_sn, w.max_cmd_sn());
                let mut out = Vec::new();
                framing.encode_into(&h, &resp.data, &mut out);
                out
            };
            if req.tsih != 0 {
                // One connection per session: adding a connection or recovering one is not
                // offered, so a login naming a session is refused.
                let known = self
                    .sessions
                    .lock()
                    .map(|s| s.values().any(|e| e.tsih == req.tsih))
                    .unwrap_or(false);
                let resp = login::LoginResponse {
                    csg: req.csg,
                    status_class: 2,
                    status_detail: if known { 0x06 } else { 0x0a },
                    ..Default::default()
                };
                write_all_flush(wr, &send(&resp, req.tsih, stat_sn)).await?;
                return Ok(None);
            }
            match machine.step(&req, &policy) {
                Step::Continue(resp) => {
                    write_all_flush(wr, &send(&resp, 0, stat_sn)).await?;
                    stat_sn = stat_sn.wrapping_add(1);
                }
                Step::Fail(resp) => {
                    write_all_flush(wr, &send(&resp, 0, stat_sn)).await?;
                    return Ok(None);
                }
                Step::Done { response, outcome } => {
                    let session = self.open_session(&req, outcome, local).await;
                    write_all_flush(wr, &send(&response, session.tsih, stat_sn)).await?;
                    let mut session = session;
                    session.window = window;
                    session.stat_sn = stat_sn.wrapping_add(1);
                    return Ok(Some((session, req.cmd_sn)));
                }
            }
        }
    }

    /// Registers a new session, reinstating (ending) an older one with the same initiator
    /// name, ISID and target.
    async fn open_session(
        &self,
        req: &login::LoginRequest,
        outcome: Outcome,
        local: Option<SocketAddr>,
    ) -> SessionState {
        let normal = outcome.session_type == SessionType::Normal;
        let target = outcome.target_name.clone().unwrap_or_default();
        let key: SessionKey = (outcome.initiator_name.clone(), req.isid, target.clone());
        let (stop, _) = watch::channel(false);
        let ended = Arc::new(Notify::new());
        let done = Arc::new(AtomicBool::new(false));
        let mut tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
        if tsih == 0 {
            tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
        }
        if normal {
            let old = self.sessions.lock().ok().and_then(|mut s| {
                s.insert(
                    key.clone(),
                    SessionEntry {
                        tsih,
                        stop: stop.clone(),
                        ended: ended.clone(),
                        done: done.clone(),
                    },
                )
            });
            if let Some(old) = old {
                // Session reinstatement: the old session's tasks end before the new one runs.
                tracing::info!(initiator = %key.0, "iscsi: reinstating a session");
                let notified = old.ended.notified();
                old.stop.send_replace(true);
                if !old.done.load(Ordering::SeqCst) {
                    let _ = tokio::time::timeout(Duration::from_secs(10), notified).await;
                }
            }
        }
        let _ = local;
        let limits = &self.config.limits;
        let p = &outcome.params;
        SessionState {
            key,
            tsih,
            normal,
            nexus: Nexus {
                initiator: outcome.initiator_name.clone(),
                isid: req.isid,
                target,
                tpgt: self.config.portal_group_tag,
                relative_port: self.config.relative_port,
            },
            framing: Framing {
                header_digest: p.header_digest,
                data_digest: p.data_digest,
                max_recv_data: p
                    .max_recv_data_segment_length
                    .max(limits.max_recv_data_segment_length),
            },
            transfer: Transfer {
                max_recv_data: p.max_recv_data_segment_length,
                max_xmit_data: p.max_xmit_data_segment_length,
                max_burst: p.max_burst_length,
                first_burst: p.first_burst_length,
                initial_r2t: p.initial_r2t,
                immediate_data: p.immediate_data,
                max_outstanding_r2t: p.max_outstanding_r2t.max(1),
            },
            stop: stop.subscribe(),
            _stop_sender: stop,
            ended,
            done,
            window: CmdWindow::new(0, 1),
            stat_sn: 0,
        }
    }

    async fn full_feature<R, W>(
        self: Arc<Self>,
        session: SessionState,
        _first_cmd_sn: u32,
        rd: BufReader<R>,
        wr: BufWriter<W>,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            window: Mutex::new(session.window.clone()),
            running: Mutex::new(HashMap::new()),
            idle: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel::<Out<B::Buf>>();
        let writer = tokio::spawn(writer(
            wr,
            rx,
            shared.clone(),
            session.framing,
            session.transfer,
            session.stat_sn,
        ));
        let mut conn = Conn {
            target: self.clone(),
            nexus: Arc::new(session.nexus.clone()),
            framing: session.framing,
            transfer: session.transfer,
            normal: session.normal,
            tx,
            shared: shared.clone(),
            pending: HashMap::new(),
            ignored: Vec::new(),
            next_ttt: 1,
            text: None,
            ping: None,
        };
        let mut stop = session.stop.clone();
        let mut stopping = self.stopping.subscribe();
        let mut events = self.events.subscribe();
        let mut aborts = self.scsi.aborts();
        let mut rd = rd;
        let result = loop {
            let idle = tokio::time::sleep(self.config.nop_interval);
            tokio::select! {
                r = rd.fill_buf() => match r {
                    Ok([]) => break Ok(()),
                    Ok(_) => match conn.one_pdu(&mut rd).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close) => break Ok(()),
                        Err(e) => break Err(e),
                    },
                    Err(e) => break Err(e.into()),
                },
                _ = idle => {
                    if let Some(at) = conn.ping {
                        if at.elapsed() >= self.config.nop_timeout {
                            break Err(ConnError::Protocol("no answer to NOP-In pings"));
                        }
                    } else {
                        conn.ping = Some(tokio::time::Instant::now());
                    }
                    // A ping: ITT all ones, our TTT; the initiator answers with a NOP-Out.
                    let ttt = conn.tag();
                    conn.send(Out::Pdu { bhs: pdu::nop_in(RESERVED_TAG, ttt, [0; 8]), data: Vec::new(), status: false });
                }
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    break Err(ConnError::Protocol("session reinstated or reset"))
                }
                _ = async { drop(stopping.wait_for(|s| *s).await) } => {
                    // The node is going away: ask the initiator to log out now (Async
                    // Message event 1, within 0 s) so it moves to another portal at once
                    // instead of waiting for the connection to time out.
                    conn.send(Out::Pdu {
                        bhs: pdu::async_message(0, 1, [0, 0, 0]),
                        data: Vec::new(),
                        status: false,
                    });
                    break Ok(());
                }
                ev = events.recv() => {
                    if let Ok(ev) = ev {
                        conn.on_event(ev).await;
                    }
                }
                ab = aborts.recv() => {
                    if let Ok(ab) = ab
                        && ab.target == conn.nexus.target
                        && ab.initiator_ports.contains(&conn.nexus.initiator_port_name())
                    {
                        conn.abort_where(|t| t.lun == ab.lun).await;
                    }
                }
            }
        };
        // Tasks still running finish (their effects stand) before the session is gone.
        conn.pending.clear();
        conn.wait_idle().await;
        drop(conn);
        let _ = writer.await;
        result
    }

    fn send_targets(&self, session_target: Option<&str>, value: &str) -> Vec<u8> {
        let names: Vec<String> = match value {
            "All" if session_target.is_none() => self.scsi.backend().targets(),
            "All" => session_target
                .map(|t| vec![t.to_string()])
                .unwrap_or_default(),
            "" => session_target
                .map(|t| vec![t.to_string()])
                .unwrap_or_default(),
            name => self
                .scsi
                .backend()
                .targets()
                .into_iter()
                .filter(|t| t == name)
                .collect(),
        };
        let list: Vec<(String, Vec<(String, u16)>)> = names
            .into_iter()
            .map(|t| (t.clone(), self.dir.portals(&t)))
            .collect();
        text::send_targets(&list)
    }
}

/// The login policy: targets from the backend, CHAP and ACLs from the directory.
struct Policy<'a, B, D> {
    backend: &'a B,
    dir: &'a D,
}

impl<B: Backend, D: Directory> login::Policy for Policy<'_, B, D> {
    fn target_exists(&self, name: &str) -> bool {
        self.backend.targets().iter().any(|t| t == name)
    }
    fn initiator_allowed(&self, target: &str, initiator: &str) -> bool {
        self.dir.initiator_allowed(target, initiator)
    }
    fn chap(&self, target: Option<&str>) -> Option<login::ChapSecrets> {
        self.dir.chap(target)
    }
}

#[derive(Debug)]
struct SessionState {
    key: SessionKey,
    tsih: u16,
    normal: bool,
    nexus: Nexus,
    framing: Framing,
    transfer: Transfer,
    stop: watch::Receiver<bool>,
    /// Keeps `stop` open for sessions no table holds (discovery sessions).
    _stop_sender: watch::Sender<bool>,
    ended: Arc<Notify>,
    done: Arc<AtomicBool>,
    window: CmdWindow,
    stat_sn: u32,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed or closed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The initiator sent bytes that are not a usable PDU.
    #[error("bad PDU: {0}")]
    Pdu(#[from] PduError),
    /// The initiator broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// State the reader, the command tasks and the writer share.
#[derive(Debug)]
struct Shared {
    window: Mutex<CmdWindow>,
    /// Commands executing: ITT → task.
    running: Mutex<HashMap<u32, Running>>,
    /// Notified whenever a running command finishes.
    idle: Notify,
}

#[derive(Debug)]
struct Running {
    lun: u64,
    aborted: Arc<AtomicBool>,
}

/// A queued outgoing message.
enum Out<Buf> {
    /// One PDU; `status` PDUs take a StatSN.
    Pdu {
        bhs: Bhs,
        data: Vec<u8>,
        status: bool,
    },
    /// A finished command: Data-In (split by the writer) and status. `wanted` is the Data-Out
    /// length the CDB asked for, for a write's residual.
    Response {
        itt: u32,
        lun: u64,
        edtl: u32,
        wanted: Option<u64>,
        response: scsi::Response<Buf>,
    },
}

/// A write command waiting for its Data-Out.
struct Pending<Buf> {
    lun: u64,
    cdb: Vec<u8>,
    edtl: u32,
    buf: Buf,
    transfer: WriteTransfer,
    immediate: bool,
}

enum Flow {
    Continue,
    Close,
}

struct Conn<B: Backend, D: Directory> {
    target: Arc<Target<B, D>>,
    nexus: Arc<Nexus>,
    framing: Framing,
    transfer: Transfer,
    normal: bool,
    tx: mpsc::UnboundedSender<Out<B::Buf>>,
    shared: Arc<Shared>,
    pending: HashMap<u32, Pending<B::Buf>>,
    /// Tasks answered early (refused) whose unsolicited Data-Out is dropped.
    ignored: Vec<u32>,
    next_ttt: u32,
    /// A Text response waiting for the initiator to ask for its continuation.
    text: Option<(u32, u32, Vec<u8>)>,
    /// When the current unanswered ping series began.
    ping: Option<tokio::time::Instant>,
}

impl<B: Backend, D: Directory> Conn<B, D> {
    fn tag(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    fn send(&self, out: Out<B::Buf>) {
        let _ = self.tx.send(out);
    }

    fn reject(&self, reason: u8, rejected: &Bhs) {
        self.send(Out::Pdu {
            bhs: pdu::reject(reason),
            data: rejected.0.to_vec(),
            status: true,
        });
    }

    async fn one_pdu<R: AsyncBufReadExt + Unpin>(&mut self, rd: &mut R) -> Result<Flow, ConnError> {
        let mut b = [0u8; BHS_LEN];
        rd.read_exact(&mut b).await?;
        let bhs = Bhs(b);
        // Only a SCSI command may carry an AHS (an extended CDB).
        self.framing
            .check_lengths(&bhs, bhs.opcode() == op::SCSI_COMMAND)?;
        let mut rest = vec![0u8; self.framing.header_rest_len(&bhs)];
        rd.read_exact(&mut rest).await?;
        let ahs = self.framing.parse_header(&bhs, &rest)?.to_vec();
        // Any PDU from the initiator shows the connection is alive.
        self.ping = None;
        let req = match Request::parse(&bhs, &ahs) {
            Ok(r) => r,
            Err(e) => {
                self.skip_data(rd, &bhs).await?;
                match e.reject_reason() {
                    Some(reason) => {
                        self.reject(reason, &bhs);
                        return Ok(Flow::Continue);
                    }
                    None => return Err(e.into()),
                }
            }
        };
        match req {
            Request::DataOut(d) => {
                self.data_out(rd, &bhs, d).await?;
            }
            Request::Command(c) => {
                if !self.normal {
                    self.skip_data(rd, &bhs).await?;
                    self.reject(pdu::reject::PROTOCOL_ERROR, &bhs);
                    return Ok(Flow::Continue);
                }
                self.command(rd, &bhs, c).await?;
            }
            Request::NopOut(n) => {
                let data = self.read_data(rd, &bhs).await?;
                if n.itt != RESERVED_TAG {
                    let admit = self.lock_window().admit_other(n.cmd_sn, n.immediate);
                    if admit == Admit::Run {
                        self.send(Out::Pdu {
                            bhs: pdu::nop_in(n.itt, RESERVED_TAG, n.lun_field),
                            data,
                            status: true,
                        });
                    }
                }
            }
            Request::Text(t) => {
                let data = self.read_data(rd, &bhs).await?;
                if self.lock_window().admit_other(t.cmd_sn, t.immediate) == Admit::Run {
                    self.text(t, data);
                }
            }
            Request::TaskMgmt(t) => {
                self.skip_data(rd, &bhs).await?;
                if self.lock_window().admit_other(t.cmd_sn, t.immediate) == Admit::Run {
                    self.task_mgmt(t).await;
                }
            }
            Request::Logout(l) => {
                self.skip_data(rd, &bhs).await?;
                let _ = self.lock_window().admit_other(l.cmd_sn, l.immediate);
                // At ErrorRecoveryLevel 0 a connection cannot be removed for recovery.
                let response = if l.reason == 2 { 2 } else { 0 };
                self.pending.clear();
                self.wait_idle().await;
                if self.normal {
                    // What the nexus held (an SPC-2 reservation) is released before the
                    // initiator hears the logout is done.
                    self.target.scsi.nexus_lost(&self.nexus).await;
                }
                self.send(Out::Pdu {
                    bhs: pdu::logout_response(l.itt, response),
                    data: Vec::new(),
                    status: true,
                });
                return Ok(Flow::Close);
            }
            Request::Login(_) => {
                self.skip_data(rd, &bhs).await?;
                self.reject(pdu::reject::PROTOCOL_ERROR, &bhs);
            }
            Request::Snack { .. } => {
                self.skip_data(rd, &bhs).await?;
                self.reject(pdu::reject::SNACK, &bhs);
            }
        }
        Ok(Flow::Continue)
    }

    fn lock_window(&self) -> std::sync::MutexGuard<'_, CmdWindow> {
        self.shared.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a data segment of at most the negotiated size into memory.
    async fn read_data<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        bhs: &Bhs,
    ) -> Result<Vec<u8>, ConnError> {
        let len = bhs.data_len() as usize;
        let mut data = vec![0u8; len];
        self.read_into(rd, bhs, &mut data).await?;
        Ok(data)
    }

    /// Reads the data segment into `dst` (exactly its length), then padding and digest.
    async fn read_into<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        bhs: &Bhs,
        dst: &mut [u8],
    ) -> Result<(), ConnError> {
        let len = bhs.data_len() as usize;
        if len == 0 {
            return Ok(());
        }
        rd.read_exact(dst).await?;
        let mut tail = [0u8; 7];
        let pad = pdu::padded(len) - len;
        let tail_len = pad + if self.framing.data_digest { 4 } else { 0 };
        rd.read_exact(&mut tail[..tail_len]).await?;
        self.framing
            .check_data(dst, &tail[..pad], &tail[pad..tail_len])?;
        Ok(())
    }

    async fn skip_data<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        bhs: &Bhs,
    ) -> Result<(), ConnError> {
        let n = self.framing.data_wire_len(bhs) as u64;
        let copied = tokio::io::copy(&mut rd.take(n), &mut tokio::io::sink()).await?;
        if copied != n {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    async fn command<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        bhs: &Bhs,
        c: pdu::ScsiCommand,
    ) -> Result<(), ConnError> {
        if self.lock_window().admit(c.cmd_sn, c.immediate) == Admit::Ignore {
            self.skip_data(rd, bhs).await?;
            return Ok(());
        }
        if !c.write || c.edtl == 0 {
            // No Data-Out: immediate data on a command without W is a protocol error.
            if c.immediate_len > 0 {
                self.skip_data(rd, bhs).await?;
                self.lock_window().complete();
                self.reject(pdu::reject::PROTOCOL_ERROR, bhs);
                return Ok(());
            }
            self.run(c.itt, c.lun, c.cdb, c.edtl, c.read, None);
            return Ok(());
        }
        if c.edtl > self.target.config.max_write {
            // Refuse at once; the initiator stops sending data once it sees the status.
            self.skip_data(rd, bhs).await?;
            self.ignore(c.itt);
            self.finish_now(
                c.itt,
                c.lun,
                c.edtl,
                scsi::sense::codes::INVALID_FIELD_IN_CDB,
            );
            return Ok(());
        }
        let held: u64 = self.pending.values().map(|p| u64::from(p.edtl)).sum();
        if held + u64::from(c.edtl) > self.target.config.max_pending_write_bytes {
            // Too much write data outstanding on this connection: refuse this one for now
            // rather than allocate without bound.
            self.skip_data(rd, bhs).await?;
            self.ignore(c.itt);
            self.finish_with(c.itt, c.lun, c.edtl, status::TASK_SET_FULL, None);
            return Ok(());
        }
        let mut transfer =
            match WriteTransfer::new(&self.transfer, c.edtl, c.immediate_len, c.final_bit) {
                Ok(t) => t,
                Err(_) => {
                    return Err(ConnError::Protocol(
                        "immediate or unsolicited data not allowed",
                    ));
                }
            };
        let mut buf = self.target.scsi.backend().buffer(c.edtl as usize);
        if c.immediate_len > 0 {
            let n = c.immediate_len as usize;
            self.read_into(rd, bhs, &mut buf.as_mut()[..n]).await?;
        }
        let r2ts = {
            let t = self.transfer;
            let mut next = || self.tag_fn();
            transfer.next_r2ts(&t, &mut next)
        };
        for r in &r2ts {
            self.send(Out::Pdu {
                bhs: pdu::r2t(c.itt, c.lun, r.ttt, r.r2t_sn, r.offset, r.len),
                data: Vec::new(),
                status: false,
            });
        }
        if transfer.complete() {
            self.run(c.itt, c.lun, c.cdb, c.edtl, false, Some(buf));
        } else {
            self.pending.insert(
                c.itt,
                Pending {
                    lun: c.lun,
                    cdb: c.cdb,
                    edtl: c.edtl,
                    buf,
                    transfer,
                    immediate: c.immediate,
                },
            );
        }
        Ok(())
    }

    fn tag_fn(&mut self) -> u32 {
        self.tag()
    }

    async fn data_out<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        bhs: &Bhs,
        d: pdu::DataOut,
    ) -> Result<(), ConnError> {
        let Some(mut p) = self.pending.remove(&d.itt) else {
            // Data for a task that was refused or aborted: drop it quietly.
            self.skip_data(rd, bhs).await?;
            if self.ignored.contains(&d.itt) {
                return Ok(());
            }
            self.reject(pdu::reject::PROTOCOL_ERROR, bhs);
            return Ok(());
        };
        let range = match p.transfer.accept(&d) {
            Ok(r) if r.end <= p.edtl as usize => r,
            Ok(_) | Err(_) => {
                // A Data-Out out of sequence (DataSN, offset, tag or burst): the task ends
                // with CHECK CONDITION and the rest of its data is dropped; the session
                // goes on.
                self.skip_data(rd, bhs).await?;
                self.ignore(d.itt);
                self.finish_now(d.itt, p.lun, p.edtl, DATA_PHASE_ERROR);
                return Ok(());
            }
        };
        self.read_into(rd, bhs, &mut p.buf.as_mut()[range]).await?;
        let r2ts = {
            let t = self.transfer;
            let mut next = || self.tag_fn();
            p.transfer.next_r2ts(&t, &mut next)
        };
        for r in &r2ts {
            self.send(Out::Pdu {
                bhs: pdu::r2t(d.itt, p.lun, r.ttt, r.r2t_sn, r.offset, r.len),
                data: Vec::new(),
                status: false,
            });
        }
        if p.transfer.complete() {
            let _ = p.immediate;
            self.run(d.itt, p.lun, p.cdb, p.edtl, false, Some(p.buf));
        } else {
            self.pending.insert(d.itt, p);
        }
        Ok(())
    }

    /// Answers a command at once with CHECK CONDITION.
    fn finish_now(&self, itt: u32, lun: u64, edtl: u32, sense: scsi::sense::Sense) {
        self.finish_with(itt, lun, edtl, status::CHECK_CONDITION, Some(sense));
    }

    /// Answers a command at once with `status` (and `sense`).
    fn finish_with(
        &self,
        itt: u32,
        lun: u64,
        edtl: u32,
        status: u8,
        sense: Option<scsi::sense::Sense>,
    ) {
        self.send(Out::Response {
            itt,
            lun,
            edtl,
            wanted: None,
            response: scsi::Response {
                status,
                sense,
                data: DataIn::None,
            },
        });
    }

    /// Remembers a task whose remaining Data-Out is to be dropped quietly (the most recent
    /// 64 of them).
    fn ignore(&mut self, itt: u32) {
        self.ignored.push(itt);
        if self.ignored.len() > 64 {
            self.ignored.remove(0);
        }
    }

    /// Starts executing a command whose data is complete.
    fn run(&self, itt: u32, lun: u64, cdb: Vec<u8>, edtl: u32, read: bool, data: Option<B::Buf>) {
        let aborted = Arc::new(AtomicBool::new(false));
        if let Ok(mut r) = self.shared.running.lock() {
            r.insert(
                itt,
                Running {
                    lun,
                    aborted: aborted.clone(),
                },
            );
        }
        let scsi = self.target.scsi.clone();
        let nexus = self.nexus.clone();
        let tx = self.tx.clone();
        let shared = self.shared.clone();
        let wanted = if read {
            None
        } else {
            scsi.data_out_length(&nexus.target, lun, &cdb)
        };
        let mut task = Box::pin(async move {
            let response = scsi
                .execute(scsi::Command {
                    nexus: &nexus,
                    lun,
                    cdb: &cdb,
                    data_out: data,
                    expected_length: edtl,
                })
                .await;
            if let Ok(mut r) = shared.running.lock() {
                r.remove(&itt);
            }
            if aborted.load(Ordering::SeqCst) {
                // An aborted task gets no response (RFC 7143 4.2.3.4); its slot frees.
                shared
                    .window
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .complete();
            } else {
                let _ = tx.send(Out::Response {
                    itt,
                    lun,
                    edtl,
                    wanted,
                    response,
                });
            }
            shared.idle.notify_waiters();
        });
        // The first steps run here, before the reader parses the next PDU: a read or write is
        // on the device's queue at once rather than after the tasks ahead of it in the run
        // queue, and a command that needs no I/O is answered without a task at all. What is
        // left runs as a task; its first poll registers the task's own waker wherever this
        // poll left the no-op one (every future re-registers on each poll).
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(task);
        }
    }

    /// Waits until no command of this connection is executing.
    async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            if self
                .shared
                .running
                .lock()
                .map(|r| r.is_empty())
                .unwrap_or(true)
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// Aborts the tasks `which` selects: pending ones are dropped, running ones finish
    /// without a response. Returns once none of them runs any more.
    async fn abort_where(&mut self, which: impl Fn(&Running) -> bool) {
        let dropped: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                which(&Running {
                    lun: p.lun,
                    aborted: Arc::new(AtomicBool::new(false)),
                })
            })
            .map(|(itt, _)| *itt)
            .collect();
        for itt in dropped {
            self.pending.remove(&itt);
            self.ignore(itt);
            self.lock_window().complete();
        }
        let marked: Vec<u32> = match self.shared.running.lock() {
            Ok(r) => r
                .iter()
                .filter(|(_, t)| which(t))
                .map(|(itt, t)| {
                    t.aborted.store(true, Ordering::SeqCst);
                    *itt
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        loop {
            let notified = self.shared.idle.notified();
            let still = self
                .shared
                .running
                .lock()
                .map(|r| marked.iter().any(|itt| r.contains_key(itt)))
                .unwrap_or(false);
            if !still {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::AbortLun { target, lun } if target == self.nexus.target => {
                self.abort_where(|t| t.lun == lun).await;
            }
            Event::AbortTarget { target } if target == self.nexus.target => {
                self.abort_where(|_| true).await;
            }
            _ => {}
        }
    }

    async fn task_mgmt(&mut self, t: pdu::TaskMgmt) {
        let response = match t.function {
            tmf::ABORT_TASK => {
                let exists = self.pending.contains_key(&t.rtt)
                    || self
                        .shared
                        .running
                        .lock()
                        .map(|r| r.contains_key(&t.rtt))
                        .unwrap_or(false);
                if exists {
                    let rtt = t.rtt;
                    let pending_lun = self.pending.get(&rtt).map(|p| p.lun);
                    if pending_lun.is_some() {
                        self.pending.remove(&rtt);
                        self.ignore(rtt);
                        self.lock_window().complete();
                    }
                    let marked = self
                        .shared
                        .running
                        .lock()
                        .ok()
                        .and_then(|r| r.get(&rtt).map(|x| x.aborted.clone()));
                    if let Some(flag) = marked {
                        flag.store(true, Ordering::SeqCst);
                        self.wait_task(rtt).await;
                    }
                    tmf::COMPLETE
                } else if self.lock_window().abort_absent(t.ref_cmd_sn, t.cmd_sn) {
                    // Sent but not arrived (RFC 7143 11.6.1 b).
                    tmf::COMPLETE
                } else {
                    // Received and already answered (or never sent).
                    tmf::NO_TASK
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                let lun = t.lun;
                self.abort_where(|x| x.lun == lun).await;
                tmf::COMPLETE
            }
            tmf::LUN_RESET => {
                let lun = t.lun;
                if !self
                    .target
                    .scsi
                    .backend()
                    .luns(&self.nexus.target)
                    .iter()
                    .any(|l| l.lun == lun)
                {
                    tmf::NO_LUN
                } else {
                    self.abort_where(|x| x.lun == lun).await;
                    let _ = self.target.events.send(Event::AbortLun {
                        target: self.nexus.target.clone(),
                        lun,
                    });
                    self.target.scsi.lun_reset(&self.nexus, lun).await;
                    tmf::COMPLETE
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.abort_where(|_| true).await;
                let _ = self.target.events.send(Event::AbortTarget {
                    target: self.nexus.target.clone(),
                });
                self.target.scsi.target_reset(&self.nexus).await;
                if t.function == tmf::TARGET_COLD_RESET {
                    // A cold reset also ends every session of the target, this one after the
                    // response is sent.
                    let others: Vec<watch::Sender<bool>> = self
                        .target
                        .sessions
                        .lock()
                        .map(|s| {
                            s.iter()
                                .filter(|(k, _)| k.2 == self.nexus.target)
                                .map(|(_, e)| e.stop.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    self.send(Out::Pdu {
                        bhs: pdu::task_mgmt_response(t.itt, tmf::COMPLETE),
                        data: Vec::new(),
                        status: true,
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    for s in others {
                        s.send_replace(true);
                    }
                    return;
                }
                tmf::COMPLETE
            }
            tmf::TASK_REASSIGN => tmf::REASSIGN_UNSUPPORTED,
            _ => tmf::NOT_SUPPORTED,
        };
        self.send(Out::Pdu {
            bhs: pdu::task_mgmt_response(t.itt, response),
            data: Vec::new(),
            status: true,
        });
    }

    async fn wait_task(&self, itt: u32) {
        loop {
            let notified = self.shared.idle.notified();
            if !self
                .shared
                .running
                .lock()
                .map(|r| r.contains_key(&itt))
                .unwrap_or(false)
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    fn text(&mut self, t: pdu::TextRequest, data: Vec<u8>) {
        let max = self.transfer.max_xmit_data.max(512) as usize;
        // A continuation of our earlier response.
        if t.ttt != RESERVED_TAG
            && let Some((itt, ttt, rest)) = self.text.take()
            && itt == t.itt
            && ttt == t.ttt
        {
            self.send_text(t.itt, rest, max);
            return;
        }
        let pairs = text::parse(&data).unwrap_or_default();
        let mut out = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                let session_target = self.normal.then_some(self.nexus.target.as_str());
                out.extend(self.target.send_targets(session_target, v));
            } else {
                out.extend_from_slice(format!("{k}=NotUnderstood\0").as_bytes());
            }
        }
        self.send_text(t.itt, out, max);
    }

    fn send_text(&mut self, itt: u32, mut body: Vec<u8>, max: usize) {
        if body.len() > max {
            let rest = body.split_off(max);
            let ttt = self.tag();
            self.text = Some((itt, ttt, rest));
            self.send(Out::Pdu {
                bhs: pdu::text_response(itt, ttt, false, true),
                data: body,
                status: true,
            });
        } else {
            self.send(Out::Pdu {
                bhs: pdu::text_response(itt, RESERVED_TAG, true, false),
                data: body,
                status: true,
            });
        }
    }
}

/// Writes everything queued for a connection, numbering status PDUs in wire order.
async fn writer<W, Buf>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Out<Buf>>,
    shared: Arc<Shared>,
    framing: Framing,
    transfer: Transfer,
    first_stat_sn: u32,
) -> Result<(), std::io::Error>
where
    W: AsyncWrite + Unpin,
    Buf: AsRef<[u8]>,
{
    let stat_sn = AtomicU32::new(first_stat_sn);
    let mut scratch = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut batch = 0;
        while let Some(out) = next.take() {
            write_out(
                &mut wr,
                out,
                &shared,
                &framing,
                &transfer,
                &stat_sn,
                &mut scratch,
            )
            .await?;
            batch += 1;
            if batch < 64 {
                next = rx.try_recv().ok();
            }
        }
        wr.flush().await?;
    }
    wr.flush().await?;
    let _ = wr.shutdown().await;
    Ok(())
}

async fn write_out<W: AsyncWrite + Unpin, Buf: AsRef<[u8]>>(
    wr: &mut BufWriter<W>,
    out: Out<Buf>,
    shared: &Shared,
    framing: &Framing,
    transfer: &Transfer,
    stat_sn: &AtomicU32,
    scratch: &mut Vec<u8>,
) -> Result<(), std::io::Error> {
    let sequence = |status: bool, complete: bool| {
        let mut w = shared.window.lock().unwrap_or_else(|p| p.into_inner());
        if complete {
            w.complete();
        }
        let sn = if status {
            stat_sn.fetch_add(1, Ordering::Relaxed)
        } else {
            stat_sn.load(Ordering::Relaxed)
        };
        (sn, w.exp_cmd_sn(), w.max_cmd_sn())
    };
    match out {
        Out::Pdu {
            mut bhs,
            data,
            status,
        } => {
            let (sn, exp, max) = sequence(status, false);
            bhs.set_sequence(sn, exp, max);
            write_pdu(wr, framing, &bhs, &data, scratch).await
        }
        Out::Response {
            itt,
            lun,
            edtl,
            wanted,
            response,
        } => {
            let data: &[u8] = match &response.data {
                DataIn::None => &[],
                DataIn::Owned(v) => v,
                DataIn::Buf(b) => b.as_ref(),
            };
            let have = data.len() as u64;
            let send_len = have.min(u64::from(edtl)) as u32;
            // A read's residual compares the data with EDTL; a write's, the Data-Out the CDB
            // asked for with EDTL.
            let moved = match wanted {
                Some(w) if have == 0 => w,
                _ => have,
            };
            let residual = match moved.cmp(&u64::from(edtl)) {
                std::cmp::Ordering::Less => Some((false, edtl - moved as u32)),
                std::cmp::Ordering::Greater => Some((
                    true,
                    (moved - u64::from(edtl)).min(u64::from(u32::MAX)) as u32,
                )),
                std::cmp::Ordering::Equal => None,
            };
            // Data-In carries status when the command succeeded without sense data.
            let collapse = response.sense.is_none() && send_len > 0;
            let mut data_sn = 0u32;
            for piece in data_in_pieces(send_len, transfer.max_xmit_data, transfer.max_burst) {
                let with_status = collapse && piece.last;
                let mut bhs = pdu::data_in(
                    itt,
                    lun,
                    data_sn,
                    piece.offset,
                    piece.final_bit,
                    with_status.then_some((response.status, residual)),
                );
                if with_status {
                    let (sn, exp, max) = sequence(true, true);
                    bhs.set_sequence(sn, exp, max);
                } else {
                    let (_, exp, max) = sequence(false, false);
                    bhs.put_u32(28, exp);
                    bhs.put_u32(32, max);
                }
                data_sn += 1;
                let chunk = &data[piece.offset as usize..(piece.offset + piece.len) as usize];
                write_pdu(wr, framing, &bhs, chunk, scratch).await?;
            }
            if !collapse {
                let mut bhs = pdu::scsi_response(itt, response.status, residual, data_sn);
                let (sn, exp, max) = sequence(true, true);
                bhs.set_sequence(sn, exp, max);
                let sense = response
                    .sense
                    .map(|s| pdu::sense_segment(&s.to_fixed()))
                    .unwrap_or_default();
                write_pdu(wr, framing, &bhs, &sense, scratch).await?;
            }
            Ok(())
        }
    }
}

async fn write_pdu<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    framing: &Framing,
    bhs: &Bhs,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), std::io::Error> {
    let mut bhs = *bhs;
    bhs.set_data_len(data.len() as u32);
    wr.write_all(&bhs.0).await?;
    if framing.header_digest {
        wr.write_all(&pdu::digest(&[&bhs.0])).await?;
    }
    if !data.is_empty() {
        wr.write_all(data).await?;
        let pad = pdu::padded(data.len()) - data.len();
        scratch.clear();
        scratch.extend_from_slice(&[0u8; 3][..pad]);
        if framing.data_digest {
            let d = pdu::digest(&[data, &[0u8; 3][..pad]]);
            scratch.extend_from_slice(&d);
        }
        if !scratch.is_empty() {
            wr.write_all(scratch).await?;
        }
    }
    Ok(())
}

async fn write_all_flush<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
) -> Result<(), std::io::Error> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// Reads a whole PDU with a small data segment (login phase).
async fn read_plain_pdu<R: AsyncRead + Unpin>(
    rd: &mut R,
    framing: &Framing,
) -> Result<(Bhs, Vec<u8>, Vec<u8>), ConnError> {
    let mut b = [0u8; BHS_LEN];
    rd.read_exact(&mut b).await?;
    let bhs = Bhs(b);
    if bhs.opcode() != op::LOGIN {
        return Err(ConnError::Protocol("a PDU other than Login during login"));
    }
    // Login requests carry no AHS.
    framing.check_lengths(&bhs, false)?;
    let mut rest = vec![0u8; framing.header_rest_len(&bhs)];
    rd.read_exact(&mut rest).await?;
    let ahs = framing.parse_header(&bhs, &rest)?.to_vec();
    let len = bhs.data_len() as usize;
    let mut data = vec![0u8; framing.data_wire_len(&bhs)];
    rd.read_exact(&mut data).await?;
    let pad_end = pdu::padded(len).min(data.len());
    if len > 0 {
        framing.check_data(&data[..len], &data[len..pad_end], &data[pad_end..])?;
    }
    data.truncate(len);
    Ok((bhs, ahs, data))
}
