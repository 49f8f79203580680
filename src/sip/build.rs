//! Writing SIP messages into a caller-owned buffer. Content-Length is always written (it is
//! mandatory on streams and harmless on datagrams) and computed from the body, never trusted.
#![forbid(unsafe_code)]

use std::fmt::{self, Write as _};

/// Appends one message to `out`: start line, then headers, then [`MessageWriter::finish`].
/// Values are written as given; callers pass values taken from parsed messages or built locally,
/// never containing CR/LF outside a legal fold (the parser guarantees that for parsed values).
pub struct MessageWriter<'b> {
    out: &'b mut Vec<u8>,
}

/// Adapter so `write!` can format straight into the byte buffer without an intermediate String.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl<'b> MessageWriter<'b> {
    /// Starts a request `METHOD uri SIP/2.0`.
    pub fn request(out: &'b mut Vec<u8>, method: &str, uri: &str) -> Self {
        let _ = write!(Bytes(out), "{method} {uri} SIP/2.0\r\n");
        MessageWriter { out }
    }

    /// Starts a response `SIP/2.0 code reason`.
    pub fn response(out: &'b mut Vec<u8>, code: u16, reason: &str) -> Self {
        let _ = write!(Bytes(out), "SIP/2.0 {code} {reason}\r\n");
        MessageWriter { out }
    }

    /// Adds a header line.
    pub fn header(&mut self, name: &str, value: &str) -> &mut Self {
        let _ = write!(Bytes(self.out), "{name}: {value}\r\n");
        self
    }

    /// Adds a header line with a formatted value.
    pub fn header_fmt(&mut self, name: &str, value: fmt::Arguments<'_>) -> &mut Self {
        let _ = write!(Bytes(self.out), "{name}: {value}\r\n");
        self
    }

    /// Writes Content-Length and the body, ending the message.
    pub fn finish(self, body: &[u8]) {
        let _ = write!(Bytes(self.out), "Content-Length: {}\r\n\r\n", body.len());
        self.out.extend_from_slice(body);
    }
}

/// The standard reason phrase for the codes the B2BUA generates itself.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Unsupported URI Scheme",
        481 => "Call/Transaction Does Not Exist",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::{Framing, parse};

    #[test]
    fn round_trips_through_the_parser() {
        let mut out = Vec::new();
        let mut w = MessageWriter::request(&mut out, "OPTIONS", "sip:b1@10.96.4.1:5060");
        w.header("Via", "SIP/2.0/UDP 10.96.1.1:5060;branch=z9hG4bK1")
            .header("From", "<sip:confmesh@10.96.1.1>;tag=a")
            .header("To", "<sip:b1@10.96.4.1>")
            .header("Call-ID", "c1")
            .header_fmt("CSeq", format_args!("{} OPTIONS", 7));
        w.finish(b"xy");
        let m = parse(&out, Framing::Stream).unwrap();
        assert_eq!(m.cseq(), Some((7, "OPTIONS")));
        assert_eq!(m.body, b"xy");
    }
}
