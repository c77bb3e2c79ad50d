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
//! keys/admin-token.sha256   SHA-256 of the initial admin API token
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use protocol::catalogue::Catalogue;
use protocol::municipality::MunicipalityCode;
use protocol::person::{PersonKeySecret, hex_lower};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use time::Date;

/// The catalogue a new node starts with.
pub const DEFAULT_CATALOGUE: &str = include_str!("../data/catalogue.toml");

/// What the node does in the federation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A municipality's node: owns its residents.
    Municipal,
    /// A venue laptop (arrives with the federation issue).
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
}

/// `[http]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
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
    /// SHA-256 (hex) of the admin token.
    pub admin_token_sha256: String,
}

impl NodeFiles {
    /// The redb file.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join("store.redb")
    }

    /// Loads a data directory made by `init`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let config_path = dir.join("node.toml");
        let text = fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {} (run `vrs-node init` first)", config_path.display()))?;
        let config: NodeConfig =
            toml::from_str(&text).with_context(|| format!("{} is invalid", config_path.display()))?;
        let catalogue = load_catalogue(&dir.join("catalogue.toml"))?;
        let pkcs8 = fs::read(dir.join("keys/coupon-signing.pk8")).context("coupon-signing key")?;
        let signing_key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("keys/coupon-signing.pk8 is not an Ed25519 key: {e}"))?;
        let secret = read_hex(&dir.join("keys/person-key.secret"), 32)?;
        let secret: [u8; 32] = secret.try_into().map_err(|_| anyhow::anyhow!("secret length"))?;
        let actor = read_hex(&dir.join("keys/node-actor"), 16)?;
        let admin_token_sha256 = fs::read_to_string(dir.join("keys/admin-token.sha256"))
            .context("keys/admin-token.sha256")?
            .trim()
            .to_owned();
        Ok(Self {
            dir: dir.to_owned(),
            config,
            catalogue,
            signing_key,
            person_secret: PersonKeySecret::new(&secret),
            actor,
            admin_token_sha256,
        })
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

fn read_hex(path: &Path, n_bytes: usize) -> anyhow::Result<Vec<u8>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = text.trim();
    if text.len() != n_bytes * 2 {
        bail!("{} must hold {} hex digits", path.display(), n_bytes * 2);
    }
    (0..n_bytes)
        .map(|i| {
            u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .with_context(|| format!("{} is not hex", path.display()))
        })
        .collect()
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
}

/// Creates a data directory. Returns the initial admin token, shown once.
pub fn init_data_dir(dir: &Path, options: &InitOptions) -> anyhow::Result<String> {
    if options.role != Role::Municipal {
        bail!(
            "role {:?} is not available in this version; only `municipal` nodes can be created",
            options.role
        );
    }
    if !options.municipality.is_known() {
        bail!("{} is not one of Japan's 1,741 municipalities", options.municipality);
    }
    if dir.join("node.toml").exists() {
        bail!("{} already holds a node (node.toml exists); refusing to overwrite", dir.display());
    }
    fs::create_dir_all(dir.join("keys")).with_context(|| format!("cannot create {}", dir.display()))?;
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("key generation failed"))?;
    write_private(&dir.join("keys/coupon-signing.pk8"), pkcs8.as_ref())?;
    let secret = match &options.person_key_secret {
        Some(path) => read_hex(path, 32)?,
        None => random_bytes(&rng, 32)?,
    };
    write_private(&dir.join("keys/person-key.secret"), hex_lower(&secret).as_bytes())?;
    write_private(&dir.join("keys/node-actor"), hex_lower(&random_bytes(&rng, 16)?).as_bytes())?;
    let token = format!("vrs_{}", hex_lower(&random_bytes(&rng, 32)?));
    write_private(&dir.join("keys/admin-token.sha256"), sha256_hex(token.as_bytes()).as_bytes())?;
    let config = NodeConfig {
        role: options.role,
        municipality: options.municipality,
        http: HttpConfig { listen: options.listen.clone(), max_body_bytes: default_body_limit() },
        campaign: CampaignConfig { start: options.campaign_start },
        storage: StorageConfig::default(),
    };
    let text = toml::to_string(&config)?;
    fs::write(dir.join("node.toml"), format!("# vrs-node configuration\n{text}"))?;
    fs::write(dir.join("catalogue.toml"), DEFAULT_CATALOGUE)?;
    Ok(token)
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

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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
