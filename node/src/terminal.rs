//! The venue terminal: enrolment with the municipal node, offline capture with a durable
//! capture log, and the sync loop that fetches the bundle and pushes the log.
//!
//! A capture is checked with [`protocol::terminal::check_offline`] against the newest bundle
//! and stored (one durable commit, through the writer) before the operator is told it is
//! recorded. The sync loop pushes pending captures whenever the node is reachable; the
//! owner's final answer (recorded, or refused with its reason) replaces the pending state.
//! A terminal holds no resident documents; once the owner has answered a capture of
//! another municipality's coupon, the terminal forgets the scanned texts too.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use libp2p::futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use protocol::municipality::MunicipalityCode;
use protocol::terminal::{
    CaptureRequest, CaptureResponse, CaptureState, MAX_CAPTURES_PER_REQUEST, TerminalBundle, TerminalCapture,
    TerminalCertificate, check_offline,
};
use protocol::validation::decode_scans;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::{Date, OffsetDateTime};

use crate::clock::{japan_today, new_id};
use crate::problem::Problem;
use crate::store::{
    Store, TERMINAL_LOG, TERMINAL_PENDING, TERMINAL_STATE, TERMINAL_USED, get_json, put_json,
};
use crate::terminals::EnrolmentToken;
use crate::writer::{Command, Who, WriterHandle};

/// `[terminal]` in a terminal's `node.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TerminalConfig {
    /// The venue it is bound to.
    pub venue: String,
    /// Its municipal node: multiaddr ending in `/p2p/<peer id>`.
    pub node: String,
}

/// One capture in the terminal's log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoggedCapture {
    /// The capture; the scanned texts are blanked once another municipality has answered.
    pub capture: TerminalCapture,
    /// Pending, forwarded, recorded or refused.
    pub state: CaptureState,
    /// Position in the pending queue.
    pub seq: u64,
    /// The 18-digit coupon code (municipality, number), blanked with the texts.
    pub coupon_code: String,
}

/// What the operator's scanner sent.
pub struct Scan {
    /// The coupon text.
    pub coupon: String,
    /// The vial text.
    pub vial: String,
    /// Date of vaccination (today if absent).
    pub vaccinated_on: Option<Date>,
    /// The venue named in the request.
    pub venue: String,
    /// A client event id (retries reuse it).
    pub event_id: Option<String>,
    /// Who scanned.
    pub recorded_by: String,
}

/// What the terminal's API and sync loop share.
pub struct TerminalRuntime {
    /// The terminal's store.
    pub store: Arc<Store>,
    /// Its municipality.
    pub municipality: MunicipalityCode,
    /// Its venue.
    pub venue: String,
    /// The newest bundle.
    pub bundle: RwLock<Option<TerminalBundle>>,
    /// Connection and sync figures for `/api/v1/status`.
    pub sync: Mutex<SyncStatus>,
    /// Wakes the sync loop when a capture is stored.
    pub captured: tokio::sync::Notify,
}

/// The terminal's view of its link to the node.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    /// Connected to the node now.
    pub connected: bool,
    /// Last successful push (RFC 3339).
    pub last_push: Option<String>,
    /// Last bundle check (RFC 3339).
    pub last_bundle_check: Option<String>,
}

impl TerminalRuntime {
    /// Loads the runtime from a terminal's store.
    pub fn open(store: Arc<Store>, municipality: MunicipalityCode, venue: &str) -> anyhow::Result<Arc<Self>> {
        let bundle = store.read()?.json::<TerminalBundle>(TERMINAL_STATE, "bundle")?;
        Ok(Arc::new(Self {
            store,
            municipality,
            venue: venue.to_owned(),
            bundle: RwLock::new(bundle),
            sync: Mutex::new(SyncStatus::default()),
            captured: tokio::sync::Notify::new(),
        }))
    }

