//! `vrs-node demo`: a Yokohama node with a generated population, walked through the whole
//! job — import, issuance, print-shop export, captures through the HTTP API (including the
//! refusals), a correction — and then left serving so a newcomer can try the API.
//!
//! Also the synthetic resident register extract used by the demo, the tests and the
//! benchmarks (`vrs-node generate`): a fixed seed gives the same file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use protocol::checkdigit::my_number_check_digit;
use time::{Date, Duration};
use tower::ServiceExt;

use crate::config::{InitOptions, NodeFiles, Role, init_data_dir};
use crate::import::{Encoding, ImportOutcome, import_file};
use crate::store::Store;

const SURNAMES: &[(&str, &str)] = &[
    ("佐藤", "サトウ"),
    ("鈴木", "スズキ"),
    ("高橋", "タカハシ"),
    ("田中", "タナカ"),
    ("伊藤", "イトウ"),
    ("渡辺", "ワタナベ"),
    ("山本", "ヤマモト"),
    ("中村", "ナカムラ"),
    ("小林", "コバヤシ"),
    ("加藤", "カトウ"),
    ("吉田", "ヨシダ"),
    ("山田", "ヤマダ"),
    ("佐々木", "ササキ"),
    ("山口", "ヤマグチ"),
    ("松本", "マツモト"),
    ("井上", "イノウエ"),
    ("木村", "キムラ"),
    ("林", "ハヤシ"),
    ("斎藤", "サイトウ"),
    ("清水", "シミズ"),
    ("齋藤", "サイトウ"),
    ("髙橋", "タカハシ"),
    ("渡邊", "ワタナベ"),
    ("長谷川", "ハセガワ"),
];
const MALE_NAMES: &[(&str, &str)] = &[
    ("翔", "ショウ"),
    ("大輔", "ダイスケ"),
    ("健太", "ケンタ"),
    ("蓮", "レン"),
    ("悠真", "ユウマ"),
    ("誠", "マコト"),
    ("浩", "ヒロシ"),
    ("清", "キヨシ"),
    ("茂", "シゲル"),
    ("陽翔", "ハルト"),
];
const FEMALE_NAMES: &[(&str, &str)] = &[
    ("陽子", "ヨウコ"),
    ("恵子", "ケイコ"),
    ("美咲", "ミサキ"),
    ("結衣", "ユイ"),
    ("さくら", "サクラ"),
    ("花子", "ハナコ"),
    ("幸子", "サチコ"),
    ("葵", "アオイ"),
    ("陽菜", "ヒナ"),
    ("和子", "カズコ"),
];
const WARDS: &[&str] = &[
    "鶴見区",
    "神奈川区",
    "西区",
    "中区",
    "南区",
    "港南区",
    "保土ケ谷区",
    "旭区",
    "磯子区",
    "金沢区",
    "港北区",
    "緑区",
    "青葉区",
    "都筑区",
    "戸塚区",
    "栄区",
    "泉区",
    "瀬谷区",
];

/// A small deterministic generator (SplitMix64): the same seed gives the same population
/// (and the same benchmark data).
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One generated row.
#[derive(Debug, Clone)]
pub struct GeneratedResident {
    /// 宛名番号
    pub atena_number: String,
    /// 氏名
    pub name: String,
    /// 氏名カナ
    pub name_kana: String,
    /// 生年月日
    pub birth_date: Date,
    /// 性別 (男/女)
    pub sex: &'static str,
    /// 住所
    pub address: String,
    /// 個人番号
    pub my_number: String,
}

