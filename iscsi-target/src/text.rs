//! `key=value` text (RFC 7143 sections 6.1 and 13), as carried by Login and Text PDUs.
//!
//! A data segment holds `key=value` pairs, each followed by one NUL byte:
//!
//! ```text
//! InitiatorName=iqn.2005-03.org.example:host\0SessionType=Normal\0HeaderDigest=CRC32C,None\0
//! ```
//!
//! A text too long for one PDU is split over several, every PDU but the last with the C
//! (continue) bit set; the split may fall anywhere, even inside a key. [`Accumulator`] joins
//! the parts of a request, [`Outgoing`] cuts a response into parts no longer than the peer
//! accepts. [`parse`] checks the limits RFC 7143 sets (keys up to 63 bytes, values up to 255
//! bytes, or 8192 for the large binary values of authentication keys, UTF-8, no key twice)
//! and returns the pairs in order; the value helpers decode numbers (decimal or `0x` hex),
//! binary values (`0x` hex or `0b` base64), booleans (`Yes`/`No`) and lists.
//!
//! Nothing here panics on any input: every function over peer bytes returns a
//! [`TextError`] instead.

use std::collections::HashSet;

use thiserror::Error;

/// The longest key name, in bytes (RFC 7143 6.1).
pub const MAX_KEY_LEN: usize = 63;
/// The longest value of an ordinary key, in bytes (RFC 7143 6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// The longest value of a key carrying a large binary value (CHAP_C, CHAP_R and the other
/// authentication exchanges), in bytes of its encoded text.
pub const MAX_LARGE_VALUE_LEN: usize = 8192;
/// The longest text one negotiation step may carry across continuations, by default. RFC 7143
/// requires at least 8192 bytes; a few times that leaves room for vendor keys.
pub const DEFAULT_MAX_TEXT_LEN: usize = 64 * 1024;

/// The answer to an offer whose value is not acceptable.
pub const REJECT: &str = "Reject";
/// The answer to a key that does not apply to this session.
pub const IRRELEVANT: &str = "Irrelevant";
/// The answer to a key this implementation does not know.
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";

/// Why a text could not be parsed or a value decoded. Every variant is the peer's fault.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TextError {
    /// The text is not valid UTF-8.
    #[error("the text is not valid UTF-8")]
    NotUtf8,
    /// An entry between NUL delimiters has no `=`.
    #[error("an entry has no '=' between key and value")]
    MissingEquals,
    /// An entry starts with `=`.
    #[error("an entry has an empty key")]
    EmptyKey,
    /// A key name is longer than [`MAX_KEY_LEN`].
    #[error("a key is {0} bytes long, more than 63")]
    KeyTooLong(usize),
    /// A key name holds a character outside letters, digits and `.-+@_#`.
    #[error("key {0:?} holds a character not allowed in key names")]
    InvalidKey(String),
    /// A value is longer than its key allows.
    #[error("the value of {key} is {len} bytes long, more than {max}")]
    ValueTooLong {
        /// The key.
        key: String,
        /// The value's length.
        len: usize,
        /// The limit for this key.
        max: usize,
    },
    /// A key appears twice in one text.
    #[error("key {0} appears twice")]
    DuplicateKey(String),
    /// The text (with its continuations) is longer than the limit.
    #[error("the text is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// The text's length so far.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value is not a decimal or `0x` hexadecimal number below 2^64.
    #[error("{0:?} is not a number")]
    InvalidNumber(String),
    /// A value is neither `Yes` nor `No`.
    #[error("{0:?} is neither Yes nor No")]
    InvalidBoolean(String),
    /// A value is not a `0x` hexadecimal or `0b` base64 binary value.
    #[error("{0:?} is not a 0x hexadecimal or 0b base64 binary value")]
    InvalidBinary(String),
}

/// Keys whose value is a large binary value and may be up to [`MAX_LARGE_VALUE_LEN`] bytes:
/// the authentication exchanges of RFC 7143 12.1 (CHAP, SRP, Kerberos, SPKM).
const LARGE_VALUE_KEYS: &[&str] = &[
    "CHAP_C",
    "CHAP_R",
    "SRP_s",
    "SRP_A",
    "SRP_B",
    "SRP_M",
    "SRP_HM",
    "KRB_AP_REQ",
    "KRB_AP_REP",
    "SPKM_REQ",
    "SPKM_ERROR",
    "SPKM_REP_TI",
    "SPKM_REP_RE",
];

