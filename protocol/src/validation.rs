//! Capture validation: may this scan become a dose event?
//!
//! Pure functions over the scanned texts, the resident's record, the catalogue and the lot.
//! The node, a terminal and the simulator all call the same functions, so a capture refused
//! offline at a venue is refused for the same reason at the municipal node. Each rule has its
//! own error variant with a stable code, the field it concerns, and messages in Japanese and
//! English.

use std::collections::BTreeMap;

use time::{Date, Duration, OffsetDateTime};

use crate::catalogue::{Catalogue, Lot, Product};
use crate::coupon::{CouponScanError, Ed25519Check, ScannedCoupon, SignatureCheck, parse_scanned_coupon};
use crate::document::{
    Correction, CorrectionKind, CouponStatus, DoseEvent, DoseStatus, ResidentEvent, ResidentRecord,
    ResidentStatus, coupon_key,
};
use crate::gs1::{Gs1Error, VialBarcode, parse_vial_barcode};
use crate::municipality::MunicipalityCode;

/// The ticket kind (券種) digit of a vaccination coupon.
pub const TICKET_KIND_VACCINATION: u8 = 1;

/// Why a capture or a correction was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// The coupon text is not a coupon.
    #[error("coupon: {0}")]
    MalformedCoupon(CouponScanError),
    /// The vial text is not a GS1 vial barcode.
    #[error("vial: {0}")]
    MalformedVial(Gs1Error),
    /// The coupon names a code that is not one of Japan's municipalities.
    #[error("coupon: municipality code {code} is not a municipality")]
    UnknownMunicipality {
        /// The code on the coupon.
        code: MunicipalityCode,
    },
    /// The coupon's municipality is real, but this node has no signing key for it.
    #[error("coupon: no coupon-signing key is known for municipality {code}")]
    NoKeyForMunicipality {
        /// The code on the coupon.
        code: MunicipalityCode,
    },
    /// The coupon's signature does not verify: forged, or mistyped.
    #[error("coupon: the signature does not match (forged or misread coupon)")]
    BadSignature,
    /// The ticket kind digit is not a vaccination coupon.
    #[error("coupon: ticket kind {kind} is not a vaccination coupon (expected 1)")]
    WrongTicketKind {
        /// The digit found.
        kind: u8,
    },
    /// No coupon with this number was issued by this node.
    #[error("coupon: {number} was not issued by this municipality")]
    CouponNotIssued {
        /// The 10-digit number.
        number: String,
    },
    /// A newer generation of this coupon exists.
    #[error("coupon: generation {generation} was superseded by generation {current} (reissued)")]
    CouponSuperseded {
        /// The generation scanned.
        generation: u8,
        /// The newest generation.
        current: u8,
    },
    /// The coupon was revoked.
    #[error("coupon: revoked ({reason})")]
    CouponRevoked {
        /// Why it was revoked.
        reason: String,
    },
    /// The resident moved to another municipality, whose coupons they now use.
    #[error("coupon: the resident moved to {} ({to}); use a coupon of the new municipality", municipality_name(*to))]
    CouponTransferred {
        /// The new municipality.
        to: MunicipalityCode,
    },
    /// The coupon already has a dose recorded against it.
    #[error("coupon: already used for dose {dose_number} on {vaccinated_on} (event {event_id})")]
    CouponAlreadyUsed {
        /// The existing event.
        event_id: String,
        /// Its dose number.
        dose_number: u8,
        /// Its date.
        vaccinated_on: Date,
    },
    /// The resident is not registered here any more.
    #[error("resident: not active here ({status})")]
    ResidentNotActive {
        /// `deceased` or `moved_out`.
        status: String,
    },
    /// The coupon's dose round is not the resident's next dose.
    #[error("coupon: is for dose {coupon_dose}, but the resident's next dose is {next_dose}")]
    DoseOutOfOrder {
        /// Dose round printed on the coupon.
        coupon_dose: u8,
        /// Dose the history says comes next.
        next_dose: u8,
    },
    /// Too soon after the previous dose.
    #[error(
        "vaccinated_on: dose {dose_number} on {vaccinated_on} is {actual_days} days after the previous dose; {product} needs at least {min_days} (earliest {earliest})"
    )]
    IntervalTooShort {
        /// The dose being recorded.
        dose_number: u8,
        /// Its date.
        vaccinated_on: Date,
        /// Days since the previous dose.
        actual_days: i64,
        /// Days required.
        min_days: u16,
        /// First allowed date.
        earliest: Date,
        /// Product code.
        product: String,
    },
    /// The vaccination date is after today.
    #[error("vaccinated_on: {date} is in the future (today is {today})")]
    DateInFuture {
        /// The date given.
        date: Date,
        /// Today at the node.
        today: Date,
    },
    /// The vaccination date is before the campaign began.
    #[error("vaccinated_on: {date} is before the campaign began on {campaign_start}")]
    DateBeforeCampaign {
        /// The date given.
        date: Date,
        /// First day of the campaign.
        campaign_start: Date,
    },
    /// The vial's GTIN is not in the catalogue.
    #[error("vial: GTIN {gtin} is not a product in the vaccine catalogue")]
    ProductUnknown {
        /// The GTIN scanned.
        gtin: String,
    },
    /// The lot is not one this node has received.
    #[error("vial: lot {lot} is not a known lot")]
    LotUnknown {
        /// The lot scanned.
        lot: String,
    },
    /// The lot had expired on the vaccination date.
    #[error("vial: lot {lot} expired on {expiry}, before the vaccination on {vaccinated_on}")]
    LotExpired {
        /// The lot.
        lot: String,
        /// Its expiry.
        expiry: Date,
        /// The vaccination date.
        vaccinated_on: Date,
    },
    /// The lot belongs to another product than the GTIN scanned.
    #[error("vial: lot {lot} is a lot of GTIN {lot_gtin}, not of the scanned GTIN {scanned_gtin}")]
    LotOfOtherProduct {
        /// The lot.
        lot: String,
        /// The lot's product.
        lot_gtin: String,
        /// The GTIN scanned.
        scanned_gtin: String,
    },
    /// The resident is younger than the product allows.
    #[error("resident: aged {age} on the vaccination date; {product} needs at least {min_age}")]
    UnderMinimumAge {
        /// Age on the vaccination date.
        age: u8,
        /// Minimum age for the product.
        min_age: u8,
        /// Product code.
        product: String,
    },
    /// A correction names a dose the resident does not have.
    #[error("event_id: the resident has no dose event {event_id}")]
    DoseNotFound {
        /// The id given.
        event_id: String,
    },
    /// The dose was already voided.
    #[error("event_id: dose event {event_id} is already voided")]
    DoseAlreadyVoided {
        /// The id given.
        event_id: String,
    },
    /// The client's event id is already used by another dose.
    #[error("event_id: {event_id} already names another dose event")]
    EventIdReused {
        /// The id given.
        event_id: String,
    },
    /// A correction without a reason.
    #[error("reason: a correction needs a reason")]
    ReasonMissing,
    /// An amendment that changes nothing.
    #[error("amendment: nothing to change")]
    NothingToAmend,
}

