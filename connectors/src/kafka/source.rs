use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgeflow_operators::{DeadLetter, EventTime, RawMessage, Record, RecordKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::message::Message;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};

use prometheus_client::metrics::counter::Counter;
use rdkafka::statistics::Statistics;

use super::config::{AutoOffsetReset, KafkaFormat, KafkaSourceConfig};
use super::metrics::KafkaMetrics;
use super::{kafka_error, kafka_failure};
use crate::Fault;
use crate::{Checkpoint, ConnectorError, Position, Source, SourceItem, SourceStatus};

/// What the source knows of one assigned partition.
#[derive(Debug)]
struct Partition {
    /// Latest event time seen.
    max_time: Option<EventTime>,
    /// When a message last arrived.
    last_message: Instant,
    /// Offset after the last message read.
    next_offset: i64,
    /// Read to its end (with `stop_at_end`).
    at_end: bool,
    /// The broker reported end of partition and nothing has arrived since.
    caught_up: bool,
}

impl Partition {
    fn new(next_offset: i64, now: Instant) -> Self {
        Self { max_time: None, last_message: now, next_offset, at_end: false, caught_up: false }
    }
}

/// Where a partition stands for the source's event clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Read up to this event time.
    At(EventTime),
    /// Assigned, not read yet, and may have messages.
    Unknown,
    /// Idle, at its end, or empty: does not hold the clock back.
    Idle,
}

/// How a worker's consumer gets its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Joins the consumer group, which spreads the partitions over its members and moves
    /// them when members come and go (at-least-once pipelines).
    Group,
    /// Takes every `peers`-th partition starting at `index` (over the topics' partitions in
    /// order), without group membership, so partitions never move while records are in
    /// flight (exactly-once pipelines, whose offsets are committed by the transaction).
    Static { index: usize, peers: usize },
}

/// Partitions read to their end, shared by the workers of one process.
pub type FinishedPartitions = Arc<std::sync::Mutex<std::collections::HashSet<(String, i32)>>>;

/// Notes when the group has assigned partitions, and keeps end-of-partition events (normal
/// with `stop_at_end`) out of the error log.
/// Also reports consumer lag from librdkafka's statistics and times commits.
#[derive(Debug, Clone)]
struct SourceContext {
    assigned: Arc<AtomicBool>,
    assigned_at: Arc<std::sync::Mutex<Instant>>,
    /// Bumped on every assignment or revocation.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Consumer lag per partition from the latest statistics (-1: unknown).
    lags: Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>,
    metrics: Arc<KafkaMetrics>,
}

impl SourceContext {
    fn new(metrics: Arc<KafkaMetrics>) -> Self {
        Self {
            assigned: Arc::default(),
            assigned_at: Arc::new(std::sync::Mutex::new(Instant::now())),
            generation: Arc::default(),
            lags: Arc::default(),
            metrics,
        }
    }
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            tracing::warn!(%error, reason, "kafka client error");
        }
    }

    fn stats(&self, statistics: Statistics) {
        let mut lags = self.lags.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                // -1: the internal unassigned partition; lag -1: not known (not fetching).
                if *partition >= 0 {
                    lags.insert((topic.clone(), *partition), stats.consumer_lag);
                }
                if *partition >= 0 && stats.consumer_lag >= 0 && stats.fetch_state == "active" {
                    let labels = super::metrics::TopicPartition { topic: topic.clone(), partition: *partition };
                    self.metrics.consumer_lag.get_or_create(&labels).set(stats.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                tracing::info!(partitions = partitions.count(), "kafka partitions assigned");
                *self.assigned_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                self.assigned.store(true, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = partitions.count(), "kafka partitions revoked");
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            Rebalance::Error(err) => tracing::warn!(%err, "kafka rebalance failed"),
        }
    }
}

