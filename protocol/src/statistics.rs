//! Statistics: what a municipality tells the national node — counts, never a person.
//!
//! The owning municipality is the only writer of its statistics. Its node keeps counters
//! ([`Cell`] → count) that change in the same transaction as the resident event that moves
//! them ([`event_delta`]), and publishes one signed document per vaccination date
//! ([`DailyStatistics`]) and one for its population ([`PopulationStatistics`]). A newer
//! version of a document replaces the older one whole, so a void or an amendment lowers the
//! national figures exactly as it lowered the municipality's. No automerge counters: a
//! counter merged from two histories can count an event twice (see
//! `../shared/design/measurements.md`), and here there is one writer anyway.

use std::collections::BTreeMap;
use std::fmt;

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use time::{Date, Duration, OffsetDateTime, UtcOffset};

use crate::document::{DoseEvent, DoseStatus, Identity, ResidentEvent, ResidentRecord, ResidentStatus, Sex};
use crate::municipality::MunicipalityCode;
use crate::person::{hex_decode, hex_lower};
use crate::validation::age_on;

/// Most documents in one report to the national node.
pub const MAX_STATISTICS_PER_REPORT: usize = 512;
/// Most audit checkpoints in one report.
pub const MAX_CHECKPOINTS_PER_REPORT: usize = 1024;

/// Age bands, by their lowest age; the last is open. 12 and 65 are where eligibility and
/// priority changed in 2021; 5–11 is the paediatric formulation.
const BAND_STARTS: [u8; 12] = [0, 5, 12, 20, 30, 40, 50, 60, 65, 70, 80, 90];

/// An age band (年齢階級), e.g. `65-69` or `90+`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgeBand(u8);

impl AgeBand {
    /// Every band, youngest first.
    pub fn all() -> impl Iterator<Item = AgeBand> {
        (0..BAND_STARTS.len() as u8).map(AgeBand)
    }

    /// The band of someone born on `birth` on the day `on` (ages counted the Japanese way).
    pub fn of(birth: Date, on: Date) -> AgeBand {
        let age = age_on(birth, on);
        let index = BAND_STARTS.iter().rposition(|&start| start <= age).unwrap_or(0);
        AgeBand(index as u8)
    }

    /// `0-4`, `65-69`, `90+`.
    pub fn label(self) -> String {
        let index = usize::from(self.0);
        let start = BAND_STARTS[index];
        match BAND_STARTS.get(index + 1) {
            Some(next) => format!("{start}-{}", next - 1),
            None => format!("{start}+"),
        }
    }
}

impl fmt::Display for AgeBand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl TryFrom<String> for AgeBand {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        AgeBand::all().find(|band| band.label() == text).ok_or_else(|| format!("{text:?} is not an age band"))
    }
}

impl From<AgeBand> for String {
    fn from(band: AgeBand) -> String {
        band.label()
    }
}

/// How long after the vaccination its record reached the municipal node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LagBucket {
    /// Within a minute: scanned at a connected venue.
    Minute,
    /// Within an hour.
    Hour,
    /// Within a day: an offline terminal synced the same day.
    Day,
    /// Within a week.
    Week,
    /// Later: typed in from paper, or a terminal offline for long.
    Later,
}

impl LagBucket {
    /// Every bucket, shortest first.
    pub const ALL: [LagBucket; 5] =
        [LagBucket::Minute, LagBucket::Hour, LagBucket::Day, LagBucket::Week, LagBucket::Later];

    /// The bucket of a lag.
    pub fn of(lag: Duration) -> LagBucket {
        if lag <= Duration::minutes(1) {
            LagBucket::Minute
        } else if lag <= Duration::hours(1) {
            LagBucket::Hour
        } else if lag <= Duration::days(1) {
            LagBucket::Day
        } else if lag <= Duration::weeks(1) {
            LagBucket::Week
        } else {
            LagBucket::Later
        }
    }

    /// The name used in keys and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LagBucket::Minute => "minute",
            LagBucket::Hour => "hour",
            LagBucket::Day => "day",
            LagBucket::Week => "week",
            LagBucket::Later => "later",
        }
    }

    fn parse(text: &str) -> Option<LagBucket> {
        LagBucket::ALL.into_iter().find(|b| b.as_str() == text)
    }
}

