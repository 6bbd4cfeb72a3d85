//! The login phase (RFC 7143 section 6): security negotiation with CHAP and operational
//! negotiation, as a state machine over login request fields. No I/O.
//!
//! The caller reads each Login Request, hands its fields to [`Login::step`] and writes back the
//! response the step returns. [`Step::Continue`] means more requests follow; [`Step::Done`]
//! carries the final response (T=1, NSG=3) and the negotiated [`Outcome`]; [`Step::Fail`]
//! carries a response with the Status-Class and Status-Detail of the [`LoginError`], after
//! which the caller closes the connection.
//!
//! ```text
//!            csg 0: SecurityNegotiation                csg 1: LoginOperationalNegotiation
//!   ┌──────────────────────────────────────────┐     ┌───────────────────────────────────┐
//!   │ AuthMethod=CHAP,None  ->  AuthMethod=CHAP│ T=1 │ HeaderDigest, MaxBurstLength, ... │ T=1
//! ──┤ CHAP_A=5  ->  CHAP_A, CHAP_I, CHAP_C     ├────►│ -> answers, MaxRecvDataSegment-   ├────► csg 3
//!   │ CHAP_N, CHAP_R [CHAP_I, CHAP_C]          │     │    Length (our declaration)       │   full feature
//!   │   -> [CHAP_N, CHAP_R] (mutual)           │     └───────────────────────────────────┘
//!   └──────────────┬───────────────────────────┘                 ▲
//!                  └────────── T=1, NSG=3 (skip operational) ────┴──────────────
//!   An initiator may start at csg 1 when the target requires no CHAP.
//! ```
//!
//! The first request (the first complete text, if it spans several PDUs with the C bit) must
//! name the initiator (`InitiatorName`), the session type (`SessionType`, default Normal) and,
//! for a normal session, the target (`TargetName`); the [`Policy`] decides whether the target
//! exists, whether the initiator may use it and whether CHAP is required. The first response
//! of a normal session carries `TargetPortalGroupTag` (RFC 7143 13.9). Operational keys follow
//! the result functions of RFC 7143 section 13 (see [`Limits`] for the target's side), answered
//! `Reject` when out of range, `Irrelevant` when they do not apply to a discovery session and
//! `NotUnderstood` when unknown. The target declares its `MaxRecvDataSegmentLength` once, in
//! its first operational-stage response or in the final response. Texts longer than one PDU
//! are joined (C bit on requests) and split (C bit on responses, the initiator asking for each
//! further part with an empty request).
//!
//! A panic on any request is a bug: every malformed input maps to a [`LoginError`].

mod chap;
mod negotiate;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;

use thiserror::Error;

use crate::text::{self, TextError};

pub use chap::chap_md5_response;

/// The only version of the iSCSI protocol (RFC 7143 11.12.4): Version-min above it is refused.
pub const ISCSI_VERSION: u8 = 0x00;
/// The security negotiation stage.
pub const STAGE_SECURITY: u8 = 0;
/// The login operational negotiation stage.
pub const STAGE_OPERATIONAL: u8 = 1;
/// The full feature phase.
pub const STAGE_FULL_FEATURE: u8 = 3;
/// The largest data segment of a Login PDU in either direction: MaxRecvDataSegmentLength is
/// not in effect before the full feature phase, so RFC 7143's default of 8192 applies.
pub const LOGIN_MAX_DATA_SEGMENT: usize = 8192;
/// The longest iSCSI name (RFC 7143 4.2.7.1).
pub const MAX_NAME_LEN: usize = 223;
/// Login requests one login may take before it is refused: a handshake needs a handful, and
/// continuations of a 64 KiB text a few dozen more.
pub const MAX_LOGIN_REQUESTS: usize = 256;

/// The fields of a Login Request PDU the state machine needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginRequest {
    /// T bit: the initiator wants to move to `nsg`.
    pub transit: bool,
    /// C bit: the text continues in the next PDU.
    pub cont: bool,
    /// Current stage (0 security, 1 operational).
    pub csg: u8,
    /// Next stage (1 operational, 3 full feature), valid with `transit`.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// Initiator session id.
    pub isid: [u8; 6],
    /// Target session identifying handle (0 for a new session).
    pub tsih: u16,
    /// Initiator task tag.
    pub itt: u32,
    /// Connection id.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The data segment: `key=value` pairs, NUL-terminated.
    pub data: Vec<u8>,
}

/// The fields of a Login Response PDU the state machine decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginResponse {
    /// T bit.
    pub transit: bool,
    /// C bit.
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Status-Class.
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
    /// The data segment.
    pub data: Vec<u8>,
}

/// The kind of session an initiator logs in for (RFC 7143 13.21).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionType {
    /// SendTargets only: no target, no SCSI.
    Discovery,
    /// SCSI commands to one target.
    Normal,
}

