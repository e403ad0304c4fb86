//! Live tables of a running pipeline, kept in Arrow for queries: each table is fed by one
//! operator output and knows up to which event time it is complete (its input frontier).
//! A query reads every table it touches as of one time, the largest that all of them have
//! completed, so it never sees half of a time's updates.
//!
//! Two kinds of table:
//! - a **collection** (a differential collection such as node_health's `status`): its
//!   current contents, a multiset of rows changed by `+1`/`-1` updates at event times;
//! - an **append** table (status changes, rollups, window and inference results, federated
//!   rounds): rows at their event times, kept for a retention (a number of rows or an
//!   event-time span) in Arrow record batches, readable as of any time within it.
//!
//! Updates at times not yet complete wait; once a time is complete in every table, the
//! collections fold it into their base (no query can ask for an earlier time).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow_array::{ArrayRef, RecordBatch, TimestampMillisecondArray};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use edgeflow_operators::EventTime;

/// One value of a row.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Cell {
    /// No value.
    Null,
    /// Text.
    Text(String),
    /// A signed integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A truth value.
    Bool(bool),
    /// An event time (ms since the Unix epoch), a UTC timestamp in Arrow.
    Time(EventTime),
}

impl Cell {
    /// A total order over cells of any kind (floats by their IEEE total order), so that rows
    /// can count in a multiset.
    fn rank(&self) -> u8 {
        match self {
            Cell::Null => 0,
            Cell::Text(_) => 1,
            Cell::Int(_) => 2,
            Cell::Float(_) => 3,
            Cell::Bool(_) => 4,
            Cell::Time(_) => 5,
        }
    }
}

impl Eq for Cell {}

