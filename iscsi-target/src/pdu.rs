//! The iSCSI PDU codec (RFC 7143 section 11), with no I/O.
//!
//! ```text
//!  byte 0        1        2        3        4         5..7       8..15      16..19   20..47
//!  +--------+--------+--------+--------+---------+-----------+----------+--------+-----------+
//!  |.I|opcod|F|flags |  opcode-specific | AHS len | data len  | LUN/spec |  ITT   | specific  |
//!  +--------+--------+--------+--------+---------+-----------+----------+--------+-----------+
//!  then: AHS (AHS len * 4 bytes), header digest (4, optional), data segment padded to 4 bytes,
//!  data digest (4, optional). Digests are CRC32C, sent least significant byte first.
//! ```
//!
//! [`Bhs`] is the 48-byte basic header segment with field accessors; [`Request`] is the typed
//! view of everything an initiator sends, and the `*Pdu` structs build what a target sends.
//! The driver reads a header with [`Framing::header_rest_len`] and [`Framing::parse_header`], then
//! reads the data segment straight into its destination (a write command's buffer) and checks
//! it with [`Framing::check_data`]; [`decode`] does all of it over one byte buffer for tests
//! and fuzzing.

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;

/// The largest data segment this codec accepts (2^24 - 1 is the field's limit).
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// The reserved "no task" tag value.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// Task Management Function Response.
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject: too many immediate commands.
    pub const IMMEDIATE: u8 = 0x06;
    /// Task in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// Invalid data ACK.
    pub const INVALID_DATA_ACK: u8 = 0x08;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
    /// Long operation reject: out of resources.
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    /// Waiting for Logout.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Why bytes are not a PDU we can use. Every variant is the peer's fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The header digest does not match the header.
    #[error("the header digest does not match")]
    HeaderDigest,
    /// The data digest does not match the data segment.
    #[error("the data digest does not match")]
    DataDigest,
    /// The opcode is not one an initiator sends.
    #[error("opcode {0:#04x} is not an initiator opcode")]
    Opcode(u8),
    /// The data segment is longer than the receiver declared it accepts.
    #[error("a data segment of {len} bytes exceeds the negotiated {max}")]
    DataTooLong {
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// An AHS is malformed.
    #[error("malformed additional header segment")]
    Ahs,
    /// A field holds a value the PDU cannot carry.
    #[error("invalid field: {0}")]
    Field(&'static str),
}

impl PduError {
    /// The Reject reason a target answers with, or `None` when the connection must close
    /// (a bad header cannot be trusted to find the next PDU).
    pub fn reject_reason(&self) -> Option<u8> {
        match self {
            PduError::HeaderDigest | PduError::DataTooLong { .. } | PduError::Ahs => None,
            PduError::DataDigest => Some(reject::DATA_DIGEST),
            PduError::Opcode(_) => Some(reject::NOT_SUPPORTED),
            PduError::Field(_) => Some(reject::INVALID_FIELD),
        }
    }
}

/// Serial number arithmetic (RFC 1982) for 32-bit sequence numbers: `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// The length of `len` rounded up to a multiple of 4.
pub fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// CRC32C as iSCSI puts it on the wire.
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let mut crc = 0;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    crc.to_le_bytes()
}

/// Decodes the 8-byte LUN field (SAM-5 4.7: peripheral and flat space addressing).
pub fn decode_lun(field: &[u8; 8]) -> u64 {
    match field[0] >> 6 {
        0 => u64::from(field[1]),
        1 => (u64::from(field[0] & 0x3f) << 8) | u64::from(field[1]),
        // Other addressing methods: keep the raw value so it matches no LUN.
        _ => u64::from_be_bytes(*field) | (1 << 63),
    }
}

/// Encodes a LUN number into the 8-byte field (peripheral below 256, flat space above).
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut f = [0u8; 8];
    if lun < 256 {
        f[1] = lun as u8;
    } else {
        f[0] = 0x40 | ((lun >> 8) & 0x3f) as u8;
        f[1] = lun as u8;
    }
    f
}

