//! The tokio driver the daemon runs: a TCP listener, one connection per peer, one
//! [`Session`] per connection, reconnection with bounded backoff, writes that can wait for peers,
//! tombstone collection, and status.
//!
//! **Who connects:** the peer with the lower origin id dials the one with the higher id; the higher
//! one only accepts. So there is one connection per pair, and no tie to break. An accepted
//! connection must introduce itself as a configured peer; if a second connection from the same
//! peer arrives (it restarted, or the old connection is half-dead), the newer one replaces the
//! older one.
//!
//! Origin ids: the daemon uses the low 32 bits of each peer's management IPv4 address,
//! `u32::from(Ipv4Addr)`; addresses are the peers' overlay addresses (plain TCP on loopback in
//! tests).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::hlc::Hlc;
use crate::model::{Entry, Namespace, VersionVector};
use crate::store::{Applying, Seen, Store, StoreError, StoreStats};
use crate::sync::{Local, Pull, Session, SessionStats, SyncError, SyncEvent};

/// First reconnect delay; doubled after every failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a peer that comes back is found within this time.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A TCP connect that takes longer than this counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often tombstones that every peer has seen are collected.
const GC_INTERVAL: Duration = Duration::from_secs(30);
/// Most connections accepted but not yet identified (a flood cannot exhaust memory or tasks).
const MAX_PENDING_ACCEPTS: usize = 16;
/// Lag counts stop at this many entries (status stays cheap).
const LAG_CAP: usize = 100_000;
/// Read buffer per connection.
const READ_BUF: usize = 64 * 1024;
/// Batches of received entries queued to the store and not yet committed, per connection. While
/// they commit the connection keeps reading (the peer's stream does not stall on our disk), and
/// the writer commits what queued up together; beyond this many it stops reading (backpressure).
const MAX_APPLYING: usize = 8;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The listen address is unavailable (in use, not local, no permission).
    #[error("replication: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a write did not fully succeed. Says whether the write is durable locally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The local store refused or failed: nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller asked for more acknowledging peers than are configured: nothing was written.
    #[error("asked to wait for {wanted} peers but only {configured} are configured")]
    TooFewPeers {
        /// Peers asked for.
        wanted: usize,
        /// Peers configured.
        configured: usize,
    },
    /// The write is durable locally and will replicate, but fewer than `wanted` peers had it
    /// within the timeout (peers down or partitioned).
    #[error(
        "write {stamp} is durable locally but only {acked_by} of {wanted} peers had it after {timeout:?}"
    )]
    NotReplicated {
        /// The write's stamp.
        stamp: Hlc,
        /// Peers that had acknowledged it.
        acked_by: usize,
        /// Peers asked for.
        wanted: usize,
        /// How long we waited.
        timeout: Duration,
    },
}

/// Replication status of one peer, for `confmesh status --json` and `/metrics`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerReplication {
    /// The peer's origin id.
    pub origin: u32,
    /// Its sync address.
    pub addr: SocketAddr,
    /// Whether a sync session is up.
    pub connected: bool,
    /// The peer is joining too and waits for a snapshot that this peer, joining, cannot give.
    pub joining: bool,
    /// Entries this peer holds that the peer had not acknowledged (capped at 100 000); `None`
    /// before its first acknowledgement.
    pub lag_entries: Option<usize>,
    /// Bytes queued for the peer but not yet written to the socket.
    pub queue_depth: usize,
    /// Bytes sent to the peer since the service started.
    pub bytes_sent: u64,
    /// Bytes received from the peer since the service started.
    pub bytes_received: u64,
    /// Entries sent to the peer since the service started.
    pub entries_sent: u64,
    /// Entries received from the peer since the service started.
    pub entries_received: u64,
    /// Malformed frames received from the peer (each one ended a session): a damaged link or an
    /// incompatible or misbehaving peer.
    pub malformed_frames: u64,
    /// Unix time (ms) of the peer's last acknowledgement.
    pub last_sync_unix_ms: Option<u64>,
    /// Why the last session ended, if it did.
    pub last_error: Option<String>,
}

/// Replication status of this peer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplicationStatus {
    /// This peer's origin id.
    pub origin: u32,
    /// Joined a cluster and still waiting for a member's snapshot: writes are refused until then.
    pub joining: bool,
    /// One record per configured peer, by origin id.
    pub peers: Vec<PeerReplication>,
    /// The local store's write path.
    pub store: StoreStats,
}

