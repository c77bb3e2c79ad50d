//! The change feed names each document once, at its latest change, however often it
//! changed; the entries a later change superseded are swept away in feed order without ever
//! taking a document's current entry with them.

use automerge::ActorId;
use node::store::{CHANGES, CHUNKS, META_FEED_SWEPT, META_SLOT, Mutation, Store, new_cache};
use proptest::prelude::*;
use protocol::document::{ResidentEvent, ResidentRecord};
use redb::{ReadableTable, ReadableTableMetadata};

fn record(n: usize) -> ResidentRecord {
    let mut record = super::preload::record();
    record.resident_id = format!("141003-r{n}");
    record.person_key = format!("pk{n}");
    record.identity.atena_number = format!("A{n}");
    record
}

struct Fixture {
    dir: std::path::PathBuf,
    store: Option<std::sync::Arc<Store>>,
    actor: ActorId,
}

impl Fixture {
    fn new(residents: usize) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("vrs-feed-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("store.redb")).unwrap();
        let fixture = Fixture { dir, store: Some(store), actor: ActorId::random() };
        let txn = fixture.store().begin_write().unwrap();
        let mut cache = new_cache(16);
        let mut m = Mutation::new(&txn, &mut cache, &fixture.actor);
        for n in 0..residents {
            m.create_resident(&record(n), time::OffsetDateTime::now_utc()).unwrap();
        }
        drop(m);
        txn.commit().unwrap();
        fixture
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    /// Closes the store, lets `between` change its file, and opens it again.
    fn reopen(&mut self, between: impl FnOnce(&std::path::Path)) {
        let path = self.dir.join("store.redb");
        self.store = None;
        between(&path);
        self.store = Some(Store::open(&path).unwrap());
    }

    /// One transaction changing each listed resident's address once; swept if asked.
    fn change(&self, residents: &[usize], sweep: bool) {
        let txn = self.store().begin_write().unwrap();
        let mut cache = new_cache(16);
        let mut m = Mutation::new(&txn, &mut cache, &self.actor);
        for (i, n) in residents.iter().enumerate() {
            let mut identity = record(*n).identity;
            identity.address = format!("横浜市中区{i}");
            m.apply(
                &record(*n).resident_id,
                &ResidentEvent::IdentityUpdated(identity),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        }
        if sweep {
            m.sweep_feed().unwrap();
        }
        drop(m);
        txn.commit().unwrap();
    }

    /// Every document with the sequence of its latest change, in that order.
    fn latest(&self) -> Vec<(u64, String)> {
        let view = self.store().read().unwrap();
        let ids = view.resident_ids(None, usize::MAX).unwrap();
        let mut latest: Vec<(u64, String)> =
            ids.into_iter().map(|id| (view.change_seq(&id).unwrap().unwrap(), id)).collect();
        latest.sort();
        latest
    }

    /// The whole feed as replication reads it, `page` entries at a time.
    fn feed(&self, page: usize) -> Vec<(u64, String)> {
        let view = self.store().read().unwrap();
        let mut all = Vec::new();
        loop {
            let since = all.last().map_or(0, |(seq, _): &(u64, String)| *seq);
            let next = view.changes_since(since, page).unwrap();
            assert!(next.len() <= page, "a page of {page} held {}", next.len());
            if next.is_empty() {
                return all;
            }
            all.extend(next);
        }
    }

    fn stored_entries(&self) -> u64 {
        self.store().read().unwrap().txn().open_table(CHANGES).unwrap().len().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn each_document_is_read_once_at_its_latest_change_and_swept_entries_go() {
    let fixture = Fixture::new(5);
    fixture.change(&[1], false);
    fixture.change(&[1, 2], false);
    fixture.change(&[1], false);
    // Four changes superseded four entries, which stay stored until a sweep.
    assert_eq!(fixture.stored_entries(), 9);
    let feed = fixture.feed(100);
    assert_eq!(feed, fixture.latest());
    let ids: Vec<&str> = feed.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["141003-r0", "141003-r3", "141003-r4", "141003-r2", "141003-r1"]);
    // Paged one at a time, the same documents in the same order.
    assert_eq!(fixture.feed(1), feed);
    assert_eq!(fixture.feed(2), feed);

    // One change supersedes one entry: the sweep looks at the feed's first two, both
    // superseded, and removes them.
    fixture.change(&[0], true);
    assert_eq!(fixture.stored_entries(), 10 - 2);
    assert_eq!(fixture.feed(3), fixture.latest());
    // Sweeps go on from there and start again at the feed's end; what is left superseded is
    // at most the entry the last change superseded.
    let mut wrapped = false;
    for _ in 0..9 {
        fixture.change(&[4], true);
        assert_eq!(fixture.feed(2), fixture.latest());
        wrapped |= fixture.store().read().unwrap().meta(META_FEED_SWEPT).unwrap() == 0;
    }
    assert!(wrapped, "the sweep never started again from the feed's start");
    assert!(fixture.stored_entries() <= 5 + 1, "{} entries for 5 documents", fixture.stored_entries());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever changes and sweeps happen, the feed read in pages of any size is every
    /// document once, in the order of their latest changes, and the stored entries stay
    /// within the documents plus what the changes since the last full sweep superseded.
    #[test]
    fn the_feed_survives_any_changes_and_sweeps(
        groups in prop::collection::vec((prop::collection::vec(0usize..12, 1..8), any::<bool>()), 1..30),
        page in 1usize..6,
    ) {
        let fixture = Fixture::new(12);
        let mut superseded = 0u64;
        for (residents, sweep) in &groups {
            fixture.change(residents, *sweep);
            superseded += residents.len() as u64;
            let feed = fixture.feed(page);
            prop_assert_eq!(&feed, &fixture.latest());
            let stored = fixture.stored_entries();
            prop_assert!((12..=12 + superseded).contains(&stored), "{} entries", stored);
        }
        // Changing every document in each group and sweeping, the feed settles within
        // twice the number of documents.
        let all: Vec<usize> = (0..12).collect();
        for _ in 0..30 {
            fixture.change(&all, true);
        }
        let stored = fixture.stored_entries();
        prop_assert!(stored <= 24, "{} entries for 12 documents", stored);
        prop_assert_eq!(fixture.feed(page), fixture.latest());
    }
}

/// A store from before document metas moved beside their chunks had them in a table of
/// their own: opened now, it moves them, and its feed, documents and sweeps are as they were.
#[test]
fn a_store_with_the_metas_in_their_own_table_opens_as_it_was() {
    const OLD_META: redb::TableDefinition<&str, (u64, u32)> = redb::TableDefinition::new("doc_meta");
    let mut fixture = Fixture::new(20);
    fixture.change(&[1, 2, 3], false);
    fixture.change(&[2, 7, 1], true);
    let (latest, feed) = (fixture.latest(), fixture.feed(3));
    let records: Vec<_> = {
        let view = fixture.store().read().unwrap();
        latest.iter().map(|(_, id)| view.record(id).unwrap().unwrap()).collect()
    };
    let bytes = fixture.store().read().unwrap().document_bytes().unwrap();
    fixture.reopen(|path| {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            let mut old = txn.open_table(OLD_META).unwrap();
            let metas: Vec<(String, Vec<u8>)> = chunks
                .iter()
                .unwrap()
                .map(|row| row.unwrap())
                .filter(|(key, _)| key.value().1 == META_SLOT)
                .map(|(key, value)| (key.value().0.to_owned(), value.value().to_vec()))
                .collect();
            assert_eq!(metas.len(), 20);
            for (id, meta) in metas {
                chunks.remove((id.as_str(), META_SLOT)).unwrap();
                let seq = u64::from_be_bytes(meta[..8].try_into().unwrap());
                let n_chunks = u32::from_be_bytes(meta[8..].try_into().unwrap());
                old.insert(id.as_str(), (seq, n_chunks)).unwrap();
            }
        }
        txn.commit().unwrap();
    });
    let view = fixture.store().read().unwrap();
    use redb::TableHandle;
    let tables: Vec<String> = view.txn().list_tables().unwrap().map(|t| t.name().to_owned()).collect();
    assert!(!tables.iter().any(|name| name == "doc_meta"), "the old table is still there: {tables:?}");
    assert_eq!(view.meta(node::store::META_STORE_LAYOUT).unwrap(), node::store::STORE_LAYOUT);
    assert_eq!(fixture.latest(), latest);
    assert_eq!(fixture.feed(3), feed);
    assert_eq!(view.document_bytes().unwrap(), bytes);
    for ((_, id), before) in latest.iter().zip(&records) {
        assert_eq!(&view.record(id).unwrap().unwrap(), before, "{id}");
    }
    drop(view);
    // Changes and sweeps go on from the moved metas.
    fixture.change(&[4, 1], true);
    assert_eq!(fixture.feed(2), fixture.latest());
    assert_eq!(fixture.latest().last().map(|(_, id)| id.as_str()), Some("141003-r1"));
}

/// A store a later version has brought to a newer layout is refused, and left as it was.
#[test]
fn a_store_of_a_newer_layout_is_refused() {
    use node::store::{META, META_STORE_LAYOUT, STORE_LAYOUT};
    let mut fixture = Fixture::new(3);
    let newer = STORE_LAYOUT + 1;
    let path = fixture.dir.join("store.redb");
    fixture.store = None;
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert(META_STORE_LAYOUT, newer).unwrap();
        txn.commit().unwrap();
    }
    let refused = Store::open(&path).err().expect("a store of a newer layout opened");
    let message = format!("{refused:#}");
    assert!(message.contains("newer vrs-node") && message.contains(&format!("layout {newer}")), "{message}");
    assert!(message.contains("新しい版"), "{message}");
    let db = redb::Database::create(&path).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    assert_eq!(txn.open_table(META).unwrap().get(META_STORE_LAYOUT).unwrap().unwrap().value(), newer);
}

/// Every row of a `&str → u64` table.
fn rows(store: &Store, table: redb::TableDefinition<&str, u64>) -> Vec<(String, u64)> {
    let view = store.read().unwrap();
    let table = view.txn().open_table(table).unwrap();
    table.iter().unwrap().map(|row| row.unwrap()).map(|(k, v)| (k.value().to_owned(), v.value())).collect()
}

#[test]
fn counters_batched_until_the_mutation_finishes_equal_counters_written_at_once() {
    // The same events, counted at once in one store and batched in another: residents
    // registered, some born on another day after a correction, one corrected there and back.
    let run = |batch: bool| {
        let fixture = Fixture::new(0);
        let txn = fixture.store().begin_write().unwrap();
        let mut cache = new_cache(2);
        let mut m = Mutation::new(&txn, &mut cache, &fixture.actor);
        if batch {
            m.batch_counts();
        }
        let now = time::OffsetDateTime::now_utc();
        for n in 0..6 {
            m.create_resident(&record(n), now).unwrap();
        }
        let moved = |n: usize, days: i64| {
            let mut identity = record(n).identity;
            identity.birth_date += time::Duration::days(days);
            ResidentEvent::IdentityUpdated(identity)
        };
        for n in [1, 3] {
            m.apply(&record(n).resident_id, &moved(n, 400), now).unwrap();
        }
        m.apply(&record(4).resident_id, &moved(4, 30), now).unwrap();
        m.apply(&record(4).resident_id, &moved(4, 0), now).unwrap();
        let counted = m.txn().open_table(node::store::STATS).unwrap().len().unwrap();
        assert_eq!(counted == 0, batch, "batched counts wait for finish; others are written at once");
        m.finish().unwrap();
        assert!(!m.take_retired().is_empty(), "a cache of two kept six documents");
        drop(m);
        txn.commit().unwrap();
        (rows(fixture.store(), node::store::STATS), rows(fixture.store(), node::store::STATS_DIRTY))
    };
    let (at_once, batched) = (run(false), run(true));
    assert!(!at_once.0.is_empty());
    assert_eq!(at_once.0, batched.0);
    let slots = |dirty: &[(String, u64)]| dirty.iter().map(|(slot, _)| slot.clone()).collect::<Vec<_>>();
    assert_eq!(slots(&at_once.1), slots(&batched.1));
}