/// The 48-byte basic header segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op={:#04x} itt={:#x})", self.opcode(), self.itt())
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    /// A header with this opcode and every other field zero.
    pub fn new(opcode: u8) -> Bhs {
        let mut b = Bhs::default();
        b.0[0] = opcode & 0x3f;
        b
    }
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I (immediate) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    /// DataSegmentLength.
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    /// Sets DataSegmentLength (values above 2^24 - 1 are a caller bug and are cut).
    pub fn set_data_len(&mut self, len: u32) {
        let b = (len & MAX_DATA_SEGMENT).to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }
    /// The 8-byte LUN field.
    pub fn lun_field(&self) -> [u8; 8] {
        let mut f = [0u8; 8];
        f.copy_from_slice(&self.0[8..16]);
        f
    }
    /// Initiator task tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// The big-endian u32 at byte `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }
    /// The big-endian u16 at byte `at`.
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }
    /// Stores a big-endian u32 at byte `at`.
    pub fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    /// Stores a big-endian u16 at byte `at`.
    pub fn put_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// Sets the StatSN, ExpCmdSN and MaxCmdSN fields every target PDU carries at 24/28/32.
    pub fn set_sequence(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
        self.put_u32(24, stat_sn);
        self.put_u32(28, exp_cmd_sn);
        self.put_u32(32, max_cmd_sn);
    }
}

/// Digest settings of a connection (both off during login).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    /// CRC32C header digest.
    pub header_digest: bool,
    /// CRC32C data digest.
    pub data_digest: bool,
    /// The largest data segment the receiver accepts.
    pub max_recv_data: u32,
}

impl Framing {
    /// Framing for the login phase: no digests, 8 KiB text segments (RFC 7143 default).
    pub fn login() -> Framing {
        Framing {
            header_digest: false,
            data_digest: false,
            max_recv_data: 8192,
        }
    }

    /// The number of bytes after the BHS that belong to the header: the AHS and the header
    /// digest.
    pub fn header_rest_len(&self, bhs: &Bhs) -> usize {
        bhs.ahs_len() + if self.header_digest { 4 } else { 0 }
    }

    /// The bytes on the wire after the header for this PDU's data segment: the data, its
    /// padding and the data digest.
    pub fn data_wire_len(&self, bhs: &Bhs) -> usize {
        let len = bhs.data_len() as usize;
        if len == 0 {
            0
        } else {
            padded(len) + if self.data_digest { 4 } else { 0 }
        }
    }

    /// Checks the lengths a basic header announces before anything more is read: a data
    /// segment longer than negotiated (or an AHS where none may be) ends the connection
    /// without waiting for bytes that may never come.
    pub fn check_lengths(&self, bhs: &Bhs, ahs_allowed: bool) -> Result<(), PduError> {
        let len = bhs.data_len();
        if len > self.max_recv_data {
            return Err(PduError::DataTooLong {
                len,
                max: self.max_recv_data,
            });
        }
        if !ahs_allowed && bhs.ahs_len() > 0 {
            return Err(PduError::Ahs);
        }
        Ok(())
    }

    /// Checks a received header (`rest` holds what [`Framing::header_rest_len`] named) and
    /// returns the AHS. Login and text segments may be up to 8 KiB, Data-Out and immediate
    /// data up to the negotiated limit.
    pub fn parse_header<'a>(&self, bhs: &Bhs, rest: &'a [u8]) -> Result<&'a [u8], PduError> {
        let ahs_len = bhs.ahs_len();
        if rest.len() != self.header_rest_len(bhs) {
            return Err(PduError::Ahs);
        }
        let ahs = &rest[..ahs_len];
        if self.header_digest && rest[ahs_len..] != digest(&[&bhs.0, ahs]) {
            return Err(PduError::HeaderDigest);
        }
        let len = bhs.data_len();
        if len > self.max_recv_data {
            return Err(PduError::DataTooLong {
                len,
                max: self.max_recv_data,
            });
        }
        Ok(ahs)
    }

    /// Checks the data digest over `data` (the segment without padding), `pad` (the padding
    /// bytes read) and `received` (the 4 digest bytes).
    pub fn check_data(&self, data: &[u8], pad: &[u8], received: &[u8]) -> Result<(), PduError> {
        if self.data_digest && received != digest(&[data, pad]) {
            return Err(PduError::DataDigest);
        }
        Ok(())
    }

    /// Appends a whole PDU (header, digests, padded data) to `out`.
    pub fn encode_into(&self, bhs: &Bhs, data: &[u8], out: &mut Vec<u8>) {
        let mut bhs = *bhs;
        bhs.set_data_len(data.len() as u32);
        out.extend_from_slice(&bhs.0);
        if self.header_digest {
            out.extend_from_slice(&digest(&[&bhs.0]));
        }
        if !data.is_empty() {
            out.extend_from_slice(data);
            let pad = padded(data.len()) - data.len();
            out.extend_from_slice(&[0u8; 3][..pad]);
            if self.data_digest {
                out.extend_from_slice(&digest(&[data, &[0u8; 3][..pad]]));
            }
        }
    }
}