/// What one counter counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cell {
    /// Valid doses given on a date.
    Dose {
        /// 接種日.
        date: Date,
        /// Catalogue product code.
        product: String,
        /// 1st, 2nd, … dose.
        dose_number: u8,
        /// Age band on the day of vaccination.
        age_band: AgeBand,
        /// Sex.
        sex: Sex,
        /// The municipality the venue belongs to.
        venue_municipality: MunicipalityCode,
    },
    /// Doses recorded for a vaccination date, by how late they were recorded.
    Lag {
        /// 接種日.
        date: Date,
        /// How late.
        bucket: LagBucket,
    },
    /// Captures refused on a date, by reason code.
    Rejected {
        /// The day of the refusal (Japan).
        date: Date,
        /// The refusal's code, e.g. `interval_too_short`.
        reason: String,
    },
    /// Valid doses given at one of the municipality's own venues on a date, by product (the
    /// venue's stock usage).
    Used {
        /// 接種日.
        date: Date,
        /// The venue id.
        venue: String,
        /// Catalogue product code.
        product: String,
    },
    /// Registered residents born on a date.
    Population {
        /// 生年月日.
        birth_date: Date,
        /// Sex.
        sex: Sex,
    },
}

fn sex_str(sex: Sex) -> &'static str {
    match sex {
        Sex::Male => "male",
        Sex::Female => "female",
    }
}

fn parse_sex(text: &str) -> Option<Sex> {
    match text {
        "male" => Some(Sex::Male),
        "female" => Some(Sex::Female),
        _ => None,
    }
}

fn parse_date(text: &str) -> Option<Date> {
    Date::parse(text, &time::format_description::well_known::Iso8601::DATE).ok()
}

impl Cell {
    /// The counter's key in the store: `d|date|product|dose|band|sex|venue municipality`,
    /// `l|date|bucket`, `r|date|reason`, `u|date|venue|product`, `p|birth date|sex`. Dated
    /// keys sort by date.
    pub fn key(&self) -> String {
        match self {
            Cell::Dose { date, product, dose_number, age_band, sex, venue_municipality } => {
                format!("d|{date}|{product}|{dose_number}|{age_band}|{}|{venue_municipality}", sex_str(*sex))
            }
            Cell::Lag { date, bucket } => format!("l|{date}|{}", bucket.as_str()),
            Cell::Rejected { date, reason } => format!("r|{date}|{reason}"),
            Cell::Used { date, venue, product } => format!("u|{date}|{venue}|{product}"),
            Cell::Population { birth_date, sex } => format!("p|{birth_date}|{}", sex_str(*sex)),
        }
    }

    /// Reads a key back.
    pub fn parse(key: &str) -> Option<Cell> {
        let parts: Vec<&str> = key.split('|').collect();
        match parts.as_slice() {
            ["d", date, product, dose, band, sex, venue] => Some(Cell::Dose {
                date: parse_date(date)?,
                product: (*product).to_owned(),
                dose_number: dose.parse().ok()?,
                age_band: AgeBand::try_from((*band).to_owned()).ok()?,
                sex: parse_sex(sex)?,
                venue_municipality: MunicipalityCode::parse(venue).ok()?,
            }),
            ["l", date, bucket] => {
                Some(Cell::Lag { date: parse_date(date)?, bucket: LagBucket::parse(bucket)? })
            }
            ["r", date, reason] => {
                Some(Cell::Rejected { date: parse_date(date)?, reason: (*reason).to_owned() })
            }
            ["u", date, venue, product] => Some(Cell::Used {
                date: parse_date(date)?,
                venue: (*venue).to_owned(),
                product: (*product).to_owned(),
            }),
            ["p", birth, sex] => {
                Some(Cell::Population { birth_date: parse_date(birth)?, sex: parse_sex(sex)? })
            }
            _ => None,
        }
    }

    /// The vaccination (or refusal) date a daily document carries this cell under.
    pub fn date(&self) -> Option<Date> {
        match self {
            Cell::Dose { date, .. }
            | Cell::Lag { date, .. }
            | Cell::Rejected { date, .. }
            | Cell::Used { date, .. } => Some(*date),
            Cell::Population { .. } => None,
        }
    }
}

/// The municipality of a dose's venue: `131016/…` names another municipality (a dose given
/// away from home); any other venue is the owner's.
pub fn venue_municipality(venue: &str, owner: MunicipalityCode) -> MunicipalityCode {
    venue.split_once('/').and_then(|(code, _)| MunicipalityCode::parse(code).ok()).unwrap_or(owner)
}

