//! SANITIZE (SBC-4 4.11 and 5.30): OVERWRITE, BLOCK ERASE, CRYPTOGRAPHIC ERASE and EXIT
//! FAILURE MODE.
//!
//! A virtual disk has no medium of its own: what a sanitize operation guarantees here is what
//! the logical unit returns afterwards, not the state of the shared device underneath (which
//! holds other disks and is not the logical unit's to erase).
//!
//! - OVERWRITE writes the initialization pattern (repeated to fill each logical block,
//!   inverted between passes with INVERT) over every block, pass after pass, in bounded
//!   chunks; an all-zero pass is written with [`Backend::write_zeroes`].
//! - BLOCK ERASE and CRYPTOGRAPHIC ERASE deallocate the whole LUN with [`Backend::unmap`]
//!   (thin LUNs only: a fully provisioned LUN reports neither). The data cannot be read back
//!   through the LUN; reads return zeroes (WABEREQ and WACEREQ are 01b: a read after the
//!   erase completes with GOOD).
//! - EXIT FAILURE MODE leaves the failure mode of a failed operation that was started with
//!   AUSE set.
//!
//! The operation runs in its own task, so it goes on when the command is aborted, the LUN or
//! target is reset or the session ends (SBC-4: a sanitize operation survives these). Without
//! IMMED the command returns when the operation completes; with IMMED as soon as the request
//! is validated. While it runs, every command to the LUN through this node except INQUIRY,
//! REPORT LUNS and REQUEST SENSE gets NOT READY, SANITIZE IN PROGRESS with a progress
//! indication, which REQUEST SENSE also returns. After a failure, medium access commands get
//! MEDIUM ERROR, SANITIZE COMMAND FAILED until a sanitize operation succeeds or, when the
//! failed one had AUSE set, EXIT FAILURE MODE.
//!
//! The state is this node's: other nodes' portals do not see a sanitize in progress (their
//! I/O to the LUN is not refused while it runs).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::cdb::{self, be16};
use super::sense::{Sense, codes};
use super::{DataIn, Failure, Scsi};
use crate::backend::{Backend, BackendError, LunInfo};

/// Bytes per write of an OVERWRITE pass (1 MiB): the memory an overwrite takes.
const OVERWRITE_CHUNK_BYTES: u64 = 1 << 20;

/// Bytes per unmap or write-zeroes call (1 GiB), so progress advances on large LUNs.
const ERASE_CHUNK_BYTES: u64 = 1 << 30;

/// The SANITIZE service actions.
const OVERWRITE: u8 = 0x01;
const BLOCK_ERASE: u8 = 0x02;
const CRYPTO_ERASE: u8 = 0x03;
const EXIT_FAILURE_MODE: u8 = 0x1f;

/// What a SANITIZE command asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Write `pattern` (one logical block, the initialization pattern repeated) `passes`
    /// times, inverted on every other pass with `invert`.
    Overwrite {
        passes: u8,
        invert: bool,
        pattern: Vec<u8>,
    },
    /// Deallocate every block.
    BlockErase,
    /// Deallocate every block (there is no key to change: the effect is the block erase's).
    CryptoErase,
    /// Leave the failure mode.
    ExitFailureMode,
}

/// A validated SANITIZE command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// Return status once the request is validated.
    pub immed: bool,
    /// Allow EXIT FAILURE MODE after a failure (unrestricted completion mode).
    pub ause: bool,
    pub action: Action,
}

fn bad_param(byte: u16, bit: Option<u8>) -> Sense {
    codes::INVALID_FIELD_IN_PARAMETERS.in_parameters(byte, bit)
}

