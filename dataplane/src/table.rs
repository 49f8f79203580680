//! The sans-IO dataplane core: peers, their SAs, path MTUs, counters and events.
//!
//! A driver (the overlay in [`crate::Overlay`], or a test) owns the sockets, the TUN and the clock,
//! and calls into one [`Dataplane`]:
//!
//! 1. `handle_tun_packet` for each packet read from the TUN and `handle_network_packet` for each
//!    AH/ESP packet read from the raw sockets, acting on the returned [`Action`];
//! 2. `handle_path_mtu` for each fragmentation-needed report about a peer, and
//!    `handle_fragmentation_attempt` when the kernel refused a send as too big;
//! 3. `handle_timeout` once `poll_timeout` has passed;
//! 4. then, until each returns `None`: `poll_probe` (path-MTU probes to send) and `poll_event`
//!    (rekey requests, expiries, path-MTU changes for the daemon); and it keeps the TUN MTU equal to
//!    `tun_mtu`.
//!
//! Nothing here reads a clock, allocates per packet or panics on what the network sends.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::packet::{
    self, IPV4_HEADER_LEN, NewHeader, PROTO_ICMP, PROTO_IPV4, PROTO_NONE, ecn_decapsulate,
};
use crate::replay::Replayed;
use crate::sa::{
    Crossing, InboundSa, Limit, OutboundSa, Protection, SaCounters, SaError, SaParams, SaState,
    is_tunnel_payload,
};

/// Smallest path MTU believed from an ICMP report (Linux's `min_pmtu`), so that forged reports
/// cannot shrink the tunnel to nothing.
pub const MIN_PATH_MTU: u16 = 552;
/// Largest configurable MTU (jumbo frames).
pub const MAX_MTU: u16 = 9000;
/// Smallest configurable interface MTU (RFC 791's datagram every host must accept).
pub const MIN_CONFIGURED_MTU: u16 = 576;
/// Peers one dataplane serves; a cluster has at most three, the margin is for replacements.
pub const MAX_PEERS: usize = 16;
/// Inbound SAs kept per peer while rekeys overlap (make-before-break); the oldest goes first.
pub const MAX_INBOUND_PER_PEER: usize = 4;
/// After this long, a lowered path MTU is raised again and probed (RFC 1191 §6.3).
pub const PMTU_AGING: Duration = Duration::from_secs(600);
/// Interval of the path-MTU probes to each peer at its current estimate.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Events kept for the driver before new ones are counted as lost.
const MAX_EVENTS: usize = 1024;

/// Filler for probe payloads, long enough for the largest MTU.
static ZEROS: [u8; MAX_MTU as usize] = [0; MAX_MTU as usize];

/// What the driver does with the output buffer after a `handle_*` call (boringtun's `TunnResult`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Send the first `len` bytes (a complete outer IPv4 packet) to `dst` on the raw socket of
    /// `protection`.
    WriteToNetwork {
        /// The peer's management address.
        dst: Ipv4Addr,
        /// Which raw socket (protocol 51 or 50).
        protection: Protection,
        /// Length of the outer packet.
        len: usize,
    },
    /// Write the first `len` bytes (an inner IPv4 packet, or an ICMP answer) to the TUN.
    WriteToTun {
        /// Length of the packet.
        len: usize,
    },
    /// Nothing to send (a probe was received).
    Done,
    /// The packet was dropped and counted.
    Err(DropReason),
}

