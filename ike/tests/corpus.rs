//! Issue 7 acceptance 4: real datagrams recorded between confmesh and strongSwan's charon
//! (`tests/corpus/`, see its README) fed into the engine as they are and mutated: never a panic,
//! bounded answers, bounded state.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use confmesh_ike::{Endpoint, EndpointConfig, IKE_PORT, PeerConfig};
use proptest::prelude::*;
use zeroize::Zeroizing;

/// The pre-shared key of the recordings.
const PSK: &[u8] = b"confmesh-test-psk-0123456789abcdef";
const CHARON: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
const CONFMESH: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Exchanges a single peer can hold half open on a responder (MAX_HALF_OPEN_PER_PEER).
const HALF_OPEN_PER_PEER: usize = 2;

struct Recorded {
    name: String,
    from: Ipv4Addr,
    data: Vec<u8>,
}

fn corpus() -> Vec<Recorded> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".hex"))
        .collect();
    names.sort();
    let c: Vec<Recorded> = names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            let data = hex::decode(text.trim()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let from = if name.contains("from-charon") {
                CHARON
            } else {
                CONFMESH
            };
            Recorded { name, from, data }
        })
        .collect();
    assert!(c.len() >= 20, "corpus too small: {}", c.len());
    c
}

/// A passive endpoint at the receiving side of datagrams sent by `from`.
fn receiver(from: Ipv4Addr, now: Instant, seed: u8) -> Endpoint {
    let local = if from == CHARON { CONFMESH } else { CHARON };
    let overlay = |a: Ipv4Addr| Ipv4Addr::new(198, 18, 0, a.octets()[3]);
    let cfg = EndpointConfig {
        passive: true,
        ..EndpointConfig::new(local, overlay(local))
    };
    let mut e = Endpoint::new(cfg, [seed; 32]);
    e.set_peer(
        now,
        PeerConfig {
            addr: from,
            overlay: overlay(from),
            psk: Zeroizing::new(PSK.to_vec()),
        },
    );
    e
}

fn drain(e: &mut Endpoint) -> Vec<Vec<u8>> {
    while e.poll_event().is_some() {}
    std::iter::from_fn(|| e.poll_transmit().map(|t| t.payload)).collect()
}

#[test]
fn recorded_datagrams_are_understood() {
    let now = Instant::now();
    for r in corpus() {
        let mut e = receiver(r.from, now, 1);
        e.handle(now, SocketAddrV4::new(r.from, IKE_PORT), &r.data);
        let answers = drain(&mut e);
        let state = e.peer_state(r.from).unwrap();
        let first_of_main_mode =
            r.data.get(8..16) == Some(&[0u8; 8][..]) && r.data.get(18) == Some(&2);
        if first_of_main_mode {
            // An MM1 (charon's with its vendor IDs, or ours) is answered with one MM2 that keeps
            // the initiator's cookie and adds ours.
            assert_eq!(answers.len(), 1, "{}", r.name);
            let mm2 = &answers[0];
            assert_eq!(mm2[..8], r.data[..8], "{}", r.name);
            assert_ne!(mm2[8..16], [0u8; 8], "{}", r.name);
            assert_eq!(
                (mm2[18], mm2[19]),
                (2, 0),
                "{}: Main Mode, not encrypted",
                r.name
            );
            assert_eq!(state.exchanges_in_progress, 1, "{}", r.name);
            assert_eq!(state.counters.malformed, 0, "{}", r.name);
        } else {
            // Later messages belong to exchanges (cookies, keys) this endpoint does not have.
            assert!(answers.is_empty(), "{}: answered {answers:?}", r.name);
            assert_eq!(state.counters.malformed, 1, "{}", r.name);
            assert_eq!(state.exchanges_in_progress, 0, "{}", r.name);
        }
    }
}