    /// `GET /api/v1/status` on a terminal.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let view = self.store.read()?;
        let bundle = self.bundle.read().map_err(|_| anyhow::anyhow!("bundle lock poisoned"))?;
        let sync = self.sync.lock().map_err(|_| anyhow::anyhow!("status lock poisoned"))?.clone();
        Ok(json!({
            "role": "terminal",
            "municipality": self.municipality,
            "venue": self.venue,
            "captures": view.count(TERMINAL_LOG)?,
            "pending": view.terminal_pending_count()?,
            "bundle_version": bundle.as_ref().map(|b| b.version),
            "directory_version": bundle.as_ref().and_then(|b| b.directory.as_ref()).map(|d| d.directory.version),
            "lots": bundle.as_ref().map_or(0, |b| b.lots.len()),
            "blocked_coupons": bundle.as_ref().map_or(0, |b| b.blocked.len()),
            "sync": sync,
        }))
    }

    /// The capture log, newest first, at most `limit`.
    pub fn log(&self, limit: usize) -> anyhow::Result<Vec<LoggedCapture>> {
        let mut all: Vec<LoggedCapture> =
            self.store.read()?.all::<LoggedCapture>(TERMINAL_LOG)?.into_iter().map(|(_, c)| c).collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.seq));
        all.truncate(limit);
        Ok(all)
    }

    /// Checks a capture offline and stores it durably; answers once it is stored.
    pub async fn capture(
        &self,
        writer: &WriterHandle,
        who: &Who,
        scan: Scan,
    ) -> Result<(StatusCode, serde_json::Value), Problem> {
        let Scan { coupon, vial, vaccinated_on, venue, event_id, recorded_by } = scan;
        if venue != self.venue {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "venue_not_allowed",
                Some("venue"),
                format!("this terminal records for venue {} only", self.venue),
                format!("この端末で記録できる会場は {} だけです", self.venue),
            ));
        }
        let scans = decode_scans(&coupon, &vial)?;
        let today = japan_today();
        let vaccinated_on = vaccinated_on.unwrap_or(today);
        {
            let bundle =
                self.bundle.read().map_err(|_| Problem::internal(&anyhow::anyhow!("bundle lock")))?;
            let Some(bundle) = bundle.as_ref() else {
                return Err(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "terminal_not_ready",
                    None,
                    "this terminal has not received its bundle yet; connect it to the municipal node once",
                    "この端末はまだ検証用データを受け取っていません。一度ノードに接続してください",
                ));
            };
            check_offline(&scans, vaccinated_on, today, bundle)?;
        }
        let code = scans.coupon.code().to_string();
        let capture = TerminalCapture {
            event_id: event_id.unwrap_or_else(|| new_id("ev")),
            coupon,
            vial,
            vaccinated_on,
            captured_at: OffsetDateTime::now_utc(),
            venue,
            venue_municipality: self.municipality,
            recorded_by,
        };
        let subject = format!("event:{}", capture.event_id);
        let value = writer
            .call(who, |reply| Command::Apply {
                action: "capture.terminal".into(),
                subject,
                op: Box::new(move |txn, _now| store_capture(txn, capture, &code)),
                reply,
            })
            .await?;
        let status =
            if value["replay"].as_bool() == Some(true) { StatusCode::OK } else { StatusCode::CREATED };
        self.captured.notify_one();
        Ok((status, value))
    }
}

/// Stores a checked capture: a replay of the same scan returns the stored one; another
/// capture of a coupon already captured here (and not refused by its owner) is refused.
fn store_capture(
    txn: &redb::WriteTransaction,
    capture: TerminalCapture,
    code: &str,
) -> anyhow::Result<Result<serde_json::Value, Problem>> {
    let answer = |logged: &LoggedCapture, replay: bool| {
        json!({
            "replay": replay,
            "event_id": logged.capture.event_id,
            "state": logged.state,
            "message_ja": "端末に記録しました（ノードへ未送信のものは接続時に送ります）",
            "message_en": "recorded on this terminal; sent to the node when connected",
        })
    };
    if let Some(logged) = get_json::<LoggedCapture>(&txn.open_table(TERMINAL_LOG)?, &capture.event_id)? {
        let same = logged.coupon_code == code
            && logged.capture.vaccinated_on == capture.vaccinated_on
            && (logged.capture.vial == capture.vial || logged.capture.vial.is_empty());
        if same {
            return Ok(Ok(answer(&logged, true)));
        }
        return Ok(Err(
            protocol::validation::CaptureError::EventIdReused { event_id: capture.event_id }.into()
        ));
    }
    let used: Option<String> = txn.open_table(TERMINAL_USED)?.get(code)?.map(|v| v.value().to_owned());
    if let Some(previous) = used
        && let Some(logged) = get_json::<LoggedCapture>(&txn.open_table(TERMINAL_LOG)?, &previous)?
    {
        let same =
            logged.capture.vial == capture.vial && logged.capture.vaccinated_on == capture.vaccinated_on;
        if same {
            return Ok(Ok(answer(&logged, true)));
        }
        return Ok(Err(protocol::validation::CaptureError::CouponAlreadyUsed {
            event_id: logged.capture.event_id.clone(),
            dose_number: 0,
            vaccinated_on: logged.capture.vaccinated_on,
        }
        .into()));
    }
    let seq = crate::store::bump(txn, "terminal_seq")?;
    let logged = LoggedCapture { capture, state: CaptureState::Pending, seq, coupon_code: code.to_owned() };
    put_json(txn, TERMINAL_LOG, &logged.capture.event_id, &logged)?;
    txn.open_table(TERMINAL_PENDING)?.insert(seq, logged.capture.event_id.as_str())?;
    txn.open_table(TERMINAL_USED)?.insert(code, logged.capture.event_id.as_str())?;
    Ok(Ok(answer(&logged, false)))
}

