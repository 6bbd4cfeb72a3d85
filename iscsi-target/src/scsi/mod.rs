//! The SCSI command set (SPC-4, SBC-3) served by the target.
//!
//! [`Scsi::execute`] takes one command's CDB and its complete Data-Out buffer and returns the
//! status, sense and Data-In; the iSCSI layer around it deals with PDUs, R2Ts and residuals.

pub mod pr;
pub mod sense;

use std::sync::Arc;

use crate::backend::{Backend, Nexus};
use sense::Sense;

/// SCSI status codes (SAM-5).
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data follows.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Data a command returns to the initiator.
#[derive(Debug)]
pub enum DataIn<B> {
    /// No data.
    None,
    /// Generated data (INQUIRY, MODE SENSE, ...), already cut to the allocation length.
    Owned(Vec<u8>),
    /// Data read from the backend.
    Buf(B),
}

/// One SCSI command as the iSCSI layer hands it over.
#[derive(Debug)]
pub struct Command<'a, B> {
    /// Who sent it, through which port.
    pub nexus: &'a Nexus,
    /// The LUN number (decoded from the 8-byte LUN field).
    pub lun: u64,
    /// The CDB (6 to 16 bytes, or longer with an extended-CDB AHS).
    pub cdb: &'a [u8],
    /// The complete Data-Out, exactly the Expected Data Transfer Length, when the command
    /// has one.
    pub data_out: Option<B>,
    /// The Expected Data Transfer Length the initiator gave.
    pub expected_length: u32,
}

/// The result of one command.
#[derive(Debug)]
pub struct Response<B> {
    /// The SCSI status.
    pub status: u8,
    /// Sense data for CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-In (the iSCSI layer cuts it to the Expected Data Transfer Length and reports
    /// the residual).
    pub data: DataIn<B>,
}

/// The SCSI layer of one node: serves every target's LUNs from `B`.
#[derive(Debug)]
pub struct Scsi<B> {
    backend: Arc<B>,
}

impl<B: Backend> Scsi<B> {
    /// A SCSI layer over `backend`.
    pub fn new(backend: Arc<B>) -> Scsi<B> {
        Scsi { backend }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Executes one command.
    pub async fn execute(&self, cmd: Command<'_, B::Buf>) -> Response<B::Buf> {
        let _ = cmd;
        Response {
            status: status::CHECK_CONDITION,
            sense: Some(sense::codes::INVALID_OPCODE),
            data: DataIn::None,
        }
    }
}
