//! Venue terminals and vaccination away from home, with real processes on loopback: a
//! national node, Yokohama (141003) with a standby, Chiyoda (131016), a terminal of each.
//! Terminals enrol with a one-time token, capture offline, survive kill -9, refuse a
//! revoked coupon once synced; a Yokohama coupon scanned in Chiyoda reaches Yokohama's
//! node through a partition that opens and heals, and Chiyoda keeps none of it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Node, PrintedCoupon, Proxy, TempDir, free_port};

use super::federation::{National, history, join, standby_of, status, wait_converged};
use super::{COMIRNATY, coupon_of, days_from_today, ok, raw_vial, set_up_fixture};

const YOKOHAMA_VENUE: &str = "naka-kumin-kaikan";
const CHIYODA_VENUE: &str = "chiyoda-kumin-hall";

/// Polls `check` every 100 ms until it returns `Some`, or fails after `within`.
pub(super) fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn enrol_token(node: &Node, venue: &str) -> String {
    let out = ok(&node.cli(&["terminal", "enrol-token", "--venue", venue]));
    out.lines().find(|l| l.starts_with("vrs_e_")).expect("a token line").to_owned()
}

pub(super) fn terminal(dir: &std::path::Path, name: &str, municipality: &str, token: &str) -> Node {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    Node::init_with(&dir.join(name), municipality, &["--plain-http", "--role", "terminal", "--enroll", token])
        .unwrap()
}

pub(super) fn scan(terminal: &Node, coupon: &PrintedCoupon, vial: &str, venue: &str) -> (u16, Value) {
    terminal
        .post("/api/v1/captures", &json!({"coupon": coupon.qr_text, "vial": vial, "venue": venue}))
        .unwrap()
}

