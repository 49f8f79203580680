//! The back-to-back user agent, sans-IO.
//!
//! Each call is two dialogs: the A leg, where we are the UAS for the VCS, and the B leg, where we
//! are the UAC toward a bridge, with its own Call-ID, tags, Via and Contact; nothing of one leg's
//! routing headers leaks into the other. SDP bodies are passed through untouched (no media
//! anchoring). Routing is asynchronous (the directory is a replicated store), so the core asks for
//! it with [`B2buaEvent::Route`] and is answered through [`B2bua::handle_route`].
//!
//! Driving order, for one [`B2bua`]:
//! 1. feed every received message to [`B2bua::handle_datagram`];
//! 2. when [`B2bua::poll_timeout`] passes, call [`B2bua::handle_timeout`];
//! 3. answer each [`B2buaEvent::Route`] with [`B2bua::handle_route`] (from another task is fine:
//!    the core only needs the answer eventually; the call waits meanwhile);
//! 4. after each of these, drain [`B2bua::poll_transmit`] to the sockets and [`B2bua::poll_event`]
//!    (routing requests, resources to release, bridge health changes).
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::routing::{Route, RouteDecision, RouteRequest};
use crate::sip::Transport;
use crate::sip::build::{MessageWriter, reason_phrase};
use crate::sip::parse::{
    self, Framing, Hdr, Message, Method, NameAddr, SipUri, StartLine, error_response,
};
use crate::sip::transaction::{
    Incoming, TimerConfig, Transactions, Transmit, TxnEvent, TxnId, response_fallback,
};

/// Bridges tried for one call before the last failure is relayed to the caller.
const MAX_BRIDGE_ATTEMPTS: usize = 3;
/// Methods we accept, advertised in Allow.
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE";

/// Settings of the core; all have working defaults except `seed`, which the driver draws.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Our host name, in Warning headers.
    pub hostname: String,
    /// Transaction timers.
    pub timers: TimerConfig,
    /// Calls in progress beyond which new INVITEs get 503.
    pub max_calls: usize,
    /// Live transactions beyond which new requests get a stateless 503 (BYE and CANCEL have
    /// half as much again). Finished transactions linger to absorb retransmissions (over UDP
    /// 32 s for the caller's BYE, 5 s for an acknowledged INVITE and our BYE), so a call holds
    /// about 42 transaction-seconds: the default sustains about 4,700 calls/s, at roughly 1 KiB
    /// per transaction.
    pub max_transactions: usize,
    /// Interval of the OPTIONS health probes to bridges; zero disables probing (every bridge is
    /// then healthy until a call to it times out).
    pub options_interval: Duration,
    /// Consecutive unanswered OPTIONS probes after which a bridge counts as down (at least 1);
    /// one answer brings it back up. See [`B2bua::set_options_failures`].
    pub options_failures: u32,
    /// Longest a call may last, from its INVITE: then both legs get a BYE (or the caller an error
    /// and the bridge a CANCEL, if it is not answered yet), so that no call outlives a lost BYE.
    /// Never zero (see [`B2bua::set_max_call_duration`]).
    pub max_call_duration: Duration,
    /// Seeds tags, branches and Call-IDs (unique per instance; taken from the OS by the driver).
    pub seed: u64,
    /// Prefix of the Call-IDs this core generates (B legs, probes): the driver's shard tag
    /// (`cms<k>-`, see [`crate::sip::transport::shard_of`]), so that the bridge's messages come
    /// back to this core; empty with one core.
    pub call_id_prefix: String,
}

/// Default of [`CoreConfig::max_call_duration`]: a day, far beyond any conference.
pub const DEFAULT_MAX_CALL_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Default of [`CoreConfig::options_failures`].
pub const DEFAULT_OPTIONS_FAILURES: u32 = 3;

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            hostname: "confmesh".to_owned(),
            timers: TimerConfig::default(),
            max_calls: 10_000,
            max_transactions: 200_000,
            options_interval: Duration::from_secs(5),
            options_failures: DEFAULT_OPTIONS_FAILURES,
            max_call_duration: DEFAULT_MAX_CALL_DURATION,
            seed: 0,
            call_id_prefix: String::new(),
        }
    }
}

/// Identifies a call between the core and its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(u64);

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum B2buaEvent {
    /// Route this call (reserving what it uses), then answer with [`B2bua::handle_route`].
    Route {
        /// The call.
        call: CallId,
        /// What to route.
        request: RouteRequest,
    },
    /// A call ended or failed after routing: give back its participant slot and bandwidth.
    Release(Route),
    /// A bridge answered or stopped answering.
    BridgeHealth {
        /// Bridge name.
        bridge: String,
        /// Whether it answers.
        up: bool,
    },
}

/// A bridge to probe with OPTIONS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeProbe {
    /// Bridge name.
    pub name: String,
    /// Its configured URI (the OPTIONS Request-URI).
    pub uri: String,
    /// Its address.
    pub dest: SocketAddr,
    /// Its transport.
    pub transport: Transport,
}

/// Counters for status and `/metrics`; their meaning is written next to each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct B2buaStats {
    /// Calls in progress (routing, ringing or connected).
    pub calls_active: usize,
    /// INVITEs that started a call.
    pub calls_total: u64,
    /// Calls the bridge answered (200 relayed to the caller).
    pub calls_answered: u64,
    /// Calls refused by routing or admission (404, 488, 503) or by a bridge (relayed error).
    pub calls_failed: u64,
    /// Calls cancelled by the caller before an answer.
    pub calls_cancelled: u64,
    /// Calls moved to another bridge because the first failed before the conference started.
    pub bridge_failovers: u64,
    /// Messages that did not parse (answered 400 where a response was due, else dropped).
    pub parse_errors: u64,
    /// Requests refused statelessly because of the call or transaction limits.
    pub overloaded: u64,
    /// Retransmissions sent by the transaction layer.
    pub retransmissions: u64,
    /// Calls ended because they reached the maximum call duration.
    pub calls_expired: u64,
    /// Answered calls hung up because the caller never acknowledged the answer (RFC 3261
    /// §13.3.1.4: no ACK within 64·T1).
    pub calls_unacknowledged: u64,
    /// Live transactions.
    pub transactions: usize,
}

/// One call as shown in status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallInfo {
    /// Conference, once routed.
    pub conference: Option<String>,
    /// Bridge, once routed.
    pub bridge: Option<String>,
    /// `routing`, `calling`, `connecting`, `connected` or `ending`.
    pub state: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    A,
    B,
}

