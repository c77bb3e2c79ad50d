//! The HTTP API (axum). Every route is listed once in [`ROUTES`]; the router, the OpenAPI
//! document and the route tests are all built from that table, so a route cannot exist
//! without being documented and tested.
//!
//! Errors are RFC 9457 problem+json: `title` in Japanese unless `Accept-Language` prefers
//! English, both languages in `detail_ja` / `detail_en`, the field at fault in `field`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use std::net::IpAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use protocol::catalogue::{Catalogue, Lot};
use protocol::coupon::{CouponNumber, OwnKeyCheck, PrintedCheck, ScannedCoupon};
use protocol::document::{CouponStatus, ResidentRecord, coupon_key};
use protocol::gs1::{Gtin, parse_vial_barcode};
use protocol::municipality::MunicipalityCode;
use protocol::validation::{Amendment, authenticate_coupon, authenticate_coupon_with, decode_scans};
use serde::Deserialize;
use serde_json::json;
use time::{Date, OffsetDateTime};

use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{self, AuthPolicy, Principal, RateLimiter, Role};
use crate::clock::new_id;
use crate::problem::{Problem, prefers_english};
use crate::store::{IDX_ATENA, IDX_COUPON, IDX_PERSON, Store};
use crate::tls::PeerAddr;
use crate::writer::{CaptureCommand, Command, Who, WriterHandle};

/// What every handler shares (behind an `Arc` once the router is built).
#[derive(Clone)]
pub struct AppState {
    /// The store (reads).
    pub store: Arc<Store>,
    /// The writer (all writes, and audit entries).
    pub writer: WriterHandle,
    /// This node's municipality.
    pub municipality: MunicipalityCode,
    /// The public key that verifies this municipality's coupons.
    pub coupon_public_key: Vec<u8>,
    /// The vaccine catalogue.
    pub catalogue: Arc<Catalogue>,
    /// Signs coupon QR texts for printing at the desk (a municipal node's coupon key;
    /// `None` on a standby or terminal).
    pub coupon_signer: Option<Arc<ring::signature::Ed25519KeyPair>>,
    /// Signs audit exports.
    pub audit: Arc<AuditLog>,
    /// Login, session and rate-limit rules.
    pub policy: Arc<AuthPolicy>,
    /// Login attempts per client address.
    pub login_limiter: Arc<RateLimiter>,
    /// Requests to routes without login, per client address.
    pub public_limiter: Arc<RateLimiter>,
    /// Served over HTTPS (adds `Strict-Transport-Security`).
    pub https: bool,
    /// A terminal's runtime (`None` on a municipal node).
    pub terminal: Option<Arc<crate::terminal::TerminalRuntime>>,
    /// The address terminals dial (`/…/p2p/<peer id>`), when this node serves terminals.
    pub p2p_address: Option<String>,
    /// Relocation handoffs (a municipal primary in a federation).
    pub handoffs: Option<Arc<crate::handoff::HandoffService>>,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// Anyone, without a credential: nothing personal behind it.
    Public,
    /// Any valid credential of this municipality.
    AnyRole,
    /// Only these roles.
    Roles(&'static [Role]),
}

impl Access {
    /// Whether `role` passes.
    pub fn allows(self, role: Role) -> bool {
        match self {
            Access::Public => true,
            Access::AnyRole => !role.is_national(),
            Access::Roles(roles) => roles.contains(&role),
        }
    }
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    /// HTTP method.
    pub method: &'static str,
    /// Path, with `{param}` segments.
    pub path: &'static str,
    /// Who may call it: the authorization table is this column.
    pub access: Access,
    /// What it does, in Japanese.
    pub summary_ja: &'static str,
    /// What it does, in English.
    pub summary_en: &'static str,
}

impl RouteSpec {
    /// Reachable without a credential.
    pub fn is_public(&self) -> bool {
        matches!(self.access, Access::Public)
    }
}

const fn route(
    method: &'static str,
    path: &'static str,
    access: Access,
    summary_ja: &'static str,
    summary_en: &'static str,
) -> RouteSpec {
    RouteSpec { method, path, access, summary_ja, summary_en }
}

use Role::{Auditor, CallCentre, Clerk, MunicipalAdmin, VenueOperator};
const ADMIN: Access = Access::Roles(&[MunicipalAdmin]);
const STAFF: Access = Access::Roles(&[MunicipalAdmin, Clerk]);
const LOOKUP: Access = Access::Roles(&[MunicipalAdmin, Clerk, CallCentre]);
const RECORD: Access = Access::Roles(&[MunicipalAdmin, Clerk, VenueOperator]);
const COUNTS: Access = Access::Roles(&[MunicipalAdmin, Clerk, CallCentre, Auditor]);
const AUDIT: Access = Access::Roles(&[Auditor]);

/// Every route the node serves, with who may call it.
pub const ROUTES: &[RouteSpec] = &[
    route("GET", "/healthz", Access::Public, "稼働確認", "Liveness check"),
    route("GET", "/", Access::Public, "画面（/ui/）へ移動", "Redirects to the web UI (/ui/)"),
    route("GET", "/ui/", Access::Public, "職員用画面", "The staff's web UI"),
    route(
        "GET",
        "/ui/{file}",
        Access::Public,
        "職員用画面のスクリプトとスタイル",
        "The web UI's script and style",
    ),
    route(
        "GET",
        "/api/openapi.json",
        Access::Public,
        "この API の OpenAPI 定義",
        "This API's OpenAPI document",
    ),
    route(
        "POST",
        "/api/v1/auth/login",
        Access::Public,
        "ログイン（セッション発行）",
        "Log in: open a session",
    ),
    route(
        "POST",
        "/api/v1/auth/logout",
        Access::AnyRole,
        "ログアウト（セッション終了）",
        "Log out: end the session",
    ),
    route("GET", "/api/v1/auth/me", Access::AnyRole, "ログイン中の利用者と役割", "The caller and its role"),
    route("GET", "/api/v1/status", COUNTS, "ノードの件数と状態", "Node counts and status"),
    route(
        "POST",
        "/api/v1/captures",
        RECORD,
        "接種の記録（接種券QRとワクチンのバーコードの読み取り文字列）",
        "Record a vaccination from the scanned coupon and vial texts",
    ),
    route(
        "GET",
        "/api/v1/residents",
        LOOKUP,
        "住民の検索（宛名番号・券番号・カナ）",
        "Search residents by atena number, coupon number or kana",
    ),
    route(
        "GET",
        "/api/v1/residents/{resident_id}",
        LOOKUP,
        "住民の記録と接種歴",
        "A resident's record and history",
    ),
    route(
        "POST",
        "/api/v1/residents/{resident_id}/doses/{event_id}/void",
        STAFF,
        "接種記録の取消（理由必須）",
        "Void a dose event (reason required)",
    ),
    route(
        "POST",
        "/api/v1/residents/{resident_id}/doses/{event_id}/amend",
        STAFF,
        "接種記録の訂正（理由必須）",
        "Amend a dose event (reason required)",
    ),
    route(
        "POST",
        "/api/v1/residents/{resident_id}/move-out",
        ADMIN,
        "転出：住民の記録を転出先へ引き継ぐ（暗号化して全国ノード経由）",
        "Move a resident out: hand their record, sealed, to the new municipality",
    ),
    route(
        "GET",
        "/api/v1/handoffs",
        ADMIN,
        "転出・転入の引き継ぎ一覧",
        "Relocation handoffs sent, received and asked for",
    ),
    route(
        "POST",
        "/api/v1/handoffs/requests",
        ADMIN,
        "転入：個人番号で前住所地に接種歴を求める",
        "Register a newcomer and ask the federation for their history",
    ),
    route(
        "POST",
        "/api/v1/handoffs/{handoff_id}/accept",
        ADMIN,
        "受け取った引き継ぎを受け入れる（住民登録・次回接種券の発行）",
        "Accept a received handoff (creates the resident, issues the next coupon)",
    ),
    route(
        "POST",
        "/api/v1/handoffs/{handoff_id}/return",
        ADMIN,
        "受け入れられない引き継ぎを転出元へ差し戻す（理由コード付き）",
        "Send a received handoff back to its sender, with a reason code",
    ),
    route(
        "GET",
        "/api/v1/coupons/{coupon_number}/qr",
        LOOKUP,
        "有効な接種券のQRコード画像（窓口での印刷用）",
        "The valid coupon's QR code as a PNG image (to print at the desk)",
    ),
    route(
        "POST",
        "/api/v1/coupons/{coupon_number}/reissue",
        LOOKUP,
        "接種券の再発行（旧版は無効）",
        "Reissue a coupon (the old generation is superseded)",
    ),
    route(
        "POST",
        "/api/v1/coupons/{coupon_number}/revoke",
        STAFF,
        "接種券の取消（理由必須）",
        "Revoke a coupon (reason required)",
    ),
    route("GET", "/api/v1/lots", RECORD, "登録済みロットの一覧", "Registered lots"),
    route("GET", "/api/v1/venues", Access::AnyRole, "接種会場の一覧", "The municipality's venues"),
    route(
        "GET",
        "/api/v1/stock",
        Access::AnyRole,
        "会場ごとの在庫（配分・納入・使用・廃棄）と残日数",
        "Stock per venue (allocated, delivered, used, wasted) and days of supply",
    ),
    route(
        "POST",
        "/api/v1/stock/entries",
        RECORD,
        "在庫の記録（会場への配分は管理者、納入・廃棄は会場担当も）",
        "Record stock: allocation to a venue (administrators), delivery or wastage",
    ),
    route(
        "POST",
        "/api/v1/venues/{venue}",
        ADMIN,
        "接種会場の登録・更新（国の公開一覧に掲載）",
        "Add or change a venue (published in the national public listing)",
    ),
    route(
        "GET",
        "/api/v1/statistics/daily",
        COUNTS,
        "接種日ごとの集計（国へ報告する内容）と未送信の件数",
        "A vaccination date's figures as reported to the national node, and what is not yet sent",
    ),
    route("POST", "/api/v1/lots", STAFF, "ロットの登録", "Register a lot"),
    route("GET", "/api/v1/catalogue", Access::AnyRole, "ワクチン製品一覧", "Vaccine catalogue"),
    route(
        "GET",
        "/api/v1/municipalities",
        Access::AnyRole,
        "全国の市区町村（コード・名称・都道府県）",
        "Every municipality of Japan: code, name, prefecture",
    ),
    route("GET", "/api/v1/changes", ADMIN, "変更フィード（複製用）", "Change feed (for replication)"),
    route("GET", "/api/v1/users", ADMIN, "利用者の一覧", "List users"),
    route("POST", "/api/v1/users", ADMIN, "利用者の追加", "Add a user"),
    route(
        "POST",
        "/api/v1/users/{username}/disable",
        ADMIN,
        "利用者の停止・再開",
        "Disable or re-enable a user",
    ),
    route(
        "POST",
        "/api/v1/users/{username}/reset-password",
        ADMIN,
        "パスワードの再設定（全セッション終了）",
        "Reset a password (ends every session of the user)",
    ),
    route("GET", "/api/v1/tokens", ADMIN, "APIトークンの一覧", "List API tokens"),
    route(
        "POST",
        "/api/v1/tokens",
        ADMIN,
        "APIトークンの発行（端末・連携用）",
        "Issue an API token (terminals, integrations)",
    ),
    route("POST", "/api/v1/tokens/{name}/revoke", ADMIN, "APIトークンの失効", "Revoke an API token"),
    route(
        "GET",
        "/api/v1/terminals",
        ADMIN,
        "会場端末と登録トークンの一覧",
        "Venue terminals and enrolment tokens",
    ),
    route(
        "POST",
        "/api/v1/terminals/enrolments",
        ADMIN,
        "会場端末の登録トークン発行（一度だけ表示）",
        "Issue a one-time enrolment token for a venue terminal",
    ),
    route(
        "POST",
        "/api/v1/terminals/{peer_id}/revoke",
        ADMIN,
        "会場端末の取消（接続を拒否）",
        "Revoke a venue terminal (its connection is refused)",
    ),
    route("GET", "/api/v1/audit", AUDIT, "監査ログの閲覧", "Read the audit log"),
    route(
        "GET",
        "/api/v1/audit/verify",
        AUDIT,
        "監査ログの検証",
        "Verify the audit log's chain and checkpoints",
    ),
    route(
        "GET",
        "/api/v1/audit/export",
        AUDIT,
        "監査ログの出力（署名付き、オフライン検証用）",
        "Export the audit log, sealed, for offline verification",
    ),
];

/// The routes a venue terminal serves: login, its own accounts and audit log, capture,
/// its status and its capture log. Nothing about residents: a terminal holds none.
pub fn terminal_routes() -> &'static [RouteSpec] {
    static ROUTES_OF_TERMINAL: std::sync::LazyLock<Vec<RouteSpec>> = std::sync::LazyLock::new(|| {
        let mut routes: Vec<RouteSpec> = ROUTES
            .iter()
            .filter(|r| {
                !r.path.starts_with("/api/v1/residents")
                    && !r.path.starts_with("/api/v1/coupons")
                    && !r.path.starts_with("/api/v1/lots")
                    && r.path != "/api/v1/changes"
                    && !r.path.starts_with("/api/v1/statistics")
                    && !r.path.starts_with("/api/v1/venues")
                    && !r.path.starts_with("/api/v1/stock")
                    && !r.path.starts_with("/api/v1/terminals")
            })
            .copied()
            .collect();
        routes.push(route(
            "GET",
            "/api/v1/terminal/captures",
            RECORD,
            "この端末の記録一覧と送信状態",
            "This terminal's captures and their sync state",
        ));
        routes
    });
    &ROUTES_OF_TERMINAL
}

