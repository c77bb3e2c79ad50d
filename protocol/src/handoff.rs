//! Relocation handoff: a resident's record, sealed by the municipality they leave for the
//! municipality they move to, relayed by the national node, which can read only the
//! envelope.
//!
//! Sealing (version 1):
//!
//! 1. an ephemeral X25519 key pair (the caller passes the 32 random bytes, so the simulator
//!    can replay it) is agreed with the receiving node's X25519 key from the directory;
//! 2. HKDF-SHA-256 (salt `vrs-handoff/1`, info = ephemeral public key ‖ receiver's key)
//!    turns the shared secret into a ChaCha20-Poly1305 key, used once (nonce zero);
//! 3. the payload's JSON is encrypted with the envelope's header as associated data, so a
//!    ciphertext cannot be moved under another header;
//! 4. the sender signs header ‖ ephemeral key ‖ ciphertext with its Ed25519 coupon key
//!    (the key the directory publishes), so the national node and the receiver both know
//!    who sent it, and nobody can swap the ciphertext.
//!
//! The header holds what the national ledger needs and nothing more: the handoff id, the two
//! municipality codes, the pseudonymous person key and the time.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::document::{ResidentRecord, ResidentStatus};
use crate::municipality::MunicipalityCode;
use crate::person::{hex_decode, hex_lower};

/// The version tag bound into every key derivation and signature.
const CONTEXT: &[u8] = b"vrs-handoff/1";

/// Most sealed handoffs in one message, either way.
pub const MAX_HANDOFFS_PER_MESSAGE: usize = 256;

/// What the sending municipality seals: the whole record, as it left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffPayload {
    /// Unique id of the handoff.
    pub handoff_id: String,
    /// The municipality the resident left.
    pub from: MunicipalityCode,
    /// The municipality they moved to.
    pub to: MunicipalityCode,
    /// Their person key (the same in every municipality).
    pub person_key: String,
    /// Their record as it is after the transfer: identity, coupons, doses, corrections.
    pub record: ResidentRecord,
    /// When it was sealed (RFC 3339).
    pub sealed_at: String,
}

/// The envelope: a clear header, the sealed payload, the sender's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedHandoff {
    /// Unique id of the handoff.
    pub handoff_id: String,
    /// Sender.
    pub from: MunicipalityCode,
    /// Receiver.
    pub to: MunicipalityCode,
    /// The person key.
    pub person_key: String,
    /// When it was sealed (RFC 3339).
    pub sealed_at: String,
    /// The ephemeral X25519 public key (hex).
    pub ephemeral_key: String,
    /// ChaCha20-Poly1305 ciphertext of the payload's JSON, tag appended.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// Ed25519 signature (hex) by the sender's coupon key.
    pub signature: String,
}

/// Why a handoff could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    /// The envelope is not well formed.
    #[error("malformed handoff: {0}")]
    Malformed(String),
    /// The signature does not verify with the sender's key.
    #[error("the handoff's signature does not verify with the key of {0}")]
    BadSignature(MunicipalityCode),
    /// The ciphertext does not decrypt with this node's key (not for us, or altered).
    #[error("the handoff does not decrypt with this node's key")]
    Undecryptable,
    /// The decrypted payload contradicts its envelope.
    #[error("the payload does not match its envelope: {0}")]
    Mismatch(String),
}

impl HandoffError {
    /// A stable code.
    pub fn code(&self) -> &'static str {
        match self {
            HandoffError::Malformed(_) => "malformed_handoff",
            HandoffError::BadSignature(_) => "bad_signature",
            HandoffError::Undecryptable => "undecryptable",
            HandoffError::Mismatch(_) => "payload_mismatch",
        }
    }
}

impl SealedHandoff {
    fn header(&self) -> Vec<u8> {
        header(&self.handoff_id, self.from, self.to, &self.person_key, &self.sealed_at)
    }

    fn signed_message(&self, ephemeral: &[u8]) -> Vec<u8> {
        let mut message = self.header();
        message.extend_from_slice(ephemeral);
        message.extend_from_slice(&self.ciphertext);
        message
    }

