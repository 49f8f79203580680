//! The tokio driver of the B2BUA: sockets, clock, routing tasks and a status snapshot.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::core::{B2bua, B2buaEvent, B2buaStats, BridgeProbe, CallInfo, CoreConfig};
use super::routing::{BandwidthLedger, ConferenceDirectory, HealthTable, Router, RoutingConfig};
use super::store_directory::DirectoryStats;
use crate::metrics::{Kind as MetricKind, MetricsPage};
use crate::sip::transport::{Inbound, SHARD_CALL_ID_PREFIX, SipSockets, TcpLimits, TransportStats};
use crate::status::ConferenceStatus;

/// Received messages waiting for the core; beyond this the socket readers wait (UDP then drops
/// in the kernel), which is the overload behaviour we want.
const INBOUND_QUEUE: usize = 4096;
/// How often the status snapshot is refreshed.
const STATUS_PERIOD: Duration = Duration::from_millis(200);
/// Most core shards (see [`B2buaSettings::shards`]).
pub const MAX_SHARDS: usize = 16;

/// Where and how the B2BUA runs.
#[derive(Debug, Clone)]
pub struct B2buaSettings {
    /// SIP addresses: port 5060 of each rendezvous address (UDP and TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Core settings (host name for Warning headers, limits, timers, OPTIONS interval). With
    /// several shards the call and transaction limits are the totals, split evenly.
    pub core: CoreConfig,
    /// Number of cores (shards) the calls are spread over by Call-ID, each a task of its own;
    /// 0 = one per available CPU, at most [`MAX_SHARDS`]. Production uses 1: on the 2-CPU bench
    /// host (benches/sip-rate.sh, CPUs shared with the sipp caller and bridge) two shards failed
    /// 11,000-19,000 of 70,000 calls at 3,500 calls/s where one shard failed none; the store and
    /// socket work already runs on the other runtime threads. More shards are for hosts whose
    /// CPUs are not taken by the load itself.
    pub shards: usize,
}

/// The SIP port on every rendezvous address (RFC 3261 default; the VCS's neighbour zone uses it).
pub const SIP_PORT: u16 = 5060;

impl B2buaSettings {
    /// Production settings: UDP and TCP port 5060 on each rendezvous address, `hostname` in
    /// Warning headers, the core's default limits, timers and OPTIONS interval, one core shard.
    pub fn on_rendezvous(rendezvous: &[std::net::Ipv4Addr], hostname: &str) -> B2buaSettings {
        B2buaSettings {
            listen: rendezvous
                .iter()
                .map(|a| SocketAddr::new((*a).into(), SIP_PORT))
                .collect(),
            core: CoreConfig {
                hostname: hostname.to_owned(),
                ..CoreConfig::default()
            },
            shards: 1,
        }
    }
}

/// What the B2BUA shows in `confmesh status --json`, the status page and `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct B2buaStatus {
    /// Counters (see [`B2buaStats`]).
    pub stats: B2buaStats,
    /// Calls in progress.
    pub calls: Vec<CallInfo>,
    /// Bridge name → answers OPTIONS.
    pub bridges: BTreeMap<String, bool>,
    /// Socket-layer counters.
    pub transport: TransportStats,
    /// Conferences with their bridge and cluster-wide calls (filled in by
    /// [`super::StoreB2bua::status`]; empty with other directories).
    pub conferences: Vec<ConferenceStatus>,
    /// Placement counters of the store directory, when routing on the store.
    pub directory: Option<DirectoryStats>,
}

impl B2buaStats {
    /// Adds another shard's counters.
    fn add(&mut self, o: &B2buaStats) {
        let B2buaStats {
            calls_active,
            calls_total,
            calls_answered,
            calls_failed,
            calls_cancelled,
            bridge_failovers,
            parse_errors,
            overloaded,
            retransmissions,
            calls_expired,
            calls_unacknowledged,
            transactions,
        } = *o;
        self.calls_active += calls_active;
        self.calls_total += calls_total;
        self.calls_answered += calls_answered;
        self.calls_failed += calls_failed;
        self.calls_cancelled += calls_cancelled;
        self.bridge_failovers += bridge_failovers;
        self.parse_errors += parse_errors;
        self.overloaded += overloaded;
        self.retransmissions += retransmissions;
        self.calls_expired += calls_expired;
        self.calls_unacknowledged += calls_unacknowledged;
        self.transactions += transactions;
    }
}

