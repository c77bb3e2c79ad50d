//! Relocation handoff at a municipal node: moving a resident out (転出), asking for a
//! newcomer's history (転入), receiving and accepting what another municipality sealed for
//! this one, and the exchange with the national node's ledger that carries it.
//!
//! Every step is one durable commit, and each is safe to repeat, so a node killed between
//! any two steps resumes from what it stored:
//!
//! 1. the sender's writer marks the record transferred, revokes its coupons for terminals,
//!    seals the handoff and stores it in `handoff_out` — one commit, one audit entry
//!    (`handoff.export`);
//! 2. the sync loop deposits it at the national node until the ledger says stored
//!    (re-depositing a stored handoff changes nothing);
//! 3. the receiver's sync loop fetches what is addressed to it and stores it in
//!    `handoff_in` (fetching it again changes nothing);
//! 4. the receiver accepts it (automatically, or by an admin): opens it, creates the
//!    resident with the whole history and a coupon for the next dose — one commit, one
//!    audit entry (`handoff.import`); accepting again returns what was done;
//! 5. the receiver tells the ledger, which marks the person held by the receiver; the
//!    sender sees that and marks its copy completed.
//!
//! Instead of step 4, the receiver's admin may send the handoff back (`handoff.return`,
//! with a reason code): the ledger gives the person back to the sender, and the sender's
//! writer, seeing it, makes the resident active again with their coupons — one commit
//! (`handoff.returned`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use anyhow::Context;
use axum::http::StatusCode;
use protocol::coupon::SignedCoupon;
use protocol::directory::SignedDirectory;
use protocol::document::{
    CouponEntry, ResidentEvent, ResidentRecord, ResidentStatus, ReturnedTransfer, Transfer,
};
use protocol::handoff::{
    AskAnswer, AskState, DepositOutcome, HandoffPayload, HandoffResponse, HandoffSync, HistoryAsk,
    HistoryRequest, Join, JoinRefusal, LedgerState, MAX_HANDOFFS_PER_MESSAGE, ReturnReason, ReturnedHandoff,
    SealedHandoff, received_record, seal,
};
pub use protocol::handoff::{holds_provisional_atena, provisional_atena};
use protocol::ledger::is_retryable;
use protocol::municipality::MunicipalityCode;
use protocol::person::{PersonKeySecret, hex_decode};
use protocol::validation::municipality_name;
use redb::{ReadableTable, WriteTransaction};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::{new_id, rfc3339};
use crate::problem::Problem;
use crate::store::{
    FORWARD_OUTBOX, HANDOFF_ASKS, HANDOFF_DUE, HANDOFF_IN, HANDOFF_OUT, IDX_ATENA, IDX_COUPON, IDX_EVENT,
    IDX_HANDOFF_COUPON, IDX_HANDOFF_FROM, IDX_PERSON, META_COUPON_SERIAL, META_HANDOFF_SEQ,
    META_RESIDENT_SEQ, Mutation, Store, get_json, put_json,
};
use crate::writer::{Command, Step, Who, WriterContext, WriterHandle};

/// `handoff_due` values.
const DUE_DEPOSIT: u8 = 1;
const DUE_WATCH: u8 = 2;
const DUE_ACK: u8 = 3;
const DUE_RETURN: u8 = 4;
/// An open ask (`ask/<person key>`): sent with every sync until answered.
const DUE_ASK: u8 = 5;
/// Envelope bytes in one sync, well under the request size limit (a record with a long
/// history is larger; one always goes, alone if need be).
const DEPOSIT_BUDGET: usize = 2 * 1024 * 1024;

/// The environment variable that names a crash point (tests only).
pub const CRASH_ENV: &str = "VRS_CRASH_AT";

/// Kills this process with SIGKILL — no destructor, no flush, exactly `kill -9` — when
/// `VRS_CRASH_AT` names this point. The multi-process tests use it to stop a node between
/// two steps of the handoff protocol.
pub fn crash_point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT.get_or_init(|| std::env::var(CRASH_ENV).ok()).as_deref() == Some(name) {
        eprintln!("crash point {name}: kill -9 of this process ({CRASH_ENV})");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::process::abort();
    }
}

/// A handoff this node sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutEntry {
    /// The handoff.
    pub handoff_id: String,
    /// The resident here (their record is kept, read-only).
    pub resident_id: String,
    /// Their person key.
    pub person_key: String,
    /// Where they moved.
    pub to: MunicipalityCode,
    /// Where the handoff stands.
    pub state: OutState,
    /// Why (the admin's words, or the newcomer request it answers).
    pub reason: String,
    /// Who triggered it.
    pub actor: String,
    /// When it was sealed.
    pub created_at: String,
    /// When the state last changed.
    pub updated_at: String,
    /// The national node's refusal, if it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Why the receiver sent it back, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned: Option<ReturnReason>,
    /// The sealed envelope, until the receiver accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedHandoff>,
    /// Its key in `handoff_due` while the sync has something to do with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_key: Option<String>,
}

/// Where an outgoing handoff stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutState {
    /// Sealed here, not yet stored by the national node.
    Sealed,
    /// In the national ledger, waiting for the receiver.
    Deposited,
    /// Accepted by the receiver.
    Completed,
    /// Refused by the national node (see `refusal`).
    Refused,
    /// Sent back by the receiver (see `returned`): the resident is active here again.
    Returned,
}

/// A handoff received.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InEntry {
    /// The handoff.
    pub handoff_id: String,
    /// Where the resident came from.
    pub from: MunicipalityCode,
    /// Their person key.
    pub person_key: String,
    /// Where it stands.
    pub state: InState,
    /// When it arrived.
    pub received_at: String,
    /// When the state last changed.
    pub updated_at: String,
    /// The resident created here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_id: Option<String>,
    /// The 18-digit code of the coupon issued here for the next dose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon: Option<String>,
    /// Its QR text, to print.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr_text: Option<String>,
    /// Who accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<String>,
    /// Whether the national ledger knows it was accepted.
    #[serde(default)]
    pub acked: bool,
    /// Why it could not be accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The sealed envelope, until accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedHandoff>,
    /// Its key in `handoff_due` until the ledger knows it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_key: Option<String>,
    /// Doses whose number changed when the history joined a resident vaccinated here before
    /// it arrived (event ids), for staff to review.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renumbered: Vec<String>,
    /// Why it was sent back, if it was (the code the sender sees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned: Option<ReturnReason>,
    /// The admin's own words on sending it back: kept here only, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_note: Option<String>,
    /// Who sent it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned_by: Option<String>,
}

/// Where an incoming handoff stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InState {
    /// Stored here, waiting for acceptance.
    Received,
    /// The resident was created here.
    Accepted,
    /// It cannot be accepted as it is (see `error`); an admin may retry, or send it back.
    Failed,
    /// Sent back to the sender (see `returned`); it can no longer be accepted.
    Returned,
}

/// A newcomer registered here (転入) whose history was asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AskEntry {
    /// This ask's id (a new ask for the same person replaces an answered one).
    pub ask_id: String,
    /// Their person key.
    pub person_key: String,
    /// The keyed hash of their birth date the holder checks.
    pub birth_check: String,
    /// The atena number given here.
    pub atena_number: String,
    /// Their address here.
    pub address: String,
    /// The municipality on their 転出証明書, if given.
    pub previous: Option<MunicipalityCode>,
    /// Where the ask stands.
    pub state: AskLocal,
    /// Who holds them, per the ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<MunicipalityCode>,
    /// The handoff that answers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_id: Option<String>,
    /// Who asked.
    pub actor: String,
    /// When.
    pub asked_at: String,
    /// When the state last changed.
    pub updated_at: String,
}

