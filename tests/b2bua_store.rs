//! Conference placement and participant counts on real replication services over loopback TCP:
//! two or three peers, each with its own store, sync sessions, router and health view.
//!
//! Trials are seeded (`CONFMESH_SEED`, else the clock); the seed is printed so a failure can be
//! replayed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use confmesh::b2bua::routing::{
    HealthTable, Route, RouteDecision, RouteRequest, Router, rank_bridges,
};
use confmesh::b2bua::{
    ConferenceDirectory, MemoryLedger, RoutingConfig, RoutingConfigLoader, StoreDirectory,
};
use confmesh_replication::model::Namespace;
use confmesh_replication::service::Service;
use confmesh_replication::store::Store;
use serde_json::{Value, json};
use tokio::sync::watch;

struct Peer {
    svc: Arc<Service>,
    dir: StoreDirectory,
    router: Router<StoreDirectory, MemoryLedger>,
    _tmp: tempfile::TempDir,
}

fn seed() -> u64 {
    let seed = std::env::var("CONFMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
        });
    eprintln!("seed {seed} (replay with CONFMESH_SEED={seed})");
    seed
}

/// `n` peers with connected sync sessions; peer i has origin 10.96.0.(i+1).
async fn cluster(n: u8) -> Vec<Peer> {
    let mut peers = Vec::new();
    for i in 1..=n {
        let tmp = tempfile::tempdir().unwrap();
        let origin = u32::from(std::net::Ipv4Addr::new(10, 96, 0, i));
        let store = Arc::new(Store::open(&tmp.path().join("store.redb"), origin).unwrap());
        let svc = Arc::new(
            Service::start(store.clone(), "127.0.0.1:0".parse().unwrap(), vec![])
                .await
                .unwrap(),
        );
        let dir = StoreDirectory::new(store);
        dir.set_replication(Some(svc.clone()));
        let router = Router {
            directory: dir.clone(),
            ledger: MemoryLedger::default(),
            health: Arc::new(HealthTable::default()),
        };
        peers.push(Peer {
            svc,
            dir,
            router,
            _tmp: tmp,
        });
    }
    let addrs: Vec<(u32, std::net::SocketAddr)> = peers
        .iter()
        .map(|p| (p.svc.store().origin(), p.svc.local_addr()))
        .collect();
    for p in &peers {
        p.svc.set_peers(addrs.clone());
    }
    eventually("sync sessions up", Duration::from_secs(10), || {
        peers.iter().all(|p| {
            p.svc
                .status()
                .peers
                .iter()
                .all(|s| s.connected && s.lag_entries.is_some())
        })
    })
    .await;
    peers
}

/// Polls `cond` every 20 ms for at most `limit`; panics naming `what` otherwise.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "not reached within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes shared configuration on `peers[0]` and waits until every peer has it.
async fn configure(peers: &[Peer], entries: &[(String, Value)]) {
    for (k, v) in entries {
        peers[0]
            .svc
            .write(Namespace::Config, k, Some(v.clone()), 0, Duration::ZERO)
            .await
            .unwrap();
    }
    eventually("configuration replicated", Duration::from_secs(10), || {
        peers.iter().all(|p| {
            entries
                .iter()
                .all(|(k, v)| p.svc.get(Namespace::Config, k).unwrap().as_ref() == Some(v))
        })
    })
    .await;
}

fn entries(bridges: usize, capacity: u32) -> Vec<(String, Value)> {
    let mut e = vec![
        (
            "alias/meet".to_owned(),
            json!({"pattern": "^meet\\.(\\w+)@example\\.com$", "conference": "meet-$1", "call_kbps": 10, "location": "default"}),
        ),
        (
            "location/default".to_owned(),
            json!({"limit_kbps": 1_000_000}),
        ),
    ];
    for i in 1..=bridges {
        e.push((
            format!("bridge/b{i}"),
            json!({"uri": format!("sip:127.0.50.{i}:5060"), "capacity": capacity}),
        ));
    }
    e
}

fn routing_config(peer: &Peer) -> RoutingConfig {
    let mut all = Vec::new();
    for prefix in ["bridge/", "alias/", "location/"] {
        all.extend(peer.svc.list(Namespace::Config, prefix).unwrap());
    }
    let (cfg, errors) = RoutingConfig::from_entries(all.iter().map(|(k, v)| (k.as_str(), v)));
    assert!(errors.is_empty(), "{errors:?}");
    cfg
}

fn req(called: &str) -> RouteRequest {
    RouteRequest {
        called: called.to_owned(),
        failed_bridges: vec![],
        previous: None,
    }
}

