//! The audit seal key: an HMAC-SHA256 key that seals the audit chain, so that someone who
//! can write the database but does not hold this key cannot compute a valid seal
//! (docs/adr/0018-tamper-evidence-without-trusting-the-database.md).
//!
//! It is its own file (`audit.key`, 0600, created on first start like the operator token
//! and shared by every instance like `master.key`), not derived from the platform master
//! key: the master key gains versions and rotation, and a rotation must never make old
//! seals unverifiable.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::kek::CryptoError;
use crate::key_file::{self, KeyFileError};

pub const AUDIT_KEY_FILE: &str = "audit.key";

/// 256 bits: HMAC-SHA256's block-size limit is far above it, its security level matches.
pub const SEAL_KEY_BYTES: usize = 32;

/// Domain separation: a seal can never be mistaken for any other MAC made with this key.
const SEAL_LABEL: &[u8] = b"ekm-audit-seal-v1";
const ACCESS_SEAL_LABEL: &[u8] = b"ekm-access-seal-v1";

#[derive(Debug, thiserror::Error)]
pub enum SealKeyError {
    #[error("cannot read or create the audit key file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit key file {path} is not {SEAL_KEY_BYTES} hex-encoded bytes")]
    Malformed { path: String },
    #[error("the audit key file {path} must be readable by its owner only (mode 0600)")]
    Permissions { path: String },
    #[error(
        "the audit key file {path} is a symbolic link or not a regular file; give the file itself"
    )]
    Symlink { path: String },
}

/// The key that seals the audit chain. Zeroized on drop; `Debug` shows a fingerprint only.
#[derive(Clone)]
pub struct SealKey(Zeroizing<[u8; SEAL_KEY_BYTES]>);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKey({})", self.fingerprint())
    }
}

