//! Cost of bringing a pair of peers up: Main Mode plus Quick Mode with PFS, both ends' CPU
//! time, for MODP 4096 (the default) and Curve25519. The DH exponentiations dominate; this
//! bench says by how much and what the optional group saves.
//!
//! Run: `cargo bench -p confmesh-ike --bench handshake`.
// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use confmesh_ike::{DhGroup, Endpoint, EndpointConfig, Event, IKE_PORT, PeerConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use zeroize::Zeroizing;

const PSK: &[u8] = b"benchmark pre-shared key";

fn node(i: u8, peer: u8, group: DhGroup, seed: u8, now: Instant) -> Endpoint {
    let mgmt = |n| Ipv4Addr::new(10, 96, 0, n);
    let overlay = |n| Ipv4Addr::new(198, 18, 0, n);
    let cfg = EndpointConfig {
        group,
        ..EndpointConfig::new(mgmt(i), overlay(i))
    };
    let mut e = Endpoint::new(cfg, [seed; 32]);
    e.set_peer(
        now,
        PeerConfig {
            addr: mgmt(peer),
            overlay: overlay(peer),
            psk: Zeroizing::new(PSK.to_vec()),
        },
    );
    e
}

/// Runs one complete handshake over a perfect in-memory link; returns when both sides have
/// their child SA.
fn handshake(group: DhGroup, seed: u8) {
    let now = Instant::now();
    let mut nodes = [
        node(1, 2, group, seed, now),
        node(2, 1, group, seed.wrapping_add(1), now),
    ];
    let mut up = [false, false];
    for _ in 0..64 {
        for n in nodes.iter_mut() {
            if n.poll_timeout().is_some_and(|t| t <= now) {
                n.handle_timeout(now);
            }
        }
        for from in 0..2 {
            let to = 1 - from;
            while let Some(t) = nodes[from].poll_transmit() {
                assert_eq!(t.dst.port(), IKE_PORT);
                let src = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, from as u8 + 1), IKE_PORT);
                nodes[to].handle(now, src, &t.payload);
            }
        }
        for (n, up) in nodes.iter_mut().zip(up.iter_mut()) {
            while let Some(e) = n.poll_event() {
                *up |= matches!(e, Event::ChildUp { .. });
            }
        }
        if up == [true, true] {
            return;
        }
    }
    panic!("handshake did not complete");
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.sample_size(10);
    let mut seed = 0u8;
    g.bench_function("main+quick, MODP 4096 + PFS", |b| {
        b.iter(|| {
            seed = seed.wrapping_add(2);
            handshake(DhGroup::Modp4096, seed)
        })
    });
    g.bench_function("main+quick, Curve25519 + PFS", |b| {
        b.iter(|| {
            seed = seed.wrapping_add(2);
            handshake(DhGroup::Curve25519, seed)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
