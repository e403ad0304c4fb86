//! Runs a pipeline on timely workers: threads of one process, or a cluster of processes.
//!
//! Each worker polls its share of every source in a driver loop, decides lateness against
//! the source's watermark (latest event clock minus `max_out_of_orderness`), feeds records
//! into the dataflow at their event time and advances the input to the watermark. The loop
//! stops polling a source when it is exhausted (its inputs close) or when a stop is
//! requested (SIGINT/SIGTERM): then in-flight records drain up to the watermark, sinks flush,
//! and the run ends.

mod checkpoint;
mod dataflow;
mod saving;
mod sink;

pub use checkpoint::{Restore, StateMismatch};
pub use dataflow::{Balanced, Build, Port};
use saving::{Buffered, Saving};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use edgeflow_connectors::kafka::KafkaTransaction;
use edgeflow_connectors::{wall_clock_ms, Source, SourceItem, SourceStatus};
use edgeflow_operators::{DeadLetter, EventTime};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;

use self::checkpoint::Checkpointer;
use self::dataflow::SourceInputs;
use self::sink::Failure;
use crate::components::{OpenSink, OpenSource};
use crate::config::{LatePolicy, Pipeline};
use crate::metrics::Metrics;
use edgeflow_operators::state::WorkerState;
use timely::dataflow::ProbeHandle;

/// How to run a pipeline.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker threads per process.
    pub workers: usize,
    /// Processes in the cluster (1: no cluster).
    pub processes: usize,
    /// This process's index in the cluster.
    pub process: usize,
    /// File with one `host:port` per process, for a cluster.
    pub hostfile: Option<PathBuf>,
    /// Set to stop the run gracefully.
    pub stop: Arc<AtomicBool>,
    /// Components whose state in the checkpoint may be dropped when they no longer fit the
    /// pipeline (removed, or of another type).
    pub allow_state_drop: Vec<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            processes: 1,
            process: 0,
            hostfile: None,
            stop: Arc::new(AtomicBool::new(false)),
            allow_state_drop: Vec::new(),
        }
    }
}

/// Records per poll of one source.
const BATCH: usize = 1024;
/// Batches a worker may have in flight before it waits for the dataflow to catch up.
const MAX_IN_FLIGHT: usize = 4;

/// Runs `pipeline` to completion (finite sources) or until `options.stop` is set.
pub fn run(pipeline: &Pipeline, options: &RunOptions, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let config = timely_config(options)?;
    let failure: Failure = Arc::new(Mutex::new(None));
    let pipeline = pipeline.clone();
    let stop = options.stop.clone();
    let worker_failure = failure.clone();
    let single_process = options.processes <= 1;
    let shared: Shared = pipeline
        .sources
        .iter()
        .map(|s| {
            let file_clock = single_process.then(edgeflow_connectors::file::FileClock::default);
            (s.name.clone(), SharedSource { finished: Default::default(), file_clock })
        })
        .collect();
    // One run per checkpoint directory (and process) at a time.
    let _lock = match &pipeline.checkpoint {
        Some(settings) => Some(edgeflow_connectors::checkpoint::DirLock::take(&settings.dir, options.process)?),
        None => None,
    };
    // Exactly once: the transaction opens first, which fences a crashed run's producer and
    // aborts its open transaction; then Kafka tells which checkpoint's output it committed,
    // and the run restores that checkpoint.
    let transactional_id = pipeline.exactly_once();
    let transaction = match (&transactional_id, options.process) {
        (Some(id), 0) => {
            let config = kafka_sink_config(&pipeline)?;
            Some(KafkaTransaction::open(config, id, &metrics.kafka).context("cannot start the Kafka transaction")?)
        }
        _ => None,
    };
    let committed = match &transactional_id {
        Some(id) => Some(
            KafkaTransaction::committed_epoch(kafka_sink_config(&pipeline)?, id)
                .context("cannot read which checkpoint's output Kafka committed")?,
        ),
        None => None,
    };
    let restore = match &pipeline.checkpoint {
        Some(settings) => checkpoint::load(&pipeline, settings, committed, &options.allow_state_drop, &metrics)?,
        None => None,
    };
    let restore = restore.map(Arc::new);
    let transaction = Arc::new(Mutex::new(transaction));
    // Live tables: fed by the dataflow, queried over Flight SQL while the run lasts.
    let server = match &pipeline.serve {
        Some(serving) => Some(crate::serve::Server::start(serving)?),
        None => None,
    };
    let tables = server.as_ref().map(|server| server.tables.clone());
    let guards = timely::execute(config, move |worker| {
        let transaction = if worker.index() == 0 { transaction.lock().ok().and_then(|mut t| t.take()) } else { None };
        let result = run_worker(
            worker,
            &pipeline,
            &metrics,
            (&stop, &worker_failure),
            &shared,
            restore.as_deref(),
            (transaction, tables.as_ref()),
        );
        if let Err(err) = &result {
            let mut failure = worker_failure.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert_with(|| format!("{err:#}"));
            stop.store(true, Ordering::Relaxed);
        }
    })
    .map_err(|err| anyhow!("cannot start the timely workers: {err}"))?;
    for result in guards.join() {
        result.map_err(|err| anyhow!("a worker failed: {err}"))?;
    }
    if let Some(server) = server {
        server.stop();
    }
    let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        Some(message) => Err(anyhow!(message)),
        None => Ok(()),
    }
}

