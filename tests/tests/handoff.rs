//! Relocation with real processes: Yokohama (141003) hands residents to Chiyoda (131016)
//! through the national node, which relays sealed envelopes it cannot read. Each handoff is
//! done once whatever is killed between two of its steps; a newcomer registered in Chiyoda
//! fetches their history; a terminal of Yokohama refuses a moved resident's coupon, or, if it
//! was offline, its dose is forwarded to Chiyoda (and on, through Sapporo, for a resident who
//! keeps moving); a movers file is processed in one go.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{Node, PrintedCoupon, Proxy, TempDir, free_port, write_shift_jis};

use super::federation::{National, join, standby_of};
use super::terminals::{
    assert_no_personal_data, enrol_token, events_of, national_figures, own_figures, p2p, resident_id, scan,
    state_of, terminal, wait_for,
};
use super::{COMIRNATY, add_comirnaty_lot, capture, coupon_of, my_number, ok, raw_vial, set_up_fixture};

const YOKOHAMA: &str = "141003";
const CHIYODA: &str = "131016";
const VENUE: &str = "naka-kumin-kaikan";

struct Federation {
    dir: TempDir,
    national: National,
    admin: String,
    analyst: String,
    a: Node,
    b: Node,
    coupons: Vec<PrintedCoupon>,
    /// Yokohama's p2p address as others dial it, through a proxy the test can cut.
    proxy: Proxy,
}

/// National, Yokohama (the fixture, with coupons and a lot; reached through a proxy) and
/// Chiyoda, approved into the directory. Nothing runs yet.
fn federation(label: &str) -> Federation {
    let dir = TempDir::new(label);
    let national = National::init(dir.path());
    let admin = national.token("admin", "national_admin", None);
    let analyst = national.token("analyst", "national_analyst", None);
    let (listen, port) = p2p();
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let a =
        Node::init_with(&dir.path().join("a"), YOKOHAMA, &["--plain-http", "--p2p-listen", &listen]).unwrap();
    let config = a.data.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let advertised = format!("[p2p]\nadvertise = \"/ip4/127.0.0.1/tcp/{}\"\n", proxy.port);
    std::fs::write(&config, text.replacen("[p2p]\n", &advertised, 1)).unwrap();
    let coupons = set_up_fixture(&a, &dir.path().join("a"));
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    // The federation's person-key secret is shared by every municipality: the same 個人番号
    // gives the same person key everywhere.
    let secret = a.data.join("keys/person-key.secret");
    let b = Node::init_with(
        &dir.path().join("b"),
        CHIYODA,
        &["--plain-http", "--p2p-listen", &listen, "--person-key-secret", secret.to_str().unwrap()],
    )
    .unwrap();
    add_comirnaty_lot(&b);
    national.approve(&join(&a, &national, "a"));
    national.approve(&join(&b, &national, "b"));
    Federation { dir, national, admin, analyst, a, b, coupons, proxy }
}

fn start_all(f: &mut Federation) {
    f.national.start();
    f.a.start().unwrap();
    f.b.start().unwrap();
}

/// Makes `node` leave received handoffs to an admin (`[handoff] accept = "manual"`).
fn accept_by_hand(node: &Node) {
    let config = node.data.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("[handoff]\naccept = \"auto\""), "{text}");
    std::fs::write(&config, text.replace("[handoff]\naccept = \"auto\"", "[handoff]\naccept = \"manual\""))
        .unwrap();
}

