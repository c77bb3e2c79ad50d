//! Import of the resident register extract (住民基本台帳 CSV).
//!
//! Two passes over the file. The first parses and checks every row and reports every bad
//! row (line, column, reason); if there is any, nothing is written. The second applies the
//! rows in batches: a new 宛名番号 creates a resident document (one commit); a changed row
//! updates the identity (one commit); an unchanged row writes nothing, so importing the same
//! file twice changes nothing. Each batch is one durable redb transaction; a run interrupted
//! between batches is completed by running the same import again.
//!
//! A person who arrived by a handoff accepted without an atena number holds a provisional one
//! (`T…`). The extract's row for them (found by the 個人番号's person key) gives them their
//! real 宛名番号: the resident keeps their id and history, and the row updates the identity.
//!
//! A newcomer whose row names the municipality they moved from (前住所市区町村コード) and a
//! move-in date (転入日) on or after the campaign's start is asked for: the import records a
//! 転入 request for their history, as `POST /api/v1/handoffs/requests` would, and the running
//! node sends it to the national node.
//!
//! Columns (header names in Japanese or English; other columns are ignored):
//! 宛名番号 `atena_number`, 氏名 `name`, 氏名カナ `name_kana`, 生年月日 `birth_date`,
//! 性別 `sex`, 住所 `address`, and optionally 個人番号 `my_number`, 状態 `status`, 転入日
//! `moved_in_on` and 前住所市区町村コード `previous_municipality`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, bail};
use automerge::ActorId;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::document::{
    CouponEntry, Identity, ResidentEvent, ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex, apply_event,
    new_resident_document,
};
use protocol::municipality::MunicipalityCode;
use protocol::person::PersonKeySecret;
use protocol::tip::DocTip;
use protocol::validation::age_on;
use time::{Date, OffsetDateTime};

use crate::clock::{new_id, rfc3339};
use crate::config::NodeFiles;
use crate::handoff::{AskEntry, AskLocal, holds_provisional_atena, put_ask};
use crate::store::{
    HANDOFF_ASKS, IDENTITY_DIGEST, IDX_ATENA, IDX_COUPON, IDX_KANA, IDX_PERSON, META_COUPON_SERIAL,
    META_RESIDENT_SEQ, Mutation, Store, get_json, new_cache, normalize_kana, resident_id,
};

/// How the file is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// UTF-8 if the file is valid UTF-8, otherwise Shift_JIS.
    Auto,
    /// UTF-8 (a byte-order mark is allowed).
    Utf8,
    /// Shift_JIS as Windows writes it (CP932).
    ShiftJis,
}

/// One refused row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    /// Line in the file (the header is line 1).
    pub line: u64,
    /// Column name as in the header.
    pub column: String,
    /// Reason, in Japanese.
    pub reason_ja: String,
    /// Reason, in English.
    pub reason_en: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}行目 [{}] {} / line {}: {}",
            self.line, self.column, self.reason_ja, self.line, self.reason_en
        )
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    /// Data rows read.
    pub rows: u64,
    /// New residents.
    pub created: u64,
    /// Residents whose identity changed.
    pub updated: u64,
    /// Of those, residents whose provisional atena number (given when a handoff was accepted
    /// without one) the extract replaced with their 宛名番号.
    pub reregistered: u64,
    /// Rows identical to what the node holds.
    pub unchanged: u64,
    /// Coupons issued to new residents (`--issue-coupons`).
    pub coupons_issued: u64,
    /// Newcomers whose history was asked for from the municipality they moved from.
    pub asked: u64,
}

/// The outcome: applied, or refused with every bad row.
#[derive(Debug)]
pub enum ImportOutcome {
    /// Applied.
    Applied(ImportReport),
    /// Refused; nothing was written.
    Refused(Vec<RowError>),
}

/// A checked row.
#[derive(Debug, Clone)]
struct Row {
    identity: Identity,
    my_number: Option<String>,
    /// The municipality they moved here from and the day they did (前住所, 転入日).
    moved_from: Option<(MunicipalityCode, Date)>,
}

struct Columns {
    index: HashMap<&'static str, usize>,
    names: HashMap<&'static str, String>,
}

const REQUIRED: [(&str, &str, &str); 6] = [
    ("atena_number", "宛名番号", "atena_number"),
    ("name", "氏名", "name"),
    ("name_kana", "氏名カナ", "name_kana"),
    ("birth_date", "生年月日", "birth_date"),
    ("sex", "性別", "sex"),
    ("address", "住所", "address"),
];
const OPTIONAL: [(&str, &str, &str); 4] = [
    ("my_number", "個人番号", "my_number"),
    ("status", "状態", "status"),
    ("moved_in_on", "転入日", "moved_in_on"),
    ("previous_municipality", "前住所市区町村コード", "previous_municipality"),
];

