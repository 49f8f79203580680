//! Deterministic simulation of a 3-peer cluster: real stores on disk, sans-IO sync sessions over a
//! virtual network with delays, partitions (black holes, as TCP sees them) and heals, crashes with
//! restart from the database file, tombstone collection, a peer removed from the others' lists
//! and re-added (it rejoins: its content is replaced, it refuses writes until it has caught up by
//! snapshot — a write before that could order below a deletion the others collected), and clocks
//! skewed by up to ±5 s.
//!
//! Invariants checked at the end of every seed, after healing everything: all peers hold the same
//! live content, and that content is exactly "for every key, the acknowledged write with the
//! highest stamp" — so no acknowledged write is lost unless a later one replaced it. After every
//! write, its stamp must order after the version its writer held (causality despite skew).
//!
//! `cargo test -p confmesh-replication --test sim` runs 200 seeds; `SIM_SEED=n` reruns one seed;
//! `SIM_SEEDS=n` changes how many run; `SIM_TRACE=1` prints what happens
//! (shown for a failing seed, or with `-- --nocapture`).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use confmesh_replication::hlc::Hlc;
use confmesh_replication::model::{Namespace, VersionVector};
use confmesh_replication::store::{Seen, Store, StoreError, StoreOptions};
use confmesh_replication::sync::{Local, Pull, Session, SyncEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::watch;

/// `SIM_TRACE=1` prints the run's events (writes, crashes, exclusions, joins, snapshots,
/// collections) to follow a failing seed.
macro_rules! trace {
    ($($arg:tt)*) => {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!($($arg)*);
        }
    };
}

const TICK_MS: u64 = 10;
const BASE_WALL_MS: u64 = 1_700_000_000_000;
const PAIRS: [(usize, usize); 3] = [(0, 1), (0, 2), (1, 2)];
const KEYS: [&str; 6] = [
    "bridge/b1",
    "bridge/b2",
    "alias/a",
    "location/x",
    "conf/1",
    "conf/2",
];

struct Node {
    origin: u32,
    path: PathBuf,
    store: Option<Store>,
    skew_ms: i64,
    down_until_ms: u64,
    /// Latest acknowledged vector of each other peer (memory only: lost in a crash).
    acked: BTreeMap<u32, VersionVector>,
    /// A few writes' worth, so that checkpoints run all the time and crashes meet them.
    checkpoint_keys: usize,
}

impl Node {
    fn open(&self) -> Result<Store, StoreError> {
        let options = StoreOptions {
            checkpoint_keys: self.checkpoint_keys,
            ..StoreOptions::default()
        };
        Store::open_with(&self.path, self.origin, options)
    }
}

/// One direction of a TCP connection: bytes arrive in order after a delay; while the path is cut
/// they wait (TCP retransmits after the heal) unless a session times out first.
#[derive(Default)]
struct Pipe {
    queue: VecDeque<(u64, Vec<u8>)>,
    last_ms: u64,
}

struct End {
    session: Session,
    changes: watch::Receiver<u64>,
    /// The store's epoch when the session began (see `Seen`).
    epoch: u64,
}

struct Conn {
    ends: [End; 2],
    pipes: [Pipe; 2],
}

struct Write {
    ns: Namespace,
    key: String,
    value: Option<Value>,
    stamp: Hlc,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    t_ms: u64,
    base: Instant,
    nodes: Vec<Node>,
    conns: [Option<Conn>; 3],
    cut: [bool; 3],
    /// A peer removed from the others' peer lists (SPEC §2 rule 7) until the given time: they stop
    /// talking to it and collect tombstones without it. When it is added back it joins (SPEC §2
    /// rule 6): its content is replaced by the cluster's — a snapshot, as it is behind what the
    /// others collected — and writes only it held are deliberately dropped.
    excluded: Option<(usize, u64)>,
    writes: Vec<Write>,
    stats: Stats,
    _dir: tempfile::TempDir,
}