/// The CHAP secrets of one login. `user` and `secret` authenticate the initiator; `mutual`,
/// the target's own name and secret, answers an initiator that authenticates the target.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecrets {
    /// The name the initiator must send in CHAP_N.
    pub user: String,
    /// The secret shared with the initiator.
    pub secret: Vec<u8>,
    /// The target's CHAP name and secret for mutual CHAP.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl fmt::Debug for ChapSecrets {
    /// Shows the names only: secrets stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapSecrets")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .field(
                "mutual",
                &self.mutual.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .finish()
    }
}

/// What the login asks of the rest of the target.
pub trait Policy {
    /// Whether a target of this name exists on this portal.
    fn target_exists(&self, name: &str) -> bool;
    /// Whether `initiator` may log in to `target`.
    fn initiator_allowed(&self, target: &str, initiator: &str) -> bool;
    /// The CHAP secrets a login to `target` must prove (`None`: a discovery session), or
    /// `None` when AuthMethod=None is acceptable.
    fn chap(&self, target: Option<&str>) -> Option<ChapSecrets>;
    /// The target's alias, sent as TargetAlias in the first response.
    fn target_alias(&self, _target: &str) -> Option<String> {
        None
    }
}

/// The target's side of operational negotiation: the values it declares and the largest it
/// accepts. Values outside the ranges RFC 7143 allows are brought into range by [`Login::new`].
///
/// The defaults aim at throughput with Linux open-iscsi and libiscsi, which both offer
/// ImmediateData=Yes and InitialR2T=No and 256 KiB segments:
///
/// - `max_recv_data_segment_length` 256 KiB: the largest Data-Out and immediate data segment
///   we accept. Both initiators default to 256 KiB for their own receive side and open-iscsi
///   sends Data-Out PDUs as large as the target declares, so a 256 KiB write travels in one
///   PDU; larger segments save little per-PDU overhead but raise the memory one PDU may pin.
/// - `max_burst_length` 16776192 (16 MiB - 1 KiB, the largest multiple of 1 KiB below the
///   2^24-1 limit, and open-iscsi's default): a whole large write is solicited by one R2T and
///   a large read is one Data-In sequence, so round trips do not limit large I/O.
/// - `first_burst_length` 256 KiB: unsolicited data (immediate plus unsolicited Data-Out) up
///   to one segment, so writes up to 256 KiB complete without waiting for an R2T, as both
///   initiators default to.
/// - `immediate_data` true and `initial_r2t` false: accept data with the command and without
///   an R2T, which removes a round trip from every small write.
/// - `max_outstanding_r2t` 16: the most R2Ts per task the initiator may have to serve at
///   once; the result is the minimum, and since the target issues R2Ts it can always issue
///   fewer, so a generous bound costs nothing.
/// - `default_time2wait` 2 s (the RFC default; the result is the maximum) and
///   `default_time2retain` 0 s (the result is the minimum): at ErrorRecoveryLevel 0 tasks are
///   never reassigned to a new connection, so nothing is retained after a connection drops.
/// - CRC32C header and data digests are accepted when the initiator asks for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The MaxRecvDataSegmentLength the target declares (512..=2^24-1).
    pub max_recv_data_segment_length: u32,
    /// The largest MaxBurstLength accepted (512..=2^24-1).
    pub max_burst_length: u32,
    /// The largest FirstBurstLength accepted (512..=2^24-1, at most `max_burst_length`).
    pub first_burst_length: u32,
    /// The largest MaxOutstandingR2T accepted (1..=65535).
    pub max_outstanding_r2t: u32,
    /// Whether ImmediateData=Yes is accepted.
    pub immediate_data: bool,
    /// The target's InitialR2T: `true` forces every initiator to wait for an R2T.
    pub initial_r2t: bool,
    /// Whether HeaderDigest=CRC32C is accepted.
    pub header_digest: bool,
    /// Whether DataDigest=CRC32C is accepted.
    pub data_digest: bool,
    /// The target's DefaultTime2Wait in seconds (0..=3600); the result is the larger.
    pub default_time2wait: u32,
    /// The target's DefaultTime2Retain in seconds (0..=3600); the result is the smaller.
    pub default_time2retain: u32,
    /// The longest key=value text of one negotiation step, continuations included (at least
    /// 8192 bytes, as RFC 7143 requires).
    pub max_text_length: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 16_776_192,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 16,
            immediate_data: true,
            initial_r2t: false,
            header_digest: true,
            data_digest: true,
            default_time2wait: 2,
            default_time2retain: 0,
            max_text_length: text::DEFAULT_MAX_TEXT_LEN,
        }
    }
}

impl Limits {
    /// The limits brought into the ranges RFC 7143 allows.
    fn normalized(&self) -> Limits {
        let length = |v: u32| v.clamp(512, MAX_SEGMENT);
        let max_burst_length = length(self.max_burst_length);
        Limits {
            max_recv_data_segment_length: length(self.max_recv_data_segment_length),
            max_burst_length,
            first_burst_length: length(self.first_burst_length).min(max_burst_length),
            max_outstanding_r2t: self.max_outstanding_r2t.clamp(1, 65535),
            default_time2wait: self.default_time2wait.min(3600),
            default_time2retain: self.default_time2retain.min(3600),
            max_text_length: self.max_text_length.max(LOGIN_MAX_DATA_SEGMENT),
            ..self.clone()
        }
    }
}

