//! The national relocation ledger's rules, without storage: what a municipal primary's
//! [`HandoffSync`] does to the ledger and what it is answered. The national node runs them
//! over its redb tables; the simulator runs them over maps.
//!
//! The ledger holds, per handoff, the person key, the two municipalities, the state and the
//! times, and the sealed envelope until the receiver has accepted it — never a payload in
//! clear: the national node has no key that opens one.
//!
//! One owner per person key: a handoff is stored only from the municipality the ledger says
//! holds the person (or, for a person the ledger has never seen, from whoever first hands
//! them on), and never while another handoff of the same person is in transit. Accepting
//! moves the holder to the receiver. Every operation is idempotent, so a municipal node
//! that repeats a sync after a crash changes nothing.

use serde::{Deserialize, Serialize};

use crate::directory::Directory;
use crate::handoff::{
    AskState, DepositOutcome, HandoffResponse, HandoffSync, HistoryRequest, LedgerState,
    MAX_HANDOFFS_PER_MESSAGE, ReturnReason, SealedHandoff,
};
use crate::municipality::MunicipalityCode;
use crate::person::hex_decode;

/// One handoff in the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The handoff.
    pub handoff_id: String,
    /// The person key.
    pub person_key: String,
    /// Sender.
    pub from: MunicipalityCode,
    /// Receiver.
    pub to: MunicipalityCode,
    /// In transit, accepted or sent back.
    pub state: LedgerState,
    /// When the sender deposited it.
    pub deposited_at: String,
    /// When the receiver accepted it, or sent it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<String>,
    /// The envelope (ciphertext), until accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedHandoff>,
    /// Its place in the receiver's inbox, until accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox_seq: Option<u64>,
    /// Why the receiver sent it back, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned: Option<ReturnReason>,
}

/// Who holds a person, per the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonHolder {
    /// The municipality (the receiver of the newest handoff).
    pub holder: MunicipalityCode,
    /// The handoff not yet accepted, if one is in transit.
    pub in_transit: Option<String>,
}

/// A newcomer's history asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskRecord {
    /// The asker's id for it.
    #[serde(default)]
    pub ask_id: String,
    /// Who was asked to hand them over.
    pub holder: MunicipalityCode,
    /// Where it stands.
    pub state: AskState,
    /// When asked.
    pub asked_at: String,
}

/// What the ledger reads. Errors are the store's own.
pub trait LedgerRead {
    /// The store's error.
    type Error;
    /// A handoff by id.
    fn entry(&self, handoff_id: &str) -> Result<Option<LedgerEntry>, Self::Error>;
    /// Who holds a person key.
    fn holder(&self, person_key: &str) -> Result<Option<PersonHolder>, Self::Error>;
    /// The ask `asker` made for a person key.
    fn ask(&self, person_key: &str, asker: MunicipalityCode) -> Result<Option<AskRecord>, Self::Error>;
    /// The ids of handoffs waiting for `receiver`, oldest first, at most `limit`.
    fn inbox(&self, receiver: MunicipalityCode, limit: usize) -> Result<Vec<String>, Self::Error>;
    /// Requests waiting for `holder`, at most `limit`.
    fn requests(&self, holder: MunicipalityCode, limit: usize) -> Result<Vec<HistoryRequest>, Self::Error>;
}

