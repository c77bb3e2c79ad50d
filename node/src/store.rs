//! Storage on redb: resident documents, secondary indexes and the change feed.
//!
//! A document is kept as its last full `save()` plus the incremental chunks written since
//! (one per logical event, from `save_after(heads)`); after [`COMPACT_AFTER_CHUNKS`] chunks
//! the document is saved whole again. Documents are loaded on demand: a municipality of
//! 3.77 million residents cannot keep them in memory (about 20 KB each once loaded).
//!
//! Every change to a document moves it to the end of the change feed: `changes` maps a
//! monotonically increasing sequence number to the document id, and the document's meta
//! entry remembers its latest sequence, so that readers skip its earlier entries and a sweep
//! removes them (as CouchDB's `_changes` keeps one row per document). Replication reads the
//! feed from a checkpoint.
//!
//! All writes of one logical operation happen in one redb write transaction; a commit is
//! durable when `commit()` returns (redb's default `Durability::Immediate`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use automerge::{ActorId, Automerge, ChangeHash};
use lru::LruCache;
use protocol::catalogue::Lot;
use protocol::document::{
    CouponEntry, CouponStatus, ResidentEvent, ResidentRecord, apply_event, new_resident_document, read_record,
};
use protocol::municipality::MunicipalityCode;
use protocol::statistics::{Cell, event_delta, record_cells};
use protocol::terminal::BlockedCoupon;
use protocol::tip::DocTip;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use time::OffsetDateTime;

/// Full saves: resident id → bytes.
pub const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("docs");
/// Incremental chunks: (resident id, n) → bytes; and, after them at [`META_SLOT`], the
/// document's meta ([`DocMeta`]). A change writes its chunk and its meta side by side, in
/// one page of one table, where a table of their own for the metas cost every change a
/// second page written at a random place.
pub const CHUNKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("doc_chunks");
/// The key under which a document's meta sits among its chunks.
pub const META_SLOT: u32 = u32::MAX;
/// Where the metas were kept before they moved beside the chunks; [`Store::open`] moves a
/// store's metas from it, once.
const OLD_DOC_META: TableDefinition<&str, (u64, u32)> = TableDefinition::new("doc_meta");
/// The change feed: sequence → resident id. A document's entry is the one at the sequence
/// its meta holds; an entry a later change superseded stays until [`Mutation::sweep_feed`]
/// removes it, and readers skip it ([`ReadView::changes_since`]).
pub const CHANGES: TableDefinition<u64, &str> = TableDefinition::new("changes");
/// 10-digit coupon number → resident id.
pub const IDX_COUPON: TableDefinition<&str, &str> = TableDefinition::new("idx_coupon");
/// Person key → resident id.
pub const IDX_PERSON: TableDefinition<&str, &str> = TableDefinition::new("idx_person");
/// 宛名番号 → resident id.
pub const IDX_ATENA: TableDefinition<&str, &str> = TableDefinition::new("idx_atena");
/// Dose event id → resident id.
pub const IDX_EVENT: TableDefinition<&str, &str> = TableDefinition::new("idx_event");
/// (氏名カナ without spaces, resident id) → (), for search by kana prefix.
pub const IDX_KANA: TableDefinition<(&str, &str), ()> = TableDefinition::new("idx_kana");
/// resident id → digest of the identity last imported (re-import skips unchanged rows).
pub const IDENTITY_DIGEST: TableDefinition<&str, &[u8]> = TableDefinition::new("identity_digest");
/// lot number → JSON of [`Lot`].
pub const LOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("lots");
/// `number.generation` → JSON of [`protocol::terminal::BlockedCoupon`]: coupon generations
/// that terminals must refuse (revoked, or superseded by a reissue).
pub const BLOCKED_COUPONS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocked_coupons");
/// Coupon key (`municipality number.generation`, as in the document) → the digest of the
/// coupon this node printed under it, its signature included
/// ([`protocol::coupon::printed_digest`]): written by the print-shop export and by a reissue,
/// read by a capture instead of signing the coupon again.
pub const PRINTED: TableDefinition<&str, &[u8]> = TableDefinition::new("printed_coupons");
/// Enrolled terminals: peer id → JSON of [`crate::terminals::TerminalRecord`].
pub const TERMINALS: TableDefinition<&str, &[u8]> = TableDefinition::new("terminals");
/// Outstanding enrolment tokens: SHA-256 (hex) of the secret → JSON of
/// [`crate::terminals::Enrolment`].
pub const ENROLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrolments");
/// Captures of other municipalities' coupons waiting for their owner: event id → JSON of
/// [`crate::terminals::Outgoing`]. Removed once the owner has answered.
pub const FORWARD_OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("forward_outbox");
/// The owner's answer to a forwarded capture, until the terminal has fetched it: event id →
/// JSON of [`protocol::terminal::CaptureState`].
pub const FORWARD_RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("forward_results");
/// A terminal's capture log: event id → JSON of [`crate::terminal::LoggedCapture`].
pub const TERMINAL_LOG: TableDefinition<&str, &[u8]> = TableDefinition::new("terminal_log");
/// A terminal's captures not yet answered finally: sequence → event id.
pub const TERMINAL_PENDING: TableDefinition<u64, &str> = TableDefinition::new("terminal_pending");
/// A terminal's coupons already used here: 18-digit code → event id.
pub const TERMINAL_USED: TableDefinition<&str, &str> = TableDefinition::new("terminal_used");
/// A terminal's state: `bundle` and `certificate` → JSON.
pub const TERMINAL_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("terminal_state");
/// Statistics counters: [`protocol::statistics::Cell::key`] → count.
pub const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");
/// Statistics documents still to send to the national node: slot (`daily/2026-11-20`,
/// `population`) → the number of the change that last touched it.
pub const STATS_DIRTY: TableDefinition<&str, u64> = TableDefinition::new("stats_dirty");
/// Venues: id → JSON of [`crate::statistics::VenueRecord`].
pub const VENUES: TableDefinition<&str, &[u8]> = TableDefinition::new("venues");
/// The stock ledger: `<20-digit seq>` → JSON of [`crate::statistics::StockEntry`].
pub const STOCK: TableDefinition<&str, &[u8]> = TableDefinition::new("stock_ledger");
/// Relocation handoffs this node sealed: handoff id → JSON of
/// [`crate::handoff::OutEntry`].
pub const HANDOFF_OUT: TableDefinition<&str, &[u8]> = TableDefinition::new("handoff_out");
/// What the handoff sync still has to send, oldest first: `out/<seq>/<id>` → 1 (sealed, to
/// deposit) or 2 (deposited, to watch); `in/<seq>/<id>` → 3 (accepted, to tell the ledger).
/// Small, so a sync never reads the handoffs that are done.
pub const HANDOFF_DUE: TableDefinition<&str, u8> = TableDefinition::new("handoff_due");
/// Relocation handoffs received: handoff id → JSON of [`crate::handoff::InEntry`].
pub const HANDOFF_IN: TableDefinition<&str, &[u8]> = TableDefinition::new("handoff_in");
/// Newcomers whose history this node asked for: person key → JSON of
/// [`crate::handoff::AskEntry`].
pub const HANDOFF_ASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("handoff_asks");
/// Coupons of a previous municipality carried in by a handoff: 18-digit code → resident id
/// here (a dose captured against one is forwarded here by that municipality).
pub const IDX_HANDOFF_COUPON: TableDefinition<&str, &str> = TableDefinition::new("idx_handoff_coupon");
/// (18-digit code, municipality that handed the resident here) → resident id, for every
/// handoff that carried the coupon here: a resident who left and came back has one entry per
/// arrival, while [`IDX_HANDOFF_COUPON`] names the latest.
pub const IDX_HANDOFF_FROM: TableDefinition<(&str, &str), &str> = TableDefinition::new("idx_handoff_from");
/// Counters.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `META` key: the last `handoff_due` sequence used.
pub const META_HANDOFF_SEQ: &str = "handoff_seq";
/// `META` key: the last change-feed sequence used.
pub const META_CHANGE_SEQ: &str = "change_seq";
/// `META` key: where the next sweep of superseded change-feed entries starts.
pub const META_FEED_SWEPT: &str = "feed_swept";
/// `META` key: bumped whenever what terminals receive (lots, blocked coupons) changes.
pub const META_BUNDLE_SEQ: &str = "bundle_seq";
/// `META` key: bumped whenever the enrolled terminals or enrolment tokens change.
pub const META_TERMINALS_SEQ: &str = "terminals_seq";
/// `META` key: the last coupon serial used.
pub const META_COUPON_SERIAL: &str = "coupon_serial";
/// `META` key: the last resident id number given (see [`resident_id`]).
pub const META_RESIDENT_SEQ: &str = "resident_seq";

