//! Issue 5 acceptance 3 and 4 over the real overlay (AH between peers, in network namespaces, as
//! root; CI does): a peer killed with SIGKILL in the middle of a stream of writes converges after
//! a restart without losing an acknowledged write; a damaged store file stops the daemon with a
//! clear message; a standalone peer joining a cluster takes the cluster's shared configuration
//! after an automatic backup of its own, and keeps its peer-specific settings. Acceptance 5: backup
//! and restore through the daemon, plain and encrypted, and each refusal changing nothing.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn cli_in(ns: &str, config: &Path, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, BIN])
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run confmesh client")
}

fn set(d: &Daemon, key: &str, value: &str) {
    let out = d.cli(&["config", "set", key, value]);
    assert!(
        out.status.success(),
        "config set {key} on p{}: {}",
        d.i,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `config list PREFIX` of a daemon as a map, or `None` if it does not answer.
fn list(d: &Daemon, prefix: &str) -> Option<BTreeMap<String, Value>> {
    let out = d.cli(&["config", "list", prefix]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), serde_json::from_str(v).ok()?))
        })
        .collect()
}

fn all_active(d: &[&Daemon]) -> bool {
    d.iter().all(|x| {
        d.iter()
            .all(|y| x.i == y.i || shows(x, y.i, "active", None))
    })
}

/// Writes `prefix/NNNN` keys to one daemon until `stop`, recording the acknowledged ones.
fn writer(
    ns: String,
    config: PathBuf,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        for n in 0..2000u32 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let key = format!("{prefix}/{n:04}");
            if cli_in(&ns, &config, &["config", "set", &key, &n.to_string()])
                .status
                .success()
            {
                acked.push(key);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        acked
    })
}

#[test]
fn killed_mid_stream_peer_converges_and_damaged_store_is_refused() {
    if !require_root("killed_mid_stream_peer_converges_and_damaged_store_is_refused") {
        return;
    }
    let topo = Topology::up("cmrk", 3);
    let mut d: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::start(&topo, &PeerSpec::new(i, &[1, 2, 3])))
        .collect();
    let refs: Vec<&Daemon> = d.iter().collect();
    assert!(
        wait_until(Duration::from_secs(20), || all_active(&refs)),
        "cluster did not form: {}",
        d[2].log()
    );

    // Writers on peer 3 (the one that crashes) and on peer 1 (what peer 3 must catch up on).
    let stop = Arc::new(AtomicBool::new(false));
    let w3 = writer(d[2].ns.clone(), d[2].config.clone(), "on3", stop.clone());
    let w1 = writer(d[0].ns.clone(), d[0].config.clone(), "on1", stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    d[2].kill();
    std::thread::sleep(Duration::from_millis(1500));
    d[2].restart();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let acked3 = w3.join().unwrap();
    let acked1 = w1.join().unwrap();
    assert!(
        acked3.len() >= 10 && acked1.len() >= 20,
        "too few writes: {} on p3, {} on p1",
        acked3.len(),
        acked1.len()
    );

    // Every peer converges to the same content, holding every acknowledged write.
    let mut last = Vec::new();
    let converged = wait_until(Duration::from_secs(30), || {
        last = d
            .iter()
            .map(|x| list(x, "on").unwrap_or_default())
            .collect();
        last.iter().all(|m| m == &last[0])
            && acked3
                .iter()
                .chain(&acked1)
                .all(|k| last[0].contains_key(k))
    });
    assert!(
        converged,
        "not converged: sizes {:?}, acked {} + {}; missing on p3: {:?}\n{}",
        last.iter().map(BTreeMap::len).collect::<Vec<_>>(),
        acked3.len(),
        acked1.len(),
        acked3
            .iter()
            .chain(&acked1)
            .filter(|k| !last[2].contains_key(*k))
            .take(5)
            .collect::<Vec<_>>(),
        d[2].log()
    );
    let status = d[0].status().unwrap();
    let repl = &status["replication"];
    assert!(repl.is_object(), "replication status missing: {status}");
    // The writes went through the store's journal.
    assert!(
        repl["store"]["journal_syncs"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "store status: {}",
        repl["store"]
    );

    // A damaged store file is detected and reported, and the daemon does not start on it.
    d[2].stop();
    let store = d[2].dir.join("state").join("store.redb");
    let mut bytes = std::fs::read(&store).unwrap();
    let len = bytes.len();
    for i in (len / 4..len * 3 / 4).step_by(61) {
        bytes[i] ^= 0xff;
    }
    std::fs::write(&store, &bytes).unwrap();
    d[2].restart();
    let exit = d[2].wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| !s.success()),
        "daemon ran on a damaged store: {exit:?}\n{}",
        d[2].log()
    );
    let log = d[2].log();
    assert!(
        log.contains("damaged") && log.contains("store.redb"),
        "no clear message: {log}"
    );
}

