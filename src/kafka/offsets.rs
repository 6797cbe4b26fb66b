//! In-order completion tracking for one partition.
//!
//! Messages of a partition complete out of order (different keys run
//! concurrently), but Kafka offsets are a single watermark: storing offset N
//! says "everything up to N is done". [`OffsetTracker`] records every offset
//! handed out and reports the highest offset below which everything has
//! completed, so an offset is stored only when every earlier message of the
//! partition is settled.

use std::collections::BTreeSet;

/// Tracks outstanding offsets of one partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Offsets received but not yet completed, in order.
    pending: BTreeSet<i64>,
    /// Lowest offset ever received: nothing below it is ours to report.
    first_seen: Option<i64>,
    /// Highest offset received so far.
    highest_seen: Option<i64>,
    /// Highest offset already reported as committable.
    committed: Option<i64>,
}

impl OffsetTracker {
    /// A tracker with nothing outstanding.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was received and is now in flight.
    pub fn begin(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.first_seen = Some(self.first_seen.map_or(offset, |f| f.min(offset)));
        self.highest_seen = Some(self.highest_seen.map_or(offset, |h| h.max(offset)));
    }

    /// Marks `offset` done. Returns the new highest offset such that it and
    /// every earlier offset received are complete, if that advanced.
    pub fn complete(&mut self, offset: i64) -> Option<i64> {
        if !self.pending.remove(&offset) {
            return None;
        }
        let candidate = match self.pending.first() {
            Some(&first) => first - 1,
            None => self.highest_seen?,
        };
        if self.first_seen.is_some_and(|f| candidate < f) {
            return None;
        }
        if self.committed.is_none_or(|c| candidate > c) {
            self.committed = Some(candidate);
            return Some(candidate);
        }
        None
    }

    /// Number of offsets received but not completed.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// The highest offset reported committable so far.
    pub fn committed(&self) -> Option<i64> {
        self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_completions_advance_one_by_one() {
        let mut t = OffsetTracker::new();
        for o in 10..13 {
            t.begin(o);
        }
        assert_eq!(t.complete(10), Some(10));
        assert_eq!(t.complete(11), Some(11));
        assert_eq!(t.complete(12), Some(12));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn out_of_order_completion_waits_for_the_gap() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.begin(o);
        }
        assert_eq!(t.complete(3), None);
        assert_eq!(t.complete(1), None);
        assert_eq!(t.complete(4), None);
        assert_eq!(t.complete(0), Some(1));
        assert_eq!(t.complete(2), Some(4));
    }

    #[test]
    fn nothing_reported_below_the_first_offset_received() {
        let mut t = OffsetTracker::new();
        t.begin(5);
        t.begin(6);
        assert_eq!(t.complete(6), None);
        assert_eq!(t.complete(5), Some(6));
    }

    #[test]
    fn unknown_or_repeated_completion_is_ignored() {
        let mut t = OffsetTracker::new();
        t.begin(7);
        assert_eq!(t.complete(8), None);
        assert_eq!(t.complete(7), Some(7));
        assert_eq!(t.complete(7), None);
    }

    #[test]
    fn never_completed_message_holds_the_watermark() {
        let mut t = OffsetTracker::new();
        for o in 0..4 {
            t.begin(o);
        }
        // offset 1 is abandoned (e.g. partition revoked before it ran)
        t.complete(0);
        t.complete(2);
        t.complete(3);
        assert_eq!(t.committed(), Some(0));
    }

    proptest! {
        /// Whatever the completion order, the reported watermark never passes
        /// an incomplete offset, and ends at the last offset once all complete.
        #[test]
        fn watermark_never_passes_an_incomplete_offset(order in Just((0..40i64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut t = OffsetTracker::new();
            for o in 0..40 { t.begin(o); }
            let mut done = std::collections::BTreeSet::new();
            let mut last = None;
            for o in order {
                done.insert(o);
                if let Some(w) = t.complete(o) {
                    prop_assert!(last.is_none_or(|l| w > l));
                    for x in 0..=w { prop_assert!(done.contains(&x)); }
                    last = Some(w);
                }
            }
            prop_assert_eq!(last, Some(39));
        }
    }
}
