//! The resident document: one Automerge document per resident.
//!
//! Layout (schema 3):
//!
//! ```text
//! { header:      "<JSON: schema, resident_id, municipality, person_key>",
//!   identity:    "<JSON of Identity>",
//!   coupons:     { "<municipality><coupon number>.<generation>": "<JSON of CouponEntry>" },
//!   doses:       { "<event id>": "<JSON of DoseEvent>" },
//!   corrections: { "<correction id>": "<JSON of Correction>" },
//!   transfer:    "<JSON of Transfer>",          (only once the resident moved away)
//!   arrival:     "<JSON of Arrival>" }          (only for a resident received by handoff)
//! ```
//!
//! Each entry is one scalar under its own key, so concurrent writers (the node and its
//! terminals) merge without conflict as long as they write different keys — a dose from a
//! terminal and a dose from the node have different event ids — while a change to one entry
//! costs one Automerge operation instead of one per field. Measured on the capture path, the
//! per-field layout (schema 1) spent a quarter of the writer's time inserting operations.
//! Two concurrent writes of the same entry resolve last-writer-wins; only the owning node
//! rewrites coupon and dose entries, and every correction is also kept under its own key.
//!
//! Every logical event is exactly one Automerge commit ([`apply_event`]). Measurements show
//! that a document built in one commit re-sends its whole history on every later sync, so
//! registration, each coupon and each dose are separate commits.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, ValueRef};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::coupon::{CouponCode, CouponNumber};
use crate::gs1::Gtin;
use crate::municipality::MunicipalityCode;

/// The document layout version written into every resident document.
pub const SCHEMA_VERSION: u64 = 3;

/// Sex as recorded in the resident register (住民基本台帳).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    /// 男
    Male,
    /// 女
    Female,
}

/// Whether the resident is still registered here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidentStatus {
    /// 在住: registered in this municipality.
    Active,
    /// 死亡: deceased.
    Deceased,
    /// 転出: moved to another municipality.
    MovedOut,
}

/// Who the resident is, from the resident register extract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// 宛名番号: the municipality's own number for the resident.
    pub atena_number: String,
    /// 氏名
    pub name: String,
    /// 氏名カナ
    pub name_kana: String,
    /// 生年月日
    pub birth_date: Date,
    /// 性別
    pub sex: Sex,
    /// 住所
    pub address: String,
    /// Registration status.
    pub status: ResidentStatus,
}

/// The state of one generation of a coupon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CouponStatus {
    /// Can be used for its dose.
    Valid,
    /// A newer generation was issued (reissue); this one is refused.
    Superseded,
    /// Withdrawn by the municipality.
    Revoked,
    /// A dose was recorded against it.
    Used,
    /// Issued by a municipality the resident has since left: refused, except for a dose a
    /// terminal of that municipality recorded before it learnt of the move, which the old
    /// municipality forwards to the new one.
    Transferred,
}

/// One generation of a coupon held by a resident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponEntry {
    /// The legacy 18-digit code.
    pub code: CouponCode,
    /// Issue generation: 0 at first issue, +1 at each reissue.
    pub generation: u8,
    /// Current state.
    pub status: CouponStatus,
    /// When it was issued.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// Why the status last changed (revocation reason), if a person gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// The dose event that used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_event: Option<String>,
}

impl CouponEntry {
    /// The key of this entry in the document's `coupons` map.
    pub fn key(&self) -> String {
        coupon_key(&self.code, self.generation)
    }
}

/// The key of a coupon generation in the document's `coupons` map: the issuing
/// municipality, the coupon number and the generation. The municipality is part of the key
/// because a record received by handoff keeps the old municipality's coupons beside the
/// ones issued here, and two municipalities number their coupons independently.
pub fn coupon_key(code: &CouponCode, generation: u8) -> String {
    format!("{}{}.{:02}", code.municipality, code.number, generation)
}

/// Whether a recorded dose still counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoseStatus {
    /// Counts.
    Valid,
    /// Withdrawn by a correction; kept for audit.
    Voided,
}