/// `META` key: the last number given to a statistics change.
pub const META_STATS_SEQ: &str = "stats_seq";
/// `META` key: the newest statistics version the national node acknowledged.
pub const META_STATS_VERSION: &str = "stats_version";
/// `META` key: 1 once the statistics counters count every document (a new store, or after
/// `statistics::rebuild`); a store from before counters existed has 0.
pub const META_STATS_COUNTED: &str = "stats_counted";
/// `META` key: 1 once every open ask is in `HANDOFF_DUE` (see `handoff::note_open_asks`).
pub const META_ASKS_DUE: &str = "asks_due";
/// The layout of the build that last opened the store ([`STORE_LAYOUT`]).
pub const META_STORE_LAYOUT: &str = "store_layout";
/// The store layout this build writes: 2 since document metas sit beside their chunks (a
/// store without the key is older), 3 since a meta may carry the document's tip. A build
/// refuses a store of a later layout than its own.
pub const STORE_LAYOUT: u64 = 3;
/// `META` key: the last stock ledger entry's number.
pub const META_STOCK_SEQ: &str = "stock_seq";
/// `META` key: the newest audit checkpoint deposited at the national node.
pub const META_ANCHORED: &str = "audit_anchored";

/// redb page cache of a running node.
pub const DEFAULT_CACHE_BYTES: usize = 512 * 1024 * 1024;
/// redb page cache for import, issuance and export, which touch every document.
pub const BULK_CACHE_BYTES: usize = 1024 * 1024 * 1024;

/// Chunks kept before a document is saved whole again.
pub const COMPACT_AFTER_CHUNKS: u32 = 16;

/// What the store keeps about a document beside its bytes, at [`META_SLOT`] among its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocMeta {
    /// The sequence of its latest change in the feed.
    pub seq: u64,
    /// Chunks stored since its last full save.
    pub n_chunks: u32,
}

impl DocMeta {
    const LEN: usize = 12;

    fn encode(self) -> [u8; Self::LEN] {
        let mut bytes = [0u8; Self::LEN];
        bytes[..8].copy_from_slice(&self.seq.to_be_bytes());
        bytes[8..].copy_from_slice(&self.n_chunks.to_be_bytes());
        bytes
    }

    /// The meta at the start of a stored value; what follows it is the document's tip.
    fn decode(resident_id: &str, bytes: &[u8]) -> anyhow::Result<Self> {
        let Some(bytes) = bytes.get(..Self::LEN) else {
            bail!("document {resident_id}: its meta has {} bytes, not {}", bytes.len(), Self::LEN);
        };
        let (seq, n_chunks) = bytes.split_at(8);
        Ok(Self {
            seq: u64::from_be_bytes(seq.try_into()?),
            n_chunks: u32::from_be_bytes(n_chunks.try_into()?),
        })
    }
}

/// A document's meta, if the store holds the document.
fn read_meta(
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    resident_id: &str,
) -> anyhow::Result<Option<DocMeta>> {
    chunks.get((resident_id, META_SLOT))?.map(|v| DocMeta::decode(resident_id, v.value())).transpose()
}

/// A document's meta and its tip ([`DocTip`], encoded), if the store holds the document.
fn read_meta_and_tip(
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    resident_id: &str,
) -> anyhow::Result<Option<(DocMeta, Option<Vec<u8>>)>> {
    let Some(value) = chunks.get((resident_id, META_SLOT))? else { return Ok(None) };
    let bytes = value.value();
    let meta = DocMeta::decode(resident_id, bytes)?;
    let tip = bytes.get(DocMeta::LEN..).filter(|tip| !tip.is_empty()).map(<[u8]>::to_vec);
    Ok(Some((meta, tip)))
}

/// Sets a document's meta and tip (`None`: the change just stored left none, and the next
/// capture loads the document); returns the meta it replaced, if any. Every write of a
/// document's bytes writes its meta, so a tip never outlives the version it describes.
fn write_meta(
    chunks: &mut redb::Table<'_, (&'static str, u32), &'static [u8]>,
    resident_id: &str,
    meta: DocMeta,
    tip: Option<&[u8]>,
) -> anyhow::Result<Option<DocMeta>> {
    let previous = match tip {
        None => chunks.insert((resident_id, META_SLOT), meta.encode().as_slice())?,
        Some(tip) => {
            let mut value = Vec::with_capacity(DocMeta::LEN + tip.len());
            value.extend_from_slice(&meta.encode());
            value.extend_from_slice(tip);
            chunks.insert((resident_id, META_SLOT), value.as_slice())?
        }
    };
    previous.map(|v| DocMeta::decode(resident_id, v.value())).transpose()
}

/// Moves the metas of a store written before they sat beside the chunks, in the
/// transaction that opens it.
fn move_old_metas(txn: &WriteTransaction) -> anyhow::Result<()> {
    use redb::TableHandle;
    if !txn.list_tables()?.any(|table| table.name() == OLD_DOC_META.name()) {
        return Ok(());
    }
    let mut moved = 0u64;
    {
        let old = txn.open_table(OLD_DOC_META)?;
        let mut chunks = txn.open_table(CHUNKS)?;
        for row in old.iter()? {
            let (id, value) = row?;
            let (seq, n_chunks) = value.value();
            write_meta(&mut chunks, id.value(), DocMeta { seq, n_chunks }, None)?;
            moved += 1;
        }
    }
    txn.delete_table(OLD_DOC_META)?;
    tracing::info!(documents = moved, "document metas moved beside their chunks");
    Ok(())
}

/// The node's database.
pub struct Store {
    db: Database,
}

/// The rows of a document this node did not hold, opened once for many documents: the
/// document itself, its identity indexes and its change-feed entry.
struct NewDocTables<'t> {
    docs: redb::Table<'t, &'static str, &'static [u8]>,
    chunks: redb::Table<'t, (&'static str, u32), &'static [u8]>,
    changes: redb::Table<'t, u64, &'static str>,
    atena: redb::Table<'t, &'static str, &'static str>,
    person: redb::Table<'t, &'static str, &'static str>,
    kana: redb::Table<'t, (&'static str, &'static str), ()>,
}

impl<'t> NewDocTables<'t> {
    fn open(txn: &'t WriteTransaction) -> anyhow::Result<Self> {
        Ok(Self {
            docs: txn.open_table(DOCS)?,
            chunks: txn.open_table(CHUNKS)?,
            changes: txn.open_table(CHANGES)?,
            atena: txn.open_table(IDX_ATENA)?,
            person: txn.open_table(IDX_PERSON)?,
            kana: txn.open_table(IDX_KANA)?,
        })
    }

    /// Writes the document saved as `saved`, with its tip if one was made, as change `seq`
    /// of the feed.
    fn insert(
        &mut self,
        id: &str,
        saved: &[u8],
        tip: Option<&[u8]>,
        record: &ResidentRecord,
        seq: u64,
    ) -> anyhow::Result<()> {
        self.docs.insert(id, saved)?;
        self.atena.insert(record.identity.atena_number.as_str(), id)?;
        self.person.insert(record.person_key.as_str(), id)?;
        self.kana.insert((normalize_kana(&record.identity.name_kana).as_str(), id), ())?;
        if let Some(previous) = write_meta(&mut self.chunks, id, DocMeta { seq, n_chunks: 0 }, tip)? {
            self.changes.remove(previous.seq)?;
        }
        self.changes.insert(seq, id)?;
        Ok(())
    }
}

/// The document id of the `n`th resident this node registered (import or handoff): the
/// municipality code, unique in the federation, and a number in registration order. Ids in
/// registration order make an import append to the document tables rather than write at
/// random places in them (a keyed hash of the 宛名番号, the first scheme, made a 3.77 M
/// import spend most of its time rewriting B-tree pages). It says nothing about the person.
pub fn resident_id(municipality: MunicipalityCode, n: u64) -> String {
    format!("{municipality}-{n:010}")
}

/// The numbers after which a promoted standby goes on registering residents and issuing
/// coupons: the highest its replicated documents use (a standby's own counters never moved).
pub fn restore_counters(store: &Store, municipality: MunicipalityCode) -> anyhow::Result<(u64, u64)> {
    let txn = store.begin_write()?;
    let (residents, serials) = {
        let prefix = format!("{municipality}-");
        let docs = txn.open_table(DOCS)?;
        let mut residents = 0;
        for row in docs.iter()?.rev() {
            let (key, _) = row?;
            if let Some(n) =
                key.value().strip_prefix(&prefix).filter(|n| n.len() == 10).and_then(|n| n.parse().ok())
            {
                residents = n;
                break;
            }
        }
        let coupons = txn.open_table(IDX_COUPON)?;
        let serials = match coupons.last()? {
            Some((number, _)) => number.value().get(..9).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
            None => 0,
        };
        (residents, serials)
    };
    {
        let mut meta = txn.open_table(META)?;
        for (key, floor) in [(META_RESIDENT_SEQ, residents), (META_COUPON_SERIAL, serials)] {
            let current = meta.get(key)?.map_or(0, |v| v.value());
            meta.insert(key, current.max(floor))?;
        }
    }
    txn.commit()?;
    Ok((residents, serials))
}

