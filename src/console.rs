//! The Guests gRPC service: a VM's serial console, relayed between the operator's
//! `migrator vm console` and the console socket of the VM's QEMU on this node.
//!
//! The reply starts with the end of the console's log (what the guest printed before anyone
//! was connected), then carries the guest's output while the request carries keystrokes.

use std::path::PathBuf;

use csvd_raft::MetaNode;
use csvd_raft::pb;
use csvd_raft::pb::guests_server::Guests;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

/// The most log a console replays.
const MAX_HISTORY: u32 = 1 << 20;

/// Serves the consoles of the guests this node runs.
#[derive(Debug, Clone)]
pub struct GuestService {
    node: MetaNode,
    data_dir: PathBuf,
}

impl GuestService {
    pub fn new(node: MetaNode, data_dir: PathBuf) -> Self {
        GuestService { node, data_dir }
    }
}

#[tonic::async_trait]
impl Guests for GuestService {
    type ConsoleStream = ReceiverStream<Result<pb::ConsoleOutput, Status>>;

    async fn console(
        &self,
        req: Request<Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        self.node.cluster_cell().check(&req)?;
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the first message must name the VM"))?;
        let id: Uuid = first
            .vm
            .parse()
            .map_err(|_| Status::invalid_argument(format!("{:?} is not a VM id", first.vm)))?;
        let state = self.node.local_view().state.clone();
        let vm = state
            .vms
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("VM {id} does not exist")))?;
        if vm.owner != self.node.id() {
            let addr = state
                .nodes
                .get(&vm.owner)
                .map(|n| n.spec.grpc_addr.clone())
                .unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "VM {} runs on node {} ({addr}), not here",
                vm.name, vm.owner
            )));
        }
        let dir = crate::vms::run_dir(&self.data_dir, id);
        let sock = tokio::net::UnixStream::connect(dir.join("console.sock"))
            .await
            .map_err(|e| {
                Status::failed_precondition(format!("VM {} is not running here: {e}", vm.name))
            })?;
        let history = replay(&dir.join("serial.log"), first.history.min(MAX_HISTORY)).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ConsoleOutput, Status>>(64);
        let (mut rd, mut wr) = sock.into_split();
        if !history.is_empty() {
            let _ = tx.send(Ok(pb::ConsoleOutput { data: history })).await;
        }
        if !first.data.is_empty() {
            wr.write_all(&first.data)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        // Keystrokes to the guest until the operator's side ends.
        let keys = tokio::spawn(async move {
            while let Ok(Some(msg)) = input.message().await {
                if wr.write_all(&msg.data).await.is_err() {
                    break;
                }
            }
        });
        // The guest's output to the operator until either side ends.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                tokio::select! {
                    n = rd.read(&mut buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.send(Ok(pb::ConsoleOutput { data: buf[..n].to_vec() })).await.is_err() {
                                break;
                            }
                        }
                    },
                    _ = tx.closed() => break,
                }
            }
            keys.abort();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The last `bytes` of the console log, from a line start where there is one.
async fn replay(log: &std::path::Path, bytes: u32) -> Vec<u8> {
    if bytes == 0 {
        return Vec::new();
    }
    let Ok(mut f) = tokio::fs::File::open(log).await else {
        return Vec::new();
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(u64::from(bytes));
    if f.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    if f.read_to_end(&mut out).await.is_err() {
        return Vec::new();
    }
    if from > 0
        && let Some(nl) = out.iter().position(|b| *b == b'\n')
    {
        out.drain(..=nl);
    }
    out
}