/// The Kafka settings of an exactly-once pipeline's transactional producer: its first Kafka
/// sink's (validation made every Kafka sink share the brokers).
fn kafka_sink_config(pipeline: &Pipeline) -> anyhow::Result<&edgeflow_connectors::kafka::KafkaSinkConfig> {
    pipeline
        .sinks
        .iter()
        .find_map(|s| s.component.kafka())
        .ok_or_else(|| anyhow!("exactly_once needs a Kafka sink (the pipeline was validated; this is a bug)"))
}

fn timely_config(options: &RunOptions) -> anyhow::Result<timely::Config> {
    let workers = options.workers.max(1);
    if options.processes <= 1 {
        return Ok(timely::Config::process(workers));
    }
    let hostfile = options.hostfile.as_ref().ok_or_else(|| {
        anyhow!("--processes {} needs --hostfile FILE with one host:port per process", options.processes)
    })?;
    let text =
        std::fs::read_to_string(hostfile).with_context(|| format!("cannot read hostfile `{}`", hostfile.display()))?;
    let addresses: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect();
    if addresses.len() < options.processes {
        return Err(anyhow!(
            "hostfile `{}` lists {} addresses but --processes is {}\nhint: write one host:port per line, one line per process",
            hostfile.display(),
            addresses.len(),
            options.processes
        ));
    }
    if options.process >= options.processes {
        return Err(anyhow!("--process {} is out of range for --processes {}", options.process, options.processes));
    }
    Ok(timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: workers,
            process: options.process,
            addresses: addresses[..options.processes].to_vec(),
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    })
}

/// What the workers of this process share per source: the Kafka partitions read to their
/// end, and a file's event clock (only when every worker is in this process).
#[derive(Default)]
pub struct SharedSource {
    /// Kafka partitions read to their end.
    pub finished: edgeflow_connectors::kafka::FinishedPartitions,
    /// A file's event clock.
    pub file_clock: Option<edgeflow_connectors::file::FileClock>,
}

type Shared = std::collections::HashMap<String, SharedSource>;

