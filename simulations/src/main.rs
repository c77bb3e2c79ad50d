//! `vrs-sim`: runs the federation simulator.
//!
//! - `vrs-sim run --seed 7` — one run; prints the figures and the digest, and on a broken
//!   invariant the seed and the command that replays it (exit status 1).
//! - `vrs-sim seeds --from 1 --count 1000` — many seeds, for a release.
//! - `vrs-sim run --municipalities 0 --scale 1 --no-faults` — Japan's peak day, for speed.

use clap::{Args, Parser, Subcommand};
use simulations::{Config, Report, run};

// The simulator allocates and frees small buffers at a high rate (documents, messages);
// mimalloc, which the node uses too, does this markedly cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "vrs-sim", about = "Deterministic simulation of the vaccination-record federation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One seeded run.
    Run {
        /// The seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        shape: Shape,
        /// Print every delivered message.
        #[arg(long)]
        trace: bool,
    },
    /// Many seeds in a row.
    Seeds {
        /// First seed.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// How many.
        #[arg(long, default_value_t = 200)]
        count: u64,
        #[command(flatten)]
        shape: Shape,
    },
}

#[derive(Args, Clone)]
struct Shape {
    /// Municipalities (0: all 1,741).
    #[arg(long, default_value_t = 12)]
    municipalities: usize,
    /// Population and volume factor (1: Japan).
    #[arg(long, default_value_t = 0.0001)]
    scale: f64,
    /// Doses in the day at scale 1 (Japan's peak day: 1.7 M; CoWIN's record: 25 M).
    #[arg(long, default_value_t = 1_700_000.0)]
    doses: f64,
    /// Length of the workload, virtual minutes.
    #[arg(long, default_value_t = 480)]
    day_minutes: u64,
    /// No faults: a healthy federation (for speed figures).
    #[arg(long)]
    no_faults: bool,
    /// Move-outs per month, as a share of the population.
    #[arg(long, default_value_t = 0.004)]
    relocation_per_month: f64,
    /// Share of people whose coupon is reissued before they come.
    #[arg(long, default_value_t = 0.002)]
    reissue_rate: f64,
    /// Share of recorded doses voided later.
    #[arg(long, default_value_t = 0.005)]
    void_rate: f64,
    /// Share of newcomers the register extract lists first whose birth date there differs
    /// from their old record (the handoff is sent back, corrected and sent again).
    #[arg(long, default_value_t = 0.05)]
    birth_date_differs: f64,
    /// The CI mix (`Config::stress`): 12 municipalities, 2 hours, frequent rare events.
    #[arg(long)]
    stress: bool,
    /// A deliberate bug, to watch the invariants catch it.
    #[arg(long, value_enum)]
    bug: Option<simulations::Bug>,
    /// Everything on one thread (by default a second thread builds residents' pre-day
    /// state ahead; the run and its digest are the same either way).
    #[arg(long)]
    one_core: bool,
}

impl Shape {
    fn config(&self, seed: u64) -> Config {
        if self.stress {
            return Config { bug: self.bug, prebuild: !self.one_core, ..Config::stress(seed) };
        }
        Config {
            seed,
            municipalities: self.municipalities,
            scale: self.scale,
            doses: self.doses,
            faults: !self.no_faults,
            day_ms: self.day_minutes * 60_000,
            relocation_per_month: self.relocation_per_month,
            reissue_rate: self.reissue_rate,
            void_rate: self.void_rate,
            birth_date_differs: self.birth_date_differs,
            bug: self.bug,
            prebuild: !self.one_core,
            ..Config::default()
        }
    }
}

fn print(report: &Report) {
    let c = &report.counters;
    println!("シード / seed {}  ダイジェスト / digest {}", report.config.seed, report.digest);
    println!(
        "  自治体 {} / municipalities, 端末 {} / terminals; {} doses acknowledged ({} away, {} refused at the terminal), {} voids, {} reissues, {} relocations ({} accepted, {} second moves, {} doses passed on again)",
        report.municipalities,
        report.terminals,
        c.acknowledged,
        c.away,
        c.refused_at_terminal,
        c.voids,
        c.reissues,
        c.relocations,
        c.accepted,
        c.moved_again,
        c.passed_on_again
    );
    println!(
        "  住民票抽出 / register extract: {} movers registered before their history arrived ({} histories joined; {} given a dose here first, {} doses renumbered, {} voids numbering later doses down, {} next-dose coupons issued at a void), {} provisional atena numbers replaced",
        c.registered_first,
        c.joined,
        c.vaccinated_again,
        c.renumbered,
        c.voids_renumbering,
        c.issued_after_void,
        c.reregistered
    );
    println!(
        "  転入の照会 / newcomer requests: {} histories asked for by the register extract, {} residents handed over on request, {} asked again after a birth date was corrected",
        c.asked, c.handed_on_request, c.asked_again
    );
    println!(
        "  差し戻し / sent back: {} registered with another birth date, {} handoffs sent back, {} taken back and handed over again",
        c.birth_dates_differ, c.sent_back, c.taken_back
    );
    println!(
        "  障害 / faults: {} crashes, {} partitions, {} messages lost, {} duplicated",
        c.crashes, c.partitions, c.lost, c.duplicated
    );
    println!(
        "  {:.1} s wall ({:.1} s checks), {:.0} simulated doses/s, converged {} after healing, {} messages, {:.0} bytes per dose",
        report.wall_seconds,
        report.check_seconds,
        report.doses_per_second(),
        report
            .convergence_ms
            .map_or("NOT".to_owned(), |ms| format!("in {:.1} s (virtual)", ms as f64 / 1000.0)),
        c.messages,
        report.bytes_per_dose()
    );
    if let Some((drawn, ready)) = report.built_ahead {
        println!(
            "  先行構築 / built ahead on the second core: {ready} of {drawn} residents ({:.1} %)",
            100.0 * ready as f64 / drawn.max(1) as f64
        );
    }
    let kinds: Vec<String> = c
        .by_kind
        .iter()
        .map(|(kind, (n, bytes))| format!("{kind} {n} ({:.1} MB)", *bytes as f64 / 1e6))
        .collect();
    println!("  通信 / messages: {}", kinds.join(", "));
}

fn fail(report: &Report) {
    println!("失敗 / FAILED seed {}:", report.config.seed);
    for violation in report.violations.iter().take(20) {
        println!("  - {violation}");
    }
    if report.violations.len() > 20 {
        println!("  … and {} more", report.violations.len() - 20);
    }
    println!("再現 / replay: {}", report.config.replay_command());
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { seed, shape, trace } => {
            let mut config = shape.config(seed);
            config.trace = trace;
            let report = run(config);
            print(&report);
            if !report.violations.is_empty() {
                fail(&report);
                std::process::exit(1);
            }
            println!("全不変条件を満たす / all invariants hold");
        }
        Command::Seeds { from, count, shape } => {
            let mut failed = 0;
            for seed in from..from + count {
                let report = run(shape.config(seed));
                if report.violations.is_empty() {
                    println!(
                        "seed {seed}: ok, {} doses, converged in {:.1} s, digest {}",
                        report.counters.acknowledged,
                        report.convergence_ms.unwrap_or(0) as f64 / 1000.0,
                        &report.digest[..16]
                    );
                } else {
                    failed += 1;
                    fail(&report);
                }
            }
            println!("{} / {count} シード合格 / seeds passed", count - failed);
            if failed > 0 {
                std::process::exit(1);
            }
        }
    }
}
