//! Persistent reservations (SPC-4 5.13) and SPC-2 RESERVE/RELEASE, as pure functions of the
//! reservation state.
//!
//! The state of each LUN lives in the cluster (csvd keeps it in Raft), so the same
//! registrations and reservation hold on every node's portal. The functions here decide; the
//! caller stores the new state with a compare-and-set on [`PrState::version`].

use serde::{Deserialize, Serialize};

use super::sense::Sense;
use crate::backend::Nexus;

/// The reservation state of one LUN.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    /// Bumped by every stored change; the compare-and-set token.
    pub version: u64,
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
        /// aborted (PREEMPT AND ABORT).
        abort: Vec<String>,
    },
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// Decides whether the command in `cdb` from `nexus` may run (SPC-4 table 5.13.1-ish).
pub fn access(state: &PrState, nexus: &Nexus, cdb: &[u8]) -> Access {
    let _ = (state, nexus, cdb);
    Access::Allowed
}

/// PERSISTENT RESERVE IN: the parameter data for the service action in `cdb`, cut to the
/// allocation length.
pub fn reserve_in(state: &PrState, nexus: &Nexus, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    let _ = (state, nexus, cdb);
    Err(super::sense::codes::INVALID_OPCODE)
}

/// PERSISTENT RESERVE OUT with its parameter list.
pub fn reserve_out(state: &PrState, nexus: &Nexus, cdb: &[u8], params: &[u8]) -> OutOutcome {
    let _ = (state, nexus, cdb, params);
    OutOutcome::Check(super::sense::codes::INVALID_OPCODE)
}

/// SPC-2 RESERVE(6)/(10).
pub fn reserve(state: &PrState, nexus: &Nexus) -> OutOutcome {
    let _ = (state, nexus);
    OutOutcome::Check(super::sense::codes::INVALID_OPCODE)
}

/// SPC-2 RELEASE(6)/(10).
pub fn release(state: &PrState, nexus: &Nexus) -> OutOutcome {
    let _ = (state, nexus);
    OutOutcome::Check(super::sense::codes::INVALID_OPCODE)
}
