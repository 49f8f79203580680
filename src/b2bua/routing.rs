//! Call routing: alias → conference → bridge, with cluster-wide admission.
//!
//! The decision has to be the same whichever peer makes it. Aliases are tried in name order; a new
//! conference is placed by rendezvous hashing (highest SHA-256 score of `conference ‖ bridge`) over
//! the bridges this peer sees healthy with spare capacity, and the choice is then *claimed* in the
//! [`ConferenceDirectory`] — first writer wins — so two peers racing on the first two calls of a
//! conference end up on one bridge even if their health views differ. Bandwidth admission asks the
//! [`BandwidthLedger`], which sums every peer's usage of a location.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::sip::Transport;
use crate::sip::parse::{SipUri, param};

/// Attempts at placing one call before giving up with 503 (bounds directory round trips).
const MAX_PLACEMENT_ATTEMPTS: usize = 4;
/// Shared-configuration key of the bridges' OPTIONS probe interval, in ms (0 stops probing).
pub const OPTIONS_INTERVAL_KEY: &str = "sip/options_interval_ms";
/// Shortest non-zero probe interval accepted (a typo must not flood the bridges).
const MIN_OPTIONS_INTERVAL_MS: u64 = 200;
/// Longest probe interval accepted (a bridge that died must be noticed within the hour).
const MAX_OPTIONS_INTERVAL_MS: u64 = 3_600_000;
/// Shared-configuration key of the maximum call duration, in seconds (default 86400, a day):
/// a call still up after that long gets a BYE on both legs, so that a call whose hang-up was
/// lost (every retransmission of a BYE dropped under overload, a caller that vanished) cannot
/// hold bridge capacity and bandwidth forever. 0 is refused: it would end every call at once.
pub const MAX_CALL_DURATION_KEY: &str = "sip/max_call_duration_s";
/// Longest maximum call duration accepted: 30 days.
const MAX_MAX_CALL_DURATION_S: u64 = 30 * 86_400;
/// Shared-configuration key of the number of consecutive unanswered OPTIONS probes after which a
/// bridge counts as down (default 3; one answer brings it back up).
pub const OPTIONS_FAILURES_KEY: &str = "sip/options_failures";
/// Most consecutive failures that may be asked for (a dead bridge must be noticed).
const MAX_OPTIONS_FAILURES: u64 = 100;

/// A bridge from `bridge/<name>` in shared configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The key suffix.
    pub name: String,
    /// The configured URI, e.g. `sip:10.96.4.1:5060`.
    pub uri: String,
    /// Where its SIP is sent (the URI's IP address and port, 5060 by default).
    pub addr: SocketAddr,
    /// `;transport=tcp` in the URI selects TCP.
    pub transport: Transport,
    /// Calls the bridge accepts cluster-wide.
    pub capacity: u32,
}

/// An alias from `alias/<name>`.
#[derive(Debug, Clone)]
pub struct AliasConfig {
    /// The key suffix.
    pub name: String,
    /// Matched against `user@host` of the Request-URI.
    pub pattern: Regex,
    /// Conference name template; `$1`… are the pattern's groups.
    pub conference: String,
    /// Bandwidth one call of this alias takes in its location.
    pub call_kbps: u64,
    /// The location charged.
    pub location: String,
}

/// A location from `location/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocationConfig {
    /// Cluster-wide limit.
    pub limit_kbps: u64,
}

/// The shared configuration the router needs, rebuilt whenever the store changes.
#[derive(Debug, Clone, Default)]
pub struct RoutingConfig {
    /// Bridges by name.
    pub bridges: BTreeMap<String, BridgeConfig>,
    /// Aliases in name order (the order they are tried).
    pub aliases: Vec<AliasConfig>,
    /// Locations by name.
    pub locations: BTreeMap<String, LocationConfig>,
    /// Interval of the bridges' OPTIONS health probes from `sip/options_interval_ms`; `None` when
    /// not configured (the B2BUA's own default applies).
    pub options_interval: Option<std::time::Duration>,
    /// From `sip/max_call_duration_s`; `None` when not configured (the B2BUA's default, a day).
    pub max_call_duration: Option<std::time::Duration>,
    /// From `sip/options_failures`; `None` when not configured (the B2BUA's default, 3).
    pub options_failures: Option<u32>,
}