impl Leg {
    fn other(self) -> Leg {
        match self {
            Leg::A => Leg::B,
            Leg::B => Leg::A,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    Routing,
    Calling,
    AwaitAck,
    Established,
    Ending,
}

#[derive(Debug)]
struct Dialog {
    call_id: String,
    /// Our From (B leg) or To (A leg) value, tag included.
    local_hdr: String,
    /// Their From (A leg) or To (B leg) value, tag included once known.
    remote_hdr: String,
    local_cseq: u32,
    remote_target: String,
    route_set: Vec<String>,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
}

#[derive(Debug)]
struct Call {
    state: CallState,
    a: Dialog,
    b: Option<Dialog>,
    a_invite: Bytes,
    a_txn: Option<TxnId>,
    b_txn: Option<TxnId>,
    b_invite: Option<Bytes>,
    b_provisional: bool,
    b_cancel_sent: bool,
    cancelled: bool,
    route: Option<Route>,
    failed: Vec<String>,
    /// The last ACK sent on each leg, re-sent when a 2xx is retransmitted.
    last_ack: [Option<Bytes>; 2],
    /// A re-INVITE in progress: the leg it came from and the CSeq it has on the other leg.
    reinvite: Option<(Leg, u32)>,
    reinvite_awaiting_ack: bool,
    /// We sent the caller a 2xx: the A dialog must be hung up with BYE.
    a_confirmed: bool,
    /// The bridge sent us a 2xx: the B dialog must be hung up with BYE.
    b_confirmed: bool,
    /// BYEs sent and not yet finished; the call is forgotten when none is left.
    byes: u32,
    txns: Vec<TxnId>,
    /// When the INVITE arrived: the call expires at `started + max_call_duration`.
    started: Instant,
    /// Set when the call reached its maximum duration and was ended: the time after which it is
    /// forgotten even if a BYE or the bridge's INVITE is still unfinished.
    forget_at: Option<Instant>,
}

#[derive(Debug, Clone)]
enum Role {
    AInvite,
    BInvite,
    Cancel,
    Bye,
    /// A client transaction relaying a request from the other leg; the server transaction and
    /// the request it answers.
    Relay {
        server: TxnId,
        request: Bytes,
        reinvite: bool,
    },
    /// The server transaction of a re-INVITE we relayed: its 2xx must be acknowledged.
    ReinviteServer,
}

/// Health of one bridge, hysteretic: **down** only after [`CoreConfig::options_failures`]
/// consecutive probes got no answer within one interval (or a call's INVITE to it timed out),
/// **up** again at the first answer.
///
/// Any response counts as an answer, 503 and other errors included: the question a probe asks is
/// whether the bridge's SIP stack is reachable and alive, and a 503 proves it is. Whether it will
/// take a call is answered per call (a 503 to an INVITE moves that call to the next bridge, and
/// capacity is held by the participant counts), so marking a bridge down on a 503 would only move
/// conferences away from a bridge that is busy for a moment. A single lost reply proves little
/// under load (our own inbound queue, or a full socket buffer, may drop it), hence the count.
#[derive(Debug)]
struct ProbeState {
    probe: BridgeProbe,
    outstanding: Option<(TxnId, Instant)>,
    up: Option<bool>,
    /// Consecutive probes without an answer.
    failures: u32,
}

/// Optional parts of a response we build.
#[derive(Default)]
struct Extra<'a> {
    to_tag: Option<&'a str>,
    contact: Option<&'a str>,
    record_route: bool,
    body: Option<(Option<&'a str>, &'a [u8])>,
    warning: Option<&'a str>,
    allow: bool,
}

/// The B2BUA core; see the module documentation for the driving order.
pub struct B2bua {
    cfg: CoreConfig,
    txns: Transactions,
    counter: u64,
    next_call: u64,
    calls: HashMap<CallId, Call>,
    call_ids: HashMap<String, (CallId, Leg)>,
    roles: HashMap<TxnId, (CallId, Role)>,
    probes: Vec<ProbeState>,
    /// OPTIONS transactions in flight: the probe index, and whether the probe was already counted
    /// as failed (it was unanswered after one interval; a late answer still counts as alive).
    probe_txns: HashMap<TxnId, (usize, bool)>,
    probe_local: Option<SocketAddr>,
    next_probe: Option<Instant>,
    /// Every call by its start: the first one is the next to reach the maximum duration (all
    /// calls share the limit, so start order is expiry order, and a changed limit needs no
    /// re-sorting).
    by_start: BTreeSet<(Instant, CallId)>,
    /// Calls ended at their maximum duration, by the time they are forgotten regardless.
    forgetting: BTreeSet<(Instant, CallId)>,
    events: VecDeque<B2buaEvent>,
    stats: B2buaStats,
}

impl B2bua {
    /// A core with no calls and no bridges to probe.
    pub fn new(cfg: CoreConfig) -> Self {
        B2bua {
            txns: Transactions::new(cfg.timers, cfg.max_transactions),
            cfg,
            counter: 0,
            next_call: 1,
            calls: HashMap::new(),
            call_ids: HashMap::new(),
            roles: HashMap::new(),
            probes: Vec::new(),
            probe_txns: HashMap::new(),
            probe_local: None,
            next_probe: None,
            by_start: BTreeSet::new(),
            forgetting: BTreeSet::new(),
            events: VecDeque::new(),
            stats: B2buaStats::default(),
        }
    }

    /// Replaces the set of bridges probed with OPTIONS (sent from `local`); keeps the health of
    /// bridges that stay. The first probes go out at once.
    pub fn set_bridges(&mut self, now: Instant, local: SocketAddr, bridges: Vec<BridgeProbe>) {
        let old = std::mem::take(&mut self.probes);
        self.probe_txns.clear();
        self.probes = bridges
            .into_iter()
            .map(|probe| {
                let (up, failures) = old
                    .iter()
                    .find(|o| o.probe == probe)
                    .map_or((None, 0), |o| (o.up, o.failures));
                ProbeState {
                    probe,
                    outstanding: None,
                    up,
                    failures,
                }
            })
            .collect();
        self.probe_local = Some(local);
        self.next_probe = (!self.cfg.options_interval.is_zero()).then_some(now);
    }

    /// Changes the interval of the OPTIONS probes (zero stops probing; every bridge then counts
    /// as healthy until a call to it fails). A new interval probes at once.
    pub fn set_options_interval(&mut self, now: Instant, interval: Duration) {
        if interval == self.cfg.options_interval {
            return;
        }
        self.cfg.options_interval = interval;
        if interval.is_zero() {
            self.next_probe = None;
            self.probe_txns.clear();
            for p in &mut self.probes {
                p.outstanding = None;
            }
        } else if self.probe_local.is_some() {
            self.next_probe = Some(now);
        }
    }

    /// Changes the maximum call duration; calls in progress are held to the new limit (counted
    /// from their INVITE). Zero is refused (it would end every call at once): the limit stays.
    pub fn set_max_call_duration(&mut self, limit: Duration) -> bool {
        if limit.is_zero() {
            return false;
        }
        self.cfg.max_call_duration = limit;
        true
    }

    /// Changes how many consecutive probes a bridge may leave unanswered before it counts as
    /// down (zero is taken as one).
    pub fn set_options_failures(&mut self, n: u32) {
        self.cfg.options_failures = n.max(1);
    }

    /// Counters now.
    pub fn stats(&self) -> B2buaStats {
        B2buaStats {
            calls_active: self.calls.len(),
            retransmissions: self.txns.retransmissions(),
            transactions: self.txns.len(),
            ..self.stats
        }
    }

    /// Calls in progress.
    pub fn calls(&self) -> Vec<CallInfo> {
        self.calls
            .values()
            .map(|c| CallInfo {
                conference: c.route.as_ref().map(|r| r.conference.clone()),
                bridge: c.route.as_ref().map(|r| r.bridge.clone()),
                state: match c.state {
                    CallState::Routing => "routing",
                    CallState::Calling => "calling",
                    CallState::AwaitAck => "connecting",
                    CallState::Established => "connected",
                    CallState::Ending => "ending",
                },
            })
            .collect()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.txns.poll_transmit()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<B2buaEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let expiry = self
            .by_start
            .first()
            .map(|&(started, _)| later(started, self.cfg.max_call_duration));
        let forget = self.forgetting.first().map(|&(at, _)| at);
        [self.txns.poll_timeout(), self.next_probe, expiry, forget]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires due transaction timers and health probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.txns.handle_timeout(now);
        while let Some(ev) = self.txns.poll_event() {
            match ev {
                TxnEvent::Timeout(id) => self.on_client_timeout(now, id),
                TxnEvent::AckTimeout(id) => self.on_ack_timeout(now, id),
            }
        }
        if self.next_probe.is_some_and(|t| t <= now) {
            self.probe(now);
        }
        self.expire_calls(now);
    }