impl Store {
    /// Opens (or creates) the store and its tables with the page cache of a running node.
    pub fn open(path: &Path) -> anyhow::Result<Arc<Store>> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store with a page cache of `cache_bytes` (bulk jobs use a larger one).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> anyhow::Result<Arc<Store>> {
        let db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "{} is in use by another vrs-node process (stop the daemon first)",
                path.display()
            ),
            other => anyhow::anyhow!("cannot open {}: {other}", path.display()),
        })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(DOCS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(CHANGES)?;
            txn.open_table(IDX_COUPON)?;
            txn.open_table(IDX_PERSON)?;
            txn.open_table(IDX_ATENA)?;
            txn.open_table(IDX_EVENT)?;
            txn.open_table(IDX_KANA)?;
            txn.open_table(IDENTITY_DIGEST)?;
            txn.open_table(LOTS)?;
            txn.open_table(META)?;
            txn.open_table(BLOCKED_COUPONS)?;
            txn.open_table(PRINTED)?;
            txn.open_table(TERMINALS)?;
            txn.open_table(ENROLMENTS)?;
            txn.open_table(FORWARD_OUTBOX)?;
            txn.open_table(FORWARD_RESULTS)?;
            txn.open_table(TERMINAL_LOG)?;
            txn.open_table(TERMINAL_PENDING)?;
            txn.open_table(TERMINAL_USED)?;
            txn.open_table(TERMINAL_STATE)?;
            txn.open_table(STATS)?;
            txn.open_table(STATS_DIRTY)?;
            txn.open_table(VENUES)?;
            txn.open_table(STOCK)?;
            txn.open_table(HANDOFF_OUT)?;
            txn.open_table(HANDOFF_IN)?;
            txn.open_table(HANDOFF_DUE)?;
            txn.open_table(HANDOFF_ASKS)?;
            txn.open_table(IDX_HANDOFF_COUPON)?;
            txn.open_table(IDX_HANDOFF_FROM)?;
            txn.open_table(crate::audit::AUDIT)?;
            txn.open_table(crate::audit::AUDIT_CHECKPOINTS)?;
            txn.open_table(crate::auth::USERS)?;
            txn.open_table(crate::auth::SESSIONS)?;
            txn.open_table(crate::auth::API_TOKENS)?;
            txn.open_table(crate::auth::TOKEN_NAMES)?;
            let layout = txn.open_table(META)?.get(META_STORE_LAYOUT)?.map(|v| v.value());
            if let Some(layout) = layout.filter(|layout| *layout > STORE_LAYOUT) {
                bail!(
                    "{} は新しい版の vrs-node が書いたストアです（形式 {layout}、この版は {STORE_LAYOUT} まで）。\
                     新しい版で開いてください / {} was written by a newer vrs-node (store layout {layout}; \
                     this one knows up to {STORE_LAYOUT}): open it with that version",
                    path.display(),
                    path.display()
                );
            }
            move_old_metas(&txn)?;
            txn.open_table(META)?.insert(META_STORE_LAYOUT, STORE_LAYOUT)?;
            // A store without documents has nothing left uncounted.
            if txn.open_table(DOCS)?.is_empty()? {
                txn.open_table(META)?.insert(META_STATS_COUNTED, 1)?;
            }
            // Open asks are kept in the due table (`handoff::put_ask`): a store from before
            // that notes its open ones, once.
            if txn.open_table(META)?.get(META_ASKS_DUE)?.is_none() {
                crate::handoff::note_open_asks(&txn)?;
                txn.open_table(META)?.insert(META_ASKS_DUE, 1)?;
            }
        }
        txn.commit()?;
        Ok(Arc::new(Store { db }))
    }

    /// A consistent read view.
    pub fn read(&self) -> anyhow::Result<ReadView> {
        Ok(ReadView { txn: self.db.begin_read()? })
    }

    /// Registers lots in one durable commit (CLI and demo; the daemon uses its writer).
    pub fn put_lots(&self, lots: &[Lot]) -> anyhow::Result<()> {
        let txn = self.begin_write()?;
        for lot in lots {
            txn.open_table(LOTS)?.insert(lot.lot.as_str(), serde_json::to_vec(lot)?.as_slice())?;
        }
        bump(&txn, META_BUNDLE_SEQ)?;
        txn.commit()?;
        Ok(())
    }

    /// Starts a write transaction.
    pub fn begin_write(&self) -> anyhow::Result<WriteTransaction> {
        Ok(self.db.begin_write()?)
    }
}

/// A loaded document and the number of chunks stored after its last full save.
pub struct LoadedDoc {
    /// The document, boxed: an `Automerge` is about 3.5 KiB inline, and a document moves
    /// several times on its way through a capture (read ahead, the writer's cache, the
    /// thread that frees it), where a box moves as a pointer.
    pub doc: Box<Automerge>,
    /// Chunks stored since the last full save.
    pub n_chunks: u32,
}

/// A read-only snapshot of the store.
pub struct ReadView {
    txn: ReadTransaction,
}

impl ReadView {
    /// Looks a key up in a string → string index.
    pub fn index(&self, table: TableDefinition<&str, &str>, key: &str) -> anyhow::Result<Option<String>> {
        let table = self.txn.open_table(table)?;
        Ok(table.get(key)?.map(|v| v.value().to_owned()))
    }

    /// Whether a handoff from `from` ever carried the coupon `code` (18 digits) here.
    pub fn handed_here(&self, code: &str, from: MunicipalityCode) -> anyhow::Result<bool> {
        let table = self.txn.open_table(IDX_HANDOFF_FROM)?;
        Ok(table.get((code, from.as_str()))?.is_some())
    }

    /// Reads a resident's record.
    pub fn record(&self, resident_id: &str) -> anyhow::Result<Option<ResidentRecord>> {
        Ok(self.record_and_heads(resident_id)?.map(|(record, _)| record))
    }

    /// A resident's record and its document's heads (hex, sorted): replicas of a document
    /// hold the same history exactly when their heads are equal.
    pub fn record_and_heads(
        &self,
        resident_id: &str,
    ) -> anyhow::Result<Option<(ResidentRecord, Vec<String>)>> {
        let docs = self.txn.open_table(DOCS)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        let Some(loaded) = load_from(&docs, &chunks, resident_id)? else {
            return Ok(None);
        };
        let record =
            read_record(&loaded.doc).with_context(|| format!("document {resident_id} is corrupt"))?;
        let mut heads: Vec<String> = loaded.doc.get_heads().iter().map(|h| h.to_string()).collect();
        heads.sort();
        Ok(Some((record, heads)))
    }

    /// Bytes of every stored document (full saves and chunks).
    pub fn document_bytes(&self) -> anyhow::Result<u64> {
        let mut total = 0u64;
        for row in self.txn.open_table(DOCS)?.iter()? {
            total += row?.1.value().len() as u64;
        }
        for row in self.txn.open_table(CHUNKS)?.iter()? {
            let (key, bytes) = row?;
            if key.value().1 != META_SLOT {
                total += bytes.value().len() as u64;
            }
        }
        Ok(total)
    }

    /// A document's stored bytes: its full save followed by its chunks, which
    /// `Automerge::load` reads as one (replication sends this to a replica that has none).
    pub fn stored_bytes(&self, resident_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let docs = self.txn.open_table(DOCS)?;
        let Some(saved) = docs.get(resident_id)? else { return Ok(None) };
        let mut bytes = saved.value().to_vec();
        for entry in self.txn.open_table(CHUNKS)?.range((resident_id, 0)..(resident_id, META_SLOT))? {
            bytes.extend_from_slice(entry?.1.value());
        }
        Ok(Some(bytes))
    }

    /// A document as stored (full save plus chunks), for replication.
    pub fn load_doc(&self, resident_id: &str) -> anyhow::Result<Option<Automerge>> {
        let docs = self.txn.open_table(DOCS)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        Ok(load_from(&docs, &chunks, resident_id)?.map(|loaded| *loaded.doc))
    }