#[derive(Default)]
struct PeerState {
    addr: Option<SocketAddr>,
    /// Connection currently in charge of this peer (its id), and its lifeline: dropping the sender
    /// ends that connection.
    active: Option<(u64, watch::Sender<()>)>,
    dialer: Option<AbortHandle>,
    acked: Option<VersionVector>,
    /// Counters of finished sessions plus the live one's.
    totals: SessionStats,
    live: SessionStats,
    queue_depth: usize,
    /// The live session's peer waits for a snapshot we cannot give (both joining).
    waits_for_snapshot: bool,
    last_sync_unix_ms: Option<u64>,
    last_error: Option<String>,
}

struct Shared {
    store: Arc<Store>,
    origin: u32,
    peers: Mutex<BTreeMap<u32, PeerState>>,
    /// Bumped on every acknowledgement, so that writes waiting for peers re-check.
    acks: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
    /// Never used to send: [`Service::shutdown`] waits until it is dropped with the last
    /// `Arc<Shared>`, i.e. until every task has finished.
    _alive: mpsc::Sender<()>,
    next_conn: std::sync::atomic::AtomicU64,
    pending_accepts: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn peers(&self) -> MutexGuard<'_, BTreeMap<u32, PeerState>> {
        // A panic while holding the lock leaves plain counters behind: keep using them.
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running replication service of one peer.
pub struct Service {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    accept: AbortHandle,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("origin", &self.shared.origin)
            .field("listen", &self.local_addr)
            .finish()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Service {
    /// Listen on `listen` and keep a sync session with every peer in `peers` (`(origin id,
    /// address)`; this peer's own entry, if present, is ignored). Must run inside a tokio runtime.
    pub async fn start(
        store: Arc<Store>,
        listen: SocketAddr,
        peers: Vec<(u32, SocketAddr)>,
    ) -> Result<Service, ServiceError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: listen,
                source,
            })?;
        Self::with_listener(store, listener, peers)
    }

    /// As [`Service::start`], on a listener the caller prepared (the daemon binds it to the
    /// overlay's TUN device, so that only traffic that came through an SA reaches it).
    pub fn with_listener(
        store: Arc<Store>,
        listener: TcpListener,
        peers: Vec<(u32, SocketAddr)>,
    ) -> Result<Service, ServiceError> {
        let local_addr = listener.local_addr().map_err(|source| ServiceError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let (stop, shutdown) = watch::channel(false);
        let (_alive, done) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            origin: store.origin(),
            store,
            peers: Mutex::new(BTreeMap::new()),
            acks: watch::channel(0).0,
            shutdown,
            _alive,
            next_conn: 0.into(),
            pending_accepts: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_ACCEPTS)),
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&shared), listener)).abort_handle();
        tokio::spawn(gc_loop(Arc::clone(&shared)));
        let service = Service {
            shared,
            local_addr,
            stop,
            done,
            accept,
        };
        service.set_peers(peers);
        Ok(service)
    }

    /// The address actually listened on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The store this service replicates.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Change the peer list live (SPEC §2 rule 7): removed peers are disconnected at once, new
    /// ones connected, changed addresses redialled. Must run inside a tokio runtime.
    pub fn set_peers(&self, peers: Vec<(u32, SocketAddr)>) {
        let me = self.shared.origin;
        let wanted: BTreeMap<u32, SocketAddr> =
            peers.into_iter().filter(|(o, _)| *o != me).collect();
        let mut map = self.shared.peers();
        map.retain(|origin, st| {
            let keep = wanted.get(origin) == st.addr.as_ref();
            if !keep {
                stop_peer(st);
            }
            keep
        });
        for (origin, addr) in wanted {
            let st = map.entry(origin).or_default();
            if st.addr.is_some() {
                continue;
            }
            st.addr = Some(addr);
            if me < origin {
                let task = dial_loop(Arc::clone(&self.shared), origin, addr);
                st.dialer = Some(tokio::spawn(task).abort_handle());
            }
        }
    }

    /// Write (`Some`) or delete (`None`) `key`. Returns once durable locally and, if `wait_peers` >
    /// 0, once that many peers acknowledged it, or fails with [`WriteError::NotReplicated`] after
    /// `timeout` (the write stays durable locally and will still replicate).
    pub async fn write(
        &self,
        ns: Namespace,
        key: &str,
        value: Option<Value>,
        wait_peers: usize,
        timeout: Duration,
    ) -> Result<Hlc, WriteError> {
        let configured = self.shared.peers().len();
        if wait_peers > configured {
            return Err(WriteError::TooFewPeers {
                wanted: wait_peers,
                configured,
            });
        }
        let mut acks = self.shared.acks.subscribe();
        let stamp = self
            .shared
            .store
            .write_async(ns, key, value, unix_ms())
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let acked_by = self
                .shared
                .peers()
                .values()
                .filter(|p| p.acked.as_ref().is_some_and(|v| v.covers(stamp)))
                .count();
            if acked_by >= wait_peers {
                return Ok(stamp);
            }
            match tokio::time::timeout_at(deadline, acks.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(WriteError::NotReplicated {
                        stamp,
                        acked_by,
                        wanted: wait_peers,
                        timeout,
                    });
                }
            }
        }
    }

    /// The current value of `key`.
    pub fn get(&self, ns: Namespace, key: &str) -> Result<Option<Value>, StoreError> {
        self.shared.store.get(ns, key)
    }

    /// Live keys of `ns` under `prefix`.
    pub fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<(String, Value)>, StoreError> {
        self.shared.store.list(ns, prefix)
    }

    /// Per-peer replication status.
    pub fn status(&self) -> ReplicationStatus {
        let snapshot: Vec<_> = self
            .shared
            .peers()
            .iter()
            .map(|(o, st)| {
                let total = add_stats(st.totals, st.live);
                (
                    *o,
                    st.addr,
                    (st.active.is_some(), st.waits_for_snapshot),
                    st.acked.clone(),
                    total,
                    st.queue_depth,
                    st.last_sync_unix_ms,
                    st.last_error.clone(),
                )
            })
            .collect();
        let peers = snapshot
            .into_iter()
            .filter_map(
                |(
                    origin,
                    addr,
                    (connected, joining),
                    acked,
                    s,
                    queue_depth,
                    last_sync_unix_ms,
                    last_error,
                )| {
                    Some(PeerReplication {
                        origin,
                        addr: addr?,
                        connected,
                        joining,
                        lag_entries: acked.and_then(|v| self.shared.store.lag(&v, LAG_CAP).ok()),
                        queue_depth,
                        bytes_sent: s.bytes_sent,
                        bytes_received: s.bytes_received,
                        entries_sent: s.entries_sent,
                        entries_received: s.entries_received,
                        malformed_frames: s.malformed,
                        last_sync_unix_ms,
                        last_error,
                    })
                },
            )
            .collect();
        ReplicationStatus {
            origin: self.shared.origin,
            joining: self.shared.store.joining(),
            peers,
            store: self.shared.store.stats(),
        }
    }

    /// Stop every task and wait until all have finished (then the store is no longer used by the
    /// service and can be closed and reopened).
    pub async fn shutdown(mut self) {
        let mut done = std::mem::replace(&mut self.done, mpsc::channel(1).1);
        // Drop signals every task to stop; each holds an `Arc<Shared>`, so `done` closes when the
        // last one has finished.
        drop(self);
        while done.recv().await.is_some() {}
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.accept.abort();
        for st in self.shared.peers().values_mut() {
            stop_peer(st);
        }
    }
}