/// One worker's member of the consumer group.
pub struct KafkaSource {
    name: String,
    records: RecordKind,
    format: KafkaFormat,
    brokers: String,
    consumer: Arc<BaseConsumer<SourceContext>>,
    committer: Committer,
    assigned: Arc<AtomicBool>,
    assigned_at: Arc<std::sync::Mutex<Instant>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    lags: Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>,
    /// The assigned partitions, as of `seen_generation`.
    assignment: Vec<(String, i32)>,
    seen_generation: u64,
    /// Each assigned partition's own message queue, so that the source chooses which
    /// partition to read next (watermark alignment) without pausing fetches.
    queues: HashMap<(String, i32), PartitionQueue<SourceContext>>,
    /// How far a partition may run ahead of the slowest one before it is paused.
    max_skew: EventTime,
    /// With `stop_at_end`: each partition's end offset when the source opened.
    end_offsets: HashMap<(String, i32), i64>,
    finished: FinishedPartitions,
    partitions: HashMap<(String, i32), Partition>,
    idle_timeout: Duration,
    stop_at_end: bool,
    metrics: Arc<KafkaMetrics>,
    group: String,
    /// Messages and bytes consumed, per topic.
    counters: HashMap<String, (Counter, Counter)>,
    /// Records too far ahead of the wall clock are refused (`max_future`).
    future: edgeflow_operators::time::FutureBound,
    /// The positions this worker's partitions were resumed from.
    resumed: Vec<(String, i32, i64)>,
    /// Items taken while the worker was not polling (see [`Source::keep_alive`]), handed
    /// out first at the next poll.
    early: Vec<SourceItem>,
    /// A member of a consumer group (not fixed partitions).
    grouped: bool,
    /// When the worker last polled: a longer gap (the worker waited for the dataflow) is
    /// not counted as partitions being idle.
    last_poll: Instant,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource").field("name", &self.name).field("brokers", &self.brokers).finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Joins the consumer group and subscribes to the topics. `finished` is shared by the
    /// workers of this process: with `stop_at_end`, the partitions read to the end offsets
    /// they had when the source opened.
    pub fn open(
        name: &str,
        config: &KafkaSourceConfig,
        membership: Membership,
        finished: FinishedPartitions,
        metrics: Arc<KafkaMetrics>,
    ) -> Result<Self, ConnectorError> {
        let mut client = super::client_config(&config.brokers, &config.security, &config.options);
        client
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // End of partition tells alignment that a partition is caught up, and
            // `stop_at_end` that it is read.
            .set("enable.partition.eof", "true")
            // Shorter than librdkafka's default (45 s) so that a dead member's partitions move
            // within seconds; override through `options`. `max.poll.interval.ms` keeps its
            // default (5 min): a worker may wait that long for the others (flow control, an
            // idle partition holding the watermark back) without leaving the group.
            .set("session.timeout.ms", "10000")
            .set("statistics.interval.ms", "1000")
            .set("isolation.level", "read_committed")
            .set(
                "auto.offset.reset",
                match config.auto_offset_reset {
                    AutoOffsetReset::Earliest => "earliest",
                    AutoOffsetReset::Latest => "latest",
                },
            );
        for (key, value) in &config.options {
            client.set(key, value);
        }
        let fail = |err: KafkaError| {
            kafka_error(
                &config.brokers,
                format!("cannot create the consumer for group `{}`: {err}", config.group),
                &err,
            )
        };
        let context = SourceContext::new(metrics.clone());
        let assigned = context.assigned.clone();
        let assigned_at = context.assigned_at.clone();
        let generation = context.generation.clone();
        let lags = context.lags.clone();
        let consumer: Arc<BaseConsumer<SourceContext>> = Arc::new(client.create_with_context(context).map_err(fail)?);
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        // Every partition of the topics, in a fixed order.
        let mut all = Vec::new();
        for topic in &topics {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).map_err(fail)?;
            let mut ids: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions()).map(|p| p.id()).collect();
            ids.sort_unstable();
            all.extend(ids.into_iter().map(|id| ((*topic).to_owned(), id)));
        }
        if all.is_empty() {
            return Err(kafka_failure(
                &config.brokers,
                format!("topics {:?} have no partitions; do they exist?", config.topics),
                Fault::User,
            ));
        }
        let mine: Vec<(String, i32)> = match membership {
            Membership::Group => all,
            Membership::Static { index, peers } => {
                all.into_iter().enumerate().filter(|(k, _)| k % peers.max(1) == index).map(|(_, p)| p).collect()
            }
        };
        let mut end_offsets = HashMap::new();
        if config.stop_at_end {
            // The end is where each partition ends now.
            for (topic, partition) in &mine {
                let (_, high) = consumer.fetch_watermarks(topic, *partition, Duration::from_secs(30)).map_err(fail)?;
                end_offsets.insert((topic.clone(), *partition), high);
            }
        }
        match membership {
            Membership::Group => consumer.subscribe(&topics).map_err(fail)?,
            Membership::Static { .. } => {
                let mut list = TopicPartitionList::new();
                for (topic, partition) in &mine {
                    // The group's committed offset, else `auto_offset_reset`.
                    list.add_partition_offset(topic, *partition, Offset::Stored).map_err(fail)?;
                }
                consumer.assign(&list).map_err(fail)?;
                assigned.store(true, Ordering::Relaxed);
            }
        }
        let committer = Committer::start(name, &config.group, &config.brokers, consumer.clone(), metrics.clone())?;
        Ok(Self {
            name: name.to_owned(),
            records: config.records,
            format: config.format,
            brokers: config.brokers.clone(),
            consumer,
            committer,
            assigned,
            assigned_at,
            generation,
            lags,
            assignment: Vec::new(),
            seen_generation: u64::MAX,
            queues: HashMap::new(),
            max_skew: config.max_out_of_orderness.as_millis().max(1000),
            end_offsets,
            finished,
            partitions: HashMap::new(),
            idle_timeout: Duration::from_millis(config.idle_timeout.as_millis()),
            stop_at_end: config.stop_at_end,
            last_poll: Instant::now(),
            metrics,
            group: config.group.clone(),
            counters: HashMap::new(),
            future: edgeflow_operators::time::FutureBound::new(config.max_future.as_millis()),
            resumed: Vec::new(),
            early: Vec::new(),
            grouped: matches!(membership, Membership::Group),
        })
    }

    /// After a rebalance: caches the assignment and gives each assigned partition its own
    /// queue. Messages fetched before the split still come through the consumer's queue.
    fn refresh_assignment(&mut self) {
        let generation = self.generation.load(Ordering::Relaxed);
        if generation == self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        let list = self.consumer.assignment().unwrap_or_default();
        self.assignment = list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        self.queues.clear();
        for (topic, partition) in &self.assignment {
            if let Some(queue) = self.consumer.split_partition_queue(topic, *partition) {
                self.queues.insert((topic.clone(), *partition), queue);
            }
        }
    }

    /// Where an assigned partition stands for the event clock.
    fn progress(&self, key: &(String, i32), now: Instant, since_assignment: Duration) -> Progress {
        match self.partitions.get(key) {
            Some(state) if state.at_end => Progress::Idle,
            Some(state) if now.saturating_duration_since(state.last_message) >= self.idle_timeout => Progress::Idle,
            Some(Partition { max_time: Some(time), .. }) => Progress::At(*time),
            _ if since_assignment >= self.idle_timeout => Progress::Idle,
            // Not read yet: unknown, unless statistics say there is nothing to read.
            _ => match self.lags.lock().ok().and_then(|lags| lags.get(key).copied()) {
                Some(0) => Progress::Idle,
                _ => Progress::Unknown,
            },
        }
    }

    /// The source's event clock: the least, over assigned partitions that are neither idle
    /// nor finished, of the latest event time seen in the partition. A partition assigned but
    /// not read yet holds the clock back (0) until it has been idle for `idle_timeout`; when
    /// every partition is idle the clock follows the latest event time seen.
    fn clock(&self, now: Instant, since_assignment: Duration) -> EventTime {
        let mut least: Option<EventTime> = None;
        for key in &self.assignment {
            match self.progress(key, now, since_assignment) {
                Progress::At(time) => least = Some(least.map_or(time, |l| l.min(time))),
                Progress::Unknown => return 0,
                Progress::Idle => {}
            }
        }
        least.or_else(|| self.partitions.values().filter_map(|state| state.max_time).max()).unwrap_or(0)
    }

    /// Watermark alignment: the order in which to read the partitions' queues (slowest in
    /// event time first) and the event time beyond which a partition is not read further
    /// in this poll: `max_skew` past the slowest partition that is still receiving
    /// (neither idle nor caught up). librdkafka fetches every partition at once and would
    /// hand out one partition's fetch after another; without alignment one partition could
    /// run far ahead, its records waiting in the dataflow for the watermark and its offsets
    /// uncommitted.
    fn read_order(&self, now: Instant, since_assignment: Duration) -> (Vec<(String, i32)>, EventTime) {
        let mut floor: Option<EventTime> = None;
        let mut order: Vec<(Option<EventTime>, (String, i32))> = Vec::with_capacity(self.assignment.len());
        for key in &self.assignment {
            let state = self.partitions.get(key);
            let receiving = !state.is_some_and(|s| s.caught_up);
            if let (Progress::At(time), true) = (self.progress(key, now, since_assignment), receiving) {
                floor = Some(floor.map_or(time, |f| f.min(time)));
            }
            order.push((state.and_then(|s| s.max_time), key.clone()));
        }
        order.sort();
        let limit = floor.map_or(EventTime::MAX, |floor| floor.saturating_add(self.max_skew));
        (order.into_iter().map(|(_, key)| key).collect(), limit)
    }

    /// Takes one polled result: a message becomes an item in `out` (true), end of
    /// partition updates the partition's state (false).
    fn take(
        &mut self,
        result: Result<BorrowedMessage<'_>, KafkaError>,
        partition: Option<&(String, i32)>,
        out: &mut Vec<SourceItem>,
        now: Instant,
        since_assignment: Duration,
    ) -> Result<bool, KafkaError> {
        let message = match result {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(partition)) => {
                self.end_of_partition(partition);
                return Ok(false);
            }
            Err(err) => return Err(err),
        };
        let payload = message.payload().unwrap_or_default();
        let (messages, bytes) = match self.counters.get(message.topic()) {
            Some(counters) => counters,
            None => {
                let labels = super::metrics::topic(message.topic());
                let counters = (
                    self.metrics.messages_in.get_or_create(&labels).clone(),
                    self.metrics.bytes_in.get_or_create(&labels).clone(),
                );
                self.counters.entry(message.topic().to_owned()).or_insert(counters)
            }
        };
        messages.inc();
        bytes.inc_by(payload.len() as u64);
        let decoded = match self.format {
            KafkaFormat::Json => self.records.decode(payload),
            KafkaFormat::Raw => Ok(Record::Raw(Box::new(RawMessage {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message
                    .timestamp()
                    .to_millis()
                    .and_then(|ms| u64::try_from(ms).ok())
                    .unwrap_or_else(crate::wall_clock_ms),
                key: message.key().map(<[u8]>::to_vec),
                value: payload.to_vec(),
            }))),
        };
        // A record too far ahead of the wall clock must not move the partition's clock.
        let decoded = decoded.map_err(|err| (err.to_string(), false)).and_then(|record| {
            self.future.check(record.event_time()).map(|()| record).map_err(|err| (err.to_string(), true))
        });
        // From a partition's own queue the key is known; no allocation per message.
        let owned;
        let key = match partition {
            Some(key) => key,
            None => {
                owned = (message.topic().to_owned(), message.partition());
                &owned
            }
        };
        let state = if self.partitions.contains_key(key) {
            self.partitions.get_mut(key)
        } else {
            Some(self.partitions.entry(key.clone()).or_insert_with(|| Partition::new(0, now)))
        };
        let Some(state) = state else { return Ok(false) };
        state.last_message = now;
        state.next_offset = message.offset() + 1;
        state.at_end = false;
        state.caught_up = false;
        match decoded {
            Ok(record) => {
                let time = record.event_time();
                state.max_time = Some(state.max_time.map_or(time, |t| t.max(time)));
                let clock = self.clock(now, since_assignment);
                out.push(SourceItem::Record { record, clock });
            }
            Err((reason, future)) => {
                let letter = DeadLetter {
                    source: self.name.clone(),
                    position: format!(
                        "topic {} partition {} offset {}",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    ),
                    reason,
                    payload: payload.to_vec(),
                };
                out.push(if future {
                    SourceItem::Future { letter, clock: None }
                } else {
                    SourceItem::Malformed { letter, clock: None }
                });
            }
        }
        Ok(true)
    }

    /// With `stop_at_end`: every partition of the topics has been read to its end by some
    /// worker of this process. A partition is at its end when the broker has reported end
    /// of partition (the fetch reached its high watermark) at a position at or past the end
    /// offset it had when the source opened. Both are needed: the end offset alone is not
    /// trusted (some Kafka-compatible brokers under-report it), and end of partition alone
    /// may come before the messages that were there at open (a partition assigned at its
    /// committed offset). (A partition may move between workers in a rebalance, and a
    /// restarted process first waits for a dead member's partitions.)
    ///
    /// A worker still joining the group is done too once the other workers of its process
    /// have read every partition: it would otherwise wait for an assignment that the group
    /// can only make when those workers, which no longer poll, answer the rebalance.
    fn all_at_end(&self) -> bool {
        let Ok(mut finished) = self.finished.lock() else { return false };
        for (key, state) in &self.partitions {
            if state.at_end {
                finished.insert(key.clone());
            }
        }
        let all = self.end_offsets.keys().all(|key| finished.contains(key));
        // (Before any assignment, no partition known is not "all read".)
        all && (self.assigned.load(Ordering::Relaxed) || !self.end_offsets.is_empty())
    }

    /// End of partition reported for `partition` (of whichever assigned topic has it): marks
    /// those whose read position has reached the end offset they had at open.
    fn end_of_partition(&mut self, partition: i32) {
        let Ok(positions) = self.consumer.position() else { return };
        for element in positions.elements().iter().filter(|e| e.partition() == partition) {
            let key = (element.topic().to_owned(), partition);
            let end = self.end_offsets.get(&key).copied().unwrap_or(0);
            let position = match element.offset() {
                Offset::Offset(position) => position,
                _ => 0,
            };
            let state = self.partitions.entry(key).or_insert_with(|| Partition::new(position, Instant::now()));
            state.next_offset = state.next_offset.max(position);
            state.caught_up = true;
            state.at_end = self.stop_at_end && position >= end;
        }
    }
}