fn dose_cell(dose: &DoseEvent, identity: &Identity, owner: MunicipalityCode) -> Cell {
    Cell::Dose {
        date: dose.vaccinated_on,
        product: dose.product_code.clone(),
        dose_number: dose.dose_number,
        age_band: AgeBand::of(identity.birth_date, dose.vaccinated_on),
        sex: identity.sex,
        venue_municipality: venue_municipality(&dose.venue, owner),
    }
}

/// The stock-usage cell of a dose given at one of the owner's own venues (a venue named
/// `131016/…` belongs to another municipality, whose stock it used).
fn used_cell(dose: &DoseEvent) -> Option<Cell> {
    (!dose.venue.contains('/')).then(|| Cell::Used {
        date: dose.vaccinated_on,
        venue: dose.venue.clone(),
        product: dose.product_code.clone(),
    })
}

/// A valid dose's cells: its count, and its venue's usage when the venue is the owner's.
fn dose_cells(dose: &DoseEvent, identity: &Identity, owner: MunicipalityCode, sign: i64) -> Vec<(Cell, i64)> {
    let mut cells = vec![(dose_cell(dose, identity, owner), sign)];
    cells.extend(used_cell(dose).map(|cell| (cell, sign)));
    cells
}

fn population_cell(identity: &Identity) -> Option<Cell> {
    (identity.status == ResidentStatus::Active)
        .then_some(Cell::Population { birth_date: identity.birth_date, sex: identity.sex })
}

/// The moment a dose was given, as well as it is known: the scan time when it was scanned
/// on the day of vaccination, otherwise the start of that day in Japan.
fn given_at(dose: &DoseEvent) -> OffsetDateTime {
    let jst = UtcOffset::from_hms(9, 0, 0).unwrap_or(UtcOffset::UTC);
    if dose.captured_at.to_offset(jst).date() == dose.vaccinated_on {
        dose.captured_at
    } else {
        dose.vaccinated_on.midnight().assume_offset(jst)
    }
}

/// What a resident's record contributes to the counters: their population cell (while
/// registered here) and one dose cell per valid dose. Entry lags and refusals are facts
/// about events, not about the record, and are not part of it.
///
/// A record handed to another municipality keeps only the stock its doses used at this
/// municipality's venues: the doses themselves are counted by the new owner.
pub fn record_cells(record: &ResidentRecord) -> Vec<(Cell, i64)> {
    let mut cells: Vec<(Cell, i64)> = population_cell(&record.identity).map(|c| (c, 1)).into_iter().collect();
    for dose in record.doses.values().filter(|d| d.status == DoseStatus::Valid) {
        if record.transfer.is_some() {
            cells.extend(used_cell(dose).map(|cell| (cell, 1)));
        } else {
            cells.extend(dose_cells(dose, &record.identity, record.municipality, 1));
        }
    }
    cells
}

