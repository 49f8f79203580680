//! Conference placement, participant counts and the routing configuration on the replicated store.
//!
//! # Keys (namespace `conference`)
//! - `place/<conference>/<origin>` → `{"bridge": "b1"}`: one peer's *claim* that the conference
//!   runs on that bridge. Each peer writes only its own claim key, so claims never overwrite each
//!   other; the placement in force is the claim with the **lowest stamp** (first writer wins).
//! - `calls/<conference>/<origin>` → `{"bridges": {"b1": 2}, "updated_ms": …}`: the calls *this*
//!   peer carries in the conference, by bridge. Again one writer per key, so counts cannot be lost
//!   to a last-writer-wins conflict; the conference's participants are the sum over peers.
//!
//! `<origin>` is the writing peer's origin id (low 32 bits of its management address) in 8 hex
//! digits.
//!
//! # Why the placement is the same whichever peer decides
//! 1. Every peer ranks the bridges by rendezvous hashing over the replicated bridge list
//!    ([`super::routing::rank_bridges`]), so with the same configuration and health view two peers
//!    placing the same new conference at the same moment *choose the same bridge*: their claims
//!    agree and the race is benign.
//! 2. When their views differ (one sees a bridge down, or full), the claims differ. A claim is
//!    written through the replication service and waits (bounded) until every connected peer
//!    acknowledged it, then for a short settle time, and the placement is read back. A peer
//!    acknowledges only after applying our claim, and streams its own committed writes before the
//!    acknowledgement, so each side reads both claims and picks the same, earliest one; the call
//!    follows it. A claim written *after* seeing another peer's carries a later stamp and loses.
//! 3. Across a partition both sides may place the conference; when it heals, the earliest claim
//!    wins everywhere and new calls follow it (calls already up stay where they are; this is
//!    counted as a placement conflict).
//!
//! # Soft state
//! Counts carry the time they were written. Each peer rewrites its non-zero counts every 30 s, and
//! counts older than 100 s are ignored, so a peer that died with calls up stops holding bridge
//! capacity. A conference whose claims are older than 30 s and that has no live count is removed.
//! A peer that restarts deletes the counts it left behind; a peer with calls in a conference that
//! lost its placement (removed concurrently) claims it again for the bridge it uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

use confmesh_replication::hlc::Hlc;
use confmesh_replication::model::Namespace;
use confmesh_replication::service::{Service, WriteError};
use confmesh_replication::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, OwnedMutexGuard, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::routing::{ConferenceDirectory, DirectoryError, Placement, RoutingConfig};
use crate::eventlog::wall_ms;
use crate::status::ConferenceStatus;

/// Key prefix of placement claims.
pub const CLAIM_PREFIX: &str = "place/";
/// Key prefix of per-peer participant counts.
pub const CALLS_PREFIX: &str = "calls/";
/// Shared-configuration prefixes the routing configuration is built from (SPEC.md §7, and
/// `sip/options_interval_ms`).
const CONFIG_PREFIXES: [&str; 4] = ["bridge/", "alias/", "location/", "sip/"];

/// Longest wait for connected peers to acknowledge a claim; beyond it the claim stands locally
/// (a slow or partitioned peer must not hold up calls).
const CLAIM_ACK_TIMEOUT: Duration = Duration::from_millis(300);
/// Extra wait after the acknowledgements, for a peer's claim committed just before it applied ours
/// but not yet streamed to us.
const CLAIM_SETTLE: Duration = Duration::from_millis(25);
/// When this peer's last call of a conference ends while other peers still count calls, the
/// conference is checked again after this long (their last calls may have ended at the same time).
const END_RECHECK: Duration = Duration::from_secs(1);
/// How often counts are refreshed, placements repaired and orphans removed.
pub const MAINTAIN_INTERVAL: Duration = Duration::from_secs(5);
/// A peer rewrites its counts at least this often.
const REFRESH_MS: u64 = 30_000;
/// Counts older than this are a dead peer's and ignored (three refreshes plus a maintenance tick).
const COUNT_EXPIRY_MS: u64 = 3 * REFRESH_MS + 10_000;
/// A placement without live counts is removed once all its claims are this old.
const ORPHAN_GRACE_MS: u64 = 30_000;
/// Other peers' counts are read from the store again at least this often even when the store did
/// not change, so that a dead peer's counts stop counting within a second of their expiry.
const OTHERS_VIEW_TTL_MS: u64 = 1_000;
/// Configuration reloads are coalesced over this window (every call changes the store).
const RELOAD_COALESCE: Duration = Duration::from_millis(50);

