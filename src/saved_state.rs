//! A quick migration's saved state on the shared volume.
//!
//! The state machine gives each quick migration a disk on the VM's volume
//! (`csvd_raft::migration::MigrationRecord::state_disk`). The source pauses the guest and
//! lets its QEMU write the migration stream into a Unix socket; this module copies the
//! stream into the disk. After the switchover the destination copies it back out of the
//! disk into its own QEMU's socket. The guest's whole state thus passes through the shared
//! volume, as in a save and restore, and the two nodes never exchange it directly.
//!
//! The disk's first block is a header: a magic, the migration's id (so a restore never
//! loads another migration's leftovers) and the stream's length. The stream follows from
//! byte [`HEADER`] on.

use csvd_csv_fs::engine::AlignedBuf;
use csvd_raft::migration::MigrationId;
use csvd_raft::volume::DiskId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::shared::Shared;

/// Where the stream starts on the disk (the header's block comes first).
pub const HEADER: u64 = 4096;
/// Bytes copied per I/O.
const CHUNK: usize = 4 << 20;
const MAGIC: &[u8; 8] = b"CSVDSAV1";

/// The header block for a stream of `len` bytes of migration `id`.
fn header(id: MigrationId, len: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

/// The stream length a header block records for migration `id`.
fn parse_header(block: &[u8], id: MigrationId) -> Result<u64, String> {
    if block.len() < 24 || &block[..8] != MAGIC {
        return Err("the saved-state disk holds no saved state".into());
    }
    let saved_by = u64::from_le_bytes(block[8..16].try_into().unwrap_or_default());
    if saved_by != id {
        return Err(format!(
            "the saved-state disk holds migration {saved_by}'s state, not migration {id}'s"
        ));
    }
    Ok(u64::from_le_bytes(
        block[16..24].try_into().unwrap_or_default(),
    ))
}

/// Waits until this node's csv-fs knows `disk` (it follows the cluster state, which made
/// the disk moments ago).
async fn wait_for_disk(csv: &Shared, disk: DiskId) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match csv.read(disk, 0, HEADER).await {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the saved-state disk {disk} is not usable here: {e}"
                ));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes it holds.
async fn fill(from: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("reading QEMU's saved state: {e}")),
        }
    }
    Ok(n)
}

/// Copies the migration stream `from` (the source QEMU's) into `disk` of `capacity` bytes;
/// returns the stream's length once it is on the disk.
pub async fn save(
    csv: &Shared,
    disk: DiskId,
    capacity: u64,
    id: MigrationId,
    mut from: impl AsyncRead + Unpin,
) -> Result<u64, String> {
    wait_for_disk(csv, disk).await?;
    let mut len = 0u64;
    loop {
        let mut buf = AlignedBuf::for_overwrite(CHUNK).map_err(|e| e.to_string())?;
        let n = fill(&mut from, &mut buf).await?;
        if n == 0 {
            break;
        }
        // The last piece is padded to whole blocks.
        let padded = n.div_ceil(4096) * 4096;
        buf[n..padded].fill(0);
        if HEADER + len + padded as u64 > capacity {
            return Err(format!(
                "the saved state outgrew its disk ({capacity} bytes)"
            ));
        }
        let data = csvd_csv_fs::engine::BufSlice::from(buf)
            .slice(0, padded)
            .ok_or("an unaligned piece of saved state")?;
        csv.write(disk, HEADER + len, data, false)
            .await
            .map_err(|e| format!("writing the saved state: {e}"))?;
        len += n as u64;
        if n < CHUNK {
            break;
        }
    }
    let head = AlignedBuf::from_slice(&header(id, len)).map_err(|e| e.to_string())?;
    csv.write(disk, 0, head.into(), true)
        .await
        .map_err(|e| format!("writing the saved state's header: {e}"))?;
    csv.flush(disk)
        .await
        .map_err(|e| format!("flushing the saved state: {e}"))?;
    Ok(len)
}

/// Copies migration `id`'s saved state out of `disk` into `to` (the destination QEMU's
/// incoming stream); returns its length.
pub async fn restore(
    csv: &Shared,
    disk: DiskId,
    capacity: u64,
    id: MigrationId,
    mut to: impl AsyncWrite + Unpin,
) -> Result<u64, String> {
    wait_for_disk(csv, disk).await?;
    let head = csv
        .read(disk, 0, HEADER)
        .await
        .map_err(|e| format!("reading the saved state's header: {e}"))?;
    let len = parse_header(&head, id)?;
    if HEADER + len > capacity {
        return Err(format!(
            "the saved state's header claims {len} bytes, more than its disk holds"
        ));
    }
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(CHUNK as u64);
        let padded = want.div_ceil(4096) * 4096;
        let buf = csv
            .read(disk, HEADER + at, padded)
            .await
            .map_err(|e| format!("reading the saved state: {e}"))?;
        to.write_all(&buf[..want as usize])
            .await
            .map_err(|e| format!("handing the saved state to QEMU: {e}"))?;
        at += want;
    }
    to.shutdown()
        .await
        .map_err(|e| format!("handing the saved state to QEMU: {e}"))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_names_its_migration_and_length() {
        let h = header(7, 123_456);
        assert_eq!(parse_header(&h, 7), Ok(123_456));
        let e = parse_header(&h, 8).unwrap_err();
        assert!(e.contains("migration 7's state, not migration 8's"), "{e}");
        let e = parse_header(&[0u8; 4096], 7).unwrap_err();
        assert!(e.contains("holds no saved state"), "{e}");
    }
}