/// The largest value of the length keys: 2^24-1.
const MAX_SEGMENT: u32 = (1 << 24) - 1;

/// How a login is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginConfig {
    /// This portal group's tag, sent as TargetPortalGroupTag.
    pub portal_group_tag: u16,
    /// The target's side of operational negotiation.
    pub limits: Limits,
}

/// Every operational value the full feature phase needs, as negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// CRC32C header digests in both directions.
    pub header_digest: bool,
    /// CRC32C data digests in both directions.
    pub data_digest: bool,
    /// The largest data segment the target accepts: what it declared.
    pub max_recv_data_segment_length: u32,
    /// The largest data segment the target may send: the initiator's declared
    /// MaxRecvDataSegmentLength, 8192 if it declared none.
    pub max_xmit_data_segment_length: u32,
    /// The largest Data-In sequence or solicited Data-Out burst.
    pub max_burst_length: u32,
    /// The most unsolicited data one write may carry.
    pub first_burst_length: u32,
    /// Whether unsolicited Data-Out PDUs are forbidden (an R2T must come first).
    pub initial_r2t: bool,
    /// Whether a command may carry immediate data.
    pub immediate_data: bool,
    /// R2Ts one task may have outstanding.
    pub max_outstanding_r2t: u32,
    /// Data PDUs of a sequence arrive in order.
    pub data_pdu_in_order: bool,
    /// Data sequences arrive in order.
    pub data_sequence_in_order: bool,
    /// Seconds before a reconnection after a connection loss or logout.
    pub default_time2wait: u32,
    /// Seconds task state is kept after Time2Wait.
    pub default_time2retain: u32,
    /// The error recovery level; always 0, the only one the target supports.
    pub error_recovery_level: u8,
    /// Connections per session; always 1, the only number the target supports.
    pub max_connections: u32,
}

impl Default for Params {
    /// RFC 7143's defaults, for keys nobody negotiates.
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
        }
    }
}

/// What a successful login established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Discovery or normal.
    pub session_type: SessionType,
    /// The initiator's iSCSI name.
    pub initiator_name: String,
    /// The initiator's alias, if it declared one.
    pub initiator_alias: Option<String>,
    /// The target of a normal session.
    pub target_name: Option<String>,
    /// The negotiated operational values.
    pub params: Params,
    /// The initiator session id.
    pub isid: [u8; 6],
    /// The TSIH the initiator sent (0 for a new session; the caller assigns one).
    pub tsih: u16,
    /// The connection id.
    pub cid: u16,
    /// The CHAP name the initiator authenticated with, if CHAP was used.
    pub chap_user: Option<String>,
}

/// What to do after a login request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the response and read the next request.
    Continue(LoginResponse),
    /// Send the response (T=1, NSG=3; the caller fills in the TSIH): the full feature phase
    /// begins with `outcome`.
    Done {
        /// The final login response.
        response: LoginResponse,
        /// What the login established.
        outcome: Outcome,
    },
    /// Send the response (a non-zero status) and close the connection.
    Fail(LoginResponse),
}

/// Who caused a login failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The initiator: Status-Class 2.
    Initiator,
    /// The target: Status-Class 3.
    Target,
}