/// One source on one worker: its connector, inputs and watermark.
struct SourceDriver {
    name: String,
    /// The span its log lines are in: the source's name and type.
    span: tracing::Span,
    source: Option<Box<dyn Source>>,
    inputs: Option<SourceInputs>,
    max_out_of_orderness: u64,
    idle_timeout: u64,
    /// Latest event clock seen.
    clock: Option<EventTime>,
    /// Latest data time of any record handed to the dataflow.
    max_time: EventTime,
    /// Checkpoints waiting for the sinks: committed once the sinks pass their time.
    checkpoints: std::collections::VecDeque<(EventTime, edgeflow_connectors::Checkpoint)>,
    /// With checkpoints: its part in them.
    saving: Option<Saving>,
    /// Ended, its inputs at the end of time (with checkpoints, until the last one): the
    /// latest time it handed anything in at before (its watermark or a record's time).
    ended: Option<EventTime>,
    last_commit: Instant,
    /// Current watermark: the inputs' time.
    watermark: EventTime,
    /// Since when every poll has found nothing (`None`: the last found records, or the
    /// worker did not poll for a while, see [`edgeflow_connectors::UNPOLLED`]).
    idle_since: Option<Instant>,
    last_poll: Instant,
    items: Vec<SourceItem>,
    records: Counter,
    dead: Counter,
    late: Counter,
    /// Dead letters by reason, registered on first use (so only reasons that occurred show).
    malformed: Option<Counter>,
    late_dead: Option<Counter>,
    future_dead: Option<Counter>,
    watermark_gauge: Gauge<f64, AtomicU64>,
    lag_gauge: Gauge<f64, AtomicU64>,
}

impl SourceDriver {
    /// Polls once; returns the status, feeding records into the dataflow.
    fn poll(&mut self, policy: LatePolicy, metrics: &Metrics) -> anyhow::Result<SourceStatus> {
        let span = self.span.clone();
        let _entered = span.enter();
        let (Some(source), Some(inputs)) = (self.source.as_mut(), self.inputs.as_mut()) else {
            return Ok(SourceStatus::Exhausted);
        };
        let status = source
            .poll(&mut self.items, BATCH)
            .inspect_err(|err| {
                tracing::error!(fault = err.fault().as_str(), retryable = err.retryable(), %err, "source failed");
            })
            .with_context(|| format!("source `{}` failed", self.name))?;
        let mut records = 0u64;
        for item in self.items.drain(..) {
            records += 1;
            // Each record's watermark is decided by the clock up to and including it, so
            // lateness, and the time at which rejected records enter the dataflow, do not
            // depend on how items were batched or spread over workers.
            let (clock, record, letter) = match item {
                SourceItem::Record { record, clock } => (Some(clock), Some(record), None),
                SourceItem::Malformed { letter, clock } => (clock, None, Some((letter, false))),
                SourceItem::Future { letter, clock } => (clock, None, Some((letter, true))),
            };
            if let Some(clock) = clock {
                self.clock = Some(self.clock.map_or(clock, |seen| seen.max(clock)));
            }
            let watermark = self.clock.map_or(0, |c| c.saturating_sub(self.max_out_of_orderness)).max(self.watermark);
            if let Some((letter, future)) = letter {
                self.dead.inc();
                let (slot, reason) =
                    if future { (&mut self.future_dead, "future") } else { (&mut self.malformed, "malformed") };
                reason_counter(slot, metrics, &self.name, reason).inc();
                if let Some(saving) = self.saving.as_mut() {
                    saving.keep(watermark, || Buffered::DeadLetter(letter.clone()));
                }
                inputs.dead_letters.update_at(letter, watermark, 1);
                continue;
            }
            let Some(record) = record else { continue };
            self.max_time = self.max_time.max(watermark);
            let event_time = record.event_time();
            if event_time >= watermark {
                self.max_time = self.max_time.max(event_time);
                if let Some(saving) = self.saving.as_mut() {
                    saving.keep(event_time, || Buffered::of(&record));
                }
                inputs.insert(record, event_time);
                continue;
            }
            self.late.inc();
            match policy {
                LatePolicy::Drop => {}
                LatePolicy::Update => {
                    if let Some(saving) = self.saving.as_mut() {
                        saving.keep(watermark, || Buffered::of(&record));
                    }
                    inputs.insert(record, watermark)
                }
                LatePolicy::DeadLetter => {
                    self.dead.inc();
                    reason_counter(&mut self.late_dead, metrics, &self.name, "late").inc();
                    let reason = format!(
                        "late record: event time {event_time} is {} ms behind the watermark {watermark}",
                        watermark - event_time
                    );
                    let (payload, position) = (record.to_json(), record.position());
                    let letter = DeadLetter { source: self.name.clone(), position, reason, payload };
                    if let Some(saving) = self.saving.as_mut() {
                        saving.keep(watermark, || Buffered::DeadLetter(letter.clone()));
                    }
                    inputs.dead_letters.update_at(letter, watermark, 1);
                }
            }
        }
        if records > 0 {
            if self.saving.is_none() {
                if let Some(checkpoint) = source.checkpoint() {
                    self.checkpoints.push_back((self.max_time, checkpoint));
                }
            }
            self.records.inc_by(records);
            metrics.records_total.inc_by(records);
        }
        let now = Instant::now();
        let looked = now.saturating_duration_since(self.last_poll) <= edgeflow_connectors::UNPOLLED;
        self.last_poll = now;
        let idle_since = match (status, records, looked) {
            (SourceStatus::Idle { .. }, 0, true) => Some(*self.idle_since.get_or_insert(now)),
            _ => {
                self.idle_since = None;
                None
            }
        };
        let mut target = self.clock.map_or(0, |clock| clock.saturating_sub(self.max_out_of_orderness));
        if idle_since.is_some_and(|since| now.duration_since(since) >= Duration::from_millis(self.idle_timeout)) {
            // An idle source must not hold the frontier back: follow the wall clock.
            target = target.max(wall_clock_ms().saturating_sub(self.max_out_of_orderness));
        }
        self.advance(target);
        if status == SourceStatus::Exhausted {
            self.end();
        }
        self.try_save();
        Ok(status)
    }

