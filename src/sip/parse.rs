//! Zero-copy SIP message parsing (RFC 3261 §7, §18.3, §20, §25).
//!
//! A [`Message`] borrows every field from the caller's buffer; parsing allocates nothing. Sizes a
//! remote controls are bounded: the whole message ([`MAX_MESSAGE`]), each line ([`MAX_LINE`]) and
//! the number of header fields ([`MAX_HEADERS`]). A malformed request still deserves an answer when
//! enough of it can be read to address one: [`error_response`] writes that 400 (or 505/513).
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use thiserror::Error;

/// Largest message accepted: the largest UDP payload; a TCP message may not be larger either.
pub const MAX_MESSAGE: usize = 65_535;
/// Longest start line or header line (folded continuations included), against memory-hungry peers.
pub const MAX_LINE: usize = 8_192;
/// Most header fields in one message; real SIP messages carry 10–30.
pub const MAX_HEADERS: usize = 64;

/// Why a message was refused; every variant is the sender's fault except none — local misuse cannot
/// reach the parser. [`ParseError::status`] maps it to the response owed to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    /// More than [`MAX_MESSAGE`] bytes.
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// No blank line ends the header section (or, on a stream, not all of it has arrived yet).
    #[error("header section not terminated by an empty line")]
    Incomplete,
    /// A line longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// The start line or header section is not UTF-8 text.
    #[error("header section is not UTF-8")]
    NotUtf8,
    /// Neither `METHOD URI SIP/2.0` nor `SIP/2.0 CODE REASON`.
    #[error("malformed start line")]
    BadStartLine,
    /// A protocol version other than SIP/2.0.
    #[error("unsupported SIP version")]
    BadVersion,
    /// A header line without a colon, with an invalid name, or a control character.
    #[error("malformed header line")]
    BadHeader,
    /// One of Via, From, To, Call-ID, CSeq is missing.
    #[error("missing mandatory header {0}")]
    MissingHeader(&'static str),
    /// Content-Length is not a number, appears twice with different values, or is too large.
    #[error("malformed Content-Length")]
    BadContentLength,
    /// The body is shorter than Content-Length says.
    #[error("body shorter than Content-Length")]
    BodyTruncated,
    /// CSeq is not `number METHOD`, or its method differs from the request line's.
    #[error("malformed CSeq")]
    BadCSeq,
    /// The top Via is not `SIP/2.0/TRANSPORT host[:port][;params]`.
    #[error("malformed Via")]
    BadVia,
    /// The Request-URI is not a SIP URI.
    #[error("malformed Request-URI")]
    BadUri,
}

impl ParseError {
    /// The status code and reason phrase owed to a request refused for this reason.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            ParseError::TooLarge => (513, "Message Too Large"),
            ParseError::BadVersion => (505, "Version Not Supported"),
            ParseError::BadUri => (416, "Unsupported URI Scheme"),
            _ => (400, "Bad Request"),
        }
    }
}

/// Request methods the B2BUA distinguishes; anything else is carried as [`Method::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Starts a call or changes its session (re-INVITE).
    Invite,
    /// Acknowledges a final response to INVITE.
    Ack,
    /// Ends a dialog.
    Bye,
    /// Cancels a pending INVITE.
    Cancel,
    /// Capability query; also the health probe toward bridges and from the VCS.
    Options,
    /// Any other method: relayed inside a dialog, refused outside one.
    Other,
}

