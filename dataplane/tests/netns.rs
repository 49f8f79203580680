//! The overlay between two peers in network namespaces with a router between them
//! (netns-scripts/up.sh): TCP and UDP between overlay addresses, only protocol 51 on the wire,
//! a 1280-byte router link that the TUN MTU follows without fragments, and fault injection
//! (20 ms delay seen by ping, loss repaired by TCP retransmission).
//!
//! Needs root. Without root it fails under CI (CI=...) and prints a notice otherwise.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use confmesh_dataplane::{
    FaultConfig, Lifetime, Overlay, OverlayConfig, PeerAddrs, Protection, SaParams,
};

const PREFIX: &str = "cmdpn";
const TIMEOUT: Duration = Duration::from_secs(60);

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../netns-scripts")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The topology; removed on drop, also when the test fails.
struct Topology;

impl Topology {
    fn up() -> Self {
        let _ = Command::new("bash")
            .arg(scripts().join("down.sh"))
            .arg(PREFIX)
            .status();
        run(Command::new("bash")
            .arg(scripts().join("up.sh"))
            .args([PREFIX, "2"]));
        Topology
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts().join("down.sh"))
            .arg(PREFIX)
            .status();
    }
}

/// A capture on one router link; stopped (by PID) on drop.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(link: &str, file: &Path) -> Self {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{PREFIX}r"),
                "tcpdump",
                "-U",
                "-n",
                "-s",
                "128",
                "-i",
                link,
                "-w",
            ])
            .arg(file)
            .arg("ip")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        // tcpdump needs a moment to attach to the interface.
        std::thread::sleep(Duration::from_millis(700));
        Capture {
            child,
            file: file.to_owned(),
        }
    }

    /// Stops the capture and returns one line per packet: protocol, MF flag, fragment offset,
    /// ICMP type and code.
    fn finish(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let out = run(Command::new("tshark")
            .args([
                "-r",
                &self.file.to_string_lossy(),
                "-T",
                "fields",
                "-E",
                "occurrence=f",
            ])
            .args([
                "-e",
                "ip.proto",
                "-e",
                "ip.flags.mf",
                "-e",
                "ip.frag_offset",
                "-e",
                "icmp.type",
                "-e",
                "icmp.code",
            ]));
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets, TUN devices and
/// threads created there belong to that namespace.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a valid namespace descriptor; CLONE_NEWNET moves only the
            // calling thread, which this scoped thread owns until it ends.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

fn peer(i: u8) -> PeerAddrs {
    PeerAddrs {
        mgmt: Ipv4Addr::new(10, 96, 0, i),
        overlay: Ipv4Addr::new(10, 97, 0, i),
    }
}

fn key(from: u8, to: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ from.wrapping_mul(7) ^ to;
    }
    k
}

fn start(i: u8, other: u8) -> Overlay {
    in_ns(&format!("{PREFIX}p{i}"), || {
        let config = OverlayConfig {
            tun_name: "cmdp0".into(),
            local: peer(i),
            overlay_prefix_len: 24,
            mtu: 1500,
        };
        let (overlay, _events) = Overlay::start(config).expect("overlay");
        let (out_key, in_key) = (key(i, other), key(other, i));
        let p = |spi, key| SaParams {
            spi,
            protection: Protection::Ah,
            key,
            lifetime: Lifetime::default(),
        };
        let spi = |from: u8, to: u8| 0x7000_0000 | u32::from(from) << 8 | u32::from(to);
        overlay
            .install_sa_pair(
                peer(other),
                &p(spi(i, other), &out_key),
                &p(spi(other, i), &in_key),
            )
            .expect("SAs");
        overlay
    })
}

/// Sends `bytes` bytes over TCP from peer 1 to peer 2's overlay address; returns the bytes the
/// receiver counted and peer 1's TCP retransmissions during the transfer.
fn tcp_transfer(bytes: usize, port: u16) -> (usize, u64) {
    let listener = in_ns(&format!("{PREFIX}p2"), || {
        TcpListener::bind((peer(2).overlay, port)).expect("listen")
    });
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 0xc3), "payload corrupted");
                    total += n;
                }
                Err(e) => panic!("receiver: {e} after {total} bytes"),
            }
        }
        total
    });
    let before = retransmits("p1");
    in_ns(&format!("{PREFIX}p1"), || {
        let addr = SocketAddr::from((peer(2).overlay, port));
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        conn.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        let chunk = vec![0xc3u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            conn.write_all(&chunk[..n]).expect("send");
            left -= n;
        }
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        // Wait for the receiver to close, so that the transfer really completed.
        let _ = conn.set_read_timeout(Some(TIMEOUT));
        let _ = conn.read(&mut [0u8; 1]);
    });
    let received = server.join().expect("server");
    (received, retransmits("p1") - before)
}