/// Why a login failed. [`LoginError::status`] gives the Status-Class and Status-Detail the
/// initiator sees (RFC 7143 11.13.5).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LoginError {
    /// The login text is malformed.
    #[error("the login text is malformed")]
    Text(#[from] TextError),
    /// A request set both the T and C bits.
    #[error("a login request set both the T and C bits")]
    TransitWithContinue,
    /// A request names a stage a login request cannot be in.
    #[error("a login request is in stage {0}, which is not a login stage")]
    InvalidStage(u8),
    /// A request asked for a transition that is not forward to stage 1 or 3.
    #[error("a login request asked to move from stage {csg} to stage {nsg}")]
    InvalidTransition {
        /// The request's current stage.
        csg: u8,
        /// The requested next stage.
        nsg: u8,
    },
    /// A request is not in the stage the login is in.
    #[error("a login request is in stage {got} while the login is in stage {expected}")]
    StageMismatch {
        /// The login's stage.
        expected: u8,
        /// The request's stage.
        got: u8,
    },
    /// ISID, TSIH or CID changed between the requests of one login.
    #[error("the {0} changed between login requests")]
    ChangedField(&'static str),
    /// A key was negotiated twice in one login.
    #[error("key {0} was negotiated twice")]
    Renegotiated(String),
    /// A login key was declared again with another value.
    #[error("key {0} was declared again with a different value")]
    Redeclared(String),
    /// The initiator sent a key only a target sends.
    #[error("the initiator sent {0}, which only a target sends")]
    TargetOnlyKey(String),
    /// A security key arrived in the operational stage.
    #[error("security key {0} arrived in the operational stage")]
    SecurityKeyInOperationalStage(String),
    /// An iSCSI name is longer than 223 bytes.
    #[error("an iSCSI name is {0} bytes long, more than 223")]
    NameTooLong(usize),
    /// A declared value is out of the key's range.
    #[error("{key}={value} is outside the key's range")]
    InvalidDeclaration {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// The initiator offered a FirstBurstLength above its MaxBurstLength.
    #[error("FirstBurstLength {first} exceeds MaxBurstLength {max}")]
    BurstLengths {
        /// FirstBurstLength.
        first: u32,
        /// MaxBurstLength.
        max: u32,
    },
    /// The initiator refused a key the target had to offer.
    #[error("the initiator refused the target's offer of {0}")]
    OfferRefused(String),
    /// The initiator answered a target offer with a value outside the offer.
    #[error("the initiator answered the target's offer of {key} with {value}")]
    InvalidAnswer {
        /// The key.
        key: String,
        /// The answer.
        value: String,
    },
    /// A request carried text while the target was sending a continued response.
    #[error("a login request carried text while the target was sending a continued response")]
    UnexpectedText,
    /// The login took more requests than [`MAX_LOGIN_REQUESTS`].
    #[error("the login took more than 256 requests")]
    TooManyRequests,
    /// The initiator skipped security negotiation but the target requires CHAP.
    #[error("the initiator skipped security negotiation but the target requires CHAP")]
    SecurityRequired,
    /// The target requires CHAP and the initiator did not offer it.
    #[error("the target requires CHAP and the initiator did not offer it")]
    ChapRequired,
    /// The initiator offered no method but CHAP and no CHAP secret is configured.
    #[error("the initiator offered no method but CHAP and no CHAP secret is configured")]
    ChapNotConfigured,
    /// The initiator offered no CHAP algorithm the target supports (MD5, 5).
    #[error("the initiator offered CHAP algorithms {0} and the target supports only MD5 (5)")]
    UnsupportedChapAlgorithm(String),
    /// An authentication key arrived out of the CHAP sequence or for a method not in use.
    #[error("authentication key {0} arrived out of sequence")]
    UnexpectedAuthKey(String),
    /// The initiator's CHAP answer lacks CHAP_N or CHAP_R.
    #[error("the initiator did not send both CHAP_N and CHAP_R")]
    ChapMissingResponse,
    /// CHAP_R is not a 16-byte binary value.
    #[error("the initiator's CHAP_R is not a 16-byte binary value")]
    ChapMalformedResponse,
    /// CHAP_N is not the configured user.
    #[error("CHAP name {0:?} is not the configured user")]
    ChapUnknownUser(String),
    /// CHAP_R does not match the challenge and the secret.
    #[error("the initiator's CHAP response does not match the challenge and secret")]
    ChapWrongResponse,
    /// The initiator sent only one of CHAP_I and CHAP_C.
    #[error("the initiator sent only one of CHAP_I and CHAP_C")]
    ChapIncompleteChallenge,
    /// The initiator's CHAP_I is not a number from 0 to 255.
    #[error("CHAP_I {0:?} is not a number from 0 to 255")]
    ChapBadIdentifier(String),
    /// The initiator's CHAP_C is not a binary value of 16 to 1024 bytes.
    #[error("the initiator's CHAP_C is not a binary value of 16 to 1024 bytes")]
    ChapBadChallenge,
    /// The initiator's CHAP challenge repeats the target's (a reflection attack).
    #[error("the initiator's CHAP challenge repeats the target's challenge")]
    ChapReflected,
    /// The initiator asked the target to authenticate and no mutual secret is configured.
    #[error("the initiator asked for mutual CHAP and no mutual secret is configured")]
    MutualChapNotConfigured,
    /// The initiator may not use the target.
    #[error("initiator {initiator} may not log in to {target}")]
    NotAuthorized {
        /// The initiator's name.
        initiator: String,
        /// The target's name.
        target: String,
    },
    /// No target of this name exists.
    #[error("target {0} does not exist")]
    TargetNotFound(String),
    /// The initiator supports no version the target does.
    #[error("the initiator supports versions {min} to {max}, the target only 0")]
    UnsupportedVersion {
        /// Version-min.
        min: u8,
        /// Version-max.
        max: u8,
    },
    /// The session already has as many connections as it may.
    #[error("the session has as many connections as it may")]
    TooManyConnections,
    /// The first request has no InitiatorName.
    #[error("the first login request has no InitiatorName")]
    MissingInitiatorName,
    /// The first request of a normal session has no TargetName.
    #[error("the first login request of a normal session has no TargetName")]
    MissingTargetName,
    /// The connection cannot be added to the session.
    #[error("the connection cannot be added to the session")]
    CannotIncludeInSession,
    /// SessionType is neither Discovery nor Normal.
    #[error("session type {0:?} is not supported")]
    UnsupportedSessionType(String),
    /// The TSIH names no session.
    #[error("the TSIH names no existing session")]
    SessionDoesNotExist,
    /// A login request arrived after the login completed.
    #[error("a login request arrived after the login completed")]
    AlreadyComplete,
    /// No random bytes were available for a CHAP challenge.
    #[error("no random bytes were available for a CHAP challenge")]
    RandomUnavailable,
    /// The mutual CHAP secret equals the initiator's, which RFC 7143 12.1.3 forbids.
    #[error("the target's mutual CHAP secret equals the initiator's secret")]
    ChapSecretReused,
    /// The target cannot serve logins now.
    #[error("the target cannot serve logins now")]
    ServiceUnavailable,
    /// The target lacks resources for the session.
    #[error("the target lacks resources for the session")]
    OutOfResources,
}

impl LoginError {
    /// The Status-Class and Status-Detail the initiator sees (RFC 7143 11.13.5).
    pub fn status(&self) -> (u8, u8) {
        use LoginError::*;
        match self {
            Text(_)
            | TransitWithContinue
            | InvalidStage(_)
            | InvalidTransition { .. }
            | StageMismatch { .. }
            | ChangedField(_)
            | Renegotiated(_)
            | Redeclared(_)
            | TargetOnlyKey(_)
            | SecurityKeyInOperationalStage(_)
            | NameTooLong(_)
            | InvalidDeclaration { .. }
            | BurstLengths { .. }
            | OfferRefused(_)
            | InvalidAnswer { .. }
            | UnexpectedText
            | TooManyRequests => (0x02, 0x00),
            SecurityRequired
            | ChapRequired
            | ChapNotConfigured
            | UnsupportedChapAlgorithm(_)
            | UnexpectedAuthKey(_)
            | ChapMissingResponse
            | ChapMalformedResponse
            | ChapUnknownUser(_)
            | ChapWrongResponse
            | ChapIncompleteChallenge
            | ChapBadIdentifier(_)
            | ChapBadChallenge
            | ChapReflected
            | MutualChapNotConfigured => (0x02, 0x01),
            NotAuthorized { .. } => (0x02, 0x02),
            TargetNotFound(_) => (0x02, 0x03),
            UnsupportedVersion { .. } => (0x02, 0x05),
            TooManyConnections => (0x02, 0x06),
            MissingInitiatorName | MissingTargetName => (0x02, 0x07),
            CannotIncludeInSession => (0x02, 0x08),
            UnsupportedSessionType(_) => (0x02, 0x09),
            SessionDoesNotExist => (0x02, 0x0a),
            AlreadyComplete => (0x02, 0x0b),
            RandomUnavailable | ChapSecretReused => (0x03, 0x00),
            ServiceUnavailable => (0x03, 0x01),
            OutOfResources => (0x03, 0x02),
        }
    }

    /// Whether the initiator or the target is at fault.
    pub fn fault(&self) -> Fault {
        if self.status().0 == 0x03 {
            Fault::Target
        } else {
            Fault::Initiator
        }
    }

    /// The Login Response reporting this error in stage `csg`: no text, T=0.
    ///
    /// ```
    /// use csvd_iscsi_target::login::LoginError;
    /// let resp = LoginError::SessionDoesNotExist.response(0);
    /// assert_eq!((resp.status_class, resp.status_detail), (0x02, 0x0a));
    /// ```
    pub fn response(&self, csg: u8) -> LoginResponse {
        let (status_class, status_detail) = self.status();
        LoginResponse {
            csg,
            status_class,
            status_detail,
            ..Default::default()
        }
    }
}

/// A Login Response redirecting the initiator to `target_address` (`ip:port,tpgt`, or
/// `[ipv6]:port,tpgt`): Status 0x0101 (moved temporarily) or 0x0102 (moved permanently).
pub fn redirect(csg: u8, target_address: &str, permanent: bool) -> LoginResponse {
    let mut data = Vec::new();
    text::push_pair(&mut data, "TargetAddress", target_address);
    LoginResponse {
        csg,
        status_class: 0x01,
        status_detail: if permanent { 0x02 } else { 0x01 },
        data,
        ..Default::default()
    }
}

/// A source of random bytes for CHAP identifiers and challenges.
pub type FillRandom = fn(&mut [u8]) -> Result<(), getrandom::Error>;

/// Who the initiator is and what it logs in to, from the first request.
#[derive(Clone, Debug)]
struct Identity {
    initiator_name: String,
    initiator_alias: Option<String>,
    session_type: SessionType,
    target_name: Option<String>,
    chap: Option<ChapSecrets>,
}

/// The fields that must not change between the requests of one login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Connection {
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
}

/// Where the login is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Security,
    Operational,
    Done,
    Failed,
}