impl Method {
    /// Classifies a method token (case-sensitive, RFC 3261 §7.1).
    pub fn from_token(t: &str) -> Method {
        match t {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// The first line: what the message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    /// `METHOD Request-URI SIP/2.0`.
    Request {
        /// The method, classified.
        method: Method,
        /// The method token as sent (needed for [`Method::Other`]).
        method_token: &'a str,
        /// The Request-URI.
        uri: &'a str,
    },
    /// `SIP/2.0 CODE Reason`.
    Response {
        /// 100–699.
        code: u16,
        /// The reason phrase (may be empty).
        reason: &'a str,
    },
}

/// One header field as sent: name as written (maybe compact) and the trimmed value, which may still
/// contain folded line breaks (treated as whitespace by the helpers here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header<'a> {
    /// The field name as written.
    pub name: &'a str,
    /// The value without surrounding whitespace.
    pub value: &'a str,
}

/// Header names the stack looks up; each knows its compact form (RFC 3261 §7.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hdr {
    /// `Via` / `v`.
    Via,
    /// `From` / `f`.
    From,
    /// `To` / `t`.
    To,
    /// `Call-ID` / `i`.
    CallId,
    /// `CSeq`.
    CSeq,
    /// `Contact` / `m`.
    Contact,
    /// `Content-Length` / `l`.
    ContentLength,
    /// `Content-Type` / `c`.
    ContentType,
    /// `Max-Forwards`.
    MaxForwards,
    /// `Record-Route`.
    RecordRoute,
    /// `Route`.
    Route,
}

impl Hdr {
    /// The full name, as written in messages we build.
    pub fn name(self) -> &'static str {
        match self {
            Hdr::Via => "Via",
            Hdr::From => "From",
            Hdr::To => "To",
            Hdr::CallId => "Call-ID",
            Hdr::CSeq => "CSeq",
            Hdr::Contact => "Contact",
            Hdr::ContentLength => "Content-Length",
            Hdr::ContentType => "Content-Type",
            Hdr::MaxForwards => "Max-Forwards",
            Hdr::RecordRoute => "Record-Route",
            Hdr::Route => "Route",
        }
    }

    fn compact(self) -> Option<&'static str> {
        match self {
            Hdr::Via => Some("v"),
            Hdr::From => Some("f"),
            Hdr::To => Some("t"),
            Hdr::CallId => Some("i"),
            Hdr::Contact => Some("m"),
            Hdr::ContentLength => Some("l"),
            Hdr::ContentType => Some("c"),
            _ => None,
        }
    }

    /// Whether a field name as written denotes this header (case-insensitive, compact forms too).
    pub fn matches(self, name: &str) -> bool {
        name.eq_ignore_ascii_case(self.name())
            || self.compact().is_some_and(|c| name.eq_ignore_ascii_case(c))
    }
}

/// How the message was delimited, which decides how Content-Length is read (§18.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A UDP datagram: Content-Length optional; bytes past the body are discarded.
    Datagram,
    /// A message cut from a TCP stream by [`super::framing`]: the body is exactly Content-Length.
    Stream,
}

/// A parsed message borrowing from the caller's buffer.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// Request or response line.
    pub start: StartLine<'a>,
    headers: [Header<'a>; MAX_HEADERS],
    count: usize,
    /// The body (exactly Content-Length bytes when the header is present).
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Every header field, in order.
    pub fn headers(&self) -> &[Header<'a>] {
        self.headers.get(..self.count).unwrap_or(&[])
    }

    /// The first value of header `h`.
    pub fn header(&self, h: Hdr) -> Option<&'a str> {
        self.headers()
            .iter()
            .find(|x| h.matches(x.name))
            .map(|x| x.value)
    }

    /// Every field line of header `h`, in order (each may hold a comma-separated list).
    pub fn header_lines(&self, h: Hdr) -> impl Iterator<Item = &'a str> + '_ {
        self.headers()
            .iter()
            .filter(move |x| h.matches(x.name))
            .map(|x| x.value)
    }

    /// Every element of the comma-separated header `h` across all its lines (Via, Route, …).
    pub fn header_values(&self, h: Hdr) -> impl Iterator<Item = &'a str> + '_ {
        self.header_lines(h).flat_map(split_list)
    }

    /// Whether this is a request with this method.
    pub fn is_request(&self, m: Method) -> bool {
        matches!(self.start, StartLine::Request { method, .. } if method == m)
    }

    /// The method of a request, `None` for a response.
    pub fn method(&self) -> Option<Method> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The status code of a response, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The top Via (validated by [`parse`]).
    pub fn top_via(&self) -> Option<Via<'a>> {
        self.header_values(Hdr::Via).next().and_then(Via::parse)
    }

    /// CSeq number and method token (validated by [`parse`]).
    pub fn cseq(&self) -> Option<(u32, &'a str)> {
        self.header(Hdr::CSeq).and_then(parse_cseq)
    }

    /// The Call-ID value.
    pub fn call_id(&self) -> Option<&'a str> {
        self.header(Hdr::CallId)
    }

    /// The `tag` parameter of From.
    pub fn from_tag(&self) -> Option<&'a str> {
        self.header(Hdr::From)
            .and_then(NameAddr::parse)
            .and_then(|n| param(n.params, "tag"))
    }

    /// The `tag` parameter of To.
    pub fn to_tag(&self) -> Option<&'a str> {
        self.header(Hdr::To)
            .and_then(NameAddr::parse)
            .and_then(|n| param(n.params, "tag"))
    }
}

