//! `vrs-node smoke-federation`: the federation's p2p layer at full size in one process.
//!
//! A national node is made with `federation init-national` and every municipality is
//! admitted with `federation approve`, as an administrator would; the national node then
//! runs its real p2p service (`p2p::run`: the directory gate, the directory and report
//! protocols, the report store). Each municipality is a libp2p node with the node's own
//! behaviour (gate, connection limits, identify, ping, CBOR request-response) over the
//! in-memory transport with Noise and Yamux: it dials the national node, fetches and
//! verifies the signed directory, finds itself in it, and delivers a signed daily
//! statistics document. The national node's totals must equal the sum of what was sent.
//!
//! A municipality here is its p2p identity and keys, not a whole node with a resident
//! store: the resident side is what `tests/` runs as real processes and the simulator runs
//! at scale. What this checks is the part only a real network stack can: 1,742 peers
//! connecting, authenticating and exchanging messages at once.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, Message};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use protocol::directory::{DirectoryEntry, JoinRequest, NodeRole};
use protocol::document::Sex;
use protocol::handoff::{HandoffResponse, HandoffSync};
use protocol::municipality::{MunicipalityCode, all_municipalities};
use protocol::person::{hex_decode, hex_lower};
use protocol::statistics::{
    AgeBand, DailyStatistics, DoseCount, ReportRequest, ReportResponse, SignedStatistics, Statistics,
};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use time::Date;

use crate::p2p::{BehaviourEvent, DirectoryRequest};

/// Where the national node listens in the process.
const NATIONAL_ADDRESS: &str = "/memory/17410";
/// How long a municipality may take to join and report.
const DEADLINE: Duration = Duration::from_secs(300);

/// What the smoke run measured.
#[derive(Debug)]
pub struct SmokeReport {
    /// Municipal nodes started.
    pub municipalities: usize,
    /// Directory entries after the approvals (national included).
    pub directory_entries: usize,
    /// Municipalities that fetched the directory and found themselves in it.
    pub joined: usize,
    /// Municipalities whose report the national node stored.
    pub reported: usize,
    /// Doses the municipalities reported, in all.
    pub doses_sent: u64,
    /// Doses in the national node's totals for the day.
    pub national_total: u64,
    /// Seconds spent approving the municipalities.
    pub approve_seconds: f64,
    /// Seconds from starting the national service to the last stored report.
    pub exchange_seconds: f64,
    /// Median and slowest time from a municipality's dial to its stored report.
    pub median_ms: u64,
    /// Slowest.
    pub max_ms: u64,
    /// Requests made again after a failure (a connection closed under load, a timeout).
    pub retried: u64,
}

struct Member {
    code: MunicipalityCode,
    keypair: Keypair,
    coupon_key: Ed25519KeyPair,
    doses: u64,
}

/// Runs the smoke test with the first `count` municipalities (all 1,741 by default) in
/// `dir` (which must be empty or absent).
pub async fn run(dir: &Path, count: usize, date: Date) -> anyhow::Result<SmokeReport> {
    let national_dir = dir.join("national");
    let (national_peer, national_key) = init_national(&national_dir, NATIONAL_ADDRESS)?;
    let started = Instant::now();
    let mut members = Vec::new();
    for (i, municipality) in all_municipalities().iter().take(count).enumerate() {
        members.push(admit(&national_dir, i, municipality.code)?);
    }
    let approve_seconds = started.elapsed().as_secs_f64();
    let directory = crate::p2p::load_directory(&national_dir.join("directory.json"), &national_key)?
        .context("the national node's directory")?;
    let directory_entries = directory.directory.entries.len();

    let (store, national) = serve_national(&national_dir, NATIONAL_ADDRESS, &national_key).await?;
    let exchange = Instant::now();
    let address: Multiaddr = format!("{NATIONAL_ADDRESS}/p2p/{national_peer}").parse()?;
    let doses_sent: u64 = members.iter().map(|m| m.doses).sum();
    let municipalities = members.len();
    let mut tasks = tokio::task::JoinSet::new();
    for member in members {
        let address = address.clone();
        let national_key = national_key.clone();
        tasks.spawn(async move { join_and_report(member, address, national_peer, national_key, date).await });
    }
    let mut times = Vec::new();
    let mut failures = Vec::new();
    let mut retried = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome.context("a municipal task panicked")? {
            Ok((ms, again)) => {
                times.push(ms);
                retried += again;
            }
            Err(error) => failures.push(format!("{error:#}")),
        }
    }
    let exchange_seconds = exchange.elapsed().as_secs_f64();
    national.abort();
    if !failures.is_empty() {
        bail!("{} municipalities failed, first: {}", failures.len(), failures[0]);
    }
    times.sort_unstable();
    let by = crate::national::GroupBy::default();
    let national_total: u64 =
        store.totals(crate::national::Scope::National, date, date, by)?.iter().map(|row| row.count).sum();
    Ok(SmokeReport {
        municipalities,
        directory_entries,
        joined: times.len(),
        reported: times.len(),
        doses_sent,
        national_total,
        approve_seconds,
        exchange_seconds,
        median_ms: times.get(times.len() / 2).copied().unwrap_or(0),
        max_ms: times.last().copied().unwrap_or(0),
        retried,
    })
}