impl PartialOrd for Cell {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cell {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Cell::Text(a), Cell::Text(b)) => a.cmp(b),
            (Cell::Int(a), Cell::Int(b)) => a.cmp(b),
            (Cell::Float(a), Cell::Float(b)) => a.total_cmp(b),
            (Cell::Bool(a), Cell::Bool(b)) => a.cmp(b),
            (Cell::Time(a), Cell::Time(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

/// A row: one cell per column of its table's schema.
pub type Row = Vec<Cell>;

/// The Arrow type of an event-time column.
pub fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// `rows` as one record batch of `schema` (column types: Utf8, Int64, Float64, Boolean or a
/// millisecond UTC timestamp); a cell of another kind than its column is an error.
pub fn to_batch(schema: &SchemaRef, rows: &[&Row]) -> Result<RecordBatch, ArrowError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (index, field) in schema.fields().iter().enumerate() {
        let cells = rows.iter().map(|row| row.get(index).unwrap_or(&Cell::Null));
        let wrong = |cell: &Cell| {
            ArrowError::InvalidArgumentError(format!(
                "column `{}` is {}, but a row has {cell:?}",
                field.name(),
                field.data_type()
            ))
        };
        let column: ArrayRef = match field.data_type() {
            DataType::Utf8 => {
                let mut builder = StringBuilder::new();
                for cell in cells {
                    match cell {
                        Cell::Text(text) => builder.append_value(text),
                        Cell::Null => builder.append_null(),
                        other => return Err(wrong(other)),
                    }
                }
                Arc::new(builder.finish())
            }
            DataType::Int64 => {
                let mut builder = Int64Builder::new();
                for cell in cells {
                    match cell {
                        Cell::Int(value) => builder.append_value(*value),
                        Cell::Null => builder.append_null(),
                        other => return Err(wrong(other)),
                    }
                }
                Arc::new(builder.finish())
            }
            DataType::Float64 => {
                let mut builder = Float64Builder::new();
                for cell in cells {
                    match cell {
                        Cell::Float(value) => builder.append_value(*value),
                        Cell::Null => builder.append_null(),
                        other => return Err(wrong(other)),
                    }
                }
                Arc::new(builder.finish())
            }
            DataType::Boolean => {
                let mut builder = BooleanBuilder::new();
                for cell in cells {
                    match cell {
                        Cell::Bool(value) => builder.append_value(*value),
                        Cell::Null => builder.append_null(),
                        other => return Err(wrong(other)),
                    }
                }
                Arc::new(builder.finish())
            }
            DataType::Timestamp(TimeUnit::Millisecond, zone) => {
                let mut builder = TimestampMillisecondBuilder::new().with_timezone_opt(zone.clone());
                for cell in cells {
                    match cell {
                        Cell::Time(time) => builder.append_value(i64::try_from(*time).unwrap_or(i64::MAX)),
                        Cell::Null => builder.append_null(),
                        other => return Err(wrong(other)),
                    }
                }
                Arc::new(builder.finish())
            }
            other => {
                return Err(ArrowError::NotYetImplemented(format!(
                    "column `{}` of type {other}: live tables hold text, integers, floats, booleans and times",
                    field.name()
                )))
            }
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns)
}

/// How long an append table keeps its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// The newest this many rows.
    Rows(usize),
    /// Rows whose time is within this many milliseconds of the table's complete time.
    Span(u64),
}

/// What a table holds.
#[derive(Debug)]
enum Contents {
    /// A differential collection: its rows as of `base_time` with their counts, and the
    /// updates after it.
    /// The base is a persistent map, so a query takes it in constant time under the lock
    /// and builds its batch outside.
    Collection {
        base: imbl::OrdMap<Row, isize>,
        pending: BTreeMap<EventTime, Vec<(Row, isize)>>,
        /// Joined to each row by its first column (a node's id): the latest of a keyed
        /// series at the time read (a node's latest heartbeat), `width` cells, null when
        /// none. Each key keeps its entries after the folded time and the last before it.
        latest: Option<Latest>,
    },
    /// Rows at event times: complete times in batches (time order, the time column first),
    /// times still open waiting.
    Append { batches: VecDeque<RecordBatch>, rows: usize, retention: Retention, open: BTreeMap<EventTime, Vec<Row>> },
}

/// The latest entry per key at every time a query can read (see `Contents::Collection`).
#[derive(Clone, Debug)]
struct Latest {
    entries: imbl::HashMap<String, imbl::OrdMap<EventTime, Row>>,
    width: usize,
}

impl Latest {
    /// The cells joined to rows of `key` as of `time`: its latest entry at or before then.
    fn cells(&self, key: &Cell, time: EventTime) -> Option<&Row> {
        let Cell::Text(key) = key else { return None };
        self.entries.get(key)?.range(..=time).next_back().map(|(_, row)| row)
    }
}

/// One live table.
#[derive(Debug)]
struct Table {
    schema: SchemaRef,
    contents: Contents,
    /// Every update at or before this time has arrived (`None`: none yet).
    complete: Option<EventTime>,
}

/// Why a table cannot be read as asked.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No such table.
    #[error("no table `{0}`")]
    Unknown(String),
    /// A table that has not completed any time yet.
    #[error("table `{0}` has no complete time yet: the pipeline has not got that far")]
    NotReady(String),
    /// A time past what the table has completed.
    #[error("table `{table}` is complete up to {complete}, not {asked}")]
    NotComplete {
        /// The table.
        table: String,
        /// Up to where it is complete.
        complete: EventTime,
        /// The time asked for.
        asked: EventTime,
    },
    /// A time before what a collection keeps.
    #[error("table `{table}` is a live collection, readable as of {oldest} or later, not {asked}")]
    TooOld {
        /// The table.
        table: String,
        /// The oldest time it can be read at.
        oldest: EventTime,
        /// The time asked for.
        asked: EventTime,
    },
    /// Rows that do not fit the table's schema (a bug in a table's feed).
    #[error("table `{table}`: {source}")]
    Arrow {
        /// The table.
        table: String,
        /// What Arrow said.
        source: ArrowError,
    },
}

/// The live tables of a pipeline (one per `serve.tables` entry).
#[derive(Debug, Default)]
pub struct Tables {
    tables: BTreeMap<String, Table>,
    /// Every collection has folded in its updates up to this time.
    folded: Option<EventTime>,
    /// Read holds: times promised to queries planned but not yet run (a Flight ticket's
    /// time), which the collections do not fold past until released or expired.
    holds: BTreeMap<u64, (EventTime, Instant)>,
    next_hold: u64,
}

/// A table as of one time, taken under the lock in constant time (collections) or
/// sharing the table's batches (append tables); [`Snapshot::batches`] builds its record
/// batches outside the lock.
#[derive(Debug)]
pub struct Snapshot {
    name: String,
    schema: SchemaRef,
    contents: SnapshotContents,
}

#[derive(Debug)]
enum SnapshotContents {
    Rows { base: imbl::OrdMap<Row, isize>, pending: Vec<(Row, isize)>, latest: Option<(Latest, EventTime)> },
    Batches(Vec<RecordBatch>),
}

impl Snapshot {
    /// The table's schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The table's rows as record batches of its schema.
    pub fn batches(self) -> Result<Vec<RecordBatch>, SnapshotError> {
        match self.contents {
            SnapshotContents::Batches(batches) => Ok(batches),
            SnapshotContents::Rows { mut base, pending, latest } => {
                for (row, diff) in pending {
                    apply(&mut base, row, diff);
                }
                let rows =
                    base.iter().flat_map(|(row, count)| std::iter::repeat_n(row, usize::try_from(*count).unwrap_or(0)));
                let arrow = |source| SnapshotError::Arrow { table: self.name.clone(), source };
                let batch = match latest {
                    None => to_batch(&self.schema, &rows.collect::<Vec<&Row>>()).map_err(arrow)?,
                    Some((latest, time)) => {
                        let joined: Vec<Row> = rows
                            .map(|row| {
                                let mut joined = row.clone();
                                match row.first().and_then(|key| latest.cells(key, time)) {
                                    Some(cells) => joined.extend(cells.iter().cloned()),
                                    None => joined.extend(std::iter::repeat_n(Cell::Null, latest.width)),
                                }
                                joined
                            })
                            .collect();
                        to_batch(&self.schema, &joined.iter().collect::<Vec<&Row>>()).map_err(arrow)?
                    }
                };
                Ok(vec![batch])
            }
        }
    }
}

impl Tables {
    /// Adds collection `name` with `schema` (empty).
    pub fn add_collection(&mut self, name: &str, schema: SchemaRef) {
        let contents = Contents::Collection { base: imbl::OrdMap::new(), pending: BTreeMap::new(), latest: None };
        self.tables.insert(name.to_owned(), Table { schema, contents, complete: None });
    }