impl Columns {
    fn from_header(header: &csv::StringRecord) -> Result<Self, Vec<RowError>> {
        let mut index = HashMap::new();
        let mut names = HashMap::new();
        for (i, name) in header.iter().enumerate() {
            let name = name.trim().trim_start_matches('\u{feff}');
            for (key, ja, en) in REQUIRED.iter().chain(OPTIONAL.iter()) {
                if name == *ja || name.eq_ignore_ascii_case(en) {
                    index.insert(*key, i);
                    names.insert(*key, name.to_owned());
                }
            }
        }
        let missing: Vec<RowError> = REQUIRED
            .iter()
            .filter(|(key, _, _)| !index.contains_key(key))
            .map(|(_, ja, en)| RowError {
                line: 1,
                column: (*ja).to_owned(),
                reason_ja: format!("見出し行に列「{ja}」がありません"),
                reason_en: format!("the header has no column {ja} ({en})"),
            })
            .collect();
        if missing.is_empty() { Ok(Self { index, names }) } else { Err(missing) }
    }

    fn get<'r>(&self, record: &'r csv::StringRecord, key: &str) -> Option<&'r str> {
        self.index.get(key).and_then(|i| record.get(*i)).map(str::trim)
    }

    /// The column as the header names it, or its Japanese name if the header has none.
    fn name(&self, key: &str) -> String {
        self.names.get(key).cloned().unwrap_or_else(|| {
            let known = REQUIRED.iter().chain(OPTIONAL.iter()).find(|(k, _, _)| *k == key);
            known.map_or(key, |(_, ja, _)| ja).to_owned()
        })
    }
}

pub(crate) fn open_reader(path: &Path, encoding: Encoding) -> anyhow::Result<csv::Reader<Box<dyn Read>>> {
    Ok(csv_reader(decoded(path, encoding)?))
}

fn csv_reader(text: Box<dyn Read>) -> csv::Reader<Box<dyn Read>> {
    csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(text)
}

/// A reader of the file whose rows [`Lines`] numbers as staff see them in an editor.
pub(crate) fn open_numbered_reader(
    path: &Path,
    encoding: Encoding,
) -> anyhow::Result<(csv::Reader<Box<dyn Read>>, Lines)> {
    let breaks = Rc::new(RefCell::new(VecDeque::new()));
    let tap = LineTap { inner: decoded(path, encoding)?, offset: 0, breaks: Rc::clone(&breaks) };
    Ok((csv_reader(Box::new(tap)), Lines { breaks, newlines: 0 }))
}

fn decoded(path: &Path, encoding: Encoding) -> anyhow::Result<Box<dyn Read>> {
    let chosen = match encoding {
        Encoding::Auto => detect(path)?,
        other => other,
    };
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(match chosen {
        Encoding::ShiftJis => Box::new(
            encoding_rs_io::DecodeReaderBytesBuilder::new()
                .encoding(Some(encoding_rs::SHIFT_JIS))
                .build(file),
        ),
        _ => Box::new(
            encoding_rs_io::DecodeReaderBytesBuilder::new().encoding(Some(encoding_rs::UTF_8)).build(file),
        ),
    })
}

/// Notes where each `\r` and `\n` of the decoded text passes on its way to the CSV reader.
struct LineTap {
    inner: Box<dyn Read>,
    offset: u64,
    breaks: Rc<RefCell<VecDeque<(u64, u8)>>>,
}