/// Why a packet was dropped, naming whose fault it is. Every drop is also counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DropReason {
    /// The sender (or the path) produced a packet with a broken structure.
    #[error("malformed packet (sender's fault or damage in transit)")]
    Malformed,
    /// A peer used an SPI we do not have: a rekey race, a stale peer, or garbage.
    #[error("no SA for this SPI and destination (stale peer or rekey race)")]
    UnknownSpi,
    /// Duplicate or older than the anti-replay window: duplication in transit or a replay attack.
    #[error("sequence number replayed or too old")]
    Replay,
    /// The ICV or GCM tag did not verify: wrong key, corruption or forgery.
    #[error("integrity check failed (wrong key, corruption or forgery)")]
    Authentication,
    /// The peer's inner packet has addresses its SA does not cover: the peer misbehaved.
    #[error("inner addresses outside the SA's traffic selectors (peer misbehaved)")]
    Policy,
    /// A local packet is addressed to an overlay address that no peer has (local routing).
    #[error("no peer owns this overlay destination")]
    NoPeer,
    /// The peer is known but IKE has not installed an outbound SA yet.
    #[error("no outbound SA for this peer yet (IKE not established)")]
    NoSa,
    /// A local packet without DF does not fit the path; the tunnel never fragments.
    #[error("inner packet larger than the path MTU allows")]
    Oversize,
    /// The SA reached a hard limit; IKE must install a new one.
    #[error("SA reached its hard limit")]
    Expired,
    /// Congestion marked on a packet whose sender does not do ECN (RFC 6040 §4.2 drop).
    #[error("CE mark on a not-ECT inner packet")]
    EcnCongestion,
    /// The driver passed an output buffer too small for the result (local misuse).
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// Which direction of an SA an event concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets we receive (the SPI is ours).
    Inbound,
    /// Packets we send (the SPI is the peer's).
    Outbound,
}

/// What the core tells the daemon (through the driver, which passes these along unread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A soft limit was reached: IKE should negotiate a replacement now.
    RekeyNeeded {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// The SA's SPI.
        spi: u32,
        /// Which direction.
        direction: Direction,
        /// Which limit.
        limit: Limit,
    },
    /// A hard limit was reached: the SA was removed.
    SaExpired {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// The SA's SPI.
        spi: u32,
        /// Which direction.
        direction: Direction,
        /// Which limit.
        limit: Limit,
    },
    /// The path MTU to a peer changed (lowered by ICMP, or raised by aging).
    PathMtuChanged {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// The new path MTU.
        path_mtu: u16,
    },
}

/// A misuse of the configuration calls, refused with nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The key provider delivered a key of the wrong length.
    #[error("{protection:?} key must be {expected} bytes, got {got} (key provider's fault)")]
    KeyLength {
        /// The transform.
        protection: Protection,
        /// Its key length.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// SPIs 0-255 are reserved (RFC 4302 §2.4, RFC 4303 §2.1).
    #[error("SPI {0:#010x} is reserved (0-255); allocate one from 256 up")]
    ReservedSpi(u32),
    /// The inbound SPI is already installed; the local allocator must choose a fresh one.
    #[error("inbound SPI {0:#010x} already installed; allocate a fresh SPI")]
    DuplicateSpi(u32),
    /// Another peer already owns the overlay address.
    #[error("overlay address {0} already belongs to another peer")]
    OverlayInUse(Ipv4Addr),
    /// A peer address equal to one of this host's own.
    #[error("peer address {0} is this host's own address")]
    OwnAddress(Ipv4Addr),
    /// More peers than [`MAX_PEERS`].
    #[error("too many peers (at most {MAX_PEERS})")]
    TooManyPeers,
    /// An MTU outside [`MIN_CONFIGURED_MTU`]..=[`MAX_MTU`].
    #[error("MTU {0} outside {MIN_CONFIGURED_MTU}..={MAX_MTU}")]
    Mtu(u16),
}

/// A peer's two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddrs {
    /// Management address: outer source/destination of the AH/ESP packets.
    pub mgmt: Ipv4Addr,
    /// Overlay address: inner source/destination, routed through the TUN.
    pub overlay: Ipv4Addr,
}

