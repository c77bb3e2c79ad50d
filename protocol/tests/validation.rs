//! Validation tests: captures, voids and amendments, the Japanese age rule, and the resident
//! document (one commit per event, replicas that merge).
//!
//! Every capture case starts from one default situation (a Yokohama resident with a valid
//! coupon for dose 1, a comirnaty-30 vial from a registered lot, today 2026-11-25) and
//! changes one thing. Each feature has one `check` helper and a table of cases, and goes
//! through the crate's public API: the scanned texts are decoded, the coupon authenticated
//! and the capture validated as the node does it, and records change only through real
//! Automerge documents.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ActorId, Automerge, ReadDoc};
use protocol::catalogue::{Catalogue, Lot, Product};
use protocol::coupon::{CouponCode, CouponNumber, SignedCoupon};
use protocol::document::{
    Correction, CorrectionKind, CouponEntry, CouponStatus, DoseEvent, DoseStatus, Identity, ResidentEvent,
    ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex, apply_event, coupon_key, new_resident_document,
    read_record,
};
use protocol::gs1::{Gtin, parse_vial_barcode};
use protocol::municipality::MunicipalityCode;
use protocol::person::PersonKeySecret;
use protocol::statistics::{
    AgeBand, Cell, SignedStatistics, Statistics, StatisticsError, daily_from_cells, event_delta, record_cells,
};
use protocol::tip::{DocTip, TipError};
use protocol::validation::{
    AmendRequest, Amendment, CaptureContext, CaptureDecision, CaptureError, CaptureInput, VoidRequest,
    age_on, authenticate_coupon, coupon_due, coupons_spent_by, decode_scans, validate_amendment,
    validate_capture, validate_void, void_plan,
};
use ring::signature::{Ed25519KeyPair, KeyPair};
use time::macros::{date, datetime};
use time::{Date, OffsetDateTime};

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

const COMIRNATY_30: &str = "04987000001014";
const COMIRNATY_10: &str = "04987000001021";
const SPIKEVAX: &str = "04987000002011";
/// Nuvaxovid: a valid GTIN in the node's shipped catalogue, but not in this one.
const NOT_IN_CATALOGUE: &str = "04987000003018";

/// Yokohama, the municipality of the fixture.
const YOKOHAMA: &str = "141003";
/// Chiyoda: a real municipality whose coupon key the fixture does not hold.
const CHIYODA: &str = "131016";
/// Kanagawa prefecture: a well-formed local-government code, but no municipality.
const KANAGAWA_PREFECTURE: &str = "140007";

const TODAY: Date = date!(2026 - 11 - 25);
const CAMPAIGN_START: Date = date!(2021 - 02 - 17);
/// The default vaccination date.
const VACCINATED_ON: Date = date!(2026 - 11 - 20);
/// When coupons were issued.
const ISSUED_AT: OffsetDateTime = datetime!(2026-10-01 09:00 +09:00);
/// The clock of every capture and write.
const NOW: OffsetDateTime = datetime!(2026-11-25 10:00 +09:00);

const VENUE: &str = "yokohama-arena";
const STAFF: &str = "staff-0042";
/// The default vial: comirnaty-30, printed expiry 2027-03-31, lot FA1234.
const VIAL: &str = "(01)04987000001014(17)270331(10)FA1234";

fn gtin(digits: &str) -> Gtin {
    Gtin::parse(digits).unwrap()
}

fn product(
    gtin_digits: &str,
    code: &str,
    name_ja: &str,
    name_en: &str,
    maker: &str,
    min_interval_days: &[u16],
    min_age_years: u8,
) -> Product {
    Product {
        gtin: gtin(gtin_digits),
        code: code.to_owned(),
        name_ja: name_ja.to_owned(),
        name_en: name_en.to_owned(),
        maker: maker.to_owned(),
        doses_in_series: 2,
        min_interval_days: min_interval_days.to_vec(),
        min_age_years,
    }
}

/// The first three products of `node/data/catalogue.toml`.
fn catalogue() -> Catalogue {
    let catalogue = Catalogue {
        products: vec![
            product(
                COMIRNATY_30,
                "comirnaty-30",
                "コミナティ筋注（12歳以上用）",
                "Comirnaty 30 µg (12 years and over)",
                "ファイザー",
                &[18, 90],
                12,
            ),
            product(
                COMIRNATY_10,
                "comirnaty-10",
                "コミナティ筋注（5〜11歳用）",
                "Comirnaty 10 µg (5 to 11 years)",
                "ファイザー",
                &[18, 90],
                5,
            ),
            product(
                SPIKEVAX,
                "spikevax",
                "スパイクバックス筋注",
                "Spikevax",
                "モデルナ・武田薬品",
                &[24, 90],
                12,
            ),
        ],
    };
    catalogue.validate().unwrap();
    catalogue
}

fn lot(number: &str, gtin_digits: &str, expiry: Date) -> Lot {
    Lot { lot: number.to_owned(), gtin: gtin(gtin_digits), expiry }
}

/// The lots the node has received.
fn lots() -> Vec<Lot> {
    vec![
        lot("FA1234", COMIRNATY_30, date!(2027 - 03 - 31)),
        lot("FB2222", COMIRNATY_30, date!(2027 - 05 - 31)),
        // Expired the day before the default vaccination date, by the maker's list; its vials
        // may still print a later date (relabelled).
        lot("FA0001", COMIRNATY_30, date!(2026 - 11 - 19)),
        lot("EW0101", COMIRNATY_10, date!(2027 - 03 - 31)),
        lot("SV5678", SPIKEVAX, date!(2027 - 06 - 30)),
    ]
}

fn municipality(code: &str) -> MunicipalityCode {
    MunicipalityCode::parse(code).unwrap()
}

/// Yokohama's coupon-signing key, from a fixed seed.
fn signing_key() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[0x14; 32]).unwrap()
}

/// A key that is nobody's coupon key.
fn forger_key() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[0x66; 32]).unwrap()
}

fn coupon_in(municipality_code: &str, ticket_kind: u8, dose_round: u8, serial: u32) -> CouponCode {
    CouponCode {
        ticket_kind,
        dose_round,
        municipality: municipality(municipality_code),
        number: CouponNumber::from_serial(serial).unwrap(),
    }
}

/// A Yokohama vaccination coupon.
fn coupon(dose_round: u8, serial: u32) -> CouponCode {
    coupon_in(YOKOHAMA, 1, dose_round, serial)
}

/// The signed QR text of a coupon generation, signed with Yokohama's key.
fn qr(code: CouponCode, generation: u8) -> String {
    SignedCoupon::sign(code, generation, &signing_key()).to_qr_text()
}

/// A vial barcode in the bracketed form; `expiry` is YYMMDD as printed.
fn vial(gtin_digits: &str, expiry: &str, lot_number: &str) -> String {
    format!("(01){gtin_digits}(17){expiry}(10){lot_number}")
}

fn coupon_entry(code: CouponCode, generation: u8) -> CouponEntry {
    CouponEntry {
        code,
        generation,
        status: CouponStatus::Valid,
        issued_at: ISSUED_AT,
        status_reason: None,
        used_by_event: None,
    }
}

fn identity() -> Identity {
    Identity {
        atena_number: "000123456".to_owned(),
        name: "山田 花子".to_owned(),
        name_kana: "ヤマダ ハナコ".to_owned(),
        birth_date: date!(1990 - 06 - 15),
        sex: Sex::Female,
        address: "神奈川県横浜市中区本町1-1".to_owned(),
        status: ResidentStatus::Active,
    }
}

/// A Yokohama resident with a valid coupon for dose 1 (serial 101, generation 0).
fn resident() -> ResidentRecord {
    let secret = PersonKeySecret::new(&[0x2a; 32]);
    let identity = identity();
    let entry = coupon_entry(coupon(1, 101), 0);
    ResidentRecord {
        schema: SCHEMA_VERSION,
        resident_id: format!("{YOKOHAMA}-0000000001"),
        municipality: municipality(YOKOHAMA),
        person_key: secret.local_person_key(municipality(YOKOHAMA), &identity.atena_number),
        identity,
        coupons: BTreeMap::from([(entry.key(), entry)]),
        doses: BTreeMap::new(),
        corrections: BTreeMap::new(),
        transfer: None,
        arrival: None,
        returns: Vec::new(),
    }
}

/// A dose of comirnaty-30 from lot FA1234 against generation 0 of `code`.
fn dose(event_id: &str, code: CouponCode, on: Date) -> DoseEvent {
    DoseEvent {
        event_id: event_id.to_owned(),
        dose_number: code.dose_round,
        coupon: code,
        coupon_generation: 0,
        vaccinated_on: on,
        product_code: "comirnaty-30".to_owned(),
        gtin: gtin(COMIRNATY_30),
        lot: "FA1234".to_owned(),
        expiry: date!(2027 - 03 - 31),
        venue: VENUE.to_owned(),
        captured_at: NOW,
        recorded_by: STAFF.to_owned(),
        status: DoseStatus::Valid,
    }
}

fn actor(name: &str) -> ActorId {
    ActorId::from(name.as_bytes())
}

#[test]
fn a_dose_given_with_a_previous_municipalitys_coupon_revokes_the_new_one_for_that_dose() {
    // Moved from Chiyoda to Yokohama: Chiyoda's dose-1 coupon came with the record
    // (transferred); Yokohama issued its own for dose 1 at acceptance, and one for dose 3
    // stands for a later round.
    let mut record = resident();
    let mut carried = coupon_entry(coupon_in("131016", 1, 1, 7), 0);
    carried.status = CouponStatus::Transferred;
    let later = coupon_entry(coupon(3, 102), 0);
    record.coupons.insert(carried.key(), carried.clone());
    record.coupons.insert(later.key(), later);
    let own = record.coupons.values().find(|c| c.code == coupon(1, 101)).unwrap().key();

    // The dose Chiyoda passed on, recorded against its coupon: Yokohama's dose-1 coupon goes.
    let passed_on = dose("ev-carried", carried.code, date!(2021 - 06 - 01));
    let spent = coupons_spent_by(&record, &passed_on);
    assert_eq!(spent.len(), 1, "{spent:?}");
    let ResidentEvent::CouponRevoked { key, reason } = &spent[0] else { panic!("{spent:?}") };
    assert_eq!(key, &own);
    assert!(reason.starts_with("1回目は千代田区の接種券で接種済み（ev-carried）"), "{reason}");
    assert!(reason.contains("dose 1 given with the coupon of 131016"), "{reason}");
    let after = applied(&applied(&record, &ResidentEvent::DoseRecorded(passed_on)), &spent[0]);
    assert_eq!(after.coupons[&own].status, CouponStatus::Revoked);
    assert!(after.coupons.values().any(|c| c.code.dose_round == 3 && c.status == CouponStatus::Valid));

    // A dose given with Yokohama's own coupon spends nothing else.
    assert!(coupons_spent_by(&resident(), &dose("ev-own", coupon(1, 101), date!(2021 - 06 - 01))).is_empty());
}

