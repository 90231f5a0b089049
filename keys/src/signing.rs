//! The audit signing key: an Ed25519 key that signs the checkpoints of audit exports, so
//! that an auditor can verify an export with the public key alone, offline, without being
//! able to seal or sign anything (docs/audit-format.md, ADR 0023).
//!
//! It is its own file (`audit-signing.key`: the 32-byte seed in hex, 0600), created on first
//! start like `audit.key` and shared by every instance. It is neither the seal key (whoever
//! verifies seals can forge them; a public key cannot) nor derived from the platform master
//! key (which rotates).

use std::fmt;
use std::path::Path;

use base64::Engine;
use rand::RngCore;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::key_file::{self, KeyFileError};

pub const AUDIT_SIGNING_KEY_FILE: &str = "audit-signing.key";

/// Ed25519 seeds and public keys are 32 bytes (RFC 8032).
pub const SIGNING_SEED_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("cannot read or create the audit signing key file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the audit signing key file {path} is not a {SIGNING_SEED_BYTES}-byte Ed25519 seed in hex"
    )]
    Malformed { path: String },
    #[error("the audit signing key file {path} must be readable by its owner only (mode 0600)")]
    Permissions { path: String },
    #[error(
        "the audit signing key file {path} is a symbolic link or not a regular file; give the file itself"
    )]
    Symlink { path: String },
}

/// The key that signs export checkpoints. `Debug` shows the public key only; the seed is
/// zeroized once the key pair is built (ring keeps the expanded private key inside).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public_key_base64())
    }
}

impl SigningKey {
    /// A key from a 32-byte seed.
    pub fn from_seed(seed: &[u8]) -> Option<SigningKey> {
        if seed.len() != SIGNING_SEED_BYTES {
            return None;
        }
        Ed25519KeyPair::from_seed_unchecked(seed)
            .ok()
            .map(|pair| SigningKey { pair })
    }

    /// A fresh key from the operating system's generator (tests and tools; a server loads
    /// or creates its file with `load`).
    pub fn generate() -> SigningKey {
        SigningKey::generate_with_seed().0
    }

    /// A fresh key with its seed (to store).
    fn generate_with_seed() -> (SigningKey, Zeroizing<[u8; SIGNING_SEED_BYTES]>) {
        let mut seed = Zeroizing::new([0u8; SIGNING_SEED_BYTES]);
        loop {
            rand::rng().fill_bytes(seed.as_mut());
            // Every 32-byte string is a valid Ed25519 seed: this returns the first time.
            if let Some(key) = SigningKey::from_seed(seed.as_ref()) {
                return (key, seed);
            }
        }
    }

    /// Loads the key file, or creates it (0600) when `create` is true and it does not exist.
    /// A symbolic link or a file others may read is refused.
    pub fn load(path: &Path, create: bool) -> Result<Option<SigningKey>, SigningKeyError> {
        let shown = || path.display().to_string();
        let io = |source| SigningKeyError::Io {
            path: shown(),
            source,
        };
        match key_file::read(path) {
            Ok(Some(seed)) => SigningKey::from_seed(&seed)
                .map(Some)
                .ok_or_else(|| SigningKeyError::Malformed { path: shown() }),
            Ok(None) if create => {
                let (key, seed) = SigningKey::generate_with_seed();
                key_file::create(path, seed.as_ref()).map_err(io)?;
                Ok(Some(key))
            }
            Ok(None) => Ok(None),
            Err(KeyFileError::Io(source)) => Err(io(source)),
            Err(KeyFileError::NotAFile) => Err(SigningKeyError::Symlink { path: shown() }),
            Err(KeyFileError::Permissions) => Err(SigningKeyError::Permissions { path: shown() }),
            Err(KeyFileError::Malformed) => Err(SigningKeyError::Malformed { path: shown() }),
        }
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; SIGNING_SEED_BYTES] {
        let mut out = [0u8; SIGNING_SEED_BYTES];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as standard base64 (what `GET /v1/audit/signing-key` answers and
    /// `ekm audit verify --public-key` reads).
    pub fn public_key_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public_key())
    }

    /// A short public name for the key: the first 16 bytes of SHA-256 of the public key, hex.
    pub fn key_id(&self) -> String {
        key_id(&self.public_key())
    }

    /// The Ed25519 signature of `message`, standard base64.
    pub fn sign(&self, message: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.pair.sign(message).as_ref())
    }
}

/// The key id of a raw public key (`SigningKey::key_id`).
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..16])
}

/// A public key from its base64 text (surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Result<[u8; SIGNING_SEED_BYTES], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| "the public key is not base64 text".to_owned())?;
    <[u8; SIGNING_SEED_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "the public key is {} bytes; an Ed25519 public key is {SIGNING_SEED_BYTES}",
            bytes.len()
        )
    })
}

/// Whether `signature` (standard base64) is `public_key`'s Ed25519 signature of `message`.
pub fn verify_signature(public_key: &[u8], message: &[u8], signature: &str) -> bool {
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(signature) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, &signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_with_its_public_key_only_and_for_its_message_only() {
        let key = SigningKey::generate();
        let signature = key.sign(b"checkpoint");
        assert!(verify_signature(
            &key.public_key(),
            b"checkpoint",
            &signature
        ));
        assert!(!verify_signature(
            &key.public_key(),
            b"checkpoinT",
            &signature
        ));
        let other = SigningKey::generate();
        assert!(!verify_signature(
            &other.public_key(),
            b"checkpoint",
            &signature
        ));
        assert!(!verify_signature(
            &key.public_key(),
            b"checkpoint",
            "not base64!"
        ));
        assert_eq!(
            parse_public_key(&format!(" {}\n", key.public_key_base64())).unwrap(),
            key.public_key()
        );
        assert!(parse_public_key("AAAA").unwrap_err().contains("3 bytes"));
    }

    #[test]
    fn rfc_8032_test_vector_1() {
        // RFC 8032 section 7.1, TEST 1: the empty message.
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap();
        let key = SigningKey::from_seed(&seed).unwrap();
        assert_eq!(
            hex::encode(key.public_key()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let signature = base64::engine::general_purpose::STANDARD
            .decode(key.sign(b""))
            .unwrap();
        assert_eq!(
            hex::encode(signature),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
    }

    #[test]
    fn key_file_created_once_owner_only_and_debug_shows_the_public_key_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_SIGNING_KEY_FILE);
        assert!(SigningKey::load(&path, false).unwrap().is_none());
        let created = SigningKey::load(&path, true).unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SigningKey::load(&path, true).unwrap().unwrap();
        assert_eq!(
            created.public_key(),
            again.public_key(),
            "reloaded, not regenerated"
        );
        let seed = std::fs::read_to_string(&path).unwrap();
        let shown = format!("{created:?}");
        assert!(shown.contains(&created.public_key_base64()));
        assert!(!shown.contains(seed.trim()), "{shown}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SigningKey::load(&path, false),
            Err(SigningKeyError::Permissions { .. })
        ));
    }
}
