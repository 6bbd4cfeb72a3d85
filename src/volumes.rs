//! The Volumes gRPC service: creating a shared volume writes its superblock on a device of the
//! serving node and registers it in Raft, with that node as coordinator.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use csvd_csv_fs::engine::{ALIGN, AlignedBuf};
use csvd_csv_fs::superblock::{DATA_OFFSET, SUPERBLOCK_BYTES, Superblock, SuperblockError};
use csvd_raft::command::Command;
use csvd_raft::node::{MetaNode, now_ms};
use csvd_raft::pb::{self, volumes_server::Volumes};
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Serves volume operations for one node.
#[derive(Debug, Clone)]
pub struct VolumeService {
    node: MetaNode,
    /// The node's `devices` globs: a new volume's device must be among them, or the node
    /// would not find it again after a restart.
    devices: Vec<String>,
}

impl VolumeService {
    pub fn new(node: MetaNode, devices: Vec<String>) -> Self {
        Self { node, devices }
    }
}

/// What the first MiB of a device holds.
enum DeviceContent {
    Blank,
    Ours(Superblock),
    Foreign(Superblock),
    Other(String),
}

/// Reads the device's size and first MiB with direct I/O.
fn inspect(path: &Path, cluster: Uuid) -> Result<(u64, DeviceContent), Status> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            Status::failed_precondition(format!("{}: cannot open: {e}", path.display()))
        })?;
    let size = file.seek(SeekFrom::End(0)).map_err(|e| {
        Status::failed_precondition(format!("{}: cannot size: {e}", path.display()))
    })?;
    if size < DATA_OFFSET * 2 {
        return Err(Status::failed_precondition(format!(
            "{}: {size} bytes is too small for a volume (at least {} bytes)",
            path.display(),
            DATA_OFFSET * 2
        )));
    }
    let mut head =
        AlignedBuf::zeroed(DATA_OFFSET as usize).map_err(|e| Status::internal(e.to_string()))?;
    file.read_exact_at(&mut head, 0).map_err(|e| {
        Status::failed_precondition(format!("{}: cannot read: {e}", path.display()))
    })?;
    let content = match Superblock::decode(&head[..SUPERBLOCK_BYTES]) {
        Ok(sb) if sb.cluster_id == cluster => DeviceContent::Ours(sb),
        Ok(sb) => DeviceContent::Foreign(sb),
        Err(SuperblockError::NotCsvFs) if head.iter().all(|b| *b == 0) => DeviceContent::Blank,
        Err(SuperblockError::NotCsvFs) => {
            DeviceContent::Other("its first MiB holds data that is not csv-fs".into())
        }
        Err(e) => DeviceContent::Other(e.to_string()),
    };
    Ok((size, content))
}

/// Writes `sb` at offset 0 with direct I/O and makes it durable.
fn write_superblock(path: &Path, sb: &Superblock) -> Result<(), Status> {
    let bytes = sb
        .encode()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut buf = AlignedBuf::zeroed(ALIGN).map_err(|e| Status::internal(e.to_string()))?;
    buf.copy_from_slice(&bytes);
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            Status::failed_precondition(format!("{}: cannot open for writing: {e}", path.display()))
        })?;
    file.write_all_at(&buf, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| {
            Status::internal(format!(
                "{}: writing the superblock failed: {e}",
                path.display()
            ))
        })
}

#[tonic::async_trait]
impl Volumes for VolumeService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        self.node.cluster_cell().check(&req)?;
        let req = req.into_inner();
        let state = self.node.read_state().await?;
        let cluster = state
            .cluster_id
            .ok_or_else(|| Status::unavailable("the cluster is not initialized"))?;
        if state.volumes.values().any(|v| v.name == req.name) {
            return Err(Status::already_exists(format!(
                "a volume named {:?} already exists",
                req.name
            )));
        }
        let path = Path::new(&req.device).to_path_buf();
        if !crate::shared::matched_by(&self.devices, &path) {
            return Err(Status::failed_precondition(format!(
                "{}: not matched by this node's `devices` globs ({}); add it there so every restart finds the volume",
                path.display(),
                if self.devices.is_empty() {
                    "none configured".to_string()
                } else {
                    self.devices.join(", ")
                }
            )));
        }
        let (size, content) = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || inspect(&path, cluster))
                .await
                .map_err(|e| Status::internal(e.to_string()))??
        };
        let sb = match content {
            DeviceContent::Foreign(sb) => {
                return Err(Status::failed_precondition(format!(
                    "{}: belongs to cluster {} (volume {:?}); it is left untouched",
                    path.display(),
                    sb.cluster_id,
                    sb.name
                )));
            }
            DeviceContent::Ours(sb) if state.volumes.contains_key(&sb.volume_id) => {
                return Err(Status::already_exists(format!(
                    "{}: already holds volume {:?} ({})",
                    path.display(),
                    sb.name,
                    sb.volume_id
                )));
            }
            // Our superblock but no registration: an interrupted create; finish it.
            DeviceContent::Ours(sb) if sb.name == req.name => sb,
            DeviceContent::Other(why) if !req.force => {
                return Err(Status::failed_precondition(format!(
                    "{}: {why}; pass --force to overwrite it",
                    path.display()
                )));
            }
            _ => {
                let sb = Superblock::new(Uuid::new_v4(), cluster, size, &req.name, now_ms())
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let p = path.clone();
                let write = sb.clone();
                tokio::task::spawn_blocking(move || write_superblock(&p, &write))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))??;
                sb
            }
        };
        self.node
            .write(Command::RegisterVolume {
                id: sb.volume_id,
                name: sb.name.clone(),
                device_bytes: sb.device_bytes,
                data_offset: sb.data_offset,
                coordinator: self.node.id(),
                now_ms: now_ms(),
            })
            .await?;
        tracing::info!(volume = %sb.volume_id, name = %sb.name, device = %path.display(), "created a volume");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume_id: sb.volume_id.to_string(),
            device_bytes: sb.device_bytes,
        }))
    }
}