/// The terminal's log by event id.
pub(super) fn log(terminal: &Node) -> BTreeMap<String, Value> {
    let (code, body) = terminal.get("/api/v1/terminal/captures").unwrap();
    assert_eq!(code, 200, "{body}");
    body["captures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["capture"]["event_id"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

pub(super) fn state_of(terminal: &Node, event_id: &str) -> Value {
    log(terminal).get(event_id).map(|c| c["state"].clone()).unwrap_or(Value::Null)
}

pub(super) fn resident_id(node: &Node, atena: &str) -> String {
    let (code, body) = node.get(&format!("/api/v1/residents?atena={atena}")).unwrap();
    assert_eq!(code, 200, "{body}");
    body["residents"][0]["resident_id"].as_str().unwrap().to_owned()
}

/// How many times each event id appears in the resident's history.
pub(super) fn events_of(node: &Node, resident: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for dose in history(node, resident).as_array().unwrap() {
        *seen.entry(dose["event_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    seen
}

pub(super) fn p2p() -> (String, u16) {
    let port = free_port();
    (format!("/ip4/127.0.0.1/tcp/{port}"), port)
}

#[test]
fn terminals_capture_offline_survive_kill_9_and_route_away_from_home_captures_through_a_partition() {
    let dir = TempDir::new("terminals");
    let mut national = National::init(dir.path());
    let analyst = national.token("analyst", "national_analyst", None);
    let admin = national.token("admin", "national_admin", None);
    let kanagawa = national.token("kanagawa", "prefecture_user", Some(14));
    let tokyo = national.token("tokyo", "prefecture_user", Some(13));
    national.start();

    // Yokohama, reached by other nodes only through a proxy that the test can cut.
    let (listen, port) = p2p();
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let mut yokohama =
        Node::init_with(&dir.path().join("a"), "141003", &["--plain-http", "--p2p-listen", &listen]).unwrap();
    let config = yokohama.data.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let advertised = format!("[p2p]\nadvertise = \"/ip4/127.0.0.1/tcp/{}\"\n", proxy.port);
    std::fs::write(&config, text.replacen("[p2p]\n", &advertised, 1)).unwrap();
    let coupons = set_up_fixture(&yokohama, dir.path());
    national.approve(&join(&yokohama, &national, "a"));
    let mut standby = standby_of(dir.path(), "s", &yokohama.data.join("keys"));
    national.approve(&join(&standby, &national, "s"));

    // Chiyoda registers a lot Yokohama never saw.
    let (listen, port) = p2p();
    std::fs::create_dir_all(dir.path().join("c")).unwrap();
    let mut chiyoda =
        Node::init_with(&dir.path().join("c"), "131016", &["--plain-http", "--p2p-listen", &listen]).unwrap();
    let config = chiyoda.data.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let advertised = format!("[p2p]\nadvertise = \"/ip4/127.0.0.1/tcp/{port}\"\n");
    std::fs::write(&config, text.replacen("[p2p]\n", &advertised, 1)).unwrap();
    let lot = ["lots", "add", "--lot", "CHY0001", "--gtin", COMIRNATY, "--expiry", &days_from_today(90)];
    ok(&chiyoda.cli(&lot));
    national.approve(&join(&chiyoda, &national, "c"));

    let token_a = enrol_token(&yokohama, YOKOHAMA_VENUE);
    yokohama.start().unwrap();
    standby.start().unwrap();
    chiyoda.start().unwrap();
    // Chiyoda's administrator issues the token through the API of the running node.
    let (code, issued) =
        chiyoda.post("/api/v1/terminals/enrolments", &json!({"venue": CHIYODA_VENUE})).unwrap();
    assert_eq!(code, 201, "{issued}");
    let token_c = issued["token"].as_str().unwrap().to_owned();
    let (_, listed) = chiyoda.get("/api/v1/terminals").unwrap();
    assert!(!listed.to_string().contains(&token_c[6..70]), "the secret is never listed: {listed}");

    // Enrolment: one terminal per token; a second use is refused and writes nothing.
    let mut terminal_a = terminal(dir.path(), "ta", "141003", &token_a);
    let mut terminal_c = terminal(dir.path(), "tc", "131016", &token_c);
    std::fs::create_dir_all(dir.path().join("tx")).unwrap();
    let again = Node::init_with(
        &dir.path().join("tx"),
        "141003",
        &["--plain-http", "--role", "terminal", "--enroll", &token_a],
    );
    let refusal = again.err().expect("a used enrolment token is refused").to_string();
    assert!(refusal.contains("登録トークンが使用済み"), "{refusal}");
    assert!(!dir.path().join("tx/node/node.toml").exists(), "a refused enrolment left a node behind");
    terminal_a.start().unwrap();
    terminal_c.start().unwrap();
    // Chiyoda's terminal needs the directory (Yokohama's coupon key) from its bundle.
    wait_for("Chiyoda's terminal to hold the directory", Duration::from_secs(30), || {
        let body = status(&terminal_c);
        (body["directory_version"].as_u64() >= Some(4)).then_some(())
    });

    // A terminal holds no resident documents and serves no resident routes.
    let (code, _) = terminal_a.get("/api/v1/residents?atena=0000000101").unwrap();
    assert_eq!(code, 404, "a terminal has no resident routes");

    // 1. Online at home.
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, body) = scan(&terminal_a, coupon_of(&coupons, "0000000101", 1), &vial, YOKOHAMA_VENUE);
    assert_eq!(code, 201, "{body}");
    let first = body["event_id"].as_str().unwrap().to_owned();
    let state = wait_for("the first capture to be recorded", Duration::from_secs(20), || {
        let state = state_of(&terminal_a, &first);
        (state["state"] == "recorded").then_some(state)
    });
    assert_eq!((state["owner"].as_str(), state["dose_number"].as_u64()), (Some("141003"), Some(1)));
    let r101 = resident_id(&yokohama, "0000000101");
    assert_eq!(events_of(&yokohama, &r101).get(&first), Some(&1));
    // A client's event id names one capture: reused for another coupon, it is refused.
    let other = coupon_of(&coupons, "0000000106", 1);
    let body = json!({"coupon": other.qr_text, "vial": vial, "venue": YOKOHAMA_VENUE, "event_id": first});
    let (code, body) = terminal_a.post("/api/v1/captures", &body).unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("event_id_reused")), "{body}");

    // 2. Away from home: a Yokohama coupon in Chiyoda, with Chiyoda's lot.
    let chiyoda_vial = raw_vial(COMIRNATY, "CHY0001");
    let (code, body) = scan(&terminal_c, coupon_of(&coupons, "0000000102", 1), &chiyoda_vial, CHIYODA_VENUE);
    assert_eq!(code, 201, "{body}");
    let away = body["event_id"].as_str().unwrap().to_owned();
    let state = wait_for("the away-from-home capture to reach Yokohama", Duration::from_secs(30), || {
        let state = state_of(&terminal_c, &away);
        (state["state"] == "recorded").then_some(state)
    });
    assert_eq!(state["owner"], "141003", "{state}");
    let r102 = resident_id(&yokohama, "0000000102");
    let dose = history(&yokohama, &r102)[0].clone();
    assert_eq!(dose["event_id"], away.as_str());
    assert_eq!(dose["venue"], format!("131016/{CHIYODA_VENUE}"));
    assert_eq!(dose["lot"], "CHY0001");
    // Chiyoda keeps nothing of it once Yokohama has answered: no outbox entry, and its
    // terminal forgot the scanned texts.
    assert_eq!(status(&chiyoda)["forward_outbox"], 0);
    let logged = &log(&terminal_c)[&away];
    assert_eq!(logged["capture"]["coupon"], "", "{logged}");
    assert_eq!(logged["coupon_code"], "", "{logged}");

    // 3. A partition between Chiyoda and Yokohama: the capture waits at Chiyoda, durably.
    proxy.block();
    let (code, body) = scan(&terminal_c, coupon_of(&coupons, "0000000104", 1), &chiyoda_vial, CHIYODA_VENUE);
    assert_eq!(code, 201, "{body}");
    let partitioned = body["event_id"].as_str().unwrap().to_owned();
    wait_for("the capture to wait in Chiyoda's outbox", Duration::from_secs(20), || {
        (status(&chiyoda)["forward_outbox"] == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state_of(&terminal_c, &partitioned)["state"], "forwarded");
    let r104 = resident_id(&yokohama, "0000000104");
    assert!(events_of(&yokohama, &r104).is_empty(), "nothing crossed the partition");
    // Chiyoda is killed while the link is cut: the outbox survives.
    chiyoda.kill9();
    chiyoda.start().unwrap();
    proxy.heal();
    wait_for("the partitioned capture after healing", Duration::from_secs(60), || {
        (state_of(&terminal_c, &partitioned)["state"] == "recorded").then_some(())
    });
    assert_eq!(events_of(&yokohama, &r104).get(&partitioned), Some(&1));
    assert_eq!(status(&chiyoda)["forward_outbox"], 0);

    // 4. A revoked coupon is refused by a terminal that has synced, offline.
    let directory_a = status(&terminal_a)["directory_version"].as_u64();
    assert!(directory_a >= Some(4), "terminal A holds no directory: {directory_a:?}");
    let c108 = coupon_of(&coupons, "0000000108", 1);
    let number = &c108.code[8..18];
    let (code, body) =
        yokohama.post(&format!("/api/v1/coupons/{number}/revoke"), &json!({"reason": "紛失届"})).unwrap();
    assert_eq!(code, 200, "{body}");
    wait_for("the terminal to learn of the revocation", Duration::from_secs(20), || {
        (status(&terminal_a)["blocked_coupons"] == 1).then_some(())
    });
    // The new bundle left the unchanged directory out; the terminal kept the one it held.
    assert_eq!(status(&terminal_a)["directory_version"].as_u64(), directory_a);
    yokohama.stop().unwrap();
    let (code, body) = scan(&terminal_a, c108, &vial, YOKOHAMA_VENUE);
    assert_eq!((code, body["code"].as_str()), (422, Some("coupon_revoked")), "{body}");

    // 5. Offline: the node is down; captures are acknowledged once stored on the terminal,
    // and a kill -9 of the terminal mid-capture loses none of the acknowledged ones.
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for atena in ["0000000105", "0000000106"] {
        let (code, body) = scan(&terminal_a, coupon_of(&coupons, atena, 1), &vial, YOKOHAMA_VENUE);
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["state"]["state"], "pending", "{body}");
        acknowledged.push((atena.to_owned(), body["event_id"].as_str().unwrap().to_owned()));
    }
    let url = terminal_a.url("/api/v1/captures");
    let (token, agent) = (terminal_a.token.clone(), terminal_a.agent().clone());
    let qr = coupon_of(&coupons, "0000000107", 1).qr_text.clone();
    let vial_107 = vial.clone();
    let racer = std::thread::spawn(move || {
        let body = json!({"coupon": qr, "vial": vial_107, "venue": YOKOHAMA_VENUE});
        agent
            .post(&url)
            .header("Authorization", format!("Bearer {token}"))
            .send_json(&body)
            .ok()
            .and_then(|r| tests::read(r).ok())
    });
    std::thread::sleep(Duration::from_millis(3));
    terminal_a.kill9();
    if let Some((201, body)) = racer.join().unwrap() {
        acknowledged.push(("0000000107".into(), body["event_id"].as_str().unwrap().to_owned()));
    }
    terminal_a.start().unwrap();
    // The same scan again is the same capture, not a second one.
    let (code, body) = scan(&terminal_a, coupon_of(&coupons, "0000000105", 1), &vial, YOKOHAMA_VENUE);
    assert_eq!((code, body["event_id"].as_str()), (200, Some(acknowledged[0].1.as_str())), "{body}");
    // 107 may or may not have been stored before the kill; either way one scan settles it.
    let (code, body) = scan(&terminal_a, coupon_of(&coupons, "0000000107", 1), &vial, YOKOHAMA_VENUE);
    assert!(code == 200 || code == 201, "{body}");
    if code == 201 {
        acknowledged.push(("0000000107".into(), body["event_id"].as_str().unwrap().to_owned()));
    }
    assert!(acknowledged.iter().filter(|(a, _)| a == "0000000107").count() <= 1);
    // The node comes back and is killed again while the terminal pushes and the standby
    // pulls; what it acknowledged survives, the rest is pushed again.
    yokohama.start().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    yokohama.kill9();
    yokohama.start().unwrap();

    // After healing: every acknowledged capture is in the owner's document exactly once.
    for (atena, event_id) in &acknowledged {
        wait_for("the offline captures to be recorded", Duration::from_secs(30), || {
            (state_of(&terminal_a, event_id)["state"] == "recorded").then_some(())
        });
        let resident = resident_id(&yokohama, atena);
        assert_eq!(events_of(&yokohama, &resident).get(event_id), Some(&1), "{atena}");
        assert_eq!(events_of(&yokohama, &resident).len(), 1, "{atena}: one dose, no duplicate");
    }
    assert_eq!(status(&terminal_a)["pending"], 0);

    // The standby holds the same documents as the primary: the same heads, every resident.
    wait_converged(&yokohama, &standby, Duration::from_secs(30));
    let heads = |node: &Node, resident: &str| {
        let (code, body) = node.get(&format!("/api/v1/residents/{resident}")).unwrap();
        assert_eq!(code, 200, "{body}");
        body["heads"].clone()
    };
    for (atena, ..) in super::FIXTURE {
        let resident = resident_id(&yokohama, atena);
        wait_for("the standby to hold the primary's heads", Duration::from_secs(30), || {
            (heads(&yokohama, &resident) == heads(&standby, &resident)).then_some(())
        });
        assert!(heads(&yokohama, &resident).as_array().is_some_and(|h| !h.is_empty()), "{atena}");
        assert_eq!(history(&yokohama, &resident), history(&standby, &resident), "{atena}");
    }

    // 6. The national node: counts only, equal to what the municipalities hold, after a
    // void and an amendment too — and not one byte about a fixture resident.
    let (code, body) = yokohama
        .post(
            &format!("/api/v1/residents/{r101}/doses/{first}/void"),
            &json!({"reason": "別人の接種券で記録"}),
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (_, event_105) = acknowledged.iter().find(|(atena, _)| atena == "0000000105").unwrap();
    let r105 = resident_id(&yokohama, "0000000105");
    let amend = json!({"reason": "接種日の誤入力", "vaccinated_on": days_from_today(-1)});
    let (code, body) =
        yokohama.post(&format!("/api/v1/residents/{r105}/doses/{event_105}/amend"), &amend).unwrap();
    assert_eq!(code, 200, "{body}");
    national_holds_counts_only(&national, (&analyst, &kanagawa, &tokyo), &yokohama, &chiyoda, &coupons);

    stock_from_the_state_to_the_venue(&national, (&admin, &kanagawa, &tokyo), &yokohama);

    // An auditor checks Yokohama's log against the checkpoints deposited at the national node.
    yokohama.stop().unwrap();
    let anchors = national.json("/api/v1/national/anchors/141003", &analyst);
    let file = dir.path().join("anchors-141003.json");
    std::fs::write(&file, anchors.to_string()).unwrap();
    let out = ok(&yokohama.cli(&["audit", "verify", "--anchors", file.to_str().unwrap()]));
    assert!(out.contains("audit log intact"), "{out}");
    let n: u64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("国に預けたチェックポイント / checkpoints deposited at the national node: ")
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(n >= 1, "{out}");
}

/// Valid doses per vaccination date, from the residents' documents themselves.
fn doses_by_date(node: &Node) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (atena, ..) in super::FIXTURE {
        for dose in history(node, &resident_id(node, atena)).as_array().unwrap() {
            if dose["status"] == "valid" {
                *out.entry(dose["vaccinated_on"].as_str().unwrap().to_owned()).or_insert(0) += 1;
            }
        }
    }
    out
}

pub(super) type Breakdown = BTreeMap<(String, u64, String, String), u64>;

/// A municipality's own figures for a date, by product, dose number, age band and sex.
pub(super) fn own_figures(node: &Node, date: &str) -> (Breakdown, u64) {
    let (code, body) = node.get(&format!("/api/v1/statistics/daily?date={date}")).unwrap();
    assert_eq!(code, 200, "{body}");
    let mut out = Breakdown::new();
    for row in body["statistics"]["doses"].as_array().unwrap() {
        let key = (
            row["product"].as_str().unwrap().to_owned(),
            row["dose_number"].as_u64().unwrap(),
            row["age_band"].as_str().unwrap().to_owned(),
            row["sex"].as_str().unwrap().to_owned(),
        );
        *out.entry(key).or_insert(0) += row["count"].as_u64().unwrap();
    }
    (out, body["unsent_documents"].as_u64().unwrap())
}

pub(super) fn national_figures(national: &National, token: &str, scope: &str, date: &str) -> Breakdown {
    let path =
        format!("/api/v1/national/totals?{scope}&from={date}&to={date}&by=product,dose_number,age_band,sex");
    let body = national.json(&path, token);
    body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let key = (
                row["product"].as_str().unwrap().to_owned(),
                row["dose_number"].as_u64().unwrap(),
                row["age_band"].as_str().unwrap().to_owned(),
                row["sex"].as_str().unwrap().to_owned(),
            );
            (key, row["count"].as_u64().unwrap())
        })
        .collect()
}

fn national_holds_counts_only(
    national: &National,
    (analyst, kanagawa, tokyo): (&str, &str, &str),
    yokohama: &Node,
    chiyoda: &Node,
    coupons: &[PrintedCoupon],
) {
    let held = doses_by_date(yokohama);
    let today = days_from_today(0);
    let yesterday = days_from_today(-1);
    assert_eq!(held.get(&yesterday), Some(&1), "the amended dose moved to yesterday: {held:?}");
    for date in [&yesterday, &today] {
        let (own, _) = own_figures(yokohama, date);
        assert_eq!(
            own.values().sum::<u64>(),
            held.get(date).copied().unwrap_or(0),
            "{date}: counters = documents"
        );
        let reached = wait_for("the national figures to equal Yokohama's", Duration::from_secs(30), || {
            let (own, unsent) = own_figures(yokohama, date);
            (unsent == 0 && national_figures(national, analyst, "municipality=141003", date) == own)
                .then_some(own)
        });
        // National and prefecture totals are the sums over the municipalities.
        let (chiyoda_own, _) = own_figures(chiyoda, date);
        assert!(chiyoda_own.is_empty(), "Chiyoda recorded nothing of its own: {chiyoda_own:?}");
        assert_eq!(national_figures(national, analyst, "", date), reached, "{date}");
        assert_eq!(national_figures(national, kanagawa, "prefecture=14", date), reached, "{date}");
        assert!(national_figures(national, tokyo, "prefecture=13", date).is_empty(), "{date}");
    }
    // A prefecture user sees its prefecture only (by default, and when it asks); nobody sees
    // anything without a token.
    let own = national.json(&format!("/api/v1/national/totals?from={today}&to={today}"), kanagawa);
    assert_eq!(own["scope"]["prefecture"], 14, "{own}");
    for (token, path) in [
        (kanagawa, format!("/api/v1/national/totals?prefecture=13&from={today}&to={today}")),
        (kanagawa, "/api/v1/national/coverage?municipality=131016".to_owned()),
        (tokyo, format!("/api/v1/national/totals?municipality=141003&from={today}&to={today}")),
        (tokyo, "/api/v1/national/anchors/131016".to_owned()),
    ] {
        let (code, body) = national.get(&path, Some(token));
        assert_eq!(code, 403, "{path}: {body}");
    }
    let (code, _) = national.get("/api/v1/national/status", None);
    assert_eq!(code, 401);
    let (code, body) = national.get("/api/v1/national/totals?from=2026-13-01&to=2026-12-01", Some(analyst));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("from"), "{body}");
    // Freshness: Yokohama reported just now; Kanagawa's other municipalities never did.
    let fresh = national.json("/api/v1/national/freshness?stale_after_minutes=5", kanagawa);
    assert_eq!(fresh["municipalities"], 33, "Kanagawa has 33 municipalities");
    let rows = fresh["rows"].as_array().unwrap();
    let yokohama_row = rows.iter().find(|r| r["municipality"] == "141003").unwrap();
    assert_eq!(yokohama_row["stale"], false, "{yokohama_row}");
    assert_eq!(fresh["stale"], 32);
    // Yokohama deposited its audit checkpoints.
    let anchors = national.json("/api/v1/national/anchors/141003", analyst);
    assert!(!anchors["checkpoints"].as_array().unwrap().is_empty(), "{anchors}");
    // The V-SYS-style daily report, in Shift_JIS.
    let (code, _) = national
        .get(&format!("/api/v1/national/reports/daily?date={today}&encoding=shift_jis"), Some(analyst));
    assert_eq!(code, 200);
    let agent = tests::agent_trusting(None).unwrap();
    let url =
        format!("http://{}/api/v1/national/reports/daily?date={today}&encoding=shift_jis", national.http);
    let mut response = agent.get(&url).header("Authorization", format!("Bearer {analyst}")).call().unwrap();
    let bytes = response.body_mut().read_to_vec().unwrap();
    let (text, _, malformed) = encoding_rs::SHIFT_JIS.decode(&bytes);
    assert!(!malformed);
    assert!(text.starts_with("都道府県コード,"), "{text}");
    let total_today: u64 = national_figures(national, analyst, "", &today).values().sum();
    let reported: u64 = text
        .lines()
        .filter(|l| l.contains(",横浜市,"))
        .map(|l| l.rsplit(',').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(reported, total_today, "{text}");

    // The public venue listing: what Yokohama lists, readable without a login.
    let venue = json!({
        "name": "中区民会館", "address": "神奈川県横浜市中区日本大通1", "products": ["comirnaty-30"],
        "opening_days": ["sat", "sun"], "note": "予約制"
    });
    let (code, body) = yokohama.post("/api/v1/venues/naka-kumin-kaikan", &venue).unwrap();
    assert_eq!(code, 200, "{body}");
    let hidden = json!({"name": "職員用", "address": "横浜市役所", "products": ["comirnaty-30"], "opening_days": [], "listed": false});
    assert_eq!(yokohama.post("/api/v1/venues/staff-only", &hidden).unwrap().0, 200);
    let bad = json!({"name": "会場", "address": "横浜市", "products": ["no-such-vaccine"], "opening_days": ["mon"]});
    let (code, body) = yokohama.post("/api/v1/venues/bad", &bad).unwrap();
    assert_eq!((code, body["field"].as_str()), (400, Some("products")), "{body}");
    let listing = wait_for("the venue in the public listing", Duration::from_secs(30), || {
        let (code, body) = national.get("/api/v1/public/venues?prefecture=14&product=comirnaty-30", None);
        (code == 200 && body.contains("naka-kumin-kaikan")).then_some(body)
    });
    assert!(listing.contains("中区民会館") && listing.contains("横浜市"), "{listing}");
    assert!(!listing.contains("staff-only") && !listing.contains("\"bad\""), "{listing}");
    let (_, none) = national.get("/api/v1/public/venues?product=spikevax", None);
    assert!(!none.contains("naka-kumin-kaikan"), "{none}");

    assert_no_personal_data(&national.data, coupons);
}

/// Every byte the national node stored and every message it received (`received.jsonl`)
/// is searched for every fixture resident's name (both spacings), kana, birth date (three
/// forms), address, atena number, 個人番号 and coupon codes, in UTF-8 and Shift_JIS.
pub(super) fn assert_no_personal_data(national_data: &std::path::Path, coupons: &[PrintedCoupon]) {
    let mut stored: Vec<u8> = Vec::new();
    let mut files = vec![national_data.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            stored.extend(std::fs::read(&path).unwrap());
        }
    }
    let received = std::fs::read_to_string(national_data.join("received.jsonl")).unwrap();
    assert!(received.lines().count() >= 2, "the national node received reports: {received}");
    assert!(received.contains("141003") && received.contains("doses"), "{received}");
    let mut personal: Vec<String> = Vec::new();
    for (i, (atena, name, kana, birth, _, address)) in super::FIXTURE.iter().enumerate() {
        personal.extend([atena, name, kana, birth, address].map(|s| (*s).to_owned()));
        personal.push(name.replace('　', " "));
        let digits: String = birth.chars().filter(char::is_ascii_digit).collect();
        personal.push(format!("{}-{}-{}", &digits[..4], &digits[4..6], &digits[6..]));
        personal.push(digits);
        personal.push(super::my_number(i as u64 + 1));
    }
    for coupon in coupons {
        personal.push(coupon.code.clone());
        personal.push(coupon.code[8..18].to_owned());
    }
    // Bytes as Latin-1 characters, so that std's substring search (optimized even in a
    // debug build) finds byte sequences exactly.
    let latin1 = |bytes: &[u8]| -> String { bytes.iter().map(|&b| char::from(b)).collect() };
    let haystack = latin1(&stored);
    assert!(haystack.contains("141003"), "the check reads the national node's data");
    for needle in &personal {
        let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode(needle);
        for form in [needle.as_bytes(), &sjis] {
            assert!(!haystack.contains(&latin1(form)), "the national node's files hold {needle:?}");
        }
    }
}

