//! The direct I/O engine: a batch of 32 concurrent 4 KiB random reads (queue depth 32) and
//! 32 concurrent 4 KiB random writes, through the io_uring back end and the pread/pwrite back
//! end, against one raw `pread` loop with O_DIRECT on the same file (the floor without
//! concurrency). A 256 MiB file in the system temp directory.
//!
//! `cargo bench -p csvd-csv-fs --bench engine`

use std::os::unix::fs::{FileExt, OpenOptionsExt};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use csvd_csv_fs::engine::{ALIGN, AlignedBuf, Backend, DirectEngine};

const FILE_BYTES: u64 = 256 << 20;
const QD: usize = 32;

fn offsets(seed: &mut u64) -> Vec<u64> {
    (0..QD)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % (FILE_BYTES / ALIGN as u64)) * ALIGN as u64
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device");
    {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(FILE_BYTES).unwrap();
        // Write real blocks so reads hit the disk, not holes.
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..(FILE_BYTES >> 20) {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("engine_qd32_4k");
    g.throughput(Throughput::Elements(QD as u64));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for backend in [Backend::IoUring, Backend::Pread] {
        let eng = match DirectEngine::open_with(&path, 64, Some(backend)) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("skip: {backend:?}: {e}");
                continue;
            }
        };
        g.bench_function(format!("read_{backend:?}"), |b| {
            b.to_async(&rt).iter(|| {
                let offs = offsets(&mut seed);
                let eng = eng.clone();
                async move {
                    let reads = offs.into_iter().map(|o| {
                        let eng = eng.clone();
                        async move { eng.read(o, ALIGN).await.unwrap() }
                    });
                    futures::future::join_all(reads).await
                }
            })
        });
        g.bench_function(format!("write_{backend:?}"), |b| {
            b.to_async(&rt).iter(|| {
                let offs = offsets(&mut seed);
                let eng = eng.clone();
                async move {
                    let writes = offs.into_iter().map(|o| {
                        let eng = eng.clone();
                        async move {
                            let buf = AlignedBuf::zeroed(ALIGN).unwrap();
                            eng.write(o, buf.into(), false).await.unwrap()
                        }
                    });
                    futures::future::join_all(writes).await
                }
            })
        });
    }
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let mut buf = AlignedBuf::zeroed(ALIGN).unwrap();
    g.bench_function("read_raw_pread_qd1", |b| {
        b.iter(|| {
            for o in offsets(&mut seed) {
                raw.read_exact_at(&mut buf, o).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
