//! Codec tests: check digits, municipality codes, coupon codes and their signed QR text, and
//! GS1 vial barcodes. Each feature has one `check(input, expected)` helper and a table of
//! cases; proptests cover what tables cannot (every single-digit error, round trips,
//! tampering, and that no decoder panics on any string).
//!
//! Proptests run with a fixed seed so a failure replays; set `PROPTEST_RNG_SEED` to explore
//! other seeds and `PROPTEST_CASES` to run more cases.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use protocol::checkdigit::{
    damm_check_digit, damm_is_valid, gs1_check_digit, gs1_is_valid, jis_x0402_check_digit,
    my_number_check_digit, my_number_is_valid,
};
use protocol::coupon::{
    BadSignature, CouponCode, CouponCodeError, CouponNumber, CouponNumberError, CouponScanError,
    GenerationTooLarge, MAX_GENERATION, OwnKeyCheck, PrintedCheck, QR_TEXT_LEN, ScannedCoupon,
    SignatureCheck, SignedCoupon, parse_scanned_coupon, printed_digest,
};
use protocol::gs1::{Gs1Error, Gtin, GtinError, MAX_VIAL_TEXT_BYTES, VialBarcode, parse_vial_barcode};
use protocol::municipality::{
    MunicipalityCode, MunicipalityCodeError, MunicipalityKind, NATIONAL_ORGANISATION, all_municipalities,
    lookup_municipality, prefecture_name, prefecture_organisation,
};
use ring::signature::{Ed25519KeyPair, KeyPair};
use time::Date;
use time::macros::date;

/// The group separator (FNC1) as a scanner transmits it.
const GS: &str = "\u{1d}";

/// The documented test key: an Ed25519 seed of the bytes 0x00..=0x1f.
fn test_key() -> Ed25519KeyPair {
    let seed: Vec<u8> = (0u8..32).collect();
    Ed25519KeyPair::from_seed_unchecked(&seed).expect("a 32-byte seed is a valid key")
}

/// Proptest settings: 256 cases unless `PROPTEST_CASES` is set, and a fixed seed unless
/// `PROPTEST_RNG_SEED` is set.
fn proptest_config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    if config.rng_seed == RngSeed::Random {
        // 2021-02-17, the first day of COVID-19 vaccination in Japan.
        config.rng_seed = RngSeed::Fixed(20_210_217);
    }
    config
}

/// Digit values of an ASCII digit string.
fn values(digits: &str) -> Vec<u8> {
    digits.bytes().map(|byte| byte - b'0').collect()
}

// ---------------------------------------------------------------------------------------
// Check digits
// ---------------------------------------------------------------------------------------

#[test]
fn damm_check_digits() {
    #[track_caller]
    fn check(digits: &str, expected: u8) {
        assert_eq!(damm_check_digit(&values(digits)), expected, "Damm check digit of {digits}");
        let mut with_check = values(digits);
        with_check.push(expected);
        assert!(damm_is_valid(&with_check), "{digits}{expected} should be valid");
        let last = with_check.len() - 1;
        with_check[last] = (expected + 1) % 10;
        assert!(!damm_is_valid(&with_check), "{digits} with a wrong check digit");
    }
    check("572", 4); // The example in Damm's thesis and on Wikipedia.
    check("000000000", 0);
    check("000000001", 3);
    check("123456789", 4);
    check("999999999", 0);
    check("", 0);
    assert!(!damm_is_valid(&[]), "no digits, no check digit");
    assert!(!damm_is_valid(&[1, 10]), "10 is not a digit");
}

#[test]
fn jis_x0402_check_digits() {
    #[track_caller]
    fn check(code: &str) {
        let digits = values(code);
        let first5: [u8; 5] = digits[..5].try_into().unwrap();
        assert_eq!(jis_x0402_check_digit(&first5), digits[5], "JIS X 0402 check digit of {code}");
    }
    check("131016"); // Chiyoda
    check("141003"); // Yokohama
    check("011002"); // Sapporo
    check("010006"); // Hokkaido (prefecture)
    check("012050"); // Muroran: sum mod 11 = 1, so 11 - 1 = 10 is written 0.
    check("012131"); // Tomakomai: sum mod 11 = 0, so 11 - 0 = 11 is written 1.
}

#[test]
fn jis_x0402_rule_holds_for_every_embedded_code() {
    let prefectures = include_str!("../data/prefectures.csv");
    let prefecture_codes: Vec<&str> =
        prefectures.lines().skip(1).filter_map(|line| line.split(',').next()).collect();
    assert_eq!(prefecture_codes.len(), 47);
    for code in prefecture_codes {
        let parsed = MunicipalityCode::parse(code).unwrap_or_else(|error| panic!("{code}: {error}"));
        assert!(!parsed.is_known(), "prefecture {code} is not a municipality");
        assert_eq!(prefecture_organisation(parsed.prefecture_code()), Some(parsed));
        assert_ne!(parsed, NATIONAL_ORGANISATION);
    }
    for line in prefectures.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let number: u8 = fields[1].parse().unwrap();
        assert_eq!(prefecture_name(number), Some(fields[2]), "{line}");
    }
    assert_eq!(prefecture_organisation(0), None);
    assert_eq!(prefecture_organisation(48), None);
    assert!(!NATIONAL_ORGANISATION.is_known());
    assert_eq!(MunicipalityCode::parse(NATIONAL_ORGANISATION.as_str()), Ok(NATIONAL_ORGANISATION));
    let municipalities = include_str!("../data/municipalities.csv");
    let mut count = 0;
    for line in municipalities.lines().skip(1) {
        let code = line.split(',').next().unwrap();
        MunicipalityCode::parse(code).unwrap_or_else(|error| panic!("{code}: {error}"));
        count += 1;
    }
    assert_eq!(count, 1741);
}