/// Makes a national node in `dir` listening on `listen`: its peer id and public key.
fn init_national(dir: &Path, listen: &str) -> anyhow::Result<(PeerId, Vec<u8>)> {
    let init = crate::federation::NationalInit {
        p2p_listen: listen,
        advertise: None,
        http_listen: "127.0.0.1:0",
        plain_http: true,
    };
    let (peer, key) = crate::federation::init_national(dir, &init)?;
    Ok((peer.parse()?, hex_decode(&key).context("the national key")?))
}

/// Makes municipality `code`'s p2p identity and coupon key, and approves it into the
/// national node's directory in `dir` as an administrator would (`i` numbers its address).
fn admit(dir: &Path, i: usize, code: MunicipalityCode) -> anyhow::Result<Member> {
    let keypair = Keypair::generate_ed25519();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key generation"))?;
    let coupon_key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let entry = DirectoryEntry {
        municipality: Some(code),
        role: NodeRole::Municipal,
        peer_id: keypair.public().to_peer_id().to_string(),
        addresses: vec![format!("/memory/{}", 20_000 + i)],
        coupon_key: hex_lower(coupon_key.public_key().as_ref()),
        encryption_key: String::new(),
    };
    crate::federation::approve(dir, JoinRequest { entry, requested_at: String::new() })?;
    Ok(Member { code, keypair, coupon_key, doses: 1 + (i as u64 % 97) })
}

/// Starts the national node's real p2p service over its store in `dir`; returns once it
/// listens on `listen`.
async fn serve_national(
    dir: &Path,
    listen: &str,
    national_key: &[u8],
) -> anyhow::Result<(Arc<crate::national::NationalStore>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let store = Arc::new(crate::national::NationalStore::open(dir, None)?);
    let options =
        crate::federation::national_p2p_options(dir, listen.parse()?, national_key.to_vec(), store.clone())?;
    let (bound, listening) = tokio::sync::oneshot::channel();
    let national = tokio::spawn(crate::p2p::run(options, Some(bound)));
    listening.await.context("the national node did not start listening")?;
    Ok((store, national))
}