impl CaptureError {
    /// A stable machine-readable code (used in problem+json and statistics).
    pub fn code(&self) -> &'static str {
        use CaptureError as E;
        match self {
            E::MalformedCoupon(_) => "malformed_coupon",
            E::MalformedVial(_) => "malformed_vial",
            E::UnknownMunicipality { .. } => "unknown_municipality",
            E::NoKeyForMunicipality { .. } => "no_key_for_municipality",
            E::BadSignature => "bad_signature",
            E::WrongTicketKind { .. } => "wrong_ticket_kind",
            E::CouponNotIssued { .. } => "coupon_not_issued",
            E::CouponSuperseded { .. } => "coupon_superseded",
            E::CouponRevoked { .. } => "coupon_revoked",
            E::CouponTransferred { .. } => "coupon_transferred",
            E::CouponAlreadyUsed { .. } => "coupon_already_used",
            E::ResidentNotActive { .. } => "resident_not_active",
            E::DoseOutOfOrder { .. } => "dose_out_of_order",
            E::IntervalTooShort { .. } => "interval_too_short",
            E::DateInFuture { .. } => "date_in_future",
            E::DateBeforeCampaign { .. } => "date_before_campaign",
            E::ProductUnknown { .. } => "product_unknown",
            E::LotUnknown { .. } => "lot_unknown",
            E::LotExpired { .. } => "lot_expired",
            E::LotOfOtherProduct { .. } => "lot_of_other_product",
            E::UnderMinimumAge { .. } => "under_minimum_age",
            E::DoseNotFound { .. } => "dose_not_found",
            E::DoseAlreadyVoided { .. } => "dose_already_voided",
            E::EventIdReused { .. } => "event_id_reused",
            E::ReasonMissing => "reason_missing",
            E::NothingToAmend => "nothing_to_amend",
        }
    }

    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        use CaptureError as E;
        match self {
            E::MalformedVial(_)
            | E::ProductUnknown { .. }
            | E::LotUnknown { .. }
            | E::LotExpired { .. }
            | E::LotOfOtherProduct { .. } => "vial",
            E::IntervalTooShort { .. } | E::DateInFuture { .. } | E::DateBeforeCampaign { .. } => {
                "vaccinated_on"
            }
            E::ResidentNotActive { .. } | E::UnderMinimumAge { .. } => "resident",
            E::DoseNotFound { .. } | E::DoseAlreadyVoided { .. } | E::EventIdReused { .. } => "event_id",
            E::ReasonMissing => "reason",
            E::NothingToAmend => "amendment",
            _ => "coupon",
        }
    }

    /// Whether the same request can never succeed because of existing state (HTTP 409)
    /// rather than being wrong in itself (HTTP 422).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            CaptureError::CouponAlreadyUsed { .. }
                | CaptureError::CouponTransferred { .. }
                | CaptureError::DoseAlreadyVoided { .. }
                | CaptureError::EventIdReused { .. }
        )
    }

    /// The message for municipal staff, in Japanese.
    pub fn message_ja(&self) -> String {
        use CaptureError as E;
        match self {
            E::MalformedCoupon(e) => format!("接種券を読み取れません: {}", e.message_ja()),
            E::MalformedVial(e) => format!("ワクチンのバーコードを読み取れません: {}", e.message_ja()),
            E::UnknownMunicipality { code } => {
                format!("接種券の市区町村コード {code} は存在しない市区町村です")
            }
            E::NoKeyForMunicipality { code } => {
                format!("市区町村 {code} の接種券署名鍵が登録されていません")
            }
            E::BadSignature => "接種券の署名が一致しません（偽造または読み取り誤りの可能性）".into(),
            E::WrongTicketKind { kind } => format!("券種 {kind} は接種券ではありません（1 であるべき）"),
            E::CouponNotIssued { number } => format!("券番号 {number} はこの市区町村で発行されていません"),
            E::CouponSuperseded { generation, current } => {
                format!("この接種券（第{generation}版）は再発行により無効です。最新は第{current}版です")
            }
            E::CouponRevoked { reason } => format!("この接種券は取り消されています（理由: {reason}）"),
            E::CouponTransferred { to } => format!(
                "この方は{}（{to}）に転出しました。転出先の接種券で接種してください",
                municipality_name(*to)
            ),
            E::CouponAlreadyUsed { event_id, dose_number, vaccinated_on } => format!(
                "この接種券は {vaccinated_on} の{dose_number}回目接種で使用済みです（記録 {event_id}）"
            ),
            E::ResidentNotActive { status } => {
                let status_ja = match status.as_str() {
                    "deceased" => "死亡",
                    "moved_out" => "転出",
                    _ => status.as_str(),
                };
                format!("この住民は在住ではありません（{status_ja}）")
            }
            E::DoseOutOfOrder { coupon_dose, next_dose } => {
                format!("接種券は{coupon_dose}回目用ですが、この方の次の接種は{next_dose}回目です")
            }
            E::IntervalTooShort { dose_number, actual_days, min_days, earliest, product, .. } => {
                format!(
                    "{dose_number}回目の接種が前回から{actual_days}日後です。{product} は{min_days}日以上の間隔が必要です（{earliest} 以降）"
                )
            }
            E::DateInFuture { date, today } => format!("接種日 {date} は未来の日付です（本日 {today}）"),
            E::DateBeforeCampaign { date, campaign_start } => {
                format!("接種日 {date} は接種開始日 {campaign_start} より前です")
            }
            E::ProductUnknown { gtin } => format!("GTIN {gtin} はワクチン一覧にない製品です"),
            E::LotUnknown { lot } => format!("ロット番号 {lot} は登録されていません"),
            E::LotExpired { lot, expiry, vaccinated_on } => {
                format!("ロット {lot} は {expiry} に有効期限切れです（接種日 {vaccinated_on}）")
            }
            E::LotOfOtherProduct { lot, lot_gtin, scanned_gtin } => format!(
                "ロット {lot} は GTIN {lot_gtin} の製品のロットで、読み取った GTIN {scanned_gtin} と一致しません"
            ),
            E::UnderMinimumAge { age, min_age, product } => {
                format!("接種日時点で{age}歳です。{product} は{min_age}歳以上が対象です")
            }
            E::DoseNotFound { event_id } => format!("接種記録 {event_id} はこの住民にありません"),
            E::DoseAlreadyVoided { event_id } => format!("接種記録 {event_id} は既に取り消されています"),
            E::EventIdReused { event_id } => format!("記録ID {event_id} は別の接種記録で使われています"),
            E::ReasonMissing => "訂正には理由が必要です".into(),
            E::NothingToAmend => "変更する項目がありません".into(),
        }
    }
}