#[derive(Serialize, Deserialize)]
struct ClaimValue {
    bridge: String,
}

#[derive(Serialize, Deserialize, Default, Clone, PartialEq, Eq, Debug)]
struct CallsValue {
    bridges: BTreeMap<String, u32>,
    updated_ms: u64,
}

impl CallsValue {
    fn live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.updated_ms) <= COUNT_EXPIRY_MS
    }

    fn total(&self) -> u32 {
        self.bridges
            .values()
            .fold(0u32, |a, n| a.saturating_add(*n))
    }
}

/// This peer's calls in one conference, by bridge, and when they were last written.
#[derive(Default)]
struct OwnCalls {
    bridges: BTreeMap<String, u32>,
    written_ms: u64,
}

/// Counters of the directory for status and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectoryStats {
    /// Placements this peer claimed.
    pub claims: u64,
    /// Claims of this peer that lost to an earlier claim of another peer.
    pub claims_lost: u64,
    /// Conferences in which this peer carries calls on another bridge than the placement in force
    /// (a partition healed with both sides having placed the conference), at the last
    /// maintenance pass.
    pub placement_conflicts: u64,
    /// Placements claimed again because they vanished while this peer still had calls.
    pub repairs: u64,
    /// Conferences removed because nobody had calls in them any more.
    pub orphans_removed: u64,
    /// Store entries under our prefixes that did not parse (written by a newer or broken peer).
    pub malformed_entries: u64,
}

#[derive(Default)]
struct Counters {
    claims: AtomicU64,
    claims_lost: AtomicU64,
    placement_conflicts: AtomicU64,
    repairs: AtomicU64,
    orphans_removed: AtomicU64,
    malformed_entries: AtomicU64,
}

struct Inner {
    store: Arc<Store>,
    origin: u32,
    replication: RwLock<Option<Arc<Service>>>,
    /// One lock per conference with work in flight: this peer's operations on a conference are
    /// serialised (its count key is written in order), different conferences proceed in parallel.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// This peer's calls: the source of truth for its own `calls/…` keys.
    own: Mutex<HashMap<String, OwnCalls>>,
    counters: Counters,
    /// The store's commit counter ([`Store::subscribe`]): the cached views below hold for one
    /// value of it, and every commit (ours or a peer's, replicated) moves it.
    version: watch::Receiver<u64>,
    /// Other peers' live counts summed by conference and by bridge, for one store version.
    others: Mutex<Option<OthersView>>,
    /// The placement in force by conference, for one store version.
    placements: Mutex<(u64, Placements)>,
    /// Conferences whose count key must be rewritten from `own` by the flusher.
    dirty: Mutex<HashSet<String>>,
    /// Wakes the flusher.
    flush: Arc<Notify>,
    flusher_started: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The flusher holds only a weak reference between batches: let it see we are gone.
        self.flush.notify_one();
    }
}

/// The placement in force by conference (its claim's stamp and the bridge), or none.
type Placements = HashMap<String, Option<(Hlc, String)>>;

/// Other peers' live participant counts, summed, as read from the store at one version.
struct OthersView {
    version: u64,
    built_ms: u64,
    by_conference: HashMap<String, u32>,
    by_bridge: HashMap<String, u32>,
}

/// The [`ConferenceDirectory`] on the replicated store (see the module docs for the design).
#[derive(Clone)]
pub struct StoreDirectory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StoreDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreDirectory")
            .field("origin", &format_args!("{:08x}", self.inner.origin))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps and counters: nothing a panic elsewhere could leave half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(e: impl std::fmt::Display) -> DirectoryError {
    DirectoryError::Unavailable(e.to_string())
}