/// A response too long for one PDU, being sent in parts.
#[derive(Clone, Debug)]
struct Pending {
    text: text::Outgoing,
    csg: u8,
    transit: bool,
    nsg: u8,
    outcome: Option<Outcome>,
}

/// The login state machine of one connection.
///
/// ```
/// use csvd_iscsi_target::login::*;
///
/// struct Open;
/// impl Policy for Open {
///     fn target_exists(&self, name: &str) -> bool { name == "iqn.2024-01.org.example:disk" }
///     fn initiator_allowed(&self, _: &str, _: &str) -> bool { true }
///     fn chap(&self, _: Option<&str>) -> Option<ChapSecrets> { None }
/// }
///
/// let mut login = Login::new(LoginConfig { portal_group_tag: 1, limits: Limits::default() });
/// let req = LoginRequest {
///     transit: true,
///     csg: 1,
///     nsg: 3,
///     data: b"InitiatorName=iqn.2024-01.org.example:host\0\
///             TargetName=iqn.2024-01.org.example:disk\0MaxRecvDataSegmentLength=65536\0"
///         .to_vec(),
///     ..Default::default()
/// };
/// let Step::Done { response, outcome } = login.step(&req, &Open) else { panic!() };
/// assert!(response.transit && response.nsg == 3);
/// assert_eq!(outcome.params.max_xmit_data_segment_length, 65536);
/// ```
#[derive(Debug)]
pub struct Login {
    portal_group_tag: u16,
    limits: Limits,
    random: FillRandom,
    phase: Phase,
    requests: usize,
    connection: Option<Connection>,
    identity: Option<Identity>,
    incoming: text::Accumulator,
    pending: Option<Pending>,
    seen: HashSet<String>,
    auth: chap::Auth,
    negotiator: Option<negotiate::Negotiator>,
    declared: bool,
    error: Option<LoginError>,
}

