//! The GS1 barcode on a vaccine vial or carton, as a scanner types it: GTIN (01), expiry (17)
//! and lot (10), plus any other element strings we can delimit.
//!
//! Two forms are accepted (see `docs/coupon-qr.md`, "Vial barcodes"):
//!
//! - the bracketed human-readable form, `(01)04987123456782(17)271231(10)AB1234`, with
//!   optional whitespace between elements;
//! - the raw form a GS1 DataMatrix, GS1-128, GS1 QR or GS1 DataBar scanner transmits: an
//!   optional symbology identifier (`]d2`, `]C1`, `]Q3`, `]e0`), then element strings back to
//!   back. An element whose AI has a predefined length (01, 17, 11, …) needs no separator;
//!   any other ends at a GS character (U+001D) or at the end of the text.
//!
//! Positions in errors are 1-based characters, counted from the first character after
//! leading whitespace (the symbology identifier, if any, counts).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::{Date, Month};

use crate::checkdigit::gs1_check_digit;

/// The longest text [`parse_vial_barcode`] looks at, in bytes. A GS1 DataMatrix holds at most
/// 3,116 digits, so a real scan is always shorter.
pub const MAX_VIAL_TEXT_BYTES: usize = 4096;

/// The group separator that ends a variable-length element in the raw form (FNC1).
const GROUP_SEPARATOR: char = '\u{1d}';

/// The symbology identifiers of the GS1 symbologies a vial may carry.
const SYMBOLOGY_IDENTIFIERS: [&str; 4] = ["]d2", "]C1", "]Q3", "]e0"];

/// A GTIN-14 (Global Trade Item Number) with a valid check digit. Serialized as the
/// 14-digit string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gtin([u8; 14]);

/// Why a text is not a GTIN-14.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GtinError {
    /// Not 14 characters (after trimming surrounding whitespace).
    #[error("a GTIN has 14 digits, found {found} characters")]
    Length {
        /// Number of characters found.
        found: usize,
    },
    /// A character is not an ASCII digit.
    #[error("character {position} of the GTIN is not a digit")]
    NonDigit {
        /// 1-based position within the (trimmed) GTIN.
        position: usize,
    },
    /// The 14th digit is not the GS1 check digit of the first 13.
    #[error("the GTIN's check digit (digit 14) is {found}, expected {expected}")]
    CheckDigit {
        /// The check digit the first 13 digits call for.
        expected: u8,
        /// The 14th digit as given.
        found: u8,
    },
}

impl GtinError {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        match self {
            Self::Length { found } => format!("GTINは14桁です（{found}文字あります）"),
            Self::NonDigit { position } => format!("GTINの{position}文字目が数字ではありません"),
            Self::CheckDigit { expected, found } => {
                format!("GTINのチェックディジットが一致しません（14桁目: {found}、正しくは{expected}）")
            }
        }
    }
}

impl Gtin {
    /// Parses 14 ASCII digits (surrounding whitespace ignored) with a valid check digit.
    pub fn parse(s: &str) -> Result<Self, GtinError> {
        let trimmed = s.trim();
        let found = trimmed.chars().count();
        if found != 14 {
            return Err(GtinError::Length { found });
        }
        let mut digits = [0u8; 14];
        for (index, (slot, character)) in digits.iter_mut().zip(trimmed.chars()).enumerate() {
            if !character.is_ascii_digit() {
                return Err(GtinError::NonDigit { position: index + 1 });
            }
            *slot = character as u8;
        }
        let values = digits.map(|byte| byte - b'0');
        let expected = gs1_check_digit(&values[..13]);
        if values[13] != expected {
            return Err(GtinError::CheckDigit { expected, found: values[13] });
        }
        Ok(Self(digits))
    }

