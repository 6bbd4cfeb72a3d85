//! Login requests with fuzzed key=value text and header fields through the login state
//! machine, several steps in a row, and the same bytes through the text parser: nothing
//! panics, and every step answers with a response.
#![no_main]

use csvd_iscsi_target::login::{ChapSecrets, Login, LoginConfig, LoginRequest, Policy, Step};
use csvd_iscsi_target::text;
use libfuzzer_sys::fuzz_target;

struct Open(bool);

impl Policy for Open {
    fn target_exists(&self, name: &str) -> bool {
        name.starts_with("iqn.")
    }
    fn initiator_allowed(&self, _target: &str, initiator: &str) -> bool {
        !initiator.ends_with('x')
    }
    fn chap(&self, _target: Option<&str>) -> Option<ChapSecrets> {
        self.0.then(|| ChapSecrets {
            user: "u".into(),
            secret: b"0123456789abcdef".to_vec(),
            mutual: Some(("t".into(), b"fedcba9876543210".to_vec())),
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = text::parse(data);
    let _ = text::parse_repeated(data);
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let policy = Open(flags & 0x80 != 0);
    let mut login = Login::with_random(LoginConfig::default(), |b| {
        b.fill(7);
        Ok(())
    });
    // Each chunk separated by 0xff is one request; its first byte sets the header bits.
    for chunk in rest.split(|b| *b == 0xff).take(8) {
        let Some((&bits, text)) = chunk.split_first() else {
            continue;
        };
        let req = LoginRequest {
            transit: bits & 0x80 != 0,
            cont: bits & 0x40 != 0,
            csg: (bits >> 2) & 3,
            nsg: bits & 3,
            version_max: 0,
            version_min: bits >> 7,
            isid: [0x80, 0, 0, 0, 0, 1],
            data: text.to_vec(),
            ..Default::default()
        };
        match login.step(&req, &policy) {
            Step::Continue(_) => {}
            Step::Done { .. } | Step::Fail(_) => break,
        }
    }
});
