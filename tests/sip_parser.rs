//! The SIP parser against hostile input: a table of malformed messages with the answer each
//! deserves, and property tests (random bytes, mutated valid messages, random stream splits) that
//! it never panics, never reads past the buffer, and answers only with well-formed responses.
//!
//! Then the kept corpus (`tests/sip_corpus/`, see its README): real messages captured from sipp,
//! each parsed as it is (requests yield what the B2BUA reads from them, and replayed into a B2BUA
//! core get the answers a VCS would), and mutated (bit flips, truncation, splices between files,
//! duplicated header fields, huge Content-Length): never a panic in the parser, the framer or the
//! core, no allocation that grows with a claimed Content-Length, and a 400 where one is owed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use confmesh::b2bua::core::{B2bua, B2buaEvent, CoreConfig};
use confmesh::sip::Transport;
use confmesh::sip::framing::{Frame, next_frame};
use confmesh::sip::parse::{
    Framing, Hdr, MAX_HEADERS, MAX_LINE, MAX_MESSAGE, Message, Method, NameAddr, ParseError,
    SipUri, StartLine, error_response, parse,
};
use proptest::prelude::*;

/// The system allocator, noting the largest single allocation each thread asks for while armed.
struct Largest;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping only touches
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    LARGEST.with(Cell::get)
}

const VALID: &str = "INVITE sip:meet.1000@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.96.3.1:5060;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: <sip:meet.1000@example.com>\r\n\
From: <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@10.96.3.1>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 10\r\n\r\nv=0\r\ns=-\r\n";

fn replace(from: &str, to: &str) -> Vec<u8> {
    assert!(VALID.contains(from), "{from}");
    VALID.replacen(from, to, 1).into_bytes()
}

/// The answer a request refused by the parser gets, if any: its status code.
fn answer(buf: &[u8], err: ParseError) -> Option<u16> {
    let mut out = Vec::new();
    if !error_response(buf, err, &mut out) {
        return None;
    }
    let resp = parse(&out, Framing::Datagram).expect("our own error response parses");
    assert!(
        out.len() <= buf.len().min(MAX_MESSAGE) + 256,
        "response larger than what it echoes"
    );
    resp.status()
}

