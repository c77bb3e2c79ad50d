//! The federation transport: libp2p over TCP + Noise + Yamux, with identify, ping, and three
//! request-response protocols — `/vrs/directory/1` (fetch the newest signed directory),
//! `/vrs/replication/1` (the pull protocol of [`protocol::replication`]) and
//! `/vrs/capture/1` (terminals enrol, fetch their bundle and push captures; municipal nodes
//! forward captures of each other's coupons, see [`protocol::terminal`]).
//!
//! A node accepts connections only from peer ids in its signed directory (plus the national
//! node it was configured with) and its enrolled terminals ([`crate::gate`]), and answers a
//! replication request only if the directory says the peer may see those documents. A standby dials its municipality's primary and pulls
//! continuously; each completed page is stored with its checkpoint through the writer, in
//! one durable commit, so a crash resumes at the last stored page.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use libp2p::futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, InboundRequestId, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, identify, noise, ping, tcp, yamux,
};
use protocol::directory::{Directory, DirectoryEntry, NodeRole, SignedDirectory, may_replicate_residents};
use protocol::handoff::{HandoffResponse, HandoffSync};
use protocol::municipality::MunicipalityCode;
use protocol::replication::{
    PageDocs, PullStep, Puller, ReplicationRequest, ReplicationResponse, answer_changes, answer_sync,
};
use protocol::statistics::{ReportRequest, ReportResponse};
use protocol::terminal::{CaptureRequest, CaptureResponse, MAX_CAPTURES_PER_REQUEST};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::peer_limits::{PeerLimits, Protocol, RATE_LIMITED, Refusal};
use crate::store::Store;
use crate::writer::{Command, Who, WriterHandle};

/// The replication protocol.
pub const REPLICATION_PROTOCOL: StreamProtocol = StreamProtocol::new("/vrs/replication/1");
/// The capture protocol (terminals, and captures forwarded between municipalities).
pub const CAPTURE_PROTOCOL: StreamProtocol = StreamProtocol::new("/vrs/capture/1");
/// How long an unknown peer may stay connected to present an enrolment token.
pub const ENROLMENT_WINDOW: Duration = Duration::from_secs(20);
/// Unknown peers connected at once to enrol; more are closed.
pub const MAX_ENROLLING: usize = 8;
/// The directory protocol.
pub const DIRECTORY_PROTOCOL: StreamProtocol = StreamProtocol::new("/vrs/directory/1");
/// Municipal statistics and audit checkpoints to the national node.
pub const REPORT_PROTOCOL: StreamProtocol = StreamProtocol::new("/vrs/report/1");
/// Relocation handoffs between a municipal primary and the national ledger.
pub const HANDOFF_PROTOCOL: StreamProtocol = StreamProtocol::new("/vrs/handoff/1");
/// How often a municipal primary asks the national ledger for handoffs when it has nothing
/// to send (it asks at once when it has).
pub const HANDOFF_POLL: Duration = Duration::from_millis(250);
/// How often a municipal primary looks for statistics to report.
const REPORT_EVERY: Duration = Duration::from_millis(100);
/// An empty report (a heartbeat) at least this often, so the national node sees the
/// municipality is alive even on a day without doses.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);
/// Largest request accepted.
pub const MAX_REQUEST_BYTES: u64 = 4 * 1024 * 1024;
/// Largest answer accepted.
pub const MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;
/// Feed entries a puller asks for at a time.
pub const PAGE_SIZE: u32 = 4096;

/// What this process pulled, for `GET /api/v1/status` and the benchmarks: documents stored,
/// and payload bytes (sync messages, heads, ids, feed entries) received and sent.
pub static PULLED_DOCUMENTS: AtomicU64 = AtomicU64::new(0);
/// Payload bytes received in replication answers.
pub static PULLED_BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// Payload bytes sent in replication requests.
pub static PULLED_BYTES_SENT: AtomicU64 = AtomicU64::new(0);
/// Replication requests sent.
pub static PULL_REQUESTS: AtomicU64 = AtomicU64::new(0);

fn payload_of_docs(docs: &[protocol::replication::DocMessage]) -> u64 {
    docs.iter().map(|d| (d.message.len() + d.heads.len() + d.doc_id.len()) as u64).sum()
}

fn request_payload(request: &ReplicationRequest) -> u64 {
    match request {
        ReplicationRequest::Changes { .. } => 12,
        ReplicationRequest::Sync { docs } => payload_of_docs(docs),
    }
}

fn response_payload(response: &ReplicationResponse) -> u64 {
    match response {
        ReplicationResponse::Changes { entries, .. } => {
            9 + entries.iter().map(|e| 8 + e.doc_id.len() as u64).sum::<u64>()
        }
        ReplicationResponse::Sync { docs } => payload_of_docs(docs),
        ReplicationResponse::Refused { code, message } => (code.len() + message.len()) as u64,
    }
}

/// "Send me your directory if it is newer than mine."
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirectoryRequest {
    /// The version held, if any.
    pub held_version: Option<u64>,
}

/// The answer: the newer directory, or none.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirectoryResponse {
    /// The answering node's directory, if newer.
    pub directory: Option<SignedDirectory>,
}

/// The node's libp2p behaviours.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) gate: crate::gate::Gate,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    replication: request_response::cbor::Behaviour<ReplicationRequest, ReplicationResponse>,
    pub(crate) directory: request_response::cbor::Behaviour<DirectoryRequest, DirectoryResponse>,
    pub(crate) capture: request_response::cbor::Behaviour<CaptureRequest, CaptureResponse>,
    pub(crate) report: request_response::cbor::Behaviour<ReportRequest, ReportResponse>,
    pub(crate) handoff: request_response::cbor::Behaviour<HandoffSync, HandoffResponse>,
}

/// Reads or makes the node's libp2p identity (`keys/p2p-identity.key`, protobuf encoding).
pub fn load_or_create_identity(path: &std::path::Path) -> anyhow::Result<Keypair> {
    if path.exists() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        return Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a libp2p key: {e}", path.display()));
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair.to_protobuf_encoding().map_err(|e| anyhow::anyhow!("cannot encode the key: {e}"))?;
    crate::config::write_private(path, &bytes)?;
    Ok(keypair)
}

/// What the p2p service of a node needs.
pub struct P2pOptions {
    /// Identity.
    pub keypair: Keypair,
    /// Where to listen.
    pub listen: Multiaddr,
    /// The national node (bootstrap): its address ending in `/p2p/<peer id>`.
    pub national: Option<Multiaddr>,
    /// The national directory key.
    pub national_key: Vec<u8>,
    /// Where the newest verified directory is kept.
    pub directory_path: PathBuf,
    /// This node's role.
    pub role: NodeRole,
    /// This node's municipality (`None` for national).
    pub municipality: Option<MunicipalityCode>,
    /// The store (`None` for the national node, which holds no residents).
    pub store: Option<Arc<Store>>,
    /// The writer (standby pulls are stored through it).
    pub writer: Option<WriterHandle>,
    /// Terminals and forwarded captures (a municipal primary).
    pub captures: Option<Arc<crate::terminals::CaptureService>>,
    /// Statistics and checkpoints to report (a municipal primary in a federation).
    pub reporter: Option<Arc<crate::statistics::Reporter>>,
    /// Where reports are kept (the national node).
    pub national_store: Option<Arc<crate::national::NationalStore>>,
    /// Relocation handoffs (a municipal primary in a federation).
    pub handoffs: Option<Arc<crate::handoff::HandoffService>>,
}

