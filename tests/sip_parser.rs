//! The SIP parser against hostile input: a table of malformed messages with the answer each
//! deserves, and property tests (random bytes, mutated valid messages, random stream splits) that
//! it never panics, never reads past the buffer, and answers only with well-formed responses.

use confmesh::sip::framing::{next_frame, Frame};
use confmesh::sip::parse::{error_response, parse, Framing, Hdr, ParseError, MAX_HEADERS, MAX_LINE, MAX_MESSAGE};
use proptest::prelude::*;

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
    assert!(out.len() <= buf.len().min(MAX_MESSAGE) + 256, "response larger than what it echoes");
    resp.status()
}

#[test]
fn malformed_table() {
    let many_headers = {
        let extra: String = (0..MAX_HEADERS).map(|i| format!("X-H{i}: v\r\n")).collect();
        VALID.replacen("Max-Forwards: 70\r\n", &format!("Max-Forwards: 70\r\n{extra}"), 1).into_bytes()
    };
    let long_line = replace("Max-Forwards: 70", &format!("Subject: {}", "a".repeat(MAX_LINE)));
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
    assert_eq!(next_frame(no_len.as_bytes()), Err(ParseError::BadContentLength));
    let m = VALID.as_bytes();
    assert_eq!(next_frame(m), Ok(Frame::Message(m.len())));
    assert!(parse(m, Framing::Stream).is_ok());
    // Bytes beyond Content-Length in a datagram are discarded, not a second message.
    let mut extra = m.to_vec();
    extra.extend_from_slice(b"garbage");
    assert_eq!(parse(&extra, Framing::Datagram).unwrap().body, b"v=0\r\ns=-\r\n");
    assert!(parse(&extra, Framing::Stream).is_err());
}

#[test]
fn lookups_follow_compact_forms_and_lists() {
    let m = replace("Max-Forwards: 70", "v: SIP/2.0/TCP second.example.com;branch=z9hG4bK2, SIP/2.0/UDP third;branch=z9hG4bK3");
    let m = parse(&m, Framing::Datagram).unwrap();
    assert_eq!(m.header_values(Hdr::Via).count(), 3);
    assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK776asdhds"));
}

/// Mutations of a valid message that keep some structure, so the fuzzer reaches deep code.
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
                    let tokens: [&[u8]; 8] = [b"\r\n", b":", b";", b",", b"<", b">", b"\"", b" \r\n "];
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
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % stream.len()).collect();
        cuts.sort_unstable();
        cuts.push(stream.len());
        // Feed the stream in pieces, as a socket would deliver it.
        let (mut buf, mut fed, mut messages) = (Vec::new(), 0usize, 0usize);
        for cut in cuts {
            buf.extend_from_slice(&stream[fed..cut.max(fed)]);
            fed = cut.max(fed);
            loop {
                match next_frame(&buf).unwrap() {
                    Frame::Incomplete => break,
                    Frame::KeepAlive { consumed, .. } => { buf.drain(..consumed); }
                    Frame::Message(n) => {
                        prop_assert!(parse(&buf[..n], Framing::Stream).is_ok());
                        buf.drain(..n);
                        messages += 1;
                    }
                }
            }
        }
        prop_assert_eq!(messages, 2);
        prop_assert!(buf.is_empty());
    }
}
