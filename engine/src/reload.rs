//! Hot reload: a changed pipeline file applied to a running pipeline without losing state.
//!
//! `edgeflow reload --pid PID FILE` (or `kill -HUP PID`) asks a running `edgeflow run` to
//! read its pipeline file again. The engine validates the new file first: a file with
//! problems is refused with the usual `line:col` messages in the log, and the running
//! pipeline goes on untouched. A valid one is applied as Flink applies a changed job from a
//! savepoint: the run stops gracefully (in-flight records drain, sinks flush), and the new
//! pipeline starts from the last complete checkpoint, so every operator keeps its state
//! (changed parameters such as thresholds, timeouts, batch sizes and rate limits apply from
//! then on), added operators and sinks start empty, and the state of removed components (or
//! of components whose type changed) is dropped, named in the log. What the old run did
//! after that checkpoint is done again by the new one: file sinks are cut back to the
//! checkpoint and exactly-once Kafka sinks abort it, so they hold it once; at-least-once
//! Kafka sinks may repeat it.
//!
//! A reload needs checkpoints (without them there is no state to carry over), the same
//! checkpoint directory, and one process (a cluster's processes restart together: restart
//! each, and the checkpoints keep the state).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{self, Pipeline};

/// What a reload must keep of the running pipeline: its stateful components by name, with
/// their types, and its checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    components: BTreeMap<String, String>,
    checkpoint_dir: Option<PathBuf>,
}

impl Shape {
    /// The shape of `pipeline`.
    pub fn of(pipeline: &Pipeline) -> Self {
        let sources = pipeline.sources.iter().map(|s| (s.name.clone(), s.kind.name().to_owned()));
        let operators = pipeline.operators.iter().map(|o| (o.name.clone(), o.kind.name().to_owned()));
        Self {
            components: sources.chain(operators).collect(),
            checkpoint_dir: pipeline.checkpoint.as_ref().map(|c| c.dir.clone()),
        }
    }
}

/// A new pipeline to run, and the components whose state it drops.
#[derive(Debug)]
pub struct Reload {
    /// The new pipeline.
    pub pipeline: Pipeline,
    /// Components of the running pipeline that the new one removed, or has with another
    /// type: their checkpointed state is dropped.
    pub dropped: Vec<String>,
}

/// Checks the pipeline file at `path` as a reload of a running pipeline of shape `running`:
/// the file's problems (`line:col` messages), or why it cannot replace the running one.
pub fn prepare(path: &Path, running: &Shape) -> Result<Reload, String> {
    let pipeline = config::load_file(path).map_err(|problems| problems.to_string())?;
    let Some(dir) = &running.checkpoint_dir else {
        return Err(format!(
            "{}: the running pipeline takes no checkpoints, so a reload would start every operator empty\nhint: add a `checkpoint:` section (then restart once), or restart to apply the change",
            path.display()
        ));
    };
    let next = Shape::of(&pipeline);
    match &next.checkpoint_dir {
        None => {
            return Err(format!(
                "{}: the new file has no `checkpoint:` section; the running pipeline's state is in `{}`\nhint: keep the section to reload, or restart without it",
                path.display(),
                dir.display()
            ))
        }
        Some(new) if new != dir => {
            return Err(format!(
                "{}: `checkpoint.dir` changed from `{}` to `{}`; the state to carry over is in the old one\nhint: keep the directory to reload, or move the checkpoints and restart",
                path.display(),
                dir.display(),
                new.display()
            ))
        }
        Some(_) => {}
    }
    let dropped = running
        .components
        .iter()
        .filter(|(name, kind)| next.components.get(*name) != Some(*kind))
        .map(|(name, _)| name.clone())
        .collect();
    Ok(Reload { pipeline, dropped })
}

/// Watches for reload requests (SIGHUP) of the pipeline at `path`: each one is checked
/// against the running pipeline; a good one is kept for [`Reloads::take`] and stops the run,
/// a bad one is logged and changes nothing.
#[derive(Debug)]
pub struct Reloads {
    pending: Arc<Mutex<Option<Reload>>>,
    running: Arc<Mutex<Shape>>,
}