/// Applies the node's answers to the log: final ones leave the pending queue; a refused
/// capture frees its coupon for another scan; another municipality's scanned texts go.
fn store_states(
    txn: &redb::WriteTransaction,
    states: &[(String, CaptureState)],
    own: MunicipalityCode,
) -> anyhow::Result<()> {
    for (event_id, state) in states {
        let Some(mut logged) = get_json::<LoggedCapture>(&txn.open_table(TERMINAL_LOG)?, event_id)? else {
            continue;
        };
        if logged.state == *state {
            continue;
        }
        logged.state = state.clone();
        if state.is_final() {
            txn.open_table(TERMINAL_PENDING)?.remove(logged.seq)?;
            let mut used = txn.open_table(TERMINAL_USED)?;
            let refused = matches!(state, CaptureState::Refused { .. });
            let owner = match state {
                CaptureState::Recorded { owner, .. } | CaptureState::Refused { owner, .. } => *owner,
                _ => own,
            };
            let away = owner != own;
            if (refused || away)
                && used.get(logged.coupon_code.as_str())?.is_some_and(|v| v.value() == event_id)
            {
                used.remove(logged.coupon_code.as_str())?;
            }
            drop(used);
            if away {
                logged.capture.coupon = String::new();
                logged.capture.vial = String::new();
                logged.coupon_code = String::new();
            }
        }
        put_json(txn, TERMINAL_LOG, event_id, &logged)?;
    }
    Ok(())
}

/// Enrols a new terminal: connects to the node named in the token with a fresh identity,
/// presents the secret, and returns the identity, the certificate and the first bundle.
/// Nothing is written here; the caller writes the data directory only after success.
pub async fn enrol(
    token: &EnrolmentToken,
    municipality: MunicipalityCode,
) -> anyhow::Result<(Keypair, TerminalCertificate, TerminalBundle)> {
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let node: Multiaddr = token.node.parse().with_context(|| format!("{} is not a multiaddr", token.node))?;
    let node_peer = crate::p2p::peer_of(&node).context("the node address has no /p2p/ part")?;
    let mut swarm = crate::p2p::build_swarm(keypair.clone())?;
    swarm.behaviour_mut().gate.set_allowed(HashSet::from([node_peer]));
    swarm.dial(node.clone()).with_context(|| format!("cannot dial {node}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut certificate: Option<TerminalCertificate> = None;
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some()).await.map_err(|_| {
            anyhow::anyhow!(
                "no answer from the node at {node} within 30 s; ノード {node} から30秒以内に応答がありません"
            )
        })?;
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node_peer => {
                swarm
                    .behaviour_mut()
                    .capture
                    .send_request(&node_peer, CaptureRequest::Enrol { secret: token.secret.clone() });
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                anyhow::bail!("cannot connect to the node at {node}: {error}; ノードに接続できません");
            }
            SwarmEvent::Behaviour(crate::p2p::BehaviourEvent::Capture(
                request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                },
            )) => match response {
                CaptureResponse::Enrolled { certificate: issued } => {
                    anyhow::ensure!(
                        issued.peer_id == me.to_string() && issued.municipality == municipality,
                        "the node answered with a certificate for another terminal or municipality"
                    );
                    certificate = Some(issued);
                    swarm
                        .behaviour_mut()
                        .capture
                        .send_request(&node_peer, CaptureRequest::Refresh { held_version: 0 });
                }
                CaptureResponse::Bundle { bundle: Some(bundle) } => {
                    let certificate = certificate.context("a bundle came before the certificate")?;
                    anyhow::ensure!(
                        certificate.verify(
                            &protocol::person::hex_decode(&bundle.own_coupon_key).unwrap_or_default()
                        ),
                        "the certificate does not verify with the municipality's key"
                    );
                    return Ok((keypair, certificate, *bundle));
                }
                CaptureResponse::Refused { code, message } => {
                    anyhow::bail!("the node refused the enrolment ({code}): {message}; 登録が拒否されました")
                }
                other => anyhow::bail!("unexpected answer from the node: {other:?}"),
            },
            SwarmEvent::Behaviour(crate::p2p::BehaviourEvent::Capture(
                request_response::Event::OutboundFailure { error, .. },
            )) => anyhow::bail!(
                "the node closed the connection ({error}): no enrolment is open there — the token was used, \
                 has expired or was never issued; ノードが接続を閉じました（登録トークンが使用済み・期限切れ・無効です）"
            ),
            _ => {}
        }
    }
}