/// A whole PDU held in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    /// The header.
    pub bhs: Bhs,
    /// Additional header segments.
    pub ahs: Vec<u8>,
    /// The data segment without padding.
    pub data: Vec<u8>,
}

/// Decodes one PDU from the front of `buf`. `Ok(None)` means more bytes are needed;
/// `Ok(Some((pdu, used)))` gives the PDU and the bytes it took.
pub fn decode(framing: &Framing, buf: &[u8]) -> Result<Option<(Pdu, usize)>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let mut b = [0u8; BHS_LEN];
    b.copy_from_slice(&buf[..BHS_LEN]);
    let bhs = Bhs(b);
    let rest_len = framing.header_rest_len(&bhs);
    let data_wire = framing.data_wire_len(&bhs);
    let total = BHS_LEN + rest_len + data_wire;
    if buf.len() < BHS_LEN + rest_len {
        return Ok(None);
    }
    let ahs = framing
        .parse_header(&bhs, &buf[BHS_LEN..BHS_LEN + rest_len])?
        .to_vec();
    if buf.len() < total {
        return Ok(None);
    }
    let at = BHS_LEN + rest_len;
    let len = bhs.data_len() as usize;
    let data = buf[at..at + len].to_vec();
    if len > 0 {
        let pad_end = at + padded(len);
        framing.check_data(&data, &buf[at + len..pad_end], &buf[pad_end..total])?;
    }
    Ok(Some((Pdu { bhs, ahs, data }, total)))
}

/// A SCSI Command PDU's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    /// Immediate delivery.
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub final_bit: bool,
    /// R: data flows to the initiator.
    pub read: bool,
    /// W: data flows to the target.
    pub write: bool,
    /// Task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    /// The LUN number.
    pub lun: u64,
    /// Initiator task tag.
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub edtl: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The CDB: 16 bytes from the header, plus any extended-CDB AHS.
    pub cdb: Vec<u8>,
    /// Expected bidirectional read length, from a bidirectional AHS.
    pub bidi_read_len: Option<u32>,
    /// Immediate data length (the data segment).
    pub immediate_len: u32,
}

/// A Task Management Function Request's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmt {
    /// Immediate delivery.
    pub immediate: bool,
    /// The function code (see [`tmf`]).
    pub function: u8,
    /// The LUN number.
    pub lun: u64,
    /// Initiator task tag of the request itself.
    pub itt: u32,
    /// Referenced task tag (ABORT TASK).
    pub rtt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// RefCmdSN (ABORT TASK).
    pub ref_cmd_sn: u32,
}

/// Task management function codes and responses (RFC 7143 11.5, 11.6).
pub mod tmf {
    /// ABORT TASK.
    pub const ABORT_TASK: u8 = 1;
    /// ABORT TASK SET.
    pub const ABORT_TASK_SET: u8 = 2;
    /// CLEAR ACA.
    pub const CLEAR_ACA: u8 = 3;
    /// CLEAR TASK SET.
    pub const CLEAR_TASK_SET: u8 = 4;
    /// LOGICAL UNIT RESET.
    pub const LUN_RESET: u8 = 5;
    /// TARGET WARM RESET.
    pub const TARGET_WARM_RESET: u8 = 6;
    /// TARGET COLD RESET.
    pub const TARGET_COLD_RESET: u8 = 7;
    /// TASK REASSIGN.
    pub const TASK_REASSIGN: u8 = 8;
    /// Response: function complete.
    pub const COMPLETE: u8 = 0;
    /// Response: task does not exist.
    pub const NO_TASK: u8 = 1;
    /// Response: LUN does not exist.
    pub const NO_LUN: u8 = 2;
    /// Response: task still allegiant.
    pub const ALLEGIANT: u8 = 3;
    /// Response: task allegiance reassignment not supported.
    pub const REASSIGN_UNSUPPORTED: u8 = 4;
    /// Response: function not supported.
    pub const NOT_SUPPORTED: u8 = 5;
    /// Response: function authorization failed.
    pub const AUTH_FAILED: u8 = 6;
    /// Response: function rejected.
    pub const REJECTED: u8 = 255;
}