    fn advance(&mut self, target: EventTime) {
        if target > self.watermark {
            self.watermark = target;
            if let Some(inputs) = self.inputs.as_mut() {
                inputs.heartbeats.advance_to(target);
                inputs.requests.advance_to(target);
                inputs.updates.advance_to(target);
                inputs.raw.advance_to(target);
                inputs.dead_letters.advance_to(target);
                inputs.heartbeats.flush();
                inputs.requests.flush();
                inputs.updates.flush();
                inputs.raw.flush();
                inputs.dead_letters.flush();
            }
            self.watermark_gauge.set(target as f64 / 1000.0);
        }
        let lag_ms = wall_clock_ms() as f64 - self.watermark as f64;
        self.lag_gauge.set(lag_ms / 1000.0);
    }

    /// Commits every checkpoint whose records the sinks have written (their probe has
    /// passed the latest time read before the checkpoint).
    fn commit_written(&mut self, sinks: &ProbeHandle<EventTime>, last: bool) -> anyhow::Result<()> {
        // Commit at most every 200 ms while running; the last commit waits for the broker.
        if !last && self.last_commit.elapsed() < Duration::from_millis(200) {
            return Ok(());
        }
        let Some(source) = self.source.as_mut() else { return Ok(()) };
        let mut latest = None;
        while let Some((time, _)) = self.checkpoints.front() {
            if sinks.less_equal(time) {
                break;
            }
            latest = self.checkpoints.pop_front().map(|(_, checkpoint)| checkpoint);
        }
        if let Some(checkpoint) = latest {
            source.commit(&checkpoint, last).with_context(|| format!("source `{}` failed to commit", self.name))?;
            self.last_commit = Instant::now();
        }
        Ok(())
    }

    /// Saves its part of the checkpoint being taken once its watermark has reached the
    /// checkpoint's time (or its inputs have closed).
    fn try_save(&mut self) {
        let Some(saving) = self.saving.as_mut() else { return };
        let source = &mut self.source;
        let ended = self.inputs.is_none() || self.ended.is_some();
        saving.try_save(self.watermark, ended, self.clock, || source.as_mut().and_then(|source| source.position()));
    }