    /// Residents whose kana name starts with `prefix` (spaces ignored), at most `limit`.
    pub fn search_kana(&self, prefix: &str, limit: usize) -> anyhow::Result<Vec<String>> {
        let prefix = normalize_kana(prefix);
        let table = self.txn.open_table(IDX_KANA)?;
        let mut found = Vec::new();
        for entry in table.range((prefix.as_str(), "")..)? {
            let (key, _) = entry?;
            let (kana, id) = key.value();
            if !kana.starts_with(prefix.as_str()) || found.len() >= limit {
                break;
            }
            found.push(id.to_owned());
        }
        Ok(found)
    }

    /// A lot by number.
    pub fn lot(&self, lot: &str) -> anyhow::Result<Option<Lot>> {
        get_json(&self.txn.open_table(LOTS)?, lot)
    }

    /// Every lot.
    pub fn lots(&self) -> anyhow::Result<Vec<Lot>> {
        Ok(self.all::<Lot>(LOTS)?.into_iter().map(|(_, lot)| lot).collect())
    }

    /// Change feed entries after `since`, at most `limit`: (sequence, resident id), each
    /// document once, at its latest change (entries a later change superseded are skipped).
    pub fn changes_since(&self, since: u64, limit: usize) -> anyhow::Result<Vec<(u64, String)>> {
        let table = self.txn.open_table(CHANGES)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        let mut out = Vec::new();
        for entry in table.range(since.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (seq, id) = entry?;
            let (seq, id) = (seq.value(), id.value());
            if read_meta(&chunks, id)?.is_some_and(|meta| meta.seq == seq) {
                out.push((seq, id.to_owned()));
            }
        }
        Ok(out)
    }

    /// The sequence of a document's latest change in the feed, if the store holds it.
    pub fn change_seq(&self, resident_id: &str) -> anyhow::Result<Option<u64>> {
        Ok(read_meta(&self.txn.open_table(CHUNKS)?, resident_id)?.map(|meta| meta.seq))
    }

    /// The digest kept when this node printed a coupon generation, if it did.
    pub fn printed(&self, coupon_key: &str) -> anyhow::Result<Option<[u8; 16]>> {
        let table = self.txn.open_table(PRINTED)?;
        let Some(value) = table.get(coupon_key)? else { return Ok(None) };
        Ok(Some(value.value().try_into().with_context(|| format!("printed digest of {coupon_key}"))?))
    }

    /// Number of resident documents.
    pub fn n_residents(&self) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(DOCS)?.len()?)
    }

    /// Number of issued coupon numbers.
    pub fn n_coupons(&self) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(IDX_COUPON)?.len()?)
    }

    /// Number of dose events.
    pub fn n_dose_events(&self) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(IDX_EVENT)?.len()?)
    }

    /// A counter from `META`.
    pub fn meta(&self, key: &str) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(META)?.get(key)?.map(|v| v.value()).unwrap_or(0))
    }

    /// One JSON value of a table.
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> anyhow::Result<Option<T>> {
        get_json(&self.txn.open_table(table)?, key)
    }

    /// Every JSON value of a table, in key order.
    pub fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> anyhow::Result<Vec<(String, T)>> {
        all_json(&self.txn.open_table(table)?)
    }

    /// Rows of a table.
    pub fn count(&self, table: TableDefinition<&str, &[u8]>) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(table)?.len()?)
    }

    /// A terminal's pending queue after sequence `after`, at most `limit` entries.
    pub fn terminal_pending_after(&self, after: u64, limit: usize) -> anyhow::Result<Vec<(u64, String)>> {
        let table = self.txn.open_table(TERMINAL_PENDING)?;
        let mut out = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (seq, id) = row?;
            out.push((seq.value(), id.value().to_owned()));
        }
        Ok(out)
    }

    /// How many captures a terminal has not had a final answer for.
    pub fn terminal_pending_count(&self) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(TERMINAL_PENDING)?.len()?)
    }

    /// Every resident id, in id order, from `after` (exclusive), at most `limit`.
    pub fn resident_ids(&self, after: Option<&str>, limit: usize) -> anyhow::Result<Vec<String>> {
        let table = self.txn.open_table(DOCS)?;
        let mut out = Vec::with_capacity(limit.min(4096));
        let range = match after {
            Some(after) => {
                table.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?
            }
            None => table.range::<&str>(..)?,
        };
        for entry in range.take(limit) {
            let (id, _) = entry?;
            out.push(id.value().to_owned());
        }
        Ok(out)
    }
}

/// Kana as indexed: without spaces (full- or half-width).
pub fn normalize_kana(kana: &str) -> String {
    kana.chars().filter(|c| !c.is_whitespace()).collect()
}

fn load_from(
    docs: &impl ReadableTable<&'static str, &'static [u8]>,
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    resident_id: &str,
) -> anyhow::Result<Option<LoadedDoc>> {
    let Some(saved) = docs.get(resident_id)? else {
        return Ok(None);
    };
    // The bytes come from redb, whose pages are checksummed; re-hashing every change on each
    // load would cost a large share of the load time, for no added protection.
    let mut doc = Automerge::load_unverified_heads(saved.value())
        .with_context(|| format!("document {resident_id}: saved bytes do not load"))?;
    let mut n_chunks = 0;
    for entry in chunks.range((resident_id, 0)..(resident_id, META_SLOT))? {
        let (_, bytes) = entry?;
        doc.load_incremental(bytes.value())
            .with_context(|| format!("document {resident_id}: chunk {n_chunks} does not load"))?;
        n_chunks += 1;
    }
    Ok(Some(LoadedDoc { doc: Box::new(doc), n_chunks }))
}

/// The writer's cache of loaded documents.
pub type DocCache = LruCache<String, LoadedDoc>;

/// Makes a cache holding at most `capacity` documents.
pub fn new_cache(capacity: usize) -> DocCache {
    let capacity = std::num::NonZeroUsize::new(capacity.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
    LruCache::new(capacity)
}

/// Writes within one redb transaction, through the writer's cache.
///
/// If the transaction is not committed, every document it touched must be dropped from the
/// cache ([`Mutation::touched`]), since the cache would otherwise hold changes that never
/// reached the disk.
pub struct Mutation<'a> {
    txn: &'a WriteTransaction,
    cache: &'a mut DocCache,
    actor: &'a ActorId,
    touched: Vec<String>,
    /// Change-feed entries superseded in this transaction and not yet swept.
    superseded: u64,
    /// Counter changes held back until [`Mutation::finish`], when counts are batched.
    counts: Option<BTreeMap<Cell, i64>>,
    /// Documents that left the cache, to be dropped where it does not hold the writer up.
    retired: Vec<LoadedDoc>,
}

impl<'a> Mutation<'a> {
    /// Starts writing into `txn`.
    pub fn new(txn: &'a WriteTransaction, cache: &'a mut DocCache, actor: &'a ActorId) -> Self {
        Self { txn, cache, actor, touched: Vec::new(), superseded: 0, counts: None, retired: Vec::new() }
    }

    /// Holds counter changes back and writes them once, summed, in [`Mutation::finish`]:
    /// a group of captures on the same day changes the same few counters, and each write
    /// of one costs a lookup and an insert. Until then the counters in the transaction do
    /// not include this mutation's changes, so only a caller that does not read them
    /// before finishing may batch.
    pub fn batch_counts(&mut self) {
        self.counts.get_or_insert_with(BTreeMap::new);
    }

    /// Counts `cells` now, or at [`Mutation::finish`] when counts are batched.
    pub fn count(&mut self, cells: &[(Cell, i64)]) -> anyhow::Result<()> {
        match &mut self.counts {
            Some(pending) => {
                for (cell, change) in cells {
                    *pending.entry(cell.clone()).or_default() += change;
                }
                Ok(())
            }
            None => count_cells(self.txn, cells),
        }
    }

