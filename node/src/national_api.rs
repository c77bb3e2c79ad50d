//! The national node's HTTP API: national totals, coverage, freshness, the daily report and
//! the deposited audit checkpoints, for national administrators, analysts and prefecture
//! users (a prefecture user sees only their prefecture and its municipalities).

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use axum::{Extension, Json, Router};
use protocol::municipality::MunicipalityCode;
use redb::ReadableDatabase;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::api::{Access, RouteSpec, presented_credential, too_many, with_request_context};
use crate::auth::{Principal, RateLimiter, Role};
use crate::national::{GroupBy, NationalStore, Scope};
use crate::problem::Problem;

/// What the national API's handlers share.
#[derive(Clone)]
pub struct NationalState {
    /// The store.
    pub store: Arc<NationalStore>,
    /// Served over TLS.
    pub https: bool,
    /// Unauthenticated and failed requests, per address.
    pub limiter: Arc<RateLimiter>,
}

use Role::{NationalAdmin, NationalAnalyst, PrefectureUser};
const FIGURES: Access = Access::Roles(&[NationalAdmin, NationalAnalyst, PrefectureUser]);
const NATIONAL_STAFF: Access = Access::Roles(&[NationalAdmin, NationalAnalyst]);
const ALLOCATE: Access = Access::Roles(&[NationalAdmin, PrefectureUser]);
const ADMIN: Access = Access::Roles(&[NationalAdmin]);

const fn route(
    method: &'static str,
    path: &'static str,
    access: Access,
    summary_ja: &'static str,
    summary_en: &'static str,
) -> RouteSpec {
    RouteSpec { method, path, access, summary_ja, summary_en }
}

/// Every route of the national node, with who may call it.
pub const NATIONAL_ROUTES: &[RouteSpec] = &[
    route("GET", "/healthz", Access::Public, "稼働確認", "Liveness check"),
    route("GET", "/", Access::Public, "画面（/ui/）へ移動", "Redirects to the web UI (/ui/)"),
    route(
        "GET",
        "/ui/",
        Access::Public,
        "集計の画面（国のAPIトークンで利用）",
        "The figures' web UI (used with a national API token)",
    ),
    route(
        "GET",
        "/ui/{file}",
        Access::Public,
        "集計の画面のスクリプトとスタイル",
        "The figures' web UI's script and style",
    ),
    route(
        "GET",
        "/api/v1/public/venues",
        Access::Public,
        "接種会場の一覧（市民向け、ログイン不要）",
        "Venues offering vaccination (for citizens, no login)",
    ),
    route("GET", "/api/v1/national/status", NATIONAL_STAFF, "国ノードの状態", "National node status"),
    route(
        "GET",
        "/api/v1/national/totals",
        FIGURES,
        "接種回数の集計（全国・都道府県・市区町村）",
        "Dose totals (national, prefecture, municipality)",
    ),
    route("GET", "/api/v1/national/coverage", FIGURES, "接種率", "Coverage rates"),
    route(
        "GET",
        "/api/v1/national/freshness",
        FIGURES,
        "市区町村ごとの報告の鮮度",
        "When each municipality last reported",
    ),
    route(
        "GET",
        "/api/v1/national/reports/daily",
        FIGURES,
        "日次報告（CSV、UTF-8／Shift_JIS）",
        "Daily report (CSV, UTF-8 or Shift_JIS)",
    ),
    route(
        "GET",
        "/api/v1/national/stock",
        FIGURES,
        "ワクチンの在庫と残日数（全国・都道府県・市区町村）",
        "Vaccine stock and days of supply (national, prefecture, municipality)",
    ),
    route("GET", "/api/v1/national/allocations", FIGURES, "配分の一覧", "Allocations"),
    route(
        "POST",
        "/api/v1/national/allocations",
        ALLOCATE,
        "ワクチンの配分（国→都道府県、都道府県→市区町村）",
        "Allocate doses (state → prefecture, prefecture → municipality)",
    ),
    route(
        "GET",
        "/api/v1/national/anchors/{municipality}",
        NATIONAL_STAFF,
        "市区町村が預けた監査チェックポイント",
        "Audit checkpoints a municipality deposited",
    ),
    route(
        "GET",
        "/api/v1/national/handoffs",
        ADMIN,
        "転出入の引き継ぎ台帳（仮名の個人キー・市区町村・状態のみ）",
        "The relocation ledger (pseudonymous person key, municipalities, state)",
    ),
];