    /// Goes on from a checkpoint: the source resumes from the saved positions, the clock is
    /// the one this worker saved (or the least saved, on another number of workers), the
    /// inputs move to the checkpoint's time and the records handed in at or after it (by the
    /// workers whose share this worker takes) are handed in again.
    fn restore(
        &mut self,
        time: EventTime,
        saved: Vec<saving::SavedSource>,
        index: usize,
        peers: usize,
    ) -> anyhow::Result<()> {
        let positions: Vec<edgeflow_connectors::Position> = saved.iter().filter_map(|s| s.position.clone()).collect();
        if let Some(source) = self.source.as_mut() {
            if !positions.is_empty() {
                source.resume(&positions).with_context(|| format!("source `{}` cannot resume", self.name))?;
            }
        }
        let own = saved.iter().find(|s| s.index == index && s.peers == peers);
        self.clock = match own {
            Some(own) => own.clock,
            None => saved.iter().filter_map(|s| s.clock).min(),
        };
        self.advance(time);
        let Some(inputs) = self.inputs.as_mut() else { return Ok(()) };
        let mut again = 0usize;
        for part in saved.into_iter().filter(|s| s.index % peers == index) {
            for (at, item) in part.items {
                let at = at.max(time);
                if let Some(saving) = self.saving.as_mut() {
                    saving.keep(at, || item.clone());
                }
                again += 1;
                self.max_time = self.max_time.max(at);
                match item {
                    saving::Buffered::Heartbeat(heartbeat) => inputs.heartbeats.update_at(heartbeat, at, 1),
                    saving::Buffered::Request(request) => inputs.requests.update_at(request, at, 1),
                    saving::Buffered::Update(update) => inputs.updates.update_at(*update, at, 1),
                    saving::Buffered::Raw(message) => inputs.raw.update_at(*message, at, 1),
                    saving::Buffered::DeadLetter(letter) => inputs.dead_letters.update_at(letter, at, 1),
                }
            }
        }
        tracing::info!(source = %self.name, time, again, "source restored from the checkpoint");
        Ok(())
    }

    /// Lets the connector answer its peers while the worker does not poll it.
    fn keep_alive(&mut self) {
        if let Some(source) = self.source.as_mut() {
            source.keep_alive();
        }
    }

    fn flush(&mut self) {
        if let Some(inputs) = self.inputs.as_mut() {
            inputs.heartbeats.flush();
            inputs.requests.flush();
            inputs.updates.flush();
            inputs.raw.flush();
            inputs.dead_letters.flush();
        }
    }

    /// Closes the inputs (dropping them closes them); the connector stays, to commit the
    /// last checkpoints once the sinks have written them.
    fn close(&mut self) {
        self.inputs = None;
    }

    /// The source has ended. Without checkpoints its inputs close. With checkpoints they
    /// move to the end of time instead, and close only after the last checkpoint: operators
    /// whose inputs close are retired, and could not save their state in it.
    fn end(&mut self) {
        if self.saving.is_some() {
            // (Called again when every source has ended: the time stays the first one.)
            self.ended.get_or_insert(self.watermark.max(self.max_time));
            self.advance(EventTime::MAX);
        } else {
            self.close();
        }
    }

    /// Whether it has nothing more to read.
    fn done(&self) -> bool {
        self.inputs.is_none() || self.ended.is_some()
    }
}

