//! Replication between nodes, without I/O: the messages and both sides' logic.
//!
//! A peer pulls. It asks the other node "what changed since my checkpoint that I may see"
//! ([`ReplicationRequest::Changes`]), receives document ids in feed order, then syncs just
//! those documents with Automerge sync messages, in batches ([`ReplicationRequest::Sync`]).
//! When every document of a page has the heads the other side reported, the page is complete:
//! the caller stores the documents and the new checkpoint in one durable commit, so a crash
//! at any point resumes from the last stored checkpoint and at worst re-syncs one page (which
//! changes nothing: merging what one already has is a no-op).
//!
//! The answering side never applies what a puller sends: it strips changes from incoming sync
//! messages and answers from a throw-away copy with a fresh sync state. Replication in both
//! directions is two pulls. The same [`Puller`] and [`answer_sync`] are what the node runs
//! over libp2p and what the simulator drives.

use std::collections::HashMap;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};
use serde::{Deserialize, Serialize};

/// Most documents in one sync request.
pub const MAX_BATCH_DOCS: usize = 4096;
/// Most feed entries in one answer.
pub const MAX_FEED_PAGE: u32 = 4096;
/// Sync rounds for one page before the puller gives up (a healthy page needs one or two).
pub const MAX_ROUNDS: u32 = 16;

/// What a puller asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationRequest {
    /// Feed entries after `since`, at most `limit`.
    Changes {
        /// The puller's checkpoint.
        since: u64,
        /// Page size.
        limit: u32,
    },
    /// One sync message per document.
    Sync {
        /// The documents of the batch.
        docs: Vec<DocMessage>,
    },
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationResponse {
    /// Feed entries.
    Changes {
        /// In feed order, filtered to what the puller may see.
        entries: Vec<FeedEntry>,
        /// The sequence the puller's checkpoint moves to once the page is synced.
        last_seq: u64,
        /// More entries follow.
        more: bool,
    },
    /// The answering side's sync messages and heads.
    Sync {
        /// One per requested document.
        docs: Vec<DocMessage>,
    },
    /// Refused (not allowed, malformed, too large).
    Refused {
        /// Stable code.
        code: String,
        /// Why, in English.
        message: String,
    },
}

/// A document in the change feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    /// Feed sequence.
    pub seq: u64,
    /// Document id.
    pub doc_id: String,
}

/// A sync message for one document, and the sender's heads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMessage {
    /// Document id.
    pub doc_id: String,
    /// An encoded Automerge sync message; empty for "nothing to say".
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
    /// The sender's heads, 32 bytes each, concatenated.
    #[serde(with = "serde_bytes")]
    pub heads: Vec<u8>,
    /// From a puller: "I have nothing of it, send it whole". From the answering side:
    /// `message` holds the document's stored bytes (a save followed by incremental changes),
    /// which `Automerge::load` reads, instead of a sync message.
    #[serde(default)]
    pub whole: bool,
}

/// Heads as bytes.
pub fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

fn sorted_heads(doc: &Automerge) -> Vec<u8> {
    let mut heads = doc.get_heads();
    heads.sort();
    encode_heads(&heads)
}

/// What went wrong with a peer's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// The answer does not fit the question.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// A sync message did not decode or apply.
    #[error("document {doc_id}: {reason}")]
    BadMessage {
        /// Which document.
        doc_id: String,
        /// Why.
        reason: String,
    },
    /// A page did not converge within [`MAX_ROUNDS`].
    #[error("documents did not converge within {MAX_ROUNDS} rounds: {0:?}")]
    NoConvergence(Vec<String>),
    /// The peer refused.
    #[error("refused by the peer: {code}: {message}")]
    Refused {
        /// Code.
        code: String,
        /// Message.
        message: String,
    },
}

/// Where a puller keeps the documents of the page it is syncing.
pub trait PageDocs {
    /// The local copy of `doc_id`, created empty if the puller does not have it yet.
    fn doc_mut(&mut self, doc_id: &str) -> &mut Automerge;

