//! The RFC 3261 §17 transaction layer, sans-IO.
//!
//! Four state machines — client INVITE, client non-INVITE, server INVITE, server non-INVITE — with
//! timers A, B, D, E, F, G, H, I, J, K (and RFC 6026's Accepted state with timer L). Over UDP,
//! requests and final responses are retransmitted; over TCP nothing is and the lingering timers are
//! zero. The layer also retransmits a 2xx to INVITE until its ACK arrives (the TU's duty in
//! §13.3.1.4, kept here so that every timer lives in one table).
//!
//! Driving order, for one [`Transactions`]:
//! 1. for each message the parser accepted, call [`Transactions::handle_message`]; it says whether
//!    the TU should act (new request, response, ACK for a 2xx, CANCEL) or the message was absorbed;
//! 2. the TU starts client transactions with [`Transactions::send_request`] and answers server ones
//!    with [`Transactions::respond`];
//! 3. when [`Transactions::poll_timeout`] passes, call [`Transactions::handle_timeout`];
//! 4. after any of these, drain [`Transactions::poll_transmit`] to the sockets and
//!    [`Transactions::poll_event`] to the TU.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Transport;
use super::build::MessageWriter;
use super::parse::{Framing, Hdr, Message, Method, StartLine, parse};

/// RFC 3261 timer bases; tests shrink them, operators rarely should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// Round-trip estimate (default 500 ms).
    pub t1: Duration,
    /// Longest retransmit interval for non-INVITE requests and INVITE responses (default 4 s).
    pub t2: Duration,
    /// Longest time a message stays in the network (default 5 s).
    pub t4: Duration,
    /// How long a client INVITE may stay in Proceeding before the TU is told (timer C, > 3 min).
    pub timer_c: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            timer_c: Duration::from_secs(181),
        }
    }
}

/// Identifies a transaction to the TU; never reused within one [`Transactions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(u64);

/// Bytes to send, and where.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// Remote address.
    pub dest: SocketAddr,
    /// Local address to send from (one of the rendezvous addresses).
    pub local: SocketAddr,
    /// UDP, or the TCP connection to `dest`.
    pub transport: Transport,
    /// The whole message.
    pub data: Bytes,
    /// Over TCP, where to open a connection when none is open to `dest` any more: for a response
    /// the address of RFC 3261 §18.2.2 (the request's source address — what a `received`
    /// parameter would say — with the top Via's sent-by port, 5060 if none), for an in-dialog
    /// request the remote target's address. `None` over UDP, or when `dest` itself is right.
    pub fallback: Option<SocketAddr>,
}

impl Transmit {
    /// A message to `dest` with no fallback address.
    pub fn to(dest: SocketAddr, local: SocketAddr, transport: Transport, data: Bytes) -> Transmit {
        Transmit {
            dest,
            local,
            transport,
            data,
            fallback: None,
        }
    }
}

/// Where a response to `req`, received from `src` over a reliable transport, goes when the
/// connection it came on has closed (RFC 3261 §18.2.2): the address the request came from — the
/// `received` parameter a server adds (§18.2.1) — with the port of the top Via's sent-by, or 5060.
/// The sent-by host is never used for the address, so a request cannot make us connect to a
/// third party. `None` over UDP or when that is `src` itself.
pub fn response_fallback(
    req: &Message<'_>,
    src: SocketAddr,
    transport: Transport,
) -> Option<SocketAddr> {
    if !transport.is_reliable() {
        return None;
    }
    let port = req.top_via()?.port.unwrap_or(5060);
    let target = SocketAddr::new(src.ip(), port);
    (target != src).then_some(target)
}

