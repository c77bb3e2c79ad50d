//! The single writer: every change to the store goes through one thread, in group commits.
//!
//! HTTP handlers decode and authenticate what they can on their own (pure work, in
//! parallel), then send a [`Command`] over a bounded channel. The writer takes whatever is
//! queued (up to `group_commit_max`), applies each command in one redb write transaction,
//! commits once — one fsync for the whole group — and only then answers each caller. So a
//! capture is acknowledged only once it is durable, and concurrent captures share the disk's
//! flush. A command refused by validation writes nothing and does not disturb the others.
//!
//! Every command is audited in its own transaction: the writer appends the audit entry
//! (who, what, which record, how it ended) beside the work, so a write and its audit entry
//! commit together or not at all. Reads of personal data send [`Command::Audit`] and answer
//! only once that entry is durable.

use std::sync::Arc;

use anyhow::Context;
use automerge::ActorId;
use axum::http::StatusCode;
use protocol::catalogue::{Catalogue, Lot};
use protocol::coupon::{CouponNumber, SignedCoupon};
use protocol::document::{CouponEntry, CouponStatus, DoseEvent, ResidentEvent};
use protocol::statistics::Cell;
use protocol::validation::{
    AmendRequest, Amendment, CaptureContext, CaptureDecision, CaptureError, CaptureInput, ScannedCapture,
    VoidRequest, validate_amendment, validate_capture, void_plan,
};
use redb::WriteTransaction;
use ring::signature::Ed25519KeyPair;
use time::{Date, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEvent, AuditLog};

use crate::clock::{japan_today, new_id};
use crate::problem::Problem;
use crate::store::{DocCache, IDX_COUPON, IDX_EVENT, LoadedDoc, Mutation, Preloaded, Store, new_cache};
use protocol::document::ResidentRecord;

/// A capture as the writer receives it: scans decoded and authenticated already.
#[derive(Debug)]
pub struct CaptureCommand {
    /// The decoded scans.
    pub scans: ScannedCapture,
    /// Date of vaccination (today if the client sent none).
    pub vaccinated_on: Option<Date>,
    /// Venue id.
    pub venue: String,
    /// Client event id, if the client made one (terminals do; retries reuse it).
    pub event_id: Option<String>,
    /// Who.
    pub recorded_by: String,
    /// When a terminal stored it (the node's clock when absent).
    pub captured_at: Option<OffsetDateTime>,
    /// The lot as the venue's municipality registered it, for a capture forwarded from
    /// another municipality; used when this node has not registered the lot itself.
    pub forwarded_lot: Option<Lot>,
    /// The coupon is this municipality's (the one that issued it), carried here with the
    /// resident's record by a handoff; the municipality they came from forwarded the capture
    /// (its terminal had not learnt of the move, or it passed the dose on).
    pub transferred_from: Option<protocol::municipality::MunicipalityCode>,
    /// The resident's document, read ahead off the writer's thread ([`preload_capture`]).
    pub preloaded: Option<Box<Preloaded>>,
    /// The caller passes the dose on to the resident's new municipality if they moved away
    /// (a terminal's push, a forwarded capture): `coupon_transferred`, or for a carried
    /// coupon `resident_not_active` of a resident who moved on, is then not a refused capture
    /// and is not counted as one.
    pub passed_on_if_moved: bool,
}

impl WriterHandle {
    /// Reads ahead, on a blocking thread, the document a capture will change, and applies
    /// there the dose this node's checks would record on it ([`Preloaded::apply_ahead`]):
    /// the writer then checks again and only stores the change. A failure to read ahead is
    /// not the capture's: the writer then reads the document itself and reports what it
    /// finds.
    pub async fn read_ahead(
        &self,
        store: &Arc<Store>,
        mut capture: Box<CaptureCommand>,
    ) -> Result<Box<CaptureCommand>, Problem> {
        let store = store.clone();
        let rules = self.rules.clone();
        let read = tokio::task::spawn_blocking(move || {
            if let Err(error) = read_ahead(&store, &rules, &mut capture) {
                tracing::debug!(%error, "reading ahead for a capture failed; the writer reads instead");
            }
            capture
        });
        read.await.map_err(|error| Problem::internal(&anyhow::anyhow!("reading ahead stopped: {error}")))
    }
}

fn read_ahead(store: &Store, rules: &CaptureRules, capture: &mut CaptureCommand) -> anyhow::Result<()> {
    let code = *capture.scans.coupon.code();
    let (index, key) = match capture.transferred_from {
        Some(_) => (crate::store::IDX_HANDOFF_COUPON, code.to_string()),
        None => (IDX_COUPON, code.number.to_string()),
    };
    let view = store.read()?;
    // The document's tip first, when this node records doses: if the dose cannot be built
    // from it (a refusal, a replay, a tip another actor left), the writer needs the
    // document, and it is read after all.
    let mut tip_will_do = !rules.read_only;
    loop {
        let event_id = capture.event_id.as_deref();
        let Some(preloaded) = view.preload(index, &key, event_id, tip_will_do)? else {
            return Ok(());
        };
        let from_tip = preloaded.from_tip();
        match apply_ahead(&view, rules, capture, preloaded) {
            Ok(preloaded) if !from_tip || preloaded.applied().is_some() => {
                capture.preloaded = Some(Box::new(preloaded));
                return Ok(());
            }
            Err(error) if !from_tip => return Err(error),
            Ok(_) | Err(_) => tip_will_do = false,
        }
    }
}

