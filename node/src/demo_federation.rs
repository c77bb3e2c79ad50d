//! The demo's second part: a small federation on this machine, as separate processes — a
//! national node, Yokohama (the demo node) and its standby, Chiyoda, and a venue terminal
//! of Chiyoda — and a Yokohama resident vaccinated in Chiyoda: the terminal checks the
//! coupon offline, Chiyoda's node forwards the capture to Yokohama's, Yokohama records it,
//! its standby replicates it, and Chiyoda keeps nothing of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::config::{InitOptions, NodeFiles, Role, init_data_dir, write_config};
use crate::store::Store;

/// The processes of the federation; stopped (SIGTERM) when dropped.
pub struct Federation {
    children: Vec<(String, Child)>,
}

impl Drop for Federation {
    fn drop(&mut self) {
        for (_, child) in &self.children {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        for (name, child) in &mut self.children {
            if child.wait().is_err() {
                eprintln!("{name} did not stop");
            }
        }
    }
}

fn free_loopback() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn p2p_address() -> anyhow::Result<String> {
    Ok(format!("/ip4/127.0.0.1/tcp/{}", free_loopback()?))
}

/// One plain-HTTP call to a node on loopback.
async fn http(
    method: &str,
    address: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let stream =
        tokio::net::TcpStream::connect(address).await.with_context(|| format!("cannot reach {address}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", address)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// Polls until `check` gives a value, or fails after `within`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        anyhow::ensure!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Member {
    name: &'static str,
    dir: PathBuf,
    http: Option<String>,
    token: String,
}

fn start(federation: &mut Federation, name: &str, dir: &Path, logs: &Path) -> anyhow::Result<()> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["run", "--data"])
        .arg(dir)
        .env("VRS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    federation.children.push((name.to_owned(), child));
    Ok(())
}

fn municipal(
    dir: &Path,
    code: &str,
    role: Role,
    keys_from: Option<PathBuf>,
    person_key_secret: Option<PathBuf>,
) -> anyhow::Result<Member> {
    let http = format!("127.0.0.1:{}", free_loopback()?);
    let p2p = p2p_address()?;
    let municipality =
        protocol::municipality::MunicipalityCode::parse(code).map_err(|e| anyhow::anyhow!("{e}"))?;
    let campaign_start = time::Date::from_calendar_date(2021, time::Month::February, 17)?;
    let options = InitOptions {
        p2p_listen: Some(p2p),
        keys_from,
        person_key_secret,
        ..InitOptions::loopback(role, municipality, &http, campaign_start)
    };
    let token = init_data_dir(dir, &options)?;
    Ok(Member { name: "", dir: dir.to_owned(), http: Some(http), token })
}

/// Builds and starts the federation around the demo's Yokohama node (stopped), and walks a
/// Yokohama coupon through a Chiyoda terminal. `coupon` is the QR text of an unused coupon.
pub fn run(
    root: &Path,
    yokohama_dir: &Path,
    yokohama_listen: &str,
    yokohama_token: &str,
    coupon: &str,
) -> anyhow::Result<Federation> {
    println!("== 9. 連携 / a small federation on this machine (separate processes, libp2p on loopback)");
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut federation = Federation { children: Vec::new() };

    // The national node signs the directory.
    let national = root.join("national");
    let national_listen = p2p_address()?;
    let national_http = format!("127.0.0.1:{}", free_loopback()?);
    let init = crate::federation::NationalInit {
        p2p_listen: &national_listen,
        advertise: None,
        http_listen: &national_http,
        plain_http: true,
    };
    let (peer, key_hex) = crate::federation::init_national(&national, &init)?;
    let national_address = format!("{national_listen}/p2p/{peer}");
    let national_key = protocol::person::hex_decode(&key_hex).context("directory key")?;

    // Yokohama listens on loopback and joins; a standby with its keys; Chiyoda with a lot.
    let mut files = NodeFiles::load(yokohama_dir)?;
    files.config.p2p.listen = p2p_address()?;
    write_config(yokohama_dir, &files.config)?;
    let yokohama = Member {
        name: "横浜市 141003 (primary)",
        dir: yokohama_dir.to_owned(),
        http: Some(yokohama_listen.to_owned()),
        token: yokohama_token.to_owned(),
    };
    let mut standby = municipal(
        &root.join("yokohama-standby"),
        "141003",
        Role::Standby,
        Some(yokohama_dir.join("keys")),
        None,
    )?;
    standby.name = "横浜市 141003 (standby)";
    // Every municipality of a federation shares the person-key secret (a 個人番号 gives the
    // same person key everywhere, which relocation needs).
    let secret = yokohama_dir.join("keys/person-key.secret");
    let mut chiyoda = municipal(&root.join("chiyoda"), "131016", Role::Municipal, None, Some(secret))?;
    chiyoda.name = "千代田区 131016";
    let chiyoda_files = NodeFiles::load(&chiyoda.dir)?;
    let lot = crate::api::validate_lot(
        &chiyoda_files.catalogue,
        "CHY0001",
        "04987000001014",
        &(crate::clock::japan_today() + time::Duration::days(90)).to_string(),
    )
    .map_err(|p| anyhow::anyhow!("{}", p.message_en))?;
    let chiyoda_store = Store::open(&chiyoda_files.store_path())?;
    chiyoda_store.put_lots(std::slice::from_ref(&lot))?;
    chiyoda_files.audit_cli(&chiyoda_store, "lot.put", "lot:CHY0001", "ok")?;
    for member in [&yokohama, &standby, &chiyoda] {
        let request = crate::federation::join(&member.dir, &national_address, &national_key)?;
        let version = crate::federation::approve(&national, request)?;
        println!("   名簿 v{version} に登録 / approved into directory v{version}: {}", member.name);
    }
    // A one-time enrolment token for a terminal at Chiyoda's hall.
    let address = crate::terminals::p2p_address(&chiyoda_files)?;
    let txn = chiyoda_store.begin_write()?;
    let now = time::OffsetDateTime::now_utc();
    let (enrolment, _) =
        crate::terminals::add_enrolment(&txn, "chiyoda-kumin-hall", 1, "demo", &address, now)?;
    chiyoda_files.audit_log()?.append(
        &txn,
        &crate::config::cli_event("terminal.enrol_token", "venue:chiyoda-kumin-hall", "ok"),
        now,
    )?;
    txn.commit()?;
    drop(chiyoda_store);

    let analyst = crate::federation::add_national_token(
        &national,
        "demo-analyst",
        crate::auth::Role::NationalAnalyst,
        None,
        None,
    )?;
    // 神奈川県 (14), Yokohama's prefecture: its figures and no other prefecture's.
    let kanagawa = crate::federation::add_national_token(
        &national,
        "demo-kanagawa",
        crate::auth::Role::PrefectureUser,
        Some(14),
        None,
    )?;
    let ledger_admin = crate::federation::add_national_token(
        &national,
        "demo-admin",
        crate::auth::Role::NationalAdmin,
        None,
        None,
    )?;
    start(&mut federation, "national", &national, &logs)?;
    for member in [&yokohama, &standby, &chiyoda] {
        start(&mut federation, member.name, &member.dir, &logs)?;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        for member in [&yokohama, &standby, &chiyoda] {
            let http_address = member.http.as_deref().unwrap_or_default();
            wait_for("a node to answer", Duration::from_secs(30), || async {
                http("GET", http_address, "/healthz", "", None).await.ok().filter(|(s, _)| *s == 200)
            })
            .await?;
        }
        anyhow::Ok(())
    })?;