/// The two scanned texts, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedCapture {
    /// The coupon.
    pub coupon: ScannedCoupon,
    /// The vial.
    pub vial: VialBarcode,
}

/// Decodes what the scanner typed for the coupon and for the vial.
pub fn decode_scans(coupon_text: &str, vial_text: &str) -> Result<ScannedCapture, CaptureError> {
    let coupon = parse_scanned_coupon(coupon_text).map_err(CaptureError::MalformedCoupon)?;
    let vial = parse_vial_barcode(vial_text).map_err(CaptureError::MalformedVial)?;
    Ok(ScannedCapture { coupon, vial })
}

/// Checks that the coupon is one this node can trust: a real municipality, a vaccination
/// ticket, and (for a signed QR) a signature by that municipality's key.
///
/// `signing_key` returns the Ed25519 public key of a municipality, if known.
pub fn authenticate_coupon(
    coupon: &ScannedCoupon,
    signing_key: impl Fn(MunicipalityCode) -> Option<Vec<u8>>,
) -> Result<(), CaptureError> {
    authenticate_coupon_with(coupon, signing_key, &Ed25519Check)
}

/// [`authenticate_coupon`] with the signature checked by `check`.
pub fn authenticate_coupon_with(
    coupon: &ScannedCoupon,
    signing_key: impl Fn(MunicipalityCode) -> Option<Vec<u8>>,
    check: &impl SignatureCheck,
) -> Result<(), CaptureError> {
    let code = coupon.code();
    if !code.municipality.is_known() {
        return Err(CaptureError::UnknownMunicipality { code: code.municipality });
    }
    if code.ticket_kind != TICKET_KIND_VACCINATION {
        return Err(CaptureError::WrongTicketKind { kind: code.ticket_kind });
    }
    if let ScannedCoupon::Signed(signed) = coupon {
        let key = signing_key(code.municipality)
            .ok_or(CaptureError::NoKeyForMunicipality { code: code.municipality })?;
        if !check.verifies(signed, &key) {
            return Err(CaptureError::BadSignature);
        }
    }
    Ok(())
}

