//! The thin I/O layer: UDP and TCP sockets on port 5060 of each rendezvous address, feeding whole
//! messages to a sans-IO core through one bounded channel and sending what the core asks for.
//!
//! TCP connections, inbound (from the VCS) and outbound (to bridges with `;transport=tcp`), are
//! keyed by remote address so a response or in-dialog request reuses the connection the peer opened.
//! Each connection has a bounded read buffer (one [`MAX_MESSAGE`] plus a read) and a bounded write
//! queue; a stream that cannot be framed is answered 400 where possible and closed. How long a
//! connection may stay silent or half-sent, and what happens at the connection limit, is
//! [`TcpLimits`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use super::Transport;
use super::framing::{Frame, next_frame};
use super::parse::{Framing, MAX_MESSAGE, Method, StartLine, error_response, parse};
use super::transaction::Transmit;

/// Most simultaneous TCP connections by default (see [`TcpLimits::max_connections`]).
pub const MAX_TCP_CONNECTIONS: usize = 1024;
/// Messages queued toward one TCP connection before further ones are dropped (the transaction
/// layer retransmits nothing over TCP, so this only guards against a peer that stops reading).
const TCP_WRITE_QUEUE: usize = 256;

/// What a remote peer may hold of the TCP side, and for how long.
///
/// RFC 3261 §18 leaves connection lifetime to the implementation but expects a connection to stay
/// open while it carries a transaction; a connection carrying none may be closed. So:
///
/// - a connection on which no complete message has passed (either way) for [`Self::idle_timeout`]
///   is closed — 64·T1 = 32 s, the lifetime of a non-INVITE transaction (timer F), so a request
///   and its final response always fit; CRLF keep-alives do not count as messages, or a peer could
///   hold a socket forever with two bytes every 31 s;
/// - while an INVITE on the connection awaits its final response (an INVITE went one way, no final
///   response to INVITE came back the other way), the allowance is [`Self::invite_timeout`]
///   instead, which covers timer C: a caller may ring for three minutes;
/// - a message whose first byte has arrived must be complete within [`Self::message_timeout`], so
///   a slowloris trickle (one byte every few seconds, never finishing a message) is cut even
///   though bytes keep flowing;
/// - at [`Self::max_connections`], a new connection **evicts the least recently active
///   connection with no INVITE pending** instead of being refused; it is refused (and counted)
///   only when every connection carries an INVITE.
///
/// On the last point we differ on purpose from Kamailio and OpenSIPS, whose `tcp_max_connections`
/// refuses new connections at the limit and relies on a connection lifetime to free slots. With
/// refusal, a peer that re-opens a thousand silent sockets every 32 s holds every slot forever and
/// the VCS's TCP trunk cannot reconnect; with eviction such a peer can only close connections that
/// are idle anyway, which costs a legitimate peer one reconnection (SIP over TCP opens a new
/// connection whenever none exists, RFC 3261 §18.1.1), and never a call in progress. The same
/// choice is made by HTTP servers (nginx reuses idle keep-alive connections when out of slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    /// Most simultaneous TCP connections, inbound and outbound together.
    pub max_connections: usize,
    /// Longest time without a complete message on a connection with no INVITE pending.
    pub idle_timeout: Duration,
    /// Longest time without a complete message while an INVITE awaits its final response.
    pub invite_timeout: Duration,
    /// Longest time from the first byte of a message to its last.
    pub message_timeout: Duration,
    /// Longest time one write may block on a peer that does not read; then the connection closes.
    pub send_timeout: Duration,
    /// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS…), so the loop does not spin.
    pub accept_backoff: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            max_connections: MAX_TCP_CONNECTIONS,
            // 64 × T1 (500 ms): timer F, the lifetime of a non-INVITE transaction.
            idle_timeout: Duration::from_secs(32),
            // Timer C (181 s, see `TimerConfig`) plus one idle period for the final response.
            invite_timeout: Duration::from_secs(181 + 32),
            // A 64 KiB message needs milliseconds on the appliance's links; 10 s still covers three
            // TCP retransmission back-offs (1 + 2 + 4 s) of a lossy path.
            message_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            accept_backoff: Duration::from_millis(100),
        }
    }
}

/// One message received: the core parses `data` itself.
#[derive(Debug)]
pub struct Inbound {
    /// Sender.
    pub src: SocketAddr,
    /// Our address it arrived on.
    pub local: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
    /// Exactly one message (a datagram, or one frame cut from a stream).
    pub data: Bytes,
}