/// A configuration entry that could not be used; the rest of the configuration still applies.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
#[error("configuration key {key}: {reason}")]
pub struct RoutingConfigError {
    /// The offending key.
    pub key: String,
    /// What is wrong with it and how to fix it.
    pub reason: String,
}

#[derive(Deserialize)]
struct RawBridge {
    uri: String,
    capacity: u32,
}

#[derive(Deserialize)]
struct RawAlias {
    pattern: String,
    conference: String,
    #[serde(default)]
    call_kbps: u64,
    #[serde(default = "default_location")]
    location: String,
}

fn default_location() -> String {
    "default".to_owned()
}

#[derive(Deserialize)]
struct RawLocation {
    limit_kbps: u64,
}

impl RoutingConfig {
    /// Builds the routing view from shared-configuration entries (`bridge/…`, `alias/…`,
    /// `location/…`, `sip/options_interval_ms`, `sip/max_call_duration_s`, `sip/options_failures`;
    /// other keys are ignored). Bad entries are skipped
    /// and reported.
    pub fn from_entries<'a, I>(entries: I) -> (RoutingConfig, Vec<RoutingConfigError>)
    where
        I: IntoIterator<Item = (&'a str, &'a serde_json::Value)>,
    {
        let mut cfg = RoutingConfig::default();
        let mut errors = Vec::new();
        let mut aliases = BTreeMap::new();
        for (key, value) in entries {
            let err = |reason: String| RoutingConfigError {
                key: key.to_owned(),
                reason,
            };
            if let Some(name) = key.strip_prefix("bridge/") {
                match serde_json::from_value::<RawBridge>(value.clone()) {
                    Ok(raw) => match bridge_target(&raw.uri) {
                        Some((addr, transport)) => {
                            cfg.bridges.insert(
                                name.to_owned(),
                                BridgeConfig { name: name.to_owned(), uri: raw.uri, addr, transport, capacity: raw.capacity },
                            );
                        }
                        None => errors.push(err(format!(
                            "uri {:?} is not a SIP URI with an IPv4/IPv6 address, e.g. \"sip:10.96.4.1:5060\"",
                            raw.uri
                        ))),
                    },
                    Err(e) => errors.push(err(format!("expected {{\"uri\": …, \"capacity\": …}}: {e}"))),
                }
            } else if let Some(name) = key.strip_prefix("alias/") {
                match serde_json::from_value::<RawAlias>(value.clone()) {
                    Ok(raw) => match Regex::new(&raw.pattern) {
                        Ok(pattern) => {
                            aliases.insert(
                                name.to_owned(),
                                AliasConfig {
                                    name: name.to_owned(),
                                    pattern,
                                    conference: raw.conference,
                                    call_kbps: raw.call_kbps,
                                    location: raw.location,
                                },
                            );
                        }
                        Err(e) => errors.push(err(format!(
                            "pattern is not a valid regular expression: {e}"
                        ))),
                    },
                    Err(e) => errors.push(err(format!(
                        "expected {{\"pattern\": …, \"conference\": …}}: {e}"
                    ))),
                }
            } else if key == OPTIONS_INTERVAL_KEY {
                match value.as_u64() {
                    Some(0) => cfg.options_interval = Some(std::time::Duration::ZERO),
                    Some(ms) if (MIN_OPTIONS_INTERVAL_MS..=MAX_OPTIONS_INTERVAL_MS).contains(&ms) => {
                        cfg.options_interval = Some(std::time::Duration::from_millis(ms));
                    }
                    _ => errors.push(err(format!(
                        "expected a number of milliseconds from {MIN_OPTIONS_INTERVAL_MS} to {MAX_OPTIONS_INTERVAL_MS}, or 0 to stop probing; got {value}"
                    ))),
                }
            } else if key == MAX_CALL_DURATION_KEY {
                match value.as_u64() {
                    Some(secs) if (1..=MAX_MAX_CALL_DURATION_S).contains(&secs) => {
                        cfg.max_call_duration = Some(std::time::Duration::from_secs(secs));
                    }
                    _ => errors.push(err(format!(
                        "expected a number of seconds from 1 to {MAX_MAX_CALL_DURATION_S} (0 would end every call at once; the default is 86400); got {value}"
                    ))),
                }
            } else if key == OPTIONS_FAILURES_KEY {
                match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(n) if (1..=MAX_OPTIONS_FAILURES).contains(&u64::from(n)) => cfg.options_failures = Some(n),
                    _ => errors.push(err(format!(
                        "expected a number of consecutive unanswered probes from 1 to {MAX_OPTIONS_FAILURES} (the default is 3); got {value}"
                    ))),
                }
            } else if let Some(name) = key.strip_prefix("location/") {
                match serde_json::from_value::<RawLocation>(value.clone()) {
                    Ok(raw) => {
                        cfg.locations.insert(
                            name.to_owned(),
                            LocationConfig {
                                limit_kbps: raw.limit_kbps,
                            },
                        );
                    }
                    Err(e) => errors.push(err(format!("expected {{\"limit_kbps\": …}}: {e}"))),
                }
            }
        }
        cfg.aliases = aliases.into_values().collect();
        (cfg, errors)
    }
}

