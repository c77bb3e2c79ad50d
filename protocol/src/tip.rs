//! What the next dose in a resident document needs to know of the document, kept beside it
//! so that a capture can build its change without loading the document.
//!
//! Recording a dose ([`crate::document::apply_event`] with a `DoseRecorded`) is one commit of
//! two operations: the dose's entry put into the `doses` map, and the coupon's entry put again
//! over its current value. An Automerge change names its actor, its sequence number among
//! that actor's changes, its first operation's counter, the changes it follows, and for each
//! operation the object it writes into and the operations it overwrites. A [`DocTip`] holds
//! exactly those facts for a document whose history ends in one change, plus the record
//! itself for the capture's checks. [`DocTip::record_dose`] builds the same change a
//! transaction on the loaded document would, and the tip that follows it.
//!
//! Loading a document and reading its record was about a fifth of the CPU a capture cost;
//! a tip is one small JSON value read from the row the store reads for the capture anyway.

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use automerge::legacy::{self, Key, ObjectId, OpType};
use automerge::{ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjId, ROOT, ReadDoc, ScalarValue};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::document::{CouponStatus, DoseEvent, ResidentRecord, coupon_key, read_record};

/// An operation's id: its counter and its actor (hex; empty for the tip's own actor, which
/// wrote nearly every operation a tip names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRef(pub u64, pub String);

/// What building the next dose change needs, as of one version of a document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocTip {
    /// The actor of the document's last change (hex); only it may build the next one here.
    pub actor: String,
    /// That change's sequence number among the actor's changes.
    pub seq: u64,
    /// The largest operation counter in the document.
    pub max_op: u64,
    /// The document's one head (hex).
    pub head: String,
    /// The `doses` map.
    pub doses: OpRef,
    /// The `coupons` map.
    pub coupons: OpRef,
    /// For each coupon key, the operations that hold its current value (more than one
    /// after concurrent writes).
    pub coupon_values: BTreeMap<String, Vec<OpRef>>,
    /// The record the document reads as.
    pub record: ResidentRecord,
}