/// Decodes a SANITIZE CDB (already checked against its usage data) and its parameter list
/// (`params`, the Data-Out) for a LUN with `block_size`-byte blocks.
///
/// OVERWRITE needs a parameter list of 5 to `block_size + 4` bytes holding an OVERWRITE
/// COUNT of at least one and an INITIALIZATION PATTERN of 1 to `block_size` bytes; the other
/// service actions take none. A list length out of range is INVALID FIELD IN CDB, a bad field
/// in the list INVALID FIELD IN PARAMETER LIST, a list shorter than announced PARAMETER LIST
/// LENGTH ERROR.
pub(crate) fn parse(cdb: &[u8], params: &[u8], block_size: u32) -> Result<Request, Sense> {
    let immed = cdb[1] & 0x80 != 0;
    let ause = cdb[1] & 0x20 != 0;
    let plen = usize::from(be16(cdb, 7));
    let bs = block_size as usize;
    let action = match cdb[1] & 0x1f {
        OVERWRITE => {
            if plen < 5 || plen > bs + 4 {
                return Err(cdb::invalid_byte(7));
            }
            let Some(p) = params.get(..plen) else {
                return Err(codes::PARAMETER_LIST_LENGTH);
            };
            if p[0] & 0x60 != 0 {
                // TEST: no test modes.
                return Err(bad_param(0, Some(6)));
            }
            if p[1] != 0 {
                return Err(bad_param(1, None));
            }
            let passes = p[0] & 0x1f;
            if passes == 0 {
                return Err(bad_param(0, Some(4)));
            }
            let ipl = usize::from(be16(p, 2));
            if ipl == 0 || ipl > bs {
                return Err(bad_param(2, None));
            }
            if ipl + 4 > plen {
                return Err(codes::PARAMETER_LIST_LENGTH);
            }
            let ip = &p[4..4 + ipl];
            let pattern = (0..bs).map(|i| ip[i % ipl]).collect();
            Action::Overwrite {
                passes,
                invert: p[0] & 0x80 != 0,
                pattern,
            }
        }
        sa @ (BLOCK_ERASE | CRYPTO_ERASE | EXIT_FAILURE_MODE) => {
            if plen != 0 {
                return Err(cdb::invalid_byte(7));
            }
            match sa {
                BLOCK_ERASE => Action::BlockErase,
                CRYPTO_ERASE => Action::CryptoErase,
                _ => Action::ExitFailureMode,
            }
        }
        // The CDB table only lets the four service actions through.
        _ => return Err(codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4))),
    };
    Ok(Request {
        immed,
        ause,
        action,
    })
}

/// The sanitize state of a LUN, as the command path sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LunState {
    /// An operation is in progress; the fraction done, in 65536ths.
    Running(u16),
    /// The last operation failed; `ause` was set in its command.
    Failed { ause: bool },
}

#[derive(Debug)]
enum Entry {
    Running(Arc<AtomicU32>),
    Failed { ause: bool },
}

/// The sanitize operations of this node: running ones and failed ones not yet exited, by
/// LUN uuid.
#[derive(Debug, Default)]
pub(crate) struct SanitizeTable {
    luns: HashMap<[u8; 16], Entry>,
}

impl SanitizeTable {
    /// The state of `lu`, `None` when no operation runs or failed.
    pub(crate) fn state(&self, lu: &LunInfo) -> Option<LunState> {
        Some(match self.luns.get(&lu.uuid)? {
            Entry::Running(p) => LunState::Running(progress_of(p)),
            Entry::Failed { ause } => LunState::Failed { ause: *ause },
        })
    }

    /// Decides on `req` for `lu`: `Ok(None)` when it is done already (EXIT FAILURE MODE),
    /// `Ok(Some(progress))` when an operation is to run (the LUN is marked running).
    pub(crate) fn begin(
        &mut self,
        lu: &LunInfo,
        req: &Request,
    ) -> Result<Option<Arc<AtomicU32>>, Sense> {
        match (self.luns.get(&lu.uuid), &req.action) {
            (Some(Entry::Running(p)), _) => {
                Err(codes::SANITIZE_IN_PROGRESS.with_progress(progress_of(p)))
            }
            (Some(Entry::Failed { ause: true }), Action::ExitFailureMode) => {
                self.luns.remove(&lu.uuid);
                Ok(None)
            }
            // Restricted completion mode: only a successful sanitize operation leaves it, and
            // a request for the unrestricted mode is refused (SBC-4 5.30.1).
            (Some(Entry::Failed { ause: false }), Action::ExitFailureMode) => {
                Err(codes::INVALID_FIELD_IN_CDB.in_cdb(1, Some(4)))
            }
            (Some(Entry::Failed { ause: false }), _) if req.ause => Err(cdb::invalid_bit(1, 0x20)),
            // Nothing failed: there is no failure mode to leave.
            (None, Action::ExitFailureMode) => Ok(None),
            _ => {
                let p = Arc::new(AtomicU32::new(0));
                self.luns.insert(lu.uuid, Entry::Running(p.clone()));
                Ok(Some(p))
            }
        }
    }

    /// The operation on `uuid` ended: the LUN leaves the sanitize state, or enters the
    /// failure mode.
    pub(crate) fn end(&mut self, uuid: &[u8; 16], ok: bool, ause: bool) {
        if ok {
            self.luns.remove(uuid);
        } else {
            self.luns.insert(*uuid, Entry::Failed { ause });
        }
    }
}

fn progress_of(p: &AtomicU32) -> u16 {
    u16::try_from(p.load(Ordering::Relaxed)).unwrap_or(u16::MAX)
}

/// Records `done` of `total` units in 65536ths (at most 65535: done is not reported as more).
fn record(progress: &AtomicU32, done: u64, total: u64) {
    let v = (u128::from(done) * 65536 / u128::from(total.max(1))).min(65535);
    progress.store(v as u32, Ordering::Relaxed);
}

