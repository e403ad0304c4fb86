//! Operator state in checkpoints, as one worker's operators see it.
//!
//! The engine takes a checkpoint at an event time `T` agreed by all workers: every stateful
//! operator saves its state *as of `T`* (the effect of every input before `T`, none of the
//! inputs at or after `T`, which the sources hand in again on recovery), and on recovery gets
//! that state back. An operator takes part through a [`StateHandle`]:
//!
//! - [`StateHandle::restored`] at build time: the entries saved by the last checkpoint (for
//!   this worker: keyed entries are re-distributed over the workers as the operator's own
//!   exchange would, so a different number of workers works), and the checkpoint's time, at
//!   which the operator re-states what it restored on its outputs if downstream needs it.
//! - [`StateHandle::due`] in every activation: the checkpoint time `T` once one is agreed
//!   and this operator has not saved it yet. When its input frontier has reached `T` (every
//!   time before `T` is complete) and before it processes any time at or after `T`, the
//!   operator calls [`StateHandle::save`]. Operators process complete times in order, so this
//!   is a check at the top of their loop.
//!
//! Each entry carries a *route*: the 64-bit hash the operator exchanges its data by (the
//! node key for node health, the region for rollups). Worker `i` of `n` restores exactly the
//! entries whose route is `i` modulo `n`, which is where timely's exchange sends that key.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::EventTime;

/// One saved entry: the route it belongs to (see the module docs) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Entry {
    /// The exchange hash of the entry's key.
    pub route: u64,
    /// The entry, encoded with [`encode`].
    pub bytes: Vec<u8>,
}

impl Entry {
    /// An entry routed by `route` holding `value`.
    pub fn new<T: Serialize>(route: u64, value: &T) -> Self {
        Self { route, bytes: encode(value) }
    }

    /// The entry's value, or what is wrong with its bytes.
    pub fn value<T: DeserializeOwned>(&self) -> Result<T, StateError> {
        decode(&self.bytes)
    }
}

/// State that cannot be read back: a checkpoint written by a different version of an
/// operator, or bytes that do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checkpointed state does not decode: {0}")]
pub struct StateError(pub String);

/// Encodes a state value compactly (bincode).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data structs of our own: serialising them cannot fail.
    bincode::serialize(value).unwrap_or_default()
}

/// Decodes a state value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    bincode::deserialize(bytes).map_err(|err| StateError(err.to_string()))
}

/// The state of one worker's operators: what they restore from, and what they have saved
/// for the checkpoint being taken. Shared (on the worker's thread) by the operators and the
/// engine's checkpoint driver.
#[derive(Clone, Debug, Default)]
pub struct WorkerState(Rc<RefCell<Inner>>);

#[derive(Default)]
struct Inner {
    index: usize,
    peers: usize,
    /// The checkpoint being taken: its epoch and time.
    due: Option<(u64, EventTime)>,
    /// Participants by name: whether each has saved `due`.
    participants: BTreeMap<String, bool>,
    /// Entries saved for `due`, by participant.
    saved: BTreeMap<String, Vec<Entry>>,
    /// Entries to restore, by participant (all workers' entries, filtered on take).
    restore: BTreeMap<String, Vec<Entry>>,
    /// The newest checkpoint known to be complete (its manifest durable).
    committed: u64,
    /// The time of the checkpoint restored from.
    restored_at: Option<EventTime>,
    /// How to wake each participant when a checkpoint starts (its frontier may already have
    /// reached the time, and nothing else would schedule it).
    activators: Vec<timely::scheduling::Activator>,
    /// A checkpoint's time is being agreed: participants that drive time themselves wait.
    holding: bool,
    /// The least checkpoint time each participant that drives time itself can save at, and
    /// whether it still drives time (its last proposal stays when it stops: its last output
    /// was before that time).
    horizons: BTreeMap<String, (EventTime, bool)>,
    /// The run takes checkpoints (see [`WorkerState::checkpointing`]).
    checkpointing: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("due", &self.due)
            .field("participants", &self.participants)
            .finish_non_exhaustive()
    }
}

impl WorkerState {
    /// The state of worker `index` of `peers`, restoring from `restore` (each participant's
    /// entries, from every worker of the checkpoint) taken at `time`, if any.
    pub fn new(index: usize, peers: usize, restore: Option<(EventTime, BTreeMap<String, Vec<Entry>>)>) -> Self {
        let (restored_at, restore) = match restore {
            Some((time, entries)) => (Some(time), entries),
            None => (None, BTreeMap::new()),
        };
        Self(Rc::new(RefCell::new(Inner { index, peers: peers.max(1), restored_at, restore, ..Inner::default() })))
    }

