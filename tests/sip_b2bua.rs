//! The sans-IO B2BUA core with a scripted VCS and bridges on a virtual clock: dialogs kept apart,
//! re-INVITE both ways, errors relayed, bridge failover, admission with a Warning naming the
//! location, ACK timeout, placement races between peers, random message sequences, and the
//! location limit held across two peers by their bandwidth-update cores.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use confmesh::b2bua::core::{B2bua, B2buaEvent, BridgeProbe, CoreConfig};
use confmesh::b2bua::routing::{HealthTable, Router, rank_bridges};
use confmesh::b2bua::{BandwidthLedger, MemoryDirectory, MemoryLedger, RoutingConfig};
use confmesh::bandwidth::{Bandwidth, BandwidthConfig, BandwidthLedgerHandle};
use confmesh::sip::Transport;
use confmesh::sip::build::MessageWriter;
use confmesh::sip::parse::{Framing, Hdr, Message, StartLine, parse};
use confmesh::sip::transaction::Transmit;
use serde_json::json;

const VCS: &str = "10.96.3.1:5060";
const ME: &str = "10.96.1.1:5060";

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn routing_config(limit_kbps: u64) -> RoutingConfig {
    let entries = [
        (
            "alias/meet".to_owned(),
            json!({"pattern": "^meet\\.(\\d+)@", "conference": "meet-$1", "call_kbps": 1000, "location": "hq"}),
        ),
        ("location/hq".to_owned(), json!({"limit_kbps": limit_kbps})),
        (
            "bridge/b1".to_owned(),
            json!({"uri": "sip:10.96.4.1:5060", "capacity": 10}),
        ),
        (
            "bridge/b2".to_owned(),
            json!({"uri": "sip:10.96.4.2:5060", "capacity": 10}),
        ),
    ];
    RoutingConfig::from_entries(entries.iter().map(|(k, v)| (k.as_str(), v))).0
}

struct World<L = MemoryLedger> {
    core: B2bua,
    router: Router<MemoryDirectory, L>,
    cfg: RoutingConfig,
    now: Instant,
    /// Messages the core sent, not yet looked at.
    out: Vec<Transmit>,
}

impl World {
    fn new(limit_kbps: u64) -> World {
        World::with(
            limit_kbps,
            MemoryDirectory::default(),
            MemoryLedger::default(),
        )
    }
}

impl<L: BandwidthLedger> World<L> {
    fn with(limit_kbps: u64, directory: MemoryDirectory, ledger: L) -> World<L> {
        let core = B2bua::new(CoreConfig {
            hostname: "cm1".into(),
            options_interval: Duration::ZERO,
            seed: 7,
            ..CoreConfig::default()
        });
        let router = Router {
            directory,
            ledger,
            health: Arc::new(HealthTable::default()),
        };
        World {
            core,
            router,
            cfg: routing_config(limit_kbps),
            now: Instant::now(),
            out: Vec::new(),
        }
    }

    /// Runs routing for every pending event and collects transmissions.
    async fn settle(&mut self) {
        for _ in 0..100 {
            let mut progressed = false;
            while let Some(t) = self.core.poll_transmit() {
                self.out.push(t);
                progressed = true;
            }
            while let Some(ev) = self.core.poll_event() {
                progressed = true;
                match ev {
                    B2buaEvent::Route { call, request } => {
                        let d = self.router.route(&self.cfg, &request).await;
                        self.core.handle_route(self.now, call, d);
                    }
                    B2buaEvent::Release(r) => self.router.release(&r).await,
                    B2buaEvent::BridgeHealth { bridge, up } => {
                        self.router.health.set(&bridge, up);
                    }
                }
            }
            if !progressed {
                return;
            }
        }
        panic!("core did not settle in 100 rounds");
    }

    async fn recv(&mut self, from: &str, transport: Transport, data: &[u8]) {
        self.core
            .handle_datagram(self.now, a(from), a(ME), transport, data);
        self.settle().await;
    }

    /// `from` sends `data` over UDP, as the VCS and the bridges do in most of these tests.
    async fn recv_udp(&mut self, from: &str, data: &[u8]) {
        self.recv(from, Transport::Udp, data).await;
    }

    /// `from` answers `req` with a bare 200 (no tag, Contact or body), as a BYE is answered.
    async fn answer_ok(&mut self, from: &str, req: &[u8]) {
        self.recv_udp(from, &reply(req, 200, None, None, b"")).await;
    }

    /// The VCS sends INVITE `n` for meet.`n` over UDP; returns that INVITE, the first-ranked
    /// bridge of conference meet-`n` and the B-leg INVITE sent to it.
    async fn invite_to_bridge(&mut self, n: u32) -> (Vec<u8>, String, Vec<u8>) {
        let inv = invite(n, &format!("meet.{n}"));
        self.recv_udp(VCS, &inv).await;
        let bridge = bridge_of(&self.cfg, &format!("meet-{n}"), 0);
        let binv = self.take(&bridge, "INVITE");
        (inv, bridge, binv)
    }

    /// The VCS sends INVITE `n` for meet.`n` and is refused with 503; that 503's Warning.
    async fn refused_warning(&mut self, n: u32) -> String {
        self.recv_udp(VCS, &invite(n, &format!("meet.{n}"))).await;
        warning(&self.take(VCS, "503"))
    }

    /// The bridge hangs up the call whose B leg it answered with `b200`: our 200 to it is taken,
    /// and the BYE relayed to the VCS is returned (not yet answered).
    async fn bye_from_bridge(&mut self, bridge: &str, b200: &[u8], branch: &str) -> Vec<u8> {
        let bye = Leg::bridge(bridge, b200).request("BYE", 11, branch, b"");
        self.recv_udp(bridge, &bye).await;
        self.take(bridge, "200");
        self.take(VCS, "BYE")
    }