/// Parses one message. `buf` is a whole datagram ([`Framing::Datagram`]) or exactly one message cut
/// from a stream ([`Framing::Stream`]). Checks the start line, header syntax and the presence and
/// syntax of Via, From, To, Call-ID and CSeq, so later layers may rely on them.
pub fn parse(buf: &[u8], framing: Framing) -> Result<Message<'_>, ParseError> {
    if buf.len() > MAX_MESSAGE {
        return Err(ParseError::TooLarge);
    }
    let head_end = find(buf, b"\r\n\r\n").ok_or(ParseError::Incomplete)?;
    let head = std::str::from_utf8(buf.get(..head_end).ok_or(ParseError::Incomplete)?)
        .map_err(|_| ParseError::NotUtf8)?;
    let rest = buf.get(head_end + 4..).unwrap_or(&[]);

    let mut lines = Lines { rest: head };
    let first = lines.next().ok_or(ParseError::BadStartLine)??;
    let start = parse_start_line(first)?;

    let mut headers = [Header::default(); MAX_HEADERS];
    let mut count = 0usize;
    for line in lines {
        let line = line?;
        let slot = headers.get_mut(count).ok_or(ParseError::TooManyHeaders)?;
        *slot = parse_header_line(line)?;
        count += 1;
    }
    let mut msg = Message {
        start,
        headers,
        count,
        body: &[],
    };

    let mut content_length: Option<usize> = None;
    for v in msg.header_lines(Hdr::ContentLength) {
        let n = parse_decimal(v, 9).ok_or(ParseError::BadContentLength)?;
        if content_length.is_some_and(|c| c != n) {
            return Err(ParseError::BadContentLength);
        }
        content_length = Some(n);
    }
    msg.body = match (content_length, framing) {
        (Some(n), _) => rest.get(..n).ok_or(ParseError::BodyTruncated)?,
        (None, Framing::Datagram) => rest,
        (None, Framing::Stream) => return Err(ParseError::BadContentLength),
    };
    if framing == Framing::Stream && msg.body.len() != rest.len() {
        return Err(ParseError::BadContentLength);
    }

    for (h, label) in [
        (Hdr::From, "From"),
        (Hdr::To, "To"),
        (Hdr::CallId, "Call-ID"),
    ] {
        let v = msg.header(h).ok_or(ParseError::MissingHeader(label))?;
        if v.is_empty() || (h != Hdr::CallId && NameAddr::parse(v).is_none()) {
            return Err(ParseError::BadHeader);
        }
    }
    let (_, cseq_method) = msg.cseq().ok_or(if msg.header(Hdr::CSeq).is_some() {
        ParseError::BadCSeq
    } else {
        ParseError::MissingHeader("CSeq")
    })?;
    if msg.header(Hdr::Via).is_none() {
        return Err(ParseError::MissingHeader("Via"));
    }
    if msg.top_via().is_none() {
        return Err(ParseError::BadVia);
    }
    if let StartLine::Request {
        method_token, uri, ..
    } = msg.start
    {
        if cseq_method != method_token {
            return Err(ParseError::BadCSeq);
        }
        if SipUri::parse(uri).is_none() {
            return Err(ParseError::BadUri);
        }
    }
    Ok(msg)
}

