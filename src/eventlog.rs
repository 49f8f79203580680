//! The per-peer event and configuration logs (SPEC.md §2 rule 9), and remote syslog.
//!
//! Each log is a file of JSON lines under `<state_dir>/log/`, appended and flushed to disk per
//! entry so that what the operator saw survives a crash, and rotated by size so that it cannot fill
//! the disk. Every entry is also sent to the configured syslog collectors as RFC 5424. Callers
//! must never pass secrets: entries are operator-facing text.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{SyslogTarget, SyslogTransport};

/// Size at which a log file is rotated.
pub const ROTATE_BYTES: u64 = 1 << 20;
/// Rotated files kept (`events.log.1` … `.N`).
pub const KEEP_ROTATED: usize = 4;

/// Which of the two logs an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// Cluster and service events: peers, SAs, alarms.
    Events,
    /// Configuration changes made on this peer.
    Config,
}

impl LogKind {
    fn file_name(self) -> &'static str {
        match self {
            LogKind::Events => "events.log",
            LogKind::Config => "config.log",
        }
    }
}

/// Severity, mapped to the RFC 5424 severity of the syslog copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something is broken (RFC 5424 severity 3).
    Error,
    /// An alarm or a refused peer (4).
    Warning,
    /// Normal but significant (5).
    Notice,
    /// Informational (6).
    Info,
}

impl Severity {
    fn code(self) -> u8 {
        match self {
            Severity::Error => 3,
            Severity::Warning => 4,
            Severity::Notice => 5,
            Severity::Info => 6,
        }
    }
}

/// One log entry as stored and as printed by `confmesh log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Wall clock, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Severity.
    pub severity: Severity,
    /// What happened.
    pub message: String,
}

impl Entry {
    /// The entry as one human-readable line (RFC 3339 UTC time, severity, message).
    pub fn to_line(&self) -> String {
        format!(
            "{} {:<7} {}",
            rfc3339(self.ts_ms),
            format!("{:?}", self.severity).to_lowercase(),
            self.message
        )
    }
}

/// The logs of this peer plus its syslog forwarding.
#[derive(Debug)]
pub struct Logs {
    dir: PathBuf,
    events: File,
    config: File,
    hostname: String,
    syslog: Vec<SyslogTarget>,
    udp: Option<UdpSocket>,
    /// Messages for TCP collectors, sent by a thread of their own so that a dead collector never
    /// stalls the caller (the daemon's state loop); full means dropped.
    tcp: Option<std::sync::mpsc::SyncSender<(SocketAddr, String)>>,
}

/// Syslog messages waiting for TCP collectors, at most.
const TCP_QUEUE: usize = 256;

