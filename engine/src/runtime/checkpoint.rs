//! Checkpoints of a running pipeline: when they are taken, how the workers agree on one, and
//! how a run starts from the last one.
//!
//! A checkpoint covers one event time `T`: every operator's state as of `T` (the effect of
//! every record before `T`), every source's position, and the records a source had already
//! handed in at or after `T` (they are handed in again after a restore). Worker 0 starts one
//! every `interval`, over a small control dataflow that every worker hears:
//!
//! 1. `Request`: each worker stops polling its sources and answers with a time past every
//!    record its sources have handed in and at or past their watermarks (`Proposal`);
//! 2. `Decide`: worker 0 picks `T`, the highest proposal: no input has reached it, and no
//!    record handed in so far is at or after it. Every worker tells its operators
//!    ([`WorkerState::start`]) and goes on polling. Each operator saves its state when its
//!    input frontier reaches `T`, before it processes any later time; each source keeps a
//!    copy of the records it hands in at or after `T` from now on, and saves them with its
//!    position once its watermark has reached `T`;
//! 3. `Part`: each worker writes its part of the checkpoint durably once all its operators
//!    and sources have saved, and tells worker 0;
//! 4. `Committed`: worker 0 writes the manifest (the checkpoint is complete) and tells every
//!    worker: the sinks' transaction commits, sources commit their consumer-group offsets
//!    (for monitoring) and the next checkpoint may start.
//!
//! The pause in step 1 lasts one round trip of the control dataflow, not the time to drain
//! the pipeline: operators save as their frontier passes `T`, while records after `T` flow.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use edgeflow_connectors::checkpoint::{CheckpointStore, Loaded, PartInfo};
use edgeflow_operators::state::{Entry, WorkerState};
use edgeflow_operators::EventTime;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Inspect;
use timely::dataflow::InputHandle;

use crate::config::{Checkpointing, Pipeline};
use crate::metrics::Metrics;

/// The entry of worker 0's part that lists the pipeline's components and their types.
const COMPONENTS: &str = "@components";

/// How long saving a checkpoint may take before the parts it waits for are logged.
const SLOW_CHECKPOINT: Duration = Duration::from_secs(10);

/// A message of the checkpoint protocol (see the module docs), heard by every worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Control {
    Request {
        epoch: u64,
        last: bool,
    },
    Proposal {
        epoch: u64,
        watermark: EventTime,
    },
    Decide {
        epoch: u64,
        time: EventTime,
    },
    Part {
        epoch: u64,
        part: PartInfo,
    },
    Committed {
        epoch: u64,
        time: EventTime,
    },
    /// Exactly once: checkpoint `epoch`'s Kafka transaction has committed.
    Published {
        epoch: u64,
        last: bool,
    },
}

/// The checkpoint a run starts from: its number and time, and what each participant saved
/// (all workers' entries together).
#[derive(Clone, Debug, Default)]
pub struct Restore {
    /// Its number.
    pub epoch: u64,
    /// The event time it covers.
    pub time: EventTime,
    /// Each participant's entries, from every part.
    pub participants: BTreeMap<String, Vec<Entry>>,
}

impl Restore {
    /// The entries a participant saved (empty if none).
    pub fn of(&self, participant: &str) -> &[Entry] {
        self.participants.get(participant).map_or(&[], Vec::as_slice)
    }
}

/// Which components a checkpoint has state of, by kind and name, with their types.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Components {
    sources: BTreeMap<String, String>,
    operators: BTreeMap<String, String>,
}

impl Components {
    fn of(pipeline: &Pipeline) -> Self {
        Self {
            sources: pipeline.sources.iter().map(|s| (s.name.clone(), s.kind.name().to_owned())).collect(),
            operators: pipeline.operators.iter().map(|o| (o.name.clone(), o.kind.name().to_owned())).collect(),
        }
    }
}

/// A checkpoint that does not fit the pipeline it would restore.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {epoch} in `{dir}` does not fit this pipeline:\n{}\nhint: {hint}", .problems.join("\n"))]
pub struct StateMismatch {
    epoch: u64,
    dir: String,
    problems: Vec<String>,
    hint: String,
}

