//! Secure aggregation with clients outside the engine: the messages of a round and the
//! state machines of its two sides, over any transport that carries the `federated`
//! operator's plans out and client records in (Kafka topics, files).
//!
//! The cryptography is [`super::secure`]'s; this module sequences it. A round runs four
//! steps, each opened by a message of the coordinator on the `plans` output (a plan record
//! whose `secure_aggregation` field holds a [`ServerStep`]) and answered by the clients with
//! model-update records whose payload has the format [`SECAGG_FORMAT`] (its data: the
//! base64 of a JSON [`ClientStep`]):
//!
//! | coordinator publishes | clients answer |
//! |---|---|
//! | the plan, with `{"step":"plan","threshold":t,"indices":{"client-03":1,...}}` | `announce`: a fresh X25519 public key |
//! | `keys`: every announced key | `shares`: Shamir shares of its secrets, sealed for each announced peer |
//! | `shares`: the sealed shares of those who shared, relayed | `masked`: its masked update, tagged |
//! | `unmask`: who sent masked updates, who dropped | `reveal`: the shares it holds that unmasking needs |
//!
//! A step closes when every expected client has answered or when its time (a quarter of the
//! round's timeout) is up; the round fails, keeping the model, when fewer than `t` remain at
//! any step. The coordinator sees announcements, sealed shares it cannot open, masked
//! updates and the revealed shares of one secret per client: never an update in the clear.
//!
//! The masked vector of a client is its weighted update followed by its weight and its
//! training loss: `[w·Δ_1, ..., w·Δ_n, w, loss]`, where `w` is its number of examples (1
//! under central DP), each value clipped by the client to the plan's `clip_norm` before
//! weighting.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::SeedableRng as _;
use serde::{Deserialize, Serialize};

use super::secure::{unmask, Announcement, MaskedUpdate, Reveal, SealedShare, SecureClient, UnmaskError};
use super::update::{ModelUpdate, Payload};

/// The payload format of a client's secure-aggregation step.
pub const SECAGG_FORMAT: &str = "secagg-v1+json";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A step of the secure-aggregation protocol that cannot be used: the dead letter's reason
/// on the coordinator's side, or why a client stops.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A value that is not base64.
    #[error("{what} is not valid base64: {reason}")]
    Base64 {
        /// What it is, e.g. `the tag` or `a share from client 2`.
        what: String,
        /// Why.
        reason: String,
    },
    /// A value of the wrong size.
    #[error("{what} has {found} bytes, expected {expected}")]
    Bytes {
        /// What it is.
        what: String,
        /// Bytes found.
        found: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A step that is not JSON of a step.
    #[error("secure-aggregation step is not valid: {reason}")]
    Step {
        /// Why.
        reason: String,
    },
    /// A share index that is not a number.
    #[error("`{0}` is not a client index")]
    Index(String),
    /// A client's step the round refuses.
    #[error("secure aggregation, round {round}, client `{client}`: {problem}")]
    Client {
        /// The round.
        round: u64,
        /// The client.
        client: String,
        /// What is wrong.
        problem: Box<ClientProblem>,
    },
    /// Fewer clients took a step than the threshold.
    #[error("secure aggregation failed in round {round}: {got} of {of} clients {did}; {needed} are needed")]
    TooFew {
        /// The round.
        round: u64,
        /// Clients that did.
        got: usize,
        /// Clients that could have.
        of: usize,
        /// What they did, e.g. `announced a key`.
        did: &'static str,
        /// Needed.
        needed: usize,
    },
    /// The sum could not be unmasked.
    #[error("round {round}: {source}")]
    Unmask {
        /// The round.
        round: u64,
        /// Why.
        source: UnmaskError,
    },
    /// Shares that do not authenticate.
    #[error(transparent)]
    Shares(#[from] UnmaskError),
    /// The operating system's random number generator failed.
    #[error("{0}")]
    Random(String),
}

/// What a client's step does wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientProblem {
    /// It was not selected.
    #[error("not selected for the round")]
    NotSelected,
    /// It announced twice.
    #[error("announced twice")]
    AnnouncedTwice,
    /// Shares before a key.
    #[error("shares without an announced key")]
    SharesWithoutKey,
    /// Shares of someone else, or to someone not announced.
    #[error("shares must be from the client and to announced clients")]
    Misaddressed,
    /// It shared twice.
    #[error("shared twice")]
    SharedTwice,
    /// A masked update without shares.
    #[error("a masked update from a client that did not share")]
    MaskedWithoutShares,
    /// Masked values that are not base64.
    #[error("masked values are not valid base64: {reason}")]
    MaskedBase64 {
        /// Why.
        reason: String,
    },
    /// A masked update of the wrong size.
    #[error("a masked update of {bytes} bytes, expected {parameters} values of 8 bytes")]
    MaskedSize {
        /// Bytes found.
        bytes: usize,
        /// Values expected.
        parameters: usize,
    },
    /// It masked twice.
    #[error("masked twice")]
    MaskedTwice,
    /// Reveals without a masked update.
    #[error("reveals from a client without a masked update")]
    RevealsWithoutMasked,
    /// It revealed twice.
    #[error("revealed twice")]
    RevealedTwice,
    /// A step the round is not at.
    #[error("a `{step}` step out of turn (the round is at its {phase} step)")]
    OutOfTurn {
        /// The step sent.
        step: &'static str,
        /// The round's step.
        phase: String,
    },
    /// A value that does not decode.
    #[error(transparent)]
    Decode(ProtocolError),
}

