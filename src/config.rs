//! The configuration file of SPEC.md §7, parsed and validated as one step.
//!
//! A [`Config`] only exists once every field has been checked, so the daemon can never start
//! half-configured. Every refusal is a [`ConfigError`] that names the offending field (in the dotted
//! form an operator sees in the file, e.g. `cluster.peers`) and says how to fix it.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest cluster the product supports (SPEC.md §2 rule 2).
pub const MAX_PEERS: usize = 3;

/// The overlay prefix, 198.18.0.0/15 (RFC 2544 benchmarking space, never routed on the Internet).
/// A peer's default overlay address keeps the low 17 bits of its management address.
pub const OVERLAY_PREFIX: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Prefix length of [`OVERLAY_PREFIX`].
pub const OVERLAY_PREFIX_LEN: u8 = 15;

/// Smallest cluster-interface MTU accepted: IPv4's guaranteed reassembly size. Synchronisation
/// traffic is framed to the path MTU, so anything smaller cannot carry a useful segment.
pub const MIN_MTU: u16 = 576;
/// Largest cluster-interface MTU accepted (jumbo frames).
pub const MAX_MTU: u16 = 9216;

/// A refusal of the configuration: which field, what is wrong, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field in the file, e.g. `peer.mgmt_addr`; empty for the file as a whole.
    pub field: String,
    /// What is wrong and how to fix it, in one sentence an operator can act on.
    pub message: String,
}

impl ConfigError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "configuration refused: {}", self.message)
        } else {
            write!(
                f,
                "configuration refused: `{}`: {}",
                self.field, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// The licence of a peer (SPEC.md §2 rule 2); it caps the cluster size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Licence {
    /// Up to three peers, all full.
    Full,
    /// Up to two peers, all select.
    Select,
    /// No release key: clustering is refused.
    Essentials,
}

impl Licence {
    /// How many peers (this one included) a cluster of this licence may hold.
    pub fn max_peers(self) -> usize {
        match self {
            Licence::Full => 3,
            Licence::Select => 2,
            Licence::Essentials => 1,
        }
    }

    /// The name used in the configuration file and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Licence::Full => "full",
            Licence::Select => "select",
            Licence::Essentials => "essentials",
        }
    }
}

/// How synchronisation traffic between peers is protected (SPEC.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum Protection {
    /// AH with HMAC-SHA2-256-128: integrity and anti-replay, no confidentiality (the guide's choice).
    #[serde(rename = "ah")]
    Ah,
    /// ESP with AES-256-GCM-16, for deployments that want confidentiality too.
    #[serde(rename = "esp-gcm")]
    EspGcm,
}

/// A remote syslog destination (RFC 5424 over UDP or TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyslogTarget {
    /// Transport to the collector.
    pub transport: SyslogTransport,
    /// Collector address.
    pub addr: SocketAddr,
}

/// Transport of a [`SyslogTarget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogTransport {
    /// RFC 5426, one message per datagram.
    Udp,
    /// RFC 6587 octet-counted framing.
    Tcp,
}

/// The validated configuration of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Peer-specific settings (never replicated).
    pub peer: PeerSettings,
    /// Admin HTTP API settings.
    pub admin: AdminSettings,
    /// Cluster membership; `None` when the peer is standalone.
    pub cluster: Option<ClusterSettings>,
}

/// Peer-specific settings, SPEC.md §2 rule 8: these stay on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSettings {
    /// Host name, shown to the other peers as `Active as <hostname>`.
    pub hostname: String,
    /// DNS domain.
    pub domain: Option<String>,
    /// Serial that identifies this peer in backup names and restores.
    pub serial: String,
    /// Management address: IKE, AH, UDP 1719 and admin API.
    pub mgmt_addr: Ipv4Addr,
    /// Addresses where the VCS sends SIP.
    pub rendezvous_addrs: Vec<Ipv4Addr>,
    /// Where durable state lives.
    pub state_dir: PathBuf,
    /// Cluster interface MTU.
    pub mtu: u16,
    /// Remote syslog collectors.
    pub syslog: Vec<SyslogTarget>,
    /// This peer's address inside the overlay.
    pub overlay_addr: Ipv4Addr,
    /// Unix socket the CLI talks to.
    pub control_socket: PathBuf,
    /// Tasks the SIP calls are spread over by Call-ID (0: one per CPU); see
    /// [`crate::b2bua::B2buaSettings::shards`] for when more than one pays.
    pub sip_shards: usize,
}

