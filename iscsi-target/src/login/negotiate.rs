//! Operational key negotiation (RFC 7143 6.2 and 13): the initiator offers, the target
//! answers with the result of each key's function over both sides' values.
//!
//! | key | range | result | discovery |
//! | --- | --- | --- | --- |
//! | HeaderDigest, DataDigest | CRC32C, None | first of the initiator's list we accept | relevant |
//! | MaxConnections | 1..=65535 | minimum (we support 1) | Irrelevant |
//! | InitialR2T | Yes, No | OR | Irrelevant |
//! | ImmediateData | Yes, No | AND | Irrelevant |
//! | MaxRecvDataSegmentLength | 512..=2^24-1 | declared by each side, no answer | relevant |
//! | MaxBurstLength, FirstBurstLength | 512..=2^24-1 | minimum; first <= max | Irrelevant |
//! | DefaultTime2Wait | 0..=3600 | maximum | relevant |
//! | DefaultTime2Retain | 0..=3600 | minimum | relevant |
//! | MaxOutstandingR2T | 1..=65535 | minimum | Irrelevant |
//! | DataPDUInOrder, DataSequenceInOrder | Yes, No | OR (we want Yes) | Irrelevant |
//! | ErrorRecoveryLevel | 0..=2 | minimum (we support 0) | relevant |
//! | TaskReporting | list | RFC3720 if offered | Irrelevant |
//! | iSCSIProtocolLevel | 0..=31 | minimum (we implement 1, RFC 7143) | relevant |
//! | IFMarker, OFMarker | Yes, No | No (obsolete; RFC 7143 allows No, which RFC 3720 initiators expect) | relevant |
//! | IFMarkInt, OFMarkInt | | Reject (obsolete; RFC 7143 requires Reject) | relevant |
//! | RDMAExtensions | Yes, No | No (iSCSI over TCP only) | relevant |
//!
//! Values out of range or of the wrong form are answered `Reject` and the key keeps its
//! default; unknown keys, `X-` and `X#` extensions included, are answered `NotUnderstood`.

use std::collections::HashSet;

use super::{Limits, LoginError, MAX_SEGMENT, Params, SessionType};
use crate::text::{self, IRRELEVANT, NOT_UNDERSTOOD, REJECT};

/// The iSCSIProtocolLevel the target implements: 1, RFC 7143 (RFC 7144 section 2).
const PROTOCOL_LEVEL: u64 = 1;

/// An operational key the target knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Key {
    HeaderDigest,
    DataDigest,
    MaxConnections,
    InitialR2T,
    ImmediateData,
    MaxRecvDataSegmentLength,
    MaxBurstLength,
    FirstBurstLength,
    DefaultTime2Wait,
    DefaultTime2Retain,
    MaxOutstandingR2T,
    DataPduInOrder,
    DataSequenceInOrder,
    ErrorRecoveryLevel,
    TaskReporting,
    ProtocolLevel,
    IfMarker,
    OfMarker,
    IfMarkInt,
    OfMarkInt,
    RdmaExtensions,
    /// InitiatorRecvDataSegmentLength and TargetRecvDataSegmentLength: iSER only.
    IserRecvLength,
    /// SendTargets: a full feature phase key, meaningless during login.
    SendTargets,
}

/// What kind of key a request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// InitiatorName, InitiatorAlias, TargetName, SessionType: read from the first request.
    Login,
    /// Keys only a target sends.
    TargetOnly,
    /// Authentication keys, allowed in the security stage only.
    Security,
    /// An operational key.
    Operational(Key),
    /// Anything else: answered NotUnderstood.
    Unknown,
}

