//! The full feature phase's bookkeeping, with no I/O: the command numbering window, the
//! Data-Out plan of a write (immediate data, unsolicited data, R2Ts) and the split of Data-In
//! into PDUs and sequences. The tokio driver in [`crate::server`] calls these.

use crate::pdu::{DataOut, RESERVED_TAG, sn_le, sn_lt};

/// The negotiated values the full feature phase uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The largest data segment we accept.
    pub max_recv_data: u32,
    /// The largest data segment we may send.
    pub max_xmit_data: u32,
    /// The largest sequence (burst) of Data-In or solicited Data-Out.
    pub max_burst: u32,
    /// The most unsolicited data (immediate plus Data-Out) a write may carry.
    pub first_burst: u32,
    /// InitialR2T: no unsolicited Data-Out PDUs.
    pub initial_r2t: bool,
    /// ImmediateData: data in the command PDU itself.
    pub immediate_data: bool,
    /// R2Ts one task may have outstanding.
    pub max_outstanding_r2t: u32,
}

impl Default for Transfer {
    /// RFC 7143's defaults.
    fn default() -> Self {
        Transfer {
            max_recv_data: 8192,
            max_xmit_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
        }
    }
}

/// What to do with a command's CmdSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Run it.
    Run,
    /// Outside the window: silently ignore it (RFC 7143 4.2.2.1).
    Ignore,
}

/// The CmdSN window of a session: ExpCmdSN advances as commands arrive; MaxCmdSN grants
/// `depth` commands in flight and never moves back.
#[derive(Clone, Debug)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    depth: u32,
    active: u32,
}

impl CmdWindow {
    /// A window starting at the login's CmdSN, granting `depth` commands.
    pub fn new(first_cmd_sn: u32, depth: u32) -> CmdWindow {
        let depth = depth.max(1);
        CmdWindow {
            exp_cmd_sn: first_cmd_sn,
            max_cmd_sn: first_cmd_sn.wrapping_add(depth - 1),
            depth,
            active: 0,
        }
    }