fn stop_peer(st: &mut PeerState) {
    if let Some(d) = st.dialer.take() {
        d.abort();
    }
    // Dropping the lifeline ends the connection.
    st.active = None;
}

fn add_stats(a: SessionStats, b: SessionStats) -> SessionStats {
    SessionStats {
        bytes_sent: a.bytes_sent + b.bytes_sent,
        bytes_received: a.bytes_received + b.bytes_received,
        entries_sent: a.entries_sent + b.entries_sent,
        entries_received: a.entries_received + b.entries_received,
        malformed: a.malformed + b.malformed,
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, from) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "replication: accept failed");
                tokio::time::sleep(MIN_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&shared.pending_accepts).try_acquire_owned() else {
            tracing::warn!(%from, "replication: too many unidentified connections, refusing one");
            continue;
        };
        let shared = Arc::clone(&shared);
        let id = shared
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = run_connection(&shared, stream, None, id, Some(permit)).await {
                tracing::info!(%from, error = %e, "replication: inbound session ended");
            }
        });
    }
}

async fn dial_loop(shared: Arc<Shared>, peer: u32, addr: SocketAddr) {
    let mut backoff = MIN_BACKOFF;
    let mut shutdown = shared.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let id = shared
                    .next_conn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = run_connection(&shared, stream, Some(peer), id, None).await {
                    tracing::info!(peer, %addr, error = %e, "replication: session ended");
                    if let Some(st) = shared.peers().get_mut(&peer) {
                        st.last_error = Some(e.to_string());
                    }
                }
            }
            Ok(Err(e)) => record_error(&shared, peer, format!("connect {addr}: {e}")),
            Err(_) => record_error(&shared, peer, format!("connect {addr}: timed out")),
        }
        if started.elapsed() > 2 * MAX_BACKOFF {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn record_error(shared: &Shared, peer: u32, e: String) {
    if let Some(st) = shared.peers().get_mut(&peer) {
        st.last_error = Some(e);
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer {0} is not in the peer list")]
    Unknown(u32),
    #[error(
        "claims to be peer {peer} but connects from {from}, not from that peer's address {expected}"
    )]
    WrongSource {
        peer: u32,
        from: std::net::IpAddr,
        expected: std::net::IpAddr,
    },
    #[error("shutting down")]
    Shutdown,
    #[error("the local content was replaced (join or restore): resyncing")]
    Replaced,
}