    async fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(50);
            if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
                self.core.handle_timeout(self.now);
            }
            self.settle().await;
        }
    }

    /// Takes the first unread message sent to `dest` matching `what` (method or status code).
    fn take(&mut self, dest: &str, what: &str) -> Vec<u8> {
        let i = self
            .out
            .iter()
            .position(|t| t.dest == a(dest) && label(&t.data) == what)
            .unwrap_or_else(|| {
                panic!(
                    "no {what} to {dest}; sent: {:?}",
                    self.out
                        .iter()
                        .map(|t| (t.dest, label(&t.data)))
                        .collect::<Vec<_>>()
                )
            });
        self.out.remove(i).data.to_vec()
    }

    /// The first unread message matching `what` (to any destination), left unread.
    fn peek(&self, what: &str) -> &Transmit {
        self.out
            .iter()
            .find(|t| label(&t.data) == what)
            .unwrap_or_else(|| panic!("no {what} sent"))
    }

    fn nothing_to(&self, dest: &str, what: &str) -> bool {
        !self
            .out
            .iter()
            .any(|t| t.dest == a(dest) && label(&t.data) == what)
    }
}

fn label(data: &Bytes) -> String {
    match parse(data, Framing::Datagram).map(|m| m.start) {
        Ok(StartLine::Request { method_token, .. }) => method_token.to_owned(),
        Ok(StartLine::Response { code, .. }) => code.to_string(),
        Err(e) => format!("unparsable: {e}"),
    }
}

fn msg(data: &[u8]) -> Message<'_> {
    parse(data, Framing::Datagram).unwrap()
}