    /// Ends the calls that reached the maximum duration, and forgets those that still have not
    /// finished ending 64·T1 later.
    fn expire_calls(&mut self, now: Instant) {
        while let Some(&(at, call_id)) = self.forgetting.first() {
            if at > now {
                break;
            }
            self.forgetting.pop_first();
            if self.calls.contains_key(&call_id) {
                tracing::warn!("a call past its maximum duration did not finish ending; forgotten");
                self.remove_call(call_id);
            }
        }
        while let Some(&(started, call_id)) = self.by_start.first() {
            if later(started, self.cfg.max_call_duration) > now {
                break;
            }
            self.by_start.pop_first();
            let Some(call) = self.calls.get_mut(&call_id) else {
                continue;
            };
            let forget_at = later(now, self.cfg.timers.t1 * 64);
            call.forget_at = Some(forget_at);
            self.forgetting.insert((forget_at, call_id));
            self.stats.calls_expired += 1;
            tracing::info!(
                limit_s = self.cfg.max_call_duration.as_secs(),
                "call reached its maximum duration; hanging up"
            );
            if call.a_txn.is_some() {
                // Not answered yet: the caller gets an error, a ringing bridge a CANCEL.
                self.fail_a(now, call_id, 408, "maximum call duration reached");
            } else {
                self.end_call(now, call_id, None);
            }
        }
    }

    fn token(&mut self) -> String {
        self.counter += 1;
        // splitmix64 over seed and counter: unique per instance, unpredictable enough for tags.
        let mut z = self
            .cfg
            .seed
            .wrapping_add(self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        format!("{z:016x}{:x}", self.counter)
    }

    fn warning(&self, text: &str) -> String {
        format!(
            "399 {} \"{}\"",
            self.cfg.hostname,
            text.replace(['"', '\\', '\r', '\n'], "'")
        )
    }

    /// Feeds one received message (a datagram, or one frame of a stream).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        data: &[u8],
    ) {
        let framing = match transport {
            Transport::Udp => Framing::Datagram,
            Transport::Tcp => Framing::Stream,
        };
        let msg = match parse::parse(data, framing) {
            Ok(m) => m,
            Err(e) => {
                self.stats.parse_errors += 1;
                tracing::debug!(%src, error = %e, "malformed SIP message");
                let mut out = Vec::new();
                if error_response(data, e, &mut out) {
                    self.txns
                        .send_stateless(Transmit::to(src, local, transport, out.into()));
                }
                return;
            }
        };
        match self.txns.handle_message(now, &msg, src, local, transport) {
            Incoming::Request(id) => self.on_request(now, id, &msg, data, src, local, transport),
            Incoming::Cancel { cancel, invite } => self.on_cancel(now, cancel, invite, &msg),
            Incoming::Ack => self.on_ack(&msg),
            Incoming::Response(id) => self.on_response(now, id, &msg),
            Incoming::StrayResponse => self.on_stray(&msg),
            Incoming::Absorbed => {}
            Incoming::Overloaded => {
                self.stats.overloaded += 1;
                if msg.method().is_some_and(|m| m != Method::Ack) {
                    let data = response_bytes(&msg, 503, "Service Unavailable", &Extra::default());
                    let fallback = response_fallback(&msg, src, transport);
                    self.txns.send_stateless(Transmit {
                        dest: src,
                        local,
                        transport,
                        data,
                        fallback,
                    });
                }
            }
        }
    }

    fn respond(
        &mut self,
        now: Instant,
        txn: TxnId,
        req: &Message<'_>,
        code: u16,
        reason: &str,
        extra: &Extra<'_>,
    ) {
        let data = response_bytes(req, code, reason, extra);
        self.txns.respond(now, txn, code, data);
    }

