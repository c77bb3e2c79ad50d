//! The national node's data: statistics reported by the municipalities, their audit
//! checkpoints, and the answers national users get — totals, coverage, freshness and the
//! V-SYS-style daily report. No resident, name, birth date, address or coupon number ever
//! reaches it: a report carries counts by date, product, dose number, age band, sex and
//! municipality, and checkpoints carry a hash.
//!
//! `national.redb` keeps every document as the municipality signed it. National and
//! prefecture totals per date are held in memory (rebuilt from the stored documents at
//! start) and changed by each replacing document, so a query over a year of all 1,741
//! municipalities adds a few hundred thousand numbers rather than reading 635,000 documents.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, mpsc};

use anyhow::Context;
use protocol::directory::{DirectoryEntry, NodeRole};
use protocol::document::Sex;
use protocol::municipality::{MunicipalityCode, all_municipalities, lookup_municipality};
use protocol::person::hex_decode;
use protocol::statistics::{
    AgeBand, AnchoredCheckpoint, DailyStatistics, MAX_CHECKPOINTS_PER_REPORT, MAX_STATISTICS_PER_REPORT,
    PopulationCount, PublicVenue, ReportRequest, ReportResponse, SignedStatistics, Statistics, VenueStock,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

/// (municipality, slot) → JSON of the [`SignedStatistics`] held (the newest version).
const STATISTICS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("national_statistics");
/// municipality → JSON of [`Freshness`].
const REPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("national_reports");
/// seq → JSON of an [`Allocation`].
const ALLOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("national_allocations");
/// (municipality, audit log key, seq) → JSON of the [`AnchoredCheckpoint`] deposited first.
const ANCHORS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("national_anchors");

/// What national totals are kept by.
type Dim = (String, u8, AgeBand, Sex);
/// Totals by date.
type Series = BTreeMap<Date, HashMap<Dim, u64>>;

/// When a municipality last reported.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Freshness {
    /// When the national node last heard from it (its own clock, RFC 3339).
    pub last_report_at: Option<String>,
    /// `generated_at` of the newest document received.
    pub last_generated_at: Option<String>,
    /// Newest version received.
    pub last_version: u64,
    /// Documents held.
    pub documents: u64,
}

#[derive(Default)]
struct Aggregates {
    national: Series,
    prefecture: HashMap<u8, Series>,
    population: HashMap<MunicipalityCode, Vec<PopulationCount>>,
    venues: HashMap<MunicipalityCode, Vec<PublicVenue>>,
    freshness: HashMap<MunicipalityCode, Freshness>,
    /// Doses given at the venues of each municipality, by date and product.
    used: HashMap<MunicipalityCode, BTreeMap<Date, HashMap<String, u64>>>,
    /// Each municipality's venue stock report.
    stock: HashMap<MunicipalityCode, Vec<VenueStock>>,
    allocations: Vec<Allocation>,
}

/// Vaccine doses (接種回数分) passed down a level: from the state to a prefecture, or from a
/// prefecture to one of its municipalities.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Allocation {
    /// Number in the ledger.
    pub id: u64,
    /// When (RFC 3339).
    pub at: String,
    /// Who (`token:<name>`).
    pub by: String,
    /// To a prefecture (by the state).
    pub to_prefecture: Option<u8>,
    /// To a municipality (by its prefecture).
    pub to_municipality: Option<MunicipalityCode>,
    /// Product code.
    pub product: String,
    /// Doses.
    pub doses: u64,
}

/// Why an allocation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationRefusal {
    /// The prefecture holds fewer undistributed doses of the product.
    Insufficient {
        /// What it holds.
        available: u64,
    },
}

/// Stock of one product in a scope.
#[derive(Clone, Debug, Serialize)]
pub struct StockRow {
    /// Product code.
    pub product: String,
    /// Allocated into the scope from the level above (for the nation: to all prefectures).
    pub received: u64,
    /// Passed on to the level below (prefecture → municipalities, municipality → venues).
    pub passed_on: Option<u64>,
    /// Given at the scope's venues, up to `as_of`.
    pub used: u64,
    /// Reported wasted at the scope's venues.
    pub wasted: u64,
    /// received − used − wasted (negative: more used than allocated).
    pub on_hand: i64,
    /// Average daily use over the seven days up to `as_of`.
    pub daily_use_7d: f64,
    /// on_hand ÷ daily use.
    pub days_of_supply: Option<f64>,
}

