//! Tumbling and sliding event-time windows over a key, with count, sum, mean, min and max.
//!
//! A window's result is emitted once, when the input frontier passes its end. Records apply
//! in the order of their times once each time is complete, and windows ending before a time
//! close before its records apply, so the results do not depend on when records arrive nor on
//! the number of workers. A record whose window already closed (only possible under the late
//! policy `update`, which lets late records into the dataflow at the current watermark)
//! produces a corrected result for that window and key at once, with `revision` incremented
//! (or `0` if the key had no result in that window), as long as the window is within
//! `allowed_lateness`; later than that it is counted and left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::records::{Gauge, Heartbeat, WindowResult};
use crate::state::{Entry, StateHandle};
use crate::{route_hash, DurationMs, EventTime};

/// Which heartbeat field identifies the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowKey {
    /// Group by node id.
    NodeId,
    /// Group by region.
    Region,
    /// Group by the value of a label (records without the label are grouped under "").
    Label(String),
}

/// Which heartbeat field is aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowField {
    /// CPU percent.
    Cpu,
    /// Memory percent.
    Memory,
    /// Disk percent.
    Disk,
    /// Bytes received.
    NetRxBytes,
    /// Bytes sent.
    NetTxBytes,
    /// Capacity in cores.
    Capacity,
}

impl WindowField {
    /// The field's value in `heartbeat`.
    pub fn read(self, heartbeat: &Heartbeat) -> f64 {
        match self {
            WindowField::Cpu => heartbeat.cpu,
            WindowField::Memory => heartbeat.memory,
            WindowField::Disk => heartbeat.disk,
            WindowField::NetRxBytes => heartbeat.net_rx_bytes as f64,
            WindowField::NetTxBytes => heartbeat.net_tx_bytes as f64,
            WindowField::Capacity => heartbeat.capacity,
        }
    }
}

/// An aggregate function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Number of records (always reported).
    Count,
    /// Sum of the field.
    Sum,
    /// Mean of the field.
    Mean,
    /// Minimum of the field.
    Min,
    /// Maximum of the field.
    Max,
}

/// YAML configuration of the `window_aggregate` operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowAggregateConfig {
    /// What to group by: `node_id`, `region`, or `{label: NAME}`.
    #[serde(default = "default_key")]
    pub key: WindowKey,
    /// The field to aggregate (default `cpu`).
    #[serde(default = "default_field")]
    pub field: WindowField,
    /// Window length, e.g. `10s`.
    pub window: DurationMs,
    /// Distance between window starts for sliding windows; defaults to `window` (tumbling).
    /// `window` must be a whole multiple of it.
    #[serde(default)]
    pub slide: Option<DurationMs>,
    /// Aggregates to report (default all of count, sum, mean, min, max).
    #[serde(default = "default_aggregates")]
    pub aggregates: Vec<Aggregate>,
    /// How long after a window's end a late record may still correct it (late policy
    /// `update` only; default one window length).
    #[serde(default)]
    pub allowed_lateness: Option<DurationMs>,
}

fn default_key() -> WindowKey {
    WindowKey::NodeId
}
fn default_field() -> WindowField {
    WindowField::Cpu
}
fn default_aggregates() -> Vec<Aggregate> {
    vec![Aggregate::Count, Aggregate::Sum, Aggregate::Mean, Aggregate::Min, Aggregate::Max]
}

/// A window parameter that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("`window` must be longer than 0ms")]
    ZeroWindow,
    #[error("`slide` ({slide}) must be longer than 0ms and no longer than `window` ({window})")]
    BadSlide { slide: DurationMs, window: DurationMs },
    #[error("`window` ({window}) must be a whole multiple of `slide` ({slide})")]
    NotMultiple { slide: DurationMs, window: DurationMs },
    #[error("`aggregates` is empty; list at least one of count, sum, mean, min, max")]
    NoAggregates,
    #[error("`window` ({window}) over `slide` ({slide}) puts every record in {windows} windows; at most {max} are allowed (use a longer slide)")]
    TooManyWindows { slide: DurationMs, window: DurationMs, windows: u64, max: u64 },
}

impl crate::params::FieldError for WindowError {
    fn field(&self) -> &str {
        match self {
            WindowError::ZeroWindow | WindowError::NotMultiple { .. } => "window",
            WindowError::BadSlide { .. } => "slide",
            WindowError::NoAggregates => "aggregates",
            WindowError::TooManyWindows { .. } => "window",
        }
    }
}

