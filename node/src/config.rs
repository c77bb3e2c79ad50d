//! The node's configuration file (`node.toml`) and key material in its data directory.
//!
//! Layout of a data directory:
//!
//! ```text
//! node.toml                 configuration (this module)
//! catalogue.toml            vaccine catalogue, editable by the operator
//! store.redb                documents, indexes, change feed
//! keys/coupon-signing.pk8   Ed25519 key that signs coupon QR codes (PKCS#8)
//! keys/person-key.secret    32-byte secret keying person keys and resident ids (hex)
//! keys/node-actor           Automerge actor id of this node (hex)
//! keys/audit-signing.pk8    Ed25519 key that signs audit checkpoints and exports (PKCS#8)
//! keys/audit-signing.pub    its public half (hex), for auditors
//! keys/tls-cert.pem         HTTPS certificate (self-signed at init unless one was given)
//! keys/tls-key.pem          its private key
//! ```
//!
//! The initial administrator's API token is stored (as SHA-256) in the store with the
//! other tokens; `init` prints it once.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use protocol::catalogue::Catalogue;
use protocol::municipality::MunicipalityCode;
use protocol::person::{PersonKeySecret, hex_decode, hex_lower};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use time::Date;

use crate::audit::{AuditEvent, AuditLog};
use crate::auth::AuthPolicy;
use crate::store::Store;

/// The catalogue a new node starts with.
pub const DEFAULT_CATALOGUE: &str = include_str!("../data/catalogue.toml");

/// What the node does in the federation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A municipality's node: owns its residents.
    Municipal,
    /// A standby replica of a municipality's node: pulls every resident document from the
    /// primary, refuses writes until promoted.
    Standby,
    /// A venue laptop enrolled with its municipal node: captures offline, holds no residents.
    Terminal,
    /// The national node (arrives with the national issue).
    National,
}

/// `node.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The node's role.
    pub role: Role,
    /// The municipality this node serves.
    pub municipality: MunicipalityCode,
    /// HTTP settings.
    pub http: HttpConfig,
    /// Campaign settings.
    pub campaign: CampaignConfig,
    /// Storage settings.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Login, session, rate-limit and audit settings.
    #[serde(default)]
    pub auth: AuthPolicy,
    /// Federation (libp2p) settings.
    #[serde(default)]
    pub p2p: P2pConfig,
    /// A terminal's venue and node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<crate::terminal::TerminalConfig>,
    /// Relocation handoffs.
    #[serde(default)]
    pub handoff: HandoffConfig,
}

/// `[handoff]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HandoffConfig {
    /// Whether a handoff received from another municipality is accepted at once (`auto`,
    /// the default: the move was registered by the municipality the resident left, or
    /// asked for here) or waits for an admin (`manual`).
    #[serde(default)]
    pub accept: HandoffAccept,
}

/// How received handoffs are accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoffAccept {
    /// At once, by policy.
    #[default]
    Auto,
    /// By an admin, through the API.
    Manual,
}

/// `[p2p]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct P2pConfig {
    /// libp2p listen address.
    pub listen: String,
    /// The address other nodes reach this one at (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// The national node: multiaddr ending in `/p2p/<peer id>`. Federation is off without it.
    #[serde(default)]
    pub national: Option<String>,
    /// The national directory-signing public key (hex).
    #[serde(default)]
    pub national_key: Option<String>,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self { listen: "/ip4/0.0.0.0/tcp/7400".into(), advertise: None, national: None, national_key: None }
    }
}

/// `[http]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    /// Serve plain HTTP instead of HTTPS. Allowed only on a loopback address.
    #[serde(default)]
    pub plain_http: bool,
    /// HTTPS certificate chain (PEM), relative to the data directory.
    #[serde(default = "default_tls_cert")]
    pub tls_cert: String,
    /// HTTPS private key (PEM), relative to the data directory.
    #[serde(default = "default_tls_key")]
    pub tls_key: String,
}

pub(crate) fn default_tls_cert() -> String {
    "keys/tls-cert.pem".into()
}