/// Why a tip cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TipError {
    /// The document's history does not end in `last`, a change by one actor.
    #[error("the document's history does not end in the given change")]
    NotTheTip,
    /// The document lacks something a dose writes into.
    #[error("the document has no {0}")]
    Missing(String),
    /// The dose's event id is in the document already.
    #[error("dose {0} is recorded already")]
    Recorded(String),
    /// An id in the tip does not parse.
    #[error("the tip is unreadable: {0}")]
    Unreadable(String),
    /// Reading the document failed.
    #[error(transparent)]
    Document(#[from] crate::document::DocumentError),
    /// Automerge refused a read.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

impl DocTip {
    /// The tip of `doc`, whose latest change is `last` (the only head). `None` when the
    /// document has several heads, as after concurrent writes merged: a tip is then not
    /// worth keeping, and the next capture loads the document.
    pub fn of(doc: &Automerge, last: &Change) -> Result<Option<Self>, TipError> {
        let heads = doc.get_heads();
        if heads.len() != 1 || heads[0] != last.hash() {
            return Ok(None);
        }
        Self::of_change(doc, last, read_record(doc)?)
    }

    /// [`DocTip::of`] for a caller that knows the record `doc` reads as.
    pub fn of_change(
        doc: &Automerge,
        last: &Change,
        record: ResidentRecord,
    ) -> Result<Option<Self>, TipError> {
        let heads = doc.get_heads();
        if heads.len() != 1 || heads[0] != last.hash() {
            return Ok(None);
        }
        Self::make(doc, last.actor_id(), last.seq(), last.max_op(), last.hash(), record).map(Some)
    }

    /// The tip of a document just built by one actor in commits that put values and made
    /// maps and never deleted one (a new resident's registration and first coupon), whose
    /// record is `record`. Such a document's changes are all that actor's and number its
    /// operations without a gap, so its statistics give the last change's sequence and
    /// largest operation counter without encoding the change again; `None` otherwise.
    pub fn of_new(doc: &Automerge, record: ResidentRecord) -> Result<Option<Self>, TipError> {
        let heads = doc.get_heads();
        let stats = doc.stats();
        if heads.len() != 1 || stats.num_actors != 1 {
            return Ok(None);
        }
        Self::make(doc, doc.get_actor(), stats.num_changes, stats.num_ops, heads[0], record).map(Some)
    }

    fn make(
        doc: &Automerge,
        actor: &ActorId,
        seq: u64,
        max_op: u64,
        head: ChangeHash,
        record: ResidentRecord,
    ) -> Result<Self, TipError> {
        let (_, doses) = map_id(doc, "doses", actor)?;
        let (coupons_obj, coupons) = map_id(doc, "coupons", actor)?;
        let mut coupon_values = BTreeMap::new();
        for key in record.coupons.keys() {
            let mut values = Vec::new();
            for (_, id) in doc.get_all(&coupons_obj, key.as_str())? {
                values.push(
                    op_ref(&id, actor).ok_or_else(|| TipError::Missing(format!("coupon value {key}")))?,
                );
            }
            coupon_values.insert(key.clone(), values);
        }
        Ok(Self {
            actor: actor.to_hex_string(),
            seq,
            max_op,
            head: head.to_string(),
            doses,
            coupons,
            coupon_values,
            record,
        })
    }

    /// Whether `actor` wrote the change this tip follows, and so may build the next one
    /// from it.
    pub fn written_by(&self, actor: &ActorId) -> bool {
        self.actor == actor.to_hex_string()
    }

    /// The change recording `event` at `at`, as [`crate::document::apply_event`] would
    /// commit it on the document, encoded as one stored chunk, and the tip after it.
    pub fn record_dose(&self, event: &DoseEvent, at: OffsetDateTime) -> Result<(Vec<u8>, DocTip), TipError> {
        if self.record.doses.contains_key(&event.event_id) {
            return Err(TipError::Recorded(event.event_id.clone()));
        }
        let key = coupon_key(&event.coupon, event.coupon_generation);
        let (Some(previous), Some(mut coupon)) =
            (self.coupon_values.get(&key), self.record.coupons.get(&key).cloned())
        else {
            return Err(TipError::Missing(format!("coupon {key}")));
        };
        coupon.status = CouponStatus::Used;
        coupon.used_by_event = Some(event.event_id.clone());
        let actor = parse_actor(&self.actor)?;
        let head: ChangeHash = self.head.parse().map_err(|_| TipError::Unreadable(self.head.clone()))?;
        let start_op = self.max_op + 1;
        let legacy_id = |id: &OpRef| -> Result<legacy::OpId, TipError> {
            let by = if id.1.is_empty() { actor.clone() } else { parse_actor(&id.1)? };
            Ok(legacy::OpId(id.0, by))
        };
        let put = |obj: &OpRef, key: &str, value: String, pred: Vec<legacy::OpId>| -> Result<_, TipError> {
            Ok(legacy::Op {
                action: OpType::Put(ScalarValue::Str(value.into())),
                obj: ObjectId::Id(legacy_id(obj)?),
                key: Key::Map(key.into()),
                pred: pred.into(),
                insert: false,
            })
        };
        let preds = previous.iter().map(&legacy_id).collect::<Result<Vec<_>, _>>()?;
        let operations = vec![
            put(&self.doses, &event.event_id, json(event)?, Vec::new())?,
            put(&self.coupons, &key, json(&coupon)?, preds)?,
        ];
        let change = Change::from(ExpandedChange {
            operations,
            actor_id: actor.clone(),
            hash: None,
            seq: self.seq + 1,
            start_op: NonZeroU64::new(start_op).ok_or_else(|| TipError::Unreadable("start op".into()))?,
            time: at.unix_timestamp(),
            message: Some(crate::document::DOSE_RECORDED.to_owned()),
            deps: vec![head],
            extra_bytes: Vec::new(),
            author: None,
        });
        let mut record = self.record.clone();
        record.doses.insert(event.event_id.clone(), event.clone());
        record.coupons.insert(key.clone(), coupon);
        let mut coupon_values = self.coupon_values.clone();
        coupon_values.insert(key, vec![OpRef(start_op + 1, String::new())]);
        let next = DocTip {
            actor: self.actor.clone(),
            seq: change.seq(),
            max_op: change.max_op(),
            head: change.hash().to_string(),
            doses: self.doses.clone(),
            coupons: self.coupons.clone(),
            coupon_values,
            record,
        };
        Ok((change.raw_bytes().to_vec(), next))
    }

    /// The tip as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A stored tip.
    pub fn decode(bytes: &[u8]) -> Result<Self, TipError> {
        serde_json::from_slice(bytes).map_err(|e| TipError::Unreadable(e.to_string()))
    }
}

/// A value as the document stores an entry.
fn json<T: Serialize>(value: &T) -> Result<String, TipError> {
    serde_json::to_string(value).map_err(|e| TipError::Unreadable(e.to_string()))
}

/// The id of the root's map `key`, as Automerge and as stored in the tip of `actor`.
fn map_id(doc: &Automerge, key: &str, actor: &ActorId) -> Result<(ObjId, OpRef), TipError> {
    match doc.get(&ROOT, key)? {
        Some((automerge::Value::Object(automerge::ObjType::Map), id)) => {
            let stored = op_ref(&id, actor).ok_or_else(|| TipError::Missing(key.to_owned()))?;
            Ok((id, stored))
        }
        _ => Err(TipError::Missing(format!("map {key}"))),
    }
}

fn op_ref(id: &ObjId, tip_actor: &ActorId) -> Option<OpRef> {
    match id {
        ObjId::Id(counter, actor, _) if actor == tip_actor => Some(OpRef(*counter, String::new())),
        ObjId::Id(counter, actor, _) => Some(OpRef(*counter, actor.to_hex_string())),
        ObjId::Root => None,
    }
}

fn parse_actor(hex: &str) -> Result<ActorId, TipError> {
    hex.parse().map_err(|_| TipError::Unreadable(format!("actor {hex}")))
}
