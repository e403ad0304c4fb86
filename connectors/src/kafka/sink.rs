use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::statistics::Statistics;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::config::{KafkaSinkConfig, SinkKey};
use super::metrics::KafkaMetrics;
use super::{kafka_error, kafka_failure};
use crate::Fault;
use crate::{ConnectorError, Sink, Transaction};

/// Per-topic delivery counters.
#[derive(Debug)]
struct TopicCounters {
    messages_out: Counter,
    bytes_out: Counter,
    errors: Counter,
    retries: Counter,
    in_flight: Gauge,
}

/// Counts one producer's deliveries in the metrics and keeps the first failure.
#[derive(Debug)]
struct Deliveries {
    first_failure: Mutex<Option<String>>,
    /// Retries reported by the last statistics, to count the increase.
    retries_seen: AtomicU64,
    metrics: Arc<KafkaMetrics>,
    /// The topics this producer writes; statistics (retries, in flight) are per producer and
    /// reported under each of them.
    topics: Mutex<std::collections::HashMap<String, Arc<TopicCounters>>>,
}

impl Deliveries {
    fn new(metrics: Arc<KafkaMetrics>) -> Self {
        Self { first_failure: Mutex::new(None), retries_seen: AtomicU64::new(0), metrics, topics: Mutex::default() }
    }

    fn topic(&self, topic: &str) -> Arc<TopicCounters> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics
            .entry(topic.to_owned())
            .or_insert_with(|| {
                let labels = super::metrics::topic(topic);
                Arc::new(TopicCounters {
                    messages_out: self.metrics.messages_out.get_or_create(&labels).clone(),
                    bytes_out: self.metrics.bytes_out.get_or_create(&labels).clone(),
                    errors: self.metrics.producer_errors.get_or_create(&labels).clone(),
                    retries: self.metrics.producer_retries.get_or_create(&labels).clone(),
                    in_flight: self.metrics.producer_in_flight.get_or_create(&labels).clone(),
                })
            })
            .clone()
    }

    fn each_topic(&self, mut f: impl FnMut(&TopicCounters)) {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.values().for_each(|counters| f(counters));
    }

    /// The first delivery failure since the last call.
    fn take_failure(&self) -> Option<String> {
        self.first_failure.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[derive(Debug, Clone)]
struct SinkContext(Arc<Deliveries>);

impl ClientContext for SinkContext {
    fn stats(&self, statistics: Statistics) {
        let retries: u64 = statistics.brokers.values().map(|broker| broker.txretries).sum();
        let before = self.0.retries_seen.swap(retries, Ordering::Relaxed);
        let in_flight = i64::try_from(statistics.msg_cnt).unwrap_or(i64::MAX);
        self.0.each_topic(|counters| {
            counters.retries.inc_by(retries.saturating_sub(before));
            counters.in_flight.set(in_flight);
        });
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) => {
                let counters = self.0.topic(message.topic());
                counters.messages_out.inc();
                counters.bytes_out.inc_by(message.payload().map_or(0, <[u8]>::len) as u64);
            }
            Err((err, message)) => {
                self.0.topic(message.topic()).errors.inc();
                let mut first = self.0.first_failure.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| err.to_string());
            }
        }
    }
}

type SharedProducer = Arc<ThreadedProducer<SinkContext>>;

/// Creates an idempotent producer with the sink's settings (and `extra` ones).
fn producer(
    config: &KafkaSinkConfig,
    metrics: Arc<KafkaMetrics>,
    extra: &[(&str, &str)],
) -> Result<(SharedProducer, Arc<Deliveries>), ConnectorError> {
    let mut client = super::client_config(&config.brokers, &config.security, &config.options);
    client
        .set("enable.idempotence", "true")
        .set("compression.type", &config.compression)
        .set("linger.ms", config.linger.as_millis().to_string())
        .set("batch.size", config.batch_bytes.to_string())
        .set("delivery.timeout.ms", config.delivery_timeout.as_millis().to_string())
        .set("statistics.interval.ms", "1000");
    for (key, value) in extra {
        client.set(*key, *value);
    }
    for (key, value) in &config.options {
        client.set(key, value);
    }
    let deliveries = Arc::new(Deliveries::new(metrics));
    let producer: ThreadedProducer<SinkContext> =
        client.create_with_context(SinkContext(deliveries.clone())).map_err(|err| {
            kafka_error(
                &config.brokers,
                format!("cannot create the producer for topic `{}`: {err}", config.topic),
                &err,
            )
        })?;
    Ok((Arc::new(producer), deliveries))
}