fn invite(n: u32, user: &str) -> Vec<u8> {
    let sdp = "v=0\r\nm=audio 4000 RTP/AVP 0\r\n";
    format!(
        "INVITE sip:{user}@10.96.1.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.96.3.1:5060;branch=z9hG4bKvcs{n}\r\n\
         Record-Route: <sip:vcs-rr.example.com;lr>\r\nMax-Forwards: 70\r\n\
         From: \"VCS\" <sip:caller@example.com>;tag=vf{n}\r\nTo: <sip:{user}@example.com>\r\nCall-ID: vcs-call-{n}\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:caller@10.96.3.1:5060>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
    .into_bytes()
}

/// A response to `req` as a UA would write it.
fn reply(
    req: &[u8],
    code: u16,
    to_tag: Option<&str>,
    contact: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let r = msg(req);
    let mut out = Vec::new();
    let mut w = MessageWriter::response(&mut out, code, "Reason");
    for v in r.header_lines(Hdr::Via) {
        w.header("Via", v);
    }
    w.header("From", r.header(Hdr::From).unwrap());
    match to_tag {
        Some(t) if r.to_tag().is_none() => {
            w.header_fmt("To", format_args!("{};tag={t}", r.header(Hdr::To).unwrap()))
        }
        _ => w.header("To", r.header(Hdr::To).unwrap()),
    };
    w.header("Call-ID", r.call_id().unwrap())
        .header("CSeq", r.header(Hdr::CSeq).unwrap());
    if let Some(c) = contact {
        w.header("Contact", c);
    }
    if !body.is_empty() {
        w.header("Content-Type", "application/sdp");
    }
    w.finish(body);
    out
}

/// An in-dialog request built from a response/request the sender saw (tags from `from_hdr`/`to_hdr`).
/// One argument per header keeps each call site readable as the message it builds.
#[allow(clippy::too_many_arguments)]
fn in_dialog(
    method: &str,
    uri: &str,
    via_host: &str,
    from_hdr: &str,
    to_hdr: &str,
    call_id: &str,
    cseq: u32,
    branch: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::request(&mut out, method, uri);
    w.header_fmt(
        "Via",
        format_args!("SIP/2.0/UDP {via_host};branch={branch}"),
    )
    .header("From", from_hdr)
    .header("To", to_hdr)
    .header("Call-ID", call_id)
    .header_fmt("CSeq", format_args!("{cseq} {method}"));
    if method == "INVITE" {
        w.header("Contact", &format!("<sip:x@{via_host}>"));
    }
    if !body.is_empty() {
        w.header("Content-Type", "application/sdp");
    }
    w.finish(body);
    out
}

/// One end of a dialog as that end writes its in-dialog requests to us: where it sends from and
/// its From, To and Call-ID (what [`in_dialog`] needs besides the request's own fields).
struct Leg {
    via_host: String,
    from: String,
    to: String,
    call_id: String,
}

impl Leg {
    /// The VCS in call `n`'s A dialog (Call-ID vcs-call-`n`), with From and To as in `ours`, a
    /// response we sent on the A leg.
    fn caller(n: u32, ours: &[u8]) -> Leg {
        let m = msg(ours);
        Leg {
            via_host: "10.96.3.1:5060".into(),
            from: m.header(Hdr::From).unwrap().into(),
            to: m.header(Hdr::To).unwrap().into(),
            call_id: format!("vcs-call-{n}"),
        }
    }

    /// The bridge at `bridge` in the B dialog it answered with `b200` (its tag is the To tag there).
    fn bridge(bridge: &str, b200: &[u8]) -> Leg {
        let m = msg(b200);
        Leg {
            via_host: bridge.into(),
            from: m.header(Hdr::To).unwrap().into(),
            to: m.header(Hdr::From).unwrap().into(),
            call_id: m.call_id().unwrap().into(),
        }
    }

    /// An in-dialog request to our URI (sip:confmesh@10.96.1.1).
    fn request(&self, method: &str, cseq: u32, branch: &str, body: &[u8]) -> Vec<u8> {
        in_dialog(
            method,
            "sip:confmesh@10.96.1.1",
            &self.via_host,
            &self.from,
            &self.to,
            &self.call_id,
            cseq,
            branch,
            body,
        )
    }
}

/// A bridge's 200 to `req` with its Contact (`<sip:bridge@addr>`) and the SDP `body`.
fn bridge_ok(req: &[u8], bridge: &str, to_tag: Option<&str>, body: &[u8]) -> Vec<u8> {
    let contact = format!("<sip:bridge@{bridge}>");
    reply(req, 200, to_tag, Some(&contact), body)
}

/// The value of the first Warning header of `data` (there must be one).
fn warning(data: &[u8]) -> String {
    msg(data)
        .headers()
        .iter()
        .find(|h| h.name == "Warning")
        .map(|h| h.value.to_owned())
        .unwrap()
}

/// Whether any Warning header of `data` contains `text`.
fn has_warning(data: &[u8], text: &str) -> bool {
    msg(data)
        .headers()
        .iter()
        .any(|h| h.name == "Warning" && h.value.contains(text))
}

fn bridge_of(cfg: &RoutingConfig, conference: &str, nth: usize) -> String {
    let b = rank_bridges(conference, cfg.bridges.values())[nth];
    b.addr.to_string()
}

/// Sets up one connected call; returns (bridge addr, the B INVITE, A's 200, B's 200).
async fn connected_call<L: BandwidthLedger>(
    w: &mut World<L>,
    n: u32,
) -> (String, Vec<u8>, Vec<u8>, Vec<u8>) {
    let (inv, bridge, binv) = w.invite_to_bridge(n).await;
    w.take(VCS, "100");
    let b200 = bridge_ok(
        &binv,
        &bridge,
        Some("bt"),
        b"v=0\r\nm=video 5000 RTP/AVP 96\r\n",
    );
    w.recv_udp(&bridge, &b200).await;
    let a200 = w.take(VCS, "200");
    // The ACK's From is the INVITE's, its To (with our tag) the 200's.
    let caller = Leg {
        from: msg(&inv).header(Hdr::From).unwrap().into(),
        ..Leg::caller(n, &a200)
    };
    let ack = caller.request("ACK", 1, &format!("z9hG4bKack{n}"), b"");
    w.recv_udp(VCS, &ack).await;
    w.take(&bridge, "ACK");
    (bridge, binv, a200, b200)
}

#[tokio::test]
async fn legs_are_separate_dialogs_and_sdp_passes() {
    let mut w = World::new(100_000);
    let (inv, bridge, binv) = w.invite_to_bridge(1).await;
    w.take(VCS, "100");
    let b = msg(&binv);
    assert_ne!(b.call_id(), Some("vcs-call-1"), "new Call-ID on the B leg");
    assert_ne!(b.from_tag(), Some("vf1"), "new From tag on the B leg");
    assert_eq!(
        b.header_values(Hdr::Via).count(),
        1,
        "only our Via toward the bridge"
    );
    assert!(
        b.header(Hdr::RecordRoute).is_none(),
        "A's Record-Route stays on the A leg"
    );
    assert_eq!(b.header(Hdr::MaxForwards), Some("69"));
    assert_eq!(b.body, msg(&inv).body, "SDP offer passed through");
    assert!(
        matches!(b.start, StartLine::Request { uri, .. } if uri.starts_with("sip:meet-1@10.96.4."))
    );

    w.recv_udp(&bridge, &reply(&binv, 180, Some("bt"), None, b""))
        .await;
    let a180 = w.take(VCS, "180");
    let m = msg(&a180);
    assert_eq!(m.call_id(), Some("vcs-call-1"));
    assert!(m.to_tag().is_some());
    assert_eq!(
        m.header(Hdr::RecordRoute),
        Some("<sip:vcs-rr.example.com;lr>"),
        "Record-Route echoed on the A leg"
    );
    let answer = b"v=0\r\nm=video 5000 RTP/AVP 96\r\n";
    // The bridge's Contact names another address: the ACK must go there.
    let b200 = reply(
        &binv,
        200,
        Some("bt"),
        Some("<sip:bridge@10.96.4.9>"),
        answer,
    );
    w.recv_udp(&bridge, &b200).await;
    let a200 = w.take(VCS, "200");
    let m = msg(&a200);
    assert_eq!(m.body, answer, "SDP answer passed through");
    assert_eq!(m.to_tag(), msg(&a180).to_tag(), "one A dialog");
    assert!(
        m.header(Hdr::Contact).unwrap().contains("10.96.1.1"),
        "our Contact, not the bridge's"
    );
    assert!(
        w.nothing_to(&bridge, "ACK"),
        "B is ACKed when A ACKs (late-offer safe)"
    );
    let ack = Leg::caller(1, &a200).request("ACK", 1, "z9hG4bKa1", b"");
    w.recv_udp(VCS, &ack).await;
    let back = w.take("10.96.4.9:5060", "ACK");
    assert_eq!(msg(&back).to_tag(), Some("bt"));
    assert_eq!(w.core.stats().calls_answered, 1);

    // The bridge retransmits its 200 (our ACK lost): the same ACK goes again.
    w.recv_udp(&bridge, &b200).await;
    w.take("10.96.4.9:5060", "ACK");
}

#[tokio::test]
async fn reinvite_both_ways_and_bye() {
    let mut w = World::new(100_000);
    let (bridge, binv, a200, b200) = connected_call(&mut w, 2).await;
    let _ = &binv;
    let (caller, from_bridge) = (Leg::caller(2, &a200), Leg::bridge(&bridge, &b200));
    // Re-INVITE from the VCS with a new offer reaches the bridge with the new SDP and CSeq 2.
    let offer = b"v=0\r\nm=audio 4002 RTP/AVP 0\r\n";
    let reinv = caller.request("INVITE", 2, "z9hG4bKre1", offer);
    w.recv_udp(VCS, &reinv).await;
    let breinv = w.take(&bridge, "INVITE");
    let m = msg(&breinv);
    assert_eq!(m.body, offer);
    assert_eq!(m.cseq(), Some((2, "INVITE")));
    assert_eq!(m.to_tag(), Some("bt"));
    assert_eq!(m.call_id(), msg(&binv).call_id());
    // A second re-INVITE while one is pending: 491.
    let again = caller.request("INVITE", 3, "z9hG4bKre2", offer);
    w.recv_udp(VCS, &again).await;
    w.take(VCS, "491");
    w.recv_udp(
        &bridge,
        &bridge_ok(&breinv, &bridge, None, b"v=0\r\nanswer2\r\n"),
    )
    .await;
    let r200 = w.take(VCS, "200");
    assert_eq!(msg(&r200).body, b"v=0\r\nanswer2\r\n");
    let ack = caller.request("ACK", 2, "z9hG4bKra", b"");
    w.recv_udp(VCS, &ack).await;
    assert_eq!(msg(&w.take(&bridge, "ACK")).cseq(), Some((2, "ACK")));

    // Re-INVITE from the bridge reaches the VCS inside the A dialog.
    let from_b = from_bridge.request("INVITE", 10, "z9hG4bKbre", b"v=0\r\nfromB\r\n");
    w.recv_udp(&bridge, &from_b).await;
    let areinv = w.take(VCS, "INVITE");
    let m = msg(&areinv);
    assert_eq!(m.call_id(), Some("vcs-call-2"));
    assert_eq!(m.to_tag(), Some("vf2"), "addressed to the caller's tag");
    assert_eq!(
        m.header(Hdr::Route),
        Some("<sip:vcs-rr.example.com;lr>"),
        "A's route set used"
    );
    w.recv_udp(VCS, &reply(&areinv, 488, None, None, b"")).await;
    w.take(VCS, "ACK");
    w.take(&bridge, "488");

    // BYE from the bridge: 200 to it, BYE to the VCS; the call ends when the VCS answers.
    let abye = w.bye_from_bridge(&bridge, &b200, "z9hG4bKbye").await;
    assert_eq!(w.core.stats().calls_active, 1);
    w.answer_ok(VCS, &abye).await;
    assert_eq!(w.core.stats().calls_active, 0);
    assert!(w.router.directory.snapshot().is_empty());
}

#[tokio::test]
async fn errors_are_relayed_and_bridge_failures_fail_over() {
    let mut w = World::new(100_000);
    // 603 Decline from the bridge is an answer about the call, not a bridge failure: relayed.
    let (_, first, binv) = w.invite_to_bridge(3).await;
    w.recv_udp(&first, &reply(&binv, 603, Some("bt"), None, b""))
        .await;
    w.take(&first, "ACK");
    let a603 = w.take(VCS, "603");
    assert_eq!(msg(&a603).call_id(), Some("vcs-call-3"));
    assert_eq!(w.core.stats().bridge_failovers, 0);

    // 503 from the first bridge of a conference not yet started: moved to the next bridge.
    let (_, first, binv) = w.invite_to_bridge(4).await;
    let second = bridge_of(&w.cfg, "meet-4", 1);
    w.recv_udp(&first, &reply(&binv, 503, Some("bt"), None, b""))
        .await;
    let binv2 = w.take(&second, "INVITE");
    assert_ne!(msg(&binv2).call_id(), msg(&binv).call_id());
    assert!(w.nothing_to(VCS, "503"));
    assert_eq!(w.core.stats().bridge_failovers, 1);
    // The second fails too: no third bridge, so the caller gets 503 with a reason.
    w.recv_udp(&second, &reply(&binv2, 503, Some("bt2"), None, b""))
        .await;
    let a503 = w.take(VCS, "503");
    assert!(
        has_warning(&a503, "no bridge available"),
        "{}",
        String::from_utf8_lossy(&a503)
    );
    assert_eq!(w.core.stats().calls_active, 0);
    assert!(w.router.directory.snapshot().is_empty());
}

#[tokio::test]
async fn admission_by_location_bandwidth() {
    let mut w = World::new(2500);
    connected_call(&mut w, 5).await;
    connected_call(&mut w, 6).await;
    let warning = w.refused_warning(7).await;
    assert!(
        warning.starts_with("399 cm1 ") && warning.contains("location hq"),
        "{warning}"
    );
    w.recv_udp(VCS, &invite(8, "unknown")).await;
    w.take(VCS, "404");
}

#[tokio::test]
async fn cancel_before_the_bridge_rings_and_unanswered_200() {
    let mut w = World::new(100_000);
    let (inv, bridge, binv) = w.invite_to_bridge(9).await;
    let im = msg(&inv);
    let cancel = in_dialog(
        "CANCEL",
        "sip:meet.9@10.96.1.1",
        "10.96.3.1:5060",
        im.header(Hdr::From).unwrap(),
        im.header(Hdr::To).unwrap(),
        "vcs-call-9",
        1,
        "z9hG4bKvcs9",
        b"",
    );
    w.recv_udp(VCS, &cancel).await;
    w.take(VCS, "200");
    w.take(VCS, "487");
    assert!(
        w.nothing_to(&bridge, "CANCEL"),
        "no CANCEL before a provisional response"
    );
    // The bridge answers anyway: ACK then BYE, and the caller hears nothing more.
    w.recv_udp(&bridge, &bare_bridge_ok(&binv, &bridge)).await;
    w.take(&bridge, "ACK");
    let bye = w.take(&bridge, "BYE");
    w.answer_ok(&bridge, &bye).await;
    assert_eq!(w.core.stats().calls_active, 0);

    // A caller that never ACKs our 200: after 64*T1 both legs are hung up.
    let (bridge, ..) = connected_call_without_ack(&mut w, 10).await;
    w.advance(Duration::from_secs(33)).await;
    w.take(&bridge, "ACK");
    w.take(&bridge, "BYE");
    w.take(VCS, "BYE");
}

/// A bridge's 200 to `binv` (To tag bt, Contact `<sip:b@addr>`, SDP `v=0`), for the tests that
/// only need the call answered.
fn bare_bridge_ok(binv: &[u8], bridge: &str) -> Vec<u8> {
    let contact = format!("<sip:b@{bridge}>");
    reply(binv, 200, Some("bt"), Some(&contact), b"v=0\r\n")
}

async fn connected_call_without_ack(w: &mut World, n: u32) -> (String, Vec<u8>) {
    let (_, bridge, binv) = w.invite_to_bridge(n).await;
    w.recv_udp(&bridge, &bare_bridge_ok(&binv, &bridge)).await;
    w.take(VCS, "200");
    (bridge, binv)
}

#[tokio::test]
async fn out_of_dialog_requests() {
    let mut w = World::new(100_000);
    // Requests from the VCS to our bare address, in no dialog we know.
    let request = |method: &str, to: &str, call_id: &str, branch: &str| {
        let from = "<sip:vcs@x>;tag=o1";
        in_dialog(
            method,
            "sip:10.96.1.1",
            "10.96.3.1:5060",
            from,
            to,
            call_id,
            1,
            branch,
            b"",
        )
    };
    let opts = request("OPTIONS", "<sip:cm@y>", "opt-1", "z9hG4bKo1");
    w.recv_udp(VCS, &opts).await;
    assert!(
        msg(&w.take(VCS, "200"))
            .headers()
            .iter()
            .any(|h| h.name == "Allow")
    );
    let bye = request("BYE", "<sip:cm@y>;tag=zz", "nope", "z9hG4bKo2");
    w.recv_udp(VCS, &bye).await;
    w.take(VCS, "481");
    let reg = request("REGISTER", "<sip:cm@y>", "reg", "z9hG4bKo3");
    w.recv_udp(VCS, &reg).await;
    w.take(VCS, "405");
    w.recv_udp(VCS, b"INVITE sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP 10.96.3.1;branch=z9hG4bKq\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: q\r\nCSeq: 1 INVITE\r\nContent-Length: 99\r\n\r\n").await;
    w.take(VCS, "400");
    assert_eq!(w.core.stats().parse_errors, 1);
}

/// Acceptance 2 in miniature: two peers with different health views race on the first calls of
/// the same new conference; the directory's first-writer-wins claim keeps them on one bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_peers_agree_on_one_bridge() {
    let cfg = Arc::new(routing_config(1_000_000));
    for trial in 0..100u32 {
        let dir = MemoryDirectory::default();
        let mk = |down: Option<&str>| {
            let health = Arc::new(HealthTable::default());
            if let Some(b) = down {
                health.set(b, false);
            }
            Arc::new(Router {
                directory: dir.clone(),
                ledger: MemoryLedger::default(),
                health,
            })
        };
        // Peer 1 believes b1 is down, peer 2 believes b2 is down: each alone would pick differently.
        let (p1, p2) = (mk(Some("b1")), mk(Some("b2")));
        let req = confmesh::b2bua::routing::RouteRequest {
            called: format!("meet.{trial}@example.com"),
            failed_bridges: vec![],
            previous: None,
        };
        let (c1, c2, r1, r2) = (cfg.clone(), cfg.clone(), req.clone(), req);
        let t1 = tokio::spawn(async move { p1.route(&c1, &r1).await });
        let t2 = tokio::spawn(async move { p2.route(&c2, &r2).await });
        let (d1, d2) = (t1.await.unwrap(), t2.await.unwrap());
        let bridge = |d: &confmesh::b2bua::routing::RouteDecision| match d {
            confmesh::b2bua::routing::RouteDecision::Forward { route, .. } => {
                Some(route.bridge.clone())
            }
            confmesh::b2bua::routing::RouteDecision::Reject { .. } => None,
        };
        let (b1, b2) = (bridge(&d1), bridge(&d2));
        // The loser of the race either joins the winner's bridge or (if it thinks that bridge is
        // down) refuses; it never places the conference elsewhere.
        assert!(b1.is_some() || b2.is_some(), "trial {trial}: both refused");
        if let (Some(x), Some(y)) = (&b1, &b2) {
            assert_eq!(x, y, "trial {trial}");
        }
        let placed = dir.snapshot();
        assert_eq!(placed.len(), 1, "trial {trial}");
        let p = placed.values().next().unwrap();
        assert_eq!(Some(&p.bridge), b1.as_ref().or(b2.as_ref()));
        assert_eq!(
            p.participants as usize,
            [&b1, &b2].iter().filter(|b| b.is_some()).count()
        );
    }
}