/// Address and transport of a bridge URI; only literal addresses (the core does no DNS).
pub fn bridge_target(uri: &str) -> Option<(SocketAddr, Transport)> {
    let u = SipUri::parse(uri)?;
    let host = u.host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().ok()?;
    let transport = match param(u.params, "transport") {
        Some(t) if t.eq_ignore_ascii_case("tcp") => Transport::Tcp,
        _ => Transport::Udp,
    };
    Some((SocketAddr::new(ip, u.port.unwrap_or(5060)), transport))
}

/// Where a conference runs, as the replicated conference status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Bridge name.
    pub bridge: String,
    /// Calls in the conference, cluster-wide.
    pub participants: u32,
}

/// A directory operation failed; the call is answered 503 (not the caller's fault).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The store cannot answer now (no quorum, shutting down…).
    #[error("conference directory unavailable: {0}")]
    Unavailable(String),
}

/// The replicated conference status, as routing needs it. The replicated store implements it;
/// [`MemoryDirectory`] stands in for tests and standalone peers.
pub trait ConferenceDirectory: Send + Sync + 'static {
    /// The conference's placement, if it is placed.
    fn placement(
        &self,
        conference: &str,
    ) -> impl Future<Output = Result<Option<Placement>, DirectoryError>> + Send;
    /// Places the conference on `bridge` unless it is already placed (first writer wins, cluster-
    /// wide); returns the placement in force afterwards, whoever wrote it.
    fn claim(
        &self,
        conference: &str,
        bridge: &str,
    ) -> impl Future<Output = Result<Placement, DirectoryError>> + Send;
    /// Counts one more call, only if the conference is placed on `bridge`; returns the new count,
    /// or `None` when it is not (placement changed under us: route again).
    fn add_participant(
        &self,
        conference: &str,
        bridge: &str,
    ) -> impl Future<Output = Result<Option<u32>, DirectoryError>> + Send;
    /// Counts one call less; at zero the conference ends and its placement is removed.
    fn remove_participant(
        &self,
        conference: &str,
        bridge: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;
    /// Removes the conference's placement on `bridge` if the conference has no calls yet (it has
    /// not started), so that it can be placed on another bridge when that one is down.
    fn abandon(
        &self,
        conference: &str,
        bridge: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;
    /// Calls in all conferences placed on `bridge`, cluster-wide (capacity checks).
    fn bridge_load(&self, bridge: &str)
    -> impl Future<Output = Result<u32, DirectoryError>> + Send;
}

/// Cluster-wide bandwidth per location: this peer's own usage plus what the other peers report
/// over UDP 1719. The bandwidth service implements it; [`MemoryLedger`] stands in for tests.
pub trait BandwidthLedger: Send + Sync + 'static {
    /// Adds `kbps` to this peer's usage of `location` if the cluster-wide total stays within
    /// `limit_kbps`; otherwise returns the cluster-wide usage that refused it.
    fn try_reserve(&self, location: &str, kbps: u64, limit_kbps: u64) -> Result<(), u64>;
    /// Gives back a reservation.
    fn release(&self, location: &str, kbps: u64);
    /// Cluster-wide usage of `location` now (status and metrics).
    fn usage_kbps(&self, location: &str) -> u64;
    /// Counts a routed call's bandwidth on its bridge, so that every peer's status shows what each
    /// bridge carries. Ledgers that only do admission (e.g. [`MemoryLedger`]) ignore it.
    fn charge_bridge(&self, bridge: &str, kbps: u64) {
        let _ = (bridge, kbps);
    }
    /// Gives back what [`BandwidthLedger::charge_bridge`] counted when the call ends.
    fn discharge_bridge(&self, bridge: &str, kbps: u64) {
        let _ = (bridge, kbps);
    }
}

