//! The vaccination coupon (接種券): its 18-digit number and the signed QR payload.
//!
//! The 18 digits keep the 2021 layout — ticket kind (1) ‖ dose round (1) ‖ municipality code
//! (6) ‖ coupon number (10) — so printers, OCR lines and old scanners keep working. The coupon
//! numbers we issue end in a Damm check digit, and the QR code adds a generation and an
//! Ed25519 signature, all as decimal digits (QR numeric mode; no punctuation for a keyboard
//! wedge to garble). `docs/coupon-qr.md` is the specification; this module implements it.

use std::fmt;
use std::str::FromStr;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::checkdigit::{damm_check_digit, damm_is_valid};
use crate::municipality::{MunicipalityCode, MunicipalityCodeError};

/// Number of digits of the printed coupon code.
pub const CODE_LEN: usize = 18;

/// Number of digits of the signed QR text: 18 (code) + 2 (generation) + 8 × 20 (signature).
pub const QR_TEXT_LEN: usize = CODE_LEN + 2 + SIGNATURE_CHUNKS * SIGNATURE_CHUNK_DIGITS;

/// The highest generation the QR text can carry (two decimal digits).
pub const MAX_GENERATION: u8 = 99;

/// The signature is written as this many big-endian u64 chunks…
const SIGNATURE_CHUNKS: usize = 8;
/// …each as this many zero-padded decimal digits (u64::MAX has 20 digits).
const SIGNATURE_CHUNK_DIGITS: usize = 20;

/// Domain separation for the signed message, so a coupon signature can never be mistaken
/// for a signature over anything else the same key might sign.
const SIGNATURE_DOMAIN: &[u8] = b"VRS-COUPON-QR-v1\0";

/// A coupon number we issue: a 9-digit serial and a Damm check digit. Serialized as the
/// 10-digit string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CouponNumber([u8; 10]);

/// Why a serial or a text is not a coupon number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CouponNumberError {
    /// The text does not have ten characters (after trimming surrounding whitespace).
    #[error("a coupon number has 10 digits, found {found} characters")]
    Length {
        /// Number of characters found.
        found: usize,
    },
    /// A character is not an ASCII digit.
    #[error("character {position} of the coupon number is not a digit")]
    NonDigit {
        /// 1-based position within the (trimmed) coupon number.
        position: usize,
    },
    /// The Damm check does not hold: some digit was misread or mistyped.
    #[error(
        "the coupon number's check digit (digit 10) is {found}, but the first 9 digits call \
         for {expected}: a digit was misread or mistyped"
    )]
    CheckDigit {
        /// The check digit the first nine digits call for.
        expected: u8,
        /// The tenth digit as given.
        found: u8,
    },
    /// The serial does not fit in nine digits.
    #[error("coupon serial {serial} does not fit in 9 digits")]
    SerialTooLarge {
        /// The serial asked for.
        serial: u32,
    },
}

impl CouponNumberError {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        match self {
            Self::Length { found } => format!("券番号は10桁です（{found}文字あります）"),
            Self::NonDigit { position } => format!("券番号の{position}文字目が数字ではありません"),
            Self::CheckDigit { .. } => {
                "券番号のチェックディジットが一致しません（10桁目）。読み取りか入力の誤りです".to_owned()
            }
            Self::SerialTooLarge { serial } => {
                format!("券番号の通し番号 {serial} は9桁に収まりません")
            }
        }
    }
}

impl CouponNumber {
    /// The largest serial that fits in nine digits.
    pub const MAX_SERIAL: u32 = 999_999_999;

    /// The coupon number for `serial` (at most [`Self::MAX_SERIAL`]): the serial as nine
    /// zero-padded digits, then its Damm check digit.
    pub fn from_serial(serial: u32) -> Result<Self, CouponNumberError> {
        if serial > Self::MAX_SERIAL {
            return Err(CouponNumberError::SerialTooLarge { serial });
        }
        let mut digits = [0u8; 10];
        let mut rest = serial;
        for slot in digits[..9].iter_mut().rev() {
            *slot = (rest % 10) as u8;
            rest /= 10;
        }
        digits[9] = damm_check_digit(&digits[..9]);
        Ok(Self(digits.map(|digit| digit + b'0')))
    }

