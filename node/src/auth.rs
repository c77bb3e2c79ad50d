//! Users and roles, password login with sessions, machine API tokens, and rate limits.
//!
//! Passwords are stored as argon2id PHC strings. A session token is 256 random bits; the
//! store keeps only its SHA-256, so a copy of the store does not hand out sessions. A
//! session ends at its expiry, at logout, when its user is disabled, or when the user's
//! password is reset. API tokens (terminals, integrations) are separate credentials with a
//! role and, for venue operators, the venues they may record for.
//!
//! Every credential belongs to the node's own municipality: users and tokens live in this
//! node's store, so a credential made by another municipality's node is unknown here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::http::StatusCode;
use protocol::municipality::{MunicipalityCode, NATIONAL_ORGANISATION};
use protocol::person::hex_lower;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{random_bytes, sha256_hex};
use crate::problem::Problem;

/// username → JSON of [`User`].
pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// SHA-256 (hex) of a session token → JSON of [`Session`].
pub const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// SHA-256 (hex) of an API token → JSON of [`ApiToken`].
pub const API_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");
/// API token name → SHA-256 (hex) of the token.
pub const TOKEN_NAMES: TableDefinition<&str, &str> = TableDefinition::new("api_token_names");

/// Who may do what. Municipal roles on a municipal node; national roles on the national node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Role {
    /// 市区町村管理者: users, tokens, corrections, everything of the municipality.
    MunicipalAdmin,
    /// 職員: residents, coupons, captures and corrections.
    Clerk,
    /// コールセンター: looks residents up and reissues coupons; no corrections.
    CallCentre,
    /// 会場担当: records vaccinations at the venues it is bound to.
    VenueOperator,
    /// 監査担当: reads and exports the audit log; no personal data.
    Auditor,
    /// 国管理者 (national node).
    NationalAdmin,
    /// 国分析担当 (national node).
    NationalAnalyst,
    /// 都道府県担当 (national node): the figures and stock of one prefecture.
    PrefectureUser,
}

impl Role {
    /// Every role, in the order the authorization table prints them.
    pub const ALL: [Role; 8] = [
        Role::MunicipalAdmin,
        Role::Clerk,
        Role::CallCentre,
        Role::VenueOperator,
        Role::Auditor,
        Role::NationalAdmin,
        Role::NationalAnalyst,
        Role::PrefectureUser,
    ];

    /// The name used in files, the API and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::MunicipalAdmin => "municipal_admin",
            Role::Clerk => "clerk",
            Role::CallCentre => "call_centre",
            Role::VenueOperator => "venue_operator",
            Role::Auditor => "auditor",
            Role::NationalAdmin => "national_admin",
            Role::NationalAnalyst => "national_analyst",
            Role::PrefectureUser => "prefecture_user",
        }
    }

    /// The Japanese name.
    pub fn label_ja(self) -> &'static str {
        match self {
            Role::MunicipalAdmin => "市区町村管理者",
            Role::Clerk => "職員",
            Role::CallCentre => "コールセンター",
            Role::VenueOperator => "会場担当",
            Role::Auditor => "監査担当",
            Role::NationalAdmin => "国管理者",
            Role::NationalAnalyst => "国分析担当",
            Role::PrefectureUser => "都道府県担当",
        }
    }

    /// Roles of the national node.
    pub fn is_national(self) -> bool {
        matches!(self, Role::NationalAdmin | Role::NationalAnalyst | Role::PrefectureUser)
    }
}

/// A staff account.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// The municipality the account belongs to (always the node's own).
    pub municipality: MunicipalityCode,
    /// Venues a venue operator may record for.
    #[serde(default)]
    pub venues: Vec<String>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// A disabled account cannot log in and its sessions stop working.
    pub disabled: bool,
    /// Consecutive failed logins.
    pub failed_logins: u32,
    /// Locked after too many failures, until then.
    #[serde(with = "time::serde::rfc3339::option")]
    pub locked_until: Option<OffsetDateTime>,
    /// Sessions created before this are void (password reset).
    #[serde(with = "time::serde::rfc3339")]
    pub password_changed_at: OffsetDateTime,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What the API shows of a user (never the hash).
#[derive(Clone, Debug, Serialize)]
pub struct UserView {
    /// Login name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Venues.
    pub venues: Vec<String>,
    /// Disabled.
    pub disabled: bool,
    /// Locked until, if locked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub locked_until: Option<OffsetDateTime>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<&User> for UserView {
    fn from(user: &User) -> Self {
        Self {
            username: user.username.clone(),
            role: user.role,
            venues: user.venues.clone(),
            disabled: user.disabled,
            locked_until: user.locked_until,
            created_at: user.created_at,
        }
    }
}

