//! The simulated federation: a national node, municipal primaries and standbys, venue
//! terminals, a network and disks, all advanced by one seeded event queue.
//!
//! What each node decides is decided by the `protocol` crate, as in `vrs-node`: capture
//! validation (`validate_capture`, `check_offline`, `void_plan`), the resident document
//! (`apply_event`, one Automerge commit per event), statistics (`event_delta`,
//! `record_cells`, `daily_from_cells`, signed reports), replication (`Puller`,
//! `answer_changes`, `answer_sync`) and relocation (`seal`, `open`, `received_record` and
//! the national ledger's `protocol::ledger`). What is the node's own glue — routing a
//! terminal's capture to its owner, the forward outbox, when to sync — is written again
//! here in the node's shape, small enough to read side by side with `node/src/terminals.rs`
//! and `node/src/handoff.rs`.
//!
//! Durability is modelled as the node has it: a primary or the national node collects what
//! arrives and handles it at its next group commit (2 ms later); only then does it answer.
//! A crash drops what was not committed and every exchange in flight, never a committed
//! write. A terminal stores a capture before telling the operator "recorded".

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use automerge::{ActorId, Automerge, ChangeHash};
use protocol::coupon::{CouponCode, CouponNumber, SignedCoupon};
use protocol::directory::{Directory, DirectoryEntry, NodeRole, SignedDirectory};
use protocol::document::{
    CouponEntry, CouponStatus, Identity, ResidentEvent, ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex,
    Transfer, apply_event, new_resident_document, read_record,
};
use protocol::gs1::Gtin;
use protocol::handoff::{
    AskAnswer, AskState, DepositOutcome, HandoffPayload, HandoffResponse, HandoffSync, HistoryAsk,
    HistoryRequest, Join, JoinRefusal, LedgerState, MAX_HANDOFFS_PER_MESSAGE, ReturnReason, ReturnedHandoff,
    SealedHandoff, holds_provisional_atena, join_history, provisional_atena,
};
use protocol::ledger::{AskRecord, LedgerEntry, LedgerRead, LedgerWrite, PersonHolder, is_retryable};
use protocol::municipality::{MunicipalityCode, all_municipalities};
use protocol::person::{PersonKeySecret, hex_decode, hex_lower};
use protocol::replication::{
    PageDocs, PullStep, Puller, ReplicationRequest, ReplicationResponse, SourceDocs, answer_changes,
    answer_sync,
};
use protocol::statistics::{Cell, SignedStatistics, Statistics, daily_from_cells, event_delta, record_cells};
use protocol::terminal::{
    BlockedCoupon, CaptureState, ForwardedCapture, MAX_CAPTURES_PER_REQUEST, TerminalBundle, TerminalCapture,
    check_offline_with,
};
use protocol::validation::{
    CaptureContext, CaptureDecision, CaptureInput, VoidRequest, authenticate_coupon_with, decode_scans,
    validate_capture, void_plan,
};
use ring::signature::{Ed25519KeyPair, KeyPair};
use time::{Date, Duration, OffsetDateTime};

use crate::Config;
use crate::rng::Rng;

/// Virtual milliseconds since the campaign day opened (09:00 JST).
pub type Time = u64;

/// The simulated day: 2021-06-01, the first day of mass vaccination at large venues.
pub const DAY: Date = time::macros::date!(2021 - 06 - 01);
const CAMPAIGN_START: Date = time::macros::date!(2021 - 02 - 17);
/// 09:00 JST on [`DAY`].
const OPENING: OffsetDateTime = time::macros::datetime!(2021-06-01 00:00 UTC);
const GTIN: &str = "04987000001014";
const PRODUCT: &str = "comirnaty-30";
/// A primary's group-commit window.
const COMMIT_MS: Time = 2;
/// A request not answered within this is given up and sent again.
const TIMEOUT_MS: Time = 2_000;
/// Share of move-outs drawn among people who moved in during the run (while there are any).
const MOVE_AGAIN: f64 = 0.3;
/// Share of first move-outs drawn among people whose dose a terminal still holds (while there
/// are any): vaccinated at a venue whose terminal is offline, they move before it reconnects.
const MOVE_HELD: f64 = 0.25;
/// Share of the other move-outs that are of someone vaccinated earlier in the day.
const MOVE_VACCINATED: f64 = 0.4;
/// Longest wait before the new municipality's register extract lists someone who moved
/// there (virtual ms). Two idle handoff polls: about half the extracts come before the
/// handoff is accepted, half after.
const EXTRACT_WITHIN: Time = 240_000;
/// Share of people the extract registers first, not vaccinated before they moved, whom the
/// bulk issuance gives a first-dose coupon before their history arrives.
const ISSUED_BEFORE_HISTORY: f64 = 0.5;
/// Share of those, vaccinated before they moved, who are given a dose at the new town hall
/// with that coupon before their history arrives (numbered 1 there, though it is not).
const VACCINATED_AGAIN: f64 = 0.5;
/// Longest time staff take to deal with a handoff that cannot join, or with one sent back
/// (virtual ms).
const STAFF_WITHIN: Time = 600_000;
/// Share of first moves the old municipality's staff do not hand over: only the new
/// municipality's register extract, which lists every newcomer with their move-in date and
/// previous municipality, asks the federation for their history (a 転入 request).
const ASKED: f64 = 0.25;
/// Who moves a resident out at their old municipality's desk.
const MOVE_OUT_ACTOR: &str = "user:sim-admin";

/// A node's address on the simulated network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Addr {
    /// The national node.
    National,
    /// A municipality's primary (index into the run's municipalities).
    Primary(u32),
    /// Its standby.
    Standby(u32),
    /// A venue terminal (index into the run's terminals).
    Terminal(u32),
}

impl Addr {
    /// Appends what `{:?}` prints (`Primary(3)`), without the formatting machinery.
    fn write_to(self, out: &mut String) {
        let (name, index) = match self {
            Addr::National => return out.push_str("National"),
            Addr::Primary(i) => ("Primary(", i),
            Addr::Standby(i) => ("Standby(", i),
            Addr::Terminal(i) => ("Terminal(", i),
        };
        out.push_str(name);
        out.push_str(itoa::Buffer::new().format(index));
        out.push(')');
    }
}

/// What travels: the protocol's own messages.
#[derive(Clone, Debug)]
pub enum Msg {
    /// Terminal → its primary. Requests and their answers carry a request id: an answer
    /// to an older request (late, or duplicated) changes nothing but what is idempotent.
    Push(u64, Vec<TerminalCapture>),
    /// Terminal → its primary: the bundle version held.
    Refresh(u64),
    /// Primary → terminal.
    Pushed(u64, Vec<(String, CaptureState)>),
    /// Primary → terminal: a newer bundle.
    Bundle(Rc<TerminalBundle>),
    /// Venue's primary → owner's primary.
    Forward(u64, Vec<ForwardedCapture>),
    /// Owner's primary → venue's primary.
    Forwarded(u64, Vec<(String, CaptureState)>),
    /// Standby → primary.
    Pull(u64, ReplicationRequest),
    /// Primary → standby.
    Pulled(u64, ReplicationResponse),
    /// Primary → standby: something changed (the standby pulls).
    Nudge,
    /// Primary → national.
    Report(u64, Box<SignedStatistics>),
    /// National → primary.
    Reported(u64, u64),
    /// Primary → national.
    Sync(u64, Box<HandoffSync>),
    /// National → primary.
    Synced(u64, Box<HandoffResponse>),
}

impl Msg {
    fn kind(&self) -> &'static str {
        match self {
            Msg::Push(..) => "push",
            Msg::Refresh(_) => "refresh",
            Msg::Pushed(..) => "pushed",
            Msg::Bundle(_) => "bundle",
            Msg::Forward(..) => "forward",
            Msg::Forwarded(..) => "forwarded",
            Msg::Pull(..) => "pull",
            Msg::Pulled(..) => "pulled",
            Msg::Nudge => "nudge",
            Msg::Report(..) => "report",
            Msg::Reported(..) => "reported",
            Msg::Sync(..) => "sync",
            Msg::Synced(..) => "synced",
        }
    }

    /// The bytes the node's CBOR codec would put on the wire, written into `buf` (cleared
    /// first, so one buffer serves every message).
    fn encode(&self, mut buf: Vec<u8>) -> Vec<u8> {
        buf.clear();
        let bytes = match self {
            Msg::Push(_, c) => cbor4ii::serde::to_vec(buf, c),
            Msg::Refresh(v) | Msg::Reported(_, v) => cbor4ii::serde::to_vec(buf, v),
            Msg::Pushed(_, s) | Msg::Forwarded(_, s) => cbor4ii::serde::to_vec(buf, s),
            Msg::Bundle(b) => cbor4ii::serde::to_vec(buf, &**b),
            Msg::Forward(_, f) => cbor4ii::serde::to_vec(buf, f),
            Msg::Pull(_, r) => cbor4ii::serde::to_vec(buf, r),
            Msg::Pulled(_, r) => cbor4ii::serde::to_vec(buf, r),
            Msg::Nudge => {
                buf.push(0);
                Ok(buf)
            }
            Msg::Report(_, r) => cbor4ii::serde::to_vec(buf, &**r),
            Msg::Sync(_, s) => cbor4ii::serde::to_vec(buf, &**s),
            Msg::Synced(_, s) => cbor4ii::serde::to_vec(buf, &**s),
        };
        bytes.expect("the protocol's messages encode")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Commit,
    Push,
    ForwardTick,
    Pull,
    PullSoon,
    Report,
    Handoff,
}

#[derive(Clone, Copy)]
enum Poll {
    Handoff,
    Bundle,
    Report,
}

#[derive(Debug)]
enum Event {
    Deliver { from: Addr, to: Addr, msg: Msg },
    Timer { node: Addr, timer: Timer, epoch: u64 },
    Dose,
    Relocation,
    Void { primary: u32, resident: String, event_id: String },
    Extract { to: u32, row: Box<ExtractRow> },
    SendBack { primary: u32, handoff_id: String },
    Resend { primary: u32, resident: String, to: u32 },
    AskAgain { primary: u32, person_key: String },
    Crash { node: Addr, down_ms: Time },
    Restart { node: Addr },
    Cut { primary: u32, until: Time },
    Offline { terminal: u32, until: Time },
    Heal,
}

/// A row of the new municipality's register extract (`Event::Extract`) naming someone who
/// moved in: their person key and the identity of the old municipality's record (the new one
/// gives the atena number and address).
#[derive(Clone, Debug)]
struct ExtractRow {
    person_key: String,
    identity: Identity,
    /// Whether the old municipality's record holds a dose (not one a terminal still holds).
    vaccinated: bool,
    /// The previous municipality (前住所市区町村コード): the import asks for the history of
    /// a newcomer it registers.
    previous: MunicipalityCode,
    /// Whether the old municipality's staff moved the person out (else only the ask brings
    /// the history).
    handed_over: bool,
}

/// A stored document: its saved bytes, uncompressed, as the node stores them, and its
/// heads when known without loading it (the checks compare heads of every document).
#[derive(Clone, Debug)]
struct Disk {
    bytes: Vec<u8>,
    heads: Option<Vec<ChangeHash>>,
}

impl Disk {
    fn of(doc: &mut Automerge) -> Self {
        let mut heads = doc.get_heads();
        heads.sort();
        Disk { bytes: doc.save_nocompress(), heads: Some(heads) }
    }

    /// Bytes that arrived whole.
    fn whole(bytes: Vec<u8>) -> Self {
        Disk { bytes, heads: None }
    }

    fn load(&self) -> Automerge {
        Automerge::load(&self.bytes).expect("the simulator stored this document itself")
    }

    /// Loaded to be changed by `actor` (a loaded document otherwise gets a random actor,
    /// and its changes would differ from one run to the next).
    fn load_as(&self, actor: &ActorId) -> Automerge {
        self.load().with_actor(actor.clone())
    }

    fn heads(&self) -> Vec<ChangeHash> {
        if let Some(heads) = &self.heads {
            return heads.clone();
        }
        let mut heads = self.load().get_heads();
        heads.sort();
        heads
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum OutState {
    Sealed,
    Deposited,
    Accepted,
    Refused(String),
    Returned,
}

struct OutHandoff {
    sealed: SealedHandoff,
    state: OutState,
}

/// `node/src/handoff.rs` `AskLocal`: where a newcomer's history request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AskLocal {
    Asking,
    Waiting,
    Sent,
    Received,
    NotFound,
}

/// A newcomer's history asked for (`node/src/handoff.rs` `AskEntry`).
pub(crate) struct Ask {
    ask_id: String,
    birth_check: String,
    previous: Option<MunicipalityCode>,
    pub(crate) state: AskLocal,
    holder: Option<MunicipalityCode>,
}

impl Ask {
    /// Not yet answered: sent with every sync.
    fn is_open(&self) -> bool {
        matches!(self.state, AskLocal::Asking | AskLocal::Waiting | AskLocal::Sent)
    }
}

/// A municipality's primary node.
pub(crate) struct Primary {
    code: MunicipalityCode,
    pop: u64,
    key: Ed25519KeyPair,
    x_secret: [u8; 32],
    actor: ActorId,
    up: bool,
    epoch: u64,
    cut_until: Time,
    // Durable.
    docs: BTreeMap<String, Disk>,
    by_number: BTreeMap<CouponNumber, String>,
    carried: BTreeMap<String, String>,
    /// (coupon, municipality that handed its resident here), for every arrival
    /// (`IDX_HANDOFF_FROM`).
    handed_here: BTreeSet<(String, MunicipalityCode)>,
    by_person: BTreeMap<String, String>,
    feed: BTreeMap<u64, String>,
    feed_of: BTreeMap<String, u64>,
    seq: u64,
    cells: BTreeMap<Cell, i64>,
    stats_version: u64,
    outbox: BTreeMap<String, (MunicipalityCode, ForwardedCapture)>,
    results: BTreeMap<String, CaptureState>,
    out: BTreeMap<String, OutHandoff>,
    accepted_unacked: BTreeSet<String>,
    /// The acceptances the sync in flight reports (volatile).
    accepted_sent: Vec<String>,
    /// Handoffs whose history could not join, waiting for staff to send them back.
    cannot_join: BTreeSet<String>,
    /// Handoffs sent back, the ledger not yet told.
    returning: BTreeMap<String, ReturnReason>,
    /// Every handoff sent back: never accepted here.
    sent_back: BTreeSet<String>,
    /// The returns the sync in flight reports (volatile).
    returned_sent: Vec<String>,
    /// Newcomers' histories asked for, by person key.
    pub(crate) asks: BTreeMap<String, Ask>,
    /// The last open ask sent (volatile): the next sync starts after it.
    ask_cursor: String,
    /// Answers to other municipalities' requests, for the next sync (volatile, as the
    /// node's: a lost one is asked again by the ledger).
    answers: Vec<AskAnswer>,
    next_serial: u32,
    next_handoff: u64,
    next_correction: u64,
    blocked: BTreeMap<String, BlockedCoupon>,
    bundle_version: u64,
    // Volatile.
    /// The current bundle: with the directory (made when a terminal first needs it) and
    /// without (for a terminal that holds it).
    bundle: Option<(Option<Rc<TerminalBundle>>, Rc<TerminalBundle>)>,
    pending: Vec<(Addr, Msg)>,
    commit_at: bool,
    forward_sent: BTreeMap<MunicipalityCode, (u64, Time)>,
    sync_sent: Option<(u64, Time)>,
    report_sent: Option<(u64, Time)>,
    acked_version: u64,
    /// Pending timers and when each fires (an earlier request moves it sooner).
    timers: BTreeMap<Timer, Time>,
    nudged: bool,
}

/// A standby replica.
pub(crate) struct Standby {
    up: bool,
    epoch: u64,
    docs: BTreeMap<String, Disk>,
    checkpoint: u64,
    puller: Option<Puller>,
    page: BTreeMap<String, Automerge>,
    whole: BTreeMap<String, Vec<u8>>,
    sent: Option<(u64, Time)>,
    /// Pending timers and when each fires (an earlier request moves it sooner).
    timers: BTreeMap<Timer, Time>,
    idle: Time,
}

/// One capture as the terminal holds it.
struct Held {
    capture: TerminalCapture,
    state: CaptureState,
}

/// A venue terminal.
pub(crate) struct Terminal {
    primary: u32,
    venue: String,
    up: bool,
    epoch: u64,
    offline_until: Time,
    bundle: Option<Rc<TerminalBundle>>,
    held: BTreeMap<String, Held>,
    open: BTreeSet<String>,
    next: u64,
    sent: Option<(u64, Time)>,
    /// Pending timers and when each fires (an earlier request moves it sooner).
    timers: BTreeMap<Timer, Time>,
}

/// The national ledger over maps, the same rules the national node runs over redb.
#[derive(Default)]
pub(crate) struct MemLedger {
    entries: BTreeMap<String, LedgerEntry>,
    persons: BTreeMap<String, PersonHolder>,
    asks: BTreeMap<(String, MunicipalityCode), AskRecord>,
    inbox: BTreeMap<(MunicipalityCode, u64), String>,
    requests: BTreeMap<(MunicipalityCode, String, MunicipalityCode), String>,
    seq: u64,
}

impl LedgerRead for MemLedger {
    type Error = std::convert::Infallible;

