//! Persistent reservations (SPC-4 5.13, PERSISTENT RESERVE IN 6.15, PERSISTENT RESERVE OUT
//! 6.16) and SPC-2 RESERVE/RELEASE, as pure functions of the reservation state.
//!
//! # The cluster model
//!
//! The target runs on every node; each node's portal is one SCSI target port, named by its
//! relative target port identifier ([`Nexus::relative_port`]). The reservation state of a LUN
//! ([`PrState`]) is kept by the cluster, so a registration made through one node's portal is
//! seen, and conflicts, through every other node's portal. The functions here only decide:
//! given the current state and a request they return the new state (with
//! [`PrState::version`] bumped) or a conflict or sense data. The caller stores a new state
//! with a compare-and-set on `version` and, when another change came first, reads the state
//! again and calls the function again.
//!
//! An I_T nexus is an initiator port (iSCSI name and ISID) together with a target port.
//! A registration made with ALL_TG_PT=0 holds only for the target port it was made through:
//! the same initiator port arriving through another node's portal is a different, unregistered
//! I_T nexus. With ALL_TG_PT=1 the initiator port is registered through every target port.
//!
//! # The state
//!
//! ```text
//! PrState
//! ├── version         compare-and-set token, +1 on every stored change
//! ├── generation      PRgeneration (SPC-4 6.15.2), a wrapping 32-bit counter
//! ├── aptpl           the last APTPL bit received (reported as PTPL_A)
//! ├── registrations   [Registration]   in registration order (READ KEYS order)
//! │     key, initiator, isid (None: every ISID), relative_port, all_tg_pt, holder
//! ├── reservation     Option<PrType>   the holder is the registration marked `holder`,
//! │                                    or every registration for the all-registrants types
//! ├── legacy          Option<LegacyReservation>   SPC-2 RESERVE holder (one I_T nexus)
//! └── attentions      [Attention]      unit attentions owed to other I_T nexuses
//! ```
//!
//! No two registrations cover the same I_T nexus, so an I_T nexus has at most one key.
//! [`PrState::validate`] checks this and the other invariants.
//!
//! # Behaviour worth knowing
//!
//! - REPORT CAPABILITIES says CRH=0: RESERVE and RELEASE follow SPC-2. They conflict while any
//!   registration exists, and while an SPC-2 reservation is held every PERSISTENT RESERVE IN
//!   and OUT conflicts, from every I_T nexus including the holder (SPC-2 5.5.1). Other I_T
//!   nexuses may still send INQUIRY, REQUEST SENSE, REPORT LUNS, LOG SENSE, RELEASE (which
//!   does nothing for them), PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0 and REPORT TARGET
//!   PORT GROUPS. The SPC-2 reservation ends with RELEASE, with the loss of the holder's I_T
//!   nexus ([`nexus_loss`], [`port_loss`]) and with a logical unit or target reset
//!   ([`logical_unit_reset`]); registrations and persistent reservations survive all of these.
//! - SPEC_I_PT is supported (SIP_C=1) with iSCSI TransportIDs of format 00b (every initiator
//!   port with that name) and 01b (one initiator port, `name,i,0x<isid>`). A TransportID naming
//!   the sending I_T nexus, or one already named earlier in the list, is skipped; one that
//!   overlaps an existing registration makes the command fail with INVALID FIELD IN PARAMETER
//!   LIST and nothing is registered.
//! - APTPL is accepted and recorded (PTPL_C=1, PTPL_A reports the last value received), but the
//!   state lives in the cluster's replicated store, so registrations and reservations survive
//!   the restart of any node, and of the whole cluster, whatever the APTPL bit says.
//! - At most [`MAX_REGISTRATIONS`] registrations per LUN; one more gets INSUFFICIENT
//!   REGISTRATION RESOURCES. At most [`MAX_ATTENTIONS`] pending unit attentions; the oldest
//!   is dropped beyond that.
//! - Unit attentions for a registration made with ALL_TG_PT=1 are reported once, through the
//!   first target port the initiator port sends a command through.
//! - PREEMPT AND ABORT lists the initiator ports of the preempted registrations; the caller
//!   aborts their tasks on this LUN. The sending initiator port is never listed.
//!
//! # What the caller does
//!
//! Before executing a command: skip everything when [`PrState::is_empty`]; otherwise report
//! [`pending_attention`] (except to INQUIRY, REPORT LUNS and REQUEST SENSE) and store
//! [`clear_attention`]; then ask [`access`] and answer RESERVATION CONFLICT when it says so.
//! PERSISTENT RESERVE IN goes to [`reserve_in`], PERSISTENT RESERVE OUT to [`reserve_out`],
//! RESERVE(6)/(10) to [`reserve`] and RELEASE(6)/(10) to [`release`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::sense::{Sense, codes, key};
use crate::backend::Nexus;

/// The most registrations one LUN holds.
pub const MAX_REGISTRATIONS: usize = 256;

/// The most unit attentions kept for one LUN; the oldest is dropped beyond that.
pub const MAX_ATTENTIONS: usize = 256;

/// INVALID RELEASE OF PERSISTENT RESERVATION.
pub const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);

/// The longest iSCSI name (RFC 7143 4.2.7.1), in bytes.
const MAX_ISCSI_NAME: usize = 223;

/// Operation codes the reservation rules look at.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const INQUIRY: u8 = 0x12;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const RECEIVE_DIAGNOSTIC: u8 = 0x1c;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const READ_BUFFER_10: u8 = 0x3c;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const XDREAD_10: u8 = 0x52;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const VARIABLE_LENGTH: u8 = 0x7f;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const ACCESS_CONTROL_IN: u8 = 0x86;
    pub const ACCESS_CONTROL_OUT: u8 = 0x87;
    pub const READ_16: u8 = 0x88;
    pub const READ_ATTRIBUTE: u8 = 0x8c;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const READ_BUFFER_16: u8 = 0x9b;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const SECURITY_PROTOCOL_IN: u8 = 0xa2;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const SERVICE_ACTION_IN_12: u8 = 0xab;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}

/// PERSISTENT RESERVE IN service actions.
mod pr_in {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions.
mod pr_out {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// A persistent reservation type (SPC-4 6.16.2, table 215).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrType {
    /// Write Exclusive (1): only the holder writes; everyone reads.
    WriteExclusive,
    /// Exclusive Access (3): only the holder reads or writes.
    ExclusiveAccess,
    /// Write Exclusive – Registrants Only (5): registrants write; everyone reads.
    WriteExclusiveRegistrantsOnly,
    /// Exclusive Access – Registrants Only (6): only registrants read or write.
    ExclusiveAccessRegistrantsOnly,
    /// Write Exclusive – All Registrants (7): every registrant is a holder; everyone reads.
    WriteExclusiveAllRegistrants,
    /// Exclusive Access – All Registrants (8): every registrant is a holder.
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// Every type, in code order.
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];

    /// The type with the TYPE field value `code`, if it is one of the six.
    pub fn from_code(code: u8) -> Option<PrType> {
        match code {
            1 => Some(PrType::WriteExclusive),
            3 => Some(PrType::ExclusiveAccess),
            5 => Some(PrType::WriteExclusiveRegistrantsOnly),
            6 => Some(PrType::ExclusiveAccessRegistrantsOnly),
            7 => Some(PrType::WriteExclusiveAllRegistrants),
            8 => Some(PrType::ExclusiveAccessAllRegistrants),
            _ => None,
        }
    }

    /// The TYPE field value.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Every registrant holds the reservation (types 7 and 8).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// A registrants-only type (5 and 6).
    pub fn registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Registered I_T nexuses that do not hold the reservation get full access (5 to 8).
    fn admits_registrants(self) -> bool {
        self.registrants_only() || self.all_registrants()
    }

    /// A write-exclusive type: everyone may read (1, 5 and 7).
    fn shares_reads(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive
                | PrType::WriteExclusiveRegistrantsOnly
                | PrType::WriteExclusiveAllRegistrants
        )
    }
}

/// One registration: a reservation key for the I_T nexuses it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The reservation key (never zero).
    pub key: u64,
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The ISID that with the name makes the initiator port; `None` (a SPEC_I_PT or REGISTER
    /// AND MOVE TransportID of format 00b) covers every initiator port with that name.
    pub isid: Option<[u8; 6]>,
    /// The relative target port identifier the registration was made through.
    pub relative_port: u16,
    /// Registered through every target port (ALL_TG_PT=1), not only `relative_port`.
    pub all_tg_pt: bool,
    /// This registration holds the reservation (never set for the all-registrants types,
    /// where every registration holds it).
    pub holder: bool,
}

impl Registration {
    /// Whether the registration covers the I_T nexus `nexus`.
    pub fn covers(&self, nexus: &Nexus) -> bool {
        self.initiator.eq_ignore_ascii_case(&nexus.initiator)
            && self.isid.is_none_or(|isid| isid == nexus.isid)
            && (self.all_tg_pt || self.relative_port == nexus.relative_port)
    }

    /// Whether some I_T nexus is covered by both registrations.
    fn overlaps(&self, other: &Registration) -> bool {
        self.initiator.eq_ignore_ascii_case(&other.initiator)
            && (self.isid.is_none() || other.isid.is_none() || self.isid == other.isid)
            && (self.all_tg_pt || other.all_tg_pt || self.relative_port == other.relative_port)
    }

    /// Whether every I_T nexus `other` covers is covered by `self`.
    fn contains(&self, other: &Registration) -> bool {
        self.initiator.eq_ignore_ascii_case(&other.initiator)
            && (self.isid.is_none() || self.isid == other.isid)
            && (self.all_tg_pt || (!other.all_tg_pt && self.relative_port == other.relative_port))
    }

    /// The initiator port name, `iqn...,i,0x<isid>`, or only the iSCSI name when the
    /// registration covers every ISID.
    pub fn port_name(&self) -> String {
        port_name(&self.initiator, self.isid)
    }

    /// The TransportID that names the registered initiator port(s).
    pub fn transport_id(&self) -> TransportId {
        TransportId {
            name: self.initiator.clone(),
            isid: self.isid,
        }
    }
}

/// The I_T nexus holding an SPC-2 reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyReservation {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The initiator session id.
    pub isid: [u8; 6],
    /// The relative target port identifier the reservation was made through.
    pub relative_port: u16,
}

impl LegacyReservation {
    fn of(nexus: &Nexus) -> LegacyReservation {
        LegacyReservation {
            initiator: nexus.initiator.clone(),
            isid: nexus.isid,
            relative_port: nexus.relative_port,
        }
    }

    /// Whether `nexus` is the holder.
    pub fn is(&self, nexus: &Nexus) -> bool {
        self.initiator.eq_ignore_ascii_case(&nexus.initiator)
            && self.isid == nexus.isid
            && self.relative_port == nexus.relative_port
    }
}

/// The unit attention conditions persistent reservations establish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttentionKind {
    /// REGISTRATIONS PREEMPTED (2Ah/05h): PREEMPT removed the registration.
    RegistrationsPreempted,
    /// RESERVATIONS PREEMPTED (2Ah/03h): CLEAR removed every registration.
    ReservationsPreempted,
    /// RESERVATIONS RELEASED (2Ah/04h): a registrants-only or all-registrants reservation was
    /// released, or a preempt changed the reservation's type.
    ReservationsReleased,
}

impl AttentionKind {
    /// The sense data reported.
    pub fn sense(self) -> Sense {
        match self {
            AttentionKind::RegistrationsPreempted => codes::REGISTRATIONS_PREEMPTED,
            AttentionKind::ReservationsPreempted => codes::RESERVATIONS_PREEMPTED,
            AttentionKind::ReservationsReleased => codes::RESERVATIONS_RELEASED,
        }
    }
}

/// A unit attention owed to the I_T nexuses of a (former) registration. It is kept in the
/// shared state because the initiator may be connected to another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The initiator session id; `None` for every ISID of the name.
    pub isid: Option<[u8; 6]>,
    /// The relative target port; `None` for every target port (an ALL_TG_PT registration).
    pub relative_port: Option<u16>,
    /// The condition.
    pub kind: AttentionKind,
}

impl Attention {
    fn for_registration(reg: &Registration, kind: AttentionKind) -> Attention {
        Attention {
            initiator: reg.initiator.clone(),
            isid: reg.isid,
            relative_port: (!reg.all_tg_pt).then_some(reg.relative_port),
            kind,
        }
    }

    /// Whether the attention is owed to `nexus`.
    pub fn applies_to(&self, nexus: &Nexus) -> bool {
        self.initiator.eq_ignore_ascii_case(&nexus.initiator)
            && self.isid.is_none_or(|isid| isid == nexus.isid)
            && self
                .relative_port
                .is_none_or(|port| port == nexus.relative_port)
    }
}

/// The reservation state of one LUN.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    /// Bumped by every stored change; the compare-and-set token.
    pub version: u64,
    /// PRgeneration: counts REGISTER, REGISTER AND IGNORE EXISTING KEY, CLEAR, PREEMPT,
    /// PREEMPT AND ABORT and REGISTER AND MOVE that changed something (wrapping).
    pub generation: u32,
    /// The APTPL bit of the last REGISTER, REGISTER AND IGNORE EXISTING KEY or REGISTER AND
    /// MOVE (reported as PTPL_A; the state persists regardless).
    pub aptpl: bool,
    /// The registrations, oldest first.
    pub registrations: Vec<Registration>,
    /// The persistent reservation's type, if one is held.
    pub reservation: Option<PrType>,
    /// The SPC-2 reservation, if one is held.
    pub legacy: Option<LegacyReservation>,
    /// Unit attentions not yet reported, oldest first.
    pub attentions: Vec<Attention>,
}

/// A [`PrState`] that breaks an invariant (for instance, read back corrupted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A registration with reservation key zero.
    #[error("registration {0} has reservation key zero")]
    ZeroKey(usize),
    /// A registration through relative target port zero.
    #[error("registration {0} names relative target port zero")]
    ZeroPort(usize),
    /// Two registrations cover a common I_T nexus.
    #[error("registrations {0} and {1} cover the same I_T nexus")]
    Overlap(usize, usize),
    /// More registrations than [`MAX_REGISTRATIONS`].
    #[error("{0} registrations exceed the limit of {MAX_REGISTRATIONS}")]
    TooManyRegistrations(usize),
    /// More unit attentions than [`MAX_ATTENTIONS`].
    #[error("{0} unit attentions exceed the limit of {MAX_ATTENTIONS}")]
    TooManyAttentions(usize),
    /// The number of registrations marked holder does not fit the reservation.
    #[error("{holders} registrations are marked holder for reservation {reservation:?}")]
    Holders {
        /// The reservation type.
        reservation: Option<PrType>,
        /// Registrations marked holder.
        holders: usize,
    },
    /// An all-registrants reservation without registrations.
    #[error("an all-registrants reservation is held with no registrations")]
    NoRegistrants,
    /// An SPC-2 reservation together with registrations.
    #[error("an SPC-2 reservation is held while registrations exist")]
    LegacyWithRegistrations,
}

impl PrState {
    /// No registrations, no reservation of either kind and no pending unit attentions: no
    /// command needs checking.
    pub fn is_empty(&self) -> bool {
        self.registrations.is_empty()
            && self.reservation.is_none()
            && self.legacy.is_none()
            && self.attentions.is_empty()
    }

    /// The registration covering `nexus`.
    pub fn registration(&self, nexus: &Nexus) -> Option<&Registration> {
        self.find(nexus).map(|i| &self.registrations[i])
    }

    /// Whether `nexus` holds the persistent reservation.
    pub fn is_holder(&self, nexus: &Nexus) -> bool {
        self.find(nexus).is_some_and(|i| self.holds(i))
    }