impl B2buaStatus {
    /// Appends the B2BUA metrics to `/metrics`, each with the help text that says what it means.
    pub fn write_metrics(&self, page: &mut MetricsPage) {
        let s = &self.stats;
        for (name, help, value) in [
            (
                "confmesh_sip_calls_active",
                "Calls in progress (routing, ringing or connected)",
                s.calls_active as u64,
            ),
            (
                "confmesh_sip_transactions",
                "Live SIP transactions",
                s.transactions as u64,
            ),
        ] {
            page.family(name, MetricKind::Gauge, help)
                .sample(name, &[], value as f64);
        }
        let t = &self.transport;
        for (name, help, value) in [
            (
                "confmesh_sip_calls_total",
                "INVITEs that started a call",
                s.calls_total,
            ),
            (
                "confmesh_sip_calls_answered_total",
                "Calls a bridge answered",
                s.calls_answered,
            ),
            (
                "confmesh_sip_calls_failed_total",
                "Calls refused by routing, admission (404, 488, 503) or a bridge",
                s.calls_failed,
            ),
            (
                "confmesh_sip_calls_cancelled_total",
                "Calls cancelled by the caller before an answer",
                s.calls_cancelled,
            ),
            (
                "confmesh_sip_bridge_failovers_total",
                "Calls moved to another bridge because the first failed",
                s.bridge_failovers,
            ),
            (
                "confmesh_sip_parse_errors_total",
                "SIP messages that did not parse",
                s.parse_errors,
            ),
            (
                "confmesh_sip_overloaded_total",
                "Requests refused statelessly at the call or transaction limits",
                s.overloaded,
            ),
            (
                "confmesh_sip_retransmissions_total",
                "Retransmissions sent by the transaction layer",
                s.retransmissions,
            ),
            (
                "confmesh_sip_calls_expired_total",
                "Calls hung up at the maximum call duration (sip/max_call_duration_s)",
                s.calls_expired,
            ),
            (
                "confmesh_sip_calls_unacknowledged_total",
                "Answered calls hung up because the 2xx was never acknowledged (64*T1)",
                s.calls_unacknowledged,
            ),
            (
                "confmesh_sip_framing_errors_total",
                "TCP streams closed because they could not be framed",
                t.framing_errors,
            ),
            (
                "confmesh_sip_send_failures_total",
                "SIP messages dropped: queue full or connection failed",
                t.send_failures,
            ),
            (
                "confmesh_sip_refused_connections_total",
                "TCP connections refused at the connection limit",
                t.refused_connections,
            ),
            (
                "confmesh_sip_tcp_idle_closed_total",
                "TCP connections closed after carrying no message for the idle timeout",
                t.tcp_idle_closed,
            ),
            (
                "confmesh_sip_tcp_incomplete_closed_total",
                "TCP connections closed because a started message did not complete in time",
                t.tcp_incomplete_closed,
            ),
            (
                "confmesh_sip_tcp_evicted_total",
                "Idle TCP connections closed to make room for a new one at the limit",
                t.tcp_evicted,
            ),
            (
                "confmesh_sip_accept_errors_total",
                "Failed TCP accepts (each followed by a short pause)",
                t.accept_errors,
            ),
        ] {
            page.family(name, MetricKind::Counter, help)
                .sample(name, &[], value as f64);
        }
        let by_state = "confmesh_sip_calls_by_state";
        page.family(by_state, MetricKind::Gauge, "Calls in progress by state: routing, calling, connecting (answered, ACK awaited), connected, ending");
        for state in ["routing", "calling", "connecting", "connected", "ending"] {
            let n = self.calls.iter().filter(|c| c.state == state).count();
            page.sample(by_state, &[("state", state)], n as f64);
        }
        let up = "confmesh_sip_bridge_up";
        page.family(
            up,
            MetricKind::Gauge,
            "1 when the bridge answers OPTIONS probes, 0 when it does not",
        );
        for (bridge, is_up) in &self.bridges {
            page.sample(up, &[("bridge", bridge)], if *is_up { 1.0 } else { 0.0 });
        }
        let Some(d) = &self.directory else { return };
        let n = "confmesh_conferences";
        page.family(
            n,
            MetricKind::Gauge,
            "Conferences placed on a bridge, cluster-wide",
        )
        .sample(n, &[], self.conferences.len() as f64);
        let calls = "confmesh_conference_calls";
        page.family(
            calls,
            MetricKind::Gauge,
            "Calls in a conference, cluster-wide, by conference and its bridge",
        );
        for c in &self.conferences {
            page.sample(
                calls,
                &[("conference", &c.name), ("bridge", &c.bridge)],
                f64::from(c.calls),
            );
        }
        for (name, kind, help, value) in [
            (
                "confmesh_conference_claims_total",
                MetricKind::Counter,
                "Placements of new conferences claimed by this peer",
                d.claims,
            ),
            (
                "confmesh_conference_claims_lost_total",
                MetricKind::Counter,
                "Claims of this peer that lost to another peer's earlier claim",
                d.claims_lost,
            ),
            (
                "confmesh_conference_placement_conflicts",
                MetricKind::Gauge,
                "Conferences in which this peer carries calls on another bridge than the placement",
                d.placement_conflicts,
            ),
            (
                "confmesh_conference_repairs_total",
                MetricKind::Counter,
                "Placements claimed again because they vanished under this peer's calls",
                d.repairs,
            ),
            (
                "confmesh_conference_orphans_removed_total",
                MetricKind::Counter,
                "Conferences removed because nobody had calls in them",
                d.orphans_removed,
            ),
            (
                "confmesh_conference_malformed_entries_total",
                MetricKind::Counter,
                "Conference status entries in the store that did not parse",
                d.malformed_entries,
            ),
        ] {
            page.family(name, kind, help)
                .sample(name, &[], value as f64);
        }
    }
}

