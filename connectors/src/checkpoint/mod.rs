//! The checkpoint store: durable, atomic checkpoints of a pipeline's state on local disk.
//!
//! A checkpoint is numbered (its epoch) and covers one event time. Each worker writes its
//! part (a list of keyed byte strings: operator state, source positions) into
//! `DIR/ckpt-EPOCH/part-NAME.bin`; when every part is durable, one writer commits the
//! checkpoint by writing `MANIFEST.json` last. Readers only ever see committed checkpoints,
//! so a crash at any moment leaves either the whole new checkpoint or none of it:
//!
//! - every file is written beside its final name, fsynced, renamed into place, and its
//!   directory fsynced, so a name never points at half a file;
//! - a part ends with the SHA-256 of its bytes and the manifest lists each part's length and
//!   digest, and carries a digest of itself, so a torn or corrupted file is found on load;
//! - [`CheckpointStore::latest`] returns the newest committed checkpoint whose manifest and
//!   parts all verify, and says why it passed over newer ones.
//!
//! ```
//! use edgeflow_connectors::checkpoint::CheckpointStore;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = CheckpointStore::open(dir.path(), 2).unwrap();
//! let part = store.write_part(1, "worker-0", &[("health/n1".into(), b"healthy".to_vec())]).unwrap();
//! store.commit(1, 1_700_000_010_000, &[part]).unwrap();
//! let loaded = store.latest().unwrap().expect("a checkpoint");
//! assert_eq!((loaded.epoch, loaded.time), (1, 1_700_000_010_000));
//! assert_eq!(loaded.parts["worker-0"][0].1, b"healthy");
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use edgeflow_operators::EventTime;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ConnectorError;

/// The first bytes of every part file (format version 1).
const PART_MAGIC: &[u8] = b"EFCKPT1\n";
/// The manifest's format version.
const MANIFEST_FORMAT: u32 = 1;
/// The manifest's file name: written last, it makes a checkpoint complete.
const MANIFEST: &str = "MANIFEST.json";

/// One entry of a part: a key (e.g. `node_health/health/n17`) and its bytes.
pub type Entry = (String, Vec<u8>);

/// A part written and durable, to be listed in its checkpoint's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// The part's name (e.g. `worker-3`).
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
}

/// A checkpoint read back and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Its number.
    pub epoch: u64,
    /// The event time it covers.
    pub time: EventTime,
    /// Each part's entries, by part name.
    pub parts: BTreeMap<String, Vec<Entry>>,
    /// Newer checkpoints passed over, with the reason (incomplete, corrupted, truncated).
    pub skipped: Vec<(u64, String)>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    epoch: u64,
    time: EventTime,
    parts: Vec<PartInfo>,
    /// SHA-256 of the manifest's other fields (`format`, `epoch`, `time`, `parts`) as JSON.
    checksum: String,
}

impl Manifest {
    fn digest(format: u32, epoch: u64, time: EventTime, parts: &[PartInfo]) -> String {
        let body = serde_json::json!({ "format": format, "epoch": epoch, "time": time, "parts": parts });
        hex(&Sha256::digest(body.to_string().as_bytes()))
    }
}