/// TCP segments retransmitted so far in peer `p`'s namespace.
fn retransmits(p: &str) -> u64 {
    in_ns(&format!("{PREFIX}{p}"), || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().expect("names"), tcp.next().expect("values"));
        let i = names
            .split_whitespace()
            .position(|n| n == "RetransSegs")
            .expect("RetransSegs");
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .expect("value")
    })
}

fn ping_avg_ms() -> f64 {
    let out = run(Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{PREFIX}p1"),
            "ping",
            "-q",
            "-c",
            "8",
            "-i",
            "0.2",
            "-W",
            "2",
        ])
        .arg(peer(2).overlay.to_string()));
    let stats = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_else(|| panic!("no ping statistics: {out}"));
    let numbers = stats.split('=').nth(1).expect("values").trim();
    numbers
        .split('/')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad ping output: {stats}"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

#[test]
fn overlay_between_namespaces() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the netns overlay test needs root"
        );
        eprintln!("NOTICE: not root; skipping the netns overlay test");
        return;
    }
    let started = Instant::now();
    let _topology = Topology::up();
    let dir = std::env::temp_dir().join(format!("confmesh-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let o1 = start(1, 2);
    let o2 = start(2, 1);
    let (p1, p2) = (peer(1).mgmt, peer(2).mgmt);

    // 1. TCP and UDP between overlay addresses; the wire carries only AH.
    let wire = Capture::start("p2", &dir.join("clean.pcap"));
    let (received, _) = tcp_transfer(4 << 20, 5001);
    assert_eq!(received, 4 << 20);
    let udp_rx = in_ns(&format!("{PREFIX}p2"), || {
        UdpSocket::bind((peer(2).overlay, 5002)).expect("udp bind")
    });
    udp_rx
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // Read while sending: 100 datagrams would overflow the default receive buffer.
    let receiver = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_rx.recv_from(&mut buf) {
            assert_eq!(
                (n, from.ip()),
                (1000, std::net::IpAddr::V4(peer(1).overlay))
            );
            got += 1;
            if got == 100 {
                break;
            }
        }
        got
    });
    let udp_tx = in_ns(&format!("{PREFIX}p1"), || {
        UdpSocket::bind((peer(1).overlay, 0)).expect("udp bind")
    });
    for i in 0..100u8 {
        udp_tx
            .send_to(&[i; 1000], (peer(2).overlay, 5002))
            .expect("udp send");
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = receiver.join().expect("UDP receiver");
    assert_eq!(
        got,
        100,
        "UDP datagrams lost on a clean path: sender {:?} {:?} {:?}, receiver {:?} {:?} {:?}",
        o1.peer_report(p2),
        o1.global_counters(),
        o1.driver_counters(),
        o2.peer_report(p1),
        o2.global_counters(),
        o2.driver_counters()
    );
    let packets = wire.finish();
    assert!(packets.len() > 100, "capture saw {} packets", packets.len());
    assert!(
        packets.iter().all(|p| p.starts_with("51\t")),
        "non-AH on the wire: {:?}",
        packets.iter().find(|p| !p.starts_with("51\t"))
    );
    let c1 = o1.peer_report(p2).expect("peer 2").status.counters;
    assert!(c1.tx_packets > 1000 && c1.probes_sent >= 1, "{c1:?}");
    let c2 = o2.peer_report(p1).expect("peer 1").status.counters;
    assert_eq!(
        (c2.icv_failures, c2.malformed, c2.no_sa),
        (0, 0, 0),
        "{c2:?}"
    );
    assert_eq!(
        o1.global_counters().tun_malformed,
        0,
        "only IPv4 comes out of the TUN"
    );

    // 2. The router's link to peer 2 drops to 1280: bulk TCP still completes, the TUN MTU
    //    follows, and no fragment appears on the wire.
    run(Command::new("bash")
        .arg(scripts().join("path.sh"))
        .args([PREFIX, "2", "mtu", "1280"]));
    let to_p2 = Capture::start("p2", &dir.join("mtu-p2.pcap"));
    let to_p1 = Capture::start("p1", &dir.join("mtu-p1.pcap"));
    let (received, _) = tcp_transfer(8 << 20, 5003);
    assert_eq!(received, 8 << 20);
    assert_eq!(o1.path_mtu(p2), Some(1280));
    assert_eq!(
        usize::from(o1.tun_mtu()),
        Protection::Ah.max_inner_len(1280)
    );
    let link =
        run(Command::new("ip").args(["-n", &format!("{PREFIX}p1"), "link", "show", "cmdp0"]));
    let expected = format!(" mtu {} ", Protection::Ah.max_inner_len(1280));
    assert!(link.contains(&expected), "kernel's TUN MTU: {link}");
    for (link, packets) in [("p2", to_p2.finish()), ("p1", to_p1.finish())] {
        assert!(!packets.is_empty());
        for p in &packets {
            let f: Vec<&str> = p.split('\t').collect();
            assert!(
                f.get(1) == Some(&"0") && f.get(2) == Some(&"0"),
                "fragment on {link}: {p}"
            );
            // On peer 1's link the router's fragmentation-needed reports are legitimate.
            let frag_needed = f[0] == "1" && f.get(3) == Some(&"3") && f.get(4) == Some(&"4");
            assert!(
                f[0] == "51" || (link == "p1" && frag_needed),
                "unexpected packet on {link}: {p}"
            );
        }
    }
    // Sends the kernel refused between the router's report and the TUN MTU change are counted,
    // not fragmented (the captures above prove that).
    let c1 = o1.peer_report(p2).expect("peer 2").status.counters;
    assert!(c1.pmtu_updates >= 1, "{c1:?}");
    eprintln!(
        "MTU 1280: {} refused oversize sends, {} ICMP answers into the TUN",
        c1.fragmentation_attempts, c1.icmp_frag_needed
    );

    // 3. Injected 20 ms delay shows in ping.
    let base = ping_avg_ms();
    assert!(base < 10.0, "baseline RTT {base} ms");
    o1.set_faults(
        p2,
        FaultConfig {
            delay: Duration::from_millis(20),
            seed: 7,
            ..FaultConfig::default()
        },
    );
    let delayed = ping_avg_ms();
    assert!(
        (20.0..40.0).contains(&delayed),
        "RTT with 20 ms injected delay: {delayed} ms (baseline {base} ms)"
    );
    o1.set_faults(p2, FaultConfig::default());

    // 4. Injected loss: TCP retransmits and still completes.
    let seed = 0x1055;
    o1.set_faults(
        p2,
        FaultConfig {
            loss: 0.02,
            seed,
            ..FaultConfig::default()
        },
    );
    let (received, retrans) = tcp_transfer(2 << 20, 5004);
    let faults = o1.peer_report(p2).expect("peer 2").faults;
    o1.set_faults(p2, FaultConfig::default());
    assert_eq!(received, 2 << 20, "seed {seed}");
    assert!(faults.dropped > 0, "seed {seed}: {faults:?}");
    assert!(
        retrans > 0,
        "seed {seed}: no TCP retransmissions despite {} dropped packets",
        faults.dropped
    );
    eprintln!(
        "netns overlay test: {} packets dropped by injection, {retrans} retransmissions",
        faults.dropped
    );

    // 5. Duplication, reordering and jitter: the anti-replay window drops the duplicates,
    //    accepts the reordered packets, and TCP completes.
    let seed = 0xd0b1e;
    let replays_before = o2
        .peer_report(p1)
        .expect("peer 1")
        .status
        .counters
        .replay_drops;
    o1.set_faults(
        p2,
        FaultConfig {
            duplicate: 0.05,
            reorder: 0.05,
            jitter: Duration::from_micros(300),
            seed,
            ..FaultConfig::default()
        },
    );
    let (received, _) = tcp_transfer(2 << 20, 5005);
    let faults = o1.peer_report(p2).expect("peer 2").faults;
    o1.set_faults(p2, FaultConfig::default());
    assert_eq!(received, 2 << 20, "seed {seed}");
    assert!(
        faults.duplicated > 0 && faults.reordered > 0,
        "seed {seed}: {faults:?}"
    );
    let replays = o2
        .peer_report(p1)
        .expect("peer 1")
        .status
        .counters
        .replay_drops
        - replays_before;
    assert!(
        replays > 0 && replays <= faults.duplicated,
        "seed {seed}: {replays} replay drops for {faults:?}"
    );
    eprintln!("netns overlay test done in {:?}", started.elapsed());

    drop(o1);
    drop(o2);
    let _ = std::fs::remove_dir_all(&dir);
}
