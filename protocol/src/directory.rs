//! The federation directory: which node speaks for which municipality, signed by the national
//! node, the federation's root of trust.
//!
//! Every node keeps the newest directory it has verified. It accepts connections only from
//! peer ids listed there and decides what a peer may see by the entry's role and
//! municipality. A directory is accepted only with a valid signature by the national key the
//! operator configured, and only if its version is newer than the one held.

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::municipality::MunicipalityCode;
use crate::person::{hex_decode, hex_lower};

/// What a node is in the federation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// The national node.
    National,
    /// A municipality's primary node.
    Municipal,
    /// A municipality's standby replica.
    Standby,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// The municipality it serves (`None` for the national node).
    pub municipality: Option<MunicipalityCode>,
    /// Its role.
    pub role: NodeRole,
    /// libp2p peer id (base58).
    pub peer_id: String,
    /// Where to reach it (multiaddrs).
    pub addresses: Vec<String>,
    /// Ed25519 public key (hex) that verifies the municipality's coupons; empty for national.
    pub coupon_key: String,
    /// X25519 public key (hex) of the municipality's node: what is sent to it sealed (a
    /// relocation handoff) is encrypted for this key. Empty for national.
    #[serde(default)]
    pub encryption_key: String,
}

/// The directory's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Increases with every change.
    pub version: u64,
    /// When the national node signed it (RFC 3339).
    pub issued_at: String,
    /// Every node.
    pub entries: Vec<DirectoryEntry>,
}

/// A directory and the national node's signature over its canonical JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDirectory {
    /// Content.
    pub directory: Directory,
    /// Ed25519 signature (hex).
    pub signature: String,
}

/// Why a directory was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// Bad signature.
    #[error("the directory's signature does not verify with the national key")]
    BadSignature,
    /// Not newer.
    #[error("directory version {offered} is not newer than {held}")]
    NotNewer {
        /// Offered.
        offered: u64,
        /// Held.
        held: u64,
    },
    /// Malformed content.
    #[error("the directory is malformed: {0}")]
    Malformed(String),
}

fn message(directory: &Directory) -> Vec<u8> {
    let mut bytes = b"vrs-directory/1\n".to_vec();
    bytes.extend(serde_json::to_vec(directory).unwrap_or_default());
    bytes
}

impl SignedDirectory {
    /// Signs a directory with the national key.
    pub fn sign(directory: Directory, key: &Ed25519KeyPair) -> Self {
        let signature = hex_lower(key.sign(&message(&directory)).as_ref());
        Self { directory, signature }
    }

    /// Checks the signature with the national public key.
    pub fn verify(&self, national_key: &[u8]) -> Result<&Directory, DirectoryError> {
        let signature = hex_decode(&self.signature).ok_or(DirectoryError::BadSignature)?;
        UnparsedPublicKey::new(&ED25519, national_key)
            .verify(&message(&self.directory), &signature)
            .map_err(|_| DirectoryError::BadSignature)?;
        let mut seen = std::collections::HashSet::new();
        for entry in &self.directory.entries {
            if !seen.insert(&entry.peer_id) {
                return Err(DirectoryError::Malformed(format!("peer {} listed twice", entry.peer_id)));
            }
            if (entry.role == NodeRole::National) != entry.municipality.is_none() {
                return Err(DirectoryError::Malformed(format!(
                    "peer {}: only the national node has no municipality",
                    entry.peer_id
                )));
            }
        }
        Ok(&self.directory)
    }

    /// Verifies and checks that it is newer than `held`.
    pub fn accept(&self, national_key: &[u8], held: Option<u64>) -> Result<&Directory, DirectoryError> {
        let directory = self.verify(national_key)?;
        if let Some(held) = held
            && directory.version <= held
        {
            return Err(DirectoryError::NotNewer { offered: directory.version, held });
        }
        Ok(directory)
    }
}

impl Directory {
    /// The entry of a peer.
    pub fn peer(&self, peer_id: &str) -> Option<&DirectoryEntry> {
        self.entries.iter().find(|e| e.peer_id == peer_id)
    }

    /// The primary node of a municipality.
    pub fn primary_of(&self, municipality: MunicipalityCode) -> Option<&DirectoryEntry> {
        self.entries.iter().find(|e| e.role == NodeRole::Municipal && e.municipality == Some(municipality))
    }

    /// Adds or replaces the entry of `entry.peer_id`; a municipality keeps one primary.
    pub fn upsert(&mut self, entry: DirectoryEntry) {
        self.entries.retain(|e| e.peer_id != entry.peer_id);
        if entry.role == NodeRole::Municipal {
            // Promoting a standby: the old primary steps down to standby.
            for old in &mut self.entries {
                if old.role == NodeRole::Municipal && old.municipality == entry.municipality {
                    old.role = NodeRole::Standby;
                }
            }
        }
        self.entries.push(entry);
        self.entries.sort_by(|a, b| (a.municipality, &a.peer_id).cmp(&(b.municipality, &b.peer_id)));
    }
}

/// What may a peer read from this node's change feed: the replicas of its own municipality
/// see every resident document; nobody else sees any (statistics and handoffs come later).
pub fn may_replicate_residents(own: MunicipalityCode, peer: &DirectoryEntry) -> bool {
    peer.municipality == Some(own) && matches!(peer.role, NodeRole::Municipal | NodeRole::Standby)
}

/// A node's request to be listed, carried to the national administrator out of band.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The entry asked for.
    pub entry: DirectoryEntry,
    /// When it was made.
    pub requested_at: String,
}
