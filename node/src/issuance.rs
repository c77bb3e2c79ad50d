//! Bulk coupon issuance (接種券発行) and the print-shop export.
//!
//! Issuance gives every active, old-enough resident a coupon for their next dose unless
//! they already hold a valid one for it — so running it twice issues nothing the second
//! time, and nobody ever holds two valid coupons for the same dose. Documents are loaded and
//! changed on every core; serial numbers are handed out in order by one thread, and each
//! batch is one durable commit.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use automerge::ActorId;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::coupon::{CouponCode, CouponNumber, SignedCoupon, printed_digest};
use protocol::document::{
    CouponEntry, CouponStatus, ResidentEvent, ResidentRecord, ResidentStatus, apply_event, read_record,
};
use protocol::validation::{TICKET_KIND_VACCINATION, age_on};
use qrcode::{EcLevel, QrCode, Version};
use time::{Date, OffsetDateTime};

use crate::config::NodeFiles;
use crate::store::{
    IDX_COUPON, LoadedDoc, META_COUPON_SERIAL, Mutation, Store, load_for_bulk, new_cache, put_printed,
};

const PAGE: usize = 8192;

/// What an issuance run did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IssueReport {
    /// Residents looked at.
    pub residents: u64,
    /// Coupons issued.
    pub issued: u64,
    /// Residents who already held a valid coupon for their next dose.
    pub already_held: u64,
    /// Residents not eligible (too young, not active, or not at the requested dose).
    pub not_eligible: u64,
}

fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec} 残り{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_owned());
    bar
}

enum Decision {
    Issue(Box<(LoadedDoc, ResidentRecord)>),
    AlreadyHeld,
    NotEligible,
}

/// Issues coupons to everyone eligible. `only_dose` restricts issuance to residents whose
/// next dose is that one.
pub fn issue_all(
    files: &NodeFiles,
    store: &Store,
    today: Date,
    only_dose: Option<u8>,
) -> anyhow::Result<IssueReport> {
    let actor = ActorId::from(files.actor.clone());
    let min_age = files.catalogue.min_eligible_age();
    let total = store.read()?.n_residents()?;
    let progress = bar(total, "接種券発行 issue");
    let mut report = IssueReport::default();
    let mut after: Option<String> = None;
    loop {
        let ids = store.read()?.resident_ids(after.as_deref(), PAGE)?;
        let Some(last) = ids.last().cloned() else { break };
        after = Some(last);
        let decisions = parallel_map(&ids, |chunk| {
            let view = store.read()?;
            chunk
                .iter()
                .map(|id| {
                    let loaded = load_for_bulk(view.txn(), id, &actor)?.context("resident vanished")?;
                    let record = read_record(&loaded.doc)?;
                    Ok(decide(loaded, record, today, min_age, only_dose))
                })
                .collect()
        })?;
        report.residents += ids.len() as u64;
        let mut to_issue = Vec::new();
        for decision in decisions {
            match decision {
                Decision::Issue(issue) => to_issue.push(*issue),
                Decision::AlreadyHeld => report.already_held += 1,
                Decision::NotEligible => report.not_eligible += 1,
            }
        }
        report.issued += issue_page(store, files.config.municipality, &actor, to_issue)?;
        progress.set_position(report.residents);
    }
    progress.finish_and_clear();
    Ok(report)
}

fn decide(
    loaded: LoadedDoc,
    record: ResidentRecord,
    today: Date,
    min_age: u8,
    only_dose: Option<u8>,
) -> Decision {
    let next = record.next_dose_number();
    if only_dose.is_some_and(|dose| dose != next) {
        Decision::NotEligible
    } else if protocol::validation::coupon_due(&record, today, min_age).is_some() {
        Decision::Issue(Box::new((loaded, record)))
    } else if record.identity.status == ResidentStatus::Active
        && age_on(record.identity.birth_date, today) >= min_age
        && record.valid_coupon_for_dose(next).is_some()
    {
        Decision::AlreadyHeld
    } else {
        Decision::NotEligible
    }
}

