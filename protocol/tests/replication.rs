//! Replication without I/O: a puller and an answering side exchanging messages in memory.

use std::collections::HashMap;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Automerge, ROOT};
use protocol::replication::{
    MemoryDocs, PullStep, Puller, ReplicationRequest, ReplicationResponse, answer_changes, answer_sync,
};

/// A node's documents and its change feed (one entry per document, latest change last).
struct Source {
    docs: HashMap<String, Automerge>,
    feed: Vec<(u64, String)>,
    seq: u64,
}

impl Source {
    fn new(n: usize) -> Self {
        let mut source = Source { docs: HashMap::new(), feed: Vec::new(), seq: 0 };
        for i in 0..n {
            source.change(&format!("doc-{i:05}"), "registered", i as i64);
        }
        source
    }

    /// One commit on a document, which moves it to the end of the feed.
    fn change(&mut self, id: &str, key: &str, value: i64) {
        let doc = self
            .docs
            .remove(id)
            .unwrap_or_else(|| Automerge::new().with_actor(ActorId::from(b"primary".as_slice())));
        let mut doc = AutoCommit::load(&doc.save()).unwrap().with_actor(ActorId::from(b"primary".as_slice()));
        doc.put(ROOT, key, value).unwrap();
        doc.commit();
        self.docs.insert(id.to_owned(), Automerge::load(&doc.save()).unwrap());
        self.feed.retain(|(_, d)| d != id);
        self.seq += 1;
        self.feed.push((self.seq, id.to_owned()));
    }

    fn serve(&self, request: &ReplicationRequest, may_see: impl Fn(&str) -> bool) -> ReplicationResponse {
        match request {
            ReplicationRequest::Changes { since, limit } => {
                let after: Vec<(u64, String)> =
                    self.feed.iter().filter(|(s, _)| s > since).take(*limit as usize + 1).cloned().collect();
                answer_changes(*since, *limit, &after, may_see)
            }
            ReplicationRequest::Sync { docs } => ReplicationResponse::Sync {
                docs: answer_sync(docs, |id: &str| self.docs.get(id).cloned()).unwrap(),
            },
        }
    }
}

/// Bytes of every sync message and heads sent either way.
fn wire_bytes(request: &ReplicationRequest, response: &ReplicationResponse) -> usize {
    let of = |docs: &[protocol::replication::DocMessage]| -> usize {
        docs.iter().map(|d| d.message.len() + d.heads.len() + d.doc_id.len()).sum()
    };
    let a = match request {
        ReplicationRequest::Sync { docs } => of(docs),
        ReplicationRequest::Changes { .. } => 16,
    };
    let b = match response {
        ReplicationResponse::Sync { docs } => of(docs),
        ReplicationResponse::Changes { entries, .. } => entries.iter().map(|e| 8 + e.doc_id.len()).sum(),
        ReplicationResponse::Refused { .. } => 0,
    };
    a + b
}

/// Pulls until caught up; returns (documents synced, bytes, requests).
fn pull(source: &Source, puller: &mut Puller, replica: &mut MemoryDocs) -> (usize, usize, usize) {
    let (mut synced, mut bytes, mut requests) = (0, 0, 0);
    let mut request = puller.ask_changes();
    loop {
        let response = source.serve(&request, |_| true);
        bytes += wire_bytes(&request, &response);
        requests += 1;
        match puller.on_response(response, replica).unwrap() {
            PullStep::Send(next) => request = next,
            PullStep::PageComplete { docs, more, .. } => {
                synced += docs.len();
                if !more {
                    return (synced, bytes, requests);
                }
                request = puller.ask_changes();
            }
        }
    }
}

fn assert_converged(source: &Source, replica: &MemoryDocs) {
    for (id, doc) in &source.docs {
        let mut ours = replica.docs.get(id).unwrap_or_else(|| panic!("{id} missing")).get_heads();
        let mut theirs = doc.get_heads();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "{id}");
    }
}

#[test]
fn a_fresh_replica_catches_up_page_by_page_and_then_only_moves_what_changed() {
    let mut source = Source::new(1000);
    let mut replica = MemoryDocs::default();
    let mut puller = Puller::new(0, 300);
    let (synced, bytes, requests) = pull(&source, &mut puller, &mut replica);
    assert_eq!(synced, 1000);
    assert_eq!(puller.checkpoint(), 1000);
    assert_converged(&source, &replica);
    let saved: usize = source.docs.values().map(|d| d.save().len()).sum();
    assert!(bytes < saved * 3, "wire {bytes} B for {saved} B of documents");
    assert!(requests <= 4 * 2 + 4 * 2, "{requests} requests for 4 pages");

    // Ten documents change: only those move.
    for i in (0..1000).step_by(100) {
        source.change(&format!("doc-{i:05}"), "dose-1", 1);
    }
    let (synced, _, _) = pull(&source, &mut puller, &mut replica);
    assert_eq!(synced, 10);
    assert_converged(&source, &replica);
    // Nothing changed: one feed request, nothing synced.
    let (synced, bytes, requests) = pull(&source, &mut puller, &mut replica);
    assert_eq!((synced, requests), (0, 1));
    assert!(bytes < 64);
}