/// What the node knows besides the resident: the date, the campaign, products and the lot.
#[derive(Clone, Copy, Debug)]
pub struct CaptureContext<'a> {
    /// Today's date where the node is (Japan).
    pub today: Date,
    /// The first day vaccinations may be recorded for.
    pub campaign_start: Date,
    /// The vaccine catalogue.
    pub catalogue: &'a Catalogue,
    /// The lot registered under the scanned lot number, if any.
    pub lot: Option<&'a Lot>,
    /// A capture the resident's previous municipality forwarded: its coupon, transferred
    /// with the record, is accepted, and the dose takes the next number in the history.
    pub accept_transferred: bool,
}

/// A municipality's name for messages (the code when it is not in the embedded list).
pub fn municipality_name(code: MunicipalityCode) -> String {
    crate::municipality::lookup_municipality(code).map_or_else(|| code.to_string(), |m| m.name.to_owned())
}

/// The request to record a dose, decoded and authenticated.
#[derive(Clone, Debug)]
pub struct CaptureInput<'a> {
    /// The scans.
    pub scans: &'a ScannedCapture,
    /// The date of vaccination.
    pub vaccinated_on: Date,
    /// The venue id.
    pub venue: &'a str,
    /// The event id proposed by the client (terminal) or minted by the node.
    pub event_id: &'a str,
    /// When the capture was stored.
    pub captured_at: OffsetDateTime,
    /// Who captured it.
    pub recorded_by: &'a str,
}

/// The outcome of a valid capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureDecision {
    /// A new dose event to record.
    Record(DoseEvent),
    /// The same capture was already recorded: nothing to write; here is the original.
    Replay(DoseEvent),
}