    /// The reservation key READ RESERVATION reports: the holder's, or zero for the
    /// all-registrants types. `None` without a persistent reservation.
    pub fn reservation_key(&self) -> Option<u64> {
        let pr_type = self.reservation?;
        if pr_type.all_registrants() {
            return Some(0);
        }
        self.registrations.iter().find(|r| r.holder).map(|r| r.key)
    }

    /// Checks the invariants every state produced by this module keeps.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.registrations.len() > MAX_REGISTRATIONS {
            return Err(StateError::TooManyRegistrations(self.registrations.len()));
        }
        if self.attentions.len() > MAX_ATTENTIONS {
            return Err(StateError::TooManyAttentions(self.attentions.len()));
        }
        for (i, reg) in self.registrations.iter().enumerate() {
            if reg.key == 0 {
                return Err(StateError::ZeroKey(i));
            }
            if reg.relative_port == 0 {
                return Err(StateError::ZeroPort(i));
            }
            if let Some(j) = self.registrations[..i].iter().position(|o| o.overlaps(reg)) {
                return Err(StateError::Overlap(j, i));
            }
        }
        let holders = self.registrations.iter().filter(|r| r.holder).count();
        let expected = match self.reservation {
            Some(t) if !t.all_registrants() => 1,
            _ => 0,
        };
        if holders != expected {
            return Err(StateError::Holders {
                reservation: self.reservation,
                holders,
            });
        }
        if self.reservation.is_some_and(PrType::all_registrants) && self.registrations.is_empty() {
            return Err(StateError::NoRegistrants);
        }
        if self.legacy.is_some() && !self.registrations.is_empty() {
            return Err(StateError::LegacyWithRegistrations);
        }
        Ok(())
    }

    fn find(&self, nexus: &Nexus) -> Option<usize> {
        self.registrations.iter().position(|r| r.covers(nexus))
    }

    /// Whether registration `i` holds the persistent reservation.
    fn holds(&self, i: usize) -> bool {
        match self.reservation {
            Some(t) if t.all_registrants() => true,
            Some(_) => self.registrations[i].holder,
            None => false,
        }
    }

    /// A copy to change, its version bumped.
    fn next(&self) -> PrState {
        let mut state = self.clone();
        state.version = state.version.wrapping_add(1);
        state
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn add_attention(&mut self, attention: Attention) {
        if self.attentions.contains(&attention) {
            return;
        }
        if self.attentions.len() >= MAX_ATTENTIONS {
            self.attentions.remove(0);
        }
        self.attentions.push(attention);
    }

    /// Sets attention `kind` for every registration but `except`.
    fn notify_registrants(&mut self, except: Option<usize>, kind: AttentionKind) {
        let owed: Vec<Attention> = (self.registrations.iter().enumerate())
            .filter(|&(i, _)| Some(i) != except)
            .map(|(_, reg)| Attention::for_registration(reg, kind))
            .collect();
        for attention in owed {
            self.add_attention(attention);
        }
    }

    /// Removes the registrations `remove` selects (by former index); returns them with their
    /// former indices, and the new index of registration `keep` when it stays.
    fn remove_registrations(
        &mut self,
        keep: usize,
        mut remove: impl FnMut(usize, &Registration) -> bool,
    ) -> (Vec<(usize, Registration)>, Option<usize>) {
        let mut kept = Vec::with_capacity(self.registrations.len());
        let mut removed = Vec::new();
        let mut keep_at = None;
        for (i, reg) in std::mem::take(&mut self.registrations)
            .into_iter()
            .enumerate()
        {
            if remove(i, &reg) {
                removed.push((i, reg));
            } else {
                if i == keep {
                    keep_at = Some(kept.len());
                }
                kept.push(reg);
            }
        }
        self.registrations = kept;
        (removed, keep_at)
    }
}

/// Whether a command may run under the current reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The command may run.
    Allowed,
    /// The command gets RESERVATION CONFLICT.
    Conflict,
}

/// What a PERSISTENT RESERVE OUT (or RESERVE/RELEASE) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutOutcome {
    /// Done; store `state` (its version already bumped) when it is `Some`.
    Done {
        /// The new state, or `None` when nothing changed.
        state: Option<PrState>,
        /// Initiator ports (`Nexus::initiator_port_name`) whose tasks on this LUN must be
        /// aborted (PREEMPT AND ABORT). An entry without `,i,0x` is an iSCSI name and means
        /// every initiator port with that name.
        abort: Vec<String>,
    },
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// How the reservation rules treat an operation code (SPC-4 table 66, SBC-3 table 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Allowed whatever the reservation.
    Unrestricted,
    /// Reads medium or device data: allowed for non-holders of the write-exclusive types.
    ReadLike,
    /// Allowed only to holders and, for registrants-only and all-registrants types, to
    /// registrants.
    Restricted,
}

fn service_action(cdb: &[u8]) -> u8 {
    cdb.get(1).map_or(0, |b| b & 0x1f)
}

fn classify(cdb: &[u8]) -> Class {
    let Some(&opcode) = cdb.first() else {
        return Class::Unrestricted;
    };
    let byte4 = cdb.get(4).copied().unwrap_or(0);
    match opcode {
        op::TEST_UNIT_READY
        | op::REQUEST_SENSE
        | op::INQUIRY
        | op::REPORT_LUNS
        | op::READ_CAPACITY_10
        | op::LOG_SENSE
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT
        | op::ACCESS_CONTROL_IN
        | op::ACCESS_CONTROL_OUT
        | op::RESERVE_6
        | op::RESERVE_10
        | op::RELEASE_6
        | op::RELEASE_10 => Class::Unrestricted,
        // READ CAPACITY(16) is unrestricted, GET LBA STATUS reads.
        op::SERVICE_ACTION_IN_16 => match service_action(cdb) {
            0x10 => Class::Unrestricted,
            0x12 => Class::ReadLike,
            _ => Class::Restricted,
        },
        // READ MEDIA SERIAL NUMBER.
        op::SERVICE_ACTION_IN_12 if service_action(cdb) == 0x01 => Class::Unrestricted,
        op::MAINTENANCE_IN => match service_action(cdb) {
            // REPORT IDENTIFYING INFORMATION, REPORT TARGET PORT GROUPS, REPORT ALIASES,
            // REPORT PRIORITY, REPORT TIMESTAMP.
            0x05 | 0x0a | 0x0b | 0x0e | 0x0f => Class::Unrestricted,
            // REPORT SUPPORTED OPERATION CODES, REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS,
            // MANAGEMENT PROTOCOL IN.
            0x0c | 0x0d | 0x10 => Class::ReadLike,
            _ => Class::Restricted,
        },
        op::PREVENT_ALLOW if byte4 & 0x03 == 0 => Class::Unrestricted,
        op::START_STOP_UNIT if byte4 & 0x01 == 1 && byte4 >> 4 == 0 => Class::Unrestricted,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::XDREAD_10
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_BUFFER_10
        | op::READ_BUFFER_16
        | op::READ_ATTRIBUTE
        | op::RECEIVE_DIAGNOSTIC
        | op::RECEIVE_COPY_RESULTS
        | op::SECURITY_PROTOCOL_IN
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12 => Class::ReadLike,
        // READ(32) and VERIFY(32).
        op::VARIABLE_LENGTH => match cdb.get(8..10) {
            Some([0x00, 0x09 | 0x0a]) => Class::ReadLike,
            _ => Class::Restricted,
        },
        _ => Class::Restricted,
    }
}

/// Commands other I_T nexuses may send while an SPC-2 reservation is held.
fn allowed_under_legacy(cdb: &[u8]) -> bool {
    let Some(&opcode) = cdb.first() else {
        return true;
    };
    match opcode {
        op::INQUIRY
        | op::REQUEST_SENSE
        | op::REPORT_LUNS
        | op::RELEASE_6
        | op::RELEASE_10
        | op::LOG_SENSE => true,
        op::PREVENT_ALLOW => cdb.get(4).is_none_or(|b| b & 0x03 == 0),
        op::MAINTENANCE_IN => service_action(cdb) == 0x0a,
        _ => false,
    }
}

/// Decides whether the command in `cdb` from `nexus` may run under the current reservations
/// (SPC-4 5.13.1 table 66, SBC-3 4.17 table 13, SPC-2 5.5.1).
///
/// PERSISTENT RESERVE OUT is allowed here unless an SPC-2 reservation is held; the service
/// action rules (SPC-4 table 67) are applied by [`reserve_out`].
pub fn access(state: &PrState, nexus: &Nexus, cdb: &[u8]) -> Access {
    let Some(&opcode) = cdb.first() else {
        return Access::Allowed;
    };
    let conflict = |c: bool| if c { Access::Conflict } else { Access::Allowed };
    // CRH=0: RESERVE and RELEASE conflict while anyone is registered.
    if matches!(
        opcode,
        op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10
    ) && !state.registrations.is_empty()
    {
        return Access::Conflict;
    }
    if let Some(legacy) = &state.legacy {
        // While a RESERVE reservation is held, every PERSISTENT RESERVE IN and OUT conflicts,
        // whatever the I_T nexus and service action (SPC-2 5.5.1; SPC-3 kept it for
        // RESERVE/RELEASE with CRH=0). libiscsi's Reserve6 tests send no PERSISTENT RESERVE
        // IN while a reservation is held; the READ KEYS its suite clean-up sends is best
        // effort and only conflicts when a test left a reservation behind.
        if matches!(
            opcode,
            op::PERSISTENT_RESERVE_IN | op::PERSISTENT_RESERVE_OUT
        ) {
            return Access::Conflict;
        }
        return conflict(!legacy.is(nexus) && !allowed_under_legacy(cdb));
    }
    let Some(pr_type) = state.reservation else {
        return Access::Allowed;
    };
    let registered = state.find(nexus);
    if registered.is_some_and(|i| state.holds(i)) {
        return Access::Allowed;
    }
    let registrant_access = registered.is_some() && pr_type.admits_registrants();
    conflict(match classify(cdb) {
        Class::Unrestricted => false,
        Class::ReadLike => !(pr_type.shares_reads() || registrant_access),
        Class::Restricted => !registrant_access,
    })
}

fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
    codes::INVALID_FIELD_IN_CDB.in_cdb(byte, bit)
}

fn invalid_parameter(byte: usize, bit: Option<u8>) -> Sense {
    codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(u16::try_from(byte).unwrap_or(u16::MAX), bit)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(bytes)
}

fn be_u32_len(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

/// PERSISTENT RESERVE IN: the parameter data for the service action in `cdb`, cut to the
/// allocation length (the ADDITIONAL LENGTH still gives the full length). The data is the
/// same for every I_T nexus. The caller asks [`access`] first, which refuses the command while
/// an SPC-2 reservation is held.
pub fn reserve_in(state: &PrState, nexus: &Nexus, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    let _ = nexus;
    if cdb.len() < 10 {
        return Err(codes::INVALID_FIELD_IN_CDB);
    }
    let allocation = usize::from(be_u16(cdb, 7));
    let mut data = match service_action(cdb) {
        pr_in::READ_KEYS => read_keys(state),
        pr_in::READ_RESERVATION => read_reservation(state),
        pr_in::REPORT_CAPABILITIES => report_capabilities(state),
        pr_in::READ_FULL_STATUS => read_full_status(state),
        _ => return Err(invalid_cdb(1, Some(4))),
    };
    data.truncate(allocation);
    Ok(data)
}

fn read_keys(state: &PrState) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + 8 * state.registrations.len());
    data.extend_from_slice(&state.generation.to_be_bytes());
    data.extend_from_slice(&be_u32_len(8 * state.registrations.len()));
    for reg in &state.registrations {
        data.extend_from_slice(&reg.key.to_be_bytes());
    }
    data
}

fn read_reservation(state: &PrState) -> Vec<u8> {
    let mut data = Vec::with_capacity(24);
    data.extend_from_slice(&state.generation.to_be_bytes());
    match (state.reservation, state.reservation_key()) {
        (Some(pr_type), Some(key)) => {
            data.extend_from_slice(&16u32.to_be_bytes());
            data.extend_from_slice(&key.to_be_bytes());
            data.extend_from_slice(&[0; 4]); // obsolete
            data.push(0);
            data.push(pr_type.code()); // SCOPE (LU_SCOPE = 0) | TYPE
            data.extend_from_slice(&[0; 2]); // obsolete
        }
        _ => data.extend_from_slice(&0u32.to_be_bytes()),
    }
    data
}

fn report_capabilities(state: &PrState) -> Vec<u8> {
    // CRH=0, SIP_C=1, ATP_C=1, PTPL_C=1.
    let byte2 = 0x08 | 0x04 | 0x01;
    // TMV=1; ALLOW COMMANDS=011b: TEST UNIT READY is allowed through every type, and MODE
    // SENSE, READ ATTRIBUTE, READ BUFFER, RECEIVE COPY RESULTS, RECEIVE DIAGNOSTIC RESULTS,
    // REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS and READ DEFECT DATA
    // through the write-exclusive types; PTPL_A.
    let byte3 = 0x80 | (0b011 << 4) | u8::from(state.aptpl);
    // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
    let mask = [0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01];
    vec![0, 8, byte2, byte3, mask[0], mask[1], 0, 0]
}

fn read_full_status(state: &PrState) -> Vec<u8> {
    let mut descriptors = Vec::new();
    for (i, reg) in state.registrations.iter().enumerate() {
        let holder = state.holds(i);
        let tid = reg.transport_id().encode();
        descriptors.extend_from_slice(&reg.key.to_be_bytes());
        descriptors.extend_from_slice(&[0; 4]);
        descriptors.push((u8::from(reg.all_tg_pt) << 1) | u8::from(holder));
        descriptors.push(match (holder, state.reservation) {
            (true, Some(pr_type)) => pr_type.code(),
            _ => 0,
        });
        descriptors.extend_from_slice(&[0; 4]);
        descriptors.extend_from_slice(&reg.relative_port.to_be_bytes());
        descriptors.extend_from_slice(&be_u32_len(tid.len()));
        descriptors.extend_from_slice(&tid);
    }
    let mut data = Vec::with_capacity(8 + descriptors.len());
    data.extend_from_slice(&state.generation.to_be_bytes());
    data.extend_from_slice(&be_u32_len(descriptors.len()));
    data.extend_from_slice(&descriptors);
    data
}

/// Why a TransportID was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportIdError {
    /// The TransportID runs past the end of the data.
    #[error("the TransportID runs past the end of the parameter list")]
    Truncated,
    /// Not an iSCSI TransportID.
    #[error("protocol identifier {0:#x} is not iSCSI")]
    NotIscsi(u8),
    /// A format code other than 00b and 01b.
    #[error("format code {0} is not supported")]
    Format(u8),
    /// The ADDITIONAL LENGTH is zero or not a multiple of four.
    #[error("additional length {0} is not a non-zero multiple of four")]
    Length(u16),
    /// The name is not NUL-terminated within the TransportID.
    #[error("the iSCSI name is not terminated")]
    Unterminated,
    /// The name is empty, too long, or not UTF-8.
    #[error("the iSCSI name is empty, too long or not UTF-8")]
    Name,
    /// Format 01b without a valid `,i,0x<isid>` part.
    #[error("the initiator session id is missing or not hexadecimal")]
    Isid,
}

/// An iSCSI TransportID (SPC-4 7.6.4.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportId {
    /// The initiator's iSCSI name.
    pub name: String,
    /// The ISID for format 01b (one initiator port); `None` for format 00b (the name only).
    pub isid: Option<[u8; 6]>,
}

const PROTOCOL_ISCSI: u8 = 0x5;

impl TransportId {
    /// The TransportID of `nexus`'s initiator port (format 01b).
    pub fn of(nexus: &Nexus) -> TransportId {
        TransportId {
            name: nexus.initiator.clone(),
            isid: Some(nexus.isid),
        }
    }