/// What an incoming message means to the TU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A new request; answer it with [`Transactions::respond`] on this id.
    Request(TxnId),
    /// A CANCEL (its own transaction, still to be answered) and the INVITE transaction it targets.
    Cancel {
        /// The CANCEL's server transaction.
        cancel: TxnId,
        /// The INVITE server transaction it cancels, if still known.
        invite: Option<TxnId>,
    },
    /// An ACK outside any transaction: the end-to-end ACK for a 2xx (carries the answer SDP, if any).
    Ack,
    /// A response for a client transaction, to act on.
    Response(TxnId),
    /// A response matching no transaction: a retransmitted 2xx to INVITE, the TU re-sends its ACK.
    StrayResponse,
    /// A retransmission or an ACK to a non-2xx, fully handled here.
    Absorbed,
    /// Too many transactions: answer the request statelessly with 503 (or ignore an ACK/response).
    Overloaded,
}

/// Things the TU must learn that are not replies to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnEvent {
    /// A client transaction got no final response in time (timer B, F or C): treat as 408.
    Timeout(TxnId),
    /// A final response we sent to INVITE was never acknowledged (timer H or L).
    AckTimeout(TxnId),
}

/// The four transaction kinds of RFC 3261 §17, named as the RFC names them.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ClientInvite,
    ClientNonInvite,
    ServerInvite,
    ServerNonInvite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Trying,
    Proceeding,
    Completed,
    Accepted,
    Confirmed,
}

/// The three timer slots every transaction needs; which RFC letter each is depends on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    /// A, E, G: retransmission.
    Retransmit = 0,
    /// B, F, H, L, C: giving up.
    Deadline = 1,
    /// D, I, J, K: lingering to absorb retransmissions.
    Linger = 2,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    branch: String,
    sent_by: String,
    /// INVITE for INVITE and ACK, the token otherwise.
    method: String,
}

#[derive(Debug)]
struct Txn {
    kind: Kind,
    state: State,
    dest: SocketAddr,
    /// See [`Transmit::fallback`].
    fallback: Option<SocketAddr>,
    local: SocketAddr,
    transport: Transport,
    key: Key,
    /// Client: the request; server: the last response sent.
    message: Option<Bytes>,
    /// Client INVITE: the ACK generated for a non-2xx.
    ack: Option<Bytes>,
    /// Server INVITE answered 2xx: (Call-ID, CSeq) so the end-to-end ACK can stop retransmissions.
    ack_key: Option<(String, u32)>,
    interval: Duration,
    timers: [Option<Instant>; 3],
}

/// All transactions of one B2BUA; see the module documentation for the driving order.
#[derive(Debug)]
pub struct Transactions {
    cfg: TimerConfig,
    max: usize,
    next_id: u64,
    txns: HashMap<TxnId, Txn>,
    server: HashMap<Key, TxnId>,
    client: HashMap<Key, TxnId>,
    accepted: HashMap<(String, u32), TxnId>,
    heap: BinaryHeap<Reverse<(Instant, TxnId, Slot)>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<TxnEvent>,
    retransmissions: u64,
}

impl Transactions {
    /// A layer holding at most `max` live transactions (new requests beyond that are
    /// [`Incoming::Overloaded`]).
    pub fn new(cfg: TimerConfig, max: usize) -> Self {
        Transactions {
            cfg,
            max,
            next_id: 1,
            txns: HashMap::new(),
            server: HashMap::new(),
            client: HashMap::new(),
            accepted: HashMap::new(),
            heap: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            retransmissions: 0,
        }
    }

    /// The transaction count at which a request of `method` is refused. BYE and CANCEL end calls
    /// and free what they hold, so they keep working above the limit for new work (up to half as
    /// much again, still bounded): refusing them under overload would leave calls that never end.
    fn limit_for(&self, method: Method) -> usize {
        match method {
            Method::Bye | Method::Cancel => self.max + self.max / 2,
            _ => self.max,
        }
    }

    /// Live transactions (a gauge for metrics and leak tests).
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    /// Whether no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }

    /// Messages retransmitted so far (requests, responses, ACKs): a path-quality counter.
    pub fn retransmissions(&self) -> u64 {
        self.retransmissions
    }

