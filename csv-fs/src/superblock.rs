//! The volume superblock: the first 4 KiB of a shared device (format version 1).
//!
//! ```text
//! offset  size  field
//!      0     8  magic            b"CSVFS\0v1"
//!      8     4  format_version   u32 LE (1)
//!     12     4  block_size       u32 LE (4096: the unit of alignment and allocation)
//!     16    16  volume_id        UUID (bytes in RFC 4122 order)
//!     32    16  cluster_id       UUID of the cluster that owns the volume
//!     48     8  device_bytes     u64 LE: size of the device when the volume was created
//!     56     8  data_offset      u64 LE: first byte extents may use (1 MiB)
//!     64     8  created_at_ms    u64 LE: ms since the Unix epoch
//!     72    64  name             UTF-8, zero-padded
//!    136  3956  reserved         zero
//!   4092     4  crc32            u32 LE, crc32 (IEEE, crc32fast) of bytes 0..4092
//! ```
//!
//! [`Superblock::decode`] is pure: it checks magic, version, checksum and every field before
//! anything trusts the device, and says which of them failed.

use uuid::Uuid;

/// Size of the superblock on the device.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"CSVFS\0v1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Block size: the unit of alignment for direct I/O and of extent allocation.
pub const BLOCK_SIZE: u32 = 4096;
/// Where extents start: the first MiB holds the superblock and room for later metadata.
pub const DATA_OFFSET: u64 = 1 << 20;
/// Longest volume name, in bytes.
pub const NAME_MAX: usize = 64;

const CRC_AT: usize = SUPERBLOCK_BYTES - 4;

/// A volume's identity and geometry as stored on its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The volume's identity; nodes find the volume by it.
    pub volume_id: Uuid,
    /// The cluster that owns the volume; other clusters never touch it.
    pub cluster_id: Uuid,
    /// Device size when the volume was created, in bytes.
    pub device_bytes: u64,
    /// First byte extents may use.
    pub data_offset: u64,
    /// Block size (alignment and allocation unit).
    pub block_size: u32,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// The volume's name.
    pub name: String,
}

