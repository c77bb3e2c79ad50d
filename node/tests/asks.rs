//! The 転入 requests a register extract makes: however many are open, every one reaches
//! the national node in turn, and a store written before open requests were kept apart finds
//! its own when it is opened.

use std::collections::BTreeSet;

use node::config::NodeFiles;
use node::handoff::{AskEntry, AskLocal, HandoffService};
use node::import::{Encoding, ImportOutcome, import_file};
use node::store::{HANDOFF_ASKS, HANDOFF_DUE, META, Store};
use protocol::checkdigit::my_number_check_digit;
use protocol::municipality::MunicipalityCode;
use protocol::person::PersonKeySecret;
use redb::ReadableTable;

fn my_number(serial: u64) -> String {
    let mut first11 = [0u8; 11];
    let mut n = serial;
    for digit in first11.iter_mut().rev() {
        *digit = (n % 10) as u8;
        n /= 10;
    }
    first11[0] = 5;
    let text: String = first11.iter().map(|d| char::from(b'0' + d)).collect();
    format!("{text}{}", my_number_check_digit(&first11))
}

/// An extract of `asked` newcomers from Chiyoda who moved in during the campaign, and two
/// who moved in before it began.
fn extract(path: &std::path::Path, asked: u64) {
    let mut text =
        String::from("宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号,転入日,前住所市区町村コード\n");
    for i in 0..asked + 2 {
        let moved_in = if i < asked { "2021-06-01" } else { "2020-01-01" };
        text.push_str(&format!(
            "N{i:05},転入　太郎,テンニュウ タロウ,1980-01-01,男,横浜市中区{i},{},{moved_in},131016\n",
            my_number(i + 1)
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn open_ask_keys(store: &Store) -> BTreeSet<String> {
    let view = store.read().unwrap();
    let due = view.txn().open_table(HANDOFF_DUE).unwrap();
    due.iter()
        .unwrap()
        .map(|row| row.unwrap().0.value().to_owned())
        .filter_map(|key| key.strip_prefix("ask/").map(str::to_owned))
        .collect()
}

#[test]
fn every_open_ask_is_sent_in_turn_and_an_older_store_finds_its_own() {
    let fixture = super::Fixture::new("asks");
    let dir = fixture.dir.clone();
    let files = NodeFiles::load(&dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let csv = dir.join("extract.csv");
    extract(&csv, 300);
    let ImportOutcome::Applied(report) = import_file(&files, &store, &csv, Encoding::Auto, None).unwrap()
    else {
        panic!("the extract was refused");
    };
    assert_eq!((report.created, report.asked), (302, 300), "{report:?}");
    let open = open_ask_keys(&store);
    assert_eq!(open.len(), 300);

    // More open asks than one message holds: two syncs send them all.
    let secret = PersonKeySecret::new(&node::config::read_secret32(&dir, "keys/person-key.secret").unwrap());
    let encryption = node::config::read_secret32(&dir, "keys/encryption.key").unwrap();
    let municipality = files.config.municipality;
    let started = node::daemon::start(files, store.clone()).unwrap();
    let service = HandoffService::new(
        store.clone(),
        started.state.writer.clone(),
        municipality,
        secret,
        encryption,
        false,
        None,
    );
    let first = service.build_sync().unwrap();
    let second = service.build_sync().unwrap();
    assert_eq!(first.asks.len(), protocol::handoff::MAX_HANDOFFS_PER_MESSAGE);
    let sent: BTreeSet<String> =
        first.asks.iter().chain(&second.asks).map(|ask| ask.person_key.clone()).collect();
    assert_eq!(sent, open, "every open ask is sent within two syncs");
    assert!(first.asks.iter().all(|ask| ask.previous == Some(MunicipalityCode::parse("131016").unwrap())));
    let node::daemon::Started { state, writer_thread, .. } = started;
    drop((service, state));
    writer_thread.join().unwrap();

    // A store from before: asks without due entries, one of them answered.
    let answered = open.iter().next().unwrap().clone();
    let txn = store.begin_write().unwrap();
    {
        let mut asks = txn.open_table(HANDOFF_ASKS).unwrap();
        let mut ask: AskEntry =
            serde_json::from_slice(asks.get(answered.as_str()).unwrap().unwrap().value()).unwrap();
        ask.state = AskLocal::NotFound;
        asks.insert(answered.as_str(), serde_json::to_vec(&ask).unwrap().as_slice()).unwrap();
        let mut due = txn.open_table(HANDOFF_DUE).unwrap();
        for key in &open {
            due.remove(format!("ask/{key}").as_str()).unwrap();
        }
        txn.open_table(META).unwrap().remove("asks_due").unwrap();
    }
    txn.commit().unwrap();
    assert!(open_ask_keys(&store).is_empty());
    drop(store);
    let store = Store::open(&dir.join("store.redb")).unwrap();
    let mut expected = open.clone();
    expected.remove(&answered);
    assert_eq!(open_ask_keys(&store), expected, "the open asks are found again, the answered one is not");
}