/// A vaccination, as captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoseEvent {
    /// Globally unique id; the same id merged twice is one event.
    pub event_id: String,
    /// 接種回: which dose of the person's history this is (1-based).
    pub dose_number: u8,
    /// The coupon it was recorded against.
    pub coupon: CouponCode,
    /// The coupon generation scanned (absent for a plain 18-digit code).
    pub coupon_generation: u8,
    /// 接種日
    pub vaccinated_on: Date,
    /// Product code from the catalogue.
    pub product_code: String,
    /// GTIN scanned from the vial.
    pub gtin: Gtin,
    /// Lot scanned from the vial.
    pub lot: String,
    /// Expiry scanned from the vial.
    pub expiry: Date,
    /// Venue (会場) id.
    pub venue: String,
    /// When the node or terminal stored it.
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    /// Who recorded it (user, token or terminal id).
    pub recorded_by: String,
    /// Valid or voided.
    pub status: DoseStatus,
}

/// Kind of a correction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionKind {
    /// The dose is withdrawn (recorded on the wrong person, never given, …).
    Void,
    /// Fields of the dose are changed (wrong date, wrong lot, …).
    Amend,
}

/// A correction of a dose event, kept forever with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Correction {
    /// Unique id of this correction.
    pub correction_id: String,
    /// The dose event corrected.
    pub event_id: String,
    /// Void or amend.
    pub kind: CorrectionKind,
    /// Why, in the staff member's words. Required.
    pub reason: String,
    /// Who made it.
    pub actor: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Changed fields before the correction.
    #[serde(default)]
    pub before: BTreeMap<String, String>,
    /// Changed fields after the correction.
    #[serde(default)]
    pub after: BTreeMap<String, String>,
}

/// Where a resident's record went: written once, when the handoff leaves, after which the
/// record is kept read-only for audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The municipality the resident moved to.
    pub to: MunicipalityCode,
    /// The handoff that carries the record there.
    pub handoff_id: String,
    /// When it was sealed.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who triggered it (an admin, or the new municipality's request).
    pub actor: String,
}

/// A handoff of this record that its receiver sent back: the resident lives here again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnedTransfer {
    /// The transfer as it was noted.
    pub transfer: Transfer,
    /// Why the receiver sent it back.
    pub reason: crate::handoff::ReturnReason,
    /// When this node learned it.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Where a resident received by handoff came from: written at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// The municipality they came from.
    pub from: MunicipalityCode,
    /// The handoff that brought the record.
    pub handoff_id: String,
    /// The keys of the coupons the record carried when it arrived. They stay findable by
    /// their full 18 digits only; the number index holds the coupons issued here, since a
    /// carried number may equal one this municipality issued itself.
    #[serde(default)]
    pub carried: Vec<String>,
}

impl ResidentRecord {
    /// Whether a coupon came with the record by handoff rather than being issued here.
    pub fn carried(&self, entry: &CouponEntry) -> bool {
        self.arrival.as_ref().is_some_and(|a| a.carried.contains(&entry.key()))
    }
}

/// A resident's whole record, as read from the document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidentRecord {
    /// Document layout version.
    pub schema: u64,
    /// Document id.
    pub resident_id: String,
    /// The owning municipality.
    pub municipality: MunicipalityCode,
    /// Pseudonymous person key (see `person`).
    pub person_key: String,
    /// Identity from the resident register.
    pub identity: Identity,
    /// Coupon generations by key.
    #[serde(default)]
    pub coupons: BTreeMap<String, CouponEntry>,
    /// Dose events by id.
    #[serde(default)]
    pub doses: BTreeMap<String, DoseEvent>,
    /// Corrections by id.
    #[serde(default)]
    pub corrections: BTreeMap<String, Correction>,
    /// Set once the resident's record was handed to another municipality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
    /// Set when the record came here by handoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival: Option<Arrival>,
    /// Handoffs of this record that their receiver sent back, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returns: Vec<ReturnedTransfer>,
}