    /// Checks the envelope's shape and the sender's signature (`sender_key`: the sender's
    /// Ed25519 coupon key from the directory). What the national node checks.
    pub fn verify(&self, sender_key: &[u8]) -> Result<(), HandoffError> {
        if !is_handoff_id(&self.handoff_id) {
            return Err(HandoffError::Malformed(format!("handoff id {:?}", self.handoff_id)));
        }
        if self.from == self.to {
            return Err(HandoffError::Malformed("sender and receiver are the same municipality".into()));
        }
        if self.person_key.is_empty() || self.person_key.len() > 64 || !self.person_key.is_ascii() {
            return Err(HandoffError::Malformed("person key".into()));
        }
        if self.sealed_at.len() > 40 {
            return Err(HandoffError::Malformed("sealed_at".into()));
        }
        let ephemeral = self.ephemeral()?;
        let signature = hex_decode(&self.signature)
            .ok_or_else(|| HandoffError::Malformed("signature is not hex".into()))?;
        UnparsedPublicKey::new(&ED25519, sender_key)
            .verify(&self.signed_message(&ephemeral), &signature)
            .map_err(|_| HandoffError::BadSignature(self.from))
    }

    fn ephemeral(&self) -> Result<[u8; 32], HandoffError> {
        hex_decode(&self.ephemeral_key)
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| HandoffError::Malformed("ephemeral key is not 32 bytes of hex".into()))
    }

    /// Verifies, decrypts with this node's X25519 secret and checks the payload against the
    /// envelope. What the receiving node does.
    pub fn open(
        &self,
        sender_key: &[u8],
        recipient_secret: &[u8; 32],
    ) -> Result<HandoffPayload, HandoffError> {
        self.verify(sender_key)?;
        let ephemeral = self.ephemeral()?;
        let secret = x25519_dalek::StaticSecret::from(*recipient_secret);
        let recipient_public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral));
        if !shared.was_contributory() {
            return Err(HandoffError::Undecryptable);
        }
        let key = aead_key(shared.as_bytes(), &ephemeral, &recipient_public)?;
        let mut buffer = self.ciphertext.clone();
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(self.header()), &mut buffer)
            .map_err(|_| HandoffError::Undecryptable)?;
        let payload: HandoffPayload =
            serde_json::from_slice(plain).map_err(|e| HandoffError::Mismatch(format!("payload: {e}")))?;
        let same = payload.handoff_id == self.handoff_id
            && payload.from == self.from
            && payload.to == self.to
            && payload.person_key == self.person_key
            && payload.sealed_at == self.sealed_at;
        if !same {
            return Err(HandoffError::Mismatch("header fields differ".into()));
        }
        if payload.record.person_key != payload.person_key || payload.record.municipality != payload.from {
            return Err(HandoffError::Mismatch("the record is of another person or municipality".into()));
        }
        Ok(payload)
    }
}

/// Seals `payload` for the node whose X25519 public key is `recipient_key`, signed with the
/// sender's coupon key. `ephemeral_secret` must be 32 fresh random bytes.
pub fn seal(
    payload: &HandoffPayload,
    signer: &Ed25519KeyPair,
    recipient_key: &[u8; 32],
    ephemeral_secret: [u8; 32],
) -> Result<SealedHandoff, HandoffError> {
    let secret = x25519_dalek::StaticSecret::from(ephemeral_secret);
    let ephemeral = x25519_dalek::PublicKey::from(&secret).to_bytes();
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*recipient_key));
    if !shared.was_contributory() {
        return Err(HandoffError::Malformed("the receiver's encryption key is not usable".into()));
    }
    let key = aead_key(shared.as_bytes(), &ephemeral, recipient_key)?;
    let mut ciphertext =
        serde_json::to_vec(payload).map_err(|e| HandoffError::Malformed(format!("payload: {e}")))?;
    let header =
        header(&payload.handoff_id, payload.from, payload.to, &payload.person_key, &payload.sealed_at);
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(header), &mut ciphertext)
        .map_err(|_| HandoffError::Malformed("encryption failed".into()))?;
    let mut sealed = SealedHandoff {
        handoff_id: payload.handoff_id.clone(),
        from: payload.from,
        to: payload.to,
        person_key: payload.person_key.clone(),
        sealed_at: payload.sealed_at.clone(),
        ephemeral_key: hex_lower(&ephemeral),
        ciphertext,
        signature: String::new(),
    };
    sealed.signature = hex_lower(signer.sign(&sealed.signed_message(&ephemeral)).as_ref());
    Ok(sealed)
}

