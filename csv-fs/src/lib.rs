//! csv-fs: the shared-volume block layer of csvd.
//!
//! This crate will carve one shared device into virtual disks (on-device superblock, extent
//! maps allocated through the Raft metadata service), do direct I/O with io_uring and
//! `O_DIRECT`, and redirect I/O to a volume's coordinator node when a node has no path to the
//! device. It has no code yet; see `docs/architecture.md`.
#![forbid(unsafe_code)]