    /// Adds collection `name` whose rows are joined, by their first column, with the latest
    /// entry of a keyed series at the time read (the last `width` columns of `schema`; see
    /// [`Tables::update_latest`]).
    pub fn add_collection_with_latest(&mut self, name: &str, schema: SchemaRef, width: usize) {
        let latest = Some(Latest { entries: imbl::HashMap::new(), width });
        let contents = Contents::Collection { base: imbl::OrdMap::new(), pending: BTreeMap::new(), latest };
        self.tables.insert(name.to_owned(), Table { schema, contents, complete: None });
    }

    /// Entries of collection `name`'s keyed series (key, time, cells): each is its key's
    /// latest from its time until a later one. Entries at complete times are dropped with
    /// an error log, as in [`Tables::update`].
    pub fn update_latest(&mut self, name: &str, entries: impl IntoIterator<Item = (String, EventTime, Row)>) {
        let folded = self.folded;
        let Some(table) = self.tables.get_mut(name) else { return };
        let complete = table.complete;
        let Contents::Collection { latest: Some(latest), .. } = &mut table.contents else { return };
        for (key, time, row) in entries {
            if complete.is_some_and(|complete| time <= complete) {
                tracing::error!(
                    table = name,
                    time,
                    "an entry at a complete time is dropped (a bug in the table's feed)"
                );
                continue;
            }
            let series = latest.entries.entry(key).or_default();
            series.insert(time, row);
            // Nothing reads before the folded time: keep only the last entry up to it.
            if let Some(folded) = folded {
                while series.range(..=folded).nth(1).is_some() {
                    let Some(&(oldest, _)) = series.get_min() else { break };
                    series.remove(&oldest);
                }
            }
        }
    }

