//! The data-plane ciphertext: a self-describing, versioned string.
//!
//! `ekm1.<scope id>.<key version>.<data class>.<base64url(nonce ‖ SIV output)>`
//!
//! The scope, key version and class are also authenticated as associated data, so a
//! ciphertext moved to another scope or class, or altered by one bit, fails to open.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::kek::{CryptoError, Kek};

pub const FORMAT_PREFIX: &str = "ekm1";
const NONCE_BYTES: usize = 16;
const TAG_BYTES: usize = 16;
/// Longest ciphertext string accepted (a little over 1 MiB of plaintext).
const MAX_LEN: usize = 1_500_000;

/// Why a string is not a ciphertext. Safe to show: it never echoes the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CiphertextError {
    #[error("not an EKM ciphertext (expected ekm1.<scope>.<version>.<class>.<data>)")]
    Malformed,
    #[error("the ciphertext is longer than {MAX_LEN} characters")]
    TooLong,
}

/// A parsed ciphertext. Fields are as written in the string; validating the scope id and
/// class names is the caller's business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ciphertext {
    pub scope_id: String,
    pub key_version: u32,
    pub class: String,
    sealed: Vec<u8>,
}

fn headers<'a>(
    scope_id: &'a str,
    version: &'a str,
    class: &'a str,
    nonce: &'a [u8],
) -> [&'a [u8]; 5] {
    [
        b"ekm-data-v1",
        scope_id.as_bytes(),
        version.as_bytes(),
        class.as_bytes(),
        nonce,
    ]
}

impl Ciphertext {
    /// Encrypts `plaintext` for a scope, key version and class, with a fresh random nonce.
    /// One buffer: nonce, then the SIV tag, then the ciphertext written over a copy of the
    /// plaintext.
    pub fn seal(
        key: &Kek,
        scope_id: &str,
        key_version: u32,
        class: &str,
        plaintext: &[u8],
    ) -> Result<Ciphertext, CryptoError> {
        let mut sealed = vec![0u8; NONCE_BYTES + TAG_BYTES + plaintext.len()];
        let (head, body) = sealed.split_at_mut(NONCE_BYTES + TAG_BYTES);
        rand::rng().fill_bytes(&mut head[..NONCE_BYTES]);
        body.copy_from_slice(plaintext);
        let version = key_version.to_string();
        let (nonce, tag_slot) = head.split_at_mut(NONCE_BYTES);
        let tag = key.seal_in_place(&headers(scope_id, &version, class, nonce), body)?;
        tag_slot.copy_from_slice(&tag);
        Ok(Ciphertext {
            scope_id: scope_id.to_owned(),
            key_version,
            class: class.to_owned(),
            sealed,
        })
    }

    /// Decrypts with the key of the ciphertext's scope and version. The plaintext comes back
    /// in memory that wipes itself (also when authentication fails).
    pub fn open(&self, key: &Kek) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let (nonce, rest) = self.sealed.split_at(NONCE_BYTES);
        let (tag, body) = rest.split_at(TAG_BYTES);
        let version = self.key_version.to_string();
        let mut plaintext = Zeroizing::new(body.to_vec());
        key.open_in_place(
            &headers(&self.scope_id, &version, &self.class, nonce),
            &mut plaintext,
            tag,
        )?;
        Ok(plaintext)
    }

    /// Parses the string form. Never panics, whatever the input.
    pub fn parse(text: &str) -> Result<Ciphertext, CiphertextError> {
        if text.len() > MAX_LEN {
            return Err(CiphertextError::TooLong);
        }
        let mut parts = text.split('.');
        let (Some(prefix), Some(scope_id), Some(version), Some(class), Some(data), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CiphertextError::Malformed);
        };
        let plain_token = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if prefix != FORMAT_PREFIX || !plain_token(scope_id) || !plain_token(class) {
            return Err(CiphertextError::Malformed);
        }
        if version.is_empty()
            || version.len() > 10
            || !version.bytes().all(|b| b.is_ascii_digit())
            || version.starts_with('0')
        {
            return Err(CiphertextError::Malformed);
        }
        let key_version: u32 = version.parse().map_err(|_| CiphertextError::Malformed)?;
        let sealed = URL_SAFE_NO_PAD
            .decode(data.as_bytes())
            .map_err(|_| CiphertextError::Malformed)?;
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(CiphertextError::Malformed);
        }
        Ok(Ciphertext {
            scope_id: scope_id.to_owned(),
            key_version,
            class: class.to_owned(),
            sealed,
        })
    }
}

impl Ciphertext {
    /// The string form, built in one pre-sized allocation.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(
            FORMAT_PREFIX.len()
                + self.scope_id.len()
                + self.class.len()
                + 16
                + self.sealed.len() * 4 / 3
                + 4,
        );
        text.push_str(FORMAT_PREFIX);
        text.push('.');
        text.push_str(&self.scope_id);
        text.push('.');
        text.push_str(&self.key_version.to_string());
        text.push('.');
        text.push_str(&self.class);
        text.push('.');
        URL_SAFE_NO_PAD.encode_string(&self.sealed, &mut text);
        text
    }
}

