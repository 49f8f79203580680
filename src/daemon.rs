//! The daemon: one task that owns the cluster state and drives the cores, plus the tasks that
//! feed it (control socket, hello socket, signals).
//!
//! Every input ends up as a message to the state loop in [`run`], so the state needs no locks and
//! every change is applied in one place, in order. Shutdown is one `watch` signal that every task
//! obeys; `run` returns once they have all finished (mini-redis style).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::config::{ClusterSettings, Config};
use crate::control::{self, Call, Request};
use crate::eventlog::{LogKind, Logs, Severity, rfc3339, wall_ms};
use crate::live::{self, MembershipChange};
use crate::membership::{Hello, IkeState, LocalIdentity, Membership, MembershipEvent, MAX_HELLO_LEN};
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
    opts: Options,
    config: Config,
    logs: Logs,
    cluster: Option<ClusterState>,
}

/// What exists only while this peer is clustered.
struct ClusterState {
    settings: ClusterSettings,
    membership: Membership,
    hello: UdpSocket,
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let config = Config::load(&opts.config_path)?;
    let state_dir = config.peer.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(io(format!("cannot create state_dir {}", state_dir.display())))?;
    let logs = Logs::open(&state_dir, &config.peer.hostname, config.peer.syslog.clone())
        .map_err(io(format!("cannot open the logs under {}", state_dir.display())))?;
    if opts.keylog.is_some() {
        tracing::warn!("key logging is on: SA keys are written to the key log; use this for debugging only");
    }
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
        .map_err(io(format!("cannot listen for the admin API on {} (admin.listen)", config.admin.listen)))?;
    let admin = tokio::spawn(crate::admin::serve(admin_listener, calls_tx.clone(), stop_rx.clone()));
    let mut daemon = Daemon { opts, config, logs, cluster: None };
    let cluster = daemon.config.cluster.clone();
    daemon.logs.append(
        LogKind::Events,
        Severity::Notice,
        format!("confmesh {} started as {} ({})", daemon.opts.version, daemon.config.peer.hostname, mode_name(&cluster)),
    );
    if let Some(settings) = cluster {
        daemon.join(settings).await?;
    }