/// Most windows a record may fall in (`window / slide`): each one costs an accumulator per
/// key, so a slide far shorter than the window would exhaust memory with a few records.
pub const MAX_WINDOWS_PER_RECORD: u64 = 1000;

/// Validated window parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowParams {
    size: u64,
    slide: u64,
    lateness: u64,
    aggregates: BTreeSet<Aggregate>,
}

impl WindowParams {
    /// Checks a window of `window` length every `slide`.
    pub fn try_new(
        window: DurationMs,
        slide: Option<DurationMs>,
        aggregates: &[Aggregate],
        allowed_lateness: Option<DurationMs>,
    ) -> Result<Self, WindowError> {
        let size = window.as_millis();
        if size == 0 {
            return Err(WindowError::ZeroWindow);
        }
        let slide_ms = slide.map_or(size, DurationMs::as_millis);
        if slide_ms == 0 || slide_ms > size {
            return Err(WindowError::BadSlide { slide: DurationMs(slide_ms), window });
        }
        if !size.is_multiple_of(slide_ms) {
            return Err(WindowError::NotMultiple { slide: DurationMs(slide_ms), window });
        }
        if size / slide_ms > MAX_WINDOWS_PER_RECORD {
            return Err(WindowError::TooManyWindows {
                slide: DurationMs(slide_ms),
                window,
                windows: size / slide_ms,
                max: MAX_WINDOWS_PER_RECORD,
            });
        }
        if aggregates.is_empty() {
            return Err(WindowError::NoAggregates);
        }
        Ok(Self {
            size,
            slide: slide_ms,
            lateness: allowed_lateness.map_or(size, DurationMs::as_millis),
            aggregates: aggregates.iter().copied().collect(),
        })
    }

    /// From the YAML configuration.
    pub fn from_config(config: &WindowAggregateConfig) -> Result<Self, WindowError> {
        Self::try_new(config.window, config.slide, &config.aggregates, config.allowed_lateness)
    }

    /// Ends of the windows containing `time`, earliest first.
    pub fn window_ends(&self, time: EventTime) -> impl Iterator<Item = EventTime> + '_ {
        let last_start = time - time % self.slide;
        let count = self.size / self.slide;
        (0..count)
            .rev()
            .filter_map(move |back| last_start.checked_sub(back * self.slide))
            .map(move |start| start.saturating_add(self.size))
    }

    fn result(&self, key: &str, end: EventTime, acc: &Accumulator, revision: u32) -> WindowResult {
        let wanted = |aggregate| self.aggregates.contains(&aggregate);
        WindowResult {
            key: key.to_owned(),
            window_start: end.saturating_sub(self.size),
            window_end: end,
            count: acc.count,
            sum: wanted(Aggregate::Sum).then_some(Gauge(acc.sum())),
            mean: (wanted(Aggregate::Mean) && acc.count > 0).then(|| Gauge(acc.mean())),
            min: wanted(Aggregate::Min).then_some(Gauge(acc.min)),
            max: wanted(Aggregate::Max).then_some(Gauge(acc.max)),
            revision,
        }
    }
}

/// Fixed-point scale of sums: values are summed exactly in millionths, so a window's sum
/// and mean do not depend on the order in which its records arrive (floating-point addition
/// is not associative), and so are identical on any number of workers.
const SUM_SCALE: f64 = 1e6;

/// `value` in exact millionths, for order-independent sums.
pub fn to_micros(value: f64) -> i128 {
    (value * SUM_SCALE).round() as i128
}

/// A sum of millionths back as a number.
pub fn from_micros(micros: i128) -> f64 {
    micros as f64 / SUM_SCALE
}

/// Running aggregate of one key in one window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    /// Records seen.
    pub count: u64,
    /// Sum of values, in millionths.
    pub sum_micros: i128,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Default for Accumulator {
    fn default() -> Self {
        Self { count: 0, sum_micros: 0, min: f64::INFINITY, max: f64::NEG_INFINITY }
    }
}

impl Accumulator {
    /// Sum of the values.
    pub fn sum(&self) -> f64 {
        from_micros(self.sum_micros)
    }

    /// Mean of the values (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum() / self.count as f64
        }
    }

    /// Adds `value` with multiplicity `weight`.
    pub fn add(&mut self, value: f64, weight: isize) {
        self.count = self.count.saturating_add_signed(weight as i64);
        self.sum_micros += to_micros(value) * weight as i128;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }
}

