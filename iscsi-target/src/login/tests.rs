//! Login handshakes driven over in-memory requests, modelled on what libiscsi (lib/login.c)
//! and Linux open-iscsi (usr/login.c) send.

use proptest::prelude::*;

use super::*;
use crate::text;

const TARGET: &str = "iqn.2024-01.org.example:disk";
const INITIATOR: &str = "iqn.2024-01.org.example:host";
const ISID: [u8; 6] = [0x80, 0x12, 0x34, 0x56, 0x00, 0x01];

/// A policy with one target.
#[derive(Default)]
struct TestPolicy {
    chap: Option<ChapSecrets>,
    discovery_chap: Option<ChapSecrets>,
    deny: bool,
    alias: Option<String>,
}

impl Policy for TestPolicy {
    fn target_exists(&self, name: &str) -> bool {
        name == TARGET
    }
    fn initiator_allowed(&self, _target: &str, _initiator: &str) -> bool {
        !self.deny
    }
    fn chap(&self, target: Option<&str>) -> Option<ChapSecrets> {
        match target {
            Some(_) => self.chap.clone(),
            None => self.discovery_chap.clone(),
        }
    }
    fn target_alias(&self, _target: &str) -> Option<String> {
        self.alias.clone()
    }
}

fn secrets(mutual: bool) -> ChapSecrets {
    ChapSecrets {
        user: "alice".into(),
        secret: b"initiator-secret-12".to_vec(),
        mutual: mutual.then(|| {
            (
                "iqn.2024-01.org.example:target-auth".into(),
                b"target-secret-345".to_vec(),
            )
        }),
    }
}

/// Deterministic "random" bytes: CHAP_I is 0xa0 (160), CHAP_C is a0 a1 a2 ...
fn fixed_random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = 0xa0 ^ (i as u8);
    }
    Ok(())
}

fn failing_random(_buf: &mut [u8]) -> Result<(), getrandom::Error> {
    Err(getrandom::Error::UNSUPPORTED)
}

fn new_login() -> Login {
    new_login_with(Limits::default())
}

fn new_login_with(limits: Limits) -> Login {
    Login::with_random(
        LoginConfig {
            portal_group_tag: 7,
            limits,
        },
        fixed_random,
    )
}

fn req(csg: u8, nsg: u8, transit: bool, pairs: &[(&str, &str)]) -> LoginRequest {
    LoginRequest {
        transit,
        csg,
        nsg,
        isid: ISID,
        itt: 0x1000,
        cid: 1,
        data: text::encode(pairs),
        ..Default::default()
    }
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn texts(resp: &LoginResponse) -> Vec<(String, String)> {
    text::parse(&resp.data).unwrap()
}

fn value(resp: &LoginResponse, key: &str) -> Option<String> {
    texts(resp)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[track_caller]
fn cont(step: Step) -> LoginResponse {
    match step {
        Step::Continue(resp) => {
            assert_eq!((resp.status_class, resp.status_detail), (0, 0));
            resp
        }
        other => panic!("expected Continue, got {other:?}"),
    }
}

#[track_caller]
fn done(step: Step) -> (LoginResponse, Outcome) {
    match step {
        Step::Done { response, outcome } => {
            assert!(response.transit);
            assert_eq!(response.nsg, STAGE_FULL_FEATURE);
            assert!(!response.cont);
            (response, outcome)
        }
        other => panic!("expected Done, got {other:?}"),
    }
}

#[track_caller]
fn fail(step: Step) -> (u8, u8) {
    match step {
        Step::Fail(resp) => {
            assert!(!resp.transit);
            assert!(resp.data.is_empty());
            (resp.status_class, resp.status_detail)
        }
        other => panic!("expected Fail, got {other:?}"),
    }
}

/// The operational keys libiscsi sends in one PDU at csg 1 (lib/login.c, default settings).
const LIBISCSI_OPERATIONAL: &[(&str, &str)] = &[
    ("HeaderDigest", "None,CRC32C"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("MaxConnections", "1"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
];

/// The answers to [`LIBISCSI_OPERATIONAL`] with the default limits, then the target's
/// declaration.
const LIBISCSI_ANSWERS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
];

fn libiscsi_normal_first() -> Vec<(&'static str, &'static str)> {
    let mut keys = vec![
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
    ];
    keys.extend_from_slice(LIBISCSI_OPERATIONAL);
    keys
}

#[test]
fn test_login_normal_session_in_one_step() {
    let mut login = new_login();
    let (resp, outcome) = done(login.step(
        &req(1, 3, true, &libiscsi_normal_first()),
        &TestPolicy::default(),
    ));
    assert_eq!(resp.csg, STAGE_OPERATIONAL);
    let mut want = vec![("TargetPortalGroupTag", "7")];
    want.extend_from_slice(LIBISCSI_ANSWERS);
    assert_eq!(texts(&resp), pairs(&want));
    assert_eq!(outcome.session_type, SessionType::Normal);
    assert_eq!(outcome.initiator_name, INITIATOR);
    assert_eq!(outcome.target_name.as_deref(), Some(TARGET));
    assert_eq!((outcome.isid, outcome.tsih, outcome.cid), (ISID, 0, 1));
    assert_eq!(outcome.chap_user, None);
    let p = &outcome.params;
    assert!(!p.header_digest && !p.data_digest);
    assert_eq!(p.max_recv_data_segment_length, 262_144);
    assert_eq!(p.max_xmit_data_segment_length, 262_144);
    assert_eq!(
        (p.max_burst_length, p.first_burst_length),
        (262_144, 262_144)
    );
    assert!(!p.initial_r2t && p.immediate_data);
    assert_eq!(p.max_outstanding_r2t, 1);
    assert_eq!((p.default_time2wait, p.default_time2retain), (2, 0));
    assert_eq!((p.error_recovery_level, p.max_connections), (0, 1));
    assert!(login.is_finished());
    assert_eq!(
        fail(login.step(&req(1, 3, true, &[]), &TestPolicy::default())),
        (0x02, 0x0b)
    );
}

#[test]
fn test_login_defaults_when_initiator_negotiates_nothing() {
    let mut login = new_login();
    let first = req(
        1,
        3,
        true,
        &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
    );
    let (resp, outcome) = done(login.step(&first, &TestPolicy::default()));
    assert_eq!(
        texts(&resp),
        pairs(&[
            ("TargetPortalGroupTag", "7"),
            ("MaxRecvDataSegmentLength", "262144")
        ])
    );
    let p = outcome.params;
    assert_eq!(p.max_xmit_data_segment_length, 8192);
    assert_eq!(p.max_burst_length, 262_144);
    assert_eq!(p.first_burst_length, 65_536);
    assert!(p.initial_r2t && p.immediate_data);
    assert_eq!(p.default_time2retain, 20);
}

#[test]
fn test_login_discovery_open_iscsi() {
    let mut login = new_login();
    let policy = TestPolicy::default();
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "host"),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ],
    );
    let resp = cont(login.step(&first, &policy));
    assert!(resp.transit);
    assert_eq!((resp.csg, resp.nsg), (0, 1));
    assert_eq!(texts(&resp), pairs(&[("AuthMethod", "None")]));
    let ops = req(
        1,
        3,
        true,
        &[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxRecvDataSegmentLength", "32768"),
        ],
    );
    let (resp, outcome) = done(login.step(&ops, &policy));
    assert_eq!(
        texts(&resp),
        pairs(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxRecvDataSegmentLength", "262144"),
        ])
    );
    assert_eq!(outcome.session_type, SessionType::Discovery);
    assert_eq!(outcome.target_name, None);
    assert_eq!(outcome.initiator_alias.as_deref(), Some("host"));
    assert_eq!(outcome.params.max_xmit_data_segment_length, 32768);
}