/// Decides whether a decoded, authenticated capture becomes a dose event of this resident.
pub fn validate_capture(
    input: &CaptureInput<'_>,
    record: &ResidentRecord,
    context: &CaptureContext<'_>,
) -> Result<CaptureDecision, CaptureError> {
    let code = *input.scans.coupon.code();
    let generations = record.coupon_generations(code.municipality, &code.number);
    let newest = generations
        .last()
        .ok_or_else(|| CaptureError::CouponNotIssued { number: code.number.to_string() })?;
    let scanned_generation = match &input.scans.coupon {
        ScannedCoupon::Signed(signed) => signed.generation,
        // A plain 18-digit code carries no generation: it stands for the newest one.
        ScannedCoupon::Legacy(_) => newest.generation,
    };
    let entry = generations
        .iter()
        .find(|c| c.generation == scanned_generation)
        .ok_or_else(|| CaptureError::CouponNotIssued { number: code.number.to_string() })?;
    if entry.code != code {
        // Same number, other digits (dose round or kind): not the coupon we issued.
        return Err(CaptureError::CouponNotIssued { number: code.number.to_string() });
    }

    if entry.status == CouponStatus::Used {
        return replay_or_used(input, record, entry.used_by_event.as_deref());
    }
    // Not a replay of this coupon's capture: the id must not name any dose of this resident
    // (recording it would overwrite that dose, even a voided one).
    if record.doses.contains_key(input.event_id) {
        return Err(CaptureError::EventIdReused { event_id: input.event_id.to_owned() });
    }
    match entry.status {
        CouponStatus::Superseded => {
            return Err(CaptureError::CouponSuperseded {
                generation: entry.generation,
                current: newest.generation,
            });
        }
        CouponStatus::Revoked => {
            return Err(CaptureError::CouponRevoked {
                reason: entry.status_reason.clone().unwrap_or_default(),
            });
        }
        CouponStatus::Transferred if !context.accept_transferred => {
            let to = entry
                .status_reason
                .as_deref()
                .and_then(|r| r.strip_prefix("transferred:"))
                .and_then(|code| MunicipalityCode::parse(code).ok())
                .unwrap_or(record.municipality);
            return Err(CaptureError::CouponTransferred { to });
        }
        CouponStatus::Valid | CouponStatus::Used | CouponStatus::Transferred => {}
    }
    if record.identity.status != ResidentStatus::Active {
        let status = serde_json::to_value(record.identity.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(CaptureError::ResidentNotActive { status });
    }

    let vial = &input.scans.vial;
    check_date(input.vaccinated_on, context.today, context.campaign_start)?;
    let product = context
        .catalogue
        .product(&vial.gtin)
        .ok_or_else(|| CaptureError::ProductUnknown { gtin: vial.gtin.to_string() })?;
    check_lot(&vial.lot, vial, input.vaccinated_on, context.lot)?;
    check_age(record, product, input.vaccinated_on)?;

    let next_dose = record.next_dose_number();
    if code.dose_round != next_dose
        && !(context.accept_transferred && entry.status == CouponStatus::Transferred)
    {
        return Err(CaptureError::DoseOutOfOrder { coupon_dose: code.dose_round, next_dose });
    }
    check_interval(record, product, next_dose, input.vaccinated_on, None)?;

    Ok(CaptureDecision::Record(DoseEvent {
        event_id: input.event_id.to_owned(),
        dose_number: next_dose,
        coupon: code,
        coupon_generation: entry.generation,
        vaccinated_on: input.vaccinated_on,
        product_code: product.code.clone(),
        gtin: vial.gtin.clone(),
        lot: vial.lot.clone(),
        expiry: vial.expiry,
        venue: input.venue.to_owned(),
        captured_at: input.captured_at,
        recorded_by: input.recorded_by.to_owned(),
        status: DoseStatus::Valid,
    }))
}

/// What recording `dose` makes obsolete: the resident's other valid coupons for that dose or
/// an earlier one, each revoked in its own event. A dose passed on from a previous
/// municipality is recorded against its coupon, while the coupon this municipality issued
/// for the same dose when it accepted the handoff is still valid; a venue would refuse that
/// one (the dose is given), so it goes, and the next issuance gives the following dose's.
/// `record` is the record before the dose.
pub fn coupons_spent_by(record: &ResidentRecord, dose: &DoseEvent) -> Vec<ResidentEvent> {
    record
        .coupons
        .values()
        .filter(|c| c.status == CouponStatus::Valid && c.code.dose_round <= dose.dose_number)
        .filter(|c| !(c.code == dose.coupon && c.generation == dose.coupon_generation))
        .map(|c| ResidentEvent::CouponRevoked {
            key: c.key(),
            reason: format!(
                "{n}回目は{name}の接種券で接種済み（{event}） / dose {n} given with the coupon of {code} ({event})",
                n = dose.dose_number,
                name = municipality_name(dose.coupon.municipality),
                code = dose.coupon.municipality,
                event = dose.event_id,
            ),
        })
        .collect()
}

/// A used coupon: the same capture again is a replay (no-op), anything else is refused.
fn replay_or_used(
    input: &CaptureInput<'_>,
    record: &ResidentRecord,
    used_by: Option<&str>,
) -> Result<CaptureDecision, CaptureError> {
    let Some(original) = used_by.and_then(|id| record.doses.get(id)) else {
        return Err(CaptureError::CouponAlreadyUsed {
            event_id: used_by.unwrap_or_default().to_owned(),
            dose_number: 0,
            vaccinated_on: input.vaccinated_on,
        });
    };
    let vial = &input.scans.vial;
    let same_event = original.event_id == input.event_id;
    // A scanner or a network retry without the client's event id: same vial, same day,
    // same venue is the same vaccination.
    let same_content = original.vaccinated_on == input.vaccinated_on
        && original.gtin == vial.gtin
        && original.lot == vial.lot
        && original.venue == input.venue;
    if same_event || same_content {
        return Ok(CaptureDecision::Replay(original.clone()));
    }
    Err(CaptureError::CouponAlreadyUsed {
        event_id: original.event_id.clone(),
        dose_number: original.dose_number,
        vaccinated_on: original.vaccinated_on,
    })
}

pub(crate) fn check_date(date: Date, today: Date, campaign_start: Date) -> Result<(), CaptureError> {
    if date > today {
        return Err(CaptureError::DateInFuture { date, today });
    }
    if date < campaign_start {
        return Err(CaptureError::DateBeforeCampaign { date, campaign_start });
    }
    Ok(())
}

pub(crate) fn check_lot(
    lot_number: &str,
    vial: &VialBarcode,
    vaccinated_on: Date,
    lot: Option<&Lot>,
) -> Result<(), CaptureError> {
    let lot = lot.ok_or_else(|| CaptureError::LotUnknown { lot: lot_number.to_owned() })?;
    if lot.gtin != vial.gtin {
        return Err(CaptureError::LotOfOtherProduct {
            lot: lot.lot.clone(),
            lot_gtin: lot.gtin.to_string(),
            scanned_gtin: vial.gtin.to_string(),
        });
    }
    // The registered expiry is authoritative; the printed one is checked too, so a relabelled
    // vial with an earlier date is still refused.
    let expiry = lot.expiry.min(vial.expiry);
    if expiry < vaccinated_on {
        return Err(CaptureError::LotExpired { lot: lot.lot.clone(), expiry, vaccinated_on });
    }
    Ok(())
}

fn check_age(record: &ResidentRecord, product: &Product, on: Date) -> Result<(), CaptureError> {
    let age = age_on(record.identity.birth_date, on);
    if age < product.min_age_years {
        return Err(CaptureError::UnderMinimumAge {
            age,
            min_age: product.min_age_years,
            product: product.code.clone(),
        });
    }
    Ok(())
}

fn check_interval(
    record: &ResidentRecord,
    product: &Product,
    dose_number: u8,
    on: Date,
    ignore_event: Option<&str>,
) -> Result<(), CaptureError> {
    let previous = record
        .valid_doses()
        .into_iter()
        .filter(|d| Some(d.event_id.as_str()) != ignore_event)
        .filter(|d| d.dose_number < dose_number)
        .max_by_key(|d| d.dose_number);
    let Some(previous) = previous else {
        return Ok(());
    };
    let min_days = product.min_interval_before(dose_number);
    let actual_days = (on - previous.vaccinated_on).whole_days();
    if actual_days < i64::from(min_days) {
        return Err(CaptureError::IntervalTooShort {
            dose_number,
            vaccinated_on: on,
            actual_days,
            min_days,
            earliest: previous.vaccinated_on + Duration::days(i64::from(min_days)),
            product: product.code.clone(),
        });
    }
    Ok(())
}

/// Age in full years on a date, the Japanese way: under the 年齢計算ニ関スル法律 a person
/// gains a year at the end of the day before their birthday, so someone born on 1 April
/// is already a year older on 31 March.
pub fn age_on(birth_date: Date, on: Date) -> u8 {
    let day_after = on.next_day().unwrap_or(on);
    let mut years = day_after.year() - birth_date.year();
    let before_birthday =
        (day_after.month() as u8, day_after.day()) < (birth_date.month() as u8, birth_date.day());
    if before_birthday {
        years -= 1;
    }
    u8::try_from(years.max(0)).unwrap_or(u8::MAX)
}

/// A request to void a dose.
#[derive(Clone, Debug)]
pub struct VoidRequest<'a> {
    /// The dose event.
    pub event_id: &'a str,
    /// Why.
    pub reason: &'a str,
    /// Who.
    pub actor: &'a str,
    /// New id for the correction.
    pub correction_id: &'a str,
    /// When.
    pub at: OffsetDateTime,
}