/// `(conference, origin)` of a key under `prefix`, if it is one of ours.
fn parse_key<'k>(key: &'k str, prefix: &str) -> Option<(&'k str, u32)> {
    let (conference, origin) = key.strip_prefix(prefix)?.rsplit_once('/')?;
    if origin.len() != 8 {
        return None;
    }
    Some((conference, u32::from_str_radix(origin, 16).ok()?))
}

fn key(prefix: &str, conference: &str, origin: u32) -> String {
    format!("{prefix}{conference}/{origin:08x}")
}

/// Holds a conference's lock; forgets the lock when nobody else waits for it.
struct ConfGuard<'a> {
    inner: &'a Inner,
    conference: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for ConfGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = lock(&self.inner.locks);
        // Held by the map and by us only: no other task is using or waiting on it.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.conference);
        }
    }
}

impl StoreDirectory {
    /// A directory on `store`, for the peer whose origin id is the store's.
    pub fn new(store: Arc<Store>) -> StoreDirectory {
        StoreDirectory {
            inner: Arc::new(Inner {
                origin: store.origin(),
                replication: RwLock::new(None),
                locks: Mutex::new(HashMap::new()),
                own: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                version: store.subscribe(),
                others: Mutex::new(None),
                placements: Mutex::new((0, HashMap::new())),
                dirty: Mutex::new(HashSet::new()),
                flush: Arc::new(Notify::new()),
                flusher_started: AtomicBool::new(false),
                store,
            }),
        }
    }

    /// While clustered, claims go through the replication service so that they wait for the
    /// connected peers' acknowledgements; `None` when standalone (nobody to race with).
    pub fn set_replication(&self, service: Option<Arc<Service>>) {
        *self
            .inner
            .replication
            .write()
            .unwrap_or_else(PoisonError::into_inner) = service;
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> DirectoryStats {
        let c = &self.inner.counters;
        DirectoryStats {
            claims: c.claims.load(Ordering::Relaxed),
            claims_lost: c.claims_lost.load(Ordering::Relaxed),
            placement_conflicts: c.placement_conflicts.load(Ordering::Relaxed),
            repairs: c.repairs.load(Ordering::Relaxed),
            orphans_removed: c.orphans_removed.load(Ordering::Relaxed),
            malformed_entries: c.malformed_entries.load(Ordering::Relaxed),
        }
    }

    async fn lock_conference(&self, conference: &str) -> ConfGuard<'_> {
        let l = lock(&self.inner.locks)
            .entry(conference.to_owned())
            .or_default()
            .clone();
        let guard = Some(l.clone().lock_owned().await);
        ConfGuard {
            inner: &self.inner,
            conference: conference.to_owned(),
            lock: l,
            guard,
        }
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    fn malformed(&self, key: &str) {
        self.inner
            .counters
            .malformed_entries
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key, "conference status entry does not parse; ignored");
    }

    /// Every claim of `conference`: `(key, stamp, bridge)`.
    fn claims(&self, conference: &str) -> Result<Vec<(String, Hlc, String)>, StoreError> {
        let store = self.store();
        let mut out = Vec::new();
        for (k, _) in store.list(
            Namespace::Conference,
            &format!("{CLAIM_PREFIX}{conference}/"),
        )? {
            if parse_key(&k, CLAIM_PREFIX).map(|(c, _)| c) != Some(conference) {
                continue;
            }
            // The stamp decides; read it with the value it belongs to.
            let Some(entry) = store.get_entry(Namespace::Conference, &k)? else {
                continue;
            };
            let Some(value) = entry.value else { continue };
            match serde_json::from_value::<ClaimValue>(value) {
                Ok(c) => out.push((k, entry.stamp, c.bridge)),
                Err(_) => self.malformed(&k),
            }
        }
        Ok(out)
    }

