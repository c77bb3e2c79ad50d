//! The audit log: append-only, hash-chained, with Ed25519-signed checkpoints.
//!
//! Every read of personal data, every write, every failed login and every refused
//! authorization appends one [`AuditEntry`] in the same redb transaction as the work it
//! describes. An entry holds ids, never names or birth dates. Entry `n` carries the SHA-256 of
//! the stored bytes of entry `n − 1` (`prev`), so changing, removing, inserting or swapping
//! any entry breaks the chain at that point. Every `checkpoint_every` entries (and on request)
//! the node signs `(seq, hash)` of the newest entry with its audit key
//! (`keys/audit-signing.pk8`), so an entry already covered by a checkpoint cannot be rewritten
//! even by someone who recomputes the whole chain, unless they also hold the key.
//!
//! An export (`vrs-node audit export`) is JSON Lines: a header, the entries exactly as
//! stored, the checkpoints of the range, and a seal signing the SHA-256 of every line before
//! it. An auditor checks it offline with the node's public key alone ([`verify_export`]).

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Context;
use protocol::municipality::MunicipalityCode;
use protocol::person::{hex_decode, hex_lower};
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// seq → the entry's JSON bytes, exactly as hashed.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// seq of the entry a checkpoint covers → the checkpoint's JSON bytes.
pub const AUDIT_CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_checkpoints");

/// `prev` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// Format name in an export's header.
pub const EXPORT_FORMAT: &str = "vrs-audit-export/1";

/// What a caller asks to be recorded.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    /// Who: `user:NAME`, `token:NAME`, `cli:OSUSER` or `anonymous`.
    pub actor: String,
    /// The role the actor acted in (`-` when not authenticated).
    pub role: String,
    /// What, e.g. `resident.read`, `capture`, `auth.login`.
    pub action: String,
    /// Which record: `resident:ID`, `coupon:NUMBER`, `user:NAME`, `route:PATH`, …
    pub subject: String,
    /// `ok`, `replay`, `refused:CODE`, `denied:CODE`, `failed:CODE`.
    pub outcome: String,
    /// The HTTP request id (`x-request-id`), or `-`.
    pub request_id: String,
}

/// One stored entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// SHA-256 (hex) of the previous entry's stored bytes.
    pub prev: String,
    /// When, UTC, RFC 3339.
    pub at: String,
    /// Who.
    pub actor: String,
    /// In which role.
    pub role: String,
    /// What.
    pub action: String,
    /// Which record.
    pub subject: String,
    /// How it ended.
    pub outcome: String,
    /// Request id.
    pub request_id: String,
}

/// A signed statement: "entry `seq` of this node's log hashes to `hash`".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The entry covered.
    pub seq: u64,
    /// SHA-256 (hex) of that entry's bytes.
    pub hash: String,
    /// When it was signed, UTC.
    pub at: String,
    /// Ed25519 signature (hex) of [`checkpoint_message`].
    pub signature: String,
}