#[test]
fn gs1_check_digits() {
    #[track_caller]
    fn check(gtin: &str, valid: bool) {
        assert_eq!(gs1_is_valid(&values(gtin)), valid, "{gtin}");
        if valid {
            let digits = values(gtin);
            let (check_digit, body) = digits.split_last().unwrap();
            assert_eq!(gs1_check_digit(body), *check_digit, "{gtin}");
        }
    }
    check("09506000134352", true); // GS1's own example GTIN.
    check("00012345600012", true);
    check("10614141000415", true);
    check("4901234567894", true); // A GTIN-13 (JAN).
    check("04987123456784", true);
    check("04987123456782", false);
    check("09506000134353", false);
    check("7", false);
    check("", false);
}

#[test]
fn my_number_check_digits() {
    #[track_caller]
    fn check(number: &str, valid: bool) {
        assert_eq!(my_number_is_valid(number), valid, "{number:?}");
    }
    check("123456789018", true);
    check("000000000000", true);
    check("111111111118", true);
    check("987654321093", true);
    check("123456789019", false);
    check("12345678901", false);
    check("1234567890180", false);
    check("12345678901８", false);
    check(" 123456789018", false);
    check("", false);
    let first11: [u8; 11] = values("12345678901").try_into().unwrap();
    assert_eq!(my_number_check_digit(&first11), 8);
}

// ---------------------------------------------------------------------------------------
// Municipality codes
// ---------------------------------------------------------------------------------------

#[test]
fn municipality_codes() {
    #[track_caller]
    fn check(input: &str, expected: Result<&str, MunicipalityCodeError>) {
        let parsed = MunicipalityCode::parse(input);
        assert_eq!(parsed.map(|code| code.to_string()), expected.map(str::to_owned), "{input:?}");
    }
    use MunicipalityCodeError as E;
    check("131016", Ok("131016"));
    check(" 141003\r\n", Ok("141003"));
    check("999997", Ok("999997")); // Well-formed, though no such municipality.
    check("131017", Err(E::CheckDigit { expected: 6, found: 7 }));
    check("13101", Err(E::Length { found: 5 }));
    check("1310166", Err(E::Length { found: 7 }));
    check("", Err(E::Length { found: 0 }));
    check("13a016", Err(E::NonDigit { position: 3 }));
    check("１３１０１６", Err(E::NonDigit { position: 1 }));
    check("13101\u{1d}", Err(E::NonDigit { position: 6 }));
}

#[test]
fn municipality_code_accessors_and_serde() {
    let chiyoda: MunicipalityCode = "131016".parse().unwrap();
    assert_eq!(chiyoda.as_str(), "131016");
    assert_eq!(chiyoda.prefecture_code(), 13);
    assert!(chiyoda.is_known());
    assert!(!MunicipalityCode::parse("999997").unwrap().is_known());
    assert_eq!(serde_json::to_string(&chiyoda).unwrap(), "\"131016\"");
    assert_eq!(serde_json::from_str::<MunicipalityCode>("\"131016\"").unwrap(), chiyoda);
    assert!(serde_json::from_str::<MunicipalityCode>("\"131017\"").is_err());
    assert_eq!(
        MunicipalityCodeError::CheckDigit { expected: 6, found: 7 }.message_ja(),
        "市区町村コードのチェックディジットが一致しません（6桁目: 7、正しくは6）"
    );
}

#[test]
fn municipality_lookup() {
    #[track_caller]
    fn check(code: &str, expected: Option<(&str, &str, MunicipalityKind)>) {
        let found = lookup_municipality(code.parse().unwrap())
            .map(|municipality| (municipality.prefecture, municipality.name, municipality.kind));
        assert_eq!(found, expected, "{code}");
    }
    check("131016", Some(("東京都", "千代田区", MunicipalityKind::SpecialWard)));
    check("141003", Some(("神奈川県", "横浜市", MunicipalityKind::City)));
    check("011002", Some(("北海道", "札幌市", MunicipalityKind::City)));
    check("010006", None);
}

#[test]
fn all_embedded_municipalities_parse_and_are_known() {
    let municipalities = all_municipalities();
    assert_eq!(municipalities.len(), 1741);
    let count = |kind| municipalities.iter().filter(|m| m.kind == kind).count();
    assert_eq!(count(MunicipalityKind::City), 792);
    assert_eq!(count(MunicipalityKind::Town), 743);
    assert_eq!(count(MunicipalityKind::Village), 183);
    assert_eq!(count(MunicipalityKind::SpecialWard), 23);
    for pair in municipalities.windows(2) {
        assert!(pair[0].code < pair[1].code, "sorted and unique: {}", pair[1].code);
    }
    for municipality in municipalities {
        let code = MunicipalityCode::parse(municipality.code.as_str()).unwrap();
        assert_eq!(code, municipality.code);
        assert!(code.is_known(), "{code}");
        assert_eq!(code.prefecture_code(), municipality.prefecture_code);
        assert!((1..=47).contains(&municipality.prefecture_code), "{code}");
        assert!(!municipality.name.is_empty() && !municipality.name_kana.is_empty(), "{code}");
    }
}

// ---------------------------------------------------------------------------------------
// Coupon numbers and codes
// ---------------------------------------------------------------------------------------