/// Allocation and stock: the state → Kanagawa → Yokohama → a venue; deliveries, wastage and
/// the doses given there; each level sees its stock and days of supply.
fn stock_from_the_state_to_the_venue(
    national: &National,
    (admin, kanagawa, tokyo): (&str, &str, &str),
    yokohama: &Node,
) {
    let allocate = |token: &str, body: Value| national.post("/api/v1/national/allocations", token, &body);
    let (code, body) = allocate(admin, json!({"prefecture": 14, "product": "comirnaty-30", "doses": 1000}));
    assert_eq!(code, 201, "{body}");
    let (code, body) =
        allocate(kanagawa, json!({"municipality": "141003", "product": "comirnaty-30", "doses": 600}));
    assert_eq!(code, 201, "{body}");
    let (code, body) =
        allocate(kanagawa, json!({"municipality": "141305", "product": "comirnaty-30", "doses": 500}));
    assert_eq!((code, body["code"].as_str()), (409, Some("insufficient_stock")), "{body}");
    assert!(body["detail_ja"].as_str().unwrap_or_default().contains("400"), "{body}");
    let (code, _) = allocate(tokyo, json!({"municipality": "141003", "product": "comirnaty-30", "doses": 1}));
    assert_eq!(code, 403, "Tokyo's user cannot allocate to Yokohama");
    let (code, _) = allocate(admin, json!({"municipality": "141003", "product": "comirnaty-30", "doses": 1}));
    assert_eq!(code, 400, "the state allocates to prefectures");

    // Yokohama gives 300 to its venue, which receives them and breaks a vial (6 doses).
    for (kind, doses, reason) in
        [("allocation", 300, ""), ("delivery", 300, ""), ("wastage", 6, "バイアル破損")]
    {
        let entry = json!({"kind": kind, "venue": YOKOHAMA_VENUE, "product": "comirnaty-30", "doses": doses, "reason": reason});
        let (code, body) = yokohama.post("/api/v1/stock/entries", &entry).unwrap();
        assert_eq!(code, 201, "{body}");
    }
    let bad = json!({"kind": "wastage", "venue": YOKOHAMA_VENUE, "product": "comirnaty-30", "doses": 1});
    let (code, body) = yokohama.post("/api/v1/stock/entries", &bad).unwrap();
    assert_eq!((code, body["field"].as_str()), (400, Some("reason")), "wastage needs a reason: {body}");
    // Doses given at the venue, from the documents.
    let used_at_venue: u64 = super::FIXTURE
        .iter()
        .flat_map(|(atena, ..)| history(yokohama, &resident_id(yokohama, atena)).as_array().unwrap().clone())
        .filter(|d| d["status"] == "valid" && d["venue"] == YOKOHAMA_VENUE)
        .count() as u64;
    assert!(used_at_venue >= 3, "{used_at_venue}");
    let (code, body) = yokohama.get("/api/v1/stock").unwrap();
    assert_eq!(code, 200, "{body}");
    let venue =
        body["venues"].as_array().unwrap().iter().find(|v| v["venue"] == YOKOHAMA_VENUE).unwrap().clone();
    assert_eq!(
        (venue["delivered"].as_u64(), venue["used"].as_u64(), venue["wasted"].as_u64()),
        (Some(300), Some(used_at_venue), Some(6)),
        "{venue}"
    );
    assert_eq!(venue["on_hand"].as_i64(), Some(300 - used_at_venue as i64 - 6), "{venue}");
    assert!(venue["days_of_supply"].as_f64().is_some_and(|d| d > 0.0), "{venue}");

    // The national node sees Yokohama's stock once its report arrives: received 600, passed
    // on 300 to the venue, the doses given at Yokohama's venues, the wastage.
    let row = wait_for("Yokohama's stock at the national node", Duration::from_secs(30), || {
        let body = national.json("/api/v1/national/stock?municipality=141003", kanagawa);
        let row = body["products"].as_array()?.iter().find(|p| p["product"] == "comirnaty-30")?.clone();
        (row["wasted"] == 6 && row["passed_on"] == 300).then_some(row)
    });
    assert_eq!(row["received"], 600, "{row}");
    assert_eq!(row["used"].as_u64(), Some(used_at_venue), "{row}");
    assert_eq!(row["on_hand"].as_i64(), Some(600 - used_at_venue as i64 - 6), "{row}");
    let prefecture = national.json("/api/v1/national/stock", kanagawa);
    let row = &prefecture["products"][0];
    assert_eq!(
        (row["received"].as_u64(), row["passed_on"].as_u64()),
        (Some(1000), Some(600)),
        "{prefecture}"
    );
    // Doses given in Chiyoda came from Chiyoda's stock, which received none: negative on hand.
    let chiyoda = national.json("/api/v1/national/stock?municipality=131016", tokyo);
    let row = &chiyoda["products"][0];
    assert!(row["on_hand"].as_i64().is_some_and(|n| n < 0), "{chiyoda}");
    let listed = national.json("/api/v1/national/allocations", kanagawa);
    assert_eq!(listed["allocations"].as_array().unwrap().len(), 2, "Kanagawa's and Yokohama's: {listed}");
}