/// Applies ahead the dose this node's checks would record for `capture` on the document
/// read ahead, if they would record one.
fn apply_ahead(
    view: &crate::store::ReadView,
    rules: &CaptureRules,
    capture: &CaptureCommand,
    preloaded: Preloaded,
) -> anyhow::Result<Preloaded> {
    if rules.read_only {
        return Ok(preloaded);
    }
    let now = OffsetDateTime::now_utc();
    let today = japan_today();
    let event_id = capture.event_id.clone().unwrap_or_else(|| new_id("ev"));
    let lot = view.lot(&capture.scans.vial.lot)?.or_else(|| capture.forwarded_lot.clone());
    let input = capture_input(capture, &event_id, today, now);
    let context = rules.context(today, lot.as_ref(), capture.transferred_from.is_some());
    match validate_capture(&input, preloaded.record(), &context) {
        Ok(CaptureDecision::Record(event))
            if protocol::validation::coupons_spent_by(preloaded.record(), &event).is_empty() =>
        {
            preloaded.apply_ahead(&rules.actor, ResidentEvent::DoseRecorded(event), now)
        }
        _ => Ok(preloaded),
    }
}

/// What a capture's checks need besides the store and the capture: shared by the writer
/// and the threads that read ahead for it.
struct CaptureRules {
    actor: ActorId,
    catalogue: Catalogue,
    campaign_start: Date,
    read_only: bool,
}

impl CaptureRules {
    fn context<'a>(&'a self, today: Date, lot: Option<&'a Lot>, transferred: bool) -> CaptureContext<'a> {
        capture_context(&self.catalogue, self.campaign_start, today, lot, transferred)
    }
}

fn capture_context<'a>(
    catalogue: &'a Catalogue,
    campaign_start: Date,
    today: Date,
    lot: Option<&'a Lot>,
    transferred: bool,
) -> CaptureContext<'a> {
    CaptureContext { today, campaign_start, catalogue, lot, accept_transferred: transferred }
}

/// The capture as validation sees it, `now` standing for a missing `captured_at`.
fn capture_input<'a>(
    capture: &'a CaptureCommand,
    event_id: &'a str,
    today: Date,
    now: OffsetDateTime,
) -> CaptureInput<'a> {
    CaptureInput {
        scans: &capture.scans,
        vaccinated_on: capture.vaccinated_on.unwrap_or(today),
        venue: &capture.venue,
        event_id,
        captured_at: capture.captured_at.unwrap_or(now),
        recorded_by: &capture.recorded_by,
    }
}

/// What a capture became.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureOutcome {
    /// True when this was a replay of an existing event (nothing written).
    pub replay: bool,
    /// The resident.
    pub resident_id: String,
    /// The dose event (the original, for a replay).
    pub event: DoseEvent,
}

/// What a reissue produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReissueOutcome {
    /// The new coupon generation.
    pub coupon: CouponEntry,
    /// The text for the new QR code.
    pub qr_text: String,
}

type Reply<T> = oneshot::Sender<Result<T, Problem>>;

/// Who asked for a command, for the audit log.
#[derive(Clone, Debug)]
pub struct Who {
    /// `user:NAME`, `token:NAME`, `cli:USER`.
    pub actor: String,
    /// Role name.
    pub role: String,
    /// Request id.
    pub request_id: String,
}

/// A small write done by the API outside the resident documents (users, tokens, sessions):
/// runs in the writer's transaction; `Ok(Err(problem))` refuses and must not have written.
pub type ApplyFn = Box<
    dyn FnOnce(&WriteTransaction, OffsetDateTime) -> anyhow::Result<Result<serde_json::Value, Problem>>
        + Send,
>;

/// A document received by replication, saved and read off the writer thread.
pub struct ReplicatedDoc {
    /// Resident id.
    pub id: String,
    /// Full save.
    pub saved: Vec<u8>,
    /// Its record (for the indexes).
    pub record: protocol::document::ResidentRecord,
}