impl Read for LineTap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut breaks = self.breaks.borrow_mut();
        for (i, byte) in buf[..n].iter().enumerate() {
            if matches!(byte, b'\r' | b'\n') {
                breaks.push_back((self.offset + i as u64, *byte));
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// Numbers a file's rows as staff see them in an editor: the header is line 1, and blank
/// lines, fields spanning lines and either line ending (even mixed) count as they look.
pub(crate) struct Lines {
    breaks: Rc<RefCell<VecDeque<(u64, u8)>>>,
    /// `\n`s before the last row asked about.
    newlines: u64,
}

impl Lines {
    /// The line a row (or an unreadable row) starts on, from the position the reader gives
    /// it, which is where the row before it ended; 0 without a position. Rows must be asked
    /// about in order.
    pub(crate) fn line(&mut self, position: Option<&csv::Position>) -> u64 {
        let Some(position) = position else { return 0 };
        let mut breaks = self.breaks.borrow_mut();
        let mut cursor = position.byte();
        // Line breaks before the row, then those at its start: the end of the line before
        // (a CRLF row ends at its `\r`) and blank lines.
        while let Some(&(at, byte)) = breaks.front()
            && at <= cursor
        {
            if at == cursor {
                cursor += 1;
            }
            self.newlines += u64::from(byte == b'\n');
            breaks.pop_front();
        }
        self.newlines + 1
    }
}

/// UTF-8 if the whole file is valid UTF-8, otherwise Shift_JIS.
fn detect(path: &Path) -> anyhow::Result<Encoding> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut carry = 0usize;
    loop {
        let n = file.read(&mut buffer[carry..])?;
        let end = carry + n;
        match std::str::from_utf8(&buffer[..end]) {
            Ok(_) => carry = 0,
            Err(e) if e.error_len().is_none() && n > 0 => {
                // A character cut at the buffer's end: keep its bytes for the next read.
                let valid = e.valid_up_to();
                buffer.copy_within(valid..end, 0);
                carry = end - valid;
            }
            Err(_) => return Ok(Encoding::ShiftJis),
        }
        if n == 0 {
            return Ok(if carry == 0 { Encoding::Utf8 } else { Encoding::ShiftJis });
        }
    }
}

fn progress_bar(path: &Path, message: &str) -> ProgressBar {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {percent}% {per_sec} 残り{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_owned());
    bar
}

/// Issue a first coupon to each new, eligible resident in the same pass as the import.
#[derive(Debug, Clone, Copy)]
pub struct IssueOnImport {
    /// The date eligibility (age) is computed for.
    pub today: Date,
    /// The youngest age any product may be given at.
    pub min_age: u8,
}

/// Imports a resident register extract. With `issue`, each new resident who is active and
/// old enough also gets a coupon for dose 1 — a second commit made while the document is
/// still in memory, which spares the initial load a separate issuance pass over every
/// document. Changed residents are left to `coupons issue`.
pub fn import_file(
    files: &NodeFiles,
    store: &Store,
    path: &Path,
    encoding: Encoding,
    issue: Option<IssueOnImport>,
) -> anyhow::Result<ImportOutcome> {
    let municipality = files.config.municipality;
    let asking = AskOnImport {
        campaign_start: files.config.campaign.start,
        actor: crate::config::cli_event("residents.import", "", "").actor,
    };
    let (errors, reregister) = check_file(files, store, path, encoding)?;
    if !errors.is_empty() {
        return Ok(ImportOutcome::Refused(errors));
    }
    let actor = ActorId::from(files.actor.clone());
    let mut reader = open_reader(path, encoding)?;
    let header = reader.headers()?.clone();
    let columns =
        Columns::from_header(&header).map_err(|_| anyhow::anyhow!("header changed during import"))?;
    let bar = progress_bar(path, "取込 import");
    let mut next_serial = store.read()?.meta(META_COUPON_SERIAL)?;
    let mut next_resident = store.read()?.meta(META_RESIDENT_SEQ)?;
    let secret = &files.person_secret;
    // A pipeline: this thread reads and prepares batch N+1 (building documents on every core)
    // while a writer thread commits batch N. Batches never share a resident (pass one refused
    // repeated 宛名番号 and 個人番号), so preparing ahead of the commit sees the same state.
    let (prepared_report, written_report) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Prepared>(1);
        let actor = &actor;
        let writer = scope.spawn(move || -> anyhow::Result<ImportReport> {
            let mut written = ImportReport::default();
            for prepared in receiver {
                write_batch(store, actor, prepared, &mut written)?;
            }
            Ok(written)
        });
        let mut report = ImportReport::default();
        let mut batch: Vec<Row> = Vec::with_capacity(BATCH_ROWS);
        let mut records = reader.records();
        loop {
            let record = records.next().transpose()?;
            if let Some(record) = &record {
                bar.set_position(record.position().map(|p| p.byte()).unwrap_or(0));
                let row = parse_row(&columns, record, 0)
                    .map_err(|e| anyhow::anyhow!("row changed during import: {}", e[0]))?;
                batch.push(row);
            }
            if batch.len() == BATCH_ROWS || (record.is_none() && !batch.is_empty()) {
                let rows = std::mem::take(&mut batch);
                let prepared = prepare_batch(
                    store,
                    secret,
                    municipality,
                    actor,
                    rows,
                    issue,
                    &asking,
                    &reregister,
                    (&mut next_resident, &mut next_serial),
                    &mut report,
                )?;
                if sender.send(prepared).is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            if record.is_none() {
                break;
            }
        }
        drop(sender);
        let written = writer.join().map_err(|_| anyhow::anyhow!("the import writer thread panicked"))??;
        Ok((report, written))
    })?;
    bar.finish_and_clear();
    Ok(ImportOutcome::Applied(ImportReport {
        rows: prepared_report.rows,
        unchanged: prepared_report.unchanged,
        created: written_report.created,
        updated: written_report.updated,
        reregistered: written_report.reregistered,
        coupons_issued: written_report.coupons_issued,
        asked: written_report.asked,
    }))
}