    /// The 14 digits.
    pub fn as_str(&self) -> &str {
        // Always ASCII digits by construction; the fallback is never taken.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Gtin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for Gtin {
    type Err = GtinError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Gtin {
    type Error = GtinError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Gtin> for String {
    fn from(gtin: Gtin) -> Self {
        gtin.as_str().to_owned()
    }
}

/// What a vial's GS1 barcode says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VialBarcode {
    /// AI (01): the product.
    pub gtin: Gtin,
    /// AI (17): the expiry date (a day of 00 in the barcode is the month's last day).
    pub expiry: Date,
    /// AI (10): the lot (batch) number, 1–20 characters of GS1 character set 82.
    pub lot: String,
    /// Every other element string, as (AI, data), in the order scanned.
    pub other: Vec<(String, String)>,
}

/// Why a scanned text is not a usable vial barcode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Gs1Error {
    /// Nothing but whitespace was scanned.
    #[error("the vial barcode is empty")]
    Empty,
    /// The text is longer than any GS1 symbol can hold.
    #[error("the vial barcode text is {length} bytes, more than the {max} a GS1 symbol can hold")]
    TooLong {
        /// Its length in bytes.
        length: usize,
        /// [`MAX_VIAL_TEXT_BYTES`].
        max: usize,
    },
    /// A symbology identifier that is not a GS1 symbology (e.g. `]d1`, plain DataMatrix).
    #[error("symbology identifier {identifier:?} is not a GS1 barcode (expected ]d2, ]C1, ]Q3 or ]e0)")]
    UnsupportedSymbology {
        /// The identifier as scanned.
        identifier: String,
    },
    /// Where an application identifier should start, the characters are not one we know, so
    /// we cannot tell where its data ends.
    #[error("position {position}: {ai:?} is not a GS1 application identifier we can delimit")]
    UnknownAi {
        /// Up to four characters found there.
        ai: String,
        /// 1-based position of its first character.
        position: usize,
    },
    /// In the bracketed form, a `(` is not followed by 2–4 digits and `)`, or text appears
    /// outside an element.
    #[error("position {position}: expected an application identifier like (01)")]
    MalformedBracket {
        /// 1-based position of the offending character.
        position: usize,
    },
    /// An element's data has the wrong length (cut short, too long, or empty).
    #[error("AI ({ai}) at position {position}: its data must be {min} to {max} characters, found {found}")]
    FieldLength {
        /// The application identifier.
        ai: String,
        /// 1-based position of the element's first data character.
        position: usize,
        /// Fewest characters allowed.
        min: usize,
        /// Most characters allowed.
        max: usize,
        /// Characters found.
        found: usize,
    },
    /// A numeric element contains something other than a digit.
    #[error("AI ({ai}): character {character:?} at position {position} is not a digit")]
    NonDigit {
        /// The application identifier.
        ai: String,
        /// 1-based position of the character.
        position: usize,
        /// The character.
        character: char,
    },
    /// An alphanumeric element contains a character outside GS1 character set 82.
    #[error("AI ({ai}): character {character:?} at position {position} is not allowed in a GS1 barcode")]
    BadCharacter {
        /// The application identifier.
        ai: String,
        /// 1-based position of the character.
        position: usize,
        /// The character.
        character: char,
    },
    /// The same application identifier appears twice.
    #[error("AI ({ai}) appears twice, at positions {first_position} and {position}")]
    DuplicateAi {
        /// The application identifier.
        ai: String,
        /// 1-based position of its first appearance.
        first_position: usize,
        /// 1-based position of the second.
        position: usize,
    },
    /// The GTIN's check digit is wrong.
    #[error("AI (01): the GTIN's check digit at position {position} is {found}, expected {expected}")]
    GtinCheckDigit {
        /// 1-based position of the check digit.
        position: usize,
        /// The check digit the first 13 digits call for.
        expected: u8,
        /// The digit scanned.
        found: u8,
    },
    /// The expiry is not a date (YYMMDD; month 01–12; day 00 or a day of that month).
    #[error("AI ({ai}) at position {position}: {value:?} is not a date (YYMMDD)")]
    BadDate {
        /// The application identifier.
        ai: String,
        /// 1-based position of the date's first digit.
        position: usize,
        /// The six digits scanned.
        value: String,
    },
    /// A required element is absent.
    #[error("the barcode has no ({ai}) {what}")]
    Missing {
        /// The application identifier: "01", "17" or "10".
        ai: &'static str,
        /// What it carries, in English.
        what: &'static str,
    },
}

impl Gs1Error {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        match self {
            Self::Empty => "ワクチンのバーコードが空です".to_owned(),
            Self::TooLong { length, .. } => {
                format!("バーコードの内容が長すぎます（{length}バイト）")
            }
            Self::UnsupportedSymbology { identifier } => {
                format!("GS1 のバーコードではありません（シンボル識別子 {identifier}）")
            }
            Self::UnknownAi { ai, position } => {
                format!("{position}文字目: 「{ai}」は読み取れるアプリケーション識別子（AI）ではありません")
            }
            Self::MalformedBracket { position } => {
                format!("{position}文字目: (01) のようなアプリケーション識別子が必要です")
            }
            Self::FieldLength { ai, position, min, max, found } => {
                let length = if min == max { format!("{min}文字") } else { format!("{min}〜{max}文字") };
                format!(
                    "{}（{position}文字目から）は{length}のはずですが、{found}文字です",
                    element_name_ja(ai)
                )
            }
            Self::NonDigit { ai, position, .. } => {
                format!("{}の{position}文字目が数字ではありません", element_name_ja(ai))
            }
            Self::BadCharacter { ai, position, character } => format!(
                "{}の{position}文字目「{character}」はバーコードに使えない文字です",
                element_name_ja(ai)
            ),
            Self::DuplicateAi { ai, first_position, position } => {
                format!("{}が2回あります（{first_position}文字目と{position}文字目）", element_name_ja(ai))
            }
            Self::GtinCheckDigit { position, .. } => {
                format!("GTINのチェックディジットが一致しません（{position}文字目）")
            }
            Self::BadDate { ai, position, value } => format!(
                "{}（{position}文字目から）の「{value}」は日付（YYMMDD）ではありません",
                element_name_ja(ai)
            ),
            Self::Missing { ai, .. } => format!("{}がありません", element_name_ja(ai)),
        }
    }
}

