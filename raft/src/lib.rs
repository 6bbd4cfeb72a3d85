//! Cluster metadata for csvd, replicated with Raft.
//!
//! Every csvd node holds a full copy of the cluster's metadata: the node table today, and
//! volumes, LUNs, reservations, VM definitions and migrations as later layers arrive. Changes
//! are typed [`command::Command`]s proposed to the Raft leader, committed to a majority of
//! voters and applied by the pure function [`state::ClusterState::apply`] on every node, which
//! validates each command and returns a typed [`state::ApplyError`] instead of panicking.
//!
//! # Layers
//!
//! ```text
//!  migrator CLI / node agents
//!        |  gRPC Cluster service (service.rs): init, join, leave, status, write
//!        v
//!  MetaNode (node.rs): forwards writes and linearizable reads to the leader,
//!        |             membership policy (learner -> voter, odd voter count, at most 5)
//!        v
//!  openraft core ----- gRPC Raft service (network.rs) ----- peers
//!        |
//!        +-- LogStore (store/log.rs, wal.rs): entries in segment files `raft-log.wal/`,
//!        |     vote and purge point in `raft-log.redb`; fdatasync before ack
//!        +-- StateMachine (store/sm.rs): in-memory ClusterState, snapshots in `raft-sm.redb`
//! ```
//!
//! Data never passes through Raft; only layout, ownership and health do.

pub mod api;
pub mod command;
pub mod migration;
pub mod network;
pub mod node;
pub mod service;
pub mod state;
pub mod store;
pub mod vm;
pub mod volume;

/// The generated gRPC code for `proto/csvd.proto`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("csvd.v1");
}

pub use command::{Command, Request, Response};
pub use node::{MetaNode, MetaOptions};
pub use state::{ApplyError, ClusterState, NodeRecord};

/// Identifier of a node in the cluster; chosen by the operator, never 0.
pub type NodeId = u64;

/// The version of the node-to-node protocol (Raft messages, command set, cluster API) this
/// build speaks. A node is admitted only if the cluster can speak its version.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol version this build still understands.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The csvd software version recorded in the node table.
pub const CSVD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// gRPC metadata header carrying the cluster id the caller expects to talk to.
pub const CLUSTER_ID_HEADER: &str = "x-csvd-cluster-id";

openraft::declare_raft_types!(
    /// The openraft type configuration of the csvd metadata service.
    pub TypeConfig:
        D = command::Request,
        R = command::Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

/// The Raft handle of a metadata node.
pub type Raft = openraft::Raft<TypeConfig, store::StateMachine>;