    // The terminal enrols with Chiyoda's node (a separate process from here on).
    let terminal_dir = root.join("chiyoda-terminal");
    let terminal_http = format!("127.0.0.1:{}", free_loopback()?);
    let options = InitOptions::loopback(
        Role::Terminal,
        chiyoda_files.config.municipality,
        &terminal_http,
        chiyoda_files.config.campaign.start,
    );
    let (terminal_token, _, terminal_peer) =
        crate::terminal::init_enrolled(&terminal_dir, options, &enrolment.to_text())?;
    println!("   端末を登録 / terminal enrolled at chiyoda-kumin-hall: peer {terminal_peer}");
    start(&mut federation, "terminal", &terminal_dir, &logs)?;
    let terminal = Member {
        name: "千代田区の会場端末 / Chiyoda venue terminal",
        dir: terminal_dir,
        http: Some(terminal_http),
        token: terminal_token,
    };

    let (node_header, http_header) = ("ノード / node", "HTTP");
    println!("   {node_header:<44} {http_header:<22} data");
    println!("   {:<44} {:<22} {}", "国 / national", "-", national.display());
    for member in [&yokohama, &standby, &chiyoda, &terminal] {
        println!(
            "   {:<44} {:<22} {}",
            member.name,
            member.http.as_deref().unwrap_or("-"),
            member.dir.display()
        );
    }
    println!("   ログ / logs: {}", logs.display());

