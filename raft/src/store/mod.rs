//! openraft storage: log entries in append-only segment files (`raft-log.wal/`), the vote,
//! purge point and committed index in redb (`raft-log.redb`), state-machine snapshots in a
//! second redb file (`raft-sm.redb`).
//!
//! Why redb and not sled: sled 0.34 flushes with `sync_file_range` and never `fsync`, so a vote
//! or log entry acknowledged to openraft could be lost at power failure; it has had no release
//! since 2021 and openraft dropped its sled store. redb commits with fsync by default.
//!
//! Why the entries are not in redb: a redb commit cost 1.8x an append plus `fdatasync` on the
//! same disk, on every write's path; the segment files cost what the disk does
//! (docs/benchmarks.md).

mod log;
mod sm;
mod wal;

pub use log::LogStore;
pub use sm::{StateMachine, StateView};

use std::io;

/// Converts any storage-layer error into the `io::Error` openraft's traits return.
pub(crate) fn io_err(context: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{context}: {e}"))
}

/// Decodes a JSON value stored by this crate; corrupt bytes become `InvalidData`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("stored {what} is corrupt: {e}"),
        )
    })
}

/// Encodes a value for storage.
pub(crate) fn encode<T: serde::Serialize>(what: &str, value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io_err(&format!("encoding {what}"), e))
}