    /// The placement in force: the earliest claim. Read from the store once per store version
    /// and conference (every call asks; the claims change only when a conference is placed,
    /// moved or ended, each a commit that moves the version).
    fn placed_on(&self, conference: &str) -> Result<Option<(Hlc, String)>, StoreError> {
        // The version is read before the data, so what is cached under it is at least as new.
        let version = *self.inner.version.borrow();
        {
            let cache = lock(&self.inner.placements);
            if cache.0 == version {
                if let Some(p) = cache.1.get(conference) {
                    return Ok(p.clone());
                }
            }
        }
        let placed = self
            .claims(conference)?
            .into_iter()
            .map(|(_, s, b)| (s, b))
            .min();
        let mut cache = lock(&self.inner.placements);
        if cache.0 != version {
            *cache = (version, HashMap::new());
        }
        cache.1.insert(conference.to_owned(), placed.clone());
        Ok(placed)
    }

    /// Runs `f` on the other peers' live counts, read from the store again only when it changed
    /// (or after [`OTHERS_VIEW_TTL_MS`], for expiry). Before, every call listed and decoded every
    /// count key of every conference (a third of the CPU of a call under load).
    fn with_others<R>(&self, f: impl FnOnce(&OthersView) -> R) -> Result<R, StoreError> {
        let version = *self.inner.version.borrow();
        let now = wall_ms();
        {
            let cached = lock(&self.inner.others);
            if let Some(v) = cached.as_ref().filter(|v| {
                v.version == version && now.saturating_sub(v.built_ms) < OTHERS_VIEW_TTL_MS
            }) {
                return Ok(f(v));
            }
        }
        let mut view = OthersView {
            version,
            built_ms: now,
            by_conference: HashMap::new(),
            by_bridge: HashMap::new(),
        };
        for (conference, v) in self.others_calls(CALLS_PREFIX, now)? {
            let n = view.by_conference.entry(conference).or_default();
            *n = n.saturating_add(v.total());
            for (bridge, k) in v.bridges {
                let n = view.by_bridge.entry(bridge).or_default();
                *n = n.saturating_add(k);
            }
        }
        let r = f(&view);
        *lock(&self.inner.others) = Some(view);
        Ok(r)
    }

