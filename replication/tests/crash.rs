//! `kill -9` in the middle of a stream of writes: every write the store acknowledged is in the
//! file when it is reopened. The test re-runs its own binary as the writer process and kills it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use confmesh_replication::model::Namespace;
use confmesh_replication::store::{Store, StoreOptions};
use serde_json::json;

const CHILD_ENV: &str = "CONFMESH_CRASH_CHILD_DB";
const T: u64 = 1_700_000_000_000;

/// The writer process: 8 threads write until killed, printing each acknowledged key.
fn child(path: &str) -> ! {
    // Small checkpoints, so that the kill meets them too (and several journal segments).
    let options = StoreOptions {
        checkpoint_keys: 64,
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open_with(path.as_ref(), 1, options).expect("child open"));
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let key = format!("t{t}/{i}");
                    store
                        .put(Namespace::Conference, &key, json!({"i": i}), T)
                        .expect("put");
                    let mut o = out.lock().expect("stdout");
                    let _ = writeln!(o, "ACK {key}");
                    let _ = o.flush();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    std::process::exit(0)
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.redb");
    for round in 0..3 {
        let mut proc = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "kill_9_loses_no_acknowledged_write",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let stdout = proc.stdout.take().expect("stdout");
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(key) = line.strip_prefix("ACK ") {
                acked.push(key.to_owned());
            }
            // Kill at a different point each round, mid-stream.
            if acked.len() >= 200 + round * 150 || Instant::now() > deadline {
                proc.kill().expect("kill -9");
                break;
            }
        }
        let _ = proc.wait();
        assert!(
            acked.len() >= 200,
            "round {round}: the writer acknowledged only {} writes",
            acked.len()
        );
        let store = Store::open(&path, 1).expect("reopen after kill -9");
        for key in &acked {
            assert!(
                store
                    .get(Namespace::Conference, key)
                    .expect("get")
                    .is_some(),
                "round {round}: acknowledged write {key} lost by kill -9"
            );
        }
    }
}