fn handler_for(spec: &RouteSpec) -> MethodRouter<Arc<AppState>> {
    match (spec.method, spec.path) {
        ("GET", "/healthz") => get(healthz),
        ("GET", "/") => get(|| async { Redirect::to("/ui/") }),
        ("GET", "/ui/") => get(|| async { ui_asset("") }),
        ("GET", "/ui/{file}") => get(|Path(file): Path<String>| async move { ui_asset(&file) }),
        ("GET", "/api/openapi.json") => get(openapi),
        ("POST", "/api/v1/auth/login") => post(login),
        ("POST", "/api/v1/auth/logout") => post(logout),
        ("GET", "/api/v1/auth/me") => get(me),
        ("GET", "/api/v1/status") => get(status),
        ("POST", "/api/v1/captures") => post(capture),
        ("GET", "/api/v1/residents") => get(search_residents),
        ("GET", "/api/v1/residents/{resident_id}") => get(resident),
        ("POST", "/api/v1/residents/{resident_id}/doses/{event_id}/void") => post(void_dose),
        ("POST", "/api/v1/residents/{resident_id}/doses/{event_id}/amend") => post(amend_dose),
        ("POST", "/api/v1/residents/{resident_id}/move-out") => post(move_out),
        ("GET", "/api/v1/handoffs") => get(list_handoffs),
        ("POST", "/api/v1/handoffs/requests") => post(ask_history),
        ("POST", "/api/v1/handoffs/{handoff_id}/accept") => post(accept_handoff),
        ("POST", "/api/v1/handoffs/{handoff_id}/return") => post(return_handoff),
        ("GET", "/api/v1/coupons/{coupon_number}/qr") => get(coupon_qr_image),
        ("POST", "/api/v1/coupons/{coupon_number}/reissue") => post(reissue),
        ("POST", "/api/v1/coupons/{coupon_number}/revoke") => post(revoke),
        ("GET", "/api/v1/lots") => get(list_lots),
        ("GET", "/api/v1/statistics/daily") => get(daily_statistics),
        ("GET", "/api/v1/venues") => get(list_venues),
        ("GET", "/api/v1/stock") => get(stock),
        ("POST", "/api/v1/stock/entries") => post(add_stock_entry),
        ("POST", "/api/v1/venues/{venue}") => post(put_venue),
        ("POST", "/api/v1/lots") => post(add_lot),
        ("GET", "/api/v1/catalogue") => get(catalogue),
        ("GET", "/api/v1/municipalities") => get(municipalities),
        ("GET", "/api/v1/changes") => get(changes),
        ("GET", "/api/v1/users") => get(list_users),
        ("POST", "/api/v1/users") => post(add_user),
        ("POST", "/api/v1/users/{username}/disable") => post(disable_user),
        ("POST", "/api/v1/users/{username}/reset-password") => post(reset_password),
        ("GET", "/api/v1/tokens") => get(list_tokens),
        ("POST", "/api/v1/tokens") => post(add_token),
        ("POST", "/api/v1/tokens/{name}/revoke") => post(revoke_token),
        ("GET", "/api/v1/terminals") => get(list_terminals),
        ("POST", "/api/v1/terminals/enrolments") => post(add_enrolment),
        ("POST", "/api/v1/terminals/{peer_id}/revoke") => post(revoke_terminal),
        ("GET", "/api/v1/audit") => get(audit_entries),
        ("GET", "/api/v1/audit/verify") => get(audit_verify),
        ("GET", "/api/v1/audit/export") => get(audit_export),
        ("GET", "/api/v1/terminal/captures") => get(terminal_captures),
        (method, path) => unreachable!("ROUTES lists {method} {path} without a handler"),
    }
}