#[test]
fn coupon_numbers_from_serials() {
    #[track_caller]
    fn check(serial: u32, expected: Result<&str, CouponNumberError>) {
        let number = CouponNumber::from_serial(serial);
        assert_eq!(number.map(|n| n.to_string()), expected.map(str::to_owned), "{serial}");
        if let Ok(number) = number {
            assert_eq!(number.serial(), serial);
        }
    }
    check(0, Ok("0000000000"));
    check(1, Ok("0000000013"));
    check(123_456_789, Ok("1234567894"));
    check(999_999_999, Ok("9999999990"));
    check(1_000_000_000, Err(CouponNumberError::SerialTooLarge { serial: 1_000_000_000 }));
    check(u32::MAX, Err(CouponNumberError::SerialTooLarge { serial: u32::MAX }));
}

#[test]
fn coupon_numbers_parse() {
    #[track_caller]
    fn check(input: &str, expected: Result<u32, CouponNumberError>) {
        let parsed = CouponNumber::parse(input).map(|number| number.serial());
        assert_eq!(parsed, expected, "{input:?}");
    }
    use CouponNumberError as E;
    check("0000000013", Ok(1));
    check(" 1234567894 ", Ok(123_456_789));
    check("0000000014", Err(E::CheckDigit { expected: 3, found: 4 }));
    check("0000000031", Err(E::CheckDigit { expected: 7, found: 1 }));
    check("000000013", Err(E::Length { found: 9 }));
    check("00000000l3", Err(E::NonDigit { position: 9 }));
    check("", Err(E::Length { found: 0 }));
}

#[test]
fn coupon_codes() {
    #[track_caller]
    fn check(input: &str, expected: Result<&str, CouponCodeError>) {
        let parsed = CouponCode::parse(input);
        assert_eq!(parsed.map(|code| code.to_string()), expected.map(str::to_owned), "{input:?}");
    }
    use CouponCodeError as E;
    check("111310160000000013", Ok("111310160000000013"));
    check(" 121410031234567894\r\n", Ok("121410031234567894"));
    check("019999979999999990", Ok("019999979999999990")); // Unknown municipality: still a code.
    check("101310160000000013", Err(E::DoseRound { found: 0 }));
    check("111310170000000013", Err(E::MunicipalityCheckDigit { expected: 6, found: 7 }));
    check("111310160000000014", Err(E::NumberCheckDigit { expected: 3, found: 4 }));
    // The adjacent transposition 13 -> 31 is caught.
    check("111310160000000031", Err(E::NumberCheckDigit { expected: 7, found: 1 }));
    check("11131016000000001", Err(E::Length { found: 17 }));
    check("1113101600000000133", Err(E::Length { found: 19 }));
    check("1113101600000000１3", Err(E::NonDigit { position: 17 }));
    check("11-310160000000013", Err(E::NonDigit { position: 3 }));
    check("", Err(E::Length { found: 0 }));

    let code = CouponCode::parse("121410031234567894").unwrap();
    assert_eq!(code.ticket_kind, 1);
    assert_eq!(code.dose_round, 2);
    assert_eq!(code.municipality.as_str(), "141003");
    assert_eq!(code.number.serial(), 123_456_789);
    assert_eq!(serde_json::to_string(&code).unwrap(), "\"121410031234567894\"");
    assert_eq!(serde_json::from_str::<CouponCode>("\"121410031234567894\"").unwrap(), code);
    assert_eq!(
        E::NumberCheckDigit { expected: 3, found: 4 }.message_ja(),
        "券番号のチェックディジットが一致しません（18桁目）。読み取りか入力の誤りです"
    );
}

// ---------------------------------------------------------------------------------------
// Scanned coupons and the signed QR text
// ---------------------------------------------------------------------------------------

/// A signed coupon for the test key.
fn signed(code: &str, generation: u8) -> SignedCoupon {
    SignedCoupon::sign(CouponCode::parse(code).unwrap(), generation, &test_key())
}

/// `text` with the 20 digits of signature chunk `chunk` (1-based) replaced.
fn with_chunk(text: &str, chunk: usize, digits: &str) -> String {
    let start = 20 + (chunk - 1) * 20;
    format!("{}{digits}{}", &text[..start], &text[start + 20..])
}