impl Source for KafkaSource {
    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError> {
        self.refresh_assignment();
        self.future.refresh();
        let now = Instant::now();
        let unpolled = now.saturating_duration_since(self.last_poll);
        self.last_poll = now;
        if unpolled > crate::UNPOLLED {
            // The worker did not look (it waited for the dataflow to catch up): a partition
            // without messages in that time says nothing about its traffic.
            for state in self.partitions.values_mut() {
                state.last_message += unpolled;
            }
        }
        let since_assignment = self.assigned_at.lock().map(|at| now.saturating_duration_since(*at)).unwrap_or_default();
        let start = out.len();
        out.append(&mut self.early);
        let report = |source: &Self, err: KafkaError| {
            // librdkafka retries broker connections itself; report and go on.
            tracing::warn!(source = %source.name, brokers = %source.brokers, %err, "kafka consumer error");
            Ok(SourceStatus::Idle { retry_in_ms: 100 })
        };
        // Events (rebalances, errors, statistics) and messages fetched before their
        // partition's queue was split.
        let consumer = self.consumer.clone();
        while out.len() - start < max {
            let Some(result) = consumer.poll(Duration::ZERO) else { break };
            if let Err(err) = self.take(result, None, out, now, since_assignment) {
                return report(self, err);
            }
        }
        // Then the partitions' queues, slowest partition first.
        let (order, limit) = self.read_order(now, since_assignment);
        let queues = std::mem::take(&mut self.queues);
        let mut failure = None;
        'partitions: for key in &order {
            let Some(queue) = queues.get(key) else { continue };
            while out.len() - start < max {
                if self.partitions.get(key).and_then(|s| s.max_time).is_some_and(|time| time > limit) {
                    continue 'partitions;
                }
                let Some(result) = queue.poll(Duration::ZERO) else { continue 'partitions };
                if let Err(err) = self.take(result, Some(key), out, now, since_assignment) {
                    failure = Some(err);
                    break 'partitions;
                }
            }
            break;
        }
        self.queues = queues;
        if let Some(err) = failure {
            return report(self, err);
        }
        if out.len() > start {
            return Ok(SourceStatus::Ready);
        }
        if self.stop_at_end && self.all_at_end() {
            return Ok(SourceStatus::Exhausted);
        }
        Ok(SourceStatus::Idle { retry_in_ms: 1 })
    }

