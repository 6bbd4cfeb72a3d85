//! The login phase (RFC 7143 section 6): security negotiation with CHAP and operational
//! negotiation, as a state machine over login request fields. No I/O.

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