#[test]
fn test_login_discovery_libiscsi_answers_irrelevant() {
    let mut login = new_login();
    let mut keys = vec![("InitiatorName", INITIATOR), ("SessionType", "Discovery")];
    keys.extend_from_slice(LIBISCSI_OPERATIONAL);
    let (resp, outcome) = done(login.step(&req(1, 3, true, &keys), &TestPolicy::default()));
    for key in [
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxOutstandingR2T",
        "MaxConnections",
        "DataPDUInOrder",
        "DataSequenceInOrder",
    ] {
        assert_eq!(value(&resp, key).as_deref(), Some("Irrelevant"), "{key}");
    }
    assert_eq!(value(&resp, "HeaderDigest").as_deref(), Some("None"));
    assert_eq!(value(&resp, "TargetPortalGroupTag"), None);
    assert_eq!(outcome.session_type, SessionType::Discovery);
}

#[test]
fn test_login_security_then_operational_with_alias() {
    let mut login = new_login();
    let policy = TestPolicy {
        alias: Some("disk one".into()),
        ..Default::default()
    };
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    let resp = cont(login.step(&first, &policy));
    assert!(resp.transit);
    assert_eq!(
        texts(&resp),
        pairs(&[
            ("TargetPortalGroupTag", "7"),
            ("TargetAlias", "disk one"),
            ("AuthMethod", "None")
        ])
    );
    // libiscsi repeats its names in the operational stage after AuthMethod=None.
    let keys: Vec<(&str, &str)> = libiscsi_normal_first()
        .into_iter()
        .map(|(k, v)| match k {
            "HeaderDigest" => (k, "CRC32C,None"),
            "DataDigest" => (k, "CRC32C"),
            _ => (k, v),
        })
        .collect();
    let ops = req(1, 3, true, &keys);
    let (resp, outcome) = done(login.step(&ops, &policy));
    assert_eq!(resp.csg, 1);
    assert_eq!(
        value(&resp, "TargetPortalGroupTag"),
        None,
        "sent once, in the first response"
    );
    assert_eq!(value(&resp, "HeaderDigest").as_deref(), Some("CRC32C"));
    assert_eq!(value(&resp, "DataDigest").as_deref(), Some("CRC32C"));
    assert!(outcome.params.header_digest && outcome.params.data_digest);
}

#[test]
fn test_login_security_straight_to_full_feature_declares() {
    let mut login = new_login();
    let first = req(
        0,
        3,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ],
    );
    let (resp, _) = done(login.step(&first, &TestPolicy::default()));
    assert_eq!(resp.csg, 0);
    assert_eq!(
        texts(&resp),
        pairs(&[
            ("TargetPortalGroupTag", "7"),
            ("AuthMethod", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
        ])
    );
}

