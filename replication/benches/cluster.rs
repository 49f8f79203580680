//! Replicated writes between three services over TCP on 127.0.0.1 (the same code the daemon runs
//! over the overlay): sustained replicated writes/s with 64 concurrent writers on one peer, and
//! replication lag (write acknowledged on peer 1 → visible on peer 2) p50/p99, plus sync bytes per
//! replicated write. The packet-level figures over the AH overlay come from the netns benchmark.
//!
//! `CARGO_TARGET_DIR=… cargo bench -p confmesh-replication --bench cluster`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confmesh_replication::model::Namespace;
use confmesh_replication::service::Service;
use confmesh_replication::store::Store;
use serde_json::json;

const ORIGINS: [u32; 3] = [0x0a60_0001, 0x0a60_0002, 0x0a60_0003];
const WRITERS: usize = 64;

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
/// then a small run only checks that the benchmark works.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn value(i: usize) -> serde_json::Value {
    json!({"uri": "sip:10.96.4.1:5060", "capacity": i, "pad": "x".repeat(64)})
}

async fn cluster(dir: &tempfile::TempDir) -> Vec<Arc<Service>> {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut services = Vec::new();
    for (i, &o) in ORIGINS.iter().enumerate() {
        let store = Arc::new(Store::open(&dir.path().join(format!("p{i}.redb")), o).expect("open"));
        services.push(Arc::new(
            Service::start(store, any, vec![]).await.expect("start"),
        ));
    }
    let peers: Vec<(u32, SocketAddr)> = ORIGINS
        .iter()
        .copied()
        .zip(services.iter().map(|s| s.local_addr()))
        .collect();
    for s in &services {
        s.set_peers(peers.clone());
    }
    services
}

async fn wait_visible(s: &Service, key: &str, deadline: Duration) -> Option<Instant> {
    let store = s.store();
    let mut changes = store.subscribe();
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if store
            .get(Namespace::Conference, key)
            .ok()
            .flatten()
            .is_some()
        {
            return Some(Instant::now());
        }
        if tokio::time::timeout_at(end, changes.changed())
            .await
            .is_err()
        {
            return None;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (writes, lag_samples) = if full_run() { (20_000, 300) } else { (500, 20) };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let services = cluster(&dir).await;
    // Wait until the mesh is up.
    let t0 = Instant::now();
    while !services
        .iter()
        .all(|s| s.status().peers.iter().all(|p| p.connected))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "mesh did not come up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Lag: one write at a time on peer 1, time until peer 2 sees it.
    let mut lags = Vec::with_capacity(lag_samples);
    for i in 0..lag_samples {
        let key = format!("lag/{i}");
        let watcher = {
            let s2 = Arc::clone(&services[1]);
            let key = key.clone();
            tokio::spawn(async move { wait_visible(&s2, &key, Duration::from_secs(10)).await })
        };
        services[0]
            .write(
                Namespace::Conference,
                &key,
                Some(value(i)),
                0,
                Duration::ZERO,
            )
            .await
            .expect("write");
        let acked = Instant::now();
        let seen = watcher
            .await
            .expect("watcher")
            .expect("write never became visible on peer 2");
        lags.push(seen.saturating_duration_since(acked));
    }
    lags.sort();
    let pct =
        |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)].as_secs_f64() * 1e3;

    // Throughput: WRITERS tasks on peer 1, until all writes are on peers 2 and 3.
    let before: u64 = services[0]
        .status()
        .peers
        .iter()
        .map(|p| p.bytes_sent)
        .sum();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = Arc::clone(&services[0]);
        tasks.push(tokio::spawn(async move {
            for i in (w..writes).step_by(WRITERS) {
                s.write(
                    Namespace::Conference,
                    &format!("tp/{i}"),
                    Some(value(i)),
                    0,
                    Duration::ZERO,
                )
                .await
                .expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let local = start.elapsed();
    let last = format!("tp/{}", writes - 1);
    for s in &services[1..] {
        wait_visible(s, &last, Duration::from_secs(60))
            .await
            .expect("replicated");
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.list(Namespace::Conference, "tp/").expect("list").len() < writes {
            assert!(Instant::now() < deadline, "not all writes replicated");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let replicated = start.elapsed();
    let after: u64 = services[0]
        .status()
        .peers
        .iter()
        .map(|p| p.bytes_sent)
        .sum();

    println!("replication over loopback TCP, 3 peers, values ~110 bytes of JSON");
    println!(
        "lag write-ack(peer1) -> visible(peer2): p50 {:.2} ms  p99 {:.2} ms  ({lag_samples} samples)",
        pct(0.5),
        pct(0.99)
    );
    println!(
        "{writes} writes, {WRITERS} writers on peer 1: durable locally at {:.0}/s, on all 3 peers at {:.0}/s",
        writes as f64 / local.as_secs_f64(),
        writes as f64 / replicated.as_secs_f64()
    );
    println!(
        "sync bytes sent by peer 1 per replicated write per peer: {:.1}",
        (after - before) as f64 / writes as f64 / 2.0
    );
    for s in services {
        if let Ok(s) = Arc::try_unwrap(s) {
            s.shutdown().await;
        }
    }
}
