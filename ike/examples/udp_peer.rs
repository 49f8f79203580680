//! One IKE endpoint on a real UDP socket, for interoperability tests against another IKEv1
//! implementation (strongSwan's charon in the netns tests) and for the netns benchmark.
//!
//! The daemon always initiates; this driver can also stay passive (`--passive`), so that the other
//! implementation is the one that starts Main Mode and Quick Mode. It prints one line per event and
//! the peer's state on stdout, and writes the key log of SPEC.md §7.
//!
//! ```text
//! udp_peer --local 10.96.0.1 --overlay 198.18.0.1 --peer 10.96.0.2 --peer-overlay 198.18.0.2 \
//!          --psk-file PSK [--passive] [--keylog FILE] [--group 16|31] [--exit-after-child]
//! ```
//!
//! Output lines: `event <Debug of the event>` and `state <Debug of PeerState>` after every event and
//! every second; `ready` once the socket is bound. It runs until killed, or until the first child
//! SA is up with `--exit-after-child`.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use confmesh_ike::{DhGroup, Endpoint, EndpointConfig, Event, IKE_PORT, PeerConfig, Protection};
use zeroize::Zeroizing;

struct Args {
    local: Ipv4Addr,
    overlay: Ipv4Addr,
    peer: Ipv4Addr,
    peer_overlay: Ipv4Addr,
    psk_file: PathBuf,
    passive: bool,
    keylog: Option<PathBuf>,
    group: DhGroup,
    exit_after_child: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut local, mut overlay, mut peer, mut peer_overlay, mut psk_file) =
        (None, None, None, None, None);
    let (mut passive, mut keylog, mut group, mut exit_after_child) =
        (false, None, DhGroup::Modp4096, false);
    let addr = |v: Option<String>, name: &str| -> Result<Ipv4Addr, String> {
        v.ok_or(format!("{name} needs a value"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--local" => local = Some(addr(it.next(), &a)?),
            "--overlay" => overlay = Some(addr(it.next(), &a)?),
            "--peer" => peer = Some(addr(it.next(), &a)?),
            "--peer-overlay" => peer_overlay = Some(addr(it.next(), &a)?),
            "--psk-file" => psk_file = it.next().map(PathBuf::from),
            "--keylog" => keylog = it.next().map(PathBuf::from),
            "--passive" => passive = true,
            "--exit-after-child" => exit_after_child = true,
            "--group" => {
                let id: u16 = it
                    .next()
                    .and_then(|g| g.parse().ok())
                    .ok_or("--group needs 16 or 31")?;
                group = DhGroup::from_id(id).ok_or("--group needs 16 or 31")?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        local: local.ok_or("--local is required")?,
        overlay: overlay.ok_or("--overlay is required")?,
        peer: peer.ok_or("--peer is required")?,
        peer_overlay: peer_overlay.ok_or("--peer-overlay is required")?,
        psk_file: psk_file.ok_or("--psk-file is required")?,
        passive,
        keylog,
        group,
        exit_after_child,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The SPEC.md §7 key-log lines of an event, if it creates an SA.
fn keylog_lines(local: Ipv4Addr, e: &Event) -> Vec<String> {
    match e {
        Event::IkeUp {
            icookie,
            rcookie,
            enc_key,
            ..
        } => vec![format!(
            "IKEV1 icookie={} rcookie={} enc=aes256-cbc key={}",
            hex(icookie),
            hex(rcookie),
            hex(&enc_key[..])
        )],
        Event::ChildUp {
            peer,
            protection,
            outbound,
            inbound,
            ..
        } => [(local, *peer, outbound), (*peer, local, inbound)]
            .iter()
            .map(|(src, dst, k)| match protection {
                Protection::Ah => {
                    format!(
                        "AH src={src} dst={dst} spi={:08x} auth=hmac-sha2-256-128 key={}",
                        k.spi,
                        hex(&k.key)
                    )
                }
                Protection::EspGcm => {
                    format!(
                        "ESP src={src} dst={dst} spi={:08x} enc=aes256-gcm16 key={}",
                        k.spi,
                        hex(&k.key)
                    )
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn run(args: Args) -> io::Result<()> {
    let mut psk = Zeroizing::new(Vec::new());
    std::fs::File::open(&args.psk_file)?.read_to_end(&mut psk)?;
    while psk.last().is_some_and(|b| b.is_ascii_whitespace()) {
        psk.pop();
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let mut keylog = match &args.keylog {
        Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    let cfg = EndpointConfig {
        group: args.group,
        passive: args.passive,
        ..EndpointConfig::new(args.local, args.overlay)
    };
    let mut ep = Endpoint::new(cfg, seed);
    let socket = UdpSocket::bind(SocketAddrV4::new(args.local, IKE_PORT))?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    ep.set_peer(
        Instant::now(),
        PeerConfig {
            addr: args.peer,
            overlay: args.peer_overlay,
            psk,
        },
    );
    let mut buf = vec![0u8; 65536];
    let mut next_state = Instant::now();
    loop {
        let now = Instant::now();
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        while let Some(t) = ep.poll_transmit() {
            socket.send_to(&t.payload, t.dst)?;
        }
        let mut child_up = false;
        let mut any = false;
        while let Some(e) = ep.poll_event() {
            any = true;
            child_up |= matches!(e, Event::ChildUp { .. });
            if let Some(k) = keylog.as_mut() {
                for line in keylog_lines(args.local, &e) {
                    writeln!(k, "{line}")?;
                }
            }
            writeln!(out, "event {e:?}")?;
        }
        if any || now >= next_state {
            if let Some(s) = ep.peer_state(args.peer) {
                writeln!(out, "state {s:?}")?;
            }
            next_state = now + Duration::from_secs(1);
        }
        out.flush()?;
        if child_up && args.exit_after_child {
            return Ok(());
        }
        let wait = ep
            .poll_timeout()
            .map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(next_state.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait))?;
        match socket.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) => ep.handle(Instant::now(), from, &buf[..n]),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("udp_peer: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp_peer: {e}");
            ExitCode::FAILURE
        }
    }
}