fn handler_for(spec: &RouteSpec) -> MethodRouter<NationalState> {
    if spec.method == "POST" {
        return axum::routing::post(allocate);
    }
    match spec.path {
        "/healthz" => get(|| async { "ok" }),
        "/" => get(|| async { axum::response::Redirect::to("/ui/") }),
        "/ui/" => get(|| async { crate::api::serve_asset(admin_ui::national_asset("")) }),
        "/ui/{file}" => {
            get(
                |Path(file): Path<String>| async move { crate::api::serve_asset(admin_ui::national_asset(&file)) },
            )
        }
        "/api/v1/national/stock" => get(stock),
        "/api/v1/national/allocations" => get(allocations),
        "/api/v1/public/venues" => get(public_venues),
        "/api/v1/national/status" => get(status),
        "/api/v1/national/totals" => get(totals),
        "/api/v1/national/coverage" => get(coverage),
        "/api/v1/national/freshness" => get(freshness),
        "/api/v1/national/reports/daily" => get(daily_report),
        "/api/v1/national/handoffs" => get(ledger),
        _ => get(anchors),
    }
}

/// The national API.
pub fn national_router(state: NationalState) -> Router {
    let mut router = Router::new();
    for spec in NATIONAL_ROUTES {
        let guarded =
            handler_for(spec).route_layer(middleware::from_fn_with_state((state.clone(), spec), guard));
        router = router.route(spec.path, guarded);
    }
    let https = state.https;
    router
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "no_route", None, "no such route", "そのURLはありません")
        })
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            with_request_context(request, next, https)
        }))
        .with_state(state)
}

fn client_ip(request: &Request) -> std::net::IpAddr {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::tls::PeerAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.0.ip())
}

async fn guard(
    State((state, spec)): State<(NationalState, &'static RouteSpec)>,
    mut request: Request,
    next: Next,
) -> Response {
    let ip = client_ip(&request);
    if spec.is_public() {
        if spec.path != "/healthz"
            && let Err(wait) = state.limiter.check(ip)
        {
            return too_many(wait);
        }
        return next.run(request).await;
    }
    let principal = match presented_credential(request.headers()) {
        Some((token, _)) => {
            match state
                .store
                .db()
                .begin_read()
                .map_err(anyhow::Error::from)
                .and_then(|txn| crate::auth::authenticate(&txn, &token, OffsetDateTime::now_utc()))
            {
                Ok(principal) => principal.filter(|p| p.role.is_national()),
                Err(error) => return Problem::internal(&error).into_response(),
            }
        }
        None => None,
    };
    let Some(principal) = principal else {
        if let Err(wait) = state.limiter.check(ip) {
            return too_many(wait);
        }
        tracing::info!(%ip, route = spec.path, "national: refused an unauthenticated request");
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            None,
            "send a national API token (Authorization: Bearer)",
            "国ノードのAPIトークンを Authorization: Bearer で送信してください",
        )
        .into_response();
    };
    if !spec.access.allows(principal.role) {
        tracing::info!(who = %principal.actor(), route = spec.path, "national: forbidden");
        return Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            None,
            format!("the role {} may not do this", principal.role.as_str()),
            format!("{}の役割ではこの操作はできません", principal.role.label_ja()),
        )
        .into_response();
    }
    tracing::info!(who = %principal.actor(), route = spec.path, "national request");
    request.extensions_mut().insert(principal);
    next.run(request).await
}

type ApiResult = Result<Response, Problem>;

fn internal(error: anyhow::Error) -> Problem {
    Problem::internal(&error)
}

/// `prefecture` / `municipality` query parameters.
#[derive(Debug, Default, Deserialize)]
struct ScopeQuery {
    prefecture: Option<String>,
    municipality: Option<String>,
}

/// The scope asked for, checked against the caller: a prefecture user is held to their
/// prefecture (and gets it when they name none).
fn scope_of(query: &ScopeQuery, principal: &Principal) -> Result<Scope, Problem> {
    let asked = asked_scope(query)?;
    if principal.role == Role::PrefectureUser {
        let own = principal.municipality.prefecture_code();
        let scope = asked.unwrap_or(Scope::Prefecture(own));
        if !scope.within_prefecture(own) {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "outside_prefecture",
                None,
                format!("a prefecture user of prefecture {own} sees only that prefecture"),
                format!("都道府県担当は自分の都道府県（{own}）のみ参照できます"),
            ));
        }
        return Ok(scope);
    }
    Ok(asked.unwrap_or(Scope::National))
}