    /// Serves the consumer's events (a rebalance must not wait for this worker until
    /// `max.poll.interval.ms`: another member may be waiting for its partitions, and this
    /// worker for that member's watermark); a message fetched before its partition's queue
    /// was split waits in `early`.
    /// Fixed partitions (checkpointed pipelines) take part in no rebalance: nothing to do,
    /// and nothing is taken ahead of a checkpoint's positions.
    fn keep_alive(&mut self) {
        if !self.grouped {
            return;
        }
        let now = Instant::now();
        let since_assignment = self.assigned_at.lock().map(|at| now.saturating_duration_since(*at)).unwrap_or_default();
        let consumer = self.consumer.clone();
        let mut early = std::mem::take(&mut self.early);
        while let Some(result) = consumer.poll(Duration::ZERO) {
            if let Err(err) = self.take(result, None, &mut early, now, since_assignment) {
                tracing::warn!(source = %self.name, brokers = %self.brokers, %err, "kafka consumer error");
                break;
            }
        }
        self.early = early;
        self.refresh_assignment();
    }

    fn checkpoint(&mut self) -> Option<Checkpoint> {
        let offsets: Vec<(String, i32, i64)> = self
            .partitions
            .iter()
            .map(|((topic, partition), state)| (topic.clone(), *partition, state.next_offset))
            .collect();
        (!offsets.is_empty()).then(|| Checkpoint { group: self.group.clone(), offsets })
    }