#[test]
fn scanned_coupons() {
    #[track_caller]
    fn check(input: &str, expected: Result<ScannedCoupon, CouponScanError>) {
        assert_eq!(parse_scanned_coupon(input), expected, "{input:?}");
    }
    use CouponScanError as E;
    let legacy = ScannedCoupon::Legacy(CouponCode::parse("111310160000000013").unwrap());
    check("111310160000000013", Ok(legacy));
    check("111310160000000013\r\n", Ok(legacy));
    check("\t 111310160000000013 ", Ok(legacy));
    check("１１１３１０１６００００００００１３", Ok(legacy)); // IME left on: full-width digits.
    check("　111310160000000013　", Ok(legacy)); // Ideographic spaces.
    check("", Err(E::Length { found: 0 }));
    check(" \r\n", Err(E::Length { found: 0 }));
    check("11131016000000001", Err(E::Length { found: 17 }));
    check("1113101600000000130", Err(E::Length { found: 19 }));
    check("11131016000000001x", Err(E::NonDigit { position: 18, character: 'x' }));
    check("11131016 000000013", Err(E::NonDigit { position: 9, character: ' ' }));
    check(
        "111310170000000013",
        Err(E::Code(CouponCodeError::MunicipalityCheckDigit { expected: 6, found: 7 })),
    );
    check("101310160000000013", Err(E::Code(CouponCodeError::DoseRound { found: 0 })));

    let coupon = signed("111310160000000013", 3);
    let text = coupon.to_qr_text();
    check(&text, Ok(ScannedCoupon::Signed(coupon)));
    check(&format!("{text}\r\n"), Ok(ScannedCoupon::Signed(coupon)));
    check(&text[..179], Err(E::Length { found: 179 }));
    check(&format!("{text}0"), Err(E::Length { found: 181 }));
    check(&format!("{}:{}", &text[..99], &text[100..]), Err(E::NonDigit { position: 100, character: ':' }));
    check(
        &with_chunk(&text, 1, "99999999999999999999"),
        Err(E::SignatureOutOfRange { chunk: 1, position: 21 }),
    );
    check(
        &with_chunk(&text, 8, "18446744073709551616"),
        Err(E::SignatureOutOfRange { chunk: 8, position: 161 }),
    );
    // The largest 20-digit chunk that fits a u64 parses (and then fails to verify).
    let max_chunk = with_chunk(&text, 8, "18446744073709551615");
    let Ok(ScannedCoupon::Signed(altered)) = parse_scanned_coupon(&max_chunk) else {
        panic!("u64::MAX is a valid chunk");
    };
    assert_eq!(altered.verify(test_key().public_key().as_ref()), Err(BadSignature));
    assert_eq!(
        E::Length { found: 17 }.to_string(),
        "read 17 characters; a coupon is 18 digits (printed number) or 180 digits (signed QR code)"
    );
}

#[test]
fn signed_coupons_verify_only_under_their_key() {
    let coupon = signed("121410031234567894", 0);
    let text = coupon.to_qr_text();
    assert_eq!(text.len(), QR_TEXT_LEN);
    assert!(text.bytes().all(|byte| byte.is_ascii_digit()));
    assert!(text.starts_with("12141003123456789400"));
    assert_eq!(coupon.verify(test_key().public_key().as_ref()), Ok(()));
    let other_key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    assert_eq!(coupon.verify(other_key.public_key().as_ref()), Err(BadSignature));
    assert_eq!(coupon.verify(&[0; 31]), Err(BadSignature));
    // The generation is signed: the same signature does not cover another generation.
    let regenerated = SignedCoupon { generation: 1, ..coupon };
    assert_eq!(regenerated.verify(test_key().public_key().as_ref()), Err(BadSignature));
}

#[test]
fn a_node_checks_its_own_coupons_by_signing_again_and_verifies_the_others() {
    let own = test_key();
    let other = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let check = OwnKeyCheck::new(&own);
    let mine = signed("121410031234567894", 3);
    assert!(check.verifies(&mine, own.public_key().as_ref()));
    assert!(!check.verifies(&SignedCoupon { generation: 4, ..mine }, own.public_key().as_ref()));
    // Another municipality's coupon is verified under its key, as Ed25519Check does.
    let theirs = SignedCoupon::sign(mine.code, 3, &other);
    assert!(check.verifies(&theirs, other.public_key().as_ref()));
    assert!(!check.verifies(&theirs, own.public_key().as_ref()), "signed by another key");
    assert!(!check.verifies(&mine, other.public_key().as_ref()));
    assert!(!check.verifies(&mine, &[0; 31]));
}

/// A check that counts the coupons handed on to it, to see which ones the printed digest
/// answered by itself.
struct Counting<'a>(&'a std::cell::Cell<u32>, OwnKeyCheck<'a>);

impl SignatureCheck for Counting<'_> {
    fn verifies(&self, coupon: &SignedCoupon, public_key: &[u8]) -> bool {
        self.0.set(self.0.get() + 1);
        self.1.verifies(coupon, public_key)
    }
}

#[test]
fn a_printed_coupon_is_checked_against_its_digest_and_anything_else_is_handed_on() {
    let own = test_key();
    let public = own.public_key().as_ref().to_vec();
    let other = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let mine = signed("121410031234567894", 3);
    let digest = printed_digest(&mine);
    let printed = Some(digest);
    let handed_on = std::cell::Cell::new(0);
    let check = |printed| PrintedCheck::new(&public, printed, Counting(&handed_on, OwnKeyCheck::new(&own)));
    // The coupon as printed: answered by the digest alone.
    assert!(check(printed).verifies(&mine, &public));
    assert_eq!(handed_on.get(), 0);
    // No digest kept (printed before digests were, or not printed by this node): signed again.
    assert!(check(None).verifies(&mine, &public));
    assert_eq!(handed_on.get(), 1);
    // A forged signature, or the printed signature carried to another generation or another
    // coupon, does not match the digest (even one looked up under the wrong key), and the
    // check behind it refuses it.
    let forged = SignedCoupon { signature: [9; 64], ..mine };
    let elsewhere = SignedCoupon { code: CouponCode::parse("111310160000000013").unwrap(), ..mine };
    for wrong in [forged, SignedCoupon { generation: 4, ..mine }, elsewhere] {
        assert!(!check(printed).verifies(&wrong, &public), "{wrong:?}");
    }
    assert_eq!(handed_on.get(), 4);
    // Another key's signature on the same coupon does not match what this node printed; a
    // coupon checked under another municipality's key is always handed on.
    let theirs = SignedCoupon::sign(mine.code, 3, &other);
    assert!(!check(printed).verifies(&theirs, &public), "another key's signature accepted");
    assert!(check(printed).verifies(&theirs, other.public_key().as_ref()));
    assert!(!check(printed).verifies(&mine, other.public_key().as_ref()));
    assert_eq!(handed_on.get(), 7);
    // Any one byte of the signature changed changes the digest.
    for i in 0..64 {
        let mut altered = mine;
        altered.signature[i] ^= 1;
        assert_ne!(printed_digest(&altered), digest, "byte {i}");
    }
}

