//! The national relocation ledger and relay. It holds, per handoff, the person key, the two
//! municipalities, the state and the times, and the sealed envelope until the receiver has
//! accepted it — never a payload in clear: the national node has no key that opens one.
//!
//! One owner per person key: a handoff is stored only from the municipality the ledger says
//! holds the person (or, for a person the ledger has never seen, from whoever first hands
//! them on), and never while another handoff of the same person is in transit. Accepting
//! moves the holder to the receiver. Every operation is idempotent, so a municipal node
//! that repeats a sync after a crash changes nothing.

use anyhow::Context;
use protocol::directory::Directory;
use protocol::handoff::{
    AskState, DepositOutcome, HandoffResponse, HandoffSync, HistoryRequest, LedgerState,
    MAX_HANDOFFS_PER_MESSAGE, SealedHandoff,
};
use protocol::municipality::MunicipalityCode;
use protocol::person::hex_decode;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// handoff id → JSON of [`LedgerEntry`].
pub const LEDGER: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_handoffs");
/// person key → JSON of [`PersonHolder`].
pub const LEDGER_PERSONS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_persons");
/// (receiver, sequence) → handoff id: handoffs waiting for their receiver, oldest first.
pub const LEDGER_INBOX: TableDefinition<(&str, u64), &str> = TableDefinition::new("ledger_inbox");
/// Counters (`inbox_seq`).
pub const LEDGER_META: TableDefinition<&str, u64> = TableDefinition::new("ledger_meta");
/// (person key, asking municipality) → JSON of [`AskRecord`].
pub const LEDGER_ASKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("ledger_asks");
/// (holder, person key, asking municipality) → the ask's birth check: requests waiting for
/// the holder.
pub const LEDGER_REQUESTS: TableDefinition<(&str, &str, &str), &str> =
    TableDefinition::new("ledger_requests");

/// One handoff in the ledger.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The handoff.
    pub handoff_id: String,
    /// The person key.
    pub person_key: String,
    /// Sender.
    pub from: MunicipalityCode,
    /// Receiver.
    pub to: MunicipalityCode,
    /// In transit or accepted.
    pub state: LedgerState,
    /// When the sender deposited it.
    pub deposited_at: String,
    /// When the receiver accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<String>,
    /// The envelope (ciphertext), until accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedHandoff>,
    /// Its place in the receiver's inbox, until accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox_seq: Option<u64>,
}

/// Who holds a person, per the ledger.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersonHolder {
    /// The municipality (the receiver of the newest handoff).
    pub holder: MunicipalityCode,
    /// The handoff not yet accepted, if one is in transit.
    pub in_transit: Option<String>,
}

/// A newcomer's history asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// Creates the ledger's tables.
pub fn create_tables(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(LEDGER)?;
    txn.open_table(LEDGER_PERSONS)?;
    txn.open_table(LEDGER_INBOX)?;
    txn.open_table(LEDGER_META)?;
    txn.open_table(LEDGER_ASKS)?;
    txn.open_table(LEDGER_REQUESTS)?;
    txn.commit()?;
    Ok(())
}

fn get<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> anyhow::Result<Option<T>> {
    table
        .get(key)?
        .map(|v| serde_json::from_slice(v.value()).with_context(|| format!("ledger value {key}")))
        .transpose()
}

fn refused(code: &str, message: String) -> DepositOutcome {
    DepositOutcome::Refused { code: code.to_owned(), message }
}