fn header(
    handoff_id: &str,
    from: MunicipalityCode,
    to: MunicipalityCode,
    person_key: &str,
    at: &str,
) -> Vec<u8> {
    let mut header = CONTEXT.to_vec();
    header.extend_from_slice(format!("\n{handoff_id}\n{from}\n{to}\n{person_key}\n{at}\n").as_bytes());
    header
}

fn aead_key(shared: &[u8], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> Result<LessSafeKey, HandoffError> {
    let info: [&[u8]; 2] = [ephemeral, recipient];
    let prk = Salt::new(HKDF_SHA256, CONTEXT).extract(shared);
    let okm = prk
        .expand(&info, &CHACHA20_POLY1305)
        .map_err(|_| HandoffError::Malformed("key derivation failed".into()))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Handoff ids: `ho-` and 1–61 ASCII letters, digits or dashes.
pub fn is_handoff_id(id: &str) -> bool {
    id.len() <= 64
        && id.strip_prefix("ho-").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The record the receiving municipality creates from a handoff: the same person, history
/// and corrections, under the receiver's id, atena number and address, active. Venues of
/// the old municipality are named with its code (`141003/venue-1`), as for a dose given
/// away from home, so the doses count where they were given and use no stock here.
pub fn received_record(
    payload: &HandoffPayload,
    resident_id: String,
    atena_number: String,
    address: Option<String>,
) -> ResidentRecord {
    let mut record = payload.record.clone();
    record.resident_id = resident_id;
    record.municipality = payload.to;
    record.identity.atena_number = atena_number;
    if let Some(address) = address {
        record.identity.address = address;
    }
    record.identity.status = ResidentStatus::Active;
    record.transfer = None;
    record.arrival = Some(arrival_of(payload));
    for dose in record.doses.values_mut() {
        if !dose.venue.contains('/') {
            dose.venue = format!("{}/{}", payload.from, dose.venue);
        }
    }
    record
}

/// The arrival a handoff notes in the receiver's record: every coupon it carried.
fn arrival_of(payload: &HandoffPayload) -> crate::document::Arrival {
    crate::document::Arrival {
        from: payload.from,
        handoff_id: payload.handoff_id.clone(),
        carried: payload.record.coupons.keys().cloned().collect(),
    }
}

/// What a handoff adds to a resident the receiving municipality registered before it
/// arrived (from its register extract): the history exactly as [`received_record`] would
/// hold it, for [`ResidentEvent::HistoryReceived`](crate::document::ResidentEvent).
pub fn received_history(payload: &HandoffPayload) -> crate::document::ReceivedHistory {
    let record = received_record(payload, String::new(), String::new(), None);
    crate::document::ReceivedHistory {
        arrival: arrival_of(payload),
        coupons: record.coupons,
        doses: record.doses,
        corrections: record.corrections,
    }
}

/// The atena number given to a resident accepted without one (automatic acceptance of a
/// move the old municipality triggered): `T` and 19 characters of the handoff id.
pub fn provisional_atena(handoff_id: &str) -> String {
    let tail: String = handoff_id.trim_start_matches("ho-").chars().take(19).collect();
    format!("T{tail}")
}

/// Whether `record` still holds the provisional atena number it was given when a handoff was
/// accepted without one; the next register extract replaces it with the real 宛名番号.
pub fn holds_provisional_atena(record: &ResidentRecord) -> bool {
    record.transfer.is_none()
        && record
            .arrival
            .as_ref()
            .is_some_and(|a| record.identity.atena_number == provisional_atena(&a.handoff_id))
}

/// The actor of the amendments a join makes (`handoff:<id>`): how staff, and a standby that
/// replays the acceptance, find the doses that join renumbered.
pub fn join_actor(handoff_id: &str) -> String {
    format!("handoff:{handoff_id}")
}

/// Why a handoff's history cannot join the resident who already holds its person key here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    /// That resident came by another handoff.
    ArrivedByAnotherHandoff,
    /// The register's birth date differs from the handoff's record: maybe another person.
    BirthDateDiffers,
}

/// How a handoff's history joins a resident this municipality registered from its register
/// extract before the handoff arrived. The resident keeps their id, atena number and
/// identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Join {
    /// The commits, in order: the history; an amendment of each dose whose number changes
    /// once the two histories are one (doses given here before the history arrived were
    /// numbered without it: they now follow the history's); the revocation of each of this
    /// municipality's valid coupons for a dose now given.
    pub events: Vec<crate::document::ResidentEvent>,
    /// The doses renumbered, by event id.
    pub renumbered: Vec<String>,
    /// The dose the resident receives next.
    pub next: u8,
    /// This municipality's valid coupon for that dose, if it issued one; when there is none
    /// (and `next` is at most 9) the caller issues it.
    pub current: Option<crate::document::CouponEntry>,
}

/// Plans joining `payload`'s history to `held`, the active resident holding its person key
/// here: refused if `held` came by another handoff or the birth dates differ. If doses were
/// recorded here before the history arrived (the person was vaccinated here with this
/// municipality's coupon, numbered as if they had no history), every dose is kept and the
/// valid ones are numbered again: the history's first (given before the move), then those
/// given here, each change an amendment with its reason, at `at`. The node's acceptance and
/// the simulator both follow this plan.
pub fn join_history(
    held: &ResidentRecord,
    payload: &HandoffPayload,
    at: time::OffsetDateTime,
) -> Result<Join, JoinRefusal> {
    use crate::document::{CouponStatus, DoseStatus, ResidentEvent};
    if held.arrival.is_some() {
        return Err(JoinRefusal::ArrivedByAnotherHandoff);
    }
    if held.identity.birth_date != payload.record.identity.birth_date {
        return Err(JoinRefusal::BirthDateDiffers);
    }
    let history = received_history(payload);
    let mut joined = held.clone();
    joined.coupons.extend(history.coupons.clone());
    joined.doses.extend(history.doses.clone());
    joined.corrections.extend(history.corrections.clone());
    joined.arrival = Some(history.arrival.clone());
    let from_history: std::collections::BTreeSet<String> = history
        .doses
        .values()
        .filter(|d| d.status == DoseStatus::Valid)
        .map(|d| d.event_id.clone())
        .collect();
    let mut events = vec![ResidentEvent::HistoryReceived(Box::new(history))];
    let mut renumbered = Vec::new();
    if !from_history.is_empty() && held.doses.values().any(|d| d.status == DoseStatus::Valid) {
        // The history's doses were given before the move, those recorded here after it: the
        // history's first, each part in its own order.
        let mut ordered = joined.valid_doses();
        ordered.sort_by_key(|d| !from_history.contains(&d.event_id));
        let correction_prefix = format!("corr-{}", payload.handoff_id);
        let actor = join_actor(&payload.handoff_id);
        let why_ja = format!("転入前の接種歴と統合（引き継ぎ {}）", payload.handoff_id);
        let why_en =
            format!("numbered with the history from before the move (handoff {})", payload.handoff_id);
        let why = crate::validation::Renumbering {
            why_ja: &why_ja,
            why_en: &why_en,
            actor: &actor,
            at,
            correction_prefix: &correction_prefix,
        };
        for event in crate::validation::renumbering(&ordered, &why) {
            if let ResidentEvent::DoseAmended { amended, .. } = &event {
                renumbered.push(amended.event_id.clone());
            }
            events.push(event);
        }
    }
    let next = joined.next_dose_number();
    for coupon in joined.coupons.values() {
        if coupon.status == CouponStatus::Valid && !joined.carried(coupon) && coupon.code.dose_round < next {
            events.push(ResidentEvent::CouponRevoked {
                key: coupon.key(),
                reason: format!(
                    "この回は接種済み（引き継ぎ {id} の接種歴と統合）/ that dose is given (history joined from handoff {id})",
                    id = payload.handoff_id
                ),
            });
        }
    }
    let current = joined.valid_coupon_for_dose(next).filter(|c| !joined.carried(c)).cloned();
    Ok(Join { events, renumbered, next, current })
}

/// What a municipal node sends the national node, and what it receives, on
/// `/vrs/handoff/1`. The national node never calls a municipality: each municipal primary
/// asks every few hundred milliseconds (at once when it has something to send), so a node
/// that was down picks up where it left off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffSync {
    /// Sealed handoffs this node sends (each may be sent again until stored).
    pub deposits: Vec<SealedHandoff>,
    /// Handoffs this node has accepted, durably.
    pub accepted: Vec<String>,
    /// Handoffs this node sent and waits to see accepted.
    pub watching: Vec<String>,
    /// Newcomers this node registered (転入) whose history it asks for.
    pub asks: Vec<HistoryAsk>,
    /// Requests for history this node has dealt with.
    pub answered: Vec<AskAnswer>,
    /// Handoffs addressed to this node that it will not accept and sends back to their
    /// sender (each may be sent again until the ledger answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returned: Vec<ReturnedHandoff>,
}