/// A producer writing one message per record: its own idempotent producer, or, in an
/// exactly-once pipeline, the [`KafkaTransaction`]'s.
pub struct KafkaSink {
    producer: SharedProducer,
    deliveries: Arc<Deliveries>,
    topic: String,
    brokers: String,
    key: SinkKey,
    /// Dead letters: the original payload as value, reason and position in headers.
    dead_letters: bool,
    /// Part of a transaction: the transaction's commit makes the writes visible.
    transactional: bool,
    /// How long a flush waits for acknowledgements: until librdkafka itself gives up on a
    /// message (`delivery_timeout`), and a little more for its report to arrive.
    flush_timeout: Duration,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("topic", &self.topic).field("brokers", &self.brokers).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Creates the producer.
    pub fn open(config: &KafkaSinkConfig, metrics: &Arc<KafkaMetrics>) -> Result<Self, ConnectorError> {
        Self::create(config, false, metrics)
    }

    /// A producer for dead letters: each message is the rejected record's original bytes,
    /// with `edgeflow.reason`, `edgeflow.source` and `edgeflow.position` headers.
    pub fn open_dead_letters(config: &KafkaSinkConfig, metrics: &Arc<KafkaMetrics>) -> Result<Self, ConnectorError> {
        Self::create(config, true, metrics)
    }

    /// A sink writing to `config.topic` inside `transaction` (records, or dead letters).
    pub fn in_transaction(config: &KafkaSinkConfig, transaction: &KafkaTransaction, dead_letters: bool) -> Self {
        transaction.deliveries.topic(&config.topic);
        Self {
            producer: transaction.producer.clone(),
            deliveries: transaction.deliveries.clone(),
            topic: config.topic.clone(),
            brokers: config.brokers.clone(),
            key: config.key.clone(),
            dead_letters,
            transactional: true,
            flush_timeout: flush_timeout(config),
        }
    }

    fn create(
        config: &KafkaSinkConfig,
        dead_letters: bool,
        metrics: &Arc<KafkaMetrics>,
    ) -> Result<Self, ConnectorError> {
        let (producer, deliveries) = producer(config, metrics.clone(), &[])?;
        deliveries.topic(&config.topic);
        Ok(Self {
            producer,
            deliveries,
            topic: config.topic.clone(),
            brokers: config.brokers.clone(),
            key: config.key.clone(),
            dead_letters,
            transactional: false,
            flush_timeout: flush_timeout(config),
        })
    }

    fn send(&self, key: Option<&[u8]>, payload: &[u8], headers: Option<OwnedHeaders>) -> Result<(), ConnectorError> {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(headers) = headers.clone() {
                record = record.headers(headers);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Back-pressure: let the background thread deliver, then retry.
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((err, _)) => {
                    return Err(kafka_error(&self.brokers, format!("cannot produce to `{}`: {err}", self.topic), &err))
                }
            }
        }
    }
}