impl std::fmt::Display for Ciphertext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SCOPE: &str = "0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7e";

    /// One part of a ciphertext string: a valid value (`true`) or an invalid one (`false`),
    /// valid three times in four so that whole valid strings are common.
    fn part(
        valid: impl Strategy<Value = String> + 'static,
        invalid: impl Strategy<Value = String> + 'static,
    ) -> impl Strategy<Value = (String, bool)> {
        prop_oneof![
            3 => valid.prop_map(|v| (v, true)),
            1 => invalid.prop_map(|v| (v, false)),
        ]
    }

    #[test]
    fn round_trip_through_the_string_form() {
        let key = Kek::generate();
        let sealed = Ciphertext::seal(&key, SCOPE, 3, "messages", b"hello").unwrap();
        let text = sealed.to_string();
        assert!(text.starts_with(&format!("ekm1.{SCOPE}.3.messages.")));
        let parsed = Ciphertext::parse(&text).unwrap();
        assert_eq!(parsed.open(&key).unwrap().as_slice(), b"hello");
    }

    #[test]
    fn moving_to_another_scope_version_or_class_fails() {
        let key = Kek::generate();
        let text = Ciphertext::seal(&key, SCOPE, 3, "messages", b"hello")
            .unwrap()
            .to_string();
        for forged in [
            text.replace(SCOPE, "0190c7a2-8a1e-7c3b-9d4e-2f1a3b5c6d7f"),
            text.replace(".3.", ".4."),
            text.replace(".messages.", ".files."),
        ] {
            let parsed = Ciphertext::parse(&forged).unwrap();
            assert_eq!(parsed.open(&key), Err(CryptoError));
        }
    }

    #[test]
    fn malformed_strings_are_refused() {
        for bad in [
            "",
            "ekm1",
            "ekm2.a.1.c.AAAA",
            "ekm1.a.0.c.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ekm1.a.01.c.x",
            "ekm1.a.1.c.!!",
            "ekm1.a.1.c.AAAA",
            "ekm1.a b.1.c.AAAA",
            "ekm1.a.1.c.d.e",
        ] {
            assert!(Ciphertext::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn seal_then_open_round_trips_every_length(plaintext in proptest::collection::vec(any::<u8>(), 0..300)) {
            let key = Kek::generate();
            let text = Ciphertext::seal(&key, SCOPE, 1, "files", &plaintext).unwrap().encode();
            let opened = Ciphertext::parse(&text).unwrap().open(&key).unwrap();
            prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        }

        #[test]
        fn parse_never_panics(input in ".{0,200}") {
            let _ = Ciphertext::parse(&input);
        }

        /// Strings built from parts, each valid or not: the parse succeeds exactly when every
        /// part is valid, reads the parts as written, and prints the same string back.
        #[test]
        fn parse_accepts_exactly_the_strings_whose_every_part_is_valid(
            (prefix, prefix_ok) in part(Just("ekm1".to_owned()), prop_oneof![
                Just("ekm2".to_owned()), Just("EKM1".to_owned()), Just("ekm".to_owned()), Just(String::new()),
            ]),
            (scope, scope_ok) in part("[A-Za-z0-9_-]{1,64}", prop_oneof![
                Just(String::new()), "[a-z]{65,70}", "[a-z]{0,5}[ /+é.][a-z]{0,5}",
            ]),
            (version, version_ok) in part(
                prop_oneof!["[1-9][0-9]{0,8}", Just("4294967295".to_owned())],
                prop_oneof![
                    Just("0".to_owned()), "0[0-9]{1,3}", Just(String::new()), Just("4294967296".to_owned()),
                    "[1-9][0-9]{10,12}", "-[1-9]", "[1-9][a-z]", "\\+[1-9]",
                ],
            ),
            (class, class_ok) in part("[a-z_]{1,20}", prop_oneof![Just(String::new()), "[a-z]{1,5}[ :][a-z]{1,5}"]),
            (data, data_ok) in part(
                proptest::collection::vec(any::<u8>(), 32..100).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
                prop_oneof![
                    // Shorter than a nonce and a tag.
                    proptest::collection::vec(any::<u8>(), 0..32).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
                    // Padded, or in the standard alphabet.
                    proptest::collection::vec(any::<u8>(), 32..100)
                        .prop_filter("needs padding", |b| b.len() % 3 != 0)
                        .prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
                    "[A-Za-z0-9_-]{43}[!*]",
                ],
            ),
        ) {
            let text = format!("{prefix}.{scope}.{version}.{class}.{data}");
            let all_ok = prefix_ok && scope_ok && version_ok && class_ok && data_ok;
            match Ciphertext::parse(&text) {
                Ok(parsed) => {
                    prop_assert!(all_ok, "accepted with an invalid part: {}", text);
                    prop_assert_eq!(&parsed.scope_id, &scope);
                    prop_assert_eq!(parsed.key_version.to_string(), version);
                    prop_assert_eq!(&parsed.class, &class);
                    prop_assert_eq!(parsed.encode(), text);
                }
                Err(error) => {
                    prop_assert!(!all_ok, "refused with every part valid: {} ({})", text, error);
                    prop_assert_eq!(error, CiphertextError::Malformed);
                }
            }
        }

        #[test]
        fn any_single_character_change_is_rejected(position in any::<usize>(), replacement in "[A-Za-z0-9_.-]") {
            let key = Kek::generate();
            let text = Ciphertext::seal(&key, SCOPE, 2, "files", b"secret data").unwrap().to_string();
            let index = position % text.len();
            let mut chars: Vec<char> = text.chars().collect();
            let new = replacement.chars().next().unwrap_or('A');
            prop_assume!(chars[index] != new);
            chars[index] = new;
            let forged: String = chars.into_iter().collect();
            if let Ok(parsed) = Ciphertext::parse(&forged) {
                prop_assert!(parsed.open(&key).is_err());
            }
        }
    }
}