/// A handoff the receiver sends back: the person stays with the sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnedHandoff {
    /// The handoff.
    pub handoff_id: String,
    /// Why, as a code: the national node relays it and must not hold staff's free text,
    /// which could name the person.
    pub reason: ReturnReason,
}

/// Why a receiver sent a handoff back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReturnReason {
    /// The birth date in the history is not the one in the receiver's register.
    BirthDateDiffers,
    /// The person is registered at the receiver already, by another handoff.
    AlreadyRegistered,
    /// The receiver has no 転入届 for this person: they did not move here.
    NotMovedHere,
    /// The receiver cannot open or read the handoff.
    Unreadable,
    /// Any other reason (the receiver's staff keep the details).
    Other,
    /// Not a receiver's reason: the national ledger refused the deposit for good (another
    /// municipality holds the person, a handoff id reused, a bad signature), so the handoff
    /// never reached the receiver and the sender takes the record back itself. A receiver
    /// cannot send it ([`ReturnReason::ALL`] leaves it out; the ledger relays it as `Other`).
    LedgerRefused,
}

impl ReturnReason {
    /// Every reason a receiver may give, in the order a form lists them.
    pub const ALL: [ReturnReason; 5] = [
        ReturnReason::BirthDateDiffers,
        ReturnReason::AlreadyRegistered,
        ReturnReason::NotMovedHere,
        ReturnReason::Unreadable,
        ReturnReason::Other,
    ];

