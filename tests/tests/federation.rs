//! The federation with real processes on loopback: a national node signs the directory, a
//! primary and its standby join it, the standby pulls every resident document over libp2p
//! (TCP + Noise + Yamux), survives kill -9 mid-replication, refuses writes, and takes over
//! when promoted; a node the national administrator never approved gets nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{Node, TempDir, free_port, vrs_node};

use super::{COMIRNATY, capture, coupon_of, days_from_today, ok, raw_vial, set_up_fixture};

pub(super) struct National {
    pub(super) data: std::path::PathBuf,
    address: String,
    key: String,
    /// The national API (plain HTTP on loopback).
    pub(super) http: String,
    /// Extra environment for `run` (e.g. `VRS_CRASH_AT`).
    pub(super) env: Vec<(String, String)>,
    child: Option<Child>,
}

impl National {
    pub(super) fn init(dir: &std::path::Path) -> Self {
        let data = dir.join("national");
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let out = ok(&Command::new(vrs_node())
            .args([
                "federation",
                "init-national",
                "--p2p-listen",
                &listen,
                "--http-listen",
                &http,
                "--plain-http",
            ])
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap());
        // Every report the national node receives is kept, for the personal-data check.
        let config = data.join("national.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}message_log = \"received.jsonl\"\n")).unwrap();
        let field = |name: &str| {
            out.lines().find_map(|l| l.split_once(name).map(|(_, v)| v.trim().to_owned())).unwrap()
        };
        let address = format!("{listen}/p2p/{}", field("peer id:"));
        let key = field("directory key:");
        National { data, address, key, http, env: Vec::new(), child: None }
    }

    /// A national API token (made while the node is stopped: the CLI opens its store).
    pub(super) fn token(&self, name: &str, role: &str, prefecture: Option<u8>) -> String {
        let mut command = Command::new(vrs_node());
        command.args(["federation", "token", "--name", name, "--role", role, "--data"]).arg(&self.data);
        if let Some(p) = prefecture {
            command.args(["--prefecture", &p.to_string()]);
        }
        let out = ok(&command.output().unwrap());
        out.split_whitespace().find(|w| w.starts_with("vrs_t_")).expect("a token").to_owned()
    }

    /// GET on the national API.
    pub(super) fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let agent = tests::agent_trusting(None).unwrap();
        let mut request = agent.get(&format!("http://{}{path}", self.http));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.call().unwrap();
        let status = response.status().as_u16();
        let bytes = response.body_mut().read_to_vec().unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// POST on the national API.
    pub(super) fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let agent = tests::agent_trusting(None).unwrap();
        let response = agent
            .post(&format!("http://{}{path}", self.http))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(body)
            .unwrap();
        tests::read(response).unwrap()
    }

    /// GET on the national API, as JSON.
    pub(super) fn json(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.get(path, Some(token));
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub(super) fn start(&mut self) {
        let child = Command::new(vrs_node())
            .args(["run", "--data"])
            .arg(&self.data)
            .env("VRS_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Up when its API answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tests::agent_trusting(None)
            .unwrap()
            .get(&format!("http://{}/healthz", self.http))
            .call()
            .is_err()
        {
            assert!(Instant::now() < deadline, "the national node did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub(super) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the process has exited by itself (a crash point).
    pub(super) fn wait_exit(&mut self, within: Duration) -> bool {
        tests::wait_exit(&mut self.child, within)
    }

    pub(super) fn approve(&self, request: &std::path::Path) -> String {
        ok(&Command::new(vrs_node())
            .args(["federation", "approve", "--data"])
            .arg(&self.data)
            .arg(request)
            .output()
            .unwrap())
    }
}

impl Drop for National {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(super) fn join(node: &Node, national: &National, name: &str) -> std::path::PathBuf {
    let request = node.data.parent().unwrap().join(format!("{name}-join.json"));
    ok(&node.cli(&[
        "federation",
        "join",
        "--national",
        &national.address,
        "--national-key",
        &national.key,
        "--out",
        request.to_str().unwrap(),
    ]));
    request
}

pub(super) fn status(node: &Node) -> Value {
    let (code, body) = node.get("/api/v1/status").unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until the standby holds as many residents and dose events as the primary.
pub(super) fn wait_converged(primary: &Node, standby: &Node, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (p, s) = (status(primary), status(standby));
        if p["residents"] == s["residents"] && p["dose_events"] == s["dose_events"] {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "standby did not converge: primary {p}, standby {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn history(node: &Node, resident: &str) -> Value {
    let (code, body) = node.get(&format!("/api/v1/residents/{resident}")).unwrap();
    assert_eq!(code, 200, "{body}");
    body["history"].clone()
}

/// A standby of 141003 in `dir/name`, with the primary's keys.
pub(super) fn standby_of(dir: &std::path::Path, name: &str, keys: &std::path::Path) -> Node {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let p2p = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let keys = keys.to_str().unwrap();
    Node::init_with(
        &dir.join(name),
        "141003",
        &["--plain-http", "--role", "standby", "--keys-from", keys, "--p2p-listen", &p2p],
    )
    .unwrap()
}

#[test]
fn a_standby_follows_its_primary_over_libp2p_survives_kill_9_and_takes_over() {
    let dir = TempDir::new("federation");
    let mut national = National::init(dir.path());
    national.start();

    // The primary: a day's set-up, then it joins.
    let p2p = |port: u16| format!("/ip4/127.0.0.1/tcp/{port}");
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let mut primary = Node::init_with(
        &dir.path().join("a"),
        "141003",
        &["--plain-http", "--p2p-listen", &p2p(free_port())],
    )
    .unwrap();
    let coupons = set_up_fixture(&primary, dir.path());
    let out = national.approve(&join(&primary, &national, "a"));
    assert!(out.contains("version 2"), "{out}");

    // The standby: the primary's coupon key and person-key secret, its own identity.
    let keys = primary.data.join("keys");
    let mut standby = standby_of(dir.path(), "s", &keys);
    national.approve(&join(&standby, &national, "s"));

    // An intruder: a standby with the same keys that the national administrator never approved.
    let mut intruder = standby_of(dir.path(), "x", &keys);
    join(&intruder, &national, "x");

    primary.start().unwrap();
    standby.start().unwrap();
    intruder.start().unwrap();
    let took = wait_converged(&primary, &standby, Duration::from_secs(30));
    eprintln!("standby caught up with {} residents in {took:?}", status(&primary)["residents"]);

    // Captures on the primary reach the standby; a capture on the standby is refused.
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (code, first) = primary
        .post("/api/v1/captures", &capture(&coupon_of(&coupons, "0000000101", 1).qr_text, &vial, None))
        .unwrap();
    assert_eq!(code, 201, "{first}");
    let resident = first["resident_id"].as_str().unwrap().to_owned();
    let (code, body) = standby
        .post("/api/v1/captures", &capture(&coupon_of(&coupons, "0000000102", 1).qr_text, &vial, None))
        .unwrap();
    assert_eq!((code, body["code"].as_str()), (409, Some("standby_read_only")), "{body}");
    wait_converged(&primary, &standby, Duration::from_secs(20));
    assert_eq!(history(&primary, &resident), history(&standby, &resident));

    // kill -9 the standby while captures keep arriving; it resumes from its checkpoint.
    let others: Vec<&str> = ["0000000102", "0000000104", "0000000105", "0000000106", "0000000107"].to_vec();
    for (i, atena) in others.iter().enumerate() {
        let (code, body) = primary
            .post("/api/v1/captures", &capture(&coupon_of(&coupons, atena, 1).qr_text, &vial, None))
            .unwrap();
        assert_eq!(code, 201, "{body}");
        if i == 1 {
            standby.kill9();
        }
    }
    standby.start().unwrap();
    wait_converged(&primary, &standby, Duration::from_secs(30));
    assert_eq!(status(&standby)["dose_events"], 6);

    // The intruder never got the directory, so it never learned of the primary, and the
    // primary would not have let it in anyway.
    assert_eq!(status(&intruder)["residents"], 0, "a peer outside the directory received documents");
    assert!(!intruder.data.join("directory.json").exists(), "the national node answered an unlisted peer");

    // Failover: the primary is lost; the standby is promoted and takes captures.
    primary.kill9();
    standby.stop().unwrap();
    let promotion = dir.path().join("promote.json");
    ok(&standby.cli(&["promote", "--out", promotion.to_str().unwrap()]));
    let out = national.approve(&promotion);
    assert!(out.contains("Municipal"), "{out}");
    // A newcomer registered on the promoted node: its counters go on after the numbers the
    // replicated documents use, so the newcomer takes nobody's document id or coupon number.
    let newcomer = dir.path().join("newcomer.csv");
    std::fs::write(
        &newcomer,
        "宛名番号,氏名,氏名カナ,生年月日,性別,住所\r\n0000000901,新井　花子,アライ ハナコ,1980-02-03,女,神奈川県横浜市中区山下町2-2\r\n",
    )
    .unwrap();
    let out = ok(&standby.cli(&["import", "--issue-coupons", newcomer.to_str().unwrap()]));
    assert!(out.contains("1"), "{out}");
    standby.start().unwrap();
    let id_of = |atena: &str| {
        let (code, body) = standby.get(&format!("/api/v1/residents?atena={atena}")).unwrap();
        assert_eq!(code, 200, "{body}");
        body["residents"][0]["resident_id"].as_str().unwrap_or_else(|| panic!("{atena}: {body}")).to_owned()
    };
    let new_id = id_of("0000000901");
    let (_, record) = standby.get(&format!("/api/v1/residents/{new_id}")).unwrap();
    assert_eq!(record["identity"]["name"], "新井　花子", "{record}");
    let new_coupon = record["valid_coupons"][0]["code"].as_str().unwrap().to_owned();
    for printed in &coupons {
        assert_ne!(id_of(&printed.atena_number), new_id, "{} kept their id", printed.atena_number);
        assert_ne!(printed.code, new_coupon, "the newcomer's coupon is {}'s", printed.atena_number);
    }
    // The primary's lots came with replication: the promoted node knows FA5765.
    let (code, lots) = standby.get("/api/v1/lots").unwrap();
    assert_eq!(code, 200, "{lots}");
    let lots = lots.to_string();
    assert!(lots.contains("FA5765") && lots.contains(&days_from_today(180)), "{lots}");
    let (code, body) = standby
        .post("/api/v1/captures", &capture(&coupon_of(&coupons, "0000000108", 1).qr_text, &vial, None))
        .unwrap();
    assert_eq!(code, 201, "the promoted node records: {body}");
    let (code, body) = standby
        .post("/api/v1/captures", &capture(&coupon_of(&coupons, "0000000101", 1).qr_text, &vial, None))
        .unwrap();
    assert_eq!(code, 200, "a capture made on the old primary is known: {body}");
    assert_eq!(body["replay"], true);
    let directory = std::fs::read_to_string(standby.data.join("directory.json")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut directory: Value = serde_json::from_str(&directory).unwrap();
    while directory["directory"]["version"].as_u64() < Some(4) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        directory =
            serde_json::from_str(&std::fs::read_to_string(standby.data.join("directory.json")).unwrap())
                .unwrap();
    }
    let roles: Vec<&str> = directory["directory"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["municipality"] == "141003")
        .map(|e| e["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "municipal").count(),
        1,
        "one primary after promotion: {roles:?}"
    );
    // Primary and standby publish the same encryption key (X25519, 32 bytes): what is sealed
    // for the municipality opens on whichever is primary.
    let keys: std::collections::BTreeSet<&str> = directory["directory"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["municipality"] == "141003")
        .map(|e| e["encryption_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys.iter().all(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit())), "{keys:?}");
}

#[test]
fn every_municipality_joins_and_reports_over_libp2p_in_one_process() {
    // All 1,741 municipalities and the national node, the node's own libp2p stack over
    // the in-memory transport (Noise + Yamux): each is approved into the directory,
    // fetches and verifies it, and delivers a signed statistics report.
    let dir = TempDir::new("smoke");
    let out = Command::new(vrs_node())
        .args(["smoke-federation", "--data"])
        .arg(dir.path())
        .output()
        .expect("vrs-node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("approved: 1741 municipalities"), "{stdout}");
    assert!(stdout.contains("directory of 1742 entries"), "{stdout}");
    assert!(stdout.contains("joined and reported: 1741 of 1741"), "{stdout}");
    let total = stdout.lines().find(|l| l.contains("national total")).expect("a total line");
    let numbers: Vec<&str> = total.split(|c: char| !c.is_ascii_digit()).filter(|s| s.len() > 3).collect();
    // "… for YYYY-MM-DD: N doses; sent N"
    assert_eq!(numbers[numbers.len() - 1], numbers[numbers.len() - 2], "{total}");
}