/// Everything the writer does.
pub enum Command {
    /// Record a dose.
    Capture(Box<CaptureCommand>, Reply<CaptureOutcome>),
    /// Void a dose.
    Void {
        /// Resident.
        resident_id: String,
        /// Dose event.
        event_id: String,
        /// Why.
        reason: String,
        /// Who.
        actor: String,
        /// Answer.
        reply: Reply<protocol::document::Correction>,
    },
    /// Amend a dose.
    Amend {
        /// Resident.
        resident_id: String,
        /// Dose event.
        event_id: String,
        /// Changes.
        amendment: Box<Amendment>,
        /// Why.
        reason: String,
        /// Who.
        actor: String,
        /// Answer.
        reply: Reply<protocol::document::Correction>,
    },
    /// Reissue a coupon: same number, next generation; the old one is superseded.
    Reissue {
        /// 10-digit number.
        number: CouponNumber,
        /// Answer.
        reply: Reply<ReissueOutcome>,
    },
    /// Revoke a coupon.
    Revoke {
        /// 10-digit number.
        number: CouponNumber,
        /// Why.
        reason: String,
        /// Answer.
        reply: Reply<CouponEntry>,
    },
    /// Register or replace a lot.
    PutLot(Lot, Reply<Lot>),
    /// Run `op`, audited as `action` on `subject`.
    Apply {
        /// Audit action.
        action: String,
        /// Audit subject.
        subject: String,
        /// The write.
        op: ApplyFn,
        /// Answer.
        reply: Reply<serde_json::Value>,
    },
    /// Append audit entries (reads of personal data, refusals, logins).
    Audit(Vec<AuditEvent>, Reply<()>),
    /// Sign a checkpoint at the newest audit entry, if it has none.
    Checkpoint(Reply<Option<u64>>),
    /// Seal a resident's record for the municipality they moved to.
    TransferOut(Box<crate::handoff::TransferOut>, Reply<crate::handoff::OutEntry>),
    /// Create the resident a received handoff carries.
    AcceptHandoff(Box<crate::handoff::AcceptHandoff>, Reply<crate::handoff::InEntry>),
    /// Make active again the resident of a handoff its receiver sent back.
    TransferReturned(Box<crate::handoff::TransferBack>, Reply<crate::handoff::OutEntry>),
    /// Store a page pulled from a peer and the new checkpoint, together.
    Replicated {
        /// The page's documents.
        docs: Vec<ReplicatedDoc>,
        /// `meta` key of the checkpoint.
        checkpoint_key: String,
        /// The checkpoint.
        checkpoint: u64,
        /// Answer.
        reply: Reply<()>,
    },
}

/// What the writer needs besides the store.
pub struct WriterContext {
    /// Automerge actor of this node.
    pub actor: ActorId,
    /// Vaccine catalogue.
    pub catalogue: Catalogue,
    /// First day of the campaign.
    pub campaign_start: Date,
    /// Signs reissued coupons.
    pub signing_key: Ed25519KeyPair,
    /// Documents kept loaded.
    pub cache_documents: usize,
    /// Largest group commit.
    pub group_commit_max: usize,
    /// The audit log.
    pub audit: AuditLog,
    /// A standby: resident writes are refused until it is promoted.
    pub read_only: bool,
}

/// A handle to send commands to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    sender: mpsc::Sender<(Who, Command)>,
    rules: Arc<CaptureRules>,
}

impl WriterHandle {
    /// Sends a command and waits for its answer (after the durable commit).
    pub async fn call<T>(&self, who: &Who, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Problem> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((who.clone(), make(reply)))
            .await
            .map_err(|_| Problem::internal(&anyhow::anyhow!("the writer has stopped")))?;
        answer.await.map_err(|_| Problem::internal(&anyhow::anyhow!("the writer dropped a command")))?
    }
}

/// Starts the writer thread. It stops when every handle is dropped.
pub fn spawn_writer(
    store: Arc<Store>,
    context: WriterContext,
) -> (WriterHandle, std::thread::JoinHandle<()>) {
    // Bounded: when the disk falls behind, callers wait instead of memory growing.
    let (sender, receiver) = mpsc::channel(context.group_commit_max.max(1) * 4);
    let rules = Arc::new(CaptureRules {
        actor: context.actor.clone(),
        catalogue: context.catalogue.clone(),
        campaign_start: context.campaign_start,
        read_only: context.read_only,
    });
    let thread = std::thread::Builder::new()
        .name("vrs-writer".into())
        .spawn(move || run_writer(&store, &context, receiver))
        .unwrap_or_else(|e| panic!("cannot start the writer thread: {e}"));
    (WriterHandle { sender, rules }, thread)
}

/// An answer that is sent only once the group's commit is known.
type Pending = Box<dyn FnOnce(Result<(), Problem>) + Send>;

fn run_writer(store: &Store, context: &WriterContext, mut receiver: mpsc::Receiver<(Who, Command)>) {
    let mut cache = new_cache(context.cache_documents);
    // Documents that leave the cache are freed on a thread of their own: freeing one is a
    // few percent of a capture's time on the writer, which every capture waits for.
    let (retire, retired) = std::sync::mpsc::channel::<Vec<LoadedDoc>>();
    let dropper = std::thread::Builder::new()
        .name("vrs-retire".into())
        .spawn(move || retired.into_iter().for_each(drop))
        .unwrap_or_else(|e| panic!("cannot start the thread that frees documents: {e}"));
    while let Some(first) = receiver.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < context.group_commit_max {
            match receiver.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let out = run_group(store, context, &mut cache, batch);
        if !out.is_empty() {
            // Only fails if the thread is gone; the documents are then freed here.
            let _ = retire.send(out);
        }
    }
    drop(retire);
    let _ = dropper.join();
}

