//! The daemon: one task that owns the cluster state and drives the cores, plus the tasks that
//! feed it (control socket, hello socket, signals).
//!
//! Every input ends up as a message to the state loop in [`run`], so the state needs no locks and
//! every change is applied in one place, in order. Shutdown is one `watch` signal that every task
//! obeys; `run` returns once they have all finished (mini-redis style).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use confmesh_dataplane::{Event as OverlayEvent, FaultConfig, Overlay, OverlayConfig, PeerAddrs};
use confmesh_ike::{Endpoint, EndpointConfig, Event as IkeEvent, PeerConfig};
use zeroize::Zeroizing;

use confmesh_replication::service::Service as Replication;
use confmesh_replication::store::{Snapshot, Store, StoreError};

use crate::b2bua::{B2buaSettings, StoreB2bua, start_on_store};
use crate::bandwidth::{BANDWIDTH_PORT, BandwidthService};
use crate::config::{ClusterSettings, Config, OVERLAY_PREFIX_LEN};
use crate::control::{self, Call, Request};
use crate::eventlog::{LogKind, Logs, Severity, rfc3339, wall_ms};
use crate::keylog::KeyLog;
use crate::live::{self, MembershipChange};
use crate::membership::{
    Hello, IkeState, LocalIdentity, MAX_HELLO_LEN, Membership, MembershipEvent,
};
use crate::shared::{self, REPLICATION_PORT};
use crate::status::{AlarmStatus, PeerStatus, Status};

/// UDP port of the hello exchange, on overlay addresses (so hellos travel inside AH).
pub const HELLO_PORT: u16 = 7001;

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file, re-read on reload and rewritten by live changes.
    pub config_path: PathBuf,
    /// Where to append SA keys for Wireshark (off when `None`).
    pub keylog: Option<PathBuf>,
    /// The software version reported to peers (the build's own unless overridden for tests).
    pub version: String,
}

/// A failure that stops the daemon from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The replicated store could not be opened (damaged, locked by another process, I/O).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local resource (socket, directory, device) could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// The state the loop owns.
struct Daemon {
    inputs: mpsc::Sender<Input>,
    opts: Options,
    config: Config,
    logs: Logs,
    keylog: Option<KeyLog>,
    /// Shared configuration and conference status, replicated while clustered.
    store: Arc<Store>,
    /// Usage updates on UDP 1719 and the cluster-wide admission ledger.
    bandwidth: BandwidthService,
    /// The SIP B2BUA on the rendezvous addresses, routing on the store and the bandwidth ledger.
    b2bua: StoreB2bua,
    /// The admin API's listener and TLS identity, which a reload may change.
    admin: crate::admin::AdminControl,
    cluster: Option<ClusterState>,
    /// While joining: the automatic backup taken just before, which holds the shared
    /// configuration this peer founds the cluster with if every peer joins at once.
    join_backup: Option<PathBuf>,
}

/// What exists only while this peer is clustered.
struct ClusterState {
    settings: ClusterSettings,
    membership: Membership,
    hello: Arc<UdpSocket>,
    overlay: Overlay,
    /// The IKE engine and its UDP 500 socket on the management address.
    ike: Endpoint,
    ike_socket: Arc<UdpSocket>,
    /// What UDP 500 accepts before anything is copied or queued.
    ike_gate: Arc<IkeGate>,
    /// Sync sessions of the store with the other peers, over the overlay (shared with the B2BUA,
    /// whose placement claims wait for the connected peers).
    replication: Arc<Replication>,
    /// Tasks feeding [`Input`]s from this cluster's sockets and cores; stopped when it goes.
    _feeders: Feeders,
}