/// What happened across a run, so that the test proves the faults really occurred.
#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    writes: u64,
    crashes: u64,
    partitions: u64,
    timeouts: u64,
    snapshots: u64,
    collected: u64,
    exclusions: u64,
    joins: u64,
    refused_joining: u64,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.writes += o.writes;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.timeouts += o.timeouts;
        self.snapshots += o.snapshots;
        self.collected += o.collected;
        self.exclusions += o.exclusions;
        self.joins += o.joins;
        self.refused_joining += o.refused_joining;
    }
}

fn local(origin: u32, store: &Store) -> Local {
    Local {
        origin,
        replica: store.replica(),
        vector: store.vector().expect("vector"),
        joining: store.joining(),
    }
}

fn tempdir() -> tempfile::TempDir {
    // tmpfs when there is one: this test checks logic, not the disk.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("cm-sim").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

impl Sim {
    fn new(seed: u64, skews: [i64; 3]) -> Sim {
        let dir = tempdir();
        let nodes = (0..3)
            .map(|i| {
                let path = dir.path().join(format!("peer{i}.redb"));
                let origin = u32::from(std::net::Ipv4Addr::new(10, 96, 0, i as u8 + 1));
                let mut node = Node {
                    origin,
                    store: None,
                    path,
                    skew_ms: skews[i],
                    down_until_ms: 0,
                    acked: BTreeMap::new(),
                    checkpoint_keys: 4 + ((seed % 61) as usize + i * 17) % 61,
                };
                node.store = Some(node.open().expect("open"));
                node
            })
            .collect();
        Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            t_ms: 0,
            base: Instant::now(),
            nodes,
            conns: [None, None, None],
            cut: [false; 3],
            excluded: None,
            writes: Vec::new(),
            stats: Stats::default(),
            _dir: dir,
        }
    }

    fn wall(&self, i: usize) -> u64 {
        (BASE_WALL_MS + self.t_ms).saturating_add_signed(self.nodes[i].skew_ms)
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.t_ms)
    }

    fn write(&mut self, i: usize) {
        let ns = if self.rng.random_bool(0.7) {
            Namespace::Config
        } else {
            Namespace::Conference
        };
        let key = KEYS[self.rng.random_range(0..KEYS.len())].to_owned();
        let value = if self.rng.random_bool(0.2) {
            None
        } else {
            Some(json!({"w": self.writes.len(), "by": i}))
        };
        let wall = self.wall(i);
        let store = self.nodes[i].store.as_ref().expect("up");
        let before = store.get_entry(ns, &key).expect("read").map(|e| e.stamp);
        let stamp = match match &value {
            Some(v) => store.put(ns, &key, v.clone(), wall),
            None => store.delete(ns, &key, wall),
        } {
            Ok(stamp) => stamp,
            // Not acknowledged: a joining peer waits for the cluster's content.
            Err(StoreError::Joining) => {
                self.stats.refused_joining += 1;
                return;
            }
            Err(e) => panic!("seed {}: write: {e}", self.seed),
        };
        if let Some(b) = before {
            assert!(
                stamp > b,
                "seed {}: write {stamp} does not order after {b} which its writer had seen",
                self.seed
            );
        }
        trace!(
            "t={} node{i}: write {ns} {key} = {value:?} stamped {stamp}",
            self.t_ms
        );
        self.writes.push(Write {
            ns,
            key,
            value,
            stamp,
        });
        self.stats.writes += 1;
    }

    fn crash(&mut self, i: usize) {
        trace!("t={} node{i}: crash", self.t_ms);
        self.nodes[i].store = None;
        self.nodes[i].acked.clear();
        self.stats.crashes += 1;
        self.nodes[i].down_until_ms = self.t_ms + self.rng.random_range(100..8000);
        for (p, &(a, b)) in PAIRS.iter().enumerate() {
            if a == i || b == i {
                self.conns[p] = None;
            }
        }
    }

    fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.store = Some(
            n.open()
                .unwrap_or_else(|e| panic!("seed {}: reopen: {e}", self.seed)),
        );
    }

    fn connect(&mut self, p: usize) {
        let (a, b) = PAIRS[p];
        let now = self.now();
        let (Some(sa), Some(sb)) = (&self.nodes[a].store, &self.nodes[b].store) else {
            return;
        };
        let ea = End {
            epoch: sa.epoch(),
            session: Session::new(
                local(self.nodes[a].origin, sa),
                Some(self.nodes[b].origin),
                now,
            ),
            changes: sa.subscribe(),
        };
        let eb = End {
            epoch: sb.epoch(),
            session: Session::new(local(self.nodes[b].origin, sb), None, now),
            changes: sb.subscribe(),
        };
        self.conns[p] = Some(Conn {
            ends: [ea, eb],
            pipes: [Pipe::default(), Pipe::default()],
        });
    }

    /// Run the driver of one end: store changes, events, pulls, timers, transmit. Returns whether
    /// the connection is still alive and whether anything moved.
    fn drive_end(&mut self, p: usize, side: usize) -> (bool, bool) {
        let node_idx = if side == 0 { PAIRS[p].0 } else { PAIRS[p].1 };
        let wall = self.wall(node_idx);
        let now = self.now();
        let delay = self.rng.random_range(1..60);
        let t_ms = self.t_ms;
        let seed = self.seed;
        let node = &mut self.nodes[node_idx];
        let Some(conn) = self.conns[p].as_mut() else {
            return (false, false);
        };
        let store = node.store.as_ref().expect("connected node is up");
        let end = &mut conn.ends[side];
        let mut moved = false;
        if end.changes.has_changed().unwrap_or(false) {
            end.changes.borrow_and_update();
            end.session.set_joining(store.joining());
            end.session
                .notify_store_changed(now, store.vector().expect("vector"));
        }
        while let Some(ev) = end.session.poll_event() {
            moved = true;
            match ev {
                SyncEvent::EntriesReceived { entries, seen } => {
                    store
                        .apply_remote(
                            entries,
                            seen.map(|vector| Seen {
                                vector,
                                epoch: end.epoch,
                            }),
                            wall,
                        )
                        .unwrap_or_else(|e| panic!("seed {seed}: apply: {e}"));
                    end.session.handle_applied(store.vector().expect("vector"));
                }
                SyncEvent::SnapshotReceived(snap) => {
                    self.stats.snapshots += 1;
                    trace!("t={t_ms} node{node_idx}: snapshot received");
                    store
                        .apply_snapshot(snap, wall)
                        .unwrap_or_else(|e| panic!("seed {seed}: snapshot: {e}"));
                    end.session.handle_applied(store.vector().expect("vector"));
                }
                SyncEvent::PeerAcked(v) => {
                    if let Some(peer) = end.session.peer() {
                        node.acked.insert(peer, v);
                    }
                }
                SyncEvent::Connected { peer, .. } => {
                    trace!(
                        "t={t_ms} node{node_idx}: connected to {peer}, joining {}",
                        store.joining()
                    );
                }
                other => panic!("seed {seed}: unexpected event {other:?}"),
            }
        }
        while let Some(pull) = end.session.poll_pull() {
            moved = true;
            match pull {
                Pull::Changes {
                    since,
                    limit,
                    origins,
                } => end.session.handle_changes(
                    store
                        .changes_since_of(&since, limit, origins.as_deref())
                        .expect("changes"),
                ),
                Pull::Snapshot => end
                    .session
                    .handle_snapshot(&store.snapshot().expect("snapshot")),
                other => panic!("seed {seed}: unexpected pull {other:?}"),
            }
        }
        if end.session.poll_timeout().is_some_and(|t| t <= now)
            && end.session.handle_timeout(now).is_err()
        {
            self.stats.timeouts += 1;
            return (false, true);
        }
        let mut buf = Vec::new();
        if end.session.poll_transmit(now, &mut buf) > 0 {
            moved = true;
            let pipe = &mut conn.pipes[side];
            let at = (t_ms + delay).max(pipe.last_ms);
            pipe.last_ms = at;
            pipe.queue.push_back((at, buf));
        }
        (true, moved)
    }

    /// Deliver due bytes on both pipes of connection `p`.
    fn deliver(&mut self, p: usize) -> (bool, bool) {
        if self.cut[p] {
            return (true, false);
        }
        let now = self.now();
        let t = self.t_ms;
        let Some(conn) = self.conns[p].as_mut() else {
            return (false, false);
        };
        let mut moved = false;
        for side in 0..2 {
            while conn.pipes[side]
                .queue
                .front()
                .is_some_and(|(at, _)| *at <= t)
            {
                let (_, bytes) = conn.pipes[side].queue.pop_front().expect("front");
                moved = true;
                if let Err(e) = conn.ends[1 - side].session.handle_bytes(now, &bytes) {
                    panic!(
                        "seed {}: healthy link delivered bytes the session refused: {e}",
                        self.seed
                    );
                }
            }
        }
        (true, moved)
    }

    /// One tick. `chaos` enables random faults and writes. Returns whether anything moved.
    fn tick(&mut self, chaos: bool) -> bool {
        if chaos {
            if self.rng.random_bool(0.01) {
                let up: Vec<usize> = (0..3).filter(|&i| self.nodes[i].store.is_some()).collect();
                if !up.is_empty() {
                    let i = up[self.rng.random_range(0..up.len())];
                    self.write(i);
                }
            }
            if self.rng.random_bool(0.001) {
                let p = self.rng.random_range(0..3);
                self.cut[p] = !self.cut[p];
                self.stats.partitions += u64::from(self.cut[p]);
            }
            if self.rng.random_bool(0.0004) {
                let i = self.rng.random_range(0..3);
                if self.nodes[i].store.is_some() {
                    self.crash(i);
                }
            }
            if self.excluded.is_none() && self.rng.random_bool(0.0003) {
                let k = self.rng.random_range(0..3);
                // Operators remove a peer from the lists of the peers that hold the cluster's
                // content; if no other peer holds it yet (all are still joining), there is no
                // cluster to remove it from.
                let until = self.t_ms + self.rng.random_range(2000..15_000);
                if (0..3).any(|i| i != k && !self.joining(i)) {
                    self.excluded = Some((k, until));
                    let gone = self.nodes[k].origin;
                    for n in &mut self.nodes {
                        n.acked.remove(&gone);
                    }
                    self.stats.exclusions += 1;
                    trace!("t={} node{k}: removed from the others' lists", self.t_ms);
                }
            }
        }
        if let Some((k, until)) = self.excluded {
            if (self.t_ms >= until || !chaos) && self.nodes[k].store.is_some() {
                self.rejoin(k);
            }
        }
        for i in 0..3 {
            if self.nodes[i].store.is_none() && (self.t_ms >= self.nodes[i].down_until_ms || !chaos)
            {
                self.restart(i);
            }
        }
        if self.t_ms % 2000 == 0 {
            self.collect_tombstones();
        }
        let mut moved = false;
        for (p, &(a, b)) in PAIRS.iter().enumerate() {
            if self.excluded.is_some_and(|(k, _)| k == a || k == b) {
                self.conns[p] = None;
                continue;
            }
            if self.conns[p].is_none()
                && !self.cut[p]
                && self.nodes[a].store.is_some()
                && self.nodes[b].store.is_some()
            {
                self.connect(p);
                moved = true;
            }
            let (alive, m) = self.deliver(p);
            moved |= m;
            if !alive {
                continue;
            }
            for side in 0..2 {
                let (alive, m) = self.drive_end(p, side);
                moved |= m;
                if !alive {
                    self.conns[p] = None;
                    break;
                }
            }
        }
        self.t_ms += TICK_MS;
        moved
            || self
                .conns
                .iter()
                .flatten()
                .any(|c| c.pipes.iter().any(|p| !p.queue.is_empty()))
    }

    /// Whether peer `i` still waits for the cluster's content (a crashed peer's file says so).
    fn joining(&self, i: usize) -> bool {
        match &self.nodes[i].store {
            Some(s) => s.joining(),
            None => self.nodes[i].open().expect("peek").joining(),
        }
    }

    /// Peer `k` joins again: its shared content is replaced by the cluster's.
    fn rejoin(&mut self, k: usize) {
        let others: Vec<VersionVector> = (0..3)
            .filter(|&i| i != k)
            .map(|i| match &self.nodes[i].store {
                Some(s) => s.vector().expect("vector"),
                // A crashed peer keeps its file: what it had is what its reopened store has.
                None => self.nodes[i]
                    .open()
                    .expect("peek")
                    .vector()
                    .expect("vector"),
            })
            .collect();
        // Writes no other peer had seen exist only on `k` and are discarded by the join.
        self.writes
            .retain(|w| others.iter().any(|v| v.covers(w.stamp)));
        let store = self.nodes[k].store.as_ref().expect("up");
        store.join().expect("join");
        self.excluded = None;
        self.stats.joins += 1;
        trace!("t={} node{k}: joins again", self.t_ms);
    }

    fn collect_tombstones(&mut self) {
        let excluded = self.excluded.map(|(k, _)| self.nodes[k].origin);
        for n in &self.nodes {
            let Some(store) = &n.store else { continue };
            // The members this peer's list holds: all others, less one the others removed (the
            // removed peer itself still lists everybody).
            let others: Vec<u32> = self
                .nodes
                .iter()
                .map(|m| m.origin)
                .filter(|&o| o != n.origin && (Some(n.origin) == excluded || Some(o) != excluded))
                .collect();
            let acked: Option<Vec<VersionVector>> =
                others.iter().map(|o| n.acked.get(o).cloned()).collect();
            if let Some(acked) = acked {
                let c = store.gc_tombstones(acked).expect("gc") as u64;
                if c > 0 {
                    trace!("t={} {}: collected {c} tombstones", self.t_ms, n.origin);
                }
                self.stats.collected += c;
            }
        }
    }

    /// Heal everything and run until nothing moves; fail if that takes too long (livelock).
    fn settle(&mut self) {
        self.cut = [false; 3];
        let mut quiet = 0;
        for _ in 0..20_000 {
            if self.tick(false) {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet >= 5 && self.conns.iter().all(Option::is_some) {
                    return;
                }
            }
        }
        panic!(
            "seed {}: the cluster did not settle within 200 s of virtual time after healing",
            self.seed
        );
    }

    fn check(&self) {
        let mut expected: BTreeMap<(Namespace, &str), &Write> = BTreeMap::new();
        for w in &self.writes {
            let slot = expected.entry((w.ns, &w.key)).or_insert(w);
            if w.stamp > slot.stamp {
                *slot = w;
            }
        }
        let vectors: Vec<VersionVector> = self
            .nodes
            .iter()
            .map(|n| n.store.as_ref().expect("up").vector().expect("vector"))
            .collect();
        for n in &self.nodes {
            let store = n.store.as_ref().expect("up");
            assert!(
                !store.joining(),
                "seed {}: peer {} still waits for the cluster's content after healing",
                self.seed,
                n.origin
            );
            for ns in Namespace::ALL {
                let have: BTreeMap<String, Value> =
                    store.list(ns, "").expect("list").into_iter().collect();
                let want: BTreeMap<String, Value> = expected
                    .iter()
                    .filter(|((wns, _), _)| *wns == ns)
                    .filter_map(|((_, k), w)| w.value.clone().map(|v| ((*k).to_owned(), v)))
                    .collect();
                assert_eq!(
                    have, want,
                    "seed {}: peer {} holds other content than the latest acknowledged writes ({ns}); vectors {vectors:?}",
                    self.seed, n.origin
                );
            }
        }
    }
}

