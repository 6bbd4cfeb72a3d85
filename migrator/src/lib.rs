//! Live-migration orchestration for csvd and the `migrator` operator CLI.
//!
//! Today the CLI covers cluster membership and status; VM migration arrives with the
//! hypervisor layer.

pub mod cli;
pub mod volumes;
