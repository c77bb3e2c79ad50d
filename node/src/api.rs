//! The HTTP API (axum). Every route is listed once in [`ROUTES`]; the router, the OpenAPI
//! document and the route tests are all built from that table, so a route cannot exist
//! without being documented and tested.
//!
//! Errors are RFC 9457 problem+json: `title` in Japanese unless `Accept-Language` prefers
//! English, both languages in `detail_ja` / `detail_en`, the field at fault in `field`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use protocol::catalogue::{Catalogue, Lot};
use protocol::coupon::CouponNumber;
use protocol::document::{CouponStatus, ResidentRecord};
use protocol::gs1::{Gtin, parse_vial_barcode};
use protocol::municipality::MunicipalityCode;
use protocol::validation::{Amendment, authenticate_coupon, decode_scans};
use serde::Deserialize;
use serde_json::json;
use time::Date;

use crate::config::sha256_hex;
use crate::problem::{Problem, prefers_english};
use crate::store::{IDX_ATENA, IDX_COUPON, IDX_PERSON, Store};
use crate::writer::{CaptureCommand, Command, WriterHandle};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The store (reads).
    pub store: Arc<Store>,
    /// The writer (all writes).
    pub writer: WriterHandle,
    /// This node's municipality.
    pub municipality: MunicipalityCode,
    /// The public key that verifies this municipality's coupons.
    pub coupon_public_key: Vec<u8>,
    /// The vaccine catalogue.
    pub catalogue: Arc<Catalogue>,
    /// SHA-256 of the admin API token.
    pub admin_token_sha256: String,
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    /// HTTP method.
    pub method: &'static str,
    /// Path, with `{param}` segments.
    pub path: &'static str,
    /// Whether it is reachable without a credential (no personal data).
    pub public: bool,
    /// What it does, in Japanese.
    pub summary_ja: &'static str,
    /// What it does, in English.
    pub summary_en: &'static str,
}

const fn route(
    method: &'static str,
    path: &'static str,
    public: bool,
    summary_ja: &'static str,
    summary_en: &'static str,
) -> RouteSpec {
    RouteSpec { method, path, public, summary_ja, summary_en }
}

/// Every route the node serves.
pub const ROUTES: &[RouteSpec] = &[
    route("GET", "/healthz", true, "稼働確認", "Liveness check"),
    route("GET", "/api/openapi.json", true, "この API の OpenAPI 定義", "This API's OpenAPI document"),
    route("GET", "/api/v1/status", false, "ノードの件数と状態", "Node counts and status"),
    route(
        "POST",
        "/api/v1/captures",
        false,
        "接種の記録（接種券QRとワクチンのバーコードの読み取り文字列）",
        "Record a vaccination from the scanned coupon and vial texts",
    ),
    route(
        "GET",
        "/api/v1/residents",
        false,
        "住民の検索（宛名番号・券番号・カナ）",
        "Search residents by atena number, coupon number or kana",
    ),
    route(
        "GET",
        "/api/v1/residents/{resident_id}",
        false,
        "住民の記録と接種歴",
        "A resident's record and history",
    ),
    route(
        "POST",
        "/api/v1/residents/{resident_id}/doses/{event_id}/void",
        false,
        "接種記録の取消（理由必須）",
        "Void a dose event (reason required)",
    ),
    route(
        "POST",
        "/api/v1/residents/{resident_id}/doses/{event_id}/amend",
        false,
        "接種記録の訂正（理由必須）",
        "Amend a dose event (reason required)",
    ),
    route(
        "POST",
        "/api/v1/coupons/{coupon_number}/reissue",
        false,
        "接種券の再発行（旧版は無効）",
        "Reissue a coupon (the old generation is superseded)",
    ),
    route(
        "POST",
        "/api/v1/coupons/{coupon_number}/revoke",
        false,
        "接種券の取消（理由必須）",
        "Revoke a coupon (reason required)",
    ),
    route("GET", "/api/v1/lots", false, "登録済みロットの一覧", "Registered lots"),
    route("POST", "/api/v1/lots", false, "ロットの登録", "Register a lot"),
    route("GET", "/api/v1/catalogue", false, "ワクチン製品一覧", "Vaccine catalogue"),
    route("GET", "/api/v1/changes", false, "変更フィード（複製用）", "Change feed (for replication)"),
];