    fn entry(&self, id: &str) -> Result<Option<LedgerEntry>, Self::Error> {
        Ok(self.entries.get(id).cloned())
    }

    fn holder(&self, person_key: &str) -> Result<Option<PersonHolder>, Self::Error> {
        Ok(self.persons.get(person_key).cloned())
    }

    fn ask(&self, person_key: &str, asker: MunicipalityCode) -> Result<Option<AskRecord>, Self::Error> {
        Ok(self.asks.get(&(person_key.to_owned(), asker)).cloned())
    }

    fn inbox(&self, receiver: MunicipalityCode, limit: usize) -> Result<Vec<String>, Self::Error> {
        Ok(self
            .inbox
            .range((receiver, 0)..=(receiver, u64::MAX))
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect())
    }

    fn requests(
        &self,
        holder: MunicipalityCode,
        limit: usize,
    ) -> Result<Vec<protocol::handoff::HistoryRequest>, Self::Error> {
        Ok(self
            .requests
            .iter()
            .filter(|((h, ..), _)| *h == holder)
            .take(limit)
            .map(|((_, person_key, asked_by), check)| protocol::handoff::HistoryRequest {
                person_key: person_key.clone(),
                birth_check: check.clone(),
                asked_by: *asked_by,
            })
            .collect())
    }
}

impl LedgerWrite for MemLedger {
    fn put_entry(&mut self, entry: &LedgerEntry) -> Result<(), Self::Error> {
        self.entries.insert(entry.handoff_id.clone(), entry.clone());
        Ok(())
    }

    fn put_holder(&mut self, person_key: &str, holder: &PersonHolder) -> Result<(), Self::Error> {
        self.persons.insert(person_key.to_owned(), holder.clone());
        Ok(())
    }

    fn put_ask(
        &mut self,
        person_key: &str,
        asker: MunicipalityCode,
        ask: &AskRecord,
    ) -> Result<(), Self::Error> {
        self.asks.insert((person_key.to_owned(), asker), ask.clone());
        Ok(())
    }

    fn next_inbox_seq(&mut self) -> Result<u64, Self::Error> {
        self.seq += 1;
        Ok(self.seq)
    }

    fn inbox_insert(&mut self, receiver: MunicipalityCode, seq: u64, id: &str) -> Result<(), Self::Error> {
        self.inbox.insert((receiver, seq), id.to_owned());
        Ok(())
    }

    fn inbox_remove(&mut self, receiver: MunicipalityCode, seq: u64) -> Result<(), Self::Error> {
        self.inbox.remove(&(receiver, seq));
        Ok(())
    }

    fn put_request(
        &mut self,
        holder: MunicipalityCode,
        person_key: &str,
        asker: MunicipalityCode,
        birth_check: &str,
    ) -> Result<(), Self::Error> {
        self.requests.insert((holder, person_key.to_owned(), asker), birth_check.to_owned());
        Ok(())
    }

    fn remove_request(
        &mut self,
        holder: MunicipalityCode,
        person_key: &str,
        asker: MunicipalityCode,
    ) -> Result<(), Self::Error> {
        self.requests.remove(&(holder, person_key.to_owned(), asker));
        Ok(())
    }
}

/// The national node.
pub(crate) struct National {
    up: bool,
    epoch: u64,
    ledger: MemLedger,
    reports: BTreeMap<(MunicipalityCode, String), Statistics>,
    pending: Vec<(Addr, Msg)>,
    commit_at: bool,
    /// Fixture markers found in what it received (must stay empty).
    personal: Vec<String>,
}

/// What the run counted.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Captures a terminal stored and told the operator "recorded".
    pub acknowledged: u64,
    /// Scans a terminal refused on the spot.
    pub refused_at_terminal: u64,
    /// Captures given at a venue of another municipality.
    pub away: u64,
    /// Voids made by clerks.
    pub voids: u64,
    /// Coupons reissued.
    pub reissues: u64,
    /// Move-outs recorded.
    pub relocations: u64,
    /// Of those, move-outs of someone who had moved in during the run (a second move, to a
    /// third municipality or back to the first).
    pub moved_again: u64,
    /// Forwarded doses a municipality passed on again because the resident it had received
    /// had moved on.
    pub passed_on_again: u64,
    /// Handoffs accepted by the new municipality.
    pub accepted: u64,
    /// Of those, histories joined to a resident the register extract listed first.
    pub joined: u64,
    /// People the new municipality's register extract listed before their handoff arrived.
    pub registered_first: u64,
    /// Provisional atena numbers the register extract replaced after an acceptance.
    pub reregistered: u64,
    /// People vaccinated before they moved given a dose at the new town hall before their
    /// history arrived.
    pub vaccinated_again: u64,
    /// Doses numbered again when a history joined.
    pub renumbered: u64,
    /// Newcomers the extract registered with another birth date than their old record's.
    pub birth_dates_differ: u64,
    /// Newcomers' histories the new municipality's register extract asked for.
    pub asked: u64,
    /// Residents handed over on another municipality's request.
    pub handed_on_request: u64,
    /// Asks made again by staff after the previous municipality found no matching resident.
    pub asked_again: u64,
    /// Handoffs the new municipality sent back.
    pub sent_back: u64,
    /// Of those, handoffs the old municipality took back (the resident active there again).
    pub taken_back: u64,
    /// Voids after which later doses were numbered down.
    pub voids_renumbering: u64,
    /// Coupons issued for the next dose at a void that reopened none.
    pub issued_after_void: u64,
    /// Messages sent.
    pub messages: u64,
    /// Bytes sent (CBOR, as the node's codec encodes them).
    pub bytes: u64,
    /// Messages lost, duplicated by the faulty network.
    pub lost: u64,
    /// Duplicated messages.
    pub duplicated: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Partitions (municipality cut off) and venue outages injected.
    pub partitions: u64,
    /// Events processed.
    pub events: u64,
    /// Messages and bytes by kind.
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
}

/// Where someone who moved during the run started, to move them again.
struct FirstHome {
    /// (municipality, index) whose coupon they were first given.
    resident: (u32, u64),
    /// The capture of their dose a terminal still held when they moved: (terminal, event id).
    held: Option<(u32, String)>,
}

/// The whole simulated federation.
pub struct World {
    config: Config,
    rng: Rng,
    net_rng: Rng,
    now: Time,
    seq: u64,
    queue: BTreeMap<(Time, u64), Event>,
    pub(crate) codes: Vec<MunicipalityCode>,
    by_code: BTreeMap<MunicipalityCode, u32>,
    pub(crate) primaries: Vec<Primary>,
    pub(crate) standbys: Vec<Standby>,
    pub(crate) terminals: Vec<Terminal>,
    terminals_of: Vec<Vec<u32>>,
    pub(crate) national: National,
    national_key: Ed25519KeyPair,
    directory: SignedDirectory,
    /// The same, as bundles carry it.
    shared_directory: std::sync::Arc<SignedDirectory>,
    person_secret: PersonKeySecret,
    pop_cumulative: Vec<u64>,
    /// Next resident index to vaccinate, per municipality.
    next_resident: Vec<u64>,
    /// Residents who were moved out (municipality, index) → where to.
    pub(crate) moved: BTreeMap<(u32, u64), u32>,
    /// Residents who moved in during the run and may move again: (municipality, resident id,
    /// the (municipality, index) whose coupon they were first given).
    arrived: Vec<(u32, String, (u32, u64))>,
    /// Of those, people whose dose was still held at a terminal when they first moved:
    /// (municipality, resident id, terminal, event id).
    arrived_held: Vec<(u32, String, u32, String)>,
    /// Person key of each mover → where they started.
    first_home: BTreeMap<String, FirstHome>,
    /// Register extracts scheduled and not yet imported.
    extracts_pending: u64,
    /// Staff actions scheduled (`SendBack`, `Resend`) not yet done.
    staff_pending: u64,
    /// The birth date the new municipality's register holds, for people whose old record
    /// differs (`Config::birth_date_differs`): what the old municipality's staff correct it to.
    birth_fix: BTreeMap<String, Date>,
    /// The birth date the old municipality holds, for people handed over only on request
    /// whose row in the new register differs: what the new municipality's staff correct it
    /// to before asking again.
    ask_fix: BTreeMap<String, Date>,
    /// Handoffs that could not join the resident holding their person key (a violation).
    pub(crate) join_refusals: BTreeSet<String>,
    /// Doses recorded at a town hall's desk: event id → answer.
    desk: BTreeMap<String, CaptureState>,
    /// Coupon generation the person holds, when reissued.
    generation: BTreeMap<(u32, u64), u8>,
    /// Captures expected to be refused (scanned with a superseded coupon).
    pub(crate) expect_refused: BTreeSet<String>,
    skew: BTreeMap<Addr, i64>,
    pub(crate) healed_at: Option<Time>,
    pub(crate) settled_at: Option<Time>,
    pub(crate) counters: Counters,
    doses_per_day: f64,
    relocations_per_day: f64,
    next_request: u64,
    /// Encoded size of each bundle version (a bundle is sent to every terminal unchanged).
    bundle_bytes: BTreeMap<(MunicipalityCode, u64, bool), u64>,
    /// The buffer messages are encoded into to count their bytes.
    wire: Vec<u8>,
    digest: ring::digest::Context,
    /// The buffer `trace_delivery` writes its line into.
    trace_line: String,
    faults: bool,
    /// The helper building residents' pre-day state on the second core.
    prebuild: Option<crate::prebuild::Prebuild>,
    /// Coupon signatures the helper thread has checked.
    checked: crate::prebuild::CheckedSignatures,
}

pub(crate) fn key_from_seed(seed: [u8; 32]) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&seed).expect("32 bytes make an Ed25519 seed")
}

fn identity(index: u64, code: MunicipalityCode) -> Identity {
    let days = (index.wrapping_mul(2_654_435_761) % 23_000) as i64;
    Identity {
        atena_number: format!("SIM{index:010}"),
        name: format!("住民 {code}-{index}"),
        name_kana: "ジュウミン".to_owned(),
        birth_date: time::macros::date!(1940 - 01 - 01) + Duration::days(days),
        sex: if index.is_multiple_of(2) { Sex::Female } else { Sex::Male },
        address: format!("シミュ町{index}番地"),
        status: ResidentStatus::Active,
    }
}

/// The lot every venue of a municipality uses today.
fn lot_of(code: MunicipalityCode) -> protocol::catalogue::Lot {
    protocol::catalogue::Lot {
        lot: format!("L{code}"),
        gtin: Gtin::parse(GTIN).expect("a valid GTIN"),
        expiry: time::macros::date!(2021 - 12 - 31),
    }
}

fn vial_text(code: MunicipalityCode) -> String {
    format!("]d201{GTIN}17211231\u{1d}10L{code}")
}

fn catalogue() -> protocol::catalogue::Catalogue {
    protocol::catalogue::Catalogue {
        products: vec![protocol::catalogue::Product {
            gtin: Gtin::parse(GTIN).expect("a valid GTIN"),
            code: PRODUCT.to_owned(),
            name_ja: "コミナティ筋注".to_owned(),
            name_en: "Comirnaty".to_owned(),
            maker: "ファイザー".to_owned(),
            doses_in_series: 2,
            min_interval_days: vec![18, 90],
            min_age_years: 12,
        }],
    }
}

