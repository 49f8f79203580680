//! The B2BUA against sipp (Debian's sip-tester) over loopback: sipp plays the VCS (UAC) and the
//! bridges (UAS, one instance per loopback address), confmesh sits in between with an in-memory
//! conference directory and ledger standing in for the replicated store.
//!
//! One test puts two peers' bandwidth services (UDP 1719 on loopback) under the B2BUAs instead.
//!
//! Every sipp runs with a global timeout and is stopped by PID when the test ends. Each test uses
//! its own 127.0.x.0/24 so the tests can run in parallel.

mod support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confmesh::b2bua::core::CoreConfig;
use confmesh::b2bua::routing::rank_bridges;
use confmesh::b2bua::{
    B2buaService, B2buaSettings, BandwidthLedger, MemoryDirectory, MemoryLedger, RoutingConfig,
};
use confmesh::bandwidth::{BandwidthService, BandwidthSettings};
use confmesh::sip::transaction::TimerConfig;
use serde_json::json;
use support::{Sipp, have_sipp, sipp_scenario};
use tokio::sync::watch;

/// sipp itself on loopback, ended by its own global timeout at the latest.
impl Sipp {
    fn start(name: &str, args: &[&str]) -> Sipp {
        let mut cmd = Command::new("sipp");
        cmd.args(args)
            .args(["-nostdin", "-timeout", "30s", "-timeout_error"]);
        Sipp::spawn(name, cmd)
    }
}

fn routing(net: u8, bridges: &[(&str, u8)]) -> RoutingConfig {
    routing_limited(net, bridges, 100_000)
}

/// Calls take 768 kbps of location "default", which allows `limit_kbps`.
fn routing_limited(net: u8, bridges: &[(&str, u8)], limit_kbps: u64) -> RoutingConfig {
    let mut entries = vec![
        (
            "alias/meet".to_owned(),
            json!({"pattern": "^meet\\.(\\d+)@", "conference": "meet-$1", "call_kbps": 768, "location": "default"}),
        ),
        (
            "location/default".to_owned(),
            json!({"limit_kbps": limit_kbps}),
        ),
    ];
    for (name, host) in bridges {
        entries.push((
            format!("bridge/{name}"),
            json!({"uri": format!("sip:127.0.{net}.{host}:5060"), "capacity": 20}),
        ));
    }
    let (cfg, errors) = RoutingConfig::from_entries(entries.iter().map(|(k, v)| (k.as_str(), v)));
    assert!(errors.is_empty(), "{errors:?}");
    cfg
}

/// The SIP timer T1 of the B2BUAs, but where a test wants failover to come sooner.
const T1: Duration = Duration::from_millis(500);

/// The SIP address of host `host` of the test's 127.0.`net`.0/24.
fn sip_addr(net: u8, host: u8) -> String {
    format!("127.0.{net}.{host}:5060")
}

/// A B2BUA (a peer) on 127.0.`net`.`host`, port 5060.
async fn start_b2bua<L: BandwidthLedger>(
    net: u8,
    host: u8,
    cfg: RoutingConfig,
    dir: MemoryDirectory,
    ledger: L,
    t1: Duration,
) -> B2buaService {
    // The sender is dropped at once: the configuration stays as given.
    let (_, rx) = watch::channel(Arc::new(cfg));
    let settings = B2buaSettings {
        listen: vec![sip_addr(net, host).parse::<SocketAddr>().unwrap()],
        core: CoreConfig {
            hostname: "cm-test".into(),
            timers: TimerConfig {
                t1,
                ..TimerConfig::default()
            },
            options_interval: Duration::ZERO,
            ..CoreConfig::default()
        },
        // Two cores whatever the machine: every scenario also checks that each message of a
        // call reaches the core that holds it (B legs carry their core's Call-ID prefix).
        shards: 2,
    };
    B2buaService::start(settings, dir, ledger, rx)
        .await
        .expect("bind B2BUA")
}

