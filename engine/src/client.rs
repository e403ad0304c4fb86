//! `edgeflow client`: an edge client of federated training outside the engine. It follows
//! the `plans` a `federated` operator publishes (a file its `plans` sink writes), trains on
//! its own data, and appends its answers to the file the operator's `model_updates` source
//! follows: a plain update, or with secure aggregation each step of the protocol (see
//! `edgeflow_operators::federated::secure_protocol`), so the coordinator never sees its
//! update in the clear. Its secrets come from the operating system's generator.

use std::io::{BufRead, Seek, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeflow_connectors::wall_clock_ms;
use edgeflow_operators::federated::coordinator::PlanRecord;
use edgeflow_operators::federated::learn::{Dataset, Softmax};
use edgeflow_operators::federated::privacy::clip_l2;
use edgeflow_operators::federated::secure_protocol::{ClientRound, ClientStep, ServerStep};
use edgeflow_operators::federated::update::{ClientMetrics, ModelUpdate, Payload};

/// What a client is told to do.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Its id (as the operator's `client_ids` name it).
    pub id: String,
    /// The plans file to follow.
    pub plans: PathBuf,
    /// The updates file to append to.
    pub updates: PathBuf,
    /// Its local examples: `label,feature,...` lines.
    pub data: PathBuf,
    /// Features are divided by this.
    pub feature_scale: f32,
    /// Stop after answering this round's last step.
    pub rounds: u64,
    /// For tests of dropout: vanish after sending its shares in this round.
    pub drop_after_sharing: Option<u64>,
    /// Stop when the plans file has not grown for this long.
    pub idle_timeout: Duration,
}

/// Follows a file's complete lines.
struct Follow {
    path: PathBuf,
    offset: u64,
}

impl Follow {
    fn lines(&mut self) -> std::io::Result<Vec<String>> {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return Ok(Vec::new()) };
        file.seek(std::io::SeekFrom::Start(self.offset))?;
        let mut reader = std::io::BufReader::new(file);
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                return Ok(lines);
            }
            self.offset += read as u64;
            lines.push(line.trim_end().to_owned());
        }
    }
}