/// What the ledger writes. A caller applies one sync in one atomic commit.
pub trait LedgerWrite: LedgerRead {
    /// Stores a handoff (replacing the stored one).
    fn put_entry(&mut self, entry: &LedgerEntry) -> Result<(), Self::Error>;
    /// Stores who holds a person key.
    fn put_holder(&mut self, person_key: &str, holder: &PersonHolder) -> Result<(), Self::Error>;
    /// Stores an ask.
    fn put_ask(
        &mut self,
        person_key: &str,
        asker: MunicipalityCode,
        ask: &AskRecord,
    ) -> Result<(), Self::Error>;
    /// The next inbox sequence number (a counter over all receivers, never reused).
    fn next_inbox_seq(&mut self) -> Result<u64, Self::Error>;
    /// Adds a handoff to `receiver`'s inbox at `seq`.
    fn inbox_insert(
        &mut self,
        receiver: MunicipalityCode,
        seq: u64,
        handoff_id: &str,
    ) -> Result<(), Self::Error>;
    /// Removes a handoff from `receiver`'s inbox.
    fn inbox_remove(&mut self, receiver: MunicipalityCode, seq: u64) -> Result<(), Self::Error>;
    /// Records a request for `holder` to hand over a person to `asker`.
    fn put_request(
        &mut self,
        holder: MunicipalityCode,
        person_key: &str,
        asker: MunicipalityCode,
        birth_check: &str,
    ) -> Result<(), Self::Error>;
    /// Forgets a request.
    fn remove_request(
        &mut self,
        holder: MunicipalityCode,
        person_key: &str,
        asker: MunicipalityCode,
    ) -> Result<(), Self::Error>;
}

/// Why a sync is refused as a whole, before anything is read.
pub fn check_size(request: &HandoffSync) -> Option<HandoffResponse> {
    let limit = 4 * MAX_HANDOFFS_PER_MESSAGE;
    let too_large = request.deposits.len() > MAX_HANDOFFS_PER_MESSAGE
        || request.accepted.len() > limit
        || request.watching.len() > limit
        || request.asks.len() > MAX_HANDOFFS_PER_MESSAGE
        || request.answered.len() > limit
        || request.returned.len() > limit;
    too_large.then(|| HandoffResponse::Refused {
        code: "too_large".into(),
        message: format!("at most {MAX_HANDOFFS_PER_MESSAGE} deposits and asks per sync"),
    })
}

