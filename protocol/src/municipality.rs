//! Local-government codes (全国地方公共団体コード, JIS X 0402) and the embedded list of
//! Japan's 1,741 municipalities.
//!
//! A [`MunicipalityCode`] is any well-formed code (six digits, correct check digit); whether
//! it names a municipality that exists is a separate question, answered by
//! [`MunicipalityCode::is_known`] against `protocol/data/municipalities.csv`.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::checkdigit::jis_x0402_check_digit;

/// A six-digit local-government code with a valid JIS X 0402 check digit, e.g. `131016`
/// (Chiyoda). Serialized as the six-digit string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MunicipalityCode([u8; 6]);

/// Why a text is not a local-government code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MunicipalityCodeError {
    /// The code does not have six characters (after trimming surrounding whitespace).
    #[error("a municipality code has 6 digits, found {found} characters")]
    Length {
        /// Number of characters found.
        found: usize,
    },
    /// A character is not an ASCII digit.
    #[error("character {position} of the municipality code is not a digit")]
    NonDigit {
        /// 1-based position of the character within the (trimmed) code.
        position: usize,
    },
    /// The sixth digit is not the JIS X 0402 check digit of the first five.
    #[error("the municipality code's check digit (digit 6) is {found}, expected {expected}")]
    CheckDigit {
        /// The check digit the first five digits call for.
        expected: u8,
        /// The sixth digit as given.
        found: u8,
    },
}

impl MunicipalityCodeError {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        match self {
            Self::Length { found } => {
                format!("市区町村コードは6桁です（{found}文字あります）")
            }
            Self::NonDigit { position } => {
                format!("市区町村コードの{position}文字目が数字ではありません")
            }
            Self::CheckDigit { expected, found } => format!(
                "市区町村コードのチェックディジットが一致しません（6桁目: {found}、正しくは{expected}）"
            ),
        }
    }
}

/// The organisation code of the national node's own accounts (国). It is not a JIS X 0402
/// code of any municipality or prefecture (their first two digits are 01–47).
pub const NATIONAL_ORGANISATION: MunicipalityCode = MunicipalityCode(*b"000001");

/// The JIS X 0402 organisation code of a prefecture (`130001` for 東京都), 1..=47.
pub fn prefecture_organisation(prefecture: u8) -> Option<MunicipalityCode> {
    if !(1..=47).contains(&prefecture) {
        return None;
    }
    let digits = [prefecture / 10, prefecture % 10, 0, 0, 0];
    let check = crate::checkdigit::jis_x0402_check_digit(&digits);
    let [a, b, c, d, e] = digits.map(|digit| digit + b'0');
    MunicipalityCode::from_ascii_digits([a, b, c, d, e, check + b'0']).ok()
}

/// The name of prefecture 1..=47 (北海道, 東京都, …).
pub fn prefecture_name(prefecture: u8) -> Option<&'static str> {
    all_municipalities().iter().find(|m| m.prefecture_code == prefecture).map(|m| m.prefecture)
}

impl MunicipalityCode {
    /// Parses six ASCII digits (surrounding whitespace ignored) and checks the check digit.
    /// The code need not belong to an existing municipality; see [`Self::is_known`].
    pub fn parse(s: &str) -> Result<Self, MunicipalityCodeError> {
        let trimmed = s.trim();
        let found = trimmed.chars().count();
        if found != 6 {
            return Err(MunicipalityCodeError::Length { found });
        }
        let mut digits = [0u8; 6];
        for (index, (slot, character)) in digits.iter_mut().zip(trimmed.chars()).enumerate() {
            if !character.is_ascii_digit() {
                return Err(MunicipalityCodeError::NonDigit { position: index + 1 });
            }
            // An ASCII digit is one byte, so this conversion is exact.
            *slot = character as u8;
        }
        Self::from_ascii_digits(digits)
    }

    /// Builds a code from six ASCII bytes: each must be a digit, and the last the check digit.
    pub(crate) fn from_ascii_digits(digits: [u8; 6]) -> Result<Self, MunicipalityCodeError> {
        if let Some(index) = digits.iter().position(|byte| !byte.is_ascii_digit()) {
            return Err(MunicipalityCodeError::NonDigit { position: index + 1 });
        }
        let [a, b, c, d, e, check] = digits.map(|byte| byte - b'0');
        let expected = jis_x0402_check_digit(&[a, b, c, d, e]);
        if check != expected {
            return Err(MunicipalityCodeError::CheckDigit { expected, found: check });
        }
        Ok(Self(digits))
    }

