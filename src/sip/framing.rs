//! Cutting a TCP byte stream into SIP messages (RFC 3261 §18.3): a message is its header section
//! plus exactly Content-Length bytes; CRLF keep-alives (RFC 5626 §3.5.1) between messages are
//! skipped. The caller keeps the buffer; this only says how many bytes to consume.
#![forbid(unsafe_code)]

use super::parse::{Hdr, MAX_MESSAGE, ParseError, find};

/// What the front of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet; read more (the buffer never needs more than [`MAX_MESSAGE`]).
    Incomplete,
    /// `n` bytes of CRLF keep-alive to consume; a double CRLF asks for a single CRLF pong.
    KeepAlive {
        /// Bytes to consume.
        consumed: usize,
        /// Whether a `\r\n` pong is due.
        pong: bool,
    },
    /// One whole message occupies the first `n` bytes.
    Message(usize),
}

/// Looks at the front of `buf`. An error means the stream cannot be resynchronised: answer with
/// [`super::parse::error_response`] if possible, then close the connection.
pub fn next_frame(buf: &[u8]) -> Result<Frame, ParseError> {
    let lead = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if lead > 0 {
        return Ok(Frame::KeepAlive {
            consumed: lead,
            pong: lead >= 4,
        });
    }
    let Some(head_end) = find(
        buf.get(..buf.len().min(MAX_MESSAGE)).unwrap_or(&[]),
        b"\r\n\r\n",
    ) else {
        return if buf.len() >= MAX_MESSAGE {
            Err(ParseError::TooLarge)
        } else {
            Ok(Frame::Incomplete)
        };
    };
    let head = buf.get(..head_end).unwrap_or(&[]);
    let mut length: Option<usize> = None;
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if !Hdr::ContentLength.matches(name.trim_end()) {
            continue;
        }
        let value = std::str::from_utf8(value.get(1..).unwrap_or(&[]))
            .map_err(|_| ParseError::BadContentLength)?;
        let value = value.trim();
        if value.is_empty() || value.len() > 9 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::BadContentLength);
        }
        let n: usize = value.parse().map_err(|_| ParseError::BadContentLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(ParseError::BadContentLength);
        }
        length = Some(n);
    }
    let body = length.ok_or(ParseError::BadContentLength)?;
    let total = head_end
        .checked_add(4)
        .and_then(|h| h.checked_add(body))
        .ok_or(ParseError::TooLarge)?;
    if total > MAX_MESSAGE {
        return Err(ParseError::TooLarge);
    }
    Ok(if buf.len() >= total {
        Frame::Message(total)
    } else {
        Frame::Incomplete
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_two_messages_and_keepalives() {
        let one = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 3\r\n\r\nabc";
        let mut s = b"\r\n\r\n".to_vec();
        s.extend_from_slice(one);
        s.extend_from_slice(one);
        assert_eq!(
            next_frame(&s),
            Ok(Frame::KeepAlive {
                consumed: 4,
                pong: true
            })
        );
        let s = &s[4..];
        assert_eq!(next_frame(&s[..10]), Ok(Frame::Incomplete));
        assert_eq!(next_frame(&s[..one.len() - 1]), Ok(Frame::Incomplete));
        assert_eq!(next_frame(s), Ok(Frame::Message(one.len())));
    }

    #[test]
    fn refuses_missing_or_huge_length() {
        assert_eq!(
            next_frame(b"BYE x SIP/2.0\r\n\r\n"),
            Err(ParseError::BadContentLength)
        );
        assert_eq!(
            next_frame(b"BYE x SIP/2.0\r\nl: 99999999\r\n\r\n"),
            Err(ParseError::TooLarge)
        );
        assert_eq!(
            next_frame(&vec![b'a'; MAX_MESSAGE]),
            Err(ParseError::TooLarge)
        );
    }
}
