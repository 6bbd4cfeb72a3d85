//! Sense data (SPC-4 4.5): what a CHECK CONDITION tells the initiator.

/// Sense keys used by the target.
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// RECOVERED ERROR.
    pub const RECOVERED_ERROR: u8 = 0x1;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// COPY ABORTED: EXTENDED COPY failed while processing its segments.
    pub const COPY_ABORTED: u8 = 0xa;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xb;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xe;
}

/// A sense key with its additional sense code and qualifier, and the optional INFORMATION
/// and SENSE KEY SPECIFIC fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// The sense key (see [`key`]).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The INFORMATION field (for example, the miscompare offset), when valid.
    pub information: Option<u64>,
    /// SENSE KEY SPECIFIC field pointer for ILLEGAL REQUEST: `(in_cdb, byte, bit)`; `bit` is
    /// `None` when the whole byte is meant. For COPY ABORTED it is the segment pointer into
    /// the parameter list (`in_cdb` false).
    pub field: Option<(bool, u16, Option<u8>)>,
}

impl Sense {
    /// Sense with only key, ASC and ASCQ.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    /// The same sense with the INFORMATION field set.
    pub const fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    /// The same sense pointing at a CDB byte (and bit).
    pub const fn in_cdb(mut self, byte: u16, bit: Option<u8>) -> Sense {
        self.field = Some((true, byte, bit));
        self
    }

    /// The same sense pointing at a parameter-list byte (and bit).
    pub const fn in_parameters(mut self, byte: u16, bit: Option<u8>) -> Sense {
        self.field = Some((false, byte, bit));
        self
    }

    /// Whether this is a UNIT ATTENTION.
    pub const fn is_unit_attention(&self) -> bool {
        self.key == key::UNIT_ATTENTION
    }

    /// The three SENSE KEY SPECIFIC bytes (SKSV set), when a field pointer is present.
    fn key_specific(&self) -> Option<[u8; 3]> {
        let (in_cdb, byte, bit) = self.field?;
        let mut b = [0x80 | if in_cdb { 0x40 } else { 0 }, 0, 0];
        if let Some(bit) = bit {
            b[0] |= 0x08 | (bit & 0x07);
        }
        b[1..3].copy_from_slice(&byte.to_be_bytes());
        Some(b)
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    ///
    /// The fixed format has four bytes of INFORMATION: a larger value is left out and VALID
    /// stays clear (descriptor format carries all eight).
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80; // VALID
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(ks) = self.key_specific() {
            b[15..18].copy_from_slice(&ks);
        }
        b
    }

    /// Descriptor-format sense data (response code 0x72, SPC-4 4.5.2): the header, then an
    /// information descriptor and a sense key specific descriptor when those fields are set.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&[0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0]);
        if let Some(info) = self.information {
            // Information descriptor: type 0, length 0x0a, VALID.
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(ks) = self.key_specific() {
            // Sense key specific descriptor: type 2, length 6.
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&ks);
            b.push(0);
        }
        b[7] = (b.len() - 8) as u8;
        b
    }
}

/// Common sense values.
pub mod codes {
    use super::{Sense, key};

    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// INVALID MESSAGE ERROR.
    pub const INVALID_MESSAGE: Sense = Sense::new(key::ABORTED_COMMAND, 0x49, 0x00);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// LOGICAL UNIT SOFTWARE WRITE PROTECTED: the control mode page's SWP is set.
    pub const SOFTWARE_WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x02);
    /// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE.
    pub const PORT_UNAVAILABLE: Sense = Sense::new(key::NOT_READY, 0x04, 0x0c);
    /// LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION.
    pub const PORT_TRANSITIONING: Sense = Sense::new(key::NOT_READY, 0x04, 0x0a);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const RESET_OCCURRED: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    /// REPORTED LUNS DATA HAS CHANGED.
    pub const LUNS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x3f, 0x0e);
    /// CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
    /// ASYMMETRIC ACCESS STATE CHANGED.
    pub const ALUA_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x06);
    /// RESERVATIONS PREEMPTED.
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x03);
    /// RESERVATIONS RELEASED.
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x04);
    /// REGISTRATIONS PREEMPTED.
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x05);
    /// COMMANDS CLEARED BY ANOTHER INITIATOR.
    pub const COMMANDS_CLEARED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2f, 0x00);
    /// MODE PARAMETERS CHANGED.
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x01);
    /// NO SENSE: nothing to report (REQUEST SENSE without a pending condition).
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    /// INVALID FIELD IN COMMAND INFORMATION UNIT: the Data-Out the initiator announced cannot
    /// carry what the CDB asks for.
    pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// BUS DEVICE RESET FUNCTION OCCURRED: a LOGICAL UNIT RESET or TARGET RESET.
    pub const DEVICE_RESET_OCCURRED: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x03);
    /// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const NOT_READY: Sense = Sense::new(key::NOT_READY, 0x04, 0x00);
    /// INTERNAL TARGET FAILURE.
    pub const INTERNAL_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    /// INSUFFICIENT REGISTRATION RESOURCES.
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
    /// INSUFFICIENT RESOURCES: too many EXTENDED COPY commands run at once.
    pub const INSUFFICIENT_RESOURCES: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x03);
    /// OPERATION IN PROGRESS: an EXTENDED COPY with this list identifier is still running.
    pub const OPERATION_IN_PROGRESS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x00, 0x16);
    /// TOO MANY TARGET DESCRIPTORS (EXTENDED COPY).
    pub const TOO_MANY_TARGET_DESCRIPTORS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06);
    /// UNSUPPORTED TARGET DESCRIPTOR TYPE CODE (EXTENDED COPY).
    pub const UNSUPPORTED_TARGET_DESCRIPTOR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
    /// TOO MANY SEGMENT DESCRIPTORS (EXTENDED COPY).
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08);
    /// UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE (EXTENDED COPY).
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
    /// COPY ABORTED, UNREACHABLE COPY TARGET: a target descriptor names no logical unit this
    /// target serves to the initiator, or a segment names no target descriptor.
    pub const UNREACHABLE_COPY_TARGET: Sense = Sense::new(key::COPY_ABORTED, 0x08, 0x04);
    /// COPY ABORTED with no additional sense code: a segment cannot be copied (its range
    /// lies outside a logical unit); the segment pointer says which.
    pub const COPY_ABORTED: Sense = Sense::new(key::COPY_ABORTED, 0x00, 0x00);
}
