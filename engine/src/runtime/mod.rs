//! Runs a pipeline on timely workers: threads of one process, or a cluster of processes.
//!
//! Each worker polls its share of every source in a driver loop, decides lateness against
//! the source's watermark (latest event clock minus `max_out_of_orderness`), feeds records
//! into the dataflow at their event time and advances the input to the watermark. The loop
//! stops polling a source when it is exhausted (its inputs close) or when a stop is
//! requested (SIGINT/SIGTERM): then in-flight records drain up to the watermark, sinks flush,
//! and the run ends.

mod dataflow;
mod sink;

pub use dataflow::{Balanced, Build, Port};

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

use self::dataflow::SourceInputs;
use self::sink::Failure;
use crate::components::{OpenSink, OpenSource};
use crate::config::{LatePolicy, Pipeline};
use crate::metrics::Metrics;
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
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { workers: 1, processes: 1, process: 0, hostfile: None, stop: Arc::new(AtomicBool::new(false)) }
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
    let guards = timely::execute(config, move |worker| {
        let result = run_worker(worker, &pipeline, &metrics, &stop, &worker_failure, &shared);
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
    let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        Some(message) => Err(anyhow!(message)),
        None => Ok(()),
    }
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
    /// Exactly-once pipeline: records enter at processing time (the wall clock, strictly
    /// increasing per batch) and checkpoints go to the sinks' transaction.
    exactly_once: bool,
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
    last_commit: Instant,
    /// Current watermark: the inputs' time.
    watermark: EventTime,
    last_data: Instant,
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
        if self.exactly_once {
            return self.poll_processing_time(status, metrics);
        }
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
                inputs.dead_letters.update_at(letter, watermark, 1);
                continue;
            }
            let Some(record) = record else { continue };
            self.max_time = self.max_time.max(watermark);
            let event_time = record.event_time();
            if event_time >= watermark {
                self.max_time = self.max_time.max(event_time);
                inputs.insert(record, event_time);
                continue;
            }
            self.late.inc();
            match policy {
                LatePolicy::Drop => {}
                LatePolicy::Update => inputs.insert(record, watermark),
                LatePolicy::DeadLetter => {
                    self.dead.inc();
                    reason_counter(&mut self.late_dead, metrics, &self.name, "late").inc();
                    let reason = format!(
                        "late record: event time {event_time} is {} ms behind the watermark {watermark}",
                        watermark - event_time
                    );
                    let (payload, position) = (record.to_json(), record.position());
                    let letter = DeadLetter { source: self.name.clone(), position, reason, payload };
                    inputs.dead_letters.update_at(letter, watermark, 1);
                }
            }
        }
        if records > 0 {
            if let Some(checkpoint) = source.checkpoint() {
                self.checkpoints.push_back((self.max_time, checkpoint));
            }
            self.records.inc_by(records);
            metrics.records_total.inc_by(records);
            self.last_data = Instant::now();
        }
        let mut target = self.clock.map_or(0, |clock| clock.saturating_sub(self.max_out_of_orderness));
        if matches!(status, SourceStatus::Idle { .. })
            && self.last_data.elapsed() >= Duration::from_millis(self.idle_timeout)
        {
            // An idle source must not hold the frontier back: follow the wall clock.
            target = target.max(wall_clock_ms().saturating_sub(self.max_out_of_orderness));
        }
        self.advance(target);
        if status == SourceStatus::Exhausted {
            self.close();
        }
        Ok(status)
    }

    /// The exactly-once path of [`Self::poll`]: the batch enters at one processing time,
    /// followed by the source's checkpoint at that time, and the inputs move past it, so a
    /// time's checkpoint covers exactly the records at or before it. Lateness does not
    /// apply; there are no windows or timers in an exactly-once pipeline.
    fn poll_processing_time(&mut self, status: SourceStatus, metrics: &Metrics) -> anyhow::Result<SourceStatus> {
        let (Some(source), Some(inputs)) = (self.source.as_mut(), self.inputs.as_mut()) else {
            return Ok(SourceStatus::Exhausted);
        };
        let time = wall_clock_ms().max(self.watermark);
        let records = self.items.len() as u64;
        for item in self.items.drain(..) {
            match item {
                SourceItem::Record { record, .. } => inputs.insert(record, time),
                SourceItem::Malformed { letter, .. } => {
                    self.dead.inc();
                    reason_counter(&mut self.malformed, metrics, &self.name, "malformed").inc();
                    inputs.dead_letters.update_at(letter, time, 1);
                }
                SourceItem::Future { letter, .. } => {
                    self.dead.inc();
                    reason_counter(&mut self.future_dead, metrics, &self.name, "future").inc();
                    inputs.dead_letters.update_at(letter, time, 1);
                }
            }
        }
        let next = if records > 0 {
            if let Some(checkpoint) = source.checkpoint() {
                inputs.checkpoints.update_at(checkpoint, time, 1);
            }
            self.records.inc_by(records);
            metrics.records_total.inc_by(records);
            self.last_data = Instant::now();
            self.max_time = time;
            time + 1
        } else {
            time
        };
        self.advance(next);
        if status == SourceStatus::Exhausted {
            self.close();
        }
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
                inputs.checkpoints.advance_to(target);
                inputs.heartbeats.flush();
                inputs.requests.flush();
                inputs.updates.flush();
                inputs.raw.flush();
                inputs.dead_letters.flush();
                inputs.checkpoints.flush();
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

    fn flush(&mut self) {
        if let Some(inputs) = self.inputs.as_mut() {
            inputs.heartbeats.flush();
            inputs.requests.flush();
            inputs.updates.flush();
            inputs.raw.flush();
            inputs.dead_letters.flush();
            inputs.checkpoints.flush();
        }
    }

    /// Closes the inputs (dropping them closes them); the connector stays, to commit the
    /// last checkpoints once the sinks have written them.
    fn close(&mut self) {
        self.inputs = None;
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
    stop: &Arc<AtomicBool>,
    failure: &Failure,
    shared: &Shared,
) -> anyhow::Result<()> {
    let (index, peers) = (worker.index(), worker.peers());
    let transactional_id = pipeline.exactly_once();
    // Exactly once: one transactional producer on worker 0, shared by every sink.
    let transaction = match (&transactional_id, index) {
        (Some(id), 0) => {
            let config = pipeline.sinks.iter().find_map(|s| s.component.kafka()).ok_or_else(|| {
                anyhow!("exactly_once needs a Kafka sink (the pipeline was validated; this is a bug)")
            })?;
            Some(KafkaTransaction::open(config, id, &metrics.kafka).context("cannot start the Kafka transaction")?)
        }
        _ => None,
    };
    if transactional_id.is_some() {
        // The transaction's start fences the crashed run's producer and settles its open
        // transaction; no source may read its committed offsets before that.
        barrier(worker, &|| failure.lock().map(|f| f.is_some()).unwrap_or(true));
    }
    let mut handles = Vec::new();
    for spec in &pipeline.sinks {
        let sink = if index == 0 {
            let cx = OpenSink { metrics, transaction: transaction.as_ref() };
            Some(spec.component.open(&cx).with_context(|| format!("cannot open sink `{}`", spec.name))?)
        } else {
            None
        };
        handles.push((spec.name.clone(), sink));
    }
    let sinks = dataflow::Sinks {
        sinks: handles,
        transaction: transaction.map(|t| Box::new(t) as Box<dyn edgeflow_connectors::Transaction>),
        exactly_once: transactional_id.is_some(),
        failure: failure.clone(),
        stop: stop.clone(),
    };
    let dataflow_index = worker.next_dataflow_index();
    let (inputs, probes) =
        worker.dataflow_named(&pipeline.name, |scope| dataflow::build(scope, pipeline, sinks, metrics))?;

    let mut drivers = Vec::new();
    for (spec, inputs) in pipeline.sources.iter().zip(inputs) {
        let cx = OpenSource {
            name: &spec.name,
            index,
            peers,
            shared: shared.get(&spec.name),
            metrics,
            exactly_once: transactional_id.is_some(),
        };
        let source = spec.component.open(&cx).with_context(|| format!("cannot open source `{}`", spec.name))?;
        let labels = crate::metrics::labels::Source { source: spec.name.clone() };
        drivers.push(SourceDriver {
            name: spec.name.clone(),
            span: tracing::info_span!("source", name = %spec.name, r#type = spec.kind.name(), worker = index),
            exactly_once: transactional_id.is_some(),
            source: Some(source),
            inputs: Some(inputs),
            max_out_of_orderness: spec.component.max_out_of_orderness(),
            idle_timeout: spec.component.idle_timeout(),
            clock: None,
            max_time: 0,
            checkpoints: std::collections::VecDeque::new(),
            last_commit: Instant::now(),
            watermark: 0,
            last_data: Instant::now(),
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
        });
    }
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(worker = index, peers, sources = drivers.len(), "worker started");

    let mut in_flight: std::collections::VecDeque<EventTime> = std::collections::VecDeque::new();
    let failed = || failure.lock().map(|f| f.is_some()).unwrap_or(true);
    loop {
        if stop.load(Ordering::Relaxed) || failed() {
            break;
        }
        let mut active = false;
        let mut ready = false;
        let mut wait_ms = 200u64;
        for driver in &mut drivers {
            if driver.inputs.is_none() {
                continue;
            }
            driver.commit_written(&probes.sinks, false)?;
            match driver.poll(pipeline.late_policy, metrics)? {
                SourceStatus::Ready => ready = true,
                SourceStatus::Idle { retry_in_ms } => wait_ms = wait_ms.min(retry_in_ms.max(1)),
                SourceStatus::Exhausted => {}
            }
            active |= driver.inputs.is_some();
        }
        if !active {
            break;
        }
        if ready {
            worker.step();
            // Flow control: do not run more than MAX_IN_FLIGHT batches ahead of the sinks.
            let low = drivers.iter().filter(|d| d.inputs.is_some()).map(|d| d.watermark).min().unwrap_or(0);
            in_flight.push_back(low);
            if in_flight.len() > MAX_IN_FLIGHT {
                let target = in_flight.pop_front().unwrap_or(0);
                while probes.processed.less_than(&target) && !failed() && !stop.load(Ordering::Relaxed) {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
            }
        } else {
            for driver in &mut drivers {
                driver.flush();
            }
            worker.step_or_park(Some(Duration::from_millis(wait_ms)));
        }
    }

    if stop.load(Ordering::Relaxed) && drivers.iter().any(|d| d.inputs.is_some()) {
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
        driver.close();
    }
    // Sources exhausted: run the dataflow to completion, unless a stop is requested while
    // other workers' sources still run: then drain with them, as they do.
    while !probes.sinks.done() {
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

/// Returns once every worker of every process has called it (or `failed`): a frontier
/// barrier through a small dataflow that carries no data.
fn barrier(worker: &mut timely::worker::Worker, failed: &dyn Fn() -> bool) {
    use timely::dataflow::operators::{Input, Probe};
    let probe = ProbeHandle::new();
    let mut input = worker.dataflow::<EventTime, _, _>(|scope| {
        let (input, stream) = scope.new_input::<Vec<()>>();
        stream.probe_with(&probe);
        input
    });
    input.advance_to(1);
    while probe.less_than(&1) && !failed() {
        worker.step_or_park(Some(Duration::from_millis(1)));
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