impl World {
    /// Builds the federation for `config`: keys, the signed directory, nodes, terminals.
    pub fn new(config: Config) -> Self {
        let mut rng = Rng::new(config.seed);
        let net_rng = rng.fork(1);
        let all = all_municipalities();
        let full = crate::population::full_populations();
        let chosen = crate::population::chosen(config.municipalities);
        let national_key = key_from_seed(rng.bytes32());
        let person_secret_bytes = rng.bytes32();
        let person_secret = PersonKeySecret::new(&person_secret_bytes);
        let mut primaries = Vec::new();
        let mut key_seeds = Vec::new();
        let mut entries = Vec::new();
        for &i in &chosen {
            let code = all[i].code;
            let pop = ((full[i] * config.scale).round() as u64).max(10);
            let key_seed = rng.bytes32();
            key_seeds.push(key_seed);
            let key = key_from_seed(key_seed);
            let x_secret = rng.bytes32();
            let x_public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(x_secret));
            entries.push(DirectoryEntry {
                municipality: Some(code),
                role: NodeRole::Municipal,
                peer_id: format!("sim-{code}"),
                addresses: Vec::new(),
                coupon_key: hex_lower(key.public_key().as_ref()),
                encryption_key: hex_lower(x_public.as_bytes()),
            });
            primaries.push(Primary {
                code,
                pop,
                key,
                x_secret,
                actor: ActorId::from(format!("{code}-primary").as_bytes()),
                up: true,
                epoch: 0,
                cut_until: 0,
                docs: BTreeMap::new(),
                by_number: BTreeMap::new(),
                carried: BTreeMap::new(),
                handed_here: BTreeSet::new(),
                by_person: BTreeMap::new(),
                feed: BTreeMap::new(),
                feed_of: BTreeMap::new(),
                seq: 0,
                cells: BTreeMap::new(),
                stats_version: 0,
                outbox: BTreeMap::new(),
                results: BTreeMap::new(),
                out: BTreeMap::new(),
                accepted_unacked: BTreeSet::new(),
                accepted_sent: Vec::new(),
                cannot_join: BTreeSet::new(),
                returning: BTreeMap::new(),
                sent_back: BTreeSet::new(),
                returned_sent: Vec::new(),
                asks: BTreeMap::new(),
                ask_cursor: String::new(),
                answers: Vec::new(),
                next_serial: u32::try_from(pop).unwrap_or(u32::MAX - 1_000_000) + 1,
                next_handoff: 0,
                next_correction: 0,
                blocked: BTreeMap::new(),
                bundle_version: 1,
                bundle: None,
                pending: Vec::new(),
                commit_at: false,
                forward_sent: BTreeMap::new(),
                sync_sent: None,
                report_sent: None,
                acked_version: 0,
                timers: BTreeMap::new(),
                nudged: false,
            });
        }
        entries.push(DirectoryEntry {
            municipality: None,
            role: NodeRole::National,
            peer_id: "sim-national".to_owned(),
            addresses: Vec::new(),
            coupon_key: String::new(),
            encryption_key: String::new(),
        });
        let directory = SignedDirectory::sign(
            Directory { version: 1, issued_at: "2021-06-01T00:00:00Z".to_owned(), entries },
            &national_key,
        );
        let codes: Vec<MunicipalityCode> = primaries.iter().map(|p| p.code).collect();
        let by_code = codes.iter().enumerate().map(|(i, c)| (*c, i as u32)).collect();
        let standbys = primaries
            .iter()
            .map(|_| Standby {
                up: true,
                epoch: 0,
                docs: BTreeMap::new(),
                checkpoint: 0,
                puller: None,
                page: BTreeMap::new(),
                whole: BTreeMap::new(),
                sent: None,
                timers: BTreeMap::new(),
                idle: 300_000,
            })
            .collect();
        // One terminal per 100,000 residents (at least one, at most eight) per municipality.
        let mut terminals = Vec::new();
        let mut terminals_of = Vec::new();
        for (p, primary) in primaries.iter().enumerate() {
            let n = (primary.pop as f64 / config.scale / 100_000.0).ceil().clamp(1.0, 8.0) as u32;
            let mut mine = Vec::new();
            for t in 0..n {
                mine.push(terminals.len() as u32);
                terminals.push(Terminal {
                    primary: p as u32,
                    venue: format!("venue-{t}"),
                    up: true,
                    epoch: 0,
                    offline_until: 0,
                    bundle: None,
                    held: BTreeMap::new(),
                    open: BTreeSet::new(),
                    next: 0,
                    sent: None,
                    timers: BTreeMap::new(),
                });
            }
            terminals_of.push(mine);
        }
        let mut cumulative = 0;
        let pop_cumulative = primaries
            .iter()
            .map(|p| {
                cumulative += p.pop;
                cumulative
            })
            .collect();
        let n = primaries.len();
        let mut skew = BTreeMap::new();
        if config.faults {
            for i in 0..n as u32 {
                skew.insert(Addr::Primary(i), rng.between(0, 4_000) as i64 - 2_000);
            }
            for t in 0..terminals.len() as u32 {
                skew.insert(Addr::Terminal(t), rng.between(0, 4_000) as i64 - 2_000);
            }
        }
        let faults = config.faults;
        let doses_per_day = config.doses_per_day();
        let relocations_per_day = config.relocations_per_day(cumulative);
        let prebuild = config.prebuild.then(|| {
            let plans = primaries
                .iter()
                .zip(key_seeds)
                .map(|(p, key_seed)| crate::prebuild::Plan {
                    code: p.code,
                    actor: p.actor.clone(),
                    key_seed,
                    population: p.pop,
                    expected: doses_per_day * p.pop as f64 / cumulative.max(1) as f64,
                })
                .collect();
            crate::prebuild::Prebuild::start(plans, person_secret_bytes)
        });
        World {
            prebuild,
            checked: Default::default(),
            next_request: 0,
            doses_per_day,
            relocations_per_day,
            config,
            rng,
            net_rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            codes,
            by_code,
            primaries,
            standbys,
            terminals,
            terminals_of,
            national: National {
                up: true,
                epoch: 0,
                ledger: MemLedger::default(),
                reports: BTreeMap::new(),
                pending: Vec::new(),
                commit_at: false,
                personal: Vec::new(),
            },
            national_key,
            shared_directory: std::sync::Arc::new(directory.clone()),
            directory,
            person_secret,
            pop_cumulative,
            next_resident: vec![0; n],
            moved: BTreeMap::new(),
            arrived: Vec::new(),
            arrived_held: Vec::new(),
            first_home: BTreeMap::new(),
            extracts_pending: 0,
            staff_pending: 0,
            birth_fix: BTreeMap::new(),
            ask_fix: BTreeMap::new(),
            join_refusals: BTreeSet::new(),
            desk: BTreeMap::new(),
            generation: BTreeMap::new(),
            expect_refused: BTreeSet::new(),
            skew,
            healed_at: None,
            settled_at: None,
            counters: Counters::default(),
            bundle_bytes: BTreeMap::new(),
            wire: Vec::new(),
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            trace_line: String::with_capacity(64),
            faults,
        }
    }

    /// The trace digest so far (hex).
    pub fn digest(&self) -> String {
        hex_lower(self.digest.clone().finish().as_ref())
    }

    /// Virtual now.
    pub fn now(&self) -> Time {
        self.now
    }

    /// How often an idle node polls. After healing, at the node's own pace (handoffs every
    /// 250 ms, a terminal's bundle every 2 s, statistics every minute); during the day less
    /// often, so that 1,741 idle municipalities do not drown the workload: a change is
    /// still acted on at once where the node acts on it at once (a sealed handoff, a
    /// capture to push or forward, a nudged standby).
    fn interval(&self, poll: Poll) -> Time {
        match (poll, self.healed_at.is_some()) {
            (Poll::Handoff, true) => 250,
            (Poll::Handoff, false) => 120_000,
            (Poll::Bundle, true) => 2_000,
            (Poll::Bundle, false) => 600_000,
            (Poll::Report, true) => 60_000,
            (Poll::Report, false) => 300_000,
        }
    }

    fn clock(&self, node: Addr) -> OffsetDateTime {
        let skew = self.skew.get(&node).copied().unwrap_or(0);
        OPENING + Duration::milliseconds(self.now as i64 + skew)
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn schedule(&mut self, at: Time, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    fn timer(&mut self, node: Addr, timer: Timer, after: Time) {
        let (epoch, timers) = match node {
            Addr::National => (self.national.epoch, None),
            Addr::Primary(i) => {
                (self.primaries[i as usize].epoch, Some(&mut self.primaries[i as usize].timers))
            }
            Addr::Standby(i) => {
                (self.standbys[i as usize].epoch, Some(&mut self.standbys[i as usize].timers))
            }
            Addr::Terminal(i) => {
                (self.terminals[i as usize].epoch, Some(&mut self.terminals[i as usize].timers))
            }
        };
        let at = self.now + after;
        if let Some(timers) = timers {
            if timers.get(&timer).is_some_and(|pending| *pending <= at) {
                return;
            }
            // The later event, if any, is recognised as stale when it fires.
            timers.insert(timer, at);
        }
        self.schedule(at, Event::Timer { node, timer, epoch });
    }

    fn is_up(&self, node: Addr) -> bool {
        match node {
            Addr::National => self.national.up,
            Addr::Primary(i) => self.primaries[i as usize].up,
            Addr::Standby(i) => self.standbys[i as usize].up,
            Addr::Terminal(i) => self.terminals[i as usize].up,
        }
    }

    /// Whether a link is open now (partitions cut a municipality's primary from everyone;
    /// a venue outage cuts one terminal).
    fn linked(&self, a: Addr, b: Addr) -> bool {
        let open = |n: Addr| match n {
            Addr::Primary(i) => self.primaries[i as usize].cut_until <= self.now,
            Addr::Terminal(i) => self.terminals[i as usize].offline_until <= self.now,
            _ => true,
        };
        open(a) && open(b)
    }

    /// Sends over the network. Across a partition nothing is sent (the connection fails)
    /// and nothing is counted; a message lost on the way was sent and is counted.
    fn send(&mut self, from: Addr, to: Addr, msg: Msg) {
        if !self.linked(from, to) {
            return;
        }
        self.counters.messages += 1;
        let before = self.counters.bytes;
        self.count_bytes(to, &msg);
        let kind = self.counters.by_kind.entry(msg.kind()).or_default();
        kind.0 += 1;
        kind.1 += self.counters.bytes - before;
        self.deliver_later(from, to, msg);
    }

    fn count_bytes(&mut self, to: Addr, msg: &Msg) {
        if let Msg::Bundle(bundle) = msg {
            let key = (bundle.municipality, bundle.version, bundle.directory_unchanged);
            let len = match self.bundle_bytes.get(&key) {
                Some(len) => *len,
                None => {
                    let len = msg.encode(Vec::new()).len() as u64;
                    self.bundle_bytes.insert(key, len);
                    len
                }
            };
            self.counters.bytes += len;
        } else {
            let bytes = msg.encode(std::mem::take(&mut self.wire));
            self.counters.bytes += bytes.len() as u64;
            if to == Addr::National {
                self.scan_for_personal_data(&bytes);
            }
            self.wire = bytes;
        }
    }

    fn deliver_later(&mut self, from: Addr, to: Addr, mut msg: Msg) {
        let copies = if self.faults && self.healed_at.is_none() {
            if self.net_rng.chance(self.config.loss) {
                self.counters.lost += 1;
                return;
            }
            if self.net_rng.chance(self.config.duplication) {
                self.counters.duplicated += 1;
                2
            } else {
                1
            }
        } else {
            1
        };
        for copy in 1..=copies {
            let delay = if self.faults && self.healed_at.is_none() {
                if self.net_rng.chance(0.01) {
                    self.net_rng.between(1_000, 5_000)
                } else {
                    self.net_rng.between(1, 200)
                }
            } else {
                self.net_rng.between(1, 20)
            };
            let msg = if copy == copies { std::mem::replace(&mut msg, Msg::Nudge) } else { msg.clone() };
            self.schedule(self.now + delay, Event::Deliver { from, to, msg });
        }
    }

    fn scan_for_personal_data(&mut self, bytes: &[u8]) {
        for marker in ["住民", "ジュウミン", "番地", "SIM0"] {
            if memchr::memmem::find(bytes, marker.as_bytes()).is_some() {
                self.national.personal.push(marker.to_owned());
            }
        }
    }

    /// Runs the campaign day with faults, heals, and runs until everything settles or the
    /// convergence budget is spent.
    pub fn run(&mut self) {
        let day = self.config.day_ms;
        if self.doses_per_day > 0.0 {
            let at = self.next_gap(self.doses_per_day);
            self.schedule(at, Event::Dose);
        }
        let relocations = self.relocations_per_day;
        if relocations > 0.0 {
            let at = self.next_gap(relocations);
            self.schedule(at, Event::Relocation);
        }
        if self.faults {
            self.plan_faults();
        }
        for i in 0..self.primaries.len() as u32 {
            self.timer(Addr::Primary(i), Timer::Handoff, 1_000 + u64::from(i % 1000));
            self.timer(Addr::Standby(i), Timer::Pull, 1_000 + u64::from(i % 1000));
        }
        // Terminals fetch their bundle before the venues open.
        for t in 0..self.terminals.len() as u32 {
            self.timer(Addr::Terminal(t), Timer::Push, u64::from(t % 1000));
        }
        self.schedule(day, Event::Heal);
        let budget = day + self.config.convergence_budget_ms;
        while let Some(((at, _), event)) = self.queue.pop_first() {
            if at > budget {
                break;
            }
            self.now = at;
            self.counters.events += 1;
            self.handle(event);
            if self.healed_at.is_some() && self.counters.events.is_multiple_of(512) && self.settled() {
                self.settled_at = Some(self.now);
                break;
            }
        }
        if self.settled_at.is_none() && self.settled() {
            self.settled_at = Some(self.now);
        }
    }

    fn pop_total(&self) -> u64 {
        self.pop_cumulative.last().copied().unwrap_or(0)
    }

    fn next_gap(&mut self, per_day: f64) -> Time {
        let mean = self.config.day_ms as f64 / per_day;
        self.rng.exponential(mean) as Time
    }

    fn plan_faults(&mut self) {
        let day = self.config.day_ms;
        let n = self.primaries.len() as u32;
        for i in 0..n {
            if self.rng.chance(0.10) {
                let at = self.rng.below(day);
                let len = self.rng.between(60_000, 1_800_000);
                self.schedule(at, Event::Cut { primary: i, until: at + len });
            }
            if self.rng.chance(0.05) {
                let at = self.rng.below(day);
                let down = self.rng.between(5_000, 120_000);
                self.schedule(at, Event::Crash { node: Addr::Primary(i), down_ms: down });
            }
            if self.rng.chance(0.05) {
                let at = self.rng.below(day);
                let down = self.rng.between(5_000, 120_000);
                self.schedule(at, Event::Crash { node: Addr::Standby(i), down_ms: down });
            }
        }
        for t in 0..self.terminals.len() as u32 {
            if self.rng.chance(0.20) {
                let at = self.rng.below(day);
                let len = self.rng.between(300_000, 3_600_000);
                self.schedule(at, Event::Offline { terminal: t, until: at + len });
            }
            if self.rng.chance(0.05) {
                let at = self.rng.below(day);
                let down_ms = self.rng.between(1_000, 60_000);
                self.schedule(at, Event::Crash { node: Addr::Terminal(t), down_ms });
            }
        }
        for _ in 0..2 {
            let at = self.rng.below(day);
            let down = self.rng.between(10_000, 60_000);
            self.schedule(at, Event::Crash { node: Addr::National, down_ms: down });
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, msg } => {
                if !self.is_up(to) || !self.linked(from, to) {
                    return;
                }
                self.trace_delivery(from, to, msg.kind());
                match to {
                    Addr::National => {
                        self.national.pending.push((from, msg));
                        if !self.national.commit_at {
                            self.national.commit_at = true;
                            let epoch = self.national.epoch;
                            self.schedule(
                                self.now + COMMIT_MS,
                                Event::Timer { node: Addr::National, timer: Timer::Commit, epoch },
                            );
                        }
                    }
                    Addr::Primary(i) => {
                        let p = &mut self.primaries[i as usize];
                        p.pending.push((from, msg));
                        if !p.commit_at {
                            p.commit_at = true;
                            self.timer(Addr::Primary(i), Timer::Commit, COMMIT_MS);
                        }
                    }
                    Addr::Standby(i) => self.standby_receive(i, msg),
                    Addr::Terminal(t) => self.terminal_receive(t, msg),
                }
            }
            Event::Timer { node, timer, epoch } => {
                match node {
                    Addr::National => {
                        if epoch == self.national.epoch && self.national.up {
                            self.national.commit_at = false;
                            self.national_commit();
                        }
                        return;
                    }
                    Addr::Primary(i) => {
                        let p = &mut self.primaries[i as usize];
                        if epoch != p.epoch || !p.up || p.timers.get(&timer) != Some(&self.now) {
                            return;
                        }
                        p.timers.remove(&timer);
                    }
                    Addr::Standby(i) => {
                        let s = &mut self.standbys[i as usize];
                        if epoch != s.epoch || !s.up || s.timers.get(&timer) != Some(&self.now) {
                            return;
                        }
                        s.timers.remove(&timer);
                    }
                    Addr::Terminal(t) => {
                        let term = &mut self.terminals[t as usize];
                        if epoch != term.epoch || !term.up || term.timers.get(&timer) != Some(&self.now) {
                            return;
                        }
                        term.timers.remove(&timer);
                    }
                }
                self.on_timer(node, timer);
            }
            Event::Dose => {
                self.dose();
                let gap = self.next_gap(self.doses_per_day);
                if self.now + gap < self.config.day_ms {
                    self.schedule(self.now + gap, Event::Dose);
                }
            }
            Event::Relocation => {
                self.relocation();
                let gap = self.next_gap(self.relocations_per_day);
                if self.now + gap < self.config.day_ms {
                    self.schedule(self.now + gap, Event::Relocation);
                }
            }
            Event::Void { primary, resident, event_id } => self.void(primary, &resident, &event_id),
            Event::Extract { to, row } => {
                if self.primaries[to as usize].up {
                    self.extracts_pending -= 1;
                    self.extract(to, *row);
                } else {
                    // The import runs on the node: once it is back.
                    self.schedule(self.now + 10_000, Event::Extract { to, row });
                }
            }
            Event::SendBack { primary, handoff_id } => {
                if self.primaries[primary as usize].up {
                    self.staff_pending -= 1;
                    self.send_back(primary, handoff_id);
                } else {
                    // Staff wait for the node to be back.
                    self.schedule(self.now + 60_000, Event::SendBack { primary, handoff_id });
                }
            }
            Event::Resend { primary, resident, to } => {
                if self.primaries[primary as usize].up {
                    self.staff_pending -= 1;
                    self.resend(primary, &resident, to);
                } else {
                    self.schedule(self.now + 60_000, Event::Resend { primary, resident, to });
                }
            }
            Event::AskAgain { primary, person_key } => {
                if self.primaries[primary as usize].up {
                    self.staff_pending -= 1;
                    self.ask_again(primary, &person_key);
                } else {
                    self.schedule(self.now + 60_000, Event::AskAgain { primary, person_key });
                }
            }
            Event::Crash { node, down_ms } => {
                if self.healed_at.is_none() && self.is_up(node) {
                    self.counters.crashes += 1;
                    self.crash(node);
                    self.schedule(self.now + down_ms, Event::Restart { node });
                }
            }
            Event::Restart { node } => self.restart(node),
            Event::Cut { primary, until } => {
                if self.healed_at.is_none() {
                    self.counters.partitions += 1;
                    self.primaries[primary as usize].cut_until = until;
                }
            }
            Event::Offline { terminal, until } => {
                if self.healed_at.is_none() {
                    self.counters.partitions += 1;
                    self.terminals[terminal as usize].offline_until = until;
                }
            }
            Event::Heal => {
                self.healed_at = Some(self.now);
                for p in &mut self.primaries {
                    p.cut_until = 0;
                }
                for t in &mut self.terminals {
                    t.offline_until = 0;
                }
                let down: Vec<Addr> = self.all_nodes().into_iter().filter(|n| !self.is_up(*n)).collect();
                for node in down {
                    self.restart(node);
                }
                // Everyone gets going at once, at the node's own pace from now on.
                for node in self.all_nodes() {
                    match node {
                        Addr::National => {}
                        Addr::Primary(i) => {
                            let p = &mut self.primaries[i as usize];
                            p.timers.clear();
                            p.epoch += 1;
                            p.commit_at = false;
                            self.timer(node, Timer::Commit, 1);
                            for timer in [Timer::Report, Timer::ForwardTick, Timer::Handoff] {
                                self.timer(node, timer, 1);
                            }
                        }
                        Addr::Standby(i) => {
                            self.standbys[i as usize].timers.clear();
                            self.standbys[i as usize].epoch += 1;
                            self.timer(node, Timer::Pull, 1);
                        }
                        Addr::Terminal(t) => {
                            self.terminals[t as usize].timers.clear();
                            self.terminals[t as usize].epoch += 1;
                            self.timer(node, Timer::Push, 1);
                        }
                    }
                }
            }
        }
    }

    /// The trace line of a delivered message, `"{now} {from:?}>{to:?} {kind}"`, written
    /// into one reused buffer: there are tens of millions of them in a peak-day run.
    fn trace_delivery(&mut self, from: Addr, to: Addr, kind: &str) {
        let mut line = std::mem::take(&mut self.trace_line);
        line.clear();
        line.push_str(itoa::Buffer::new().format(self.now));
        line.push(' ');
        from.write_to(&mut line);
        line.push('>');
        to.write_to(&mut line);
        line.push(' ');
        line.push_str(kind);
        self.trace(&line);
        self.trace_line = line;
    }

    fn trace(&mut self, line: &str) {
        self.digest.update(line.as_bytes());
        self.digest.update(b"\n");
        if self.config.trace {
            println!("{line}");
        }
    }

    fn all_nodes(&self) -> Vec<Addr> {
        let mut nodes = vec![Addr::National];
        for i in 0..self.primaries.len() as u32 {
            nodes.push(Addr::Primary(i));
            nodes.push(Addr::Standby(i));
        }
        nodes.extend((0..self.terminals.len() as u32).map(Addr::Terminal));
        nodes
    }

    fn crash(&mut self, node: Addr) {
        self.trace(&format!("{} crash {node:?}", self.now));
        match node {
            Addr::National => {
                let n = &mut self.national;
                n.up = false;
                n.epoch += 1;
                n.pending.clear();
                n.commit_at = false;
            }
            Addr::Primary(i) => {
                let p = &mut self.primaries[i as usize];
                p.up = false;
                p.epoch += 1;
                p.pending.clear();
                p.commit_at = false;
                p.bundle = None;
                p.forward_sent.clear();
                p.sync_sent = None;
                p.report_sent = None;
                p.acked_version = 0;
                p.timers.clear();
                p.nudged = false;
                p.ask_cursor.clear();
                p.answers.clear();
            }
            Addr::Standby(i) => {
                let s = &mut self.standbys[i as usize];
                s.up = false;
                s.epoch += 1;
                s.puller = None;
                s.page.clear();
                s.whole.clear();
                s.sent = None;
                s.timers.clear();
            }
            Addr::Terminal(t) => {
                let term = &mut self.terminals[t as usize];
                term.up = false;
                term.epoch += 1;
                term.sent = None;
                term.timers.clear();
            }
        }
    }

    fn restart(&mut self, node: Addr) {
        if self.is_up(node) {
            return;
        }
        self.trace(&format!("{} restart {node:?}", self.now));
        match node {
            Addr::National => self.national.up = true,
            Addr::Primary(i) => {
                self.primaries[i as usize].up = true;
                self.timer(node, Timer::Handoff, 10);
                self.timer(node, Timer::ForwardTick, 10);
                self.timer(node, Timer::Report, 10);
            }
            Addr::Standby(i) => {
                self.standbys[i as usize].up = true;
                self.timer(node, Timer::Pull, 10);
            }
            Addr::Terminal(t) => {
                self.terminals[t as usize].up = true;
                self.timer(node, Timer::Push, 10);
            }
        }
    }

    fn on_timer(&mut self, node: Addr, timer: Timer) {
        match (node, timer) {
            (Addr::Primary(i), Timer::Commit) => {
                self.primaries[i as usize].commit_at = false;
                self.primary_commit(i);
            }
            (Addr::Primary(i), Timer::ForwardTick) => self.forward_tick(i),
            (Addr::Primary(i), Timer::Report) => self.report_tick(i),
            (Addr::Primary(i), Timer::Handoff) => self.handoff_tick(i),
            (Addr::Standby(i), Timer::Pull) => self.pull_tick(i, true),
            (Addr::Standby(i), Timer::PullSoon) => self.pull_tick(i, false),
            (Addr::Terminal(t), Timer::Push) => self.push_tick(t),
            _ => {}
        }
    }

    // ---- Workload -------------------------------------------------------------------

    fn pick_municipality(&mut self) -> u32 {
        let total = self.pop_total();
        let x = self.rng.below(total.max(1));
        self.pop_cumulative.partition_point(|c| *c <= x) as u32
    }

    /// One person arrives at a venue with their coupon.
    fn dose(&mut self) {
        let home = self.pick_municipality();
        let index = self.next_resident[home as usize];
        if index >= self.primaries[home as usize].pop {
            return;
        }
        self.next_resident[home as usize] += 1;
        let code = self.codes[home as usize];
        let mut generation = self.generation.get(&(home, index)).copied().unwrap_or(0);
        let mut stale = false;
        // Some people lost their coupon and were sent a new one this morning; a few bring
        // the old one anyway.
        if self.rng.chance(self.config.reissue_rate)
            && self.primaries[home as usize].up
            && self.reissue(home, index)
        {
            generation += 1;
            self.generation.insert((home, index), generation);
            stale = self.rng.chance(0.2);
        }
        let away = self.primaries.len() > 1 && self.rng.chance(self.config.away);
        let venue_primary = if away { self.other_than(home) } else { home };
        let terminals = &self.terminals_of[venue_primary as usize];
        let t = terminals[self.rng.below(terminals.len() as u64) as usize];
        let coupon = coupon_of(code, index);
        let scanned_generation = if stale { generation - 1 } else { generation };
        let ready = self.prebuild.as_ref().and_then(|b| b.draw(home, index));
        let qr = match ready {
            Some(printed) if scanned_generation == 0 => {
                self.checked.remember(&printed);
                printed.qr
            }
            _ => SignedCoupon::sign(coupon, scanned_generation, &self.primaries[home as usize].key)
                .to_qr_text(),
        };
        if away {
            self.counters.away += 1;
        }
        self.scan(t, qr, stale);
    }

    /// A terminal scans a coupon and a vial.
    fn scan(&mut self, t: u32, qr: String, stale: bool) {
        let node = Addr::Terminal(t);
        if !self.is_up(node) {
            return;
        }
        let captured_at = self.clock(node);
        let term = &self.terminals[t as usize];
        let venue_code = self.codes[term.primary as usize];
        let vial = vial_text(venue_code);
        let Some(bundle) = term.bundle.clone() else {
            // Not yet given a bundle: the terminal cannot check anything and asks first.
            self.timer(node, Timer::Push, 1);
            return;
        };
        let scans = match decode_scans(&qr, &vial) {
            Ok(scans) => scans,
            Err(_) => {
                self.counters.refused_at_terminal += 1;
                return;
            }
        };
        if check_offline_with(&scans, DAY, DAY, &bundle, &self.checked).is_err() {
            self.counters.refused_at_terminal += 1;
            return;
        }
        let term = &mut self.terminals[t as usize];
        term.next += 1;
        let event_id = format!("ev-{venue_code}-{}-{}", term.venue, term.next);
        let capture = TerminalCapture {
            event_id: event_id.clone(),
            coupon: qr,
            vial,
            vaccinated_on: DAY,
            captured_at,
            venue: term.venue.clone(),
            venue_municipality: venue_code,
            recorded_by: "token:sim".to_owned(),
        };
        term.held.insert(event_id.clone(), Held { capture, state: CaptureState::Pending });
        term.open.insert(event_id.clone());
        self.counters.acknowledged += 1;
        if stale {
            self.expect_refused.insert(event_id);
        }
        self.timer(node, Timer::Push, 50);
    }

    /// A clerk reissues a person's coupon (the person says they lost it). Applied at once
    /// at the owner, as through its API; false if the owner cannot.
    fn reissue(&mut self, home: u32, index: u64) -> bool {
        let now = self.clock(Addr::Primary(home));
        let p = &mut self.primaries[home as usize];
        let (rid, mut doc, record) =
            open_resident(p, home, index, &self.person_secret, self.prebuild.as_ref(), now);
        if record.transfer.is_some() {
            return false;
        }
        let number = CouponNumber::from_serial(index as u32 + 1).expect("serials fit");
        let Some(newest) = record.coupon_generations(p.code, &number).last().copied().cloned() else {
            return false;
        };
        if newest.status != CouponStatus::Valid {
            return false;
        }
        let entry = CouponEntry { generation: newest.generation + 1, issued_at: now, ..newest.clone() };
        let event = ResidentEvent::CouponIssued { entry: entry.clone(), supersedes: Some(newest.key()) };
        apply(p, &rid, &mut doc, &record, &event, now);
        self.counters.reissues += 1;
        self.nudge(home);
        true
    }

    /// A resident moves out: an admin of the old municipality records it. Some movers are
    /// people who moved in earlier in the run and now move on, to a third municipality or
    /// back to the first: a dose captured against their first coupon is then passed on twice.
    fn relocation(&mut self) {
        if self.primaries.len() < 2 {
            return;
        }
        if self.rng.chance(MOVE_AGAIN)
            && let Some((from, rid)) = self.pick_arrival()
        {
            if !self.primaries[from as usize].up {
                return;
            }
            let p = &self.primaries[from as usize];
            let doc = p.docs[&rid].load_as(&p.actor);
            let back = read_record(&doc).ok().and_then(|r| r.arrival).map(|a| a.from);
            let to = match back.and_then(|code| self.by_code.get(&code).copied()) {
                Some(first) if self.rng.chance(0.5) => first,
                _ => self.other_than(from),
            };
            if self.move_out(from, to, rid, doc, MOVE_OUT_ACTOR).is_some() {
                self.counters.moved_again += 1;
            }
            return;
        }
        let held = if self.rng.chance(MOVE_HELD) { self.held_dose() } else { None };
        let (from, index) = match &held {
            Some((home, index, _)) => (*home, *index),
            None => {
                let from = self.pick_municipality();
                // Half the movers are people about to be vaccinated, who then come with the
                // old municipality's coupon (to its venues, or to another municipality's).
                let pop = self.primaries[from as usize].pop;
                let next = self.next_resident[from as usize];
                let index = if self.rng.chance(0.5) && next + 20 < pop {
                    next + self.rng.below(20)
                } else if next > 0 && self.rng.chance(MOVE_VACCINATED) {
                    // Someone vaccinated today, whose dose their history then carries.
                    self.rng.below(next)
                } else {
                    self.rng.below(pop)
                };
                (from, index)
            }
        };
        if !self.primaries[from as usize].up || self.moved.contains_key(&(from, index)) {
            return;
        }
        let to = self.other_than(from);
        let now = self.clock(Addr::Primary(from));
        let p = &mut self.primaries[from as usize];
        let (rid, doc, record) =
            open_resident(p, from, index, &self.person_secret, self.prebuild.as_ref(), now);
        let person_key = record.person_key.clone();
        // Some moves are not handed over by the old municipality's staff: the new one's
        // register extract asks for the history (a 転入 request), and the old one hands the
        // person over when the ledger relays it.
        let asked = self.rng.chance(ASKED);
        // The person files their move-in at the new town hall; its next register extract
        // lists them, before or after the handoff is accepted there.
        let at = self.now + self.rng.below(EXTRACT_WITHIN);
        if asked && at >= self.config.day_ms {
            // Next month's extract will ask; not part of this run.
            return;
        }
        if asked || self.move_out(from, to, rid, doc, MOVE_OUT_ACTOR).is_some() {
            self.moved.insert((from, index), to);
            let held = held.map(|(_, _, capture)| capture);
            let vaccinated = !record.valid_doses().is_empty() && held.is_none();
            self.first_home.insert(person_key.clone(), FirstHome { resident: (from, index), held });
            if at >= self.config.day_ms {
                // After the day: next month's extract, not part of this run.
                return;
            }
            let row = Box::new(ExtractRow {
                person_key,
                identity: record.identity,
                vaccinated,
                previous: self.codes[from as usize],
                handed_over: !asked,
            });
            self.extracts_pending += 1;
            self.schedule(at, Event::Extract { to, row });
        }
    }

    /// `vrs-node import` of one row of municipality `i`'s register extract naming someone
    /// who moved in. Before their handoff arrives, it registers them (and, for some, the bulk
    /// issuance gives them a first-dose coupon); after, it gives them their 宛名番号 in
    /// place of the provisional one. A person who has moved on since is left alone. A
    /// newcomer it registers is asked for from their previous municipality.
    fn extract(&mut self, i: u32, row: ExtractRow) {
        let now = self.clock(Addr::Primary(i));
        // The bulk issuance sends a first-dose coupon to everyone it knows no dose of; half
        // of those without a history here have it before the history arrives, and all who
        // were vaccinated before they moved (the case that needs their doses renumbered).
        let issue = row.vaccinated || self.rng.chance(ISSUED_BEFORE_HISTORY);
        let again = issue && row.vaccinated && self.rng.chance(VACCINATED_AGAIN);
        let p = &mut self.primaries[i as usize];
        p.next_serial += 1;
        let serial = p.next_serial;
        let mut identity = row.identity;
        identity.atena_number = format!("A{serial:09}");
        identity.address = format!("転入町{serial}番地");
        identity.status = ResidentStatus::Active;
        if let Some(rid) = p.by_person.get(&row.person_key).cloned() {
            let mut doc = p.docs[&rid].load_as(&p.actor);
            let record = read_record(&doc).expect("a resident document");
            if holds_provisional_atena(&record) {
                apply(p, &rid, &mut doc, &record, &ResidentEvent::IdentityUpdated(identity), now);
                self.counters.reregistered += 1;
                self.nudge(i);
            }
            return;
        }
        if self.rng.chance(self.config.birth_date_differs)
            && let Some(other) = identity.birth_date.next_day()
        {
            // A clerical difference between the two registers (or one person's 個人番号 on
            // another's row). Handed over already: the history will not join this resident
            // as it is. Not handed over: the ask's birth check will not match the old
            // record, and the old municipality will not hand the person over.
            if row.handed_over {
                self.birth_fix.insert(row.person_key.clone(), other);
            } else {
                self.ask_fix.insert(row.person_key.clone(), identity.birth_date);
            }
            identity.birth_date = other;
            self.counters.birth_dates_differ += 1;
        }
        let p = &mut self.primaries[i as usize];
        let rid = format!("{}-x-{serial}", p.code);
        // `vrs-node import`'s newcomer with a 転入日 and 前住所市区町村コード: the import's
        // batch records the request, whether or not the old municipality has handed the
        // person over already; the next sync sends it.
        let ask = Ask {
            ask_id: format!("ask-{}-{serial}", p.code),
            birth_check: self.person_secret.birth_check(&row.person_key, identity.birth_date),
            previous: Some(row.previous),
            state: AskLocal::Asking,
            holder: None,
        };
        p.asks.insert(row.person_key.clone(), ask);
        self.counters.asked += 1;
        let record = registered_record(rid.clone(), p.code, row.person_key, identity);
        let mut doc = new_resident_document(&p.actor, &record, now).expect("a new document");
        add_cells(p, record_cells(&record));
        p.by_person.insert(record.person_key.clone(), rid.clone());
        store(p, &rid, &mut doc);
        if issue {
            issue_coupon(p, &rid, &mut doc, &record, 1, serial, now);
        }
        p.stats_version += 1;
        self.counters.registered_first += 1;
        if again {
            self.desk_capture(i, serial);
        }
        self.nudge(i);
    }

    /// A dose given at municipality `i`'s own desk (recorded through its API, not a
    /// terminal) against its first-dose coupon number `serial`.
    fn desk_capture(&mut self, i: u32, serial: u32) {
        let p = &self.primaries[i as usize];
        let code = CouponCode {
            ticket_kind: 1,
            dose_round: 1,
            municipality: p.code,
            number: CouponNumber::from_serial(serial).expect("serials fit"),
        };
        let capture = TerminalCapture {
            event_id: format!("ev-{}-desk-{serial}", p.code),
            coupon: SignedCoupon::sign(code, 0, &p.key).to_qr_text(),
            vial: vial_text(p.code),
            vaccinated_on: DAY,
            captured_at: self.clock(Addr::Primary(i)),
            venue: "desk".to_owned(),
            venue_municipality: p.code,
            recorded_by: "user:sim-clerk".to_owned(),
        };
        let state = self.record(i, &capture, None, None);
        if matches!(state, CaptureState::Recorded { .. }) {
            self.counters.acknowledged += 1;
            self.counters.vaccinated_again += 1;
        }
        self.desk.insert(capture.event_id, state);
    }

    /// Someone who moved in during the run, to move again: preferably one whose first dose a
    /// terminal still holds, else one not yet vaccinated (who will come with their first
    /// coupon).
    fn pick_arrival(&mut self) -> Option<(u32, String)> {
        while !self.arrived_held.is_empty() {
            let n = self.arrived_held.len() as u64;
            let (at, rid, t, event_id) = self.arrived_held.swap_remove(self.rng.below(n) as usize);
            if self.terminals[t as usize].open.contains(&event_id) {
                return Some((at, rid));
            }
        }
        while !self.arrived.is_empty() {
            let n = self.arrived.len() as u64;
            let (at, rid, (home, index)) = self.arrived.swap_remove(self.rng.below(n) as usize);
            if self.next_resident[home as usize] <= index {
                return Some((at, rid));
            }
        }
        None
    }

    /// A person whose dose a terminal holds and has not yet settled: (municipality, index,
    /// (terminal, event id)), if the coupon is one this run issued.
    fn held_dose(&mut self) -> Option<(u32, u64, (u32, String))> {
        let n = self.terminals.len();
        let start = self.rng.below(n as u64) as usize;
        let (t, event_id) = (0..n).map(|k| (start + k) % n).find_map(|t| {
            let term = &self.terminals[t];
            term.open.first().map(|id| (t as u32, id.clone()))
        })?;
        let held = &self.terminals[t as usize].held[&event_id];
        let code = *decode_scans(&held.capture.coupon, &held.capture.vial).ok()?.coupon.code();
        let home = *self.by_code.get(&code.municipality)?;
        let index = resident_index(&code.number, self.primaries[home as usize].pop)?;
        Some((home, index, (t, event_id)))
    }

    /// Any municipality but `i`.
    fn other_than(&mut self, i: u32) -> u32 {
        let other = self.rng.below(self.primaries.len() as u64 - 1) as u32;
        if other >= i { other + 1 } else { other }
    }

    /// Records the move-out of resident `rid` of `from` to `to` by `actor` and seals the
    /// handoff; returns its id, or None if the resident is not active here or the directory
    /// lacks `to`.
    fn move_out(
        &mut self,
        from: u32,
        to: u32,
        rid: String,
        mut doc: Automerge,
        actor: &str,
    ) -> Option<String> {
        let now = self.clock(Addr::Primary(from));
        let ephemeral = self.rng.bytes32();
        let to_code = self.codes[to as usize];
        let recipient = self
            .directory
            .directory
            .primary_of(to_code)
            .and_then(|e| hex_decode(&e.encryption_key))
            .and_then(|k| <[u8; 32]>::try_from(k).ok())?;
        let p = &mut self.primaries[from as usize];
        let record = read_record(&doc).expect("a resident document");
        if record.transfer.is_some() || record.identity.status != ResidentStatus::Active {
            return None;
        }
        p.next_handoff += 1;
        let handoff_id = format!("ho-{}-{}", p.code, p.next_handoff);
        let transfer =
            Transfer { to: to_code, handoff_id: handoff_id.clone(), at: now, actor: actor.to_owned() };
        let event = ResidentEvent::TransferredOut(transfer);
        apply(p, &rid, &mut doc, &record, &event, now);
        let after = read_record(&doc).expect("a resident document");
        for entry in after.coupons.values().filter(|c| c.status == CouponStatus::Transferred) {
            p.blocked.insert(entry.key(), BlockedCoupon::transferred(to_code));
        }
        p.bundle_version += 1;
        p.bundle = None;
        let payload = HandoffPayload {
            handoff_id: handoff_id.clone(),
            from: p.code,
            to: to_code,
            person_key: after.person_key.clone(),
            record: after,
            sealed_at: now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        };
        let sealed = protocol::handoff::seal(&payload, &p.key, &recipient, ephemeral)
            .expect("the simulator's keys seal");
        p.out.insert(handoff_id.clone(), OutHandoff { sealed, state: OutState::Sealed });
        self.counters.relocations += 1;
        self.nudge(from);
        self.timer(Addr::Primary(from), Timer::Handoff, 1);
        Some(handoff_id)
    }

    /// A clerk voids a dose recorded by mistake.
    fn void(&mut self, primary: u32, resident: &str, event_id: &str) {
        let node = Addr::Primary(primary);
        if !self.is_up(node) {
            return;
        }
        let now = self.clock(node);
        let p = &mut self.primaries[primary as usize];
        let Some(disk) = p.docs.get(resident) else { return };
        let mut doc = disk.load_as(&p.actor);
        let record = read_record(&doc).expect("a resident document");
        if record.transfer.is_some() {
            return;
        }
        p.next_correction += 1;
        let correction_id = format!("co-{}-{}", p.code, p.next_correction);
        let request = VoidRequest {
            event_id,
            reason: "別人の接種券で記録した",
            actor: "user:sim-clerk",
            correction_id: &correction_id,
            at: now,
        };
        let Ok(mut events) = void_plan(&record, &request) else { return };
        if self.config.bug == Some(crate::Bug::VoidKeepsNumbers) {
            events.truncate(1);
        }
        let mut before = record;
        for event in &events {
            apply(p, resident, &mut doc, &before, event, now);
            before = read_record(&doc).expect("a resident document");
        }
        // As the node: a void that reopened no coupon leaves the next dose one to be issued.
        let min_age = catalogue().min_eligible_age();
        if let Some(next) = protocol::validation::coupon_due(&before, DAY, min_age) {
            p.next_serial += 1;
            let serial = p.next_serial;
            issue_coupon(p, resident, &mut doc, &before, next, serial, now);
            self.counters.issued_after_void += 1;
        }
        self.counters.voids += 1;
        if events.len() > 1 {
            self.counters.voids_renumbering += 1;
        }
        self.nudge(primary);
    }

    fn nudge(&mut self, primary: u32) {
        let p = &mut self.primaries[primary as usize];
        if !p.nudged {
            p.nudged = true;
            self.send(Addr::Primary(primary), Addr::Standby(primary), Msg::Nudge);
        }
        let interval = self.interval(Poll::Report);
        self.timer(Addr::Primary(primary), Timer::Report, interval);
    }

    // ---- Terminal -------------------------------------------------------------------

    fn push_tick(&mut self, t: u32) {
        let node = Addr::Terminal(t);
        let term = &self.terminals[t as usize];
        let primary = Addr::Primary(term.primary);
        if term.sent.is_some_and(|(_, at)| self.now < at + TIMEOUT_MS) {
            self.timer(node, Timer::Push, TIMEOUT_MS);
            return;
        }
        let held = term.bundle.as_ref().map_or(0, |b| b.version);
        let captures: Vec<TerminalCapture> =
            term.open.iter().take(MAX_CAPTURES_PER_REQUEST).map(|id| term.held[id].capture.clone()).collect();
        let busy = !captures.is_empty();
        let id = self.request_id();
        self.terminals[t as usize].sent = busy.then_some((id, self.now));
        self.send(node, primary, Msg::Refresh(held));
        if busy {
            self.send(node, primary, Msg::Push(id, captures));
        }
        // Connected terminals ask for a newer bundle every few seconds; with captures
        // waiting they push again until each is final.
        let interval = if busy { 1_000 } else { self.interval(Poll::Bundle) };
        self.timer(node, Timer::Push, interval);
    }

    fn terminal_receive(&mut self, t: u32, msg: Msg) {
        let term = &mut self.terminals[t as usize];
        match msg {
            Msg::Pushed(id, states) => {
                if term.sent.is_some_and(|(sent, _)| sent == id) {
                    term.sent = None;
                }
                for (id, state) in states {
                    if let Some(held) = term.held.get_mut(&id)
                        && !held.state.is_final()
                    {
                        if state.is_final() {
                            term.open.remove(&id);
                        }
                        held.state = state;
                    }
                }
            }
            Msg::Bundle(bundle) if term.bundle.as_ref().is_none_or(|b| b.version < bundle.version) => {
                if !bundle.directory_unchanged {
                    term.bundle = Some(bundle);
                } else if let Some(directory) = term.bundle.as_ref().and_then(|b| b.directory.clone()) {
                    // `node/src/terminal.rs` `take_bundle`: keep the directory it holds.
                    let whole = TerminalBundle {
                        directory: Some(directory),
                        directory_unchanged: false,
                        ..(*bundle).clone()
                    };
                    term.bundle = Some(Rc::new(whole));
                }
            }
            _ => {}
        }
    }

    // ---- Primary --------------------------------------------------------------------

    fn primary_commit(&mut self, i: u32) {
        let pending = std::mem::take(&mut self.primaries[i as usize].pending);
        let mut replies = Vec::new();
        for (from, msg) in pending {
            match msg {
                Msg::Refresh(held) => {
                    let bundle = self.bundle(i, held != 0);
                    if bundle.version > held {
                        replies.push((from, Msg::Bundle(bundle)));
                    }
                }
                Msg::Push(id, captures) => {
                    let states = captures.into_iter().map(|c| self.push_one(i, from, c)).collect();
                    replies.push((from, Msg::Pushed(id, states)));
                }
                Msg::Forward(id, captures) => {
                    let Addr::Primary(f) = from else { continue };
                    let states = captures.into_iter().map(|c| self.forwarded_one(i, f, c)).collect();
                    replies.push((from, Msg::Forwarded(id, states)));
                }
                Msg::Forwarded(id, states) => self.forward_answered(i, from, id, states),
                Msg::Pull(id, request) => replies.push((from, Msg::Pulled(id, self.answer_pull(i, request)))),
                Msg::Reported(id, version) => {
                    let p = &mut self.primaries[i as usize];
                    if p.report_sent.is_some_and(|(sent, _)| sent == id) {
                        p.report_sent = None;
                    }
                    p.acked_version = p.acked_version.max(version);
                }
                Msg::Synced(id, response) => self.synced(i, id, *response),
                _ => {}
            }
        }
        for (to, msg) in replies {
            self.send(Addr::Primary(i), to, msg);
        }
    }

    /// `node/src/terminals.rs` `bundle`: the directory is left out for a terminal that holds
    /// its version already (the simulated directory has one version all day).
    /// The bundle with the directory is made only when a terminal needs it (its first).
    fn bundle(&mut self, i: u32, directory_held: bool) -> Rc<TerminalBundle> {
        let p = &mut self.primaries[i as usize];
        if p.bundle.is_none() {
            let lot = lot_of(p.code);
            let slim = TerminalBundle {
                version: p.bundle_version,
                municipality: p.code,
                venue: String::new(),
                campaign_start: CAMPAIGN_START,
                national_key: hex_lower(self.national_key.public_key().as_ref()),
                directory: None,
                directory_unchanged: true,
                own_coupon_key: hex_lower(p.key.public_key().as_ref()),
                catalogue: catalogue(),
                lots: BTreeMap::from([(lot.lot.clone(), lot)]),
                blocked: p.blocked.clone(),
            };
            p.bundle = Some((None, Rc::new(slim)));
        }
        let (whole, slim) = p.bundle.as_mut().expect("made above");
        if directory_held {
            return slim.clone();
        }
        whole
            .get_or_insert_with(|| {
                Rc::new(TerminalBundle {
                    directory: Some(self.shared_directory.clone()),
                    directory_unchanged: false,
                    ..(**slim).clone()
                })
            })
            .clone()
    }

    /// `node/src/terminals.rs` `push_one`: record an own coupon (or forward it to where the
    /// resident moved), forward another municipality's.
    fn push_one(&mut self, i: u32, from: Addr, capture: TerminalCapture) -> (String, CaptureState) {
        let event_id = capture.event_id.clone();
        let own = self.codes[i as usize];
        let owner = match decode_scans(&capture.coupon, &capture.vial) {
            Ok(scans) => scans.coupon.code().municipality,
            Err(error) => return (event_id, refusal(own, error.code(), &error.to_string())),
        };
        let key = format!("{from:?}/{event_id}");
        let state = if owner == own {
            if let Some(to) = self.passed_on(i, &key) {
                return (event_id, self.queue_forward(i, key, to, capture, None));
            }
            let state = self.record(i, &capture, None, None);
            match &state {
                CaptureState::Refused { code, .. } if code == "coupon_transferred" => {
                    match self.moved_to(i, &capture) {
                        Some(to) => self.queue_forward(i, key, to, capture, None),
                        None => state,
                    }
                }
                _ => state,
            }
        } else {
            let known = self.directory.directory.primary_of(owner).is_some();
            if known && self.by_code.contains_key(&owner) {
                self.queue_forward(i, key, owner, capture, None)
            } else {
                refusal(own, "owner_unknown", "municipality is not in the federation directory")
            }
        };
        (event_id, state)
    }

    /// `node/src/terminals.rs` `passed_on`: a capture of an own coupon already passed on to
    /// where its resident moved goes straight back to the outbox.
    fn passed_on(&self, i: u32, key: &str) -> Option<MunicipalityCode> {
        let p = &self.primaries[i as usize];
        if let Some((to, _)) = p.outbox.get(key) {
            return Some(*to);
        }
        match p.results.get(key)? {
            CaptureState::Recorded { owner, .. } | CaptureState::Refused { owner, .. } => Some(*owner),
            _ => None,
        }
    }

    fn moved_to(&self, i: u32, capture: &TerminalCapture) -> Option<MunicipalityCode> {
        let p = &self.primaries[i as usize];
        let scans = decode_scans(&capture.coupon, &capture.vial).ok()?;
        let rid = p.by_number.get(&scans.coupon.code().number)?;
        read_record(&p.docs[rid].load()).ok()?.transfer.map(|t| t.to)
    }

    fn queue_forward(
        &mut self,
        i: u32,
        key: String,
        owner: MunicipalityCode,
        capture: TerminalCapture,
        lot: Option<protocol::catalogue::Lot>,
    ) -> CaptureState {
        let p = &mut self.primaries[i as usize];
        if let Some(state) = p.results.remove(&key) {
            return state;
        }
        if !p.outbox.contains_key(&key) {
            let lot = lot.or_else(|| Some(lot_of(p.code)));
            p.outbox.insert(key, (owner, ForwardedCapture { capture, lot }));
            self.timer(Addr::Primary(i), Timer::ForwardTick, 1);
        }
        CaptureState::Forwarded { owner }
    }

    /// `node/src/terminals.rs` `forwarded`.
    fn forwarded_one(&mut self, i: u32, from: u32, forwarded: ForwardedCapture) -> (String, CaptureState) {
        let own = self.codes[i as usize];
        let from_code = self.codes[from as usize];
        let capture = forwarded.capture;
        let event_id = capture.event_id.clone();
        let owner = match decode_scans(&capture.coupon, &capture.vial) {
            Ok(scans) => scans.coupon.code().municipality,
            Err(error) => return (event_id, refusal(own, error.code(), &error.to_string())),
        };
        let mismatch = || {
            refusal(own, "venue_municipality_mismatch", "forwarded by another municipality than the venue's")
        };
        let key = format!("{:?}/{event_id}", Addr::Primary(from));
        let state = if from_code == own {
            mismatch()
        } else if owner == from_code {
            let code = decode_scans(&capture.coupon, &capture.vial).map(|s| s.coupon.code().to_string());
            let carries = code.is_ok_and(|c| self.primaries[i as usize].carried.contains_key(&c));
            if carries {
                self.record_carried(i, key, capture, forwarded.lot, owner)
            } else {
                CaptureState::Pending
            }
        } else if self.handed_here_by(i, &capture, from_code) {
            self.record_carried(i, key, capture, forwarded.lot, owner)
        } else if owner != own
            || (capture.venue_municipality != from_code && self.moved_to(i, &capture).is_some())
        {
            // Passed on before the resident's handoff from `from` was accepted here.
            CaptureState::Pending
        } else if capture.venue_municipality != from_code {
            mismatch()
        } else {
            if let Some(to) = self.passed_on(i, &key) {
                return (event_id, self.queue_forward(i, key, to, capture, forwarded.lot));
            }
            let state = self.record(i, &capture, forwarded.lot.clone(), None);
            let moved = match &state {
                CaptureState::Refused { code, .. }
                    if code == "coupon_transferred" && self.config.bug != Some(crate::Bug::KeepMovedAway) =>
                {
                    self.moved_to(i, &capture)
                }
                _ => None,
            };
            match moved {
                Some(to) => self.queue_forward(i, key, to, capture, forwarded.lot),
                None => state,
            }
        };
        (event_id, state)
    }

    /// `node/src/terminals.rs` `handed_here_by`.
    fn handed_here_by(&self, i: u32, capture: &TerminalCapture, from: MunicipalityCode) -> bool {
        if self.config.bug == Some(crate::Bug::LatestArrivalOnly) {
            return self.carried_record(i, capture).and_then(|r| r.arrival).is_some_and(|a| a.from == from);
        }
        let Ok(scans) = decode_scans(&capture.coupon, &capture.vial) else { return false };
        self.primaries[i as usize].handed_here.contains(&(scans.coupon.code().to_string(), from))
    }

    /// `node/src/terminals.rs` `carried_resident`.
    fn carried_record(&self, i: u32, capture: &TerminalCapture) -> Option<ResidentRecord> {
        let p = &self.primaries[i as usize];
        let scans = decode_scans(&capture.coupon, &capture.vial).ok()?;
        let rid = p.carried.get(&scans.coupon.code().to_string())?;
        read_record(&p.docs[rid].load()).ok()
    }

    /// `node/src/terminals.rs` `record_carried`: record against a carried coupon, or pass the
    /// dose on if the resident has moved on again.
    fn record_carried(
        &mut self,
        i: u32,
        key: String,
        capture: TerminalCapture,
        lot: Option<protocol::catalogue::Lot>,
        issuer: MunicipalityCode,
    ) -> CaptureState {
        let here = self.config.bug != Some(crate::Bug::StickyPassOn)
            && self
                .carried_record(i, &capture)
                .is_some_and(|r| r.transfer.is_none() && r.identity.status == ResidentStatus::Active);
        if here {
            let state = self.record(i, &capture, lot, Some(issuer));
            if state.is_final() {
                let p = &mut self.primaries[i as usize];
                p.outbox.remove(&key);
                p.results.remove(&key);
            }
            return state;
        }
        if let Some(to) = self.passed_on(i, &key) {
            return self.queue_forward(i, key, to, capture, lot);
        }
        let state = self.record(i, &capture, lot.clone(), Some(issuer));
        let moved_on = match &state {
            CaptureState::Refused { code, .. } if code == "resident_not_active" => {
                self.carried_record(i, &capture).and_then(|r| r.transfer).map(|t| t.to)
            }
            _ => None,
        };
        match moved_on {
            Some(to) => {
                self.counters.passed_on_again += 1;
                self.queue_forward(i, key, to, capture, lot)
            }
            None => state,
        }
    }

    fn forward_answered(&mut self, i: u32, from: Addr, id: u64, states: Vec<(String, CaptureState)>) {
        let Addr::Primary(o) = from else { return };
        let owner = self.codes[o as usize];
        let p = &mut self.primaries[i as usize];
        if p.forward_sent.get(&owner).is_some_and(|(sent, _)| *sent == id) {
            p.forward_sent.remove(&owner);
        }
        let keys: Vec<(String, String)> = p
            .outbox
            .iter()
            .filter(|(_, (o, _))| *o == owner)
            .map(|(k, (_, f))| (k.clone(), f.capture.event_id.clone()))
            .collect();
        for (id, state) in states {
            if !state.is_final() {
                continue;
            }
            for (key, _) in keys.iter().filter(|(_, e)| *e == id) {
                if p.outbox.remove(key).is_some() {
                    p.results.insert(key.clone(), state.clone());
                }
            }
        }
        if p.outbox.values().any(|(o, _)| *o == owner) {
            self.timer(Addr::Primary(i), Timer::ForwardTick, 1_000);
        }
    }

    fn forward_tick(&mut self, i: u32) {
        let now = self.now;
        let p = &mut self.primaries[i as usize];
        let mut by_owner: BTreeMap<MunicipalityCode, Vec<ForwardedCapture>> = BTreeMap::new();
        for (owner, forwarded) in p.outbox.values() {
            let list = by_owner.entry(*owner).or_default();
            if list.len() < MAX_CAPTURES_PER_REQUEST {
                list.push(forwarded.clone());
            }
        }
        if by_owner.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        for (owner, captures) in by_owner {
            if p.forward_sent.get(&owner).is_some_and(|(_, at)| now < at + TIMEOUT_MS) {
                continue;
            }
            sends.push((owner, captures));
        }
        for (owner, captures) in sends {
            let id = self.request_id();
            self.primaries[i as usize].forward_sent.insert(owner, (id, now));
            let o = self.by_code[&owner];
            self.send(Addr::Primary(i), Addr::Primary(o), Msg::Forward(id, captures));
        }
        self.timer(Addr::Primary(i), Timer::ForwardTick, TIMEOUT_MS);
    }

    /// The writer's `capture_one`: find the resident, validate, record in one commit.
    fn record(
        &mut self,
        i: u32,
        capture: &TerminalCapture,
        lot: Option<protocol::catalogue::Lot>,
        transferred_from: Option<MunicipalityCode>,
    ) -> CaptureState {
        let now = self.clock(Addr::Primary(i));
        let issuer_key = match transferred_from {
            None => self.primaries[i as usize].key.public_key().as_ref().to_vec(),
            Some(from) => {
                match self.directory.directory.primary_of(from).and_then(|e| hex_decode(&e.coupon_key)) {
                    Some(key) => key,
                    None => return refusal(self.codes[i as usize], "owner_unknown", "no key"),
                }
            }
        };
        let issuer = transferred_from.unwrap_or(self.codes[i as usize]);
        let p = &mut self.primaries[i as usize];
        let own = p.code;
        let scans = match decode_scans(&capture.coupon, &capture.vial).and_then(|scans| {
            authenticate_coupon_with(
                &scans.coupon,
                |m| (m == issuer).then(|| issuer_key.clone()),
                &self.checked,
            )
            .map(|()| scans)
        }) {
            Ok(scans) => scans,
            Err(error) => return refusal(own, error.code(), &error.to_string()),
        };
        let code = *scans.coupon.code();
        let indexed = match transferred_from {
            Some(_) => p.carried.get(&code.to_string()).cloned(),
            None => p.by_number.get(&code.number).cloned(),
        };
        let resident = match indexed {
            Some(rid) => {
                let doc = p.docs[&rid].load_as(&p.actor);
                let record = read_record(&doc).expect("a resident document");
                Some((rid, doc, record))
            }
            None if transferred_from.is_none() => resident_index(&code.number, p.pop)
                .map(|index| open_resident(p, i, index, &self.person_secret, self.prebuild.as_ref(), now)),
            None => None,
        };
        let Some((rid, mut doc, record)) = resident else {
            return refusal(own, "coupon_not_issued", "not issued by this municipality");
        };
        let own_lot = lot_of(own);
        let lot = if own_lot.lot == scans.vial.lot {
            Some(own_lot)
        } else {
            lot.filter(|l| l.lot == scans.vial.lot)
        };
        let catalogue = catalogue();
        let venue = if capture.venue_municipality == own {
            capture.venue.clone()
        } else {
            format!("{}/{}", capture.venue_municipality, capture.venue)
        };
        let input = CaptureInput {
            scans: &scans,
            vaccinated_on: capture.vaccinated_on,
            venue: &venue,
            event_id: &capture.event_id,
            captured_at: capture.captured_at,
            recorded_by: &capture.recorded_by,
        };
        let context = CaptureContext {
            today: DAY,
            campaign_start: CAMPAIGN_START,
            catalogue: &catalogue,
            lot: lot.as_ref(),
            accept_transferred: transferred_from.is_some(),
        };
        match validate_capture(&input, &record, &context) {
            Err(error) => refusal(own, error.code(), &error.to_string()),
            Ok(CaptureDecision::Replay(event)) if self.config.bug == Some(crate::Bug::RecordReplays) => {
                let mut again = event.clone();
                again.event_id = format!("{}-again-{}", event.event_id, self.now);
                apply(p, &rid, &mut doc, &record, &ResidentEvent::DoseRecorded(again), now);
                self.nudge(i);
                CaptureState::Recorded { owner: own, dose_number: event.dose_number, replay: true }
            }
            Ok(CaptureDecision::Replay(event)) => {
                CaptureState::Recorded { owner: own, dose_number: event.dose_number, replay: true }
            }
            Ok(CaptureDecision::Record(event)) => {
                let dose_number = event.dose_number;
                let event_id = event.event_id.clone();
                let spent = if self.config.bug == Some(crate::Bug::KeepSpentCoupons) {
                    Vec::new()
                } else {
                    protocol::validation::coupons_spent_by(&record, &event)
                };
                apply(p, &rid, &mut doc, &record, &ResidentEvent::DoseRecorded(event), now);
                for revoked in spent {
                    let before = read_record(&doc).expect("a resident document");
                    apply(p, &rid, &mut doc, &before, &revoked, now);
                }
                // A clerk voids some doses later the same day (not after the venues close:
                // the workload ends with the day, then the federation heals and settles).
                if self.rng.chance(self.config.void_rate) {
                    let at = self.now + self.rng.between(60_000, 1_800_000);
                    if at < self.config.day_ms {
                        self.schedule(at, Event::Void { primary: i, resident: rid, event_id });
                    }
                }
                self.nudge(i);
                CaptureState::Recorded { owner: own, dose_number, replay: false }
            }
        }
    }

    fn answer_pull(&mut self, i: u32, request: ReplicationRequest) -> ReplicationResponse {
        let p = &mut self.primaries[i as usize];
        p.nudged = false;
        match request {
            ReplicationRequest::Changes { since, limit } => {
                let feed: Vec<(u64, String)> = p
                    .feed
                    .range(since + 1..)
                    .take(limit as usize + 1)
                    .map(|(s, id)| (*s, id.clone()))
                    .collect();
                answer_changes(since, limit, &feed, |_| true)
            }
            ReplicationRequest::Sync { docs } => match answer_sync(&docs, Source(&p.docs)) {
                Ok(docs) => ReplicationResponse::Sync { docs },
                Err(error) => {
                    ReplicationResponse::Refused { code: "bad_request".into(), message: error.to_string() }
                }
            },
        }
    }

    fn report_tick(&mut self, i: u32) {
        let now = self.clock(Addr::Primary(i));
        let p = &mut self.primaries[i as usize];
        if p.stats_version <= p.acked_version {
            return;
        }
        if p.report_sent.is_some_and(|(_, at)| self.now < at + TIMEOUT_MS) {
            self.timer(Addr::Primary(i), Timer::Report, TIMEOUT_MS);
            return;
        }
        let daily = daily_from_cells(
            p.code,
            DAY,
            p.stats_version,
            now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            p.cells.iter().map(|(cell, n)| (cell, u64::try_from(*n).unwrap_or(0))),
        );
        let signed = SignedStatistics::sign(&Statistics::Daily(daily), &p.key);
        let id = self.request_id();
        self.primaries[i as usize].report_sent = Some((id, self.now));
        self.send(Addr::Primary(i), Addr::National, Msg::Report(id, Box::new(signed)));
        let interval = self.interval(Poll::Report);
        self.timer(Addr::Primary(i), Timer::Report, interval);
    }

    fn handoff_tick(&mut self, i: u32) {
        let idle_poll = self.interval(Poll::Handoff);
        let p = &mut self.primaries[i as usize];
        if p.sync_sent.is_some_and(|(_, at)| self.now < at + TIMEOUT_MS) {
            self.timer(Addr::Primary(i), Timer::Handoff, TIMEOUT_MS);
            return;
        }
        let deposits: Vec<SealedHandoff> = p
            .out
            .values()
            .filter(|o| o.state == OutState::Sealed)
            .take(MAX_HANDOFFS_PER_MESSAGE)
            .map(|o| o.sealed.clone())
            .collect();
        let watching: Vec<String> =
            p.out.iter().filter(|(_, o)| o.state == OutState::Deposited).map(|(id, _)| id.clone()).collect();
        p.accepted_sent = p.accepted_unacked.iter().cloned().collect();
        p.returned_sent = p.returning.keys().cloned().collect();
        let returned = p
            .returning
            .iter()
            .map(|(id, reason)| ReturnedHandoff { handoff_id: id.clone(), reason: *reason })
            .collect();
        // The open asks, taken in turn from after the last one sent (`build_sync`).
        let open: Vec<&String> = p.asks.iter().filter(|(_, a)| a.is_open()).map(|(k, _)| k).collect();
        let start = open.partition_point(|key| key.as_str() <= p.ask_cursor.as_str());
        let mut asks = Vec::new();
        for key in open[start..].iter().chain(&open[..start]).take(MAX_HANDOFFS_PER_MESSAGE) {
            let ask = &p.asks[*key];
            asks.push(HistoryAsk {
                ask_id: ask.ask_id.clone(),
                person_key: (*key).clone(),
                birth_check: ask.birth_check.clone(),
                previous: ask.previous,
            });
        }
        if let Some(last) = asks.last() {
            p.ask_cursor.clone_from(&last.person_key);
        }
        let sync = HandoffSync {
            deposits,
            accepted: p.accepted_sent.clone(),
            watching,
            asks,
            answered: std::mem::take(&mut p.answers),
            returned,
        };
        let id = self.request_id();
        self.primaries[i as usize].sync_sent = Some((id, self.now));
        self.send(Addr::Primary(i), Addr::National, Msg::Sync(id, Box::new(sync)));
        self.timer(Addr::Primary(i), Timer::Handoff, idle_poll);
    }

    /// The national node's answer to a handoff sync: deposits stored, handoffs to accept
    /// (accepted at once: the automatic policy), watched handoffs accepted, where this
    /// municipality's asks stand, and other municipalities' requests for its residents.
    fn synced(&mut self, i: u32, id: u64, response: HandoffResponse) {
        let now = self.clock(Addr::Primary(i));
        let HandoffResponse::Synced { deposits, inbound, states, returns, asks, requests } = response else {
            return;
        };
        let mut taken_back = Vec::new();
        let mut refused = Vec::new();
        let current = self.primaries[i as usize].sync_sent.is_some_and(|(sent, _)| sent == id);
        {
            let p = &mut self.primaries[i as usize];
            if current {
                p.sync_sent = None;
            }
            for (id, outcome) in deposits {
                if let Some(out) = p.out.get_mut(&id)
                    && out.state == OutState::Sealed
                {
                    out.state = match outcome {
                        DepositOutcome::Stored => OutState::Deposited,
                        // Refusals that depend on the moment are tried again.
                        DepositOutcome::Refused { code, .. } if is_retryable(&code) => OutState::Sealed,
                        // Refused for good: the resident is taken back below, as the
                        // node does (`apply_response`).
                        DepositOutcome::Refused { code, .. } => {
                            refused.push(id.clone());
                            OutState::Refused(code)
                        }
                    };
                }
            }
            for (id, state) in states {
                if let Some(out) = p.out.get_mut(&id) {
                    match state {
                        LedgerState::Accepted => out.state = OutState::Accepted,
                        LedgerState::Returned if out.state == OutState::Deposited => {
                            let reason = returns.iter().find(|(r, _)| *r == id).map(|(_, why)| *why);
                            taken_back.push((id, reason.unwrap_or(ReturnReason::Other)));
                        }
                        _ => {}
                    }
                }
            }
            // Only what this sync reported is acknowledged (not an older sync's answer).
            if current {
                for id in std::mem::take(&mut p.accepted_sent) {
                    p.accepted_unacked.remove(&id);
                }
                for id in std::mem::take(&mut p.returned_sent) {
                    p.returning.remove(&id);
                }
            }
        };
        for (id, reason) in taken_back {
            self.take_back(i, &id, reason, now);
        }
        for id in refused {
            self.restore(i, &id, ReturnReason::LedgerRefused, now);
        }
        // Where the asks stand, and the requests to answer, only from the answer to the sync
        // in flight, as the node takes it (an older answer, late or duplicated, is stale).
        let (asks, requests) = if current { (asks, requests) } else { (Vec::new(), Vec::new()) };
        let p = &mut self.primaries[i as usize];
        let mut not_found = Vec::new();
        for (person_key, state) in asks {
            let Some(ask) = p.asks.get_mut(&person_key).filter(|a| a.is_open()) else { continue };
            match state {
                AskState::Waiting { holder } => {
                    ask.state = AskLocal::Waiting;
                    ask.holder = Some(holder);
                }
                AskState::Sent { .. } => ask.state = AskLocal::Sent,
                AskState::NotFound => {
                    ask.state = AskLocal::NotFound;
                    not_found.push(person_key);
                }
            }
        }
        // The page shows 該当なし: staff check with the previous municipality, correct
        // what differs and ask again.
        for person_key in not_found {
            let at = self.staff_time();
            self.staff_pending += 1;
            self.schedule(at, Event::AskAgain { primary: i, person_key });
        }
        let mut more = !requests.is_empty();
        for sealed in inbound {
            more |= self.accept(i, &sealed, now);
        }
        if self.config.bug != Some(crate::Bug::UnansweredRequests) {
            for request in &requests {
                let answer = self.answer_request(i, request);
                self.primaries[i as usize].answers.push(answer);
            }
        }
        if more || !self.primaries[i as usize].accepted_unacked.is_empty() {
            self.timer(Addr::Primary(i), Timer::Handoff, 1);
        }
    }

    /// `node/src/handoff.rs` `answer_request`: another municipality registered a newcomer
    /// and asked for their history; hands them over if they are resident here and their
    /// birth date matches.
    fn answer_request(&mut self, i: u32, request: &HistoryRequest) -> AskAnswer {
        let mut answer = AskAnswer {
            person_key: request.person_key.clone(),
            asked_by: request.asked_by,
            handoff_id: None,
        };
        let p = &self.primaries[i as usize];
        let Some(rid) = p.by_person.get(&request.person_key).cloned() else { return answer };
        let doc = p.docs[&rid].load_as(&p.actor);
        let record = read_record(&doc).expect("a resident document");
        if let Some(transfer) = record.transfer {
            // Handed over already (this request relayed again after an answer was lost):
            // that handoff is the answer. (A move-out made by staff before the ask reached
            // the ledger never gets here: its deposit, in this node's next sync, answers the
            // ask at the ledger before the request is relayed.)
            answer.handoff_id = (transfer.to == request.asked_by).then_some(transfer.handoff_id);
            return answer;
        }
        if self.person_secret.birth_check(&record.person_key, record.identity.birth_date)
            != request.birth_check
            || record.identity.status != ResidentStatus::Active
        {
            return answer;
        }
        let Some(&to) = self.by_code.get(&request.asked_by) else { return answer };
        let actor = format!("federation:{}", request.asked_by);
        answer.handoff_id = self.move_out(i, to, rid, doc, &actor);
        if answer.handoff_id.is_some() {
            self.counters.handed_on_request += 1;
        }
        answer
    }

    /// `node/src/handoff.rs` `accept_one`: open, create the resident with the whole
    /// history, index the carried coupons, issue a coupon for the next dose.
    fn accept(&mut self, i: u32, sealed: &SealedHandoff, now: OffsetDateTime) -> bool {
        let Some(sender_key) =
            self.directory.directory.primary_of(sealed.from).and_then(|e| hex_decode(&e.coupon_key))
        else {
            return false;
        };
        let p = &mut self.primaries[i as usize];
        if p.sent_back.contains(&sealed.handoff_id) || p.cannot_join.contains(&sealed.handoff_id) {
            // Sent back, or waiting for staff to: offered again until the ledger knows.
            return false;
        }
        // A newcomer asked for here comes from whom the ledger or the 転出証明書 named; a
        // handoff from anyone else waits for an admin (none comes in this workload).
        let expected = p
            .asks
            .get(&sealed.person_key)
            .filter(|a| a.state != AskLocal::Received)
            .and_then(|a| a.holder.or(a.previous));
        if expected.is_some_and(|from| from != sealed.from) {
            return false;
        }
        let Ok(payload) = sealed.open(&sender_key, &p.x_secret) else { return false };
        if let Some(existing) = p.by_person.get(&payload.person_key).cloned() {
            let doc = p.docs[&existing].load_as(&p.actor);
            let record = read_record(&doc).expect("a resident document");
            if record.arrival.as_ref().is_some_and(|a| a.handoff_id == payload.handoff_id) {
                // Already accepted (a repeated inbox): say so again.
                p.accepted_unacked.insert(payload.handoff_id.clone());
                return true;
            }
            if record.transfer.is_none()
                && record.identity.status == ResidentStatus::Active
                && self.config.bug != Some(crate::Bug::SecondRecord)
            {
                // The register extract listed the person first.
                return match join_history(&record, &payload, now) {
                    Ok(join) => {
                        self.join(i, doc, record, &payload, join, now);
                        true
                    }
                    Err(JoinRefusal::BirthDateDiffers) => {
                        // It waits as `failed` until staff, having checked the register, send
                        // it back.
                        p.cannot_join.insert(payload.handoff_id.clone());
                        let at = self.staff_time();
                        self.staff_pending += 1;
                        self.schedule(at, Event::SendBack { primary: i, handoff_id: payload.handoff_id });
                        false
                    }
                    Err(refusal) => {
                        let code = p.code;
                        let id = &payload.handoff_id;
                        self.join_refusals
                            .insert(format!("{code}: handoff {id} cannot join {existing}: {refusal:?}"));
                        false
                    }
                };
            }
        }
        p.next_serial += 1;
        let serial = p.next_serial;
        let rid = format!("{}-in-{serial}", p.code);
        let atena = provisional_atena(&payload.handoff_id);
        let mut record = protocol::handoff::received_record(&payload, rid.clone(), atena, None);
        record.schema = SCHEMA_VERSION;
        let mut doc = new_resident_document(&p.actor, &record, now).expect("a new document");
        add_cells(p, record_cells(&record));
        for coupon in record.coupons.values() {
            p.carried.insert(coupon.code.to_string(), rid.clone());
            p.handed_here.insert((coupon.code.to_string(), payload.from));
        }
        let next = record.next_dose_number();
        p.by_person.insert(record.person_key.clone(), rid.clone());
        store(p, &rid, &mut doc);
        if next <= 9 {
            issue_coupon(p, &rid, &mut doc, &record, next, serial, now);
        }
        p.stats_version += 1;
        received(p, &payload.person_key);
        p.accepted_unacked.insert(payload.handoff_id);
        self.arrived(i, rid, &record.person_key);
        self.counters.accepted += 1;
        self.nudge(i);
        true
    }

    /// `node/src/handoff.rs` `join_history`: the handoff's history joins `record`, the
    /// resident the register extract listed first, as `join` plans it, with a coupon for the
    /// next dose unless one of this municipality's is valid for it.
    fn join(
        &mut self,
        i: u32,
        mut doc: Automerge,
        record: ResidentRecord,
        payload: &HandoffPayload,
        join: Join,
        now: OffsetDateTime,
    ) {
        let p = &mut self.primaries[i as usize];
        let rid = record.resident_id.clone();
        let mut before = record;
        let keep = self.config.bug == Some(crate::Bug::JoinKeepsCoupons);
        for event in &join.events {
            if keep && matches!(event, ResidentEvent::CouponRevoked { .. }) {
                continue;
            }
            if self.config.bug == Some(crate::Bug::KeepNumbers)
                && matches!(event, ResidentEvent::DoseAmended { .. })
            {
                continue;
            }
            apply(p, &rid, &mut doc, &before, event, now);
            before = read_record(&doc).expect("a resident document");
        }
        for coupon in payload.record.coupons.values() {
            p.carried.insert(coupon.code.to_string(), rid.clone());
            p.handed_here.insert((coupon.code.to_string(), payload.from));
        }
        if join.current.is_none() && join.next <= 9 {
            p.next_serial += 1;
            let serial = p.next_serial;
            issue_coupon(p, &rid, &mut doc, &before, join.next, serial, now);
        }
        p.stats_version += 1;
        received(p, &payload.person_key);
        p.accepted_unacked.insert(payload.handoff_id.clone());
        let rid_for_void = rid.clone();
        self.arrived(i, rid, &payload.person_key);
        self.counters.accepted += 1;
        self.counters.joined += 1;
        self.counters.renumbered += join.renumbered.len() as u64;
        // Half the time a clerk here then voids the history's first dose (entered for the
        // wrong person at the old municipality): the doses after it are numbered down.
        let first = payload.record.valid_doses().first().map(|d| d.event_id.clone());
        if let Some(event_id) = first.filter(|_| !join.renumbered.is_empty())
            && self.rng.chance(0.5)
        {
            let at = self.now + self.rng.between(60_000, 1_800_000);
            if at < self.config.day_ms {
                self.schedule(at, Event::Void { primary: i, resident: rid_for_void, event_id });
            }
        }
        self.nudge(i);
    }

    /// When staff get to something that came up now: within `STAFF_WITHIN`, and by the end
    /// of the day (or at once, after it), as clerks' voids.
    fn staff_time(&mut self) -> Time {
        let at = self.now + self.rng.between(60_000, STAFF_WITHIN);
        if at < self.config.day_ms { at } else { self.now.max(self.config.day_ms - 1) + 1 }
    }

    /// `node/src/handoff.rs` `send_back`: staff of municipality `i` send back a handoff whose
    /// history could not join; the next sync tells the ledger.
    fn send_back(&mut self, i: u32, handoff_id: String) {
        let p = &mut self.primaries[i as usize];
        if !p.cannot_join.remove(&handoff_id) {
            return;
        }
        p.sent_back.insert(handoff_id.clone());
        p.returning.insert(handoff_id, ReturnReason::BirthDateDiffers);
        self.counters.sent_back += 1;
        self.timer(Addr::Primary(i), Timer::Handoff, 1);
    }

    /// `node/src/handoff.rs` `return_one`: the ledger says handoff `id` of municipality `i`
    /// was sent back. In one commit the resident is active here again with their coupons,
    /// the coupons leave the terminals' refusal list, and captures passed on to the receiver
    /// are taken back from the outbox; staff then correct the record and hand it over again.
    fn take_back(&mut self, i: u32, id: &str, reason: ReturnReason, now: OffsetDateTime) {
        let p = &mut self.primaries[i as usize];
        let Some(out) = p.out.get_mut(id) else { return };
        out.state = OutState::Returned;
        let Some((rid, to)) = self.restore(i, id, reason, now) else { return };
        self.counters.taken_back += 1;
        let receiver = self.by_code[&to];
        let at = self.staff_time();
        self.staff_pending += 1;
        self.schedule(at, Event::Resend { primary: i, resident: rid, to: receiver });
    }

    /// `node/src/handoff.rs` `return_one`: the resident of handoff `id` is active here again
    /// (sent back by the receiver, or refused for good by the ledger), their coupons valid
    /// and no longer blocked, and doses passed on to the receiver meanwhile taken back.
    /// Returns the resident and the receiver, if the record was still transferred by `id`.
    fn restore(
        &mut self,
        i: u32,
        id: &str,
        reason: ReturnReason,
        now: OffsetDateTime,
    ) -> Option<(String, MunicipalityCode)> {
        let p = &mut self.primaries[i as usize];
        let out = p.out.get(id)?;
        let to = out.sealed.to;
        let person_key = out.sealed.person_key.clone();
        let rid = p.by_person.get(&person_key).cloned()?;
        let mut doc = p.docs[&rid].load_as(&p.actor);
        let record = read_record(&doc).expect("a resident document");
        let transfer = record.transfer.clone().filter(|t| t.handoff_id == id)?;
        let event = ResidentEvent::TransferReturned(protocol::document::ReturnedTransfer {
            transfer,
            reason,
            at: now,
        });
        apply(p, &rid, &mut doc, &record, &event, now);
        let after = read_record(&doc).expect("a resident document");
        for entry in after.coupons.values().filter(|c| c.status == CouponStatus::Valid) {
            p.blocked.remove(&entry.key());
        }
        p.bundle_version += 1;
        p.bundle = None;
        let codes: BTreeSet<String> = record.coupons.values().map(|c| c.code.to_string()).collect();
        p.outbox.retain(|_, (owner, forwarded)| {
            let ours = decode_scans(&forwarded.capture.coupon, &forwarded.capture.vial)
                .is_ok_and(|scans| codes.contains(&scans.coupon.code().to_string()));
            *owner != to || !ours
        });
        self.nudge(i);
        Some((rid, to))
    }

    /// Staff of municipality `i`, having checked with the receiver, correct the birth date
    /// of resident `rid` to the receiver's register and hand them over again.
    fn resend(&mut self, i: u32, rid: &str, to: u32) {
        let now = self.clock(Addr::Primary(i));
        let p = &mut self.primaries[i as usize];
        let mut doc = p.docs[rid].load_as(&p.actor);
        let record = read_record(&doc).expect("a resident document");
        if record.transfer.is_some() || record.identity.status != ResidentStatus::Active {
            return;
        }
        if let Some(birth_date) = self.birth_fix.get(&record.person_key).copied()
            && birth_date != record.identity.birth_date
        {
            let identity = Identity { birth_date, ..record.identity.clone() };
            apply(p, rid, &mut doc, &record, &ResidentEvent::IdentityUpdated(identity), now);
        }
        self.move_out(i, to, rid.to_owned(), doc, MOVE_OUT_ACTOR);
    }

    /// `POST /api/v1/handoffs/requests` by staff of municipality `i`: the previous
    /// municipality found no resident matching the ask (its birth date differs from the
    /// register's here). Having checked with it, staff have the register corrected (its
    /// extract updates the resident) and ask again; the new ask replaces the answered one,
    /// at the ledger too.
    fn ask_again(&mut self, i: u32, person_key: &str) {
        let Some(birth_date) = self.ask_fix.get(person_key).copied() else { return };
        let now = self.clock(Addr::Primary(i));
        let p = &mut self.primaries[i as usize];
        let Some(previous) =
            p.asks.get(person_key).filter(|a| a.state == AskLocal::NotFound).map(|a| a.previous)
        else {
            return;
        };
        let Some(rid) = p.by_person.get(person_key).cloned() else { return };
        let mut doc = p.docs[&rid].load_as(&p.actor);
        let record = read_record(&doc).expect("a resident document");
        if record.transfer.is_some() || record.identity.status != ResidentStatus::Active {
            return;
        }
        if record.identity.birth_date != birth_date {
            let identity = Identity { birth_date, ..record.identity.clone() };
            apply(p, &rid, &mut doc, &record, &ResidentEvent::IdentityUpdated(identity), now);
        }
        p.next_serial += 1;
        let ask = Ask {
            ask_id: format!("ask-{}-{}", p.code, p.next_serial),
            birth_check: self.person_secret.birth_check(person_key, birth_date),
            previous,
            state: AskLocal::Asking,
            holder: None,
        };
        p.asks.insert(person_key.to_owned(), ask);
        self.counters.asked_again += 1;
        self.nudge(i);
        self.timer(Addr::Primary(i), Timer::Handoff, 1);
    }

    /// Notes someone who moved in at `i` as resident `rid`, to move them again.
    fn arrived(&mut self, i: u32, rid: String, person_key: &str) {
        match self.first_home.get(person_key) {
            Some(FirstHome { held: Some((t, event_id)), .. }) => {
                self.arrived_held.push((i, rid, *t, event_id.clone()))
            }
            Some(FirstHome { resident, held: None }) => self.arrived.push((i, rid, *resident)),
            None => {}
        }
    }

    // ---- Standby --------------------------------------------------------------------

    /// Asks the primary for changes. The periodic pull (`periodic`) schedules the next one;
    /// a nudge only asks sooner.
    fn pull_tick(&mut self, i: u32, periodic: bool) {
        let s = &mut self.standbys[i as usize];
        if s.sent.is_some_and(|(_, at)| self.now < at + TIMEOUT_MS) {
            if periodic {
                self.timer(Addr::Standby(i), Timer::Pull, TIMEOUT_MS);
            }
            return;
        }
        let puller = s.puller.get_or_insert_with(|| Puller::new(s.checkpoint, 512));
        let request = puller.ask_changes();
        s.page.clear();
        s.whole.clear();
        let idle = if self.healed_at.is_some() { 1_000 } else { s.idle };
        let id = self.request_id();
        self.standbys[i as usize].sent = Some((id, self.now));
        self.send(Addr::Standby(i), Addr::Primary(i), Msg::Pull(id, request));
        if periodic {
            self.timer(Addr::Standby(i), Timer::Pull, idle);
        }
    }

    fn standby_receive(&mut self, i: u32, msg: Msg) {
        match msg {
            Msg::Nudge if self.standbys[i as usize].sent.is_none() => {
                self.timer(Addr::Standby(i), Timer::PullSoon, 100);
            }
            Msg::Pulled(id, response) => {
                let next = self.next_request + 1;
                let s = &mut self.standbys[i as usize];
                // An answer to an older request (late or duplicated) is dropped, as libp2p's
                // request-response drops an answer it no longer waits for.
                if s.sent.is_none_or(|(sent, _)| sent != id) {
                    return;
                }
                let Some(puller) = s.puller.as_mut() else { return };
                s.sent = None;
                let mut page = Page { disk: &s.docs, loaded: &mut s.page, whole: &mut s.whole };
                match puller.on_response(response, &mut page) {
                    Ok(PullStep::Send(request)) => {
                        s.sent = Some((next, self.now));
                        self.next_request = next;
                        self.send(Addr::Standby(i), Addr::Primary(i), Msg::Pull(next, request));
                    }
                    Ok(PullStep::PageComplete { checkpoint, docs, more }) => {
                        let skip = self.config.bug == Some(crate::Bug::SkipPage) && docs.len() > 1;
                        for id in docs.into_iter().filter(|_| !skip) {
                            if let Some(bytes) = s.whole.remove(&id) {
                                s.docs.insert(id, Disk::whole(bytes));
                            } else if let Some(mut doc) = s.page.remove(&id) {
                                s.docs.insert(id, Disk::of(&mut doc));
                            }
                        }
                        s.page.clear();
                        s.whole.clear();
                        s.checkpoint = checkpoint;
                        if more {
                            let request = puller.ask_changes();
                            s.sent = Some((next, self.now));
                            self.next_request = next;
                            self.send(Addr::Standby(i), Addr::Primary(i), Msg::Pull(next, request));
                        }
                    }
                    Err(_) => {
                        // A reordered or duplicated answer: start the page again.
                        s.puller = None;
                        s.page.clear();
                        s.whole.clear();
                    }
                }
            }
            _ => {}
        }
    }

    // ---- National -------------------------------------------------------------------

    fn national_commit(&mut self) {
        let pending = std::mem::take(&mut self.national.pending);
        let mut replies = Vec::new();
        for (from, msg) in pending {
            let Addr::Primary(i) = from else { continue };
            let code = self.codes[i as usize];
            match msg {
                Msg::Report(id, signed) => {
                    let Some(key) =
                        self.directory.directory.primary_of(code).and_then(|e| hex_decode(&e.coupon_key))
                    else {
                        continue;
                    };
                    let Ok(statistics) = signed.open(&key) else { continue };
                    if statistics.municipality() != code {
                        continue;
                    }
                    let version = statistics.version();
                    let slot = (code, statistics.slot());
                    let newer = self.national.reports.get(&slot).is_none_or(|held| held.version() < version);
                    if newer {
                        let statistics = match (self.config.bug, self.national.reports.get(&slot), statistics)
                        {
                            (
                                Some(crate::Bug::AddReports),
                                Some(Statistics::Daily(held)),
                                Statistics::Daily(mut new),
                            ) => {
                                new.doses.extend(held.doses.iter().cloned());
                                Statistics::Daily(new)
                            }
                            (_, _, statistics) => statistics,
                        };
                        self.national.reports.insert(slot, statistics);
                    }
                    replies.push((from, Msg::Reported(id, version)));
                }
                Msg::Sync(id, sync) => {
                    let response = match protocol::ledger::check_size(&sync) {
                        Some(refusal) => refusal,
                        None => {
                            let ledger = &mut self.national.ledger;
                            let writes = protocol::ledger::writes(ledger, code, &sync).unwrap_or(true);
                            let applied = writes.then(|| {
                                let Ok(applied) = protocol::ledger::apply(
                                    ledger,
                                    &self.directory.directory,
                                    code,
                                    &sync,
                                    "2021-06-01T00:00:00Z",
                                );
                                applied
                            });
                            let Ok(response) = protocol::ledger::answer(ledger, code, &sync, applied);
                            response
                        }
                    };
                    replies.push((from, Msg::Synced(id, Box::new(response))));
                }
                _ => {}
            }
        }
        for (to, msg) in replies {
            self.send(Addr::National, to, msg);
        }
    }

    // ---- Settling and checks --------------------------------------------------------

    /// Everything delivered: terminals final, outboxes empty, handoffs accepted, standbys
    /// caught up, the national node holding every municipality's newest figures.
    /// Residents drawn to come, and of them how many the helper thread had built (None:
    /// no helper).
    pub fn built_ahead(&self) -> Option<(u64, u64)> {
        self.prebuild.as_ref().map(|b| b.drawn_and_ready())
    }

    pub(crate) fn settled(&self) -> bool {
        self.terminals.iter().all(|t| t.open.is_empty())
            && self.primaries.iter().all(|p| {
                p.outbox.is_empty()
                    && p.out.values().all(|o| {
                        matches!(o.state, OutState::Accepted | OutState::Refused(_) | OutState::Returned)
                    })
                    && p.accepted_unacked.is_empty()
                    && p.cannot_join.is_empty()
                    && p.returning.is_empty()
                    && p.acked_version >= p.stats_version
                    && p.asks.values().all(|a| !a.is_open())
                    && p.answers.is_empty()
            })
            && self.national.ledger.inbox.is_empty()
            && self.national.ledger.requests.is_empty()
            && self.extracts_pending == 0
            && self.staff_pending == 0
            && self
                .primaries
                .iter()
                .zip(&self.standbys)
                // The checkpoint moves only once a page is stored: at the primary's last feed
                // entry the standby holds everything (a poll may still be in flight).
                .all(|(p, s)| s.checkpoint >= p.seq)
    }

    /// Checks every invariant; returns what does not hold.
    pub fn violations(&self) -> Vec<String> {
        crate::check::violations(self)
    }

    pub(crate) fn national_personal(&self) -> &[String] {
        &self.national.personal
    }

    pub(crate) fn national_reports(&self) -> &BTreeMap<(MunicipalityCode, String), Statistics> {
        &self.national.reports
    }

    pub(crate) fn ledger_persons(&self) -> impl Iterator<Item = &String> {
        self.national.ledger.persons.keys()
    }

    pub(crate) fn refused_handoffs(&self) -> Vec<(String, String)> {
        self.primaries
            .iter()
            .flat_map(|p| p.out.iter())
            .filter_map(|(id, o)| match &o.state {
                OutState::Refused(code) => Some((id.clone(), code.clone())),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn ledger_holder(&self, person_key: &str) -> Option<PersonHolder> {
        self.national.ledger.persons.get(person_key).cloned()
    }

    pub(crate) fn primary_docs(
        &self,
        i: usize,
    ) -> impl Iterator<Item = (&String, Automerge, Vec<ChangeHash>)> {
        self.primaries[i].docs.iter().map(|(id, disk)| {
            let doc = disk.load();
            let mut heads = doc.get_heads();
            heads.sort();
            (id, doc, heads)
        })
    }

    pub(crate) fn standby_heads(&self, i: usize, id: &str) -> Option<Vec<ChangeHash>> {
        self.standbys[i].docs.get(id).map(Disk::heads)
    }

    pub(crate) fn standby_len(&self, i: usize) -> usize {
        self.standbys[i].docs.len()
    }

    pub(crate) fn primary_cells(&self, i: usize) -> &BTreeMap<Cell, i64> {
        &self.primaries[i].cells
    }

    /// Every capture acknowledged: at terminals, and at town halls' desks.
    pub(crate) fn captures(&self) -> impl Iterator<Item = (&String, &CaptureState)> {
        self.terminals
            .iter()
            .flat_map(|t| t.held.iter().map(|(id, h)| (id, &h.state)))
            .chain(self.desk.iter())
    }

    /// Adds the final state of every node to the digest.
    pub fn finish_digest(&mut self) -> String {
        let mut lines = Vec::new();
        for (i, p) in self.primaries.iter().enumerate() {
            lines.push(format!("{} docs={} seq={} v={}", i, p.docs.len(), p.seq, p.stats_version));
            // Heads, not bytes: Automerge's saved bytes are not the same from one process
            // to the next, the changes (and so their hashes) are.
            for (id, disk) in &p.docs {
                let heads: Vec<String> =
                    disk.heads().iter().map(|h| h.to_string()[..16].to_owned()).collect();
                lines.push(format!("{id} {}", heads.join(",")));
            }
        }
        for (i, s) in self.standbys.iter().enumerate() {
            lines.push(format!("standby {i} docs={} checkpoint={}", s.docs.len(), s.checkpoint));
        }
        for ((code, slot), statistics) in &self.national.reports {
            lines.push(format!("report {code} {slot} v{}", statistics.version()));
        }
        for (id, entry) in &self.national.ledger.entries {
            lines.push(format!("ledger {id} {} {} {:?}", entry.from, entry.to, entry.state));
        }
        for line in lines {
            self.trace(&line);
        }
        self.digest()
    }
}

fn refusal(owner: MunicipalityCode, code: &str, message: &str) -> CaptureState {
    CaptureState::Refused {
        owner,
        code: code.to_owned(),
        message_ja: message.to_owned(),
        message_en: message.to_owned(),
    }
}

/// A resident's state before the day: registered, and their coupon issued in bulk (what
/// import and issuance did), as the primary stores it.
pub(crate) struct Resident {
    rid: String,
    record: ResidentRecord,
    event: ResidentEvent,
    doc: Automerge,
    disk: Disk,
    /// The record as the document reads after `event` (what `read_record(&doc)` returns),
    /// so the run's thread does not read back what the helper just wrote.
    ready: ResidentRecord,
}

/// The dose-1 coupon of resident `index` of municipality `code` (serials follow the register).
pub(crate) fn coupon_of(code: MunicipalityCode, index: u64) -> CouponCode {
    CouponCode {
        ticket_kind: 1,
        dose_round: 1,
        municipality: code,
        number: CouponNumber::from_serial(index as u32 + 1).expect("serials fit"),
    }
}

/// Builds resident `index` of municipality `code` as it stood before the day. Depends only
/// on its arguments (the simulator builds some of these on a second core).
pub(crate) fn build_resident(
    code: MunicipalityCode,
    actor: &ActorId,
    index: u64,
    secret: &PersonKeySecret,
) -> Resident {
    let coupon = coupon_of(code, index);
    let identity = identity(index, code);
    let rid = format!("{code}-{index}");
    let person_key = secret.local_person_key(code, &identity.atena_number);
    let record = registered_record(rid.clone(), code, person_key, identity);
    let registered = OPENING - Duration::days(30);
    let mut doc = new_resident_document(actor, &record, registered).expect("a new document");
    let entry = CouponEntry {
        code: coupon,
        generation: 0,
        status: CouponStatus::Valid,
        issued_at: registered,
        status_reason: None,
        used_by_event: None,
    };
    let mut ready = record.clone();
    ready.coupons.insert(entry.key(), entry.clone());
    let event = ResidentEvent::CouponIssued { entry, supersedes: None };
    apply_event(&mut doc, &event, registered).expect("a coupon applies");
    let disk = Disk::of(&mut doc);
    Resident { rid, record, event, doc, disk, ready }
}

/// The index of the resident a coupon number of this run belongs to (`coupon_of`'s
/// inverse), if it is within a population of `pop`.
fn resident_index(number: &CouponNumber, pop: u64) -> Option<u64> {
    let serial = number.as_str()[..9].parse::<u64>().ok()?;
    (serial >= 1 && serial <= pop).then(|| serial - 1)
}

/// The resident `index` of the register of primary `m`, their document ready to change and
/// their record. Created on first use as it stood before the day ([`build_resident`]).
fn open_resident(
    p: &mut Primary,
    m: u32,
    index: u64,
    secret: &PersonKeySecret,
    prebuild: Option<&crate::prebuild::Prebuild>,
    now: OffsetDateTime,
) -> (String, Automerge, ResidentRecord) {
    let number = CouponNumber::from_serial(index as u32 + 1).expect("serials fit");
    if let Some(rid) = p.by_number.get(&number) {
        let doc = p.docs[rid].load_as(&p.actor);
        let record = read_record(&doc).expect("a resident document");
        return (rid.clone(), doc, record);
    }
    let resident = prebuild
        .and_then(|b| b.resident(m, index))
        .unwrap_or_else(|| build_resident(p.code, &p.actor, index, secret));
    let Resident { rid, record, event, doc, disk, ready } = resident;
    // The test builds (CI's seeds) check every resident, not only the unit test's three.
    debug_assert_eq!(
        Some(&ready),
        read_record(&doc).ok().as_ref(),
        "the record built ahead is the document's"
    );
    add_cells(p, record_cells(&record));
    add_cells(p, event_delta(&record, &event, now));
    p.by_number.insert(number, rid.clone());
    p.by_person.insert(record.person_key, rid.clone());
    store_disk(p, &rid, disk);
    (rid, doc, ready)
}

/// One event, one commit: the document, the counters and the change feed together, and (as
/// the node's `Mutation::apply`) a coupon generation superseded or revoked added to the list
/// terminals refuse.
fn apply(
    p: &mut Primary,
    rid: &str,
    doc: &mut Automerge,
    before: &ResidentRecord,
    event: &ResidentEvent,
    now: OffsetDateTime,
) {
    apply_event(doc, event, now).expect("a validated event applies");
    let delta = event_delta(before, event, now);
    if delta.iter().any(|(cell, _)| matches!(cell, Cell::Dose { .. })) {
        p.stats_version += 1;
    }
    add_cells(p, delta);
    store(p, rid, doc);
    let blocked = match event {
        ResidentEvent::CouponIssued { entry, supersedes: Some(old) } => Some((
            old,
            BlockedCoupon { superseded: true, reason: entry.generation.to_string(), moved_to: None },
        )),
        ResidentEvent::CouponRevoked { key, reason } => {
            Some((key, BlockedCoupon { superseded: false, reason: reason.clone(), moved_to: None }))
        }
        _ => None,
    };
    if let Some((key, entry)) = blocked {
        p.blocked.insert(key.clone(), entry);
        p.bundle_version += 1;
        p.bundle = None;
    }
}

/// A resident as the register import creates them: identity only, no history.
fn registered_record(
    resident_id: String,
    municipality: MunicipalityCode,
    person_key: String,
    identity: Identity,
) -> ResidentRecord {
    ResidentRecord {
        schema: SCHEMA_VERSION,
        resident_id,
        municipality,
        person_key,
        identity,
        coupons: BTreeMap::new(),
        doses: BTreeMap::new(),
        corrections: BTreeMap::new(),
        transfer: None,
        arrival: None,
        returns: Vec::new(),
    }
}

/// Issues `p`'s coupon number `serial` for dose `dose_round` to resident `rid` (one commit).
fn issue_coupon(
    p: &mut Primary,
    rid: &str,
    doc: &mut Automerge,
    before: &ResidentRecord,
    dose_round: u8,
    serial: u32,
    now: OffsetDateTime,
) {
    let code = CouponCode {
        ticket_kind: 1,
        dose_round,
        municipality: p.code,
        number: CouponNumber::from_serial(serial).expect("serials fit"),
    };
    let entry = CouponEntry {
        code,
        generation: 0,
        status: CouponStatus::Valid,
        issued_at: now,
        status_reason: None,
        used_by_event: None,
    };
    apply(p, rid, doc, before, &ResidentEvent::CouponIssued { entry, supersedes: None }, now);
    p.by_number.insert(code.number, rid.to_owned());
}

/// `node/src/handoff.rs` `finish_accept`: a history asked for has arrived.
fn received(p: &mut Primary, person_key: &str) {
    if let Some(ask) = p.asks.get_mut(person_key) {
        ask.state = AskLocal::Received;
    }
}

fn add_cells(p: &mut Primary, delta: Vec<(Cell, i64)>) {
    for (cell, n) in delta {
        *p.cells.entry(cell).or_default() += n;
    }
}

fn store(p: &mut Primary, rid: &str, doc: &mut Automerge) {
    store_disk(p, rid, Disk::of(doc));
}

fn store_disk(p: &mut Primary, rid: &str, disk: Disk) {
    p.docs.insert(rid.to_owned(), disk);
    p.seq += 1;
    if let Some(old) = p.feed_of.insert(rid.to_owned(), p.seq) {
        p.feed.remove(&old);
    }
    p.feed.insert(p.seq, rid.to_owned());
}

/// A standby's page: documents loaded from its disk as the puller asks for them, and
/// documents that arrived whole, kept as the bytes that came (as the node stores them).
struct Page<'a> {
    disk: &'a BTreeMap<String, Disk>,
    loaded: &'a mut BTreeMap<String, Automerge>,
    whole: &'a mut BTreeMap<String, Vec<u8>>,
}

impl PageDocs for Page<'_> {
    /// `node/src/p2p.rs` `PulledDocs::put_whole`: a document the standby does not hold is
    /// kept as the bytes that arrived, not loaded.
    fn put_whole(&mut self, doc_id: &str, bytes: Vec<u8>) -> Result<(), String> {
        let incoming = || Automerge::load(&bytes).map_err(|e| e.to_string());
        match self.loaded.get_mut(doc_id) {
            Some(doc) if !doc.get_heads().is_empty() => {
                doc.merge(&mut incoming()?).map_err(|e| e.to_string())?;
            }
            _ if self.disk.contains_key(doc_id) => {
                let mut doc = self.disk[doc_id].load();
                doc.merge(&mut incoming()?).map_err(|e| e.to_string())?;
                self.loaded.insert(doc_id.to_owned(), doc);
            }
            _ => {
                self.loaded.remove(doc_id);
                self.whole.insert(doc_id.to_owned(), bytes);
            }
        }
        Ok(())
    }

    fn doc_mut(&mut self, doc_id: &str) -> &mut Automerge {
        if let Some(bytes) = self.whole.remove(doc_id) {
            // Asked about again after arriving whole (as `PulledDocs` does): load it now.
            self.loaded.insert(doc_id.to_owned(), Automerge::load(&bytes).unwrap_or_default());
        }
        if !self.loaded.contains_key(doc_id) {
            let doc = self.disk.get(doc_id).map_or_else(Automerge::new, Disk::load);
            self.loaded.insert(doc_id.to_owned(), doc);
        }
        self.loaded.get_mut(doc_id).expect("just loaded")
    }
}

/// The primary's documents, answering a standby.
struct Source<'a>(&'a BTreeMap<String, Disk>);