/// Starts everything and a Yokohama terminal at the venue, once it holds its bundle: the
/// terminal, 渡邊's first coupon and a vial.
fn start_with_kiosk(f: &mut Federation) -> (Node, PrintedCoupon, String) {
    let token = enrol_token(&f.a, VENUE);
    start_all(f);
    let mut kiosk = terminal(f.dir.path(), "t", YOKOHAMA, &token);
    kiosk.start().unwrap();
    let watanabe = coupon_of(&f.coupons, "0000000105", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    wait_for("the terminal to have its bundle", Duration::from_secs(30), || {
        let status = kiosk.get("/api/v1/status").unwrap().1;
        status["bundle_version"].as_u64().filter(|v| *v > 0)
    });
    (kiosk, watanabe, vial)
}

/// Moves the resident with `atena` out of Yokohama to Chiyoda once Yokohama's directory
/// names Chiyoda; `None` when the node died answering (a crash point).
fn move_out(a: &Node, atena: &str) -> Option<(u16, Value)> {
    let resident = resident_id(a, atena);
    let path = format!("/api/v1/residents/{resident}/move-out");
    let body = json!({"to": CHIYODA, "reason": "転出届（千代田区）"});
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match a.post(&path, &body) {
            Ok((409, answer)) if answer["code"] == "receiver_not_in_federation" => {
                assert!(std::time::Instant::now() < deadline, "Yokohama never learnt Chiyoda's key");
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(answer) => return Some(answer),
            Err(_) => return None,
        }
    }
}

/// Moves `resident` out of `node` to `to` (201), once `node`'s directory names `to`.
fn move_to(node: &Node, resident: &str, to: &str) {
    let path = format!("/api/v1/residents/{resident}/move-out");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = node.post(&path, &json!({"to": to, "reason": "転出届"})).unwrap();
        if code == 409 && body["code"] == "receiver_not_in_federation" {
            assert!(std::time::Instant::now() < deadline, "{to} never joined: {body}");
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        assert_eq!(code, 201, "{body}");
        return;
    }
}

/// Waits until the national figures of `day` equal each municipality's own, all sent.
fn national_equals_own(f: &Federation, day: &str) {
    for (node, code) in [(&f.a, YOKOHAMA), (&f.b, CHIYODA)] {
        wait_for("the national figures to equal the municipality's", Duration::from_secs(30), || {
            let (own, unsent) = own_figures(node, day);
            let national = national_figures(&f.national, &f.analyst, &format!("municipality={code}"), day);
            (unsent == 0 && national == own).then_some(())
        });
    }
}

fn handoffs(node: &Node) -> Value {
    let (code, body) = node.get("/api/v1/handoffs").unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

/// The resident created by the first handoff `node` has accepted, if any.
fn accepted_at(node: &Node) -> Option<String> {
    let incoming = handoffs(node)["incoming"].as_array().unwrap().clone();
    incoming
        .into_iter()
        .find(|e| e["state"] == "accepted")
        .map(|e| e["resident_id"].as_str().unwrap().to_owned())
}

/// The node's `outgoing` or `incoming` handoffs of one person.
fn of_person(node: &Node, list: &str, person_key: &str) -> Vec<Value> {
    handoffs(node)[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["person_key"] == person_key)
        .cloned()
        .collect()
}

fn ledger(f: &Federation, person_key: &str) -> Vec<Value> {
    let body = f.national.json(&format!("/api/v1/national/handoffs?person_key={person_key}"), &f.admin);
    body["handoffs"].as_array().unwrap().clone()
}

fn record(node: &Node, resident: &str) -> Value {
    let (code, body) = node.get(&format!("/api/v1/residents/{resident}")).unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until the handoff of `person_key` is accepted at Chiyoda, acknowledged in the
/// ledger and completed at Yokohama; returns Chiyoda's incoming entry.
fn settled(f: &Federation, person_key: &str) -> Value {
    let entry = wait_for("the handoff to settle", Duration::from_secs(60), || {
        let incoming = handoffs(&f.b)["incoming"].as_array().unwrap().clone();
        let entry = incoming.into_iter().find(|e| e["person_key"] == person_key)?;
        let outgoing = handoffs(&f.a)["outgoing"].as_array().unwrap().clone();
        let completed = outgoing.iter().any(|e| e["person_key"] == person_key && e["state"] == "completed");
        let ledger = ledger(f, person_key);
        let accepted = ledger.iter().any(|e| e["state"] == "accepted");
        (entry["state"] == "accepted" && entry["acked"] == true && completed && accepted).then_some(entry)
    });
    assert!(entry.get("due_key").is_none(), "nothing is left to do for it: {entry}");
    entry
}

/// Scans `coupon` at Yokohama's terminal while it is cut off (it records the dose offline),
/// reconnects it, and waits up to a minute for the capture's final state: (event id, state).
fn scan_offline_then_heal(
    f: &Federation,
    kiosk: &Node,
    coupon: &PrintedCoupon,
    vial: &str,
) -> (String, Value) {
    let (code, body) = scan(kiosk, coupon, vial, VENUE);
    assert_eq!(code, 201, "offline, the terminal records it: {body}");
    let event = body["event_id"].as_str().unwrap().to_owned();
    f.proxy.heal();
    let mut state = Value::Null;
    for _ in 0..600 {
        state = state_of(kiosk, &event);
        if state["state"] == "recorded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (event, state)
}

/// Exactly one handoff, one active owner, the same history on both sides.
fn assert_moved_once(f: &Federation, atena: &str) -> (String, String) {
    let old = resident_id(&f.a, atena);
    let at_a = wait_for("Yokohama to hand the record over", Duration::from_secs(30), || {
        let at_a = record(&f.a, &old);
        (!at_a["transfer"].is_null()).then_some(at_a)
    });
    assert_eq!(at_a["transfer"]["to"], CHIYODA, "{at_a}");
    assert_eq!(at_a["identity"]["status"], "moved_out");
    assert!(at_a["valid_coupons"].as_array().unwrap().is_empty(), "no valid coupon stays at Yokohama");
    let person_key = handoffs(&f.a)["outgoing"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resident_id"] == old.as_str())
        .map(|e| e["person_key"].as_str().unwrap().to_owned())
        .expect("an outgoing handoff");
    let entry = settled(f, &person_key);
    let outgoing = of_person(&f.a, "outgoing", &person_key);
    assert_eq!(outgoing.len(), 1, "one handoff sealed: {outgoing:?}");
    let incoming = of_person(&f.b, "incoming", &person_key);
    assert_eq!(incoming.len(), 1, "one handoff received: {incoming:?}");
    let ledger = ledger(f, &person_key);
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0]["from"], YOKOHAMA);
    assert_eq!(ledger[0]["to"], CHIYODA);
    assert!(ledger[0].get("sealed").is_none(), "the ledger drops the envelope once accepted");
    let new = entry["resident_id"].as_str().unwrap().to_owned();
    let at_b = record(&f.b, &new);
    assert_eq!(at_b["identity"]["status"], "active");
    assert_eq!(at_b["municipality"], CHIYODA);
    assert_eq!(events_of(&f.b, &new), events_of(&f.a, &old), "the same history, each dose once");
    let next = at_b["next_dose"].as_u64().unwrap();
    let valid = at_b["valid_coupons"].as_array().unwrap();
    assert_eq!(valid.len(), 1, "one valid coupon at Chiyoda: {valid:?}");
    let code = valid[0]["code"].as_str().unwrap();
    assert_eq!(&code[1..2], next.to_string(), "the new coupon continues the count");
    assert_eq!(&code[2..8], CHIYODA);
    assert_eq!(entry["coupon"].as_str(), Some(code));
    for dose in at_b["history"].as_array().unwrap() {
        assert!(dose["venue"].as_str().unwrap().starts_with("141003/"), "{dose}");
    }
    (old, new)
}

#[test]
fn relocation_moves_a_history_once_and_the_national_node_cannot_read_it() {
    let mut f = federation("handoff");
    let token = enrol_token(&f.a, VENUE);
    let kudan = "kudan-kaikan";
    let token_b = enrol_token(&f.b, kudan);
    start_all(&mut f);
    let mut kiosk = terminal(f.dir.path(), "t", YOKOHAMA, &token);
    kiosk.start().unwrap();

    // 山田 is vaccinated in Yokohama, then moves to Chiyoda.
    let yamada = coupon_of(&f.coupons, "0000000101", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&yamada.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    let (code, body) = move_out(&f.a, "0000000101").unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["state"], "sealed");
    assert!(body.get("sealed").is_none(), "the API never shows the envelope");
    let (old, new) = assert_moved_once(&f, "0000000101");
    let history = record(&f.b, &new)["history"].clone();
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert_eq!(history[0]["dose_number"], 1);

    // Done once: moving again, or registering them again at Chiyoda, is refused.
    let (code, body) = move_out(&f.a, "0000000101").unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("already_transferred")), "{body}");
    let again = json!({"my_number": my_number(1), "birth_date": "1960-04-01", "atena_number": "C-0001", "address": "東京都千代田区九段南1-2-1"});
    let (code, body) = f.b.post("/api/v1/handoffs/requests", &again).unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("already_registered")), "{body} {}", handoffs(&f.b));
    // Yokohama's record is kept, read-only.
    let void = json!({"reason": "誤登録"});
    let event = history[0]["event_id"].as_str().unwrap();
    let (code, body) = f.a.post(&format!("/api/v1/residents/{old}/doses/{event}/void"), &void).unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("resident_transferred")), "{body}");

    // 伊藤 moves with an unused coupon: Yokohama refuses it, naming Chiyoda — at the node and
    // at a terminal that synced after the move.
    let ito = coupon_of(&f.coupons, "0000000106", 1).clone();
    let blocked_before = kiosk.get("/api/v1/status").unwrap().1["blocked_coupons"].as_u64().unwrap();
    assert_eq!(move_out(&f.a, "0000000106").unwrap().0, 201);
    let (code, body) = f.a.post("/api/v1/captures", &capture(&ito.qr_text, &vial, None)).unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("coupon_transferred")), "{body}");
    assert!(body["title"].as_str().unwrap().contains("千代田区"), "{body}");
    wait_for("the terminal to learn of the move", Duration::from_secs(30), || {
        let blocked = kiosk.get("/api/v1/status").unwrap().1["blocked_coupons"].as_u64().unwrap();
        (blocked > blocked_before).then_some(())
    });
    let (code, body) = scan(&kiosk, &ito, &vial, VENUE);
    assert_eq!((code, body["code"].as_str()), (409, Some("coupon_transferred")), "{body}");
    assert!(body["title"].as_str().unwrap().contains("千代田区（131016）"), "{body}");
    assert_moved_once(&f, "0000000106");

    // 中村 is vaccinated at a Yokohama terminal that is offline and never heard of the
    // move: the dose reaches Chiyoda's record once the terminal is back.
    let nakamura = coupon_of(&f.coupons, "0000000107", 1).clone();
    f.proxy.block();
    assert_eq!(move_out(&f.a, "0000000107").unwrap().0, 201);
    let (_, new_nakamura) = assert_moved_once(&f, "0000000107");
    let (event, state) = scan_offline_then_heal(&f, &kiosk, &nakamura, &vial);
    assert_eq!(state["state"], "recorded", "the offline dose reached Chiyoda: {state}");
    assert_eq!(state["owner"], CHIYODA, "{state}");
    let events = events_of(&f.b, &new_nakamura);
    assert_eq!(events.get(&event), Some(&1), "the dose is in the record once: {events:?}");
    let at_b = record(&f.b, &new_nakamura);
    let dose = at_b["history"][0].clone();
    assert_eq!(dose["venue"], "141003/naka-kumin-kaikan", "{dose}");
    // Yokohama's coupon, now used, stays beside the one Chiyoda issued for the same dose when
    // it accepted the handoff, even where the two municipalities' coupon numbers coincide.
    // That one is revoked in the same transaction: the dose is given, a venue would refuse
    // it, and the next issuance gives the second dose's.
    let old_coupon = &at_b["coupons"][format!("{}.00", &nakamura.code[2..])];
    assert_eq!(old_coupon["status"], "used", "{}", at_b["coupons"]);
    assert!(at_b["valid_coupons"].as_array().unwrap().is_empty(), "{}", at_b["valid_coupons"]);
    let coupons = at_b["coupons"].as_object().unwrap();
    let revoked: Vec<&Value> = coupons.values().filter(|c| c["status"] == "revoked").collect();
    assert_eq!(revoked.len(), 1, "{}", at_b["coupons"]);
    let own = revoked[0]["code"].as_str().unwrap();
    assert_eq!((&own[1..2], &own[2..8]), ("1", CHIYODA), "{}", revoked[0]);
    assert!(coupons.contains_key(&format!("{}.00", &own[2..])), "{}", at_b["coupons"]);
    let reason = revoked[0]["status_reason"].as_str().unwrap();
    assert!(reason.contains("1回目は横浜市の接種券で接種済み") && reason.contains(&event), "{reason}");

    // 小林 moves to Chiyoda and comes to a Chiyoda venue with Yokohama's coupon. Chiyoda's
    // terminal cannot know of the move (it blocks only Chiyoda's coupons), so Chiyoda forwards
    // the dose to Yokohama as one given away from home; Yokohama passes it on to Chiyoda,
    // which records it against the carried coupon.
    let mut kiosk_b = terminal(f.dir.path(), "tb", CHIYODA, &token_b);
    kiosk_b.start().unwrap();
    let kobayashi = coupon_of(&f.coupons, "0000000108", 1).clone();
    assert_eq!(move_out(&f.a, "0000000108").unwrap().0, 201);
    let (_, new_kobayashi) = assert_moved_once(&f, "0000000108");
    let (code, body) = wait_for("Chiyoda's terminal to have its bundle", Duration::from_secs(30), || {
        let (code, body) = scan(&kiosk_b, &kobayashi, &vial, kudan);
        (code != 503).then_some((code, body))
    });
    assert_eq!(code, 201, "the terminal records it: {body}");
    let event = body["event_id"].as_str().unwrap().to_owned();
    let state =
        wait_for("the dose to come back to Chiyoda through Yokohama", Duration::from_secs(60), || {
            let state = state_of(&kiosk_b, &event);
            (state["state"] == "recorded").then_some(state)
        });
    assert_eq!(state["owner"], CHIYODA, "{state}");
    let events = events_of(&f.b, &new_kobayashi);
    assert_eq!(events.get(&event), Some(&1), "the dose is in the record once: {events:?}");
    assert_eq!(record(&f.b, &new_kobayashi)["history"][0]["venue"], kudan);

    // 鈴木 registers in Chiyoda (転入) with their 転出証明書. A mistyped birth date does not
    // match Yokohama's record: nobody is handed over. Asked again correctly, Yokohama hands
    // them over by itself and Chiyoda keeps the atena number it gave.
    let mut ask = json!({"my_number": my_number(4), "birth_date": "1950-01-02", "atena_number": "C-0004", "address": "東京都千代田区九段南1-2-1", "previous": YOKOHAMA});
    let (code, body) = f.b.post("/api/v1/handoffs/requests", &ask).unwrap();
    assert_eq!(code, 202, "{body}");
    wait_for("the mismatched ask to be answered", Duration::from_secs(30), || {
        let asks = handoffs(&f.b)["asks"].clone();
        asks.as_array()
            .unwrap()
            .iter()
            .any(|a| a["atena_number"] == "C-0004" && a["state"] == "not_found")
            .then_some(())
    });
    assert!(record(&f.a, &resident_id(&f.a, "0000000104"))["transfer"].is_null(), "still at Yokohama");
    ask["birth_date"] = json!("1950-01-01");
    let (code, body) = f.b.post("/api/v1/handoffs/requests", &ask).unwrap();
    assert_eq!(code, 202, "{body}");
    let (_, new_suzuki) = assert_moved_once(&f, "0000000104");
    let suzuki = record(&f.b, &new_suzuki);
    assert_eq!(suzuki["identity"]["atena_number"], "C-0004");
    assert_eq!(suzuki["identity"]["address"], "東京都千代田区九段南1-2-1");
    let asks = handoffs(&f.b)["asks"].clone();
    assert!(asks.as_array().unwrap().iter().any(|a| a["state"] == "received"), "{asks}");
    // Nobody holds a person the ledger never saw, without a previous municipality.
    let nobody = json!({"my_number": my_number(99), "birth_date": "1999-09-09", "atena_number": "C-0099", "address": "東京都千代田区"});
    assert_eq!(f.b.post("/api/v1/handoffs/requests", &nobody).unwrap().0, 202);
    wait_for("the unknown newcomer to be answered", Duration::from_secs(30), || {
        let asks = handoffs(&f.b)["asks"].clone();
        asks.as_array()
            .unwrap()
            .iter()
            .any(|a| a["atena_number"] == "C-0099" && a["state"] == "not_found")
            .then_some(())
    });

    // 山田 moves back to Yokohama, which registers them without naming Chiyoda: the ledger
    // knows Chiyoda holds them and the history comes back, with the dose given in Yokohama.
    let back = json!({"my_number": my_number(1), "birth_date": "1960-04-01", "atena_number": "0000000201", "address": "神奈川県横浜市中区山下町1-1"});
    let (code, body) = f.a.post("/api/v1/handoffs/requests", &back).unwrap();
    assert_eq!(code, 202, "{body}");
    let returned = wait_for("山田's history to come back", Duration::from_secs(60), || accepted_at(&f.a));
    let yamada_again = record(&f.a, &returned);
    assert_eq!(yamada_again["identity"]["status"], "active");
    assert_eq!(events_of(&f.a, &returned), events_of(&f.a, &old), "the same dose, once");
    assert_eq!(record(&f.b, &new)["transfer"]["to"], YOKOHAMA);

    // The doses moved with the people: each municipality's counters still equal its
    // documents' doses, and the national figures equal each municipality's own.
    let today = super::days_from_today(0);
    national_equals_own(&f, &today);
    let (chiyoda_own, _) = own_figures(&f.b, &today);
    assert_eq!(
        chiyoda_own.values().sum::<u64>(),
        2,
        "中村's and 小林's doses count at Chiyoda: {chiyoda_own:?}"
    );
    let (yokohama_own, _) = own_figures(&f.a, &today);
    assert_eq!(yokohama_own.values().sum::<u64>(), 1, "山田 came back with their dose: {yokohama_own:?}");
    // Passed on is not refused: Yokohama counts one refused capture of a moved resident's
    // coupon (伊藤's, at its own desk), however often 中村's and 小林's doses were pushed to it
    // again while Chiyoda's answer was on its way.
    let (code, body) = f.a.get(&format!("/api/v1/statistics/daily?date={today}")).unwrap();
    assert_eq!(code, 200, "{body}");
    let transferred: u64 = body["statistics"]["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == "coupon_transferred")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(transferred, 1, "{}", body["statistics"]["rejected"]);

    // Both sides wrote the export/import pair to their audit logs, which still verify.
    kiosk.kill9();
    kiosk_b.kill9();
    f.a.stop().unwrap();
    f.b.stop().unwrap();
    for (node, name) in [(&f.a, "a"), (&f.b, "b")] {
        let out = f.dir.path().join(format!("audit-{name}.json"));
        ok(&node.cli(&["audit", "export", "--from", &today, "--to", &today, "--out", out.to_str().unwrap()]));
        let text = std::fs::read_to_string(&out).unwrap();
        for action in ["handoff.export", "handoff.import"] {
            assert!(text.contains(action), "{name} logged {action}");
        }
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
        assert!(
            ok(&node.cli(&["statistics", "verify"])).contains("一致"),
            "{name}'s counters equal its documents"
        );
    }

    // The national node relayed every envelope and stored the ledger, and holds no name,
    // birth date, address, 個人番号 or coupon number of anyone.
    let received = std::fs::read_to_string(f.national.data.join("received.jsonl")).unwrap();
    assert!(received.contains("\"handoff\"") && received.contains("ciphertext"), "the envelopes were logged");
    assert_no_personal_data(&f.national.data, &f.coupons);
}

