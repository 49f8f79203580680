//! Hybrid logical clock: the order in which concurrent writes to one key are resolved.
//!
//! A stamp is `(wall_ms, logical, origin)`, compared in that order. The wall part keeps stamps close
//! to real time (so an operator reading them sees when a write happened); the logical part makes a
//! write that causally follows another (the writer had observed it) compare later even when the
//! writer's wall clock is behind; the origin — the writing peer's id — breaks the remaining ties, so
//! that every peer resolves a conflict the same way.

use serde::{Deserialize, Serialize};

/// One timestamp: the version of one write, totally ordered across the cluster.
///
/// The derived `Ord` compares `wall_ms`, then `logical`, then `origin` — the field order is the
/// contract, do not reorder the fields.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as far as the writer knew (never less than any stamp it had
    /// seen).
    pub wall_ms: u64,
    /// Counter that orders writes within one millisecond, or after observing a stamp from a peer
    /// whose clock runs ahead.
    pub logical: u32,
    /// Id of the replica that made the write: the writing peer's origin id (the low 32 bits of its
    /// management IPv4 address), or a fresh id once that peer's content was replaced (join,
    /// restore — see [`crate::store::Store::replace_all`]).
    pub origin: u32,
}

/// Length of [`Hlc::to_bytes`]: the fixed size used in database keys.
pub const HLC_BYTES: usize = 16;

impl Hlc {
    /// The smallest stamp of `origin`: "nothing seen from it yet".
    pub const fn zero(origin: u32) -> Hlc {
        Hlc {
            wall_ms: 0,
            logical: 0,
            origin,
        }
    }

    /// Big-endian encoding whose byte order equals the stamp order, so that stamps can be database
    /// keys and range scans come out in stamp order.
    pub fn to_bytes(self) -> [u8; HLC_BYTES] {
        let mut b = [0u8; HLC_BYTES];
        b[..8].copy_from_slice(&self.wall_ms.to_be_bytes());
        b[8..12].copy_from_slice(&self.logical.to_be_bytes());
        b[12..].copy_from_slice(&self.origin.to_be_bytes());
        b
    }

    /// Inverse of [`Hlc::to_bytes`]; `None` if `b` is not exactly [`HLC_BYTES`] long (a damaged record).
    pub fn from_bytes(b: &[u8]) -> Option<Hlc> {
        let b: &[u8; HLC_BYTES] = b.try_into().ok()?;
        let (w, rest) = b.split_at(8);
        let (l, o) = rest.split_at(4);
        Some(Hlc {
            wall_ms: u64::from_be_bytes(w.try_into().ok()?),
            logical: u32::from_be_bytes(l.try_into().ok()?),
            origin: u32::from_be_bytes(o.try_into().ok()?),
        })
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.origin)
    }
}

/// Why a remote stamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HlcError {
    /// The peer's clock (or its data) is too far in the future: accepting it would drag every
    /// later local stamp forward by the same amount. The peer's clock is at fault; fix its NTP.
    #[error(
        "stamp {stamp} from peer {} is {ahead_ms} ms ahead of the local clock (limit {limit_ms} ms): \
         check NTP on both peers",
        stamp.origin
    )]
    TooFarAhead {
        /// The refused stamp.
        stamp: Hlc,
        /// How far ahead of the local wall clock it is.
        ahead_ms: u64,
        /// The configured limit.
        limit_ms: u64,
    },
}