fn handler_for(spec: &RouteSpec) -> MethodRouter<AppState> {
    match (spec.method, spec.path) {
        ("GET", "/healthz") => get(healthz),
        ("GET", "/api/openapi.json") => get(openapi),
        ("GET", "/api/v1/status") => get(status),
        ("POST", "/api/v1/captures") => post(capture),
        ("GET", "/api/v1/residents") => get(search_residents),
        ("GET", "/api/v1/residents/{resident_id}") => get(resident),
        ("POST", "/api/v1/residents/{resident_id}/doses/{event_id}/void") => post(void_dose),
        ("POST", "/api/v1/residents/{resident_id}/doses/{event_id}/amend") => post(amend_dose),
        ("POST", "/api/v1/coupons/{coupon_number}/reissue") => post(reissue),
        ("POST", "/api/v1/coupons/{coupon_number}/revoke") => post(revoke),
        ("GET", "/api/v1/lots") => get(list_lots),
        ("POST", "/api/v1/lots") => post(add_lot),
        ("GET", "/api/v1/catalogue") => get(catalogue),
        ("GET", "/api/v1/changes") => get(changes),
        (method, path) => unreachable!("ROUTES lists {method} {path} without a handler"),
    }
}

/// The router, built from [`ROUTES`].
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let mut public = Router::new();
    let mut protected = Router::new();
    for spec in ROUTES {
        if spec.public {
            public = public.route(spec.path, handler_for(spec));
        } else {
            protected = protected.route(spec.path, handler_for(spec));
        }
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(state.clone(), require_credential));
    public
        .merge(protected)
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "no_route", None, "no such route", "そのURLはありません")
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(localize_problems))
        .with_state(state)
}

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Id written into records (`recorded_by`, correction actor).
    pub actor: String,
}

async fn require_credential(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            None,
            "a bearer token is required",
            "認証が必要です（Bearer トークン）",
        )
        .into_response();
    };
    let digest = sha256_hex(token.as_bytes());
    if !constant_time_eq(digest.as_bytes(), state.admin_token_sha256.as_bytes()) {
        tracing::warn!(path = %request.uri().path(), "refused credential");
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            None,
            "the token is not valid",
            "トークンが無効です",
        )
        .into_response();
    }
    request.extensions_mut().insert(Caller { actor: "admin-token".to_owned() });
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Re-renders problem responses in English when the caller prefers it.
async fn localize_problems(request: Request, next: Next) -> Response {
    let english = prefers_english(request.headers());
    let response = next.run(request).await;
    if !english {
        return response;
    }
    match response.extensions().get::<Problem>().cloned() {
        Some(problem) => {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_LANGUAGE, header::HeaderValue::from_static("en"));
            problem.into_response_for(&headers)
        }
        None => response,
    }
}

type ApiResult = Result<Response, Problem>;

/// Parses a JSON body into `T`, or says what is wrong with it. A body over the limit
/// (`http.max_body_bytes`) is refused with 413 before it is read whole.
fn body<T: serde::de::DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, Problem> {
    let bytes = bytes.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                Some("body"),
                "request body too large",
                "リクエストが大きすぎます",
            )
        } else {
            Problem::bad_field(
                "body",
                format!("request body unreadable: {rejection}"),
                "リクエスト本文を読めません",
            )
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Problem::bad_field(
            "body",
            format!("request body is not valid: {e}"),
            format!("リクエスト本文が正しくありません: {e}"),
        )
    })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.1 document, from [`ROUTES`].
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for spec in ROUTES {
        let entry = paths.entry(spec.path.to_owned()).or_insert_with(|| json!({}));
        let parameters: Vec<serde_json::Value> = spec
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut operation = json!({
            "summary": spec.summary_en,
            "description": spec.summary_ja,
            "parameters": parameters,
            "responses": {
                "200": {"description": "OK"},
                "default": {"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            }
        });
        if !spec.public {
            operation["security"] = json!([{"bearer": []}]);
        }
        entry[spec.method.to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "vrs-node API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "code": {"type": "string"}, "field": {"type": "string"},
                "detail_ja": {"type": "string"}, "detail_en": {"type": "string"}}}}
        }
    })
}

