//! Shared harness for the network-namespace tests: a topology from netns-scripts/up.sh that is
//! removed on drop, and confmesh daemons started inside it that are stopped on drop, by PID.
#![allow(dead_code, unreachable_pub, missing_docs)] // each test binary uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_confmesh");

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("netns-scripts")
}

/// Whether this test can build namespaces. Without root it fails under CI (which runs as root, so
/// a failure there is real) and is reported as not run elsewhere.
pub fn require_root(test: &str) -> bool {
    // SAFETY-free check: /proc/self/status has the effective uid on the "Uid:" line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_zero = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if euid_zero {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root to build network namespaces, and CI must run it");
    }
    eprintln!("NOTICE: {test} not run: needs root (network namespaces)");
    false
}

/// A topology made by up.sh with a prefix of its own; removed with down.sh on drop.
pub struct Topology {
    pub prefix: String,
    pub dir: tempfile::TempDir,
}

impl Topology {
    pub fn up(prefix: &str, peers: u8) -> Topology {
        // A leftover of a crashed earlier run with the same prefix is ours to remove.
        let _ = Command::new(scripts().join("down.sh")).arg(prefix).status();
        let out = Command::new(scripts().join("up.sh"))
            .arg(prefix)
            .arg(peers.to_string())
            .output()
            .expect("run up.sh");
        assert!(
            out.status.success(),
            "up.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Topology {
            prefix: prefix.to_owned(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs a command inside namespace `name` (e.g. "p1", "r") and returns its output.
    pub fn exec(&self, name: &str, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(name)])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }

    /// Changes peer `i`'s path at the router (netns-scripts/path.sh).
    pub fn path(&self, i: u8, args: &[&str]) {
        let out = Command::new(scripts().join("path.sh"))
            .arg(&self.prefix)
            .arg(i.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "path.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(scripts().join("down.sh"))
            .arg(&self.prefix)
            .status();
    }
}

pub fn mgmt(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, i)
}

/// Settings of one test peer's configuration file.
#[derive(Clone)]
pub struct PeerSpec {
    pub i: u8,
    pub peers: Vec<u8>,
    pub licence: &'static str,
    pub psk: String,
    pub version: Option<String>,
    pub extra_cluster: String,
    /// RUST_LOG of the daemon.
    pub log_level: &'static str,
}

impl PeerSpec {
    pub fn new(i: u8, peers: &[u8]) -> PeerSpec {
        PeerSpec {
            i,
            peers: peers.to_vec(),
            licence: "full",
            psk: "confmesh-test-psk-0123456789abcdef".into(),
            version: None,
            extra_cluster: String::new(),
            log_level: "info",
        }
    }
}

/// A confmesh daemon inside peer namespace `p<i>`; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    pub i: u8,
    pub ns: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub psk_file: PathBuf,
    log_level: &'static str,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(topo: &Topology, spec: &PeerSpec) -> Daemon {
        let dir = topo.dir.path().join(format!("p{}", spec.i));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let psk_file = dir.join("psk");
        std::fs::write(&psk_file, &spec.psk).unwrap();
        let config = dir.join("confmesh.toml");
        let peers: Vec<String> = spec
            .peers
            .iter()
            .map(|&p| format!("\"{}\"", mgmt(p)))
            .collect();
        let cluster = if spec.peers.is_empty() {
            String::new()
        } else {
            format!(
                "[cluster]\npeers = [{}]\npsk_file = \"{}\"\nlicence = \"{}\"\n{}\n",
                peers.join(", "),
                psk_file.display(),
                spec.licence,
                spec.extra_cluster
            )
        };
        std::fs::write(
            &config,
            format!(
                "[peer]\nhostname = \"conductor{i}\"\nserial = \"CMT{i}\"\nmgmt_addr = \"10.96.0.{i}\"\n\
                 rendezvous_addrs = [\"10.96.1.{i}\"]\nstate_dir = \"{state}\"\n\n{cluster}",
                i = spec.i,
                state = dir.join("state").display()
            ),
        )
        .unwrap();
        let mut d = Daemon {
            i: spec.i,
            ns: topo.ns(&format!("p{}", spec.i)),
            dir,
            config,
            psk_file,
            log_level: spec.log_level,
            child: None,
        };
        d.spawn(spec.version.as_deref());
        d
    }

    fn spawn(&mut self, version: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, BIN, "run", "--config"])
            .arg(&self.config)
            .arg("--keylog")
            .arg(self.dir.join("keylog"))
            .env("RUST_LOG", self.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(v) = version {
            cmd.env("CONFMESH_TEST_REPORTED_VERSION", v);
        }
        self.child = Some(cmd.spawn().expect("spawn confmesh"));
    }

    /// Kills the daemon with SIGKILL (a crash), leaving its state on disk.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon gracefully (SIGTERM), bounded to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM through kill(1): the PID is our own child's.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for the daemon to exit on its own (e.g. refusing to start).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn(None);
    }

    /// Runs a confmesh client subcommand against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, BIN])
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run confmesh client")
    }

    /// `cli` for a subcommand that must succeed: fails the test with its error output otherwise.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "confmesh {} on p{}: {}",
            args.join(" "),
            self.i,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The peer entry for management address 10.96.0.`j` in this daemon's status.
    pub fn peer(&self, j: u8) -> Option<Value> {
        let s = self.status()?;
        s["peers"]
            .as_array()?
            .iter()
            .find(|p| p["addr"] == mgmt(j).to_string())
            .cloned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Everything this daemon logged: stderr, and its event and configuration logs (rotated
    /// files included).
    pub fn all_logs(&self) -> String {
        let mut all = self.log();
        if let Ok(dir) = std::fs::read_dir(self.dir.join("state/log")) {
            for f in dir.flatten() {
                all.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
            }
        }
        all
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `cond` every 100 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether daemon `d` shows peer `j` with `state` (and `reason`, when given).
pub fn shows(d: &Daemon, j: u8, state: &str, reason: Option<&str>) -> bool {
    d.peer(j)
        .is_some_and(|p| p["state"] == state && reason.is_none_or(|r| p["reason"] == r))
}

/// Peers 1 and 2 started as one cluster, returned once each shows the other active within
/// `limit`; the failure message holds both sides' view and logs. Several tests begin this way.
pub fn cluster_of_two(topo: &Topology, limit: Duration) -> (Daemon, Daemon) {
    let d1 = Daemon::start(topo, &PeerSpec::new(1, &[1, 2]));
    let d2 = Daemon::start(topo, &PeerSpec::new(2, &[1, 2]));
    assert!(
        wait_until(limit, || shows(&d1, 2, "active", None)
            && shows(&d2, 1, "active", None)),
        "cluster did not form: {:?} {:?}\n{}\n{}",
        d1.peer(2),
        d2.peer(1),
        d1.log(),
        d2.log()
    );
    (d1, d2)
}

/// Whether sipp (Debian's sip-tester) runs here. Its absence fails under CI, which installs it,
/// and is reported as not run elsewhere.
pub fn have_sipp() -> bool {
    let ok = Command::new("sipp")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "sipp (Debian package sip-tester) is required in CI"
        );
        eprintln!("NOTICE: sipp not installed (apt-get install sip-tester); skipping");
    }
    ok
}

/// A sipp scenario file of tests/sipp.
pub fn sipp_scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name)
}