/// A login session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// Whose.
    pub username: String,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Ends.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The token a cookie-authenticated request must echo in `X-CSRF-Token`.
    pub csrf_token: String,
}

/// A machine credential.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiToken {
    /// Name (unique), e.g. `tablet-03`.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Municipality.
    pub municipality: MunicipalityCode,
    /// Venues (venue operators).
    #[serde(default)]
    pub venues: Vec<String>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Ends, if it does.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Revoked tokens stay listed but do not work.
    pub revoked: bool,
}

/// How a caller authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// A login session (Bearer or cookie).
    Session,
    /// An API token.
    Token,
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Session or token.
    pub kind: CredentialKind,
    /// Username or token name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Municipality.
    pub municipality: MunicipalityCode,
    /// Venues it may record for (venue operators).
    pub venues: Vec<String>,
    /// SHA-256 of the credential (the session key, for logout).
    pub credential_digest: String,
    /// The session's CSRF token.
    pub csrf_token: Option<String>,
}

impl Principal {
    /// The actor written into records and the audit log.
    pub fn actor(&self) -> String {
        match self.kind {
            CredentialKind::Session => format!("user:{}", self.name),
            CredentialKind::Token => format!("token:{}", self.name),
        }
    }
}

/// Login and session rules (`[auth]` in node.toml).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthPolicy {
    /// How long a session lasts, in seconds.
    #[serde(default = "default_session_seconds")]
    pub session_seconds: i64,
    /// Failed logins in a row that lock an account.
    #[serde(default = "default_max_failed_logins")]
    pub max_failed_logins: u32,
    /// How long a locked account stays locked, in seconds.
    #[serde(default = "default_lockout_seconds")]
    pub lockout_seconds: i64,
    /// Login attempts per minute from one address.
    #[serde(default = "default_login_per_minute")]
    pub login_per_minute: u32,
    /// Requests per minute from one address to routes that need no login.
    #[serde(default = "default_public_per_minute")]
    pub public_per_minute: u32,
    /// Entries between two signed audit checkpoints.
    #[serde(default = "default_checkpoint_every")]
    pub audit_checkpoint_every: u64,
}

fn default_session_seconds() -> i64 {
    8 * 3600
}
fn default_max_failed_logins() -> u32 {
    5
}
fn default_lockout_seconds() -> i64 {
    15 * 60
}
fn default_login_per_minute() -> u32 {
    20
}
fn default_public_per_minute() -> u32 {
    600
}
fn default_checkpoint_every() -> u64 {
    256
}

impl Default for AuthPolicy {
    fn default() -> Self {
        Self {
            session_seconds: default_session_seconds(),
            max_failed_logins: default_max_failed_logins(),
            lockout_seconds: default_lockout_seconds(),
            login_per_minute: default_login_per_minute(),
            public_per_minute: default_public_per_minute(),
            audit_checkpoint_every: default_checkpoint_every(),
        }
    }
}

/// Outer `Err`: the store failed. Inner `Err`: refused, nothing written.
pub type Step<T> = anyhow::Result<Result<T, Problem>>;

/// Hashes a password with argon2id (default parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| anyhow::anyhow!("password hashing failed: {e}"))
}

/// Checks a password against a stored hash.
pub fn verify_password(stored: &str, password: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(hash) => Argon2::default().verify_password(password.as_bytes(), &hash).is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the user does not exist, so that the answer takes as
/// long as for a real user.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not a password of anyone").unwrap_or_default())
}

/// Password rules: 12 to 128 characters.
pub fn check_password(password: &str) -> Result<(), Problem> {
    let n = password.chars().count();
    if (12..=128).contains(&n) {
        Ok(())
    } else {
        Err(Problem::bad_field(
            "password",
            "a password must be 12 to 128 characters long",
            "パスワードは12〜128文字にしてください",
        ))
    }
}

/// Names of users, tokens and venues: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn check_name(field: &str, name: &str) -> Result<(), Problem> {
    let ok = (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Problem::bad_field(
            field,
            format!("{field} must be 1–64 characters of a–z, 0–9, '.', '_', '-'"),
            format!("{field} は半角小文字・数字・. _ - の1〜64文字です"),
        ))
    }
}

