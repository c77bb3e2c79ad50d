//! The national relocation ledger in-process: deposits are stored once, only from the
//! municipality that holds the person and only when signed by it; acceptance moves the
//! holder; repeated and reordered messages change nothing; asks are relayed to the holder;
//! a handoff sent back gives the person back to its sender.

use node::ledger::{entries, holder, sync};
use protocol::directory::{Directory, DirectoryEntry, NodeRole};
use protocol::document::{Identity, ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex};
use protocol::handoff::{
    AskAnswer, AskState, DepositOutcome, HandoffPayload, HandoffResponse, HandoffSync, HistoryAsk,
    LedgerState, ReturnReason, ReturnedHandoff, SealedHandoff, seal,
};
use protocol::municipality::MunicipalityCode;
use ring::signature::{Ed25519KeyPair, KeyPair};
use time::OffsetDateTime;

struct Member {
    code: MunicipalityCode,
    key: Ed25519KeyPair,
    secret: [u8; 32],
}

fn member(code: &str, seed: u8) -> Member {
    Member {
        code: MunicipalityCode::parse(code).unwrap(),
        key: Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap(),
        secret: [seed.wrapping_add(100); 32],
    }
}

fn public(secret: [u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes()
}

fn directory(members: &[&Member]) -> Directory {
    let entries = members
        .iter()
        .map(|m| DirectoryEntry {
            municipality: Some(m.code),
            role: NodeRole::Municipal,
            peer_id: format!("peer-{}", m.code),
            addresses: Vec::new(),
            coupon_key: protocol::person::hex_lower(m.key.public_key().as_ref()),
            encryption_key: protocol::person::hex_lower(&public(m.secret)),
        })
        .collect();
    Directory { version: 2, issued_at: "2026-11-25T00:00:00Z".into(), entries }
}

fn sealed(id: &str, person_key: &str, from: &Member, to: &Member) -> SealedHandoff {
    let record = ResidentRecord {
        schema: SCHEMA_VERSION,
        resident_id: format!("{}-r", from.code),
        municipality: from.code,
        person_key: person_key.to_owned(),
        identity: Identity {
            atena_number: "1".into(),
            name: "山田　太郎".into(),
            name_kana: "ヤマダ タロウ".into(),
            birth_date: time::macros::date!(1960 - 04 - 01),
            sex: Sex::Male,
            address: "横浜市".into(),
            status: ResidentStatus::MovedOut,
        },
        coupons: Default::default(),
        doses: Default::default(),
        corrections: Default::default(),
        transfer: None,
        arrival: None,
        returns: Vec::new(),
    };
    let payload = HandoffPayload {
        handoff_id: id.to_owned(),
        from: from.code,
        to: to.code,
        person_key: person_key.to_owned(),
        record,
        sealed_at: "2026-11-25T01:00:00Z".into(),
    };
    seal(&payload, &from.key, &public(to.secret), [7; 32]).unwrap()
}

fn empty() -> HandoffSync {
    HandoffSync {
        deposits: vec![],
        accepted: vec![],
        watching: vec![],
        asks: vec![],
        answered: vec![],
        returned: vec![],
    }
}

struct Answer {
    deposits: Vec<(String, DepositOutcome)>,
    inbound: Vec<SealedHandoff>,
    states: Vec<(String, LedgerState)>,
    asks: Vec<(String, AskState)>,
    requests: Vec<protocol::handoff::HistoryRequest>,
    returns: Vec<(String, ReturnReason)>,
}

fn run(db: &redb::Database, dir: &Directory, sender: &Member, request: HandoffSync) -> Answer {
    match sync(db, dir, sender.code, &request, OffsetDateTime::now_utc()).unwrap() {
        HandoffResponse::Synced { deposits, inbound, states, asks, requests, returns } => {
            Answer { deposits, inbound, states, asks, requests, returns }
        }
        HandoffResponse::Refused { code, message } => panic!("refused: {code}: {message}"),
    }
}

fn code_of(outcome: &DepositOutcome) -> &str {
    match outcome {
        DepositOutcome::Stored => "stored",
        DepositOutcome::Refused { code, .. } => code,
    }
}

#[test]
fn the_ledger_keeps_one_holder_per_person_through_repeats_and_reordering() {
    let path = std::env::temp_dir().join(format!("vrs-ledger-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let db = redb::Database::create(&path).unwrap();
    node::ledger::create_tables(&db).unwrap();
    let (a, b, c) = (member("141003", 1), member("131016", 2), member("271004", 3));
    let dir = directory(&[&a, &b, &c]);
    let p = "pk1-0001";
    let h1 = sealed("ho-1", p, &a, &b);

    // An acceptance before the deposit, and a watch of an unknown handoff, change nothing.
    let early = run(&db, &dir, &b, HandoffSync { accepted: vec!["ho-1".into()], ..empty() });
    assert!(early.inbound.is_empty());
    let unknown = run(&db, &dir, &a, HandoffSync { watching: vec!["ho-1".into()], ..empty() });
    assert_eq!(unknown.states, vec![("ho-1".to_owned(), LedgerState::Unknown)]);

    // Deposited once, however often it is sent.
    for _ in 0..3 {
        let answer = run(&db, &dir, &a, HandoffSync { deposits: vec![h1.clone()], ..empty() });
        assert_eq!(code_of(&answer.deposits[0].1), "stored");
    }
    assert_eq!(entries(&db, None).unwrap().len(), 1);
    // Only its sender, signed by it, about a person it holds, while none is in transit.
    let relayed = run(&db, &dir, &c, HandoffSync { deposits: vec![h1.clone()], ..empty() });
    assert_eq!(code_of(&relayed.deposits[0].1), "wrong_municipality");
    let twice = run(&db, &dir, &a, HandoffSync { deposits: vec![sealed("ho-2", p, &a, &c)], ..empty() });
    assert_eq!(code_of(&twice.deposits[0].1), "in_transit");
    let mut forged = sealed("ho-3", "pk1-0003", &a, &b);
    forged.ciphertext[0] ^= 1;
    let answer = run(&db, &dir, &a, HandoffSync { deposits: vec![forged], ..empty() });
    assert_eq!(code_of(&answer.deposits[0].1), "bad_signature");
    let reused = SealedHandoff { to: c.code, ..sealed("ho-1", p, &a, &c) };
    let answer = run(&db, &dir, &a, HandoffSync { deposits: vec![reused], ..empty() });
    assert_eq!(code_of(&answer.deposits[0].1), "id_reused");
    assert_eq!(entries(&db, None).unwrap().len(), 1, "refusals store nothing");

    // The receiver fetches it as often as it asks until it accepts; then the holder moves.
    for _ in 0..2 {
        let fetched = run(&db, &dir, &b, empty());
        assert_eq!(fetched.inbound, vec![h1.clone()]);
    }
    assert!(run(&db, &dir, &c, empty()).inbound.is_empty(), "only the receiver gets it");
    for _ in 0..2 {
        let answer = run(&db, &dir, &b, HandoffSync { accepted: vec!["ho-1".into()], ..empty() });
        assert!(answer.inbound.is_empty());
    }
    let held = holder(&db, p).unwrap().unwrap();
    assert_eq!((held.holder, held.in_transit), (b.code, None));
    let watched = run(&db, &dir, &a, HandoffSync { watching: vec!["ho-1".into()], ..empty() });
    assert_eq!(watched.states, vec![("ho-1".to_owned(), LedgerState::Accepted)]);
    let listed = entries(&db, None).unwrap();
    assert!(listed[0].sealed.is_none(), "the envelope is dropped once accepted");
    // Another municipality's acceptance is ignored; the old holder cannot hand them on again.
    run(&db, &dir, &c, HandoffSync { accepted: vec!["ho-1".into()], ..empty() });
    assert_eq!(holder(&db, p).unwrap().unwrap().holder, b.code);
    let stale = run(&db, &dir, &a, HandoffSync { deposits: vec![sealed("ho-4", p, &a, &c)], ..empty() });
    assert_eq!(code_of(&stale.deposits[0].1), "not_holder");
    let onward = run(&db, &dir, &b, HandoffSync { deposits: vec![sealed("ho-5", p, &b, &c)], ..empty() });
    assert_eq!(code_of(&onward.deposits[0].1), "stored");

    // A newcomer at C, said to come from A: relayed to A; A's handoff answers it.
    let q = "pk1-0002";
    let ask = HistoryAsk {
        ask_id: "ask-1".into(),
        person_key: q.into(),
        birth_check: "bc1-x".into(),
        previous: Some(a.code),
    };
    let asked = run(&db, &dir, &c, HandoffSync { asks: vec![ask.clone()], ..empty() });
    assert_eq!(asked.asks, vec![(q.to_owned(), AskState::Waiting { holder: a.code })]);
    let request = run(&db, &dir, &a, empty()).requests;
    assert_eq!(request.len(), 1);
    assert_eq!((request[0].person_key.as_str(), request[0].asked_by), (q, c.code));
    assert_eq!(request[0].birth_check, "bc1-x", "the holder gets the asker's birth check");
    let sent = sealed("ho-6", q, &a, &c);
    let answered = AskAnswer { person_key: q.into(), asked_by: c.code, handoff_id: Some("ho-6".into()) };
    let answer =
        run(&db, &dir, &a, HandoffSync { deposits: vec![sent], answered: vec![answered], ..empty() });
    assert_eq!(code_of(&answer.deposits[0].1), "stored");
    assert!(answer.requests.is_empty(), "the request is done");
    let after = run(&db, &dir, &c, HandoffSync { asks: vec![ask], ..empty() });
    assert_eq!(after.asks, vec![(q.to_owned(), AskState::Sent { handoff_id: "ho-6".into() })]);
    // Nobody holds a person the ledger never saw when no previous municipality is given;
    // asked again with one (a new ask id), the ask goes to it.
    let lost = HistoryAsk {
        ask_id: "ask-2".into(),
        person_key: "pk1-0009".into(),
        birth_check: "bc1-y".into(),
        previous: None,
    };
    let answer = run(&db, &dir, &c, HandoffSync { asks: vec![lost.clone()], ..empty() });
    assert_eq!(answer.asks[0].1, AskState::NotFound);
    let again = HistoryAsk { ask_id: "ask-3".into(), previous: Some(a.code), ..lost };
    let answer = run(&db, &dir, &c, HandoffSync { asks: vec![again.clone()], ..empty() });
    assert_eq!(answer.asks[0].1, AskState::Waiting { holder: a.code });
    let repeated = run(&db, &dir, &c, HandoffSync { asks: vec![again], ..empty() });
    assert_eq!(
        repeated.asks[0].1,
        AskState::Waiting { holder: a.code },
        "the same ask again changes nothing"
    );
    assert_eq!(run(&db, &dir, &a, empty()).requests.len(), 1);

    // Too much in one sync is refused whole.
    let many = HandoffSync { deposits: vec![sealed("ho-7", "pk1-7", &a, &b); 257], ..empty() };
    let refused = sync(&db, &dir, a.code, &many, OffsetDateTime::now_utc()).unwrap();
    assert!(matches!(refused, HandoffResponse::Refused { ref code, .. } if code == "too_large"));
    drop(db);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_handoff_sent_back_returns_the_person_to_its_sender_once() {
    let path = std::env::temp_dir().join(format!("vrs-ledger-return-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let db = redb::Database::create(&path).unwrap();
    node::ledger::create_tables(&db).unwrap();
    let (a, b, c) = (member("141003", 1), member("131016", 2), member("271004", 3));
    let dir = directory(&[&a, &b, &c]);
    let p = "pk1-0100";
    let stored = run(&db, &dir, &a, HandoffSync { deposits: vec![sealed("ho-1", p, &a, &b)], ..empty() });
    assert_eq!(code_of(&stored.deposits[0].1), "stored");
    let back = |reason| ReturnedHandoff { handoff_id: "ho-1".into(), reason };

    // Only the receiver can send it back: C's message changes nothing.
    run(&db, &dir, &c, HandoffSync { returned: vec![back(ReturnReason::Other)], ..empty() });
    assert_eq!(run(&db, &dir, &b, empty()).inbound.len(), 1, "still waiting for B");

    // B sends it back (twice: a repeated message); the first reason stays.
    run(&db, &dir, &b, HandoffSync { returned: vec![back(ReturnReason::BirthDateDiffers)], ..empty() });
    run(&db, &dir, &b, HandoffSync { returned: vec![back(ReturnReason::Other)], ..empty() });
    assert!(run(&db, &dir, &b, empty()).inbound.is_empty(), "no longer offered to B");
    let held = holder(&db, p).unwrap().unwrap();
    assert_eq!((held.holder, held.in_transit), (a.code, None), "A holds the person again");
    let watched = run(&db, &dir, &a, HandoffSync { watching: vec!["ho-1".into()], ..empty() });
    assert_eq!(watched.states, vec![("ho-1".to_owned(), LedgerState::Returned)]);
    assert_eq!(watched.returns, vec![("ho-1".to_owned(), ReturnReason::BirthDateDiffers)]);
    let listed = entries(&db, None).unwrap();
    assert!(listed[0].sealed.is_none(), "the envelope is dropped once sent back");
    assert_eq!(listed[0].returned, Some(ReturnReason::BirthDateDiffers));

    // A late acceptance of the returned handoff does not make B the holder.
    run(&db, &dir, &b, HandoffSync { accepted: vec!["ho-1".into()], ..empty() });
    assert_eq!(holder(&db, p).unwrap().unwrap().holder, a.code);
    // A may hand the person on again, to anyone; an accepted handoff cannot be sent back.
    let again = run(&db, &dir, &a, HandoffSync { deposits: vec![sealed("ho-2", p, &a, &c)], ..empty() });
    assert_eq!(code_of(&again.deposits[0].1), "stored");
    run(&db, &dir, &c, HandoffSync { accepted: vec!["ho-2".into()], ..empty() });
    let late = ReturnedHandoff { handoff_id: "ho-2".into(), reason: ReturnReason::Other };
    run(&db, &dir, &c, HandoffSync { returned: vec![late], ..empty() });
    assert_eq!(holder(&db, p).unwrap().unwrap().holder, c.code);
    let watched = run(&db, &dir, &a, HandoffSync { watching: vec!["ho-2".into()], ..empty() });
    assert_eq!(watched.states, vec![("ho-2".to_owned(), LedgerState::Accepted)]);
    assert!(watched.returns.is_empty());

    // The ledger's own refusal is not a receiver's reason: B's claim of it reaches C as
    // `other`, so C's staff do not read a refusal the ledger never made.
    let moved = run(&db, &dir, &c, HandoffSync { deposits: vec![sealed("ho-3", p, &c, &b)], ..empty() });
    assert_eq!(code_of(&moved.deposits[0].1), "stored");
    let claimed = ReturnedHandoff { handoff_id: "ho-3".into(), reason: ReturnReason::LedgerRefused };
    run(&db, &dir, &b, HandoffSync { returned: vec![claimed], ..empty() });
    let watched = run(&db, &dir, &c, HandoffSync { watching: vec!["ho-3".into()], ..empty() });
    assert_eq!(watched.returns, vec![("ho-3".to_owned(), ReturnReason::Other)]);
    assert_eq!(holder(&db, p).unwrap().unwrap().holder, c.code);
    drop(db);
    let _ = std::fs::remove_file(&path);
}