    /// Asks the flusher to write this peer's count key of `conference` (see [`Self::flush_counts`]).
    fn mark_dirty(&self, conference: &str) {
        lock(&self.inner.dirty).insert(conference.to_owned());
        if !self.inner.flusher_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(flusher(
                Arc::downgrade(&self.inner),
                self.inner.flush.clone(),
            ));
        }
        self.inner.flush.notify_one();
    }

    /// Writes the count keys of every conference marked dirty, concurrently (the store commits
    /// them together), each under its conference's lock so that they are written in order.
    async fn flush_counts(&self) {
        let batch: Vec<String> = lock(&self.inner.dirty).drain().collect();
        let mut writes = JoinSet::new();
        for conference in batch {
            let dir = self.clone();
            writes.spawn(async move {
                let _g = dir.lock_conference(&conference).await;
                if let Err(e) = dir.write_own(&conference).await {
                    // Soft state: the next maintenance pass rewrites what is not in the store.
                    tracing::warn!(conference, error = %e, "cannot write this peer's participant count");
                }
            });
        }
        while writes.join_next().await.is_some() {}
    }

    /// Other peers' live counts under `prefix` (all conferences, or one): `(conference, value)`.
    fn others_calls(
        &self,
        prefix: &str,
        now_ms: u64,
    ) -> Result<Vec<(String, CallsValue)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.store().list(Namespace::Conference, prefix)? {
            let Some((conference, origin)) = parse_key(&k, CALLS_PREFIX) else {
                self.malformed(&k);
                continue;
            };
            if origin == self.inner.origin {
                continue;
            }
            match serde_json::from_value::<CallsValue>(v) {
                Ok(c) if c.live(now_ms) => out.push((conference.to_owned(), c)),
                Ok(_) => {}
                Err(_) => self.malformed(&k),
            }
        }
        Ok(out)
    }

    /// Calls in `conference`, cluster-wide (this peer's from memory, the others' from the store).
    fn total_calls(&self, conference: &str) -> Result<u32, StoreError> {
        let own = lock(&self.inner.own)
            .get(conference)
            .map_or(0, |o| o.bridges.values().sum::<u32>());
        let others = self.with_others(|v| v.by_conference.get(conference).copied().unwrap_or(0))?;
        Ok(own.saturating_add(others))
    }

    /// Writes this peer's count key for `conference` from memory (deletes it at zero).
    async fn write_own(&self, conference: &str) -> Result<(), StoreError> {
        let now = wall_ms();
        let value = {
            let mut own = lock(&self.inner.own);
            match own.get_mut(conference) {
                Some(o) if !o.bridges.is_empty() => {
                    o.written_ms = now;
                    Some(CallsValue {
                        bridges: o.bridges.clone(),
                        updated_ms: now,
                    })
                }
                _ => {
                    own.remove(conference);
                    None
                }
            }
        };
        let value = value.map(|v| serde_json::to_value(v).unwrap_or(Value::Null));
        let k = key(CALLS_PREFIX, conference, self.inner.origin);
        self.store()
            .write_async(Namespace::Conference, &k, value, now)
            .await
            .map(|_| ())
    }

    /// Writes this peer's claim; while clustered, waits for the connected peers to have it.
    async fn write_claim(&self, conference: &str, bridge: &str) -> Result<(), DirectoryError> {
        let k = key(CLAIM_PREFIX, conference, self.inner.origin);
        let value = serde_json::to_value(ClaimValue {
            bridge: bridge.to_owned(),
        })
        .map_err(unavailable)?;
        self.inner.counters.claims.fetch_add(1, Ordering::Relaxed);
        let service = self
            .inner
            .replication
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(service) = service else {
            self.store()
                .write_async(Namespace::Conference, &k, Some(value), wall_ms())
                .await
                .map_err(unavailable)?;
            return Ok(());
        };
        let connected = service
            .status()
            .peers
            .iter()
            .filter(|p| p.connected)
            .count();
        match service
            .write(
                Namespace::Conference,
                &k,
                Some(value),
                connected,
                CLAIM_ACK_TIMEOUT,
            )
            .await
        {
            Ok(_) => {}
            Err(WriteError::NotReplicated {
                acked_by, wanted, ..
            }) => {
                tracing::info!(
                    conference,
                    bridge,
                    acked_by,
                    wanted,
                    "placement claim not acknowledged by every connected peer in time"
                );
            }
            Err(e) => return Err(unavailable(e)),
        }
        if connected > 0 {
            tokio::time::sleep(CLAIM_SETTLE).await;
        }
        Ok(())
    }

    async fn delete_claims(
        &self,
        conference: &str,
        bridge: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for (k, _, b) in self.claims(conference)? {
            if bridge.is_none_or(|want| want == b) {
                self.store()
                    .write_async(Namespace::Conference, &k, None, wall_ms())
                    .await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every placed conference with its bridge and cluster-wide calls, by name (status).
    pub fn conferences(&self) -> Result<Vec<ConferenceStatus>, StoreError> {
        let mut placed: BTreeMap<String, (Hlc, String)> = BTreeMap::new();
        for (k, _) in self.store().list(Namespace::Conference, CLAIM_PREFIX)? {
            let Some((conference, _)) = parse_key(&k, CLAIM_PREFIX) else {
                self.malformed(&k);
                continue;
            };
            let Some(entry) = self.store().get_entry(Namespace::Conference, &k)? else {
                continue;
            };
            let Some(Ok(claim)) = entry.value.map(serde_json::from_value::<ClaimValue>) else {
                continue;
            };
            let slot = placed
                .entry(conference.to_owned())
                .or_insert((entry.stamp, claim.bridge.clone()));
            if entry.stamp < slot.0 {
                *slot = (entry.stamp, claim.bridge);
            }
        }
        let mut calls: HashMap<String, u32> = HashMap::new();
        for (c, v) in self.others_calls(CALLS_PREFIX, wall_ms())? {
            let n = calls.entry(c).or_default();
            *n = n.saturating_add(v.total());
        }
        for (c, o) in lock(&self.inner.own).iter() {
            let n = calls.entry(c.clone()).or_default();
            *n = n.saturating_add(o.bridges.values().sum::<u32>());
        }
        Ok(placed
            .into_iter()
            .map(|(name, (_, bridge))| {
                let calls = calls.get(&name).copied().unwrap_or(0);
                ConferenceStatus {
                    name,
                    bridge,
                    calls,
                }
            })
            .collect())
    }

    /// Periodic work (every [`MAINTAIN_INTERVAL`]): rewrite this peer's counts that are stale or
    /// missing from the store (after a restart, join or restore), delete counts it left behind,
    /// claim again placements that vanished under its calls, and remove orphaned conferences.
    pub async fn maintain(&self) -> Result<(), DirectoryError> {
        let now = wall_ms();
        let origin = self.inner.origin;
        // 1. Our own count keys.
        let mut stored: HashMap<String, CallsValue> = HashMap::new();
        for (k, v) in self
            .store()
            .list(Namespace::Conference, CALLS_PREFIX)
            .map_err(unavailable)?
        {
            if let Some((c, o)) = parse_key(&k, CALLS_PREFIX) {
                if o == origin {
                    stored.insert(c.to_owned(), serde_json::from_value(v).unwrap_or_default());
                }
            }
        }
        let own: Vec<(String, BTreeMap<String, u32>, u64)> = lock(&self.inner.own)
            .iter()
            .map(|(c, o)| (c.clone(), o.bridges.clone(), o.written_ms))
            .collect();
        for (conference, bridges, written_ms) in &own {
            let fresh = stored
                .remove(conference)
                .is_some_and(|v| &v.bridges == bridges)
                && now.saturating_sub(*written_ms) < REFRESH_MS;
            if !fresh {
                let _g = self.lock_conference(conference).await;
                self.write_own(conference).await.map_err(unavailable)?;
            }
        }
        for conference in stored.into_keys() {
            let _g = self.lock_conference(&conference).await;
            if !lock(&self.inner.own).contains_key(&conference) {
                let k = key(CALLS_PREFIX, &conference, origin);
                self.store()
                    .write_async(Namespace::Conference, &k, None, now)
                    .await
                    .map_err(unavailable)?;
            }
        }
        // 2. Placements under our calls.
        let mut conflicts = 0;
        for (conference, bridges, _) in &own {
            let _g = self.lock_conference(conference).await;
            match self.placed_on(conference).map_err(unavailable)? {
                None => {
                    let Some((bridge, _)) = bridges.iter().max_by_key(|(_, n)| **n) else {
                        continue;
                    };
                    tracing::info!(
                        conference,
                        bridge,
                        "placement vanished while this peer has calls in it; claiming it again"
                    );
                    self.inner.counters.repairs.fetch_add(1, Ordering::Relaxed);
                    self.write_claim(conference, bridge).await?;
                }
                Some((_, placed)) if bridges.keys().any(|b| *b != placed) => {
                    conflicts += 1;
                    tracing::warn!(conference, %placed, "this peer carries calls of the conference on another bridge than its placement");
                }
                Some(_) => {}
            }
        }
        self.inner
            .counters
            .placement_conflicts
            .store(conflicts, Ordering::Relaxed);
        // 3. Orphans: claims older than the grace period with no live calls anywhere.
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        for (k, _) in self
            .store()
            .list(Namespace::Conference, CLAIM_PREFIX)
            .map_err(unavailable)?
        {
            if let (Some((c, _)), Some(e)) = (
                parse_key(&k, CLAIM_PREFIX),
                self.store()
                    .get_entry(Namespace::Conference, &k)
                    .map_err(unavailable)?,
            ) {
                let t = newest.entry(c.to_owned()).or_default();
                *t = (*t).max(e.stamp.wall_ms);
            }
        }
        for (conference, claimed_ms) in newest {
            if now.saturating_sub(claimed_ms) < ORPHAN_GRACE_MS {
                continue;
            }
            let _g = self.lock_conference(&conference).await;
            if self.total_calls(&conference).map_err(unavailable)? == 0
                && self
                    .delete_claims(&conference, None)
                    .await
                    .map_err(unavailable)?
                    > 0
            {
                self.inner
                    .counters
                    .orphans_removed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(conference, "conference without calls removed");
            }
        }
        Ok(())
    }
}

impl ConferenceDirectory for StoreDirectory {
    async fn placement(&self, conference: &str) -> Result<Option<Placement>, DirectoryError> {
        let Some((_, bridge)) = self.placed_on(conference).map_err(unavailable)? else {
            return Ok(None);
        };
        let participants = self.total_calls(conference).map_err(unavailable)?;
        Ok(Some(Placement {
            bridge,
            participants,
        }))
    }

    async fn claim(&self, conference: &str, bridge: &str) -> Result<Placement, DirectoryError> {
        let _g = self.lock_conference(conference).await;
        if self.placed_on(conference).map_err(unavailable)?.is_none() {
            self.write_claim(conference, bridge).await?;
        }
        let Some((_, winner)) = self.placed_on(conference).map_err(unavailable)? else {
            // Removed between our write and the read (the conference ended elsewhere): the caller
            // routes again.
            return Err(DirectoryError::Unavailable(format!(
                "placement of {conference} was removed while it was claimed"
            )));
        };
        if winner != bridge {
            self.inner
                .counters
                .claims_lost
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conference, ours = bridge, %winner, "an earlier placement claim won");
            // Ours can never win again; leave only the winner behind.
            let k = key(CLAIM_PREFIX, conference, self.inner.origin);
            self.store()
                .write_async(Namespace::Conference, &k, None, wall_ms())
                .await
                .map_err(unavailable)?;
        }
        let participants = self.total_calls(conference).map_err(unavailable)?;
        Ok(Placement {
            bridge: winner,
            participants,
        })
    }

    async fn add_participant(
        &self,
        conference: &str,
        bridge: &str,
    ) -> Result<Option<u32>, DirectoryError> {
        let _g = self.lock_conference(conference).await;
        match self.placed_on(conference).map_err(unavailable)? {
            Some((_, b)) if b == bridge => {}
            _ => return Ok(None),
        }
        {
            let mut own = lock(&self.inner.own);
            let n = own
                .entry(conference.to_owned())
                .or_default()
                .bridges
                .entry(bridge.to_owned())
                .or_default();
            *n = n.saturating_add(1);
        }
        // The count key is soft state (rewritten every 30 s, deleted after a restart), so the call
        // does not wait for it to be durable: the flusher writes it, many calls in one commit.
        self.mark_dirty(conference);
        self.total_calls(conference).map(Some).map_err(unavailable)
    }

    async fn remove_participant(
        &self,
        conference: &str,
        bridge: &str,
    ) -> Result<(), DirectoryError> {
        let _g = self.lock_conference(conference).await;
        self.decrement(conference, bridge);
        if lock(&self.inner.own)
            .get(conference)
            .is_some_and(|o| !o.bridges.is_empty())
        {
            self.mark_dirty(conference);
        } else {
            // Our last call in the conference: written at once, so that whichever peer ends the
            // conference's last call reads every other peer's zero and removes the placement.
            lock(&self.inner.dirty).remove(conference);
            self.write_own(conference).await.map_err(unavailable)?;
        }
        if self.total_calls(conference).map_err(unavailable)? == 0 {
            self.delete_claims(conference, None)
                .await
                .map_err(unavailable)?;
        } else if !lock(&self.inner.own).contains_key(conference) {
            // Our last call ended but others' counts are still there: if their last calls ended
            // at the same moment, each peer saw the other's count and nobody removed the
            // conference. Look again once the counts have crossed.
            let (me, conference) = (self.clone(), conference.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(END_RECHECK).await;
                let _g = me.lock_conference(&conference).await;
                match me.total_calls(&conference) {
                    Ok(0) => {
                        if let Err(e) = me.delete_claims(&conference, None).await {
                            tracing::warn!(conference, error = %e, "cannot remove an ended conference; maintenance will");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(conference, error = %e, "cannot read conference status")
                    }
                }
            });
        }
        Ok(())
    }

    async fn abandon(&self, conference: &str, bridge: &str) -> Result<(), DirectoryError> {
        let _g = self.lock_conference(conference).await;
        if self.total_calls(conference).map_err(unavailable)? == 0 {
            self.delete_claims(conference, Some(bridge))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn bridge_load(&self, bridge: &str) -> Result<u32, DirectoryError> {
        let own = lock(&self.inner.own)
            .values()
            .filter_map(|o| o.bridges.get(bridge))
            .fold(0u32, |a, n| a.saturating_add(*n));
        let others = self
            .with_others(|v| v.by_bridge.get(bridge).copied().unwrap_or(0))
            .map_err(unavailable)?;
        Ok(own.saturating_add(others))
    }
}

impl StoreDirectory {
    fn decrement(&self, conference: &str, bridge: &str) {
        let mut own = lock(&self.inner.own);
        if let Some(o) = own.get_mut(conference) {
            if let Some(n) = o.bridges.get_mut(bridge) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    o.bridges.remove(bridge);
                }
            }
        }
    }
}

/// Reads the routing entries of shared configuration (`bridge/`, `alias/`, `location/`, `sip/`).
fn read_routing_entries(store: &Store) -> Result<Vec<(String, Value)>, StoreError> {
    let mut entries = Vec::new();
    for prefix in CONFIG_PREFIXES {
        entries.extend(store.list(Namespace::Config, prefix)?);
    }
    Ok(entries)
}

fn build_config(entries: &[(String, Value)]) -> Arc<RoutingConfig> {
    let (cfg, errors) = RoutingConfig::from_entries(entries.iter().map(|(k, v)| (k.as_str(), v)));
    for e in errors {
        tracing::warn!(key = %e.key, reason = %e.reason, "shared configuration entry ignored by call routing");
    }
    Arc::new(cfg)
}

/// The routing configuration, rebuilt from the store whenever the store changes.
pub struct RoutingConfigLoader {
    rx: watch::Receiver<Arc<RoutingConfig>>,
    task: Option<JoinHandle<()>>,
}

impl RoutingConfigLoader {
    /// Loads the configuration now and follows every later change of `store` until `stop` turns
    /// true (or its sender is dropped). An unreadable store keeps the last good configuration.
    pub fn start(store: Arc<Store>, mut stop: watch::Receiver<bool>) -> RoutingConfigLoader {
        let mut changes = store.subscribe();
        let mut last = read_routing_entries(&store).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the routing configuration from the store");
            Vec::new()
        });
        let (tx, rx) = watch::channel(build_config(&last));
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    c = changes.changed() => if c.is_err() { return },
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
                changes.borrow_and_update();
                match read_routing_entries(&store) {
                    Ok(entries) if entries != last => {
                        tx.send_replace(build_config(&entries));
                        tracing::info!(entries = entries.len(), "routing configuration reloaded");
                        last = entries;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the routing configuration from the store")
                    }
                }
                // Calls change the store many times a second: coalesce.
                tokio::time::sleep(RELOAD_COALESCE).await;
            }
        });
        RoutingConfigLoader {
            rx,
            task: Some(task),
        }
    }

    /// The configuration in force, updated in place.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingConfig>> {
        self.rx.clone()
    }

    /// Waits for the task after its stop signal.
    pub async fn join(mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RoutingConfigLoader {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Writes participant counts marked dirty until the directory is gone. Between batches it holds
/// only a weak reference, so dropping the last [`StoreDirectory`] ends it.
async fn flusher(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(inner) = inner.upgrade() else { return };
        StoreDirectory { inner }.flush_counts().await;
    }
}