/// Event-time window aggregation over a stream of `(record, time, diff)` updates.
///
/// ```
/// use edgeflow_operators::window_aggregate::{WindowAggregate, WindowParams, Aggregate};
/// use edgeflow_operators::DurationMs;
/// use timely::dataflow::operators::{ToStream, Inspect};
///
/// let params = WindowParams::try_new(DurationMs(10), None, &[Aggregate::Count, Aggregate::Mean], None).unwrap();
/// timely::example(move |scope| {
///     vec![(("a".to_string(), 1.0), 3u64, 1isize), (("a".to_string(), 3.0), 7, 1)]
///         .to_stream(scope)
///         .window_aggregate("Windows", params, |(k, _): &(String, f64)| k.clone(), |r, t| (*t, r.1))
///         .inspect(|result| assert_eq!(result.mean.unwrap().0, 2.0));
/// });
/// ```
pub trait WindowAggregate<'scope, D> {
    /// Groups each record by `key`, reads `(event_time, value)` from it with `value`, and
    /// emits one [`WindowResult`] per key and window once the window is final.
    fn window_aggregate<K, V>(
        self,
        name: &str,
        params: WindowParams,
        key: K,
        value: V,
    ) -> StreamVec<'scope, EventTime, WindowResult>
    where
        K: Fn(&D) -> String + 'static,
        V: Fn(&D, &EventTime) -> (EventTime, f64) + 'static;
}

impl<'scope, D> WindowAggregate<'scope, D> for StreamVec<'scope, EventTime, (D, EventTime, isize)>
where
    D: timely::ExchangeData + Clone,
{
    fn window_aggregate<K, V>(
        self,
        name: &str,
        params: WindowParams,
        key: K,
        value: V,
    ) -> StreamVec<'scope, EventTime, WindowResult>
    where
        K: Fn(&D) -> String + 'static,
        V: Fn(&D, &EventTime) -> (EventTime, f64) + 'static,
    {
        window_aggregate_core(self, name, params, key, value, StateHandle::none())
    }
}

/// Windows over heartbeats, by the key and field of `config`, taking part in checkpoints
/// through `state`: a checkpoint keeps every open window's aggregate per key, the windows
/// still within the allowed lateness (with their revisions), and after a restore the
/// operator carries on as if it had never stopped.
pub fn heartbeat_windows<'scope>(
    updates: StreamVec<'scope, EventTime, (Heartbeat, EventTime, isize)>,
    name: &str,
    config: &WindowAggregateConfig,
    params: WindowParams,
    state: StateHandle,
) -> StreamVec<'scope, EventTime, WindowResult> {
    let key = config.key.clone();
    let field = config.field;
    window_aggregate_core(
        updates,
        name,
        params,
        move |hb: &Heartbeat| match &key {
            WindowKey::NodeId => hb.node_id.clone(),
            WindowKey::Region => hb.region.clone(),
            WindowKey::Label(label) => hb.labels.get(label).cloned().unwrap_or_default(),
        },
        move |hb, _time| (hb.timestamp, field.read(hb)),
        state,
    )
}

#[derive(Default)]
struct ClosedWindow {
    accumulators: HashMap<String, Accumulator>,
    revisions: HashMap<String, u32>,
}

/// What a checkpoint keeps of one key's window.
#[derive(Serialize, Deserialize)]
enum SavedWindow {
    /// A window still open, its aggregate so far.
    Open { end: EventTime, key: String, acc: Accumulator },
    /// A window emitted but still within the allowed lateness: late records correct it.
    Closed { end: EventTime, key: String, acc: Accumulator, revision: u32 },
}

/// Windows still open, by end: the capability to emit each at its end, and its aggregates.
type OpenWindows = BTreeMap<EventTime, (Capability<EventTime>, HashMap<String, Accumulator>)>;

/// Where the operator emits its results.
type WindowOutput<'a> = timely::dataflow::operators::generic::OutputBuilderSession<
    'a,
    EventTime,
    timely::container::CapacityContainerBuilder<Vec<WindowResult>>,
>;

/// A record waiting for its time to complete, reduced to what the windows need.
struct Pending {
    time: EventTime,
    group: String,
    event_time: EventTime,
    value: f64,
    diff: isize,
}

/// One worker's windows.
struct Windows {
    params: WindowParams,
    open: OpenWindows,
    closed: BTreeMap<EventTime, ClosedWindow>,
    results: Vec<WindowResult>,
    /// Records past the allowed lateness since the last warning.
    beyond_lateness: u64,
}

