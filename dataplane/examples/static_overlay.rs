//! Runs one overlay endpoint with static test keys, for benchmarks and manual experiments in
//! network namespaces (benches/netns-throughput.sh). Not for production: the keys are fixed.
//!
//! ```text
//! static_overlay TUN LOCAL_MGMT LOCAL_OVERLAY PEER_MGMT PEER_OVERLAY ah|esp [MTU]
//! ```
//!
//! Both ends derive the same keys and SPIs from the two management addresses, so two instances
//! started with mirrored arguments talk to each other. Runs until stdin closes or it is killed;
//! prints events and, at the end, the peer's counters.

use std::io::Read;
use std::net::Ipv4Addr;

use confmesh_dataplane::{Lifetime, Overlay, OverlayConfig, PeerAddrs, Protection, SaParams};

fn arg(args: &[String], i: usize, what: &str) -> String {
    args.get(i).cloned().unwrap_or_else(|| {
        eprintln!(
            "usage: static_overlay TUN LOCAL_MGMT LOCAL_OVERLAY PEER_MGMT PEER_OVERLAY ah|esp [MTU]"
        );
        eprintln!("missing {what}");
        std::process::exit(2)
    })
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or_else(|e| {
        eprintln!("bad address {s}: {e}");
        std::process::exit(2)
    })
}

/// Key material for the direction `from` → `to`: fixed, derived from the addresses.
fn key(from: Ipv4Addr, to: Ipv4Addr, len: usize) -> Vec<u8> {
    let seed = u32::from(from).rotate_left(7) ^ u32::from(to);
    (0..len)
        .map(|i| (seed.rotate_left(i as u32 % 32) as u8) ^ i as u8)
        .collect()
}

fn spi(from: Ipv4Addr, to: Ipv4Addr) -> u32 {
    0x1000_0000 | (u32::from(from) & 0xff) << 8 | (u32::from(to) & 0xff)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tun = arg(&args, 1, "TUN");
    let local = PeerAddrs {
        mgmt: addr(&arg(&args, 2, "LOCAL_MGMT")),
        overlay: addr(&arg(&args, 3, "LOCAL_OVERLAY")),
    };
    let peer = PeerAddrs {
        mgmt: addr(&arg(&args, 4, "PEER_MGMT")),
        overlay: addr(&arg(&args, 5, "PEER_OVERLAY")),
    };
    let protection = match arg(&args, 6, "ah|esp").as_str() {
        "ah" => Protection::Ah,
        "esp" => Protection::EspGcm,
        other => {
            eprintln!("protection must be ah or esp, not {other}");
            std::process::exit(2)
        }
    };
    let mtu = args.get(7).map_or(1500, |m| m.parse().unwrap_or(1500));
    let config = OverlayConfig {
        tun_name: tun,
        local,
        overlay_prefix_len: 24,
        mtu,
    };
    let (overlay, mut events) = Overlay::start(config).unwrap_or_else(|e| {
        eprintln!("cannot start the overlay: {e}");
        std::process::exit(1)
    });
    let out_key = key(local.mgmt, peer.mgmt, protection.key_len());
    let in_key = key(peer.mgmt, local.mgmt, protection.key_len());
    let params = |spi, key| SaParams {
        spi,
        protection,
        key,
        lifetime: Lifetime::default(),
    };
    if let Err(e) = overlay.install_sa_pair(
        peer,
        &params(spi(local.mgmt, peer.mgmt), &out_key),
        &params(spi(peer.mgmt, local.mgmt), &in_key),
    ) {
        eprintln!("cannot install the SAs: {e}");
        std::process::exit(1)
    }
    println!(
        "overlay up on {} (MTU {})",
        overlay.tun_name(),
        overlay.tun_mtu()
    );
    std::thread::spawn(move || {
        while let Some(event) = events.blocking_recv() {
            println!("event: {event:?}");
        }
    });
    // Until stdin closes (the script holds it open) or a signal ends the process.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    if let Some(report) = overlay.peer_report(peer.mgmt) {
        println!("counters: {:?}", report.status.counters);
    }
    println!("driver: {:?}", overlay.driver_counters());
}
