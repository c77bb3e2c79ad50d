//! `vrs-bench`: benchmarks that drive real `vrs-node` processes and print figures.
//!
//! ```text
//! cargo run --release -p tests --bin vrs-bench -- import  --residents 1000000 [--keep DIR]
//! cargo run --release -p tests --bin vrs-bench -- capture --data DIR --clients 64 --captures 50000 [--threads]
//! cargo run --release -p tests --bin vrs-bench -- http-floor --data DIR --clients 64 --requests 100000 [--threads]
//! cargo run --release -p tests --bin vrs-bench -- standby --residents 100000
//! cargo run --release -p tests --bin vrs-bench -- terminal --captures 500 [--national]
//! cargo run --release -p tests --bin vrs-bench -- national --days 365
//! cargo run --release -p tests --bin vrs-bench -- handoff --count 10000 [--clients 64] [--rate 250]
//! ```
//!
//! Results and the commands are recorded in docs/benchmarks.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tests::{free_port, read_print_shop, vrs_node};

/// Yokohama's population, the largest municipality.
const YOKOHAMA_RESIDENTS: f64 = 3_770_000.0;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let driver = if args.iter().any(|a| a == "--threads") { Driver::Threads } else { Driver::Async };
    match args.first().map(String::as_str) {
        Some("import") => {
            let residents: u64 = flag("--residents").unwrap_or_else(|| "1000000".into()).parse()?;
            let one_pass = args.iter().any(|a| a == "--one-pass");
            bench_import(residents, flag("--keep").map(PathBuf::from), one_pass)
        }
        Some("capture") => {
            let data =
                PathBuf::from(flag("--data").context("--data DIR (a node made by `import --keep DIR`)")?);
            let clients: usize = flag("--clients").unwrap_or_else(|| "64".into()).parse()?;
            let captures: usize = flag("--captures").unwrap_or_else(|| "50000".into()).parse()?;
            bench_capture(&data, clients, captures, driver)
        }
        Some("http-floor") => {
            let data =
                PathBuf::from(flag("--data").context("--data DIR (a node made by `import --keep DIR`)")?);
            let clients: usize = flag("--clients").unwrap_or_else(|| "64".into()).parse()?;
            let requests: usize = flag("--requests").unwrap_or_else(|| "100000".into()).parse()?;
            bench_http_floor(&data, clients, requests, driver)
        }
        Some("standby") => {
            let residents: u64 = flag("--residents").unwrap_or_else(|| "100000".into()).parse()?;
            bench_standby(residents)
        }
        Some("terminal") => {
            let captures: usize = flag("--captures").unwrap_or_else(|| "500".into()).parse()?;
            bench_terminal(captures, args.iter().any(|a| a == "--national"))
        }
        Some("national") => {
            let days: u32 = flag("--days").unwrap_or_else(|| "365".into()).parse()?;
            let senders: usize = flag("--senders").unwrap_or_else(|| "64".into()).parse()?;
            bench_national(days, senders)
        }
        Some("handoff") => {
            let count: usize = flag("--count").unwrap_or_else(|| "10000".into()).parse()?;
            let clients: usize = flag("--clients").unwrap_or_else(|| "64".into()).parse()?;
            let rate: Option<f64> = flag("--rate").map(|r| r.parse()).transpose()?;
            bench_handoff(count, clients, rate)
        }
        Some("fsync") => {
            let dir = std::env::temp_dir();
            let (rate, p50) = fdatasync_rate(&dir, Duration::from_secs(3))?;
            println!("fdatasync (4 KiB write + fdatasync) in {}: {rate:.0}/s, p50 {p50:?}", dir.display());
            Ok(())
        }
        _ => bail!(
            "usage: vrs-bench import --residents N [--keep DIR] | capture --data DIR [--clients N] [--captures N] [--threads] | http-floor --data DIR [--clients N] [--requests N] [--threads] | standby [--residents N] | terminal [--captures N] [--national] | national [--days N] [--senders N] | handoff [--count N] [--clients N] [--rate PER_S] | fsync"
        ),
    }
}

/// Runs a command, sampling its peak resident set size (VmHWM). Returns (elapsed, peak bytes, stdout).
fn run_measured(command: &mut Command) -> anyhow::Result<(Duration, u64, String)> {
    let start = Instant::now();
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    let pid = child.id();
    let mut peak = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak = peak.max(kb * 1024);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    let elapsed = start.elapsed();
    if !output.status.success() {
        bail!("{command:?} failed");
    }
    Ok((elapsed, peak, String::from_utf8_lossy(&output.stdout).into_owned()))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Import and issuance of `residents`: two commands (unless `one_pass`), then the one-pass
/// initial load; at Yokohama's size the figure is measured, below it extrapolated.
fn bench_import(residents: u64, keep: Option<PathBuf>, one_pass: bool) -> anyhow::Result<()> {
    let dir = keep
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vrs-bench-import-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let csv = dir.join("residents-sjis.csv");
    let binary = vrs_node();
    println!("vrs-bench import: {residents} residents, binary {}", binary.display());
    let status = Command::new(binary)
        .args([
            "generate",
            "--residents",
            &residents.to_string(),
            "--seed",
            "42",
            "--encoding",
            "shift-jis",
            "--out",
        ])
        .arg(&csv)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "generate failed");
    println!("input: {:.1} MiB Shift_JIS CSV", mib(std::fs::metadata(&csv)?.len()));
    let rate = |d: Duration| residents as f64 / d.as_secs_f64();
    let how = if residents as f64 >= YOKOHAMA_RESIDENTS { "measured" } else { "extrapolated linearly" };
    let summary = |label: &str, total: Duration, rss: u64| {
        let extrapolated = YOKOHAMA_RESIDENTS / rate(total);
        println!(
            "{label} Yokohama (3.77 M) {how}: {extrapolated:.0} s = {:.1} min (target ≤ 5 min: ratio {:.2}×); peak RSS {:.1} MiB (target ≤ 2048 MiB)",
            extrapolated / 60.0,
            extrapolated / 300.0,
            mib(rss)
        );
    };
    let init = |data: &Path| -> anyhow::Result<String> {
        let listen = format!("127.0.0.1:{}", free_port());
        let output = Command::new(binary)
            .args(["init", "--municipality", "141003", "--plain-http", "--listen", &listen, "--data"])
            .arg(data)
            .output()?;
        anyhow::ensure!(output.status.success(), "init failed");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        Ok(stdout.lines().find(|l| l.starts_with("vrs_")).unwrap_or("").to_owned())
    };

    // Two commands, as for a later extract: import, then issuance over every document.
    if !one_pass {
        bench_separate(binary, &dir, &csv, residents, &init, &summary)?;
    }

    // The initial load: one pass that imports and issues (`import --issue-coupons`).
    let data = dir.join("node");
    let token = init(&data)?;
    std::fs::write(dir.join("admin-token"), token)?;
    let (time, rss, out) = run_measured(
        Command::new(binary).args(["import", "--issue-coupons", "--data"]).arg(&data).arg(&csv),
    )?;
    println!(
        "[one pass] import --issue-coupons: {:>7.1} s {:>8.0} residents/s  peak RSS {:>7.1} MiB  ({})",
        time.as_secs_f64(),
        rate(time),
        mib(rss),
        out.lines().last().unwrap_or("").trim()
    );
    summary("[one pass]", time, rss);
    let store_bytes = std::fs::metadata(data.join("store.redb"))?.len();
    println!(
        "store.redb: {:.1} MiB ({:.0} B/resident)",
        mib(store_bytes),
        store_bytes as f64 / residents as f64
    );
    if keep.is_none() {
        std::fs::remove_dir_all(&dir)?;
    } else {
        println!("kept {} for `vrs-bench capture --data {}`", dir.display(), dir.display());
    }
    Ok(())
}

