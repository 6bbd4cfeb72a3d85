//! A target serving one LUN from memory, for measuring the protocol path without storage:
//!
//!   cargo run --release -p csvd-iscsi-target --example mem_target -- 127.0.0.1:3260 256
//!
//! serves `iqn.2025-11.org.csvd:mem` LUN 1 of the given MiB with 512-byte blocks.
use std::sync::Arc;

use csvd_iscsi_target::mem::MemBackend;
use csvd_iscsi_target::server::{Config, Directory, Target};

struct Portal(String);

impl Directory for Portal {
    fn portals(&self, _target: &str) -> Vec<(String, u16)> {
        vec![(self.0.clone(), 1)]
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3260".into());
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let mem = Arc::new(MemBackend::new());
    mem.create_lun("iqn.2025-11.org.csvd:mem", 1, mib << 11, 512, false);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let target = Target::new(mem, Arc::new(Portal(addr)), Config::default());
    target.serve(listener).await;
    Ok(())
}