    fn position(&mut self) -> Option<Position> {
        let mut offsets = self.checkpoint().map(|checkpoint| checkpoint.offsets).unwrap_or_default();
        // Partitions assigned but not read yet keep the positions they were resumed from.
        for (topic, partition, offset) in &self.resumed {
            if !offsets.iter().any(|(t, p, _)| t == topic && p == partition) {
                offsets.push((topic.clone(), *partition, *offset));
            }
        }
        offsets.sort();
        Some(Position::Kafka(Checkpoint { group: self.group.clone(), offsets }))
    }

    /// Seeks the partitions this worker reads to the checkpoint's next offsets; partitions
    /// the checkpoint does not know (added since) start from the group's committed offset,
    /// else `auto_offset_reset`.
    fn resume(&mut self, saved: &[Position]) -> Result<(), ConnectorError> {
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        for position in saved {
            let Position::Kafka(checkpoint) = position else {
                return Err(ConnectorError::Config {
                    connector: "kafka",
                    reason: format!(
                        "source `{}` cannot resume from a position of another kind: {position:?}",
                        self.name
                    ),
                });
            };
            for (topic, partition, offset) in &checkpoint.offsets {
                next.insert((topic.clone(), *partition), *offset);
            }
        }
        let assignment = self.consumer.assignment().unwrap_or_default();
        let mut list = TopicPartitionList::new();
        let fail =
            |err: KafkaError| kafka_error(&self.brokers, format!("cannot seek source `{}`: {err}", self.name), &err);
        self.resumed.clear();
        for element in assignment.elements() {
            let key = (element.topic().to_owned(), element.partition());
            let offset = match next.get(&key) {
                Some(offset) => {
                    self.resumed.push((key.0.clone(), key.1, *offset));
                    Offset::Offset(*offset)
                }
                None => Offset::Stored,
            };
            list.add_partition_offset(&key.0, key.1, offset).map_err(fail)?;
        }
        self.consumer.assign(&list).map_err(fail)?;
        tracing::info!(source = %self.name, partitions = self.resumed.len(), "resumed from the checkpoint's offsets");
        Ok(())
    }