/// The bytes a checkpoint signs.
pub fn checkpoint_message(municipality: MunicipalityCode, seq: u64, hash: &str, at: &str) -> Vec<u8> {
    format!("vrs-audit-checkpoint/1\n{municipality}\n{seq}\n{hash}\n{at}").into_bytes()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn now_text(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC).format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The node's audit log writer: the key that signs checkpoints and how often.
pub struct AuditLog {
    key: Ed25519KeyPair,
    municipality: MunicipalityCode,
    checkpoint_every: u64,
}

impl AuditLog {
    /// A log signed with `key`, checkpointed every `checkpoint_every` entries.
    pub fn new(key: Ed25519KeyPair, municipality: MunicipalityCode, checkpoint_every: u64) -> Self {
        Self { key, municipality, checkpoint_every: checkpoint_every.max(1) }
    }

    /// The public key that verifies this log's checkpoints.
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }

    /// Appends an entry in `txn` (so it commits, or not, with the work it records).
    pub fn append(
        &self,
        txn: &WriteTransaction,
        event: &AuditEvent,
        at: OffsetDateTime,
    ) -> anyhow::Result<u64> {
        let mut table = txn.open_table(AUDIT)?;
        let (seq, prev) = match table.last()? {
            Some((seq, bytes)) => (seq.value() + 1, sha256(bytes.value())),
            None => (1, GENESIS),
        };
        let entry = AuditEntry {
            seq,
            prev: hex_lower(&prev),
            at: now_text(at),
            actor: event.actor.clone(),
            role: event.role.clone(),
            action: event.action.clone(),
            subject: event.subject.clone(),
            outcome: event.outcome.clone(),
            request_id: event.request_id.clone(),
        };
        let bytes = serde_json::to_vec(&entry)?;
        table.insert(seq, bytes.as_slice())?;
        drop(table);
        if seq % self.checkpoint_every == 0 {
            self.sign_at(txn, seq, &bytes, at)?;
        }
        Ok(seq)
    }

    /// Signs a checkpoint at the newest entry unless one is there already.
    pub fn checkpoint(&self, txn: &WriteTransaction, at: OffsetDateTime) -> anyhow::Result<Option<u64>> {
        let last = {
            let table = txn.open_table(AUDIT)?;
            table.last()?.map(|(seq, bytes)| (seq.value(), bytes.value().to_vec()))
        };
        let Some((seq, bytes)) = last else { return Ok(None) };
        if txn.open_table(AUDIT_CHECKPOINTS)?.get(seq)?.is_some() {
            return Ok(None);
        }
        self.sign_at(txn, seq, &bytes, at)?;
        Ok(Some(seq))
    }

    fn sign_at(
        &self,
        txn: &WriteTransaction,
        seq: u64,
        bytes: &[u8],
        at: OffsetDateTime,
    ) -> anyhow::Result<()> {
        let checkpoint = self.sign(seq, &hex_lower(&sha256(bytes)), &now_text(at));
        txn.open_table(AUDIT_CHECKPOINTS)?.insert(seq, serde_json::to_vec(&checkpoint)?.as_slice())?;
        Ok(())
    }

    fn sign(&self, seq: u64, hash: &str, at: &str) -> Checkpoint {
        let signature = self.key.sign(&checkpoint_message(self.municipality, seq, hash, at));
        Checkpoint { seq, hash: hash.to_owned(), at: at.to_owned(), signature: hex_lower(signature.as_ref()) }
    }

    /// Writes an export of the entries made between `from` and `to` (inclusive, UTC
    /// instants) as JSON Lines, sealed with the audit key.
    pub fn export(
        &self,
        txn: &ReadTransaction,
        from: OffsetDateTime,
        to: OffsetDateTime,
        now: OffsetDateTime,
    ) -> anyhow::Result<Vec<u8>> {
        let entries = txn.open_table(AUDIT)?;
        let mut selected: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut prev = GENESIS;
        for row in entries.iter()? {
            let (seq, bytes) = row?;
            let bytes = bytes.value().to_vec();
            let entry: AuditEntry = serde_json::from_slice(&bytes)
                .with_context(|| format!("audit entry {} is not readable", seq.value()))?;
            let at = OffsetDateTime::parse(&entry.at, &Rfc3339)
                .with_context(|| format!("audit entry {} has a bad time", seq.value()))?;
            if at < from {
                prev = sha256(&bytes);
                continue;
            }
            if at > to {
                break;
            }
            selected.push((seq.value(), bytes));
        }
        let first_seq = selected.first().map_or(0, |(seq, _)| *seq);
        let last_seq = selected.last().map_or(0, |(seq, _)| *seq);
        let header = serde_json::json!({
            "format": EXPORT_FORMAT,
            "municipality": self.municipality,
            "public_key": hex_lower(&self.public_key()),
            "from": now_text(from),
            "to": now_text(to),
            "first_seq": first_seq,
            "last_seq": last_seq,
            "prev": hex_lower(&prev),
            "exported_at": now_text(now),
        });
        let mut out = serde_json::to_vec(&header)?;
        out.push(b'\n');
        for (_, bytes) in &selected {
            out.extend_from_slice(bytes);
            out.push(b'\n');
        }
        let checkpoints = txn.open_table(AUDIT_CHECKPOINTS)?;
        let mut listed: Vec<serde_json::Value> = Vec::new();
        if first_seq > 0 {
            for row in checkpoints.range(first_seq..=last_seq)? {
                let (_, bytes) = row?;
                listed.push(serde_json::from_slice(bytes.value())?);
            }
        }
        out.extend_from_slice(&serde_json::to_vec(&serde_json::json!({ "checkpoints": listed }))?);
        out.push(b'\n');
        // The seal: the node's statement over everything above, including the newest
        // entry of the range whether or not a periodic checkpoint covered it.
        let last_hash =
            selected.last().map_or_else(|| hex_lower(&prev), |(_, bytes)| hex_lower(&sha256(bytes)));
        let body_hash = hex_lower(&sha256(&out));
        let sealed_at = now_text(now);
        let signature =
            self.key.sign(&seal_message(self.municipality, last_seq, &last_hash, &body_hash, &sealed_at));
        let seal = serde_json::json!({"seal": {
            "last_seq": last_seq, "last_hash": last_hash, "body_sha256": body_hash,
            "at": sealed_at, "signature": hex_lower(signature.as_ref()),
        }});
        out.extend_from_slice(&serde_json::to_vec(&seal)?);
        out.push(b'\n');
        Ok(out)
    }
}