fn unb64<const N: usize>(text: &str, what: &str) -> Result<[u8; N], ProtocolError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|err| ProtocolError::Base64 { what: what.to_owned(), reason: err.to_string() })?;
    bytes.try_into().map_err(|bytes: Vec<u8>| ProtocolError::Bytes {
        what: what.to_owned(),
        found: bytes.len(),
        expected: N,
    })
}

/// A sealed share as it travels (ciphertext in base64).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareRecord {
    /// Sender's index.
    pub from: u8,
    /// Recipient's index.
    pub to: u8,
    /// base64 of the ChaCha20-Poly1305 ciphertext.
    pub ciphertext: String,
}

/// What a client sends in one step (in a model-update record's payload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientStep {
    /// Its public key (base64 of 32 bytes).
    Announce { public: String },
    /// Its sealed shares, one per announced peer (itself included).
    Shares { shares: Vec<ShareRecord> },
    /// Its masked update: base64 of the little-endian u64 values, and of the 16-byte tag.
    Masked { values: String, tag: String },
    /// Shares for unmasking: of dropped clients' keys and of survivors' seeds, by index (as
    /// a decimal string: JSON object keys are strings).
    Reveal { keys: BTreeMap<String, String>, seeds: BTreeMap<String, String> },
}

impl ClientStep {
    /// The model-update record that carries this step of `client` in `round`.
    pub fn to_update(&self, round: u64, client: &str, base_version: u64, timestamp: u64) -> ModelUpdate {
        let json = serde_json::to_vec(self).unwrap_or_default();
        ModelUpdate {
            round,
            client_id: client.to_owned(),
            num_examples: 0,
            base_version,
            timestamp,
            payload: Payload { format: SECAGG_FORMAT.to_owned(), parameters: 0, data: b64(&json) },
            metrics: Default::default(),
        }
    }

    /// The step in `update`, if its payload is one.
    pub fn from_update(update: &ModelUpdate) -> Option<Result<Self, ProtocolError>> {
        if update.payload.format != SECAGG_FORMAT {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&update.payload.data)
            .map_err(|err| ProtocolError::Base64 { what: "secure-aggregation step".into(), reason: err.to_string() })
            .and_then(|json| {
                serde_json::from_slice(&json).map_err(|err| ProtocolError::Step { reason: err.to_string() })
            });
        Some(decoded)
    }
}

/// A public key as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Client index in the round.
    pub index: u8,
    /// base64 of its X25519 public key.
    pub public: String,
}

/// What the coordinator publishes in one step (in a plan record's `secure_aggregation`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerStep {
    /// With the round's plan: each selected client's index, the Shamir threshold, and
    /// whether every client weighs the same (central DP) or by its examples.
    Plan { threshold: usize, indices: BTreeMap<String, u8>, equal_weights: bool },
    /// The announced keys.
    Keys { keys: Vec<KeyRecord> },
    /// The sealed shares of the clients that shared (only those take part from here on).
    Shares { shares: Vec<ShareRecord> },
    /// Who sent masked updates, and who dropped after sharing.
    Unmask { survivors: Vec<u8>, dropped: Vec<u8> },
}

/// Where a coordinator's round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Announce,
    Share,
    Mask,
    Reveal,
    Done,
}

