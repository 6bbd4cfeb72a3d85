//! Latency of one durable Raft log append through `LogStore` (entry encoded, queued to the
//! writer thread, appended to the current segment and fdatasync'd, callback fired) against the raw floor on the
//! same disk: appending the same bytes to a file and calling fdatasync.
//!
//! `cargo bench -p csvd-raft --bench log_append`

use std::io::Write;
use std::os::unix::fs::FileExt;

use criterion::{Criterion, criterion_group, criterion_main};
use csvd_raft::store::LogStore;
use csvd_raft::{Command, Request, TypeConfig};
use openraft::EntryPayload;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::EntryOf;

fn entry(index: u64) -> EntryOf<TypeConfig> {
    EntryOf::<TypeConfig> {
        log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
        payload: EntryPayload::Normal(Request::new(Command::Heartbeat {
            id: 1,
            at_ms: index,
        })),
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("log_append_one_entry");

    let mut store = LogStore::open(&dir.path().join("raft-log.redb")).unwrap();
    let mut index = 0u64;
    group.bench_function("csvd_logstore", |b| {
        b.to_async(&rt).iter(|| {
            index += 1;
            let e = entry(index);
            let mut s = store.clone();
            async move {
                let (tx, rx) = TypeConfig::oneshot();
                s.append([e], IOFlushed::signal(tx)).await.unwrap();
                rx.await.unwrap().unwrap();
            }
        })
    });
    drop(store);

    let bytes = serde_json::to_vec(&entry(1)).unwrap();
    let mut file = std::fs::File::create(dir.path().join("raw.log")).unwrap();
    group.bench_function("raw_append_fdatasync", |b| {
        b.iter(|| {
            file.write_all(&bytes).unwrap();
            file.sync_data().unwrap();
        })
    });
    let page = vec![0u8; 4096];
    let file = std::fs::File::create(dir.path().join("raw.page")).unwrap();
    file.write_all_at(&page, 0).unwrap();
    group.bench_function("raw_overwrite_4k_fdatasync", |b| {
        b.iter(|| {
            file.write_all_at(&page, 0).unwrap();
            file.sync_data().unwrap();
        })
    });
    group.finish();
    store = LogStore::open(&dir.path().join("raft-log.redb")).unwrap();
    drop(store);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(200).measurement_time(std::time::Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
