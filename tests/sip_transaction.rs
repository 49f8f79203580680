//! The transaction layer on a virtual clock: every RFC 3261 §17 timer fires when it should, UDP
//! retransmits and TCP does not, retransmissions are absorbed, and the layer forgets transactions.
//! Then the TCP transport on loopback: idle and trickling connections are closed, a connection
//! with an INVITE pending is kept, and the connection limit evicts idle connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use confmesh::sip::Transport;
use confmesh::sip::parse::{Framing, parse};
use confmesh::sip::transaction::{Incoming, TimerConfig, Transactions, Transmit, TxnEvent, TxnId};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A request of dialog c1 (CSeq 7, the CSeq method is `method`); `to_tag` is "" or ";tag=…".
fn request(method: &str, branch: &str, to_tag: &str) -> Vec<u8> {
    format!(
        "{method} sip:b@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\n\
         From: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>{to_tag}\r\nCall-ID: c1\r\nCSeq: 7 {method}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn response(code: u16, branch: &str, method: &str) -> Vec<u8> {
    format!(
        "SIP/2.0 {code} X\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\n\
         From: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=t9\r\nCall-ID: c1\r\nCSeq: 7 {method}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

struct Harness {
    txns: Transactions,
    now: Instant,
    local: SocketAddr,
    peer: SocketAddr,
}

impl Harness {
    fn new() -> Self {
        Harness::with_limit(100)
    }

    /// A layer that holds at most `max` transactions (the overload tests).
    fn with_limit(max: usize) -> Self {
        Harness {
            txns: Transactions::new(TimerConfig::default(), max),
            now: Instant::now(),
            local: addr("10.0.0.1:5060"),
            peer: addr("10.0.0.2:5060"),
        }
    }

    fn feed(&mut self, bytes: &[u8], transport: Transport) -> Incoming {
        let m = parse(bytes, Framing::Datagram).unwrap();
        self.txns
            .handle_message(self.now, &m, self.peer, self.local, transport)
    }

    /// The peer's request `method` arrives over UDP.
    fn receive(&mut self, method: &str, branch: &str, to_tag: &str) -> Incoming {
        self.feed(&request(method, branch, to_tag), Transport::Udp)
    }

    /// The peer's `code` response to our `method` arrives over UDP.
    fn receive_response(&mut self, code: u16, branch: &str, method: &str) -> Incoming {
        self.feed(&response(code, branch, method), Transport::Udp)
    }

    /// The peer's request `method` (no To tag) opens a new server transaction: its id.
    fn accept(&mut self, method: &str, branch: &str, transport: Transport) -> TxnId {
        match self.feed(&request(method, branch, ""), transport) {
            Incoming::Request(id) => id,
            other => panic!("{method} {branch} is not a new request: {other:?}"),
        }
    }

    /// Starts a client transaction for `method` to the peer; `None` when the layer refuses it.
    fn send(
        &mut self,
        method: &str,
        branch: &str,
        to_tag: &str,
        transport: Transport,
    ) -> Option<TxnId> {
        let bytes = Bytes::from(request(method, branch, to_tag));
        self.txns
            .send_request(self.now, bytes, self.peer, self.local, transport)
    }

    /// Answers server transaction `id` with `code`; what [`Transactions::respond`] returned.
    fn respond(&mut self, id: TxnId, code: u16, branch: &str, method: &str) -> bool {
        let bytes = Bytes::from(response(code, branch, method));
        self.txns.respond(self.now, id, code, bytes)
    }

    /// A server INVITE transaction over UDP answered with `code` (its first transmission drained).
    fn answered_invite(&mut self, branch: &str, code: u16) -> TxnId {
        let id = self.accept("INVITE", branch, Transport::Udp);
        self.respond(id, code, branch, "INVITE");
        self.sent();
        id
    }

    /// Runs `kept` and checks that the one transaction left is still held (`why`), then runs
    /// `more` and checks that it is gone: how long a finished transaction lingers.
    fn lingers(&mut self, kept: Duration, more: Duration, why: &str) {
        self.run(kept);
        assert_eq!(self.txns.len(), 1, "{why}");
        self.run(more);
        assert!(self.txns.is_empty());
    }

    fn sent(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.txns.poll_transmit()).collect()
    }

    /// Advances the clock in 10 ms steps up to `until` (bounded), returning the times at which
    /// messages were sent and the events seen.
    fn run(&mut self, until: Duration) -> (Vec<Duration>, Vec<TxnEvent>) {
        let start = self.now;
        let (mut times, mut events) = (Vec::new(), Vec::new());
        let end = start + until;
        while self.now < end {
            self.now += Duration::from_millis(10);
            if self.txns.poll_timeout().is_some_and(|t| t <= self.now) {
                self.txns.handle_timeout(self.now);
            }
            for _ in self.sent() {
                times.push(self.now - start);
            }
            events.extend(std::iter::from_fn(|| self.txns.poll_event()));
        }
        (times, events)
    }
}

fn secs(v: &[Duration]) -> Vec<f64> {
    v.iter()
        .map(|d| (d.as_secs_f64() * 100.0).round() / 100.0)
        .collect()
}

#[test]
fn client_invite_timers_a_and_b() {
    let mut h = Harness::new();
    let id = h.send("INVITE", "z9hG4bKa", "", Transport::Udp).unwrap();
    assert_eq!(h.sent().len(), 1);
    let (times, events) = h.run(Duration::from_secs(40));
    // Timer A doubles from T1 without cap; timer B gives up at 64*T1 = 32 s.
    assert_eq!(secs(&times), vec![0.5, 1.5, 3.5, 7.5, 15.5, 31.5]);
    assert_eq!(events, vec![TxnEvent::Timeout(id)]);
    assert!(h.txns.is_empty());
}

#[test]
fn client_invite_provisional_final_ack_and_timer_d() {
    let mut h = Harness::new();
    let id = h.send("INVITE", "z9hG4bKb", "", Transport::Udp).unwrap();
    h.sent();
    assert_eq!(
        h.receive_response(180, "z9hG4bKb", "INVITE"),
        Incoming::Response(id)
    );
    let (times, _) = h.run(Duration::from_secs(5));
    assert!(times.is_empty(), "no retransmission in Proceeding");
    assert_eq!(
        h.receive_response(486, "z9hG4bKb", "INVITE"),
        Incoming::Response(id)
    );
    let ack = h.sent();
    assert_eq!(ack.len(), 1);
    let m = parse(&ack[0].data, Framing::Datagram).unwrap();
    assert_eq!(m.cseq(), Some((7, "ACK")));
    assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bKb"));
    assert_eq!(m.to_tag(), Some("t9"));
    // A retransmitted final response is absorbed and re-ACKed.
    assert_eq!(
        h.receive_response(486, "z9hG4bKb", "INVITE"),
        Incoming::Absorbed
    );
    assert_eq!(h.sent().len(), 1);
    h.lingers(
        Duration::from_secs(31),
        Duration::from_secs(2),
        "timer D keeps it for 32 s",
    );
}

#[test]
fn client_invite_2xx_terminates_and_later_2xx_are_stray() {
    let mut h = Harness::new();
    let id = h.send("INVITE", "z9hG4bKc", "", Transport::Udp).unwrap();
    assert_eq!(
        h.receive_response(200, "z9hG4bKc", "INVITE"),
        Incoming::Response(id)
    );
    assert!(h.txns.is_empty());
    assert_eq!(
        h.receive_response(200, "z9hG4bKc", "INVITE"),
        Incoming::StrayResponse
    );
}

#[test]
fn client_non_invite_timers_e_f_k() {
    let mut h = Harness::new();
    let id = h.send("OPTIONS", "z9hG4bKd", "", Transport::Udp).unwrap();
    h.sent();
    let (times, events) = h.run(Duration::from_secs(40));
    // Timer E doubles up to T2 = 4 s; timer F at 32 s.
    assert_eq!(
        secs(&times),
        vec![0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    );
    assert_eq!(events, vec![TxnEvent::Timeout(id)]);

    let id = h
        .send("BYE", "z9hG4bKe", ";tag=t9", Transport::Udp)
        .unwrap();
    h.sent();
    assert_eq!(
        h.receive_response(200, "z9hG4bKe", "BYE"),
        Incoming::Response(id)
    );
    assert_eq!(
        h.receive_response(200, "z9hG4bKe", "BYE"),
        Incoming::Absorbed
    );
    h.lingers(
        Duration::from_millis(4900),
        Duration::from_millis(200),
        "timer K is T4",
    );
}

#[test]
fn tcp_never_retransmits_and_lingers_zero() {
    let mut h = Harness::new();
    let id = h.send("INVITE", "z9hG4bKf", "", Transport::Tcp).unwrap();
    h.sent();
    let (times, events) = h.run(Duration::from_secs(33));
    assert!(times.is_empty());
    assert_eq!(events, vec![TxnEvent::Timeout(id)]);

    let Incoming::Request(id) = h.feed(&request("BYE", "z9hG4bKg", ";tag=t9"), Transport::Tcp)
    else {
        panic!()
    };
    assert!(h.respond(id, 200, "z9hG4bKg", "BYE"));
    h.sent();
    h.run(Duration::from_millis(20));
    assert!(h.txns.is_empty(), "timer J is zero over TCP");
}

#[test]
fn server_invite_non_2xx_timers_g_h_i() {
    let mut h = Harness::new();
    let id = h.accept("INVITE", "z9hG4bKh", Transport::Udp);
    assert!(h.respond(id, 180, "z9hG4bKh", "INVITE"));
    h.sent();
    // A retransmitted INVITE gets the last provisional again.
    assert_eq!(h.receive("INVITE", "z9hG4bKh", ""), Incoming::Absorbed);
    assert_eq!(h.sent().len(), 1);
    assert!(h.respond(id, 486, "z9hG4bKh", "INVITE"));
    assert!(
        !h.txns.respond(h.now, id, 500, Bytes::new()),
        "one final response only"
    );
    h.sent();
    let (times, events) = h.run(Duration::from_secs(40));
    // Timer G doubles up to T2; timer H gives up at 64*T1 and tells the TU.
    assert_eq!(
        secs(&times),
        vec![0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    );
    assert_eq!(events, vec![TxnEvent::AckTimeout(id)]);

    h.answered_invite("z9hG4bKi", 486);
    assert_eq!(h.receive("ACK", "z9hG4bKi", ";tag=t9"), Incoming::Absorbed);
    let (times, events) = h.run(Duration::from_millis(4900));
    assert!(times.is_empty() && events.is_empty());
    assert_eq!(
        h.txns.len(),
        1,
        "timer I absorbs ACK retransmissions for T4"
    );
    h.run(Duration::from_millis(200));
    assert!(h.txns.is_empty());
}

#[test]
fn server_invite_2xx_is_retransmitted_until_the_end_to_end_ack() {
    let mut h = Harness::new();
    h.answered_invite("z9hG4bKj", 200);
    let (times, _) = h.run(Duration::from_millis(1600));
    assert_eq!(secs(&times), vec![0.5, 1.5]);
    // The ACK for a 2xx has its own branch: it reaches the TU and stops the retransmissions.
    assert_eq!(h.receive("ACK", "z9hG4bKother", ";tag=t9"), Incoming::Ack);
    let (times, events) = h.run(Duration::from_secs(40));
    assert!(times.is_empty() && events.is_empty());
    assert!(h.txns.is_empty());
}

/// After the end-to-end ACK the answered INVITE lingers T4 (5 s) to absorb INVITE retransmissions
/// still in flight, not the rest of timer L: a call holds 27 transaction-seconds less, which is
/// what bounded the sustained call rate (benches/sip-rate.sh); an INVITE retransmitted within T4
/// is still absorbed.
#[test]
fn acknowledged_2xx_lingers_t4() {
    for ack_branch in ["z9hG4bKother", "z9hG4bKt4"] {
        let mut h = Harness::new();
        h.answered_invite("z9hG4bKt4", 200);
        assert_eq!(h.receive("ACK", ack_branch, ";tag=t9"), Incoming::Ack);
        h.run(Duration::from_secs(4));
        assert_eq!(
            h.receive("INVITE", "z9hG4bKt4", ""),
            Incoming::Absorbed,
            "{ack_branch}"
        );
        assert_eq!(h.txns.len(), 1);
        h.run(Duration::from_millis(1100));
        assert!(
            h.txns.is_empty(),
            "{ack_branch}: still there 5.1 s after the ACK"
        );
    }
}

#[test]
fn server_non_invite_timer_j_and_cancel_matching() {
    let mut h = Harness::new();
    let inv = h.accept("INVITE", "z9hG4bKk", Transport::Udp);
    let Incoming::Cancel { cancel: c, invite } = h.receive("CANCEL", "z9hG4bKk", "") else {
        panic!()
    };
    assert_eq!(invite, Some(inv));
    h.respond(c, 200, "z9hG4bKk", "CANCEL");
    h.sent();
    assert_eq!(h.receive("CANCEL", "z9hG4bKk", ""), Incoming::Absorbed);
    assert_eq!(h.sent().len(), 1, "retransmitted CANCEL answered again");
    h.respond(inv, 487, "z9hG4bKk", "INVITE");
    h.receive("ACK", "z9hG4bKk", ";tag=t9");
    h.lingers(
        Duration::from_secs(31),
        Duration::from_secs(2),
        "timer J keeps the CANCEL transaction 64*T1",
    );
}

#[test]
fn transaction_count_is_bounded() {
    let mut h = Harness::with_limit(2);
    assert!(matches!(
        h.receive("OPTIONS", "z9hG4bK1", ""),
        Incoming::Request(_)
    ));
    assert!(matches!(
        h.receive("OPTIONS", "z9hG4bK2", ""),
        Incoming::Request(_)
    ));
    assert_eq!(h.receive("OPTIONS", "z9hG4bK3", ""), Incoming::Overloaded);
    assert!(h.send("OPTIONS", "z9hG4bK4", "", Transport::Udp).is_none());
    // Requests that end calls still pass (in and out), up to a bound of their own.
    assert!(matches!(
        h.receive("BYE", "z9hG4bK5", ""),
        Incoming::Request(_)
    ));
    assert!(
        h.send("BYE", "z9hG4bK6", "", Transport::Udp).is_none(),
        "3 = 2 + 2/2: full"
    );
    let mut h = Harness::with_limit(4);
    for i in 0..4 {
        assert!(matches!(
            h.receive("INVITE", &format!("z9hG4bKi{i}"), ""),
            Incoming::Request(_)
        ));
    }
    assert_eq!(h.receive("INVITE", "z9hG4bKi9", ""), Incoming::Overloaded);
    assert!(matches!(
        h.receive("CANCEL", "z9hG4bKi0", ""),
        Incoming::Cancel { .. }
    ));
    assert!(h.send("BYE", "z9hG4bKb1", "", Transport::Udp).is_some());
    assert_eq!(
        h.receive("BYE", "z9hG4bKb2", ""),
        Incoming::Overloaded,
        "6 = 4 + 4/2: full"
    );
}

// ---- The TCP transport on loopback (real sockets, shortened limits; every wait is bounded). ----

mod tcp {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use confmesh::sip::Transport;
    use confmesh::sip::transaction::Transmit;
    use confmesh::sip::transport::{Inbound, SipSockets, TcpLimits};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;

    /// The longest any wait in these tests may take before it counts as a failure.
    const BOUND: Duration = Duration::from_secs(10);

    async fn server(limits: TcpLimits) -> (SipSockets, mpsc::Receiver<Inbound>, SocketAddr) {
        let (tx, rx) = mpsc::channel(64);
        let s = SipSockets::bind_with(&["127.0.0.1:0".parse().unwrap()], tx, limits)
            .await
            .unwrap();
        let addr = s.local_addrs()[0];
        (s, rx, addr)
    }

    fn message(method: &str, branch: &str) -> Vec<u8> {
        format!(
            "{method} sip:meet.1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch={branch}\r\n\
             From: <sip:a@x>;tag=f1\r\nTo: <sip:meet.1@127.0.0.1>\r\nCall-ID: {branch}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    /// Waits (bounded) until the server closes `c`: true on EOF or reset, false if it stays open.
    async fn closed(c: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 512];
        let end = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// The next message the server delivered from `src` (bounded wait).
    async fn received_from(rx: &mut mpsc::Receiver<Inbound>, src: SocketAddr) -> Inbound {
        let m = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("a message within the bound")
            .expect("server alive");
        assert_eq!(m.src, src);
        assert_eq!(m.transport, Transport::Tcp);
        m
    }

    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + BOUND;
        while !f() {
            assert!(Instant::now() < end, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.unwrap()
    }

    /// Writes a `method` request on `c` and waits (bounded) until the server delivers it from `c`.
    async fn deliver(
        c: &mut TcpStream,
        rx: &mut mpsc::Receiver<Inbound>,
        method: &str,
        branch: &str,
    ) -> Inbound {
        c.write_all(&message(method, branch)).await.unwrap();
        received_from(rx, c.local_addr().unwrap()).await
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let idle = Duration::from_millis(300);
        let (s, mut rx, addr) = server(TcpLimits {
            idle_timeout: idle,
            ..TcpLimits::default()
        })
        .await;
        let start = Instant::now();
        let mut silent = connect(addr).await;
        let mut active = connect(addr).await;
        deliver(&mut active, &mut rx, "OPTIONS", "z9hG4bKidle1").await;
        assert!(
            closed(&mut silent, BOUND).await,
            "a silent connection stays open"
        );
        assert!(start.elapsed() >= idle, "closed before the idle timeout");
        // A connection that carried a message (and no INVITE) is idle afterwards too.
        assert!(
            closed(&mut active, BOUND).await,
            "an idle connection after a message stays open"
        );
        let st = s.stats();
        assert_eq!(
            (st.tcp_idle_closed, st.tcp_incomplete_closed, st.tcp_evicted),
            (2, 0, 0)
        );
        wait_for("closed connections are forgotten", || {
            s.tcp_connections() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn trickling_connection_is_cut() {
        // Idle allowance far beyond the test: only the started-message bound can cut.
        let limits = TcpLimits {
            idle_timeout: Duration::from_secs(120),
            message_timeout: Duration::from_millis(300),
            ..TcpLimits::default()
        };
        let (s, _rx, addr) = server(limits).await;
        let mut c = connect(addr).await;
        c.write_all(b"OPTIONS sip:meet.1@127.0.0.1 SIP/2.0\r\nX-Slow: ")
            .await
            .unwrap();
        let mut cut = false;
        let mut buf = [0u8; 64];
        // One byte every 20 ms (the stream never idles), at most 10 s of it.
        for _ in 0..500 {
            if c.write_all(b"a").await.is_err() {
                cut = true;
                break;
            }
            match tokio::time::timeout(Duration::from_millis(20), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    cut = true;
                    break;
                }
                _ => {}
            }
        }
        assert!(cut, "a message trickled forever keeps its connection");
        let st = s.stats();
        assert_eq!((st.tcp_incomplete_closed, st.tcp_idle_closed), (1, 0));
    }

    #[tokio::test]
    async fn pending_invite_keeps_the_connection_until_answered() {
        let limits = TcpLimits {
            idle_timeout: Duration::from_millis(200),
            invite_timeout: Duration::from_secs(120),
            ..TcpLimits::default()
        };
        let (s, mut rx, addr) = server(limits).await;
        let mut caller = connect(addr).await;
        let mut silent = connect(addr).await;
        let inv = deliver(&mut caller, &mut rx, "INVITE", "z9hG4bKinv1").await;
        assert!(closed(&mut silent, BOUND).await);
        // Well past the idle timeout, the caller's connection still works: it carries an INVITE.
        deliver(&mut caller, &mut rx, "OPTIONS", "z9hG4bKinv2").await;
        // A provisional response keeps it pending; the final one ends the INVITE.
        let reply = |code: u16| {
            let text = format!(
                "SIP/2.0 {code} X\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKinv1\r\nFrom: <sip:a@x>;tag=f1\r\n\
                 To: <sip:meet.1@127.0.0.1>;tag=b1\r\nCall-ID: z9hG4bKinv1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
            );
            Transmit::to(inv.src, inv.local, Transport::Tcp, Bytes::from(text))
        };
        s.send(reply(180));
        s.send(reply(486));
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let end = tokio::time::Instant::now() + BOUND;
        // Read both responses, then the close that follows one idle period later.
        loop {
            match tokio::time::timeout_at(end, caller.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!("connection kept after the INVITE was answered"),
            }
        }
        let text = String::from_utf8(got).unwrap();
        assert!(
            text.starts_with("SIP/2.0 180 X\r\n") && text.contains("SIP/2.0 486 X\r\n"),
            "{text}"
        );
        assert_eq!(s.stats().tcp_idle_closed, 2);
    }

    #[tokio::test]
    async fn limit_evicts_the_least_recently_active_idle_connection() {
        let (s, mut rx, addr) = server(TcpLimits {
            max_connections: 3,
            ..TcpLimits::default()
        })
        .await;
        let mut c1 = connect(addr).await;
        let mut others = Vec::new();
        for _ in 0..2 {
            others.push(connect(addr).await);
        }
        wait_for("three connections registered", || s.tcp_connections() == 3).await;
        // The other two carry a message after c1 connected, so c1 is the least recently active
        // (the clock counts milliseconds: make sure one passes).
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (i, c) in others.iter_mut().enumerate() {
            deliver(c, &mut rx, "OPTIONS", &format!("z9hG4bKev{i}")).await;
        }
        // The limit is full of idle connections: a new one is still served.
        let mut late = connect(addr).await;
        deliver(&mut late, &mut rx, "OPTIONS", "z9hG4bKlate").await;
        assert!(
            closed(&mut c1, BOUND).await,
            "the oldest idle connection was not evicted"
        );
        for c in &mut others {
            assert!(
                !closed(c, Duration::from_millis(50)).await,
                "a more recently active connection was evicted"
            );
        }
        let st = s.stats();
        assert_eq!((st.tcp_evicted, st.refused_connections), (1, 0));
        assert_eq!(s.tcp_connections(), 3);
    }

    /// RFC 3261 §18.2.2: the connection a request came on has closed by the time its response is
    /// ready, so the response goes over a new connection to the request's source address and its
    /// top Via's sent-by port (where the caller listens), not to the closed connection's ephemeral
    /// port.
    #[tokio::test]
    async fn response_after_the_connection_closed_goes_to_the_via_sent_by_port() {
        use confmesh::sip::parse::{Framing, parse};
        use confmesh::sip::transaction::{Incoming, TimerConfig, Transactions};
        let (s, mut rx, addr) = server(TcpLimits::default()).await;
        let caller_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen_port = caller_listener.local_addr().unwrap().port();
        let mut c = connect(addr).await;
        let invite = format!(
            "INVITE sip:meet.1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{listen_port};branch=z9hG4bKgone\r\n\
             From: <sip:a@x>;tag=f1\r\nTo: <sip:meet.1@127.0.0.1>\r\nCall-ID: gone\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        );
        c.write_all(invite.as_bytes()).await.unwrap();
        let m = received_from(&mut rx, c.local_addr().unwrap()).await;
        let mut txns = Transactions::new(TimerConfig::default(), 16);
        let now = Instant::now();
        let msg = parse(&m.data, Framing::Stream).unwrap();
        let Incoming::Request(id) = txns.handle_message(now, &msg, m.src, m.local, Transport::Tcp)
        else {
            panic!("not a request")
        };
        let resp = format!(
            "SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/TCP 127.0.0.1:{listen_port};branch=z9hG4bKgone\r\n\
             From: <sip:a@x>;tag=f1\r\nTo: <sip:meet.1@127.0.0.1>;tag=t1\r\nCall-ID: gone\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        );
        assert!(txns.respond(now, id, 486, Bytes::from(resp)));
        let t = txns.poll_transmit().unwrap();
        assert_eq!(
            (t.dest, t.fallback),
            (m.src, Some(SocketAddr::new(m.src.ip(), listen_port)))
        );
        // The caller's connection goes away before the response is sent.
        drop(c);
        wait_for("the closed connection is forgotten", || {
            s.tcp_connections() == 0
        })
        .await;
        s.send(t);
        let (mut back, _) = tokio::time::timeout(BOUND, caller_listener.accept())
            .await
            .expect("a new connection to the Via port")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(BOUND, back.read(&mut buf))
                .await
                .expect("the response")
                .unwrap();
            assert!(n > 0, "closed before the response");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"SIP/2.0 486 Busy Here\r\n"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(s.stats().send_failures, 0);
    }

    #[tokio::test]
    async fn limit_refuses_when_every_connection_carries_an_invite() {
        let (s, mut rx, addr) = server(TcpLimits {
            max_connections: 2,
            ..TcpLimits::default()
        })
        .await;
        let mut callers = Vec::new();
        for i in 0..2 {
            let mut c = connect(addr).await;
            deliver(&mut c, &mut rx, "INVITE", &format!("z9hG4bKfull{i}")).await;
            callers.push(c);
        }
        let mut late = connect(addr).await;
        assert!(
            closed(&mut late, BOUND).await,
            "a connection beyond the limit was kept"
        );
        let st = s.stats();
        assert_eq!((st.refused_connections, st.tcp_evicted), (1, 0));
        // The calls in progress keep their connections.
        deliver(&mut callers[0], &mut rx, "OPTIONS", "z9hG4bKfull9").await;
    }
}