    /// The encoded TransportID: format 01b `name,i,0x<isid>` when there is an ISID, else
    /// format 00b; NUL-terminated and padded with zeros to a multiple of four bytes (and at
    /// least 24).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = self.name.as_bytes().to_vec();
        if let Some(isid) = self.isid {
            body.extend_from_slice(b",i,0x");
            body.extend_from_slice(hex(&isid).as_bytes());
        }
        body.push(0);
        let len = body.len().max(20).next_multiple_of(4);
        body.resize(len, 0);
        let format = if self.isid.is_some() { 0x40 } else { 0x00 };
        let mut out = Vec::with_capacity(4 + len);
        out.push(format | PROTOCOL_ISCSI);
        out.push(0);
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses the TransportID at the start of `buf`; returns it with its length in bytes.
    pub fn parse(buf: &[u8]) -> Result<(TransportId, usize), TransportIdError> {
        if buf.len() < 4 {
            return Err(TransportIdError::Truncated);
        }
        let protocol = buf[0] & 0x0f;
        if protocol != PROTOCOL_ISCSI {
            return Err(TransportIdError::NotIscsi(protocol));
        }
        let format = buf[0] >> 6;
        if format > 1 {
            return Err(TransportIdError::Format(format));
        }
        let additional = be_u16(buf, 2);
        if additional == 0 || !additional.is_multiple_of(4) {
            return Err(TransportIdError::Length(additional));
        }
        let total = 4 + usize::from(additional);
        let body = buf.get(4..total).ok_or(TransportIdError::Truncated)?;
        let end = body
            .iter()
            .position(|&b| b == 0)
            .ok_or(TransportIdError::Unterminated)?;
        let text = std::str::from_utf8(&body[..end]).map_err(|_| TransportIdError::Name)?;
        let (name, isid) = if format == 0 {
            (text, None)
        } else {
            let at = text
                .to_ascii_lowercase()
                .find(",i,0x")
                .ok_or(TransportIdError::Isid)?;
            (&text[..at], Some(parse_isid(&text[at + 5..])?))
        };
        if name.is_empty() || name.len() > MAX_ISCSI_NAME || name.contains(',') {
            return Err(TransportIdError::Name);
        }
        Ok((
            TransportId {
                name: name.to_string(),
                isid,
            },
            total,
        ))
    }

    fn registration(&self, key: u64, relative_port: u16, all_tg_pt: bool) -> Registration {
        Registration {
            key,
            initiator: self.name.clone(),
            isid: self.isid,
            relative_port,
            all_tg_pt,
            holder: false,
        }
    }
}

fn parse_isid(text: &str) -> Result<[u8; 6], TransportIdError> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TransportIdError::Isid);
    }
    let value = u64::from_str_radix(text, 16).map_err(|_| TransportIdError::Isid)?;
    let mut isid = [0u8; 6];
    isid.copy_from_slice(&value.to_be_bytes()[2..]);
    Ok(isid)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn port_name(initiator: &str, isid: Option<[u8; 6]>) -> String {
    match isid {
        Some(isid) => format!("{initiator},i,0x{}", hex(&isid)),
        None => initiator.to_string(),
    }
}

fn transport_id_sense(err: &TransportIdError, at: usize) -> Sense {
    match err {
        TransportIdError::Truncated => codes::PARAMETER_LIST_LENGTH,
        _ => invalid_parameter(at, None),
    }
}

/// Why a PERSISTENT RESERVE OUT did not complete.
enum Fail {
    Conflict,
    Check(Sense),
}

impl From<Sense> for Fail {
    fn from(sense: Sense) -> Fail {
        Fail::Check(sense)
    }
}

/// A completed PERSISTENT RESERVE OUT.
struct Change {
    state: Option<PrState>,
    abort: Vec<String>,
}

type Step = Result<Change, Fail>;

fn unchanged() -> Step {
    Ok(Change {
        state: None,
        abort: Vec::new(),
    })
}

fn changed(state: PrState) -> Step {
    Ok(Change {
        state: Some(state),
        abort: Vec::new(),
    })
}

impl From<Step> for OutOutcome {
    fn from(step: Step) -> OutOutcome {
        match step {
            Ok(Change { state, abort }) => OutOutcome::Done { state, abort },
            Err(Fail::Conflict) => OutOutcome::Conflict,
            Err(Fail::Check(sense)) => OutOutcome::Check(sense),
        }
    }
}

/// The parameter list of every service action but REGISTER AND MOVE (SPC-4 6.16.3).
struct Params {
    key: u64,
    sa_key: u64,
    spec_i_pt: bool,
    all_tg_pt: bool,
    aptpl: bool,
    /// SPEC_I_PT TransportIDs with their offsets in the parameter list.
    transport_ids: Vec<(usize, TransportId)>,
}