/// Makes `victim` (`a`, `b` or the national node) kill itself at crash point `point`.
fn arm(f: &mut Federation, victim: &str, point: &str) {
    let crash = vec![(node::handoff::CRASH_ENV.to_owned(), point.to_owned())];
    match victim {
        "a" => f.a.env = crash,
        "b" => f.b.env = crash,
        _ => f.national.env = crash,
    }
}

/// Whether `victim` died within 30 s.
fn wait_death(f: &mut Federation, victim: &str) -> bool {
    match victim {
        "a" => f.a.wait_exit(Duration::from_secs(30)),
        "b" => f.b.wait_exit(Duration::from_secs(30)),
        _ => f.national.wait_exit(Duration::from_secs(30)),
    }
}

/// Starts `victim` again, disarmed.
fn restart(f: &mut Federation, victim: &str) {
    match victim {
        "a" => {
            f.a.env.clear();
            f.a.start().unwrap();
        }
        "b" => {
            f.b.env.clear();
            f.b.start().unwrap();
        }
        _ => {
            f.national.env.clear();
            f.national.start();
        }
    }
}

/// One relocation with one process killed (`kill -9` of itself) right after the named step
/// has committed; it is restarted and the handoff completes exactly once.
fn survives(point: &str, victim: &str) {
    let mut f = federation(&format!("handoff-{}", point.replace('.', "-")));
    arm(&mut f, victim, point);
    start_all(&mut f);
    let takahashi = coupon_of(&f.coupons, "0000000102", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&takahashi.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    let answered = move_out(&f.a, "0000000102");
    let died = wait_death(&mut f, victim);
    assert!(died, "{victim} reached crash point {point}");
    if point == "handoff.sealed" {
        assert!(answered.is_none(), "killed before answering");
    }
    restart(&mut f, victim);
    assert_moved_once(&f, "0000000102");
    f.a.stop().unwrap();
    assert!(ok(&f.a.cli(&["audit", "verify"])).contains("intact"));
}

#[test]
fn relocation_survives_kill_9_between_every_two_steps() {
    for (point, victim) in [
        ("handoff.sealed", "a"),
        ("ledger.deposited", "national"),
        ("handoff.deposited", "a"),
        ("handoff.received", "b"),
        ("handoff.accepted", "b"),
        ("ledger.accepted", "national"),
        ("handoff.acked", "b"),
        ("handoff.completed", "a"),
    ] {
        survives(point, victim);
    }
}

/// One handoff sent back by Chiyoda's admin, with one process killed right after the named
/// step has committed; once it is restarted, the resident is active at Yokohama again, once.
fn return_survives(point: &str, victim: &str) {
    let mut f = federation(&format!("return-{}", point.replace('.', "-")));
    accept_by_hand(&f.b);
    arm(&mut f, victim, point);
    start_all(&mut f);
    let (code, moved) = move_out(&f.a, "0000000102").unwrap();
    assert_eq!(code, 201, "{moved}");
    let handoff = moved["handoff_id"].as_str().unwrap().to_owned();
    let person_key = moved["person_key"].as_str().unwrap().to_owned();
    wait_for("Chiyoda to receive the handoff", Duration::from_secs(60), || {
        of_person(&f.b, "incoming", &person_key).into_iter().find(|e| e["state"] == "received")
    });
    let back = json!({"reason": "not_moved_here", "note": "転入届なし"});
    let answered = f.b.post(&format!("/api/v1/handoffs/{handoff}/return"), &back);
    let died = wait_death(&mut f, victim);
    assert!(died, "{victim} reached crash point {point}");
    if point == "handoff.sent_back" {
        assert!(answered.is_err(), "killed before answering");
    }
    restart(&mut f, victim);
    let resident = resident_id(&f.a, "0000000102");
    wait_for("the return to settle", Duration::from_secs(60), || {
        let out = of_person(&f.a, "outgoing", &person_key);
        let incoming = of_person(&f.b, "incoming", &person_key);
        let ledger = ledger(&f, &person_key);
        (out.len() == 1
            && out[0]["state"] == "returned"
            && incoming.len() == 1
            && incoming[0]["state"] == "returned"
            && incoming[0]["acked"] == true
            && ledger.len() == 1
            && ledger[0]["state"] == "returned")
            .then_some(())
    });
    let home = record(&f.a, &resident);
    assert_eq!(home["identity"]["status"], "active", "{home}");
    assert_eq!(home["returns"].as_array().unwrap().len(), 1, "returned once: {home}");
    assert_eq!(home["returns"][0]["reason"], "not_moved_here", "{home}");
    assert_eq!(home["valid_coupons"].as_array().unwrap().len(), 1, "{home}");
    let (code, found) = f.b.get(&format!("/api/v1/residents?person_key={person_key}")).unwrap();
    assert_eq!((code, found["residents"].as_array().map(Vec::len)), (200, Some(0)), "{found}");
    f.a.stop().unwrap();
    f.b.stop().unwrap();
    for node in [&f.a, &f.b] {
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
}

#[test]
fn a_return_survives_kill_9_between_every_two_steps() {
    for (point, victim) in [
        ("handoff.sent_back", "b"),
        ("ledger.returned", "national"),
        ("handoff.return_acked", "b"),
        ("handoff.returned", "a"),
    ] {
        return_survives(point, victim);
    }
}

#[test]
fn a_dose_passed_on_to_a_receiver_that_sends_the_handoff_back_is_recorded_at_home() {
    let mut f = federation("return-forward");
    accept_by_hand(&f.b);
    let (kiosk, watanabe, vial) = start_with_kiosk(&mut f);

    // Offline, Yokohama's terminal vaccinates 渡邊 while her handoff waits at Chiyoda for an
    // admin: back online, Yokohama passes the dose on to Chiyoda, which holds it as pending.
    f.proxy.block();
    let (code, moved) = move_out(&f.a, "0000000105").unwrap();
    assert_eq!(code, 201, "{moved}");
    let handoff = moved["handoff_id"].as_str().unwrap().to_owned();
    let person_key = moved["person_key"].as_str().unwrap().to_owned();
    wait_for("Chiyoda to receive the handoff", Duration::from_secs(60), || {
        of_person(&f.b, "incoming", &person_key).into_iter().find(|e| e["state"] == "received")
    });
    let (code, body) = scan(&kiosk, &watanabe, &vial, VENUE);
    assert_eq!(code, 201, "offline, the terminal records it: {body}");
    let event = body["event_id"].as_str().unwrap().to_owned();
    f.proxy.heal();
    let passed = wait_for("Yokohama to pass the dose on to Chiyoda", Duration::from_secs(60), || {
        let state = state_of(&kiosk, &event);
        (state["state"] == "forwarded").then_some(state)
    });
    assert_eq!(passed["owner"], CHIYODA, "{passed}");

    // Chiyoda sends the handoff back: 渡邊 lives in Yokohama after all, and the dose the
    // terminal gave is recorded there, once, and nowhere else.
    let (code, body) =
        f.b.post(&format!("/api/v1/handoffs/{handoff}/return"), &json!({"reason": "not_moved_here"}))
            .unwrap();
    assert_eq!(code, 200, "{body}");
    let state = wait_for("the dose to be recorded at Yokohama", Duration::from_secs(90), || {
        let state = state_of(&kiosk, &event);
        (state["state"] == "recorded").then_some(state)
    });
    assert_eq!(state["owner"], YOKOHAMA, "{state}");
    let home = resident_id(&f.a, "0000000105");
    assert_eq!(events_of(&f.a, &home).get(&event), Some(&1), "in Yokohama's record once");
    let at_home = record(&f.a, &home);
    assert_eq!(at_home["identity"]["status"], "active", "{at_home}");
    assert_eq!(at_home["history"][0]["venue"], VENUE, "{at_home}");
    assert_eq!(at_home["next_dose"], 2, "{at_home}");
    let (code, found) = f.b.get(&format!("/api/v1/residents?person_key={person_key}")).unwrap();
    assert_eq!((code, found["residents"].as_array().map(Vec::len)), (200, Some(0)), "{found}");
    let (code, status) = f.a.get("/api/v1/status").unwrap();
    assert_eq!((code, status["forward_outbox"].as_u64()), (200, Some(0)), "{status}");
    f.a.stop().unwrap();
    assert!(ok(&f.a.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
}

#[test]
fn a_handoff_the_ledger_refuses_for_good_gives_the_resident_back() {
    // 山田 is in two registers: Yokohama's (the fixture) and Chiyoda's extract.
    let mut f = federation("ledger-refuses");
    accept_by_hand(&f.a);
    let extract = f.dir.path().join("chiyoda-extract.csv");
    let text = format!(
        "宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号\r\n\
         C-0101,山田　太郎,ヤマダ タロウ,1960-04-01,男,東京都千代田区九段南1-2-1,{}\r\n",
        my_number(1)
    );
    write_shift_jis(&extract, &text).unwrap();
    let out = ok(&f.b.cli(&["import", "--issue-coupons", extract.to_str().unwrap()]));
    assert!(out.contains("coupons issued: 1"), "{out}");
    start_all(&mut f);

    // Chiyoda hands its 山田 to Yokohama, whose admin has not accepted it yet: the ledger
    // holds a handoff of the person in transit from Chiyoda.
    let chiyodas = resident_id(&f.b, "C-0101");
    move_to(&f.b, &chiyodas, YOKOHAMA);
    let incoming = wait_for("Yokohama to receive Chiyoda's handoff", Duration::from_secs(60), || {
        handoffs(&f.a)["incoming"].as_array().unwrap().iter().find(|e| e["state"] == "received").cloned()
    });

    // Yokohama moves its own 山田 out to Chiyoda: refused for the moment (`in_transit`),
    // kept sealed and sent again, the record read-only meanwhile.
    let yokohamas = resident_id(&f.a, "0000000101");
    let (code, moved) = move_out(&f.a, "0000000101").unwrap();
    assert_eq!(code, 201, "{moved}");
    let handoff = moved["handoff_id"].as_str().unwrap().to_owned();
    let person_key = moved["person_key"].as_str().unwrap().to_owned();
    assert_eq!(incoming["person_key"], person_key.as_str(), "the same person");
    let waiting = wait_for("the ledger to refuse it for the moment", Duration::from_secs(60), || {
        of_person(&f.a, "outgoing", &person_key)
            .into_iter()
            .find(|e| e["refusal"].as_str().is_some_and(|r| r.starts_with("in_transit")))
    });
    assert_eq!(waiting["state"], "sealed", "{waiting}");
    let yamada = coupon_of(&f.coupons, "0000000101", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&yamada.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 409, "the moved record refuses a dose: {body}");

    // Yokohama sends Chiyoda's handoff back: the ledger says Chiyoda holds 山田 again, and
    // Yokohama's deposit is refused for good. Yokohama's record is active again.
    let back = format!("/api/v1/handoffs/{}/return", incoming["handoff_id"].as_str().unwrap());
    let (code, body) = f.a.post(&back, &json!({"reason": "already_registered"})).unwrap();
    assert_eq!(code, 200, "{body}");
    let refused = wait_for("the refusal for good", Duration::from_secs(60), || {
        of_person(&f.a, "outgoing", &person_key).into_iter().find(|e| e["state"] == "refused")
    });
    assert_eq!(refused["handoff_id"], handoff.as_str(), "{refused}");
    let refusal = refused["refusal"].as_str().unwrap();
    assert!(refusal.starts_with("not_holder") && refusal.contains(CHIYODA), "{refused}");
    let home = record(&f.a, &yokohamas);
    assert_eq!(home["identity"]["status"], "active", "{home}");
    assert!(home["transfer"].is_null(), "{home}");
    assert_eq!(home["returns"].as_array().unwrap().len(), 1, "{home}");
    assert_eq!(home["returns"][0]["reason"], "ledger_refused", "{home}");
    assert_eq!(home["returns"][0]["transfer"]["handoff_id"], handoff.as_str(), "{home}");
    assert_eq!(home["valid_coupons"].as_array().unwrap().len(), 1, "{home}");

    // The record takes changes again: 山田 is vaccinated at Yokohama with his coupon.
    let (code, body) = f.a.post("/api/v1/captures", &capture(&yamada.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(record(&f.a, &yokohamas)["next_dose"], 2);

    // Chiyoda's handoff came back to it: 山田 is active there too, as before either
    // move-out, and the ledger never stored Yokohama's.
    wait_for("Chiyoda's handoff to come back", Duration::from_secs(60), || {
        of_person(&f.b, "outgoing", &person_key).into_iter().find(|e| e["state"] == "returned")
    });
    assert_eq!(record(&f.b, &chiyodas)["identity"]["status"], "active");
    let held = ledger(&f, &person_key);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["state"], "returned", "{held:?}");
    assert_eq!(held[0]["from"], CHIYODA, "{held:?}");

    // The take-back is audited; the counters and the audit chain verify.
    f.a.stop().unwrap();
    f.b.stop().unwrap();
    let export = f.dir.path().join("audit-a.jsonl");
    let data = f.a.data.to_str().unwrap().to_owned();
    let args = ["audit", "export", "--data", &data, "--from", "2020-01-01", "--to", "2099-12-31", "--out"];
    ok(&f.a.cli(&[&args[..], &[export.to_str().unwrap()]].concat()));
    let exported = std::fs::read_to_string(&export).unwrap();
    let audited = exported.lines().any(|line| {
        line.contains("\"handoff.refused\"") && line.contains(&handoff) && line.contains(&yokohamas)
    });
    assert!(audited, "handoff.refused in the audit log:\n{exported}");
    for node in [&f.a, &f.b] {
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
}

#[test]
fn a_movers_file_is_checked_whole_then_sealed_row_by_row() {
    let mut f = federation("movers");
    accept_by_hand(&f.b);
    start_all(&mut f);
    // Yokohama learns the directory, then stops for the batch.
    wait_for("Yokohama to hold the directory", Duration::from_secs(30), || {
        f.a.data.join("directory.json").exists().then_some(())
    });
    wait_for("the directory to name Chiyoda", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(f.a.data.join("directory.json")).ok()?;
        text.contains(CHIYODA).then_some(())
    });
    f.a.stop().unwrap();
    let bad = f.dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "宛名番号,転出先,理由\n0000000103,131016,転出\n9999999999,131016,転出\n0000000108,999999,転出\n",
    )
    .unwrap();
    let results = f.dir.path().join("results.csv");
    let out =
        f.a.cli(&["handoff", "move-out-file", bad.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3行目") && stderr.contains("4行目"), "every bad row is named: {stderr}");
    assert!(!stderr.contains("2行目"), "{stderr}");
    assert!(!results.exists(), "nothing was done");

    let good = f.dir.path().join("movers.csv");
    tests::write_shift_jis(
        &good,
        "宛名番号,転出先,理由\r\n0000000103,131016,転出届\r\n0000000108,131016,転出届\r\n",
    )
    .unwrap();
    let out = ok(&f.a.cli(&[
        "handoff",
        "move-out-file",
        good.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ]));
    assert!(out.contains("2"), "{out}");
    let rows = std::fs::read_to_string(&results).unwrap();
    assert_eq!(rows.lines().count(), 3, "{rows}");
    assert!(rows.lines().skip(1).all(|l| l.contains(",sealed,ho-")), "{rows}");
    f.a.start().unwrap();
    let received = wait_for("both handoffs to wait at Chiyoda", Duration::from_secs(60), || {
        let incoming = handoffs(&f.b)["incoming"].as_array().unwrap().clone();
        (incoming.len() == 2 && incoming.iter().all(|e| e["state"] == "received")).then_some(incoming)
    });
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        handoffs(&f.b)["incoming"].as_array().unwrap().iter().all(|e| e["state"] == "received"),
        "not by itself"
    );
    let (first, second) =
        (received[0]["handoff_id"].as_str().unwrap(), received[1]["handoff_id"].as_str().unwrap());
    let bad = json!({"atena_number": "宛名"});
    let (code, body) = f.b.post(&format!("/api/v1/handoffs/{first}/accept"), &bad).unwrap();
    assert_eq!((code, body["field"].as_str()), (400, Some("atena_number")), "{body}");
    let (code, body) =
        f.b.post(&format!("/api/v1/handoffs/{first}/accept"), &json!({"atena_number": "C-0200"})).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(record(&f.b, body["resident_id"].as_str().unwrap())["identity"]["atena_number"], "C-0200");
    let (code, body) = f.b.post(&format!("/api/v1/handoffs/{second}/accept"), &json!({})).unwrap();
    assert_eq!(code, 200, "{body}");
    let again = f.b.post(&format!("/api/v1/handoffs/{second}/accept"), &json!({})).unwrap();
    assert_eq!(
        (again.0, &again.1["resident_id"]),
        (200, &body["resident_id"]),
        "accepting twice is one acceptance"
    );
    let (code, _) = f.b.post("/api/v1/handoffs/ho-unknown/accept", &json!({})).unwrap();
    assert_eq!(code, 404);
    assert_moved_once(&f, "0000000103");
    assert_moved_once(&f, "0000000108");
}

/// Yokohama seals a handoff while the national node is down, and is lost; its standby,
/// promoted, finds the transferred record without a handoff in its outbox, seals it again
/// under the same id, and Chiyoda receives it.
#[test]
fn a_promoted_standby_sends_the_handoff_its_lost_primary_sealed() {
    let mut f = federation("handoff-failover");
    let mut standby = standby_of(f.dir.path(), "s", &f.a.data.join("keys"));
    f.national.approve(&join(&standby, &f.national, "s"));
    start_all(&mut f);
    standby.start().unwrap();
    let resident = resident_id(&f.a, "0000000105");
    wait_for("the standby to hold the residents", Duration::from_secs(30), || {
        (standby.get(&format!("/api/v1/residents/{resident}")).unwrap().0 == 200).then_some(())
    });
    // Yokohama must know Chiyoda's key before the national node goes.
    wait_for("the directory to name Chiyoda", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(f.a.data.join("directory.json")).ok()?;
        text.contains(CHIYODA).then_some(())
    });
    f.national.kill9();
    let (code, body) = move_out(&f.a, "0000000105").unwrap();
    assert_eq!(code, 201, "{body}");
    let handoff = body["handoff_id"].as_str().unwrap().to_owned();
    wait_for("the standby to hold the transfer", Duration::from_secs(30), || {
        let (_, record) = standby.get(&format!("/api/v1/residents/{resident}")).unwrap();
        (record["transfer"]["handoff_id"] == handoff.as_str()).then_some(())
    });
    assert!(handoffs(&standby)["outgoing"].as_array().unwrap().is_empty(), "the outbox is not replicated");
    f.a.kill9();
    standby.stop().unwrap();
    let promotion = f.dir.path().join("promote.json");
    ok(&standby.cli(&["promote", "--out", promotion.to_str().unwrap()]));
    f.national.start();
    f.national.approve(&promotion);
    standby.start().unwrap();
    let entry = wait_for("Chiyoda to accept the handoff sealed again", Duration::from_secs(60), || {
        let incoming = handoffs(&f.b)["incoming"].as_array().unwrap().clone();
        incoming.into_iter().find(|e| e["handoff_id"] == handoff.as_str() && e["state"] == "accepted")
    });
    let new = entry["resident_id"].as_str().unwrap();
    assert_eq!(record(&f.b, new)["identity"]["name"], "渡邊　恵子");
    wait_for("the promoted node to see it completed", Duration::from_secs(30), || {
        let outgoing = handoffs(&standby)["outgoing"].as_array().unwrap().clone();
        outgoing
            .iter()
            .any(|e| e["handoff_id"] == handoff.as_str() && e["state"] == "completed")
            .then_some(())
    });
}

/// A dose given at a venue whose terminal was offline while the resident moved away and
/// moved again: the first municipality forwards it to the second, which passes it on to
/// where the resident lives now. Here 渡邊 moves from Yokohama to Chiyoda and back; the
/// dose Yokohama's offline terminal recorded against the old coupon travels Yokohama →
/// Chiyoda → Yokohama and lands once in the record Yokohama holds now.
#[test]
fn a_dose_follows_a_resident_who_moved_twice() {
    let mut f = federation("handoff-twice");
    let (mut kiosk, watanabe, vial) = start_with_kiosk(&mut f);

    // The terminal goes offline; 渡邊 moves to Chiyoda, and from there back to Yokohama.
    f.proxy.block();
    assert_eq!(move_out(&f.a, "0000000105").unwrap().0, 201);
    let (old, at_chiyoda) = assert_moved_once(&f, "0000000105");
    let path = format!("/api/v1/residents/{at_chiyoda}/move-out");
    let (code, body) = f.b.post(&path, &json!({"to": YOKOHAMA, "reason": "転出届（横浜市）"})).unwrap();
    assert_eq!(code, 201, "{body}");
    let back = wait_for("Yokohama to take 渡邊 back", Duration::from_secs(60), || accepted_at(&f.a));
    assert_ne!(back, old, "a new record at Yokohama");

    // Offline, the terminal records the dose against Yokohama's first coupon.
    let (event, state) = scan_offline_then_heal(&f, &kiosk, &watanabe, &vial);
    assert_eq!(state["state"], "recorded", "the dose came back through Chiyoda: {state}");
    assert_eq!(state["owner"], YOKOHAMA, "{state}");
    assert_eq!(events_of(&f.a, &back).get(&event), Some(&1), "in the record Yokohama holds now, once");
    assert_eq!(events_of(&f.a, &old).get(&event), None, "not in the record Yokohama handed away");
    assert_eq!(events_of(&f.b, &at_chiyoda).get(&event), None, "not in Chiyoda's, which passed it on");
    let dose = record(&f.a, &back)["history"][0].clone();
    assert_eq!(dose["venue"], VENUE, "{dose}");
    assert_eq!(dose["dose_number"], 1, "{dose}");

    // Passed on twice, refused nowhere: neither municipality counts a refused capture.
    let today = super::days_from_today(0);
    for node in [&f.a, &f.b] {
        let (code, body) = node.get(&format!("/api/v1/statistics/daily?date={today}")).unwrap();
        assert_eq!(code, 200, "{body}");
        let refused = body["statistics"]["rejected"].as_array().map_or(0, Vec::len);
        assert_eq!(refused, 0, "{}", body["statistics"]["rejected"]);
    }
    kiosk.kill9();
    for node in [&mut f.a, &mut f.b] {
        node.stop().unwrap();
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
}

/// The handoff waiting at `node` for an admin, if any.
fn waiting_at(node: &Node) -> Option<String> {
    let incoming = handoffs(node)["incoming"].as_array().unwrap().clone();
    incoming.iter().find(|e| e["state"] == "received").map(|e| e["handoff_id"].as_str().unwrap().to_owned())
}

/// Forwarded captures waiting in `node`'s outbox.
fn outbox_len(node: &Node) -> u64 {
    let (code, body) = node.get("/api/v1/status").unwrap();
    assert_eq!(code, 200, "{body}");
    body["forward_outbox"].as_u64().unwrap()
}

/// 渡邊 moves back and forth — Yokohama → Chiyoda → Yokohama → Chiyoda → Yokohama — while a
/// Yokohama terminal holds a dose of the first coupon, and the dose comes before Yokohama
/// (accepting by hand) has accepted the last return. Each municipality's latest record says
/// "moved to the other", so each passes the dose to the other and holds it in its outbox.
/// Once Yokohama accepts, it records the dose — though it had passed it on — and every
/// outbox empties.
#[test]
fn a_dose_passed_back_and_forth_is_recorded_once_the_return_is_accepted() {
    let mut f = federation("handoff-back-and-forth");
    accept_by_hand(&f.a);
    let (mut kiosk, watanabe, vial) = start_with_kiosk(&mut f);
    f.proxy.block();
    let accept = |id: &str| {
        let (code, body) = f.a.post(&format!("/api/v1/handoffs/{id}/accept"), &json!({})).unwrap();
        assert_eq!(code, 200, "{body}");
        body["resident_id"].as_str().unwrap().to_owned()
    };
    // Yokohama → Chiyoda → Yokohama (accepted by hand) → Chiyoda.
    assert_eq!(move_out(&f.a, "0000000105").unwrap().0, 201);
    let (_, first_at_chiyoda) = assert_moved_once(&f, "0000000105");
    move_to(&f.b, &first_at_chiyoda, YOKOHAMA);
    let id = wait_for("the return to wait at Yokohama", Duration::from_secs(60), || waiting_at(&f.a));
    let back = accept(&id);
    move_to(&f.a, &back, CHIYODA);
    let again_at_chiyoda = wait_for("Chiyoda to take 渡邊 in again", Duration::from_secs(60), || {
        let incoming = handoffs(&f.b)["incoming"].as_array().unwrap().clone();
        incoming
            .iter()
            .filter(|e| e["state"] == "accepted")
            .map(|e| e["resident_id"].as_str().unwrap().to_owned())
            .find(|r| *r != first_at_chiyoda)
    });
    // … and back to Yokohama, where the handoff waits for an admin.
    move_to(&f.b, &again_at_chiyoda, YOKOHAMA);
    let last =
        wait_for("the second return to wait at Yokohama", Duration::from_secs(60), || waiting_at(&f.a));

    // The terminal's dose of the first coupon comes now: Yokohama passes it to Chiyoda, whose
    // latest record says "moved to Yokohama", which passes it back (its latest says "moved to
    // Chiyoda"), and so on: both hold it in their outbox.
    let (code, body) = scan(&kiosk, &watanabe, &vial, VENUE);
    assert_eq!(code, 201, "offline, the terminal records it: {body}");
    let event = body["event_id"].as_str().unwrap().to_owned();
    f.proxy.heal();
    wait_for("each municipality to hold the dose for the other", Duration::from_secs(60), || {
        (outbox_len(&f.a) == 2 && outbox_len(&f.b) == 1).then_some(())
    });
    assert_eq!(state_of(&kiosk, &event)["state"], "forwarded");

    let now_at_yokohama = accept(&last);
    let state = wait_for("the dose to be recorded", Duration::from_secs(60), || {
        let state = state_of(&kiosk, &event);
        (state["state"] == "recorded").then_some(state)
    });
    assert_eq!(state["owner"], YOKOHAMA, "{state}");
    assert_eq!(
        events_of(&f.a, &now_at_yokohama).get(&event),
        Some(&1),
        "in the record Yokohama holds now, once"
    );
    for (node, resident) in [(&f.a, &back), (&f.b, &first_at_chiyoda), (&f.b, &again_at_chiyoda)] {
        assert_eq!(events_of(node, resident).get(&event), None, "not in {resident}, which moved on");
    }
    wait_for("every outbox to empty", Duration::from_secs(30), || {
        (outbox_len(&f.a) == 0 && outbox_len(&f.b) == 0).then_some(())
    });
    let today = super::days_from_today(0);
    for node in [&f.a, &f.b] {
        let (code, body) = node.get(&format!("/api/v1/statistics/daily?date={today}")).unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["statistics"]["rejected"].as_array().map_or(0, Vec::len), 0, "{body}");
    }
    kiosk.kill9();
    for node in [&mut f.a, &mut f.b] {
        node.stop().unwrap();
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
}

/// A dose passed on by a municipality that handed the resident over at an earlier arrival,
/// not the latest: 渡邊 moves Yokohama → Chiyoda → Sapporo → Yokohama → Sapporo while a
/// Yokohama terminal holds a dose of the first coupon. Yokohama forwards it to Chiyoda, where
/// that coupon's record went; Chiyoda passes it to Sapporo, where its record went. Sapporo's
/// latest arrival came from Yokohama, not Chiyoda, but Chiyoda once handed 渡邊 to it: it
/// takes the dose and records it in the record it holds now.
#[test]
fn a_dose_from_an_earlier_sender_is_taken_after_a_later_arrival() {
    const SAPPORO: &str = "011002";
    let mut f = federation("handoff-earlier-sender");
    let secret = f.a.data.join("keys/person-key.secret");
    std::fs::create_dir_all(f.dir.path().join("c")).unwrap();
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut c = Node::init_with(
        &f.dir.path().join("c"),
        SAPPORO,
        &["--plain-http", "--p2p-listen", &listen, "--person-key-secret", secret.to_str().unwrap()],
    )
    .unwrap();
    add_comirnaty_lot(&c);
    f.national.approve(&join(&c, &f.national, "c"));
    let (mut kiosk, watanabe, vial) = start_with_kiosk(&mut f);
    c.start().unwrap();
    f.proxy.block();
    let accepted_other_than = |node: &Node, earlier: &str| {
        let incoming = handoffs(node)["incoming"].as_array().unwrap().clone();
        incoming
            .iter()
            .filter(|e| e["state"] == "accepted")
            .map(|e| e["resident_id"].as_str().unwrap().to_owned())
            .find(|r| r != earlier)
    };
    assert_eq!(move_out(&f.a, "0000000105").unwrap().0, 201);
    let (old, at_chiyoda) = assert_moved_once(&f, "0000000105");
    move_to(&f.b, &at_chiyoda, SAPPORO);
    let first_at_sapporo = wait_for("Sapporo to take 渡邊 in", Duration::from_secs(60), || accepted_at(&c));
    move_to(&c, &first_at_sapporo, YOKOHAMA);
    let back = wait_for("Yokohama to take 渡邊 back", Duration::from_secs(60), || accepted_at(&f.a));
    move_to(&f.a, &back, SAPPORO);
    let again_at_sapporo = wait_for("Sapporo to take 渡邊 in again", Duration::from_secs(60), || {
        accepted_other_than(&c, &first_at_sapporo)
    });

    let (event, state) = scan_offline_then_heal(&f, &kiosk, &watanabe, &vial);
    assert_eq!(state["state"], "recorded", "Sapporo took the dose Chiyoda passed on: {state}");
    assert_eq!(state["owner"], SAPPORO, "{state}");
    assert_eq!(
        events_of(&c, &again_at_sapporo).get(&event),
        Some(&1),
        "in the record Sapporo holds now, once"
    );
    for (node, resident) in [(&f.a, &old), (&f.b, &at_chiyoda), (&c, &first_at_sapporo), (&f.a, &back)] {
        assert_eq!(events_of(node, resident).get(&event), None, "not in {resident}, which moved on");
    }
    wait_for("every outbox to empty", Duration::from_secs(30), || {
        (outbox_len(&f.a) == 0 && outbox_len(&f.b) == 0 && outbox_len(&c) == 0).then_some(())
    });
    kiosk.kill9();
    for node in [&mut f.a, &mut f.b, &mut c] {
        node.stop().unwrap();
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
}

/// Chiyoda accepts 山田 by itself, so he holds a provisional atena number. Its next register
/// extract lists him under his 宛名番号 with his 個人番号: the import gives his record that
/// number, and his id and history stay. Chiyoda's standby follows. The same file imported
/// again changes nothing. A 個人番号 given under another 宛名番号 than its resident's
/// real one is still refused, and nothing is written.
#[test]
fn a_register_extract_gives_an_arrival_their_atena_number() {
    let mut f = federation("reregister");
    std::fs::create_dir_all(f.dir.path().join("s")).unwrap();
    let mut standby = Node::init_with(
        &f.dir.path().join("s"),
        CHIYODA,
        &[
            "--plain-http",
            "--role",
            "standby",
            "--keys-from",
            f.b.data.join("keys").to_str().unwrap(),
            "--p2p-listen",
            &format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        ],
    )
    .unwrap();
    f.national.approve(&join(&standby, &f.national, "s"));
    start_all(&mut f);
    standby.start().unwrap();
    let yamada = coupon_of(&f.coupons, "0000000101", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&yamada.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(move_out(&f.a, "0000000101").unwrap().0, 201);
    let (_, arrived) = assert_moved_once(&f, "0000000101");
    let before = record(&f.b, &arrived);
    let provisional = before["identity"]["atena_number"].as_str().unwrap().to_owned();
    assert!(provisional.starts_with('T'), "accepted without an atena number: {before}");
    wait_for("the standby to hold the arrival", Duration::from_secs(30), || {
        let (_, body) = standby.get(&format!("/api/v1/residents?atena={provisional}")).unwrap();
        (body["residents"][0]["resident_id"] == arrived.as_str()).then_some(())
    });

    f.b.stop().unwrap();
    let header = "宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号,状態\r\n";
    let rows = format!(
        "C-0101,山田　太郎,ヤマダ タロウ,1960-04-01,男,東京都千代田区九段南1-2-1,{},在住\r\n\
         C-0102,田中　優,タナカ ユウ,1995-05-05,女,東京都千代田区麹町3-3,{},在住\r\n",
        my_number(1),
        my_number(50)
    );
    let extract = f.dir.path().join("chiyoda-extract.csv");
    write_shift_jis(&extract, &format!("{header}{rows}")).unwrap();
    let out = ok(&f.b.cli(&["import", extract.to_str().unwrap()]));
    assert!(out.contains("新規 created 1, 更新 updated 1"), "{out}");
    assert!(out.contains("provisional atena numbers replaced: 1"), "{out}");
    let again = ok(&f.b.cli(&["import", extract.to_str().unwrap()]));
    assert!(again.contains("変更なし unchanged 2"), "{again}");
    let clash = format!(
        "{header}C-0103,山田　太郎,ヤマダ タロウ,1960-04-01,男,東京都千代田区九段南1-2-1,{},在住\r\n",
        my_number(1)
    );
    let clash_file = f.dir.path().join("chiyoda-clash.csv");
    write_shift_jis(&clash_file, &clash).unwrap();
    let refused = f.b.cli(&["import", clash_file.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("2行目 [個人番号]") && stderr.contains("another atena number"), "{stderr}");

    f.b.start().unwrap();
    for node in [&f.b, &standby] {
        let found = wait_for("the record under its 宛名番号", Duration::from_secs(30), || {
            let (code, body) = node.get("/api/v1/residents?atena=C-0101").unwrap();
            assert_eq!(code, 200, "{body}");
            body["residents"][0]["resident_id"].as_str().map(str::to_owned)
        });
        assert_eq!(found, arrived, "the same resident, not a new one");
        let (code, body) = node.get(&format!("/api/v1/residents?atena={provisional}")).unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["residents"], json!([]), "the provisional number is gone: {body}");
        let (code, body) = node.get("/api/v1/residents?atena=C-0103").unwrap();
        assert_eq!((code, body["residents"].clone()), (200, json!([])), "the refused file wrote nothing");
        let after = record(node, &arrived);
        assert_eq!(after["identity"]["atena_number"], "C-0101");
        assert_eq!(after["identity"]["address"], "東京都千代田区九段南1-2-1");
        assert_eq!(after["history"], before["history"], "the history stays");
        assert_eq!(after["valid_coupons"], before["valid_coupons"], "so does the coupon Chiyoda issued");
    }

    // He moves back, and Yokohama accepts him by itself too. Its next extract lists him under
    // the 宛名番号 of the record he left behind: that number now finds the record he came
    // back with, and the one he left stays as it was.
    let old = resident_id(&f.a, "0000000101");
    move_to(&f.b, &arrived, YOKOHAMA);
    let back = wait_for("Yokohama to accept him back", Duration::from_secs(60), || accepted_at(&f.a));
    assert_ne!(back, old);
    let returned = record(&f.a, &back);
    assert!(returned["identity"]["atena_number"].as_str().unwrap().starts_with('T'), "{returned}");
    f.a.stop().unwrap();
    let extract = f.dir.path().join("yokohama-extract.csv");
    write_shift_jis(&extract, &super::fixture_csv()).unwrap();
    let out = ok(&f.a.cli(&["import", extract.to_str().unwrap()]));
    assert!(out.contains("provisional atena numbers replaced: 1"), "{out}");
    assert!(out.contains("変更なし unchanged 7"), "{out}");
    f.a.start().unwrap();
    assert_eq!(resident_id(&f.a, "0000000101"), back);
    let after = record(&f.a, &back);
    assert_eq!(after["identity"]["atena_number"], "0000000101");
    assert_eq!(after["identity"]["address"], "神奈川県横浜市中区山下町1-1");
    assert_eq!(after["history"], returned["history"]);
    let left = record(&f.a, &old);
    assert_eq!(left["transfer"]["to"], CHIYODA, "the record he left is kept, read-only: {left}");
}

/// Chiyoda's register extract lists 山田 and 伊藤 before any handoff, and gives each a dose-1
/// coupon. Then Yokohama moves 山田 out. His history joins the resident Chiyoda registered:
/// one record, with the same id and atena number. Chiyoda's dose-1 coupon is revoked (he had
/// that dose), and he gets a dose-2 coupon. Chiyoda's staff ask for 伊藤's history with a
/// 転入 request (a wrong atena number is refused first), and it joins him the same way.
/// 渡邊's row has another birth date than Yokohama's record, so her history waits for staff.
/// The national figures equal the municipalities', and the counters equal the documents.
#[test]
fn a_history_joins_a_resident_the_extract_registered_first() {
    let mut f = federation("join");
    let extract = f.dir.path().join("chiyoda-extract.csv");
    let text = format!(
        "宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号\r\n\
         C-0101,山田　太郎,ヤマダ タロウ,1960-04-01,男,東京都千代田区九段南1-2-1,{}\r\n\
         C-0106,伊藤　誠,イトウ マコト,1990-02-03,男,東京都千代田区麹町3-3,{}\r\n\
         C-0105,渡邊　恵子,ワタナベ ケイコ,1970-07-08,女,東京都千代田区麹町5-5,{}\r\n\
         C-0104,鈴木　一郎,スズキ イチロウ,1950-01-01,男,東京都千代田区一番町4-4,{}\r\n",
        my_number(1),
        my_number(6),
        my_number(5),
        my_number(4)
    );
    write_shift_jis(&extract, &text).unwrap();
    let out = ok(&f.b.cli(&["import", "--issue-coupons", extract.to_str().unwrap()]));
    assert!(out.contains("coupons issued: 4"), "{out}");
    start_all(&mut f);
    let yamada_here = resident_id(&f.b, "C-0101");
    let first_coupon = record(&f.b, &yamada_here)["valid_coupons"][0]["code"].as_str().unwrap().to_owned();

    let yamada = coupon_of(&f.coupons, "0000000101", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&yamada.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(move_out(&f.a, "0000000101").unwrap().0, 201);
    let (_, joined) = assert_moved_once(&f, "0000000101");
    assert_eq!(joined, yamada_here, "the history joined the resident the extract registered");
    let at_b = record(&f.b, &joined);
    assert_eq!(at_b["identity"]["atena_number"], "C-0101");
    assert_eq!(at_b["identity"]["address"], "東京都千代田区九段南1-2-1");
    assert_eq!(at_b["next_dose"], 2);
    let revoked = at_b["coupons"]
        .as_object()
        .unwrap()
        .values()
        .find(|c| c["code"] == first_coupon.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{first_coupon} is gone: {}", at_b["coupons"]));
    assert_eq!(revoked["status"], "revoked", "{revoked}");
    let person_key = handoffs(&f.b)["incoming"][0]["person_key"].as_str().unwrap().to_owned();
    let (code, found) = f.b.get(&format!("/api/v1/residents?person_key={person_key}")).unwrap();
    assert_eq!(code, 200, "{found}");
    assert_eq!(found["residents"].as_array().unwrap().len(), 1, "one resident: {found}");

    // 伊藤: Chiyoda asks for the history of the newcomer it registered.
    let mut ask = json!({"my_number": my_number(6), "birth_date": "1990-02-03", "atena_number": "C-9999", "address": "東京都千代田区麹町3-3", "previous": YOKOHAMA});
    let (code, body) = f.b.post("/api/v1/handoffs/requests", &ask).unwrap();
    assert_eq!((code, body["field"].as_str()), (400, Some("atena_number")), "{body}");
    assert!(body["title"].as_str().unwrap().contains("C-0106"), "{body}");
    ask["atena_number"] = json!("C-0106");
    let (code, body) = f.b.post("/api/v1/handoffs/requests", &ask).unwrap();
    assert_eq!(code, 202, "{body}");
    let ito_here = resident_id(&f.b, "C-0106");
    let (_, joined) = assert_moved_once(&f, "0000000106");
    assert_eq!(joined, ito_here);
    let at_b = record(&f.b, &joined);
    assert_eq!(at_b["identity"]["atena_number"], "C-0106");
    assert_eq!(at_b["valid_coupons"][0]["code"].as_str().map(|c| &c[..2]), Some("11"), "{at_b}");

    // 渡邊's row at Chiyoda has another birth date than Yokohama's record: her history does
    // not join that resident, and waits for staff.
    let watanabe_here = resident_id(&f.b, "C-0105");
    assert_eq!(move_out(&f.a, "0000000105").unwrap().0, 201);
    let failed = wait_for("渡邊's handoff to wait for staff", Duration::from_secs(60), || {
        let incoming = handoffs(&f.b)["incoming"].as_array().unwrap().clone();
        incoming.into_iter().find(|e| e["state"] == "failed")
    });
    assert!(failed["error"].as_str().unwrap().starts_with("birth_date_differs"), "{failed}");
    let kept = record(&f.b, &watanabe_here);
    assert_eq!(kept["history"], json!([]), "{kept}");

    // Chiyoda's admin sends it back. A reason that is not one of the codes is refused and
    // changes nothing; the note stays at Chiyoda; the handoff can no longer be accepted.
    let handoff = failed["handoff_id"].as_str().unwrap().to_owned();
    let back = format!("/api/v1/handoffs/{handoff}/return");
    let (code, body) = f.b.post(&back, &json!({"reason": "生年月日"})).unwrap();
    assert_eq!((code, body["field"].as_str()), (400, Some("reason")), "{body}");
    assert!(body["detail_ja"].as_str().unwrap().contains("birth_date_differs"), "{body}");
    let (code, body) =
        f.b.post("/api/v1/handoffs/ho-nonexistent/return", &json!({"reason": "other"})).unwrap();
    assert_eq!(code, 404, "{body}");
    let note = "住民票の生年月日は1970-07-08。転出元に確認中";
    let (code, body) = f.b.post(&back, &json!({"reason": "birth_date_differs", "note": note})).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (body["state"].as_str(), body["returned"].as_str()),
        (Some("returned"), Some("birth_date_differs"))
    );
    let (code, again) = f.b.post(&back, &json!({"reason": "other"})).unwrap();
    assert_eq!((code, again["returned"].as_str()), (200, Some("birth_date_differs")), "a repeat: {again}");
    let (code, body) = f.b.post(&format!("/api/v1/handoffs/{handoff}/accept"), &json!({})).unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("handoff_returned")), "{body}");
    // Yokohama gets her back: active again with her coupon, which its venue takes again.
    let watanabe_there = resident_id(&f.a, "0000000105");
    let outgoing = wait_for("Yokohama to see 渡邊's handoff sent back", Duration::from_secs(60), || {
        let outgoing = handoffs(&f.a)["outgoing"].as_array().unwrap().clone();
        outgoing.into_iter().find(|e| e["handoff_id"] == handoff.as_str() && e["state"] == "returned")
    });
    assert_eq!(outgoing["returned"], "birth_date_differs", "{outgoing}");
    assert!(!outgoing.to_string().contains("1970-07-08"), "the note stays at Chiyoda: {outgoing}");
    let home = record(&f.a, &watanabe_there);
    assert_eq!(home["identity"]["status"], "active", "{home}");
    assert!(home["transfer"].is_null(), "{home}");
    assert_eq!(home["returns"][0]["reason"], "birth_date_differs", "{home}");
    assert_eq!(home["returns"][0]["transfer"]["to"], CHIYODA, "{home}");
    let watanabe = coupon_of(&f.coupons, "0000000105", 1).clone();
    let valid = home["valid_coupons"].as_array().unwrap();
    assert_eq!(valid.len(), 1, "{home}");
    assert_eq!(valid[0]["code"].as_str(), Some(watanabe.code.as_str()), "her printed coupon is valid again");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&watanabe.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "her coupon is taken at Yokohama again: {body}");
    let returned = ledger(&f, failed["person_key"].as_str().unwrap());
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(
        (returned[0]["state"].as_str(), returned[0]["returned"].as_str()),
        (Some("returned"), Some("birth_date_differs"))
    );
    assert!(returned[0].get("sealed").is_none(), "the ledger drops the envelope once sent back");
    let incoming = of_person(&f.b, "incoming", failed["person_key"].as_str().unwrap());
    assert_eq!(incoming[0]["return_note"], note, "{incoming:?}");
    assert_eq!(incoming[0]["acked"], true, "{incoming:?}");

    // 鈴木 had his first dose in Yokohama. Chiyoda, knowing nothing of it, gave him a "first"
    // dose with the coupon its issuance had sent. When his history arrives the two are one:
    // Yokohama's dose stays dose 1, Chiyoda's becomes dose 2 with a correction saying why.
    let suzuki = coupon_of(&f.coupons, "0000000104", 1).clone();
    let (code, body) = f.a.post("/api/v1/captures", &capture(&suzuki.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    let suzuki_here = resident_id(&f.b, "C-0104");
    let chiyoda_coupon = record(&f.b, &suzuki_here)["valid_coupons"][0]["code"].as_str().unwrap().to_owned();
    let (code, body) = f.b.post("/api/v1/captures", &capture(&chiyoda_coupon, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["event"]["dose_number"], 1, "{body}");
    let given_here = body["event"]["event_id"].as_str().unwrap().to_owned();
    let (code, body) = move_out(&f.a, "0000000104").unwrap();
    assert_eq!(code, 201, "{body}");
    let entry = settled(&f, body["person_key"].as_str().unwrap());
    let joined = entry["resident_id"].as_str().unwrap().to_owned();
    assert_eq!(joined, suzuki_here);
    let at_b = record(&f.b, &joined);
    let numbers: Vec<(String, u64)> = at_b["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["venue"].as_str().unwrap().to_owned(), d["dose_number"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        numbers[0],
        (format!("{YOKOHAMA}/{}", numbers[0].0.split('/').nth(1).unwrap()), 1),
        "{numbers:?}"
    );
    assert_eq!(numbers[1].1, 2, "Chiyoda's dose is the second: {numbers:?}");
    assert_eq!(at_b["next_dose"], 3);
    assert_eq!(at_b["valid_coupons"][0]["code"].as_str().map(|c| &c[..2]), Some("13"), "{at_b}");
    let correction = at_b["corrections"]
        .as_object()
        .unwrap()
        .values()
        .find(|c| c["event_id"] == given_here.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no correction of {given_here}: {}", at_b["corrections"]));
    assert_eq!(
        (correction["before"]["dose_number"].as_str(), correction["after"]["dose_number"].as_str()),
        (Some("1"), Some("2"))
    );
    assert!(correction["reason"].as_str().unwrap().contains("転入前の接種歴と統合"), "{correction}");
    assert_eq!(entry["renumbered"], json!([given_here]), "staff see which doses were renumbered: {entry}");

    let today = super::days_from_today(0);
    national_equals_own(&f, &today);
    let (chiyoda_own, _) = own_figures(&f.b, &today);
    assert_eq!(
        chiyoda_own.values().sum::<u64>(),
        3,
        "山田's dose and both of 鈴木's count at Chiyoda: {chiyoda_own:?}"
    );
    let second_doses: u64 = chiyoda_own.iter().filter(|(k, _)| k.1 == 2).map(|(_, n)| n).sum();
    assert_eq!(second_doses, 1, "鈴木's dose at Chiyoda counts as a second dose: {chiyoda_own:?}");

    // Chiyoda's dose, now dose 2, turns out to be a mistake. Its coupon was a dose-1 coupon,
    // so the void reopens none: it issues the dose-2 coupon there and then (before, 鈴木
    // waited for the next bulk issuance), keeping the dose-3 coupon the join issued.
    let void = json!({"reason": "重複登録（転入前に接種済み）"});
    let (code, body) =
        f.b.post(&format!("/api/v1/residents/{joined}/doses/{given_here}/void"), &void).unwrap();
    assert_eq!(code, 200, "{body}");
    let after = record(&f.b, &joined);
    assert_eq!(after["next_dose"], 2, "{after}");
    let mut rounds: Vec<String> = after["valid_coupons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap()[..8].to_owned())
        .collect();
    rounds.sort();
    assert_eq!(rounds, ["12131016", "13131016"], "{after}");
    f.a.stop().unwrap();
    f.b.stop().unwrap();
    for node in [&f.a, &f.b] {
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
    for (node, action) in [(&f.b, "handoff.return"), (&f.a, "handoff.returned")] {
        let export = f.dir.path().join(format!("audit-{action}.json"));
        let path = export.to_str().unwrap();
        ok(&node.cli(&["audit", "export", "--from", "2020-01-01", "--to", "2099-12-31", "--out", path]));
        let text = std::fs::read_to_string(&export).unwrap();
        assert!(text.contains(&format!("\"{action}\"")), "{action} is in the audit log");
    }
}

#[test]
fn a_register_extract_asks_for_a_newcomers_history() {
    let mut f = federation("extract-ask");
    let today = super::days_from_today(0);
    let header = "宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号,転入日,前住所市区町村コード\r\n";
    // 伊藤 moved from Yokohama today; 鈴木 came from Yokohama before the campaign began, so
    // there is nothing to fetch for him.
    let ito = format!(
        "C-0106,伊藤　誠,イトウ マコト,1990-02-03,男,東京都千代田区麹町3-3,{},{today},{YOKOHAMA}\r\n",
        my_number(6)
    );
    let suzuki = format!(
        "C-0104,鈴木　一郎,スズキ イチロウ,1950-01-01,男,東京都千代田区一番町4-4,{},2019-04-01,{YOKOHAMA}\r\n",
        my_number(4)
    );

    // 中村 moved within Chiyoda (転居): a 前住所 here asks nothing.
    let within = format!(
        "C-0202,中村　二,ナカムラ ジ,1980-01-01,男,東京都千代田区2,{},{today},{CHIYODA}\r\n",
        my_number(22)
    );

    // Each way a row can get the two columns wrong is named; nothing is imported.
    let bad = format!(
        "{header}{ito}\
         C-0201,中村　一,ナカムラ ハジメ,1980-01-01,男,東京都千代田区1,{},{today},141004\r\n\
         {within}\
         C-0203,中村　三,ナカムラ サン,1980-01-01,男,東京都千代田区3,{},,{YOKOHAMA}\r\n\
         C-0204,中村　四,ナカムラ シ,1980-01-01,男,東京都千代田区4,,{today},{YOKOHAMA}\r\n\
         C-0205,中村　五,ナカムラ ゴ,1980-01-01,男,東京都千代田区5,{},2099-01-01,\r\n",
        my_number(21),
        my_number(23),
        my_number(25),
    );
    let extract = f.dir.path().join("chiyoda-extract-bad.csv");
    write_shift_jis(&extract, &bad).unwrap();
    let output = f.b.cli(&["import", extract.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "3行目 [前住所市区町村コード] 前住所市区町村コード「141004」は市区町村コード",
        "5行目 [転入日] 前住所市区町村コードのある行には転入日が必要です",
        "6行目 [個人番号] 接種開始日以降の転入者の接種歴を前住所地に求めるには個人番号が必要です",
        "7行目 [転入日] 転入日「2099-01-01」を読めません",
        "4 bad rows: nothing was imported",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(ok(&f.b.cli(&["status"])).contains("residents 0"), "a refused file changes nothing");

    let extract = f.dir.path().join("chiyoda-extract.csv");
    write_shift_jis(&extract, &format!("{header}{ito}{suzuki}{within}")).unwrap();
    let out = ok(&f.b.cli(&["import", extract.to_str().unwrap()]));
    assert!(out.contains("created 3"), "{out}");
    assert!(
        out.contains("histories asked from previous municipalities (sent once the node runs): 1"),
        "{out}"
    );
    let again = ok(&f.b.cli(&["import", extract.to_str().unwrap()]));
    assert!(
        again.contains("unchanged 3") && !again.contains("asked"),
        "the same file asks nothing again: {again}"
    );

    // 伊藤 had his first dose in Yokohama before Chiyoda's node came up.
    f.national.start();
    f.a.start().unwrap();
    let ito_coupon = coupon_of(&f.coupons, "0000000106", 1).clone();
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = f.a.post("/api/v1/captures", &capture(&ito_coupon.qr_text, &vial, None)).unwrap();
    assert_eq!(code, 201, "{body}");
    f.b.start().unwrap();
    let ito_here = resident_id(&f.b, "C-0106");
    let asks = handoffs(&f.b)["asks"].as_array().unwrap().clone();
    assert_eq!(asks.len(), 1, "鈴木 moved before the campaign, 中村 within Chiyoda: {asks:?}");
    assert_eq!(asks[0]["atena_number"], "C-0106");
    assert_eq!(asks[0]["previous"], YOKOHAMA);
    assert!(asks[0]["actor"].as_str().unwrap().starts_with("cli:"), "{}", asks[0]);

    // Yokohama answers the request by itself; the history joins the resident the extract made.
    let (old, joined) = assert_moved_once(&f, "0000000106");
    assert_eq!(joined, ito_here);
    let reason = &of_person(&f.a, "outgoing", asks[0]["person_key"].as_str().unwrap())[0]["reason"];
    assert!(reason.as_str().unwrap().contains("転入届"), "{reason}");
    let at_b = record(&f.b, &joined);
    assert_eq!(at_b["identity"]["atena_number"], "C-0106");
    assert_eq!(at_b["history"].as_array().unwrap().len(), 1, "{at_b}");
    assert_eq!(at_b["next_dose"], 2, "{at_b}");
    let ask = wait_for("the ask to be answered", Duration::from_secs(30), || {
        let asks = handoffs(&f.b)["asks"].as_array().unwrap().clone();
        asks.into_iter().find(|a| a["state"] == "received")
    });
    assert_eq!(ask["holder"], YOKOHAMA, "{ask}");
    assert_eq!(record(&f.a, &old)["identity"]["status"], "moved_out");
    let suzuki_there = record(&f.a, &resident_id(&f.a, "0000000104"));
    assert_eq!(suzuki_there["identity"]["status"], "active", "nobody asked for 鈴木: {suzuki_there}");

    f.a.stop().unwrap();
    f.b.stop().unwrap();
    let export = f.dir.path().join("audit-b.jsonl");
    let data = f.b.data.to_str().unwrap().to_owned();
    let args = ["audit", "export", "--data", &data, "--from", "2020-01-01", "--to", "2099-12-31", "--out"];
    ok(&f.b.cli(&[&args[..], &[export.to_str().unwrap()]].concat()));
    let exported = std::fs::read_to_string(&export).unwrap();
    assert!(
        exported.lines().any(|l| l.contains("\"residents.import\"") && l.contains("asked=1")),
        "the import's audit entry counts its requests:\n{exported}"
    );
    for node in [&f.a, &f.b] {
        assert!(ok(&node.cli(&["statistics", "verify"])).contains("一致"), "counters equal documents");
        assert!(ok(&node.cli(&["audit", "verify"])).contains("intact"));
    }
}
