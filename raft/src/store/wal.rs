//! Append-only segment files holding the Raft log entries (`raft-log.wal/`).
//!
//! # Format (version 1)
//!
//! A directory of segment files named `{first index:020}.seg`, each preallocated to
//! [`SEGMENT_BYTES`] so an append never changes the file size (an `fdatasync` then writes data
//! only, no metadata). A segment is a run of records followed by zeros:
//!
//! ```text
//!  0        4        8        12                20             20+len
//!  +--------+--------+--------+-----------------+---------------+
//!  | magic  | len    | crc32  | index (u64 LE)  | payload       |  next record ...
//!  +--------+--------+--------+-----------------+---------------+
//!  magic = 0x43535644 ("CSVD" as LE u32); len = payload bytes (u32 LE);
//!  crc32 (IEEE, crc32fast) covers the index and the payload.
//! ```
//!
//! Recovery reads each segment until the first record whose magic, length, checksum or index
//! (it must follow the previous one) does not fit: that is where the log ends. Everything after
//! it is zeroed, so a record that a torn write left behind can never reappear after later
//! appends. Truncation zeroes the removed records for the same reason.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of one segment file.
pub const SEGMENT_BYTES: u64 = 16 << 20;

const MAGIC: u32 = 0x4353_5644;
const HEADER: u64 = 20;

/// Where one record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    /// First index of the segment (its key).
    seg: u64,
    /// Offset of the record header in the segment.
    offset: u64,
    /// Payload length.
    len: u32,
}

#[derive(Debug)]
struct Segment {
    file: File,
    /// Offset where the next record goes.
    end: u64,
}

/// The segment files of one log.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    locs: BTreeMap<u64, Loc>,
}

