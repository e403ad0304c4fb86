use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use edgeflow_operators::time::FutureBound;
use edgeflow_operators::{DeadLetter, DurationMs, EventTime, RecordKind};
use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Position, Source, SourceItem, SourceStatus};

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
    /// How far ahead of the wall clock a record's event time may be (default 5m). A record
    /// further ahead goes to the dead-letter output with the reason, before it can move the
    /// watermark (one bad clock would make every later record late).
    #[serde(default = "defaults::max_future")]
    pub max_future: DurationMs,
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
    pub fn max_future() -> DurationMs {
        DurationMs(edgeflow_operators::time::DEFAULT_MAX_FUTURE_MS)
    }
}

/// Longest line a file source reads (16 MiB): a longer one is a dead letter, not an
/// allocation as large as the file.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Lines per block when several workers share a file.
const STRIDE: u64 = 64;

/// The event clock of one file read by several workers of one process: the latest event
/// time of each block of lines, published by the worker that decodes the block. Workers
/// decode their blocks in parallel (up to 64 blocks ahead of what they can hand on), but a
/// worker hands a block's records on only once every earlier block is published, each with
/// the latest event time of all lines before it, whoever decoded them:
/// the watermark, lateness and the times of dead letters are those of a single reader,
/// whatever the number of workers. (Workers in other processes cannot share it; a cluster
/// reads with each worker's own clock.)
#[derive(Clone, Debug, Default)]
pub struct FileClock(std::sync::Arc<std::sync::Mutex<FileClockState>>);

#[derive(Debug, Default)]
struct FileClockState {
    /// Latest event time of each decoded block (`None`: no record in it), until every
    /// reader has folded it into its clock.
    blocks: std::collections::BTreeMap<u64, Option<EventTime>>,
    /// Per reader, the first block it has not folded yet.
    folded: std::collections::BTreeMap<u64, u64>,
}

impl FileClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, FileClockState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A reader's side of a [`FileClock`].
#[derive(Debug)]
struct SharedClock {
    clock: FileClock,
    /// The latest event time of every line emitted so far (a single reader's clock).
    running: Option<EventTime>,
    /// The first block not folded into `running`.
    next_fold: u64,
    /// Own blocks decoded and not emitted yet, oldest first: each block's items with their
    /// records' event times, and its latest event time.
    pending: std::collections::VecDeque<PendingBlock>,
    /// The own block being decoded (the last of `pending`), until it is published.
    open_block: Option<u64>,
}

/// An own block decoded ahead of the clock.
#[derive(Debug)]
struct PendingBlock {
    block: u64,
    items: Vec<(SourceItem, Option<EventTime>)>,
    max: Option<EventTime>,
}

/// Own blocks a reader decodes ahead of the slowest one before it waits.
const AHEAD: usize = 64;

/// Reads JSON heartbeats from a file (or follows it). When several workers read one file,
/// each reads every line but decodes only its blocks of lines, so decoding runs in parallel
/// while every worker's event clock advances through the file at the same pace (with a
/// shared [`FileClock`], at exactly the pace of a single reader).
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
    future: FutureBound,
    shared: Option<SharedClock>,
}

impl FileSource {
    /// The part of `config.path` that worker `index` of `peers` reads.
    pub fn open(name: &str, config: &FileSourceConfig, index: usize, peers: usize) -> Result<Self, ConnectorError> {
        Self::open_core(name, config, index, peers, false)
    }

    /// The whole of `config.path` on worker 0 (the other workers read nothing): one reader,
    /// whose position is one byte offset, so that a checkpointed run resumes from it on any
    /// number of workers.
    pub fn open_single(name: &str, config: &FileSourceConfig, index: usize) -> Result<Self, ConnectorError> {
        Self::open_core(name, config, index, 1, true)
    }