    let mut sigterm = signal(SignalKind::terminate()).map_err(io("cannot watch SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io("cannot watch SIGINT"))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(io("cannot watch SIGHUP"))?;
    let mut buf = vec![0u8; MAX_HELLO_LEN + 1];
    loop {
        let deadline = daemon.cluster.as_ref().map(|c| c.membership.poll_timeout());
        tokio::select! {
            Some((request, reply)) = calls.recv() => {
                let answer = daemon.handle_request(request).await;
                let _ = reply.send(answer);
            }
            Some((len, from)) = recv_hello(daemon.cluster.as_ref(), &mut buf) => {
                daemon.handle_hello(&buf[..len], from);
            }
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
    daemon.logs.append(LogKind::Events, Severity::Notice, "confmesh stopping");
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

async fn recv_hello(cluster: Option<&ClusterState>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match cluster {
        Some(c) => c.hello.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn mode_name(cluster: &Option<ClusterSettings>) -> &'static str {
    if cluster.is_some() { "cluster" } else { "standalone" }
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
        if let Some(c) = &mut self.cluster {
            c.membership.set_peers(&peers);
            c.settings = settings;
            return Ok(());
        }
        let hello_addr = SocketAddrV4::new(self.config.peer.overlay_addr, HELLO_PORT);
        let hello = UdpSocket::bind(hello_addr)
            .await
            .map_err(io(format!("cannot bind the hello socket on the overlay address {hello_addr}")))?;
        let membership = Membership::new(self.local_identity(&settings), &peers, self.config.peer.mtu, Instant::now());
        self.cluster = Some(ClusterState { settings, membership, hello });
        Ok(())
    }

    /// Leaves the cluster: stops talking to the other peers.
    fn leave(&mut self) {
        if self.cluster.take().is_some() {
            self.logs.append(LogKind::Events, Severity::Notice, "left the cluster: now standalone");
        }
    }

    fn handle_hello(&mut self, bytes: &[u8], from: SocketAddr) {
        let Some(c) = &mut self.cluster else { return };
        let SocketAddr::V4(from) = from else { return };
        let Some(hello) = Hello::decode(bytes) else {
            tracing::debug!(%from, "malformed hello dropped");
            return;
        };
        let Some(peer) = c.membership.peers().find(|v| v.overlay_addr == *from.ip()).map(|v| v.addr) else {
            return;
        };
        c.membership.handle_hello(Instant::now(), wall_ms(), peer, hello);
    }

    /// Runs the cores' timers and sends what they produced; logs their events.
    async fn drive(&mut self) {
        let Some(c) = &mut self.cluster else { return };
        let now = Instant::now();
        let wall = wall_ms();
        if c.membership.poll_timeout() <= now {
            c.membership.handle_timeout(now, wall);
        }
        for (_, overlay, hello) in c.membership.poll_transmit(now, wall) {
            let to = SocketAddrV4::new(overlay, HELLO_PORT);
            if let Err(e) = c.hello.try_send_to(&hello.encode(), to.into()) {
                tracing::trace!(%to, "hello not sent: {e}");
            }
        }
        while let Some(event) = c.membership.poll_event() {
            let (severity, message) = match event {
                MembershipEvent::Active { peer, hostname } => (Severity::Notice, format!("peer {peer} active as {hostname}")),
                MembershipEvent::NotActive { peer, reason, detail } => {
                    (Severity::Warning, format!("peer {peer} not active: {} {detail}", reason.describe()).trim_end().to_owned())
                }
                MembershipEvent::AlarmRaised(a) => {
                    (Severity::Warning, format!("alarm raised: {:?} with {}: {}", a.kind, a.peer, a.detail))
                }
                MembershipEvent::AlarmCleared { kind, peer, .. } => (Severity::Notice, format!("alarm cleared: {kind:?} with {peer}")),
            };
            self.logs.append(LogKind::Events, severity, message);
        }
    }

    async fn handle_request(&mut self, request: Request) -> control::Reply {
        match request {
            Request::Status => serde_json::to_value(self.status()).map_err(|e| e.to_string()),
            Request::Alarms => Ok(serde_json::to_value(self.status().alarms).map_err(|e| e.to_string())?),
            Request::Log { kind } => {
                let entries = self.logs.read(kind).map_err(|e| format!("cannot read the log: {e}"))?;
                Ok(Value::Array(entries.iter().map(|e| Value::String(e.to_line())).collect()))
            }
            Request::PeersAdd { addr } => self.change(MembershipChange::Add(addr)).await,
            Request::PeersRemove { addr } => self.change(MembershipChange::Remove(addr)).await,
            Request::Standalone => self.change(MembershipChange::Standalone).await,
            Request::Reload => self.reload().await.map(|()| json!("reloaded")).map_err(|e| e.to_string()),
            Request::Metrics => Ok(Value::String(self.metrics())),
            Request::AdminHash { .. }
            | Request::ConfigGet { .. }
            | Request::ConfigSet { .. }
            | Request::ConfigDelete { .. }
            | Request::ConfigList { .. } => Err("the shared configuration store is not running in this build".into()),
            Request::Faults { .. } => Err("fault injection needs the overlay dataplane, which this build does not run".into()),
        }
    }

    /// Applies a membership change: file first (validated, atomic), then the running state.
    async fn change(&mut self, change: MembershipChange) -> control::Reply {
        let text = std::fs::read_to_string(&self.opts.config_path)
            .map_err(|e| format!("cannot read {}: {e}", self.opts.config_path.display()))?;
        let serial = self.config.peer.serial.clone();
        let (text, config) = live::edit(&text, change, || Some(serial)).map_err(|e| e.to_string())?;
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
        let restart_needed = [
            ("peer.mgmt_addr", config.peer.mgmt_addr != self.config.peer.mgmt_addr),
            ("peer.overlay_addr", config.peer.overlay_addr != self.config.peer.overlay_addr),
            ("peer.state_dir", config.peer.state_dir != self.config.peer.state_dir),
            ("peer.control_socket", config.peer.control_socket != self.config.peer.control_socket),
        ];
        if let Some((field, _)) = restart_needed.iter().find(|(_, changed)| *changed) {
            return Err(DaemonError::Config(crate::config::ConfigError {
                field: (*field).to_owned(),
                message: "changed; this setting only takes effect after a restart of the daemon".into(),
            }));
        }
        self.logs.append(LogKind::Config, Severity::Notice, "configuration reloaded");
        self.apply(config).await
    }

    async fn apply(&mut self, config: Config) -> Result<(), DaemonError> {
        let cluster = config.cluster.clone();
        self.config = config;
        match cluster {
            Some(settings) => self.join(settings).await?,
            None => self.leave(),
        }
        Ok(())
    }

    fn metrics(&self) -> String {
        use crate::metrics::{Kind, MetricsPage};
        let status = self.status();
        let mut m = MetricsPage::default();
        m.family("confmesh_info", Kind::Gauge, "Always 1; labels carry the version and mode of this peer.").sample(
            "confmesh_info",
            &[("version", &status.version), ("mode", &status.mode), ("hostname", &status.hostname)],
            1.0,
        );
        let others: Vec<_> = status.peers.iter().filter(|p| p.state != "this-system").collect();
        m.family("confmesh_peer_active", Kind::Gauge, "1 when the peer is Active, 0 when Not active (see the reason label).");
        for p in &others {
            let addr = p.addr.to_string();
            m.sample("confmesh_peer_active", &[("peer", &addr), ("reason", p.reason.as_deref().unwrap_or(""))], f64::from(u8::from(p.state == "active")));
        }
        m.family("confmesh_peer_rtt_seconds", Kind::Gauge, "Median round-trip time of recent hellos to the peer.");
        for p in others.iter().filter(|p| p.rtt_ms.is_some()) {
            m.sample("confmesh_peer_rtt_seconds", &[("peer", &p.addr.to_string())], p.rtt_ms.unwrap_or_default() / 1e3);
        }
        m.family("confmesh_peer_clock_skew_seconds", Kind::Gauge, "The peer's clock minus this peer's clock.");
        for p in others.iter().filter(|p| p.clock_skew_ms.is_some()) {
            m.sample("confmesh_peer_clock_skew_seconds", &[("peer", &p.addr.to_string())], p.clock_skew_ms.unwrap_or_default() / 1e3);
        }
        m.family("confmesh_peer_path_mtu_bytes", Kind::Gauge, "Path MTU towards the peer used to frame synchronisation traffic.");
        for p in &others {
            m.sample("confmesh_peer_path_mtu_bytes", &[("peer", &p.addr.to_string())], f64::from(p.path_mtu.unwrap_or(0)));
        }
        m.family("confmesh_peer_sas", Kind::Gauge, "IPsec SAs with the peer, both directions.");
        for p in &others {
            m.sample("confmesh_peer_sas", &[("peer", &p.addr.to_string())], f64::from(p.sas));
        }
        m.family("confmesh_alarms", Kind::Gauge, "Raised alarms by kind and peer (1 per raised alarm).");
        for a in &status.alarms {
            m.sample("confmesh_alarms", &[("kind", &a.kind), ("peer", &a.peer.to_string())], 1.0);
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
                    state: if v.is_active() { "active" } else { "not-active" }.into(),
                    reason: v.reason.map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()),
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
                    sas: 0,
                });
            }
            alarms = c
                .membership
                .alarms()
                .map(|a| AlarmStatus {
                    kind: serde_json::to_value(a.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
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
            conferences: Vec::new(),
        }
    }
}

/// Where the control socket of the daemon configured by `config` is.
pub fn control_socket_of(config: &Path) -> Result<PathBuf, crate::config::ConfigError> {
    Ok(Config::load(config)?.peer.control_socket)
}
