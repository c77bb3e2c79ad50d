//! `vrs-node handoff move-out-file`: many residents moved out in one go, from a CSV the
//! resident-register system exports (転出者一覧), with a progress bar and a per-row result
//! file. Run with the node stopped, like an import; the sealed handoffs wait in the outbox
//! and leave for the national node when the node runs.
//!
//! Columns (header names in Japanese or English, any order): 宛名番号 / `atena_number`,
//! 転出先 / `to` (the new municipality's 6-digit code), 理由 / `reason` (optional; 転出 by
//! default). UTF-8 or Shift_JIS. Every row is checked first — the resident exists here and is
//! active, the new municipality is in the federation directory — and a file with any bad row
//! changes nothing and reports every bad row.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::document::ResidentStatus;
use protocol::municipality::MunicipalityCode;
use serde::Serialize;

use crate::config::NodeFiles;
use crate::import::{Encoding, RowError};
use crate::store::{IDX_ATENA, Store};
use crate::writer::Who;

/// One mover, checked.
struct Mover {
    line: u64,
    atena_number: String,
    resident_id: String,
    to: MunicipalityCode,
    reason: String,
}

/// One row's outcome, as written to the result file.
#[derive(Serialize)]
struct RowResult {
    #[serde(rename = "行")]
    line: u64,
    #[serde(rename = "宛名番号")]
    atena_number: String,
    #[serde(rename = "転出先")]
    to: String,
    #[serde(rename = "結果")]
    result: &'static str,
    #[serde(rename = "引継ID")]
    handoff_id: String,
    #[serde(rename = "メッセージ")]
    message: String,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct MoversReport {
    /// Rows read.
    pub rows: u64,
    /// Handoffs sealed.
    pub sealed: u64,
    /// Rows refused by the writer (each in the result file).
    pub refused: u64,
}

/// The outcome: rows refused before anything was written, or the report.
pub enum MoversOutcome {
    /// Every bad row; nothing was written.
    Rejected(Vec<RowError>),
    /// Done.
    Done(MoversReport),
}

fn row_error(line: u64, column: &str, ja: &str, en: String) -> RowError {
    RowError { line, column: column.to_owned(), reason_ja: ja.to_owned(), reason_en: en }
}

fn check_rows(
    store: &Store,
    file: &Path,
    own: MunicipalityCode,
    directory: Option<&protocol::directory::SignedDirectory>,
) -> anyhow::Result<(Vec<Mover>, Vec<RowError>)> {
    let (mut reader, mut lines) = crate::import::open_numbered_reader(file, Encoding::Auto)?;
    let headers = reader.headers().context("the file has no header line")?.clone();
    let find = |names: &[&str]| {
        headers.iter().position(|h| names.contains(&h.trim().trim_start_matches('\u{feff}')))
    };
    let (Some(atena_at), Some(to_at)) = (find(&["宛名番号", "atena_number"]), find(&["転出先", "to"]))
    else {
        anyhow::bail!("the header must name 宛名番号 (atena_number) and 転出先 (to)");
    };
    let reason_at = find(&["理由", "reason"]);
    let view = store.read()?;
    let (mut movers, mut errors, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    for record in reader.records() {
        let line = match &record {
            Ok(record) => lines.line(record.position()),
            Err(error) => lines.line(error.position()),
        };
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                errors.push(row_error(line, "-", "行を読み取れません", error.to_string()));
                continue;
            }
        };
        let cell = |at: usize| record.get(at).unwrap_or("").trim().to_owned();
        let atena = cell(atena_at);
        let to_text = cell(to_at);
        let reason = reason_at.map(cell).filter(|r| !r.is_empty()).unwrap_or_else(|| "転出".to_owned());
        if !seen.insert(atena.clone()) {
            errors.push(row_error(
                line,
                "宛名番号",
                "宛名番号がファイル内で重複しています",
                format!("atena number {atena} repeats"),
            ));
            continue;
        }
        let to = match MunicipalityCode::parse(&to_text).ok().filter(|c| c.is_known()) {
            Some(code) if code == own => {
                errors.push(row_error(
                    line,
                    "転出先",
                    "転出先がこの市区町村です",
                    "the new municipality is this one".into(),
                ));
                continue;
            }
            Some(code) => code,
            None => {
                errors.push(row_error(
                    line,
                    "転出先",
                    "市区町村コードではありません",
                    format!("{to_text:?} is not a municipality code"),
                ));
                continue;
            }
        };
        let in_directory =
            directory.and_then(|d| d.directory.primary_of(to)).is_some_and(|e| !e.encryption_key.is_empty());
        if !in_directory {
            errors.push(row_error(
                line,
                "転出先",
                "転出先の市区町村は連携名簿にありません",
                format!("{to} has no node in the federation directory"),
            ));
            continue;
        }
        if reason.chars().count() > 500 {
            errors.push(row_error(
                line,
                "理由",
                "理由は500文字以内です",
                "reason longer than 500 characters".into(),
            ));
            continue;
        }
        let Some(resident_id) = view.index(IDX_ATENA, &atena)? else {
            errors.push(row_error(
                line,
                "宛名番号",
                "この宛名番号の住民はいません",
                format!("no resident with atena number {atena}"),
            ));
            continue;
        };
        let record = view.record(&resident_id)?.context("index names a missing resident")?;
        if record.transfer.is_some() || record.identity.status != ResidentStatus::Active {
            errors.push(row_error(
                line,
                "宛名番号",
                "在住の住民ではありません（転出・死亡・引継済）",
                format!("resident {atena} is not active here"),
            ));
            continue;
        }
        movers.push(Mover { line, atena_number: atena, resident_id, to, reason });
    }
    Ok((movers, errors))
}