/// What [`ServerRound::advance`] decided.
#[derive(Debug, PartialEq)]
pub enum Advance {
    /// Nothing to do yet.
    Wait,
    /// Publish this step.
    Publish(ServerStep),
    /// The round is over: the unmasked sum (`[Σw·Δ.., Σw, Σloss]`) and the clients in it, or
    /// why it failed.
    Done(Result<(Vec<f32>, Vec<String>), ProtocolError>),
}

/// The coordinator's side of one round.
#[derive(Debug)]
pub struct ServerRound {
    round: u64,
    threshold: usize,
    parameters: usize,
    indices: BTreeMap<String, u8>,
    equal_weights: bool,
    phase: Phase,
    step_timeout: Duration,
    step_deadline: Instant,
    keys: BTreeMap<u8, [u8; 32]>,
    shares: BTreeMap<u8, Vec<ShareRecord>>,
    /// Those who shared: the round's members from the mask step on.
    members: BTreeSet<u8>,
    masked: BTreeMap<u8, MaskedUpdate>,
    reveals: BTreeMap<u8, Reveal>,
}

impl ServerRound {
    /// A round over `clients` (their indices 1..=n in this order) whose masked vectors hold
    /// `parameters` values, unmasked with `threshold` shares; each step waits at most
    /// `step_timeout`.
    pub fn new(
        round: u64,
        clients: &[String],
        threshold: usize,
        parameters: usize,
        equal_weights: bool,
        step_timeout: Duration,
    ) -> Self {
        let indices = clients.iter().enumerate().map(|(i, c)| (c.clone(), (i + 1) as u8)).collect();
        Self {
            round,
            threshold,
            parameters,
            indices,
            equal_weights,
            phase: Phase::Announce,
            step_timeout,
            step_deadline: Instant::now() + step_timeout,
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            members: BTreeSet::new(),
            masked: BTreeMap::new(),
            reveals: BTreeMap::new(),
        }
    }

    /// The step published with the plan.
    pub fn plan_step(&self) -> ServerStep {
        ServerStep::Plan { threshold: self.threshold, indices: self.indices.clone(), equal_weights: self.equal_weights }
    }

    /// When the current step times out.
    pub fn deadline(&self) -> Instant {
        self.step_deadline
    }

