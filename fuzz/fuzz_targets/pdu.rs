//! Any bytes through the PDU decoder, with and without digests, and every decoded header
//! through the request parser: nothing panics.
#![no_main]

use csvd_iscsi_target::pdu::{Framing, Request, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let framing = Framing {
        header_digest: flags & 1 != 0,
        data_digest: flags & 2 != 0,
        max_recv_data: 1 << 16,
    };
    let mut rest = bytes;
    while let Ok(Some((pdu, used))) = decode(&framing, rest) {
        let _ = Request::parse(&pdu.bhs, &pdu.ahs);
        rest = &rest[used..];
    }
});
