//! Federation membership: the national node's data directory and directory signing, join
//! requests, approval, and promotion of a standby.
//!
//! The national node's data directory holds `national.toml`, `keys/p2p-identity.key`,
//! `keys/directory-signing.pk8` (and `.pub`, hex, for the operators of every node) and
//! `directory.json`, the newest signed directory. Joining is deliberately a human act: a
//! municipal operator runs `federation join`, which writes a request file; the national
//! administrator checks it through an out-of-band channel and runs `federation approve`,
//! which signs a new directory version; every node fetches it over libp2p.

use std::path::Path;

use anyhow::{Context, bail};
use protocol::directory::{DirectoryEntry, JoinRequest, NodeRole, SignedDirectory};
use protocol::person::hex_lower;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{NodeFiles, Role, write_config, write_private};
use crate::p2p::{P2pOptions, load_directory, load_or_create_identity};

/// The national node's configuration file.
pub const NATIONAL_CONFIG: &str = "national.toml";

/// `national.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NationalConfig {
    /// libp2p listen address.
    pub p2p_listen: String,
    /// The address nodes reach it at.
    pub advertise: String,
    /// HTTP(S) API listen address.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    /// Serve plain HTTP (loopback addresses only).
    #[serde(default)]
    pub plain_http: bool,
    /// TLS certificate (PEM), relative to the data directory.
    #[serde(default = "crate::config::default_tls_cert")]
    pub tls_cert: String,
    /// TLS key (PEM), relative to the data directory.
    #[serde(default = "crate::config::default_tls_key")]
    pub tls_key: String,
    /// If set, every report received is appended here as JSON Lines (for audits of what
    /// the national node was sent).
    #[serde(default)]
    pub message_log: Option<String>,
}

fn default_http_listen() -> String {
    "127.0.0.1:8470".to_owned()
}

/// What `federation init-national` is told.
pub struct NationalInit<'a> {
    /// libp2p listen address.
    pub p2p_listen: &'a str,
    /// The address nodes reach it at (defaults to `p2p_listen`).
    pub advertise: Option<&'a str>,
    /// HTTP(S) API listen address.
    pub http_listen: &'a str,
    /// Plain HTTP on a loopback address instead of HTTPS.
    pub plain_http: bool,
}

fn now_text() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

fn signing_key(dir: &Path) -> anyhow::Result<Ed25519KeyPair> {
    let pkcs8 =
        std::fs::read(dir.join("keys/directory-signing.pk8")).context("keys/directory-signing.pk8")?;
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| anyhow::anyhow!("keys/directory-signing.pk8: {e}"))
}

/// Creates the national node; returns its peer id and directory key (hex).
pub fn init_national(dir: &Path, init: &NationalInit<'_>) -> anyhow::Result<(String, String)> {
    let NationalInit { p2p_listen, advertise, http_listen, plain_http } = *init;
    crate::config::refuse_existing_node(dir)?;
    if plain_http && !crate::config::is_loopback_listen(http_listen) {
        bail!("plain HTTP is allowed on a loopback address only, not {http_listen}");
    }
    std::fs::create_dir_all(dir.join("keys")).with_context(|| format!("cannot create {}", dir.display()))?;
    let keypair = load_or_create_identity(&dir.join("keys/p2p-identity.key"))?;
    let peer = keypair.public().to_peer_id().to_string();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key generation failed"))?;
    write_private(&dir.join("keys/directory-signing.pk8"), pkcs8.as_ref())?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let public = hex_lower(key.public_key().as_ref());
    std::fs::write(dir.join("keys/directory-signing.pub"), format!("{public}\n"))?;
    let advertise = advertise.unwrap_or(p2p_listen).to_owned();
    let config = NationalConfig {
        p2p_listen: p2p_listen.to_owned(),
        advertise: advertise.clone(),
        http_listen: http_listen.to_owned(),
        plain_http,
        tls_cert: crate::config::default_tls_cert(),
        tls_key: crate::config::default_tls_key(),
        message_log: None,
    };
    if !plain_http {
        let (cert, key) = crate::tls::self_signed(http_listen, &[])?;
        std::fs::write(dir.join(&config.tls_cert), cert)?;
        write_private(&dir.join(&config.tls_key), key.as_bytes())?;
    }
    std::fs::write(dir.join(NATIONAL_CONFIG), toml::to_string(&config)?)?;
    let entry = DirectoryEntry {
        municipality: None,
        role: NodeRole::National,
        peer_id: peer.clone(),
        addresses: vec![advertise],
        coupon_key: String::new(),
        encryption_key: String::new(),
    };
    let directory = crate::p2p::first_directory(entry, now_text());
    let signed = SignedDirectory::sign(directory, &key);
    std::fs::write(dir.join("directory.json"), serde_json::to_vec_pretty(&signed)?)?;
    Ok((peer, public))
}

