//! The simulator in CI: hundreds of seeds under faults, the whole country once, the same
//! seed giving the same trace, and deliberate bugs caught by the invariants.

use simulations::{Bug, Config, Report, run};

/// Runs `count` seeds of the CI mix from `from`; panics with every failing seed and the
/// command that replays it.
fn seeds(from: u64, count: u64) {
    let mut failures = Vec::new();
    let mut total = simulations::world::Counters::default();
    for seed in from..from + count {
        let report = run(Config::stress(seed));
        assert!(report.counters.acknowledged > 50, "seed {seed} gave too few doses to test anything");
        if !report.violations.is_empty() {
            failures.push(describe(&report));
        }
        let c = &report.counters;
        for (sum, n) in [
            (&mut total.away, c.away),
            (&mut total.voids, c.voids),
            (&mut total.reissues, c.reissues),
            (&mut total.relocations, c.relocations),
            (&mut total.accepted, c.accepted),
            (&mut total.moved_again, c.moved_again),
            (&mut total.registered_first, c.registered_first),
            (&mut total.joined, c.joined),
            (&mut total.reregistered, c.reregistered),
            (&mut total.vaccinated_again, c.vaccinated_again),
            (&mut total.renumbered, c.renumbered),
            (&mut total.voids_renumbering, c.voids_renumbering),
            (&mut total.passed_on_again, c.passed_on_again),
            (&mut total.asked, c.asked),
            (&mut total.handed_on_request, c.handed_on_request),
            (&mut total.asked_again, c.asked_again),
            (&mut total.sent_back, c.sent_back),
            (&mut total.taken_back, c.taken_back),
            (&mut total.crashes, c.crashes),
            (&mut total.partitions, c.partitions),
            (&mut total.lost, c.lost),
            (&mut total.duplicated, c.duplicated),
        ] {
            *sum += n;
        }
    }
    assert!(failures.is_empty(), "{} of {count} seeds failed:\n{}", failures.len(), failures.join("\n"));
    // The seeds exercised what they are meant to.
    let t = &total;
    for (what, n) in [
        ("away-from-home doses", t.away),
        ("voids", t.voids),
        ("reissues", t.reissues),
        ("relocations", t.relocations),
        ("accepted handoffs", t.accepted),
        ("second moves", t.moved_again),
        // The register extract listing a mover before their handoff arrived, the history
        // joining that resident, and the extract replacing a provisional atena number.
        ("movers registered first", t.registered_first),
        ("histories joined", t.joined),
        ("provisional atena numbers replaced", t.reregistered),
        // A dose held at a terminal while its resident moved on a second time.
        ("doses passed on again", 2 * t.passed_on_again),
        ("crashes", t.crashes),
        ("partitions", t.partitions),
        ("lost messages", t.lost),
        ("duplicated messages", t.duplicated),
        // A mover vaccinated before the move, given a dose by the new town hall before the
        // history arrived (about one seed in two): the joined doses renumbered.
        ("doses given at the new town hall first", 2 * t.vaccinated_again),
        ("doses renumbered", 2 * t.renumbered),
        // A clerk at the new municipality voids the history's first dose (about one seed in
        // three; 12 to 20 in 50 seeds, so asked of one seed in five).
        ("voids numbering later doses down", 5 * t.voids_renumbering),
        // A newcomer's history asked for by the register extract, and handed over by the
        // old municipality when the ledger relayed the request.
        ("histories asked for", t.asked),
        ("residents handed over on request", t.handed_on_request),
        // An ask the previous municipality found no match for (the birth dates differ),
        // made again once the register here was corrected (64 to 71 in 50 seeds).
        ("asks made again", t.asked_again),
        // A history that cannot join (the birth dates differ) sent back, the resident taken
        // back by the old municipality and handed over again (45 to 48 in 50 seeds: the
        // other rows with another birth date are of people asked for, counted above).
        ("handoffs sent back", 2 * t.sent_back),
        ("handoffs taken back", 2 * t.taken_back),
    ] {
        assert!(n >= count, "only {n} {what} over {count} seeds");
    }
    assert_eq!(t.sent_back, t.taken_back, "every handoff sent back is taken back");
}

fn describe(report: &Report) -> String {
    format!(
        "seed {}: {}\n  replay: {}",
        report.config.seed,
        report.violations.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
        report.config.replay_command()
    )
}

#[test]
fn seeds_1_to_50_hold_every_invariant_under_faults() {
    seeds(1, 50);
}

#[test]
fn seeds_51_to_100_hold_every_invariant_under_faults() {
    seeds(51, 50);
}

#[test]
fn seeds_101_to_150_hold_every_invariant_under_faults() {
    seeds(101, 50);
}

#[test]
fn seeds_151_to_200_hold_every_invariant_under_faults() {
    seeds(151, 50);
}

#[test]
fn all_1741_municipalities_under_faults_settle_and_hold_every_invariant() {
    let config =
        Config { seed: 2026, municipalities: 0, scale: 0.0005, day_ms: 60 * 60_000, ..Config::default() };
    let report = run(config);
    assert_eq!(report.municipalities, 1741);
    assert!(report.counters.acknowledged > 500, "{:?}", report.counters);
    assert!(report.counters.crashes > 50 && report.counters.partitions > 100, "{:?}", report.counters);
    assert!(report.violations.is_empty(), "{}", describe(&report));
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let first = run(Config::stress(7));
    let again = run(Config::stress(7));
    let other = run(Config::stress(8));
    assert_eq!(first.digest, again.digest);
    assert_eq!(first.counters.messages, again.counters.messages);
    assert_ne!(first.digest, other.digest);
    // Residents built ahead on a second thread change nothing in the run.
    let helped = run(Config { prebuild: true, ..Config::stress(7) });
    assert_eq!(first.digest, helped.digest);
    assert!(helped.violations.is_empty(), "{:?}", helped.violations);
}

#[test]
fn deliberate_bugs_break_the_invariants_they_should() {
    // Each seed is one on which the bug shows with today's workload; a change to the workload
    // moves the random draws, and then the seeds here may need to be found again (`vrs-sim
    // run --stress --seed N --bug NAME` over the first few dozen seeds).
    for (bug, seed, expected) in [
        (Bug::RecordReplays, 1, "no terminal captured it"),
        (Bug::AddReports, 1, "national figures"),
        (Bug::SkipPage, 1, "standby lacks"),
        (Bug::KeepMovedAway, 1, "of a valid coupon was refused (coupon_transferred)"),
        // A dose chasing a resident who moved back and forth is never settled.
        (Bug::LatestArrivalOnly, 10, "never settled"),
        (Bug::StickyPassOn, 10, "never settled"),
        (Bug::KeepSpentCoupons, 1, "already given"),
        (Bug::JoinKeepsCoupons, 1, "already given"),
        (Bug::SecondRecord, 1, "is active in 2 records"),
        (Bug::KeepNumbers, 2, "two valid doses numbered"),
        (Bug::VoidKeepsNumbers, 2, "not 1, 2"),
        // The newcomer stays registered at both municipalities, their history never sent.
        (Bug::UnansweredRequests, 1, "is active in 2 records"),
        (Bug::UnansweredRequests, 1, "ended Waiting"),
    ] {
        let report = run(Config { bug: Some(bug), ..Config::stress(seed) });
        assert!(
            report.violations.iter().any(|v| v.contains(expected)),
            "{bug:?} went unnoticed: {:?}",
            report.violations
        );
        assert!(report.config.replay_command().contains("--bug"), "{}", report.config.replay_command());
    }
}