/// Why a client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Its data could not be read.
    #[error("cannot read the client's data `{path}`: {source}")]
    ReadData {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Its data do not parse.
    #[error("the client's data `{path}`: {source}")]
    Data {
        /// The file.
        path: String,
        /// Why.
        source: edgeflow_operators::federated::learn::CsvError,
    },
    /// A file of the exchange could not be read or written.
    #[error("cannot {what} `{path}`: {source}")]
    Io {
        /// What was tried: `append to`, `write to`, `read`.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A plan's model does not decode.
    #[error(transparent)]
    Payload(#[from] edgeflow_operators::federated::update::PayloadError),
    /// A plan's model does not fit the client's data.
    #[error("the plan's model has {parameters} parameters, which does not fit {features} features")]
    Shape {
        /// The model's parameters.
        parameters: usize,
        /// The data's features.
        features: usize,
    },
    /// A step of secure aggregation failed.
    #[error(transparent)]
    Secure(#[from] edgeflow_operators::federated::secure_protocol::ProtocolError),
}

/// Runs the client until its last round is answered, it drops out, or the plans go quiet.
pub fn run(options: &ClientOptions) -> Result<(), ClientError> {
    let shown = |path: &std::path::Path| path.display().to_string();
    let text = std::fs::read_to_string(&options.data)
        .map_err(|source| ClientError::ReadData { path: shown(&options.data), source })?;
    let data = Dataset::parse_csv(&text, options.feature_scale)
        .map_err(|source| ClientError::Data { path: shown(&options.data), source })?;
    let mut updates = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&options.updates)
        .map_err(|source| ClientError::Io { what: "append to", path: shown(&options.updates), source })?;
    let mut send = |update: ModelUpdate| -> Result<(), ClientError> {
        // One write per line: appends of whole lines from several clients do not interleave.
        // An update is plain data: it always serialises.
        let mut line = serde_json::to_vec(&update).unwrap_or_default();
        line.push(b'\n');
        updates.write_all(&line).map_err(|source| ClientError::Io {
            what: "write to",
            path: shown(&options.updates),
            source,
        })
    };
    let mut plans = Follow { path: options.plans.clone(), offset: 0 };
    let mut secure: Option<(u64, ClientRound)> = None;
    let mut answered = 0u64;
    let mut last_plan = Instant::now();
    loop {
        let lines =
            plans.lines().map_err(|source| ClientError::Io { what: "read", path: shown(&options.plans), source })?;
        if lines.is_empty() {
            if last_plan.elapsed() >= options.idle_timeout {
                tracing::info!(client = %options.id, "no new plan for a while; stopping");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        last_plan = Instant::now();
        for line in lines {
            let record: PlanRecord = match serde_json::from_str(&line) {
                Ok(record) => record,
                Err(err) => {
                    tracing::warn!(client = %options.id, %err, "a plan line that does not decode; skipped");
                    continue;
                }
            };
            let round = record.plan.round;
            if round <= answered {
                continue;
            }
            let stamp =
                |step: &ClientStep| step.to_update(round, &options.id, record.plan.model_version, wall_clock_ms());
            match &record.secure_aggregation {
                None => {
                    if record.plan.clients.contains(&options.id) {
                        send(train(&record, &data, &options.id)?)?;
                    }
                    answered = round;
                }
                Some(step @ ServerStep::Plan { equal_weights, .. }) => {
                    let update = train(&record, &data, &options.id)?;
                    let delta = update.payload.decode()?;
                    let weight = if *equal_weights { 1.0 } else { update.num_examples.max(1) as f32 };
                    let mut vector: Vec<f32> = delta.iter().map(|d| d * weight).collect();
                    vector.push(weight);
                    vector.push(update.metrics.loss.unwrap_or(0.0) as f32);
                    if let Some((party, announce)) = ClientRound::join(round, &options.id, step, vector) {
                        send(stamp(&announce))?;
                        secure = Some((round, party));
                    } else {
                        answered = round;
                    }
                }
                Some(step) => {
                    let Some((current, party)) = secure.as_mut().filter(|(r, _)| *r == round) else { continue };
                    if let Some(answer) = party.answer(step)? {
                        send(stamp(&answer))?;
                        if matches!(answer, ClientStep::Shares { .. }) && options.drop_after_sharing == Some(*current) {
                            tracing::info!(client = %options.id, round, "dropping out after sharing (as asked)");
                            return Ok(());
                        }
                        if matches!(answer, ClientStep::Reveal { .. }) {
                            answered = round;
                        }
                    }
                    if matches!(step, ServerStep::Unmask { .. }) {
                        answered = round;
                        secure = None;
                    }
                }
            }
            if answered >= options.rounds {
                return Ok(());
            }
        }
    }
}

/// Trains on `data` from the plan's model: the update (trained minus global, clipped to the
/// plan's `clip_norm`) of `client`.
pub fn train(record: &PlanRecord, data: &Dataset, client: &str) -> Result<ModelUpdate, ClientError> {
    let global = record.model.decode()?;
    let features = data.dimension();
    let classes = global.len() / (features + 1);
    if classes * (features + 1) != global.len() {
        return Err(ClientError::Shape { parameters: global.len(), features });
    }
    let model = Softmax { features, classes };
    let seed = edgeflow_operators::route_hash(client) ^ record.plan.round;
    let trained = model.train(&global, data, &record.plan.local, seed);
    let (loss, accuracy) = model.evaluate(&trained, data);
    let mut delta: Vec<f32> = trained.iter().zip(&global).map(|(t, g)| t - g).collect();
    if let Some(clip) = record.plan.clip_norm {
        clip_l2(&mut delta, clip);
    }
    Ok(ModelUpdate {
        round: record.plan.round,
        client_id: client.to_owned(),
        num_examples: data.len() as u64,
        base_version: record.plan.model_version,
        timestamp: wall_clock_ms(),
        payload: Payload::encode(&delta),
        metrics: ClientMetrics { loss: Some(loss), accuracy: Some(accuracy) },
    })
}