fn forwarded(d: RouteDecision, what: &str) -> Route {
    match d {
        RouteDecision::Forward { route, .. } => route,
        RouteDecision::Reject { code, warning, .. } => {
            panic!("{what}: rejected {code} {warning:?}")
        }
    }
}

/// Issue 6 acceptance 2 on real replication: two peers route the first call of a new conference at
/// the same moment, 100 times: both calls always go to one bridge, the rendezvous choice.
///
/// Then 40 trials where the peers' health views differ, so their choices differ: the placement
/// must still converge to one bridge on both peers (the earliest claim); how often the two first
/// calls nevertheless went to different bridges is printed (the claim waits for the peer's
/// acknowledgement, which a peer may send just before streaming its own concurrent claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_always_meet_on_one_bridge() {
    let seed = seed();
    let peers = cluster(2).await;
    configure(&peers, &entries(4, 1000)).await;
    let cfg = routing_config(&peers[0]);
    let (a, b) = (&peers[0], &peers[1]);
    let mut split_apart = 0;
    for trial in 0..140u64 {
        let split = trial >= 100;
        let called = format!("meet.s{seed}t{trial}@example.com");
        let conference = format!("meet-s{seed}t{trial}");
        let ranked: Vec<String> = rank_bridges(&conference, cfg.bridges.values())
            .iter()
            .map(|b| b.name.clone())
            .collect();
        for name in &ranked {
            a.router.health.set(name, true);
        }
        if split {
            // Peer A sees this conference's first-ranked bridge down, B sees all up.
            a.router.health.set(&ranked[0], false);
        }
        let request = req(&called);
        let (ra, rb) = tokio::join!(
            a.router.route(&cfg, &request),
            b.router.route(&cfg, &request)
        );
        let (ra, rb) = (forwarded(ra, "peer A"), forwarded(rb, "peer B"));
        if split {
            split_apart += usize::from(ra.bridge != rb.bridge);
        } else {
            assert_eq!(
                ra.bridge, rb.bridge,
                "seed {seed} trial {trial}: the two first calls went to different bridges"
            );
            assert_eq!(
                ra.bridge, ranked[0],
                "seed {seed} trial {trial}: not the rendezvous choice"
            );
        }
        // Both peers end up with the same single placement and both calls counted.
        let winner = std::sync::Mutex::new(None::<String>);
        eventually(
            &format!("seed {seed} trial {trial}: placement and counts converged"),
            Duration::from_secs(5),
            || {
                let views: Vec<_> = [a, b]
                    .iter()
                    .map(|p| {
                        p.dir
                            .conferences()
                            .unwrap()
                            .into_iter()
                            .find(|c| c.name == conference)
                    })
                    .collect();
                let ok = views.iter().all(|v| {
                    v.as_ref().is_some_and(|c| {
                        c.calls == 2 && Some(&c.bridge) == views[0].as_ref().map(|c| &c.bridge)
                    })
                });
                if ok {
                    *winner.lock().unwrap() = views[0].as_ref().map(|c| c.bridge.clone());
                }
                ok
            },
        )
        .await;
        let winner = winner.into_inner().unwrap().unwrap();
        assert!(
            winner == ra.bridge || winner == rb.bridge,
            "seed {seed} trial {trial}: placement {winner} is neither call's bridge"
        );
        a.router.release(&ra).await;
        b.router.release(&rb).await;
    }
    eventually(
        "every conference ended on both peers",
        Duration::from_secs(10),
        || {
            [a, b]
                .iter()
                .all(|p| p.dir.conferences().unwrap().is_empty())
        },
    )
    .await;
    let lost = a.dir.stats().claims_lost + b.dir.stats().claims_lost;
    eprintln!(
        "100 same-view trials: one bridge each time; 40 split-view trials: {lost} claims lost to an earlier one, \
         {split_apart} trials with the two first calls on different bridges"
    );
}