    /// Marks the run as one that takes checkpoints, down to a last one at the end of time:
    /// an operator that ends on its own (a training loop) then keeps a capability at the end
    /// of time until that checkpoint is complete, so that it and the operators after it are
    /// not retired before they have saved it.
    pub fn checkpointing(self) -> Self {
        self.0.borrow_mut().checkpointing = true;
        self
    }

    /// A handle for participant `name` (unique per pipeline: the operator's name and what
    /// part of it this is, e.g. `health/status`).
    pub fn handle(&self, name: &str) -> StateHandle {
        self.0.borrow_mut().participants.insert(name.to_owned(), false);
        StateHandle { worker: self.clone(), name: name.to_owned() }
    }

    /// A checkpoint's time is being agreed (until [`Self::start`]): participants that drive
    /// time themselves (a training loop whose rounds are times) hold still, so that the time
    /// they proposed ([`Self::horizon`]) stays ahead of what they processed.
    pub fn hold(&self) {
        self.0.borrow_mut().holding = true;
    }

    /// The least time a checkpoint can be taken at as far as this worker's operators that
    /// drive time themselves say (0: none does).
    pub fn horizon(&self) -> EventTime {
        self.0.borrow().horizons.values().map(|(time, _)| *time).max().unwrap_or(0)
    }

    /// Whether an operator of this worker drives time itself and has not finished (then the
    /// run is not over when the sources are).
    pub fn driving(&self) -> bool {
        self.0.borrow().horizons.values().any(|(_, driving)| *driving)
    }

    /// Starts checkpoint `epoch` at `time`: from now on [`StateHandle::due`] returns `time`
    /// until each participant has saved.
    pub fn start(&self, epoch: u64, time: EventTime) {
        let mut inner = self.0.borrow_mut();
        inner.holding = false;
        inner.due = Some((epoch, time));
        inner.saved.clear();
        for saved in inner.participants.values_mut() {
            *saved = false;
        }
        for activator in &inner.activators {
            activator.activate();
        }
    }

    /// The checkpoint being taken, once every participant has saved it: its epoch, time and
    /// the entries by participant (taken out).
    pub fn take_complete(&self) -> Option<(u64, EventTime, BTreeMap<String, Vec<Entry>>)> {
        let mut inner = self.0.borrow_mut();
        let (epoch, time) = inner.due?;
        if !inner.participants.values().all(|saved| *saved) {
            return None;
        }
        inner.due = None;
        Some((epoch, time, std::mem::take(&mut inner.saved)))
    }

    /// Notes that checkpoint `epoch` is complete (durable): output held for it may go out.
    pub fn set_committed(&self, epoch: u64) {
        let mut inner = self.0.borrow_mut();
        inner.committed = inner.committed.max(epoch);
    }

    /// The newest complete checkpoint (0: none yet).
    pub fn committed(&self) -> u64 {
        self.0.borrow().committed
    }

    /// Participants that have not saved the checkpoint being taken (for logs).
    pub fn waiting_for(&self) -> Vec<String> {
        let inner = self.0.borrow();
        inner.participants.iter().filter(|(_, saved)| !**saved).map(|(name, _)| name.clone()).collect()
    }

    /// Participants of the checkpoint restored from that no operator took up (state of an
    /// operator that is no longer in the pipeline).
    pub fn unclaimed(&self) -> Vec<String> {
        self.0.borrow().restore.keys().cloned().collect()
    }
}

/// One participant's part in checkpoints (see the module docs).
#[derive(Clone, Debug)]
pub struct StateHandle {
    worker: WorkerState,
    name: String,
}

impl StateHandle {
    /// A handle that takes part in nothing: for operators built outside a checkpointed run
    /// (tests, benchmarks, the reference implementations).
    pub fn none() -> Self {
        WorkerState::new(0, 1, None).handle("unused")
    }

    /// The state saved by the checkpoint restored from, for this worker (entries whose route
    /// maps to it), with the checkpoint's time; `None` when the run did not restore. Taken
    /// once: a second call returns `None`.
    pub fn restored(&self) -> Option<(EventTime, Vec<Entry>)> {
        let mut inner = self.worker.0.borrow_mut();
        let time = inner.restored_at?;
        let (index, peers) = (inner.index as u64, inner.peers as u64);
        let entries = inner.restore.remove(&self.name).unwrap_or_default();
        Some((time, entries.into_iter().filter(|entry| entry.route % peers == index).collect()))
    }

    /// Every worker's entries saved by the checkpoint restored from, unfiltered, with the
    /// checkpoint's time: for state every worker keeps whole (a view of the fleet that every
    /// worker is sent), or per-worker state that the operator matches to workers itself.
    /// Taken once, like [`StateHandle::restored`].
    pub fn restored_all(&self) -> Option<(EventTime, Vec<Entry>)> {
        let mut inner = self.worker.0.borrow_mut();
        let time = inner.restored_at?;
        Some((time, inner.restore.remove(&self.name).unwrap_or_default()))
    }