pub(crate) fn default_tls_key() -> String {
    "keys/tls-key.pem".into()
}

/// Whether `listen` (`host:port`) is a loopback address.
pub fn is_loopback_listen(listen: &str) -> bool {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(address) => address.ip().is_loopback(),
        Err(_) => listen.rsplit_once(':').is_some_and(|(host, _)| host == "localhost"),
    }
}

impl HttpConfig {
    /// Refuses plain HTTP on anything but loopback.
    pub fn check_listen(&self, listen: &str) -> anyhow::Result<()> {
        if self.plain_http && !is_loopback_listen(listen) {
            bail!(
                "plain HTTP is allowed only on a loopback address, not {listen}; \
                 平文HTTPはループバックアドレスでのみ使えます（http.plain_http = false にして HTTPS を使ってください）"
            );
        }
        Ok(())
    }
}

fn default_body_limit() -> usize {
    64 * 1024
}

/// `[campaign]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CampaignConfig {
    /// The first day a vaccination may be recorded for.
    pub start: Date,
}

/// `[storage]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StorageConfig {
    /// How many resident documents the writer keeps loaded (about 20 KB each).
    pub cache_documents: usize,
    /// Most captures committed together in one durable commit.
    pub group_commit_max: usize,
    /// redb page cache of the running node, in MiB. A server that can hold its whole
    /// store (about 2.3 KB per resident) avoids reading documents from disk on capture.
    #[serde(default = "default_page_cache_mib")]
    pub page_cache_mib: usize,
}

fn default_page_cache_mib() -> usize {
    512
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { cache_documents: 10_000, group_commit_max: 512, page_cache_mib: default_page_cache_mib() }
    }
}

/// Everything a running node needs from its data directory.
pub struct NodeFiles {
    /// The data directory.
    pub dir: PathBuf,
    /// Parsed `node.toml`.
    pub config: NodeConfig,
    /// Parsed `catalogue.toml`.
    pub catalogue: Catalogue,
    /// The coupon-signing key.
    pub signing_key: Ed25519KeyPair,
    /// Person-key secret.
    pub person_secret: PersonKeySecret,
    /// Automerge actor id bytes.
    pub actor: Vec<u8>,
    /// The key that signs audit checkpoints.
    pub audit_key: Ed25519KeyPair,
}

impl NodeFiles {
    /// The redb file.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join("store.redb")
    }

    /// Another handle on the coupon key (the writer owns `signing_key`; the HTTP side, the
    /// capture service and the statistics reporter each need one too).
    pub fn coupon_key(&self) -> anyhow::Result<Ed25519KeyPair> {
        read_coupon_key(&self.dir)
    }

    /// Loads a data directory made by `init`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let config_path = dir.join("node.toml");
        let text = fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {} (run `vrs-node init` first)", config_path.display()))?;
        let config: NodeConfig =
            toml::from_str(&text).with_context(|| format!("{} is invalid", config_path.display()))?;
        let catalogue = load_catalogue(&dir.join("catalogue.toml"))?;
        let signing_key = read_coupon_key(dir)?;
        let secret = read_hex(&dir.join("keys/person-key.secret"), 32)?;
        let secret: [u8; 32] = secret.try_into().map_err(|_| anyhow::anyhow!("secret length"))?;
        let actor = read_hex(&dir.join("keys/node-actor"), 16)?;
        let pkcs8 = fs::read(dir.join("keys/audit-signing.pk8")).context("keys/audit-signing.pk8")?;
        let audit_key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("keys/audit-signing.pk8 is not an Ed25519 key: {e}"))?;
        Ok(Self {
            dir: dir.to_owned(),
            config,
            catalogue,
            signing_key,
            person_secret: PersonKeySecret::new(&secret),
            actor,
            audit_key,
        })
    }

    /// The audit log writer of this node.
    pub fn audit_log(&self) -> anyhow::Result<AuditLog> {
        let pkcs8 = fs::read(self.dir.join("keys/audit-signing.pk8")).context("keys/audit-signing.pk8")?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("keys/audit-signing.pk8 is not an Ed25519 key: {e}"))?;
        Ok(AuditLog::new(key, self.config.municipality, self.config.auth.audit_checkpoint_every))
    }

    /// Appends a command-line audit entry (and a checkpoint) in its own durable commit.
    pub fn audit_cli(&self, store: &Store, action: &str, subject: &str, outcome: &str) -> anyhow::Result<()> {
        let audit = self.audit_log()?;
        let now = time::OffsetDateTime::now_utc();
        let txn = store.begin_write()?;
        audit.append(&txn, &cli_event(action, subject, outcome), now)?;
        audit.checkpoint(&txn, now)?;
        txn.commit()?;
        Ok(())
    }

    /// The public half of the audit key.
    pub fn audit_public_key(&self) -> Vec<u8> {
        self.audit_key.public_key().as_ref().to_vec()
    }

    /// A path from node.toml, relative to the data directory unless absolute.
    pub fn path_of(&self, configured: &str) -> PathBuf {
        self.dir.join(configured)
    }

    /// The public half of the coupon-signing key.
    pub fn signing_public_key(&self) -> Vec<u8> {
        self.signing_key.public_key().as_ref().to_vec()
    }
}