    fn key_of(msg: &Message<'_>, method: &str) -> Option<Key> {
        let via = msg.top_via()?;
        let branch = match via.branch() {
            Some(b) if !b.is_empty() => b.to_owned(),
            // RFC 2543 peers: fall back on what identifies the request.
            _ => format!(
                "{}|{}|{}",
                msg.call_id()?,
                msg.cseq()?.0,
                msg.from_tag().unwrap_or("")
            ),
        };
        let sent_by = match via.port {
            Some(p) => format!("{}:{p}", via.host.to_ascii_lowercase()),
            None => via.host.to_ascii_lowercase(),
        };
        Some(Key {
            branch,
            sent_by,
            method: method.to_owned(),
        })
    }

    fn arm(&mut self, id: TxnId, slot: Slot, at: Instant) {
        if let Some(t) = self.txns.get_mut(&id) {
            t.timers[slot as usize] = Some(at);
            self.heap.push(Reverse((at, id, slot)));
        }
    }

    fn disarm(&mut self, id: TxnId, slot: Slot) {
        if let Some(t) = self.txns.get_mut(&id) {
            t.timers[slot as usize] = None;
        }
    }

    fn alloc(&mut self) -> TxnId {
        let id = TxnId(self.next_id);
        self.next_id += 1;
        id
    }

    fn remove(&mut self, id: TxnId) {
        if let Some(t) = self.txns.remove(&id) {
            match t.kind {
                Kind::ClientInvite | Kind::ClientNonInvite => self.client.remove(&t.key),
                Kind::ServerInvite | Kind::ServerNonInvite => self.server.remove(&t.key),
            };
            if let Some(k) = t.ack_key {
                self.accepted.remove(&k);
            }
        }
    }

    fn send(&mut self, id: TxnId, data: Bytes) {
        if let Some(t) = self.txns.get(&id) {
            self.transmits.push_back(Transmit {
                dest: t.dest,
                local: t.local,
                transport: t.transport,
                data,
                fallback: t.fallback,
            });
        }
    }