fn add_doc(series: &mut Series, doc: &DailyStatistics, sign: i64) {
    let day = series.entry(doc.date).or_default();
    for row in &doc.doses {
        let dim = (row.product.clone(), row.dose_number, row.age_band, row.sex);
        let count = day.entry(dim.clone()).or_default();
        *count = count.saturating_add_signed(sign * i64::try_from(row.count).unwrap_or(i64::MAX));
        if *count == 0 {
            day.remove(&dim);
        }
    }
}

impl Aggregates {
    fn apply(&mut self, old: Option<&Statistics>, new: &Statistics) {
        let municipality = new.municipality();
        let prefecture = municipality.prefecture_code();
        for (doc, sign) in [(old, -1), (Some(new), 1)] {
            match doc {
                Some(Statistics::Daily(daily)) => {
                    add_doc(&mut self.national, daily, sign);
                    add_doc(self.prefecture.entry(prefecture).or_default(), daily, sign);
                    for row in &daily.doses {
                        let day = self
                            .used
                            .entry(row.venue_municipality)
                            .or_default()
                            .entry(daily.date)
                            .or_default();
                        let count = day.entry(row.product.clone()).or_default();
                        *count =
                            count.saturating_add_signed(sign * i64::try_from(row.count).unwrap_or(i64::MAX));
                    }
                }
                Some(Statistics::Stock(report)) if sign > 0 => {
                    self.stock.insert(municipality, report.venues.clone());
                }
                Some(Statistics::Population(population)) if sign > 0 => {
                    self.population.insert(municipality, population.cells.clone());
                }
                Some(Statistics::Venues(listing)) if sign > 0 => {
                    self.venues.insert(municipality, listing.venues.clone());
                }
                _ => {}
            }
        }
    }
}

/// Where a query looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// All of Japan.
    National,
    /// One prefecture, 1..=47.
    Prefecture(u8),
    /// One municipality.
    Municipality(MunicipalityCode),
}

impl Scope {
    /// Whether a municipality is inside.
    pub fn contains(self, municipality: MunicipalityCode) -> bool {
        match self {
            Scope::National => true,
            Scope::Prefecture(p) => municipality.prefecture_code() == p,
            Scope::Municipality(m) => m == municipality,
        }
    }

    /// Whether a prefecture user of `prefecture` may look here.
    pub fn within_prefecture(self, prefecture: u8) -> bool {
        match self {
            Scope::National => false,
            Scope::Prefecture(p) => p == prefecture,
            Scope::Municipality(m) => m.prefecture_code() == prefecture,
        }
    }
}

/// Which dimensions a total is broken down by.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupBy {
    /// By vaccination date.
    pub date: bool,
    /// By product.
    pub product: bool,
    /// By dose number.
    pub dose_number: bool,
    /// By age band.
    pub age_band: bool,
    /// By sex.
    pub sex: bool,
}

/// One row of a total.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TotalRow {
    /// Date, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date: Option<Date>,
    /// Product, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Dose number, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dose_number: Option<u8>,
    /// Age band, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_band: Option<AgeBand>,
    /// Sex, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sex: Option<Sex>,
    /// Doses.
    pub count: u64,
}

fn accumulate(out: &mut BTreeMap<TotalRow, u64>, by: GroupBy, date: Date, dim: &Dim, count: u64) {
    let key = TotalRow {
        date: by.date.then_some(date),
        product: by.product.then(|| dim.0.clone()),
        dose_number: by.dose_number.then_some(dim.1),
        age_band: by.age_band.then_some(dim.2),
        sex: by.sex.then_some(dim.3),
        count: 0,
    };
    *out.entry(key).or_default() += count;
}

/// Coverage of one dose number (and age band, when asked by band).
#[derive(Clone, Debug, Serialize)]
pub struct CoverageRow {
    /// Dose number.
    pub dose_number: u8,
    /// Age band (on the day of vaccination for the numerator, on `as_of` for the
    /// denominator), or all ages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_band: Option<AgeBand>,
    /// People who received this dose by `as_of`.
    pub vaccinated: u64,
    /// Registered residents.
    pub population: u64,
    /// vaccinated / population.
    pub rate: f64,
}

/// A municipality's freshness, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FreshnessRow {
    /// Code.
    pub municipality: MunicipalityCode,
    /// Name.
    pub name: &'static str,
    /// Prefecture name.
    pub prefecture: &'static str,
    /// When it last reported.
    pub last_report_at: Option<String>,
    /// Minutes since then.
    pub minutes_since_report: Option<i64>,
    /// Not heard from within the threshold (or never).
    pub stale: bool,
}