impl ResidentRecord {
    /// Doses that count, in dose-number order.
    pub fn valid_doses(&self) -> Vec<&DoseEvent> {
        let mut doses: Vec<&DoseEvent> =
            self.doses.values().filter(|d| d.status == DoseStatus::Valid).collect();
        doses.sort_by_key(|d| (d.dose_number, d.vaccinated_on));
        doses
    }

    /// The dose this resident would receive next.
    pub fn next_dose_number(&self) -> u8 {
        let given = self.valid_doses().len();
        u8::try_from(given).unwrap_or(u8::MAX).saturating_add(1)
    }

    /// All generations of one municipality's coupon number, oldest first.
    pub fn coupon_generations(
        &self,
        municipality: MunicipalityCode,
        number: &CouponNumber,
    ) -> Vec<&CouponEntry> {
        let mut entries: Vec<&CouponEntry> = self
            .coupons
            .values()
            .filter(|c| c.code.municipality == municipality && &c.code.number == number)
            .collect();
        entries.sort_by_key(|c| c.generation);
        entries
    }

    /// The valid coupon for a dose, if any.
    pub fn valid_coupon_for_dose(&self, dose_round: u8) -> Option<&CouponEntry> {
        self.coupons.values().find(|c| c.status == CouponStatus::Valid && c.code.dose_round == dose_round)
    }

    /// The coupon that may be used for the next dose: valid, or already used by a valid dose
    /// of that round (then no new coupon is needed either).
    pub fn has_coupon_for_next_dose(&self) -> bool {
        self.valid_coupon_for_dose(self.next_dose_number()).is_some()
    }
}

/// A logical event on a resident document; each is one Automerge commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResidentEvent {
    /// The resident identity changed in the register (moved within, deceased, renamed).
    IdentityUpdated(Identity),
    /// A coupon generation was issued; a previous generation is superseded in the same commit.
    CouponIssued {
        /// The new entry.
        entry: CouponEntry,
        /// Key of the generation it replaces.
        supersedes: Option<String>,
    },
    /// A coupon generation was revoked.
    CouponRevoked {
        /// Key of the generation.
        key: String,
        /// Why.
        reason: String,
    },
    /// A dose was captured against a coupon.
    DoseRecorded(DoseEvent),
    /// A dose was voided; its coupon becomes usable again if it was the one that used it.
    DoseVoided {
        /// The correction, with reason and actor.
        correction: Correction,
        /// Key of the coupon to reopen.
        reopen_coupon: Option<String>,
    },
    /// Fields of a dose were amended.
    DoseAmended {
        /// The dose as it is after the amendment.
        amended: DoseEvent,
        /// The correction, with reason, actor, before and after.
        correction: Correction,
    },
    /// The resident moved to another municipality and the record was handed over: status
    /// moved out, every valid coupon transferred, the transfer noted. The record is
    /// read-only from then on.
    TransferredOut(Transfer),
    /// The receiver sent the handoff back: status active again, the coupons the transfer
    /// made `transferred` valid again (the person's paper coupon works again), the transfer
    /// cleared and noted in `returns`.
    TransferReturned(ReturnedTransfer),
    /// A handoff's history joined a resident already registered here (from the register
    /// extract, before the handoff arrived): the coupons, doses and corrections it carried,
    /// and the arrival noted.
    HistoryReceived(Box<ReceivedHistory>),
}

/// What a handoff carried, added to a resident registered here before it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedHistory {
    /// Where the history came from; `carried` names the coupons below.
    pub arrival: Arrival,
    /// The previous municipalities' coupons, by key.
    pub coupons: BTreeMap<String, CouponEntry>,
    /// The doses, by event id.
    pub doses: BTreeMap<String, DoseEvent>,
    /// The corrections of those doses, by id.
    pub corrections: BTreeMap<String, Correction>,
}

/// The commit message of a recorded dose.
pub(crate) const DOSE_RECORDED: &str = "dose-recorded";