/// `record` after `event`, written to a real resident document and read back.
fn applied(record: &ResidentRecord, event: &ResidentEvent) -> ResidentRecord {
    let mut doc = new_resident_document(&actor("node-141003"), record, NOW).unwrap();
    apply_event(&mut doc, event, NOW).unwrap();
    read_record(&doc).unwrap()
}

/// Hiragana, katakana or a CJK ideograph.
fn is_japanese(character: char) -> bool {
    matches!(character, '\u{3040}'..='\u{30ff}' | '\u{4e00}'..='\u{9fff}')
}

/// Every refusal has a message for staff in Japanese, and one in English.
#[track_caller]
fn check_messages(name: &str, error: &CaptureError) {
    let ja = error.message_ja();
    assert!(ja.chars().any(is_japanese), "{name}: message_ja of {error:?} is not Japanese: {ja:?}");
    assert!(!error.to_string().is_empty(), "{name}: {error:?}");
}

/// The digits of `text` as full-width digits, as typed with the Japanese IME on.
fn full_width(text: &str) -> String {
    text.chars().map(|c| char::from_u32(u32::from(c) - u32::from('0') + u32::from('０')).unwrap()).collect()
}

/// `text` with the character at `index` (a digit) misread as another digit.
fn misread(text: &str, index: usize) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    chars[index] = if chars[index] == '7' { '1' } else { '7' };
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// Captures
// ---------------------------------------------------------------------------------------

/// Everything a capture depends on; each case changes one thing of [`Situation::new`].
struct Situation {
    record: ResidentRecord,
    coupon: String,
    vial: String,
    vaccinated_on: Date,
    venue: String,
    event_id: String,
    lots: Vec<Lot>,
    keys: BTreeMap<MunicipalityCode, Vec<u8>>,
    /// Forwarded by the municipality the resident left (see `CaptureContext`).
    accept_transferred: bool,
}

impl Situation {
    fn new() -> Self {
        Self {
            record: resident(),
            coupon: qr(coupon(1, 101), 0),
            vial: VIAL.to_owned(),
            vaccinated_on: VACCINATED_ON,
            venue: VENUE.to_owned(),
            event_id: "ev-0001".to_owned(),
            lots: lots(),
            keys: BTreeMap::from([(municipality(YOKOHAMA), signing_key().public_key().as_ref().to_vec())]),
            accept_transferred: false,
        }
    }

    /// Decodes, authenticates and validates the capture, as the node does.
    fn capture(&self) -> Result<CaptureDecision, CaptureError> {
        let scans = decode_scans(&self.coupon, &self.vial)?;
        authenticate_coupon(&scans.coupon, |code| self.keys.get(&code).cloned())?;
        let catalogue = catalogue();
        let context = CaptureContext {
            today: TODAY,
            campaign_start: CAMPAIGN_START,
            catalogue: &catalogue,
            lot: self.lots.iter().find(|lot| lot.lot == scans.vial.lot),
            accept_transferred: self.accept_transferred,
        };
        let input = CaptureInput {
            scans: &scans,
            vaccinated_on: self.vaccinated_on,
            venue: &self.venue,
            event_id: &self.event_id,
            captured_at: NOW,
            recorded_by: STAFF,
        };
        validate_capture(&input, &self.record, &context)
    }

    fn apply(&mut self, event: ResidentEvent) {
        self.record = applied(&self.record, &event);
    }

    /// Issues generation 0 of a new coupon.
    fn issue(&mut self, code: CouponCode) {
        let entry = coupon_entry(code, 0);
        self.apply(ResidentEvent::CouponIssued { entry, supersedes: None });
    }

    /// Reissues a coupon: the next generation supersedes the newest.
    fn reissue(&mut self, code: CouponCode) {
        let newest =
            self.record.coupon_generations(code.municipality, &code.number).last().copied().unwrap().clone();
        self.apply(ResidentEvent::CouponIssued {
            entry: coupon_entry(code, newest.generation + 1),
            supersedes: Some(newest.key()),
        });
    }

    fn revoke(&mut self, code: CouponCode, reason: &str) {
        self.apply(ResidentEvent::CouponRevoked { key: coupon_key(&code, 0), reason: reason.to_owned() });
    }

    fn set_status(&mut self, status: ResidentStatus) {
        let identity = Identity { status, ..self.record.identity.clone() };
        self.apply(ResidentEvent::IdentityUpdated(identity));
    }

    /// Records the default capture as the node would, then keeps the situation otherwise
    /// unchanged: the same scans again.
    fn record_default(&mut self) {
        match self.capture() {
            Ok(CaptureDecision::Record(event)) => self.apply(ResidentEvent::DoseRecorded(event)),
            other => panic!("the default capture should record, got {other:?}"),
        }
    }

    /// Gives doses 1, 2, … on these dates (coupon `coupon(n, 100 + n)`, event `ev-dose-n`).
    fn history(&mut self, dates: &[Date]) {
        for (index, on) in dates.iter().enumerate() {
            let round = u8::try_from(index + 1).unwrap();
            let code = coupon(round, 100 + u32::from(round));
            if round > 1 {
                self.issue(code);
            }
            self.apply(ResidentEvent::DoseRecorded(dose(&format!("ev-dose-{round}"), code, *on)));
        }
    }

    /// Issues the coupon for the next dose and scans its QR code.
    fn scan_next_coupon(&mut self) {
        let round = self.record.next_dose_number();
        let code = coupon(round, 100 + u32::from(round));
        self.issue(code);
        self.coupon = qr(code, 0);
    }

    /// Doses on these dates, then the next coupon is scanned.
    fn after_doses(&mut self, dates: &[Date]) {
        self.history(dates);
        self.scan_next_coupon();
    }

    fn born(&mut self, birth_date: Date) {
        let identity = Identity { birth_date, ..self.record.identity.clone() };
        self.apply(ResidentEvent::IdentityUpdated(identity));
    }
}

/// What a capture case changes in the default situation.
type Change = fn(&mut Situation);

/// Every refusal a capture can end in before anything is written.
const CAPTURE_REFUSALS: [&str; 21] = [
    "malformed_coupon",
    "malformed_vial",
    "unknown_municipality",
    "no_key_for_municipality",
    "bad_signature",
    "wrong_ticket_kind",
    "coupon_not_issued",
    "coupon_superseded",
    "coupon_revoked",
    "coupon_already_used",
    "resident_not_active",
    "dose_out_of_order",
    "interval_too_short",
    "date_in_future",
    "date_before_campaign",
    "product_unknown",
    "lot_unknown",
    "lot_expired",
    "lot_of_other_product",
    "under_minimum_age",
    "event_id_reused",
];

