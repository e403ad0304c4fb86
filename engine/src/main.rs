//! The `edgeflow` command: run, validate, graph and describe pipelines.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use edgeflow_engine::config::{self, Pipeline};
use edgeflow_engine::graph::{self, Format};
use edgeflow_engine::metrics::{self, Metrics};
use edgeflow_engine::runtime::{self, RunOptions};
use edgeflow_engine::status_line;

/// mimalloc instead of the system allocator: records are allocated on worker threads and
/// freed on others (sinks, model threads), where glibc's arenas contend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of an invalid pipeline, distinct from a runtime failure (1) and from a
/// command-line usage error (2).
const EXIT_INVALID: u8 = 3;

/// Most worker threads per process: each holds its own dataflow and buffers, so thousands
/// would exhaust memory before they did any work.
const MAX_WORKERS: usize = 512;
/// Most processes in a cluster.
const MAX_PROCESSES: usize = 1024;

/// Parses a count from 1 to `MAX`.
fn bounded<const MAX: usize>(text: &str) -> Result<usize, String> {
    let value: usize = text.trim().parse().map_err(|_| format!("`{text}` is not a whole number"))?;
    if !(1..=MAX).contains(&value) {
        return Err(format!("{value} is out of range: expected 1 to {MAX}"));
    }
    Ok(value)
}