const BATCH_ROWS: usize = 65_536;

/// A row that gives a resident holding a provisional atena number their 宛名番号.
struct Reregistration {
    resident_id: String,
    provisional: String,
    line: u64,
}

/// Pass one: every row checked, nothing written. Also returns, by the row's 宛名番号, the
/// residents whose provisional atena number a row replaces.
fn check_file(
    files: &NodeFiles,
    store: &Store,
    path: &Path,
    encoding: Encoding,
) -> anyhow::Result<(Vec<RowError>, HashMap<String, String>)> {
    let (mut reader, mut lines) = open_numbered_reader(path, encoding)?;
    let header = reader.headers().context("cannot read the header line")?.clone();
    let columns = match Columns::from_header(&header) {
        Ok(columns) => columns,
        Err(errors) => return Ok((errors, HashMap::new())),
    };
    let view = store.read()?;
    let person_index = view.txn().open_table(IDX_PERSON)?;
    let atena_index = view.txn().open_table(IDX_ATENA)?;
    let bar = progress_bar(path, "検査 check");
    let mut errors = Vec::new();
    let mut seen_atena: HashMap<String, u64> = HashMap::new();
    let mut seen_my_number: HashSet<u64> = HashSet::new();
    let mut reregister: HashMap<String, Reregistration> = HashMap::new();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                let line = lines.line(error.position());
                errors.push(row_error(line, "-", "行を読み取れません", &format!("unreadable row: {error}")));
                continue;
            }
        };
        let line = lines.line(record.position());
        bar.set_position(record.position().map(|p| p.byte()).unwrap_or(0));
        let atena = columns.get(&record, "atena_number").unwrap_or("").to_owned();
        if !atena.is_empty()
            && let Some(first) = seen_atena.insert(atena.clone(), line)
        {
            {
                errors.push(row_error(
                    line,
                    &columns.name("atena_number"),
                    &format!("宛名番号 {atena} が{first}行目と重複しています"),
                    &format!("atena number {atena} repeats line {first}"),
                ));
            }
        }
        let row = match parse_row(&columns, &record, line) {
            Ok(row) => row,
            Err(mut row_errors) => {
                errors.append(&mut row_errors);
                continue;
            }
        };
        if row.my_number.is_none()
            && asks_history(&row, files.config.campaign.start, files.config.municipality)
            && atena_index.get(atena.as_str())?.is_none()
        {
            errors.push(row_error(
                line,
                &columns.name("my_number"),
                "接種開始日以降の転入者の接種歴を前住所地に求めるには個人番号が必要です",
                "a newcomer who moved in on or after the campaign's start needs a 個人番号 to ask their previous municipality for their history",
            ));
        }
        if let Some(my_number) = &row.my_number {
            let numeric: u64 = my_number.parse().unwrap_or(0);
            if !seen_my_number.insert(numeric) {
                errors.push(row_error(
                    line,
                    &columns.name("my_number"),
                    "個人番号がファイル内で重複しています",
                    "個人番号 repeats within the file",
                ));
            }
            let person_key = files.person_secret.person_key(my_number).map_err(|e| anyhow::anyhow!(e))?;
            let resident = atena_index.get(atena.as_str())?.map(|id| id.value().to_owned());
            let owner = person_index.get(person_key.as_str())?.map(|id| id.value().to_owned());
            if let Some(owner) = owner
                && resident.as_deref() != Some(owner.as_str())
            {
                // The person's record here holds a provisional atena number, and the row's
                // 宛名番号 is new here or that of their record from before they moved away.
                match view.record(&owner)?.filter(holds_provisional_atena) {
                    Some(held) => {
                        let free = match &resident {
                            None => true,
                            // Theirs only: the record this person left behind.
                            Some(other) => view
                                .record(other)?
                                .is_some_and(|r| r.transfer.is_some() && r.person_key == held.person_key),
                        };
                        if free {
                            let provisional = held.identity.atena_number;
                            reregister.insert(
                                atena.clone(),
                                Reregistration { resident_id: owner, provisional, line },
                            );
                        } else {
                            errors.push(row_error(
                                line,
                                &columns.name("atena_number"),
                                &format!(
                                    "宛名番号 {atena} は別の方の記録に使われています（この個人番号の方は仮の宛名番号 {} で登録されています）",
                                    held.identity.atena_number
                                ),
                                &format!(
                                    "atena number {atena} is another person's record here (the person with this 個人番号 holds provisional atena number {})",
                                    held.identity.atena_number
                                ),
                            ));
                        }
                    }
                    None => errors.push(row_error(
                        line,
                        &columns.name("my_number"),
                        "この個人番号は別の宛名番号の住民に登録済みです",
                        "this 個人番号 is already registered to a resident with another atena number",
                    )),
                }
            }
        }
    }
    // A resident is one row: not also the row of their provisional atena number.
    for re in reregister.values() {
        if let Some(first) = seen_atena.get(&re.provisional) {
            errors.push(row_error(
                re.line,
                &columns.name("my_number"),
                &format!("この方は{first}行目（仮の宛名番号 {}）と同じ住民です", re.provisional),
                &format!(
                    "this is the resident of line {first} (provisional atena number {})",
                    re.provisional
                ),
            ));
        }
    }
    errors.sort_by_key(|e| e.line);
    bar.finish_and_clear();
    let reregister = reregister.into_iter().map(|(atena, re)| (atena, re.resident_id)).collect();
    Ok((errors, reregister))
}