#[test]
fn captures() {
    /// `expected` is "record", "replay", or the refusal's code; `field` is the refusal's field.
    #[track_caller]
    fn check(name: &str, change: Change, expected: &str, field: &str) {
        let mut situation = Situation::new();
        change(&mut situation);
        let record = &situation.record;
        match situation.capture() {
            Ok(CaptureDecision::Record(event)) => {
                assert_eq!(expected, "record", "{name}: recorded {event:?}");
                assert_eq!(event.event_id, situation.event_id, "{name}");
                assert_eq!(event.vaccinated_on, situation.vaccinated_on, "{name}");
                assert_eq!(event.venue, situation.venue, "{name}");
                assert_eq!(event.status, DoseStatus::Valid, "{name}");
                assert_eq!(event.dose_number, record.next_dose_number(), "{name}");
                assert_eq!(event.dose_number, event.coupon.dose_round, "{name}");
                // Written as the node writes it: one more dose, and the coupon is used by it.
                let after = applied(record, &ResidentEvent::DoseRecorded(event.clone()));
                assert_eq!(after.doses.len(), record.doses.len() + 1, "{name}: a dose was lost");
                let coupon = &after.coupons[&coupon_key(&event.coupon, event.coupon_generation)];
                assert_eq!(coupon.status, CouponStatus::Used, "{name}");
                assert_eq!(coupon.used_by_event.as_deref(), Some(event.event_id.as_str()), "{name}");
            }
            Ok(CaptureDecision::Replay(event)) => {
                assert_eq!(expected, "replay", "{name}: replayed {event:?}");
                assert_eq!(record.doses.get(&event.event_id), Some(&event), "{name}: the original");
            }
            Err(error) => {
                assert_eq!(error.code(), expected, "{name}: refused with {error}");
                assert_eq!(error.field(), field, "{name}: the field of {error}");
                check_messages(name, &error);
            }
        }
    }

    let cases: &[(&str, &str, &str, Change)] = &[
        // Accepted scans of the coupon and the vial.
        ("signed QR of a valid coupon", "record", "", |_| {}),
        ("printed 18-digit code", "record", "", |s| s.coupon = coupon(1, 101).to_string()),
        ("full-width digits and CR LF from a keyboard wedge", "record", "", |s| {
            s.coupon = format!("{}\r\n", full_width(&coupon(1, 101).to_string()));
        }),
        ("raw GS1 DataMatrix text of the vial", "record", "", |s| {
            s.vial = format!("]d2{}{}{}", "0104987000001014", "17270331", "10FA1234");
        }),
        // Decoding.
        ("coupon text one digit short", "malformed_coupon", "coupon", |s| {
            s.coupon = coupon(1, 101).to_string()[..17].to_owned();
        }),
        ("coupon number with a misread digit", "malformed_coupon", "coupon", |s| {
            s.coupon = misread(&coupon(1, 101).to_string(), 16);
        }),
        ("vial barcode without a lot", "malformed_vial", "vial", |s| {
            s.vial = "(01)04987000001014(17)270331".to_owned();
        }),
        ("vial GTIN with a wrong check digit", "malformed_vial", "vial", |s| {
            s.vial = vial("04987000001015", "270331", "FA1234");
        }),
        // Authentication.
        ("code of a prefecture, not a municipality", "unknown_municipality", "coupon", |s| {
            s.coupon = coupon_in(KANAGAWA_PREFECTURE, 1, 1, 101).to_string();
        }),
        ("signed QR of a municipality whose key we lack", "no_key_for_municipality", "coupon", |s| {
            let code = coupon_in(CHIYODA, 1, 1, 101);
            s.coupon = SignedCoupon::sign(code, 0, &forger_key()).to_qr_text();
        }),
        ("signed QR signed with another key", "bad_signature", "coupon", |s| {
            s.coupon = SignedCoupon::sign(coupon(1, 101), 0, &forger_key()).to_qr_text();
        }),
        ("signed QR with its generation digits altered", "bad_signature", "coupon", |s| {
            let text = qr(coupon(1, 101), 0);
            s.coupon = format!("{}01{}", &text[..18], &text[20..]);
        }),
        ("ticket kind 2", "wrong_ticket_kind", "coupon", |s| {
            s.coupon = coupon_in(YOKOHAMA, 2, 1, 101).to_string();
        }),
        // The coupon against the resident's record.
        ("a number never issued to the resident", "coupon_not_issued", "coupon", |s| {
            s.coupon = coupon(1, 202).to_string();
        }),
        ("the issued number with another dose round", "coupon_not_issued", "coupon", |s| {
            s.coupon = coupon(2, 101).to_string();
        }),
        ("a generation never issued", "coupon_not_issued", "coupon", |s| {
            s.coupon = qr(coupon(1, 101), 3);
        }),
        ("generation 0 after a reissue as generation 1", "coupon_superseded", "coupon", |s| {
            s.reissue(coupon(1, 101));
        }),
        ("generation 1 after a reissue", "record", "", |s| {
            s.reissue(coupon(1, 101));
            s.coupon = qr(coupon(1, 101), 1);
        }),
        ("printed code after a reissue stands for the newest", "record", "", |s| {
            s.reissue(coupon(1, 101));
            s.coupon = coupon(1, 101).to_string();
        }),
        ("revoked coupon", "coupon_revoked", "coupon", |s| s.revoke(coupon(1, 101), "紛失届")),
        ("coupon used on another day", "coupon_already_used", "coupon", |s| {
            s.record_default();
            s.event_id = "ev-0002".to_owned();
            s.vaccinated_on = date!(2026 - 11 - 21);
        }),
        ("coupon used the same day at another venue", "coupon_already_used", "coupon", |s| {
            s.record_default();
            s.event_id = "ev-0002".to_owned();
            s.venue = "kohoku-clinic".to_owned();
        }),
        ("coupon used the same day with another lot", "coupon_already_used", "coupon", |s| {
            s.record_default();
            s.event_id = "ev-0002".to_owned();
            s.vial = vial(COMIRNATY_30, "270531", "FB2222");
        }),
        ("the same event id again (a retry), even with another date", "replay", "", |s| {
            s.record_default();
            s.vaccinated_on = date!(2026 - 11 - 21);
        }),
        ("the same capture again without the event id", "replay", "", |s| {
            s.record_default();
            s.event_id = "ev-0002".to_owned();
        }),
        ("the same capture again from the printed code", "replay", "", |s| {
            s.record_default();
            s.event_id = "ev-0002".to_owned();
            s.coupon = coupon(1, 101).to_string();
        }),
        // The resident.
        ("deceased resident", "resident_not_active", "resident", |s| {
            s.set_status(ResidentStatus::Deceased);
        }),
        ("resident moved out", "resident_not_active", "resident", |s| {
            s.set_status(ResidentStatus::MovedOut);
        }),
        // Dose order and intervals.
        ("coupon for dose 2 before dose 1", "dose_out_of_order", "coupon", |s| {
            s.issue(coupon(2, 102));
            s.coupon = qr(coupon(2, 102), 0);
        }),
        ("a second dose-1 coupon after dose 1", "dose_out_of_order", "coupon", |s| {
            s.history(&[date!(2026 - 10 - 01)]);
            s.issue(coupon(1, 111));
            s.coupon = qr(coupon(1, 111), 0);
        }),
        ("dose 2 after 17 days (comirnaty-30 needs 18)", "interval_too_short", "vaccinated_on", |s| {
            s.after_doses(&[date!(2026 - 11 - 03)]);
        }),
        ("dose 2 after exactly 18 days", "record", "", |s| s.after_doses(&[date!(2026 - 11 - 02)])),
        ("spikevax dose 2 after 23 days (needs 24)", "interval_too_short", "vaccinated_on", |s| {
            s.after_doses(&[date!(2026 - 10 - 28)]);
            s.vial = vial(SPIKEVAX, "270630", "SV5678");
        }),
        ("spikevax dose 2 after exactly 24 days", "record", "", |s| {
            s.after_doses(&[date!(2026 - 10 - 27)]);
            s.vial = vial(SPIKEVAX, "270630", "SV5678");
        }),
        ("dose 3 after 89 days (the second interval is 90)", "interval_too_short", "vaccinated_on", |s| {
            s.after_doses(&[date!(2026 - 07 - 01), date!(2026 - 08 - 23)]);
        }),
        ("dose 3 after exactly 90 days", "record", "", |s| {
            s.after_doses(&[date!(2026 - 07 - 01), date!(2026 - 08 - 22)]);
        }),
        // The date.
        ("tomorrow", "date_in_future", "vaccinated_on", |s| s.vaccinated_on = date!(2026 - 11 - 26)),
        ("today", "record", "", |s| s.vaccinated_on = TODAY),
        ("the day before the campaign", "date_before_campaign", "vaccinated_on", |s| {
            s.vaccinated_on = date!(2021 - 02 - 16);
        }),
        ("the first day of the campaign", "record", "", |s| s.vaccinated_on = CAMPAIGN_START),
        // The vial.
        ("GTIN not in the catalogue", "product_unknown", "vial", |s| {
            s.vial = vial(NOT_IN_CATALOGUE, "270331", "FA1234");
        }),
        ("lot never received", "lot_unknown", "vial", |s| s.vial = vial(COMIRNATY_30, "270331", "ZZ9999")),
        ("registered expiry passed, printed expiry ahead", "lot_expired", "vial", |s| {
            s.vial = vial(COMIRNATY_30, "270331", "FA0001");
        }),
        ("on the registered expiry day", "record", "", |s| {
            s.vial = vial(COMIRNATY_30, "270331", "FA0001");
            s.vaccinated_on = date!(2026 - 11 - 19);
        }),
        ("printed expiry passed, registered expiry ahead", "lot_expired", "vial", |s| {
            s.vial = vial(COMIRNATY_30, "261119", "FA1234");
        }),
        ("printed expiry day 00 is the month's last day", "record", "", |s| {
            s.vial = vial(COMIRNATY_30, "261100", "FA1234");
        }),
        ("spikevax lot under a comirnaty-30 GTIN", "lot_of_other_product", "vial", |s| {
            s.vial = vial(COMIRNATY_30, "270630", "SV5678");
        }),
        // Age on the vaccination date (2026-11-20).
        ("turns 12 at the end of the vaccination day", "record", "", |s| {
            s.born(date!(2014 - 11 - 21));
        }),
        ("turns 12 a day later", "under_minimum_age", "resident", |s| s.born(date!(2014 - 11 - 22))),
        ("aged 11 with the 5-to-11 product", "record", "", |s| {
            s.born(date!(2014 - 11 - 22));
            s.vial = vial(COMIRNATY_10, "270331", "EW0101");
        }),
        ("aged 4 with the 5-to-11 product", "under_minimum_age", "resident", |s| {
            s.born(date!(2021 - 11 - 22));
            s.vial = vial(COMIRNATY_10, "270331", "EW0101");
        }),
        ("the event id of an earlier dose of the same resident", "event_id_reused", "event_id", |s| {
            s.after_doses(&[date!(2026 - 11 - 01)]);
            s.event_id = "ev-dose-1".to_owned();
        }),
        (
            "the event id of a voided dose, on the coupon that void reopened",
            "event_id_reused",
            "event_id",
            |s| {
                s.history(&[date!(2026 - 11 - 01)]);
                let (correction, reopen) = validate_void(
                    &s.record,
                    &VoidRequest {
                        event_id: "ev-dose-1",
                        reason: "別人の接種券で記録",
                        actor: STAFF,
                        correction_id: "corr-1",
                        at: NOW,
                    },
                )
                .unwrap();
                s.apply(ResidentEvent::DoseVoided { correction, reopen_coupon: reopen });
                s.coupon = qr(coupon(1, 101), 0);
                s.event_id = "ev-dose-1".to_owned();
            },
        ),
    ];

    for &(name, expected, field, change) in cases {
        check(name, change, expected, field);
    }
    let covered: BTreeSet<&str> = cases.iter().map(|case| case.1).collect();
    for code in CAPTURE_REFUSALS {
        assert!(covered.contains(code), "no capture case ends in {code}");
    }
}

#[test]
fn capture_records_the_dose_as_scanned() {
    let situation = Situation::new();
    let expected = dose("ev-0001", coupon(1, 101), VACCINATED_ON);
    assert_eq!(situation.capture(), Ok(CaptureDecision::Record(expected)));

    // A reissued coupon records the generation scanned.
    let mut situation = Situation::new();
    situation.reissue(coupon(1, 101));
    situation.coupon = qr(coupon(1, 101), 1);
    let Ok(CaptureDecision::Record(event)) = situation.capture() else {
        panic!("generation 1 should record");
    };
    assert_eq!(event.coupon_generation, 1);
}

// ---------------------------------------------------------------------------------------
// Age
// ---------------------------------------------------------------------------------------

#[test]
fn ages_the_japanese_way() {
    // Under the 年齢計算ニ関スル法律 (with Civil Code art. 143) a person gains a year
    // at the end of the day before their birthday, and `age_on` counts them a year older
    // for that whole day: the age on day D is the ordinary age on D + 1.
    #[track_caller]
    fn check(birth_date: Date, on: Date, expected: u8) {
        assert_eq!(age_on(birth_date, on), expected, "born {birth_date}, age on {on}");
    }
    // Born 1 April: the day before the birthday is 31 March, so 12 already on 2026-03-31
    // (which is why April-1 children start school a year earlier).
    check(date!(2014 - 04 - 01), date!(2026 - 03 - 31), 12);
    check(date!(2014 - 04 - 01), date!(2026 - 03 - 30), 11);
    // Born 2 April: the year is gained at the end of 1 April.
    check(date!(2014 - 04 - 02), date!(2026 - 03 - 31), 11);
    check(date!(2014 - 04 - 02), date!(2026 - 04 - 01), 12);
    // Born 29 February: in a common year there is no 29 February, and the year is gained at
    // the end of 28 February (the last day of the month, art. 143). So 12 on 2025-02-27 and
    // 13 on 2025-02-28.
    check(date!(2012 - 02 - 29), date!(2025 - 02 - 27), 12);
    check(date!(2012 - 02 - 29), date!(2025 - 02 - 28), 13);
    check(date!(2012 - 02 - 29), date!(2025 - 03 - 01), 13);
    // In a leap year the day before the birthday is 28 February too.
    check(date!(2012 - 02 - 29), date!(2024 - 02 - 27), 11);
    check(date!(2012 - 02 - 29), date!(2024 - 02 - 28), 12);
    check(date!(2012 - 02 - 29), date!(2024 - 02 - 29), 12);
    // Born 1 January: the year is gained at the end of 31 December, across the year change.
    check(date!(2014 - 01 - 01), date!(2025 - 12 - 31), 12);
    check(date!(2014 - 01 - 01), date!(2025 - 12 - 30), 11);
    // The day of birth, and (never negative) a date before it.
    check(date!(2026 - 11 - 25), date!(2026 - 11 - 25), 0);
    check(date!(2026 - 11 - 25), date!(2026 - 11 - 20), 0);
    // A centenarian on the day before the 100th birthday.
    check(date!(1926 - 12 - 25), date!(2026 - 12 - 24), 100);
    check(date!(1926 - 12 - 25), date!(2026 - 12 - 23), 99);
}

// ---------------------------------------------------------------------------------------
// Corrections: void and amend
// ---------------------------------------------------------------------------------------

/// A refusal as its (code, field).
type Refusal<'a> = (&'a str, &'a str);

/// A field an amendment changes, as (field, before, after).
type FieldChange<'a> = (&'a str, &'a str, &'a str);

