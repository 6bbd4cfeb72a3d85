//! Live-migration orchestration for csvd and the `migrator` operator CLI.
//!
//! The CLI covers cluster membership and status, volumes, LUNs, the iSCSI target and
//! virtual machines and their live migration.

pub mod cli;
pub mod migrate;
pub mod vms;
pub mod volumes;