    /// Admits a command. Immediate commands do not take a CmdSN; others must be the expected
    /// one (one connection per session delivers them in order) and within MaxCmdSN.
    pub fn admit(&mut self, cmd_sn: u32, immediate: bool) -> Admit {
        if immediate {
            self.active += 1;
            return Admit::Run;
        }
        if cmd_sn != self.exp_cmd_sn || !sn_le(cmd_sn, self.max_cmd_sn) {
            return Admit::Ignore;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        self.active += 1;
        Admit::Run
    }

    /// Admits a non-command PDU that carries a CmdSN (Text, Logout, NOP-Out with a reply,
    /// task management): it advances ExpCmdSN when not immediate but does not stay active.
    pub fn admit_other(&mut self, cmd_sn: u32, immediate: bool) -> Admit {
        if immediate {
            return Admit::Run;
        }
        if cmd_sn != self.exp_cmd_sn || !sn_le(cmd_sn, self.max_cmd_sn) {
            return Admit::Ignore;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        Admit::Run
    }

    /// A command finished (its response is on its way).
    pub fn complete(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    /// ExpCmdSN.
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// MaxCmdSN to advertise now: room for `depth` active commands, never lower than before.
    pub fn max_cmd_sn(&mut self) -> u32 {
        let room = self.depth.saturating_sub(self.active);
        let candidate = self.exp_cmd_sn.wrapping_add(room).wrapping_sub(1);
        if sn_lt(self.max_cmd_sn, candidate) {
            self.max_cmd_sn = candidate;
        }
        self.max_cmd_sn
    }

    /// Commands admitted and not yet complete.
    pub fn active(&self) -> u32 {
        self.active
    }

    /// Whether ABORT TASK for a task this session does not hold has done its job (RFC 7143
    /// 11.6.1): a task whose RefCmdSN is in the window (ExpCmdSN to MaxCmdSN) and before the
    /// request's own CmdSN has not arrived, and counts as received (so aborted): true,
    /// "Function complete". Anything else was received and has completed, or never existed:
    /// false, "Task does not exist".
    pub fn abort_absent(&self, ref_cmd_sn: u32, tmf_cmd_sn: u32) -> bool {
        sn_le(self.exp_cmd_sn, ref_cmd_sn)
            && sn_le(ref_cmd_sn, self.max_cmd_sn)
            && sn_lt(ref_cmd_sn, tmf_cmd_sn)
    }
}

/// Why a Data-Out (or immediate data) is refused. At ErrorRecoveryLevel 0 each of these is a
/// protocol error that ends the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// Immediate data while ImmediateData=No, or more than FirstBurstLength of it.
    #[error("immediate data of {0} bytes is not allowed")]
    Immediate(u32),
    /// Unsolicited Data-Out while InitialR2T=Yes, or past FirstBurstLength.
    #[error("unsolicited data-out is not allowed here")]
    Unsolicited,
    /// The Data-Out names a transfer tag we did not issue.
    #[error("data-out for an unknown transfer tag {0:#x}")]
    UnknownTag(u32),
    /// The Data-Out is outside the range the R2T (or the unsolicited burst) asked for.
    #[error("data-out at {offset}+{len} is outside the requested range")]
    OutOfRange {
        /// Its buffer offset.
        offset: u32,
        /// Its length.
        len: u32,
    },
    /// The data is longer than a data segment may be.
    #[error("data segment too long")]
    TooLong,
    /// A Data-Out's DataSN is not the next one of its sequence (data PDUs arrive in order).
    #[error("data-out out of order: DataSN {got} where {expected} was due")]
    OutOfOrder {
        /// The DataSN received.
        got: u32,
        /// The DataSN due.
        expected: u32,
    },
}

/// One outstanding R2T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    /// Its target transfer tag.
    pub ttt: u32,
    /// Its R2TSN.
    pub r2t_sn: u32,
    /// Offset asked for.
    pub offset: u32,
    /// Length asked for.
    pub len: u32,
    /// Bytes received so far.
    pub received: u32,
    /// The DataSN the next Data-Out of this sequence must carry.
    pub next_data_sn: u32,
}

/// The Data-Out plan of one write command.
#[derive(Clone, Debug)]
pub struct WriteTransfer {
    edtl: u32,
    /// End of the unsolicited range (immediate + unsolicited Data-Out).
    unsolicited_end: u32,
    /// Unsolicited bytes received, including immediate data.
    unsolicited_received: u32,
    /// Whether unsolicited Data-Out is still expected.
    unsolicited_open: bool,
    /// The DataSN the next unsolicited Data-Out must carry.
    unsolicited_data_sn: u32,
    /// Next offset to ask for with an R2T.
    next_offset: u32,
    r2ts: Vec<R2t>,
    next_r2t_sn: u32,
    received: u64,
}

impl WriteTransfer {
    /// Plans a write of `edtl` bytes whose command PDU carried `immediate` bytes and had the
    /// F bit `final_bit` (no unsolicited Data-Out follows).
    pub fn new(
        t: &Transfer,
        edtl: u32,
        immediate: u32,
        final_bit: bool,
    ) -> Result<WriteTransfer, DataError> {
        if immediate > 0 && (!t.immediate_data || immediate > t.first_burst || immediate > edtl) {
            return Err(DataError::Immediate(immediate));
        }
        let unsolicited_allowed = if t.initial_r2t {
            immediate
        } else {
            t.first_burst.min(edtl)
        };
        let unsolicited_open = !final_bit && !t.initial_r2t && unsolicited_allowed > immediate;
        if !final_bit && t.initial_r2t {
            // The initiator announces Data-Out InitialR2T=Yes does not allow.
            return Err(DataError::Unsolicited);
        }
        let unsolicited_end = if unsolicited_open {
            unsolicited_allowed
        } else {
            immediate
        };
        Ok(WriteTransfer {
            edtl,
            unsolicited_end,
            unsolicited_received: immediate,
            unsolicited_open,
            unsolicited_data_sn: 0,
            next_offset: unsolicited_end,
            r2ts: Vec::new(),
            next_r2t_sn: 0,
            received: u64::from(immediate),
        })
    }

