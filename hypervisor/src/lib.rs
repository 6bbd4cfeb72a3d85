//! hypervisor: QEMU/KVM guests for csvd.
//!
//! This crate will hold VM definitions, QEMU command-line building, a QMP client, guest
//! lifecycle, the CPU-compatibility model and virtual switches. It has no code yet; see
//! `docs/architecture.md`.
#![forbid(unsafe_code)]
