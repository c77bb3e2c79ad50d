//! The node crate's integration tests: the route table, the router's guards and limits, QR
//! rendering, and the import decoder under arbitrary input.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use node::api::{ROUTES, method_of, openapi_document, router};
use node::config::{InitOptions, NodeFiles, Role, init_data_dir};

mod asks;
mod audit;
mod feed;
mod isolation;
mod ledger;
mod national;
mod peer_limits;
mod preload;
use node::import::{Encoding, ImportOutcome, import_file};
use node::store::Store;
use protocol::municipality::MunicipalityCode;
use tower::ServiceExt;

struct Fixture {
    dir: PathBuf,
    token: String,
}

impl Fixture {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vrs-node-test-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = InitOptions::loopback(
            Role::Municipal,
            MunicipalityCode::parse("141003").unwrap(),
            "127.0.0.1:0",
            time::macros::date!(2021 - 02 - 17),
        );
        let token = init_data_dir(&dir, &options).unwrap();
        Self { dir, token }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| match s {
            "{file}" => "app.js",
            s if s.starts_with('{') => "0000000017",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn every_route_is_documented_in_openapi_and_docs() {
    let openapi = openapi_document();
    let api_md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    for spec in ROUTES {
        let method = spec.method.to_ascii_lowercase();
        assert!(
            openapi["paths"][spec.path][&method].is_object(),
            "{} {} missing from OpenAPI",
            spec.method,
            spec.path
        );
        let row = format!("| {} | `{}` |", spec.method, spec.path);
        assert!(api_md.contains(&row), "docs/api.md has no row {row}");
    }
}

#[tokio::test]
async fn every_protected_route_refuses_without_a_valid_token_and_public_ones_answer() {
    let fixture = Fixture::new("routes");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let started = node::daemon::start(files, store).unwrap();
    let app = router(started.state.clone(), started.max_body_bytes);
    for spec in ROUTES {
        for token in [None, Some("vrs_not-the-token")] {
            let mut request = Request::builder()
                .method(method_of(spec))
                .uri(concrete(spec.path))
                .header("content-type", "application/json");
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let response = app.clone().oneshot(request.body(Body::from("{}")).unwrap()).await.unwrap();
            let status = response.status();
            for header in
                ["x-content-type-options", "x-frame-options", "content-security-policy", "x-request-id"]
            {
                assert!(
                    response.headers().contains_key(header),
                    "{} {}: no {header}",
                    spec.method,
                    spec.path
                );
            }
            if spec.is_public() {
                assert!(
                    status.is_success() || status.is_redirection() || status == StatusCode::BAD_REQUEST,
                    "{} {}: {status}",
                    spec.method,
                    spec.path
                );
            } else {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{} {} with {token:?}", spec.method, spec.path);
                assert_eq!(response.headers()["content-type"], "application/problem+json");
            }
        }
    }
}

#[tokio::test]
async fn a_body_one_byte_over_the_limit_is_refused() {
    let fixture = Fixture::new("limit");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let limit = files.config.http.max_body_bytes;
    let token = fixture.token.clone();
    let store = Store::open(&files.store_path()).unwrap();
    let started = node::daemon::start(files, store).unwrap();
    let app = router(started.state.clone(), started.max_body_bytes);
    for (size, refused) in [(limit, false), (limit + 1, true)] {
        // A JSON string padded to exactly `size` bytes.
        let body = format!("{{\"coupon\":\"{}\"}}", "1".repeat(size - 13));
        assert_eq!(body.len(), size);
        let request = Request::post("/api/v1/captures")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        assert_eq!(status == StatusCode::PAYLOAD_TOO_LARGE, refused, "size {size}: {status}");
    }
}

#[test]
fn a_rendered_coupon_qr_decodes_back_to_its_text_at_version_5() {
    let fixture = Fixture::new("qr");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let code = protocol::coupon::CouponCode::parse("111410030000000013").unwrap();
    let text = protocol::coupon::SignedCoupon::sign(code, 3, &files.signing_key).to_qr_text();
    let png = node::issuance::qr_png(&node::issuance::coupon_qr(&text).unwrap(), 4).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let (width, height) = (info.width as usize, info.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1);
    let (meta, decoded) = grids[0].decode().unwrap();
    assert_eq!(decoded, text);
    assert_eq!(meta.version.0, 5);
    let signed = match protocol::coupon::parse_scanned_coupon(&decoded).unwrap() {
        protocol::coupon::ScannedCoupon::Signed(signed) => signed,
        other => panic!("expected a signed coupon, got {other:?}"),
    };
    signed.verify(&files.signing_public_key()).unwrap();
}

/// A clerk prints a coupon at the desk: the image the node serves decodes to a coupon signed
/// with the municipality's key for the valid generation; once the coupon is used there is
/// nothing to print (409), an unknown number is 404, and each image served is audited.
#[tokio::test]
async fn the_desk_prints_the_valid_coupon_and_nothing_else() {
    let fixture = Fixture::new("print");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let csv = fixture.dir.join("residents.csv");
    node::demo::write_population(&csv, 20, 7, Encoding::Utf8).unwrap();
    assert!(matches!(
        import_file(&files, &store, &csv, Encoding::Auto, None).unwrap(),
        ImportOutcome::Applied(_)
    ));
    node::issuance::issue_all(&files, &store, node::clock::japan_today(), None).unwrap();
    let lot = node::api::validate_lot(&files.catalogue, "PRN-1", "04987000001014", "2031-12-31").unwrap();
    store.put_lots(&[lot]).unwrap();
    let public_key = files.signing_public_key();
    let started = node::daemon::start(NodeFiles::load(&fixture.dir).unwrap(), store).unwrap();
    let app = router(started.state.clone(), started.max_body_bytes);
    let call = |method: &str, uri: String, body: Option<serde_json::Value>| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {}", fixture.token))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            (status, kind, axum::body::to_bytes(response.into_body(), 1 << 22).await.unwrap())
        }
    };
    // An adult's valid coupon (old enough for every product).
    let view = started.state.store.read().unwrap();
    let (number, code, generation) = view
        .resident_ids(None, 100)
        .unwrap()
        .into_iter()
        .filter_map(|id| view.record(&id).unwrap())
        .filter(|r| r.identity.birth_date < node::clock::japan_today() - time::Duration::days(365 * 20))
        .find_map(|r| {
            r.coupons
                .values()
                .find(|c| c.status == protocol::document::CouponStatus::Valid)
                .map(|c| (c.code.number.as_str().to_owned(), c.code, c.generation))
        })
        .expect("an adult with a valid coupon");
    drop(view);

