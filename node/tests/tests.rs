//! The node crate's integration tests: the route table, the router's guards and limits, QR
//! rendering, and the import decoder under arbitrary input.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use node::api::{ROUTES, method_of, openapi_document, router};
use node::config::{InitOptions, NodeFiles, Role, init_data_dir};

mod audit;
mod isolation;
mod ledger;
mod national;
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
    path.split('/').map(|s| if s.starts_with('{') { "0000000017" } else { s }).collect::<Vec<_>>().join("/")
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
                    status.is_success() || status == StatusCode::BAD_REQUEST,
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
