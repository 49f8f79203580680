//! Issue 6 acceptance 1–5 with real daemons in the namespace topology (as root; CI is): sipp plays
//! the VCS in `${P}vcs` and the conference bridges in `${P}b1`/`${P}b2` (netns-scripts/bridge.sh,
//! which also answers the OPTIONS health probes); the daemons route on the replicated store and
//! admit on the bandwidth updates keyed from their IKE SAs.
//!
//! Every sipp is stopped by PID when its test ends; topologies are removed by their Drop guard.
//! Forged, replayed and oversize UDP 1719 datagrams (acceptance 5, second part) are covered by
//! tests/bandwidth_udp.rs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use confmesh::b2bua::RoutingConfig;
use confmesh::b2bua::routing::rank_bridges;
use serde_json::{Value, json};
use support::*;

/// Local SIP ports of the VCS-side sipps (each needs its own).
static VCS_PORT: AtomicU16 = AtomicU16::new(5100);

/// The sipps of this topology: bridges in the bridge namespaces, the VCS in `${P}vcs`.
impl Sipp {
    /// A bridge in `${P}b<n>` on 10.96.4.n:`port` (stops by itself after two minutes at the latest).
    fn bridge(topo: &Topology, n: u8, port: u16) -> Sipp {
        let mut cmd =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("netns-scripts/bridge.sh"));
        cmd.args([
            &topo.prefix,
            &n.to_string(),
            &port.to_string(),
            "-timeout",
            "120s",
        ]);
        Sipp::spawn(&format!("bridge 10.96.4.{n}:{port}"), cmd)
    }

    /// The VCS sending `calls` calls of scenario `scen` to peer `peer`'s rendezvous address.
    fn vcs(
        topo: &Topology,
        peer: u8,
        scen: &str,
        service: &str,
        calls: u32,
        extra: &[&str],
    ) -> Sipp {
        let port = VCS_PORT.fetch_add(1, Ordering::Relaxed).to_string();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &topo.ns("vcs"),
            "sipp",
            &format!("10.96.1.{peer}:5060"),
            "-sf",
            &sipp_scenario(scen).display().to_string(),
        ])
        .args([
            "-i",
            "10.96.3.1",
            "-p",
            &port,
            "-s",
            service,
            "-m",
            &calls.to_string(),
        ])
        .args(["-nostdin", "-timeout", "40s", "-timeout_error"])
        .args(extra);
        Sipp::spawn(&format!("vcs {scen} {service} to p{peer}"), cmd)
    }

    /// Waits (bounded) for exit and fails the test unless sipp ran its scenario through.
    fn expect_success(&mut self) {
        let code = self.wait(Duration::from_secs(45));
        self.assert_success(code);
    }
}

fn set(d: &Daemon, key: &str, value: &Value) {
    d.cli_ok(&["config", "set", key, &value.to_string()]);
}

fn delete(d: &Daemon, key: &str) {
    d.cli_ok(&["config", "delete", key]);
}

