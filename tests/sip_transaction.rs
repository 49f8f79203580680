//! The transaction layer on a virtual clock: every RFC 3261 §17 timer fires when it should, UDP
//! retransmits and TCP does not, retransmissions are absorbed, and the layer forgets transactions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use confmesh::sip::parse::{parse, Framing};
use confmesh::sip::transaction::{Incoming, TimerConfig, Transactions, Transmit, TxnEvent};
use confmesh::sip::Transport;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn request(method: &str, branch: &str, cseq_method: &str, to_tag: &str) -> Vec<u8> {
    format!(
        "{method} sip:b@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\n\
         From: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>{to_tag}\r\nCall-ID: c1\r\nCSeq: 7 {cseq_method}\r\nContent-Length: 0\r\n\r\n"
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
        Harness { txns: Transactions::new(TimerConfig::default(), 100), now: Instant::now(), local: addr("10.0.0.1:5060"), peer: addr("10.0.0.2:5060") }
    }

    fn feed(&mut self, bytes: &[u8], transport: Transport) -> Incoming {
        let m = parse(bytes, Framing::Datagram).unwrap();
        self.txns.handle_message(self.now, &m, self.peer, self.local, transport)
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
    v.iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect()
}

#[test]
fn client_invite_timers_a_and_b() {
    let mut h = Harness::new();
    let id = h.txns.send_request(h.now, Bytes::from(request("INVITE", "z9hG4bKa", "INVITE", "")), h.peer, h.local, Transport::Udp).unwrap();
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
    let id = h.txns.send_request(h.now, Bytes::from(request("INVITE", "z9hG4bKb", "INVITE", "")), h.peer, h.local, Transport::Udp).unwrap();
    h.sent();
    assert_eq!(h.feed(&response(180, "z9hG4bKb", "INVITE"), Transport::Udp), Incoming::Response(id));
    let (times, _) = h.run(Duration::from_secs(5));
    assert!(times.is_empty(), "no retransmission in Proceeding");
    assert_eq!(h.feed(&response(486, "z9hG4bKb", "INVITE"), Transport::Udp), Incoming::Response(id));
    let ack = h.sent();
    assert_eq!(ack.len(), 1);
    let m = parse(&ack[0].data, Framing::Datagram).unwrap();
    assert_eq!(m.cseq(), Some((7, "ACK")));
    assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bKb"));
    assert_eq!(m.to_tag(), Some("t9"));
    // A retransmitted final response is absorbed and re-ACKed.
    assert_eq!(h.feed(&response(486, "z9hG4bKb", "INVITE"), Transport::Udp), Incoming::Absorbed);
    assert_eq!(h.sent().len(), 1);
    h.run(Duration::from_secs(31));
    assert_eq!(h.txns.len(), 1, "timer D keeps it for 32 s");
    h.run(Duration::from_secs(2));
    assert!(h.txns.is_empty());
}

#[test]
fn client_invite_2xx_terminates_and_later_2xx_are_stray() {
    let mut h = Harness::new();
    let id = h.txns.send_request(h.now, Bytes::from(request("INVITE", "z9hG4bKc", "INVITE", "")), h.peer, h.local, Transport::Udp).unwrap();
    assert_eq!(h.feed(&response(200, "z9hG4bKc", "INVITE"), Transport::Udp), Incoming::Response(id));
    assert!(h.txns.is_empty());
    assert_eq!(h.feed(&response(200, "z9hG4bKc", "INVITE"), Transport::Udp), Incoming::StrayResponse);
}

#[test]
fn client_non_invite_timers_e_f_k() {
    let mut h = Harness::new();
    let id = h.txns.send_request(h.now, Bytes::from(request("OPTIONS", "z9hG4bKd", "OPTIONS", "")), h.peer, h.local, Transport::Udp).unwrap();
    h.sent();
    let (times, events) = h.run(Duration::from_secs(40));
    // Timer E doubles up to T2 = 4 s; timer F at 32 s.
    assert_eq!(secs(&times), vec![0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]);
    assert_eq!(events, vec![TxnEvent::Timeout(id)]);

    let id = h.txns.send_request(h.now, Bytes::from(request("BYE", "z9hG4bKe", "BYE", ";tag=t9")), h.peer, h.local, Transport::Udp).unwrap();
    h.sent();
    assert_eq!(h.feed(&response(200, "z9hG4bKe", "BYE"), Transport::Udp), Incoming::Response(id));
    assert_eq!(h.feed(&response(200, "z9hG4bKe", "BYE"), Transport::Udp), Incoming::Absorbed);
    h.run(Duration::from_millis(4900));
    assert_eq!(h.txns.len(), 1, "timer K is T4");
    h.run(Duration::from_millis(200));
    assert!(h.txns.is_empty());
}

#[test]
fn tcp_never_retransmits_and_lingers_zero() {
    let mut h = Harness::new();
    let id = h.txns.send_request(h.now, Bytes::from(request("INVITE", "z9hG4bKf", "INVITE", "")), h.peer, h.local, Transport::Tcp).unwrap();
    h.sent();
    let (times, events) = h.run(Duration::from_secs(33));
    assert!(times.is_empty());
    assert_eq!(events, vec![TxnEvent::Timeout(id)]);

    let Incoming::Request(id) = h.feed(&request("BYE", "z9hG4bKg", "BYE", ";tag=t9"), Transport::Tcp) else { panic!() };
    assert!(h.txns.respond(h.now, id, 200, Bytes::from(response(200, "z9hG4bKg", "BYE"))));
    h.sent();
    h.run(Duration::from_millis(20));
    assert!(h.txns.is_empty(), "timer J is zero over TCP");
}

#[test]
fn server_invite_non_2xx_timers_g_h_i() {
    let mut h = Harness::new();
    let inv = request("INVITE", "z9hG4bKh", "INVITE", "");
    let Incoming::Request(id) = h.feed(&inv, Transport::Udp) else { panic!() };
    assert!(h.txns.respond(h.now, id, 180, Bytes::from(response(180, "z9hG4bKh", "INVITE"))));
    h.sent();
    // A retransmitted INVITE gets the last provisional again.
    assert_eq!(h.feed(&inv, Transport::Udp), Incoming::Absorbed);
    assert_eq!(h.sent().len(), 1);
    assert!(h.txns.respond(h.now, id, 486, Bytes::from(response(486, "z9hG4bKh", "INVITE"))));
    assert!(!h.txns.respond(h.now, id, 500, Bytes::new()), "one final response only");
    h.sent();
    let (times, events) = h.run(Duration::from_secs(40));
    // Timer G doubles up to T2; timer H gives up at 64*T1 and tells the TU.
    assert_eq!(secs(&times), vec![0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]);
    assert_eq!(events, vec![TxnEvent::AckTimeout(id)]);

    let inv = request("INVITE", "z9hG4bKi", "INVITE", "");
    let Incoming::Request(id) = h.feed(&inv, Transport::Udp) else { panic!() };
    h.txns.respond(h.now, id, 486, Bytes::from(response(486, "z9hG4bKi", "INVITE")));
    h.sent();
    assert_eq!(h.feed(&request("ACK", "z9hG4bKi", "ACK", ";tag=t9"), Transport::Udp), Incoming::Absorbed);
    let (times, events) = h.run(Duration::from_millis(4900));
    assert!(times.is_empty() && events.is_empty());
    assert_eq!(h.txns.len(), 1, "timer I absorbs ACK retransmissions for T4");
    h.run(Duration::from_millis(200));
    assert!(h.txns.is_empty());
}

#[test]
fn server_invite_2xx_is_retransmitted_until_the_end_to_end_ack() {
    let mut h = Harness::new();
    let Incoming::Request(id) = h.feed(&request("INVITE", "z9hG4bKj", "INVITE", ""), Transport::Udp) else { panic!() };
    h.txns.respond(h.now, id, 200, Bytes::from(response(200, "z9hG4bKj", "INVITE")));
    h.sent();
    let (times, _) = h.run(Duration::from_millis(1600));
    assert_eq!(secs(&times), vec![0.5, 1.5]);
    // The ACK for a 2xx has its own branch: it reaches the TU and stops the retransmissions.
    assert_eq!(h.feed(&request("ACK", "z9hG4bKother", "ACK", ";tag=t9"), Transport::Udp), Incoming::Ack);
    let (times, events) = h.run(Duration::from_secs(40));
    assert!(times.is_empty() && events.is_empty());
    assert!(h.txns.is_empty());
}

#[test]
fn server_non_invite_timer_j_and_cancel_matching() {
    let mut h = Harness::new();
    let Incoming::Request(inv) = h.feed(&request("INVITE", "z9hG4bKk", "INVITE", ""), Transport::Udp) else { panic!() };
    let cancel = request("CANCEL", "z9hG4bKk", "CANCEL", "");
    let Incoming::Cancel { cancel: c, invite } = h.feed(&cancel, Transport::Udp) else { panic!() };
    assert_eq!(invite, Some(inv));
    h.txns.respond(h.now, c, 200, Bytes::from(response(200, "z9hG4bKk", "CANCEL")));
    h.sent();
    assert_eq!(h.feed(&cancel, Transport::Udp), Incoming::Absorbed);
    assert_eq!(h.sent().len(), 1, "retransmitted CANCEL answered again");
    h.txns.respond(h.now, inv, 487, Bytes::from(response(487, "z9hG4bKk", "INVITE")));
    h.feed(&request("ACK", "z9hG4bKk", "ACK", ";tag=t9"), Transport::Udp);
    h.run(Duration::from_secs(31));
    assert_eq!(h.txns.len(), 1, "timer J keeps the CANCEL transaction 64*T1");
    h.run(Duration::from_secs(2));
    assert!(h.txns.is_empty());
}

#[test]
fn transaction_count_is_bounded() {
    let mut h = Harness { txns: Transactions::new(TimerConfig::default(), 2), ..Harness::new() };
    assert!(matches!(h.feed(&request("OPTIONS", "z9hG4bK1", "OPTIONS", ""), Transport::Udp), Incoming::Request(_)));
    assert!(matches!(h.feed(&request("OPTIONS", "z9hG4bK2", "OPTIONS", ""), Transport::Udp), Incoming::Request(_)));
    assert_eq!(h.feed(&request("OPTIONS", "z9hG4bK3", "OPTIONS", ""), Transport::Udp), Incoming::Overloaded);
    assert!(h.txns.send_request(h.now, Bytes::from(request("OPTIONS", "z9hG4bK4", "OPTIONS", "")), h.peer, h.local, Transport::Udp).is_none());
}