/// charon's recorded Main Mode, its cookies adopted to the exchange the receiver answered: MM3's
/// real MODP-4096 value draws an MM4; MM5 then cannot decrypt (our DH secret differs from the
/// recorded peer's), which the engine reports as an authentication failure with a notification.
#[test]
fn recorded_main_mode_reaches_dh_and_authentication() {
    let c = corpus();
    let get = |p: &str| {
        c.iter()
            .find(|r| r.name.starts_with(p))
            .unwrap_or_else(|| panic!("{p}"))
    };
    let (mm1, mm3, mm5) = (
        get("charon-initiates-01"),
        get("charon-initiates-03"),
        get("charon-initiates-05"),
    );
    let now = Instant::now();
    let mut e = receiver(CHARON, now, 3);
    let from = SocketAddrV4::new(CHARON, IKE_PORT);
    e.handle(now, from, &mm1.data);
    let mm2 = drain(&mut e).pop().expect("MM2");
    let adopt = |d: &[u8]| {
        let mut d = d.to_vec();
        d[..16].copy_from_slice(&mm2[..16]);
        d
    };
    e.handle(now, from, &adopt(&mm3.data));
    let mm4 = drain(&mut e).pop().expect("MM4");
    assert!(
        mm4.len() > 512,
        "MM4 carries a 512-byte KE: {} bytes",
        mm4.len()
    );
    e.handle(now, from, &adopt(&mm5.data));
    let mut events = Vec::new();
    while let Some(ev) = e.poll_event() {
        events.push(format!("{ev:?}"));
    }
    let notify = e
        .poll_transmit()
        .expect("AUTHENTICATION-FAILED notification")
        .payload;
    assert_eq!(notify[18], 5, "an informational exchange");
    assert_eq!(
        events,
        vec!["Failed(10.96.0.2, authentication failed (pre-shared key mismatch?))"]
    );
    let s = e.peer_state(CHARON).unwrap();
    assert_eq!(
        (s.exchanges_in_progress, s.counters.auth_failures),
        (0, 1),
        "{s:?}"
    );
}

/// A flood of charon's MM1, each with a new initiator cookie, holds at most the per-peer number
/// of half-open exchanges: each newcomer evicts the oldest one still at MM2 (the newest flood
/// message, like a real peer's, gets its turn). Each is answered exactly once — no
/// amplification, no retransmission of MM2 on a timer — and the evictions are counted.
#[test]
fn a_flood_of_recorded_first_messages_stays_bounded() {
    let c = corpus();
    let mm1 = c
        .iter()
        .find(|r| r.name.starts_with("charon-initiates-01"))
        .expect("charon's MM1");
    let now = Instant::now();
    let mut e = receiver(mm1.from, now, 2);
    let mut answers = 0;
    let mut answered_bytes = 0;
    for i in 0u32..2_000 {
        let mut d = mm1.data.clone();
        d[..4].copy_from_slice(&i.to_be_bytes());
        e.handle(now, SocketAddrV4::new(mm1.from, IKE_PORT), &d);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1, "MM1 {i} answered {} times", out.len());
        answered_bytes += out[0].len();
        answers += out.len();
    }
    let state = e.peer_state(mm1.from).unwrap();
    assert_eq!(state.exchanges_in_progress, HALF_OPEN_PER_PEER);
    assert_eq!(answers, 2_000);
    assert!(
        answered_bytes <= 2_000 * mm1.data.len(),
        "{answered_bytes} bytes answered to {} received",
        2_000 * mm1.data.len()
    );
    assert_eq!(
        state.counters.half_open_evicted,
        2_000 - HALF_OPEN_PER_PEER as u64
    );
    assert_eq!(e.counters().half_open_refused, 0);
    // Half-open exchanges expire; nothing is sent meanwhile.
    let mut t = now;
    let mut resent = 0;
    for _ in 0..100 {
        t += Duration::from_secs(1);
        e.handle_timeout(t);
        resent += drain(&mut e).len();
    }
    assert_eq!(resent, 0, "{resent} retransmissions");
    assert_eq!(e.peer_state(mm1.from).unwrap().exchanges_in_progress, 0);
}

/// One mutation of a recorded datagram.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte.
    Flip(usize, u8),
    /// Cut the datagram short.
    Truncate(usize),
    /// Overwrite with bytes of another recorded datagram from one of its offsets.
    Splice {
        other: usize,
        from: usize,
        at: usize,
        len: usize,
    },
    /// Grow a payload length field inside the datagram.
    Stretch(usize, u16),
    /// Take the cookies of the receiver's last answer, so that a recorded later message of Main
    /// Mode reaches the exchange the receiver holds open (and its DH and decryption paths).
    Adopt,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(a, x)| Mutation::Flip(a, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..64).prop_map(
            |(other, from, at, len)| Mutation::Splice {
                other,
                from,
                at,
                len
            }
        ),
        (any::<usize>(), any::<u16>()).prop_map(|(a, v)| Mutation::Stretch(a, v)),
        Just(Mutation::Adopt),
    ]
}