/// Writes into `out` the response owed to a request that [`parse`] refused with `err`, if the
/// message is a request other than ACK and carries well-formed Via, From, To, Call-ID and CSeq to
/// address one with (RFC 3261 §8.1.3.1 / §18.3). Returns false, writing nothing, when no response
/// is due or none could be matched by the sender.
pub fn error_response(buf: &[u8], err: ParseError, out: &mut Vec<u8>) -> bool {
    let buf = buf.get(..buf.len().min(MAX_MESSAGE)).unwrap_or(&[]);
    let head_end = find(buf, b"\r\n\r\n").unwrap_or(buf.len());
    let Ok(head) = std::str::from_utf8(buf.get(..head_end).unwrap_or(&[])) else {
        return false;
    };
    let mut lines = Lines { rest: head };
    let Some(Ok(first)) = lines.next() else {
        return false;
    };
    let mut words = first.split(' ');
    let method = words.next().unwrap_or("");
    if !is_token(method) || method == "ACK" || method.starts_with("SIP/") || words.next().is_none()
    {
        return false;
    }
    let mut vias: [&str; MAX_HEADERS] = [""; MAX_HEADERS];
    let mut n_via = 0usize;
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    // Every line is looked at (the input is already bounded by MAX_MESSAGE), so a request refused
    // for having too many headers still gets its 400.
    for line in lines {
        let Ok(line) = line else { continue };
        let Ok(h) = parse_header_line(line) else {
            continue;
        };
        if Hdr::Via.matches(h.name) {
            if let Some(slot) = vias.get_mut(n_via) {
                *slot = h.value;
                n_via += 1;
            }
        } else if Hdr::From.matches(h.name) {
            from = from.or(Some(h.value));
        } else if Hdr::To.matches(h.name) {
            to = to.or(Some(h.value));
        } else if Hdr::CallId.matches(h.name) {
            call_id = call_id.or(Some(h.value));
        } else if Hdr::CSeq.matches(h.name) {
            cseq = cseq.or(Some(h.value));
        }
    }
    let (Some(from), Some(to), Some(call_id), Some(cseq)) = (from, to, call_id, cseq) else {
        return false;
    };
    if n_via == 0 {
        return false;
    }
    let (code, reason) = err.status();
    let mut s = String::with_capacity(256 + head.len().min(2048));
    let _ = write!(s, "SIP/2.0 {code} {reason}\r\n");
    for v in vias.iter().take(n_via) {
        let _ = write!(s, "Via: {v}\r\n");
    }
    let _ = write!(
        s,
        "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\n"
    );
    let _ = write!(
        s,
        "Warning: 399 confmesh \"{err}\"\r\nContent-Length: 0\r\n\r\n"
    );
    // A response echoing headers too broken to parse could not be matched by the sender anyway.
    if parse(s.as_bytes(), Framing::Stream).is_err() {
        return false;
    }
    out.extend_from_slice(s.as_bytes());
    true
}

/// Iterates over header-section lines, joining folded continuation lines and bounding length.
struct Lines<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<&'a str, ParseError>;

    /// The next logical line (folded continuations joined). A line longer than [`MAX_LINE`] is
    /// skipped and reported, so a lenient reader can go on with the next one.
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let bytes = self.rest.as_bytes();
        let mut end = 0usize;
        let end = loop {
            match find(bytes.get(end..).unwrap_or(&[]), b"\r\n") {
                Some(i) => {
                    let line_end = end + i;
                    if line_end > 0 && matches!(bytes.get(line_end + 2), Some(b' ' | b'\t')) {
                        end = line_end + 2;
                        continue;
                    }
                    break line_end;
                }
                None => break bytes.len(),
            }
        };
        let line = self.rest.get(..end).unwrap_or("");
        self.rest = self.rest.get(end + 2..).unwrap_or("");
        if end > MAX_LINE {
            return Some(Err(ParseError::LineTooLong));
        }
        Some(Ok(line))
    }
}