    /// The stable code (as serialized).
    pub fn code(self) -> &'static str {
        match self {
            ReturnReason::BirthDateDiffers => "birth_date_differs",
            ReturnReason::AlreadyRegistered => "already_registered",
            ReturnReason::NotMovedHere => "not_moved_here",
            ReturnReason::Unreadable => "unreadable",
            ReturnReason::Other => "other",
            ReturnReason::LedgerRefused => "ledger_refused",
        }
    }

    /// The reason for a code, if it is one.
    pub fn from_code(code: &str) -> Option<ReturnReason> {
        ReturnReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// In Japanese, for staff.
    pub fn ja(self) -> &'static str {
        match self {
            ReturnReason::BirthDateDiffers => "生年月日が転入先の住民記録と一致しない",
            ReturnReason::AlreadyRegistered => "転入先で別の引き継ぎにより登録済み",
            ReturnReason::NotMovedHere => "転入先に転入の届出がない",
            ReturnReason::Unreadable => "転入先で引き継ぎデータを開けない",
            ReturnReason::Other => "その他（転入先に確認してください）",
            ReturnReason::LedgerRefused => "国の台帳が引き継ぎを受け付けなかった",
        }
    }

    /// In English.
    pub fn en(self) -> &'static str {
        match self {
            ReturnReason::BirthDateDiffers => "the birth date differs from the receiver's register",
            ReturnReason::AlreadyRegistered => "already registered at the receiver by another handoff",
            ReturnReason::NotMovedHere => "the receiver has no notice of moving in for this person",
            ReturnReason::Unreadable => "the receiver cannot open the handoff",
            ReturnReason::Other => "another reason (ask the receiver)",
            ReturnReason::LedgerRefused => "the national ledger refused the handoff",
        }
    }
}

