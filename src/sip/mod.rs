//! SIP (RFC 3261) for the B2BUA: a parser that survives anything a remote sends, a message writer,
//! stream framing, the transaction layer and the socket driver.
//!
//! Layout, from the wire up:
//! - [`parse`]: zero-copy parsing of one message held in a byte buffer, with bounded sizes
//!   (message, line, header count) and the 400/505/513 answer owed to a malformed request;
//! - [`framing`]: cutting a TCP byte stream into messages (Content-Length is mandatory there);
//! - [`build`]: writing messages into a caller-owned buffer;
//! - [`transaction`]: the four RFC 3261 §17 state machines with timers A–K, sans-IO;
//! - [`transport`]: the tokio UDP/TCP sockets that feed bytes into a sans-IO core and send what it
//!   asks for.
//!
//! Everything except [`transport`] is sans-IO: bytes and `now: Instant` in, bytes, timers and events
//! out, so it is tested deterministically and fuzzed without sockets.

pub mod build;
pub mod framing;
pub mod parse;
pub mod transaction;
pub mod transport;

pub use parse::{Header, Message, Method, ParseError, StartLine};

/// The transport a message came in on or must leave on; it decides retransmissions (§17.1.1.1:
/// none over reliable transports) and the Via transport token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Unreliable datagrams: transactions retransmit.
    Udp,
    /// Reliable stream: no retransmissions, timers D/I/J/K are zero.
    Tcp,
}

impl Transport {
    /// The token used in Via and in `;transport=` URI parameters.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }

    /// Whether the transport delivers reliably (no retransmission timers).
    pub fn is_reliable(self) -> bool {
        matches!(self, Transport::Tcp)
    }
}
