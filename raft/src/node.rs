//! A metadata node: one openraft instance with its stores, the leader-side membership policy,
//! write forwarding, linearizable reads and the background agents (heartbeat, voter
//! reconciliation, size-based snapshots).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ReadPolicy;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use tokio::sync::watch;
use tonic::Status;
use uuid::Uuid;

use crate::api::{ClusterClient, ClusterStatus, MemberStatus, Role};
use crate::command::{Command, Outcome, Request};
use crate::migration::{MigrationId, MigrationRecord};
use crate::network::{ClusterIdCell, GrpcNetwork, RaftService};
use crate::state::{ApplyError, NodeAdminState, NodeSpec, validate_spec};
use crate::store::{LogStore, StateMachine, StateView};
use crate::{NodeId, Raft};

/// A node whose last heartbeat is older than this is shown as `down`.
pub const DOWN_AFTER: Duration = Duration::from_secs(10);

/// How often each node commits a heartbeat and the leader reconciles voters.
pub const AGENT_INTERVAL: Duration = Duration::from_secs(2);

/// The largest number of voters the cluster keeps; further nodes are learners.
pub const MAX_VOTERS: usize = 5;

/// How long a write waits for a leader before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// How long a migration watch may go without a change before its node checks that it still
/// reaches the leader.
pub const WATCH_CHECK: Duration = Duration::from_secs(5);

/// Name of the marker a node leaves in its data directory after it was removed.
pub const LEFT_MARKER: &str = "LEFT";

/// Settings of a metadata node.
#[derive(Debug, Clone)]
pub struct MetaOptions {
    /// What this node reports about itself; `spec.id` is the Raft node id.
    pub spec: NodeSpec,
    /// Directory holding `raft-log.redb` and `raft-sm.redb`.
    pub data_dir: PathBuf,
    /// Build a snapshot (and purge the log) after this many entries.
    pub snapshot_every_entries: u64,
    /// Or once the unpurged log holds more than this many bytes.
    pub snapshot_every_bytes: u64,
    /// Raft heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    pub election_timeout_ms: u64,
}

impl MetaOptions {
    /// Default tuning for a node described by `spec` storing its data in `data_dir`.
    pub fn new(spec: NodeSpec, data_dir: PathBuf) -> Self {
        Self {
            spec,
            data_dir,
            snapshot_every_entries: 5_000,
            snapshot_every_bytes: 64 << 20,
            heartbeat_ms: 150,
            election_timeout_ms: 1_000,
        }
    }
}

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The state machine rejected the command.
    #[error("{0}")]
    Rejected(#[from] ApplyError),
    /// No leader could be found in time (no quorum, or an election that does not finish).
    #[error("no leader: the cluster has no quorum reachable from node {0}")]
    NoLeader(NodeId),
    /// This node was never initialized and joined no cluster.
    #[error(
        "node {0} is not part of a cluster yet: run `migrator cluster init` on one node or start it with --join"
    )]
    NotInitialized(NodeId),
    /// `init` on a node that already belongs to a cluster.
    #[error("node {id} already belongs to cluster {cluster}")]
    AlreadyInitialized {
        /// This node.
        id: NodeId,
        /// Its cluster (may be unknown if the init did not finish).
        cluster: String,
    },
    /// The caller expected another cluster.
    #[error("wrong cluster: this cluster is {ours}, the request expected {theirs}")]
    WrongCluster {
        /// This cluster.
        ours: String,
        /// What the caller expected.
        theirs: String,
    },
    /// A membership change could not be made.
    #[error("membership change failed: {0}")]
    Membership(String),
    /// Another membership change is still in progress; try again shortly.
    #[error("another membership change is in progress; try again")]
    Busy,
    /// The leader answered a forwarded request with an error.
    #[error("{}", .0.message())]
    Remote(Status),
    /// Opening or using local storage failed.
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    /// The Raft core stopped.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

impl NodeError {
    /// Whether the same request may succeed a moment later (leader change, membership change
    /// in progress).
    pub fn is_transient(&self) -> bool {
        match self {
            NodeError::NoLeader(_) | NodeError::Busy => true,
            NodeError::Remote(s) => s.code() == tonic::Code::Unavailable,
            _ => false,
        }
    }
}