/// The national node's store.
pub struct NationalStore {
    db: Arc<Database>,
    aggregates: Arc<RwLock<Aggregates>>,
    message_log: Option<Mutex<std::fs::File>>,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for NationalStore {
    /// Stops the writer (after what it holds) and waits for it, so the file is closed.
    fn drop(&mut self) {
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

/// A verified report waiting for the writer.
struct Job {
    municipality: MunicipalityCode,
    documents: Vec<(SignedStatistics, Statistics)>,
    checkpoints: Vec<AnchoredCheckpoint>,
    reply: mpsc::Sender<anyhow::Result<(u32, u32, u64)>>,
}

/// Most reports in one commit.
const GROUP_COMMIT_MAX: usize = 512;

/// The single writer: reports that arrive together share one commit (one fsync), and each
/// is answered only after it.
fn run_writer(db: &Database, aggregates: &RwLock<Aggregates>, jobs: &mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match store_batch(db, &batch) {
            Ok(results) => {
                if let Ok(mut aggregates) = aggregates.write() {
                    for (job, (replaced, freshness, _)) in batch.iter().zip(&results) {
                        for (old, new) in replaced {
                            aggregates.apply(old.as_ref(), new);
                        }
                        aggregates.freshness.insert(job.municipality, freshness.clone());
                    }
                }
                for (job, (replaced, freshness, kept)) in batch.into_iter().zip(results) {
                    let n = u32::try_from(replaced.len()).unwrap_or(u32::MAX);
                    let _ = job.reply.send(Ok((n, kept, freshness.last_version)));
                }
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), reports = batch.len(), "cannot store reports");
                for job in batch {
                    let _ = job.reply.send(Err(anyhow::anyhow!("the commit failed")));
                }
            }
        }
    }
}

type Stored = (Vec<(Option<Statistics>, Statistics)>, Freshness, u32);

fn store_batch(db: &Database, batch: &[Job]) -> anyhow::Result<Vec<Stored>> {
    let now = OffsetDateTime::now_utc();
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut table = txn.open_table(STATISTICS)?;
        let mut anchors = txn.open_table(ANCHORS)?;
        let mut reports = txn.open_table(REPORTS)?;
        for job in batch {
            let code = job.municipality.as_str();
            let mut replaced: Vec<(Option<Statistics>, Statistics)> = Vec::new();
            for (signed, doc) in &job.documents {
                let slot = doc.slot();
                // What is held, seeing this batch's own writes.
                let held: Option<Statistics> = match table.get((code, slot.as_str()))? {
                    Some(bytes) => {
                        Some(serde_json::from_slice::<SignedStatistics>(bytes.value())?.read_unchecked()?)
                    }
                    None => None,
                };
                if held.as_ref().is_some_and(|h| h.version() >= doc.version()) {
                    continue;
                }
                table.insert((code, slot.as_str()), serde_json::to_vec(signed)?.as_slice())?;
                replaced.push((held, doc.clone()));
            }
            let mut kept = 0;
            for checkpoint in &job.checkpoints {
                let key = (code, checkpoint.log_key.as_str(), checkpoint.seq);
                if anchors.get(key)?.is_none() {
                    anchors.insert(key, serde_json::to_vec(checkpoint)?.as_slice())?;
                    kept += 1;
                }
            }
            let mut freshness: Freshness = match reports.get(code)? {
                Some(bytes) => serde_json::from_slice(bytes.value())?,
                None => Freshness::default(),
            };
            freshness.last_report_at = Some(crate::clock::rfc3339(now));
            for (old, doc) in &replaced {
                freshness.last_version = freshness.last_version.max(doc.version());
                if old.is_none() {
                    freshness.documents += 1;
                }
            }
            if let Some((_, doc)) = replaced.last() {
                freshness.last_generated_at = Some(doc.generated_at().to_owned());
            }
            reports.insert(code, serde_json::to_vec(&freshness)?.as_slice())?;
            results.push((replaced, freshness, kept));
        }
    }
    txn.commit()?;
    Ok(results)
}

fn refused(code: &str, message: String) -> ReportResponse {
    ReportResponse::Refused { code: code.to_owned(), message }
}