#[test]
fn malformed_table() {
    let many_headers = {
        let extra: String = (0..MAX_HEADERS).map(|i| format!("X-H{i}: v\r\n")).collect();
        VALID
            .replacen(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\n{extra}"),
                1,
            )
            .into_bytes()
    };
    let long_line = replace(
        "Max-Forwards: 70",
        &format!("Subject: {}", "a".repeat(MAX_LINE)),
    );
    let huge = {
        let mut v = VALID.as_bytes().to_vec();
        v.resize(MAX_MESSAGE + 1, b'x');
        v
    };
    let cases: Vec<(&str, Vec<u8>, ParseError, Option<u16>)> = vec![
        ("body shorter than Content-Length", replace("Content-Length: 10", "Content-Length: 11"), ParseError::BodyTruncated, Some(400)),
        ("Content-Length not a number", replace("Content-Length: 10", "Content-Length: ten"), ParseError::BadContentLength, Some(400)),
        ("Content-Length overflow", replace("Content-Length: 10", "Content-Length: 99999999999999999999"), ParseError::BadContentLength, Some(400)),
        ("negative Content-Length", replace("Content-Length: 10", "Content-Length: -1"), ParseError::BadContentLength, Some(400)),
        ("two different Content-Lengths", replace("Content-Length: 10", "Content-Length: 10\r\nl: 3"), ParseError::BadContentLength, Some(400)),
        ("no Via", replace("Via: SIP/2.0/UDP 10.96.3.1:5060;branch=z9hG4bK776asdhds\r\n", ""), ParseError::MissingHeader("Via"), None),
        ("bad Via", replace("SIP/2.0/UDP 10.96.3.1:5060", "SIP/3.0/UDP 10.96.3.1:5060"), ParseError::BadVia, None),
        ("Via port out of range", replace("10.96.3.1:5060;", "10.96.3.1:65536;"), ParseError::BadVia, None),
        ("no Call-ID", replace("Call-ID: a84b4c76e66710\r\n", ""), ParseError::MissingHeader("Call-ID"), None),
        ("no From", replace("From: <sip:alice@example.com>;tag=1928301774\r\n", ""), ParseError::MissingHeader("From"), None),
        ("unterminated From", replace("From: <sip:alice@example.com>", "From: <sip:alice@example.com"), ParseError::BadHeader, None),
        ("unbalanced quote", replace("From: <sip:alice", "From: \"Al <sip:alice"), ParseError::BadHeader, None),
        ("CSeq method mismatch", replace("CSeq: 314159 INVITE", "CSeq: 314159 BYE"), ParseError::BadCSeq, Some(400)),
        ("CSeq overflow", replace("CSeq: 314159 INVITE", "CSeq: 99999999999 INVITE"), ParseError::BadCSeq, None),
        ("CSeq without method", replace("CSeq: 314159 INVITE", "CSeq: 314159"), ParseError::BadCSeq, None),
        ("no CSeq", replace("CSeq: 314159 INVITE\r\n", ""), ParseError::MissingHeader("CSeq"), None),
        ("SIP/3.0", replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia"), ParseError::BadVersion, Some(505)),
        ("tel: Request-URI", replace("INVITE sip:meet.1000@example.com", "INVITE tel:+15551234"), ParseError::BadUri, Some(416)),
        ("extra word in request line", replace("INVITE sip:meet", "INVITE  sip:meet"), ParseError::BadStartLine, Some(400)),
        ("control character in header", replace("Max-Forwards: 70", "Max-Forwards: 7\u{1}0"), ParseError::BadHeader, Some(400)),
        ("header without colon", replace("Max-Forwards: 70", "Max-Forwards 70"), ParseError::BadHeader, Some(400)),
        ("space in header name", replace("Max-Forwards: 70", "Max Forwards: 70"), ParseError::BadHeader, Some(400)),
        ("too many headers", many_headers, ParseError::TooManyHeaders, Some(400)),
        ("line too long", long_line, ParseError::LineTooLong, Some(400)),
        ("message too large", huge, ParseError::TooLarge, Some(513)),
        ("no blank line", VALID.split("\r\n\r\n").next().unwrap().as_bytes().to_vec(), ParseError::Incomplete, Some(400)),
        ("not UTF-8", replace("Max-Forwards: 70", "Subject: \u{0}").into_iter().map(|b| if b == 0 { 0xff } else { b }).collect(), ParseError::NotUtf8, None),
        ("ACK is never answered", replace("INVITE sip:meet.1000@example.com SIP/2.0", "ACK sip:meet.1000@example.com SIP/2.0"), ParseError::BadCSeq, None),
        ("response with bad code", b"SIP/2.0 99 Odd\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n".to_vec(), ParseError::BadStartLine, None),
        ("empty", Vec::new(), ParseError::Incomplete, None),
        ("only CRLFs", b"\r\n\r\n\r\n".to_vec(), ParseError::BadStartLine, None),
    ];
    for (what, msg, want, status) in cases {
        let got = parse(&msg, Framing::Datagram).err();
        assert_eq!(got, Some(want), "{what}");
        assert_eq!(answer(&msg, want), status, "{what}: answer");
    }
}

#[test]
fn stream_framing_requires_content_length() {
    let no_len = VALID.replacen("Content-Length: 10\r\n", "", 1);
    assert_eq!(
        next_frame(no_len.as_bytes()),
        Err(ParseError::BadContentLength)
    );
    let m = VALID.as_bytes();
    assert_eq!(next_frame(m), Ok(Frame::Message(m.len())));
    assert!(parse(m, Framing::Stream).is_ok());
    // Bytes beyond Content-Length in a datagram are discarded, not a second message.
    let mut extra = m.to_vec();
    extra.extend_from_slice(b"garbage");
    assert_eq!(
        parse(&extra, Framing::Datagram).unwrap().body,
        b"v=0\r\ns=-\r\n"
    );
    assert!(parse(&extra, Framing::Stream).is_err());
}

#[test]
fn lookups_follow_compact_forms_and_lists() {
    let m = replace(
        "Max-Forwards: 70",
        "v: SIP/2.0/TCP second.example.com;branch=z9hG4bK2, SIP/2.0/UDP third;branch=z9hG4bK3",
    );
    let m = parse(&m, Framing::Datagram).unwrap();
    assert_eq!(m.header_values(Hdr::Via).count(), 3);
    assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK776asdhds"));
}

/// Mutations of a valid message that keep some structure, so the fuzzer reaches deep code.
/// Feeds `stream` to the framer in pieces ending at `cuts`, as a socket would deliver it; returns
/// the framed messages and the bytes left over.
fn frame_in_pieces(stream: &[u8], mut cuts: Vec<usize>) -> (Vec<Vec<u8>>, Vec<u8>) {
    cuts.sort_unstable();
    cuts.push(stream.len());
    let (mut buf, mut fed, mut got) = (Vec::new(), 0usize, Vec::new());
    for cut in cuts {
        buf.extend_from_slice(&stream[fed..cut.max(fed)]);
        fed = cut.max(fed);
        loop {
            match next_frame(&buf).unwrap() {
                Frame::Incomplete => break,
                Frame::KeepAlive { consumed, .. } => {
                    buf.drain(..consumed);
                }
                Frame::Message(n) => got.push(buf.drain(..n).collect()),
            }
        }
    }
    (got, buf)
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let base = VALID.as_bytes().to_vec();
    let len = base.len();
    prop::collection::vec((0..len, any::<u8>(), 0u8..4), 1..8).prop_map(move |edits| {
        let mut m = base.clone();
        for (pos, byte, kind) in edits {
            let pos = pos.min(m.len());
            match kind {
                0 => {
                    if pos < m.len() {
                        m[pos] = byte;
                    }
                }
                1 => m.insert(pos, byte),
                2 => m.truncate(pos),
                _ => {
                    let tokens: [&[u8]; 8] =
                        [b"\r\n", b":", b";", b",", b"<", b">", b"\"", b" \r\n "];
                    for (i, t) in tokens[byte as usize % 8].iter().enumerate() {
                        m.insert((pos + i).min(m.len()), *t);
                    }
                }
            }
        }
        m
    })
}

fn check_any(buf: &[u8]) {
    for framing in [Framing::Datagram, Framing::Stream] {
        match parse(buf, framing) {
            Ok(m) => {
                assert!(m.headers().len() <= MAX_HEADERS);
                assert!(m.body.len() <= buf.len());
                // Everything the rest of the stack relies on is there.
                assert!(m.top_via().is_some() && m.cseq().is_some() && m.call_id().is_some());
            }
            Err(e) => {
                let _ = answer(buf, e);
            }
        }
    }
    let _ = next_frame(buf);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..600)) {
        check_any(&buf);
    }

    #[test]
    fn mutated_messages_never_panic(buf in mutated()) {
        check_any(&buf);
    }

    #[test]
    fn any_split_of_a_stream_frames_the_same(cuts in prop::collection::vec(0usize..2000, 0..6)) {
        let stream: Vec<u8> = [VALID.as_bytes(), b"\r\n\r\n", VALID.as_bytes()].concat();
        let (messages, rest) = frame_in_pieces(&stream, cuts.into_iter().map(|c| c % stream.len()).collect());
        for m in &messages {
            prop_assert!(parse(m, Framing::Stream).is_ok());
        }
        prop_assert_eq!(messages.len(), 2);
        prop_assert!(rest.is_empty());
    }
}