    /// Checks a Data-Out and returns the byte range of the command buffer it fills.
    pub fn accept(&mut self, d: &DataOut) -> Result<std::ops::Range<usize>, DataError> {
        let out_of_range = DataError::OutOfRange {
            offset: d.buffer_offset,
            len: d.len,
        };
        let end = d
            .buffer_offset
            .checked_add(d.len)
            .ok_or(out_of_range.clone())?;
        if d.ttt == RESERVED_TAG {
            if !self.unsolicited_open {
                return Err(DataError::Unsolicited);
            }
            if d.data_sn != self.unsolicited_data_sn {
                return Err(DataError::OutOfOrder {
                    got: d.data_sn,
                    expected: self.unsolicited_data_sn,
                });
            }
            // In order: each PDU starts where the previous one ended.
            if d.buffer_offset != self.unsolicited_received || end > self.unsolicited_end {
                return Err(out_of_range);
            }
            self.unsolicited_data_sn += 1;
            self.unsolicited_received = end;
            if d.final_bit {
                self.unsolicited_open = false;
                // Whatever the unsolicited burst left out is asked for with R2Ts.
                self.next_offset = self.unsolicited_received;
            }
        } else {
            let r = self
                .r2ts
                .iter_mut()
                .find(|r| r.ttt == d.ttt)
                .ok_or(DataError::UnknownTag(d.ttt))?;
            if d.data_sn != r.next_data_sn {
                return Err(DataError::OutOfOrder {
                    got: d.data_sn,
                    expected: r.next_data_sn,
                });
            }
            if d.buffer_offset != r.offset + r.received || end > r.offset + r.len {
                return Err(out_of_range);
            }
            r.next_data_sn += 1;
            r.received += d.len;
            if d.final_bit || r.received >= r.len {
                let ttt = r.ttt;
                self.r2ts.retain(|r| r.ttt != ttt);
            }
        }
        self.received += u64::from(d.len);
        Ok(d.buffer_offset as usize..end as usize)
    }

    /// New R2Ts to send now (tags from `next_tag`), respecting MaxOutstandingR2T and
    /// MaxBurstLength. None while unsolicited data is still arriving.
    pub fn next_r2ts(&mut self, t: &Transfer, next_tag: &mut impl FnMut() -> u32) -> Vec<R2t> {
        let mut out = Vec::new();
        if self.unsolicited_open {
            return out;
        }
        while self.next_offset < self.edtl && (self.r2ts.len() as u32) < t.max_outstanding_r2t {
            let len = (self.edtl - self.next_offset).min(t.max_burst);
            let r = R2t {
                ttt: next_tag(),
                r2t_sn: self.next_r2t_sn,
                offset: self.next_offset,
                len,
                received: 0,
                next_data_sn: 0,
            };
            self.next_r2t_sn += 1;
            self.next_offset += len;
            self.r2ts.push(r);
            out.push(r);
        }
        out
    }