/// Loads the checkpoint to start from, if any: the newest complete one whose files verify
/// (damaged newer ones are passed over, logged and counted), or, for an exactly-once
/// pipeline, the newest one whose transaction Kafka committed (`committed`). Components the
/// checkpoint has state of that the pipeline no longer has, or has with another type, are
/// refused unless `allow_drop` names them.
pub fn load(
    pipeline: &Pipeline,
    settings: &Checkpointing,
    committed: Option<Option<u64>>,
    allow_drop: &[String],
    metrics: &Metrics,
) -> anyhow::Result<Option<Restore>> {
    let store = CheckpointStore::open(&settings.dir, settings.keep)?;
    let Some(loaded) = store.latest().context("cannot read the checkpoints")? else {
        return Ok(None);
    };
    metrics.checkpoints.skipped.inc_by(loaded.skipped.len() as u64);
    if let Some(committed) = committed {
        tracing::info!(newest = loaded.epoch, committed = ?committed, "exactly once: the newest checkpoint on disk, and the last whose transaction Kafka committed");
    }
    let loaded = match committed {
        Some(committed) if committed < Some(loaded.epoch) => {
            // The newest checkpoint's transaction never committed (the run stopped between
            // the two): its output was aborted, so the run goes back to the one before.
            let Some(epoch) = committed else {
                tracing::warn!(newest = loaded.epoch, "no checkpoint's transaction was committed; starting afresh");
                store.discard_after(0)?;
                return Ok(None);
            };
            tracing::warn!(
                newest = loaded.epoch,
                committed = epoch,
                "the newest checkpoint's transaction was not committed; restoring the one before"
            );
            store.discard_after(epoch)?;
            store.load_epoch(epoch).map_err(|reason| {
                anyhow!("checkpoint {epoch}, whose transaction Kafka committed, cannot be read: {reason}")
            })?
        }
        _ => loaded,
    };
    let restore = restore_of(&loaded)?;
    let saved: Components = restore
        .participants
        .get(COMPONENTS)
        .and_then(|entries| entries.first())
        .map(|entry| serde_json::from_slice(&entry.bytes))
        .transpose()
        .context("the checkpoint's list of components does not decode")?
        .unwrap_or_default();
    let now = Components::of(pipeline);
    let mut problems = Vec::new();
    let mut dropped = Vec::new();
    for (kind, then, now) in [("source", &saved.sources, &now.sources), ("operator", &saved.operators, &now.operators)]
    {
        for (name, old_type) in then {
            let problem = match now.get(name) {
                None => {
                    format!("{kind} `{name}` ({old_type}) has state in the checkpoint but is no longer in the pipeline")
                }
                Some(new_type) if new_type != old_type => {
                    format!("{kind} `{name}` was a `{old_type}` in the checkpoint and is a `{new_type}` now")
                }
                Some(_) => continue,
            };
            if allow_drop.iter().any(|allowed| allowed == name) {
                tracing::warn!(component = %name, "{problem}: its state is dropped (--allow-state-drop)");
                dropped.push(name.clone());
            } else {
                problems.push(format!("  {problem}"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(StateMismatch {
            epoch: loaded.epoch,
            dir: settings.dir.display().to_string(),
            problems,
            hint: "to start without their state, name them with `--allow-state-drop NAME`; or start from an empty checkpoint directory".into(),
        }
        .into());
    }
    let mut restore = restore;
    restore.participants.retain(|participant, _| !dropped.iter().any(|name| owner(participant) == name));
    tracing::info!(epoch = restore.epoch, time = restore.time, dir = %settings.dir.display(), "restoring from checkpoint");
    Ok(Some(restore))
}

/// The component a participant's state belongs to: `@source/NAME` and `@sink/NAME` for
/// sources and sinks (names cannot start with `@`), `NAME/PART` for an operator's parts.
fn owner(participant: &str) -> &str {
    match participant.split_once('/') {
        Some(("@source" | "@sink", name)) => name,
        Some((name, _)) => name,
        None => participant,
    }
}

/// The participants' entries of a loaded checkpoint, all parts together.
fn restore_of(loaded: &Loaded) -> anyhow::Result<Restore> {
    let mut participants: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for (part, entries) in &loaded.parts {
        for (participant, bytes) in entries {
            let decoded: Vec<Entry> = edgeflow_operators::state::decode(bytes)
                .with_context(|| format!("checkpoint {}: part `{part}`, `{participant}`", loaded.epoch))?;
            participants.entry(participant.clone()).or_default().extend(decoded);
        }
    }
    Ok(Restore { epoch: loaded.epoch, time: loaded.time, participants })
}

/// What the checkpoint protocol needs of a worker's sources.
pub trait Sources {
    /// A time past every input the open sources have handed in: one past the highest, over
    /// them, of their watermark and the latest time of a record they handed in (0 if none).
    fn horizon(&self) -> EventTime;
    /// Starts saving checkpoint `epoch` at `time`.
    fn begin(&mut self, epoch: u64, time: EventTime);
    /// Checkpoint `epoch` is complete: commit what was held for it (consumer-group offsets,
    /// waiting for the broker when it is the `last`).
    fn committed(&mut self, epoch: u64, last: bool) -> anyhow::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Sources paused until the time is decided.
    Holding {
        epoch: u64,
    },
    /// Participants saving.
    Saving {
        epoch: u64,
        time: EventTime,
    },
    /// This worker's part is written; waiting for the manifest.
    Written {
        epoch: u64,
    },
}

/// One worker's side of the checkpoint protocol.
pub struct Checkpointer {
    index: usize,
    peers: usize,
    store: CheckpointStore,
    state: WorkerState,
    interval: Duration,
    input: InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<Control>>>,
    inbox: Rc<RefCell<VecDeque<Control>>>,
    round: u64,
    phase: Phase,
    next_epoch: u64,
    last_time: EventTime,
    last_started: Instant,
    /// Worker 0: proposals and parts of the checkpoint in progress, and when it started.
    proposals: Vec<EventTime>,
    parts: Vec<PartInfo>,
    started: Instant,
    /// When this worker started saving the checkpoint in progress, and whether it has said
    /// that the checkpoint is slow.
    saving_since: (Instant, bool),
    time: EventTime,
    /// A last checkpoint was asked for (the inputs ended) and is under way or done.
    last_requested: bool,
    last_done: bool,
    components: Vec<u8>,
    metrics: std::sync::Arc<Metrics>,
    /// Exactly once: the last checkpoint whose transaction committed (set by the sinks'
    /// operator on worker 0), and, on worker 0, the checkpoint waiting for its commit.
    published: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    to_publish: Option<(u64, bool)>,
}

impl Checkpointer {
    /// The checkpointer of this worker, with its control dataflow; `restore` is the
    /// checkpoint the run starts from (numbers and times go on from it).
    pub fn new(
        worker: &mut timely::worker::Worker,
        pipeline: &Pipeline,
        settings: &Checkpointing,
        state: WorkerState,
        restore: Option<&Restore>,
        metrics: std::sync::Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let store = CheckpointStore::open(&settings.dir, settings.keep)?;
        let inbox: Rc<RefCell<VecDeque<Control>>> = Rc::default();
        let heard = inbox.clone();
        let input = worker.dataflow_named::<u64, _, _>("checkpoints", |scope| {
            let mut input = InputHandle::new();
            input.to_stream(scope).broadcast().inspect(move |message: &Control| {
                heard.borrow_mut().push_back(message.clone());
            });
            input
        });
        Ok(Self {
            index: worker.index(),
            peers: worker.peers(),
            store,
            state,
            interval: settings.interval,
            input,
            inbox,
            round: 0,
            phase: Phase::Idle,
            next_epoch: restore.map_or(1, |r| r.epoch + 1),
            last_time: restore.map_or(0, |r| r.time),
            last_started: Instant::now(),
            proposals: Vec::new(),
            parts: Vec::new(),
            started: Instant::now(),
            saving_since: (Instant::now(), false),
            time: 0,
            last_requested: false,
            last_done: false,
            components: serde_json::to_vec(&Components::of(pipeline)).unwrap_or_default(),
            metrics,
            published: None,
            to_publish: None,
        })
    }

    /// Exactly once: consumer-group offsets are committed (and the last checkpoint counts
    /// as done) only once the checkpoint's Kafka transaction has committed, which the sinks'
    /// operator records in `published`. Committed before it, a group's offsets could run
    /// ahead of the output: a run killed between the two, whose transactions never
    /// committed, would start afresh from those offsets and skip what it had not published.
    pub fn publish_after(mut self, published: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.published = Some(published);
        self
    }

    /// Whether the sources must not be polled now (a checkpoint's time is being agreed).
    pub fn paused(&self) -> bool {
        matches!(self.phase, Phase::Holding { .. })
    }

    /// Whether the last checkpoint (asked for with [`Self::finish`]) is complete.
    pub fn finished(&self) -> bool {
        self.last_done
    }

    /// Asks for a last checkpoint once the inputs have ended (worker 0 starts it when no
    /// other is under way), so that a restart does not do the work again.
    pub fn finish(&mut self) {
        if self.index == 0 && !self.last_requested && self.phase == Phase::Idle {
            self.last_requested = true;
            self.request(self.next_epoch, true);
        }
    }

    /// Worker 0 starts checkpoint `epoch`: the other workers' answers may reach it before
    /// its own request does, so what it gathers is reset here, not when it hears the request.
    fn request(&mut self, epoch: u64, last: bool) {
        self.proposals.clear();
        self.parts.clear();
        self.started = Instant::now();
        // No longer idle from now on, not from when the request comes back: a second request
        // of the same epoch (the last one, asked for while this one is on its way) would
        // restart the checkpoint after this worker saved its part.
        self.phase = Phase::Holding { epoch };
        self.send(Control::Request { epoch, last });
    }

    fn send(&mut self, message: Control) {
        self.input.send(message);
        self.round += 1;
        self.input.advance_to(self.round);
    }

    /// Runs the protocol one step: starts a checkpoint when one is due (worker 0), handles
    /// what the other workers said, and writes this worker's part once it is complete.
    pub fn step(&mut self, sources: &mut dyn Sources) -> anyhow::Result<()> {
        if self.index == 0 {
            self.metrics.checkpoints.observe_age();
            if self.phase == Phase::Idle && !self.last_requested && self.last_started.elapsed() >= self.interval {
                self.last_started = Instant::now();
                self.request(self.next_epoch, false);
            }
        }
        loop {
            let Some(message) = self.inbox.borrow_mut().pop_front() else { break };
            self.handle(message, sources)?;
        }
        if let (Some((epoch, last)), Some(published)) = (self.to_publish, self.published.as_ref()) {
            if published.load(std::sync::atomic::Ordering::Acquire) >= epoch {
                self.to_publish = None;
                self.send(Control::Published { epoch, last });
            }
        }
        if let Phase::Saving { epoch, time } = self.phase {
            if let Some((_, _, saved)) = self.state.take_complete() {
                let mut entries: Vec<(String, Vec<u8>)> = saved
                    .into_iter()
                    .map(|(participant, entries)| (participant, edgeflow_operators::state::encode(&entries)))
                    .collect();
                if self.index == 0 {
                    let listed = vec![Entry { route: 0, bytes: self.components.clone() }];
                    entries.push((COMPONENTS.to_owned(), edgeflow_operators::state::encode(&listed)));
                }
                let part = self
                    .store
                    .write_part(epoch, &format!("worker-{}", self.index), &entries)
                    .with_context(|| format!("cannot write checkpoint {epoch} (time {time})"))?;
                self.phase = Phase::Written { epoch };
                self.send(Control::Part { epoch, part });
            } else if self.saving_since.0.elapsed() >= SLOW_CHECKPOINT && !self.saving_since.1 {
                self.saving_since.1 = true;
                let waiting = self.state.waiting_for().join(", ");
                tracing::warn!(worker = self.index, epoch, time, %waiting, "a checkpoint waits for parts that have not saved");
            }
        }
        Ok(())
    }

    fn handle(&mut self, message: Control, sources: &mut dyn Sources) -> anyhow::Result<()> {
        tracing::trace!(worker = self.index, phase = ?self.phase, ?message, "checkpoint protocol");
        match message {
            Control::Request { epoch, last } => {
                self.last_requested |= last;
                self.phase = Phase::Holding { epoch };
                self.state.hold();
                let watermark = if last { EventTime::MAX } else { sources.horizon().max(self.state.horizon()) };
                self.send(Control::Proposal { epoch, watermark });
            }
            Control::Proposal { epoch, watermark } if self.index == 0 && epoch == self.next_epoch => {
                self.proposals.push(watermark);
                if self.proposals.len() == self.peers {
                    let highest = self.proposals.iter().copied().max().unwrap_or(0);
                    let time = highest.max(self.last_time.saturating_add(1));
                    self.send(Control::Decide { epoch, time });
                }
            }
            Control::Decide { epoch, time } => {
                self.time = time;
                self.state.start(epoch, time);
                sources.begin(epoch, time);
                self.phase = Phase::Saving { epoch, time };
                self.saving_since = (Instant::now(), false);
                tracing::debug!(epoch, time, "checkpoint started");
            }
            Control::Part { epoch, part } if self.index == 0 && epoch == self.next_epoch => {
                self.parts.push(part);
                if self.parts.len() == self.peers {
                    let time = self.time;
                    pause_for_tests(epoch);
                    self.parts.sort_by(|a, b| a.name.cmp(&b.name));
                    self.store
                        .commit(epoch, time, &self.parts)
                        .with_context(|| format!("cannot complete checkpoint {epoch}"))?;
                    let bytes: u64 = self.parts.iter().map(|p| p.bytes).sum();
                    self.metrics.checkpoints.completed(self.started.elapsed(), bytes);
                    tracing::info!(
                        epoch,
                        time,
                        bytes,
                        ms = self.started.elapsed().as_millis() as u64,
                        "checkpoint complete"
                    );
                    self.send(Control::Committed { epoch, time });
                }
            }
            Control::Committed { epoch, time } => {
                self.state.set_committed(epoch);
                if self.published.is_none() {
                    sources.committed(epoch, self.last_requested)?;
                    self.last_done |= self.last_requested;
                } else if self.index == 0 {
                    self.to_publish = Some((epoch, self.last_requested));
                }
                self.next_epoch = epoch + 1;
                self.last_time = time;
                self.phase = Phase::Idle;
            }
            Control::Published { epoch, last } => {
                sources.committed(epoch, last)?;
                self.last_done |= last;
            }
            Control::Proposal { .. } | Control::Part { .. } => {}
        }
        Ok(())
    }
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("phase", &self.phase).finish_non_exhaustive()
    }
}

/// For tests only: `EDGEFLOW_TEST_PAUSE_BEFORE_MANIFEST=EPOCH:MS` makes worker 0 wait `MS`
/// milliseconds between the parts of checkpoint `EPOCH` and its manifest, so that a test can
/// kill the engine while a checkpoint is half written.
fn pause_for_tests(epoch: u64) {
    let Ok(setting) = std::env::var("EDGEFLOW_TEST_PAUSE_BEFORE_MANIFEST") else { return };
    let Some((at, ms)) = setting.split_once(':') else { return };
    if at.parse() == Ok(epoch) {
        if let Ok(ms) = ms.parse() {
            tracing::warn!(epoch, ms, "pausing before the manifest (EDGEFLOW_TEST_PAUSE_BEFORE_MANIFEST)");
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

#[cfg(test)]
mod tests {
    /// State is dropped by the component it belongs to, whatever its kind.
    #[test]
    fn participants_belong_to_their_component() {
        assert_eq!(super::owner("health/status"), "health");
        assert_eq!(super::owner("@source/edge"), "edge");
        assert_eq!(super::owner("@sink/changes"), "changes");
        assert_eq!(super::owner("source/status"), "source");
        assert_eq!(super::owner("@components"), "@components");
    }
}