/// Classifies a key name.
pub(super) fn classify(key: &str) -> Class {
    use Key::*;
    let operational = match key {
        "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => return Class::Login,
        "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => return Class::TargetOnly,
        "AuthMethod" => return Class::Security,
        _ if ["CHAP_", "SRP_", "KRB_", "SPKM_"]
            .iter()
            .any(|p| key.starts_with(p)) =>
        {
            return Class::Security;
        }
        "HeaderDigest" => HeaderDigest,
        "DataDigest" => DataDigest,
        "MaxConnections" => MaxConnections,
        "InitialR2T" => InitialR2T,
        "ImmediateData" => ImmediateData,
        "MaxRecvDataSegmentLength" => MaxRecvDataSegmentLength,
        "MaxBurstLength" => MaxBurstLength,
        "FirstBurstLength" => FirstBurstLength,
        "DefaultTime2Wait" => DefaultTime2Wait,
        "DefaultTime2Retain" => DefaultTime2Retain,
        "MaxOutstandingR2T" => MaxOutstandingR2T,
        "DataPDUInOrder" => DataPduInOrder,
        "DataSequenceInOrder" => DataSequenceInOrder,
        "ErrorRecoveryLevel" => ErrorRecoveryLevel,
        "TaskReporting" => TaskReporting,
        "iSCSIProtocolLevel" => ProtocolLevel,
        "IFMarker" => IfMarker,
        "OFMarker" => OfMarker,
        "IFMarkInt" => IfMarkInt,
        "OFMarkInt" => OfMarkInt,
        "RDMAExtensions" => RdmaExtensions,
        "InitiatorRecvDataSegmentLength" | "TargetRecvDataSegmentLength" => IserRecvLength,
        "SendTargets" => SendTargets,
        _ => return Class::Unknown,
    };
    Class::Operational(operational)
}

/// The operational negotiation of one login.
#[derive(Clone, Debug)]
pub(super) struct Negotiator {
    session_type: SessionType,
    limits: Limits,
    params: Params,
    /// Keys settled by an initiator offer or a target offer.
    negotiated: HashSet<Key>,
    /// Target offers the initiator has not answered yet, with the offered value.
    awaiting: Vec<(Key, u32)>,
    /// The MaxBurstLength the initiator offered, to check its FirstBurstLength against.
    offered_max_burst: Option<u32>,
    /// Whether FirstBurstLength has a result, which a later MaxBurstLength may not undercut.
    first_burst_settled: bool,
}

impl Negotiator {
    pub(super) fn new(session_type: SessionType, limits: Limits) -> Negotiator {
        let params = Params {
            max_recv_data_segment_length: limits.max_recv_data_segment_length,
            ..Params::default()
        };
        Negotiator {
            session_type,
            limits,
            params,
            negotiated: HashSet::new(),
            awaiting: Vec::new(),
            offered_max_burst: None,
            first_burst_settled: false,
        }
    }

    /// The values as negotiated so far.
    pub(super) fn params(&self) -> &Params {
        &self.params
    }

    /// Whether `key` answers an offer of the target's (and so may arrive although the key
    /// was negotiated).
    pub(super) fn awaits_answer(&self, key: &str) -> bool {
        match classify(key) {
            Class::Operational(k) => self.awaiting.iter().any(|(a, _)| *a == k),
            _ => false,
        }
    }