/// `import`, then `coupons issue`, on a node of its own.
fn bench_separate(
    binary: &Path,
    dir: &Path,
    csv: &Path,
    residents: u64,
    init: &dyn Fn(&Path) -> anyhow::Result<String>,
    summary: &dyn Fn(&str, Duration, u64),
) -> anyhow::Result<()> {
    let rate = |d: Duration| residents as f64 / d.as_secs_f64();
    let separate = dir.join("node-separate");
    init(&separate)?;
    let (import_time, import_rss, _) =
        run_measured(Command::new(binary).args(["import", "--data"]).arg(&separate).arg(csv))?;
    let (issue_time, issue_rss, issue_out) =
        run_measured(Command::new(binary).args(["coupons", "issue", "--data"]).arg(&separate))?;
    let total = import_time + issue_time;
    println!(
        "[separate] import:   {:>7.1} s {:>8.0} residents/s  peak RSS {:>7.1} MiB",
        import_time.as_secs_f64(),
        rate(import_time),
        mib(import_rss)
    );
    println!(
        "[separate] issuance: {:>7.1} s {:>8.0} residents/s  peak RSS {:>7.1} MiB  ({})",
        issue_time.as_secs_f64(),
        rate(issue_time),
        mib(issue_rss),
        issue_out.trim()
    );
    println!("[separate] together: {:>7.1} s {:>8.0} residents/s", total.as_secs_f64(), rate(total));
    summary("[separate]", total, import_rss.max(issue_rss));
    std::fs::remove_dir_all(&separate)?;
    Ok(())
}