/// Random sequences of datagrams (valid messages of every kind, mutated ones, garbage) from the
/// VCS and both bridges, with the clock moving: never a panic, and every call is eventually gone.
#[tokio::test]
async fn random_message_sequences() {
    let seed: u64 = std::env::var("SIP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe);
    eprintln!("random_message_sequences seed={seed} (set SIP_FUZZ_SEED to replay)");
    let mut rng = fastrand_like(seed);
    let mut w = World::new(20_000);
    let mut history: Vec<(String, Vec<u8>)> = Vec::new();
    for step in 0..3000u32 {
        let choice = rng() % 11;
        let (from, data) = match choice {
            0 | 1 => (
                VCS.to_owned(),
                invite(rng() as u32 % 20, &format!("meet.{}", rng() % 3)),
            ),
            2..=5 if !w.out.is_empty() => {
                // Answer something we sent, as its receiver would, with a random status.
                // Mostly the latest messages, as a peer answers what it just got.
                let back = 1 + (rng() as usize) % w.out.len().min(4);
                let t = w.out.remove(w.out.len() - back);
                let codes = [100, 180, 200, 200, 486, 503, 487];
                let code = codes[(rng() as usize) % codes.len()];
                match parse(&t.data, Framing::Datagram) {
                    Ok(m) if m.method().is_some() && label(&t.data) != "ACK" => {
                        let r = reply(
                            &t.data,
                            code,
                            Some("rt"),
                            Some(&format!("<sip:x@{}>", t.dest)),
                            b"v=0\r\n",
                        );
                        (t.dest.to_string(), r)
                    }
                    _ => continue,
                }
            }
            6 if !history.is_empty() => history[(rng() as usize) % history.len()].clone(),
            7 if !history.is_empty() => {
                let (f, mut d) = history[(rng() as usize) % history.len()].clone();
                let n = d.len();
                for _ in 0..3 {
                    let pos = (rng() as usize) % n.max(1);
                    if pos < d.len() {
                        d[pos] = rng() as u8;
                    }
                }
                (f, d)
            }
            8 => {
                w.advance(Duration::from_millis(50 + rng() % 3000)).await;
                continue;
            }
            _ => (
                VCS.to_owned(),
                (0..rng() % 200).map(|_| rng() as u8).collect(),
            ),
        };
        let transport = if rng() % 4 == 0 {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        w.recv(&from, transport, &data).await;
        if history.len() < 200 {
            history.push((from, data));
        }
        assert!(
            w.core.stats().calls_active <= 20 + step as usize,
            "seed {seed}"
        );
        w.out.truncate(200);
    }
    // Without further input every call ends within timer bounds (B, H, F and the TU guard).
    w.advance(Duration::from_secs(400)).await;
    let st = w.core.stats();
    eprintln!("after the sequence: {st:?}");
    assert!(
        st.calls_total > 100
            && st.calls_answered >= 5
            && st.bridge_failovers > 0
            && st.parse_errors > 10,
        "seed {seed}: sequence too tame: {st:?}"
    );
    assert_eq!(
        st.transactions, 0,
        "seed {seed}: transactions leaked: {st:?}"
    );
    // Only connected calls remain (they last until a BYE, as they should).
    let calls = w.core.calls();
    assert!(
        calls.iter().all(|c| c.state == "connected"),
        "seed {seed}: {calls:?}"
    );
    // What the calls held is given back: bandwidth and participant counts match the live calls.
    assert_eq!(
        w.router.ledger.usage_kbps("hq"),
        1000 * calls.len() as u64,
        "seed {seed}: bandwidth leaked"
    );
    let participants: u32 = w
        .router
        .directory
        .snapshot()
        .values()
        .map(|p| p.participants)
        .sum();
    assert_eq!(
        participants as usize,
        calls.len(),
        "seed {seed}: participants leaked"
    );
}

/// A small deterministic generator (xorshift64*), so the test needs no extra crate.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.max(1);
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Delivers everything `from` has for `to` over a lossless link; the datagrams delivered.
fn ship(
    from: &Mutex<Bandwidth>,
    from_addr: Ipv4Addr,
    to: &Mutex<Bandwidth>,
    now: Instant,
) -> usize {
    let mut buf = [0u8; 1500];
    let mut n = 0;
    while let Some(t) = from.lock().unwrap().poll_transmit(&mut buf) {
        to.lock()
            .unwrap()
            .handle_datagram(now, from_addr, &buf[..t.len])
            .unwrap();
        n += 1;
        assert!(n < 100, "bandwidth core never ran dry");
    }
    n
}

/// Acceptance 5 at the SIP level: two peers, each admitting with its own bandwidth core, the cores
/// exchanging UDP 1719 datagrams. With calls spread over both peers at the limit, the next call is
/// refused on either peer with a Warning naming the location; a call ends on one peer and the
/// other admits again.
#[tokio::test]
async fn location_limit_holds_across_two_peers_with_bandwidth_updates() {
    let (m1, m2) = (Ipv4Addr::new(10, 96, 0, 1), Ipv4Addr::new(10, 96, 0, 2));
    let t0 = Instant::now();
    let core = |me: Ipv4Addr, peer: Ipv4Addr, epoch: u64| {
        let mut c = Bandwidth::new(BandwidthConfig::new(me, epoch), t0);
        c.set_peers(&[me, peer]).unwrap();
        c.set_peer_key(peer, zeroize::Zeroizing::new([4; 32]))
            .unwrap();
        Arc::new(Mutex::new(c))
    };
    let (c1, c2) = (core(m1, m2, 1), core(m2, m1, 2));
    let exchange = || {
        ship(&c1, m1, &c2, t0);
        ship(&c2, m2, &c1, t0);
    };
    exchange();
    let noop: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
    let dir = MemoryDirectory::default();
    // 1000 kbps per call, 2500 kbps in the location: two calls cluster-wide.
    let mut p1 = World::with(
        2500,
        dir.clone(),
        BandwidthLedgerHandle::new(c1.clone(), noop.clone()),
    );
    let mut p2 = World::with(
        2500,
        dir.clone(),
        BandwidthLedgerHandle::new(c2.clone(), noop),
    );

    let (bridge, _, _, b200) = connected_call(&mut p1, 31).await;
    exchange();
    connected_call(&mut p2, 32).await;
    exchange();
    assert_eq!(
        (
            p1.router.ledger.usage_kbps("hq"),
            p2.router.ledger.usage_kbps("hq")
        ),
        (2000, 2000)
    );
    for (p, n) in [(&mut p1, 33), (&mut p2, 34)] {
        let warning = p.refused_warning(n).await;
        assert!(
            warning.contains("location hq") && warning.contains("2000 of 2500"),
            "{warning}"
        );
    }

    // The bridge hangs up the call on peer 1; peer 2 hears of it and admits a new call.
    let abye = p1.bye_from_bridge(&bridge, &b200, "z9hG4bKbye31").await;
    p1.answer_ok(VCS, &abye).await;
    assert_eq!(p2.router.ledger.usage_kbps("hq"), 2000, "not yet heard");
    assert!(ship(&c1, m1, &c2, t0) >= 1, "the release is sent at once");
    assert_eq!(p2.router.ledger.usage_kbps("hq"), 1000);
    connected_call(&mut p2, 35).await;
    exchange();
    let s = c1.lock().unwrap().status(t0);
    assert_eq!(
        (
            s.locations["hq"].local_kbps,
            s.locations["hq"].cluster_kbps,
            s.locations["hq"].cluster_calls
        ),
        (0, 2000, 2)
    );
    assert_eq!(
        s.bridges.values().map(|b| b.cluster_kbps).sum::<u64>(),
        2000,
        "per-bridge usage: {:?}",
        s.bridges
    );
}

/// Issue 6 bench finding: under overload every retransmission of a caller's BYE can be dropped
/// before it reaches the core (full socket buffers), and nothing else ever ends an answered call:
/// 142 calls stayed "connected" forever after a 3000 calls/s run. The maximum call duration
/// bounds every call: both legs get a BYE and the call's resources go back.
#[tokio::test]
async fn established_call_with_a_lost_bye_ends_at_the_maximum_duration() {
    let mut w = World::new(100_000);
    assert!(
        !w.core.set_max_call_duration(Duration::ZERO),
        "zero refused"
    );
    assert!(w.core.set_max_call_duration(Duration::from_secs(120)));
    let (bridge, ..) = connected_call(&mut w, 20).await;
    w.out.clear();
    // The caller's BYE never arrives. Nothing happens before the limit…
    w.advance(Duration::from_secs(110)).await;
    assert!(
        w.nothing_to(VCS, "BYE")
            && w.nothing_to("10.96.4.9:5060", "BYE")
            && w.nothing_to(&bridge, "BYE")
    );
    assert_eq!(w.core.stats().calls_active, 1);
    // …and at it, both legs hear a BYE.
    w.advance(Duration::from_secs(11)).await;
    let abye = w.take(VCS, "BYE");
    assert_eq!(msg(&abye).call_id(), Some("vcs-call-20"));
    let bbye = w.take(&bridge, "BYE");
    assert_ne!(msg(&bbye).call_id(), Some("vcs-call-20"));
    assert_eq!(w.core.stats().calls_expired, 1);
    assert!(
        w.router.directory.snapshot().is_empty(),
        "participant released at the limit"
    );
    w.answer_ok(VCS, &abye).await;
    w.answer_ok(&bridge, &bbye).await;
    let st = w.core.stats();
    assert_eq!((st.calls_active, st.transactions > 0), (0, true), "{st:?}");
    // Every transaction lingers out: nothing of the call is left.
    w.advance(Duration::from_secs(40)).await;
    assert_eq!(w.core.stats().transactions, 0);
}

/// A call still ringing at the maximum duration: the caller gets 408, the bridge a CANCEL; a
/// bridge that ignores the CANCEL does not keep the call (forgotten 64*T1 later, before timer C).
#[tokio::test]
async fn ringing_call_ends_at_the_maximum_duration_even_if_the_bridge_ignores_cancel() {
    let mut w = World::new(100_000);
    w.core.set_max_call_duration(Duration::from_secs(60));
    let (_, bridge, binv) = w.invite_to_bridge(21).await;
    w.recv_udp(&bridge, &reply(&binv, 180, Some("bt"), None, b""))
        .await;
    w.take(VCS, "180");
    w.advance(Duration::from_secs(61)).await;
    let a408 = w.take(VCS, "408");
    assert!(has_warning(&a408, "maximum call duration"));
    w.take(&bridge, "CANCEL");
    assert_eq!(w.core.stats().calls_active, 1, "waits for the bridge's 487");
    w.advance(Duration::from_secs(33)).await;
    assert_eq!(w.core.stats().calls_active, 0);
    assert!(w.router.directory.snapshot().is_empty());
}

/// RFC 3261 §13.3.1.4 for a re-INVITE too: a 2xx we relayed and the re-INVITE's sender never
/// acknowledged ends the call with BYE on both legs (after the ACK we owe the other leg).
#[tokio::test]
async fn unacknowledged_reinvite_answer_hangs_up_both_legs() {
    let mut w = World::new(100_000);
    let (bridge, _binv, a200, _b200) = connected_call(&mut w, 22).await;
    let reinv = Leg::caller(22, &a200).request("INVITE", 2, "z9hG4bKre22", b"v=0\r\n");
    w.recv_udp(VCS, &reinv).await;
    let breinv = w.take(&bridge, "INVITE");
    w.recv_udp(
        &bridge,
        &bridge_ok(&breinv, &bridge, None, b"v=0\r\nanswer\r\n"),
    )
    .await;
    w.take(VCS, "200");
    w.out.retain(|t| label(&t.data) != "200");
    // No ACK from the VCS: 64*T1 later the bridge gets its ACK and both legs a BYE.
    w.advance(Duration::from_secs(33)).await;
    assert_eq!(msg(&w.take(&bridge, "ACK")).cseq(), Some((2, "ACK")));
    let bbye = w.take(&bridge, "BYE");
    let abye = w.take(VCS, "BYE");
    assert_eq!(w.core.stats().calls_unacknowledged, 1);
    w.answer_ok(VCS, &abye).await;
    w.answer_ok(&bridge, &bbye).await;
    assert_eq!(w.core.stats().calls_active, 0);
}

/// A core probing one bridge every second; returns it with the first probe's Transmit.
fn probing_core(failures: u32) -> (B2bua, Instant, Transmit) {
    let cfg = CoreConfig {
        hostname: "cm1".into(),
        options_interval: Duration::from_secs(1),
        options_failures: failures,
        seed: 9,
        ..CoreConfig::default()
    };
    let mut core = B2bua::new(cfg);
    let now = Instant::now();
    let probe = BridgeProbe {
        name: "b1".into(),
        uri: "sip:10.96.4.1:5060".into(),
        dest: a("10.96.4.1:5060"),
        transport: Transport::Udp,
    };
    core.set_bridges(now, a(ME), vec![probe]);
    core.handle_timeout(now);
    let t = core.poll_transmit().expect("first probe");
    (core, now, t)
}

/// The probed bridge answers `probe` with `code`.
fn answer_probe(core: &mut B2bua, now: Instant, probe: &Transmit, code: u16) {
    core.handle_datagram(
        now,
        a("10.96.4.1:5060"),
        a(ME),
        Transport::Udp,
        &reply(&probe.data, code, Some("o"), None, b""),
    );
}

/// Bridge health events the core emitted since the last call.
fn health_events(core: &mut B2bua) -> Vec<bool> {
    let mut out = Vec::new();
    while let Some(ev) = core.poll_event() {
        if let B2buaEvent::BridgeHealth { up, .. } = ev {
            out.push(up);
        }
    }
    out
}

/// Issue 6 bench finding: under overload our own inbound queue drops OPTIONS replies, and one
/// lost reply marked a working bridge down. Health is hysteretic now: down after N consecutive
/// unanswered probes (3 by default), up at the first answer, and any answer counts, 503 included.
#[test]
fn bridge_health_is_hysteretic() {
    let (mut core, mut now, p1) = probing_core(3);
    let mut seen = std::collections::HashSet::new();
    seen.insert(msg(&p1.data).call_id().unwrap().to_owned());
    // One interval later: the probe sent then (retransmissions of older ones are skipped).
    let mut step = |core: &mut B2bua, now: &mut Instant| -> Transmit {
        *now += Duration::from_secs(1);
        core.handle_timeout(*now);
        let mut probe = None;
        while let Some(t) = core.poll_transmit() {
            let cid = msg(&t.data).call_id().unwrap().to_owned();
            if label(&t.data) == "OPTIONS" && seen.insert(cid) {
                probe = Some(t);
            }
        }
        probe.expect("a new probe every interval")
    };
    answer_probe(&mut core, now, &p1, 200);
    assert_eq!(health_events(&mut core), vec![true]);
    let p2 = step(&mut core, &mut now);
    let _p3 = step(&mut core, &mut now); // p2 unanswered: 1
    let _p4 = step(&mut core, &mut now); // p3 unanswered: 2
    assert_eq!(
        health_events(&mut core),
        Vec::<bool>::new(),
        "down after two consecutive misses"
    );
    // The late answer to a missed probe still proves the bridge alive: the count starts again.
    answer_probe(&mut core, now, &p2, 200);
    let _p5 = step(&mut core, &mut now); // p4 unanswered: 1
    let p6 = step(&mut core, &mut now); // p5 unanswered: 2
    assert_eq!(
        health_events(&mut core),
        Vec::<bool>::new(),
        "the late answer did not reset the count"
    );
    let _p7 = step(&mut core, &mut now); // p6 unanswered: 3
    assert_eq!(
        health_events(&mut core),
        vec![false],
        "down after three consecutive misses"
    );
    // A 503 is an answer: the bridge's SIP stack is alive (a call it refuses fails over anyway).
    answer_probe(&mut core, now, &p6, 503);
    assert_eq!(health_events(&mut core), vec![true]);
}

/// With `sip/options_failures` = 1 a single unanswered probe is enough, as before.
#[test]
fn one_allowed_failure_marks_down_at_the_first_miss() {
    let (mut core, mut now, first) = probing_core(1);
    answer_probe(&mut core, now, &first, 200);
    assert_eq!(health_events(&mut core), vec![true]);
    now += Duration::from_secs(1);
    core.handle_timeout(now);
    now += Duration::from_secs(1);
    core.handle_timeout(now);
    assert_eq!(health_events(&mut core), vec![false]);
}

/// Over TCP the VCS's connection may be gone when we answer or hang up: every response then
/// carries the Via sent-by port at the source address (RFC 3261 §18.2.2) and every in-dialog
/// request the remote target's address, where the transport opens a new connection.
#[tokio::test]
async fn tcp_messages_to_the_caller_carry_where_to_reconnect() {
    let mut w = World::new(100_000);
    let src = "10.96.3.1:40001"; // the ephemeral port of the VCS's connection
    let inv = String::from_utf8(invite(30, "meet.30"))
        .unwrap()
        .replace("SIP/2.0/UDP 10.96.3.1:5060", "SIP/2.0/TCP 10.96.3.1:5062")
        .replace(
            "<sip:caller@10.96.3.1:5060>",
            "<sip:caller@10.96.3.1:5070;transport=tcp>",
        )
        .replace("Record-Route: <sip:vcs-rr.example.com;lr>\r\n", "");
    w.recv(src, Transport::Tcp, inv.as_bytes()).await;
    let trying = w.peek("100");
    assert_eq!(
        (trying.dest, trying.fallback),
        (a(src), Some(a("10.96.3.1:5062")))
    );
    let bridge = bridge_of(&w.cfg, "meet-30", 0);
    let binv = w.take(&bridge, "INVITE");
    assert_eq!(
        w.out
            .iter()
            .find(|t| t.dest == a(&bridge))
            .map(|t| t.fallback),
        None,
        "UDP: no fallback"
    );
    let b200 = bridge_ok(&binv, &bridge, Some("bt"), b"v=0\r\n");
    w.recv_udp(&bridge, &b200).await;
    let a200 = w.peek("200").clone();
    assert_eq!(
        (a200.dest, a200.fallback),
        (a(src), Some(a("10.96.3.1:5062")))
    );
    // The VCS sends from its TCP Via port.
    let caller = Leg {
        via_host: "10.96.3.1:5062".into(),
        ..Leg::caller(30, &a200.data)
    };
    w.recv(
        src,
        Transport::Tcp,
        &caller.request("ACK", 1, "z9hG4bKack30", b""),
    )
    .await;
    let bye = Leg::bridge(&bridge, &b200).request("BYE", 11, "z9hG4bKbye30", b"");
    w.recv_udp(&bridge, &bye).await;
    let abye = w.peek("BYE");
    assert_eq!(
        (abye.dest, abye.transport, abye.fallback),
        (a(src), Transport::Tcp, Some(a("10.96.3.1:5070")))
    );
}
