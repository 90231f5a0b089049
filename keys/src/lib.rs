//! EKM's keys: key-encryption keys that zeroize themselves, AES-SIV wrapping (RFC 5297),
//! the data-plane ciphertext format, and master-key providers.
//!
//! Architecture invariant: key bytes never leave this crate except as `Kek`, whose `Debug`
//! prints nothing and which wipes its memory on drop, or as the zeroizing copy an
//! organization key hands to a customer's KMS (`Kek::for_master_key_provider`). Nothing here
//! logs or stores anything.

mod ciphertext;
mod kek;
mod key_file;
mod provider;
mod seal;
mod signing;

pub use ciphertext::{Ciphertext, CiphertextError, FORMAT_PREFIX};
pub use kek::{CryptoError, Kek, KEK_BYTES};
pub use provider::{LocalMasterKey, MasterKeyError, MASTER_KEY_FILE};
pub use seal::{SealKey, SealKeyError, AUDIT_KEY_FILE, SEAL_KEY_BYTES};
pub use signing::{
    key_id, parse_public_key, verify_signature, SigningKey, SigningKeyError, AUDIT_SIGNING_KEY_FILE,
};
