//! csv-fs: the shared-volume block layer of csvd.
//!
//! One shared device (a SAN LUN, or in tests a sparse file every node opens) becomes a
//! *volume*: it carries an on-device [`superblock`] naming the volume and the cluster that owns
//! it, and is found by that identity rather than by a path, so each node may see it under a
//! different device path. Virtual disks are carved from the volume in extents allocated through
//! the Raft metadata service, and nodes do their data I/O to the device directly (io_uring,
//! `O_DIRECT`) or redirect it to the volume's coordinator.
//!
//! Built so far: the on-device format ([`superblock`]) and the direct I/O [`engine`]. The layout is drawn in
//! `docs/csv-fs-format.md`.
#![deny(unsafe_code)]

pub mod engine;
pub mod superblock;