    /// Adds append table `name` with `schema` (whose first column is the rows' event time)
    /// kept for `retention`.
    pub fn add_append(&mut self, name: &str, schema: SchemaRef, retention: Retention) {
        let contents = Contents::Append { batches: VecDeque::new(), rows: 0, retention, open: BTreeMap::new() };
        self.tables.insert(name.to_owned(), Table { schema, contents, complete: None });
    }

    /// The tables' names and schemas.
    pub fn schemas(&self) -> impl Iterator<Item = (&str, &SchemaRef)> {
        self.tables.iter().map(|(name, table)| (name.as_str(), &table.schema))
    }

    /// Updates of collection `name` (rows with their time and `+1`/`-1`), or rows of append
    /// table `name` at their times (the diff is ignored; a row counts once). Updates at
    /// complete times are a bug in the feed and are dropped with an error log.
    pub fn update(&mut self, name: &str, updates: impl IntoIterator<Item = (Row, EventTime, isize)>) {
        let Some(table) = self.tables.get_mut(name) else { return };
        let complete = table.complete;
        for (row, time, diff) in updates {
            if complete.is_some_and(|complete| time <= complete) {
                tracing::error!(
                    table = name,
                    time,
                    "an update at a complete time is dropped (a bug in the table's feed)"
                );
                continue;
            }
            match &mut table.contents {
                Contents::Collection { pending, .. } => pending.entry(time).or_default().push((row, diff)),
                Contents::Append { open, .. } => open.entry(time).or_default().push(row),
            }
        }
    }

    /// Table `name` is complete up to `time` (its input frontier has passed it): append rows
    /// up to it become batches, and the collections fold in what no query can go back to.
    pub fn advance(&mut self, name: &str, time: EventTime) -> Result<(), SnapshotError> {
        let Some(table) = self.tables.get_mut(name) else { return Err(SnapshotError::Unknown(name.to_owned())) };
        if table.complete.is_some_and(|complete| complete >= time) {
            return Ok(());
        }
        table.complete = Some(time);
        let schema = table.schema.clone();
        if let Contents::Append { batches, rows, retention, open } = &mut table.contents {
            let later = open.split_off(&time.saturating_add(1));
            let done = std::mem::replace(open, later);
            let done: Vec<Row> = done
                .into_iter()
                .flat_map(|(time, rows)| {
                    rows.into_iter().map(move |mut row| {
                        row.insert(0, Cell::Time(time));
                        row
                    })
                })
                .collect();
            if !done.is_empty() {
                let refs: Vec<&Row> = done.iter().collect();
                let batch = to_batch(&schema, &refs)
                    .map_err(|source| SnapshotError::Arrow { table: name.to_owned(), source })?;
                *rows += batch.num_rows();
                batches.push_back(batch);
            }
            retain(batches, rows, *retention, time);
        }
        self.fold();
        Ok(())
    }

    /// The least complete time over all tables (`None` while one has none).
    fn least_complete(&self) -> Option<EventTime> {
        self.tables.values().map(|table| table.complete).min().flatten()
    }

    /// Holds `time` readable (the collections do not fold past it) until released or
    /// `until`; the hold's number, for [`Tables::release`].
    pub fn hold(&mut self, time: EventTime, until: Instant) -> u64 {
        self.next_hold += 1;
        self.holds.insert(self.next_hold, (time, until));
        self.next_hold
    }

    /// Releases hold `id` (gone already if it expired).
    pub fn release(&mut self, id: u64) {
        self.holds.remove(&id);
        self.fold();
    }

    /// Folds each collection's updates up to the least complete time (or the earliest time
    /// held for a query) into its base: every query reads as of that time or later.
    fn fold(&mut self) {
        let now = Instant::now();
        self.holds.retain(|_, (_, until)| *until > now);
        let held = self.holds.values().map(|(time, _)| *time).min();
        let Some(least) = self.least_complete() else { return };
        let least = held.map_or(least, |held| least.min(held));
        if self.folded.is_some_and(|folded| folded >= least) {
            return;
        }
        self.folded = Some(least);
        for table in self.tables.values_mut() {
            if let Contents::Collection { base, pending, .. } = &mut table.contents {
                let later = pending.split_off(&least.saturating_add(1));
                for (row, diff) in std::mem::replace(pending, later).into_values().flatten() {
                    apply(base, row, diff);
                }
            }
        }
    }