/// How `event`, applied to the record `before` at `recorded_at`, changes the counters.
/// Summed over a record's history from registration ([`record_cells`] of the new record)
/// this equals [`record_cells`] of the record as it ends, plus one lag cell per dose recorded.
pub fn event_delta(
    before: &ResidentRecord,
    event: &ResidentEvent,
    recorded_at: OffsetDateTime,
) -> Vec<(Cell, i64)> {
    let owner = before.municipality;
    let identity = &before.identity;
    let mut delta = Vec::new();
    let valid_before = |event_id: &str| before.doses.get(event_id).filter(|d| d.status == DoseStatus::Valid);
    match event {
        ResidentEvent::IdentityUpdated(new) => {
            if let Some(cell) = population_cell(identity) {
                delta.push((cell, -1));
            }
            if let Some(cell) = population_cell(new) {
                delta.push((cell, 1));
            }
            if (new.birth_date, new.sex) != (identity.birth_date, identity.sex) {
                for dose in before.doses.values().filter(|d| d.status == DoseStatus::Valid) {
                    delta.push((dose_cell(dose, identity, owner), -1));
                    delta.push((dose_cell(dose, new, owner), 1));
                }
            }
        }
        ResidentEvent::CouponIssued { .. } | ResidentEvent::CouponRevoked { .. } => {}
        ResidentEvent::DoseRecorded(dose) => {
            if let Some(old) = valid_before(&dose.event_id) {
                delta.extend(dose_cells(old, identity, owner, -1));
            }
            if dose.status == DoseStatus::Valid {
                delta.extend(dose_cells(dose, identity, owner, 1));
            }
            let bucket = LagBucket::of(recorded_at - given_at(dose));
            delta.push((Cell::Lag { date: dose.vaccinated_on, bucket }, 1));
        }
        ResidentEvent::DoseVoided { correction, .. } => {
            if let Some(old) = valid_before(&correction.event_id) {
                delta.extend(dose_cells(old, identity, owner, -1));
            }
        }
        ResidentEvent::DoseAmended { amended, .. } => {
            if let Some(old) = valid_before(&amended.event_id) {
                delta.extend(dose_cells(old, identity, owner, -1));
            }
            if amended.status == DoseStatus::Valid {
                delta.extend(dose_cells(amended, identity, owner, 1));
            }
        }
        ResidentEvent::TransferredOut(_) if before.transfer.is_none() => {
            // The person and their doses are counted by the new owner from now on; the
            // stock their doses used at this municipality's venues stays used here.
            if let Some(cell) = population_cell(identity) {
                delta.push((cell, -1));
            }
            for dose in before.doses.values().filter(|d| d.status == DoseStatus::Valid) {
                delta.push((dose_cell(dose, identity, owner), -1));
            }
        }
        ResidentEvent::TransferredOut(_) => {}
        ResidentEvent::TransferReturned(_) if before.transfer.is_some() => {
            // Counted here again, as before the move.
            delta.push((Cell::Population { birth_date: identity.birth_date, sex: identity.sex }, 1));
            for dose in before.doses.values().filter(|d| d.status == DoseStatus::Valid) {
                delta.push((dose_cell(dose, identity, owner), 1));
            }
        }
        ResidentEvent::TransferReturned(_) => {}
        ResidentEvent::HistoryReceived(history) => {
            // The person was counted here already; their doses now are too.
            for dose in history.doses.values().filter(|d| d.status == DoseStatus::Valid) {
                delta.extend(dose_cells(dose, identity, owner, 1));
            }
        }
    }
    delta
}

/// Valid doses of one kind on one date.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DoseCount {
    /// Catalogue product code.
    pub product: String,
    /// 1st, 2nd, … dose.
    pub dose_number: u8,
    /// Age band on the day.
    pub age_band: AgeBand,
    /// Sex.
    pub sex: Sex,
    /// Municipality of the venue.
    pub venue_municipality: MunicipalityCode,
    /// How many.
    pub count: u64,
}

/// Doses recorded for a date, by how late.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LagCount {
    /// How late.
    pub bucket: LagBucket,
    /// How many.
    pub count: u64,
}

/// Captures refused on a date, by reason.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RejectedCount {
    /// The refusal's code.
    pub reason: String,
    /// How many.
    pub count: u64,
}

/// A municipality's figures for one date. A newer `version` replaces an older one whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyStatistics {
    /// The reporting (owning) municipality.
    pub municipality: MunicipalityCode,
    /// The vaccination date.
    pub date: Date,
    /// Strictly increasing across every document the municipality publishes.
    pub version: u64,
    /// When the node built it (RFC 3339).
    pub generated_at: String,
    /// Valid doses, sorted.
    pub doses: Vec<DoseCount>,
    /// Entry lag of the doses recorded for the date.
    pub entry_lag: Vec<LagCount>,
    /// Refused captures on the date.
    pub rejected: Vec<RejectedCount>,
}

/// Registered residents by age band and sex on a date: the denominator of coverage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopulationStatistics {
    /// The municipality.
    pub municipality: MunicipalityCode,
    /// Ages are as of this date.
    pub as_of: Date,
    /// Strictly increasing across every document the municipality publishes.
    pub version: u64,
    /// When the node built it (RFC 3339).
    pub generated_at: String,
    /// Counts, sorted.
    pub cells: Vec<PopulationCount>,
}

/// One population cell.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PopulationCount {
    /// Age band.
    pub age_band: AgeBand,
    /// Sex.
    pub sex: Sex,
    /// Residents.
    pub count: u64,
}

/// A venue as the public sees it (V-SYS published the institutions offering vaccination).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicVenue {
    /// The venue id the municipality uses (`naka-kumin-kaikan`).
    #[serde(default)]
    pub id: String,
    /// Name (中区民会館).
    pub name: String,
    /// Address of the venue (a public building, not a person's).
    pub address: String,
    /// Catalogue product codes offered.
    pub products: Vec<String>,
    /// Opening days: weekdays (`mon` … `sun`) or dates (`2026-12-01`).
    pub opening_days: Vec<String>,
    /// A note for citizens (booking, access).
    #[serde(default)]
    pub note: String,
}

