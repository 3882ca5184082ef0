//! Which application messages of a group a member has received: one bit per planned message,
//! per phase.
//!
//! Every recipient checks each message arrives once. A hash set of (phase, message number)
//! cost a hash and a probe into a set of tens of thousands of entries per delivery, per
//! member (so hundreds of megabytes across a thousand members, and a cache miss each time);
//! message numbers are dense (`0 .. messages planned in the phase`), so a bit each does it.
//! A number beyond what the phase planned is refused rather than grown into: it comes from a
//! message id the server handed over, and must not size our memory.

/// Bits of received message numbers, by phase.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    phases: Vec<Vec<u64>>,
}

/// Why a message number was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It was received before.
    Twice,
    /// The phase planned fewer messages (or there is no such phase).
    BeyondPlan,
}

impl Seen {
    /// Marks message `j` of `phase` received, when the phase planned `planned` messages per
    /// group.
    pub(crate) fn insert(&mut self, phase: u32, j: u64, planned: u64) -> Result<(), Refused> {
        if j >= planned {
            return Err(Refused::BeyondPlan);
        }
        let (Ok(phase), Ok(word), Ok(words)) = (
            usize::try_from(phase),
            usize::try_from(j / 64),
            usize::try_from(planned.div_ceil(64)),
        ) else {
            return Err(Refused::BeyondPlan);
        };
        if self.phases.len() <= phase {
            self.phases.resize_with(phase + 1, Vec::new);
        }
        let bits = &mut self.phases[phase];
        if bits.len() < words {
            bits.resize(words, 0);
        }
        let mask = 1u64 << (j % 64);
        if bits[word] & mask != 0 {
            return Err(Refused::Twice);
        }
        bits[word] |= mask;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_taken_once_per_phase() {
        let mut seen = Seen::default();
        assert_eq!(seen.insert(0, 5, 100), Ok(()));
        assert_eq!(seen.insert(0, 5, 100), Err(Refused::Twice));
        assert_eq!(seen.insert(1, 5, 100), Ok(()));
        assert_eq!(seen.insert(0, 63, 100), Ok(()));
        assert_eq!(seen.insert(0, 64, 100), Ok(()));
        assert_eq!(seen.insert(0, 99, 100), Ok(()));
        assert_eq!(seen.insert(0, 64, 100), Err(Refused::Twice));
    }

    #[test]
    fn a_number_beyond_the_plan_is_refused_without_growing() {
        let mut seen = Seen::default();
        assert_eq!(seen.insert(0, 100, 100), Err(Refused::BeyondPlan));
        assert_eq!(seen.insert(0, u64::MAX, 100), Err(Refused::BeyondPlan));
        assert!(seen.phases.is_empty());
        assert_eq!(seen.insert(2, 0, 1), Ok(()));
        assert_eq!(seen.phases.len(), 3);
        assert_eq!(seen.phases[2].len(), 1);
    }
}