    /// Parses ten ASCII digits (surrounding whitespace ignored) that pass the Damm check.
    pub fn parse(s: &str) -> Result<Self, CouponNumberError> {
        let digits: [u8; 10] = ascii_digits(s.trim()).map_err(|error| match error {
            DigitsError::Length { found } => CouponNumberError::Length { found },
            DigitsError::NonDigit { position } => CouponNumberError::NonDigit { position },
        })?;
        Self::from_ascii_digits(digits)
            .map_err(|DammMismatch { expected, found }| CouponNumberError::CheckDigit { expected, found })
    }

    /// Builds a number from ten ASCII digits, checking the Damm check digit. A byte that is
    /// not a digit fails the check too (its value is above 9).
    fn from_ascii_digits(digits: [u8; 10]) -> Result<Self, DammMismatch> {
        let values = digits.map(|byte| byte.wrapping_sub(b'0'));
        if !damm_is_valid(&values) {
            return Err(DammMismatch { expected: damm_check_digit(&values[..9]), found: values[9] });
        }
        Ok(Self(digits))
    }

    /// The nine-digit serial (the number without its check digit).
    pub fn serial(&self) -> u32 {
        self.0[..9].iter().fold(0u32, |serial, &byte| serial * 10 + u32::from(byte - b'0'))
    }

    /// The ten digits.
    pub fn as_str(&self) -> &str {
        // Always ASCII digits by construction; the fallback is never taken.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for CouponNumber {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for CouponNumber {
    type Err = CouponNumberError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for CouponNumber {
    type Error = CouponNumberError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<CouponNumber> for String {
    fn from(number: CouponNumber) -> Self {
        number.as_str().to_owned()
    }
}

/// The 18-digit coupon code printed on the coupon. Serialized as the 18-digit string.
///
/// `ticket_kind` and `dose_round` are single digits (0..=9 and 1..=9); [`CouponCode::parse`]
/// guarantees this, and code that builds the struct by hand must keep it so.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CouponCode {
    /// Ticket kind (券種), digit 1.
    pub ticket_kind: u8,
    /// Dose round (接種回数), digit 2: 1..=9.
    pub dose_round: u8,
    /// The issuing municipality, digits 3–8.
    pub municipality: MunicipalityCode,
    /// The coupon number, digits 9–18.
    pub number: CouponNumber,
}

/// Why a text is not an 18-digit coupon code. Positions are 1-based digits of the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CouponCodeError {
    /// The code does not have 18 characters (after trimming surrounding whitespace).
    #[error("a coupon code has 18 digits, found {found} characters")]
    Length {
        /// Number of characters found.
        found: usize,
    },
    /// A character is not an ASCII digit.
    #[error("character {position} of the coupon code is not a digit")]
    NonDigit {
        /// 1-based position within the (trimmed) code.
        position: usize,
    },
    /// The dose round (digit 2) is 0.
    #[error("the dose round (digit 2) is {found}; it must be 1 to 9")]
    DoseRound {
        /// The digit found.
        found: u8,
    },
    /// The municipality code (digits 3–8) fails its JIS X 0402 check digit (digit 8).
    #[error(
        "the municipality code's check digit (digit 8) is {found}, but digits 3-7 call for \
         {expected}"
    )]
    MunicipalityCheckDigit {
        /// The check digit digits 3–7 call for.
        expected: u8,
        /// Digit 8 as given.
        found: u8,
    },
    /// The coupon number (digits 9–18) fails its Damm check digit (digit 18).
    #[error(
        "the coupon number's check digit (digit 18) is {found}, but digits 9-17 call for \
         {expected}: a digit was misread or mistyped"
    )]
    NumberCheckDigit {
        /// The check digit digits 9–17 call for.
        expected: u8,
        /// Digit 18 as given.
        found: u8,
    },
}