/// The longest value `key` may carry, in bytes.
pub fn max_value_len(key: &str) -> usize {
    if LARGE_VALUE_KEYS.contains(&key) {
        MAX_LARGE_VALUE_LEN
    } else {
        MAX_VALUE_LEN
    }
}

/// Parses a complete text into its `(key, value)` pairs, in order.
///
/// Every pair ends with a NUL; a missing NUL after the last pair and empty entries (runs of
/// NULs, such as padding) are tolerated. A key appearing twice is an error: within one
/// negotiation step a key is offered once. The text may be at most
/// [`DEFAULT_MAX_TEXT_LEN`] bytes.
///
/// ```
/// use csvd_iscsi_target::text;
/// let pairs = text::parse(b"SendTargets=All\0").unwrap();
/// assert_eq!(pairs, vec![("SendTargets".to_string(), "All".to_string())]);
/// ```
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    parse_with(data, DEFAULT_MAX_TEXT_LEN, false)
}

/// Parses a text in which keys may repeat, such as a SendTargets response, where every
/// target has its own `TargetName` and `TargetAddress` entries.
pub fn parse_repeated(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    parse_with(data, DEFAULT_MAX_TEXT_LEN, true)
}

/// Parses a text of at most `max_len` bytes; `allow_repeats` lets a key appear more than once.
pub fn parse_with(
    data: &[u8],
    max_len: usize,
    allow_repeats: bool,
) -> Result<Vec<(String, String)>, TextError> {
    if data.len() > max_len {
        return Err(TextError::TooLong {
            len: data.len(),
            max: max_len,
        });
    }
    let text = std::str::from_utf8(data).map_err(|_| TextError::NotUtf8)?;
    let mut pairs = Vec::new();
    let mut seen = HashSet::new();
    for entry in text.split('\0').filter(|e| !e.is_empty()) {
        let (key, value) = entry.split_once('=').ok_or(TextError::MissingEquals)?;
        check_key(key)?;
        let max = max_value_len(key);
        if value.len() > max {
            return Err(TextError::ValueTooLong {
                key: key.to_string(),
                len: value.len(),
                max,
            });
        }
        if !allow_repeats && !seen.insert(key) {
            return Err(TextError::DuplicateKey(key.to_string()));
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Checks a key name: 1 to 63 bytes of letters, digits and `.-+@_` (RFC 7143 6.1), plus `#`
/// for the `X#` extension keys of RFC 4850.
fn check_key(key: &str) -> Result<(), TextError> {
    if key.is_empty() {
        return Err(TextError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(TextError::KeyTooLong(key.len()));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".-+@_#".contains(c);
    if !key.chars().all(allowed) {
        return Err(TextError::InvalidKey(key.to_string()));
    }
    Ok(())
}

/// Appends one `key=value` pair and its NUL to `out`.
pub fn push_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    out.reserve(key.len() + value.len() + 2);
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes pairs as a text: `key=value` and a NUL for each, in order.
///
/// ```
/// use csvd_iscsi_target::text;
/// assert_eq!(text::encode(&[("MaxConnections", "1")]), b"MaxConnections=1\0");
/// ```
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        push_pair(&mut out, key.as_ref(), value.as_ref());
    }
    out
}

/// Encodes a SendTargets response (RFC 7143 appendix C): for each target its
/// `TargetName=<name>`, then one `TargetAddress=<portal>,<tpgt>` per portal, where a portal is
/// `ip:port`, `[ipv6]:port` or `host:port`. A target listed without portals is reached at the
/// address the initiator used for discovery. Which targets to list (all of them for
/// `SendTargets=All` in a discovery session, the session's own target otherwise) is the
/// caller's decision. The result may exceed one PDU; [`Outgoing`] splits it.
///
/// ```
/// use csvd_iscsi_target::text;
/// let targets = [("iqn.2024-01.org.example:disk", vec![("[fd00::1]:3260".to_string(), 2)])];
/// assert_eq!(
///     text::send_targets(&targets),
///     b"TargetName=iqn.2024-01.org.example:disk\0TargetAddress=[fd00::1]:3260,2\0"
/// );
/// ```
pub fn send_targets<N, P, A>(targets: &[(N, P)]) -> Vec<u8>
where
    N: AsRef<str>,
    P: AsRef<[(A, u16)]>,
    A: AsRef<str>,
{
    let mut out = Vec::new();
    for (name, portals) in targets {
        push_pair(&mut out, "TargetName", name.as_ref());
        for (addr, tpgt) in portals.as_ref() {
            push_pair(
                &mut out,
                "TargetAddress",
                &format!("{},{tpgt}", addr.as_ref()),
            );
        }
    }
    out
}

/// Joins the parts of a text sent over several PDUs with the C bit (RFC 7143 6.1).
#[derive(Clone, Debug)]
pub struct Accumulator {
    buf: Vec<u8>,
    max_len: usize,
    pending: bool,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator::new(DEFAULT_MAX_TEXT_LEN)
    }
}

impl Accumulator {
    /// An accumulator for texts of at most `max_len` bytes in all.
    pub fn new(max_len: usize) -> Accumulator {
        Accumulator {
            buf: Vec::new(),
            max_len,
            pending: false,
        }
    }

    /// Adds one PDU's data segment. While `cont` (the C bit) is set the text is incomplete and
    /// `None` comes back; the part without it completes the text, which is returned whole and
    /// the accumulator starts over. A text over the limit is an error and is dropped.
    ///
    /// ```
    /// use csvd_iscsi_target::text::Accumulator;
    /// let mut acc = Accumulator::default();
    /// assert_eq!(acc.push(b"SendTar", true).unwrap(), None);
    /// assert_eq!(acc.push(b"gets=All\0", false).unwrap(), Some(b"SendTargets=All\0".to_vec()));
    /// ```
    pub fn push(&mut self, data: &[u8], cont: bool) -> Result<Option<Vec<u8>>, TextError> {
        let len = self.buf.len().saturating_add(data.len());
        if len > self.max_len {
            self.clear();
            return Err(TextError::TooLong {
                len,
                max: self.max_len,
            });
        }
        self.buf.extend_from_slice(data);
        if cont {
            self.pending = true;
            Ok(None)
        } else {
            self.pending = false;
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }

    /// Whether a text has started and not yet ended.
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// Drops any partial text.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pending = false;
    }
}

/// A response text being sent in parts no longer than the peer's MaxRecvDataSegmentLength,
/// every part but the last with the C bit set. The peer asks for each further part with an
/// empty request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    data: Vec<u8>,
    sent: usize,
}

impl Outgoing {
    /// A text to send.
    pub fn new(data: Vec<u8>) -> Outgoing {
        Outgoing { data, sent: 0 }
    }

    /// The next part, at most `max_len` bytes (at least one), and whether more follows (the C
    /// bit). A part ends after a pair's NUL when one falls within the limit, so a peer that
    /// parses each part alone still sees whole pairs; a single pair longer than the limit is
    /// cut at the limit, which RFC 7143 allows.
    ///
    /// ```
    /// use csvd_iscsi_target::text::Outgoing;
    /// let mut out = Outgoing::new(b"A=1\0B=2\0".to_vec());
    /// assert_eq!(out.next_chunk(6), (b"A=1\0".to_vec(), true));
    /// assert_eq!(out.next_chunk(6), (b"B=2\0".to_vec(), false));
    /// ```
    pub fn next_chunk(&mut self, max_len: usize) -> (Vec<u8>, bool) {
        let max_len = max_len.max(1);
        let rest = self.data.get(self.sent..).unwrap_or_default();
        if rest.len() <= max_len {
            self.sent = self.data.len();
            return (rest.to_vec(), false);
        }
        let window = &rest[..max_len];
        let len = match window.iter().rposition(|&b| b == 0) {
            Some(nul) => nul + 1,
            None => max_len,
        };
        self.sent += len;
        (rest[..len].to_vec(), true)
    }

    /// Whether every part has been handed out.
    pub fn is_finished(&self) -> bool {
        self.sent >= self.data.len()
    }

    /// Bytes not yet handed out.
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.sent)
    }
}

