//! The block-I/O wire protocol: how a node ships I/O to a volume's coordinator (redirected I/O)
//! and how a local client hands I/O to a node. Pure encoding and decoding, no sockets.
//!
//! One TCP connection carries many requests at once (pipelined); each has a 64-bit id chosen by
//! the client and the answer carries it back, in any order. All integers are big-endian.
//!
//! ```text
//! request header, 56 bytes                      response header, 32 bytes
//!  0  magic "CSVR"             u32               0  magic "CSVA"            u32
//!  4  version (1 or 2)         u8                4  version (1 or 2)        u8
//!  5  op                       u8                5  status                  u8
//!  6  flags: 1 FUA, 2 LOCAL    u8                6  reserved (0)            u16
//!  7  reserved (0)             u8                8  request id              u64
//!  8  request id               u64              16  payload length          u32
//! 16  disk id                  u64              20  payload crc32           u32
//! 24  offset in the disk       u64              24  reserved (0)            u32
//! 32  length in bytes          u64              28  header crc32 (0..28)    u32
//! 40  sender's volume epoch    u64
//! 48  payload crc32            u32
//! 52  header crc32 (0..52)     u32
//! ```
//!
//! The epoch is the layout the sender checked the request against; a coordinator that has not
//! adopted it yet catches up before it executes the request.
//!
//! A write's payload (`length` bytes) follows its header; a successful read's answer carries
//! the data, a failed request's answer a UTF-8 message. Checksums are CRC-32 (crc32fast). A
//! header that fails its checksum cannot be trusted to frame the stream, so the connection is
//! closed; a payload that fails its checksum fails only its request.
//!
//! `LOCAL` marks a client's request to a node, served in whatever mode the node is in; without
//! it the request comes from a peer and is executed on the coordinator's own device.
//!
//! Operations:
//!
//! ```text
//! op  name               length means                    payload                 needs
//!  1  read               bytes to read (<= 16 MiB)       -                       v1
//!  2  write              bytes to write (<= 16 MiB)      the data                v1
//!  3  flush              0                               -                       v1
//!  4  discard            bytes                           -                       v1
//!  5  write-zeroes       bytes                           -                       v1
//!  6  compare-and-write  bytes compared (<= 1 MiB)       compare, then data      v2
//!                                                        (2 x length bytes)
//!  7  write-partial      bytes to write (<= 16 MiB)      the data                v2
//! ```
//!
//! Ops 6 and 7 work in 512-byte sectors (offset and length multiples of 512, checked by the
//! receiving node, which answers `unaligned` otherwise); they are serialized at the volume's
//! coordinator (see [`crate::serial`]). A compare-and-write whose data differs from `compare`
//! is answered with status 10 `miscompare`, whose 8-byte payload is the big-endian offset of
//! the first differing byte within the compared range.
//!
//! **Versions.** A header carries the lowest version that defines its operation or status:
//! ops 1-5 and statuses 0-9 are version 1, ops 6-7 and status 10 version 2. A node of this
//! version reads both, so it still serves and calls version-1 peers for ops 1-5; a version-1
//! peer refuses a version-2 header (it closes the connection), so ops 6 and 7 work only between
//! nodes of version 2.

/// Size of a request header.
pub const REQUEST_BYTES: usize = 56;
/// Size of a response header.
pub const RESPONSE_BYTES: usize = 32;
/// Largest read or write payload.
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Largest range one compare-and-write compares (its payload is twice this).
pub const MAX_COMPARE: u64 = 1 << 20;
/// Bytes of a miscompare answer's payload.
pub const MISCOMPARE_BYTES: usize = 8;

const REQUEST_MAGIC: u32 = u32::from_be_bytes(*b"CSVR");
const RESPONSE_MAGIC: u32 = u32::from_be_bytes(*b"CSVA");
/// The newest protocol version this side speaks (it reads every version up to it).
pub const VERSION: u8 = 2;

/// Request flag: force unit access (durable on completion).
pub const FLAG_FUA: u8 = 1;
/// Request flag: from a client, served in the node's current mode.
pub const FLAG_LOCAL: u8 = 2;