/// The router, built from [`ROUTES`] (or [`terminal_routes`] on a terminal).
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let routes = if state.terminal.is_some() { terminal_routes() } else { ROUTES };
    router_from(state, max_body_bytes, routes)
}

/// The router built from any route table. The node uses [`ROUTES`]; the isolation test also
/// builds one from a deliberately weakened copy to show that it notices a missing guard.
/// Every route goes through [`guard`]; nothing is added to the router outside this loop.
pub fn router_from(state: AppState, max_body_bytes: usize, routes: &'static [RouteSpec]) -> Router {
    // Behind one pointer: axum hands every layer a request passes through its own copy.
    let state = Arc::new(state);
    let mut router = Router::new();
    for spec in routes {
        let guarded =
            handler_for(spec).route_layer(middleware::from_fn_with_state((state.clone(), spec), guard));
        router = router.route(spec.path, guarded);
    }
    router
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "no_route", None, "no such route", "そのURLはありません")
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), request_context))
        .with_state(state)
}

/// The id of one request, echoed in `x-request-id` and written into audit entries.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The client's address (unspecified when served without one, as in tests).
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

/// The client's address, when the server knows it.
fn client_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |info| info.0.0.ip())
}

/// Outermost layer: request id, security headers, problems in the caller's language.
async fn request_context(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    with_request_context(request, next, state.https).await
}

/// Gives a request its id and its response the problem language asked for, the request id
/// and the security headers (shared by the municipal and the national API).
pub(crate) async fn with_request_context(mut request: Request, next: Next, https: bool) -> Response {
    let request_id = RequestId(new_id("req"));
    request.extensions_mut().insert(request_id.clone());
    let english = prefers_english(request.headers());
    let mut response = next.run(request).await;
    if english && let Some(problem) = response.extensions().get::<Problem>().cloned() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        let original = response.headers().clone();
        response = problem.into_response_for(&headers);
        if let Some(retry) = original.get(header::RETRY_AFTER) {
            response.headers_mut().insert(header::RETRY_AFTER, retry.clone());
        }
    }
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id.0) {
        headers.insert("x-request-id", value);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The UI's files set their own policy (their own script and style); every other answer
    // may load nothing.
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        );
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if https {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    response
}

/// The credential a request presents: `Authorization: Bearer …`, else the session cookie.
pub(crate) fn presented_credential(headers: &HeaderMap) -> Option<(String, bool)> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return value.strip_prefix("Bearer ").map(|t| (t.trim().to_owned(), false));
    }
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some(token) = pair.trim().strip_prefix(concat!("vrs_session", "=")) {
                return Some((token.to_owned(), true));
            }
        }
    }
    None
}

