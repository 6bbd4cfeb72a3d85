//! The direct I/O engine against a plain model: random reads, writes (some FUA), flushes,
//! discards and write-zeroes through the engine and through ordinary pread/pwrite on a second file must leave identical
//! bytes, on both back ends. Needs O_DIRECT support on the temp directory's filesystem and, for
//! the io_uring back end, io_uring; each prints a clear skip line when missing.

use std::os::unix::fs::FileExt;

use csvd_csv_fs::engine::{ALIGN, AlignedBuf, Backend, DirectEngine};
use proptest::prelude::*;

const FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Read {
        block: u64,
        blocks: usize,
    },
    Write {
        block: u64,
        blocks: usize,
        seed: u8,
        fua: bool,
    },
    Flush,
    /// Discard (`zero == false`) or write-zeroes.
    Zero {
        block: u64,
        blocks: usize,
        discard: bool,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    let max = FILE_BYTES / ALIGN as u64;
    prop_oneof![
        (0..max, 1usize..9).prop_map(move |(b, n)| Op::Read {
            block: b.min(max - n as u64),
            blocks: n
        }),
        (0..max, 1usize..9, any::<u8>(), any::<bool>()).prop_map(move |(b, n, seed, fua)| {
            Op::Write {
                block: b.min(max - n as u64),
                blocks: n,
                seed,
                fua,
            }
        }),
        Just(Op::Flush),
        (0..max, 1usize..9, any::<bool>()).prop_map(move |(b, n, discard)| Op::Zero {
            block: b.min(max - n as u64),
            blocks: n,
            discard,
        }),
    ]
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(31))
        .collect()
}

/// Opens an engine on a fresh file, or says why this machine cannot.
fn engine(dir: &std::path::Path, backend: Backend) -> Option<DirectEngine> {
    let path = dir.join("device");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(FILE_BYTES)
        .unwrap();
    match DirectEngine::open_with(&path, 32, Some(backend)) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("skip: {backend:?} direct I/O engine unavailable here: {e}");
            None
        }
    }
}

fn run_differential(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let Some(eng) = engine(dir.path(), backend) else {
        return Ok(());
    };
    assert_eq!(eng.backend(), backend);
    let model = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("model"))
        .unwrap();
    model.set_len(FILE_BYTES).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for op in ops {
            match op {
                Op::Read { block, blocks } => {
                    let len = blocks * ALIGN;
                    let got = eng.read(block * ALIGN as u64, len).await.unwrap();
                    let mut want = vec![0u8; len];
                    model
                        .read_exact_at(&mut want, block * ALIGN as u64)
                        .unwrap();
                    prop_assert!(got[..] == want[..], "read at block {} differs", block);
                }
                Op::Write {
                    block,
                    blocks,
                    seed,
                    fua,
                } => {
                    let data = pattern(seed, blocks * ALIGN);
                    let buf = AlignedBuf::from_slice(&data).unwrap();
                    eng.write(block * ALIGN as u64, buf.into(), fua)
                        .await
                        .unwrap();
                    model.write_all_at(&data, block * ALIGN as u64).unwrap();
                }
                Op::Flush => eng.flush().await.unwrap(),
                Op::Zero {
                    block,
                    blocks,
                    discard,
                } => {
                    let (off, len) = (block * ALIGN as u64, (blocks * ALIGN) as u64);
                    if discard {
                        eng.discard(off, len).await.unwrap();
                    } else {
                        eng.write_zeroes(off, len).await.unwrap();
                    }
                    model.write_all_at(&vec![0; len as usize], off).unwrap();
                }
            }
        }
        Ok(())
    })?;
    let on_disk = std::fs::read(dir.path().join("device")).unwrap();
    let modelled = std::fs::read(dir.path().join("model")).unwrap();
    prop_assert!(on_disk == modelled, "final bytes differ");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn test_engine_matches_model_io_uring(ops in proptest::collection::vec(arb_op(), 1..60)) {
        run_differential(Backend::IoUring, ops)?;
    }

    #[test]
    fn test_engine_matches_model_pread(ops in proptest::collection::vec(arb_op(), 1..60)) {
        run_differential(Backend::Pread, ops)?;
    }
}