async fn status(State(state): State<AppState>) -> ApiResult {
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let counts = (|| -> anyhow::Result<serde_json::Value> {
        Ok(json!({
            "municipality": state.municipality,
            "residents": view.n_residents()?,
            "coupons": view.n_coupons()?,
            "dose_events": view.n_dose_events()?,
            "change_seq": view.meta(crate::store::META_CHANGE_SEQ)?,
        }))
    })()
    .map_err(|e| Problem::internal(&e))?;
    Ok(Json(counts).into_response())
}

#[derive(Deserialize)]
struct CaptureBody {
    coupon: String,
    vial: String,
    #[serde(default)]
    vaccinated_on: Option<String>,
    venue: String,
    #[serde(default)]
    event_id: Option<String>,
}

fn parse_date_field(field: &str, text: &str) -> Result<Date, Problem> {
    Date::parse(text, &time::format_description::well_known::Iso8601::DATE).map_err(|_| {
        Problem::bad_field(
            field,
            format!("{field}: {text:?} is not a date (YYYY-MM-DD)"),
            format!("{field}: 「{text}」は日付（YYYY-MM-DD）ではありません"),
        )
    })
}

fn check_id_field(field: &str, value: &str) -> Result<(), Problem> {
    let ok = (1..=128).contains(&value.len())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Problem::bad_field(
            field,
            format!("{field} must be 1–128 characters of A–Z, a–z, 0–9, '-', '_', '.'"),
            format!("{field} は英数字と - _ . の1〜128文字です"),
        ))
    }
}

async fn capture(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let recorded_by = caller.actor;
    let capture: CaptureBody = body(bytes)?;
    check_id_field("venue", &capture.venue)?;
    if let Some(event_id) = &capture.event_id {
        check_id_field("event_id", event_id)?;
    }
    let vaccinated_on = match &capture.vaccinated_on {
        Some(text) => Some(parse_date_field("vaccinated_on", text)?),
        None => None,
    };
    let scans = decode_scans(&capture.coupon, &capture.vial)?;
    let own = state.municipality;
    let key = state.coupon_public_key.clone();
    authenticate_coupon(&scans.coupon, |code| (code == own).then(|| key.clone()))?;
    let command = CaptureCommand {
        scans,
        vaccinated_on,
        venue: capture.venue,
        event_id: capture.event_id,
        recorded_by,
    };
    let outcome = state.writer.call(|reply| Command::Capture(Box::new(command), reply)).await?;
    let code = if outcome.replay { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(outcome)).into_response())
}

#[derive(Deserialize)]
struct SearchQuery {
    atena: Option<String>,
    coupon: Option<String>,
    kana: Option<String>,
    person_key: Option<String>,
}