/// `init --role terminal --enroll TOKEN`: enrols first (nothing is written unless the node
/// accepts), then makes the data directory. Returns the local admin token, the terminal's
/// configuration and its peer id.
pub fn init_enrolled(
    dir: &Path,
    mut options: crate::config::InitOptions,
    token: &str,
) -> anyhow::Result<(String, TerminalConfig, PeerId)> {
    let token = EnrolmentToken::parse(token)?;
    let runtime = tokio::runtime::Runtime::new()?;
    // A token issued a moment ago may not be open at the node yet: a refused connection is
    // tried again twice, a second apart.
    let mut attempt = 0;
    let (keypair, certificate, bundle) = loop {
        attempt += 1;
        match runtime.block_on(enrol(&token, options.municipality)) {
            Ok(enrolled) => break enrolled,
            Err(error) if attempt < 3 && error.to_string().contains("closed the connection") => {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(error) => return Err(error),
        }
    };
    let config = TerminalConfig { venue: certificate.venue.clone(), node: token.node.clone() };
    let peer = keypair.public().to_peer_id();
    options.terminal = Some((config.clone(), keypair));
    let admin = crate::config::init_data_dir(dir, &options)?;
    let store = Store::open(&crate::config::NodeFiles::load(dir)?.store_path())?;
    store_enrolment(&store, &certificate, &bundle)?;
    Ok((admin, config, peer))
}

/// Writes what enrolment brought into a new terminal's store.
pub fn store_enrolment(
    store: &Store,
    certificate: &TerminalCertificate,
    bundle: &TerminalBundle,
) -> anyhow::Result<()> {
    let txn = store.begin_write()?;
    put_json(&txn, TERMINAL_STATE, "certificate", certificate)?;
    put_json(&txn, TERMINAL_STATE, "bundle", bundle)?;
    txn.commit()?;
    Ok(())
}

/// Keeps the terminal in sync with its node until the process ends: dials with backoff,
/// refreshes the bundle every few seconds, pushes pending captures.
pub async fn run_sync(
    runtime: Arc<TerminalRuntime>,
    writer: WriterHandle,
    keypair: Keypair,
    node: Multiaddr,
) -> anyhow::Result<()> {
    let node_peer = crate::p2p::peer_of(&node).context("[terminal] node has no /p2p/ part")?;
    let dial_address: Multiaddr =
        node.iter().filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_))).collect();
    let mut swarm = crate::p2p::build_swarm(keypair)?;
    swarm.behaviour_mut().gate.set_allowed(HashSet::from([node_peer]));
    let who =
        Who { actor: format!("node:{node_peer}"), role: "terminal_sync".into(), request_id: "-".into() };
    let mut connected = false;
    let mut next_dial = Instant::now();
    let mut backoff = Duration::from_millis(250);
    let mut refresh: Option<OutboundRequestId> = None;
    let mut refreshed_at: Option<Instant> = None;
    let mut push: Option<OutboundRequestId> = None;
    let mut next_push = Instant::now();
    let mut asked_forwarded: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node_peer => {
                    tracing::info!(node = %node_peer, "connected to the municipal node");
                    connected = true;
                    backoff = Duration::from_millis(250);
                    runtime.sync.lock().map(|mut s| s.connected = true).ok();
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if peer_id == node_peer => {
                    tracing::info!(node = %node_peer, "disconnected from the municipal node");
                    connected = false;
                    refresh = None;
                    push = None;
                    runtime.sync.lock().map(|mut s| s.connected = false).ok();
                }
                SwarmEvent::Behaviour(crate::p2p::BehaviourEvent::Capture(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    if refresh == Some(request_id) {
                        refresh = None;
                        refreshed_at = Some(Instant::now());
                        if let Err(error) = take_bundle(&runtime, &writer, &who, response).await {
                            tracing::error!(error = format!("{error:#}"), "bundle refused");
                        }
                    } else if push == Some(request_id) {
                        push = None;
                        match response {
                            CaptureResponse::States { states } => {
                                let all_waiting = states.iter().all(|(_, s)| !s.is_final());
                                let own = runtime.municipality;
                                let result = writer
                                    .call(&who, |reply| Command::Apply {
                                        action: "capture.terminal.answered".into(),
                                        subject: format!("captures:{}", states.len()),
                                        op: Box::new(move |txn, _| {
                                            store_states(txn, &states, own)?;
                                            Ok(Ok(serde_json::Value::Null))
                                        }),
                                        reply,
                                    })
                                    .await;
                                if let Err(problem) = result {
                                    tracing::error!(error = %problem.message_en, "cannot store the node's answers");
                                }
                                runtime.sync.lock().map(|mut s| s.last_push = Some(crate::clock::rfc3339(OffsetDateTime::now_utc()))).ok();
                                // Only captures waiting for another municipality: ask again later.
                                next_push = Instant::now()
                                    + if all_waiting { Duration::from_millis(500) } else { Duration::ZERO };
                            }
                            other => {
                                tracing::warn!(?other, "the node refused the push");
                                next_push = Instant::now() + Duration::from_secs(2);
                            }
                        }
                    }
                }
                SwarmEvent::Behaviour(crate::p2p::BehaviourEvent::Capture(
                    request_response::Event::OutboundFailure { request_id, error, .. },
                )) => {
                    tracing::warn!(%error, "request to the node failed");
                    if refresh == Some(request_id) {
                        refresh = None;
                    }
                    if push == Some(request_id) {
                        push = None;
                        next_push = Instant::now() + Duration::from_secs(1);
                    }
                }
                _ => {}
            },
            _ = runtime.captured.notified() => {
                // A new capture: push it now rather than at the next tick.
                if connected && push.is_none() {
                    match pending_batch(&runtime.store, false) {
                        Ok(captures) if !captures.is_empty() => {
                            let request = CaptureRequest::Push { captures };
                            push = Some(swarm.behaviour_mut().capture.send_request(&node_peer, request));
                        }
                        _ => {}
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if !connected {
                    if now >= next_dial {
                        next_dial = now + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        let options = libp2p::swarm::dial_opts::DialOpts::peer_id(node_peer)
                            .addresses(vec![dial_address.clone()])
                            .build();
                        if let Err(error) = swarm.dial(options) {
                            tracing::debug!(%error, "dial failed");
                        }
                    }
                    continue;
                }
                if refresh.is_none() && refreshed_at.is_none_or(|at| at.elapsed() > Duration::from_secs(2)) {
                    let held = runtime.bundle.read().ok().and_then(|b| b.as_ref().map(|b| b.version)).unwrap_or(0);
                    refresh = Some(swarm.behaviour_mut().capture.send_request(&node_peer, CaptureRequest::Refresh { held_version: held }));
                }
                if push.is_none() && now >= next_push {
                    let with_forwarded = asked_forwarded.is_none_or(|at| at.elapsed() > Duration::from_secs(2));
                    if with_forwarded {
                        asked_forwarded = Some(now);
                    }
                    match pending_batch(&runtime.store, with_forwarded) {
                        Ok(captures) if !captures.is_empty() => {
                            push = Some(swarm.behaviour_mut().capture.send_request(&node_peer, CaptureRequest::Push { captures }));
                        }
                        Ok(_) => next_push = now + Duration::from_millis(200),
                        Err(error) => {
                            tracing::error!(%error, "cannot read the capture log");
                            next_push = now + Duration::from_secs(1);
                        }
                    }
                }
            }
        }
    }
}

