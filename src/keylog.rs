//! The key log of SPEC.md §7 (`confmesh run --keylog FILE`): one line per SA as it is created, so
//! that Wireshark/tshark and independent test code can decrypt phase 1 and verify AH/ESP.
//!
//! Off by default. The file is opened for appending with mode 0600 and every line is flushed at
//! once, so a crash loses nothing that was already negotiated.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use confmesh_ike::Protection;

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An open key log.
#[derive(Debug)]
pub struct KeyLog {
    file: File,
}

impl KeyLog {
    /// Opens (or creates, owner-only) the key log for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self { file })
    }

    /// Records a phase-1 SA: its cookies and AES-256-CBC key.
    pub fn ike(&mut self, icookie: &[u8; 8], rcookie: &[u8; 8], key: &[u8]) -> io::Result<()> {
        let line = format!(
            "IKEV1 icookie={} rcookie={} enc=aes256-cbc key={}\n",
            hex(icookie),
            hex(rcookie),
            hex(key)
        );
        self.file.write_all(line.as_bytes())
    }

    /// Records one direction of a child SA; `src`/`dst` are the outer addresses it protects.
    pub fn child(
        &mut self,
        protection: Protection,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        spi: u32,
        key: &[u8],
    ) -> io::Result<()> {
        let line = match protection {
            Protection::Ah => format!(
                "AH src={src} dst={dst} spi={spi:08x} auth=hmac-sha2-256-128 key={}\n",
                hex(key)
            ),
            Protection::EspGcm => format!(
                "ESP src={src} dst={dst} spi={spi:08x} enc=aes256-gcm16 key={}\n",
                hex(key)
            ),
        };
        self.file.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_spec_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mut k = KeyLog::open(&path).unwrap();
        k.ike(&[1; 8], &[0xab; 8], &[0x11; 32]).unwrap();
        k.child(
            Protection::Ah,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            0x1234,
            &[0x22; 32],
        )
        .unwrap();
        k.child(
            Protection::EspGcm,
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
            0xdeadbeef,
            &[0x33; 36],
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "IKEV1 icookie=0101010101010101 rcookie=abababababababab enc=aes256-cbc key={}",
                "11".repeat(32)
            )
        );
        assert_eq!(
            lines[1],
            format!(
                "AH src=10.0.0.1 dst=10.0.0.2 spi=00001234 auth=hmac-sha2-256-128 key={}",
                "22".repeat(32)
            )
        );
        assert_eq!(
            lines[2],
            format!(
                "ESP src=10.0.0.2 dst=10.0.0.1 spi=deadbeef enc=aes256-gcm16 key={}",
                "33".repeat(36)
            )
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