/// The disk's own limit: 4 KiB write + fdatasync in a loop.
fn fdatasync_rate(dir: &Path, duration: Duration) -> anyhow::Result<(f64, Duration)> {
    let path = dir.join(format!("vrs-bench-fsync-{}", std::process::id()));
    let mut file = std::fs::File::create(&path)?;
    let block = vec![0xabu8; 4096];
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        latencies.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    latencies.sort();
    Ok((latencies.len() as f64 / start.elapsed().as_secs_f64(), latencies[latencies.len() / 2]))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn bench_capture(dir: &Path, clients: usize, captures: usize, driver: Driver) -> anyhow::Result<()> {
    let binary = vrs_node();
    let data = dir.join("node");
    let token = std::fs::read_to_string(dir.join("admin-token"))?.trim().to_owned();
    let print = dir.join("print-shop");
    if !print.join("coupons.csv").exists() {
        let status = Command::new(binary)
            .args(["coupons", "export", "--no-qr-images", "--data"])
            .arg(&data)
            .args(["--out"])
            .arg(&print)
            .status()?;
        anyhow::ensure!(status.success(), "export failed");
    }
    let coupons = read_print_shop(&print.join("coupons.csv"))?;
    let today = time::OffsetDateTime::now_utc().to_offset(time::UtcOffset::from_hms(9, 0, 0)?).date();
    let adult_cutoff = (today - time::Duration::days(365 * 13)).to_string();
    let expiry = (today + time::Duration::days(365)).to_string();
    let lot = Command::new(binary)
        .args(["lots", "add", "--lot", "BENCH1", "--gtin", "04987000001014", "--expiry", &expiry, "--data"])
        .arg(&data)
        .output()?;
    anyhow::ensure!(lot.status.success(), "lots add failed");
    // Coupons not yet used by an earlier run, adults only, in a shuffled order so that
    // the documents touched are spread over the whole store (no cache locality). The order
    // is a fixed shuffle of every coupon and the marker is a position in it, so that who
    // counts as an adult (which moves with the date) does not change what was used before.
    let used_marker = dir.join("captured-upto");
    let skip: usize =
        std::fs::read_to_string(&used_marker).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let mut order: Vec<usize> = (0..coupons.len()).collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        order.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    let mut queue = Vec::with_capacity(captures);
    let mut position = skip;
    while queue.len() < captures && position < order.len() {
        let coupon = &coupons[order[position]];
        if coupon.birth_date < adult_cutoff {
            queue.push(coupon.qr_text.clone());
        }
        position += 1;
    }
    anyhow::ensure!(queue.len() == captures, "only {} unused coupons left", queue.len());
    std::fs::write(&used_marker, position.to_string())?;

    let residents = {
        let out = Command::new(binary).args(["status", "--data"]).arg(&data).output()?;
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (sync_rate, sync_p50) = fdatasync_rate(&data, Duration::from_secs(2))?;

    // Each body is made before the clock starts, as pgbench prepares its script.
    let requests: Vec<LoadRequest> = queue
        .iter()
        .map(|qr| LoadRequest {
            method: hyper::Method::POST,
            path: "/api/v1/captures",
            body:
                json!({"coupon": qr, "vial": "]d2010498700000101417301231\u{1d}10BENCH1", "venue": "bench"})
                    .to_string()
                    .into(),
        })
        .collect();
    let (mut server, listen) = serve_for_clients(binary, &data)?;
    let driven = drive(driver, &listen, &token, clients, requests, 201, server.id());
    let _ = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    let _ = server.wait();
    let driven = driven?;
    for refusal in driven.refusals.iter().take(3) {
        eprintln!("refused: {refusal}");
    }
    let driven_refused = driven.refusals.len();
    let Driven { mut latencies, elapsed, node_cpu, clients_cpu: bench_cpu, .. } = driven;
    latencies.sort();
    anyhow::ensure!(!latencies.is_empty(), "no capture succeeded");
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    println!("node: {residents}");
    println!(
        "clients: {clients} ({}), captures acknowledged: {}, refused/failed: {}",
        driver.describe(clients),
        latencies.len(),
        driven_refused
    );
    println!("durable captures/s: {rate:.0} (target ≥ 5,000: ratio {:.2}×)", rate / 5000.0);
    println!(
        "latency p50 {:.1} ms, p99 {:.1} ms (target p99 ≤ 50 ms), max {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    );
    println!(
        "disk: 4 KiB write + fdatasync {sync_rate:.0}/s (p50 {:.0} µs): captures/s ÷ fdatasyncs/s = {:.1}",
        sync_p50.as_secs_f64() * 1e6,
        rate / sync_rate
    );
    // CPU time per capture varies less between runs on a shared machine than the rate does.
    let per = |seconds: f64| seconds / latencies.len() as f64 * 1e6;
    println!(
        "CPU per capture: node {:.0} µs (user+system, {:.2} cores), the {clients} clients {:.0} µs; 2 cores ÷ (node + clients) = {:.0} captures/s",
        per(node_cpu),
        node_cpu / elapsed.as_secs_f64(),
        per(bench_cpu),
        2e6 / (per(node_cpu) + per(bench_cpu))
    );
    Ok(())
}

/// What the node's HTTP side costs with nothing behind it: the same 64 keep-alive clients
/// as `capture`, asking for `/api/v1/auth/me` (a bearer token checked against the store,
/// nothing written; public routes such as `/healthz` are rate-limited per address). The
/// node's CPU per request here is a floor under any capture, which also parses a body,
/// checks a signature, reads a document and commits.
fn bench_http_floor(dir: &Path, clients: usize, requests: usize, driver: Driver) -> anyhow::Result<()> {
    let data = dir.join("node");
    let token = std::fs::read_to_string(dir.join("admin-token"))?.trim().to_owned();
    let requests: Vec<LoadRequest> = (0..requests)
        .map(|_| LoadRequest {
            method: hyper::Method::GET,
            path: "/api/v1/auth/me",
            body: hyper::body::Bytes::new(),
        })
        .collect();
    let (mut server, listen) = serve_for_clients(vrs_node(), &data)?;
    let driven = drive(driver, &listen, &token, clients, requests, 200, server.id());
    let _ = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    let _ = server.wait();
    let Driven { mut latencies, refusals, elapsed, node_cpu, clients_cpu: bench_cpu } = driven?;
    anyhow::ensure!(refusals.is_empty(), "refused: {:?}", refusals.first());
    latencies.sort();
    let n = latencies.len() as f64;
    println!(
        "GET /api/v1/auth/me: {n:.0} requests from {clients} clients ({}), {:.0}/s, p50 {:.2} ms, p99 {:.2} ms; CPU per request: node {:.0} µs ({:.2} cores), clients {:.0} µs",
        driver.describe(clients),
        n / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        node_cpu / n * 1e6,
        node_cpu / elapsed.as_secs_f64(),
        bench_cpu / n * 1e6,
    );
    Ok(())
}

/// Starts `vrs-node run` on `data` at a free loopback port and waits until it answers.
fn serve_for_clients(binary: &Path, data: &Path) -> anyhow::Result<(std::process::Child, String)> {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(binary)
        .args(["run", "--listen", &listen, "--data"])
        .arg(data)
        .env("VRS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.get(format!("http://{listen}/healthz")).call().is_err() {
        if Instant::now() >= deadline {
            let _ = server.kill();
            bail!("node did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((server, listen))
}

/// How the benchmark's clients are run.
#[derive(Clone, Copy, Debug)]
enum Driver {
    /// Each client a task on a Tokio runtime of two threads, with its own hyper connection:
    /// what pgbench does with `-c 64 -j 2` (64 connections, two threads).
    Async,
    /// Each client an OS thread blocking on its own `ureq` connection (the benchmark's
    /// clients until the fourteenth session; `--threads`).
    Threads,
}

impl Driver {
    fn describe(self, clients: usize) -> String {
        match self {
            Driver::Async => {
                format!("{clients} keep-alive connections on two client threads, as pgbench -j 2")
            }
            Driver::Threads => "one blocking ureq thread per client".to_owned(),
        }
    }
}

/// One request of a load run; its body is made before the clock starts.
struct LoadRequest {
    method: hyper::Method,
    path: &'static str,
    body: hyper::body::Bytes,
}

/// What a load run measured.
struct Driven {
    /// Latency of each answer with the expected status.
    latencies: Vec<Duration>,
    /// Every other answer or error, as `status body` or the error.
    refusals: Vec<String>,
    /// From the first request sent to the last answer.
    elapsed: Duration,
    /// CPU seconds (user + system) the node and this process spent meanwhile.
    node_cpu: f64,
    clients_cpu: f64,
}

/// Sends `requests` from `clients` concurrent keep-alive connections, each client taking the
/// next request when its answer is in, and measures each answer and both sides' CPU.
fn drive(
    driver: Driver,
    listen: &str,
    token: &str,
    clients: usize,
    requests: Vec<LoadRequest>,
    expect: u16,
    node_pid: u32,
) -> anyhow::Result<Driven> {
    let node_stat = format!("/proc/{node_pid}/stat");
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let bearer = format!("Bearer {token}");
    type ClientResult = anyhow::Result<(Vec<Duration>, Vec<String>)>;
    let (results, elapsed, node_cpu, clients_cpu): (Vec<ClientResult>, _, _, _) = match driver {
        Driver::Async => {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async {
                let mut senders = Vec::with_capacity(clients);
                for _ in 0..clients {
                    let stream = tokio::net::TcpStream::connect(listen).await?;
                    stream.set_nodelay(true)?;
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
                    tokio::spawn(connection);
                    senders.push(sender);
                }
                let (node_before, clients_before) = (cpu_seconds(&node_stat), cpu_seconds("/proc/self/stat"));
                let start = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for mut sender in senders {
                    let (requests, next, bearer, host) =
                        (requests.clone(), next.clone(), bearer.clone(), listen.to_owned());
                    tasks.spawn(async move {
                        let (mut latencies, mut refusals) = (Vec::new(), Vec::new());
                        while let Some(load) = requests.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let request = hyper::Request::builder()
                                .method(load.method.clone())
                                .uri(load.path)
                                .header(hyper::header::HOST, &host)
                                .header(hyper::header::AUTHORIZATION, &bearer)
                                .header(hyper::header::CONTENT_TYPE, "application/json")
                                .body(http_body_util::Full::new(load.body.clone()))?;
                            let sent = Instant::now();
                            let response = sender.send_request(request).await?;
                            let status = response.status().as_u16();
                            let body =
                                http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
                            match status == expect {
                                true => latencies.push(sent.elapsed()),
                                false => {
                                    refusals.push(format!("{status} {}", String::from_utf8_lossy(&body)))
                                }
                            }
                        }
                        anyhow::Ok((latencies, refusals))
                    });
                }
                let mut results = Vec::with_capacity(clients);
                while let Some(joined) = tasks.join_next().await {
                    results.push(joined.map_err(anyhow::Error::from).and_then(|r| r));
                }
                let elapsed = start.elapsed();
                anyhow::Ok((
                    results,
                    elapsed,
                    cpu_seconds(&node_stat) - node_before,
                    cpu_seconds("/proc/self/stat") - clients_before,
                ))
            })?
        }
        Driver::Threads => {
            // One connection kept per client: ureq's pool keeps only 3 idle connections per
            // host by default, which would open a new TCP connection for most requests.
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .max_idle_connections(clients)
                .max_idle_connections_per_host(clients)
                .build()
                .new_agent();
            let (node_before, clients_before) = (cpu_seconds(&node_stat), cpu_seconds("/proc/self/stat"));
            let start = Instant::now();
            let threads: Vec<_> = (0..clients)
                .map(|_| {
                    let (requests, next, agent, bearer, url) = (
                        requests.clone(),
                        next.clone(),
                        agent.clone(),
                        bearer.clone(),
                        format!("http://{listen}"),
                    );
                    std::thread::spawn(move || -> ClientResult {
                        let (mut latencies, mut refusals) = (Vec::new(), Vec::new());
                        while let Some(load) = requests.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let request = ureq::http::Request::builder()
                                .method(load.method.as_str())
                                .uri(format!("{url}{}", load.path))
                                .header("Authorization", &bearer)
                                .header("Content-Type", "application/json")
                                .body(load.body.to_vec())?;
                            let sent = Instant::now();
                            let response = agent.run(request)?;
                            let status = response.status().as_u16();
                            // Reading the answer to its end returns the connection to the pool.
                            let body = response.into_body().read_to_vec()?;
                            match status == expect {
                                true => latencies.push(sent.elapsed()),
                                false => {
                                    refusals.push(format!("{status} {}", String::from_utf8_lossy(&body)))
                                }
                            }
                        }
                        Ok((latencies, refusals))
                    })
                })
                .collect();
            let results: Vec<ClientResult> = threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked"))))
                .collect();
            let elapsed = start.elapsed();
            (
                results,
                elapsed,
                cpu_seconds(&node_stat) - node_before,
                cpu_seconds("/proc/self/stat") - clients_before,
            )
        }
    };
    let mut driven = Driven { latencies: Vec::new(), refusals: Vec::new(), elapsed, node_cpu, clients_cpu };
    for result in results {
        match result {
            Ok((latencies, refusals)) => {
                driven.latencies.extend(latencies);
                driven.refusals.extend(refusals);
            }
            Err(error) => driven.refusals.push(format!("{error:#}")),
        }
    }
    Ok(driven)
}

/// User + system CPU seconds of the process whose `/proc/…/stat` this is (0 if unreadable).
fn cpu_seconds(stat: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    ticks / clock_ticks_per_second()
}

/// The kernel's clock tick (`getconf CLK_TCK`), 100 on Linux unless told otherwise.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn cli_ok(args: &[&str], data: &Path) -> anyhow::Result<String> {
    let output = Command::new(vrs_node()).args(args).arg("--data").arg(data).output()?;
    anyhow::ensure!(
        output.status.success(),
        "vrs-node {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn field(text: &str, name: &str) -> anyhow::Result<String> {
    text.lines()
        .find_map(|l| l.split_once(name).map(|(_, v)| v.trim().to_owned()))
        .with_context(|| format!("no {name:?} in {text}"))
}

/// A new scratch directory holding a generated register extract (UTF-8) of `residents` rows.
fn scratch_with_population(label: &str, residents: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("vrs-bench-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let csv = dir.join("residents.csv");
    let status = Command::new(vrs_node())
        .args(["generate", "--residents", &residents.to_string(), "--encoding", "utf8", "--out"])
        .arg(&csv)
        .status()?;
    anyhow::ensure!(status.success(), "generate failed");
    Ok((dir, csv))
}

/// A fresh standby catches up with a primary over libp2p on loopback.
fn bench_standby(residents: u64) -> anyhow::Result<()> {
    let (dir, csv) = scratch_with_population("standby", residents)?;
    let binary = vrs_node();
    let national = dir.join("national");
    let p2p = |port: u16| format!("/ip4/127.0.0.1/tcp/{port}");
    let national_listen = p2p(free_port());
    let out = cli_ok(&["federation", "init-national", "--p2p-listen", &national_listen], &national)?;
    let national_address = format!("{national_listen}/p2p/{}", field(&out, "peer id:")?);
    let national_key = field(&out, "directory key:")?;
    let mut children =
        vec![Command::new(binary).args(["run", "--data"]).arg(&national).env("VRS_LOG", "warn").spawn()?];
    let node = |name: &str, extra: &[&str]| -> anyhow::Result<(PathBuf, String, String)> {
        let data = dir.join(name);
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["init", "--municipality", "141003", "--plain-http", "--listen", &listen];
        let p2p_listen = p2p(free_port());
        args.extend(["--p2p-listen", &p2p_listen]);
        args.extend(extra);
        let out = cli_ok(&args, &data)?;
        let token = out.lines().find(|l| l.starts_with("vrs_")).context("no token")?.to_owned();
        Ok((data, listen, token))
    };
    let (primary, primary_http, _) = node("primary", &[])?;
    let start = Instant::now();
    cli_ok(&["import", "--issue-coupons", csv.to_str().unwrap_or_default()], &primary)?;
    println!(
        "primary: {residents} residents imported with coupons in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let keys = primary.join("keys");
    let (standby, standby_http, standby_token) =
        node("standby", &["--role", "standby", "--keys-from", keys.to_str().unwrap_or_default()])?;
    for data in [&primary, &standby] {
        let request = data.join("join.json");
        cli_ok(
            &[
                "federation",
                "join",
                "--national",
                &national_address,
                "--national-key",
                &national_key,
                "--out",
                request.to_str().unwrap_or_default(),
            ],
            data,
        )?;
        let output = Command::new(binary)
            .args(["federation", "approve", "--data"])
            .arg(&national)
            .arg(&request)
            .output()?;
        anyhow::ensure!(output.status.success(), "approve failed");
    }
    let sizes = cli_ok(&["status", "--sizes"], &primary)?;
    let saved: u64 = field(&sizes, "document bytes")?.parse()?;
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    children.push(Command::new(binary).args(["run", "--data"]).arg(&primary).env("VRS_LOG", "warn").spawn()?);
    wait_healthy(&agent, &format!("http://{primary_http}/healthz"))?;
    let start = Instant::now();
    children.push(Command::new(binary).args(["run", "--data"]).arg(&standby).env("VRS_LOG", "warn").spawn()?);
    let read_status = || -> Option<serde_json::Value> {
        let response = agent
            .get(format!("http://{standby_http}/api/v1/status"))
            .header("Authorization", format!("Bearer {standby_token}"))
            .call()
            .ok()?;
        response.into_body().read_json().ok()
    };
    let mut first_stored: Option<Instant> = None;
    let caught_up = loop {
        if let Some(status) = read_status() {
            if first_stored.is_none() && status["residents"].as_u64().is_some_and(|n| n > 0) {
                first_stored = Some(Instant::now());
            }
            if status["residents"].as_u64() == Some(residents) {
                break status;
            }
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("the standby did not catch up within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let received = caught_up["replication"]["bytes_received"].as_u64().unwrap_or(0);
    let sent = caught_up["replication"]["bytes_sent"].as_u64().unwrap_or(0);
    let rate = residents as f64 / elapsed.as_secs_f64();
    println!(
        "standby catch-up: {residents} documents in {:.1} s (from process start) = {rate:.0} docs/s (target ≥ 20,000: ratio {:.2}×)",
        elapsed.as_secs_f64(),
        rate / 20_000.0
    );
    if let Some(first) = first_stored {
        let steady = first.elapsed().as_secs_f64();
        println!(
            "  of which from the first stored page to the last: {steady:.1} s; start-up (process, directory, dial, first page) {:.1} s",
            elapsed.as_secs_f64() - steady
        );
    }
    println!(
        "payload received {:.0} B/document, sent {:.0} B/document; stored size {:.0} B/document: received ÷ stored = {:.2} (target ≤ 1.2)",
        received as f64 / residents as f64,
        sent as f64 / residents as f64,
        saved as f64 / residents as f64,
        received as f64 / saved as f64
    );
    // In sync: the standby keeps asking; measure what an idle round costs.
    let before = read_status().context("status")?;
    std::thread::sleep(Duration::from_secs(3));
    let after = read_status().context("status")?;
    let delta = |key: &str| {
        after["replication"][key].as_u64().unwrap_or(0) - before["replication"][key].as_u64().unwrap_or(0)
    };
    let requests = delta("requests").max(1);
    println!(
        "in-sync check (caught up, nothing changed): {} requests in 3 s, {:.0} B payload each way per check, independent of the {residents} documents held",
        requests,
        (delta("bytes_sent") + delta("bytes_received")) as f64 / requests as f64
    );
    for mut child in children {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = child.wait();
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Waits until `url` answers 200.
fn wait_healthy(agent: &ureq::Agent, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent.get(url).call().is_ok_and(|r| r.status() == 200) {
        anyhow::ensure!(Instant::now() < deadline, "{url} did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Scan at a terminal → visible in the owner's document, one capture at a time, everything
/// connected: a municipal node and an enrolled terminal as processes on loopback.
/// A national node on loopback with an analyst token: (data dir, p2p address with peer id,
/// directory key, HTTP address, token).
fn national_node(dir: &Path) -> anyhow::Result<(PathBuf, String, String, String, String)> {
    let data = dir.join("national");
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let out = cli_ok(
        &["federation", "init-national", "--p2p-listen", &listen, "--http-listen", &http, "--plain-http"],
        &data,
    )?;
    let address = format!("{listen}/p2p/{}", field(&out, "peer id:")?);
    let key = field(&out, "directory key:")?;
    let out = cli_ok(&["federation", "token", "--name", "bench", "--role", "national_analyst"], &data)?;
    let token =
        out.split_whitespace().find(|w| w.starts_with("vrs_t_")).context("no national token")?.to_owned();
    Ok((data, address, key, http, token))
}

/// Scans at a terminal one at a time and times each until the owner's node holds it — and,
/// with `national`, until the national node's figures count it.
fn bench_terminal(captures: usize, national: bool) -> anyhow::Result<()> {
    let (dir, csv) = scratch_with_population("terminal", (captures as u64 * 2).max(100))?;
    let binary = vrs_node();
    let node = dir.join("node");
    let node_http = format!("127.0.0.1:{}", free_port());
    let p2p = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let out = cli_ok(
        &["init", "--municipality", "141003", "--plain-http", "--listen", &node_http, "--p2p-listen", &p2p],
        &node,
    )?;
    let node_token = out.lines().find(|l| l.starts_with("vrs_")).context("no token")?.to_owned();
    cli_ok(&["import", "--issue-coupons", csv.to_str().unwrap_or_default()], &node)?;
    let expiry = (time::OffsetDateTime::now_utc().date() + time::Duration::days(180)).to_string();
    cli_ok(&["lots", "add", "--lot", "FA5765", "--gtin", "04987000001014", "--expiry", &expiry], &node)?;
    let print = dir.join("print");
    cli_ok(&["coupons", "export", "--no-qr-images", "--out", print.to_str().unwrap_or_default()], &node)?;
    let coupons = read_print_shop(&print.join("coupons.csv"))?;
    let mut children = Vec::new();
    let national = match national {
        true => {
            let (data, address, key, http, token) = national_node(&dir)?;
            let request = dir.join("join.json");
            let join = ["federation", "join", "--national", &address, "--national-key", &key, "--out"];
            let mut args: Vec<&str> = join.to_vec();
            args.push(request.to_str().unwrap_or_default());
            cli_ok(&args, &node)?;
            cli_ok(&["federation", "approve", request.to_str().unwrap_or_default()], &data)?;
            children.push(
                Command::new(binary).args(["run", "--data"]).arg(&data).env("VRS_LOG", "warn").spawn()?,
            );
            Some((http, token))
        }
        false => None,
    };
    let out = cli_ok(&["terminal", "enrol-token", "--venue", "bench-hall"], &node)?;
    let token = out.lines().find(|l| l.starts_with("vrs_e_")).context("no enrolment token")?.to_owned();
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    children.push(Command::new(binary).args(["run", "--data"]).arg(&node).env("VRS_LOG", "warn").spawn()?);
    wait_healthy(&agent, &format!("http://{node_http}/healthz"))?;
    let today = crate_today();
    let national_total = || -> anyhow::Result<u64> {
        let Some((http, token)) = &national else { return Ok(0) };
        let response = agent
            .get(format!("http://{http}/api/v1/national/totals?from={today}&to={today}"))
            .header("Authorization", format!("Bearer {token}"))
            .call()?;
        let body: serde_json::Value = response.into_body().read_json()?;
        Ok(body["total"].as_u64().unwrap_or(0))
    };
    let terminal = dir.join("terminal");
    let terminal_http = format!("127.0.0.1:{}", free_port());
    let out = cli_ok(
        &[
            "init",
            "--role",
            "terminal",
            "--municipality",
            "141003",
            "--plain-http",
            "--listen",
            &terminal_http,
            "--enroll",
            &token,
        ],
        &terminal,
    )?;
    let terminal_token = out.lines().find(|l| l.starts_with("vrs_t_")).context("no token")?.to_owned();
    children
        .push(Command::new(binary).args(["run", "--data"]).arg(&terminal).env("VRS_LOG", "warn").spawn()?);
    wait_healthy(&agent, &format!("http://{terminal_http}/healthz"))?;
    let dose_events = || -> anyhow::Result<u64> {
        let response = agent
            .get(format!("http://{node_http}/api/v1/status"))
            .header("Authorization", format!("Bearer {node_token}"))
            .call()?;
        let body: serde_json::Value = response.into_body().read_json()?;
        body["dose_events"].as_u64().context("no dose_events")
    };
    // Wait for the terminal's link (its first push of nothing, and its bundle).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = agent
            .get(format!("http://{terminal_http}/api/v1/status"))
            .header("Authorization", format!("Bearer {terminal_token}"))
            .call()?;
        let body: serde_json::Value = response.into_body().read_json()?;
        if body["sync"]["connected"] == true {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the terminal did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    let vial = "]d2010498700000101417301231\u{1d}10FA5765".to_owned();
    let mut acknowledged = Vec::new();
    let mut visible = Vec::new();
    let mut nationally = Vec::new();
    let mut recorded = dose_events()?;
    let mut counted = national_total()?;
    // Adults only: the bench measures delivery, not the refusal of a child's dose.
    for coupon in coupons.iter().filter(|c| c.dose == 1 && c.birth_date.as_str() < "2008").take(captures) {
        let body = json!({"coupon": coupon.qr_text, "vial": vial, "venue": "bench-hall"});
        let start = Instant::now();
        let response = agent
            .post(format!("http://{terminal_http}/api/v1/captures"))
            .header("Authorization", format!("Bearer {terminal_token}"))
            .send_json(&body)?;
        anyhow::ensure!(response.status() == 201, "capture refused: {}", response.status());
        acknowledged.push(start.elapsed());
        loop {
            let now = dose_events()?;
            if now > recorded {
                recorded = now;
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let log = agent
                    .get(format!("http://{terminal_http}/api/v1/terminal/captures"))
                    .header("Authorization", format!("Bearer {terminal_token}"))
                    .call()?
                    .into_body()
                    .read_to_string()?;
                bail!("capture not visible in the owner's document after 30 s; the terminal's log: {log}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        visible.push(start.elapsed());
        if national.is_some() {
            loop {
                let now = national_total()?;
                if now > counted {
                    counted = now;
                    break;
                }
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(30),
                    "not in the national figures after 30 s"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            nationally.push(start.elapsed());
        }
    }
    acknowledged.sort();
    visible.sort();
    nationally.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "terminal → owner, {} captures one at a time: stored at the terminal p50 {:.1} ms p99 {:.1} ms; visible in the owner's document p50 {:.1} ms p99 {:.1} ms (target p99 ≤ 1,000 ms: p99 ÷ target = {:.3})",
        visible.len(),
        ms(percentile(&acknowledged, 0.50)),
        ms(percentile(&acknowledged, 0.99)),
        ms(percentile(&visible, 0.50)),
        ms(percentile(&visible, 0.99)),
        ms(percentile(&visible, 0.99)) / 1000.0
    );
    if national.is_some() {
        println!(
            "terminal → national figures, {} captures: p50 {:.1} ms p99 {:.1} ms (the owner looks for due statistics every 100 ms)",
            nationally.len(),
            ms(percentile(&nationally, 0.50)),
            ms(percentile(&nationally, 0.99)),
        );
    }
    for mut child in children {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = child.wait();
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Today in Japan.
fn crate_today() -> time::Date {
    time::OffsetDateTime::now_utc()
        .to_offset(time::UtcOffset::from_hms(9, 0, 0).unwrap_or(time::UtcOffset::UTC))
        .date()
}

/// One municipality's figures for a day: 12–48 cells of two products, the dose numbers in
/// use that season, every age band and sex, a few given away from home.
fn day_of(
    code: protocol::municipality::MunicipalityCode,
    date: time::Date,
    version: u64,
    rng: &mut node::demo::SplitMix,
) -> protocol::statistics::Statistics {
    use protocol::document::Sex;
    use protocol::statistics::{AgeBand, Cell, daily_from_cells};
    let n = 12 + (rng.next_u64() % 37) as usize;
    let mut cells = std::collections::BTreeMap::new();
    let bands: Vec<AgeBand> = AgeBand::all().collect();
    for _ in 0..n {
        let cell = Cell::Dose {
            date,
            product: if rng.next_u64().is_multiple_of(3) { "spikevax" } else { "comirnaty-30" }.to_owned(),
            dose_number: 1 + (rng.next_u64() % 3) as u8,
            age_band: bands[(rng.next_u64() % bands.len() as u64) as usize],
            sex: if rng.next_u64().is_multiple_of(2) { Sex::Male } else { Sex::Female },
            venue_municipality: code,
        };
        *cells.entry(cell).or_insert(0u64) += 1 + rng.next_u64() % 400;
    }
    let doc = daily_from_cells(
        code,
        date,
        version,
        "2021-06-01T00:00:00Z".into(),
        cells.iter().map(|(c, n)| (c, *n)),
    );
    protocol::statistics::Statistics::Daily(doc)
}

fn bench_national(days: u32, senders: usize) -> anyhow::Result<()> {
    use node::national::{GroupBy, NationalStore, Scope};
    use protocol::directory::{DirectoryEntry, NodeRole};
    use protocol::statistics::{ReportRequest, ReportResponse, SignedStatistics};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    let dir = std::env::temp_dir().join(format!("vrs-bench-national-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let municipalities = protocol::municipality::all_municipalities();
    let rng = ring::rand::SystemRandom::new();
    let mut members = Vec::new();
    for m in municipalities {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("keygen"))?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("key"))?;
        let entry = DirectoryEntry {
            municipality: Some(m.code),
            role: NodeRole::Municipal,
            peer_id: String::new(),
            addresses: Vec::new(),
            coupon_key: protocol::person::hex_lower(key.public_key().as_ref()),
            encryption_key: String::new(),
        };
        members.push((m.code, key, entry));
    }
    let store = Arc::new(NationalStore::open(&dir, None)?);
    let first = time::Date::from_calendar_date(2021, time::Month::February, 17)?;
    let mut day_times = Vec::new();
    let mut documents = 0u64;
    for day in 0..days {
        let date = first + time::Duration::days(i64::from(day));
        // What every municipality sends that day (their work, not timed here).
        let mut rng = node::demo::SplitMix(u64::from(day) * 7919);
        let reports: Vec<(usize, ReportRequest)> = members
            .iter()
            .enumerate()
            .map(|(i, (code, key, _))| {
                let doc = day_of(*code, date, u64::from(day) + 1, &mut rng);
                (
                    i,
                    ReportRequest {
                        statistics: vec![SignedStatistics::sign(&doc, key)],
                        checkpoints: Vec::new(),
                    },
                )
            })
            .collect();
        documents += reports.len() as u64;
        // All 1,741 arrive at once, from `senders` connections in parallel.
        let queue = Arc::new(Mutex::new(reports));
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..senders {
                let (queue, store, members) = (queue.clone(), store.clone(), &members);
                scope.spawn(move || {
                    while let Some((i, request)) = queue.lock().ok().and_then(|mut q| q.pop()) {
                        let response = store.ingest(&members[i].2, &request);
                        assert!(
                            matches!(response, ReportResponse::Stored { statistics: 1, .. }),
                            "{response:?}"
                        );
                    }
                });
            }
        });
        day_times.push(start.elapsed());
        if day % 30 == 0 || day + 1 == days {
            println!(
                "day {day}: {date} ingested in {:.0} ms ({documents} documents held)",
                day_times.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
            );
        }
    }
    let last = first + time::Duration::days(i64::from(days) - 1);
    let mut sorted = day_times.clone();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "ingest: one day of {} municipalities ({} senders, verify + store + totals): median {:.0} ms, p99 {:.0} ms, max {:.0} ms over {days} days (target ≤ 5,000 ms: median ÷ target = {:.3})",
        members.len(),
        senders,
        ms(percentile(&sorted, 0.5)),
        ms(percentile(&sorted, 0.99)),
        ms(*sorted.last().unwrap_or(&Duration::ZERO)),
        ms(percentile(&sorted, 0.5)) / 5000.0
    );
    let all = GroupBy { product: true, dose_number: true, age_band: true, ..GroupBy::default() };
    let by_date = GroupBy { date: true, ..GroupBy::default() };
    let yokohama = protocol::municipality::MunicipalityCode::parse("141003")?;
    type Query<'a> = Box<dyn Fn() -> anyhow::Result<usize> + 'a>;
    let queries: Vec<(&str, Query<'_>)> = vec![
        (
            "national, all days, by product × dose × age band",
            Box::new(|| Ok(store.totals(Scope::National, first, last, all)?.len())),
        ),
        (
            "national, all days, by date",
            Box::new(|| Ok(store.totals(Scope::National, first, last, by_date)?.len())),
        ),
        (
            "prefecture 13, all days, by product × dose × age band",
            Box::new(|| Ok(store.totals(Scope::Prefecture(13), first, last, all)?.len())),
        ),
        (
            "municipality 141003, all days, by product × dose × age band",
            Box::new(|| Ok(store.totals(Scope::Municipality(yokohama), first, last, all)?.len())),
        ),
        (
            "national coverage by age band",
            Box::new(|| Ok(store.coverage(Scope::National, last, true)?.len())),
        ),
        (
            "freshness of all municipalities",
            Box::new(|| Ok(store.freshness(Scope::National, time::Duration::hours(1))?.len())),
        ),
    ];
    for (name, query) in &queries {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..200 {
            let start = Instant::now();
            rows = query()?;
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "query {name}: {rows} rows, p50 {:.2} ms, p99 {:.2} ms (target p99 ≤ 50 ms: p99 ÷ target = {:.3})",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(percentile(&times, 0.99)) / 50.0
        );
    }
    drop(queries);
    let size = std::fs::metadata(dir.join("national.redb"))?.len();
    drop(store);
    let start = Instant::now();
    let reopened = NationalStore::open(&dir, None)?;
    println!(
        "restart: {documents} documents ({:.0} MiB) read back into the totals in {:.1} s",
        mib(size),
        start.elapsed().as_secs_f64()
    );
    drop(reopened);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Relocation at scale: a national node, Yokohama and Chiyoda as processes on loopback, all
/// connected. `clients` admins at Yokohama move `count` residents out at once; each handoff
/// is timed from the move-out request to Chiyoda's acceptance (its `accepted_at`, same
/// machine clock). With `rate`, requests are spread evenly at that many per second (an
/// offered load); without, the clients send as fast as Yokohama answers.
fn bench_handoff(count: usize, clients: usize, rate: Option<f64>) -> anyhow::Result<()> {
    let (dir, csv) = scratch_with_population("handoff", count as u64 + 10)?;
    let binary = vrs_node();
    let (national, address, key, _, _) = national_node(&dir)?;
    let mut children =
        vec![Command::new(binary).args(["run", "--data"]).arg(&national).env("VRS_LOG", "warn").spawn()?];
    let init = |name: &str, code: &str, extra: &[&str]| -> anyhow::Result<(PathBuf, String, String)> {
        let data = dir.join(name);
        let http = format!("127.0.0.1:{}", free_port());
        let p2p = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        let mut args =
            vec!["init", "--municipality", code, "--plain-http", "--listen", &http, "--p2p-listen", &p2p];
        args.extend(extra);
        let out = cli_ok(&args, &data)?;
        let token = out.lines().find(|l| l.starts_with("vrs_")).context("no token")?.to_owned();
        let request = dir.join(format!("{name}-join.json"));
        let join = ["federation", "join", "--national", &address, "--national-key", &key, "--out"];
        let mut args: Vec<&str> = join.to_vec();
        args.push(request.to_str().unwrap_or_default());
        cli_ok(&args, &data)?;
        cli_ok(&["federation", "approve", request.to_str().unwrap_or_default()], &national)?;
        Ok((data, http, token))
    };
    let (a, a_http, a_token) = init("yokohama", "141003", &[])?;
    let secret = a.join("keys/person-key.secret");
    let (b, b_http, b_token) =
        init("chiyoda", "131016", &["--person-key-secret", secret.to_str().unwrap_or_default()])?;
    let started = Instant::now();
    cli_ok(&["import", csv.to_str().unwrap_or_default()], &a)?;
    println!("imported {count} residents into Yokohama in {:.1} s", started.elapsed().as_secs_f64());
    for data in [&a, &b] {
        children.push(Command::new(binary).args(["run", "--data"]).arg(data).env("VRS_LOG", "warn").spawn()?);
    }
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(clients)
        .max_idle_connections_per_host(clients)
        .build()
        .new_agent();
    wait_healthy(&agent, &format!("http://{a_http}/healthz"))?;
    wait_healthy(&agent, &format!("http://{b_http}/healthz"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(a.join("directory.json")).is_ok_and(|t| t.contains("131016")) {
        anyhow::ensure!(Instant::now() < deadline, "Yokohama never received a directory naming Chiyoda");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The residents' ids, before the clock starts.
    let text = std::fs::read_to_string(&csv)?;
    let atenas: Vec<String> = text
        .lines()
        .skip(1)
        .take(count)
        .map(|l| l.split(',').next().unwrap_or_default().to_owned())
        .collect();
    let mut ids = Vec::with_capacity(count);
    for atena in &atenas {
        let response = agent
            .get(format!("http://{a_http}/api/v1/residents?atena={atena}"))
            .header("Authorization", format!("Bearer {a_token}"))
            .call()?;
        let body: serde_json::Value = response.into_body().read_json()?;
        ids.push(body["residents"][0]["resident_id"].as_str().context("resident not found")?.to_owned());
    }
    let next = Arc::new(AtomicUsize::new(0));
    let sent: Arc<Mutex<Vec<(String, time::OffsetDateTime, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    let ids = Arc::new(ids);
    let begin = Instant::now();
    if let Some(rate) = rate {
        println!("offered load: {rate:.0} move-outs/s");
    }
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (next, sent, ids, agent) = (next.clone(), sent.clone(), ids.clone(), agent.clone());
            let (url, token) = (format!("http://{a_http}"), a_token.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { return Ok(()) };
                    if let Some(rate) = rate {
                        let due = begin + Duration::from_secs_f64(i as f64 / rate);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    let at = time::OffsetDateTime::now_utc();
                    let start = Instant::now();
                    let response = agent
                        .post(format!("{url}/api/v1/residents/{id}/move-out"))
                        .header("Authorization", format!("Bearer {token}"))
                        .send_json(json!({"to": "131016", "reason": "転出届"}))?;
                    let status = response.status().as_u16();
                    let body: serde_json::Value = response.into_body().read_json()?;
                    anyhow::ensure!(status == 201, "move-out answered {status}: {body}");
                    let handoff = body["handoff_id"].as_str().context("no handoff id")?.to_owned();
                    sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push((
                        handoff,
                        at,
                        start.elapsed(),
                    ));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let sealing = begin.elapsed();
    println!(
        "sealed {count} handoffs at Yokohama in {:.2} s ({:.0}/s, {clients} clients)",
        sealing.as_secs_f64(),
        count as f64 / sealing.as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(900);
    let accepted: std::collections::HashMap<String, time::OffsetDateTime> = loop {
        let response = agent
            .get(format!("http://{b_http}/api/v1/handoffs"))
            .header("Authorization", format!("Bearer {b_token}"))
            .call()?;
        let body: serde_json::Value = response.into_body().read_json()?;
        let done: std::collections::HashMap<String, time::OffsetDateTime> = body["incoming"]
            .as_array()
            .context("no incoming list")?
            .iter()
            .filter_map(|e| {
                let at = e["accepted_at"].as_str()?;
                let at =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
                Some((e["handoff_id"].as_str()?.to_owned(), at))
            })
            .collect();
        if done.len() >= count {
            break done;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {} of {count} handoffs accepted", done.len());
        std::thread::sleep(Duration::from_millis(1000));
    };
    let sent = sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut end_to_end: Vec<Duration> = Vec::with_capacity(count);
    let mut acknowledged: Vec<Duration> = Vec::with_capacity(count);
    let first = sent.iter().map(|(_, at, _)| *at).min().context("nothing sent")?;
    let mut last = first;
    for (handoff, at, ack) in &sent {
        let done = accepted.get(handoff).with_context(|| format!("{handoff} not accepted"))?;
        last = last.max(*done);
        end_to_end.push(Duration::try_from(*done - *at).unwrap_or_default());
        acknowledged.push(*ack);
    }
    end_to_end.sort();
    acknowledged.sort();
    let span = Duration::try_from(last - first).unwrap_or_default();
    println!(
        "move-out acknowledged at Yokohama: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&acknowledged, 0.50).as_secs_f64() * 1e3,
        percentile(&acknowledged, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "end to end (request at Yokohama → accepted at Chiyoda): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 ≤ 1000 ms: ratio {:.2})",
        percentile(&end_to_end, 0.50).as_secs_f64() * 1e3,
        percentile(&end_to_end, 0.99).as_secs_f64() * 1e3,
        end_to_end.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        percentile(&end_to_end, 0.99).as_secs_f64()
    );
    println!(
        "throughput: {count} handoffs in {:.2} s = {:.0} handoffs/s (target ≥ 200/s: ratio {:.2})",
        span.as_secs_f64(),
        count as f64 / span.as_secs_f64(),
        count as f64 / span.as_secs_f64() / 200.0
    );
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
