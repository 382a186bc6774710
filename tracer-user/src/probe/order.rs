//! Probe verdicts shown in the order the probes were sent.
//!
//! An answer comes back within milliseconds, a loss is only known once its
//! timeout has passed: shown as they are known, the `down` of probe 23 would
//! print after the `ok` of probe 24, with an earlier time. So each verdict
//! waits here until every probe sent before it (to any target) has its own,
//! and the `lost/sent` counts shown are those of the probes up to it. A
//! `late` reply is a note on a probe already shown and passes straight
//! through.

use std::collections::VecDeque;

use super::{Outcome, Status};

/// A verdict ready to show, with its target's counts up to that probe.
#[derive(Clone, Debug, PartialEq)]
pub struct Released {
    pub outcome: Outcome,
    pub lost: u64,
    pub sent: u64,
}

#[derive(Default)]
pub struct InOrder {
    /// (target, number) in send order, with the verdict once known.
    queue: VecDeque<((usize, u64), Option<Outcome>)>,
    /// Per target: probes shown, and of those lost.
    shown: Vec<(u64, u64)>,
}

impl InOrder {
    pub fn new(targets: usize) -> InOrder {
        InOrder {
            queue: VecDeque::new(),
            shown: vec![(0, 0); targets],
        }
    }

    /// A probe went out: its verdict takes this place in the order.
    pub fn sent(&mut self, target: usize, number: u64) {
        self.queue.push_back(((target, number), None));
    }

    /// A verdict or late note; returns what can be shown now, in order.
    pub fn verdict(&mut self, o: Outcome) -> Vec<Released> {
        let key = (o.target, o.number);
        let slot = match o.status {
            Status::Late { .. } => None,
            _ => self
                .queue
                .iter_mut()
                .find(|(k, v)| *k == key && v.is_none()),
        };
        match slot {
            Some((_, v)) => *v = Some(o),
            // A note, or a probe whose send we never saw: nothing to wait for.
            None => return vec![self.release(o)],
        }
        let mut out = Vec::new();
        while let Some((_, Some(_))) = self.queue.front() {
            let (_, o) = self.queue.pop_front().unwrap();
            out.push(self.release(o.unwrap()));
        }
        out
    }

    /// End of the run: every verdict known so far, in order; probes still
    /// without one are skipped (the run was cut short).
    pub fn flush(&mut self) -> Vec<Released> {
        let held: Vec<Outcome> = self.queue.drain(..).filter_map(|(_, o)| o).collect();
        held.into_iter().map(|o| self.release(o)).collect()
    }

    /// Probes waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.queue.iter().filter(|(_, o)| o.is_some()).count()
    }

    fn release(&mut self, o: Outcome) -> Released {
        let c = &mut self.shown[o.target];
        match o.status {
            Status::Late { .. } => {}
            Status::Lost { .. } => {
                c.0 += 1;
                c.1 += 1;
            }
            Status::Ok { .. } => c.0 += 1,
        }
        Released {
            lost: c.1,
            sent: c.0,
            outcome: o,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Wire;

    fn out(target: usize, number: u64, status: Status) -> Outcome {
        Outcome {
            target,
            number,
            wire: Wire::Echo {
                id: number as u16,
                seq: 1,
            },
            sent_ns: number * 1000,
            status,
        }
    }
    fn ok(t: usize, n: u64) -> Outcome {
        out(t, n, Status::Ok { rtt_ns: 5 })
    }
    fn lost(t: usize, n: u64) -> Outcome {
        out(t, n, Status::Lost { drop: None })
    }
    fn numbers(r: &[Released]) -> Vec<(usize, u64, u64, u64)> {
        r.iter()
            .map(|r| (r.outcome.target, r.outcome.number, r.lost, r.sent))
            .collect()
    }

    #[test]
    fn an_answer_waits_for_the_loss_of_an_earlier_probe() {
        let mut q = InOrder::new(1);
        for n in 1..=3 {
            q.sent(0, n);
        }
        assert!(q.verdict(ok(0, 2)).is_empty());
        assert!(q.verdict(ok(0, 3)).is_empty());
        assert_eq!(q.held(), 2);
        let r = q.verdict(lost(0, 1));
        assert_eq!(numbers(&r), vec![(0, 1, 1, 1), (0, 2, 1, 2), (0, 3, 1, 3)]);
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn targets_share_one_order_and_keep_their_own_counts() {
        let mut q = InOrder::new(2);
        q.sent(0, 1);
        q.sent(1, 1);
        q.sent(0, 2);
        assert!(q.verdict(ok(1, 1)).is_empty());
        assert_eq!(
            numbers(&q.verdict(lost(0, 1))),
            vec![(0, 1, 1, 1), (1, 1, 0, 1)]
        );
        assert_eq!(numbers(&q.verdict(ok(0, 2))), vec![(0, 2, 1, 2)]);
    }

    #[test]
    fn late_notes_and_unknown_probes_pass_through() {
        let mut q = InOrder::new(1);
        q.sent(0, 1);
        q.sent(0, 2);
        let late = out(0, 7, Status::Late { rtt_ns: 9 });
        assert_eq!(numbers(&q.verdict(late)), vec![(0, 7, 0, 0)]);
        assert_eq!(numbers(&q.verdict(ok(0, 9))), vec![(0, 9, 0, 1)]);
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn flush_shows_what_is_known_in_order() {
        let mut q = InOrder::new(1);
        for n in 1..=3 {
            q.sent(0, n);
        }
        assert!(q.verdict(lost(0, 3)).is_empty());
        assert!(q.verdict(ok(0, 2)).is_empty());
        assert_eq!(numbers(&q.flush()), vec![(0, 2, 0, 1), (0, 3, 1, 2)]);
        assert!(q.flush().is_empty());
    }
}
