//! Time and identifiers: the only places the node reads the clock or mints random ids.

use protocol::person::hex_lower;
use ring::rand::{SecureRandom, SystemRandom};
use time::{Date, OffsetDateTime, UtcOffset};

/// Japan Standard Time (UTC+9, no daylight saving).
pub const JST: UtcOffset = match UtcOffset::from_hms(9, 0, 0) {
    Ok(offset) => offset,
    Err(_) => UtcOffset::UTC,
};

/// Today's date in Japan.
pub fn japan_today() -> Date {
    OffsetDateTime::now_utc().to_offset(JST).date()
}

/// An instant as RFC 3339 text (`2026-11-20T10:00:00Z`), as records and reports carry it.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A new globally unique id: `prefix-` and 32 hex digits, the first 12 the milliseconds
/// since 1970 and the other 20 random (80 bits). Ids minted later sort later, so an index
/// keyed by them (dose events, corrections) grows at its end instead of touching a page at
/// random for every new key; 80 random bits keep two ids of the same millisecond apart.
/// They are identifiers, not secrets: sessions and tokens are made elsewhere.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    if SystemRandom::new().fill(&mut bytes[6..]).is_err() {
        // The OS random source failing is not recoverable; an id must never repeat.
        panic!("the system random source failed");
    }
    let millis = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let millis = u64::try_from(millis).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    format!("{prefix}-{}", hex_lower(&bytes))
}