    fn respond_raw(
        &mut self,
        now: Instant,
        txn: TxnId,
        raw: &[u8],
        code: u16,
        reason: &str,
        extra: &Extra<'_>,
    ) {
        if let Ok(req) = parse::parse(raw, Framing::Datagram) {
            self.respond(now, txn, &req, code, reason, extra);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_request(
        &mut self,
        now: Instant,
        id: TxnId,
        msg: &Message<'_>,
        raw: &[u8],
        src: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) {
        let method = msg.method().unwrap_or(Method::Other);
        if msg.to_tag().is_some() {
            let found = msg.call_id().and_then(|c| self.call_ids.get(c).copied());
            match found {
                Some((call, leg)) => self.in_dialog(now, id, call, leg, msg, raw),
                None => self.respond(now, id, msg, 481, reason_phrase(481), &Extra::default()),
            }
            return;
        }
        match method {
            Method::Invite => self.new_call(now, id, msg, raw, src, local, transport),
            Method::Options => {
                let extra = Extra {
                    to_tag: Some("cm-options"),
                    allow: true,
                    ..Extra::default()
                };
                self.respond(now, id, msg, 200, "OK", &extra);
            }
            Method::Bye => self.respond(now, id, msg, 481, reason_phrase(481), &Extra::default()),
            _ => {
                let extra = Extra {
                    allow: true,
                    ..Extra::default()
                };
                self.respond(now, id, msg, 405, reason_phrase(405), &extra);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_call(
        &mut self,
        now: Instant,
        id: TxnId,
        msg: &Message<'_>,
        raw: &[u8],
        src: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) {
        if self.calls.len() >= self.cfg.max_calls {
            self.stats.overloaded += 1;
            let w = self.warning("call limit reached");
            self.respond(
                now,
                id,
                msg,
                503,
                "Service Unavailable",
                &Extra {
                    warning: Some(&w),
                    ..Extra::default()
                },
            );
            return;
        }
        if msg
            .header(Hdr::MaxForwards)
            .and_then(|v| v.trim().parse::<u32>().ok())
            == Some(0)
        {
            self.respond(now, id, msg, 483, reason_phrase(483), &Extra::default());
            return;
        }
        let (Some(call_id), Some(from), Some(to)) =
            (msg.call_id(), msg.header(Hdr::From), msg.header(Hdr::To))
        else {
            return;
        };
        if self.call_ids.contains_key(call_id) {
            self.respond(now, id, msg, 482, "Loop Detected", &Extra::default());
            return;
        }
        let StartLine::Request { uri, .. } = msg.start else {
            return;
        };
        let Some(ruri) = SipUri::parse(uri) else {
            return;
        };
        let called = match ruri.user_plain() {
            Some(u) => format!("{u}@{}", ruri.host.to_ascii_lowercase()),
            None => ruri.host.to_ascii_lowercase(),
        };
        let tag = self.token();
        let remote_target = msg
            .header_values(Hdr::Contact)
            .next()
            .and_then(NameAddr::parse)
            .map(|n| n.uri.to_owned())
            .unwrap_or_else(|| {
                NameAddr::parse(from)
                    .map(|n| n.uri.to_owned())
                    .unwrap_or_default()
            });
        let a = Dialog {
            call_id: call_id.to_owned(),
            local_hdr: format!("{to};tag={tag}"),
            remote_hdr: from.to_owned(),
            local_cseq: 0,
            remote_target,
            route_set: msg
                .header_values(Hdr::RecordRoute)
                .map(str::to_owned)
                .collect(),
            peer: src,
            local,
            transport,
        };
        let call = CallId(self.next_call);
        self.next_call += 1;
        self.stats.calls_total += 1;
        self.respond(now, id, msg, 100, "Trying", &Extra::default());
        self.call_ids.insert(call_id.to_owned(), (call, Leg::A));
        self.roles.insert(id, (call, Role::AInvite));
        self.calls.insert(
            call,
            Call {
                state: CallState::Routing,
                a,
                b: None,
                a_invite: Bytes::copy_from_slice(raw),
                a_txn: Some(id),
                b_txn: None,
                b_invite: None,
                b_provisional: false,
                b_cancel_sent: false,
                cancelled: false,
                route: None,
                failed: Vec::new(),
                last_ack: [None, None],
                reinvite: None,
                reinvite_awaiting_ack: false,
                a_confirmed: false,
                b_confirmed: false,
                byes: 0,
                txns: vec![id],
                started: now,
                forget_at: None,
            },
        );
        self.by_start.insert((now, call));
        self.events.push_back(B2buaEvent::Route {
            call,
            request: RouteRequest {
                called,
                failed_bridges: Vec::new(),
                previous: None,
            },
        });
    }

    /// The routing answer for a [`B2buaEvent::Route`].
    pub fn handle_route(&mut self, now: Instant, call_id: CallId, decision: RouteDecision) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            if let RouteDecision::Forward { route, .. } = decision {
                self.events.push_back(B2buaEvent::Release(route));
            }
            return;
        };
        if call.cancelled || call.state != CallState::Routing {
            if let RouteDecision::Forward { route, .. } = decision {
                self.events.push_back(B2buaEvent::Release(route));
            }
            if call.cancelled {
                self.remove_call(call_id);
            }
            return;
        }
        match decision {
            RouteDecision::Reject {
                code,
                reason,
                warning,
            } => {
                let tag = tag_of(&call.a.local_hdr);
                let pending = call.a_txn.take().map(|t| (t, call.a_invite.clone()));
                self.stats.calls_failed += 1;
                let w = warning.map(|w| self.warning(&w));
                let extra = Extra {
                    to_tag: Some(&tag),
                    warning: w.as_deref(),
                    ..Extra::default()
                };
                if let Some((txn, raw)) = pending {
                    self.respond_raw(now, txn, &raw, code, &reason, &extra);
                }
                self.remove_call(call_id);
            }
            RouteDecision::Forward {
                route,
                uri,
                dest,
                transport,
            } => {
                self.forward(now, call_id, route, &uri, dest, transport);
            }
        }
    }

    fn forward(
        &mut self,
        now: Instant,
        call_id: CallId,
        route: Route,
        uri: &str,
        dest: SocketAddr,
        transport: Transport,
    ) {
        let (branch, tag, cid) = (self.token(), self.token(), self.token());
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Ok(a) = parse::parse(&call.a_invite, Framing::Datagram) else {
            return;
        };
        let local = call.a.local;
        let from = a
            .header(Hdr::From)
            .and_then(NameAddr::parse)
            .map(|n| {
                if n.display.is_empty() {
                    format!("<{}>", n.uri)
                } else {
                    format!("{} <{}>", n.display, n.uri)
                }
            })
            .unwrap_or_default();
        let max_forwards = a
            .header(Hdr::MaxForwards)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(70, |m| m.saturating_sub(1).min(70));
        let call_id_b = format!("{}{cid}@{}", self.cfg.call_id_prefix, local.ip());
        let mut out = Vec::with_capacity(a.body.len() + 600);
        let mut w = MessageWriter::request(&mut out, "INVITE", uri);
        w.header_fmt(
            "Via",
            format_args!(
                "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
                transport.as_str(),
                local
            ),
        )
        .header_fmt("Max-Forwards", format_args!("{max_forwards}"))
        .header_fmt("From", format_args!("{from};tag={tag}"))
        .header_fmt("To", format_args!("<{uri}>"))
        .header("Call-ID", &call_id_b)
        .header("CSeq", "1 INVITE")
        .header("Contact", &contact(local, transport))
        .header("Allow", ALLOW);
        if let Some(ct) = a.header(Hdr::ContentType) {
            w.header("Content-Type", ct);
        }
        w.finish(a.body);
        let request = Bytes::from(out);
        let Some(txn) = self
            .txns
            .send_request(now, request.clone(), dest, local, transport)
        else {
            self.events.push_back(B2buaEvent::Release(route));
            self.fail_a(now, call_id, 503, "transaction limit reached");
            return;
        };
        let b = Dialog {
            call_id: call_id_b.clone(),
            local_hdr: format!("{from};tag={tag}"),
            remote_hdr: format!("<{uri}>"),
            local_cseq: 1,
            remote_target: uri.to_owned(),
            route_set: Vec::new(),
            peer: dest,
            local,
            transport,
        };
        call.b = Some(b);
        call.b_txn = Some(txn);
        call.b_invite = Some(request);
        call.b_provisional = false;
        call.b_cancel_sent = false;
        call.route = Some(route);
        call.state = CallState::Calling;
        call.txns.push(txn);
        self.call_ids.insert(call_id_b, (call_id, Leg::B));
        self.roles.insert(txn, (call_id, Role::BInvite));
    }

    /// Answers the A leg's INVITE with an error and ends the call.
    fn fail_a(&mut self, now: Instant, call_id: CallId, code: u16, why: &str) {
        self.stats.calls_failed += 1;
        let w = self.warning(why);
        if let Some((txn, raw, tag)) = self
            .calls
            .get_mut(&call_id)
            .and_then(|c| Some((c.a_txn.take()?, c.a_invite.clone(), tag_of(&c.a.local_hdr))))
        {
            let extra = Extra {
                to_tag: Some(&tag),
                warning: Some(&w),
                ..Extra::default()
            };
            self.respond_raw(now, txn, &raw, code, reason_phrase(code), &extra);
        }
        self.end_call(now, call_id, None);
    }

    fn on_response(&mut self, now: Instant, id: TxnId, msg: &Message<'_>) {
        if let Some((i, _)) = self.probe_txns.remove(&id) {
            // Any response, even a provisional or a 503, shows the bridge alive (see ProbeState).
            self.probe_answered(i, id);
            return;
        }
        let Some((call_id, role)) = self.roles.get(&id).cloned() else {
            return;
        };
        let code = msg.status().unwrap_or(500);
        if code >= 200 {
            self.roles.remove(&id);
        }
        match role {
            Role::BInvite => self.on_b_invite_response(now, call_id, code, msg),
            Role::Bye => {
                if code >= 200 {
                    self.bye_done(call_id);
                }
            }
            Role::Relay {
                server,
                request,
                reinvite,
            } => {
                if code == 100 {
                    return;
                }
                // The response came on the leg the request was relayed to; the answer goes back
                // to the other one.
                let leg = self.call_ids.get(msg.call_id().unwrap_or("")).map(|x| x.1);
                let mut origin_contact = None;
                if let (Some(call), Some(leg)) = (self.calls.get_mut(&call_id), leg) {
                    if reinvite && (200..300).contains(&code) {
                        if let Some(d) = dialog_mut_opt(call, leg) {
                            refresh_target(d, msg);
                        }
                        call.reinvite_awaiting_ack = true;
                    } else if reinvite && code >= 300 {
                        call.reinvite = None;
                    }
                    origin_contact =
                        dialog(call, leg.other()).map(|d| contact(d.local, d.transport));
                }
                let extra = Extra {
                    contact: if reinvite {
                        origin_contact.as_deref()
                    } else {
                        None
                    },
                    body: Some((msg.header(Hdr::ContentType), msg.body)),
                    ..Extra::default()
                };
                let reason = response_reason(msg);
                self.respond_raw(now, server, &request, code, reason, &extra);
            }
            Role::AInvite | Role::Cancel | Role::ReinviteServer => {}
        }
    }

    fn on_b_invite_response(
        &mut self,
        now: Instant,
        call_id: CallId,
        code: u16,
        msg: &Message<'_>,
    ) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        match code {
            100 => {}
            101..=199 => {
                call.b_provisional = true;
                if call.cancelled || call.state == CallState::Ending {
                    self.send_b_cancel(now, call_id);
                    return;
                }
                if let Some(b) = call.b.as_mut() {
                    if let Some(to) = msg.header(Hdr::To) {
                        b.remote_hdr = to.to_owned();
                    }
                }
                let (tag, raw, local, transport) = (
                    tag_of(&call.a.local_hdr),
                    call.a_invite.clone(),
                    call.a.local,
                    call.a.transport,
                );
                let Some(txn) = call.a_txn else { return };
                let c = contact(local, transport);
                let extra = Extra {
                    to_tag: Some(&tag),
                    contact: Some(&c),
                    record_route: true,
                    body: Some((msg.header(Hdr::ContentType), msg.body)),
                    ..Extra::default()
                };
                self.respond_raw(now, txn, &raw, code, response_reason(msg), &extra);
            }
            200..=299 => {
                call.b_txn = None;
                if let Some(b) = call.b.as_mut() {
                    if let Some(to) = msg.header(Hdr::To) {
                        b.remote_hdr = to.to_owned();
                    }
                    refresh_target(b, msg);
                    b.route_set = msg
                        .header_values(Hdr::RecordRoute)
                        .map(str::to_owned)
                        .collect();
                    b.route_set.reverse();
                }
                call.b_confirmed = true;
                if call.cancelled || call.a_txn.is_none() || call.state == CallState::Ending {
                    // The caller is gone: complete the B dialog and hang it up.
                    let ending = call.state == CallState::Ending;
                    self.send_ack(call_id, Leg::B, 1, None);
                    if ending {
                        self.send_bye(now, call_id, Leg::B);
                    } else {
                        self.end_call(now, call_id, None);
                    }
                    return;
                }
                call.state = CallState::AwaitAck;
                call.a_confirmed = true;
                self.stats.calls_answered += 1;
                let (tag, raw, local, transport) = (
                    tag_of(&call.a.local_hdr),
                    call.a_invite.clone(),
                    call.a.local,
                    call.a.transport,
                );
                let txn = call.a_txn.take();
                let c = contact(local, transport);
                let extra = Extra {
                    to_tag: Some(&tag),
                    contact: Some(&c),
                    record_route: true,
                    body: Some((msg.header(Hdr::ContentType), msg.body)),
                    ..Extra::default()
                };
                if let Some(txn) = txn {
                    self.respond_raw(now, txn, &raw, code, response_reason(msg), &extra);
                }
            }
            _ => {
                call.b_txn = None;
                let warning = find_header(msg, "Warning");
                self.b_failed(
                    now,
                    call_id,
                    code,
                    response_reason(msg).to_owned(),
                    warning.map(str::to_owned),
                    false,
                );
            }
        }
    }

    /// The B leg's INVITE failed: try the next bridge if the failure is the bridge's, else relay.
    fn b_failed(
        &mut self,
        now: Instant,
        call_id: CallId,
        code: u16,
        reason: String,
        warning: Option<String>,
        timeout: bool,
    ) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if let Some(b) = call.b.take() {
            self.call_ids.remove(&b.call_id);
        }
        if call.cancelled || call.a_txn.is_none() || call.state == CallState::Ending {
            self.end_call(now, call_id, None);
            self.maybe_remove(call_id);
            return;
        }
        // The bridge is down, overloaded or full (busy): another bridge may take the conference.
        // Other failures (403, 404, 488, 603…) are answers about the call and are relayed.
        let bridge_fault = timeout || matches!(code, 408 | 480 | 486 | 500 | 502 | 503 | 504 | 600);
        let route = call.route.take();
        if bridge_fault && call.failed.len() + 1 < MAX_BRIDGE_ATTEMPTS {
            if let Some(route) = route {
                call.failed.push(route.bridge.clone());
                call.state = CallState::Routing;
                let failed_bridges = call.failed.clone();
                let Ok(a) = parse::parse(&call.a_invite, Framing::Datagram) else {
                    return;
                };
                let called = match a.start {
                    StartLine::Request { uri, .. } => {
                        SipUri::parse(uri).map(|u| match u.user_plain() {
                            Some(user) => format!("{user}@{}", u.host.to_ascii_lowercase()),
                            None => u.host.to_ascii_lowercase(),
                        })
                    }
                    StartLine::Response { .. } => None,
                };
                if timeout {
                    self.mark_bridge(&route.bridge, false);
                }
                self.stats.bridge_failovers += 1;
                self.events.push_back(B2buaEvent::Route {
                    call: call_id,
                    request: RouteRequest {
                        called: called.unwrap_or_default(),
                        failed_bridges,
                        previous: Some(route),
                    },
                });
                return;
            }
        }
        if let Some(route) = route {
            if timeout {
                self.mark_bridge(&route.bridge, false);
            }
            self.events.push_back(B2buaEvent::Release(route));
        }
        self.stats.calls_failed += 1;
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let (tag, raw) = (tag_of(&call.a.local_hdr), call.a_invite.clone());
        if let Some(txn) = call.a_txn.take() {
            let extra = Extra {
                to_tag: Some(&tag),
                warning: warning.as_deref(),
                ..Extra::default()
            };
            self.respond_raw(now, txn, &raw, code, &reason, &extra);
        }
        self.remove_call(call_id);
    }

    /// A bridge failure seen by another core (a call's INVITE to it timed out there): this
    /// core probes the bridges, so its health view must learn it too.
    pub fn handle_bridge_down(&mut self, bridge: &str) {
        if let Some(i) = self.probes.iter().position(|p| p.probe.name == bridge) {
            if let Some(p) = self.probes.get_mut(i) {
                p.failures = self.cfg.options_failures;
            }
            self.set_probe(i, false);
        }
    }

    /// A call's INVITE to the bridge got no response at all within 64·T1 (timer B, seven
    /// retransmissions): as strong a sign as a run of lost probes, so down at once.
    fn mark_bridge(&mut self, name: &str, up: bool) {
        let n = self.cfg.options_failures;
        if let Some(i) = self.probes.iter().position(|p| p.probe.name == name) {
            if let Some(p) = self.probes.get_mut(i) {
                p.failures = if up { 0 } else { n };
            }
            self.set_probe(i, up);
        } else {
            self.events.push_back(B2buaEvent::BridgeHealth {
                bridge: name.to_owned(),
                up,
            });
        }
    }

    /// Probe `i` (transaction `txn`) got a response.
    fn probe_answered(&mut self, i: usize, txn: TxnId) {
        if let Some(p) = self.probes.get_mut(i) {
            p.failures = 0;
            if p.outstanding.is_some_and(|(t, _)| t == txn) {
                p.outstanding = None;
            }
        }
        self.set_probe(i, true);
    }

    /// Probe `i` went unanswered: one more failure; down once there are enough in a row.
    fn probe_failed(&mut self, i: usize) {
        let n = self.cfg.options_failures;
        let Some(p) = self.probes.get_mut(i) else {
            return;
        };
        p.outstanding = None;
        p.failures = p.failures.saturating_add(1);
        if p.failures >= n {
            self.set_probe(i, false);
        }
    }

    fn set_probe(&mut self, i: usize, up: bool) {
        if let Some(p) = self.probes.get_mut(i) {
            if p.up != Some(up) {
                p.up = Some(up);
                self.events.push_back(B2buaEvent::BridgeHealth {
                    bridge: p.probe.name.clone(),
                    up,
                });
            }
        }
    }

    fn send_b_cancel(&mut self, now: Instant, call_id: CallId) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if call.b_cancel_sent {
            return;
        }
        let (Some(inv), Some(b)) = (call.b_invite.clone(), call.b.as_ref()) else {
            return;
        };
        let Ok(req) = parse::parse(&inv, Framing::Stream) else {
            return;
        };
        let StartLine::Request { uri, .. } = req.start else {
            return;
        };
        let mut out = Vec::with_capacity(512);
        let mut w = MessageWriter::request(&mut out, "CANCEL", uri);
        if let (Some(via), Some(from), Some(to), Some(cid), Some((n, _))) = (
            req.header_values(Hdr::Via).next(),
            req.header(Hdr::From),
            req.header(Hdr::To),
            req.call_id(),
            req.cseq(),
        ) {
            w.header("Via", via)
                .header("Max-Forwards", "70")
                .header("From", from)
                .header("To", to)
                .header("Call-ID", cid)
                .header_fmt("CSeq", format_args!("{n} CANCEL"));
            w.finish(b"");
            let (dest, local, transport) = (b.peer, b.local, b.transport);
            call.b_cancel_sent = true;
            if let Some(txn) = self
                .txns
                .send_request(now, Bytes::from(out), dest, local, transport)
            {
                self.roles.insert(txn, (call_id, Role::Cancel));
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.txns.push(txn);
                }
            }
        }
    }

