//! Cluster membership: who is a peer, who is active, and why not (SPEC.md §2 rules 1–5).
//!
//! Every second each peer sends every other a [`Hello`] across the overlay (so it is authenticated
//! by the AH SA). From the hellos, the IKE outcome and the path MTU, [`Membership`] decides for each
//! peer `active` or `not-active` with a reason, measures round-trip time and clock skew NTP-style,
//! and raises and clears alarms. It is a sans-IO core: time (monotonic and wall) is passed in, and
//! hellos to send come out of [`Membership::poll_transmit`]. The driver calls, in any order,
//! `handle_hello`, `handle_ike`, `set_path_mtu`, `handle_timeout`, then drains `poll_transmit` and
//! `poll_event` and sleeps until `poll_timeout`.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Licence;

/// How often a hello goes to each peer.
pub const HELLO_INTERVAL: Duration = Duration::from_secs(1);
/// Silence after which a peer is `unreachable`: two missed hellos plus slack, so that a partition
/// shows within 3 s (issue 4, acceptance 4) while one lost hello does not flap the state.
pub const UNREACHABLE_AFTER: Duration = Duration::from_millis(2300);
/// Largest one-way latency the deployment guide allows between peers.
pub const MAX_ONE_WAY_LATENCY_MS: f64 = 15.0;
/// Largest clock skew tolerated between peers before they are refused.
pub const MAX_CLOCK_SKEW_MS: f64 = 1000.0;
/// Smallest path MTU that still carries synchronisation traffic: the IPv4 minimum datagram (576)
/// inside the largest tunnel overhead (outer IPv4 + ESP-GCM, 20 + 40 + up to 3 padding).
pub const MIN_SYNC_PATH_MTU: u16 = 640;
/// Version of the hello encoding; a peer speaking another is refused as incompatible.
pub const HELLO_PROTOCOL: u8 = 1;
/// Largest hello datagram accepted; hellos are ~300 bytes, anything larger is malformed.
pub const MAX_HELLO_LEN: usize = 1200;
/// RTT samples kept per peer; the median decides the latency state so one spike does not flap it.
const RTT_SAMPLES: usize = 5;

/// What a peer tells the others about itself, once a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Hello encoding version ([`HELLO_PROTOCOL`]).
    pub proto: u8,
    /// Sender's host name, shown as `Active as <hostname>`.
    pub hostname: String,
    /// Sender's software version (rule 3).
    pub version: String,
    /// Sender's licence (rule 2).
    pub licence: Licence,
    /// Hash of the sender's sorted peer list (rule 1: must be identical everywhere).
    pub peer_list_hash: String,
    /// Sender's management address, so that a hello arriving on the wrong SA is detected.
    pub mgmt_addr: Ipv4Addr,
    /// Sender's wall clock at sending, in ms since the Unix epoch (clock skew measurement).
    pub wall_ms: u64,
    /// Sender's sequence number of this hello.
    pub seq: u64,
    /// Echo of the last hello the sender got from the receiver, for the RTT measurement.
    pub echo: Option<Echo>,
    /// Sender's path MTU towards the receiver.
    pub path_mtu: u16,
}

/// The NTP-style echo in a [`Hello`]: which hello of ours it answers and how long it was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// Our sequence number being echoed.
    pub seq: u64,
    /// Microseconds between the sender receiving our hello and sending this one.
    pub held_us: u64,
}