// ---- The kept corpus. ----

/// Every file of `tests/sip_corpus/` (`.sip`: one message; `.stream`: TCP bytes), sorted by name.
fn corpus() -> &'static [(String, Vec<u8>)] {
    static CORPUS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sip_corpus");
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .expect("tests/sip_corpus")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sip" || x == "stream"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        assert!(files.len() >= 19, "corpus too small: {}", files.len());
        files
    })
}

fn corpus_file(name: &str) -> &'static [u8] {
    &corpus()
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} in the corpus"))
        .1
}

/// Cuts a stream into its messages as the TCP reader does (keep-alives skipped).
fn frames(stream: &[u8]) -> Vec<&[u8]> {
    let (mut rest, mut out) = (stream, Vec::new());
    while !rest.is_empty() {
        match next_frame(rest).expect("a recorded stream frames") {
            Frame::Incomplete => panic!("recorded stream ends inside a message"),
            Frame::KeepAlive { consumed, .. } => rest = &rest[consumed..],
            Frame::Message(n) => {
                out.push(&rest[..n]);
                rest = &rest[n..];
            }
        }
    }
    out
}

/// What the B2BUA reads from a request (`b2bua::core`): method, the called alias as it routes on
/// it (`user@host` of the Request-URI), transaction and dialog identifiers, where to send
/// in-dialog requests, and whether an offer came with it.
#[derive(Debug, PartialEq, Eq)]
struct Facing<'a> {
    method: Method,
    called: String,
    cseq: (u32, &'a str),
    branch: &'a str,
    vias: usize,
    via_transport: &'a str,
    from_tag: &'a str,
    to_tag: Option<&'a str>,
    contact: Option<&'a str>,
    max_forwards: Option<u32>,
    sdp_offer: bool,
}