impl Windows {
    /// Applies a record whose windows all end at or after its time (not late): any order of
    /// such records gives the same aggregates. `held` is a capability at or before its time.
    fn apply(&mut self, record: Pending, held: &Capability<EventTime>) {
        for end in self.params.window_ends(record.event_time) {
            let window = self.open.entry(end).or_insert_with(|| (held.delayed(&end.max(record.time)), HashMap::new()));
            window.1.entry(record.group.clone()).or_default().add(record.value, record.diff);
        }
    }

    /// Applies the late records of one time `time` (every window ending before it closed):
    /// each corrects its closed windows within the allowed lateness at once, with the next
    /// revision (`0` for a key without a result in that window); windows still open take it
    /// as usual.
    fn apply_late(
        &mut self,
        records: &[Pending],
        time: EventTime,
        held: &Capability<EventTime>,
        output: &mut WindowOutput<'_>,
    ) {
        // Corrected windows, and whether the key is new in the window.
        let mut corrected: BTreeMap<(EventTime, &str), bool> = BTreeMap::new();
        for record in records {
            for end in self.params.window_ends(record.event_time) {
                if end >= time {
                    let window = self.open.entry(end).or_insert_with(|| (held.delayed(&end), HashMap::new()));
                    window.1.entry(record.group.clone()).or_default().add(record.value, record.diff);
                } else if end.saturating_add(self.params.lateness) >= time {
                    let window = self.closed.entry(end).or_default();
                    let accumulator = window.accumulators.entry(record.group.clone());
                    let fresh = matches!(accumulator, std::collections::hash_map::Entry::Vacant(_));
                    accumulator.or_default().add(record.value, record.diff);
                    corrected.entry((end, &record.group)).or_insert(fresh);
                } else {
                    self.beyond_lateness += 1;
                }
            }
        }
        if corrected.is_empty() {
            return;
        }
        let cap = held.delayed(&time);
        let mut session = output.session(&cap);
        for ((end, group), fresh) in corrected {
            let Some(window) = self.closed.get_mut(&end) else { continue };
            let revision = window.revisions.entry(group.to_owned()).or_insert(0);
            if !fresh {
                *revision += 1;
            }
            if let Some(acc) = window.accumulators.get(group) {
                session.give(self.params.result(group, end, acc, *revision));
            }
        }
    }

    /// Emits every open window ending before `before`, earliest first.
    fn close_before(&mut self, before: EventTime, output: &mut WindowOutput<'_>) {
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() >= before {
                break;
            }
            let (end, (cap, accumulators)) = entry.remove_entry();
            self.results.clear();
            self.results.extend(accumulators.iter().map(|(group, acc)| self.params.result(group, end, acc, 0)));
            self.results.sort();
            output.session(&cap).give_iterator(self.results.drain(..));
            self.closed.insert(end, ClosedWindow { accumulators, revisions: HashMap::new() });
        }
    }

    /// Applies the records before `bound` (their times complete), taking them out of
    /// `pending`: first those that are not late, in any order, then the late ones in time
    /// order, each time after the windows ending before it closed; then closes the windows
    /// ending before `bound`.
    fn apply_until(
        &mut self,
        pending: &mut Vec<Pending>,
        bound: EventTime,
        held: &Capability<EventTime>,
        output: &mut WindowOutput<'_>,
    ) {
        let size = self.params.size;
        let mut late = Vec::new();
        let mut index = 0;
        while index < pending.len() {
            if pending[index].time >= bound {
                index += 1;
                continue;
            }
            let record = pending.swap_remove(index);
            // The earliest window of a record ends after its event time; late if before its time.
            let first_end = self.params.window_ends(record.event_time).next().unwrap_or(record.event_time + size);
            if first_end >= record.time {
                self.apply(record, held);
            } else {
                late.push(record);
            }
        }
        late.sort_by_key(|record| record.time);
        let mut rest = late.as_slice();
        while let Some(first) = rest.first() {
            let time = first.time;
            let run = rest.iter().take_while(|record| record.time == time).count();
            self.close_before(time, output);
            self.apply_late(&rest[..run], time, held, output);
            rest = &rest[run..];
        }
        self.close_before(bound, output);
    }

    /// Saves the open windows, and the closed ones late records at or after `at` may still
    /// correct.
    fn save(&self, state: &StateHandle, at: EventTime) {
        let mut entries = Vec::new();
        for (end, (_, accumulators)) in &self.open {
            entries.extend(accumulators.iter().map(|(key, acc)| {
                Entry::new(route_hash(key), &SavedWindow::Open { end: *end, key: key.clone(), acc: *acc })
            }));
        }
        for (end, window) in self.closed.range(at.saturating_sub(self.params.lateness)..) {
            entries.extend(window.accumulators.iter().map(|(key, acc)| {
                let revision = window.revisions.get(key).copied().unwrap_or(0);
                let saved = SavedWindow::Closed { end: *end, key: key.clone(), acc: *acc, revision };
                Entry::new(route_hash(key), &saved)
            }));
        }
        state.save(entries);
    }

    /// Takes up the windows saved by a checkpoint at `at`.
    fn restore(&mut self, state: &StateHandle, at: EventTime, entries: Vec<Entry>, initial: &Capability<EventTime>) {
        for entry in entries {
            match entry.value::<SavedWindow>() {
                Ok(SavedWindow::Open { end, key, acc }) => {
                    let window =
                        self.open.entry(end).or_insert_with(|| (initial.delayed(&end.max(at)), HashMap::new()));
                    window.1.insert(key, acc);
                }
                Ok(SavedWindow::Closed { end, key, acc, revision }) => {
                    let window = self.closed.entry(end).or_default();
                    window.accumulators.insert(key.clone(), acc);
                    window.revisions.insert(key, revision);
                }
                Err(err) => tracing::error!(part = state.name(), %err, "a saved window is left out"),
            }
        }
    }
}