/// Steps the dataflow until the sinks have passed the inputs' frontier over all workers (at
/// most 30 s); returns that frontier.
fn drain(
    worker: &mut timely::worker::Worker,
    probes: &dataflow::Probes,
    failed: &dyn Fn() -> bool,
) -> Option<EventTime> {
    let low = frontier_of(&probes.inputs);
    let deadline = Instant::now() + Duration::from_secs(30);
    while low.is_some_and(|low| probes.sinks.less_than(&low)) && Instant::now() < deadline && !failed() {
        worker.step_or_park(Some(Duration::from_millis(10)));
    }
    low
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    pipeline: &Pipeline,
    metrics: &Arc<Metrics>,
    (stop, failure): (&Arc<AtomicBool>, &Failure),
    shared: &Shared,
    restore: Option<&Restore>,
    (transaction, tables): (Option<KafkaTransaction>, Option<&crate::serve::feed::SharedTables>),
) -> anyhow::Result<()> {
    let (index, peers) = (worker.index(), worker.peers());
    let checkpointed = pipeline.checkpoint.is_some();
    let mut state = WorkerState::new(index, peers, restore.map(|r| (r.time, r.participants.clone())));
    if checkpointed {
        state = state.checkpointing();
    }
    let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handles = Vec::new();
    for spec in &pipeline.sinks {
        let sink = if index == 0 {
            let resume = match restore {
                Some(restore) => sink_resume(restore, &spec.name)?,
                None => None,
            };
            let cx = OpenSink { metrics, transaction: transaction.as_ref(), resume: resume.as_deref() };
            Some(spec.component.open(&cx).with_context(|| format!("cannot open sink `{}`", spec.name))?)
        } else {
            None
        };
        handles.push((spec.name.clone(), sink));
    }
    let sinks = dataflow::Sinks {
        sinks: handles,
        exactly_once: pipeline.exactly_once().is_some(),
        transaction: transaction.map(|inner| {
            Box::new(Publishing { inner, published: published.clone() }) as Box<dyn edgeflow_connectors::Transaction>
        }),
        failure: failure.clone(),
        stop: stop.clone(),
        state: checkpointed.then(|| state.clone()),
        tables: tables.cloned(),
    };
    let dataflow_index = worker.next_dataflow_index();
    let (inputs, probes) =
        worker.dataflow_named(&pipeline.name, |scope| dataflow::build(scope, pipeline, sinks, metrics, &state))?;
    let mut checkpointer = match &pipeline.checkpoint {
        Some(settings) => {
            let checkpointer = Checkpointer::new(worker, pipeline, settings, state.clone(), restore, metrics.clone())?;
            Some(match pipeline.exactly_once() {
                Some(_) => checkpointer.publish_after(published),
                None => checkpointer,
            })
        }
        None => None,
    };

    let mut drivers = Vec::new();
    for (spec, inputs) in pipeline.sources.iter().zip(inputs) {
        let cx = OpenSource { name: &spec.name, index, peers, shared: shared.get(&spec.name), metrics, checkpointed };
        let source = spec.component.open(&cx).with_context(|| format!("cannot open source `{}`", spec.name))?;
        let labels = crate::metrics::labels::Source { source: spec.name.clone() };
        let mut driver = SourceDriver {
            name: spec.name.clone(),
            span: tracing::info_span!("source", name = %spec.name, r#type = spec.kind.name(), worker = index),
            source: Some(source),
            inputs: Some(inputs),
            max_out_of_orderness: spec.component.max_out_of_orderness(),
            idle_timeout: spec.component.idle_timeout(),
            clock: None,
            max_time: 0,
            checkpoints: std::collections::VecDeque::new(),
            saving: checkpointed.then(|| Saving::new(state.handle(&format!("@source/{}", spec.name)), index, peers)),
            ended: None,
            last_commit: Instant::now(),
            watermark: 0,
            idle_since: None,
            last_poll: Instant::now(),
            items: Vec::with_capacity(BATCH),
            records: metrics.source_records.get_or_create(&labels).clone(),
            dead: metrics.dead_letters_total.get_or_create(&labels).clone(),
            late: metrics
                .late_records
                .get_or_create(&crate::metrics::labels::SourcePolicy {
                    source: spec.name.clone(),
                    policy: pipeline.late_policy.as_str(),
                })
                .clone(),
            malformed: None,
            late_dead: None,
            future_dead: None,
            watermark_gauge: metrics
                .watermark
                .get_or_create(&crate::metrics::labels::SourceWorker { source: spec.name.clone(), worker: index })
                .clone(),
            lag_gauge: metrics.watermark_lag_of(&spec.name, index),
        };
        if let Some(restore) = restore {
            let saved = saving::saved_sources(restore.of(&format!("@source/{}", spec.name)))?;
            driver.restore(restore.time, saved, index, peers)?;
        }
        drivers.push(driver);
    }
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(worker = index, peers, sources = drivers.len(), "worker started");

    let mut in_flight: std::collections::VecDeque<EventTime> = std::collections::VecDeque::new();
    let failed = || failure.lock().map(|f| f.is_some()).unwrap_or(true);
    loop {
        if stop.load(Ordering::Relaxed) || failed() {
            break;
        }
        if let Some(checkpointer) = checkpointer.as_mut() {
            checkpointer.step(&mut Drivers(&mut drivers))?;
            if checkpointer.paused() {
                // A checkpoint's time is being agreed: one round trip of the control dataflow.
                worker.step_or_park(Some(Duration::from_millis(1)));
                continue;
            }
        }
        let mut active = false;
        let mut ready = false;
        let mut wait_ms = 200u64;
        for driver in &mut drivers {
            if driver.done() {
                continue;
            }
            if driver.saving.is_none() {
                driver.commit_written(&probes.sinks, false)?;
            }
            match driver.poll(pipeline.late_policy, metrics)? {
                SourceStatus::Ready => ready = true,
                SourceStatus::Idle { retry_in_ms } => wait_ms = wait_ms.min(retry_in_ms.max(1)),
                SourceStatus::Exhausted => {}
            }
            active |= !driver.done();
        }
        if !active {
            break;
        }
        if ready {
            worker.step();
            // Flow control: do not run more than MAX_IN_FLIGHT batches ahead of the sinks.
            let low = drivers.iter().filter(|d| !d.done()).map(|d| d.watermark).min().unwrap_or(0);
            in_flight.push_back(low);
            if in_flight.len() > MAX_IN_FLIGHT {
                let target = in_flight.pop_front().unwrap_or(0);
                while probes.processed.less_than(&target) && !failed() && !stop.load(Ordering::Relaxed) {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                    // What this worker waits for may need its sources to answer their peers
                    // (a Kafka group rebalance that gives another worker its partitions).
                    for driver in drivers.iter_mut().filter(|d| !d.done()) {
                        driver.keep_alive();
                    }
                    // Other workers may wait for this one's answer in a checkpoint.
                    if let Some(checkpointer) = checkpointer.as_mut() {
                        checkpointer.step(&mut Drivers(&mut drivers))?;
                    }
                }
            }
        } else {
            for driver in &mut drivers {
                driver.flush();
            }
            worker.step_or_park(Some(Duration::from_millis(wait_ms)));
        }
    }

    if stop.load(Ordering::Relaxed) && drivers.iter().any(|d| !d.done()) {
        // Graceful stop: drain what is in flight up to the inputs' frontier (over all
        // workers), let sinks flush, and leave without pretending the sources ended (which
        // would expire every node).
        for driver in &mut drivers {
            driver.flush();
        }
        worker.step();
        let low = drain(worker, &probes, &failed);
        for driver in &mut drivers {
            driver.commit_written(&probes.sinks, true)?;
        }
        tracing::info!(worker = index, frontier = ?low, "stopped; in-flight records drained");
        metrics.ready.store(false, Ordering::Relaxed);
        worker.drop_dataflow(dataflow_index);
        return Ok(());
    }
    if failed() {
        worker.drop_dataflow(dataflow_index);
        return Ok(());
    }
    for driver in &mut drivers {
        driver.end();
    }
    // Sources exhausted: run the dataflow to completion, with a last checkpoint at the end of
    // time once every worker's sources have ended (so that a restart has nothing left to
    // do), unless a stop is requested while other workers' sources still run: then drain
    // with them, as they do.
    loop {
        if let Some(checkpointer) = checkpointer.as_mut() {
            // The last checkpoint once the inputs are at the end of time, and no operator
            // drives time on its own (a training loop whose rounds are times).
            if !probes.inputs.less_than(&EventTime::MAX) && !state.driving() {
                checkpointer.finish();
            }
            checkpointer.step(&mut Drivers(&mut drivers))?;
            if checkpointer.finished() {
                for driver in &mut drivers {
                    driver.close();
                }
            }
        }
        if probes.sinks.done() && checkpointer.as_ref().is_none_or(Checkpointer::finished) {
            break;
        }
        if failed() {
            worker.drop_dataflow(dataflow_index);
            break;
        }
        if stop.load(Ordering::Relaxed) {
            let low = drain(worker, &probes, &failed);
            tracing::info!(worker = index, frontier = ?low, "stopped; in-flight records drained");
            worker.drop_dataflow(dataflow_index);
            break;
        }
        worker.step_or_park(Some(Duration::from_millis(10)));
    }
    for driver in &mut drivers {
        driver.commit_written(&probes.sinks, true)?;
    }
    metrics.ready.store(false, Ordering::Relaxed);
    if !stop.load(Ordering::Relaxed) {
        tracing::info!(worker = index, "sources exhausted; pipeline finished");
    }
    Ok(())
}

/// What a sink saved at the checkpoint being restored (`None`: nothing to go back to).
fn sink_resume(restore: &Restore, sink: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(entry) = restore.of(&format!("@sink/{sink}")).first() else { return Ok(None) };
    entry.value::<Option<Vec<u8>>>().with_context(|| format!("the checkpoint's state of sink `{sink}`"))
}

/// A worker's source drivers, as the checkpoint protocol sees them.
struct Drivers<'a>(&'a mut Vec<SourceDriver>);