/// Where an ask stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AskLocal {
    /// Not yet seen by the national node.
    Asking,
    /// Relayed to the municipality holding the person.
    Waiting,
    /// That municipality sent the handoff.
    Sent,
    /// The handoff arrived and was accepted.
    Received,
    /// Nobody holds a person with this key.
    NotFound,
}

/// The writer's part of moving a resident out.
#[derive(Debug)]
pub struct TransferOut {
    /// The resident.
    pub resident_id: String,
    /// Where they moved.
    pub to: MunicipalityCode,
    /// The receiver's X25519 key, from the directory.
    pub recipient_key: [u8; 32],
    /// Fresh random bytes for the ephemeral key.
    pub ephemeral: [u8; 32],
    /// The new handoff's id.
    pub handoff_id: String,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
}

/// The writer's part of a handoff that will not reach its receiver: sent back by the
/// receiver, or refused for good by the national ledger.
#[derive(Debug)]
pub struct TransferBack {
    /// The handoff.
    pub handoff_id: String,
    /// Why, per the ledger ([`ReturnReason::LedgerRefused`] for a refused deposit).
    pub reason: ReturnReason,
    /// The ledger's refusal (`code: message`), when it refused the deposit.
    pub refusal: Option<String>,
}

/// The writer's part of accepting a handoff (opened already, off the writer thread).
#[derive(Debug)]
pub struct AcceptHandoff {
    /// What was sealed.
    pub payload: HandoffPayload,
    /// The atena number here.
    pub atena_number: String,
    /// The address here, if known.
    pub address: Option<String>,
    /// Who accepted.
    pub actor: String,
}

fn conflict(code: &str, en: String, ja: String) -> Problem {
    Problem::new(StatusCode::CONFLICT, code, None, en, ja)
}

/// Seals a resident's record for another municipality: runs in the writer's transaction.
pub(crate) fn transfer_one(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    command: &TransferOut,
    now: OffsetDateTime,
) -> Step<OutEntry> {
    let Some(record) = m.record(&command.resident_id)? else {
        return Ok(Err(Problem::not_found("resident", "住民", &command.resident_id)));
    };
    if let Some(transfer) = &record.transfer {
        return Ok(Err(conflict(
            "already_transferred",
            format!(
                "the resident was already handed to {} ({})",
                municipality_name(transfer.to),
                transfer.to
            ),
            format!("この住民は既に{}（{}）へ引き継ぎ済みです", municipality_name(transfer.to), transfer.to),
        )));
    }
    if record.identity.status != ResidentStatus::Active {
        return Ok(Err(conflict(
            "resident_not_active",
            "only an active resident can be moved out".into(),
            "在住の住民のみ転出の引き継ぎができます".into(),
        )));
    }
    if command.to == record.municipality {
        return Ok(Err(Problem::bad_field(
            "to",
            "the resident cannot move to the municipality they live in",
            "転出先が現在の市区町村と同じです",
        )));
    }
    let transfer = Transfer {
        to: command.to,
        handoff_id: command.handoff_id.clone(),
        at: now,
        actor: command.actor.clone(),
    };
    m.apply_after(&command.resident_id, &ResidentEvent::TransferredOut(transfer), now, &record)?;
    let after = m.record(&command.resident_id)?.ok_or_else(|| anyhow::anyhow!("the record vanished"))?;
    let payload = HandoffPayload {
        handoff_id: command.handoff_id.clone(),
        from: record.municipality,
        to: command.to,
        person_key: record.person_key.clone(),
        record: after,
        sealed_at: rfc3339(now),
    };
    let sealed = seal(&payload, &context.signing_key, &command.recipient_key, command.ephemeral)
        .map_err(|e| anyhow::anyhow!("cannot seal the handoff: {e}"))?;
    let entry = OutEntry {
        handoff_id: command.handoff_id.clone(),
        resident_id: command.resident_id.clone(),
        person_key: record.person_key.clone(),
        to: command.to,
        state: OutState::Sealed,
        reason: command.reason.clone(),
        actor: command.actor.clone(),
        created_at: rfc3339(now),
        updated_at: rfc3339(now),
        refusal: None,
        returned: None,
        sealed: Some(sealed),
        due_key: Some(format!("out/{:020}/{}", m.next_counter(META_HANDOFF_SEQ)?, command.handoff_id)),
    };
    put_json(m.txn(), HANDOFF_OUT, &entry.handoff_id, &entry)?;
    if let Some(key) = &entry.due_key {
        m.txn().open_table(HANDOFF_DUE)?.insert(key.as_str(), DUE_DEPOSIT)?;
    }
    Ok(Ok(entry))
}

/// Makes the resident of a handoff sent back, or refused for good by the national ledger,
/// active here again, in one commit with the outbox entry (`returned` or `refused`): runs in
/// the writer's transaction. A handoff already settled (a repeated answer) changes nothing.
pub(crate) fn return_one(
    m: &mut Mutation<'_>,
    command: &TransferBack,
    now: OffsetDateTime,
) -> Step<OutEntry> {
    let out = m.txn().open_table(HANDOFF_OUT)?;
    let held = get_json::<OutEntry>(&out, &command.handoff_id)?;
    drop(out);
    let Some(mut entry) = held else {
        return Ok(Err(Problem::not_found("handoff", "引き継ぎ", &command.handoff_id)));
    };
    if !matches!(entry.state, OutState::Sealed | OutState::Deposited) {
        return Ok(Ok(entry));
    }
    let record = m.record(&entry.resident_id)?.with_context(|| {
        format!("the resident {} of handoff {} is missing", entry.resident_id, entry.handoff_id)
    })?;
    if let Some(transfer) = record.transfer.clone().filter(|t| t.handoff_id == entry.handoff_id) {
        let to = transfer.to;
        let event =
            ResidentEvent::TransferReturned(ReturnedTransfer { transfer, reason: command.reason, at: now });
        m.apply_after(&entry.resident_id, &event, now, &record)?;
        take_back_forwards(m, &record, to, &entry.handoff_id)?;
    }
    match &command.refusal {
        Some(refusal) => {
            entry.state = OutState::Refused;
            entry.refusal = Some(refusal.clone());
        }
        None => {
            entry.state = OutState::Returned;
            entry.returned = Some(command.reason);
        }
    }
    entry.sealed = None;
    if let Some(key) = entry.due_key.take() {
        m.txn().open_table(HANDOFF_DUE)?.remove(key.as_str())?;
    }
    entry.updated_at = rfc3339(now);
    put_json(m.txn(), HANDOFF_OUT, &entry.handoff_id, &entry)?;
    Ok(Ok(entry))
}

/// Captures of the resident's coupons passed on to `to`, the receiver of a handoff sent
/// back, wait there for an acceptance that will not come. Out of the outbox, the next push
/// of each (by the terminal, or by the node that forwarded it here) is recorded here.
fn take_back_forwards(
    m: &Mutation<'_>,
    record: &ResidentRecord,
    to: MunicipalityCode,
    handoff_id: &str,
) -> anyhow::Result<()> {
    let codes: std::collections::BTreeSet<String> =
        record.coupons.values().map(|c| c.code.to_string()).collect();
    let mut outbox = m.txn().open_table(FORWARD_OUTBOX)?;
    let mut stale = Vec::new();
    for row in outbox.iter()? {
        let (key, value) = row?;
        let held: crate::terminals::Outgoing = serde_json::from_slice(value.value())?;
        let capture = &held.forwarded.capture;
        let ours = protocol::validation::decode_scans(&capture.coupon, &capture.vial)
            .is_ok_and(|scans| codes.contains(&scans.coupon.code().to_string()));
        if held.owner == to && ours {
            stale.push(key.value().to_owned());
        }
    }
    for key in &stale {
        outbox.remove(key.as_str())?;
    }
    if !stale.is_empty() {
        tracing::warn!(
            handoff = %handoff_id,
            captures = stale.len(),
            "captures passed on to the receiver of a handoff sent back are taken back, to be recorded here"
        );
    }
    Ok(())
}

