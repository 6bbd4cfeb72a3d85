//! The cluster API as seen by clients: the status schema and a typed gRPC client.
//!
//! `migrator`, joining daemons and the integration tests all talk to a node through
//! [`ClusterClient`], so there is one place that turns gRPC statuses into readable errors.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::command::{Command, Outcome, Request as CommandRequest, Response};
use crate::migration::{MigrationId, MigrationRecord};
use crate::pb::cluster_client::ClusterClient as PbClusterClient;
use crate::pb::{self};
use crate::state::NodeSpec;
use crate::{CLUSTER_ID_HEADER, NodeId};

/// A member's role in the Raft membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Votes in elections and counts toward the commit quorum.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
        })
    }
}

/// A node as `cluster status` and `node list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id.
    pub id: NodeId,
    /// Raft role.
    pub role: Role,
    /// gRPC address.
    pub grpc_addr: String,
    /// iSCSI portal address.
    pub iscsi_addr: String,
    /// Live-migration address.
    pub migration_addr: String,
    /// `up`, `down` (no heartbeat for [`crate::node::DOWN_AFTER`]), `draining`, or `joining`
    /// (in the Raft membership but not yet in the node table).
    pub state: String,
    /// csvd version.
    pub version: String,
    /// Node-to-node protocol version.
    pub protocol_version: u32,
    /// Processor model.
    pub cpu_model: String,
    /// Virtual switches.
    pub switches: Vec<String>,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// Milliseconds since the node's last committed heartbeat, by the serving node's clock.
    pub last_heartbeat_age_ms: Option<u64>,
}

/// The answer to `cluster status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's identity, or `None` before `cluster init`.
    pub cluster_id: Option<String>,
    /// The current leader, or `None` while there is none.
    pub leader: Option<NodeId>,
    /// The current Raft term.
    pub term: u64,
    /// Index of the last committed log entry.
    pub committed_index: u64,
    /// Index of the last entry applied by the node that answered.
    pub applied_index: u64,
    /// The node that answered.
    pub served_by: NodeId,
    /// Every member, by id.
    pub members: Vec<MemberStatus>,
}

/// What a client call can fail with, worded for an operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint could not be reached at all.
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint tried.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The endpoint answered with an error.
    #[error("{message}")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// The node's explanation.
        message: String,
    },
    /// The endpoint answered but is not a csvd node.
    #[error("{endpoint} is not a csvd node ({reason})")]
    NotCsvd {
        /// The endpoint tried.
        endpoint: String,
        /// What it said.
        reason: String,
    },
    /// The state machine rejected the command.
    #[error("{0}")]
    Rejected(crate::ApplyError),
    /// The reply could not be decoded.
    #[error("undecodable reply from {endpoint}: {reason}")]
    BadReply {
        /// The endpoint.
        endpoint: String,
        /// The decoding error.
        reason: String,
    },
}

impl ClientError {
    /// Whether trying again later may succeed: the node was unreachable, or it answered that
    /// the cluster is not available yet (no leader, not initialized).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::Refused {
                    code: Code::Unavailable,
                    ..
                }
        )
    }
}

/// A typed client of one node's Cluster service.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    endpoint: String,
    inner: PbClusterClient<Channel>,
    volumes: crate::pb::volumes_client::VolumesClient<Channel>,
    guests: crate::pb::guests_client::GuestsClient<Channel>,
    cluster_id: Option<String>,
    timeout: Duration,
}

