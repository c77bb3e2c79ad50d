//! A deterministic simulator of the vaccination-record federation: the national node, the
//! municipalities' primaries and standbys, and venue terminals, over a simulated network
//! and disks, under partitions, loss, duplication, reordering, delay, crashes and clock
//! skew — driving the `protocol` crate's state machines, as `vrs-node` does.
//!
//! A run is a function of its [`Config`] (above all its seed): the same seed gives the
//! same trace digest. [`run`] plays a campaign day with faults, heals everything, lets the
//! federation settle within a budget, and checks the invariants of the design.

mod check;
pub mod population;
mod prebuild;
pub mod rng;
pub mod world;

use std::time::Instant;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Config {
    /// The seed: everything random in the run comes from it.
    pub seed: u64,
    /// How many municipalities (0: all 1,741), spread over the country.
    pub municipalities: usize,
    /// Population and volume factor (1.0: Japan's ~125 M people and `doses` doses).
    pub scale: f64,
    /// Doses given in the day at scale 1.
    pub doses: f64,
    /// Inject faults during the day.
    pub faults: bool,
    /// Length of the day's workload, virtual milliseconds.
    pub day_ms: u64,
    /// How long after healing the federation may take to settle, virtual milliseconds.
    pub convergence_budget_ms: u64,
    /// Share of doses given at a venue of another municipality.
    pub away: f64,
    /// Share of recorded doses a clerk voids later in the day.
    pub void_rate: f64,
    /// Share of people whose coupon is reissued before they come.
    pub reissue_rate: f64,
    /// Share of the population moving to another municipality per month.
    pub relocation_per_month: f64,
    /// Share of newcomers the register extract lists first whose birth date there differs
    /// from their old record: the new municipality sends the handoff back, the old one
    /// corrects the record and hands it over again; or, for someone not handed over, the
    /// old municipality finds no match for the ask, and the new one corrects its record and
    /// asks again.
    pub birth_date_differs: f64,
    /// Message loss probability while faults are on.
    pub loss: f64,
    /// Message duplication probability while faults are on.
    pub duplication: f64,
    /// Print every delivered message.
    pub trace: bool,
    /// A deliberate bug, to show the invariants catch it.
    pub bug: Option<Bug>,
    /// Build residents' pre-day state on a second thread (the run is the same either way).
    pub prebuild: bool,
}

/// Deliberate bugs the checks must catch (each is one line of the simulator gone wrong).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bug {
    /// The owner records a repeated capture again instead of answering with the original.
    RecordReplays,
    /// The national node adds a newer report to the older one instead of replacing it.
    AddReports,
    /// A standby moves its checkpoint without storing the page.
    SkipPage,
    /// The old municipality refuses a dose of a moved resident's coupon forwarded by a
    /// third municipality's venue instead of passing it on to the new one.
    KeepMovedAway,
    /// A municipality takes a dose passed on by another only if that one handed it the
    /// resident's latest arrival, not an earlier one (the resident left and came back).
    LatestArrivalOnly,
    /// A municipality the resident came back to passes a dose it had passed on before
    /// straight on again, instead of recording it now that they live there.
    StickyPassOn,
    /// A dose passed on from a previous municipality leaves valid the coupon the new one
    /// issued for the same dose.
    KeepSpentCoupons,
    /// A history joining a resident the register extract listed first leaves valid the
    /// coupons issued here for doses it shows given.
    JoinKeepsCoupons,
    /// A handoff for a person the register extract listed first creates a second record
    /// instead of joining the history to theirs.
    SecondRecord,
    /// A history joining a resident vaccinated here before it arrived leaves the dose given
    /// here numbered as if there had been no history.
    KeepNumbers,
    /// A void leaves the doses after the voided one with their numbers.
    VoidKeepsNumbers,
    /// A municipality never answers the ledger's requests for residents another one
    /// registered as newcomers and asked for.
    UnansweredRequests,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 1,
            municipalities: 12,
            scale: 0.0001,
            doses: 1_700_000.0,
            faults: true,
            day_ms: 8 * 3_600_000,
            convergence_budget_ms: 30 * 60_000,
            away: 0.10,
            void_rate: 0.005,
            reissue_rate: 0.002,
            relocation_per_month: 0.004,
            birth_date_differs: 0.05,
            loss: 0.02,
            duplication: 0.01,
            trace: false,
            bug: None,
            prebuild: false,
        }
    }
}

