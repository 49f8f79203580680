//! Bandwidth updates over real UDP sockets on loopback: a location limit enforced across three
//! services, usage expiring when a peer stops, and forged, replayed, oversize, truncated and
//! unknown-sender datagrams from a raw socket dropped, counted and without effect.
//!
//! Each test uses its own 127.0.x.0/24 addresses (Linux answers on all of 127/8) and a port
//! found free, so tests run in parallel with each other and with a daemon on 1719.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use confmesh::b2bua::BandwidthLedger;
use confmesh::bandwidth::{
    Bandwidth, BandwidthConfig, BandwidthService, BandwidthSettings, BandwidthStatus,
};
use zeroize::Zeroizing;

const INTERVAL: Duration = Duration::from_millis(100);
const LIMIT: u64 = 2000;

fn key(b: u8) -> Zeroizing<[u8; 32]> {
    Zeroizing::new([b; 32])
}

/// Starts one service per address on one port that is free on all of them (a few tries).
fn start_all(addrs: &[Ipv4Addr]) -> (Vec<BandwidthService>, u16) {
    for _ in 0..10 {
        let port = UdpSocket::bind(SocketAddrV4::new(addrs[0], 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started: Result<Vec<_>, _> = addrs
            .iter()
            .map(|a| {
                let mut s = BandwidthSettings::new(*a, port, addrs);
                s.interval = INTERVAL;
                BandwidthService::start_with(s)
            })
            .collect();
        if let Ok(services) = started {
            return (services, port);
        }
    }
    panic!("no port free on all of {addrs:?}");
}

/// Installs one key per pair, the same on both ends.
fn key_all(services: &[BandwidthService], addrs: &[Ipv4Addr]) {
    for (i, s) in services.iter().enumerate() {
        for (j, peer) in addrs.iter().enumerate() {
            if i != j {
                let pair = (i.min(j) * 4 + i.max(j) + 1) as u8;
                s.set_peer_key(*peer, key(pair)).unwrap();
            }
        }
    }
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn location_limit_holds_across_three_peers() {
    let addrs = [
        Ipv4Addr::new(127, 0, 71, 1),
        Ipv4Addr::new(127, 0, 71, 2),
        Ipv4Addr::new(127, 0, 71, 3),
    ];
    let (mut services, _port) = start_all(&addrs);
    key_all(&services, &addrs);
    let (la, lb, lc) = (
        services[0].ledger(),
        services[1].ledger(),
        services[2].ledger(),
    );

    la.try_reserve("hq", 1500, LIMIT).unwrap();
    until("B and C see A's reservation", || {
        lb.usage_kbps("hq") == 1500 && lc.usage_kbps("hq") == 1500
    })
    .await;
    assert_eq!(
        lb.try_reserve("hq", 1000, LIMIT),
        Err(1500),
        "refused on B when over"
    );
    assert_eq!(
        lc.try_reserve("hq", 600, LIMIT),
        Err(1500),
        "refused on C when over"
    );
    lb.try_reserve("hq", 500, LIMIT).unwrap();
    until("A and C see the cluster full", || {
        la.usage_kbps("hq") == LIMIT && lc.usage_kbps("hq") == LIMIT
    })
    .await;
    assert_eq!(la.try_reserve("hq", 1, LIMIT), Err(LIMIT));
    assert_eq!(lc.try_reserve("hq", 1, LIMIT), Err(LIMIT));

    // Released on A → admitted on C.
    la.release("hq", 1500);
    until("C sees A's release", || lc.usage_kbps("hq") == 500).await;
    lc.try_reserve("hq", 1500, LIMIT).unwrap();
    until("A sees C's reservation", || la.usage_kbps("hq") == LIMIT).await;

    let s: BandwidthStatus = services[0].status();
    assert_eq!(s.locations["hq"].cluster_kbps, LIMIT);
    assert_eq!(s.locations["hq"].cluster_calls, 2);
    assert_eq!(s.peers.len(), 2);
    for p in &s.peers {
        assert!(p.keyed);
        assert!(p.last_update_age_ms.is_some_and(|age| age < 1000), "{p:?}");
    }
    let c = s.counters;
    assert_eq!(
        (
            c.dropped_forged,
            c.dropped_replayed,
            c.dropped_malformed,
            c.dropped_oversize,
            c.dropped_no_key
        ),
        (0, 0, 0, 0, 0),
        "honest peers cause no drops: {c:?}"
    );
    serde_json::to_string(&s).unwrap();

    // C stops: its 1500 kbps stop counting after three missed intervals and A admits again.
    let stopped = Instant::now();
    services.pop().unwrap().shutdown().await;
    until("A forgets C's usage", || la.usage_kbps("hq") == 500).await;
    // The last refresh came at most one interval before the stop, and expiry is 3.5 intervals.
    assert!(
        stopped.elapsed() >= INTERVAL * 2,
        "expired {:?} after the stop: too early",
        stopped.elapsed()
    );
    la.try_reserve("hq", 1500, LIMIT).unwrap();
    assert!(services[0].status().counters.expired_entries >= 1);
    // C is removed from the cluster: A no longer lists it.
    services[0].set_peers(&addrs[..2]).unwrap();
    assert_eq!(
        services[0]
            .status()
            .peers
            .iter()
            .map(|p| p.addr)
            .collect::<Vec<_>>(),
        vec![addrs[1]]
    );
    for s in services {
        s.shutdown().await;
    }
}

/// One datagram as `sender` would send it to `receiver` with this key and epoch, claiming
/// `kbps` in "hq".
fn datagram(sender: Ipv4Addr, receiver: Ipv4Addr, key_byte: u8, epoch: u64, kbps: u64) -> Vec<u8> {
    let now = Instant::now();
    let mut core = Bandwidth::new(BandwidthConfig::new(sender, epoch), now);
    core.set_peers(&[sender, receiver]).unwrap();
    core.set_peer_key(receiver, key(key_byte)).unwrap();
    core.reserve("hq", kbps, u64::MAX).unwrap();
    let mut buf = [0u8; 1500];
    let t = core.poll_transmit(&mut buf).unwrap();
    assert_eq!(t.dest, receiver);
    buf[..t.len].to_vec()
}

#[tokio::test]
async fn forged_replayed_and_oversize_datagrams_are_counted_and_ignored() {
    let addrs = [Ipv4Addr::new(127, 0, 72, 1), Ipv4Addr::new(127, 0, 72, 2)];
    let (services, port) = start_all(&addrs);
    let (a, b) = (addrs[0], addrs[1]);
    let pair_key = 5;
    services[0].set_peer_key(b, key(pair_key)).unwrap();
    services[1].set_peer_key(a, key(pair_key)).unwrap();
    services[0].set_path_mtu(b, 576).unwrap();
    let (la, lb) = (services[0].ledger(), services[1].ledger());
    lb.try_reserve("hq", 700, LIMIT).unwrap();
    until("A sees B's reservation", || la.usage_kbps("hq") == 700).await;
    let before = services[0].status();

    // From B's address (so the source check passes), on another port.
    let attacker = UdpSocket::bind(SocketAddrV4::new(b, 0)).unwrap();
    let to_a = SocketAddrV4::new(a, port);
    // Wrong key, newest epoch: would override B's report if it were accepted.
    let forged = datagram(b, a, pair_key + 1, u64::MAX, 5000);
    attacker.send_to(&forged, to_a).unwrap();
    // Right key but an epoch older than B's running one (a datagram of an earlier run), twice.
    let replayed = datagram(b, a, pair_key, 1, 5000);
    attacker.send_to(&replayed, to_a).unwrap();
    attacker.send_to(&replayed, to_a).unwrap();
    // Larger than an MTU-1500 path can carry unfragmented.
    attacker.send_to(&vec![0x43; 2000], to_a).unwrap();
    // Truncated.
    attacker.send_to(&forged[..40], to_a).unwrap();
    // A sender that is not a peer.
    let stranger = Ipv4Addr::new(127, 0, 72, 9);
    let outsider = UdpSocket::bind(SocketAddrV4::new(stranger, 0)).unwrap();
    outsider
        .send_to(&datagram(stranger, a, pair_key, u64::MAX, 5000), to_a)
        .unwrap();

    until("every bad datagram is counted", || {
        let c = services[0].status().counters;
        c.dropped_forged
            + c.dropped_replayed
            + c.dropped_oversize
            + c.dropped_malformed
            + c.dropped_unknown_peer
            >= 6
    })
    .await;
    // Give any misbehaviour time to show, across a few intervals.
    tokio::time::sleep(INTERVAL * 3).await;
    let after = services[0].status();
    let c = after.counters;
    assert_eq!(
        (
            c.dropped_forged,
            c.dropped_replayed,
            c.dropped_oversize,
            c.dropped_malformed,
            c.dropped_unknown_peer
        ),
        (1, 2, 1, 1, 1),
        "{c:?}"
    );
    assert_eq!(la.usage_kbps("hq"), 700, "nothing changed");
    assert_eq!(after.locations, before.locations);
    assert_eq!(
        after.peers.iter().find(|p| p.addr == b).unwrap().path_mtu,
        576
    );
    assert!(
        c.accepted > before.counters.accepted,
        "B's genuine updates are still accepted"
    );

    // And B is still heard: its release reaches A.
    lb.release("hq", 700);
    until("A sees B's release", || la.usage_kbps("hq") == 0).await;
    for s in services {
        s.shutdown().await;
    }
}
