//! Request limits per peer on the p2p protocols.
//!
//! The directory gate lets in only peers the national directory lists (and enrolled
//! terminals), and the connection limits bound how many connections one peer holds. Neither
//! bounds how much work a listed peer may ask for: a broken or taken-over municipal node
//! could keep hundreds of requests open on the national node's ledger or a primary's store
//! and starve everyone else. Two limits per peer and protocol therefore apply before any
//! work is done for a request:
//!
//! - **requests in flight**: a node has one request of a kind open at a time towards a
//!   peer (one handoff sync, one report, one replication pull, one forward per owner, one
//!   push per terminal), so [`MAX_IN_FLIGHT`] open at once is never reached by a node that
//!   behaves, and bounds what one that does not can hold;
//! - **a rate**, a token bucket: a node sends its next request as soon as the last one is
//!   answered while work waits (reports and handoff syncs a few hundred a second at most on
//!   loopback), so the budgets are several times that and only stop a storm of cheap
//!   requests.
//!
//! A request beyond either is refused at once with `rate_limited` (on the directory
//! protocol, which has no refusal, it is dropped and fails at the requester). Requesters
//! treat it as any failed request: a handoff sync pauses a second, a report two to five,
//! a replication pull restarts from its stored checkpoint after two, a push or forward waits
//! two. Refusals are logged per peer at most every ten seconds, with the count.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The p2p protocols a peer can ask on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Directory requests.
    Directory,
    /// Replication pulls.
    Replication,
    /// Terminal enrolment, bundles and pushes; forwarded captures.
    Capture,
    /// Statistics reports to the national node.
    Report,
    /// Handoff syncs to the national node.
    Handoff,
}

/// Requests one peer may have open at once on one protocol.
pub const MAX_IN_FLIGHT: u32 = 8;

impl Protocol {
    /// Requests per second sustained, and the burst allowed on top.
    pub fn budget(self) -> (f64, f64) {
        match self {
            Protocol::Directory => (20.0, 200.0),
            Protocol::Replication | Protocol::Capture | Protocol::Report | Protocol::Handoff => {
                (1_000.0, 5_000.0)
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::Directory => "directory",
            Protocol::Replication => "replication",
            Protocol::Capture => "capture",
            Protocol::Report => "report",
            Protocol::Handoff => "handoff",
        }
    }
}

/// The refusal code.
pub const RATE_LIMITED: &str = "rate_limited";

/// How often refusals to one peer are logged (with the count since the last line).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a request was refused, for the requester's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// [`MAX_IN_FLIGHT`] of the peer's requests are open already.
    InFlight,
    /// Beyond the rate.
    Rate,
}

impl Refusal {
    /// The message sent with [`RATE_LIMITED`].
    pub fn message(self, protocol: Protocol) -> String {
        match self {
            Refusal::InFlight => format!(
                "{MAX_IN_FLIGHT} {} requests from this peer are open already; send the next when one is answered",
                protocol.name()
            ),
            Refusal::Rate => {
                let (rate, burst) = protocol.budget();
                format!(
                    "more than {rate} {} requests per second (burst {burst}) from this peer; try again later",
                    protocol.name()
                )
            }
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Refusals to one peer not yet logged.
#[derive(Debug)]
struct Refused {
    count: u64,
    logged_at: Instant,
}

/// The limits' state: every peer that asked recently. `Id` names an inbound request
/// (libp2p's `InboundRequestId`).
#[derive(Debug)]
pub struct PeerLimits<Id> {
    buckets: HashMap<(PeerId, Protocol), Bucket>,
    in_flight: HashMap<(PeerId, Protocol), u32>,
    /// Requests taken and not yet answered: which peer's count each one holds.
    open: HashMap<(Protocol, Id), PeerId>,
    refused: HashMap<PeerId, Refused>,
    /// Requests refused since the node started.
    pub refused_total: u64,
}

impl<Id> Default for PeerLimits<Id> {
    fn default() -> Self {
        Self {
            buckets: HashMap::new(),
            in_flight: HashMap::new(),
            open: HashMap::new(),
            refused: HashMap::new(),
            refused_total: 0,
        }
    }
}

impl<Id: Hash + Eq> PeerLimits<Id> {
    /// Takes request `id` of `peer` on `protocol` at `now`, or says why not. A request taken
    /// holds one of the peer's [`MAX_IN_FLIGHT`] until [`PeerLimits::finished`].
    pub fn take(&mut self, peer: PeerId, protocol: Protocol, id: Id, now: Instant) -> Result<(), Refusal> {
        let open = self.in_flight.get(&(peer, protocol)).copied().unwrap_or(0);
        let refusal = if open >= MAX_IN_FLIGHT {
            Some(Refusal::InFlight)
        } else if !self.rate(peer, protocol, now) {
            Some(Refusal::Rate)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.note_refusal(peer, protocol, refusal, now);
            return Err(refusal);
        }
        *self.in_flight.entry((peer, protocol)).or_default() += 1;
        self.open.insert((protocol, id), peer);
        Ok(())
    }

    /// Request `id` on `protocol` was answered, or failed: its peer may send another.
    /// (A refused request was never taken; nothing changes for it.)
    pub fn finished(&mut self, protocol: Protocol, id: Id) {
        let Some(peer) = self.open.remove(&(protocol, id)) else { return };
        if let Some(open) = self.in_flight.get_mut(&(peer, protocol)) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.in_flight.remove(&(peer, protocol));
            }
        }
    }

    /// Takes a token from the peer's bucket, if there is one.
    fn rate(&mut self, peer: PeerId, protocol: Protocol, now: Instant) -> bool {
        let (rate, burst) = protocol.budget();
        let bucket = self.buckets.entry((peer, protocol)).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn note_refusal(&mut self, peer: PeerId, protocol: Protocol, refusal: Refusal, now: Instant) {
        self.refused_total += 1;
        match self.refused.get_mut(&peer) {
            Some(refused) if now.saturating_duration_since(refused.logged_at) < WARN_EVERY => {
                refused.count += 1
            }
            held => {
                let earlier = held.map_or(0, |r| r.count);
                tracing::warn!(
                    %peer,
                    protocol = protocol.name(),
                    reason = ?refusal,
                    refused = earlier + 1,
                    "a peer asks beyond its limits; requests refused"
                );
                self.refused.insert(peer, Refused { count: 0, logged_at: now });
            }
        }
    }

    /// Forgets buckets that have filled up again, and logs the refusals counted since a
    /// peer's last line once ten seconds have passed, so the tables hold only peers that
    /// asked recently and no refusal goes unreported.
    pub fn prune(&mut self, now: Instant) {
        self.buckets.retain(|(_, protocol), bucket| {
            let (rate, burst) = protocol.budget();
            bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * rate < burst
        });
        self.refused.retain(|peer, refused| {
            if now.saturating_duration_since(refused.logged_at) < WARN_EVERY {
                return true;
            }
            if refused.count > 0 {
                tracing::warn!(%peer, refused = refused.count, "a peer asked beyond its limits; requests refused");
            }
            false
        });
    }

    /// Buckets held: peers and protocols with a rate to remember.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}