impl CouponCodeError {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        match self {
            Self::Length { found } => format!("接種券番号は18桁です（{found}文字あります）"),
            Self::NonDigit { position } => {
                format!("接種券番号の{position}文字目が数字ではありません")
            }
            Self::DoseRound { found } => {
                format!("接種回数（2桁目）が{found}です。1〜9でなければなりません")
            }
            Self::MunicipalityCheckDigit { .. } => {
                "市区町村コードのチェックディジットが一致しません（8桁目）".to_owned()
            }
            Self::NumberCheckDigit { .. } => {
                "券番号のチェックディジットが一致しません（18桁目）。読み取りか入力の誤りです".to_owned()
            }
        }
    }
}

impl CouponCode {
    /// Parses exactly 18 ASCII digits (surrounding whitespace ignored): a ticket kind, a dose
    /// round of 1..=9, a municipality code with a valid check digit (it need not be a known
    /// municipality) and a Damm-valid coupon number.
    pub fn parse(s: &str) -> Result<Self, CouponCodeError> {
        let digits: [u8; CODE_LEN] = ascii_digits(s.trim()).map_err(|error| match error {
            DigitsError::Length { found } => CouponCodeError::Length { found },
            DigitsError::NonDigit { position } => CouponCodeError::NonDigit { position },
        })?;
        Self::from_ascii_digits(&digits)
    }

    /// Builds a code from 18 ASCII digits; errors carry positions within the 18.
    fn from_ascii_digits(digits: &[u8; CODE_LEN]) -> Result<Self, CouponCodeError> {
        if let Some(index) = digits.iter().position(|byte| !byte.is_ascii_digit()) {
            return Err(CouponCodeError::NonDigit { position: index + 1 });
        }
        let ticket_kind = digits[0] - b'0';
        let dose_round = digits[1] - b'0';
        if dose_round == 0 {
            return Err(CouponCodeError::DoseRound { found: dose_round });
        }
        let mut municipality = [0u8; 6];
        municipality.copy_from_slice(&digits[2..8]);
        let municipality =
            MunicipalityCode::from_ascii_digits(municipality).map_err(|error| match error {
                MunicipalityCodeError::CheckDigit { expected, found } => {
                    CouponCodeError::MunicipalityCheckDigit { expected, found }
                }
                MunicipalityCodeError::NonDigit { position } => {
                    CouponCodeError::NonDigit { position: position + 2 }
                }
                MunicipalityCodeError::Length { found } => CouponCodeError::Length { found },
            })?;
        let mut number = [0u8; 10];
        number.copy_from_slice(&digits[8..]);
        let number =
            CouponNumber::from_ascii_digits(number).map_err(|DammMismatch { expected, found }| {
                CouponCodeError::NumberCheckDigit { expected, found }
            })?;
        Ok(Self { ticket_kind, dose_round, municipality, number })
    }
}

impl fmt::Display for CouponCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}{}{}{}", self.ticket_kind, self.dose_round, self.municipality, self.number)
    }
}

impl FromStr for CouponCode {
    type Err = CouponCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for CouponCode {
    type Error = CouponCodeError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<CouponCode> for String {
    fn from(code: CouponCode) -> Self {
        code.to_string()
    }
}

/// A coupon code with its generation, signed by the issuing municipality's coupon key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SignedCoupon {
    /// The 18-digit code, as printed.
    pub code: CouponCode,
    /// 0 for the first issue, +1 at each reissue; at most [`MAX_GENERATION`].
    pub generation: u8,
    /// Ed25519 signature over [`SignedCoupon::signed_message`].
    pub signature: [u8; 64],
}

/// Decides whether a signed coupon's signature verifies under a public key.
///
/// [`Ed25519Check`] computes it. The answer depends on nothing but the coupon and the key,
/// so a caller that has computed it already for this very coupon and key — the simulator
/// checks the coupons it prints on a second thread — may answer from what it computed.
pub trait SignatureCheck {
    /// True if `coupon`'s signature verifies under the 32-byte Ed25519 `public_key`.
    fn verifies(&self, coupon: &SignedCoupon, public_key: &[u8]) -> bool;
}

/// Computes the Ed25519 check ([`SignedCoupon::verify`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ed25519Check;

impl SignatureCheck for Ed25519Check {
    fn verifies(&self, coupon: &SignedCoupon, public_key: &[u8]) -> bool {
        coupon.verify(public_key).is_ok()
    }
}

/// Checks the coupons of the municipality that holds `key` by signing them again and
/// comparing the signatures in constant time, and verifies any other municipality's.
///
/// Ed25519 signing is deterministic (RFC 8032): the one signature this key gives a coupon is
/// the one it printed, and signing costs about half of verifying (34.5 against 65.6 µs on
/// the benchmark machine, `docs/benchmarks.md`). A signature made with the same key some
/// other way (another nonce) would verify but is refused here; the node is the key's only
/// signer, so none of its coupons carries one.
#[derive(Clone, Copy, Debug)]
pub struct OwnKeyCheck<'a> {
    key: &'a Ed25519KeyPair,
}