/// Creates the resident a handoff carries: runs in the writer's transaction.
pub(crate) fn accept_one(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    command: &AcceptHandoff,
    now: OffsetDateTime,
) -> Step<InEntry> {
    let payload = &command.payload;
    let Some(mut entry) = get_json::<InEntry>(&m.txn().open_table(HANDOFF_IN)?, &payload.handoff_id)? else {
        return Ok(Err(Problem::not_found("handoff", "引き継ぎ", &payload.handoff_id)));
    };
    if entry.state == InState::Accepted {
        return Ok(Ok(entry));
    }
    if let Some(existing) = m.index(IDX_PERSON, &payload.person_key)?
        && let Some(held) = m.record(&existing)?
        && held.transfer.is_none()
        && held.identity.status == ResidentStatus::Active
    {
        if held.arrival.as_ref().is_some_and(|a| a.handoff_id == payload.handoff_id) {
            // Accepted before, by a primary this node replaced: the record is here already,
            // with the renumberings the join made.
            let actor = protocol::handoff::join_actor(&payload.handoff_id);
            entry.renumbered =
                held.corrections.values().filter(|c| c.actor == actor).map(|c| c.event_id.clone()).collect();
            mark_accepted(m, &mut entry, existing, &command.actor, now)?;
            return Ok(Ok(entry));
        }
        let join = match protocol::handoff::join_history(&held, payload, now) {
            Ok(join) => join,
            Err(JoinRefusal::BirthDateDiffers) => {
                return Ok(Err(conflict(
                    "birth_date_differs",
                    format!(
                        "resident {existing} here has this person key but another birth date than the handoff's record; check the register before accepting"
                    ),
                    format!(
                        "住民 {existing} は同じ個人番号ですが、生年月日が引き継ぎの記録と異なります。住民票を確認してください"
                    ),
                )));
            }
            Err(JoinRefusal::ArrivedByAnotherHandoff) => {
                return Ok(Err(conflict(
                    "already_registered",
                    format!(
                        "resident {existing} here already has this person key and arrived by another handoff; an admin must reconcile the two"
                    ),
                    format!(
                        "この方は既に住民 {existing} として登録されています（別の引き継ぎで受け入れ済み）。職員による確認が必要です"
                    ),
                )));
            }
        };
        // Registered here from the register extract before the handoff arrived: the history
        // joins that resident, who keeps their atena number and identity.
        let given = &command.atena_number;
        if *given != held.identity.atena_number && *given != provisional_atena(&payload.handoff_id) {
            let atena = &held.identity.atena_number;
            return Ok(Err(conflict(
                "atena_number_differs",
                format!(
                    "this person is resident {existing} here, atena number {atena}: accept with that number or none"
                ),
                format!(
                    "この方は宛名番号 {atena} の住民 {existing} として登録済みです。その宛名番号で（または指定せずに）受け入れてください"
                ),
            )));
        }
        return join_history(m, context, command, entry, &held, join, now).map(Ok);
    }
    if m.index(IDX_ATENA, &command.atena_number)?.is_some() {
        return Ok(Err(conflict(
            "atena_number_taken",
            format!("atena number {} is another resident's", command.atena_number),
            format!("宛名番号 {} は別の住民に使われています", command.atena_number),
        )));
    }
    // The next id in this node's registration order (the handoff was addressed here).
    let resident_id = crate::store::resident_id(payload.to, m.next_counter(META_RESIDENT_SEQ)?);
    let record = received_record(payload, resident_id, command.atena_number.clone(), command.address.clone());
    m.create_resident(&record, now)?;
    index_history(m, payload, &record)?;
    let next = record.next_dose_number();
    if next <= 9 {
        let coupon = issue_next(m, &record, next, now)?;
        entry.coupon = Some(coupon.code.to_string());
        entry.qr_text = Some(SignedCoupon::sign(coupon.code, 0, &context.signing_key).to_qr_text());
    }
    finish_accept(m, entry, record.resident_id, &command.actor, now).map(Ok)
}

/// Indexes what a handoff brought: its doses by event id, and its coupons by their full
/// code and by the municipality that handed them here.
fn index_history(m: &Mutation<'_>, payload: &HandoffPayload, record: &ResidentRecord) -> anyhow::Result<()> {
    for dose in payload.record.doses.values() {
        m.set_index(IDX_EVENT, &dose.event_id, &record.resident_id)?;
    }
    let mut from = m.txn().open_table(IDX_HANDOFF_FROM)?;
    for coupon in payload.record.coupons.values() {
        let code = coupon.code.to_string();
        m.set_index(IDX_HANDOFF_COUPON, &code, &record.resident_id)?;
        from.insert((code.as_str(), payload.from.as_str()), record.resident_id.as_str())?;
    }
    Ok(())
}

/// Issues this municipality's coupon for dose `next` to `record`'s resident.
pub(crate) fn issue_next(
    m: &mut Mutation<'_>,
    record: &ResidentRecord,
    next: u8,
    now: OffsetDateTime,
) -> anyhow::Result<CouponEntry> {
    let serial = u32::try_from(m.next_counter(META_COUPON_SERIAL)?)?;
    let coupon = crate::issuance::new_coupon(record.municipality, next, serial, now)?;
    m.apply(
        &record.resident_id,
        &ResidentEvent::CouponIssued { entry: coupon.clone(), supersedes: None },
        now,
    )?;
    m.set_index(IDX_COUPON, coupon.code.number.as_str(), &record.resident_id)?;
    Ok(coupon)
}

/// Adds a handoff's history to `held`, a resident this node registered before the handoff
/// arrived, as [`protocol::handoff::join_history`] planned it (the history, doses given here
/// numbered again with it, this municipality's coupons for doses now given revoked), and
/// issues the next dose's coupon unless one is valid for it already.
fn join_history(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    command: &AcceptHandoff,
    mut entry: InEntry,
    held: &ResidentRecord,
    join: Join,
    now: OffsetDateTime,
) -> anyhow::Result<InEntry> {
    let id = &held.resident_id;
    for event in &join.events {
        m.apply(id, event, now)?;
    }
    index_history(m, &command.payload, held)?;
    if !join.renumbered.is_empty() {
        tracing::warn!(
            handoff = %command.payload.handoff_id,
            resident = %id,
            renumbered = ?join.renumbered,
            "doses recorded before the history arrived were numbered again"
        );
    }
    entry.renumbered = join.renumbered;
    let current = match join.current {
        Some(valid) => Some((valid.code, valid.generation)),
        None if join.next <= 9 => Some((issue_next(m, held, join.next, now)?.code, 0)),
        None => None,
    };
    if let Some((code, generation)) = current {
        entry.coupon = Some(code.to_string());
        entry.qr_text = Some(SignedCoupon::sign(code, generation, &context.signing_key).to_qr_text());
    }
    finish_accept(m, entry, id.clone(), &command.actor, now)
}

/// Marks the handoff accepted into `resident_id`, and a history request of the person
/// answered.
fn finish_accept(
    m: &Mutation<'_>,
    mut entry: InEntry,
    resident_id: String,
    actor: &str,
    now: OffsetDateTime,
) -> anyhow::Result<InEntry> {
    mark_accepted(m, &mut entry, resident_id, actor, now)?;
    let asks = m.txn().open_table(HANDOFF_ASKS)?;
    let ask = get_json::<AskEntry>(&asks, &entry.person_key)?;
    drop(asks);
    if let Some(mut ask) = ask {
        ask.state = AskLocal::Received;
        ask.handoff_id = Some(entry.handoff_id.clone());
        ask.updated_at = rfc3339(now);
        put_ask(m.txn(), &ask)?;
    }
    Ok(entry)
}