impl ResidentEvent {
    /// A short name, used as the commit message.
    pub fn kind(&self) -> &'static str {
        match self {
            ResidentEvent::IdentityUpdated(_) => "identity-updated",
            ResidentEvent::CouponIssued { .. } => "coupon-issued",
            ResidentEvent::CouponRevoked { .. } => "coupon-revoked",
            ResidentEvent::DoseRecorded(_) => DOSE_RECORDED,
            ResidentEvent::DoseVoided { .. } => "dose-voided",
            ResidentEvent::DoseAmended { .. } => "dose-amended",
            ResidentEvent::TransferredOut(_) => "transferred-out",
            ResidentEvent::TransferReturned(_) => "transfer-returned",
            ResidentEvent::HistoryReceived(_) => "history-received",
        }
    }
}

/// The document could not be read or written as a resident record.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Automerge refused an operation or the bytes.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The document does not have the resident layout.
    #[error("document is not a resident record: {0}")]
    Shape(String),
    /// An event refers to something the document does not have.
    #[error("document has no {what} {key:?}")]
    Missing {
        /// What kind of thing.
        what: &'static str,
        /// Its key.
        key: String,
    },
}

/// Creates a resident's document in one commit (the registration event).
pub fn new_resident_document(
    actor: &ActorId,
    record: &ResidentRecord,
    at: OffsetDateTime,
) -> Result<Automerge, DocumentError> {
    let mut doc = Automerge::new().with_actor(actor.clone());
    commit(&mut doc, "registered", at, |tx| {
        let header = Header {
            schema: record.schema,
            resident_id: record.resident_id.clone(),
            municipality: record.municipality,
            person_key: record.person_key.clone(),
        };
        put_entry(tx, &ROOT, "header", &header)?;
        put_entry(tx, &ROOT, "identity", &record.identity)?;
        let coupons = tx.put_object(&ROOT, "coupons", ObjType::Map)?;
        for (key, entry) in &record.coupons {
            put_entry(tx, &coupons, key, entry)?;
        }
        let doses = tx.put_object(&ROOT, "doses", ObjType::Map)?;
        for (key, dose) in &record.doses {
            put_entry(tx, &doses, key, dose)?;
        }
        let corrections = tx.put_object(&ROOT, "corrections", ObjType::Map)?;
        for (key, correction) in &record.corrections {
            put_entry(tx, &corrections, key, correction)?;
        }
        if let Some(transfer) = &record.transfer {
            put_entry(tx, &ROOT, "transfer", transfer)?;
        }
        if let Some(arrival) = &record.arrival {
            put_entry(tx, &ROOT, "arrival", arrival)?;
        }
        if !record.returns.is_empty() {
            put_entry(tx, &ROOT, "returns", &record.returns)?;
        }
        Ok(())
    })?;
    Ok(doc)
}