    runtime.block_on(walk_away_from_home(&yokohama, &standby, &chiyoda, &terminal, coupon))?;
    runtime.block_on(national_figures(&national_http, &analyst, &kanagawa, &yokohama))?;
    runtime.block_on(relocation(&national_http, &ledger_admin, &yokohama, &chiyoda, coupon))?;
    runtime.block_on(terminal_operator(&terminal))?;
    println!(
        "   トークン / tokens: standby {}  chiyoda {}  terminal {}",
        standby.token, chiyoda.token, terminal.token
    );
    Ok(federation)
}

/// A venue operator of the terminal's own, so that its web UI can be tried.
async fn terminal_operator(terminal: &Member) -> anyhow::Result<()> {
    let address = terminal.http.as_deref().unwrap_or_default();
    let user = json!({
        "username": "kaijo", "role": "venue_operator", "password": crate::demo::DEMO_PASSWORD,
        "venues": ["chiyoda-kumin-hall"],
    });
    let (code, body) = http("POST", address, "/api/v1/users", &terminal.token, Some(user)).await?;
    anyhow::ensure!(code == 201, "adding the terminal's operator answered {code}: {body}");
    println!(
        "   端末の画面 / the terminal's web UI: http://{address}/ui/   会場担当 / venue operator: kaijo (password {})",
        crate::demo::DEMO_PASSWORD
    );
    Ok(())
}

