//! The gRPC Cluster service: the operator and node-agent API of a metadata node.

use futures::stream::BoxStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::spec_from_pb;
use crate::command::Request as CommandRequest;
use crate::node::MetaNode;
use crate::pb::{self, cluster_server::Cluster};

/// Serves the cluster API of one node.
#[derive(Debug, Clone)]
pub struct ClusterService {
    node: MetaNode,
}

impl ClusterService {
    /// Serves `node`.
    pub fn new(node: MetaNode) -> Self {
        Self { node }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.node.cluster_cell().check(req)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        self.check(&req)?;
        let cluster_id = self.node.init().await?;
        Ok(Response::new(pb::InitResponse {
            cluster_id: cluster_id.to_string(),
            node_id: self.node.id(),
        }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        let spec = req
            .node
            .map(spec_from_pb)
            .ok_or_else(|| Status::invalid_argument("a join request must describe the node"))?;
        let expected = Some(req.expected_cluster_id).filter(|c| !c.is_empty());
        let (cluster_id, role) = self.node.join(spec, expected).await?;
        Ok(Response::new(pb::JoinResponse {
            cluster_id,
            role: role.to_string(),
        }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.check(&req)?;
        let id = Some(req.into_inner().node_id).filter(|id| *id != 0 && *id != self.node.id());
        self.node.leave(id).await?;
        if id.is_none() {
            // This node was the one removed: stop serving as a member.
            self.node.mark_removed();
        }
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.check(&req)?;
        let status = if req.get_ref().local {
            self.node.local_status()
        } else {
            self.node.status().await?
        };
        let json = serde_json::to_vec(&status).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::StatusResponse { json }))
    }

    async fn state(
        &self,
        req: Request<pb::StateRequest>,
    ) -> Result<Response<pb::StateResponse>, Status> {
        self.check(&req)?;
        let state = self.node.read_state().await?;
        let json = serde_json::to_vec(&state).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::StateResponse { json }))
    }

    type WatchMigrationStream = BoxStream<'static, Result<pb::MigrationEvent, Status>>;

    async fn watch_migration(
        &self,
        req: Request<pb::WatchMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
        self.check(&req)?;
        let id = req.into_inner().id;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let node = self.node.clone();
        tokio::spawn(async move { node.watch_migration(id, tx).await });
        let events = ReceiverStream::new(rx).map(|r| {
            let m = r.map_err(Status::from)?;
            let json = serde_json::to_vec(&m).map_err(|e| Status::internal(e.to_string()))?;
            Ok(pb::MigrationEvent { json })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn write(
        &self,
        req: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.check(&req)?;
        let request: CommandRequest = serde_json::from_slice(&req.get_ref().json)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        if request.v == 0 || request.v > crate::command::COMMAND_VERSION {
            return Err(Status::failed_precondition(format!(
                "command version {} is not spoken by this node (it speaks {})",
                request.v,
                crate::command::COMMAND_VERSION
            )));
        }
        let mut cmd = request.cmd;
        cmd.stamp_clock(crate::node::now_ms());
        let result = match self.node.write(cmd).await {
            Ok((outcome, index)) => (Ok(outcome), index),
            Err(crate::node::NodeError::Rejected(e)) => (Err(e), 0),
            Err(e) => return Err(e.into()),
        };
        let response: crate::Response = result.0;
        let json = serde_json::to_vec(&response).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::WriteResponse {
            json,
            log_index: result.1,
        }))
    }
}