/// Dose 1 on 2026-10-01 (`ev-dose-1`) and dose 2 on 2026-10-25 (`ev-dose-2`, 24 days
/// later), both comirnaty-30 lot FA1234 at [`VENUE`].
fn two_doses() -> ResidentRecord {
    let mut situation = Situation::new();
    situation.history(&[date!(2026 - 10 - 01), date!(2026 - 10 - 25)]);
    situation.record
}

fn void_request<'a>(event_id: &'a str, reason: &'a str) -> VoidRequest<'a> {
    VoidRequest { event_id, reason, actor: "supervisor-7", correction_id: "corr-void-1", at: NOW }
}

#[test]
fn voids() {
    /// `expected`: the coupon to reopen, or the refusal's (code, field).
    #[track_caller]
    fn check(
        name: &str,
        record: &ResidentRecord,
        event_id: &str,
        reason: &str,
        expected: Result<Option<String>, Refusal<'_>>,
    ) {
        match validate_void(record, &void_request(event_id, reason)) {
            Ok((correction, reopen)) => {
                assert_eq!(Ok(reopen.clone()), expected, "{name}");
                assert_eq!(correction.kind, CorrectionKind::Void, "{name}");
                assert_eq!(correction.event_id, event_id, "{name}");
                assert_eq!(correction.reason, reason.trim(), "{name}");
                let status = |value: &str| BTreeMap::from([("status".to_owned(), value.to_owned())]);
                assert_eq!(correction.before, status("valid"), "{name}");
                assert_eq!(correction.after, status("voided"), "{name}");
            }
            Err(error) => {
                assert_eq!(Err((error.code(), error.field())), expected, "{name}: {error}");
                check_messages(name, &error);
            }
        }
    }

    let record = two_doses();
    let coupon_2 = coupon_key(&coupon(2, 102), 0);
    check("dose 2", &record, "ev-dose-2", "別人に記録した", Ok(Some(coupon_2)));
    // Dose 1 of two: dose 2 is numbered down and takes its place, so its coupon stays used.
    check("reason with spaces", &record, "ev-dose-1", "  未接種 \n", Ok(None));
    check("empty reason", &record, "ev-dose-2", "", Err(("reason_missing", "reason")));
    check("blank reason", &record, "ev-dose-2", " \t\n", Err(("reason_missing", "reason")));
    check("unknown event", &record, "ev-9999", "誤登録", Err(("dose_not_found", "event_id")));

    let (correction, reopen) = validate_void(&record, &void_request("ev-dose-2", "誤登録")).unwrap();
    let voided = applied(&record, &ResidentEvent::DoseVoided { correction, reopen_coupon: reopen });
    let twice = Err(("dose_already_voided", "event_id"));
    check("already voided", &voided, "ev-dose-2", "誤登録", twice);

    // A double capture merged from two terminals: the coupon is used by the other dose, so
    // voiding the duplicate reopens nothing.
    let mut situation = Situation::new();
    situation.apply(ResidentEvent::DoseRecorded(dose("ev-dup", coupon(1, 101), VACCINATED_ON)));
    situation.apply(ResidentEvent::DoseRecorded(dose("ev-kept", coupon(1, 101), VACCINATED_ON)));
    check("the duplicate of a double capture", &situation.record, "ev-dup", "二重登録", Ok(None));
}

/// One rule for whether a resident is due a coupon, used by bulk issuance and after a void.
#[test]
fn a_coupon_is_due_for_the_next_dose_when_none_is_valid_for_it() {
    let fresh = resident();
    assert_eq!(coupon_due(&fresh, TODAY, 12), None, "holds a valid dose-1 coupon");
    let mut none = fresh.clone();
    none.coupons.clear();
    assert_eq!(coupon_due(&none, TODAY, 12), Some(1));
    assert_eq!(coupon_due(&none, TODAY, 40), None, "36 years old, under a minimum of 40");
    let mut deceased = none.clone();
    deceased.identity.status = ResidentStatus::Deceased;
    assert_eq!(coupon_due(&deceased, TODAY, 12), None);
    // Two doses given, both coupons used: the third is due.
    assert_eq!(coupon_due(&two_doses(), TODAY, 12), Some(3));
    // Dose 2 voided and its coupon reopened: nothing is due.
    let record = two_doses();
    let (correction, reopen) = validate_void(&record, &void_request("ev-dose-2", "誤登録")).unwrap();
    assert!(reopen.is_some());
    let reopened = applied(&record, &ResidentEvent::DoseVoided { correction, reopen_coupon: reopen });
    assert_eq!(coupon_due(&reopened, TODAY, 12), None);
    // Dose 1 voided: dose 2 is numbered down and its coupon stays used, so dose 2 is due.
    let plan = void_plan(&record, &void_request("ev-dose-1", "誤登録")).unwrap();
    let after = plan.iter().fold(record.clone(), |r, event| applied(&r, event));
    assert_eq!(after.next_dose_number(), 2);
    assert_eq!(coupon_due(&after, TODAY, 12), Some(2));
}

#[test]
fn void_reopens_the_coupon_and_keeps_the_correction() {
    let record = two_doses();
    let request = void_request("ev-dose-2", " 別人に記録した ");
    let (correction, reopen) = validate_void(&record, &request).unwrap();
    let key = coupon_key(&coupon(2, 102), 0);
    assert_eq!(reopen.as_deref(), Some(key.as_str()));
    let event = ResidentEvent::DoseVoided { correction: correction.clone(), reopen_coupon: reopen };
    let after = applied(&record, &event);

    let mut expected = record.clone();
    expected.doses.get_mut("ev-dose-2").unwrap().status = DoseStatus::Voided;
    let reopened = expected.coupons.get_mut(&key).unwrap();
    reopened.status = CouponStatus::Valid;
    reopened.used_by_event = None;
    expected.corrections.insert("corr-void-1".to_owned(), correction.clone());
    assert_eq!(after, expected);
    assert_eq!(correction.reason, "別人に記録した");
    assert_eq!(correction.actor, "supervisor-7");
    assert_eq!(after.next_dose_number(), 2);
    assert!(after.has_coupon_for_next_dose());

    // The voided dose can be neither voided nor amended again…
    let again = validate_void(&after, &request).unwrap_err();
    assert_eq!(again.code(), "dose_already_voided");
    let amendment = Amendment { venue: Some("kohoku-clinic".to_owned()), ..Amendment::default() };
    let catalogue = catalogue();
    let amend = validate_amendment(
        &after,
        &amend_request("ev-dose-2", &amendment, "会場誤り"),
        &context(&catalogue, None),
    );
    assert_eq!(amend.unwrap_err().code(), "dose_already_voided");

    // …and the reopened coupon records dose 2 again, under a new event id.
    let situation = Situation {
        record: after,
        coupon: qr(coupon(2, 102), 0),
        event_id: "ev-redo".to_owned(),
        ..Situation::new()
    };
    let Ok(CaptureDecision::Record(redo)) = situation.capture() else {
        panic!("the reopened coupon should record");
    };
    assert_eq!((redo.dose_number, redo.event_id.as_str()), (2, "ev-redo"));
}

fn amend_request<'a>(event_id: &'a str, amendment: &'a Amendment, reason: &'a str) -> AmendRequest<'a> {
    AmendRequest {
        event_id,
        amendment,
        reason,
        actor: "supervisor-7",
        correction_id: "corr-amend-1",
        at: NOW,
    }
}

fn context<'a>(catalogue: &'a Catalogue, lot: Option<&'a Lot>) -> CaptureContext<'a> {
    CaptureContext { today: TODAY, campaign_start: CAMPAIGN_START, catalogue, lot, accept_transferred: false }
}

fn date_to(on: Date) -> Amendment {
    Amendment { vaccinated_on: Some(on), ..Amendment::default() }
}

fn venue_to(venue: &str) -> Amendment {
    Amendment { venue: Some(venue.to_owned()), ..Amendment::default() }
}

fn vial_to(text: &str) -> Amendment {
    Amendment { vial: Some(parse_vial_barcode(text).unwrap()), ..Amendment::default() }
}