    fn on_cancel(&mut self, now: Instant, cancel: TxnId, invite: Option<TxnId>, msg: &Message<'_>) {
        let target = invite.and_then(|i| self.roles.get(&i).cloned());
        let Some((call_id, Role::AInvite)) = target else {
            let code = if invite.is_some() { 200 } else { 481 };
            self.respond(
                now,
                cancel,
                msg,
                code,
                reason_phrase(code),
                &Extra::default(),
            );
            return;
        };
        self.respond(now, cancel, msg, 200, "OK", &Extra::default());
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Some(txn) = call.a_txn.take() else { return };
        call.cancelled = true;
        self.stats.calls_cancelled += 1;
        let (tag, raw, state, provisional) = (
            tag_of(&call.a.local_hdr),
            call.a_invite.clone(),
            call.state,
            call.b_provisional,
        );
        self.respond_raw(
            now,
            txn,
            &raw,
            487,
            reason_phrase(487),
            &Extra {
                to_tag: Some(&tag),
                ..Extra::default()
            },
        );
        match state {
            // The route answer will find the call cancelled and release what it reserved.
            CallState::Routing => {}
            CallState::Calling if provisional => self.send_b_cancel(now, call_id),
            // No provisional yet: the CANCEL goes out with the first one (RFC 3261 §9.1); the B
            // INVITE's own timer B ends the call if the bridge stays silent.
            _ => {}
        }
    }