/// A Data-Out PDU's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    /// F: last PDU of the sequence.
    pub final_bit: bool,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag (the R2T's, or all ones for unsolicited data).
    pub ttt: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Offset of this data in the command's buffer.
    pub buffer_offset: u32,
    /// Length of the data segment.
    pub len: u32,
}

/// A Text Request's fields (the data segment travels separately).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    /// Immediate delivery.
    pub immediate: bool,
    /// F: last part of the request text.
    pub final_bit: bool,
    /// C: the text continues.
    pub cont: bool,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag (all ones to start; ours to continue).
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// A NOP-Out's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    /// Immediate delivery.
    pub immediate: bool,
    /// The LUN field, echoed.
    pub lun_field: [u8; 8],
    /// Initiator task tag (all ones: an answer to our NOP-In, needs no reply).
    pub itt: u32,
    /// Target transfer tag (ours when answering our ping).
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// A Logout Request's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logout {
    /// Immediate delivery.
    pub immediate: bool,
    /// Reason: 0 close the session, 1 close the connection, 2 remove it for recovery.
    pub reason: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// The connection to close (reasons 1 and 2).
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// Everything an initiator can send, typed. The data segment is not part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// NOP-Out.
    NopOut(NopOut),
    /// SCSI Command.
    Command(ScsiCommand),
    /// Task management.
    TaskMgmt(TaskMgmt),
    /// Login Request (the data segment is added by the caller).
    Login(crate::login::LoginRequest),
    /// Text Request.
    Text(TextRequest),
    /// Data-Out.
    DataOut(DataOut),
    /// Logout Request.
    Logout(Logout),
    /// SNACK (not used at ErrorRecoveryLevel 0).
    Snack {
        /// Initiator task tag.
        itt: u32,
    },
}

impl Request {
    /// Parses an initiator PDU header (and its AHS).
    pub fn parse(bhs: &Bhs, ahs: &[u8]) -> Result<Request, PduError> {
        let b = &bhs.0;
        let lun = decode_lun(&bhs.lun_field());
        Ok(match bhs.opcode() {
            op::NOP_OUT => Request::NopOut(NopOut {
                immediate: bhs.immediate(),
                lun_field: bhs.lun_field(),
                itt: bhs.itt(),
                ttt: bhs.u32_at(20),
                cmd_sn: bhs.u32_at(24),
                exp_stat_sn: bhs.u32_at(28),
            }),
            op::SCSI_COMMAND => {
                let mut cdb = b[32..48].to_vec();
                let mut bidi_read_len = None;
                for (kind, body) in ahs_segments(ahs)? {
                    match kind {
                        // Extended CDB: a reserved byte, then the CDB bytes past 16.
                        1 => cdb.extend_from_slice(body.get(1..).ok_or(PduError::Ahs)?),
                        // Bidirectional read length.
                        2 => {
                            let v = body.get(1..5).ok_or(PduError::Ahs)?;
                            bidi_read_len = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                        }
                        _ => return Err(PduError::Ahs),
                    }
                }
                Request::Command(ScsiCommand {
                    immediate: bhs.immediate(),
                    final_bit: bhs.final_bit(),
                    read: b[1] & 0x40 != 0,
                    write: b[1] & 0x20 != 0,
                    attr: b[1] & 0x07,
                    lun,
                    itt: bhs.itt(),
                    edtl: bhs.u32_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                    cdb,
                    bidi_read_len,
                    immediate_len: bhs.data_len(),
                })
            }
            op::TASK_MGMT => Request::TaskMgmt(TaskMgmt {
                immediate: bhs.immediate(),
                function: b[1] & 0x7f,
                lun,
                itt: bhs.itt(),
                rtt: bhs.u32_at(20),
                cmd_sn: bhs.u32_at(24),
                exp_stat_sn: bhs.u32_at(28),
                ref_cmd_sn: bhs.u32_at(32),
            }),
            op::LOGIN => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Request::Login(crate::login::LoginRequest {
                    transit: b[1] & 0x80 != 0,
                    cont: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 0x03,
                    nsg: b[1] & 0x03,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: bhs.u16_at(14),
                    itt: bhs.itt(),
                    cid: bhs.u16_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                    data: Vec::new(),
                })
            }
            op::TEXT => Request::Text(TextRequest {
                immediate: bhs.immediate(),
                final_bit: bhs.final_bit(),
                cont: b[1] & 0x40 != 0,
                itt: bhs.itt(),
                ttt: bhs.u32_at(20),
                cmd_sn: bhs.u32_at(24),
                exp_stat_sn: bhs.u32_at(28),
            }),
            op::DATA_OUT => Request::DataOut(DataOut {
                final_bit: bhs.final_bit(),
                itt: bhs.itt(),
                ttt: bhs.u32_at(20),
                data_sn: bhs.u32_at(36),
                buffer_offset: bhs.u32_at(40),
                len: bhs.data_len(),
            }),
            op::LOGOUT => Request::Logout(Logout {
                immediate: bhs.immediate(),
                reason: b[1] & 0x7f,
                itt: bhs.itt(),
                cid: bhs.u16_at(20),
                cmd_sn: bhs.u32_at(24),
                exp_stat_sn: bhs.u32_at(28),
            }),
            op::SNACK => Request::Snack { itt: bhs.itt() },
            other => return Err(PduError::Opcode(other)),
        })
    }
}