/// Waits until every daemon's shared configuration holds exactly `entries` under the routing
/// prefixes (then gives the B2BUAs' loaders a moment to apply it).
fn replicated(daemons: &[&Daemon], entries: &BTreeMap<String, Value>) {
    let same = |d: &Daemon| {
        let mut got = BTreeMap::new();
        for prefix in ["bridge/", "alias/", "location/", "sip/"] {
            let out = d.cli(&["config", "list", prefix]);
            if !out.status.success() {
                return false;
            }
            for l in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
            {
                let Some((k, v)) = l.split_once(' ') else {
                    return false;
                };
                got.insert(
                    k.to_owned(),
                    serde_json::from_str::<Value>(v).unwrap_or(Value::Null),
                );
            }
        }
        &got == entries
    };
    assert!(
        wait_until(Duration::from_secs(15), || daemons.iter().all(|d| same(d))),
        "configuration not replicated: {entries:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
}

fn routing(entries: &BTreeMap<String, Value>) -> RoutingConfig {
    let (cfg, errors) = RoutingConfig::from_entries(entries.iter().map(|(k, v)| (k.as_str(), v)));
    assert!(errors.is_empty(), "{errors:?}");
    cfg
}

/// A conference number (after `tag`) whose rendezvous choice is `bridge`.
fn conference_on(cfg: &RoutingConfig, tag: &str, bridge: &str) -> String {
    (0..10_000)
        .map(|n| format!("{tag}{n}"))
        .find(|n| rank_bridges(&format!("meet-{n}"), cfg.bridges.values())[0].name == bridge)
        .unwrap()
}

/// The `conferences` of a daemon's status: name → (bridge, calls).
fn conferences(d: &Daemon) -> Option<BTreeMap<String, (String, u64)>> {
    let s = d.status()?;
    Some(
        s["conferences"]
            .as_array()?
            .iter()
            .filter_map(|c| {
                Some((
                    c["name"].as_str()?.to_owned(),
                    (c["bridge"].as_str()?.to_owned(), c["calls"].as_u64()?),
                ))
            })
            .collect(),
    )
}

fn location_usage(d: &Daemon) -> Option<u64> {
    d.status()?["bandwidth"]["locations"]["default"]["cluster_kbps"].as_u64()
}

/// `confmesh_sip_bridge_up` of `bridge` on daemon `d`'s /metrics.
fn bridge_up(topo: &Topology, d: &Daemon, bridge: &str) -> Option<bool> {
    let url = format!("http://10.96.0.{}:8443/metrics", d.i);
    let out = topo.exec(
        &format!("p{}", d.i),
        &["/usr/bin/python3", "-c", &format!("import urllib.request;print(urllib.request.urlopen('{url}',timeout=2).read().decode())")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("confmesh_sip_bridge_up{{bridge=\"{bridge}\"}}")))?;
    Some(line.ends_with(" 1"))
}

/// Sets every entry on daemon `d` and waits until all of `daemons` hold exactly them.
fn configure(d: &Daemon, daemons: &[&Daemon], entries: &BTreeMap<String, Value>) {
    for (k, v) in entries {
        set(d, k, v);
    }
    replicated(daemons, entries);
}

/// How many calls of conference `meet-<conf>` reached `bridge` (`None`: not one).
fn calls_on(bridge: &Sipp, conf: &str) -> Option<usize> {
    bridge
        .invites()
        .get(&format!("meet-{conf}"))
        .map(BTreeSet::len)
}

/// Whether daemon `d`'s status has conference `meet-<conf>` on `bridge` with `calls` calls.
fn holds(d: &Daemon, conf: &str, bridge: &str, calls: u64) -> bool {
    conferences(d)
        .is_some_and(|c| c.get(&format!("meet-{conf}")) == Some(&(bridge.to_owned(), calls)))
}

/// One call to conference `meet-<conf>` through peer `peer`, which must go through.
fn one_call(topo: &Topology, peer: u8, conf: &str) {
    Sipp::vcs(topo, peer, "uac_call.xml", &format!("meet.{conf}"), 1, &[]).expect_success();
}

fn alias_and_location(limit_kbps: u64) -> BTreeMap<String, Value> {
    BTreeMap::from([
        (
            "alias/meet".to_owned(),
            json!({"pattern": "^meet\\.(\\w+)@", "conference": "meet-$1", "call_kbps": 768, "location": "default"}),
        ),
        (
            "location/default".to_owned(),
            json!({"limit_kbps": limit_kbps}),
        ),
    ])
}

/// Acceptance 1, 2, 3 and 5 on a two-peer cluster.
#[test]
fn conference_routing_across_two_peers() {
    if !require_root("conference_routing_across_two_peers") || !have_sipp() {
        return;
    }
    let t0 = Instant::now();
    let topo = Topology::up("cmbu", 2);
    let (d1, d2) = cluster_of_two(&topo, Duration::from_secs(30));
    eprintln!("{:?}: cluster formed", t0.elapsed());
    let ds = [&d1, &d2];
    // Four bridges: two sipps in each bridge namespace.
    let mut bridges: BTreeMap<&str, Sipp> = BTreeMap::from([
        ("b1", Sipp::bridge(&topo, 1, 5060)),
        ("b2", Sipp::bridge(&topo, 2, 5060)),
        ("b3", Sipp::bridge(&topo, 1, 5062)),
        ("b4", Sipp::bridge(&topo, 2, 5062)),
    ]);
    let mut entries = alias_and_location(1_000_000);
    // Bridges probed every second (a bridge that dies is noticed within two).
    entries.insert("sip/options_interval_ms".into(), json!(1000));
    for (name, host, port) in [
        ("b1", 1, 5060),
        ("b2", 2, 5060),
        ("b3", 1, 5062),
        ("b4", 2, 5062),
    ] {
        entries.insert(
            format!("bridge/{name}"),
            json!({"uri": format!("sip:10.96.4.{host}:{port}"), "capacity": 50}),
        );
    }
    configure(&d1, &ds, &entries);
    let cfg = routing(&entries);

    // Acceptance 2: 100 new conferences, each one's first two calls sent at the same moment to
    // peer 1 and to peer 2 (two sipps started together, one conference per call number).
    let run = std::process::id();
    let service = format!("meet.r{run}t");
    let rate = ["-r", "40", "-l", "40"];
    let mut v1 = Sipp::vcs(&topo, 1, "uac_numbered.xml", &service, 100, &rate);
    let mut v2 = Sipp::vcs(&topo, 2, "uac_numbered.xml", &service, 100, &rate);
    v1.expect_success();
    v2.expect_success();
    let mut placed: BTreeMap<String, Vec<(&str, usize)>> = BTreeMap::new();
    for (name, b) in &bridges {
        for (conf, calls) in b.invites() {
            placed.entry(conf).or_default().push((*name, calls.len()));
        }
    }
    let mut used = BTreeSet::new();
    for t in 1..=100 {
        let conf = format!("meet-r{run}t{t}");
        let on = placed.get(&conf).cloned().unwrap_or_default();
        assert_eq!(on.len(), 1, "{conf}: calls reached {on:?}");
        let (bridge, calls) = on[0];
        assert_eq!(calls, 2, "{conf}: {calls} calls on {bridge}");
        assert_eq!(
            bridge,
            rank_bridges(&conf, cfg.bridges.values())[0].name,
            "{conf}: not the rendezvous choice"
        );
        used.insert(bridge);
    }
    assert!(used.len() >= 2, "100 conferences all on {used:?}");
    eprintln!(
        "{:?}: 100 concurrent first-call pairs, each on one bridge ({} bridges used)",
        t0.elapsed(),
        used.len()
    );

    // Acceptance 1: unknown alias → 404; CANCEL while the bridge rings and BYE from either side
    // end both dialogs (the conferences then disappear from both peers' status).
    let mut calls = vec![
        Sipp::vcs(&topo, 1, "uac_reject.xml", "nobody", 1, &[]),
        Sipp::vcs(&topo, 2, "uac_cancel.xml", "meet.cancel1", 2, &[]),
        Sipp::vcs(&topo, 1, "uac_wait_bye.xml", "meet.hangup1", 2, &[]),
        Sipp::vcs(&topo, 2, "uac_call.xml", "meet.1000", 2, &[]),
        Sipp::vcs(&topo, 1, "uac_call.xml", "meet.1000", 2, &[]),
    ];
    for c in &mut calls {
        c.expect_success();
    }
    let b1000: Vec<_> = bridges
        .iter()
        .filter(|(_, b)| b.invites().get("meet-1000").is_some_and(|c| c.len() == 4))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(
        b1000.len(),
        1,
        "meet-1000's four calls (two per peer) on one bridge"
    );
    assert!(
        bridges
            .values()
            .all(|b| !b.invites().contains_key("nobody"))
    );
    assert!(
        wait_until(Duration::from_secs(10), || ds
            .iter()
            .all(|d| conferences(d).is_some_and(|c| c.is_empty()))),
        "conferences left after every call ended: {:?} {:?}",
        conferences(&d1),
        conferences(&d2)
    );

    eprintln!("{:?}: 404, CANCEL, BYE from both sides", t0.elapsed());
    // Acceptance 3: bridge full → next. Two bridges of capacity 2.
    delete(&d2, "bridge/b3");
    delete(&d2, "bridge/b4");
    entries.remove("bridge/b3");
    entries.remove("bridge/b4");
    for name in ["b3", "b4"] {
        bridges.remove(name);
    }
    for (name, host) in [("b1", 1), ("b2", 2)] {
        let v = json!({"uri": format!("sip:10.96.4.{host}:5060"), "capacity": 2});
        set(&d2, &format!("bridge/{name}"), &v);
        entries.insert(format!("bridge/{name}"), v);
    }
    replicated(&ds, &entries);
    let cfg = routing(&entries);
    let full = conference_on(&cfg, "f", "b1");
    let mut held = Sipp::vcs(
        &topo,
        1,
        "uac_hold.xml",
        &format!("meet.{full}"),
        2,
        &["-d", "4500", "-l", "2"],
    );
    assert!(
        wait_until(Duration::from_secs(10), || ds
            .iter()
            .all(|d| holds(d, &full, "b1", 2))),
        "two held calls on b1 seen by both peers: {:?} {:?}",
        conferences(&d1),
        conferences(&d2)
    );
    Sipp::vcs(&topo, 2, "uac_busy.xml", &format!("meet.{full}"), 1, &[]).expect_success();
    let next = conference_on(&cfg, "g", "b1");
    one_call(&topo, 2, &next);
    assert_eq!(
        calls_on(&bridges["b2"], &next),
        Some(1),
        "b1 full: the new conference goes to b2"
    );
    held.expect_success();

    eprintln!("{:?}: bridge full → next", t0.elapsed());
    // Acceptance 3: bridge down before its conference starts → another bridge.
    bridges.get_mut("b1").unwrap().stop();
    assert!(
        wait_until(Duration::from_secs(6), || ds.iter().all(|d| bridge_up(
            &topo, d, "b1"
        ) == Some(
            false
        ))),
        "b1 not seen down by OPTIONS every second"
    );
    let down = conference_on(&cfg, "h", "b1");
    one_call(&topo, 1, &down);
    one_call(&topo, 2, &down);
    assert_eq!(calls_on(&bridges["b2"], &down), Some(2));

    eprintln!("{:?}: bridge down → next", t0.elapsed());
    // Acceptance 5: a location of two calls, calls spread over both peers.
    let loc = json!({"limit_kbps": 1536});
    set(&d1, "location/default", &loc);
    entries.insert("location/default".into(), loc);
    replicated(&ds, &entries);
    let mut first = Sipp::vcs(&topo, 1, "uac_hold.xml", "meet.l1", 1, &["-d", "5000"]);
    assert!(
        wait_until(Duration::from_secs(10), || location_usage(&d2) == Some(768)),
        "peer 2 hears of peer 1's call"
    );
    let mut second = Sipp::vcs(&topo, 2, "uac_hold.xml", "meet.l2", 1, &["-d", "30000"]);
    assert!(
        wait_until(Duration::from_secs(10), || location_usage(&d1)
            == Some(1536)),
        "peer 1 hears of peer 2's call"
    );
    Sipp::vcs(&topo, 1, "uac_refused.xml", "meet.l3", 1, &[]).expect_success();
    Sipp::vcs(&topo, 2, "uac_refused.xml", "meet.l1", 1, &[]).expect_success();
    assert!(
        first.running() && second.running(),
        "both held calls still up while the third is refused"
    );
    first.expect_success();
    // Admission on peer 2 needs both: the location's usage (bandwidth updates) and the bridge's
    // participant count (replicated store) — they travel separately, either may arrive first.
    assert!(
        wait_until(Duration::from_secs(10), || location_usage(&d2) == Some(768)
            && conferences(&d2).is_some_and(|c| !c.contains_key("meet-l1"))),
        "peer 2 hears that the call ended: usage {:?}, conferences {:?}",
        location_usage(&d2),
        conferences(&d2)
    );
    Sipp::vcs(&topo, 2, "uac_call.xml", "meet.l4", 1, &[]).expect_success();
    second.stop();
    eprintln!("{:?}: location limit across peers", t0.elapsed());
}

/// Acceptance 4: a peer is killed with calls up; the VCS re-sends to the next peer address, and
/// the surviving peer routes to the conference's existing bridge — not to the bridge rendezvous
/// hashing would pick for it now.
#[test]
fn surviving_peer_routes_to_the_existing_bridge() {
    if !require_root("surviving_peer_routes_to_the_existing_bridge") || !have_sipp() {
        return;
    }
    let topo = Topology::up("cmbk", 2);
    let (mut d1, d2) = cluster_of_two(&topo, Duration::from_secs(30));
    let b1 = Sipp::bridge(&topo, 1, 5060);
    let b2 = Sipp::bridge(&topo, 2, 5060);
    let mut entries = alias_and_location(1_000_000);
    entries.insert(
        "bridge/b2".into(),
        json!({"uri": "sip:10.96.4.2:5060", "capacity": 20}),
    );
    configure(&d1, &[&d1, &d2], &entries);
    // A conference that b1 would win, placed on b2 while b2 is the only bridge.
    let mut all = entries.clone();
    all.insert(
        "bridge/b1".into(),
        json!({"uri": "sip:10.96.4.1:5060", "capacity": 20}),
    );
    let conf = conference_on(&routing(&all), "k", "b1");
    let mut held = Sipp::vcs(
        &topo,
        1,
        "uac_hold.xml",
        &format!("meet.{conf}"),
        1,
        &["-d", "30000"],
    );
    assert!(
        wait_until(Duration::from_secs(10), || holds(&d2, &conf, "b2", 1)),
        "peer 2 sees the conference on b2: {:?}",
        conferences(&d2)
    );
    set(&d1, "bridge/b1", &all["bridge/b1"]);
    replicated(&[&d1, &d2], &all);
    d1.kill();
    // The VCS: peer 1 does not answer, so the call is sent again to the next address.
    let failed = Sipp::vcs(
        &topo,
        1,
        "uac_call.xml",
        &format!("meet.{conf}"),
        1,
        &["-recv_timeout", "3000"],
    )
    .wait(Duration::from_secs(20));
    assert_ne!(failed, 0, "a killed peer answered");
    one_call(&topo, 2, &conf);
    assert_eq!(calls_on(&b2, &conf), Some(2), "b2 trace:\n{}", b2.log());
    assert!(
        !b1.invites().contains_key(&format!("meet-{conf}")),
        "a call went to b1:\n{}",
        b1.log()
    );
    held.stop();
}