/// A newcomer's history, asked for by person key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryAsk {
    /// Unique per ask: asking again (a corrected previous municipality, a person who
    /// returns) replaces the ledger's record of an older ask.
    pub ask_id: String,
    /// The newcomer's person key.
    pub person_key: String,
    /// [`crate::person::PersonKeySecret::birth_check`] of the birth date on the 転入届: the
    /// holder hands the person over only if it matches its record.
    pub birth_check: String,
    /// The municipality they came from, from the 転出証明書, when known.
    pub previous: Option<MunicipalityCode>,
}

/// A request, relayed to the municipality that holds the person, to hand them over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    /// The person key.
    pub person_key: String,
    /// The asker's birth check (see [`HistoryAsk::birth_check`]).
    pub birth_check: String,
    /// The municipality that registered them as a newcomer.
    pub asked_by: MunicipalityCode,
}

/// What the holder did with a [`HistoryRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskAnswer {
    /// The person key.
    pub person_key: String,
    /// Who asked.
    pub asked_by: MunicipalityCode,
    /// The handoff sent, or `None`: no active resident with this key here.
    pub handoff_id: Option<String>,
}

/// Where a handoff stands in the national ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerState {
    /// Stored at the national node, not yet accepted by the receiver.
    InTransit,
    /// Accepted: the receiver holds the person now.
    Accepted,
    /// Sent back by the receiver: the sender holds the person again.
    Returned,
    /// The ledger has no such handoff.
    Unknown,
}

/// The national node's answer to a deposit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DepositOutcome {
    /// Stored (or already stored).
    Stored,
    /// Refused: will never be stored as it is.
    Refused {
        /// Stable code.
        code: String,
        /// Why, in English.
        message: String,
    },
}

/// Where an ask stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AskState {
    /// Relayed to the municipality that holds the person; waiting for its handoff.
    Waiting {
        /// Who holds the person.
        holder: MunicipalityCode,
    },
    /// The holder sent the handoff.
    Sent {
        /// The handoff.
        handoff_id: String,
    },
    /// Nobody holds the person (not in the ledger and no previous municipality given, or
    /// the previous municipality has no active resident with the key).
    NotFound,
}

/// The national node's answer to a [`HandoffSync`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffResponse {
    /// Everything in the sync was committed.
    Synced {
        /// One per deposit, in order.
        deposits: Vec<(String, DepositOutcome)>,
        /// Handoffs addressed to the asking node, not yet accepted.
        inbound: Vec<SealedHandoff>,
        /// The ledger state of each watched handoff.
        states: Vec<(String, LedgerState)>,
        /// Each ask's state, by person key.
        asks: Vec<(String, AskState)>,
        /// Requests to hand over a person this node holds.
        requests: Vec<HistoryRequest>,
        /// Why each watched handoff in [`LedgerState::Returned`] was sent back.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        returns: Vec<(String, ReturnReason)>,
    },
    /// The whole sync was refused (not a municipal primary, too large).
    Refused {
        /// Stable code.
        code: String,
        /// Why.
        message: String,
    },
}