impl AskEntry {
    /// Not yet answered: sent with every sync.
    pub fn is_open(&self) -> bool {
        matches!(self.state, AskLocal::Asking | AskLocal::Waiting | AskLocal::Sent)
    }
}

/// The due table's key of a person's open ask.
fn ask_due_key(person_key: &str) -> String {
    format!("ask/{person_key}")
}

/// Writes `ask`, and keeps it in the due table while it is open, so that a sync finds the
/// open asks without reading every ask this node ever made.
pub(crate) fn put_ask(txn: &WriteTransaction, ask: &AskEntry) -> anyhow::Result<()> {
    put_json(txn, HANDOFF_ASKS, &ask.person_key, ask)?;
    let key = ask_due_key(&ask.person_key);
    let mut due = txn.open_table(HANDOFF_DUE)?;
    if ask.is_open() {
        due.insert(key.as_str(), DUE_ASK)?;
    } else {
        due.remove(key.as_str())?;
    }
    Ok(())
}

/// Notes in the due table the open asks of a store written before they were kept there;
/// once, when the store is opened.
pub(crate) fn note_open_asks(txn: &WriteTransaction) -> anyhow::Result<()> {
    let open: Vec<String> = {
        let asks = txn.open_table(HANDOFF_ASKS)?;
        let mut open = Vec::new();
        for row in asks.iter()? {
            let (key, bytes) = row?;
            let ask: AskEntry = serde_json::from_slice(bytes.value())
                .with_context(|| format!("ask {} is unreadable", key.value()))?;
            if ask.is_open() {
                open.push(ask_due_key(&ask.person_key));
            }
        }
        open
    };
    let mut due = txn.open_table(HANDOFF_DUE)?;
    for key in open {
        due.insert(key.as_str(), DUE_ASK)?;
    }
    Ok(())
}

/// Records an incoming handoff as accepted into `resident_id` and queues telling the ledger.
fn mark_accepted(
    m: &Mutation<'_>,
    entry: &mut InEntry,
    resident_id: String,
    actor: &str,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    entry.state = InState::Accepted;
    entry.accepted_at = Some(rfc3339(now));
    entry.resident_id = Some(resident_id);
    entry.accepted_by = Some(actor.to_owned());
    entry.updated_at = rfc3339(now);
    entry.error = None;
    entry.sealed = None;
    let due_key = format!("in/{:020}/{}", m.next_counter(META_HANDOFF_SEQ)?, entry.handoff_id);
    m.txn().open_table(HANDOFF_DUE)?.insert(due_key.as_str(), DUE_ACK)?;
    entry.due_key = Some(due_key);
    put_json(m.txn(), HANDOFF_IN, &entry.handoff_id, entry)
}

/// The municipal node's side of relocation.
pub struct HandoffService {
    /// The store (reads).
    pub store: Arc<Store>,
    /// The writer.
    pub writer: WriterHandle,
    /// This municipality.
    pub municipality: MunicipalityCode,
    /// Person keys and resident ids.
    pub person_secret: PersonKeySecret,
    /// This node's X25519 secret (opens what is sealed for it).
    pub encryption_secret: [u8; 32],
    /// Accept incoming handoffs without an admin.
    pub auto_accept: bool,
    directory: RwLock<Option<Arc<SignedDirectory>>>,
    /// Something is waiting to be sent: sync now rather than at the next poll.
    pub due: AtomicBool,
    /// Answers to history requests, sent with the next sync.
    answers: Mutex<Vec<AskAnswer>>,
    /// The due key of the open ask last sent ([`Self::build_sync`]).
    ask_cursor: Mutex<String>,
}

fn who_federation(asked_by: MunicipalityCode) -> Who {
    Who { actor: format!("federation:{asked_by}"), role: "federation".into(), request_id: new_id("req") }
}

fn who_sync() -> Who {
    Who { actor: "node:handoff".into(), role: "system".into(), request_id: new_id("req") }
}

impl HandoffService {
    /// A service; the directory comes from the p2p service (or `directory.json`).
    pub fn new(
        store: Arc<Store>,
        writer: WriterHandle,
        municipality: MunicipalityCode,
        person_secret: PersonKeySecret,
        encryption_secret: [u8; 32],
        auto_accept: bool,
        directory: Option<SignedDirectory>,
    ) -> Self {
        Self {
            store,
            writer,
            municipality,
            person_secret,
            encryption_secret,
            auto_accept,
            directory: RwLock::new(directory.map(Arc::new)),
            due: AtomicBool::new(true),
            answers: Mutex::new(Vec::new()),
            ask_cursor: Mutex::new(String::new()),
        }
    }

    /// Installs a newer directory.
    pub fn set_directory(&self, directory: Arc<SignedDirectory>) {
        if let Ok(mut held) = self.directory.write() {
            *held = Some(directory);
        }
    }

    fn directory(&self) -> Option<Arc<SignedDirectory>> {
        self.directory.read().ok().and_then(|d| d.clone())
    }

    /// The X25519 key of a municipality's node, from the directory.
    fn encryption_key_of(&self, to: MunicipalityCode) -> Result<[u8; 32], Problem> {
        let not_in = || {
            conflict(
                "receiver_not_in_federation",
                format!(
                    "{} ({to}) has no node with an encryption key in the federation directory",
                    municipality_name(to)
                ),
                format!("{}（{to}）は連携名簿に暗号鍵付きのノードがありません", municipality_name(to)),
            )
        };
        let directory = self.directory().ok_or_else(not_in)?;
        let entry = directory.directory.primary_of(to).ok_or_else(not_in)?;
        hex_decode(&entry.encryption_key).and_then(|k| <[u8; 32]>::try_from(k).ok()).ok_or_else(not_in)
    }

    fn coupon_key_of(&self, municipality: MunicipalityCode) -> Option<Vec<u8>> {
        let directory = self.directory()?;
        directory.directory.primary_of(municipality).and_then(|e| hex_decode(&e.coupon_key))
    }

    /// Moves a resident out to `to` (転出): seals their record for it.
    pub async fn move_out(
        &self,
        who: &Who,
        resident_id: &str,
        to: MunicipalityCode,
        reason: &str,
    ) -> Result<OutEntry, Problem> {
        if reason.trim().is_empty() || reason.chars().count() > 500 {
            return Err(Problem::bad_field(
                "reason",
                "a reason of 1–500 characters is required",
                "理由（1〜500文字）を入力してください",
            ));
        }
        if !to.is_known() {
            return Err(Problem::bad_field(
                "to",
                format!("{to} is not a municipality"),
                format!("{to} は市区町村ではありません"),
            ));
        }
        let recipient_key = self.encryption_key_of(to)?;
        let mut ephemeral = [0u8; 32];
        SystemRandom::new()
            .fill(&mut ephemeral)
            .map_err(|_| Problem::internal(&anyhow::anyhow!("no randomness")))?;
        let command = TransferOut {
            resident_id: resident_id.to_owned(),
            to,
            recipient_key,
            ephemeral,
            handoff_id: new_id("ho"),
            reason: reason.trim().to_owned(),
            actor: who.actor.clone(),
        };
        let entry = self.writer.call(who, |reply| Command::TransferOut(Box::new(command), reply)).await?;
        crash_point("handoff.sealed");
        self.due.store(true, Ordering::Release);
        Ok(entry)
    }