    /// Whether every byte has arrived (no more Data-Out is expected).
    pub fn complete(&self) -> bool {
        !self.unsolicited_open && self.r2ts.is_empty() && self.next_offset >= self.edtl
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// One Data-In PDU of a read: offset and length in the data, whether it ends a sequence
/// (F bit), and whether it is the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataInPiece {
    /// Offset in the data.
    pub offset: u32,
    /// Length.
    pub len: u32,
    /// Ends a sequence of at most MaxBurstLength.
    pub final_bit: bool,
    /// The last PDU of the command.
    pub last: bool,
}

/// Splits `len` bytes of Data-In into PDUs of at most `max_xmit` bytes, sequences of at most
/// `max_burst` bytes.
pub fn data_in_pieces(
    len: u32,
    max_xmit: u32,
    max_burst: u32,
) -> impl Iterator<Item = DataInPiece> {
    let max_xmit = max_xmit.max(512);
    let max_burst = max_burst.max(max_xmit);
    let mut offset = 0u32;
    let mut in_burst = 0u32;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let n = (len - offset).min(max_xmit).min(max_burst - in_burst);
        let piece_offset = offset;
        offset += n;
        in_burst += n;
        let last = offset >= len;
        let final_bit = last || in_burst >= max_burst;
        if final_bit {
            in_burst = 0;
        }
        Some(DataInPiece {
            offset: piece_offset,
            len: n,
            final_bit,
            last,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_out(ttt: u32, offset: u32, len: u32, final_bit: bool) -> DataOut {
        DataOut {
            final_bit,
            itt: 1,
            ttt,
            data_sn: 0,
            buffer_offset: offset,
            len,
        }
    }

    fn data_out_sn(ttt: u32, data_sn: u32, offset: u32, len: u32, final_bit: bool) -> DataOut {
        DataOut {
            data_sn,
            ..data_out(ttt, offset, len, final_bit)
        }
    }

    #[test]
    fn test_abort_absent_task() {
        let mut w = CmdWindow::new(10, 4);
        assert_eq!(w.admit(10, false), Admit::Run);
        w.complete();
        // CmdSN 10 arrived and completed: the task does not exist any more.
        assert!(!w.abort_absent(10, 11));
        // CmdSN 11 and 12 have not arrived; the request (CmdSN 13) comes after them.
        assert!(w.abort_absent(11, 13));
        assert!(w.abort_absent(12, 13));
        // Not before the request itself, or beyond MaxCmdSN (14): never sent.
        assert!(!w.abort_absent(13, 13));
        assert!(!w.abort_absent(15, 16));
        // Serial arithmetic across the wrap.
        let w = CmdWindow::new(u32::MAX, 4);
        assert!(w.abort_absent(u32::MAX, 1));
        assert!(w.abort_absent(0, 1));
        assert!(!w.abort_absent(u32::MAX - 1, 1));
    }

    #[test]
    fn test_window_in_order_and_depth() {
        let mut w = CmdWindow::new(10, 2);
        assert_eq!(w.max_cmd_sn(), 11);
        assert_eq!(w.admit(10, false), Admit::Run);
        assert_eq!(w.admit(11, false), Admit::Run);
        // Window full: MaxCmdSN stays 11, so 12 is outside.
        assert_eq!(w.max_cmd_sn(), 11);
        assert_eq!(w.admit(12, false), Admit::Ignore);
        w.complete();
        assert_eq!(w.max_cmd_sn(), 12);
        assert_eq!(w.admit(12, false), Admit::Run);
        // A duplicate or old CmdSN is ignored; immediate commands take no number.
        assert_eq!(w.admit(11, false), Admit::Ignore);
        assert_eq!(w.admit(999, true), Admit::Run);
        assert_eq!(w.exp_cmd_sn(), 13);
    }

    #[test]
    fn test_window_wraps() {
        let mut w = CmdWindow::new(u32::MAX, 4);
        assert_eq!(w.admit(u32::MAX, false), Admit::Run);
        assert_eq!(w.admit(0, false), Admit::Run);
        assert_eq!(w.exp_cmd_sn(), 1);
    }

    #[test]
    fn test_write_immediate_then_r2ts() {
        let t = Transfer {
            max_burst: 8192,
            max_outstanding_r2t: 1,
            ..Transfer::default()
        };
        let mut w = WriteTransfer::new(&t, 20_000, 4096, true).unwrap();
        let mut tag = 100;
        let mut next = || {
            tag += 1;
            tag
        };
        let r = w.next_r2ts(&t, &mut next);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].offset, r[0].len, r[0].r2t_sn), (4096, 8192, 0));
        assert!(
            w.next_r2ts(&t, &mut next).is_empty(),
            "one outstanding at a time"
        );
        assert_eq!(
            w.accept(&data_out(r[0].ttt, 4096, 8192, true)).unwrap(),
            4096..12288
        );
        let r = w.next_r2ts(&t, &mut next);
        assert_eq!((r[0].offset, r[0].len, r[0].r2t_sn), (12288, 7712, 1));
        assert!(!w.complete());
        w.accept(&data_out(r[0].ttt, 12288, 7712, true)).unwrap();
        assert!(w.complete());
        assert_eq!(w.received(), 20_000);
    }