impl SourceDocs for Source<'_> {
    fn doc(&mut self, doc_id: &str) -> Option<Automerge> {
        self.0.get(doc_id).map(Disk::load)
    }

    fn stored_bytes(&mut self, doc_id: &str) -> Option<Vec<u8>> {
        self.0.get(doc_id).map(|d| d.bytes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_traced_as_debug_prints_it() {
        for addr in [Addr::National, Addr::Primary(0), Addr::Standby(1740), Addr::Terminal(u32::MAX)] {
            let mut out = String::from("x");
            addr.write_to(&mut out);
            assert_eq!(out, format!("x{addr:?}"));
        }
    }

    /// `open_resident` hands the run's thread the record the helper computed instead of
    /// reading it back from the document: it must be exactly what the document reads.
    #[test]
    fn a_resident_built_ahead_carries_the_record_its_document_reads() {
        let secret = PersonKeySecret::new(&[7; 32]);
        let actor = ActorId::from(&[1_u8; 16][..]);
        for (code, index) in [("141003", 0), ("131016", 41), ("011002", 999_999)] {
            let resident = build_resident(code.parse().expect("a code"), &actor, index, &secret);
            assert_eq!(resident.ready, read_record(&resident.doc).expect("a resident document"));
            assert_eq!(resident.ready.coupons.len(), 1);
            assert!(resident.record.coupons.is_empty(), "the record before the coupon was issued");
        }
    }
}
