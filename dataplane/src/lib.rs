//! User-space IPsec for confmesh: AH (RFC 4302) with HMAC-SHA-256-128 (RFC 4868) and ESP with
//! AES-256-GCM (RFC 4303/4106), both in tunnel mode, carrying the overlay network between peers.
//!
//! The kernels confmesh runs on may have no IPsec, so the SAs are processed here:
//!
//! - [`Dataplane`] (modules `table`, `sa`, `replay`, `packet`) is the sans-IO core: packets, path
//!   MTU reports and `now` in; packets for the network or the TUN, timers and [`Event`]s out. It
//!   works on caller-owned buffers and never reads a clock or touches a socket.
//! - [`FaultInjector`] decides, equally sans-IO and from a seed, what the test-only fault
//!   injection does to each outbound packet (delay, jitter, loss, duplication, reordering).
//! - [`Overlay`] is the driver: a TUN device for the overlay addresses, raw IP sockets for
//!   protocols 51 and 50 on the management address, batched `recvmmsg`/`sendmmsg`, path-MTU
//!   tracking from ICMP errors, and two worker threads. The daemon holds an `Overlay` and installs
//!   the keys IKE negotiates into it.
//!
//! Only the `sys` module (ioctl, raw sockets, `recvmmsg`/`sendmmsg`) contains `unsafe` code.
#![deny(unsafe_code)]

mod fault;
mod overlay;
mod packet;
mod replay;
mod sa;
#[allow(unsafe_code)]
mod sys;
mod table;

pub use fault::{FaultConfig, FaultCounters, FaultInjector, REORDER_HOLD, Verdict};
pub use overlay::{DriverCounters, Overlay, OverlayConfig, OverlayError, PeerReport};
pub use replay::REPLAY_WINDOW;
pub use sa::{AH_KEY_LEN, ESP_GCM_KEY_LEN, Lifetime, Limit, Protection, SaCounters, SaParams};
pub use table::{
    Action, ConfigError, Dataplane, Direction, DropReason, Event, GlobalCounters, MAX_INBOUND_PER_PEER,
    MAX_MTU, MAX_PEERS, MIN_CONFIGURED_MTU, MIN_PATH_MTU, PMTU_AGING, PROBE_INTERVAL, PeerAddrs,
    PeerCounters, PeerStatus, SaStatus,
};