/// Counters per peer; they accumulate across rekeys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Packets sent to the peer (probes excluded).
    pub tx_packets: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Packets received from the peer and written to the TUN.
    pub rx_packets: u64,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Packets from the peer whose ICV or tag did not verify.
    pub icv_failures: u64,
    /// Packets from the peer refused by the anti-replay window.
    pub replay_drops: u64,
    /// Malformed packets from the peer's address.
    pub malformed: u64,
    /// Packets from the peer with an unknown SPI, plus local packets waiting for an outbound SA.
    pub no_sa: u64,
    /// Authenticated packets with inner addresses outside the SA.
    pub policy_drops: u64,
    /// Packets dropped by the RFC 6040 CE-on-not-ECT rule.
    pub ecn_drops: u64,
    /// Packets dropped because their SA had expired.
    pub expired_drops: u64,
    /// Local packets too big for the path (each DF one answered with ICMP).
    pub oversize: u64,
    /// ICMP fragmentation-needed answers written into the TUN.
    pub icmp_frag_needed: u64,
    /// Times the path MTU was lowered or raised.
    pub pmtu_updates: u64,
    /// Sends the kernel refused as too big (a fragmentation that did not happen).
    pub fragmentation_attempts: u64,
    /// Path-MTU probes sent.
    pub probes_sent: u64,
    /// Path-MTU probes received from the peer.
    pub probes_received: u64,
}

/// Counters of drops no peer can be blamed for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Malformed packets from unknown sources.
    pub malformed: u64,
    /// Unknown SPIs from unknown sources.
    pub unknown_spi: u64,
    /// Local packets for overlay addresses no peer has.
    pub no_peer: u64,
    /// Non-IPv4 or broken packets read from the TUN.
    pub tun_malformed: u64,
    /// Events dropped because the driver did not collect them.
    pub events_dropped: u64,
}

/// One SA as the status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaStatus {
    /// The SPI.
    pub spi: u32,
    /// AH or ESP-GCM.
    pub protection: Protection,
    /// Its counters.
    pub counters: SaCounters,
}

/// A peer as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's addresses.
    pub addrs: PeerAddrs,
    /// Current path MTU estimate.
    pub path_mtu: u16,
    /// The SA we send with.
    pub outbound: Option<SaStatus>,
    /// The SAs we accept, newest last.
    pub inbound: Vec<SaStatus>,
    /// Counters across all SAs the peer ever had.
    pub counters: PeerCounters,
}

#[derive(Debug)]
struct Peer {
    addrs: PeerAddrs,
    outbound: Option<OutboundSa>,
    path_mtu: u16,
    /// When a lowered path MTU falls back to the configured one.
    raise_at: Option<Instant>,
    probe_at: Option<Instant>,
    counters: PeerCounters,
}

#[derive(Debug)]
struct InboundEntry {
    peer: Ipv4Addr,
    /// Installation order, for evicting the oldest.
    order: u64,
    sa: InboundSa,
}

/// Inbound SAs are found by protocol, SPI and destination (RFC 4301 §4.1).
type InboundKey = (u8, u32, Ipv4Addr);

/// The dataplane of one host: every SA to every peer. See the module documentation for the order
/// in which a driver calls it.
#[derive(Debug)]
pub struct Dataplane {
    local: PeerAddrs,
    mtu: u16,
    peers: Vec<Peer>,
    inbound: HashMap<InboundKey, InboundEntry>,
    events: VecDeque<Event>,
    counters: GlobalCounters,
    installs: u64,
}

impl Dataplane {
    /// A dataplane for this host's addresses and configured cluster-interface MTU, with no peers.
    pub fn new(local: PeerAddrs, mtu: u16) -> Result<Self, ConfigError> {
        if !(MIN_CONFIGURED_MTU..=MAX_MTU).contains(&mtu) {
            return Err(ConfigError::Mtu(mtu));
        }
        Ok(Self {
            local,
            mtu,
            peers: Vec::new(),
            inbound: HashMap::new(),
            events: VecDeque::new(),
            counters: GlobalCounters::default(),
            installs: 0,
        })
    }

    /// This host's addresses.
    pub fn local(&self) -> PeerAddrs {
        self.local
    }