    /// Takes a whole document sent as stored bytes (merged into a local copy, if any).
    fn put_whole(&mut self, doc_id: &str, bytes: Vec<u8>) -> Result<(), String> {
        let mut incoming = Automerge::load(&bytes).map_err(|e| e.to_string())?;
        let doc = self.doc_mut(doc_id);
        if doc.get_heads().is_empty() {
            *doc = incoming;
        } else {
            doc.merge(&mut incoming).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// A page's documents held in memory (the node fills it from its store first).
#[derive(Default)]
pub struct MemoryDocs {
    /// Documents by id.
    pub docs: HashMap<String, Automerge>,
    /// The bytes of documents that arrived whole, to store as they are.
    pub whole: HashMap<String, Vec<u8>>,
}

impl PageDocs for MemoryDocs {
    fn doc_mut(&mut self, doc_id: &str) -> &mut Automerge {
        self.docs.entry(doc_id.to_owned()).or_default()
    }

    fn put_whole(&mut self, doc_id: &str, bytes: Vec<u8>) -> Result<(), String> {
        let mut incoming = Automerge::load(&bytes).map_err(|e| e.to_string())?;
        match self.docs.get_mut(doc_id) {
            // Never let a peer's copy replace local history: merge it.
            Some(doc) if !doc.get_heads().is_empty() => {
                doc.merge(&mut incoming).map_err(|e| e.to_string())?;
                self.whole.remove(doc_id);
            }
            _ => {
                self.docs.insert(doc_id.to_owned(), incoming);
                self.whole.insert(doc_id.to_owned(), bytes);
            }
        }
        Ok(())
    }
}

/// Where the answering side reads its documents.
pub trait SourceDocs {
    /// The document, loaded (`None` if this node does not have it).
    fn doc(&mut self, doc_id: &str) -> Option<Automerge>;

    /// The document's stored bytes, for a puller that has none of it.
    fn stored_bytes(&mut self, doc_id: &str) -> Option<Vec<u8>> {
        self.doc(doc_id).map(|doc| doc.save())
    }
}

impl<F: FnMut(&str) -> Option<Automerge>> SourceDocs for F {
    fn doc(&mut self, doc_id: &str) -> Option<Automerge> {
        self(doc_id)
    }
}

/// What the puller wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullStep {
    /// Send this request.
    Send(ReplicationRequest),
    /// Store these documents and the checkpoint together, then continue (`more`) or wait.
    PageComplete {
        /// The new checkpoint.
        checkpoint: u64,
        /// Documents changed by the page.
        docs: Vec<String>,
        /// Whether the feed has more right now.
        more: bool,
    },
}

struct Page {
    last_seq: u64,
    more: bool,
    ids: Vec<String>,
    pending: Vec<String>,
    states: HashMap<String, sync::State>,
    rounds: u32,
}

/// The pulling side of replication with one peer.
pub struct Puller {
    checkpoint: u64,
    page_size: u32,
    page: Option<Page>,
}

impl Puller {
    /// Starts from a stored checkpoint (0 for everything).
    pub fn new(checkpoint: u64, page_size: u32) -> Self {
        Self { checkpoint, page_size: page_size.clamp(1, MAX_FEED_PAGE), page: None }
    }

    /// The checkpoint: every feed entry up to it is synced.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Asks for the next page of the feed (drops any page in progress).
    pub fn ask_changes(&mut self) -> ReplicationRequest {
        self.page = None;
        ReplicationRequest::Changes { since: self.checkpoint, limit: self.page_size }
    }

    /// Handles any answer.
    pub fn on_response(
        &mut self,
        response: ReplicationResponse,
        docs: &mut impl PageDocs,
    ) -> Result<PullStep, ReplicationError> {
        match response {
            ReplicationResponse::Changes { entries, last_seq, more } => {
                self.on_changes(entries, last_seq, more, docs)
            }
            ReplicationResponse::Sync { docs: answers } => self.on_sync(answers, docs),
            ReplicationResponse::Refused { code, message } => {
                Err(ReplicationError::Refused { code, message })
            }
        }
    }

    fn on_changes(
        &mut self,
        entries: Vec<FeedEntry>,
        last_seq: u64,
        more: bool,
        docs: &mut impl PageDocs,
    ) -> Result<PullStep, ReplicationError> {
        if last_seq < self.checkpoint {
            return Err(ReplicationError::Unexpected(format!(
                "feed went back from {} to {last_seq}",
                self.checkpoint
            )));
        }
        if entries.iter().any(|e| e.seq <= self.checkpoint || e.seq > last_seq) {
            return Err(ReplicationError::Unexpected("feed entries outside the page".into()));
        }
        if entries.is_empty() {
            self.checkpoint = last_seq;
            return Ok(PullStep::PageComplete { checkpoint: last_seq, docs: Vec::new(), more });
        }
        let mut ids: Vec<String> = entries.into_iter().map(|e| e.doc_id).collect();
        ids.sort();
        ids.dedup();
        let mut page = Page { last_seq, more, pending: ids.clone(), ids, states: HashMap::new(), rounds: 0 };
        let request = next_sync(&mut page, docs);
        self.page = Some(page);
        Ok(PullStep::Send(request))
    }

    fn on_sync(
        &mut self,
        answers: Vec<DocMessage>,
        docs: &mut impl PageDocs,
    ) -> Result<PullStep, ReplicationError> {
        let Some(page) = self.page.as_mut() else {
            return Err(ReplicationError::Unexpected("sync answer without a page".into()));
        };
        let asked: Vec<String> = page.pending.iter().take(MAX_BATCH_DOCS).cloned().collect();
        if answers.len() != asked.len() || answers.iter().zip(&asked).any(|(a, id)| a.doc_id != *id) {
            return Err(ReplicationError::Unexpected("sync answer does not match the request".into()));
        }
        let mut still = Vec::new();
        for answer in answers {
            if answer.whole {
                let doc_id = answer.doc_id.clone();
                docs.put_whole(&answer.doc_id, answer.message)
                    .map_err(|reason| ReplicationError::BadMessage { doc_id, reason })?;
                continue;
            }
            let doc = docs.doc_mut(&answer.doc_id);
            let state = page.states.entry(answer.doc_id.clone()).or_default();
            if !answer.message.is_empty() {
                let message = sync::Message::decode(&answer.message).map_err(|e| {
                    ReplicationError::BadMessage { doc_id: answer.doc_id.clone(), reason: e.to_string() }
                })?;
                doc.receive_sync_message(state, message).map_err(|e| ReplicationError::BadMessage {
                    doc_id: answer.doc_id.clone(),
                    reason: e.to_string(),
                })?;
            }
            // In sync once we hold at least what the other side has.
            let ours = doc.get_heads();
            let theirs: Vec<ChangeHash> = answer
                .heads
                .chunks(32)
                .filter_map(|c| <[u8; 32]>::try_from(c).ok().map(ChangeHash))
                .collect();
            let have_all = theirs.iter().all(|h| ours.contains(h) || doc.get_change_by_hash(h).is_some());
            if !have_all {
                still.push(answer.doc_id);
            }
        }
        let rest: Vec<String> = page.pending.iter().skip(asked.len()).cloned().collect();
        page.pending = still.into_iter().chain(rest).collect();
        if page.pending.is_empty() {
            let page = self.page.take().expect("page present");
            self.checkpoint = page.last_seq;
            return Ok(PullStep::PageComplete { checkpoint: page.last_seq, docs: page.ids, more: page.more });
        }
        page.rounds += 1;
        if page.rounds > MAX_ROUNDS + page.ids.len() as u32 / MAX_BATCH_DOCS as u32 {
            return Err(ReplicationError::NoConvergence(page.pending.clone()));
        }
        Ok(PullStep::Send(next_sync(page, docs)))
    }
}

fn next_sync(page: &mut Page, docs: &mut impl PageDocs) -> ReplicationRequest {
    let mut batch = Vec::new();
    for id in page.pending.iter().take(MAX_BATCH_DOCS) {
        let doc = docs.doc_mut(id);
        let fresh = !page.states.contains_key(id);
        if fresh && doc.get_heads().is_empty() {
            // Nothing of it here: ask for the stored bytes, one round trip, no sync state.
            page.states.insert(id.clone(), sync::State::new());
            batch.push(DocMessage {
                doc_id: id.clone(),
                message: Vec::new(),
                heads: Vec::new(),
                whole: true,
            });
            continue;
        }
        let state = page.states.entry(id.clone()).or_default();
        let message = doc.generate_sync_message(state).map(sync::Message::encode).unwrap_or_default();
        batch.push(DocMessage { doc_id: id.clone(), message, heads: sorted_heads(doc), whole: false });
    }
    ReplicationRequest::Sync { docs: batch }
}

/// The answering side of a sync request: for each document, a message from a throw-away
/// copy and a fresh sync state (changes the puller sent are ignored), and the heads.
/// `load` gives the answering node's document, or `None` if it has none (answered empty).
pub fn answer_sync(
    requests: &[DocMessage],
    mut source: impl SourceDocs,
) -> Result<Vec<DocMessage>, ReplicationError> {
    if requests.len() > MAX_BATCH_DOCS {
        return Err(ReplicationError::Unexpected(format!(
            "more than {MAX_BATCH_DOCS} documents in one request"
        )));
    }
    let mut answers = Vec::with_capacity(requests.len());
    for request in requests {
        let empty = DocMessage {
            doc_id: request.doc_id.clone(),
            message: Vec::new(),
            heads: Vec::new(),
            whole: false,
        };
        if request.whole {
            match source.stored_bytes(&request.doc_id) {
                Some(bytes) => answers.push(DocMessage { message: bytes, whole: true, ..empty }),
                None => answers.push(empty),
            }
            continue;
        }
        let Some(mut doc) = source.doc(&request.doc_id) else {
            answers.push(empty);
            continue;
        };
        let heads = sorted_heads(&doc);
        let mut state = sync::State::new();
        if !request.message.is_empty() {
            let mut message = sync::Message::decode(&request.message).map_err(|e| {
                ReplicationError::BadMessage { doc_id: request.doc_id.clone(), reason: e.to_string() }
            })?;
            message.changes = Vec::<Vec<u8>>::new().into();
            doc.receive_sync_message(&mut state, message).map_err(|e| ReplicationError::BadMessage {
                doc_id: request.doc_id.clone(),
                reason: e.to_string(),
            })?;
        }
        let message = doc.generate_sync_message(&mut state).map(sync::Message::encode).unwrap_or_default();
        answers.push(DocMessage { doc_id: request.doc_id.clone(), message, heads, whole: false });
    }
    Ok(answers)
}

/// The answering side of a feed request: entries after `since` that `may_see` allows, from
/// `feed` (ascending `(seq, doc_id)` pairs after `since`, at most `limit + 1` of them).
pub fn answer_changes(
    since: u64,
    limit: u32,
    feed: &[(u64, String)],
    may_see: impl Fn(&str) -> bool,
) -> ReplicationResponse {
    let limit = limit.clamp(1, MAX_FEED_PAGE) as usize;
    let more = feed.len() > limit;
    let page = &feed[..feed.len().min(limit)];
    let last_seq = page.last().map_or(since, |(seq, _)| *seq);
    let entries = page
        .iter()
        .filter(|(_, id)| may_see(id))
        .map(|(seq, id)| FeedEntry { seq: *seq, doc_id: id.clone() })
        .collect();
    ReplicationResponse::Changes { entries, last_seq, more }
}