fn parse_start_line(line: &str) -> Result<StartLine<'_>, ParseError> {
    if line.bytes().any(|b| b.is_ascii_control()) {
        return Err(ParseError::BadStartLine);
    }
    if let Some(rest) = line.strip_prefix("SIP/") {
        let (version, rest) = rest.split_once(' ').ok_or(ParseError::BadStartLine)?;
        if version != "2.0" {
            return Err(ParseError::BadVersion);
        }
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        if code.len() != 3 {
            return Err(ParseError::BadStartLine);
        }
        let code = parse_decimal(code, 3).ok_or(ParseError::BadStartLine)?;
        if !(100..=699).contains(&code) {
            return Err(ParseError::BadStartLine);
        }
        // `code` is at most 699, so the conversion cannot fail.
        let code = u16::try_from(code).map_err(|_| ParseError::BadStartLine)?;
        return Ok(StartLine::Response { code, reason });
    }
    let mut it = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(ParseError::BadStartLine);
    };
    if !is_token(method) || uri.is_empty() {
        return Err(ParseError::BadStartLine);
    }
    if version != "SIP/2.0" {
        return Err(if version.starts_with("SIP/") {
            ParseError::BadVersion
        } else {
            ParseError::BadStartLine
        });
    }
    Ok(StartLine::Request {
        method: Method::from_token(method),
        method_token: method,
        uri,
    })
}

fn parse_header_line(line: &str) -> Result<Header<'_>, ParseError> {
    let (name, value) = line.split_once(':').ok_or(ParseError::BadHeader)?;
    let name = name.trim_end_matches([' ', '\t']);
    if !is_token(name) {
        return Err(ParseError::BadHeader);
    }
    if value
        .bytes()
        .any(|b| b.is_ascii_control() && !matches!(b, b'\r' | b'\n' | b'\t'))
    {
        return Err(ParseError::BadHeader);
    }
    Ok(Header {
        name,
        value: value.trim_matches(is_lws),
    })
}

fn is_lws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// RFC 3261 `token` characters.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
                )
        })
}

/// Parses at most `max_digits` decimal digits (surrounding whitespace allowed), without overflow.
fn parse_decimal(s: &str, max_digits: usize) -> Option<usize> {
    let s = s.trim_matches(is_lws);
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_cseq(v: &str) -> Option<(u32, &str)> {
    let mut it = v.split(is_lws).filter(|s| !s.is_empty());
    let (Some(n), Some(m), None) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    if n.len() > 10 || !n.bytes().all(|b| b.is_ascii_digit()) || !is_token(m) {
        return None;
    }
    let n: u32 = n.parse().ok()?;
    Some((n, m))
}

/// Byte-string search; SIP heads are small, so the naive scan is fine and cannot panic.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits a comma-separated header value, ignoring commas inside quotes and angle brackets.
pub fn split_list(v: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(v);
    std::iter::from_fn(move || {
        loop {
            let s = rest?;
            let (mut quoted, mut angle, mut escape) = (false, false, false);
            let mut cut = None;
            for (i, c) in s.char_indices() {
                if escape {
                    escape = false;
                    continue;
                }
                match c {
                    '\\' if quoted => escape = true,
                    '"' => quoted = !quoted,
                    '<' if !quoted => angle = true,
                    '>' if !quoted => angle = false,
                    ',' if !quoted && !angle => {
                        cut = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let item = match cut {
                Some(i) => {
                    rest = s.get(i + 1..);
                    s.get(..i).unwrap_or("")
                }
                None => {
                    rest = None;
                    s
                }
            };
            let item = item.trim_matches(is_lws);
            if !item.is_empty() {
                return Some(item);
            }
        }
    })
}

/// Looks up `name` in a `;a=b;c` parameter list; a flag parameter yields `Some("")`.
pub fn param<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    params
        .split(';')
        .map(|p| p.trim_matches(is_lws))
        .find_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            k.trim_matches(is_lws)
                .eq_ignore_ascii_case(name)
                .then(|| v.trim_matches(is_lws))
        })
}

/// A Via element: `SIP/2.0/UDP host:port;branch=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// Transport token (UDP, TCP, TLS, …).
    pub transport: &'a str,
    /// The host of sent-by.
    pub host: &'a str,
    /// The port of sent-by, if written.
    pub port: Option<u16>,
    /// Everything after the first `;`.
    pub params: &'a str,
}