/// Participant counts from three peers add up on every peer; a bridge full cluster-wide refuses
/// the conference's next call on any peer and a new conference goes to the next bridge; when all
/// calls end the conference disappears everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_converge_and_capacity_holds_cluster_wide() {
    let peers = cluster(3).await;
    configure(&peers, &entries(2, 6)).await;
    let cfg = routing_config(&peers[0]);
    // Two calls per peer, all at once.
    let mut routes = Vec::new();
    let request = req("meet.full@example.com");
    for round in 0..2 {
        let calls: Vec<_> = peers
            .iter()
            .map(|p| p.router.route(&cfg, &request))
            .collect();
        for (i, d) in futures_join_all(calls).await.into_iter().enumerate() {
            routes.push((i, forwarded(d, &format!("round {round} peer {i}"))));
        }
    }
    let bridge = routes[0].1.bridge.clone();
    assert!(routes.iter().all(|(_, r)| r.bridge == bridge), "{routes:?}");
    eventually(
        "6 calls counted on every peer",
        Duration::from_secs(5),
        || {
            peers.iter().all(|p| {
                p.dir.conferences().unwrap()
                    == vec![confmesh::status::ConferenceStatus {
                        name: "meet-full".into(),
                        bridge: bridge.clone(),
                        calls: 6,
                    }]
            })
        },
    )
    .await;
    for p in &peers {
        assert_eq!(p.dir.bridge_load(&bridge).await.unwrap(), 6);
    }
    // The bridge is full cluster-wide: the conference's 7th call is refused on any peer.
    for (i, p) in peers.iter().enumerate() {
        match p.router.route(&cfg, &req("meet.full@example.com")).await {
            RouteDecision::Reject {
                code: 503,
                warning: Some(w),
                ..
            } => assert!(w.contains("full"), "{w}"),
            other => panic!("peer {i}: 7th call on a full bridge: {other:?}"),
        }
    }
    // A new conference whose first choice is the full bridge goes to the other one.
    let other = (0..1000)
        .map(|n| format!("n{n}"))
        .find(|n| rank_bridges(&format!("meet-{n}"), cfg.bridges.values())[0].name == bridge)
        .unwrap();
    let r = forwarded(
        peers[1]
            .router
            .route(&cfg, &req(&format!("meet.{other}@example.com")))
            .await,
        "new conference",
    );
    assert_ne!(r.bridge, bridge);
    peers[1].router.release(&r).await;
    // Calls end on every peer: the conference goes away everywhere.
    for (i, r) in &routes {
        peers[*i].router.release(r).await;
    }
    eventually(
        "conferences gone on every peer",
        Duration::from_secs(5),
        || {
            peers
                .iter()
                .all(|p| p.dir.conferences().unwrap().is_empty())
        },
    )
    .await;
    for p in &peers {
        assert_eq!(p.dir.bridge_load(&bridge).await.unwrap(), 0);
    }
}

/// A bridge that fails before its conference starts is replaced, on every peer, by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conference_not_started_moves_off_a_failed_bridge() {
    let peers = cluster(2).await;
    configure(&peers, &entries(3, 10)).await;
    let cfg = routing_config(&peers[0]);
    let first = forwarded(
        peers[0]
            .router
            .route(&cfg, &req("meet.mv@example.com"))
            .await,
        "first call",
    );
    // The bridge did not answer: the core routes again with it excluded, releasing the attempt.
    let again = RouteRequest {
        called: "meet.mv@example.com".into(),
        failed_bridges: vec![first.bridge.clone()],
        previous: Some(first.clone()),
    };
    let moved = forwarded(peers[0].router.route(&cfg, &again).await, "failover");
    assert_ne!(moved.bridge, first.bridge);
    // Peer B's next call follows the new placement.
    eventually("placement moved on peer B", Duration::from_secs(5), || {
        peers[1]
            .dir
            .conferences()
            .unwrap()
            .iter()
            .any(|c| c.name == "meet-mv" && c.bridge == moved.bridge)
    })
    .await;
    let b = forwarded(
        peers[1]
            .router
            .route(&cfg, &req("meet.mv@example.com"))
            .await,
        "peer B",
    );
    assert_eq!(b.bridge, moved.bridge);
    // A bridge seen down by OPTIONS before the conference has calls: the placement moves too.
    peers[0].router.release(&moved).await;
    peers[1].router.release(&b).await;
    eventually("conference ended", Duration::from_secs(5), || {
        peers
            .iter()
            .all(|p| p.dir.conferences().unwrap().is_empty())
    })
    .await;
    let placed = peers[0].dir.claim("meet-down", "b1").await.unwrap();
    assert_eq!((placed.bridge.as_str(), placed.participants), ("b1", 0));
    peers[1].router.health.set("b1", false);
    eventually("claim replicated", Duration::from_secs(5), || {
        !peers[1].dir.conferences().unwrap().is_empty()
    })
    .await;
    let r = forwarded(
        peers[1]
            .router
            .route(&cfg, &req("meet.down@example.com"))
            .await,
        "bridge down",
    );
    assert_ne!(r.bridge, "b1");
    peers[1].router.release(&r).await;
}