impl Login {
    /// A login taking CHAP randomness from the operating system.
    pub fn new(config: LoginConfig) -> Login {
        Login::with_random(config, getrandom::fill)
    }

    /// A login taking CHAP identifiers and challenges from `random` (tests pass a
    /// deterministic source).
    pub fn with_random(config: LoginConfig, random: FillRandom) -> Login {
        let limits = config.limits.normalized();
        Login {
            portal_group_tag: config.portal_group_tag,
            incoming: text::Accumulator::new(limits.max_text_length),
            limits,
            random,
            phase: Phase::Security,
            requests: 0,
            connection: None,
            identity: None,
            pending: None,
            seen: HashSet::new(),
            auth: chap::Auth::default(),
            negotiator: None,
            declared: false,
            error: None,
        }
    }

    /// Handles one Login Request and says what to send back.
    pub fn step(&mut self, req: &LoginRequest, policy: &dyn Policy) -> Step {
        if self.phase == Phase::Failed {
            let err = self.error.clone().unwrap_or(LoginError::AlreadyComplete);
            return Step::Fail(err.response(req.csg));
        }
        match self.try_step(req, policy) {
            Ok(step) => step,
            Err(err) => self.fail(req, err),
        }
    }

    /// Ends the login with `error`, for failures the caller decides (an unknown TSIH, a
    /// session with too many connections, a target out of resources).
    ///
    /// ```
    /// use csvd_iscsi_target::login::*;
    /// let mut login = Login::new(LoginConfig::default());
    /// let req = LoginRequest { tsih: 7, ..Default::default() };
    /// let Step::Fail(resp) = login.fail(&req, LoginError::SessionDoesNotExist) else { panic!() };
    /// assert_eq!((resp.status_class, resp.status_detail), (0x02, 0x0a));
    /// ```
    pub fn fail(&mut self, req: &LoginRequest, error: LoginError) -> Step {
        let response = error.response(req.csg);
        self.phase = Phase::Failed;
        self.pending = None;
        self.incoming.clear();
        self.error = Some(error);
        Step::Fail(response)
    }

    /// Why the login failed, once it has.
    pub fn error(&self) -> Option<&LoginError> {
        self.error.as_ref()
    }