pub(crate) fn too_many(wait: std::time::Duration) -> Response {
    let mut response = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        None,
        "too many requests; wait and try again",
        "リクエストが多すぎます。しばらく待ってから再試行してください",
    )
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&(wait.as_secs() + 1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// The digest kept when this node printed a coupon generation; a store that cannot be read
/// here only costs the check its shortcut (the coupon is signed again), so it is logged.
fn printed_digest(store: &Store, coupon_key: &str) -> Option<[u8; 16]> {
    match store.read().and_then(|view| view.printed(coupon_key)) {
        Ok(printed) => printed,
        Err(error) => {
            tracing::warn!(%coupon_key, error = %format!("{error:#}"), "printed digest unreadable");
            None
        }
    }
}

/// Records a refusal in the audit log; the refusal stands even if that write fails.
async fn audit_refusal(state: &AppState, who: &Who, action: &str, subject: String, outcome: &str) {
    let event = AuditEvent {
        actor: who.actor.clone(),
        role: who.role.clone(),
        action: action.to_owned(),
        subject,
        outcome: outcome.to_owned(),
        request_id: who.request_id.clone(),
    };
    if let Err(problem) = state.writer.call(who, |reply| Command::Audit(vec![event], reply)).await {
        tracing::error!(code = %problem.code, "could not audit a refusal");
    }
}

/// The per-route check: the authorization table applied to the presented credential.
async fn guard(
    State((state, spec)): State<(Arc<AppState>, &'static RouteSpec)>,
    mut request: Request,
    next: Next,
) -> Response {
    let ip = client_ip(&request);
    request.extensions_mut().insert(ClientIp(ip));
    let request_id = request.extensions().get::<RequestId>().map_or_else(|| "-".to_owned(), |r| r.0.clone());
    let anonymous =
        Who { actor: format!("anonymous@{ip}"), role: "-".into(), request_id: request_id.clone() };
    if spec.is_public() {
        if let Err(wait) = state.public_limiter.check(ip) {
            return too_many(wait);
        }
        request.extensions_mut().insert(anonymous);
        return next.run(request).await;
    }
    let subject = format!("route:{} {}", spec.method, spec.path);
    let Some((token, via_cookie)) = presented_credential(request.headers()) else {
        if let Err(wait) = state.public_limiter.check(ip) {
            return too_many(wait);
        }
        audit_refusal(&state, &anonymous, "authorize", subject, "denied:unauthenticated").await;
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            None,
            "log in first, or send an API token (Authorization: Bearer)",
            "ログインが必要です（またはAPIトークンを Authorization: Bearer で送信）",
        )
        .into_response();
    };
    let principal = match state
        .store
        .read()
        .and_then(|view| auth::authenticate(view.txn(), &token, OffsetDateTime::now_utc()))
    {
        Ok(principal) => principal,
        Err(error) => return Problem::internal(&error).into_response(),
    };
    let Some(principal) = principal.filter(|p| p.municipality == state.municipality) else {
        if let Err(wait) = state.public_limiter.check(ip) {
            return too_many(wait);
        }
        audit_refusal(&state, &anonymous, "authorize", subject, "denied:invalid_credential").await;
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credential",
            None,
            "the credential is unknown, expired or revoked",
            "認証情報が無効です（不明・期限切れ・失効）",
        )
        .into_response();
    };
    let who = Who { actor: principal.actor(), role: principal.role.as_str().into(), request_id };
    if !spec.access.allows(principal.role) {
        audit_refusal(&state, &who, "authorize", subject, "denied:forbidden").await;
        return Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            None,
            format!("the role {} may not do this", principal.role.as_str()),
            format!("{}の役割ではこの操作はできません", principal.role.label_ja()),
        )
        .into_response();
    }
    let unsafe_method = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if via_cookie && unsafe_method {
        let sent = request.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
        let expected = principal.csrf_token.as_deref().unwrap_or("");
        if expected.is_empty() || !constant_time_eq(sent.as_bytes(), expected.as_bytes()) {
            audit_refusal(&state, &who, "authorize", subject, "denied:csrf").await;
            return Problem::new(
                StatusCode::FORBIDDEN,
                "csrf",
                Some("x-csrf-token"),
                "a write with the session cookie needs the session's X-CSRF-Token header",
                "Cookie による書き込みには X-CSRF-Token ヘッダーが必要です",
            )
            .into_response();
        }
    }
    request.extensions_mut().insert(who);
    request.extensions_mut().insert(principal);
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes one audit entry per record read, durably, before the data is answered.
async fn audit_reads(
    state: &AppState,
    who: &Who,
    action: &str,
    subjects: Vec<String>,
) -> Result<(), Problem> {
    let events: Vec<AuditEvent> = subjects
        .into_iter()
        .map(|subject| AuditEvent {
            actor: who.actor.clone(),
            role: who.role.clone(),
            action: action.to_owned(),
            subject,
            outcome: "ok".into(),
            request_id: who.request_id.clone(),
        })
        .collect();
    state.writer.call(who, |reply| Command::Audit(events, reply)).await
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

/// A file of the web UI (`admin-ui`), with the policy that lets it run its own script only.
fn ui_asset(name: &str) -> Response {
    serve_asset(admin_ui::asset(name))
}

/// A file of a web UI (the staff's or the national node's), or `404` if there is none.
pub(crate) fn serve_asset(asset: Option<&'static admin_ui::Asset>) -> Response {
    let Some(asset) = asset else {
        return Problem::new(StatusCode::NOT_FOUND, "no_route", None, "no such route", "そのURLはありません")
            .into_response();
    };
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers
        .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(admin_ui::CONTENT_SECURITY_POLICY));
    response
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
        if !spec.is_public() {
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

async fn status(State(state): State<Arc<AppState>>) -> ApiResult {
    if let Some(terminal) = &state.terminal {
        return Ok(Json(terminal.status().map_err(|e| Problem::internal(&e))?).into_response());
    }
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let counts = (|| -> anyhow::Result<serde_json::Value> {
        Ok(json!({
            "municipality": state.municipality,
            "residents": view.n_residents()?,
            "coupons": view.n_coupons()?,
            "dose_events": view.n_dose_events()?,
            "change_seq": view.meta(crate::store::META_CHANGE_SEQ)?,
            "terminals": view.count(crate::store::TERMINALS)?,
            "blocked_coupons": view.count(crate::store::BLOCKED_COUPONS)?,
            "forward_outbox": view.count(crate::store::FORWARD_OUTBOX)?,
            "replication": {
                "documents_pulled": crate::p2p::PULLED_DOCUMENTS.load(std::sync::atomic::Ordering::Relaxed),
                "bytes_received": crate::p2p::PULLED_BYTES_RECEIVED.load(std::sync::atomic::Ordering::Relaxed),
                "bytes_sent": crate::p2p::PULLED_BYTES_SENT.load(std::sync::atomic::Ordering::Relaxed),
                "requests": crate::p2p::PULL_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
            },
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

pub(crate) fn parse_date_field(field: &str, text: &str) -> Result<Date, Problem> {
    Date::parse(text, &time::format_description::well_known::Iso8601::DATE).map_err(|_| {
        Problem::bad_field(
            field,
            format!("{field}: {text:?} is not a date (YYYY-MM-DD)"),
            format!("{field}: 「{text}」は日付（YYYY-MM-DD）ではありません"),
        )
    })
}

/// Checks an id-like field (venue, event id): 1–128 characters of A–Z, a–z, 0–9, `-_.`.
pub fn check_id_field(field: &str, value: &str) -> Result<(), Problem> {
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
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Extension(who): Extension<Who>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let recorded_by = principal.actor();
    let capture: CaptureBody = body(bytes)?;
    check_id_field("venue", &capture.venue)?;
    if principal.role == Role::VenueOperator && !principal.venues.contains(&capture.venue) {
        audit_refusal(&state, &who, "capture", format!("venue:{}", capture.venue), "denied:venue").await;
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "venue_not_allowed",
            Some("venue"),
            format!("this credential records for {:?} only, not {}", principal.venues, capture.venue),
            format!(
                "この認証情報で記録できる会場は {} だけです（{} は不可）",
                principal.venues.join("・"),
                capture.venue
            ),
        ));
    }
    if let Some(event_id) = &capture.event_id {
        check_id_field("event_id", event_id)?;
    }
    let vaccinated_on = match &capture.vaccinated_on {
        Some(text) => Some(parse_date_field("vaccinated_on", text)?),
        None => None,
    };
    if let Some(terminal) = &state.terminal {
        let scan = crate::terminal::Scan {
            coupon: capture.coupon,
            vial: capture.vial,
            vaccinated_on,
            venue: capture.venue.clone(),
            event_id: capture.event_id,
            recorded_by,
        };
        let result = terminal.capture(&state.writer, &who, scan).await;
        return match result {
            Ok((code, value)) => Ok((code, Json(value)).into_response()),
            Err(problem) => {
                if problem.status != StatusCode::INTERNAL_SERVER_ERROR {
                    let outcome = format!("refused:{}", problem.code);
                    audit_refusal(&state, &who, "capture", format!("venue:{}", capture.venue), &outcome)
                        .await;
                }
                Err(problem)
            }
        };
    }
    let own = state.municipality;
    let key = state.coupon_public_key.clone();
    let scanned = decode_scans(&capture.coupon, &capture.vial).and_then(|scans| {
        let signing_key = |code| (code == own).then(|| key.clone());
        match &state.coupon_signer {
            // The node signed its coupons itself: one it printed is checked against the
            // digest of what it printed, any other signed again (half the cost of verifying).
            Some(signer) => {
                let printed = match &scans.coupon {
                    ScannedCoupon::Signed(signed) if signed.code.municipality == own => {
                        printed_digest(&state.store, &coupon_key(&signed.code, signed.generation))
                    }
                    _ => None,
                };
                let check = PrintedCheck::new(&key, printed, OwnKeyCheck::new(signer));
                authenticate_coupon_with(&scans.coupon, signing_key, &check)
            }
            None => authenticate_coupon(&scans.coupon, signing_key),
        }
        .map(|_| scans)
    });
    let scans = match scanned {
        Ok(scans) => scans,
        Err(refusal) => {
            // A forged or mistyped coupon is refused before the writer: audit it here.
            let outcome = format!("refused:{}", refusal.code());
            audit_refusal(&state, &who, "capture", format!("venue:{}", capture.venue), &outcome).await;
            return Err(refusal.into());
        }
    };
    let command = Box::new(CaptureCommand {
        scans,
        vaccinated_on,
        venue: capture.venue,
        event_id: capture.event_id,
        recorded_by,
        captured_at: None,
        forwarded_lot: None,
        transferred_from: None,
        preloaded: None,
        passed_on_if_moved: false,
    });
    let command = state.writer.read_ahead(&state.store, command).await?;
    let outcome = state.writer.call(&who, |reply| Command::Capture(command, reply)).await?;
    let code = if outcome.replay { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(outcome)).into_response())
}

async fn terminal_captures(State(state): State<Arc<AppState>>, Extension(who): Extension<Who>) -> ApiResult {
    let Some(terminal) = &state.terminal else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "no_route",
            None,
            "no such route",
            "そのURLはありません",
        ));
    };
    let log = terminal.log(500).map_err(|e| Problem::internal(&e))?;
    audit_reads(&state, &who, "terminal.captures.read", vec![format!("venue:{}", terminal.venue)]).await?;
    Ok(Json(json!({ "captures": log })).into_response())
}

#[derive(Deserialize)]
struct SearchQuery {
    atena: Option<String>,
    coupon: Option<String>,
    kana: Option<String>,
    person_key: Option<String>,
}

async fn search_residents(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Query(query): Query<SearchQuery>,
) -> ApiResult {
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
    let mut subjects = Vec::new();
    for id in ids {
        if let Some(record) = view.record(&id).map_err(|e| Problem::internal(&e))? {
            subjects.push(format!("resident:{}", record.resident_id));
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
    if subjects.is_empty() {
        subjects.push("resident:none".into());
    }
    audit_reads(&state, &who, "resident.search", subjects).await?;
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
        "transfer": record.transfer,
        "returns": record.returns,
    })
}

async fn resident(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(resident_id): Path<String>,
) -> ApiResult {
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let found = view.record_and_heads(&resident_id).map_err(|e| Problem::internal(&e))?;
    let Some((record, heads)) = found else {
        audit_refusal(&state, &who, "resident.read", format!("resident:{resident_id}"), "refused:not_found")
            .await;
        return Err(Problem::not_found("resident", "住民", &resident_id));
    };
    audit_reads(&state, &who, "resident.read", vec![format!("resident:{}", record.resident_id)]).await?;
    let mut view = resident_view(&record);
    view["heads"] = json!(heads);
    Ok(Json(view).into_response())
}

fn handoffs(state: &AppState) -> Result<Arc<crate::handoff::HandoffService>, Problem> {
    state.handoffs.clone().ok_or_else(|| {
        Problem::new(
            StatusCode::CONFLICT,
            "not_in_federation",
            None,
            "this node is not a municipal primary in a federation; handoffs go through the national node",
            "この本番系ノードは連携（全国ノード）に参加していないため、引き継ぎできません",
        )
    })
}

fn municipality_field(field: &str, text: &str) -> Result<MunicipalityCode, Problem> {
    MunicipalityCode::parse(text.trim()).ok().filter(|code| code.is_known()).ok_or_else(|| {
        Problem::bad_field(
            field,
            format!("{text:?} is not a municipality code"),
            format!("{text} は市区町村コードではありません"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveOutBody {
    to: String,
    reason: String,
}

async fn move_out(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(resident_id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let service = handoffs(&state)?;
    let MoveOutBody { to, reason } = body(bytes)?;
    let to = municipality_field("to", &to)?;
    let mut entry = service.move_out(&who, &resident_id, to, &reason).await?;
    entry.sealed = None;
    Ok((StatusCode::CREATED, Json(entry)).into_response())
}

async fn list_handoffs(State(state): State<Arc<AppState>>, Extension(who): Extension<Who>) -> ApiResult {
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let internal = |e: anyhow::Error| Problem::internal(&e);
    let mut outgoing: Vec<crate::handoff::OutEntry> =
        view.all(crate::store::HANDOFF_OUT).map_err(internal)?.into_iter().map(|(_, e)| e).collect();
    let mut incoming: Vec<crate::handoff::InEntry> =
        view.all(crate::store::HANDOFF_IN).map_err(internal)?.into_iter().map(|(_, e)| e).collect();
    let asks: Vec<crate::handoff::AskEntry> =
        view.all(crate::store::HANDOFF_ASKS).map_err(internal)?.into_iter().map(|(_, e)| e).collect();
    drop(view);
    outgoing.iter_mut().for_each(|e| e.sealed = None);
    incoming.iter_mut().for_each(|e| e.sealed = None);
    outgoing.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    incoming.sort_by(|a, b| a.received_at.cmp(&b.received_at));
    let subjects: Vec<String> = outgoing
        .iter()
        .map(|e| format!("resident:{}", e.resident_id))
        .chain(incoming.iter().map(|e| match &e.resident_id {
            Some(id) => format!("resident:{id}"),
            None => format!("person:{}", e.person_key),
        }))
        .chain(asks.iter().map(|a| format!("person:{}", a.person_key)))
        .collect();
    if !subjects.is_empty() {
        audit_reads(&state, &who, "handoff.list", subjects).await?;
    }
    Ok(Json(json!({ "outgoing": outgoing, "incoming": incoming, "asks": asks })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    my_number: String,
    birth_date: String,
    atena_number: String,
    address: String,
    #[serde(default)]
    previous: Option<String>,
}

async fn ask_history(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let service = handoffs(&state)?;
    let ask: AskBody = body(bytes)?;
    let previous = match ask.previous.as_deref().filter(|p| !p.trim().is_empty()) {
        Some(text) => Some(municipality_field("previous", text)?),
        None => None,
    };
    let birth_date = parse_date_field("birth_date", &ask.birth_date)?;
    let entry =
        service.ask(&who, &ask.my_number, birth_date, &ask.atena_number, &ask.address, previous).await?;
    Ok((StatusCode::ACCEPTED, Json(entry)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AcceptBody {
    #[serde(default)]
    atena_number: Option<String>,
    #[serde(default)]
    address: Option<String>,
}

async fn accept_handoff(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(handoff_id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let service = handoffs(&state)?;
    let accept: AcceptBody = match &bytes {
        Ok(b) if b.is_empty() => AcceptBody::default(),
        _ => body(bytes)?,
    };
    if let Some(atena) = &accept.atena_number
        && (atena.is_empty()
            || atena.len() > 20
            || !atena.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return Err(Problem::bad_field(
            "atena_number",
            "atena number must be 1–20 ASCII letters or digits",
            "宛名番号は1〜20桁の英数字です",
        ));
    }
    if accept.address.as_ref().is_some_and(|a| a.trim().is_empty() || a.chars().count() > 200) {
        return Err(Problem::bad_field("address", "an address of 1–200 characters", "住所は1〜200文字です"));
    }
    let mut entry = service.accept(&who, &handoff_id, accept.atena_number, accept.address).await?;
    entry.sealed = None;
    Ok(Json(entry).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReturnBody {
    reason: String,
    #[serde(default)]
    note: Option<String>,
}

async fn return_handoff(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(handoff_id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let service = handoffs(&state)?;
    let back: ReturnBody = body(bytes)?;
    let Some(reason) = protocol::handoff::ReturnReason::from_code(back.reason.trim()) else {
        let codes: Vec<&str> = protocol::handoff::ReturnReason::ALL.iter().map(|r| r.code()).collect();
        return Err(Problem::bad_field(
            "reason",
            format!("reason must be one of {}", codes.join(", ")),
            format!("差し戻し理由は次のいずれかです: {}", codes.join(", ")),
        ));
    };
    if back.note.as_ref().is_some_and(|n| n.chars().count() > 500) {
        return Err(Problem::bad_field("note", "a note of at most 500 characters", "メモは500文字以内です"));
    }
    let mut entry = service.send_back(&who, &handoff_id, reason, back.note).await?;
    entry.sealed = None;
    Ok(Json(entry).into_response())
}

#[derive(Deserialize)]
struct ReasonBody {
    reason: String,
}

async fn void_dose(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path((resident_id, event_id)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let actor = who.actor.clone();
    let ReasonBody { reason } = body(bytes)?;
    let correction = state
        .writer
        .call(&who, |reply| Command::Void { resident_id, event_id, reason, actor, reply })
        .await?;
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
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path((resident_id, event_id)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let actor = who.actor.clone();
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
        .call(&who, |reply| Command::Amend {
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

async fn reissue(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(number): Path<String>,
) -> ApiResult {
    let number = coupon_number(&number)?;
    let outcome = state.writer.call(&who, |reply| Command::Reissue { number, reply }).await?;
    Ok((StatusCode::CREATED, Json(outcome)).into_response())
}

/// `?generation=N`: the generation the page shows, so that what is printed beside the QR
/// code is what the QR code says.
#[derive(Deserialize)]
struct PrintQuery {
    generation: Option<u8>,
}

/// The QR code of a coupon's valid generation, as the print-shop file has it, for a clerk
/// to print after a reissue. Only this municipality's valid coupons of a resident still held
/// here, and only on the node that holds the coupon key (not a standby); each image served
/// is a read of the resident in the audit log.
async fn coupon_qr_image(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(number): Path<String>,
    Query(query): Query<PrintQuery>,
) -> ApiResult {
    let number = coupon_number(&number)?;
    let subject = format!("coupon:{number}");
    let Some(signer) = state.coupon_signer.clone() else {
        audit_refusal(&state, &who, "coupon.qr", subject, "refused:not_printable_here").await;
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_printable_here",
            None,
            "this node does not hold the coupon key (a standby): print coupons at the primary",
            "このノード（待機系）は接種券の鍵を持たないため印刷できません。本番系で印刷してください",
        ));
    };
    let found = (|| -> anyhow::Result<Option<ResidentRecord>> {
        let view = state.store.read()?;
        let Some(id) = view.index(IDX_COUPON, number.as_str())?.into_iter().next() else { return Ok(None) };
        view.record(&id)
    })()
    .map_err(|e| Problem::internal(&e))?;
    let Some(record) = found else {
        audit_refusal(&state, &who, "coupon.qr", subject, "refused:not_found").await;
        return Err(Problem::not_found("coupon", "接種券", number.as_str()));
    };
    let valid = record.coupons.values().find(|c| {
        c.code.number == number
            && c.code.municipality == state.municipality
            && c.status == CouponStatus::Valid
            && query.generation.is_none_or(|g| g == c.generation)
    });
    let (Some(entry), None) = (valid, &record.transfer) else {
        audit_refusal(&state, &who, "coupon.qr", subject, "refused:coupon_not_valid").await;
        let generation = query.generation.map(|g| format!(" (generation {g})")).unwrap_or_default();
        let generation_ja = query.generation.map(|g| format!("（第{g}版）")).unwrap_or_default();
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "coupon_not_valid",
            Some("coupon_number"),
            format!(
                "coupon {number}{generation} is not valid here to print (used, superseded, revoked or moved away)"
            ),
            format!(
                "接種券 {number}{generation_ja} は印刷できる有効な版ではありません（使用済み・再発行済み・失効・転出）"
            ),
        ));
    };
    let (code, generation) = (entry.code, entry.generation);
    audit_reads(&state, &who, "coupon.qr", vec![format!("resident:{}", record.resident_id)]).await?;
    let png = tokio::task::spawn_blocking(move || {
        let text = protocol::coupon::SignedCoupon::sign(code, generation, &signer).to_qr_text();
        crate::issuance::qr_png(&crate::issuance::coupon_qr(&text)?, 6)
    })
    .await
    .map_err(|e| Problem::internal(&anyhow::anyhow!("QR rendering failed: {e}")))?
    .map_err(|e| Problem::internal(&e))?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-store")], png).into_response())
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(number): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let number = coupon_number(&number)?;
    let ReasonBody { reason } = body(bytes)?;
    let entry = state.writer.call(&who, |reply| Command::Revoke { number, reason, reply }).await?;
    Ok(Json(entry).into_response())
}

#[derive(Deserialize)]
struct StockBody {
    kind: crate::statistics::StockKind,
    venue: String,
    product: String,
    doses: u64,
    #[serde(default)]
    reason: String,
}

async fn add_stock_entry(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Extension(principal): Extension<Principal>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    use crate::statistics::{StockEntry, StockKind, check_stock_entry};
    let entry: StockBody = body(bytes)?;
    check_stock_entry(
        entry.kind,
        &entry.venue,
        &entry.product,
        entry.doses,
        &entry.reason,
        &state.catalogue,
    )?;
    if entry.kind == StockKind::Allocation && principal.role != Role::MunicipalAdmin {
        audit_refusal(&state, &who, "stock.allocate", format!("venue:{}", entry.venue), "denied:forbidden")
            .await;
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            Some("kind"),
            "only a municipal administrator allocates doses to venues",
            "会場への配分は市区町村管理者のみ行えます",
        ));
    }
    if principal.role == Role::VenueOperator && !principal.venues.contains(&entry.venue) {
        audit_refusal(&state, &who, "stock.record", format!("venue:{}", entry.venue), "denied:venue").await;
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "venue_not_allowed",
            Some("venue"),
            format!("this credential records for {:?} only, not {}", principal.venues, entry.venue),
            format!(
                "この認証情報で記録できる会場は {} だけです（{} は不可）",
                principal.venues.join("・"),
                entry.venue
            ),
        ));
    }
    let record = StockEntry {
        kind: entry.kind,
        venue: entry.venue,
        product: entry.product,
        doses: entry.doses,
        reason: entry.reason.trim().to_owned(),
        by: who.actor.clone(),
        at: crate::clock::rfc3339(OffsetDateTime::now_utc()),
    };
    let subject = format!("venue:{}", record.venue);
    let stored = state
        .writer
        .call(&who, |reply| Command::Apply {
            action: "stock.record".into(),
            subject,
            op: Box::new(move |txn, _now| {
                let seq = crate::store::bump(txn, crate::store::META_STOCK_SEQ)?;
                crate::store::put_json(txn, crate::store::STOCK, &format!("{seq:020}"), &record)?;
                crate::store::mark_due(txn, "stock")?;
                Ok(Ok(serde_json::to_value(&record)?))
            }),
            reply,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

async fn stock(State(state): State<Arc<AppState>>) -> ApiResult {
    let today = crate::clock::japan_today();
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let ledger = crate::statistics::venue_stock(view.txn()).map_err(|e| Problem::internal(&e))?;
    let mut usage = crate::statistics::venue_usage(view.txn(), today).map_err(|e| Problem::internal(&e))?;
    let mut rows = Vec::new();
    for row in ledger {
        let (used, week) = usage.remove(&(row.venue.clone(), row.product.clone())).unwrap_or_default();
        rows.push(stock_row(&row.venue, &row.product, row.allocated, row.delivered, row.wasted, used, week));
    }
    for ((venue, product), (used, week)) in usage {
        rows.push(stock_row(&venue, &product, 0, 0, 0, used, week));
    }
    Ok(Json(json!({ "as_of": today, "venues": rows })).into_response())
}

/// One venue's stock of one product: on hand is what was delivered less what was used and
/// wasted; days of supply divide it by the last seven days' average use.
fn stock_row(
    venue: &str,
    product: &str,
    allocated: u64,
    delivered: u64,
    wasted: u64,
    used: u64,
    week: u64,
) -> serde_json::Value {
    let on_hand = i128::from(delivered) - i128::from(used) - i128::from(wasted);
    let daily = week as f64 / 7.0;
    let days = (daily > 0.0).then(|| (on_hand.max(0) as f64 / daily * 10.0).round() / 10.0);
    json!({
        "venue": venue, "product": product, "allocated": allocated, "delivered": delivered,
        "used": used, "wasted": wasted, "on_hand": on_hand, "awaiting_delivery": i128::from(allocated) - i128::from(delivered),
        "daily_use_7d": (daily * 10.0).round() / 10.0, "days_of_supply": days,
    })
}

async fn list_venues(State(state): State<Arc<AppState>>) -> ApiResult {
    let venues = state
        .store
        .read()
        .and_then(|v| v.all::<crate::statistics::VenueRecord>(crate::store::VENUES))
        .map_err(|e| Problem::internal(&e))?;
    let venues: Vec<_> = venues.into_iter().map(|(_, record)| record).collect();
    Ok(Json(json!({ "venues": venues })).into_response())
}

async fn put_venue(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(venue): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: crate::statistics::VenueBody = body(bytes)?;
    let record = crate::statistics::check_venue(&venue, body, &state.catalogue)?;
    let stored = state
        .writer
        .call(&who, |reply| Command::Apply {
            action: "venue.put".into(),
            subject: format!("venue:{venue}"),
            op: Box::new(move |txn, _now| {
                crate::store::put_json(txn, crate::store::VENUES, &record.venue.id, &record)?;
                crate::store::mark_due(txn, "venues")?;
                Ok(Ok(serde_json::to_value(&record)?))
            }),
            reply,
        })
        .await?;
    Ok(Json(stored).into_response())
}

#[derive(Deserialize)]
struct DailyQuery {
    date: String,
}

async fn daily_statistics(State(state): State<Arc<AppState>>, Query(query): Query<DailyQuery>) -> ApiResult {
    let date = parse_date_field("date", &query.date)?;
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let doc = crate::statistics::daily(view.txn(), state.municipality, date, 0, String::new())
        .map_err(|e| Problem::internal(&e))?;
    let unsent = view.txn().open_table(crate::store::STATS_DIRTY).and_then(|t| {
        use redb::ReadableTableMetadata;
        Ok(t.len()?)
    });
    let unsent = unsent.map_err(|e| Problem::internal(&anyhow::Error::from(e)))?;
    Ok(Json(json!({ "statistics": doc, "unsent_documents": unsent })).into_response())
}

async fn list_lots(State(state): State<Arc<AppState>>) -> ApiResult {
    let lots = state.store.read().and_then(|v| v.lots()).map_err(|e| Problem::internal(&e))?;
    Ok(Json(json!({ "lots": lots })).into_response())
}

#[derive(Deserialize)]
struct LotBody {
    lot: String,
    gtin: String,
    expiry: String,
}

async fn add_lot(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let lot: LotBody = body(bytes)?;
    let lot = validate_lot(&state.catalogue, &lot.lot, &lot.gtin, &lot.expiry)?;
    let lot = state.writer.call(&who, |reply| Command::PutLot(lot, reply)).await?;
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

async fn catalogue(State(state): State<Arc<AppState>>) -> Json<Catalogue> {
    Json((*state.catalogue).clone())
}

/// The 1,741 municipalities (public data), so that staff see a name beside a code they type
/// or read — a handoff's sender or receiver, a newcomer's former municipality.
async fn municipalities() -> Json<serde_json::Value> {
    Json(json!({ "municipalities": protocol::municipality::all_municipalities() }))
}

#[derive(Deserialize)]
struct ChangesQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn changes(State(state): State<Arc<AppState>>, Query(query): Query<ChangesQuery>) -> ApiResult {
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

fn who_of(request_id: &RequestId, actor: String) -> Who {
    Who { actor, role: "-".into(), request_id: request_id.0.clone() }
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

async fn login(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    if let Err(wait) = state.login_limiter.check(ip) {
        return Ok(too_many(wait));
    }
    let LoginBody { username, password } = body(bytes)?;
    let stored = state
        .store
        .read()
        .and_then(|view| auth::get_user(view.txn(), &username))
        .map_err(|e| Problem::internal(&e))?;
    let hash = stored.as_ref().map_or_else(|| auth::dummy_hash().to_owned(), |u| u.password_hash.clone());
    // argon2id takes tens of milliseconds of CPU: off the async workers.
    let password_ok = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &password))
        .await
        .map_err(|e| Problem::internal(&anyhow::anyhow!("password check failed: {e}")))?
        && stored.is_some();
    let who = who_of(&request_id, format!("anonymous@{ip}"));
    let policy = state.policy.clone();
    let name = username.clone();
    let op: crate::writer::ApplyFn = Box::new(move |txn, now| {
        Ok(match auth::finish_login(txn, &name, password_ok, &policy, now)? {
            Ok(session) => Ok(serde_json::to_value(session)?),
            Err(refusal) => Err(Problem { code: refusal.code().to_owned(), ..refusal.problem() }),
        })
    });
    let outcome = state
        .writer
        .call(&who, |reply| Command::Apply {
            action: "auth.login".into(),
            subject: format!("user:{username}"),
            op,
            reply,
        })
        .await;
    let session = match outcome {
        Ok(session) => session,
        Err(problem) if problem.code == "account_disabled" => {
            return Err(auth::LoginRefusal::Disabled.problem());
        }
        Err(problem) => return Err(problem),
    };
    let token = session["token"].as_str().unwrap_or_default();
    // Secure even on plain HTTP, which the node serves on loopback only: Chromium keeps a
    // Secure cookie for http://127.0.0.1 and localhost (docs/ui.md).
    let cookie = format!(
        "vrs_session={token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        state.policy.session_seconds
    );
    let mut response = Json(&session).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

async fn logout(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Extension(who): Extension<Who>,
) -> ApiResult {
    let digest = principal.credential_digest.clone();
    let is_session = principal.kind == auth::CredentialKind::Session;
    let op: crate::writer::ApplyFn = Box::new(move |txn, _| {
        let ended = is_session && auth::end_session(txn, &digest)?;
        Ok(Ok(json!({ "ended": ended })))
    });
    let subject = principal.actor();
    let answer = state
        .writer
        .call(&who, |reply| Command::Apply { action: "auth.logout".into(), subject, op, reply })
        .await?;
    let mut response = Json(answer).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("vrs_session=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0"),
    );
    Ok(response)
}

async fn me(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
) -> Json<serde_json::Value> {
    Json(json!({
        "actor": principal.actor(),
        "role": principal.role,
        "role_ja": principal.role.label_ja(),
        "municipality": state.municipality,
        "municipality_name": protocol::municipality::lookup_municipality(state.municipality).map(|m| m.name),
        "venues": principal.venues,
        // What kind of node answers: the web UI shows a venue terminal only its own pages.
        "node": if state.terminal.is_some() {
            "terminal"
        } else if state.coupon_signer.is_none() {
            "standby"
        } else {
            "municipal"
        },
        // A session's own holder may read its CSRF token (the web UI, after a reload); no
        // other origin can read this answer.
        "csrf_token": principal.csrf_token,
    }))
}

async fn list_users(State(state): State<Arc<AppState>>) -> ApiResult {
    let users =
        state.store.read().and_then(|v| auth::list_users(v.txn())).map_err(|e| Problem::internal(&e))?;
    Ok(Json(json!({ "users": users })).into_response())
}

#[derive(Deserialize)]
struct NewUserBody {
    username: String,
    role: Role,
    password: String,
    #[serde(default)]
    venues: Vec<String>,
}

async fn hash_off_thread(password: String) -> Result<String, Problem> {
    auth::check_password(&password)?;
    tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| Problem::internal(&anyhow::anyhow!("password hashing failed: {e}")))?
        .map_err(|e| Problem::internal(&e))
}

async fn add_user(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let new: NewUserBody = body(bytes)?;
    auth::check_name("username", &new.username)?;
    let password_hash = hash_off_thread(new.password).await?;
    let subject = format!("user:{}", new.username);
    let municipality = state.municipality;
    let new = auth::NewUser { username: new.username, role: new.role, venues: new.venues, password_hash };
    let op: crate::writer::ApplyFn =
        Box::new(move |txn, now| Ok(auth::add_user(txn, municipality, new, now)?.map(|user| json!(user))));
    let user = state
        .writer
        .call(&who, |reply| Command::Apply { action: "user.add".into(), subject, op, reply })
        .await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

#[derive(Deserialize)]
struct DisableBody {
    #[serde(default = "yes")]
    disabled: bool,
}

fn yes() -> bool {
    true
}

async fn disable_user(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(username): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let DisableBody { disabled } = body(bytes)?;
    let subject = format!("user:{username}");
    let action = if disabled { "user.disable" } else { "user.enable" };
    let op: crate::writer::ApplyFn =
        Box::new(move |txn, _| Ok(auth::set_disabled(txn, &username, disabled)?.map(|user| json!(user))));
    let user =
        state.writer.call(&who, |reply| Command::Apply { action: action.into(), subject, op, reply }).await?;
    Ok(Json(user).into_response())
}

#[derive(Deserialize)]
struct PasswordBody {
    password: String,
}

async fn reset_password(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(username): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let PasswordBody { password } = body(bytes)?;
    let hash = hash_off_thread(password).await?;
    let subject = format!("user:{username}");
    let op: crate::writer::ApplyFn =
        Box::new(move |txn, now| Ok(auth::set_password(txn, &username, hash, now)?.map(|user| json!(user))));
    let user = state
        .writer
        .call(&who, |reply| Command::Apply { action: "user.reset_password".into(), subject, op, reply })
        .await?;
    Ok(Json(user).into_response())
}

async fn list_tokens(State(state): State<Arc<AppState>>) -> ApiResult {
    let tokens =
        state.store.read().and_then(|v| auth::list_tokens(v.txn())).map_err(|e| Problem::internal(&e))?;
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

#[derive(Deserialize)]
struct NewTokenBody {
    name: String,
    role: Role,
    #[serde(default)]
    venues: Vec<String>,
    #[serde(default)]
    expires_days: Option<u32>,
}

async fn add_token(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let new: NewTokenBody = body(bytes)?;
    let subject = format!("token:{}", new.name);
    let municipality = state.municipality;
    let op: crate::writer::ApplyFn = Box::new(move |txn, now| {
        let expires = new.expires_days.map(|days| now + time::Duration::days(i64::from(days)));
        Ok(auth::add_token(txn, municipality, &new.name, new.role, new.venues, expires, now)?
            .map(|(token, record)| json!({ "token": token, "record": record })))
    });
    let answer = state
        .writer
        .call(&who, |reply| Command::Apply { action: "token.add".into(), subject, op, reply })
        .await?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
) -> ApiResult {
    let subject = format!("token:{name}");
    let op: crate::writer::ApplyFn =
        Box::new(move |txn, _| Ok(auth::revoke_token(txn, &name)?.map(|record| json!(record))));
    let record = state
        .writer
        .call(&who, |reply| Command::Apply { action: "token.revoke".into(), subject, op, reply })
        .await?;
    Ok(Json(record).into_response())
}

async fn list_terminals(State(state): State<Arc<AppState>>) -> ApiResult {
    let view = state.store.read().map_err(|e| Problem::internal(&e))?;
    let terminals: Vec<crate::terminals::TerminalRecord> = view
        .all(crate::store::TERMINALS)
        .map_err(|e| Problem::internal(&e))?
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    // Never the secrets: only what each token is for and whether it was used.
    let enrolments: Vec<serde_json::Value> = view
        .all::<crate::terminals::Enrolment>(crate::store::ENROLMENTS)
        .map_err(|e| Problem::internal(&e))?
        .into_iter()
        .map(|(_, e)| json!({"venue": e.venue, "expires_at": e.expires_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(), "used_by": e.used_by, "created_by": e.created_by}))
        .collect();
    Ok(Json(json!({ "terminals": terminals, "enrolments": enrolments, "p2p_address": state.p2p_address }))
        .into_response())
}

#[derive(Deserialize)]
struct EnrolmentBody {
    venue: String,
    #[serde(default)]
    valid_hours: Option<u32>,
}

async fn add_enrolment(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Extension(who): Extension<Who>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let EnrolmentBody { venue, valid_hours } = body(bytes)?;
    check_id_field("venue", &venue)?;
    let Some(address) = state.p2p_address.clone() else {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "p2p_not_serving",
            None,
            "this node does not serve terminals: set [p2p] advertise (or a specific [p2p] listen address) in node.toml and restart",
            "このノードは端末を受け付けていません。node.toml の [p2p] advertise（または listen）を設定して再起動してください",
        ));
    };
    let created_by = principal.actor();
    let subject = format!("venue:{venue}");
    let op: crate::writer::ApplyFn = Box::new(move |txn, now| {
        let (token, enrolment) = crate::terminals::add_enrolment(
            txn,
            &venue,
            valid_hours.unwrap_or(24),
            &created_by,
            &address,
            now,
        )?;
        let until =
            enrolment.expires_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        Ok(Ok(json!({"token": token.to_text(), "venue": enrolment.venue, "expires_at": until})))
    });
    let issued = state
        .writer
        .call(&who, |reply| Command::Apply { action: "terminal.enrol_token".into(), subject, op, reply })
        .await?;
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

async fn revoke_terminal(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Path(peer_id): Path<String>,
) -> ApiResult {
    let subject = format!("terminal:{peer_id}");
    let op: crate::writer::ApplyFn = Box::new(move |txn, _| {
        Ok(crate::terminals::revoke(txn, &peer_id)?.map(|()| json!({"peer_id": peer_id, "revoked": true})))
    });
    let revoked = state
        .writer
        .call(&who, |reply| Command::Apply { action: "terminal.revoke".into(), subject, op, reply })
        .await?;
    Ok(Json(revoked).into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit_entries(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Query(query): Query<AuditQuery>,
) -> ApiResult {
    let limit = query.limit.unwrap_or(500).clamp(1, 5000);
    let entries = (|| -> anyhow::Result<Vec<serde_json::Value>> {
        let view = state.store.read()?;
        let table = view.txn().open_table(crate::audit::AUDIT)?;
        let mut out = Vec::new();
        for row in table.range(query.after.saturating_add(1)..)?.take(limit) {
            let (_, bytes) = row?;
            out.push(serde_json::from_slice(bytes.value())?);
        }
        Ok(out)
    })()
    .map_err(|e| Problem::internal(&e))?;
    audit_reads(&state, &who, "audit.read", vec![format!("audit:after:{}", query.after)]).await?;
    Ok(Json(json!({ "entries": entries })).into_response())
}

async fn audit_verify(State(state): State<Arc<AppState>>, Extension(who): Extension<Who>) -> ApiResult {
    let public_key = state.audit.public_key();
    let report = state
        .store
        .read()
        .and_then(|view| {
            crate::audit::verify_store(
                view.txn(),
                state.municipality,
                &public_key,
                state.policy.audit_checkpoint_every,
            )
        })
        .map_err(|e| Problem::internal(&e))?;
    audit_reads(&state, &who, "audit.verify", vec!["audit:all".into()]).await?;
    let findings: Vec<_> =
        report.findings.iter().map(|f| json!({"at": f.at, "detail_ja": f.ja, "detail_en": f.en})).collect();
    Ok(Json(json!({
        "intact": report.is_intact(),
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "sealed_through": report.sealed_through,
        "unsealed": report.unsealed,
        "findings": findings,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct ExportQuery {
    from: String,
    to: String,
}

/// `YYYY-MM-DD` (a day in Japan, inclusive) or an RFC 3339 instant.
pub fn parse_instant(field: &str, text: &str, end_of_day: bool) -> Result<OffsetDateTime, Problem> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let date = parse_date_field(field, text)?;
    let time = if end_of_day { time::Time::MAX } else { time::Time::MIDNIGHT };
    Ok(date.with_time(time).assume_offset(crate::clock::JST))
}

async fn audit_export(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Who>,
    Query(query): Query<ExportQuery>,
) -> ApiResult {
    let from = parse_instant("from", &query.from, false)?;
    let to = parse_instant("to", &query.to, true)?;
    // Seal the newest entries too, so the export ends at a signed point.
    state.writer.call(&who, Command::Checkpoint).await?;
    audit_reads(&state, &who, "audit.export", vec![format!("audit:{}..{}", query.from, query.to)]).await?;
    let file = state
        .store
        .read()
        .and_then(|view| state.audit.export(view.txn(), from, to, OffsetDateTime::now_utc()))
        .map_err(|e| Problem::internal(&e))?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], file).into_response())
}

/// The authorization table (route × role) as Markdown, printed from [`ROUTES`] into
/// `docs/security.md` (`vrs-node authz-table`); a test keeps the document equal to it.
pub fn authorization_table_markdown() -> String {
    let mut out = route_table(
        ROUTES,
        &Role::ALL,
        |spec, role| role == Role::VenueOperator && spec.path == "/api/v1/captures",
        "✔ 担当会場のみ",
    );
    out.push_str("\n国ノード / national node (`node/src/national_api.rs`):\n\n");
    let national = [Role::NationalAdmin, Role::NationalAnalyst, Role::PrefectureUser];
    out.push_str(&route_table(
        crate::national_api::NATIONAL_ROUTES,
        &national,
        |_, role| role == Role::PrefectureUser,
        "✔ 自都道府県のみ",
    ));
    out
}

/// One Markdown table: a row per route, a column per role; `limited` marks the cells where
/// the role passes only for part of the data (its venues, its prefecture).
fn route_table(
    routes: &[RouteSpec],
    roles: &[Role],
    limited: impl Fn(&RouteSpec, Role) -> bool,
    limited_mark: &str,
) -> String {
    let mut out = String::from("| method | path | 内容 / what |");
    for role in roles {
        out.push_str(&format!(" {} |", role.as_str()));
    }
    out.push_str("\n|---|---|---|");
    out.push_str(&":-:|".repeat(roles.len()));
    out.push('\n');
    for spec in routes {
        out.push_str(&format!("| {} | `{}` | {} |", spec.method, spec.path, spec.summary_ja));
        for &role in roles {
            let cell = match spec.access {
                Access::Public => "公開",
                _ if spec.access.allows(role) && limited(spec, role) => limited_mark,
                _ if spec.access.allows(role) => "✔",
                _ => "—",
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}
