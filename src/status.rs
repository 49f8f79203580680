//! The status document of SPEC.md §7 (`confmesh status --json`, `GET /api/v1/status`) and its
//! table form for `confmesh status`.
//!
//! The field names are a stable interface: operators' scripts and tests read them.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The whole status of one peer as it sees the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This peer's host name.
    pub hostname: String,
    /// Software version this peer reports.
    pub version: String,
    /// `cluster` or `standalone`.
    pub mode: String,
    /// Every peer of the list, this one included as `this-system`.
    pub peers: Vec<PeerStatus>,
    /// Raised alarms.
    pub alarms: Vec<AlarmStatus>,
    /// Conferences known to this peer and where they are hosted.
    #[serde(default)]
    pub conferences: Vec<ConferenceStatus>,
    /// The replicated store: per-peer lag, queue depth, bytes and entries, last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<serde_json::Value>,
    /// Bandwidth in use per location and bridge, this peer's and the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<serde_json::Value>,
}

/// One peer in [`Status::peers`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Management address.
    pub addr: Ipv4Addr,
    /// Host name (learnt from the peer; `None` until it has spoken).
    pub hostname: Option<String>,
    /// Address inside the overlay.
    pub overlay_addr: Ipv4Addr,
    /// `this-system`, `active` or `not-active`.
    pub state: String,
    /// Why not active (SPEC.md §7 reason names), else `None`.
    pub reason: Option<String>,
    /// A sentence with the details of the reason.
    #[serde(default)]
    pub detail: Option<String>,
    /// Round-trip time, ms.
    pub rtt_ms: Option<f64>,
    /// Peer clock minus ours, ms.
    pub clock_skew_ms: Option<f64>,
    /// Path MTU towards the peer.
    pub path_mtu: Option<u16>,
    /// IKE state: `connecting`, `established`, `authentication-failed`, or `null` for this system.
    pub ike: Option<String>,
    /// Number of IPsec SAs with the peer (both directions).
    pub sas: u32,
}

/// One raised alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmStatus {
    /// `clock-skew`, `latency` or `path-mtu`.
    pub kind: String,
    /// The peer it concerns.
    pub peer: Ipv4Addr,
    /// When it was raised (RFC 3339 UTC).
    pub raised_at: String,
    /// What was measured.
    pub detail: String,
}

/// One conference in [`Status::conferences`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConferenceStatus {
    /// Conference name.
    pub name: String,
    /// Bridge that hosts it.
    pub bridge: String,
    /// Calls in it, cluster-wide.
    pub calls: u32,
}

impl PeerStatus {
    /// The deployment guide's wording: `This system`, `Active as <hostname>`, `Not active: <reason>`.
    pub fn describe(&self) -> String {
        match self.state.as_str() {
            "this-system" => "This system".to_owned(),
            "active" => format!("Active as {}", self.hostname.as_deref().unwrap_or("?")),
            _ => format!(
                "Not active: {}",
                self.detail
                    .as_deref()
                    .or(self.reason.as_deref())
                    .unwrap_or("unknown")
            ),
        }
    }
}

impl Status {
    /// The table `confmesh status` prints.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} — confmesh {} — {}",
            self.hostname, self.version, self.mode
        );
        let _ = writeln!(
            out,
            "{:<15} {:<15} {:>8} {:>9} {:>5}  {:<26} STATUS",
            "PEER", "OVERLAY", "RTT", "SKEW", "PMTU", "IKE (SAs)"
        );
        for p in &self.peers {
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}ms"));
            let _ = writeln!(
                out,
                "{:<15} {:<15} {:>8} {:>9} {:>5}  {:<26} {}",
                p.addr,
                p.overlay_addr,
                ms(p.rtt_ms),
                ms(p.clock_skew_ms),
                p.path_mtu.map_or("-".to_owned(), |m| m.to_string()),
                p.ike
                    .as_deref()
                    .map_or("-".to_owned(), |i| format!("{i} ({})", p.sas)),
                p.describe()
            );
        }
        if self.alarms.is_empty() {
            let _ = writeln!(out, "alarms: none");
        } else {
            for a in &self.alarms {
                let _ = writeln!(
                    out,
                    "alarm: {} with {} since {}: {}",
                    a.kind, a.peer, a.raised_at, a.detail
                );
            }
        }
        for c in &self.conferences {
            let _ = writeln!(
                out,
                "conference {} on bridge {}: {} calls",
                c.name, c.bridge, c.calls
            );
        }
        out
    }
}
