//! Durable local writes: writes/s for 1 and 64 concurrent writers, with group commit (the default)
//! and without it (`max_batch = 1`: one fsync'd transaction per write), plus p50/p99 latency.
//!
//! `CARGO_TARGET_DIR=… cargo bench -p confmesh-replication --bench store` — the database lives in
//! the target directory (a real disk, not tmpfs, so fsync costs what it costs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use confmesh_replication::model::Namespace;
use confmesh_replication::store::{Store, StoreOptions};
use criterion::{Criterion, Throughput};
use serde_json::json;

const T: u64 = 1_700_000_000_000;

fn open(dir: &tempfile::TempDir, batching: bool) -> Arc<Store> {
    let options = StoreOptions {
        max_batch: if batching { 1024 } else { 1 },
        ..StoreOptions::default()
    };
    Arc::new(Store::open_with(&dir.path().join("bench.redb"), 1, options).expect("open"))
}

/// `writers` threads share `total` writes; returns each write's latency and the wall time.
fn run(store: &Arc<Store>, writers: usize, total: u64) -> (Vec<Duration>, Duration) {
    let per = total.div_ceil(writers as u64);
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let store = Arc::clone(store);
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per as usize);
                for i in 0..per {
                    let t0 = Instant::now();
                    let value =
                        json!({"uri": "sip:10.96.4.1:5060", "capacity": i, "pad": "x".repeat(64)});
                    store
                        .put(
                            Namespace::Conference,
                            &format!("w{w}/k{}", i % 1000),
                            value,
                            T,
                        )
                        .expect("put");
                    lat.push(t0.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().expect("writer"));
    }
    (all, start.elapsed())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_put");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(1));
    for batching in [true, false] {
        for writers in [1usize, 64] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
            let store = open(&dir, batching);
            let name = format!(
                "{writers}_writers_{}",
                if batching {
                    "group_commit"
                } else {
                    "no_batching"
                }
            );
            g.bench_function(name, |b| {
                b.iter_custom(|iters| run(&store, writers, iters.max(writers as u64)).1)
            });
        }
    }
    g.finish();
}

/// Latency percentiles, printed after criterion's throughput figures.
fn latency_report() {
    println!("\nconfiguration                 writes/s   p50 ms   p99 ms");
    for batching in [true, false] {
        for writers in [1usize, 64] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
            let store = open(&dir, batching);
            // `cargo bench` passes `--bench`; under `cargo test --all-targets` a small run only
            // checks that the benchmark works.
            let full = std::env::args().any(|a| a == "--bench");
            let total = match (full, writers) {
                (true, 1) => 300,
                (true, _) => 6400,
                (false, _) => 64,
            };
            let (mut lat, wall) = run(&store, writers, total);
            lat.sort();
            let pct = |p: f64| {
                lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3
            };
            println!(
                "{:>2} writers, {:<13} {:>9.0} {:>8.2} {:>8.2}",
                writers,
                if batching {
                    "group commit"
                } else {
                    "no batching"
                },
                lat.len() as f64 / wall.as_secs_f64(),
                pct(0.5),
                pct(0.99)
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    latency_report();
}
