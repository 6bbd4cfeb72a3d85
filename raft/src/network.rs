//! Raft traffic between nodes over tonic gRPC.
//!
//! Each openraft message travels as JSON inside a [`pb::RaftMessage`]; snapshot bytes ride in
//! a separate field. Connections are created lazily and re-established by tonic after a peer
//! restarts; every call is bounded by the deadline openraft passes in [`RPCOption`].
//! A peer that cannot be connected to is reported as `Unreachable`, so openraft backs off
//! instead of spinning.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};

/// How long an append stream that could not reach its follower waits before it reports so.
const UNREACHABLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{BasicNode, OptionalSend};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::pb::raft_client::RaftClient;
use crate::pb::{self, RaftMessage};
use crate::{CLUSTER_ID_HEADER, NodeId, Raft, TypeConfig};

/// The cluster id this node belongs to, once known; attached to and checked on every RPC.
#[derive(Debug, Clone, Default)]
pub struct ClusterIdCell(Arc<std::sync::RwLock<Option<String>>>);

impl ClusterIdCell {
    /// The id, if the node belongs to a cluster.
    pub fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the id once it is known.
    pub fn set(&self, id: String) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// Adds the cluster-id header to an outgoing request.
    pub fn stamp<T>(&self, req: &mut Request<T>) {
        if let Some(id) = self.get()
            && let Ok(v) = id.parse()
        {
            req.metadata_mut().insert(CLUSTER_ID_HEADER, v);
        }
    }

    /// Refuses a request addressed to another cluster.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(theirs) = req.metadata().get(CLUSTER_ID_HEADER) else {
            return Ok(());
        };
        let theirs = theirs
            .to_str()
            .map_err(|_| Status::invalid_argument("the cluster-id header is not text"))?;
        match self.get() {
            Some(ours) if ours != theirs => Err(Status::failed_precondition(format!(
                "wrong cluster: this node belongs to cluster {ours}, the request is for cluster {theirs}"
            ))),
            _ => Ok(()),
        }
    }
}

/// Builds a lazily connecting channel to a peer's gRPC address.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Creates gRPC clients for openraft's replication and election tasks.
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    cluster: ClusterIdCell,
}

impl GrpcNetwork {
    /// A network that stamps outgoing RPCs with the node's cluster id.
    pub fn new(cluster: ClusterIdCell) -> Self {
        Self { cluster }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GrpcPeer {
        GrpcPeer {
            target,
            addr: node.addr.clone(),
            client: channel(&node.addr).ok().map(RaftClient::new),
            cluster: self.cluster.clone(),
        }
    }
}

/// A connection to one peer.
#[derive(Debug)]
pub struct GrpcPeer {
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Channel>>,
    cluster: ClusterIdCell,
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: VoteOf<TypeConfig>,
    meta: SnapshotMetaOf<TypeConfig>,
}

/// Why an RPC failed, before it is mapped to the error type each openraft call expects.
enum CallError {
    Unreachable(String),
    Network(String),
}

impl<E: std::error::Error> From<CallError> for RPCError<TypeConfig, E> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
            CallError::Network(m) => RPCError::Network(NetworkError::from_string(m)),
        }
    }
}

impl From<CallError> for StreamingError<TypeConfig> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unreachable(m) => StreamingError::Unreachable(Unreachable::from_string(m)),
            CallError::Network(m) => StreamingError::Network(NetworkError::from_string(m)),
        }
    }
}