    /// Registers a newcomer (転入) and asks the federation for their history.
    #[allow(clippy::too_many_arguments)]
    pub async fn ask(
        &self,
        who: &Who,
        my_number: &str,
        birth_date: time::Date,
        atena_number: &str,
        address: &str,
        previous: Option<MunicipalityCode>,
    ) -> Result<AskEntry, Problem> {
        let person_key = self.person_secret.person_key(my_number).map_err(|_| {
            Problem::bad_field(
                "my_number",
                "not a valid 個人番号 (12 digits with check digit)",
                "個人番号が正しくありません（12桁・検査用数字）",
            )
        })?;
        if atena_number.is_empty()
            || atena_number.len() > 20
            || !atena_number.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(Problem::bad_field(
                "atena_number",
                "atena number must be 1–20 ASCII letters or digits",
                "宛名番号は1〜20桁の英数字です",
            ));
        }
        if address.trim().is_empty() || address.chars().count() > 200 {
            return Err(Problem::bad_field(
                "address",
                "an address of 1–200 characters is required",
                "住所（1〜200文字）を入力してください",
            ));
        }
        if previous == Some(self.municipality) {
            return Err(Problem::bad_field(
                "previous",
                "the previous municipality is this one",
                "前住所の市区町村がこの市区町村です",
            ));
        }
        let view = self.store.read().map_err(|e| Problem::internal(&e))?;
        if let Some(existing) = view.index(IDX_PERSON, &person_key).map_err(|e| Problem::internal(&e))?
            && let Some(record) = view.record(&existing).map_err(|e| Problem::internal(&e))?
            && record.transfer.is_none()
            && record.identity.status == ResidentStatus::Active
        {
            // Registered from the register extract (vaccinated here or not): their history may
            // be asked for, and will join that resident.
            if record.arrival.is_some() {
                return Err(conflict(
                    "already_registered",
                    format!("this person is already resident {existing} here"),
                    format!("この方は既に住民 {existing} として登録されています"),
                ));
            }
            if record.identity.atena_number != atena_number {
                return Err(Problem::bad_field(
                    "atena_number",
                    format!(
                        "this person is resident {existing} here, atena number {}",
                        record.identity.atena_number
                    ),
                    format!(
                        "この方は宛名番号 {} の住民 {existing} として登録済みです",
                        record.identity.atena_number
                    ),
                ));
            }
        }
        drop(view);
        let now = rfc3339(OffsetDateTime::now_utc());
        let ask = AskEntry {
            ask_id: new_id("ask"),
            birth_check: self.person_secret.birth_check(&person_key, birth_date),
            person_key: person_key.clone(),
            atena_number: atena_number.to_owned(),
            address: address.trim().to_owned(),
            previous,
            state: AskLocal::Asking,
            holder: None,
            handoff_id: None,
            actor: who.actor.clone(),
            asked_at: now.clone(),
            updated_at: now,
        };
        let value = self
            .writer
            .call(who, |reply| Command::Apply {
                action: "handoff.ask".into(),
                subject: format!("person:{person_key}"),
                op: Box::new(move |txn, _| {
                    let table = txn.open_table(HANDOFF_ASKS)?;
                    let held = get_json::<AskEntry>(&table, &ask.person_key)?;
                    drop(table);
                    match held {
                        // Still open: the same ask. Answered (found nobody, or the person
                        // arrived and has since left again): a new one.
                        Some(held) if held.is_open() => Ok(Ok(serde_json::to_value(held)?)),
                        _ => {
                            put_ask(txn, &ask)?;
                            Ok(Ok(serde_json::to_value(ask)?))
                        }
                    }
                }),
                reply,
            })
            .await?;
        self.due.store(true, Ordering::Release);
        serde_json::from_value(value).map_err(|e| Problem::internal(&e.into()))
    }

    /// Accepts a received handoff: creates the resident here with their whole history.
    pub async fn accept(
        &self,
        who: &Who,
        handoff_id: &str,
        atena_number: Option<String>,
        address: Option<String>,
    ) -> Result<InEntry, Problem> {
        let view = self.store.read().map_err(|e| Problem::internal(&e))?;
        let entry: InEntry = view
            .json(HANDOFF_IN, handoff_id)
            .map_err(|e| Problem::internal(&e))?
            .ok_or_else(|| Problem::not_found("handoff", "引き継ぎ", handoff_id))?;
        if entry.state == InState::Accepted {
            return Ok(entry);
        }
        if entry.state == InState::Returned {
            return Err(conflict(
                "handoff_returned",
                format!("the handoff was sent back to {}; it cannot be accepted", entry.from),
                format!(
                    "この引き継ぎは{}（{}）へ差し戻し済みのため受け入れできません",
                    municipality_name(entry.from),
                    entry.from
                ),
            ));
        }
        let ask: Option<AskEntry> =
            view.json(HANDOFF_ASKS, &entry.person_key).map_err(|e| Problem::internal(&e))?;
        drop(view);
        let Some(sealed) = entry.sealed.clone() else {
            return Err(Problem::internal(&anyhow::anyhow!("handoff {handoff_id} has no envelope")));
        };
        // A sender this node's directory does not list yet (a handoff fetched before the
        // directory, just after a start): not a failure; the ledger offers it again.
        let Some(key) = self.coupon_key_of(entry.from) else {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sender_not_in_directory_yet",
                None,
                format!("{} is not in this node's directory yet; the handoff waits", entry.from),
                format!("{} はまだこのノードの連携名簿にありません。引き継ぎは待機します", entry.from),
            ));
        };
        let opened = sealed.open(&key, &self.encryption_secret).map_err(|e| e.to_string());
        let payload = match opened {
            Ok(payload) => payload,
            Err(error) => {
                self.mark_failed(who, handoff_id, &error).await?;
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "handoff_unreadable",
                    None,
                    format!("the handoff cannot be opened: {error}"),
                    format!("引き継ぎデータを開けません: {error}"),
                ));
            }
        };
        let atena_number = atena_number
            .or_else(|| ask.as_ref().map(|a| a.atena_number.clone()))
            .unwrap_or_else(|| provisional_atena(handoff_id));
        let address = address.or_else(|| ask.as_ref().map(|a| a.address.clone()));
        let command = AcceptHandoff { payload, atena_number, address, actor: who.actor.clone() };
        let entry = match self
            .writer
            .call(who, |reply| Command::AcceptHandoff(Box::new(command), reply))
            .await
        {
            Ok(entry) => entry,
            Err(problem) => {
                if problem.status.is_client_error() {
                    // Kept for an admin, not retried by policy on every poll.
                    self.mark_failed(who, handoff_id, &format!("{}: {}", problem.code, problem.message_en))
                        .await?;
                }
                return Err(problem);
            }
        };
        crash_point("handoff.accepted");
        self.due.store(true, Ordering::Release);
        Ok(entry)
    }

    async fn mark_failed(&self, who: &Who, handoff_id: &str, error: &str) -> Result<(), Problem> {
        let id = handoff_id.to_owned();
        let error = error.to_owned();
        self.writer
            .call(who, |reply| Command::Apply {
                action: "handoff.refuse".into(),
                subject: format!("handoff:{id}"),
                op: Box::new(move |txn, now| {
                    let table = txn.open_table(HANDOFF_IN)?;
                    let held = get_json::<InEntry>(&table, &id)?;
                    drop(table);
                    if let Some(mut entry) =
                        held.filter(|e| matches!(e.state, InState::Received | InState::Failed))
                    {
                        entry.state = InState::Failed;
                        entry.error = Some(error);
                        entry.updated_at = rfc3339(now);
                        put_json(txn, HANDOFF_IN, &id, &entry)?;
                    }
                    Ok(Ok(serde_json::Value::Null))
                }),
                reply,
            })
            .await
            .map(|_| ())
    }

    /// Sends a received handoff back to its sender instead of accepting it. The reason's
    /// code goes to the sender through the national node; `note` stays here. Sending back
    /// again returns what was done; an accepted handoff cannot be sent back.
    pub async fn send_back(
        &self,
        who: &Who,
        handoff_id: &str,
        reason: ReturnReason,
        note: Option<String>,
    ) -> Result<InEntry, Problem> {
        let id = handoff_id.to_owned();
        let actor = who.actor.clone();
        let value = self
            .writer
            .call(who, |reply| Command::Apply {
                action: "handoff.return".into(),
                subject: format!("handoff:{handoff_id} reason:{}", reason.code()),
                op: Box::new(move |txn, now| {
                    let table = txn.open_table(HANDOFF_IN)?;
                    let held = get_json::<InEntry>(&table, &id)?;
                    drop(table);
                    let Some(mut entry) = held else {
                        return Ok(Err(Problem::not_found("handoff", "引き継ぎ", &id)));
                    };
                    match entry.state {
                        InState::Returned => return Ok(Ok(serde_json::to_value(&entry)?)),
                        InState::Accepted => {
                            return Ok(Err(conflict(
                                "handoff_accepted",
                                "the handoff was accepted already; it cannot be sent back".into(),
                                "この引き継ぎは受け入れ済みのため差し戻しできません".into(),
                            )));
                        }
                        InState::Received | InState::Failed => {}
                    }
                    entry.state = InState::Returned;
                    entry.returned = Some(reason);
                    entry.return_note = note.filter(|n| !n.trim().is_empty());
                    entry.returned_by = Some(actor);
                    entry.sealed = None;
                    entry.updated_at = rfc3339(now);
                    let due_key =
                        format!("in/{:020}/{}", crate::store::bump(txn, META_HANDOFF_SEQ)?, entry.handoff_id);
                    txn.open_table(HANDOFF_DUE)?.insert(due_key.as_str(), DUE_RETURN)?;
                    entry.due_key = Some(due_key);
                    put_json(txn, HANDOFF_IN, &id, &entry)?;
                    Ok(Ok(serde_json::to_value(&entry)?))
                }),
                reply,
            })
            .await?;
        crash_point("handoff.sent_back");
        self.due.store(true, Ordering::Release);
        serde_json::from_value(value).map_err(|e| Problem::internal(&e.into()))
    }

    /// What to send the national node now.
    pub fn build_sync(&self) -> anyhow::Result<HandoffSync> {
        let view = self.store.read()?;
        let mut sync = HandoffSync {
            deposits: Vec::new(),
            accepted: Vec::new(),
            watching: Vec::new(),
            asks: Vec::new(),
            answered: std::mem::take(&mut *self.answers.lock().map_err(|_| anyhow::anyhow!("poisoned"))?),
            returned: Vec::new(),
        };
        let due = view.txn().open_table(HANDOFF_DUE)?;
        let mut bytes = 0usize;
        for row in due.iter()? {
            let (key, state) = row?;
            let (key, state) = (key.value(), state.value());
            let id = key.rsplit('/').next().unwrap_or_default();
            if key.starts_with("out/") {
                if state == DUE_DEPOSIT
                    && sync.deposits.len() < MAX_HANDOFFS_PER_MESSAGE
                    && bytes < DEPOSIT_BUDGET
                {
                    let sealed = view.json::<OutEntry>(HANDOFF_OUT, id)?.and_then(|e| e.sealed);
                    bytes += sealed.as_ref().map_or(0, |s| s.ciphertext.len() + 512);
                    sync.deposits.extend(sealed);
                } else if state == DUE_WATCH && sync.watching.len() < 4 * MAX_HANDOFFS_PER_MESSAGE {
                    sync.watching.push(id.to_owned());
                }
            } else if key.starts_with("in/") && state == DUE_RETURN {
                if sync.returned.len() < 4 * MAX_HANDOFFS_PER_MESSAGE
                    && let Some(reason) = view.json::<InEntry>(HANDOFF_IN, id)?.and_then(|e| e.returned)
                {
                    sync.returned.push(ReturnedHandoff { handoff_id: id.to_owned(), reason });
                }
            } else if key.starts_with("in/") && sync.accepted.len() < 4 * MAX_HANDOFFS_PER_MESSAGE {
                sync.accepted.push(id.to_owned());
            }
        }
        // The open asks, taken in turn from after the last one sent, so that more than a
        // message's worth all reach the ledger even while some stay unanswered.
        let mut open: Vec<String> = Vec::new();
        for row in due.range("ask/".."ask0")? {
            open.push(row?.0.value().to_owned());
        }
        drop(due);
        let mut cursor = self.ask_cursor.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let start = open.partition_point(|key| key.as_str() <= cursor.as_str());
        let (before, after) = open.split_at(start);
        for key in after.iter().chain(before).take(MAX_HANDOFFS_PER_MESSAGE) {
            let person_key = key.trim_start_matches("ask/");
            let Some(ask) = view.json::<AskEntry>(HANDOFF_ASKS, person_key)?.filter(AskEntry::is_open) else {
                continue;
            };
            sync.asks.push(HistoryAsk {
                ask_id: ask.ask_id,
                person_key: ask.person_key,
                birth_check: ask.birth_check,
                previous: ask.previous,
            });
            cursor.clone_from(key);
        }
        Ok(sync)
    }

    /// Holds answers to requests for the next sync: new ones, or those of a sync that did
    /// not reach the ledger.
    pub fn hold_answers(&self, answers: Vec<AskAnswer>) {
        if let Ok(mut held) = self.answers.lock() {
            held.extend(answers);
        }
    }

    /// Applies the national node's answer to `sent`. Returns whether more work is waiting
    /// (sync again at once).
    pub async fn apply_response(
        &self,
        sent: &HandoffSync,
        response: HandoffResponse,
    ) -> anyhow::Result<bool> {
        let (deposits, inbound, states, asks, requests, returns) = match response {
            HandoffResponse::Synced { deposits, inbound, states, asks, requests, returns } => {
                (deposits, inbound, states, asks, requests, returns)
            }
            HandoffResponse::Refused { code, message } => {
                anyhow::bail!("the national node refused the handoff sync: {code}: {message}")
            }
        };
        let accepted_acked = sent.accepted.clone();
        let returned_acked: Vec<String> = sent.returned.iter().map(|r| r.handoff_id.clone()).collect();
        let settled = |outcome: &DepositOutcome| match outcome {
            DepositOutcome::Stored => true,
            DepositOutcome::Refused { code, .. } => !is_retryable(code),
        };
        // A deposit refused for the moment is sent again at the next poll, not at once.
        let busy = deposits.iter().any(|(_, o)| settled(o))
            || !requests.is_empty()
            || !accepted_acked.is_empty()
            || !returned_acked.is_empty();
        let completed: Vec<String> =
            states.iter().filter(|(_, s)| *s == LedgerState::Accepted).map(|(id, _)| id.clone()).collect();
        let busy = busy || !completed.is_empty();
        let completed_any = !completed.is_empty();
        let inbound_ids: Vec<String> = inbound.iter().map(|s| s.handoff_id.clone()).collect();
        // Write (and audit) only what changes something here. A deposit refused for good
        // gives the resident back below, one commit each.
        let (inbound, asks, deposits, refused) = {
            let view = self.store.read()?;
            let mut changed_deposits = Vec::new();
            let mut refused = Vec::new();
            for (id, outcome) in deposits {
                let entry = view.json::<OutEntry>(HANDOFF_OUT, &id)?;
                match &outcome {
                    DepositOutcome::Refused { code, message } if !is_retryable(code) => {
                        if entry.is_some_and(|e| e.state == OutState::Sealed) {
                            refused.push((id, format!("{code}: {message}")));
                        }
                    }
                    DepositOutcome::Refused { .. } if entry.is_some_and(|e| e.refusal.is_some()) => {}
                    _ => changed_deposits.push((id, outcome)),
                }
            }
            let mut new_inbound = Vec::new();
            for sealed in inbound {
                if view.json::<InEntry>(HANDOFF_IN, &sealed.handoff_id)?.is_none() {
                    new_inbound.push(sealed);
                }
            }
            let mut changed_asks = Vec::new();
            for (person_key, state) in asks {
                let Some(ask) = view.json::<AskEntry>(HANDOFF_ASKS, &person_key)? else { continue };
                let now = match &state {
                    AskState::Waiting { .. } => AskLocal::Waiting,
                    AskState::Sent { .. } => AskLocal::Sent,
                    AskState::NotFound => AskLocal::NotFound,
                };
                if ask.state != now && ask.is_open() {
                    changed_asks.push((person_key, state));
                }
            }
            (new_inbound, changed_asks, changed_deposits, refused)
        };
        let writes = !deposits.is_empty()
            || !completed.is_empty()
            || !accepted_acked.is_empty()
            || !returned_acked.is_empty()
            || !inbound.is_empty()
            || !asks.is_empty();
        let own = self.municipality;
        if writes {
            self.writer
                .call(&who_sync(), |reply| Command::Apply {
                    action: "handoff.sync".into(),
                    subject: format!("national:deposits={},received={}", deposits.len(), inbound.len()),
                    op: Box::new(move |txn, now| {
                        let at = rfc3339(now);
                        let mut due = txn.open_table(HANDOFF_DUE)?;
                        let mut out = txn.open_table(HANDOFF_OUT)?;
                        for (id, outcome) in &deposits {
                            if let Some(mut entry) = get_json::<OutEntry>(&out, id)?
                                && entry.state == OutState::Sealed
                            {
                                let due_key = entry.due_key.clone().unwrap_or_default();
                                match outcome {
                                    DepositOutcome::Stored => {
                                        entry.state = OutState::Deposited;
                                        entry.refusal = None;
                                        due.insert(due_key.as_str(), DUE_WATCH)?;
                                    }
                                    // Refusals that depend on the moment (another handoff of
                                    // the person not yet accepted, a directory not yet
                                    // updated): kept, shown, and sent again. (Refusals for
                                    // good were set aside above.)
                                    DepositOutcome::Refused { code, message } => {
                                        entry.refusal = Some(format!("{code}: {message}"));
                                    }
                                }
                                entry.updated_at = at.clone();
                                out.insert(id.as_str(), serde_json::to_vec(&entry)?.as_slice())?;
                            }
                        }
                        for id in &completed {
                            if let Some(mut entry) = get_json::<OutEntry>(&out, id)?
                                && entry.state != OutState::Completed
                            {
                                entry.state = OutState::Completed;
                                entry.sealed = None;
                                if let Some(key) = entry.due_key.take() {
                                    due.remove(key.as_str())?;
                                }
                                entry.updated_at = at.clone();
                                out.insert(id.as_str(), serde_json::to_vec(&entry)?.as_slice())?;
                            }
                        }
                        drop(out);
                        let mut incoming = txn.open_table(HANDOFF_IN)?;
                        for id in accepted_acked.iter().chain(&returned_acked) {
                            if let Some(mut entry) = get_json::<InEntry>(&incoming, id)?
                                && !entry.acked
                            {
                                entry.acked = true;
                                if let Some(key) = entry.due_key.take() {
                                    due.remove(key.as_str())?;
                                }
                                incoming.insert(id.as_str(), serde_json::to_vec(&entry)?.as_slice())?;
                            }
                        }
                        for sealed in inbound {
                            if sealed.to != own || incoming.get(sealed.handoff_id.as_str())?.is_some() {
                                continue;
                            }
                            let entry = InEntry {
                                handoff_id: sealed.handoff_id.clone(),
                                from: sealed.from,
                                person_key: sealed.person_key.clone(),
                                state: InState::Received,
                                received_at: at.clone(),
                                updated_at: at.clone(),
                                resident_id: None,
                                coupon: None,
                                qr_text: None,
                                accepted_by: None,
                                accepted_at: None,
                                acked: false,
                                error: None,
                                sealed: Some(sealed),
                                due_key: None,
                                renumbered: Vec::new(),
                                returned: None,
                                return_note: None,
                                returned_by: None,
                            };
                            incoming
                                .insert(entry.handoff_id.as_str(), serde_json::to_vec(&entry)?.as_slice())?;
                        }
                        drop((incoming, due));
                        for (person_key, state) in &asks {
                            let table = txn.open_table(HANDOFF_ASKS)?;
                            let Some(mut ask) = get_json::<AskEntry>(&table, person_key)? else { continue };
                            drop(table);
                            if !ask.is_open() {
                                continue;
                            }
                            match state {
                                AskState::Waiting { holder } => {
                                    ask.state = AskLocal::Waiting;
                                    ask.holder = Some(*holder);
                                }
                                AskState::Sent { handoff_id } => {
                                    ask.state = AskLocal::Sent;
                                    ask.handoff_id = Some(handoff_id.clone());
                                }
                                AskState::NotFound => ask.state = AskLocal::NotFound,
                            }
                            ask.updated_at = at.clone();
                            put_ask(txn, &ask)?;
                        }
                        Ok(Ok(serde_json::Value::Null))
                    }),
                    reply,
                })
                .await
                .map_err(|p| anyhow::anyhow!("{}: {}", p.code, p.message_en))?;
        }
        if !sent.deposits.is_empty() {
            crash_point("handoff.deposited");
        }
        if !inbound_ids.is_empty() {
            crash_point("handoff.received");
        }
        if !sent.accepted.is_empty() {
            crash_point("handoff.acked");
        }
        if !sent.returned.is_empty() {
            crash_point("handoff.return_acked");
        }
        if completed_any {
            crash_point("handoff.completed");
        }
        // Handoffs sent back: each resident is active here again, one commit each.
        let returned: Vec<(String, ReturnReason)> = {
            let view = self.store.read()?;
            let mut returned = Vec::new();
            for (id, reason) in returns {
                let waiting = view
                    .json::<OutEntry>(HANDOFF_OUT, &id)?
                    .is_some_and(|e| matches!(e.state, OutState::Sealed | OutState::Deposited));
                if waiting && states.iter().any(|(s, state)| *s == id && *state == LedgerState::Returned) {
                    returned.push((id, reason));
                }
            }
            returned
        };
        // Deposits the ledger refused for good never reach the receiver: the resident would
        // be nowhere (read-only here, unknown there), so they are active here again as for a
        // handoff sent back, and the refusal stays on the outgoing handoff for the admin. A
        // crash before that leaves the handoff sealed; the ledger refuses it again at the
        // next poll.
        let sent_back = returned.into_iter().map(|(handoff_id, reason)| TransferBack {
            handoff_id,
            reason,
            refusal: None,
        });
        let refused = refused.into_iter().map(|(handoff_id, refusal)| TransferBack {
            handoff_id,
            reason: ReturnReason::LedgerRefused,
            refusal: Some(refusal),
        });
        for command in sent_back.chain(refused) {
            let (handoff_id, reason, refusal) =
                (command.handoff_id.clone(), command.reason, command.refusal.clone());
            let entry = self
                .writer
                .call(&who_sync(), |reply| Command::TransferReturned(Box::new(command), reply))
                .await
                .map_err(|problem| {
                    anyhow::anyhow!(
                        "cannot take back handoff {handoff_id}: {}: {}",
                        problem.code,
                        problem.message_en
                    )
                })?;
            match refusal {
                None => {
                    tracing::warn!(
                        handoff = %handoff_id,
                        resident = %entry.resident_id,
                        reason = reason.code(),
                        "a handoff was sent back by its receiver; the resident is active here again"
                    );
                    crash_point("handoff.returned");
                }
                Some(refusal) => tracing::warn!(
                    handoff = %handoff_id,
                    resident = %entry.resident_id,
                    %refusal,
                    "the national node refused a handoff for good; the resident is active here again"
                ),
            }
        }
        if self.auto_accept {
            let who =
                Who { actor: "policy:auto-accept".into(), role: "system".into(), request_id: new_id("req") };
            let view = self.store.read()?;
            let mut waiting = Vec::new();
            for id in &inbound_ids {
                let Some(entry) = view.json::<InEntry>(HANDOFF_IN, id)? else { continue };
                if entry.state != InState::Received {
                    continue;
                }
                // A newcomer asked for here comes from whom the ledger or the 転出証明書
                // named; a handoff from anyone else waits for an admin.
                let expected = view
                    .json::<AskEntry>(HANDOFF_ASKS, &entry.person_key)?
                    .filter(|a| a.state != AskLocal::Received)
                    .and_then(|a| a.holder.or(a.previous));
                if expected.is_none_or(|from| from == entry.from) {
                    waiting.push(id.clone());
                }
            }
            drop(view);
            let inbound_ids = waiting;
            let accepts = inbound_ids.iter().map(|id| self.accept(&who, id, None, None));
            for (id, result) in inbound_ids.iter().zip(libp2p::futures::future::join_all(accepts).await) {
                match result {
                    // Tell the ledger at once.
                    Ok(_) => self.due.store(true, Ordering::Release),
                    Err(problem) => {
                        tracing::warn!(handoff = %id, code = %problem.code, "a received handoff was not accepted")
                    }
                }
            }
        }
        let answers =
            libp2p::futures::future::join_all(requests.iter().map(|r| self.answer_request(r))).await;
        self.hold_answers(answers);
        Ok(busy)
    }

    /// Deals with a newcomer request from another municipality: hands the person over if
    /// they are resident here.
    async fn answer_request(&self, request: &HistoryRequest) -> AskAnswer {
        let mut answer = AskAnswer {
            person_key: request.person_key.clone(),
            asked_by: request.asked_by,
            handoff_id: None,
        };
        let found = self.store.read().and_then(|view| {
            let Some(id) = view.index(IDX_PERSON, &request.person_key)? else { return Ok(None) };
            Ok(view.record(&id)?.map(|record| (id, record)))
        });
        match found {
            Ok(Some((_, record))) if record.transfer.is_some() => {
                answer.handoff_id =
                    record.transfer.filter(|t| t.to == request.asked_by).map(|t| t.handoff_id);
            }
            Ok(Some((_, record)))
                if self.person_secret.birth_check(&record.person_key, record.identity.birth_date)
                    != request.birth_check =>
            {
                tracing::warn!(asked_by = %request.asked_by, "a newcomer request's birth date does not match; not handed over");
            }
            Ok(Some((id, record))) if record.identity.status == ResidentStatus::Active => {
                let reason = format!("転入届（{}）による引き継ぎ", municipality_name(request.asked_by));
                match self.move_out(&who_federation(request.asked_by), &id, request.asked_by, &reason).await {
                    Ok(entry) => answer.handoff_id = Some(entry.handoff_id),
                    Err(problem) => {
                        tracing::warn!(code = %problem.code, "a history request was not answered")
                    }
                }
            }
            Ok(_) => {}
            Err(error) => tracing::error!(error = format!("{error:#}"), "cannot read for a history request"),
        }
        answer
    }
}