/// The weekday names opening days may use.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A municipality's listed venues. A newer version replaces the whole list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VenueListing {
    /// The municipality.
    pub municipality: MunicipalityCode,
    /// Strictly increasing across every document the municipality publishes.
    pub version: u64,
    /// When the node built it (RFC 3339).
    pub generated_at: String,
    /// The venues it lists, by id.
    pub venues: Vec<PublicVenue>,
}

/// One venue's stock of one product, in doses (接種回数分), as its municipality keeps it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VenueStock {
    /// Venue id.
    pub venue: String,
    /// Catalogue product code.
    pub product: String,
    /// Allocated to the venue by the municipality.
    pub allocated: u64,
    /// Reported delivered at the venue.
    pub delivered: u64,
    /// Reported wasted at the venue.
    pub wasted: u64,
}

/// A municipality's venue stock. A newer version replaces the whole report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReport {
    /// The municipality.
    pub municipality: MunicipalityCode,
    /// Strictly increasing across every document the municipality publishes.
    pub version: u64,
    /// When the node built it (RFC 3339).
    pub generated_at: String,
    /// Per venue and product, sorted.
    pub venues: Vec<VenueStock>,
}

/// A statistics document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Statistics {
    /// One vaccination date.
    Daily(DailyStatistics),
    /// The population.
    Population(PopulationStatistics),
    /// The public venue listing.
    Venues(VenueListing),
    /// The venues' stock.
    Stock(StockReport),
}

impl Statistics {
    /// The municipality that made it.
    pub fn municipality(&self) -> MunicipalityCode {
        match self {
            Statistics::Daily(d) => d.municipality,
            Statistics::Population(p) => p.municipality,
            Statistics::Venues(v) => v.municipality,
            Statistics::Stock(s) => s.municipality,
        }
    }

    /// Its version.
    pub fn version(&self) -> u64 {
        match self {
            Statistics::Daily(d) => d.version,
            Statistics::Population(p) => p.version,
            Statistics::Venues(v) => v.version,
            Statistics::Stock(s) => s.version,
        }
    }

    /// `daily/2021-06-01`, `population`, `venues` or `stock`: which earlier document it
    /// replaces.
    pub fn slot(&self) -> String {
        match self {
            Statistics::Daily(d) => format!("daily/{}", d.date),
            Statistics::Population(_) => "population".to_owned(),
            Statistics::Venues(_) => "venues".to_owned(),
            Statistics::Stock(_) => "stock".to_owned(),
        }
    }

    /// When the node built it.
    pub fn generated_at(&self) -> &str {
        match self {
            Statistics::Daily(d) => &d.generated_at,
            Statistics::Population(p) => &p.generated_at,
            Statistics::Venues(v) => &v.generated_at,
            Statistics::Stock(s) => &s.generated_at,
        }
    }
}

/// Builds the daily document of `date` from the counters whose cells fall on that date.
pub fn daily_from_cells<'a>(
    municipality: MunicipalityCode,
    date: Date,
    version: u64,
    generated_at: String,
    cells: impl IntoIterator<Item = (&'a Cell, u64)>,
) -> DailyStatistics {
    let mut doc = DailyStatistics {
        municipality,
        date,
        version,
        generated_at,
        doses: Vec::new(),
        entry_lag: Vec::new(),
        rejected: Vec::new(),
    };
    for (cell, count) in cells {
        if count == 0 || cell.date() != Some(date) {
            continue;
        }
        match cell.clone() {
            Cell::Dose { product, dose_number, age_band, sex, venue_municipality, .. } => {
                doc.doses.push(DoseCount { product, dose_number, age_band, sex, venue_municipality, count })
            }
            Cell::Lag { bucket, .. } => doc.entry_lag.push(LagCount { bucket, count }),
            Cell::Rejected { reason, .. } => doc.rejected.push(RejectedCount { reason, count }),
            Cell::Used { .. } | Cell::Population { .. } => {}
        }
    }
    doc.doses.sort();
    doc.entry_lag.sort();
    doc.rejected.sort();
    doc
}