impl Hello {
    /// Decodes a hello, refusing oversize or malformed datagrams.
    pub fn decode(bytes: &[u8]) -> Option<Hello> {
        if bytes.len() > MAX_HELLO_LEN {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    /// Encodes a hello for the wire.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a hello always serialises")
    }
}

/// The hash of a peer list that peers compare (order does not matter: the list is sorted first).
pub fn peer_list_hash(peers: &[Ipv4Addr]) -> String {
    let mut sorted = peers.to_vec();
    sorted.sort();
    let mut h = Sha256::new();
    for p in &sorted {
        h.update(p.octets());
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a peer is not active, as the status JSON names it (SPEC.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotActiveReason {
    /// No hello within [`UNREACHABLE_AFTER`] and IKE gives no better explanation.
    Unreachable,
    /// IKE phase 1 failed to authenticate (pre-shared key mismatch?).
    AuthenticationFailed,
    /// The peer's list of peers differs from ours.
    PeerListMismatch,
    /// The peer runs another software version.
    VersionMismatch,
    /// The peer's licence differs from ours or does not allow this cluster size.
    LicenceMismatch,
    /// The peer's clock is too far from ours.
    ClockSkew,
    /// One-way latency above 15 ms.
    Latency,
    /// The path MTU is too small for synchronisation traffic.
    PathMtu,
}

impl NotActiveReason {
    /// The operator-facing wording, as in the deployment guide.
    pub fn describe(self) -> &'static str {
        match self {
            NotActiveReason::Unreachable => "unreachable",
            NotActiveReason::AuthenticationFailed => {
                "authentication failed (pre-shared key mismatch?)"
            }
            NotActiveReason::PeerListMismatch => "peer list mismatch",
            NotActiveReason::VersionMismatch => "version mismatch",
            NotActiveReason::LicenceMismatch => "licence mismatch",
            NotActiveReason::ClockSkew => "clock skew",
            NotActiveReason::Latency => "latency too high",
            NotActiveReason::PathMtu => "path MTU too small",
        }
    }
}

/// What IKE says about a peer; membership needs it to tell `authentication-failed` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IkeState {
    /// No phase 1 yet (or it was deleted).
    Connecting,
    /// Phase 1 and at least one child SA pair are up.
    Established,
    /// The last phase 1 failed authentication.
    AuthenticationFailed,
}

/// The kind of an alarm; at most one of each per peer is raised at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    /// Clocks differ by more than [`MAX_CLOCK_SKEW_MS`].
    ClockSkew,
    /// One-way latency above [`MAX_ONE_WAY_LATENCY_MS`].
    Latency,
    /// Path MTU below [`MIN_SYNC_PATH_MTU`].
    PathMtu,
}

/// A raised alarm.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alarm {
    /// What is wrong.
    pub kind: AlarmKind,
    /// With which peer.
    pub peer: Ipv4Addr,
    /// Wall clock when raised, ms since the Unix epoch.
    pub raised_at_ms: u64,
    /// A sentence for the operator, with the measured value.
    pub detail: String,
}

/// What changed, for the event log and the other services.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// A peer became active.
    Active {
        /// The peer.
        peer: Ipv4Addr,
        /// Its host name.
        hostname: String,
    },
    /// A peer stopped being active (or was never active and its reason changed).
    NotActive {
        /// The peer.
        peer: Ipv4Addr,
        /// Why.
        reason: NotActiveReason,
        /// A detail such as both versions.
        detail: String,
    },
    /// An alarm was raised.
    AlarmRaised(Alarm),
    /// An alarm was cleared.
    AlarmCleared {
        /// What it was.
        kind: AlarmKind,
        /// With which peer.
        peer: Ipv4Addr,
        /// Wall clock when cleared.
        cleared_at_ms: u64,
    },
}

/// This peer's own identity, as carried in its hellos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    /// Host name.
    pub hostname: String,
    /// Reported software version.
    pub version: String,
    /// Licence.
    pub licence: Licence,
    /// Management address.
    pub mgmt_addr: Ipv4Addr,
}

/// One peer as this peer sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerView {
    /// Management address.
    pub addr: Ipv4Addr,
    /// Overlay address.
    pub overlay_addr: Ipv4Addr,
    /// Host name learnt from its hellos.
    pub hostname: Option<String>,
    /// `None` when active.
    pub reason: Option<NotActiveReason>,
    /// Detail of the reason (e.g. "peer runs 0.2.0, this peer 0.1.0").
    pub detail: Option<String>,
    /// Median round-trip time of recent hellos.
    pub rtt_ms: Option<f64>,
    /// Peer clock minus ours, ms.
    pub clock_skew_ms: Option<f64>,
    /// Path MTU towards the peer (the smaller of ours and the one it reports).
    pub path_mtu: u16,
    #[serde(skip)]
    local_mtu: u16,
    #[serde(skip)]
    reported_mtu: Option<u16>,
    #[serde(skip)]
    ike: IkeState,
    #[serde(skip)]
    last_hello: Option<(Instant, u64)>,
    #[serde(skip)]
    last_heard: Option<Instant>,
    #[serde(skip)]
    last_facts: Option<Hello>,
    #[serde(skip)]
    rtts: VecDeque<f64>,
    #[serde(skip)]
    sent: VecDeque<(u64, Instant)>,
}

