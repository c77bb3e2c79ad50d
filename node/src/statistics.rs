//! A municipal node's statistics: reading its counters as documents, reporting them (with
//! its audit checkpoints) to the national node, and rebuilding them from the documents.
//!
//! The counters change in the writer's transaction with the event that moves them
//! ([`crate::store::count_cells`]); each change marks the document it falls in (one per
//! vaccination date, plus the population) as due. The reporter sends due documents — signed
//! with the municipality's key — and clears a mark only once the national node has stored
//! the document and only if nothing touched the slot since it was read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use protocol::catalogue::Catalogue;
use protocol::municipality::MunicipalityCode;
use protocol::statistics::{
    AnchoredCheckpoint, Cell, DailyStatistics, MAX_CHECKPOINTS_PER_REPORT, MAX_STATISTICS_PER_REPORT,
    PopulationStatistics, PublicVenue, ReportRequest, SignedStatistics, Statistics, VenueListing, WEEKDAYS,
    daily_from_cells, population_from_cells, record_cells,
};
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::audit::{AUDIT_CHECKPOINTS, Checkpoint};
use crate::problem::Problem;
use crate::store::{
    META, META_ANCHORED, META_STATS_VERSION, STATS, STATS_DIRTY, STOCK, Store, VENUES, all_json,
};
use crate::writer::{Command, Who, WriterHandle};

/// A report stops taking documents past this size (the p2p request limit is 4 MiB).
const MAX_REPORT_BYTES: usize = 2 * 1024 * 1024;

/// Counters whose key starts with `prefix`, parsed.
fn cells_with_prefix(txn: &ReadTransaction, prefix: &str) -> anyhow::Result<Vec<(Cell, u64)>> {
    let table = txn.open_table(STATS)?;
    let mut out = Vec::new();
    for row in table.range::<&str>(prefix..)? {
        let (key, count) = row?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        let cell = Cell::parse(key).with_context(|| format!("statistics counter {key} is unreadable"))?;
        out.push((cell, count.value()));
    }
    Ok(out)
}

/// The municipality's figures for `date`, as its counters hold them now.
pub fn daily(
    txn: &ReadTransaction,
    municipality: MunicipalityCode,
    date: Date,
    version: u64,
    generated_at: String,
) -> anyhow::Result<DailyStatistics> {
    let mut cells = cells_with_prefix(txn, &format!("d|{date}|"))?;
    cells.extend(cells_with_prefix(txn, &format!("l|{date}|"))?);
    cells.extend(cells_with_prefix(txn, &format!("r|{date}|"))?);
    Ok(daily_from_cells(municipality, date, version, generated_at, cells.iter().map(|(c, n)| (c, *n))))
}

/// The registered population by age band and sex as of `as_of`.
pub fn population(
    txn: &ReadTransaction,
    municipality: MunicipalityCode,
    as_of: Date,
    version: u64,
    generated_at: String,
) -> anyhow::Result<PopulationStatistics> {
    let cells = cells_with_prefix(txn, "p|")?;
    Ok(population_from_cells(municipality, as_of, version, generated_at, cells.iter().map(|(c, n)| (c, *n))))
}

/// The vaccination dates that have any counter, in order.
pub fn dates(txn: &ReadTransaction) -> anyhow::Result<Vec<Date>> {
    let mut dates = std::collections::BTreeSet::new();
    for prefix in ["d|", "l|", "r|"] {
        for (cell, _) in cells_with_prefix(txn, prefix)? {
            dates.extend(cell.date());
        }
    }
    Ok(dates.into_iter().collect())
}

/// A venue as the municipality keeps it: what the public listing shows, and whether it is
/// listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VenueRecord {
    /// What is published.
    pub venue: PublicVenue,
    /// Shown in the national public listing.
    pub listed: bool,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// The body of `POST /api/v1/venues/{venue}`: the venue's public fields (its id comes from
/// the path) and whether it is listed.
#[derive(Clone, Debug, Deserialize)]
pub struct VenueBody {
    /// What the listing shows.
    #[serde(flatten)]
    pub venue: PublicVenue,
    /// Listed publicly (default true).
    #[serde(default = "listed_by_default")]
    pub listed: bool,
}

fn listed_by_default() -> bool {
    true
}