/// Drive one connection until it ends. `expected` is the peer we dialled; `permit` bounds
/// unidentified inbound connections and is released once the peer is known.
async fn run_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    expected: Option<u32>,
    id: u64,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let remote = stream.peer_addr()?.ip();
    let store = &shared.store;
    let (mut rd, mut wr) = stream.into_split();
    let mut changes = store.subscribe();
    let mut shutdown = shared.shutdown.clone();
    // The epoch first, then the vector: if the content is replaced in between, the epoch is stale
    // and this session ends at the next change instead of trusting a wrong picture.
    let epoch = store.epoch();
    let local = Local {
        origin: shared.origin,
        replica: store.replica(),
        joining: store.joining(),
        vector: store.vector()?,
    };
    let mut session = Session::new(local, expected, Instant::now());
    // Handed to the peer table once the peer is known; dropped there to end this connection.
    let (lifeline, mut kill) = watch::channel(());
    let mut lifeline = Some(lifeline);
    let mut inbuf = vec![0u8; READ_BUF];
    let mut out = Vec::new();
    let mut out_off = 0;
    let mut peer: Option<u32> = None;
    let mut applying: VecDeque<Applying> = VecDeque::new();
    let result = loop {
        match drive(
            shared,
            &mut session,
            &mut peer,
            (id, epoch, remote),
            &mut permit,
            &mut lifeline,
            &mut applying,
        )
        .await
        {
            Ok(()) => {}
            Err(e) => break Err(e),
        }
        if out_off == out.len() {
            out.clear();
            out_off = 0;
            session.poll_transmit(Instant::now(), &mut out);
        }
        if let Some(p) = peer {
            if let Some(st) = shared.peers().get_mut(&p) {
                st.live = session.stats();
                st.queue_depth = session.queue_depth() + (out.len() - out_off);
                st.waits_for_snapshot = session.peer_waits_for_snapshot();
            }
        }
        let deadline = session.poll_timeout().map_or_else(
            || tokio::time::Instant::now() + MAX_BACKOFF,
            tokio::time::Instant::from_std,
        );
        enum Ev {
            Read(usize),
            Wrote(usize),
            Applied(Result<usize, StoreError>),
            Changed,
            Timer,
            Stop,
        }
        let can_read = applying.len() < MAX_APPLYING;
        let oldest = async {
            match applying.front_mut() {
                Some(a) => a.await,
                None => std::future::pending().await,
            }
        };
        let ev = tokio::select! {
            r = rd.read(&mut inbuf), if can_read => match r { Ok(n) => Ev::Read(n), Err(e) => break Err(e.into()) },
            a = oldest => Ev::Applied(a),
            w = wr.write(&out[out_off..]), if out_off < out.len() => match w { Ok(n) => Ev::Wrote(n), Err(e) => break Err(e.into()) },
            c = changes.changed() => if c.is_ok() { Ev::Changed } else { Ev::Stop },
            _ = tokio::time::sleep_until(deadline) => Ev::Timer,
            _ = shutdown.changed() => Ev::Stop,
            k = kill.changed() => if k.is_ok() { Ev::Timer } else { Ev::Stop },
        };
        let now = Instant::now();
        let r = match ev {
            Ev::Read(0) => Err(ConnError::Closed),
            Ev::Read(n) => session
                .handle_bytes(now, inbuf.get(..n).unwrap_or_default())
                .map_err(ConnError::from),
            Ev::Wrote(n) => {
                out_off += n;
                Ok(())
            }
            Ev::Applied(r) => {
                applying.pop_front();
                r.map_err(ConnError::from)
                    .and_then(|_| store.vector().map_err(ConnError::from))
                    .map(|v| session.handle_applied(v))
            }
            // After a replace_all (join, restore) both sides' pictures of each other are wrong:
            // start over with fresh hellos.
            Ev::Changed if store.epoch() != epoch => Err(ConnError::Replaced),
            Ev::Changed => store
                .vector()
                .map(|v| {
                    session.set_joining(store.joining());
                    session.notify_store_changed(now, v);
                })
                .map_err(ConnError::from),
            Ev::Timer => session.handle_timeout(now).map_err(ConnError::from),
            Ev::Stop => Err(ConnError::Shutdown),
        };
        if let Err(e) = r {
            break Err(e);
        }
    };
    if let Some(p) = peer {
        if let Some(st) = shared.peers().get_mut(&p) {
            if st.active.as_ref().is_some_and(|(a, _)| *a == id) {
                st.active = None;
                st.totals = add_stats(st.totals, session.stats());
                st.live = SessionStats::default();
                st.queue_depth = 0;
                st.waits_for_snapshot = false;
                if let Err(e) = &result {
                    st.last_error = Some(e.to_string());
                }
            }
        }
    }
    result
}