/// A conference directory in one process: for tests, and for a standalone peer.
#[derive(Debug, Clone, Default)]
pub struct MemoryDirectory {
    inner: Arc<Mutex<HashMap<String, Placement>>>,
}

impl MemoryDirectory {
    /// All placements (status).
    pub fn snapshot(&self) -> BTreeMap<String, Placement> {
        self.inner
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn lock(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<String, Placement>>, DirectoryError> {
        self.inner
            .lock()
            .map_err(|_| DirectoryError::Unavailable("directory lock poisoned".into()))
    }
}

impl ConferenceDirectory for MemoryDirectory {
    async fn placement(&self, conference: &str) -> Result<Option<Placement>, DirectoryError> {
        Ok(self.lock()?.get(conference).cloned())
    }

    async fn claim(&self, conference: &str, bridge: &str) -> Result<Placement, DirectoryError> {
        let mut m = self.lock()?;
        Ok(m.entry(conference.to_owned())
            .or_insert_with(|| Placement {
                bridge: bridge.to_owned(),
                participants: 0,
            })
            .clone())
    }

    async fn add_participant(
        &self,
        conference: &str,
        bridge: &str,
    ) -> Result<Option<u32>, DirectoryError> {
        let mut m = self.lock()?;
        Ok(match m.get_mut(conference) {
            Some(p) if p.bridge == bridge => {
                p.participants = p.participants.saturating_add(1);
                Some(p.participants)
            }
            _ => None,
        })
    }

    async fn remove_participant(
        &self,
        conference: &str,
        bridge: &str,
    ) -> Result<(), DirectoryError> {
        let mut m = self.lock()?;
        if let Some(p) = m.get_mut(conference) {
            if p.bridge == bridge {
                p.participants = p.participants.saturating_sub(1);
                if p.participants == 0 {
                    m.remove(conference);
                }
            }
        }
        Ok(())
    }

    async fn abandon(&self, conference: &str, bridge: &str) -> Result<(), DirectoryError> {
        let mut m = self.lock()?;
        if m.get(conference)
            .is_some_and(|p| p.bridge == bridge && p.participants == 0)
        {
            m.remove(conference);
        }
        Ok(())
    }

    async fn bridge_load(&self, bridge: &str) -> Result<u32, DirectoryError> {
        Ok(self
            .lock()?
            .values()
            .filter(|p| p.bridge == bridge)
            .map(|p| p.participants)
            .sum())
    }
}

/// A bandwidth ledger in one process (tests, standalone peers).
#[derive(Debug, Clone, Default)]
pub struct MemoryLedger {
    inner: Arc<Mutex<HashMap<String, u64>>>,
}

impl BandwidthLedger for MemoryLedger {
    fn try_reserve(&self, location: &str, kbps: u64, limit_kbps: u64) -> Result<(), u64> {
        let Ok(mut m) = self.inner.lock() else {
            return Err(u64::MAX);
        };
        let used = m.entry(location.to_owned()).or_insert(0);
        match used.checked_add(kbps) {
            Some(total) if total <= limit_kbps => {
                *used = total;
                Ok(())
            }
            _ => Err(*used),
        }
    }

    fn release(&self, location: &str, kbps: u64) {
        if let Ok(mut m) = self.inner.lock() {
            if let Some(u) = m.get_mut(location) {
                *u = u.saturating_sub(kbps);
            }
        }
    }

    fn usage_kbps(&self, location: &str) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(location).copied())
            .unwrap_or(0)
    }
}