/// The single-peer scenarios' B2BUA: on 127.0.`net`.1, routing to bridge b1 on .2, with a
/// ledger of its own.
async fn one_peer_one_bridge(net: u8, dir: MemoryDirectory) -> B2buaService {
    let cfg = routing(net, &[("b1", 2)]);
    start_b2bua(net, 1, cfg, dir, MemoryLedger::default(), T1).await
}

/// A bridge on 127.0.`net`.`host`, port 5060, playing scenario `scen`.
fn uas(net: u8, host: u8, scen: &str) -> Sipp {
    let ip = format!("127.0.{net}.{host}");
    Sipp::start(
        &format!("bridge {ip}"),
        &[
            "-sf",
            sipp_scenario(scen).to_str().unwrap(),
            "-i",
            &ip,
            "-p",
            "5060",
        ],
    )
}

/// The VCS on 127.0.`net`.`host` sending `calls` calls of scenario `scen` to `service` through the
/// peer on 127.0.`net`.`peer`.
fn uac(net: u8, host: u8, peer: u8, scen: &str, service: &str, calls: u32, extra: &[&str]) -> Sipp {
    let ip = format!("127.0.{net}.{host}");
    let target = sip_addr(net, peer);
    let calls = calls.to_string();
    let path = sipp_scenario(scen);
    let mut args = vec![
        target.as_str(),
        "-sf",
        path.to_str().unwrap(),
        "-i",
        &ip,
        "-p",
        "5060",
        "-s",
        service,
    ];
    args.extend_from_slice(&["-m", &calls, "-l", "4", "-r", "20"]);
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Sipp::start(&format!("vcs {ip}"), &refs)
}

/// Gives the bridge sipps just started the moment they need to bind before the first call.
async fn bridges_bound() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Waits (bounded) until `total` calls have been seen and none is left in progress.
async fn wait_idle(svc: &B2buaService, total: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let st = svc.status().stats;
        if st.calls_active == 0 && st.calls_total >= total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("calls still active: {:?}", svc.status());
}

async fn expect_success(s: &mut Sipp) {
    let code = s.wait_async(Duration::from_secs(40)).await;
    s.assert_success(code);
}

/// Acceptance 1: calls for one conference arriving at two peers reach the same bridge, over UDP
/// and TCP; the other conference's bridge follows rendezvous hashing; SDP passes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conference_one_bridge_from_two_peers() {
    if !have_sipp() {
        return;
    }
    let net = 61;
    let cfg = routing(net, &[("b1", 2), ("b2", 3)]);
    let (dir, ledger) = (MemoryDirectory::default(), MemoryLedger::default());
    let p1 = start_b2bua(net, 1, cfg.clone(), dir.clone(), ledger.clone(), T1).await;
    let p2 = start_b2bua(net, 11, cfg.clone(), dir.clone(), ledger.clone(), T1).await;
    let b1 = uas(net, 2, "uas_answer.xml");
    let b2 = uas(net, 3, "uas_answer.xml");
    bridges_bound().await;

    let mut v1 = uac(net, 21, 1, "uac_call.xml", "meet.1000", 3, &[]);
    let mut v2 = uac(net, 22, 11, "uac_call.xml", "meet.1000", 3, &["-t", "t1"]);
    let mut v3 = uac(net, 23, 1, "uac_call.xml", "meet.2000", 2, &[]);
    expect_success(&mut v1).await;
    expect_success(&mut v2).await;
    expect_success(&mut v3).await;
    wait_idle(&p1, 5).await;
    wait_idle(&p2, 3).await;

    let want_1000 = rank_bridges("meet-1000", cfg.bridges.values())[0]
        .name
        .clone();
    let want_2000 = rank_bridges("meet-2000", cfg.bridges.values())[0]
        .name
        .clone();
    let count = |b: &str| {
        if b == "b1" {
            b1.call_ids().len()
        } else {
            b2.call_ids().len()
        }
    };
    let expected_b1 = [(&want_1000, 6), (&want_2000, 2)]
        .iter()
        .filter(|(b, _)| b.as_str() == "b1")
        .map(|(_, n)| n)
        .sum::<usize>();
    assert_eq!(count("b1"), expected_b1, "b1 trace:\n{}", b1.log());
    assert_eq!(count("b2"), 8 - expected_b1, "b2 trace:\n{}", b2.log());
    assert_eq!(p1.status().stats.calls_answered, 5);
    assert_eq!(p2.status().stats.calls_answered, 3);
    // Every call ended on both legs: the directory is empty again and bandwidth is back to zero.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(dir.snapshot().is_empty(), "{:?}", dir.snapshot());
    assert_eq!(ledger.usage_kbps("default"), 0);
    p1.shutdown().await;
    p2.shutdown().await;
}