    /// Whether the login has ended, successfully or not.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    fn try_step(&mut self, req: &LoginRequest, policy: &dyn Policy) -> Result<Step, LoginError> {
        if self.phase == Phase::Done {
            return Err(LoginError::AlreadyComplete);
        }
        self.requests += 1;
        if self.requests > MAX_LOGIN_REQUESTS {
            return Err(LoginError::TooManyRequests);
        }
        self.check_header(req)?;
        if self.pending.is_some() {
            // The initiator asks for the next part of our response with an empty request.
            if req.cont || !req.data.is_empty() {
                return Err(LoginError::UnexpectedText);
            }
            return Ok(self.next_part());
        }
        let Some(data) = self.incoming.push(&req.data, req.cont)? else {
            // Part of a longer text: acknowledge it and wait for the rest.
            return Ok(Step::Continue(LoginResponse {
                csg: req.csg,
                ..Default::default()
            }));
        };
        let pairs = text::parse_with(&data, self.limits.max_text_length, false)?;
        self.negotiate(req, pairs, policy)
    }

    /// Checks the header fields: version, the T and C bits, the stages and the fields that
    /// must stay the same for the whole login.
    fn check_header(&mut self, req: &LoginRequest) -> Result<(), LoginError> {
        if req.version_min > ISCSI_VERSION {
            return Err(LoginError::UnsupportedVersion {
                min: req.version_min,
                max: req.version_max,
            });
        }
        if req.transit && req.cont {
            return Err(LoginError::TransitWithContinue);
        }
        if req.csg != STAGE_SECURITY && req.csg != STAGE_OPERATIONAL {
            return Err(LoginError::InvalidStage(req.csg));
        }
        if req.transit
            && (req.nsg <= req.csg
                || (req.nsg != STAGE_OPERATIONAL && req.nsg != STAGE_FULL_FEATURE))
        {
            return Err(LoginError::InvalidTransition {
                csg: req.csg,
                nsg: req.nsg,
            });
        }
        let connection = Connection {
            isid: req.isid,
            tsih: req.tsih,
            cid: req.cid,
        };
        match self.connection {
            None => {
                self.connection = Some(connection);
                if req.csg == STAGE_OPERATIONAL {
                    self.phase = Phase::Operational;
                }
            }
            Some(first) => {
                if first.isid != connection.isid {
                    return Err(LoginError::ChangedField("ISID"));
                }
                if first.tsih != connection.tsih {
                    return Err(LoginError::ChangedField("TSIH"));
                }
                if first.cid != connection.cid {
                    return Err(LoginError::ChangedField("CID"));
                }
                let expected = self.stage();
                if req.csg != expected {
                    return Err(LoginError::StageMismatch {
                        expected,
                        got: req.csg,
                    });
                }
            }
        }
        Ok(())
    }

    /// The current stage's number.
    fn stage(&self) -> u8 {
        match self.phase {
            Phase::Security => STAGE_SECURITY,
            Phase::Operational => STAGE_OPERATIONAL,
            Phase::Done | Phase::Failed => STAGE_FULL_FEATURE,
        }
    }

    /// Handles one complete text.
    fn negotiate(
        &mut self,
        req: &LoginRequest,
        pairs: Vec<(String, String)>,
        policy: &dyn Policy,
    ) -> Result<Step, LoginError> {
        let mut out: Vec<(String, String)> = Vec::new();
        let first = self.identity.is_none();
        if first {
            let identity = self.identify(&pairs, policy)?;
            if req.csg == STAGE_OPERATIONAL && identity.chap.is_some() {
                return Err(LoginError::SecurityRequired);
            }
            if let Some(target) = &identity.target_name {
                // RFC 7143 13.9: the first response of a normal session names the portal group.
                out.push((
                    "TargetPortalGroupTag".into(),
                    self.portal_group_tag.to_string(),
                ));
                if let Some(alias) = policy.target_alias(target) {
                    out.push(("TargetAlias".into(), alias));
                }
            }
            self.negotiator = Some(negotiate::Negotiator::new(
                identity.session_type,
                self.limits.clone(),
            ));
            self.identity = Some(identity);
        }
        let Some(negotiator) = self.negotiator.as_mut() else {
            return Err(LoginError::AlreadyComplete);
        };

        let mut auth_pairs = Vec::new();
        let mut op_pairs = Vec::new();
        for (key, value) in pairs {
            match negotiate::classify(&key) {
                negotiate::Class::Login => {
                    if !first && let Some(identity) = self.identity.as_mut() {
                        redeclare(identity, &key, &value)?;
                    }
                }
                negotiate::Class::TargetOnly => return Err(LoginError::TargetOnlyKey(key)),
                negotiate::Class::Security => {
                    if req.csg == STAGE_OPERATIONAL {
                        return Err(LoginError::SecurityKeyInOperationalStage(key));
                    }
                    if !self.seen.insert(key.clone()) {
                        return Err(LoginError::Renegotiated(key));
                    }
                    auth_pairs.push((key, value));
                }
                negotiate::Class::Operational(_) | negotiate::Class::Unknown => {
                    let answers_offer = negotiator.awaits_answer(&key);
                    if !self.seen.insert(key.clone()) && !answers_offer {
                        return Err(LoginError::Renegotiated(key));
                    }
                    op_pairs.push((key, value));
                }
            }
        }

        if req.csg == STAGE_SECURITY {
            let secrets = self.identity.as_ref().and_then(|i| i.chap.as_ref());
            self.auth
                .process(&auth_pairs, secrets, self.random, &mut out)?;
        }
        negotiator.negotiate(&op_pairs, &mut out)?;

        let mut transit = false;
        if req.transit {
            transit = match self.phase {
                Phase::Security => {
                    let required = self.identity.as_ref().is_some_and(|i| i.chap.is_some());
                    self.auth.ready_to_leave(required)?
                }
                _ => true,
            };
            // Keys whose default the target cannot accept are offered before the full
            // feature phase; the initiator answers them in its next request.
            if transit && req.nsg == STAGE_FULL_FEATURE && negotiator.offer_missing(&mut out) {
                transit = false;
            }
        }
        let nsg = if transit { req.nsg } else { 0 };
        if !self.declared
            && (req.csg == STAGE_OPERATIONAL || (transit && nsg == STAGE_FULL_FEATURE))
        {
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.limits.max_recv_data_segment_length.to_string(),
            ));
            self.declared = true;
        }

        let outcome = if transit && nsg == STAGE_FULL_FEATURE {
            Some(self.outcome(req)?)
        } else {
            None
        };
        self.pending = Some(Pending {
            text: text::Outgoing::new(text::encode(&out)),
            csg: req.csg,
            transit,
            nsg,
            outcome,
        });
        Ok(self.next_part())
    }

    /// Reads the login keys of the first request and asks the policy about them.
    fn identify(
        &self,
        pairs: &[(String, String)],
        policy: &dyn Policy,
    ) -> Result<Identity, LoginError> {
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let initiator_name = get("InitiatorName")
            .filter(|n| !n.is_empty())
            .ok_or(LoginError::MissingInitiatorName)?;
        check_name(initiator_name)?;
        let session_type = session_type(get("SessionType"))?;
        let target_name = match session_type {
            SessionType::Discovery => None,
            SessionType::Normal => {
                let target = get("TargetName")
                    .filter(|n| !n.is_empty())
                    .ok_or(LoginError::MissingTargetName)?;
                check_name(target)?;
                if !policy.target_exists(target) {
                    return Err(LoginError::TargetNotFound(target.to_string()));
                }
                if !policy.initiator_allowed(target, initiator_name) {
                    return Err(LoginError::NotAuthorized {
                        initiator: initiator_name.to_string(),
                        target: target.to_string(),
                    });
                }
                Some(target.to_string())
            }
        };
        Ok(Identity {
            initiator_name: initiator_name.to_string(),
            initiator_alias: get("InitiatorAlias").map(str::to_string),
            session_type,
            chap: policy.chap(target_name.as_deref()),
            target_name,
        })
    }

    /// What the login established, for the final response.
    fn outcome(&self, req: &LoginRequest) -> Result<Outcome, LoginError> {
        let (Some(identity), Some(negotiator)) = (&self.identity, &self.negotiator) else {
            return Err(LoginError::AlreadyComplete);
        };
        Ok(Outcome {
            session_type: identity.session_type,
            initiator_name: identity.initiator_name.clone(),
            initiator_alias: identity.initiator_alias.clone(),
            target_name: identity.target_name.clone(),
            params: negotiator.params().clone(),
            isid: req.isid,
            tsih: req.tsih,
            cid: req.cid,
            chap_user: self.auth.user().map(str::to_string),
        })
    }

    /// Hands out the next part of the pending response; the last part carries the T bit and
    /// moves the login to the next stage.
    fn next_part(&mut self) -> Step {
        let Some(mut pending) = self.pending.take() else {
            return Step::Continue(LoginResponse::default());
        };
        let (data, more) = pending.text.next_chunk(LOGIN_MAX_DATA_SEGMENT);
        let mut response = LoginResponse {
            csg: pending.csg,
            data,
            ..Default::default()
        };
        if more {
            response.cont = true;
            self.pending = Some(pending);
            return Step::Continue(response);
        }
        response.transit = pending.transit;
        response.nsg = pending.nsg;
        if !pending.transit {
            return Step::Continue(response);
        }
        match pending.outcome.take() {
            Some(outcome) => {
                self.phase = Phase::Done;
                Step::Done { response, outcome }
            }
            None => {
                self.phase = Phase::Operational;
                Step::Continue(response)
            }
        }
    }
}

