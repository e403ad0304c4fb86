use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use edgeflow_operators::{DeadLetter, DurationMs, RecordKind};
use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Source, SourceItem, SourceStatus};

/// YAML configuration of the `file` source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// File of JSON records, one per line (see the Heartbeat and InferenceRequest records).
    /// Blank lines are skipped; any other line that does not decode goes to the dead-letter
    /// output.
    pub path: PathBuf,
    /// What the lines are: `heartbeats` (default), `inference_requests` or `model_updates`.
    #[serde(default)]
    pub records: RecordKind,
    /// Keep reading what is appended to the file instead of ending at its end (default false).
    #[serde(default)]
    pub follow: bool,
    /// How often a followed file is checked for new data (default 200ms).
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: DurationMs,
    /// How far behind the latest event time seen a record may be and still be on time; the
    /// watermark is the latest event time minus this (default 5s).
    #[serde(default = "defaults::max_out_of_orderness")]
    pub max_out_of_orderness: DurationMs,
    /// After this long without new data a followed file stops holding the watermark back:
    /// its watermark then follows the wall clock (default 30s).
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: DurationMs,
}

pub(crate) mod defaults {
    use edgeflow_operators::DurationMs;
    pub fn poll_interval() -> DurationMs {
        DurationMs(200)
    }
    pub fn max_out_of_orderness() -> DurationMs {
        DurationMs::from_secs(5)
    }
    pub fn idle_timeout() -> DurationMs {
        DurationMs::from_secs(30)
    }
}

/// Lines per block when several workers share a file.
const STRIDE: u64 = 64;

/// Reads JSON heartbeats from a file (or follows it). When several workers read one file,
/// each reads every line but decodes only its blocks of lines, so decoding runs in parallel
/// while every worker's event clock advances through the file at the same pace.
#[derive(Debug)]
pub struct FileSource {
    name: String,
    shown: String,
    reader: Option<BufReader<File>>,
    /// Byte offset of the next line to read.
    offset: u64,
    /// 1-based number of the next line.
    line: u64,
    /// This reader parses the lines of every `peers`-th block of `STRIDE` lines, starting
    /// with block `index`.
    index: u64,
    peers: u64,
    follow: bool,
    poll_interval: u64,
    records: RecordKind,
    buffer: Vec<u8>,
}

impl FileSource {
    /// The part of `config.path` that worker `index` of `peers` reads.
    pub fn open(name: &str, config: &FileSourceConfig, index: usize, peers: usize) -> Result<Self, ConnectorError> {
        let shown = config.path.display().to_string();
        let read_error = |source| ConnectorError::Read { path: shown.clone(), source };
        let file = File::open(&config.path).map_err(read_error)?;
        let mut source = Self {
            name: name.to_owned(),
            shown: shown.clone(),
            reader: None,
            offset: 0,
            line: 1,
            index: index as u64,
            peers: peers.max(1) as u64,
            follow: config.follow,
            poll_interval: config.poll_interval.as_millis().max(1),
            records: config.records,
            buffer: Vec::with_capacity(1024),
        };
        if config.follow {
            // One reader follows the whole file; the other workers have nothing to read.
            if index != 0 {
                return Ok(source);
            }
            source.peers = 1;
            source.index = 0;
        }
        source.reader = Some(BufReader::with_capacity(1 << 16, file));
        Ok(source)
    }
}

impl Source for FileSource {
    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(SourceStatus::Exhausted);
        };
        let mut produced = 0;
        while produced < max {
            self.buffer.clear();
            let read = reader
                .read_until(b'\n', &mut self.buffer)
                .map_err(|source| ConnectorError::Read { path: self.shown.clone(), source })?;
            if read == 0 {
                if self.follow {
                    return Ok(SourceStatus::Idle { retry_in_ms: self.poll_interval });
                }
                self.reader = None;
                return Ok(SourceStatus::Exhausted);
            }
            if self.follow && self.buffer.last() != Some(&b'\n') {
                // A line still being written: read it again once it is complete.
                reader
                    .seek(SeekFrom::Start(self.offset))
                    .map_err(|source| ConnectorError::Read { path: self.shown.clone(), source })?;
                return Ok(SourceStatus::Idle { retry_in_ms: self.poll_interval });
            }
            self.offset += read as u64;
            let line = self.line;
            self.line += 1;
            if ((line - 1) / STRIDE) % self.peers != self.index {
                continue;
            }
            let text = trim_line(&self.buffer);
            if text.is_empty() {
                continue;
            }
            produced += 1;
            match self.records.decode(text) {
                Ok(record) => {
                    let clock = record.event_time();
                    out.push(SourceItem::Record { record, clock });
                }
                Err(reason) => out.push(SourceItem::Malformed {
                    letter: DeadLetter {
                        source: self.name.clone(),
                        position: format!("{}:{line}", self.shown),
                        reason,
                        payload: text.to_vec(),
                    },
                    clock: None,
                }),
            }
        }
        Ok(SourceStatus::Ready)
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r' | b' ' | b'\t') {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn beat(node: usize, time: u64) -> String {
        format!(
            r#"{{"node_id":"n{node}","region":"eu","lat":1,"lon":2,"timestamp":{time},"cpu":1,"memory":2,"disk":3}}"#
        )
    }

    fn config(path: &std::path::Path) -> FileSourceConfig {
        FileSourceConfig {
            path: path.to_owned(),
            records: RecordKind::Heartbeats,
            follow: false,
            poll_interval: DurationMs(10),
            max_out_of_orderness: DurationMs(0),
            idle_timeout: DurationMs(1000),
        }
    }

    fn drain(source: &mut FileSource) -> Vec<SourceItem> {
        let mut out = Vec::new();
        while source.poll(&mut out, 7).unwrap() == SourceStatus::Ready {}
        out
    }

    #[test]
    fn every_line_read_once_whatever_the_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let mut file = File::create(&path).unwrap();
        for i in 0..301 {
            writeln!(file, "{}", beat(i, i as u64)).unwrap();
        }
        writeln!(file, "{{broken").unwrap();
        for peers in 1..=6 {
            let mut times = Vec::new();
            let mut bad = Vec::new();
            for index in 0..peers {
                let mut source = FileSource::open("f", &config(&path), index, peers).unwrap();
                for item in drain(&mut source) {
                    match item {
                        SourceItem::Record { record, .. } => times.push(record.event_time()),
                        SourceItem::Malformed { letter, .. } => bad.push(letter.position),
                    }
                }
            }
            times.sort();
            assert_eq!(times, (0..301).collect::<Vec<_>>(), "peers {peers}");
            assert_eq!(bad, vec![format!("{}:302", path.display())], "peers {peers}");
        }
    }

    #[test]
    fn follow_waits_for_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grow.jsonl");
        let mut file = File::create(&path).unwrap();
        let mut cfg = config(&path);
        cfg.follow = true;
        let mut source = FileSource::open("f", &cfg, 0, 1).unwrap();
        let mut out = Vec::new();
        assert!(matches!(source.poll(&mut out, 10).unwrap(), SourceStatus::Idle { .. }));
        let line = beat(1, 5);
        write!(file, "{}", &line[..10]).unwrap();
        file.flush().unwrap();
        assert!(matches!(source.poll(&mut out, 10).unwrap(), SourceStatus::Idle { .. }));
        assert!(out.is_empty());
        writeln!(file, "{}", &line[10..]).unwrap();
        file.flush().unwrap();
        source.poll(&mut out, 10).unwrap();
        assert_eq!(out.len(), 1);
    }
}