/// One process's exclusive hold on a checkpoint directory for as long as it runs: a second
/// run of the pipeline on the same directory (started by mistake, or a stopped run's
/// restart while the stopped process still lives) would interleave its checkpoints with this
/// run's. Released when dropped (or when the process dies: an OS file lock).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the hold of process `process` on `dir` (created if missing), or says which
    /// process (by pid) holds it.
    pub fn take(dir: &Path, process: usize) -> Result<Self, ConnectorError> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(dir).map_err(|source| write_error(dir, source))?;
        let path = dir.join(format!("process-{process}.lock"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| write_error(&path, source))?;
        match file.try_lock() {
            Ok(()) => {
                let pid = std::process::id().to_string();
                file.set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| file.write_all(pid.as_bytes()))
                    .map_err(|source| write_error(&path, source))?;
                Ok(Self { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Err(ConnectorError::Config {
                    connector: "checkpoint",
                    reason: format!(
                        "checkpoint directory `{}` is in use by another run of this pipeline (process {process}, pid {})\nhint: stop that run first: two runs on one directory would mix their checkpoints",
                        dir.display(),
                        holder.trim()
                    ),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => Err(write_error(&path, source)),
        }
    }
}

/// Checkpoints in one directory.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointStore {
    /// The store in `dir` (created if missing), keeping the newest `keep` complete
    /// checkpoints (at least 1) when pruning.
    pub fn open(dir: &Path, keep: usize) -> Result<Self, ConnectorError> {
        std::fs::create_dir_all(dir).map_err(|source| write_error(dir, source))?;
        Ok(Self { dir: dir.to_path_buf(), keep: keep.max(1) })
    }

    fn checkpoint_dir(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("ckpt-{epoch:020}"))
    }

    /// Writes part `name` of checkpoint `epoch` durably; the checkpoint is not complete
    /// until [`Self::commit`] lists it.
    pub fn write_part(&self, epoch: u64, name: &str, entries: &[Entry]) -> Result<PartInfo, ConnectorError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(ConnectorError::Config {
                connector: "checkpoint",
                reason: format!("part name `{name}` must be letters, digits, `-`, `_` and `.`"),
            });
        }
        let dir = self.checkpoint_dir(epoch);
        std::fs::create_dir_all(&dir).map_err(|source| write_error(&dir, source))?;
        let mut bytes = PART_MAGIC.to_vec();
        for (key, value) in entries {
            bytes.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
            bytes.extend_from_slice(key.as_bytes());
            bytes.extend_from_slice(&(value.len() as u64).to_le_bytes());
            bytes.extend_from_slice(value);
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        write_durably(&dir.join(format!("part-{name}.bin")), &bytes)?;
        Ok(PartInfo { name: name.to_owned(), bytes: bytes.len() as u64, sha256: hex(&Sha256::digest(&bytes)) })
    }

    /// Completes checkpoint `epoch`, covering event time `time`, with `parts` (all written
    /// by [`Self::write_part`]): the manifest goes last, durably. Older checkpoints beyond
    /// the ones kept are pruned afterwards.
    pub fn commit(&self, epoch: u64, time: EventTime, parts: &[PartInfo]) -> Result<(), ConnectorError> {
        let dir = self.checkpoint_dir(epoch);
        let checksum = Manifest::digest(MANIFEST_FORMAT, epoch, time, parts);
        let manifest = Manifest { format: MANIFEST_FORMAT, epoch, time, parts: parts.to_vec(), checksum };
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        write_durably(&dir.join(MANIFEST), &text)?;
        sync_dir(&self.dir)?;
        self.prune()
    }

    /// Epochs of every checkpoint directory, newest first (complete or not).
    fn epochs(&self) -> Result<Vec<u64>, ConnectorError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| read_error(&self.dir, source))?;
        let mut epochs: Vec<u64> = entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.strip_prefix("ckpt-")?.parse().ok())
            .collect();
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(epochs)
    }

    /// The newest complete checkpoint whose manifest and parts verify, if any; newer ones
    /// that do not are listed in [`Loaded::skipped`] with the reason, and logged.
    pub fn latest(&self) -> Result<Option<Loaded>, ConnectorError> {
        let mut skipped = Vec::new();
        for epoch in self.epochs()? {
            match self.load(epoch) {
                Ok((time, parts)) => return Ok(Some(Loaded { epoch, time, parts, skipped })),
                Err(reason) => {
                    tracing::warn!(epoch, %reason, dir = %self.dir.display(), "checkpoint passed over");
                    skipped.push((epoch, reason));
                }
            }
        }
        Ok(None)
    }

    /// Checkpoint `epoch`, read and verified; the error says what is wrong with it.
    pub fn load_epoch(&self, epoch: u64) -> Result<Loaded, String> {
        let (time, parts) = self.load(epoch)?;
        Ok(Loaded { epoch, time, parts, skipped: Vec::new() })
    }

    /// Removes every checkpoint newer than `epoch` (complete or not): their output was never
    /// committed, so they must not be restored later.
    pub fn discard_after(&self, epoch: u64) -> Result<(), ConnectorError> {
        for newer in self.epochs()?.into_iter().filter(|e| *e > epoch) {
            let dir = self.checkpoint_dir(newer);
            std::fs::remove_dir_all(&dir).map_err(|source| write_error(&dir, source))?;
        }
        sync_dir(&self.dir)
    }

    /// Reads and verifies checkpoint `epoch`; the error says what is wrong with it.
    fn load(&self, epoch: u64) -> Result<(EventTime, BTreeMap<String, Vec<Entry>>), String> {
        let dir = self.checkpoint_dir(epoch);
        let text = match std::fs::read(dir.join(MANIFEST)) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err("incomplete: no manifest (the writer stopped before committing it)".into())
            }
            Err(err) => return Err(format!("cannot read its manifest: {err}")),
        };
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|err| format!("corrupted manifest: {err}"))?;
        let expected = Manifest::digest(manifest.format, manifest.epoch, manifest.time, &manifest.parts);
        if manifest.format != MANIFEST_FORMAT || manifest.epoch != epoch || manifest.checksum != expected {
            return Err("corrupted manifest: its checksum does not match its contents".into());
        }
        let mut parts = BTreeMap::new();
        for info in &manifest.parts {
            let path = dir.join(format!("part-{}.bin", info.name));
            let bytes = std::fs::read(&path).map_err(|err| format!("part `{}`: {err}", info.name))?;
            if bytes.len() as u64 != info.bytes {
                return Err(format!(
                    "part `{}` is truncated: {} bytes, {} expected",
                    info.name,
                    bytes.len(),
                    info.bytes
                ));
            }
            if hex(&Sha256::digest(&bytes)) != info.sha256 {
                return Err(format!("part `{}` is corrupted: its checksum does not match the manifest", info.name));
            }
            parts.insert(
                info.name.clone(),
                decode_part(&bytes).map_err(|reason| format!("part `{}`: {reason}", info.name))?,
            );
        }
        Ok((manifest.time, parts))
    }

    /// Removes complete checkpoints older than the newest `keep`, and incomplete ones older
    /// than the newest complete one (a writer may still be writing a newer incomplete one).
    pub fn prune(&self) -> Result<(), ConnectorError> {
        let mut complete = 0;
        for epoch in self.epochs()? {
            let dir = self.checkpoint_dir(epoch);
            let is_complete = dir.join(MANIFEST).exists();
            let remove = if is_complete {
                complete += 1;
                complete > self.keep
            } else {
                complete > 0
            };
            if remove {
                std::fs::remove_dir_all(&dir).map_err(|source| write_error(&dir, source))?;
            }
        }
        Ok(())
    }
}