/// Performs `action` on `lu`, recording progress; makes it durable at the end.
pub(crate) async fn run<B: Backend>(
    backend: &B,
    lu: &LunInfo,
    action: &Action,
    progress: &AtomicU32,
) -> Result<(), BackendError> {
    let size = lu.size_bytes;
    match action {
        Action::Overwrite {
            passes,
            invert,
            pattern,
        } => {
            let passes = u64::from(*passes);
            let total = passes * size;
            for pass in 0..passes {
                let block: Vec<u8> = if *invert && pass % 2 == 1 {
                    pattern.iter().map(|b| !b).collect()
                } else {
                    pattern.clone()
                };
                let base = pass * size;
                if block.iter().all(|&b| b == 0) {
                    erase(backend, lu, false, |done| {
                        record(progress, base + done, total)
                    })
                    .await?;
                    continue;
                }
                let chunk = OVERWRITE_CHUNK_BYTES.max(lu.block_bytes());
                let template: Vec<u8> =
                    block.iter().copied().cycle().take(chunk as usize).collect();
                let mut at = 0;
                while at < size {
                    let n = (size - at).min(chunk);
                    let mut buf = backend.buffer(n as usize);
                    buf.as_mut().copy_from_slice(&template[..n as usize]);
                    backend.write(lu, at, buf, false).await?;
                    at += n;
                    record(progress, base + at, total);
                }
            }
        }
        Action::BlockErase | Action::CryptoErase => {
            erase(backend, lu, true, |done| record(progress, done, size)).await?;
        }
        Action::ExitFailureMode => {}
    }
    backend.flush(lu).await
}

/// Deallocates (`unmap`) or zeroes the whole LUN in bounded calls, reporting the bytes done.
async fn erase<B: Backend>(
    backend: &B,
    lu: &LunInfo,
    unmap: bool,
    done: impl Fn(u64),
) -> Result<(), BackendError> {
    let size = lu.size_bytes;
    let mut at = 0;
    while at < size {
        let n = (size - at).min(ERASE_CHUNK_BYTES);
        if unmap {
            backend.unmap(lu, at, n).await?;
        } else {
            backend.write_zeroes(lu, at, n).await?;
        }
        at += n;
        done(at);
    }
    Ok(())
}