/// Admin API settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where the admin HTTP API listens.
    pub listen: SocketAddr,
    /// The TLS identity, loaded and checked; plain HTTP when absent.
    pub tls: Option<AdminTls>,
}

/// The admin API's TLS identity from `[admin] tls_cert_file` and `tls_key_file`, read and checked
/// when the configuration is loaded (certificate chain present, key readable and matching the
/// certificate), so a daemon never starts serving plain HTTP, or nothing, because of a bad file.
///
/// `Debug` shows the paths only; the key stays inside the rustls configuration.
#[derive(Clone)]
pub struct AdminTls {
    /// PEM file with the server certificate, then any intermediate certificates.
    pub cert_file: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server: std::sync::Arc<rustls::ServerConfig>,
}

impl AdminTls {
    /// Reads and checks the two files and builds the server configuration (ring provider, TLS 1.2
    /// and 1.3, ALPN `http/1.1`). A refusal names the field at fault and what to do.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<AdminTls, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let cert_field = "admin.tls_cert_file";
        let key_field = "admin.tls_key_file";
        let pem = std::fs::read(cert_file).map_err(|e| {
            ConfigError::new(
                cert_field,
                format!(
                    "cannot read {}: {e}; point it at a readable PEM certificate file",
                    cert_file.display()
                ),
            )
        })?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                ConfigError::new(
                    cert_field,
                    format!(
                        "{} is not valid PEM ({e}); give the certificate in PEM form",
                        cert_file.display()
                    ),
                )
            })?;
        if chain.is_empty() {
            return Err(ConfigError::new(
                cert_field,
                format!(
                    "{} holds no \"BEGIN CERTIFICATE\" block; give the server certificate (then any intermediates) in PEM form",
                    cert_file.display()
                ),
            ));
        }
        let key_pem = zeroize::Zeroizing::new(std::fs::read(key_file).map_err(|e| {
            ConfigError::new(
                key_field,
                format!(
                    "cannot read {}: {e}; point it at a PEM private key readable by the daemon",
                    key_file.display()
                ),
            )
        })?);
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            ConfigError::new(
                key_field,
                format!("{} holds no usable PEM private key ({e}); give the certificate's key as PKCS#8, PKCS#1 or SEC1 PEM", key_file.display()),
            )
        })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        // with_single_cert loads the key with the provider and checks it against the certificate.
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(cert_field, format!("TLS is unavailable in this build: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => ConfigError::new(
                    key_field,
                    format!(
                        "{} does not match the certificate in {}; use the key the certificate was issued for",
                        key_file.display(),
                        cert_file.display()
                    ),
                ),
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => ConfigError::new(
                    cert_field,
                    format!("{} is not a usable X.509 certificate ({e}); give the server certificate first, in PEM form", cert_file.display()),
                ),
                _ => ConfigError::new(
                    key_field,
                    format!("{} is not a usable private key ({e}); use an RSA, ECDSA (P-256/P-384) or Ed25519 key", key_file.display()),
                ),
            })?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(AdminTls {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            chain,
            server: std::sync::Arc::new(server),
        })
    }

    /// The rustls server configuration to accept connections with.
    pub fn server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        self.server.clone()
    }
}

impl fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// Two identities are equal when they come from the same files and carry the same certificates.
impl PartialEq for AdminTls {
    fn eq(&self, other: &Self) -> bool {
        self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.chain == other.chain
    }
}

impl Eq for AdminTls {}