fn run_seed(seed: u64) -> Stats {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC0FF_EE00);
    let skews = [
        rng.random_range(-5000..=5000),
        rng.random_range(-5000..=5000),
        rng.random_range(-5000..=5000),
    ];
    let mut sim = Sim::new(seed, skews);
    for _ in 0..4000 {
        sim.tick(true);
    }
    sim.settle();
    sim.check();
    sim.stats
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    (0..n).collect()
}

#[test]
fn random_faults_converge_without_losing_acknowledged_writes() {
    let mut total = Stats::default();
    let seeds = seeds();
    for &seed in &seeds {
        match std::panic::catch_unwind(|| run_seed(seed)) {
            Ok(stats) => total.add(stats),
            Err(e) => {
                eprintln!("simulation failed with seed {seed}; rerun with SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    eprintln!("{} seeds: {total:?}", seeds.len());
    // The run must really have exercised the faults it claims to survive.
    if seeds.len() >= 50 {
        assert!(
            total.writes > 0 && total.crashes > 0 && total.partitions > 0,
            "{total:?}"
        );
        assert!(
            total.timeouts > 0 && total.snapshots > 0 && total.collected > 0,
            "{total:?}"
        );
        assert!(total.joins > 0 && total.refused_joining > 0, "{total:?}");
    }
}

/// With every link up, each peer receives each other peer's write once: a peer relays another
/// origin's writes only when the peer it talks to has not had them from their writer for a while.
/// Relaying at once would send most writes twice to every peer of a 3-peer mesh.
#[test]
fn writes_are_not_relayed_while_every_link_is_up() {
    let mut sim = Sim::new(7, [0, 0, 0]);
    for t in 0..6000 {
        // A write every 20 ms, in bursts, from every peer.
        if t % 2 == 0 {
            let i = sim.rng.random_range(0..3);
            sim.write(i);
        }
        sim.tick(false);
    }
    sim.settle();
    sim.check();
    let received: u64 = sim
        .conns
        .iter()
        .flatten()
        .flat_map(|c| c.ends.iter())
        .map(|e| e.session.stats().entries_received)
        .sum();
    // Each write must reach the two other peers.
    let needed = 2 * sim.stats.writes;
    let extra = received.saturating_sub(needed) as f64 / needed as f64;
    eprintln!(
        "{} writes, {received} entries received, {needed} needed: {:.1}% extra",
        sim.stats.writes,
        extra * 100.0
    );
    assert!(
        extra < 0.05,
        "{:.1}% of the entries received were copies",
        extra * 100.0
    );
}

/// Peer 3 cannot reach peer 1: peer 2 relays peer 1's writes to it, after the relay hold.
#[test]
fn writes_reach_a_peer_cut_off_from_their_writer_through_the_third() {
    let mut sim = Sim::new(11, [0, 0, 0]);
    sim.settle();
    sim.cut[1] = true; // the pair (0, 2)
    for _ in 0..50 {
        sim.write(0);
        sim.tick(false);
    }
    for _ in 0..100 {
        sim.tick(false);
    }
    assert!(sim.cut[1], "the link must still be cut");
    let v0 = sim.nodes[0].store.as_ref().unwrap().vector().unwrap();
    let v2 = sim.nodes[2].store.as_ref().unwrap().vector().unwrap();
    assert!(
        v2.dominates(&v0),
        "peer 3 lacks peer 1's writes: {v2:?} vs {v0:?}"
    );
    sim.settle();
    sim.check();
}

/// Peer 1's clock is 5 s behind, peer 3's 5 s ahead. Peer 3 writes, peer 1 sees it and writes the
/// same key, then peer 2: each causally later write wins everywhere although its writer's wall
/// clock says it happened earlier.
#[test]
fn clock_skew_of_five_seconds_does_not_make_later_writes_lose() {
    let mut sim = Sim::new(u64::MAX, [-5000, 0, 5000]);
    let key = "bridge/b1";
    let order = [2usize, 0, 1, 2, 0];
    let mut last: Option<Hlc> = None;
    for (step, &i) in order.iter().enumerate() {
        let wall = sim.wall(i);
        let s = sim.nodes[i]
            .store
            .as_ref()
            .expect("up")
            .put(Namespace::Config, key, json!(step), wall)
            .expect("put");
        if let Some(l) = last {
            assert!(s > l, "step {step}: {s} must order after {l}");
        }
        last = Some(s);
        sim.writes.push(Write {
            ns: Namespace::Config,
            key: key.into(),
            value: Some(json!(step)),
            stamp: s,
        });
        sim.settle();
        for n in &sim.nodes {
            let got = n
                .store
                .as_ref()
                .expect("up")
                .get(Namespace::Config, key)
                .expect("get");
            assert_eq!(
                got,
                Some(json!(step)),
                "step {step}: peer {} has an older value",
                n.origin
            );
        }
        // The next write happens 1 ms of real time later.
        sim.t_ms += 1;
    }
    sim.check();
}