    fn commit(&mut self, checkpoint: &Checkpoint, wait: bool) -> Result<(), ConnectorError> {
        let assignment = self.consumer.assignment().unwrap_or_default();
        let mut list = TopicPartitionList::new();
        for (topic, partition, offset) in &checkpoint.offsets {
            // Partitions revoked since are another member's now; their records are reread
            // there (at-least-once).
            if assignment.find_partition(topic, *partition).is_some() {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        self.committer.commit(list, wait)
    }
}

/// Commits offsets on its own thread, synchronously and in order, so that the worker never
/// waits for the broker and each commit's latency and outcome are known (rdkafka reports no
/// result for asynchronous commits). Commits queued while one is in flight are coalesced:
/// only the latest is sent, which covers the earlier ones.
struct Committer {
    requests: std::sync::mpsc::Sender<CommitRequest>,
    brokers: String,
}

struct CommitRequest {
    offsets: TopicPartitionList,
    /// Where to report the outcome, for a commit the caller waits for.
    done: Option<std::sync::mpsc::Sender<Result<(), KafkaError>>>,
}

impl Committer {
    fn start(
        name: &str,
        group: &str,
        brokers: &str,
        consumer: Arc<BaseConsumer<SourceContext>>,
        metrics: Arc<KafkaMetrics>,
    ) -> Result<Self, ConnectorError> {
        let (requests, incoming) = std::sync::mpsc::channel::<CommitRequest>();
        let group = group.to_owned();
        let source = name.to_owned();
        let failures = metrics.commit_failures.get_or_create(&super::metrics::Group { group: group.clone() }).clone();
        std::thread::Builder::new()
            .name(format!("commit-{name}"))
            .spawn(move || {
                while let Ok(mut request) = incoming.recv() {
                    // Coalesce: a later commit covers the earlier ones (same partitions or
                    // more); keep any waiter of a skipped one.
                    let mut waiters: Vec<_> = request.done.take().into_iter().collect();
                    while let Ok(mut next) = incoming.try_recv() {
                        waiters.extend(next.done.take());
                        request = next;
                    }
                    let started = Instant::now();
                    let result = consumer.commit(&request.offsets, CommitMode::Sync);
                    tracing::debug!(%source, %group, offsets = ?request.offsets.elements().iter().map(|e| (e.partition(), e.offset().to_raw())).collect::<Vec<_>>(), ok = result.is_ok(), "offsets committed");
                    match &result {
                        Ok(()) => metrics.observe_commit(&group, started.elapsed()),
                        Err(err) => {
                            failures.inc();
                            tracing::warn!(%source, %group, %err, "kafka offset commit failed; the next commit covers it");
                        }
                    }
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .map_err(|err| kafka_failure(brokers, format!("cannot start the offset committer: {err}"), Fault::External))?;
        Ok(Self { requests, brokers: brokers.to_owned() })
    }

    /// Queues `offsets`; with `wait`, returns once they (or later ones) are committed.
    fn commit(&self, offsets: TopicPartitionList, wait: bool) -> Result<(), ConnectorError> {
        let stopped = || ConnectorError::Stopped { what: format!("the offset committer of `{}`", self.brokers) };
        let (done, outcome) = std::sync::mpsc::channel();
        let request = CommitRequest { offsets, done: wait.then_some(done) };
        self.requests.send(request).map_err(|_| stopped())?;
        if !wait {
            return Ok(());
        }
        match outcome.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) if lost_membership(&err) => {
                // The group moved on (this member's session expired, say while the broker
                // was unreachable): the partitions' new owners reread from the last committed
                // offsets, which duplicates records but loses none.
                tracing::warn!(brokers = %self.brokers, %err, "final offsets not committed: the group has rebalanced; the partitions' new owners reread them (at-least-once)");
                Ok(())
            }
            Ok(Err(err)) => Err(kafka_error(&self.brokers, format!("cannot commit offsets: {err}"), &err)),
            Err(_) => Err(stopped()),
        }
    }
}

/// A commit refused because this member no longer belongs to the group's generation.
fn lost_membership(err: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        err.rdkafka_error_code(),
        Some(Code::UnknownMemberId | Code::IllegalGeneration | Code::RebalanceInProgress | Code::FencedInstanceId)
    )
}