fn apply(d: &mut Vec<u8>, m: &Mutation, c: &[Recorded], cookies: Option<&[u8]>) {
    match *m {
        Mutation::Adopt => {
            if let (Some(k), Some(head)) = (cookies, d.get_mut(..16)) {
                head.copy_from_slice(k);
            }
        }
        Mutation::Flip(at, x) if !d.is_empty() => {
            let l = d.len();
            d[at % l] ^= x;
        }
        Mutation::Truncate(n) => d.truncate(n % (d.len() + 1)),
        Mutation::Splice {
            other,
            from,
            at,
            len,
        } if !d.is_empty() => {
            let src = &c[other % c.len()].data;
            let from = from % src.len();
            let at = at % d.len();
            let n = len.min(src.len() - from).min(d.len() - at);
            d[at..at + n].copy_from_slice(&src[from..from + n]);
        }
        Mutation::Stretch(at, v) if d.len() > 32 => {
            // Generic payload headers sit at 28 and after; hit a 16-bit field there.
            let at = 28 + at % (d.len() - 30);
            d[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
        _ => {}
    }
    // Keep the ISAKMP header's length right half of the time, so that the payload parsers run.
    if d.len() >= 28 && m_keeps_length(m) {
        let l = u32::try_from(d.len()).unwrap().to_be_bytes();
        d[24..28].copy_from_slice(&l);
    }
}

fn m_keeps_length(m: &Mutation) -> bool {
    match m {
        Mutation::Flip(a, _) | Mutation::Truncate(a) | Mutation::Stretch(a, _) => a % 2 == 0,
        Mutation::Splice { at, .. } => at % 2 == 0,
        Mutation::Adopt => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

    /// Mutated recorded datagrams, interleaved with the originals and with time passing: no
    /// panic, at most a few answers per datagram, state within its bounds.
    #[test]
    fn mutated_recordings_never_panic(
        seed in any::<u8>(),
        steps in proptest::collection::vec((any::<usize>(), proptest::collection::vec(mutation(), 0..4), 0u64..3_000), 1..40),
    ) {
        let c = corpus();
        let start = Instant::now();
        let mut now = start;
        let mut to_confmesh = receiver(CHARON, now, seed);
        let mut to_charon = receiver(CONFMESH, now, seed.wrapping_add(1));
        // The cookies of each receiver's last answer.
        let mut cookies: [Option<Vec<u8>>; 2] = [None, None];
        for (pick, muts, wait_ms) in &steps {
            let r = &c[pick % c.len()];
            let k = usize::from(r.from != CHARON);
            let mut d = r.data.clone();
            for m in muts {
                apply(&mut d, m, &c, cookies[k].as_deref());
            }
            let e = if r.from == CHARON { &mut to_confmesh } else { &mut to_charon };
            e.handle(now, SocketAddrV4::new(r.from, IKE_PORT), &d);
            let answers = drain(e);
            prop_assert!(answers.len() <= 4, "{}: {muts:?}", r.name);
            if let Some(a) = answers.last().and_then(|a| a.get(..16)) {
                cookies[k] = Some(a.to_vec());
            }
            now += Duration::from_millis(*wait_ms);
            for e in [&mut to_confmesh, &mut to_charon] {
                if e.poll_timeout().is_some_and(|t| t <= now) {
                    e.handle_timeout(now);
                }
                prop_assert!(drain(e).len() <= 2 * HALF_OPEN_PER_PEER);
            }
        }
        for (e, peer) in [(&to_confmesh, CHARON), (&to_charon, CONFMESH)] {
            let s = e.peer_state(peer).unwrap();
            prop_assert!(s.exchanges_in_progress <= HALF_OPEN_PER_PEER, "{s:?}");
            prop_assert!(!s.ike_established && s.children == 0, "{s:?}");
        }
    }
}