#[test]
fn generations_above_99_cannot_be_signed() {
    let code = CouponCode::parse("111310160000000013").unwrap();
    let key = test_key();
    assert!(SignedCoupon::try_sign(code, MAX_GENERATION, &key).is_ok());
    assert_eq!(SignedCoupon::try_sign(code, 100, &key), Err(GenerationTooLarge { generation: 100 }));
    let panicked = std::panic::catch_unwind(|| SignedCoupon::sign(code, 100, &test_key()));
    assert!(panicked.is_err(), "sign documents a panic above MAX_GENERATION");
}

/// The test vectors published in `docs/coupon-qr.md`, kept in a file so that the document,
/// the file and the code cannot drift apart. The file gives the inputs (seed, code,
/// generation); this test derives every other line and compares the whole file. Run with
/// `UPDATE_EXPECT=1` to rewrite the derived lines after a deliberate format change.
#[test]
fn coupon_qr_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/coupon-qr-vectors.txt");
    let current = std::fs::read_to_string(path).unwrap();
    let mut expected = String::new();
    let mut inputs: Vec<(Vec<u8>, String, u8)> = Vec::new();
    let mut seed = None;
    let mut code = None;
    for line in current.lines() {
        if line.starts_with('#') {
            expected.push_str(line);
            expected.push('\n');
            continue;
        }
        match line.split_once(": ") {
            Some(("seed", hex)) => seed = Some(from_hex(hex)),
            Some(("code", digits)) => code = Some(digits.to_owned()),
            Some(("generation", number)) => {
                let (Some(seed), Some(code)) = (seed.take(), code.take()) else {
                    panic!("a vector needs seed and code before generation");
                };
                inputs.push((seed, code, number.parse().unwrap()));
            }
            _ => {}
        }
    }
    assert!(inputs.len() >= 3, "the vectors file lists at least three vectors");
    for (seed, code, generation) in &inputs {
        expected.push_str(&render_vector(seed, code, *generation));
    }
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(path, &expected).unwrap();
    } else {
        assert_eq!(current, expected, "vectors file is stale; rerun with UPDATE_EXPECT=1");
    }
    // And every vector's QR text decodes and verifies.
    for (seed, code, generation) in &inputs {
        let key = Ed25519KeyPair::from_seed_unchecked(seed).unwrap();
        let coupon = SignedCoupon::sign(CouponCode::parse(code).unwrap(), *generation, &key);
        let Ok(ScannedCoupon::Signed(scanned)) = parse_scanned_coupon(&coupon.to_qr_text()) else {
            panic!("vector {code} does not decode");
        };
        assert_eq!(scanned.verify(key.public_key().as_ref()), Ok(()));
    }
}

/// One block of the vectors file, derived from its inputs.
fn render_vector(seed: &[u8], code: &str, generation: u8) -> String {
    let key = Ed25519KeyPair::from_seed_unchecked(seed).unwrap();
    let parsed = CouponCode::parse(code).unwrap();
    let coupon = SignedCoupon::sign(parsed, generation, &key);
    format!(
        "\nseed: {}\npublic_key: {}\ncode: {code}\ngeneration: {generation}\n\
         message: {}\nsignature: {}\nqr_text: {}\n",
        to_hex(seed),
        to_hex(key.public_key().as_ref()),
        to_hex(&SignedCoupon::signed_message(&parsed, generation)),
        to_hex(&coupon.signature),
        coupon.to_qr_text(),
    )
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|index| u8::from_str_radix(&hex[index..index + 2], 16).unwrap()).collect()
}

// ---------------------------------------------------------------------------------------
// GS1 vial barcodes
// ---------------------------------------------------------------------------------------

/// The fields of a vial barcode, for tables.
fn vial(gtin: &str, expiry: Date, lot: &str, other: &[(&str, &str)]) -> VialBarcode {
    VialBarcode {
        gtin: Gtin::parse(gtin).unwrap(),
        expiry,
        lot: lot.to_owned(),
        other: other.iter().map(|(ai, data)| ((*ai).to_owned(), (*data).to_owned())).collect(),
    }
}