/// Decodes a numerical value: decimal, or hexadecimal after `0x`/`0X`, below 2^64.
///
/// ```
/// use csvd_iscsi_target::text;
/// assert_eq!(text::parse_number("8192"), Ok(8192));
/// assert_eq!(text::parse_number("0x2000"), Ok(8192));
/// assert!(text::parse_number("-1").is_err());
/// ```
pub fn parse_number(value: &str) -> Result<u64, TextError> {
    let bad = || TextError::InvalidNumber(value.to_string());
    let (digits, radix) = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    u64::from_str_radix(digits, radix).map_err(|_| bad())
}

/// Decodes a boolean value, `Yes` or `No` (case-sensitive, as RFC 7143 spells them).
pub fn parse_bool(value: &str) -> Result<bool, TextError> {
    match value {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(TextError::InvalidBoolean(value.to_string())),
    }
}

/// The text of a boolean: `Yes` or `No`.
pub fn bool_str(value: bool) -> &'static str {
    if value { "Yes" } else { "No" }
}

/// The values of a list value, in the proposer's order of preference.
pub fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',')
}

/// Decodes a binary value: hexadecimal after `0x`/`0X` (an odd digit count means a leading
/// zero nibble) or base64 after `0b`/`0B` (RFC 7143 6.1).
///
/// ```
/// use csvd_iscsi_target::text;
/// assert_eq!(text::decode_binary("0x0aff"), Ok(vec![0x0a, 0xff]));
/// assert_eq!(text::decode_binary("0bCv8="), Ok(vec![0x0a, 0xff]));
/// ```
pub fn decode_binary(value: &str) -> Result<Vec<u8>, TextError> {
    let bad = || TextError::InvalidBinary(value.to_string());
    let (prefix, body) = value.split_at_checked(2).ok_or_else(bad)?;
    let decoded = match prefix {
        "0x" | "0X" => decode_hex(body),
        "0b" | "0B" => decode_base64(body),
        _ => None,
    };
    decoded.filter(|bytes| !bytes.is_empty()).ok_or_else(bad)
}