/// A running B2BUA. Dropping it without [`B2buaService::shutdown`] aborts the tasks.
///
/// The calls are spread over [`B2buaSettings::shards`] cores by Call-ID
/// ([`crate::sip::transport::shard_of`]): every message of a call reaches the same core, each
/// core runs on a task of its own with its own transactions and timers, so the cores use every
/// CPU without sharing anything but the sockets, the router and the bridge health table. The
/// first core probes the bridges; a bridge failure another core sees is passed to it.
pub struct B2buaService {
    /// One status slot per shard, merged by [`Self::status`].
    status: Arc<Mutex<Vec<B2buaStatus>>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
}

impl B2buaService {
    /// Binds the SIP sockets and starts routing calls with `directory` (conference placement) and
    /// `ledger` (cluster-wide bandwidth), following the shared configuration published on `config`.
    pub async fn start<D: ConferenceDirectory, L: BandwidthLedger>(
        settings: B2buaSettings,
        directory: D,
        ledger: L,
        config: watch::Receiver<Arc<RoutingConfig>>,
    ) -> io::Result<B2buaService> {
        let shards = match settings.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .clamp(1, MAX_SHARDS);
        let (mut in_txs, mut in_rxs) = (Vec::new(), Vec::new());
        for _ in 0..shards {
            let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
            in_txs.push(tx);
            in_rxs.push(rx);
        }
        let sockets = Arc::new(
            SipSockets::bind_sharded(&settings.listen, in_txs, TcpLimits::default()).await?,
        );
        let mut local_addrs = sockets.local_addrs();
        local_addrs.sort();
        let base = settings.core;
        let seed = match base.seed {
            0 => std::collections::hash_map::RandomState::new().hash_one(Instant::now()),
            s => s,
        };
        let status = Arc::new(Mutex::new(vec![B2buaStatus::default(); shards]));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let router = Arc::new(Router {
            directory,
            ledger,
            health: Arc::new(HealthTable::default()),
        });
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let mut down_rx = Some(down_rx);
        let mut tasks = Vec::with_capacity(shards);
        for (index, inbound) in in_rxs.into_iter().enumerate() {
            let mut cfg = base.clone();
            cfg.max_calls = base.max_calls.div_ceil(shards);
            cfg.max_transactions = base.max_transactions.div_ceil(shards);
            cfg.seed = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            if shards > 1 {
                cfg.call_id_prefix = format!("{SHARD_CALL_ID_PREFIX}{index}-");
            }
            let run = Run {
                index,
                core: B2bua::new(cfg),
                sockets: sockets.clone(),
                router: router.clone(),
                config: config.clone(),
                status: status.clone(),
                // The first shard probes the bridges and hears the others' bridge failures.
                probe_from: if index == 0 {
                    local_addrs.first().copied()
                } else {
                    None
                },
                bridge_down: (index != 0).then(|| down_tx.clone()),
                default_options_interval: base.options_interval,
                default_options_failures: base.options_failures,
                default_max_call_duration: base.max_call_duration,
            };
            let heard = down_rx
                .take()
                .unwrap_or_else(|| mpsc::unbounded_channel().1);
            tasks.push(tokio::spawn(run.run(inbound, heard, shutdown_rx.clone())));
        }
        Ok(B2buaService {
            status,
            shutdown,
            tasks,
            local_addrs,
        })
    }

