//! Anti-replay window (RFC 4302 §3.4.3, RFC 4303 §3.4.3) laid out as in RFC 6479: a ring of
//! 64-bit blocks, so that moving the window forward clears whole blocks instead of shifting bits.
//!
//! The check and the update are separate on purpose: the receiver checks before it spends time on
//! the ICV and updates only after the ICV verified, so forged packets cannot move the window.

/// Number of packets behind the highest sequence number that are still accepted.
pub const REPLAY_WINDOW: u32 = 1024;
const BLOCK_BITS: u32 = 64;
/// One spare block beyond the window, so the block being cleared never holds live bits.
const BLOCKS: usize = (REPLAY_WINDOW / BLOCK_BITS) as usize + 1;

/// Why a sequence number was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replayed {
    /// Sequence number 0 is never sent (the first packet is 1).
    Zero,
    /// Left of the window: too old to tell whether it was seen.
    TooOld,
    /// Already received.
    Duplicate,
}

/// The receiver's memory of recently accepted sequence numbers.
#[derive(Clone, Debug)]
pub(crate) struct ReplayWindow {
    /// Highest sequence number accepted so far (0 before the first).
    top: u32,
    bits: [u64; BLOCKS],
}

impl ReplayWindow {
    /// A window that has accepted nothing.
    pub(crate) fn new() -> Self {
        Self {
            top: 0,
            bits: [0; BLOCKS],
        }
    }

    fn position(seq: u32) -> (usize, u64) {
        let block = (seq / BLOCK_BITS) as usize % BLOCKS;
        (block, 1u64 << (seq % BLOCK_BITS))
    }

    /// Whether `seq` may be accepted; does not change the window.
    pub(crate) fn check(&self, seq: u32) -> Result<(), Replayed> {
        if seq == 0 {
            return Err(Replayed::Zero);
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= REPLAY_WINDOW {
            return Err(Replayed::TooOld);
        }
        let (block, bit) = Self::position(seq);
        if self.bits[block] & bit != 0 {
            return Err(Replayed::Duplicate);
        }
        Ok(())
    }

    /// Records `seq` as received. Call only after [`check`](Self::check) passed and the ICV
    /// verified.
    pub(crate) fn update(&mut self, seq: u32) {
        if seq > self.top {
            let old_block = self.top / BLOCK_BITS;
            let new_block = seq / BLOCK_BITS;
            let to_clear = (new_block - old_block).min(BLOCKS as u32);
            for i in 1..=to_clear {
                self.bits[(old_block + i) as usize % BLOCKS] = 0;
            }
            self.top = seq;
        }
        let (block, bit) = Self::position(seq);
        self.bits[block] |= bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn accept(w: &mut ReplayWindow, seq: u32) -> Result<(), Replayed> {
        w.check(seq)?;
        w.update(seq);
        Ok(())
    }

    #[test]
    fn duplicate_too_old_far_ahead_and_out_of_order() {
        let mut w = ReplayWindow::new();
        assert_eq!(accept(&mut w, 0), Err(Replayed::Zero));
        assert_eq!(accept(&mut w, 1), Ok(()));
        assert_eq!(accept(&mut w, 1), Err(Replayed::Duplicate));
        // Out of order inside the window.
        assert_eq!(accept(&mut w, 5), Ok(()));
        assert_eq!(accept(&mut w, 3), Ok(()));
        assert_eq!(accept(&mut w, 4), Ok(()));
        assert_eq!(accept(&mut w, 3), Err(Replayed::Duplicate));
        assert_eq!(accept(&mut w, 2), Ok(()));
        // Far ahead: accepted, and everything more than a window behind is now too old.
        assert_eq!(accept(&mut w, 100_000), Ok(()));
        assert_eq!(accept(&mut w, 5), Err(Replayed::TooOld));
        assert_eq!(
            accept(&mut w, 100_000 - REPLAY_WINDOW),
            Err(Replayed::TooOld)
        );
        // The oldest still inside, never seen: accepted once.
        assert_eq!(accept(&mut w, 100_000 - REPLAY_WINDOW + 1), Ok(()));
        assert_eq!(
            accept(&mut w, 100_000 - REPLAY_WINDOW + 1),
            Err(Replayed::Duplicate)
        );
        assert_eq!(accept(&mut w, 100_000), Err(Replayed::Duplicate));
    }

    #[test]
    fn check_does_not_move_the_window() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(5000), Ok(()));
        // A forged packet that fails its ICV is checked but never recorded: had the check moved
        // the window to 5000, sequence number 1 would now be too old.
        assert_eq!(accept(&mut w, 1), Ok(()));
    }

    #[test]
    fn top_of_the_sequence_space() {
        let mut w = ReplayWindow::new();
        assert_eq!(accept(&mut w, u32::MAX - 1), Ok(()));
        assert_eq!(accept(&mut w, u32::MAX), Ok(()));
        assert_eq!(accept(&mut w, u32::MAX), Err(Replayed::Duplicate));
        assert_eq!(accept(&mut w, u32::MAX - REPLAY_WINDOW + 1), Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The ring agrees with a plain set model on any order of arrival.
        #[test]
        fn agrees_with_a_set_model(seqs in proptest::collection::vec(1u32..5000, 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::BTreeSet::new();
            let mut top = 0u32;
            for seq in seqs {
                let expected = if seq > top {
                    Ok(())
                } else if top - seq >= REPLAY_WINDOW {
                    Err(Replayed::TooOld)
                } else if seen.contains(&seq) {
                    Err(Replayed::Duplicate)
                } else {
                    Ok(())
                };
                prop_assert_eq!(accept(&mut w, seq), expected, "seq {}", seq);
                if expected.is_ok() {
                    seen.insert(seq);
                    top = top.max(seq);
                }
            }
        }
    }
}