/// Checks a venue: the name, address and note are plain text of bounded length, every
/// product is in the catalogue, every opening day is a weekday name or a date.
pub fn check_venue(id: &str, body: VenueBody, catalogue: &Catalogue) -> Result<VenueRecord, Problem> {
    crate::api::check_id_field("venue", id)?;
    let text = |field: &str, value: &str, max: usize, required: bool| -> Result<String, Problem> {
        let value = value.trim();
        let n = value.chars().count();
        if (required && n == 0) || n > max || value.chars().any(char::is_control) {
            return Err(Problem::bad_field(
                field,
                format!("{field}: 1–{max} characters of text, without control characters"),
                format!("{field}: 制御文字を含まない {max} 文字以内の文字列を入力してください"),
            ));
        }
        Ok(value.to_owned())
    };
    let VenueBody { venue, listed } = body;
    let name = text("name", &venue.name, 100, true)?;
    let address = text("address", &venue.address, 200, true)?;
    let note = text("note", &venue.note, 500, false)?;
    if venue.products.is_empty() {
        return Err(Problem::bad_field(
            "products",
            "list at least one product",
            "ワクチンを一つ以上指定してください",
        ));
    }
    for product in &venue.products {
        if !catalogue.products.iter().any(|p| &p.code == product) {
            return Err(Problem::bad_field(
                "products",
                format!("products: {product:?} is not in the vaccine catalogue"),
                format!("products: 「{product}」はワクチン一覧にありません"),
            ));
        }
    }
    for day in &venue.opening_days {
        let date = Date::parse(day, &time::format_description::well_known::Iso8601::DATE).is_ok();
        if !date && !WEEKDAYS.contains(&day.as_str()) {
            return Err(Problem::bad_field(
                "opening_days",
                format!("opening_days: {day:?} is neither a weekday (mon … sun) nor a date (YYYY-MM-DD)"),
                format!("opening_days: 「{day}」は曜日（mon〜sun）でも日付（YYYY-MM-DD）でもありません"),
            ));
        }
    }
    let venue = PublicVenue { id: id.to_owned(), name, address, note, ..venue };
    Ok(VenueRecord { venue, listed, updated_at: crate::clock::rfc3339(OffsetDateTime::now_utc()) })
}

/// A report being sent, and what to clear once the national node has stored it.
pub struct Report {
    /// What goes on the wire.
    pub request: ReportRequest,
    /// Slots sent and the change number each had when read.
    slots: Vec<(String, u64)>,
    /// The newest version in the report.
    version: u64,
    /// The newest checkpoint in the report.
    anchored: Option<u64>,
    /// The population's date, when it was sent.
    population_as_of: Option<Date>,
}

impl Report {
    /// Whether it carries anything (an empty one is a heartbeat).
    pub fn is_empty(&self) -> bool {
        self.request.statistics.is_empty() && self.request.checkpoints.is_empty()
    }
}

/// Builds and acknowledges reports for a municipal primary.
pub struct Reporter {
    store: Arc<Store>,
    writer: WriterHandle,
    key: Ed25519KeyPair,
    municipality: MunicipalityCode,
    /// The node's audit public key (hex), naming its log in deposited checkpoints.
    audit_key: String,
    last_version: AtomicU64,
    /// Day (Julian) of the population last acknowledged; the population is re-sent daily
    /// because ages move with the date.
    population_day: AtomicU64,
}

impl Reporter {
    /// A reporter signing with `key` (the municipality's coupon key, as in the directory).
    pub fn new(
        store: Arc<Store>,
        writer: WriterHandle,
        key: Ed25519KeyPair,
        municipality: MunicipalityCode,
        audit_public_key: &[u8],
    ) -> anyhow::Result<Reporter> {
        let last = store.read()?.meta(META_STATS_VERSION)?;
        Ok(Reporter {
            store,
            writer,
            key,
            municipality,
            audit_key: protocol::person::hex_lower(audit_public_key),
            last_version: AtomicU64::new(last),
            population_day: AtomicU64::new(0),
        })
    }