impl ClusterClient {
    /// A client for the node at `endpoint` (`http://host:port` or `host:port`). Connects on
    /// first use. With `cluster_id`, every call asserts that the node belongs to that cluster.
    pub fn new(endpoint: &str, cluster_id: Option<String>) -> Result<Self, ClientError> {
        let url = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let bad = |reason: String| ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            reason,
        };
        let ep = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| bad(format!("invalid endpoint: {e}")))?;
        if ep.uri().host().is_none() || ep.uri().port_u16().is_none() {
            return Err(bad(
                "the endpoint must name a host and a port, like http://127.0.0.1:7001".into(),
            ));
        }
        let channel = ep
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            endpoint: url,
            volumes: crate::pb::volumes_client::VolumesClient::new(channel.clone()),
            guests: crate::pb::guests_client::GuestsClient::new(channel.clone()),
            inner: PbClusterClient::new(channel).max_decoding_message_size(64 << 20),
            cluster_id,
            timeout: Duration::from_secs(30),
        })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sets the per-call deadline (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(self.timeout);
        if let Some(id) = &self.cluster_id
            && let Ok(v) = id.parse()
        {
            req.metadata_mut().insert(CLUSTER_ID_HEADER, v);
        }
        req
    }

    fn error(&self, status: Status) -> ClientError {
        classify_status(&self.endpoint, status)
    }

    /// Bootstraps a new cluster on this node; returns the new cluster id.
    pub async fn init(&mut self) -> Result<String, ClientError> {
        let req = self.request(pb::InitRequest {});
        let resp = self.inner.init(req).await.map_err(|s| self.error(s))?;
        Ok(resp.into_inner().cluster_id)
    }

    /// Asks the cluster to admit `node`; returns the cluster id and the role given.
    pub async fn join(
        &mut self,
        node: &NodeSpec,
        expected_cluster_id: Option<&str>,
    ) -> Result<(String, String), ClientError> {
        let req = self.request(pb::JoinRequest {
            node: Some(spec_to_pb(node)),
            expected_cluster_id: expected_cluster_id.unwrap_or_default().to_string(),
        });
        let resp = self
            .inner
            .join(req)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok((resp.cluster_id, resp.role))
    }

    /// Removes node `id` from the cluster (`0`: the node this client talks to).
    pub async fn leave(&mut self, id: NodeId) -> Result<(), ClientError> {
        let req = self.request(pb::LeaveRequest { node_id: id });
        self.inner.leave(req).await.map_err(|s| self.error(s))?;
        Ok(())
    }

    /// Reads the cluster status linearizably.
    pub async fn status(&mut self) -> Result<ClusterStatus, ClientError> {
        self.status_with(false).await
    }

    /// Creates a volume on `device`, a path on the endpoint node; returns its id.
    pub async fn create_volume(
        &mut self,
        device: &str,
        name: &str,
        force: bool,
    ) -> Result<String, ClientError> {
        let req = self.request(pb::CreateVolumeRequest {
            device: device.into(),
            name: name.into(),
            force,
        });
        let resp = self
            .volumes
            .create_volume(req)
            .await
            .map_err(|s| self.error(s))?;
        Ok(resp.into_inner().volume_id)
    }

    /// Opens the serial console of a VM this node runs: `input`'s first message names it.
    /// No deadline: a console stays open as long as both sides want.
    pub async fn console(
        &mut self,
        input: impl tokio_stream::Stream<Item = pb::ConsoleInput> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::ConsoleOutput>, ClientError> {
        let mut req = Request::new(input);
        if let Some(id) = &self.cluster_id
            && let Ok(v) = id.parse()
        {
            req.metadata_mut().insert(CLUSTER_ID_HEADER, v);
        }
        let resp = self.guests.console(req).await.map_err(|s| self.error(s))?;
        Ok(resp.into_inner())
    }

    /// Reads the whole replicated state linearizably.
    pub async fn state(&mut self) -> Result<crate::ClusterState, ClientError> {
        let req = self.request(pb::StateRequest {});
        let resp = self
            .inner
            .state(req)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        self.decode_reply(&resp.json)
    }

    /// Follows live migration `id`: the stream yields its record once the node is current,
    /// then each change, and ends after the record in a final phase. The call has no
    /// deadline (a migration takes as long as it takes); the node ends the stream with an
    /// error if it loses the cluster. A node without the call answers
    /// [`ClientError::Refused`] with `UNIMPLEMENTED`.
    pub async fn watch_migration(
        &mut self,
        id: MigrationId,
    ) -> Result<MigrationWatch, ClientError> {
        let mut req = self.request(pb::WatchMigrationRequest { id });
        req.metadata_mut().remove("grpc-timeout");
        let events = self
            .inner
            .watch_migration(req)
            .await
            .map_err(|s| match s.code() {
                // A csvd from before the watch: the caller may read the record instead.
                Code::Unimplemented => ClientError::Refused {
                    code: Code::Unimplemented,
                    message: s.message().to_string(),
                },
                _ => self.error(s),
            })?
            .into_inner();
        Ok(MigrationWatch {
            endpoint: self.endpoint.clone(),
            events,
        })
    }

    /// Reads the status from the node's own applied state, which may lag the leader.
    pub async fn local_status(&mut self) -> Result<ClusterStatus, ClientError> {
        self.status_with(true).await
    }

    async fn status_with(&mut self, local: bool) -> Result<ClusterStatus, ClientError> {
        let req = self.request(pb::StatusRequest { local });
        let resp = self
            .inner
            .status(req)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        self.decode_reply(&resp.json)
    }

    fn decode_reply<T: serde::de::DeserializeOwned>(&self, json: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(json).map_err(|e| ClientError::BadReply {
            endpoint: self.endpoint.clone(),
            reason: e.to_string(),
        })
    }

    /// Proposes a command; returns its outcome and log index, or the state machine's typed
    /// rejection as [`ClientError::Rejected`].
    pub async fn write(&mut self, cmd: Command) -> Result<(Outcome, u64), ClientError> {
        let json =
            serde_json::to_vec(&CommandRequest::new(cmd)).map_err(|e| ClientError::BadReply {
                endpoint: self.endpoint.clone(),
                reason: format!("encoding the command: {e}"),
            })?;
        let req = self.request(pb::WriteRequest { json });
        let resp = self
            .inner
            .write(req)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        let result: Response = self.decode_reply(&resp.json)?;
        result
            .map(|o| (o, resp.log_index))
            .map_err(ClientError::Rejected)
    }
}