/// Whether a new resident's row asks the municipality they moved from for their history:
/// active here, moved in on or after the campaign's start (before it there was nothing to
/// bring), from another municipality (a 前住所 in this one is a move within it, 転居).
fn asks_history(row: &Row, campaign_start: Date, here: MunicipalityCode) -> bool {
    row.identity.status == ResidentStatus::Active
        && row.moved_from.is_some_and(|(from, on)| on >= campaign_start && from != here)
}

fn row_error(line: u64, column: &str, ja: &str, en: &str) -> RowError {
    RowError { line, column: column.to_owned(), reason_ja: ja.to_owned(), reason_en: en.to_owned() }
}

fn parse_row(columns: &Columns, record: &csv::StringRecord, line: u64) -> Result<Row, Vec<RowError>> {
    let mut errors = Vec::new();
    let mut field = |key: &str| -> String {
        let value = columns.get(record, key).unwrap_or("").to_owned();
        if value.contains('\u{fffd}') {
            errors.push(row_error(
                line,
                &columns.name(key),
                "文字コードが正しくありません",
                "bytes invalid in the file's encoding",
            ));
        }
        value
    };
    let atena = field("atena_number");
    let name = field("name");
    let kana = field("name_kana");
    let birth = field("birth_date");
    let sex = field("sex");
    let address = field("address");
    let my_number = field("my_number");
    let status = field("status");
    let moved_in = field("moved_in_on");
    let previous = field("previous_municipality");
    let col = |key: &str| columns.name(key);
    if atena.is_empty() || atena.len() > 20 || !atena.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        errors.push(row_error(
            line,
            &col("atena_number"),
            "宛名番号は1〜20桁の英数字です",
            "atena number must be 1–20 ASCII letters or digits",
        ));
    }
    if name.is_empty() || name.chars().count() > 100 {
        errors.push(row_error(
            line,
            &col("name"),
            "氏名が空か長すぎます（100文字まで）",
            "name is empty or longer than 100 characters",
        ));
    }
    if kana.is_empty() || !kana.chars().all(is_katakana_or_space) {
        errors.push(row_error(
            line,
            &col("name_kana"),
            "氏名カナは全角カタカナで入力してください",
            "name_kana must be full-width katakana",
        ));
    }
    let birth_date = parse_date(&birth);
    if birth_date.is_none() {
        errors.push(row_error(
            line,
            &col("birth_date"),
            &format!("生年月日「{birth}」を読めません（例 1980-04-01。1880年から今日までの日付）"),
            &format!(
                "birth date {birth:?} is not a date from 1880 to today as YYYY-MM-DD, YYYY/MM/DD or YYYYMMDD"
            ),
        ));
    }
    let sex = match sex.as_str() {
        "男" | "1" | "M" | "m" | "male" => Some(Sex::Male),
        "女" | "2" | "F" | "f" | "female" => Some(Sex::Female),
        _ => {
            errors.push(row_error(
                line,
                &col("sex"),
                &format!("性別「{sex}」は 男 または 女 です"),
                &format!("sex {sex:?} must be 男/女 (1/2, M/F)"),
            ));
            None
        }
    };
    if address.is_empty() {
        errors.push(row_error(line, &col("address"), "住所が空です", "address is empty"));
    }
    let my_number = if my_number.is_empty() {
        None
    } else if protocol::checkdigit::my_number_is_valid(&my_number) {
        Some(my_number)
    } else {
        errors.push(row_error(
            line,
            &col("my_number"),
            "個人番号は12桁で、検査用数字が正しくなければなりません",
            "個人番号 must be 12 digits with a valid check digit",
        ));
        None
    };
    let status = match status.as_str() {
        "" | "在住" | "住民" | "active" => Some(ResidentStatus::Active),
        "死亡" | "deceased" => Some(ResidentStatus::Deceased),
        "転出" | "moved_out" => Some(ResidentStatus::MovedOut),
        other => {
            errors.push(row_error(
                line,
                &col("status"),
                &format!("状態「{other}」は 在住・死亡・転出 のいずれかです"),
                &format!("status {other:?} must be 在住, 死亡 or 転出"),
            ));
            None
        }
    };
    let moved_from = moved_from(&moved_in, &previous, &col, line, &mut errors);
    match (birth_date, sex, status, errors.is_empty()) {
        (Some(birth_date), Some(sex), Some(status), true) => Ok(Row {
            identity: Identity {
                atena_number: atena,
                name,
                name_kana: kana,
                birth_date,
                sex,
                address,
                status,
            },
            my_number,
            moved_from,
        }),
        _ => Err(errors),
    }
}