fn check_venues(role: Role, venues: &[String]) -> Result<(), Problem> {
    for venue in venues {
        check_name("venues", venue)?;
    }
    match (role, venues.is_empty()) {
        (Role::VenueOperator, true) => Err(Problem::bad_field(
            "venues",
            "a venue operator must be bound to at least one venue",
            "会場担当には会場を1つ以上指定してください",
        )),
        (Role::VenueOperator, false) | (_, true) => Ok(()),
        (_, false) => Err(Problem::bad_field(
            "venues",
            "only venue operators are bound to venues",
            "会場を指定できるのは会場担当だけです",
        )),
    }
}

/// A municipality's accounts have municipal roles; the national node's have national roles,
/// a prefecture user's organisation being its prefecture and the others' [`NATIONAL_ORGANISATION`].
fn check_role_for(role: Role, organisation: MunicipalityCode) -> Result<(), Problem> {
    let refuse = |en: String, ja: String| Err(Problem::bad_field("role", en, ja));
    match (organisation.is_known(), role) {
        (true, role) if role.is_national() => refuse(
            format!("{} is a role of the national node", role.as_str()),
            format!("{}は国のノードの役割です", role.label_ja()),
        ),
        (true, _) => Ok(()),
        (false, Role::PrefectureUser) if organisation != NATIONAL_ORGANISATION => Ok(()),
        (false, Role::NationalAdmin | Role::NationalAnalyst) if organisation == NATIONAL_ORGANISATION => {
            Ok(())
        }
        (false, role) => refuse(
            format!("{} is not a role for organisation {organisation}", role.as_str()),
            format!("{}は組織 {organisation} の役割ではありません", role.label_ja()),
        ),
    }
}

fn json<T: Serialize>(value: &T) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> anyhow::Result<T> {
    Ok(serde_json::from_slice(bytes)?)
}

fn user_in(txn: &WriteTransaction, username: &str) -> anyhow::Result<Option<User>> {
    let table = txn.open_table(USERS)?;
    let user = table.get(username)?.map(|v| parse(v.value())).transpose()?;
    Ok(user)
}

fn put_user(txn: &WriteTransaction, user: &User) -> anyhow::Result<()> {
    txn.open_table(USERS)?.insert(user.username.as_str(), json(user)?.as_slice())?;
    Ok(())
}

fn no_user(username: &str) -> Problem {
    Problem::not_found("user", "利用者", username)
}

/// What `user add` asks for.
pub struct NewUser {
    /// Login name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Venues (venue operators only).
    pub venues: Vec<String>,
    /// argon2id hash of the initial password (hashed by the caller, off the writer thread).
    pub password_hash: String,
}

/// Creates a user.
pub fn add_user(
    txn: &WriteTransaction,
    municipality: MunicipalityCode,
    new: NewUser,
    now: OffsetDateTime,
) -> Step<UserView> {
    if let Err(problem) = check_name("username", &new.username)
        .and_then(|()| check_role_for(new.role, municipality))
        .and_then(|()| check_venues(new.role, &new.venues))
    {
        return Ok(Err(problem));
    }
    if user_in(txn, &new.username)?.is_some() {
        return Ok(Err(Problem::new(
            StatusCode::CONFLICT,
            "user_exists",
            Some("username"),
            format!("user {} exists already", new.username),
            format!("利用者 {} は既に存在します", new.username),
        )));
    }
    let user = User {
        username: new.username,
        role: new.role,
        municipality,
        venues: new.venues,
        password_hash: new.password_hash,
        disabled: false,
        failed_logins: 0,
        locked_until: None,
        password_changed_at: now,
        created_at: now,
    };
    put_user(txn, &user)?;
    Ok(Ok(UserView::from(&user)))
}

/// Disables (or re-enables) a user; a disabled user's sessions stop working at once.
pub fn set_disabled(txn: &WriteTransaction, username: &str, disabled: bool) -> Step<UserView> {
    let Some(mut user) = user_in(txn, username)? else { return Ok(Err(no_user(username))) };
    user.disabled = disabled;
    if disabled {
        // Re-enabling later must not bring back a session that existed before (it may be
        // the stolen one that caused the disabling).
        user.password_changed_at = OffsetDateTime::now_utc();
    }
    put_user(txn, &user)?;
    Ok(Ok(UserView::from(&user)))
}

/// Sets a new password: ends every session of the user and lifts a lock.
pub fn set_password(
    txn: &WriteTransaction,
    username: &str,
    password_hash: String,
    now: OffsetDateTime,
) -> Step<UserView> {
    let Some(mut user) = user_in(txn, username)? else { return Ok(Err(no_user(username))) };
    user.password_hash = password_hash;
    user.password_changed_at = now;
    user.failed_logins = 0;
    user.locked_until = None;
    put_user(txn, &user)?;
    Ok(Ok(UserView::from(&user)))
}