impl Config {
    /// The mix CI runs many seeds of: a dozen municipalities over two hours, with the
    /// rare events (relocations, reissues, voids) a hundred to a few times more frequent
    /// than in life, so that every seed exercises them under faults.
    pub fn stress(seed: u64) -> Self {
        Self {
            seed,
            municipalities: 12,
            scale: 0.002,
            day_ms: 2 * 3_600_000,
            relocation_per_month: 0.4,
            birth_date_differs: 0.15,
            reissue_rate: 0.02,
            void_rate: 0.02,
            ..Self::default()
        }
    }

    /// Doses to give in the day, at this scale, over the simulated municipalities' share
    /// of the population.
    pub fn doses_per_day(&self) -> f64 {
        self.doses * self.scale * self.share()
    }

    /// Move-outs in the day for a simulated population of `population`.
    pub fn relocations_per_day(&self, population: u64) -> f64 {
        population as f64 * self.relocation_per_month / 30.0 * self.day_ms as f64 / (8.0 * 3_600_000.0)
    }

    fn share(&self) -> f64 {
        let full = population::full_populations();
        let chosen = population::chosen(self.municipalities);
        chosen.iter().map(|i| full[*i]).sum::<f64>() / population::JAPAN
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let d = Self::default();
        let mut command = format!(
            "cargo run --release -p simulations --bin vrs-sim -- run --seed {} --municipalities {} --scale {} --doses {} --day-minutes {}",
            self.seed,
            self.municipalities,
            self.scale,
            self.doses,
            self.day_ms / 60_000,
        );
        for (flag, value, default) in [
            ("relocation-per-month", self.relocation_per_month, d.relocation_per_month),
            ("reissue-rate", self.reissue_rate, d.reissue_rate),
            ("void-rate", self.void_rate, d.void_rate),
            ("birth-date-differs", self.birth_date_differs, d.birth_date_differs),
        ] {
            if value != default {
                command.push_str(&format!(" --{flag} {value}"));
            }
        }
        if !self.faults {
            command.push_str(" --no-faults");
        }
        if let Some(bug) = self.bug {
            command.push_str(&format!(
                " --bug {}",
                clap::ValueEnum::to_possible_value(&bug)
                    .map_or_else(String::new, |v| v.get_name().to_owned())
            ));
        }
        command
    }
}

/// What a run did and found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The configuration.
    pub config: Config,
    /// SHA-256 over the trace and the final state.
    pub digest: String,
    /// Counts.
    pub counters: world::Counters,
    /// Municipalities simulated.
    pub municipalities: usize,
    /// Terminals simulated.
    pub terminals: usize,
    /// Virtual milliseconds from healing to settled (None: not within the budget).
    pub convergence_ms: Option<u64>,
    /// Wall-clock seconds of the simulation (before the checks).
    pub wall_seconds: f64,
    /// Wall-clock seconds of the invariant checks.
    pub check_seconds: f64,
    /// Invariants that do not hold.
    pub violations: Vec<String>,
    /// Residents drawn to come, and of them how many the helper thread had built ahead
    /// (None: run on one core).
    pub built_ahead: Option<(u64, u64)>,
}

impl Report {
    /// Acknowledged doses per wall-clock second.
    pub fn doses_per_second(&self) -> f64 {
        self.counters.acknowledged as f64 / self.wall_seconds.max(1e-9)
    }

    /// Bytes sent per acknowledged dose.
    pub fn bytes_per_dose(&self) -> f64 {
        self.counters.bytes as f64 / (self.counters.acknowledged.max(1)) as f64
    }
}

/// Runs one simulation and checks it.
pub fn run(config: Config) -> Report {
    let started = Instant::now();
    let mut world = world::World::new(config.clone());
    world.run();
    let wall_seconds = started.elapsed().as_secs_f64();
    let checked = Instant::now();
    let violations = world.violations();
    let check_seconds = checked.elapsed().as_secs_f64();
    let digest = world.finish_digest();
    Report {
        convergence_ms: world.settled_at.zip(world.healed_at).map(|(s, h)| s.saturating_sub(h)),
        municipalities: world.codes.len(),
        terminals: world.terminals.len(),
        counters: world.counters.clone(),
        config,
        digest,
        wall_seconds,
        check_seconds,
        violations,
        built_ahead: world.built_ahead(),
    }
}