/// Loads the newest verified directory from disk.
pub fn load_directory(
    path: &std::path::Path,
    national_key: &[u8],
) -> anyhow::Result<Option<SignedDirectory>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let signed: SignedDirectory =
        serde_json::from_str(&text).with_context(|| format!("{} is not a directory", path.display()))?;
    signed.verify(national_key).with_context(|| format!("{} does not verify", path.display()))?;
    Ok(Some(signed))
}

fn save_directory(path: &std::path::Path, signed: &SignedDirectory) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(signed)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn codec<Req, Resp>() -> request_response::cbor::codec::Codec<Req, Resp> {
    request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(MAX_REQUEST_BYTES)
        .set_response_size_maximum(MAX_RESPONSE_BYTES)
}

/// Builds the swarm.
pub(crate) fn build_swarm(keypair: Keypair) -> anyhow::Result<Swarm<Behaviour>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        // `/memory/N` addresses: the same Noise and Yamux over an in-process transport, for
        // running many nodes in one process (`vrs-node smoke-federation`).
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            use libp2p::core::Transport as _;
            Ok(libp2p::core::transport::MemoryTransport::default()
                .upgrade(libp2p::core::upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })?
        .with_behaviour(|key| {
            let config = request_response::Config::default().with_request_timeout(Duration::from_secs(60));
            Behaviour {
                gate: crate::gate::Gate::default(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(4))
                        .with_max_pending_incoming(Some(128))
                        .with_max_established(Some(8192)),
                ),
                identify: identify::Behaviour::new(identify::Config::new("/vrs/1".into(), key.public())),
                ping: ping::Behaviour::new(ping::Config::new()),
                replication: request_response::Behaviour::with_codec(
                    codec(),
                    [(REPLICATION_PROTOCOL, ProtocolSupport::Full)],
                    config.clone(),
                ),
                directory: request_response::Behaviour::with_codec(
                    codec(),
                    [(DIRECTORY_PROTOCOL, ProtocolSupport::Full)],
                    config.clone(),
                ),
                capture: request_response::Behaviour::with_codec(
                    codec(),
                    [(CAPTURE_PROTOCOL, ProtocolSupport::Full)],
                    config.clone(),
                ),
                report: request_response::Behaviour::with_codec(
                    codec(),
                    [(REPORT_PROTOCOL, ProtocolSupport::Full)],
                    config.clone(),
                ),
                handoff: request_response::Behaviour::with_codec(
                    codec(),
                    [(HANDOFF_PROTOCOL, ProtocolSupport::Full)],
                    config,
                ),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

/// The page's documents on the pulling side. A document this node does not hold that
/// arrives whole is kept as bytes only: it is loaded once, off the event loop, when the
/// page is stored.
#[derive(Default)]
struct PulledDocs {
    docs: HashMap<String, automerge::Automerge>,
    whole: HashMap<String, Vec<u8>>,
}

impl PageDocs for PulledDocs {
    fn doc_mut(&mut self, doc_id: &str) -> &mut automerge::Automerge {
        if let Some(bytes) = self.whole.remove(doc_id) {
            // Asked about again after arriving whole: load it now.
            let loaded = automerge::Automerge::load(&bytes).unwrap_or_default();
            self.docs.insert(doc_id.to_owned(), loaded);
        }
        self.docs.entry(doc_id.to_owned()).or_default()
    }

    fn put_whole(&mut self, doc_id: &str, bytes: Vec<u8>) -> Result<(), String> {
        match self.docs.get_mut(doc_id) {
            // Never let a peer's copy replace local history: merge it.
            Some(doc) if !doc.get_heads().is_empty() => {
                let mut incoming = automerge::Automerge::load(&bytes).map_err(|e| e.to_string())?;
                doc.merge(&mut incoming).map_err(|e| e.to_string())?;
            }
            _ => {
                self.docs.remove(doc_id);
                self.whole.insert(doc_id.to_owned(), bytes);
            }
        }
        Ok(())
    }
}

struct PullState {
    peer: PeerId,
    puller: Puller,
    docs: PulledDocs,
    in_flight: Option<OutboundRequestId>,
    /// Pages handed to the store task and not yet stored.
    storing: u32,
    /// Bumped when the puller restarts from the stored checkpoint; the store task drops
    /// pages of an older generation after a failure.
    generation: u64,
    next_at: Instant,
}

/// A completed page on its way to the store, in order.
struct StorePage {
    generation: u64,
    peer: PeerId,
    checkpoint: u64,
    /// Each document: merged here, or its bytes as they arrived whole (stored as they are).
    docs: Vec<(String, Option<automerge::Automerge>, Option<Vec<u8>>)>,
}

/// Reads the record of each pulled document (loading those that arrived whole) and saves
/// the merged ones.
fn prepare(
    docs: Vec<(String, Option<automerge::Automerge>, Option<Vec<u8>>)>,
) -> anyhow::Result<Vec<crate::writer::ReplicatedDoc>> {
    docs.into_iter()
        .map(|(id, doc, whole)| {
            let (doc, saved) = match (doc, whole) {
                (Some(doc), Some(bytes)) => (doc, bytes),
                (Some(doc), None) => {
                    let saved = doc.save_nocompress();
                    (doc, saved)
                }
                (None, Some(bytes)) => {
                    let doc = automerge::Automerge::load(&bytes)
                        .with_context(|| format!("replicated document {id} does not load"))?;
                    (doc, bytes)
                }
                (None, None) => anyhow::bail!("replicated document {id} arrived empty"),
            };
            let record = protocol::document::read_record(&doc)
                .with_context(|| format!("replicated document {id} is not a resident"))?;
            Ok(crate::writer::ReplicatedDoc { id, saved, record })
        })
        .collect()
}

/// Stores pages one after another (so checkpoints are stored in feed order), in two
/// stages that overlap: page n+1 is loaded and read (off the async workers, on two threads)
/// while page n is written (one writer command per page). After a failure it drops the
/// rest of that generation, which the puller will fetch again.
async fn store_pages(
    writer: WriterHandle,
    mut pages: mpsc::Receiver<StorePage>,
    stored: mpsc::Sender<(u64, anyhow::Result<()>)>,
) {
    type Prepared = (u64, PeerId, u64, usize, anyhow::Result<Vec<crate::writer::ReplicatedDoc>>);
    let (ready, mut ready_rx) = mpsc::channel::<Prepared>(1);
    let preparer = tokio::spawn(async move {
        while let Some(StorePage { generation, peer, checkpoint, docs }) = pages.recv().await {
            let count = docs.len();
            let prepared = tokio::task::spawn_blocking(move || {
                // Two halves on two threads: loading documents is most of a page's work.
                let mut docs = docs;
                let second = docs.split_off(docs.len() / 2);
                std::thread::scope(|scope| {
                    let other = scope.spawn(|| prepare(second));
                    let mut first = prepare(docs)?;
                    first.extend(other.join().map_err(|_| anyhow::anyhow!("a page thread panicked"))??);
                    Ok(first)
                })
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|r| r);
            if ready.send((generation, peer, checkpoint, count, prepared)).await.is_err() {
                break;
            }
        }
    });
    let mut failed_generation = None;
    while let Some((generation, peer, checkpoint, count, prepared)) = ready_rx.recv().await {
        let result = match prepared {
            // Dropped: tell the loop, so its count of queued pages stays right.
            _ if failed_generation == Some(generation) => {
                Err(anyhow::anyhow!("dropped after an earlier page failed"))
            }
            Ok(docs) => {
                let who = Who {
                    actor: format!("peer:{peer}"),
                    role: "standby_replication".into(),
                    request_id: "-".into(),
                };
                writer
                    .call(&who, |reply| Command::Replicated {
                        docs,
                        checkpoint_key: checkpoint_key(&peer),
                        checkpoint,
                        reply,
                    })
                    .await
                    .map_err(|p| anyhow::anyhow!("{}", p.message_en))
            }
            Err(error) => Err(error),
        };
        match &result {
            Ok(()) => {
                PULLED_DOCUMENTS.fetch_add(count as u64, Ordering::Relaxed);
            }
            Err(_) => failed_generation = Some(generation),
        }
        if stored.send((generation, result)).await.is_err() {
            break;
        }
    }
    preparer.abort();
}

/// Everything the event loop holds.
struct Node {
    options: P2pOptions,
    directory: Option<SignedDirectory>,
    connected: HashSet<PeerId>,
    dialing: HashMap<PeerId, (Instant, Duration)>,
    pull: Option<PullState>,
    answers: mpsc::Sender<(ResponseChannel<ReplicationResponse>, ReplicationResponse)>,
    pages: Option<mpsc::Sender<StorePage>>,
    directory_asked: Option<Instant>,
    directory_modified: Option<std::time::SystemTime>,
    /// Enrolled terminals (not revoked), by peer.
    terminals: HashMap<PeerId, crate::terminals::TerminalRecord>,
    /// When the terminal list was last read, and its sequence then.
    terminals_read: Option<(Instant, u64)>,
    /// Unknown peers connected to enrol, and when they must be gone.
    enrolling: HashMap<PeerId, Instant>,
    capture_answers: mpsc::Sender<CaptureAnswer>,
    /// Forward requests in flight, by owner municipality: the request and the outbox key of
    /// each capture sent, by event id.
    forwarding: HashMap<MunicipalityCode, (Option<OutboundRequestId>, HashMap<String, String>)>,
    forward_done: mpsc::Sender<MunicipalityCode>,
    forward_next: Instant,
    /// A standby's bundle request to its primary (for the lots), and when it was sent.
    bundle_request: Option<OutboundRequestId>,
    bundle_asked: Option<Instant>,
    bundle_version: Arc<AtomicU64>,
    /// A report being built or sent, and when the last one went.
    report: ReportState,
    report_events: mpsc::Sender<ReportEvent>,
    report_answers: mpsc::Sender<(ResponseChannel<ReportResponse>, ReportResponse)>,
    /// The handoff sync in flight (what was sent), and when the next may go.
    handoff_sent: Option<(Option<OutboundRequestId>, Box<HandoffSync>)>,
    handoff_next: Instant,
    handoff_done: mpsc::Sender<bool>,
    handoff_answers: mpsc::Sender<(ResponseChannel<HandoffResponse>, HandoffResponse)>,
    /// The directory shared with the ledger's blocking tasks.
    shared_directory: Option<Arc<SignedDirectory>>,
    /// Each peer's requests in flight and rate, per protocol.
    limits: PeerLimits<InboundRequestId>,
}

#[derive(Default)]
enum ReportPhase {
    #[default]
    Idle,
    Building,
    Sent(OutboundRequestId, Box<crate::statistics::Report>),
    Acknowledging,
}

#[derive(Default)]
struct ReportState {
    phase: ReportPhase,
    next_at: Option<Instant>,
    last_sent: Option<Instant>,
}

enum ReportEvent {
    Built(anyhow::Result<crate::statistics::Report>),
    Acknowledged(anyhow::Result<()>),
}

/// An answer on the capture protocol, computed off the event loop.
struct CaptureAnswer {
    channel: ResponseChannel<CaptureResponse>,
    response: CaptureResponse,
    /// Close the connection after answering (a refused or finished enrolment).
    then_close: Option<PeerId>,
}

/// Runs the p2p service until the process ends. `bound` learns the first listen address.
pub async fn run(
    options: P2pOptions,
    bound: Option<tokio::sync::oneshot::Sender<Multiaddr>>,
) -> anyhow::Result<()> {
    let mut swarm = build_swarm(options.keypair.clone())?;
    swarm
        .listen_on(options.listen.clone())
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let directory = load_directory(&options.directory_path, &options.national_key)?;
    let (answers, mut answers_rx) = mpsc::channel(256);
    let (capture_answers, mut capture_answers_rx) = mpsc::channel::<CaptureAnswer>(256);
    let (forward_done, mut forward_done_rx) = mpsc::channel(64);
    let (report_events, mut report_events_rx) = mpsc::channel(4);
    let (report_answers, mut report_answers_rx) = mpsc::channel(64);
    let (handoff_done, mut handoff_done_rx) = mpsc::channel(4);
    let (handoff_answers, mut handoff_answers_rx) = mpsc::channel(256);
    let (stored, mut stored_rx) = mpsc::channel(4);
    let pages = options.writer.clone().map(|writer| {
        let (pages, pages_rx) = mpsc::channel(2);
        tokio::spawn(store_pages(writer, pages_rx, stored.clone()));
        pages
    });
    drop(stored);
    let mut node = Node {
        options,
        directory: None,
        connected: HashSet::new(),
        dialing: HashMap::new(),
        pull: None,
        answers,
        pages,
        directory_asked: None,
        directory_modified: None,
        terminals: HashMap::new(),
        terminals_read: None,
        enrolling: HashMap::new(),
        capture_answers,
        forwarding: HashMap::new(),
        forward_done,
        forward_next: Instant::now(),
        bundle_request: None,
        bundle_asked: None,
        bundle_version: Arc::new(AtomicU64::new(0)),
        report: ReportState::default(),
        report_events,
        report_answers,
        handoff_sent: None,
        handoff_next: Instant::now(),
        handoff_done,
        handoff_answers,
        shared_directory: None,
        limits: PeerLimits::default(),
    };
    node.apply_gate(&mut swarm, HashSet::new());
    node.refresh_terminals(&mut swarm);
    if let Some(directory) = directory {
        node.install(&mut swarm, directory);
    }
    let mut bound = bound;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut report_tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            event = swarm.select_next_some() => {
                if let SwarmEvent::NewListenAddr { address, .. } = &event {
                    tracing::info!(%address, peer = %swarm.local_peer_id(), "p2p listening");
                    println!("p2p 待受中 / p2p listening on {address}/p2p/{}", swarm.local_peer_id());
                    if let Some(bound) = bound.take() {
                        let _ = bound.send(address.clone());
                    }
                }
                node.on_event(&mut swarm, event);
            }
            Some((channel, response)) = answers_rx.recv() => {
                let _ = swarm.behaviour_mut().replication.send_response(channel, response);
            }
            Some((generation, result)) = stored_rx.recv() => node.on_stored(&mut swarm, generation, result),
            Some(answer) = capture_answers_rx.recv() => {
                let enrolled = matches!(answer.response, CaptureResponse::Enrolled { .. });
                if let Some(peer) = answer.then_close {
                    tracing::info!(%peer, enrolled, "answered an enrolment");
                }
                let _ = swarm.behaviour_mut().capture.send_response(answer.channel, answer.response);
                match answer.then_close {
                    Some(peer) if enrolled => {
                        // Stored already: let the new terminal in for good at once.
                        node.terminals_read = None;
                        node.refresh_terminals(&mut swarm);
                        if swarm.behaviour().gate.is_allowed(&peer) {
                            node.enrolling.remove(&peer);
                        } else {
                            node.enrolling.insert(peer, Instant::now() + Duration::from_millis(500));
                        }
                    }
                    Some(peer) => {
                        node.enrolling.insert(peer, Instant::now() + Duration::from_millis(500));
                    }
                    None => {}
                }
            }
            Some(owner) = forward_done_rx.recv() => {
                node.forwarding.remove(&owner);
            }
            Some(event) = report_events_rx.recv() => node.on_report_event(&mut swarm, event),
            Some((channel, response)) = report_answers_rx.recv() => {
                let _ = swarm.behaviour_mut().report.send_response(channel, response);
            }
            Some(busy) = handoff_done_rx.recv() => {
                node.handoff_sent = None;
                node.handoff_next = if busy { Instant::now() } else { Instant::now() + HANDOFF_POLL };
                node.sync_handoffs(&mut swarm);
            }
            Some((channel, response)) = handoff_answers_rx.recv() => {
                let _ = swarm.behaviour_mut().handoff.send_response(channel, response);
            }
            _ = tick.tick() => node.maintain(&mut swarm),
            _ = report_tick.tick(), if node.options.reporter.is_some() || node.options.handoffs.is_some() => {
                if node.options.reporter.is_some() {
                    node.report(&mut swarm);
                }
                node.sync_handoffs(&mut swarm);
            }
        }
    }
}

impl Node {
    fn national_peer(&self) -> Option<PeerId> {
        self.options.national.as_ref().and_then(peer_of)
    }

    fn entry(&self, peer: &PeerId) -> Option<&DirectoryEntry> {
        self.directory.as_ref().and_then(|d| d.directory.peer(&peer.to_string()))
    }

    /// Takes a verified directory: persists it and rebuilds the allow-list.
    fn install(&mut self, swarm: &mut Swarm<Behaviour>, signed: SignedDirectory) {
        let old: HashSet<PeerId> = self.allowed_peers();
        if self.options.role != NodeRole::National
            && let Err(error) = save_directory(&self.options.directory_path, &signed)
        {
            tracing::error!(%error, "cannot store the directory");
        }
        tracing::info!(
            version = signed.directory.version,
            peers = signed.directory.entries.len(),
            "directory installed"
        );
        let shared = Arc::new(signed.clone());
        if let Some(handoffs) = &self.options.handoffs {
            handoffs.set_directory(shared.clone());
        }
        self.shared_directory = Some(shared);
        self.directory = Some(signed);
        self.apply_gate(swarm, old);
    }

    /// Gives the gate the allowed peers and closes connections of peers no longer allowed.
    fn apply_gate(&mut self, swarm: &mut Swarm<Behaviour>, old: HashSet<PeerId>) {
        let new = self.allowed_peers();
        for peer in old.difference(&new) {
            let _ = swarm.disconnect_peer_id(*peer);
        }
        swarm.behaviour_mut().gate.set_allowed(new);
    }

    /// Rereads the enrolled terminals and whether enrolment is open, about once a second.
    fn refresh_terminals(&mut self, swarm: &mut Swarm<Behaviour>) {
        let Some(store) = self.options.store.clone().filter(|_| self.options.captures.is_some()) else {
            return;
        };
        // A new token or terminal shows at the next tick; expiries within a second.
        let sequence = store.read().and_then(|v| v.meta(crate::store::META_TERMINALS_SEQ)).unwrap_or(0);
        if self
            .terminals_read
            .is_some_and(|(at, seen)| seen == sequence && at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let now = time::OffsetDateTime::now_utc();
        match crate::terminals::terminal_peers(&store, now) {
            Ok((terminals, open)) => {
                let old = self.allowed_peers();
                self.terminals = terminals
                    .into_iter()
                    .filter_map(|t| Some((t.certificate.peer_id.parse().ok()?, t)))
                    .collect();
                swarm.behaviour_mut().gate.set_enrolment_open(open);
                tracing::debug!(terminals = self.terminals.len(), open, sequence, "terminals read");
                if self.terminals_read.is_none_or(|(_, seen)| seen != sequence) {
                    self.apply_gate(swarm, old);
                }
                self.terminals_read = Some((Instant::now(), sequence));
            }
            Err(error) => tracing::error!(%error, "cannot read the enrolled terminals"),
        }
    }

    fn allowed_peers(&self) -> HashSet<PeerId> {
        let mut peers: HashSet<PeerId> = self
            .directory
            .iter()
            .flat_map(|d| d.directory.entries.iter())
            .filter_map(|e| e.peer_id.parse().ok())
            .collect();
        peers.extend(self.national_peer());
        peers.extend(self.terminals.keys().copied());
        peers
    }

    /// The peer this node pulls resident documents from: a standby pulls from its primary.
    fn upstream(&self) -> Option<(PeerId, Vec<Multiaddr>)> {
        if self.options.role != NodeRole::Standby {
            return None;
        }
        let directory = &self.directory.as_ref()?.directory;
        let primary = directory.primary_of(self.options.municipality?)?;
        let peer = primary.peer_id.parse().ok()?;
        Some((peer, primary.addresses.iter().filter_map(|a| a.parse().ok()).collect()))
    }

    fn dial(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, addresses: Vec<Multiaddr>) {
        if self.connected.contains(&peer) || addresses.is_empty() {
            return;
        }
        let now = Instant::now();
        let (next, backoff) = self.dialing.get(&peer).copied().unwrap_or((now, Duration::from_millis(250)));
        if now < next {
            return;
        }
        self.dialing.insert(peer, (now + backoff, (backoff * 2).min(Duration::from_secs(15))));
        let options = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addresses).build();
        if let Err(error) = swarm.dial(options) {
            tracing::debug!(%peer, %error, "dial failed");
        }
    }

    fn maintain(&mut self, swarm: &mut Swarm<Behaviour>) {
        self.refresh_terminals(swarm);
        let now = Instant::now();
        self.limits.prune(now);
        let expired: Vec<PeerId> =
            self.enrolling.iter().filter(|(_, until)| **until <= now).map(|(peer, _)| *peer).collect();
        for peer in expired {
            self.enrolling.remove(&peer);
            if !swarm.behaviour().gate.is_allowed(&peer) {
                let _ = swarm.disconnect_peer_id(peer);
            }
        }
        self.forward(swarm);
        self.report(swarm);
        if self.options.role == NodeRole::National {
            // The national administrator approves with the CLI, which rewrites the file.
            let modified = std::fs::metadata(&self.options.directory_path).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified != self.directory_modified {
                self.directory_modified = modified;
                match load_directory(&self.options.directory_path, &self.options.national_key) {
                    Ok(Some(signed)) if self.directory.as_ref() != Some(&signed) => {
                        self.install(swarm, signed)
                    }
                    Ok(_) => {}
                    Err(error) => tracing::error!(%error, "the directory file does not verify"),
                }
            }
        }
        if let Some(national) = self.options.national.clone()
            && let Some(peer) = peer_of(&national)
        {
            let address: Multiaddr =
                national.iter().filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_))).collect();
            self.dial(swarm, peer, vec![address]);
            // Ask for a newer directory now and then.
            let due = self.directory_asked.is_none_or(|at| at.elapsed() > Duration::from_secs(2));
            if self.connected.contains(&peer) && due {
                self.directory_asked = Some(Instant::now());
                let held = self.directory.as_ref().map(|d| d.directory.version);
                swarm.behaviour_mut().directory.send_request(&peer, DirectoryRequest { held_version: held });
            }
        }
        let Some((peer, addresses)) = self.upstream() else {
            self.pull = None;
            return;
        };
        self.dial(swarm, peer, addresses);
        if self.pull.as_ref().is_some_and(|p| p.peer != peer) {
            self.pull = None;
        }
        // The lots come with the bundle a terminal gets; a standby asks for it too.
        if self.connected.contains(&peer)
            && self.bundle_request.is_none()
            && self.bundle_asked.is_none_or(|at| at.elapsed() > Duration::from_secs(2))
        {
            self.bundle_asked = Some(Instant::now());
            let request =
                CaptureRequest::Refresh { held_version: self.bundle_version.load(Ordering::Relaxed) };
            self.bundle_request = Some(swarm.behaviour_mut().capture.send_request(&peer, request));
        }
        if self.pull.is_none() {
            let checkpoint = self.stored_checkpoint(&peer);
            self.pull = Some(PullState {
                peer,
                puller: Puller::new(checkpoint, PAGE_SIZE),
                docs: PulledDocs::default(),
                in_flight: None,
                storing: 0,
                generation: 0,
                next_at: Instant::now(),
            });
        }
        let connected = self.connected.contains(&peer);
        if let Some(pull) = self.pull.as_mut()
            && connected
            && pull.in_flight.is_none()
            && pull.storing < 3
            && Instant::now() >= pull.next_at
        {
            pull.docs = PulledDocs::default();
            let request = pull.puller.ask_changes();
            PULLED_BYTES_SENT.fetch_add(request_payload(&request), Ordering::Relaxed);
            PULL_REQUESTS.fetch_add(1, Ordering::Relaxed);
            pull.in_flight = Some(swarm.behaviour_mut().replication.send_request(&peer, request));
        }
    }

    fn stored_checkpoint(&self, peer: &PeerId) -> u64 {
        let Some(store) = &self.options.store else { return 0 };
        store.read().and_then(|v| v.meta(&checkpoint_key(peer))).unwrap_or(0)
    }

    fn on_event(&mut self, swarm: &mut Swarm<Behaviour>, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                tracing::info!(peer = %peer_id, "connected");
                if !swarm.behaviour().gate.is_allowed(&peer_id) {
                    // Let in only to present an enrolment token, a few at a time.
                    if self.enrolling.len() >= MAX_ENROLLING && !self.enrolling.contains_key(&peer_id) {
                        tracing::warn!(peer = %peer_id, "too many peers enrolling at once; closed");
                        let _ = swarm.disconnect_peer_id(peer_id);
                    } else {
                        self.enrolling.insert(peer_id, Instant::now() + ENROLMENT_WINDOW);
                    }
                }
                self.connected.insert(peer_id);
                self.dialing.remove(&peer_id);
                if self.upstream().is_some_and(|(upstream, _)| upstream == peer_id) {
                    // Start pulling at once.
                    self.maintain(swarm);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                tracing::info!(peer = %peer_id, "disconnected");
                self.connected.remove(&peer_id);
                if let Some(pull) = self.pull.as_mut()
                    && pull.peer == peer_id
                {
                    pull.in_flight = None;
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection refused");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Directory(event)) => {
                self.finished(Protocol::Directory, &event);
                self.on_directory(swarm, event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Replication(event)) => {
                self.finished(Protocol::Replication, &event);
                self.on_replication(swarm, event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Capture(event)) => {
                self.finished(Protocol::Capture, &event);
                self.on_capture(swarm, event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Report(event)) => {
                self.finished(Protocol::Report, &event);
                self.on_report(event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Handoff(event)) => {
                self.finished(Protocol::Handoff, &event);
                self.on_handoff(event);
            }
            _ => {}
        }
    }

    /// An inbound request answered (or failed, or dropped): its peer may send another.
    fn finished<Req, Resp>(&mut self, protocol: Protocol, event: &request_response::Event<Req, Resp>) {
        if let request_response::Event::ResponseSent { request_id, .. }
        | request_response::Event::InboundFailure { request_id, .. } = event
        {
            self.limits.finished(protocol, *request_id);
        }
    }

    /// Takes an inbound request into its peer's limits, or says why it is refused.
    fn take(&mut self, peer: PeerId, protocol: Protocol, id: InboundRequestId) -> Result<(), String> {
        self.limits
            .take(peer, protocol, id, Instant::now())
            .map_err(|refusal: Refusal| refusal.message(protocol))
    }

    fn on_directory(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<DirectoryRequest, DirectoryResponse>,
    ) {
        let request_response::Event::Message { peer, message, .. } = event else { return };
        match message {
            request_response::Message::Request { request_id, request, channel } => {
                // The directory protocol has no refusal: a request beyond the limits is
                // dropped, and the peer sees it fail.
                if !swarm.behaviour().gate.is_allowed(&peer)
                    || self.take(peer, Protocol::Directory, request_id).is_err()
                {
                    return;
                }
                let newer = self
                    .directory
                    .clone()
                    .filter(|d| request.held_version.is_none_or(|held| d.directory.version > held));
                let _ = swarm
                    .behaviour_mut()
                    .directory
                    .send_response(channel, DirectoryResponse { directory: newer });
            }
            request_response::Message::Response { response, .. } => {
                let Some(signed) = response.directory else { return };
                let held = self.directory.as_ref().map(|d| d.directory.version);
                match signed.accept(&self.options.national_key, held) {
                    Ok(_) => {
                        self.install(swarm, signed);
                        // Dial whom the new directory names now, not at the next tick.
                        self.maintain(swarm);
                    }
                    Err(error) => tracing::warn!(%peer, %error, "directory refused"),
                }
            }
        }
    }

    fn on_capture(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<CaptureRequest, CaptureResponse>,
    ) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request_id, request, channel },
                ..
            } => self.answer_capture(swarm, peer, request_id, request, channel),
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                if self.bundle_request == Some(request_id) {
                    self.bundle_request = None;
                    self.take_lots(response);
                    return;
                }
                let Some(owner) = self.forward_owner(request_id) else { return };
                let Some(service) = self.options.captures.clone() else { return };
                let sent =
                    self.forwarding.get_mut(&owner).map(|(_, sent)| std::mem::take(sent)).unwrap_or_default();
                match response {
                    CaptureResponse::States { states } => {
                        let done = self.forward_done.clone();
                        tokio::spawn(async move {
                            if let Err(problem) = service.answered(&peer.to_string(), sent, states).await {
                                tracing::error!(error = %problem.message_en, "cannot store forwarded answers");
                            }
                            let _ = done.send(owner).await;
                        });
                    }
                    other => {
                        tracing::warn!(%peer, ?other, "the owner refused forwarded captures");
                        self.forwarding.remove(&owner);
                        self.forward_next = Instant::now() + Duration::from_secs(2);
                    }
                }
            }
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if self.bundle_request == Some(request_id) {
                    // Asked again at the next round.
                    tracing::debug!(%peer, %error, "bundle request to the primary failed");
                    self.bundle_request = None;
                    return;
                }
                tracing::warn!(%peer, %error, "forwarding captures failed");
                if let Some(owner) = self.forward_owner(request_id) {
                    self.forwarding.remove(&owner);
                    self.forward_next = Instant::now() + Duration::from_secs(1);
                }
            }
            _ => {}
        }
    }

    /// A standby stores the lots of its primary's bundle.
    fn take_lots(&mut self, response: CaptureResponse) {
        let CaptureResponse::Bundle { bundle: Some(bundle) } = response else { return };
        let Some(writer) = self.options.writer.clone() else { return };
        let version = bundle.version;
        let stored_version = self.bundle_version.clone();
        let lots: Vec<protocol::catalogue::Lot> = bundle.lots.into_values().collect();
        tokio::spawn(async move {
            let who = Who {
                actor: "node:primary".into(),
                role: "standby_replication".into(),
                request_id: "-".into(),
            };
            let n = lots.len();
            let result = writer
                .call(&who, |reply| Command::Apply {
                    action: "lots.replicate".into(),
                    subject: format!("lots:{n}"),
                    op: Box::new(move |txn, _| {
                        let mut table = txn.open_table(crate::store::LOTS)?;
                        for lot in &lots {
                            table.insert(lot.lot.as_str(), serde_json::to_vec(lot)?.as_slice())?;
                        }
                        Ok(Ok(serde_json::Value::Null))
                    }),
                    reply,
                })
                .await;
            match result {
                Ok(_) => stored_version.store(version, Ordering::Relaxed),
                Err(problem) => {
                    tracing::error!(error = %problem.message_en, "cannot store the primary's lots")
                }
            }
        });
    }

    fn forward_owner(&self, request_id: OutboundRequestId) -> Option<MunicipalityCode> {
        self.forwarding.iter().find(|(_, (id, _))| *id == Some(request_id)).map(|(owner, _)| *owner)
    }

    /// Answers a capture-protocol request off the event loop: enrolment from anyone let in
    /// by the gate, bundle and push from enrolled terminals, forward from municipal nodes.
    fn answer_capture(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request_id: InboundRequestId,
        request: CaptureRequest,
        channel: ResponseChannel<CaptureResponse>,
    ) {
        let answers = self.capture_answers.clone();
        let refuse = |code: &str, message: &str| CaptureResponse::Refused {
            code: code.to_owned(),
            message: message.to_owned(),
        };
        let Some(service) = self.options.captures.clone() else {
            let _ = swarm
                .behaviour_mut()
                .capture
                .send_response(channel, refuse("not_served", "this node takes no captures"));
            return;
        };
        let terminal = self.terminals.get(&peer).cloned();
        // A standby of this municipality receives the bundle too (for the lots).
        let standby = (|| {
            let entry = self.entry(&peer)?;
            let own = self.options.municipality?;
            (entry.role == NodeRole::Standby && entry.municipality == Some(own)).then(|| {
                crate::terminals::TerminalRecord {
                    certificate: protocol::terminal::TerminalCertificate {
                        municipality: own,
                        venue: String::new(),
                        peer_id: peer.to_string(),
                        issued_at: String::new(),
                        signature: String::new(),
                    },
                    revoked: false,
                }
            })
        })();
        let municipal_peer =
            self.entry(&peer).filter(|e| e.role == NodeRole::Municipal).and_then(|e| e.municipality);
        let directory = self.directory.clone();
        let then_close = (!swarm.behaviour().gate.is_allowed(&peer)).then_some(peer);
        let respond = move |response| {
            let _ = answers.try_send(CaptureAnswer { channel, response, then_close });
        };
        if let Err(message) = self.take(peer, Protocol::Capture, request_id) {
            respond(refuse(RATE_LIMITED, &message));
            return;
        }
        match request {
            CaptureRequest::Enrol { secret } => {
                tokio::spawn(async move { respond(service.enrol(&peer.to_string(), &secret).await) });
            }
            _ if then_close.is_some() => respond(refuse("not_enrolled", "enrol first")),
            CaptureRequest::Refresh { held_version } => match terminal.or(standby) {
                Some(terminal) => {
                    tokio::task::spawn_blocking(move || {
                        let venue = &terminal.certificate.venue;
                        respond(match service.bundle(venue, directory.as_ref(), held_version) {
                            Ok(bundle) => CaptureResponse::Bundle { bundle: bundle.map(Box::new) },
                            Err(error) => refuse("internal", &format!("{error:#}")),
                        })
                    });
                }
                None => respond(refuse("not_a_terminal", "only enrolled terminals receive the bundle")),
            },
            CaptureRequest::Push { captures } if captures.len() > MAX_CAPTURES_PER_REQUEST => {
                respond(refuse("too_many", "too many captures in one push"))
            }
            CaptureRequest::Push { captures } => match terminal {
                Some(terminal) => {
                    tokio::spawn(async move {
                        let venue = terminal.certificate.venue.clone();
                        respond(service.push(&peer.to_string(), &venue, captures, directory.as_ref()).await)
                    });
                }
                None => respond(refuse("not_a_terminal", "only enrolled terminals push captures")),
            },
            CaptureRequest::Forward { captures } if captures.len() > MAX_CAPTURES_PER_REQUEST => {
                respond(refuse("too_many", "too many captures in one forward"))
            }
            CaptureRequest::Forward { captures } if municipal_peer.is_some() => {
                let from = municipal_peer.unwrap_or(service.municipality);
                tokio::spawn(async move {
                    respond(service.forwarded(&peer.to_string(), from, captures, directory.as_ref()).await)
                });
            }
            CaptureRequest::Forward { .. } => respond(refuse(
                "not_a_municipal_node",
                "only municipal nodes in the directory forward captures",
            )),
        }
    }

    /// Starts building a report when one is due: due statistics or checkpoints are sent
    /// as soon as they are found, an empty report once a minute.
    fn report(&mut self, _swarm: &mut Swarm<Behaviour>) {
        let Some(reporter) = self.options.reporter.clone() else { return };
        let Some(national) = self.national_peer() else { return };
        if !self.connected.contains(&national)
            || !matches!(self.report.phase, ReportPhase::Idle)
            || self.report.next_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        self.report.phase = ReportPhase::Building;
        let events = self.report_events.clone();
        tokio::spawn(async move {
            let built = tokio::task::spawn_blocking(move || {
                reporter.build(time::OffsetDateTime::now_utc(), crate::clock::japan_today())
            })
            .await
            .unwrap_or_else(|error| Err(anyhow::anyhow!("report builder failed: {error}")));
            let _ = events.send(ReportEvent::Built(built)).await;
        });
    }

    fn on_report_event(&mut self, swarm: &mut Swarm<Behaviour>, event: ReportEvent) {
        let retry = Instant::now() + Duration::from_secs(2);
        match event {
            ReportEvent::Built(Ok(report)) => {
                let heartbeat_due = self.report.last_sent.is_none_or(|at| at.elapsed() >= HEARTBEAT_EVERY);
                match self.national_peer().filter(|peer| self.connected.contains(peer)) {
                    Some(peer) if !report.is_empty() || heartbeat_due => {
                        let id = swarm.behaviour_mut().report.send_request(&peer, report.request.clone());
                        self.report.phase = ReportPhase::Sent(id, Box::new(report));
                        self.report.last_sent = Some(Instant::now());
                    }
                    _ => {
                        self.report.phase = ReportPhase::Idle;
                        self.report.next_at = Some(Instant::now() + REPORT_EVERY);
                    }
                }
            }
            ReportEvent::Built(Err(error)) => {
                tracing::error!(error = format!("{error:#}"), "cannot build the statistics report");
                self.report.phase = ReportPhase::Idle;
                self.report.next_at = Some(retry);
            }
            ReportEvent::Acknowledged(result) => {
                if let Err(error) = result {
                    tracing::warn!(error = format!("{error:#}"), "cannot record the report as sent");
                }
                self.report.phase = ReportPhase::Idle;
                // More may be due already (a backlog, or doses recorded meanwhile).
                self.report.next_at = None;
                self.report(swarm);
            }
        }
    }

    fn on_report(&mut self, event: request_response::Event<ReportRequest, ReportResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request_id, request, channel },
                ..
            } => {
                let answers = self.report_answers.clone();
                if let Err(message) = self.take(peer, Protocol::Report, request_id) {
                    let refusal = ReportResponse::Refused { code: RATE_LIMITED.into(), message };
                    let _ = answers.try_send((channel, refusal));
                    return;
                }
                let (Some(store), Some(entry)) =
                    (self.options.national_store.clone(), self.entry(&peer).cloned())
                else {
                    let refusal = ReportResponse::Refused {
                        code: "not_national".into(),
                        message: "reports go to the national node, from nodes in its directory".into(),
                    };
                    let _ = answers.try_send((channel, refusal));
                    return;
                };
                tokio::spawn(async move {
                    let response = tokio::task::spawn_blocking(move || {
                        store.log_message(&peer.to_string(), "report", &request);
                        store.ingest(&entry, &request)
                    })
                    .await
                    .unwrap_or_else(|error| ReportResponse::Refused {
                        code: "internal".into(),
                        message: format!("the national node failed: {error}"),
                    });
                    let _ = answers.send((channel, response)).await;
                });
            }
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                let phase = std::mem::take(&mut self.report.phase);
                let ReportPhase::Sent(sent, report) = phase else {
                    self.report.phase = phase;
                    return;
                };
                if sent != request_id {
                    self.report.phase = ReportPhase::Sent(sent, report);
                    return;
                }
                match response {
                    ReportResponse::Stored { statistics, checkpoints, held_version } => {
                        tracing::debug!(statistics, checkpoints, "report stored by the national node");
                        let Some(reporter) = self.options.reporter.clone() else { return };
                        self.report.phase = ReportPhase::Acknowledging;
                        let events = self.report_events.clone();
                        tokio::spawn(async move {
                            let result = reporter.acknowledged(*report, statistics, held_version).await;
                            let _ = events.send(ReportEvent::Acknowledged(result)).await;
                        });
                    }
                    ReportResponse::Refused { code, message } => {
                        tracing::warn!(%code, %message, "the national node refused the report");
                        self.report.next_at = Some(Instant::now() + Duration::from_secs(5));
                    }
                }
            }
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if matches!(&self.report.phase, ReportPhase::Sent(sent, _) if *sent == request_id) {
                    tracing::debug!(%error, "report not delivered; sent again later");
                    self.report.phase = ReportPhase::Idle;
                    self.report.next_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            _ => {}
        }
    }

    /// Sends the national ledger what this primary has for it and asks what waits for it:
    /// at once when something is due, otherwise every [`HANDOFF_POLL`].
    fn sync_handoffs(&mut self, swarm: &mut Swarm<Behaviour>) {
        let Some(service) = self.options.handoffs.clone() else { return };
        let due = service.due.load(std::sync::atomic::Ordering::Acquire);
        if self.handoff_sent.is_some() || (!due && Instant::now() < self.handoff_next) {
            return;
        }
        let Some(national) = self.national_peer().filter(|peer| self.connected.contains(peer)) else {
            return;
        };
        service.due.store(false, std::sync::atomic::Ordering::Release);
        let sync = match service.build_sync() {
            Ok(sync) => sync,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "cannot read the handoffs to send");
                self.handoff_next = Instant::now() + Duration::from_secs(2);
                return;
            }
        };
        let id = swarm.behaviour_mut().handoff.send_request(&national, sync.clone());
        self.handoff_sent = Some((Some(id), Box::new(sync)));
    }

    fn on_handoff(&mut self, event: request_response::Event<HandoffSync, HandoffResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request_id, request, channel },
                ..
            } => {
                let answers = self.handoff_answers.clone();
                if let Err(message) = self.take(peer, Protocol::Handoff, request_id) {
                    let refusal = HandoffResponse::Refused { code: RATE_LIMITED.into(), message };
                    let _ = answers.try_send((channel, refusal));
                    return;
                }
                let sender =
                    self.entry(&peer).filter(|e| e.role == NodeRole::Municipal).and_then(|e| e.municipality);
                let (Some(store), Some(sender), Some(directory)) =
                    (self.options.national_store.clone(), sender, self.shared_directory.clone())
                else {
                    let refusal = HandoffResponse::Refused {
                        code: "not_a_municipal_node".into(),
                        message:
                            "handoffs go to the national node, from municipal primaries in its directory"
                                .into(),
                    };
                    let _ = answers.try_send((channel, refusal));
                    return;
                };
                tokio::spawn(async move {
                    let response = tokio::task::spawn_blocking(move || {
                        if !request.deposits.is_empty()
                            || !request.accepted.is_empty()
                            || !request.answered.is_empty()
                        {
                            store.log_message(&peer.to_string(), "handoff", &request);
                        }
                        crate::ledger::sync(
                            store.db(),
                            &directory.directory,
                            sender,
                            &request,
                            time::OffsetDateTime::now_utc(),
                        )
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("the ledger task failed: {e}"))
                    .and_then(|r| r)
                    .unwrap_or_else(|error| {
                        tracing::error!(error = format!("{error:#}"), "cannot handle a handoff sync");
                        HandoffResponse::Refused {
                            code: "internal".into(),
                            message: "the national node failed".into(),
                        }
                    });
                    let _ = answers.send((channel, response)).await;
                });
            }
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                let Some((Some(sent_id), sent)) = self.handoff_sent.take() else { return };
                if sent_id != request_id {
                    self.handoff_sent = Some((Some(sent_id), sent));
                    return;
                }
                if let HandoffResponse::Refused { code, message } = &response
                    && code == RATE_LIMITED
                {
                    tracing::warn!(%message, "the national node refused a handoff sync for now; sent again in a second");
                    self.handoff_not_delivered(&sent);
                    return;
                }
                self.handoff_sent = Some((None, sent.clone()));
                let Some(service) = self.options.handoffs.clone() else { return };
                let done = self.handoff_done.clone();
                tokio::spawn(async move {
                    let busy = match service.apply_response(&sent, response).await {
                        Ok(busy) => busy,
                        Err(error) => {
                            tracing::warn!(error = format!("{error:#}"), "handoff sync not applied; retried");
                            false
                        }
                    };
                    let _ = done.send(busy).await;
                });
            }
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some((Some(sent_id), sent)) = self.handoff_sent.take() {
                    if sent_id == request_id {
                        tracing::debug!(%error, "handoff sync not delivered; sent again later");
                        self.handoff_not_delivered(&sent);
                    } else {
                        self.handoff_sent = Some((Some(sent_id), sent));
                    }
                }
            }
            _ => {}
        }
    }

    /// A handoff sync that did not reach the ledger (or was refused for now): sent again
    /// from the stored state after a pause that `due` does not cut, with the answers to
    /// requests it carried (they are held only in memory).
    fn handoff_not_delivered(&mut self, sent: &HandoffSync) {
        self.handoff_sent = None;
        self.handoff_next = Instant::now() + Duration::from_secs(1);
        if let Some(service) = &self.options.handoffs {
            service.due.store(false, std::sync::atomic::Ordering::Release);
            service.hold_answers(sent.answered.clone());
        }
    }

    /// Sends the forward outbox to the owners' nodes, one request per owner at a time.
    fn forward(&mut self, swarm: &mut Swarm<Behaviour>) {
        let Some(service) = self.options.captures.clone() else { return };
        if Instant::now() < self.forward_next {
            return;
        }
        self.forward_next = Instant::now() + Duration::from_millis(200);
        let outbox = match service.outbox(MAX_CAPTURES_PER_REQUEST) {
            Ok(outbox) => outbox,
            Err(error) => {
                tracing::error!(%error, "cannot read the forward outbox");
                return;
            }
        };
        for (owner, captures) in outbox {
            if self.forwarding.contains_key(&owner) {
                continue;
            }
            let Some(entry) = self.directory.as_ref().and_then(|d| d.directory.primary_of(owner)).cloned()
            else {
                continue;
            };
            let Ok(peer) = entry.peer_id.parse::<PeerId>() else { continue };
            if !self.connected.contains(&peer) {
                let addresses = entry.addresses.iter().filter_map(|a| a.parse().ok()).collect();
                self.dial(swarm, peer, addresses);
                continue;
            }
            let sent: HashMap<String, String> =
                captures.iter().map(|(key, f)| (f.capture.event_id.clone(), key.clone())).collect();
            let captures = captures.into_iter().map(|(_, f)| f).collect();
            let id = swarm.behaviour_mut().capture.send_request(&peer, CaptureRequest::Forward { captures });
            self.forwarding.insert(owner, (Some(id), sent));
        }
    }

    fn on_replication(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<ReplicationRequest, ReplicationResponse>,
    ) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request_id, request, channel },
                ..
            } => match self.take(peer, Protocol::Replication, request_id) {
                Ok(()) => self.answer(peer, request, channel),
                Err(message) => {
                    let refused = ReplicationResponse::Refused { code: RATE_LIMITED.into(), message };
                    let _ = self.answers.try_send((channel, refused));
                }
            },
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { request_id, response },
                ..
            } => self.on_pulled(swarm, peer, request_id, response),
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::warn!(%peer, %error, "replication request failed");
                if let Some(pull) = self.pull.as_mut()
                    && pull.in_flight == Some(request_id)
                {
                    pull.in_flight = None;
                    pull.next_at = Instant::now() + Duration::from_secs(1);
                }
            }
            _ => {}
        }
    }

    /// Answers a peer's replication request off the event loop.
    fn answer(
        &self,
        peer: PeerId,
        request: ReplicationRequest,
        channel: ResponseChannel<ReplicationResponse>,
    ) {
        let allowed = match (self.entry(&peer), self.options.municipality) {
            (Some(entry), Some(own)) => may_replicate_residents(own, entry),
            _ => false,
        };
        let answers = self.answers.clone();
        let Some(store) = self.options.store.clone().filter(|_| allowed) else {
            tracing::warn!(%peer, "replication refused: not allowed by the directory");
            let refused = ReplicationResponse::Refused {
                code: "not_allowed".into(),
                message: "the directory does not let this peer read these documents".into(),
            };
            let _ = answers.try_send((channel, refused));
            return;
        };
        tokio::task::spawn_blocking(move || {
            let response = answer_from_store(&store, &request).unwrap_or_else(|error| {
                tracing::error!(%error, "cannot answer a replication request");
                ReplicationResponse::Refused {
                    code: "internal".into(),
                    message: "the node could not answer".into(),
                }
            });
            let _ = answers.blocking_send((channel, response));
        });
    }

    fn on_pulled(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: ReplicationResponse,
    ) {
        let store = self.options.store.clone();
        let Some(pull) = self.pull.as_mut().filter(|p| p.peer == peer && p.in_flight == Some(request_id))
        else {
            return;
        };
        pull.in_flight = None;
        PULLED_BYTES_RECEIVED.fetch_add(response_payload(&response), Ordering::Relaxed);
        if let (ReplicationResponse::Changes { entries, .. }, Some(store)) = (&response, &store) {
            // The page's documents as this node holds them now.
            match store.read().and_then(|view| {
                let mut docs = HashMap::new();
                for entry in entries {
                    if let Some(doc) = view.load_doc(&entry.doc_id)? {
                        docs.insert(entry.doc_id.clone(), doc);
                    }
                }
                Ok(docs)
            }) {
                Ok(docs) => pull.docs.docs = docs,
                Err(error) => {
                    tracing::error!(%error, "cannot read local documents");
                    pull.next_at = Instant::now() + Duration::from_secs(1);
                    return;
                }
            }
        }
        match pull.puller.on_response(response, &mut pull.docs) {
            Ok(PullStep::Send(request)) => {
                PULLED_BYTES_SENT.fetch_add(request_payload(&request), Ordering::Relaxed);
                PULL_REQUESTS.fetch_add(1, Ordering::Relaxed);
                pull.in_flight = Some(swarm.behaviour_mut().replication.send_request(&peer, request));
            }
            Ok(PullStep::PageComplete { checkpoint, docs, more }) => {
                let mut held = std::mem::take(&mut pull.docs.docs);
                let mut whole = std::mem::take(&mut pull.docs.whole);
                let docs: Vec<_> = docs
                    .into_iter()
                    .filter_map(|id| {
                        let bytes = whole.remove(&id);
                        let doc = held.remove(&id);
                        (doc.is_some() || bytes.is_some()).then_some((id, doc, bytes))
                    })
                    .collect();
                if !more {
                    pull.next_at = Instant::now() + Duration::from_millis(300);
                }
                let Some(pages) = self.pages.clone() else { return };
                pull.storing += 1;
                let page = StorePage { generation: pull.generation, peer, checkpoint, docs };
                if pages.try_send(page).is_err() {
                    // The puller's checkpoint has moved past this page: start again from
                    // the stored one rather than lose it.
                    tracing::error!("the store queue is full; pulling again from the stored checkpoint");
                    pull.storing -= 1;
                    self.restart_pull(Duration::from_secs(1));
                } else if more {
                    // Ask for the next page now rather than at the next tick.
                    self.maintain(swarm);
                }
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "replication page abandoned");
                self.restart_pull(Duration::from_secs(2));
            }
        }
    }

    fn on_stored(&mut self, swarm: &mut Swarm<Behaviour>, generation: u64, result: anyhow::Result<()>) {
        let Some(pull) = self.pull.as_mut() else { return };
        pull.storing = pull.storing.saturating_sub(1);
        if let Err(error) = result
            && generation == pull.generation
        {
            tracing::error!(%error, "cannot store a replicated page; starting again from the stored checkpoint");
            self.restart_pull(Duration::from_secs(1));
        }
        self.maintain(swarm);
    }

    /// Drops the page in progress and starts again from the stored checkpoint (a new
    /// generation; pages of the old one still queued are stored unless one of them fails).
    fn restart_pull(&mut self, pause: Duration) {
        let Some(peer) = self.pull.as_ref().map(|p| p.peer) else { return };
        let checkpoint = self.stored_checkpoint(&peer);
        if let Some(pull) = self.pull.as_mut() {
            pull.generation += 1;
            pull.puller = Puller::new(checkpoint, PAGE_SIZE);
            pull.in_flight = None;
            pull.docs = PulledDocs::default();
            pull.next_at = Instant::now() + pause;
        }
    }
}