/// Every user.
pub fn list_users(txn: &ReadTransaction) -> anyhow::Result<Vec<UserView>> {
    let mut users = Vec::new();
    for row in txn.open_table(USERS)?.iter()? {
        let (_, bytes) = row?;
        users.push(UserView::from(&parse::<User>(bytes.value())?));
    }
    Ok(users)
}

/// A user, for login.
pub fn get_user(txn: &ReadTransaction, username: &str) -> anyhow::Result<Option<User>> {
    let table = txn.open_table(USERS)?;
    let user = table.get(username)?.map(|v| parse(v.value())).transpose()?;
    Ok(user)
}

/// Why a login failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginRefusal {
    /// Wrong name or password (not told apart).
    BadCredentials,
    /// Locked after too many failures.
    Locked,
    /// Disabled by an administrator.
    Disabled,
}

impl LoginRefusal {
    /// Audit outcome code.
    pub fn code(self) -> &'static str {
        match self {
            LoginRefusal::BadCredentials => "bad_credentials",
            LoginRefusal::Locked => "account_locked",
            LoginRefusal::Disabled => "account_disabled",
        }
    }

    /// The answer.
    pub fn problem(self) -> Problem {
        match self {
            LoginRefusal::BadCredentials => Problem::new(
                StatusCode::UNAUTHORIZED,
                "bad_credentials",
                None,
                "wrong username or password",
                "利用者名またはパスワードが違います",
            ),
            LoginRefusal::Locked => Problem::new(
                StatusCode::UNAUTHORIZED,
                "account_locked",
                None,
                "this account is locked after repeated failed logins; try later or ask an administrator",
                "ログインの失敗が続いたためアカウントがロックされています。時間をおくか管理者に連絡してください",
            ),
            LoginRefusal::Disabled => Problem::new(
                StatusCode::UNAUTHORIZED,
                "bad_credentials",
                None,
                "wrong username or password",
                "利用者名またはパスワードが違います",
            ),
        }
    }
}

/// A new session: the token (shown once) and what the client needs with it.
#[derive(Clone, Debug, Serialize)]
pub struct NewSession {
    /// Bearer token (also set as the `vrs_session` cookie).
    pub token: String,
    /// Echo this in `X-CSRF-Token` on writes authenticated by the cookie.
    pub csrf_token: String,
    /// When it ends.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Who.
    pub username: String,
    /// Role.
    pub role: Role,
}

/// Completes a login whose password the caller has checked (`password_ok`): records the
/// failure (and locks the account after too many), or resets the count and opens a session.
pub fn finish_login(
    txn: &WriteTransaction,
    username: &str,
    password_ok: bool,
    policy: &AuthPolicy,
    now: OffsetDateTime,
) -> anyhow::Result<Result<NewSession, LoginRefusal>> {
    let Some(mut user) = user_in(txn, username)? else { return Ok(Err(LoginRefusal::BadCredentials)) };
    if user.locked_until.is_some_and(|until| until > now) {
        return Ok(Err(LoginRefusal::Locked));
    }
    if !password_ok {
        user.failed_logins += 1;
        let locked = user.failed_logins >= policy.max_failed_logins;
        if locked {
            user.locked_until = Some(now + time::Duration::seconds(policy.lockout_seconds));
            user.failed_logins = 0;
        }
        put_user(txn, &user)?;
        return Ok(Err(if locked { LoginRefusal::Locked } else { LoginRefusal::BadCredentials }));
    }
    if user.disabled {
        return Ok(Err(LoginRefusal::Disabled));
    }
    user.failed_logins = 0;
    user.locked_until = None;
    put_user(txn, &user)?;
    let rng = SystemRandom::new();
    let token = format!("vrs_s_{}", hex_lower(&random_bytes(&rng, 32)?));
    let csrf_token = hex_lower(&random_bytes(&rng, 16)?);
    let session = Session {
        username: user.username.clone(),
        created_at: now,
        expires_at: now + time::Duration::seconds(policy.session_seconds),
        csrf_token: csrf_token.clone(),
    };
    txn.open_table(SESSIONS)?.insert(sha256_hex(token.as_bytes()).as_str(), json(&session)?.as_slice())?;
    Ok(Ok(NewSession {
        token,
        csrf_token,
        expires_at: session.expires_at,
        username: user.username,
        role: user.role,
    }))
}