    /// Takes one client step; the error (for the dead-letter output) says why it is refused.
    pub fn receive(&mut self, client: &str, step: ClientStep) -> Result<(), ProtocolError> {
        let round = self.round;
        let refuse = |problem: ClientProblem| ProtocolError::Client {
            round,
            client: client.to_owned(),
            problem: Box::new(problem),
        };
        let Some(&index) = self.indices.get(client) else {
            return Err(refuse(ClientProblem::NotSelected));
        };
        match (self.phase, step) {
            (Phase::Announce, ClientStep::Announce { public }) => {
                let key = unb64::<32>(&public, "the public key").map_err(|e| refuse(ClientProblem::Decode(e)))?;
                if self.keys.insert(index, key).is_some() {
                    return Err(refuse(ClientProblem::AnnouncedTwice));
                }
            }
            (Phase::Share, ClientStep::Shares { shares }) => {
                if !self.keys.contains_key(&index) {
                    return Err(refuse(ClientProblem::SharesWithoutKey));
                }
                if shares.iter().any(|s| s.from != index || !self.keys.contains_key(&s.to)) {
                    return Err(refuse(ClientProblem::Misaddressed));
                }
                if self.shares.insert(index, shares).is_some() {
                    return Err(refuse(ClientProblem::SharedTwice));
                }
            }
            (Phase::Mask, ClientStep::Masked { values, tag }) => {
                if !self.members.contains(&index) {
                    return Err(refuse(ClientProblem::MaskedWithoutShares));
                }
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&values)
                    .map_err(|err| refuse(ClientProblem::MaskedBase64 { reason: err.to_string() }))?;
                if bytes.len() != self.parameters * 8 {
                    return Err(refuse(ClientProblem::MaskedSize { bytes: bytes.len(), parameters: self.parameters }));
                }
                let values =
                    bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
                let tag = unb64::<16>(&tag, "the tag").map_err(|e| refuse(ClientProblem::Decode(e)))?;
                if self.masked.insert(index, MaskedUpdate { values, tag }).is_some() {
                    return Err(refuse(ClientProblem::MaskedTwice));
                }
            }
            (Phase::Reveal, ClientStep::Reveal { keys, seeds }) => {
                if !self.masked.contains_key(&index) {
                    return Err(refuse(ClientProblem::RevealsWithoutMasked));
                }
                let decode = |map: BTreeMap<String, String>| -> Result<BTreeMap<u8, [u8; 32]>, ProtocolError> {
                    map.into_iter()
                        .map(|(owner, share)| {
                            let owner = owner.parse::<u8>().map_err(|_| ProtocolError::Index(owner.clone()))?;
                            Ok((owner, unb64::<32>(&share, "a share")?))
                        })
                        .collect()
                };
                let reveal = Reveal {
                    from: index,
                    keys: decode(keys).map_err(|e| refuse(ClientProblem::Decode(e)))?,
                    seeds: decode(seeds).map_err(|e| refuse(ClientProblem::Decode(e)))?,
                };
                if self.reveals.insert(index, reveal).is_some() {
                    return Err(refuse(ClientProblem::RevealedTwice));
                }
            }
            (phase, step) => {
                let name = match step {
                    ClientStep::Announce { .. } => "announce",
                    ClientStep::Shares { .. } => "shares",
                    ClientStep::Masked { .. } => "masked",
                    ClientStep::Reveal { .. } => "reveal",
                };
                return Err(refuse(ClientProblem::OutOfTurn { step: name, phase: format!("{phase:?}") }));
            }
        }
        Ok(())
    }

    fn fail(&mut self, got: usize, of: usize, did: &'static str) -> Advance {
        self.phase = Phase::Done;
        Advance::Done(Err(ProtocolError::TooFew { round: self.round, got, of, did, needed: self.threshold }))
    }

    fn next_step(&mut self, phase: Phase) {
        self.phase = phase;
        self.step_deadline = Instant::now() + self.step_timeout;
    }

    /// Moves the round on when its step is complete or timed out (at `now`); `ended`: no
    /// more client messages will come.
    pub fn advance(&mut self, now: Instant, ended: bool) -> Advance {
        let timed_out = ended || now >= self.step_deadline;
        let t = self.threshold;
        match self.phase {
            Phase::Announce if self.keys.len() == self.indices.len() || timed_out => {
                if self.keys.len() < t {
                    return self.fail(self.keys.len(), self.indices.len(), "announced a key");
                }
                self.next_step(Phase::Share);
                let keys = self.keys.iter().map(|(index, key)| KeyRecord { index: *index, public: b64(key) }).collect();
                Advance::Publish(ServerStep::Keys { keys })
            }
            Phase::Share if self.shares.len() == self.keys.len() || timed_out => {
                if self.shares.len() < t {
                    return self.fail(self.shares.len(), self.keys.len(), "sent their shares");
                }
                self.members = self.shares.keys().copied().collect();
                let members = &self.members;
                let shares =
                    self.shares.values().flatten().filter(|share| members.contains(&share.to)).cloned().collect();
                self.next_step(Phase::Mask);
                Advance::Publish(ServerStep::Shares { shares })
            }
            Phase::Mask if self.masked.len() == self.members.len() || timed_out => {
                if self.masked.len() < t {
                    return self.fail(self.masked.len(), self.members.len(), "sent masked updates");
                }
                let survivors: Vec<u8> = self.masked.keys().copied().collect();
                let dropped: Vec<u8> = self.members.iter().filter(|m| !self.masked.contains_key(m)).copied().collect();
                self.next_step(Phase::Reveal);
                Advance::Publish(ServerStep::Unmask { survivors, dropped })
            }
            Phase::Reveal if self.reveals.len() == self.masked.len() || timed_out => {
                self.phase = Phase::Done;
                let announced: Vec<Announcement> = self
                    .keys
                    .iter()
                    .filter(|(index, _)| self.members.contains(index))
                    .map(|(index, key)| Announcement::from_bytes(*index, *key))
                    .collect();
                let reveals: Vec<Reveal> = self.reveals.values().cloned().collect();
                let result = unmask(self.round, &announced, &self.masked, &reveals, t).map(|sum| {
                    let by_index: BTreeMap<u8, &String> = self.indices.iter().map(|(c, i)| (*i, c)).collect();
                    let clients = self.masked.keys().filter_map(|i| by_index.get(i).map(|c| (*c).clone())).collect();
                    (sum, clients)
                });
                match result {
                    Ok(done) => Advance::Done(Ok(done)),
                    Err(source) => Advance::Done(Err(ProtocolError::Unmask { round: self.round, source })),
                }
            }
            _ => Advance::Wait,
        }
    }
}