fn window_aggregate_core<'scope, D, K, V>(
    stream: StreamVec<'scope, EventTime, (D, EventTime, isize)>,
    name: &str,
    params: WindowParams,
    key: K,
    value: V,
    state: StateHandle,
) -> StreamVec<'scope, EventTime, WindowResult>
where
    D: timely::ExchangeData + Clone,
    K: Fn(&D) -> String + 'static,
    V: Fn(&D, &EventTime) -> (EventTime, f64) + 'static,
{
    let key = std::rc::Rc::new(key);
    let route = key.clone();
    let pact = Exchange::new(move |update: &(D, EventTime, isize)| route_hash(&route(&update.0)));
    let span = tracing::info_span!("operator", name = %name, r#type = "window_aggregate");
    let scope = stream.scope();
    stream.unary_frontier(pact, name, move |initial, info| {
        state.activate_with(scope.activator_for(info.address));
        let mut windows =
            Windows { params, open: BTreeMap::new(), closed: BTreeMap::new(), results: Vec::new(), beyond_lateness: 0 };
        if let Some((at, entries)) = state.restored() {
            windows.restore(&state, at, entries, &initial);
        }
        drop(initial);
        // Records whose time is not complete yet (or, while a checkpoint is due, at or after
        // its time), and a capability at the least of their times.
        let mut pending: Vec<Pending> = Vec::new();
        let mut held: Option<Capability<EventTime>> = None;
        move |(input, frontier), output| {
            let _entered = span.enter();
            input.for_each(|cap, data| {
                let least = cap.least().copied().unwrap_or_default();
                if held.as_ref().is_none_or(|h| least < *h.time()) {
                    held = Some(cap.delayed(&least, output.output_index()));
                }
                pending.extend(data.drain(..).map(|(record, time, diff)| {
                    let (event_time, value) = value(&record, &time);
                    Pending { time, group: key(&record), event_time, value, diff }
                }));
            });
            let bound = frontier.frontier().iter().min().copied().unwrap_or(EventTime::MAX);
            if let Some(held) = held.as_ref() {
                // A checkpoint due at `at`: the state saved holds every record before it, none
                // at or after it.
                if let Some(at) = state.due_at(frontier) {
                    windows.apply_until(&mut pending, at, held, output);
                    windows.save(&state, at);
                }
                windows.apply_until(&mut pending, bound, held, output);
            } else {
                windows.close_before(bound, output);
                if let Some(at) = state.due_at(frontier) {
                    windows.save(&state, at);
                }
            }
            // Hold only what the records still waiting need.
            match pending.iter().map(|record| record.time).min() {
                Some(least) => {
                    if let Some(h) = held.as_mut() {
                        if *h.time() < least {
                            h.downgrade(&least);
                        }
                    }
                }
                None => held = None,
            }
            if windows.beyond_lateness > 0 {
                tracing::warn!(
                    records = windows.beyond_lateness,
                    "late records beyond allowed_lateness were not applied"
                );
                windows.beyond_lateness = 0;
            }
            // Forget windows beyond the allowed lateness: no record still to come can reach them.
            match frontier.frontier().iter().min() {
                Some(now) => windows.closed.retain(|end, _| end.saturating_add(windows.params.lateness) >= *now),
                None => windows.closed.clear(),
            }
        }
    })
}