fn seal_message(
    municipality: MunicipalityCode,
    last_seq: u64,
    last_hash: &str,
    body: &str,
    at: &str,
) -> Vec<u8> {
    format!("vrs-audit-seal/1\n{municipality}\n{last_seq}\n{last_hash}\n{body}\n{at}").into_bytes()
}

/// What a verification found wrong, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Where: `entry 17`, `checkpoint 64`, `line 3`, `seal`.
    pub at: String,
    /// What, in English.
    pub en: String,
    /// What, in Japanese.
    pub ja: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} / {}", self.at, self.ja, self.en)
    }
}

fn finding(at: impl Into<String>, en: impl Into<String>, ja: impl Into<String>) -> Finding {
    Finding { at: at.into(), en: en.into(), ja: ja.into() }
}

/// What a verification established.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints whose signature and hash were checked.
    pub checkpoints: u64,
    /// Newest entry covered by a checkpoint (or the seal).
    pub sealed_through: u64,
    /// Entries after it (appended since the last checkpoint; a chain alone cannot prove
    /// that none were removed from the very end).
    pub unsealed: u64,
    /// Everything wrong; empty when the log is intact.
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// True when nothing was found wrong.
    pub fn is_intact(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks a sequence of entries and checkpoints: the chain from `prev`, seq numbers without
/// gaps from `first_seq`, and each checkpoint's signature and hash.
pub fn verify_chain(
    municipality: MunicipalityCode,
    public_key: &[u8],
    first_seq: u64,
    prev: [u8; 32],
    entries: &[(u64, Vec<u8>)],
    checkpoints: &[Vec<u8>],
) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut hashes: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    let mut prev = prev;
    let mut expected = first_seq;
    for (key, bytes) in entries {
        report.entries += 1;
        let place = format!("entry {key}");
        match serde_json::from_slice::<AuditEntry>(bytes) {
            Err(e) => report.findings.push(finding(
                &place,
                format!("not a readable entry ({e})"),
                format!("読み取れない記録です（{e}）"),
            )),
            Ok(entry) => {
                if entry.seq != *key || entry.seq != expected {
                    report.findings.push(finding(
                        &place,
                        format!(
                            "holds seq {} where {expected} was due: an entry was removed, inserted or moved",
                            entry.seq
                        ),
                        format!(
                            "連番 {} が現れましたが {expected} のはずです（削除・挿入・並べ替え）",
                            entry.seq
                        ),
                    ));
                }
                if entry.prev != hex_lower(&prev) {
                    report.findings.push(finding(
                        &place,
                        "does not chain to the entry before it: that entry was changed, removed or moved",
                        "直前の記録とハッシュがつながりません（改変・削除・並べ替え）",
                    ));
                }
            }
        }
        prev = sha256(bytes);
        hashes.insert(*key, prev);
        expected = key + 1;
    }
    let last_seq = entries.last().map(|(seq, _)| *seq);
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    for (i, bytes) in checkpoints.iter().enumerate() {
        let Ok(checkpoint) = serde_json::from_slice::<Checkpoint>(bytes) else {
            report.findings.push(finding(
                format!("checkpoint #{}", i + 1),
                "not a readable checkpoint",
                "読み取れないチェックポイントです",
            ));
            continue;
        };
        let place = format!("checkpoint {}", checkpoint.seq);
        let message = checkpoint_message(municipality, checkpoint.seq, &checkpoint.hash, &checkpoint.at);
        let signature_ok =
            hex_decode(&checkpoint.signature).is_some_and(|sig| key.verify(&message, &sig).is_ok());
        if !signature_ok {
            report.findings.push(finding(&place, "signature does not verify", "署名が検証できません"));
            continue;
        }
        report.checkpoints += 1;
        match hashes.get(&checkpoint.seq) {
            Some(hash) if hex_lower(hash) == checkpoint.hash => {
                report.sealed_through = report.sealed_through.max(checkpoint.seq);
            }
            Some(_) => report.findings.push(finding(
                &place,
                format!("entry {} no longer has the hash the node signed", checkpoint.seq),
                format!("記録 {} のハッシュが署名時と異なります（改変）", checkpoint.seq),
            )),
            None if last_seq.is_none_or(|last| checkpoint.seq > last) => report.findings.push(finding(
                &place,
                format!(
                    "entry {} was signed but is missing: entries were removed from the end",
                    checkpoint.seq
                ),
                format!("署名済みの記録 {} がありません（末尾の削除）", checkpoint.seq),
            )),
            None => {}
        }
    }
    report.unsealed = entries.iter().filter(|(seq, _)| *seq > report.sealed_through).count() as u64;
    report
}

