//! Fault injection on the outbound path, for tests on kernels without netem: per-peer delay,
//! jitter, loss, duplication and reordering, reproducible from a seed.
//!
//! Sans-IO like the SA core: the driver asks [`FaultInjector::handle_packet`] what to do with each
//! outbound packet and keeps the delayed ones until their time comes.

use std::time::{Duration, Instant};

/// What to do to one peer's outbound packets. The default injects nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Fixed delay added to every packet.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ±`jitter` around `delay` (never below zero).
    pub jitter: Duration,
    /// Probability (0..=1) that a packet is dropped.
    pub loss: f64,
    /// Probability (0..=1) that a packet is sent twice.
    pub duplicate: f64,
    /// Probability (0..=1) that a packet is held back by [`REORDER_HOLD`] (or twice the jitter if
    /// larger), so that packets sent after it overtake it.
    pub reorder: f64,
    /// Seed of the random choices, so that a failing run can be replayed.
    pub seed: u64,
}

/// Minimum extra delay of a reordered packet.
pub const REORDER_HOLD: Duration = Duration::from_millis(1);

impl FaultConfig {
    /// Whether this configuration changes anything at all.
    pub fn is_active(&self) -> bool {
        !self.delay.is_zero()
            || !self.jitter.is_zero()
            || self.loss > 0.0
            || self.duplicate > 0.0
            || self.reorder > 0.0
    }
}

/// The fate of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Do not send it.
    Drop,
    /// Send it at `at` (now or later), and a copy at `duplicate_at` if set.
    Send {
        /// When to send it.
        at: Instant,
        /// When to send the duplicate.
        duplicate_at: Option<Instant>,
    },
}

/// What the fault injection did, per peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Packets dropped on purpose.
    pub dropped: u64,
    /// Packets sent twice.
    pub duplicated: u64,
    /// Packets held back to be overtaken.
    pub reordered: u64,
    /// Packets delayed (all of them when a delay or jitter is set).
    pub delayed: u64,
    /// Delayed packets dropped because the driver's delay queue was full.
    pub queue_overflows: u64,
}

/// Seeded decisions for one peer's outbound packets.
#[derive(Clone, Debug)]
pub struct FaultInjector {
    config: FaultConfig,
    rng: u64,
    counters: FaultCounters,
}

impl FaultInjector {
    /// An injector applying `config`.
    pub fn new(config: FaultConfig) -> Self {
        Self {
            config,
            rng: config.seed,
            counters: FaultCounters::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// What has been done so far.
    pub fn counters(&self) -> FaultCounters {
        self.counters
    }

    /// Counts a delayed packet the driver had no room for.
    pub fn handle_queue_overflow(&mut self) {
        self.counters.queue_overflows += 1;
    }

    /// SplitMix64: small, fast and good enough for test faults; reproducible from the seed.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_unit() < p
    }

    fn delay(&mut self) -> Duration {
        let jitter = self.config.jitter;
        if jitter.is_zero() {
            return self.config.delay;
        }
        let offset = jitter.mul_f64(self.next_unit() * 2.0);
        (self.config.delay + offset).saturating_sub(jitter)
    }

    /// Decides the fate of a packet sent at `now`.
    pub fn handle_packet(&mut self, now: Instant) -> Verdict {
        if !self.config.is_active() {
            return Verdict::Send {
                at: now,
                duplicate_at: None,
            };
        }
        if self.chance(self.config.loss) {
            self.counters.dropped += 1;
            return Verdict::Drop;
        }
        let mut delay = self.delay();
        if self.chance(self.config.reorder) {
            self.counters.reordered += 1;
            delay += REORDER_HOLD.max(self.config.jitter * 2);
        }
        if !delay.is_zero() {
            self.counters.delayed += 1;
        }
        let duplicate_at = if self.chance(self.config.duplicate) {
            self.counters.duplicated += 1;
            Some(now + self.delay())
        } else {
            None
        };
        Verdict::Send {
            at: now + delay,
            duplicate_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default() {
        let now = Instant::now();
        let mut f = FaultInjector::new(FaultConfig::default());
        for _ in 0..1000 {
            assert_eq!(
                f.handle_packet(now),
                Verdict::Send {
                    at: now,
                    duplicate_at: None
                }
            );
        }
        assert_eq!(f.counters(), FaultCounters::default());
    }

    #[test]
    fn rates_and_delays_follow_the_configuration() {
        let seed = 0x5eed_0001;
        let now = Instant::now();
        let config = FaultConfig {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            loss: 0.1,
            duplicate: 0.05,
            reorder: 0.02,
            seed,
        };
        let mut f = FaultInjector::new(config);
        let n = 20_000;
        for _ in 0..n {
            match f.handle_packet(now) {
                Verdict::Drop => {}
                Verdict::Send { at, duplicate_at } => {
                    let d = at - now;
                    assert!(d >= Duration::from_millis(15), "seed {seed}: delay {d:?}");
                    assert!(
                        d <= Duration::from_millis(25) + Duration::from_millis(10),
                        "seed {seed}: delay {d:?}"
                    );
                    if let Some(dup) = duplicate_at {
                        assert!(dup - now >= Duration::from_millis(15), "seed {seed}");
                    }
                }
            }
        }
        let c = f.counters();
        let near = |count: u64, p: f64| ((count as f64 / n as f64) - p).abs() < p * 0.25;
        assert!(near(c.dropped, 0.1), "seed {seed}: {c:?}");
        assert!(near(c.duplicated, 0.05 * 0.9), "seed {seed}: {c:?}");
        assert!(near(c.reordered, 0.02 * 0.9), "seed {seed}: {c:?}");
    }

    #[test]
    fn same_seed_same_decisions() {
        let now = Instant::now();
        let config = FaultConfig {
            loss: 0.5,
            jitter: Duration::from_millis(3),
            seed: 42,
            ..FaultConfig::default()
        };
        let mut a = FaultInjector::new(config);
        let mut b = FaultInjector::new(config);
        for _ in 0..500 {
            assert_eq!(a.handle_packet(now), b.handle_packet(now));
        }
    }
}