impl<B: Backend> Scsi<B> {
    /// SANITIZE: validates the request, starts the operation in its own task and, without
    /// IMMED, waits for it.
    pub(super) async fn sanitize(
        &self,
        lu: &LunInfo,
        cdb: &[u8],
        data: Option<B::Buf>,
    ) -> Result<DataIn<B::Buf>, Failure> {
        let params = data.as_ref().map(|d| d.as_ref()).unwrap_or(&[]);
        let req = parse(cdb, params, lu.block_size)?;
        drop(data);
        let Some(progress) = self.lock_sanitizing().begin(lu, &req)? else {
            return Ok(DataIn::None);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let backend = self.backend.clone();
        let table = self.sanitizing.clone();
        let lu = lu.clone();
        let Request {
            immed,
            ause,
            action,
        } = req;
        let task = async move {
            let result = run(&*backend, &lu, &action, &progress).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, lun = lu.lun, "the sanitize operation failed");
            }
            table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .end(&lu.uuid, result.is_ok(), ause);
            // Nobody waits with IMMED, or when the command was aborted.
            let _ = tx.send(result.is_ok());
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(task)),
            Err(_) => task.await,
        }
        if immed {
            return Ok(DataIn::None);
        }
        match rx.await {
            Ok(true) => Ok(DataIn::None),
            _ => Err(codes::SANITIZE_FAILED.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(sa: u8, plen: u16) -> [u8; 10] {
        let mut c = [0x48, sa, 0, 0, 0, 0, 0, 0, 0, 0];
        c[7..9].copy_from_slice(&plen.to_be_bytes());
        c
    }

    fn overwrite_params(count: u8, pattern: &[u8]) -> Vec<u8> {
        let mut p = vec![count, 0];
        p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
        p.extend_from_slice(pattern);
        p
    }

    fn lun() -> LunInfo {
        LunInfo {
            lun: 0,
            uuid: [3; 16],
            name: String::new(),
            size_bytes: 1 << 20,
            block_size: 512,
            thin: true,
        }
    }

    #[test]
    fn test_sanitize_parse_overwrite_pattern_repeated() {
        let p = overwrite_params(0x82, &[1, 2, 3]);
        let r = parse(&cdb(0xa1, p.len() as u16), &p, 512).unwrap();
        assert!(r.immed && r.ause);
        let Action::Overwrite {
            passes,
            invert,
            pattern,
        } = r.action
        else {
            panic!("not an overwrite");
        };
        assert_eq!((passes, invert, pattern.len()), (2, true, 512));
        assert_eq!(&pattern[..7], &[1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn test_sanitize_parse_overwrite_errors() {
        let full = overwrite_params(1, &[0xaa; 512]);
        // Parameter list lengths 0 to 4 and block size + 5 are bad CDB fields.
        for plen in [0u16, 1, 4, 517] {
            let e = parse(&cdb(0x01, plen), &[0; 600], 512).unwrap_err();
            assert_eq!(e, codes::INVALID_FIELD_IN_CDB.in_cdb(7, None), "{plen}");
        }
        // Overwrite count zero, pattern length zero or above the block size, TEST set.
        let mut p = full.clone();
        p[0] = 0;
        assert_eq!(parse(&cdb(0x01, 516), &p, 512).unwrap_err().asc, 0x26);
        let mut p = full.clone();
        p[2..4].copy_from_slice(&[0, 0]);
        assert_eq!(parse(&cdb(0x01, 516), &p, 512).unwrap_err().asc, 0x26);
        let mut p = full.clone();
        p[2..4].copy_from_slice(&516u16.to_be_bytes());
        assert_eq!(parse(&cdb(0x01, 516), &p, 512).unwrap_err().asc, 0x26);
        let mut p = full.clone();
        p[0] = 0x21;
        assert_eq!(parse(&cdb(0x01, 516), &p, 512).unwrap_err().asc, 0x26);
        // A pattern longer than the list, a list longer than the Data-Out.
        let p = overwrite_params(1, &[1; 8]);
        assert_eq!(
            parse(&cdb(0x01, 10), &p, 512).unwrap_err(),
            codes::PARAMETER_LIST_LENGTH
        );
        assert_eq!(
            parse(&cdb(0x01, 12), &p[..10], 512).unwrap_err(),
            codes::PARAMETER_LIST_LENGTH
        );
    }

    #[test]
    fn test_sanitize_parse_erase_and_exit_take_no_parameters() {
        assert_eq!(
            parse(&cdb(0x02, 0), &[], 4096).unwrap().action,
            Action::BlockErase
        );
        assert_eq!(
            parse(&cdb(0x03, 0), &[], 4096).unwrap().action,
            Action::CryptoErase
        );
        assert_eq!(
            parse(&cdb(0x1f, 0), &[], 4096).unwrap().action,
            Action::ExitFailureMode
        );
        for sa in [0x02, 0x03, 0x1f] {
            assert_eq!(
                parse(&cdb(sa, 8), &[0; 8], 4096).unwrap_err(),
                codes::INVALID_FIELD_IN_CDB.in_cdb(7, None)
            );
        }
    }

    #[test]
    fn test_sanitize_table_failure_modes() {
        let lu = lun();
        let req = |action: Action, ause: bool| Request {
            immed: false,
            ause,
            action,
        };
        let mut t = SanitizeTable::default();
        // Exit without a failure: nothing to do.
        assert!(matches!(
            t.begin(&lu, &req(Action::ExitFailureMode, false)),
            Ok(None)
        ));
        let p = t
            .begin(&lu, &req(Action::BlockErase, false))
            .unwrap()
            .unwrap();
        record(&p, 1, 4);
        assert_eq!(t.state(&lu), Some(LunState::Running(16384)));
        assert_eq!(
            t.begin(&lu, &req(Action::CryptoErase, false))
                .unwrap_err()
                .ascq,
            0x1b
        );
        // Failed in the restricted mode: no exit, no unrestricted request.
        t.end(&lu.uuid, false, false);
        assert_eq!(t.state(&lu), Some(LunState::Failed { ause: false }));
        assert!(t.begin(&lu, &req(Action::ExitFailureMode, true)).is_err());
        assert!(t.begin(&lu, &req(Action::BlockErase, true)).is_err());
        // Another operation in the restricted mode may run, and success clears the failure.
        assert!(
            t.begin(&lu, &req(Action::BlockErase, false))
                .unwrap()
                .is_some()
        );
        t.end(&lu.uuid, true, false);
        assert_eq!(t.state(&lu), None);
        // Failed in the unrestricted mode: EXIT FAILURE MODE leaves it.
        t.begin(&lu, &req(Action::BlockErase, true)).unwrap();
        t.end(&lu.uuid, false, true);
        assert!(matches!(
            t.begin(&lu, &req(Action::ExitFailureMode, false)),
            Ok(None)
        ));
        assert_eq!(t.state(&lu), None);
    }

    #[test]
    fn test_sanitize_progress_is_capped() {
        let p = AtomicU32::new(0);
        record(&p, 10, 10);
        assert_eq!(progress_of(&p), 65535);
        record(&p, 0, 0);
        assert_eq!(progress_of(&p), 0);
    }
}