#[test]
fn vial_barcodes_accepted() {
    #[track_caller]
    fn check(input: &str, expected: VialBarcode) {
        assert_eq!(parse_vial_barcode(input), Ok(expected), "{input:?}");
    }
    let plain = vial("09506000134352", date!(2027 - 12 - 31), "AB1234", &[]);
    check("(01)09506000134352(17)271231(10)AB1234", plain.clone());
    check("(01)09506000134352 (17)271231  (10)AB1234\r\n", plain.clone());
    check("(17)271231(10)AB1234(01)09506000134352", plain.clone());
    check("]d201095060001343521727123110AB1234", plain.clone());
    check("]C101095060001343521727123110AB1234", plain.clone());
    check("]Q301095060001343521727123110AB1234", plain.clone());
    check("]e001095060001343521727123110AB1234", plain.clone());
    check("01095060001343521727123110AB1234", plain.clone());
    check(&format!("{GS}0109506000134352{GS}17271231{GS}10AB1234{GS}"), plain.clone());
    check(&format!("]d210AB1234{GS}010950600013435217271231"), plain.clone());
    check(
        &format!("]d20109506000134352112601151727123110AB1234{GS}21SN-001"),
        vial("09506000134352", date!(2027 - 12 - 31), "AB1234", &[("11", "260115"), ("21", "SN-001")]),
    );
    // Day 00 is the last day of the month, leap years included.
    check("(01)09506000134352(17)270200(10)X", vial("09506000134352", date!(2027 - 02 - 28), "X", &[]));
    check("(01)09506000134352(17)280200(10)X", vial("09506000134352", date!(2028 - 02 - 29), "X", &[]));
    check("(01)09506000134352(17)991100(10)X", vial("09506000134352", date!(2099 - 11 - 30), "X", &[]));
    // A lot may contain parentheses, as long as they do not look like an AI.
    check(
        "(01)09506000134352(17)271231(10)A(B)1",
        vial("09506000134352", date!(2027 - 12 - 31), "A(B)1", &[]),
    );
    check(
        "(01)09506000134352(17)271231(10)ABCDEFGHIJ0123456789",
        vial("09506000134352", date!(2027 - 12 - 31), "ABCDEFGHIJ0123456789", &[]),
    );
    // Bracketed elements we do not interpret are kept, even unknown ones.
    check(
        "(01)09506000134352(21)12345(17)271231(10)L1(23)X",
        vial("09506000134352", date!(2027 - 12 - 31), "L1", &[("21", "12345"), ("23", "X")]),
    );
}

#[test]
fn vial_barcodes_refused() {
    #[track_caller]
    fn check(input: &str, expected: Gs1Error) {
        assert_eq!(parse_vial_barcode(input), Err(expected), "{input:?}");
    }
    fn ai(ai: &str) -> String {
        ai.to_owned()
    }
    use Gs1Error as E;
    check("", E::Empty);
    check(" \r\n", E::Empty);
    check(&"1".repeat(MAX_VIAL_TEXT_BYTES + 1), E::TooLong { length: 4097, max: 4096 });
    check("]d1010950600013435217271231", E::UnsupportedSymbology { identifier: "]d1".into() });
    check("]", E::UnsupportedSymbology { identifier: "]".into() });
    check("]d2", E::Missing { ai: "01", what: "GTIN" });
    check("(01)09506000134352(17)271231", E::Missing { ai: "10", what: "lot number" });
    check("(01)09506000134352(10)X", E::Missing { ai: "17", what: "expiry date" });
    check("(17)271231(10)X", E::Missing { ai: "01", what: "GTIN" });
    // Check digit, dates.
    check(
        "(01)09506000134353(17)271231(10)AB1234",
        E::GtinCheckDigit { position: 18, expected: 2, found: 3 },
    );
    check("]d201095060001343531727123110AB1234", E::GtinCheckDigit { position: 19, expected: 2, found: 3 });
    for bad_date in ["271332", "270230", "270000", "271300", "210229"] {
        check(
            &format!("(01)09506000134352(17){bad_date}(10)X"),
            E::BadDate { ai: ai("17"), position: 23, value: bad_date.into() },
        );
    }
    check("(01)09506000134352(17)27123A(10)X", E::NonDigit { ai: ai("17"), position: 28, character: 'A' });
    // Lots.
    check(
        "(01)09506000134352(17)271231(10)ABCDEFGHIJ01234567890",
        E::FieldLength { ai: ai("10"), position: 33, min: 1, max: 20, found: 21 },
    );
    check(
        "(01)09506000134352(17)271231(10)AB#12",
        E::BadCharacter { ai: ai("10"), position: 35, character: '#' },
    );
    check("]d2010950600013435217271231", E::Missing { ai: "10", what: "lot number" });
    check(
        "]d201095060001343521727123110ABあ",
        E::BadCharacter { ai: ai("10"), position: 32, character: 'あ' },
    );
    check(
        &format!("]d201095060001343521727123110{GS}21X"),
        E::FieldLength { ai: ai("10"), position: 30, min: 1, max: 20, found: 0 },
    );
    // Truncated and unknown AIs.
    check("]d20109506000134", E::FieldLength { ai: ai("01"), position: 6, min: 14, max: 14, found: 11 });
    check(
        "(01)0950600013435(17)271231(10)X",
        E::FieldLength { ai: ai("01"), position: 5, min: 14, max: 14, found: 13 },
    );
    check(
        "(01)09506000134352(1)271231(10)X",
        E::FieldLength { ai: ai("01"), position: 5, min: 14, max: 14, found: 23 },
    );
    check("]d201095060001343521427123", E::UnknownAi { ai: ai("1427"), position: 20 });
    check("]d20109506000134352AB", E::UnknownAi { ai: ai("AB"), position: 20 });
    check("]d201095060001343521", E::UnknownAi { ai: ai("1"), position: 20 });
    check("(011)09506000134352(17)271231(10)X", E::UnknownAi { ai: ai("011"), position: 2 });
    // Bracket syntax.
    check("(0a)09506000134352", E::MalformedBracket { position: 1 });
    check("(01", E::MalformedBracket { position: 1 });
    check("(01)09506000134352 xyz", E::MalformedBracket { position: 20 });
    // Duplicates.
    check(
        "(01)09506000134352(17)271231(10)A(10)B",
        E::DuplicateAi { ai: ai("10"), first_position: 30, position: 35 },
    );
    check(
        "]d201095060001343520109506000134352",
        E::DuplicateAi { ai: ai("01"), first_position: 4, position: 20 },
    );
    assert_ne!(
        parse_vial_barcode(&"0".repeat(MAX_VIAL_TEXT_BYTES)).map(|_| ()),
        Err(E::TooLong { length: 4096, max: 4096 }),
        "exactly the limit is looked at"
    );
    assert_eq!(
        E::FieldLength { ai: ai("10"), position: 33, min: 1, max: 20, found: 21 }.message_ja(),
        "ロット番号(10)（33文字目から）は1〜20文字のはずですが、21文字です"
    );
}