/// An I/O operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes.
    Read = 1,
    /// Write the payload.
    Write = 2,
    /// Make completed writes durable.
    Flush = 3,
    /// Deallocate a range.
    Discard = 4,
    /// Zero a range.
    WriteZeroes = 5,
    /// Compare `len` bytes with the payload's first half; if equal, write its second half.
    CompareAndWrite = 6,
    /// Write the payload, in 512-byte sectors, by read-modify-write at the coordinator.
    WritePartial = 7,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::CompareAndWrite,
            7 => Op::WritePartial,
            _ => return None,
        })
    }

    /// The protocol version that introduced this operation (and that its headers carry).
    pub fn version(self) -> u8 {
        match self {
            Op::Read | Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes => 1,
            Op::CompareAndWrite | Op::WritePartial => 2,
        }
    }

    /// The largest `len` a request of this operation may carry, if it is bounded.
    pub fn max_len(self) -> Option<u64> {
        match self {
            Op::Read | Op::Write | Op::WritePartial => Some(MAX_PAYLOAD),
            Op::CompareAndWrite => Some(MAX_COMPARE),
            Op::Flush | Op::Discard | Op::WriteZeroes => None,
        }
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// The operation.
    pub op: Op,
    /// [`FLAG_FUA`] and [`FLAG_LOCAL`].
    pub flags: u8,
    /// The client's id for the request.
    pub id: u64,
    /// The virtual disk.
    pub disk: u64,
    /// Offset in the disk.
    pub offset: u64,
    /// Bytes to read, write, discard, zero or compare.
    pub len: u64,
    /// The volume epoch the sender checked the request against.
    pub epoch: u64,
    /// CRC-32 of the payload (0 without one).
    pub payload_crc: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header.
    pub fn payload_len(&self) -> u64 {
        match self.op {
            Op::Write | Op::WritePartial => self.len,
            Op::CompareAndWrite => self.len.saturating_mul(2),
            Op::Read | Op::Flush | Op::Discard | Op::WriteZeroes => 0,
        }
    }

    /// Encodes the header, with the version of its operation.
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4] = self.op.version();
        b[5] = self.op as u8;
        b[6] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..24].copy_from_slice(&self.disk.to_be_bytes());
        b[24..32].copy_from_slice(&self.offset.to_be_bytes());
        b[32..40].copy_from_slice(&self.len.to_be_bytes());
        b[40..48].copy_from_slice(&self.epoch.to_be_bytes());
        b[48..52].copy_from_slice(&self.payload_crc.to_be_bytes());
        let crc = crc32fast::hash(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; REQUEST_BYTES]) -> Result<Self, WireError> {
        let version = check_frame(b, REQUEST_MAGIC)?;
        let op = Op::from_u8(b[5]).ok_or(WireError::UnknownOp(b[5]))?;
        if op.version() > version {
            return Err(WireError::NotInVersion {
                what: "operation",
                code: b[5],
                version,
            });
        }
        if b[6] & !(FLAG_FUA | FLAG_LOCAL) != 0 || b[7] != 0 {
            return Err(WireError::Reserved);
        }
        let h = RequestHeader {
            op,
            flags: b[6],
            id: u64_at(b, 8),
            disk: u64_at(b, 16),
            offset: u64_at(b, 24),
            len: u64_at(b, 32),
            epoch: u64_at(b, 40),
            payload_crc: u32_at(b, 48),
        };
        if op.max_len().is_some_and(|max| h.len > max) {
            return Err(WireError::TooLarge(h.len));
        }
        Ok(h)
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Not a valid request.
    BadRequest = 1,
    /// No such virtual disk.
    NoSuchDisk = 2,
    /// Beyond the end of the disk.
    OutOfRange = 3,
    /// Offset or length not a multiple of the block size.
    Unaligned = 4,
    /// The receiver does not coordinate this disk's volume (retry at the coordinator).
    NotCoordinator = 5,
    /// The receiver has fenced itself (no quorum); retry elsewhere or later.
    Paused = 6,
    /// The receiver cannot serve the volume now (no device path); retry later.
    Unavailable = 7,
    /// The device failed the I/O.
    DeviceError = 8,
    /// The payload did not match its checksum.
    ChecksumMismatch = 9,
    /// A compare-and-write found different data and wrote nothing; the payload is the offset
    /// of the first differing byte ([`encode_miscompare`]).
    Miscompare = 10,
}

impl Status {
    fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::NoSuchDisk,
            3 => Status::OutOfRange,
            4 => Status::Unaligned,
            5 => Status::NotCoordinator,
            6 => Status::Paused,
            7 => Status::Unavailable,
            8 => Status::DeviceError,
            9 => Status::ChecksumMismatch,
            10 => Status::Miscompare,
            _ => return None,
        })
    }

    /// The protocol version that introduced this status (and that its answers carry).
    pub fn version(self) -> u8 {
        match self {
            Status::Miscompare => 2,
            _ => 1,
        }
    }

    /// Whether another attempt (at the same or a new coordinator) may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Status::NotCoordinator
                | Status::Paused
                | Status::Unavailable
                | Status::ChecksumMismatch
        )
    }
}

/// A response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The outcome.
    pub status: Status,
    /// The request's id.
    pub id: u64,
    /// Bytes of payload that follow.
    pub len: u32,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