fn facing<'a>(m: &Message<'a>) -> Facing<'a> {
    let StartLine::Request { method, uri, .. } = m.start else {
        panic!("not a request")
    };
    let ruri = SipUri::parse(uri).expect("Request-URI");
    let host = ruri.host.to_ascii_lowercase();
    let via = m.top_via().expect("top Via");
    Facing {
        method,
        called: ruri
            .user_plain()
            .map_or(host.clone(), |u| format!("{u}@{host}")),
        cseq: m.cseq().expect("CSeq"),
        branch: via.branch().expect("branch"),
        vias: m.header_values(Hdr::Via).count(),
        via_transport: via.transport,
        from_tag: m.from_tag().expect("From tag"),
        to_tag: m.to_tag(),
        contact: m
            .header_values(Hdr::Contact)
            .next()
            .and_then(NameAddr::parse)
            .map(|n| n.uri),
        max_forwards: m
            .header(Hdr::MaxForwards)
            .and_then(|v| v.trim().parse().ok()),
        sdp_offer: m.header(Hdr::ContentType) == Some("application/sdp")
            && m.body.starts_with(b"v=0\r\n"),
    }
}

#[test]
fn corpus_parses_as_recorded() {
    let mut requests = 0;
    for (name, data) in corpus() {
        let (messages, framing) = if name.ends_with(".stream") {
            (frames(data), Framing::Stream)
        } else {
            (vec![data.as_slice()], Framing::Datagram)
        };
        for m in messages {
            let msg = parse(m, framing).unwrap_or_else(|e| panic!("{name}: {e}"));
            // A datagram with Content-Length is also a well-framed stream message.
            assert_eq!(next_frame(m), Ok(Frame::Message(m.len())), "{name}");
            assert!(
                parse(m, Framing::Stream).is_ok(),
                "{name} as a stream message"
            );
            assert!(
                msg.call_id().is_some_and(|c| c.ends_with("@127.0.0.1")),
                "{name}"
            );
            if msg.method().is_some() {
                requests += 1;
                let f = facing(&msg);
                assert!(f.branch.starts_with("z9hG4bK"), "{name}: RFC 3261 branch");
            }
        }
    }
    assert_eq!(requests, 11);
}

