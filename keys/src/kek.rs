//! Key-encryption keys and AES-SIV.

use std::fmt;

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// AES-256-SIV takes a 512-bit key (two 256-bit halves: MAC and CTR).
pub const KEK_BYTES: usize = 64;

/// Encryption or authentication failed. Deliberately says nothing more: a wrong key, a
/// wrong context and a tampered input look the same to an attacker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the data could not be authenticated with this key and context")]
pub struct CryptoError;

/// A key-encryption key. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct Kek(Zeroizing<[u8; KEK_BYTES]>);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({})", self.fingerprint())
    }
}

impl Kek {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Kek {
        let mut bytes = Zeroizing::new([0u8; KEK_BYTES]);
        rand::rng().fill_bytes(bytes.as_mut());
        Kek(bytes)
    }

    /// A key from exactly 64 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Kek, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEK_BYTES]);
        if bytes.len() != KEK_BYTES {
            return Err(CryptoError);
        }
        key.copy_from_slice(bytes);
        Ok(Kek(key))
    }

    /// A public, stable name for the key: the first 128 bits of SHA-256 over a label and
    /// the key. Safe to store in events and show to people.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"ekm-kek-fingerprint-v1");
        hasher.update(self.0.as_ref());
        hex::encode(&hasher.finalize()[..16])
    }

    /// Runs `f` on the raw bytes (for the master key file; nothing else needs them).
    pub(crate) fn with_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self.0.as_ref())
    }

    /// A copy of the raw bytes for a master-key provider to encrypt (a customer's KMS wraps
    /// organization keys; nothing else may call this). Wiped when dropped.
    pub fn for_master_key_provider(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.0.to_vec())
    }

    fn cipher(&self) -> Result<Aes256Siv, CryptoError> {
        Aes256Siv::new_from_slice(self.0.as_ref()).map_err(|_| CryptoError)
    }

    /// AES-SIV with the given associated-data components (each one is authenticated
    /// separately, as RFC 5297's vector of headers).
    pub fn seal(&self, headers: &[&[u8]], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.cipher()?
            .encrypt(headers, plaintext)
            .map_err(|_| CryptoError)
    }

    /// The inverse of `seal`; fails unless the key, every header and the input are exactly
    /// those that sealed it. The plaintext comes back in memory that wipes itself.
    pub fn open(
        &self,
        headers: &[&[u8]],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.cipher()?
            .decrypt(headers, sealed)
            .map(Zeroizing::new)
            .map_err(|_| CryptoError)
    }

    /// Like `seal`, in place: `buffer` holds the plaintext and receives the ciphertext; the
    /// 16-byte SIV tag is returned. Saves the data plane an allocation and a copy.
    pub fn seal_in_place(
        &self,
        headers: &[&[u8]],
        buffer: &mut [u8],
    ) -> Result<[u8; 16], CryptoError> {
        let tag = self
            .cipher()?
            .encrypt_inout_detached(headers, aes_siv::aead::inout::InOutBuf::from(buffer))
            .map_err(|_| CryptoError)?;
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_slice());
        Ok(out)
    }

    /// The inverse of `seal_in_place`. On failure the buffer holds garbage: callers wipe it.
    pub fn open_in_place(
        &self,
        headers: &[&[u8]],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> Result<(), CryptoError> {
        let tag = aes_siv::Tag::try_from(tag).map_err(|_| CryptoError)?;
        self.cipher()?
            .decrypt_inout_detached(headers, aes_siv::aead::inout::InOutBuf::from(buffer), &tag)
            .map_err(|_| CryptoError)
    }

    /// Wraps `child` under this key, bound to where the child sits in the hierarchy.
    pub fn wrap(&self, child: &Kek, context: &[&[u8]]) -> Result<Vec<u8>, CryptoError> {
        let mut headers: Vec<&[u8]> = vec![b"ekm-kek-wrap-v1"];
        headers.extend_from_slice(context);
        self.seal(&headers, child.0.as_ref())
    }

    pub fn unwrap_key(&self, wrapped: &[u8], context: &[&[u8]]) -> Result<Kek, CryptoError> {
        let mut headers: Vec<&[u8]> = vec![b"ekm-kek-wrap-v1"];
        headers.extend_from_slice(context);
        let bytes = self.open(&headers, wrapped)?;
        Kek::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 5297, Appendix A.1 and A.2, through the same crate and call this module uses
    /// (AES-128 there; our keys are AES-256, the construction is the same).
    #[test]
    fn rfc_5297_known_answers() {
        use aes_siv::siv::Aes128Siv;
        let key = hex::decode("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
            .unwrap();
        let ad = hex::decode("101112131415161718191a1b1c1d1e1f2021222324252627").unwrap();
        let plaintext = hex::decode("112233445566778899aabbccddee").unwrap();
        let sealed = Aes128Siv::new_from_slice(&key)
            .unwrap()
            .encrypt([&ad], &plaintext)
            .unwrap();
        assert_eq!(
            hex::encode(sealed),
            "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c"
        );

        let key = hex::decode("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
            .unwrap();
        let ad1 = hex::decode(
            "00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100",
        )
        .unwrap();
        let ad2 = hex::decode("102030405060708090a0").unwrap();
        let nonce = hex::decode("09f911029d74e35bd84156c5635688c0").unwrap();
        let plaintext = hex::decode("7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553").unwrap();
        let headers: [&[u8]; 3] = [&ad1, &ad2, &nonce];
        let sealed = Aes128Siv::new_from_slice(&key)
            .unwrap()
            .encrypt(headers, &plaintext)
            .unwrap();
        assert_eq!(
            hex::encode(&sealed),
            "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d"
        );
        let opened = Aes128Siv::new_from_slice(&key)
            .unwrap()
            .decrypt(headers, &sealed)
            .unwrap();
        assert_eq!(opened, plaintext);
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = Kek::from_bytes(&[0xab; KEK_BYTES]).unwrap();
        let printed = format!("{key:?}");
        assert!(
            !printed.contains("abab") && !printed.contains("171"),
            "{printed}"
        );
        assert!(printed.starts_with("Kek("));
    }

    #[test]
    fn wrapped_key_opens_only_in_its_context() {
        let parent = Kek::generate();
        let child = Kek::generate();
        let wrapped = parent.wrap(&child, &[b"team", b"1"]).unwrap();
        let back = parent.unwrap_key(&wrapped, &[b"team", b"1"]).unwrap();
        assert_eq!(back.fingerprint(), child.fingerprint());
        assert!(parent.unwrap_key(&wrapped, &[b"team", b"2"]).is_err());
        assert!(Kek::generate()
            .unwrap_key(&wrapped, &[b"team", b"1"])
            .is_err());
    }

    proptest! {
        #[test]
        fn open_inverts_seal_and_any_bit_flip_is_refused(
            plaintext in proptest::collection::vec(any::<u8>(), 0..300),
            flip in any::<usize>(),
        ) {
            let key = Kek::generate();
            let sealed = key.seal(&[b"ctx"], &plaintext).unwrap();
            let opened = key.open(&[b"ctx"], &sealed).unwrap();
            prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
            let mut tampered = sealed.clone();
            let bit = flip % (tampered.len() * 8);
            tampered[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(key.open(&[b"ctx"], &tampered).is_err());
        }
    }
}
