//! What the store holds: shared data only, addressed by namespace and key, versioned by [`Hlc`].
//!
//! **Peer-specific settings cannot be stored.** SPEC §2 rule 8 says that a peer's own settings
//! (addresses, host name, DNS/NTP servers, certificates, rendezvous addresses… — the daemon's
//! `Config` type) are never replicated. The store's API accepts only a [`Namespace`], a string key
//! and a `serde_json::Value`, and [`Namespace`] has deliberately no variant for peer settings, so
//! there is no way to hand them to the store: replicating them is impossible, not merely avoided.
//! Do not add such a variant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hlc::Hlc;

/// Which kind of shared data a key belongs to; each namespace is an independent key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Namespace {
    /// Shared configuration (bridges, aliases, locations, administrator accounts…).
    Config,
    /// Live conference state: conference → bridge placement, participant counts.
    Conference,
}

impl Namespace {
    /// Every namespace, for code that walks the whole store.
    pub const ALL: [Namespace; 2] = [Namespace::Config, Namespace::Conference];

    /// The one-byte tag that prefixes this namespace's keys on disk; stable, part of the file format.
    pub(crate) fn tag(self) -> u8 {
        match self {
            Namespace::Config => 1,
            Namespace::Conference => 2,
        }
    }

    /// Inverse of [`Namespace::tag`]; `None` for an unknown tag (a damaged or newer file).
    pub(crate) fn from_tag(tag: u8) -> Option<Namespace> {
        match tag {
            1 => Some(Namespace::Config),
            2 => Some(Namespace::Conference),
            _ => None,
        }
    }

    /// The name used in logs, CLI output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Config => "config",
            Namespace::Conference => "conference",
        }
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest key accepted, in bytes: keys are names, not data; this also bounds what a peer can send.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value accepted, as compact JSON: keeps every entry far below the sync frame limit.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// One versioned key: the unit of replication and of conflict resolution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The key space.
    pub ns: Namespace,
    /// The key (e.g. `bridge/b1`).
    pub key: String,
    /// The value; `None` is a tombstone: the key was deleted at `stamp`. Tombstones are kept until
    /// every peer has seen them, so that an older write arriving late cannot bring the key back.
    pub value: Option<Value>,
    /// The version: who wrote it and when, in cluster-wide order.
    pub stamp: Hlc,
}

impl Entry {
    /// Last-writer-wins: whether this entry replaces a stored version stamped `current`.
    ///
    /// Strictly greater, so applying the same entry twice changes nothing (idempotent), and the
    /// outcome does not depend on the order in which entries arrive (commutative).
    pub fn supersedes(&self, current: Hlc) -> bool {
        self.stamp > current
    }
}

/// For each origin, the highest stamp seen from it: a compact summary of "what I have".
///
/// Invariant kept by the store and the sync protocol: a peer whose vector says `v[o] = s` holds
/// every write of origin `o` stamped `<= s`, or a write (to the same key) that supersedes it.
/// Comparing two vectors therefore tells exactly what one peer lacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<u32, Hlc>);

impl VersionVector {
    /// An empty vector: nothing seen.
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    /// Highest stamp seen from `origin`, or the zero stamp if none.
    pub fn get(&self, origin: u32) -> Hlc {
        self.0.get(&origin).copied().unwrap_or(Hlc::zero(origin))
    }

    /// Record that `stamp` was seen (keeps the maximum per origin).
    pub fn observe(&mut self, stamp: Hlc) {
        let slot = self
            .0
            .entry(stamp.origin)
            .or_insert(Hlc::zero(stamp.origin));
        if stamp > *slot {
            *slot = stamp;
        }
    }

    /// Pointwise maximum: after receiving everything `other` summarises.
    pub fn merge(&mut self, other: &VersionVector) {
        for s in other.0.values() {
            self.observe(*s);
        }
    }

    /// Whether this vector has seen `stamp` (its origin's entry is at least `stamp`).
    pub fn covers(&self, stamp: Hlc) -> bool {
        self.get(stamp.origin) >= stamp
    }

    /// Whether this vector has seen everything `other` has.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.values().all(|s| self.covers(*s))
    }

    /// Pointwise minimum over several vectors (origins missing from any count as zero): what all of
    /// them have seen. `None` if `vectors` is empty.
    pub fn meet<'a>(vectors: impl IntoIterator<Item = &'a VersionVector>) -> Option<VersionVector> {
        let mut it = vectors.into_iter();
        let mut acc = it.next()?.clone();
        for v in it {
            acc.0.retain(|o, s| {
                let other = v.get(*o);
                if other < *s {
                    *s = other;
                }
                *s > Hlc::zero(*o)
            });
        }
        Some(acc)
    }

    /// The `(origin, highest stamp)` pairs, in origin order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, Hlc)> + '_ {
        self.0.iter().map(|(o, s)| (*o, *s))
    }

    /// Number of origins known.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was seen at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(wall_ms: u64, origin: u32) -> Hlc {
        Hlc {
            wall_ms,
            logical: 0,
            origin,
        }
    }

    #[test]
    fn lww_is_strict_and_order_independent() {
        let a = Entry {
            ns: Namespace::Config,
            key: "k".into(),
            value: Some(1.into()),
            stamp: s(5, 1),
        };
        let b = Entry {
            ns: Namespace::Config,
            key: "k".into(),
            value: None,
            stamp: s(5, 2),
        };
        assert!(b.supersedes(a.stamp));
        assert!(!a.supersedes(b.stamp));
        assert!(!a.supersedes(a.stamp));
    }

    #[test]
    fn vectors_merge_cover_and_meet() {
        let mut a = VersionVector::new();
        a.observe(s(5, 1));
        a.observe(s(3, 1));
        a.observe(s(7, 2));
        assert_eq!(a.get(1), s(5, 1));
        assert!(a.covers(s(4, 1)) && !a.covers(s(6, 1)) && !a.covers(s(1, 3)));
        let mut b = VersionVector::new();
        b.observe(s(9, 1));
        b.observe(s(2, 3));
        let m = VersionVector::meet([&a, &b]).unwrap();
        assert_eq!(m.get(1), s(5, 1));
        assert_eq!(m.get(2), Hlc::zero(2));
        assert_eq!(m.len(), 1);
        let mut c = a.clone();
        c.merge(&b);
        assert!(c.dominates(&a) && c.dominates(&b) && !a.dominates(&c));
        assert_eq!(VersionVector::meet(std::iter::empty()), None);
    }

    #[test]
    fn namespace_tags_round_trip() {
        for ns in Namespace::ALL {
            assert_eq!(Namespace::from_tag(ns.tag()), Some(ns));
        }
        assert_eq!(Namespace::from_tag(0), None);
        assert_eq!(
            serde_json::to_string(&Namespace::Conference).unwrap(),
            "\"conference\""
        );
    }
}