/// Splits an AHS area into (type, body) segments.
fn ahs_segments(mut ahs: &[u8]) -> Result<Vec<(u8, &[u8])>, PduError> {
    let mut out = Vec::new();
    while !ahs.is_empty() {
        if ahs.len() < 4 {
            return Err(PduError::Ahs);
        }
        let len = usize::from(u16::from_be_bytes([ahs[0], ahs[1]]));
        let kind = ahs[2];
        // The length counts the bytes after the type byte; the segment is padded to 4.
        let end = 3 + len;
        let body = ahs.get(3..end).ok_or(PduError::Ahs)?;
        out.push((kind, body));
        let next = padded(end);
        ahs = ahs.get(next..).ok_or(PduError::Ahs)?;
    }
    Ok(out)
}

/// Builds a SCSI Response header. `residual` is (overflow, count) when the command moved
/// less or more data than the initiator expected.
pub fn scsi_response(itt: u32, status: u8, residual: Option<(bool, u32)>, exp_data_sn: u32) -> Bhs {
    let mut b = Bhs::new(op::SCSI_RESPONSE);
    b.0[1] = 0x80;
    if let Some((overflow, count)) = residual {
        b.0[1] |= if overflow { 0x04 } else { 0x02 };
        b.put_u32(44, count);
    }
    b.0[2] = 0; // command completed at target
    b.0[3] = status;
    b.put_u32(16, itt);
    b.put_u32(20, 0); // SNACK tag
    b.put_u32(36, exp_data_sn);
    b
}

/// The data segment of a SCSI Response carrying sense data.
pub fn sense_segment(sense: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + sense.len());
    d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
    d.extend_from_slice(sense);
    d
}

/// Builds a Data-In header. With `status`, the PDU also completes the command (phase
/// collapse) and carries the residual.
pub fn data_in(
    itt: u32,
    lun: u64,
    data_sn: u32,
    offset: u32,
    final_bit: bool,
    status: Option<(u8, Option<(bool, u32)>)>,
) -> Bhs {
    let mut b = Bhs::new(op::DATA_IN);
    if final_bit {
        b.0[1] |= 0x80;
    }
    if let Some((status, residual)) = status {
        b.0[1] |= 0x01;
        b.0[3] = status;
        if let Some((overflow, count)) = residual {
            b.0[1] |= if overflow { 0x04 } else { 0x02 };
            b.put_u32(44, count);
        }
    }
    b.0[8..16].copy_from_slice(&encode_lun(lun));
    b.put_u32(16, itt);
    b.put_u32(20, RESERVED_TAG);
    b.put_u32(36, data_sn);
    b.put_u32(40, offset);
    b
}