impl<'a> OwnKeyCheck<'a> {
    /// A check that signs again with `key` where the coupon's public key is `key`'s.
    pub fn new(key: &'a Ed25519KeyPair) -> Self {
        Self { key }
    }
}

impl SignatureCheck for OwnKeyCheck<'_> {
    fn verifies(&self, coupon: &SignedCoupon, public_key: &[u8]) -> bool {
        if public_key != self.key.public_key().as_ref() {
            return Ed25519Check.verifies(coupon, public_key);
        }
        match SignedCoupon::try_sign(coupon.code, coupon.generation, self.key) {
            Ok(again) => {
                bool::from(subtle::ConstantTimeEq::ct_eq(&again.signature[..], &coupon.signature[..]))
            }
            Err(_) => false,
        }
    }
}

/// What a node keeps of each coupon it prints ([`PrintedCheck`]): the first 16 bytes of
/// SHA-256 over the signed message (code and generation) followed by the 64-byte signature,
/// so that a digest matches one coupon generation with one signature and nothing else.
pub fn printed_digest(coupon: &SignedCoupon) -> [u8; 16] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&SignedCoupon::signed_message(&coupon.code, coupon.generation));
    context.update(&coupon.signature);
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&context.finish().as_ref()[..16]);
    digest
}

/// Checks a coupon the node printed against the digest kept when it was printed
/// ([`printed_digest`]: written with the print-shop file or at a reissue); a coupon with no
/// digest kept, another municipality's, or one whose digest differs goes to `then`.
///
/// Ed25519 signatures by the node's key are deterministic and the node is the key's only
/// signer, so a coupon of its own verifies exactly when its signature is the one printed: a
/// matching digest (16 bytes, compared in constant time) answers without the curve
/// arithmetic. A digest that differs is not taken as a refusal by itself: `then` decides.
#[derive(Clone, Copy, Debug)]
pub struct PrintedCheck<'a, C> {
    own_key: &'a [u8],
    printed: Option<[u8; 16]>,
    then: C,
}

impl<'a, C: SignatureCheck> PrintedCheck<'a, C> {
    /// A check of one scanned coupon: `printed` is the digest kept for its number and
    /// generation, if any; `own_key` the public key of the node that printed it.
    pub fn new(own_key: &'a [u8], printed: Option<[u8; 16]>, then: C) -> Self {
        Self { own_key, printed, then }
    }
}

impl<C: SignatureCheck> SignatureCheck for PrintedCheck<'_, C> {
    fn verifies(&self, coupon: &SignedCoupon, public_key: &[u8]) -> bool {
        if let Some(printed) = self.printed
            && public_key == self.own_key
            && bool::from(subtle::ConstantTimeEq::ct_eq(&printed_digest(coupon)[..], &printed[..]))
        {
            return true;
        }
        self.then.verifies(coupon, public_key)
    }
}

/// The signature does not verify under the given public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the coupon's signature does not verify (forged, altered or misread coupon)")]
pub struct BadSignature;

impl BadSignature {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        "接種券の署名が一致しません（偽造・改変・読み取り誤りの可能性があります）".to_owned()
    }
}

/// A generation above [`MAX_GENERATION`] cannot be written in the QR text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("coupon generation {generation} is above the maximum of 99")]
pub struct GenerationTooLarge {
    /// The generation asked for.
    pub generation: u8,
}

impl GenerationTooLarge {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        format!("接種券の再発行回数 {} は上限の99を超えています", self.generation)
    }
}

