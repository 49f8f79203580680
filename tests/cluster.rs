//! Issue 4 acceptance: the cluster daemon in network namespaces (run as root; CI does).

mod support;

use std::time::{Duration, Instant};

use support::*;

const FORM: Duration = Duration::from_secs(10);

fn all_active(daemons: &[&Daemon], peers: &[u8]) -> bool {
    daemons.iter().all(|d| {
        peers.iter().all(|&j| {
            if j == d.i {
                shows(d, j, "this-system", None)
            } else {
                shows(d, j, "active", None)
            }
        })
    })
}

#[test]
fn three_peers_form_a_cluster_within_ten_seconds() {
    if !require_root("three_peers_form_a_cluster_within_ten_seconds") {
        return;
    }
    let topo = Topology::up("cmcf", 3);
    let start = Instant::now();
    let d: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::start(&topo, &PeerSpec::new(i, &[1, 2, 3])))
        .collect();
    let refs: Vec<&Daemon> = d.iter().collect();
    let formed = wait_until(FORM, || all_active(&refs, &[1, 2, 3]));
    assert!(
        formed,
        "not formed in {FORM:?}: {:#?}\n{}",
        d[0].status(),
        d[0].log()
    );
    eprintln!("cluster formed in {:?}", start.elapsed());
    let s = d[0].status().unwrap();
    assert_eq!(s["mode"], "cluster");
    assert_eq!(s["hostname"], "conductor1");
    let p2 = d[0].peer(2).unwrap();
    assert_eq!(p2["hostname"], "conductor2");
    assert_eq!(p2["ike"], "established");
    assert!(p2["sas"].as_u64().unwrap() >= 2, "{p2}");
    assert!(p2["rtt_ms"].as_f64().unwrap() < 15.0);
    assert_eq!(p2["overlay_addr"], "198.18.0.2");
    let table = String::from_utf8(d[1].cli(&["status"]).stdout).unwrap();
    assert!(
        table.contains("This system") && table.contains("Active as conductor1"),
        "{table}"
    );
}

#[test]
fn psk_mismatch_is_authentication_failed_until_fixed_live() {
    if !require_root("psk_mismatch_is_authentication_failed_until_fixed_live") {
        return;
    }
    let topo = Topology::up("cmpk", 3);
    // At debug level, so that a key slipping into any diagnostic would show.
    let spec = |i| PeerSpec {
        log_level: "debug",
        ..PeerSpec::new(i, &[1, 2, 3])
    };
    let d1 = Daemon::start(&topo, &spec(1));
    let d2 = Daemon::start(&topo, &spec(2));
    let mut bad = spec(3);
    bad.psk = "a-different-pre-shared-key".into();
    let d3 = Daemon::start(&topo, &bad);
    let refused = wait_until(Duration::from_secs(20), || {
        shows(&d1, 3, "not-active", Some("authentication-failed"))
            && shows(&d2, 3, "not-active", Some("authentication-failed"))
            && shows(&d3, 1, "not-active", Some("authentication-failed"))
    });
    assert!(refused, "{:#?}\n{:#?}", d1.peer(3), d3.peer(1));
    assert!(wait_until(FORM, || shows(&d1, 2, "active", None)));
    // Fix the key live: write it and reload; no daemon restarts.
    std::fs::write(&d3.psk_file, PeerSpec::new(3, &[]).psk).unwrap();
    assert!(d3.cli(&["reload"]).status.success());
    let fixed = wait_until(Duration::from_secs(20), || {
        all_active(&[&d1, &d2, &d3], &[1, 2, 3])
    });
    assert!(fixed, "{:#?}\n{:#?}", d1.peer(3), d3.peer(1));
    let hex = |k: &str| k.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for d in [&d1, &d2, &d3] {
        let logs = d.all_logs();
        assert!(
            logs.contains("authentication failed"),
            "peer {}: the refusal is logged",
            d.i
        );
        for key in [
            PeerSpec::new(1, &[]).psk,
            "a-different-pre-shared-key".into(),
        ] {
            for form in [key.clone(), hex(&key), hex(&key).to_uppercase()] {
                assert!(
                    !logs.contains(&form),
                    "peer {}: the key must never reach a log ({form})",
                    d.i
                );
            }
        }
    }
}