    /// Writes the counter changes held back and sweeps the change feed: the last writes
    /// before the transaction commits.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(pending) = self.counts.as_mut() {
            let cells: Vec<(Cell, i64)> =
                std::mem::take(pending).into_iter().filter(|(_, change)| *change != 0).collect();
            count_cells(self.txn, &cells)?;
        }
        self.sweep_feed()
    }

    /// The documents that left the cache during this mutation, for the caller to drop off
    /// the writer's thread (freeing a document's columns is a few percent of a capture).
    pub fn take_retired(&mut self) -> Vec<LoadedDoc> {
        std::mem::take(&mut self.retired)
    }

    /// Puts a document into the cache, keeping whatever it pushes out for retirement.
    fn keep(&mut self, resident_id: String, loaded: LoadedDoc) {
        if let Some((_, out)) = self.cache.push(resident_id, loaded) {
            self.retired.push(out);
        }
    }

    /// Takes a document out of the cache, keeping it for retirement.
    fn forget(&mut self, resident_id: &str) {
        if let Some(out) = self.cache.pop(resident_id) {
            self.retired.push(out);
        }
    }

    /// The documents changed so far.
    pub fn touched(&self) -> &[String] {
        &self.touched
    }

    /// The transaction, for index reads and writes.
    pub fn txn(&self) -> &WriteTransaction {
        self.txn
    }

    /// Looks a key up in a string index, seeing this transaction's own writes.
    pub fn index(&self, table: TableDefinition<&str, &str>, key: &str) -> anyhow::Result<Option<String>> {
        let table = self.txn.open_table(table)?;
        Ok(table.get(key)?.map(|v| v.value().to_owned()))
    }

    /// Moves `resident_id`'s atena index entry from `old` to `new`; `old` is dropped only
    /// while it still names this resident.
    pub fn move_atena(&self, old: &str, new: &str, resident_id: &str) -> anyhow::Result<()> {
        let mut atena = self.txn.open_table(IDX_ATENA)?;
        if atena.get(old)?.is_some_and(|held| held.value() == resident_id) {
            atena.remove(old)?;
        }
        atena.insert(new, resident_id)?;
        Ok(())
    }

    /// Sets an index entry.
    pub fn set_index(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        self.txn.open_table(table)?.insert(key, value)?;
        Ok(())
    }

    /// Loads a document into the cache if needed; returns whether it exists.
    fn ensure_loaded(&mut self, resident_id: &str) -> anyhow::Result<bool> {
        if self.cache.contains(resident_id) {
            return Ok(true);
        }
        let docs = self.txn.open_table(DOCS)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        let Some(mut loaded) = load_from(&docs, &chunks, resident_id)? else {
            return Ok(false);
        };
        loaded.doc.set_actor(self.actor.clone());
        self.keep(resident_id.to_owned(), loaded);
        Ok(true)
    }

    /// Takes a document read ahead ([`ReadView::preload`]) into the cache, unless the cache
    /// holds it already or it has changed since it was read (then it is read again as usual).
    /// Returns its record when it was taken. A document with an event applied ahead is never
    /// taken this way: it goes through [`Mutation::store_ahead`].
    pub fn adopt(&mut self, preloaded: Preloaded) -> anyhow::Result<Option<ResidentRecord>> {
        if preloaded.ahead.is_some() || self.cache.contains(&preloaded.resident_id) {
            return Ok(None);
        }
        if !self.still_current(&preloaded)? {
            return Ok(None);
        }
        let Preloaded { resident_id, source: Source::Doc(mut loaded, record), .. } = preloaded else {
            return Ok(None);
        };
        loaded.doc.set_actor(self.actor.clone());
        self.keep(resident_id, loaded);
        Ok(Some(record))
    }

    /// Whether nothing has changed the document, in this transaction included, since it was
    /// read ahead.
    pub fn still_current(&self, preloaded: &Preloaded) -> anyhow::Result<bool> {
        let current = read_meta(&self.txn.open_table(CHUNKS)?, &preloaded.resident_id)?;
        Ok(current.map(|meta| meta.seq) == Some(preloaded.seq))
    }

    /// Stores the event applied ahead on a document read ahead, as [`Mutation::apply_after`]
    /// would have applied `event` to it — if that is the event applied ahead, this node's
    /// actor applied it, and the document has not changed since it was read. Returns false,
    /// having written nothing, otherwise.
    pub fn store_ahead(&mut self, preloaded: Preloaded, event: &ResidentEvent) -> anyhow::Result<bool> {
        let usable = match &preloaded.ahead {
            Some(ahead) => ahead.event == *event && applies_ahead(event) && ahead.by == *self.actor,
            None => false,
        };
        if !usable || !self.still_current(&preloaded)? {
            return Ok(false);
        }
        let Preloaded { resident_id, n_chunks, source, ahead, .. } = preloaded;
        let Some(ahead) = ahead else { return Ok(false) };
        self.touched.push(resident_id.clone());
        let n_chunks = match source {
            Source::Doc(mut loaded, record) => {
                self.count(&event_delta(&record, event, ahead.at))?;
                let n_chunks =
                    store_chunk(self.txn, &resident_id, &mut loaded, &ahead.chunk, ahead.saved.as_deref())?;
                self.keep(resident_id.clone(), loaded);
                n_chunks
            }
            Source::Tip(tip) => {
                // Built without the document, so never the change that compacts it
                // ([`ReadView::preload`]). A copy in the cache is now behind: it goes.
                anyhow::ensure!(!compacts(n_chunks), "a change built from a tip would compact {resident_id}");
                self.count(&event_delta(&tip.record, event, ahead.at))?;
                // The meta's count names the next free slot; were a chunk there, the
                // writer abandons the whole group rather than commit over it.
                let clobbered = self
                    .txn
                    .open_table(CHUNKS)?
                    .insert((resident_id.as_str(), n_chunks), ahead.chunk.as_slice())?
                    .is_some();
                anyhow::ensure!(
                    !clobbered,
                    "document {resident_id}: chunk {n_chunks} is stored, but its meta counts {n_chunks} chunks"
                );
                self.forget(&resident_id);
                n_chunks + 1
            }
        };
        self.bump_feed(&resident_id, n_chunks, ahead.tip.as_deref())?;
        Ok(true)
    }

    /// The resident's current record.
    pub fn record(&mut self, resident_id: &str) -> anyhow::Result<Option<ResidentRecord>> {
        if !self.ensure_loaded(resident_id)? {
            return Ok(None);
        }
        let loaded = self.cache.get(resident_id).context("cache lost a document")?;
        Ok(Some(read_record(&loaded.doc).with_context(|| format!("document {resident_id} is corrupt"))?))
    }

    /// Creates a resident's document (the registration commit) and its indexes.
    pub fn create_resident(&mut self, record: &ResidentRecord, at: OffsetDateTime) -> anyhow::Result<()> {
        let id = record.resident_id.as_str();
        if self.txn.open_table(DOCS)?.get(id)?.is_some() {
            bail!("resident {id} already exists");
        }
        let doc = new_resident_document(self.actor, record, at)?;
        self.txn.open_table(DOCS)?.insert(id, doc.save_nocompress().as_slice())?;
        self.set_index(IDX_ATENA, &record.identity.atena_number, id)?;
        self.set_index(IDX_PERSON, &record.person_key, id)?;
        self.txn
            .open_table(IDX_KANA)?
            .insert((normalize_kana(&record.identity.name_kana).as_str(), id), ())?;
        self.touched.push(id.to_owned());
        self.bump_feed(id, 0, None)?;
        self.keep(id.to_owned(), LoadedDoc { doc: Box::new(doc), n_chunks: 0 });
        self.count(&record_cells(record))?;
        Ok(())
    }

    /// Stores new residents whose documents were built and saved elsewhere (an import
    /// builds them on every core): documents, indexes, feed entries and counters. Each table
    /// is opened once and the counters are summed over the whole batch, so a large import
    /// pays per resident only for its own rows.
    pub fn insert_built<'r>(
        &mut self,
        built: impl IntoIterator<Item = (&'r ResidentRecord, &'r [u8], Option<&'r [u8]>)>,
    ) -> anyhow::Result<()> {
        let mut seq = self.txn.open_table(META)?.get(META_CHANGE_SEQ)?.map_or(0, |v| v.value());
        let mut cells: BTreeMap<Cell, i64> = Default::default();
        {
            let mut tables = NewDocTables::open(self.txn)?;
            for (record, saved, tip) in built {
                let id = record.resident_id.as_str();
                seq += 1;
                tables.insert(id, saved, tip, record, seq)?;
                for (cell, n) in record_cells(record) {
                    *cells.entry(cell).or_default() += n;
                }
                self.touched.push(id.to_owned());
            }
        }
        self.txn.open_table(META)?.insert(META_CHANGE_SEQ, seq)?;
        let cells: Vec<(Cell, i64)> = cells.into_iter().filter(|(_, n)| *n != 0).collect();
        self.count(&cells)
    }

    /// Appends one event to a resident's document as one commit and one stored chunk.
    pub fn apply(
        &mut self,
        resident_id: &str,
        event: &ResidentEvent,
        at: OffsetDateTime,
    ) -> anyhow::Result<()> {
        self.apply_to(resident_id, event, at, None)
    }

    /// [`Self::apply`] for a caller that has just read the record (`before`, in this
    /// transaction): the statistics delta is computed from it instead of reading it again.
    pub fn apply_after(
        &mut self,
        resident_id: &str,
        event: &ResidentEvent,
        at: OffsetDateTime,
        before: &ResidentRecord,
    ) -> anyhow::Result<()> {
        self.apply_to(resident_id, event, at, Some(before))
    }

    fn apply_to(
        &mut self,
        resident_id: &str,
        event: &ResidentEvent,
        at: OffsetDateTime,
        before: Option<&ResidentRecord>,
    ) -> anyhow::Result<()> {
        if !self.ensure_loaded(resident_id)? {
            bail!("resident {resident_id} does not exist");
        }
        self.touched.push(resident_id.to_owned());
        let loaded = self.cache.get_mut(resident_id).context("cache lost a document")?;
        let counts =
            !matches!(event, ResidentEvent::CouponIssued { .. } | ResidentEvent::CouponRevoked { .. });
        let delta = match before {
            _ if !counts => Vec::new(),
            Some(before) => event_delta(before, event, at),
            None => {
                let before =
                    read_record(&loaded.doc).with_context(|| format!("document {resident_id} is corrupt"))?;
                event_delta(&before, event, at)
            }
        };
        let heads: Vec<ChangeHash> = loaded.doc.get_heads();
        apply_event(&mut loaded.doc, event, at)?;
        let chunk = loaded.doc.save_after(&heads);
        let n_chunks = store_chunk(self.txn, resident_id, loaded, &chunk, None)?;
        match event {
            ResidentEvent::CouponIssued { entry, supersedes: Some(old) } => {
                self.block_coupon(old, true, &entry.generation.to_string())?
            }
            ResidentEvent::CouponRevoked { key, reason } => self.block_coupon(key, false, reason)?,
            ResidentEvent::TransferredOut(transfer) => {
                let record = read_record(&self.cache.get(resident_id).context("cache lost a document")?.doc)?;
                for entry in record.coupons.values().filter(|c| c.status == CouponStatus::Transferred) {
                    self.block(&entry.key(), BlockedCoupon::transferred(transfer.to))?;
                }
            }
            ResidentEvent::TransferReturned(_) => {
                let record = read_record(&self.cache.get(resident_id).context("cache lost a document")?.doc)?;
                for entry in record.coupons.values().filter(|c| c.status == CouponStatus::Valid) {
                    self.unblock(&entry.key())?;
                }
            }
            _ => {}
        }
        self.count(&delta)?;
        self.bump_feed(resident_id, n_chunks, None)
    }

    /// Adds a coupon generation to the list terminals refuse.
    fn block_coupon(&self, key: &str, superseded: bool, reason: &str) -> anyhow::Result<()> {
        self.block(key, BlockedCoupon { superseded, reason: reason.to_owned(), moved_to: None })
    }

    /// Takes a coupon generation off the list terminals refuse (a transfer sent back).
    fn unblock(&self, key: &str) -> anyhow::Result<()> {
        if self.txn.open_table(BLOCKED_COUPONS)?.remove(key)?.is_some() {
            bump(self.txn, META_BUNDLE_SEQ)?;
        }
        Ok(())
    }

    fn block(&self, key: &str, entry: BlockedCoupon) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(&entry)?;
        let previous =
            self.txn.open_table(BLOCKED_COUPONS)?.insert(key, bytes.as_slice())?.map(|v| v.value().to_vec());
        if previous.as_deref() != Some(bytes.as_slice()) {
            bump(self.txn, META_BUNDLE_SEQ)?;
        }
        Ok(())
    }

    /// Stores an event chunk built elsewhere (bulk issuance); `loaded` is the document after
    /// it, and `tip` its tip if one was made.
    pub fn append_built(
        &mut self,
        resident_id: &str,
        loaded: &mut LoadedDoc,
        chunk: &[u8],
        tip: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        self.touched.push(resident_id.to_owned());
        self.forget(resident_id);
        let n_chunks = store_chunk(self.txn, resident_id, loaded, chunk, None)?;
        self.bump_feed(resident_id, n_chunks, tip)
    }

    /// Moves the document to the end of the change feed. Its previous entry is left where it
    /// is — removing it would write a page anywhere in the feed for every change — and
    /// counted for [`Mutation::sweep_feed`].
    fn bump_feed(&mut self, resident_id: &str, n_chunks: u32, tip: Option<&[u8]>) -> anyhow::Result<()> {
        let seq = self.next_counter(META_CHANGE_SEQ)?;
        let previous =
            write_meta(&mut self.txn.open_table(CHUNKS)?, resident_id, DocMeta { seq, n_chunks }, tip)?;
        self.txn.open_table(CHANGES)?.insert(seq, resident_id)?;
        self.superseded += u64::from(previous.is_some());
        Ok(())
    }

    /// Removes superseded change-feed entries: twice as many entries are looked at, from
    /// where the last sweep stopped, as this transaction has superseded, so that the feed
    /// stays within about twice the number of documents while the sweep's pages are written
    /// in feed order, a few to a commit. Wraps to the feed's start at its end.
    pub fn sweep_feed(&mut self) -> anyhow::Result<()> {
        if self.superseded == 0 {
            return Ok(());
        }
        let budget = usize::try_from(self.superseded.saturating_mul(2)).unwrap_or(usize::MAX);
        self.superseded = 0;
        let start = self.txn.open_table(META)?.get(META_FEED_SWEPT)?.map_or(0, |v| v.value());
        let mut changes = self.txn.open_table(CHANGES)?;
        // The last sequence in reach: the sweep covers [start, end].
        let (end, wrapped) = match changes.range(start..)?.nth(budget.saturating_sub(1)) {
            Some(entry) => (entry?.0.value(), false),
            None => (u64::MAX, true),
        };
        let chunks = self.txn.open_table(CHUNKS)?;
        let mut failure = None;
        changes.retain_in(start..=end, |seq, id| match read_meta(&chunks, id) {
            Ok(current) => current.is_some_and(|meta| meta.seq == seq),
            Err(error) => {
                failure.get_or_insert(error);
                true
            }
        })?;
        if let Some(error) = failure {
            return Err(error);
        }
        drop((chunks, changes));
        let next = if wrapped { 0 } else { end + 1 };
        self.txn.open_table(META)?.insert(META_FEED_SWEPT, next)?;
        Ok(())
    }

    /// Stores a page of documents received by replication, in feed order. Documents this
    /// node does not hold yet (all of them during a catch-up) are written with each table
    /// opened once for the page; the others go through [`Mutation::put_replicated`].
    pub fn put_replicated_page<'r>(
        &mut self,
        docs: impl IntoIterator<Item = (&'r str, &'r [u8], &'r ResidentRecord)>,
    ) -> anyhow::Result<()> {
        let docs: Vec<(&str, &[u8], &ResidentRecord)> = docs.into_iter().collect();
        let existing: std::collections::HashSet<&str> = {
            let docs_table = self.txn.open_table(DOCS)?;
            let mut existing = std::collections::HashSet::new();
            for (id, _, record) in &docs {
                anyhow::ensure!(
                    record.resident_id == *id,
                    "document {id} holds resident {}",
                    record.resident_id
                );
                if docs_table.get(*id)?.is_some() {
                    existing.insert(*id);
                }
            }
            existing
        };
        let mut seq = self.txn.open_table(META)?.get(META_CHANGE_SEQ)?.map(|v| v.value()).unwrap_or(0);
        let mut blocked_any = false;
        {
            let mut tables = NewDocTables::open(self.txn)?;
            let mut coupons = self.txn.open_table(IDX_COUPON)?;
            let mut events = self.txn.open_table(IDX_EVENT)?;
            let mut blocked = self.txn.open_table(BLOCKED_COUPONS)?;
            for (id, saved, record) in docs.iter().filter(|(id, ..)| !existing.contains(id)) {
                seq += 1;
                tables.insert(id, saved, None, record, seq)?;
                let newest = |entry: &CouponEntry| {
                    record
                        .coupon_generations(entry.code.municipality, &entry.code.number)
                        .last()
                        .map(|c| c.generation)
                };
                for entry in record.coupons.values() {
                    if !record.carried(entry) {
                        coupons.insert(entry.code.number.as_str(), *id)?;
                    }
                    let block = match entry.status {
                        CouponStatus::Superseded => Some(BlockedCoupon {
                            superseded: true,
                            reason: newest(entry).unwrap_or(entry.generation).to_string(),
                            moved_to: None,
                        }),
                        CouponStatus::Revoked => Some(BlockedCoupon {
                            superseded: false,
                            reason: entry.status_reason.clone().unwrap_or_default(),
                            moved_to: None,
                        }),
                        CouponStatus::Transferred => {
                            record.transfer.as_ref().map(|t| BlockedCoupon::transferred(t.to))
                        }
                        _ => None,
                    };
                    if let Some(block) = block {
                        blocked.insert(entry.key().as_str(), serde_json::to_vec(&block)?.as_slice())?;
                        blocked_any = true;
                    }
                }
                for dose in record.doses.values() {
                    events.insert(dose.event_id.as_str(), *id)?;
                }
                self.cache.pop(*id);
                self.touched.push((*id).to_owned());
            }
        }
        self.set_counter(META_CHANGE_SEQ, seq)?;
        if blocked_any {
            bump(self.txn, META_BUNDLE_SEQ)?;
        }
        for (id, saved, record) in docs.iter().filter(|(id, ..)| existing.contains(id)) {
            self.put_replicated(id, saved, record)?;
        }
        Ok(())
    }

    /// Stores a document received by replication: saved whole (its chunks dropped), its
    /// indexes rebuilt from its record, and moved to the end of this node's own change feed.
    pub fn put_replicated(
        &mut self,
        resident_id: &str,
        saved: &[u8],
        record: &ResidentRecord,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            record.resident_id == resident_id,
            "document {resident_id} holds resident {}",
            record.resident_id
        );
        let exists = self.txn.open_table(DOCS)?.get(resident_id)?.is_some();
        let old = match exists && self.ensure_loaded(resident_id)? {
            true => {
                let loaded = self.cache.get(resident_id).context("cache lost a document")?;
                Some(read_record(&loaded.doc)?.identity)
            }
            false => None,
        };
        let old_kana = old.as_ref().map(|identity| normalize_kana(&identity.name_kana));
        self.forget(resident_id);
        self.touched.push(resident_id.to_owned());
        self.txn.open_table(DOCS)?.insert(resident_id, saved)?;
        {
            let mut chunks = self.txn.open_table(CHUNKS)?;
            let stale: Vec<u32> = chunks
                .range((resident_id, 0)..(resident_id, META_SLOT))?
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for n in stale {
                chunks.remove((resident_id, n))?;
            }
        }
        match old.filter(|old| old.atena_number != record.identity.atena_number) {
            // A provisional atena number the register extract replaced at the primary.
            Some(old) => self.move_atena(&old.atena_number, &record.identity.atena_number, resident_id)?,
            None => self.set_index(IDX_ATENA, &record.identity.atena_number, resident_id)?,
        }
        self.set_index(IDX_PERSON, &record.person_key, resident_id)?;
        let kana = normalize_kana(&record.identity.name_kana);
        let mut kana_index = self.txn.open_table(IDX_KANA)?;
        if let Some(old) = old_kana.filter(|old| *old != kana) {
            kana_index.remove((old.as_str(), resident_id))?;
        }
        kana_index.insert((kana.as_str(), resident_id), ())?;
        drop(kana_index);
        for entry in record.coupons.values() {
            if !record.carried(entry) {
                self.set_index(IDX_COUPON, entry.code.number.as_str(), resident_id)?;
            }
            match entry.status {
                protocol::document::CouponStatus::Superseded => {
                    let current = record
                        .coupon_generations(entry.code.municipality, &entry.code.number)
                        .last()
                        .map_or(entry.generation, |c| c.generation);
                    self.block_coupon(&entry.key(), true, &current.to_string())?
                }
                protocol::document::CouponStatus::Revoked => {
                    self.block_coupon(&entry.key(), false, entry.status_reason.as_deref().unwrap_or(""))?
                }
                _ => {}
            }
        }
        for dose in record.doses.values() {
            self.set_index(IDX_EVENT, &dose.event_id, resident_id)?;
        }
        self.bump_feed(resident_id, 0, None)
    }

    /// Increments a counter and returns its new value.
    pub fn next_counter(&self, key: &str) -> anyhow::Result<u64> {
        bump(self.txn, key)
    }

    /// Sets a counter.
    pub fn set_counter(&self, key: &str, value: u64) -> anyhow::Result<()> {
        self.txn.open_table(META)?.insert(key, value)?;
        Ok(())
    }

    /// Records a lot.
    pub fn put_lot(&self, lot: &Lot) -> anyhow::Result<()> {
        self.txn.open_table(LOTS)?.insert(lot.lot.as_str(), serde_json::to_vec(lot)?.as_slice())?;
        bump(self.txn, META_BUNDLE_SEQ)?;
        Ok(())
    }

    /// A lot by number, seeing this transaction's writes.
    pub fn lot(&self, lot: &str) -> anyhow::Result<Option<Lot>> {
        get_json(&self.txn.open_table(LOTS)?, lot)
    }
}