/// Checks a void and returns the correction and the coupon to reopen.
pub fn validate_void(
    record: &ResidentRecord,
    request: &VoidRequest<'_>,
) -> Result<(Correction, Option<String>), CaptureError> {
    if request.reason.trim().is_empty() {
        return Err(CaptureError::ReasonMissing);
    }
    let dose = record
        .doses
        .get(request.event_id)
        .ok_or_else(|| CaptureError::DoseNotFound { event_id: request.event_id.to_owned() })?;
    if dose.status == DoseStatus::Voided {
        return Err(CaptureError::DoseAlreadyVoided { event_id: dose.event_id.clone() });
    }
    let key = coupon_key(&dose.coupon, dose.coupon_generation);
    // Only a coupon this municipality issued becomes usable again: one a handoff carried
    // here stays used (the new municipality issues its own; reopening the old one would
    // leave two valid coupons for the same dose). And only for the dose that is next once
    // this one is gone: not when a later dose remains (it is numbered down, and takes this
    // number), nor for a dose numbered again when a history joined (a dose-1 coupon used
    // for what is now dose 2).
    let next_after = record.next_dose_number().saturating_sub(1);
    let reopen = record
        .coupons
        .get(&key)
        .filter(|c| c.status == CouponStatus::Used && c.used_by_event.as_deref() == Some(&dose.event_id))
        .filter(|c| !record.carried(c) && c.code.dose_round == next_after)
        .map(|_| key);
    let correction = Correction {
        correction_id: request.correction_id.to_owned(),
        event_id: dose.event_id.clone(),
        kind: CorrectionKind::Void,
        reason: request.reason.trim().to_owned(),
        actor: request.actor.to_owned(),
        at: request.at,
        before: BTreeMap::from([("status".to_owned(), "valid".to_owned())]),
        after: BTreeMap::from([("status".to_owned(), "voided".to_owned())]),
    };
    Ok((correction, reopen))
}