/// Runs one group of commands in one transaction; returns the documents that left the
/// cache, to be freed elsewhere.
fn run_group(
    store: &Store,
    context: &WriterContext,
    cache: &mut DocCache,
    batch: Vec<(Who, Command)>,
) -> Vec<LoadedDoc> {
    let n_commands = batch.len();
    let txn = match store.begin_write() {
        Ok(txn) => txn,
        Err(error) => {
            let problem = Problem::internal(&error);
            for (_, command) in batch {
                fail(command, problem.clone());
            }
            return Vec::new();
        }
    };
    let mut pending: Vec<Pending> = Vec::with_capacity(n_commands);
    let mut mutation = Mutation::new(&txn, cache, &context.actor);
    mutation.batch_counts();
    let mut broken: Option<anyhow::Error> = None;
    let mut rest = batch.into_iter();
    for (who, command) in rest.by_ref() {
        let now = OffsetDateTime::now_utc();
        match handle(&mut mutation, context, &who, command, now) {
            Ok((answer, facts)) => {
                pending.push(answer);
                for event in facts {
                    if let Err(error) = context.audit.append(mutation.txn(), &event, now) {
                        broken = Some(error.context("audit append failed"));
                        break;
                    }
                }
                if broken.is_some() {
                    break;
                }
            }
            Err((error, command)) => {
                // A command failed after it may have written: the whole group is abandoned.
                broken = Some(error);
                fail(command, Problem::internal(broken.as_ref().map_or(&anyhow::anyhow!("?"), |e| e)));
                break;
            }
        }
    }
    if broken.is_none()
        && let Err(error) = mutation.finish()
    {
        broken = Some(error.context("writing the counters or sweeping the change feed failed"));
    }
    let touched = mutation.touched().to_vec();
    let retired = mutation.take_retired();
    drop(mutation);
    let outcome = match broken {
        Some(error) => Err(error),
        None => txn.commit().context("durable commit failed"),
    };
    match outcome {
        Ok(()) => {
            tracing::debug!(n_commands, "group committed");
            for answer in pending {
                answer(Ok(()));
            }
        }
        Err(error) => {
            // What the cache holds for these documents never reached the disk.
            for id in &touched {
                cache.pop(id);
            }
            let problem = Problem::internal(&error);
            for answer in pending {
                answer(Err(problem.clone()));
            }
            for (_, command) in rest {
                fail(command, problem.clone());
            }
        }
    }
    retired
}

fn fail(command: Command, problem: Problem) {
    match command {
        Command::Capture(_, reply) => drop(reply.send(Err(problem))),
        Command::Void { reply, .. } | Command::Amend { reply, .. } => drop(reply.send(Err(problem))),
        Command::Reissue { reply, .. } => drop(reply.send(Err(problem))),
        Command::Revoke { reply, .. } => drop(reply.send(Err(problem))),
        Command::PutLot(_, reply) => drop(reply.send(Err(problem))),
        Command::Apply { reply, .. } => drop(reply.send(Err(problem))),
        Command::Audit(_, reply) => drop(reply.send(Err(problem))),
        Command::Checkpoint(reply) => drop(reply.send(Err(problem))),
        Command::Replicated { reply, .. } => drop(reply.send(Err(problem))),
        Command::TransferOut(_, reply) => drop(reply.send(Err(problem))),
        Command::AcceptHandoff(_, reply) => drop(reply.send(Err(problem))),
        Command::TransferReturned(_, reply) => drop(reply.send(Err(problem))),
    }
}

impl Command {
    /// Whether it changes resident documents or lots (refused on a standby).
    fn writes_residents(&self) -> bool {
        matches!(
            self,
            Command::Capture(..)
                | Command::Void { .. }
                | Command::Amend { .. }
                | Command::Reissue { .. }
                | Command::Revoke { .. }
                | Command::PutLot(..)
                | Command::TransferOut(..)
                | Command::AcceptHandoff(..)
                | Command::TransferReturned(..)
        )
    }

    fn action(&self) -> &'static str {
        match self {
            Command::Capture(..) => "capture",
            Command::Void { .. } => "dose.void",
            Command::Amend { .. } => "dose.amend",
            Command::Reissue { .. } => "coupon.reissue",
            Command::Revoke { .. } => "coupon.revoke",
            Command::PutLot(..) => "lot.put",
            Command::Apply { .. } => "apply",
            Command::Audit(..) => "audit",
            Command::Checkpoint(..) => "audit.checkpoint",
            Command::Replicated { .. } => "replication.pull",
            Command::TransferOut(..) => "handoff.export",
            Command::AcceptHandoff(..) => "handoff.import",
            Command::TransferReturned(..) => "handoff.returned",
        }
    }
}

fn audit_fact<T>(who: &Who, action: &str, subject: String, result: &Result<T, Problem>) -> AuditEvent {
    AuditEvent {
        actor: who.actor.clone(),
        role: who.role.clone(),
        action: action.to_owned(),
        subject,
        outcome: match result {
            Ok(_) => "ok".to_owned(),
            Err(problem) => format!("refused:{}", problem.code),
        },
        request_id: who.request_id.clone(),
    }
}