#[test]
fn test_login_security_stage_waits_for_transit() {
    let mut login = new_login();
    let policy = TestPolicy::default();
    let first = req(
        0,
        1,
        false,
        &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
    );
    let resp = cont(login.step(&first, &policy));
    assert!(!resp.transit);
    let resp = cont(login.step(&req(0, 1, false, &[]), &policy));
    assert!(!resp.transit && resp.data.is_empty());
    let resp = cont(login.step(&req(0, 1, true, &[]), &policy));
    assert!(resp.transit);
    done(login.step(&req(1, 3, true, &[]), &policy));
}

/// libiscsi's CHAP sequence: offer, algorithm, response (lib/login.c).
fn chap_login(
    login: &mut Login,
    policy: &TestPolicy,
    user: &str,
    secret: &[u8],
    mutual: Option<(u8, Vec<u8>)>,
) -> Step {
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    let resp = cont(login.step(&first, policy));
    assert!(!resp.transit, "CHAP is not done yet");
    assert_eq!(
        texts(&resp),
        pairs(&[("TargetPortalGroupTag", "7"), ("AuthMethod", "CHAP")])
    );

    let resp = cont(login.step(&req(0, 1, false, &[("CHAP_A", "5")]), policy));
    assert!(!resp.transit);
    let challenge: Vec<u8> = (0..32u8).map(|i| 0xa0 ^ i).collect();
    assert_eq!(
        texts(&resp),
        pairs(&[
            ("CHAP_A", "5"),
            ("CHAP_I", "160"),
            ("CHAP_C", &text::encode_hex(&challenge))
        ])
    );
    let id: u8 = value(&resp, "CHAP_I").unwrap().parse().unwrap();
    let challenge = text::decode_binary(&value(&resp, "CHAP_C").unwrap()).unwrap();

    // libiscsi writes CHAP_R in upper-case hexadecimal.
    let response = chap_md5_response(id, secret, &challenge);
    let hex: String = response.iter().map(|b| format!("{b:02X}")).collect();
    let chap_r = format!("0x{hex}");
    let mut keys = vec![("CHAP_N", user.to_string()), ("CHAP_R", chap_r)];
    if let Some((id, challenge)) = mutual {
        keys.push(("CHAP_I", id.to_string()));
        keys.push(("CHAP_C", text::encode_hex(&challenge)));
    }
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    login.step(&req(0, 1, true, &keys), policy)
}

#[test]
fn test_login_chap_success() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = new_login();
    let resp = cont(chap_login(
        &mut login,
        &policy,
        "alice",
        b"initiator-secret-12",
        None,
    ));
    assert!(resp.transit);
    assert_eq!((resp.csg, resp.nsg), (0, 1));
    assert!(resp.data.is_empty());
    let mut ops = LIBISCSI_OPERATIONAL.to_vec();
    ops.retain(|(k, _)| *k != "MaxRecvDataSegmentLength");
    let (resp, outcome) = done(login.step(&req(1, 3, true, &ops), &policy));
    assert_eq!(
        value(&resp, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(outcome.chap_user.as_deref(), Some("alice"));
    assert_eq!(outcome.params.max_xmit_data_segment_length, 8192);
}

#[test]
fn test_login_chap_wrong_secret() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = new_login();
    let step = chap_login(&mut login, &policy, "alice", b"wrong-secret", None);
    assert_eq!(fail(step), (0x02, 0x01));
    assert_eq!(login.error(), Some(&LoginError::ChapWrongResponse));
    assert_eq!(
        fail(login.step(&req(0, 1, false, &[]), &policy)),
        (0x02, 0x01)
    );
}

#[test]
fn test_login_chap_wrong_user() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = new_login();
    let step = chap_login(&mut login, &policy, "mallory", b"initiator-secret-12", None);
    assert_eq!(fail(step), (0x02, 0x01));
    assert_eq!(
        login.error(),
        Some(&LoginError::ChapUnknownUser("mallory".into()))
    );
}

#[test]
fn test_login_mutual_chap_success() {
    let policy = TestPolicy {
        chap: Some(secrets(true)),
        ..Default::default()
    };
    let mut login = new_login();
    let our_challenge: Vec<u8> = (0..32).map(|i| i * 3 + 1).collect();
    let step = chap_login(
        &mut login,
        &policy,
        "alice",
        b"initiator-secret-12",
        Some((9, our_challenge.clone())),
    );
    let resp = cont(step);
    assert!(resp.transit);
    assert_eq!(
        value(&resp, "CHAP_N").as_deref(),
        Some("iqn.2024-01.org.example:target-auth")
    );
    let expected = chap_md5_response(9, b"target-secret-345", &our_challenge);
    let got = text::decode_binary(&value(&resp, "CHAP_R").unwrap()).unwrap();
    assert_eq!(got, expected);
    done(login.step(&req(1, 3, true, LIBISCSI_OPERATIONAL), &policy));
}

