use std::collections::BTreeMap;

use edgeflow_operators::DurationMs;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Where a new consumer group starts in a partition without a committed offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutoOffsetReset {
    /// The oldest retained message (default).
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
}

/// How message values are decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KafkaFormat {
    /// One JSON record per message (default), of the kind `records` names.
    #[default]
    Json,
    /// The message's bytes as they are, with its key, topic, partition, offset and timestamp
    /// (a `RawMessage`): for sinks only, e.g. mirroring a topic between clusters.
    Raw,
}

/// TLS and SASL settings, mapped to librdkafka's `security.protocol`, `ssl.*` and `sasl.*`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// CA certificate file for verifying the brokers (`ssl.ca.location`).
    #[serde(default)]
    pub ca_location: Option<String>,
    /// Client certificate file (`ssl.certificate.location`).
    #[serde(default)]
    pub certificate_location: Option<String>,
    /// Client key file (`ssl.key.location`).
    #[serde(default)]
    pub key_location: Option<String>,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// SASL password (use `${VAR}` to keep it out of the file).
    #[serde(default)]
    pub sasl_password: Option<String>,
}

impl KafkaSecurity {
    pub(super) fn apply(&self, config: &mut ClientConfig) {
        let settings = [
            ("security.protocol", &self.protocol),
            ("ssl.ca.location", &self.ca_location),
            ("ssl.certificate.location", &self.certificate_location),
            ("ssl.key.location", &self.key_location),
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
        ];
        for (key, value) in settings {
            if let Some(value) = value {
                config.set(key, value);
            }
        }
    }
}

/// YAML configuration of the `kafka` source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// Consumer group; all workers of all processes join it, so the group spreads the
    /// partitions over them.
    pub group: String,
    /// Value format: `json` (default, records of the kind `records` names) or `raw` (each
    /// message's bytes, key and position as they are, for sinks only).
    #[serde(default)]
    pub format: KafkaFormat,
    /// What the messages are: `heartbeats` (default), `inference_requests` or `model_updates`.
    #[serde(default)]
    pub records: edgeflow_operators::RecordKind,
    /// Start of a partition without a committed offset: `earliest` (default) or `latest`.
    /// Committed offsets always win.
    #[serde(default)]
    pub auto_offset_reset: AutoOffsetReset,
    /// End the source when every assigned partition has been read to its end (for batch
    /// jobs and tests; default false: run until stopped).
    #[serde(default)]
    pub stop_at_end: bool,
    /// Per-partition watermark: latest event time seen in the partition minus this
    /// (default 5s).
    #[serde(default = "crate::file::source_defaults::max_out_of_orderness")]
    pub max_out_of_orderness: DurationMs,
    /// A partition without messages for this long no longer holds the watermark back
    /// (default 30s).
    #[serde(default = "crate::file::source_defaults::idle_timeout")]
    pub idle_timeout: DurationMs,
    /// How far ahead of the wall clock a message's event time may be (default 5m). A message
    /// further ahead goes to the dead-letter output with the reason, before it can move its
    /// partition's watermark (one bad clock would make every later message late).
    #[serde(default = "crate::file::source_defaults::max_future")]
    pub max_future: DurationMs,
    /// TLS and SASL.
    #[serde(default)]
    pub security: KafkaSecurity,
    /// Further librdkafka consumer settings, passed through unchanged
    /// (e.g. `session.timeout.ms: "10000"`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// Which field of the written record becomes the message key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkKey {
    /// `node_id` (default): all records of a node go to one partition, in order.
    #[default]
    NodeId,
    /// `region`.
    Region,
    /// `key` (window results).
    Key,
    /// `id` (inference requests and results): a request and its result share a partition.
    Id,
    /// `node` (placed inference requests and results): all of a node's go to one partition.
    Node,
    /// No key: records spread over partitions.
    None,
}

/// YAML configuration of the `kafka` sink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic to write.
    pub topic: String,
    /// Record field used as the message key (default `node_id`; records without it are
    /// sent without a key).
    #[serde(default)]
    pub key: SinkKey,
    /// Compression: `zstd` (default), `lz4`, `gzip`, `snappy` or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// How long the producer waits to fill a batch (default 5ms).
    #[serde(default = "default_linger")]
    pub linger: DurationMs,
    /// Maximum batch size in bytes (default 1000000).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u64,
    /// How long a message may take to be delivered, retries included, before the pipeline
    /// fails (default 2m).
    #[serde(default = "default_delivery_timeout")]
    pub delivery_timeout: DurationMs,
    /// Write inside Kafka transactions, one per checkpoint, each committed once its
    /// checkpoint is durable, so that a `read_committed` consumer sees every record exactly
    /// once across crashes and restarts (default false: at-least-once). Needs `checkpoint`;
    /// every Kafka sink of the pipeline sets it too, on the same brokers, sharing one
    /// transactional producer; other sinks must be able to go back to a checkpoint (`jsonl`
    /// files). `delivery_timeout` is the transaction timeout: at least twice the interval.
    #[serde(default)]
    pub exactly_once: bool,
    /// The producer's `transactional.id` with `exactly_once` (default
    /// `edgeflow-PIPELINE`). A restarted pipeline must keep it: it fences the crashed
    /// producer and aborts its open transaction.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// TLS and SASL.
    #[serde(default)]
    pub security: KafkaSecurity,
    /// Further librdkafka producer settings, passed through unchanged.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_compression() -> String {
    "zstd".into()
}
fn default_linger() -> DurationMs {
    DurationMs(5)
}
fn default_batch_bytes() -> u64 {
    1_000_000
}
fn default_delivery_timeout() -> DurationMs {
    DurationMs::from_secs(120)
}