/// Turns a result into an answer sent after the commit. A refusal is answered right away
/// (at commit time, with the others) and wrote nothing.
fn answer_after_commit<T: Send + 'static>(reply: Reply<T>, result: Result<T, Problem>) -> Pending {
    Box::new(move |committed| {
        let message = match (result, committed) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(problem)) => Err(problem),
            (Err(refusal), _) => Err(refusal),
        };
        drop(reply.send(message));
    })
}

/// Runs one command. `Err` means an internal failure after a possible write: the group
/// must not commit; the command is handed back so its caller can be told. `Ok` carries the
/// answer to send after the commit and the audit entries to append beside the work.
fn handle(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    who: &Who,
    command: Command,
    now: OffsetDateTime,
) -> Result<(Pending, Vec<AuditEvent>), (anyhow::Error, Command)> {
    macro_rules! run {
        ($reply:ident, $body:expr, $rebuild:expr, $audit:expr) => {
            match $body {
                Ok(result) => {
                    let facts = $audit(&result);
                    Ok((answer_after_commit($reply, result), facts))
                }
                Err(error) => Err((error, $rebuild($reply))),
            }
        };
    }
    if context.read_only && command.writes_residents() {
        let refusal = Problem::new(
            StatusCode::CONFLICT,
            "standby_read_only",
            None,
            "this node is a standby replica; record on the primary, or promote this node",
            "この端末は予備系（複製）です。本番系で記録するか、昇格させてください",
        );
        let action = command.action();
        let fact = audit_fact::<()>(who, action, "node:standby".into(), &Err(refusal.clone()));
        fail(command, refusal);
        return Ok((Box::new(|_| {}), vec![fact]));
    }
    match command {
        Command::Capture(mut capture, reply) => {
            let mut result = capture_one(m, context, &mut capture, now);
            let passed_on = match &result {
                Ok(Err(problem)) if capture.passed_on_if_moved => match problem.code.as_str() {
                    "coupon_transferred" => Ok(true),
                    "resident_not_active" if capture.transferred_from.is_some() => {
                        moved_on(m, &capture.scans.coupon.code().to_string())
                    }
                    _ => Ok(false),
                },
                _ => Ok(false),
            };
            let passed_on = match passed_on {
                Ok(passed_on) => passed_on,
                Err(error) => {
                    result = Err(error);
                    false
                }
            };
            if let Ok(Err(problem)) = &result
                && !passed_on
            {
                let rejected = Cell::Rejected { date: japan_today(), reason: problem.code.clone() };
                if let Err(error) = m.count(&[(rejected, 1)]) {
                    result = Err(error);
                }
            }
            let coupon = format!("coupon:{}", capture.scans.coupon.code().number);
            let audit = |result: &Result<CaptureOutcome, Problem>| {
                let subject = match result {
                    Ok(outcome) => format!("resident:{}", outcome.resident_id),
                    Err(_) => coupon.clone(),
                };
                let mut fact = audit_fact(who, "capture", subject, result);
                if result.as_ref().is_ok_and(|o| o.replay) {
                    fact.outcome = "replay".into();
                }
                vec![fact]
            };
            run!(reply, result, |reply| Command::Capture(capture, reply), audit)
        }
        Command::Void { resident_id, event_id, reason, actor, reply } => {
            let result = void_one(m, context, &resident_id, &event_id, &reason, &actor, now);
            let subject = format!("resident:{resident_id} event:{event_id}");
            let audit =
                |result: &Result<_, Problem>| vec![audit_fact(who, "dose.void", subject.clone(), result)];
            run!(reply, result, |reply| Command::Void { resident_id, event_id, reason, actor, reply }, audit)
        }
        Command::Amend { resident_id, event_id, amendment, reason, actor, reply } => {
            let result = amend_one(m, context, &resident_id, &event_id, &amendment, &reason, &actor, now);
            let subject = format!("resident:{resident_id} event:{event_id}");
            let audit =
                |result: &Result<_, Problem>| vec![audit_fact(who, "dose.amend", subject.clone(), result)];
            run!(
                reply,
                result,
                |reply| Command::Amend { resident_id, event_id, amendment, reason, actor, reply },
                audit
            )
        }
        Command::Reissue { number, reply } => {
            let result = reissue_one(m, context, number, now);
            let audit = |result: &Result<_, Problem>| {
                vec![audit_fact(who, "coupon.reissue", format!("coupon:{number}"), result)]
            };
            run!(reply, result, |reply| Command::Reissue { number, reply }, audit)
        }
        Command::Revoke { number, reason, reply } => {
            let result = revoke_one(m, number, &reason, now);
            let audit = |result: &Result<_, Problem>| {
                vec![audit_fact(who, "coupon.revoke", format!("coupon:{number}"), result)]
            };
            run!(reply, result, |reply| Command::Revoke { number, reason, reply }, audit)
        }
        Command::PutLot(lot, reply) => {
            let result = m.put_lot(&lot).map(|()| Ok(lot.clone()));
            let subject = format!("lot:{}", lot.lot);
            let audit =
                |result: &Result<_, Problem>| vec![audit_fact(who, "lot.put", subject.clone(), result)];
            run!(reply, result, |reply| Command::PutLot(lot, reply), audit)
        }
        Command::Apply { action, subject, op, reply } => match op(m.txn(), now) {
            Ok(result) => {
                let fact = audit_fact(who, &action, subject, &result);
                Ok((answer_after_commit(reply, result), vec![fact]))
            }
            // The closure is spent; `fail` only needs the reply.
            Err(error) => Err((
                error,
                Command::Apply { action, subject, op: Box::new(|_, _| Ok(Ok(().into()))), reply },
            )),
        },
        Command::Audit(events, reply) => Ok((answer_after_commit(reply, Ok(())), events)),
        Command::Replicated { docs, checkpoint_key, checkpoint, reply } => {
            let result = (|| -> anyhow::Result<()> {
                m.put_replicated_page(docs.iter().map(|d| (d.id.as_str(), d.saved.as_slice(), &d.record)))?;
                m.set_counter(&checkpoint_key, checkpoint)
            })();
            match result {
                Ok(()) => {
                    let fact = AuditEvent {
                        actor: who.actor.clone(),
                        role: who.role.clone(),
                        action: "replication.pull".into(),
                        subject: format!("documents:{}", docs.len()),
                        outcome: format!("ok:checkpoint={checkpoint}"),
                        request_id: who.request_id.clone(),
                    };
                    Ok((answer_after_commit(reply, Ok(())), vec![fact]))
                }
                Err(error) => Err((error, Command::Replicated { docs, checkpoint_key, checkpoint, reply })),
            }
        }
        Command::TransferOut(transfer, reply) => {
            let result = crate::handoff::transfer_one(m, context, &transfer, now);
            let audit = |result: &Result<crate::handoff::OutEntry, Problem>| {
                let subject = format!(
                    "resident:{} handoff:{} to:{}",
                    transfer.resident_id, transfer.handoff_id, transfer.to
                );
                vec![audit_fact(who, "handoff.export", subject, result)]
            };
            run!(reply, result, |reply| Command::TransferOut(transfer, reply), audit)
        }
        Command::AcceptHandoff(accept, reply) => {
            let result = crate::handoff::accept_one(m, context, &accept, now);
            let audit = |result: &Result<crate::handoff::InEntry, Problem>| {
                let resident = result.as_ref().ok().and_then(|e| e.resident_id.as_deref()).unwrap_or("-");
                let subject = format!(
                    "resident:{resident} handoff:{} from:{}",
                    accept.payload.handoff_id, accept.payload.from
                );
                vec![audit_fact(who, "handoff.import", subject, result)]
            };
            run!(reply, result, |reply| Command::AcceptHandoff(accept, reply), audit)
        }
        Command::TransferReturned(back, reply) => {
            let result = crate::handoff::return_one(m, &back, now);
            let audit = |result: &Result<crate::handoff::OutEntry, Problem>| {
                let resident = result.as_ref().map_or("-", |e| e.resident_id.as_str());
                let subject =
                    format!("resident:{resident} handoff:{} reason:{}", back.handoff_id, back.reason.code());
                let action = match back.refusal {
                    Some(_) => "handoff.refused",
                    None => "handoff.returned",
                };
                vec![audit_fact(who, action, subject, result)]
            };
            run!(reply, result, |reply| Command::TransferReturned(back, reply), audit)
        }
        Command::Checkpoint(reply) => match context.audit.checkpoint(m.txn(), now) {
            Ok(seq) => Ok((answer_after_commit(reply, Ok(seq)), Vec::new())),
            Err(error) => Err((error, Command::Checkpoint(reply))),
        },
    }
}