/// Runs `op` again while it fails with a transient error, for up to [`LEADER_WAIT`].
async fn retry_transient<T, F, Fut>(mut op: F) -> Result<T, NodeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, NodeError>>,
{
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        match op().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "transient failure; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let msg = e.to_string();
        match e {
            NodeError::Remote(s) => s,
            NodeError::Rejected(a) => match a {
                ApplyError::UnknownNode { .. }
                | ApplyError::UnknownVolume { .. }
                | ApplyError::UnknownDisk { .. }
                | ApplyError::UnknownVm { .. } => Status::not_found(msg),
                ApplyError::DuplicateName { .. } => Status::already_exists(msg),
                ApplyError::VolumeFull { .. } => Status::resource_exhausted(msg),
                ApplyError::DuplicateNodeId { .. }
                | ApplyError::DuplicateAddress { .. }
                | ApplyError::AlreadyInitialized { .. } => Status::already_exists(msg),
                ApplyError::InvalidArgument { .. } => Status::invalid_argument(msg),
                ApplyError::UnsupportedCommandVersion { .. }
                | ApplyError::NotInitialized
                | ApplyError::IncompatibleProtocol { .. }
                | ApplyError::PreconditionFailed { .. } => Status::failed_precondition(msg),
            },
            NodeError::NoLeader(_) | NodeError::NotInitialized(_) | NodeError::Busy => {
                Status::unavailable(msg)
            }
            NodeError::WrongCluster { .. } => Status::failed_precondition(msg),
            NodeError::AlreadyInitialized { .. } => Status::already_exists(msg),
            NodeError::Membership(_) => Status::failed_precondition(msg),
            NodeError::Storage(_) | NodeError::Fatal(_) => Status::internal(msg),
        }
    }
}

/// Milliseconds since the Unix epoch by this node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How many voters a cluster of `members` nodes should have: as many as possible up to
/// [`MAX_VOTERS`], and an odd number, because an even count tolerates no more failures than
/// the odd count below it while needing a larger quorum.
pub fn desired_voters(members: usize) -> usize {
    let n = members.min(MAX_VOTERS);
    if n == 0 {
        0
    } else if n.is_multiple_of(2) {
        n - 1
    } else {
        n
    }
}

/// A change of voters that brings the count to [`desired_voters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VoterPlan {
    /// Learners to make voters.
    pub promote: BTreeSet<NodeId>,
    /// Voters to make learners.
    pub demote: BTreeSet<NodeId>,
}

/// Plans the voter set: promotes learners that `ready` accepts (caught up and alive), lowest
/// id first, while there are fewer voters than [`desired_voters`]; when there are more (an even
/// count after a voter left and no learner can replace it), demotes the voters that `ready`
/// rejects first, then the highest ids, never `leader`. Empty when nothing should change.
pub fn plan_voters(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    leader: NodeId,
    ready: impl Fn(NodeId) -> bool,
) -> VoterPlan {
    let ready_learners: Vec<NodeId> = learners.iter().copied().filter(|id| ready(*id)).collect();
    let target = desired_voters(voters.len() + ready_learners.len()).max(1);
    let mut plan = VoterPlan::default();
    if target > voters.len() {
        plan.promote = ready_learners
            .into_iter()
            .take(target - voters.len())
            .collect();
    } else if target < voters.len() {
        let mut candidates: Vec<NodeId> = voters.iter().copied().filter(|v| *v != leader).collect();
        // Unready voters first, then the highest ids.
        candidates.sort_by_key(|v| (ready(*v), std::cmp::Reverse(*v)));
        plan.demote = candidates.into_iter().take(voters.len() - target).collect();
    }
    plan
}

/// Classifies a failed membership change.
fn membership_error(
    id: NodeId,
    e: RaftError<crate::TypeConfig, ClientWriteError<crate::TypeConfig>>,
) -> NodeError {
    use openraft::error::ChangeMembershipError;
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        )) => NodeError::Busy,
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => NodeError::NoLeader(id),
        RaftError::APIError(e) => NodeError::Membership(e.to_string()),
        RaftError::Fatal(e) => NodeError::Fatal(e.to_string()),
    }
}

/// One metadata node. Cheap to clone.
#[derive(Clone)]
pub struct MetaNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    spec: NodeSpec,
    data_dir: PathBuf,
    raft: Raft,
    sm: StateMachine,
    log: LogStore,
    cluster: ClusterIdCell,
    snapshot_every_bytes: u64,
    /// Set once this node saw itself removed from the cluster.
    removed: watch::Sender<bool>,
    /// Serializes this leader's membership changes (joins, leaves, promotions).
    membership_lock: tokio::sync::Mutex<()>,
    /// Clients of leaders that requests were forwarded to, by (address, cluster id).
    forward: std::sync::Mutex<std::collections::HashMap<(String, Option<String>), ClusterClient>>,
}