/// The `prefecture` or `municipality` parameter, if one is given.
fn asked_scope(query: &ScopeQuery) -> Result<Option<Scope>, Problem> {
    Ok(match (&query.prefecture, &query.municipality) {
        (Some(_), Some(_)) => {
            return Err(Problem::bad_field(
                "prefecture",
                "give prefecture or municipality, not both",
                "prefecture と municipality はどちらか一方を指定してください",
            ));
        }
        (Some(text), None) => match text.parse::<u8>() {
            Ok(p) if (1..=47).contains(&p) => Some(Scope::Prefecture(p)),
            _ => {
                return Err(Problem::bad_field(
                    "prefecture",
                    format!("prefecture: {text:?} is not a prefecture code (1–47)"),
                    format!("prefecture: 「{text}」は都道府県コード（1〜47）ではありません"),
                ));
            }
        },
        (None, Some(text)) => match MunicipalityCode::parse(text) {
            Ok(code) if code.is_known() => Some(Scope::Municipality(code)),
            _ => {
                return Err(Problem::bad_field(
                    "municipality",
                    format!("municipality: {text:?} is not one of the 1,741 municipality codes"),
                    format!("municipality: 「{text}」は市区町村コードではありません"),
                ));
            }
        },
        (None, None) => None,
    })
}

fn scope_json(scope: Scope) -> serde_json::Value {
    match scope {
        Scope::National => serde_json::json!({"level": "national"}),
        Scope::Prefecture(p) => serde_json::json!({
            "level": "prefecture",
            "prefecture": p,
            "name": protocol::municipality::prefecture_name(p),
        }),
        Scope::Municipality(m) => serde_json::json!({
            "level": "municipality",
            "municipality": m,
            "name": protocol::municipality::lookup_municipality(m).map(|x| x.name),
        }),
    }
}

async fn status(State(state): State<NationalState>) -> ApiResult {
    Ok(Json(state.store.summary().map_err(internal)?).into_response())
}

#[derive(Debug, Deserialize)]
struct TotalsQuery {
    #[serde(flatten)]
    scope: ScopeQuery,
    from: String,
    to: String,
    by: Option<String>,
}

fn group_by(text: Option<&str>) -> Result<GroupBy, Problem> {
    let mut by = GroupBy::default();
    for part in text.unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "date" => by.date = true,
            "product" => by.product = true,
            "dose_number" => by.dose_number = true,
            "age_band" => by.age_band = true,
            "sex" => by.sex = true,
            other => {
                return Err(Problem::bad_field(
                    "by",
                    format!("by: {other:?} is not one of date, product, dose_number, age_band, sex"),
                    format!(
                        "by: 「{other}」は date, product, dose_number, age_band, sex のいずれでもありません"
                    ),
                ));
            }
        }
    }
    Ok(by)
}