/// Shows that the national node holds Yokohama's figures (and nothing else about anyone).
async fn national_figures(
    national_http: &str,
    analyst: &str,
    prefecture_user: &str,
    yokohama: &Member,
) -> anyhow::Result<()> {
    let today = crate::clock::japan_today();
    let (_, own) = http(
        "GET",
        yokohama.http.as_deref().unwrap_or_default(),
        &format!("/api/v1/statistics/daily?date={today}"),
        &yokohama.token,
        None,
    )
    .await?;
    let own_total: u64 =
        own["statistics"]["doses"].as_array().into_iter().flatten().filter_map(|d| d["count"].as_u64()).sum();
    let started = Instant::now();
    let path = format!("/api/v1/national/totals?municipality=141003&from={today}&to={today}&by=dose_number");
    let figures = wait_for("the national figures", Duration::from_secs(60), || async {
        let (code, body) = http("GET", national_http, &path, analyst, None).await.ok()?;
        (code == 200 && body["total"].as_u64() == Some(own_total)).then_some(body)
    })
    .await?;
    println!(
        "== 10. 国 / the national node holds counts only: Yokohama today {} doses (by dose number {}), equal to Yokohama's own figures, seen {:.0} ms after asking",
        figures["total"],
        figures["rows"],
        started.elapsed().as_secs_f64() * 1000.0
    );
    println!(
        "   curl -H 'Authorization: Bearer {analyst}' 'http://{national_http}/api/v1/national/totals?from={today}&to={today}&by=product,dose_number'"
    );
    println!(
        "   curl -H 'Authorization: Bearer {analyst}' 'http://{national_http}/api/v1/national/reports/daily?date={today}&encoding=shift_jis'"
    );
    println!(
        "   国の集計画面（上のトークンでログイン）/ the national figures' web UI (log in with the token above): http://{national_http}/ui/"
    );
    // A prefecture user sees their prefecture, which counts Yokohama's doses, and is refused
    // another prefecture's.
    let kanagawa = format!("/api/v1/national/totals?from={today}&to={today}&by=dose_number");
    let (code, own) = http("GET", national_http, &kanagawa, prefecture_user, None).await?;
    anyhow::ensure!(code == 200, "the prefecture user's own figures: HTTP {code} {own}");
    let tokyo = format!("/api/v1/national/totals?prefecture=13&from={today}&to={today}");
    let (refused, body) = http("GET", national_http, &tokyo, prefecture_user, None).await?;
    anyhow::ensure!(
        refused == 403,
        "a prefecture user read another prefecture's figures: HTTP {refused} {body}"
    );
    println!(
        "   都道府県担当（神奈川県）/ a prefecture user (Kanagawa): {} doses today in {}; 東京都の集計は拒否 / Tokyo's figures refused: {refused} {}",
        own["total"],
        own["scope"]["name"].as_str().unwrap_or("?"),
        body["code"].as_str().unwrap_or("?")
    );
    println!(
        "   curl -H 'Authorization: Bearer {prefecture_user}' 'http://{national_http}/api/v1/national/totals?from={today}&to={today}&by=product,dose_number'"
    );
    Ok(())
}

/// The resident vaccinated in Chiyoda moves there: Yokohama seals the record for Chiyoda, the
/// national node relays it, Chiyoda accepts it with the history and a coupon for the next dose.
async fn relocation(
    national_http: &str,
    admin: &str,
    yokohama: &Member,
    chiyoda: &Member,
    coupon: &str,
) -> anyhow::Result<()> {
    let (yokohama_http, chiyoda_http) =
        (yokohama.http.as_deref().unwrap_or_default(), chiyoda.http.as_deref().unwrap_or_default());
    let number: String = coupon.chars().skip(8).take(10).collect();
    let (_, found) =
        http("GET", yokohama_http, &format!("/api/v1/residents?coupon={number}"), &yokohama.token, None)
            .await?;
    let resident = found["residents"][0]["resident_id"].as_str().context("no resident")?.to_owned();
    let started = Instant::now();
    let body = json!({"to": "131016", "reason": "転出届（千代田区へ）"});
    let path = format!("/api/v1/residents/{resident}/move-out");
    let (code, sealed) = http("POST", yokohama_http, &path, &yokohama.token, Some(body)).await?;
    anyhow::ensure!(code == 201, "move-out answered {code}: {sealed}");
    let handoff = sealed["handoff_id"].as_str().context("no handoff id")?.to_owned();
    println!(
        "== 11. 転出 / relocation: Yokohama seals the resident's record for Chiyoda (X25519 + ChaCha20-Poly1305, signed) → {handoff}"
    );
    let entry = wait_for("Chiyoda to accept the handoff", Duration::from_secs(60), || async {
        let (_, list) = http("GET", chiyoda_http, "/api/v1/handoffs", &chiyoda.token, None).await.ok()?;
        list["incoming"]
            .as_array()?
            .iter()
            .find(|e| e["handoff_id"] == handoff.as_str() && e["state"] == "accepted")
            .cloned()
    })
    .await?;
    let new = entry["resident_id"].as_str().unwrap_or_default();
    let (_, record) =
        http("GET", chiyoda_http, &format!("/api/v1/residents/{new}"), &chiyoda.token, None).await?;
    println!(
        "   千代田区が受入 / accepted at Chiyoda in {:.0} ms: 接種歴 history {} dose(s), 次回 next dose {}, 新しい接種券 new coupon {}",
        started.elapsed().as_secs_f64() * 1000.0,
        record["history"].as_array().map_or(0, Vec::len),
        record["next_dose"],
        entry["coupon"].as_str().unwrap_or("-")
    );
    let (_, old) =
        http("GET", yokohama_http, &format!("/api/v1/residents/{resident}"), &yokohama.token, None).await?;
    println!("   横浜市の記録は閲覧のみ / Yokohama keeps the record read-only: {}", old["transfer"]);
    let (_, ledger) =
        http("GET", national_http, "/api/v1/national/handoffs?municipality=131016", admin, None).await?;
    println!(
        "   国の台帳（仮名の個人キーと市区町村のみ）/ the national ledger (pseudonymous key and codes only): {}",
        ledger["handoffs"][0]
    );
    println!("   curl -H 'Authorization: Bearer {}' http://{chiyoda_http}/api/v1/handoffs", chiyoda.token);
    Ok(())
}

