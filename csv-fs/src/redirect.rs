//! Redirected I/O over TCP: the pipelined client a node uses to reach a volume's coordinator
//! (and that local tools use to reach a node), and the server every node runs.
//!
//! The framing is [`crate::wire`]. A client keeps a few connections per peer; any number of
//! requests are in flight on it, answers come back in any order and are matched by id. A lost
//! connection fails every request in flight on it with a retryable error; the volume layer
//! retries them (see [`crate::node`]). The server reads requests as fast as they come, runs up
//! to [`SERVER_CONCURRENCY`] per connection at once, and writes answers as they complete.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use csvd_raft::volume::DiskId;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::device::BlockDevice;
use crate::engine::{ALIGN, AlignedBuf, BufSlice};
use crate::node::{CompareResult, CsvNode, IoError, IoReply, IoRequest, SerialRequest, lock};
use crate::wire::{
    FLAG_FUA, FLAG_LOCAL, MISCOMPARE_BYTES, Op, REQUEST_BYTES, RESPONSE_BYTES, RequestHeader,
    ResponseHeader, Status, decode_miscompare, encode_miscompare,
};

/// Requests one server connection executes at once.
pub const SERVER_CONCURRENCY: usize = 256;
/// How long a client waits for one answer before it gives the request up as lost.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call did not produce an answer (or produced a refusal).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No connection could be made.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection broke before the answer came.
    #[error("connection lost: {0}")]
    Lost(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error.
    #[error("{1}")]
    Remote(Status, String),
}

enum Payload {
    None,
    /// Read data, in aligned memory.
    Data(AlignedBuf),
    /// An error message or a miscompare offset.
    Bytes(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Data(b) => b,
            Payload::Bytes(t) => t,
        }
    }
}

type Waiter = oneshot::Sender<Result<(ResponseHeader, Payload), String>>;

struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// `None` once the connection is dead.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
}

impl Conn {
    fn alive(&self) -> bool {
        lock(&self.pending).is_some()
    }