/// Handles one sync of municipality `sender` (the caller checked the peer is its primary
/// in `directory`): stores deposits, acceptances, asks and answers in one commit, then
/// answers what is waiting for it.
pub fn sync(
    db: &Database,
    directory: &Directory,
    sender: MunicipalityCode,
    request: &HandoffSync,
    now: OffsetDateTime,
) -> anyhow::Result<HandoffResponse> {
    let limit = 4 * MAX_HANDOFFS_PER_MESSAGE;
    if request.deposits.len() > MAX_HANDOFFS_PER_MESSAGE
        || request.accepted.len() > limit
        || request.watching.len() > limit
        || request.asks.len() > MAX_HANDOFFS_PER_MESSAGE
        || request.answered.len() > limit
    {
        return Ok(HandoffResponse::Refused {
            code: "too_large".into(),
            message: format!("at most {MAX_HANDOFFS_PER_MESSAGE} deposits and asks per sync"),
        });
    }
    let at = crate::clock::rfc3339(now);
    let own = sender.as_str();
    // Asks already recorded are answered from a read; only new ones are written.
    let new_asks = {
        let txn = db.begin_read()?;
        let table = txn.open_table(LEDGER_ASKS)?;
        let mut any = false;
        for ask in &request.asks {
            let held = table.get((ask.person_key.as_str(), own))?;
            let same = held
                .map(|v| serde_json::from_slice::<AskRecord>(v.value()))
                .transpose()?
                .is_some_and(|r| r.ask_id == ask.ask_id);
            any |= !same;
        }
        any
    };
    let writes = !(request.deposits.is_empty()
        && request.accepted.is_empty()
        && !new_asks
        && request.answered.is_empty());
    let mut deposits = Vec::with_capacity(request.deposits.len());
    let mut asks = Vec::with_capacity(request.asks.len());
    if writes {
        let txn = db.begin_write()?;
        {
            let mut ledger = txn.open_table(LEDGER)?;
            let mut persons = txn.open_table(LEDGER_PERSONS)?;
            let mut inbox = txn.open_table(LEDGER_INBOX)?;
            let mut meta = txn.open_table(LEDGER_META)?;
            let mut ask_table = txn.open_table(LEDGER_ASKS)?;
            let mut requests = txn.open_table(LEDGER_REQUESTS)?;
            // Acceptances first: a handoff accepted in this sync frees the person for a
            // deposit in the same sync.
            for id in &request.accepted {
                let Some(mut entry) = get::<LedgerEntry>(&ledger, id)? else { continue };
                if entry.to != sender || entry.state == LedgerState::Accepted {
                    continue;
                }
                entry.state = LedgerState::Accepted;
                entry.accepted_at = Some(at.clone());
                entry.sealed = None;
                if let Some(seq) = entry.inbox_seq.take() {
                    inbox.remove((own, seq))?;
                }
                ledger.insert(id.as_str(), serde_json::to_vec(&entry)?.as_slice())?;
                let holder = PersonHolder { holder: sender, in_transit: None };
                persons.insert(entry.person_key.as_str(), serde_json::to_vec(&holder)?.as_slice())?;
            }
            for sealed in &request.deposits {
                let mut tables =
                    Tables { ledger: &mut ledger, persons: &mut persons, inbox: &mut inbox, meta: &mut meta };
                let outcome = deposit(directory, sender, sealed, &at, &mut tables)?;
                if outcome == DepositOutcome::Stored {
                    // A newcomer request this handoff answers.
                    let key = (sealed.person_key.as_str(), sealed.to.as_str());
                    let record = ask_table.get(key)?.map(|v| serde_json::from_slice::<AskRecord>(v.value()));
                    if let Some(mut record) = record.transpose()? {
                        record.state = AskState::Sent { handoff_id: sealed.handoff_id.clone() };
                        ask_table.insert(key, serde_json::to_vec(&record)?.as_slice())?;
                    }
                    requests.remove((own, sealed.person_key.as_str(), sealed.to.as_str()))?;
                }
                deposits.push((sealed.handoff_id.clone(), outcome));
            }
            for answer in &request.answered {
                let key = (answer.person_key.as_str(), answer.asked_by.as_str());
                let record = ask_table.get(key)?.map(|v| serde_json::from_slice::<AskRecord>(v.value()));
                if let Some(mut record) = record.transpose()?
                    && record.holder == sender
                    && record.state == (AskState::Waiting { holder: sender })
                {
                    record.state = match &answer.handoff_id {
                        Some(id) => AskState::Sent { handoff_id: id.clone() },
                        None => AskState::NotFound,
                    };
                    ask_table.insert(key, serde_json::to_vec(&record)?.as_slice())?;
                }
                requests.remove((own, answer.person_key.as_str(), answer.asked_by.as_str()))?;
            }
            for ask in &request.asks {
                let key = (ask.person_key.as_str(), own);
                let held = ask_table.get(key)?.map(|v| serde_json::from_slice::<AskRecord>(v.value()));
                match held.transpose()? {
                    Some(record) if record.ask_id == ask.ask_id => {
                        asks.push((ask.person_key.clone(), record.state));
                        continue;
                    }
                    // A new ask replaces an older one (asked again, or the person returns).
                    Some(record) => {
                        requests.remove((record.holder.as_str(), ask.person_key.as_str(), own))?;
                    }
                    None => {}
                }
                let holder = match get::<PersonHolder>(&persons, &ask.person_key)? {
                    Some(held) if held.holder == sender => {
                        // Already handed here (or on its way): the handoff answers the ask.
                        let state = match held.in_transit {
                            Some(id) => AskState::Sent { handoff_id: id },
                            None => AskState::NotFound,
                        };
                        asks.push((ask.person_key.clone(), state));
                        continue;
                    }
                    Some(held) => Some(held.holder),
                    None => ask.previous.filter(|p| *p != sender && directory.primary_of(*p).is_some()),
                };
                let Some(holder) = holder else {
                    asks.push((ask.person_key.clone(), AskState::NotFound));
                    continue;
                };
                let record = AskRecord {
                    ask_id: ask.ask_id.clone(),
                    holder,
                    state: AskState::Waiting { holder },
                    asked_at: at.clone(),
                };
                ask_table.insert(key, serde_json::to_vec(&record)?.as_slice())?;
                requests.insert((holder.as_str(), ask.person_key.as_str(), own), ask.birth_check.as_str())?;
                asks.push((ask.person_key.clone(), record.state));
            }
        }
        txn.commit().context("the ledger's commit failed")?;
        if !request.deposits.is_empty() {
            crate::handoff::crash_point("ledger.deposited");
        }
        if !request.accepted.is_empty() {
            crate::handoff::crash_point("ledger.accepted");
        }
    }
    let txn = db.begin_read()?;
    if !writes {
        let table = txn.open_table(LEDGER_ASKS)?;
        for ask in &request.asks {
            if let Some(record) = get_ask(&table, &ask.person_key, own)? {
                asks.push((ask.person_key.clone(), record.state));
            }
        }
    }
    let ledger = txn.open_table(LEDGER)?;
    let inbox_table = txn.open_table(LEDGER_INBOX)?;
    let mut inbound = Vec::new();
    for row in inbox_table.range((own, 0)..=(own, u64::MAX))? {
        let (_, id) = row?;
        if inbound.len() >= MAX_HANDOFFS_PER_MESSAGE {
            break;
        }
        if let Some(sealed) = get::<LedgerEntry>(&ledger, id.value())?.and_then(|e| e.sealed) {
            inbound.push(sealed);
        }
    }
    let mut states = Vec::with_capacity(request.watching.len());
    for id in &request.watching {
        let state = match get::<LedgerEntry>(&ledger, id)? {
            Some(entry) if entry.from == sender => entry.state,
            _ => LedgerState::Unknown,
        };
        states.push((id.clone(), state));
    }
    let request_table = txn.open_table(LEDGER_REQUESTS)?;
    let mut requests = Vec::new();
    for row in request_table.range((own, "", "")..)? {
        let (key, check) = row?;
        let (holder, person_key, asked_by) = key.value();
        if holder != own || requests.len() >= MAX_HANDOFFS_PER_MESSAGE {
            break;
        }
        if let Ok(asked_by) = MunicipalityCode::parse(asked_by) {
            requests.push(HistoryRequest {
                person_key: person_key.to_owned(),
                birth_check: check.value().to_owned(),
                asked_by,
            });
        }
    }
    Ok(HandoffResponse::Synced { deposits, inbound, states, asks, requests })
}