impl PeerView {
    fn new(addr: Ipv4Addr, overlay_addr: Ipv4Addr, path_mtu: u16) -> Self {
        Self {
            addr,
            overlay_addr,
            hostname: None,
            reason: Some(NotActiveReason::Unreachable),
            detail: None,
            rtt_ms: None,
            clock_skew_ms: None,
            path_mtu,
            local_mtu: path_mtu,
            reported_mtu: None,
            ike: IkeState::Connecting,
            last_hello: None,
            last_heard: None,
            last_facts: None,
            rtts: VecDeque::with_capacity(RTT_SAMPLES),
            sent: VecDeque::with_capacity(4),
        }
    }

    /// Whether the peer is active.
    pub fn is_active(&self) -> bool {
        self.reason.is_none()
    }

    /// The path MTU is the smaller of what we measured and what the peer measured towards us.
    fn update_path_mtu(&mut self) {
        self.path_mtu = self
            .reported_mtu
            .map_or(self.local_mtu, |r| r.min(self.local_mtu));
    }

    /// What IKE last said about this peer.
    pub fn ike(&self) -> IkeState {
        self.ike
    }
}

/// The membership state machine of one peer (see the module docs for the calling order).
#[derive(Debug)]
pub struct Membership {
    local: LocalIdentity,
    list_hash: String,
    cluster_size: usize,
    peers: BTreeMap<Ipv4Addr, PeerView>,
    alarms: BTreeMap<(AlarmKind, Ipv4Addr), Alarm>,
    events: VecDeque<MembershipEvent>,
    next_hello: Instant,
    seq: u64,
    configured_mtu: u16,
}

impl Membership {
    /// Starts membership for `local` with the full peer list (own address included) and each
    /// other peer's overlay address.
    pub fn new(
        local: LocalIdentity,
        peers: &[(Ipv4Addr, Ipv4Addr)],
        configured_mtu: u16,
        now: Instant,
    ) -> Self {
        let mut m = Membership {
            local,
            list_hash: String::new(),
            cluster_size: 0,
            peers: BTreeMap::new(),
            alarms: BTreeMap::new(),
            events: VecDeque::new(),
            next_hello: now,
            seq: 0,
            configured_mtu,
        };
        m.set_peers(peers);
        m
    }

    /// Replaces the peer list live (rule 1 changes without restart). Peers that stay keep their
    /// measurements; removed peers lose their alarms.
    pub fn set_peers(&mut self, peers: &[(Ipv4Addr, Ipv4Addr)]) {
        let me = self.local.mgmt_addr;
        let mut all: Vec<Ipv4Addr> = peers.iter().map(|p| p.0).collect();
        if !all.contains(&me) {
            all.push(me);
        }
        self.list_hash = peer_list_hash(&all);
        self.cluster_size = all.len();
        self.peers
            .retain(|addr, _| peers.iter().any(|p| p.0 == *addr));
        for &(addr, overlay) in peers.iter().filter(|p| p.0 != me) {
            let mtu = self.configured_mtu;
            self.peers
                .entry(addr)
                .or_insert_with(|| PeerView::new(addr, overlay, mtu))
                .overlay_addr = overlay;
        }
        self.alarms
            .retain(|(_, peer), _| self.peers.contains_key(peer));
        // Facts judged against the old list are stale: re-judge with what each peer said last.
        let addrs: Vec<Ipv4Addr> = self.peers.keys().copied().collect();
        for addr in addrs {
            self.judge(addr, None);
        }
    }