async fn status(member: &Member) -> Option<Value> {
    let address = member.http.as_deref()?;
    http("GET", address, "/api/v1/status", &member.token, None)
        .await
        .ok()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
}

async fn walk_away_from_home(
    yokohama: &Member,
    standby: &Member,
    chiyoda: &Member,
    terminal: &Member,
    coupon: &str,
) -> anyhow::Result<()> {
    wait_for("the terminal's bundle with the directory", Duration::from_secs(60), || async {
        status(terminal).await.filter(|s| s["directory_version"].as_u64() >= Some(4))
    })
    .await?;
    let terminal_http = terminal.http.as_deref().unwrap_or_default();
    let scan = json!({
        "coupon": coupon,
        "vial": "(01)04987000001014(17)301231(10)CHY0001",
        "venue": "chiyoda-kumin-hall",
    });
    let (code, body) = http("POST", terminal_http, "/api/v1/captures", &terminal.token, Some(scan)).await?;
    println!(
        "   {code} 千代田区の端末で横浜市の接種券を読取（署名は名簿の鍵でオフライン検証）/ a Yokohama coupon scanned in Chiyoda, signature checked offline: {}",
        body["state"]["state"]
    );
    let event_id = body["event_id"].as_str().context("no event id")?.to_owned();
    let started = Instant::now();
    let state = wait_for("the owner's answer", Duration::from_secs(60), || async {
        let (_, log) =
            http("GET", terminal_http, "/api/v1/terminal/captures", &terminal.token, None).await.ok()?;
        let entry = log["captures"]
            .as_array()?
            .iter()
            .find(|c| c["capture"]["event_id"] == event_id.as_str())?
            .clone();
        entry["state"]["state"]
            .as_str()
            .is_some_and(|s| s == "recorded" || s == "refused")
            .then_some(entry["state"].clone())
    })
    .await?;
    println!(
        "   → 千代田区ノードが横浜市ノードへ転送し、横浜市が記録 / Chiyoda's node forwarded it, Yokohama recorded it in {:.0} ms: {state}",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let number: String = coupon.chars().skip(8).take(10).collect();
    let (_, found) = http(
        "GET",
        yokohama.http.as_deref().unwrap_or_default(),
        &format!("/api/v1/residents?coupon={number}"),
        &yokohama.token,
        None,
    )
    .await?;
    println!("   横浜市の住民記録 / in Yokohama's record: doses {}", found["residents"][0]["doses"]);
    let primary_doses = status(yokohama).await.map(|s| s["dose_events"].clone()).unwrap_or_default();
    wait_for("the standby to replicate", Duration::from_secs(60), || async {
        status(standby).await.filter(|s| s["dose_events"] == primary_doses)
    })
    .await?;
    println!("   予備系も同じ記録を保持 / the standby holds the same records: dose events {primary_doses}");
    let outbox = status(chiyoda).await.map(|s| s["forward_outbox"].clone()).unwrap_or_default();
    println!(
        "   千代田区ノードの転送待ち / waiting in Chiyoda's outbox: {outbox}（横浜市の住民の個人情報は残りません / nothing of the Yokohama resident stays）"
    );
    Ok(())
}