/// A sipp process with its message trace and error output in a directory of its own, stopped by
/// PID on drop. The loopback tests and the namespace tests drive sipp alike; this is the one place
/// that knows how to start it, wait for it and read what it saw.
pub struct Sipp {
    child: Option<Child>,
    pub name: String,
    trace: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sipp {
    /// Starts `cmd` (a sipp command line, possibly behind `ip netns exec` or a script) with its
    /// messages traced; `name` says which sipp it is in failure messages.
    pub fn spawn(name: &str, mut cmd: Command) -> Sipp {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("messages.log");
        let errors = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        cmd.args(["-trace_msg", "-message_file"])
            .arg(&trace)
            .current_dir(dir.path());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors)
            .spawn()
            .expect("start sipp");
        Sipp {
            child: Some(child),
            name: name.to_owned(),
            trace,
            _dir: dir,
        }
    }

    /// The exit code once sipp has exited (-1 for a signal), `None` while it runs.
    fn exit_code(&mut self) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let status = child.try_wait().unwrap()?;
        self.child = None;
        Some(status.code().unwrap_or(-1))
    }

    fn did_not_finish(&self, limit: Duration) -> ! {
        panic!(
            "{} did not finish within {limit:?}; trace:\n{}",
            self.name,
            self.log()
        );
    }

    /// Waits (bounded) for exit and returns the code; panics with the trace on timeout.
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(code) = self.exit_code() {
                return code;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.did_not_finish(limit)
    }

    /// `wait` for a tokio test: sleeps without blocking the runtime's workers, which the services
    /// under test run on.
    pub async fn wait_async(&mut self, limit: Duration) -> i32 {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(code) = self.exit_code() {
                return code;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.did_not_finish(limit)
    }

    /// Fails the test with the trace unless `code` (this sipp's exit code) is 0.
    pub fn assert_success(&self, code: i32) {
        assert_eq!(
            code,
            0,
            "{} failed (exit {code}); trace:\n{}",
            self.name,
            self.log()
        );
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The messages sipp sent and received, then its error output.
    pub fn log(&self) -> String {
        let errors = self.trace.with_file_name("stderr.log");
        format!(
            "{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&self.trace).unwrap_or_default(),
            std::fs::read_to_string(errors).unwrap_or_default()
        )
    }

    /// Distinct Call-IDs seen by this sipp (one per call).
    pub fn call_ids(&self) -> BTreeSet<String> {
        std::fs::read_to_string(&self.trace)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let (k, v) = l.split_once(':')?;
                (k.eq_ignore_ascii_case("call-id") || k == "i").then(|| v.trim().to_owned())
            })
            .collect()
    }

    /// Conference → Call-IDs of the INVITEs this sipp (a bridge) received.
    pub fn invites(&self) -> BTreeMap<String, BTreeSet<String>> {
        let text = std::fs::read_to_string(&self.trace).unwrap_or_default();
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("INVITE sip:") {
                current = rest.split_once('@').map(|(user, _)| user.to_owned());
            } else if line.starts_with("SIP/2.0")
                || line.starts_with("ACK ")
                || line.starts_with("BYE ")
                || line.starts_with("CANCEL ")
            {
                current = None;
            } else if let (Some(conf), Some((k, v))) = (&current, line.split_once(':')) {
                if k.eq_ignore_ascii_case("call-id") || k == "i" {
                    out.entry(conf.clone())
                        .or_default()
                        .insert(v.trim().to_owned());
                    current = None;
                }
            }
        }
        out
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        self.stop();
    }
}