impl<'a> Via<'a> {
    /// Parses one Via element; `None` when malformed.
    pub fn parse(v: &'a str) -> Option<Via<'a>> {
        let (proto, rest) = v.split_once([' ', '\t', '\r', '\n'])?;
        let mut parts = proto.split('/').map(|s| s.trim_matches(is_lws));
        let (Some(name), Some(version), Some(transport), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" || !is_token(transport) {
            return None;
        }
        let rest = rest.trim_matches(is_lws);
        let (sent_by, params) = rest.split_once(';').unwrap_or((rest, ""));
        let (host, port) = split_host_port(sent_by.trim_matches(is_lws))?;
        Some(Via {
            transport,
            host,
            port,
            params,
        })
    }

    /// The `branch` parameter: the transaction identifier of RFC 3261 §17.
    pub fn branch(&self) -> Option<&'a str> {
        param(self.params, "branch")
    }
}

/// `host[:port]` with IPv6 references in brackets.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (s.get(..h.len() + 2)?, port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty()
        || !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':' | b'_')
        })
    {
        return None;
    }
    let port = match port {
        Some(p) => Some(u16::try_from(parse_decimal(p, 5)?).ok()?),
        None => None,
    };
    Some((host, port))
}

/// A SIP or SIPS URI: `sip:user@host:port;params?headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipUri<'a> {
    /// `sip` or `sips`.
    pub scheme: &'a str,
    /// The user part, if any.
    pub user: Option<&'a str>,
    /// Host name or address (IPv6 in brackets).
    pub host: &'a str,
    /// Port, if written.
    pub port: Option<u16>,
    /// URI parameters after the first `;` (without headers).
    pub params: &'a str,
}

impl<'a> SipUri<'a> {
    /// Parses a SIP/SIPS URI; `None` for other schemes or malformed ones.
    pub fn parse(s: &'a str) -> Option<SipUri<'a>> {
        let (scheme, rest) = s.split_once(':')?;
        if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
            return None;
        }
        let rest = rest.split_once('?').map_or(rest, |(a, _)| a);
        let (user, hostpart) = match rest.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() => (Some(u), h),
            Some(_) => return None,
            None => (None, rest),
        };
        let (hostport, params) = hostpart.split_once(';').unwrap_or((hostpart, ""));
        let (host, port) = split_host_port(hostport)?;
        Some(SipUri {
            scheme,
            user,
            host,
            port,
            params,
        })
    }

    /// The user part without its parameters (`user;x=y@host`), as used for alias matching.
    pub fn user_plain(&self) -> Option<&'a str> {
        self.user.map(|u| u.split_once(';').map_or(u, |(a, _)| a))
    }
}

/// A From/To/Contact/Route value: `"Display" <uri>;params` or `uri;params`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The display name, quotes included, possibly empty.
    pub display: &'a str,
    /// The URI without angle brackets.
    pub uri: &'a str,
    /// Header parameters after the URI (`tag=…`), without the leading `;`.
    pub params: &'a str,
}