/// Cluster membership of a clustered peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Management addresses of every peer, this one included, sorted (order does not matter).
    pub peers: Vec<Ipv4Addr>,
    /// File holding the pre-shared key.
    pub psk_file: PathBuf,
    /// This peer's licence.
    pub licence: Licence,
    /// Protection of synchronisation traffic.
    pub protection: Protection,
}

impl ClusterSettings {
    /// The other peers' management addresses.
    pub fn others(&self, me: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.peers.iter().copied().filter(move |&p| p != me)
    }
}

/// The default overlay address of a peer: [`OVERLAY_PREFIX`] with the low 17 bits of `mgmt`.
pub fn default_overlay_addr(mgmt: Ipv4Addr) -> Ipv4Addr {
    let host_mask = (1u32 << (32 - OVERLAY_PREFIX_LEN)) - 1;
    Ipv4Addr::from(u32::from(OVERLAY_PREFIX) | (u32::from(mgmt) & host_mask))
}

/// Whether `addr` lies inside the overlay prefix.
pub fn in_overlay(addr: Ipv4Addr) -> bool {
    let net_mask = !((1u32 << (32 - OVERLAY_PREFIX_LEN)) - 1);
    u32::from(addr) & net_mask == u32::from(OVERLAY_PREFIX)
}

// ---- the file as written, before validation -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    peer: Option<RawPeer>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    cluster: RawCluster,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    hostname: Option<String>,
    domain: Option<String>,
    serial: Option<String>,
    mgmt_addr: Option<String>,
    #[serde(default)]
    rendezvous_addrs: Vec<String>,
    state_dir: Option<PathBuf>,
    mtu: Option<i64>,
    #[serde(default)]
    syslog: Vec<String>,
    overlay_addr: Option<String>,
    control_socket: Option<PathBuf>,
    sip_shards: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    peers: Vec<String>,
    psk_file: Option<PathBuf>,
    licence: Option<Licence>,
    protection: Option<Protection>,
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "",
                format!(
                    "cannot read {}: {e}; pass an existing file with --config",
                    path.display()
                ),
            )
        })?;
        Config::parse(&text, machine_serial)
    }

    /// Validates configuration text. `default_serial` supplies the serial when the file has none
    /// (from the machine id in production; a fixed value in tests).
    pub fn parse(
        text: &str,
        default_serial: impl FnOnce() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, e))?;
        let Some(peer) = raw.peer else {
            return Err(ConfigError::new(
                "peer",
                "the [peer] table is missing; add it with at least hostname and mgmt_addr",
            ));
        };
        let peer = validate_peer(peer, default_serial)?;
        let admin = validate_admin(raw.admin, &peer)?;
        let cluster = validate_cluster(raw.cluster, &peer)?;
        Ok(Config {
            peer,
            admin,
            cluster,
        })
    }
}

fn toml_error(text: &str, e: toml::de::Error) -> ConfigError {
    let field = e
        .span()
        .map(|span| field_at(text, span.start))
        .unwrap_or_default();
    ConfigError {
        field,
        message: format!("{}; check it against SPEC.md §7", e.message().trim_end()),
    }
}

/// The dotted name (`table.key`) of the key written on the line that holds byte `offset`.
fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"');
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match table {
        Some(t) if !key.is_empty() && !key.starts_with('[') => format!("{t}.{key}"),
        _ => key.to_owned(),
    }
}