#[test]
fn corpus_requests_yield_what_the_b2bua_expects() {
    let sipp_contact = |port: u16| format!("sip:sipp@127.0.0.1:{port}");
    let call = parse(corpus_file("call-01-invite-sdp.sip"), Framing::Datagram).unwrap();
    let f = facing(&call);
    assert_eq!(
        (f.method, f.called.as_str(), f.cseq, f.vias, f.via_transport),
        (Method::Invite, "service@127.0.0.1", (1, "INVITE"), 1, "UDP")
    );
    assert_eq!(
        (
            f.to_tag,
            f.contact.map(str::to_owned),
            f.max_forwards,
            f.sdp_offer
        ),
        (None, Some(sipp_contact(25060)), Some(70), true)
    );
    assert_eq!(call.body.len(), 129);
    let invite_branch = f.branch;

    // The folded copy of the same INVITE reads the same.
    let folded = parse(corpus_file("derived-folded-headers.sip"), Framing::Datagram).unwrap();
    assert_eq!(facing(&folded), f);
    assert_eq!(
        folded
            .header(Hdr::To)
            .and_then(NameAddr::parse)
            .map(|n| n.uri),
        Some("sip:service@127.0.0.1:25070")
    );

    let ack = parse(corpus_file("call-04-ack.sip"), Framing::Datagram).unwrap();
    let a = facing(&ack);
    assert_eq!(
        (a.method, a.cseq, a.sdp_offer),
        (Method::Ack, (1, "ACK"), false)
    );
    assert!(
        a.to_tag.is_some() && a.branch != invite_branch,
        "the ACK of a 2xx is a new transaction"
    );
    let bye = parse(corpus_file("call-05-bye.sip"), Framing::Datagram).unwrap();
    let b = facing(&bye);
    assert_eq!(
        (b.method, b.cseq, b.to_tag, b.from_tag),
        (Method::Bye, (2, "BYE"), a.to_tag, f.from_tag)
    );

    let options = parse(
        corpus_file("flow-01-options-three-vias.sip"),
        Framing::Datagram,
    )
    .unwrap();
    let o = facing(&options);
    assert_eq!(
        (o.method, o.called.as_str(), o.cseq, o.vias, o.max_forwards),
        (
            Method::Options,
            "meet.1000@127.0.0.1",
            (101, "OPTIONS"),
            3,
            Some(68)
        )
    );
    let vias: Vec<_> = options.header_values(Hdr::Via).collect();
    assert!(
        vias[2].starts_with("SIP/2.0/TCP vcs-c.example.com:5060"),
        "{vias:?}"
    );

    let register = parse(corpus_file("flow-03-register.sip"), Framing::Datagram).unwrap();
    let r = facing(&register);
    assert_eq!(
        (r.method, r.called.as_str(), r.cseq),
        (Method::Other, "127.0.0.1", (102, "REGISTER"))
    );
    assert_eq!(
        r.contact,
        Some("sip:endpoint.42@127.0.0.1:25064;transport=udp")
    );

    let compact = parse(
        corpus_file("flow-05-invite-compact-sdp.sip"),
        Framing::Datagram,
    )
    .unwrap();
    let c = facing(&compact);
    assert_eq!(
        (c.method, c.called.as_str(), c.cseq, c.vias, c.sdp_offer),
        (
            Method::Invite,
            "meet.2000@127.0.0.1",
            (103, "INVITE"),
            1,
            true
        )
    );
    assert_eq!(
        (c.contact, c.to_tag),
        (Some("sip:bob@127.0.0.1:25064"), None)
    );
    assert_eq!(compact.body.len(), 242);
    let cancel = parse(corpus_file("flow-08-cancel.sip"), Framing::Datagram).unwrap();
    let x = facing(&cancel);
    assert_eq!(
        (x.method, x.cseq.0, x.branch),
        (Method::Cancel, 103, c.branch),
        "CANCEL matches its INVITE (§9.1)"
    );
    let ack487 = parse(corpus_file("flow-11-ack-487.sip"), Framing::Datagram).unwrap();
    let k = facing(&ack487);
    assert_eq!(
        (k.method, k.branch),
        (Method::Ack, c.branch),
        "the ACK of a non-2xx is in the INVITE transaction"
    );
    assert!(k.to_tag.is_some());

    // Every message of one recorded dialog carries its Call-ID and From tag; responses carry the
    // branch of their request.
    for prefix in ["call-", "flow-"] {
        let msgs: Vec<_> = corpus()
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, d)| (n, parse(d, Framing::Datagram).unwrap()))
            .collect();
        for (n, m) in &msgs {
            assert_eq!(
                (m.call_id(), m.from_tag()),
                (msgs[0].1.call_id(), msgs[0].1.from_tag()),
                "{n}"
            );
            if let Some(code) = m.status() {
                let (_, method) = m.cseq().unwrap();
                let req = msgs
                    .iter()
                    .find(|(_, q)| q.cseq() == m.cseq() && q.method().is_some())
                    .unwrap_or_else(|| panic!("{n}: request for {method}"));
                assert_eq!(
                    m.top_via().unwrap().branch(),
                    req.1.top_via().unwrap().branch(),
                    "{n}"
                );
                assert_eq!(m.to_tag().is_some(), code > 100, "{n}: To tag from 101 on");
            }
        }
    }

    let stream = corpus_file("tcp-invite-ack.stream");
    let parts = frames(stream);
    assert_eq!(parts.len(), 2);
    let (inv, ack) = (
        parse(parts[0], Framing::Stream).unwrap(),
        parse(parts[1], Framing::Stream).unwrap(),
    );
    assert_eq!(
        (
            facing(&inv).method,
            facing(&inv).via_transport,
            facing(&ack).method
        ),
        (Method::Invite, "TCP", Method::Ack)
    );
    assert_eq!(inv.call_id(), ack.call_id());
}