/// Ends a session.
pub fn end_session(txn: &WriteTransaction, digest: &str) -> anyhow::Result<bool> {
    Ok(txn.open_table(SESSIONS)?.remove(digest)?.is_some())
}

/// Creates an API token; returns it (shown once) and its record.
pub fn add_token(
    txn: &WriteTransaction,
    municipality: MunicipalityCode,
    name: &str,
    role: Role,
    venues: Vec<String>,
    expires_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Step<(String, ApiToken)> {
    if let Err(problem) = check_name("name", name)
        .and_then(|()| check_role_for(role, municipality))
        .and_then(|()| check_venues(role, &venues))
    {
        return Ok(Err(problem));
    }
    if txn.open_table(TOKEN_NAMES)?.get(name)?.is_some() {
        return Ok(Err(Problem::new(
            StatusCode::CONFLICT,
            "token_exists",
            Some("name"),
            format!("a token named {name} exists already"),
            format!("トークン {name} は既に存在します"),
        )));
    }
    let token = format!("vrs_t_{}", hex_lower(&random_bytes(&SystemRandom::new(), 32)?));
    let digest = sha256_hex(token.as_bytes());
    let record = ApiToken {
        name: name.to_owned(),
        role,
        municipality,
        venues,
        created_at: now,
        expires_at,
        revoked: false,
    };
    txn.open_table(API_TOKENS)?.insert(digest.as_str(), json(&record)?.as_slice())?;
    txn.open_table(TOKEN_NAMES)?.insert(name, digest.as_str())?;
    Ok(Ok((token, record)))
}

/// Revokes an API token by name.
pub fn revoke_token(txn: &WriteTransaction, name: &str) -> Step<ApiToken> {
    let digest = match txn.open_table(TOKEN_NAMES)?.get(name)? {
        Some(digest) => digest.value().to_owned(),
        None => return Ok(Err(Problem::not_found("token", "トークン", name))),
    };
    let mut tokens = txn.open_table(API_TOKENS)?;
    let mut record: ApiToken = match tokens.get(digest.as_str())? {
        Some(bytes) => parse(bytes.value())?,
        None => anyhow::bail!("token name {name} points at no token"),
    };
    record.revoked = true;
    tokens.insert(digest.as_str(), json(&record)?.as_slice())?;
    Ok(Ok(record))
}

/// Every API token (never the secret).
pub fn list_tokens(txn: &ReadTransaction) -> anyhow::Result<Vec<ApiToken>> {
    let mut tokens = Vec::new();
    for row in txn.open_table(API_TOKENS)?.iter()? {
        let (_, bytes) = row?;
        tokens.push(parse::<ApiToken>(bytes.value())?);
    }
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tokens)
}

/// Resolves a presented token to a caller, or `None` if it is unknown, expired, revoked,
/// or its user is disabled or has changed password since.
pub fn authenticate(
    txn: &ReadTransaction,
    token: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Option<Principal>> {
    let digest = sha256_hex(token.as_bytes());
    if token.starts_with("vrs_s_") {
        let sessions = txn.open_table(SESSIONS)?;
        let Some(bytes) = sessions.get(digest.as_str())? else { return Ok(None) };
        let session: Session = parse(bytes.value())?;
        if session.expires_at <= now {
            return Ok(None);
        }
        let Some(user) = get_user(txn, &session.username)? else { return Ok(None) };
        if user.disabled || session.created_at < user.password_changed_at {
            return Ok(None);
        }
        return Ok(Some(Principal {
            kind: CredentialKind::Session,
            name: user.username,
            role: user.role,
            municipality: user.municipality,
            venues: user.venues,
            credential_digest: digest,
            csrf_token: Some(session.csrf_token),
        }));
    }
    let tokens = txn.open_table(API_TOKENS)?;
    let Some(bytes) = tokens.get(digest.as_str())? else { return Ok(None) };
    let record: ApiToken = parse(bytes.value())?;
    if record.revoked || record.expires_at.is_some_and(|at| at <= now) {
        return Ok(None);
    }
    Ok(Some(Principal {
        kind: CredentialKind::Token,
        name: record.name,
        role: record.role,
        municipality: record.municipality,
        venues: record.venues,
        credential_digest: digest,
        csrf_token: None,
    }))
}

/// A token bucket per client address.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// Allows `per_minute` requests a minute per address, in bursts of up to as many.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute.max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `ip`'s bucket, or says how long to wait.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 100_000 {
            buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * per_second < capacity);
        }
        let (tokens, at) = buckets.entry(ip).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_second))
        }
    }
}