/// Whether the resident a handoff brought here with the coupon `code` (18 digits) has moved
/// on to another municipality since.
fn moved_on(m: &mut Mutation<'_>, code: &str) -> anyhow::Result<bool> {
    let Some(resident_id) = m.index(crate::store::IDX_HANDOFF_COUPON, code)? else { return Ok(false) };
    Ok(m.record(&resident_id)?.is_some_and(|record| record.transfer.is_some()))
}

/// Outer `Err`: internal failure. Inner `Err`: refused, nothing written.
pub(crate) type Step<T> = anyhow::Result<Result<T, Problem>>;

fn capture_one(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    capture: &mut CaptureCommand,
    now: OffsetDateTime,
) -> Step<CaptureOutcome> {
    let code = *capture.scans.coupon.code();
    let number = code.number.to_string();
    let resident = match capture.transferred_from {
        Some(_) => m.index(crate::store::IDX_HANDOFF_COUPON, &code.to_string())?,
        None => m.index(IDX_COUPON, &number)?,
    };
    let Some(resident_id) = resident else {
        return Ok(Err(CaptureError::CouponNotIssued { number }.into()));
    };
    // The document read ahead, if it is this resident's and still current: with the dose
    // applied to it ahead, or taken into the cache as it was read.
    let mut base = None;
    if let Some(preloaded) = capture.preloaded.take().filter(|p| p.resident_id == resident_id) {
        if preloaded.applied().is_some() {
            base = m.still_current(&preloaded)?.then_some(Base::Ahead(preloaded));
        } else {
            base = m.adopt(*preloaded)?.map(|record| Base::Read(Box::new(record)));
        }
    }
    let base = match base {
        Some(base) => base,
        None => match m.record(&resident_id)? {
            Some(record) => Base::Read(Box::new(record)),
            None => anyhow::bail!("index names resident {resident_id}, which has no document"),
        },
    };
    // Checked as of the instant the dose was applied ahead, so that the same checks on the
    // same document decide the same event.
    let applied = match &base {
        Base::Ahead(preloaded) => preloaded.applied(),
        Base::Read(_) => None,
    };
    let now = applied.map_or(now, |(_, at)| at);
    let event_id = match (&capture.event_id, applied) {
        (Some(id), _) => id.clone(),
        (None, Some((ResidentEvent::DoseRecorded(event), _))) => event.event_id.clone(),
        (None, _) => new_id("ev"),
    };
    // An id this node made just now (random, with the time) cannot be in use; an id the
    // caller sent may be, by another resident.
    if capture.event_id.is_some()
        && let Some(owner) = m.index(IDX_EVENT, &event_id)?
        && owner != resident_id
    {
        return Ok(Err(CaptureError::EventIdReused { event_id }.into()));
    }
    let lot = m.lot(&capture.scans.vial.lot)?.or_else(|| capture.forwarded_lot.clone());
    let today = japan_today();
    let input = capture_input(capture, &event_id, today, now);
    let transferred = capture.transferred_from.is_some();
    let validation =
        capture_context(&context.catalogue, context.campaign_start, today, lot.as_ref(), transferred);
    match validate_capture(&input, base.record(), &validation) {
        Err(refusal) => Ok(Err(refusal.into())),
        Ok(CaptureDecision::Replay(event)) => Ok(Ok(CaptureOutcome { replay: true, resident_id, event })),
        Ok(CaptureDecision::Record(event)) => {
            // A dose passed on from a previous municipality makes the coupon issued here
            // for that dose useless: revoked, one commit each, in the same transaction.
            let spent = protocol::validation::coupons_spent_by(base.record(), &event);
            let recorded = ResidentEvent::DoseRecorded(event.clone());
            match base {
                Base::Ahead(preloaded) => {
                    // Stored as applied ahead only if it is the very change decided here.
                    if !(spent.is_empty() && m.store_ahead(*preloaded, &recorded)?) {
                        m.apply(&resident_id, &recorded, now)?;
                    }
                }
                Base::Read(before) => m.apply_after(&resident_id, &recorded, now, &before)?,
            }
            m.set_index(IDX_EVENT, &event.event_id, &resident_id)?;
            for spent in spent {
                m.apply(&resident_id, &spent, now)?;
            }
            Ok(Ok(CaptureOutcome { replay: false, resident_id, event }))
        }
    }
}