/// Turns a gRPC status into an operator-readable error.
pub fn classify_status(endpoint: &str, status: Status) -> ClientError {
    match status.code() {
        Code::Unavailable
            if status.message().contains("tcp connect")
                || status.message().contains("transport") =>
        {
            ClientError::Unreachable {
                endpoint: endpoint.to_string(),
                reason: connect_reason(&status),
            }
        }
        Code::Unimplemented => ClientError::NotCsvd {
            endpoint: endpoint.to_string(),
            reason: "it does not serve the csvd cluster API".into(),
        },
        Code::DeadlineExceeded => ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: "no answer before the deadline".into(),
        },
        Code::Unknown | Code::Internal
            if status.message().contains("h2 protocol error")
                || status.message().contains("transport") =>
        {
            ClientError::NotCsvd {
                endpoint: endpoint.to_string(),
                reason: status.message().to_string(),
            }
        }
        _ => ClientError::Refused {
            code: status.code(),
            message: status.message().to_string(),
        },
    }
}

fn connect_reason(status: &Status) -> String {
    use std::error::Error as _;
    let mut source: Option<&dyn std::error::Error> = status.source();
    let mut last = status.message().to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// Converts a node description to its wire form.
pub fn spec_to_pb(s: &NodeSpec) -> pb::NodeSpec {
    pb::NodeSpec {
        id: s.id,
        grpc_addr: s.grpc_addr.clone(),
        iscsi_addr: s.iscsi_addr.clone(),
        migration_addr: s.migration_addr.clone(),
        io_addr: s.io_addr.clone(),
        cpu_model: s.cpu_model.clone(),
        cpu_flags: s.cpu_flags.clone(),
        switches: s.switches.clone(),
        memory_bytes: s.memory_bytes,
        version: s.version.clone(),
        protocol_version: s.protocol_version,
    }
}

/// Converts a node description from its wire form.
pub fn spec_from_pb(s: pb::NodeSpec) -> NodeSpec {
    NodeSpec {
        id: s.id,
        grpc_addr: s.grpc_addr,
        iscsi_addr: s.iscsi_addr,
        migration_addr: s.migration_addr,
        io_addr: s.io_addr,
        cpu_model: s.cpu_model,
        cpu_flags: s.cpu_flags,
        switches: s.switches,
        memory_bytes: s.memory_bytes,
        version: s.version,
        protocol_version: s.protocol_version,
    }
}

/// A live migration followed by [`ClusterClient::watch_migration`].
#[derive(Debug)]
pub struct MigrationWatch {
    endpoint: String,
    events: tonic::Streaming<pb::MigrationEvent>,
}

impl MigrationWatch {
    /// The next version of the record; `None` once the stream has ended (after a final
    /// phase, or if the node went away: then the last record seen was not final).
    pub async fn next(&mut self) -> Option<Result<MigrationRecord, ClientError>> {
        match self.events.message().await {
            Ok(Some(ev)) => {
                Some(
                    serde_json::from_slice(&ev.json).map_err(|e| ClientError::BadReply {
                        endpoint: self.endpoint.clone(),
                        reason: e.to_string(),
                    }),
                )
            }
            Ok(None) => None,
            Err(s) => Some(Err(match classify_status(&self.endpoint, s) {
                // The node has answered this call already: a body cut off mid-stream (h2
                // says "error reading a body") is a lost connection, not a stranger.
                ClientError::NotCsvd { reason, .. } => ClientError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    reason: format!("the connection broke: {reason}"),
                },
                other => other,
            })),
        }
    }
}