#[test]
fn a_puller_that_crashes_mid_page_resumes_from_its_stored_checkpoint() {
    let source = Source::new(600);
    // What was durably stored: the documents and the checkpoint of completed pages only.
    let mut stored = MemoryDocs::default();
    let mut checkpoint = 0;
    let mut puller = Puller::new(0, 200);
    let mut working = MemoryDocs::default();
    let mut request = puller.ask_changes();
    let mut pages = 0;
    while pages < 2 {
        let response = source.serve(&request, |_| true);
        match puller.on_response(response, &mut working).unwrap() {
            PullStep::Send(next) => request = next,
            PullStep::PageComplete { checkpoint: c, docs, .. } => {
                for id in docs {
                    stored.docs.insert(id.clone(), working.docs[&id].clone());
                }
                checkpoint = c;
                pages += 1;
                request = puller.ask_changes();
            }
        }
    }
    // The third page is half-synced when the process dies: its work is lost.
    let response = source.serve(&request, |_| true);
    assert!(matches!(puller.on_response(response, &mut working).unwrap(), PullStep::Send(_)));
    drop(puller);
    assert_eq!(checkpoint, 400);
    let mut puller = Puller::new(checkpoint, 200);
    let (synced, _, _) = pull(&source, &mut puller, &mut stored);
    assert_eq!(synced, 200, "only the lost page is synced again");
    assert_converged(&source, &stored);
}

#[test]
fn the_answering_side_takes_nothing_from_the_puller() {
    let source = Source::new(5);
    let mut replica = MemoryDocs::default();
    let mut puller = Puller::new(0, 100);
    pull(&source, &mut puller, &mut replica);
    // The replica writes to a document on its own; a pull leaves the source untouched and
    // the replica keeps both histories.
    let doc = replica.docs.get_mut("doc-00001").unwrap();
    let mut local = AutoCommit::load(&doc.save()).unwrap().with_actor(ActorId::from(b"replica".as_slice()));
    local.put(ROOT, "local", 1).unwrap();
    local.commit();
    *doc = Automerge::load(&local.save()).unwrap();
    let before = source.docs["doc-00001"].get_heads();
    let mut puller = Puller::new(0, 100);
    pull(&source, &mut puller, &mut replica);
    assert_eq!(source.docs["doc-00001"].get_heads(), before);
    let merged = &replica.docs["doc-00001"];
    assert_eq!(merged.get_heads().len(), 1, "the local change sits on top of the source's");
    use automerge::ReadDoc;
    assert!(before.iter().all(|h| merged.get_change_by_hash(h).is_some()), "the source's history is kept");
}

#[test]
fn a_peer_sees_only_what_it_may_and_its_checkpoint_still_advances() {
    let source = Source::new(10);
    let response =
        source.serve(&ReplicationRequest::Changes { since: 0, limit: 100 }, |id| id.ends_with('3'));
    match response {
        ReplicationResponse::Changes { entries, last_seq, more } => {
            assert_eq!(entries.iter().map(|e| e.doc_id.as_str()).collect::<Vec<_>>(), ["doc-00003"]);
            assert_eq!((last_seq, more), (10, false));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_answers_are_errors_not_panics() {
    let source = Source::new(3);
    let mut replica = MemoryDocs::default();
    let mut puller = Puller::new(0, 10);
    let request = puller.ask_changes();
    let step = puller.on_response(source.serve(&request, |_| true), &mut replica).unwrap();
    let PullStep::Send(ReplicationRequest::Sync { docs }) = step else { panic!("expected a sync request") };
    let mut answer = answer_sync(&docs, |id: &str| source.docs.get(id).cloned()).unwrap();
    answer[0].message = vec![0x42, 0xff, 0xff];
    assert!(puller.on_response(ReplicationResponse::Sync { docs: answer.clone() }, &mut replica).is_err());
    answer.pop();
    let mut puller = Puller::new(0, 10);
    let request = puller.ask_changes();
    let _ = puller.on_response(source.serve(&request, |_| true), &mut replica).unwrap();
    assert!(puller.on_response(ReplicationResponse::Sync { docs: answer }, &mut replica).is_err());
    let mut garbage = docs.clone();
    garbage[0].message = b"not a sync message".to_vec();
    garbage[0].whole = false;
    assert!(answer_sync(&garbage, |id: &str| source.docs.get(id).cloned()).is_err());
}

#[test]
fn a_document_sent_whole_is_its_save_followed_by_its_changes() {
    // What a node stores: a full save, then one incremental chunk per later event.
    let mut doc = AutoCommit::new().with_actor(ActorId::from(b"primary".as_slice()));
    doc.put(ROOT, "registered", 1).unwrap();
    doc.commit();
    let mut stored = doc.save_nocompress();
    for i in 0..3 {
        let heads = doc.get_heads();
        doc.put(ROOT, format!("dose-{i}"), i).unwrap();
        doc.commit();
        stored.extend(doc.save_after(&heads));
    }
    let loaded = Automerge::load(&stored).unwrap();
    assert_eq!(loaded.get_heads(), doc.get_heads());
    // And a fresh replica asks for it whole: one round trip.
    let mut source = Source::new(0);
    source.docs.insert("doc-x".into(), loaded);
    source.feed.push((1, "doc-x".into()));
    let mut replica = MemoryDocs::default();
    let mut puller = Puller::new(0, 10);
    let (synced, _, requests) = pull(&source, &mut puller, &mut replica);
    assert_eq!((synced, requests), (1, 2));
    assert!(replica.whole.contains_key("doc-x"), "kept as received, to be stored without re-saving");
    assert_converged(&source, &replica);
}