/// Reads and checks a catalogue file.
pub fn load_catalogue(path: &Path) -> anyhow::Result<Catalogue> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let catalogue: Catalogue =
        toml::from_str(&text).with_context(|| format!("{} is invalid", path.display()))?;
    catalogue.validate().with_context(|| format!("{} is invalid", path.display()))?;
    Ok(catalogue)
}

/// A 32-byte secret kept as hex in the data directory (`keys/person-key.secret`,
/// `keys/encryption.key`).
pub fn read_secret32(dir: &Path, name: &str) -> anyhow::Result<[u8; 32]> {
    read_hex(&dir.join(name), 32)?.try_into().map_err(|_| anyhow::anyhow!("{name} must hold 32 bytes"))
}

fn read_hex(path: &Path, n_bytes: usize) -> anyhow::Result<Vec<u8>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = text.trim();
    if text.len() != n_bytes * 2 {
        bail!("{} must hold {} hex digits", path.display(), n_bytes * 2);
    }
    hex_decode(text).with_context(|| format!("{} is not hex", path.display()))
}

/// What `init` was asked for.
pub struct InitOptions {
    /// Role.
    pub role: Role,
    /// Municipality.
    pub municipality: MunicipalityCode,
    /// Listen address.
    pub listen: String,
    /// Campaign start.
    pub campaign_start: Date,
    /// The federation's person-key secret, if the operator was given one.
    pub person_key_secret: Option<PathBuf>,
    /// Serve plain HTTP (loopback only).
    pub plain_http: bool,
    /// The operator's certificate and key (PEM), copied into `keys/`; self-signed if absent.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra DNS names or addresses for the self-signed certificate.
    pub tls_names: Vec<String>,
    /// libp2p listen address.
    pub p2p_listen: Option<String>,
    /// A standby copies the primary's coupon key and person-key secret from this `keys/`.
    pub keys_from: Option<PathBuf>,
    /// A terminal: its venue and node, and the identity it enrolled with.
    pub terminal: Option<(crate::terminal::TerminalConfig, libp2p::identity::Keypair)>,
}

impl InitOptions {
    /// A node served over plain HTTP on a loopback `listen` address (tests, the demo, a
    /// venue laptop), with everything else at its default: generated keys, no federation.
    pub fn loopback(role: Role, municipality: MunicipalityCode, listen: &str, campaign_start: Date) -> Self {
        Self {
            role,
            municipality,
            listen: listen.to_owned(),
            campaign_start,
            person_key_secret: None,
            plain_http: true,
            tls: None,
            tls_names: Vec::new(),
            p2p_listen: None,
            keys_from: None,
            terminal: None,
        }
    }
}