/// One JSON value of a `&str → &[u8]` table.
pub fn get_json<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> anyhow::Result<Option<T>> {
    match table.get(key)? {
        Some(bytes) => Ok(Some(
            serde_json::from_slice(bytes.value())
                .with_context(|| format!("stored value {key} is unreadable"))?,
        )),
        None => Ok(None),
    }
}

/// Every JSON value of a `&str → &[u8]` table, in key order.
pub fn all_json<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> anyhow::Result<Vec<(String, T)>> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (key, value) = row?;
        let parsed = serde_json::from_slice(value.value())
            .with_context(|| format!("stored value {} is unreadable", key.value()))?;
        out.push((key.value().to_owned(), parsed));
    }
    Ok(out)
}

/// Writes one JSON value into a `&str → &[u8]` table of `txn`.
pub fn put_json<T: serde::Serialize>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: &T,
) -> anyhow::Result<()> {
    txn.open_table(table)?.insert(key, serde_json::to_vec(value)?.as_slice())?;
    Ok(())
}

/// Adds changes to the statistics counters in `txn` and marks the documents they fall in
/// as due for the national node.
pub fn count_cells(txn: &WriteTransaction, cells: &[(Cell, i64)]) -> anyhow::Result<()> {
    if cells.is_empty() {
        return Ok(());
    }
    let seq = bump(txn, META_STATS_SEQ)?;
    let mut stats = txn.open_table(STATS)?;
    let mut dirty = txn.open_table(STATS_DIRTY)?;
    let mut slots = std::collections::BTreeSet::new();
    for (cell, change) in cells {
        let key = cell.key();
        let current = stats.get(key.as_str())?.map_or(0, |v| v.value());
        let next = current.checked_add_signed(*change).unwrap_or_else(|| {
            // Only counters rebuilt from fewer documents than they count can get here
            // (`vrs-node statistics rebuild` puts them right).
            tracing::warn!(%key, current, change, "a statistics counter would go below zero");
            0
        });
        if next == 0 {
            stats.remove(key.as_str())?;
        } else {
            stats.insert(key.as_str(), next)?;
        }
        slots.insert(cell.date());
    }
    for date in slots {
        let slot = match date {
            Some(date) => format!("daily/{date}"),
            None => "population".to_owned(),
        };
        dirty.insert(slot.as_str(), seq)?;
    }
    Ok(())
}