    /// The next version: the time in microseconds, and always above the last one, so a
    /// restarted or promoted node keeps replacing what the national node holds.
    fn next_version(&self, now: OffsetDateTime) -> u64 {
        let micros = u64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(0);
        let mut last = self.last_version.load(Ordering::Relaxed);
        loop {
            let next = micros.max(last + 1);
            match self.last_version.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// The due documents (at most [`MAX_STATISTICS_PER_REPORT`]) and the checkpoints not
    /// deposited yet, signed.
    pub fn build(&self, now: OffsetDateTime, today: Date) -> anyhow::Result<Report> {
        let view = self.store.read()?;
        let txn = view.txn();
        let mut slots: Vec<(String, u64)> = Vec::new();
        // One place is kept for the population, which is due every day without a mark.
        for row in txn.open_table(STATS_DIRTY)?.iter()?.take(MAX_STATISTICS_PER_REPORT - 1) {
            let (slot, seq) = row?;
            slots.push((slot.value().to_owned(), seq.value()));
        }
        let today_day = u64::try_from(today.to_julian_day()).unwrap_or(0);
        let population_due = self.population_day.load(Ordering::Relaxed) != today_day;
        if population_due && !slots.iter().any(|(slot, _)| slot == "population") {
            slots.push(("population".to_owned(), 0));
        }
        let generated_at = crate::clock::rfc3339(now);
        let mut statistics = Vec::with_capacity(slots.len());
        let mut version = 0;
        let mut population_as_of = None;
        let mut bytes = 0;
        let mut included = 0;
        for (slot, _) in &slots {
            if bytes > MAX_REPORT_BYTES {
                break;
            }
            included += 1;
            version = self.next_version(now);
            let document = if slot == "population" {
                population_as_of = Some(today);
                Statistics::Population(population(
                    txn,
                    self.municipality,
                    today,
                    version,
                    generated_at.clone(),
                )?)
            } else if slot == "stock" {
                Statistics::Stock(protocol::statistics::StockReport {
                    municipality: self.municipality,
                    version,
                    generated_at: generated_at.clone(),
                    venues: venue_stock(txn)?,
                })
            } else if slot == "venues" {
                let venues = all_json::<VenueRecord>(&txn.open_table(VENUES)?)?
                    .into_iter()
                    .filter(|(_, record)| record.listed)
                    .map(|(_, record)| record.venue)
                    .collect();
                Statistics::Venues(VenueListing {
                    municipality: self.municipality,
                    version,
                    generated_at: generated_at.clone(),
                    venues,
                })
            } else {
                let date = slot
                    .strip_prefix("daily/")
                    .and_then(|d| Date::parse(d, &time::format_description::well_known::Iso8601::DATE).ok())
                    .with_context(|| format!("statistics slot {slot} is unreadable"))?;
                Statistics::Daily(daily(txn, self.municipality, date, version, generated_at.clone())?)
            };
            let signed = SignedStatistics::sign(&document, &self.key);
            bytes += signed.body.len() + signed.signature.len();
            statistics.push(signed);
        }
        slots.truncate(included);
        if population_as_of.is_some() && !slots.iter().any(|(slot, _)| slot == "population") {
            population_as_of = None;
        }
        let anchored = txn.open_table(META)?.get(META_ANCHORED)?.map_or(0, |v| v.value());
        let mut checkpoints = Vec::new();
        for row in txn.open_table(AUDIT_CHECKPOINTS)?.range(anchored + 1..)?.take(MAX_CHECKPOINTS_PER_REPORT)
        {
            let (_, bytes) = row?;
            let checkpoint: Checkpoint = serde_json::from_slice(bytes.value())?;
            checkpoints.push(AnchoredCheckpoint {
                municipality: self.municipality,
                log_key: self.audit_key.clone(),
                seq: checkpoint.seq,
                hash: checkpoint.hash,
                at: checkpoint.at,
                signature: checkpoint.signature,
            });
        }
        let anchored = checkpoints.last().map(|c| c.seq);
        Ok(Report {
            request: ReportRequest { statistics, checkpoints },
            slots,
            version,
            anchored,
            population_as_of,
        })
    }

    /// The national node stored `report`: clears the slots nothing has touched since, and
    /// remembers the version and the checkpoints deposited. If it kept fewer documents than
    /// were sent, some versions were not newer than what it holds (a promoted standby whose
    /// clock is behind the old primary's): the slots stay due and the next versions start
    /// above `held_version`.
    pub async fn acknowledged(&self, report: Report, accepted: u32, held_version: u64) -> anyhow::Result<()> {
        let sent = report.request.statistics.len();
        let behind = (accepted as usize) < sent;
        self.last_version.fetch_max(held_version, Ordering::Relaxed);
        if behind {
            tracing::warn!(
                sent,
                accepted,
                held_version,
                "the national node holds newer versions; sending again above them"
            );
        }
        let slots = if behind { Vec::new() } else { report.slots.clone() };
        let version = report.version.max(held_version);
        let report = Report { slots, version, ..report };
        if let Some(as_of) = report.population_as_of.filter(|_| !behind) {
            let day = u64::try_from(as_of.to_julian_day()).unwrap_or(0);
            self.population_day.store(day, Ordering::Relaxed);
        }
        if report.is_empty() {
            return Ok(());
        }
        let who = Who { actor: "node".into(), role: "-".into(), request_id: "-".into() };
        let n_statistics = report.request.statistics.len();
        let n_checkpoints = report.request.checkpoints.len();
        let Report { slots, version, anchored, .. } = report;
        self.writer
            .call(&who, |reply| Command::Apply {
                action: "statistics.report".into(),
                subject: format!("national:statistics={n_statistics},checkpoints={n_checkpoints}"),
                op: Box::new(move |txn, _now| {
                    let mut dirty = txn.open_table(STATS_DIRTY)?;
                    for (slot, seq) in &slots {
                        let current = dirty.get(slot.as_str())?.map(|v| v.value());
                        if current == Some(*seq) {
                            dirty.remove(slot.as_str())?;
                        }
                    }
                    drop(dirty);
                    let mut meta = txn.open_table(META)?;
                    let held = meta.get(META_STATS_VERSION)?.map_or(0, |v| v.value());
                    meta.insert(META_STATS_VERSION, held.max(version))?;
                    if let Some(seq) = anchored {
                        let held = meta.get(META_ANCHORED)?.map_or(0, |v| v.value());
                        meta.insert(META_ANCHORED, held.max(seq))?;
                    }
                    Ok(Ok(serde_json::Value::Null))
                }),
                reply,
            })
            .await
            .map_err(|problem| anyhow::anyhow!("{}: {}", problem.code, problem.message_en))?;
        Ok(())
    }

    /// Slots waiting to be sent.
    pub fn due(&self) -> anyhow::Result<u64> {
        Ok(self.store.read()?.txn().open_table(STATS_DIRTY)?.len()?)
    }
}

/// A line of a municipality's stock ledger (doses, 接種回数分).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StockEntry {
    /// `allocation` (municipality → venue), `delivery` (received at the venue) or `wastage`.
    pub kind: StockKind,
    /// Venue id.
    pub venue: String,
    /// Catalogue product code.
    pub product: String,
    /// Doses.
    pub doses: u64,
    /// Why (wastage: broken vial, expired, left over at closing…).
    #[serde(default)]
    pub reason: String,
    /// Who recorded it.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
}

/// What a stock entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StockKind {
    /// The municipality allocates doses to a venue.
    Allocation,
    /// Doses arrived at the venue.
    Delivery,
    /// Doses lost at the venue.
    Wastage,
}