impl ResponseHeader {
    /// Encodes the header, with the version of its status.
    pub fn encode(&self) -> [u8; RESPONSE_BYTES] {
        let mut b = [0u8; RESPONSE_BYTES];
        b[0..4].copy_from_slice(&RESPONSE_MAGIC.to_be_bytes());
        b[4] = self.status.version();
        b[5] = self.status as u8;
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b[20..24].copy_from_slice(&self.payload_crc.to_be_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; RESPONSE_BYTES]) -> Result<Self, WireError> {
        let version = check_frame(b, RESPONSE_MAGIC)?;
        let status = Status::from_u8(b[5]).ok_or(WireError::UnknownStatus(b[5]))?;
        if status.version() > version {
            return Err(WireError::NotInVersion {
                what: "status",
                code: b[5],
                version,
            });
        }
        if b[6] != 0 || b[7] != 0 || u32_at(b, 24) != 0 {
            return Err(WireError::Reserved);
        }
        let len = u32_at(b, 16);
        if u64::from(len) > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len.into()));
        }
        Ok(ResponseHeader {
            status,
            id: u64_at(b, 8),
            len,
            payload_crc: u32_at(b, 20),
        })
    }
}

/// A header that cannot be accepted; the connection it came on cannot be trusted further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not this protocol.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// A version this side does not speak.
    #[error("protocol version {0} is not supported (this node speaks versions 1 to {VERSION})")]
    BadVersion(u8),
    /// The header's checksum does not match.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// An operation code this side does not know.
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    /// A status code this side does not know.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// An operation or status newer than the version the header claims.
    #[error("{what} {code} is not part of protocol version {version}")]
    NotInVersion {
        /// "operation" or "status".
        what: &'static str,
        /// Its code.
        code: u8,
        /// The header's version.
        version: u8,
    },
    /// Reserved bits or bytes are set.
    #[error("reserved fields are not zero")]
    Reserved,
    /// A payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
}

/// Checks magic, checksum and version; returns the version.
fn check_frame(b: &[u8], magic: u32) -> Result<u8, WireError> {
    let n = b.len();
    let got = u32_at(b, 0);
    if got != magic {
        return Err(WireError::BadMagic(got));
    }
    if crc32fast::hash(&b[..n - 4]) != u32_at(b, n - 4) {
        return Err(WireError::HeaderChecksum);
    }
    if b[4] == 0 || b[4] > VERSION {
        return Err(WireError::BadVersion(b[4]));
    }
    Ok(b[4])
}

/// The payload of a [`Status::Miscompare`] answer: the offset of the first differing byte
/// within the compared range.
pub fn encode_miscompare(offset: u64) -> [u8; MISCOMPARE_BYTES] {
    offset.to_be_bytes()
}