/// After a standby is promoted: what replication does not carry is rebuilt from the
/// documents. Coupons a handoff brought are indexed again, and a record transferred by the
/// old primary whose handoff is not in this node's outbox is sealed again under the same
/// handoff id (the ledger stores it once, whichever copy arrives). Returns (coupons
/// indexed, handoffs sealed again).
pub fn reconcile_after_promotion(
    files: &crate::config::NodeFiles,
    store: &Store,
) -> anyhow::Result<(u64, u64)> {
    let national_key = files.config.p2p.national_key.as_deref().and_then(protocol::person::hex_decode);
    let directory = match national_key {
        Some(key) => crate::p2p::load_directory(&files.dir.join("directory.json"), &key)?,
        None => None,
    };
    let (mut indexed, mut resealed) = (0u64, 0u64);
    let mut after: Option<String> = None;
    loop {
        let view = store.read()?;
        let ids = view.resident_ids(after.as_deref(), 1024)?;
        let Some(last) = ids.last().cloned() else { break };
        let txn = store.begin_write()?;
        for id in &ids {
            let Some(record) = view.record(id)? else { continue };
            if let Some(arrival) = &record.arrival {
                let mut index = txn.open_table(IDX_HANDOFF_COUPON)?;
                let mut from = txn.open_table(IDX_HANDOFF_FROM)?;
                for coupon in record.coupons.values().filter(|c| record.carried(c)) {
                    let code = coupon.code.to_string();
                    index.insert(code.as_str(), id.as_str())?;
                    from.insert((code.as_str(), arrival.from.as_str()), id.as_str())?;
                    indexed += 1;
                }
            }
            let Some(transfer) = &record.transfer else { continue };
            if txn.open_table(HANDOFF_OUT)?.get(transfer.handoff_id.as_str())?.is_some() {
                continue;
            }
            let key = directory
                .as_ref()
                .and_then(|d| d.directory.primary_of(transfer.to))
                .and_then(|e| hex_decode(&e.encryption_key))
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .with_context(|| format!("{} has no encryption key in the directory held", transfer.to))?;
            let mut ephemeral = [0u8; 32];
            SystemRandom::new().fill(&mut ephemeral).map_err(|_| anyhow::anyhow!("no randomness"))?;
            let payload = HandoffPayload {
                handoff_id: transfer.handoff_id.clone(),
                from: record.municipality,
                to: transfer.to,
                person_key: record.person_key.clone(),
                record: record.clone(),
                sealed_at: rfc3339(transfer.at),
            };
            let sealed = seal(&payload, &files.signing_key, &key, ephemeral)
                .map_err(|e| anyhow::anyhow!("cannot seal {}: {e}", transfer.handoff_id))?;
            let seq = crate::store::bump(&txn, META_HANDOFF_SEQ)?;
            let entry = OutEntry {
                handoff_id: transfer.handoff_id.clone(),
                resident_id: id.clone(),
                person_key: record.person_key.clone(),
                to: transfer.to,
                state: OutState::Sealed,
                reason: "予備系の昇格後に再封 / sealed again after promotion".into(),
                actor: transfer.actor.clone(),
                created_at: rfc3339(transfer.at),
                updated_at: rfc3339(OffsetDateTime::now_utc()),
                refusal: None,
                returned: None,
                sealed: Some(sealed),
                due_key: Some(format!("out/{seq:020}/{}", transfer.handoff_id)),
            };
            put_json(&txn, HANDOFF_OUT, &entry.handoff_id, &entry)?;
            if let Some(key) = &entry.due_key {
                txn.open_table(HANDOFF_DUE)?.insert(key.as_str(), DUE_DEPOSIT)?;
            }
            resealed += 1;
        }
        txn.commit()?;
        after = Some(last);
    }
    Ok((indexed, resealed))
}

/// The refusal of any change to a record handed to another municipality (kept read-only
/// for audit), or `None`.
pub fn read_only(record: &protocol::document::ResidentRecord) -> Option<Problem> {
    let transfer = record.transfer.as_ref()?;
    let name = municipality_name(transfer.to);
    Some(conflict(
        "resident_transferred",
        format!("the resident moved to {name} ({}); their record there is the one to change", transfer.to),
        format!("この住民は{name}（{}）へ転出し、記録は引き継ぎ済みです（この記録は閲覧のみ）", transfer.to),
    ))
}