    #[test]
    fn test_write_unsolicited_burst() {
        let t = Transfer {
            initial_r2t: false,
            first_burst: 8192,
            ..Transfer::default()
        };
        let mut w = WriteTransfer::new(&t, 16384, 0, false).unwrap();
        let mut next = || 7;
        assert!(w.next_r2ts(&t, &mut next).is_empty());
        w.accept(&data_out(RESERVED_TAG, 0, 4096, false)).unwrap();
        // Past FirstBurstLength is refused, and so is a DataSN out of sequence.
        assert!(
            w.accept(&data_out_sn(RESERVED_TAG, 1, 4096, 8192, true))
                .is_err()
        );
        assert_eq!(
            w.accept(&data_out_sn(RESERVED_TAG, 0, 4096, 4096, true)),
            Err(DataError::OutOfOrder {
                got: 0,
                expected: 1
            })
        );
        w.accept(&data_out_sn(RESERVED_TAG, 1, 4096, 4096, true))
            .unwrap();
        let r = w.next_r2ts(&t, &mut next);
        assert_eq!((r[0].offset, r[0].len), (8192, 8192));
        // Unsolicited data after the burst closed is refused, and so is an unknown tag.
        assert_eq!(
            w.accept(&data_out(RESERVED_TAG, 8192, 4096, false)),
            Err(DataError::Unsolicited)
        );
        assert_eq!(
            w.accept(&data_out(9, 8192, 4096, false)),
            Err(DataError::UnknownTag(9))
        );
        w.accept(&data_out(7, 8192, 8192, true)).unwrap();
        assert!(w.complete());
    }

    #[test]
    fn test_write_r2t_sequence_in_order() {
        let t = Transfer {
            max_burst: 16384,
            ..Transfer::default()
        };
        let mut w = WriteTransfer::new(&t, 16384, 0, true).unwrap();
        let mut next = || 5;
        let r = w.next_r2ts(&t, &mut next);
        assert_eq!(r.len(), 1);
        // DataSN 1 first, a repeated 0, a gap in the offsets: all refused.
        assert!(matches!(
            w.accept(&data_out_sn(5, 1, 0, 4096, false)),
            Err(DataError::OutOfOrder { .. })
        ));
        w.accept(&data_out_sn(5, 0, 0, 4096, false)).unwrap();
        assert!(matches!(
            w.accept(&data_out_sn(5, 0, 4096, 4096, false)),
            Err(DataError::OutOfOrder { .. })
        ));
        assert!(matches!(
            w.accept(&data_out_sn(5, 1, 8192, 4096, false)),
            Err(DataError::OutOfRange { .. })
        ));
        w.accept(&data_out_sn(5, 1, 4096, 4096, false)).unwrap();
        w.accept(&data_out_sn(5, 2, 8192, 8192, true)).unwrap();
        assert!(w.complete());
    }

    #[test]
    fn test_write_refuses_bad_immediate() {
        let t = Transfer {
            immediate_data: false,
            ..Transfer::default()
        };
        assert!(WriteTransfer::new(&t, 4096, 4096, true).is_err());
        let t = Transfer::default();
        assert!(
            WriteTransfer::new(&t, 4096, 8192, true).is_err(),
            "more than EDTL"
        );
        assert!(
            WriteTransfer::new(&t, 4096, 0, false).is_err(),
            "unsolicited with InitialR2T"
        );
        let w = WriteTransfer::new(&t, 4096, 4096, true).unwrap();
        assert!(w.complete());
    }

    #[test]
    fn test_data_in_pieces_bursts() {
        let p: Vec<_> = data_in_pieces(10_000, 4096, 8192).collect();
        let lens: Vec<_> = p
            .iter()
            .map(|p| (p.offset, p.len, p.final_bit, p.last))
            .collect();
        assert_eq!(
            lens,
            vec![
                (0, 4096, false, false),
                (4096, 4096, true, false),
                (8192, 1808, true, true)
            ]
        );
        assert_eq!(data_in_pieces(0, 4096, 8192).count(), 0);
    }
}