    fn open_core(
        name: &str,
        config: &FileSourceConfig,
        index: usize,
        peers: usize,
        single: bool,
    ) -> Result<Self, ConnectorError> {
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
            future: FutureBound::new(config.max_future.as_millis()),
            shared: None,
        };
        if config.follow || single {
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

    /// Shares the file's event clock with the other workers of this process that read it
    /// (every worker of the run must be in this process).
    pub fn with_shared_clock(mut self, clock: &FileClock) -> Self {
        if self.peers > 1 && self.reader.is_some() {
            // Every reader counts from the start, even one whose source opens later: a block
            // is forgotten only once all of them have folded it.
            let mut state = clock.lock();
            for reader in 0..self.peers {
                state.folded.entry(reader).or_insert(0);
            }
            drop(state);
            self.shared = Some(SharedClock {
                clock: clock.clone(),
                running: None,
                next_fold: 0,
                pending: std::collections::VecDeque::new(),
                open_block: None,
            });
        }
        self
    }

    fn own(&self, block: u64) -> bool {
        block % self.peers == self.index
    }

    /// Shared clock, at the first line of `block`: publishes the own block decoded before it.
    fn publish_before(&mut self, block: u64) {
        let Some(shared) = self.shared.as_mut() else { return };
        if let Some(finished) = shared.open_block.filter(|b| *b < block) {
            let max = shared.pending.back().and_then(|p| p.max);
            shared.clock.lock().blocks.insert(finished, max);
            shared.open_block = None;
        }
    }

    /// Shared clock, at the first line of `block`: opens a pending block if `block` is this
    /// reader's. False when this reader is [`AHEAD`] blocks ahead of what it could emit: then
    /// the line must wait.
    fn enter_block(&mut self, block: u64) -> bool {
        let own = self.own(block);
        let Some(shared) = self.shared.as_mut() else { return true };
        if !own {
            return true;
        }
        if shared.pending.len() >= AHEAD {
            return false;
        }
        shared.pending.push_back(PendingBlock { block, items: Vec::new(), max: None });
        shared.open_block = Some(block);
        true
    }

    /// Hands a decoded item on: at once with a reader of its own, else into the pending
    /// block (`time`: its record's event time).
    fn hand(&mut self, out: &mut Vec<SourceItem>, item: SourceItem, time: Option<EventTime>) {
        match self.shared.as_mut().and_then(|shared| shared.pending.back_mut()) {
            Some(pending) => {
                pending.max = pending.max.max(time);
                pending.items.push((item, time));
            }
            None => out.push(item),
        }
    }

    /// Shared clock: emits every complete pending block whose earlier blocks are all
    /// published, each item with a single reader's clock at its line.
    fn emit_ready(&mut self, out: &mut Vec<SourceItem>) {
        let (index, peers) = (self.index, self.peers);
        let Some(shared) = self.shared.as_mut() else { return };
        let mut state = shared.clock.lock();
        while let Some(front) = shared.pending.front() {
            if shared.open_block == Some(front.block) {
                break;
            }
            let block = front.block;
            while shared.next_fold < block {
                let fold = shared.next_fold;
                if fold % peers != index {
                    let Some(max) = state.blocks.get(&fold) else { return };
                    shared.running = shared.running.max(*max);
                }
                shared.next_fold += 1;
            }
            let Some(front) = shared.pending.pop_front() else { break };
            for (mut item, time) in front.items {
                shared.running = shared.running.max(time);
                match &mut item {
                    SourceItem::Record { clock, .. } => *clock = shared.running.unwrap_or(*clock),
                    SourceItem::Malformed { clock, .. } | SourceItem::Future { clock, .. } => *clock = shared.running,
                }
                out.push(item);
            }
            shared.next_fold = block + 1;
            state.folded.insert(index, shared.next_fold);
            // Blocks every reader has folded are forgotten.
            let low = state.folded.values().copied().min().unwrap_or(0);
            state.blocks = state.blocks.split_off(&low);
        }
    }

    /// At the end of the file: publishes the own block being decoded.
    fn finish(&mut self) {
        if let Some(shared) = self.shared.as_mut() {
            if let Some(block) = shared.open_block.take() {
                let max = shared.pending.back().and_then(|p| p.max);
                shared.clock.lock().blocks.insert(block, max);
            }
        }
    }

    /// Whether decoded items still wait for the clock.
    fn waiting(&self) -> bool {
        self.shared.as_ref().is_some_and(|shared| !shared.pending.is_empty())
    }
}

impl Source for FileSource {
    fn position(&mut self) -> Option<Position> {
        // Only one reader has a position (see `open_single`); decoded blocks waiting for a
        // shared clock are not read as far as a checkpoint is concerned.
        (self.peers == 1 && self.shared.is_none()).then_some(Position::File {
            offset: self.offset,
            line: self.line,
            index: self.index,
            peers: self.peers,
        })
    }