/// One municipality: dial, fetch and verify the directory, report; returns the
/// milliseconds from the first dial to the stored report, and the requests made again.
async fn join_and_report(
    member: Member,
    national: Multiaddr,
    national_peer: PeerId,
    national_key: Vec<u8>,
    date: Date,
) -> anyhow::Result<(u64, u64)> {
    let code = member.code;
    let own_peer = member.keypair.public().to_peer_id();
    let mut swarm = crate::p2p::build_swarm(member.keypair)?;
    swarm.behaviour_mut().gate.set_allowed(HashSet::from([national_peer]));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    swarm.dial(national.clone())?;
    let mut asked = false;
    // The report once made: sent again, as is, if its request fails.
    let mut report: Option<ReportRequest> = None;
    // A request that fails (a connection closed under load, a timeout) is made again until
    // the deadline, as a municipal node's next poll would; the last failure is reported.
    let mut last_failure: Option<String> = None;
    let mut retried = 0;
    let retry_pause = Duration::from_millis(100 + u64::from(code.as_str().as_bytes()[5]) * 10);
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some()).await.with_context(|| {
            let why = last_failure.as_deref().unwrap_or("no failure seen");
            format!("{code}: no report stored within {DEADLINE:?} (last failure: {why})")
        })?;
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == national_peer && !asked => {
                asked = true;
                swarm
                    .behaviour_mut()
                    .directory
                    .send_request(&peer_id, DirectoryRequest { held_version: None });
            }
            SwarmEvent::OutgoingConnectionError { .. } => {
                // The national node limits connections being set up at once: try again.
                tokio::time::sleep(Duration::from_millis(50 + u64::from(code.as_str().as_bytes()[5]) * 10))
                    .await;
                swarm.dial(national.clone())?;
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == national_peer => {
                asked = false;
                swarm.dial(national.clone())?;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Directory(request_response::Event::Message {
                message: Message::Response { response, .. },
                ..
            })) if report.is_none() => {
                let signed = response.directory.with_context(|| format!("{code}: no directory sent"))?;
                let directory = signed.verify(&national_key).with_context(|| format!("{code}: directory"))?;
                let me = directory.peer(&own_peer.to_string());
                if me.and_then(|e| e.municipality) != Some(code) {
                    bail!("{code}: not in the directory");
                }
                let daily = DailyStatistics {
                    municipality: code,
                    date,
                    version: 1,
                    generated_at: format!("{date}T09:00:00Z"),
                    doses: vec![DoseCount {
                        product: "comirnaty-30".to_owned(),
                        dose_number: 1,
                        age_band: AgeBand::all().nth(6).context("age bands")?,
                        sex: Sex::Female,
                        venue_municipality: code,
                        count: member.doses,
                    }],
                    entry_lag: Vec::new(),
                    rejected: Vec::new(),
                };
                let signed = SignedStatistics::sign(&Statistics::Daily(daily), &member.coupon_key);
                let request = ReportRequest { statistics: vec![signed], checkpoints: Vec::new() };
                swarm.behaviour_mut().report.send_request(&national_peer, request.clone());
                report = Some(request);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Report(request_response::Event::Message {
                message: Message::Response { response, .. },
                ..
            })) => {
                // The national node could not store it for the moment: it asks for the
                // report again, as a node's next poll would send it.
                if let ReportResponse::Refused { code: refusal, message } = &response
                    && refusal == "internal"
                    && let Some(request) = report.clone()
                {
                    last_failure = Some(format!("report refused: {refusal}: {message}"));
                    retried += 1;
                    tokio::time::sleep(retry_pause).await;
                    swarm.behaviour_mut().report.send_request(&national_peer, request);
                    continue;
                }
                return match response {
                    ReportResponse::Stored { statistics: 1, .. } => {
                        Ok((started.elapsed().as_millis() as u64, retried))
                    }
                    // Sent again after a failure that came after the national node had
                    // stored it: held already.
                    ReportResponse::Stored { statistics: 0, .. } if last_failure.is_some() => {
                        Ok((started.elapsed().as_millis() as u64, retried))
                    }
                    other => bail!("{code}: report not stored: {other:?}"),
                };
            }
            SwarmEvent::Behaviour(BehaviourEvent::Directory(request_response::Event::OutboundFailure {
                error,
                ..
            })) => {
                last_failure = Some(format!("directory request: {error}"));
                retried += 1;
                tokio::time::sleep(retry_pause).await;
                if report.is_none() {
                    let request = DirectoryRequest { held_version: None };
                    swarm.behaviour_mut().directory.send_request(&national_peer, request);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Report(request_response::Event::OutboundFailure {
                error,
                ..
            })) => {
                last_failure = Some(format!("report: {error}"));
                retried += 1;
                tokio::time::sleep(retry_pause).await;
                if let Some(request) = report.clone() {
                    swarm.behaviour_mut().report.send_request(&national_peer, request);
                }
            }
            _ => {}
        }
    }
}