impl Logs {
    /// Opens (creating) the logs under `<state_dir>/log`.
    pub fn open(state_dir: &Path, hostname: &str, syslog: Vec<SyslogTarget>) -> io::Result<Logs> {
        let dir = state_dir.join("log");
        fs::create_dir_all(&dir)?;
        let udp = if syslog.iter().any(|t| t.transport == SyslogTransport::Udp) {
            Some(UdpSocket::bind("0.0.0.0:0")?)
        } else {
            None
        };
        let tcp = if syslog.iter().any(|t| t.transport == SyslogTransport::Tcp) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(SocketAddr, String)>(TCP_QUEUE);
            std::thread::Builder::new()
                .name("syslog-tcp".into())
                .spawn(move || {
                    for (addr, msg) in rx {
                        if let Err(e) = send_tcp(addr, &msg) {
                            tracing::debug!(collector = %addr, "syslog send failed: {e}");
                        }
                    }
                })?;
            Some(tx)
        } else {
            None
        };
        Ok(Logs {
            events: open_append(&dir.join(LogKind::Events.file_name()))?,
            config: open_append(&dir.join(LogKind::Config.file_name()))?,
            dir,
            hostname: hostname.to_owned(),
            syslog,
            udp,
            tcp,
        })
    }

    /// Appends an entry durably, rotates if needed, and copies it to syslog. A failing log disk is
    /// reported through `tracing` but never stops the daemon.
    pub fn append(&mut self, kind: LogKind, severity: Severity, message: impl Into<String>) {
        let entry = Entry {
            ts_ms: wall_ms(),
            severity,
            message: message.into(),
        };
        if let Err(e) = self.write(kind, &entry) {
            tracing::error!(log = kind.file_name(), "cannot write log entry: {e}");
        }
        self.forward(kind, &entry);
    }

    fn write(&mut self, kind: LogKind, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let file = match kind {
            LogKind::Events => &mut self.events,
            LogKind::Config => &mut self.config,
        };
        file.write_all(&line)?;
        file.sync_data()?;
        if file.metadata()?.len() >= ROTATE_BYTES {
            let path = self.dir.join(kind.file_name());
            for i in (1..KEEP_ROTATED).rev() {
                let from = rotated(&path, i);
                if from.exists() {
                    fs::rename(&from, rotated(&path, i + 1))?;
                }
            }
            fs::rename(&path, rotated(&path, 1))?;
            *file = open_append(&path)?;
        }
        Ok(())
    }

    fn forward(&mut self, kind: LogKind, entry: &Entry) {
        if self.syslog.is_empty() {
            return;
        }
        // RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG,
        // facility local0 (16).
        let pri = 16 * 8 + entry.severity.code();
        let msgid = match kind {
            LogKind::Events => "event",
            LogKind::Config => "config",
        };
        let msg = format!(
            "<{pri}>1 {} {} confmesh {} {msgid} - {}",
            rfc3339(entry.ts_ms),
            self.hostname,
            std::process::id(),
            entry.message
        );
        for target in &self.syslog {
            let sent = match target.transport {
                SyslogTransport::Udp => self
                    .udp
                    .as_ref()
                    .map_or(Ok(()), |s| s.send_to(msg.as_bytes(), target.addr).map(drop)),
                SyslogTransport::Tcp => self.tcp.as_ref().map_or(Ok(()), |q| {
                    q.try_send((target.addr, msg.clone()))
                        .map_err(|_| io::Error::other("TCP syslog queue full; message dropped"))
                }),
            };
            if let Err(e) = sent {
                tracing::debug!(collector = %target.addr, "syslog send failed: {e}");
            }
        }
    }

    /// Every stored entry of a log, oldest first, rotated files included.
    pub fn read(&self, kind: LogKind) -> io::Result<Vec<Entry>> {
        let path = self.dir.join(kind.file_name());
        let mut out = Vec::new();
        let mut files: Vec<PathBuf> = (1..=KEEP_ROTATED)
            .rev()
            .map(|i| rotated(&path, i))
            .collect();
        files.push(path);
        for file in files.iter().filter(|f| f.exists()) {
            for line in BufReader::new(File::open(file)?).lines() {
                // A torn last line after a crash is skipped rather than failing the whole read.
                if let Ok(entry) = serde_json::from_str::<Entry>(&line?) {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }
}

/// RFC 6587 octet-counted framing over a short-lived connection: logs are rare, so a connection per
/// message keeps the daemon free of reconnect state, and the timeout bounds a dead collector.
fn send_tcp(addr: SocketAddr, msg: &str) -> io::Result<()> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_write_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("{} {msg}", msg.len()).as_bytes())
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

/// The wall clock in ms since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Formats ms since the epoch as RFC 3339 UTC with milliseconds (civil-from-days, no time crate).
pub fn rfc3339(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ts_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40.000Z");
    }

    #[test]
    fn entries_survive_reopen_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut logs = Logs::open(dir.path(), "h1", vec![]).unwrap();
        let big = "x".repeat(4096);
        let n = (ROTATE_BYTES as usize / 4096) + 10;
        for i in 0..n {
            logs.append(LogKind::Events, Severity::Info, format!("{i} {big}"));
        }
        logs.append(LogKind::Config, Severity::Notice, "peers add 10.96.0.3");
        drop(logs);
        let logs = Logs::open(dir.path(), "h1", vec![]).unwrap();
        let events = logs.read(LogKind::Events).unwrap();
        assert_eq!(events.len(), n);
        assert!(events[0].message.starts_with("0 "));
        assert!(dir.path().join("log/events.log.1").exists());
        assert_eq!(
            logs.read(LogKind::Config).unwrap()[0].message,
            "peers add 10.96.0.3"
        );
    }

    #[test]
    fn syslog_udp_is_rfc5424() {
        let dir = tempfile::tempdir().unwrap();
        let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
        collector
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let target = SyslogTarget {
            transport: SyslogTransport::Udp,
            addr: collector.local_addr().unwrap(),
        };
        let mut logs = Logs::open(dir.path(), "conductor1", vec![target]).unwrap();
        logs.append(LogKind::Events, Severity::Warning, "alarm raised: latency");
        let mut buf = [0u8; 512];
        let n = collector.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(msg.starts_with("<132>1 "), "{msg}");
        assert!(
            msg.contains(" conductor1 confmesh ") && msg.ends_with("event - alarm raised: latency"),
            "{msg}"
        );
    }

    #[test]
    fn syslog_tcp_is_octet_counted_and_sent_off_the_caller() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = SyslogTarget {
            transport: SyslogTransport::Tcp,
            addr: collector.local_addr().unwrap(),
        };
        let mut logs = Logs::open(dir.path(), "conductor2", vec![target]).unwrap();
        logs.append(LogKind::Config, Severity::Notice, "peers remove 10.96.0.3");
        let (mut conn, _) = collector.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        let (len, msg) = got.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len(), "{got}");
        assert!(
            msg.starts_with("<133>1 ") && msg.ends_with("config - peers remove 10.96.0.3"),
            "{msg}"
        );
    }
}
