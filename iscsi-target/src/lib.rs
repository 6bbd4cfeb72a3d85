//! iscsi-target: the iSCSI target csvd runs on every node.
//!
//! The crate is a sans-IO core with a thin tokio driver around it:
//!
//! - [`pdu`]: the RFC 7143 PDU codec (basic header segment, AHS, padded data segment, CRC32C
//!   header and data digests) and typed views of every PDU a target sends or receives.
//! - [`text`]: `key=value` text with continuation, as carried by Login and Text PDUs.
//! - [`login`]: the login state machine: security negotiation (CHAP with MD5, one-way and
//!   mutual) and operational negotiation of every RFC 7143 key.
//! - [`scsi`]: the SCSI command set (SPC-4, SBC-3) served from a [`backend::Backend`]:
//!   inquiry and VPD pages, reads and writes, UNMAP, WRITE SAME, COMPARE AND WRITE, mode pages,
//!   ALUA and persistent reservations.
//! - [`session`]: the full feature phase of one connection: command numbering window, R2T and
//!   Data-Out collection, Data-In, task management, NOP pings, logout.
//! - [`server`]: the tokio driver: a portal listener, one task pair per connection, and the
//!   session table (reinstatement by ISID).
//!
//! The crate does not know about csv-fs or Raft: it serves whatever implements
//! [`backend::Backend`], and the `csvd` daemon wires that to the cluster.
#![forbid(unsafe_code)]

pub mod backend;
pub mod login;
pub mod mem;
pub mod pdu;
pub mod scsi;
pub mod server;
pub mod session;
pub mod text;