impl<'a> NameAddr<'a> {
    /// Parses a name-addr or addr-spec; `None` when malformed.
    pub fn parse(v: &'a str) -> Option<NameAddr<'a>> {
        let v = v.trim_matches(is_lws);
        if v == "*" {
            return Some(NameAddr {
                display: "",
                uri: "*",
                params: "",
            });
        }
        // A '<' outside a quoted display name starts the URI.
        let mut quoted = false;
        let mut escape = false;
        let mut lt = None;
        for (i, c) in v.char_indices() {
            if escape {
                escape = false;
                continue;
            }
            match c {
                '\\' if quoted => escape = true,
                '"' => quoted = !quoted,
                '<' if !quoted => {
                    lt = Some(i);
                    break;
                }
                _ => {}
            }
        }
        if quoted {
            return None;
        }
        match lt {
            Some(i) => {
                let display = v.get(..i)?.trim_matches(is_lws);
                let after = v.get(i + 1..)?;
                let (uri, rest) = after.split_once('>')?;
                let rest = rest.trim_matches(is_lws);
                let params = match rest.strip_prefix(';') {
                    Some(p) => p,
                    None if rest.is_empty() => "",
                    None => return None,
                };
                if uri.is_empty() {
                    return None;
                }
                Some(NameAddr {
                    display,
                    uri,
                    params,
                })
            }
            None => {
                let (uri, params) = v.split_once(';').unwrap_or((v, ""));
                if uri.is_empty() || uri.contains([' ', '"', '>']) {
                    return None;
                }
                Some(NameAddr {
                    display: "",
                    uri,
                    params,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:meet.1000@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.96.3.1:5060;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:meet.1000@example.com>\r\n\
From: \"Alice, A.\" <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@10.96.3.1>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

    #[test]
    fn parses_a_request() {
        let m = parse(INVITE, Framing::Datagram).unwrap();
        assert!(m.is_request(Method::Invite));
        assert_eq!(m.body, b"v=0\n");
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK776asdhds"));
        assert_eq!(m.from_tag(), Some("1928301774"));
        assert_eq!(m.to_tag(), None);
        assert_eq!(m.cseq(), Some((314_159, "INVITE")));
        let NameAddr { display, .. } = NameAddr::parse(m.header(Hdr::From).unwrap()).unwrap();
        assert_eq!(display, "\"Alice, A.\"");
    }

    #[test]
    fn folded_and_compact_headers() {
        let msg = b"SIP/2.0 180 Ringing\r\nv: SIP/2.0/UDP a.example.com;branch=z9hG4bKx,\r\n SIP/2.0/TCP b:5070;branch=z9hG4bKy\r\nf: <sip:a@b>;tag=1\r\nt: <sip:c@d>;tag=2\r\ni: x\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n";
        let m = parse(msg, Framing::Stream).unwrap();
        let vias: Vec<_> = m.header_values(Hdr::Via).collect();
        assert_eq!(vias.len(), 2);
        assert_eq!(Via::parse(vias[1]).unwrap().port, Some(5070));
        assert_eq!(m.status(), Some(180));
    }

    #[test]
    fn truncated_body_gets_400() {
        let mut bad = INVITE.to_vec();
        bad.truncate(bad.len() - 2);
        let err = parse(&bad, Framing::Datagram).unwrap_err();
        assert_eq!(err, ParseError::BodyTruncated);
        let mut out = Vec::new();
        assert!(error_response(&bad, err, &mut out));
        let resp = parse(&out, Framing::Datagram).unwrap();
        assert_eq!(resp.status(), Some(400));
        assert_eq!(resp.cseq(), Some((314_159, "INVITE")));
    }

    #[test]
    fn uris() {
        let u = SipUri::parse("sip:meet.1000;x=1@[::1]:5061;transport=tcp?h=v").unwrap();
        assert_eq!(u.user_plain(), Some("meet.1000"));
        assert_eq!(u.host, "[::1]");
        assert_eq!(u.port, Some(5061));
        assert_eq!(param(u.params, "transport"), Some("tcp"));
        assert!(SipUri::parse("tel:+1234").is_none());
        assert!(SipUri::parse("sip:a@b:99999").is_none());
    }
}