/// edgeflow: a stream-processing engine for intelligence at the network edge.
#[derive(Debug, Parser)]
#[command(name = "edgeflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `json`, `text`, or `auto` (text on a terminal, JSON otherwise).
    #[arg(long, global = true, default_value = "auto")]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline.
    Run {
        /// The pipeline YAML file.
        pipeline: PathBuf,
        /// Timely worker threads in this process (1 to 512).
        #[arg(long, short = 'w', default_value_t = 1, env = "EDGEFLOW_WORKERS", value_parser = bounded::<MAX_WORKERS>)]
        workers: usize,
        /// Number of processes in the cluster (1 to 1024).
        #[arg(long, default_value_t = 1, value_parser = bounded::<MAX_PROCESSES>)]
        processes: usize,
        /// This process's index in the cluster, from 0.
        #[arg(long, default_value_t = 0)]
        process: usize,
        /// File with one host:port per process (for --processes > 1).
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// Restore even though the checkpoint has state of this component that no longer
        /// fits the pipeline (removed, or now of another type): its state is dropped.
        /// Repeat for several.
        #[arg(long = "allow-state-drop", value_name = "NAME")]
        allow_state_drop: Vec<String>,
        /// Override the metrics address of the pipeline (`host:port`; port 0 picks one).
        #[arg(long, env = "EDGEFLOW_METRICS_ADDR")]
        metrics_addr: Option<String>,
        /// Do not serve /metrics, /health and /ready.
        #[arg(long)]
        no_metrics: bool,
        /// Do not draw the live status line, even on a terminal.
        #[arg(long)]
        no_status: bool,
    },
    /// Apply a changed pipeline file to a running `edgeflow run` without losing state: the
    /// file is checked here first (problems are printed, nothing is sent), then the engine
    /// (process PID) is sent SIGHUP, checks it again and goes on from its last checkpoint
    /// with the new pipeline (see the README, "Hot reload").
    Reload {
        /// The running engine's process id.
        #[arg(long)]
        pid: u32,
        /// The changed pipeline file (the one the engine runs).
        pipeline: PathBuf,
    },
    /// Check a pipeline and report every problem, without running it.
    Validate {
        /// The pipeline YAML file.
        pipeline: PathBuf,
    },
    /// Print the dataflow of a pipeline as Mermaid or DOT.
    Graph {
        /// The pipeline YAML file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "mermaid")]
        format: Format,
    },
    /// Inspect or benchmark an ONNX model (a registry entry such as
    /// `pipelines/models/anomaly`, or a `.onnx` file).
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Differential-privacy planning.
    Dp {
        #[command(subcommand)]
        command: DpCommand,
    },
    /// Take part in federated training as an edge client outside the engine: follow the
    /// plans file a `federated` operator's `plans` sink writes, train on local data, and
    /// append answers to the file its `model_updates` source follows (with secure
    /// aggregation: the protocol's steps, never the update in the clear).
    Client {
        /// This client's id.
        #[arg(long)]
        id: String,
        /// The plans file to follow.
        #[arg(long)]
        plans: PathBuf,
        /// The updates file to append to.
        #[arg(long)]
        updates: PathBuf,
        /// Local examples, `label,feature,...` per line.
        #[arg(long)]
        data: PathBuf,
        /// Features are divided by this.
        #[arg(long, default_value_t = 16.0)]
        feature_scale: f32,
        /// Stop after answering this round.
        #[arg(long)]
        rounds: u64,
        /// Testing dropouts: vanish after sending the shares of this round.
        #[arg(long)]
        drop_after_sharing: Option<u64>,
        /// Stop when no plan has come for this many seconds.
        #[arg(long, default_value_t = 120)]
        idle_timeout: u64,
    },
    /// Query a running pipeline's live tables over Flight SQL (its `serve` section) and
    /// print the result, e.g. `edgeflow sql --server 127.0.0.1:50051 "SELECT * FROM nodes"`.
    Sql {
        /// The query.
        sql: String,
        /// `HOST:PORT` of the pipeline's Flight SQL server.
        #[arg(long, default_value = "127.0.0.1:50051")]
        server: String,
        /// Bearer token (or set `EDGEFLOW_FLIGHT_TOKEN`).
        #[arg(long, env = "EDGEFLOW_FLIGHT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Connect with TLS.
        #[arg(long)]
        tls: bool,
        /// With `--tls`: the CA certificate (PEM) to trust instead of the system's.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// With `--tls`: a client certificate (PEM), for a server that requires one.
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long, requires = "client_cert")]
        client_key: Option<PathBuf>,
        /// `table`, `json` (one object per row), `csv` or `arrow` (an IPC stream).
        #[arg(long, value_enum, default_value = "table")]
        format: edgeflow_engine::sql_cli::Format,
        /// Print the query's changes as they happen (`time`, `progressed`, `diff`, then the
        /// columns), until interrupted.
        #[arg(long)]
        subscribe: bool,
    },
    /// Print the JSON Schema of pipeline files (for editors), or the Markdown reference.
    Schema {
        /// `json` (JSON Schema) or `markdown` (the README's YAML reference).
        #[arg(long, default_value = "json")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum DpCommand {
    /// The epsilon a training plan spends: `steps` rounds of the Gaussian mechanism with
    /// `noise-multiplier` on a Poisson sample of `sample-rate` of the clients (RDP accountant,
    /// as Google's dp-accounting).
    Epsilon {
        /// Noise std over the clipping norm (sigma).
        #[arg(long)]
        noise_multiplier: f64,
        /// Fraction of clients sampled per round (q).
        #[arg(long)]
        sample_rate: f64,
        /// Rounds.
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long)]
        delta: f64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Print the model's versions, inputs, outputs and metadata.
    Inspect {
        /// Model directory or `.onnx` file.
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the latest version on random inputs and report rows/s and run latency.
    Bench {
        /// Model directory or `.onnx` file.
        model: PathBuf,
        /// Rows per run.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// How long to measure, seconds.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// ONNX Runtime intra-op threads (0: one per core).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn model_command(command: ModelCommand) -> Result<(), edgeflow_engine::model_cli::ModelCliError> {
    use edgeflow_connectors::onnx::SessionOptions;
    use edgeflow_engine::model_cli;
    match command {
        ModelCommand::Inspect { model, json } => {
            let model = model_cli::load(&model, SessionOptions::default())?;
            println!("{}", model_cli::inspect(&model, json).trim_end());
        }
        ModelCommand::Bench { model, batch, seconds, threads, json } => {
            let options = SessionOptions { intra_op_threads: threads, inter_op_threads: 1 };
            let mut model = model_cli::load(&model, options)?;
            let duration = std::time::Duration::from_secs_f64(seconds.max(0.0));
            let report = model_cli::bench(&mut model, batch, duration)?;
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{report}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Validate { pipeline } => match load(&pipeline) {
            Ok(loaded) => {
                println!(
                    "{}: ok ({} sources, {} operators, {} sinks)",
                    pipeline.display(),
                    loaded.sources.len(),
                    loaded.operators.len(),
                    loaded.sinks.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Reload { pid, pipeline } => {
            if let Err(code) = load(&pipeline) {
                return code;
            }
            let sent = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status();
            match sent {
                Ok(status) if status.success() => {
                    println!(
                        "{}: ok; reload requested of process {pid} (its log says when it runs the new pipeline)",
                        pipeline.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("error: cannot signal process {pid} (not running, or not yours)");
                    ExitCode::FAILURE
                }
                Err(err) => {
                    eprintln!("error: cannot run `kill` to signal process {pid}: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Graph { pipeline, format } => match load(&pipeline) {
            Ok(loaded) => {
                print!("{}", graph::render(&loaded, format));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Dp { command: DpCommand::Epsilon { noise_multiplier, sample_rate, steps, delta, json } } => {
            if !(noise_multiplier >= 0.0 && (0.0..=1.0).contains(&sample_rate) && delta > 0.0 && delta < 1.0) {
                eprintln!("error: need --noise-multiplier >= 0, --sample-rate in [0, 1] and --delta in (0, 1)");
                return ExitCode::from(2);
            }
            let (epsilon, order) =
                edgeflow_operators::federated::privacy::epsilon_for(noise_multiplier, sample_rate, steps, delta);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"epsilon": epsilon, "order": order, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps, "delta": delta})
                );
            } else {
                println!("epsilon {epsilon:.6} at delta {delta} (optimal RDP order {order}) after {steps} rounds, noise multiplier {noise_multiplier}, sample rate {sample_rate}");
            }
            ExitCode::SUCCESS
        }
        Command::Client { id, plans, updates, data, feature_scale, rounds, drop_after_sharing, idle_timeout } => {
            let options = edgeflow_engine::client::ClientOptions {
                id,
                plans,
                updates,
                data,
                feature_scale,
                rounds,
                drop_after_sharing,
                idle_timeout: std::time::Duration::from_secs(idle_timeout),
            };
            match edgeflow_engine::client::run(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Model { command } => match model_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Sql { sql, server, token, tls, ca, client_cert, client_key, format, subscribe } => {
            let identity = client_cert.zip(client_key);
            let tls = tls || ca.is_some() || identity.is_some();
            let options =
                edgeflow_engine::sql_cli::SqlOptions { server, token, tls, ca, identity, sql, format, subscribe };
            match edgeflow_engine::sql_cli::run(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Schema { format } => match format.as_str() {
            "json" => {
                let schema = config::schema::pipeline_schema();
                println!("{}", serde_json::to_string_pretty(&schema).unwrap_or_default());
                ExitCode::SUCCESS
            }
            "markdown" => {
                print!("{}", config::schema::pipeline_reference_markdown());
                ExitCode::SUCCESS
            }
            other => {
                eprintln!("error: unknown schema format `{other}`\nhint: use `--format json` or `--format markdown`");
                ExitCode::from(2)
            }
        },
        Command::Run {
            pipeline,
            workers,
            processes,
            process,
            hostfile,
            allow_state_drop,
            metrics_addr,
            no_metrics,
            no_status,
        } => {
            let loaded = match load(&pipeline) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let options = RunOptions { workers, processes, process, hostfile, stop: stop.clone(), allow_state_drop };
            match run(&pipeline, loaded, options, metrics_addr, no_metrics, no_status) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn load(path: &std::path::Path) -> Result<Pipeline, ExitCode> {
    config::load_file(path).map_err(|problems| {
        eprintln!("{problems}");
        ExitCode::from(EXIT_INVALID)
    })
}

fn run(
    path: &std::path::Path,
    mut pipeline: Pipeline,
    mut options: RunOptions,
    metrics_addr: Option<String>,
    no_metrics: bool,
    no_status: bool,
) -> anyhow::Result<()> {
    let terminated = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while stopping exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, terminated.clone())?;
        signal_hook::flag::register(signal, terminated.clone())?;
        signal_hook::flag::register(signal, options.stop.clone())?;
    }
    let reloads = edgeflow_engine::reload::Reloads::watch(
        path,
        &pipeline,
        options.stop.clone(),
        terminated.clone(),
        options.processes,
    )?;
    let metrics = Arc::new(Metrics::new());
    if pipeline.metrics.enabled && !no_metrics {
        let mut config = pipeline.metrics.clone();
        if let Some(address) = metrics_addr {
            config.address = address;
        }
        let address = config.socket_addr().map_err(anyhow::Error::msg)?;
        let bound = metrics::serve(metrics.clone(), address)
            .map_err(|err| anyhow::anyhow!("cannot serve metrics on {address}: {err}\nhint: pick another address with --metrics-addr, or --no-metrics"))?;
        tracing::info!(address = %bound, "serving /metrics, /health and /ready");
    }
    let status_stop = Arc::new(AtomicBool::new(false));
    let status = if !no_status && std::io::stderr().is_terminal() {
        Some(status_line::spawn(metrics.clone(), status_stop.clone())?)
    } else {
        None
    };
    let result = loop {
        tracing::info!(pipeline = %pipeline.name, workers = options.workers, processes = options.processes, process = options.process, "starting");
        let result = runtime::run(&pipeline, &options, metrics.clone());
        let reload = reloads.take();
        let Some(reload) = reload.filter(|_| result.is_ok() && !terminated.load(Ordering::Relaxed)) else {
            break result;
        };
        if !reload.dropped.is_empty() {
            tracing::warn!(components = ?reload.dropped, "reload: the state of components removed or of another type is dropped");
        }
        options.allow_state_drop.extend(reload.dropped);
        pipeline = reload.pipeline;
        options.stop.store(false, Ordering::Relaxed);
        tracing::info!(pipeline = %pipeline.name, "reloaded: starting the new pipeline from the last checkpoint");
    };
    status_stop.store(true, Ordering::Relaxed);
    if let Some(status) = status {
        let _ = status.join();
    }
    if options.stop.load(Ordering::Relaxed) && result.is_ok() {
        tracing::info!("stopped by signal; sinks flushed");
    }
    result
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("EDGEFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init();
    } else {
        builder.compact().init();
    }
}