impl Reloads {
    /// Starts watching. `stop` is the run's stop flag, set when a reload is ready; nothing is
    /// reloaded once `terminated` is set (a stop by SIGINT/SIGTERM). `processes > 1` refuses
    /// reloads (a cluster restarts together).
    pub fn watch(
        path: &Path,
        pipeline: &Pipeline,
        stop: Arc<AtomicBool>,
        terminated: Arc<AtomicBool>,
        processes: usize,
    ) -> anyhow::Result<Self> {
        let requested = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, requested.clone())?;
        let pending = Arc::new(Mutex::new(None));
        let running = Arc::new(Mutex::new(Shape::of(pipeline)));
        let (path, slot, shape) = (path.to_owned(), pending.clone(), running.clone());
        std::thread::Builder::new().name("edgeflow-reload".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            if !requested.swap(false, Ordering::Relaxed) || terminated.load(Ordering::Relaxed) {
                continue;
            }
            if processes > 1 {
                tracing::error!("reload refused: a cluster of {processes} processes restarts together; restart every process (the checkpoints keep the state)");
                continue;
            }
            let current = shape.lock().map(|s| s.clone());
            let Ok(current) = current else { return };
            match prepare(&path, &current) {
                Ok(reload) => {
                    tracing::info!(file = %path.display(), dropped = ?reload.dropped, "reload: the new pipeline is valid; stopping at the inputs' frontier to start it from the last checkpoint");
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(reload);
                    }
                    stop.store(true, Ordering::Relaxed);
                }
                Err(problems) => {
                    tracing::error!(file = %path.display(), "reload refused; the running pipeline goes on unchanged:\n{problems}");
                }
            }
        })?;
        Ok(Self { pending, running })
    }

    /// The reload that stopped the run, if one did; the running shape becomes its.
    pub fn take(&self) -> Option<Reload> {
        let reload = self.pending.lock().ok()?.take()?;
        if let Ok(mut running) = self.running.lock() {
            *running = Shape::of(&reload.pipeline);
        }
        Some(reload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("pipeline.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const BASE: &str = "name: r\nmetrics:\n  enabled: false\ncheckpoint:\n  dir: ckpt\nsources:\n  beats:\n    type: file\n    path: beats.jsonl\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: changes.jsonl\n";

    /// Removed components, and components of another type, are named as dropped; a changed
    /// parameter drops nothing.
    #[test]
    fn removed_and_retyped_components_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let running = Shape::of(&config::load_file(&write(dir.path(), BASE)).unwrap());
        let changed = write(
            dir.path(),
            &BASE.replace("    input: beats\nsinks", "    input: beats\n    cpu_degraded: 70\nsinks"),
        );
        assert_eq!(prepare(&changed, &running).unwrap().dropped, Vec::<String>::new());
        let renamed =
            write(dir.path(), &BASE.replace("  health:", "  vitals:").replace("health.changes", "vitals.changes"));
        assert_eq!(prepare(&renamed, &running).unwrap().dropped, vec!["health".to_owned()]);
    }

    /// A file with problems, no checkpoints, or another checkpoint directory is refused with
    /// the reason.
    #[test]
    fn what_cannot_carry_the_state_over_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let running = Shape::of(&config::load_file(&write(dir.path(), BASE)).unwrap());
        let bad = write(
            dir.path(),
            &BASE.replace("    input: beats\nsinks", "    input: beats\n    cpu_degraded: 250\nsinks"),
        );
        let err = prepare(&bad, &running).unwrap_err();
        assert!(err.contains("pipeline.yaml:14:") && err.contains("cpu_degraded"), "{err}");
        let moved = write(dir.path(), &BASE.replace("dir: ckpt", "dir: elsewhere"));
        assert!(prepare(&moved, &running).unwrap_err().contains("`checkpoint.dir` changed"));
        let none = write(dir.path(), &BASE.replace("checkpoint:\n  dir: ckpt\n", ""));
        assert!(prepare(&none, &running).unwrap_err().contains("no `checkpoint:` section"));
        let unchecked = Shape { checkpoint_dir: None, ..running };
        assert!(prepare(&write(dir.path(), BASE), &unchecked).unwrap_err().contains("takes no checkpoints"));
    }
}