/// Feeds `data` to a B2BUA core from a VCS at 10.96.3.7 and returns the status codes it sent
/// back and the conferences it asked to route.
fn b2bua_answers(core: &mut B2bua, data: &[u8], transport: Transport) -> (Vec<u16>, Vec<String>) {
    let (src, local) = (
        "10.96.3.7:5060".parse().unwrap(),
        "10.96.1.1:5060".parse().unwrap(),
    );
    core.handle_datagram(Instant::now(), src, local, transport, data);
    let mut codes = Vec::new();
    while let Some(t) = core.poll_transmit() {
        assert_eq!(
            (t.dest, t.transport),
            (src, transport),
            "answers go back where the request came from"
        );
        codes.push(
            parse(&t.data, Framing::Datagram)
                .expect("the core sends what parses")
                .status()
                .expect("a response"),
        );
    }
    let mut routes = Vec::new();
    while let Some(e) = core.poll_event() {
        if let B2buaEvent::Route { request, .. } = e {
            routes.push(request.called);
        }
    }
    (codes, routes)
}

#[test]
fn corpus_requests_replayed_into_the_b2bua() {
    // The recorded flow, in order, into one core: OPTIONS answered, REGISTER refused, the INVITE
    // tried and routed on its Request-URI, its CANCEL answered with 200 and the INVITE with 487,
    // and the ACK for the 487 absorbed.
    let mut core = B2bua::new(CoreConfig::default());
    let flow = [
        ("flow-01-options-three-vias.sip", vec![200], vec![]),
        ("flow-03-register.sip", vec![405], vec![]),
        (
            "flow-05-invite-compact-sdp.sip",
            vec![100],
            vec!["meet.2000@127.0.0.1".to_owned()],
        ),
        ("flow-08-cancel.sip", vec![200, 487], vec![]),
        ("flow-11-ack-487.sip", vec![], vec![]),
    ];
    for (file, codes, routes) in flow {
        assert_eq!(
            b2bua_answers(&mut core, corpus_file(file), Transport::Udp),
            (codes, routes),
            "{file}"
        );
    }
    assert_eq!(core.stats().calls_cancelled, 1);

    // Each INVITE with SDP, plain, folded and over TCP, starts a call to `service`.
    for (file, transport) in [
        ("call-01-invite-sdp.sip", Transport::Udp),
        ("derived-folded-headers.sip", Transport::Udp),
        ("tcp-invite-ack.stream", Transport::Tcp),
    ] {
        let mut core = B2bua::new(CoreConfig::default());
        let invite = frames(corpus_file(file))[0];
        assert_eq!(
            b2bua_answers(&mut core, invite, transport),
            (vec![100], vec!["service@127.0.0.1".to_owned()]),
            "{file}"
        );
    }
    // In-dialog requests of a dialog the core does not know.
    let mut core = B2bua::new(CoreConfig::default());
    assert_eq!(
        b2bua_answers(&mut core, corpus_file("call-05-bye.sip"), Transport::Udp),
        (vec![481], vec![])
    );
    assert_eq!(
        b2bua_answers(&mut core, corpus_file("call-04-ack.sip"), Transport::Udp),
        (vec![], vec![])
    );
    assert_eq!(core.stats().parse_errors, 0);
}

/// The request's Content-Length line replaced by `value` (the first one, long or compact form).
fn with_content_length(msg: &[u8], value: &str) -> Vec<u8> {
    let text = std::str::from_utf8(msg).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let lines: Vec<String> = head
        .split("\r\n")
        .map(|l| match l.split_once(':') {
            Some((n, _)) if Hdr::ContentLength.matches(n.trim()) => format!("{n}: {value}"),
            _ => l.to_owned(),
        })
        .collect();
    format!("{}\r\n\r\n{body}", lines.join("\r\n")).into_bytes()
}