/// Reads a [`Status::Miscompare`] answer's payload; `None` unless it is exactly
/// [`MISCOMPARE_BYTES`] long.
pub fn decode_miscompare(payload: &[u8]) -> Option<u64> {
    let b: [u8; MISCOMPARE_BYTES] = payload.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_request() -> impl Strategy<Value = RequestHeader> {
        (
            1u8..8,
            0u8..4,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0..=MAX_PAYLOAD,
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(op, flags, id, disk, offset, len, epoch, payload_crc)| {
                let op = Op::from_u8(op).unwrap();
                RequestHeader {
                    op,
                    flags,
                    id,
                    disk,
                    offset,
                    len: op.max_len().map_or(len, |max| len.min(max)),
                    epoch,
                    payload_crc,
                }
            })
    }

    /// Re-seals a header after a test changed a byte, so only that change is judged.
    fn reseal(b: &mut [u8]) {
        let n = b.len();
        let crc = crc32fast::hash(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&crc.to_be_bytes());
    }

    proptest! {
        #[test]
        fn test_request_round_trip(h in arb_request()) {
            prop_assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn test_response_round_trip(status in 0u8..11, id in any::<u64>(), len in 0u32..=(MAX_PAYLOAD as u32), crc in any::<u32>()) {
            let h = ResponseHeader { status: Status::from_u8(status).unwrap(), id, len, payload_crc: crc };
            prop_assert_eq!(ResponseHeader::decode(&h.encode()), Ok(h));
        }

        /// Any corruption of an encoded header is refused, never misread and never a panic.
        #[test]
        fn test_corrupt_headers_refused(h in arb_request(), at in 0usize..REQUEST_BYTES, bit in 0u8..8) {
            let mut b = h.encode();
            b[at] ^= 1 << bit;
            prop_assert!(RequestHeader::decode(&b).is_err());
        }

        #[test]
        fn test_garbage_never_panics(b in proptest::array::uniform32(any::<u8>())) {
            let _ = ResponseHeader::decode(&b);
            let mut r = [0u8; REQUEST_BYTES];
            r[..32].copy_from_slice(&b);
            let _ = RequestHeader::decode(&r);
        }
    }

    #[test]
    fn test_specific_refusals() {
        let h = RequestHeader {
            op: Op::Read,
            flags: 0,
            id: 1,
            disk: 1,
            offset: 0,
            len: MAX_PAYLOAD + 4096,
            epoch: 0,
            payload_crc: 0,
        };
        assert_eq!(
            RequestHeader::decode(&h.encode()),
            Err(WireError::TooLarge(MAX_PAYLOAD + 4096))
        );
        // A huge discard is fine: it carries no payload.
        let d = RequestHeader {
            op: Op::Discard,
            len: 1 << 40,
            ..h
        };
        assert_eq!(RequestHeader::decode(&d.encode()), Ok(d));
        assert_eq!(d.payload_len(), 0);
        let mut b = h.encode();
        b[0] = b'X';
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(WireError::BadMagic(_))
        ));
        let mut b = ResponseHeader {
            status: Status::Ok,
            id: 3,
            len: 0,
            payload_crc: 0,
        }
        .encode();
        b[5] = 77;
        reseal(&mut b);
        assert_eq!(
            ResponseHeader::decode(&b),
            Err(WireError::UnknownStatus(77))
        );
    }

    #[test]
    fn test_serialized_ops_carry_version_2() {
        let caw = RequestHeader {
            op: Op::CompareAndWrite,
            flags: FLAG_FUA,
            id: 9,
            disk: 3,
            offset: 512,
            len: 1024,
            epoch: 4,
            payload_crc: 5,
        };
        let b = caw.encode();
        assert_eq!(b[4], 2);
        assert_eq!(RequestHeader::decode(&b), Ok(caw));
        assert_eq!(caw.payload_len(), 2048);
        let partial = RequestHeader {
            op: Op::WritePartial,
            ..caw
        };
        assert_eq!(partial.encode()[4], 2);
        assert_eq!(partial.payload_len(), 1024);
        // Older operations keep version 1, so version-1 peers still understand them.
        let read = RequestHeader {
            op: Op::Read,
            ..caw
        };
        assert_eq!(read.encode()[4], 1);
        // A version-1 header cannot carry a version-2 operation.
        let mut b = caw.encode();
        b[4] = 1;
        reseal(&mut b);
        assert_eq!(
            RequestHeader::decode(&b),
            Err(WireError::NotInVersion {
                what: "operation",
                code: 6,
                version: 1
            })
        );
        // Nor is a newer version than this side's accepted, nor version 0.
        for v in [0, VERSION + 1] {
            let mut b = read.encode();
            b[4] = v;
            reseal(&mut b);
            assert_eq!(RequestHeader::decode(&b), Err(WireError::BadVersion(v)));
        }
    }

    #[test]
    fn test_serialized_op_limits() {
        let caw = RequestHeader {
            op: Op::CompareAndWrite,
            flags: 0,
            id: 1,
            disk: 1,
            offset: 0,
            len: MAX_COMPARE + 512,
            epoch: 0,
            payload_crc: 0,
        };
        assert_eq!(
            RequestHeader::decode(&caw.encode()),
            Err(WireError::TooLarge(MAX_COMPARE + 512))
        );
        let partial = RequestHeader {
            op: Op::WritePartial,
            len: MAX_PAYLOAD + 512,
            ..caw
        };
        assert_eq!(
            RequestHeader::decode(&partial.encode()),
            Err(WireError::TooLarge(MAX_PAYLOAD + 512))
        );
        // An undecoded header with an absurd length does not overflow.
        let huge = RequestHeader {
            len: u64::MAX,
            ..caw
        };
        assert_eq!(huge.payload_len(), u64::MAX);
    }

    #[test]
    fn test_miscompare_answer() {
        let h = ResponseHeader {
            status: Status::Miscompare,
            id: 12,
            len: MISCOMPARE_BYTES as u32,
            payload_crc: crc32fast::hash(&encode_miscompare(1536)),
        };
        let mut b = h.encode();
        assert_eq!(b[4], 2);
        assert_eq!(ResponseHeader::decode(&b), Ok(h));
        assert!(!Status::Miscompare.is_retryable());
        assert_eq!(decode_miscompare(&encode_miscompare(1536)), Some(1536));
        assert_eq!(decode_miscompare(&[0; 7]), None);
        assert_eq!(decode_miscompare(&[0; 9]), None);
        b[4] = 1;
        reseal(&mut b);
        assert_eq!(
            ResponseHeader::decode(&b),
            Err(WireError::NotInVersion {
                what: "status",
                code: 10,
                version: 1
            })
        );
    }
}