/// The document a capture is checked against.
enum Base {
    /// Read ahead, with the dose applied to it there.
    Ahead(Box<Preloaded>),
    /// Its record, the document being in the writer's cache.
    Read(Box<ResidentRecord>),
}

impl Base {
    fn record(&self) -> &ResidentRecord {
        match self {
            Base::Ahead(preloaded) => preloaded.record(),
            Base::Read(record) => record,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn void_one(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    resident_id: &str,
    event_id: &str,
    reason: &str,
    actor: &str,
    now: OffsetDateTime,
) -> Step<protocol::document::Correction> {
    let Some(record) = m.record(resident_id)? else {
        return Ok(Err(Problem::not_found("resident", "住民", resident_id)));
    };
    if let Some(refusal) = crate::handoff::read_only(&record) {
        return Ok(Err(refusal));
    }
    let correction_id = new_id("corr");
    let request = VoidRequest { event_id, reason, actor, correction_id: &correction_id, at: now };
    match void_plan(&record, &request) {
        Err(refusal) => Ok(Err(refusal.into())),
        Ok(events) => {
            let Some(ResidentEvent::DoseVoided { correction, .. }) = events.first() else {
                anyhow::bail!("a void plan starts with the void");
            };
            let correction = correction.clone();
            for (k, event) in events.iter().enumerate() {
                if k == 0 {
                    m.apply_after(resident_id, event, now, &record)?;
                } else {
                    m.apply(resident_id, event, now)?;
                }
            }
            // A void that reopened no coupon may leave the next dose without one (a dose
            // numbered again when a history joined): issue it now, as bulk issuance would.
            let after =
                m.record(resident_id)?.ok_or_else(|| anyhow::anyhow!("resident {resident_id} vanished"))?;
            let min_age = context.catalogue.min_eligible_age();
            if let Some(next) = protocol::validation::coupon_due(&after, japan_today(), min_age) {
                crate::handoff::issue_next(m, &after, next, now)?;
            }
            Ok(Ok(correction))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn amend_one(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    resident_id: &str,
    event_id: &str,
    amendment: &Amendment,
    reason: &str,
    actor: &str,
    now: OffsetDateTime,
) -> Step<protocol::document::Correction> {
    let Some(record) = m.record(resident_id)? else {
        return Ok(Err(Problem::not_found("resident", "住民", resident_id)));
    };
    if let Some(refusal) = crate::handoff::read_only(&record) {
        return Ok(Err(refusal));
    }
    let lot = match &amendment.vial {
        Some(vial) => m.lot(&vial.lot)?,
        None => None,
    };
    let correction_id = new_id("corr");
    let request = AmendRequest { event_id, amendment, reason, actor, correction_id: &correction_id, at: now };
    let validation = CaptureContext {
        today: japan_today(),
        campaign_start: context.campaign_start,
        catalogue: &context.catalogue,
        lot: lot.as_ref(),
        accept_transferred: false,
    };
    match validate_amendment(&record, &request, &validation) {
        Err(refusal) => Ok(Err(refusal.into())),
        Ok((amended, correction)) => {
            let event = ResidentEvent::DoseAmended { amended, correction: correction.clone() };
            m.apply_after(resident_id, &event, now, &record)?;
            Ok(Ok(correction))
        }
    }
}

fn coupon_refusal(code: &str, en: String, ja: String) -> Problem {
    Problem::new(StatusCode::CONFLICT, code, Some("coupon"), en, ja)
}

fn reissue_one(
    m: &mut Mutation<'_>,
    context: &WriterContext,
    number: CouponNumber,
    now: OffsetDateTime,
) -> Step<ReissueOutcome> {
    let Some(resident_id) = m.index(IDX_COUPON, number.as_str())? else {
        return Ok(Err(Problem::not_found("coupon", "接種券", number.as_str())));
    };
    let Some(record) = m.record(&resident_id)? else {
        anyhow::bail!("index names resident {resident_id}, which has no document");
    };
    if let Some(refusal) = crate::handoff::read_only(&record) {
        return Ok(Err(refusal));
    }
    let Some(newest) = record.coupon_generations(record.municipality, &number).last().copied().cloned()
    else {
        anyhow::bail!("resident {resident_id} has no generation of coupon {number}");
    };
    if newest.status == CouponStatus::Used {
        return Ok(Err(coupon_refusal(
            "coupon_already_used",
            format!("coupon {number} was used; a used coupon is not reissued"),
            format!("接種券 {number} は使用済みのため再発行できません"),
        )));
    }
    let Some(generation) = newest.generation.checked_add(1).filter(|g| *g <= 99) else {
        return Ok(Err(coupon_refusal(
            "too_many_generations",
            format!("coupon {number} has reached generation 99; issue a new coupon instead"),
            format!("接種券 {number} は再発行の上限（第99版）に達しています"),
        )));
    };
    let entry = CouponEntry {
        code: newest.code,
        generation,
        status: CouponStatus::Valid,
        issued_at: now,
        status_reason: None,
        used_by_event: None,
    };
    let supersedes = (newest.status == CouponStatus::Valid).then(|| newest.key());
    m.apply(&resident_id, &ResidentEvent::CouponIssued { entry: entry.clone(), supersedes }, now)?;
    let signed = SignedCoupon::sign(entry.code, generation, &context.signing_key);
    crate::store::put_printed(m.txn(), [(entry.key(), protocol::coupon::printed_digest(&signed))])?;
    Ok(Ok(ReissueOutcome { coupon: entry, qr_text: signed.to_qr_text() }))
}

fn revoke_one(
    m: &mut Mutation<'_>,
    number: CouponNumber,
    reason: &str,
    now: OffsetDateTime,
) -> Step<CouponEntry> {
    if reason.trim().is_empty() {
        return Ok(Err(CaptureError::ReasonMissing.into()));
    }
    let Some(resident_id) = m.index(IDX_COUPON, number.as_str())? else {
        return Ok(Err(Problem::not_found("coupon", "接種券", number.as_str())));
    };
    let Some(record) = m.record(&resident_id)? else {
        anyhow::bail!("index names resident {resident_id}, which has no document");
    };
    if let Some(refusal) = crate::handoff::read_only(&record) {
        return Ok(Err(refusal));
    }
    let Some(newest) = record.coupon_generations(record.municipality, &number).last().copied().cloned()
    else {
        anyhow::bail!("resident {resident_id} has no generation of coupon {number}");
    };
    if newest.status != CouponStatus::Valid {
        return Ok(Err(coupon_refusal(
            "coupon_not_valid",
            format!("coupon {number} is {:?}, only a valid coupon can be revoked", newest.status),
            format!("接種券 {number} は有効ではないため取り消せません"),
        )));
    }
    let event = ResidentEvent::CouponRevoked { key: newest.key(), reason: reason.trim().to_owned() };
    m.apply(&resident_id, &event, now)?;
    Ok(Ok(CouponEntry {
        status: CouponStatus::Revoked,
        status_reason: Some(reason.trim().to_owned()),
        ..newest
    }))
}