/// Whether the sync changes the ledger. When it does not, the caller answers from a read
/// ([`answer`] with no [`Applied`]) without a write transaction.
pub fn writes<S: LedgerRead>(
    store: &S,
    sender: MunicipalityCode,
    request: &HandoffSync,
) -> Result<bool, S::Error> {
    if !(request.deposits.is_empty()
        && request.accepted.is_empty()
        && request.answered.is_empty()
        && request.returned.is_empty())
    {
        return Ok(true);
    }
    for ask in &request.asks {
        let same = store.ask(&ask.person_key, sender)?.is_some_and(|r| r.ask_id == ask.ask_id);
        if !same {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What [`apply`] decided, for [`answer`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// One outcome per deposit, in order.
    pub deposits: Vec<(String, DepositOutcome)>,
    /// Each ask's state, by person key.
    pub asks: Vec<(String, AskState)>,
}

/// Whether the ledger may store a deposit it refused with `code` later, sent again as it is:
/// another handoff of the person not yet accepted, or a directory not yet updated. Every
/// other refusal is for good.
pub fn is_retryable(code: &str) -> bool {
    matches!(code, "in_transit" | "unknown_receiver" | "unknown_sender")
}

fn refused(code: &str, message: String) -> DepositOutcome {
    DepositOutcome::Refused { code: code.to_owned(), message }
}

/// Applies one sync of municipality `sender` (the caller checked the peer is its primary in
/// `directory`): acceptances and handoffs sent back first (either frees the person for a
/// deposit in the same sync), then deposits, answers to requests, and asks.
///
/// A handoff sent back goes back to its sender only while it is in transit: one the
/// receiver accepted stays accepted (the receiver's node never sends back what it accepted,
/// so this is a repeat of an older message).
pub fn apply<S: LedgerWrite>(
    store: &mut S,
    directory: &Directory,
    sender: MunicipalityCode,
    request: &HandoffSync,
    at: &str,
) -> Result<Applied, S::Error> {
    let mut applied = Applied::default();
    for id in &request.accepted {
        let Some(mut entry) = store.entry(id)? else { continue };
        // Accepted already (a repeat), or sent back: the receiver no longer holds it.
        if entry.to != sender || entry.state != LedgerState::InTransit {
            continue;
        }
        entry.state = LedgerState::Accepted;
        entry.accepted_at = Some(at.to_owned());
        entry.sealed = None;
        if let Some(seq) = entry.inbox_seq.take() {
            store.inbox_remove(sender, seq)?;
        }
        store.put_entry(&entry)?;
        store.put_holder(&entry.person_key, &PersonHolder { holder: sender, in_transit: None })?;
    }
    for back in &request.returned {
        let Some(mut entry) = store.entry(&back.handoff_id)? else { continue };
        if entry.to != sender || entry.state != LedgerState::InTransit {
            continue;
        }
        entry.state = LedgerState::Returned;
        // A receiver gives one of its own reasons; the ledger's refusal is not one of them.
        let reason = if ReturnReason::ALL.contains(&back.reason) { back.reason } else { ReturnReason::Other };
        entry.returned = Some(reason);
        entry.accepted_at = Some(at.to_owned());
        entry.sealed = None;
        if let Some(seq) = entry.inbox_seq.take() {
            store.inbox_remove(sender, seq)?;
        }
        store.put_entry(&entry)?;
        store.put_holder(&entry.person_key, &PersonHolder { holder: entry.from, in_transit: None })?;
    }
    for sealed in &request.deposits {
        let outcome = deposit(store, directory, sender, sealed, at)?;
        if outcome == DepositOutcome::Stored {
            // A newcomer request this handoff answers.
            if let Some(mut record) = store.ask(&sealed.person_key, sealed.to)? {
                record.state = AskState::Sent { handoff_id: sealed.handoff_id.clone() };
                store.put_ask(&sealed.person_key, sealed.to, &record)?;
            }
            store.remove_request(sender, &sealed.person_key, sealed.to)?;
        }
        applied.deposits.push((sealed.handoff_id.clone(), outcome));
    }
    for answer in &request.answered {
        if let Some(mut record) = store.ask(&answer.person_key, answer.asked_by)?
            && record.holder == sender
            && record.state == (AskState::Waiting { holder: sender })
        {
            record.state = match &answer.handoff_id {
                Some(id) => AskState::Sent { handoff_id: id.clone() },
                None => AskState::NotFound,
            };
            store.put_ask(&answer.person_key, answer.asked_by, &record)?;
        }
        store.remove_request(sender, &answer.person_key, answer.asked_by)?;
    }
    for ask in &request.asks {
        match store.ask(&ask.person_key, sender)? {
            Some(record) if record.ask_id == ask.ask_id => {
                applied.asks.push((ask.person_key.clone(), record.state));
                continue;
            }
            // A new ask replaces an older one (asked again, or the person returns).
            Some(record) => store.remove_request(record.holder, &ask.person_key, sender)?,
            None => {}
        }
        let holder = match store.holder(&ask.person_key)? {
            Some(held) if held.holder == sender => {
                // Already handed here (or on its way): the handoff answers the ask.
                let state = match held.in_transit {
                    Some(id) => AskState::Sent { handoff_id: id },
                    None => AskState::NotFound,
                };
                applied.asks.push((ask.person_key.clone(), state));
                continue;
            }
            Some(held) => Some(held.holder),
            None => ask.previous.filter(|p| *p != sender && directory.primary_of(*p).is_some()),
        };
        let Some(holder) = holder else {
            applied.asks.push((ask.person_key.clone(), AskState::NotFound));
            continue;
        };
        let record = AskRecord {
            ask_id: ask.ask_id.clone(),
            holder,
            state: AskState::Waiting { holder },
            asked_at: at.to_owned(),
        };
        store.put_ask(&ask.person_key, sender, &record)?;
        store.put_request(holder, &ask.person_key, sender, &ask.birth_check)?;
        applied.asks.push((ask.person_key.clone(), record.state));
    }
    Ok(applied)
}

fn deposit<S: LedgerWrite>(
    store: &mut S,
    directory: &Directory,
    sender: MunicipalityCode,
    sealed: &SealedHandoff,
    at: &str,
) -> Result<DepositOutcome, S::Error> {
    if sealed.from != sender {
        return Ok(refused(
            "wrong_municipality",
            format!("{sender} deposited a handoff from {}", sealed.from),
        ));
    }
    let Some(key) = directory.primary_of(sender).and_then(|e| hex_decode(&e.coupon_key)) else {
        return Ok(refused("unknown_sender", format!("{sender} has no key in the directory")));
    };
    if let Err(error) = sealed.verify(&key) {
        return Ok(refused(error.code(), error.to_string()));
    }
    if directory.primary_of(sealed.to).is_none_or(|e| e.encryption_key.is_empty()) {
        return Ok(refused("unknown_receiver", format!("{} is not in the directory", sealed.to)));
    }
    if let Some(held) = store.entry(&sealed.handoff_id)? {
        let same = held.from == sealed.from && held.to == sealed.to && held.person_key == sealed.person_key;
        return Ok(if same {
            DepositOutcome::Stored
        } else {
            refused("id_reused", format!("handoff id {} names another handoff", sealed.handoff_id))
        });
    }
    if let Some(held) = store.holder(&sealed.person_key)? {
        if let Some(other) = &held.in_transit {
            return Ok(refused(
                "in_transit",
                format!("this person is already being handed to {} ({other})", held.holder),
            ));
        }
        if held.holder != sender {
            return Ok(refused("not_holder", format!("the ledger says {} holds this person", held.holder)));
        }
    }
    let seq = store.next_inbox_seq()?;
    let entry = LedgerEntry {
        handoff_id: sealed.handoff_id.clone(),
        person_key: sealed.person_key.clone(),
        from: sealed.from,
        to: sealed.to,
        state: LedgerState::InTransit,
        deposited_at: at.to_owned(),
        accepted_at: None,
        sealed: Some(sealed.clone()),
        inbox_seq: Some(seq),
        returned: None,
    };
    store.put_entry(&entry)?;
    let holder = PersonHolder { holder: sealed.to, in_transit: Some(sealed.handoff_id.clone()) };
    store.put_holder(&sealed.person_key, &holder)?;
    store.inbox_insert(sealed.to, seq, &sealed.handoff_id)?;
    Ok(DepositOutcome::Stored)
}

/// The answer to a sync, read after [`apply`] committed (`applied`), or, when the sync wrote
/// nothing, from a read alone (`None`: the asks' states are read).
pub fn answer<S: LedgerRead>(
    store: &S,
    sender: MunicipalityCode,
    request: &HandoffSync,
    applied: Option<Applied>,
) -> Result<HandoffResponse, S::Error> {
    let Applied { deposits, asks } = match applied {
        Some(applied) => applied,
        None => {
            let mut asks = Vec::new();
            for ask in &request.asks {
                if let Some(record) = store.ask(&ask.person_key, sender)? {
                    asks.push((ask.person_key.clone(), record.state));
                }
            }
            Applied { deposits: Vec::new(), asks }
        }
    };
    let mut inbound = Vec::new();
    for id in store.inbox(sender, MAX_HANDOFFS_PER_MESSAGE)? {
        if let Some(sealed) = store.entry(&id)?.and_then(|e| e.sealed) {
            inbound.push(sealed);
        }
    }
    let mut states = Vec::with_capacity(request.watching.len());
    let mut returns = Vec::new();
    for id in &request.watching {
        let state = match store.entry(id)? {
            Some(entry) if entry.from == sender => {
                if let Some(reason) = entry.returned {
                    returns.push((id.clone(), reason));
                }
                entry.state
            }
            _ => LedgerState::Unknown,
        };
        states.push((id.clone(), state));
    }
    let requests = store.requests(sender, MAX_HANDOFFS_PER_MESSAGE)?;
    Ok(HandoffResponse::Synced { deposits, inbound, states, asks, requests, returns })
}