/// The Japanese name of an element for messages, e.g. "ロット番号(10)".
fn element_name_ja(ai: &str) -> String {
    let name = match ai {
        "01" => "GTIN",
        "17" => "有効期限",
        "10" => "ロット番号",
        "21" => "シリアル番号",
        _ => "データ",
    };
    format!("{name}({ai})")
}

/// Which characters an element's data may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Charset {
    /// Digits only.
    Numeric,
    /// GS1 AI encodable character set 82.
    Cset82,
}

/// The data format of one application identifier.
#[derive(Clone, Copy, Debug)]
struct AiFormat {
    charset: Charset,
    min: usize,
    max: usize,
}

/// The data format of the application identifiers we can delimit, from the GS1 General
/// Specifications' AI table. Covers the AIs seen on pharmaceutical packaging and logistics
/// labels; others are refused in the raw form because their length is unknown.
fn ai_format(ai: &str) -> Option<AiFormat> {
    use Charset::{Cset82 as X, Numeric as N};
    let (charset, min, max) = match ai {
        "00" => (N, 18, 18),
        "01" | "02" => (N, 14, 14),
        "10" | "21" | "22" => (X, 1, 20),
        "11" | "12" | "13" | "15" | "16" | "17" => (N, 6, 6),
        "20" => (N, 2, 2),
        "30" | "37" => (N, 1, 8),
        "90" => (X, 1, 30),
        "91" | "92" | "93" | "94" | "95" | "96" | "97" | "98" | "99" => (X, 1, 90),
        "235" => (X, 1, 28),
        "240" | "241" | "250" | "251" | "400" | "401" | "403" => (X, 1, 30),
        "242" => (N, 1, 6),
        "243" | "254" | "420" => (X, 1, 20),
        "253" => (X, 14, 30),
        "255" => (N, 14, 25),
        "402" => (N, 17, 17),
        "410" | "411" | "412" | "413" | "414" | "415" | "416" | "417" => (N, 13, 13),
        "421" => (X, 4, 12),
        "422" | "424" | "426" => (N, 3, 3),
        "423" | "425" => (N, 4, 15),
        "427" => (X, 1, 3),
        "710" | "711" | "712" | "713" | "714" | "715" | "716" | "717" => (X, 1, 20),
        "7001" => (N, 13, 13),
        "7002" | "7023" => (X, 1, 30),
        "7003" => (N, 10, 10),
        "7004" => (N, 1, 4),
        "7005" => (X, 1, 12),
        "7006" => (N, 6, 6),
        "7007" => (N, 6, 12),
        "7020" | "7021" | "7022" | "7240" | "8002" | "8012" => (X, 1, 20),
        "8001" => (N, 14, 14),
        "8003" => (X, 15, 30),
        "8004" | "8010" => (X, 1, 30),
        "8005" => (N, 6, 6),
        "8006" | "8017" | "8018" | "8026" => (N, 18, 18),
        "8007" => (X, 1, 34),
        "8008" => (N, 8, 12),
        "8009" => (X, 1, 50),
        "8011" => (N, 1, 12),
        "8013" | "8020" => (X, 1, 25),
        "8019" => (N, 1, 10),
        "8110" | "8112" | "8200" => (X, 1, 70),
        "8111" => (N, 4, 4),
        _ => return four_digit_ai_format(ai),
    };
    Some(AiFormat { charset, min, max })
}