#[test]
fn corpus_requests_with_a_lying_content_length_get_400() {
    // The allocation probe sees allocations (else the bounds below prove nothing).
    assert!(largest_allocation(|| drop(std::hint::black_box(vec![0u8; 100_000]))) >= 100_000);
    for (name, data) in corpus().iter().filter(|(n, _)| n.ends_with(".sip")) {
        let msg = parse(data, Framing::Datagram).unwrap();
        let Some(method) = msg.method() else { continue };
        let due = |code| (method != Method::Ack).then_some(code);
        let body = msg.body.len();
        for (value, want) in [
            (format!("{}", body + 1), ParseError::BodyTruncated),
            ("65536".to_owned(), ParseError::BodyTruncated),
            ("999999999".to_owned(), ParseError::BodyTruncated),
            ("4294967296".to_owned(), ParseError::BadContentLength),
            (
                "18446744073709551616".to_owned(),
                ParseError::BadContentLength,
            ),
            ("-1".to_owned(), ParseError::BadContentLength),
        ] {
            let bad = with_content_length(data, &value);
            let mut got = None;
            let largest = largest_allocation(|| {
                let err = parse(&bad, Framing::Datagram).err();
                got = Some((err, err.and_then(|e| answer(&bad, e))));
                let _ = next_frame(&bad);
            });
            assert_eq!(
                got,
                Some((Some(want), due(400))),
                "{name} with Content-Length {value}"
            );
            assert!(
                largest <= 4 * 1024,
                "{name} with Content-Length {value}: a {largest}-byte allocation"
            );
            // On a stream, a length beyond the bound is refused before anything is buffered.
            if value.len() > 5 {
                assert!(
                    next_frame(&bad).is_err(),
                    "{name}: stream framing waits for {value} bytes"
                );
            }
        }
        // A body cut short by one byte is a truncated request.
        if body > 0 {
            let cut = &data[..data.len() - 1];
            let err = parse(cut, Framing::Datagram).unwrap_err();
            assert_eq!(
                (err, answer(cut, err)),
                (ParseError::BodyTruncated, due(400)),
                "{name} cut"
            );
        }
    }
}

/// One edit of a corpus message.
#[derive(Debug, Clone)]
enum Edit {
    /// Flip bit `bit` of byte `at`.
    Flip { at: usize, bit: u8 },
    /// Keep only the first `at` bytes.
    Truncate { at: usize },
    /// Insert `len` bytes of another corpus file, taken at `from`, at `at`.
    Splice {
        file: usize,
        from: usize,
        len: usize,
        at: usize,
    },
    /// Repeat header line number `line` right after itself, its value replaced by `value` if set.
    Duplicate {
        line: usize,
        value: Option<&'static str>,
    },
    /// Set every Content-Length to a huge or hostile value.
    Length(&'static str),
}

const HOSTILE_LENGTHS: [&str; 8] = [
    "65535",
    "65536",
    "999999999",
    "4294967296",
    "18446744073709551616",
    "1e9",
    "0x10",
    " 70000 ",
];
const DUP_VALUES: [Option<&str>; 4] = [
    None,
    Some("0"),
    Some("999999999"),
    Some("SIP/2.0/UDP evil.example.com;branch=z9hG4bKdup"),
];

fn edit() -> impl Strategy<Value = Edit> {
    let n = corpus().len();
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
        (0..n, any::<usize>(), 0usize..400, any::<usize>()).prop_map(|(file, from, len, at)| {
            Edit::Splice {
                file,
                from,
                len,
                at,
            }
        }),
        (0usize..16, prop::sample::select(DUP_VALUES.to_vec()))
            .prop_map(|(line, value)| Edit::Duplicate { line, value }),
        prop::sample::select(HOSTILE_LENGTHS.to_vec()).prop_map(Edit::Length),
    ]
}

fn apply(mut m: Vec<u8>, e: &Edit) -> Vec<u8> {
    match *e {
        Edit::Flip { at, bit } => {
            if !m.is_empty() {
                let i = at % m.len();
                m[i] ^= 1 << bit;
            }
        }
        Edit::Truncate { at } => m.truncate(at % (m.len() + 1)),
        Edit::Splice {
            file,
            from,
            len,
            at,
        } => {
            let src = &corpus()[file].1;
            let from = from % src.len();
            let piece = &src[from..(from + len).min(src.len())];
            let at = at % (m.len() + 1);
            m.splice(at..at, piece.iter().copied());
        }
        Edit::Duplicate { line, value } => {
            let head_end = m
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(m.len());
            let starts: Vec<usize> = std::iter::once(0)
                .chain(
                    (0..head_end)
                        .filter(|&i| m[i..].starts_with(b"\r\n"))
                        .map(|i| i + 2),
                )
                .collect();
            // Header lines only (not the start line), and the last one ends at the head's end.
            if starts.len() > 1 {
                let k = 1 + line % (starts.len() - 1);
                let end = starts.get(k + 1).map_or(head_end, |&s| s - 2);
                let original = m[starts[k]..end].to_vec();
                let copy = match (value, original.iter().position(|&b| b == b':')) {
                    (Some(v), Some(colon)) => [&original[..=colon], b" ", v.as_bytes()].concat(),
                    _ => original,
                };
                let at = end;
                m.splice(at..at, [b"\r\n".as_slice(), &copy].concat());
            }
        }
        Edit::Length(v) => {
            if std::str::from_utf8(&m).is_ok_and(|t| t.contains("\r\n\r\n")) {
                m = with_content_length(&m, v);
            }
        }
    }
    m
}

