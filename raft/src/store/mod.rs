//! openraft storage on redb: the log and vote in one file, state-machine snapshots in another.
//!
//! Why redb and not sled: sled 0.34 flushes with `sync_file_range` and never `fsync`, so a vote
//! or log entry acknowledged to openraft could be lost at power failure; it has had no release
//! since 2021 and openraft dropped its sled store. redb commits with fsync by default.

mod log;
mod sm;

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
