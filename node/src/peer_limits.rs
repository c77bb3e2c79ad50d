//! Request budgets per peer on the p2p protocols.
//!
//! The directory gate lets in only peers the national directory lists (and enrolled
//! terminals), and the connection limits bound how many streams one peer holds open. Neither
//! bounds how fast a listed peer may ask: a broken or taken-over municipal node could keep
//! the national node's ledger or a primary's store busy with back-to-back requests and
//! starve everyone else. Each peer therefore has a token bucket per protocol; a request
//! beyond it is refused at once (`rate_limited`, or the request dropped on the directory
//! protocol, which has no refusal), before any work is done for it. The requester's node
//! treats that as any other failed request and tries again at its next poll.
//!
//! The budgets are several times what a node does at its busiest: a handoff poll every
//! 250 ms with immediate follow-ups while work waits, a standby pulling page after page
//! while it catches up, a venue terminal pushing after every capture, a report every few
//! minutes, the directory every few seconds at most.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The p2p protocols a peer can ask on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Protocol {
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

impl Protocol {
    /// Requests per second sustained, and the burst allowed on top.
    pub(crate) fn budget(self) -> (f64, f64) {
        match self {
            Protocol::Directory => (5.0, 50.0),
            Protocol::Replication => (100.0, 1_000.0),
            Protocol::Capture => (100.0, 1_000.0),
            Protocol::Report => (20.0, 200.0),
            Protocol::Handoff => (50.0, 500.0),
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

    /// The refusal's message, for the requester's log.
    pub(crate) fn refusal(self) -> String {
        let (rate, burst) = self.budget();
        format!(
            "more than {rate} {} requests per second (burst {burst}) from this peer; try again later",
            self.name()
        )
    }
}

/// The refusal code.
pub(crate) const RATE_LIMITED: &str = "rate_limited";

/// How often refusals to one peer are logged (with the count since the last line).
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Refusals to one peer not yet logged.
#[derive(Debug)]
struct Refused {
    count: u64,
    logged_at: Option<Instant>,
}

/// The token buckets of every peer that asked recently.
#[derive(Debug, Default)]
pub(crate) struct PeerLimits {
    buckets: HashMap<(PeerId, Protocol), Bucket>,
    refused: HashMap<PeerId, Refused>,
    /// Requests refused since the node started.
    pub(crate) refused_total: u64,
}

impl PeerLimits {
    /// Whether `peer` may make one more `protocol` request at `now`; takes a token if so.
    /// A refusal is logged (at most once per peer every ten seconds, with the count).
    pub(crate) fn allow(&mut self, peer: PeerId, protocol: Protocol, now: Instant) -> bool {
        let (rate, burst) = protocol.budget();
        let bucket = self.buckets.entry((peer, protocol)).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return true;
        }
        self.refused_total += 1;
        let refused = self.refused.entry(peer).or_insert(Refused { count: 0, logged_at: None });
        refused.count += 1;
        if refused.logged_at.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY) {
            tracing::warn!(
                %peer,
                protocol = protocol.name(),
                refused = refused.count,
                "a peer asks faster than its budget; requests refused"
            );
            refused.count = 0;
            refused.logged_at = Some(now);
        }
        false
    }

    /// Forgets buckets that have filled up again and peers not refused for a while, so the
    /// table holds only peers that asked recently.
    pub(crate) fn prune(&mut self, now: Instant) {
        self.buckets.retain(|(_, protocol), bucket| {
            let (rate, burst) = protocol.budget();
            bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * rate < burst
        });
        self.refused.retain(|_, refused| {
            refused.logged_at.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY)
        });
    }

    /// Peers with a bucket (for tests and the prune).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let mut limits = PeerLimits::default();
        let (flooder, other) = (PeerId::random(), PeerId::random());
        let start = Instant::now();
        let (rate, burst) = Protocol::Handoff.budget();
        let allowed = (0..2_000).filter(|_| limits.allow(flooder, Protocol::Handoff, start)).count();
        assert_eq!(allowed, burst as usize);
        assert_eq!(limits.refused_total, 2_000 - burst as u64);
        // Another protocol of the same peer, and another peer, have their own budgets.
        assert!(limits.allow(flooder, Protocol::Report, start));
        assert!(limits.allow(other, Protocol::Handoff, start));
        // One second later: `rate` more.
        let later = start + Duration::from_secs(1);
        let allowed = (0..2_000).filter(|_| limits.allow(flooder, Protocol::Handoff, later)).count();
        assert_eq!(allowed, rate as usize);
    }

    #[test]
    fn a_node_polling_at_its_busiest_is_never_refused() {
        // A handoff sync every 20 ms for ten minutes (fifty a second; a node polls every
        // 250 ms, at once again only while work waits).
        let mut limits = PeerLimits::default();
        let peer = PeerId::random();
        let start = Instant::now();
        for i in 0..30_000u64 {
            let now = start + Duration::from_millis(20 * i);
            assert!(limits.allow(peer, Protocol::Handoff, now), "refused at request {i}");
        }
        assert_eq!(limits.refused_total, 0);
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let mut limits = PeerLimits::default();
        let start = Instant::now();
        for _ in 0..100 {
            limits.allow(PeerId::random(), Protocol::Directory, start);
        }
        let busy = PeerId::random();
        for _ in 0..60 {
            limits.allow(busy, Protocol::Directory, start);
        }
        assert_eq!(limits.tracked(), 101);
        // A second later the peers that asked once have their burst back; the one that
        // emptied its bucket is still tracked until it refills.
        limits.prune(start + Duration::from_secs(1));
        assert_eq!(limits.tracked(), 1);
        limits.prune(start + Duration::from_secs(60));
        assert_eq!(limits.tracked(), 0);
    }
}
