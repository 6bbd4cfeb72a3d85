//! Live-migration orchestration for csvd and the `migrator` operator CLI.
//!
//! The CLI covers cluster membership and status, volumes, LUNs, the iSCSI target and
//! virtual machines.

pub mod cli;
pub mod vms;
pub mod volumes;