    fn on_ack(&mut self, msg: &Message<'_>) {
        let Some((call_id, leg)) = msg.call_id().and_then(|c| self.call_ids.get(c).copied()) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let body = Some((msg.header(Hdr::ContentType), msg.body));
        if leg == Leg::A && call.state == CallState::AwaitAck {
            call.state = CallState::Established;
            self.send_ack(call_id, Leg::B, 1, body);
        } else if call.reinvite_awaiting_ack {
            if let Some((from, cseq)) = call.reinvite {
                if from == leg {
                    call.reinvite = None;
                    call.reinvite_awaiting_ack = false;
                    self.send_ack(call_id, leg.other(), cseq, body);
                }
            }
        }
    }

    fn on_stray(&mut self, msg: &Message<'_>) {
        if !msg.status().is_some_and(|c| (200..300).contains(&c))
            || msg.cseq().map(|c| c.1) != Some("INVITE")
        {
            return;
        }
        let Some((call_id, leg)) = msg.call_id().and_then(|c| self.call_ids.get(c).copied()) else {
            return;
        };
        let idx = if leg == Leg::A { 0 } else { 1 };
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        if let (Some(ack), Some(d)) = (call.last_ack[idx].clone(), dialog(call, leg)) {
            let t = Transmit {
                dest: dialog_dest(d),
                local: d.local,
                transport: d.transport,
                data: ack,
                fallback: dialog_fallback(d),
            };
            self.txns.send_stateless(t);
        }
    }

    /// Sends the ACK for a 2xx on `leg` (CSeq number `cseq`), remembering it for retransmissions.
    fn send_ack(
        &mut self,
        call_id: CallId,
        leg: Leg,
        cseq: u32,
        body: Option<(Option<&str>, &[u8])>,
    ) {
        let branch = self.token();
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Some(d) = dialog(call, leg) else { return };
        let data = dialog_request(d, "ACK", cseq, &branch, body);
        let t = Transmit {
            dest: dialog_dest(d),
            local: d.local,
            transport: d.transport,
            data: data.clone(),
            fallback: dialog_fallback(d),
        };
        call.last_ack[if leg == Leg::A { 0 } else { 1 }] = Some(data);
        self.txns.send_stateless(t);
    }