    /// Installs a new SA pair for `peer`, adding the peer if it is new. The outbound SA replaces
    /// the previous one at once; the inbound SA joins the previous ones, which keep accepting
    /// until they expire or are removed (make-before-break).
    pub fn install_sa_pair(
        &mut self,
        now: Instant,
        peer: PeerAddrs,
        outbound: &SaParams<'_>,
        inbound: &SaParams<'_>,
    ) -> Result<(), ConfigError> {
        for addr in [peer.mgmt, peer.overlay] {
            if addr == self.local.mgmt || addr == self.local.overlay {
                return Err(ConfigError::OwnAddress(addr));
            }
        }
        if self
            .peers
            .iter()
            .any(|p| p.addrs.overlay == peer.overlay && p.addrs.mgmt != peer.mgmt)
        {
            return Err(ConfigError::OverlayInUse(peer.overlay));
        }
        for params in [outbound, inbound] {
            if params.spi < 256 {
                return Err(ConfigError::ReservedSpi(params.spi));
            }
            if params.key.len() != params.protection.key_len() {
                return Err(ConfigError::KeyLength {
                    protection: params.protection,
                    expected: params.protection.key_len(),
                    got: params.key.len(),
                });
            }
        }
        let key = (
            inbound.protection.ip_protocol(),
            inbound.spi,
            self.local.mgmt,
        );
        if self.inbound.contains_key(&key) {
            return Err(ConfigError::DuplicateSpi(inbound.spi));
        }
        let index = match self.peers.iter().position(|p| p.addrs.mgmt == peer.mgmt) {
            Some(i) => i,
            None if self.peers.len() >= MAX_PEERS => return Err(ConfigError::TooManyPeers),
            None => {
                self.peers.push(Peer {
                    addrs: peer,
                    outbound: None,
                    path_mtu: self.mtu,
                    raise_at: None,
                    probe_at: Some(now),
                    counters: PeerCounters::default(),
                });
                self.peers.len() - 1
            }
        };
        let key_error = |p: &SaParams<'_>| ConfigError::KeyLength {
            protection: p.protection,
            expected: p.protection.key_len(),
            got: p.key.len(),
        };
        let out_sa = OutboundSa::new(outbound, now).map_err(|_| key_error(outbound))?;
        let in_sa = InboundSa::new(inbound, now).map_err(|_| key_error(inbound))?;
        let p = &mut self.peers[index];
        p.addrs.overlay = peer.overlay;
        p.outbound = Some(out_sa);
        let mut mine: Vec<(u64, InboundKey)> = self
            .inbound
            .iter()
            .filter(|(_, e)| e.peer == peer.mgmt)
            .map(|(k, e)| (e.order, *k))
            .collect();
        mine.sort();
        let excess = (mine.len() + 1).saturating_sub(MAX_INBOUND_PER_PEER);
        for (_, old) in mine.into_iter().take(excess) {
            self.inbound.remove(&old);
        }
        self.installs += 1;
        self.inbound.insert(
            key,
            InboundEntry {
                peer: peer.mgmt,
                order: self.installs,
                sa: in_sa,
            },
        );
        Ok(())
    }

    /// Removes an inbound SA (IKE received a DELETE for it). Returns whether it existed.
    pub fn remove_inbound_sa(&mut self, protection: Protection, spi: u32) -> bool {
        self.inbound
            .remove(&(protection.ip_protocol(), spi, self.local.mgmt))
            .is_some()
    }

    /// Removes a peer with all its SAs (the peer left the cluster). Returns whether it existed.
    pub fn remove_peer(&mut self, mgmt: Ipv4Addr) -> bool {
        self.inbound.retain(|_, e| e.peer != mgmt);
        let before = self.peers.len();
        self.peers.retain(|p| p.addrs.mgmt != mgmt);
        self.peers.len() != before
    }

    /// Protects one packet read from the TUN, writing the outer packet (or an ICMP answer for the
    /// TUN) to `out`, which should hold at least the configured MTU.
    pub fn handle_tun_packet(&mut self, _now: Instant, packet: &[u8], out: &mut [u8]) -> Action {
        let Ok(inner) = packet::parse_ipv4(packet) else {
            self.counters.tun_malformed += 1;
            return Action::Err(DropReason::Malformed);
        };
        let Some(peer) = self.peers.iter_mut().find(|p| p.addrs.overlay == inner.dst) else {
            self.counters.no_peer += 1;
            return Action::Err(DropReason::NoPeer);
        };
        let Some(sa) = peer.outbound.as_mut() else {
            peer.counters.no_sa += 1;
            return Action::Err(DropReason::NoSa);
        };
        let protection = sa.state().protection();
        let fits = protection.max_inner_len(peer.path_mtu);
        if packet.len() > fits {
            peer.counters.oversize += 1;
            if !inner.dont_fragment || !wants_icmp_answer(&inner, packet) {
                return Action::Err(DropReason::Oversize);
            }
            let next_hop_mtu = u16::try_from(fits).unwrap_or(u16::MAX);
            return match write_frag_needed(peer.addrs.overlay, &inner, packet, next_hop_mtu, out) {
                Some(len) => {
                    peer.counters.icmp_frag_needed += 1;
                    Action::WriteToTun { len }
                }
                None => Action::Err(DropReason::BufferTooSmall),
            };
        }
        // RFC 6040 normal mode: the outer header copies the inner DSCP and ECN.
        match sa.seal(
            self.local.mgmt,
            peer.addrs.mgmt,
            inner.tos,
            PROTO_IPV4,
            packet,
            out,
        ) {
            Ok(sealed) => {
                peer.counters.tx_packets += 1;
                peer.counters.tx_bytes += packet.len() as u64;
                let dst = peer.addrs.mgmt;
                if let Some(crossing) = sealed.crossing {
                    let spi = sa.state().spi();
                    if matches!(crossing, Crossing::Hard(_)) {
                        peer.outbound = None;
                    }
                    push_event(
                        &mut self.events,
                        &mut self.counters,
                        crossing_event(crossing, dst, spi, Direction::Outbound),
                    );
                }
                Action::WriteToNetwork {
                    dst,
                    protection,
                    len: sealed.len,
                }
            }
            Err(SaError::Expired) => {
                peer.counters.expired_drops += 1;
                Action::Err(DropReason::Expired)
            }
            Err(_) => Action::Err(DropReason::BufferTooSmall),
        }
    }

    /// Verifies and unwraps one packet read from a raw socket (the whole IPv4 packet), writing the
    /// inner packet for the TUN to `out`, which should hold at least the configured MTU.
    pub fn handle_network_packet(
        &mut self,
        _now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Action {
        let rx = match InboundSa::spi_of(packet) {
            Ok(rx) => rx,
            Err(_) => {
                let src = packet::parse_ipv4(packet).ok().map(|h| h.src);
                match src.and_then(|s| self.peers.iter_mut().find(|p| p.addrs.mgmt == s)) {
                    Some(p) => p.counters.malformed += 1,
                    None => self.counters.malformed += 1,
                }
                return Action::Err(DropReason::Malformed);
            }
        };
        let key = (rx.outer.protocol, rx.spi, rx.outer.dst);
        let Some(entry) = self.inbound.get_mut(&key) else {
            match self.peers.iter_mut().find(|p| p.addrs.mgmt == rx.outer.src) {
                Some(p) => p.counters.no_sa += 1,
                None => self.counters.unknown_spi += 1,
            }
            return Action::Err(DropReason::UnknownSpi);
        };
        let result = entry.sa.open(&rx, packet, out);
        let peer_mgmt = entry.peer;
        let Some(peer) = self.peers.iter_mut().find(|p| p.addrs.mgmt == peer_mgmt) else {
            // Unreachable by construction: removing a peer removes its inbound SAs.
            self.counters.unknown_spi += 1;
            return Action::Err(DropReason::UnknownSpi);
        };
        let opened = match result {
            Ok(opened) => opened,
            Err(e) => {
                let c = &mut peer.counters;
                let reason = match e {
                    SaError::Malformed => {
                        c.malformed += 1;
                        DropReason::Malformed
                    }
                    SaError::Replay(Replayed::Zero | Replayed::TooOld | Replayed::Duplicate) => {
                        c.replay_drops += 1;
                        DropReason::Replay
                    }
                    SaError::Authentication => {
                        c.icv_failures += 1;
                        DropReason::Authentication
                    }
                    SaError::Expired => {
                        c.expired_drops += 1;
                        DropReason::Expired
                    }
                    SaError::BufferTooSmall => DropReason::BufferTooSmall,
                };
                return Action::Err(reason);
            }
        };
        if let Some(crossing) = opened.crossing {
            if matches!(crossing, Crossing::Hard(_)) {
                self.inbound.remove(&key);
            }
            push_event(
                &mut self.events,
                &mut self.counters,
                crossing_event(crossing, peer_mgmt, rx.spi, Direction::Inbound),
            );
        }
        if !is_tunnel_payload(opened.next_header) {
            peer.counters.malformed += 1;
            return Action::Err(DropReason::Malformed);
        }
        if opened.next_header == PROTO_NONE {
            peer.counters.probes_received += 1;
            return Action::Done;
        }
        let Some(inner_buf) = out.get_mut(..opened.len) else {
            return Action::Err(DropReason::BufferTooSmall);
        };
        let Ok(inner) = packet::parse_ipv4(inner_buf) else {
            peer.counters.malformed += 1;
            return Action::Err(DropReason::Malformed);
        };
        if inner.src != peer.addrs.overlay || inner.dst != self.local.overlay {
            peer.counters.policy_drops += 1;
            return Action::Err(DropReason::Policy);
        }
        let Some(tos) = ecn_decapsulate(inner.tos, rx.outer.tos) else {
            peer.counters.ecn_drops += 1;
            return Action::Err(DropReason::EcnCongestion);
        };
        if tos != inner.tos {
            inner_buf[1] = tos;
            packet::refresh_checksum(&mut inner_buf[..inner.header_len]);
        }
        peer.counters.rx_packets += 1;
        peer.counters.rx_bytes += opened.len as u64;
        Action::WriteToTun { len: opened.len }
    }

    /// Takes a path MTU to `peer` reported by ICMP fragmentation-needed or by the kernel's refusal
    /// to send. Only lowers; [`PMTU_AGING`] later raises it again.
    pub fn handle_path_mtu(&mut self, now: Instant, peer: Ipv4Addr, mtu: u16) {
        let Some(p) = self.peers.iter_mut().find(|p| p.addrs.mgmt == peer) else {
            return;
        };
        let mtu = mtu.max(MIN_PATH_MTU);
        if mtu >= p.path_mtu {
            return;
        }
        p.path_mtu = mtu;
        p.raise_at = Some(now + PMTU_AGING);
        p.counters.pmtu_updates += 1;
        push_event(
            &mut self.events,
            &mut self.counters,
            Event::PathMtuChanged {
                peer,
                path_mtu: mtu,
            },
        );
    }

    /// Counts a send to `peer` that the kernel refused as larger than the link: the tunnel never
    /// fragments, so this is a fragmentation that was attempted and did not happen.
    pub fn handle_fragmentation_attempt(&mut self, peer: Ipv4Addr) {
        if let Some(p) = self.peers.iter_mut().find(|p| p.addrs.mgmt == peer) {
            p.counters.fragmentation_attempts += 1;
        }
    }

    /// Applies the timers due at `now`: SA lifetimes, path-MTU aging and probe schedules.
    pub fn handle_timeout(&mut self, now: Instant) {
        for p in &mut self.peers {
            if let Some(sa) = p.outbound.as_mut() {
                if let Some(crossing) = sa.state_mut().check_time(now) {
                    let spi = sa.state().spi();
                    if matches!(crossing, Crossing::Hard(_)) {
                        p.outbound = None;
                    }
                    push_event(
                        &mut self.events,
                        &mut self.counters,
                        crossing_event(crossing, p.addrs.mgmt, spi, Direction::Outbound),
                    );
                }
            }
            if p.raise_at.is_some_and(|t| t <= now) {
                p.raise_at = None;
                p.path_mtu = self.mtu;
                p.probe_at = Some(now);
                p.counters.pmtu_updates += 1;
                push_event(
                    &mut self.events,
                    &mut self.counters,
                    Event::PathMtuChanged {
                        peer: p.addrs.mgmt,
                        path_mtu: self.mtu,
                    },
                );
            }
        }
        let events = &mut self.events;
        let counters = &mut self.counters;
        self.inbound.retain(|_, e| {
            let Some(crossing) = e.sa.state_mut().check_time(now) else {
                return true;
            };
            push_event(
                events,
                counters,
                crossing_event(crossing, e.peer, e.sa.state().spi(), Direction::Inbound),
            );
            !matches!(crossing, Crossing::Hard(_))
        });
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) or
    /// [`poll_probe`](Self::poll_probe) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.iter().flat_map(|p| {
            [
                p.outbound
                    .as_ref()
                    .and_then(|sa| sa.state().next_deadline()),
                p.raise_at,
                p.probe_at,
            ]
        });
        let inbound = self.inbound.values().map(|e| e.sa.state().next_deadline());
        peers.chain(inbound).flatten().min()
    }

    /// A path-MTU probe due at `now`, written to `out`: an SA-protected packet of the peer's
    /// current path MTU with next header 59, which the peer verifies and discards. A path that
    /// cannot carry it answers with fragmentation-needed.
    pub fn poll_probe(&mut self, now: Instant, out: &mut [u8]) -> Option<Action> {
        let local = self.local.mgmt;
        for p in &mut self.peers {
            if p.probe_at.is_none_or(|t| t > now) {
                continue;
            }
            let Some(sa) = p.outbound.as_mut() else {
                p.probe_at = None;
                continue;
            };
            p.probe_at = Some(now + PROBE_INTERVAL);
            let protection = sa.state().protection();
            let filler = ZEROS.get(..protection.max_inner_len(p.path_mtu))?;
            let Ok(sealed) = sa.seal(local, p.addrs.mgmt, 0, PROTO_NONE, filler, out) else {
                continue;
            };
            p.counters.probes_sent += 1;
            if let Some(crossing) = sealed.crossing {
                let spi = sa.state().spi();
                if matches!(crossing, Crossing::Hard(_)) {
                    p.outbound = None;
                }
                push_event(
                    &mut self.events,
                    &mut self.counters,
                    crossing_event(crossing, p.addrs.mgmt, spi, Direction::Outbound),
                );
            }
            return Some(Action::WriteToNetwork {
                dst: p.addrs.mgmt,
                protection,
                len: sealed.len,
            });
        }
        None
    }

    /// The next event for the daemon.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The MTU the TUN should have: the largest inner packet that fits the smallest path MTU to
    /// any peer with an SA, so that the kernel's TCP never hands us a packet we cannot send.
    pub fn tun_mtu(&self) -> u16 {
        let inner = self
            .peers
            .iter()
            .filter_map(|p| {
                p.outbound
                    .as_ref()
                    .map(|sa| sa.state().protection().max_inner_len(p.path_mtu))
            })
            .min()
            .unwrap_or_else(|| Protection::Ah.max_inner_len(self.mtu));
        u16::try_from(inner).unwrap_or(u16::MAX)
    }

    /// The configured cluster-interface MTU, the upper bound of every path MTU.
    pub fn configured_mtu(&self) -> u16 {
        self.mtu
    }

    /// The status of one peer.
    pub fn peer_status(&self, mgmt: Ipv4Addr) -> Option<PeerStatus> {
        let p = self.peers.iter().find(|p| p.addrs.mgmt == mgmt)?;
        let sa_status = |s: &SaState| SaStatus {
            spi: s.spi(),
            protection: s.protection(),
            counters: s.counters(),
        };
        let mut inbound: Vec<(u64, SaStatus)> = self
            .inbound
            .values()
            .filter(|e| e.peer == mgmt)
            .map(|e| (e.order, sa_status(e.sa.state())))
            .collect();
        inbound.sort_by_key(|(order, _)| *order);
        Some(PeerStatus {
            addrs: p.addrs,
            path_mtu: p.path_mtu,
            outbound: p.outbound.as_ref().map(|sa| sa_status(sa.state())),
            inbound: inbound.into_iter().map(|(_, s)| s).collect(),
            counters: p.counters,
        })
    }

    /// The management addresses of all peers.
    pub fn peer_addrs(&self) -> impl Iterator<Item = PeerAddrs> + '_ {
        self.peers.iter().map(|p| p.addrs)
    }

    /// Drops no peer can be blamed for.
    pub fn counters(&self) -> GlobalCounters {
        self.counters
    }
}