/// The 転入日 and 前住所市区町村コード cells: both empty, a move-in date alone (kept for
/// nothing), or both, the code one of the 1,741 municipalities'.
fn moved_from(
    moved_in: &str,
    previous: &str,
    col: &impl Fn(&str) -> String,
    line: u64,
    errors: &mut Vec<RowError>,
) -> Option<(MunicipalityCode, Date)> {
    let on = if moved_in.is_empty() {
        None
    } else {
        let date = parse_date(moved_in);
        if date.is_none() {
            errors.push(row_error(
                line,
                &col("moved_in_on"),
                &format!("転入日「{moved_in}」を読めません（例 2021-06-01、未来の日付は不可）"),
                &format!("move-in date {moved_in:?} is not a past YYYY-MM-DD, YYYY/MM/DD or YYYYMMDD"),
            ));
        }
        date
    };
    if previous.is_empty() {
        return None;
    }
    let Some(code) = MunicipalityCode::parse(previous).ok().filter(MunicipalityCode::is_known) else {
        errors.push(row_error(
            line,
            &col("previous_municipality"),
            &format!("前住所市区町村コード「{previous}」は市区町村コード（6桁・検査数字付き）ではありません"),
            &format!(
                "previous municipality {previous:?} is not a municipality code (6 digits with check digit)"
            ),
        ));
        return None;
    };
    if on.is_none() && moved_in.is_empty() {
        errors.push(row_error(
            line,
            &col("moved_in_on"),
            "前住所市区町村コードのある行には転入日が必要です",
            "a row with a previous municipality needs its move-in date (転入日)",
        ));
    }
    on.map(|on| (code, on))
}

fn is_katakana_or_space(c: char) -> bool {
    matches!(c, '\u{30a1}'..='\u{30fc}' | ' ' | '\u{3000}')
}

/// Dates as register extracts write them.
pub fn parse_date(text: &str) -> Option<Date> {
    let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
    let separators_ok = text.chars().all(|c| c.is_ascii_digit() || c == '-' || c == '/');
    if !separators_ok {
        return None;
    }
    let (year, month, day): (i32, u8, u8) = if digits.len() == 8 && text.len() == 8 {
        (digits[0..4].parse().ok()?, digits[4..6].parse().ok()?, digits[6..8].parse().ok()?)
    } else {
        let parts: Vec<&str> = text.split(['-', '/']).collect();
        if parts.len() != 3 || parts[0].len() != 4 {
            return None;
        }
        (parts[0].parse().ok()?, parts[1].parse().ok()?, parts[2].parse().ok()?)
    };
    let month = time::Month::try_from(month).ok()?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    (date.year() >= 1880 && date <= crate::clock::japan_today()).then_some(date)
}

/// Digest of what an import writes for a resident; equal digests mean nothing to do.
fn identity_digest(identity: &Identity, person_key: &str) -> Vec<u8> {
    let json = serde_json::to_vec(&(identity, person_key)).unwrap_or_default();
    ring::digest::digest(&ring::digest::SHA256, &json).as_ref()[..16].to_vec()
}

struct Planned {
    record: ResidentRecord,
    digest: Vec<u8>,
    /// For a newcomer whose row asks for their history ([`asks_history`]): the 転入 request.
    ask: Option<AskEntry>,
}

/// What the import's 転入 requests need.
#[derive(Debug, Clone)]
struct AskOnImport {
    /// The campaign's first day: a newcomer who moved in before it is not asked for.
    campaign_start: Date,
    /// Who asks: the operator running the import, as its audit entry names them.
    actor: String,
}

/// A batch made ready to write: classified against the store, numbered and built.
struct Prepared {
    new: Vec<Planned>,
    built: Vec<Built>,
    coupons: Vec<Option<CouponEntry>>,
    changed: Vec<Planned>,
    coupon_serial_end: u64,
    resident_seq_end: u64,
    now: OffsetDateTime,
}

