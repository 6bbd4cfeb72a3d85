//! Fuzzed CDBs (with a fuzzed Data-Out) through the SCSI layer over the in-memory backend,
//! on a 512-byte and a 4096-byte LUN, from two initiators: every command answers with a
//! status, nothing panics. With bit 4 of the first byte set, a write fence shuts the second
//! initiator out of both LUNs.
#![no_main]

use std::sync::Arc;

use csvd_iscsi_target::backend::{Nexus, WriteFence};
use csvd_iscsi_target::mem::MemBackend;
use csvd_iscsi_target::scsi::{Command, Scsi};
use libfuzzer_sys::fuzz_target;

const TARGET: &str = "iqn.2025-11.org.csvd.fuzz:t";

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let cdb_len = [6usize, 10, 12, 16][usize::from(head & 3)].min(rest.len());
    let (cdb, out) = rest.split_at(cdb_len);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mem = Arc::new(MemBackend::new());
        mem.create_lun(TARGET, 0, 64, 512, true);
        mem.create_lun(TARGET, 1, 16, 4096, head & 8 != 0);
        if head & 0x10 != 0 {
            for lun in [0, 1] {
                let fence = WriteFence {
                    prefix: "iqn.2025-11.org.csvd.fuzz:i".into(),
                    allowed: vec!["iqn.2025-11.org.csvd.fuzz:i1".into()],
                };
                mem.set_write_fence(TARGET, lun, Some(fence));
            }
        }
        let scsi = Scsi::new(mem);
        let nexus = |isid: u8| Nexus {
            initiator: format!("iqn.2025-11.org.csvd.fuzz:i{isid}"),
            isid: [0x80, 0, 0, 0, 0, isid],
            target: TARGET.into(),
            tpgt: 1,
            relative_port: 1,
        };
        let lun = u64::from(head >> 7);
        for isid in [1u8, 2] {
            let n = nexus(isid);
            let data_out = (!out.is_empty()).then(|| out.to_vec());
            let r = scsi
                .execute(Command {
                    nexus: &n,
                    lun,
                    cdb,
                    data_out,
                    expected_length: out.len() as u32,
                })
                .await;
            assert!(r.status != 0 || r.sense.is_none(), "GOOD with sense data");
        }
    });
});