/// A client's side of one round: answers each [`ServerStep`] with its [`ClientStep`].
#[derive(Debug)]
pub struct ClientRound {
    index: u8,
    threshold: usize,
    party: SecureClient,
    announced: Vec<Announcement>,
    /// The masked vector, ready before the keys arrive (`[w·Δ.., w, loss]`).
    vector: Vec<f32>,
}

impl ClientRound {
    /// Takes part in `round` as `client`, if the plan's step selects it; `vector` is what it
    /// contributes. Its secrets come from the operating system's generator.
    pub fn join(round: u64, client: &str, step: &ServerStep, vector: Vec<f32>) -> Option<(Self, ClientStep)> {
        let ServerStep::Plan { threshold, indices, .. } = step else { return None };
        let index = *indices.get(client)?;
        let mut rng = rand_chacha::ChaCha20Rng::from_rng(rand::rngs::OsRng).ok()?;
        let party = SecureClient::new(index, round, &mut rng);
        let public = b64(&party.announce().public_bytes());
        let me = Self { index, threshold: *threshold, party, announced: Vec::new(), vector };
        Some((me, ClientStep::Announce { public }))
    }

    /// Its answer to a later step (none when it has nothing to say in it).
    pub fn answer(&mut self, step: &ServerStep) -> Result<Option<ClientStep>, ProtocolError> {
        match step {
            ServerStep::Plan { .. } => Ok(None),
            ServerStep::Keys { keys } => {
                self.announced = keys
                    .iter()
                    .map(|k| Ok(Announcement::from_bytes(k.index, unb64::<32>(&k.public, "a public key")?)))
                    .collect::<Result<_, ProtocolError>>()?;
                if !self.announced.iter().any(|a| a.client == self.index) {
                    return Ok(None);
                }
                let mut rng = rand_chacha::ChaCha20Rng::from_rng(rand::rngs::OsRng)
                    .map_err(|e| ProtocolError::Random(e.to_string()))?;
                let shares = self
                    .party
                    .share(&self.announced, self.threshold, &mut rng)
                    .into_iter()
                    .map(|s| ShareRecord { from: s.from, to: s.to, ciphertext: b64(&s.ciphertext) })
                    .collect();
                Ok(Some(ClientStep::Shares { shares }))
            }
            ServerStep::Shares { shares } => {
                let members: BTreeSet<u8> = shares.iter().map(|s| s.from).collect();
                if !members.contains(&self.index) {
                    return Ok(None);
                }
                let sealed: Vec<SealedShare> = shares
                    .iter()
                    .filter(|s| s.to == self.index)
                    .map(|s| {
                        let ciphertext =
                            base64::engine::general_purpose::STANDARD.decode(&s.ciphertext).map_err(|err| {
                                ProtocolError::Base64 {
                                    what: format!("a share from client {}", s.from),
                                    reason: err.to_string(),
                                }
                            })?;
                        Ok(SealedShare { from: s.from, to: s.to, ciphertext })
                    })
                    .collect::<Result<_, ProtocolError>>()?;
                // A share that does not authenticate is refused: the round cannot go on safely.
                self.party.receive(&self.announced, &sealed)?;
                self.announced.retain(|a| members.contains(&a.client));
                let masked = self.party.mask(&self.vector, &self.announced);
                let mut bytes = Vec::with_capacity(masked.values.len() * 8);
                for value in &masked.values {
                    bytes.extend_from_slice(&value.to_le_bytes());
                }
                Ok(Some(ClientStep::Masked { values: b64(&bytes), tag: b64(&masked.tag) }))
            }
            ServerStep::Unmask { survivors, dropped } => {
                if !survivors.contains(&self.index) {
                    return Ok(None);
                }
                let reveal =
                    self.party.reveal(&survivors.iter().copied().collect(), &dropped.iter().copied().collect());
                let encode =
                    |map: BTreeMap<u8, [u8; 32]>| map.into_iter().map(|(k, v)| (k.to_string(), b64(&v))).collect();
                Ok(Some(ClientStep::Reveal { keys: encode(reveal.keys), seeds: encode(reveal.seeds) }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a round between a server and `n` clients over the message types (through JSON,
    /// as they travel); `drop_after_sharing` vanish before masking.
    fn run(n: usize, drop_after_sharing: &[usize], tamper: bool) -> Advance {
        let clients: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let threshold = (n * 3).div_ceil(5);
        let mut server = ServerRound::new(4, &clients, threshold, 3, false, Duration::from_secs(60));
        let plan: ServerStep = serde_json::from_str(&serde_json::to_string(&server.plan_step()).unwrap()).unwrap();
        let mut parties: Vec<Option<ClientRound>> = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            let vector = vec![i as f32, 1.0, 0.5];
            let (party, step) = ClientRound::join(4, client, &plan, vector).unwrap();
            server.receive(client, step).unwrap();
            parties.push(Some(party));
        }
        loop {
            match server.advance(Instant::now(), false) {
                Advance::Wait => panic!("every client answered: the step must close"),
                Advance::Done(result) => return Advance::Done(result),
                Advance::Publish(step) => {
                    let mut step: ServerStep = serde_json::from_str(&serde_json::to_string(&step).unwrap()).unwrap();
                    if tamper {
                        if let ServerStep::Shares { shares } = &mut step {
                            let share = &mut shares[0].ciphertext;
                            *share = b64(&{
                                let mut bytes = base64::engine::general_purpose::STANDARD.decode(&*share).unwrap();
                                bytes[3] ^= 1;
                                bytes
                            });
                        }
                    }
                    if matches!(step, ServerStep::Unmask { .. }) || matches!(step, ServerStep::Shares { .. }) {
                        for i in drop_after_sharing {
                            parties[*i] = None;
                        }
                    }
                    for (i, party) in parties.iter_mut().enumerate() {
                        let Some(party) = party else { continue };
                        match party.answer(&step) {
                            Ok(Some(answer)) => {
                                // Through the record a client sends, as it travels.
                                let update = answer.to_update(4, &clients[i], 0, 0);
                                let update: ModelUpdate =
                                    serde_json::from_str(&serde_json::to_string(&update).unwrap()).unwrap();
                                let answer = ClientStep::from_update(&update).unwrap().unwrap();
                                server.receive(&clients[i], answer).unwrap()
                            }
                            Ok(None) => {}
                            Err(reason) => return Advance::Done(Err(reason)),
                        }
                    }
                    if matches!(step, ServerStep::Shares { .. }) && !drop_after_sharing.is_empty() {
                        // The step waits for the dropped clients until it times out.
                        assert_eq!(server.advance(Instant::now(), false), Advance::Wait);
                        let late = server.deadline() + Duration::from_millis(1);
                        match server.advance(late, false) {
                            Advance::Publish(step) => {
                                for (i, party) in parties.iter_mut().enumerate() {
                                    let Some(party) = party else { continue };
                                    if let Some(answer) = party.answer(&step).unwrap() {
                                        server.receive(&clients[i], answer).unwrap();
                                    }
                                }
                            }
                            other => return other,
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_round_through_the_messages_sums_exactly() {
        let Advance::Done(Ok((sum, clients))) = run(5, &[], false) else { panic!("the round fails") };
        assert_eq!(clients.len(), 5);
        assert_eq!(sum, vec![10.0, 5.0, 2.5]);
    }

    #[test]
    fn a_client_dropping_after_sharing_is_unmasked_around() {
        let Advance::Done(Ok((sum, clients))) = run(5, &[2], false) else { panic!("the round fails") };
        assert_eq!(clients, vec!["c0", "c1", "c3", "c4"]);
        assert_eq!(sum, vec![8.0, 4.0, 2.0]);
    }

    #[test]
    fn a_share_altered_by_the_relay_is_refused_by_its_recipient() {
        let Advance::Done(Err(reason)) = run(4, &[], true) else { panic!("the round must fail") };
        let reason = reason.to_string();
        assert!(reason.contains("refused shares that do not authenticate, from client 1"), "{reason}");
    }

    #[test]
    fn steps_out_of_turn_and_strangers_are_refused() {
        let clients = vec!["a".to_owned(), "b".to_owned()];
        let mut server = ServerRound::new(1, &clients, 2, 1, false, Duration::from_secs(1));
        let err = server.receive("z", ClientStep::Announce { public: b64(&[0; 32]) }).unwrap_err().to_string();
        assert!(err.ends_with("not selected for the round"), "{err}");
        let err = server
            .receive("a", ClientStep::Masked { values: String::new(), tag: String::new() })
            .unwrap_err()
            .to_string();
        assert!(err.contains("a `masked` step out of turn"), "{err}");
        let err = server.receive("a", ClientStep::Announce { public: b64(&[0; 31]) }).unwrap_err().to_string();
        assert!(err.contains("has 31 bytes, expected 32"), "{err}");
    }
}
