//! The Raft log: entries in append-only segment files (`raft-log.wal/`, see [`super::wal`]),
//! the vote, purge point and committed index in a redb database (`raft-log.redb`).
//!
//! # Write path
//!
//! One writer thread owns every mutation. `append` puts the entries into an in-memory tail (so
//! replication can read them at once), queues them and returns; the writer drains whatever is
//! queued, appends it to the current segment, `fdatasync`s once and only then tells openraft,
//! through each append's `IOFlushed` callback, that the entries are on disk. Votes,
//! truncations and purges go through the same queue and are made durable in the order openraft
//! issued them (pending appends are synced before a vote is written), and they return only once
//! durable. Under load many appends share one fsync (group commit).
//!
//! Entries are not kept in redb because a redb commit (a copy-on-write B-tree: several page
//! writes, then an fsync) cost 1.8x an append plus `fdatasync` on the same disk, and that
//! difference sat on every write's path (see docs/benchmarks.md).
//!
//! # Read path
//!
//! Recent entries are served from the in-memory tail; older ones from the segment files. The
//! tail only drops entries the writer has made durable.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, TableDefinition, TableHandle};
use tokio::sync::oneshot;

use super::wal::Wal;
use super::{decode, encode, io_err};
use crate::TypeConfig;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// Durable entries kept in memory for readers (replication of recent entries).
const TAIL_KEEP: usize = 2048;

/// Most queued operations one batch takes.
const MAX_BATCH: usize = 1024;

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;
type Vote = VoteOf<TypeConfig>;

/// What the writer thread does, in queue order.
enum Op {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        done: IOFlushed<TypeConfig>,
    },
    Vote(Vec<u8>, oneshot::Sender<io::Result<()>>),
    Truncate(u64, oneshot::Sender<io::Result<()>>),
    Purge(LogId, oneshot::Sender<io::Result<()>>),
}

/// In-memory state shared by the store's clones and the writer.
#[derive(Debug, Default)]
struct Shared {
    /// Recent entries: everything not yet durable plus up to [`TAIL_KEEP`] durable ones.
    tail: BTreeMap<u64, Entry>,
    /// Highest index the writer has made durable.
    durable: u64,
    /// Last vote made durable.
    vote: Option<Vote>,
    /// Last purged log id.
    purged: Option<LogId>,
    /// Last committed id openraft told us about; the writer saves it now and then.
    committed: Option<LogId>,
}

/// The Raft log store. Cheap to clone; clones share the files and the writer.
#[derive(Debug, Clone)]
pub struct LogStore {
    wal: Arc<Mutex<Wal>>,
    shared: Arc<Mutex<Shared>>,
    writer: Arc<WriterHandle>,
    /// Bytes of entries appended since the last purge: drives the size-based snapshot policy.
    unpurged_bytes: Arc<AtomicU64>,
}

/// The queue to the writer thread. When the last store clone goes, the queue closes and the
/// thread is joined, so the database file is released before `drop` returns.
#[derive(Debug)]
struct WriterHandle {
    queue: Mutex<Option<mpsc::Sender<Op>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl WriterHandle {
    fn send(&self, op: Op) -> io::Result<()> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.as_ref() {
            Some(q) => q.send(op).map_err(|_| io_err("log writer", "stopped")),
            None => Err(io_err("log writer", "stopped")),
        }
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Append { entries, .. } => write!(f, "Append({})", entries.len()),
            Op::Vote(..) => f.write_str("Vote"),
            Op::Truncate(i, _) => write!(f, "Truncate({i})"),
            Op::Purge(l, _) => write!(f, "Purge({l})"),
        }
    }
}

impl LogStore {
    /// Opens (or creates) the log at `path` (the redb file; entries live in the sibling
    /// directory with the `.wal` extension) and starts its writer thread.
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::create(path)
            .map_err(|e| io_err(&format!("opening {}", path.display()), e))?;
        let txn = db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        txn.open_table(META)
            .map_err(|e| io_err("creating the meta table", e))?;
        txn.commit().map_err(|e| io_err("committing", e))?;
        let db = Arc::new(db);

