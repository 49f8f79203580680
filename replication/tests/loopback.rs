//! Three replication services over TCP on 127.0.0.1: they converge; one is stopped, the others
//! write on, it restarts from the same database file and converges again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use confmesh_replication::model::Namespace;
use confmesh_replication::service::{Service, WriteError};
use confmesh_replication::store::Store;
use serde_json::{Value, json};

const ORIGINS: [u32; 3] = [0x0a60_0001, 0x0a60_0002, 0x0a60_0003];

fn content(s: &Service) -> BTreeMap<String, Value> {
    s.list(Namespace::Config, "")
        .expect("list")
        .into_iter()
        .collect()
}

/// Wait (bounded) until every running service holds `want`.
async fn converge(services: &[&Service], want: &BTreeMap<String, Value>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if services.iter().all(|s| &content(s) == want) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let got: Vec<_> = services.iter().map(|s| content(s)).collect();
            panic!(
                "no convergence within 20 s: want {want:?}, got {got:?}; status {:?}",
                services.iter().map(|s| s.status()).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peers(addrs: &[SocketAddr; 3]) -> Vec<(u32, SocketAddr)> {
    ORIGINS.iter().copied().zip(addrs.iter().copied()).collect()
}

/// Database file of peer `i`: `<stem><i>.redb` in `dir`, so a restart can reopen the same one.
fn db(dir: &Path, stem: &str, i: usize) -> PathBuf {
    dir.join(format!("{stem}{i}.redb"))
}

/// One service per origin, each on its own database file and an ephemeral port of 127.0.0.1,
/// none told of the others yet; returns them with the addresses their peer lists need.
async fn start_three(dir: &Path, stem: &str) -> (Vec<Service>, [SocketAddr; 3]) {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut services = Vec::new();
    for (i, &origin) in ORIGINS.iter().enumerate() {
        let store = Arc::new(Store::open(&db(dir, stem, i), origin).expect("open"));
        services.push(Service::start(store, any, vec![]).await.expect("start"));
    }
    let addrs = [
        services[0].local_addr(),
        services[1].local_addr(),
        services[2].local_addr(),
    ];
    (services, addrs)
}

/// Gives every service the full peer list of all three.
fn connect_all(services: &[Service], addrs: &[SocketAddr; 3]) {
    for s in services {
        s.set_peers(peers(addrs));
    }
}

/// A write (or, with `None`, a delete) that waits for no other peer: durable locally, then
/// replicated in the background.
async fn put(s: &Service, key: &str, value: Option<Value>) {
    s.write(Namespace::Config, key, value, 0, Duration::ZERO)
        .await
        .expect("write");
}

/// A write that returns only once `acks` other peers hold it (20 s at the most).
async fn put_acked(s: &Service, key: &str, value: Value, acks: usize) {
    s.write(
        Namespace::Config,
        key,
        Some(value),
        acks,
        Duration::from_secs(20),
    )
    .await
    .expect("replicated write");
}

async fn shutdown_all(services: Vec<Service>) {
    for s in services {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_services_converge_and_a_restarted_one_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut services, addrs) = start_three(dir.path(), "peer").await;
    connect_all(&services, &addrs);
    let mut want = BTreeMap::new();
    for (i, s) in services.iter().enumerate() {
        for k in 0..20 {
            let key = format!("bridge/p{i}-{k}");
            put(s, &key, Some(json!({"capacity": k}))).await;
            want.insert(key, json!({"capacity": k}));
        }
    }
    // A write that waits until both other peers have it.
    put_acked(&services[0], "alias/a", json!("x"), 2).await;
    want.insert("alias/a".into(), json!("x"));
    assert!(matches!(
        services[0]
            .write(
                Namespace::Config,
                "k",
                Some(json!(1)),
                3,
                Duration::from_secs(1)
            )
            .await,
        Err(WriteError::TooFewPeers {
            wanted: 3,
            configured: 2
        })
    ));
    converge(&[&services[0], &services[1], &services[2]], &want).await;

    // Stop peer 3 and close its store.
    let third = services.pop().expect("third");
    let store3 = Arc::clone(third.store());
    third.shutdown().await;
    drop(store3);

    for k in 0..30 {
        let key = format!("location/l{k}");
        put(&services[k % 2], &key, Some(json!(k))).await;
        want.insert(key, json!(k));
    }
    put(&services[1], "bridge/p0-0", None).await;
    want.remove("bridge/p0-0");
    // Waiting for the stopped peer times out, but the write is durable and replicates.
    let r = services[0]
        .write(
            Namespace::Config,
            "alias/b",
            Some(json!("y")),
            2,
            Duration::from_millis(300),
        )
        .await;
    assert!(
        matches!(
            r,
            Err(WriteError::NotReplicated {
                acked_by: 1,
                wanted: 2,
                ..
            })
        ),
        "{r:?}"
    );
    want.insert("alias/b".into(), json!("y"));
    let st = services[0].status();
    let p3 = st
        .peers
        .iter()
        .find(|p| p.origin == ORIGINS[2])
        .expect("peer 3 listed");
    assert!(!p3.connected);
    assert!(p3.lag_entries.is_some_and(|n| n > 0), "{p3:?}");

    // Restart it on the same address from the same file.
    let store = Arc::new(Store::open(&db(dir.path(), "peer", 2), ORIGINS[2]).expect("reopen"));
    let third = Service::start(store, addrs[2], peers(&addrs))
        .await
        .expect("restart");
    converge(&[&services[0], &services[1], &third], &want).await;

    // Status: everyone connected, counters moving, lag drained, serialisable for status --json.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = services[0].status();
        let ok = st.peers.len() == 2
            && st.peers.iter().all(|p| {
                p.connected
                    && p.lag_entries == Some(0)
                    && p.bytes_sent > 0
                    && p.entries_sent > 0
                    && p.last_sync_unix_ms.is_some()
            });
        if ok {
            let json = serde_json::to_value(&st).expect("json");
            assert!(
                json["peers"][0]["bytes_received"]
                    .as_u64()
                    .is_some_and(|n| n > 0),
                "{json}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never settled: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    third.shutdown().await;
    shutdown_all(services).await;
}

/// SPEC §2 rule 6: a standalone peer with its own configuration joins a 2-peer cluster: its shared
/// content is replaced by the cluster's (the daemon takes the backup first, from `snapshot()`),
/// and its writes after the join replicate normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_peer_takes_the_clusters_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (services, addrs) = start_three(dir.path(), "p").await;
    let pair = vec![(ORIGINS[0], addrs[0]), (ORIGINS[1], addrs[1])];
    services[0].set_peers(pair.clone());
    services[1].set_peers(pair);
    put_acked(&services[0], "bridge/cluster", json!(1), 1).await;
    // The standalone peer's own configuration, which the join must replace.
    put(&services[2], "bridge/mine", Some(json!(2))).await;
    let backup = services[2].store().snapshot().expect("snapshot");
    assert_eq!(backup.entries.len(), 1);

    services[2]
        .store()
        .replace_all_async(Default::default())
        .await
        .expect("replace_all");
    connect_all(&services, &addrs);
    let mut want = BTreeMap::from([("bridge/cluster".to_owned(), json!(1))]);
    converge(&[&services[0], &services[1], &services[2]], &want).await;
    let r = services[2]
        .write(
            Namespace::Config,
            "bridge/after",
            Some(json!(3)),
            2,
            Duration::from_secs(20),
        )
        .await;
    if let Err(e) = r {
        let st: Vec<_> = services.iter().map(|s| s.status()).collect();
        let v: Vec<_> = services.iter().map(|s| s.store().vector()).collect();
        panic!("write after join: {e}; status {st:#?}; vectors {v:?}");
    }
    want.insert("bridge/after".into(), json!(3));
    converge(&[&services[0], &services[1], &services[2]], &want).await;
    shutdown_all(services).await;
}

/// Garbage, and a well-formed hello from an origin that is not in the peer list, each end their
/// connection (the service closes it) without disturbing the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_strangers_are_turned_away() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(&dir.path().join("p.redb"), ORIGINS[1]).expect("open"));
    let svc = Service::start(
        store,
        "127.0.0.1:0".parse().expect("addr"),
        vec![(ORIGINS[0], "127.0.0.1:9".parse().expect("addr"))],
    )
    .await
    .expect("start");
    let stranger_hello = {
        // version 1, type hello, origin 0x0a600063, empty vector, crc32 of the body.
        let mut body = vec![1u8, 1];
        body.extend(0x0a60_0063u32.to_be_bytes());
        body.extend([0, 0]);
        let crc = crc32fast::hash(&body);
        body.extend(crc.to_be_bytes());
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend(body);
        f
    };
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 64],
        stranger_hello,
    ] {
        let mut s = tokio::net::TcpStream::connect(svc.local_addr())
            .await
            .expect("connect");
        s.write_all(&bytes).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // the service's own hello
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the service kept a bad connection open: {bytes:?}"
        );
    }
    put(&svc, "still/works", Some(json!(true))).await;
    assert_eq!(
        svc.get(Namespace::Config, "still/works").expect("get"),
        Some(json!(true))
    );
    let st = svc.status();
    assert_eq!(st.peers.len(), 1);
    assert!(!st.peers[0].connected);
    svc.shutdown().await;
}

/// A peer restores an older backup while connected: its sessions start over, and it gets back
/// everything written since the backup (the cluster's newer versions win).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_a_backup_while_connected_resyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (services, addrs) = start_three(dir.path(), "r").await;
    connect_all(&services, &addrs);
    let all = [&services[0], &services[1], &services[2]];
    let mut want = BTreeMap::new();
    for k in 0..5 {
        let key = format!("a/{k}");
        put_acked(&services[k % 3], &key, json!(k), 2).await;
        want.insert(key, json!(k));
    }
    converge(&all, &want).await;
    let backup = services[1].store().snapshot().expect("backup");
    for k in 0..5 {
        for (i, s) in services.iter().enumerate() {
            let key = format!("after/{i}-{k}");
            put(s, &key, Some(json!(k))).await;
            want.insert(key, json!(k));
        }
    }
    put(&services[2], "a/1", Some(json!("newer"))).await;
    want.insert("a/1".into(), json!("newer"));
    converge(&all, &want).await;

    services[1]
        .store()
        .replace_all_async(backup)
        .await
        .expect("restore");
    converge(&all, &want).await;
    shutdown_all(services).await;
}
