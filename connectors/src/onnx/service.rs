//! A model's own thread: runs batches handed to it and watches the model directory for new
//! versions, so that a dataflow worker never waits on ONNX Runtime.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use edgeflow_operators::inference::operator::{Model, ModelRunner, RunOutcome};
use edgeflow_operators::Tensor;

use super::{Batch, ModelError, ModelInterface, OnnxModel};

/// How the service runs.
#[derive(Clone, Copy, Debug)]
pub struct ServiceOptions {
    /// How often the model directory is checked for new versions (`None`: never).
    pub watch: Option<Duration>,
}

/// A batch to run.
#[derive(Debug)]
pub struct Job {
    /// The caller's id for the batch.
    pub id: u64,
    /// The version to run; `None` for the latest at the time it runs.
    pub version: Option<u64>,
    /// The batch's inputs, stacked (one tensor per model input, in interface order; see
    /// [`super::Batch`]).
    pub inputs: Vec<Tensor>,
}

/// The thread that owns one [`OnnxModel`].
pub struct InferenceService {
    name: String,
    interface: ModelInterface,
    jobs: Option<mpsc::Sender<Job>>,
    outcomes: mpsc::Receiver<RunOutcome>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceService").field("name", &self.name).finish()
    }
}

impl InferenceService {
    /// Starts the model's thread; `notify` is called after each outcome is queued (to wake
    /// the dataflow operator that reads them).
    pub fn start(
        mut model: OnnxModel,
        options: ServiceOptions,
        notify: Box<dyn Fn() + Send>,
    ) -> Result<Self, ModelError> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (outcome_tx, outcomes) = mpsc::channel();
        let name = model.name().to_owned();
        let interface = model.interface().clone();
        let thread = std::thread::Builder::new()
            .name(format!("onnx-{name}"))
            .spawn(move || {
                let send = |outcome: RunOutcome| {
                    let sent = outcome_tx.send(outcome).is_ok();
                    notify();
                    sent
                };
                let mut last_watch = Instant::now();
                loop {
                    let job = match options.watch {
                        Some(every) => match job_rx.recv_timeout(every.saturating_sub(last_watch.elapsed())) {
                            Ok(job) => Some(job),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        },
                        None => match job_rx.recv() {
                            Ok(job) => Some(job),
                            Err(_) => return,
                        },
                    };
                    if options.watch.is_some_and(|every| last_watch.elapsed() >= every) {
                        last_watch = Instant::now();
                        let (loaded, errors) = model.refresh();
                        for version in loaded {
                            if !send(RunOutcome::Loaded { version }) {
                                return;
                            }
                        }
                        for reason in errors {
                            if !send(RunOutcome::LoadFailed { reason }) {
                                return;
                            }
                        }
                    }
                    let Some(job) = job else { continue };
                    let started = Instant::now();
                    // A panic in ONNX Runtime's bindings on one batch fails that batch, not the
                    // thread: every later batch of the model would be lost with it.
                    let run = std::panic::AssertUnwindSafe(|| model.run_stacked(job.version, &job.inputs));
                    let result = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".to_owned());
                        Err(ModelError::Runtime(format!("the model run panicked: {what}")))
                    });
                    // The outcome carries the reason, for the requests' results.
                    let result = result.map_err(|err| err.to_string());
                    let compute = started.elapsed();
                    if !send(RunOutcome::Done { id: job.id, started, compute, result }) {
                        return;
                    }
                }
            })
            .map_err(|err| ModelError::Runtime(format!("cannot start the thread of model `{name}`: {err}")))?;
        Ok(Self { name, interface, jobs: Some(jobs), outcomes, thread: Some(thread) })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's interface (the same for every version).
    pub fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    /// Queues a batch.
    pub fn queue(&self, job: Job) -> Result<(), ModelError> {
        let jobs =
            self.jobs.as_ref().ok_or_else(|| ModelError::Stopped(format!("model `{}` is stopped", self.name)))?;
        jobs.send(job).map_err(|_| ModelError::Stopped(format!("the thread of model `{}` has stopped", self.name)))
    }
}

impl Drop for InferenceService {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An ONNX model to serve: started on its own thread by the inference operator.
#[derive(Debug)]
pub struct ServedModel {
    /// The model.
    pub model: OnnxModel,
    /// How its thread runs.
    pub options: ServiceOptions,
}

impl Model for ServedModel {
    type Runner = InferenceService;

    fn name(&self) -> &str {
        self.model.name()
    }

    fn latest(&self) -> Option<u64> {
        self.model.latest()
    }

    fn start(self, notify: Box<dyn Fn() + Send>) -> Result<InferenceService, ModelError> {
        InferenceService::start(self.model, self.options, notify)
    }
}

impl ModelRunner for InferenceService {
    type Split = Batch;
    type Error = ModelError;

    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, inputs: &BTreeMap<String, Tensor>) -> Result<(), ModelError> {
        self.interface.check(&self.name, inputs).map(drop)
    }

    /// Stacks the batch here, on the caller's thread, so only whole batches cross to the
    /// model's thread.
    fn submit(&self, id: u64, version: Option<u64>, batch: &[&BTreeMap<String, Tensor>]) -> Result<Batch, ModelError> {
        let mut stacked = Batch::stack(&self.interface, batch)?;
        let inputs = std::mem::take(&mut stacked.inputs);
        self.queue(Job { id, version, inputs })?;
        Ok(stacked)
    }

    fn split(split: &Batch, outputs: Vec<Tensor>) -> Result<Vec<BTreeMap<String, Tensor>>, ModelError> {
        split.split(outputs)
    }

    fn try_next(&self) -> Option<RunOutcome> {
        self.outcomes.try_recv().ok()
    }
}