/// What [`flood`] saw.
#[derive(Debug)]
pub struct FloodReport {
    /// Handoff syncs the flooding municipality sent.
    pub sent: usize,
    /// Of those, answered by the ledger.
    pub answered: usize,
    /// Refused at once (`rate_limited`).
    pub refused: usize,
    /// Seconds the flood took.
    pub seconds: f64,
    /// Whether another municipality joined and had its report stored meanwhile.
    pub others_served: bool,
    /// The flooder's answer to one sync sent afterwards, as a node sends them.
    pub answer_after: HandoffResponse,
}

fn empty_sync() -> HandoffSync {
    HandoffSync {
        deposits: Vec::new(),
        accepted: Vec::new(),
        watching: Vec::new(),
        asks: Vec::new(),
        answered: Vec::new(),
        returned: Vec::new(),
    }
}

/// Waits for the answer to one handoff sync.
async fn sync_answer(swarm: &mut libp2p::Swarm<crate::p2p::Behaviour>) -> anyhow::Result<HandoffResponse> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), swarm.select_next_some())
            .await
            .context("no answer within 30 s")?;
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Handoff(request_response::Event::Message {
                message: Message::Response { response, .. },
                ..
            })) => return Ok(response),
            SwarmEvent::Behaviour(BehaviourEvent::Handoff(request_response::Event::OutboundFailure {
                error,
                ..
            })) => bail!("a handoff sync failed: {error}"),
            _ => {}
        }
    }
}

/// A municipality in the national node's directory floods it: it keeps `window` handoff
/// syncs open at once (a node has one), sending the next as soon as one is answered, until
/// `total` are answered or refused. Meanwhile another municipality joins and reports; then
/// the flooder sends one sync more, as a node would. The national node runs its real p2p
/// service over a store in `dir`, on the in-memory transport at `listen`.
pub async fn flood(dir: &Path, listen: &str, total: usize, window: usize) -> anyhow::Result<FloodReport> {
    let (national_peer, national_key) = init_national(dir, listen)?;
    let codes = all_municipalities();
    let flooder = admit(dir, 0, codes[0].code)?;
    let honest = admit(dir, 1, codes[1].code)?;
    let (_store, national) = serve_national(dir, listen, &national_key).await?;
    let address: Multiaddr = format!("{listen}/p2p/{national_peer}").parse()?;

    let mut swarm = crate::p2p::build_swarm(flooder.keypair)?;
    swarm.behaviour_mut().gate.set_allowed(HashSet::from([national_peer]));
    swarm.dial(address.clone())?;
    let (mut sent, mut answered, mut refused) = (0, 0, 0);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while answered + refused < total {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .context("the flood did not end")?;
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == national_peer => {
                while sent < window.min(total) {
                    swarm.behaviour_mut().handoff.send_request(&national_peer, empty_sync());
                    sent += 1;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Handoff(request_response::Event::Message {
                message: Message::Response { response, .. },
                ..
            })) => {
                match response {
                    HandoffResponse::Synced { .. } => answered += 1,
                    HandoffResponse::Refused { code, .. } if code == crate::peer_limits::RATE_LIMITED => {
                        refused += 1
                    }
                    other => bail!("unexpected answer: {other:?}"),
                }
                if sent < total {
                    swarm.behaviour_mut().handoff.send_request(&national_peer, empty_sync());
                    sent += 1;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Handoff(request_response::Event::OutboundFailure {
                error,
                ..
            })) => bail!("a handoff sync failed: {error}"),
            _ => {}
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let date = time::OffsetDateTime::now_utc().date();
    let others_served = join_and_report(honest, address, national_peer, national_key, date).await.is_ok();
    swarm.behaviour_mut().handoff.send_request(&national_peer, empty_sync());
    let answer_after = sync_answer(&mut swarm).await?;
    national.abort();
    Ok(FloodReport { sent, answered, refused, seconds, others_served, answer_after })
}