/// Unknown alias → 404, ACKed, nothing reaches a bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_alias_is_404() {
    if !have_sipp() {
        return;
    }
    let net = 62;
    let p = one_peer_one_bridge(net, MemoryDirectory::default()).await;
    let mut v = uac(net, 21, 1, "uac_reject.xml", "nobody", 2, &[]);
    expect_success(&mut v).await;
    wait_idle(&p, 2).await;
    assert_eq!(p.status().stats.calls_failed, 2);
    p.shutdown().await;
}

/// CANCEL while the bridge rings ends both dialogs (200/487 to the caller, CANCEL/487/ACK toward
/// the bridge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_ringing() {
    if !have_sipp() {
        return;
    }
    let net = 63;
    let dir = MemoryDirectory::default();
    let p = one_peer_one_bridge(net, dir.clone()).await;
    let mut b = uas(net, 2, "uas_cancel.xml");
    bridges_bound().await;
    let mut v = uac(net, 21, 1, "uac_cancel.xml", "meet.5", 2, &[]);
    expect_success(&mut v).await;
    wait_idle(&p, 2).await;
    assert_eq!(p.status().stats.calls_cancelled, 2);
    assert_eq!(b.call_ids().len(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(dir.snapshot().is_empty());
    assert!(b.running(), "bridge sipp died:\n{}", b.log());
    p.shutdown().await;
}

/// BYE from the bridge side reaches the caller and ends both dialogs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bye_from_the_bridge() {
    if !have_sipp() {
        return;
    }
    let net = 64;
    let p = one_peer_one_bridge(net, MemoryDirectory::default()).await;
    let b = uas(net, 2, "uas_hangup.xml");
    bridges_bound().await;
    let mut v = uac(net, 21, 1, "uac_wait_bye.xml", "meet.9", 2, &[]);
    let code = v.wait_async(Duration::from_secs(40)).await;
    assert_eq!(
        code,
        0,
        "caller failed; caller trace:\n{}\nbridge trace:\n{}",
        v.log(),
        b.log()
    );
    wait_idle(&p, 2).await;
    assert_eq!(p.status().stats.calls_answered, 2);
    p.shutdown().await;
}

