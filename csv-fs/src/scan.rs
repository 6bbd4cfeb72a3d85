//! Finding volumes: every node scans its configured device globs for csv-fs superblocks and
//! maps each volume UUID to its own path, so paths may differ from node to node.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::engine::{ALIGN, AlignedBuf};
use crate::superblock::{SUPERBLOCK_BYTES, Superblock};

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Volumes of this cluster, by UUID: the path and its superblock.
    pub found: HashMap<Uuid, (PathBuf, Superblock)>,
    /// Paths skipped, each with the reason (another cluster's volume, unreadable, corrupt).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Reads the superblock at `path` with direct I/O, so the answer comes from the device, not
/// from a cache.
pub fn read_superblock(path: &Path) -> Result<Superblock, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let mut buf = AlignedBuf::zeroed(ALIGN).map_err(|e| e.to_string())?;
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| format!("cannot read: {e}"))?;
    Superblock::decode(&buf[..SUPERBLOCK_BYTES]).map_err(|e| e.to_string())
}

/// Expands `globs` and reads every match's superblock. Volumes of other clusters are never
/// opened for writing: they are only listed as skipped.
pub fn scan(globs: &[String], cluster: Uuid) -> Scan {
    let mut out = Scan::default();
    for pattern in globs {
        let paths = match glob::glob(pattern) {
            Ok(p) => p,
            Err(e) => {
                out.skipped
                    .push((PathBuf::from(pattern), format!("bad glob: {e}")));
                continue;
            }
        };
        for entry in paths {
            let path = match entry {
                Ok(p) => p,
                Err(e) => {
                    out.skipped.push((e.path().to_path_buf(), e.to_string()));
                    continue;
                }
            };
            match read_superblock(&path) {
                Ok(sb) if sb.check_owner(cluster).is_ok() => {
                    out.found.entry(sb.volume_id).or_insert((path, sb));
                }
                Ok(sb) => out.skipped.push((
                    path,
                    format!(
                        "belongs to cluster {} (volume {:?})",
                        sb.cluster_id, sb.name
                    ),
                )),
                Err(e) => out.skipped.push((path, e)),
            }
        }
    }
    out
}
