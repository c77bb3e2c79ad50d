//! A document read ahead of the writer is taken only while nothing has changed it since.

use automerge::ActorId;
use node::store::{IDX_ATENA, Mutation, Store, new_cache};
use protocol::document::{Identity, ResidentEvent, ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex};
use protocol::municipality::MunicipalityCode;

fn record() -> ResidentRecord {
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
    }
}

#[test]
fn a_document_read_ahead_is_not_taken_once_it_has_changed() {
    let dir = std::env::temp_dir().join(format!("vrs-preload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open(&dir.join("store.redb")).unwrap();
    let actor = ActorId::random();
    let now = time::OffsetDateTime::now_utc();
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(16);
    Mutation::new(&txn, &mut cache, &actor).create_resident(&record(), now).unwrap();
    txn.commit().unwrap();

    // Read ahead, then the address changes before the writer gets to it.
    let stale = store.read().unwrap().preload(IDX_ATENA, "A1", None).unwrap().unwrap();
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
    let fresh = store.read().unwrap().preload(IDX_ATENA, "A1", None).unwrap().unwrap();
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
    assert!(store.read().unwrap().preload(IDX_ATENA, "missing", None).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