async fn search_residents(State(state): State<AppState>, Query(query): Query<SearchQuery>) -> ApiResult {
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let ids: Vec<String> = (|| -> anyhow::Result<Vec<String>> {
        if let Some(atena) = &query.atena {
            return Ok(view.index(IDX_ATENA, atena.trim())?.into_iter().collect());
        }
        if let Some(coupon) = &query.coupon {
            // Accept the 10-digit number, the 18 digits or a whole QR text.
            let digits: String = coupon.chars().filter(char::is_ascii_digit).collect();
            let number = match digits.len() {
                10 => digits,
                n if n >= 18 => digits[8..18].to_owned(),
                _ => String::new(),
            };
            return Ok(view.index(IDX_COUPON, &number)?.into_iter().collect());
        }
        if let Some(person_key) = &query.person_key {
            return Ok(view.index(IDX_PERSON, person_key.trim())?.into_iter().collect());
        }
        if let Some(kana) = &query.kana {
            if kana.trim().is_empty() {
                return Ok(Vec::new());
            }
            return view.search_kana(kana, 50);
        }
        Ok(Vec::new())
    })()
    .map_err(|e| Problem::internal(&e))?;
    if query.atena.is_none() && query.coupon.is_none() && query.kana.is_none() && query.person_key.is_none() {
        return Err(Problem::bad_field(
            "query",
            "give one of atena, coupon, kana, person_key",
            "atena・coupon・kana・person_key のいずれかを指定してください",
        ));
    }
    let mut results = Vec::new();
    for id in ids {
        if let Some(record) = view.record(&id).map_err(|e| Problem::internal(&e))? {
            results.push(json!({
                "resident_id": record.resident_id,
                "atena_number": record.identity.atena_number,
                "name": record.identity.name,
                "name_kana": record.identity.name_kana,
                "birth_date": record.identity.birth_date,
                "status": record.identity.status,
                "doses": record.valid_doses().len(),
            }));
        }
    }
    Ok(Json(json!({ "residents": results })).into_response())
}

fn resident_view(record: &ResidentRecord) -> serde_json::Value {
    let doses: Vec<&protocol::document::DoseEvent> = {
        let mut all: Vec<_> = record.doses.values().collect();
        all.sort_by_key(|d| (d.dose_number, d.vaccinated_on, d.captured_at));
        all
    };
    let valid_coupons: Vec<_> = record.coupons.values().filter(|c| c.status == CouponStatus::Valid).collect();
    json!({
        "resident_id": record.resident_id,
        "municipality": record.municipality,
        "identity": record.identity,
        "next_dose": record.next_dose_number(),
        "valid_coupons": valid_coupons,
        "history": doses,
        "coupons": record.coupons,
        "corrections": record.corrections,
    })
}

async fn resident(State(state): State<AppState>, Path(resident_id): Path<String>) -> ApiResult {
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let record = view.record(&resident_id).map_err(|e| Problem::internal(&e))?;
    let record = record.ok_or_else(|| Problem::not_found("resident", "住民", &resident_id))?;
    Ok(Json(resident_view(&record)).into_response())
}

#[derive(Deserialize)]
struct ReasonBody {
    reason: String,
}

