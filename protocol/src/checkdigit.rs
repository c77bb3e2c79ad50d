//! Check-digit algorithms for the numbers the federation reads from paper and barcodes.
//!
//! All functions take digit *values* (0..=9), not ASCII characters, and never panic: a check
//! digit function reduces an out-of-range value modulo 10, and a validity function answers
//! `false` for it. Callers that decode text check for digits first and report the position.
//!
//! - Damm: our own coupon numbers. Catches every single-digit substitution and every
//!   transposition of adjacent digits, with no exceptions (unlike mod-10 or mod-11 schemes).
//! - JIS X 0402: the sixth digit of a local-government code (全国地方公共団体コード).
//! - GS1 mod 10: the last digit of a GTIN on a vaccine vial.
//! - My Number (個人番号): the twelfth digit, by the rule the Ministry of Internal Affairs and
//!   Communications (総務省) publishes for individual numbers.

/// The order-10 weakly totally anti-symmetric quasigroup of Damm (2004), as printed in his
/// thesis and on Wikipedia. Row = interim digit, column = next input digit.
const DAMM_TABLE: [[u8; 10]; 10] = [
    [0, 3, 1, 7, 5, 9, 8, 6, 4, 2],
    [7, 0, 9, 2, 1, 5, 4, 8, 6, 3],
    [4, 2, 0, 6, 8, 7, 1, 3, 5, 9],
    [1, 7, 5, 0, 9, 8, 3, 4, 2, 6],
    [6, 1, 2, 3, 0, 4, 5, 9, 7, 8],
    [3, 6, 7, 4, 2, 0, 9, 5, 8, 1],
    [5, 8, 6, 9, 7, 2, 0, 1, 3, 4],
    [8, 9, 4, 5, 3, 6, 2, 0, 1, 7],
    [9, 4, 3, 8, 6, 1, 7, 2, 0, 5],
    [2, 5, 8, 1, 4, 3, 6, 7, 9, 0],
];

/// Runs the Damm quasigroup over `digits` and returns the interim digit.
fn damm_interim(digits: &[u8]) -> u8 {
    digits.iter().fold(0u8, |interim, &digit| {
        // Both indices are below 10 by construction, so indexing cannot fail.
        DAMM_TABLE[usize::from(interim % 10)][usize::from(digit % 10)]
    })
}

/// The Damm check digit to append to `digits` (values 0..=9).
pub fn damm_check_digit(digits: &[u8]) -> u8 {
    // The table has a zero diagonal, so the digit that brings the interim to 0 is the
    // interim itself.
    damm_interim(digits)
}

/// Whether `digits` (values 0..=9, check digit last) carry a correct Damm check digit.
///
/// An empty slice is not valid: there is no check digit to check.
pub fn damm_is_valid(digits: &[u8]) -> bool {
    !digits.is_empty() && all_digits(digits) && damm_interim(digits) == 0
}

/// The JIS X 0402 check digit (sixth digit) of a local-government code.
///
/// Rule, confirmed against all 1,741 municipality codes and 47 prefecture codes in
/// `protocol/data`: multiply the five digits by the weights 6, 5, 4, 3, 2 and add; let
/// r = sum mod 11; the check digit is 11 − r, except that 10 is written 0 and 11 (r = 0) is
/// written 1. In one expression: (11 − r) mod 10. For example Chiyoda 13101: 6+15+4+0+2 = 27,
/// r = 5, check 6, code 131016.
pub fn jis_x0402_check_digit(first5: &[u8; 5]) -> u8 {
    const WEIGHTS: [u32; 5] = [6, 5, 4, 3, 2];
    let sum: u32 = first5.iter().zip(WEIGHTS).map(|(&digit, weight)| u32::from(digit % 10) * weight).sum();
    let remainder = sum % 11;
    // `remainder` is at most 10, so the subtraction cannot underflow and the result fits u8.
    ((11 - remainder) % 10) as u8
}

/// The GS1 mod-10 check digit for `digits` (values 0..=9), which are all the digits of the
/// key except the check digit: weights 3, 1, 3, 1, … from the right.
pub fn gs1_check_digit(digits: &[u8]) -> u8 {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(index, &digit)| {
            let weight = if index % 2 == 0 { 3 } else { 1 };
            u32::from(digit % 10) * weight
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// Whether `digits` (values 0..=9, check digit last) carry a correct GS1 check digit.
///
/// Fewer than two digits is not valid: there is nothing for the check digit to check.
pub fn gs1_is_valid(digits: &[u8]) -> bool {
    match digits.split_last() {
        Some((&check, body)) if !body.is_empty() && all_digits(digits) => gs1_check_digit(body) == check,
        _ => false,
    }
}

/// The My Number (個人番号) check digit for the first 11 digits (values 0..=9).
///
/// With Pn the n-th of the 11 digits counted from the right (n = 1..=11) and Qn = n + 1 for
/// n ≤ 6, n − 5 for n ≥ 7: r = Σ Pn × Qn mod 11; the check digit is 0 when r ≤ 1, else 11 − r.
pub fn my_number_check_digit(first11: &[u8; 11]) -> u8 {
    let sum: u32 = first11
        .iter()
        .rev()
        .zip(1u32..)
        .map(|(&digit, n)| {
            let weight = if n <= 6 { n + 1 } else { n - 5 };
            u32::from(digit % 10) * weight
        })
        .sum();
    let remainder = sum % 11;
    if remainder <= 1 { 0 } else { (11 - remainder) as u8 }
}

/// Whether `s` is exactly 12 ASCII digits whose last digit is the My Number check digit.
///
/// No trimming, no full-width digits: callers normalise input before calling this.
pub fn my_number_is_valid(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.len() != 12 || !bytes.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut first11 = [0u8; 11];
    for (value, &byte) in first11.iter_mut().zip(bytes) {
        *value = byte - b'0';
    }
    my_number_check_digit(&first11) == bytes[11] - b'0'
}

/// Whether every value is a digit value (0..=9).
fn all_digits(digits: &[u8]) -> bool {
    digits.iter().all(|&digit| digit <= 9)
}