/// The `meta` key of the checkpoint of pulls from `peer`.
pub fn checkpoint_key(peer: &PeerId) -> String {
    format!("replication:{peer}")
}

/// The peer id at the end of a multiaddr (`…/p2p/<peer id>`).
pub(crate) fn peer_of(address: &Multiaddr) -> Option<PeerId> {
    address.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// Answers from the store: the change feed, or sync messages from the stored documents.
pub fn answer_from_store(store: &Store, request: &ReplicationRequest) -> anyhow::Result<ReplicationResponse> {
    let view = store.read()?;
    Ok(match request {
        ReplicationRequest::Changes { since, limit } => {
            let limit = (*limit).clamp(1, protocol::replication::MAX_FEED_PAGE);
            let feed = view.changes_since(*since, limit as usize + 1)?;
            answer_changes(*since, limit, &feed, |_| true)
        }
        ReplicationRequest::Sync { docs } => {
            let mut source = StoreDocs { view: &view, failure: None };
            let answers = answer_sync(docs, &mut source);
            if let Some(error) = source.failure {
                return Err(error);
            }
            match answers {
                Ok(docs) => ReplicationResponse::Sync { docs },
                Err(error) => {
                    ReplicationResponse::Refused { code: "bad_request".into(), message: error.to_string() }
                }
            }
        }
    })
}

/// The answering side's view of the store.
struct StoreDocs<'a> {
    view: &'a crate::store::ReadView,
    failure: Option<anyhow::Error>,
}

impl protocol::replication::SourceDocs for &mut StoreDocs<'_> {
    fn doc(&mut self, doc_id: &str) -> Option<automerge::Automerge> {
        self.view.load_doc(doc_id).unwrap_or_else(|error| {
            self.failure = Some(error);
            None
        })
    }

    fn stored_bytes(&mut self, doc_id: &str) -> Option<Vec<u8>> {
        self.view.stored_bytes(doc_id).unwrap_or_else(|error| {
            self.failure = Some(error);
            None
        })
    }
}

/// A directory with only the national node in it (version 1).
pub fn first_directory(national: DirectoryEntry, issued_at: String) -> Directory {
    Directory { version: 1, issued_at, entries: vec![national] }
}