impl SignedCoupon {
    /// Signs `code` at `generation` with the municipality's coupon key.
    ///
    /// # Panics
    ///
    /// If `generation` is above [`MAX_GENERATION`]; use [`SignedCoupon::try_sign`] where the
    /// generation comes from data.
    pub fn sign(code: CouponCode, generation: u8, key: &Ed25519KeyPair) -> Self {
        match Self::try_sign(code, generation, key) {
            Ok(signed) => signed,
            Err(error) => panic!("{error}"),
        }
    }

    /// Signs `code` at `generation`, refusing a generation above [`MAX_GENERATION`].
    pub fn try_sign(
        code: CouponCode,
        generation: u8,
        key: &Ed25519KeyPair,
    ) -> Result<Self, GenerationTooLarge> {
        if generation > MAX_GENERATION {
            return Err(GenerationTooLarge { generation });
        }
        let message = Self::signed_message(&code, generation);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(key.sign(&message).as_ref());
        Ok(Self { code, generation, signature })
    }

    /// The bytes the signature covers: `b"VRS-COUPON-QR-v1\0"` ‖ the 18 ASCII digits of the
    /// code ‖ the generation as one byte (36 bytes).
    pub fn signed_message(code: &CouponCode, generation: u8) -> Vec<u8> {
        let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + CODE_LEN + 1);
        message.extend_from_slice(SIGNATURE_DOMAIN);
        message.extend_from_slice(code.to_string().as_bytes());
        message.push(generation);
        message
    }

    /// The 180-digit QR text: code ‖ two-digit generation ‖ the signature as eight big-endian
    /// u64 values, each zero-padded to 20 digits.
    pub fn to_qr_text(&self) -> String {
        let mut text = String::with_capacity(QR_TEXT_LEN);
        text.push_str(&self.code.to_string());
        text.push_str(&format!("{:02}", self.generation));
        for chunk in self.signature.chunks_exact(8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            text.push_str(&format!("{:020}", u64::from_be_bytes(bytes)));
        }
        text
    }

    /// Checks the signature against the municipality's 32-byte Ed25519 public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), BadSignature> {
        let message = Self::signed_message(&self.code, self.generation);
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&message, &self.signature)
            .map_err(|_| BadSignature)
    }
}

/// What a scanner read from a coupon: the bare 18 digits, or the signed QR text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ScannedCoupon {
    /// The 18 digits alone (OCR line, NW-7 barcode, old QR code, or typed by hand). Carries no
    /// proof: accept it only for a coupon this node issued.
    Legacy(CouponCode),
    /// The 180-digit signed QR text (signature not yet verified).
    Signed(SignedCoupon),
}

impl ScannedCoupon {
    /// The 18-digit code, whichever form was scanned.
    pub fn code(&self) -> &CouponCode {
        match self {
            Self::Legacy(code) => code,
            Self::Signed(signed) => &signed.code,
        }
    }
}

/// Why scanned text is not a coupon. Positions count characters from 1 at the first
/// character after leading whitespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CouponScanError {
    /// Neither 18 nor 180 characters.
    #[error(
        "read {found} characters; a coupon is 18 digits (printed number) or 180 digits \
         (signed QR code)"
    )]
    Length {
        /// Number of characters read (after trimming surrounding whitespace).
        found: usize,
    },
    /// A character is not a digit (ASCII or full-width).
    #[error("character {position} ({character:?}) is not a digit")]
    NonDigit {
        /// 1-based position.
        position: usize,
        /// The character read.
        character: char,
    },
    /// The first 18 digits are not a valid coupon code.
    #[error("{0}")]
    Code(#[source] CouponCodeError),
    /// A 20-digit signature chunk is larger than a 64-bit number can be.
    #[error(
        "signature chunk {chunk} (digits {position}-{}) is larger than 18446744073709551615",
        position + SIGNATURE_CHUNK_DIGITS - 1
    )]
    SignatureOutOfRange {
        /// Which chunk, 1..=8.
        chunk: usize,
        /// 1-based position of its first digit.
        position: usize,
    },
}