/// The cluster's feeder tasks, aborted when the cluster state goes.
struct Feeders(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Feeders {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Everything that reaches the state loop from the cluster's sockets and cores.
#[derive(Debug)]
enum Input {
    /// A datagram on the hello socket.
    Hello(Vec<u8>, SocketAddr),
    /// An event of the dataplane.
    Overlay(OverlayEvent),
    /// A datagram on UDP 500.
    Ike(Vec<u8>, SocketAddr),
}

/// Inputs queued for the state loop; feeders wait when it is full (backpressure, bounded memory).
const INPUT_QUEUE: usize = 256;

/// Name of the TUN device that carries the overlay.
pub const TUN_NAME: &str = "confmesh0";

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let config = Config::load(&opts.config_path)?;
    let state_dir = config.peer.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(io(format!(
        "cannot create state_dir {}",
        state_dir.display()
    )))?;
    let logs = Logs::open(
        &state_dir,
        &config.peer.hostname,
        config.peer.syslog.clone(),
    )
    .map_err(io(format!(
        "cannot open the logs under {}",
        state_dir.display()
    )))?;
    let keylog = match &opts.keylog {
        Some(path) => {
            tracing::warn!(path = %path.display(), "key logging is on: SA keys are written to the key log; use this for debugging only");
            Some(
                KeyLog::open(path)
                    .map_err(io(format!("cannot open the key log {}", path.display())))?,
            )
        }
        None => None,
    };
    let store = shared::open_store(&state_dir, config.peer.mgmt_addr).await?;
    let others: Vec<Ipv4Addr> = config
        .cluster
        .iter()
        .flat_map(|c| c.peers.iter().copied())
        .filter(|p| *p != config.peer.mgmt_addr)
        .collect();
    let bandwidth = BandwidthService::start(config.peer.mgmt_addr, BANDWIDTH_PORT, &others)
        .map_err(io(format!(
            "cannot bind bandwidth updates on {}:{BANDWIDTH_PORT} (peer.mgmt_addr)",
            config.peer.mgmt_addr
        )))?;
    let sip = B2buaSettings {
        shards: config.peer.sip_shards,
        ..B2buaSettings::on_rendezvous(&config.peer.rendezvous_addrs, &config.peer.hostname)
    };
    let b2bua = start_on_store(store.clone(), bandwidth.ledger(), sip)
        .await
        .map_err(|e| DaemonError::Io {
            what: "cannot start the SIP B2BUA".into(),
            source: std::io::Error::other(e),
        })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (calls_tx, mut calls) = mpsc::channel::<Call>(32);
    let socket_path = config.peer.control_socket.clone();
    let control = tokio::spawn({
        let stop = stop_rx.clone();
        let calls_tx = calls_tx.clone();
        async move { control::serve(&socket_path, calls_tx, stop).await }
    });

    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(io(format!(
            "cannot listen for the admin API on {} (admin.listen)",
            config.admin.listen
        )))?;
    let (admin_control, admin_updates) = crate::admin::AdminControl::new(config.admin.clone());
    let admin = tokio::spawn(crate::admin::serve(
        admin_listener,
        config.admin.tls.clone(),
        admin_updates,
        calls_tx.clone(),
        stop_rx.clone(),
    ));
    let (inputs_tx, mut inputs) = mpsc::channel(INPUT_QUEUE);
    let mut daemon = Daemon {
        inputs: inputs_tx,
        opts,
        config,
        logs,
        keylog,
        store,
        bandwidth,
        b2bua,
        admin: admin_control,
        cluster: None,
        join_backup: None,
    };
    let marker = join_backup_marker(&daemon.config.peer.state_dir);
    if daemon.store.joining() {
        daemon.join_backup = std::fs::read_to_string(&marker).ok().map(PathBuf::from);
    } else {
        let _ = std::fs::remove_file(&marker);
    }
    let cluster = daemon.config.cluster.clone();
    daemon.logs.append(
        LogKind::Events,
        Severity::Notice,
        format!(
            "confmesh {} started as {} ({})",
            daemon.opts.version,
            daemon.config.peer.hostname,
            mode_name(&cluster)
        ),
    );
    if let Some(settings) = cluster {
        daemon.join(settings).await?;
    }

    let mut sigterm = signal(SignalKind::terminate()).map_err(io("cannot watch SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io("cannot watch SIGINT"))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(io("cannot watch SIGHUP"))?;
    loop {
        let deadline = daemon.cluster.as_ref().map(|c| match c.ike.poll_timeout() {
            Some(t) => t.min(c.membership.poll_timeout()),
            None => c.membership.poll_timeout(),
        });
        tokio::select! {
            Some(first) = calls.recv() => {
                // Store requests already queued (a pipelining client) are handed out in the same
                // turn, at most CALLS_PER_TURN: one turn of the loop per batch, not per request.
                let (mut next, mut taken) = (Some(first), 0);
                while let Some((request, reply)) = next.take() {
                    if shared::is_store_request(&request) {
                        let replication = daemon.cluster.as_ref().map(|c| c.replication.clone());
                        let task = shared::answer(daemon.store.clone(), replication, request);
                        tokio::spawn(async move { let _ = reply.send(task.await); });
                    } else {
                        let answer = daemon.handle_request(request).await;
                        let _ = reply.send(answer);
                        break;
                    }
                    taken += 1;
                    if taken < CALLS_PER_TURN {
                        next = calls.try_recv().ok();
                    }
                }
            }
            Some(input) = inputs.recv() => match input {
                Input::Hello(bytes, from) => daemon.handle_hello(&bytes, from),
                Input::Overlay(event) => daemon.handle_overlay(event),
                Input::Ike(bytes, from) => daemon.handle_ike_datagram(&bytes, from),
            },
            _ = sleep_until(deadline) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                if let Err(e) = daemon.reload().await {
                    tracing::error!("reload refused: {e}");
                }
            }
        }
        daemon.drive().await;
    }
    daemon
        .logs
        .append(LogKind::Events, Severity::Notice, "confmesh stopping");
    daemon.leave_quietly().await;
    let Daemon {
        bandwidth,
        store,
        b2bua,
        ..
    } = daemon;
    b2bua.shutdown().await;
    bandwidth.shutdown().await;
    drop(store);
    let _ = stop_tx.send(true);
    drop(calls_tx);
    drop(calls);
    for (name, task) in [("control socket", control), ("admin API", admin)] {
        match task.await {
            Ok(Err(e)) => tracing::error!("{name}: {e}"),
            Err(e) => tracing::error!("{name} task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// Most control and admin requests the state loop takes in one turn (see `run`).
const CALLS_PER_TURN: usize = 64;

/// Reads hellos and hands them to the state loop.
async fn feed_hellos(socket: Arc<UdpSocket>, inputs: mpsc::Sender<Input>) {
    let mut buf = vec![0u8; MAX_HELLO_LEN + 1];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) if len <= MAX_HELLO_LEN => {
                if inputs
                    .send(Input::Hello(buf[..len].to_vec(), from))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => tracing::debug!("oversize hello dropped"),
            Err(e) => {
                tracing::debug!("hello socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads IKE datagrams and hands them to the state loop. Anything larger than this is no IKEv1
/// message this engine would accept (MODP-4096 messages are under 1 KiB).
const MAX_IKE_DATAGRAM: usize = 4096;

/// The first filter on UDP 500, in the feeder task: a datagram from an address that is not a
/// peer is dropped before it is copied, and one that finds the state loop's queue full is dropped
/// rather than waited for (IKE retransmits), so that a flood on UDP 500 never delays hellos.
#[derive(Debug, Default)]
struct IkeGate {
    peers: std::sync::RwLock<Vec<Ipv4Addr>>,
    unknown_source: std::sync::atomic::AtomicU64,
    queue_full: std::sync::atomic::AtomicU64,
}

impl IkeGate {
    fn set_peers(&self, peers: impl Iterator<Item = Ipv4Addr>) {
        if let Ok(mut p) = self.peers.write() {
            *p = peers.collect();
        }
    }

    fn admits(&self, from: SocketAddr) -> bool {
        let known = match from {
            SocketAddr::V4(a) => self.peers.read().is_ok_and(|p| p.contains(a.ip())),
            SocketAddr::V6(_) => false,
        };
        if !known {
            self.unknown_source
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        known
    }
}

async fn feed_ike(socket: Arc<UdpSocket>, gate: Arc<IkeGate>, inputs: mpsc::Sender<Input>) {
    let mut buf = vec![0u8; MAX_IKE_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) if len < MAX_IKE_DATAGRAM => {
                if !gate.admits(from) {
                    continue;
                }
                match inputs.try_send(Input::Ike(buf[..len].to_vec(), from)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        gate.queue_full
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Ok(_) => tracing::debug!("oversize IKE datagram dropped"),
            Err(e) => {
                tracing::debug!("IKE socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads the pre-shared key; surrounding whitespace (a trailing newline) is not part of it.
fn read_psk(path: &Path) -> Result<Zeroizing<Vec<u8>>, DaemonError> {
    let raw = Zeroizing::new(std::fs::read(path).map_err(io(format!(
        "cannot read cluster.psk_file {}",
        path.display()
    )))?);
    let start = raw
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    if end - start < 8 {
        return Err(DaemonError::Config(crate::config::ConfigError {
            field: "cluster.psk_file".into(),
            message: format!(
                "{} holds a key shorter than 8 bytes; put the same long random key on every peer",
                path.display()
            ),
        }));
    }
    Ok(Zeroizing::new(raw[start..end].to_vec()))
}

fn ike_protection(p: crate::config::Protection) -> confmesh_ike::Protection {
    match p {
        crate::config::Protection::Ah => confmesh_ike::Protection::Ah,
        crate::config::Protection::EspGcm => confmesh_ike::Protection::EspGcm,
    }
}

fn dataplane_protection(p: confmesh_ike::Protection) -> confmesh_dataplane::Protection {
    match p {
        confmesh_ike::Protection::Ah => confmesh_dataplane::Protection::Ah,
        confmesh_ike::Protection::EspGcm => confmesh_dataplane::Protection::EspGcm,
    }
}

/// 32 bytes from the OS for the IKE engine's CSPRNG.
fn os_seed() -> Result<[u8; 32], DaemonError> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| DaemonError::Io {
            what: "cannot read randomness from the OS".into(),
            source: std::io::Error::other("getrandom failed"),
        })?;
    Ok(seed)
}

/// Passes the dataplane's events to the state loop.
async fn feed_overlay_events(
    mut events: mpsc::Receiver<OverlayEvent>,
    inputs: mpsc::Sender<Input>,
) {
    while let Some(e) = events.recv().await {
        if inputs.send(Input::Overlay(e)).await.is_err() {
            return;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn mode_name(cluster: &Option<ClusterSettings>) -> &'static str {
    if cluster.is_some() {
        "cluster"
    } else {
        "standalone"
    }
}

impl Daemon {
    fn local_identity(&self, settings: &ClusterSettings) -> LocalIdentity {
        LocalIdentity {
            hostname: self.config.peer.hostname.clone(),
            version: self.opts.version.clone(),
            licence: settings.licence,
            mgmt_addr: self.config.peer.mgmt_addr,
        }
    }

    /// Peers with their overlay addresses. Other peers' overlay addresses are the derived
    /// defaults until IKE's traffic selectors say otherwise.
    fn peer_overlays(&self, settings: &ClusterSettings) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        settings
            .peers
            .iter()
            .map(|&p| {
                let overlay = if p == self.config.peer.mgmt_addr {
                    self.config.peer.overlay_addr
                } else {
                    crate::config::default_overlay_addr(p)
                };
                (p, overlay)
            })
            .collect()
    }

    /// Becomes (or stays) clustered with `settings`.
    async fn join(&mut self, settings: ClusterSettings) -> Result<(), DaemonError> {
        let peers = self.peer_overlays(&settings);
        let psk = read_psk(&settings.psk_file)?;
        let me = self.config.peer.mgmt_addr;
        let now = Instant::now();
        if let Some(c) = &mut self.cluster {
            if c.settings.protection != settings.protection {
                return Err(DaemonError::Config(crate::config::ConfigError {
                    field: "cluster.protection".into(),
                    message: "changed; the protection of the SAs only changes with a restart of the daemon".into(),
                }));
            }
            for gone in c
                .settings
                .peers
                .iter()
                .filter(|p| !settings.peers.contains(p) && **p != me)
            {
                c.ike.remove_peer(now, *gone);
                c.overlay.remove_peer(*gone);
                let _ = self.bandwidth.remove_peer_key(*gone);
            }
            for &(addr, overlay) in peers.iter().filter(|p| p.0 != me) {
                c.ike.set_peer(
                    now,
                    PeerConfig {
                        addr,
                        overlay,
                        psk: psk.clone(),
                    },
                );
            }
            c.membership.set_peers(&peers);
            c.ike_gate
                .set_peers(peers.iter().map(|p| p.0).filter(|&p| p != me));
            c.replication.set_peers(sync_peers(&peers, me));
            c.settings = settings;
            self.set_bandwidth_peers(&peers);
            return Ok(());
        }
        let local = PeerAddrs {
            mgmt: self.config.peer.mgmt_addr,
            overlay: self.config.peer.overlay_addr,
        };
        let (overlay, overlay_events) = Overlay::start(OverlayConfig {
            tun_name: TUN_NAME.to_owned(),
            local,
            overlay_prefix_len: OVERLAY_PREFIX_LEN,
            mtu: self.config.peer.mtu,
        })
        .map_err(|e| DaemonError::Io {
            what: "cannot start the overlay".into(),
            source: std::io::Error::other(e),
        })?;
        // Hellos and the store's sync listen on the overlay's TUN device only: a packet addressed
        // to an overlay address but arriving on another interface did not come through an SA.
        let hello_addr = SocketAddrV4::new(self.config.peer.overlay_addr, HELLO_PORT);
        let hello = UdpSocket::bind(hello_addr).await.map_err(io(format!(
            "cannot bind the hello socket on the overlay address {hello_addr}"
        )))?;
        hello
            .bind_device(Some(TUN_NAME.as_bytes()))
            .map_err(io(format!("cannot bind the hello socket to {TUN_NAME}")))?;
        let hello = Arc::new(hello);
        let ike_addr = SocketAddrV4::new(me, confmesh_ike::IKE_PORT);
        let ike_socket = Arc::new(UdpSocket::bind(ike_addr).await.map_err(io(format!(
            "cannot bind IKE on {ike_addr} (peer.mgmt_addr)"
        )))?);
        let mut ike_config = EndpointConfig::new(me, self.config.peer.overlay_addr);
        ike_config.protection = ike_protection(settings.protection);
        let mut ike = Endpoint::new(ike_config, os_seed()?);
        for &(addr, overlay) in peers.iter().filter(|p| p.0 != me) {
            ike.set_peer(
                now,
                PeerConfig {
                    addr,
                    overlay,
                    psk: psk.clone(),
                },
            );
        }
        let ike_gate = Arc::new(IkeGate::default());
        ike_gate.set_peers(peers.iter().map(|p| p.0).filter(|&p| p != me));
        let feeders = Feeders(vec![
            tokio::spawn(feed_hellos(hello.clone(), self.inputs.clone())),
            tokio::spawn(feed_overlay_events(overlay_events, self.inputs.clone())),
            tokio::spawn(feed_ike(
                ike_socket.clone(),
                ike_gate.clone(),
                self.inputs.clone(),
            )),
        ]);
        let sync_addr = SocketAddrV4::new(self.config.peer.overlay_addr, REPLICATION_PORT);
        let sync_listener = tokio::net::TcpSocket::new_v4()
            .and_then(|s| {
                s.set_reuseaddr(true)?;
                s.bind_device(Some(TUN_NAME.as_bytes()))?;
                s.bind(sync_addr.into())?;
                s.listen(64)
            })
            .map_err(io(format!(
                "cannot listen for the store's sync on {sync_addr} ({TUN_NAME})"
            )))?;
        let replication =
            Replication::with_listener(self.store.clone(), sync_listener, sync_peers(&peers, me))
                .map(Arc::new)
                .map_err(|e| DaemonError::Io {
                    what: "cannot start replication".into(),
                    source: std::io::Error::other(e),
                })?;
        self.b2bua.set_replication(Some(replication.clone()));
        let membership = Membership::new(
            self.local_identity(&settings),
            &peers,
            self.config.peer.mtu,
            now,
        );
        self.cluster = Some(ClusterState {
            settings,
            membership,
            hello,
            overlay,
            ike,
            ike_socket,
            ike_gate,
            replication,
            _feeders: feeders,
        });
        self.set_bandwidth_peers(&peers);
        Ok(())
    }

    fn set_bandwidth_peers(&self, peers: &[(Ipv4Addr, Ipv4Addr)]) {
        let me = self.config.peer.mgmt_addr;
        let others: Vec<Ipv4Addr> = peers.iter().map(|p| p.0).filter(|p| *p != me).collect();
        if let Err(e) = self.bandwidth.set_peers(&others) {
            tracing::error!("bandwidth updates: {e}");
        }
    }

    /// Joining a cluster (SPEC.md §2 rule 6): back up this peer, then let the cluster's shared
    /// configuration replace ours; it flows in once the sync sessions are up.
    async fn take_cluster_content(&mut self) -> Result<(), String> {
        let path = self.backup(None, None).await?;
        let marker = join_backup_marker(&self.config.peer.state_dir);
        std::fs::write(&marker, path.as_os_str().as_encoded_bytes())
            .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
        self.join_backup = Some(path.clone());
        self.store.join_async().await.map_err(|e| e.to_string())?;
        self.logs.append(
            LogKind::Config,
            Severity::Notice,
            format!(
                "joined a cluster: shared configuration replaced by the cluster's (writes wait until it has arrived); the previous one is in {}",
                path.display()
            ),
        );
        Ok(())
    }

    /// SPEC §2 rule 6 when no peer is first: every peer of the list went from standalone into it
    /// at once, so each is joining and waits for the content of a member, and there is none. The
    /// peer with the lowest address then founds the cluster with the shared configuration it had
    /// before joining (from its automatic backup); the others take it from there, as from any
    /// member. Only when every other peer is connected and says it is joining: a member that is
    /// merely unreachable still holds the cluster's content.
    async fn found_if_all_join(&mut self) {
        if !self.store.joining() {
            if self.join_backup.take().is_some() {
                let _ = std::fs::remove_file(join_backup_marker(&self.config.peer.state_dir));
            }
            return;
        }
        let Some(c) = &self.cluster else { return };
        let me = self.config.peer.mgmt_addr;
        let others: Vec<u32> = c
            .settings
            .peers
            .iter()
            .filter(|p| **p != me)
            .map(|p| u32::from(*p))
            .collect();
        if others.is_empty() || others.iter().any(|p| *p < u32::from(me)) {
            return;
        }
        let status = c.replication.status();
        let all_wait = others.iter().all(|o| {
            status
                .peers
                .iter()
                .any(|r| r.origin == *o && r.connected && r.joining)
        });
        if !all_wait {
            return;
        }
        let read = match self.join_backup.clone() {
            Some(file) => self
                .backup_snapshot(file.clone())
                .await
                .map(|s| (s, format!("from {}", file.display()))),
            None => Err("no automatic backup recorded".to_owned()),
        };
        let (snapshot, from) = read.unwrap_or_else(|e| {
            (
                Snapshot::default(),
                format!("empty: its configuration from before cannot be read ({e})"),
            )
        });
        if let Err(e) = self.store.replace_all_async(snapshot).await {
            tracing::error!("cannot found the cluster: {e}");
            return;
        }
        self.logs.append(
            LogKind::Config,
            Severity::Notice,
            format!(
                "every peer joined at once: this peer, the lowest address, founded the cluster with its shared configuration {from}"
            ),
        );
    }

    /// The store content of one of this peer's unencrypted backups.
    async fn backup_snapshot(&self, file: PathBuf) -> Result<Snapshot, String> {
        let (_, members) = self.open_backup(file, None).await?;
        shared::import(backup_member(&members, shared::STORE_MEMBER)?)
    }

    /// Opens and checks a backup of this peer (its serial, the password, the checksums), off the
    /// state loop: reading and decrypting it is file I/O and a memory-hard key derivation.
    async fn open_backup(
        &self,
        file: PathBuf,
        password: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<(crate::backup::Manifest, crate::backup::Members), String> {
        let serial = self.config.peer.serial.clone();
        tokio::task::spawn_blocking(move || {
            crate::backup::open(&file, password.as_deref().map(|p| &p[..]), &serial)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Writes a backup of this peer (configuration file and store; no logs) and returns its path.
    async fn backup(
        &mut self,
        dir: Option<PathBuf>,
        password_file: Option<PathBuf>,
    ) -> Result<PathBuf, String> {
        let password = password_file
            .as_deref()
            .map(shared::read_password)
            .transpose()?;
        let config_text = std::fs::read(&self.opts.config_path)
            .map_err(|e| format!("cannot read {}: {e}", self.opts.config_path.display()))?;
        let store = self.store.clone();
        let dir = dir.unwrap_or_else(|| shared::backup_dir(&self.config.peer.state_dir));
        let (version, serial) = (self.opts.version.clone(), self.config.peer.serial.clone());
        let path = tokio::task::spawn_blocking(move || {
            let members = vec![
                (shared::CONFIG_MEMBER.to_owned(), config_text),
                (shared::STORE_MEMBER.to_owned(), shared::export(&store)?),
            ];
            crate::backup::create(
                &dir,
                &version,
                &serial,
                wall_ms(),
                &members,
                password.as_deref().map(|p| &p[..]),
            )
            .map_err(|e| format!("cannot write the backup in {}: {e}", dir.display()))
        })
        .await
        .map_err(|e| e.to_string())??;
        self.logs.append(
            LogKind::Config,
            Severity::Notice,
            format!("backup written to {}", path.display()),
        );
        Ok(path)
    }

    /// Restores a backup of this peer: everything is checked first, so a refusal changes nothing.
    async fn restore(&mut self, file: PathBuf, password_file: Option<PathBuf>) -> control::Reply {
        let password = password_file
            .as_deref()
            .map(shared::read_password)
            .transpose()?;
        let (manifest, members) = self
            .open_backup(file.clone(), password)
            .await
            .map_err(|e| format!("restore refused, nothing changed: {e}"))?;
        let member = |name: &str| {
            backup_member(&members, name)
                .map_err(|e| format!("restore refused, nothing changed: {e}"))
        };
        let text = std::str::from_utf8(member(shared::CONFIG_MEMBER)?)
            .map_err(|_| {
                "restore refused, nothing changed: the backup's configuration is not UTF-8"
                    .to_owned()
            })?
            .to_owned();
        let serial = self.config.peer.serial.clone();
        let config = Config::parse(&text, || Some(serial))
            .map_err(|e| format!("restore refused, nothing changed: {e}"))?;
        self.check_live_change(&config)
            .map_err(|e| format!("restore refused, nothing changed: {e}"))?;
        let snapshot = shared::import(member(shared::STORE_MEMBER)?)
            .map_err(|e| format!("restore refused, nothing changed: {e}"))?;
        self.store
            .replace_all_async(snapshot)
            .await
            .map_err(|e| format!("restore failed: {e}"))?;
        live::write_atomically(&self.opts.config_path, &text).map_err(|e| {
            format!(
                "store restored, but cannot write {}: {e}",
                self.opts.config_path.display()
            )
        })?;
        self.logs.append(
            LogKind::Config,
            Severity::Notice,
            format!(
                "restored backup {} taken {} (version {})",
                file.display(),
                manifest.created,
                manifest.version
            ),
        );
        self.apply(config).await.map_err(|e| e.to_string())?;
        Ok(json!({ "restored": file, "created": manifest.created }))
    }

    /// Leaves the cluster: stops talking to the other peers.
    async fn leave(&mut self) {
        if self.leave_quietly().await {
            self.logs.append(
                LogKind::Events,
                Severity::Notice,
                "left the cluster: now standalone",
            );
        }
    }

    /// Deletes every SA (the peers learn it from DELETE payloads at once) and drops the cluster
    /// state. Returns whether there was one.
    async fn leave_quietly(&mut self) -> bool {
        let Some(mut c) = self.cluster.take() else {
            return false;
        };
        c.ike.shutdown(Instant::now());
        while let Some(t) = c.ike.poll_transmit() {
            let _ = send_datagram(&c.ike_socket, &t.payload, t.dst.into());
        }
        if let Err(e) = self.bandwidth.set_peers(&[]) {
            tracing::error!("bandwidth updates: {e}");
        }
        let ClusterState { replication, .. } = c;
        self.b2bua.set_replication(None);
        // A placement claim in flight may still hold it for a moment; dropping stops its tasks.
        if let Ok(replication) = Arc::try_unwrap(replication) {
            replication.shutdown().await;
        }
        true
    }

    fn handle_ike_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let Some(c) = &mut self.cluster else { return };
        let SocketAddr::V4(from) = from else { return };
        c.ike.handle(Instant::now(), from, bytes);
    }

    /// Turns an IKE event into dataplane SAs, key-log lines, membership state and log entries.
    fn handle_ike_event(&mut self, event: IkeEvent) {
        let me = self.config.peer.mgmt_addr;
        let Some(c) = &mut self.cluster else { return };
        match event {
            IkeEvent::IkeUp {
                peer,
                icookie,
                rcookie,
                enc_key,
                bandwidth_key,
            } => {
                if let Err(e) = self.bandwidth.set_peer_key(peer, bandwidth_key) {
                    tracing::warn!(%peer, "bandwidth updates: {e}");
                }
                if let Some(k) = &mut self.keylog {
                    if let Err(e) = k.ike(&icookie, &rcookie, &enc_key[..]) {
                        tracing::warn!("key log: {e}");
                    }
                }
                self.logs.append(
                    LogKind::Events,
                    Severity::Info,
                    format!("IKE phase 1 with {peer} established"),
                );
            }
            IkeEvent::IkeDown { peer } => tracing::debug!(%peer, "IKE phase 1 SA gone"),
            IkeEvent::ChildUp {
                peer,
                protection,
                outbound,
                inbound,
                lifetime,
                lifetime_kb,
            } => {
                let Some(v) = c.membership.peers().find(|v| v.addr == peer) else {
                    return;
                };
                let addrs = PeerAddrs {
                    mgmt: peer,
                    overlay: v.overlay_addr,
                };
                let dp = dataplane_protection(protection);
                // IKE rekeys on time itself; the dataplane's time limits are a backstop, its
                // volume limits the only enforcement of the kilobyte lifetime.
                let bytes = lifetime_kb.map_or(u64::MAX, |kb| kb.saturating_mul(1024));
                let limits = confmesh_dataplane::Lifetime {
                    soft_time: lifetime.mul_f64(0.97),
                    hard_time: lifetime + std::time::Duration::from_secs(30),
                    soft_bytes: bytes / 10 * 9,
                    hard_bytes: bytes,
                    ..confmesh_dataplane::Lifetime::default()
                };
                let out = confmesh_dataplane::SaParams {
                    spi: outbound.spi,
                    protection: dp,
                    key: &outbound.key,
                    lifetime: limits,
                };
                let inn = confmesh_dataplane::SaParams {
                    spi: inbound.spi,
                    protection: dp,
                    key: &inbound.key,
                    lifetime: limits,
                };
                if let Err(e) = c.overlay.install_sa_pair(addrs, &out, &inn) {
                    tracing::error!(%peer, "cannot install the SA pair: {e}");
                    return;
                }
                if let Some(k) = &mut self.keylog {
                    let r = k
                        .child(protection, me, peer, outbound.spi, &outbound.key)
                        .and_then(|()| k.child(protection, peer, me, inbound.spi, &inbound.key));
                    if let Err(e) = r {
                        tracing::warn!("key log: {e}");
                    }
                }
                c.membership.handle_ike(peer, IkeState::Established);
                self.logs.append(
                    LogKind::Events,
                    Severity::Info,
                    format!(
                        "SA pair with {peer} established (out {:08x}, in {:08x})",
                        outbound.spi, inbound.spi
                    ),
                );
            }
            IkeEvent::ChildDown {
                peer,
                protection,
                inbound_spi,
                reason,
                ..
            } => {
                c.overlay
                    .remove_inbound_sa(dataplane_protection(protection), inbound_spi);
                tracing::debug!(%peer, ?reason, "SA {inbound_spi:08x} removed");
            }
            IkeEvent::PeerDead { peer } => {
                c.overlay.remove_peer(peer);
                let _ = self.bandwidth.remove_peer_key(peer);
                c.membership.handle_ike(peer, IkeState::Connecting);
                self.logs.append(
                    LogKind::Events,
                    Severity::Warning,
                    format!("peer {peer} stopped answering dead-peer detection"),
                );
            }
            IkeEvent::Failed { peer, reason } => {
                if reason == confmesh_ike::Failure::AuthenticationFailed {
                    c.membership
                        .handle_ike(peer, IkeState::AuthenticationFailed);
                }
                self.logs.append(
                    LogKind::Events,
                    Severity::Warning,
                    format!("IKE with {peer}: {reason}"),
                );
            }
        }
    }

    fn handle_hello(&mut self, bytes: &[u8], from: SocketAddr) {
        let Some(c) = &mut self.cluster else { return };
        let SocketAddr::V4(from) = from else { return };
        let Some(hello) = Hello::decode(bytes) else {
            tracing::debug!(%from, "malformed hello dropped");
            return;
        };
        let Some(peer) = c
            .membership
            .peers()
            .find(|v| v.overlay_addr == *from.ip())
            .map(|v| v.addr)
        else {
            return;
        };
        c.membership
            .handle_hello(Instant::now(), wall_ms(), peer, hello);
    }

    fn handle_overlay(&mut self, event: OverlayEvent) {
        let Some(c) = &mut self.cluster else { return };
        match event {
            OverlayEvent::PathMtuChanged { peer, path_mtu } => {
                self.logs.append(
                    LogKind::Events,
                    Severity::Info,
                    format!("path MTU to {peer} is now {path_mtu}"),
                );
                c.membership.set_path_mtu(peer, path_mtu);
                if let Err(e) = self.bandwidth.set_path_mtu(peer, path_mtu) {
                    tracing::debug!(%peer, "bandwidth updates: {e}");
                }
            }
            OverlayEvent::RekeyNeeded { peer, .. } => c.ike.rekey_child(Instant::now(), peer),
            other => tracing::debug!(?other, "dataplane event"),
        }
    }

    /// Runs the cores' timers and sends what they produced; logs their events.
    async fn drive(&mut self) {
        self.found_if_all_join().await;
        let Some(c) = &mut self.cluster else { return };
        let now = Instant::now();
        let wall = wall_ms();
        if c.membership.poll_timeout() <= now {
            c.membership.handle_timeout(now, wall);
        }
        if c.ike.poll_timeout().is_some_and(|t| t <= now) {
            c.ike.handle_timeout(now);
        }
        while let Some(t) = c.ike.poll_transmit() {
            if let Err(e) = send_datagram(&c.ike_socket, &t.payload, t.dst.into()) {
                tracing::debug!(dst = %t.dst, "IKE datagram not sent: {e}");
            }
        }
        let mut ike_events = Vec::new();
        while let Some(e) = c.ike.poll_event() {
            ike_events.push(e);
        }
        for e in ike_events {
            self.handle_ike_event(e);
        }
        let Some(c) = &mut self.cluster else { return };
        for (_, overlay, hello) in c.membership.poll_transmit(now, wall) {
            let to = SocketAddrV4::new(overlay, HELLO_PORT);
            if let Err(e) = send_datagram(&c.hello, &hello.encode(), to.into()) {
                tracing::trace!(%to, "hello not sent: {e}");
            }
        }
        while let Some(event) = c.membership.poll_event() {
            let (severity, message) = match event {
                MembershipEvent::Active { peer, hostname } => (
                    Severity::Notice,
                    format!("peer {peer} active as {hostname}"),
                ),
                MembershipEvent::NotActive {
                    peer,
                    reason,
                    detail,
                } => (
                    Severity::Warning,
                    format!("peer {peer} not active: {} {detail}", reason.describe())
                        .trim_end()
                        .to_owned(),
                ),
                MembershipEvent::AlarmRaised(a) => (
                    Severity::Warning,
                    format!("alarm raised: {:?} with {}: {}", a.kind, a.peer, a.detail),
                ),
                MembershipEvent::AlarmCleared { kind, peer, .. } => (
                    Severity::Notice,
                    format!("alarm cleared: {kind:?} with {peer}"),
                ),
            };
            self.logs.append(LogKind::Events, severity, message);
        }
    }

    async fn handle_request(&mut self, request: Request) -> control::Reply {
        match request {
            Request::Status => serde_json::to_value(self.status()).map_err(|e| e.to_string()),
            Request::Alarms => {
                Ok(serde_json::to_value(self.status().alarms).map_err(|e| e.to_string())?)
            }
            Request::Log { kind } => {
                let entries = self
                    .logs
                    .read(kind)
                    .map_err(|e| format!("cannot read the log: {e}"))?;
                Ok(Value::Array(
                    entries.iter().map(|e| Value::String(e.to_line())).collect(),
                ))
            }
            Request::PeersAdd { addr } => self.change(MembershipChange::Add(addr)).await,
            Request::PeersRemove { addr } => self.change(MembershipChange::Remove(addr)).await,
            Request::Standalone => self.change(MembershipChange::Standalone).await,
            Request::Reload => self
                .reload()
                .await
                .map(|()| json!("reloaded"))
                .map_err(|e| e.to_string()),
            Request::Metrics => Ok(Value::String(self.metrics())),
            Request::Backup { dir, password_file } => self
                .backup(dir, password_file)
                .await
                .map(|p| json!({ "backup": p })),
            Request::Restore {
                file,
                password_file,
            } => self.restore(file, password_file).await,
            other @ (Request::AdminHash { .. }
            | Request::AdminAdd { .. }
            | Request::AdminRemove { .. }
            | Request::AdminList
            | Request::ConfigGet { .. }
            | Request::ConfigSet { .. }
            | Request::ConfigDelete { .. }
            | Request::ConfigList { .. }) => {
                let replication = self.cluster.as_ref().map(|c| c.replication.clone());
                shared::answer(self.store.clone(), replication, other).await
            }
            Request::Faults {
                peer,
                delay_ms,
                jitter_ms,
                loss_pct,
                duplicate_pct,
                reorder_pct,
            } => {
                let Some(c) = &self.cluster else {
                    return Err("standalone: there is no peer to inject faults towards".into());
                };
                if !c.settings.peers.contains(&peer) || peer == self.config.peer.mgmt_addr {
                    return Err(format!("{peer} is not another peer of this cluster"));
                }
                for (what, pct) in [
                    ("loss", loss_pct),
                    ("duplicate", duplicate_pct),
                    ("reorder", reorder_pct),
                ] {
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(format!(
                            "--{what}-pct {pct} is not a percentage; use 0 to 100"
                        ));
                    }
                }
                let faults = FaultConfig {
                    delay: std::time::Duration::from_millis(u64::from(delay_ms)),
                    jitter: std::time::Duration::from_millis(u64::from(jitter_ms)),
                    loss: loss_pct / 100.0,
                    duplicate: duplicate_pct / 100.0,
                    reorder: reorder_pct / 100.0,
                    seed: u64::from(u32::from(peer)) ^ wall_ms(),
                };
                c.overlay.set_faults(peer, faults);
                self.logs.append(
                    LogKind::Events,
                    Severity::Warning,
                    format!(
                        "fault injection towards {peer}: delay {delay_ms} ms, jitter {jitter_ms} ms, loss {loss_pct}%, duplicate {duplicate_pct}%, reorder {reorder_pct}%"
                    ),
                );
                Ok(json!("ok"))
            }
        }
    }

    /// Applies a membership change: file first (validated, atomic), then the running state.
    async fn change(&mut self, change: MembershipChange) -> control::Reply {
        let text = std::fs::read_to_string(&self.opts.config_path)
            .map_err(|e| format!("cannot read {}: {e}", self.opts.config_path.display()))?;
        let serial = self.config.peer.serial.clone();
        let (text, config) =
            live::edit(&text, change, || Some(serial)).map_err(|e| e.to_string())?;
        live::write_atomically(&self.opts.config_path, &text)
            .map_err(|e| format!("cannot write {}: {e}", self.opts.config_path.display()))?;
        let what = match change {
            MembershipChange::Add(a) => format!("peers add {a}"),
            MembershipChange::Remove(a) => format!("peers remove {a}"),
            MembershipChange::Standalone => "standalone".to_owned(),
        };
        self.logs.append(LogKind::Config, Severity::Notice, what);
        self.apply(config).await.map_err(|e| e.to_string())?;
        Ok(json!(mode_name(&self.config.cluster)))
    }

    /// Re-reads the configuration file and applies what changed.
    async fn reload(&mut self) -> Result<(), DaemonError> {
        let config = Config::load(&self.opts.config_path)?;
        self.check_live_change(&config)?;
        // The admin API first: a new address that cannot be bound refuses the whole reload, the
        // old listener serving on; new certificate files (already checked by `load`) take over.
        let admin_changes = self.admin.reconfigure(&config.admin).await?;
        self.logs
            .append(LogKind::Config, Severity::Notice, "configuration reloaded");
        for change in admin_changes {
            self.logs.append(LogKind::Config, Severity::Notice, change);
        }
        self.apply(config).await
    }

    /// Refuses a new configuration that changes what only a restart can change.
    fn check_live_change(&self, config: &Config) -> Result<(), DaemonError> {
        let restart_needed = [
            (
                "peer.mgmt_addr",
                config.peer.mgmt_addr != self.config.peer.mgmt_addr,
            ),
            (
                "peer.overlay_addr",
                config.peer.overlay_addr != self.config.peer.overlay_addr,
            ),
            (
                "peer.state_dir",
                config.peer.state_dir != self.config.peer.state_dir,
            ),
            (
                "peer.control_socket",
                config.peer.control_socket != self.config.peer.control_socket,
            ),
        ];
        if let Some((field, _)) = restart_needed.iter().find(|(_, changed)| *changed) {
            return Err(DaemonError::Config(crate::config::ConfigError {
                field: (*field).to_owned(),
                message: "changed; this setting only takes effect after a restart of the daemon"
                    .into(),
            }));
        }
        Ok(())
    }

    async fn apply(&mut self, config: Config) -> Result<(), DaemonError> {
        let cluster = config.cluster.clone();
        let me = config.peer.mgmt_addr;
        // From standalone into a list with other peers: this peer joins an existing cluster. A
        // list of only itself makes it a cluster's first peer, whose configuration is kept.
        let joining = self.cluster.is_none()
            && cluster
                .as_ref()
                .is_some_and(|c| c.peers.iter().any(|p| *p != me));
        self.config = config;
        match cluster {
            Some(settings) => {
                if joining {
                    self.take_cluster_content()
                        .await
                        .map_err(|e| DaemonError::Io {
                            what: "cannot take the cluster's shared configuration".into(),
                            source: std::io::Error::other(e),
                        })?;
                }
                self.join(settings).await?
            }
            None => self.leave().await,
        }
        // Alone (standalone, or the only peer in its list): no member will ever send this peer the
        // cluster's content, so a join in progress ends here and writes are accepted again.
        let alone = self.cluster.is_none()
            || self
                .config
                .cluster
                .as_ref()
                .is_some_and(|c| c.peers.iter().all(|p| *p == me));
        if alone && self.store.joining() {
            self.store
                .stop_joining_async()
                .await
                .map_err(|e| DaemonError::Io {
                    what: "cannot end the join".into(),
                    source: std::io::Error::other(e),
                })?;
            self.logs.append(
                LogKind::Config,
                Severity::Notice,
                "join abandoned: this peer is alone, its shared configuration accepts writes again",
            );
        }
        Ok(())
    }

    fn metrics(&self) -> String {
        use crate::metrics::{Kind, MetricsPage, PeerMetric};
        let status = self.status();
        let mut m = MetricsPage::default();
        m.family(
            "confmesh_info",
            Kind::Gauge,
            "Always 1; labels carry the version and mode of this peer.",
        )
        .sample(
            "confmesh_info",
            &[
                ("version", &status.version),
                ("mode", &status.mode),
                ("hostname", &status.hostname),
            ],
            1.0,
        );
        let others: Vec<_> = status
            .peers
            .iter()
            .filter(|p| p.state != "this-system")
            .collect();
        m.family(
            "confmesh_peer_active",
            Kind::Gauge,
            "1 when the peer is Active, 0 when Not active (see the reason label).",
        );
        for p in &others {
            let addr = p.addr.to_string();
            m.sample(
                "confmesh_peer_active",
                &[
                    ("peer", &addr),
                    ("reason", p.reason.as_deref().unwrap_or("")),
                ],
                f64::from(u8::from(p.state == "active")),
            );
        }
        m.family(
            "confmesh_peer_rtt_seconds",
            Kind::Gauge,
            "Median round-trip time of recent hellos to the peer.",
        );
        for p in others.iter().filter(|p| p.rtt_ms.is_some()) {
            m.sample(
                "confmesh_peer_rtt_seconds",
                &[("peer", &p.addr.to_string())],
                p.rtt_ms.unwrap_or_default() / 1e3,
            );
        }
        m.family(
            "confmesh_peer_clock_skew_seconds",
            Kind::Gauge,
            "The peer's clock minus this peer's clock.",
        );
        for p in others.iter().filter(|p| p.clock_skew_ms.is_some()) {
            m.sample(
                "confmesh_peer_clock_skew_seconds",
                &[("peer", &p.addr.to_string())],
                p.clock_skew_ms.unwrap_or_default() / 1e3,
            );
        }
        m.family(
            "confmesh_peer_path_mtu_bytes",
            Kind::Gauge,
            "Path MTU towards the peer used to frame synchronisation traffic.",
        );
        for p in &others {
            m.sample(
                "confmesh_peer_path_mtu_bytes",
                &[("peer", &p.addr.to_string())],
                f64::from(p.path_mtu.unwrap_or(0)),
            );
        }
        m.family(
            "confmesh_peer_sas",
            Kind::Gauge,
            "IPsec SAs with the peer, both directions.",
        );
        for p in &others {
            m.sample(
                "confmesh_peer_sas",
                &[("peer", &p.addr.to_string())],
                f64::from(p.sas),
            );
        }
        if let Some(c) = &self.cluster {
            let reports: Vec<_> = others
                .iter()
                .filter_map(|p| {
                    c.overlay
                        .peer_report(p.addr)
                        .map(|r| (p.addr.to_string(), r.status.counters))
                })
                .collect();
            let dataplane: [PeerMetric<confmesh_dataplane::PeerCounters>; 11] = [
                (
                    "confmesh_dataplane_tx_packets_total",
                    Kind::Counter,
                    "Protected packets sent to the peer.",
                    |c| Some(c.tx_packets as f64),
                ),
                (
                    "confmesh_dataplane_tx_bytes_total",
                    Kind::Counter,
                    "Bytes of protected packets sent to the peer.",
                    |c| Some(c.tx_bytes as f64),
                ),
                (
                    "confmesh_dataplane_rx_packets_total",
                    Kind::Counter,
                    "Packets from the peer that verified and were delivered.",
                    |c| Some(c.rx_packets as f64),
                ),
                (
                    "confmesh_dataplane_rx_bytes_total",
                    Kind::Counter,
                    "Bytes of packets from the peer that verified.",
                    |c| Some(c.rx_bytes as f64),
                ),
                (
                    "confmesh_dataplane_icv_failures_total",
                    Kind::Counter,
                    "Packets from the peer whose ICV/tag did not verify (dropped).",
                    |c| Some(c.icv_failures as f64),
                ),
                (
                    "confmesh_dataplane_replay_drops_total",
                    Kind::Counter,
                    "Packets from the peer dropped by the anti-replay window.",
                    |c| Some(c.replay_drops as f64),
                ),
                (
                    "confmesh_dataplane_malformed_total",
                    Kind::Counter,
                    "Malformed packets from the peer (dropped).",
                    |c| Some(c.malformed as f64),
                ),
                (
                    "confmesh_dataplane_no_sa_total",
                    Kind::Counter,
                    "Packets to or from the peer with no SA to use (dropped).",
                    |c| Some(c.no_sa as f64),
                ),
                (
                    "confmesh_dataplane_oversize_total",
                    Kind::Counter,
                    "Inner packets too large for the path MTU, answered with ICMP.",
                    |c| Some(c.oversize as f64),
                ),
                (
                    "confmesh_dataplane_pmtu_updates_total",
                    Kind::Counter,
                    "Path MTU changes towards the peer.",
                    |c| Some(c.pmtu_updates as f64),
                ),
                (
                    "confmesh_dataplane_fragmentation_attempts_total",
                    Kind::Counter,
                    "Outer packets the kernel would have fragmented (refused, never sent).",
                    |c| Some(c.fragmentation_attempts as f64),
                ),
            ];
            m.per_peer(&dataplane, &reports);
            let states: Vec<_> = others
                .iter()
                .filter_map(|p| c.ike.peer_state(p.addr).map(|s| (p.addr.to_string(), s)))
                .collect();
            let ike: [PeerMetric<confmesh_ike::PeerState>; 13] = [
                (
                    "confmesh_ike_established",
                    Kind::Gauge,
                    "1 while a phase-1 SA with the peer is established.",
                    |s| Some(f64::from(u8::from(s.ike_established))),
                ),
                (
                    "confmesh_ike_datagrams_in_total",
                    Kind::Counter,
                    "IKE datagrams received from the peer.",
                    |s| Some(s.counters.datagrams_in as f64),
                ),
                (
                    "confmesh_ike_datagrams_out_total",
                    Kind::Counter,
                    "IKE datagrams sent to the peer, retransmissions included.",
                    |s| Some(s.counters.datagrams_out as f64),
                ),
                (
                    "confmesh_ike_retransmits_total",
                    Kind::Counter,
                    "IKE retransmissions to the peer.",
                    |s| Some(s.counters.retransmits as f64),
                ),
                (
                    "confmesh_ike_malformed_total",
                    Kind::Counter,
                    "IKE datagrams from the peer that were malformed or matched no exchange.",
                    |s| Some(s.counters.malformed as f64),
                ),
                (
                    "confmesh_ike_auth_failures_total",
                    Kind::Counter,
                    "Phase-1 exchanges with the peer that failed authentication.",
                    |s| Some(s.counters.auth_failures as f64),
                ),
                (
                    "confmesh_ike_timeouts_total",
                    Kind::Counter,
                    "IKE exchanges with the peer that timed out.",
                    |s| Some(s.counters.timeouts as f64),
                ),
                (
                    "confmesh_ike_sa_established_total",
                    Kind::Counter,
                    "Phase-1 SAs established with the peer.",
                    |s| Some(s.counters.ike_established as f64),
                ),
                (
                    "confmesh_ike_child_established_total",
                    Kind::Counter,
                    "Child SA pairs established with the peer.",
                    |s| Some(s.counters.child_established as f64),
                ),
                (
                    "confmesh_ike_dpd_sent_total",
                    Kind::Counter,
                    "Dead-peer-detection probes sent to the peer.",
                    |s| Some(s.counters.dpd_sent as f64),
                ),
                (
                    "confmesh_ike_deletes_received_total",
                    Kind::Counter,
                    "DELETE payloads received from the peer.",
                    |s| Some(s.counters.deletes_received as f64),
                ),
                (
                    "confmesh_ike_half_open_evicted_total",
                    Kind::Counter,
                    "Half-open exchanges from the peer's address evicted for newer ones (a flood of forged first messages shows here).",
                    |s| Some(s.counters.half_open_evicted as f64),
                ),
                (
                    "confmesh_ike_restarted_total",
                    Kind::Counter,
                    "Our phase-1 exchanges restarted because the peer no longer held them.",
                    |s| Some(s.counters.restarted as f64),
                ),
            ];
            m.per_peer(&ike, &states);
            let e = c.ike.counters();
            m.family(
                "confmesh_ike_dropped_total",
                Kind::Counter,
                "IKE datagrams dropped before any exchange, by reason.",
            );
            let gate =
                |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
            for (reason, n) in [
                (
                    "unknown-source",
                    e.unknown_source + gate(&c.ike_gate.unknown_source),
                ),
                ("queue-full", gate(&c.ike_gate.queue_full)),
                ("refused-exchange", e.refused_exchange),
                ("half-open-limit", e.half_open_refused),
            ] {
                m.sample(
                    "confmesh_ike_dropped_total",
                    &[("reason", reason)],
                    n as f64,
                );
            }
            let repl = c.replication.status();
            let peer = |origin: u32| Ipv4Addr::from(origin).to_string();
            let replication: [PeerMetric<confmesh_replication::service::PeerReplication>; 8] = [
                (
                    "confmesh_replication_connected",
                    Kind::Gauge,
                    "1 while a sync session with the peer is up.",
                    |r| Some(f64::from(u8::from(r.connected))),
                ),
                (
                    "confmesh_replication_lag_entries",
                    Kind::Gauge,
                    "Entries this peer holds that the peer has not acknowledged.",
                    |r| r.lag_entries.map(|l| l as f64),
                ),
                (
                    "confmesh_replication_queue_bytes",
                    Kind::Gauge,
                    "Bytes queued for the peer, not yet written to its socket.",
                    |r| Some(r.queue_depth as f64),
                ),
                (
                    "confmesh_replication_sent_bytes_total",
                    Kind::Counter,
                    "Sync bytes sent to the peer.",
                    |r| Some(r.bytes_sent as f64),
                ),
                (
                    "confmesh_replication_received_bytes_total",
                    Kind::Counter,
                    "Sync bytes received from the peer.",
                    |r| Some(r.bytes_received as f64),
                ),
                (
                    "confmesh_replication_sent_entries_total",
                    Kind::Counter,
                    "Entries sent to the peer.",
                    |r| Some(r.entries_sent as f64),
                ),
                (
                    "confmesh_replication_received_entries_total",
                    Kind::Counter,
                    "Entries received from the peer.",
                    |r| Some(r.entries_received as f64),
                ),
                (
                    "confmesh_replication_last_sync_timestamp_seconds",
                    Kind::Gauge,
                    "Unix time of the peer's last acknowledgement.",
                    |r| r.last_sync_unix_ms.map(|t| t as f64 / 1e3),
                ),
            ];
            let rows: Vec<_> = repl
                .peers
                .into_iter()
                .map(|r| (peer(r.origin), r))
                .collect();
            m.per_peer(&replication, &rows);
            let st = repl.store;
            for (name, kind, help, v) in [
                (
                    "confmesh_store_journal_syncs_total",
                    Kind::Counter,
                    "Groups of writes made durable together, one journal sync each.",
                    st.journal_syncs as f64,
                ),
                (
                    "confmesh_store_journal_bytes_total",
                    Kind::Counter,
                    "Bytes appended to the store's journal.",
                    st.journal_bytes as f64,
                ),
                (
                    "confmesh_store_checkpoints_total",
                    Kind::Counter,
                    "Checkpoints that copied the journal into the database file.",
                    st.checkpoints as f64,
                ),
                (
                    "confmesh_store_checkpoint_failures_total",
                    Kind::Counter,
                    "Failed checkpoint attempts (retried; the journal keeps the changes).",
                    st.checkpoint_failures as f64,
                ),
                (
                    "confmesh_store_unflushed_keys",
                    Kind::Gauge,
                    "Changed keys in memory and the journal, not yet in the database file.",
                    st.unflushed_keys as f64,
                ),
            ] {
                m.family(name, kind, help);
                m.sample(name, &[], v);
            }
        }
        self.bandwidth.status().write_metrics(&mut m);
        self.b2bua.status().write_metrics(&mut m);
        m.family(
            "confmesh_alarms",
            Kind::Gauge,
            "Raised alarms by kind and peer (1 per raised alarm).",
        );
        for a in &status.alarms {
            m.sample(
                "confmesh_alarms",
                &[("kind", &a.kind), ("peer", &a.peer.to_string())],
                1.0,
            );
        }
        m.finish()
    }

    fn status(&self) -> Status {
        let me = &self.config.peer;
        let mut peers = vec![PeerStatus {
            addr: me.mgmt_addr,
            hostname: Some(me.hostname.clone()),
            overlay_addr: me.overlay_addr,
            state: "this-system".into(),
            reason: None,
            detail: None,
            rtt_ms: None,
            clock_skew_ms: None,
            path_mtu: None,
            ike: None,
            sas: 0,
        }];
        let mut alarms = Vec::new();
        if let Some(c) = &self.cluster {
            for v in c.membership.peers() {
                peers.push(PeerStatus {
                    addr: v.addr,
                    hostname: v.hostname.clone(),
                    overlay_addr: v.overlay_addr,
                    state: if v.is_active() {
                        "active"
                    } else {
                        "not-active"
                    }
                    .into(),
                    reason: v.reason.map(|r| {
                        serde_json::to_value(r)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    }),
                    detail: v.detail.clone(),
                    rtt_ms: v.rtt_ms.map(|r| (r * 1000.0).round() / 1000.0),
                    clock_skew_ms: v.clock_skew_ms.map(|s| (s * 10.0).round() / 10.0),
                    path_mtu: Some(v.path_mtu),
                    ike: Some(
                        match v.ike() {
                            IkeState::Connecting => "connecting",
                            IkeState::Established => "established",
                            IkeState::AuthenticationFailed => "authentication-failed",
                        }
                        .into(),
                    ),
                    sas: c.overlay.peer_report(v.addr).map_or(0, |r| {
                        u32::from(r.status.outbound.is_some()) + r.status.inbound.len() as u32
                    }),
                });
            }
            alarms = c
                .membership
                .alarms()
                .map(|a| AlarmStatus {
                    kind: serde_json::to_value(a.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    peer: a.peer,
                    raised_at: rfc3339(a.raised_at_ms),
                    detail: a.detail.clone(),
                })
                .collect();
        }
        peers.sort_by_key(|p| p.addr);
        Status {
            hostname: me.hostname.clone(),
            version: self.opts.version.clone(),
            mode: mode_name(&self.config.cluster).into(),
            peers,
            alarms,
            conferences: self.b2bua.conferences(),
            replication: self
                .cluster
                .as_ref()
                .and_then(|c| serde_json::to_value(c.replication.status()).ok()),
            bandwidth: serde_json::to_value(self.bandwidth.status()).ok(),
        }
    }
}

/// The store's sync peers: every other peer of the list at its overlay address. All of them,
/// not only the active ones, so that no deletion is forgotten while a peer is away.
/// Sends one datagram now, from the state loop (never waits). Not tokio's `try_send_to`: that
/// refuses until the runtime has seen the socket writable, which a socket bound a moment before
/// has not, so a daemon's first IKE message was lost and phase 1 waited for its retransmission.
/// Only a full send buffer refuses here; IKE retransmits and hellos repeat.
fn send_datagram(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send_to(bytes, &to.into())
}

/// Where the path of the automatic backup taken at a join is kept until the join ends, so that a
/// restart in between can still found the cluster with it.
fn join_backup_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("join-backup")
}

/// The member `name` of an opened backup.
fn backup_member<'a>(members: &'a [(String, Vec<u8>)], name: &str) -> Result<&'a [u8], String> {
    members
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.as_slice())
        .ok_or_else(|| format!("the backup has no {name}"))
}

fn sync_peers(peers: &[(Ipv4Addr, Ipv4Addr)], me: Ipv4Addr) -> Vec<(u32, SocketAddr)> {
    peers
        .iter()
        .filter(|p| p.0 != me)
        .map(|&(mgmt, overlay)| {
            (
                u32::from(mgmt),
                SocketAddrV4::new(overlay, REPLICATION_PORT).into(),
            )
        })
        .collect()
}

/// Where the control socket of the daemon configured by `config` is.
pub fn control_socket_of(config: &Path) -> Result<PathBuf, crate::config::ConfigError> {
    Ok(Config::load(config)?.peer.control_socket)
}
