//! Fuzzes the ciphertext parser and opener: any input must be parsed or refused without a
//! panic, and whatever parses must be refused by a key that did not seal it.
//!
//! cargo +nightly fuzz run ciphertext_parse -- -max_total_time=60   (from fuzz/..)

#![no_main]

use ekm_keys::{Ciphertext, Kek};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = Ciphertext::parse(text) {
        // A fixed key that sealed nothing: opening must fail, never panic.
        let key = Kek::from_bytes(&[3u8; 64]).unwrap_or_else(|_| Kek::generate());
        assert!(parsed.open(&key).is_err());
        // What parses prints back to something that parses to the same.
        let again = Ciphertext::parse(&parsed.to_string());
        assert_eq!(again.ok(), Some(parsed));
    }
});
