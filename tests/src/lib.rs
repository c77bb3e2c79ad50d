//! Harness for end-to-end tests and benchmarks: builds and starts real `vrs-node`
//! processes, talks to them over HTTP, kills them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The `vrs-node` binary of this workspace, built once per test process with the same
/// profile as the tests — or the one `VRS_NODE` names, to measure another build against this
/// one with the same benchmark.
pub fn vrs_node() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(binary) = std::env::var_os("VRS_NODE").filter(|b| !b.is_empty()) {
            return PathBuf::from(binary);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // A test runs as target/<profile>/deps/<test>, a binary as target/<profile>/<bin>.
        let mut profile_dir = exe.parent().expect("executable directory").to_owned();
        if profile_dir.ends_with("deps") {
            profile_dir.pop();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "node", "--bin", "vrs-node"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build runs");
        assert!(status.success(), "building vrs-node failed");
        profile_dir.join("vrs-node")
    })
}

/// Waits until `child` has exited by itself (then forgets it); `false` after `within`.
pub fn wait_exit(child: &mut Option<Child>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match child.as_mut().map(Child::try_wait) {
            None | Some(Ok(Some(_))) | Some(Err(_)) => {
                *child = None;
                return true;
            }
            Some(Ok(None)) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

/// A fresh directory under the system temp directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Makes one.
    pub fn new(label: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("vrs-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port for a process to listen on later. It is taken from 20000–32767,
/// below Linux's ephemeral range (32768–60999): a port the kernel hands out for binding to
/// port 0 is also what outgoing connections use, so one chosen that way can be taken by a
/// dial (libp2p, HTTP clients) before the process that should listen on it starts. Each
/// port is handed out once per test process, and only if it can be bound now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread runs of the test process apart so that leftovers of an earlier run are missed.
    let start = 20_000 + (std::process::id() % 1_000) * 12;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(20_000 + (start - 20_000 + offset) % 12_768).expect("port below 32768");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
        assert!(offset < 12_768, "no free port in 20000–32767");
    }
}

/// A node's data directory and, while running, its process.
pub struct Node {
    /// Data directory.
    pub data: PathBuf,
    /// Admin token printed by `init`.
    pub token: String,
    /// `127.0.0.1:port`.
    pub address: String,
    /// `https` (the default) or `http` (`--plain-http`).
    pub scheme: &'static str,
    /// Extra environment for `run` (e.g. `VRS_CRASH_AT`).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    agent: ureq::Agent,
}

impl Node {
    /// `vrs-node init` for a municipality in `dir/node`, served over HTTPS with the
    /// self-signed certificate `init` makes (the client trusts exactly that certificate).
    pub fn init(dir: &Path, municipality: &str) -> anyhow::Result<Self> {
        Self::init_with(dir, municipality, &[])
    }

    /// `init` with extra arguments (`--plain-http` serves plain HTTP on loopback).
    pub fn init_with(dir: &Path, municipality: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let data = dir.join("node");
        let address = format!("127.0.0.1:{}", free_port());
        let mut init = Command::new(vrs_node());
        init.arg("init");
        if !extra.contains(&"--role") {
            init.args(["--role", "municipal"]);
        }
        let output = init
            .args(["--municipality", municipality, "--listen", &address, "--data"])
            .arg(&data)
            .args(extra)
            .output()?;
        if !output.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let stdout = String::from_utf8(output.stdout)?;
        let token = stdout
            .lines()
            .find(|l| l.starts_with("vrs_"))
            .context("init printed no token")?
            .trim()
            .to_owned();
        let plain = extra.contains(&"--plain-http");
        let scheme = if plain { "http" } else { "https" };
        let cert = data.join("keys/tls-cert.pem");
        let agent = agent_trusting((!plain).then_some(cert.as_path()))?;
        Ok(Self { data, token, address, scheme, env: Vec::new(), child: None, agent })
    }

    /// `scheme://address/path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.address)
    }

    /// The HTTP client this node's tests use.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// Runs a CLI subcommand against this node's data directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(vrs_node()).args(args).env("VRS_DATA", &self.data).output().expect("vrs-node runs")
    }

    /// Starts `vrs-node run` and waits until it answers.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let child = Command::new(vrs_node())
            .args(["run", "--data"])
            .arg(&self.data)
            .env("VRS_LOG", std::env::var("VRS_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(response) = self.agent.get(self.url("/healthz")).call()
                && response.status() == 200
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("vrs-node run exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("vrs-node did not answer within 30 s")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the process has exited by itself (a crash point); `false` after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        wait_exit(&mut self.child, within)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            let status = child.wait()?;
            if !status.success() {
                bail!("vrs-node exited with {status}");
            }
        }
        Ok(())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// GET with the admin token.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()?;
        read(response)
    }

    /// POST JSON with the admin token.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.post_with(path, body, Some(&self.token), None)
    }

    /// POST JSON with a chosen token and Accept-Language.
    pub fn post_with(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
        language: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.agent.post(self.url(path));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(language) = language {
            request = request.header("Accept-Language", language);
        }
        read(request.send_json(body)?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A client that answers every status (no error for 4xx) and trusts `cert` (PEM) if given.
pub fn agent_trusting(cert: Option<&Path>) -> anyhow::Result<ureq::Agent> {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)));
    if let Some(cert) = cert {
        let pem = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
        let root = ureq::tls::Certificate::from_pem(&pem)?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![root])))
            .build();
        config = config.tls_config(tls);
    }
    Ok(config.build().new_agent())
}