/// Marks a statistics slot (`venues`, `population`, `daily/<date>`) as due for the
/// national node.
pub fn mark_due(txn: &WriteTransaction, slot: &str) -> anyhow::Result<()> {
    let seq = bump(txn, META_STATS_SEQ)?;
    txn.open_table(STATS_DIRTY)?.insert(slot, seq)?;
    Ok(())
}

/// Keeps the digests of coupon generations this node printed, keyed by coupon key (see
/// [`PRINTED`]); the table is opened once for them all.
pub fn put_printed(
    txn: &WriteTransaction,
    printed: impl IntoIterator<Item = (String, [u8; 16])>,
) -> anyhow::Result<()> {
    let mut table = txn.open_table(PRINTED)?;
    for (coupon_key, digest) in printed {
        table.insert(coupon_key.as_str(), digest.as_slice())?;
    }
    Ok(())
}

/// Increments a `META` counter in `txn`.
pub fn bump(txn: &WriteTransaction, key: &str) -> anyhow::Result<u64> {
    let mut meta = txn.open_table(META)?;
    let next = meta.get(key)?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert(key, next)?;
    Ok(next)
}

/// Stores a chunk, compacting into a full save when enough have piled up. Returns the
/// number of chunks now stored for the document.
fn store_chunk(
    txn: &WriteTransaction,
    resident_id: &str,
    loaded: &mut LoadedDoc,
    chunk: &[u8],
    saved: Option<&[u8]>,
) -> anyhow::Result<u32> {
    if compacts(loaded.n_chunks) {
        let saved = match saved {
            Some(saved) => std::borrow::Cow::Borrowed(saved),
            None => std::borrow::Cow::Owned(loaded.doc.save_nocompress()),
        };
        txn.open_table(DOCS)?.insert(resident_id, saved.as_ref())?;
        let mut chunks = txn.open_table(CHUNKS)?;
        for n in 0..loaded.n_chunks {
            chunks.remove((resident_id, n))?;
        }
        loaded.n_chunks = 0;
    } else {
        txn.open_table(CHUNKS)?.insert((resident_id, loaded.n_chunks), chunk)?;
        loaded.n_chunks += 1;
    }
    Ok(loaded.n_chunks)
}