async fn totals(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<TotalsQuery>,
) -> ApiResult {
    let scope = scope_of(&query.scope, &principal)?;
    let (from, to) =
        (crate::api::parse_date_field("from", &query.from)?, crate::api::parse_date_field("to", &query.to)?);
    if from > to {
        return Err(Problem::bad_field("from", "from is after to", "from が to より後です"));
    }
    let by = group_by(query.by.as_deref())?;
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.totals(scope, from, to, by))
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(internal)?;
    let total: u64 = rows.iter().map(|r| r.count).sum();
    Ok(Json(serde_json::json!({
        "scope": scope_json(scope),
        "from": from,
        "to": to,
        "total": total,
        "rows": rows,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct CoverageQuery {
    #[serde(flatten)]
    scope: ScopeQuery,
    as_of: Option<String>,
    by: Option<String>,
}

async fn coverage(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<CoverageQuery>,
) -> ApiResult {
    let scope = scope_of(&query.scope, &principal)?;
    let as_of = match &query.as_of {
        Some(text) => crate::api::parse_date_field("as_of", text)?,
        None => crate::clock::japan_today(),
    };
    let by_age_band = match query.by.as_deref() {
        None | Some("") => false,
        Some("age_band") => true,
        Some(other) => {
            return Err(Problem::bad_field(
                "by",
                format!("by: {other:?} — coverage is broken down by age_band only"),
                format!("by: 「{other}」— 接種率は age_band のみで分けられます"),
            ));
        }
    };
    let rows = state.store.coverage(scope, as_of, by_age_band).map_err(internal)?;
    Ok(Json(serde_json::json!({"scope": scope_json(scope), "as_of": as_of, "rows": rows})).into_response())
}

#[derive(Debug, Deserialize)]
struct FreshnessQuery {
    #[serde(flatten)]
    scope: ScopeQuery,
    stale_after_minutes: Option<String>,
}

async fn freshness(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<FreshnessQuery>,
) -> ApiResult {
    let scope = scope_of(&query.scope, &principal)?;
    let minutes = match &query.stale_after_minutes {
        Some(text) => text.parse::<u32>().map_err(|_| {
            Problem::bad_field(
                "stale_after_minutes",
                format!("stale_after_minutes: {text:?} is not a whole number of minutes"),
                format!("stale_after_minutes: 「{text}」は分数（整数）ではありません"),
            )
        })?,
        None => 60,
    };
    let rows = state.store.freshness(scope, time::Duration::minutes(i64::from(minutes))).map_err(internal)?;
    let stale = rows.iter().filter(|r| r.stale).count();
    Ok(Json(serde_json::json!({
        "scope": scope_json(scope),
        "stale_after_minutes": minutes,
        "municipalities": rows.len(),
        "stale": stale,
        "rows": rows,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct ReportQuery {
    #[serde(flatten)]
    scope: ScopeQuery,
    date: String,
    encoding: Option<String>,
}

async fn daily_report(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<ReportQuery>,
) -> ApiResult {
    let scope = scope_of(&query.scope, &principal)?;
    let date = crate::api::parse_date_field("date", &query.date)?;
    let shift_jis = match query.encoding.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("utf-8") | Some("utf8") => false,
        Some("shift_jis") | Some("sjis") | Some("cp932") => true,
        Some(other) => {
            return Err(Problem::bad_field(
                "encoding",
                format!("encoding: {other:?} is not utf-8 or shift_jis"),
                format!("encoding: 「{other}」は utf-8 でも shift_jis でもありません"),
            ));
        }
    };
    let store = state.store.clone();
    let text = tokio::task::spawn_blocking(move || store.daily_report(scope, date))
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(internal)?;
    let (body, charset) = if shift_jis {
        (encoding_rs::SHIFT_JIS.encode(&text).0.into_owned(), "Shift_JIS")
    } else {
        (text.into_bytes(), "utf-8")
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("text/csv; charset={charset}")) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"vrs-daily-{date}.csv\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

async fn anchors(State(state): State<NationalState>, Path(municipality): Path<String>) -> ApiResult {
    let code =
        MunicipalityCode::parse(&municipality).ok().filter(MunicipalityCode::is_known).ok_or_else(|| {
            Problem::bad_field(
                "municipality",
                format!("{municipality:?} is not one of the 1,741 municipality codes"),
                format!("「{municipality}」は市区町村コードではありません"),
            )
        })?;
    let checkpoints = state.store.anchors(code).map_err(internal)?;
    Ok(Json(serde_json::json!({"municipality": code, "checkpoints": checkpoints})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerQuery {
    municipality: Option<String>,
    person_key: Option<String>,
}

async fn ledger(State(state): State<NationalState>, Query(query): Query<LedgerQuery>) -> ApiResult {
    let municipality = match query.municipality.as_deref() {
        Some(text) => {
            Some(MunicipalityCode::parse(text).ok().filter(MunicipalityCode::is_known).ok_or_else(|| {
                Problem::bad_field(
                    "municipality",
                    format!("{text:?} is not one of the 1,741 municipality codes"),
                    format!("「{text}」は市区町村コードではありません"),
                )
            })?)
        }
        None => None,
    };
    let mut entries = crate::ledger::entries(state.store.db(), municipality).map_err(internal)?;
    if let Some(key) = &query.person_key {
        entries.retain(|e| &e.person_key == key);
    }
    let in_transit = entries.iter().filter(|e| e.state == protocol::handoff::LedgerState::InTransit).count();
    Ok(Json(serde_json::json!({"handoffs": entries, "in_transit": in_transit})).into_response())
}

#[derive(Debug, Deserialize)]
struct VenuesQuery {
    #[serde(flatten)]
    scope: ScopeQuery,
    product: Option<String>,
}

async fn public_venues(State(state): State<NationalState>, Query(query): Query<VenuesQuery>) -> ApiResult {
    let scope = asked_scope(&query.scope)?.unwrap_or(Scope::National);
    let venues = state.store.venues(scope, query.product.as_deref()).map_err(internal)?;
    Ok(Json(serde_json::json!({"scope": scope_json(scope), "venues": venues})).into_response())
}

#[derive(Debug, Deserialize)]
struct StockQuery {
    #[serde(flatten)]
    scope: ScopeQuery,
    as_of: Option<String>,
}

async fn stock(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<StockQuery>,
) -> ApiResult {
    let scope = scope_of(&query.scope, &principal)?;
    let as_of = match &query.as_of {
        Some(text) => crate::api::parse_date_field("as_of", text)?,
        None => crate::clock::japan_today(),
    };
    let rows = state.store.stock(scope, as_of).map_err(internal)?;
    Ok(Json(serde_json::json!({"scope": scope_json(scope), "as_of": as_of, "products": rows}))
        .into_response())
}

async fn allocations(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<ScopeQuery>,
) -> ApiResult {
    let scope = scope_of(&query, &principal)?;
    let rows = state.store.allocations(scope).map_err(internal)?;
    Ok(Json(serde_json::json!({"scope": scope_json(scope), "allocations": rows})).into_response())
}

#[derive(Debug, Deserialize)]
struct AllocationBody {
    prefecture: Option<u8>,
    municipality: Option<String>,
    product: String,
    doses: u64,
}

async fn allocate(
    State(state): State<NationalState>,
    Extension(principal): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body: AllocationBody = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            None,
            format!("the body is not an allocation {{prefecture | municipality, product, doses}}: {e}"),
            format!("配分の形式（prefecture または municipality, product, doses）ではありません: {e}"),
        )
    })?;
    let product_ok = (1..=40).contains(&body.product.len())
        && body.product.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !product_ok {
        return Err(Problem::bad_field(
            "product",
            "product: a catalogue product code (a–z, 0–9, -)",
            "product: ワクチンの製品コード（英小文字・数字・-）を指定してください",
        ));
    }
    if body.doses == 0 || body.doses > 100_000_000 {
        return Err(Problem::bad_field(
            "doses",
            "doses: 1 to 100,000,000",
            "doses: 1〜1億回分で指定してください",
        ));
    }
    let (to_prefecture, to_municipality) = match (principal.role, body.prefecture, &body.municipality) {
        (Role::NationalAdmin, Some(p), None) if (1..=47).contains(&p) => (Some(p), None),
        (Role::NationalAdmin, ..) => {
            return Err(Problem::bad_field(
                "prefecture",
                "the state allocates to a prefecture (1–47); prefectures allocate to municipalities",
                "国は都道府県（1〜47）に配分します。市区町村への配分は都道府県が行います",
            ));
        }
        (_, None, Some(text)) => {
            let code =
                MunicipalityCode::parse(text).ok().filter(MunicipalityCode::is_known).ok_or_else(|| {
                    Problem::bad_field(
                        "municipality",
                        format!("municipality: {text:?} is not one of the 1,741 municipality codes"),
                        format!("municipality: 「{text}」は市区町村コードではありません"),
                    )
                })?;
            let own = principal.municipality.prefecture_code();
            if code.prefecture_code() != own {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "outside_prefecture",
                    Some("municipality"),
                    format!("a prefecture user of prefecture {own} allocates to its own municipalities only"),
                    format!("都道府県担当は自分の都道府県（{own}）の市区町村にのみ配分できます"),
                ));
            }
            (None, Some(code))
        }
        _ => {
            return Err(Problem::bad_field(
                "municipality",
                "a prefecture allocates to one of its municipalities",
                "都道府県は管内の市区町村に配分します",
            ));
        }
    };
    let store = state.store.clone();
    let product = body.product.clone();
    let by = principal.actor();
    let result = tokio::task::spawn_blocking(move || {
        store.allocate(&by, to_prefecture, to_municipality, &product, body.doses)
    })
    .await
    .map_err(|e| internal(e.into()))?
    .map_err(internal)?;
    match result {
        Ok(allocation) => {
            tracing::info!(who = %principal.actor(), id = allocation.id, doses = allocation.doses, "allocation");
            Ok((StatusCode::CREATED, Json(allocation)).into_response())
        }
        Err(crate::national::AllocationRefusal::Insufficient { available }) => Err(Problem::new(
            StatusCode::CONFLICT,
            "insufficient_stock",
            Some("doses"),
            format!("the prefecture holds {available} undistributed doses of {}", body.product),
            format!("都道府県の未配分の在庫は {available} 回分です（{}）", body.product),
        )),
    }
}