/// Seals a handoff for every mover in `file` and writes one result row per mover to
/// `results`. The node must be stopped.
pub fn move_out_file(
    files: NodeFiles,
    store: Arc<Store>,
    file: &Path,
    results: &Path,
) -> anyhow::Result<MoversOutcome> {
    let national_key = files
        .config
        .p2p
        .national_key
        .as_deref()
        .and_then(protocol::person::hex_decode)
        .context("this node has not joined a federation ([p2p] national_key): handoffs go through the national node")?;
    let directory = crate::p2p::load_directory(&files.dir.join("directory.json"), &national_key)?;
    let (movers, errors) = check_rows(&store, file, files.config.municipality, directory.as_ref())?;
    if !errors.is_empty() {
        return Ok(MoversOutcome::Rejected(errors));
    }
    let person_secret = protocol::person::PersonKeySecret::new(&crate::config::read_secret32(
        &files.dir,
        "keys/person-key.secret",
    )?);
    let encryption_secret = crate::config::read_secret32(&files.dir, "keys/encryption.key")?;
    let municipality = files.config.municipality;
    let subject = format!("file:{}", file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    files.audit_cli(&store, "handoff.move_out_file", &subject, "started")?;
    let audit_files = NodeFiles::load(&files.dir)?;
    let started = crate::daemon::start(files, store.clone())?;
    let service = Arc::new(crate::handoff::HandoffService::new(
        store.clone(),
        started.state.writer.clone(),
        municipality,
        person_secret,
        encryption_secret,
        false,
        directory,
    ));
    let bar = ProgressBar::new(movers.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "転出の引き継ぎ / sealing handoffs [{bar:40}] {pos}/{len} {per_sec} 残り{eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let who = Who {
        actor: crate::config::cli_event("", "", "").actor,
        role: "cli".into(),
        request_id: crate::clock::new_id("req"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let rows: Vec<RowResult> = runtime.block_on(async {
        let mut rows = Vec::with_capacity(movers.len());
        for chunk in movers.chunks(64) {
            let calls = chunk.iter().map(|m| service.move_out(&who, &m.resident_id, m.to, &m.reason));
            for (mover, result) in chunk.iter().zip(libp2p::futures::future::join_all(calls).await) {
                let (result, handoff_id, message) = match result {
                    Ok(entry) => ("sealed", entry.handoff_id, String::new()),
                    Err(problem) => {
                        ("refused", String::new(), format!("{}: {}", problem.code, problem.message_ja))
                    }
                };
                rows.push(RowResult {
                    line: mover.line,
                    atena_number: mover.atena_number.clone(),
                    to: mover.to.to_string(),
                    result,
                    handoff_id,
                    message,
                });
                bar.inc(1);
            }
        }
        rows
    });
    bar.finish_and_clear();
    drop(service);
    let crate::daemon::Started { state, writer_thread, .. } = started;
    drop(state);
    let _ = writer_thread.join();
    let mut writer =
        csv::Writer::from_path(results).with_context(|| format!("cannot write {}", results.display()))?;
    for row in &rows {
        writer.serialize(row)?;
    }
    writer.flush()?;
    let report = MoversReport {
        rows: rows.len() as u64,
        sealed: rows.iter().filter(|r| r.result == "sealed").count() as u64,
        refused: rows.iter().filter(|r| r.result == "refused").count() as u64,
    };
    audit_files.audit_cli(
        &store,
        "handoff.move_out_file",
        &subject,
        &format!("ok:rows={},sealed={},refused={}", report.rows, report.sealed, report.refused),
    )?;
    Ok(MoversOutcome::Done(report))
}