/// Verifies the log inside a store. The node signs a checkpoint at least every
/// `checkpoint_every` entries, so a longer stretch without one means checkpoints were
/// removed — the way someone would hide a rewritten, re-chained tail.
pub fn verify_store(
    txn: &ReadTransaction,
    municipality: MunicipalityCode,
    public_key: &[u8],
    checkpoint_every: u64,
) -> anyhow::Result<VerifyReport> {
    let mut entries = Vec::new();
    for row in txn.open_table(AUDIT)?.iter()? {
        let (seq, bytes) = row?;
        entries.push((seq.value(), bytes.value().to_vec()));
    }
    let mut checkpoints = Vec::new();
    for row in txn.open_table(AUDIT_CHECKPOINTS)?.iter()? {
        let (_, bytes) = row?;
        checkpoints.push(bytes.value().to_vec());
    }
    let mut report = verify_chain(municipality, public_key, 1, GENESIS, &entries, &checkpoints);
    let mut signed: Vec<u64> = checkpoints
        .iter()
        .filter_map(|c| serde_json::from_slice::<Checkpoint>(c).ok())
        .map(|c| c.seq)
        .collect();
    signed.sort_unstable();
    let last = entries.last().map_or(0, |(seq, _)| *seq);
    let mut previous = 0;
    for seq in signed.iter().copied().chain(std::iter::once(last)) {
        if seq.saturating_sub(previous) > checkpoint_every.max(1) {
            report.findings.push(finding(
                format!("entries {}–{seq}", previous + 1),
                format!("no checkpoint over {} entries (one is signed every {checkpoint_every}): checkpoints were removed", seq - previous),
                format!("{} 件の間にチェックポイントがありません（{checkpoint_every} 件ごとに署名されるはず）：チェックポイントの削除", seq - previous),
            ));
        }
        previous = previous.max(seq);
    }
    Ok(report)
}

/// Checks the store's log against the checkpoints the municipality deposited at the
/// national node (`GET /api/v1/national/anchors/{municipality}`): each must be signed with
/// the audit key, and the entry it names must still hash to what it says. A log rewritten
/// and re-signed locally still differs from what was deposited before the rewrite.
/// Checkpoints of another log of the municipality (the old primary's, before a failover)
/// are left aside. Returns the findings, how many anchors were checked and how many were
/// of another log.
pub fn verify_anchors(
    txn: &ReadTransaction,
    municipality: MunicipalityCode,
    public_key: &[u8],
    anchors: &[protocol::statistics::AnchoredCheckpoint],
) -> anyhow::Result<(Vec<Finding>, u64, u64)> {
    let entries = txn.open_table(AUDIT)?;
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let own = hex_lower(public_key);
    let mut findings = Vec::new();
    let (mut checked, mut other) = (0, 0);
    for anchor in anchors {
        if !anchor.log_key.is_empty() && anchor.log_key != own {
            other += 1;
            continue;
        }
        checked += 1;
        let at = format!("anchor {}", anchor.seq);
        let message = checkpoint_message(municipality, anchor.seq, &anchor.hash, &anchor.at);
        let signed = hex_decode(&anchor.signature).is_some_and(|sig| key.verify(&message, &sig).is_ok());
        if anchor.municipality != municipality || !signed {
            findings.push(finding(
                at,
                "the deposited checkpoint is not signed by this municipality's audit key",
                "預けたチェックポイントの署名がこの市区町村の監査鍵と一致しません",
            ));
            continue;
        }
        match entries.get(anchor.seq)? {
            None => findings.push(finding(
                at,
                format!("entry {} was deposited at the national node but is gone from the log", anchor.seq),
                format!("国に預けた記録 {} が監査ログにありません（削除）", anchor.seq),
            )),
            Some(bytes) if hex_lower(&sha256(bytes.value())) != anchor.hash => findings.push(finding(
                at,
                format!(
                    "entry {} differs from what was deposited at the national node (rewritten)",
                    anchor.seq
                ),
                format!("記録 {} が国に預けた内容と異なります（書き換え）", anchor.seq),
            )),
            Some(_) => {}
        }
    }
    Ok((findings, checked, other))
}