/// Checks a stock entry's fields (the caller checks who may record which kind).
pub fn check_stock_entry(
    kind: StockKind,
    venue: &str,
    product: &str,
    doses: u64,
    reason: &str,
    catalogue: &Catalogue,
) -> Result<(), Problem> {
    crate::api::check_id_field("venue", venue)?;
    if !catalogue.products.iter().any(|p| p.code == product) {
        return Err(Problem::bad_field(
            "product",
            format!("product: {product:?} is not in the vaccine catalogue"),
            format!("product: 「{product}」はワクチン一覧にありません"),
        ));
    }
    if doses == 0 || doses > 1_000_000 {
        return Err(Problem::bad_field(
            "doses",
            "doses: 1 to 1,000,000",
            "doses: 1〜1,000,000 回分で入力してください",
        ));
    }
    if kind == StockKind::Wastage && reason.trim().is_empty() {
        return Err(Problem::bad_field("reason", "wastage needs a reason", "廃棄には理由が必要です"));
    }
    if reason.chars().count() > 200 || reason.chars().any(char::is_control) {
        return Err(Problem::bad_field(
            "reason",
            "reason: up to 200 characters of text",
            "reason: 200 文字以内の文字列",
        ));
    }
    Ok(())
}

/// The ledger summed per venue and product.
pub fn venue_stock(txn: &ReadTransaction) -> anyhow::Result<Vec<protocol::statistics::VenueStock>> {
    let mut sums: BTreeMap<(String, String), protocol::statistics::VenueStock> = BTreeMap::new();
    for (_, entry) in all_json::<StockEntry>(&txn.open_table(STOCK)?)? {
        let row = sums.entry((entry.venue.clone(), entry.product.clone())).or_insert_with(|| {
            protocol::statistics::VenueStock {
                venue: entry.venue.clone(),
                product: entry.product.clone(),
                allocated: 0,
                delivered: 0,
                wasted: 0,
            }
        });
        match entry.kind {
            StockKind::Allocation => row.allocated += entry.doses,
            StockKind::Delivery => row.delivered += entry.doses,
            StockKind::Wastage => row.wasted += entry.doses,
        }
    }
    Ok(sums.into_values().collect())
}