/// Builds the population document as of `as_of` from the population counters.
pub fn population_from_cells<'a>(
    municipality: MunicipalityCode,
    as_of: Date,
    version: u64,
    generated_at: String,
    cells: impl IntoIterator<Item = (&'a Cell, u64)>,
) -> PopulationStatistics {
    let mut counts: BTreeMap<(AgeBand, Sex), u64> = BTreeMap::new();
    for (cell, count) in cells {
        if let Cell::Population { birth_date, sex } = cell
            && *birth_date <= as_of
        {
            *counts.entry((AgeBand::of(*birth_date, as_of), *sex)).or_default() += count;
        }
    }
    let cells = counts
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|((age_band, sex), count)| PopulationCount { age_band, sex, count })
        .collect();
    PopulationStatistics { municipality, as_of, version, generated_at, cells }
}

/// Why a statistics document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatisticsError {
    /// The signature is not hex or does not verify.
    #[error("the statistics signature does not verify with the municipality's key")]
    BadSignature,
    /// The body is not a statistics document.
    #[error("the statistics body is not a statistics document: {0}")]
    Malformed(String),
}

/// A document as sent: the exact JSON bytes the municipality signed, and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatistics {
    /// JSON of [`Statistics`].
    pub body: String,
    /// Ed25519 signature (hex) of `vrs-statistics/1\n` followed by `body`, by the
    /// municipality's signing key (the coupon key of its directory entry).
    pub signature: String,
}

fn signed_message(body: &str) -> Vec<u8> {
    let mut message = b"vrs-statistics/1\n".to_vec();
    message.extend_from_slice(body.as_bytes());
    message
}

impl SignedStatistics {
    /// Signs a document.
    pub fn sign(statistics: &Statistics, key: &Ed25519KeyPair) -> SignedStatistics {
        // Serializing plain structs of strings and numbers cannot fail.
        let body = serde_json::to_string(statistics).unwrap_or_default();
        let signature = hex_lower(key.sign(&signed_message(&body)).as_ref());
        SignedStatistics { body, signature }
    }

    /// Checks the signature against the municipality's public key, then reads the body.
    pub fn open(&self, public_key: &[u8]) -> Result<Statistics, StatisticsError> {
        let signature = hex_decode(&self.signature).ok_or(StatisticsError::BadSignature)?;
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&signed_message(&self.body), &signature)
            .map_err(|_| StatisticsError::BadSignature)?;
        serde_json::from_str(&self.body).map_err(|e| StatisticsError::Malformed(e.to_string()))
    }

    /// Reads the body without checking the signature (for a store that checked it on entry).
    pub fn read_unchecked(&self) -> Result<Statistics, StatisticsError> {
        serde_json::from_str(&self.body).map_err(|e| StatisticsError::Malformed(e.to_string()))
    }
}

/// An audit checkpoint a municipality deposits at the national node, so that it cannot
/// later rewrite its log unnoticed: "entry `seq` of municipality M's log hashes to `hash`",
/// signed with M's audit key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchoredCheckpoint {
    /// The municipality.
    pub municipality: MunicipalityCode,
    /// The audit public key (hex) of the log it covers: a promoted standby keeps a log of
    /// its own, numbered from 1 again.
    #[serde(default)]
    pub log_key: String,
    /// The entry covered.
    pub seq: u64,
    /// SHA-256 (hex) of that entry.
    pub hash: String,
    /// When the municipality signed it.
    pub at: String,
    /// Ed25519 signature (hex) by the municipality's audit key.
    pub signature: String,
}

/// A municipal node's report to the national node (`/vrs/report/1`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportRequest {
    /// Statistics documents, each replacing an older version of its slot.
    pub statistics: Vec<SignedStatistics>,
    /// Audit checkpoints not yet deposited.
    pub checkpoints: Vec<AnchoredCheckpoint>,
}

/// The national node's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ReportResponse {
    /// Stored durably (or already held in a newer version).
    Stored {
        /// Documents that replaced an older version.
        statistics: u32,
        /// Checkpoints newly kept.
        checkpoints: u32,
        /// The newest version the national node holds from this municipality. A document
        /// not newer than what is held for its slot is ignored; a sender whose versions fell
        /// behind (a promoted standby with a slower clock) continues above this one.
        #[serde(default)]
        held_version: u64,
    },
    /// Refused as a whole; nothing was stored.
    Refused {
        /// Machine-readable reason.
        code: String,
        /// Explanation.
        message: String,
    },
}
