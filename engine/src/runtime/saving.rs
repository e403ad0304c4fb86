//! A source driver's part in checkpoints: its position, its event clock, and the records it
//! has handed to the dataflow at or after the checkpoint's time (which the operators have
//! not yet taken into their state, so a restore hands them in again).

use edgeflow_connectors::{Checkpoint, Position};
use edgeflow_operators::federated::update::ModelUpdate;
use edgeflow_operators::state::{Entry, StateHandle};
use edgeflow_operators::{DeadLetter, EventTime, Heartbeat, InferenceRequest, RawMessage, Record};
use serde::{Deserialize, Serialize};

/// A record or dead letter handed to the dataflow, kept for a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Buffered {
    /// A heartbeat.
    Heartbeat(Heartbeat),
    /// An inference request.
    Request(Box<InferenceRequest>),
    /// A federated client update.
    Update(Box<ModelUpdate>),
    /// A raw message.
    Raw(Box<RawMessage>),
    /// A dead letter.
    DeadLetter(DeadLetter),
}

impl Buffered {
    /// A copy of `record`.
    pub fn of(record: &Record) -> Self {
        match record {
            Record::Heartbeat(heartbeat) => Buffered::Heartbeat(heartbeat.clone()),
            Record::Request(request) => Buffered::Request(request.clone()),
            Record::Update(update) => Buffered::Update(update.clone()),
            Record::Raw(message) => Buffered::Raw(message.clone()),
        }
    }
}

/// What a checkpoint keeps of one worker's source.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedSource {
    /// The worker and the number of workers that saved it.
    pub index: usize,
    /// Workers of the run that saved it.
    pub peers: usize,
    /// Where the source had read up to.
    pub position: Option<Position>,
    /// Its event clock.
    pub clock: Option<EventTime>,
    /// Records and dead letters handed in at or after the checkpoint's time, with the time.
    pub items: Vec<(EventTime, Buffered)>,
}

/// A driver's part in checkpoints.
///
/// A checkpoint's time `T` is past every event time any source had handed in when it was
/// agreed (see [`crate::runtime`]'s checkpoint protocol), so only records handed in after
/// that, at or after `T`, need keeping: from the agreement until the source's watermark
/// reaches `T`. Outside that window nothing is copied.
#[derive(Debug)]
pub struct Saving {
    handle: StateHandle,
    index: usize,
    peers: usize,
    /// What the driver handed to the dataflow at or after the due checkpoint's time.
    buffer: Vec<(EventTime, Buffered)>,
    /// The checkpoint to save once the watermark reaches its time.
    due: Option<(u64, EventTime)>,
    /// Consumer-group offsets to commit once a checkpoint is complete.
    to_commit: Option<(u64, Checkpoint)>,
}

impl Saving {
    /// The part of worker `index` of `peers`, saving through `handle`.
    pub fn new(handle: StateHandle, index: usize, peers: usize) -> Self {
        Self { handle, index, peers, buffer: Vec::new(), due: None, to_commit: None }
    }

    /// Keeps a copy of what was handed in at `time` if a checkpoint is due at or before it
    /// (the copy is made only then).
    pub fn keep(&mut self, time: EventTime, item: impl FnOnce() -> Buffered) {
        if self.due.is_some_and(|(_, due)| time >= due) {
            self.buffer.push((time, item()));
        }
    }

    /// Checkpoint `epoch` at `time` is to be saved.
    pub fn begin(&mut self, epoch: u64, time: EventTime) {
        self.due = Some((epoch, time));
        self.buffer.clear();
    }

    /// Saves the checkpoint if it is due and the source's watermark has reached its time (or
    /// the source has ended).
    pub fn try_save(
        &mut self,
        watermark: EventTime,
        ended: bool,
        clock: Option<EventTime>,
        position: impl FnOnce() -> Option<Position>,
    ) {
        let Some((epoch, time)) = self.due else { return };
        if watermark < time && !ended {
            return;
        }
        let position = position();
        let items = std::mem::take(&mut self.buffer);
        let saved = SavedSource { index: self.index, peers: self.peers, position: position.clone(), clock, items };
        // Records serialise to JSON without fail; JSON keeps their own encodings exact.
        let bytes = serde_json::to_vec(&saved).unwrap_or_default();
        self.handle.save(vec![Entry { route: self.index as u64, bytes }]);
        if let Some(Position::Kafka(offsets)) = position {
            self.to_commit = Some((epoch, offsets));
        }
        self.due = None;
    }

    /// The consumer-group offsets saved with checkpoint `epoch`, once it is complete.
    pub fn committed(&mut self, epoch: u64) -> Option<Checkpoint> {
        match self.to_commit.take() {
            Some((saved, offsets)) if saved <= epoch => Some(offsets),
            other => {
                self.to_commit = other;
                None
            }
        }
    }
}

/// The saved parts of one source from a checkpoint's entries (all workers').
pub fn saved_sources(entries: &[Entry]) -> anyhow::Result<Vec<SavedSource>> {
    entries
        .iter()
        .map(|entry| {
            serde_json::from_slice(&entry.bytes)
                .map_err(|err| anyhow::anyhow!("a source's saved position does not decode: {err}"))
        })
        .collect()
}