    /// The bound SIP addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// A snapshot at most 200 ms old (refreshed by the tasks, so reading it never waits for a
    /// core): the shards' counters added, their calls together.
    pub fn status(&self) -> B2buaStatus {
        let Ok(slots) = self.status.lock() else {
            return B2buaStatus::default();
        };
        let mut out = slots.first().cloned().unwrap_or_default();
        for s in slots.iter().skip(1) {
            out.stats.add(&s.stats);
            out.calls.extend(s.calls.iter().cloned());
        }
        out
    }

    /// Stops the tasks and closes the sockets; calls in progress are abandoned (the VCS and the
    /// bridges time them out; a restart is not a graceful drain).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for B2buaService {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Run<D, L> {
    /// This shard's number (its status slot).
    index: usize,
    core: B2bua,
    sockets: Arc<SipSockets>,
    router: Arc<Router<D, L>>,
    config: watch::Receiver<Arc<RoutingConfig>>,
    status: Arc<Mutex<Vec<B2buaStatus>>>,
    probe_from: Option<SocketAddr>,
    /// Shards that do not probe tell the probing one about bridges whose INVITE timed out.
    bridge_down: Option<mpsc::UnboundedSender<String>>,
    /// The probe interval when shared configuration sets none.
    default_options_interval: Duration,
    /// The unanswered probes before a bridge is down when shared configuration sets none.
    default_options_failures: u32,
    /// The maximum call duration when shared configuration sets none.
    default_max_call_duration: Duration,
}