/// The store member of a backup file, as JSON.
fn backup_store(path: &Path) -> Value {
    let gz = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_string_lossy() == "store.json" {
            let mut s = String::new();
            entry.read_to_string(&mut s).unwrap();
            return serde_json::from_str(&s).unwrap();
        }
    }
    panic!("no store.json in {}", path.display());
}

/// Waits until a standalone daemon answers on its control socket (it has no peer to become
/// active with).
fn wait_started(d: &Daemon) {
    assert!(
        wait_until(Duration::from_secs(10), || d.status().is_some()),
        "p{} did not start: {}",
        d.i,
        d.log()
    );
}

/// Lists a standalone peer in the cluster of peers 1, 2 and 3 (configuration file and key) and
/// reloads it: from then on it is joining (SPEC §2 rule 6).
fn into_cluster_of_three(d: &Daemon) {
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        format!(
            "{text}\n[cluster]\npeers = [\"10.96.0.1\", \"10.96.0.2\", \"10.96.0.3\"]\npsk_file = \"{}\"\nlicence = \"full\"\n",
            d.psk_file.display()
        ),
    )
    .unwrap();
    std::fs::write(&d.psk_file, PeerSpec::new(d.i, &[]).psk).unwrap();
    let out = d.cli(&["reload"]);
    assert!(
        out.status.success(),
        "reload of p{}: {}",
        d.i,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn standalone_peer_joining_takes_the_clusters_configuration() {
    if !require_root("standalone_peer_joining_takes_the_clusters_configuration") {
        return;
    }
    let topo = Topology::up("cmrj", 3);
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2]));
    let d3 = Daemon::start(&topo, &PeerSpec::new(3, &[]));
    assert!(
        wait_until(Duration::from_secs(20), || all_active(&[&d1, &d2])),
        "1+2 did not form: {}",
        d1.log()
    );
    let bridge = r#"{"uri": "sip:10.96.4.1:5060", "capacity": 20}"#;
    set(&d1, "bridge/b1", bridge);
    set(
        &d3,
        "bridge/own",
        r#"{"uri": "sip:10.96.4.2:5060", "capacity": 5}"#,
    );
    set(&d3, "location/own", r#"{"limit_kbps": 1000}"#);
    let peer_part = |d: &Daemon| {
        let text = std::fs::read_to_string(&d.config).unwrap();
        text.split("[cluster]")
            .next()
            .unwrap()
            .trim_end()
            .to_owned()
    };
    let before = peer_part(&d3);

    // The cluster adds peer 3; peer 3 lists the cluster and reloads (SPEC §2 rule 6).
    for d in [&d1, &d2] {
        let out = d.cli(&["peers", "add", "10.96.0.3"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    into_cluster_of_three(&d3);

    assert!(
        wait_until(Duration::from_secs(20), || all_active(&[&d1, &d2, &d3])),
        "3 did not join: {}",
        d3.log()
    );
    let mut seen = None;
    let took = wait_until(Duration::from_secs(15), || {
        seen = list(&d3, "");
        seen.as_ref()
            .is_some_and(|m| m.contains_key("bridge/b1") && !m.contains_key("bridge/own"))
    });
    assert!(
        took,
        "peer 3 did not take the cluster's configuration: {seen:?}"
    );
    assert_eq!(list(&d3, "").unwrap(), list(&d1, "").unwrap());
    assert!(
        !list(&d1, "").unwrap().contains_key("bridge/own"),
        "the joiner's old configuration leaked into the cluster"
    );
    // Joined: it took a member's snapshot and accepts writes again, which reach the cluster.
    let status = d3.status().unwrap();
    assert_eq!(status["replication"]["joining"], false, "{status}");
    set(
        &d3,
        "bridge/b2",
        r#"{"uri": "sip:10.96.5.1:5060", "capacity": 10}"#,
    );
    assert!(
        wait_until(Duration::from_secs(15), || list(&d1, "")
            .is_some_and(|m| m.contains_key("bridge/b2"))),
        "a write on the joined peer did not reach the cluster"
    );

    // Its old shared configuration is in the automatic backup; its peer-specific part is unchanged.
    let backups: Vec<PathBuf> = std::fs::read_dir(d3.dir.join("state/backups"))
        .expect("no backup directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_backup.tar.gz"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let name = backups[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.contains("_CMT3_"),
        "backup name carries the serial: {name}"
    );
    let old = backup_store(&backups[0]).to_string();
    assert!(
        old.contains("bridge/own") && old.contains("location/own"),
        "backup lacks the old configuration: {old}"
    );
    assert_eq!(peer_part(&d3), before);
    let s = d3.status().unwrap();
    assert_eq!(s["hostname"], "conductor3");
    let log = String::from_utf8(d3.cli(&["log", "config"]).stdout).unwrap();
    assert!(log.contains("joined a cluster"), "{log}");
}

/// SPEC §2 rule 6 with no first peer: three standalone peers, each with shared configuration of
/// its own, are listed in one cluster at the same moment, so all three are joining and none holds
/// the cluster's content. The lowest address founds the cluster with the configuration it had
/// before; the other two take it (their own is in their automatic backups); all accept writes.
#[test]
fn peers_joining_all_at_once_take_the_lowest_addresss_configuration() {
    if !require_root("peers_joining_all_at_once_take_the_lowest_addresss_configuration") {
        return;
    }
    let topo = Topology::up("cmra", 3);
    let d: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::start(&topo, &PeerSpec::new(i, &[])))
        .collect();
    for x in &d {
        wait_started(x);
        set(
            x,
            &format!("bridge/own{}", x.i),
            &format!(r#"{{"uri": "sip:10.96.4.{}:5060", "capacity": 5}}"#, x.i),
        );
    }
    let founder = list(&d[0], "").unwrap();
    for x in &d {
        into_cluster_of_three(x);
    }
    let all: Vec<&Daemon> = d.iter().collect();
    assert!(
        wait_until(Duration::from_secs(20), || all_active(&all)),
        "the three did not form: {}",
        d[2].log()
    );
    let mut seen = Vec::new();
    let formed = wait_until(Duration::from_secs(20), || {
        seen = d.iter().map(|x| list(x, "")).collect();
        seen.iter().all(|m| m.as_ref() == Some(&founder))
            && d.iter().all(|x| {
                x.status()
                    .is_some_and(|s| s["replication"]["joining"] == false)
            })
    });
    assert!(
        formed,
        "not every peer holds peer 1's configuration {founder:?} and accepts writes: {seen:?}\n{}",
        d[1].log()
    );
    set(
        &d[2],
        "bridge/after",
        r#"{"uri": "sip:10.96.5.1:5060", "capacity": 10}"#,
    );
    assert!(
        wait_until(Duration::from_secs(15), || list(&d[0], "")
            .is_some_and(|m| m.contains_key("bridge/after"))),
        "a write on peer 3 did not reach peer 1"
    );
    let log = String::from_utf8(d[0].cli(&["log", "config"]).stdout).unwrap();
    assert!(log.contains("founded the cluster"), "{log}");
    for x in &d[1..] {
        let backups: Vec<PathBuf> = std::fs::read_dir(x.dir.join("state/backups"))
            .expect("no backup directory")
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            backups.iter().any(|b| backup_store(b)
                .to_string()
                .contains(&format!("bridge/own{}", x.i))),
            "p{}'s own configuration is in none of its backups {backups:?}",
            x.i
        );
    }
}

/// Issue 5 acceptance 5 through the CLI and a running daemon: `confmesh backup`, plain and with a
/// password, then `confmesh restore` brings the shared configuration back; a backup of another
/// peer (its serial), a wrong password and a damaged file are each refused with a message naming
/// the cause, and leave the store and the configuration file exactly as they were.
#[test]
fn backup_and_restore_round_trip_and_refusals_change_nothing() {
    if !require_root("backup_and_restore_round_trip_and_refusals_change_nothing") {
        return;
    }
    let topo = Topology::up("cmbk", 2);
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[]));
    wait_started(&d1);
    wait_started(&d2);
    set(
        &d1,
        "bridge/b1",
        r#"{"uri": "sip:10.96.4.1:5060", "capacity": 20}"#,
    );
    set(&d1, "location/l1", r#"{"limit_kbps": 1000}"#);
    let saved = list(&d1, "").unwrap();
    let password = d1.dir.join("backup-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let wrong = d1.dir.join("wrong-password");
    std::fs::write(&wrong, "not the password\n").unwrap();
    let backup_path = |out: Output| PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let plain = backup_path(d1.cli_ok(&["backup"]));
    let pw = password.to_str().unwrap();
    let encrypted = backup_path(d1.cli_ok(&["backup", "--password-file", pw]));
    assert!(
        plain.to_string_lossy().ends_with("_backup.tar.gz"),
        "{plain:?}"
    );
    assert!(
        encrypted.to_string_lossy().ends_with("_backup.tar.gz.enc"),
        "{encrypted:?}"
    );
    let foreign = backup_path(d2.cli_ok(&["backup"]));
    let damaged = d1.dir.join("damaged_backup.tar.gz");
    let mut bytes = std::fs::read(&plain).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&damaged, bytes).unwrap();

    // The state the refusals must leave alone: changed since the backups.
    set(
        &d1,
        "bridge/b1",
        r#"{"uri": "sip:10.96.4.9:5060", "capacity": 5}"#,
    );
    d1.cli_ok(&["config", "delete", "location/l1"]);
    set(
        &d1,
        "bridge/b2",
        r#"{"uri": "sip:10.96.4.2:5060", "capacity": 10}"#,
    );
    let now = list(&d1, "").unwrap();
    assert_ne!(now, saved);
    let config_text = std::fs::read_to_string(&d1.config).unwrap();
    for (args, cause) in [
        (vec!["restore", foreign.to_str().unwrap()], "serial"),
        (
            vec![
                "restore",
                encrypted.to_str().unwrap(),
                "--password-file",
                wrong.to_str().unwrap(),
            ],
            "password",
        ),
        (vec!["restore", damaged.to_str().unwrap()], "damaged"),
    ] {
        let out = d1.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was not refused");
        assert!(
            err.contains("nothing changed") && err.to_lowercase().contains(cause),
            "{args:?}: the message does not name the cause ({cause}): {err}"
        );
        assert_eq!(list(&d1, "").unwrap(), now, "{args:?} changed the store");
        assert_eq!(
            std::fs::read_to_string(&d1.config).unwrap(),
            config_text,
            "{args:?} changed the configuration file"
        );
    }

    d1.cli_ok(&["restore", plain.to_str().unwrap()]);
    assert_eq!(list(&d1, "").unwrap(), saved, "plain backup not restored");
    set(
        &d1,
        "bridge/b3",
        r#"{"uri": "sip:10.96.4.3:5060", "capacity": 1}"#,
    );
    d1.cli_ok(&[
        "restore",
        encrypted.to_str().unwrap(),
        "--password-file",
        pw,
    ]);
    assert_eq!(
        list(&d1, "").unwrap(),
        saved,
        "encrypted backup not restored"
    );
    // Restored content is live: it takes writes again.
    set(
        &d1,
        "bridge/b4",
        r#"{"uri": "sip:10.96.4.4:5060", "capacity": 2}"#,
    );
    assert!(list(&d1, "").unwrap().contains_key("bridge/b4"));
}

/// The sync port (and the hellos) listen on the overlay's TUN device only: a host on the
/// management network that routes an overlay address to a peer reaches nothing, while the other
/// peer, through its AH SA, connects.
#[test]
fn sync_port_answers_only_through_the_overlay() {
    if !require_root("sync_port_answers_only_through_the_overlay") {
        return;
    }
    let topo = Topology::up("cmrs", 2);
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2]));
    assert!(
        wait_until(Duration::from_secs(20), || all_active(&[&d1, &d2])),
        "1+2 did not form: {}",
        d1.log()
    );
    let connect = |ns: &str| {
        topo.exec(
            ns,
            &[
                "timeout",
                "3",
                "bash",
                "-c",
                "exec 3<>/dev/tcp/198.18.0.1/7002",
            ],
        )
        .status
        .success()
    };
    assert!(
        connect("p2"),
        "peer 2 cannot reach peer 1's sync port over the overlay"
    );
    let route = topo.exec("r", &["ip", "route", "add", "198.18.0.1/32", "dev", "p1"]);
    assert!(
        route.status.success(),
        "{}",
        String::from_utf8_lossy(&route.stderr)
    );
    assert!(
        !connect("r"),
        "the sync port accepted a connection that did not come through an SA"
    );
    assert!(
        topo.exec("r", &["ping", "-c", "1", "-W", "2", "10.96.0.1"])
            .status
            .success(),
        "the router cannot reach peer 1 at all"
    );

    // A write that waits for the other peer is on it when acknowledged; with the peer gone it is
    // refused as not replicated, yet durable here.
    let out = d1.cli(&[
        "config",
        "set",
        "location/waited",
        r#"{"limit_kbps": 64}"#,
        "--wait-peers",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let there = d2.cli(&["config", "get", "location/waited"]);
    assert!(
        String::from_utf8_lossy(&there.stdout).contains("64"),
        "not on peer 2 when acknowledged"
    );
    let mut d2 = d2;
    d2.kill();
    let out = d1.cli(&[
        "config",
        "set",
        "location/alone",
        r#"{"limit_kbps": 32}"#,
        "--wait-peers",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("durable on this peer"),
        "{err}"
    );
    assert!(
        d1.cli(&["config", "get", "location/alone"])
            .status
            .success(),
        "the write stays durable locally"
    );
}