impl GrpcPeer {
    async fn call<Req, Resp, F, Fut>(
        &mut self,
        ttl: Duration,
        req: &Req,
        data: Vec<u8>,
        f: F,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, Request<RaftMessage>) -> Fut,
        Fut: Future<Output = Result<Response<RaftMessage>, Status>>,
    {
        let Some(client) = self.client.clone() else {
            return Err(CallError::Unreachable(format!(
                "node {} has an invalid address {:?}",
                self.target, self.addr
            )));
        };
        let json =
            serde_json::to_vec(req).map_err(|e| CallError::Network(format!("encoding: {e}")))?;
        let mut request = Request::new(RaftMessage { json, data });
        self.cluster.stamp(&mut request);
        request.set_timeout(ttl);
        let reply = match tokio::time::timeout(ttl, f(client, request)).await {
            Err(_) => {
                return Err(CallError::Network(format!(
                    "node {} did not answer within {ttl:?}",
                    self.target
                )));
            }
            Ok(Err(status)) => return Err(classify(self.target, &self.addr, status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        serde_json::from_slice(&reply.json).map_err(|e| {
            CallError::Network(format!(
                "node {} sent an undecodable reply: {e}",
                self.target
            ))
        })
    }
}

fn classify(target: NodeId, addr: &str, status: Status) -> CallError {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => CallError::Unreachable(format!(
            "node {target} at {addr} is unreachable: {}",
            status.message()
        )),
        _ => CallError::Network(format!(
            "node {target} at {addr} refused: {}",
            status.message()
        )),
    }
}

impl RaftNetworkV2<TypeConfig> for GrpcPeer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self
            .call(option.hard_ttl(), &rpc, Vec::new(), |mut c, r| async move {
                c.append_entries(r).await
            })
            .await?)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + OptionalSend
            + Unpin
            + 'static,
    {
        use tokio_stream::StreamExt;
        let target = self.target;
        let addr = self.addr.clone();
        let client = self.client.clone();
        let cluster = self.cluster.clone();
        Box::pin(async move {
            let Some(mut client) = client else {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {target} has an invalid address {addr:?}"
                ))));
            };
            // Requests that cannot be encoded end the stream; openraft then falls back to
            // resending from the last acknowledged entry.
            let outgoing = input.map_while(|req| {
                serde_json::to_vec(&req).ok().map(|json| RaftMessage {
                    json,
                    data: Vec::new(),
                })
            });
            let mut request = Request::new(outgoing);
            cluster.stamp(&mut request);
            let opened =
                tokio::time::timeout(option.hard_ttl(), client.stream_append(request)).await;
            let responses = match opened {
                Err(_) => {
                    return Err(RPCError::Network(NetworkError::from_string(format!(
                        "node {target} did not open the append stream within {:?}",
                        option.hard_ttl()
                    ))));
                }
                Ok(Err(status)) => {
                    let err = classify(target, &addr, status);
                    if matches!(err, CallError::Unreachable(_)) {
                        // openraft backs off inside the request stream, which a stream that
                        // never opened does not poll: without a pause here a dead follower
                        // is retried thousands of times a second.
                        tokio::time::sleep(UNREACHABLE_PAUSE).await;
                    }
                    return Err(err.into());
                }
                Ok(Ok(r)) => r.into_inner(),
            };
            let results = responses.map(move |item| {
                let msg = item.map_err(|s| RPCError::from(classify(target, &addr, s)))?;
                serde_json::from_slice::<StreamAppendResult<TypeConfig>>(&msg.json).map_err(|e| {
                    RPCError::Network(NetworkError::from_string(format!(
                        "node {target} sent an undecodable append result: {e}"
                    )))
                })
            });
            Ok(Box::pin(results) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self
            .call(option.hard_ttl(), &rpc, Vec::new(), |mut c, r| async move {
                c.vote(r).await
            })
            .await?)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self
            .call(option.hard_ttl(), &rpc, Vec::new(), |mut c, r| async move {
                c.pre_vote(r).await
            })
            .await?)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let ttl = option.hard_ttl().max(Duration::from_secs(30));
        let send = self.call(ttl, &header, snapshot.snapshot, |mut c, r| async move {
            c.install_snapshot(r).await
        });
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = send => Ok(res?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self
            .call(option.hard_ttl(), &req, Vec::new(), |mut c, r| async move {
                c.transfer_leader(r).await
            })
            .await?)
    }
}

/// The server side of the Raft service: decodes a peer's message and hands it to openraft.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    cluster: ClusterIdCell,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// Serves `raft`, refusing messages stamped with another cluster's id.
    pub fn new(raft: Raft, cluster: ClusterIdCell) -> Self {
        Self { raft, cluster }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        req: &Request<RaftMessage>,
    ) -> Result<T, Status> {
        self.cluster.check(req)?;
        serde_json::from_slice(&req.get_ref().json)
            .map_err(|e| Status::invalid_argument(format!("undecodable Raft message: {e}")))
    }
}

fn reply<T: Serialize, E: std::fmt::Display>(
    res: Result<T, E>,
) -> Result<Response<RaftMessage>, Status> {
    let value = res.map_err(|e| Status::unavailable(format!("raft is not serving: {e}")))?;
    let json = serde_json::to_vec(&value)
        .map_err(|e| Status::internal(format!("encoding the reply: {e}")))?;
    Ok(Response::new(RaftMessage {
        json,
        data: Vec::new(),
    }))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    type StreamAppendStream = BoxStream<'static, Result<RaftMessage, Status>>;

    async fn stream_append(
        &self,
        req: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        use tokio_stream::StreamExt;
        self.cluster.check(&req)?;
        // An undecodable request ends the input: the responses already owed are still sent,
        // then the stream closes and the leader reconnects.
        let input = req.into_inner().map_while(|item| {
            let msg = item.ok()?;
            match serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(&msg.json) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable append in a replication stream");
                    None
                }
            }
        });
        let output = self.raft.stream_append(input).map(|res| {
            let value =
                res.map_err(|e| Status::unavailable(format!("raft is not serving: {e}")))?;
            let json = serde_json::to_vec(&value)
                .map_err(|e| Status::internal(format!("encoding the reply: {e}")))?;
            Ok(RaftMessage {
                json,
                data: Vec::new(),
            })
        });
        Ok(Response::new(Box::pin(output)))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = self.decode(&req)?;
        reply(self.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = self.decode(&req)?;
        reply(self.raft.pre_vote(rpc).await)
    }

    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.decode(&req)?;
        reply(self.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let header: SnapshotHeader = self.decode(&req)?;
        // The snapshot must decode before openraft sees it: a bad one is the peer's fault.
        serde_json::from_slice::<crate::ClusterState>(&req.get_ref().data)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot: {e}")))?;
        let snapshot = SnapshotOf::<TypeConfig, Vec<u8>> {
            meta: header.meta,
            snapshot: req.into_inner().data,
        };
        reply(self.raft.install_full_snapshot(header.vote, snapshot).await)
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: TransferLeaderRequest<TypeConfig> = self.decode(&req)?;
        reply(self.raft.handle_transfer_leader(rpc).await)
    }
}
