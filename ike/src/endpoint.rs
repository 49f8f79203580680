//! The endpoint: every phase-1 SA and Quick Mode exchange of one local address, the child SAs they
//! produced, and the timers that keep them alive (retransmission, rekey, DPD, expiry).
//!
//! Datagrams are matched to exchanges by cookies and message ID. Every exchange that a remote
//! peer can open is bounded in number; datagrams from addresses outside the peer list are counted
//! and dropped before anything is parsed or allocated.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::crypto::{self, DhKey};
use crate::exchange::{self, Flight, IkeSa, P1State, Quick, hash_of};
use crate::wire::{self, Chain, HEADER_LEN, Header, Malformed, Payloads};
use crate::{
    ChildDownReason, ChildKeys, EndpointConfig, EndpointCounters, Event, Failure, IKE_PORT,
    PeerConfig, PeerCounters, PeerState, Transmit,
};

/// Nonce length we send (RFC 2409 allows 8..256 bytes).
const NONCE_LEN: usize = 32;
/// Phase-1 SAs per peer in any state (two during a rekey, plus a collision).
const MAX_SAS_PER_PEER: usize = 4;
/// Half-open phase-1 exchanges per peer and in total. When a new MM1 finds them taken, the oldest
/// one the peer opened that is still at MM2 makes room: opening one takes nothing but the peer's
/// address, which anyone can forge, whereas going on to MM3 takes our cookie from MM2, i.e. being
/// the peer (or on its path). So a flood of forged MM1s keeps no real exchange out, and never
/// drops one that has reached MM3.
const MAX_HALF_OPEN_PER_PEER: usize = 2;
const MAX_HALF_OPEN: usize = 8;
/// Quick Mode exchanges per phase-1 SA, open or lingering.
const MAX_QUICK_PER_SA: usize = 4;
/// Child SA pairs per peer (one, plus one being replaced, plus a collision).
const MAX_CHILDREN_PER_PEER: usize = 4;
/// Datagrams waiting for the driver.
const MAX_QUEUED: usize = 256;
/// Make-before-break: how long an SA lives on after its replacement is up.
const GRACE: Duration = Duration::from_secs(5);
/// A responder's exchange that makes no progress is dropped after this.
const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// A finished Quick Mode exchange is kept this long to answer retransmissions of its last message.
const LINGER: Duration = Duration::from_secs(30);
/// Retry back-off limits for phase 1 and for child SAs.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Consecutive authentication failures after which this side stops initiating until the key
/// changes or the peer initiates (the peer's key is wrong; hammering it helps nobody).
const MAX_AUTH_ATTEMPTS: u32 = 3;
/// The phase-1 responder waits this long for the initiator's Quick Mode before starting its own.
const RESPONDER_CHILD_DELAY: Duration = Duration::from_secs(2);
/// Label of the bandwidth-update key derived from SKEYID_d.
const BANDWIDTH_LABEL: &[u8] = b"confmesh bandwidth updates udp 1719";

/// A child SA pair computed by Quick Mode, before it becomes [`Child`].
pub(crate) struct NewChild {
    outbound: ChildKeys,
    inbound: ChildKeys,
    lifetime: Duration,
    lifetime_kb: Option<u64>,
}

/// A child SA pair in force.
struct Child {
    inbound_spi: u32,
    outbound_spi: u32,
    created: Instant,
    rekey_at: Option<Instant>,
    expire_at: Instant,
    retire_at: Option<Instant>,
}

struct Peer {
    cfg: PeerConfig,
    port: u16,
    counters: PeerCounters,
    children: Vec<Child>,
    next_initiate: Option<Instant>,
    ike_backoff: Duration,
    auth_failures: u32,
    next_child: Option<Instant>,
    child_backoff: Duration,
    last_alive: Option<Instant>,
    next_dpd: Option<Instant>,
    dpd_seq: u32,
    initial_contact_sent: bool,
    /// Phase-1 restarts on INVALID-COOKIE since the last SA came up (the first is immediate).
    restarts: u32,
}

impl Peer {
    fn new(cfg: PeerConfig) -> Self {
        Self {
            cfg,
            port: IKE_PORT,
            counters: PeerCounters::default(),
            children: Vec::new(),
            next_initiate: None,
            ike_backoff: BACKOFF_MIN,
            auth_failures: 0,
            next_child: None,
            child_backoff: BACKOFF_MIN,
            last_alive: None,
            next_dpd: None,
            dpd_seq: 0,
            initial_contact_sent: false,
            restarts: 0,
        }
    }

    fn live_child(&self) -> Option<&Child> {
        self.children.iter().rev().find(|c| c.retire_at.is_none())
    }
}

/// All IKE state of one local address.
pub struct Endpoint {
    cfg: EndpointConfig,
    rng: ChaCha20Rng,
    peers: BTreeMap<Ipv4Addr, Peer>,
    sas: Vec<IkeSa>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    counters: EndpointCounters,
    /// Keys our responder cookies (RFC 2408 §2.5.3), so that a message of an exchange we no
    /// longer hold is recognised as the answer to one of ours.
    cookie_secret: Zeroizing<[u8; 32]>,
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn plain_message(icookie: [u8; 8], rcookie: [u8; 8], exchange: u8, chain: &Chain) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    let length = u32::try_from(HEADER_LEN + chain.buf.len()).unwrap_or(u32::MAX);
    Header {
        icookie,
        rcookie,
        next: chain.first(),
        exchange,
        flags: 0,
        msgid: 0,
        length,
    }
    .write(&mut out);
    out.extend_from_slice(&chain.buf);
    out
}