impl Sink for KafkaSink {
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        if self.dead_letters {
            let value: serde_json::Value = serde_json::from_slice(record).unwrap_or_default();
            let text = |field: &str| value.get(field).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let payload = match value.get("payload").and_then(|v| v.as_str()) {
                Some(text) => text.as_bytes().to_vec(),
                None => decode_hex(&text("payload_hex")),
            };
            let headers = OwnedHeaders::new()
                .insert(Header { key: "edgeflow.reason", value: Some(text("reason").as_bytes()) })
                .insert(Header { key: "edgeflow.source", value: Some(text("source").as_bytes()) })
                .insert(Header { key: "edgeflow.position", value: Some(text("position").as_bytes()) });
            return self.send(None, &payload, Some(headers));
        }
        // Only the key fields are decoded (borrowed), not a whole JSON tree per record.
        let keys: KeyFields<'_> = serde_json::from_slice(record).unwrap_or_default();
        let key = match &self.key {
            SinkKey::NodeId => keys.node_id,
            SinkKey::Region => keys.region,
            SinkKey::Key => keys.key,
            SinkKey::Id => keys.id,
            SinkKey::Node => keys.node,
            SinkKey::None => None,
        };
        self.send(key.as_deref().map(str::as_bytes), record, None)
    }

    fn write_raw(&mut self, message: &edgeflow_operators::RawMessage) -> Result<(), ConnectorError> {
        // The message as it was: its own key, its own bytes.
        self.send(message.key.as_deref(), &message.value, None)
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        if !self.transactional {
            // Wait for the acknowledgements (the producer's own thread serves them); rdkafka's
            // `flush` would poll for events that thread already took, in 100 ms steps.
            let deadline = std::time::Instant::now() + self.flush_timeout;
            while self.producer.in_flight_count() > 0 {
                if std::time::Instant::now() > deadline {
                    return Err(kafka_failure(
                        &self.brokers,
                        format!(
                            "{} messages to `{}` not acknowledged within {:?}",
                            self.producer.in_flight_count(),
                            self.topic,
                            self.flush_timeout
                        ),
                        Fault::External,
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            self.deliveries.each_topic(|counters| {
                counters.in_flight.set(0);
            });
        }
        // In a transaction the commit flushes; failures seen so far still stop the pipeline.
        match self.deliveries.take_failure() {
            Some(err) => Err(kafka_failure(
                &self.brokers,
                format!("delivery to `{}` failed after retries: {err}", self.topic),
                Fault::External,
            )),
            None => Ok(()),
        }
    }
}

/// The transaction of an exactly-once pipeline: one transactional producer shared by all
/// its Kafka sinks, committing their writes together with the consumed offsets.
pub struct KafkaTransaction {
    producer: SharedProducer,
    deliveries: Arc<Deliveries>,
    brokers: String,
    transactional_id: String,
    metrics: Arc<KafkaMetrics>,
    /// A consumer per group, created without joining it, for the group metadata that
    /// `send_offsets_to_transaction` needs (generation -1: no member fencing; the
    /// transactional id fences a crashed instance).
    groups: std::collections::HashMap<String, BaseConsumer>,
    /// The topic whose partition 0 carries the checkpoint marker's offset.
    marker_topic: String,
}

impl std::fmt::Debug for KafkaTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransaction").field("transactional_id", &self.transactional_id).finish_non_exhaustive()
    }
}

/// How long a flush waits for the brokers' acknowledgements before the pipeline fails:
/// librdkafka retries each message until `delivery_timeout` and then reports it failed (the
/// flush returns that failure); the margin lets the report arrive.
fn flush_timeout(config: &KafkaSinkConfig) -> Duration {
    Duration::from_millis(config.delivery_timeout.as_millis()) + Duration::from_secs(5)
}

/// How long transaction calls may take before the pipeline fails.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

impl KafkaTransaction {
    /// Creates the transactional producer with `config`'s settings, fences any earlier
    /// producer with the same `transactional_id` (aborting its open transaction) and opens
    /// the first transaction.
    pub fn open(
        config: &KafkaSinkConfig,
        transactional_id: &str,
        metrics: &Arc<KafkaMetrics>,
    ) -> Result<Self, ConnectorError> {
        // librdkafka requires delivery.timeout.ms <= transaction.timeout.ms.
        let timeout = config.delivery_timeout.as_millis().to_string();
        let extra = [("transactional.id", transactional_id), ("transaction.timeout.ms", timeout.as_str())];
        let (producer, deliveries) = producer(config, metrics.clone(), &extra)?;
        let fail = |what: &str, err: KafkaError| {
            kafka_error(&config.brokers, format!("transactional producer `{transactional_id}`: {what}: {err}"), &err)
        };
        producer.init_transactions(TRANSACTION_TIMEOUT).map_err(|err| fail("cannot initialise transactions", err))?;
        producer.begin_transaction().map_err(|err| fail("cannot begin a transaction", err))?;
        Ok(Self {
            producer,
            deliveries,
            brokers: config.brokers.clone(),
            transactional_id: transactional_id.to_owned(),
            metrics: metrics.clone(),
            groups: std::collections::HashMap::new(),
            marker_topic: config.topic.clone(),
        })
    }

    fn group_metadata(&mut self, group: &str) -> Result<rdkafka::consumer::ConsumerGroupMetadata, ConnectorError> {
        if !self.groups.contains_key(group) {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &self.brokers)
                .set("group.id", group)
                .create()
                .map_err(|err| self.error(&format!("cannot create a client for group `{group}`"), &err))?;
            self.groups.insert(group.to_owned(), consumer);
        }
        self.groups
            .get(group)
            .and_then(|consumer| consumer.group_metadata())
            .ok_or_else(|| self.failure(&format!("no group metadata for `{group}`"), &"librdkafka returned none"))
    }

    fn error(&self, what: &str, err: &KafkaError) -> ConnectorError {
        kafka_error(&self.brokers, format!("transactional producer `{}`: {what}: {err}", self.transactional_id), err)
    }

    fn failure(&self, what: &str, detail: &dyn std::fmt::Display) -> ConnectorError {
        let message = format!("transactional producer `{}`: {what}: {detail}", self.transactional_id);
        kafka_failure(&self.brokers, message, Fault::External)
    }

    /// The consumer group whose committed offset marks, inside each transaction, the
    /// checkpoint it belongs to.
    pub fn marker_group(transactional_id: &str) -> String {
        format!("{transactional_id}.checkpoints")
    }

    fn try_commit(&mut self, epoch: u64) -> Result<(), ConnectorError> {
        let started = std::time::Instant::now();
        let group = Self::marker_group(&self.transactional_id);
        let mut list = TopicPartitionList::new();
        let epoch_offset = i64::try_from(epoch).unwrap_or(i64::MAX);
        list.add_partition_offset(&self.marker_topic, 0, Offset::Offset(epoch_offset))
            .map_err(|err| self.error("invalid checkpoint marker", &err))?;
        let metadata = self.group_metadata(&group)?;
        self.producer
            .send_offsets_to_transaction(&list, &metadata, TRANSACTION_TIMEOUT)
            .map_err(|err| self.error(&format!("cannot add the checkpoint marker of group `{group}`"), &err))?;
        self.producer.commit_transaction(TRANSACTION_TIMEOUT).map_err(|err| self.error("commit failed", &err))?;
        if let Some(failure) = self.deliveries.take_failure() {
            return Err(self.failure("a message was not delivered", &failure));
        }
        self.metrics.observe_commit(&group, started.elapsed());
        self.deliveries.each_topic(|counters| {
            counters.in_flight.set(0);
        });
        self.producer.begin_transaction().map_err(|err| self.error("cannot begin a transaction", &err))
    }

    /// The last checkpoint whose transaction `transactional_id` committed, read from the
    /// marker group's committed offset (`None`: none ever committed).
    pub fn committed_epoch(config: &KafkaSinkConfig, transactional_id: &str) -> Result<Option<u64>, ConnectorError> {
        let group = Self::marker_group(transactional_id);
        let mut client = super::client_config(&config.brokers, &config.security, &config.options);
        client.set("group.id", &group).set("enable.auto.commit", "false").set("isolation.level", "read_committed");
        let fail = |err: KafkaError| {
            kafka_error(&config.brokers, format!("cannot read the checkpoint marker of group `{group}`: {err}"), &err)
        };
        let consumer: BaseConsumer = client.create().map_err(fail)?;
        let mut list = TopicPartitionList::new();
        list.add_partition(&config.topic, 0);
        let committed = consumer.committed_offsets(list, TRANSACTION_TIMEOUT).map_err(fail)?;
        Ok(committed.elements().first().and_then(|element| match element.offset() {
            Offset::Offset(epoch) => u64::try_from(epoch).ok(),
            _ => None,
        }))
    }
}

impl Transaction for KafkaTransaction {
    fn commit(&mut self, epoch: u64) -> Result<(), ConnectorError> {
        let result = self.try_commit(epoch);
        if result.is_err() {
            // Nothing of the open transaction becomes visible; the restarted pipeline
            // restores the last checkpoint whose transaction committed.
            let _ = self.producer.abort_transaction(TRANSACTION_TIMEOUT);
        }
        result
    }
}

/// The fields a record may be keyed by; all others are skipped while decoding.
#[derive(Debug, Default, serde::Deserialize)]
struct KeyFields<'a> {
    #[serde(borrow, default)]
    node_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    region: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    node: Option<std::borrow::Cow<'a, str>>,
}

fn decode_hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}