/// The entries of a part's bytes (magic, entries, SHA-256 trailer), checked.
fn decode_part(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let body = bytes
        .len()
        .checked_sub(32)
        .and_then(|end| bytes.get(..end))
        .filter(|body| body.starts_with(PART_MAGIC))
        .ok_or("not a checkpoint part (no header or trailer)")?;
    if Sha256::digest(body).as_slice() != &bytes[body.len()..] {
        return Err("its own checksum does not match".into());
    }
    let mut rest = &body[PART_MAGIC.len()..];
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let key_len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().map_err(|_| "bad key length")?) as usize;
        let key = String::from_utf8(take(&mut rest, key_len)?.to_vec()).map_err(|_| "a key is not UTF-8")?;
        let value_len = u64::from_le_bytes(take(&mut rest, 8)?.try_into().map_err(|_| "bad value length")?);
        let value_len = usize::try_from(value_len).map_err(|_| "a value is too long")?;
        entries.push((key, take(&mut rest, value_len)?.to_vec()));
    }
    Ok(entries)
}

/// The next `n` bytes of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if rest.len() < n {
        return Err("an entry runs past the end".into());
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// Writes `bytes` to `path` beside it first, fsyncs, renames into place and fsyncs the
/// directory: a crash leaves the old file or the new one, never half of one.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ConnectorError> {
    let staging = path.with_extension("tmp");
    let mut file = std::fs::File::create(&staging).map_err(|source| write_error(&staging, source))?;
    file.write_all(bytes).map_err(|source| write_error(&staging, source))?;
    file.sync_all().map_err(|source| write_error(&staging, source))?;
    std::fs::rename(&staging, path).map_err(|source| write_error(path, source))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), ConnectorError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| write_error(dir, source))
}

fn write_error(path: &Path, source: std::io::Error) -> ConnectorError {
    ConnectorError::Write { path: path.display().to_string(), source }
}

fn read_error(path: &Path, source: std::io::Error) -> ConnectorError {
    ConnectorError::Read { path: path.display().to_string(), source }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests;