fn parse_ipv4(field: &str, text: &str) -> Result<Ipv4Addr, ConfigError> {
    let addr: Ipv4Addr = text.parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("{text:?} is not an IPv4 address; write it as a.b.c.d"),
        )
    })?;
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return Err(ConfigError::new(
            field,
            format!(
                "{addr} cannot be a peer address; use this host's unicast address on the cluster network"
            ),
        ));
    }
    Ok(addr)
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn validate_peer(
    raw: RawPeer,
    default_serial: impl FnOnce() -> Option<String>,
) -> Result<PeerSettings, ConfigError> {
    let hostname = raw.hostname.ok_or_else(|| {
        ConfigError::new(
            "peer.hostname",
            "missing; set the host name shown to the other peers",
        )
    })?;
    if !valid_label(&hostname) {
        return Err(ConfigError::new(
            "peer.hostname",
            format!(
                "{hostname:?} is not a valid host name; use 1-63 letters, digits and inner hyphens"
            ),
        ));
    }
    if let Some(domain) = &raw.domain {
        if domain.len() > 253 || !domain.split('.').all(valid_label) {
            return Err(ConfigError::new(
                "peer.domain",
                format!("{domain:?} is not a valid DNS domain, e.g. example.com"),
            ));
        }
    }
    let serial = match raw.serial {
        Some(s) => s,
        None => default_serial().ok_or_else(|| {
            ConfigError::new(
                "peer.serial",
                "missing and /etc/machine-id is unreadable; set serial = \"...\" explicitly",
            )
        })?,
    };
    if serial.is_empty()
        || serial.len() > 64
        || !serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ConfigError::new(
            "peer.serial",
            format!(
                "{serial:?} is not usable in backup file names; use 1-64 letters, digits or hyphens"
            ),
        ));
    }
    let mgmt_text = raw.mgmt_addr.ok_or_else(|| {
        ConfigError::new(
            "peer.mgmt_addr",
            "missing; set this host's IPv4 address on the cluster network",
        )
    })?;
    let mgmt_addr = parse_ipv4("peer.mgmt_addr", &mgmt_text)?;
    if raw.rendezvous_addrs.is_empty() {
        return Err(ConfigError::new(
            "peer.rendezvous_addrs",
            "empty; list at least one IPv4 address where the VCS sends SIP (not the management address)",
        ));
    }
    let mut rendezvous_addrs = Vec::with_capacity(raw.rendezvous_addrs.len());
    for text in &raw.rendezvous_addrs {
        let addr = parse_ipv4("peer.rendezvous_addrs", text)?;
        if addr == mgmt_addr {
            return Err(ConfigError::new(
                "peer.rendezvous_addrs",
                format!(
                    "{addr} is the management address; SIP must use a separate rendezvous address"
                ),
            ));
        }
        if rendezvous_addrs.contains(&addr) {
            return Err(ConfigError::new(
                "peer.rendezvous_addrs",
                format!("{addr} is listed twice; list each address once"),
            ));
        }
        rendezvous_addrs.push(addr);
    }
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/confmesh"));
    if !state_dir.is_absolute() {
        return Err(ConfigError::new(
            "peer.state_dir",
            format!("{} is relative; use an absolute path", state_dir.display()),
        ));
    }
    let mtu = match raw.mtu {
        None => 1500,
        Some(m) if (i64::from(MIN_MTU)..=i64::from(MAX_MTU)).contains(&m) => m as u16,
        Some(m) => {
            return Err(ConfigError::new(
                "peer.mtu",
                format!("{m} is out of range; use {MIN_MTU}..={MAX_MTU} (1500 for Ethernet)"),
            ));
        }
    };
    let syslog = raw
        .syslog
        .iter()
        .map(|s| parse_syslog(s))
        .collect::<Result<Vec<_>, _>>()?;
    let overlay_addr = match raw.overlay_addr {
        None => default_overlay_addr(mgmt_addr),
        Some(text) => {
            let addr = parse_ipv4("peer.overlay_addr", &text)?;
            if !in_overlay(addr) {
                return Err(ConfigError::new(
                    "peer.overlay_addr",
                    format!(
                        "{addr} is outside the overlay {OVERLAY_PREFIX}/{OVERLAY_PREFIX_LEN}; pick an address inside it or omit the key"
                    ),
                ));
            }
            addr
        }
    };
    let control_socket = match raw.control_socket {
        Some(p) if !p.is_absolute() => {
            return Err(ConfigError::new(
                "peer.control_socket",
                format!("{} is relative; use an absolute path", p.display()),
            ));
        }
        Some(p) => p,
        None => state_dir.join("confmesh.sock"),
    };
    let max = crate::b2bua::MAX_SHARDS;
    let sip_shards = match raw.sip_shards {
        None => 1,
        Some(n) if (0..=max as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ConfigError::new(
                "peer.sip_shards",
                format!(
                    "{n} is out of range; use 1 (the default), up to {max}, or 0 for one per CPU"
                ),
            ));
        }
    };
    Ok(PeerSettings {
        hostname,
        domain: raw.domain,
        serial,
        mgmt_addr,
        rendezvous_addrs,
        state_dir,
        mtu,
        syslog,
        overlay_addr,
        control_socket,
        sip_shards,
    })
}

