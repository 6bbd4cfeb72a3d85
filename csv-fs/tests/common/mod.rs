//! The two-node rig the volume-layer tests share: two nodes share one device file, node 1
//! coordinates, and node 2 reaches it over a real TCP connection on loopback. Devices are
//! wrapped in the fault-injecting backend. Needs O_DIRECT on the temp directory's filesystem;
//! [`rig`] prints a skip line and returns `None` when it is missing.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use csvd_csv_fs::device::{Faults, FaultyDevice};
use csvd_csv_fs::engine::{AlignedBuf, DirectEngine};
use csvd_csv_fs::node::{CsvNode, Opener};
use csvd_raft::ClusterState;
use csvd_raft::command::{Command, Request};
use csvd_raft::state::NodeSpec;
use csvd_raft::volume::{ALLOCATION_UNIT, IoMode};
use uuid::Uuid;

pub type Dev = FaultyDevice<DirectEngine>;
pub const VOL: Uuid = Uuid::from_u128(0xc5f);
pub const DEVICE_BYTES: u64 = 64 << 20;

pub struct Rig {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub state: ClusterState,
    pub nodes: Vec<CsvNode<Dev>>,
    pub faults: Vec<Arc<Faults>>,
}

pub fn apply(state: &mut ClusterState, cmd: Command) -> u64 {
    match state.apply(&Request::new(cmd)).expect("command applies") {
        csvd_raft::command::Outcome::Created { id } => id,
        _ => 0,
    }
}

/// `len` bytes (any length) of the same pattern as [`pattern`].
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    pattern(seed, len.next_multiple_of(4096).max(4096))[..len].to_vec()
}

pub fn pattern(seed: u64, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len).unwrap();
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    b
}

/// Two nodes serving a volume on one sparse file, with block-I/O servers on loopback, and
/// two disks whose extents interleave (so disk 1 spans two extents).
pub async fn rig() -> Option<Rig> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(DEVICE_BYTES)
        .unwrap();
    if let Err(e) = DirectEngine::open(&path, 8) {
        eprintln!("skip: direct I/O is unavailable on this filesystem: {e}");
        return None;
    }
    let mut state = ClusterState::default();
    apply(
        &mut state,
        Command::InitCluster {
            cluster_id: Uuid::from_u128(1),
        },
    );
    let mut nodes = Vec::new();
    let mut faults = Vec::new();
    for id in 1..=2u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io_addr = listener.local_addr().unwrap().to_string();
        apply(
            &mut state,
            Command::RegisterNode {
                spec: NodeSpec {
                    id,
                    grpc_addr: format!("127.0.0.1:{}", 1000 + id),
                    io_addr,
                    protocol_version: csvd_raft::PROTOCOL_VERSION,
                    ..Default::default()
                },
                now_ms: 1,
            },
        );
        let f = Faults::new();
        let fc = f.clone();
        let opener: Opener<Dev> =
            Arc::new(move |p| Ok(FaultyDevice::new(DirectEngine::open(p, 64)?, fc.clone())));
        let node = CsvNode::with_io_wait(id, opener, Duration::from_secs(3));
        node.renew_lease(Instant::now() + Duration::from_secs(3600));
        tokio::spawn(csvd_csv_fs::redirect::serve(listener, node.clone()));
        nodes.push(node);
        faults.push(f);
    }
    apply(
        &mut state,
        Command::RegisterVolume {
            id: VOL,
            name: "vol".into(),
            device_bytes: DEVICE_BYTES,
            data_offset: ALLOCATION_UNIT,
            coordinator: 1,
            now_ms: 1,
        },
    );
    let disk = |name: &str| Command::CreateDisk {
        name: name.into(),
        volume: VOL,
        size_bytes: ALLOCATION_UNIT,
        block_size: None,
    };
    assert_eq!(apply(&mut state, disk("a")), 1);
    assert_eq!(apply(&mut state, disk("b")), 2);
    apply(
        &mut state,
        Command::ResizeDisk {
            id: 1,
            size_bytes: 3 * ALLOCATION_UNIT,
        },
    );
    let mut rig = Rig {
        _dir: dir,
        path,
        state,
        nodes,
        faults,
    };
    rig.sync().await;
    for n in &rig.nodes {
        n.attach(VOL, &rig.path).await.unwrap();
    }
    Some(rig)
}

impl Rig {
    pub async fn sync(&mut self) {
        for n in &self.nodes {
            n.apply(&self.state).await;
        }
    }

    pub async fn mode(&self, i: usize) -> IoMode {
        self.nodes[i].reports().await[0].mode
    }

    pub fn on_device(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    /// The block-I/O address of node `id`.
    pub fn io_addr(&self, id: u64) -> String {
        self.state.nodes[&id].spec.io_addr.clone()
    }

    /// Asks for redirected I/O on node `id` (or ends it) and has every node adopt it.
    pub async fn set_redirected(&mut self, id: u64, redirected: bool) {
        apply(
            &mut self.state,
            Command::SetVolumeMode {
                volume: VOL,
                node: id,
                redirected,
            },
        );
        self.sync().await;
    }
}
