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

use super::config::{KafkaSinkConfig, SinkKey};
use super::metrics::KafkaMetrics;
use crate::{ConnectorError, Sink};

/// Counts deliveries (in the metrics too) and keeps the first failure.
#[derive(Debug)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
    /// Retries reported by the last statistics, to count the increase.
    retries_seen: AtomicU64,
    messages_out: Counter,
    bytes_out: Counter,
    errors: Counter,
    retries: Counter,
    in_flight: Gauge,
}

impl Deliveries {
    fn new(topic: &str, metrics: &KafkaMetrics) -> Self {
        let labels = super::metrics::topic(topic);
        Self {
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_failure: Mutex::new(None),
            retries_seen: AtomicU64::new(0),
            messages_out: metrics.messages_out.get_or_create(&labels).clone(),
            bytes_out: metrics.bytes_out.get_or_create(&labels).clone(),
            errors: metrics.producer_errors.get_or_create(&labels).clone(),
            retries: metrics.producer_retries.get_or_create(&labels).clone(),
            in_flight: metrics.producer_in_flight.get_or_create(&labels).clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct SinkContext(Arc<Deliveries>);

impl ClientContext for SinkContext {
    fn stats(&self, statistics: Statistics) {
        let retries: u64 = statistics.brokers.values().map(|broker| broker.txretries).sum();
        let before = self.0.retries_seen.swap(retries, Ordering::Relaxed);
        self.0.retries.inc_by(retries.saturating_sub(before));
        self.0.in_flight.set(i64::try_from(statistics.msg_cnt).unwrap_or(i64::MAX));
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
                self.0.messages_out.inc();
                self.0.bytes_out.inc_by(rdkafka::Message::payload(message).map_or(0, <[u8]>::len) as u64);
            }
            Err((err, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                self.0.errors.inc();
                let mut first = self.0.first_failure.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| err.to_string());
            }
        }
    }
}

/// An idempotent producer writing one message per record.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    deliveries: Arc<Deliveries>,
    topic: String,
    brokers: String,
    key: SinkKey,
    /// Dead letters: the original payload as value, reason and position in headers.
    dead_letters: bool,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("topic", &self.topic).field("brokers", &self.brokers).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Creates the producer.
    pub fn open(config: &KafkaSinkConfig, metrics: &KafkaMetrics) -> Result<Self, ConnectorError> {
        Self::create(config, false, metrics)
    }

    /// A producer for dead letters: each message is the rejected record's original bytes,
    /// with `edgeflow.reason`, `edgeflow.source` and `edgeflow.position` headers.
    pub fn open_dead_letters(config: &KafkaSinkConfig, metrics: &KafkaMetrics) -> Result<Self, ConnectorError> {
        Self::create(config, true, metrics)
    }

    fn create(config: &KafkaSinkConfig, dead_letters: bool, metrics: &KafkaMetrics) -> Result<Self, ConnectorError> {
        let mut client = super::client_config(&config.brokers, &config.security, &config.options);
        client
            .set("enable.idempotence", "true")
            .set("compression.type", &config.compression)
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("batch.size", config.batch_bytes.to_string())
            .set("delivery.timeout.ms", config.delivery_timeout.as_millis().to_string())
            .set("statistics.interval.ms", "1000");
        for (key, value) in &config.options {
            client.set(key, value);
        }
        let context = SinkContext(Arc::new(Deliveries::new(&config.topic, metrics)));
        let deliveries = context.0.clone();
        let producer: ThreadedProducer<SinkContext> =
            client.create_with_context(context).map_err(|err| ConnectorError::Kafka {
                brokers: config.brokers.clone(),
                message: format!("cannot create the producer for topic `{}`: {err}", config.topic),
            })?;
        Ok(Self {
            producer,
            deliveries,
            topic: config.topic.clone(),
            brokers: config.brokers.clone(),
            key: config.key.clone(),
            dead_letters,
        })
    }

    /// Messages delivered and failed so far.
    pub fn delivery_counts(&self) -> (u64, u64) {
        (self.deliveries.delivered.load(Ordering::Relaxed), self.deliveries.failed.load(Ordering::Relaxed))
    }

    fn send(&self, key: Option<&str>, payload: &[u8], headers: Option<OwnedHeaders>) -> Result<(), ConnectorError> {
        loop {
            let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&self.topic).payload(payload);
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
                    return Err(ConnectorError::Kafka {
                        brokers: self.brokers.clone(),
                        message: format!("cannot produce to `{}`: {err}", self.topic),
                    })
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
            SinkKey::None => None,
        };
        self.send(key.as_deref(), record, None)
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.producer.flush(Duration::from_secs(60)).map_err(|err| ConnectorError::Kafka {
            brokers: self.brokers.clone(),
            message: format!("messages to `{}` not delivered: {err}", self.topic),
        })?;
        self.deliveries.in_flight.set(0);
        let first = self.deliveries.first_failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        match first {
            Some(err) => Err(ConnectorError::Kafka {
                brokers: self.brokers.clone(),
                message: format!("delivery to `{}` failed after retries: {err}", self.topic),
            }),
            None => Ok(()),
        }
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
}

fn decode_hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}
