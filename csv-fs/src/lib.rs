//! csv-fs: the shared-volume block layer of csvd.
//!
//! One shared device (a SAN LUN, or in tests a sparse file every node opens) becomes a
//! *volume*: it carries an on-device [`superblock`] naming the volume and the cluster that owns
//! it, and is found by that identity rather than by a path, so each node may see it under a
//! different device path. Virtual disks are carved from the volume in extents allocated through
//! the Raft metadata service, and nodes do their data I/O to the device directly (io_uring,
//! `O_DIRECT`) or redirect it to the volume's coordinator.
//!
//! The pieces:
//! - [`superblock`]: the on-device format (drawn in `docs/csv-fs-format.md`);
//! - [`scan`]: finding volumes by UUID on each node's own device paths;
//! - [`engine`]: the io_uring / `O_DIRECT` engine, and [`device`], the trait the layer above
//!   uses (with a fault-injecting wrapper for recovery tests);
//! - [`node`]: a node's extent maps, I/O modes, barriers, lease and the I/O path;
//! - [`wire`] and [`redirect`]: redirected I/O to the coordinator over TCP;
//! - [`serial`]: compare-and-write and sub-block writes, serialized at the coordinator under
//!   per-block range locks (`range_lock`).
#![deny(unsafe_code)]

pub mod device;
pub mod engine;
pub mod node;
mod range_lock;
pub mod redirect;
pub mod scan;
pub mod serial;
pub mod superblock;
pub mod wire;