    /// Classifies one parsed message from `src` (received on `local` over `transport`) and performs
    /// what the transaction state machines do with it.
    pub fn handle_message(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        src: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) -> Incoming {
        match msg.start {
            StartLine::Request {
                method,
                method_token,
                ..
            } => self.handle_request(now, msg, method, method_token, src, local, transport),
            StartLine::Response { code, .. } => self.handle_response(now, msg, code),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_request(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        method: Method,
        token: &str,
        src: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) -> Incoming {
        let key_method = if method == Method::Ack {
            "INVITE"
        } else {
            token
        };
        let Some(key) = Self::key_of(msg, key_method) else {
            return Incoming::Absorbed;
        };
        if let Some(&id) = self.server.get(&key) {
            return self.retransmitted_request(now, id, method);
        }
        if method == Method::Ack {
            if let Some((call_id, (n, _))) = msg.call_id().zip(msg.cseq()) {
                if let Some(id) = self.accepted.remove(&(call_id.to_owned(), n)) {
                    self.confirm_2xx(now, id);
                }
            }
            return Incoming::Ack;
        }
        if self.txns.len() >= self.limit_for(method) {
            return Incoming::Overloaded;
        }
        let id = self.alloc();
        let kind = if method == Method::Invite {
            Kind::ServerInvite
        } else {
            Kind::ServerNonInvite
        };
        let txn = Txn {
            kind,
            state: if kind == Kind::ServerInvite {
                State::Proceeding
            } else {
                State::Trying
            },
            dest: src,
            fallback: response_fallback(msg, src, transport),
            local,
            transport,
            key: key.clone(),
            message: None,
            ack: None,
            ack_key: None,
            interval: self.cfg.t1,
            timers: [None; 3],
        };
        self.txns.insert(id, txn);
        self.server.insert(key.clone(), id);
        if method == Method::Cancel {
            let invite_key = Key {
                method: "INVITE".to_owned(),
                ..key
            };
            let invite = self.server.get(&invite_key).copied();
            return Incoming::Cancel { cancel: id, invite };
        }
        // Guard against a TU that never answers: the transaction goes after 64*T1 past timer C.
        let guard = self.cfg.timer_c + self.cfg.t1 * 64;
        self.arm(id, Slot::Deadline, now + guard);
        Incoming::Request(id)
    }

    /// The end-to-end ACK for the 2xx of server INVITE `id` arrived: retransmissions stop, and the
    /// transaction lingers only T4 over UDP (zero over TCP) instead of the rest of timer L.
    ///
    /// A deliberate shortening of RFC 6026's Accepted state, whose 64·T1 is there to absorb
    /// retransmissions of the INVITE while the caller may still be sending them: once its ACK is
    /// here the caller has the 2xx and has stopped, and what may still be in flight arrives within
    /// T4, the time RFC 3261 gives timer I for the same reason after the ACK of a non-2xx. An
    /// answered call then holds about 42 transaction-seconds instead of 69, which is what bounds
    /// the sustained call rate at the transaction limit (Kamailio's tm keeps every finished
    /// transaction 5 s).
    fn confirm_2xx(&mut self, now: Instant, id: TxnId) {
        let t4 = self.cfg.t4;
        let Some(t) = self.txns.get_mut(&id) else {
            return;
        };
        t.state = State::Confirmed;
        t.ack_key = None;
        let linger = if t.transport.is_reliable() {
            Duration::ZERO
        } else {
            t4
        };
        self.disarm(id, Slot::Retransmit);
        self.disarm(id, Slot::Deadline);
        self.arm(id, Slot::Linger, now + linger);
    }

    fn retransmitted_request(&mut self, now: Instant, id: TxnId, method: Method) -> Incoming {
        let Some(t) = self.txns.get_mut(&id) else {
            return Incoming::Absorbed;
        };
        if method == Method::Ack {
            match t.state {
                State::Completed => {
                    t.state = State::Confirmed;
                    let linger = if t.transport.is_reliable() {
                        Duration::ZERO
                    } else {
                        self.cfg.t4
                    };
                    self.disarm(id, Slot::Retransmit);
                    self.disarm(id, Slot::Deadline);
                    self.arm(id, Slot::Linger, now + linger);
                    return Incoming::Absorbed;
                }
                State::Accepted => {
                    // An ACK for our 2xx that reused the INVITE's branch.
                    if let Some(k) = t.ack_key.clone() {
                        self.accepted.remove(&k);
                    }
                    self.confirm_2xx(now, id);
                    return Incoming::Ack;
                }
                _ => return Incoming::Absorbed,
            }
        }
        if let Some(resp) = t.message.clone() {
            self.retransmissions += 1;
            self.send(id, resp);
        }
        Incoming::Absorbed
    }

    fn handle_response(&mut self, now: Instant, msg: &Message<'_>, code: u16) -> Incoming {
        let Some((_, method)) = msg.cseq() else {
            return Incoming::Absorbed;
        };
        let key_method = if method == "ACK" { "INVITE" } else { method };
        let Some(key) = Self::key_of(msg, key_method) else {
            return Incoming::Absorbed;
        };
        // Client keys carry our own sent-by; match on branch and method only.
        let Some(&id) = self.client.get(&Key {
            sent_by: String::new(),
            ..key
        }) else {
            return Incoming::StrayResponse;
        };
        let cfg = self.cfg;
        let Some(t) = self.txns.get_mut(&id) else {
            return Incoming::StrayResponse;
        };
        let reliable = t.transport.is_reliable();
        match (t.kind, t.state, code) {
            (_, State::Completed, _) => {
                if let Some(ack) = t.ack.clone() {
                    self.retransmissions += 1;
                    self.send(id, ack);
                }
                Incoming::Absorbed
            }
            (Kind::ClientInvite, _, 100..=199) => {
                if t.state == State::Trying {
                    t.state = State::Proceeding;
                    self.disarm(id, Slot::Retransmit);
                    self.arm(id, Slot::Deadline, now + cfg.timer_c);
                }
                Incoming::Response(id)
            }
            (Kind::ClientInvite, _, 200..=299) => {
                self.remove(id);
                Incoming::Response(id)
            }
            (Kind::ClientInvite, _, _) => {
                let ack = t.message.as_ref().and_then(|req| build_ack(req, msg));
                t.state = State::Completed;
                t.ack = ack.clone();
                if let Some(ack) = ack {
                    self.send(id, ack);
                }
                self.disarm(id, Slot::Retransmit);
                self.disarm(id, Slot::Deadline);
                let linger = if reliable {
                    Duration::ZERO
                } else {
                    cfg.t1 * 64
                };
                self.arm(id, Slot::Linger, now + linger);
                Incoming::Response(id)
            }
            (_, _, 100..=199) => {
                if t.state == State::Trying {
                    t.state = State::Proceeding;
                }
                Incoming::Response(id)
            }
            _ => {
                t.state = State::Completed;
                self.disarm(id, Slot::Retransmit);
                self.disarm(id, Slot::Deadline);
                let linger = if reliable { Duration::ZERO } else { cfg.t4 };
                self.arm(id, Slot::Linger, now + linger);
                Incoming::Response(id)
            }
        }
    }

    /// Starts a client transaction for `request` (which the TU built with a fresh `branch`) toward
    /// `dest`. Returns `None` when the layer is full (the TU answers its own caller 503).
    pub fn send_request(
        &mut self,
        now: Instant,
        request: Bytes,
        dest: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) -> Option<TxnId> {
        self.send_request_with_fallback(now, request, dest, None, local, transport)
    }

    /// [`Self::send_request`] with a [`Transmit::fallback`] address for a reliable transport (an
    /// in-dialog request toward a peer whose connection may have closed).
    pub fn send_request_with_fallback(
        &mut self,
        now: Instant,
        request: Bytes,
        dest: SocketAddr,
        fallback: Option<SocketAddr>,
        local: SocketAddr,
        transport: Transport,
    ) -> Option<TxnId> {
        let (key, invite, limit) = {
            let msg = parse(&request, Framing::Stream).ok()?;
            let StartLine::Request {
                method,
                method_token,
                ..
            } = msg.start
            else {
                return None;
            };
            let key = Self::key_of(&msg, method_token)?;
            (
                Key {
                    sent_by: String::new(),
                    ..key
                },
                method == Method::Invite,
                self.limit_for(method),
            )
        };
        if self.txns.len() >= limit || self.client.contains_key(&key) {
            return None;
        }
        let id = self.alloc();
        let t1 = self.cfg.t1;
        self.txns.insert(
            id,
            Txn {
                kind: if invite {
                    Kind::ClientInvite
                } else {
                    Kind::ClientNonInvite
                },
                state: State::Trying,
                dest,
                fallback: fallback.filter(|_| transport.is_reliable()),
                local,
                transport,
                key: key.clone(),
                message: Some(request.clone()),
                ack: None,
                ack_key: None,
                interval: t1,
                timers: [None; 3],
            },
        );
        self.client.insert(key, id);
        self.send(id, request);
        if !transport.is_reliable() {
            self.arm(id, Slot::Retransmit, now + t1);
        }
        self.arm(id, Slot::Deadline, now + t1 * 64);
        Some(id)
    }

    /// Sends `response` (built by the TU for the request of server transaction `id`). Returns false
    /// if the transaction is gone or already has a final response.
    pub fn respond(&mut self, now: Instant, id: TxnId, code: u16, response: Bytes) -> bool {
        let cfg = self.cfg;
        let Some(t) = self.txns.get_mut(&id) else {
            return false;
        };
        if !matches!(t.state, State::Trying | State::Proceeding) {
            return false;
        }
        let reliable = t.transport.is_reliable();
        t.message = Some(response.clone());
        let kind = t.kind;
        if code < 200 {
            t.state = State::Proceeding;
            self.send(id, response);
            return true;
        }
        match kind {
            Kind::ServerInvite => {
                if code < 300 {
                    t.state = State::Accepted;
                    let ack_key = parse(&response, Framing::Stream)
                        .ok()
                        .and_then(|m| Some((m.call_id()?.to_owned(), m.cseq()?.0)));
                    if let Some(k) = ack_key.clone() {
                        self.accepted.insert(k, id);
                    }
                    t.ack_key = ack_key;
                } else {
                    t.state = State::Completed;
                }
                t.interval = cfg.t1;
                self.send(id, response);
                if !reliable {
                    self.arm(id, Slot::Retransmit, now + cfg.t1);
                }
                self.arm(id, Slot::Deadline, now + cfg.t1 * 64);
            }
            _ => {
                t.state = State::Completed;
                self.send(id, response);
                self.disarm(id, Slot::Deadline);
                let linger = if reliable {
                    Duration::ZERO
                } else {
                    cfg.t1 * 64
                };
                self.arm(id, Slot::Linger, now + linger);
            }
        }
        true
    }

    /// Queues a message outside any transaction (ACK for a 2xx, stateless 503).
    pub fn send_stateless(&mut self, transmit: Transmit) {
        self.transmits.push_back(transmit);
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id, slot))) = self.heap.peek().copied() {
            if self.txns.get(&id).and_then(|t| t.timers[slot as usize]) == Some(at) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, id, slot))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            let live = self.txns.get(&id).and_then(|t| t.timers[slot as usize]) == Some(at);
            if live {
                self.fire(now, id, slot);
            }
        }
    }

    fn fire(&mut self, now: Instant, id: TxnId, slot: Slot) {
        let cfg = self.cfg;
        let Some(t) = self.txns.get_mut(&id) else {
            return;
        };
        t.timers[slot as usize] = None;
        match slot {
            Slot::Linger => self.remove(id),
            Slot::Retransmit => {
                let next = match (t.kind, t.state) {
                    // A doubles without limit; E and G double up to T2, E stays at T2 in Proceeding.
                    (Kind::ClientInvite, _) => t.interval * 2,
                    (Kind::ClientNonInvite, State::Proceeding) => cfg.t2,
                    _ => (t.interval * 2).min(cfg.t2),
                };
                t.interval = next;
                if let Some(m) = t.message.clone() {
                    self.retransmissions += 1;
                    self.send(id, m);
                }
                self.arm(id, Slot::Retransmit, now + next);
            }
            Slot::Deadline => {
                let ev = match t.kind {
                    Kind::ClientInvite | Kind::ClientNonInvite => Some(TxnEvent::Timeout(id)),
                    Kind::ServerInvite if matches!(t.state, State::Completed | State::Accepted) => {
                        Some(TxnEvent::AckTimeout(id))
                    }
                    _ => None,
                };
                if let Some(ev) = ev {
                    self.events.push_back(ev);
                }
                self.remove(id);
            }
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<TxnEvent> {
        self.events.pop_front()
    }
}

/// The ACK a client INVITE transaction sends for a non-2xx final response (§17.1.1.3): same
/// Request-URI, top Via, From, Call-ID, CSeq number and Route as the request, To from the response.
fn build_ack(request: &[u8], response: &Message<'_>) -> Option<Bytes> {
    let req = parse(request, Framing::Stream).ok()?;
    let StartLine::Request { uri, .. } = req.start else {
        return None;
    };
    let mut out = Vec::with_capacity(request.len().min(1024));
    let mut w = MessageWriter::request(&mut out, "ACK", uri);
    w.header("Via", req.header_values(Hdr::Via).next()?);
    for r in req.header_lines(Hdr::Route) {
        w.header("Route", r);
    }
    w.header("Max-Forwards", "70")
        .header("From", req.header(Hdr::From)?)
        .header("To", response.header(Hdr::To)?)
        .header("Call-ID", req.call_id()?)
        .header_fmt("CSeq", format_args!("{} ACK", req.cseq()?.0));
    w.finish(b"");
    Some(Bytes::from(out))
}