#[test]
fn mismatches_are_refused_with_their_own_reason() {
    if !require_root("mismatches_are_refused_with_their_own_reason") {
        return;
    }
    let topo = Topology::up("cmmm", 2);
    // Version: peer 2 reports another version.
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let mut v = PeerSpec::new(2, &[1, 2]);
    v.version = Some("9.9.9".into());
    let mut d2 = Daemon::start(&topo, &v);
    assert!(
        wait_until(FORM, || shows(
            &d1,
            2,
            "not-active",
            Some("version-mismatch")
        ) && shows(
            &d2,
            1,
            "not-active",
            Some("version-mismatch")
        )),
        "{:#?} {:#?}",
        d1.peer(2),
        d2.peer(1)
    );
    assert!(
        d1.peer(2).unwrap()["detail"]
            .as_str()
            .unwrap()
            .contains("9.9.9")
    );
    d2.stop();
    drop(d2);
    drop(d1);
    // Licence: full against select.
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let mut s = PeerSpec::new(2, &[1, 2]);
    s.licence = "select";
    let d2 = Daemon::start(&topo, &s);
    assert!(
        wait_until(FORM, || shows(
            &d1,
            2,
            "not-active",
            Some("licence-mismatch")
        ) && shows(
            &d2,
            1,
            "not-active",
            Some("licence-mismatch")
        )),
        "{:#?} {:#?}",
        d1.peer(2),
        d2.peer(1)
    );
    drop(d2);
    drop(d1);
    // Peer list: peer 1 lists a third peer that peer 2 does not.
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2, 3]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2]));
    assert!(
        wait_until(FORM, || shows(
            &d1,
            2,
            "not-active",
            Some("peer-list-mismatch")
        ) && shows(
            &d2,
            1,
            "not-active",
            Some("peer-list-mismatch")
        )),
        "{:#?} {:#?}",
        d1.peer(2),
        d2.peer(1)
    );
    // A select licence with three peers is refused at start, naming the licence.
    let mut sel3 = PeerSpec::new(1, &[1, 2, 3]);
    sel3.licence = "select";
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[peer]\nhostname=\"x\"\nserial=\"S\"\nmgmt_addr=\"10.96.0.1\"\nrendezvous_addrs=[\"10.96.1.1\"]\nstate_dir=\"{}\"\n\
             [cluster]\npeers=[\"10.96.0.1\",\"10.96.0.2\",\"10.96.0.3\"]\npsk_file=\"/nonexistent\"\nlicence=\"select\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster.licence"));
}

#[test]
fn partition_is_unreachable_within_three_seconds_then_heals() {
    if !require_root("partition_is_unreachable_within_three_seconds_then_heals") {
        return;
    }
    let topo = Topology::up("cmpt", 3);
    let d: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::start(&topo, &PeerSpec::new(i, &[1, 2, 3])))
        .collect();
    let refs: Vec<&Daemon> = d.iter().collect();
    assert!(wait_until(FORM, || all_active(&refs, &[1, 2, 3])));
    topo.path(3, &["cut"]);
    let cut_at = Instant::now();
    assert!(wait_until(Duration::from_secs(3), || shows(
        &d[0],
        3,
        "not-active",
        Some("unreachable")
    ) && shows(
        &d[1],
        3,
        "not-active",
        Some("unreachable")
    )));
    eprintln!("unreachable shown after {:?}", cut_at.elapsed());
    assert!(shows(&d[0], 2, "active", None));
    topo.path(3, &["heal"]);
    assert!(
        wait_until(FORM, || all_active(&refs, &[1, 2, 3])),
        "{:#?}",
        d[0].peer(3)
    );
}