    /// The six digits.
    pub fn as_str(&self) -> &str {
        // Always ASCII digits by construction; the fallback is never taken.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The prefecture code (都道府県コード), 1..=47: the first two digits.
    pub fn prefecture_code(&self) -> u8 {
        (self.0[0] - b'0') * 10 + (self.0[1] - b'0')
    }

    /// Whether the code is one of the 1,741 municipalities in the embedded list.
    pub fn is_known(&self) -> bool {
        lookup_municipality(*self).is_some()
    }
}

impl fmt::Display for MunicipalityCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for MunicipalityCode {
    type Err = MunicipalityCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for MunicipalityCode {
    type Error = MunicipalityCodeError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<MunicipalityCode> for String {
    fn from(code: MunicipalityCode) -> Self {
        code.as_str().to_owned()
    }
}

/// What kind of local government a municipality is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MunicipalityKind {
    /// A city (市), including designated cities (政令指定都市).
    City,
    /// A town (町).
    Town,
    /// A village (村).
    Village,
    /// One of Tokyo's 23 special wards (特別区).
    SpecialWard,
}

/// One municipality of the embedded list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Municipality {
    /// Its local-government code.
    pub code: MunicipalityCode,
    /// Its prefecture's code, 1..=47.
    pub prefecture_code: u8,
    /// Its prefecture's name, e.g. 北海道.
    pub prefecture: &'static str,
    /// Its name, e.g. 札幌市.
    pub name: &'static str,
    /// Its name in katakana, e.g. サッポロシ.
    pub name_kana: &'static str,
    /// City, town, village or special ward.
    pub kind: MunicipalityKind,
}

/// The embedded list, columns `code,prefecture_code,prefecture,name,name_kana,kind`.
const MUNICIPALITIES_CSV: &str = include_str!("../data/municipalities.csv");

/// All 1,741 municipalities, sorted by code. Parsed on first use.
pub fn all_municipalities() -> &'static [Municipality] {
    static MUNICIPALITIES: OnceLock<Vec<Municipality>> = OnceLock::new();
    MUNICIPALITIES.get_or_init(|| {
        let mut municipalities: Vec<Municipality> = MUNICIPALITIES_CSV
            .lines()
            .skip(1)
            .filter(|line| !line.trim().is_empty())
            .enumerate()
            .map(|(index, line)| parse_embedded_line(index + 2, line))
            .collect();
        municipalities.sort_by_key(|municipality| municipality.code);
        municipalities
    })
}

/// The municipality with this code, if it is in the embedded list.
pub fn lookup_municipality(code: MunicipalityCode) -> Option<&'static Municipality> {
    let municipalities = all_municipalities();
    municipalities
        .binary_search_by_key(&code, |municipality| municipality.code)
        .ok()
        .and_then(|index| municipalities.get(index))
}

/// Parses one line of the embedded CSV.
///
/// Panics on malformed data: the file is compiled in, so a bad line is a build defect, and
/// the test that loads every municipality catches it before release.
fn parse_embedded_line(line_number: usize, line: &'static str) -> Municipality {
    let fields: Vec<&'static str> = line.split(',').collect();
    let [code, prefecture_code, prefecture, name, name_kana, kind] = fields[..] else {
        panic!("municipalities.csv line {line_number}: expected 6 fields: {line}");
    };
    let code = MunicipalityCode::parse(code)
        .unwrap_or_else(|error| panic!("municipalities.csv line {line_number}: {error}"));
    let prefecture_code: u8 = prefecture_code
        .parse()
        .unwrap_or_else(|error| panic!("municipalities.csv line {line_number}: {error}"));
    assert_eq!(
        prefecture_code,
        code.prefecture_code(),
        "municipalities.csv line {line_number}: prefecture code disagrees with the code"
    );
    let kind = match kind.trim() {
        "city" => MunicipalityKind::City,
        "town" => MunicipalityKind::Town,
        "village" => MunicipalityKind::Village,
        "special_ward" => MunicipalityKind::SpecialWard,
        other => panic!("municipalities.csv line {line_number}: unknown kind {other:?}"),
    };
    Municipality { code, prefecture_code, prefecture, name, name_kana, kind }
}