/// Default limit on how far ahead of local wall time a remote stamp may be (60 s).
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// The clock of one peer: issues stamps for local writes and absorbs stamps seen from others.
///
/// Wall time is passed in by the caller (never read here) so that tests and simulations control it.
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock for peer `origin` that refuses remote stamps more than `max_drift_ms` ahead.
    pub fn new(origin: u32, max_drift_ms: u64) -> HlcClock {
        HlcClock {
            last: Hlc::zero(origin),
            max_drift_ms,
        }
    }

    /// The last stamp issued or observed (with this peer's origin): every later tick is greater.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new stamp for a local write at wall time `wall_ms`, greater than every stamp issued or
    /// observed before.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let origin = self.last.origin;
        self.last = if wall_ms > self.last.wall_ms {
            Hlc {
                wall_ms,
                logical: 0,
                origin,
            }
        } else if let Some(logical) = self.last.logical.checked_add(1) {
            Hlc {
                wall_ms: self.last.wall_ms,
                logical,
                origin,
            }
        } else {
            // 4 billion writes in one millisecond: borrow the next millisecond.
            Hlc {
                wall_ms: self.last.wall_ms.saturating_add(1),
                logical: 0,
                origin,
            }
        };
        self.last
    }

    /// Take note of a stamp seen from a peer so that later local writes order after it.
    ///
    /// Refuses (and ignores) stamps more than the drift limit ahead of `wall_ms`.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), HlcError> {
        self.check(remote, wall_ms)?;
        if (remote.wall_ms, remote.logical) > (self.last.wall_ms, self.last.logical) {
            self.last = Hlc {
                wall_ms: remote.wall_ms,
                logical: remote.logical,
                origin: self.last.origin,
            };
        }
        Ok(())
    }

    /// Continue under another origin (replica) id, keeping the time. Used when a peer's content
    /// was replaced (join, restore): its new writes must not share an id with the writes it lost,
    /// or their stamps would claim to include them (see [`crate::model::VersionVector`]).
    pub fn rebase(&mut self, origin: u32) {
        self.last.origin = origin;
    }

    /// Whether `remote` would be accepted by [`HlcClock::observe`], without changing the clock.
    pub fn check(&self, remote: Hlc, wall_ms: u64) -> Result<(), HlcError> {
        let ahead_ms = remote.wall_ms.saturating_sub(wall_ms);
        if ahead_ms > self.max_drift_ms {
            return Err(HlcError::TooFarAhead {
                stamp: remote,
                ahead_ms,
                limit_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing_even_if_wall_clock_goes_back() {
        let mut c = HlcClock::new(1, DEFAULT_MAX_DRIFT_MS);
        let a = c.tick(1000);
        let b = c.tick(1000);
        let d = c.tick(500);
        let e = c.tick(2000);
        assert!(a < b && b < d && d < e);
        assert_eq!(d.wall_ms, 1000);
        assert_eq!(
            e,
            Hlc {
                wall_ms: 2000,
                logical: 0,
                origin: 1
            }
        );
    }

    #[test]
    fn origin_breaks_ties() {
        let a = Hlc {
            wall_ms: 5,
            logical: 0,
            origin: 1,
        };
        let b = Hlc {
            wall_ms: 5,
            logical: 0,
            origin: 2,
        };
        assert!(a < b);
        assert!(
            Hlc {
                wall_ms: 5,
                logical: 1,
                origin: 1
            } > b
        );
    }

    #[test]
    fn bytes_order_matches_stamp_order() {
        let stamps = [
            Hlc {
                wall_ms: 1,
                logical: 0,
                origin: u32::MAX,
            },
            Hlc {
                wall_ms: 1,
                logical: 1,
                origin: 0,
            },
            Hlc {
                wall_ms: 256,
                logical: 0,
                origin: 0,
            },
            Hlc {
                wall_ms: u64::MAX,
                logical: u32::MAX,
                origin: 7,
            },
        ];
        for w in stamps.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_bytes() < w[1].to_bytes());
        }
        for s in stamps {
            assert_eq!(Hlc::from_bytes(&s.to_bytes()), Some(s));
        }
        assert_eq!(Hlc::from_bytes(&[0u8; 15]), None);
    }

    /// Peer 2's clock is 5 s behind peer 1's. A write on peer 2 that follows (and observed) a write
    /// on peer 1 must still order after it.
    #[test]
    fn causally_later_write_wins_with_slow_clock() {
        let mut fast = HlcClock::new(1, DEFAULT_MAX_DRIFT_MS);
        let mut slow = HlcClock::new(2, DEFAULT_MAX_DRIFT_MS);
        let t = 1_700_000_000_000u64;
        let first = fast.tick(t);
        slow.observe(first, t - 5000).unwrap();
        let second = slow.tick(t - 5000 + 10);
        assert!(second > first, "{second} must be after {first}");
    }

    /// Peer 2's clock is 5 s ahead: its stamps are accepted (within the drift limit) and peer 1's
    /// following write orders after it.
    #[test]
    fn causally_later_write_wins_with_fast_remote_clock() {
        let mut local = HlcClock::new(1, DEFAULT_MAX_DRIFT_MS);
        let mut ahead = HlcClock::new(2, DEFAULT_MAX_DRIFT_MS);
        let t = 1_700_000_000_000u64;
        let first = ahead.tick(t + 5000);
        local.observe(first, t).unwrap();
        let second = local.tick(t + 1);
        assert!(second > first);
    }

    #[test]
    fn refuses_stamps_beyond_the_drift_limit() {
        let mut c = HlcClock::new(1, 60_000);
        let before = c.tick(1000);
        let far = Hlc {
            wall_ms: 1000 + 60_001,
            logical: 0,
            origin: 2,
        };
        let err = c.observe(far, 1000).unwrap_err();
        assert!(matches!(
            err,
            HlcError::TooFarAhead {
                ahead_ms: 60_001,
                ..
            }
        ));
        assert!(err.to_string().contains("NTP"));
        // The clock did not move.
        assert_eq!(c.last(), before);
        c.observe(
            Hlc {
                wall_ms: 61_000,
                logical: 0,
                origin: 2,
            },
            1000,
        )
        .unwrap();
        assert!(
            c.tick(1000)
                > Hlc {
                    wall_ms: 61_000,
                    logical: 0,
                    origin: 2
                }
        );
    }

    #[test]
    fn logical_overflow_moves_to_next_millisecond() {
        let mut c = HlcClock::new(1, DEFAULT_MAX_DRIFT_MS);
        c.observe(
            Hlc {
                wall_ms: 10,
                logical: u32::MAX,
                origin: 3,
            },
            10,
        )
        .unwrap();
        let s = c.tick(10);
        assert_eq!(
            s,
            Hlc {
                wall_ms: 11,
                logical: 0,
                origin: 1
            }
        );
    }
}
