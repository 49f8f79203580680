//! Issue 4 acceptance 9 and the admin API of SPEC.md §7 on a real 2-peer cluster (as root; CI
//! does): `/metrics` parses with the Prometheus project's own text-format parser, the status page
//! is valid HTML (html5lib in strict mode), `/api/…` needs an administrator account, and shared
//! configuration written through one peer's API is read back through the other's.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// `curl` inside peer `i`'s namespace; returns (HTTP status, body).
fn curl(topo: &Topology, i: u8, args: &[&str]) -> (u16, String) {
    let out = topo.exec(&format!("p{i}"), &[&["curl", "-s", "-m", "10", "-w", "\n%{http_code}"], args].concat());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Runs a check in the distribution's python3 with `input` on stdin; panics with its stderr.
fn python(script: &str, input: &str) -> String {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python check failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PARSE_METRICS: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
names = sorted({f.name for f in text_string_to_metric_families(sys.stdin.read())})
print("\n".join(names))
"#;

const PARSE_HTML: &str = r#"
import sys, html5lib
html5lib.HTMLParser(strict=True).parse(sys.stdin.read())
print("valid")
"#;

#[test]
fn metrics_parse_page_validates_and_api_needs_an_account() {
    if !require_root("metrics_parse_page_validates_and_api_needs_an_account") {
        return;
    }
    let topo = Topology::up("cmad", 2);
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2]));
    let formed = wait_until(Duration::from_secs(20), || shows(&d1, 2, "active", None) && shows(&d2, 1, "active", None));
    assert!(formed, "cluster did not form: {}", d1.log());

    // /metrics needs no account and parses with the reference parser.
    let (code, metrics) = curl(&topo, 1, &["http://10.96.0.1:8443/metrics"]);
    assert_eq!(code, 200, "{metrics}");
    let families = python(PARSE_METRICS, &metrics);
    for f in ["confmesh_info", "confmesh_peer_active", "confmesh_peer_rtt_seconds", "confmesh_peer_sas", "confmesh_replication_connected", "confmesh_ike_established"] {
        assert!(families.lines().any(|l| l == f), "{f} missing from /metrics families:\n{families}");
    }

    // Without an account, the API and the page refuse.
    assert_eq!(curl(&topo, 1, &["http://10.96.0.1:8443/api/v1/status"]).0, 401);
    assert_eq!(curl(&topo, 1, &["http://10.96.0.1:8443/"]).0, 401);
    let pw = d1.dir.join("admin-password");
    std::fs::write(&pw, "s3cret-admin-pass\n").unwrap();
    let out = d1.cli(&["admin", "add", "ops", "--password-file", pw.to_str().unwrap()]);
    assert!(out.status.success(), "admin add: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!std::fs::read_to_string(d1.dir.join("daemon.log")).unwrap().contains("s3cret-admin-pass"));
    let auth = "ops:s3cret-admin-pass";
    assert_eq!(curl(&topo, 1, &["-u", "ops:wrong-password", "http://10.96.0.1:8443/api/v1/status"]).0, 401);

    // The page is valid HTML and shows the peers.
    let (code, page) = curl(&topo, 1, &["-u", auth, "http://10.96.0.1:8443/"]);
    assert_eq!(code, 200, "{page}");
    assert_eq!(python(PARSE_HTML, &page).trim(), "valid");
    assert!(page.contains("conductor1") && page.contains("conductor2"), "{page}");

    // The account replicates: peer 2's API accepts it too.
    let replicated = wait_until(Duration::from_secs(10), || curl(&topo, 2, &["-u", auth, "http://10.96.0.2:8443/api/v1/status"]).0 == 200);
    assert!(replicated, "the account did not reach peer 2");

    // Shared configuration through the API: written on peer 1, read on peer 2.
    let bridge = r#"{"uri":"sip:10.96.4.1:5060","capacity":20}"#;
    let (code, body) = curl(&topo, 1, &["-u", auth, "-X", "PUT", "--data", bridge, "http://10.96.0.1:8443/api/v1/config/bridge/b1"]);
    assert_eq!(code, 200, "{body}");
    let read_back = wait_until(Duration::from_secs(10), || {
        let (code, body) = curl(&topo, 2, &["-u", auth, "http://10.96.0.2:8443/api/v1/config/bridge/b1"]);
        code == 200 && serde_json::from_str::<serde_json::Value>(&body).ok() == serde_json::from_str(bridge).ok()
    });
    assert!(read_back, "bridge/b1 did not replicate to peer 2");
    let (code, body) = curl(&topo, 1, &["-u", auth, "-X", "PUT", "--data", r#"{"uri":"sip:x"}"#, "http://10.96.0.1:8443/api/v1/config/bridge/b2"]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"error\"") && body.contains("capacity"), "{body}");
    let (code, _) = curl(&topo, 1, &["-u", auth, "-X", "DELETE", "http://10.96.0.1:8443/api/v1/config/bridge/b1"]);
    assert_eq!(code, 200);
    let gone = wait_until(Duration::from_secs(10), || curl(&topo, 2, &["-u", auth, "http://10.96.0.2:8443/api/v1/config/bridge/b1"]).0 == 404);
    assert!(gone, "the delete did not replicate");
}
