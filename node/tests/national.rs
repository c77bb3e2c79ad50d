//! The national node in-process: reports are accepted only whole, only from a municipality's
//! primary, only signed by it and only when newer; every national route refuses every
//! credential the authorization table does not let through, and a prefecture user stays in
//! their prefecture.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use node::auth::{RateLimiter, Role};
use node::federation::{NationalInit, add_national_token, init_national};
use node::national::{GroupBy, NationalStore, Scope};
use node::national_api::{NATIONAL_ROUTES, NationalState, national_router};
use protocol::directory::{DirectoryEntry, NodeRole};
use protocol::document::Sex;
use protocol::municipality::MunicipalityCode;
use protocol::statistics::{
    AgeBand, Cell, ReportRequest, ReportResponse, SignedStatistics, Statistics, daily_from_cells,
};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use time::macros::date;
use tower::ServiceExt;

struct Member {
    key: Ed25519KeyPair,
    entry: DirectoryEntry,
}

fn member(code: &str, role: NodeRole) -> Member {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let entry = DirectoryEntry {
        municipality: Some(MunicipalityCode::parse(code).unwrap()),
        role,
        peer_id: String::new(),
        addresses: Vec::new(),
        coupon_key: protocol::person::hex_lower(key.public_key().as_ref()),
        encryption_key: String::new(),
    };
    Member { key, entry }
}

/// `count` first doses of comirnaty on 2026-11-20 in `code`, as version `version`.
fn daily(code: &str, version: u64, count: u64) -> Statistics {
    let municipality = MunicipalityCode::parse(code).unwrap();
    let on = date!(2026 - 11 - 20);
    let cell = Cell::Dose {
        date: on,
        product: "comirnaty-30".into(),
        dose_number: 1,
        age_band: AgeBand::of(date!(1960 - 04 - 01), on),
        sex: Sex::Male,
        venue_municipality: municipality,
    };
    let doc = daily_from_cells(municipality, on, version, "2026-11-20T10:00:00Z".into(), [(&cell, count)]);
    Statistics::Daily(doc)
}

fn report(member: &Member, docs: &[Statistics]) -> ReportRequest {
    ReportRequest {
        statistics: docs.iter().map(|d| SignedStatistics::sign(d, &member.key)).collect(),
        checkpoints: Vec::new(),
    }
}

fn total(store: &NationalStore, scope: Scope) -> u64 {
    let on = date!(2026 - 11 - 20);
    store.totals(scope, on, on, GroupBy::default()).unwrap().iter().map(|r| r.count).sum()
}

struct National {
    dir: std::path::PathBuf,
}