    /// This peer's identity.
    pub fn local(&self) -> &LocalIdentity {
        &self.local
    }

    /// The other peers, in address order.
    pub fn peers(&self) -> impl Iterator<Item = &PeerView> {
        self.peers.values()
    }

    /// The raised alarms, in a stable order.
    pub fn alarms(&self) -> impl Iterator<Item = &Alarm> {
        self.alarms.values()
    }

    /// A hello arrived from `from` (the overlay source mapped to its management address).
    /// `wall_ms` is our wall clock now.
    pub fn handle_hello(&mut self, now: Instant, wall_ms: u64, from: Ipv4Addr, hello: Hello) {
        let Some(view) = self.peers.get_mut(&from) else {
            return;
        };
        if hello.mgmt_addr != from {
            return;
        }
        view.last_heard = Some(now);
        view.last_hello = Some((now, hello.seq));
        if let Some(echo) = hello.echo {
            if let Some(pos) = view.sent.iter().position(|(seq, _)| *seq == echo.seq) {
                let (_, sent_at) = view.sent[pos];
                let held = Duration::from_micros(echo.held_us);
                if let Some(rtt) = now
                    .checked_duration_since(sent_at)
                    .and_then(|d| d.checked_sub(held))
                {
                    let rtt_ms = rtt.as_secs_f64() * 1e3;
                    if view.rtts.len() == RTT_SAMPLES {
                        view.rtts.pop_front();
                    }
                    view.rtts.push_back(rtt_ms);
                    view.rtt_ms = Some(median(&view.rtts));
                    // The hello left the peer rtt/2 ago, when its clock read hello.wall_ms.
                    let skew = hello.wall_ms as f64 + rtt_ms / 2.0 - wall_ms as f64;
                    view.clock_skew_ms = Some(skew);
                }
                view.sent.drain(..=pos);
            }
        }
        view.reported_mtu = Some(hello.path_mtu);
        view.update_path_mtu();
        view.hostname = Some(hello.hostname.clone());
        view.last_facts = Some(hello);
        self.judge(from, Some(wall_ms));
    }

    /// IKE's view of a peer changed.
    pub fn handle_ike(&mut self, peer: Ipv4Addr, state: IkeState) {
        if let Some(view) = self.peers.get_mut(&peer) {
            view.ike = state;
            self.judge(peer, None);
        }
    }

    /// The dataplane measured a new path MTU towards `peer`.
    pub fn set_path_mtu(&mut self, peer: Ipv4Addr, mtu: u16) {
        if let Some(view) = self.peers.get_mut(&peer) {
            view.local_mtu = mtu;
            view.update_path_mtu();
            self.judge(peer, None);
        }
    }