impl CouponScanError {
    /// The message in Japanese, for municipal staff.
    pub fn message_ja(&self) -> String {
        match self {
            Self::Length { found } => format!(
                "{found}文字を読み取りました。接種券は18桁（印字番号）または180桁（署名付きQRコード）です"
            ),
            Self::NonDigit { position, character } => {
                format!("{position}文字目（{character}）が数字ではありません")
            }
            Self::Code(error) => error.message_ja(),
            Self::SignatureOutOfRange { position, .. } => format!(
                "QRコードの署名部分（{position}〜{}桁目）が正しくありません",
                position + SIGNATURE_CHUNK_DIGITS - 1
            ),
        }
    }
}

impl From<CouponCodeError> for CouponScanError {
    fn from(error: CouponCodeError) -> Self {
        Self::Code(error)
    }
}

/// Decodes what a scanner (or a person) typed for a coupon.
///
/// Surrounding whitespace, CR and LF are ignored, and full-width digits (０–９, typed with the
/// Japanese IME on) count as digits. 18 digits are a [`ScannedCoupon::Legacy`] code, 180 a
/// [`ScannedCoupon::Signed`] QR text; the signature is parsed but not verified here.
pub fn parse_scanned_coupon(text: &str) -> Result<ScannedCoupon, CouponScanError> {
    let trimmed = text.trim();
    let found = trimmed.chars().count();
    if found != CODE_LEN && found != QR_TEXT_LEN {
        return Err(CouponScanError::Length { found });
    }
    let mut digits = Vec::with_capacity(found);
    for (index, character) in trimmed.chars().enumerate() {
        let digit =
            normalise_digit(character).ok_or(CouponScanError::NonDigit { position: index + 1, character })?;
        digits.push(digit);
    }
    let mut code = [0u8; CODE_LEN];
    code.copy_from_slice(&digits[..CODE_LEN]);
    let code = CouponCode::from_ascii_digits(&code)?;
    if found == CODE_LEN {
        return Ok(ScannedCoupon::Legacy(code));
    }
    let generation = (digits[CODE_LEN] - b'0') * 10 + (digits[CODE_LEN + 1] - b'0');
    let mut signature = [0u8; 64];
    let chunks = digits[CODE_LEN + 2..].chunks_exact(SIGNATURE_CHUNK_DIGITS);
    for (index, (chunk, bytes)) in chunks.zip(signature.chunks_exact_mut(8)).enumerate() {
        let value = decimal_u64(chunk).ok_or(CouponScanError::SignatureOutOfRange {
            chunk: index + 1,
            position: CODE_LEN + 2 + index * SIGNATURE_CHUNK_DIGITS + 1,
        })?;
        bytes.copy_from_slice(&value.to_be_bytes());
    }
    Ok(ScannedCoupon::Signed(SignedCoupon { code, generation, signature }))
}

/// An ASCII or full-width digit as an ASCII digit byte.
fn normalise_digit(character: char) -> Option<u8> {
    match character {
        '0'..='9' => Some(character as u8),
        '０'..='９' => Some(b'0' + (u32::from(character) - u32::from('０')) as u8),
        _ => None,
    }
}

/// The value of ASCII decimal digits, or `None` if it overflows a u64.
fn decimal_u64(digits: &[u8]) -> Option<u64> {
    digits
        .iter()
        .try_fold(0u64, |value, &byte| value.checked_mul(10)?.checked_add(u64::from(byte.wrapping_sub(b'0'))))
}

/// The Damm check digit of a coupon number is wrong.
struct DammMismatch {
    expected: u8,
    found: u8,
}

/// Why a text is not exactly N ASCII digits.
enum DigitsError {
    Length { found: usize },
    NonDigit { position: usize },
}

/// Exactly `N` ASCII digits, as bytes.
fn ascii_digits<const N: usize>(text: &str) -> Result<[u8; N], DigitsError> {
    let found = text.chars().count();
    if found != N {
        return Err(DigitsError::Length { found });
    }
    let mut digits = [0u8; N];
    for (index, (slot, character)) in digits.iter_mut().zip(text.chars()).enumerate() {
        if !character.is_ascii_digit() {
            return Err(DigitsError::NonDigit { position: index + 1 });
        }
        *slot = character as u8;
    }
    Ok(digits)
}