    // A page showing another generation than the valid one gets no image.
    let (status, _, _) =
        call("GET", format!("/api/v1/coupons/{number}/qr?generation={}", generation + 1), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, kind, png) =
        call("GET", format!("/api/v1/coupons/{number}/qr?generation={generation}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kind.as_deref(), Some("image/png"));
    let mut reader = png::Decoder::new(std::io::Cursor::new(png.to_vec())).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let (width, height) = (info.width as usize, info.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let (_, text) = image.detect_grids()[0].decode().unwrap();
    let signed = match protocol::coupon::parse_scanned_coupon(&text).unwrap() {
        protocol::coupon::ScannedCoupon::Signed(signed) => signed,
        other => panic!("expected a signed coupon, got {other:?}"),
    };
    signed.verify(&public_key).unwrap();
    assert_eq!((signed.code, signed.generation), (code, generation));

    // The printed text is a coupon the node accepts; then it is used, and not printable.
    let body =
        serde_json::json!({"coupon": text, "vial": "(01)04987000001014(17)311231(10)PRN-1", "venue": "desk"});
    let (status, _, answer) = call("POST", "/api/v1/captures".into(), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&answer));
    let (status, kind, answer) = call("GET", format!("/api/v1/coupons/{number}/qr"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(kind.as_deref(), Some("application/problem+json"));
    assert!(String::from_utf8_lossy(&answer).contains("coupon_not_valid"));
    let unknown = (0..10)
        .map(|d| format!("999999999{d}"))
        .find(|n| protocol::coupon::CouponNumber::parse(n).is_ok())
        .unwrap();
    let (status, _, _) = call("GET", format!("/api/v1/coupons/{unknown}/qr"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An auditor reads what was printed, and what was refused.
    let user = serde_json::json!({"username": "kansa", "role": "auditor", "password": "audit-password-2026"});
    assert_eq!(call("POST", "/api/v1/users".into(), Some(user)).await.0, StatusCode::CREATED);
    let login = Request::builder()
        .method("POST")
        .uri("/api/v1/auth/login")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"username":"kansa","password":"audit-password-2026"}"#))
        .unwrap();
    let response = app.clone().oneshot(login).await.unwrap();
    let session: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
    let read = Request::builder()
        .uri("/api/v1/audit?limit=5000")
        .header("authorization", format!("Bearer {}", session["token"].as_str().unwrap()))
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(read).await.unwrap();
    let audit: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap()).unwrap();
    let printed: Vec<String> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "coupon.qr")
        .map(|e| format!("{} {}", e["subject"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(printed.len(), 4, "{printed:?}");
    assert_eq!(printed[0], format!("coupon:{number} refused:coupon_not_valid"));
    assert!(printed[1].starts_with("resident:141003-") && printed[1].ends_with(" ok"), "{printed:?}");
    assert_eq!(printed[2], format!("coupon:{number} refused:coupon_not_valid"));
    assert_eq!(printed[3], format!("coupon:{unknown} refused:not_found"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
    /// The import decoder never panics and never writes on a file with a bad row.
    #[test]
    fn import_never_panics_and_refuses_whole_files(rows in proptest::collection::vec(proptest::collection::vec(".{0,12}", 0..9), 1..6)) {
        let fixture = Fixture::new("fuzz");
        let files = NodeFiles::load(&fixture.dir).unwrap();
        let store = Store::open(&files.store_path()).unwrap();
        let mut text = String::from("宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号\n");
        for row in &rows {
            let fields: Vec<String> = row.iter().map(|f| format!("\"{}\"", f.replace('"', "\"\""))).collect();
            text.push_str(&fields.join(","));
            text.push('\n');
        }
        let path = fixture.dir.join("fuzz.csv");
        std::fs::write(&path, &text).unwrap();
        let outcome = import_file(&files, &store, &path, Encoding::Auto, None).unwrap();
        let stored = store.read().unwrap().n_residents().unwrap();
        match outcome {
            ImportOutcome::Refused(errors) => {
                proptest::prop_assert!(!errors.is_empty());
                proptest::prop_assert_eq!(stored, 0);
                for error in errors {
                    proptest::prop_assert!(error.line >= 2 && !error.column.is_empty());
                }
            }
            ImportOutcome::Applied(report) => proptest::prop_assert_eq!(report.created, stored),
        }
    }
}

/// The print-shop export keeps, for every coupon it prints, the digest of the coupon its QR
/// text carries, under the coupon's key: what a capture compares a scanned coupon with.
#[test]
fn the_export_keeps_the_digest_of_every_coupon_it_prints() {
    let fixture = Fixture::new("printed");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let csv = fixture.dir.join("residents.csv");
    node::demo::write_population(&csv, 30, 11, Encoding::Utf8).unwrap();
    import_file(&files, &store, &csv, Encoding::Auto, None).unwrap();
    let issued = node::issuance::issue_all(&files, &store, node::clock::japan_today(), None).unwrap();
    let out = fixture.dir.join("print");
    let report = node::issuance::export_print_shop(&files, &store, &out, false).unwrap();
    assert!(report.coupons > 0 && report.coupons == issued.issued, "{report:?} {issued:?}");
    let text = std::fs::read_to_string(out.join("coupons.csv")).unwrap();
    let mut rows = csv::Reader::from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let view = store.read().unwrap();
    let mut checked = 0u64;
    for row in rows.records() {
        let row = row.unwrap();
        let qr_text = &row[8];
        let Ok(protocol::coupon::ScannedCoupon::Signed(signed)) =
            protocol::coupon::parse_scanned_coupon(qr_text)
        else {
            panic!("not a signed QR text: {qr_text}")
        };
        let key = protocol::document::coupon_key(&signed.code, signed.generation);
        assert_eq!(view.printed(&key).unwrap(), Some(protocol::coupon::printed_digest(&signed)), "{key}");
        checked += 1;
    }
    assert_eq!(checked, report.coupons);
    let kept = view.txn().open_table(node::store::PRINTED).unwrap();
    assert_eq!(redb::ReadableTableMetadata::len(&kept).unwrap(), checked);
}

#[test]
fn a_second_init_or_demo_on_a_node_directory_is_refused_and_changes_nothing() {
    let fixture = Fixture::new("reinit");
    let before: Vec<(PathBuf, Vec<u8>)> = ["node.toml", "keys/coupon-signing.pk8"]
        .iter()
        .map(|name| fixture.dir.join(name))
        .filter(|path| path.exists())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    assert!(!before.is_empty());
    let options = InitOptions::loopback(
        Role::Municipal,
        MunicipalityCode::parse("131016").unwrap(),
        "127.0.0.1:0",
        time::macros::date!(2021 - 02 - 17),
    );
    let error = init_data_dir(&fixture.dir, &options).unwrap_err().to_string();
    assert!(error.contains("すでにノードがあります") && error.contains("already holds a node"), "{error}");
    let error =
        node::demo::run_demo(Some(fixture.dir.clone()), 10, "127.0.0.1:0", true).unwrap_err().to_string();
    assert!(error.contains("前回のデモ") && error.contains("pass another --data"), "{error}");
    for (path, bytes) in before {
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{}", path.display());
    }
}

#[test]
fn the_authorization_table_in_the_docs_is_the_one_in_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md")).unwrap();
    let begin = "<!-- authz-table:begin -->\n";
    let start = doc.find(begin).expect("docs/security.md has no authz-table:begin marker") + begin.len();
    let end = doc.find("<!-- authz-table:end -->").expect("no authz-table:end marker");
    assert_eq!(
        &doc[start..end],
        node::api::authorization_table_markdown(),
        "docs/security.md differs from the code: regenerate it with `vrs-node authz-table`"
    );
}

#[tokio::test]
async fn logins_and_public_routes_are_rate_limited_per_address() {
    let fixture = Fixture::new("rate");
    let config = std::fs::read_to_string(fixture.dir.join("node.toml")).unwrap();
    let config = config
        .replace("login_per_minute = 20", "login_per_minute = 3")
        .replace("public_per_minute = 600", "public_per_minute = 5");
    std::fs::write(fixture.dir.join("node.toml"), config).unwrap();
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let started = node::daemon::start(files, store).unwrap();
    let app = router(started.state.clone(), started.max_body_bytes);
    let login = || {
        Request::post("/api/v1/auth/login")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"username":"nobody","password":"not the password"}"#))
            .unwrap()
    };
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(app.clone().oneshot(login()).await.unwrap().status().as_u16());
    }
    // Five public requests a minute: the four logins used four.
    let health = app.clone().oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
    statuses.push(health.status().as_u16());
    let limited = app.clone().oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(statuses, [401, 401, 401, 429, 200], "three logins a minute, then 429");
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=61).contains(&wait), "Retry-After {wait}");
}

/// A resident who arrived by a handoff accepted without an atena number holds a provisional
/// one. The register extract's row for them (by 個人番号) gives them their 宛名番号 — unless
/// the same file also has a row under the provisional number, which would make one resident
/// two rows: then the file is refused and nothing changes.
#[test]
fn an_extract_replaces_a_provisional_atena_number_once() {
    use node::store::{IDX_ATENA, Mutation, new_cache};
    use protocol::document::{
        Arrival, Identity, ResidentRecord, ResidentStatus, SCHEMA_VERSION, Sex, Transfer,
    };

    let fixture = Fixture::new("provisional");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let my_number = "123456789018";
    let handoff_id = "ho-0123456789abcdef0123456789";
    let provisional = node::handoff::provisional_atena(handoff_id);
    let record = ResidentRecord {
        schema: SCHEMA_VERSION,
        resident_id: "141003-0000000001".into(),
        municipality: MunicipalityCode::parse("141003").unwrap(),
        person_key: files.person_secret.person_key(my_number).unwrap(),
        identity: Identity {
            atena_number: provisional.clone(),
            name: "山田　太郎".into(),
            name_kana: "ヤマダ タロウ".into(),
            birth_date: time::macros::date!(1960 - 04 - 01),
            sex: Sex::Male,
            address: "神奈川県横浜市中区山下町1-1".into(),
            status: ResidentStatus::Active,
        },
        coupons: Default::default(),
        doses: Default::default(),
        corrections: Default::default(),
        transfer: None,
        arrival: Some(Arrival {
            from: MunicipalityCode::parse("131016").unwrap(),
            handoff_id: handoff_id.into(),
            carried: Vec::new(),
        }),
        returns: Vec::new(),
    };
    // Someone else who moved away from here: their 宛名番号 is not free for 山田.
    let mut left = record.clone();
    left.resident_id = "141003-0000000002".into();
    left.person_key = files.person_secret.person_key("987654321000").unwrap();
    left.identity.atena_number = "0000000800".into();
    left.identity.status = ResidentStatus::MovedOut;
    left.arrival = None;
    left.transfer = Some(Transfer {
        to: MunicipalityCode::parse("011002").unwrap(),
        handoff_id: "ho-left".into(),
        at: time::OffsetDateTime::now_utc(),
        actor: "token:initial-admin".into(),
    });
    let actor = automerge::ActorId::from(files.actor.clone());
    let txn = store.begin_write().unwrap();
    let mut cache = new_cache(1);
    let mut m = Mutation::new(&txn, &mut cache, &actor);
    m.create_resident(&record, time::OffsetDateTime::now_utc()).unwrap();
    m.create_resident(&left, time::OffsetDateTime::now_utc()).unwrap();
    drop(m);
    txn.commit().unwrap();

    let header = "宛名番号,氏名,氏名カナ,生年月日,性別,住所,個人番号\n";
    let row =
        format!("0000000900,山田　太郎,ヤマダ タロウ,1960-04-01,男,神奈川県横浜市中区本町1-1,{my_number}\n");
    let twice = fixture.dir.join("twice.csv");
    let by_provisional =
        format!("{provisional},山田　太郎,ヤマダ タロウ,1960-04-01,男,神奈川県横浜市中区山下町1-1,\n");
    std::fs::write(&twice, format!("{header}{by_provisional}{row}")).unwrap();
    match import_file(&files, &store, &twice, Encoding::Auto, None).unwrap() {
        ImportOutcome::Refused(errors) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!((errors[0].line, errors[0].column.as_str()), (3, "個人番号"), "{errors:?}");
            assert!(errors[0].reason_en.contains("resident of line 2"), "{errors:?}");
        }
        ImportOutcome::Applied(report) => panic!("one resident in two rows was applied: {report:?}"),
    }
    let taken = fixture.dir.join("taken.csv");
    std::fs::write(&taken, format!("{header}{}", row.replace("0000000900", "0000000800"))).unwrap();
    match import_file(&files, &store, &taken, Encoding::Auto, None).unwrap() {
        ImportOutcome::Refused(errors) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!((errors[0].line, errors[0].column.as_str()), (2, "宛名番号"), "{errors:?}");
            assert!(errors[0].reason_en.contains("another person's record"), "{errors:?}");
        }
        ImportOutcome::Applied(report) => panic!("another person's 宛名番号 was taken: {report:?}"),
    }
    let view = store.read().unwrap();
    assert_eq!(view.index(IDX_ATENA, &provisional).unwrap().as_deref(), Some("141003-0000000001"));
    assert_eq!(view.index(IDX_ATENA, "0000000800").unwrap().as_deref(), Some("141003-0000000002"));
    assert_eq!(view.index(IDX_ATENA, "0000000900").unwrap(), None);
    drop(view);

    let once = fixture.dir.join("once.csv");
    std::fs::write(&once, format!("{header}{row}")).unwrap();
    let ImportOutcome::Applied(report) = import_file(&files, &store, &once, Encoding::Auto, None).unwrap()
    else {
        panic!("the extract's row was refused");
    };
    assert_eq!((report.created, report.updated, report.reregistered), (0, 1, 1), "{report:?}");
    let view = store.read().unwrap();
    assert_eq!(view.index(IDX_ATENA, "0000000900").unwrap().as_deref(), Some("141003-0000000001"));
    assert_eq!(view.index(IDX_ATENA, &provisional).unwrap(), None);
    let stored = view.record("141003-0000000001").unwrap().unwrap();
    assert_eq!(stored.identity.atena_number, "0000000900");
    assert_eq!(stored.identity.address, "神奈川県横浜市中区本町1-1");
    assert_eq!(view.n_residents().unwrap(), 2);
}

/// A refused row is reported at the line an editor shows it on, whether the file's lines end
/// in LF, CRLF or a mix of both, after blank lines and after a field that spans two lines.
#[test]
fn a_bad_row_is_reported_at_its_line_with_lf_or_crlf() {
    let fixture = Fixture::new("lines");
    let files = NodeFiles::load(&fixture.dir).unwrap();
    let store = Store::open(&files.store_path()).unwrap();
    let rows = [
        "宛名番号,氏名,氏名カナ,生年月日,性別,住所",
        "0001,,ヤマダ,1990-01-01,男,札幌市",
        "",
        "0002,\"二行の{NL}氏名\",ヤマダ,1990-01-01,男,札幌市",
        "",
        "",
        "0003,山田,ヤマダ,1990-02-30,男,札幌市",
    ];
    let endings: [&[&str]; 3] = [&["\n"], &["\r\n"], &["\r\n", "\n", "\n", "\r\n"]];
    for ending in endings {
        let text: String = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let newline = ending[i % ending.len()];
                format!("{}{newline}", row.replace("{NL}", newline))
            })
            .collect();
        let path = fixture.dir.join("lines.csv");
        std::fs::write(&path, text).unwrap();
        let ImportOutcome::Refused(errors) =
            import_file(&files, &store, &path, Encoding::Auto, None).unwrap()
        else {
            panic!("a file with bad rows was applied");
        };
        let lines: Vec<(u64, &str)> = errors.iter().map(|e| (e.line, e.column.as_str())).collect();
        assert_eq!(lines, [(2, "氏名"), (8, "生年月日")], "{ending:?}: {errors:?}");
    }
}