/// The next captures to push, oldest first: those not yet answered; those held by the node
/// for another municipality only when `with_forwarded` (they are asked about less often, so
/// they never hold back the venue's own captures).
fn pending_batch(store: &Store, with_forwarded: bool) -> anyhow::Result<Vec<TerminalCapture>> {
    let view = store.read()?;
    let mut captures = Vec::new();
    let mut after = 0;
    // Page through the queue only as far as a batch needs.
    while captures.len() < MAX_CAPTURES_PER_REQUEST {
        let page = view.terminal_pending_after(after, 2 * MAX_CAPTURES_PER_REQUEST)?;
        let Some(&(last, _)) = page.last() else { break };
        after = last;
        for (_, event_id) in page {
            if captures.len() >= MAX_CAPTURES_PER_REQUEST {
                break;
            }
            if let Some(logged) = view.json::<LoggedCapture>(TERMINAL_LOG, &event_id)?
                && (with_forwarded || !matches!(logged.state, CaptureState::Forwarded { .. }))
            {
                captures.push(logged.capture);
            }
        }
    }
    Ok(captures)
}

async fn take_bundle(
    runtime: &TerminalRuntime,
    writer: &WriterHandle,
    who: &Who,
    response: CaptureResponse,
) -> anyhow::Result<()> {
    runtime
        .sync
        .lock()
        .map(|mut s| s.last_bundle_check = Some(crate::clock::rfc3339(OffsetDateTime::now_utc())))
        .ok();
    let mut bundle = match response {
        CaptureResponse::Bundle { bundle: Some(bundle) } => *bundle,
        CaptureResponse::Bundle { bundle: None } => return Ok(()),
        other => anyhow::bail!("unexpected answer to a bundle request: {other:?}"),
    };
    anyhow::ensure!(
        bundle.municipality == runtime.municipality && bundle.venue == runtime.venue,
        "the bundle is for another municipality or venue"
    );
    let held = runtime.bundle.read().ok().and_then(|b| b.as_ref().map(|b| b.version)).unwrap_or(0);
    if bundle.version < held {
        tracing::warn!(held, offered = bundle.version, "an older bundle was offered; kept the newer one");
        return Ok(());
    }
    if bundle.directory_unchanged {
        // The node left the directory out: it is the one this terminal holds.
        let wanted = bundle.version & crate::terminals::DIRECTORY_VERSION_MASK;
        let kept = runtime.bundle.read().ok().and_then(|b| b.as_ref().and_then(|b| b.directory.clone()));
        match kept {
            Some(directory) if directory.directory.version == wanted => {
                bundle.directory = Some(directory);
                bundle.directory_unchanged = false;
            }
            _ => anyhow::bail!(
                "the bundle left out directory version {wanted}, which this terminal does not hold"
            ),
        }
    } else if let Some(directory) = &bundle.directory {
        let key = protocol::person::hex_decode(&bundle.national_key).context("national key is not hex")?;
        directory.verify(&key).context("the bundle's directory does not verify")?;
    }
    let stored = bundle.clone();
    writer
        .call(who, |reply| Command::Apply {
            action: "terminal.bundle".into(),
            subject: format!("bundle:{}", stored.version),
            op: Box::new(move |txn, _| {
                put_json(txn, TERMINAL_STATE, "bundle", &stored)?;
                Ok(Ok(serde_json::Value::Null))
            }),
            reply,
        })
        .await
        .map_err(|p| anyhow::anyhow!("{}", p.message_en))?;
    tracing::info!(
        version = bundle.version,
        lots = bundle.lots.len(),
        blocked = bundle.blocked.len(),
        "bundle installed"
    );
    *runtime.bundle.write().map_err(|_| anyhow::anyhow!("bundle lock poisoned"))? = Some(bundle);
    Ok(())
}

/// Reads the terminal's identity file.
pub fn identity(dir: &Path) -> anyhow::Result<Keypair> {
    crate::p2p::load_or_create_identity(&dir.join("keys/p2p-identity.key"))
}