/// Reads an answer: status and JSON (or the text as a JSON string).
pub fn read(response: ureq::http::Response<ureq::Body>) -> anyhow::Result<(u16, Value)> {
    let status = response.status().as_u16();
    let text = response.into_body().read_to_string()?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

/// A row of the print-shop file.
#[derive(Debug, Clone)]
pub struct PrintedCoupon {
    /// 18 digits.
    pub code: String,
    /// Dose round.
    pub dose: u8,
    /// 宛名番号
    pub atena_number: String,
    /// 氏名
    pub name: String,
    /// 生年月日 (YYYY-MM-DD)
    pub birth_date: String,
    /// What the coupon's QR holds.
    pub qr_text: String,
}

/// Reads `coupons.csv` written by `vrs-node coupons export`.
pub fn read_print_shop(path: &Path) -> anyhow::Result<Vec<PrintedCoupon>> {
    let text = std::fs::read_to_string(path)?;
    let text = text.strip_prefix('\u{feff}').context("coupons.csv starts with a UTF-8 BOM")?;
    let mut coupons = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 10 {
            bail!("coupons.csv line {}: {} fields", i + 1, fields.len());
        }
        coupons.push(PrintedCoupon {
            code: fields[0].to_owned(),
            dose: fields[1].parse()?,
            atena_number: fields[3].to_owned(),
            name: fields[4].to_owned(),
            birth_date: fields[6].to_owned(),
            qr_text: fields[8].to_owned(),
        });
    }
    Ok(coupons)
}

/// Writes a resident register extract in Shift_JIS (CP932).
pub fn write_shift_jis(path: &Path, text: &str) -> anyhow::Result<()> {
    let (bytes, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
    if unmappable {
        bail!("text not representable in Shift_JIS");
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

/// A TCP proxy on loopback that can cut the link: the partition of the end-to-end tests.
/// While blocked it closes every open connection and drops new ones at once.
pub struct Proxy {
    /// The port it listens on.
    pub port: u16,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Starts forwarding `127.0.0.1:port` (a new port) to `target`.
    pub fn start(target: std::net::SocketAddr) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let blocked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (blocked_in, open_in) = (blocked.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if blocked_in.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let pipes =
                    [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())];
                if let Ok(mut open) = open_in.lock() {
                    open.extend(client.try_clone());
                    open.extend(server.try_clone());
                }
                for pipe in pipes {
                    if let (Ok(mut from), Ok(mut to)) = pipe {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Ok(Self { port, blocked, open })
    }

    /// Cuts the link: open connections are closed, new ones refused.
    pub fn block(&self) {
        self.blocked.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut open) = self.open.lock() {
            for stream in open.drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Heals the link.
    pub fn heal(&self) {
        self.blocked.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