#[test]
fn test_login_mutual_chap_base64_and_hex_identifier() {
    let policy = TestPolicy {
        chap: Some(secrets(true)),
        ..Default::default()
    };
    let mut login = new_login();
    let first = req(
        0,
        1,
        false,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ],
    );
    cont(login.step(&first, &policy));
    let resp = cont(login.step(&req(0, 1, false, &[("CHAP_A", "7,6,5")]), &policy));
    assert_eq!(value(&resp, "CHAP_A").as_deref(), Some("5"));
    let challenge = text::decode_binary(&value(&resp, "CHAP_C").unwrap()).unwrap();
    let response = chap_md5_response(160, b"initiator-secret-12", &challenge);
    let ours = [0x55u8; 16];
    let keys = [
        ("CHAP_N", "alice".to_string()),
        ("CHAP_R", text::encode_base64(&response)),
        ("CHAP_I", "0x0a".to_string()),
        ("CHAP_C", text::encode_base64(&ours)),
    ];
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = cont(login.step(&req(0, 1, false, &keys), &policy));
    assert!(!resp.transit, "the initiator did not ask to transit");
    let got = text::decode_binary(&value(&resp, "CHAP_R").unwrap()).unwrap();
    assert_eq!(got, chap_md5_response(10, b"target-secret-345", &ours));
    let resp = cont(login.step(&req(0, 1, true, &[]), &policy));
    assert!(resp.transit);
}

/// Mutual CHAP settings, the initiator's CHAP_I and CHAP_C, and the expected error.
type MutualCase = (bool, Option<(u8, Vec<u8>)>, LoginError);

#[test]
fn test_login_mutual_chap_refusals() {
    let reflected: Vec<u8> = (0..32u8).map(|i| 0xa0 ^ i).collect();
    let cases: &[MutualCase] = &[
        (true, Some((1, reflected)), LoginError::ChapReflected),
        (true, Some((1, vec![1; 8])), LoginError::ChapBadChallenge),
        (true, Some((1, vec![1; 1025])), LoginError::ChapBadChallenge),
        (
            false,
            Some((1, vec![1; 16])),
            LoginError::MutualChapNotConfigured,
        ),
    ];
    for (mutual, challenge, want) in cases {
        let policy = TestPolicy {
            chap: Some(secrets(*mutual)),
            ..Default::default()
        };
        let mut login = new_login();
        let step = chap_login(
            &mut login,
            &policy,
            "alice",
            b"initiator-secret-12",
            challenge.clone(),
        );
        assert_eq!(fail(step), (0x02, 0x01), "{want}");
        assert_eq!(login.error(), Some(want));
    }
}

#[test]
fn test_login_mutual_chap_secret_reuse_is_target_error() {
    let mut chap = secrets(true);
    chap.mutual = Some(("target".into(), chap.secret.clone()));
    let policy = TestPolicy {
        chap: Some(chap),
        ..Default::default()
    };
    let mut login = new_login();
    let step = chap_login(
        &mut login,
        &policy,
        "alice",
        b"initiator-secret-12",
        Some((1, vec![7; 16])),
    );
    assert_eq!(fail(step), (0x03, 0x00));
    assert_eq!(login.error().map(LoginError::fault), Some(Fault::Target));
}

#[test]
fn test_login_chap_required_but_none_offered() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = new_login();
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ],
    );
    assert_eq!(fail(login.step(&first, &policy)), (0x02, 0x01));
    assert_eq!(login.error(), Some(&LoginError::ChapRequired));
}

#[test]
fn test_login_chap_required_but_security_skipped() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = new_login();
    assert_eq!(
        fail(login.step(&req(1, 3, true, &libiscsi_normal_first()), &policy)),
        (0x02, 0x01)
    );
    assert_eq!(login.error(), Some(&LoginError::SecurityRequired));

    let mut login = new_login();
    let first = req(
        0,
        1,
        true,
        &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
    );
    assert_eq!(fail(login.step(&first, &policy)), (0x02, 0x01));
    assert_eq!(login.error(), Some(&LoginError::ChapRequired));
}

#[test]
fn test_login_chap_only_offered_without_secrets() {
    let mut login = new_login();
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ],
    );
    assert_eq!(
        fail(login.step(&first, &TestPolicy::default())),
        (0x02, 0x01)
    );
    assert_eq!(login.error(), Some(&LoginError::ChapNotConfigured));
}

#[test]
fn test_login_discovery_chap() {
    let policy = TestPolicy {
        discovery_chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = new_login();
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ],
    );
    assert_eq!(fail(login.step(&first, &policy)), (0x02, 0x01));
}

#[test]
fn test_login_chap_sequence_errors() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let start = || {
        let mut login = new_login();
        let first = req(
            0,
            1,
            false,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP"),
            ],
        );
        cont(login.step(&first, &policy));
        login
    };
    let cases: &[(&[(&str, &str)], LoginError)] = &[
        (
            &[("CHAP_A", "7")],
            LoginError::UnsupportedChapAlgorithm("7".into()),
        ),
        (
            &[("CHAP_N", "alice")],
            LoginError::UnexpectedAuthKey("CHAP_N".into()),
        ),
        (
            &[("SRP_U", "alice")],
            LoginError::UnexpectedAuthKey("SRP_U".into()),
        ),
        (
            &[("AuthMethod", "CHAP")],
            LoginError::Renegotiated("AuthMethod".into()),
        ),
    ];
    for (keys, want) in cases {
        let mut login = start();
        assert_eq!(
            fail(login.step(&req(0, 1, false, keys), &policy)).0,
            0x02,
            "{want}"
        );
        assert_eq!(login.error(), Some(want));
    }

    let mut login = start();
    cont(login.step(&req(0, 1, false, &[("CHAP_A", "5")]), &policy));
    let cases: &[(&[(&str, &str)], LoginError)] = &[
        (&[("CHAP_N", "alice")], LoginError::ChapMissingResponse),
        (
            &[("CHAP_N", "alice"), ("CHAP_R", "0x1234")],
            LoginError::ChapMalformedResponse,
        ),
        (
            &[("CHAP_N", "alice"), ("CHAP_R", "zz")],
            LoginError::ChapMalformedResponse,
        ),
    ];
    for (keys, want) in cases {
        let mut login = start();
        cont(login.step(&req(0, 1, false, &[("CHAP_A", "5")]), &policy));
        assert_eq!(
            fail(login.step(&req(0, 1, false, keys), &policy)),
            (0x02, 0x01),
            "{want}"
        );
        assert_eq!(login.error(), Some(want));
    }
}