    /// Negotiates the operational and unknown keys of one request, appending the answers
    /// to `out` in the order of the request.
    pub(super) fn negotiate(
        &mut self,
        pairs: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginError> {
        // FirstBurstLength is bounded by the MaxBurstLength result, so it is answered after
        // every other key of the request; its place in the response is kept.
        let mut first_burst = None;
        for (name, value) in pairs {
            let Class::Operational(key) = classify(name) else {
                out.push((name.clone(), NOT_UNDERSTOOD.into()));
                continue;
            };
            if let Some(i) = self.awaiting.iter().position(|(k, _)| *k == key) {
                let (_, offered) = self.awaiting.remove(i);
                self.take_answer(key, name, value, offered)?;
                continue;
            }
            self.negotiated.insert(key);
            if key == Key::FirstBurstLength {
                first_burst = Some((out.len(), value));
                out.push((name.clone(), String::new()));
                continue;
            }
            if let Some(answer) = self.answer(key, name, value)? {
                out.push((name.clone(), answer));
            }
        }
        if let Some((slot, value)) = first_burst {
            let answer = self.answer(Key::FirstBurstLength, "FirstBurstLength", value)?;
            if let (Some(answer), Some(entry)) = (answer, out.get_mut(slot)) {
                entry.1 = answer;
            }
        }
        Ok(())
    }

    /// The answer to an initiator offer, `None` for a declaration.
    fn answer(&mut self, key: Key, name: &str, value: &str) -> Result<Option<String>, LoginError> {
        use Key::*;
        let discovery = self.session_type == SessionType::Discovery;
        let irrelevant_in_discovery = matches!(
            key,
            MaxConnections
                | InitialR2T
                | ImmediateData
                | MaxBurstLength
                | FirstBurstLength
                | MaxOutstandingR2T
                | DataPduInOrder
                | DataSequenceInOrder
                | TaskReporting
        );
        if discovery && irrelevant_in_discovery {
            return Ok(Some(IRRELEVANT.into()));
        }
        let limits = &self.limits;
        let params = &mut self.params;
        let answer = match key {
            HeaderDigest => digest(value, limits.header_digest, &mut params.header_digest),
            DataDigest => digest(value, limits.data_digest, &mut params.data_digest),
            MaxRecvDataSegmentLength => {
                // A declaration: no answer. A length outside the range cannot be honoured.
                let length = number(value, 512, MAX_SEGMENT.into()).ok_or_else(|| {
                    LoginError::InvalidDeclaration {
                        key: name.into(),
                        value: value.into(),
                    }
                })?;
                params.max_xmit_data_segment_length = narrow(length);
                return Ok(None);
            }
            MaxBurstLength => match number(value, 512, MAX_SEGMENT.into()) {
                Some(offer) => {
                    let offer = narrow(offer);
                    // A FirstBurstLength settled in an earlier request bounds this one.
                    if self.first_burst_settled && offer < params.first_burst_length {
                        return Err(LoginError::BurstLengths {
                            first: params.first_burst_length,
                            max: offer,
                        });
                    }
                    self.offered_max_burst = Some(offer);
                    params.max_burst_length = offer.min(limits.max_burst_length);
                    Some(params.max_burst_length.to_string())
                }
                None => None,
            },
            FirstBurstLength => match number(value, 512, MAX_SEGMENT.into()) {
                Some(offer) => {
                    let offer = narrow(offer);
                    if let Some(max) = self.offered_max_burst.filter(|&max| offer > max) {
                        return Err(LoginError::BurstLengths { first: offer, max });
                    }
                    params.first_burst_length = offer
                        .min(limits.first_burst_length)
                        .min(params.max_burst_length);
                    self.first_burst_settled = true;
                    Some(params.first_burst_length.to_string())
                }
                None => None,
            },
            MaxConnections => number(value, 1, 65535).map(|_| {
                params.max_connections = 1;
                "1".into()
            }),
            InitialR2T => boolean(value).map(|offer| {
                params.initial_r2t = offer || limits.initial_r2t;
                text::bool_str(params.initial_r2t).into()
            }),
            ImmediateData => boolean(value).map(|offer| {
                params.immediate_data = offer && limits.immediate_data;
                text::bool_str(params.immediate_data).into()
            }),
            DefaultTime2Wait => number(value, 0, 3600).map(|offer| {
                params.default_time2wait = narrow(offer).max(limits.default_time2wait);
                params.default_time2wait.to_string()
            }),
            DefaultTime2Retain => number(value, 0, 3600).map(|offer| {
                params.default_time2retain = narrow(offer).min(limits.default_time2retain);
                params.default_time2retain.to_string()
            }),
            MaxOutstandingR2T => number(value, 1, 65535).map(|offer| {
                params.max_outstanding_r2t = narrow(offer).min(limits.max_outstanding_r2t);
                params.max_outstanding_r2t.to_string()
            }),
            // The target needs data in order: its value is Yes, so the OR is Yes.
            DataPduInOrder => boolean(value).map(|_| {
                params.data_pdu_in_order = true;
                "Yes".into()
            }),
            DataSequenceInOrder => boolean(value).map(|_| {
                params.data_sequence_in_order = true;
                "Yes".into()
            }),
            ErrorRecoveryLevel => number(value, 0, 2).map(|_| {
                params.error_recovery_level = 0;
                "0".into()
            }),
            TaskReporting => text::list(value)
                .any(|v| v == "RFC3720")
                .then(|| "RFC3720".into()),
            ProtocolLevel => {
                number(value, 0, 31).map(|offer| offer.min(PROTOCOL_LEVEL).to_string())
            }
            IfMarker | OfMarker | RdmaExtensions => boolean(value).map(|_| "No".into()),
            IfMarkInt | OfMarkInt => None,
            IserRecvLength | SendTargets => Some(IRRELEVANT.into()),
        };
        Ok(Some(answer.unwrap_or_else(|| REJECT.into())))
    }

    /// Takes the initiator's answer to a target offer.
    fn take_answer(
        &mut self,
        key: Key,
        name: &str,
        value: &str,
        offered: u32,
    ) -> Result<(), LoginError> {
        if [REJECT, IRRELEVANT, NOT_UNDERSTOOD].contains(&value) {
            return Err(LoginError::OfferRefused(name.into()));
        }
        let invalid = || LoginError::InvalidAnswer {
            key: name.into(),
            value: value.into(),
        };
        match key {
            Key::ImmediateData => {
                text::parse_bool(value).map_err(|_| invalid())?;
                self.params.immediate_data = false;
            }
            Key::MaxBurstLength => {
                let answer = number(value, 512, offered.into()).ok_or_else(invalid)?;
                self.params.max_burst_length = narrow(answer);
                self.params.first_burst_length = self
                    .params
                    .first_burst_length
                    .min(self.params.max_burst_length);
            }
            Key::FirstBurstLength => {
                let answer = number(value, 512, offered.into()).ok_or_else(invalid)?;
                self.params.first_burst_length = narrow(answer).min(self.params.max_burst_length);
            }
            _ => return Err(invalid()),
        }
        Ok(())
    }

    /// Before the full feature phase of a normal session: offers the keys the initiator did
    /// not negotiate whose default the target cannot accept, and says whether it offered any.
    /// The offered value holds unless the initiator answers lower (open-iscsi takes a target
    /// offer without answering it).
    pub(super) fn offer_missing(&mut self, out: &mut Vec<(String, String)>) -> bool {
        if self.session_type == SessionType::Discovery {
            return false;
        }
        let defaults = Params::default();
        let mut offered = false;
        if !self.negotiated.contains(&Key::ImmediateData) && !self.limits.immediate_data {
            self.params.immediate_data = false;
            self.offer(Key::ImmediateData, "ImmediateData", 0, "No".into(), out);
            offered = true;
        }
        if !self.negotiated.contains(&Key::MaxBurstLength)
            && defaults.max_burst_length > self.limits.max_burst_length
        {
            let value = self.limits.max_burst_length;
            self.params.max_burst_length = value;
            self.offer(
                Key::MaxBurstLength,
                "MaxBurstLength",
                value,
                value.to_string(),
                out,
            );
            offered = true;
        }
        let first_cap = self
            .limits
            .first_burst_length
            .min(self.params.max_burst_length);
        if !self.negotiated.contains(&Key::FirstBurstLength)
            && self.params.first_burst_length > first_cap
        {
            self.params.first_burst_length = first_cap;
            self.first_burst_settled = true;
            self.offer(
                Key::FirstBurstLength,
                "FirstBurstLength",
                first_cap,
                first_cap.to_string(),
                out,
            );
            offered = true;
        }
        offered
    }

    fn offer(
        &mut self,
        key: Key,
        name: &str,
        value: u32,
        text: String,
        out: &mut Vec<(String, String)>,
    ) {
        self.negotiated.insert(key);
        self.awaiting.push((key, value));
        out.push((name.into(), text));
    }
}

/// Picks the first digest of the initiator's list the target accepts.
fn digest(offer: &str, crc32c_allowed: bool, result: &mut bool) -> Option<String> {
    let choice = text::list(offer).find(|d| *d == "None" || (*d == "CRC32C" && crc32c_allowed))?;
    *result = choice == "CRC32C";
    Some(choice.into())
}

/// A number within `min..=max`.
fn number(value: &str, min: u64, max: u64) -> Option<u64> {
    text::parse_number(value)
        .ok()
        .filter(|n| (min..=max).contains(n))
}

fn boolean(value: &str) -> Option<bool> {
    text::parse_bool(value).ok()
}

/// A number already checked to be at most 2^24-1.
fn narrow(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal() -> Negotiator {
        Negotiator::new(SessionType::Normal, Limits::default().normalized())
    }

    fn answers(
        n: &mut Negotiator,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<(String, String)>, LoginError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut out = Vec::new();
        n.negotiate(&pairs, &mut out)?;
        Ok(out)
    }

    fn answer_of(session: SessionType, limits: Limits, key: &str, value: &str) -> Option<String> {
        let mut n = Negotiator::new(session, limits.normalized());
        answers(&mut n, &[(key, value)])
            .unwrap()
            .pop()
            .map(|(_, v)| v)
    }

    /// One row per rule: key, offered value, expected answer, for a normal session with the
    /// default limits.
    #[test]
    fn test_negotiate_table_of_rules() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("HeaderDigest", "None,CRC32C", Some("None")),
            ("HeaderDigest", "CRC32C,None", Some("CRC32C")),
            ("HeaderDigest", "X-vendor,CRC32C", Some("CRC32C")),
            ("HeaderDigest", "MD5", Some("Reject")),
            ("DataDigest", "CRC32C", Some("CRC32C")),
            ("DataDigest", "None", Some("None")),
            ("MaxConnections", "1", Some("1")),
            ("MaxConnections", "8", Some("1")),
            ("MaxConnections", "0", Some("Reject")),
            ("MaxConnections", "65536", Some("Reject")),
            ("InitialR2T", "Yes", Some("Yes")),
            ("InitialR2T", "No", Some("No")),
            ("InitialR2T", "yes", Some("Reject")),
            ("ImmediateData", "Yes", Some("Yes")),
            ("ImmediateData", "No", Some("No")),
            ("MaxRecvDataSegmentLength", "512", None),
            ("MaxRecvDataSegmentLength", "16777215", None),
            ("MaxRecvDataSegmentLength", "0x40000", None),
            ("MaxBurstLength", "262144", Some("262144")),
            ("MaxBurstLength", "16777215", Some("16776192")),
            ("MaxBurstLength", "512", Some("512")),
            ("MaxBurstLength", "511", Some("Reject")),
            ("MaxBurstLength", "16777216", Some("Reject")),
            ("FirstBurstLength", "65536", Some("65536")),
            ("FirstBurstLength", "1048576", Some("262144")),
            ("FirstBurstLength", "100", Some("Reject")),
            ("DefaultTime2Wait", "0", Some("2")),
            ("DefaultTime2Wait", "10", Some("10")),
            ("DefaultTime2Wait", "3601", Some("Reject")),
            ("DefaultTime2Retain", "20", Some("0")),
            ("DefaultTime2Retain", "3601", Some("Reject")),
            ("MaxOutstandingR2T", "1", Some("1")),
            ("MaxOutstandingR2T", "64", Some("16")),
            ("MaxOutstandingR2T", "0", Some("Reject")),
            ("DataPDUInOrder", "No", Some("Yes")),
            ("DataPDUInOrder", "Yes", Some("Yes")),
            ("DataSequenceInOrder", "No", Some("Yes")),
            ("DataSequenceInOrder", "Maybe", Some("Reject")),
            ("ErrorRecoveryLevel", "2", Some("0")),
            ("ErrorRecoveryLevel", "0", Some("0")),
            ("ErrorRecoveryLevel", "3", Some("Reject")),
            ("TaskReporting", "ResponseFence,RFC3720", Some("RFC3720")),
            ("TaskReporting", "FastAbort", Some("Reject")),
            ("iSCSIProtocolLevel", "2", Some("1")),
            ("iSCSIProtocolLevel", "0", Some("0")),
            ("iSCSIProtocolLevel", "32", Some("Reject")),
            ("IFMarker", "No", Some("No")),
            ("OFMarker", "Yes", Some("No")),
            ("IFMarker", "Irrelevant", Some("Reject")),
            ("OFMarkInt", "2048~65535", Some("Reject")),
            ("IFMarkInt", "2048~65535", Some("Reject")),
            ("RDMAExtensions", "Yes", Some("No")),
            (
                "InitiatorRecvDataSegmentLength",
                "262144",
                Some("Irrelevant"),
            ),
            ("SendTargets", "All", Some("Irrelevant")),
            ("X-com.example.Foo", "1", Some("NotUnderstood")),
            ("X#Vendor", "1", Some("NotUnderstood")),
            ("MadeUpKey", "1", Some("NotUnderstood")),
        ];
        for (key, value, want) in cases {
            let got = answer_of(SessionType::Normal, Limits::default(), key, value);
            assert_eq!(got.as_deref(), *want, "{key}={value}");
        }
    }

    #[test]
    fn test_negotiate_discovery_irrelevant_keys() {
        let irrelevant = [
            ("MaxConnections", "1"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxOutstandingR2T", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ];
        for (key, value) in irrelevant {
            let got = answer_of(SessionType::Discovery, Limits::default(), key, value);
            assert_eq!(got.as_deref(), Some("Irrelevant"), "{key}");
        }
        let relevant = [
            ("HeaderDigest", "None", "None"),
            ("DefaultTime2Wait", "2", "2"),
            ("DefaultTime2Retain", "0", "0"),
            ("ErrorRecoveryLevel", "0", "0"),
        ];
        for (key, value, want) in relevant {
            let got = answer_of(SessionType::Discovery, Limits::default(), key, value);
            assert_eq!(got.as_deref(), Some(want), "{key}");
        }
    }

    #[test]
    fn test_negotiate_limits_shape_results() {
        let limits = Limits {
            immediate_data: false,
            initial_r2t: true,
            header_digest: false,
            max_outstanding_r2t: 4,
            default_time2wait: 5,
            ..Limits::default()
        };
        let cases = [
            ("ImmediateData", "Yes", "No"),
            ("InitialR2T", "No", "Yes"),
            ("HeaderDigest", "CRC32C,None", "None"),
            ("HeaderDigest", "CRC32C", "Reject"),
            ("MaxOutstandingR2T", "8", "4"),
            ("DefaultTime2Wait", "2", "5"),
        ];
        for (key, value, want) in cases {
            let got = answer_of(SessionType::Normal, limits.clone(), key, value);
            assert_eq!(got.as_deref(), Some(want), "{key}={value}");
        }
    }

    #[test]
    fn test_negotiate_params_follow_answers() {
        let mut n = normal();
        answers(
            &mut n,
            &[
                ("HeaderDigest", "CRC32C"),
                ("DataDigest", "None,CRC32C"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "131072"),
                ("MaxOutstandingR2T", "2"),
                ("DefaultTime2Wait", "3"),
                ("DefaultTime2Retain", "0"),
            ],
        )
        .unwrap();
        let p = n.params();
        assert!(p.header_digest);
        assert!(!p.data_digest);
        assert_eq!(p.max_recv_data_segment_length, 256 * 1024);
        assert_eq!(p.max_xmit_data_segment_length, 65536);
        assert!(!p.initial_r2t);
        assert!(p.immediate_data);
        assert_eq!(p.max_burst_length, 1_048_576);
        assert_eq!(p.first_burst_length, 131_072);
        assert_eq!(p.max_outstanding_r2t, 2);
        assert_eq!(p.default_time2wait, 3);
        assert_eq!(p.default_time2retain, 0);
        assert_eq!(p.error_recovery_level, 0);
        assert_eq!(p.max_connections, 1);
    }

    #[test]
    fn test_negotiate_first_burst_bounded_by_max_burst_in_any_order() {
        let mut n = normal();
        let out = answers(
            &mut n,
            &[("FirstBurstLength", "65536"), ("MaxBurstLength", "16384")],
        );
        assert_eq!(
            out,
            Err(LoginError::BurstLengths {
                first: 65536,
                max: 16384
            })
        );

        let limits = Limits {
            max_burst_length: 8192,
            ..Limits::default()
        };
        let mut n = Negotiator::new(SessionType::Normal, limits.normalized());
        let out = answers(
            &mut n,
            &[("FirstBurstLength", "65536"), ("MaxBurstLength", "65536")],
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                ("FirstBurstLength".to_string(), "8192".to_string()),
                ("MaxBurstLength".to_string(), "8192".to_string())
            ]
        );
    }

    #[test]
    fn test_negotiate_invalid_declaration_fails() {
        for value in ["511", "16777216", "lots", ""] {
            let mut n = normal();
            let got = answers(&mut n, &[("MaxRecvDataSegmentLength", value)]);
            assert!(
                matches!(got, Err(LoginError::InvalidDeclaration { .. })),
                "{value}"
            );
        }
    }

    #[test]
    fn test_offer_missing_offers_only_what_defaults_break() {
        let mut n = normal();
        let mut out = Vec::new();
        assert!(!n.offer_missing(&mut out));
        assert!(out.is_empty());

        let limits = Limits {
            immediate_data: false,
            max_burst_length: 65536,
            first_burst_length: 16384,
            ..Limits::default()
        };
        let mut n = Negotiator::new(SessionType::Normal, limits.normalized());
        assert!(n.offer_missing(&mut out));
        assert_eq!(
            out,
            vec![
                ("ImmediateData".to_string(), "No".to_string()),
                ("MaxBurstLength".to_string(), "65536".to_string()),
                ("FirstBurstLength".to_string(), "16384".to_string()),
            ]
        );
        assert!(n.awaits_answer("MaxBurstLength"));
        answers(
            &mut n,
            &[("MaxBurstLength", "32768"), ("ImmediateData", "No")],
        )
        .unwrap();
        assert!(!n.awaits_answer("MaxBurstLength"));
        assert_eq!(n.params().max_burst_length, 32768);
        assert!(!n.params().immediate_data);
        assert_eq!(n.params().first_burst_length, 16384);
        let refused = answers(&mut n, &[("FirstBurstLength", "Reject")]);
        assert_eq!(
            refused,
            Err(LoginError::OfferRefused("FirstBurstLength".into()))
        );

        let mut discovery = Negotiator::new(SessionType::Discovery, limits.normalized());
        assert!(!discovery.offer_missing(&mut Vec::new()));
    }

    #[test]
    fn test_offer_answer_above_offer_is_invalid() {
        let limits = Limits {
            max_burst_length: 65536,
            ..Limits::default()
        };
        let mut n = Negotiator::new(SessionType::Normal, limits.normalized());
        assert!(n.offer_missing(&mut Vec::new()));
        let got = answers(&mut n, &[("MaxBurstLength", "131072")]);
        assert!(matches!(got, Err(LoginError::InvalidAnswer { .. })));
    }

    #[test]
    fn test_classify_keys() {
        assert_eq!(classify("InitiatorName"), Class::Login);
        assert_eq!(classify("TargetPortalGroupTag"), Class::TargetOnly);
        assert_eq!(classify("CHAP_R"), Class::Security);
        assert_eq!(classify("SRP_U"), Class::Security);
        assert_eq!(classify("AuthMethod"), Class::Security);
        assert_eq!(
            classify("MaxBurstLength"),
            Class::Operational(Key::MaxBurstLength)
        );
        assert_eq!(classify("X-foo"), Class::Unknown);
    }
}