    fn in_dialog(
        &mut self,
        now: Instant,
        id: TxnId,
        call_id: CallId,
        leg: Leg,
        msg: &Message<'_>,
        raw: &[u8],
    ) {
        let method = msg.method().unwrap_or(Method::Other);
        let Some(call) = self.calls.get_mut(&call_id) else {
            self.respond(now, id, msg, 481, reason_phrase(481), &Extra::default());
            return;
        };
        let dialog_up = matches!(call.state, CallState::AwaitAck | CallState::Established);
        match method {
            Method::Bye => {
                self.respond(now, id, msg, 200, "OK", &Extra::default());
                self.end_call(now, call_id, Some(leg));
            }
            _ if call.state == CallState::Ending => {
                self.respond(now, id, msg, 481, reason_phrase(481), &Extra::default());
            }
            Method::Invite if call.reinvite.is_some() || call.state != CallState::Established => {
                self.respond(now, id, msg, 491, reason_phrase(491), &Extra::default());
            }
            _ if !dialog_up => {
                self.respond(now, id, msg, 481, reason_phrase(481), &Extra::default());
            }
            _ => {
                let reinvite = method == Method::Invite;
                if reinvite {
                    if let Some(d) = dialog_mut_opt(call, leg) {
                        refresh_target(d, msg);
                    }
                }
                let branch = self.token();
                let Some(call) = self.calls.get_mut(&call_id) else {
                    return;
                };
                let StartLine::Request { method_token, .. } = msg.start else {
                    return;
                };
                let Some(other) = dialog_mut_opt(call, leg.other()) else {
                    return;
                };
                other.local_cseq = other.local_cseq.saturating_add(1);
                let cseq = other.local_cseq;
                let data = dialog_request(
                    other,
                    method_token,
                    cseq,
                    &branch,
                    Some((msg.header(Hdr::ContentType), msg.body)),
                );
                let (dest, fallback, local, transport) = (
                    dialog_dest(other),
                    dialog_fallback(other),
                    other.local,
                    other.transport,
                );
                match self
                    .txns
                    .send_request_with_fallback(now, data, dest, fallback, local, transport)
                {
                    Some(txn) => {
                        let role = Role::Relay {
                            server: id,
                            request: Bytes::copy_from_slice(raw),
                            reinvite,
                        };
                        self.roles.insert(txn, (call_id, role));
                        if let Some(call) = self.calls.get_mut(&call_id) {
                            call.txns.push(txn);
                            if reinvite {
                                call.reinvite = Some((leg, cseq));
                                call.txns.push(id);
                                self.roles.insert(id, (call_id, Role::ReinviteServer));
                            }
                        }
                    }
                    None => {
                        self.respond(now, id, msg, 503, "Service Unavailable", &Extra::default())
                    }
                }
            }
        }
    }

    /// Ends a call: BYE toward every confirmed leg except the one that hung up, CANCEL toward a
    /// bridge still ringing, resources released; the call is forgotten once those finish.
    fn end_call(&mut self, now: Instant, call_id: CallId, hung_up: Option<Leg>) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if call.state == CallState::Ending {
            return;
        }
        call.state = CallState::Ending;
        if let Some(route) = call.route.take() {
            self.events.push_back(B2buaEvent::Release(route));
        }
        let (a_up, b_up) = (call.a_confirmed, call.b_confirmed);
        if call.b_txn.is_some() && call.b_provisional {
            self.send_b_cancel(now, call_id);
        }
        for (leg, up) in [(Leg::A, a_up), (Leg::B, b_up)] {
            if up && hung_up != Some(leg) {
                self.send_bye(now, call_id, leg);
            }
        }
        self.maybe_remove(call_id);
    }

    /// Forgets an ending call once its B INVITE and BYEs have finished.
    fn maybe_remove(&mut self, call_id: CallId) {
        if self
            .calls
            .get(&call_id)
            .is_some_and(|c| c.state == CallState::Ending && c.b_txn.is_none() && c.byes == 0)
        {
            self.remove_call(call_id);
        }
    }

    fn send_bye(&mut self, now: Instant, call_id: CallId, leg: Leg) {
        let branch = self.token();
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Some(d) = dialog_mut_opt(call, leg) else {
            return;
        };
        d.local_cseq = d.local_cseq.saturating_add(1);
        let data = dialog_request(d, "BYE", d.local_cseq, &branch, None);
        let (dest, fallback, local, transport) =
            (dialog_dest(d), dialog_fallback(d), d.local, d.transport);
        match self
            .txns
            .send_request_with_fallback(now, data, dest, fallback, local, transport)
        {
            Some(txn) => {
                self.roles.insert(txn, (call_id, Role::Bye));
                call.txns.push(txn);
                call.byes += 1;
            }
            None => tracing::warn!("transaction limit reached: a BYE was not sent"),
        }
    }

    fn remove_call(&mut self, call_id: CallId) {
        if let Some(call) = self.calls.remove(&call_id) {
            self.by_start.remove(&(call.started, call_id));
            if let Some(at) = call.forget_at {
                self.forgetting.remove(&(at, call_id));
            }
            if let Some(route) = call.route {
                self.events.push_back(B2buaEvent::Release(route));
            }
            self.call_ids.remove(&call.a.call_id);
            if let Some(b) = call.b {
                self.call_ids.remove(&b.call_id);
            }
            for t in call.txns {
                self.roles.remove(&t);
            }
        }
    }

    fn bye_done(&mut self, call_id: CallId) {
        if let Some(c) = self.calls.get_mut(&call_id) {
            c.byes = c.byes.saturating_sub(1);
        }
        self.maybe_remove(call_id);
    }

    fn on_client_timeout(&mut self, now: Instant, id: TxnId) {
        if let Some((i, counted)) = self.probe_txns.remove(&id) {
            if !counted {
                self.probe_failed(i);
            }
            return;
        }
        let Some((call_id, role)) = self.roles.remove(&id) else {
            return;
        };
        match role {
            Role::BInvite => {
                if let Some(call) = self.calls.get_mut(&call_id) {
                    call.b_txn = None;
                    if call.state == CallState::Ending {
                        self.maybe_remove(call_id);
                        return;
                    }
                }
                self.b_failed(now, call_id, 408, "Request Timeout".to_owned(), None, true);
            }
            Role::Bye => self.bye_done(call_id),
            Role::Relay {
                server,
                request,
                reinvite,
            } => {
                if reinvite {
                    if let Some(call) = self.calls.get_mut(&call_id) {
                        call.reinvite = None;
                    }
                }
                self.respond_raw(
                    now,
                    server,
                    &request,
                    408,
                    reason_phrase(408),
                    &Extra::default(),
                );
            }
            Role::Cancel | Role::AInvite | Role::ReinviteServer => {}
        }
    }

    /// A 2xx we sent to an INVITE was not acknowledged within 64·T1: RFC 3261 §13.3.1.4 wants the
    /// dialog ended with BYE. The other leg's 2xx (which we hold unacknowledged until then) gets
    /// its ACK first, so that both dialogs are confirmed and both hear a BYE.
    fn on_ack_timeout(&mut self, now: Instant, id: TxnId) {
        let Some((call_id, role)) = self.roles.get(&id).cloned() else {
            return;
        };
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        match role {
            Role::AInvite if call.state == CallState::AwaitAck => {
                tracing::info!("caller never acknowledged the answer; hanging up both legs");
                self.stats.calls_unacknowledged += 1;
                self.send_ack(call_id, Leg::B, 1, None);
                self.end_call(now, call_id, None);
            }
            Role::ReinviteServer if call.reinvite_awaiting_ack => {
                tracing::info!("a re-INVITE's answer was never acknowledged; hanging up both legs");
                self.stats.calls_unacknowledged += 1;
                if let Some((from, cseq)) = call.reinvite.take() {
                    call.reinvite_awaiting_ack = false;
                    self.send_ack(call_id, from.other(), cseq, None);
                }
                self.end_call(now, call_id, None);
            }
            _ => {}
        }
    }

    fn probe(&mut self, now: Instant) {
        self.next_probe = Some(now + self.cfg.options_interval);
        let Some(local) = self.probe_local else {
            return;
        };
        for i in 0..self.probes.len() {
            let Some(p) = self.probes.get(i) else {
                continue;
            };
            if let Some((txn, sent)) = p.outstanding {
                if now.saturating_duration_since(sent) >= self.cfg.options_interval {
                    // No answer within one interval: one failure; a late answer still counts.
                    if let Some(e) = self.probe_txns.get_mut(&txn) {
                        e.1 = true;
                    }
                    self.probe_failed(i);
                } else {
                    continue;
                }
            }
            let Some(p) = self.probes.get(i) else {
                continue;
            };
            let (uri, dest, transport) = (p.probe.uri.clone(), p.probe.dest, p.probe.transport);
            let (branch, tag, cid) = (self.token(), self.token(), self.token());
            let mut out = Vec::with_capacity(400);
            let mut w = MessageWriter::request(&mut out, "OPTIONS", &uri);
            w.header_fmt(
                "Via",
                format_args!(
                    "SIP/2.0/{} {local};branch=z9hG4bK{branch};rport",
                    transport.as_str()
                ),
            )
            .header("Max-Forwards", "70")
            .header_fmt("From", format_args!("<sip:confmesh@{local}>;tag={tag}"))
            .header_fmt("To", format_args!("<{uri}>"))
            .header_fmt(
                "Call-ID",
                format_args!("{}{cid}@{}", self.cfg.call_id_prefix, local.ip()),
            )
            .header("CSeq", "1 OPTIONS")
            .header("Accept", "application/sdp");
            w.finish(b"");
            if let Some(txn) = self
                .txns
                .send_request(now, Bytes::from(out), dest, local, transport)
            {
                self.probe_txns.insert(txn, (i, false));
                if let Some(p) = self.probes.get_mut(i) {
                    p.outstanding = Some((txn, now));
                }
            }
        }
    }
}