#[test]
fn test_login_chap_random_failure_is_target_error() {
    let policy = TestPolicy {
        chap: Some(secrets(false)),
        ..Default::default()
    };
    let mut login = Login::with_random(LoginConfig::default(), failing_random);
    let first = req(
        0,
        1,
        false,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ],
    );
    cont(login.step(&first, &policy));
    assert_eq!(
        fail(login.step(&req(0, 1, false, &[("CHAP_A", "5")]), &policy)),
        (0x03, 0x00)
    );
}

/// The first request's keys, the policy, and the expected status.
type FirstRequestCase = (
    &'static [(&'static str, &'static str)],
    TestPolicy,
    (u8, u8),
);

#[test]
fn test_login_first_request_failures() {
    let cases: &[FirstRequestCase] = &[
        (
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", "iqn.2024-01.org.example:nope"),
            ],
            TestPolicy::default(),
            (2, 3),
        ),
        (
            &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
            TestPolicy {
                deny: true,
                ..Default::default()
            },
            (2, 2),
        ),
        (&[("TargetName", TARGET)], TestPolicy::default(), (2, 7)),
        (
            &[("InitiatorName", ""), ("TargetName", TARGET)],
            TestPolicy::default(),
            (2, 7),
        ),
        (
            &[("InitiatorName", INITIATOR)],
            TestPolicy::default(),
            (2, 7),
        ),
        (
            &[("InitiatorName", INITIATOR), ("SessionType", "Normal")],
            TestPolicy::default(),
            (2, 7),
        ),
        (
            &[("InitiatorName", INITIATOR), ("SessionType", "Boot")],
            TestPolicy::default(),
            (2, 9),
        ),
        (
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("TargetPortalGroupTag", "1"),
            ],
            TestPolicy::default(),
            (2, 0),
        ),
        (
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("MaxRecvDataSegmentLength", "100"),
            ],
            TestPolicy::default(),
            (2, 0),
        ),
        (
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ],
            TestPolicy::default(),
            (2, 0),
        ),
    ];
    for (keys, policy, want) in cases {
        let mut login = new_login();
        assert_eq!(
            fail(login.step(&req(1, 3, true, keys), policy)),
            *want,
            "{keys:?}"
        );
    }
    let long = "i".repeat(224);
    let mut login = new_login();
    let step = login.step(
        &req(
            1,
            3,
            true,
            &[("InitiatorName", &long), ("TargetName", TARGET)],
        ),
        &TestPolicy::default(),
    );
    assert_eq!(fail(step), (2, 0));
}

#[test]
fn test_login_header_failures() {
    let policy = TestPolicy::default();
    let ok = || {
        req(
            0,
            1,
            true,
            &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
        )
    };
    let cases: Vec<(LoginRequest, (u8, u8))> = vec![
        (
            LoginRequest {
                version_min: 1,
                version_max: 2,
                ..ok()
            },
            (2, 5),
        ),
        (LoginRequest { cont: true, ..ok() }, (2, 0)),
        (LoginRequest { nsg: 2, ..ok() }, (2, 0)),
        (
            LoginRequest {
                csg: 1,
                nsg: 1,
                ..ok()
            },
            (2, 0),
        ),
        (LoginRequest { nsg: 0, ..ok() }, (2, 0)),
        (
            LoginRequest {
                csg: 3,
                nsg: 3,
                ..ok()
            },
            (2, 0),
        ),
        (
            LoginRequest {
                csg: 2,
                transit: false,
                ..ok()
            },
            (2, 0),
        ),
        (
            LoginRequest {
                data: b"InitiatorName\0".to_vec(),
                ..ok()
            },
            (2, 0),
        ),
        (
            LoginRequest {
                data: b"A=1\0A=1\0".to_vec(),
                ..ok()
            },
            (2, 0),
        ),
    ];
    for (request, want) in cases {
        let mut login = new_login();
        assert_eq!(fail(login.step(&request, &policy)), want, "{request:?}");
    }
    // Version-max 0 with version-min 0 is fine; a higher max is allowed too.
    let mut login = new_login();
    cont(login.step(
        &LoginRequest {
            version_max: 5,
            ..ok()
        },
        &policy,
    ));
}