impl checkpoint::Sources for Drivers<'_> {
    fn horizon(&self) -> EventTime {
        // Records and dead letters enter at their time or at the watermark: past both. An
        // ended source's watermark is the end of time, but what it handed in is before the
        // time it ended at, and still in the dataflow (another worker's sources may run on).
        let handed_in = |d: &SourceDriver| match d.ended {
            Some(at) => at,
            None if d.inputs.is_none() => 0,
            None => d.watermark.max(d.max_time),
        };
        self.0.iter().map(|d| handed_in(d).saturating_add(1)).max().unwrap_or(0)
    }

    fn begin(&mut self, epoch: u64, time: EventTime) {
        for driver in self.0.iter_mut() {
            if let Some(saving) = driver.saving.as_mut() {
                saving.begin(epoch, time);
            }
            driver.try_save();
        }
    }

    fn committed(&mut self, epoch: u64, last: bool) -> anyhow::Result<()> {
        for driver in self.0.iter_mut() {
            let (Some(saving), Some(source)) = (driver.saving.as_mut(), driver.source.as_mut()) else { continue };
            if let Some(offsets) = saving.committed(epoch) {
                source
                    .commit(&offsets, last)
                    .with_context(|| format!("source `{}` failed to commit its group offsets", driver.name))?;
            }
        }
        Ok(())
    }
}

/// The transaction of an exactly-once pipeline, recording each checkpoint it committed for
/// the checkpointer (see [`Checkpointer::publish_after`]).
struct Publishing {
    inner: KafkaTransaction,
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl edgeflow_connectors::Transaction for Publishing {
    fn commit(&mut self, epoch: u64) -> Result<(), edgeflow_connectors::ConnectorError> {
        self.inner.commit(epoch)?;
        self.published.fetch_max(epoch, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// The dead-letter counter of `source` for `reason`, looked up once and then kept.
fn reason_counter<'a>(
    slot: &'a mut Option<Counter>,
    metrics: &Metrics,
    source: &str,
    reason: &'static str,
) -> &'a Counter {
    slot.get_or_insert_with(|| {
        let labels = crate::metrics::labels::SourceReason { source: source.to_owned(), reason };
        metrics.dead_letters.get_or_create(&labels).clone()
    })
}

/// The least time of a probe's frontier; `None` once it is empty.
fn frontier_of(probe: &ProbeHandle<EventTime>) -> Option<EventTime> {
    probe.with_frontier(|frontier| frontier.iter().min().copied())
}

impl std::fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSource").finish_non_exhaustive()
    }
}