/// Bridge health as this peer's OPTIONS probes see it; unknown bridges count as healthy so the
/// first call after a start is not refused before the first probe.
#[derive(Debug, Default)]
pub struct HealthTable {
    inner: RwLock<HashMap<String, bool>>,
}

impl HealthTable {
    /// Records a probe result; returns true when it changed.
    pub fn set(&self, bridge: &str, up: bool) -> bool {
        self.inner
            .write()
            .map(|mut m| m.insert(bridge.to_owned(), up) != Some(up))
            .unwrap_or(false)
    }

    /// Whether a bridge may receive calls.
    pub fn is_up(&self, bridge: &str) -> bool {
        self.inner
            .read()
            .ok()
            .and_then(|m| m.get(bridge).copied())
            .unwrap_or(true)
    }

    /// Every probed bridge and its state (status).
    pub fn snapshot(&self) -> BTreeMap<String, bool> {
        self.inner
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// The bridges in rendezvous-hash order for `conference`: the same order on every peer given the
/// same bridge list, and adding or removing one bridge moves only the conferences it wins/loses.
pub fn rank_bridges<'c>(
    conference: &str,
    bridges: impl IntoIterator<Item = &'c BridgeConfig>,
) -> Vec<&'c BridgeConfig> {
    let mut scored: Vec<(u64, &BridgeConfig)> = bridges
        .into_iter()
        .map(|b| {
            let mut h = Sha256::new();
            h.update(conference.as_bytes());
            h.update([0u8]);
            h.update(b.name.as_bytes());
            let d = h.finalize();
            let mut top = [0u8; 8];
            top.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
            (u64::from_be_bytes(top), b)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    scored.into_iter().map(|(_, b)| b).collect()
}

/// What routing needs from a call: the called URI and what already failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRequest {
    /// `user@host` (or `host`) of the Request-URI.
    pub called: String,
    /// Bridges that already failed this call (not to be tried again).
    pub failed_bridges: Vec<String>,
    /// The route of the failed attempt, released before routing again.
    pub previous: Option<Route>,
}

/// Resources held by a routed call; given back through [`Router::release`] when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Conference name.
    pub conference: String,
    /// Bridge name.
    pub bridge: String,
    /// Charged location and bandwidth.
    pub location: String,
    /// Bandwidth reserved.
    pub kbps: u64,
}

/// The answer of routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteDecision {
    /// Send the call to this bridge.
    Forward {
        /// What was reserved.
        route: Route,
        /// B-leg Request-URI.
        uri: String,
        /// Bridge address.
        dest: SocketAddr,
        /// Bridge transport.
        transport: Transport,
    },
    /// Refuse the call.
    Reject {
        /// 404, 488 or 503.
        code: u16,
        /// Reason phrase.
        reason: String,
        /// Text for a `Warning: 399 <host> "…"` header.
        warning: Option<String>,
    },
}

fn reject(code: u16, reason: &str, warning: impl Into<String>) -> RouteDecision {
    RouteDecision::Reject {
        code,
        reason: reason.to_owned(),
        warning: Some(warning.into()),
    }
}

/// Routes calls against the current configuration, health view, directory and ledger.
pub struct Router<D, L> {
    /// The conference directory.
    pub directory: D,
    /// The bandwidth ledger.
    pub ledger: L,
    /// Bridge health seen by this peer.
    pub health: Arc<HealthTable>,
}