#[test]
fn test_login_later_request_failures() {
    let policy = TestPolicy::default();
    let cases: Vec<(LoginRequest, LoginError)> = vec![
        (
            LoginRequest {
                isid: [0; 6],
                ..req(1, 3, true, &[])
            },
            LoginError::ChangedField("ISID"),
        ),
        (
            LoginRequest {
                tsih: 9,
                ..req(1, 3, true, &[])
            },
            LoginError::ChangedField("TSIH"),
        ),
        (
            LoginRequest {
                cid: 2,
                ..req(1, 3, true, &[])
            },
            LoginError::ChangedField("CID"),
        ),
        (
            req(0, 1, true, &[]),
            LoginError::StageMismatch {
                expected: 1,
                got: 0,
            },
        ),
        (
            req(1, 3, true, &[("MaxBurstLength", "65536")]),
            LoginError::Renegotiated("MaxBurstLength".into()),
        ),
        (
            req(1, 3, true, &[("X-foo", "1")]),
            LoginError::Renegotiated("X-foo".into()),
        ),
        (
            req(1, 3, true, &[("CHAP_A", "5")]),
            LoginError::SecurityKeyInOperationalStage("CHAP_A".into()),
        ),
        (
            req(1, 3, true, &[("InitiatorName", "iqn.other")]),
            LoginError::Redeclared("InitiatorName".into()),
        ),
        (
            req(1, 3, true, &[("TargetName", "iqn.other")]),
            LoginError::Redeclared("TargetName".into()),
        ),
        (
            req(1, 3, true, &[("SessionType", "Discovery")]),
            LoginError::Redeclared("SessionType".into()),
        ),
        (
            req(1, 3, true, &[("TargetAddress", "1.2.3.4")]),
            LoginError::TargetOnlyKey("TargetAddress".into()),
        ),
    ];
    for (request, want) in cases {
        let mut login = new_login();
        let first = req(
            0,
            1,
            true,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("MaxBurstLength", "262144"),
                ("X-foo", "2"),
            ],
        );
        let resp = cont(login.step(&first, &policy));
        assert_eq!(value(&resp, "X-foo").as_deref(), Some("NotUnderstood"));
        assert_eq!(fail(login.step(&request, &policy)).0, 0x02, "{want}");
        assert_eq!(login.error(), Some(&want));
    }
}

#[test]
fn test_login_repeated_names_with_same_values_are_accepted() {
    let policy = TestPolicy::default();
    let mut login = new_login();
    let first = req(
        0,
        1,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ],
    );
    cont(login.step(&first, &policy));
    let again = req(
        1,
        3,
        true,
        &[
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "late alias"),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ],
    );
    let (_, outcome) = done(login.step(&again, &policy));
    assert_eq!(outcome.initiator_alias.as_deref(), Some("late alias"));
}

#[test]
fn test_login_first_burst_above_max_burst_fails() {
    let mut keys = vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)];
    keys.extend([("MaxBurstLength", "65536"), ("FirstBurstLength", "131072")]);
    let mut login = new_login();
    assert_eq!(
        fail(login.step(&req(1, 3, true, &keys), &TestPolicy::default())),
        (2, 0)
    );
    assert_eq!(
        login.error(),
        Some(&LoginError::BurstLengths {
            first: 131_072,
            max: 65536
        })
    );
}

#[test]
fn test_login_request_continuation() {
    let policy = TestPolicy::default();
    let mut login = new_login();
    let full = text::encode(&libiscsi_normal_first());
    let cut = [10, 200, full.len()];
    let mut start = 0;
    for (i, end) in cut.iter().enumerate() {
        let last = i == cut.len() - 1;
        let mut request = req(1, 3, last, &[]);
        request.cont = !last;
        request.data = full[start..*end].to_vec();
        start = *end;
        let step = login.step(&request, &policy);
        if last {
            let (resp, _) = done(step);
            assert_eq!(value(&resp, "TargetPortalGroupTag").as_deref(), Some("7"));
        } else {
            let resp = cont(step);
            assert!(!resp.transit && !resp.cont && resp.data.is_empty());
            assert_eq!(resp.csg, 1);
        }
    }
}

#[test]
fn test_login_response_continuation() {
    let policy = TestPolicy::default();
    let mut login = new_login();
    // 600 vendor keys: both the request and the NotUnderstood answers exceed 8192 bytes.
    let names: Vec<String> = (0..600)
        .map(|i| format!("X-com.example.key{i:04}"))
        .collect();
    let mut keys: Vec<(&str, &str)> = vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)];
    keys.extend(names.iter().map(|n| (n.as_str(), "1")));
    let full = text::encode(&keys);
    assert!(full.len() > LOGIN_MAX_DATA_SEGMENT);
    let mut parts = full.chunks(LOGIN_MAX_DATA_SEGMENT).peekable();
    let mut step = None;
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        let mut request = req(1, 3, last, &[]);
        request.cont = !last;
        request.data = part.to_vec();
        let s = login.step(&request, &policy);
        if !last {
            assert!(cont(s).data.is_empty());
        } else {
            step = Some(s);
        }
    }
    let mut answer = Vec::new();
    let mut step = step.unwrap();
    let mut parts = 0;
    let outcome = loop {
        parts += 1;
        match step {
            Step::Continue(resp) => {
                assert!(resp.cont && !resp.transit);
                assert!(resp.data.len() <= LOGIN_MAX_DATA_SEGMENT);
                answer.extend(resp.data);
                // Text with the data of the initiator is refused while the target is sending.
                step = login.step(&req(1, 3, false, &[]), &policy);
            }
            Step::Done { response, outcome } => {
                answer.extend(response.data);
                break outcome;
            }
            Step::Fail(resp) => panic!("failed: {resp:?}"),
        }
    };
    assert!(parts > 1);
    let answer = text::parse(&answer).unwrap();
    assert_eq!(answer.len(), 602);
    assert_eq!(
        answer[1],
        (
            "X-com.example.key0000".to_string(),
            "NotUnderstood".to_string()
        )
    );
    assert_eq!(outcome.target_name.as_deref(), Some(TARGET));

    let mut login = new_login();
    let mut request = req(1, 3, false, &[]);
    request.data = full;
    let resp = cont(login.step(&request, &policy));
    assert!(resp.cont);
    let step = login.step(&req(1, 3, false, &[("X-late", "1")]), &policy);
    assert_eq!(fail(step), (2, 0));
    assert_eq!(login.error(), Some(&LoginError::UnexpectedText));
}