fn parse_params(service_action: u8, params: &[u8]) -> Result<Params, Sense> {
    if params.len() < 24 {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    let flags = params[20];
    let spec_i_pt = flags & 0x08 != 0;
    let mut transport_ids = Vec::new();
    if spec_i_pt {
        if service_action != pr_out::REGISTER {
            return Err(invalid_parameter(20, Some(3)));
        }
        if params.len() < 28 {
            return Err(codes::PARAMETER_LIST_LENGTH);
        }
        let list_len = usize::try_from(be_u32(params, 24)).unwrap_or(usize::MAX);
        if list_len.checked_add(28) != Some(params.len()) {
            return Err(codes::PARAMETER_LIST_LENGTH);
        }
        let mut at = 28;
        while at < params.len() {
            let (tid, len) =
                TransportId::parse(&params[at..]).map_err(|e| transport_id_sense(&e, at))?;
            transport_ids.push((at, tid));
            at += len;
        }
    } else if params.len() != 24 {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    Ok(Params {
        key: be_u64(params, 0),
        sa_key: be_u64(params, 8),
        spec_i_pt,
        all_tg_pt: flags & 0x04 != 0,
        aptpl: flags & 0x01 != 0,
        transport_ids,
    })
}

/// The REGISTER AND MOVE parameter list (SPC-4 6.16.4).
struct MoveParams {
    key: u64,
    sa_key: u64,
    unreg: bool,
    aptpl: bool,
    relative_port: u16,
    destination: Result<TransportId, Sense>,
}

fn parse_move_params(params: &[u8]) -> Result<MoveParams, Sense> {
    if params.len() < 24 {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    let tid_len = usize::try_from(be_u32(params, 20)).unwrap_or(usize::MAX);
    if tid_len.checked_add(24) != Some(params.len()) {
        return Err(codes::PARAMETER_LIST_LENGTH);
    }
    // A malformed TransportID is reported after the reservation checks.
    let destination = match TransportId::parse(&params[24..]) {
        Ok((tid, len)) if len == tid_len => Ok(tid),
        Ok(_) => Err(invalid_parameter(20, None)),
        Err(e) => Err(transport_id_sense(&e, 24)),
    };
    Ok(MoveParams {
        key: be_u64(params, 0),
        sa_key: be_u64(params, 8),
        unreg: params[17] & 0x02 != 0,
        aptpl: params[17] & 0x01 != 0,
        relative_port: be_u16(params, 18),
        destination,
    })
}

/// PERSISTENT RESERVE OUT with its parameter list (`params` holds at least the CDB's
/// PARAMETER LIST LENGTH bytes; more are ignored).
pub fn reserve_out(state: &PrState, nexus: &Nexus, cdb: &[u8], params: &[u8]) -> OutOutcome {
    pr_out_step(state, nexus, cdb, params).into()
}

fn pr_out_step(state: &PrState, nexus: &Nexus, cdb: &[u8], params: &[u8]) -> Step {
    if cdb.len() < 10 {
        return Err(codes::INVALID_FIELD_IN_CDB.into());
    }
    // SPC-2 5.5.1: no PERSISTENT RESERVE OUT while an SPC-2 reservation is held.
    if state.legacy.is_some() {
        return Err(Fail::Conflict);
    }
    let sa = service_action(cdb);
    if sa > pr_out::REGISTER_AND_MOVE {
        return Err(invalid_cdb(1, Some(4)).into());
    }
    let scope = cdb[2] >> 4;
    let type_code = cdb[2] & 0x0f;
    let length = usize::try_from(be_u32(cdb, 5)).unwrap_or(usize::MAX);
    let params = params.get(..length).ok_or(codes::PARAMETER_LIST_LENGTH)?;
    if sa == pr_out::REGISTER_AND_MOVE {
        let p = parse_move_params(params)?;
        return register_and_move(state, nexus, scope, &p);
    }
    let p = parse_params(sa, params)?;
    match sa {
        pr_out::REGISTER => register(state, nexus, &p, false),
        pr_out::REGISTER_AND_IGNORE_EXISTING_KEY => register(state, nexus, &p, true),
        pr_out::RESERVE => reserve_pr(state, nexus, scope, type_code, &p),
        pr_out::RELEASE => release_pr(state, nexus, scope, type_code, &p),
        pr_out::CLEAR => clear(state, nexus, &p),
        pr_out::PREEMPT | pr_out::PREEMPT_AND_ABORT => preempt(
            state,
            nexus,
            scope,
            type_code,
            &p,
            sa == pr_out::PREEMPT_AND_ABORT,
        ),
        _ => Err(invalid_cdb(1, Some(4)).into()),
    }
}

/// The sender's registration, when its RESERVATION KEY matches; RESERVATION CONFLICT when
/// the I_T nexus is not registered or the key differs.
fn registered_sender(state: &PrState, nexus: &Nexus, key: u64) -> Result<usize, Fail> {
    match state.find(nexus) {
        Some(i) if state.registrations[i].key == key => Ok(i),
        _ => Err(Fail::Conflict),
    }
}

/// The reservation type a RESERVE or PREEMPT establishes: LU_SCOPE and a valid TYPE.
fn new_reservation_type(scope: u8, type_code: u8) -> Result<PrType, Fail> {
    if scope != 0 {
        return Err(invalid_cdb(2, Some(7)).into());
    }
    PrType::from_code(type_code).ok_or_else(|| invalid_cdb(2, Some(3)).into())
}

/// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 5.13.7, table 63).
fn register(state: &PrState, nexus: &Nexus, p: &Params, ignore_existing: bool) -> Step {
    let Some(me) = state.find(nexus) else {
        if !ignore_existing && p.key != 0 {
            return Err(Fail::Conflict);
        }
        if p.sa_key == 0 {
            return unchanged();
        }
        let mine = TransportId::of(nexus).registration(p.sa_key, nexus.relative_port, p.all_tg_pt);
        // ALL_TG_PT=1 while the initiator port is registered through another target port:
        // the new registration would give some I_T nexus a second key.
        if state.registrations.iter().any(|r| r.overlaps(&mine)) {
            return Err(Fail::Conflict);
        }
        let mut added = vec![mine];
        for (at, tid) in &p.transport_ids {
            let reg = tid.registration(p.sa_key, nexus.relative_port, p.all_tg_pt);
            if added.iter().any(|a| a.contains(&reg)) {
                continue;
            }
            if added
                .iter()
                .chain(&state.registrations)
                .any(|r| r.overlaps(&reg))
            {
                return Err(invalid_parameter(*at, None).into());
            }
            added.push(reg);
        }
        if state.registrations.len() + added.len() > MAX_REGISTRATIONS {
            return Err(codes::INSUFFICIENT_REGISTRATION_RESOURCES.into());
        }
        let mut st = state.next();
        st.registrations.extend(added);
        st.aptpl = p.aptpl;
        st.bump_generation();
        return changed(st);
    };
    if !ignore_existing && p.key != state.registrations[me].key {
        return Err(Fail::Conflict);
    }
    if p.spec_i_pt {
        return Err(invalid_parameter(20, Some(3)).into());
    }
    let mut st = state.next();
    st.aptpl = p.aptpl;
    st.bump_generation();
    if p.sa_key != 0 {
        st.registrations[me].key = p.sa_key;
        return changed(st);
    }
    // Unregister (SPC-4 5.13.11.3).
    let gone = st.registrations.remove(me);
    match state.reservation {
        // An all-registrants reservation lasts while anyone is registered.
        Some(t) if t.all_registrants() && st.registrations.is_empty() => st.reservation = None,
        Some(t) if !t.all_registrants() && gone.holder => {
            st.reservation = None;
            if t.registrants_only() {
                st.notify_registrants(None, AttentionKind::ReservationsReleased);
            }
        }
        _ => {}
    }
    changed(st)
}

/// RESERVE (SPC-4 5.13.9).
fn reserve_pr(state: &PrState, nexus: &Nexus, scope: u8, type_code: u8, p: &Params) -> Step {
    let pr_type = new_reservation_type(scope, type_code)?;
    let me = registered_sender(state, nexus, p.key)?;
    match state.reservation {
        Some(current) if state.holds(me) && current == pr_type => unchanged(),
        Some(_) => Err(Fail::Conflict),
        None => {
            let mut st = state.next();
            st.reservation = Some(pr_type);
            st.registrations[me].holder = !pr_type.all_registrants();
            changed(st)
        }
    }
}

/// RELEASE (SPC-4 5.13.11.2).
fn release_pr(state: &PrState, nexus: &Nexus, scope: u8, type_code: u8, p: &Params) -> Step {
    if scope != 0 {
        return Err(invalid_cdb(2, Some(7)).into());
    }
    let me = registered_sender(state, nexus, p.key)?;
    let Some(current) = state.reservation else {
        return unchanged();
    };
    if !state.holds(me) {
        return unchanged();
    }
    if current.code() != type_code {
        return Err(INVALID_RELEASE.into());
    }
    let mut st = state.next();
    st.reservation = None;
    for reg in &mut st.registrations {
        reg.holder = false;
    }
    if current.admits_registrants() {
        st.notify_registrants(Some(me), AttentionKind::ReservationsReleased);
    }
    changed(st)
}

/// CLEAR (SPC-4 5.13.11.6).
fn clear(state: &PrState, nexus: &Nexus, p: &Params) -> Step {
    let me = registered_sender(state, nexus, p.key)?;
    let mut st = state.next();
    st.reservation = None;
    let all = std::mem::take(&mut st.registrations);
    for (i, reg) in all.iter().enumerate() {
        if i != me {
            st.add_attention(Attention::for_registration(
                reg,
                AttentionKind::ReservationsPreempted,
            ));
        }
    }
    st.bump_generation();
    changed(st)
}

/// PREEMPT and PREEMPT AND ABORT (SPC-4 5.13.11.4, 5.13.11.5).
fn preempt(
    state: &PrState,
    nexus: &Nexus,
    scope: u8,
    type_code: u8,
    p: &Params,
    abort: bool,
) -> Step {
    let me = registered_sender(state, nexus, p.key)?;
    let sa = p.sa_key;
    let mut st = state.next();
    let removed = match state.reservation {
        // An all-registrants reservation and key zero: every other registration goes and the
        // sender gets a new reservation.
        Some(current) if current.all_registrants() && sa == 0 => {
            let pr_type = new_reservation_type(scope, type_code)?;
            let (removed, _) = st.remove_registrations(me, |i, _| i != me);
            st.reservation = Some(pr_type);
            st.registrations[0].holder = !pr_type.all_registrants();
            removed
        }
        // The key is the holder's: the reservation moves to the sender with the new type,
        // every other registration with that key goes.
        Some(current) if !current.all_registrants() && state.reservation_key() == Some(sa) => {
            let pr_type = new_reservation_type(scope, type_code)?;
            let (removed, mine) = st.remove_registrations(me, |i, r| i != me && r.key == sa);
            let mine = mine.unwrap_or(0);
            for (i, reg) in st.registrations.iter_mut().enumerate() {
                reg.holder = i == mine && !pr_type.all_registrants();
            }
            st.reservation = Some(pr_type);
            if pr_type != current {
                st.notify_registrants(Some(mine), AttentionKind::ReservationsReleased);
            }
            removed
        }
        // Otherwise only registrations are removed: those with the key, whoever they are.
        _ => {
            if sa == 0 {
                return Err(invalid_parameter(8, None).into());
            }
            let (removed, _) = st.remove_registrations(me, |_, r| r.key == sa);
            if removed.is_empty() {
                return Err(Fail::Conflict);
            }
            if state.reservation.is_some_and(PrType::all_registrants) && st.registrations.is_empty()
            {
                st.reservation = None;
            }
            removed
        }
    };
    let sender = nexus.initiator_port_name();
    let mut aborted: Vec<String> = Vec::new();
    for (i, reg) in &removed {
        if *i == me {
            continue;
        }
        st.add_attention(Attention::for_registration(
            reg,
            AttentionKind::RegistrationsPreempted,
        ));
        let name = reg.port_name();
        if abort && !name.eq_ignore_ascii_case(&sender) && !aborted.contains(&name) {
            aborted.push(name);
        }
    }
    st.bump_generation();
    Ok(Change {
        state: Some(st),
        abort: aborted,
    })
}

/// REGISTER AND MOVE (SPC-4 5.13.8).
fn register_and_move(state: &PrState, nexus: &Nexus, scope: u8, p: &MoveParams) -> Step {
    let me = registered_sender(state, nexus, p.key)?;
    match state.reservation {
        Some(t) if !t.all_registrants() && state.registrations[me].holder => {}
        _ => return Err(Fail::Conflict),
    }
    if scope != 0 {
        return Err(invalid_cdb(2, Some(7)).into());
    }
    if p.sa_key == 0 {
        return Err(invalid_parameter(8, None).into());
    }
    if p.relative_port == 0 {
        return Err(invalid_parameter(18, None).into());
    }
    let destination = p.destination.clone()?;
    let mut dest = destination.registration(p.sa_key, p.relative_port, false);
    dest.holder = true;
    if state.registrations[me].overlaps(&dest) {
        // The destination is (or shares an I_T nexus with) the sender.
        return Err(invalid_parameter(24, None).into());
    }
    let overlapping: Vec<usize> = (0..state.registrations.len())
        .filter(|&i| state.registrations[i].overlaps(&dest))
        .collect();
    let mut st = state.next();
    st.registrations[me].holder = false;
    match overlapping.as_slice() {
        [] => {
            if st.registrations.len() >= MAX_REGISTRATIONS {
                return Err(codes::INSUFFICIENT_REGISTRATION_RESOURCES.into());
            }
            st.registrations.push(dest);
        }
        [i] if state.registrations[*i].contains(&dest) => {
            st.registrations[*i].key = p.sa_key;
            st.registrations[*i].holder = true;
        }
        _ => return Err(invalid_parameter(24, None).into()),
    }
    if p.unreg {
        st.registrations.remove(me);
    }
    st.aptpl = p.aptpl;
    st.bump_generation();
    changed(st)
}

/// SPC-2 RESERVE(6)/(10) of the whole logical unit.
pub fn reserve(state: &PrState, nexus: &Nexus) -> OutOutcome {
    if !state.registrations.is_empty() {
        return OutOutcome::Conflict;
    }
    match &state.legacy {
        Some(holder) if holder.is(nexus) => OutOutcome::Done {
            state: None,
            abort: Vec::new(),
        },
        Some(_) => OutOutcome::Conflict,
        None => {
            let mut st = state.next();
            st.legacy = Some(LegacyReservation::of(nexus));
            OutOutcome::Done {
                state: Some(st),
                abort: Vec::new(),
            }
        }
    }
}

/// SPC-2 RELEASE(6)/(10): releases the holder's reservation; from any other I_T nexus it
/// does nothing.
pub fn release(state: &PrState, nexus: &Nexus) -> OutOutcome {
    if !state.registrations.is_empty() {
        return OutOutcome::Conflict;
    }
    match &state.legacy {
        Some(holder) if holder.is(nexus) => {
            let mut st = state.next();
            st.legacy = None;
            OutOutcome::Done {
                state: Some(st),
                abort: Vec::new(),
            }
        }
        _ => OutOutcome::Done {
            state: None,
            abort: Vec::new(),
        },
    }
}

/// The I_T nexus `nexus` is gone (logout, connection loss, session reinstatement): its SPC-2
/// reservation, if any, is released. Returns the state to store, or `None` when unchanged.
pub fn nexus_loss(state: &PrState, nexus: &Nexus) -> Option<PrState> {
    let held = state.legacy.as_ref().is_some_and(|l| l.is(nexus));
    held.then(|| {
        let mut st = state.next();
        st.legacy = None;
        st
    })
}

/// Target port `relative_port` is gone (its node left the cluster): an SPC-2 reservation made
/// through it is released. Returns the state to store, or `None` when unchanged.
pub fn port_loss(state: &PrState, relative_port: u16) -> Option<PrState> {
    let held = state
        .legacy
        .as_ref()
        .is_some_and(|l| l.relative_port == relative_port);
    held.then(|| {
        let mut st = state.next();
        st.legacy = None;
        st
    })
}

/// A LOGICAL UNIT RESET or target reset: the SPC-2 reservation is released; registrations and
/// the persistent reservation stay. Returns the state to store, or `None` when unchanged.
pub fn logical_unit_reset(state: &PrState) -> Option<PrState> {
    state.legacy.is_some().then(|| {
        let mut st = state.next();
        st.legacy = None;
        st
    })
}

/// The oldest unit attention a reservation change left for `nexus`. The opcode is not looked
/// at: the caller does not report it to INQUIRY, REPORT LUNS and REQUEST SENSE.
pub fn pending_attention(state: &PrState, nexus: &Nexus) -> Option<Sense> {
    state
        .attentions
        .iter()
        .find(|a| a.applies_to(nexus))
        .map(|a| a.kind.sense())
}

/// The state after the attention [`pending_attention`] reported to `nexus` has been
/// delivered (version bumped, even when nothing was pending).
pub fn clear_attention(state: &PrState, nexus: &Nexus) -> PrState {
    let mut st = state.next();
    if let Some(i) = st.attentions.iter().position(|a| a.applies_to(nexus)) {
        st.attentions.remove(i);
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(initiator: &str, isid: u8, relative_port: u16) -> Nexus {
        Nexus {
            initiator: initiator.to_string(),
            isid: [0x40, 0, 0, 0, 0, isid],
            target: "iqn.2024-01.org.csvd:disk".to_string(),
            tpgt: relative_port,
            relative_port,
        }
    }

    fn a() -> Nexus {
        nexus("iqn.1994-05.com.example:a", 1, 1)
    }

    fn b() -> Nexus {
        nexus("iqn.1994-05.com.example:b", 2, 1)
    }

    fn c() -> Nexus {
        nexus("iqn.1994-05.com.example:c", 3, 3)
    }

    /// `a()`'s initiator port through another node's portal.
    fn a_via_3() -> Nexus {
        nexus("iqn.1994-05.com.example:a", 1, 3)
    }

    fn out_cdb(sa: u8, scope: u8, pr_type: u8, len: usize) -> Vec<u8> {
        let mut cdb = vec![0x5f, sa, scope << 4 | pr_type, 0, 0, 0, 0, 0, 0, 0];
        cdb[5..9].copy_from_slice(&(len as u32).to_be_bytes());
        cdb
    }

    fn basic(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = flags;
        p
    }

    fn in_cdb(sa: u8, allocation: u16) -> Vec<u8> {
        let mut cdb = vec![0x5e, sa, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[7..9].copy_from_slice(&allocation.to_be_bytes());
        cdb
    }

    const ALL_TG_PT: u8 = 0x04;
    const APTPL: u8 = 0x01;
    const SPEC_I_PT: u8 = 0x08;

    /// Runs a basic PERSISTENT RESERVE OUT and returns the outcome.
    fn run(state: &PrState, n: &Nexus, sa: u8, pr_type: u8, key: u64, sa_key: u64) -> OutOutcome {
        run_flags(state, n, sa, pr_type, key, sa_key, 0)
    }

    fn run_flags(
        state: &PrState,
        n: &Nexus,
        sa: u8,
        pr_type: u8,
        key: u64,
        sa_key: u64,
        flags: u8,
    ) -> OutOutcome {
        let params = basic(key, sa_key, flags);
        reserve_out(state, n, &out_cdb(sa, 0, pr_type, params.len()), &params)
    }

    /// Applies an outcome that must succeed; returns the new state (the old one when
    /// unchanged) and checks the invariants and the version bump.
    fn applied(state: &PrState, outcome: OutOutcome) -> PrState {
        match outcome {
            OutOutcome::Done {
                state: Some(new), ..
            } => {
                assert_eq!(new.version, state.version + 1);
                new.validate().unwrap();
                new
            }
            OutOutcome::Done { state: None, .. } => state.clone(),
            other => panic!("expected success, got {other:?}"),
        }
    }

    fn ok(state: &PrState, n: &Nexus, sa: u8, pr_type: u8, key: u64, sa_key: u64) -> PrState {
        applied(state, run(state, n, sa, pr_type, key, sa_key))
    }

    fn register_ignore(state: &PrState, n: &Nexus, key: u64) -> PrState {
        ok(
            state,
            n,
            pr_out::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            0,
            key,
        )
    }

    fn keys(state: &PrState) -> (u32, Vec<u64>) {
        let data = reserve_in(state, &a(), &in_cdb(pr_in::READ_KEYS, 16384)).unwrap();
        let len = be_u32(&data, 4) as usize;
        assert_eq!(len, data.len() - 8);
        (
            be_u32(&data, 0),
            data[8..].chunks(8).map(|c| be_u64(c, 0)).collect(),
        )
    }

    /// (key, type) from READ RESERVATION, `None` when not reserved.
    fn reservation(state: &PrState) -> Option<(u64, u8)> {
        let data = reserve_in(state, &a(), &in_cdb(pr_in::READ_RESERVATION, 16384)).unwrap();
        match be_u32(&data, 4) {
            0 => {
                assert_eq!(data.len(), 8);
                None
            }
            16 => {
                assert_eq!(data.len(), 24);
                Some((be_u64(&data, 8), data[21]))
            }
            other => panic!("additional length {other}"),
        }
    }

    const READ_10: [u8; 10] = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    const WRITE_10: [u8; 10] = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];

    #[test]
    fn test_read_keys_reports_registrations_and_generation() {
        let st = PrState::default();
        assert_eq!(keys(&st), (0, vec![]));
        let st = register_ignore(&st, &a(), 0xaa);
        let st = register_ignore(&st, &b(), 0xbb);
        assert_eq!(keys(&st), (2, vec![0xaa, 0xbb]));
    }

    #[test]
    fn test_read_keys_truncates_to_allocation_length() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let data = reserve_in(&st, &a(), &in_cdb(pr_in::READ_KEYS, 8)).unwrap();
        assert_eq!(data.len(), 8);
        assert_eq!(be_u32(&data, 4), 8, "the additional length is not cut");
        let data = reserve_in(&st, &a(), &in_cdb(pr_in::READ_KEYS, 3)).unwrap();
        assert_eq!(data, vec![0, 0, 0]);
    }

    #[test]
    fn test_reserve_in_rejects_unknown_service_actions() {
        let st = PrState::default();
        for sa in 0..4 {
            assert!(reserve_in(&st, &a(), &in_cdb(sa, 100)).is_ok());
        }
        for sa in 4..0x20 {
            let err = reserve_in(&st, &a(), &in_cdb(sa, 100)).unwrap_err();
            assert_eq!((err.key, err.asc), (key::ILLEGAL_REQUEST, 0x24));
        }
        assert_eq!(
            reserve_in(&st, &a(), &[0x5e, 0]),
            Err(codes::INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn test_register_rules() {
        let st = PrState::default();
        // Unregistered with a non-zero RESERVATION KEY: conflict.
        assert_eq!(
            run(&st, &a(), pr_out::REGISTER, 0, 5, 7),
            OutOutcome::Conflict
        );
        // Unregistered with SERVICE ACTION RESERVATION KEY zero: nothing happens.
        assert_eq!(
            run(&st, &a(), pr_out::REGISTER, 0, 0, 0),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        let st = ok(&st, &a(), pr_out::REGISTER, 0, 0, 7);
        assert_eq!(keys(&st), (1, vec![7]));
        // Re-register with the wrong key (libiscsi prout_reregister_key_fails).
        assert_eq!(
            run(&st, &a(), pr_out::REGISTER, 0, 0, 8),
            OutOutcome::Conflict
        );
        // Change the key with the right one.
        let st = ok(&st, &a(), pr_out::REGISTER, 0, 7, 8);
        assert_eq!(keys(&st), (2, vec![8]));
        // REGISTER AND IGNORE EXISTING KEY ignores the key.
        let st = ok(
            &st,
            &a(),
            pr_out::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            12345,
            9,
        );
        assert_eq!(keys(&st), (3, vec![9]));
        // Unregister.
        let st = ok(&st, &a(), pr_out::REGISTER, 0, 9, 0);
        assert_eq!(keys(&st), (4, vec![]));
        assert!(st.is_empty());
    }

    #[test]
    fn test_register_records_aptpl() {
        let st = applied(
            &PrState::default(),
            run_flags(&PrState::default(), &a(), pr_out::REGISTER, 0, 0, 1, APTPL),
        );
        assert!(st.aptpl);
        let caps = reserve_in(&st, &a(), &in_cdb(pr_in::REPORT_CAPABILITIES, 100)).unwrap();
        assert_eq!(caps[3] & 0x01, 1, "PTPL_A");
        let st = ok(&st, &a(), pr_out::REGISTER, 0, 1, 2);
        assert!(!st.aptpl);
    }

    #[test]
    fn test_report_capabilities_layout() {
        let caps = reserve_in(
            &PrState::default(),
            &a(),
            &in_cdb(pr_in::REPORT_CAPABILITIES, 100),
        )
        .unwrap();
        assert_eq!(caps.len(), 8);
        assert_eq!(be_u16(&caps, 0), 8);
        assert_eq!(caps[2] & 0x10, 0, "CRH");
        assert_eq!(caps[2] & 0x08, 0x08, "SIP_C");
        assert_eq!(caps[2] & 0x04, 0x04, "ATP_C");
        assert_eq!(caps[2] & 0x01, 0x01, "PTPL_C");
        assert_eq!(caps[3] & 0x80, 0x80, "TMV");
        assert_eq!((caps[3] >> 4) & 0x07, 3, "ALLOW COMMANDS");
        assert_eq!(caps[3] & 0x01, 0, "PTPL_A");
        assert_eq!(be_u16(&caps, 4), 0xea01, "all six types");
    }

    #[test]
    fn test_reserve_and_release_every_type() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        for pr_type in PrType::ALL {
            let code = pr_type.code();
            let reserved = ok(&st, &a(), pr_out::RESERVE, code, 0xaa, 0);
            let expected_key = if pr_type.all_registrants() { 0 } else { 0xaa };
            assert_eq!(reservation(&reserved), Some((expected_key, code)));
            assert!(reserved.is_holder(&a()));
            // RESERVE and RELEASE do not change PRgeneration.
            assert_eq!(reserved.generation, st.generation);
            let released = ok(&reserved, &a(), pr_out::RELEASE, code, 0xaa, 0);
            assert_eq!(reservation(&released), None);
            assert_eq!(released.generation, st.generation);
        }
    }

    #[test]
    fn test_reserve_conflicts() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let st = register_ignore(&st, &b(), 0xbb);
        // Unregistered, or wrong key.
        assert_eq!(
            run(&st, &c(), pr_out::RESERVE, 3, 0, 0),
            OutOutcome::Conflict
        );
        assert_eq!(
            run(&st, &a(), pr_out::RESERVE, 3, 0xbb, 0),
            OutOutcome::Conflict
        );
        // Bad scope or type.
        let params = basic(0xaa, 0, 0);
        let bad_scope = reserve_out(&st, &a(), &out_cdb(pr_out::RESERVE, 1, 3, 24), &params);
        assert_eq!(bad_scope, OutOutcome::Check(invalid_cdb(2, Some(7))));
        for bad_type in [0, 2, 4, 9, 15] {
            assert_eq!(
                run(&st, &a(), pr_out::RESERVE, bad_type, 0xaa, 0),
                OutOutcome::Check(invalid_cdb(2, Some(3)))
            );
        }
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 0xaa, 0);
        // The holder again with the same type: nothing to do; another type: conflict.
        assert_eq!(
            run(&st, &a(), pr_out::RESERVE, 3, 0xaa, 0),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        assert_eq!(
            run(&st, &a(), pr_out::RESERVE, 1, 0xaa, 0),
            OutOutcome::Conflict
        );
        // Another registrant: conflict.
        assert_eq!(
            run(&st, &b(), pr_out::RESERVE, 3, 0xbb, 0),
            OutOutcome::Conflict
        );
    }

    #[test]
    fn test_reserve_all_registrants_same_type_from_other_registrant_is_noop() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let st = register_ignore(&st, &b(), 0xbb);
        let st = ok(&st, &a(), pr_out::RESERVE, 7, 0xaa, 0);
        // b is a holder too.
        assert_eq!(
            run(&st, &b(), pr_out::RESERVE, 7, 0xbb, 0),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        assert_eq!(
            run(&st, &b(), pr_out::RESERVE, 8, 0xbb, 0),
            OutOutcome::Conflict
        );
    }

    #[test]
    fn test_release_rules() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let st = register_ignore(&st, &b(), 0xbb);
        // No reservation: nothing to do.
        assert_eq!(
            run(&st, &a(), pr_out::RELEASE, 3, 0xaa, 0),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 0xaa, 0);
        // Non-holder registrant: success, nothing released.
        assert_eq!(
            run(&st, &b(), pr_out::RELEASE, 3, 0xbb, 0),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        // Unregistered or wrong key: conflict.
        assert_eq!(
            run(&st, &c(), pr_out::RELEASE, 3, 0, 0),
            OutOutcome::Conflict
        );
        assert_eq!(
            run(&st, &a(), pr_out::RELEASE, 3, 0xbb, 0),
            OutOutcome::Conflict
        );
        // The holder with another type.
        assert_eq!(
            run(&st, &a(), pr_out::RELEASE, 1, 0xaa, 0),
            OutOutcome::Check(INVALID_RELEASE)
        );
        let released = ok(&st, &a(), pr_out::RELEASE, 3, 0xaa, 0);
        assert_eq!(reservation(&released), None);
        // Releasing Exclusive Access sets no unit attention.
        assert!(released.attentions.is_empty());
    }

    #[test]
    fn test_release_registrants_only_notifies_other_registrants() {
        for code in [5, 6, 7, 8] {
            let st = register_ignore(&PrState::default(), &a(), 0xaa);
            let st = register_ignore(&st, &b(), 0xbb);
            let st = ok(&st, &a(), pr_out::RESERVE, code, 0xaa, 0);
            let st = ok(&st, &a(), pr_out::RELEASE, code, 0xaa, 0);
            assert_eq!(pending_attention(&st, &a()), None);
            assert_eq!(
                pending_attention(&st, &b()),
                Some(codes::RESERVATIONS_RELEASED)
            );
            assert_eq!(pending_attention(&st, &c()), None);
        }
    }

    #[test]
    fn test_unregister_holder_releases_reservation() {
        // libiscsi prout_reserve_ownership: the reservation goes with its holder, except for
        // the all-registrants types.
        for pr_type in PrType::ALL {
            let code = pr_type.code();
            let st = register_ignore(&PrState::default(), &a(), 0xaa);
            let st = register_ignore(&st, &b(), 0xbb);
            let st = ok(&st, &a(), pr_out::RESERVE, code, 0xaa, 0);
            let st = ok(&st, &a(), pr_out::REGISTER, 0, 0xaa, 0);
            if pr_type.all_registrants() {
                assert_eq!(reservation(&st), Some((0, code)));
                assert!(st.is_holder(&b()));
                let st = ok(&st, &b(), pr_out::RELEASE, code, 0xbb, 0);
                assert_eq!(reservation(&st), None);
            } else {
                assert_eq!(reservation(&st), None);
                let expected = pr_type
                    .registrants_only()
                    .then_some(codes::RESERVATIONS_RELEASED);
                assert_eq!(pending_attention(&st, &b()), expected, "{pr_type:?}");
            }
        }
    }

    #[test]
    fn test_unregister_last_all_registrants_holder_ends_reservation() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let st = ok(&st, &a(), pr_out::RESERVE, 8, 0xaa, 0);
        let st = ok(&st, &a(), pr_out::REGISTER, 0, 0xaa, 0);
        assert_eq!(st.reservation, None);
        assert!(st.is_empty());
    }

    #[test]
    fn test_clear_removes_everything_and_notifies() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let st = register_ignore(&st, &b(), 0xbb);
        let st = register_ignore(&st, &c(), 0xcc);
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 0xaa, 0);
        let before = st.generation;
        assert_eq!(run(&st, &d(), pr_out::CLEAR, 0, 0, 0), OutOutcome::Conflict);
        assert_eq!(
            run(&st, &b(), pr_out::CLEAR, 0, 0xaa, 0),
            OutOutcome::Conflict
        );
        let st = ok(&st, &b(), pr_out::CLEAR, 0, 0xbb, 0);
        assert_eq!(keys(&st), (before + 1, vec![]));
        assert_eq!(reservation(&st), None);
        assert_eq!(
            pending_attention(&st, &a()),
            Some(codes::RESERVATIONS_PREEMPTED)
        );
        assert_eq!(pending_attention(&st, &b()), None);
        assert_eq!(
            pending_attention(&st, &c()),
            Some(codes::RESERVATIONS_PREEMPTED)
        );
    }

    fn d() -> Nexus {
        nexus("iqn.1994-05.com.example:d", 4, 1)
    }

    #[test]
    fn test_preempt_removes_registration() {
        // libiscsi prout_preempt_rm_reg.
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let before = st.generation;
        let st = ok(&st, &b(), pr_out::PREEMPT, 3, 2, 1);
        assert_eq!(keys(&st), (before + 1, vec![2]));
        assert_eq!(
            reservation(&st),
            None,
            "no reservation was held, none is made"
        );
        assert_eq!(
            pending_attention(&st, &a()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
        assert_eq!(pending_attention(&st, &b()), None);
    }

    #[test]
    fn test_preempt_rules_for_keys() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        // Unregistered or wrong key: conflict.
        assert_eq!(
            run(&st, &c(), pr_out::PREEMPT, 3, 0, 1),
            OutOutcome::Conflict
        );
        assert_eq!(
            run(&st, &b(), pr_out::PREEMPT, 3, 1, 1),
            OutOutcome::Conflict
        );
        // A key nobody has: conflict.
        assert_eq!(
            run(&st, &b(), pr_out::PREEMPT, 3, 2, 99),
            OutOutcome::Conflict
        );
        // Key zero without an all-registrants reservation.
        assert_eq!(
            run(&st, &b(), pr_out::PREEMPT, 3, 2, 0),
            OutOutcome::Check(invalid_parameter(8, None))
        );
    }

    #[test]
    fn test_preempt_holder_moves_reservation() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = register_ignore(&st, &c(), 3);
        let st = ok(&st, &a(), pr_out::RESERVE, 1, 1, 0);
        // Bad type when the preempt makes a reservation.
        assert_eq!(
            run(&st, &b(), pr_out::PREEMPT, 0, 2, 1),
            OutOutcome::Check(invalid_cdb(2, Some(3)))
        );
        let st = ok(&st, &b(), pr_out::PREEMPT, 3, 2, 1);
        assert_eq!(reservation(&st), Some((2, 3)));
        assert!(st.is_holder(&b()));
        assert_eq!(keys(&st).1, vec![2, 3]);
        assert_eq!(
            pending_attention(&st, &a()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
        // The type changed: the remaining registrants learn the old reservation is gone.
        assert_eq!(
            pending_attention(&st, &c()),
            Some(codes::RESERVATIONS_RELEASED)
        );
        assert_eq!(pending_attention(&st, &b()), None);
    }

    #[test]
    fn test_preempt_holder_same_type_notifies_only_preempted() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = register_ignore(&st, &c(), 3);
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        let st = ok(&st, &b(), pr_out::PREEMPT, 3, 2, 1);
        assert_eq!(pending_attention(&st, &c()), None);
        assert_eq!(
            pending_attention(&st, &a()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
    }

    #[test]
    fn test_preempt_self_changes_type_and_keeps_registration() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = ok(&st, &a(), pr_out::RESERVE, 1, 1, 0);
        let st = ok(&st, &a(), pr_out::PREEMPT, 3, 1, 1);
        assert_eq!(reservation(&st), Some((1, 3)));
        assert_eq!(keys(&st).1, vec![1]);
        assert!(st.attentions.is_empty());
    }

    #[test]
    fn test_preempt_non_holder_key_leaves_reservation() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = register_ignore(&st, &c(), 3);
        let st = ok(&st, &a(), pr_out::RESERVE, 1, 1, 0);
        let st = ok(&st, &b(), pr_out::PREEMPT, 3, 2, 3);
        assert_eq!(reservation(&st), Some((1, 1)));
        assert_eq!(keys(&st).1, vec![1, 2]);
        assert_eq!(
            pending_attention(&st, &c()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
    }

    #[test]
    fn test_preempt_all_registrants_with_zero_key() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = register_ignore(&st, &c(), 3);
        let st = ok(&st, &a(), pr_out::RESERVE, 8, 1, 0);
        let st = ok(&st, &b(), pr_out::PREEMPT, 6, 2, 0);
        assert_eq!(keys(&st).1, vec![2]);
        assert_eq!(reservation(&st), Some((2, 6)));
        assert!(st.is_holder(&b()));
        assert_eq!(
            pending_attention(&st, &a()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
        assert_eq!(
            pending_attention(&st, &c()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
    }

    #[test]
    fn test_preempt_all_registrants_with_key_removes_only_that_key() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = register_ignore(&st, &c(), 3);
        let st = ok(&st, &a(), pr_out::RESERVE, 7, 1, 0);
        let st = ok(&st, &b(), pr_out::PREEMPT, 7, 2, 3);
        assert_eq!(keys(&st).1, vec![1, 2]);
        assert_eq!(reservation(&st), Some((0, 7)));
    }

    #[test]
    fn test_preempt_and_abort_lists_preempted_ports() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = register_ignore(&st, &c(), 1);
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        let outcome = run(&st, &b(), pr_out::PREEMPT_AND_ABORT, 3, 2, 1);
        let OutOutcome::Done {
            state: Some(new),
            abort,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            abort,
            vec![a().initiator_port_name(), c().initiator_port_name()]
        );
        assert_eq!(reservation(&new), Some((2, 3)));
        assert_eq!(new.generation, st.generation + 1);
        // Plain PREEMPT aborts nothing.
        let OutOutcome::Done { abort, .. } = run(&st, &b(), pr_out::PREEMPT, 3, 2, 1) else {
            panic!();
        };
        assert!(abort.is_empty());
    }

    #[test]
    fn test_preempt_and_abort_never_lists_the_sender() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 1);
        let outcome = run(&st, &a(), pr_out::PREEMPT_AND_ABORT, 3, 1, 1);
        let OutOutcome::Done {
            state: Some(new),
            abort,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(abort, vec![b().initiator_port_name()]);
        // Both registrations with key 1 went, the sender's too.
        assert!(new.registrations.is_empty());
    }

    fn move_params(key: u64, sa_key: u64, flags: u8, port: u16, tid: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[17] = flags;
        p[18..20].copy_from_slice(&port.to_be_bytes());
        p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        p.extend_from_slice(tid);
        p
    }

    fn run_move(state: &PrState, n: &Nexus, pr_type: u8, params: &[u8]) -> OutOutcome {
        reserve_out(
            state,
            n,
            &out_cdb(pr_out::REGISTER_AND_MOVE, 0, pr_type, params.len()),
            params,
        )
    }

    #[test]
    fn test_register_and_move_moves_reservation() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        let tid = TransportId::of(&c()).encode();
        let st2 = applied(
            &st,
            run_move(&st, &a(), 3, &move_params(1, 0xc, 0, 3, &tid)),
        );
        assert_eq!(keys(&st2), (st.generation + 1, vec![1, 0xc]));
        assert_eq!(reservation(&st2), Some((0xc, 3)));
        assert!(st2.is_holder(&c()));
        assert!(!st2.is_holder(&a()));
        assert_eq!(access(&st2, &a(), &READ_10), Access::Conflict);
        assert_eq!(access(&st2, &c(), &WRITE_10), Access::Allowed);
        // With UNREG the sender's registration goes too.
        let st3 = applied(
            &st,
            run_move(&st, &a(), 3, &move_params(1, 0xc, 0x02, 3, &tid)),
        );
        assert_eq!(keys(&st3).1, vec![0xc]);
    }

    #[test]
    fn test_register_and_move_to_registered_nexus_replaces_its_key() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = ok(&st, &a(), pr_out::RESERVE, 1, 1, 0);
        let tid = TransportId::of(&b()).encode();
        let st = applied(
            &st,
            run_move(&st, &a(), 1, &move_params(1, 0x22, 0, 1, &tid)),
        );
        assert_eq!(keys(&st).1, vec![1, 0x22]);
        assert_eq!(reservation(&st), Some((0x22, 1)));
    }

    #[test]
    fn test_register_and_move_errors() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let tid = TransportId::of(&c()).encode();
        // No reservation, or not the holder: conflict.
        assert_eq!(
            run_move(&st, &a(), 3, &move_params(1, 9, 0, 3, &tid)),
            OutOutcome::Conflict
        );
        let reserved = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        assert_eq!(
            run_move(&reserved, &b(), 3, &move_params(2, 9, 0, 3, &tid)),
            OutOutcome::Conflict
        );
        // Wrong key: conflict.
        assert_eq!(
            run_move(&reserved, &a(), 3, &move_params(2, 9, 0, 3, &tid)),
            OutOutcome::Conflict
        );
        // Key zero, port zero, the sender itself, a bad TransportID.
        let invalid = |byte| OutOutcome::Check(invalid_parameter(byte, None));
        assert_eq!(
            run_move(&reserved, &a(), 3, &move_params(1, 0, 0, 3, &tid)),
            invalid(8)
        );
        assert_eq!(
            run_move(&reserved, &a(), 3, &move_params(1, 9, 0, 0, &tid)),
            invalid(18)
        );
        let own = TransportId::of(&a()).encode();
        assert_eq!(
            run_move(&reserved, &a(), 3, &move_params(1, 9, 0, 1, &own)),
            invalid(24)
        );
        let mut fc = tid.clone();
        fc[0] = 0x00; // Fibre Channel
        assert_eq!(
            run_move(&reserved, &a(), 3, &move_params(1, 9, 0, 3, &fc)),
            invalid(24)
        );
        // The same initiator port through another target port is another I_T nexus.
        let st = applied(
            &reserved,
            run_move(&reserved, &a(), 3, &move_params(1, 9, 0, 3, &own)),
        );
        assert!(st.is_holder(&a_via_3()));
        // All-registrants reservations cannot be moved.
        let all = ok(&st, &a_via_3(), pr_out::RELEASE, 3, 9, 0);
        let all = ok(&all, &a(), pr_out::RESERVE, 7, 1, 0);
        assert_eq!(
            run_move(&all, &a(), 7, &move_params(1, 9, 0, 3, &tid)),
            OutOutcome::Conflict
        );
        // Length mismatch.
        let mut params = move_params(1, 9, 0, 3, &tid);
        params.push(0);
        assert_eq!(
            run_move(&reserved, &a(), 3, &params),
            OutOutcome::Check(codes::PARAMETER_LIST_LENGTH)
        );
    }

    #[test]
    fn test_register_and_move_name_only_transport_id() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        let tid = TransportId {
            name: c().initiator,
            isid: None,
        }
        .encode();
        assert_eq!(tid[0] >> 6, 0);
        let st = applied(&st, run_move(&st, &a(), 3, &move_params(1, 7, 0, 3, &tid)));
        // Every ISID of c's name through port 3 holds it now.
        let mut other_session = c();
        other_session.isid[5] = 0x77;
        assert!(st.is_holder(&other_session));
        assert!(!st.is_holder(&nexus(&c().initiator, 3, 1)));
    }

    #[test]
    fn test_read_full_status_layout() {
        let st = register_ignore(&PrState::default(), &a(), 0xaa);
        let st = applied(
            &st,
            run_flags(
                &st,
                &c(),
                pr_out::REGISTER_AND_IGNORE_EXISTING_KEY,
                0,
                0,
                0xcc,
                ALL_TG_PT,
            ),
        );
        let st = ok(&st, &a(), pr_out::RESERVE, 5, 0xaa, 0);
        let data = reserve_in(&st, &b(), &in_cdb(pr_in::READ_FULL_STATUS, 16384)).unwrap();
        assert_eq!(be_u32(&data, 0), st.generation);
        assert_eq!(be_u32(&data, 4) as usize, data.len() - 8);
        let mut at = 8;
        let mut seen = Vec::new();
        while at < data.len() {
            let d = &data[at..];
            let tid_len = be_u32(d, 20) as usize;
            let (tid, used) = TransportId::parse(&d[24..24 + tid_len]).unwrap();
            assert_eq!(used, tid_len);
            assert_eq!(tid_len % 4, 0);
            seen.push((be_u64(d, 0), d[12], d[13], be_u16(d, 18), tid));
            at += 24 + tid_len;
        }
        assert_eq!(at, data.len());
        assert_eq!(
            seen,
            vec![
                (0xaa, 0x01, 5, 1, TransportId::of(&a())),
                (0xcc, 0x02, 0, 3, TransportId::of(&c())),
            ]
        );
        // The iSCSI TransportID of format 01b.
        let tid = TransportId::of(&a()).encode();
        assert_eq!(tid[0], 0x45);
        let text = format!("{}\0", a().initiator_port_name());
        assert_eq!(&tid[4..4 + text.len()], text.as_bytes());
        assert_eq!(be_u16(&tid, 2) as usize, tid.len() - 4);
        // Truncation keeps the full additional length.
        let cut = reserve_in(&st, &b(), &in_cdb(pr_in::READ_FULL_STATUS, 20)).unwrap();
        assert_eq!(cut.len(), 20);
        assert_eq!(&cut[..8], &data[..8]);
    }

    #[test]
    fn test_read_full_status_all_registrants_are_holders() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = ok(&st, &b(), pr_out::RESERVE, 8, 2, 0);
        let data = reserve_in(&st, &a(), &in_cdb(pr_in::READ_FULL_STATUS, 16384)).unwrap();
        let first = &data[8..];
        let second = &first[24 + be_u32(first, 20) as usize..];
        for d in [first, second] {
            assert_eq!(d[12] & 0x01, 1, "R_HOLDER");
            assert_eq!(d[13], 8);
        }
    }

    #[test]
    fn test_transport_id_round_trip_and_rejects() {
        for tid in [
            TransportId::of(&a()),
            TransportId {
                name: "iqn.x".into(),
                isid: None,
            },
            TransportId {
                name: "iqn.2001-04.com.example:storage.disk2.sys1.xyz".into(),
                isid: Some([1, 2, 3, 4, 5, 6]),
            },
        ] {
            let bytes = tid.encode();
            assert!(bytes.len() >= 24 && bytes.len() % 4 == 0);
            assert_eq!(TransportId::parse(&bytes), Ok((tid.clone(), bytes.len())));
        }
        let good = TransportId::of(&a()).encode();
        assert_eq!(
            TransportId::parse(&good[..10]),
            Err(TransportIdError::Truncated)
        );
        let mut bad = good.clone();
        bad[0] = 0x80 | PROTOCOL_ISCSI;
        assert_eq!(TransportId::parse(&bad), Err(TransportIdError::Format(2)));
        let mut bad = good.clone();
        bad[3] = 3;
        assert_eq!(TransportId::parse(&bad), Err(TransportIdError::Length(3)));
        let mut bad = good.clone();
        for b in &mut bad[4..] {
            *b = b'x';
        }
        assert_eq!(
            TransportId::parse(&bad),
            Err(TransportIdError::Unterminated)
        );
        let mut bad = TransportId {
            name: "iqn.x".into(),
            isid: None,
        }
        .encode();
        bad[0] |= 0x40;
        assert_eq!(TransportId::parse(&bad), Err(TransportIdError::Isid));
        // Upper-case separator and digits are accepted.
        let mut text = b"iqn.x,I,0X40000000000A\0\0".to_vec();
        let mut upper = vec![0x45, 0, 0, text.len() as u8];
        upper.append(&mut text);
        let (tid, _) = TransportId::parse(&upper).unwrap();
        assert_eq!(tid.isid, Some([0x40, 0, 0, 0, 0, 0x0a]));
    }

    /// SPC-4 table 66 and SBC-3 table 13 for I_T nexuses that do not hold the reservation.
    /// The columns, `A` allowed and `C` conflict: Write Exclusive; Exclusive Access; a
    /// registrant under a registrants-only or all-registrants type; a non-registrant under
    /// WE-RO or WE-AR; a non-registrant under EA-RO or EA-AR.
    #[rustfmt::skip]
    const TABLE: &[(&str, &[u8], &str)] = &[
        ("READ(10)",                  &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0],          "ACAAC"),
        ("READ(16)",                  &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], "ACAAC"),
        ("VERIFY(10)",                &[0x2f, 0, 0, 0, 0, 1, 0, 0, 1, 0],          "ACAAC"),
        ("PRE-FETCH(10)",             &[0x34, 0, 0, 0, 0, 1, 0, 0, 1, 0],          "ACAAC"),
        ("WRITE(10)",                 &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0],          "CCACC"),
        ("WRITE(16)",                 &[0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], "CCACC"),
        ("WRITE SAME(16)",            &[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], "CCACC"),
        ("UNMAP",                     &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],         "CCACC"),
        ("COMPARE AND WRITE",         &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], "CCACC"),
        ("SYNCHRONIZE CACHE(10)",     &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],          "CCACC"),
        ("MODE SELECT(6)",            &[0x15, 0x10, 0, 0, 12, 0],                  "CCACC"),
        ("MODE SENSE(6)",             &[0x1a, 0, 0x3f, 0, 255, 0],                 "ACAAC"),
        ("TEST UNIT READY",           &[0x00, 0, 0, 0, 0, 0],                      "AAAAA"),
        ("INQUIRY",                   &[0x12, 0, 0, 0, 96, 0],                     "AAAAA"),
        ("REPORT LUNS",               &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],    "AAAAA"),
        ("REQUEST SENSE",             &[0x03, 0, 0, 0, 18, 0],                     "AAAAA"),
        ("READ CAPACITY(10)",         &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],          "AAAAA"),
        ("READ CAPACITY(16)",         &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], "AAAAA"),
        ("GET LBA STATUS",            &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], "ACAAC"),
        ("PERSISTENT RESERVE IN",     &[0x5e, 0, 0, 0, 0, 0, 0, 0, 100, 0],        "AAAAA"),
        ("PERSISTENT RESERVE OUT",    &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0],         "AAAAA"),
        ("REPORT TARGET PORT GROUPS", &[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], "AAAAA"),
        ("REPORT SUPPORTED OPCODES",  &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], "ACAAC"),
        ("LOG SENSE",                 &[0x4d, 0, 0, 0, 0, 0, 0, 1, 0, 0],          "AAAAA"),
        ("LOG SELECT",                &[0x4c, 0, 0, 0, 0, 0, 0, 0, 0, 0],          "CCACC"),
        ("WRITE BUFFER",              &[0x3b, 0, 0, 0, 0, 0, 0, 0, 0, 0],          "CCACC"),
        ("READ BUFFER",               &[0x3c, 0, 0, 0, 0, 0, 0, 0, 4, 0],          "ACAAC"),
        ("PREVENT ALLOW (allow)",     &[0x1e, 0, 0, 0, 0, 0],                      "AAAAA"),
        ("PREVENT ALLOW (prevent)",   &[0x1e, 0, 0, 0, 1, 0],                      "CCACC"),
        ("START STOP UNIT (start)",   &[0x1b, 0, 0, 0, 1, 0],                      "AAAAA"),
        ("START STOP UNIT (stop)",    &[0x1b, 0, 0, 0, 0, 0],                      "CCACC"),
        ("MAINTENANCE OUT",           &[0xa4, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "CCACC"),
        ("unknown opcode",            &[0xc0, 0, 0, 0, 0, 0],                      "CCACC"),
    ];

    #[test]
    fn test_access_table_for_every_type() {
        for pr_type in PrType::ALL {
            let st = register_ignore(&PrState::default(), &a(), 1);
            let st = register_ignore(&st, &b(), 2);
            let st = ok(&st, &a(), pr_out::RESERVE, pr_type.code(), 1, 0);
            for &(name, cdb, columns) in TABLE {
                let column = |i: usize| match columns.as_bytes()[i] {
                    b'A' => Access::Allowed,
                    _ => Access::Conflict,
                };
                let (we, ea, registrant, we_other, ea_other) =
                    (column(0), column(1), column(2), column(3), column(4));
                assert_eq!(
                    access(&st, &a(), cdb),
                    Access::Allowed,
                    "holder, {pr_type:?}, {name}"
                );
                let (registered, unregistered) = match pr_type {
                    PrType::WriteExclusive => (we, we),
                    PrType::ExclusiveAccess => (ea, ea),
                    PrType::WriteExclusiveRegistrantsOnly
                    | PrType::WriteExclusiveAllRegistrants => (registrant, we_other),
                    PrType::ExclusiveAccessRegistrantsOnly
                    | PrType::ExclusiveAccessAllRegistrants => (registrant, ea_other),
                };
                assert_eq!(
                    access(&st, &b(), cdb),
                    registered,
                    "registered non-holder, {pr_type:?}, {name}"
                );
                assert_eq!(
                    access(&st, &c(), cdb),
                    unregistered,
                    "unregistered, {pr_type:?}, {name}"
                );
            }
        }
    }

    #[test]
    fn test_access_matches_libiscsi_reserve_access() {
        // (type, registered can read, registered can write, unregistered can read,
        // unregistered can write), from libiscsi's prout_reserve_access tests.
        let cases = [
            (3, false, false, false, false),
            (1, true, false, true, false),
            (6, true, true, false, false),
            (5, true, true, true, false),
            (8, true, true, false, false),
            (7, true, true, true, false),
        ];
        let allowed = |x| if x { Access::Allowed } else { Access::Conflict };
        for (code, rr, rw, ur, uw) in cases {
            let st = register_ignore(&PrState::default(), &a(), 1);
            let st = register_ignore(&st, &b(), 2);
            let st = ok(&st, &a(), pr_out::RESERVE, code, 1, 0);
            assert_eq!(access(&st, &a(), &READ_10), Access::Allowed);
            assert_eq!(access(&st, &a(), &WRITE_10), Access::Allowed);
            assert_eq!(access(&st, &b(), &READ_10), allowed(rr), "type {code}");
            assert_eq!(access(&st, &b(), &WRITE_10), allowed(rw), "type {code}");
            let st = ok(&st, &b(), pr_out::REGISTER, 0, 2, 0);
            assert_eq!(access(&st, &b(), &READ_10), allowed(ur), "type {code}");
            assert_eq!(access(&st, &b(), &WRITE_10), allowed(uw), "type {code}");
        }
    }

    #[test]
    fn test_access_without_reservation_allows_everything() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        for &(name, cdb, ..) in TABLE {
            assert_eq!(access(&st, &c(), cdb), Access::Allowed, "{name}");
        }
        assert_eq!(access(&st, &c(), &[]), Access::Allowed);
    }

    #[test]
    fn test_all_tg_pt_zero_registers_only_through_that_port() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        assert!(st.registration(&a()).is_some());
        assert!(st.registration(&a_via_3()).is_none());
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        // The same initiator port through node 3's portal is not the holder.
        assert_eq!(access(&st, &a_via_3(), &READ_10), Access::Conflict);
        assert_eq!(access(&st, &a(), &READ_10), Access::Allowed);
        // It can register separately through port 3; that is another I_T nexus.
        let st = register_ignore(&st, &a_via_3(), 5);
        assert_eq!(keys(&st).1, vec![1, 5]);
        assert_eq!(access(&st, &a_via_3(), &WRITE_10), Access::Conflict);
        // ALL_TG_PT=1 now would cover both I_T nexuses with one key: refused.
        let again = run_flags(&st, &b(), pr_out::REGISTER, 0, 0, 9, ALL_TG_PT);
        assert!(matches!(again, OutOutcome::Done { .. }));
        let mut a_via_2 = a();
        a_via_2.relative_port = 2;
        assert_eq!(
            run_flags(&st, &a_via_2, pr_out::REGISTER, 0, 0, 9, ALL_TG_PT),
            OutOutcome::Conflict
        );
    }

    #[test]
    fn test_all_tg_pt_one_registers_through_every_port() {
        let st = applied(
            &PrState::default(),
            run_flags(
                &PrState::default(),
                &a(),
                pr_out::REGISTER,
                0,
                0,
                1,
                ALL_TG_PT,
            ),
        );
        assert_eq!(st.registration(&a_via_3()).map(|r| r.key), Some(1));
        let st = ok(&st, &a(), pr_out::RESERVE, 3, 1, 0);
        assert_eq!(access(&st, &a_via_3(), &READ_10), Access::Allowed);
        assert_eq!(access(&st, &a_via_3(), &WRITE_10), Access::Allowed);
        // The holder may release through the other port.
        let released = ok(&st, &a_via_3(), pr_out::RELEASE, 3, 1, 0);
        assert_eq!(reservation(&released), None);
        // Another initiator port of the same name is still someone else.
        let mut other_session = a();
        other_session.isid[5] = 9;
        assert_eq!(access(&st, &other_session, &READ_10), Access::Conflict);
    }

    #[test]
    fn test_unit_attentions_follow_the_nexus_and_clear() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = applied(
            &st,
            run_flags(&st, &b(), pr_out::REGISTER, 0, 0, 2, ALL_TG_PT),
        );
        let st = register_ignore(&st, &c(), 3);
        let st = ok(&st, &c(), pr_out::CLEAR, 0, 3, 0);
        // a registered through port 1 only: owed there, not through port 3.
        assert_eq!(
            pending_attention(&st, &a()),
            Some(codes::RESERVATIONS_PREEMPTED)
        );
        assert_eq!(pending_attention(&st, &a_via_3()), None);
        // b registered with ALL_TG_PT: owed through any port.
        let mut b_via_3 = b();
        b_via_3.relative_port = 3;
        assert_eq!(
            pending_attention(&st, &b_via_3),
            Some(codes::RESERVATIONS_PREEMPTED)
        );
        assert_eq!(pending_attention(&st, &c()), None);
        let st2 = clear_attention(&st, &a());
        assert_eq!(st2.version, st.version + 1);
        assert_eq!(pending_attention(&st2, &a()), None);
        assert_eq!(
            pending_attention(&st2, &b()),
            Some(codes::RESERVATIONS_PREEMPTED)
        );
        let st3 = clear_attention(&st2, &b_via_3);
        assert_eq!(pending_attention(&st3, &b()), None);
        assert!(st3.is_empty());
    }

    #[test]
    fn test_unit_attentions_queue_in_order() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = register_ignore(&st, &b(), 2);
        let st = ok(&st, &a(), pr_out::RESERVE, 5, 1, 0);
        let st = ok(&st, &a(), pr_out::RELEASE, 5, 1, 0);
        let st = ok(&st, &a(), pr_out::PREEMPT, 3, 1, 2);
        assert_eq!(
            pending_attention(&st, &b()),
            Some(codes::RESERVATIONS_RELEASED)
        );
        let st = clear_attention(&st, &b());
        assert_eq!(
            pending_attention(&st, &b()),
            Some(codes::REGISTRATIONS_PREEMPTED)
        );
        let st = clear_attention(&st, &b());
        assert_eq!(pending_attention(&st, &b()), None);
    }

    #[test]
    fn test_attentions_are_bounded() {
        let mut st = PrState::default();
        for i in 0..(MAX_ATTENTIONS + 10) {
            st.add_attention(Attention {
                initiator: format!("iqn.x:{i}"),
                isid: None,
                relative_port: None,
                kind: AttentionKind::ReservationsReleased,
            });
        }
        assert_eq!(st.attentions.len(), MAX_ATTENTIONS);
        assert_eq!(st.attentions[0].initiator, "iqn.x:10");
    }

    #[test]
    fn test_legacy_reserve_two_initiators() {
        // libiscsi reserve6_2initiators.
        let st = applied(&PrState::default(), reserve(&PrState::default(), &a()));
        assert_eq!(
            reserve(&st, &a()),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        assert_eq!(reserve(&st, &b()), OutOutcome::Conflict);
        assert_eq!(access(&st, &b(), &[0x16, 0, 0, 0, 0, 0]), Access::Conflict);
        assert_eq!(access(&st, &b(), &[0x17, 0, 0, 0, 0, 0]), Access::Allowed);
        assert_eq!(
            release(&st, &b()),
            OutOutcome::Done {
                state: None,
                abort: vec![]
            }
        );
        let mode_sense = [0x1a, 0, 0x3f, 0, 255, 0];
        assert_eq!(access(&st, &a(), &mode_sense), Access::Allowed);
        assert_eq!(access(&st, &b(), &mode_sense), Access::Conflict);
        assert_eq!(access(&st, &b(), &WRITE_10), Access::Conflict);
        assert_eq!(access(&st, &b(), &READ_10), Access::Conflict);
        for allowed in [
            &[0x12u8, 0, 0, 0, 96, 0][..],
            &[0x03, 0, 0, 0, 18, 0],
            &[0xa0; 12],
        ] {
            assert_eq!(access(&st, &b(), allowed), Access::Allowed);
        }
        // The same initiator port through another target port is another I_T nexus.
        assert_eq!(access(&st, &a_via_3(), &READ_10), Access::Conflict);
        let st = applied(&st, release(&st, &a()));
        assert!(st.is_empty());
        let st = applied(&st, reserve(&st, &b()));
        assert!(st.legacy.as_ref().is_some_and(|l| l.is(&b())));
    }

    #[test]
    fn test_legacy_and_persistent_reservations_exclude_each_other() {
        let held = applied(&PrState::default(), reserve(&PrState::default(), &a()));
        // SPC-2 5.5.1: every PERSISTENT RESERVE IN/OUT conflicts, from every I_T nexus.
        for n in [a(), b()] {
            assert_eq!(access(&held, &n, &in_cdb(0, 100)), Access::Conflict);
            assert_eq!(access(&held, &n, &out_cdb(6, 0, 0, 24)), Access::Conflict);
            assert_eq!(
                run(&held, &n, pr_out::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, 1),
                OutOutcome::Conflict
            );
        }
        // While anyone is registered, RESERVE and RELEASE conflict for everyone.
        let registered = register_ignore(&PrState::default(), &a(), 1);
        for n in [a(), b()] {
            assert_eq!(reserve(&registered, &n), OutOutcome::Conflict);
            assert_eq!(release(&registered, &n), OutOutcome::Conflict);
            assert_eq!(
                access(&registered, &n, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                Access::Conflict
            );
            assert_eq!(
                access(&registered, &n, &[0x17, 0, 0, 0, 0, 0]),
                Access::Conflict
            );
        }
    }

    #[test]
    fn test_legacy_reservation_ends_with_nexus_port_or_reset() {
        let st = applied(&PrState::default(), reserve(&PrState::default(), &a()));
        assert_eq!(nexus_loss(&st, &b()), None);
        assert_eq!(nexus_loss(&st, &a_via_3()), None);
        let gone = nexus_loss(&st, &a()).unwrap();
        assert_eq!((gone.version, gone.legacy.clone()), (st.version + 1, None));
        assert_eq!(port_loss(&st, 3), None);
        assert_eq!(port_loss(&st, 1).unwrap().legacy, None);
        assert_eq!(logical_unit_reset(&st).unwrap().legacy, None);
        assert_eq!(logical_unit_reset(&gone), None);
        // Persistent reservations survive a reset.
        let pr = register_ignore(&PrState::default(), &a(), 1);
        let pr = ok(&pr, &a(), pr_out::RESERVE, 3, 1, 0);
        assert_eq!(logical_unit_reset(&pr), None);
        assert_eq!(nexus_loss(&pr, &a()), None);
    }

    #[test]
    fn test_parameter_list_checks() {
        let st = PrState::default();
        let p = basic(0, 1, 0);
        // Shorter or longer than 24 without SPEC_I_PT.
        let short = reserve_out(&st, &a(), &out_cdb(6, 0, 0, 23), &p);
        assert_eq!(short, OutOutcome::Check(codes::PARAMETER_LIST_LENGTH));
        let mut long = p.clone();
        long.extend_from_slice(&[0; 4]);
        let long = reserve_out(&st, &a(), &out_cdb(6, 0, 0, 28), &long);
        assert_eq!(long, OutOutcome::Check(codes::PARAMETER_LIST_LENGTH));
        // Fewer bytes than the CDB says.
        let missing = reserve_out(&st, &a(), &out_cdb(6, 0, 0, 24), &p[..20]);
        assert_eq!(missing, OutOutcome::Check(codes::PARAMETER_LIST_LENGTH));
        // More bytes than the CDB says are ignored.
        let mut extra = p.clone();
        extra.push(0xff);
        assert!(matches!(
            reserve_out(&st, &a(), &out_cdb(6, 0, 0, 24), &extra),
            OutOutcome::Done { state: Some(_), .. }
        ));
        // Unknown service actions and short CDBs.
        for sa in [8, 9, 0x1f] {
            assert_eq!(
                reserve_out(&st, &a(), &out_cdb(sa, 0, 0, 24), &p),
                OutOutcome::Check(invalid_cdb(1, Some(4)))
            );
        }
        assert_eq!(
            reserve_out(&st, &a(), &[0x5f, 0, 0], &p),
            OutOutcome::Check(codes::INVALID_FIELD_IN_CDB)
        );
        // SPEC_I_PT with anything but REGISTER.
        let spec = basic(0, 1, SPEC_I_PT);
        assert_eq!(
            reserve_out(&st, &a(), &out_cdb(6, 0, 0, 24), &spec),
            OutOutcome::Check(invalid_parameter(20, Some(3)))
        );
    }

    fn spec_i_pt_params(key: u64, sa_key: u64, flags: u8, tids: &[TransportId]) -> Vec<u8> {
        let mut p = basic(key, sa_key, flags | SPEC_I_PT);
        let list: Vec<u8> = tids.iter().flat_map(TransportId::encode).collect();
        p.extend_from_slice(&(list.len() as u32).to_be_bytes());
        p.extend_from_slice(&list);
        p
    }

    #[test]
    fn test_spec_i_pt_registers_named_ports() {
        let st = PrState::default();
        let named_b = TransportId::of(&b());
        let name_only_c = TransportId {
            name: c().initiator,
            isid: None,
        };
        let p = spec_i_pt_params(
            0,
            7,
            0,
            &[named_b.clone(), TransportId::of(&a()), name_only_c, named_b],
        );
        let st = applied(&st, reserve_out(&st, &a(), &out_cdb(0, 0, 0, p.len()), &p));
        assert_eq!(keys(&st), (1, vec![7, 7, 7]));
        assert!(st.registration(&b()).is_some());
        // c's name through the sender's port (1), any ISID; not through port 3.
        assert!(st.registration(&nexus(&c().initiator, 9, 1)).is_some());
        assert!(st.registration(&c()).is_none());
        // Naming a registered I_T nexus fails, and registers nothing.
        let p = spec_i_pt_params(0, 8, 0, &[TransportId::of(&b())]);
        assert_eq!(
            reserve_out(&st, &d(), &out_cdb(0, 0, 0, p.len()), &p),
            OutOutcome::Check(invalid_parameter(28, None))
        );
        // From a registered I_T nexus SPEC_I_PT is invalid.
        let p = spec_i_pt_params(7, 8, 0, &[TransportId::of(&d())]);
        assert_eq!(
            reserve_out(&st, &a(), &out_cdb(0, 0, 0, p.len()), &p),
            OutOutcome::Check(invalid_parameter(20, Some(3)))
        );
        // A list length that does not match.
        let mut p = spec_i_pt_params(0, 8, 0, &[TransportId::of(&d())]);
        p[27] += 4;
        assert_eq!(
            reserve_out(&st, &d(), &out_cdb(0, 0, 0, p.len()), &p),
            OutOutcome::Check(codes::PARAMETER_LIST_LENGTH)
        );
    }

    #[test]
    fn test_registration_limit() {
        let mut st = PrState::default();
        for i in 0..MAX_REGISTRATIONS {
            st = register_ignore(&st, &nexus(&format!("iqn.x:{i}"), 1, 1), 1);
        }
        assert_eq!(
            run(&st, &a(), pr_out::REGISTER, 0, 0, 1),
            OutOutcome::Check(codes::INSUFFICIENT_REGISTRATION_RESOURCES)
        );
    }

    #[test]
    fn test_validate_detects_broken_states() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let mut broken = st.clone();
        broken.registrations.push(broken.registrations[0].clone());
        assert_eq!(broken.validate(), Err(StateError::Overlap(0, 1)));
        let mut broken = st.clone();
        broken.reservation = Some(PrType::ExclusiveAccess);
        assert_eq!(
            broken.validate(),
            Err(StateError::Holders {
                reservation: Some(PrType::ExclusiveAccess),
                holders: 0
            })
        );
        let mut broken = st.clone();
        broken.legacy = Some(LegacyReservation::of(&b()));
        assert_eq!(broken.validate(), Err(StateError::LegacyWithRegistrations));
    }

    #[test]
    fn test_serde_round_trip() {
        let st = register_ignore(&PrState::default(), &a(), 1);
        let st = applied(
            &st,
            run_flags(&st, &b(), pr_out::REGISTER, 0, 0, 2, ALL_TG_PT | APTPL),
        );
        let st = ok(&st, &a(), pr_out::RESERVE, 6, 1, 0);
        let st = ok(&st, &a(), pr_out::RELEASE, 6, 1, 0);
        let st = ok(&st, &a(), pr_out::RESERVE, 5, 1, 0);
        assert!(!st.attentions.is_empty());
        let bytes = wire::to_bytes(&st).unwrap();
        assert_eq!(wire::from_bytes::<PrState>(&bytes).unwrap(), st);
        // Compact: well under a kilobyte for a few registrations.
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
        let legacy = applied(&PrState::default(), reserve(&PrState::default(), &c()));
        let bytes = wire::to_bytes(&legacy).unwrap();
        assert_eq!(wire::from_bytes::<PrState>(&bytes).unwrap(), legacy);
    }

    /// A small self-describing-free binary serde format (like bincode), enough to round-trip
    /// [`PrState`] in tests without a format crate.
    mod wire {
        use std::fmt;

        use serde::de::value::U32Deserializer;
        use serde::de::{self, DeserializeSeed, Visitor};
        use serde::ser::{self, Impossible, Serialize};

        #[derive(Debug)]
        pub struct Error(String);

        impl fmt::Display for Error {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for Error {}

        impl ser::Error for Error {
            fn custom<T: fmt::Display>(msg: T) -> Error {
                Error(msg.to_string())
            }
        }

        impl de::Error for Error {
            fn custom<T: fmt::Display>(msg: T) -> Error {
                Error(msg.to_string())
            }
        }

        fn unsupported<T>(what: &str) -> Result<T, Error> {
            Err(Error(format!("{what} is not supported")))
        }

        pub fn to_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
            let mut ser = Ser { out: Vec::new() };
            value.serialize(&mut ser)?;
            Ok(ser.out)
        }

        pub fn from_bytes<'de, T: de::Deserialize<'de>>(input: &'de [u8]) -> Result<T, Error> {
            let mut de = De { input };
            let value = T::deserialize(&mut de)?;
            if de.input.is_empty() {
                Ok(value)
            } else {
                Err(Error("trailing bytes".into()))
            }
        }

        struct Ser {
            out: Vec<u8>,
        }

        impl Ser {
            fn uint(&mut self, v: u64) {
                // LEB128, so small numbers take one byte.
                let mut v = v;
                loop {
                    let byte = (v & 0x7f) as u8;
                    v >>= 7;
                    if v == 0 {
                        self.out.push(byte);
                        return;
                    }
                    self.out.push(byte | 0x80);
                }
            }
        }

        impl ser::Serializer for &mut Ser {
            type Ok = ();
            type Error = Error;
            type SerializeSeq = Self;
            type SerializeTuple = Self;
            type SerializeTupleStruct = Self;
            type SerializeTupleVariant = Impossible<(), Error>;
            type SerializeMap = Impossible<(), Error>;
            type SerializeStruct = Self;
            type SerializeStructVariant = Impossible<(), Error>;

            fn serialize_bool(self, v: bool) -> Result<(), Error> {
                self.out.push(u8::from(v));
                Ok(())
            }
            fn serialize_i8(self, v: i8) -> Result<(), Error> {
                self.serialize_i64(v.into())
            }
            fn serialize_i16(self, v: i16) -> Result<(), Error> {
                self.serialize_i64(v.into())
            }
            fn serialize_i32(self, v: i32) -> Result<(), Error> {
                self.serialize_i64(v.into())
            }
            fn serialize_i64(self, v: i64) -> Result<(), Error> {
                self.uint(((v << 1) ^ (v >> 63)) as u64);
                Ok(())
            }
            fn serialize_u8(self, v: u8) -> Result<(), Error> {
                self.uint(v.into());
                Ok(())
            }
            fn serialize_u16(self, v: u16) -> Result<(), Error> {
                self.uint(v.into());
                Ok(())
            }
            fn serialize_u32(self, v: u32) -> Result<(), Error> {
                self.uint(v.into());
                Ok(())
            }
            fn serialize_u64(self, v: u64) -> Result<(), Error> {
                self.uint(v);
                Ok(())
            }
            fn serialize_f32(self, _: f32) -> Result<(), Error> {
                unsupported("f32")
            }
            fn serialize_f64(self, _: f64) -> Result<(), Error> {
                unsupported("f64")
            }
            fn serialize_char(self, v: char) -> Result<(), Error> {
                self.uint(u64::from(v));
                Ok(())
            }
            fn serialize_str(self, v: &str) -> Result<(), Error> {
                self.serialize_bytes(v.as_bytes())
            }
            fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
                self.uint(v.len() as u64);
                self.out.extend_from_slice(v);
                Ok(())
            }
            fn serialize_none(self) -> Result<(), Error> {
                self.out.push(0);
                Ok(())
            }
            fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> Result<(), Error> {
                self.out.push(1);
                v.serialize(self)
            }
            fn serialize_unit(self) -> Result<(), Error> {
                Ok(())
            }
            fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
                Ok(())
            }
            fn serialize_unit_variant(
                self,
                _: &'static str,
                index: u32,
                _: &'static str,
            ) -> Result<(), Error> {
                self.uint(index.into());
                Ok(())
            }
            fn serialize_newtype_struct<T: ?Sized + Serialize>(
                self,
                _: &'static str,
                v: &T,
            ) -> Result<(), Error> {
                v.serialize(self)
            }
            fn serialize_newtype_variant<T: ?Sized + Serialize>(
                self,
                _: &'static str,
                index: u32,
                _: &'static str,
                v: &T,
            ) -> Result<(), Error> {
                self.uint(index.into());
                v.serialize(self)
            }
            fn serialize_seq(self, len: Option<usize>) -> Result<Self, Error> {
                let Some(len) = len else {
                    return unsupported("a sequence of unknown length");
                };
                self.uint(len as u64);
                Ok(self)
            }
            fn serialize_tuple(self, _: usize) -> Result<Self, Error> {
                Ok(self)
            }
            fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
                Ok(self)
            }
            fn serialize_tuple_variant(
                self,
                _: &'static str,
                _: u32,
                _: &'static str,
                _: usize,
            ) -> Result<Self::SerializeTupleVariant, Error> {
                unsupported("a tuple variant")
            }
            fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
                unsupported("a map")
            }
            fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
                Ok(self)
            }
            fn serialize_struct_variant(
                self,
                _: &'static str,
                _: u32,
                _: &'static str,
                _: usize,
            ) -> Result<Self::SerializeStructVariant, Error> {
                unsupported("a struct variant")
            }
        }

        impl ser::SerializeSeq for &mut Ser {
            type Ok = ();
            type Error = Error;
            fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<(), Error> {
                v.serialize(&mut **self)
            }
            fn end(self) -> Result<(), Error> {
                Ok(())
            }
        }

        impl ser::SerializeTuple for &mut Ser {
            type Ok = ();
            type Error = Error;
            fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<(), Error> {
                v.serialize(&mut **self)
            }
            fn end(self) -> Result<(), Error> {
                Ok(())
            }
        }

        impl ser::SerializeTupleStruct for &mut Ser {
            type Ok = ();
            type Error = Error;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<(), Error> {
                v.serialize(&mut **self)
            }
            fn end(self) -> Result<(), Error> {
                Ok(())
            }
        }

        impl ser::SerializeStruct for &mut Ser {
            type Ok = ();
            type Error = Error;
            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                _: &'static str,
                v: &T,
            ) -> Result<(), Error> {
                v.serialize(&mut **self)
            }
            fn end(self) -> Result<(), Error> {
                Ok(())
            }
        }

        struct De<'de> {
            input: &'de [u8],
        }

        impl<'de> De<'de> {
            fn take(&mut self, n: usize) -> Result<&'de [u8], Error> {
                if self.input.len() < n {
                    return Err(Error("unexpected end".into()));
                }
                let (head, tail) = self.input.split_at(n);
                self.input = tail;
                Ok(head)
            }
            fn uint(&mut self) -> Result<u64, Error> {
                let mut v = 0u64;
                for shift in (0..64).step_by(7) {
                    let byte = self.take(1)?[0];
                    v |= u64::from(byte & 0x7f) << shift;
                    if byte & 0x80 == 0 {
                        return Ok(v);
                    }
                }
                Err(Error("integer too long".into()))
            }
            fn len(&mut self) -> Result<usize, Error> {
                usize::try_from(self.uint()?).map_err(|_| Error("length too large".into()))
            }
        }

        struct Elements<'a, 'de> {
            de: &'a mut De<'de>,
            left: usize,
        }

        impl<'de> de::SeqAccess<'de> for Elements<'_, 'de> {
            type Error = Error;
            fn next_element_seed<T: DeserializeSeed<'de>>(
                &mut self,
                seed: T,
            ) -> Result<Option<T::Value>, Error> {
                if self.left == 0 {
                    return Ok(None);
                }
                self.left -= 1;
                seed.deserialize(&mut *self.de).map(Some)
            }
        }

        impl<'de> de::Deserializer<'de> for &mut De<'de> {
            type Error = Error;

            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                unsupported("deserialize_any")
            }
            fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                match self.take(1)?[0] {
                    0 => v.visit_bool(false),
                    1 => v.visit_bool(true),
                    _ => Err(Error("bad bool".into())),
                }
            }
            fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                self.deserialize_i64(v)
            }
            fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                self.deserialize_i64(v)
            }
            fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                self.deserialize_i64(v)
            }
            fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                let u = self.uint()?;
                v.visit_i64(((u >> 1) as i64) ^ -((u & 1) as i64))
            }
            fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.visit_u64(self.uint()?)
            }
            fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.visit_u64(self.uint()?)
            }
            fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.visit_u64(self.uint()?)
            }
            fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.visit_u64(self.uint()?)
            }
            fn deserialize_f32<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                unsupported("f32")
            }
            fn deserialize_f64<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                unsupported("f64")
            }
            fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                let c = u32::try_from(self.uint()?).ok().and_then(char::from_u32);
                v.visit_char(c.ok_or_else(|| Error("bad char".into()))?)
            }
            fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                let len = self.len()?;
                let bytes = self.take(len)?;
                v.visit_borrowed_str(
                    std::str::from_utf8(bytes).map_err(|_| Error("bad UTF-8".into()))?,
                )
            }
            fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                self.deserialize_str(v)
            }
            fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                let len = self.len()?;
                v.visit_borrowed_bytes(self.take(len)?)
            }
            fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                self.deserialize_bytes(v)
            }
            fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                match self.take(1)?[0] {
                    0 => v.visit_none(),
                    1 => v.visit_some(self),
                    _ => Err(Error("bad option tag".into())),
                }
            }
            fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.visit_unit()
            }
            fn deserialize_unit_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_unit()
            }
            fn deserialize_newtype_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_newtype_struct(self)
            }
            fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                let left = self.len()?;
                v.visit_seq(Elements { de: self, left })
            }
            fn deserialize_tuple<V: Visitor<'de>>(
                self,
                len: usize,
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_seq(Elements {
                    de: self,
                    left: len,
                })
            }
            fn deserialize_tuple_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                len: usize,
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_seq(Elements {
                    de: self,
                    left: len,
                })
            }
            fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                unsupported("a map")
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_seq(Elements {
                    de: self,
                    left: fields.len(),
                })
            }
            fn deserialize_enum<V: Visitor<'de>>(
                self,
                _: &'static str,
                _: &'static [&'static str],
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_enum(self)
            }
            fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.visit_u64(self.uint()?)
            }
            fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                unsupported("deserialize_ignored_any")
            }
        }

        impl<'de> de::EnumAccess<'de> for &mut De<'de> {
            type Error = Error;
            type Variant = Self;
            fn variant_seed<S: DeserializeSeed<'de>>(
                self,
                seed: S,
            ) -> Result<(S::Value, Self), Error> {
                let index = u32::try_from(self.uint()?).map_err(|_| Error("bad variant".into()))?;
                let value = seed.deserialize(U32Deserializer::<Error>::new(index))?;
                Ok((value, self))
            }
        }

        impl<'de> de::VariantAccess<'de> for &mut De<'de> {
            type Error = Error;
            fn unit_variant(self) -> Result<(), Error> {
                Ok(())
            }
            fn newtype_variant_seed<S: DeserializeSeed<'de>>(
                self,
                seed: S,
            ) -> Result<S::Value, Error> {
                seed.deserialize(self)
            }
            fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
                v.visit_seq(Elements {
                    de: self,
                    left: len,
                })
            }
            fn struct_variant<V: Visitor<'de>>(
                self,
                fields: &'static [&'static str],
                v: V,
            ) -> Result<V::Value, Error> {
                v.visit_seq(Elements {
                    de: self,
                    left: fields.len(),
                })
            }
        }
    }

    mod model {
        use proptest::prelude::*;

        use super::*;

        /// Two initiator ports, one of them seen through two target ports, and a third.
        fn pool() -> [Nexus; 4] {
            [a(), a_via_3(), b(), c()]
        }

        #[derive(Clone, Debug)]
        enum Op {
            Out {
                /// Index into [`pool`].
                who: usize,
                /// Send from the reservation holder instead, when there is one.
                as_holder: bool,
                sa: u8,
                scope: u8,
                pr_type: u8,
                /// `None`: the sender's own registered key (or zero).
                key: Option<u64>,
                sa_key: u64,
                flags: u8,
                /// SPEC_I_PT TransportIDs, or the REGISTER AND MOVE destination: (pool index,
                /// name only).
                tids: Vec<(usize, bool)>,
                unreg: bool,
                port: u16,
            },
            Reserve(usize),
            Release(usize),
            NexusLoss(usize),
            Reset,
            ClearAttention(usize),
        }

        fn service_action() -> impl Strategy<Value = u8> {
            prop_oneof![
                6 => Just(pr_out::REGISTER),
                6 => Just(pr_out::REGISTER_AND_IGNORE_EXISTING_KEY),
                4 => Just(pr_out::RESERVE),
                3 => Just(pr_out::RELEASE),
                1 => Just(pr_out::CLEAR),
                3 => Just(pr_out::PREEMPT),
                2 => Just(pr_out::PREEMPT_AND_ABORT),
                3 => Just(pr_out::REGISTER_AND_MOVE),
                1 => 8..32u8,
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            let out = (
                (0..4usize, any::<bool>()),
                service_action(),
                prop_oneof![19 => Just(0u8), 1 => Just(1u8)],
                prop_oneof![
                    3 => prop::sample::select(vec![1u8, 3, 5, 6, 7, 8]),
                    1 => Just(0u8),
                ],
                prop_oneof![3 => Just(None), 1 => (0..4u64).prop_map(Some)],
                0..4u64,
                (any::<bool>(), any::<bool>(), prop::bool::weighted(0.15)),
                prop::collection::vec((0..4usize, prop::bool::weighted(0.3)), 0..3),
                any::<bool>(),
                prop_oneof![4 => Just(1u16), 4 => Just(3), 1 => Just(0)],
            )
                .prop_map(
                    |(
                        (who, as_holder),
                        sa,
                        scope,
                        pr_type,
                        key,
                        sa_key,
                        (atp, aptpl, spec_i_pt),
                        tids,
                        unreg,
                        port,
                    )| {
                        let flags =
                            (u8::from(atp) << 2) | u8::from(aptpl) | (u8::from(spec_i_pt) << 3);
                        Op::Out {
                            who,
                            as_holder,
                            sa,
                            scope,
                            pr_type,
                            key,
                            sa_key,
                            flags,
                            tids,
                            unreg,
                            port,
                        }
                    },
                );
            prop_oneof![
                40 => out,
                1 => (0..4usize).prop_map(Op::Reserve),
                2 => (0..4usize).prop_map(Op::Release),
                2 => (0..4usize).prop_map(Op::NexusLoss),
                1 => Just(Op::Reset),
                4 => (0..4usize).prop_map(Op::ClearAttention),
            ]
        }

        fn params_for(state: &PrState, op: &Op) -> (Nexus, Vec<u8>, Vec<u8>) {
            let Op::Out {
                who,
                as_holder,
                sa,
                scope,
                pr_type,
                key,
                sa_key,
                flags,
                tids,
                unreg,
                port,
            } = op
            else {
                unreachable!()
            };
            let pool = pool();
            let holder = pool.iter().find(|n| state.is_holder(n));
            let n = match holder {
                Some(h) if *as_holder => h.clone(),
                _ => pool[*who].clone(),
            };
            let key = key.unwrap_or_else(|| state.registration(&n).map_or(0, |r| r.key));
            let tid = |&(i, name_only): &(usize, bool)| TransportId {
                name: pool[i].initiator.clone(),
                isid: (!name_only).then_some(pool[i].isid),
            };
            let params = if *sa == pr_out::REGISTER_AND_MOVE {
                let dest = tids
                    .first()
                    .map_or_else(|| TransportId::of(&pool[3]), tid)
                    .encode();
                move_params(
                    key,
                    *sa_key,
                    (u8::from(*unreg) << 1) | (flags & 1),
                    *port,
                    &dest,
                )
            } else if flags & SPEC_I_PT != 0 {
                let tids: Vec<_> = tids.iter().map(tid).collect();
                spec_i_pt_params(key, *sa_key, *flags, &tids)
            } else {
                basic(key, *sa_key, *flags)
            };
            (n, out_cdb(*sa, *scope, *pr_type, params.len()), params)
        }

        fn check_step(before: &PrState, after: &PrState) -> Result<(), TestCaseError> {
            prop_assert_eq!(after.version, before.version + 1);
            prop_assert_eq!(after.validate(), Ok(()));
            let bytes = wire::to_bytes(after).unwrap();
            prop_assert_eq!(&wire::from_bytes::<PrState>(&bytes).unwrap(), after);
            Ok(())
        }

        fn check_reads(state: &PrState) -> Result<(), TestCaseError> {
            for n in pool() {
                for sa in 0..4 {
                    prop_assert!(reserve_in(state, &n, &in_cdb(sa, 4096)).is_ok());
                }
                let _ = access(state, &n, &READ_10);
                let _ = pending_attention(state, &n);
            }
            let (_, listed) = keys(state);
            prop_assert_eq!(listed.len(), state.registrations.len());
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn test_model_random_commands_keep_invariants(ops in prop::collection::vec(op(), 1..40)) {
                let mut state = PrState::default();
                let pool = pool();
                for op in &ops {
                    let next = match op {
                        Op::Out { sa, .. } => {
                            let (n, cdb, params) = params_for(&state, op);
                            match reserve_out(&state, &n, &cdb, &params) {
                                OutOutcome::Done { state: Some(new), abort } => {
                                    if *sa == pr_out::RESERVE || *sa == pr_out::RELEASE {
                                        prop_assert_eq!(new.generation, state.generation);
                                    } else {
                                        prop_assert_eq!(new.generation, state.generation.wrapping_add(1));
                                    }
                                    prop_assert!(abort.is_empty() || *sa == pr_out::PREEMPT_AND_ABORT);
                                    prop_assert!(!abort.contains(&n.initiator_port_name()));
                                    Some(new)
                                }
                                OutOutcome::Done { state: None, abort } => {
                                    prop_assert!(abort.is_empty());
                                    None
                                }
                                OutOutcome::Conflict | OutOutcome::Check(_) => None,
                            }
                        }
                        Op::Reserve(i) => match reserve(&state, &pool[*i]) {
                            OutOutcome::Done { state: new, .. } => new,
                            _ => None,
                        },
                        Op::Release(i) => match release(&state, &pool[*i]) {
                            OutOutcome::Done { state: new, .. } => new,
                            _ => None,
                        },
                        Op::NexusLoss(i) => nexus_loss(&state, &pool[*i]),
                        Op::Reset => logical_unit_reset(&state),
                        Op::ClearAttention(i) => Some(clear_attention(&state, &pool[*i])),
                    };
                    if let Some(new) = next {
                        check_step(&state, &new)?;
                        state = new;
                    }
                    check_reads(&state)?;
                }
            }

            #[test]
            fn test_model_arbitrary_bytes_never_panic(
                cdb in prop::collection::vec(any::<u8>(), 0..20),
                params in prop::collection::vec(any::<u8>(), 0..120),
                who in 0..4usize,
            ) {
                let st = register_ignore(&PrState::default(), &a(), 1);
                let st = register_ignore(&st, &b(), 2);
                let st = ok(&st, &a(), pr_out::RESERVE, 5, 1, 0);
                let n = &pool()[who];
                let _ = access(&st, n, &cdb);
                let _ = reserve_in(&st, n, &cdb);
                let mut out = cdb.clone();
                if let Some(first) = out.first_mut() {
                    *first = 0x5f;
                }
                if let OutOutcome::Done { state: Some(new), .. } = reserve_out(&st, n, &out, &params) {
                    prop_assert_eq!(new.validate(), Ok(()));
                }
                let _ = TransportId::parse(&params);
            }
        }
    }
}