fn crossing_event(crossing: Crossing, peer: Ipv4Addr, spi: u32, direction: Direction) -> Event {
    match crossing {
        Crossing::Soft(limit) => Event::RekeyNeeded {
            peer,
            spi,
            direction,
            limit,
        },
        Crossing::Hard(limit) => Event::SaExpired {
            peer,
            spi,
            direction,
            limit,
        },
    }
}

fn push_event(events: &mut VecDeque<Event>, counters: &mut GlobalCounters, event: Event) {
    if events.len() >= MAX_EVENTS {
        counters.events_dropped += 1;
    } else {
        events.push_back(event);
    }
}

/// ICMP types that are errors themselves: never answered with another error (RFC 1812 §4.3.2.7).
const ICMP_ERROR_TYPES: [u8; 5] = [3, 4, 5, 11, 12];

/// Whether an oversize packet may be answered: not a non-initial fragment, not an ICMP error.
fn wants_icmp_answer(h: &packet::Ipv4Header, packet: &[u8]) -> bool {
    if h.is_fragment
        && packet
            .get(6..8)
            .is_some_and(|f| u16::from_be_bytes([f[0], f[1]]) & 0x1fff != 0)
    {
        return false;
    }
    if h.protocol == PROTO_ICMP {
        return packet
            .get(h.header_len)
            .is_some_and(|t| !ICMP_ERROR_TYPES.contains(t));
    }
    true
}