#[test]
fn test_login_text_limit() {
    let limits = Limits {
        max_text_length: 9000,
        ..Limits::default()
    };
    let mut login = new_login_with(limits);
    let mut request = req(1, 3, false, &[]);
    request.cont = true;
    request.data = vec![b'a'; 8192];
    cont(login.step(&request, &TestPolicy::default()));
    let step = login.step(&request, &TestPolicy::default());
    assert_eq!(fail(step), (2, 0));
    assert!(matches!(
        login.error(),
        Some(LoginError::Text(TextError::TooLong { .. }))
    ));
}

#[test]
fn test_login_target_offers_keys_it_cannot_default() {
    let limits = Limits {
        immediate_data: false,
        max_burst_length: 65536,
        ..Limits::default()
    };
    let policy = TestPolicy::default();
    let first = [
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("FirstBurstLength", "8192"),
    ];

    // The initiator answers the offers.
    let mut login = new_login_with(limits.clone());
    let resp = cont(login.step(&req(1, 3, true, &first), &policy));
    assert!(!resp.transit, "offers are outstanding");
    assert_eq!(
        texts(&resp),
        pairs(&[
            ("TargetPortalGroupTag", "7"),
            ("FirstBurstLength", "8192"),
            ("ImmediateData", "No"),
            ("MaxBurstLength", "65536"),
            ("MaxRecvDataSegmentLength", "262144"),
        ])
    );
    let answers = req(
        1,
        3,
        true,
        &[("ImmediateData", "No"), ("MaxBurstLength", "32768")],
    );
    let (resp, outcome) = done(login.step(&answers, &policy));
    assert!(resp.data.is_empty());
    assert!(!outcome.params.immediate_data);
    assert_eq!(outcome.params.max_burst_length, 32768);
    assert_eq!(outcome.params.first_burst_length, 8192);

    // open-iscsi takes the offers without answering.
    let mut login = new_login_with(limits);
    cont(login.step(&req(1, 3, true, &first), &policy));
    let (_, outcome) = done(login.step(&req(1, 3, true, &[]), &policy));
    assert!(!outcome.params.immediate_data);
    assert_eq!(outcome.params.max_burst_length, 65536);
}

#[test]
fn test_login_fail_helper_and_redirect() {
    let mut login = new_login();
    let request = LoginRequest {
        tsih: 3,
        ..req(0, 1, true, &[])
    };
    assert_eq!(
        fail(login.fail(&request, LoginError::SessionDoesNotExist)),
        (2, 0x0a)
    );
    assert!(login.is_finished());
    assert_eq!(
        fail(login.step(&request, &TestPolicy::default())),
        (2, 0x0a)
    );

    let resp = redirect(0, "10.0.0.2:3260,2", false);
    assert_eq!((resp.status_class, resp.status_detail), (1, 1));
    assert_eq!(texts(&resp), pairs(&[("TargetAddress", "10.0.0.2:3260,2")]));
    assert_eq!(redirect(0, "x", true).status_detail, 2);
}

#[test]
fn test_login_error_status_mapping() {
    let cases: &[(LoginError, (u8, u8))] = &[
        (LoginError::Text(TextError::NotUtf8), (2, 0)),
        (LoginError::ChapWrongResponse, (2, 1)),
        (
            LoginError::NotAuthorized {
                initiator: "i".into(),
                target: "t".into(),
            },
            (2, 2),
        ),
        (LoginError::TargetNotFound("t".into()), (2, 3)),
        (LoginError::UnsupportedVersion { min: 1, max: 1 }, (2, 5)),
        (LoginError::TooManyConnections, (2, 6)),
        (LoginError::MissingInitiatorName, (2, 7)),
        (LoginError::MissingTargetName, (2, 7)),
        (LoginError::CannotIncludeInSession, (2, 8)),
        (LoginError::UnsupportedSessionType("x".into()), (2, 9)),
        (LoginError::SessionDoesNotExist, (2, 0x0a)),
        (LoginError::AlreadyComplete, (2, 0x0b)),
        (LoginError::RandomUnavailable, (3, 0)),
        (LoginError::ServiceUnavailable, (3, 1)),
        (LoginError::OutOfResources, (3, 2)),
    ];
    for (err, want) in cases {
        assert_eq!(err.status(), *want, "{err}");
        let fault = if want.0 == 3 {
            Fault::Target
        } else {
            Fault::Initiator
        };
        assert_eq!(err.fault(), fault);
    }
}

#[test]
fn test_login_too_many_requests() {
    let policy = TestPolicy::default();
    let mut login = new_login();
    cont(login.step(
        &req(
            0,
            1,
            false,
            &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
        ),
        &policy,
    ));
    for _ in 1..MAX_LOGIN_REQUESTS {
        cont(login.step(&req(0, 1, false, &[]), &policy));
    }
    assert_eq!(fail(login.step(&req(0, 1, false, &[]), &policy)), (2, 0));
    assert_eq!(login.error(), Some(&LoginError::TooManyRequests));
}