fn scaled(d: Duration, lo: f64, hi: f64, r: u32) -> Duration {
    let f = lo + (hi - lo) * f64::from(r) / f64::from(u32::MAX);
    d.mul_f64(f)
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl Endpoint {
    /// An endpoint with no peers. `seed` seeds the CSPRNG of cookies, nonces, SPIs and DH
    /// secrets: the driver passes 32 bytes from the OS, tests a fixed value for reproducibility.
    pub fn new(cfg: EndpointConfig, seed: [u8; 32]) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut cookie_secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut cookie_secret[..]);
        Self {
            cfg,
            rng,
            cookie_secret,
            peers: BTreeMap::new(),
            sas: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            counters: EndpointCounters::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &EndpointConfig {
        &self.cfg
    }

    /// Adds a peer, or updates one: a new pre-shared key starts a new phase 1 at once (the old SAs
    /// stay until it succeeds, so changing the key on one side first breaks nothing).
    pub fn set_peer(&mut self, now: Instant, cfg: PeerConfig) {
        let passive = self.cfg.passive;
        match self.peers.get_mut(&cfg.addr) {
            Some(p) => {
                let new_key = !ct_eq(&p.cfg.psk, &cfg.psk);
                p.cfg = cfg;
                if new_key {
                    p.auth_failures = 0;
                    p.ike_backoff = BACKOFF_MIN;
                    if !passive {
                        p.next_initiate = Some(now);
                    }
                }
            }
            None => {
                let mut p = Peer::new(cfg.clone());
                if !passive {
                    p.next_initiate = Some(now);
                }
                self.peers.insert(cfg.addr, p);
            }
        }
    }

    /// Removes a peer: DELETEs for its SAs are sent and its children reported down.
    pub fn remove_peer(&mut self, now: Instant, addr: Ipv4Addr) {
        self.close_peer(now, addr);
        self.peers.remove(&addr);
        self.sas.retain(|s| s.peer != addr);
    }

    /// Deletes every SA with every peer (the daemon stops); peers stay configured.
    pub fn shutdown(&mut self, now: Instant) {
        let addrs: Vec<Ipv4Addr> = self.peers.keys().copied().collect();
        for a in addrs {
            self.close_peer(now, a);
            if let Some(p) = self.peers.get_mut(&a) {
                p.next_initiate = None;
                p.next_child = None;
                p.next_dpd = None;
            }
        }
        self.sas.clear();
    }

    /// Rekeys the peer's current child SA now: the dataplane saw its packet or byte soft limit.
    pub fn rekey_child(&mut self, now: Instant, addr: Ipv4Addr) {
        if let Some(p) = self.peers.get_mut(&addr) {
            if p.live_child().is_some() && !self.cfg.passive {
                p.next_child = Some(now);
            }
        }
    }

    /// The peer's state and counters.
    pub fn peer_state(&self, addr: Ipv4Addr) -> Option<PeerState> {
        let p = self.peers.get(&addr)?;
        let sas = || self.sas.iter().filter(move |s| s.peer == addr);
        Some(PeerState {
            ike_established: sas().any(|s| s.is_established()),
            children: p.children.len(),
            exchanges_in_progress: sas().filter(|s| !s.is_established()).count()
                + sas()
                    .flat_map(|s| s.quick.iter())
                    .filter(|q| q.open)
                    .count(),
            counters: p.counters,
        })
    }

    /// Endpoint-wide counters.
    pub fn counters(&self) -> EndpointCounters {
        self.counters
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = None;
        for s in &self.sas {
            t = min_opt(t, s.flight.resend_at);
            if !s.is_established() && !s.initiator {
                t = min_opt(t, Some(s.created + HALF_OPEN_TIMEOUT));
            }
            t = min_opt(t, s.rekey_at.filter(|_| !self.cfg.passive));
            t = min_opt(t, s.retire_at);
            t = min_opt(t, s.expire_at);
            for q in &s.quick {
                t = min_opt(t, q.flight.resend_at);
                t = min_opt(t, Some(q.expires));
            }
        }
        for p in self.peers.values() {
            t = min_opt(t, p.next_initiate);
            t = min_opt(t, p.next_child);
            t = min_opt(t, p.next_dpd);
            for c in &p.children {
                t = min_opt(t, c.rekey_at.filter(|_| !self.cfg.passive));
                t = min_opt(t, c.retire_at);
                t = min_opt(t, Some(c.expire_at));
            }
        }
        t
    }

    /// Takes one datagram received on UDP 500 from `from`.
    pub fn handle(&mut self, now: Instant, from: SocketAddrV4, data: &[u8]) {
        let ip = *from.ip();
        let Some(peer) = self.peers.get_mut(&ip) else {
            self.counters.unknown_source += 1;
            return;
        };
        peer.counters.datagrams_in += 1;
        peer.port = from.port();
        let Ok(h) = Header::parse(data) else {
            peer.counters.malformed += 1;
            return;
        };
        let r = match h.exchange {
            wire::EXCH_MAIN => self.on_main(now, ip, &h, data),
            wire::EXCH_QUICK => self.on_quick(now, ip, &h, data),
            wire::EXCH_INFO => self.on_info(now, ip, &h, data),
            _ => {
                // Aggressive Mode (and anything else) is never accepted.
                self.counters.refused_exchange += 1;
                Ok(())
            }
        };
        if r.is_err() {
            if let Some(p) = self.peers.get_mut(&ip) {
                p.counters.malformed += 1;
            }
        }
    }

    /// Runs every timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.run_retransmits(now);
        self.run_sa_timers(now);
        self.run_child_timers(now);
        self.run_peer_timers(now);
    }

    // ---- sending ----

    fn send(&mut self, ip: Ipv4Addr, payload: Vec<u8>) {
        let Some(p) = self.peers.get_mut(&ip) else {
            return;
        };
        p.counters.datagrams_out += 1;
        if self.out.len() >= MAX_QUEUED {
            self.out.pop_front();
        }
        self.out.push_back(Transmit {
            dst: SocketAddrV4::new(ip, p.port),
            payload,
        });
    }

    fn send_plain_notify(&mut self, ip: Ipv4Addr, icookie: [u8; 8], rcookie: [u8; 8], kind: u16) {
        let mut c = Chain::new();
        c.push(
            wire::PL_NOTIFY,
            &wire::notify_body(wire::PROTO_ISAKMP, &[], kind, &[]),
        );
        let msg = plain_message(icookie, rcookie, wire::EXCH_INFO, &c);
        self.send(ip, msg);
    }

    /// Sends an informational exchange under SA `i` (hash-protected, encrypted, not retransmitted).
    fn send_info(&mut self, i: usize, rest: &Chain) {
        let msgid = self.nonzero_u32();
        let sa = &self.sas[i];
        let Some(hash) = sa.hash_a(&[&msgid.to_be_bytes(), &rest.buf]) else {
            return;
        };
        let chain = exchange::with_hash(&hash[..], rest);
        let iv = sa.exchange_iv(msgid);
        let Some((msg, _)) = sa.seal(wire::EXCH_INFO, msgid, &chain, &iv) else {
            return;
        };
        let ip = sa.peer;
        self.send(ip, msg);
    }

    fn send_delete_ike(&mut self, i: usize) {
        let mut spi = [0u8; 16];
        spi[..8].copy_from_slice(&self.sas[i].icookie);
        spi[8..].copy_from_slice(&self.sas[i].rcookie);
        let mut c = Chain::new();
        c.push(
            wire::PL_DELETE,
            &wire::delete_body(wire::PROTO_ISAKMP, &spi),
        );
        self.send_info(i, &c);
        if let Some(p) = self.peers.get_mut(&self.sas[i].peer) {
            p.counters.deletes_sent += 1;
        }
    }

    fn send_delete_child(&mut self, ip: Ipv4Addr, inbound_spi: u32) {
        let Some(i) = self.current_sa(ip) else { return };
        let mut c = Chain::new();
        c.push(
            wire::PL_DELETE,
            &wire::delete_body(
                self.cfg.protection.protocol_id(),
                &inbound_spi.to_be_bytes(),
            ),
        );
        self.send_info(i, &c);
        if let Some(p) = self.peers.get_mut(&ip) {
            p.counters.deletes_sent += 1;
        }
    }

    fn send_notify_protected(&mut self, i: usize, protocol: u8, kind: u16, data: &[u8]) {
        let sa = &self.sas[i];
        let mut spi = [0u8; 16];
        spi[..8].copy_from_slice(&sa.icookie);
        spi[8..].copy_from_slice(&sa.rcookie);
        let spi: &[u8] = if protocol == wire::PROTO_ISAKMP {
            &spi
        } else {
            &[]
        };
        let mut c = Chain::new();
        c.push(
            wire::PL_NOTIFY,
            &wire::notify_body(protocol, spi, kind, data),
        );
        self.send_info(i, &c);
    }

    // ---- randomness ----

    fn nonzero_u32(&mut self) -> u32 {
        loop {
            let v = self.rng.next_u32();
            if v != 0 {
                return v;
            }
        }
    }

    fn random_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn cookie(&mut self) -> [u8; 8] {
        loop {
            let mut c = [0u8; 8];
            self.rng.fill_bytes(&mut c);
            if c != [0; 8] {
                return c;
            }
        }
    }

    /// Our cookie as responder to `icookie` from `ip`: a keyed hash of the two, the same for a
    /// repeated MM1 (an exchange evicted before its MM3 comes back under the same cookies).
    fn responder_cookie(&self, ip: Ipv4Addr, icookie: &[u8; 8]) -> [u8; 8] {
        let h = crypto::prf(
            &self.cookie_secret[..],
            &[b"responder cookie", &ip.octets(), icookie],
        );
        let mut c = [0u8; 8];
        c.copy_from_slice(&h[..8]);
        if c == [0; 8] {
            c[7] = 1;
        }
        c
    }

    fn fresh_spi(&mut self) -> u32 {
        loop {
            let s = self.rng.next_u32();
            let used = self
                .peers
                .values()
                .flat_map(|p| p.children.iter())
                .any(|c| c.inbound_spi == s)
                || self
                    .sas
                    .iter()
                    .flat_map(|sa| sa.quick.iter())
                    .any(|q| q.my_spi == s);
            // SPIs 1-255 are reserved (RFC 4302 §2.4).
            if s > 255 && !used {
                return s;
            }
        }
    }

    // ---- lookups ----

    /// The newest established phase-1 SA with the peer that is not being retired.
    fn current_sa(&self, ip: Ipv4Addr) -> Option<usize> {
        self.sas
            .iter()
            .enumerate()
            .filter(|(_, s)| s.peer == ip && s.is_established() && s.retire_at.is_none())
            .max_by_key(|(_, s)| s.established)
            .map(|(i, _)| i)
    }

    fn find_sa(&self, ip: Ipv4Addr, icookie: &[u8; 8], rcookie: &[u8; 8]) -> Option<usize> {
        self.sas
            .iter()
            .position(|s| s.peer == ip && s.icookie == *icookie && s.rcookie == *rcookie)
    }

    /// Whether a Quick Mode exchange with the peer is open under any of its SAs, one we started
    /// (`initiator`) or one the peer started.
    fn peer_quick_open(&self, ip: Ipv4Addr, initiator: bool) -> bool {
        self.sas
            .iter()
            .filter(|s| s.peer == ip)
            .flat_map(|s| s.quick.iter())
            .any(|q| q.open && q.initiator == initiator)
    }

    fn initiating(&self, ip: Ipv4Addr) -> Option<usize> {
        self.sas
            .iter()
            .position(|s| s.peer == ip && s.initiator && !s.is_established())
    }

    /// Re-sends the last message of an exchange because the peer repeated its own.
    fn resend_flight(&mut self, ip: Ipv4Addr, msg: Vec<u8>) {
        if msg.is_empty() {
            return;
        }
        if let Some(p) = self.peers.get_mut(&ip) {
            p.counters.retransmits += 1;
        }
        self.send(ip, msg);
    }

    // ---- Main Mode ----

    fn start_main(&mut self, now: Instant, ip: Ipv4Addr) {
        if self.initiating(ip).is_some() || !self.make_room(ip, false) {
            return;
        }
        let icookie = self.cookie();
        let mut sa = IkeSa::new(ip, true, icookie, now, self.cfg.ike_lifetime);
        let transform = wire::p1_transform(self.cfg.group.id(), self.cfg.ike_lifetime.as_secs());
        sa.sai_b = wire::sa_body(1, wire::PROTO_ISAKMP, &[], &transform);
        let mut c = Chain::new();
        c.push(wire::PL_SA, &sa.sai_b)
            .push(wire::PL_VID, &wire::DPD_VID);
        let msg = plain_message(icookie, [0; 8], wire::EXCH_MAIN, &c);
        sa.flight
            .send(msg.clone(), now, Some(self.cfg.retransmit_timeout));
        self.sas.push(sa);
        self.send(ip, msg);
    }

    fn on_main(
        &mut self,
        now: Instant,
        ip: Ipv4Addr,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        if h.rcookie == [0; 8] {
            if h.flags & wire::FLAG_ENC != 0 {
                return Err(Malformed);
            }
            if let Some(i) = self
                .sas
                .iter()
                .position(|s| s.peer == ip && !s.initiator && s.icookie == h.icookie)
            {
                return self.repeat_or_reject(i, data);
            }
            return self.on_mm1(now, ip, h, data);
        }
        let i = match self.find_sa(ip, &h.icookie, &h.rcookie) {
            Some(i) => i,
            None => {
                let Some(i) = self.sas.iter().position(|s| {
                    s.peer == ip
                        && s.initiator
                        && s.icookie == h.icookie
                        && s.state == P1State::Mm1Sent
                }) else {
                    // An MM3 of an exchange we answered and no longer hold (evicted, or timed out
                    // at MM2): say so, and the initiator starts again at once instead of when its
                    // retransmissions run out. Only the peer (or its path) knows our cookie.
                    // Later messages are not answered: an exchange that failed authentication is
                    // gone too, and its initiator must count that failure, not start again.
                    let mm3 = h.flags & wire::FLAG_ENC == 0;
                    if mm3 && ct_eq(&self.responder_cookie(ip, &h.icookie), &h.rcookie) {
                        self.send_plain_notify(ip, h.icookie, h.rcookie, wire::N_INVALID_COOKIE);
                    }
                    return Err(Malformed);
                };
                self.sas[i].rcookie = h.rcookie;
                i
            }
        };
        if self.sas[i].flight.last_in == hash_of(data) {
            return self.repeat_or_reject(i, data);
        }
        match self.sas[i].state {
            P1State::Mm1Sent => self.on_mm2(now, i, h, data),
            P1State::Mm2Sent => self.on_mm3(now, i, h, data),
            P1State::Mm3Sent => self.on_mm4(now, i, h, data),
            P1State::Mm4Sent => self.on_mm5(now, i, h, data),
            P1State::Mm5Sent => self.on_mm6(now, i, h, data),
            P1State::Established => Err(Malformed),
        }
    }

    /// The peer repeated its last message: ours was lost, send it again.
    fn repeat_or_reject(&mut self, i: usize, data: &[u8]) -> Result<(), Malformed> {
        if self.sas[i].flight.last_in != hash_of(data) {
            return Err(Malformed);
        }
        let msg = self.sas[i].flight.sent.clone();
        let ip = self.sas[i].peer;
        self.resend_flight(ip, msg);
        Ok(())
    }

    /// Makes room for one more phase-1 exchange with `ip` within the bounds (half open per peer
    /// and in total, SAs per peer), evicting responder exchanges still at MM2, oldest first.
    /// `responder`: the room is for the peer's MM1, and our own half-open exchange with it does
    /// not count if it yields to the peer's (we are the higher address). `false`: no room, every
    /// exchange in the way has gone further.
    fn make_room(&mut self, ip: Ipv4Addr, responder: bool) -> bool {
        let yields = |s: &IkeSa| {
            responder && s.peer == ip && s.initiator && !s.is_established() && self.cfg.local > ip
        };
        loop {
            let counted = || self.sas.iter().filter(|s| !yields(s));
            let half_open_peer = counted()
                .filter(|s| s.peer == ip && !s.is_established())
                .count();
            let of_peer = counted().filter(|s| s.peer == ip).count();
            let half_open = counted().filter(|s| !s.is_established()).count();
            let peer_full = of_peer >= MAX_SAS_PER_PEER
                || (responder && half_open_peer >= MAX_HALF_OPEN_PER_PEER);
            let all_full = responder && half_open >= MAX_HALF_OPEN;
            if !peer_full && !all_full {
                return true;
            }
            let victim = self
                .sas
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    !s.initiator && s.state == P1State::Mm2Sent && (!peer_full || s.peer == ip)
                })
                .min_by_key(|(_, s)| s.created)
                .map(|(i, _)| i);
            let Some(v) = victim else { return false };
            let gone = self.sas.remove(v);
            if let Some(p) = self.peers.get_mut(&gone.peer) {
                p.counters.half_open_evicted += 1;
            }
        }
    }

    fn on_mm1(
        &mut self,
        now: Instant,
        ip: Ipv4Addr,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        // Both sides initiated at once: the lower address's exchange goes on, the other is
        // dropped. The lower side repeats its MM1 at once, so that the higher side sees it now
        // rather than at our next retransmission: ours, however recent, may have reached the peer
        // before its daemon listened (both started together). At most once per half
        // retransmission timeout, since anyone can send an MM1 from the peer's address.
        if let Some(own) = self.initiating(ip) {
            if self.cfg.local < ip {
                let rto = self.cfg.retransmit_timeout;
                let sa = &mut self.sas[own];
                let throttled = sa.mm1_repeated_at.is_some_and(|t| now < t + rto / 2);
                if sa.state == P1State::Mm1Sent && !throttled {
                    sa.mm1_repeated_at = Some(now);
                    sa.flight.tries = 1;
                    sa.flight.resend_at = Some(now + rto);
                    let msg = sa.flight.sent.clone();
                    self.resend_flight(ip, msg);
                }
                return Ok(());
            }
        }
        let mut sa_payload = None;
        let mut peer_dpd = false;
        for p in Payloads::new(data, HEADER_LEN, h.next).take(16) {
            let p = p?;
            match p.kind {
                wire::PL_SA => sa_payload = Some(p.body),
                wire::PL_VID if p.body == wire::DPD_VID => peer_dpd = true,
                _ => {}
            }
        }
        let sa_b = sa_payload.ok_or(Malformed)?;
        let mut chosen = None;
        'outer: for prop in wire::proposals(sa_b)?.take(16) {
            let prop = prop?;
            if prop.protocol != wire::PROTO_ISAKMP {
                continue;
            }
            for t in prop.transforms().take(32) {
                let t = t?;
                let offer = wire::p1_offer(&t)?;
                if offer.acceptable_suite && offer.group == self.cfg.group.id() {
                    chosen = Some((prop.number, t.echo(), offer.life_secs));
                    break 'outer;
                }
            }
        }
        let Some((number, transform, life)) = chosen else {
            self.send_plain_notify(ip, h.icookie, [0; 8], wire::N_NO_PROPOSAL_CHOSEN);
            self.refused(ip, Failure::NoProposalChosen { by_peer: false });
            return Ok(());
        };
        if !self.make_room(ip, true) {
            self.counters.half_open_refused += 1;
            return Ok(());
        }
        // We are the higher address: our own exchange yields to the peer's.
        if let Some(own) = self.initiating(ip) {
            self.sas.remove(own);
        }
        let lifetime = life.map_or(self.cfg.ike_lifetime, |s| {
            Duration::from_secs(s).min(self.cfg.ike_lifetime)
        });
        let mut sa = IkeSa::new(ip, false, h.icookie, now, lifetime);
        sa.rcookie = self.responder_cookie(ip, &h.icookie);
        sa.sai_b = sa_b.to_vec();
        sa.peer_dpd = peer_dpd;
        let mut c = Chain::new();
        c.push(
            wire::PL_SA,
            &wire::sa_body(number, wire::PROTO_ISAKMP, &[], &transform),
        )
        .push(wire::PL_VID, &wire::DPD_VID);
        let msg = plain_message(sa.icookie, sa.rcookie, wire::EXCH_MAIN, &c);
        // MM2 is sent again only when MM1 is: the initiator retransmits, and a forged MM1 must
        // not make us send more than one datagram.
        sa.flight.send(msg.clone(), now, None);
        sa.flight.last_in = hash_of(data);
        self.sas.push(sa);
        self.send(ip, msg);
        Ok(())
    }

    fn on_mm2(&mut self, now: Instant, i: usize, h: &Header, data: &[u8]) -> Result<(), Malformed> {
        let mut ok = false;
        let mut life = None;
        for p in Payloads::new(data, HEADER_LEN, h.next).take(16) {
            let p = p?;
            match p.kind {
                wire::PL_SA => {
                    let prop = wire::proposals(p.body)?.next().ok_or(Malformed)??;
                    let t = prop.transforms().next().ok_or(Malformed)??;
                    let offer = wire::p1_offer(&t)?;
                    ok = prop.protocol == wire::PROTO_ISAKMP
                        && offer.acceptable_suite
                        && offer.group == self.cfg.group.id();
                    life = offer.life_secs;
                }
                wire::PL_VID if p.body == wire::DPD_VID => self.sas[i].peer_dpd = true,
                _ => {}
            }
        }
        if !ok {
            return Err(Malformed);
        }
        if let Some(s) = life {
            let sa = &mut self.sas[i];
            sa.lifetime = sa.lifetime.min(Duration::from_secs(s));
        }
        let dh = DhKey::generate(self.cfg.group, &mut self.rng);
        let ni = self.random_bytes(NONCE_LEN);
        let sa = &mut self.sas[i];
        sa.gxi = dh.public().to_vec();
        sa.dh = Some(dh);
        sa.ni = ni;
        let mut c = Chain::new();
        c.push(wire::PL_KE, &sa.gxi).push(wire::PL_NONCE, &sa.ni);
        let msg = plain_message(sa.icookie, sa.rcookie, wire::EXCH_MAIN, &c);
        sa.flight
            .send(msg.clone(), now, Some(self.cfg.retransmit_timeout));
        sa.flight.last_in = hash_of(data);
        sa.state = P1State::Mm3Sent;
        let ip = sa.peer;
        self.send(ip, msg);
        Ok(())
    }

    /// KE and nonce of MM3/MM4.
    fn ke_nonce<'a>(&self, h: &Header, data: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), Malformed> {
        let (mut ke, mut nonce) = (None, None);
        for p in Payloads::new(data, HEADER_LEN, h.next).take(16) {
            let p = p?;
            match p.kind {
                wire::PL_KE => ke = Some(p.body),
                wire::PL_NONCE => nonce = Some(p.body),
                _ => {}
            }
        }
        let (ke, nonce) = (ke.ok_or(Malformed)?, nonce.ok_or(Malformed)?);
        if ke.len() != self.cfg.group.public_len() || !(8..=256).contains(&nonce.len()) {
            return Err(Malformed);
        }
        Ok((ke, nonce))
    }

    fn on_mm3(&mut self, now: Instant, i: usize, h: &Header, data: &[u8]) -> Result<(), Malformed> {
        let (ke, nonce) = self.ke_nonce(h, data)?;
        let dh = DhKey::generate(self.cfg.group, &mut self.rng);
        let Ok(gxy) = dh.agree(ke) else {
            self.fail_sa(now, i, Failure::InvalidKeyExchange);
            return Ok(());
        };
        let nr = self.random_bytes(NONCE_LEN);
        let ip = self.sas[i].peer;
        let psk = self
            .peers
            .get(&ip)
            .map(|p| p.cfg.psk.clone())
            .ok_or(Malformed)?;
        let sa = &mut self.sas[i];
        sa.gxi = ke.to_vec();
        sa.ni = nonce.to_vec();
        sa.gxr = dh.public().to_vec();
        sa.nr = nr;
        sa.derive_keys(&psk, &gxy);
        let mut c = Chain::new();
        c.push(wire::PL_KE, &sa.gxr).push(wire::PL_NONCE, &sa.nr);
        let msg = plain_message(sa.icookie, sa.rcookie, wire::EXCH_MAIN, &c);
        sa.flight
            .send(msg.clone(), now, Some(self.cfg.retransmit_timeout));
        sa.flight.last_in = hash_of(data);
        sa.state = P1State::Mm4Sent;
        self.send(ip, msg);
        Ok(())
    }

    fn on_mm4(&mut self, now: Instant, i: usize, h: &Header, data: &[u8]) -> Result<(), Malformed> {
        let (ke, nonce) = self.ke_nonce(h, data)?;
        let ip = self.sas[i].peer;
        let gxy = match self.sas[i].dh.as_ref().map(|dh| dh.agree(ke)) {
            Some(Ok(g)) => g,
            Some(Err(_)) => {
                self.fail_sa(now, i, Failure::InvalidKeyExchange);
                return Ok(());
            }
            None => return Err(Malformed),
        };
        let (psk, initial_contact) = {
            let p = self.peers.get_mut(&ip).ok_or(Malformed)?;
            let ic = !p.initial_contact_sent;
            p.initial_contact_sent = true;
            (p.cfg.psk.clone(), ic)
        };
        let local = self.cfg.local;
        let sa = &mut self.sas[i];
        sa.gxr = ke.to_vec();
        sa.nr = nonce.to_vec();
        sa.dh = None;
        sa.derive_keys(&psk, &gxy);
        let id = wire::id_body(local);
        let hash_i = sa.auth_hash(true, &id).ok_or(Malformed)?;
        let mut c = Chain::new();
        c.push(wire::PL_ID, &id).push(wire::PL_HASH, &hash_i[..]);
        if initial_contact {
            let mut spi = [0u8; 16];
            spi[..8].copy_from_slice(&sa.icookie);
            spi[8..].copy_from_slice(&sa.rcookie);
            c.push(
                wire::PL_NOTIFY,
                &wire::notify_body(wire::PROTO_ISAKMP, &spi, wire::N_INITIAL_CONTACT, &[]),
            );
        }
        let iv = sa.iv;
        let (msg, next_iv) = sa.seal(wire::EXCH_MAIN, 0, &c, &iv).ok_or(Malformed)?;
        sa.iv = next_iv;
        sa.flight
            .send(msg.clone(), now, Some(self.cfg.retransmit_timeout));
        sa.flight.last_in = hash_of(data);
        sa.state = P1State::Mm5Sent;
        self.send(ip, msg);
        Ok(())
    }

    /// Decrypts MM5/MM6 and checks the peer's identity and HASH_I/HASH_R. `None`: authentication
    /// failed (with the wrong key the plaintext is noise, so a parse error means the same).
    fn verify_mm56(&self, i: usize, h: &Header, data: &[u8]) -> Result<([u8; 16], bool), Failure> {
        let sa = &self.sas[i];
        if h.flags & wire::FLAG_ENC == 0 {
            return Err(Failure::AuthenticationFailed);
        }
        let (plain, next_iv) = sa.open(data, &sa.iv).ok_or(Failure::AuthenticationFailed)?;
        let (mut id, mut hash, mut initial_contact) = (None, None, false);
        for p in Payloads::new(&plain, 0, h.next).take(16) {
            let p = p.map_err(|_| Failure::AuthenticationFailed)?;
            match p.kind {
                wire::PL_ID => id = Some(p.body),
                wire::PL_HASH => hash = Some(p.body),
                wire::PL_NOTIFY
                    if wire::notify(p.body).is_ok_and(|n| n.kind == wire::N_INITIAL_CONTACT) =>
                {
                    initial_contact = true;
                }
                _ => {}
            }
        }
        let (id, hash) = (
            id.ok_or(Failure::AuthenticationFailed)?,
            hash.ok_or(Failure::AuthenticationFailed)?,
        );
        let expected = sa
            .auth_hash(!sa.initiator, id)
            .ok_or(Failure::AuthenticationFailed)?;
        if !ct_eq(&expected[..], hash) {
            return Err(Failure::AuthenticationFailed);
        }
        if wire::id_addr(id) != Some(sa.peer) {
            return Err(Failure::InvalidId);
        }
        Ok((next_iv, initial_contact))
    }

    fn on_mm5(&mut self, now: Instant, i: usize, h: &Header, data: &[u8]) -> Result<(), Malformed> {
        let (next_iv, initial_contact) = match self.verify_mm56(i, h, data) {
            Ok(v) => v,
            Err(reason) => {
                let (ip, ic, rc) = (self.sas[i].peer, self.sas[i].icookie, self.sas[i].rcookie);
                let kind = if reason == Failure::InvalidId {
                    wire::N_INVALID_ID_INFORMATION
                } else {
                    wire::N_AUTHENTICATION_FAILED
                };
                self.send_plain_notify(ip, ic, rc, kind);
                self.fail_sa(now, i, reason);
                return Ok(());
            }
        };
        let local = self.cfg.local;
        let sa = &mut self.sas[i];
        sa.iv = next_iv;
        let id = wire::id_body(local);
        let hash_r = sa.auth_hash(false, &id).ok_or(Malformed)?;
        let mut c = Chain::new();
        c.push(wire::PL_ID, &id).push(wire::PL_HASH, &hash_r[..]);
        let iv = sa.iv;
        let (msg, next_iv) = sa.seal(wire::EXCH_MAIN, 0, &c, &iv).ok_or(Malformed)?;
        // The last CBC block of phase 1 seeds the IVs of every later exchange.
        sa.iv = next_iv;
        sa.flight.send(msg.clone(), now, None);
        sa.flight.last_in = hash_of(data);
        let ip = sa.peer;
        self.send(ip, msg);
        self.established(now, i, initial_contact);
        Ok(())
    }

    fn on_mm6(&mut self, now: Instant, i: usize, h: &Header, data: &[u8]) -> Result<(), Malformed> {
        match self.verify_mm56(i, h, data) {
            Ok((next_iv, initial_contact)) => {
                let sa = &mut self.sas[i];
                sa.iv = next_iv;
                sa.flight.finish(data);
                self.established(now, i, initial_contact);
            }
            Err(reason) => self.fail_sa(now, i, reason),
        }
        Ok(())
    }

    fn established(&mut self, now: Instant, i: usize, initial_contact: bool) {
        let r = self.rng.next_u32();
        let (ip, ic, rc) = (self.sas[i].peer, self.sas[i].icookie, self.sas[i].rcookie);
        if initial_contact {
            self.peer_restarted(i);
        }
        let Some(i) = self.find_sa(ip, &ic, &rc) else {
            return;
        };
        let sa = &mut self.sas[i];
        sa.state = P1State::Established;
        sa.established = Some(now);
        sa.expire_at = Some(now + sa.lifetime);
        let (lo, hi) = if sa.initiator {
            (0.80, 0.90)
        } else {
            (0.90, 0.95)
        };
        sa.rekey_at = Some(now + scaled(sa.lifetime, lo, hi, r));
        sa.dh = None;
        let (icookie, rcookie, initiator) = (sa.icookie, sa.rcookie, sa.initiator);
        let Some(keys) = sa.keys.as_ref() else { return };
        let enc_key = Zeroizing::new(*keys.e);
        let bandwidth_key = crypto::prf(&keys.d[..], &[BANDWIDTH_LABEL, &icookie, &rcookie]);
        let established_at = sa.established;
        // Older SAs with this peer are replaced: DELETE them after the grace period.
        for s in self.sas.iter_mut() {
            if s.peer == ip
                && s.is_established()
                && s.established < established_at
                && s.retire_at.is_none()
            {
                s.retire_at = Some(now + GRACE);
            }
        }
        let passive = self.cfg.passive;
        let dpd = self.cfg.dpd_interval;
        if let Some(p) = self.peers.get_mut(&ip) {
            p.counters.ike_established += 1;
            p.ike_backoff = BACKOFF_MIN;
            p.auth_failures = 0;
            p.restarts = 0;
            p.last_alive = Some(now);
            p.next_dpd = Some(now + dpd);
            p.next_initiate = None;
            let rekey_due = p
                .live_child()
                .is_some_and(|c| c.rekey_at.is_some_and(|t| t <= now));
            if (p.live_child().is_none() || rekey_due) && !passive {
                p.next_child = Some(if initiator {
                    now
                } else {
                    now + RESPONDER_CHILD_DELAY
                });
            }
        }
        self.events.push_back(Event::IkeUp {
            peer: ip,
            icookie,
            rcookie,
            enc_key,
            bandwidth_key,
        });
    }

    /// INITIAL-CONTACT: the peer restarted, so every other SA with it is gone on its side.
    fn peer_restarted(&mut self, keep: usize) {
        let ip = self.sas[keep].peer;
        let (ic, rc) = (self.sas[keep].icookie, self.sas[keep].rcookie);
        let before = self.sas.len();
        let had_established = self.sas.iter().any(|s| s.peer == ip && s.is_established());
        self.sas
            .retain(|s| s.peer != ip || (s.icookie == ic && s.rcookie == rc));
        if had_established && self.sas.len() != before {
            self.events.push_back(Event::IkeDown { peer: ip });
        }
        self.drop_children(ip, ChildDownReason::PeerRestarted);
    }

    fn drop_children(&mut self, ip: Ipv4Addr, reason: ChildDownReason) {
        let protection = self.cfg.protection;
        if let Some(p) = self.peers.get_mut(&ip) {
            for c in p.children.drain(..) {
                self.events.push_back(Event::ChildDown {
                    peer: ip,
                    protection,
                    inbound_spi: c.inbound_spi,
                    outbound_spi: c.outbound_spi,
                    reason,
                });
            }
        }
    }

    fn refused(&mut self, ip: Ipv4Addr, reason: Failure) {
        if let Some(p) = self.peers.get_mut(&ip) {
            p.counters.proposals_refused += 1;
        }
        self.events.push_back(Event::Failed { peer: ip, reason });
    }

    /// Our phase-1 exchange `i` is gone on the peer's side: start a new one, at once the first
    /// time, then with the usual back-off (a peer that keeps forgetting us is not hammered).
    fn restart_main(&mut self, now: Instant, i: usize) {
        let sa = self.sas.remove(i);
        let passive = self.cfg.passive;
        if let Some(p) = self.peers.get_mut(&sa.peer) {
            p.counters.restarted += 1;
            if !passive {
                if p.restarts == 0 {
                    p.next_initiate = Some(now);
                } else {
                    p.next_initiate = Some(now + p.ike_backoff);
                    p.ike_backoff = (p.ike_backoff * 2).min(BACKOFF_MAX);
                }
            }
            p.restarts += 1;
        }
    }

    /// A phase-1 exchange failed: forget it, report it, and schedule the next attempt.
    fn fail_sa(&mut self, now: Instant, i: usize, reason: Failure) {
        let sa = self.sas.remove(i);
        let passive = self.cfg.passive;
        if let Some(p) = self.peers.get_mut(&sa.peer) {
            match reason {
                Failure::AuthenticationFailed => {
                    p.counters.auth_failures += 1;
                    p.auth_failures += 1;
                }
                Failure::Timeout => p.counters.timeouts += 1,
                Failure::NoProposalChosen { .. } => p.counters.proposals_refused += 1,
                _ => {}
            }
            if sa.initiator && !passive && p.auth_failures < MAX_AUTH_ATTEMPTS {
                p.next_initiate = Some(now + p.ike_backoff);
                p.ike_backoff = (p.ike_backoff * 2).min(BACKOFF_MAX);
            }
        }
        self.events.push_back(Event::Failed {
            peer: sa.peer,
            reason,
        });
    }

    // ---- Quick Mode ----

    /// Starts a Quick Mode exchange; `false` if it cannot start now (try again later).
    fn start_quick(&mut self, now: Instant, ip: Ipv4Addr) -> bool {
        let Some(i) = self.current_sa(ip) else {
            return false;
        };
        // One of ours at a time, under whichever SA (the peer relies on it, see `on_qm1`).
        if self.peer_quick_open(ip, true) {
            return true;
        }
        // Lingering exchanges make room as they expire.
        if self.sas[i].quick.len() >= MAX_QUICK_PER_SA {
            self.sas[i].quick.retain(|q| q.open);
            if self.sas[i].quick.len() >= MAX_QUICK_PER_SA {
                return false;
            }
        }
        let Some(peer) = self.peers.get(&ip) else {
            return false;
        };
        let peer_overlay = peer.cfg.overlay;
        let msgid = self.nonzero_u32();
        let my_spi = self.fresh_spi();
        let ni = self.random_bytes(NONCE_LEN);
        let dh = DhKey::generate(self.cfg.group, &mut self.rng);
        let proto = self.cfg.protection.protocol_id();
        let transform = wire::p2_transform(
            proto,
            self.cfg.group.id(),
            self.cfg.child_lifetime.as_secs(),
            self.cfg.child_lifetime_kb,
        );
        let mut rest = Chain::new();
        rest.push(
            wire::PL_SA,
            &wire::sa_body(1, proto, &my_spi.to_be_bytes(), &transform),
        )
        .push(wire::PL_NONCE, &ni)
        .push(wire::PL_KE, dh.public())
        .push(wire::PL_ID, &wire::id_body(self.cfg.local_overlay))
        .push(wire::PL_ID, &wire::id_body(peer_overlay));
        let sa = &self.sas[i];
        let Some(hash) = sa.hash_a(&[&msgid.to_be_bytes(), &rest.buf]) else {
            return false;
        };
        let chain = exchange::with_hash(&hash[..], &rest);
        let iv = sa.exchange_iv(msgid);
        let Some((msg, next_iv)) = sa.seal(wire::EXCH_QUICK, msgid, &chain, &iv) else {
            return false;
        };
        let mut flight = Flight::new();
        flight.send(msg.clone(), now, Some(self.cfg.retransmit_timeout));
        self.sas[i].quick.push(Quick {
            msgid,
            initiator: true,
            open: true,
            iv: next_iv,
            ni,
            nr: Vec::new(),
            dh: Some(dh),
            my_spi,
            pending: None,
            flight,
            expires: now + HALF_OPEN_TIMEOUT,
        });
        self.send(ip, msg);
        true
    }

    fn on_quick(
        &mut self,
        now: Instant,
        ip: Ipv4Addr,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        if h.flags & wire::FLAG_ENC == 0 || h.msgid == 0 {
            return Err(Malformed);
        }
        let i = self.find_sa(ip, &h.icookie, &h.rcookie).ok_or(Malformed)?;
        if !self.sas[i].is_established() {
            return Err(Malformed);
        }
        match self.sas[i].quick.iter().position(|q| q.msgid == h.msgid) {
            Some(q) => {
                let quick = &self.sas[i].quick[q];
                if quick.flight.last_in == hash_of(data) {
                    let msg = quick.flight.sent.clone();
                    self.resend_flight(ip, msg);
                    Ok(())
                } else if quick.open && quick.initiator {
                    self.on_qm2(now, i, q, h, data)
                } else if quick.open {
                    self.on_qm3(now, i, q, h, data)
                } else {
                    Err(Malformed)
                }
            }
            None if self.sas[i].quick.len() >= MAX_QUICK_PER_SA => Err(Malformed),
            None => self.on_qm1(now, i, h, data),
        }
    }

    fn on_qm1(&mut self, now: Instant, i: usize, h: &Header, data: &[u8]) -> Result<(), Malformed> {
        let msgid = h.msgid;
        let ip = self.sas[i].peer;
        let iv0 = self.sas[i].exchange_iv(msgid);
        let (plain, next_iv) = self.sas[i].open(data, &iv0).ok_or(Malformed)?;
        let p = exchange::protected(&plain, h.next)?;
        let expected = self.sas[i]
            .hash_a(&[&msgid.to_be_bytes(), p.covered])
            .ok_or(Malformed)?;
        if !ct_eq(&expected[..], p.hash) {
            return Err(Malformed);
        }
        self.alive(ip, now);
        // Only one Quick Mode with a peer at a time, so that both sides see the pairs in the same
        // order and keep the same one. Both started at once: the lower address's exchange goes on
        // (as in phase 1); the higher side drops its own, which the peer ignores.
        if self.peer_quick_open(ip, true) {
            if self.cfg.local < ip {
                return Ok(());
            }
            for s in self.sas.iter_mut().filter(|s| s.peer == ip) {
                s.quick.retain(|q| !(q.open && q.initiator));
            }
        }
        // A confmesh peer starts a new exchange only once its previous one is over, so one of
        // its exchanges still waiting here for QM3 is over on its side, with or without the pair:
        // forget it (installing it could leave this side alone with a pair the peer never had).
        // Against other implementations (passive) nothing is assumed.
        if !self.cfg.passive {
            for s in self.sas.iter_mut().filter(|s| s.peer == ip) {
                s.quick.retain(|q| !q.open || q.initiator);
            }
        }
        let (mut sa_b, mut nonce, mut ke, mut ids) = (None, None, None, Vec::new());
        for pl in &p.payloads {
            match pl.kind {
                wire::PL_SA => sa_b = Some(pl.body),
                wire::PL_NONCE => nonce = Some(pl.body),
                wire::PL_KE => ke = Some(pl.body),
                wire::PL_ID => ids.push(pl.body),
                _ => {}
            }
        }
        let (sa_b, ni) = (sa_b.ok_or(Malformed)?, nonce.ok_or(Malformed)?);
        if !(8..=256).contains(&ni.len()) {
            return Err(Malformed);
        }
        let proto = self.cfg.protection.protocol_id();
        let group = self.cfg.group;
        let mut chosen = None;
        'outer: for prop in wire::proposals(sa_b)?.take(16) {
            let prop = prop?;
            if prop.protocol != proto || prop.spi.len() != 4 {
                continue;
            }
            for t in prop.transforms().take(32) {
                let t = t?;
                let o = wire::p2_offer(proto, &t)?;
                if o.acceptable_suite && o.tunnel && o.group == group.id() {
                    let spi =
                        u32::from_be_bytes([prop.spi[0], prop.spi[1], prop.spi[2], prop.spi[3]]);
                    chosen = Some((prop.number, spi, t.echo(), o));
                    break 'outer;
                }
            }
        }
        let Some((number, peer_spi, transform, offer)) = chosen else {
            self.send_notify_protected(i, proto, wire::N_NO_PROPOSAL_CHOSEN, &[]);
            self.refused(ip, Failure::NoProposalChosen { by_peer: false });
            return Ok(());
        };
        let peer_overlay = self
            .peers
            .get(&ip)
            .map(|p| p.cfg.overlay)
            .ok_or(Malformed)?;
        let ids_ok = ids.len() == 2
            && wire::id_addr(ids[0]) == Some(peer_overlay)
            && wire::id_addr(ids[1]) == Some(self.cfg.local_overlay);
        if !ids_ok {
            self.send_notify_protected(i, proto, wire::N_INVALID_ID_INFORMATION, &[]);
            self.events.push_back(Event::Failed {
                peer: ip,
                reason: Failure::InvalidId,
            });
            return Ok(());
        }
        let ke = ke.ok_or(Malformed)?;
        if ke.len() != group.public_len() {
            return Err(Malformed);
        }
        let dh = DhKey::generate(group, &mut self.rng);
        let Ok(gxy) = dh.agree(ke) else {
            self.events.push_back(Event::Failed {
                peer: ip,
                reason: Failure::InvalidKeyExchange,
            });
            return Ok(());
        };
        let nr = self.random_bytes(NONCE_LEN);
        let my_spi = self.fresh_spi();
        let lifetime = offer.life_secs.map_or(self.cfg.child_lifetime, |s| {
            Duration::from_secs(s).min(self.cfg.child_lifetime)
        });
        let lifetime_kb = match (offer.life_kb, self.cfg.child_lifetime_kb) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut rest = Chain::new();
        rest.push(
            wire::PL_SA,
            &wire::sa_body(number, proto, &my_spi.to_be_bytes(), &transform),
        )
        .push(wire::PL_NONCE, &nr)
        .push(wire::PL_KE, dh.public())
        .push(wire::PL_ID, ids[0])
        .push(wire::PL_ID, ids[1]);
        let sa = &self.sas[i];
        let hash = sa
            .hash_a(&[&msgid.to_be_bytes(), ni, &rest.buf])
            .ok_or(Malformed)?;
        let chain = exchange::with_hash(&hash[..], &rest);
        let (msg, iv2) = sa
            .seal(wire::EXCH_QUICK, msgid, &chain, &next_iv)
            .ok_or(Malformed)?;
        let keys = sa.keys.as_ref().ok_or(Malformed)?;
        let len = self.cfg.protection.key_len();
        let inbound = crypto::keymat(&keys.d[..], Some(&gxy), proto, my_spi, ni, &nr, len);
        let outbound = crypto::keymat(&keys.d[..], Some(&gxy), proto, peer_spi, ni, &nr, len);
        let mut flight = Flight::new();
        flight.send(msg.clone(), now, Some(self.cfg.retransmit_timeout));
        flight.last_in = hash_of(data);
        self.sas[i].quick.push(Quick {
            msgid,
            initiator: false,
            open: true,
            iv: iv2,
            ni: ni.to_vec(),
            nr,
            dh: None,
            my_spi,
            pending: Some(NewChild {
                outbound: ChildKeys {
                    spi: peer_spi,
                    key: outbound,
                },
                inbound: ChildKeys {
                    spi: my_spi,
                    key: inbound,
                },
                lifetime,
                lifetime_kb,
            }),
            flight,
            expires: now + HALF_OPEN_TIMEOUT,
        });
        self.send(ip, msg);
        Ok(())
    }

    fn on_qm2(
        &mut self,
        now: Instant,
        i: usize,
        q: usize,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        let msgid = h.msgid;
        let ip = self.sas[i].peer;
        let (plain, next_iv) = self.sas[i]
            .open(data, &self.sas[i].quick[q].iv)
            .ok_or(Malformed)?;
        let p = exchange::protected(&plain, h.next)?;
        let quick = &self.sas[i].quick[q];
        let expected = self.sas[i]
            .hash_a(&[&msgid.to_be_bytes(), &quick.ni, p.covered])
            .ok_or(Malformed)?;
        if !ct_eq(&expected[..], p.hash) {
            return Err(Malformed);
        }
        let proto = self.cfg.protection.protocol_id();
        let (mut sa_b, mut nonce, mut ke, mut ids) = (None, None, None, Vec::new());
        for pl in &p.payloads {
            match pl.kind {
                wire::PL_SA => sa_b = Some(pl.body),
                wire::PL_NONCE => nonce = Some(pl.body),
                wire::PL_KE => ke = Some(pl.body),
                wire::PL_ID => ids.push(pl.body),
                _ => {}
            }
        }
        let (sa_b, nr, ke) = (
            sa_b.ok_or(Malformed)?,
            nonce.ok_or(Malformed)?,
            ke.ok_or(Malformed)?,
        );
        if !(8..=256).contains(&nr.len()) {
            return Err(Malformed);
        }
        let prop = wire::proposals(sa_b)?.next().ok_or(Malformed)??;
        let t = prop.transforms().next().ok_or(Malformed)??;
        let o = wire::p2_offer(proto, &t)?;
        if prop.protocol != proto
            || prop.spi.len() != 4
            || !o.acceptable_suite
            || o.group != self.cfg.group.id()
        {
            return Err(Malformed);
        }
        let peer_overlay = self
            .peers
            .get(&ip)
            .map(|p| p.cfg.overlay)
            .ok_or(Malformed)?;
        if !ids.is_empty()
            && (ids.len() != 2
                || wire::id_addr(ids[0]) != Some(self.cfg.local_overlay)
                || wire::id_addr(ids[1]) != Some(peer_overlay))
        {
            return Err(Malformed);
        }
        let peer_spi = u32::from_be_bytes([prop.spi[0], prop.spi[1], prop.spi[2], prop.spi[3]]);
        let gxy = match quick.dh.as_ref().map(|dh| dh.agree(ke)) {
            Some(Ok(g)) => g,
            _ => return Err(Malformed),
        };
        let ni = quick.ni.clone();
        let my_spi = quick.my_spi;
        let sa = &self.sas[i];
        let hash3 = sa
            .hash_a(&[&[0], &msgid.to_be_bytes(), &ni, nr])
            .ok_or(Malformed)?;
        let mut c = Chain::new();
        c.push(wire::PL_HASH, &hash3[..]);
        let (msg, _) = sa
            .seal(wire::EXCH_QUICK, msgid, &c, &next_iv)
            .ok_or(Malformed)?;
        let keys = sa.keys.as_ref().ok_or(Malformed)?;
        let len = self.cfg.protection.key_len();
        let inbound = crypto::keymat(&keys.d[..], Some(&gxy), proto, my_spi, &ni, nr, len);
        let outbound = crypto::keymat(&keys.d[..], Some(&gxy), proto, peer_spi, &ni, nr, len);
        let lifetime = o.life_secs.map_or(self.cfg.child_lifetime, |s| {
            Duration::from_secs(s).min(self.cfg.child_lifetime)
        });
        let lifetime_kb = o.life_kb.or(self.cfg.child_lifetime_kb);
        let quick = &mut self.sas[i].quick[q];
        quick.open = false;
        quick.dh = None;
        quick.flight.send(msg.clone(), now, None);
        quick.flight.last_in = hash_of(data);
        quick.expires = now + LINGER;
        self.alive(ip, now);
        self.send(ip, msg);
        let child = NewChild {
            outbound: ChildKeys {
                spi: peer_spi,
                key: outbound,
            },
            inbound: ChildKeys {
                spi: my_spi,
                key: inbound,
            },
            lifetime,
            lifetime_kb,
        };
        self.child_up(now, ip, child, true);
        Ok(())
    }

    fn on_qm3(
        &mut self,
        now: Instant,
        i: usize,
        q: usize,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        let msgid = h.msgid;
        let ip = self.sas[i].peer;
        let (plain, _) = self.sas[i]
            .open(data, &self.sas[i].quick[q].iv)
            .ok_or(Malformed)?;
        let p = exchange::protected(&plain, h.next)?;
        let quick = &self.sas[i].quick[q];
        let expected = self.sas[i]
            .hash_a(&[&[0], &msgid.to_be_bytes(), &quick.ni, &quick.nr])
            .ok_or(Malformed)?;
        if !ct_eq(&expected[..], p.hash) {
            return Err(Malformed);
        }
        drop(plain);
        self.alive(ip, now);
        let quick = &mut self.sas[i].quick[q];
        quick.open = false;
        quick.flight.finish(data);
        quick.expires = now + LINGER;
        if let Some(child) = quick.pending.take() {
            self.child_up(now, ip, child, false);
        }
        Ok(())
    }

    fn child_up(&mut self, now: Instant, ip: Ipv4Addr, nc: NewChild, initiator: bool) {
        let r = self.rng.next_u32();
        let protection = self.cfg.protection;
        let (lo, hi) = if initiator {
            (0.80, 0.90)
        } else {
            (0.90, 0.95)
        };
        let Some(p) = self.peers.get_mut(&ip) else {
            return;
        };
        // Make-before-break: older pairs stop rekeying and are DELETEd after a grace period, by
        // the initiator first; the responder follows later in case that DELETE is lost or the
        // older pair only ever existed on this side (its QM3 never arrived).
        let grace = if initiator { GRACE } else { GRACE * 2 };
        for c in p.children.iter_mut() {
            c.rekey_at = None;
            if c.retire_at.is_none() {
                c.retire_at = Some(now + grace);
            }
        }
        if p.children.len() >= MAX_CHILDREN_PER_PEER {
            let c = p.children.remove(0);
            self.events.push_back(Event::ChildDown {
                peer: ip,
                protection,
                inbound_spi: c.inbound_spi,
                outbound_spi: c.outbound_spi,
                reason: ChildDownReason::Replaced,
            });
        }
        p.children.push(Child {
            inbound_spi: nc.inbound.spi,
            outbound_spi: nc.outbound.spi,
            created: now,
            rekey_at: Some(now + scaled(nc.lifetime, lo, hi, r)),
            expire_at: now + nc.lifetime,
            retire_at: None,
        });
        p.counters.child_established += 1;
        p.next_child = None;
        self.events.push_back(Event::ChildUp {
            peer: ip,
            protection,
            outbound: nc.outbound,
            inbound: nc.inbound,
            lifetime: nc.lifetime,
            lifetime_kb: nc.lifetime_kb,
        });
    }

    /// A child went away before its time (refused, deleted by the peer): try again later, each
    /// time later, so that a peer that cannot install SAs is not hammered.
    fn child_setback(&mut self, now: Instant, ip: Ipv4Addr) {
        let passive = self.cfg.passive;
        let Some(p) = self.peers.get_mut(&ip) else {
            return;
        };
        if p.live_child().is_none() && !passive {
            p.next_child = Some(now + p.child_backoff);
            p.child_backoff = (p.child_backoff * 2).min(BACKOFF_MAX);
        }
    }

    // ---- informational ----

    fn alive(&mut self, ip: Ipv4Addr, now: Instant) {
        if let Some(p) = self.peers.get_mut(&ip) {
            p.last_alive = Some(now);
        }
    }

    fn on_info(
        &mut self,
        now: Instant,
        ip: Ipv4Addr,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        if h.flags & wire::FLAG_ENC == 0 {
            return self.on_plain_info(now, ip, h, data);
        }
        let i = self.find_sa(ip, &h.icookie, &h.rcookie).ok_or(Malformed)?;
        if !self.sas[i].is_established() {
            return Err(Malformed);
        }
        let iv = self.sas[i].exchange_iv(h.msgid);
        let (plain, _) = self.sas[i].open(data, &iv).ok_or(Malformed)?;
        let p = exchange::protected(&plain, h.next)?;
        let expected = self.sas[i]
            .hash_a(&[&h.msgid.to_be_bytes(), p.covered])
            .ok_or(Malformed)?;
        if !ct_eq(&expected[..], p.hash) {
            return Err(Malformed);
        }
        self.alive(ip, now);
        for pl in &p.payloads {
            match pl.kind {
                wire::PL_NOTIFY => {
                    let n = wire::notify(pl.body)?;
                    match n.kind {
                        wire::N_R_U_THERE => {
                            let i = self.find_sa(ip, &h.icookie, &h.rcookie).ok_or(Malformed)?;
                            let data = n.data.get(..4).ok_or(Malformed)?.to_vec();
                            self.send_notify_protected(
                                i,
                                wire::PROTO_ISAKMP,
                                wire::N_R_U_THERE_ACK,
                                &data,
                            );
                        }
                        wire::N_R_U_THERE_ACK => {
                            if let Some(p) = self.peers.get_mut(&ip) {
                                p.counters.dpd_acked += 1;
                            }
                        }
                        // Error notifications: the peer refused our Quick Mode (or could not
                        // install it): drop the exchange and try again later. strongSwan names
                        // the SPI of the refused pair; without one (or a match) every open
                        // exchange under this SA goes, as nothing tells them apart.
                        k if k < 8192 => {
                            let i = self.find_sa(ip, &h.icookie, &h.rcookie).ok_or(Malformed)?;
                            let spi = <[u8; 4]>::try_from(n.spi).ok().map(u32::from_be_bytes);
                            let named = |q: &Quick| {
                                spi.is_some_and(|s| {
                                    q.my_spi == s
                                        || q.pending.as_ref().is_some_and(|c| c.outbound.spi == s)
                                })
                            };
                            let any_named = self.sas[i].quick.iter().any(|q| q.open && named(q));
                            self.sas[i]
                                .quick
                                .retain(|q| !q.open || (any_named && !named(q)));
                            let reason = if k == wire::N_NO_PROPOSAL_CHOSEN {
                                Failure::NoProposalChosen { by_peer: true }
                            } else if k == wire::N_INVALID_ID_INFORMATION {
                                Failure::InvalidId
                            } else {
                                Failure::NoProposalChosen { by_peer: true }
                            };
                            self.refused(ip, reason);
                            self.child_setback(now, ip);
                        }
                        _ => {}
                    }
                }
                wire::PL_DELETE => {
                    let (protocol, spi_len, spis) = wire::delete(pl.body)?;
                    if let Some(p) = self.peers.get_mut(&ip) {
                        p.counters.deletes_received += 1;
                    }
                    for spi in spis.chunks_exact(spi_len).take(16) {
                        self.on_delete(now, ip, protocol, spi);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn on_delete(&mut self, now: Instant, ip: Ipv4Addr, protocol: u8, spi: &[u8]) {
        if protocol == wire::PROTO_ISAKMP && spi.len() == 16 {
            let (mut ic, mut rc) = ([0u8; 8], [0u8; 8]);
            ic.copy_from_slice(&spi[..8]);
            rc.copy_from_slice(&spi[8..]);
            if let Some(i) = self.find_sa(ip, &ic, &rc) {
                self.drop_sa(now, i);
                self.events.push_back(Event::IkeDown { peer: ip });
                self.after_ike_loss(now, ip);
            }
        } else if protocol == self.cfg.protection.protocol_id() && spi.len() == 4 {
            let spi = u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]);
            let protection = self.cfg.protection;
            let Some(p) = self.peers.get_mut(&ip) else {
                return;
            };
            // RFC 2408 leaves open which SPI of the pair a DELETE names. The peer's inbound SPI
            // (our outbound) is the usual choice; strongSwan names our inbound SPI when it could
            // not install the pair. Both identify the pair: our inbound SPIs are unique here.
            let k = p.children.iter().position(|c| c.outbound_spi == spi);
            let k = k.or_else(|| p.children.iter().position(|c| c.inbound_spi == spi));
            if let Some(k) = k {
                let c = p.children.remove(k);
                // A pair that lived a while was a normal delete: the next failure starts the
                // back-off afresh.
                if now.saturating_duration_since(c.created) > Duration::from_secs(30) {
                    p.child_backoff = BACKOFF_MIN;
                }
                self.events.push_back(Event::ChildDown {
                    peer: ip,
                    protection,
                    inbound_spi: c.inbound_spi,
                    outbound_spi: c.outbound_spi,
                    reason: ChildDownReason::DeletedByPeer,
                });
                self.child_setback(now, ip);
            }
        }
    }

    /// Unprotected notifications are believed only as the answer to our own half-open phase 1.
    fn on_plain_info(
        &mut self,
        now: Instant,
        ip: Ipv4Addr,
        h: &Header,
        data: &[u8],
    ) -> Result<(), Malformed> {
        let i = self
            .sas
            .iter()
            .position(|s| {
                s.peer == ip && s.initiator && !s.is_established() && s.icookie == h.icookie
            })
            .ok_or(Malformed)?;
        for pl in Payloads::new(data, HEADER_LEN, h.next).take(16) {
            let pl = pl?;
            if pl.kind != wire::PL_NOTIFY {
                continue;
            }
            let kind = wire::notify(pl.body)?.kind;
            if kind == wire::N_INVALID_COOKIE {
                // The responder no longer holds the exchange it answered (the cookies prove it
                // is the one): start again now. Not a failure; repeated ones back off.
                if self.sas[i].state == P1State::Mm3Sent && self.sas[i].rcookie == h.rcookie {
                    self.restart_main(now, i);
                    return Ok(());
                }
                continue;
            }
            let reason = match kind {
                wire::N_NO_PROPOSAL_CHOSEN => Failure::NoProposalChosen { by_peer: true },
                wire::N_AUTHENTICATION_FAILED if self.sas[i].state == P1State::Mm5Sent => {
                    Failure::AuthenticationFailed
                }
                wire::N_INVALID_ID_INFORMATION => Failure::InvalidId,
                _ => continue,
            };
            self.fail_sa(now, i, reason);
            return Ok(());
        }
        Err(Malformed)
    }

    // ---- timers ----

    fn run_retransmits(&mut self, now: Instant) {
        let rto = self.cfg.retransmit_timeout;
        let tries = self.cfg.retransmit_tries;
        let mut i = 0;
        while i < self.sas.len() {
            let due = self.sas[i].flight.resend_at.is_some_and(|t| t <= now);
            if due && self.sas[i].flight.tries >= tries {
                // After MM5 only a key mismatch explains silence so well that we say so.
                let reason = if self.sas[i].state == P1State::Mm5Sent {
                    Failure::AuthenticationFailed
                } else {
                    Failure::Timeout
                };
                if self.sas[i].initiator {
                    self.fail_sa(now, i, reason);
                } else {
                    let ip = self.sas.remove(i).peer;
                    if let Some(p) = self.peers.get_mut(&ip) {
                        p.counters.timeouts += 1;
                    }
                }
                continue;
            }
            if due {
                let ip = self.sas[i].peer;
                let f = &mut self.sas[i].flight;
                f.resend_at = Some(now + rto * 2u32.saturating_pow(f.tries.min(16)));
                f.tries += 1;
                let msg = f.sent.clone();
                self.resend_flight(ip, msg);
            }
            let mut q = 0;
            while q < self.sas[i].quick.len() {
                let ip = self.sas[i].peer;
                let f = &mut self.sas[i].quick[q].flight;
                if f.resend_at.is_some_and(|t| t <= now) {
                    if f.tries >= tries {
                        let mut quick = self.sas[i].quick.remove(q);
                        if let Some(p) = self.peers.get_mut(&ip) {
                            p.counters.timeouts += 1;
                        }
                        if quick.initiator {
                            self.events.push_back(Event::Failed {
                                peer: ip,
                                reason: Failure::Timeout,
                            });
                            self.child_setback(now, ip);
                        } else if !self.cfg.passive {
                            // QM3 never came: the initiator may or may not have the pair. Make a
                            // new one that both sides will have; it replaces this one on the
                            // initiator's side if it has it, everywhere in the same order.
                            if let Some(p) = self.peers.get_mut(&ip) {
                                p.next_child = Some(now);
                            }
                        } else if let Some(child) = quick.pending.take() {
                            // A passive endpoint never starts an exchange of its own: QM1 was
                            // authenticated, so the initiator has this pair unless our QM2 never
                            // reached it; then it tries again and the newer pair wins.
                            self.child_up(now, ip, child, false);
                        }
                        continue;
                    }
                    f.resend_at = Some(now + rto * 2u32.saturating_pow(f.tries.min(16)));
                    f.tries += 1;
                    let msg = f.sent.clone();
                    self.resend_flight(ip, msg);
                }
                q += 1;
            }
            i += 1;
        }
    }

    fn run_sa_timers(&mut self, now: Instant) {
        let passive = self.cfg.passive;
        let mut i = 0;
        while i < self.sas.len() {
            let sa = &mut self.sas[i];
            sa.quick.retain(|q| q.expires > now);
            let ip = sa.peer;
            if !sa.is_established() && !sa.initiator && sa.created + HALF_OPEN_TIMEOUT <= now {
                self.sas.remove(i);
                continue;
            }
            if sa.retire_at.is_some_and(|t| t <= now) || sa.expire_at.is_some_and(|t| t <= now) {
                if sa.retire_at.is_some() {
                    self.send_delete_ike(i);
                }
                self.drop_sa(now, i);
                self.events.push_back(Event::IkeDown { peer: ip });
                self.after_ike_loss(now, ip);
                continue;
            }
            if !passive && sa.rekey_at.is_some_and(|t| t <= now) {
                sa.rekey_at = None;
                if self.current_sa(ip) == Some(i) {
                    if let Some(p) = self.peers.get_mut(&ip) {
                        p.next_initiate = Some(now);
                    }
                }
            }
            i += 1;
        }
    }

    /// Removes SA `i`; a Quick Mode we started under it is started again under the current SA.
    fn drop_sa(&mut self, now: Instant, i: usize) -> IkeSa {
        let sa = self.sas.remove(i);
        if sa.quick.iter().any(|q| q.open && q.initiator) && !self.cfg.passive {
            if let Some(p) = self.peers.get_mut(&sa.peer) {
                p.next_child = Some(now);
            }
        }
        sa
    }

    /// No phase-1 SA is left with the peer: make a new one (children need it to rekey, DPD to run).
    fn after_ike_loss(&mut self, now: Instant, ip: Ipv4Addr) {
        let none_left = !self.sas.iter().any(|s| s.peer == ip && s.is_established());
        let passive = self.cfg.passive;
        if let Some(p) = self.peers.get_mut(&ip) {
            if none_left {
                p.next_dpd = None;
                if !passive && p.next_initiate.is_none() {
                    p.next_initiate = Some(now + BACKOFF_MIN);
                }
            }
        }
    }

    fn run_child_timers(&mut self, now: Instant) {
        let protection = self.cfg.protection;
        let passive = self.cfg.passive;
        let addrs: Vec<Ipv4Addr> = self.peers.keys().copied().collect();
        for ip in addrs {
            let mut deletes = Vec::new();
            let Some(p) = self.peers.get_mut(&ip) else {
                continue;
            };
            let mut k = 0;
            while k < p.children.len() {
                let c = &mut p.children[k];
                // A replaced pair that reaches its end before the grace period is over still
                // counts as replaced (it is DELETEd, not reported expired).
                let retired = c.retire_at.is_some_and(|t| t <= now)
                    || (c.retire_at.is_some() && c.expire_at <= now);
                if retired || c.expire_at <= now {
                    let c = p.children.remove(k);
                    if retired {
                        deletes.push(c.inbound_spi);
                    }
                    self.events.push_back(Event::ChildDown {
                        peer: ip,
                        protection,
                        inbound_spi: c.inbound_spi,
                        outbound_spi: c.outbound_spi,
                        reason: if retired {
                            ChildDownReason::Replaced
                        } else {
                            ChildDownReason::Expired
                        },
                    });
                    continue;
                }
                if !passive && c.rekey_at.is_some_and(|t| t <= now) {
                    c.rekey_at = None;
                    p.next_child = Some(now);
                }
                k += 1;
            }
            if p.live_child().is_none()
                && p.next_child.is_none()
                && !passive
                && !p.children.is_empty()
            {
                p.next_child = Some(now);
            }
            for spi in deletes {
                self.send_delete_child(ip, spi);
            }
        }
    }

    fn run_peer_timers(&mut self, now: Instant) {
        let addrs: Vec<Ipv4Addr> = self.peers.keys().copied().collect();
        let dpd = self.cfg.dpd_interval;
        for ip in addrs {
            let Some(p) = self.peers.get_mut(&ip) else {
                continue;
            };
            if p.next_initiate.is_some_and(|t| t <= now) {
                p.next_initiate = None;
                self.start_main(now, ip);
            }
            let has_sa = self.current_sa(ip).is_some();
            let Some(p) = self.peers.get_mut(&ip) else {
                continue;
            };
            if p.next_child.is_some_and(|t| t <= now) {
                // Without a phase-1 SA the child waits: the next IkeUp schedules it again. While
                // a Quick Mode the peer started is open, starting our own would make two pairs
                // at once, which the two sides may install in different orders and so each keep
                // a different one (the older pair is retired on both sides after a grace period,
                // and an IKEv1 DELETE is never acknowledged): wait until it ends.
                p.next_child = None;
                if has_sa && (self.peer_quick_open(ip, false) || !self.start_quick(now, ip)) {
                    if let Some(p) = self.peers.get_mut(&ip) {
                        p.next_child = Some(now + BACKOFF_MIN);
                    }
                }
            }
            let Some(p) = self.peers.get_mut(&ip) else {
                continue;
            };
            if p.next_dpd.is_none_or(|t| t > now) {
                continue;
            }
            if p.last_alive
                .is_some_and(|t| now.saturating_duration_since(t) >= dpd.mul_f64(2.5))
            {
                self.peer_dead(now, ip);
                continue;
            }
            // The verdict comes 2.5 intervals after the peer was last heard, not at the next probe
            // after that: up to half an interval sooner.
            let verdict = p.last_alive.map(|t| t + dpd.mul_f64(2.5));
            p.next_dpd = min_opt(Some(now + dpd), verdict);
            p.dpd_seq = p.dpd_seq.wrapping_add(1);
            let seq = p.dpd_seq.to_be_bytes();
            if let Some(i) = self.current_sa(ip).filter(|&i| self.sas[i].peer_dpd) {
                if let Some(p) = self.peers.get_mut(&ip) {
                    p.counters.dpd_sent += 1;
                }
                self.send_notify_protected(i, wire::PROTO_ISAKMP, wire::N_R_U_THERE, &seq);
            }
        }
    }

    fn peer_dead(&mut self, now: Instant, ip: Ipv4Addr) {
        self.sas.retain(|s| s.peer != ip);
        self.drop_children(ip, ChildDownReason::PeerDead);
        let passive = self.cfg.passive;
        if let Some(p) = self.peers.get_mut(&ip) {
            p.next_dpd = None;
            p.last_alive = None;
            p.next_child = None;
            // We hold nothing of the peer any more: tell it so in the next phase 1.
            p.initial_contact_sent = false;
            if !passive {
                p.next_initiate = Some(now + p.ike_backoff);
                p.ike_backoff = (p.ike_backoff * 2).min(BACKOFF_MAX);
            }
        }
        self.events.push_back(Event::PeerDead { peer: ip });
    }

    /// Sends DELETEs for everything with the peer and reports its children down.
    fn close_peer(&mut self, _now: Instant, ip: Ipv4Addr) {
        let spis: Vec<u32> = self
            .peers
            .get(&ip)
            .map(|p| p.children.iter().map(|c| c.inbound_spi).collect())
            .unwrap_or_default();
        for spi in spis {
            self.send_delete_child(ip, spi);
        }
        self.drop_children(ip, ChildDownReason::Closed);
        let established: Vec<usize> = (0..self.sas.len())
            .filter(|&i| self.sas[i].peer == ip && self.sas[i].is_established())
            .collect();
        for &i in &established {
            self.send_delete_ike(i);
        }
        if !established.is_empty() {
            self.events.push_back(Event::IkeDown { peer: ip });
        }
        self.sas.retain(|s| s.peer != ip);
    }
}

/// What other implementations do that two confmesh endpoints never do to each other, simulated by
/// one endpoint sending what strongSwan's charon was seen to send (tests/ike_strongswan.rs).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::DhGroup;

    const A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);

    fn endpoint(
        local: Ipv4Addr,
        peer: Ipv4Addr,
        seed: u8,
        now: Instant,
        passive: bool,
    ) -> Endpoint {
        let overlay = |a: Ipv4Addr| Ipv4Addr::new(198, 18, 0, a.octets()[3]);
        let cfg = EndpointConfig {
            group: DhGroup::Curve25519,
            passive,
            ..EndpointConfig::new(local, overlay(local))
        };
        let mut e = Endpoint::new(cfg, [seed; 32]);
        e.set_peer(
            now,
            PeerConfig {
                addr: peer,
                overlay: overlay(peer),
                psk: Zeroizing::new(b"k".to_vec()),
            },
        );
        e
    }

    /// Delivers everything queued, both ways, until both are quiet; returns the events of `a`.
    fn settle(a: &mut Endpoint, b: &mut Endpoint, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..32 {
            let mut moved = false;
            for e in [&mut *a, &mut *b] {
                if e.poll_timeout().is_some_and(|t| t <= now) {
                    e.handle_timeout(now);
                }
            }
            while let Some(t) = a.poll_transmit() {
                b.handle(now, SocketAddrV4::new(A, IKE_PORT), &t.payload);
                moved = true;
            }
            while let Some(t) = b.poll_transmit() {
                a.handle(now, SocketAddrV4::new(B, IKE_PORT), &t.payload);
                moved = true;
            }
            events.extend(std::iter::from_fn(|| a.poll_event()));
            while b.poll_event().is_some() {}
            if !moved {
                break;
            }
        }
        events
    }

    fn established_pair() -> (Endpoint, Endpoint, Instant) {
        let now = Instant::now();
        // a is passive (like the udp_peer example against charon): b starts everything.
        let (mut a, mut b) = (endpoint(A, B, 1, now, true), endpoint(B, A, 2, now, false));
        let events = settle(&mut a, &mut b, now);
        assert!(
            events.iter().any(|e| matches!(e, Event::ChildUp { .. })),
            "{events:?}"
        );
        (a, b, now)
    }

    #[test]
    fn a_delete_naming_our_inbound_spi_removes_the_pair() {
        let (mut a, mut b, now) = established_pair();
        let inbound = a.peers[&B].children[0].inbound_spi;
        // b names the SPI it sends with (a's inbound), as charon does for a pair it could not install.
        let i = b.current_sa(A).unwrap();
        let mut c = Chain::new();
        c.push(
            wire::PL_DELETE,
            &wire::delete_body(wire::PROTO_AH, &inbound.to_be_bytes()),
        );
        b.send_info(i, &c);
        let events = settle(&mut a, &mut b, now);
        assert!(
            events.iter().any(|e| matches!(e, Event::ChildDown { inbound_spi, reason: ChildDownReason::DeletedByPeer, .. } if *inbound_spi == inbound)),
            "{events:?}"
        );
        assert_eq!(a.peer_state(B).unwrap().children, 0);
    }

    #[test]
    fn a_refusal_naming_an_spi_drops_only_that_exchange() {
        let (mut a, mut b, now) = established_pair();
        // b opens a Quick Mode that a answers (a holds it open for QM3), and a opens its own.
        assert!(b.start_quick(now, A));
        let qm1 = b.poll_transmit().unwrap();
        a.handle(now, SocketAddrV4::new(B, IKE_PORT), &qm1.payload);
        let _qm2 = a.poll_transmit().unwrap();
        assert!(a.start_quick(now, B));
        let _ = a.poll_transmit().unwrap();
        assert_eq!(a.peer_state(B).unwrap().exchanges_in_progress, 2);
        // b refuses its own exchange after QM2, naming the SPI it proposed.
        let proposed = b.sas[b.current_sa(A).unwrap()]
            .quick
            .iter()
            .find(|q| q.open)
            .unwrap()
            .my_spi;
        let i = b.current_sa(A).unwrap();
        b.send_notify_protected(i, wire::PROTO_AH, wire::N_NO_PROPOSAL_CHOSEN, &[]);
        let refusal = b.poll_transmit().unwrap();
        // send_notify_protected carries no SPI for AH; build the named one like charon's.
        let mut c = Chain::new();
        c.push(
            wire::PL_NOTIFY,
            &wire::notify_body(
                wire::PROTO_AH,
                &proposed.to_be_bytes(),
                wire::N_NO_PROPOSAL_CHOSEN,
                &[],
            ),
        );
        b.send_info(i, &c);
        let named = b.poll_transmit().unwrap();
        a.handle(now, SocketAddrV4::new(B, IKE_PORT), &named.payload);
        let s = a.peer_state(B).unwrap();
        assert_eq!(
            (s.exchanges_in_progress, s.counters.malformed),
            (1, 0),
            "only the named exchange goes"
        );
        let own = &a.sas[a.current_sa(B).unwrap()].quick;
        assert!(
            own.iter().filter(|q| q.open).all(|q| q.initiator),
            "a's own exchange stays open"
        );
        // Without an SPI nothing tells the exchanges apart: all open ones go.
        a.handle(now, SocketAddrV4::new(B, IKE_PORT), &refusal.payload);
        assert_eq!(a.peer_state(B).unwrap().exchanges_in_progress, 0);
    }
}