#[test]
fn latency_over_fifteen_ms_raises_alarm_on_both_ends() {
    if !require_root("latency_over_fifteen_ms_raises_alarm_on_both_ends") {
        return;
    }
    let topo = Topology::up("cmlt", 2);
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2]));
    assert!(wait_until(FORM, || all_active(&[&d1, &d2], &[1, 2])));
    // 20 ms one way on the path between them, both directions.
    assert!(
        d1.cli(&["faults", "10.96.0.2", "--delay-ms", "20"])
            .status
            .success()
    );
    assert!(
        d2.cli(&["faults", "10.96.0.1", "--delay-ms", "20"])
            .status
            .success()
    );
    let alarmed = |d: &Daemon| {
        d.status().is_some_and(|s| {
            s["alarms"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["kind"] == "latency"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(15), || alarmed(&d1) && alarmed(&d2)),
        "{:#?}",
        d1.status()
    );
    let rtt = d1.peer(2).unwrap()["rtt_ms"].as_f64().unwrap();
    assert!(rtt > 35.0, "rtt {rtt}");
    let alarms = String::from_utf8(d1.cli(&["alarms"]).stdout).unwrap();
    assert!(alarms.contains("latency"), "{alarms}");
    assert!(d1.cli(&["faults", "10.96.0.2"]).status.success());
    assert!(d2.cli(&["faults", "10.96.0.1"]).status.success());
    assert!(wait_until(Duration::from_secs(15), || !alarmed(&d1) && !alarmed(&d2)));
    let log = String::from_utf8(d1.cli(&["log", "events"]).stdout).unwrap();
    assert!(
        log.contains("alarm raised") && log.contains("alarm cleared"),
        "{log}"
    );
}

#[test]
fn reduced_path_mtu_stays_active_without_fragments() {
    if !require_root("reduced_path_mtu_stays_active_without_fragments") {
        return;
    }
    let topo = Topology::up("cmmt", 2);
    topo.path(2, &["mtu", "1280"]);
    // Capture everything crossing the router while the cluster forms and runs; fragments are
    // looked for when reading it back, so an empty or missing capture cannot pass as "none".
    let pcap = topo.dir.path().join("router.pcap");
    let mut dump = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.ns("r"),
            "tcpdump",
            "-U",
            "-n",
            "-i",
            "any",
            "-w",
        ])
        .arg(&pcap)
        .arg("ip")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    if !wait_until(Duration::from_secs(5), || pcap.exists()) {
        let _ = dump.kill();
        let _ = dump.wait();
        panic!("tcpdump did not start");
    }
    std::thread::sleep(Duration::from_millis(500));
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2]));
    let ok = wait_until(Duration::from_secs(15), || {
        all_active(&[&d1, &d2], &[1, 2])
            && d1
                .peer(2)
                .is_some_and(|p| p["path_mtu"].as_u64().is_some_and(|m| m <= 1280))
    });
    // Overlay traffic larger than the path: whether the kernel adapts or reports "message too
    // long" is the dataplane's business (its own tests); here only the wire matters.
    for size in ["1400", "1200", "1000"] {
        let _ = topo.exec(
            "p1",
            &["ping", "-c", "2", "-W", "1", "-s", size, "198.18.0.2"],
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = std::process::Command::new("kill")
        .arg(dump.id().to_string())
        .status();
    let _ = dump.wait();
    assert!(ok, "{:#?}\n{:#?}", d1.peer(2), d2.peer(1));
    let read = |filter: &str| {
        let out = std::process::Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&pcap)
            .arg(filter)
            .output()
            .expect("tcpdump -r");
        assert!(
            out.status.success(),
            "tcpdump -r failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ah = read("ip proto 51").lines().count();
    assert!(
        ah > 10,
        "the capture holds only {ah} AH packets: it did not see the cluster"
    );
    let frags = read("ip[6:2] & 0x3fff != 0");
    assert!(frags.is_empty(), "fragments on the wire:\n{frags}");
}

#[test]
fn standalone_and_removing_a_dead_peer_are_live() {
    if !require_root("standalone_and_removing_a_dead_peer_are_live") {
        return;
    }
    let topo = Topology::up("cmsa", 3);
    let d1 = Daemon::start(&topo, &PeerSpec::new(1, &[1, 2, 3]));
    let d2 = Daemon::start(&topo, &PeerSpec::new(2, &[1, 2, 3]));
    let mut d3 = Daemon::start(&topo, &PeerSpec::new(3, &[1, 2, 3]));
    assert!(wait_until(FORM, || all_active(
        &[&d1, &d2, &d3],
        &[1, 2, 3]
    )));
    // Peer 3 dies; the survivors drop it without its help.
    d3.kill();
    assert!(wait_until(Duration::from_secs(5), || shows(
        &d1,
        3,
        "not-active",
        Some("unreachable")
    )));
    for d in [&d1, &d2] {
        let out = d.cli(&["peers", "remove", "10.96.0.3"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(d.peer(3).is_none());
    }
    assert!(wait_until(Duration::from_secs(5), || all_active(
        &[&d1, &d2],
        &[1, 2]
    )));
    // Peer 2 goes standalone; peer 1 sees it go and removes it.
    let out = d2.cli(&["standalone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d2.status().unwrap()["mode"], "standalone");
    assert!(wait_until(Duration::from_secs(5), || shows(
        &d1,
        2,
        "not-active",
        Some("unreachable")
    )));
    assert!(d1.cli(&["peers", "remove", "10.96.0.2"]).status.success());
    assert_eq!(d1.status().unwrap()["mode"], "standalone");
    let cfg = std::fs::read_to_string(&d1.config).unwrap();
    assert!(
        cfg.contains("peers = []"),
        "the change is written back: {cfg}"
    );
    let log = String::from_utf8(d1.cli(&["log", "config"]).stdout).unwrap();
    assert!(
        log.contains("peers remove 10.96.0.3") && log.contains("peers remove 10.96.0.2"),
        "{log}"
    );
}