    fn resume(&mut self, saved: &[Position]) -> Result<(), ConnectorError> {
        let Some(reader) = self.reader.as_mut() else { return Ok(()) };
        let found = saved.iter().find_map(|position| match position {
            Position::File { offset, line, peers: 1, .. } => Some((*offset, *line)),
            _ => None,
        });
        let Some((offset, line)) = found else {
            return Err(ConnectorError::Config {
                connector: "file",
                reason: format!("source `{}`: the checkpoint has no position of a single file reader", self.name),
            });
        };
        reader
            .seek(SeekFrom::Start(offset))
            .map_err(|source| ConnectorError::Read { path: self.shown.clone(), source })?;
        (self.offset, self.line) = (offset, line);
        tracing::info!(source = %self.name, offset, line, "resumed from the checkpoint's position");
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError> {
        self.emit_ready(out);
        if self.reader.is_none() {
            // With a shared clock, decoded blocks may still wait for earlier ones.
            return Ok(if self.waiting() { SourceStatus::Ready } else { SourceStatus::Exhausted });
        }
        self.future.refresh();
        let mut produced = 0;
        loop {
            let at_block_start = (self.line - 1).is_multiple_of(STRIDE);
            if at_block_start {
                self.publish_before((self.line - 1) / STRIDE);
            }
            // With a shared clock a poll ends only between blocks, every block it read
            // published: a worker that then waits (for the sinks, say) holds back no one.
            if produced >= max && (at_block_start || self.shared.is_none()) {
                break;
            }
            if at_block_start && !self.enter_block((self.line - 1) / STRIDE) {
                // Far ahead of a slower reader: come back at once (not idle, which would let
                // the watermark follow the wall clock).
                break;
            }
            let Some(reader) = self.reader.as_mut() else { break };
            self.buffer.clear();
            let read = read_line(reader, &mut self.buffer)
                .map_err(|source| ConnectorError::Read { path: self.shown.clone(), source })?;
            if read.consumed == 0 {
                if self.follow {
                    return Ok(SourceStatus::Idle { retry_in_ms: self.poll_interval });
                }
                self.finish();
                self.reader = None;
                self.emit_ready(out);
                return Ok(if self.waiting() { SourceStatus::Ready } else { SourceStatus::Exhausted });
            }
            if self.follow && !read.ended {
                // A line still being written: read it again once it is complete.
                reader
                    .seek(SeekFrom::Start(self.offset))
                    .map_err(|source| ConnectorError::Read { path: self.shown.clone(), source })?;
                return Ok(SourceStatus::Idle { retry_in_ms: self.poll_interval });
            }
            self.offset += read.consumed as u64;
            let line = self.line;
            self.line += 1;

            if !self.own((line - 1) / STRIDE) {
                continue;
            }
            if read.overlong {
                self.buffer.truncate(MAX_LINE_BYTES);
            }
            let mut text = trim_line(&self.buffer);
            if line == 1 {
                // A UTF-8 byte-order mark, as some editors on Windows write.
                text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
            }
            if text.is_empty() {
                continue;
            }
            produced += 1;
            let letter = |reason, payload: &[u8]| DeadLetter {
                source: self.name.clone(),
                position: format!("{}:{line}", self.shown),
                reason,
                payload: payload.to_vec(),
            };
            let (item, time) = if read.overlong {
                let reason = format!("line is longer than {MAX_LINE_BYTES} bytes (its first {MAX_LINE_BYTES} kept)");
                (SourceItem::Malformed { letter: letter(reason, text), clock: None }, None)
            } else {
                let decoded = self.records.decode(text).map_err(|err| (err.to_string(), false)).and_then(|record| {
                    self.future.check(record.event_time()).map(|()| record).map_err(|err| (err.to_string(), true))
                });
                match decoded {
                    Ok(record) => {
                        let clock = record.event_time();
                        (SourceItem::Record { record, clock }, Some(clock))
                    }
                    Err((reason, true)) => (SourceItem::Future { letter: letter(reason, text), clock: None }, None),
                    Err((reason, false)) => (SourceItem::Malformed { letter: letter(reason, text), clock: None }, None),
                }
            };
            self.hand(out, item, time);
        }
        self.emit_ready(out);
        Ok(SourceStatus::Ready)
    }
}

/// What [`read_line`] read.
struct Line {
    /// Bytes consumed from the file (the whole line, even the part not kept).
    consumed: usize,
    /// Whether the line ended with a newline (else: end of file so far).
    ended: bool,
    /// Whether it was longer than [`MAX_LINE_BYTES`] (only that much was kept).
    overlong: bool,
}

/// Reads one line into `buffer`, keeping at most [`MAX_LINE_BYTES`] of it plus the newline;
/// the rest of a longer line is consumed and dropped, so the next read starts at the next
/// line.
fn read_line(reader: &mut impl BufRead, buffer: &mut Vec<u8>) -> std::io::Result<Line> {
    let mut line = Line { consumed: 0, ended: false, overlong: false };
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            return Ok(line);
        }
        let (take, ended) = match memchr::memchr(b'\n', available) {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        let room = (MAX_LINE_BYTES + 1).saturating_sub(buffer.len());
        line.overlong |= take > room;
        buffer.extend_from_slice(&available[..take.min(room)]);
        reader.consume(take);
        line.consumed += take;
        if ended {
            line.ended = true;
            return Ok(line);
        }
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
            max_future: defaults::max_future(),
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
                        SourceItem::Future { letter, .. } => panic!("no record is in the future: {letter:?}"),
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

    fn items(path: &std::path::Path) -> Vec<SourceItem> {
        drain(&mut FileSource::open("f", &config(path), 0, 1).unwrap())
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bom.jsonl");
        std::fs::write(&path, format!("\u{feff}{}\n{}\n", beat(1, 5), beat(2, 6))).unwrap();
        let items = items(&path);
        assert!(items.iter().all(|i| matches!(i, SourceItem::Record { .. })), "{items:?}");
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn an_overlong_line_is_a_dead_letter_and_the_next_line_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.jsonl");
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).unwrap();
        writeln!(file).unwrap();
        writeln!(file, "{}", beat(1, 5)).unwrap();
        drop(file);
        let items = items(&path);
        assert_eq!(items.len(), 2, "{:?}", items.iter().map(std::mem::discriminant).collect::<Vec<_>>());
        let SourceItem::Malformed { letter, .. } = &items[0] else { panic!("first item: not a dead letter") };
        assert!(letter.reason.contains("longer than 16777216 bytes"), "{}", letter.reason);
        assert_eq!(letter.payload.len(), MAX_LINE_BYTES, "the kept part is bounded");
        assert!(matches!(&items[1], SourceItem::Record { record, .. } if record.event_time() == 5));
    }