impl<D: ConferenceDirectory, L: BandwidthLedger> Router<D, L> {
    /// Decides where a call goes and reserves what it will use (bandwidth, a participant slot).
    pub async fn route(&self, cfg: &RoutingConfig, req: &RouteRequest) -> RouteDecision {
        if let Some(prev) = &req.previous {
            self.release(prev).await;
        }
        let Some((alias, conference)) = cfg.aliases.iter().find_map(|a| {
            let caps = a.pattern.captures(&req.called)?;
            let mut name = String::new();
            caps.expand(&a.conference, &mut name);
            Some((a, name))
        }) else {
            return reject(404, "Not Found", format!("no alias matches {}", req.called));
        };
        let location = &alias.location;
        if let Some(loc) = cfg.locations.get(location) {
            if alias.call_kbps > loc.limit_kbps {
                return reject(
                    488,
                    "Not Acceptable Here",
                    format!(
                        "call of {} kbps exceeds location {location} limit of {} kbps",
                        alias.call_kbps, loc.limit_kbps
                    ),
                );
            }
            if let Err(used) = self
                .ledger
                .try_reserve(location, alias.call_kbps, loc.limit_kbps)
            {
                return reject(
                    503,
                    "Service Unavailable",
                    format!(
                        "location {location} bandwidth limit reached ({used} of {} kbps in use)",
                        loc.limit_kbps
                    ),
                );
            }
        } else {
            // An unconfigured location has no limit, but usage is still counted for status.
            let _ = self.ledger.try_reserve(location, alias.call_kbps, u64::MAX);
        }
        let decision = self.place(cfg, &conference, &req.failed_bridges).await;
        match decision {
            Ok((bridge, uri_user)) => {
                let route = Route {
                    conference,
                    bridge: bridge.name.clone(),
                    location: location.clone(),
                    kbps: alias.call_kbps,
                };
                let uri = bridge_request_uri(&bridge.uri, &uri_user);
                self.ledger.charge_bridge(&route.bridge, route.kbps);
                RouteDecision::Forward {
                    route,
                    uri,
                    dest: bridge.addr,
                    transport: bridge.transport,
                }
            }
            Err(rejection) => {
                self.ledger.release(location, alias.call_kbps);
                rejection
            }
        }
    }

    /// Finds (or places) the conference's bridge and counts the call in; the bridge and the user
    /// part for its Request-URI.
    async fn place(
        &self,
        cfg: &RoutingConfig,
        conference: &str,
        failed: &[String],
    ) -> Result<(BridgeConfig, String), RouteDecision> {
        let unavailable = |e: DirectoryError| reject(503, "Service Unavailable", e.to_string());
        let mut abandoned = false;
        for _ in 0..MAX_PLACEMENT_ATTEMPTS {
            let placement = self
                .directory
                .placement(conference)
                .await
                .map_err(unavailable)?;
            let bridge = match placement {
                Some(p) => {
                    let usable = cfg
                        .bridges
                        .get(&p.bridge)
                        .filter(|b| !failed.contains(&b.name) && self.health.is_up(&b.name));
                    let Some(b) = usable else {
                        // Not started yet: it may move to another bridge (once; a placement that
                        // comes back was claimed again by a peer with calls in it).
                        if p.participants == 0 && !abandoned {
                            abandoned = true;
                            self.directory
                                .abandon(conference, &p.bridge)
                                .await
                                .map_err(unavailable)?;
                            continue;
                        }
                        return Err(reject(
                            503,
                            "Service Unavailable",
                            format!(
                                "bridge {} of conference {conference} is unavailable",
                                p.bridge
                            ),
                        ));
                    };
                    let load = self
                        .directory
                        .bridge_load(&b.name)
                        .await
                        .map_err(unavailable)?;
                    if load >= b.capacity {
                        return Err(reject(
                            503,
                            "Service Unavailable",
                            format!("bridge {} of conference {conference} is full", b.name),
                        ));
                    }
                    b
                }
                None => {
                    let mut chosen = None;
                    let (mut healthy, mut full) = (0usize, 0usize);
                    for b in rank_bridges(conference, cfg.bridges.values()) {
                        if failed.contains(&b.name) || !self.health.is_up(&b.name) {
                            continue;
                        }
                        healthy += 1;
                        if self
                            .directory
                            .bridge_load(&b.name)
                            .await
                            .map_err(unavailable)?
                            >= b.capacity
                        {
                            full += 1;
                            continue;
                        }
                        chosen = Some(b);
                        break;
                    }
                    let Some(b) = chosen else {
                        return Err(reject(
                            503,
                            "Service Unavailable",
                            format!(
                                "no bridge available for {conference}: {} configured, {healthy} healthy, {full} full",
                                cfg.bridges.len()
                            ),
                        ));
                    };
                    let p = self
                        .directory
                        .claim(conference, &b.name)
                        .await
                        .map_err(unavailable)?;
                    match cfg.bridges.get(&p.bridge) {
                        Some(winner) => winner,
                        None => continue,
                    }
                }
            };
            if self
                .directory
                .add_participant(conference, &bridge.name)
                .await
                .map_err(unavailable)?
                .is_some()
            {
                return Ok((bridge.clone(), conference.to_owned()));
            }
        }
        Err(reject(
            503,
            "Service Unavailable",
            format!("placement of {conference} kept changing"),
        ))
    }

