//! A document read ahead of the writer is taken only while nothing has changed it since, and
//! a change applied to it ahead is stored only if it is the one the writer decided; the ids
//! that key the event index sort in the order they were minted.

use automerge::ActorId;
use node::store::{IDX_ATENA, Mutation, Store, new_cache};
use protocol::document::{Identity, ResidentEvent, ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex};
use protocol::municipality::MunicipalityCode;

/// A resident with no coupons and no doses (also the change feed's tests' template).
pub(super) fn record() -> ResidentRecord {
    ResidentRecord {
        schema: SCHEMA_VERSION,
        resident_id: "141003-r1".into(),
        municipality: MunicipalityCode::parse("141003").unwrap(),
        person_key: "pk1".into(),
        identity: Identity {
            atena_number: "A1".into(),
            name: "山田　花子".into(),
            name_kana: "ヤマダ ハナコ".into(),
            birth_date: time::macros::date!(1950 - 01 - 02),
            sex: Sex::Female,
            address: "横浜市中区".into(),
            status: ResidentStatus::Active,
        },
        coupons: Default::default(),
        doses: Default::default(),
        corrections: Default::default(),
        transfer: None,
        arrival: None,
        returns: Vec::new(),
    }
}

/// An empty directory of its own for a test (`name`), and the path of a store in it.
fn fresh_dir(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("vrs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("store.redb");
    (dir, path)
}

#[test]
fn a_document_read_ahead_is_not_taken_once_it_has_changed() {
    let (dir, path) = fresh_dir("preload");
    let store = Store::open(&path).unwrap();
    let actor = ActorId::random();
    let now = time::OffsetDateTime::now_utc();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    Mutation::new(&txn, &mut cache, &actor).create_resident(&record(), now).unwrap();
    txn.commit().unwrap();

    // Read ahead, then the address changes before the writer gets to it.
    let stale = store.read().unwrap().preload(IDX_ATENA, "A1", None, false).unwrap().unwrap();
    assert_eq!(stale.resident_id, "141003-r1");
    let mut moved = record().identity;
    moved.address = "横浜市西区".into();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    Mutation::new(&txn, &mut cache, &actor)
        .apply("141003-r1", &ResidentEvent::IdentityUpdated(moved), now)
        .unwrap();
    txn.commit().unwrap();

    // A writer without the document cached refuses the stale copy and reads the store.
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    let mut m = Mutation::new(&txn, &mut cache, &actor);
    assert!(m.adopt(stale).unwrap().is_none(), "a stale read-ahead must not be taken");
    assert_eq!(m.record("141003-r1").unwrap().unwrap().identity.address, "横浜市西区");
    drop(m);
    drop(txn);

    // A fresh read-ahead is taken, and what it carries is the current record.
    let fresh = store.read().unwrap().preload(IDX_ATENA, "A1", None, false).unwrap().unwrap();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    let mut m = Mutation::new(&txn, &mut cache, &actor);
    let taken = m.adopt(fresh).unwrap().expect("an unchanged read-ahead is taken");
    assert_eq!(taken.identity.address, "横浜市西区");
    // Writing through the taken document keeps the history whole.
    let mut again = taken.identity.clone();
    again.address = "横浜市南区".into();
    m.apply("141003-r1", &ResidentEvent::IdentityUpdated(again), now).unwrap();
    drop(m);
    txn.commit().unwrap();
    let reread = store.read().unwrap().record("141003-r1").unwrap().unwrap();
    assert_eq!(reread.identity.address, "横浜市南区");
    assert!(store.read().unwrap().preload(IDX_ATENA, "missing", None, false).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Moves the resident to `address` through a change applied ahead as `actor`, then hands it
/// to a writer that decided `decided`: returns whether the writer stored it.
fn store_ahead_in(store: &Store, actor: &ActorId, address: &str, decided: &ResidentEvent) -> bool {
    let now = time::OffsetDateTime::now_utc();
    let mut moved = record().identity;
    moved.address = address.into();
    let ahead = store.read().unwrap().preload(IDX_ATENA, "A1", None, false).unwrap().unwrap();
    let ahead = ahead.apply_ahead(actor, ResidentEvent::IdentityUpdated(moved), now).unwrap();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    let writer_actor = ActorId::from(b"writer".as_slice());
    let mut m = Mutation::new(&txn, &mut cache, &writer_actor);
    let stored = m.store_ahead(ahead, decided).unwrap();
    drop(m);
    txn.commit().unwrap();
    stored
}

fn moved_to(address: &str) -> ResidentEvent {
    let mut identity = record().identity;
    identity.address = address.into();
    ResidentEvent::IdentityUpdated(identity)
}

#[test]
fn a_change_applied_ahead_is_stored_only_if_it_is_the_one_decided_on_the_current_document() {
    let (dir, path) = fresh_dir("ahead");
    let store = Store::open(&path).unwrap();
    let writer = ActorId::from(b"writer".as_slice());
    let now = time::OffsetDateTime::now_utc();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    Mutation::new(&txn, &mut cache, &writer).create_resident(&record(), now).unwrap();
    txn.commit().unwrap();
    let address =
        |store: &Store| store.read().unwrap().record("141003-r1").unwrap().unwrap().identity.address;

    // The same event, on the document as it still is, by this node's actor: stored as is,
    // more than COMPACT_AFTER_CHUNKS times, so that one of them is saved as a whole document.
    for n in 0..node::store::COMPACT_AFTER_CHUNKS + 3 {
        let to = format!("横浜市中区{n}");
        assert!(store_ahead_in(&store, &writer, &to, &moved_to(&to)), "change {n} stored");
        assert_eq!(address(&store), to);
    }

    // Another event decided by the writer: nothing written.
    assert!(!store_ahead_in(&store, &writer, "横浜市西区", &moved_to("横浜市南区")));
    // Applied ahead by another actor: nothing written.
    assert!(!store_ahead_in(&store, &ActorId::random(), "横浜市西区", &moved_to("横浜市西区")));
    let last = format!("横浜市中区{}", node::store::COMPACT_AFTER_CHUNKS + 2);
    assert_eq!(address(&store), last);

    // The document changed between the read-ahead and the writer: nothing written.
    let ahead = store.read().unwrap().preload(IDX_ATENA, "A1", None, false).unwrap().unwrap();
    let ahead = ahead.apply_ahead(&writer, moved_to("横浜市西区"), now).unwrap();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    let mut m = Mutation::new(&txn, &mut cache, &writer);
    m.apply("141003-r1", &moved_to("横浜市港北区"), now).unwrap();
    assert!(!m.still_current(&ahead).unwrap());
    assert!(!m.store_ahead(ahead, &moved_to("横浜市西区")).unwrap());
    drop(m);
    txn.commit().unwrap();
    assert_eq!(address(&store), "横浜市港北区");

    // Events that write other tables are not applied ahead.
    let ahead = store.read().unwrap().preload(IDX_ATENA, "A1", None, false).unwrap().unwrap();
    let revoke = ResidentEvent::CouponRevoked { key: "0000000000.1".into(), reason: "test".into() };
    assert!(ahead.apply_ahead(&writer, revoke, now).is_err());

    // What was stored ahead reads back whole after the store is opened again.
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(address(&store), "横浜市港北区");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dose against `coupon`, vaccinated on `on`.
fn dose(
    event_id: &str,
    coupon: &protocol::document::CouponEntry,
    on: time::Date,
) -> protocol::document::DoseEvent {
    protocol::document::DoseEvent {
        event_id: event_id.into(),
        dose_number: coupon.code.dose_round,
        coupon: coupon.code,
        coupon_generation: coupon.generation,
        vaccinated_on: on,
        product_code: "comirnaty-30".into(),
        gtin: protocol::gs1::Gtin::parse("04987000001014").unwrap(),
        lot: "FA5765".into(),
        expiry: time::macros::date!(2027 - 03 - 31),
        venue: "yokohama-arena".into(),
        captured_at: time::OffsetDateTime::now_utc(),
        recorded_by: "staff-1".into(),
        status: protocol::document::DoseStatus::Valid,
    }
}

#[test]
fn a_dose_built_from_the_stored_tip_reads_back_and_the_writers_older_copy_goes() {
    use protocol::document::ResidentEvent::DoseRecorded;
    let (dir, path) = fresh_dir("tip");
    let store = Store::open(&path).unwrap();
    let writer = ActorId::from(b"writer".as_slice());
    let now = time::OffsetDateTime::now_utc();
    let municipality = MunicipalityCode::parse("141003").unwrap();
    let coupons: Vec<_> = (1..=3)
        .map(|round| node::issuance::new_coupon(municipality, round, round.into(), now).unwrap())
        .collect();
    // The writer's cache lives across transactions, as on the writer's thread.
    let mut cache = new_cache(16);
    let write = |cache: &mut node::store::DocCache, f: &dyn Fn(&mut Mutation<'_>)| {
        let txn = store.begin_write().unwrap();
        f(&mut Mutation::new(&txn, cache, &writer));
        txn.commit().unwrap();
    };
    write(&mut cache, &|m| {
        m.create_resident(&record(), now).unwrap();
        for entry in &coupons {
            let issued = ResidentEvent::CouponIssued { entry: entry.clone(), supersedes: None };
            m.apply("141003-r1", &issued, now).unwrap();
        }
    });
    let preload = || store.read().unwrap().preload(IDX_ATENA, "A1", None, true).unwrap().unwrap();
    assert!(!preload().from_tip(), "a document changed through the writer's cache has no tip");

    // Dose 1 applied ahead on the loaded document leaves a tip.
    let first = DoseRecorded(dose("ev-1", &coupons[0], time::macros::date!(2021 - 06 - 01)));
    let ahead = store.read().unwrap().preload(IDX_ATENA, "A1", None, false).unwrap().unwrap();
    let ahead = ahead.apply_ahead(&writer, first.clone(), now).unwrap();
    write(&mut cache, &|m| {
        // The writer reads the document into its cache first.
        assert_eq!(m.record("141003-r1").unwrap().unwrap().doses.len(), 0);
    });
    let txn = store.begin_write().unwrap();
    assert!(Mutation::new(&txn, &mut cache, &writer).store_ahead(ahead, &first).unwrap());
    txn.commit().unwrap();

    // Dose 2 is built from the tip alone; the writer's cached copy (one dose) is dropped,
    // so what the writer reads next has both.
    let tipped = preload();
    assert!(tipped.from_tip());
    assert_eq!(tipped.record().doses.len(), 1);
    let second = DoseRecorded(dose("ev-2", &coupons[1], time::macros::date!(2021 - 06 - 22)));
    let ahead = tipped.apply_ahead(&writer, second.clone(), now).unwrap();
    let txn = store.begin_write().unwrap();
    let mut m = Mutation::new(&txn, &mut cache, &writer);
    assert!(m.store_ahead(ahead, &second).unwrap());
    assert_eq!(
        m.record("141003-r1").unwrap().unwrap().doses.len(),
        2,
        "the writer sees the dose built from the tip"
    );
    drop(m);
    txn.commit().unwrap();
    let read = store.read().unwrap().record("141003-r1").unwrap().unwrap();
    assert_eq!(read.doses.keys().collect::<Vec<_>>(), ["ev-1", "ev-2"]);
    assert_eq!(read.coupons[&coupons[1].key()].used_by_event.as_deref(), Some("ev-2"));
    assert_eq!(preload().record(), &read, "the tip after it is the record the document reads as");

    // A tip another actor left is not used to build this node's change.
    let foreign = preload().apply_ahead(&ActorId::random(), second.clone(), now);
    assert!(foreign.is_err());

    // A change through the writer's cache (a void) leaves no tip behind.
    let void = ResidentEvent::DoseVoided {
        correction: protocol::document::Correction {
            correction_id: "c-1".into(),
            event_id: "ev-2".into(),
            kind: protocol::document::CorrectionKind::Void,
            reason: "誤登録".into(),
            actor: "staff-1".into(),
            at: now,
            before: Default::default(),
            after: Default::default(),
        },
        reopen_coupon: Some(coupons[1].key()),
    };
    write(&mut cache, &|m| m.apply("141003-r1", &void, now).unwrap());
    assert!(!preload().from_tip());

    // Reopened, the store reads the same history.
    drop(cache);
    drop(store);
    let store = Store::open(&path).unwrap();
    let read = store.read().unwrap().record("141003-r1").unwrap().unwrap();
    assert_eq!(read.doses.len(), 2);
    assert_eq!(read.doses["ev-2"].status, protocol::document::DoseStatus::Voided);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Event ids key the event index: ids minted later sort later, so new entries go to its end.
#[test]
fn ids_are_unique_and_sort_in_the_order_they_were_minted() {
    use node::clock::new_id;
    let first = new_id("ev");
    std::thread::sleep(std::time::Duration::from_millis(2));
    let ids: Vec<String> = (0..1000).map(|_| new_id("ev")).collect();
    assert!(ids.iter().all(|id| id.len() == 3 + 32 && id.starts_with("ev-")));
    assert!(ids.iter().all(|id| *id > first), "a later id sorts after an earlier one");
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "no id repeats within a millisecond");
}
