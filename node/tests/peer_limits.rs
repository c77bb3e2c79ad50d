//! Limits per peer on the p2p protocols: requests open at once, and a rate.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use node::peer_limits::{MAX_IN_FLIGHT, PeerLimits, Protocol, Refusal};
use protocol::handoff::HandoffResponse;

#[test]
fn a_peer_holds_at_most_eight_requests_open_and_others_are_not_affected() {
    let mut limits = PeerLimits::default();
    let (flooder, other) = (PeerId::random(), PeerId::random());
    let now = Instant::now();
    for id in 0..MAX_IN_FLIGHT as u64 {
        assert_eq!(limits.take(flooder, Protocol::Handoff, id, now), Ok(()));
    }
    assert_eq!(limits.take(flooder, Protocol::Handoff, 100, now), Err(Refusal::InFlight));
    // Another protocol of the same peer, and another peer, have their own.
    assert_eq!(limits.take(flooder, Protocol::Report, 0, now), Ok(()));
    assert_eq!(limits.take(other, Protocol::Handoff, 200, now), Ok(()));
    // One answered: one more may come. A refused one finishing changes nothing.
    limits.finished(Protocol::Handoff, 3);
    limits.finished(Protocol::Handoff, 100);
    assert_eq!(limits.take(flooder, Protocol::Handoff, 101, now), Ok(()));
    assert_eq!(limits.take(flooder, Protocol::Handoff, 102, now), Err(Refusal::InFlight));
    assert_eq!(limits.refused_total, 2);
}

#[test]
fn a_peer_gets_its_burst_then_its_rate() {
    let mut limits = PeerLimits::default();
    let peer = PeerId::random();
    let start = Instant::now();
    let (rate, burst) = Protocol::Directory.budget();
    let served = |limits: &mut PeerLimits<u64>, at: Instant, from: u64| {
        (from..from + 1_000)
            .filter(|id| {
                let taken = limits.take(peer, Protocol::Directory, *id, at).is_ok();
                limits.finished(Protocol::Directory, *id);
                taken
            })
            .count()
    };
    assert_eq!(served(&mut limits, start, 0), burst as usize);
    assert_eq!(served(&mut limits, start + Duration::from_secs(1), 1_000), rate as usize);
}

#[test]
fn a_node_sending_one_request_at_a_time_is_never_refused() {
    // A handoff sync or a report every 3 ms for ten minutes, each answered before the
    // next (a node sends the next at once while work waits; on loopback a few hundred a
    // second at most).
    let mut limits = PeerLimits::default();
    let peer = PeerId::random();
    let start = Instant::now();
    for id in 0..200_000u64 {
        let now = start + Duration::from_millis(3 * id);
        for protocol in [Protocol::Handoff, Protocol::Report] {
            assert_eq!(limits.take(peer, protocol, id, now), Ok(()), "{protocol:?} refused at {id}");
            limits.finished(protocol, id);
        }
    }
    assert_eq!(limits.refused_total, 0);
}

#[test]
fn full_buckets_are_forgotten() {
    let mut limits = PeerLimits::default();
    let start = Instant::now();
    for id in 0..100 {
        let _ = limits.take(PeerId::random(), Protocol::Directory, id, start);
    }
    let busy = PeerId::random();
    for id in 100..400 {
        let _ = limits.take(busy, Protocol::Directory, id, start);
        limits.finished(Protocol::Directory, id);
    }
    assert_eq!(limits.tracked(), 101);
    // A second later the peers that asked once have their burst back; the one that
    // emptied its bucket is tracked until it refills.
    limits.prune(start + Duration::from_secs(1));
    assert_eq!(limits.tracked(), 1);
    limits.prune(start + Duration::from_secs(60));
    assert_eq!(limits.tracked(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_too_many_requests_open_is_refused_and_the_others_are_served() {
    let dir = std::env::temp_dir().join(format!("vrs-peer-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    const TOTAL: usize = 1_500;
    const WINDOW: usize = 32;
    let report = node::smoke::flood(&dir, "/memory/17411", TOTAL, WINDOW).await.expect("the flood ran");
    let _ = std::fs::remove_dir_all(&dir);
    println!("{} answered and {} refused in {:.2} s", report.answered, report.refused, report.seconds);
    assert!(MAX_IN_FLIGHT < WINDOW as u32);
    assert_eq!((report.sent, report.answered + report.refused), (TOTAL, TOTAL));
    // Beyond its eight open, requests were refused at once, not queued; within them it was
    // served.
    assert!(report.refused > 0, "nothing refused: {report:?}");
    assert!(report.answered > 0, "nothing answered: {report:?}");
    // Another municipality joined and reported meanwhile, and the flooder, one request at a
    // time as a node sends them, is served again.
    assert!(report.others_served, "{report:?}");
    assert!(matches!(report.answer_after, HandoffResponse::Synced { .. }), "{report:?}");
}
