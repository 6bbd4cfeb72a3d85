//! Extent lookup: mapping a 4 KiB and a 1 MiB disk range to device runs, on a disk whose
//! 64 GiB are spread over 1 extent and over 4096 extents (a fragmented volume).
//!
//! `cargo bench -p csvd-raft --bench extent_map`

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use csvd_raft::volume::{ALLOCATION_UNIT, DiskRecord, Extent};
use uuid::Uuid;

fn disk(extents: u64) -> DiskRecord {
    let size = 64 * 1024 * ALLOCATION_UNIT;
    let per = size / extents;
    DiskRecord {
        id: 1,
        name: "d".into(),
        volume: Uuid::from_u128(1),
        size_bytes: size,
        // Interleaved on the device, as after many creates and deletes.
        extents: (0..extents)
            .map(|i| Extent {
                disk_offset: i * per,
                device_offset: (extents - i) * 2 * per,
                len: per,
            })
            .collect(),
        allowed_initiators: Vec::new(),
        block_size: 512,
        resets: 0,
        write_protected: false,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("extent_map");
    for extents in [1u64, 4096] {
        let d = disk(extents);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for (label, len) in [("4k", 4096u64), ("1m", ALLOCATION_UNIT)] {
            g.bench_with_input(BenchmarkId::new(label, extents), &d, |b, d| {
                b.iter(|| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (d.size_bytes / 4096 - len / 4096)) * 4096;
                    black_box(d.map(black_box(off), len))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