        let mut shared = Shared::default();
        {
            let txn = db.begin_read().map_err(|e| io_err("starting a read", e))?;
            // Builds before the segment files kept entries in a `logs` table here. Refuse such a
            // data dir instead of starting with a vote but without the entries it covered.
            let tables = txn.list_tables().map_err(|e| io_err("listing tables", e))?;
            if tables.into_iter().any(|t| t.name() == "logs") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds log entries in the format of an earlier csvd build; \
                         empty the data dir to start this node afresh",
                        path.display()
                    ),
                ));
            }
            let meta = txn
                .open_table(META)
                .map_err(|e| io_err("opening the meta table", e))?;
            let get = |key: &str| -> io::Result<Option<Vec<u8>>> {
                Ok(meta
                    .get(key)
                    .map_err(|e| io_err("reading meta", e))?
                    .map(|v| v.value().to_vec()))
            };
            if let Some(b) = get(KEY_VOTE)? {
                shared.vote = Some(decode("vote", &b)?);
            }
            if let Some(b) = get(KEY_PURGED)? {
                shared.purged = Some(decode("purge point", &b)?);
            }
            if let Some(b) = get(KEY_COMMITTED)? {
                shared.committed = decode::<Option<LogId>>("committed index", &b)?;
            }
        }
        let wal_dir = path.with_extension("wal");
        let wal = Wal::open(&wal_dir, shared.purged.map(|p| p.index()))
            .map_err(|e| io_err(&format!("opening {}", wal_dir.display()), e))?;
        shared.durable = wal.last_index().unwrap_or(0);
        let unpurged_bytes = Arc::new(AtomicU64::new(wal.payload_bytes()));
        let wal = Arc::new(Mutex::new(wal));

        let (queue, rx) = mpsc::channel();
        let shared = Arc::new(Mutex::new(shared));
        let writer = Writer {
            db,
            wal: wal.clone(),
            shared: shared.clone(),
            unpurged_bytes: unpurged_bytes.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err("starting the log writer", e))?;
        Ok(Self {
            wal,
            shared,
            writer: Arc::new(WriterHandle {
                queue: Mutex::new(Some(queue)),
                thread: Mutex::new(Some(thread)),
            }),
            unpurged_bytes,
        })
    }

    /// Bytes of log entries stored since the last purge (approximate, encoded size).
    pub fn unpurged_bytes(&self) -> u64 {
        self.unpurged_bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an operation that answers on a oneshot and waits until it is durable.
    async fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<io::Result<()>>) -> Op,
    ) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(make(tx))?;
        rx.await.map_err(|_| io_err("log writer", "stopped"))?
    }

    fn read_durable(&self, start: Bound<u64>, end: Bound<u64>) -> io::Result<Vec<Entry>> {
        let payloads = self
            .wal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read((start, end))?;
        payloads
            .iter()
            .map(|b| decode::<Entry>("log entry", b))
            .collect()
    }
}