/// Builds an R2T header.
pub fn r2t(itt: u32, lun: u64, ttt: u32, r2t_sn: u32, offset: u32, len: u32) -> Bhs {
    let mut b = Bhs::new(op::R2T);
    b.0[1] = 0x80;
    b.0[8..16].copy_from_slice(&encode_lun(lun));
    b.put_u32(16, itt);
    b.put_u32(20, ttt);
    b.put_u32(36, r2t_sn);
    b.put_u32(40, offset);
    b.put_u32(44, len);
    b
}

/// Builds a NOP-In header: an answer (`itt` from the NOP-Out, `ttt` all ones) or a ping
/// (`itt` all ones, `ttt` ours).
pub fn nop_in(itt: u32, ttt: u32, lun_field: [u8; 8]) -> Bhs {
    let mut b = Bhs::new(op::NOP_IN);
    b.0[1] = 0x80;
    b.0[8..16].copy_from_slice(&lun_field);
    b.put_u32(16, itt);
    b.put_u32(20, ttt);
    b
}

/// Builds a Task Management Function Response header.
pub fn task_mgmt_response(itt: u32, response: u8) -> Bhs {
    let mut b = Bhs::new(op::TASK_MGMT_RESPONSE);
    b.0[1] = 0x80;
    b.0[2] = response;
    b.put_u32(16, itt);
    b
}

/// Builds a Text Response header.
pub fn text_response(itt: u32, ttt: u32, final_bit: bool, cont: bool) -> Bhs {
    let mut b = Bhs::new(op::TEXT_RESPONSE);
    if final_bit {
        b.0[1] |= 0x80;
    }
    if cont {
        b.0[1] |= 0x40;
    }
    b.put_u32(16, itt);
    b.put_u32(20, ttt);
    b
}

/// Builds a Logout Response header.
pub fn logout_response(itt: u32, response: u8) -> Bhs {
    let mut b = Bhs::new(op::LOGOUT_RESPONSE);
    b.0[1] = 0x80;
    b.0[2] = response;
    b.put_u32(16, itt);
    // Time2Wait and Time2Retain stay 0: at ErrorRecoveryLevel 0 nothing is kept.
    b
}

/// Builds a Reject header; its data segment is the rejected PDU's header.
pub fn reject(reason: u8) -> Bhs {
    let mut b = Bhs::new(op::REJECT);
    b.0[1] = 0x80;
    b.0[2] = reason;
    b.put_u32(16, RESERVED_TAG);
    b
}

/// Builds an Asynchronous Message header.
pub fn async_message(lun: u64, event: u8, params: [u16; 3]) -> Bhs {
    let mut b = Bhs::new(op::ASYNC);
    b.0[1] = 0x80;
    b.0[8..16].copy_from_slice(&encode_lun(lun));
    b.put_u32(16, RESERVED_TAG);
    b.0[36] = event;
    for (i, p) in params.iter().enumerate() {
        b.put_u16(38 + 2 * i, *p);
    }
    b
}