#[test]
fn test_chap_secrets_debug_hides_secrets() {
    let shown = format!("{:?}", secrets(true));
    assert!(shown.contains("alice"));
    assert!(!shown.contains("initiator-secret"));
    assert!(!shown.contains("target-secret"));
}

#[test]
fn test_limits_normalized_into_rfc_ranges() {
    let limits = Limits {
        max_recv_data_segment_length: 1,
        max_burst_length: u32::MAX,
        first_burst_length: u32::MAX,
        max_outstanding_r2t: 0,
        default_time2wait: 99_999,
        default_time2retain: 99_999,
        max_text_length: 0,
        ..Limits::default()
    }
    .normalized();
    assert_eq!(limits.max_recv_data_segment_length, 512);
    assert_eq!(limits.max_burst_length, (1 << 24) - 1);
    assert_eq!(limits.first_burst_length, (1 << 24) - 1);
    assert_eq!(limits.max_outstanding_r2t, 1);
    assert_eq!(
        (limits.default_time2wait, limits.default_time2retain),
        (3600, 3600)
    );
    assert_eq!(limits.max_text_length, LOGIN_MAX_DATA_SEGMENT);
    assert_eq!(Limits::default().normalized(), Limits::default());
}

/// Keys and values real initiators send, plus malformed ones, for random texts.
fn arb_pair() -> impl Strategy<Value = (String, String)> {
    let keys = prop::sample::select(vec![
        "InitiatorName",
        "TargetName",
        "SessionType",
        "InitiatorAlias",
        "AuthMethod",
        "CHAP_A",
        "CHAP_N",
        "CHAP_R",
        "CHAP_I",
        "CHAP_C",
        "HeaderDigest",
        "DataDigest",
        "MaxRecvDataSegmentLength",
        "MaxBurstLength",
        "FirstBurstLength",
        "ImmediateData",
        "InitialR2T",
        "MaxOutstandingR2T",
        "MaxConnections",
        "ErrorRecoveryLevel",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "OFMarkInt",
        "TaskReporting",
        "X-vendor",
        "TargetAddress",
    ]);
    let values = prop::sample::select(vec![
        INITIATOR,
        TARGET,
        "Normal",
        "Discovery",
        "CHAP,None",
        "None",
        "CHAP",
        "5",
        "alice",
        "0x00112233445566778899aabbccddeeff",
        "0b",
        "CRC32C,None",
        "512",
        "65536",
        "16777215",
        "0",
        "Yes",
        "No",
        "Reject",
        "",
    ]);
    (keys, values).prop_map(|(k, v)| (k.to_string(), v.to_string()))
}

fn arb_request() -> impl Strategy<Value = LoginRequest> {
    (
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        0u8..4,
        0u8..2,
        prop::collection::vec(arb_pair(), 0..8),
        prop::collection::vec(any::<u8>(), 0..40),
        0u8..8,
    )
        .prop_map(
            |(transit, cont, csg, nsg, version_min, pairs, noise, mode)| {
                let data = match mode {
                    0 => noise,
                    1 => Vec::new(),
                    _ => text::encode(&pairs),
                };
                LoginRequest {
                    transit,
                    cont,
                    csg,
                    nsg,
                    version_min,
                    isid: ISID,
                    data,
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #[test]
    fn test_login_random_requests_never_panic(
        requests in prop::collection::vec(arb_request(), 1..12),
        chap in any::<bool>(),
        mutual in any::<bool>(),
    ) {
        let policy = TestPolicy { chap: chap.then(|| secrets(mutual)), ..Default::default() };
        let mut login = new_login();
        let mut finished = false;
        for request in &requests {
            let step = login.step(request, &policy);
            if finished {
                prop_assert!(matches!(step, Step::Fail(_)));
            }
            match step {
                Step::Done { response, outcome } => {
                    prop_assert!(response.transit && response.nsg == 3);
                    let p = &outcome.params;
                    prop_assert!(p.first_burst_length <= p.max_burst_length);
                    prop_assert!((512..1 << 24).contains(&p.max_xmit_data_segment_length));
                    prop_assert_eq!(p.max_connections, 1);
                    prop_assert_eq!(p.error_recovery_level, 0);
                    if chap {
                        prop_assert!(outcome.chap_user.is_some());
                    }
                    finished = true;
                }
                Step::Fail(response) => {
                    prop_assert!(response.status_class == 2 || response.status_class == 3);
                    finished = true;
                }
                Step::Continue(response) => {
                    prop_assert_eq!(response.status_class, 0);
                    prop_assert!(response.data.len() <= LOGIN_MAX_DATA_SEGMENT);
                    prop_assert!(!(response.transit && response.cont));
                }
            }
        }
    }

    #[test]
    fn test_login_random_operational_texts_never_panic(pairs in prop::collection::vec(arb_pair(), 0..20)) {
        let mut keys = vec![("InitiatorName".to_string(), INITIATOR.to_string()), ("TargetName".to_string(), TARGET.to_string())];
        keys.extend(pairs);
        let mut request = req(1, 3, true, &[]);
        request.data = text::encode(&keys);
        let mut login = new_login();
        let _ = login.step(&request, &TestPolicy::default());
    }
}