/// The families of four-digit AIs whose last digit (or last two) is a parameter: measures
/// (31nn–36nn), amounts (390n–395n) and country-of-processing (703n).
fn four_digit_ai_format(ai: &str) -> Option<AiFormat> {
    use Charset::{Cset82 as X, Numeric as N};
    let bytes = ai.as_bytes();
    if bytes.len() != 4 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let (charset, min, max) = match &ai[..3] {
        _ if matches!(&ai[..2], "31" | "32" | "33" | "34" | "35" | "36") => (N, 6, 6),
        "390" | "392" => (N, 1, 15),
        "391" | "393" => (N, 4, 18),
        "394" => (N, 4, 4),
        "395" => (N, 6, 6),
        "703" => (X, 4, 30),
        _ => return None,
    };
    Some(AiFormat { charset, min, max })
}

/// Whether an AI's first two digits are in the GS1 table of predefined lengths, so that the
/// element needs no separator after it in the raw form.
fn has_predefined_length(ai: &str) -> bool {
    matches!(
        ai.get(..2),
        Some(
            "00" | "01"
                | "02"
                | "11"
                | "12"
                | "13"
                | "15"
                | "16"
                | "17"
                | "20"
                | "31"
                | "32"
                | "33"
                | "34"
                | "35"
                | "36"
                | "41"
        )
    )
}

/// Whether a character is in GS1 AI encodable character set 82.
fn is_cset82(character: char) -> bool {
    character.is_ascii_alphanumeric()
        || matches!(
            character,
            '!' | '"'
                | '%'
                | '&'
                | '\''
                | '('
                | ')'
                | '*'
                | '+'
                | ','
                | '-'
                | '.'
                | '/'
                | ':'
                | ';'
                | '<'
                | '='
                | '>'
                | '?'
                | '_'
        )
}

/// One element string as delimited, before its data is interpreted.
struct Element {
    ai: String,
    ai_position: usize,
    data: String,
    data_position: usize,
}

/// Decodes a vial barcode as scanned: bracketed or raw form, see the module documentation.
/// Requires (01) with a valid GTIN check digit, (17) and (10); keeps other elements.
pub fn parse_vial_barcode(text: &str) -> Result<VialBarcode, Gs1Error> {
    if text.len() > MAX_VIAL_TEXT_BYTES {
        return Err(Gs1Error::TooLong { length: text.len(), max: MAX_VIAL_TEXT_BYTES });
    }
    let chars: Vec<char> = text.trim().chars().collect();
    if chars.is_empty() {
        return Err(Gs1Error::Empty);
    }
    let mut start = 0;
    if chars[0] == ']' {
        let identifier: String = chars.iter().take(3).collect();
        if !SYMBOLOGY_IDENTIFIERS.contains(&identifier.as_str()) {
            return Err(Gs1Error::UnsupportedSymbology { identifier });
        }
        start = 3;
    }
    let elements = if chars.get(start) == Some(&'(') {
        split_bracketed(&chars, start)?
    } else {
        split_raw(&chars, start)?
    };
    interpret(elements)
}