impl SealKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> SealKey {
        let mut bytes = Zeroizing::new([0u8; SEAL_KEY_BYTES]);
        rand::rng().fill_bytes(bytes.as_mut());
        SealKey(bytes)
    }

    /// A key from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SealKey, CryptoError> {
        if bytes.len() != SEAL_KEY_BYTES {
            return Err(CryptoError);
        }
        let mut key = Zeroizing::new([0u8; SEAL_KEY_BYTES]);
        key.copy_from_slice(bytes);
        Ok(SealKey(key))
    }

    /// Loads the key file, or creates it (0600) when `create` is true and it does not exist.
    /// A symbolic link or a file others may read is refused.
    pub fn load(path: &Path, create: bool) -> Result<Option<SealKey>, SealKeyError> {
        let shown = || path.display().to_string();
        let io = |source| SealKeyError::Io {
            path: shown(),
            source,
        };
        match key_file::read(path) {
            Ok(Some(bytes)) => SealKey::from_bytes(&bytes)
                .map(Some)
                .map_err(|_| SealKeyError::Malformed { path: shown() }),
            Ok(None) if create => {
                let key = SealKey::generate();
                key_file::create(path, key.0.as_ref()).map_err(io)?;
                Ok(Some(key))
            }
            Ok(None) => Ok(None),
            Err(KeyFileError::Io(source)) => Err(io(source)),
            Err(KeyFileError::NotAFile) => Err(SealKeyError::Symlink { path: shown() }),
            Err(KeyFileError::Permissions) => Err(SealKeyError::Permissions { path: shown() }),
            Err(KeyFileError::Malformed) => Err(SealKeyError::Malformed { path: shown() }),
        }
    }

    /// A public, stable name for the key, safe to log and show.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"ekm-seal-key-fingerprint-v1");
        hasher.update(self.0.as_ref());
        hex::encode(&hasher.finalize()[..16])
    }

    /// The seal of one audit entry: HMAC-SHA256 over the label, the organization, the
    /// previous seal and the entry's canonical bytes, each length-prefixed so that no two
    /// inputs share an encoding. Hex, lower case.
    pub fn seal(&self, org_id: &str, prev: &str, entry: &[u8]) -> String {
        self.seal_labeled(SEAL_LABEL, org_id, prev, entry)
    }

    /// Whether `seal` is this key's seal of the entry; compared in constant time.
    pub fn verify(&self, org_id: &str, prev: &str, entry: &[u8], seal: &str) -> bool {
        self.verify_labeled(SEAL_LABEL, org_id, prev, entry, seal)
    }

    /// The seal of one access-log record (ADR 0026): as `seal`, under a label of its own, so
    /// that no access record's seal is ever an event's.
    pub fn seal_access(&self, org_id: &str, prev: &str, entry: &[u8]) -> String {
        self.seal_labeled(ACCESS_SEAL_LABEL, org_id, prev, entry)
    }

    /// Whether `seal` is this key's seal of the access record.
    pub fn verify_access(&self, org_id: &str, prev: &str, entry: &[u8], seal: &str) -> bool {
        self.verify_labeled(ACCESS_SEAL_LABEL, org_id, prev, entry, seal)
    }

    fn labeled(&self, label: &[u8], org_id: &str, prev: &str, entry: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac();
        for part in [label, org_id.as_bytes(), prev.as_bytes(), entry] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    fn seal_labeled(&self, label: &[u8], org_id: &str, prev: &str, entry: &[u8]) -> String {
        hex::encode(
            self.labeled(label, org_id, prev, entry)
                .finalize()
                .into_bytes(),
        )
    }

    fn verify_labeled(
        &self,
        label: &[u8],
        org_id: &str,
        prev: &str,
        entry: &[u8],
        seal: &str,
    ) -> bool {
        let Ok(expected) = hex::decode(seal) else {
            return false;
        };
        self.labeled(label, org_id, prev, entry)
            .verify_slice(&expected)
            .is_ok()
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC pads a key shorter than the hash's block with zeros (RFC 2104), so a 32-byte
        // key in a zeroed 64-byte block is the same key, through the infallible constructor.
        let mut block = Zeroizing::new([0u8; 64]);
        block[..SEAL_KEY_BYTES].copy_from_slice(self.0.as_ref());
        <Hmac<Sha256> as hmac::digest::KeyInit>::new(
            hmac::digest::generic_array::GenericArray::from_slice(block.as_ref()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_verifies_only_with_its_key_org_prev_and_entry() {
        let key = SealKey::generate();
        let seal = key.seal("org", "prev", b"entry");
        assert_eq!(seal.len(), 64);
        assert!(key.verify("org", "prev", b"entry", &seal));
        assert!(!SealKey::generate().verify("org", "prev", b"entry", &seal));
        assert!(!key.verify("other", "prev", b"entry", &seal));
        assert!(!key.verify("org", "prev2", b"entry", &seal));
        assert!(!key.verify("org", "prev", b"entry!", &seal));
        // Moving bytes between fields changes the seal (length prefixes).
        assert_ne!(seal, key.seal("orgp", "rev", b"entry"));
        assert!(!key.verify("org", "prev", b"entry", "not hex"));
    }

    #[test]
    fn padded_key_block_is_the_same_hmac_key() {
        let key = SealKey::generate();
        let mut direct = <Hmac<Sha256> as Mac>::new_from_slice(key.0.as_ref()).unwrap();
        direct.update(b"x");
        let mut padded = key.mac();
        padded.update(b"x");
        assert_eq!(
            direct.finalize().into_bytes(),
            padded.finalize().into_bytes()
        );
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2_shape() {
        // The primitive itself: RFC 4231 test case 2 ("Jefe"), through the same crate.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn key_file_created_once_owner_only_and_debug_hides_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_KEY_FILE);
        assert!(SealKey::load(&path, false).unwrap().is_none());
        let created = SealKey::load(&path, true).unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SealKey::load(&path, true).unwrap().unwrap();
        assert_eq!(
            created.seal("o", "p", b"e"),
            again.seal("o", "p", b"e"),
            "reloaded, not regenerated"
        );
        let file = std::fs::read_to_string(&path).unwrap();
        let debug = format!("{created:?}");
        assert!(!debug.contains(file.trim()), "{debug}");
        assert!(debug.contains(&created.fingerprint()));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SealKey::load(&path, false),
            Err(SealKeyError::Permissions { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            SealKey::load(&link, false),
            Err(SealKeyError::Symlink { .. })
        ));
        std::fs::write(dir.path().join("bad.key"), "zz").unwrap();
        std::fs::set_permissions(
            dir.path().join("bad.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(matches!(
            SealKey::load(&dir.path().join("bad.key"), false),
            Err(SealKeyError::Malformed { .. })
        ));
    }
}