/// `t + d`, saturating at a day past `t` for absurd configured durations.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(t)
}

fn dialog(call: &Call, leg: Leg) -> Option<&Dialog> {
    match leg {
        Leg::A => Some(&call.a),
        Leg::B => call.b.as_ref(),
    }
}

fn dialog_mut_opt(call: &mut Call, leg: Leg) -> Option<&mut Dialog> {
    match leg {
        Leg::A => Some(&mut call.a),
        Leg::B => call.b.as_mut(),
    }
}

/// A target refresh (RFC 3261 §12.2): the Contact of a 2xx or re-INVITE becomes the remote target.
fn refresh_target(d: &mut Dialog, msg: &Message<'_>) {
    if let Some(n) = msg
        .header_values(Hdr::Contact)
        .next()
        .and_then(NameAddr::parse)
    {
        d.remote_target = n.uri.to_owned();
    }
}

/// The `tag` parameter of a From/To value we built.
fn tag_of(hdr: &str) -> String {
    NameAddr::parse(hdr)
        .and_then(|n| parse::param(n.params, "tag"))
        .unwrap_or("")
        .to_owned()
}

fn contact(local: SocketAddr, transport: Transport) -> String {
    match transport {
        Transport::Udp => format!("<sip:confmesh@{local}>"),
        Transport::Tcp => format!("<sip:confmesh@{local};transport=tcp>"),
    }
}

/// Where in-dialog requests go: the first route or the remote target when it is a literal
/// address over UDP; the address the peer talks from otherwise (no DNS in the core, and a TCP
/// peer is reached over the connection it opened).
fn dialog_dest(d: &Dialog) -> SocketAddr {
    if d.transport.is_reliable() {
        return d.peer;
    }
    uri_dest(d).unwrap_or(d.peer)
}

/// Over TCP, where an in-dialog request goes once the connection the peer opened has closed: the
/// first route or the remote target, when it is a literal address (RFC 3261 §12.2.1.1).
fn dialog_fallback(d: &Dialog) -> Option<SocketAddr> {
    if !d.transport.is_reliable() {
        return None;
    }
    uri_dest(d).filter(|a| *a != d.peer)
}

/// The address of the first route, or of the remote target, when it is a literal IP address.
fn uri_dest(d: &Dialog) -> Option<SocketAddr> {
    let target = d
        .route_set
        .first()
        .and_then(|r| NameAddr::parse(r))
        .map(|n| n.uri)
        .unwrap_or(d.remote_target.as_str());
    SipUri::parse(target).and_then(|u| {
        let ip: IpAddr = u
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        Some(SocketAddr::new(ip, u.port.unwrap_or(5060)))
    })
}

/// A request inside dialog `d`.
fn dialog_request(
    d: &Dialog,
    method: &str,
    cseq: u32,
    branch: &str,
    body: Option<(Option<&str>, &[u8])>,
) -> Bytes {
    let (ctype, body) = body.unwrap_or((None, b""));
    let mut out = Vec::with_capacity(body.len() + 500);
    let mut w = MessageWriter::request(&mut out, method, &d.remote_target);
    w.header_fmt(
        "Via",
        format_args!(
            "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
            d.transport.as_str(),
            d.local
        ),
    );
    for r in &d.route_set {
        w.header("Route", r);
    }
    w.header("Max-Forwards", "70")
        .header("From", &d.local_hdr)
        .header("To", &d.remote_hdr)
        .header("Call-ID", &d.call_id)
        .header_fmt("CSeq", format_args!("{cseq} {method}"));
    if method == "INVITE" {
        w.header("Contact", &contact(d.local, d.transport));
    }
    if let Some(ct) = ctype.filter(|_| !body.is_empty()) {
        w.header("Content-Type", ct);
    }
    w.finish(body);
    Bytes::from(out)
}

/// The reason phrase of a response, or the standard one when it is empty.
fn response_reason<'a>(msg: &Message<'a>) -> &'a str {
    match msg.start {
        StartLine::Response { reason, .. } if !reason.is_empty() => reason,
        StartLine::Response { code, .. } => reason_phrase(code),
        StartLine::Request { .. } => "",
    }
}

fn find_header<'a>(msg: &Message<'a>, name: &str) -> Option<&'a str> {
    msg.headers()
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// A response to `req` (RFC 3261 §8.2.6): Vias, From, Call-ID, CSeq copied; To with our tag.
fn response_bytes(req: &Message<'_>, code: u16, reason: &str, extra: &Extra<'_>) -> Bytes {
    let (ctype, body) = extra.body.unwrap_or((None, b""));
    let mut out = Vec::with_capacity(body.len() + 600);
    let mut w = MessageWriter::response(&mut out, code, reason);
    for v in req.header_lines(Hdr::Via) {
        w.header("Via", v);
    }
    if extra.record_route {
        for r in req.header_lines(Hdr::RecordRoute) {
            w.header("Record-Route", r);
        }
    }
    w.header("From", req.header(Hdr::From).unwrap_or(""));
    let to = req.header(Hdr::To).unwrap_or("");
    match extra.to_tag {
        Some(tag) if code > 100 && req.to_tag().is_none() && !tag.is_empty() => {
            w.header_fmt("To", format_args!("{to};tag={tag}"));
        }
        _ => {
            w.header("To", to);
        }
    }
    w.header("Call-ID", req.call_id().unwrap_or(""))
        .header("CSeq", req.header(Hdr::CSeq).unwrap_or(""));
    if let Some(c) = extra.contact {
        w.header("Contact", c);
    }
    if extra.allow {
        w.header("Allow", ALLOW);
    }
    if let Some(wn) = extra.warning {
        w.header("Warning", wn);
    }
    if code == 503 {
        w.header("Retry-After", "5");
    }
    if let Some(ct) = ctype.filter(|_| !body.is_empty()) {
        w.header("Content-Type", ct);
    }
    w.finish(body);
    Bytes::from(out)
}