    /// Timers: hello sending and the unreachable check.
    pub fn handle_timeout(&mut self, now: Instant, wall_ms: u64) {
        let stale: Vec<Ipv4Addr> = self
            .peers
            .values()
            .filter(|v| {
                v.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) >= UNREACHABLE_AFTER)
            })
            .map(|v| v.addr)
            .collect();
        for addr in stale {
            if let Some(view) = self.peers.get_mut(&addr) {
                view.last_heard = None;
                view.last_facts = None;
                view.last_hello = None;
                view.rtts.clear();
                view.rtt_ms = None;
                view.clock_skew_ms = None;
                view.reported_mtu = None;
                view.update_path_mtu();
            }
            self.judge(addr, Some(wall_ms));
        }
    }

    /// The next hello to send, one per peer per [`HELLO_INTERVAL`]: `(peer mgmt, peer overlay, hello)`.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        wall_ms: u64,
    ) -> Vec<(Ipv4Addr, Ipv4Addr, Hello)> {
        if now < self.next_hello {
            return Vec::new();
        }
        self.next_hello = now + HELLO_INTERVAL;
        self.seq += 1;
        let seq = self.seq;
        let mut out = Vec::with_capacity(self.peers.len());
        for view in self.peers.values_mut() {
            let echo = view.last_hello.map(|(at, their_seq)| Echo {
                seq: their_seq,
                held_us: now.saturating_duration_since(at).as_micros() as u64,
            });
            if view.sent.len() == 4 {
                view.sent.pop_front();
            }
            view.sent.push_back((seq, now));
            out.push((
                view.addr,
                view.overlay_addr,
                Hello {
                    proto: HELLO_PROTOCOL,
                    hostname: self.local.hostname.clone(),
                    version: self.local.version.clone(),
                    licence: self.local.licence,
                    peer_list_hash: self.list_hash.clone(),
                    mgmt_addr: self.local.mgmt_addr,
                    wall_ms,
                    seq,
                    echo,
                    path_mtu: view.local_mtu,
                },
            ));
        }
        out
    }

    /// When [`Membership::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        let unreachable = self
            .peers
            .values()
            .filter_map(|v| v.last_heard.map(|t| t + UNREACHABLE_AFTER))
            .min();
        unreachable.map_or(self.next_hello, |u| u.min(self.next_hello))
    }

    /// The next state change, for the event log.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// Re-decides a peer's state and alarms from what is known of it.
    fn judge(&mut self, addr: Ipv4Addr, wall_ms: Option<u64>) {
        let Some(view) = self.peers.get(&addr) else {
            return;
        };
        let local = &self.local;
        let mut alarms: Vec<(AlarmKind, String)> = Vec::new();
        let one_way = view.rtt_ms.map(|r| r / 2.0);
        if let Some(ow) = one_way.filter(|&ow| ow > MAX_ONE_WAY_LATENCY_MS) {
            alarms.push((
                AlarmKind::Latency,
                format!("one-way latency {ow:.1} ms exceeds {MAX_ONE_WAY_LATENCY_MS} ms"),
            ));
        }
        if let Some(skew) = view.clock_skew_ms.filter(|s| s.abs() > MAX_CLOCK_SKEW_MS) {
            alarms.push((
                AlarmKind::ClockSkew,
                format!("clock differs by {skew:.0} ms (limit {MAX_CLOCK_SKEW_MS} ms); check NTP"),
            ));
        }
        if view.path_mtu < MIN_SYNC_PATH_MTU {
            alarms.push((
                AlarmKind::PathMtu,
                format!(
                    "path MTU {} is below the {MIN_SYNC_PATH_MTU} bytes synchronisation needs",
                    view.path_mtu
                ),
            ));
        }
        let (reason, detail) = match (&view.last_facts, view.ike) {
            (_, IkeState::AuthenticationFailed) => (
                Some(NotActiveReason::AuthenticationFailed),
                Some("IKE authentication failed (pre-shared key mismatch?)".to_owned()),
            ),
            (None, _) => (Some(NotActiveReason::Unreachable), None),
            (Some(h), _) if h.proto != HELLO_PROTOCOL || h.version != local.version => (
                Some(NotActiveReason::VersionMismatch),
                Some(format!(
                    "peer runs {}, this peer runs {}",
                    h.version, local.version
                )),
            ),
            (Some(h), _)
                if h.licence != local.licence || self.cluster_size > local.licence.max_peers() =>
            {
                (
                    Some(NotActiveReason::LicenceMismatch),
                    Some(format!(
                        "peer licence {}, this peer {} ({} peers listed)",
                        h.licence.as_str(),
                        local.licence.as_str(),
                        self.cluster_size
                    )),
                )
            }
            (Some(h), _) if h.peer_list_hash != self.list_hash => (
                Some(NotActiveReason::PeerListMismatch),
                Some("the peer lists differ; make them identical".to_owned()),
            ),
            // Heard one way only so far: latency and skew are unknown until a hello comes back.
            _ if view.rtt_ms.is_none() => (
                Some(NotActiveReason::Unreachable),
                Some("no hello round trip measured yet".to_owned()),
            ),
            _ => match alarms.first() {
                Some((AlarmKind::ClockSkew, d)) => {
                    (Some(NotActiveReason::ClockSkew), Some(d.clone()))
                }
                Some((AlarmKind::Latency, d)) => (Some(NotActiveReason::Latency), Some(d.clone())),
                Some((AlarmKind::PathMtu, d)) => (Some(NotActiveReason::PathMtu), Some(d.clone())),
                None => (None, None),
            },
        };
        let hostname = view.hostname.clone().unwrap_or_default();
        let changed = view.reason != reason;
        let view = self.peers.get_mut(&addr).expect("looked up above");
        view.reason = reason;
        view.detail = detail.clone();
        if changed {
            self.events.push_back(match reason {
                None => MembershipEvent::Active {
                    peer: addr,
                    hostname,
                },
                Some(reason) => MembershipEvent::NotActive {
                    peer: addr,
                    reason,
                    detail: detail.unwrap_or_default(),
                },
            });
        }
        let Some(wall_ms) = wall_ms else { return };
        for kind in [AlarmKind::ClockSkew, AlarmKind::Latency, AlarmKind::PathMtu] {
            let want = alarms.iter().find(|(k, _)| *k == kind);
            match (want, self.alarms.contains_key(&(kind, addr))) {
                (Some((_, detail)), false) => {
                    let alarm = Alarm {
                        kind,
                        peer: addr,
                        raised_at_ms: wall_ms,
                        detail: detail.clone(),
                    };
                    self.alarms.insert((kind, addr), alarm.clone());
                    self.events.push_back(MembershipEvent::AlarmRaised(alarm));
                }
                (None, true) => {
                    self.alarms.remove(&(kind, addr));
                    self.events.push_back(MembershipEvent::AlarmCleared {
                        kind,
                        peer: addr,
                        cleared_at_ms: wall_ms,
                    });
                }
                _ => {}
            }
        }
    }
}