/// Builds a Login Response header from the login state machine's answer.
pub fn login_response(
    req: &crate::login::LoginRequest,
    resp: &crate::login::LoginResponse,
    tsih: u16,
) -> Bhs {
    let mut b = Bhs::new(op::LOGIN_RESPONSE);
    b.0[1] = (if resp.transit { 0x80 } else { 0 })
        | (if resp.cont { 0x40 } else { 0 })
        | ((resp.csg & 3) << 2)
        | (resp.nsg & 3);
    b.0[2] = 0; // Version-max
    b.0[3] = 0; // Version-active
    b.0[8..14].copy_from_slice(&req.isid);
    b.put_u16(14, tsih);
    b.put_u32(16, req.itt);
    b.0[36] = resp.status_class;
    b.0[37] = resp.status_detail;
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn command_bhs(cdb: &[u8], edtl: u32, data: u32) -> Bhs {
        let mut b = Bhs::new(op::SCSI_COMMAND);
        b.0[1] = 0x80 | 0x20 | 1;
        b.0[8..16].copy_from_slice(&encode_lun(3));
        b.put_u32(16, 0x1234);
        b.put_u32(20, edtl);
        b.put_u32(24, 7);
        b.put_u32(28, 9);
        b.0[32..32 + cdb.len()].copy_from_slice(cdb);
        b.set_data_len(data);
        b
    }

    #[test]
    fn test_command_parse_fields() {
        let b = command_bhs(&[0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0], 4096, 4096);
        let Request::Command(c) = Request::parse(&b, &[]).unwrap() else {
            panic!()
        };
        assert!(c.write && c.final_bit && !c.read);
        assert_eq!(
            (c.lun, c.itt, c.edtl, c.cmd_sn, c.exp_stat_sn),
            (3, 0x1234, 4096, 7, 9)
        );
        assert_eq!(c.cdb[0], 0x2a);
        assert_eq!(c.immediate_len, 4096);
    }

    #[test]
    fn test_command_extended_cdb_ahs() {
        let mut b = command_bhs(&[0x7f; 16], 0, 0);
        // A 32-byte CDB: 16 in the header, 16 in an extended-CDB AHS (length 17).
        let mut ahs = vec![0, 17, 1, 0];
        ahs.extend_from_slice(&[0xaa; 16]);
        b.0[4] = 5;
        let Request::Command(c) = Request::parse(&b, &ahs).unwrap() else {
            panic!()
        };
        assert_eq!(c.cdb.len(), 32);
        assert_eq!(&c.cdb[16..], &[0xaa; 16]);
    }

    #[test]
    fn test_lun_round_trip() {
        for lun in [0u64, 1, 255, 256, 1000, 16383] {
            assert_eq!(decode_lun(&encode_lun(lun)), lun);
        }
    }

    #[test]
    fn test_sn_serial_arithmetic() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fff0, 3));
        assert!(!sn_lt(3, 0xffff_fff0));
        assert!(sn_le(5, 5));
    }

    #[test]
    fn test_decode_digests_detect_corruption() {
        let framing = Framing {
            header_digest: true,
            data_digest: true,
            max_recv_data: 65536,
        };
        let b = command_bhs(&[0x2a], 5, 5);
        let mut wire = Vec::new();
        framing.encode_into(&b, b"hello", &mut wire);
        assert_eq!(wire.len(), 48 + 4 + 8 + 4);
        let (pdu, used) = decode(&framing, &wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(pdu.data, b"hello");
        let mut bad = wire.clone();
        bad[20] ^= 1;
        assert_eq!(decode(&framing, &bad), Err(PduError::HeaderDigest));
        let mut bad = wire.clone();
        bad[53] ^= 1;
        assert_eq!(decode(&framing, &bad), Err(PduError::DataDigest));
        // Every prefix asks for more bytes.
        for n in 0..wire.len() {
            assert_eq!(decode(&framing, &wire[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn test_decode_refuses_oversized_data() {
        let framing = Framing {
            max_recv_data: 8192,
            ..Framing::default()
        };
        let b = command_bhs(&[0x2a], 0, 8193);
        assert!(matches!(
            decode(&framing, &b.0),
            Err(PduError::DataTooLong { .. })
        ));
    }

    #[test]
    fn test_crc32c_known_value() {
        // RFC 3720 B.4: 32 bytes of zeroes give CRC 0x8a9136aa.
        assert_eq!(digest(&[&[0u8; 32]]), 0x8a91_36aau32.to_le_bytes());
    }

    proptest! {
        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                    hd: bool, dd: bool) {
            let framing = Framing { header_digest: hd, data_digest: dd, max_recv_data: 1024 };
            if let Ok(Some((pdu, _))) = decode(&framing, &bytes) {
                let _ = Request::parse(&pdu.bhs, &pdu.ahs);
            }
        }

        #[test]
        fn prop_encode_decode_round_trip(data in proptest::collection::vec(any::<u8>(), 0..300),
                                         hd: bool, dd: bool, itt: u32) {
            let framing = Framing { header_digest: hd, data_digest: dd, max_recv_data: 1024 };
            let mut b = Bhs::new(op::NOP_OUT);
            b.put_u32(16, itt);
            let mut wire = Vec::new();
            framing.encode_into(&b, &data, &mut wire);
            let (pdu, used) = decode(&framing, &wire).unwrap().unwrap();
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(pdu.data, data);
            prop_assert_eq!(pdu.bhs.itt(), itt);
        }
    }
}