/// Writes an ICMP destination-unreachable / fragmentation-needed (RFC 1191) about `offending`,
/// as if sent by the tunnel towards `from` (the overlay address the packet was for), so that the
/// local kernel lowers its path MTU for that destination.
fn write_frag_needed(
    from: Ipv4Addr,
    h: &packet::Ipv4Header,
    offending: &[u8],
    next_hop_mtu: u16,
    out: &mut [u8],
) -> Option<usize> {
    const ICMP_HEADER_LEN: usize = 8;
    let quoted = offending.get(..(h.header_len + 8).min(offending.len()))?;
    let total = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quoted.len();
    let out = out.get_mut(..total)?;
    let (head, icmp) = out.split_at_mut(IPV4_HEADER_LEN);
    icmp[0] = 3; // destination unreachable
    icmp[1] = 4; // fragmentation needed and DF set
    icmp[2..6].fill(0);
    icmp[6..8].copy_from_slice(&next_hop_mtu.to_be_bytes());
    icmp[ICMP_HEADER_LEN..].copy_from_slice(quoted);
    let sum = packet::checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let head: &mut [u8; IPV4_HEADER_LEN] = head.try_into().ok()?;
    packet::write_ipv4_header(
        head,
        &NewHeader {
            tos: 0xc0, // internetwork control
            total_len: u16::try_from(total).ok()?,
            id: 0,
            ttl: packet::OUTER_TTL,
            protocol: PROTO_ICMP,
            src: from,
            dst: h.src,
        },
    );
    Some(total)
}