/// Everything a hostile message can reach, with the allocation bound: the parser both ways, the
/// answer owed, and the stream reader's loop as the TCP transport runs it.
fn check_mutant(buf: &[u8]) {
    let mut answers = Vec::new();
    let largest = largest_allocation(|| {
        check_any(buf);
        if let Err(e) = parse(buf, Framing::Datagram) {
            answers.push((e, answer(buf, e)));
        }
        // The TCP reader: read in 8 KiB pieces, frame, consume; the buffer never needs to hold
        // more than one message plus one read.
        let mut held: Vec<u8> = Vec::with_capacity(8192);
        for piece in buf.chunks(8192) {
            held.extend_from_slice(piece);
            loop {
                match next_frame(&held) {
                    Ok(Frame::Incomplete) | Err(_) => break,
                    Ok(Frame::KeepAlive { consumed, .. }) => drop(held.drain(..consumed)),
                    Ok(Frame::Message(n)) => drop(held.drain(..n)),
                }
            }
            assert!(held.len() <= MAX_MESSAGE + 8192);
        }
    });
    // The B2BUA core takes the mutant too (UDP and TCP) and answers only with what parses.
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut core = B2bua::new(CoreConfig::default());
        core.handle_datagram(
            Instant::now(),
            "10.96.3.7:5060".parse().unwrap(),
            "10.96.1.1:5060".parse().unwrap(),
            transport,
            buf,
        );
        while let Some(t) = core.poll_transmit() {
            assert!(
                parse(&t.data, Framing::Datagram).is_ok(),
                "the core sent what does not parse"
            );
        }
    }
    // Nothing grows with what the message claims: the input and small fixed buffers only.
    assert!(
        largest <= 2 * buf.len() + 16 * 1024,
        "a {largest}-byte allocation for a {}-byte message",
        buf.len()
    );
    for (e, code) in answers {
        if let Some(code) = code {
            assert_eq!(code, e.status().0, "{e}");
        }
        // A request refused for its length, with its addressing headers intact, is answered.
        let intact =
            buf.starts_with(b"INVITE ") || buf.starts_with(b"OPTIONS ") || buf.starts_with(b"BYE ");
        if intact
            && matches!(e, ParseError::BadContentLength | ParseError::BodyTruncated)
            && parse_head_ok(buf)
        {
            assert_eq!(
                code,
                Some(400),
                "{e}: no 400 for\n{}",
                String::from_utf8_lossy(buf)
            );
        }
    }
}

/// Whether the message parses once its body and every Content-Length are taken away: its
/// addressing headers are intact, so the sender can be answered.
fn parse_head_ok(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return false;
    };
    let kept: Vec<&str> = head
        .split("\r\n")
        .filter(|l| {
            !l.split_once(':')
                .is_some_and(|(n, _)| Hdr::ContentLength.matches(n.trim()))
        })
        .collect();
    let bare = format!("{}\r\n\r\n", kept.join("\r\n"));
    parse(bare.as_bytes(), Framing::Datagram).is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn corpus_mutants_never_panic_nor_allocate_what_they_claim(
        file in 0..corpus().len(),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        let m = edits.iter().fold(corpus()[file].1.clone(), apply);
        check_mutant(&m);
    }

    #[test]
    fn corpus_stream_frames_the_same_in_any_pieces(
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        keepalives in 0usize..3,
    ) {
        let stream = corpus_file("tcp-invite-ack.stream");
        let parts = frames(stream);
        // CRLF keep-alives between the two messages (RFC 5626 §3.5.1) change nothing.
        let stream: Vec<u8> = [parts[0], &b"\r\n\r\n".repeat(keepalives), parts[1]].concat();
        let (got, rest) = frame_in_pieces(&stream, cuts.into_iter().map(|c| c % (stream.len() + 1)).collect());
        prop_assert!(rest.is_empty());
        prop_assert_eq!(got, vec![parts[0].to_vec(), parts[1].to_vec()]);
    }
}