    /// This worker's index and the number of workers.
    pub fn worker(&self) -> (usize, usize) {
        let inner = self.worker.0.borrow();
        (inner.index, inner.peers)
    }

    /// The time of the checkpoint to save, once one is agreed and this participant has not
    /// saved it yet.
    pub fn due(&self) -> Option<EventTime> {
        let inner = self.worker.0.borrow();
        let (_, time) = inner.due?;
        (!inner.participants.get(&self.name).copied().unwrap_or(true)).then_some(time)
    }

    /// Whether the checkpoint is due and `frontier`'s least time has reached it: then the
    /// participant saves now, before processing any time at or after it. An empty frontier
    /// (the input ended) has reached every time.
    pub fn due_at(&self, frontier: &timely::progress::frontier::MutableAntichain<EventTime>) -> Option<EventTime> {
        let time = self.due()?;
        (!frontier.less_than(&time)).then_some(time)
    }

    /// The number and time of the checkpoint to save, once one is agreed and this
    /// participant has not saved it yet.
    pub fn due_checkpoint(&self) -> Option<(u64, EventTime)> {
        let inner = self.worker.0.borrow();
        let due = inner.due?;
        (!inner.participants.get(&self.name).copied().unwrap_or(true)).then_some(due)
    }

    /// The newest complete checkpoint (0: none yet).
    pub fn committed(&self) -> u64 {
        self.worker.committed()
    }

    /// Saves this participant's state for the checkpoint being taken.
    pub fn save(&self, entries: Vec<Entry>) {
        let mut inner = self.worker.0.borrow_mut();
        if let Some(saved) = inner.participants.get_mut(&self.name) {
            *saved = true;
        }
        inner.saved.insert(self.name.clone(), entries);
    }

    /// For an operator that drives time itself (rounds of a training loop as times, not the
    /// sources' event time): the least time it can save at now, which the checkpoint's time
    /// is at least. It holds still while [`Self::holding`].
    pub fn propose(&self, time: EventTime) {
        self.worker.0.borrow_mut().horizons.insert(self.name.clone(), (time, true));
    }

    /// The operator no longer drives time (its loop is over); checkpoints stay at or after
    /// the time it last proposed.
    pub fn stop_driving(&self) {
        if let Some((_, driving)) = self.worker.0.borrow_mut().horizons.get_mut(&self.name) {
            *driving = false;
        }
    }

    /// Whether the run takes checkpoints (see [`WorkerState::checkpointing`]).
    pub fn checkpointing(&self) -> bool {
        self.worker.0.borrow().checkpointing
    }

    /// Whether a checkpoint's time is being agreed: an operator that proposes times holds
    /// still until it is (it is woken then).
    pub fn holding(&self) -> bool {
        self.worker.0.borrow().holding
    }

    /// Wakes `activator` (the participant's operator) whenever a checkpoint starts.
    pub fn activate_with(&self, activator: timely::scheduling::Activator) {
        self.worker.0.borrow_mut().activators.push(activator);
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries go back to the worker their route maps to, whatever the number of workers
    /// that saved them; each participant restores only its own.
    #[test]
    fn restored_entries_are_routed_to_their_worker() {
        let entries: Vec<Entry> = (0..10u64).map(|route| Entry::new(route, &route)).collect();
        let restore = || Some((7, BTreeMap::from([("health".to_owned(), entries.clone())])));
        let mut seen = Vec::new();
        for index in 0..3 {
            let worker = WorkerState::new(index, 3, restore());
            let (time, mine) = worker.handle("health").restored().expect("restored");
            assert_eq!(time, 7);
            assert!(mine.iter().all(|e| e.route % 3 == index as u64));
            seen.extend(mine.iter().map(|e| e.value::<u64>().unwrap()));
            assert_eq!(worker.handle("rollups").restored(), Some((7, Vec::new())));
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    /// A checkpoint is complete once every participant saved it, and only then.
    #[test]
    fn a_checkpoint_completes_when_every_participant_saved() {
        let worker = WorkerState::new(0, 1, None);
        let (a, b) = (worker.handle("a"), worker.handle("b"));
        assert_eq!(a.due(), None);
        worker.start(1, 100);
        assert_eq!((a.due(), b.due()), (Some(100), Some(100)));
        a.save(vec![Entry::new(1, &"x")]);
        assert_eq!(a.due(), None);
        assert!(worker.take_complete().is_none());
        assert_eq!(worker.waiting_for(), vec!["b".to_owned()]);
        b.save(Vec::new());
        let (epoch, time, saved) = worker.take_complete().expect("complete");
        assert_eq!((epoch, time, saved.len()), (1, 100, 2));
        assert_eq!(saved["a"][0].value::<String>().unwrap(), "x");
        assert!(worker.take_complete().is_none());
    }
}