/// Splits the bracketed form into elements and checks each element's format.
fn split_bracketed(chars: &[char], start: usize) -> Result<Vec<Element>, Gs1Error> {
    let mut elements = Vec::new();
    let mut index = start;
    while index < chars.len() {
        let character = chars[index];
        if character.is_whitespace() || character == GROUP_SEPARATOR {
            index += 1;
            continue;
        }
        let Some(ai_len) = bracketed_ai_len(chars, index) else {
            return Err(Gs1Error::MalformedBracket { position: index + 1 });
        };
        let ai: String = chars[index + 1..index + 1 + ai_len].iter().collect();
        let ai_position = index + 2;
        let data_start = index + ai_len + 2;
        let mut data_end = data_start;
        while data_end < chars.len() {
            let next = chars[data_end];
            if next.is_whitespace() || next == GROUP_SEPARATOR || bracketed_ai_len(chars, data_end).is_some()
            {
                break;
            }
            data_end += 1;
        }
        let format = match ai_format(&ai) {
            Some(format) => format,
            // A known prefix with the wrong number of digits, e.g. (011), is a typo.
            None if (2..=4).any(|len| len < ai.len() && ai_format(&ai[..len]).is_some()) => {
                return Err(Gs1Error::UnknownAi { ai, position: ai_position });
            }
            // Unknown, but the brackets delimit it: keep it as set-82 text.
            None => AiFormat { charset: Charset::Cset82, min: 1, max: 90 },
        };
        let data: String = chars[data_start..data_end].iter().collect();
        let element = Element { ai, ai_position, data, data_position: data_start + 1 };
        check_element(&element, format)?;
        elements.push(element);
        index = data_end;
    }
    Ok(elements)
}

