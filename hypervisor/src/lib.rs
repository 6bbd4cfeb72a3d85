//! hypervisor: QEMU/KVM guests for csvd.
//!
//! - [`qmp`]: an async client for QEMU's machine protocol (commands with ids, events,
//!   timeouts, clean errors when QEMU goes away).
//! - [`accel`]: KVM or TCG, decided by booting a probe guest; the minimum QEMU version.
//! - [`cmdline`]: one guest instance's QEMU command line (iSCSI disks, QMP, console).
//! - [`process`]: an instance's life: start daemonized, adopt, shut down, kill.
//! - [`spawn`]: how QEMU is started (`posix_spawn`, a session of its own, niceness 0), and
//!   thread niceness.
#![deny(unsafe_code)]

pub mod accel;
pub mod cmdline;
pub mod process;
pub mod qmp;
pub mod spawn;