/// Why a device's first block is not a usable superblock. The messages are what an operator
/// reads next to the device path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// Fewer bytes than a superblock.
    #[error("too short for a csv-fs superblock: {0} bytes, need {SUPERBLOCK_BYTES}")]
    TooShort(usize),
    /// No csv-fs magic: the device is not a csv-fs volume (or is blank).
    #[error("not a csv-fs volume (no csv-fs magic at offset 0)")]
    NotCsvFs,
    /// A format this build does not read.
    #[error(
        "csv-fs format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    /// The checksum does not match: the block is damaged.
    #[error(
        "superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the volume header is damaged"
    )]
    Corrupt {
        /// The crc32 on the device.
        stored: u32,
        /// The crc32 of the bytes read.
        computed: u32,
    },
    /// A field is out of range.
    #[error("superblock field {field} is invalid: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The volume belongs to another cluster.
    #[error(
        "the volume belongs to cluster {owner}, not to this cluster ({ours}); it is left untouched"
    )]
    ForeignCluster {
        /// The owner named on the device.
        owner: Uuid,
        /// This cluster.
        ours: Uuid,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn uuid_at(b: &[u8], at: usize) -> Uuid {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(w)
}

impl Superblock {
    /// A new volume's superblock for a device of `device_bytes`.
    pub fn new(
        volume_id: Uuid,
        cluster_id: Uuid,
        device_bytes: u64,
        name: &str,
        created_at_ms: u64,
    ) -> Result<Self, SuperblockError> {
        let sb = Self {
            volume_id,
            cluster_id,
            device_bytes,
            data_offset: DATA_OFFSET,
            block_size: BLOCK_SIZE,
            created_at_ms,
            name: name.to_string(),
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Checks every field on its own.
    pub fn validate(&self) -> Result<(), SuperblockError> {
        let invalid = |field, reason: String| Err(SuperblockError::InvalidField { field, reason });
        if self.block_size != BLOCK_SIZE {
            return invalid(
                "block_size",
                format!("{} (this build uses {BLOCK_SIZE})", self.block_size),
            );
        }
        if self.volume_id.is_nil() {
            return invalid("volume_id", "the nil UUID".into());
        }
        if self.cluster_id.is_nil() {
            return invalid("cluster_id", "the nil UUID".into());
        }
        if self.data_offset < SUPERBLOCK_BYTES as u64
            || !self.data_offset.is_multiple_of(BLOCK_SIZE as u64)
        {
            return invalid(
                "data_offset",
                format!(
                    "{} is not a block boundary after the superblock",
                    self.data_offset
                ),
            );
        }
        if self.device_bytes <= self.data_offset {
            return invalid(
                "device_bytes",
                format!(
                    "{} leaves no room after the first {} bytes",
                    self.device_bytes, self.data_offset
                ),
            );
        }
        if self.name.is_empty() || self.name.len() > NAME_MAX || self.name.contains('\0') {
            return invalid(
                "name",
                format!("{:?} must be 1 to {NAME_MAX} bytes without NUL", self.name),
            );
        }
        Ok(())
    }

    /// Encodes the superblock into its 4 KiB on-device form.
    pub fn encode(&self) -> Result<[u8; SUPERBLOCK_BYTES], SuperblockError> {
        self.validate()?;
        let mut b = [0u8; SUPERBLOCK_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..32].copy_from_slice(self.volume_id.as_bytes());
        b[32..48].copy_from_slice(self.cluster_id.as_bytes());
        b[48..56].copy_from_slice(&self.device_bytes.to_le_bytes());
        b[56..64].copy_from_slice(&self.data_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.created_at_ms.to_le_bytes());
        b[72..72 + self.name.len()].copy_from_slice(self.name.as_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes and checks the first block of a device.
    pub fn decode(bytes: &[u8]) -> Result<Self, SuperblockError> {
        if bytes.len() < SUPERBLOCK_BYTES {
            return Err(SuperblockError::TooShort(bytes.len()));
        }
        let b = &bytes[..SUPERBLOCK_BYTES];
        if b[0..8] != MAGIC {
            return Err(SuperblockError::NotCsvFs);
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        let stored = u32_at(b, CRC_AT);
        let computed = crc32fast::hash(&b[..CRC_AT]);
        if stored != computed {
            return Err(SuperblockError::Corrupt { stored, computed });
        }
        let name_bytes = &b[72..72 + NAME_MAX];
        let name_len = name_bytes.iter().position(|c| *c == 0).unwrap_or(NAME_MAX);
        let name = std::str::from_utf8(&name_bytes[..name_len])
            .map_err(|_| SuperblockError::InvalidField {
                field: "name",
                reason: "not UTF-8".into(),
            })?
            .to_string();
        let sb = Self {
            block_size: u32_at(b, 12),
            volume_id: uuid_at(b, 16),
            cluster_id: uuid_at(b, 32),
            device_bytes: u64_at(b, 48),
            data_offset: u64_at(b, 56),
            created_at_ms: u64_at(b, 64),
            name,
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Refuses a volume owned by another cluster.
    pub fn check_owner(&self, ours: Uuid) -> Result<(), SuperblockError> {
        if self.cluster_id == ours {
            Ok(())
        } else {
            Err(SuperblockError::ForeignCluster {
                owner: self.cluster_id,
                ours,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Superblock {
        Superblock::new(
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            64 << 30,
            "vol-a",
            1_700_000_000_000,
        )
        .unwrap()
    }

    #[test]
    fn test_superblock_roundtrip() {
        let sb = sample();
        let bytes = sb.encode().unwrap();
        assert_eq!(&bytes[0..8], b"CSVFS\0v1");
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
    }

    #[test]
    fn test_superblock_rejects_blank_foreign_and_short() {
        assert_eq!(
            Superblock::decode(&[0u8; SUPERBLOCK_BYTES]),
            Err(SuperblockError::NotCsvFs)
        );
        assert_eq!(
            Superblock::decode(&[0u8; 100]),
            Err(SuperblockError::TooShort(100))
        );
        let sb = sample();
        assert!(sb.check_owner(Uuid::from_u128(2)).is_ok());
        let err = sb.check_owner(Uuid::from_u128(3)).unwrap_err();
        assert!(err.to_string().contains("left untouched"), "{err}");
    }

    #[test]
    fn test_superblock_detects_corruption_and_versions() {
        let mut bytes = sample().encode().unwrap();
        bytes[40] ^= 1;
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(SuperblockError::Corrupt { .. })
        ));
        let mut bytes = sample().encode().unwrap();
        bytes[8] = 2;
        assert_eq!(
            Superblock::decode(&bytes),
            Err(SuperblockError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn test_superblock_rejects_bad_fields() {
        let bad = [
            Superblock::new(Uuid::nil(), Uuid::from_u128(2), 64 << 30, "v", 0),
            Superblock::new(Uuid::from_u128(1), Uuid::nil(), 64 << 30, "v", 0),
            Superblock::new(Uuid::from_u128(1), Uuid::from_u128(2), DATA_OFFSET, "v", 0),
            Superblock::new(Uuid::from_u128(1), Uuid::from_u128(2), 64 << 30, "", 0),
            Superblock::new(
                Uuid::from_u128(1),
                Uuid::from_u128(2),
                64 << 30,
                &"n".repeat(65),
                0,
            ),
            Superblock::new(Uuid::from_u128(1), Uuid::from_u128(2), 64 << 30, "a\0b", 0),
        ];
        for b in bad {
            assert!(
                matches!(b, Err(SuperblockError::InvalidField { .. })),
                "{b:?}"
            );
        }
    }

    proptest! {
        /// Any bytes, also behind a valid magic and version: decoding never panics, and
        /// whatever it accepts passes validation.
        #[test]
        fn test_superblock_decode_arbitrary(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..5000),
            header in any::<bool>(),
        ) {
            if header && bytes.len() >= SUPERBLOCK_BYTES {
                bytes[0..8].copy_from_slice(&MAGIC);
                bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                let crc = crc32fast::hash(&bytes[..CRC_AT]);
                bytes[CRC_AT..SUPERBLOCK_BYTES].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(sb) = Superblock::decode(&bytes) {
                prop_assert!(sb.validate().is_ok());
            }
        }

        /// A single flipped bit anywhere is detected.
        #[test]
        fn test_superblock_detects_any_bit_flip(at in 0usize..SUPERBLOCK_BYTES, bit in 0u8..8) {
            let mut bytes = sample().encode().unwrap();
            bytes[at] ^= 1 << bit;
            prop_assert!(Superblock::decode(&bytes).is_err());
        }
    }
}