    /// The time a query over `names` reads at: the largest time all of them have completed.
    pub fn as_of<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<EventTime, SnapshotError> {
        let mut least: Option<EventTime> = None;
        for name in names {
            let table = self.tables.get(name).ok_or_else(|| SnapshotError::Unknown(name.to_owned()))?;
            let complete = table.complete.ok_or_else(|| SnapshotError::NotReady(name.to_owned()))?;
            least = Some(least.map_or(complete, |least| least.min(complete)));
        }
        Ok(least.unwrap_or(0))
    }

    /// Table `name` as of `time` (at most its complete time; a collection also at least the
    /// time its base is at), to be built into batches outside the lock.
    pub fn read(&self, name: &str, time: EventTime) -> Result<Snapshot, SnapshotError> {
        let table = self.tables.get(name).ok_or_else(|| SnapshotError::Unknown(name.to_owned()))?;
        let complete = table.complete.ok_or_else(|| SnapshotError::NotReady(name.to_owned()))?;
        if time > complete {
            return Err(SnapshotError::NotComplete { table: name.to_owned(), complete, asked: time });
        }
        let contents = match &table.contents {
            Contents::Collection { base, pending, latest } => {
                let oldest = self.folded.unwrap_or(0);
                if time < oldest {
                    return Err(SnapshotError::TooOld { table: name.to_owned(), oldest, asked: time });
                }
                let pending = pending.range(..=time).flat_map(|(_, updates)| updates.iter().cloned()).collect();
                let latest = latest.as_ref().map(|latest| (latest.clone(), time));
                SnapshotContents::Rows { base: base.clone(), pending, latest }
            }
            Contents::Append { batches, .. } => {
                let mut out = Vec::new();
                for batch in batches {
                    let kept = rows_until(batch, time);
                    if kept == 0 {
                        break;
                    }
                    out.push(batch.slice(0, kept));
                    if kept < batch.num_rows() {
                        break;
                    }
                }
                SnapshotContents::Batches(out)
            }
        };
        Ok(Snapshot { name: name.to_owned(), schema: table.schema.clone(), contents })
    }

    /// Table `name` as of `time` as record batches of its schema ([`Tables::read`], then
    /// [`Snapshot::batches`]).
    pub fn snapshot(&self, name: &str, time: EventTime) -> Result<Vec<RecordBatch>, SnapshotError> {
        self.read(name, time)?.batches()
    }

    /// The time a query over every table reads at (for a query that names none).
    pub fn as_of_all(&self) -> Result<EventTime, SnapshotError> {
        let names: Vec<&str> = self.tables.keys().map(String::as_str).collect();
        self.as_of(names)
    }
}

/// Adds `diff` copies of `row` to a multiset; a count of zero goes.
fn apply(rows: &mut imbl::OrdMap<Row, isize>, row: Row, diff: isize) {
    let count = rows.get(&row).copied().unwrap_or(0) + diff;
    if count == 0 {
        rows.remove(&row);
    } else {
        rows.insert(row, count);
    }
}

/// How many of `batch`'s rows (sorted by their time, the first column) are at or before
/// `time`.
fn rows_until(batch: &RecordBatch, time: EventTime) -> usize {
    let Some(times) = batch.column(0).as_any().downcast_ref::<TimestampMillisecondArray>() else { return 0 };
    let time = i64::try_from(time).unwrap_or(i64::MAX);
    times.values().partition_point(|t| *t <= time)
}

/// Drops the oldest rows beyond `retention` (whole batches, then the front of one).
fn retain(batches: &mut VecDeque<RecordBatch>, rows: &mut usize, retention: Retention, complete: EventTime) {
    match retention {
        Retention::Rows(limit) => {
            while *rows > limit {
                let Some(front) = batches.front_mut() else { break };
                let excess = *rows - limit;
                if front.num_rows() <= excess {
                    *rows -= front.num_rows();
                    batches.pop_front();
                } else {
                    *front = front.slice(excess, front.num_rows() - excess);
                    *rows -= excess;
                }
            }
        }
        Retention::Span(span) => {
            let oldest = complete.saturating_sub(span);
            while let Some(front) = batches.front_mut() {
                let before = rows_until(front, oldest.saturating_sub(1));
                if oldest == 0 || before == 0 {
                    break;
                }
                *rows -= before;
                if before == front.num_rows() {
                    batches.pop_front();
                } else {
                    *front = front.slice(before, front.num_rows() - before);
                    break;
                }
            }
        }
    }
}

/// A schema whose first column is the rows' event time (`time`, not null), followed by
/// `fields`.
pub fn append_schema(fields: Vec<Field>) -> SchemaRef {
    let mut all = vec![Field::new("time", time_type(), false)];
    all.extend(fields);
    Arc::new(Schema::new(all))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, StringArray};

