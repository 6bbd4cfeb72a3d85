//! iscsi-target: the iSCSI target csvd runs on every node.
//!
//! This crate will hold a sans-IO iSCSI PDU codec, login and session state machines and the
//! SCSI command set, with a tokio driver that serves any block device, so every virtual disk
//! is a LUN with one cluster-wide identity on every node's portal. It has no code yet; see
//! `docs/architecture.md`.
#![forbid(unsafe_code)]