/// The writer thread: drains the queue and makes each batch durable, in order.
struct Writer {
    db: Arc<Database>,
    wal: Arc<Mutex<Wal>>,
    shared: Arc<Mutex<Shared>>,
    unpurged_bytes: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Op>) {
        // A flush this slow is logged (etcd's "slow fdatasync" in spirit, at a lower bar:
        // a guest's switchover commit waits for it).
        const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);
        // The committed index is written at most this often: each write dirties a second
        // table in the transaction, and a stale value is safe (see `save_committed`).
        const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
        let mut committed_written: Option<(Option<LogId>, std::time::Instant)> = None;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH
                && let Ok(op) = rx.try_recv()
            {
                batch.push(op);
            }
            let committed = self
                .shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .committed;
            let due = match committed_written {
                None => true,
                Some((c, at)) => c != committed && at.elapsed() >= COMMITTED_EVERY,
            };
            let started = std::time::Instant::now();
            let result = self.commit(&batch, due.then_some(committed));
            let took = started.elapsed();
            if took >= SLOW_FLUSH {
                // Every commit waits for this: a migration's switchover among them.
                tracing::warn!(
                    ms = took.as_millis() as u64,
                    ops = batch.len(),
                    "slow disk: the Raft log took this long to reach it"
                );
            }
            if due && result.is_ok() {
                committed_written = Some((committed, std::time::Instant::now()));
            }
            self.finish(batch, result);
        }
        // The store is closing (clean shutdown): leave the latest committed index on disk.
        let committed = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .committed;
        let changed = match committed_written {
            Some((c, _)) => c != committed,
            None => committed.is_some(),
        };
        if changed && let Err(e) = self.commit(&[], Some(committed)) {
            tracing::warn!(error = %e, "could not save the committed index at shutdown");
        }
    }

    /// Makes every operation of the batch durable, in queue order: appends are written to
    /// the segment and synced before any later vote, truncation or purge is done. Returns the
    /// highest appended index and the payload bytes added and removed.
    fn commit(
        &self,
        batch: &[Op],
        committed: Option<Option<LogId>>,
    ) -> io::Result<(Option<u64>, u64, u64)> {
        let mut wal = self.wal.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = None;
        let (mut added, mut removed) = (0u64, 0u64);
        let mut unsynced = false;
        for op in batch {
            if !matches!(op, Op::Append { .. }) && unsynced {
                wal.sync()?;
                unsynced = false;
            }
            match op {
                Op::Append { entries, .. } => {
                    wal.append(entries)?;
                    added += entries.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
                    last = entries.last().map(|(i, _)| *i).or(last);
                    unsynced = true;
                }
                Op::Vote(bytes, _) => self.put_meta(&[(KEY_VOTE, bytes.clone())])?,
                Op::Truncate(from, _) => {
                    removed += wal.truncate(*from)?;
                    if last.is_some_and(|l| l >= *from) {
                        last = from.checked_sub(1);
                    }
                }
                Op::Purge(log_id, _) => {
                    // The purge point is durable before any segment is deleted.
                    self.put_meta(&[(KEY_PURGED, encode("purge point", log_id)?)])?;
                    removed += wal.purge(log_id.index())?;
                }
            }
        }
        if unsynced {
            wal.sync()?;
        }
        drop(wal);
        if let Some(committed) = committed {
            self.put_meta(&[(KEY_COMMITTED, encode("committed index", &committed)?)])?;
        }
        Ok((last, added, removed))
    }

    /// Writes meta values in one durable redb transaction.
    fn put_meta(&self, values: &[(&str, Vec<u8>)]) -> io::Result<()> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| io_err("starting a write", e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| io_err("setting durability", e))?;
        {
            let mut t = txn
                .open_table(META)
                .map_err(|e| io_err("opening the meta table", e))?;
            for (key, bytes) in values {
                t.insert(*key, bytes.as_slice())
                    .map_err(|e| io_err("writing meta", e))?;
            }
        }
        txn.commit().map_err(|e| io_err("committing meta", e))
    }

    fn finish(&self, batch: Vec<Op>, result: io::Result<(Option<u64>, u64, u64)>) {
        if let Ok((last, added, removed)) = &result {
            self.unpurged_bytes.fetch_add(*added, Ordering::Relaxed);
            let now = self.unpurged_bytes.load(Ordering::Relaxed);
            self.unpurged_bytes
                .fetch_sub((*removed).min(now), Ordering::Relaxed);
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(last) = last {
                shared.durable = shared.durable.max(*last);
            }
            for op in &batch {
                if let Op::Vote(bytes, _) = op
                    && let Ok(v) = decode::<Vote>("vote", bytes)
                {
                    shared.vote = Some(v);
                }
            }
            // Drop durable entries beyond what readers need.
            while shared.tail.len() > TAIL_KEEP {
                let Some((&first, _)) = shared.tail.first_key_value() else {
                    break;
                };
                if first > shared.durable {
                    break;
                }
                shared.tail.remove(&first);
            }
        }
        let reply = |r: &io::Result<(Option<u64>, u64, u64)>| match r {
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        for op in batch {
            match op {
                Op::Append { done, .. } => done.io_completed(reply(&result)),
                Op::Vote(_, tx) | Op::Truncate(_, tx) | Op::Purge(_, tx) => {
                    let _ = tx.send(reply(&result));
                }
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let (cached, tail_first) = {
            let shared = self.lock();
            let cached: Vec<Entry> = shared
                .tail
                .range((start, end))
                .map(|(_, e)| e.clone())
                .collect();
            (cached, shared.tail.first_key_value().map(|(k, _)| *k))
        };
        let wanted_first = match start {
            Bound::Included(i) => i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        // Everything the caller wants is in the tail.
        if tail_first.is_some_and(|f| f <= wanted_first) {
            return Ok(cached);
        }
        // The older part comes from the segment files: below the tail's first entry all is durable.
        let durable_end = match tail_first {
            Some(f) => match end {
                Bound::Included(e) if e < f => Bound::Included(e),
                Bound::Excluded(e) if e <= f => Bound::Excluded(e),
                _ => Bound::Excluded(f),
            },
            None => end,
        };
        let this = self.clone();
        let mut out = tokio::task::spawn_blocking(move || this.read_durable(start, durable_end))
            .await
            .map_err(|e| io_err("storage task", e))??;
        out.extend(cached);
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let (purged, tail_last) = {
            let shared = self.lock();
            (
                shared.purged,
                shared.tail.last_key_value().map(|(_, e)| e.log_id()),
            )
        };
        let last = match tail_last {
            Some(l) => Some(l),
            None => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || -> io::Result<Option<LogId>> {
                    let wal = this.wal.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(last) = wal.last_index() else {
                        return Ok(None);
                    };
                    let payload = wal.read(last..=last)?;
                    match payload.first() {
                        Some(b) => Ok(Some(decode::<Entry>("log entry", b)?.log_id())),
                        None => Ok(None),
                    }
                })
                .await
                .map_err(|e| io_err("storage task", e))??
            }
        };
        Ok(LogState {
            last_log_id: last.or(purged),
            last_purged_log_id: purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode("vote", vote)?;
        self.submit(|tx| Op::Vote(bytes, tx)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Written with the next transaction rather than with an fsync of its own: a stale
        // value only means a restarted node re-applies less before hearing from the leader.
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        {
            let mut shared = self.lock();
            for entry in entries {
                encoded.push((entry.index(), encode("log entry", &entry)?));
                shared.tail.insert(entry.index(), entry);
            }
        }
        self.writer.send(Op::Append {
            entries: encoded,
            done: callback,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        {
            let mut shared = self.lock();
            shared.tail.retain(|i, _| *i < from);
            shared.durable = shared.durable.min(from.saturating_sub(1));
        }
        self.submit(|tx| Op::Truncate(from, tx)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        {
            let mut shared = self.lock();
            let upto = log_id.index();
            shared.tail.retain(|i, _| *i > upto);
            shared.purged = Some(log_id);
        }
        self.submit(|tx| Op::Purge(log_id, tx)).await
    }
}