    fn text(value: &str) -> Cell {
        Cell::Text(value.to_owned())
    }

    fn nodes_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("node_id", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
        ]))
    }

    fn column(batches: &[RecordBatch], index: usize) -> Vec<String> {
        batches
            .iter()
            .flat_map(|batch| {
                let array = batch.column(index).as_any().downcast_ref::<StringArray>().unwrap().clone();
                (0..array.len()).map(move |i| array.value(i).to_owned())
            })
            .collect()
    }

    /// A collection read as of a time sees exactly the updates up to it, across tables
    /// completed to different times, and never half of a time.
    #[test]
    fn a_query_reads_every_table_as_of_the_time_all_have_completed() {
        let mut tables = Tables::default();
        tables.add_collection("nodes", nodes_schema());
        tables.add_append(
            "changes",
            append_schema(vec![Field::new("node_id", DataType::Utf8, false)]),
            Retention::Rows(100),
        );
        assert!(matches!(tables.as_of(["nodes"]), Err(SnapshotError::NotReady(name)) if name == "nodes"));
        tables.update("nodes", [(vec![text("a"), text("healthy")], 10, 1), (vec![text("b"), text("healthy")], 10, 1)]);
        tables.update("changes", [(vec![text("a")], 10, 1), (vec![text("b")], 10, 1)]);
        // At 20, `a` goes unhealthy: a retraction and an insertion at the same time.
        tables
            .update("nodes", [(vec![text("a"), text("healthy")], 20, -1), (vec![text("a"), text("unhealthy")], 20, 1)]);
        tables.update("changes", [(vec![text("a")], 20, 1)]);
        tables.advance("nodes", 25).unwrap();
        tables.advance("changes", 15).unwrap();
        // `changes` has completed only 15: a query over both reads as of 15.
        let at = tables.as_of(["nodes", "changes"]).unwrap();
        assert_eq!(at, 15);
        assert_eq!(column(&tables.snapshot("nodes", at).unwrap(), 1), ["healthy", "healthy"]);
        assert_eq!(column(&tables.snapshot("changes", at).unwrap(), 1), ["a", "b"]);
        // Over `nodes` alone: as of 25, with both updates of time 20.
        let at = tables.as_of(["nodes"]).unwrap();
        assert_eq!(column(&tables.snapshot("nodes", at).unwrap(), 1), ["unhealthy", "healthy"]);
        assert!(matches!(tables.snapshot("nodes", 26), Err(SnapshotError::NotComplete { complete: 25, .. })));
        tables.advance("changes", 30).unwrap();
        assert_eq!(tables.as_of(["nodes", "changes"]).unwrap(), 25);
        assert_eq!(column(&tables.snapshot("changes", 25).unwrap(), 1), ["a", "b", "a"]);
        // Folded up to 25 now: a collection cannot go back before it.
        assert!(matches!(tables.snapshot("nodes", 15), Err(SnapshotError::TooOld { oldest: 25, .. })));
        // An append table can, within its retention.
        assert_eq!(column(&tables.snapshot("changes", 15).unwrap(), 1), ["a", "b"]);
    }

    /// Append tables keep their newest rows, by count or by event-time span.
    #[test]
    fn append_tables_keep_rows_for_their_retention() {
        let schema = append_schema(vec![Field::new("node_id", DataType::Utf8, false)]);
        let mut tables = Tables::default();
        tables.add_append("by_rows", schema.clone(), Retention::Rows(3));
        tables.add_append("by_span", schema, Retention::Span(100));
        for time in [100u64, 150, 200, 250, 300] {
            for name in ["by_rows", "by_span"] {
                tables.update(name, [(vec![text(&format!("n{time}"))], time, 1)]);
                tables.advance(name, time).unwrap();
            }
        }
        assert_eq!(column(&tables.snapshot("by_rows", 300).unwrap(), 1), ["n200", "n250", "n300"]);
        assert_eq!(column(&tables.snapshot("by_span", 300).unwrap(), 1), ["n200", "n250", "n300"]);
        assert_eq!(column(&tables.snapshot("by_span", 260).unwrap(), 1), ["n200", "n250"]);
        let batches = tables.snapshot("by_rows", 300).unwrap();
        let times = batches[0].column(0).as_any().downcast_ref::<TimestampMillisecondArray>().unwrap();
        assert_eq!(times.value(0), 200);
        assert_eq!(batches[0].schema().field(0).data_type(), &time_type());
    }

    /// A collection joined with its keys' latest entries: each row gets its key's latest
    /// entry at or before the time read (nulls before the first), and older entries go once
    /// no query can read them.
    #[test]
    fn rows_are_joined_with_their_latest_entry_at_the_time_read() {
        let mut tables = Tables::default();
        let schema = Arc::new(Schema::new(vec![
            Field::new("node_id", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("seen", DataType::Utf8, true),
        ]));
        tables.add_collection_with_latest("nodes", schema, 1);
        tables.update("nodes", [(vec![text("a"), text("healthy")], 10, 1), (vec![text("b"), text("healthy")], 10, 1)]);
        tables.update_latest(
            "nodes",
            [("a".to_owned(), 10, vec![text("a@10")]), ("a".to_owned(), 15, vec![text("a@15")])],
        );
        tables.update_latest("nodes", [("b".to_owned(), 12, vec![text("b@12")])]);
        tables.advance("nodes", 11).unwrap();
        let seen = |tables: &Tables, time| -> Vec<Option<String>> {
            let batches = tables.snapshot("nodes", time).unwrap();
            let array = batches[0].column(2).as_any().downcast_ref::<StringArray>().unwrap().clone();
            (0..array.len()).map(|i| array.is_valid(i).then(|| array.value(i).to_owned())).collect()
        };
        assert_eq!(seen(&tables, 11), [Some("a@10".to_owned()), None]);
        tables.advance("nodes", 20).unwrap();
        assert_eq!(seen(&tables, 20), [Some("a@15".to_owned()), Some("b@12".to_owned())]);
        // Folded to 20: a later entry of `a` drops the ones no query can read any more.
        tables.update_latest("nodes", [("a".to_owned(), 25, vec![text("a@25")])]);
        let Contents::Collection { latest: Some(latest), .. } = &tables.tables["nodes"].contents else { panic!() };
        assert_eq!(latest.entries["a"].keys().copied().collect::<Vec<_>>(), [15, 25]);
        tables.advance("nodes", 30).unwrap();
        assert_eq!(seen(&tables, 30), [Some("a@25".to_owned()), Some("b@12".to_owned())]);
    }

    /// Updates at a time already complete are refused, not applied to a past snapshot.
    #[test]
    fn updates_at_complete_times_do_not_change_the_past() {
        let mut tables = Tables::default();
        tables.add_collection("nodes", nodes_schema());
        tables.update("nodes", [(vec![text("a"), text("healthy")], 10, 1)]);
        tables.advance("nodes", 10).unwrap();
        tables.update("nodes", [(vec![text("b"), text("healthy")], 5, 1)]);
        assert_eq!(column(&tables.snapshot("nodes", 10).unwrap(), 0), ["a"]);
    }

    /// A cell of the wrong kind for its column is an error that names the column.
    #[test]
    fn a_cell_of_the_wrong_kind_is_an_error_naming_the_column() {
        let row = vec![text("a"), Cell::Int(3)];
        let err = to_batch(&nodes_schema(), &[&row]).unwrap_err().to_string();
        assert!(err.contains("column `status` is Utf8"), "{err}");
    }
}