#[derive(Deserialize)]
struct ExportHeader {
    format: String,
    municipality: MunicipalityCode,
    public_key: String,
    first_seq: u64,
    last_seq: u64,
    prev: String,
}

#[derive(Deserialize)]
struct SealLine {
    seal: Seal,
}

#[derive(Deserialize)]
struct Seal {
    last_seq: u64,
    last_hash: String,
    body_sha256: String,
    at: String,
    signature: String,
}

#[derive(Deserialize)]
struct CheckpointsLine {
    checkpoints: Vec<serde_json::Value>,
}

/// Verifies an export with the node's public key (given by the auditor, not taken from the
/// file): the seal over the whole file, the chain and every checkpoint.
pub fn verify_export(file: &[u8], public_key: &[u8]) -> VerifyReport {
    let mut report = VerifyReport::default();
    let fail = |mut report: VerifyReport, f: Finding| {
        report.findings.push(f);
        report
    };
    let Some(body) = file.strip_suffix(b"\n") else {
        return fail(
            report,
            finding("file", "does not end with a newline: cut short", "ファイルが途中で切れています"),
        );
    };
    let lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    if lines.len() < 3 {
        return fail(
            report,
            finding("file", "too few lines for an export", "エクスポートとして行数が足りません"),
        );
    }
    let Ok(header) = serde_json::from_slice::<ExportHeader>(lines[0]) else {
        return fail(report, finding("line 1", "header is not readable", "ヘッダーが読み取れません"));
    };
    if header.format != EXPORT_FORMAT {
        return fail(report, finding("line 1", "unknown export format", "未知の形式です"));
    }
    if hex_decode(&header.public_key).as_deref() != Some(public_key) {
        return fail(
            report,
            finding(
                "line 1",
                "made with another key than the one given",
                "指定の公開鍵と異なる鍵のエクスポートです",
            ),
        );
    }
    let seal_line = lines[lines.len() - 1];
    let Ok(SealLine { seal }) = serde_json::from_slice::<SealLine>(seal_line) else {
        return fail(
            report,
            finding(format!("line {}", lines.len()), "seal is not readable", "封印が読み取れません"),
        );
    };
    let sealed_len = body.len() + 1 - seal_line.len() - 1;
    let body_hash = hex_lower(&sha256(&file[..sealed_len]));
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let message =
        seal_message(header.municipality, seal.last_seq, &seal.last_hash, &seal.body_sha256, &seal.at);
    if hex_decode(&seal.signature).is_none_or(|sig| key.verify(&message, &sig).is_err()) {
        report.findings.push(finding("seal", "signature does not verify", "封印の署名が検証できません"));
    }
    if seal.body_sha256 != body_hash {
        report.findings.push(finding(
            "seal",
            "the file was changed after it was sealed",
            "封印後にファイルが変更されています",
        ));
    }
    let checkpoints_line = lines[lines.len() - 2];
    let checkpoints: Vec<Vec<u8>> = match serde_json::from_slice::<CheckpointsLine>(checkpoints_line) {
        Ok(line) => line.checkpoints.iter().map(|c| serde_json::to_vec(c).unwrap_or_default()).collect(),
        Err(_) => {
            report.findings.push(finding(
                format!("line {}", lines.len() - 1),
                "checkpoint list is not readable",
                "チェックポイント一覧が読み取れません",
            ));
            Vec::new()
        }
    };
    let mut entries = Vec::new();
    for (i, line) in lines[1..lines.len() - 2].iter().enumerate() {
        let key = serde_json::from_slice::<AuditEntry>(line).map_or(header.first_seq + i as u64, |e| e.seq);
        entries.push((key, line.to_vec()));
    }
    let prev: [u8; 32] = hex_decode(&header.prev).and_then(|v| v.try_into().ok()).unwrap_or([0xff; 32]);
    let chain =
        verify_chain(header.municipality, public_key, header.first_seq.max(1), prev, &entries, &checkpoints);
    report.entries = chain.entries;
    report.checkpoints = chain.checkpoints;
    report.findings.extend(chain.findings);
    let last =
        entries.last().map(|(_, bytes)| hex_lower(&sha256(bytes))).unwrap_or_else(|| header.prev.clone());
    let last_seq = entries.last().map_or(0, |(seq, _)| *seq);
    if seal.last_hash != last || seal.last_seq != last_seq || header.last_seq != last_seq {
        report.findings.push(finding(
            "seal",
            "the last entry is not the one the node sealed: entries were removed or added at the end",
            "最後の記録が封印と一致しません（末尾の削除・追加）",
        ));
    } else {
        report.sealed_through = last_seq;
    }
    report
}