fn median(samples: &VecDeque<f64>) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 3);

    fn ov(a: Ipv4Addr) -> Ipv4Addr {
        crate::config::default_overlay_addr(a)
    }

    fn node(
        me: Ipv4Addr,
        version: &str,
        licence: Licence,
        peers: &[Ipv4Addr],
        t0: Instant,
    ) -> Membership {
        let list: Vec<_> = peers.iter().map(|&p| (p, ov(p))).collect();
        let local = LocalIdentity {
            hostname: format!("h{}", me.octets()[3]),
            version: version.into(),
            licence,
            mgmt_addr: me,
        };
        Membership::new(local, &list, 1500, t0)
    }

    /// A tiny two-or-three-node harness: hellos cross with a one-way delay; clocks may be skewed.
    struct Net {
        nodes: Vec<(Membership, i64)>,
        now: Instant,
        wall0: u64,
        one_way: Duration,
        cut: Option<Ipv4Addr>,
        in_flight: Vec<(Instant, Ipv4Addr, Ipv4Addr, Hello)>,
    }

    impl Net {
        fn new(nodes: Vec<(Membership, i64)>, now: Instant) -> Self {
            Net {
                nodes,
                now,
                wall0: 1_700_000_000_000,
                one_way: Duration::from_micros(200),
                cut: None,
                in_flight: Vec::new(),
            }
        }
        fn run(&mut self, total: Duration) {
            let step = Duration::from_micros(100);
            let mut elapsed = Duration::ZERO;
            let mut wall_us = self.wall0 * 1000;
            while elapsed < total {
                self.now += step;
                elapsed += step;
                wall_us += 100;
                let wall = wall_us / 1000;
                let due: Vec<_> = {
                    let (due, rest) = self.in_flight.drain(..).partition(|(t, ..)| *t <= self.now);
                    self.in_flight = rest;
                    due
                };
                for (_, from, to, hello) in due {
                    if let Some((m, skew)) = self
                        .nodes
                        .iter_mut()
                        .find(|(m, _)| m.local().mgmt_addr == to)
                    {
                        m.handle_hello(self.now, (wall as i64 + *skew) as u64, from, hello);
                    }
                }
                for (m, skew) in &mut self.nodes {
                    let w = (wall as i64 + *skew) as u64;
                    if m.poll_timeout() <= self.now {
                        m.handle_timeout(self.now, w);
                    }
                    let me = m.local().mgmt_addr;
                    for (to, _, hello) in m.poll_transmit(self.now, w) {
                        if self.cut.is_some_and(|c| c == me || c == to) {
                            continue;
                        }
                        self.in_flight
                            .push((self.now + self.one_way, me, to, hello));
                    }
                }
            }
            self.wall0 = wall_us / 1000;
        }
        fn view(&self, of: Ipv4Addr, peer: Ipv4Addr) -> PeerView {
            let (m, _) = self
                .nodes
                .iter()
                .find(|(m, _)| m.local().mgmt_addr == of)
                .unwrap();
            m.peers().find(|v| v.addr == peer).unwrap().clone()
        }
        fn alarms(&self, of: Ipv4Addr) -> Vec<AlarmKind> {
            let (m, _) = self
                .nodes
                .iter()
                .find(|(m, _)| m.local().mgmt_addr == of)
                .unwrap();
            m.alarms().map(|a| a.kind).collect()
        }
    }

    fn trio(t0: Instant) -> Net {
        let all = [A, B, C];
        Net::new(
            vec![
                (node(A, "0.1.0", Licence::Full, &all, t0), 0),
                (node(B, "0.1.0", Licence::Full, &all, t0), 0),
                (node(C, "0.1.0", Licence::Full, &all, t0), 0),
            ],
            t0,
        )
    }

    #[test]
    fn three_peers_become_active_with_rtt_and_skew() {
        let mut net = trio(Instant::now());
        net.run(Duration::from_secs(3));
        for (x, y) in [(A, B), (A, C), (B, A), (C, B)] {
            let v = net.view(x, y);
            assert!(v.is_active(), "{x} sees {y}: {:?} {:?}", v.reason, v.detail);
            assert_eq!(
                v.hostname.as_deref(),
                Some(format!("h{}", y.octets()[3]).as_str())
            );
            let rtt = v.rtt_ms.unwrap();
            assert!((0.3..=0.5).contains(&rtt), "rtt {rtt}");
            assert!(v.clock_skew_ms.unwrap().abs() < 2.0);
        }
    }

    #[test]
    fn partition_is_unreachable_within_three_seconds_and_heals() {
        let mut net = trio(Instant::now());
        net.run(Duration::from_secs(3));
        net.cut = Some(C);
        net.run(Duration::from_millis(3000));
        assert_eq!(net.view(A, C).reason, Some(NotActiveReason::Unreachable));
        assert_eq!(net.view(C, B).reason, Some(NotActiveReason::Unreachable));
        assert!(net.view(A, B).is_active());
        net.cut = None;
        net.run(Duration::from_millis(2500));
        assert!(net.view(A, C).is_active());
    }

    #[test]
    fn version_licence_and_list_mismatches_each_have_their_reason() {
        let t0 = Instant::now();
        let two = [A, B];
        let mut net = Net::new(
            vec![
                (node(A, "0.1.0", Licence::Full, &two, t0), 0),
                (node(B, "0.2.0", Licence::Full, &two, t0), 0),
            ],
            t0,
        );
        net.run(Duration::from_secs(2));
        let v = net.view(A, B);
        assert_eq!(v.reason, Some(NotActiveReason::VersionMismatch));
        assert!(v.detail.unwrap().contains("0.2.0"));
        assert_eq!(
            net.view(B, A).reason,
            Some(NotActiveReason::VersionMismatch)
        );

        let mut net = Net::new(
            vec![
                (node(A, "0.1.0", Licence::Full, &two, t0), 0),
                (node(B, "0.1.0", Licence::Select, &two, t0), 0),
            ],
            t0,
        );
        net.run(Duration::from_secs(2));
        assert_eq!(
            net.view(A, B).reason,
            Some(NotActiveReason::LicenceMismatch)
        );
        assert_eq!(
            net.view(B, A).reason,
            Some(NotActiveReason::LicenceMismatch)
        );

        let mut net = Net::new(
            vec![
                (node(A, "0.1.0", Licence::Full, &[A, B, C], t0), 0),
                (node(B, "0.1.0", Licence::Full, &two, t0), 0),
            ],
            t0,
        );
        net.run(Duration::from_secs(2));
        assert_eq!(
            net.view(A, B).reason,
            Some(NotActiveReason::PeerListMismatch)
        );
        assert_eq!(
            net.view(B, A).reason,
            Some(NotActiveReason::PeerListMismatch)
        );
        // Fixing the list live makes both active again.
        net.nodes[0].0.set_peers(&[(A, ov(A)), (B, ov(B))]);
        net.run(Duration::from_secs(2));
        assert!(net.view(A, B).is_active());
        assert!(net.view(B, A).is_active());
    }

    #[test]
    fn latency_raises_and_clears_alarm_on_both_ends() {
        let mut net = trio(Instant::now());
        net.run(Duration::from_secs(2));
        net.one_way = Duration::from_millis(20);
        net.run(Duration::from_secs(6));
        assert_eq!(net.alarms(A), vec![AlarmKind::Latency, AlarmKind::Latency]);
        assert_eq!(net.view(A, B).reason, Some(NotActiveReason::Latency));
        assert!(net.view(B, A).rtt_ms.unwrap() > 39.0);
        net.one_way = Duration::from_micros(200);
        net.run(Duration::from_secs(6));
        assert!(net.alarms(A).is_empty());
        assert!(net.view(B, A).is_active());
        let mut raised = 0;
        let mut cleared = 0;
        while let Some(e) = net.nodes[1].0.poll_event() {
            match e {
                MembershipEvent::AlarmRaised(a) if a.kind == AlarmKind::Latency => raised += 1,
                MembershipEvent::AlarmCleared {
                    kind: AlarmKind::Latency,
                    ..
                } => cleared += 1,
                _ => {}
            }
        }
        assert_eq!((raised, cleared), (2, 2));
    }

    #[test]
    fn clock_skew_is_measured_and_refused() {
        let t0 = Instant::now();
        let two = [A, B];
        let mut net = Net::new(
            vec![
                (node(A, "0.1.0", Licence::Full, &two, t0), 0),
                (node(B, "0.1.0", Licence::Full, &two, t0), 2500),
            ],
            t0,
        );
        net.run(Duration::from_secs(3));
        let v = net.view(A, B);
        assert_eq!(v.reason, Some(NotActiveReason::ClockSkew));
        assert!(
            (v.clock_skew_ms.unwrap() - 2500.0).abs() < 3.0,
            "{:?}",
            v.clock_skew_ms
        );
        assert!((net.view(B, A).clock_skew_ms.unwrap() + 2500.0).abs() < 3.0);
    }

    #[test]
    fn auth_failure_and_small_path_mtu() {
        let mut net = trio(Instant::now());
        net.nodes[0].0.handle_ike(C, IkeState::AuthenticationFailed);
        net.run(Duration::from_secs(2));
        assert_eq!(
            net.view(A, C).reason,
            Some(NotActiveReason::AuthenticationFailed)
        );
        net.nodes[0].0.handle_ike(C, IkeState::Established);
        net.nodes[0].0.set_path_mtu(B, 1280);
        net.run(Duration::from_secs(2));
        assert!(net.view(A, C).is_active());
        assert_eq!(net.view(A, B).path_mtu, 1280);
        assert!(
            net.view(A, B).is_active(),
            "1280 still carries sync traffic"
        );
        assert_eq!(
            net.view(B, A).path_mtu,
            1280,
            "the peer adopts the smaller reported MTU"
        );
        net.nodes[0].0.set_path_mtu(B, 600);
        net.run(Duration::from_secs(1));
        assert_eq!(net.view(A, B).reason, Some(NotActiveReason::PathMtu));
    }

    #[test]
    fn hello_decoding_refuses_garbage_and_oversize() {
        assert!(Hello::decode(b"").is_none());
        assert!(Hello::decode(&[b'{'; 2000]).is_none());
        assert!(Hello::decode(b"{\"proto\":1}").is_none());
    }

    #[test]
    fn peer_list_hash_ignores_order() {
        assert_eq!(peer_list_hash(&[A, B, C]), peer_list_hash(&[C, A, B]));
        assert_ne!(peer_list_hash(&[A, B]), peer_list_hash(&[A, B, C]));
    }
}