fn issue_page(
    store: &Store,
    municipality: protocol::municipality::MunicipalityCode,
    actor: &ActorId,
    to_issue: Vec<(LoadedDoc, ResidentRecord)>,
) -> anyhow::Result<u64> {
    if to_issue.is_empty() {
        return Ok(0);
    }
    let txn = store.begin_write()?;
    let mut cache = new_cache(1);
    let n = to_issue.len() as u64;
    {
        let mutation = Mutation::new(&txn, &mut cache, actor);
        // Reserve the serials for this page in one step.
        let first_serial = mutation.next_counter(META_COUPON_SERIAL)?;
        mutation.set_counter(META_COUPON_SERIAL, first_serial + n - 1)?;
        let now = OffsetDateTime::now_utc();
        let mut numbered = Vec::with_capacity(to_issue.len());
        for (i, (loaded, record)) in to_issue.into_iter().enumerate() {
            let serial = u32::try_from(first_serial + i as u64).context("coupon serials exhausted")?;
            let entry = new_coupon(municipality, record.next_dose_number(), serial, now)?;
            numbered.push((loaded, record, entry));
        }
        let chunks = parallel_map_owned(numbered, |(mut loaded, mut record, entry)| {
            let heads = loaded.doc.get_heads();
            apply_event(
                &mut loaded.doc,
                &ResidentEvent::CouponIssued { entry: entry.clone(), supersedes: None },
                now,
            )?;
            let chunk = loaded.doc.save_after(&heads);
            // The record read before, with the coupon: the document reads as this now.
            record.coupons.insert(entry.key(), entry.clone());
            let id = record.resident_id.clone();
            let tip = crate::store::tip_after(&loaded.doc, &chunk, Some(record));
            Ok((loaded, id, entry, chunk, tip))
        })?;
        let mut mutation = mutation;
        for (mut loaded, id, entry, chunk, tip) in chunks {
            mutation.append_built(&id, &mut loaded, &chunk, tip.as_deref())?;
            mutation.set_index(IDX_COUPON, entry.code.number.as_str(), &id)?;
        }
        mutation.finish()?;
    }
    txn.commit().context("durable commit of issued coupons failed")?;
    Ok(n)
}

/// Generation 0 of a new coupon for `dose_round`, numbered from `serial`.
pub fn new_coupon(
    municipality: protocol::municipality::MunicipalityCode,
    dose_round: u8,
    serial: u32,
    issued_at: OffsetDateTime,
) -> anyhow::Result<CouponEntry> {
    let code = CouponCode {
        ticket_kind: TICKET_KIND_VACCINATION,
        dose_round,
        municipality,
        number: CouponNumber::from_serial(serial).context("coupon serials exhausted")?,
    };
    Ok(CouponEntry {
        code,
        generation: 0,
        status: CouponStatus::Valid,
        issued_at,
        status_reason: None,
        used_by_event: None,
    })
}

fn n_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1)
}

/// Runs `f` over slices of `items` on every core, keeping order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&[T]) -> anyhow::Result<Vec<R>> + Sync,
) -> anyhow::Result<Vec<R>> {
    let chunk_size = items.len().div_ceil(n_threads()).max(1);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items.chunks(chunk_size).map(|chunk| scope.spawn(move || f(chunk))).collect();
        let mut out = Vec::with_capacity(items.len());
        for handle in handles {
            out.extend(handle.join().map_err(|_| anyhow::anyhow!("a worker thread panicked"))??);
        }
        Ok(out)
    })
}

/// Runs `f` on each owned item on every core, keeping order.
fn parallel_map_owned<T: Send, R: Send>(
    items: Vec<T>,
    f: impl Fn(T) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Vec<R>> {
    let chunk_size = items.len().div_ceil(n_threads()).max(1);
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(chunk_size).collect());
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<anyhow::Result<Vec<R>>>()))
            .collect();
        let mut out = Vec::new();
        for handle in handles {
            out.extend(handle.join().map_err(|_| anyhow::anyhow!("a worker thread panicked"))??);
        }
        Ok(out)
    })
}

/// What the print-shop export wrote.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExportReport {
    /// Coupons in the file.
    pub coupons: u64,
    /// QR images written.
    pub qr_images: u64,
}

/// The QR symbol for a coupon's text, at version 5 and error-correction level M
/// (see docs/coupon-qr.md).
pub fn coupon_qr(qr_text: &str) -> anyhow::Result<QrCode> {
    QrCode::with_version(qr_text.as_bytes(), Version::Normal(5), EcLevel::M)
        .map_err(|e| anyhow::anyhow!("the coupon text does not fit QR version 5-M: {e:?}"))
}

