//! Security through the real binary: HTTPS by default, staff accounts from the command line,
//! roles and venues at the API, login lockout, cookie sessions with CSRF, and an audit log
//! an auditor exports and verifies offline — and that notices a changed byte.

use std::process::Command;

use serde_json::{Value, json};
use tests::{Node, TempDir, agent_trusting, read, vrs_node};

use super::{COMIRNATY, capture, coupon_of, days_from_today, ok, raw_vial, set_up_fixture};

fn login(node: &Node, username: &str, password: &str) -> (u16, Value) {
    node.post_with("/api/v1/auth/login", &json!({"username": username, "password": password}), None, None)
        .unwrap()
}

fn get_as(node: &Node, token: &str, path: &str) -> (u16, Value) {
    let response =
        node.agent().get(node.url(path)).header("Authorization", format!("Bearer {token}")).call().unwrap();
    read(response).unwrap()
}

fn cli_with_stdin(node: &Node, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(vrs_node())
        .args(args)
        .env("VRS_DATA", &node.data)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn https_by_default_and_plain_http_only_on_loopback() {
    let dir = TempDir::new("tls");
    let mut node = Node::init(dir.path(), "141003").unwrap();
    assert_eq!(node.scheme, "https");
    node.start().unwrap();
    let response = node.agent().get(node.url("/healthz")).call().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("strict-transport-security"));
    let policy = |response: &ureq::http::Response<ureq::Body>| {
        response.headers()["content-security-policy"].to_str().unwrap().to_owned()
    };
    assert_eq!(policy(&response), "default-src 'none'; frame-ancestors 'none'");
    // The staff's web UI: Japanese first, its own script and style only, nothing inline.
    let mut page = node.agent().get(node.url("/ui/")).call().unwrap();
    assert_eq!(page.status(), 200);
    let ui_policy = policy(&page);
    assert!(ui_policy.contains("script-src 'self'") && !ui_policy.contains("unsafe"), "{ui_policy}");
    assert!(page.body_mut().read_to_string().unwrap().contains(r#"<html lang="ja">"#));
    let script = node.agent().get(node.url("/ui/app.js")).call().unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(node.agent().get(node.url("/ui/secrets.toml")).call().unwrap().status(), 404);
    // The same port does not speak plain HTTP.
    let plain = agent_trusting(None).unwrap();
    assert!(plain.get(format!("http://{}/healthz", node.address)).call().is_err());
    // A client that does not trust the node's certificate is refused at the handshake.
    let stranger = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    assert!(stranger.get(node.url("/healthz")).call().is_err());
    node.stop().unwrap();

    // Plain HTTP on a public address: refused at init and at start.
    let refused = Command::new(vrs_node())
        .args(["init", "--municipality", "141003", "--plain-http", "--listen", "0.0.0.0:18080", "--data"])
        .arg(dir.path().join("public"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loopback"));
    let config = std::fs::read_to_string(node.data.join("node.toml")).unwrap();
    std::fs::write(node.data.join("node.toml"), config.replace("plain_http = false", "plain_http = true"))
        .unwrap();
    let output = node.cli(&["run", "--listen", "0.0.0.0:18081"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback"), "{output:?}");
}

#[test]
fn staff_roles_lockout_csrf_and_an_audit_log_an_auditor_can_verify() {
    let dir = TempDir::new("staff");
    let mut node = Node::init(dir.path(), "141003").unwrap();
    let coupons = set_up_fixture(&node, dir.path());

    // Accounts from the command line, while the daemon is stopped.
    let password = "yokohama clerk pass";
    ok(&cli_with_stdin(&node, &["user", "add", "tanaka", "--role", "clerk", "--password-stdin"], password));
    ok(&cli_with_stdin(&node, &["user", "add", "kansa", "--role", "auditor", "--password-stdin"], password));
    let generated = ok(&node.cli(&["user", "add", "suzuki", "--role", "call_centre"]));
    assert!(generated.contains("initial password"), "{generated}");
    let short =
        cli_with_stdin(&node, &["user", "add", "weak", "--role", "clerk", "--password-stdin"], "short");
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("12"), "the refusal names the rule");
    let issued = ok(&node.cli(&[
        "token",
        "add",
        "tablet-01",
        "--role",
        "venue_operator",
        "--venue",
        "naka-kumin-kaikan",
    ]));
    let tablet = issued.lines().find(|l| l.starts_with("vrs_t_")).unwrap().to_owned();
    let listed = ok(&node.cli(&["user", "list"]));
    assert!(listed.contains("tanaka\tclerk") && listed.contains("kansa\tauditor"), "{listed}");
    node.start().unwrap();

    // The venue terminal records at its venue only.
    let yamada = coupon_of(&coupons, "0000000101", 1);
    let vial = raw_vial(COMIRNATY, "FA5765");
    let (status, recorded) = node
        .post_with("/api/v1/captures", &capture(&yamada.qr_text, &vial, None), Some(&tablet), None)
        .unwrap();
    assert_eq!(status, 201, "{recorded}");
    assert_eq!(recorded["event"]["recorded_by"], "token:tablet-01");
    let elsewhere = json!({"coupon": coupon_of(&coupons, "0000000102", 1).qr_text, "vial": vial, "venue": "another-hall"});
    let (status, body) = node.post_with("/api/v1/captures", &elsewhere, Some(&tablet), None).unwrap();
    assert_eq!((status, body["code"].as_str()), (403, Some("venue_not_allowed")), "{body}");
    let resident_id = recorded["resident_id"].as_str().unwrap().to_owned();
    let (status, _) = get_as(&node, &tablet, &format!("/api/v1/residents/{resident_id}"));
    assert_eq!(status, 403, "a venue terminal does not read resident records");

    // A clerk logs in, reads a record, and may not manage users.
    let (status, session) = login(&node, "tanaka", password);
    assert_eq!(status, 200, "{session}");
    let clerk = session["token"].as_str().unwrap().to_owned();
    let (status, record) = get_as(&node, &clerk, &format!("/api/v1/residents/{resident_id}"));
    assert_eq!(status, 200);
    assert_eq!(record["identity"]["name"], "山田　太郎");
    let (status, body) = node
        .post_with(
            "/api/v1/users",
            &json!({"username": "x", "role": "municipal_admin", "password": "p".repeat(12)}),
            Some(&clerk),
            None,
        )
        .unwrap();
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert!(body["title"].as_str().unwrap().contains("職員"), "Japanese first: {body}");

    // Cookie sessions: a write needs the CSRF token.
    let cookie = format!("vrs_session={clerk}");
    let takahashi = coupon_of(&coupons, "0000000102", 1);
    let body = capture(&takahashi.qr_text, &vial, None);
    let without =
        node.agent().post(node.url("/api/v1/captures")).header("Cookie", &cookie).send_json(&body).unwrap();
    let (status, refused) = read(without).unwrap();
    assert_eq!((status, refused["code"].as_str()), (403, Some("csrf")), "{refused}");
    let with = node
        .agent()
        .post(node.url("/api/v1/captures"))
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", session["csrf_token"].as_str().unwrap())
        .send_json(&body)
        .unwrap();
    assert_eq!(with.status(), 201);
    // After a reload the web UI asks who it is: the cookie's holder gets the CSRF token back;
    // an API token has none.
    let me = node.agent().get(node.url("/api/v1/auth/me")).header("Cookie", &cookie).call().unwrap();
    assert_eq!(read(me).unwrap().1["csrf_token"], session["csrf_token"]);
    assert_eq!(node.get("/api/v1/auth/me").unwrap().1["csrf_token"], Value::Null);
    // The session cookie is Secure and out of scripts' reach.
    let response = node
        .agent()
        .post(node.url("/api/v1/auth/login"))
        .send_json(json!({"username": "kansa", "password": password}))
        .unwrap();
    let set_cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("; Secure") && set_cookie.contains("HttpOnly"), "{set_cookie}");

    // Five wrong passwords lock the account; then even the right one is refused.
    for _ in 0..4 {
        assert_eq!(login(&node, "suzuki", "wrong password!!").1["code"], "bad_credentials");
    }
    assert_eq!(login(&node, "suzuki", "wrong password!!").1["code"], "account_locked");
    let (status, _) = login(&node, "tanaka", "wrong password!!");
    assert_eq!(status, 401);
    let (status, body) = login(&node, "tanaka", password);
    assert_eq!(status, 200, "one failure does not lock: {body}");

    // Logout ends the session; a revoked token stops at once.
    let (status, _) = node.post_with("/api/v1/auth/logout", &json!({}), Some(&clerk), None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(get_as(&node, &clerk, "/api/v1/auth/me").0, 401);
    let (status, _) = node.post("/api/v1/tokens/tablet-01/revoke", &json!({})).unwrap();
    assert_eq!(status, 200);
    assert_eq!(get_as(&node, &tablet, "/api/v1/lots").0, 401);

    // The auditor sees every access by id — never a name — and the log verifies.
    let (_, session) = login(&node, "kansa", password);
    let auditor = session["token"].as_str().unwrap().to_owned();
    let (status, entries) = get_as(&node, &auditor, "/api/v1/audit?limit=5000");
    assert_eq!(status, 200);
    let entries = entries["entries"].as_array().unwrap().clone();
    let read_by_clerk = entries.iter().any(|e| {
        e["actor"] == "user:tanaka"
            && e["action"] == "resident.read"
            && e["subject"] == format!("resident:{resident_id}")
    });
    assert!(read_by_clerk, "the clerk's read is audited");
    for (action, outcome) in [
        ("capture", "ok"),
        ("capture", "denied:venue"),
        ("authorize", "denied:forbidden"),
        ("authorize", "denied:csrf"),
        ("auth.login", "refused:account_locked"),
        ("auth.login", "refused:bad_credentials"),
        ("residents.import", "started"),
    ] {
        assert!(
            entries
                .iter()
                .any(|e| e["action"] == action && e["outcome"].as_str().unwrap().starts_with(outcome)),
            "no {action} {outcome} entry"
        );
    }
    let text = serde_json::to_string(&entries).unwrap();
    for (_, name, kana, _, _, address) in super::FIXTURE {
        assert!(
            !text.contains(name) && !text.contains(kana) && !text.contains(address),
            "personal data in the audit log"
        );
    }
    let (status, verdict) = get_as(&node, &auditor, "/api/v1/audit/verify");
    assert_eq!((status, verdict["intact"].as_bool()), (200, Some(true)), "{verdict}");
    let (status, _) = get_as(&node, &clerk, "/api/v1/audit/verify");
    assert_eq!(status, 401);
    let response = node
        .agent()
        .get(node.url("/api/v1/audit/export?from=2020-01-01&to=2099-12-31"))
        .header("Authorization", format!("Bearer {auditor}"))
        .call()
        .unwrap();
    assert_eq!(response.status(), 200);
    let exported = response.into_body().read_to_vec().unwrap();
    node.stop().unwrap();

    // Offline, with the public key only.
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, &exported).unwrap();
    let key = node.data.join("keys/audit-signing.pub");
    let (file_arg, key_arg) = (file.to_str().unwrap(), key.to_str().unwrap());
    let out = ok(&node.cli(&["audit", "verify", "--file", file_arg, "--public-key", key_arg]));
    assert!(out.contains("intact"), "{out}");
    let out = ok(&node.cli(&["audit", "verify"]));
    assert!(out.contains("intact"), "{out}");
    let mut tampered = exported.clone();
    let at = tampered.windows(7).position(|w| w == b"tanaka\"").unwrap();
    tampered[at] = b'T';
    std::fs::write(&file, &tampered).unwrap();
    let output = node.cli(&["audit", "verify", "--file", file_arg, "--public-key", key_arg]);
    assert!(!output.status.success(), "a changed export must fail verification");
    assert!(String::from_utf8_lossy(&output.stderr).contains("改"), "{output:?}");

    // The command-line export verifies too.
    let out_file = dir.path().join("cli-audit.jsonl");
    let today = days_from_today(0);
    ok(&node.cli(&[
        "audit",
        "export",
        "--from",
        "2020-01-01",
        "--to",
        &today,
        "--out",
        out_file.to_str().unwrap(),
    ]));
    let out =
        ok(&node.cli(&["audit", "verify", "--file", out_file.to_str().unwrap(), "--public-key", key_arg]));
    assert!(out.contains("intact"), "{out}");
}