impl NationalStore {
    /// Opens (or creates) `national.redb` in `dir` and rebuilds the totals from it.
    /// `message_log`, if set, receives every report as it arrived (JSON Lines).
    pub fn open(dir: &Path, message_log: Option<&Path>) -> anyhow::Result<NationalStore> {
        let path = dir.join("national.redb");
        let db = Database::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let txn = db.begin_write()?;
        {
            txn.open_table(STATISTICS)?;
            txn.open_table(REPORTS)?;
            txn.open_table(ANCHORS)?;
            txn.open_table(ALLOCATIONS)?;
            txn.open_table(crate::auth::USERS)?;
            txn.open_table(crate::auth::SESSIONS)?;
            txn.open_table(crate::auth::API_TOKENS)?;
            txn.open_table(crate::auth::TOKEN_NAMES)?;
        }
        txn.commit()?;
        crate::ledger::create_tables(&db)?;
        let mut aggregates = Aggregates::default();
        {
            let read = db.begin_read()?;
            for row in read.open_table(STATISTICS)?.iter()? {
                let (key, bytes) = row?;
                let signed: SignedStatistics = serde_json::from_slice(bytes.value())?;
                let doc = signed
                    .read_unchecked()
                    .with_context(|| format!("stored statistics {:?} are unreadable", key.value()))?;
                aggregates.apply(None, &doc);
            }
            for row in read.open_table(ALLOCATIONS)?.iter()? {
                aggregates.allocations.push(serde_json::from_slice(row?.1.value())?);
            }
            for row in read.open_table(REPORTS)?.iter()? {
                let (key, bytes) = row?;
                let code = MunicipalityCode::parse(key.value())?;
                aggregates.freshness.insert(code, serde_json::from_slice(bytes.value())?);
            }
        }
        let message_log = match message_log {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            )),
            None => None,
        };
        let db = Arc::new(db);
        let aggregates = Arc::new(RwLock::new(aggregates));
        let (sender, receiver) = mpsc::channel();
        let (writer_db, writer_aggregates) = (db.clone(), aggregates.clone());
        let thread = std::thread::Builder::new()
            .name("national-writer".into())
            .spawn(move || run_writer(&writer_db, &writer_aggregates, &receiver))?;
        Ok(NationalStore {
            db,
            aggregates,
            message_log,
            writer: Mutex::new(Some(sender)),
            writer_thread: Some(thread),
        })
    }

    /// The database (accounts live in it too).
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Appends a received message to the message log, if there is one.
    pub fn log_message(&self, peer: &str, kind: &str, message: &impl Serialize) {
        let Some(log) = &self.message_log else { return };
        let line = serde_json::json!({
            "received_at": crate::clock::rfc3339(OffsetDateTime::now_utc()),
            "peer": peer,
            "kind": kind,
            "message": message,
        });
        if let Ok(mut file) = log.lock() {
            let _ = writeln!(file, "{line}");
        }
    }

    /// Stores a municipality's report: every document must be signed by the sender's
    /// municipality and be about it; otherwise nothing is stored. A document replaces the
    /// one held for its slot only if its version is newer; a checkpoint is kept once.
    pub fn ingest(&self, sender: &DirectoryEntry, request: &ReportRequest) -> ReportResponse {
        let (Some(municipality), NodeRole::Municipal) = (sender.municipality, sender.role) else {
            return refused("not_a_municipal_node", "only a municipality's primary node reports".into());
        };
        if request.statistics.len() > MAX_STATISTICS_PER_REPORT
            || request.checkpoints.len() > MAX_CHECKPOINTS_PER_REPORT
        {
            return refused(
                "too_large",
                format!(
                    "a report holds at most {MAX_STATISTICS_PER_REPORT} documents and \
                     {MAX_CHECKPOINTS_PER_REPORT} checkpoints"
                ),
            );
        }
        let Some(key) = hex_decode(&sender.coupon_key) else {
            return refused("bad_key", format!("the directory holds no key for {municipality}"));
        };
        let mut documents = Vec::with_capacity(request.statistics.len());
        for (index, signed) in request.statistics.iter().enumerate() {
            match signed.open(&key) {
                Ok(doc) if doc.municipality() == municipality => documents.push((signed, doc)),
                Ok(doc) => {
                    return refused(
                        "wrong_municipality",
                        format!("document {index} is about {}, not {municipality}", doc.municipality()),
                    );
                }
                Err(error) => return refused("bad_statistics", format!("document {index}: {error}")),
            }
        }
        if let Some(checkpoint) = request.checkpoints.iter().find(|c| c.municipality != municipality) {
            return refused(
                "wrong_municipality",
                format!(
                    "checkpoint {} is of {}, not {municipality}",
                    checkpoint.seq, checkpoint.municipality
                ),
            );
        }
        let (reply, answer) = mpsc::channel();
        let job = Job {
            municipality,
            documents: documents.into_iter().map(|(signed, doc)| (signed.clone(), doc)).collect(),
            checkpoints: request.checkpoints.clone(),
            reply,
        };
        let sent = self
            .writer
            .lock()
            .map_err(|_| ())
            .and_then(|writer| writer.as_ref().ok_or(())?.send(job).map_err(|_| ()));
        match sent.ok().and_then(|()| answer.recv().ok()) {
            Some(Ok((statistics, checkpoints, held_version))) => {
                ReportResponse::Stored { statistics, checkpoints, held_version }
            }
            _ => {
                tracing::error!(%municipality, "cannot store a report");
                refused("internal", "the national node could not store the report; send it again".into())
            }
        }
    }

    /// Dose totals of `scope` from `from` to `to` (inclusive), broken down by `by`.
    pub fn totals(&self, scope: Scope, from: Date, to: Date, by: GroupBy) -> anyhow::Result<Vec<TotalRow>> {
        let mut out = BTreeMap::new();
        match scope {
            Scope::Municipality(municipality) => {
                for doc in self.daily_documents(municipality, from, to)? {
                    for row in &doc.doses {
                        let dim = (row.product.clone(), row.dose_number, row.age_band, row.sex);
                        accumulate(&mut out, by, doc.date, &dim, row.count);
                    }
                }
            }
            Scope::National | Scope::Prefecture(_) => {
                let aggregates =
                    self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
                let series = match scope {
                    Scope::Prefecture(p) => aggregates.prefecture.get(&p),
                    _ => Some(&aggregates.national),
                };
                for (date, day) in series.into_iter().flat_map(|s| s.range(from..=to)) {
                    for (dim, count) in day {
                        accumulate(&mut out, by, *date, dim, *count);
                    }
                }
            }
        }
        Ok(out.into_iter().map(|(row, count)| TotalRow { count, ..row }).collect())
    }

    /// A municipality's daily documents between two dates, as stored.
    pub fn daily_documents(
        &self,
        municipality: MunicipalityCode,
        from: Date,
        to: Date,
    ) -> anyhow::Result<Vec<DailyStatistics>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(STATISTICS)?;
        let code = municipality.as_str();
        let (low, high) = (format!("daily/{from}"), format!("daily/{to}"));
        let mut out = Vec::new();
        for row in table.range((code, low.as_str())..=(code, high.as_str()))? {
            let (_, bytes) = row?;
            if let Statistics::Daily(doc) =
                serde_json::from_slice::<SignedStatistics>(bytes.value())?.read_unchecked()?
            {
                out.push(doc);
            }
        }
        Ok(out)
    }

    /// Coverage in `scope` as of `as_of`: people with each dose over the registered population,
    /// in all and, if `by_age_band`, per band.
    pub fn coverage(&self, scope: Scope, as_of: Date, by_age_band: bool) -> anyhow::Result<Vec<CoverageRow>> {
        let by = GroupBy { dose_number: true, age_band: by_age_band, ..GroupBy::default() };
        let first = Date::MIN;
        let totals = self.totals(scope, first, as_of, by)?;
        let aggregates = self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        let mut population: BTreeMap<Option<AgeBand>, u64> = BTreeMap::new();
        for (municipality, cells) in &aggregates.population {
            if !scope.contains(*municipality) {
                continue;
            }
            for cell in cells {
                *population.entry(by_age_band.then_some(cell.age_band)).or_default() += cell.count;
            }
        }
        Ok(totals
            .into_iter()
            .filter_map(|row| {
                let dose_number = row.dose_number?;
                let denominator = population.get(&row.age_band).copied().unwrap_or(0);
                let rate = if denominator == 0 { 0.0 } else { row.count as f64 / denominator as f64 };
                Some(CoverageRow {
                    dose_number,
                    age_band: row.age_band,
                    vaccinated: row.count,
                    population: denominator,
                    rate,
                })
            })
            .collect())
    }

    /// Every municipality in `scope` with when it last reported; stale if not within `stale_after`.
    pub fn freshness(&self, scope: Scope, stale_after: time::Duration) -> anyhow::Result<Vec<FreshnessRow>> {
        let now = OffsetDateTime::now_utc();
        let aggregates = self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        Ok(all_municipalities()
            .iter()
            .filter(|m| scope.contains(m.code))
            .map(|m| {
                let last = aggregates.freshness.get(&m.code).and_then(|f| f.last_report_at.clone());
                let since = last
                    .as_deref()
                    .and_then(|t| {
                        OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
                    })
                    .map(|at| now - at);
                FreshnessRow {
                    municipality: m.code,
                    name: m.name,
                    prefecture: m.prefecture,
                    last_report_at: last,
                    minutes_since_report: since.map(|d| d.whole_minutes()),
                    stale: since.is_none_or(|d| d > stale_after),
                }
            })
            .collect())
    }

    /// The checkpoints a municipality deposited, oldest first.
    pub fn anchors(&self, municipality: MunicipalityCode) -> anyhow::Result<Vec<AnchoredCheckpoint>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(ANCHORS)?;
        let code = municipality.as_str();
        let mut out = Vec::new();
        for row in table.range((code, "", 0)..)? {
            let (key, value) = row?;
            if key.value().0 != code {
                break;
            }
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    /// The V-SYS-style daily report of `date` for `scope`: one line per municipality, product
    /// and dose number, as CSV text.
    pub fn daily_report(&self, scope: Scope, date: Date) -> anyhow::Result<String> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record([
            "都道府県コード",
            "都道府県名",
            "市区町村コード",
            "市区町村名",
            "接種日",
            "ワクチン",
            "接種回",
            "接種件数",
        ])?;
        for municipality in all_municipalities().iter().filter(|m| scope.contains(m.code)) {
            let Some(doc) = self.daily_documents(municipality.code, date, date)?.pop() else { continue };
            let mut by_kind: BTreeMap<(String, u8), u64> = BTreeMap::new();
            for row in &doc.doses {
                *by_kind.entry((row.product.clone(), row.dose_number)).or_default() += row.count;
            }
            for ((product, dose_number), count) in by_kind {
                writer.write_record([
                    format!("{:02}", municipality.prefecture_code),
                    municipality.prefecture.to_owned(),
                    municipality.code.to_string(),
                    municipality.name.to_owned(),
                    date.to_string(),
                    product,
                    format!("{dose_number}回目"),
                    count.to_string(),
                ])?;
            }
        }
        Ok(String::from_utf8(writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?)
    }

    /// The venues listed in `scope`, offering `product` if one is named, with their
    /// municipality.
    pub fn venues(&self, scope: Scope, product: Option<&str>) -> anyhow::Result<Vec<serde_json::Value>> {
        let aggregates = self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        let mut listed: Vec<(&MunicipalityCode, &Vec<PublicVenue>)> =
            aggregates.venues.iter().filter(|(m, _)| scope.contains(**m)).collect();
        listed.sort_by_key(|(m, _)| **m);
        let mut out = Vec::new();
        for (municipality, venues) in listed {
            let known = lookup_municipality(*municipality);
            for venue in venues {
                if product.is_some_and(|p| !venue.products.iter().any(|q| q == p)) {
                    continue;
                }
                out.push(serde_json::json!({
                    "municipality": municipality,
                    "municipality_name": known.map(|m| m.name),
                    "prefecture": known.map(|m| m.prefecture),
                    "venue": venue,
                }));
            }
        }
        Ok(out)
    }

    /// Records an allocation. A prefecture's allocation to a municipality is refused beyond
    /// what the prefecture holds undistributed (checked in the same transaction).
    pub fn allocate(
        &self,
        by: &str,
        to_prefecture: Option<u8>,
        to_municipality: Option<MunicipalityCode>,
        product: &str,
        doses: u64,
    ) -> anyhow::Result<Result<Allocation, AllocationRefusal>> {
        let mut aggregates = self.aggregates.write().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        if let Some(municipality) = to_municipality {
            let prefecture = municipality.prefecture_code();
            let sum = |filter: &dyn Fn(&Allocation) -> bool| -> u64 {
                aggregates
                    .allocations
                    .iter()
                    .filter(|a| a.product == product && filter(a))
                    .map(|a| a.doses)
                    .sum()
            };
            let received = sum(&|a| a.to_prefecture == Some(prefecture));
            let passed = sum(&|a| a.to_municipality.is_some_and(|m| m.prefecture_code() == prefecture));
            let available = received.saturating_sub(passed);
            if doses > available {
                return Ok(Err(AllocationRefusal::Insufficient { available }));
            }
        }
        let txn = self.db.begin_write()?;
        let allocation = {
            let mut table = txn.open_table(ALLOCATIONS)?;
            let id = table.last()?.map_or(0, |(k, _)| k.value()) + 1;
            let allocation = Allocation {
                id,
                at: crate::clock::rfc3339(OffsetDateTime::now_utc()),
                by: by.to_owned(),
                to_prefecture,
                to_municipality,
                product: product.to_owned(),
                doses,
            };
            table.insert(id, serde_json::to_vec(&allocation)?.as_slice())?;
            allocation
        };
        txn.commit()?;
        aggregates.allocations.push(allocation.clone());
        Ok(Ok(allocation))
    }

    /// Allocations into `scope` or below it.
    pub fn allocations(&self, scope: Scope) -> anyhow::Result<Vec<Allocation>> {
        let aggregates = self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        Ok(aggregates
            .allocations
            .iter()
            .filter(|a| match (scope, a.to_prefecture, a.to_municipality) {
                (Scope::National, ..) => true,
                (Scope::Prefecture(p), Some(q), _) => p == q,
                (scope, _, Some(m)) => scope.contains(m),
                _ => false,
            })
            .cloned()
            .collect())
    }

    /// Stock per product in `scope` as of `as_of`.
    pub fn stock(&self, scope: Scope, as_of: Date) -> anyhow::Result<Vec<StockRow>> {
        let aggregates = self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        let mut rows: BTreeMap<String, (u64, u64, u64, u64, u64)> = BTreeMap::new();
        for a in &aggregates.allocations {
            let row = rows.entry(a.product.clone()).or_default();
            let into = match (scope, a.to_prefecture, a.to_municipality) {
                (Scope::National, Some(_), _) => true,
                (Scope::Prefecture(p), Some(q), _) => p == q,
                (Scope::Municipality(m), _, Some(n)) => m == n,
                _ => false,
            };
            let onward = matches!((scope, a.to_municipality), (Scope::Prefecture(p), Some(m)) if m.prefecture_code() == p);
            if into {
                row.0 += a.doses;
            }
            if onward {
                row.1 += a.doses;
            }
        }
        let week_start = as_of.checked_sub(time::Duration::days(6)).unwrap_or(Date::MIN);
        for (municipality, days) in &aggregates.used {
            if !scope.contains(*municipality) {
                continue;
            }
            for (date, products) in days.range(..=as_of) {
                for (product, count) in products {
                    let row = rows.entry(product.clone()).or_default();
                    row.2 += count;
                    if *date >= week_start {
                        row.3 += count;
                    }
                }
            }
        }
        for (municipality, venues) in &aggregates.stock {
            if !scope.contains(*municipality) {
                continue;
            }
            for venue in venues {
                let row = rows.entry(venue.product.clone()).or_default();
                row.4 += venue.wasted;
                if matches!(scope, Scope::Municipality(_)) {
                    row.1 += venue.allocated;
                }
            }
        }
        Ok(rows
            .into_iter()
            .map(|(product, (received, passed_on, used, week, wasted))| {
                let on_hand = i64::try_from(received).unwrap_or(i64::MAX)
                    - i64::try_from(used + wasted).unwrap_or(i64::MAX);
                let daily = week as f64 / 7.0;
                StockRow {
                    product,
                    received,
                    passed_on: (!matches!(scope, Scope::National)).then_some(passed_on),
                    used,
                    wasted,
                    on_hand,
                    daily_use_7d: (daily * 10.0).round() / 10.0,
                    days_of_supply: (daily > 0.0)
                        .then(|| (on_hand.max(0) as f64 / daily * 10.0).round() / 10.0),
                }
            })
            .collect())
    }

    /// How many municipalities reported, and documents held.
    pub fn summary(&self) -> anyhow::Result<serde_json::Value> {
        let aggregates = self.aggregates.read().map_err(|_| anyhow::anyhow!("aggregates poisoned"))?;
        let documents: u64 = aggregates.freshness.values().map(|f| f.documents).sum();
        Ok(serde_json::json!({
            "municipalities_reporting": aggregates.freshness.len(),
            "documents": documents,
            "dates": aggregates.national.len(),
        }))
    }
}