#[test]
fn gtins() {
    #[track_caller]
    fn check(input: &str, expected: Result<&str, GtinError>) {
        let parsed = Gtin::parse(input).map(|gtin| gtin.to_string());
        assert_eq!(parsed, expected.map(str::to_owned), "{input:?}");
    }
    check("09506000134352", Ok("09506000134352"));
    check(" 04987123456784\n", Ok("04987123456784"));
    check("04987123456782", Err(GtinError::CheckDigit { expected: 4, found: 2 }));
    check("4987123456784", Err(GtinError::Length { found: 13 }));
    check("0498712345678X", Err(GtinError::NonDigit { position: 14 }));
    let gtin = Gtin::parse("09506000134352").unwrap();
    assert_eq!(serde_json::to_string(&gtin).unwrap(), "\"09506000134352\"");
    assert!(serde_json::from_str::<Gtin>("\"09506000134353\"").is_err());
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// A coupon number's ten digit values.
fn number_values(serial: u32) -> Vec<u8> {
    values(CouponNumber::from_serial(serial).unwrap().as_str())
}

/// Whether ten digit values parse as a coupon number.
fn parses_as_number(digits: &[u8]) -> bool {
    let text: String = digits.iter().map(|digit| char::from(b'0' + digit)).collect();
    CouponNumber::parse(&text).is_ok()
}

#[test]
fn damm_catches_every_single_error_exhaustively() {
    // 3,000 serials spread over the whole range, every position, every wrong digit, and
    // every adjacent transposition of unequal digits.
    for index in 0..3_000u32 {
        let serial = index.wrapping_mul(333_331) % 1_000_000_000;
        let digits = number_values(serial);
        for position in 0..10 {
            for replacement in 0..10u8 {
                if replacement == digits[position] {
                    continue;
                }
                let mut altered = digits.clone();
                altered[position] = replacement;
                assert!(!parses_as_number(&altered), "{serial}: {altered:?}");
            }
        }
        for position in 0..9 {
            if digits[position] == digits[position + 1] {
                continue;
            }
            let mut altered = digits.clone();
            altered.swap(position, position + 1);
            assert!(!parses_as_number(&altered), "{serial}: {altered:?}");
        }
    }
}

/// Any coupon code whose municipality is a real one.
fn any_coupon_code() -> impl Strategy<Value = CouponCode> {
    (0u8..=9, 1u8..=9, 0..all_municipalities().len(), 0..=CouponNumber::MAX_SERIAL).prop_map(
        |(ticket_kind, dose_round, municipality, serial)| CouponCode {
            ticket_kind,
            dose_round,
            municipality: all_municipalities()[municipality].code,
            number: CouponNumber::from_serial(serial).unwrap(),
        },
    )
}

/// A random Date in 2000–2099 and its YYMMDD form (sometimes with day 00).
fn any_expiry() -> impl Strategy<Value = (Date, String)> {
    (2000i32..=2099, 1u8..=12, 0u8..=31).prop_map(|(year, month, day)| {
        let month = time::Month::try_from(month).unwrap();
        let last = month.length(year);
        let day_in_text = if day > last { last } else { day };
        let date_day = if day_in_text == 0 { last } else { day_in_text };
        let date = Date::from_calendar_date(year, month, date_day).unwrap();
        (date, format!("{:02}{:02}{:02}", year - 2000, u8::from(month), day_in_text))
    })
}

/// Whether `lot` contains something the bracketed form would read as an AI, like "(21)".
fn looks_like_bracketed_ai(lot: &str) -> bool {
    lot.char_indices().any(|(index, character)| {
        if character != '(' {
            return false;
        }
        let rest = &lot[index + 1..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        (2..=4).contains(&digits) && rest[digits..].starts_with(')')
    })
}

/// Strings that stress the decoders: mostly near-valid inputs with random edits, plus
/// arbitrary unicode and control characters.
fn hostile_text() -> impl Strategy<Value = String> {
    let interesting = prop_oneof![
        any::<char>(),
        proptest::char::range('0', '9'),
        proptest::char::range('０', '９'),
        Just('\u{1d}'),
        Just('('),
        Just(')'),
        Just(']'),
        Just('\u{0}'),
        Just('\r'),
        Just('\n'),
        Just('　'),
    ];
    let random = proptest::collection::vec(interesting.clone(), 0..200)
        .prop_map(|chars| chars.into_iter().collect::<String>());
    let bases = prop_oneof![
        Just(signed("111310160000000013", 3).to_qr_text()),
        Just("111310160000000013".to_owned()),
        Just("(01)09506000134352(17)271231(10)AB1234(21)X".to_owned()),
        Just(format!("]d2010950600013435217271231{GS}10AB1234{GS}21X")),
    ];
    let edited = (bases, proptest::collection::vec((any::<usize>(), interesting, 0u8..3), 1..6)).prop_map(
        |(base, edits)| {
            let mut chars: Vec<char> = base.chars().collect();
            for (at, character, kind) in edits {
                let at = at % (chars.len() + 1);
                match kind {
                    0 => chars.insert(at, character),
                    1 if at < chars.len() => {
                        chars.remove(at);
                    }
                    _ if at < chars.len() => chars[at] = character,
                    _ => chars.push(character),
                }
            }
            chars.into_iter().collect::<String>()
        },
    );
    prop_oneof![random, edited, any::<String>()]
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn damm_catches_single_substitutions(serial in 0..=CouponNumber::MAX_SERIAL, position in 0usize..10, delta in 1u8..10) {
        let mut digits = number_values(serial);
        digits[position] = (digits[position] + delta) % 10;
        prop_assert!(!parses_as_number(&digits));
    }

    #[test]
    fn damm_catches_adjacent_transpositions(serial in 0..=CouponNumber::MAX_SERIAL, position in 0usize..9) {
        let mut digits = number_values(serial);
        prop_assume!(digits[position] != digits[position + 1]);
        digits.swap(position, position + 1);
        prop_assert!(!parses_as_number(&digits));
    }

    #[test]
    fn coupon_codes_round_trip(code in any_coupon_code()) {
        prop_assert_eq!(CouponCode::parse(&code.to_string()), Ok(code));
        prop_assert_eq!(CouponNumber::parse(code.number.as_str()), Ok(code.number));
        let json = serde_json::to_string(&code).unwrap();
        prop_assert_eq!(serde_json::from_str::<CouponCode>(&json).unwrap(), code);
        prop_assert_eq!(parse_scanned_coupon(&code.to_string()), Ok(ScannedCoupon::Legacy(code)));
    }

    #[test]
    fn qr_text_round_trips_and_verifies(code in any_coupon_code(), generation in 0u8..=MAX_GENERATION) {
        let key = test_key();
        let coupon = SignedCoupon::sign(code, generation, &key);
        let text = coupon.to_qr_text();
        prop_assert_eq!(text.len(), QR_TEXT_LEN);
        let scanned = parse_scanned_coupon(&text);
        prop_assert_eq!(scanned, Ok(ScannedCoupon::Signed(coupon)));
        prop_assert_eq!(coupon.verify(key.public_key().as_ref()), Ok(()));
        prop_assert!(OwnKeyCheck::new(&key).verifies(&coupon, key.public_key().as_ref()));
    }

    #[test]
    fn tampering_with_any_digit_is_detected(
        code in any_coupon_code(),
        generation in 0u8..=MAX_GENERATION,
        position in 0usize..QR_TEXT_LEN,
        delta in 1u8..10,
    ) {
        let key = test_key();
        let mut text = SignedCoupon::sign(code, generation, &key).to_qr_text().into_bytes();
        text[position] = b'0' + (text[position] - b'0' + delta) % 10;
        let text = String::from_utf8(text).unwrap();
        let (verified, signed_again) = match parse_scanned_coupon(&text) {
            Ok(ScannedCoupon::Signed(signed)) => (
                signed.verify(key.public_key().as_ref()).is_ok(),
                OwnKeyCheck::new(&key).verifies(&signed, key.public_key().as_ref()),
            ),
            Ok(ScannedCoupon::Legacy(_)) | Err(_) => (false, false),
        };
        prop_assert!(!verified, "tampered text verified: {}", text);
        prop_assert!(!signed_again, "tampered text accepted by signing again: {}", text);
    }

    #[test]
    fn gs1_bracketed_and_raw_forms_agree(
        gtin_body in proptest::collection::vec(0u8..10, 13),
        (expiry, expiry_text) in any_expiry(),
        lot in "[!\"%&'()*+,./0-9:;<=>?A-Z_a-z-]{1,20}",
        order in 0usize..6,
        symbology in prop_oneof![Just(""), Just("]d2"), Just("]C1"), Just("]Q3"), Just("]e0")],
    ) {
        prop_assume!(!looks_like_bracketed_ai(&lot));
        let mut gtin: String = gtin_body.iter().map(|digit| char::from(b'0' + digit)).collect();
        gtin.push(char::from(b'0' + gs1_check_digit(&gtin_body)));
        let elements = [("01", gtin.as_str()), ("17", expiry_text.as_str()), ("10", lot.as_str())];
        let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let ordered: Vec<(&str, &str)> = orders[order].iter().map(|&index| elements[index]).collect();
        let bracketed: String = ordered.iter().map(|(ai, data)| format!("({ai}){data}")).collect();
        let mut raw = symbology.to_owned();
        for (index, (ai, data)) in ordered.iter().enumerate() {
            raw.push_str(ai);
            raw.push_str(data);
            if *ai == "10" && index + 1 < ordered.len() {
                raw.push_str(GS);
            }
        }
        let expected = VialBarcode { gtin: Gtin::parse(&gtin).unwrap(), expiry, lot: lot.clone(), other: vec![] };
        prop_assert_eq!(parse_vial_barcode(&bracketed), Ok(expected.clone()), "{}", bracketed);
        prop_assert_eq!(parse_vial_barcode(&raw), Ok(expected), "{:?}", raw);
    }

    #[test]
    fn decoders_never_panic(text in hostile_text()) {
        let _ = parse_scanned_coupon(&text);
        let _ = parse_vial_barcode(&text);
        let _ = CouponCode::parse(&text);
        let _ = CouponNumber::parse(&text);
        let _ = MunicipalityCode::parse(&text);
        let _ = Gtin::parse(&text);
        let _ = my_number_is_valid(&text);
        // Messages are built from the error's fields: they must not panic either.
        if let Err(error) = parse_vial_barcode(&text) {
            let _ = (error.to_string(), error.message_ja());
        }
        if let Err(error) = parse_scanned_coupon(&text) {
            let _ = (error.to_string(), error.message_ja());
        }
    }
}
