//! Issue 4 acceptance 9 and the admin API of SPEC.md §7 on a real 2-peer cluster (as root; CI
//! does): `/metrics` parses with the Prometheus project's own text-format parser, the status page
//! is valid HTML (html5lib in strict mode), `/api/…` needs an administrator account, and shared
//! configuration written through one peer's API is read back through the other's. And with
//! `[admin] tls_cert_file`/`tls_key_file` the API is HTTPS only: curl with the CA file gets in,
//! plain HTTP to the port gets nothing, and a capture on the router never holds the password.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// `curl` inside peer `i`'s namespace; returns (HTTP status, body).
fn curl(topo: &Topology, i: u8, args: &[&str]) -> (u16, String) {
    curl_in(topo, &format!("p{i}"), args)
}

/// `curl` inside namespace `ns` ("p1", "vcs", ...); returns (HTTP status, body), status 0 when
/// no HTTP answer came.
fn curl_in(topo: &Topology, ns: &str, args: &[&str]) -> (u16, String) {
    let out = topo.exec(
        ns,
        &[&["curl", "-s", "-m", "10", "-w", "\n%{http_code}"], args].concat(),
    );
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
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// Creates administrator `user` through the client, the password handed over in a file (never on
/// the command line).
fn add_admin(d: &Daemon, user: &str, password: &str) {
    let pw = d.dir.join("admin-password");
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    d.cli_ok(&[
        "admin",
        "add",
        user,
        "--password-file",
        pw.to_str().unwrap(),
    ]);
}

/// Peer 1 on its own, once its admin API answers plain HTTP; with the configuration it was
/// started from, which the TLS tests extend with an `[admin]` table.
fn standalone_with_admin_api(topo: &Topology) -> (Daemon, String) {
    let d1 = Daemon::start(topo, &PeerSpec::new(1, &[]));
    let plain_config = std::fs::read_to_string(&d1.config).unwrap();
    let up = wait_until(Duration::from_secs(20), || {
        curl(topo, 1, &["http://10.96.0.1:8443/metrics"]).0 == 200
    });
    assert!(up, "admin API did not come up: {}", d1.log());
    (d1, plain_config)
}

/// A new self-signed certificate for the management address 10.96.0.1 written to `cert`, its key
/// to `key`; returns the certificate's PEM.
fn issue_certificate(cert: &Path, key: &Path) -> String {
    let generated = rcgen::generate_simple_self_signed(vec!["10.96.0.1".to_owned()]).unwrap();
    std::fs::write(cert, generated.cert.pem()).unwrap();
    std::fs::write(key, generated.key_pair.serialize_pem()).unwrap();
    generated.cert.pem()
}

/// The `[admin]` lines that turn on TLS with these files.
fn tls_files(cert: &Path, key: &Path) -> String {
    format!(
        "tls_cert_file = {:?}\ntls_key_file = {:?}",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// `config` (as the daemon was started) with an `[admin]` table of `admin`'s lines.
fn with_admin(config: &str, admin: &str) -> String {
    format!("{config}\n[admin]\n{admin}\n")
}

#[test]
fn metrics_parse_page_validates_and_api_needs_an_account() {
    if !require_root("metrics_parse_page_validates_and_api_needs_an_account") {
        return;
    }
    let topo = Topology::up("cmad", 2);
    let (d1, _d2) = cluster_of_two(&topo, Duration::from_secs(20));

    // /metrics needs no account and parses with the reference parser.
    let (code, metrics) = curl(&topo, 1, &["http://10.96.0.1:8443/metrics"]);
    assert_eq!(code, 200, "{metrics}");
    let families = python(PARSE_METRICS, &metrics);
    for f in [
        "confmesh_info",
        "confmesh_peer_active",
        "confmesh_peer_rtt_seconds",
        "confmesh_peer_sas",
        "confmesh_replication_connected",
        "confmesh_ike_established",
    ] {
        assert!(
            families.lines().any(|l| l == f),
            "{f} missing from /metrics families:\n{families}"
        );
    }

    // Without an account, the API and the page refuse.
    assert_eq!(
        curl(&topo, 1, &["http://10.96.0.1:8443/api/v1/status"]).0,
        401
    );
    assert_eq!(curl(&topo, 1, &["http://10.96.0.1:8443/"]).0, 401);
    add_admin(&d1, "ops", "s3cret-admin-pass");
    assert!(
        !std::fs::read_to_string(d1.dir.join("daemon.log"))
            .unwrap()
            .contains("s3cret-admin-pass")
    );
    let auth = "ops:s3cret-admin-pass";
    // A request to peer `i` as `ops`: `args`, then the URL of `path` on its management address.
    let as_ops = |i: u8, args: &[&str], path: &str| {
        let url = format!("http://10.96.0.{i}:8443{path}");
        curl(&topo, i, &[&["-u", auth], args, &[url.as_str()]].concat())
    };
    assert_eq!(
        curl(
            &topo,
            1,
            &[
                "-u",
                "ops:wrong-password",
                "http://10.96.0.1:8443/api/v1/status"
            ]
        )
        .0,
        401
    );

    // The page is valid HTML and shows the peers.
    let (code, page) = as_ops(1, &[], "/");
    assert_eq!(code, 200, "{page}");
    assert_eq!(python(PARSE_HTML, &page).trim(), "valid");
    assert!(
        page.contains("conductor1") && page.contains("conductor2"),
        "{page}"
    );

    // The account replicates: peer 2's API accepts it too.
    let replicated = wait_until(Duration::from_secs(10), || {
        as_ops(2, &[], "/api/v1/status").0 == 200
    });
    assert!(replicated, "the account did not reach peer 2");

    // Shared configuration through the API: written on peer 1, read on peer 2.
    let bridge = r#"{"uri":"sip:10.96.4.1:5060","capacity":20}"#;
    let (code, body) = as_ops(
        1,
        &["-X", "PUT", "--data", bridge],
        "/api/v1/config/bridge/b1",
    );
    assert_eq!(code, 200, "{body}");
    let read_back = wait_until(Duration::from_secs(10), || {
        let (code, body) = as_ops(2, &[], "/api/v1/config/bridge/b1");
        code == 200
            && serde_json::from_str::<serde_json::Value>(&body).ok()
                == serde_json::from_str(bridge).ok()
    });
    assert!(read_back, "bridge/b1 did not replicate to peer 2");
    let (code, body) = as_ops(
        1,
        &["-X", "PUT", "--data", r#"{"uri":"sip:x"}"#],
        "/api/v1/config/bridge/b2",
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("capacity"),
        "{body}"
    );
    let (code, _) = as_ops(1, &["-X", "DELETE"], "/api/v1/config/bridge/b1");
    assert_eq!(code, 200);
    let gone = wait_until(Duration::from_secs(10), || {
        as_ops(2, &[], "/api/v1/config/bridge/b1").0 == 404
    });
    assert!(gone, "the delete did not replicate");
}

/// tcpdump in the router's namespace, writing every packet to or from TCP port 8443 to a file;
/// stopped by PID on drop. `--immediate-mode`: without it libpcap's ring hands packets over in
/// blocks, and a tcpdump stopped right after the exchange writes none of them.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(topo: &Topology, file: &Path) -> Capture {
        let log = file.with_extension("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &topo.ns("r"),
                "tcpdump",
                "-i",
                "any",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .args(["tcp", "port", "8443"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run tcpdump");
        let capture = Capture {
            child: Some(child),
            file: file.to_owned(),
        };
        let ready = wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
        });
        assert!(
            ready,
            "tcpdump did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        capture
    }

    /// Stops tcpdump (SIGTERM, bounded, then SIGKILL) and returns the raw capture file.
    fn finish(mut self) -> Vec<u8> {
        self.stop();
        std::fs::read(&self.file).expect("read the capture")
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The ways a password sent with HTTP Basic can show on the wire.
fn holds_credentials(capture: &[u8], user: &str, password: &str) -> bool {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    contains(capture, password.as_bytes())
        || contains(capture, basic.as_bytes())
        || contains(capture, b"Authorization")
}

#[test]
fn tls_admin_api_keeps_the_password_off_the_wire() {
    if !require_root("tls_admin_api_keeps_the_password_off_the_wire") {
        return;
    }
    let topo = Topology::up("cmat", 1);
    let (mut d1, plain_config) = standalone_with_admin_api(&topo);
    let password = "tls-netns-pass-5d2c9e";
    add_admin(&d1, "ops", password);
    let auth = format!("ops:{password}");

    // The control, and the gap TLS closes: plain HTTP from the operator's machine (the vcs
    // namespace) carries the password across the router, and the capture there finds it.
    let capture = Capture::start(&topo, &topo.dir.path().join("plain.pcap"));
    assert_eq!(
        curl_in(
            &topo,
            "vcs",
            &["-u", &auth, "http://10.96.0.1:8443/api/v1/status"]
        )
        .0,
        200
    );
    let seen = capture.finish();
    assert!(
        holds_credentials(&seen, "ops", password),
        "the capture method must see a password sent in clear ({} bytes captured)",
        seen.len()
    );

    // A certificate for the management address, made here; the key readable by its owner only.
    let (cert, key) = (d1.dir.join("admin.crt"), d1.dir.join("admin.key"));
    issue_certificate(&cert, &key);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let admin = |cert: &Path, key: &Path| with_admin(&plain_config, &tls_files(cert, key));

    // A key that is not a key: the daemon refuses to start and says which field.
    d1.stop();
    std::fs::write(&d1.config, admin(&cert, &cert)).unwrap();
    d1.restart();
    let status = d1
        .wait_exit(Duration::from_secs(20))
        .expect("the daemon must refuse a bad key, not run");
    assert!(!status.success());
    assert!(
        d1.log().contains("admin.tls_key_file"),
        "the refusal must name the field: {}",
        d1.log()
    );

    // The right files: HTTPS with the CA file.
    std::fs::write(&d1.config, admin(&cert, &key)).unwrap();
    d1.restart();
    let ca = cert.to_str().unwrap();
    let up = wait_until(Duration::from_secs(20), || {
        curl_in(
            &topo,
            "vcs",
            &["--cacert", ca, "https://10.96.0.1:8443/metrics"],
        )
        .0 == 200
    });
    assert!(up, "HTTPS did not come up: {}", d1.log());
    // HTTPS from the operator's machine, trusting the certificate, as `user` ("name:password").
    let https_as = |user: &str, path: &str| {
        let url = format!("https://10.96.0.1:8443{path}");
        curl_in(&topo, "vcs", &["--cacert", ca, "-u", user, &url])
    };

    let capture = Capture::start(&topo, &topo.dir.path().join("tls.pcap"));
    let (code, body) = https_as(&auth, "/api/v1/status");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("conductor1"), "{body}");
    let (code, page) = https_as(&auth, "/");
    assert_eq!(code, 200);
    assert_eq!(python(PARSE_HTML, &page).trim(), "valid");
    assert_eq!(https_as("ops:wrong", "/api/v1/status").0, 401);
    assert_eq!(
        https_as(&format!("nobody:{password}"), "/api/v1/status").0,
        401
    );
    let seen = capture.finish();
    let packets = Command::new("tcpdump")
        .arg("-r")
        .arg(topo.dir.path().join("tls.pcap"))
        .output()
        .unwrap();
    let packets = String::from_utf8_lossy(&packets.stdout).lines().count();
    assert!(packets >= 20, "the capture holds only {packets} packets");
    assert!(
        !holds_credentials(&seen, "ops", password),
        "credentials crossed the router in clear over HTTPS"
    );
    assert!(
        !contains(&seen, b"HTTP/1.1"),
        "HTTP crossed the router in clear"
    );

    // Plain HTTP to the TLS port gets no HTTP answer; a client that does not trust the
    // certificate is stopped before it sends anything.
    let (code, body) = curl_in(&topo, "vcs", &["http://10.96.0.1:8443/metrics"]);
    assert_eq!(code, 0, "plain HTTP was answered: {body}");
    assert!(!body.contains("confmesh_info"), "{body}");
    assert_eq!(
        curl_in(&topo, "vcs", &["https://10.96.0.1:8443/metrics"]).0,
        0,
        "an untrusted certificate must fail verification"
    );
}

/// A configuration reload (`confmesh reload`, as SIGHUP) changes the admin API without a restart:
/// plain HTTP to HTTPS, a rotated certificate at the same paths, a new `listen` address. A value
/// that cannot be used (an address that is not this host's, a key that is not the certificate's)
/// is refused with the field named, and the API serves on as before.
#[test]
fn a_reload_rotates_the_admin_certificate_and_moves_the_listener() {
    if !require_root("a_reload_rotates_the_admin_certificate_and_moves_the_listener") {
        return;
    }
    let topo = Topology::up("cmar", 1);
    let (d1, plain_config) = standalone_with_admin_api(&topo);
    let (cert, key) = (d1.dir.join("admin.crt"), d1.dir.join("admin.key"));
    // Each certificate kept apart as the CA file of a client that trusts only it.
    let ca_file = |n: &str, pem: String| {
        let f = d1.dir.join(format!("ca-{n}.pem"));
        std::fs::write(&f, pem).unwrap();
        f.to_str().unwrap().to_owned()
    };
    let reload = || {
        let out = d1.cli(&["reload"]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The configuration rewritten with these `[admin]` lines, then reloaded.
    let reload_with = |admin: &str| {
        std::fs::write(&d1.config, with_admin(&plain_config, admin)).unwrap();
        reload()
    };
    // `listen` moved to `addr`, with TLS from the certificate and `key`.
    let listen_tls =
        |addr: &str, key: &Path| format!("listen = \"{addr}\"\n{}", tls_files(&cert, key));
    // The status of /metrics over HTTPS on `port` for a client that trusts only `ca`.
    let metrics_trusting = |ca: &str, port: u16| {
        let url = format!("https://10.96.0.1:{port}/metrics");
        curl(&topo, 1, &["--cacert", ca, &url]).0
    };

    // Plain HTTP to HTTPS.
    let first = ca_file("first", issue_certificate(&cert, &key));
    let (ok, err) = reload_with(&tls_files(&cert, &key));
    assert!(ok, "reload: {err}");
    assert_eq!(metrics_trusting(&first, 8443), 200, "{}", d1.log());
    assert_eq!(
        curl(&topo, 1, &["http://10.96.0.1:8443/metrics"]).0,
        0,
        "plain HTTP still answered"
    );

    // Rotation: new files at the same paths, then a reload; the old certificate is no longer
    // presented.
    let second = ca_file("second", issue_certificate(&cert, &key));
    let (ok, err) = reload();
    assert!(ok, "reload: {err}");
    assert_eq!(metrics_trusting(&second, 8443), 200, "{}", d1.log());
    assert_eq!(
        metrics_trusting(&first, 8443),
        0,
        "the old certificate is still served"
    );

    // A new address: served there, closed on the old one.
    let (ok, err) = reload_with(&listen_tls("10.96.0.1:9443", &key));
    assert!(ok, "reload: {err}");
    assert_eq!(metrics_trusting(&second, 9443), 200, "{}", d1.log());
    assert_eq!(
        metrics_trusting(&second, 8443),
        0,
        "the old address still answers"
    );

    // Refused: an address that is not this host's, then a key that is not the certificate's.
    // Each names its field; the API serves on as it was.
    let (ok, err) = reload_with(&listen_tls("10.96.0.99:9443", &key));
    assert!(
        !ok && err.contains("admin.listen") && err.contains("10.96.0.99:9443"),
        "{err}"
    );
    assert_eq!(metrics_trusting(&second, 9443), 200, "{}", d1.log());
    let (ok, err) = reload_with(&listen_tls("10.96.0.1:9443", &cert));
    assert!(!ok && err.contains("admin.tls_key_file"), "{err}");
    assert_eq!(metrics_trusting(&second, 9443), 200, "{}", d1.log());

    // All of it without a restart, and written down in the configuration log.
    let logs = d1.all_logs();
    assert_eq!(logs.matches("started as conductor1").count(), 1, "{logs}");
    assert!(
        logs.contains("admin TLS certificate from") && logs.contains("admin.listen 10.96.0.1:9443"),
        "{logs}"
    );
}