impl std::fmt::Debug for MetaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaNode")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl MetaNode {
    /// Opens the node's stores in `opts.data_dir` and starts its Raft core.
    pub async fn open(opts: MetaOptions) -> Result<Self, NodeError> {
        let id = opts.spec.id;
        std::fs::create_dir_all(&opts.data_dir)?;
        let log = LogStore::open(&opts.data_dir.join("raft-log.redb"))?;
        let sm = StateMachine::open(&opts.data_dir.join("raft-sm.redb"))?;
        let cluster = ClusterIdCell::default();
        if let Some(c) = sm.view().state.cluster_id {
            cluster.set(c.to_string());
        }
        let config = Config {
            cluster_name: "csvd".into(),
            heartbeat_interval: opts.heartbeat_ms,
            election_timeout_min: opts.election_timeout_ms,
            election_timeout_max: opts.election_timeout_ms * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every_entries),
            max_in_snapshot_log_to_keep: 100,
            install_snapshot_timeout: 10_000,
            // A node that was cut off or frozen (its election timer ran out meanwhile) asks
            // first whether it could win, so that it does not depose a leader the rest of
            // the cluster still follows. Without it, such a node raised the term and forced
            // an election on rejoining, and for that moment the cluster had no leader.
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| NodeError::Fatal(e.to_string()))?,
        );
        let raft = Raft::new(
            id,
            config,
            GrpcNetwork::new(cluster.clone()),
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Fatal(e.to_string()))?;
        // The cluster id becomes known when InitCluster is applied (here or by replication);
        // from then on every RPC is stamped with and checked against it.
        let mut changes = sm.subscribe();
        let cell = cluster.clone();
        tokio::spawn(async move {
            loop {
                if let Some(c) = changes.borrow_and_update().state.cluster_id {
                    cell.set(c.to_string());
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        let (removed, _) = watch::channel(false);
        let node = MetaNode {
            inner: Arc::new(Inner {
                id,
                spec: opts.spec,
                data_dir: opts.data_dir,
                raft,
                sm,
                log,
                cluster,
                snapshot_every_bytes: opts.snapshot_every_bytes,
                removed,
                membership_lock: tokio::sync::Mutex::new(()),
                forward: Default::default(),
            }),
        };
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The openraft handle (for metrics and tests).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The cluster id cell shared with the transport.
    pub fn cluster_cell(&self) -> &ClusterIdCell {
        &self.inner.cluster
    }

    /// The gRPC Raft service for peers.
    pub fn raft_service(&self) -> RaftService {
        RaftService::new(self.inner.raft.clone(), self.inner.cluster.clone())
    }

    /// The locally applied state (may lag the leader; see [`MetaNode::read_state`]).
    pub fn local_view(&self) -> Arc<StateView> {
        self.inner.sm.view()
    }

    /// Subscribes to locally applied changes, for node agents that react to committed state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<StateView>> {
        self.inner.sm.subscribe()
    }

    /// Becomes true once this node has been removed from the cluster.
    pub fn removed(&self) -> watch::Receiver<bool> {
        self.inner.removed.subscribe()
    }

    /// Whether this node has a Raft membership (bootstrapped or joined).
    pub async fn is_initialized(&self) -> Result<bool, NodeError> {
        self.inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Fatal(e.to_string()))
    }

    /// The current leader according to this node.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow_watched().current_leader
    }

    fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let m = self
            .inner
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        m.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    fn forward_client(&self, leader: NodeId) -> Result<ClusterClient, NodeError> {
        let addr = self
            .leader_addr(leader)
            .ok_or(NodeError::NoLeader(self.inner.id))?;
        let cluster = self.inner.cluster.get();
        let key = (addr, cluster);
        let mut cache = self.inner.forward.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        // One HTTP/2 connection per leader, reused by every forwarded call: a connection per
        // call would add a TCP and HTTP/2 handshake to each forwarded write.
        let client = ClusterClient::new(&key.0, key.1.clone())
            .map(|c| c.with_timeout(LEADER_WAIT + Duration::from_secs(5)))
            .map_err(|e| NodeError::Fatal(e.to_string()))?;
        cache.insert(key, client.clone());
        Ok(client)
    }

    /// Waits until some node is leader; returns it.
    async fn await_leader(&self) -> Result<NodeId, NodeError> {
        let mut rx = self.inner.raft.metrics();
        let wait = async {
            loop {
                if let Some(l) = rx.borrow_and_update().current_leader {
                    return Ok(l);
                }
                if rx.changed().await.is_err() {
                    return Err(NodeError::Fatal("raft stopped".into()));
                }
            }
        };
        tokio::time::timeout(LEADER_WAIT, wait)
            .await
            .map_err(|_| NodeError::NoLeader(self.inner.id))?
    }

    /// Bootstraps a single-node cluster on this node and names it. Returns the cluster id.
    pub async fn init(&self) -> Result<Uuid, NodeError> {
        if self.is_initialized().await? {
            let view = self.inner.sm.view();
            let voters: Vec<NodeId> = view.membership.membership().voter_ids().collect();
            // An init that crashed after bootstrapping but before naming the cluster is
            // finished now; anything else is a real second init.
            let unnamed_bootstrap = view.state.cluster_id.is_none() && voters == [self.inner.id];
            if !unnamed_bootstrap {
                return Err(NodeError::AlreadyInitialized {
                    id: self.inner.id,
                    cluster: view
                        .state
                        .cluster_id
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "(not yet named)".into()),
                });
            }
            tracing::info!("finishing an interrupted cluster init");
        } else {
            let members =
                BTreeMap::from([(self.inner.id, BasicNode::new(&self.inner.spec.grpc_addr))]);
            self.inner
                .raft
                .initialize(members)
                .await
                .map_err(|e| NodeError::Fatal(e.to_string()))?;
        }
        let cluster_id = Uuid::new_v4();
        self.write(Command::InitCluster { cluster_id }).await?;
        self.write(Command::RegisterNode {
            spec: self.inner.spec.clone(),
            now_ms: now_ms(),
        })
        .await?;
        tracing::info!(%cluster_id, "initialized a new cluster");
        Ok(cluster_id)
    }

    /// Proposes a command: on the leader directly, otherwise forwarded to the leader.
    /// Returns the outcome and the log index it was committed at.
    pub async fn write(&self, cmd: Command) -> Result<(Outcome, u64), NodeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match self
                .inner
                .raft
                .client_write(Request::new(cmd.clone()))
                .await
            {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    return Ok((resp.data?, index));
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(leader) = f.leader_id
                        && leader != self.inner.id
                    {
                        let mut client = self.forward_client(leader)?;
                        match client.write(cmd.clone()).await {
                            Ok(r) => return Ok(r),
                            Err(crate::api::ClientError::Rejected(e)) => {
                                return Err(NodeError::Rejected(e));
                            }
                            Err(e)
                                if e.is_unavailable() && tokio::time::Instant::now() < deadline => {
                            }
                            Err(crate::api::ClientError::Refused { code, message }) => {
                                return Err(NodeError::Remote(Status::new(code, message)));
                            }
                            Err(e) => {
                                return Err(NodeError::Remote(Status::unavailable(e.to_string())));
                            }
                        }
                    }
                }
                Err(RaftError::APIError(e)) => return Err(NodeError::Membership(e.to_string())),
                Err(RaftError::Fatal(e)) => return Err(NodeError::Fatal(e.to_string())),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeError::NoLeader(self.inner.id));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The state as of a point no earlier than any write acknowledged before this call
    /// (read-index on the leader). Only valid on the leader; see [`MetaNode::status`].
    async fn leader_read(&self) -> Result<Arc<StateView>, NodeError> {
        let read = self
            .inner
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| NodeError::Remote(Status::unavailable(e.to_string())))?;
        // ensure_linearizable returns once the state machine has applied the read index.
        let view = self.inner.sm.view();
        debug_assert!(view.applied_index() >= read.index());
        Ok(view)
    }

    /// The cluster status, read linearizably: on the leader, or forwarded to it.
    pub async fn status(&self) -> Result<ClusterStatus, NodeError> {
        if !self.is_initialized().await? {
            return Ok(self.build_status(&self.inner.sm.view()));
        }
        let leader = self.await_leader().await?;
        if leader == self.inner.id {
            let view = self.leader_read().await?;
            return Ok(self.build_status(&view));
        }
        let mut client = self.forward_client(leader)?;
        match client.status().await {
            Ok(s) => Ok(s),
            Err(e) => Err(NodeError::Remote(Status::unavailable(e.to_string()))),
        }
    }

    /// The whole replicated state, read linearizably: on the leader, or forwarded to it.
    pub async fn read_state(&self) -> Result<crate::ClusterState, NodeError> {
        if !self.is_initialized().await? {
            return Err(NodeError::NotInitialized(self.inner.id));
        }
        let leader = self.await_leader().await?;
        if leader == self.inner.id {
            return Ok(self.leader_read().await?.state.clone());
        }
        let mut client = self.forward_client(leader)?;
        client.state().await.map_err(|e| match e {
            crate::api::ClientError::Refused { code, message } => {
                NodeError::Remote(Status::new(code, message))
            }
            other => NodeError::Remote(Status::unavailable(other.to_string())),
        })
    }

    /// Follows migration `id` into `tx`: its record once this node has applied every entry
    /// committed when the call came (so the first one is as new as any acknowledged write),
    /// then each changed record as this node applies it, ending after the one in a final
    /// phase. A record that does not exist by then is a `NOT_FOUND` error.
    /// While nothing changes the node checks every [`WATCH_CHECK`] that it still reaches the
    /// leader, so a node cut off from the cluster ends the watch with an error instead of
    /// going silent. Returns when the receiver is dropped.
    pub async fn watch_migration(
        &self,
        id: MigrationId,
        tx: tokio::sync::mpsc::Sender<Result<MigrationRecord, NodeError>>,
    ) {
        let mut changes = self.subscribe();
        let result = async {
            let barrier = self.status().await?.committed_index;
            let mut last: Option<MigrationRecord> = None;
            loop {
                let view = changes.borrow_and_update().clone();
                if view.applied_index() >= barrier {
                    let Some(m) = view.state.migrations.get(&id) else {
                        return Err(NodeError::Remote(Status::not_found(format!(
                            "no migration {id}"
                        ))));
                    };
                    if last.as_ref() != Some(m) {
                        if tx.send(Ok(m.clone())).await.is_err() {
                            return Ok(());
                        }
                        if m.phase.is_terminal() {
                            return Ok(());
                        }
                        last = Some(m.clone());
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    changed = tokio::time::timeout(WATCH_CHECK, changes.changed()) => match changed {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(NodeError::Fatal("the state machine stopped".into())),
                        // Quiet for a while: make sure this node still hears the leader.
                        Err(_) => {
                            self.status().await?;
                        }
                    },
                }
            }
        }
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    }

    /// The status from this node's own applied state (possibly stale).
    pub fn local_status(&self) -> ClusterStatus {
        self.build_status(&self.inner.sm.view())
    }

    fn build_status(&self, view: &StateView) -> ClusterStatus {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let membership = view.membership.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let now = now_ms();
        let mut members = Vec::new();
        for (id, node) in membership.nodes() {
            let role = if voters.contains(id) {
                Role::Voter
            } else {
                Role::Learner
            };
            let rec = view.state.nodes.get(id);
            let age = rec
                .and_then(|r| r.last_heartbeat_ms)
                .map(|t| now.saturating_sub(t));
            let state = match rec {
                None => "joining",
                Some(r) if r.admin_state == NodeAdminState::Draining => "draining",
                Some(_) if view.state.node_up(*id, now) => "up",
                Some(_) => "down",
            };
            let spec = rec
                .map(|r| NodeSpec::clone(&r.spec))
                .unwrap_or_else(|| NodeSpec {
                    id: *id,
                    grpc_addr: node.addr.clone(),
                    ..Default::default()
                });
            members.push(MemberStatus {
                id: *id,
                role,
                grpc_addr: spec.grpc_addr,
                iscsi_addr: spec.iscsi_addr,
                migration_addr: spec.migration_addr,
                state: state.into(),
                version: spec.version,
                protocol_version: spec.protocol_version,
                cpu_model: spec.cpu_model,
                switches: spec.switches,
                memory_bytes: spec.memory_bytes,
                last_heartbeat_age_ms: age,
            });
        }
        ClusterStatus {
            cluster_id: view.state.cluster_id.map(|c| c.to_string()),
            leader: metrics.current_leader,
            term: metrics.current_term,
            committed_index: metrics.local_committed.map(|l| l.index).unwrap_or(0),
            applied_index: view.applied_index(),
            served_by: self.inner.id,
            members,
        }
    }

    /// Admits a node: registers it, adds it as a learner, waits until it has caught up and
    /// promotes learners while the cluster has fewer than [`MAX_VOTERS`] voters (keeping the
    /// count odd). Forwarded to the leader when called elsewhere. Returns cluster id and role.
    pub async fn join(
        &self,
        spec: NodeSpec,
        expected_cluster: Option<String>,
    ) -> Result<(String, Role), NodeError> {
        retry_transient(|| self.join_once(spec.clone(), expected_cluster.clone())).await
    }

    async fn join_once(
        &self,
        spec: NodeSpec,
        expected_cluster: Option<String>,
    ) -> Result<(String, Role), NodeError> {
        let view = self.inner.sm.view();
        let Some(cluster_id) = view.state.cluster_id.map(|c| c.to_string()) else {
            return Err(NodeError::NotInitialized(self.inner.id));
        };
        if let Some(theirs) = expected_cluster.filter(|c| !c.is_empty())
            && theirs != cluster_id
        {
            return Err(NodeError::WrongCluster {
                ours: cluster_id,
                theirs,
            });
        }
        validate_spec(&spec)?;
        let leader = self.await_leader().await?;
        if leader != self.inner.id {
            let mut client = self.forward_client(leader)?;
            let (cid, role) = client
                .join(&spec, Some(&cluster_id))
                .await
                .map_err(|e| match e {
                    crate::api::ClientError::Refused { code, message } => {
                        NodeError::Remote(Status::new(code, message))
                    }
                    other => NodeError::Remote(Status::unavailable(other.to_string())),
                })?;
            let role = if role == "voter" {
                Role::Voter
            } else {
                Role::Learner
            };
            return Ok((cid, role));
        }
        let _guard = self.inner.membership_lock.lock().await;
        self.write(Command::RegisterNode {
            spec: spec.clone(),
            now_ms: now_ms(),
        })
        .await?;
        self.inner
            .raft
            .add_learner(spec.id, BasicNode::new(&spec.grpc_addr), true)
            .await
            .map_err(|e| membership_error(self.inner.id, e))?;
        self.reconcile_locked().await?;
        let role = if self.inner.raft.voter_ids().any(|v| v == spec.id) {
            Role::Voter
        } else {
            Role::Learner
        };
        tracing::info!(node = spec.id, %role, "node joined");
        Ok((cluster_id, role))
    }

    /// Promotes caught-up learners while there are fewer voters than [`desired_voters`].
    /// A no-op on followers.
    pub async fn reconcile_voters(&self) -> Result<(), NodeError> {
        let _guard = self.inner.membership_lock.lock().await;
        self.reconcile_locked().await
    }

    async fn reconcile_locked(&self) -> Result<(), NodeError> {
        if !self.inner.raft.is_leader() {
            return Ok(());
        }
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return Ok(()); // a change is in progress
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let last = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.clone().unwrap_or_default();
        let view = self.inner.sm.view();
        let now = now_ms();
        let me = self.inner.id;
        // Ready: replicated to within 100 entries of the leader and heard from recently.
        let ready = |id: NodeId| {
            let caught_up = id == me
                || replication
                    .get(&id)
                    .and_then(|m| m.as_ref())
                    .is_some_and(|m| m.index + 100 >= last);
            let alive = id == me || view.state.node_up(id, now);
            caught_up && alive
        };
        let plan = plan_voters(&voters, &learners, me, ready);
        if !plan.promote.is_empty() {
            tracing::info!(promote = ?plan.promote, "promoting learners to voters");
            self.inner
                .raft
                .change_membership(ChangeMembers::AddVoterIds(plan.promote), true)
                .await
                .map_err(|e| membership_error(me, e))?;
        } else if !plan.demote.is_empty() {
            tracing::info!(demote = ?plan.demote, "demoting voters to learners to keep an odd voter count");
            self.inner
                .raft
                .change_membership(ChangeMembers::RemoveVoters(plan.demote), true)
                .await
                .map_err(|e| membership_error(me, e))?;
        }
        Ok(())
    }

    /// Removes node `id` (this node when `None`) from the cluster. When the node to remove is
    /// the leader, leadership moves to another voter first.
    pub async fn leave(&self, id: Option<NodeId>) -> Result<(), NodeError> {
        let id = id.unwrap_or(self.inner.id);
        retry_transient(|| self.leave_once(id)).await
    }

    async fn leave_once(&self, id: NodeId) -> Result<(), NodeError> {
        if !self.is_initialized().await? {
            return Err(NodeError::NotInitialized(self.inner.id));
        }
        let leader = self.await_leader().await?;
        if leader == id && leader == self.inner.id {
            self.transfer_leadership().await?;
        }
        let leader = self.await_leader().await?;
        if leader != self.inner.id {
            let mut client = self.forward_client(leader)?;
            return client.leave(id).await.map_err(|e| match e {
                crate::api::ClientError::Refused { code, message } => {
                    NodeError::Remote(Status::new(code, message))
                }
                other => NodeError::Remote(Status::unavailable(other.to_string())),
            });
        }
        let _guard = self.inner.membership_lock.lock().await;
        let membership = self
            .inner
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let is_member = membership.get_node(&id).is_some();
        let in_table = self.inner.sm.view().state.nodes.contains_key(&id);
        if !is_member && !in_table {
            return Err(ApplyError::UnknownNode { id }.into());
        }
        if voters.len() == 1 && voters.contains(&id) {
            return Err(NodeError::Membership(format!(
                "node {id} is the last voter; a cluster cannot remove its only voter"
            )));
        }
        if voters.contains(&id) {
            self.inner
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| membership_error(self.inner.id, e))?;
        } else if is_member {
            self.inner
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| membership_error(self.inner.id, e))?;
        }
        match self.write(Command::RemoveNode { id }).await {
            Ok(_) | Err(NodeError::Rejected(ApplyError::UnknownNode { .. })) => {}
            Err(e) => return Err(e),
        }
        self.reconcile_locked().await?;
        tracing::info!(node = id, "node removed from the cluster");
        Ok(())
    }

    /// Hands leadership to the most caught-up other voter and waits until it has it.
    /// A no-op when this node is not the leader or is the only voter.
    pub async fn transfer_leadership(&self) -> Result<(), NodeError> {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.inner.id) {
            return Ok(());
        }
        let replication = metrics.replication.clone().unwrap_or_default();
        let target = metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.inner.id)
            .max_by_key(|v| {
                replication
                    .get(v)
                    .cloned()
                    .flatten()
                    .map(|l| l.index)
                    .unwrap_or(0)
            });
        let Some(target) = target else {
            return Ok(());
        };
        tracing::info!(to = target, "transferring leadership");
        self.inner
            .raft
            .trigger()
            .transfer_leader(target)
            .await
            .map_err(|e| NodeError::Fatal(e.to_string()))?;
        let mut rx = self.inner.raft.metrics();
        let me = self.inner.id;
        let moved = async move {
            loop {
                if rx
                    .borrow_and_update()
                    .current_leader
                    .is_some_and(|l| l != me)
                {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), moved).await {
            Ok(true) => Ok(()),
            _ => Err(NodeError::NoLeader(self.inner.id)),
        }
    }

    /// Starts the background agents: heartbeats, node-spec refresh, voter reconciliation,
    /// size-based snapshots and removal detection. They stop when the node shuts down.
    pub fn spawn_agents(&self) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move { node.agent_loop().await })
    }

    async fn agent_loop(&self) {
        let mut tick = tokio::time::interval(AGENT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u64 = 0;
        loop {
            tick.tick().await;
            round += 1;
            if self
                .inner
                .raft
                .metrics()
                .borrow_watched()
                .running_state
                .is_err()
            {
                return;
            }
            let view = self.inner.sm.view();
            if let Some(c) = view.state.cluster_id {
                self.inner.cluster.set(c.to_string());
            }
            // A removed node stops hearing from the leader, so its own log may never show the
            // removal: every few rounds a follower asks the cluster whether it is still in it.
            if round.is_multiple_of(5)
                && !self.inner.raft.is_leader()
                && self.removed_per_cluster(&view).await
            {
                self.mark_removed();
                return;
            }
            if let Some(rec) = view.state.nodes.get(&self.inner.id) {
                if *rec.spec != self.inner.spec {
                    let cmd = Command::UpdateNode {
                        spec: self.inner.spec.clone(),
                    };
                    if let Err(e) = self.write(cmd).await {
                        tracing::warn!(error = %e, "could not update this node's record");
                    }
                }
                if let Err(e) = self
                    .write(Command::Heartbeat {
                        id: self.inner.id,
                        at_ms: now_ms(),
                    })
                    .await
                {
                    tracing::debug!(error = %e, "heartbeat not committed");
                }
            }
            if let Err(e) = self.reconcile_voters().await {
                tracing::warn!(error = %e, "voter reconciliation failed");
            }
            if self.inner.log.unpurged_bytes() > self.inner.snapshot_every_bytes {
                tracing::info!(
                    bytes = self.inner.log.unpurged_bytes(),
                    "log over its size limit: snapshotting"
                );
                let _ = self.inner.raft.trigger().snapshot().await;
            }
        }
    }

    /// Asks the other members for the cluster status; true if one of them answers that this
    /// node is neither in the membership nor in the node table.
    async fn removed_per_cluster(&self, view: &StateView) -> bool {
        let Some(cluster) = view.state.cluster_id.map(|c| c.to_string()) else {
            return false;
        };
        let peers: Vec<String> = view
            .membership
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.inner.id)
            .map(|(_, n)| n.addr.clone())
            .collect();
        for addr in peers {
            let Ok(client) = ClusterClient::new(&addr, Some(cluster.clone())) else {
                continue;
            };
            let mut client = client.with_timeout(Duration::from_secs(3));
            if let Ok(status) = client.status().await {
                return status.cluster_id.as_deref() == Some(cluster.as_str())
                    && status.leader.is_some()
                    && !status.members.iter().any(|m| m.id == self.inner.id);
            }
        }
        false
    }

    /// Records that this node left its cluster: a marker in the data dir (so a restart does
    /// not come back as a stale member) and a signal to the daemon to stop.
    pub fn mark_removed(&self) {
        tracing::warn!("this node is no longer a member of the cluster");
        let cluster = self.inner.cluster.get().unwrap_or_default();
        let write = |path: &std::path::Path| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(path)?;
            f.write_all(cluster.as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write(&self.inner.data_dir.join(LEFT_MARKER)) {
            tracing::error!(error = %e, "cannot write the left marker");
        }
        self.inner.removed.send_replace(true);
    }

    /// Leaves leadership to another voter (if leader), then stops the Raft core.
    pub async fn shutdown(&self) {
        if let Err(e) = self.transfer_leadership().await {
            tracing::warn!(error = %e, "leadership transfer before shutdown did not finish");
        }
        let _ = self.inner.raft.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_desired_voters_odd_and_capped() {
        let got: Vec<usize> = (0..9).map(desired_voters).collect();
        assert_eq!(got, vec![0, 1, 1, 3, 3, 5, 5, 5, 5]);
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn plan(
        voters: &[NodeId],
        learners: &[NodeId],
        ready: impl Fn(NodeId) -> bool,
    ) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let p = plan_voters(&set(voters), &set(learners), 1, ready);
        (p.promote, p.demote)
    }

    #[test]
    fn test_plan_voters_keeps_odd() {
        let none = BTreeSet::new();
        // 1 voter + 1 learner: stay at 1 voter (2 would be even).
        assert_eq!(plan(&[1], &[2], |_| true), (none.clone(), none.clone()));
        // 1 voter + 2 learners: promote both.
        assert_eq!(plan(&[1], &[2, 3], |_| true), (set(&[2, 3]), none.clone()));
        // 3 voters + 1 learner: stay.
        assert_eq!(
            plan(&[1, 2, 3], &[4], |_| true),
            (none.clone(), none.clone())
        );
        // 3 voters + 3 learners: promote two to reach 5.
        assert_eq!(
            plan(&[1, 2, 3], &[4, 5, 6], |_| true),
            (set(&[4, 5]), none.clone())
        );
        // 5 voters: never more.
        assert_eq!(
            plan(&[1, 2, 3, 4, 5], &[6, 7], |_| true),
            (none.clone(), none.clone())
        );
    }

    #[test]
    fn test_plan_voters_skips_lagging_learners() {
        let none = BTreeSet::new();
        // Learner 3 is not ready: 1 voter + 1 ready learner would be even, so nothing moves.
        assert_eq!(
            plan(&[1], &[2, 3], |id| id != 3),
            (none.clone(), none.clone())
        );
        // After a voter left: 2 voters + 1 ready learner -> 3.
        assert_eq!(plan(&[1, 2], &[4], |_| true), (set(&[4]), none));
    }

    #[test]
    fn test_plan_voters_demotes_to_odd_never_leader() {
        let none = BTreeSet::new();
        // 2 voters and nobody to promote: keep one, and it is the leader (1).
        assert_eq!(plan(&[1, 2], &[], |_| true), (none.clone(), set(&[2])));
        // 4 voters: demote the dead one first, not the highest id.
        assert_eq!(
            plan(&[1, 2, 3, 4], &[], |id| id != 2),
            (none.clone(), set(&[2]))
        );
        // A lone leader is never demoted.
        assert_eq!(plan(&[1], &[], |_| false), (none.clone(), none));
    }
}