impl<D: ConferenceDirectory, L: BandwidthLedger> Run<D, L> {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut bridge_down: mpsc::UnboundedReceiver<String>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (route_tx, mut route_rx) = mpsc::unbounded_channel();
        self.apply_config();
        let mut status_tick = tokio::time::interval(STATUS_PERIOD);
        // Without a publisher the configuration simply stays as it is.
        let mut config_open = true;
        loop {
            let deadline = self.core.poll_timeout().map(tokio::time::Instant::from_std);
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                _ = shutdown.changed() => break,
                m = inbound.recv() => match m {
                    Some(m) => self.core.handle_datagram(Instant::now(), m.src, m.local, m.transport, &m.data),
                    None => break,
                },
                Some((call, decision)) = route_rx.recv() => self.core.handle_route(Instant::now(), call, decision),
                Some(bridge) = bridge_down.recv() => self.core.handle_bridge_down(&bridge),
                changed = self.config.changed(), if config_open => match changed {
                    Ok(()) => self.apply_config(),
                    Err(_) => config_open = false,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => self.core.handle_timeout(Instant::now()),
                _ = status_tick.tick() => self.publish_status(),
            }
            while let Some(t) = self.core.poll_transmit() {
                self.sockets.send(t);
            }
            while let Some(ev) = self.core.poll_event() {
                match ev {
                    B2buaEvent::Route { call, request } => {
                        let (router, cfg, tx) = (
                            self.router.clone(),
                            self.config.borrow().clone(),
                            route_tx.clone(),
                        );
                        tokio::spawn(async move {
                            let decision = router.route(&cfg, &request).await;
                            let _ = tx.send((call, decision));
                        });
                    }
                    B2buaEvent::Release(route) => {
                        let router = self.router.clone();
                        tokio::spawn(async move { router.release(&route).await });
                    }
                    B2buaEvent::BridgeHealth { bridge, up } => {
                        if let (false, Some(tx)) = (up, &self.bridge_down) {
                            let _ = tx.send(bridge.clone());
                        }
                        if self.router.health.set(&bridge, up) {
                            tracing::info!(%bridge, up, "bridge health changed");
                        }
                    }
                }
            }
        }
    }

    fn apply_config(&mut self) {
        let cfg = self.config.borrow_and_update().clone();
        self.core.set_options_failures(
            cfg.options_failures
                .unwrap_or(self.default_options_failures),
        );
        self.core.set_max_call_duration(
            cfg.max_call_duration
                .unwrap_or(self.default_max_call_duration),
        );
        let Some(local) = self.probe_from else { return };
        let now = Instant::now();
        self.core.set_options_interval(
            now,
            cfg.options_interval
                .unwrap_or(self.default_options_interval),
        );
        let probes = cfg
            .bridges
            .values()
            .map(|b| BridgeProbe {
                name: b.name.clone(),
                uri: b.uri.clone(),
                dest: b.addr,
                transport: b.transport,
            })
            .collect();
        self.core.set_bridges(now, local, probes);
    }

    fn publish_status(&self) {
        let s = B2buaStatus {
            stats: self.core.stats(),
            calls: self.core.calls(),
            bridges: self.router.health.snapshot(),
            transport: self.sockets.stats(),
            ..B2buaStatus::default()
        };
        if let Some(slot) = self
            .status
            .lock()
            .ok()
            .as_deref_mut()
            .and_then(|g| g.get_mut(self.index))
        {
            *slot = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_counters_and_bridge_health() {
        let mut st = B2buaStatus::default();
        st.stats.calls_active = 2;
        st.stats.calls_failed = 5;
        st.transport.send_failures = 1;
        st.stats.calls_expired = 3;
        st.calls.push(CallInfo {
            conference: None,
            bridge: None,
            state: "connected",
        });
        st.bridges.insert("b1".into(), true);
        st.bridges.insert("b2".into(), false);
        st.conferences.push(ConferenceStatus {
            name: "meet-1".into(),
            bridge: "b2".into(),
            calls: 3,
        });
        st.directory = Some(DirectoryStats {
            claims: 4,
            claims_lost: 1,
            ..DirectoryStats::default()
        });
        let mut page = MetricsPage::default();
        st.write_metrics(&mut page);
        let text = page.finish();
        for line in [
            "confmesh_sip_calls_active 2",
            "confmesh_sip_calls_failed_total 5",
            "confmesh_sip_send_failures_total 1",
            "confmesh_sip_calls_expired_total 3",
            "confmesh_sip_calls_by_state{state=\"connected\"} 1",
            "confmesh_sip_calls_by_state{state=\"ending\"} 0",
            "confmesh_sip_bridge_up{bridge=\"b1\"} 1",
            "confmesh_sip_bridge_up{bridge=\"b2\"} 0",
            "# TYPE confmesh_sip_calls_total counter",
            "# TYPE confmesh_sip_tcp_evicted_total counter",
            "confmesh_conferences 1",
            "confmesh_conference_calls{conference=\"meet-1\",bridge=\"b2\"} 3",
            "confmesh_conference_claims_lost_total 1",
            "# TYPE confmesh_conference_placement_conflicts gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
