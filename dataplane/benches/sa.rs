//! Per-packet cost of the SA transforms next to the bare primitives on the same buffers (the
//! ceiling): encapsulate and decapsulate at 64, 512 and 1400 bytes for AH (HMAC-SHA-256-128) and
//! ESP (AES-256-GCM), and ring's HMAC-SHA256 / AES-256-GCM seal over a packet of the same size.
//!
//! Run: `cargo bench -p confmesh-dataplane --bench sa`.
// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::net::Ipv4Addr;
use std::time::Instant;

use confmesh_dataplane::{Action, Dataplane, Lifetime, PeerAddrs, Protection, SaParams};
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use ring::{aead, hmac};

const SIZES: [usize; 3] = [64, 512, 1400];
const KEY: [u8; 36] = [0x42; 36];

fn addrs(i: u8) -> PeerAddrs {
    PeerAddrs {
        mgmt: Ipv4Addr::new(10, 96, 0, i),
        overlay: Ipv4Addr::new(10, 97, 0, i),
    }
}

/// Two dataplanes with one SA pair between them.
fn pair(protection: Protection) -> (Dataplane, Dataplane) {
    let now = Instant::now();
    let key = &KEY[..protection.key_len()];
    // Large enough that a long benchmark never reaches the sequence-number soft limit's hard end.
    let params = |spi| SaParams {
        spi,
        protection,
        key,
        lifetime: Lifetime::default(),
    };
    let mut a = Dataplane::new(addrs(1), 1500).expect("config");
    let mut b = Dataplane::new(addrs(2), 1500).expect("config");
    a.install_sa_pair(now, addrs(2), &params(0x1000), &params(0x2000))
        .expect("install");
    b.install_sa_pair(now, addrs(1), &params(0x2000), &params(0x1000))
        .expect("install");
    (a, b)
}

/// An inner IPv4 packet of `size` bytes from peer 1 to peer 2.
fn inner(size: usize) -> Vec<u8> {
    let mut p = vec![0xab; size];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&addrs(1).overlay.octets());
    p[16..20].copy_from_slice(&addrs(2).overlay.octets());
    p
}

fn transforms(c: &mut Criterion) {
    for protection in [Protection::Ah, Protection::EspGcm] {
        let name = match protection {
            Protection::Ah => "ah-hmac-sha256-128",
            Protection::EspGcm => "esp-aes256-gcm16",
        };
        let mut group = c.benchmark_group(name);
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let packet = inner(size);
            let mut out = vec![0u8; 2048];
            let mut back = vec![0u8; 2048];
            let (mut a, mut b) = pair(protection);
            let now = Instant::now();
            group.bench_with_input(
                BenchmarkId::new("encapsulate", size),
                &packet,
                |bench, p| {
                    bench.iter(|| black_box(a.handle_tun_packet(now, black_box(p), &mut out)))
                },
            );
            // Decapsulation needs fresh sequence numbers: seal a large batch ahead, then replay
            // it through a fresh receiver whenever it runs out (setup not timed).
            let (mut a, _) = pair(protection);
            let mut sealed = Vec::new();
            for _ in 0..4096 {
                let Action::WriteToNetwork { len, .. } =
                    a.handle_tun_packet(now, &packet, &mut out)
                else {
                    panic!("encapsulation failed")
                };
                sealed.push(out[..len].to_vec());
            }
            group.bench_function(BenchmarkId::new("decapsulate", size), |bench| {
                bench.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let (_, fresh) = pair(protection);
                        b = fresh;
                        let take = left.min(sealed.len() as u64) as usize;
                        let start = Instant::now();
                        for wire in &sealed[..take] {
                            let r = b.handle_network_packet(now, black_box(wire), &mut back);
                            debug_assert!(matches!(r, Action::WriteToTun { .. }));
                            let _ = black_box(r);
                        }
                        total += start.elapsed();
                        left -= take as u64;
                    }
                    total
                })
            });
            let hkey = hmac::Key::new(hmac::HMAC_SHA256, &KEY[..32]);
            let bare = vec![0xabu8; protection.outer_len(size)];
            group.bench_with_input(
                BenchmarkId::new("bare-primitive", size),
                &bare,
                |bench, buf| match protection {
                    Protection::Ah => bench.iter(|| black_box(hmac::sign(&hkey, black_box(buf)))),
                    Protection::EspGcm => {
                        let key = aead::LessSafeKey::new(
                            aead::UnboundKey::new(&aead::AES_256_GCM, &KEY[..32]).expect("key"),
                        );
                        let mut work = buf.clone();
                        let mut n: u64 = 0;
                        bench.iter(|| {
                            n += 1;
                            let mut nonce = [0u8; 12];
                            nonce[4..].copy_from_slice(&n.to_be_bytes());
                            black_box(key.seal_in_place_separate_tag(
                                aead::Nonce::assume_unique_for_key(nonce),
                                aead::Aad::from([0u8; 8]),
                                &mut work[..size],
                            ))
                        })
                    }
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, transforms);
criterion_main!(benches);