/// Encodes bytes as a `0x` hexadecimal value (lower case).
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 + bytes.len() * 2);
    out.push_str("0x");
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Encodes bytes as a `0b` base64 value (RFC 4648 alphabet, with padding).
pub fn encode_base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 + bytes.len().div_ceil(3) * 4);
    out.push_str("0b");
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                let index = (n >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(BASE64[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn decode_hex(digits: &str) -> Option<Vec<u8>> {
    let nibbles: Vec<u8> = digits
        .chars()
        .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect::<Option<_>>()?;
    let mut out = Vec::with_capacity(nibbles.len().div_ceil(2));
    let (head, pairs) = nibbles.split_at(nibbles.len() % 2);
    out.extend_from_slice(head);
    out.extend(pairs.chunks_exact(2).map(|p| p[0] << 4 | p[1]));
    Some(out)
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let body = text.trim_end_matches('=');
    let padding = text.len() - body.len();
    if padding > 2 || (padding > 0 && !text.len().is_multiple_of(4)) || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in body.bytes() {
        let v = BASE64.iter().position(|&a| a == c)?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn test_parse_ordered_pairs() {
        let data = b"InitiatorName=iqn.2005-03.org.open-iscsi:abc\0SessionType=Normal\0X#a=b=c\0";
        assert_eq!(
            parse(data).unwrap(),
            pairs(&[
                ("InitiatorName", "iqn.2005-03.org.open-iscsi:abc"),
                ("SessionType", "Normal"),
                ("X#a", "b=c"),
            ])
        );
    }

    #[test]
    fn test_parse_tolerates_padding_and_missing_last_nul() {
        assert_eq!(parse(b"A=1\0\0\0\0").unwrap(), pairs(&[("A", "1")]));
        assert_eq!(parse(b"A=1\0B=").unwrap(), pairs(&[("A", "1"), ("B", "")]));
        assert_eq!(parse(b"").unwrap(), pairs(&[]));
    }

    #[test]
    fn test_parse_rejects_malformed_text() {
        let cases: &[(&[u8], TextError)] = &[
            (b"A\0", TextError::MissingEquals),
            (b"=1\0", TextError::EmptyKey),
            (b"A B=1\0", TextError::InvalidKey("A B".into())),
            (b"A=1\0A=2\0", TextError::DuplicateKey("A".into())),
            (b"A=\xff\0", TextError::NotUtf8),
        ];
        for (data, err) in cases {
            assert_eq!(
                parse(data).unwrap_err(),
                *err,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn test_parse_key_and_value_limits() {
        let key63 = "K".repeat(63);
        assert!(parse(format!("{key63}=1\0").as_bytes()).is_ok());
        let key64 = "K".repeat(64);
        assert_eq!(
            parse(format!("{key64}=1\0").as_bytes()),
            Err(TextError::KeyTooLong(64))
        );
        let v255 = "v".repeat(255);
        assert!(parse(format!("A={v255}\0").as_bytes()).is_ok());
        let v256 = "v".repeat(256);
        assert!(matches!(
            parse(format!("A={v256}\0").as_bytes()),
            Err(TextError::ValueTooLong {
                len: 256,
                max: 255,
                ..
            })
        ));
        let large = format!("0x{}", "ab".repeat(4095));
        assert_eq!(large.len(), 8192);
        assert!(parse(format!("CHAP_C={large}\0").as_bytes()).is_ok());
        assert!(parse(format!("CHAP_C={large}0\0").as_bytes()).is_err());
    }

    #[test]
    fn test_parse_total_limit() {
        let data = b"A=1\0".repeat(10);
        assert_eq!(parse_with(&data, 40, true).map(|p| p.len()), Ok(10));
        assert_eq!(
            parse_with(&data, 39, true),
            Err(TextError::TooLong { len: 40, max: 39 })
        );
    }

    #[test]
    fn test_parse_repeated_allows_duplicates() {
        let data = b"TargetName=a\0TargetAddress=1.2.3.4:3260,1\0TargetName=b\0";
        assert_eq!(parse_repeated(data).unwrap().len(), 3);
    }

    #[test]
    fn test_encode_round_trips() {
        let items = [
            ("HeaderDigest", "CRC32C,None"),
            ("MaxRecvDataSegmentLength", "262144"),
        ];
        let data = encode(&items);
        assert_eq!(
            data,
            b"HeaderDigest=CRC32C,None\0MaxRecvDataSegmentLength=262144\0"
        );
        assert_eq!(parse(&data).unwrap(), pairs(&items));
    }

    #[test]
    fn test_send_targets_lists_every_portal() {
        let targets = vec![
            (
                "iqn.2024-01.org.example:a".to_string(),
                vec![
                    ("10.0.0.1:3260".to_string(), 1u16),
                    ("[fd00::2]:3260".to_string(), 2),
                ],
            ),
            ("iqn.2024-01.org.example:b".to_string(), vec![]),
        ];
        let data = send_targets(&targets);
        assert_eq!(
            parse_repeated(&data).unwrap(),
            pairs(&[
                ("TargetName", "iqn.2024-01.org.example:a"),
                ("TargetAddress", "10.0.0.1:3260,1"),
                ("TargetAddress", "[fd00::2]:3260,2"),
                ("TargetName", "iqn.2024-01.org.example:b"),
            ])
        );
        let none: [(&str, Vec<(String, u16)>); 0] = [];
        assert!(send_targets(&none).is_empty());
    }

    #[test]
    fn test_accumulator_joins_continuations() {
        let mut acc = Accumulator::new(100);
        assert_eq!(acc.push(b"Ke", true), Ok(None));
        assert!(acc.is_pending());
        assert_eq!(acc.push(b"y=va", true), Ok(None));
        assert_eq!(acc.push(b"lue\0", false), Ok(Some(b"Key=value\0".to_vec())));
        assert!(!acc.is_pending());
        assert_eq!(acc.push(b"A=1\0", false), Ok(Some(b"A=1\0".to_vec())));
    }

    #[test]
    fn test_accumulator_limit() {
        let mut acc = Accumulator::new(8);
        assert_eq!(acc.push(b"AAAAA", true), Ok(None));
        assert_eq!(
            acc.push(b"AAAA", false),
            Err(TextError::TooLong { len: 9, max: 8 })
        );
        assert!(!acc.is_pending());
        assert_eq!(acc.push(b"B=1\0", false), Ok(Some(b"B=1\0".to_vec())));
    }

    #[test]
    fn test_outgoing_splits_at_pair_boundaries() {
        let text = encode(&[("A", "1"), ("B", "22"), ("C", "333")]);
        let mut out = Outgoing::new(text.clone());
        assert_eq!(out.next_chunk(9), (b"A=1\0B=22\0".to_vec(), true));
        assert_eq!(out.remaining(), 6);
        assert_eq!(out.next_chunk(9), (b"C=333\0".to_vec(), false));
        assert!(out.is_finished());
        assert_eq!(out.next_chunk(9), (Vec::new(), false));
    }

    #[test]
    fn test_outgoing_cuts_long_pairs() {
        let mut out = Outgoing::new(b"LONGKEY=VALUE\0".to_vec());
        let mut joined = Vec::new();
        loop {
            let (chunk, more) = out.next_chunk(4);
            assert!(chunk.len() <= 4);
            joined.extend(chunk);
            if !more {
                break;
            }
        }
        assert_eq!(joined, b"LONGKEY=VALUE\0");
        let mut zero = Outgoing::new(b"AB".to_vec());
        assert_eq!(zero.next_chunk(0), (b"A".to_vec(), true));
    }

    #[test]
    fn test_parse_number_encodings() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("262144", Some(262_144)),
            ("0x40000", Some(262_144)),
            ("0XfF", Some(255)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("0x10000000000000000", None),
            ("", None),
            ("0x", None),
            ("+1", None),
            ("-1", None),
            (" 1", None),
            ("1e3", None),
            ("Irrelevant", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_number(text).ok(), *want, "{text}");
        }
    }

    #[test]
    fn test_parse_bool_values() {
        assert_eq!(parse_bool("Yes"), Ok(true));
        assert_eq!(parse_bool("No"), Ok(false));
        assert!(parse_bool("yes").is_err());
        assert!(parse_bool("Reject").is_err());
        assert_eq!(bool_str(true), "Yes");
        assert_eq!(bool_str(false), "No");
    }

    #[test]
    fn test_list_values() {
        assert_eq!(list("CHAP,None").collect::<Vec<_>>(), ["CHAP", "None"]);
        assert_eq!(list("None").collect::<Vec<_>>(), ["None"]);
    }

    #[test]
    fn test_decode_binary_encodings() {
        assert_eq!(decode_binary("0x00ff10"), Ok(vec![0, 0xff, 0x10]));
        assert_eq!(decode_binary("0XABC"), Ok(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAAEC"), Ok(vec![0, 1, 2]));
        assert_eq!(decode_binary("0bAAE="), Ok(vec![0, 1]));
        assert_eq!(decode_binary("0bAA=="), Ok(vec![0]));
        assert_eq!(decode_binary("0bAA"), Ok(vec![0]));
        for bad in [
            "", "0x", "0b", "12", "0xg0", "0bA", "0bA===", "0bAA=A", "0x\u{e9}", "\u{e9}",
        ] {
            assert!(decode_binary(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_encode_binary_round_trips() {
        for len in 0..10usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            if len > 0 {
                assert_eq!(decode_binary(&encode_hex(&bytes)), Ok(bytes.clone()));
                assert_eq!(decode_binary(&encode_base64(&bytes)), Ok(bytes.clone()));
            }
        }
        assert_eq!(encode_hex(&[0xde, 0xad]), "0xdead");
        assert_eq!(encode_base64(b"Man"), "0bTWFu");
        assert_eq!(encode_base64(b"Ma"), "0bTWE=");
        assert_eq!(encode_base64(b"M"), "0bTQ==");
    }

    proptest! {
        #[test]
        fn test_parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&data);
            let _ = parse_repeated(&data);
        }

        #[test]
        fn test_value_helpers_never_panic(value in ".{0,40}") {
            let _ = parse_number(&value);
            let _ = parse_bool(&value);
            let _ = decode_binary(&value);
            let _ = list(&value).count();
        }

        #[test]
        fn test_binary_round_trip(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            prop_assert_eq!(decode_binary(&encode_hex(&bytes)), Ok(bytes.clone()));
            prop_assert_eq!(decode_binary(&encode_base64(&bytes)), Ok(bytes));
        }

        #[test]
        fn test_pairs_round_trip(
            items in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9.+@_-]{0,20}", "[^\u{0}]{0,30}", 0..8)
        ) {
            let items: Vec<(String, String)> = items.into_iter().collect();
            prop_assert_eq!(parse(&encode(&items)).unwrap(), items);
        }

        #[test]
        fn test_split_and_join_round_trip(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            max in 1usize..64,
        ) {
            let mut out = Outgoing::new(data.clone());
            let mut acc = Accumulator::new(1024);
            let mut joined = None;
            for _ in 0..=data.len() + 1 {
                let (chunk, more) = out.next_chunk(max);
                prop_assert!(chunk.len() <= max);
                joined = acc.push(&chunk, more).unwrap();
                if !more {
                    break;
                }
            }
            prop_assert_eq!(joined, Some(data));
        }
    }
}