/// The dose round a resident should be issued a coupon for now, if any: one who is resident
/// (not deceased or moved out), at least `min_age` on `today`, not past the ninth dose (the
/// coupon's one digit), and holds no valid coupon for their next dose. Bulk issuance applies
/// it to everyone; a void applies it to the resident whose dose it voided, since a void that
/// reopens no coupon (the dose was numbered again when a history joined, or a later dose
/// takes its number) would otherwise leave the next dose without one until the next bulk
/// issuance.
pub fn coupon_due(record: &ResidentRecord, today: Date, min_age: u8) -> Option<u8> {
    let next = record.next_dose_number();
    let eligible = record.identity.status == crate::document::ResidentStatus::Active
        && record.transfer.is_none()
        && age_on(record.identity.birth_date, today) >= min_age
        && next <= 9;
    (eligible && record.valid_coupon_for_dose(next).is_none()).then_some(next)
}

/// Everything a void changes, one commit each: the dose voided (with the coupon
/// [`validate_void`] reopens), then each later valid dose numbered one down, so that the
/// valid doses stay numbered 1, 2, … and the next dose gets the next number. The
/// amendments' ids are the correction's with `-1`, `-2`, … appended.
pub fn void_plan(
    record: &ResidentRecord,
    request: &VoidRequest<'_>,
) -> Result<Vec<ResidentEvent>, CaptureError> {
    let (correction, reopen_coupon) = validate_void(record, request)?;
    let mut after = record.clone();
    if let Some(dose) = after.doses.get_mut(request.event_id) {
        dose.status = DoseStatus::Voided;
    }
    let mut events = vec![ResidentEvent::DoseVoided { correction, reopen_coupon }];
    events.extend(renumbering(
        &after.valid_doses(),
        &Renumbering {
            why_ja: "取消により接種回を繰り上げ",
            why_en: "numbered again after a void",
            actor: request.actor,
            at: request.at,
            correction_prefix: request.correction_id,
        },
    ));
    Ok(events)
}

/// Why, by whom and when a resident's doses are numbered again.
#[derive(Clone, Copy, Debug)]
pub struct Renumbering<'a> {
    /// The reason in Japanese; the change (`1回目→2回目`) is added.
    pub why_ja: &'a str,
    /// The reason in English; the change is added.
    pub why_en: &'a str,
    /// Who (a staff member, or `handoff:<id>`).
    pub actor: &'a str,
    /// When.
    pub at: OffsetDateTime,
    /// The corrections' ids are this with `-1`, `-2`, … (the new number) appended.
    pub correction_prefix: &'a str,
}

/// The amendments that number `ordered` — a resident's valid doses in the order they were
/// given — 1, 2, …: one for each dose whose number changes, saying from what to what and
/// why.
pub fn renumbering(ordered: &[&DoseEvent], why: &Renumbering<'_>) -> Vec<ResidentEvent> {
    let mut events = Vec::new();
    for (n, dose) in (1u8..=u8::MAX).zip(ordered) {
        let old = dose.dose_number;
        if old == n {
            continue;
        }
        let mut amended = (*dose).clone();
        amended.dose_number = n;
        let correction = Correction {
            correction_id: format!("{}-{n}", why.correction_prefix),
            event_id: dose.event_id.clone(),
            kind: CorrectionKind::Amend,
            reason: format!("{}（{old}回目→{n}回目）/ {} (dose {old} → {n})", why.why_ja, why.why_en),
            actor: why.actor.to_owned(),
            at: why.at,
            before: BTreeMap::from([("dose_number".to_owned(), old.to_string())]),
            after: BTreeMap::from([("dose_number".to_owned(), n.to_string())]),
        };
        events.push(ResidentEvent::DoseAmended { amended, correction });
    }
    events
}

/// The fields an amendment may change. The vial fields come together from one scan.
#[derive(Clone, Debug, Default)]
pub struct Amendment {
    /// A corrected vaccination date.
    pub vaccinated_on: Option<Date>,
    /// A corrected vial (rescanned or typed from the lot sticker).
    pub vial: Option<VialBarcode>,
    /// A corrected venue.
    pub venue: Option<String>,
}