/// Act on the session's events and pulls.
async fn drive(
    shared: &Arc<Shared>,
    session: &mut Session,
    peer: &mut Option<u32>,
    (id, epoch, remote): (u64, u64, std::net::IpAddr),
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    lifeline: &mut Option<watch::Sender<()>>,
    applying: &mut VecDeque<Applying>,
) -> Result<(), ConnError> {
    let store = &shared.store;
    // Consecutive batches of entries (one read often holds several frames) go to the disk in one
    // commit: a receiver that committed each frame alone fell behind a busy sender.
    let mut received: Vec<Entry> = Vec::new();
    let mut received_seen: Option<VersionVector> = None;
    loop {
        let ev = session.poll_event();
        if !matches!(ev, Some(SyncEvent::EntriesReceived { .. })) && !received.is_empty() {
            if applying.len() >= MAX_APPLYING {
                if let Some(oldest) = applying.pop_front() {
                    oldest.await?;
                    session.handle_applied(store.vector()?);
                }
            }
            let seen = received_seen.take().map(|vector| Seen { vector, epoch });
            // Acknowledged when committed (the connection's loop waits for it).
            applying.push_back(
                store
                    .queue_remote(std::mem::take(&mut received), seen, unix_ms())
                    .await?,
            );
        }
        let Some(ev) = ev else { break };
        match ev {
            SyncEvent::Connected { peer: p, .. } => {
                let mut map = shared.peers();
                let st = map.get_mut(&p).ok_or(ConnError::Unknown(p))?;
                // A peer is who it claims to be only from its own address (over the overlay,
                // that address is vouched for by the AH SA the packets arrived on).
                if let Some(expected) = st.addr.map(|a| a.ip()).filter(|&a| a != remote) {
                    return Err(ConnError::WrongSource {
                        peer: p,
                        from: remote,
                        expected,
                    });
                }
                // The newer connection replaces an older one (restart, half-dead socket): replacing
                // the older one's lifeline ends it.
                let line = lifeline.take().ok_or(SyncError::Protocol("second hello"))?;
                st.active = Some((id, line));
                st.last_error = None;
                *peer = Some(p);
                drop(permit.take());
            }
            SyncEvent::EntriesReceived { entries, seen } => {
                received.extend(entries);
                // A catch-up's closing vector holds for everything applied with it.
                received_seen = seen.or(received_seen);
            }
            SyncEvent::SnapshotReceived(snapshot) => {
                store.apply_snapshot_async(snapshot, unix_ms()).await?;
                session.handle_applied(store.vector()?);
            }
            SyncEvent::PeerAcked(v) => {
                if let Some(p) = *peer {
                    if let Some(st) = shared.peers().get_mut(&p) {
                        st.acked = Some(v);
                        st.last_sync_unix_ms = Some(unix_ms());
                    }
                    shared.acks.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        }
    }
    while let Some(pull) = session.poll_pull() {
        match pull {
            Pull::Changes {
                since,
                limit,
                origins,
            } => {
                session.handle_changes(store.changes_since_of(&since, limit, origins.as_deref())?)
            }
            Pull::Snapshot => session.handle_snapshot(&store.snapshot()?),
        }
    }
    Ok(())
}

async fn gc_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(GC_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let acked: Option<Vec<VersionVector>> = {
            let map = shared.peers();
            if map.is_empty() {
                None
            } else {
                map.values().map(|p| p.acked.clone()).collect()
            }
        };
        if let Some(acked) = acked {
            match shared.store.gc_tombstones_async(acked).await {
                Ok(n) if n > 0 => {
                    tracing::debug!(collected = n, "replication: tombstones collected")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "replication: tombstone collection failed"),
            }
        }
    }
}