#[allow(clippy::too_many_arguments)]
fn prepare_batch(
    store: &Store,
    secret: &PersonKeySecret,
    municipality: MunicipalityCode,
    actor: &ActorId,
    rows: Vec<Row>,
    issue: Option<IssueOnImport>,
    asking: &AskOnImport,
    reregister: &HashMap<String, String>,
    (next_resident, next_serial): (&mut u64, &mut u64),
    report: &mut ImportReport,
) -> anyhow::Result<Prepared> {
    report.rows += rows.len() as u64;
    let now = OffsetDateTime::now_utc();
    let planned: Vec<Planned> = rows
        .into_iter()
        .map(|row| {
            let atena = &row.identity.atena_number;
            let national = row.my_number.as_deref().and_then(|n| secret.person_key(n).ok());
            let asks = asks_history(&row, asking.campaign_start, municipality);
            let person_key = national.clone().unwrap_or_else(|| secret.local_person_key(municipality, atena));
            let ask = match (national, row.moved_from) {
                (Some(person_key), Some((previous, _))) if asks => Some(AskEntry {
                    ask_id: new_id("ask"),
                    birth_check: secret.birth_check(&person_key, row.identity.birth_date),
                    person_key,
                    atena_number: atena.clone(),
                    address: row.identity.address.clone(),
                    previous: Some(previous),
                    state: AskLocal::Asking,
                    holder: None,
                    handoff_id: None,
                    actor: asking.actor.clone(),
                    asked_at: rfc3339(now),
                    updated_at: rfc3339(now),
                }),
                _ => None,
            };
            let record = ResidentRecord {
                schema: SCHEMA_VERSION,
                // Given below: the stored resident's id, or the next one for a newcomer.
                resident_id: String::new(),
                municipality,
                person_key,
                identity: row.identity,
                coupons: Default::default(),
                doses: Default::default(),
                corrections: Default::default(),
                transfer: None,
                arrival: None,
                returns: Vec::new(),
            };
            let digest = identity_digest(&record.identity, &record.person_key);
            Planned { record, digest, ask }
        })
        .collect();

    // Classify against what is stored: a 宛名番号 seen before keeps its resident's id; a
    // newcomer gets the next id, in the file's order, so new documents are appended.
    let (mut new, mut changed) = (Vec::new(), Vec::new());
    {
        let view = store.read()?;
        let atena = view.txn().open_table(IDX_ATENA)?;
        let digests = view.txn().open_table(IDENTITY_DIGEST)?;
        for mut plan in planned {
            if let Some(held) = reregister.get(&plan.record.identity.atena_number) {
                plan.record.resident_id = held.clone();
                changed.push(plan);
                continue;
            }
            match atena.get(plan.record.identity.atena_number.as_str())? {
                None => {
                    *next_resident += 1;
                    plan.record.resident_id = resident_id(municipality, *next_resident);
                    new.push(plan);
                }
                Some(id) => {
                    plan.record.resident_id = id.value().to_owned();
                    match digests.get(id.value())? {
                        Some(stored) if stored.value() == plan.digest.as_slice() => report.unchanged += 1,
                        _ => changed.push(plan),
                    }
                }
            }
        }
    }
    let coupons = plan_coupons(&new, issue, municipality, next_serial, now)?;
    // Build new documents on every core; automerge work dominates an import.
    let built = build_parallel(&new, &coupons, actor, now)?;
    Ok(Prepared {
        new,
        built,
        coupons,
        changed,
        coupon_serial_end: *next_serial,
        resident_seq_end: *next_resident,
        now,
    })
}