    /// Gives back what a call held.
    pub async fn release(&self, route: &Route) {
        self.ledger.release(&route.location, route.kbps);
        self.ledger.discharge_bridge(&route.bridge, route.kbps);
        if let Err(e) = self
            .directory
            .remove_participant(&route.conference, &route.bridge)
            .await
        {
            tracing::warn!(conference = %route.conference, error = %e, "could not count a call out of its conference");
        }
    }
}

/// `sip:<conference>@<bridge host:port>;<params>` from the bridge's configured URI.
fn bridge_request_uri(bridge_uri: &str, user: &str) -> String {
    let rest = bridge_uri.split_once(':').map_or(bridge_uri, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let user: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.!~*'()&=+$,;?/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("sip:{user}@{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> RoutingConfig {
        let entries = [
            (
                "bridge/b1".to_owned(),
                json!({"uri": "sip:127.0.0.1:5070", "capacity": 2}),
            ),
            (
                "bridge/b2".to_owned(),
                json!({"uri": "sip:127.0.0.2:5070;transport=tcp", "capacity": 2}),
            ),
            (
                "alias/meet".to_owned(),
                json!({"pattern": "^meet\\.(\\d+)@example\\.com$", "conference": "meet-$1", "call_kbps": 768, "location": "default"}),
            ),
            ("location/default".to_owned(), json!({"limit_kbps": 2000})),
            (
                "bridge/bad".to_owned(),
                json!({"uri": "sip:bridge.example.com", "capacity": 2}),
            ),
        ];
        let (c, errors) = RoutingConfig::from_entries(entries.iter().map(|(k, v)| (k.as_str(), v)));
        assert_eq!(errors.len(), 1, "{errors:?}");
        c
    }

    #[test]
    fn options_interval_is_bounded() {
        let parse = |v: serde_json::Value| {
            let entries = [(OPTIONS_INTERVAL_KEY, v)];
            RoutingConfig::from_entries(entries.iter().map(|(k, v)| (*k, v)))
        };
        assert_eq!(
            parse(json!(1500)).0.options_interval,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            parse(json!(0)).0.options_interval,
            Some(std::time::Duration::ZERO)
        );
        for bad in [json!(5), json!(-1), json!("1s"), json!(7_200_000)] {
            let (c, errors) = parse(bad.clone());
            assert_eq!(c.options_interval, None, "{bad}");
            assert_eq!(errors.len(), 1, "{bad}");
            assert_eq!(errors[0].key, OPTIONS_INTERVAL_KEY);
        }
        assert_eq!(cfg().options_interval, None);
    }

    #[test]
    fn max_call_duration_and_options_failures_are_bounded() {
        let parse = |k: &'static str, v: serde_json::Value| {
            let entries = [(k, v)];
            RoutingConfig::from_entries(entries.iter().map(|(k, v)| (*k, v)))
        };
        assert_eq!(
            parse(MAX_CALL_DURATION_KEY, json!(3600))
                .0
                .max_call_duration,
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(
            parse(OPTIONS_FAILURES_KEY, json!(5)).0.options_failures,
            Some(5)
        );
        for (key, bad) in [
            (MAX_CALL_DURATION_KEY, json!(0)),
            (MAX_CALL_DURATION_KEY, json!(-5)),
            (MAX_CALL_DURATION_KEY, json!("1h")),
            (MAX_CALL_DURATION_KEY, json!(31 * 86_400)),
            (OPTIONS_FAILURES_KEY, json!(0)),
            (OPTIONS_FAILURES_KEY, json!(101)),
            (OPTIONS_FAILURES_KEY, json!(1.5)),
        ] {
            let (c, errors) = parse(key, bad.clone());
            assert_eq!(
                (c.max_call_duration, c.options_failures),
                (None, None),
                "{key} {bad}"
            );
            assert_eq!(errors.len(), 1, "{key} {bad}");
            assert!(
                errors[0]
                    .to_string()
                    .starts_with(&format!("configuration key {key}: expected")),
                "{}",
                errors[0]
            );
        }
        assert!(
            parse(MAX_CALL_DURATION_KEY, json!(0)).1[0]
                .reason
                .contains("0 would end every call")
        );
        assert_eq!(
            (cfg().max_call_duration, cfg().options_failures),
            (None, None)
        );
    }

    fn router() -> Router<MemoryDirectory, MemoryLedger> {
        Router {
            directory: MemoryDirectory::default(),
            ledger: MemoryLedger::default(),
            health: Arc::default(),
        }
    }

    fn req(called: &str) -> RouteRequest {
        RouteRequest {
            called: called.to_owned(),
            failed_bridges: vec![],
            previous: None,
        }
    }

    #[tokio::test]
    async fn routes_admits_and_rejects() {
        let (c, r) = (cfg(), router());
        let RouteDecision::Forward { route, uri, .. } =
            r.route(&c, &req("meet.1000@example.com")).await
        else {
            panic!()
        };
        assert_eq!(route.conference, "meet-1000");
        assert!(uri.starts_with("sip:meet-1000@127.0.0."), "{uri}");
        let RouteDecision::Forward { route: r2, .. } =
            r.route(&c, &req("meet.1000@example.com")).await
        else {
            panic!()
        };
        assert_eq!(r2.bridge, route.bridge);
        // 2 × 768 used of 2000: the third is refused for bandwidth, naming the location.
        let RouteDecision::Reject { code, warning, .. } =
            r.route(&c, &req("meet.1001@example.com")).await
        else {
            panic!()
        };
        assert_eq!(code, 503);
        assert!(warning.unwrap().contains("location default"));
        r.release(&r2).await;
        assert!(matches!(
            r.route(&c, &req("meet.1001@example.com")).await,
            RouteDecision::Forward { .. }
        ));
        let RouteDecision::Reject { code, .. } = r.route(&c, &req("other@example.com")).await
        else {
            panic!()
        };
        assert_eq!(code, 404);
    }

    #[tokio::test]
    async fn full_or_failed_bridge_moves_new_conference_to_the_next() {
        let (c, r) = (cfg(), router());
        let first = rank_bridges("meet-7", c.bridges.values())[0].name.clone();
        let RouteDecision::Forward { route, .. } = r
            .route(
                &c,
                &RouteRequest {
                    called: "meet.7@example.com".into(),
                    failed_bridges: vec![first.clone()],
                    previous: None,
                },
            )
            .await
        else {
            panic!()
        };
        assert_ne!(route.bridge, first);
        r.health.set(&route.bridge, false);
        r.release(&route).await;
        let RouteDecision::Forward { route, .. } = r.route(&c, &req("meet.7@example.com")).await
        else {
            panic!()
        };
        assert_eq!(route.bridge, first);
    }
}