#[test]
fn amendments() {
    /// `expected`: the changed fields as (field, before, after), or the refusal's
    /// (code, field).
    #[track_caller]
    fn check(
        name: &str,
        event_id: &str,
        amendment: Amendment,
        reason: &str,
        expected: Result<&[FieldChange<'_>], Refusal<'_>>,
    ) {
        let record = two_doses();
        let catalogue = catalogue();
        let lots = lots();
        // As the node does: the lot registered under a rescanned vial's lot number.
        let lot = amendment.vial.as_ref().and_then(|vial| lots.iter().find(|lot| lot.lot == vial.lot));
        let request = amend_request(event_id, &amendment, reason);
        match validate_amendment(&record, &request, &context(&catalogue, lot)) {
            Ok((amended, correction)) => {
                let Ok(changes) = expected else {
                    panic!("{name}: amended to {amended:?}, expected {expected:?}");
                };
                let before: BTreeMap<String, String> =
                    changes.iter().map(|&(field, old, _)| (field.to_owned(), old.to_owned())).collect();
                let after: BTreeMap<String, String> =
                    changes.iter().map(|&(field, _, new)| (field.to_owned(), new.to_owned())).collect();
                assert_eq!(correction.before, before, "{name}: before");
                assert_eq!(correction.after, after, "{name}: after");
                assert_eq!(correction.kind, CorrectionKind::Amend, "{name}");
                assert_eq!(correction.event_id, event_id, "{name}");
                assert_eq!(correction.reason, reason.trim(), "{name}");
                // Written to the document, the dose reads back as amended, the other dose is
                // untouched, and the correction is kept.
                let event =
                    ResidentEvent::DoseAmended { amended: amended.clone(), correction: correction.clone() };
                let after = applied(&record, &event);
                let mut expected_record = record.clone();
                expected_record.doses.insert(event_id.to_owned(), amended);
                expected_record.corrections.insert(correction.correction_id.clone(), correction);
                assert_eq!(after, expected_record, "{name}");
            }
            Err(error) => {
                assert_eq!(Err((error.code(), error.field())), expected, "{name}: {error}");
                check_messages(name, &error);
            }
        }
    }

    let reason = "接種日の記入誤り";
    check("venue", "ev-dose-2", venue_to("kohoku-clinic"), reason, Ok(&[("venue", VENUE, "kohoku-clinic")]));
    check(
        "dose 2 a day later",
        "ev-dose-2",
        date_to(date!(2026 - 10 - 26)),
        reason,
        Ok(&[("vaccinated_on", "2026-10-25", "2026-10-26")]),
    );
    check(
        "dose 1 earlier",
        "ev-dose-1",
        date_to(date!(2026 - 09 - 20)),
        reason,
        Ok(&[("vaccinated_on", "2026-10-01", "2026-09-20")]),
    );
    check(
        "dose 1 moved to exactly 18 days before dose 2",
        "ev-dose-1",
        date_to(date!(2026 - 10 - 07)),
        reason,
        Ok(&[("vaccinated_on", "2026-10-01", "2026-10-07")]),
    );
    check(
        "date and venue together",
        "ev-dose-2",
        Amendment {
            vaccinated_on: Some(date!(2026 - 10 - 27)),
            venue: Some("kohoku-clinic".to_owned()),
            vial: None,
        },
        reason,
        Ok(&[("vaccinated_on", "2026-10-25", "2026-10-27"), ("venue", VENUE, "kohoku-clinic")]),
    );
    check(
        "another lot of the same product",
        "ev-dose-2",
        vial_to(&vial(COMIRNATY_30, "270531", "FB2222")),
        "ロット番号の入力誤り",
        Ok(&[("expiry", "2027-03-31", "2027-05-31"), ("lot", "FA1234", "FB2222")]),
    );
    check(
        "a vial of another product",
        "ev-dose-2",
        vial_to(&vial(SPIKEVAX, "270630", "SV5678")),
        "製品の取り違え",
        Ok(&[
            ("expiry", "2027-03-31", "2027-06-30"),
            ("gtin", COMIRNATY_30, SPIKEVAX),
            ("lot", "FA1234", "SV5678"),
            ("product_code", "comirnaty-30", "spikevax"),
        ]),
    );
    check(
        "reason with spaces",
        "ev-dose-2",
        venue_to("kohoku-clinic"),
        " 会場誤り ",
        Ok(&[("venue", VENUE, "kohoku-clinic")]),
    );

    // Refusals.
    check("empty reason", "ev-dose-2", venue_to("kohoku-clinic"), "", Err(("reason_missing", "reason")));
    check("unknown event", "ev-9999", venue_to("kohoku-clinic"), reason, Err(("dose_not_found", "event_id")));
    let future = Err(("date_in_future", "vaccinated_on"));
    check("dose 2 to tomorrow", "ev-dose-2", date_to(date!(2026 - 11 - 26)), reason, future);
    let too_early = Err(("date_before_campaign", "vaccinated_on"));
    check("dose 1 before the campaign", "ev-dose-1", date_to(date!(2021 - 01 - 31)), reason, too_early);
    let too_short = Err(("interval_too_short", "vaccinated_on"));
    check(
        "dose 1 moved to 17 days before dose 2",
        "ev-dose-1",
        date_to(date!(2026 - 10 - 08)),
        reason,
        too_short,
    );
    check(
        "dose 2 moved to 10 days after dose 1",
        "ev-dose-2",
        date_to(date!(2026 - 10 - 11)),
        reason,
        too_short,
    );
    check("dose 1 moved after dose 2", "ev-dose-1", date_to(date!(2026 - 10 - 30)), reason, too_short);
    check(
        "dose 2 a day earlier as spikevax (23 days; spikevax needs 24)",
        "ev-dose-2",
        Amendment {
            vaccinated_on: Some(date!(2026 - 10 - 24)),
            vial: Some(parse_vial_barcode(&vial(SPIKEVAX, "270630", "SV5678")).unwrap()),
            venue: None,
        },
        reason,
        too_short,
    );
    let expired = Err(("lot_expired", "vial"));
    check(
        "rescanned vial printed as expired before the dose",
        "ev-dose-2",
        vial_to(&vial(COMIRNATY_30, "261001", "FA1234")),
        reason,
        expired,
    );
    let unknown = Err(("product_unknown", "vial"));
    check(
        "rescanned vial of a product not in the catalogue",
        "ev-dose-2",
        vial_to(&vial(NOT_IN_CATALOGUE, "270331", "FA1234")),
        reason,
        unknown,
    );
    let nothing = Err(("nothing_to_amend", "amendment"));
    check("the same venue", "ev-dose-2", venue_to(VENUE), reason, nothing);
    check("the same date", "ev-dose-2", date_to(date!(2026 - 10 - 25)), reason, nothing);
    check("the same vial", "ev-dose-2", vial_to(VIAL), reason, nothing);
    check("an empty amendment", "ev-dose-2", Amendment::default(), reason, nothing);
}

// ---------------------------------------------------------------------------------------
// Documents
// ---------------------------------------------------------------------------------------

/// Applies one event: it must add exactly one Automerge change (the project's rule, one
/// commit per logical event), named after the event, and the document must read back as
/// `expected`.
#[track_caller]
fn check_event(doc: &mut Automerge, event: &ResidentEvent, expected: &ResidentRecord) {
    let before = doc.get_changes(&[]).len();
    apply_event(doc, event, NOW).unwrap();
    let changes = doc.get_changes(&[]);
    assert_eq!(changes.len(), before + 1, "{} is one commit", event.kind());
    let last = changes.last().unwrap();
    assert_eq!(last.message(), Some(event.kind()));
    assert_eq!(last.timestamp(), NOW.unix_timestamp());
    assert_eq!(read_record(doc).unwrap(), *expected, "after {}", event.kind());
}

#[test]
fn document_reads_back_every_event() {
    let mut expected = resident();
    let mut doc = new_resident_document(&actor("node-141003"), &expected, NOW).unwrap();
    assert_eq!(doc.get_changes(&[]).len(), 1, "registration is one commit");
    assert_eq!(read_record(&doc).unwrap(), expected);

    // A coupon for dose 2.
    let coupon_2 = coupon_entry(coupon(2, 102), 0);
    expected.coupons.insert(coupon_2.key(), coupon_2.clone());
    let event = ResidentEvent::CouponIssued { entry: coupon_2.clone(), supersedes: None };
    check_event(&mut doc, &event, &expected);

    // Dose 1 uses the dose-1 coupon.
    let dose_1 = dose("ev-dose-1", coupon(1, 101), date!(2026 - 10 - 01));
    expected.doses.insert(dose_1.event_id.clone(), dose_1.clone());
    let coupon_1 = expected.coupons.get_mut(&coupon_key(&coupon(1, 101), 0)).unwrap();
    coupon_1.status = CouponStatus::Used;
    coupon_1.used_by_event = Some("ev-dose-1".to_owned());
    check_event(&mut doc, &ResidentEvent::DoseRecorded(dose_1), &expected);

    // The dose-2 coupon is reissued (lost), then the new generation revoked.
    let reissued = coupon_entry(coupon(2, 102), 1);
    expected.coupons.get_mut(&coupon_2.key()).unwrap().status = CouponStatus::Superseded;
    expected.coupons.insert(reissued.key(), reissued.clone());
    let event = ResidentEvent::CouponIssued { entry: reissued.clone(), supersedes: Some(coupon_2.key()) };
    check_event(&mut doc, &event, &expected);
    let revoked = expected.coupons.get_mut(&reissued.key()).unwrap();
    revoked.status = CouponStatus::Revoked;
    revoked.status_reason = Some("転出予定".to_owned());
    let event = ResidentEvent::CouponRevoked { key: reissued.key(), reason: "転出予定".to_owned() };
    check_event(&mut doc, &event, &expected);

    // The resident moves within the city.
    expected.identity.address = "神奈川県横浜市港北区日吉1-1".to_owned();
    check_event(&mut doc, &ResidentEvent::IdentityUpdated(expected.identity.clone()), &expected);

    // Dose 1 is amended, then voided.
    let amendment = venue_to("kohoku-clinic");
    let catalogue = catalogue();
    let request = amend_request("ev-dose-1", &amendment, "会場誤り");
    let (amended, correction) = validate_amendment(&expected, &request, &context(&catalogue, None)).unwrap();
    expected.doses.insert(amended.event_id.clone(), amended.clone());
    expected.corrections.insert(correction.correction_id.clone(), correction.clone());
    check_event(&mut doc, &ResidentEvent::DoseAmended { amended, correction }, &expected);

    let (correction, reopen) = validate_void(&expected, &void_request("ev-dose-1", "未接種")).unwrap();
    expected.doses.get_mut("ev-dose-1").unwrap().status = DoseStatus::Voided;
    let coupon_1 = expected.coupons.get_mut(&coupon_key(&coupon(1, 101), 0)).unwrap();
    coupon_1.status = CouponStatus::Valid;
    coupon_1.used_by_event = None;
    expected.corrections.insert(correction.correction_id.clone(), correction.clone());
    let event = ResidentEvent::DoseVoided { correction, reopen_coupon: reopen };
    check_event(&mut doc, &event, &expected);

    assert_eq!(doc.get_changes(&[]).len(), 8, "registration and seven events");
}

#[test]
fn replicas_merge_concurrent_doses() {
    let base = new_resident_document(&actor("node-141003"), &resident(), NOW).unwrap();
    let mut terminal_1 = base.fork().with_actor(actor("terminal-1"));
    let mut terminal_2 = base.fork().with_actor(actor("terminal-2"));

    // Offline, both terminals record a dose on the same coupon (a double capture).
    let at_arena = dose("ev-terminal-1", coupon(1, 101), VACCINATED_ON);
    let at_clinic = DoseEvent {
        venue: "kohoku-clinic".to_owned(),
        ..dose("ev-terminal-2", coupon(1, 101), date!(2026 - 11 - 21))
    };
    apply_event(&mut terminal_1, &ResidentEvent::DoseRecorded(at_arena.clone()), NOW).unwrap();
    apply_event(&mut terminal_2, &ResidentEvent::DoseRecorded(at_clinic.clone()), NOW).unwrap();

    terminal_1.merge(&mut terminal_2).unwrap();
    terminal_2.merge(&mut terminal_1).unwrap();
    assert_eq!(terminal_1.get_heads(), terminal_2.get_heads());
    let merged = read_record(&terminal_1).unwrap();
    assert_eq!(read_record(&terminal_2).unwrap(), merged);
    // Neither dose is lost: staff see both and void the wrong one.
    let doses: Vec<&DoseEvent> = merged.doses.values().collect();
    assert_eq!(doses, [&at_arena, &at_clinic]);
    let coupon = &merged.coupons[&coupon_key(&coupon(1, 101), 0)];
    assert_eq!(coupon.status, CouponStatus::Used);
    let used_by = coupon.used_by_event.as_deref().unwrap();
    assert!(["ev-terminal-1", "ev-terminal-2"].contains(&used_by), "{used_by}");

    // Merging the same changes again changes nothing.
    let heads = terminal_1.get_heads();
    let count = terminal_1.get_changes(&[]).len();
    assert_eq!(count, 3, "registration and one dose per terminal");
    assert!(terminal_1.get_changes_added(&terminal_2).is_empty());
    assert_eq!(terminal_1.merge(&mut terminal_2).unwrap(), heads);
    terminal_1.apply_changes(terminal_2.get_changes(&[])).unwrap();
    assert_eq!(terminal_1.get_heads(), heads);
    assert_eq!(terminal_1.get_changes(&[]).len(), count);
    assert_eq!(read_record(&terminal_1).unwrap(), merged);
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// Adds `cells` into `totals`, dropping counters that return to zero.
fn add_cells(totals: &mut BTreeMap<Cell, i64>, cells: Vec<(Cell, i64)>) {
    for (cell, change) in cells {
        let count = totals.entry(cell.clone()).or_default();
        *count += change;
        if *count == 0 {
            totals.remove(&cell);
        }
    }
}

#[test]
fn statistics_follow_the_record_through_captures_voids_amendments_and_moves() {
    let recorded_at = NOW;
    let mut record = resident();
    let mut totals = BTreeMap::new();
    add_cells(&mut totals, record_cells(&record));
    let mut lags = 0;
    let mut step = |record: &mut ResidentRecord, totals: &mut BTreeMap<Cell, i64>, event: ResidentEvent| {
        let delta = event_delta(record, &event, recorded_at);
        lags += delta.iter().filter(|(cell, _)| matches!(cell, Cell::Lag { .. })).count();
        add_cells(totals, delta.into_iter().filter(|(cell, _)| !matches!(cell, Cell::Lag { .. })).collect());
        *record = applied(record, &event);
        let mut expected = BTreeMap::new();
        add_cells(&mut expected, record_cells(record));
        assert_eq!(*totals, expected, "after {}", event.kind());
    };

    let first = dose("ev-1", coupon(1, 101), date!(2026 - 10 - 01));
    step(&mut record, &mut totals, ResidentEvent::DoseRecorded(first.clone()));
    // Away from home: the venue names Chiyoda.
    let entry = coupon_entry(coupon(2, 102), 0);
    step(&mut record, &mut totals, ResidentEvent::CouponIssued { entry, supersedes: None });
    let second = DoseEvent {
        venue: "131016/budokan".to_owned(),
        ..dose("ev-2", coupon(2, 102), date!(2026 - 10 - 22))
    };
    step(&mut record, &mut totals, ResidentEvent::DoseRecorded(second.clone()));
    assert!(totals.keys().any(|cell| matches!(cell, Cell::Dose { venue_municipality, .. } if venue_municipality.as_str() == "131016")));
    // An amendment moves the dose to another date; a void removes it.
    let amended = DoseEvent { vaccinated_on: date!(2026 - 10 - 23), ..second.clone() };
    let correction = |id: &str, event_id: &str| Correction {
        correction_id: id.to_owned(),
        event_id: event_id.to_owned(),
        kind: CorrectionKind::Amend,
        reason: "日付の誤り".to_owned(),
        actor: STAFF.to_owned(),
        at: NOW,
        before: BTreeMap::new(),
        after: BTreeMap::new(),
    };
    step(
        &mut record,
        &mut totals,
        ResidentEvent::DoseAmended { amended, correction: correction("c-1", "ev-2") },
    );
    let void = Correction { kind: CorrectionKind::Void, ..correction("c-2", "ev-1") };
    step(&mut record, &mut totals, ResidentEvent::DoseVoided { correction: void, reopen_coupon: None });
    // A corrected birth date moves the remaining dose to another age band; moving out
    // leaves the population but not the dose counts.
    let older = Identity { birth_date: date!(1950 - 01 - 01), ..record.identity.clone() };
    step(&mut record, &mut totals, ResidentEvent::IdentityUpdated(older));
    let moved = Identity { status: ResidentStatus::MovedOut, ..record.identity.clone() };
    step(&mut record, &mut totals, ResidentEvent::IdentityUpdated(moved));
    assert_eq!(lags, 2, "one entry-lag count per dose recorded");

    let doses: Vec<_> = totals.iter().filter(|(cell, _)| matches!(cell, Cell::Dose { .. })).collect();
    assert_eq!(doses.len(), 1, "{doses:?}");
    let (Cell::Dose { date, age_band, .. }, 1) = (doses[0].0, *doses[0].1) else { panic!("{doses:?}") };
    assert_eq!((*date, age_band.label()), (date!(2026 - 10 - 23), "70-79".to_owned()));
    assert!(!totals.keys().any(|cell| matches!(cell, Cell::Population { .. })), "moved out: not counted");

    // Every key reads back as the cell it was made from, of every kind.
    let on = date!(2026 - 10 - 23);
    let kinds = [
        Cell::Lag { date: on, bucket: protocol::statistics::LagBucket::Week },
        Cell::Rejected { date: on, reason: "interval_too_short".into() },
        Cell::Used { date: on, venue: VENUE.into(), product: "comirnaty-30".into() },
        Cell::Population { birth_date: date!(1950 - 01 - 01), sex: Sex::Female },
    ];
    for cell in totals.keys().chain(&kinds) {
        assert_eq!(Cell::parse(&cell.key()).as_ref(), Some(cell), "{}", cell.key());
    }
    assert!(totals.keys().any(|c| matches!(c, Cell::Dose { .. })));
}

#[test]
fn statistics_documents_are_signed_by_their_municipality() {
    let cells = [(
        Cell::Dose {
            date: VACCINATED_ON,
            product: "comirnaty-30".to_owned(),
            dose_number: 1,
            age_band: AgeBand::of(date!(1990 - 06 - 15), VACCINATED_ON),
            sex: Sex::Female,
            venue_municipality: municipality(YOKOHAMA),
        },
        3,
    )];
    let daily = daily_from_cells(
        municipality(YOKOHAMA),
        VACCINATED_ON,
        7,
        "2026-11-20T10:00:00Z".to_owned(),
        cells.iter().map(|(cell, count)| (cell, *count)),
    );
    assert_eq!(daily.doses.len(), 1);
    assert_eq!(daily.doses[0].age_band.label(), "30-39");
    let signed = SignedStatistics::sign(&Statistics::Daily(daily.clone()), &signing_key());
    let public = signing_key().public_key().as_ref().to_vec();
    assert_eq!(signed.open(&public), Ok(Statistics::Daily(daily)));
    assert_eq!(signed.open(forger_key().public_key().as_ref()), Err(StatisticsError::BadSignature));
    let tampered = SignedStatistics { body: signed.body.replace("\"count\":3", "\"count\":30"), ..signed };
    assert_eq!(tampered.open(&public), Err(StatisticsError::BadSignature));
}

#[test]
fn age_bands_cover_every_age_once() {
    let labels: Vec<String> = AgeBand::all().map(AgeBand::label).collect();
    assert_eq!(labels.first().map(String::as_str), Some("0-4"));
    assert_eq!(labels.last().map(String::as_str), Some("90+"));
    assert_eq!(
        AgeBand::of(date!(1961 - 11 - 21), date!(2026 - 11 - 20)).label(),
        "65-69",
        "65 the day before the birthday"
    );
    assert_eq!(AgeBand::of(date!(1961 - 11 - 22), date!(2026 - 11 - 20)).label(), "60-64");
    for label in labels {
        assert_eq!(AgeBand::try_from(label.clone()).map(AgeBand::label), Ok(label));
    }
}

// ---------------------------------------------------------------------------------------
// Relocation handoff
// ---------------------------------------------------------------------------------------

fn transfer_to(to: &str) -> protocol::document::Transfer {
    protocol::document::Transfer {
        to: municipality(to),
        handoff_id: "ho-0001".to_owned(),
        at: NOW,
        actor: "user:admin".to_owned(),
    }
}

/// Yokohama's resident with one dose, after the transfer to Chiyoda, as Yokohama seals it.
fn moved_payload() -> protocol::handoff::HandoffPayload {
    let mut situation = Situation::new();
    situation.apply(ResidentEvent::DoseRecorded(dose("ev-1", coupon(1, 101), date!(2026 - 10 - 01))));
    situation.issue(coupon(2, 102));
    situation.apply(ResidentEvent::TransferredOut(transfer_to(CHIYODA)));
    protocol::handoff::HandoffPayload {
        handoff_id: "ho-0001".to_owned(),
        from: municipality(YOKOHAMA),
        to: municipality(CHIYODA),
        person_key: situation.record.person_key.clone(),
        record: situation.record,
        sealed_at: "2026-11-25T01:00:00Z".to_owned(),
    }
}

fn x25519_public(secret: [u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes()
}

#[test]
fn a_handoff_opens_only_for_its_receiver_and_any_change_is_detected() {
    use protocol::handoff::{HandoffError, seal};
    let payload = moved_payload();
    let chiyoda_secret = [0x31; 32];
    let sealed = seal(&payload, &signing_key(), &x25519_public(chiyoda_secret), [0x77; 32]).unwrap();
    let yokohama = signing_key().public_key().as_ref().to_vec();
    assert_eq!(sealed.open(&yokohama, &chiyoda_secret).unwrap(), payload);
    // The envelope names the person only by their key.
    let json = serde_json::to_string(&sealed).unwrap();
    for secret in ["山田", "000123456", "1990-06-15", "横浜市中区本町", "0000000101", "0000001010"] {
        assert!(!json.contains(secret), "the envelope shows {secret}");
    }
    // The national node (or anyone but Chiyoda) cannot open it.
    assert_eq!(sealed.open(&yokohama, &[0x99; 32]), Err(HandoffError::Undecryptable));
    // A flipped byte, another receiver or a forged signature is refused before decrypting.
    let mut flipped = sealed.clone();
    flipped.ciphertext[10] ^= 1;
    assert_eq!(flipped.verify(&yokohama), Err(HandoffError::BadSignature(municipality(YOKOHAMA))));
    let elsewhere = protocol::handoff::SealedHandoff { to: municipality("271004"), ..sealed.clone() };
    assert!(matches!(elsewhere.open(&yokohama, &chiyoda_secret), Err(HandoffError::BadSignature(_))));
    let forger = forger_key().public_key().as_ref().to_vec();
    assert!(matches!(sealed.verify(&forger), Err(HandoffError::BadSignature(_))));
    // Re-signed by the forger over the same ciphertext under another header: the AEAD binds
    // the header, so it still does not open.
    let mut resigned =
        protocol::handoff::SealedHandoff { person_key: "pk1-other".to_owned(), ..sealed.clone() };
    let mut message = format!(
        "vrs-handoff/1\n{}\n{}\n{}\n{}\n{}\n",
        resigned.handoff_id, resigned.from, resigned.to, resigned.person_key, resigned.sealed_at
    )
    .into_bytes();
    message.extend_from_slice(&protocol::person::hex_decode(&resigned.ephemeral_key).unwrap());
    message.extend_from_slice(&resigned.ciphertext);
    resigned.signature = protocol::person::hex_lower(forger_key().sign(&message).as_ref());
    assert!(resigned.verify(&forger).is_ok(), "the forger's own signature verifies with its key");
    assert_eq!(resigned.open(&forger, &chiyoda_secret), Err(HandoffError::Undecryptable));
    // Malformed envelopes say what is wrong.
    let bad_id = protocol::handoff::SealedHandoff { handoff_id: "x".to_owned(), ..sealed.clone() };
    assert!(matches!(bad_id.verify(&yokohama), Err(HandoffError::Malformed(_))));
    let same = protocol::handoff::SealedHandoff { to: municipality(YOKOHAMA), ..sealed };
    assert!(matches!(same.verify(&yokohama), Err(HandoffError::Malformed(_))));
}

#[test]
fn a_transfer_moves_the_counts_and_leaves_a_read_only_record() {
    let payload = moved_payload();
    let before = {
        let mut record = payload.record.clone();
        record.transfer = None;
        record.identity.status = ResidentStatus::Active;
        for coupon in record.coupons.values_mut() {
            if coupon.status == CouponStatus::Transferred {
                coupon.status = CouponStatus::Valid;
                coupon.status_reason = None;
            }
        }
        record
    };
    // At Yokohama: the event's delta equals the change of the record's cells; only the
    // stock its dose used at Yokohama's venue stays.
    let delta = event_delta(&before, &ResidentEvent::TransferredOut(transfer_to(CHIYODA)), NOW);
    let mut totals = BTreeMap::new();
    add_cells(&mut totals, record_cells(&before));
    add_cells(&mut totals, delta);
    let mut expected = BTreeMap::new();
    add_cells(&mut expected, record_cells(&payload.record));
    assert_eq!(totals, expected);
    assert!(expected.keys().all(|cell| matches!(cell, Cell::Used { .. })), "{expected:?}");
    assert!(payload.record.coupons.values().all(|c| c.status != CouponStatus::Valid));
    // At Chiyoda: the same person and doses, counted there, at Yokohama's venue.
    let received =
        protocol::handoff::received_record(&payload, "131016-x".to_owned(), "C-1".to_owned(), None);
    assert_eq!(received.identity.status, ResidentStatus::Active);
    assert_eq!(received.doses.keys().collect::<Vec<_>>(), before.doses.keys().collect::<Vec<_>>());
    let doses_of = |cells: Vec<(Cell, i64)>| -> Vec<(Cell, i64)> {
        cells.into_iter().filter(|(c, _)| matches!(c, Cell::Dose { .. })).collect()
    };
    assert_eq!(
        doses_of(record_cells(&received)),
        doses_of(record_cells(&before)),
        "the national sum is unchanged"
    );
    assert!(
        !record_cells(&received).iter().any(|(c, _)| matches!(c, Cell::Used { .. })),
        "no stock used at Chiyoda"
    );
    assert!(received.doses.values().all(|d| d.venue == format!("{YOKOHAMA}/{VENUE}")));
}

#[test]
fn a_transfer_sent_back_makes_the_resident_and_their_coupons_whole_again() {
    let mut situation = Situation::new();
    situation.apply(ResidentEvent::DoseRecorded(dose("ev-1", coupon(1, 101), date!(2026 - 10 - 01))));
    situation.issue(coupon(2, 102));
    situation.issue(coupon(3, 103));
    let revoked = coupon_entry(coupon(3, 103), 0).key();
    situation.apply(ResidentEvent::CouponRevoked { key: revoked.clone(), reason: "誤発行".to_owned() });
    let before = situation.record.clone();
    situation.apply(ResidentEvent::TransferredOut(transfer_to(CHIYODA)));
    let moved = situation.record.clone();
    situation.coupon = qr(coupon(2, 102), 0);
    assert!(matches!(situation.capture(), Err(CaptureError::CouponTransferred { .. })));

    let back = protocol::document::ReturnedTransfer {
        transfer: transfer_to(CHIYODA),
        reason: protocol::handoff::ReturnReason::BirthDateDiffers,
        at: NOW,
    };
    let event = ResidentEvent::TransferReturned(back.clone());
    let delta = event_delta(&moved, &event, NOW);
    situation.apply(event.clone());
    let home = situation.record.clone();
    // The record is what it was before the move, plus the note of the return.
    assert_eq!(home.returns, vec![back]);
    assert_eq!(ResidentRecord { returns: Vec::new(), ..home.clone() }, before);
    assert_eq!(home.coupons[&revoked].status, CouponStatus::Revoked, "a revoked coupon stays revoked");
    // The counters: what the record counts now, the population and the dose included.
    let mut totals = BTreeMap::new();
    add_cells(&mut totals, record_cells(&moved));
    add_cells(&mut totals, delta);
    let mut expected = BTreeMap::new();
    add_cells(&mut expected, record_cells(&home));
    assert_eq!(totals, expected);
    assert!(expected.keys().any(|cell| matches!(cell, Cell::Population { .. })));
    assert!(expected.keys().any(|cell| matches!(cell, Cell::Dose { .. })));
    // Sent back a second time (a repeat), nothing counts twice; the coupon scans again.
    assert!(event_delta(&home, &event, NOW).is_empty());
    situation.capture().unwrap();
    // And the resident may be moved again, the return kept in the record handed on.
    let onward = protocol::document::Transfer { handoff_id: "ho-0002".into(), ..transfer_to("011002") };
    situation.apply(ResidentEvent::TransferredOut(onward));
    assert_eq!(situation.record.returns.len(), 1);
    assert_eq!(situation.record.identity.status, ResidentStatus::MovedOut);
}

#[test]
fn a_moved_residents_old_coupon_is_refused_except_when_forwarded_by_the_old_municipality() {
    let mut situation = Situation::new();
    situation.apply(ResidentEvent::TransferredOut(transfer_to(CHIYODA)));
    let refusal = situation.capture().unwrap_err();
    assert_eq!(refusal, CaptureError::CouponTransferred { to: municipality(CHIYODA) });
    assert!(refusal.message_ja().contains("千代田区（131016）"), "{}", refusal.message_ja());
    check_messages("coupon_transferred", &refusal);
    // At Chiyoda, the capture Yokohama forwards lands as the next dose.
    let payload = protocol::handoff::HandoffPayload {
        handoff_id: "ho-0002".to_owned(),
        from: municipality(YOKOHAMA),
        to: municipality(CHIYODA),
        person_key: situation.record.person_key.clone(),
        record: situation.record.clone(),
        sealed_at: "2026-11-25T01:00:00Z".to_owned(),
    };
    situation.record =
        protocol::handoff::received_record(&payload, "131016-y".to_owned(), "C-2".to_owned(), None);
    // Chiyoda numbers its coupons on its own: the coupon it issues may carry the very number
    // of Yokohama's. Both stay, each under its municipality.
    let own = coupon_in(CHIYODA, 1, 1, 101);
    assert_eq!(own.number, coupon(1, 101).number);
    situation.issue(own);
    assert_eq!(situation.record.coupons.len(), 2, "{:?}", situation.record.coupons.keys());
    assert!(
        matches!(situation.capture(), Err(CaptureError::CouponTransferred { .. })),
        "not without forwarding"
    );
    situation.accept_transferred = true;
    let Ok(CaptureDecision::Record(event)) = situation.capture() else { panic!("recorded at Chiyoda") };
    assert_eq!(event.dose_number, 1);
    assert_eq!(event.coupon.municipality, municipality(YOKOHAMA));
    situation.apply(ResidentEvent::DoseRecorded(event));
    let yokohama_coupon = &situation.record.coupons[&coupon_key(&coupon(1, 101), 0)];
    assert_eq!(yokohama_coupon.status, CouponStatus::Used);
    assert_eq!(situation.record.coupons[&coupon_key(&own, 0)].status, CouponStatus::Valid);
    // Voided at Chiyoda, the dose does not make Yokohama's coupon valid again beside
    // Chiyoda's own (found by the simulator, seed 26).
    let request = VoidRequest {
        event_id: &situation.event_id,
        reason: "別人の記録",
        actor: STAFF,
        correction_id: "co-0001",
        at: NOW,
    };
    let (correction, reopen_coupon) = validate_void(&situation.record, &request).unwrap();
    assert_eq!(reopen_coupon, None);
    situation.apply(ResidentEvent::DoseVoided { correction, reopen_coupon });
    let valid: Vec<_> =
        situation.record.coupons.values().filter(|c| c.status == CouponStatus::Valid).collect();
    assert_eq!(valid.len(), 1, "{valid:?}");
}

#[test]
fn a_history_joins_a_resident_registered_before_it_arrived() {
    let payload = moved_payload();
    // Chiyoda registered the person from its register extract: its own id and atena number,
    // no doses, no arrival.
    let mut registered = payload.record.clone();
    registered.resident_id = "131016-0000000007".to_owned();
    registered.municipality = municipality(CHIYODA);
    registered.identity.atena_number = "C-7".to_owned();
    registered.identity.status = ResidentStatus::Active;
    registered.coupons.clear();
    registered.doses.clear();
    registered.corrections.clear();
    registered.transfer = None;
    let history = protocol::handoff::received_history(&payload);
    let event = ResidentEvent::HistoryReceived(Box::new(history));
    assert_eq!(event.kind(), "history-received");
    let after = applied(&registered, &event);
    // The same doses and coupons a record created from the handoff holds, under Chiyoda's
    // id and atena number.
    let created =
        protocol::handoff::received_record(&payload, registered.resident_id.clone(), "C-7".into(), None);
    assert_eq!(after.doses, created.doses);
    assert_eq!(after.coupons, created.coupons);
    assert_eq!(after.arrival, created.arrival);
    assert_eq!(after.identity, registered.identity, "the register's identity stays");
    assert!(after.coupons.values().all(|c| after.carried(c)), "every coupon came with the record");
    assert_eq!(after.next_dose_number(), 2);
    // The counters move by the doses only: the person was counted here already.
    let mut totals = BTreeMap::new();
    add_cells(&mut totals, record_cells(&registered));
    add_cells(&mut totals, event_delta(&registered, &event, NOW));
    let mut expected = BTreeMap::new();
    add_cells(&mut expected, record_cells(&after));
    assert_eq!(totals, expected);
    let doses = |cells: &BTreeMap<Cell, i64>| cells.keys().filter(|c| matches!(c, Cell::Dose { .. })).count();
    assert_eq!(doses(&expected), 1, "{expected:?}");
}

/// Chiyoda's record of the person in `payload`, registered from its register extract before
/// the handoff arrived, holding `coupons` Chiyoda issued.
fn registered_first(payload: &protocol::handoff::HandoffPayload, coupons: &[CouponCode]) -> ResidentRecord {
    let mut registered = payload.record.clone();
    registered.resident_id = "131016-0000000007".to_owned();
    registered.municipality = municipality(CHIYODA);
    registered.identity.atena_number = "C-7".to_owned();
    registered.identity.status = ResidentStatus::Active;
    registered.coupons = coupons.iter().map(|c| (coupon_entry(*c, 0).key(), coupon_entry(*c, 0))).collect();
    registered.doses.clear();
    registered.corrections.clear();
    registered.transfer = None;
    registered
}

#[test]
fn a_join_revokes_the_coupons_for_doses_given_before_the_move() {
    use protocol::handoff::{JoinRefusal, join_history};
    let payload = moved_payload();
    // Chiyoda's bulk issuance gave the person a first-dose coupon; the history shows that dose
    // given in Yokohama.
    let chiyoda_first = coupon_in(CHIYODA, 1, 1, 7);
    let registered = registered_first(&payload, &[chiyoda_first]);
    let join = join_history(&registered, &payload, NOW).unwrap();
    assert_eq!(join.next, 2);
    assert_eq!(join.current, None, "Chiyoda holds no coupon for dose 2: the node issues one");
    let kinds: Vec<&str> = join.events.iter().map(ResidentEvent::kind).collect();
    assert_eq!(kinds, ["history-received", "coupon-revoked"]);
    let mut after = registered.clone();
    for event in &join.events {
        after = applied(&after, event);
    }
    let own = &after.coupons[&coupon_entry(chiyoda_first, 0).key()];
    assert_eq!(own.status, CouponStatus::Revoked);
    assert!(
        own.status_reason.as_deref().is_some_and(|r| r.contains("この回は接種済み") && r.contains("ho-0001"))
    );
    assert_eq!(after.next_dose_number(), 2);
    assert_eq!(after.valid_coupon_for_dose(1), None);
    assert_eq!(after.valid_coupon_for_dose(2), None, "the carried dose-2 coupon was transferred, not valid");

    // A coupon Chiyoda issued for the next dose stays and is the one to use.
    let chiyoda_second = coupon_in(CHIYODA, 1, 2, 8);
    let registered = registered_first(&payload, &[chiyoda_second]);
    let join = join_history(&registered, &payload, NOW).unwrap();
    assert_eq!(join.events.len(), 1, "nothing to revoke");
    assert_eq!(join.current.map(|c| c.code), Some(chiyoda_second));

    // What cannot join: another birth date, another arrival.
    let mut other = registered_first(&payload, &[]);
    other.identity.birth_date = date!(1990 - 06 - 16);
    assert_eq!(join_history(&other, &payload, NOW), Err(JoinRefusal::BirthDateDiffers));
    let arrived =
        protocol::handoff::received_record(&payload, "131016-0000000009".into(), "C-9".into(), None);
    assert_eq!(join_history(&arrived, &payload, NOW), Err(JoinRefusal::ArrivedByAnotherHandoff));
}

#[test]
fn a_dose_given_here_before_the_history_arrived_is_numbered_after_it() {
    use protocol::handoff::join_history;
    let payload = moved_payload();
    // Yokohama gave dose 1 on 1 October. Chiyoda, not knowing, gave "dose 1" on 1 November
    // against the first-dose coupon its bulk issuance had sent.
    let chiyoda_first = coupon_in(CHIYODA, 1, 1, 7);
    let mut registered = registered_first(&payload, &[chiyoda_first]);
    let given_here = dose("ev-c1", chiyoda_first, date!(2026 - 11 - 01));
    registered = applied(&registered, &ResidentEvent::DoseRecorded(given_here));
    assert_eq!(registered.coupons[&coupon_entry(chiyoda_first, 0).key()].status, CouponStatus::Used);
    let join = join_history(&registered, &payload, NOW).unwrap();
    assert_eq!(join.renumbered, ["ev-c1"]);
    assert_eq!(join.next, 3, "two doses given");
    assert_eq!(join.current, None);
    let kinds: Vec<&str> = join.events.iter().map(ResidentEvent::kind).collect();
    assert_eq!(kinds, ["history-received", "dose-amended"]);
    let mut after = registered.clone();
    let mut totals = BTreeMap::new();
    add_cells(&mut totals, record_cells(&registered));
    for event in &join.events {
        add_cells(&mut totals, event_delta(&after, event, NOW));
        after = applied(&after, event);
    }
    let numbers: Vec<(String, u8)> =
        after.valid_doses().iter().map(|d| (d.event_id.clone(), d.dose_number)).collect();
    assert_eq!(numbers, [("ev-1".to_owned(), 1), ("ev-c1".to_owned(), 2)]);
    let correction =
        after.corrections.values().find(|c| c.event_id == "ev-c1").expect("a correction says why");
    assert_eq!(correction.before["dose_number"], "1");
    assert_eq!(correction.after["dose_number"], "2");
    assert!(correction.reason.contains("ho-0001"), "{}", correction.reason);
    assert_eq!(after.next_dose_number(), 3);
    // The counters follow: Chiyoda's dose counts as a second dose now.
    let mut expected = BTreeMap::new();
    add_cells(&mut expected, record_cells(&after));
    assert_eq!(totals, expected);
    // Voiding that dose later does not make Chiyoda's first-dose coupon valid again: dose 1
    // was given in Yokohama.
    let request = VoidRequest {
        event_id: "ev-c1",
        reason: "別人の記録",
        actor: STAFF,
        correction_id: "co-0002",
        at: NOW,
    };
    let (correction, reopen_coupon) = validate_void(&after, &request).unwrap();
    assert_eq!(reopen_coupon, None);
    let voided = applied(&after, &ResidentEvent::DoseVoided { correction, reopen_coupon });
    assert_eq!(voided.valid_coupon_for_dose(1), None);
    assert_eq!(voided.next_dose_number(), 2);
}

#[test]
fn voiding_an_earlier_dose_numbers_the_later_ones_down() {
    use protocol::validation::void_plan;
    let record = two_doses();
    let events = void_plan(&record, &void_request("ev-dose-1", "別人に記録した")).unwrap();
    let kinds: Vec<&str> = events.iter().map(ResidentEvent::kind).collect();
    assert_eq!(kinds, ["dose-voided", "dose-amended"]);
    let mut after = record.clone();
    let mut totals = BTreeMap::new();
    add_cells(&mut totals, record_cells(&record));
    for event in &events {
        add_cells(&mut totals, event_delta(&after, event, NOW));
        after = applied(&after, event);
    }
    let numbers: Vec<(&str, u8)> =
        after.valid_doses().iter().map(|d| (d.event_id.as_str(), d.dose_number)).collect();
    assert_eq!(numbers, [("ev-dose-2", 1)]);
    assert_eq!(after.next_dose_number(), 2);
    assert_eq!(after.valid_coupon_for_dose(1), None, "dose 1 is given: its coupon stays used");
    let renumber = after.corrections.values().find(|c| c.event_id == "ev-dose-2").unwrap();
    assert_eq!(renumber.correction_id, "corr-void-1-1");
    assert!(renumber.reason.contains("2回目→1回目"), "{}", renumber.reason);
    assert_eq!(renumber.actor, "supervisor-7");
    let mut expected = BTreeMap::new();
    add_cells(&mut expected, record_cells(&after));
    assert_eq!(totals, expected, "the counters follow the new numbers");
    // Voiding the last dose changes no number and reopens its coupon, as before.
    let events = void_plan(&record, &void_request("ev-dose-2", "別人に記録した")).unwrap();
    assert_eq!(events.len(), 1);
    assert!(matches!(&events[0], ResidentEvent::DoseVoided { reopen_coupon: Some(_), .. }));
}

/// `event` applied to `doc` as one commit; returns the stored chunk.
fn commit_event(doc: &mut Automerge, event: &ResidentEvent) -> Vec<u8> {
    let heads = doc.get_heads();
    apply_event(doc, event, NOW).unwrap();
    doc.save_after(&heads)
}

#[test]
fn a_dose_built_from_a_documents_tip_is_the_change_the_loaded_document_makes() {
    let node = actor("node-141003");
    let mut record = resident();
    record.coupons.clear();
    let mut doc = new_resident_document(&node, &record, NOW).unwrap();
    let rounds = [(coupon(1, 101), date!(2021 - 06 - 01)), (coupon(2, 102), date!(2021 - 06 - 22))];
    let mut last = None;
    for (code, _) in rounds {
        let issued = ResidentEvent::CouponIssued { entry: coupon_entry(code, 0), supersedes: None };
        last = Some(commit_event(&mut doc, &issued));
    }
    let last = automerge::Change::from_bytes(last.unwrap()).unwrap();
    let mut tip = DocTip::of(&doc, &last).unwrap().unwrap();
    assert_eq!(tip.record, read_record(&doc).unwrap());
    // A document just built by one actor gives the same tip from its statistics.
    assert_eq!(DocTip::of_new(&doc, read_record(&doc).unwrap()).unwrap().as_ref(), Some(&tip));
    assert_eq!(DocTip::decode(&tip.encode()).unwrap(), tip, "storage keeps every fact");
    // Two doses in a row, each built from the tip the one before left.
    for (n, (code, on)) in rounds.into_iter().enumerate() {
        let event = dose(&format!("ev-{n}"), code, on);
        let (chunk, next) = tip.record_dose(&event, NOW).unwrap();
        let loaded_chunk = commit_event(&mut doc, &ResidentEvent::DoseRecorded(event.clone()));
        assert_eq!(chunk, loaded_chunk, "dose {n}: the same bytes as the loaded document's commit");
        assert_eq!(next.record, read_record(&doc).unwrap());
        let made = DocTip::of(&doc, &automerge::Change::from_bytes(chunk).unwrap()).unwrap();
        assert_eq!(made.as_ref(), Some(&next), "dose {n}: the tip the loaded document gives");
        assert!(matches!(next.record_dose(&event, NOW), Err(TipError::Recorded(_))));
        tip = next;
    }
    // A dose against a coupon the document does not hold is refused, not built.
    let stranger = dose("ev-x", coupon(3, 103), date!(2021 - 12 - 01));
    assert!(matches!(tip.record_dose(&stranger, NOW), Err(TipError::Missing(_))));
}

#[test]
fn a_dose_built_from_a_tip_settles_a_coupon_two_writers_put_at_once() {
    let node = actor("node-141003");
    let mut doc = new_resident_document(&node, &resident(), NOW).unwrap();
    let key = coupon_entry(coupon(1, 101), 0).key();
    // A terminal and the node write the coupon's entry concurrently; the merge holds both.
    let mut terminal = doc.fork().with_actor(actor("terminal-7"));
    let revoke = ResidentEvent::CouponRevoked { key: key.clone(), reason: "紛失".to_owned() };
    commit_event(&mut terminal, &revoke);
    let revoke_here = ResidentEvent::CouponRevoked { key: key.clone(), reason: "汚損".to_owned() };
    commit_event(&mut doc, &revoke_here);
    doc.merge(&mut terminal).unwrap();
    let coupons = match doc.get(&automerge::ROOT, "coupons").unwrap() {
        Some((_, id)) => id,
        None => panic!("no coupons map"),
    };
    assert_eq!(doc.get_all(&coupons, key.as_str()).unwrap().len(), 2);
    // Two heads: no tip.
    let heads = doc.get_heads();
    assert_eq!(heads.len(), 2);
    let last = doc.get_change_by_hash(&heads[0]).unwrap();
    assert_eq!(DocTip::of(&doc, &last).unwrap(), None);
    // One more change by the node joins them; its tip overwrites both values at once.
    let moved =
        ResidentEvent::IdentityUpdated(Identity { address: "横浜市西区".to_owned(), ..identity() });
    let chunk = commit_event(&mut doc, &moved);
    let tip = DocTip::of(&doc, &automerge::Change::from_bytes(chunk).unwrap()).unwrap().unwrap();
    assert_eq!(tip.coupon_values[&key].len(), 2);
    let event = dose("ev-1", coupon(1, 101), date!(2021 - 06 - 01));
    let (chunk, next) = tip.record_dose(&event, NOW).unwrap();
    let mut built = doc.fork();
    built.load_incremental(&chunk).unwrap();
    commit_event(&mut doc, &ResidentEvent::DoseRecorded(event));
    assert_eq!(built.get_heads(), vec![next.head.parse().unwrap()]);
    assert_eq!(read_record(&built).unwrap(), read_record(&doc).unwrap());
    assert_eq!(next.record, read_record(&built).unwrap());
    assert_eq!(built.get_all(&coupons, key.as_str()).unwrap().len(), 1);
}