/// Renders a QR symbol as a grayscale PNG with a 4-module quiet zone.
pub fn qr_png(code: &QrCode, pixels_per_module: u32) -> anyhow::Result<Vec<u8>> {
    let modules = u32::try_from(code.width())?;
    let quiet = 4;
    let size = (modules + 2 * quiet) * pixels_per_module;
    let colors = code.to_colors();
    let mut pixels = vec![255u8; (size * size) as usize];
    for y in 0..modules {
        for x in 0..modules {
            if colors[(y * modules + x) as usize] == qrcode::Color::Dark {
                for dy in 0..pixels_per_module {
                    let row = (y + quiet) * pixels_per_module + dy;
                    let start = (row * size + (x + quiet) * pixels_per_module) as usize;
                    pixels[start..start + pixels_per_module as usize].fill(0);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, size, size);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}

/// Writes the print-shop file `coupons.csv` (UTF-8 with BOM, for Excel) and, unless
/// `qr_images` is false, one PNG per coupon under `qr/`.
pub fn export_print_shop(
    files: &NodeFiles,
    store: &Store,
    out_dir: &Path,
    qr_images: bool,
) -> anyhow::Result<ExportReport> {
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let csv_path = out_dir.join("coupons.csv");
    let mut file = std::io::BufWriter::new(
        fs::File::create(&csv_path).with_context(|| format!("cannot create {}", csv_path.display()))?,
    );
    file.write_all("\u{feff}".as_bytes())?;
    let mut writer = csv::Writer::from_writer(file);
    writer.write_record([
        "券番号18桁",
        "接種回",
        "版",
        "宛名番号",
        "氏名",
        "氏名カナ",
        "生年月日",
        "住所",
        "QRデータ",
        "QR画像",
    ])?;
    let total = store.read()?.n_residents()?;
    let progress = bar(total, "印刷用出力 export");
    let mut report = ExportReport::default();
    let mut after: Option<String> = None;
    loop {
        let view = store.read()?;
        let ids = view.resident_ids(after.as_deref(), PAGE)?;
        let Some(last) = ids.last().cloned() else { break };
        after = Some(last);
        let rows = parallel_map(&ids, |chunk| {
            let view = store.read()?;
            let mut rows = Vec::new();
            for id in chunk {
                let record = view.record(id)?.context("resident vanished")?;
                for entry in record.coupons.values().filter(|c| c.status == CouponStatus::Valid) {
                    let signed = SignedCoupon::sign(entry.code, entry.generation, &files.signing_key);
                    let qr_text = signed.to_qr_text();
                    let png = if qr_images { Some(qr_png(&coupon_qr(&qr_text)?, 8)?) } else { None };
                    let digest = printed_digest(&signed);
                    rows.push((record.identity.clone(), entry.clone(), qr_text, png, digest));
                }
            }
            Ok(rows)
        })?;
        // What was printed, so that a capture checks these coupons by their digest
        // (`store::PRINTED`) instead of signing them again.
        let txn = store.begin_write()?;
        put_printed(&txn, rows.iter().map(|(_, entry, _, _, digest)| (entry.key(), *digest)))?;
        txn.commit()?;
        for (identity, entry, qr_text, png, _) in rows {
            let image_name = match png {
                Some(png) => {
                    let number = entry.code.number.to_string();
                    let relative = format!("qr/{}/{}-{:02}.png", &number[..5], number, entry.generation);
                    let path = out_dir.join(&relative);
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::write(&path, png)?;
                    report.qr_images += 1;
                    relative
                }
                None => String::new(),
            };
            writer.write_record([
                entry.code.to_string(),
                entry.code.dose_round.to_string(),
                entry.generation.to_string(),
                identity.atena_number,
                identity.name,
                identity.name_kana,
                identity.birth_date.to_string(),
                identity.address,
                qr_text,
                image_name,
            ])?;
            report.coupons += 1;
        }
        progress.inc(ids.len() as u64);
    }
    writer.flush()?;
    progress.finish_and_clear();
    Ok(report)
}