fn get_ask(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    person_key: &str,
    asker: &str,
) -> anyhow::Result<Option<AskRecord>> {
    table
        .get((person_key, asker))?
        .map(|v| serde_json::from_slice(v.value()).context("ledger ask"))
        .transpose()
}

/// The ledger's tables, open in one write transaction.
struct Tables<'a, 't> {
    ledger: &'a mut redb::Table<'t, &'static str, &'static [u8]>,
    persons: &'a mut redb::Table<'t, &'static str, &'static [u8]>,
    inbox: &'a mut redb::Table<'t, (&'static str, u64), &'static str>,
    meta: &'a mut redb::Table<'t, &'static str, u64>,
}

fn deposit(
    directory: &Directory,
    sender: MunicipalityCode,
    sealed: &SealedHandoff,
    at: &str,
    tables: &mut Tables<'_, '_>,
) -> anyhow::Result<DepositOutcome> {
    let Tables { ledger, persons, inbox, meta } = tables;
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
    if let Some(held) = get::<LedgerEntry>(&**ledger, &sealed.handoff_id)? {
        let same = held.from == sealed.from && held.to == sealed.to && held.person_key == sealed.person_key;
        return Ok(if same {
            DepositOutcome::Stored
        } else {
            refused("id_reused", format!("handoff id {} names another handoff", sealed.handoff_id))
        });
    }
    if let Some(held) = get::<PersonHolder>(&**persons, &sealed.person_key)? {
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
    let entry = LedgerEntry {
        handoff_id: sealed.handoff_id.clone(),
        person_key: sealed.person_key.clone(),
        from: sealed.from,
        to: sealed.to,
        state: LedgerState::InTransit,
        deposited_at: at.to_owned(),
        accepted_at: None,
        sealed: Some(sealed.clone()),
        inbox_seq: Some(meta.get("inbox_seq")?.map_or(0, |v| v.value()) + 1),
    };
    let seq = entry.inbox_seq.unwrap_or_default();
    meta.insert("inbox_seq", seq)?;
    ledger.insert(sealed.handoff_id.as_str(), serde_json::to_vec(&entry)?.as_slice())?;
    let holder = PersonHolder { holder: sealed.to, in_transit: Some(sealed.handoff_id.clone()) };
    persons.insert(sealed.person_key.as_str(), serde_json::to_vec(&holder)?.as_slice())?;
    inbox.insert((sealed.to.as_str(), seq), sealed.handoff_id.as_str())?;
    Ok(DepositOutcome::Stored)
}

/// The ledger's entries involving `municipality` (or all), newest deposit last, without
/// envelopes: what the national admin sees.
pub fn entries(db: &Database, municipality: Option<MunicipalityCode>) -> anyhow::Result<Vec<LedgerEntry>> {
    let txn = db.begin_read()?;
    let ledger = txn.open_table(LEDGER)?;
    let mut out = Vec::new();
    for row in ledger.iter()? {
        let (_, value) = row?;
        let mut entry: LedgerEntry = serde_json::from_slice(value.value())?;
        if municipality.is_none_or(|m| entry.from == m || entry.to == m) {
            entry.sealed = None;
            out.push(entry);
        }
    }
    out.sort_by(|a, b| a.deposited_at.cmp(&b.deposited_at));
    Ok(out)
}

/// Who holds a person key, per the ledger.
pub fn holder(db: &Database, person_key: &str) -> anyhow::Result<Option<PersonHolder>> {
    let txn = db.begin_read()?;
    get(&txn.open_table(LEDGER_PERSONS)?, person_key)
}