impl Drop for National {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn national(label: &str) -> National {
    let dir = std::env::temp_dir().join(format!("vrs-national-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let init = NationalInit {
        p2p_listen: "/ip4/127.0.0.1/tcp/0",
        advertise: None,
        http_listen: "127.0.0.1:0",
        plain_http: true,
    };
    init_national(&dir, &init).unwrap();
    National { dir }
}

#[test]
fn reports_are_stored_whole_from_the_primary_signed_and_newer_or_not_at_all() {
    let national = national("ingest");
    let store = NationalStore::open(&national.dir, None).unwrap();
    let yokohama = member("141003", NodeRole::Municipal);
    let chiyoda = member("131016", NodeRole::Municipal);

    let stored = store.ingest(&yokohama.entry, &report(&yokohama, &[daily("141003", 10, 5)]));
    assert!(matches!(stored, ReportResponse::Stored { statistics: 1, .. }), "{stored:?}");
    assert_eq!(total(&store, Scope::National), 5);

    // A newer version replaces the figures (a void lowered them); an older one or a replay
    // changes nothing.
    store.ingest(&yokohama.entry, &report(&yokohama, &[daily("141003", 12, 4)]));
    for old in [daily("141003", 11, 9), daily("141003", 12, 4)] {
        let answer = store.ingest(&yokohama.entry, &report(&yokohama, &[old]));
        // Ignored, and the sender learns the version to continue above.
        assert!(
            matches!(answer, ReportResponse::Stored { statistics: 0, held_version: 12, .. }),
            "{answer:?}"
        );
    }
    assert_eq!(total(&store, Scope::National), 4);

    // Refused whole, nothing stored: a document signed by another key among good ones, a
    // document about another municipality, a report from a standby.
    let mut mixed = report(&chiyoda, &[daily("131016", 1, 7)]);
    mixed.statistics.push(SignedStatistics::sign(&daily("131016", 2, 8), &yokohama.key));
    let refusals = [
        store.ingest(&chiyoda.entry, &mixed),
        store.ingest(&chiyoda.entry, &report(&chiyoda, &[daily("141003", 99, 1000)])),
        store.ingest(&member("131016", NodeRole::Standby).entry, &report(&chiyoda, &[daily("131016", 1, 7)])),
    ];
    let codes: Vec<String> = refusals
        .iter()
        .map(|r| match r {
            ReportResponse::Refused { code, message } => {
                assert!(!message.is_empty());
                code.clone()
            }
            other => panic!("accepted: {other:?}"),
        })
        .collect();
    assert_eq!(codes, ["bad_statistics", "wrong_municipality", "not_a_municipal_node"]);
    assert_eq!(total(&store, Scope::National), 4, "nothing of a refused report was stored");
    assert_eq!(total(&store, Scope::Prefecture(13)), 0);

    // Totals survive a restart: they are rebuilt from the stored documents.
    store.ingest(&chiyoda.entry, &report(&chiyoda, &[daily("131016", 3, 2)]));
    drop(store);
    let store = NationalStore::open(&national.dir, None).unwrap();
    assert_eq!(total(&store, Scope::National), 6);
    assert_eq!(total(&store, Scope::Prefecture(14)), 4);
    assert_eq!(total(&store, Scope::Municipality(MunicipalityCode::parse("131016").unwrap())), 2);
}

#[test]
fn a_national_node_has_no_municipal_accounts_and_a_prefecture_user_needs_a_prefecture() {
    let national = national("accounts");
    for (role, prefecture) in
        [(Role::Clerk, None), (Role::PrefectureUser, None), (Role::NationalAnalyst, Some(13))]
    {
        assert!(
            add_national_token(&national.dir, "x", role, prefecture, None).is_err(),
            "{role:?} {prefecture:?}"
        );
    }
    assert!(add_national_token(&national.dir, "p", Role::PrefectureUser, Some(48), None).is_err());
}

async fn status_of(app: &axum::Router, path: &str, token: Option<&str>) -> StatusCode {
    call(app, "GET", path, token, "").await
}

async fn call(app: &axum::Router, method: &str, path: &str, token: Option<&str>, body: &str) -> StatusCode {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    app.clone().oneshot(request.body(Body::from(body.to_owned())).unwrap()).await.unwrap().status()
}

#[tokio::test]
async fn every_national_route_refuses_what_the_table_forbids() {
    let national = national("matrix");
    let token = |name: &str, role: Role, prefecture: Option<u8>, days: Option<i64>| {
        add_national_token(&national.dir, name, role, prefecture, days).unwrap()
    };
    let admin = token("admin", Role::NationalAdmin, None, None);
    let analyst = token("analyst", Role::NationalAnalyst, None, None);
    let kanagawa = token("kanagawa", Role::PrefectureUser, Some(14), None);
    let tokyo = token("tokyo", Role::PrefectureUser, Some(13), None);
    let expired = token("expired", Role::NationalAdmin, None, Some(-1));
    let store = Arc::new(NationalStore::open(&national.dir, None).unwrap());
    let yokohama = member("141003", NodeRole::Municipal);
    store.ingest(&yokohama.entry, &report(&yokohama, &[daily("141003", 1, 3)]));
    // The state allocates to Kanagawa, so that Kanagawa can allocate to Yokohama.
    store.allocate("token:admin", Some(14), None, "comirnaty-30", 100).unwrap().unwrap();
    let app =
        national_router(NationalState { store, https: false, limiter: Arc::new(RateLimiter::new(100_000)) });
    let allocation = r#"{"municipality": "141003", "product": "comirnaty-30", "doses": 1}"#;

    // Each route with a Kanagawa (141003) scope, where it takes one.
    let probe = |path: &str| -> String {
        match path {
            "/api/v1/national/totals" => format!("{path}?municipality=141003&from=2026-11-01&to=2026-11-30"),
            "/api/v1/national/coverage"
            | "/api/v1/national/freshness"
            | "/api/v1/national/stock"
            | "/api/v1/national/allocations" => format!("{path}?municipality=141003"),
            "/api/v1/national/reports/daily" => format!("{path}?municipality=141003&date=2026-11-20"),
            "/ui/{file}" => "/ui/national.js".to_owned(),
            p => p.replace("{municipality}", "141003"),
        }
    };
    let credentials: [(&str, Option<&str>, Option<Role>); 7] = [
        ("none", None, None),
        ("unknown", Some("vrs_t_0000"), None),
        ("expired", Some(&expired), None),
        ("national_admin", Some(&admin), Some(Role::NationalAdmin)),
        ("national_analyst", Some(&analyst), Some(Role::NationalAnalyst)),
        ("prefecture 14", Some(&kanagawa), Some(Role::PrefectureUser)),
        ("prefecture 13", Some(&tokyo), Some(Role::PrefectureUser)),
    ];
    let mut checked = 0;
    for spec in NATIONAL_ROUTES {
        let path = probe(spec.path);
        for (name, token, role) in credentials {
            let post = spec.method == "POST";
            let expected = match role {
                // The node's address sends a browser to its page.
                _ if spec.path == "/" => StatusCode::SEE_OTHER,
                _ if spec.is_public() => StatusCode::OK,
                None => StatusCode::UNAUTHORIZED,
                Some(role) if !spec.access.allows(role) => StatusCode::FORBIDDEN,
                // Tokyo's prefecture user asking about (or allocating to) a Kanagawa municipality.
                Some(Role::PrefectureUser) if name == "prefecture 13" => StatusCode::FORBIDDEN,
                // The state allocates to prefectures, not to a municipality.
                Some(Role::NationalAdmin) if post => StatusCode::BAD_REQUEST,
                Some(_) if post => StatusCode::CREATED,
                Some(_) => StatusCode::OK,
            };
            let body = if post { allocation } else { "" };
            assert_eq!(
                call(&app, spec.method, &path, token, body).await,
                expected,
                "{name} → {} {path}",
                spec.method
            );
            checked += 1;
        }
    }
    assert_eq!(checked, NATIONAL_ROUTES.len() * credentials.len());
    // The national page is the national node's; the staff's script is not served there.
    assert_eq!(call(&app, "GET", "/ui/app.js", None, "").await, StatusCode::NOT_FOUND);
    // Prefecture users: the nation and another prefecture are out of reach; their own is the default.
    for path in [
        "/api/v1/national/totals?from=2026-11-20&to=2026-11-20&prefecture=13",
        "/api/v1/national/freshness?prefecture=1",
    ] {
        assert_eq!(status_of(&app, path, Some(&kanagawa)).await, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        status_of(&app, "/api/v1/national/totals?from=2026-11-20&to=2026-11-20", Some(&kanagawa)).await,
        StatusCode::OK
    );
    // Malformed parameters name the field.
    for path in [
        "/api/v1/national/totals?from=2026-11-20&to=2026-11-20&by=name",
        "/api/v1/national/totals?from=2026-11-31&to=2026-11-20",
        "/api/v1/national/totals?from=2026-11-20&to=2026-11-20&municipality=999999",
        "/api/v1/national/freshness?stale_after_minutes=soon",
        "/api/v1/national/reports/daily?date=2026-11-20&encoding=latin1",
    ] {
        assert_eq!(status_of(&app, path, Some(&analyst)).await, StatusCode::BAD_REQUEST, "{path}");
    }
}

#[test]
fn a_prefecture_allocates_no_more_than_it_holds_and_stock_counts_use_at_the_venues() {
    let national = national("stock");
    let store = NationalStore::open(&national.dir, None).unwrap();
    let yokohama = MunicipalityCode::parse("141003").unwrap();
    let kawasaki = MunicipalityCode::parse("141305").unwrap();
    store.allocate("token:admin", Some(14), None, "comirnaty-30", 1000).unwrap().unwrap();
    store.allocate("token:kanagawa", None, Some(yokohama), "comirnaty-30", 700).unwrap().unwrap();
    let refused = store.allocate("token:kanagawa", None, Some(kawasaki), "comirnaty-30", 301).unwrap();
    assert_eq!(refused.unwrap_err(), node::national::AllocationRefusal::Insufficient { available: 300 });
    store.allocate("token:kanagawa", None, Some(kawasaki), "comirnaty-30", 300).unwrap().unwrap();

    // Yokohama reports 5 doses given at its venues on 2026-11-20.
    let member = member("141003", NodeRole::Municipal);
    store.ingest(&member.entry, &report(&member, &[daily("141003", 1, 5)]));
    let row = |scope| store.stock(scope, date!(2026 - 11 - 20)).unwrap().into_iter().next().unwrap();
    let yokohama_row = row(Scope::Municipality(yokohama));
    assert_eq!((yokohama_row.received, yokohama_row.used, yokohama_row.on_hand), (700, 5, 695));
    assert!((yokohama_row.daily_use_7d - 0.7).abs() < 1e-9, "{yokohama_row:?}");
    assert_eq!(yokohama_row.days_of_supply, Some(973.0), "695 on hand ÷ (5 ÷ 7) a day");
    let kanagawa = row(Scope::Prefecture(14));
    assert_eq!(
        (kanagawa.received, kanagawa.passed_on, kanagawa.used, kanagawa.on_hand),
        (1000, Some(1000), 5, 995)
    );
    let nation = row(Scope::National);
    assert_eq!((nation.received, nation.passed_on), (1000, None));
}
