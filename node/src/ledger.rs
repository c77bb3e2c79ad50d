//! The national relocation ledger and relay on redb: the rules of [`protocol::ledger`] (one
//! holder per person key, idempotent syncs, envelopes kept only until accepted) over the
//! national node's tables, one commit per sync that changes anything.

use anyhow::Context;
use protocol::directory::Directory;
use protocol::handoff::{HandoffResponse, HandoffSync, HistoryRequest};
use protocol::ledger::{self, AskRecord, LedgerRead, LedgerWrite};
pub use protocol::ledger::{LedgerEntry, PersonHolder};
use protocol::municipality::MunicipalityCode;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
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

/// The ledger's tables, read-only or open in one write transaction.
struct Tables<L, P, I, A, R> {
    ledger: L,
    persons: P,
    inbox: I,
    asks: A,
    requests: R,
}

impl<L, P, I, A, R> LedgerRead for Tables<L, P, I, A, R>
where
    L: ReadableTable<&'static str, &'static [u8]>,
    P: ReadableTable<&'static str, &'static [u8]>,
    I: ReadableTable<(&'static str, u64), &'static str>,
    A: ReadableTable<(&'static str, &'static str), &'static [u8]>,
    R: ReadableTable<(&'static str, &'static str, &'static str), &'static str>,
{
    type Error = anyhow::Error;

    fn entry(&self, handoff_id: &str) -> anyhow::Result<Option<LedgerEntry>> {
        get(&self.ledger, handoff_id)
    }

    fn holder(&self, person_key: &str) -> anyhow::Result<Option<PersonHolder>> {
        get(&self.persons, person_key)
    }

    fn ask(&self, person_key: &str, asker: MunicipalityCode) -> anyhow::Result<Option<AskRecord>> {
        self.asks
            .get((person_key, asker.as_str()))?
            .map(|v| serde_json::from_slice(v.value()).context("ledger ask"))
            .transpose()
    }

    fn inbox(&self, receiver: MunicipalityCode, limit: usize) -> anyhow::Result<Vec<String>> {
        let own = receiver.as_str();
        let mut ids = Vec::new();
        for row in self.inbox.range((own, 0)..=(own, u64::MAX))?.take(limit) {
            ids.push(row?.1.value().to_owned());
        }
        Ok(ids)
    }

    fn requests(&self, holder: MunicipalityCode, limit: usize) -> anyhow::Result<Vec<HistoryRequest>> {
        let own = holder.as_str();
        let mut requests = Vec::new();
        for row in self.requests.range((own, "", "")..)? {
            let (key, check) = row?;
            let (holder, person_key, asked_by) = key.value();
            if holder != own || requests.len() >= limit {
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
        Ok(requests)
    }
}

type WriteTables<'t> = Tables<
    redb::Table<'t, &'static str, &'static [u8]>,
    redb::Table<'t, &'static str, &'static [u8]>,
    redb::Table<'t, (&'static str, u64), &'static str>,
    redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    redb::Table<'t, (&'static str, &'static str, &'static str), &'static str>,
>;

/// The tables of a write transaction, and the inbox counter.
struct Writer<'t> {
    tables: WriteTables<'t>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl LedgerRead for Writer<'_> {
    type Error = anyhow::Error;

    fn entry(&self, handoff_id: &str) -> anyhow::Result<Option<LedgerEntry>> {
        self.tables.entry(handoff_id)
    }

    fn holder(&self, person_key: &str) -> anyhow::Result<Option<PersonHolder>> {
        self.tables.holder(person_key)
    }

    fn ask(&self, person_key: &str, asker: MunicipalityCode) -> anyhow::Result<Option<AskRecord>> {
        self.tables.ask(person_key, asker)
    }

    fn inbox(&self, receiver: MunicipalityCode, limit: usize) -> anyhow::Result<Vec<String>> {
        self.tables.inbox(receiver, limit)
    }

    fn requests(&self, holder: MunicipalityCode, limit: usize) -> anyhow::Result<Vec<HistoryRequest>> {
        self.tables.requests(holder, limit)
    }
}

impl LedgerWrite for Writer<'_> {
    fn put_entry(&mut self, entry: &LedgerEntry) -> anyhow::Result<()> {
        self.tables.ledger.insert(entry.handoff_id.as_str(), serde_json::to_vec(entry)?.as_slice())?;
        Ok(())
    }

    fn put_holder(&mut self, person_key: &str, holder: &PersonHolder) -> anyhow::Result<()> {
        self.tables.persons.insert(person_key, serde_json::to_vec(holder)?.as_slice())?;
        Ok(())
    }

    fn put_ask(&mut self, person_key: &str, asker: MunicipalityCode, ask: &AskRecord) -> anyhow::Result<()> {
        self.tables.asks.insert((person_key, asker.as_str()), serde_json::to_vec(ask)?.as_slice())?;
        Ok(())
    }

    fn next_inbox_seq(&mut self) -> anyhow::Result<u64> {
        let seq = self.meta.get("inbox_seq")?.map_or(0, |v| v.value()) + 1;
        self.meta.insert("inbox_seq", seq)?;
        Ok(seq)
    }

    fn inbox_insert(&mut self, receiver: MunicipalityCode, seq: u64, handoff_id: &str) -> anyhow::Result<()> {
        self.tables.inbox.insert((receiver.as_str(), seq), handoff_id)?;
        Ok(())
    }

    fn inbox_remove(&mut self, receiver: MunicipalityCode, seq: u64) -> anyhow::Result<()> {
        self.tables.inbox.remove((receiver.as_str(), seq))?;
        Ok(())
    }

    fn put_request(
        &mut self,
        holder: MunicipalityCode,
        person_key: &str,
        asker: MunicipalityCode,
        birth_check: &str,
    ) -> anyhow::Result<()> {
        self.tables.requests.insert((holder.as_str(), person_key, asker.as_str()), birth_check)?;
        Ok(())
    }

    fn remove_request(
        &mut self,
        holder: MunicipalityCode,
        person_key: &str,
        asker: MunicipalityCode,
    ) -> anyhow::Result<()> {
        self.tables.requests.remove((holder.as_str(), person_key, asker.as_str()))?;
        Ok(())
    }
}

/// Handles one sync of municipality `sender` (the caller checked the peer is its primary
/// in `directory`) with the rules of [`protocol::ledger`]: what changes the ledger is
/// stored in one commit, then the answer is read. A sync that changes nothing is answered
/// from a read transaction alone.
pub fn sync(
    db: &Database,
    directory: &Directory,
    sender: MunicipalityCode,
    request: &HandoffSync,
    now: OffsetDateTime,
) -> anyhow::Result<HandoffResponse> {
    if let Some(refusal) = ledger::check_size(request) {
        return Ok(refusal);
    }
    let read_tables = |txn: &redb::ReadTransaction| -> anyhow::Result<_> {
        Ok(Tables {
            ledger: txn.open_table(LEDGER)?,
            persons: txn.open_table(LEDGER_PERSONS)?,
            inbox: txn.open_table(LEDGER_INBOX)?,
            asks: txn.open_table(LEDGER_ASKS)?,
            requests: txn.open_table(LEDGER_REQUESTS)?,
        })
    };
    let writes = ledger::writes(&read_tables(&db.begin_read()?)?, sender, request)?;
    let applied = if writes {
        let txn = db.begin_write()?;
        let applied = {
            let mut writer = Writer {
                tables: Tables {
                    ledger: txn.open_table(LEDGER)?,
                    persons: txn.open_table(LEDGER_PERSONS)?,
                    inbox: txn.open_table(LEDGER_INBOX)?,
                    asks: txn.open_table(LEDGER_ASKS)?,
                    requests: txn.open_table(LEDGER_REQUESTS)?,
                },
                meta: txn.open_table(LEDGER_META)?,
            };
            ledger::apply(&mut writer, directory, sender, request, &crate::clock::rfc3339(now))?
        };
        txn.commit().context("the ledger's commit failed")?;
        if !request.deposits.is_empty() {
            crate::handoff::crash_point("ledger.deposited");
        }
        if !request.accepted.is_empty() {
            crate::handoff::crash_point("ledger.accepted");
        }
        if !request.returned.is_empty() {
            crate::handoff::crash_point("ledger.returned");
        }
        Some(applied)
    } else {
        None
    };
    ledger::answer(&read_tables(&db.begin_read()?)?, sender, request, applied)
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
