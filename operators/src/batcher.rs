//! Dynamic batching for inference: a bounded, prioritised queue that releases a batch when
//! `max_batch_size` requests wait or the oldest has waited `max_queue_delay`, and hands back
//! requests whose deadline passed while they waited.
//!
//! The batcher is plain data, driven by its owner with explicit clocks (a monotonic
//! [`Instant`] for queueing delays, wall-clock milliseconds for deadlines), so every rule
//! here is tested without threads or sleeps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::records::Priority;
use crate::EventTime;

/// When a batch is released and how many requests may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most requests in one batch.
    pub max_batch_size: usize,
    /// Longest time the oldest request waits for a batch to fill.
    pub max_queue_delay: Duration,
    /// Most requests waiting; beyond it a request is rejected, or displaces a waiting
    /// request of lower priority.
    pub queue_capacity: usize,
}

/// A request waiting in the queue.
#[derive(Debug)]
pub struct Queued<T> {
    /// The request.
    pub item: T,
    /// Its priority.
    pub priority: Priority,
    /// Its wall-clock deadline, ms since the epoch.
    pub deadline: Option<EventTime>,
    /// When it entered the queue.
    pub admitted: Instant,
}

/// What happened to a request offered to the queue.
#[derive(Debug)]
pub enum Admission<T> {
    /// It waits for a batch.
    Admitted,
    /// It waits, and a lower-priority request was pushed out to make room.
    Displaced(Queued<T>, String),
    /// The queue is full of requests of its priority or higher.
    Rejected(T, String),
}

/// The queue of one model (and version).
#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    queues: [VecDeque<Queued<T>>; 3],
    len: usize,
    /// No deadline in the queue is earlier than this (a lower bound; refreshed on scans).
    earliest_deadline: Option<EventTime>,
}

