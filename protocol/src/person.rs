//! Pseudonymous keys for people and residents.
//!
//! The 個人番号 (My Number) is never stored. A person key is a keyed hash (HMAC-SHA-256) of it
//! under a secret the federation's municipal nodes share, so the same person has the same key
//! in every municipality (what relocation needs) while nobody without the secret can test a
//! guessed number against a stored key.

use ring::hmac;

use crate::checkdigit::my_number_is_valid;
use crate::municipality::MunicipalityCode;

/// A secret that keys the person-key and resident-id hashes.
pub struct PersonKeySecret(hmac::Key);

impl PersonKeySecret {
    /// Wraps 32 secret bytes.
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn tag_hex(&self, parts: &[&[u8]], n_bytes: usize) -> String {
        let mut context = hmac::Context::with_key(&self.0);
        for part in parts {
            context.update(part);
            context.update(b"\0");
        }
        let tag = context.sign();
        hex_lower(&tag.as_ref()[..n_bytes])
    }

    /// The person key for a 個人番号. The number must be valid (12 digits, check digit).
    pub fn person_key(&self, my_number: &str) -> Result<String, InvalidMyNumber> {
        if !my_number_is_valid(my_number) {
            return Err(InvalidMyNumber);
        }
        Ok(format!("pk1-{}", self.tag_hex(&[b"my-number", my_number.as_bytes()], 16)))
    }

    /// A person key for a resident imported without a 個人番号. It is stable within the
    /// municipality but cannot match the same person elsewhere.
    pub fn local_person_key(&self, municipality: MunicipalityCode, atena_number: &str) -> String {
        let parts: [&[u8]; 3] = [b"atena", municipality.as_str().as_bytes(), atena_number.as_bytes()];
        format!("pkl-{}", self.tag_hex(&parts, 16))
    }

    /// A check that a newcomer request names the person the holder has: a keyed hash of the
    /// person key and the birth date (生年月日 on the 転入届), which only municipalities
    /// can make. A mistyped 個人番号 that passes its check digit names another person; their
    /// birth date will not match.
    pub fn birth_check(&self, person_key: &str, birth_date: time::Date) -> String {
        let date = birth_date.to_string();
        let parts: [&[u8]; 3] = [b"birth", person_key.as_bytes(), date.as_bytes()];
        format!("bc1-{}", self.tag_hex(&parts, 16))
    }
}

/// The 個人番号 failed its format or check-digit test.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("個人番号 must be 12 digits with a valid check digit")]
pub struct InvalidMyNumber;

/// Bytes from hex digits (either case); `None` for an odd length or a non-hex character.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect()
}

/// Lower-case hexadecimal.
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}