/// Records the national node in a municipal or standby node's config and makes its request.
pub fn join(dir: &Path, national: &str, national_key: &[u8]) -> anyhow::Result<JoinRequest> {
    let address: libp2p::Multiaddr =
        national.parse().with_context(|| format!("--national {national} is not a multiaddr"))?;
    anyhow::ensure!(
        address.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_))),
        "--national must end in /p2p/<peer id>"
    );
    let mut files = NodeFiles::load(dir)?;
    files.config.p2p.national = Some(national.to_owned());
    files.config.p2p.national_key = Some(hex_lower(national_key));
    write_config(dir, &files.config)?;
    request_for(&files)
}

fn request_for(files: &NodeFiles) -> anyhow::Result<JoinRequest> {
    let keypair = load_or_create_identity(&files.dir.join("keys/p2p-identity.key"))?;
    let role = match files.config.role {
        Role::Municipal => NodeRole::Municipal,
        Role::Standby => NodeRole::Standby,
        other => bail!("a {other:?} node does not join this way"),
    };
    let advertise = files.config.p2p.advertise.clone().unwrap_or_else(|| files.config.p2p.listen.clone());
    Ok(JoinRequest {
        entry: DirectoryEntry {
            municipality: Some(files.config.municipality),
            role,
            peer_id: keypair.public().to_peer_id().to_string(),
            addresses: vec![advertise],
            coupon_key: hex_lower(&files.signing_public_key()),
            encryption_key: hex_lower(&crate::config::encryption_public_key(&files.dir)?),
        },
        requested_at: now_text(),
    })
}

/// Approves a request at the national node: a new directory version, signed. Returns it.
pub fn approve(dir: &Path, request: JoinRequest) -> anyhow::Result<u64> {
    let key = signing_key(dir)?;
    let signed = load_directory(&dir.join("directory.json"), key.public_key().as_ref())?
        .context("the national node has no directory (run `federation init-national`)")?;
    let entry = request.entry;
    anyhow::ensure!(entry.role != NodeRole::National, "a request cannot add a national node");
    let municipality = entry.municipality.context("the request names no municipality")?;
    anyhow::ensure!(municipality.is_known(), "{municipality} is not one of Japan's municipalities");
    entry.peer_id.parse::<libp2p::PeerId>().with_context(|| format!("{} is not a peer id", entry.peer_id))?;
    for address in &entry.addresses {
        address.parse::<libp2p::Multiaddr>().with_context(|| format!("{address} is not a multiaddr"))?;
    }
    let mut directory = signed.directory;
    directory.upsert(entry);
    directory.version += 1;
    directory.issued_at = now_text();
    let version = directory.version;
    let signed = SignedDirectory::sign(directory, &key);
    let path = dir.join("directory.json");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&signed)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(version)
}

/// Makes a stopped standby the primary; returns the directory request for the national node.
pub fn promote(dir: &Path) -> anyhow::Result<JoinRequest> {
    let mut files = NodeFiles::load(dir)?;
    if files.config.role != Role::Standby {
        bail!("{} is not a standby (role {:?})", dir.display(), files.config.role);
    }
    files.config.role = Role::Municipal;
    write_config(dir, &files.config)?;
    let store = crate::store::Store::open(&files.store_path())?;
    files.audit_cli(&store, "node.promote", "role:municipal", "ok")?;
    // A standby's counters never moved: go on after the highest resident id and coupon
    // serial its documents use, so no id or coupon number is given twice.
    let (residents, serials) = crate::store::restore_counters(&store, files.config.municipality)?;
    files.audit_cli(
        &store,
        "node.counters",
        &format!("residents:{residents},coupon_serials:{serials}"),
        "ok",
    )?;
    // Replicated documents did not move the standby's statistics counters: count them now,
    // so that what it reports replaces the old primary's figures with whole ones.
    let counters = crate::statistics::rebuild(&store)?;
    files.audit_cli(&store, "statistics.rebuild", &format!("counters:{counters}"), "ok")?;
    // Handoff state lives beside the documents, not in them: rebuilt from them.
    let (indexed, resealed) = crate::handoff::reconcile_after_promotion(&files, &store)?;
    files.audit_cli(&store, "handoff.reconcile", &format!("coupons:{indexed},resealed:{resealed}"), "ok")?;
    request_for(&files)
}