/// Applies one event as one commit.
pub fn apply_event(
    doc: &mut Automerge,
    event: &ResidentEvent,
    at: OffsetDateTime,
) -> Result<(), DocumentError> {
    commit(doc, event.kind(), at, |tx| match event {
        ResidentEvent::IdentityUpdated(identity) => put_entry(tx, &ROOT, "identity", identity),
        ResidentEvent::CouponIssued { entry, supersedes } => {
            let coupons = child_map(tx, &ROOT, "coupons")?;
            if let Some(old) = supersedes {
                let mut previous: CouponEntry = get_entry(tx, &coupons, old)?;
                previous.status = CouponStatus::Superseded;
                put_entry(tx, &coupons, old, &previous)?;
            }
            put_entry(tx, &coupons, &entry.key(), entry)
        }
        ResidentEvent::CouponRevoked { key, reason } => {
            let coupons = child_map(tx, &ROOT, "coupons")?;
            let mut coupon: CouponEntry = get_entry(tx, &coupons, key)?;
            coupon.status = CouponStatus::Revoked;
            coupon.status_reason = Some(reason.clone());
            put_entry(tx, &coupons, key, &coupon)
        }
        ResidentEvent::DoseRecorded(event) => {
            let doses = child_map(tx, &ROOT, "doses")?;
            put_entry(tx, &doses, &event.event_id, event)?;
            let coupons = child_map(tx, &ROOT, "coupons")?;
            let key = coupon_key(&event.coupon, event.coupon_generation);
            let mut coupon: CouponEntry = get_entry(tx, &coupons, &key)?;
            coupon.status = CouponStatus::Used;
            coupon.used_by_event = Some(event.event_id.clone());
            put_entry(tx, &coupons, &key, &coupon)
        }
        ResidentEvent::DoseVoided { correction, reopen_coupon } => {
            let doses = child_map(tx, &ROOT, "doses")?;
            let mut dose: DoseEvent = get_entry(tx, &doses, &correction.event_id)?;
            dose.status = DoseStatus::Voided;
            put_entry(tx, &doses, &correction.event_id, &dose)?;
            if let Some(key) = reopen_coupon {
                let coupons = child_map(tx, &ROOT, "coupons")?;
                let mut coupon: CouponEntry = get_entry(tx, &coupons, key)?;
                coupon.status = CouponStatus::Valid;
                coupon.used_by_event = None;
                put_entry(tx, &coupons, key, &coupon)?;
            }
            let corrections = child_map(tx, &ROOT, "corrections")?;
            put_entry(tx, &corrections, &correction.correction_id, correction)
        }
        ResidentEvent::DoseAmended { amended, correction } => {
            let doses = child_map(tx, &ROOT, "doses")?;
            put_entry(tx, &doses, &amended.event_id, amended)?;
            let corrections = child_map(tx, &ROOT, "corrections")?;
            put_entry(tx, &corrections, &correction.correction_id, correction)
        }
        ResidentEvent::TransferredOut(transfer) => {
            let mut identity: Identity = get_entry(tx, &ROOT, "identity")?;
            identity.status = ResidentStatus::MovedOut;
            put_entry(tx, &ROOT, "identity", &identity)?;
            let coupons = child_map(tx, &ROOT, "coupons")?;
            let keys: Vec<String> = tx.keys(&coupons).collect();
            for key in keys {
                let mut coupon: CouponEntry = get_entry(tx, &coupons, &key)?;
                if coupon.status == CouponStatus::Valid {
                    coupon.status = CouponStatus::Transferred;
                    coupon.status_reason = Some(format!("transferred:{}", transfer.to));
                    put_entry(tx, &coupons, &key, &coupon)?;
                }
            }
            put_entry(tx, &ROOT, "transfer", transfer)
        }
        ResidentEvent::TransferReturned(returned) => {
            let mut identity: Identity = get_entry(tx, &ROOT, "identity")?;
            identity.status = ResidentStatus::Active;
            put_entry(tx, &ROOT, "identity", &identity)?;
            let mut returns: Vec<ReturnedTransfer> = match tx.get(&ROOT, "returns")? {
                Some(_) => get_entry(tx, &ROOT, "returns")?,
                None => Vec::new(),
            };
            returns.push(returned.clone());
            put_entry(tx, &ROOT, "returns", &returns)?;
            let coupons = child_map(tx, &ROOT, "coupons")?;
            let keys: Vec<String> = tx.keys(&coupons).collect();
            let moved = format!("transferred:{}", returned.transfer.to);
            for key in keys {
                let mut coupon: CouponEntry = get_entry(tx, &coupons, &key)?;
                if coupon.status == CouponStatus::Transferred
                    && coupon.status_reason.as_deref() == Some(&moved)
                {
                    coupon.status = CouponStatus::Valid;
                    coupon.status_reason = None;
                    put_entry(tx, &coupons, &key, &coupon)?;
                }
            }
            tx.delete(&ROOT, "transfer")?;
            Ok(())
        }
        ResidentEvent::HistoryReceived(history) => {
            let coupons = child_map(tx, &ROOT, "coupons")?;
            for (key, entry) in &history.coupons {
                put_entry(tx, &coupons, key, entry)?;
            }
            let doses = child_map(tx, &ROOT, "doses")?;
            for (key, dose) in &history.doses {
                put_entry(tx, &doses, key, dose)?;
            }
            let corrections = child_map(tx, &ROOT, "corrections")?;
            for (key, correction) in &history.corrections {
                put_entry(tx, &corrections, key, correction)?;
            }
            put_entry(tx, &ROOT, "arrival", &history.arrival)
        }
    })
}