    /// Fails every request in flight and marks the connection dead.
    fn kill(&self, why: &str) {
        if let Some(map) = lock(&self.pending).take() {
            for (_, w) in map {
                let _ = w.send(Err(why.to_string()));
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(map) = lock(&self.pending).as_mut() {
            map.remove(&id);
        }
    }
}

/// Connections a client keeps to each server; requests are spread over them in turn, so
/// large transfers are not serialized on one socket.
pub const CONNECTIONS_PER_SERVER: usize = 4;

/// A pipelined client of the block-I/O protocol, with [`CONNECTIONS_PER_SERVER`] connections
/// per server. Cheap to share.
pub struct Client {
    conns: Mutex<HashMap<String, Vec<Option<Arc<Conn>>>>>,
    turn: AtomicU64,
    timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            turn: AtomicU64::new(0),
            timeout: CALL_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// A client with no connections yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a call waits for its answer (default [`CALL_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>, CallError> {
        let slot = self.turn.fetch_add(1, Ordering::Relaxed) as usize % CONNECTIONS_PER_SERVER;
        if let Some(Some(c)) = lock(&self.conns).get(addr).map(|v| v[slot].clone())
            && c.alive()
        {
            return Ok(c);
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                CallError::Connect(format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"))
            })?
            .map_err(|e| CallError::Connect(format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(client_reader(conn.clone(), rd));
        let mut conns = lock(&self.conns);
        let slots = conns
            .entry(addr.to_string())
            .or_insert_with(|| vec![None; CONNECTIONS_PER_SERVER]);
        // Another caller may have filled the slot meanwhile; keep one connection per slot.
        if let Some(c) = &slots[slot]
            && c.alive()
        {
            conn.kill("duplicate connection");
            return Ok(c.clone());
        }
        slots[slot] = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` for `disk` to the server at `addr` and waits for its answer. `local` marks
    /// a client's request to a node (served in the node's mode) rather than a redirected one.
    pub async fn call(
        &self,
        addr: &str,
        disk: DiskId,
        epoch: u64,
        req: &IoRequest,
        local: bool,
    ) -> Result<IoReply, CallError> {
        let mut flags = if local { FLAG_LOCAL } else { 0 };
        let (op, offset, len, payload): (Op, u64, u64, &[u8]) = match req {
            IoRequest::Read { offset, len } => (Op::Read, *offset, *len, &[]),
            IoRequest::Write { offset, data, fua } => {
                if *fua {
                    flags |= FLAG_FUA;
                }
                (Op::Write, *offset, data.len() as u64, data)
            }
            IoRequest::Flush => (Op::Flush, 0, 0, &[]),
            IoRequest::Discard { offset, len } => (Op::Discard, *offset, *len, &[]),
            IoRequest::WriteZeroes { offset, len } => (Op::WriteZeroes, *offset, *len, &[]),
        };
        let head = RequestHeader {
            op,
            flags,
            id: 0,
            disk,
            offset,
            len,
            epoch,
            payload_crc: 0,
        };
        let (resp, body) = self.send(addr, head, [payload]).await?;
        if resp.status != Status::Ok {
            return Err(refusal(resp.status, &body));
        }
        match (op, body) {
            (Op::Read, Payload::Data(d)) if d.len() as u64 == len => Ok(IoReply::Data(d)),
            (Op::Read, _) => Err(CallError::Lost(
                "the server's read answer has the wrong length".into(),
            )),
            _ => Ok(IoReply::Done),
        }
    }

    /// Sends a serialized request (compare-and-write, sub-block write) like [`Client::call`].
    /// A request that fails [`SerialRequest::check`] is refused here, without being sent, with
    /// the status the server would answer.
    pub async fn call_serial(
        &self,
        addr: &str,
        disk: DiskId,
        epoch: u64,
        req: &SerialRequest,
        local: bool,
    ) -> Result<CompareResult, CallError> {
        // Checked here too: a compare-and-write whose halves differ in length could not be
        // framed, and an over-long one would make the server drop the connection.
        req.check()
            .map_err(|e| CallError::Remote(e.status(), e.to_string()))?;
        let mut flags = if local { FLAG_LOCAL } else { 0 };
        if req.fua() {
            flags |= FLAG_FUA;
        }
        let mut head = RequestHeader {
            op: Op::WritePartial,
            flags,
            id: 0,
            disk,
            offset: req.offset(),
            len: req.len(),
            epoch,
            payload_crc: 0,
        };
        let (resp, body) = match req {
            SerialRequest::CompareAndWrite { compare, data, .. } => {
                head.op = Op::CompareAndWrite;
                self.send(addr, head, [&compare[..], &data[..]]).await?
            }
            SerialRequest::WritePartial { data, .. } => {
                self.send(addr, head, [&data[..], &[]]).await?
            }
        };
        match resp.status {
            Status::Ok => Ok(CompareResult::Written),
            Status::Miscompare if req.is_compare() => decode_miscompare(body.bytes())
                .map(|offset| CompareResult::Miscompare { offset })
                .ok_or_else(|| {
                    CallError::Lost("the server's miscompare answer is malformed".into())
                }),
            status => Err(refusal(status, &body)),
        }
    }

    /// Sends `head` (its id and payload checksum filled in here) followed by `payload`, and
    /// waits for the answer.
    async fn send<const N: usize>(
        &self,
        addr: &str,
        mut head: RequestHeader,
        payload: [&[u8]; N],
    ) -> Result<Answer, CallError> {
        let conn = self.conn(addr).await?;
        let mut crc = crc32fast::Hasher::new();
        let mut empty = true;
        for p in payload {
            crc.update(p);
            empty &= p.is_empty();
        }
        head.id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        head.payload_crc = if empty { 0 } else { crc.finalize() };
        let id = head.id;
        let (tx, rx) = oneshot::channel();
        match lock(&conn.pending).as_mut() {
            Some(map) => {
                map.insert(id, tx);
            }
            None => return Err(CallError::Lost("connection closed".into())),
        }
        {
            let mut w = conn.writer.lock().await;
            let encoded = head.encode();
            let mut parts = [&[][..]; 4];
            parts[0] = &encoded[..];
            for (slot, p) in parts[1..].iter_mut().zip(payload) {
                *slot = p;
            }
            if let Err(e) = write_parts(&mut *w, &parts[..=N.min(3)]).await {
                conn.kill(&e.to_string());
                return Err(CallError::Lost(e.to_string()));
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                conn.forget(id);
                Err(CallError::Timeout(self.timeout))
            }
            Ok(Err(_)) => Err(CallError::Lost("connection closed".into())),
            Ok(Ok(Err(why))) => Err(CallError::Lost(why)),
            Ok(Ok(Ok(answer))) => Ok(answer),
        }
    }
}

/// A server's refusal: its status and message.
fn refusal(status: Status, body: &Payload) -> CallError {
    CallError::Remote(status, String::from_utf8_lossy(body.bytes()).into_owned())
}

async fn client_reader(conn: Arc<Conn>, mut rd: OwnedReadHalf) {
    let why = loop {
        let mut h = [0u8; RESPONSE_BYTES];
        if let Err(e) = rd.read_exact(&mut h).await {
            break e.to_string();
        }
        let head = match ResponseHeader::decode(&h) {
            Ok(h) => h,
            Err(e) => break format!("bad answer from the server: {e}"),
        };
        let len = head.len as usize;
        let body = if len == 0 {
            Payload::None
        } else if head.status == Status::Ok {
            if !len.is_multiple_of(ALIGN) {
                break format!("the server sent {len} bytes of data, not whole blocks");
            }
            let mut b = match AlignedBuf::for_overwrite(len) {
                Ok(b) => b,
                Err(e) => break e.to_string(),
            };
            if let Err(e) = rd.read_exact(&mut b).await {
                break e.to_string();
            }
            Payload::Data(b)
        } else {
            let mut t = vec![0u8; len];
            if let Err(e) = rd.read_exact(&mut t).await {
                break e.to_string();
            }
            Payload::Bytes(t)
        };
        let waiter = lock(&conn.pending)
            .as_mut()
            .and_then(|m| m.remove(&head.id));
        let Some(waiter) = waiter else {
            continue; // timed out meanwhile
        };
        if crc32fast::hash(body.bytes()) != head.payload_crc {
            let _ = waiter.send(Err("answer payload checksum mismatch".into()));
            continue;
        }
        let _ = waiter.send(Ok((head, body)));
    };
    conn.kill(&why);
}

/// Writes `parts` (at most four) in order, with as few system calls as the socket allows.
async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0;
    while done < total {
        let mut slices = [IoSlice::new(&[]); 4];
        let mut n = 0;
        let mut skip = done;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices[n] = IoSlice::new(&p[skip..]);
            skip = 0;
            n += 1;
        }
        let wrote = w.write_vectored(&slices[..n]).await?;
        if wrote == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += wrote;
    }
    Ok(())
}

/// A client's handle on one node: I/O served in that node's current mode.
#[derive(Debug)]
pub struct BlockClient {
    client: Client,
    addr: String,
}

impl BlockClient {
    /// A client of the node whose block-I/O listener is at `addr`. A node holds I/O through
    /// pauses and coordinator changes, so calls wait up to `timeout` for an answer.
    pub fn new(addr: impl Into<String>, timeout: Duration) -> Self {
        Self {
            client: Client::new().with_timeout(timeout),
            addr: addr.into(),
        }
    }

    /// Runs one request.
    pub async fn call(&self, disk: DiskId, req: &IoRequest) -> Result<IoReply, CallError> {
        self.client.call(&self.addr, disk, 0, req, true).await
    }

    /// Runs one serialized request (compare-and-write, sub-block write).
    pub async fn call_serial(
        &self,
        disk: DiskId,
        req: &SerialRequest,
    ) -> Result<CompareResult, CallError> {
        self.client
            .call_serial(&self.addr, disk, 0, req, true)
            .await
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, disk: DiskId, offset: u64, len: u64) -> Result<AlignedBuf, CallError> {
        match self.call(disk, &IoRequest::Read { offset, len }).await? {
            IoReply::Data(d) => Ok(d),
            IoReply::Done => Err(CallError::Lost("no data".into())),
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(
        &self,
        disk: DiskId,
        offset: u64,
        data: BufSlice,
        fua: bool,
    ) -> Result<(), CallError> {
        self.call(disk, &IoRequest::Write { offset, data, fua })
            .await
            .map(drop)
    }
}

/// Serves the block-I/O protocol for `node` on `listener` until the task is dropped.
pub async fn serve<D: BlockDevice>(listener: TcpListener, node: CsvNode<D>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(why) = serve_conn(stream, node).await {
                        tracing::warn!(%peer, error = %why, "block-I/O connection closed");
                    }
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "block-I/O accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

type Answer = (ResponseHeader, Payload);

async fn serve_conn<D: BlockDevice>(stream: TcpStream, node: CsvNode<D>) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Answer>(SERVER_CONCURRENCY);
    let writer = tokio::spawn(async move {
        while let Some((head, body)) = rx.recv().await {
            if write_parts(&mut wr, &[&head.encode(), body.bytes()])
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let permits = Arc::new(Semaphore::new(SERVER_CONCURRENCY));
    let result = loop {
        let mut h = [0u8; REQUEST_BYTES];
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
        let head = match RequestHeader::decode(&h) {
            Ok(h) => h,
            Err(e) => break Err(format!("malformed request: {e}")),
        };
        let plen = head.payload_len() as usize;
        let serial = matches!(head.op, Op::CompareAndWrite | Op::WritePartial);
        let mut data = None;
        let mut bytes = Vec::new();
        if serial {
            // Sector-sized payloads, bounded by the header's checks: plain memory.
            bytes = vec![0u8; plen];
            rd.read_exact(&mut bytes).await.map_err(|e| e.to_string())?;
        } else if plen > 0 {
            if plen.is_multiple_of(ALIGN) {
                let mut b = AlignedBuf::for_overwrite(plen).map_err(|e| e.to_string())?;
                rd.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                data = Some(b);
            } else {
                // Keep the stream framed, refuse the request.
                let mut sink = vec![0u8; plen];
                rd.read_exact(&mut sink).await.map_err(|e| e.to_string())?;
            }
        }
        let refuse = |status: Status, msg: String| {
            let text = msg.into_bytes();
            (
                ResponseHeader {
                    status,
                    id: head.id,
                    len: text.len() as u32,
                    payload_crc: crc32fast::hash(&text),
                },
                Payload::Bytes(text),
            )
        };
        let payload: Option<&[u8]> = match &data {
            Some(d) => Some(d),
            None if !bytes.is_empty() => Some(&bytes),
            None => None,
        };
        if let Some(p) = payload
            && crc32fast::hash(p) != head.payload_crc
        {
            let _ = tx
                .send(refuse(
                    Status::ChecksumMismatch,
                    "write payload checksum mismatch".into(),
                ))
                .await;
            continue;
        }
        let fua = head.flags & FLAG_FUA != 0;
        let req = match (head.op, data) {
            (Op::CompareAndWrite, _) => {
                // The payload is the bytes to compare, then as many bytes to write.
                let data = bytes.split_off(bytes.len() / 2);
                Incoming::Serial(SerialRequest::CompareAndWrite {
                    offset: head.offset,
                    compare: bytes,
                    data,
                    fua,
                })
            }
            (Op::WritePartial, _) => Incoming::Serial(SerialRequest::WritePartial {
                offset: head.offset,
                data: bytes,
                fua,
            }),
            (Op::Read, _) => Incoming::Io(IoRequest::Read {
                offset: head.offset,
                len: head.len,
            }),
            (Op::Write, Some(d)) => Incoming::Io(IoRequest::Write {
                offset: head.offset,
                data: BufSlice::from(d),
                fua,
            }),
            (Op::Write, None) => {
                let msg = format!(
                    "write length {} must be a non-zero multiple of {ALIGN} bytes",
                    head.len
                );
                let _ = tx.send(refuse(Status::Unaligned, msg)).await;
                continue;
            }
            (Op::Flush, _) => Incoming::Io(IoRequest::Flush),
            (Op::Discard, _) => Incoming::Io(IoRequest::Discard {
                offset: head.offset,
                len: head.len,
            }),
            (Op::WriteZeroes, _) => Incoming::Io(IoRequest::WriteZeroes {
                offset: head.offset,
                len: head.len,
            }),
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let node = node.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let local = head.flags & FLAG_LOCAL != 0;
            let answer = match req {
                Incoming::Io(req) => {
                    let res = if local {
                        node.execute(head.disk, req).await
                    } else {
                        node.execute_as_coordinator(head.disk, head.epoch, req)
                            .await
                    };
                    io_answer(head.id, res)
                }
                Incoming::Serial(req) => {
                    let res = if local {
                        node.execute_serial(head.disk, req).await
                    } else {
                        node.execute_serial_as_coordinator(head.disk, head.epoch, req)
                            .await
                    };
                    serial_answer(head.id, res)
                }
            };
            let _ = tx.send(answer).await;
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

/// A request as the server decoded it.
enum Incoming {
    Io(IoRequest),
    Serial(SerialRequest),
}

fn io_answer(id: u64, res: Result<IoReply, IoError>) -> Answer {
    match res {
        Ok(IoReply::Data(d)) => (
            ResponseHeader {
                status: Status::Ok,
                id,
                len: d.len() as u32,
                payload_crc: crc32fast::hash(&d),
            },
            Payload::Data(d),
        ),
        Ok(IoReply::Done) => ok_answer(id),
        Err(e) => error_answer(id, &e),
    }
}

fn serial_answer(id: u64, res: Result<CompareResult, IoError>) -> Answer {
    match res {
        Ok(CompareResult::Written) => ok_answer(id),
        Ok(CompareResult::Miscompare { offset }) => {
            let b = encode_miscompare(offset);
            (
                ResponseHeader {
                    status: Status::Miscompare,
                    id,
                    len: MISCOMPARE_BYTES as u32,
                    payload_crc: crc32fast::hash(&b),
                },
                Payload::Bytes(b.to_vec()),
            )
        }
        Err(e) => error_answer(id, &e),
    }
}

fn ok_answer(id: u64) -> Answer {
    (
        ResponseHeader {
            status: Status::Ok,
            id,
            len: 0,
            payload_crc: 0,
        },
        Payload::None,
    )
}

fn error_answer(id: u64, e: &IoError) -> Answer {
    let text = e.to_string().into_bytes();
    (
        ResponseHeader {
            status: e.status(),
            id,
            len: text.len() as u32,
            payload_crc: crc32fast::hash(&text),
        },
        Payload::Bytes(text),
    )
}