/// Counters of the socket layer, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    /// Stream bytes that could not be framed (connection closed).
    pub framing_errors: u64,
    /// Messages dropped because a queue was full, a write timed out or a connection could not be
    /// opened.
    pub send_failures: u64,
    /// TCP connections refused at [`TcpLimits::max_connections`] because every connection had an
    /// INVITE pending (none could be evicted).
    pub refused_connections: u64,
    /// TCP connections closed after [`TcpLimits::idle_timeout`] (or
    /// [`TcpLimits::invite_timeout`]) without a complete message.
    pub tcp_idle_closed: u64,
    /// TCP connections closed because a started message was not complete within
    /// [`TcpLimits::message_timeout`] (slowloris).
    pub tcp_incomplete_closed: u64,
    /// Idle TCP connections closed to make room for a new one at the connection limit.
    pub tcp_evicted: u64,
    /// Failed `accept` calls, each followed by a [`TcpLimits::accept_backoff`] pause.
    pub accept_errors: u64,
}

/// Call-IDs the B2BUA generates itself (its B legs and probes) start with this, the number of the
/// shard that made them and a `-`, so that the bridge's messages reach the same shard as the
/// caller's (see [`shard_of`]).
pub const SHARD_CALL_ID_PREFIX: &str = "cms";

/// The shard (of `shards`) that handles the message in `data`: the one named in a Call-ID the
/// B2BUA generated (`cms<k>-…`), else a hash of the Call-ID, so that every message of a call —
/// request, retransmission, ACK, CANCEL, responses, in-dialog requests — reaches the same shard.
/// A message without a readable Call-ID goes to shard 0 (which answers 400 where one is due).
/// Reads only the header names up to the Call-ID, never allocates.
pub fn shard_of(data: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let Some(id) = call_id_of(data) else { return 0 };
    if let Some(rest) = id.strip_prefix(SHARD_CALL_ID_PREFIX.as_bytes()) {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if (1..=3).contains(&digits) && rest.get(digits) == Some(&b'-') {
            let k = rest
                .iter()
                .take(digits)
                .fold(0usize, |a, b| a * 10 + usize::from(b - b'0'));
            return k % shards;
        }
    }
    // FNV-1a: cheap, and a caller cannot gain anything by steering calls to one shard beyond
    // what it could do by sending more calls.
    let h = id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(h % shards as u64).unwrap_or(0)
}

/// The value of the first Call-ID (or compact `i`) header, trimmed; `None` if there is none
/// before the end of the header section.
fn call_id_of(data: &[u8]) -> Option<&[u8]> {
    let head_end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(data.len());
    let head = data.get(..head_end)?;
    for line in head.split(|b| *b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
            let v = value.get(1..)?.trim_ascii();
            return (!v.is_empty()).then_some(v);
        }
    }
    None
}

/// The per-connection state shared by its reader, its writer and the admission check.
#[derive(Debug)]
struct ConnState {
    /// Milliseconds since [`Shared::epoch`] at the last complete message, either way (or at the
    /// connection's start).
    last_message: AtomicU64,
    /// INVITEs sent or received on this connection still awaiting a final response (saturating;
    /// a miscount only moves the connection between the idle and the INVITE allowance).
    invites: AtomicU32,
    /// Tells the reader to close the connection (eviction, write timeout, shutdown).
    close: Notify,
    /// Tells the reader to recompute its deadline (the writer ended an INVITE).
    wake: Notify,
}

impl ConnState {
    /// Records a complete message that went either way; true when it ended the last pending
    /// INVITE, which shortens the allowance (the reader must then recompute its deadline).
    fn message(&self, now_ms: u64, data: &[u8]) -> bool {
        self.last_message.store(now_ms, Ordering::Relaxed);
        let delta = invite_delta(data);
        if delta == 0 {
            return false;
        }
        let before = self
            .invites
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(if delta > 0 {
                    n.saturating_add(1)
                } else {
                    n.saturating_sub(1)
                })
            });
        delta < 0 && before == Ok(1)
    }

    /// When the connection must close unless a message completes first.
    fn deadline(&self, shared: &Shared, started: Option<Instant>) -> Instant {
        let l = &shared.limits;
        let allowance = if self.invites.load(Ordering::Relaxed) > 0 {
            l.invite_timeout
        } else {
            l.idle_timeout
        };
        let last = later(
            shared.epoch,
            Duration::from_millis(self.last_message.load(Ordering::Relaxed)),
        );
        let idle = later(last, allowance);
        match started {
            Some(t) => idle.min(later(t, l.message_timeout)),
            None => idle,
        }
    }
}