/// Acceptance 3: the conference's first-choice bridge does not answer before the conference has
/// started → the call is placed on the next bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_bridge_is_replaced_by_the_next() {
    if !have_sipp() {
        return;
    }
    let net = 65;
    let cfg = routing(net, &[("b1", 2), ("b2", 3)]);
    // A conference whose first choice is b1, where nothing listens.
    let n = (0..1000)
        .find(|n| rank_bridges(&format!("meet-{n}"), cfg.bridges.values())[0].name == "b1")
        .unwrap();
    let dir = MemoryDirectory::default();
    let p = start_b2bua(
        net,
        1,
        cfg,
        dir.clone(),
        MemoryLedger::default(),
        Duration::from_millis(20),
    )
    .await;
    let b2 = uas(net, 3, "uas_answer.xml");
    bridges_bound().await;
    let mut v = uac(net, 21, 1, "uac_call.xml", &format!("meet.{n}"), 1, &[]);
    expect_success(&mut v).await;
    wait_idle(&p, 1).await;
    assert_eq!(b2.call_ids().len(), 1);
    let st = p.status();
    assert_eq!(st.stats.bridge_failovers, 1);
    assert_eq!(st.bridges.get("b1"), Some(&false), "{st:?}");
    p.shutdown().await;
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Acceptance 5 over loopback: two peers, each with its own bandwidth service exchanging usage on
/// UDP, admit calls into one location. With one call held on each peer the location is full: the
/// next call is refused with 503 and a Warning naming the location on either peer; when a call
/// ends on peer 1, peer 2 admits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_limit_across_two_peers_over_bandwidth_updates() {
    if !have_sipp() {
        return;
    }
    let net = 66;
    let mgmt = [
        Ipv4Addr::new(127, 0, 66, 101),
        Ipv4Addr::new(127, 0, 66, 102),
    ];
    let port = UdpSocket::bind(SocketAddrV4::new(mgmt[0], 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bw: Vec<BandwidthService> = mgmt
        .iter()
        .map(|m| {
            let mut s = BandwidthSettings::new(*m, port, &mgmt);
            s.interval = Duration::from_millis(200);
            BandwidthService::start_with(s).expect("bind bandwidth service")
        })
        .collect();
    bw[0]
        .set_peer_key(mgmt[1], zeroize::Zeroizing::new([6; 32]))
        .unwrap();
    bw[1]
        .set_peer_key(mgmt[0], zeroize::Zeroizing::new([6; 32]))
        .unwrap();
    let (l1, l2) = (bw[0].ledger(), bw[1].ledger());
    // Two calls of 768 kbps fit in 1600, a third does not.
    let cfg = routing_limited(net, &[("b1", 2)], 1600);
    let dir = MemoryDirectory::default();
    let p1 = start_b2bua(net, 1, cfg.clone(), dir.clone(), l1.clone(), T1).await;
    let p2 = start_b2bua(net, 11, cfg, dir.clone(), l2.clone(), T1).await;
    let _bridge = uas(net, 2, "uas_answer.xml");
    bridges_bound().await;

    let mut held1 = uac(net, 21, 1, "uac_hold.xml", "meet.1", 1, &["-d", "2500"]);
    until("peer 2 hears of peer 1's call", || {
        l2.usage_kbps("default") == 768
    })
    .await;
    let mut held2 = uac(net, 22, 11, "uac_hold.xml", "meet.1", 1, &["-d", "5000"]);
    until("peer 1 hears of peer 2's call", || {
        l1.usage_kbps("default") == 1536
    })
    .await;
    let mut refused1 = uac(net, 23, 1, "uac_refused.xml", "meet.2", 1, &[]);
    let mut refused2 = uac(net, 24, 11, "uac_refused.xml", "meet.1", 1, &[]);
    expect_success(&mut refused1).await;
    expect_success(&mut refused2).await;
    assert!(
        held1.running(),
        "the first call is still up while the others are refused"
    );

    expect_success(&mut held1).await;
    until("peer 2 hears that peer 1's call ended", || {
        l2.usage_kbps("default") == 768
    })
    .await;
    let mut again = uac(net, 25, 11, "uac_call.xml", "meet.3", 1, &[]);
    expect_success(&mut again).await;
    expect_success(&mut held2).await;
    wait_idle(&p1, 2).await;
    wait_idle(&p2, 3).await;
    until("both peers see the location empty", || {
        l1.usage_kbps("default") == 0 && l2.usage_kbps("default") == 0
    })
    .await;
    let st = bw[0].status();
    assert_eq!(
        st.counters.dropped_forged + st.counters.dropped_replayed + st.counters.dropped_malformed,
        0,
        "{st:?}"
    );
    assert!(st.counters.accepted > 0 && st.counters.sent > 0);
    p1.shutdown().await;
    p2.shutdown().await;
    for s in bw {
        s.shutdown().await;
    }
}