/// Refuses a directory that already holds a node, so nothing in it is overwritten.
pub fn refuse_existing_node(dir: &Path) -> anyhow::Result<()> {
    if dir.join("node.toml").exists() || dir.join(crate::federation::NATIONAL_CONFIG).exists() {
        bail!(
            "{0} にはすでにノードがあります（上書きしません） / {0} already holds a node; refusing to overwrite it",
            dir.display()
        );
    }
    Ok(())
}

/// Creates a data directory: keys, certificate, config, catalogue, and the store with the
/// initial administrator's API token. Returns that token, shown once.
pub fn init_data_dir(dir: &Path, options: &InitOptions) -> anyhow::Result<String> {
    match options.role {
        Role::Municipal => {}
        Role::Standby if options.keys_from.is_some() => {}
        Role::Standby => bail!(
            "a standby needs the primary's coupon-signing key and person-key secret: give --keys-from PRIMARY_DATA/keys"
        ),
        Role::National => bail!("the national node is created with `vrs-node federation init-national`"),
        Role::Terminal if options.terminal.is_some() => {}
        Role::Terminal => {
            bail!("a terminal is created with --enroll TOKEN (from `vrs-node terminal enrol-token`)")
        }
    }
    if !options.municipality.is_known() {
        bail!("{} is not one of Japan's 1,741 municipalities", options.municipality);
    }
    if options.plain_http && !is_loopback_listen(&options.listen) {
        bail!(
            "--plain-http needs a loopback --listen address (got {}); 平文HTTPはループバックでのみ使えます",
            options.listen
        );
    }
    refuse_existing_node(dir)?;
    fs::create_dir_all(dir.join("keys")).with_context(|| format!("cannot create {}", dir.display()))?;
    let rng = SystemRandom::new();
    let pkcs8 = match &options.keys_from {
        Some(keys) => fs::read(keys.join("coupon-signing.pk8"))
            .with_context(|| format!("cannot read {}", keys.join("coupon-signing.pk8").display()))?,
        None => Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("key generation failed"))?
            .as_ref()
            .to_vec(),
    };
    write_private(&dir.join("keys/coupon-signing.pk8"), &pkcs8)?;
    let secret = match (&options.keys_from, &options.person_key_secret) {
        (Some(keys), _) => read_hex(&keys.join("person-key.secret"), 32)?,
        (None, Some(path)) => read_hex(path, 32)?,
        (None, None) => random_bytes(&rng, 32)?,
    };
    match &options.terminal {
        Some((_, keypair)) => {
            let bytes =
                keypair.to_protobuf_encoding().map_err(|e| anyhow::anyhow!("cannot encode the key: {e}"))?;
            write_private(&dir.join("keys/p2p-identity.key"), &bytes)?;
        }
        None => {
            crate::p2p::load_or_create_identity(&dir.join("keys/p2p-identity.key"))?;
        }
    }
    write_private(&dir.join("keys/person-key.secret"), hex_lower(&secret).as_bytes())?;
    // The node's X25519 key: sealed handoffs are encrypted for it. A standby shares its
    // primary's, so that once promoted it opens what was sent to the municipality.
    let encryption = match &options.keys_from {
        Some(keys) => read_hex(&keys.join("encryption.key"), 32)?,
        None => random_bytes(&rng, 32)?,
    };
    write_private(&dir.join("keys/encryption.key"), hex_lower(&encryption).as_bytes())?;
    write_private(&dir.join("keys/node-actor"), hex_lower(&random_bytes(&rng, 16)?).as_bytes())?;
    let audit_pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("key generation failed"))?;
    write_private(&dir.join("keys/audit-signing.pk8"), audit_pkcs8.as_ref())?;
    let audit_key = Ed25519KeyPair::from_pkcs8(audit_pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("generated audit key unreadable: {e}"))?;
    fs::write(
        dir.join("keys/audit-signing.pub"),
        format!("{}\n", hex_lower(audit_key.public_key().as_ref())),
    )?;
    match &options.tls {
        Some((cert, key)) => {
            crate::tls::load_server_config(cert, key)
                .with_context(|| format!("--tls-cert {} / --tls-key {}", cert.display(), key.display()))?;
            fs::copy(cert, dir.join(default_tls_cert()))
                .with_context(|| format!("cannot copy {}", cert.display()))?;
            let key_pem = fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
            write_private(&dir.join(default_tls_key()), &key_pem)?;
        }
        None => {
            let (cert_pem, key_pem) = crate::tls::self_signed(&options.listen, &options.tls_names)?;
            fs::write(dir.join(default_tls_cert()), cert_pem)?;
            write_private(&dir.join(default_tls_key()), key_pem.as_bytes())?;
        }
    }
    let config = NodeConfig {
        role: options.role,
        municipality: options.municipality,
        http: HttpConfig {
            listen: options.listen.clone(),
            max_body_bytes: default_body_limit(),
            plain_http: options.plain_http,
            tls_cert: default_tls_cert(),
            tls_key: default_tls_key(),
        },
        campaign: CampaignConfig { start: options.campaign_start },
        storage: StorageConfig::default(),
        auth: AuthPolicy::default(),
        handoff: HandoffConfig::default(),
        p2p: P2pConfig {
            listen: options.p2p_listen.clone().unwrap_or_else(|| P2pConfig::default().listen),
            ..P2pConfig::default()
        },
        terminal: options.terminal.as_ref().map(|(config, _)| config.clone()),
    };
    write_config(dir, &config)?;
    fs::write(dir.join("catalogue.toml"), DEFAULT_CATALOGUE)?;
    let files = NodeFiles::load(dir)?;
    let store = Store::open(&files.store_path())?;
    let audit = files.audit_log()?;
    let now = time::OffsetDateTime::now_utc();
    let txn = store.begin_write()?;
    let (token, _) = crate::auth::add_token(
        &txn,
        options.municipality,
        "initial-admin",
        crate::auth::Role::MunicipalAdmin,
        Vec::new(),
        None,
        now,
    )?
    .map_err(|p| anyhow::anyhow!("{}", p.message_en))?;
    audit.append(&txn, &cli_event("token.add", "token:initial-admin", "ok"), now)?;
    audit.checkpoint(&txn, now)?;
    txn.commit()?;
    Ok(token)
}