/// `t + d`, saturating at a day past `t` for absurd configured durations.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(t)
}

/// +1 for an INVITE request, -1 for a final response to an INVITE, 0 for anything else (and for
/// what does not parse: the core answers nothing it cannot parse, so it opens no transaction).
fn invite_delta(data: &[u8]) -> i8 {
    let Ok(m) = parse(data, Framing::Datagram) else {
        return 0;
    };
    match m.start {
        StartLine::Request {
            method: Method::Invite,
            ..
        } => 1,
        StartLine::Response { code, .. }
            if code >= 200 && m.cseq().is_some_and(|(_, method)| method == "INVITE") =>
        {
            -1
        }
        _ => 0,
    }
}

/// One registered TCP connection.
#[derive(Debug)]
struct Conn {
    queue: mpsc::Sender<Bytes>,
    state: Arc<ConnState>,
}

/// What the sockets, the accept loops and every connection task share.
#[derive(Debug)]
struct Shared {
    conns: Mutex<HashMap<SocketAddr, Conn>>,
    stats: Mutex<TransportStats>,
    /// One queue per core shard; a message goes to [`shard_of`] its Call-ID.
    inbound: Vec<mpsc::Sender<Inbound>>,
    limits: TcpLimits,
    epoch: Instant,
}

impl Shared {
    /// Hands one received message to its shard's queue (waits while that queue is full).
    async fn deliver(&self, msg: Inbound) -> Result<(), ()> {
        let i = shard_of(&msg.data, self.inbound.len());
        match self.inbound.get(i) {
            Some(q) => q.send(msg).await.map_err(|_| ()),
            None => Err(()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn count(&self, f: impl FnOnce(&mut TransportStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Registers a connection, evicting the least recently active one without a pending INVITE if
    /// the limit is reached (see [`TcpLimits`]). False when refused.
    fn register(&self, peer: SocketAddr, conn: Conn) -> bool {
        let Ok(mut conns) = self.conns.lock() else {
            return false;
        };
        if conns.len() >= self.limits.max_connections && !conns.contains_key(&peer) {
            let victim = conns
                .iter()
                .filter(|(_, c)| c.state.invites.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, c)| c.state.last_message.load(Ordering::Relaxed))
                .map(|(a, _)| *a);
            let Some(victim) = victim else {
                drop(conns);
                self.count(|s| s.refused_connections += 1);
                return false;
            };
            if let Some(old) = conns.remove(&victim) {
                old.state.close.notify_one();
            }
            self.count(|s| s.tcp_evicted += 1);
        }
        // Same peer address twice (two sends racing to open a connection): the newer one is
        // registered; the older one keeps reading (a response may still come on it) until it
        // idles out, outside the count.
        conns.insert(peer, conn);
        true
    }
}

/// The sockets of one B2BUA: bound once, used by the driver task.
pub struct SipSockets {
    udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl SipSockets {
    /// Binds UDP and TCP on every address of `locals` and starts their readers; every message
    /// goes to `inbound`. Fails (naming the address) if any bind fails. TCP uses the default
    /// [`TcpLimits`].
    pub async fn bind(
        locals: &[SocketAddr],
        inbound: mpsc::Sender<Inbound>,
    ) -> io::Result<SipSockets> {
        SipSockets::bind_with(locals, inbound, TcpLimits::default()).await
    }

    /// [`SipSockets::bind`] with explicit TCP limits (tests shorten the timeouts).
    pub async fn bind_with(
        locals: &[SocketAddr],
        inbound: mpsc::Sender<Inbound>,
        limits: TcpLimits,
    ) -> io::Result<SipSockets> {
        SipSockets::bind_sharded(locals, vec![inbound], limits).await
    }

    /// [`SipSockets::bind_with`] feeding several core shards: each message goes to the queue
    /// [`shard_of`] its Call-ID names (one queue: all to it).
    pub async fn bind_sharded(
        locals: &[SocketAddr],
        inbound: Vec<mpsc::Sender<Inbound>>,
        limits: TcpLimits,
    ) -> io::Result<SipSockets> {
        if inbound.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "SIP sockets need at least one inbound queue",
            ));
        }
        let shared = Arc::new(Shared {
            conns: Mutex::new(HashMap::new()),
            stats: Mutex::new(TransportStats::default()),
            inbound,
            limits,
            epoch: Instant::now(),
        });
        let mut s = SipSockets {
            udp: HashMap::new(),
            shared,
            tasks: JoinSet::new(),
        };
        for &local in locals {
            let udp = Arc::new(
                UdpSocket::bind(local)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("SIP UDP {local}: {e}")))?,
            );
            let local = udp.local_addr()?;
            s.udp.insert(local, udp.clone());
            let shared = s.shared.clone();
            s.tasks.spawn(async move {
                let mut buf = vec![0u8; MAX_MESSAGE + 1];
                loop {
                    let Ok((n, src)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let data = Bytes::copy_from_slice(buf.get(..n).unwrap_or(&[]));
                    if shared
                        .deliver(Inbound {
                            src,
                            local,
                            transport: Transport::Udp,
                            data,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(local)
                .map_err(|e| io::Error::new(e.kind(), format!("SIP TCP {local}: {e}")))?;
            let listener = Arc::new(sock.listen(128)?);
            let shared = s.shared.clone();
            s.tasks.spawn(accept_loop(
                move || {
                    let l: Arc<TcpListener> = listener.clone();
                    async move { l.accept().await }
                },
                local,
                shared,
            ));
        }
        Ok(s)
    }

    /// The bound addresses (useful when a port 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp.keys().copied().collect()
    }

    /// Current counters.
    pub fn stats(&self) -> TransportStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// TCP connections currently registered (inbound and outbound).
    pub fn tcp_connections(&self) -> usize {
        self.shared.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Sends one message; never blocks the caller on a slow TCP peer.
    ///
    /// Over TCP the message goes on the connection registered for `dest`; when there is none (it
    /// closed), on the one for [`Transmit::fallback`], and when there is none either, a new
    /// connection is opened to the fallback address (RFC 3261 §18.2.2 for responses: the
    /// peer's ephemeral port of the closed connection has nobody listening), or to `dest`
    /// without one.
    pub fn send(&self, t: Transmit) {
        match t.transport {
            Transport::Udp => {
                let sock = self.udp.get(&t.local).or_else(|| self.udp.values().next());
                let sent = sock.is_some_and(|s| s.try_send_to(&t.data, t.dest).is_ok());
                if !sent {
                    self.shared.count(|s| s.send_failures += 1);
                }
            }
            Transport::Tcp => {
                let (existing, target) = match self.shared.conns.lock() {
                    Ok(c) => match (c.get(&t.dest), t.fallback) {
                        (Some(conn), _) => (Some(conn.queue.clone()), t.dest),
                        (None, Some(fb)) => (c.get(&fb).map(|conn| conn.queue.clone()), fb),
                        (None, None) => (None, t.dest),
                    },
                    Err(_) => (None, t.dest),
                };
                match existing {
                    Some(q) => {
                        if q.try_send(t.data).is_err() {
                            self.shared.count(|s| s.send_failures += 1);
                        }
                    }
                    None => {
                        let shared = self.shared.clone();
                        tokio::spawn(async move {
                            let connected = async {
                                let sock = TcpSocket::new_v4()?;
                                sock.bind(SocketAddr::new(t.local.ip(), 0))?;
                                sock.connect(target).await
                            };
                            let queued =
                                match tokio::time::timeout(Duration::from_secs(5), connected).await
                                {
                                    Ok(Ok(stream)) => {
                                        start_connection(stream, target, t.local, &shared)
                                            .is_some_and(|q| q.try_send(t.data).is_ok())
                                    }
                                    _ => false,
                                };
                            if !queued {
                                shared.count(|s| s.send_failures += 1);
                            }
                        });
                    }
                }
            }
        }
    }
}

impl Drop for SipSockets {
    fn drop(&mut self) {
        self.tasks.abort_all();
        if let Ok(mut conns) = self.shared.conns.lock() {
            for (_, c) in conns.drain() {
                c.state.close.notify_one();
            }
        }
    }
}

/// Accepts connections until aborted. A failed accept (EMFILE when out of descriptors, ENFILE,
/// ENOBUFS, ECONNABORTED…) is counted and followed by a pause, so the loop does not spin on an
/// error that persists; the pending connection stays in the kernel's backlog meanwhile.
async fn accept_loop<F, Fut>(mut accept: F, local: SocketAddr, shared: Arc<Shared>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<(TcpStream, SocketAddr)>>,
{
    loop {
        match accept().await {
            Ok((stream, src)) => {
                // Refused: the stream is dropped, which closes it.
                let _ = start_connection(stream, src, local, &shared);
            }
            Err(_) => {
                shared.count(|s| s.accept_errors += 1);
                tokio::time::sleep(shared.limits.accept_backoff).await;
            }
        }
    }
}

/// Registers a connection and spawns its reader and writer; returns its write queue, or `None`
/// when refused at the connection limit (the stream is then closed).
fn start_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<mpsc::Sender<Bytes>> {
    let state = Arc::new(ConnState {
        last_message: AtomicU64::new(shared.now_ms()),
        invites: AtomicU32::new(0),
        close: Notify::new(),
        wake: Notify::new(),
    });
    let (qtx, mut qrx) = mpsc::channel::<Bytes>(TCP_WRITE_QUEUE);
    if !shared.register(
        peer,
        Conn {
            queue: qtx.clone(),
            state: state.clone(),
        },
    ) {
        return None;
    }
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    {
        let (shared, state) = (shared.clone(), state.clone());
        tokio::spawn(async move {
            while let Some(b) = qrx.recv().await {
                match tokio::time::timeout(shared.limits.send_timeout, wr.write_all(&b)).await {
                    Ok(Ok(())) => {
                        if b.as_ref() != b"\r\n" && state.message(shared.now_ms(), &b) {
                            state.wake.notify_one();
                        }
                    }
                    Ok(Err(_)) => break,
                    Err(_) => {
                        // The peer stopped reading: give up on it rather than hold the socket.
                        shared.count(|s| s.send_failures += 1);
                        state.close.notify_one();
                        break;
                    }
                }
            }
        });
    }
    let writer = qtx.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(8192);
        // When the first byte of the message now in `buf` was seen.
        let mut started: Option<Instant> = None;
        'conn: loop {
            loop {
                match next_frame(&buf) {
                    Ok(Frame::Incomplete) => break,
                    Ok(Frame::KeepAlive { consumed, pong }) => {
                        let _ = buf.split_to(consumed.min(buf.len()));
                        if pong {
                            let _ = writer.try_send(Bytes::from_static(b"\r\n"));
                        }
                    }
                    Ok(Frame::Message(n)) => {
                        let data = buf.split_to(n.min(buf.len())).freeze();
                        state.message(shared.now_ms(), &data);
                        started = None;
                        let msg = Inbound {
                            src: peer,
                            local,
                            transport: Transport::Tcp,
                            data,
                        };
                        if shared.deliver(msg).await.is_err() {
                            break 'conn;
                        }
                    }
                    Err(e) => {
                        let mut out = Vec::new();
                        if error_response(&buf, e, &mut out) {
                            let _ = writer.try_send(Bytes::from(out));
                        }
                        shared.count(|s| s.framing_errors += 1);
                        break 'conn;
                    }
                }
            }
            if buf.is_empty() {
                started = None;
            } else if started.is_none() {
                started = Some(Instant::now());
            }
            // The buffer holds less than one message (else it was framed or refused above).
            buf.reserve(8192);
            let deadline = state.deadline(&shared, started);
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    // The writer may have moved the deadline while we slept.
                    let now = Instant::now();
                    if started.is_some_and(|t| now >= later(t, shared.limits.message_timeout)) {
                        shared.count(|s| s.tcp_incomplete_closed += 1);
                        break;
                    }
                    if now >= state.deadline(&shared, None) {
                        shared.count(|s| s.tcp_idle_closed += 1);
                        break;
                    }
                }
                () = state.close.notified() => break,
                () = state.wake.notified() => {}
            }
        }
        if let Ok(mut c) = shared.conns.lock() {
            if c.get(&peer).is_some_and(|c| c.queue.same_channel(&writer)) {
                c.remove(&peer);
            }
        }
    });
    Some(qtx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn shared(limits: TcpLimits) -> (Arc<Shared>, mpsc::Receiver<Inbound>) {
        let (tx, rx) = mpsc::channel(8);
        let s = Shared {
            conns: Mutex::new(HashMap::new()),
            stats: Mutex::new(TransportStats::default()),
            inbound: vec![tx],
            limits,
            epoch: Instant::now(),
        };
        (Arc::new(s), rx)
    }

    /// A persistent accept error (EMFILE) is counted and paced by the back-off instead of spinning.
    #[tokio::test]
    async fn accept_errors_back_off() {
        let backoff = Duration::from_millis(40);
        let (shared, _rx) = shared(TcpLimits {
            accept_backoff: backoff,
            ..TcpLimits::default()
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let accept = move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n >= 5 {
                    std::future::pending::<()>().await;
                }
                Err::<(TcpStream, SocketAddr), _>(io::Error::from_raw_os_error(24))
            }
        };
        let start = Instant::now();
        let task = tokio::spawn(accept_loop(
            accept,
            "127.0.0.1:5060".parse().unwrap(),
            shared.clone(),
        ));
        for _ in 0..1000 {
            if calls.load(Ordering::SeqCst) > 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            6,
            "the loop went on after five errors"
        );
        assert_eq!(shared.stats.lock().unwrap().accept_errors, 5);
        // Five errors, each followed by a pause, before the sixth call: at least five pauses.
        assert!(
            start.elapsed() >= backoff * 5,
            "accept retried without pausing"
        );
    }

    #[test]
    fn every_message_of_a_call_reaches_one_shard() {
        let msg = |start: &str, call_id_line: &str| {
            format!(
                "{start}\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n{call_id_line}\r\nCSeq: 1 INVITE\r\n\r\nv=0\r\nCall-ID: body\r\n"
            )
        };
        for n in [2, 3, 8] {
            for id in [
                "a84b4c76e66710@pc33.example.com",
                "x",
                "9744-18965@10.96.3.1",
            ] {
                let k = shard_of(
                    msg("INVITE sip:a@b SIP/2.0", &format!("Call-ID: {id}")).as_bytes(),
                    n,
                );
                assert!(k < n);
                // Other header spellings, a response, the compact form: the same shard.
                for line in [
                    format!("call-id:{id}"),
                    format!("CALL-ID :  {id} "),
                    format!("i: {id}"),
                ] {
                    assert_eq!(
                        shard_of(msg("SIP/2.0 200 OK", &line).as_bytes(), n),
                        k,
                        "{line}"
                    );
                }
            }
            // Our own Call-IDs name their shard.
            for k in 0..n {
                let id = format!("{SHARD_CALL_ID_PREFIX}{k}-0123abcd@10.96.1.1");
                assert_eq!(
                    shard_of(
                        msg("SIP/2.0 180 Ringing", &format!("Call-ID: {id}")).as_bytes(),
                        n
                    ),
                    k
                );
            }
            // No Call-ID (or only one in the body): shard 0.
            assert_eq!(
                shard_of(msg("INVITE sip:a@b SIP/2.0", "X-No: 1").as_bytes(), n),
                0
            );
            assert_eq!(shard_of(b"garbage", n), 0);
        }
        // Hashing spreads calls over the shards.
        let hits = (0..1000)
            .map(|i| {
                shard_of(
                    msg(
                        "INVITE sip:a@b SIP/2.0",
                        &format!("Call-ID: {i}-4242@10.96.3.1"),
                    )
                    .as_bytes(),
                    2,
                )
            })
            .filter(|k| *k == 1)
            .count();
        assert!((350..=650).contains(&hits), "{hits} of 1000 on shard 1");
        assert_eq!(
            shard_of(msg("INVITE sip:a@b SIP/2.0", "Call-ID: q").as_bytes(), 1),
            0
        );
    }

    #[test]
    fn invite_delta_counts_invites_and_their_final_responses() {
        let invite = b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let resp = |code: u16, method: &str| {
            format!(
                "SIP/2.0 {code} X\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
            )
        };
        assert_eq!(invite_delta(invite), 1);
        assert_eq!(invite_delta(resp(180, "INVITE").as_bytes()), 0);
        assert_eq!(invite_delta(resp(200, "INVITE").as_bytes()), -1);
        assert_eq!(invite_delta(resp(486, "INVITE").as_bytes()), -1);
        assert_eq!(invite_delta(resp(200, "OPTIONS").as_bytes()), 0);
        assert_eq!(invite_delta(b"INVITE garbage"), 0);
        let state = ConnState {
            last_message: AtomicU64::new(0),
            invites: AtomicU32::new(0),
            close: Notify::new(),
            wake: Notify::new(),
        };
        assert!(!state.message(5, resp(200, "INVITE").as_bytes()));
        assert_eq!(
            state.invites.load(Ordering::Relaxed),
            0,
            "saturates at zero"
        );
        assert!(!state.message(7, invite));
        assert_eq!(
            (
                state.invites.load(Ordering::Relaxed),
                state.last_message.load(Ordering::Relaxed)
            ),
            (1, 7)
        );
        assert!(!state.message(8, invite));
        assert!(!state.message(9, resp(603, "INVITE").as_bytes()));
        assert!(
            state.message(9, resp(200, "INVITE").as_bytes()),
            "the last INVITE answered"
        );
    }
}