impl<T> Batcher<T> {
    /// An empty queue under `policy`.
    pub fn new(policy: BatchPolicy) -> Self {
        Self { policy, queues: Default::default(), len: 0, earliest_deadline: None }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The policy.
    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Offers `item` to the queue at `now`.
    pub fn push(&mut self, item: T, priority: Priority, deadline: Option<EventTime>, now: Instant) -> Admission<T> {
        let mut displaced = None;
        if self.len >= self.policy.queue_capacity {
            // Make room by pushing out the newest request of the lowest priority below ours.
            let victim =
                Priority::ALL.iter().rev().take_while(|p| **p > priority).find(|p| !self.queues[p.index()].is_empty());
            match victim.and_then(|p| self.queues[p.index()].pop_back()) {
                Some(victim) => {
                    self.len -= 1;
                    let reason = format!(
                        "displaced from a full queue ({} waiting) by a {} priority request",
                        self.policy.queue_capacity,
                        priority.as_str()
                    );
                    displaced = Some((victim, reason));
                }
                None => {
                    let reason = format!(
                        "queue full: {} requests of priority {} or higher are waiting (queue_capacity {})",
                        self.len,
                        priority.as_str(),
                        self.policy.queue_capacity
                    );
                    return Admission::Rejected(item, reason);
                }
            }
        }
        if let Some(deadline) = deadline {
            self.earliest_deadline = Some(self.earliest_deadline.map_or(deadline, |d| d.min(deadline)));
        }
        self.queues[priority.index()].push_back(Queued { item, priority, deadline, admitted: now });
        self.len += 1;
        match displaced {
            Some((victim, reason)) => Admission::Displaced(victim, reason),
            None => Admission::Admitted,
        }
    }

    /// Removes and returns every request whose deadline is at or before `now_ms`.
    pub fn expire(&mut self, now_ms: EventTime) -> Vec<Queued<T>> {
        let mut expired = Vec::new();
        if self.earliest_deadline.is_none_or(|earliest| earliest > now_ms) {
            return expired;
        }
        let mut earliest = None;
        for queue in &mut self.queues {
            let mut kept = VecDeque::with_capacity(queue.len());
            for queued in queue.drain(..) {
                match queued.deadline {
                    Some(deadline) if deadline <= now_ms => expired.push(queued),
                    deadline => {
                        if let Some(deadline) = deadline {
                            earliest = Some(earliest.map_or(deadline, |e: EventTime| e.min(deadline)));
                        }
                        kept.push_back(queued);
                    }
                }
            }
            *queue = kept;
        }
        self.earliest_deadline = earliest;
        self.len -= expired.len();
        expired
    }

    /// Removes and returns every waiting request for which `leaves` holds (in priority,
    /// then arrival order).
    pub fn remove_where(&mut self, mut leaves: impl FnMut(&T) -> bool) -> Vec<Queued<T>> {
        let mut removed = Vec::new();
        for queue in &mut self.queues {
            let (gone, kept): (VecDeque<_>, VecDeque<_>) = queue.drain(..).partition(|q| leaves(&q.item));
            *queue = kept;
            removed.extend(gone);
        }
        self.len -= removed.len();
        removed
    }

    /// The next batch, if one is due at `now`: when `max_batch_size` requests wait, when the
    /// oldest has waited `max_queue_delay`, or at once when `drain` is set (end of input).
    /// Higher priorities go first, then arrival order.
    pub fn next_batch(&mut self, now: Instant, drain: bool) -> Option<Vec<Queued<T>>> {
        let oldest = self.oldest()?;
        let due = drain
            || self.len >= self.policy.max_batch_size
            || now.saturating_duration_since(oldest) >= self.policy.max_queue_delay;
        if !due {
            return None;
        }
        let mut batch = Vec::with_capacity(self.policy.max_batch_size.min(self.len));
        for queue in &mut self.queues {
            while batch.len() < self.policy.max_batch_size {
                let Some(queued) = queue.pop_front() else { break };
                batch.push(queued);
            }
        }
        self.len -= batch.len();
        Some(batch)
    }

    /// How long from `now` until [`Self::next_batch`] releases the queued requests if no
    /// more arrive; `None` when the queue is empty.
    pub fn due_in(&self, now: Instant) -> Option<Duration> {
        let oldest = self.oldest()?;
        Some((oldest + self.policy.max_queue_delay).saturating_duration_since(now))
    }

    /// The earliest deadline waiting (a lower bound), wall-clock ms.
    pub fn earliest_deadline(&self) -> Option<EventTime> {
        self.earliest_deadline
    }

    fn oldest(&self) -> Option<Instant> {
        self.queues.iter().filter_map(|queue| queue.front().map(|q| q.admitted)).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_batch_size: usize, queue_capacity: usize) -> BatchPolicy {
        BatchPolicy { max_batch_size, max_queue_delay: Duration::from_millis(5), queue_capacity }
    }

    fn items<T: Copy>(batch: &[Queued<T>]) -> Vec<T> {
        batch.iter().map(|q| q.item).collect()
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_a_lone_request_after_the_delay() {
        let start = Instant::now();
        let mut batcher = Batcher::new(policy(3, 100));
        for i in 0..4 {
            assert!(matches!(batcher.push(i, Priority::Normal, None, start), Admission::Admitted));
        }
        assert_eq!(items(&batcher.next_batch(start, false).unwrap()), vec![0, 1, 2]);
        // One left: not due until it has waited max_queue_delay.
        assert!(batcher.next_batch(start + Duration::from_millis(4), false).is_none());
        assert_eq!(batcher.due_in(start + Duration::from_millis(4)), Some(Duration::from_millis(1)));
        assert_eq!(items(&batcher.next_batch(start + Duration::from_millis(5), false).unwrap()), vec![3]);
        assert!(batcher.is_empty());
        assert_eq!(batcher.due_in(start), None);
    }

    #[test]
    fn higher_priorities_are_batched_first() {
        let now = Instant::now();
        let mut batcher = Batcher::new(policy(2, 100));
        batcher.push(1, Priority::Low, None, now);
        batcher.push(2, Priority::Normal, None, now);
        batcher.push(3, Priority::High, None, now);
        assert_eq!(items(&batcher.next_batch(now, false).unwrap()), vec![3, 2]);
        assert_eq!(items(&batcher.next_batch(now, true).unwrap()), vec![1]);
    }

    #[test]
    fn a_full_queue_rejects_or_displaces_lower_priority() {
        let now = Instant::now();
        let mut batcher = Batcher::new(policy(10, 2));
        batcher.push(1, Priority::Normal, None, now);
        batcher.push(2, Priority::Low, None, now);
        match batcher.push(3, Priority::Low, None, now) {
            Admission::Rejected(3, reason) => assert!(reason.starts_with("queue full: 2 requests"), "{reason}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        match batcher.push(4, Priority::High, None, now) {
            Admission::Displaced(victim, reason) => {
                assert_eq!(victim.item, 2);
                assert!(reason.contains("by a high priority request"), "{reason}");
            }
            other => panic!("expected a displacement, got {other:?}"),
        }
        match batcher.push(5, Priority::Normal, None, now) {
            Admission::Rejected(5, _) => {}
            other => panic!("a normal request cannot displace normal or high ones, got {other:?}"),
        }
        assert_eq!(batcher.len(), 2);
        assert_eq!(items(&batcher.next_batch(now, true).unwrap()), vec![4, 1]);
    }

    #[test]
    fn requests_leave_by_predicate() {
        let now = Instant::now();
        let mut batcher = Batcher::new(policy(10, 10));
        for i in 0..6 {
            batcher.push(i, if i == 5 { Priority::High } else { Priority::Normal }, None, now);
        }
        assert_eq!(items(&batcher.remove_where(|i| i % 2 == 1)), vec![5, 1, 3]);
        assert_eq!(batcher.len(), 3);
        assert_eq!(items(&batcher.next_batch(now, true).unwrap()), vec![0, 2, 4]);
    }

    #[test]
    fn expired_requests_come_back_and_the_rest_stay_in_order() {
        let now = Instant::now();
        let mut batcher = Batcher::new(policy(10, 10));
        batcher.push(1, Priority::Normal, Some(1_000), now);
        batcher.push(2, Priority::Normal, None, now);
        batcher.push(3, Priority::High, Some(2_000), now);
        batcher.push(4, Priority::Normal, Some(1_500), now);
        assert!(batcher.expire(999).is_empty());
        assert_eq!(items(&batcher.expire(1_500)), vec![1, 4]);
        assert_eq!(batcher.earliest_deadline(), Some(2_000));
        assert_eq!(batcher.len(), 2);
        assert_eq!(items(&batcher.next_batch(now, true).unwrap()), vec![3, 2]);
    }
}