async fn void_dose(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((resident_id, event_id)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let actor = caller.actor;
    let ReasonBody { reason } = body(bytes)?;
    let correction =
        state.writer.call(|reply| Command::Void { resident_id, event_id, reason, actor, reply }).await?;
    Ok(Json(correction).into_response())
}

#[derive(Deserialize)]
struct AmendBody {
    reason: String,
    #[serde(default)]
    vaccinated_on: Option<String>,
    #[serde(default)]
    vial: Option<String>,
    #[serde(default)]
    venue: Option<String>,
}

async fn amend_dose(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((resident_id, event_id)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let actor = caller.actor;
    let amend: AmendBody = body(bytes)?;
    let mut amendment = Amendment::default();
    if let Some(text) = &amend.vaccinated_on {
        amendment.vaccinated_on = Some(parse_date_field("vaccinated_on", text)?);
    }
    if let Some(text) = &amend.vial {
        amendment.vial =
            Some(parse_vial_barcode(text).map_err(protocol::validation::CaptureError::MalformedVial)?);
    }
    if let Some(venue) = &amend.venue {
        check_id_field("venue", venue)?;
        amendment.venue = Some(venue.clone());
    }
    let correction = state
        .writer
        .call(|reply| Command::Amend {
            resident_id,
            event_id,
            amendment: Box::new(amendment),
            reason: amend.reason,
            actor,
            reply,
        })
        .await?;
    Ok(Json(correction).into_response())
}

fn coupon_number(text: &str) -> Result<CouponNumber, Problem> {
    CouponNumber::parse(text).map_err(|e| {
        Problem::bad_field(
            "coupon_number",
            format!("coupon_number: {e}"),
            format!("券番号: {}", e.message_ja()),
        )
    })
}

async fn reissue(State(state): State<AppState>, Path(number): Path<String>) -> ApiResult {
    let number = coupon_number(&number)?;
    let outcome = state.writer.call(|reply| Command::Reissue { number, reply }).await?;
    Ok((StatusCode::CREATED, Json(outcome)).into_response())
}

async fn revoke(
    State(state): State<AppState>,
    Path(number): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let number = coupon_number(&number)?;
    let ReasonBody { reason } = body(bytes)?;
    let entry = state.writer.call(|reply| Command::Revoke { number, reason, reply }).await?;
    Ok(Json(entry).into_response())
}

async fn list_lots(State(state): State<AppState>) -> ApiResult {
    let lots = state.store.read().and_then(|v| v.lots()).map_err(|e| Problem::internal(&e))?;
    Ok(Json(json!({ "lots": lots })).into_response())
}

#[derive(Deserialize)]
struct LotBody {
    lot: String,
    gtin: String,
    expiry: String,
}

async fn add_lot(State(state): State<AppState>, bytes: Result<Bytes, BytesRejection>) -> ApiResult {
    let lot: LotBody = body(bytes)?;
    let lot = validate_lot(&state.catalogue, &lot.lot, &lot.gtin, &lot.expiry)?;
    let lot = state.writer.call(|reply| Command::PutLot(lot, reply)).await?;
    Ok((StatusCode::CREATED, Json(lot)).into_response())
}

/// Checks a lot registration against the catalogue.
pub fn validate_lot(catalogue: &Catalogue, lot: &str, gtin: &str, expiry: &str) -> Result<Lot, Problem> {
    let lot = lot.trim();
    let lot_ok = (1..=20).contains(&lot.len()) && lot.chars().all(|c| c.is_ascii_graphic());
    if !lot_ok {
        return Err(Problem::bad_field(
            "lot",
            "lot must be 1–20 printable ASCII characters",
            "ロット番号は半角英数記号1〜20文字です",
        ));
    }
    let gtin: Gtin = gtin.trim().parse().map_err(|e: protocol::gs1::GtinError| {
        Problem::bad_field("gtin", format!("gtin: {e}"), format!("GTIN: {}", e.message_ja()))
    })?;
    if catalogue.product(&gtin).is_none() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "product_unknown",
            Some("gtin"),
            format!("GTIN {gtin} is not in the catalogue"),
            format!("GTIN {gtin} はワクチン一覧にありません"),
        ));
    }
    let expiry = parse_date_field("expiry", expiry.trim())?;
    Ok(Lot { lot: lot.to_owned(), gtin, expiry })
}

async fn catalogue(State(state): State<AppState>) -> Json<Catalogue> {
    Json((*state.catalogue).clone())
}

#[derive(Deserialize)]
struct ChangesQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn changes(State(state): State<AppState>, Query(query): Query<ChangesQuery>) -> ApiResult {
    let limit = query.limit.unwrap_or(1000).clamp(1, 10_000);
    let changes = state
        .store
        .read()
        .and_then(|v| v.changes_since(query.since, limit))
        .map_err(|e| Problem::internal(&e))?;
    let last = changes.last().map(|(seq, _)| *seq).unwrap_or(query.since);
    let entries: Vec<_> =
        changes.into_iter().map(|(seq, id)| json!({"seq": seq, "resident_id": id})).collect();
    Ok(Json(json!({ "changes": entries, "last_seq": last })).into_response())
}

/// The method of a route spec as an axum `Method`.
pub fn method_of(spec: &RouteSpec) -> Method {
    Method::from_bytes(spec.method.as_bytes()).unwrap_or(Method::GET)
}