/// The national node's p2p service options: its identity and directory in `dir`, its
/// report and ledger store.
pub(crate) fn national_p2p_options(
    dir: &Path,
    listen: libp2p::Multiaddr,
    national_key: Vec<u8>,
    store: std::sync::Arc<crate::national::NationalStore>,
) -> anyhow::Result<P2pOptions> {
    Ok(P2pOptions {
        keypair: load_or_create_identity(&dir.join("keys/p2p-identity.key"))?,
        listen,
        national: None,
        national_key,
        directory_path: dir.join("directory.json"),
        role: NodeRole::National,
        municipality: None,
        store: None,
        writer: None,
        captures: None,
        reporter: None,
        national_store: Some(store),
        handoffs: None,
    })
}

/// Runs the national node: the p2p service (directory, reports) and the national API.
pub async fn run_national(dir: &Path) -> anyhow::Result<()> {
    run_national_with(dir, None).await
}

/// Runs the national node; `bound` learns the API's address.
pub async fn run_national_with(
    dir: &Path,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dir.join(NATIONAL_CONFIG))?;
    let config: NationalConfig = toml::from_str(&text).context("national.toml is invalid")?;
    if config.plain_http && !crate::config::is_loopback_listen(&config.http_listen) {
        bail!("plain HTTP is allowed on a loopback address only, not {}", config.http_listen);
    }
    let key = signing_key(dir)?;
    let message_log = config.message_log.as_ref().map(|p| dir.join(p));
    let store = std::sync::Arc::new(crate::national::NationalStore::open(dir, message_log.as_deref())?);
    let listen = config.p2p_listen.parse().context("p2p_listen is not a multiaddr")?;
    let options = national_p2p_options(dir, listen, key.public_key().as_ref().to_vec(), store.clone())?;
    let tls = if config.plain_http {
        None
    } else {
        Some(crate::tls::load_server_config(&dir.join(&config.tls_cert), &dir.join(&config.tls_key))?)
    };
    let state = crate::national_api::NationalState {
        store,
        https: tls.is_some(),
        limiter: std::sync::Arc::new(crate::auth::RateLimiter::new(60)),
    };
    let app = crate::national_api::national_router(state)
        .into_make_service_with_connect_info::<crate::tls::PeerAddr>();
    let listener = tokio::net::TcpListener::bind(&config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let address = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("国API待受中 / national API listening on {scheme}://{address}");
    if let Some(bound) = bound {
        let _ = bound.send(address);
    }
    let http = async move {
        match tls {
            Some(tls) => {
                let listener = crate::tls::TlsListener::new(listener, tls)?;
                axum::serve(listener, app).await?;
            }
            None => axum::serve(listener, app).await?,
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = crate::p2p::run(options, None) => result,
        result = http => result,
        () = crate::daemon::shutdown_signal() => Ok(()),
    }
}

/// Creates an API token for a national user: `national_admin` and `national_analyst` belong
/// to the state, a `prefecture_user` to one prefecture (1–47). Prints nothing; returns the
/// token, which is shown once.
pub fn add_national_token(
    dir: &Path,
    name: &str,
    role: crate::auth::Role,
    prefecture: Option<u8>,
    expires_days: Option<i64>,
) -> anyhow::Result<String> {
    let organisation = match (role, prefecture) {
        (crate::auth::Role::PrefectureUser, Some(p)) => protocol::municipality::prefecture_organisation(p)
            .with_context(|| format!("{p} is not a prefecture code (1–47)"))?,
        (crate::auth::Role::PrefectureUser, None) => bail!("a prefecture user needs --prefecture"),
        (_, Some(_)) => bail!("--prefecture is for the prefecture_user role only"),
        (_, None) => protocol::municipality::NATIONAL_ORGANISATION,
    };
    let store = crate::national::NationalStore::open(dir, None)?;
    let now = OffsetDateTime::now_utc();
    let expires = expires_days.map(|days| now + time::Duration::days(days));
    let txn = store.db().begin_write()?;
    let (token, _) = crate::auth::add_token(&txn, organisation, name, role, Vec::new(), expires, now)?
        .map_err(|problem| anyhow::anyhow!("{}", problem.message_ja))?;
    txn.commit()?;
    Ok(token)
}
