//! Sans-IO IKEv1 engine for confmesh: Main Mode with a pre-shared key and Quick Mode with PFS.
//!
//! The engine owns no socket, thread or clock. A driver feeds it datagrams and the current time and
//! takes out datagrams to send, the next deadline and events (SA established, deleted, peer dead),
//! in the style of quinn-proto. That keeps it deterministic and testable without root.
//!
//! ```text
//! driver ── handle(now, from, datagram) ──▶ Endpoint ── poll_transmit() ──▶ UDP 500
//!        ── handle_timeout(now) ─────────▶          ── poll_timeout()  ──▶ timer
//!                                                    ── poll_event()    ──▶ dataplane, key log
//! ```
//!
//! The suite is fixed by the deployment guide: AES-256-CBC, SHA2-256, MODP-4096 (or X25519 when
//! both ends are configured for it), pre-shared keys chosen by the peer's address. Anything weaker
//! is answered with NO_PROPOSAL_CHOSEN and Aggressive Mode is never accepted.
#![forbid(unsafe_code)]

mod crypto;
mod endpoint;
mod exchange;
mod wire;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use zeroize::Zeroizing;

pub use crypto::DhGroup;
pub use endpoint::Endpoint;

/// The UDP port IKE runs on.
pub const IKE_PORT: u16 = 500;

/// What the child SAs protect with; the cluster configures one for all peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protection {
    /// AH with HMAC-SHA2-256-128 (RFC 4868): integrity only, what the guide prescribes.
    Ah,
    /// ESP with AES-256-GCM-16 (RFC 4106), when confidentiality is wanted.
    EspGcm,
}

impl Protection {
    /// Key material per direction: 32 bytes for AH, 32 + 4 bytes of salt for ESP-GCM.
    pub fn key_len(self) -> usize {
        match self {
            Protection::Ah => 32,
            Protection::EspGcm => 36,
        }
    }

    fn protocol_id(self) -> u8 {
        match self {
            Protection::Ah => wire::PROTO_AH,
            Protection::EspGcm => wire::PROTO_ESP,
        }
    }
}

/// Settings of one endpoint (one local management address).
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// This peer's management address: the IKE identity and the outer address of the child SAs.
    pub local: Ipv4Addr,
    /// This peer's overlay address: the local traffic selector of Quick Mode.
    pub local_overlay: Ipv4Addr,
    /// Diffie-Hellman group of phase 1 and of PFS in Quick Mode.
    pub group: DhGroup,
    /// AH or ESP-GCM for the child SAs.
    pub protection: Protection,
    /// Lifetime of a phase-1 SA; it is rekeyed at 80–95 % of it.
    pub ike_lifetime: Duration,
    /// Lifetime of a child SA pair in time; rekeyed at 80–95 % of it.
    pub child_lifetime: Duration,
    /// Lifetime of a child SA in kilobytes (the dataplane enforces it), if any.
    pub child_lifetime_kb: Option<u64>,
    /// Interval of dead-peer detection probes; a peer is dead after 2.5 intervals of silence.
    pub dpd_interval: Duration,
    /// First retransmission timeout; doubled on every try.
    pub retransmit_timeout: Duration,
    /// Transmissions of one message before the exchange fails.
    pub retransmit_tries: u32,
    /// Never start an exchange (only answer): for tests against another implementation that
    /// must be the initiator.
    pub passive: bool,
}

impl EndpointConfig {
    /// The deployment guide's defaults for an endpoint on `local`.
    pub fn new(local: Ipv4Addr, local_overlay: Ipv4Addr) -> Self {
        Self {
            local,
            local_overlay,
            group: DhGroup::Modp4096,
            protection: Protection::Ah,
            ike_lifetime: Duration::from_secs(8 * 3600),
            child_lifetime: Duration::from_secs(3600),
            child_lifetime_kb: None,
            dpd_interval: Duration::from_secs(5),
            retransmit_timeout: Duration::from_millis(500),
            retransmit_tries: 5,
            passive: false,
        }
    }
}

/// A peer the endpoint may talk to; datagrams from any other address are dropped unanswered.
#[derive(Clone)]
pub struct PeerConfig {
    /// The peer's management address (its IKE identity).
    pub addr: Ipv4Addr,
    /// The peer's overlay address: the remote traffic selector of Quick Mode.
    pub overlay: Ipv4Addr,
    /// The pre-shared key for this peer.
    pub psk: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("addr", &self.addr)
            .field("overlay", &self.overlay)
            .finish_non_exhaustive()
    }
}

/// A datagram for the driver to send from UDP 500 of the local address.
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// The ISAKMP message.
    pub payload: Vec<u8>,
}

/// One direction of a child SA: its SPI (chosen by the receiver) and key material.
#[derive(Clone)]
pub struct ChildKeys {
    /// Security parameter index.
    pub spi: u32,
    /// `Protection::key_len` bytes of KEYMAT (RFC 2409 §5.5).
    pub key: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for ChildKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChildKeys {{ spi: {:#010x}, .. }}", self.spi)
    }
}

/// Why a child SA pair went away; the driver removes it from the dataplane in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildDownReason {
    /// The peer sent a DELETE for it.
    DeletedByPeer,
    /// A newer pair replaced it (rekey, make-before-break) and the grace period is over.
    Replaced,
    /// Its lifetime ran out without a rekey.
    Expired,
    /// The peer stopped answering dead-peer detection.
    PeerDead,
    /// The peer restarted (INITIAL-CONTACT) and no longer has it.
    PeerRestarted,
    /// The peer was removed from the configuration, or the endpoint shuts down.
    Closed,
}

/// Why an exchange failed; the driver reports it as the peer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer's hash did not verify, or it said so: almost always a different pre-shared key.
    AuthenticationFailed,
    /// The proposals did not match (`by_peer`: the peer refused ours, else we refused theirs).
    NoProposalChosen {
        /// Who refused.
        by_peer: bool,
    },
    /// The peer's identity or traffic selectors were not what the configuration says.
    InvalidId,
    /// The peer's Diffie-Hellman public value was out of range.
    InvalidKeyExchange,
    /// No answer after all retransmissions.
    Timeout,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::AuthenticationFailed => {
                f.write_str("authentication failed (pre-shared key mismatch?)")
            }
            Failure::NoProposalChosen { by_peer: true } => {
                f.write_str("no proposal chosen: the peer refused our proposal")
            }
            Failure::NoProposalChosen { by_peer: false } => {
                f.write_str("no proposal chosen: the peer proposed a weaker suite")
            }
            Failure::InvalidId => f.write_str("invalid identity or traffic selectors"),
            Failure::InvalidKeyExchange => f.write_str("invalid Diffie-Hellman public value"),
            Failure::Timeout => f.write_str("no answer from the peer"),
        }
    }
}