/// The X25519 public key of a node's `keys/encryption.key`.
pub fn encryption_public_key(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let secret: [u8; 32] = read_hex(&dir.join("keys/encryption.key"), 32)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("keys/encryption.key must hold 32 bytes"))?;
    let secret = x25519_dalek::StaticSecret::from(secret);
    Ok(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

/// An audit event for work done from the command line (by whoever has the server's shell).
pub fn cli_event(action: &str, subject: &str, outcome: &str) -> AuditEvent {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .or_else(|| {
            // No login environment (a service, a container): the numeric uid.
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let uid =
                status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.to_owned();
            Some(format!("uid{uid}"))
        })
        .unwrap_or_else(|| "unknown".into());
    AuditEvent {
        actor: format!("cli:{user}"),
        role: "server_operator".into(),
        action: action.into(),
        subject: subject.into(),
        outcome: outcome.into(),
        request_id: "-".into(),
    }
}

/// Writes `node.toml`.
pub fn write_config(dir: &Path, config: &NodeConfig) -> anyhow::Result<()> {
    let text = toml::to_string(config)?;
    fs::write(dir.join("node.toml"), format!("# vrs-node configuration\n{text}"))?;
    Ok(())
}

/// Random bytes from the operating system.
pub fn random_bytes(rng: &SystemRandom, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut bytes = vec![0u8; n];
    rng.fill(&mut bytes).map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(bytes)
}

/// SHA-256 in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex_lower(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Writes a file only the node's user may read (0600), durably; refuses to overwrite.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// The municipality's coupon-signing key, `keys/coupon-signing.pk8`.
fn read_coupon_key(dir: &Path) -> anyhow::Result<Ed25519KeyPair> {
    let pkcs8 = fs::read(dir.join("keys/coupon-signing.pk8")).context("keys/coupon-signing.pk8")?;
    Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|e| anyhow::anyhow!("keys/coupon-signing.pk8 is not an Ed25519 key: {e}"))
}