/// Whether an event changes nothing but its document, the statistics and the feed (what
/// [`Mutation::store_ahead`] writes): the others also write tables of blocked coupons.
fn applies_ahead(event: &ResidentEvent) -> bool {
    !matches!(
        event,
        ResidentEvent::CouponIssued { .. }
            | ResidentEvent::CouponRevoked { .. }
            | ResidentEvent::TransferredOut(_)
            | ResidentEvent::TransferReturned(_)
    )
}

/// Whether the next change of a document with `n_chunks` chunks is stored as a whole
/// document rather than one more chunk.
fn compacts(n_chunks: u32) -> bool {
    n_chunks + 1 >= COMPACT_AFTER_CHUNKS
}

/// The tip of `doc` after the change `chunk` (one change, just made), encoded, `record`
/// being what the document reads as if the caller knows; `None` when the document has no
/// tip (several heads) or it cannot be made, which only costs the next capture a load of
/// the document.
pub fn tip_after(doc: &Automerge, chunk: &[u8], record: Option<ResidentRecord>) -> Option<Vec<u8>> {
    let made =
        automerge::Change::from_bytes(chunk.to_vec()).map_err(|error| error.to_string()).and_then(|change| {
            match record {
                Some(record) => DocTip::of_change(doc, &change, record),
                None => DocTip::of(doc, &change),
            }
            .map_err(|error| error.to_string())
        });
    match made {
        Ok(tip) => tip.map(|tip| tip.encode()),
        Err(error) => {
            tracing::warn!(%error, "no tip made for a document");
            None
        }
    }
}

/// Loads a document for a bulk job outside the writer's cache.
pub fn load_for_bulk(
    txn: &ReadTransaction,
    resident_id: &str,
    actor: &ActorId,
) -> anyhow::Result<Option<LoadedDoc>> {
    let docs = txn.open_table(DOCS)?;
    let chunks = txn.open_table(CHUNKS)?;
    let loaded = load_from(&docs, &chunks, resident_id)?;
    Ok(loaded.map(|mut l| {
        l.doc.set_actor(actor.clone());
        l
    }))
}

/// A resident's document read ahead of the writer, on another thread: the writer takes it
/// instead of reading and parsing the document itself when nothing has changed the document
/// since ([`Mutation::adopt`]). Reading ahead also brings the pages the writer will change
/// into the store's page cache, so that many reads wait on the disk at once instead of one
/// after another on the writer's thread.
///
/// The thread that reads ahead may also apply the event it expects the writer to record
/// ([`Preloaded::apply_ahead`]): the Automerge commit and the chunk's encoding then happen
/// there, and the writer only stores the chunk ([`Mutation::store_ahead`]) — after its own
/// checks decided exactly that event on exactly this version of the document.
///
/// When the document's tip is stored ([`DocTip`]) and a dose is what the caller means to
/// apply, only the tip is read: the dose's change is built from it, without the document.
pub struct Preloaded {
    /// The resident.
    pub resident_id: String,
    /// The document's number in the change feed when it was read.
    seq: u64,
    /// Chunks stored since its last full save, when it was read.
    n_chunks: u32,
    source: Source,
    ahead: Option<Ahead>,
}

/// What was read ahead of a document.
enum Source {
    /// The document, loaded, and the record it read as.
    Doc(LoadedDoc, ResidentRecord),
    /// Its tip, which holds the record.
    Tip(DocTip),
}

/// An event applied to a document read ahead.
struct Ahead {
    event: ResidentEvent,
    at: OffsetDateTime,
    /// The actor that wrote the change.
    by: ActorId,
    /// The change, as a chunk: `save_after` the document's heads before the event.
    chunk: Vec<u8>,
    /// The whole document after the event, when this change is the one that compacts it.
    saved: Option<Vec<u8>>,
    /// The document's tip after the event, encoded, when it has one.
    tip: Option<Vec<u8>>,
}

impl std::fmt::Debug for Preloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preloaded")
            .field("resident_id", &self.resident_id)
            .field("seq", &self.seq)
            .field("from_tip", &matches!(self.source, Source::Tip(_)))
            .field("applied_ahead", &self.ahead.as_ref().map(|a| a.event.kind()))
            .finish()
    }
}

impl Preloaded {
    /// The record as it was read (before any event applied ahead).
    pub fn record(&self) -> &ResidentRecord {
        match &self.source {
            Source::Doc(_, record) => record,
            Source::Tip(tip) => &tip.record,
        }
    }

    /// Whether only the document's tip was read: then only a dose can be applied ahead.
    pub fn from_tip(&self) -> bool {
        matches!(self.source, Source::Tip(_))
    }

    /// The event applied ahead and the instant it was applied with.
    pub fn applied(&self) -> Option<(&ResidentEvent, OffsetDateTime)> {
        self.ahead.as_ref().map(|a| (&a.event, a.at))
    }

    /// Applies `event` as `actor` at `at`, as [`Mutation::apply`] would, and encodes what
    /// the writer will store. On failure the document is dropped with the error: it may hold
    /// part of the change.
    pub fn apply_ahead(
        mut self,
        actor: &ActorId,
        event: ResidentEvent,
        at: OffsetDateTime,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(self.ahead.is_none(), "an event was applied ahead already");
        anyhow::ensure!(applies_ahead(&event), "a {} is not applied ahead", event.kind());
        let ahead = match (&mut self.source, &event) {
            (Source::Tip(tip), ResidentEvent::DoseRecorded(dose)) => {
                anyhow::ensure!(tip.written_by(actor), "the tip of {} is another actor's", self.resident_id);
                let (chunk, next) = tip.record_dose(dose, at)?;
                Ahead { event, at, by: actor.clone(), chunk, saved: None, tip: Some(next.encode()) }
            }
            (Source::Tip(_), _) => anyhow::bail!("a {} is not built from a tip", event.kind()),
            (Source::Doc(loaded, _), _) => {
                let doc = &mut loaded.doc;
                doc.set_actor(actor.clone());
                let heads: Vec<ChangeHash> = doc.get_heads();
                apply_event(doc, &event, at)?;
                let chunk = doc.save_after(&heads);
                let saved = compacts(self.n_chunks).then(|| doc.save_nocompress());
                let tip = tip_after(doc, &chunk, None);
                Ahead { event, at, by: actor.clone(), chunk, saved, tip }
            }
        };
        self.ahead = Some(ahead);
        Ok(self)
    }
}

impl ReadView {
    /// Reads ahead what recording an event for the resident `index` maps `key` to will need:
    /// the document (loaded and parsed), its feed entry, and the event-id index entry.
    ///
    /// With `tip_will_do`, a stored tip is read instead of the document when the next change
    /// would not compact it; the caller then may only apply a dose ahead.
    pub fn preload(
        &self,
        index: TableDefinition<&str, &str>,
        key: &str,
        event_id: Option<&str>,
        tip_will_do: bool,
    ) -> anyhow::Result<Option<Preloaded>> {
        let Some(resident_id) = self.index(index, key)? else { return Ok(None) };
        let docs = self.txn.open_table(DOCS)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        let Some((DocMeta { seq, n_chunks }, tip)) = read_meta_and_tip(&chunks, &resident_id)? else {
            return Ok(None);
        };
        // The writer inserts the event id: read its page now.
        if let Some(event_id) = event_id {
            drop(self.txn.open_table(IDX_EVENT)?.get(event_id)?);
        }
        if let Some(tip) = tip.filter(|_| tip_will_do && !compacts(n_chunks)) {
            match DocTip::decode(&tip) {
                Ok(tip) => {
                    let source = Source::Tip(tip);
                    return Ok(Some(Preloaded { resident_id, seq, n_chunks, source, ahead: None }));
                }
                Err(error) => {
                    tracing::warn!(%resident_id, %error, "a stored tip does not read; the document is read instead")
                }
            }
        }
        let Some(loaded) = load_from(&docs, &chunks, &resident_id)? else { return Ok(None) };
        let record =
            read_record(&loaded.doc).with_context(|| format!("document {resident_id} is corrupt"))?;
        Ok(Some(Preloaded { resident_id, seq, n_chunks, source: Source::Doc(loaded, record), ahead: None }))
    }

    /// The underlying transaction (bulk jobs load documents from it).
    pub fn txn(&self) -> &ReadTransaction {
        &self.txn
    }
}