/// What the endpoint reports to its driver.
pub enum Event {
    /// A phase-1 SA is established: the key log records it, the bandwidth service takes its key.
    IkeUp {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// Initiator cookie.
        icookie: [u8; 8],
        /// Responder cookie.
        rcookie: [u8; 8],
        /// The AES-256-CBC key of phase-1 payloads (SKEYID_e), for the key log only.
        enc_key: Zeroizing<[u8; 32]>,
        /// A key for authenticating UDP 1719 bandwidth updates with this peer, derived from the SA.
        bandwidth_key: Zeroizing<[u8; 32]>,
    },
    /// A phase-1 SA was deleted or expired (its children stay, IKEv1 style).
    IkeDown {
        /// The peer's management address.
        peer: Ipv4Addr,
    },
    /// A child SA pair is established: install it in the dataplane.
    ChildUp {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// AH or ESP-GCM.
        protection: Protection,
        /// Keys of packets we send (the peer chose the SPI).
        outbound: ChildKeys,
        /// Keys of packets we receive (we chose the SPI).
        inbound: ChildKeys,
        /// Negotiated lifetime.
        lifetime: Duration,
        /// Negotiated lifetime in kilobytes, if any.
        lifetime_kb: Option<u64>,
    },
    /// A child SA pair is gone: remove it from the dataplane.
    ChildDown {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// AH or ESP-GCM.
        protection: Protection,
        /// The SPI we received with.
        inbound_spi: u32,
        /// The SPI we sent with.
        outbound_spi: u32,
        /// Why.
        reason: ChildDownReason,
    },
    /// The peer stopped answering dead-peer detection; all its SAs are gone.
    PeerDead {
        /// The peer's management address.
        peer: Ipv4Addr,
    },
    /// An exchange with the peer failed.
    Failed {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// Why.
        reason: Failure,
    },
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::IkeUp { peer, .. } => write!(f, "IkeUp({peer})"),
            Event::IkeDown { peer } => write!(f, "IkeDown({peer})"),
            Event::ChildUp {
                peer,
                outbound,
                inbound,
                ..
            } => {
                write!(
                    f,
                    "ChildUp({peer}, out {:#010x}, in {:#010x})",
                    outbound.spi, inbound.spi
                )
            }
            Event::ChildDown {
                peer,
                inbound_spi,
                reason,
                ..
            } => {
                write!(f, "ChildDown({peer}, in {inbound_spi:#010x}, {reason:?})")
            }
            Event::PeerDead { peer } => write!(f, "PeerDead({peer})"),
            Event::Failed { peer, reason } => write!(f, "Failed({peer}, {reason})"),
        }
    }
}

/// Per-peer counters: what an operator needs to tell a silent peer from a refusing one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerCounters {
    /// Datagrams received from the peer.
    pub datagrams_in: u64,
    /// Datagrams sent to the peer, retransmissions included.
    pub datagrams_out: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Datagrams from the peer that could not be parsed or matched no exchange.
    pub malformed: u64,
    /// Phase-1 exchanges that failed authentication.
    pub auth_failures: u64,
    /// Proposals refused, either way.
    pub proposals_refused: u64,
    /// Exchanges that timed out.
    pub timeouts: u64,
    /// Phase-1 SAs established.
    pub ike_established: u64,
    /// Child SA pairs established.
    pub child_established: u64,
    /// Dead-peer-detection probes sent.
    pub dpd_sent: u64,
    /// Dead-peer-detection acknowledgements received.
    pub dpd_acked: u64,
    /// DELETE payloads sent.
    pub deletes_sent: u64,
    /// DELETE payloads received.
    pub deletes_received: u64,
    /// Exchanges the peer opened that had not gone past MM2 (anyone who can send from the peer's
    /// address can open one), dropped oldest first to make room for a newer one: a flood of forged
    /// first messages shows here.
    pub half_open_evicted: u64,
    /// Our phase-1 exchanges started again because the peer told us it no longer held them
    /// (INVALID-COOKIE, e.g. after evicting them).
    pub restarted: u64,
}

/// The state of one peer, for status output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerState {
    /// A phase-1 SA is established.
    pub ike_established: bool,
    /// Child SA pairs in force (more than one during a rekey).
    pub children: usize,
    /// Exchanges in progress.
    pub exchanges_in_progress: usize,
    /// The counters.
    pub counters: PeerCounters,
}

/// Endpoint-wide counters of datagrams that belong to no known peer or exchange.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointCounters {
    /// Datagrams from addresses not in the peer list (dropped without a reply).
    pub unknown_source: u64,
    /// Aggressive Mode and other refused exchange types.
    pub refused_exchange: u64,
    /// New exchanges refused because too many were half open, every one of them past MM2.
    pub half_open_refused: u64,
}