fn parse_syslog(text: &str) -> Result<SyslogTarget, ConfigError> {
    let field = "peer.syslog";
    let (transport, rest) = if let Some(rest) = text.strip_prefix("udp://") {
        (SyslogTransport::Udp, rest)
    } else if let Some(rest) = text.strip_prefix("tcp://") {
        (SyslogTransport::Tcp, rest)
    } else {
        return Err(ConfigError::new(
            field,
            format!("{text:?} needs a scheme; write udp://a.b.c.d:514 or tcp://a.b.c.d:514"),
        ));
    };
    let addr = match rest.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => rest
            .parse::<std::net::IpAddr>()
            .map(|ip| SocketAddr::new(ip, 514))
            .map_err(|_| {
                ConfigError::new(
                    field,
                    format!("{text:?}: {rest:?} is not an address[:port]"),
                )
            })?,
    };
    Ok(SyslogTarget { transport, addr })
}

fn validate_admin(raw: RawAdmin, peer: &PeerSettings) -> Result<AdminSettings, ConfigError> {
    let listen = match raw.listen {
        None => SocketAddr::new(peer.mgmt_addr.into(), 8443),
        Some(text) => text.parse().map_err(|_| {
            ConfigError::new(
                "admin.listen",
                format!(
                    "{text:?} is not address:port, e.g. \"{}:8443\"",
                    peer.mgmt_addr
                ),
            )
        })?,
    };
    let tls = match (raw.tls_cert_file, raw.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(AdminTls::load(&cert, &key)?),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "admin.tls_key_file",
                "missing; TLS needs both tls_cert_file and tls_key_file",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "admin.tls_cert_file",
                "missing; TLS needs both tls_cert_file and tls_key_file",
            ));
        }
    };
    Ok(AdminSettings { listen, tls })
}

