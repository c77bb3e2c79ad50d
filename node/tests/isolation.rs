//! The isolation test: every route of the router, called with every credential that must not
//! reach it — none, another municipality's, a lower role's, an expired, revoked or logged-out
//! one, a disabled user's — is refused (401/403/404), answers without personal data, and
//! changes nothing in the store. A weakened copy of the route table shows that the test
//! notices a single missing check.

use std::collections::BTreeSet;
use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use node::api::{Access, ROUTES, RouteSpec, method_of, router, router_from};
use node::auth::{self, AuthPolicy, Role};
use node::config::{InitOptions, NodeFiles, init_data_dir};
use node::daemon::Started;
use node::import::{Encoding, ImportOutcome, import_file};
use node::store::Store;
use protocol::coupon::SignedCoupon;
use protocol::document::CouponStatus;
use protocol::municipality::MunicipalityCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;

/// A node in a temp directory, started in-process (writer thread, no socket).
struct TestNode {
    dir: PathBuf,
    admin: String,
    started: Started,
    files: NodeFiles,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_node(label: &str, municipality: &str, residents: u64) -> TestNode {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vrs-isolation-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = InitOptions::loopback(
        node::config::Role::Municipal,
        MunicipalityCode::parse(municipality).unwrap(),
        "127.0.0.1:0",
        time::macros::date!(2021 - 02 - 17),
    );
    let admin = init_data_dir(&dir, &options).unwrap();
    // Thousands of refused calls from one (unknown) address in a few seconds.
    let config = std::fs::read_to_string(dir.join("node.toml")).unwrap();
    let config = config.replace("public_per_minute = 600", "public_per_minute = 1000000");
    std::fs::write(dir.join("node.toml"), config).unwrap();
    let files = NodeFiles::load(&dir).unwrap();
    assert_eq!(files.config.auth.public_per_minute, 1_000_000);
    let store = Store::open(&files.store_path()).unwrap();
    if residents > 0 {
        let csv = dir.join("residents.csv");
        node::demo::write_population(&csv, residents, 7, Encoding::Utf8).unwrap();
        assert!(matches!(
            import_file(&files, &store, &csv, Encoding::Auto, None).unwrap(),
            ImportOutcome::Applied(_)
        ));
        node::issuance::issue_all(&files, &store, node::clock::japan_today(), None).unwrap();
        let lot = node::api::validate_lot(&files.catalogue, "ISO-1", "04987000001014", "2031-12-31").unwrap();
        store.put_lots(&[lot]).unwrap();
    }
    let mut started = node::daemon::start(NodeFiles::load(&dir).unwrap(), store).unwrap();
    // As if its p2p service ran: enrolment tokens can be issued.
    started.state.p2p_address =
        Some("/ip4/127.0.0.1/tcp/7400/p2p/12D3KooWAq8h7ecpu1rgmFZwrqbDCmzj1yTHbMZbuk6ddkwnzmk1".into());
    TestNode { dir, admin, started, files }
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &Value,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = if method == "GET" { Body::empty() } else { Body::from(body.to_string()) };
    let response = app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 22).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn ok_json(app: &Router, method: &str, uri: &str, token: &str, body: Value) -> Value {
    let (status, text) = call(app, method, uri, Some(token), &body).await;
    assert!(status.is_success(), "{method} {uri}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

/// A credential and the role it carries (`None`: it must reach nothing).
struct Credential {
    label: &'static str,
    token: Option<String>,
    role: Option<Role>,
}

/// Everything the checker needs: the node under test, the credentials, the concrete path
/// parameters and bodies that would succeed with a permitted credential, and the personal
/// data that must never appear in a refusal.
struct World {
    a: TestNode,
    _b: TestNode,
    credentials: Vec<Credential>,
    resident_id: String,
    event_id: String,
    coupon_number: String,
    coupon_qr: String,
    personal: Vec<String>,
}

/// Old enough for every product of the catalogue on any day (the fixture's ages are fixed
/// birth dates, so a child turns older as the calendar moves).
fn adult(record: &protocol::document::ResidentRecord) -> bool {
    record.identity.birth_date.year() < node::clock::japan_today().year() - 20
}

async fn build_world() -> World {
    let a = make_node("a", "141003", 30);
    let b = make_node("b", "131016", 0);
    let app_a = router(a.started.state.clone(), a.started.max_body_bytes);
    let app_b = router(b.started.state.clone(), b.started.max_body_bytes);
    let password = "correct horse battery";

    // Users of every municipal role on A, and one on B.
    let users = [
        ("clerk1", Role::Clerk, vec![]),
        ("call1", Role::CallCentre, vec![]),
        ("venue1", Role::VenueOperator, vec!["hall-1"]),
        ("audit1", Role::Auditor, vec![]),
        ("admin1", Role::MunicipalAdmin, vec![]),
        ("gone1", Role::Clerk, vec![]),
        ("target", Role::Clerk, vec![]),
        ("bye1", Role::Clerk, vec![]),
    ];
    for (name, role, venues) in &users {
        ok_json(
            &app_a,
            "POST",
            "/api/v1/users",
            &a.admin,
            json!({"username": name, "role": role, "password": password, "venues": venues}),
        )
        .await;
    }
    ok_json(
        &app_b,
        "POST",
        "/api/v1/users",
        &b.admin,
        json!({"username": "clerk1", "role": "clerk", "password": password}),
    )
    .await;
    let mut sessions = std::collections::HashMap::new();
    for (name, _, _) in &users {
        let session = ok_json(
            &app_a,
            "POST",
            "/api/v1/auth/login",
            "-",
            json!({"username": name, "password": password}),
        )
        .await;
        sessions.insert(*name, session["token"].as_str().unwrap().to_owned());
    }
    let b_session = ok_json(
        &app_b,
        "POST",
        "/api/v1/auth/login",
        "-",
        json!({"username": "clerk1", "password": password}),
    )
    .await;
    // A disabled user's session, a logged-out session, a revoked and an expired token, an
    // expired session.
    ok_json(&app_a, "POST", "/api/v1/users/gone1/disable", &a.admin, json!({})).await;
    ok_json(&app_a, "POST", "/api/v1/auth/logout", &sessions["bye1"], json!({})).await;
    let venue_token = ok_json(
        &app_a,
        "POST",
        "/api/v1/tokens",
        &a.admin,
        json!({"name": "tablet-1", "role": "venue_operator", "venues": ["hall-1"]}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked =
        ok_json(&app_a, "POST", "/api/v1/tokens", &a.admin, json!({"name": "old-1", "role": "clerk"})).await
            ["token"]
            .as_str()
            .unwrap()
            .to_owned();
    ok_json(&app_a, "POST", "/api/v1/tokens/old-1/revoke", &a.admin, json!({})).await;
    ok_json(&app_a, "POST", "/api/v1/tokens", &a.admin, json!({"name": "target-token", "role": "clerk"}))
        .await;
    let (expired_token, expired_session) = {
        let store = &a.started.state.store;
        let txn = store.begin_write().unwrap();
        let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
        let municipality = a.files.config.municipality;
        let (token, _) =
            auth::add_token(&txn, municipality, "expired-1", Role::MunicipalAdmin, vec![], Some(past), past)
                .unwrap()
                .unwrap();
        let policy = AuthPolicy { session_seconds: 60, ..AuthPolicy::default() };
        let session = auth::finish_login(&txn, "admin1", true, &policy, past).unwrap().unwrap();
        txn.commit().unwrap();
        (token, session.token)
    };

    // One dose recorded, so event routes have a real target.
    let view = a.started.state.store.read().unwrap();
    let mut chosen = None;
    let mut personal = Vec::new();
    for id in view.resident_ids(None, 100).unwrap() {
        let record = view.record(&id).unwrap().unwrap();
        personal.push(record.identity.name.clone());
        personal.push(record.identity.name_kana.clone());
        personal.push(record.identity.birth_date.to_string());
        personal.push(record.identity.address.clone());
        personal.push(record.identity.atena_number.clone());
        if chosen.is_none()
            && adult(&record)
            && let Some(coupon) = record.coupons.values().find(|c| c.status == CouponStatus::Valid)
        {
            chosen = Some((record.resident_id.clone(), coupon.clone()));
        }
    }
    drop(view);
    let (resident_id, coupon) = chosen.expect("an issued coupon");
    let qr = |generation| SignedCoupon::sign(coupon.code, generation, &a.files.signing_key).to_qr_text();
    let first = ok_json(
        &app_a,
        "POST",
        "/api/v1/captures",
        &a.admin,
        json!({"coupon": qr(coupon.generation), "vial": "(01)04987000001014(17)311231(10)ISO-1", "venue": "hall-1"}),
    )
    .await;
    let event_id = first["event"]["event_id"].as_str().unwrap().to_owned();
    // A second valid coupon for the coupon routes (the first is used).
    let view = a.started.state.store.read().unwrap();
    let mut other = None;
    for id in view.resident_ids(None, 100).unwrap() {
        let record = view.record(&id).unwrap().unwrap();
        if record.resident_id != resident_id
            && adult(&record)
            && let Some(c) = record.coupons.values().find(|c| c.status == CouponStatus::Valid)
        {
            other = Some(c.clone());
            break;
        }
    }
    let other = other.expect("a second coupon");
    let coupon_number = other.code.number.to_string();
    let coupon_qr = SignedCoupon::sign(other.code, other.generation, &a.files.signing_key).to_qr_text();
    personal.retain(|p| p.chars().count() >= 4);

    let mut credentials = vec![
        Credential { label: "none", token: None, role: None },
        Credential { label: "garbage", token: Some("vrs_t_0000".into()), role: None },
        Credential { label: "other municipality's admin", token: Some(b.admin.clone()), role: None },
        Credential {
            label: "other municipality's clerk session",
            token: Some(b_session["token"].as_str().unwrap().into()),
            role: None,
        },
        Credential { label: "expired token", token: Some(expired_token), role: None },
        Credential { label: "expired session", token: Some(expired_session), role: None },
        Credential { label: "revoked token", token: Some(revoked), role: None },
        Credential { label: "logged-out session", token: Some(sessions["bye1"].clone()), role: None },
        Credential { label: "disabled user's session", token: Some(sessions["gone1"].clone()), role: None },
    ];
    for (label, name, role) in [
        ("clerk session", "clerk1", Role::Clerk),
        ("call-centre session", "call1", Role::CallCentre),
        ("venue-operator session", "venue1", Role::VenueOperator),
        ("auditor session", "audit1", Role::Auditor),
        ("admin session", "admin1", Role::MunicipalAdmin),
    ] {
        credentials.push(Credential { label, token: Some(sessions[name].clone()), role: Some(role) });
    }
    credentials.push(Credential {
        label: "venue terminal token",
        token: Some(venue_token),
        role: Some(Role::VenueOperator),
    });
    World { a, _b: b, credentials, resident_id, event_id, coupon_number, coupon_qr, personal }
}

impl World {
    fn uri(&self, spec: &RouteSpec) -> String {
        let path = spec
            .path
            .replace("{resident_id}", &self.resident_id)
            .replace("{event_id}", &self.event_id)
            .replace("{coupon_number}", &self.coupon_number)
            .replace("{username}", "target")
            .replace("{name}", "target-token")
            .replace("{peer_id}", "12D3KooWNoSuchTerminalNoSuchTerminalNoSuchTerm")
            .replace("{venue}", "hall-1");
        match path.as_str() {
            "/api/v1/residents" => format!("{path}?coupon={}", self.coupon_number),
            "/api/v1/audit/export" => format!("{path}?from=2020-01-01&to=2099-12-31"),
            _ => path,
        }
    }

    /// A body that a permitted caller would see succeed.
    fn body(&self, spec: &RouteSpec) -> Value {
        match spec.path {
            "/api/v1/captures" => json!({
                "coupon": self.coupon_qr, "vial": "(01)04987000001014(17)311231(10)ISO-1", "venue": "hall-1"
            }),
            "/api/v1/auth/login" => json!({"username": "clerk1", "password": "correct horse battery"}),
            "/api/v1/users" => {
                json!({"username": "intruder", "role": "municipal_admin", "password": "intruder password"})
            }
            "/api/v1/users/{username}/reset-password" => json!({"password": "a new password 1"}),
            "/api/v1/tokens" => json!({"name": "intruder", "role": "municipal_admin"}),
            "/api/v1/lots" => json!({"lot": "NEW-1", "gtin": "04987000001014", "expiry": "2031-01-01"}),
            "/api/v1/terminals/enrolments" => json!({"venue": "hall-1"}),
            "/api/v1/venues/{venue}" => json!({
                "name": "会場", "address": "横浜市中区", "products": ["comirnaty-30"], "opening_days": ["mon"]
            }),
            p if p.ends_with("/amend") => json!({"reason": "訂正", "vaccinated_on": "2021-06-01"}),
            _ => json!({"reason": "取消の理由", "disabled": true}),
        }
    }

    /// What must not change: every count, the change feed, lots, users, tokens, sessions.
    fn fingerprint(&self) -> String {
        let view = self.a.started.state.store.read().unwrap();
        let sessions = {
            use redb::ReadableTableMetadata;
            view.txn().open_table(auth::SESSIONS).unwrap().len().unwrap()
        };
        let users: Vec<String> = auth::list_users(view.txn())
            .unwrap()
            .iter()
            .map(|u| format!("{}:{:?}:{}:{:?}", u.username, u.role, u.disabled, u.locked_until))
            .collect();
        let tokens: Vec<String> = auth::list_tokens(view.txn())
            .unwrap()
            .iter()
            .map(|t| format!("{}:{}", t.name, t.revoked))
            .collect();
        let records: Vec<String> = view
            .resident_ids(None, 1000)
            .unwrap()
            .iter()
            .map(|id| serde_json::to_string(&view.record(id).unwrap()).unwrap())
            .collect();
        format!(
            "{} {} {} {} {} {} {} {:?} {:?} {:?} {} {}",
            view.count(node::store::VENUES).unwrap(),
            view.count(node::store::TERMINALS).unwrap(),
            view.count(node::store::ENROLMENTS).unwrap(),
            view.n_residents().unwrap(),
            view.n_coupons().unwrap(),
            view.n_dose_events().unwrap(),
            view.meta(node::store::META_CHANGE_SEQ).unwrap(),
            view.lots().unwrap().iter().map(|l| &l.lot).collect::<Vec<_>>(),
            users,
            tokens,
            sessions,
            records.join("\n")
        )
    }
}

/// Calls every route of `app` with every credential the real table ([`ROUTES`]) forbids for
/// it; returns every call that was not refused, leaked personal data, or changed the store.
async fn violations(world: &World, app: &Router) -> Vec<String> {
    let mut found = Vec::new();
    let before = world.fingerprint();
    let mut calls = 0;
    for spec in ROUTES {
        if spec.is_public() {
            continue;
        }
        for credential in &world.credentials {
            let permitted = credential.role.is_some_and(|role| spec.access.allows(role));
            if permitted {
                continue;
            }
            calls += 1;
            let uri = world.uri(spec);
            let (status, body) =
                call(app, method_of(spec).as_str(), &uri, credential.token.as_deref(), &world.body(spec))
                    .await;
            let place = format!("{} {} with {}", spec.method, spec.path, credential.label);
            if ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN, StatusCode::NOT_FOUND].contains(&status) {
                found.push(format!("{place}: answered {status}"));
            }
            if let Some(leak) = world.personal.iter().find(|p| body.contains(p.as_str())) {
                found.push(format!("{place}: the answer contains personal data ({leak})"));
            }
            let after = world.fingerprint();
            if after != before {
                found.push(format!("{place}: the store changed"));
                return found;
            }
        }
    }
    assert!(calls > 200, "the matrix made only {calls} calls");
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_reachable_by_a_credential_the_table_forbids() {
    let world = build_world().await;
    let app = router(world.a.started.state.clone(), world.a.started.max_body_bytes);
    let found = violations(&world, &app).await;
    assert!(found.is_empty(), "isolation violations:\n{}", found.join("\n"));

    // The matrix is meaningful: permitted credentials do get through (no 401/403) on every
    // protected route with the same paths and bodies.
    // Logging out ends the session the later calls use: last.
    let mut specs: Vec<&RouteSpec> = ROUTES.iter().filter(|s| !s.is_public()).collect();
    specs.sort_by_key(|s| s.path == "/api/v1/auth/logout");
    for spec in specs {
        let credential = world
            .credentials
            .iter()
            .find(|c| c.role.is_some_and(|role| spec.access.allows(role)) && c.label.ends_with("session"))
            .unwrap_or_else(|| panic!("no permitted credential for {}", spec.path));
        let (status, body) = call(
            &app,
            method_of(spec).as_str(),
            &world.uri(spec),
            credential.token.as_deref(),
            &world.body(spec),
        )
        .await;
        assert!(
            status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
            "{} {} with {}: {status} {body}",
            spec.method,
            spec.path,
            credential.label
        );
    }
}

fn weakened(path: &str, access: Access) -> &'static [RouteSpec] {
    let routes: Vec<RouteSpec> =
        ROUTES.iter().map(|r| if r.path == path { RouteSpec { access, ..*r } } else { *r }).collect();
    Box::leak(routes.into_boxed_slice())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_isolation_check_notices_a_route_whose_guard_is_removed() {
    let world = build_world().await;
    let state = world.a.started.state.clone();
    let max = world.a.started.max_body_bytes;

    // A resident's record left without any guard.
    let open = router_from(state.clone(), max, weakened("/api/v1/residents/{resident_id}", Access::Public));
    let found = violations(&world, &open).await;
    let routes: BTreeSet<&str> = found.iter().filter_map(|f| f.split(" with ").next()).collect();
    assert_eq!(routes, BTreeSet::from(["GET /api/v1/residents/{resident_id}"]), "{found:#?}");
    assert!(found.iter().any(|f| f.contains("personal data")), "{found:#?}");

    // Voiding a dose opened to every role: the lower roles' calls are caught, and the first
    // one that goes through changes the store.
    let loose = router_from(
        state,
        max,
        weakened("/api/v1/residents/{resident_id}/doses/{event_id}/void", Access::AnyRole),
    );
    let found = violations(&world, &loose).await;
    assert!(
        found.iter().any(|f| f.contains("/void with call-centre session") && f.contains("store changed")),
        "{found:#?}"
    );
}