/// If `(` + 2–4 digits + `)` starts at `index`, the number of digits.
fn bracketed_ai_len(chars: &[char], index: usize) -> Option<usize> {
    if chars.get(index) != Some(&'(') {
        return None;
    }
    let digits = chars[index + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
    let closes = chars.get(index + 1 + digits) == Some(&')');
    (closes && (2..=4).contains(&digits)).then_some(digits)
}

/// Splits the raw form into elements and checks each element's format.
fn split_raw(chars: &[char], start: usize) -> Result<Vec<Element>, Gs1Error> {
    let mut elements = Vec::new();
    let mut index = start;
    while index < chars.len() {
        if chars[index] == GROUP_SEPARATOR {
            // FNC1 in first position, or a separator after a fixed-length element: harmless.
            index += 1;
            continue;
        }
        let (ai, format) = raw_ai(chars, index)?;
        let ai_position = index + 1;
        let data_start = index + ai.len();
        let until_separator = chars[data_start..]
            .iter()
            .position(|&c| c == GROUP_SEPARATOR)
            .unwrap_or(chars.len() - data_start);
        let data_len =
            if has_predefined_length(&ai) { until_separator.min(format.max) } else { until_separator };
        let data_end = data_start + data_len;
        let data: String = chars[data_start..data_end].iter().collect();
        let element = Element { ai, ai_position, data, data_position: data_start + 1 };
        check_element(&element, format)?;
        elements.push(element);
        index = data_end;
    }
    Ok(elements)
}

/// The application identifier starting at `index` in the raw form, and its format.
fn raw_ai(chars: &[char], index: usize) -> Result<(String, AiFormat), Gs1Error> {
    let candidate: String = chars[index..].iter().take(4).collect();
    for len in 2..=4 {
        let Some(prefix) = candidate.get(..len) else {
            break;
        };
        if let Some(format) = ai_format(prefix) {
            return Ok((prefix.to_owned(), format));
        }
    }
    Err(Gs1Error::UnknownAi { ai: candidate, position: index + 1 })
}

/// Checks an element's data against its AI's length and character set.
fn check_element(element: &Element, format: AiFormat) -> Result<(), Gs1Error> {
    let found = element.data.chars().count();
    if found < format.min || found > format.max {
        return Err(Gs1Error::FieldLength {
            ai: element.ai.clone(),
            position: element.data_position,
            min: format.min,
            max: format.max,
            found,
        });
    }
    for (offset, character) in element.data.chars().enumerate() {
        let position = element.data_position + offset;
        let ai = || element.ai.clone();
        match format.charset {
            Charset::Numeric if !character.is_ascii_digit() => {
                return Err(Gs1Error::NonDigit { ai: ai(), position, character });
            }
            Charset::Cset82 if !is_cset82(character) => {
                return Err(Gs1Error::BadCharacter { ai: ai(), position, character });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Interprets (01), (17) and (10), refuses duplicates and keeps the rest.
fn interpret(elements: Vec<Element>) -> Result<VialBarcode, Gs1Error> {
    let mut gtin = None;
    let mut expiry = None;
    let mut lot = None;
    let mut other = Vec::new();
    let mut seen: Vec<(String, usize)> = Vec::new();
    for element in elements {
        if let Some((_, first_position)) = seen.iter().find(|(ai, _)| *ai == element.ai) {
            return Err(Gs1Error::DuplicateAi {
                ai: element.ai,
                first_position: *first_position,
                position: element.ai_position,
            });
        }
        seen.push((element.ai.clone(), element.ai_position));
        match element.ai.as_str() {
            "01" => gtin = Some(interpret_gtin(&element)?),
            "17" => expiry = Some(interpret_expiry(&element)?),
            "10" => lot = Some(element.data),
            _ => other.push((element.ai, element.data)),
        }
    }
    Ok(VialBarcode {
        gtin: gtin.ok_or(Gs1Error::Missing { ai: "01", what: "GTIN" })?,
        expiry: expiry.ok_or(Gs1Error::Missing { ai: "17", what: "expiry date" })?,
        lot: lot.ok_or(Gs1Error::Missing { ai: "10", what: "lot number" })?,
        other,
    })
}

/// The GTIN of an (01) element whose data is already known to be 14 digits.
fn interpret_gtin(element: &Element) -> Result<Gtin, Gs1Error> {
    Gtin::parse(&element.data).map_err(|error| match error {
        GtinError::CheckDigit { expected, found } => {
            Gs1Error::GtinCheckDigit { position: element.data_position + 13, expected, found }
        }
        GtinError::Length { found } => Gs1Error::FieldLength {
            ai: element.ai.clone(),
            position: element.data_position,
            min: 14,
            max: 14,
            found,
        },
        GtinError::NonDigit { position } => Gs1Error::NonDigit {
            ai: element.ai.clone(),
            position: element.data_position + position - 1,
            character: element.data.chars().nth(position - 1).unwrap_or('?'),
        },
    })
}

/// The date of a YYMMDD element whose data is already known to be six digits. Years are
/// 2000–2099; a day of 00 means the last day of the month (GS1 General Specifications).
fn interpret_expiry(element: &Element) -> Result<Date, Gs1Error> {
    let bad_date = || Gs1Error::BadDate {
        ai: element.ai.clone(),
        position: element.data_position,
        value: element.data.clone(),
    };
    let digits = element.data.as_bytes();
    let pair = |index: usize| -> Option<u8> {
        let tens = digits.get(index)?.checked_sub(b'0')?;
        let ones = digits.get(index + 1)?.checked_sub(b'0')?;
        (tens <= 9 && ones <= 9).then_some(tens * 10 + ones)
    };
    let (Some(year), Some(month), Some(day)) = (pair(0), pair(2), pair(4)) else {
        return Err(bad_date());
    };
    let year = 2000 + i32::from(year);
    let month = Month::try_from(month).map_err(|_| bad_date())?;
    let day = if day == 0 { month.length(year) } else { day };
    Date::from_calendar_date(year, month, day).map_err(|_| bad_date())
}