/// The `i`-th resident of a seeded population (ages 0–99, about even by age).
pub fn generated_resident(seed: u64, i: u64) -> GeneratedResident {
    let mut rng = SplitMix(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let (surname, surname_kana) = *rng.pick(SURNAMES);
    let female = rng.below(2) == 0;
    let (given, given_kana) = if female { *rng.pick(FEMALE_NAMES) } else { *rng.pick(MALE_NAMES) };
    let reference = Date::from_calendar_date(2026, time::Month::April, 1).unwrap_or(Date::MIN);
    let age_days = rng.below(100 * 365) as i64;
    let birth_date = reference - Duration::days(age_days);
    let mut first11 = [0u8; 11];
    let mut serial = i;
    for digit in first11.iter_mut().rev() {
        *digit = (serial % 10) as u8;
        serial /= 10;
    }
    first11[0] = 1 + (rng.below(9) as u8);
    let my_number: String = first11.iter().map(|d| char::from(b'0' + d)).collect::<String>()
        + &my_number_check_digit(&first11).to_string();
    GeneratedResident {
        atena_number: format!("{:010}", 1_000_000 + i),
        name: format!("{surname}\u{3000}{given}"),
        name_kana: format!("{surname_kana} {given_kana}"),
        birth_date,
        sex: if female { "女" } else { "男" },
        address: format!(
            "神奈川県横浜市{}{}丁目{}番{}号",
            rng.pick(WARDS),
            1 + rng.below(5),
            1 + rng.below(30),
            1 + rng.below(20)
        ),
        my_number,
    }
}

/// Writes `n` generated residents as a register extract. Returns the rows written.
pub fn write_population(path: &Path, n: u64, seed: u64, encoding: Encoding) -> anyhow::Result<u64> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut line = String::new();
    let write = |text: &str, out: &mut std::io::BufWriter<std::fs::File>| -> anyhow::Result<()> {
        match encoding {
            Encoding::ShiftJis => {
                let (bytes, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
                anyhow::ensure!(!unmappable, "{text:?} cannot be written in Shift_JIS");
                out.write_all(&bytes)?;
            }
            _ => out.write_all(text.as_bytes())?,
        }
        Ok(())
    };
    write("宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号\r\n", &mut out)?;
    for i in 0..n {
        let r = generated_resident(seed, i);
        line.clear();
        line.push_str(&format!(
            "{},{},{},{},{},{},{}\r\n",
            r.atena_number, r.name, r.name_kana, r.birth_date, r.sex, r.address, r.my_number
        ));
        write(&line, &mut out)?;
    }
    out.flush()?;
    Ok(n)
}

/// The password of the demo's users (a clerk, a municipal administrator and an auditor).
pub(crate) const DEMO_PASSWORD: &str = "demo-password-2021";

/// Runs the demo.
pub fn run_demo(data: Option<PathBuf>, n_residents: u64, listen: &str, exit: bool) -> anyhow::Result<()> {
    let dir = match data {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("vrs-demo-{}", std::process::id())),
    };
    if crate::config::refuse_existing_node(&dir).is_err() {
        anyhow::bail!(
            "{0} には前回のデモのノードがあります。消すか別の --data を指定してください / {0} already holds a node from an earlier demo; remove it or pass another --data",
            dir.display()
        );
    }
    let municipality =
        protocol::municipality::MunicipalityCode::parse("141003").map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("== 1. ノード作成 / create the node (横浜市 141003) in {}", dir.display());
    let campaign_start = Date::from_calendar_date(2021, time::Month::February, 17)?;
    let options = InitOptions {
        role: Role::Municipal,
        municipality,
        listen: listen.to_owned(),
        campaign_start,
        person_key_secret: None,
        // A local demo: plain HTTP, which the node allows only on a loopback address.
        plain_http: crate::config::is_loopback_listen(listen),
        tls: None,
        tls_names: Vec::new(),
        p2p_listen: None,
        keys_from: None,
        terminal: None,
    };
    let token = init_data_dir(&dir, &options)?;
    let files = NodeFiles::load(&dir)?;
    let store = Store::open(&files.store_path())?;

    println!("== 2. 住民記録の取込 / import {n_residents} residents (Shift_JIS CSV, seed 42)");
    let csv_path = dir.join("demo-residents-sjis.csv");
    write_population(&csv_path, n_residents, 42, Encoding::ShiftJis)?;
    files.audit_cli(&store, "residents.import", "file:demo-residents-sjis.csv", "started")?;
    match import_file(&files, &store, &csv_path, Encoding::Auto, None)? {
        ImportOutcome::Applied(report) => println!(
            "   created {}, updated {}, unchanged {}",
            report.created, report.updated, report.unchanged
        ),
        ImportOutcome::Refused(errors) => anyhow::bail!("demo file refused: {}", errors[0]),
    }

    println!("== 3. ロット登録 / register lots");
    let today = crate::clock::japan_today();
    let lots = [
        ("FA5765", "04987000001014", today + Duration::days(180)),
        ("SPX0421", "04987000002011", today + Duration::days(120)),
        ("EXP0001", "04987000001014", today - Duration::days(10)),
    ];
    let lots = lots
        .into_iter()
        .map(|(lot, gtin, expiry)| {
            crate::api::validate_lot(&files.catalogue, lot, gtin, &expiry.to_string())
                .map_err(|p| anyhow::anyhow!("{}", p.message_en))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    store.put_lots(&lots)?;
    for lot in &lots {
        files.audit_cli(&store, "lot.put", &format!("lot:{}", lot.lot), "ok")?;
    }
    for lot in &lots {
        println!("   {} {} expiry {}", lot.lot, lot.gtin, lot.expiry);
    }

    println!("== 4. 接種券発行と印刷用出力 / issue coupons and export the print-shop file");
    let report = crate::issuance::issue_all(&files, &store, today, None)?;
    files.audit_cli(&store, "coupons.issue", "residents:all", &format!("ok:issued={}", report.issued))?;
    println!("   issued {}, not eligible {}", report.issued, report.not_eligible);
    let print_dir = dir.join("print-shop");
    let export = crate::issuance::export_print_shop(&files, &store, &print_dir, true)?;
    files.audit_cli(&store, "coupons.export", "residents:all", &format!("ok:coupons={}", export.coupons))?;
    println!(
        "   {} ({} coupons, {} QR PNGs)",
        print_dir.join("coupons.csv").display(),
        export.coupons,
        export.qr_images
    );
    let coupons = read_print_shop(&print_dir.join("coupons.csv"))?;

    let plain = files.config.http.plain_http;
    let tls = if plain {
        None
    } else {
        let http = &files.config.http;
        Some(crate::tls::load_server_config(&files.path_of(&http.tls_cert), &files.path_of(&http.tls_key))?)
    };
    let cacert =
        if plain { String::new() } else { format!("--cacert {} ", dir.join("keys/tls-cert.pem").display()) };
    let scheme = if plain { "http" } else { "https" };
    let mut started = crate::daemon::start(files, store)?;
    started.tls = tls;
    let app = crate::api::router(started.state.clone(), started.max_body_bytes);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(venues_scenario(&app, &token))?;
    runtime.block_on(scenario(&app, &token, &coupons))?;
    runtime.block_on(security_scenario(&app, &token, &coupons))?;
    // The demo node stops here and comes back as a process of the federation.
    drop(app);
    drop(started.state);
    started.writer_thread.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
    if !plain {
        println!(
            "(連携のデモはループバックの平文HTTPでのみ動きます / the federation part runs on a loopback address only)"
        );
        return Ok(());
    }
    // An adult's coupon the scenario left unused, for a vaccination away from home.
    let rows = read_print_rows(&print_dir.join("coupons.csv"))?;
    let away = rows.iter().skip(6).find(|(_, _, birth)| birth.as_str() < "2008").map(|(_, qr, _)| qr.clone());
    let away_qr = away.clone();
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let root = dir.with_file_name(format!("{name}-federation"));
    let federation = match away {
        Some(coupon) => crate::demo_federation::run(&root, &dir, listen, &token, &coupon)?,
        None => anyhow::bail!("the demo population has no adult coupon left"),
    };
    println!();
    println!("API: {scheme}://{listen}   トークン / token: {token}");
    println!(
        "画面 / web UI: {scheme}://{listen}/ui/   職員 / clerk: tanaka, 管理者 / administrator: kanri, 監査 / auditor: kansa (password {DEMO_PASSWORD})"
    );
    // Another adult's coupon left unused (a child's would be refused for age).
    let adult = |(_, _, birth): &&(String, String, String)| birth.as_str() < "2008";
    let spare = rows.iter().rev().find(adult).filter(|(_, qr, _)| Some(qr) != away_qr.as_ref());
    if let Some(spare) = spare {
        println!("試してみる / try it:");
        println!(
            "  curl -s {cacert}-H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n    -d '{{\"coupon\":\"{}\",\"vial\":\"(01)04987000001014(17)301231(10)FA5765\",\"venue\":\"yokohama-arena\"}}' {scheme}://{listen}/api/v1/captures",
            spare.1
        );
        println!(
            "  curl -s {cacert}-H 'Authorization: Bearer {token}' '{scheme}://{listen}/api/v1/residents?coupon={}'",
            &spare.0[8..18]
        );
    }
    if exit {
        drop(federation);
        return Ok(());
    }
    println!("停止は Ctrl-C / stop with Ctrl-C");
    runtime.block_on(crate::daemon::shutdown_signal());
    drop(federation);
    Ok(())
}

/// (18-digit code, QR text) of every coupon in a print-shop file.
fn read_print_shop(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    Ok(read_print_rows(path)?.into_iter().map(|(code, qr, _)| (code, qr)).collect())
}

/// (18-digit code, QR text, birth date) of every coupon in a print-shop file.
fn read_print_rows(path: &Path) -> anyhow::Result<Vec<(String, String, String)>> {
    let text = std::fs::read_to_string(path)?;
    let mut reader = csv::Reader::from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record?;
        let field = |i: usize| record.get(i).unwrap_or("").to_owned();
        out.push((field(0), field(8), field(6)));
    }
    Ok(out)
}

async fn call(
    app: &axum::Router,
    token: &str,
    method: &str,
    uri: &str,
    body: serde_json::Value,
) -> anyhow::Result<(StatusCode, serde_json::Value)> {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(if method == "GET" { Body::empty() } else { Body::from(body.to_string()) })?;
    let response = app.clone().oneshot(request).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

fn show(label: &str, status: StatusCode, body: &serde_json::Value) {
    let mark = if status.is_success() { "✔" } else { "✘" };
    let detail = body
        .get("title")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .or_else(|| {
            body.get("event")
                .map(|e| format!("dose {} on {} ({})", e["dose_number"], e["vaccinated_on"], e["event_id"]))
        })
        .unwrap_or_default();
    println!("   {mark} {status} {label}: {detail}");
}

/// The two venues the demo's captures name, published for the public listing, and doses
/// allocated to and delivered at them, so that the stock page has something to show.
async fn venues_scenario(app: &axum::Router, token: &str) -> anyhow::Result<()> {
    println!("== 5. 会場と在庫 / venues and stock");
    let venues = [
        (
            "yokohama-arena",
            "横浜アリーナ（集団接種会場）",
            "横浜市港北区新横浜3-10",
            ["mon", "wed", "fri", "sat"],
        ),
        ("shin-yokohama-hall", "新横浜公会堂", "横浜市港北区新横浜2-100", ["tue", "thu", "sat", "sun"]),
    ];
    for (id, name, address, days) in venues {
        let body = serde_json::json!({
            "name": name, "address": address, "products": ["comirnaty-30"], "opening_days": days,
            "note": "予約制 / by appointment",
        });
        let (status, body) = call(app, token, "POST", &format!("/api/v1/venues/{id}"), body).await?;
        anyhow::ensure!(status.is_success(), "venue {id}: {body}");
        println!("   {status} {id} {name}");
    }
    for (kind, venue, doses) in [
        ("allocation", "yokohama-arena", 1170),
        ("delivery", "yokohama-arena", 780),
        ("allocation", "shin-yokohama-hall", 390),
        ("delivery", "shin-yokohama-hall", 390),
    ] {
        let body =
            serde_json::json!({"kind": kind, "venue": venue, "product": "comirnaty-30", "doses": doses});
        let (status, body) = call(app, token, "POST", "/api/v1/stock/entries", body).await?;
        anyhow::ensure!(status.is_success(), "stock {kind} {venue}: {body}");
        println!("   {status} {kind} {venue} comirnaty-30 {doses}");
    }
    Ok(())
}

async fn scenario(app: &axum::Router, token: &str, coupons: &[(String, String)]) -> anyhow::Result<()> {
    anyhow::ensure!(coupons.len() >= 6, "the demo needs at least 6 coupons");
    println!("== 6. 接種の記録 / captures through the HTTP API (what the scanners type)");
    // The raw form a 2D scanner types: symbology id, (01) and (17) fixed length, (10) last.
    let vial = "]d201049870000010141730123110FA5765".to_owned();
    let capture = |coupon: &str, vial: &str, date: Option<String>| {
        let mut body = serde_json::json!({ "coupon": coupon, "vial": vial, "venue": "yokohama-arena" });
        if let Some(date) = date {
            body["vaccinated_on"] = serde_json::Value::String(date);
        }
        body
    };
    let (a, b, c) = (&coupons[0].1, &coupons[1].1, &coupons[2].1);
    let (status, first) = call(app, token, "POST", "/api/v1/captures", capture(a, &vial, None)).await?;
    show("接種券A（GS1 raw）", status, &first);
    let (status, body) = call(
        app,
        token,
        "POST",
        "/api/v1/captures",
        capture(a, "(01)04987000001014(17)301231(10)FA5765", None),
    )
    .await?;
    show("同じ読み取りの再送 / same scan again (replay)", status, &body);
    let mut forged = a.clone();
    let last = forged.pop().map(|d| if d == '0' { '1' } else { '0' }).unwrap_or('0');
    forged.push(last);
    let (status, body) = call(app, token, "POST", "/api/v1/captures", capture(&forged, &vial, None)).await?;
    show("署名の改ざん / forged signature", status, &body);
    let (status, body) = call(
        app,
        token,
        "POST",
        "/api/v1/captures",
        capture(b, "(01)04987000001014(17)301231(10)EXP0001", None),
    )
    .await?;
    show("期限切れロット / expired lot", status, &body);
    let tomorrow = (crate::clock::japan_today() + Duration::days(1)).to_string();
    let (status, body) =
        call(app, token, "POST", "/api/v1/captures", capture(b, &vial, Some(tomorrow))).await?;
    show("未来の日付 / date in the future", status, &body);
    let (status, body) = call(
        app,
        token,
        "POST",
        "/api/v1/captures",
        capture(b, "(01)04987000002011(17)301231(10)FA5765", None),
    )
    .await?;
    show("他製品のロット / lot of another product", status, &body);
    let (status, second) = call(app, token, "POST", "/api/v1/captures", capture(c, &vial, None)).await?;
    show("接種券C", status, &second);

    println!("== 7. 訂正 / corrections with a reason");
    let resident = first["resident_id"].as_str().unwrap_or_default().to_owned();
    let event = first["event"]["event_id"].as_str().unwrap_or_default().to_owned();
    let yesterday = (crate::clock::japan_today() - Duration::days(1)).to_string();
    let uri = format!("/api/v1/residents/{resident}/doses/{event}/amend");
    let (status, body) = call(
        app,
        token,
        "POST",
        &uri,
        serde_json::json!({"reason": "接種日の入力誤り", "vaccinated_on": yesterday}),
    )
    .await?;
    println!("   {} {status} amend: {}", if status.is_success() { "✔" } else { "✘" }, body["after"]);
    let c_resident = second["resident_id"].as_str().unwrap_or_default().to_owned();
    let c_event = second["event"]["event_id"].as_str().unwrap_or_default().to_owned();
    let uri = format!("/api/v1/residents/{c_resident}/doses/{c_event}/void");
    let (status, body) =
        call(app, token, "POST", &uri, serde_json::json!({"reason": "別人の接種券で記録したため"})).await?;
    println!("   {} {status} void: {}", if status.is_success() { "✔" } else { "✘" }, body["reason"]);

    println!("== 8. 住民の照会 / look the resident up");
    let (status, body) =
        call(app, token, "GET", &format!("/api/v1/residents/{resident}"), serde_json::Value::Null).await?;
    println!(
        "   {status} {} {} — 接種歴 history: {} dose(s), corrections: {}",
        body["identity"]["name"].as_str().unwrap_or(""),
        body["identity"]["name_kana"].as_str().unwrap_or(""),
        body["history"].as_array().map(Vec::len).unwrap_or(0),
        body["corrections"].as_object().map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}

async fn security_scenario(
    app: &axum::Router,
    admin: &str,
    coupons: &[(String, String)],
) -> anyhow::Result<()> {
    println!("== 9. 利用者・権限・監査ログ / users, roles and the audit log");
    let password = DEMO_PASSWORD;
    for (name, role) in [("tanaka", "clerk"), ("kanri", "municipal_admin"), ("kansa", "auditor")] {
        let body = serde_json::json!({"username": name, "role": role, "password": password});
        let (status, _) = call(app, admin, "POST", "/api/v1/users", body).await?;
        println!("   {status} 利用者追加 / user added: {name} ({role}), password {password}");
    }
    let body =
        serde_json::json!({"name": "arena-tablet-1", "role": "venue_operator", "venues": ["yokohama-arena"]});
    let (_, issued) = call(app, admin, "POST", "/api/v1/tokens", body).await?;
    let tablet = issued["token"].as_str().unwrap_or_default().to_owned();
    println!("   会場端末トークン / venue terminal token (yokohama-arena only): {tablet}");
    let login = serde_json::json!({"username": "tanaka", "password": password});
    let (status, session) = call(app, "-", "POST", "/api/v1/auth/login", login).await?;
    let clerk = session["token"].as_str().unwrap_or_default().to_owned();
    println!("   {status} ログイン / login tanaka: session until {}", session["expires_at"]);
    let (status, body) = call(
        app,
        &clerk,
        "POST",
        "/api/v1/users",
        serde_json::json!({"username": "x", "role": "clerk", "password": password}),
    )
    .await?;
    show("職員による利用者追加 / a clerk adding a user", status, &body);
    if let Some(coupon) = coupons.get(4) {
        let capture = serde_json::json!({
            "coupon": coupon.1, "vial": "(01)04987000001014(17)301231(10)FA5765", "venue": "shin-yokohama-hall"
        });
        let (status, body) = call(app, &tablet, "POST", "/api/v1/captures", capture).await?;
        show("担当外の会場で記録 / a terminal recording for another venue", status, &body);
    }
    let (status, body) =
        call(app, "vrs_t_not-a-token", "GET", "/api/v1/residents?kana=ヤ", serde_json::Value::Null).await?;
    show("無効なトークン / an unknown token", status, &body);
    let login = serde_json::json!({"username": "kansa", "password": password});
    let (_, session) = call(app, "-", "POST", "/api/v1/auth/login", login).await?;
    let auditor = session["token"].as_str().unwrap_or_default().to_owned();
    let (status, verdict) =
        call(app, &auditor, "GET", "/api/v1/audit/verify", serde_json::Value::Null).await?;
    println!(
        "   {status} 監査ログ検証 / audit log verified by kansa: intact {}, {} entries, {} signed checkpoints",
        verdict["intact"], verdict["entries"], verdict["checkpoints"]
    );
    let (_, entries) =
        call(app, &auditor, "GET", "/api/v1/audit?limit=5000", serde_json::Value::Null).await?;
    if let Some(entries) = entries["entries"].as_array() {
        for entry in entries
            .iter()
            .rev()
            .filter(|e| e["outcome"].as_str().is_some_and(|o| o.starts_with("denied")))
            .take(3)
        {
            println!(
                "     #{} {} {} {} {} → {}",
                entry["seq"],
                entry["at"].as_str().unwrap_or(""),
                entry["actor"].as_str().unwrap_or(""),
                entry["action"].as_str().unwrap_or(""),
                entry["subject"].as_str().unwrap_or(""),
                entry["outcome"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