/// Doses used at each of the municipality's venues by product, in all and over the seven
/// days up to `today`.
pub fn venue_usage(
    txn: &ReadTransaction,
    today: Date,
) -> anyhow::Result<BTreeMap<(String, String), (u64, u64)>> {
    let week_start = today.checked_sub(time::Duration::days(6)).unwrap_or(Date::MIN);
    let mut out: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for (cell, n) in cells_with_prefix(txn, "u|")? {
        if let Cell::Used { date, venue, product } = cell {
            let entry = out.entry((venue, product)).or_default();
            entry.0 += n;
            if (week_start..=today).contains(&date) {
                entry.1 += n;
            }
        }
    }
    Ok(out)
}

/// What the documents say the dose and population counters should be.
fn recount(store: &Store) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let view = store.read()?;
        let ids = view.resident_ids(after.as_deref(), 1024)?;
        let Some(last) = ids.last().cloned() else { break };
        for id in &ids {
            let record = view.record(id)?.with_context(|| format!("resident {id} has no document"))?;
            for (cell, n) in record_cells(&record) {
                *expected.entry(cell.key()).or_default() += u64::try_from(n).unwrap_or(0);
            }
        }
        after = Some(last);
    }
    Ok(expected)
}

/// The dose and population counters as stored.
fn stored_counts(txn: &ReadTransaction) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for prefix in ["d|", "p|", "u|"] {
        for (cell, n) in cells_with_prefix(txn, prefix)? {
            out.insert(cell.key(), n);
        }
    }
    Ok(out)
}

/// Counters that differ from what the documents say: `(key, stored, expected)`.
pub fn verify(store: &Store) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let expected = recount(store)?;
    let stored = stored_counts(store.read()?.txn())?;
    let keys: std::collections::BTreeSet<&String> = expected.keys().chain(stored.keys()).collect();
    Ok(keys
        .into_iter()
        .filter_map(|key| {
            let (s, e) = (stored.get(key).copied().unwrap_or(0), expected.get(key).copied().unwrap_or(0));
            (s != e).then(|| (key.clone(), s, e))
        })
        .collect())
}

/// Recounts the dose and population counters from the documents (a promoted standby, whose
/// replicated documents did not move them) and marks every document due. Entry lags and
/// refusals are facts of the primary's events and stay as they are. Run with the daemon
/// stopped. Returns the number of counters written.
pub fn rebuild(store: &Store) -> anyhow::Result<usize> {
    let expected = recount(store)?;
    let txn = store.begin_write()?;
    {
        let seq = crate::store::bump(&txn, crate::store::META_STATS_SEQ)?;
        let mut stats = txn.open_table(STATS)?;
        // Every date with a counter before or after: a date whose counters all went must be
        // reported again too, or the national node would keep its old figures.
        let mut dates = std::collections::BTreeSet::new();
        let mut stale = Vec::new();
        for row in stats.iter()? {
            let (key, _) = row?;
            dates.extend(Cell::parse(key.value()).and_then(|c| c.date()));
            if ["d|", "p|", "u|"].iter().any(|prefix| key.value().starts_with(prefix)) {
                stale.push(key.value().to_owned());
            }
        }
        for key in stale {
            stats.remove(key.as_str())?;
        }
        for (key, n) in &expected {
            stats.insert(key.as_str(), *n)?;
            dates.extend(Cell::parse(key).and_then(|c| c.date()));
        }
        drop(stats);
        let mut dirty = txn.open_table(STATS_DIRTY)?;
        for slot in ["population", "venues", "stock"] {
            dirty.insert(slot, seq)?;
        }
        for date in dates {
            dirty.insert(format!("daily/{date}").as_str(), seq)?;
        }
        drop(dirty);
        txn.open_table(META)?.insert(crate::store::META_STATS_COUNTED, 1)?;
    }
    txn.commit()?;
    Ok(expected.len())
}