/// Soft state: a dead peer's counts stop holding capacity once expired, a restarted peer deletes
/// the counts it left behind, a placement that vanished under a peer's calls is claimed again, and
/// a conference without calls is removed after the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_repairs_and_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = 0x0a60_0001;
    let store = Arc::new(Store::open(&tmp.path().join("store.redb"), origin).unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ns = Namespace::Conference;
    // Written "a minute ago": an orphan claim, and a count this peer left before a restart.
    store
        .write_async(
            ns,
            "place/old/0a600002",
            Some(json!({"bridge": "b1"})),
            now - 60_000,
        )
        .await
        .unwrap();
    store
        .write_async(
            ns,
            "calls/left/0a600001",
            Some(json!({"bridges": {"b1": 3}, "updated_ms": now - 60_000})),
            now - 60_000,
        )
        .await
        .unwrap();
    // A dead peer's count, expired; and a live one.
    store
        .write_async(
            ns,
            "calls/dead/0a600003",
            Some(json!({"bridges": {"b2": 5}, "updated_ms": now - 200_000})),
            now,
        )
        .await
        .unwrap();
    store
        .write_async(
            ns,
            "calls/live/0a600002",
            Some(json!({"bridges": {"b2": 2}, "updated_ms": now})),
            now,
        )
        .await
        .unwrap();
    let dir = StoreDirectory::new(store.clone());
    assert_eq!(
        dir.bridge_load("b2").await.unwrap(),
        2,
        "an expired count must not hold capacity"
    );
    assert_eq!(
        dir.bridge_load("b1").await.unwrap(),
        0,
        "this peer's own counts are what it carries now: none"
    );
    // One call of ours.
    dir.claim("meet-x", "b2").await.unwrap();
    assert_eq!(dir.add_participant("meet-x", "b2").await.unwrap(), Some(1));
    assert_eq!(
        dir.add_participant("meet-x", "b1").await.unwrap(),
        None,
        "not placed there"
    );
    // Its placement vanishes (the conference "ended" on another peer that had not seen our call).
    store
        .write_async(ns, "place/meet-x/0a600001", None, now)
        .await
        .unwrap();
    assert!(dir.placement("meet-x").await.unwrap().is_none());
    dir.maintain().await.unwrap();
    let p = dir
        .placement("meet-x")
        .await
        .unwrap()
        .expect("placement claimed again");
    assert_eq!((p.bridge.as_str(), p.participants), ("b2", 1));
    assert_eq!(dir.stats().repairs, 1);
    assert!(
        store.get(ns, "calls/left/0a600001").unwrap().is_none(),
        "leftover count deleted"
    );
    assert!(
        store.get(ns, "place/old/0a600002").unwrap().is_none(),
        "orphan conference removed"
    );
    assert_eq!(dir.stats().orphans_removed, 1);
    let names: Vec<String> = dir
        .conferences()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["meet-x"]);
    dir.remove_participant("meet-x", "b2").await.unwrap();
    assert!(dir.conferences().unwrap().is_empty());
    assert!(store.list(ns, "calls/meet-x/").unwrap().is_empty());
}

/// The routing configuration follows `bridge/`, `alias/` and `location/` keys written on another
/// peer; a bad entry is skipped, the rest applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_configuration_follows_the_store() {
    let peers = cluster(2).await;
    let (stop, stop_rx) = watch::channel(false);
    let loader = RoutingConfigLoader::start(peers[1].svc.store().clone(), stop_rx);
    let mut rx = loader.subscribe();
    assert!(rx.borrow().bridges.is_empty());
    let mut e = entries(2, 5);
    e.push((
        "bridge/bad".to_owned(),
        json!({"uri": "not a uri", "capacity": 1}),
    ));
    configure(&peers, &e).await;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let cfg = rx.borrow_and_update().clone();
        if cfg.bridges.len() == 2 && cfg.aliases.len() == 1 && cfg.locations.len() == 1 {
            assert_eq!(cfg.bridges["b2"].capacity, 5);
            break;
        }
        assert!(Instant::now() < end, "configuration not reloaded: {cfg:?}");
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
    peers[0]
        .svc
        .write(Namespace::Config, "bridge/b1", None, 0, Duration::ZERO)
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while rx.borrow_and_update().bridges.contains_key("b1") {
        assert!(Instant::now() < end, "deleted bridge still configured");
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
    stop.send(true).unwrap();
    loader.join().await;
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    // Poll all of them together: a simple join without an extra dependency.
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, r) in pinned.iter_mut().zip(results.iter_mut()) {
            if r.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *r = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}