fn write_batch(
    store: &Store,
    actor: &ActorId,
    prepared: Prepared,
    report: &mut ImportReport,
) -> anyhow::Result<()> {
    let Prepared { new, built, coupons, changed, coupon_serial_end, resident_seq_end, now } = prepared;
    let txn = store.begin_write()?;
    let mut cache = new_cache(1);
    {
        let mut mutation = Mutation::new(&txn, &mut cache, actor);
        mutation.insert_built(
            new.iter()
                .zip(&built)
                .map(|(plan, built)| (&plan.record, built.saved.as_slice(), built.tip.as_deref())),
        )?;
        let mut digests = txn.open_table(IDENTITY_DIGEST)?;
        let mut coupon_index = txn.open_table(IDX_COUPON)?;
        for (plan, coupon) in new.iter().zip(&coupons) {
            digests.insert(plan.record.resident_id.as_str(), plan.digest.as_slice())?;
            report.created += 1;
            if let Some(coupon) = coupon {
                coupon_index.insert(coupon.code.number.as_str(), plan.record.resident_id.as_str())?;
                report.coupons_issued += 1;
            }
        }
        drop((digests, coupon_index));
        for ask in new.iter().filter_map(|plan| plan.ask.as_ref()) {
            // A request staff made already and still open stays as it is.
            let held = get_json::<AskEntry>(&txn.open_table(HANDOFF_ASKS)?, &ask.person_key)?;
            if !held.is_some_and(|held| held.is_open()) {
                put_ask(&txn, ask)?;
                report.asked += 1;
            }
        }
        if coupons.iter().any(Option::is_some) {
            mutation.set_counter(META_COUPON_SERIAL, coupon_serial_end)?;
        }
        if !new.is_empty() {
            mutation.set_counter(META_RESIDENT_SEQ, resident_seq_end)?;
        }
        let view = store.read()?;
        for plan in &changed {
            let id = plan.record.resident_id.as_str();
            let old = view.record(id)?.context("resident vanished during import")?;
            if old.transfer.is_some() {
                // Handed to another municipality: the record stays as it left, read-only.
                report.unchanged += 1;
                continue;
            }
            if old.identity.atena_number != plan.record.identity.atena_number {
                // A provisional atena number replaced (pass one found no other use of it).
                mutation.move_atena(&old.identity.atena_number, &plan.record.identity.atena_number, id)?;
                report.reregistered += 1;
            }
            if old.identity.name_kana != plan.record.identity.name_kana {
                let mut kana = txn.open_table(IDX_KANA)?;
                kana.remove((normalize_kana(&old.identity.name_kana).as_str(), id))?;
                kana.insert((normalize_kana(&plan.record.identity.name_kana).as_str(), id), ())?;
            }
            if old.identity != plan.record.identity {
                mutation.apply(id, &ResidentEvent::IdentityUpdated(plan.record.identity.clone()), now)?;
            }
            txn.open_table(IDENTITY_DIGEST)?.insert(id, plan.digest.as_slice())?;
            report.updated += 1;
        }
        mutation.finish()?;
    }
    txn.commit().context("durable commit of an import batch failed")?;
    Ok(())
}

/// The coupon each new resident gets with `--issue-coupons`, serials in batch order.
fn plan_coupons(
    new: &[Planned],
    issue: Option<IssueOnImport>,
    municipality: MunicipalityCode,
    next_serial: &mut u64,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<Option<CouponEntry>>> {
    let Some(issue) = issue else {
        return Ok(vec![None; new.len()]);
    };
    new.iter()
        .map(|plan| {
            let identity = &plan.record.identity;
            let eligible = identity.status == ResidentStatus::Active
                && age_on(identity.birth_date, issue.today) >= issue.min_age;
            if !eligible {
                return Ok(None);
            }
            *next_serial += 1;
            let serial = u32::try_from(*next_serial).context("coupon serials exhausted")?;
            Ok(Some(crate::issuance::new_coupon(municipality, 1, serial, now)?))
        })
        .collect()
}

/// A new document as stored: its bytes, and its tip when it holds a coupon (a capture can
/// then build its dose from the tip alone).
struct Built {
    saved: Vec<u8>,
    tip: Option<Vec<u8>>,
}

/// Builds one new document: registration, then the coupon if any, one commit each.
fn build_one(
    plan: &Planned,
    coupon: &Option<CouponEntry>,
    actor: &ActorId,
    at: OffsetDateTime,
) -> anyhow::Result<Built> {
    let mut doc = new_resident_document(actor, &plan.record, at)?;
    let mut tip = None;
    if let Some(entry) = coupon {
        let event = ResidentEvent::CouponIssued { entry: entry.clone(), supersedes: None };
        apply_event(&mut doc, &event, at)?;
        // The record is the one just written: reading it back would cost a fifth of the build.
        let mut record = plan.record.clone();
        record.coupons.insert(entry.key(), entry.clone());
        debug_assert_eq!(protocol::document::read_record(&doc).ok().as_ref(), Some(&record));
        tip = match DocTip::of_new(&doc, record) {
            Ok(tip) => tip.map(|tip| tip.encode()),
            Err(error) => {
                tracing::warn!(%error, "no tip made for a new document");
                None
            }
        };
    }
    Ok(Built { saved: doc.save_nocompress(), tip })
}

fn build_parallel(
    plans: &[Planned],
    coupons: &[Option<CouponEntry>],
    actor: &ActorId,
    at: OffsetDateTime,
) -> anyhow::Result<Vec<Built>> {
    let n_threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1);
    let chunk_size = plans.len().div_ceil(n_threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .chunks(chunk_size)
            .zip(coupons.chunks(chunk_size))
            .map(|(chunk, coupons)| {
                scope.spawn(move || -> anyhow::Result<Vec<Built>> {
                    chunk
                        .iter()
                        .zip(coupons)
                        .map(|(plan, coupon)| build_one(plan, coupon, actor, at))
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(plans.len());
        for handle in handles {
            let part = handle.join().map_err(|_| anyhow::anyhow!("a document builder thread panicked"))??;
            all.extend(part);
        }
        Ok(all)
    })
}

/// Makes sure a file exists and is not empty before an import starts.
pub fn check_input(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() == 0 {
        bail!("{} is empty", path.display());
    }
    Ok(())
}