fn record_crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode_record(buf: &mut Vec<u8>, index: u64, payload: &[u8]) {
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record_crc(index, payload).to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Parses the records of one segment image. Returns `(index, offset, len)` of each valid
/// record and the offset where the valid part ends. `expect` is the index the first record
/// must carry, if known.
fn scan(image: &[u8], mut expect: Option<u64>) -> (Vec<(u64, u64, u32)>, u64) {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + HEADER as usize <= image.len() {
        let word = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap_or([0; 4]));
        if word(off) != MAGIC {
            break;
        }
        let len = word(off + 4) as usize;
        let crc = word(off + 8);
        let index = u64::from_le_bytes(image[off + 12..off + 20].try_into().unwrap_or([0; 8]));
        let start = off + HEADER as usize;
        let Some(payload) = image.get(start..start + len) else {
            break;
        };
        if record_crc(index, payload) != crc || expect.is_some_and(|e| e != index) {
            break;
        }
        out.push((index, off as u64, len as u32));
        expect = Some(index + 1);
        off = start + len;
    }
    (out, off as u64)
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes zeros over `[from, to)` of `file`.
fn zero(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min((to.saturating_sub(from)) as usize)];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Wal {
    /// Opens the log in `dir`, recovering every valid record after `purged`.
    pub fn open(dir: &Path, purged: Option<u64>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut firsts: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            locs: BTreeMap::new(),
        };
        let mut expect: Option<u64> = None;
        let mut ended = false;
        for first in firsts {
            let path = seg_path(dir, first);
            if ended {
                // The log ended in an earlier segment: later ones hold nothing valid.
                std::fs::remove_file(&path)?;
                continue;
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let image = std::fs::read(&path)?;
            let (records, end) = scan(&image, expect);
            if let Some(dirty) = image[end as usize..].iter().rposition(|b| *b != 0) {
                // A torn or stale tail: zero it so it can never be read as records later.
                zero(&file, end, end + dirty as u64 + 1)?;
                file.sync_data()?;
                ended = true;
            }
            if records.is_empty() {
                // Nothing valid here: no later segment can continue the log.
                ended = true;
            }
            for (index, offset, len) in &records {
                if purged.is_none_or(|p| *index > p) {
                    wal.locs.insert(
                        *index,
                        Loc {
                            seg: first,
                            offset: *offset,
                            len: *len,
                        },
                    );
                }
            }
            if let Some(last) = records.last() {
                expect = Some(last.0 + 1);
            }
            wal.segments.insert(first, Segment { file, end });
        }
        sync_dir(dir)?;
        Ok(wal)
    }

    /// The highest index stored.
    pub fn last_index(&self) -> Option<u64> {
        self.locs.last_key_value().map(|(k, _)| *k)
    }

    /// Bytes of payload stored (after the purge point).
    pub fn payload_bytes(&self) -> u64 {
        self.locs.values().map(|l| l.len as u64).sum()
    }

    fn new_segment(&mut self, first: u64) -> io::Result<()> {
        let path = seg_path(&self.dir, first);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        // Preallocate so appends never change the file size.
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, SEGMENT_BYTES)?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.segments.insert(first, Segment { file, end: 0 });
        Ok(())
    }

    /// Writes records (not yet durable: call [`Wal::sync`]).
    pub fn append(&mut self, records: &[(u64, Vec<u8>)]) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut pending: Vec<(u64, u64, u32)> = Vec::new();
        for (index, payload) in records {
            let size = HEADER + payload.len() as u64;
            let need_new = match self.segments.last_key_value() {
                None => true,
                Some((_, s)) => {
                    s.end + buf.len() as u64 + size > SEGMENT_BYTES
                        && (s.end > 0 || !buf.is_empty())
                }
            };
            if need_new {
                self.flush_buf(&mut buf, &mut pending)?;
                if let Some((_, s)) = self.segments.last_key_value() {
                    s.file.sync_data()?;
                }
                self.new_segment(*index)?;
            }
            let seg_end = self
                .segments
                .last_key_value()
                .map(|(_, s)| s.end)
                .unwrap_or(0);
            pending.push((*index, seg_end + buf.len() as u64, payload.len() as u32));
            encode_record(&mut buf, *index, payload);
        }
        self.flush_buf(&mut buf, &mut pending)
    }

    fn flush_buf(
        &mut self,
        buf: &mut Vec<u8>,
        pending: &mut Vec<(u64, u64, u32)>,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some((&first, seg)) = self.segments.iter_mut().next_back() else {
            return Err(io::Error::other("no segment to append to"));
        };
        seg.file.write_all_at(buf, seg.end)?;
        seg.end += buf.len() as u64;
        for (index, offset, len) in pending.drain(..) {
            self.locs.insert(
                index,
                Loc {
                    seg: first,
                    offset,
                    len,
                },
            );
        }
        buf.clear();
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> io::Result<()> {
        match self.segments.last_key_value() {
            Some((_, s)) => s.file.sync_data(),
            None => Ok(()),
        }
    }

    /// Removes every record with index `from` or higher, durably; returns payload bytes removed.
    pub fn truncate(&mut self, from: u64) -> io::Result<u64> {
        let gone: Vec<(u64, Loc)> = self.locs.range(from..).map(|(k, v)| (*k, *v)).collect();
        let Some((_, first_gone)) = gone.first().copied() else {
            return Ok(0);
        };
        let removed = gone.iter().map(|(_, l)| l.len as u64).sum();
        for (k, _) in &gone {
            self.locs.remove(k);
        }
        // Later segments go entirely; the one holding `from` is zeroed from there on.
        let later: Vec<u64> = self
            .segments
            .range(first_gone.seg + 1..)
            .map(|(k, _)| *k)
            .collect();
        for k in later {
            self.segments.remove(&k);
            std::fs::remove_file(seg_path(&self.dir, k))?;
        }
        if let Some(seg) = self.segments.get_mut(&first_gone.seg) {
            zero(&seg.file, first_gone.offset, seg.end)?;
            seg.end = first_gone.offset;
            seg.file.sync_data()?;
        }
        sync_dir(&self.dir)?;
        Ok(removed)
    }

    /// Forgets records up to `upto` and deletes segments that hold nothing newer; returns
    /// payload bytes forgotten. The caller records the purge point durably first.
    pub fn purge(&mut self, upto: u64) -> io::Result<u64> {
        let gone: Vec<u64> = self.locs.range(..=upto).map(|(k, _)| *k).collect();
        let mut removed = 0;
        for k in gone {
            if let Some(l) = self.locs.remove(&k) {
                removed += l.len as u64;
            }
        }
        let current = self.segments.last_key_value().map(|(k, _)| *k);
        let live: std::collections::BTreeSet<u64> = self.locs.values().map(|l| l.seg).collect();
        let dead: Vec<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|k| Some(*k) != current && !live.contains(k))
            .collect();
        for k in &dead {
            self.segments.remove(k);
            std::fs::remove_file(seg_path(&self.dir, *k))?;
        }
        if !dead.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Reads the payloads of the stored records with index in `range`, in order.
    pub fn read(&self, range: impl std::ops::RangeBounds<u64>) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for (index, loc) in self.locs.range(range) {
            let seg = self
                .segments
                .get(&loc.seg)
                .ok_or_else(|| io::Error::other(format!("segment of entry {index} is missing")))?;
            let mut buf = vec![0u8; loc.len as usize];
            seg.file.read_exact_at(&mut buf, loc.offset + HEADER)?;
            out.push(buf);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry-{i}-{}", "x".repeat((i % 7) as usize)).into_bytes()
    }

    fn append_range(w: &mut Wal, r: std::ops::Range<u64>) {
        let recs: Vec<(u64, Vec<u8>)> = r.map(|i| (i, payload(i))).collect();
        w.append(&recs).unwrap();
        w.sync().unwrap();
    }

    #[test]
    fn test_wal_roundtrip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path(), None).unwrap();
            append_range(&mut w, 1..50);
        }
        let w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.last_index(), Some(49));
        let got = w.read(10..13).unwrap();
        assert_eq!(got, vec![payload(10), payload(11), payload(12)]);
    }

    #[test]
    fn test_wal_torn_tail_is_dropped_and_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let path;
        let end;
        {
            let mut w = Wal::open(dir.path(), None).unwrap();
            append_range(&mut w, 1..11);
            let (k, s) = w.segments.last_key_value().unwrap();
            path = seg_path(dir.path(), *k);
            end = s.end;
        }
        // A torn record 11 (header only, bad checksum) followed by a complete stale record 12.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let mut buf = Vec::new();
        encode_record(&mut buf, 11, b"torn");
        buf[10] ^= 0xff;
        encode_record(&mut buf, 12, b"stale");
        f.write_all_at(&buf, end).unwrap();
        drop(f);
        let mut w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.last_index(), Some(10));
        // New records of the same sizes must not let the stale one reappear.
        w.append(&[(11, b"torn".to_vec())]).unwrap();
        w.sync().unwrap();
        drop(w);
        let w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.last_index(), Some(11));
    }

    #[test]
    fn test_wal_truncate_zeroes_removed_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path(), None).unwrap();
            append_range(&mut w, 1..21);
            assert!(w.truncate(11).unwrap() > 0);
            assert_eq!(w.last_index(), Some(10));
            w.append(&[(11, payload(11))]).unwrap();
            w.sync().unwrap();
        }
        let w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.last_index(), Some(11));
    }

    #[test]
    fn test_wal_rotates_and_purges_segments() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; (SEGMENT_BYTES / 3) as usize];
        let mut w = Wal::open(dir.path(), None).unwrap();
        for i in 1..=7 {
            w.append(&[(i, big.clone())]).unwrap();
        }
        w.sync().unwrap();
        assert!(w.segments.len() >= 3, "{} segments", w.segments.len());
        let before = w.segments.len();
        w.purge(5).unwrap();
        assert!(w.segments.len() < before);
        assert_eq!(w.read(6..=7).unwrap().len(), 2);
        drop(w);
        let w = Wal::open(dir.path(), Some(5)).unwrap();
        assert_eq!(w.locs.keys().copied().collect::<Vec<_>>(), vec![6, 7]);
        // Truncating into an earlier segment removes the later ones.
        let mut w = w;
        w.truncate(6).unwrap();
        assert_eq!(w.last_index(), None);
        drop(w);
        let w = Wal::open(dir.path(), Some(5)).unwrap();
        assert_eq!(w.last_index(), None);
    }

    mod scan_model {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Any bytes: scanning never panics and never reports a record outside the image.
            #[test]
            fn test_scan_arbitrary_bytes(image in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let (records, end) = scan(&image, None);
                prop_assert!(end as usize <= image.len());
                for (_, offset, len) in records {
                    prop_assert!(offset + HEADER + len as u64 <= end);
                }
            }

            /// Encoded records scan back exactly; a flipped byte ends the log at or before it.
            #[test]
            fn test_scan_roundtrip_and_corruption(
                payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20),
                flip in any::<prop::sample::Index>(),
            ) {
                let mut image = Vec::new();
                for (i, p) in payloads.iter().enumerate() {
                    encode_record(&mut image, 100 + i as u64, p);
                }
                let (records, end) = scan(&image, Some(100));
                prop_assert_eq!(records.len(), payloads.len());
                prop_assert_eq!(end as usize, image.len());
                let at = flip.index(image.len());
                image[at] ^= 0x5a;
                let (records, end) = scan(&image, Some(100));
                prop_assert!(end as usize <= at, "a corrupt byte at {} was read past (end {})", at, end);
                prop_assert!(records.len() < payloads.len());
            }
        }
    }
}