fn validate_cluster(
    raw: RawCluster,
    peer: &PeerSettings,
) -> Result<Option<ClusterSettings>, ConfigError> {
    if raw.peers.is_empty() {
        if raw.psk_file.is_some() {
            return Err(ConfigError::new(
                "cluster.psk_file",
                "set while cluster.peers is empty; a standalone peer has no pre-shared key: remove psk_file or list the peers",
            ));
        }
        return Ok(None);
    }
    let mut peers = Vec::with_capacity(raw.peers.len());
    let mut seen = HashSet::new();
    for text in &raw.peers {
        let addr = parse_ipv4("cluster.peers", text)?;
        if !seen.insert(addr) {
            return Err(ConfigError::new(
                "cluster.peers",
                format!("{addr} is listed twice; list each peer once"),
            ));
        }
        peers.push(addr);
    }
    // Overlay addresses keep the low 17 bits of the management address: two peers that share
    // them would share an overlay address and never both become Active.
    for (i, a) in peers.iter().enumerate() {
        if let Some(b) = peers[..i]
            .iter()
            .find(|&&b| default_overlay_addr(b) == default_overlay_addr(*a))
        {
            return Err(ConfigError::new(
                "cluster.peers",
                format!(
                    "{b} and {a} both map to overlay address {}; management addresses of one cluster must differ in their low {} bits",
                    default_overlay_addr(*a),
                    32 - OVERLAY_PREFIX_LEN
                ),
            ));
        }
    }
    if peers.len() > MAX_PEERS {
        return Err(ConfigError::new(
            "cluster.peers",
            format!(
                "{} peers listed; a cluster holds at most {MAX_PEERS}",
                peers.len()
            ),
        ));
    }
    if !peers.contains(&peer.mgmt_addr) {
        return Err(ConfigError::new(
            "cluster.peers",
            format!(
                "does not include this peer's own mgmt_addr {}; add it (the list is identical on every peer)",
                peer.mgmt_addr
            ),
        ));
    }
    for other in peers.iter().filter(|&&p| p != peer.mgmt_addr) {
        if peer.rendezvous_addrs.contains(other) {
            return Err(ConfigError::new(
                "peer.rendezvous_addrs",
                format!(
                    "{other} is another peer's management address; rendezvous addresses must be this host's own"
                ),
            ));
        }
    }
    let licence = raw.licence.unwrap_or(Licence::Essentials);
    if licence == Licence::Essentials {
        return Err(ConfigError::new(
            "cluster.licence",
            "essentials (no release key) does not allow clustering; set licence = \"full\" or \"select\", or empty cluster.peers",
        ));
    }
    if peers.len() > licence.max_peers() {
        return Err(ConfigError::new(
            "cluster.licence",
            format!(
                "{} allows at most {} peers but cluster.peers lists {}; remove a peer or use a full licence",
                licence.as_str(),
                licence.max_peers(),
                peers.len()
            ),
        ));
    }
    let psk_file = raw.psk_file.ok_or_else(|| {
        ConfigError::new(
            "cluster.psk_file",
            "missing; a cluster needs the pre-shared key file, identical on every peer",
        )
    })?;
    peers.sort();
    Ok(Some(ClusterSettings {
        peers,
        psk_file,
        licence,
        protection: raw.protection.unwrap_or(Protection::Ah),
    }))
}