/// Many I/Os in flight at once complete correctly (each block written, then read back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_engine_many_in_flight() {
    for backend in [Backend::IoUring, Backend::Pread] {
        let dir = tempfile::tempdir().unwrap();
        let Some(eng) = engine(dir.path(), backend) else {
            continue;
        };
        let blocks = (FILE_BYTES / ALIGN as u64) as usize;
        let writes = (0..blocks).map(|b| {
            let eng = eng.clone();
            tokio::spawn(async move {
                let buf = AlignedBuf::from_slice(&pattern(b as u8, ALIGN)).unwrap();
                eng.write((b * ALIGN) as u64, buf.into(), false)
                    .await
                    .unwrap();
            })
        });
        for w in writes.collect::<Vec<_>>() {
            w.await.unwrap();
        }
        eng.flush().await.unwrap();
        let reads: Vec<_> = (0..blocks)
            .map(|b| {
                let eng = eng.clone();
                tokio::spawn(async move { (b, eng.read((b * ALIGN) as u64, ALIGN).await.unwrap()) })
            })
            .collect();
        for r in reads {
            let (b, got) = r.await.unwrap();
            assert_eq!(
                &got[..],
                &pattern(b as u8, ALIGN)[..],
                "{backend:?} block {b}"
            );
        }
    }
}

/// Bad requests are refused before anything reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_engine_rejects_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let Some(eng) =
        engine(dir.path(), Backend::IoUring).or_else(|| engine(dir.path(), Backend::Pread))
    else {
        return;
    };
    let err = eng.read(100, ALIGN).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("offset 100"), "{err}");
    let err = eng.read(0, 100).await.unwrap_err();
    assert!(err.to_string().contains("length 100"), "{err}");
    let err = eng.read(FILE_BYTES, ALIGN).await.unwrap_err();
    assert!(err.to_string().contains("beyond the end"), "{err}");
    let buf = AlignedBuf::from_slice(&pattern(9, ALIGN)).unwrap();
    let err = eng
        .write(FILE_BYTES - 1, buf.into(), true)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(AlignedBuf::zeroed(100).is_err());
    // Nothing was written.
    let on_disk = std::fs::read(dir.path().join("device")).unwrap();
    assert!(on_disk.iter().all(|b| *b == 0));
}

/// A thread that uses rings of its own does its I/O on them, sees the same bytes as the
/// engine's shared ring, and lets go of them when the engine is gone.
#[test]
fn test_engine_thread_rings() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(eng) = rt.block_on(async { engine(dir.path(), Backend::IoUring) }) else {
        return;
    };
    let own = eng.clone();
    let written = std::thread::spawn(move || {
        csvd_csv_fs::engine::use_thread_rings();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(csvd_csv_fs::engine::thread_rings(), 0);
            for b in 0..64u64 {
                let buf = AlignedBuf::from_slice(&pattern(b as u8, ALIGN)).unwrap();
                own.write(b * ALIGN as u64, buf.into(), b % 2 == 0)
                    .await
                    .unwrap();
            }
            own.flush().await.unwrap();
            let back = own.read(0, 64 * ALIGN).await.unwrap();
            for b in 0..64usize {
                assert_eq!(
                    &back[b * ALIGN..(b + 1) * ALIGN],
                    &pattern(b as u8, ALIGN)[..]
                );
            }
            let rings = csvd_csv_fs::engine::thread_rings();
            drop(own);
            rings
        })
    })
    .join()
    .unwrap();
    assert_eq!(
        written, 1,
        "the thread's I/O went through a ring of its own"
    );
    // This thread does not use rings of its own: it reads through the shared one.
    assert_eq!(csvd_csv_fs::engine::thread_rings(), 0);
    rt.block_on(async {
        for b in [0u64, 31, 63] {
            let got = eng.read(b * ALIGN as u64, ALIGN).await.unwrap();
            assert_eq!(&got[..], &pattern(b as u8, ALIGN)[..], "block {b}");
        }
    });
    // Once the engine is gone, a thread's ring on it is dropped at the next look.
    let (tx, rx) = std::sync::mpsc::channel::<DirectEngine>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<usize>();
    let t = std::thread::spawn(move || {
        csvd_csv_fs::engine::use_thread_rings();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let eng = rx.recv().unwrap();
        rt.block_on(async { eng.read(0, ALIGN).await.unwrap() });
        back_tx.send(csvd_csv_fs::engine::thread_rings()).unwrap();
        drop(eng);
        // The test drops its handle, then tells this thread to look again.
        rx.recv().ok();
        back_tx.send(csvd_csv_fs::engine::thread_rings()).unwrap();
    });
    tx.send(eng.clone()).unwrap();
    assert_eq!(back_rx.recv().unwrap(), 1);
    drop(eng);
    drop(tx);
    assert_eq!(back_rx.recv().unwrap(), 0, "the ring outlived its engine");
    t.join().unwrap();
}