/// Checks a login key repeated in a later request: the same value is accepted (libiscsi sends
/// its names again in the operational stage after AuthMethod=None), another value is not.
fn redeclare(identity: &mut Identity, key: &str, value: &str) -> Result<(), LoginError> {
    let same = match key {
        "InitiatorName" => identity.initiator_name == value,
        "SessionType" => session_type(Some(value)).ok() == Some(identity.session_type),
        // A discovery session has no target; a TargetName there is ignored.
        "TargetName" => identity.target_name.as_deref().is_none_or(|t| t == value),
        "InitiatorAlias" => match &identity.initiator_alias {
            Some(alias) => alias == value,
            None => {
                identity.initiator_alias = Some(value.to_string());
                true
            }
        },
        _ => true,
    };
    if same {
        Ok(())
    } else {
        Err(LoginError::Redeclared(key.to_string()))
    }
}

fn session_type(value: Option<&str>) -> Result<SessionType, LoginError> {
    match value {
        None | Some("Normal") => Ok(SessionType::Normal),
        Some("Discovery") => Ok(SessionType::Discovery),
        Some(other) => Err(LoginError::UnsupportedSessionType(other.to_string())),
    }
}

fn check_name(name: &str) -> Result<(), LoginError> {
    if name.len() > MAX_NAME_LEN {
        return Err(LoginError::NameTooLong(name.len()));
    }
    Ok(())
}
