//! An independent implementation agrees: scapy's `SecurityAssociation` (AH with SHA2-256-128 and
//! ESP with AES-GCM, tunnel mode) opens confmesh's packets and protects packets that confmesh
//! opens, with the same keys; tshark decodes the AH and ESP headers of confmesh's packets.
//!
//! Needs /usr/bin/python3 with scapy and tshark; installs python3-scapy / tshark with apt-get
//! when missing and running as root. Without them and without root it fails under CI (CI=...)
//! and prints a notice otherwise.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use confmesh_dataplane::{Action, Dataplane, Lifetime, PeerAddrs, Protection, SaParams};
use serde_json::{Value, json};

const AH_KEY: [u8; 32] = *b"confmesh-ah-interop-key-32-bytes";
const ESP_KEY: [u8; 36] = *b"confmesh-esp-gcm-interop-key+salt!!!";
const SPI_AB: u32 = 0x0c0f_0001;
const SPI_BA: u32 = 0x0c0f_0002;

fn addrs(i: u8) -> PeerAddrs {
    PeerAddrs {
        mgmt: Ipv4Addr::new(10, 96, 0, i),
        overlay: Ipv4Addr::new(10, 97, 0, i),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Makes sure `check` succeeds, installing `package` with apt-get if it does not. Returns false
/// (after a notice) when that is impossible outside CI; panics under CI.
fn ensure(check: &mut Command, package: &str) -> bool {
    if check.output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    if is_root() {
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if ok && check.output().is_ok_and(|o| o.status.success()) {
            return true;
        }
    }
    let msg = format!("{package} is missing and could not be installed (needs root and apt-get)");
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    eprintln!("NOTICE: skipping scapy interop: {msg}");
    false
}

/// A UDP-in-IPv4 inner packet with a recognisable payload.
fn inner(src: Ipv4Addr, dst: Ipv4Addr, size: usize, tag: u8) -> Vec<u8> {
    let mut p = vec![tag; size];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    p[4..6].copy_from_slice(&u16::from(tag).to_be_bytes());
    p[6] = 0x40;
    p[7] = 0;
    p[8] = 64;
    p[9] = 17;
    p[10..12].fill(0);
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    // UDP header: ports, length, zero checksum (allowed for IPv4).
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4001u16.to_be_bytes());
    p[24..26].copy_from_slice(&((size - 20) as u16).to_be_bytes());
    p[26..28].fill(0);
    p
}

/// Peer 1 (`a`, sends on `SPI_AB`) and peer 2's view is scapy's.
struct Pair {
    a: Dataplane,
}

fn pair(protection: Protection, now: Instant) -> Pair {
    let key: &[u8] = match protection {
        Protection::Ah => &AH_KEY,
        Protection::EspGcm => &ESP_KEY,
    };
    let p = |spi| SaParams {
        spi,
        protection,
        key,
        lifetime: Lifetime::default(),
    };
    let mut a = Dataplane::new(addrs(1), 1500).expect("a");
    a.install_sa_pair(now, addrs(2), &p(SPI_AB), &p(SPI_BA))
        .expect("a");
    Pair { a }
}

#[test]
fn scapy_and_tshark_agree_with_confmesh() {
    if !ensure(
        Command::new("/usr/bin/python3").args(["-c", "import scapy.layers.ipsec"]),
        "python3-scapy",
    ) {
        return;
    }
    if !ensure(Command::new("tshark").arg("--version"), "tshark") {
        return;
    }
    let now = Instant::now();
    let sizes = [28usize, 333, 1400];
    let mut from_confmesh = Vec::new();
    let mut expected_opened = Vec::new();
    let mut to_confmesh = Vec::new();
    for (proto, protection) in [("ah", Protection::Ah), ("esp", Protection::EspGcm)] {
        let mut sender = pair(protection, now).a;
        for (i, &size) in sizes.iter().enumerate() {
            let packet = inner(addrs(1).overlay, addrs(2).overlay, size, i as u8 + 1);
            let mut out = vec![0u8; 2048];
            let Action::WriteToNetwork { len, .. } =
                sender.handle_tun_packet(now, &packet, &mut out)
            else {
                panic!("{proto}: confmesh did not protect the packet")
            };
            from_confmesh.push(json!({"proto": proto, "hex": hex(&out[..len])}));
            expected_opened.push(hex(&packet));
            to_confmesh.push((
                protection,
                inner(addrs(2).overlay, addrs(1).overlay, size, 0x80 + i as u8),
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("confmesh-scapy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pcap: PathBuf = dir.join("confmesh.pcap");
    let request = json!({
        "ah_key": hex(&AH_KEY),
        "esp_key": hex(&ESP_KEY),
        "a": {"mgmt": addrs(1).mgmt.to_string(), "overlay": addrs(1).overlay.to_string()},
        "b": {"mgmt": addrs(2).mgmt.to_string(), "overlay": addrs(2).overlay.to_string()},
        "spi_ab": SPI_AB,
        "spi_ba": SPI_BA,
        "pcap": pcap.to_string_lossy(),
        "from_confmesh": from_confmesh,
        "to_confmesh": to_confmesh.iter().enumerate().map(|(i, (p, inner))| json!({
            "proto": if *p == Protection::Ah { "ah" } else { "esp" },
            "inner_hex": hex(inner),
            "seq": i % sizes.len() + 1,
        })).collect::<Vec<_>>(),
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scapy_interop.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scapy");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write request");
    let output = child.wait_with_output().expect("scapy output");
    assert!(
        output.status.success(),
        "scapy refused confmesh's packets: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply: Value = serde_json::from_slice(&output.stdout).expect("scapy JSON");

    // 1. scapy verified (AH ICV / GCM tag) and opened every confmesh packet to the same inner.
    let opened: Vec<String> = reply["opened"]
        .as_array()
        .expect("opened")
        .iter()
        .map(|v| v.as_str().expect("hex").to_owned())
        .collect();
    assert_eq!(opened, expected_opened);

    // 2. confmesh verifies and opens every scapy packet.
    let sealed = reply["sealed"].as_array().expect("sealed");
    assert_eq!(sealed.len(), to_confmesh.len());
    let mut receivers = [pair(Protection::Ah, now).a, pair(Protection::EspGcm, now).a];
    for (item, (protection, expected)) in sealed.iter().zip(&to_confmesh) {
        let wire = unhex(item["hex"].as_str().expect("hex"));
        let rx = &mut receivers[usize::from(*protection == Protection::EspGcm)];
        let mut out = vec![0u8; 2048];
        let action = rx.handle_network_packet(now, &wire, &mut out);
        let Action::WriteToTun { len } = action else {
            panic!("{protection:?}: confmesh refused scapy's packet: {action:?}")
        };
        assert_eq!(&out[..len], &expected[..], "{protection:?}");
    }
    // And a scapy packet with one flipped payload bit is refused.
    let mut tampered = unhex(sealed[0]["hex"].as_str().expect("hex"));
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let mut fresh = pair(Protection::Ah, now).a;
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        fresh.handle_network_packet(now, &tampered, &mut out),
        Action::Err(_)
    ));

    // 3. tshark decodes the headers of confmesh's packets.
    let fields = Command::new("tshark")
        .args([
            "-r",
            &pcap.to_string_lossy(),
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-E",
            "occurrence=f",
        ])
        .args([
            "-e",
            "ip.proto",
            "-e",
            "ah.spi",
            "-e",
            "ah.sequence",
            "-e",
            "ah.next_header",
            "-e",
            "esp.spi",
            "-e",
            "esp.sequence",
        ])
        .output()
        .expect("tshark");
    assert!(
        fields.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&fields.stderr)
    );
    let text = String::from_utf8_lossy(&fields.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 * sizes.len(), "{text}");
    for (i, line) in lines.iter().enumerate() {
        let seq = i % sizes.len() + 1;
        let expected = if i < sizes.len() {
            format!("51,{SPI_AB:#010x},{seq},4,,")
        } else {
            format!("50,,,,{SPI_AB:#010x},{seq}")
        };
        assert_eq!(*line, expected, "tshark line {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