/// What never changes in a resident document, written once at registration.
#[derive(Serialize, Deserialize)]
struct Header {
    schema: u64,
    resident_id: String,
    municipality: MunicipalityCode,
    person_key: String,
}

/// Reads the document into a record.
pub fn read_record(doc: &Automerge) -> Result<ResidentRecord, DocumentError> {
    let header: Header = get_entry(doc, &ROOT, "header")?;
    if header.schema != SCHEMA_VERSION {
        return Err(DocumentError::Shape(format!("schema {}, expected {SCHEMA_VERSION}", header.schema)));
    }
    Ok(ResidentRecord {
        schema: header.schema,
        resident_id: header.resident_id,
        municipality: header.municipality,
        person_key: header.person_key,
        identity: get_entry(doc, &ROOT, "identity")?,
        coupons: map_entries(doc, "coupons")?,
        doses: map_entries(doc, "doses")?,
        corrections: map_entries(doc, "corrections")?,
        transfer: match doc.get(&ROOT, "transfer")? {
            Some(_) => Some(get_entry(doc, &ROOT, "transfer")?),
            None => None,
        },
        arrival: match doc.get(&ROOT, "arrival")? {
            Some(_) => Some(get_entry(doc, &ROOT, "arrival")?),
            None => None,
        },
        returns: match doc.get(&ROOT, "returns")? {
            Some(_) => get_entry(doc, &ROOT, "returns")?,
            None => Vec::new(),
        },
    })
}

fn commit(
    doc: &mut Automerge,
    message: &str,
    at: OffsetDateTime,
    f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), DocumentError>,
) -> Result<(), DocumentError> {
    let options = automerge::transaction::CommitOptions::default()
        .with_message(message.to_owned())
        .with_time(at.unix_timestamp());
    doc.transact_with(|_| options, f).map(|_| ()).map_err(|failure| failure.error)
}

fn child_map(doc: &impl ReadDoc, parent: &ObjId, key: &str) -> Result<ObjId, DocumentError> {
    match doc.get(parent, key)? {
        Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(DocumentError::Missing { what: "map", key: key.to_owned() }),
    }
}

fn put_entry<T: Serialize>(
    tx: &mut automerge::transaction::Transaction<'_>,
    obj: &ObjId,
    key: &str,
    value: &T,
) -> Result<(), DocumentError> {
    let json = serde_json::to_string(value).map_err(|e| DocumentError::Shape(e.to_string()))?;
    tx.put(obj, key, json)?;
    Ok(())
}

fn get_entry<T: DeserializeOwned>(doc: &impl ReadDoc, obj: &ObjId, key: &str) -> Result<T, DocumentError> {
    let Some((automerge::Value::Scalar(value), _)) = doc.get(obj, key)? else {
        return Err(DocumentError::Missing { what: "entry", key: key.to_owned() });
    };
    let ScalarValue::Str(json) = value.as_ref() else {
        return Err(DocumentError::Shape(format!("entry {key:?} is not a string")));
    };
    serde_json::from_str(json).map_err(|e| DocumentError::Shape(format!("entry {key:?}: {e}")))
}

fn map_entries<T: DeserializeOwned>(
    doc: &Automerge,
    key: &str,
) -> Result<BTreeMap<String, T>, DocumentError> {
    let obj = child_map(doc, &ROOT, key)?;
    let mut entries = BTreeMap::new();
    for item in doc.map_range(&obj, ..) {
        let ValueRef::Scalar(automerge::ScalarValueRef::Str(json)) = &item.value else {
            return Err(DocumentError::Shape(format!("{key}.{} is not a string", item.key)));
        };
        let value = serde_json::from_str(json)
            .map_err(|e| DocumentError::Shape(format!("{key}.{}: {e}", item.key)))?;
        entries.insert(item.key.to_string(), value);
    }
    Ok(entries)
}
