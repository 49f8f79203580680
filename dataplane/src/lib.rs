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
//!
//! # How the daemon drives it
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use confmesh_dataplane::{Event, FaultConfig, Lifetime, Overlay, OverlayConfig, PeerAddrs, Protection, SaParams};
//!
//! # fn keys_from_ike() -> ([u8; 32], [u8; 32]) { ([1; 32], [2; 32]) }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let local = PeerAddrs { mgmt: Ipv4Addr::new(10, 96, 0, 1), overlay: Ipv4Addr::new(10, 97, 0, 1) };
//! let config = OverlayConfig { tun_name: "confmesh0".into(), local, overlay_prefix_len: 24, mtu: 1500 };
//! let (overlay, mut events) = Overlay::start(config)?;
//!
//! // After each Quick Mode: the SA pair for the peer (the keys are copied; zeroize yours).
//! let peer = PeerAddrs { mgmt: Ipv4Addr::new(10, 96, 0, 2), overlay: Ipv4Addr::new(10, 97, 0, 2) };
//! let (out_key, in_key) = keys_from_ike();
//! let lifetime = Lifetime::default();
//! overlay.install_sa_pair(
//!     peer,
//!     &SaParams { spi: 0x1000_0001, protection: Protection::Ah, key: &out_key, lifetime },
//!     &SaParams { spi: 0x2000_0001, protection: Protection::Ah, key: &in_key, lifetime },
//! )?;
//!
//! // Status and metrics.
//! let report = overlay.peer_report(peer.mgmt).expect("installed above");
//! println!("path MTU {} rx {}", report.status.path_mtu, report.status.counters.rx_packets);
//!
//! // Tests only: 20 ms more latency towards the peer.
//! overlay.set_faults(peer.mgmt, FaultConfig { delay: std::time::Duration::from_millis(20), ..FaultConfig::default() });
//!
//! // Rekey requests and expiries go to the IKE engine.
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::RekeyNeeded { peer, spi, .. } => { /* start Quick Mode for `peer` */ }
//!         Event::SaExpired { peer, spi, .. } => { /* send DELETE for `spi` */ }
//!         Event::PathMtuChanged { peer, path_mtu } => { /* status, alarm if too small */ }
//!         _ => {}
//!     }
//! }
//! overlay.remove_inbound_sa(Protection::Ah, 0x2000_0001); // IKE received a DELETE
//! overlay.remove_peer(peer.mgmt); // the peer left the cluster
//! # Ok(())
//! # }
//! ```
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
    Action, ConfigError, Dataplane, Direction, DropReason, Event, GlobalCounters,
    MAX_INBOUND_PER_PEER, MAX_MTU, MAX_PEERS, MIN_CONFIGURED_MTU, MIN_PATH_MTU, PMTU_AGING,
    PROBE_INTERVAL, PeerAddrs, PeerCounters, PeerStatus, SaStatus,
};