/// The default serial: the first 12 hex digits of `/etc/machine-id`, upper-cased, prefixed `CM`.
fn machine_serial() -> Option<String> {
    let id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let hex: String = id.trim().chars().take(12).collect();
    (hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("CM{}", hex.to_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[peer]
hostname = "conductor1"
domain = "example.com"
serial = "CM0001"
mgmt_addr = "10.96.0.1"
rendezvous_addrs = ["10.96.1.1"]
state_dir = "/var/lib/confmesh"
mtu = 1500
syslog = ["udp://10.96.0.9:514"]

[admin]

[cluster]
peers = ["10.96.0.3", "10.96.0.1", "10.96.0.2"]
psk_file = "/etc/confmesh/psk"
licence = "full"
protection = "ah"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, || Some("CMTEST".into()))
    }

    #[test]
    fn spec_example_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.peer.overlay_addr, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(
            c.peer.control_socket,
            PathBuf::from("/var/lib/confmesh/confmesh.sock")
        );
        assert_eq!(c.admin.listen, "10.96.0.1:8443".parse().unwrap());
        let cluster = c.cluster.unwrap();
        assert_eq!(
            cluster.peers,
            vec![
                Ipv4Addr::new(10, 96, 0, 1),
                Ipv4Addr::new(10, 96, 0, 2),
                Ipv4Addr::new(10, 96, 0, 3)
            ]
        );
        assert_eq!(cluster.protection, Protection::Ah);
    }

    #[test]
    fn standalone_has_no_cluster() {
        let text = GOOD.split("[cluster]").next().unwrap();
        assert_eq!(parse(text).unwrap().cluster, None);
    }

    /// Each bad file is refused, and the refusal names the field at fault.
    #[test]
    fn bad_configurations_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "own address missing",
                r#"peers = ["10.96.0.2","10.96.0.3"]"#,
                "cluster.peers",
            ),
            (
                "too many peers",
                r#"peers = ["10.96.0.1","10.96.0.2","10.96.0.3","10.96.0.4"]"#,
                "cluster.peers",
            ),
            (
                "duplicate peer",
                r#"peers = ["10.96.0.1","10.96.0.1"]"#,
                "cluster.peers",
            ),
            (
                "overlay collision",
                r#"peers = ["10.96.0.1","10.98.0.1"]"#,
                "cluster.peers",
            ),
            (
                "not an address",
                r#"peers = ["10.96.0.1","conductor2"]"#,
                "cluster.peers",
            ),
            (
                "select with three",
                r#"licence = "select""#,
                "cluster.licence",
            ),
            (
                "essentials clustered",
                r#"licence = "essentials""#,
                "cluster.licence",
            ),
            ("unknown licence", r#"licence = "gold""#, "cluster.licence"),
            (
                "unknown protection",
                r#"protection = "esp-cbc""#,
                "cluster.protection",
            ),
            (
                "rendezvous = mgmt",
                r#"rendezvous_addrs = ["10.96.0.1"]"#,
                "peer.rendezvous_addrs",
            ),
            (
                "no rendezvous",
                r#"rendezvous_addrs = []"#,
                "peer.rendezvous_addrs",
            ),
            ("mtu too small", "mtu = 500", "peer.mtu"),
            ("mtu negative", "mtu = -1", "peer.mtu"),
            ("bad hostname", r#"hostname = "bad_name!""#, "peer.hostname"),
            (
                "loopback mgmt",
                r#"mgmt_addr = "127.0.0.1""#,
                "peer.mgmt_addr",
            ),
            ("mgmt not ipv4", r#"mgmt_addr = "::1""#, "peer.mgmt_addr"),
            (
                "relative state dir",
                r#"state_dir = "var/lib""#,
                "peer.state_dir",
            ),
            (
                "syslog without scheme",
                r#"syslog = ["10.96.0.9:514"]"#,
                "peer.syslog",
            ),
            (
                "too many sip shards",
                r#"sip_shards = 99"#,
                "peer.sip_shards",
            ),
            (
                "negative sip shards",
                r#"sip_shards = -1"#,
                "peer.sip_shards",
            ),
            (
                "overlay outside prefix",
                r#"overlay_addr = "10.0.0.1""#,
                "peer.overlay_addr",
            ),
            ("bad admin listen", r#"listen = "nowhere""#, "admin.listen"),
            (
                "tls half set",
                r#"tls_cert_file = "/etc/cert.pem""#,
                "admin.tls_key_file",
            ),
            ("typo in key", r#"hostnme = "x""#, "peer.hostnme"),
            ("bad serial", r#"serial = "CM 0001/x""#, "peer.serial"),
            ("bad domain", r#"domain = "exa mple.com""#, "peer.domain"),
        ];
        for (name, line, field) in cases {
            let key = line.split_whitespace().next().unwrap();
            // Replace the key's line in GOOD (or add it to the right table) with the bad one.
            let table = match *field {
                f if f.starts_with("cluster.") => "[cluster]",
                f if f.starts_with("admin.") => "[admin]",
                _ => "[peer]",
            };
            let mut text: String = GOOD
                .lines()
                .filter(|l| l.split_whitespace().next() != Some(key))
                .collect::<Vec<_>>()
                .join("\n");
            text = text.replacen(table, &format!("{table}\n{line}"), 1);
            let err = parse(&text).expect_err(name);
            assert_eq!(&err.field, field, "{name}: {err}");
            assert!(
                err.to_string().contains(field),
                "{name}: message must name the field: {err}"
            );
        }
    }

    /// The TLS files are read and checked when the configuration is loaded; each bad file is
    /// refused with the field at fault.
    #[test]
    fn admin_tls_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let a = rcgen::generate_simple_self_signed(vec!["conductor1".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["conductor1".to_owned()]).unwrap();
        let (a_crt, a_key) = (
            file("a.crt", &a.cert.pem()),
            file("a.key", &a.key_pair.serialize_pem()),
        );
        let b_key = file("b.key", &b.key_pair.serialize_pem());
        let garbage = file("garbage", "not PEM at all\n");
        let bad_der = file(
            "bad.crt",
            "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        );
        let missing = dir.path().join("missing.pem");

        let with_tls = |cert: &Path, key: &Path| {
            let lines = format!(
                "[admin]\ntls_cert_file = {:?}\ntls_key_file = {:?}",
                cert.display().to_string(),
                key.display().to_string()
            );
            parse(&GOOD.replacen("[admin]", &lines, 1))
        };
        let c = with_tls(&a_crt, &a_key).unwrap();
        let tls = c.admin.tls.as_ref().expect("TLS configured");
        assert_eq!(
            (tls.cert_file.as_path(), tls.key_file.as_path()),
            (a_crt.as_path(), a_key.as_path())
        );
        assert_eq!(
            tls.server_config().alpn_protocols,
            vec![b"http/1.1".to_vec()]
        );
        assert!(
            !format!("{tls:?}").contains("PRIVATE"),
            "Debug shows paths only"
        );
        assert_eq!(
            parse(GOOD).unwrap().admin.tls,
            None,
            "plain HTTP when neither is set"
        );

        let cases: &[(&str, &Path, &Path, &str, &str)] = &[
            (
                "cert unreadable",
                &missing,
                &a_key,
                "admin.tls_cert_file",
                "cannot read",
            ),
            (
                "cert not PEM",
                &garbage,
                &a_key,
                "admin.tls_cert_file",
                "BEGIN CERTIFICATE",
            ),
            (
                "key given as cert",
                &a_key,
                &a_key,
                "admin.tls_cert_file",
                "BEGIN CERTIFICATE",
            ),
            (
                "cert not X.509",
                &bad_der,
                &a_key,
                "admin.tls_cert_file",
                "certificate",
            ),
            (
                "key unreadable",
                &a_crt,
                &missing,
                "admin.tls_key_file",
                "cannot read",
            ),
            (
                "key not PEM",
                &a_crt,
                &garbage,
                "admin.tls_key_file",
                "private key",
            ),
            (
                "cert given as key",
                &a_crt,
                &a_crt,
                "admin.tls_key_file",
                "private key",
            ),
            (
                "key of another cert",
                &a_crt,
                &b_key,
                "admin.tls_key_file",
                "does not match",
            ),
        ];
        for (name, cert, key, field, says) in cases {
            let err = with_tls(cert, key).expect_err(name);
            assert_eq!(&err.field, field, "{name}: {err}");
            assert!(
                err.to_string().contains(field) && err.message.contains(says),
                "{name}: {err}"
            );
        }
        // Only one of the two: refused before any file is read.
        let only_key = GOOD.replacen(
            "[admin]",
            &format!("[admin]\ntls_key_file = {:?}", a_key.display().to_string()),
            1,
        );
        assert_eq!(parse(&only_key).unwrap_err().field, "admin.tls_cert_file");
    }

    #[test]
    fn standalone_with_psk_is_refused() {
        let text = GOOD.replace(
            r#"peers = ["10.96.0.3", "10.96.0.1", "10.96.0.2"]"#,
            "peers = []",
        );
        assert_eq!(parse(&text).unwrap_err().field, "cluster.psk_file");
    }

    #[test]
    fn missing_peer_table_is_refused() {
        assert_eq!(parse("[cluster]\n").unwrap_err().field, "peer");
    }

    #[test]
    fn overlay_mapping_keeps_low_bits() {
        assert_eq!(
            default_overlay_addr(Ipv4Addr::new(10, 96, 0, 2)),
            Ipv4Addr::new(198, 18, 0, 2)
        );
        assert_eq!(
            default_overlay_addr(Ipv4Addr::new(172, 17, 255, 9)),
            Ipv4Addr::new(198, 19, 255, 9)
        );
        assert!(in_overlay(Ipv4Addr::new(198, 19, 1, 1)));
        assert!(!in_overlay(Ipv4Addr::new(198, 20, 0, 1)));
    }
}