/// A request to amend a dose.
#[derive(Clone, Debug)]
pub struct AmendRequest<'a> {
    /// The dose event.
    pub event_id: &'a str,
    /// What changes.
    pub amendment: &'a Amendment,
    /// Why.
    pub reason: &'a str,
    /// Who.
    pub actor: &'a str,
    /// New id for the correction.
    pub correction_id: &'a str,
    /// When.
    pub at: OffsetDateTime,
}

/// Checks an amendment with the same rules as a capture and returns the amended dose and
/// the correction that records before and after.
pub fn validate_amendment(
    record: &ResidentRecord,
    request: &AmendRequest<'_>,
    context: &CaptureContext<'_>,
) -> Result<(DoseEvent, Correction), CaptureError> {
    if request.reason.trim().is_empty() {
        return Err(CaptureError::ReasonMissing);
    }
    let original = record
        .doses
        .get(request.event_id)
        .ok_or_else(|| CaptureError::DoseNotFound { event_id: request.event_id.to_owned() })?;
    if original.status == DoseStatus::Voided {
        return Err(CaptureError::DoseAlreadyVoided { event_id: original.event_id.clone() });
    }
    let mut amended = original.clone();
    let amendment = request.amendment;
    if let Some(date) = amendment.vaccinated_on {
        amended.vaccinated_on = date;
    }
    if let Some(venue) = &amendment.venue {
        amended.venue = venue.clone();
    }
    let product = if let Some(vial) = &amendment.vial {
        let product = context
            .catalogue
            .product(&vial.gtin)
            .ok_or_else(|| CaptureError::ProductUnknown { gtin: vial.gtin.to_string() })?;
        check_lot(&vial.lot, vial, amended.vaccinated_on, context.lot)?;
        amended.gtin = vial.gtin.clone();
        amended.lot = vial.lot.clone();
        amended.expiry = vial.expiry;
        amended.product_code = product.code.clone();
        product
    } else {
        context
            .catalogue
            .products
            .iter()
            .find(|p| p.code == amended.product_code)
            .ok_or_else(|| CaptureError::ProductUnknown { gtin: amended.gtin.to_string() })?
    };
    check_date(amended.vaccinated_on, context.today, context.campaign_start)?;
    if amendment.vial.is_none() && amended.expiry < amended.vaccinated_on {
        return Err(CaptureError::LotExpired {
            lot: amended.lot.clone(),
            expiry: amended.expiry,
            vaccinated_on: amended.vaccinated_on,
        });
    }
    check_age(record, product, amended.vaccinated_on)?;
    check_interval(record, product, amended.dose_number, amended.vaccinated_on, Some(&amended.event_id))?;
    check_later_doses(record, &amended, context)?;

    let (before, after) = changed_fields(original, &amended);
    if after.is_empty() {
        return Err(CaptureError::NothingToAmend);
    }
    let correction = Correction {
        correction_id: request.correction_id.to_owned(),
        event_id: original.event_id.clone(),
        kind: CorrectionKind::Amend,
        reason: request.reason.trim().to_owned(),
        actor: request.actor.to_owned(),
        at: request.at,
        before,
        after,
    };
    Ok((amended, correction))
}

/// Moving a dose later must not make the next dose too early.
fn check_later_doses(
    record: &ResidentRecord,
    amended: &DoseEvent,
    context: &CaptureContext<'_>,
) -> Result<(), CaptureError> {
    let next = record.valid_doses().into_iter().find(|d| d.dose_number == amended.dose_number + 1);
    let Some(next) = next else {
        return Ok(());
    };
    let Some(product) = context.catalogue.products.iter().find(|p| p.code == next.product_code) else {
        return Ok(());
    };
    let min_days = product.min_interval_before(next.dose_number);
    let actual_days = (next.vaccinated_on - amended.vaccinated_on).whole_days();
    if actual_days < i64::from(min_days) {
        return Err(CaptureError::IntervalTooShort {
            dose_number: next.dose_number,
            vaccinated_on: next.vaccinated_on,
            actual_days,
            min_days,
            earliest: amended.vaccinated_on + Duration::days(i64::from(min_days)),
            product: product.code.clone(),
        });
    }
    Ok(())
}

fn changed_fields(
    before: &DoseEvent,
    after: &DoseEvent,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let pairs = [
        ("vaccinated_on", before.vaccinated_on.to_string(), after.vaccinated_on.to_string()),
        ("gtin", before.gtin.to_string(), after.gtin.to_string()),
        ("lot", before.lot.clone(), after.lot.clone()),
        ("expiry", before.expiry.to_string(), after.expiry.to_string()),
        ("product_code", before.product_code.clone(), after.product_code.clone()),
        ("venue", before.venue.clone(), after.venue.clone()),
    ];
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    for (field, b, a) in pairs {
        if b != a {
            old.insert(field.to_owned(), b);
            new.insert(field.to_owned(), a);
        }
    }
    (old, new)
}