    #[test]
    fn a_record_far_in_the_future_is_refused_before_it_moves_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.jsonl");
        let now = crate::wall_clock_ms();
        let year_ahead = now + 365 * 86_400_000;
        let lines =
            [beat(1, now), beat(2, year_ahead), beat(3, 253_402_300_799_999), beat(4, u64::MAX), beat(5, now + 1)];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let items = items(&path);
        let kinds: Vec<&str> = items
            .iter()
            .map(|item| match item {
                SourceItem::Record { .. } => "record",
                SourceItem::Malformed { .. } => "malformed",
                SourceItem::Future { .. } => "future",
            })
            .collect();
        assert_eq!(kinds, ["record", "future", "future", "malformed", "record"]);
        let SourceItem::Future { letter, .. } = &items[1] else { unreachable!("checked above") };
        assert!(
            letter.reason.contains("ahead of the wall clock") && letter.reason.contains("max_future"),
            "{}",
            letter.reason
        );
        assert_eq!(letter.position, format!("{}:2", path.display()));
        let SourceItem::Malformed { letter, .. } = &items[3] else { unreachable!("checked above") };
        assert!(letter.reason.contains("past the latest event time"), "{}", letter.reason);
    }

    #[test]
    fn a_json_array_is_not_a_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("array.jsonl");
        std::fs::write(&path, "[\"n1\",\"eu\",1,2,5,1,2,3]\n").unwrap();
        let items = items(&path);
        let SourceItem::Malformed { letter, .. } = &items[0] else { panic!("{items:?}") };
        assert_eq!(letter.reason, "invalid heartbeat JSON: expected an object, found an array");
    }

    /// Workers sharing a file's clock hand every record on with the clock a single reader
    /// gives it, even when one worker's source opens after the others have run ahead (they
    /// used to forget blocks it still needed, and it spun forever).
    #[test]
    fn a_shared_clock_gives_a_single_readers_clock_to_late_joiners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.jsonl");
        let lines: Vec<String> = (0..1000u64).map(|i| beat(i as usize % 7, (i * 7919) % 5000)).collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let single: Vec<(u64, u64)> = items(&path)
            .into_iter()
            .filter_map(|item| match item {
                SourceItem::Record { record, clock } => Some((record.event_time(), clock)),
                _ => None,
            })
            .collect();
        let reference: Vec<u64> = single
            .iter()
            .scan(0, |max, (_, clock)| {
                *max = (*max).max(*clock);
                Some(*max)
            })
            .collect();
        let clock = FileClock::default();
        let open = |index| FileSource::open("f", &config(&path), index, 3).unwrap().with_shared_clock(&clock);
        let (mut first, mut second) = (open(0), open(1));
        let mut out = Vec::new();
        for _ in 0..50 {
            first.poll(&mut out, 100).unwrap();
            second.poll(&mut out, 100).unwrap();
        }
        let mut late = open(2);
        let mut rounds = 0;
        let mut done = [false; 3];
        while done.iter().any(|d| !d) {
            rounds += 1;
            assert!(rounds < 10_000, "the readers made no progress");
            for (i, source) in [&mut first, &mut second, &mut late].into_iter().enumerate() {
                if !done[i] {
                    done[i] = source.poll(&mut out, 100).unwrap() == SourceStatus::Exhausted;
                }
            }
        }
        let mut shared: Vec<(u64, u64)> = out
            .into_iter()
            .filter_map(|item| match item {
                SourceItem::Record { record, clock } => Some((record.event_time(), clock)),
                _ => None,
            })
            .collect();
        assert_eq!(shared.len(), 1000);
        // Each record's clock is the single reader's running maximum at that record.
        let mut expected: Vec<(u64, u64)> = single.iter().map(|(t, _)| *t).zip(reference).collect();
        shared.sort_unstable();
        expected.sort_unstable();
        assert_eq!(shared, expected);
    }
}
