//! SQL over the live tables, with DataFusion. A query is planned against the tables'
//! schemas, then pinned to one event time: the largest that every table it reads has
//! completed ([`Tables::as_of`]). Each table is read as of that time when the plan runs, so
//! a result never mixes two times, and the time is in the result's schema
//! ([`AS_OF_KEY`]) and in SQL as `edgeflow_as_of()`.
//!
//! Only queries run: DDL, DML and session statements are refused. The time a query is
//! pinned to is held readable ([`Tables::hold`]) from planning until it has run, or for
//! [`HOLD`] at most (a Flight client that asked for a query's schema and never fetched it).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::TableFunctionArgs;
use datafusion::catalog::{Session, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, ParamValues, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{create_udf, ColumnarValue, Expr, LogicalPlan, TableType, Volatility};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use edgeflow_operators::EventTime;
use futures::StreamExt;

use super::feed::SharedTables;
use super::store::{SnapshotError, Tables};

/// The catalog the live tables are in.
pub const CATALOG: &str = "edgeflow";
/// The schema the live tables are in.
pub const SCHEMA: &str = "live";
/// The result schema's metadata key whose value is the event time (milliseconds since
/// the Unix epoch) the query read every table as of.
pub const AS_OF_KEY: &str = "edgeflow.as_of";
/// How long a planned query's time stays readable if it is never run.
pub const HOLD: Duration = Duration::from_secs(60);

/// Why a query cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL is wrong, or names what is not there: the client's to fix.
    #[error("{0}")]
    Sql(String),
    /// The tables cannot be read as asked (not complete yet, or past what they keep).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A failure while running the query.
    #[error("query failed: {0}")]
    Execution(String),
}

impl QueryError {
    fn plan(err: DataFusionError) -> Self {
        match err {
            DataFusionError::External(inner) => match inner.downcast::<SnapshotError>() {
                Ok(snapshot) => Self::Snapshot(*snapshot),
                Err(other) => Self::Execution(other.to_string()),
            },
            DataFusionError::Context(_, inner) => Self::plan(*inner),
            other => Self::Sql(other.strip_backtrace()),
        }
    }
}

/// Answers SQL over a pipeline's live tables.
#[derive(Clone, Debug)]
pub struct QueryEngine {
    tables: SharedTables,
}

/// A query planned and pinned to its time, ready to run (once).
pub struct Planned {
    context: SessionContext,
    plan: LogicalPlan,
    /// The event time every table is read as of.
    pub as_of: EventTime,
    /// The result's schema, with the time under [`AS_OF_KEY`]: the batches have exactly it.
    pub schema: SchemaRef,
    hold: Hold,
}

impl std::fmt::Debug for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planned").field("as_of", &self.as_of).field("schema", &self.schema).finish_non_exhaustive()
    }
}

/// A time held readable for a planned query; released when dropped.
#[derive(Debug)]
struct Hold {
    id: u64,
    tables: SharedTables,
}

impl Drop for Hold {
    fn drop(&mut self) {
        lock(&self.tables).release(self.id);
    }
}

fn lock(tables: &SharedTables) -> std::sync::MutexGuard<'_, Tables> {
    tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl QueryEngine {
    /// Queries over `tables`.
    pub fn new(tables: SharedTables) -> Self {
        Self { tables }
    }

    /// The tables' names and schemas.
    pub fn tables(&self) -> Vec<(String, SchemaRef)> {
        lock(&self.tables).schemas().map(|(name, schema)| (name.to_owned(), schema.clone())).collect()
    }

    /// A session over the tables whose reads happen as of `at` once it is set.
    fn context(&self, at: &Arc<OnceLock<EventTime>>) -> Result<SessionContext, QueryError> {
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_information_schema(true)
            .with_target_partitions(1);
        let context = SessionContext::new_with_config(config);
        for (name, schema) in self.tables() {
            let table = LiveTable { name: name.clone(), schema, tables: self.tables.clone(), at: at.clone() };
            context.register_table(name.as_str(), Arc::new(table)).map_err(QueryError::plan)?;
        }
        let pinned = at.clone();
        let as_of = create_udf(
            "edgeflow_as_of",
            vec![],
            time_type(),
            Volatility::Stable,
            Arc::new(move |_: &[ColumnarValue]| {
                let time = pinned.get().copied().unwrap_or(0);
                Ok(ColumnarValue::Scalar(ScalarValue::TimestampMillisecond(Some(millis(time)), Some("UTC".into()))))
            }),
        );
        context.register_udf(as_of);
        Ok(context)
    }

    /// [`QueryEngine::context`] with `as_of(TABLE, TIME)`, which reads a table as of an
    /// earlier time; the time asked is recorded in `requested`.
    fn context_with_as_of(
        &self,
        at: &Arc<OnceLock<EventTime>>,
        requested: &Arc<Mutex<Option<EventTime>>>,
    ) -> Result<SessionContext, QueryError> {
        let context = self.context(at)?;
        let function = AsOfFunction { tables: self.tables.clone(), at: at.clone(), requested: requested.clone() };
        context.register_udtf("as_of", Arc::new(function));
        Ok(context)
    }

    /// Plans `sql` (with `$1`-style parameters bound from `params`, if any) and pins it to
    /// the latest time every table it reads has completed.
    pub async fn plan(&self, sql: &str, params: Option<Vec<ScalarValue>>) -> Result<Planned, QueryError> {
        let at = Arc::new(OnceLock::new());
        let requested = Arc::new(Mutex::new(None));
        let context = self.context_with_as_of(&at, &requested)?;
        let mut plan = context.state().create_logical_plan(sql).await.map_err(QueryError::plan)?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|err| QueryError::Sql(format!("{}: only queries are answered here", err.strip_backtrace())))?;
        if let Some(params) = params {
            plan = plan
                .with_param_values(ParamValues::List(params.into_iter().map(Into::into).collect()))
                .map_err(QueryError::plan)?;
        }
        let names = read_tables(&plan);
        let requested = *requested.lock().unwrap_or_else(|p| p.into_inner());
        let (as_of, hold) = {
            let mut tables = lock(&self.tables);
            let as_of = match requested {
                // `as_of(TABLE, TIME)`: the whole query reads as of that time.
                Some(time) => time,
                None if names.is_empty() => tables.as_of_all()?,
                None => tables.as_of(names.iter().map(String::as_str))?,
            };
            (as_of, tables.hold(as_of, Instant::now() + HOLD))
        };
        let _ = at.set(as_of);
        let hold = Hold { id: hold, tables: self.tables.clone() };
        let schema = with_as_of(plan.schema().inner().clone(), as_of);
        Ok(Planned { context, plan, as_of, schema, hold })
    }

    /// The parameters `sql` takes (`$1`, `$2`, ...) with their types where the query says.
    pub async fn parameters(&self, sql: &str) -> Result<Vec<(String, Option<DataType>)>, QueryError> {
        let at = Arc::new(OnceLock::new());
        let context = self.context(&at)?;
        let plan = context.state().create_logical_plan(sql).await.map_err(QueryError::plan)?;
        let types = plan.get_parameter_types().map_err(QueryError::plan)?;
        let mut named: Vec<(String, Option<DataType>)> = types.into_iter().collect();
        named.sort_by_key(|(name, _)| name.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX));
        Ok(named)
    }
}

/// How often a subscription looks for a later time.
pub const SUBSCRIBE_EVERY: Duration = Duration::from_millis(100);

/// A subscription's state between two times: the result as of `time` (each row with its
/// count).
struct Subscription {
    engine: QueryEngine,
    sql: String,
    schema: SchemaRef,
    previous: HashMap<Vec<ScalarValue>, i64>,
    time: Option<EventTime>,
    first: Option<Planned>,
}

impl QueryEngine {
    /// Subscribes to `sql`: its result as of the latest complete time, as rows with `+1`
    /// (`diff`), then at each later time the rows that left (`-1`) and came (`+1`), or, when
    /// nothing changed, one progress row (`progressed` true, every other column but `time`
    /// null). Replaying the changes up to a time gives the result as of that time. The
    /// query runs again at each time (every [`SUBSCRIBE_EVERY`] at most).
    pub async fn subscribe(
        &self,
        sql: &str,
    ) -> Result<(SchemaRef, futures::stream::BoxStream<'static, Result<RecordBatch, DataFusionError>>), QueryError>
    {
        let first = self.plan(sql, None).await?;
        let mut fields = vec![
            arrow_schema::Field::new("time", time_type(), false),
            arrow_schema::Field::new("progressed", DataType::Boolean, false),
            arrow_schema::Field::new("diff", DataType::Int64, true),
        ];
        fields.extend(first.schema.fields().iter().map(|field| field.as_ref().clone().with_nullable(true)));
        let schema = Arc::new(arrow_schema::Schema::new(fields));
        let state = Subscription {
            engine: self.clone(),
            sql: sql.to_owned(),
            schema: schema.clone(),
            previous: HashMap::new(),
            time: None,
            first: Some(first),
        };
        let stream = futures::stream::try_unfold(state, |mut state| async move {
            let batch = state.next().await?;
            Ok(Some((batch, state)))
        });
        Ok((schema, Box::pin(stream)))
    }
}

impl Subscription {
    /// The changes at the next time the query's tables complete.
    async fn next(&mut self) -> Result<RecordBatch, DataFusionError> {
        let failed = |err: QueryError| DataFusionError::Execution(err.to_string());
        let planned = loop {
            let planned = match self.first.take() {
                Some(planned) => planned,
                None => self.engine.plan(&self.sql, None).await.map_err(failed)?,
            };
            if self.time.is_none_or(|time| planned.as_of > time) {
                break planned;
            }
            drop(planned);
            tokio::time::sleep(SUBSCRIBE_EVERY).await;
        };
        let time = planned.as_of;
        let mut current: HashMap<Vec<ScalarValue>, i64> = HashMap::new();
        let mut batches = planned.run().await.map_err(failed)?;
        while let Some(batch) = batches.next().await {
            let batch = batch?;
            for row in 0..batch.num_rows() {
                let values = batch
                    .columns()
                    .iter()
                    .map(|column| ScalarValue::try_from_array(column, row))
                    .collect::<Result<Vec<_>, _>>()?;
                *current.entry(values).or_default() += 1;
            }
        }
        let mut changes: Vec<(Vec<ScalarValue>, i64)> = Vec::new();
        for (row, count) in &self.previous {
            let now = current.get(row).copied().unwrap_or(0);
            if now != *count {
                changes.push((row.clone(), now - count));
            }
        }
        for (row, count) in &current {
            if !self.previous.contains_key(row) {
                changes.push((row.clone(), *count));
            }
        }
        changes.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal)));
        self.previous = current;
        self.time = Some(time);
        self.batch(time, changes)
    }

    /// The batch of `changes` at `time` (one progress row if there are none).
    fn batch(&self, time: EventTime, changes: Vec<(Vec<ScalarValue>, i64)>) -> Result<RecordBatch, DataFusionError> {
        let progressed = changes.is_empty();
        let rows = changes.len().max(1);
        let at = ScalarValue::TimestampMillisecond(Some(millis(time)), Some("UTC".into()));
        let mut columns: Vec<arrow_array::ArrayRef> =
            vec![at.to_array_of_size(rows)?, ScalarValue::Boolean(Some(progressed)).to_array_of_size(rows)?];
        if progressed {
            for field in self.schema.fields().iter().skip(2) {
                columns.push(ScalarValue::try_from(field.data_type())?.to_array_of_size(1)?);
            }
        } else {
            columns.push(Arc::new(arrow_array::Int64Array::from_iter_values(changes.iter().map(|(_, diff)| *diff))));
            for (index, field) in self.schema.fields().iter().skip(3).enumerate() {
                let values = changes.iter().map(|(row, _)| row[index].clone());
                let column = ScalarValue::iter_to_array(values)?;
                columns.push(datafusion::arrow::compute::cast(&column, field.data_type())?);
            }
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl Planned {
    /// Runs the query: its batches, each with exactly [`Planned::schema`], streamed as they
    /// are computed.
    pub async fn run(self) -> Result<SendableRecordBatchStream, QueryError> {
        let Self { context, plan, schema, hold, as_of: _ } = self;
        let frame = context.execute_logical_plan(plan).await.map_err(QueryError::plan)?;
        let stream = frame.execute_stream().await.map_err(QueryError::plan)?;
        let relabel = schema.clone();
        // The hold goes once every table has been read (the stream's end).
        let batches = stream.map(move |batch| {
            let _ = &hold;
            let batch = batch?;
            RecordBatch::try_new(relabel.clone(), batch.columns().to_vec()).map_err(DataFusionError::from)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

/// `as_of(TABLE, TIME)`: table `TABLE` read as of `TIME` (milliseconds since the epoch, or
/// a timestamp such as `'2026-12-03T10:00:00Z'`), for append tables within their
/// retention. Every table of the query is read as of that time.
#[derive(Debug)]
struct AsOfFunction {
    tables: SharedTables,
    at: Arc<OnceLock<EventTime>>,
    requested: Arc<Mutex<Option<EventTime>>>,
}

impl TableFunctionImpl for AsOfFunction {
    fn call_with_args(&self, args: TableFunctionArgs<'_, '_>) -> datafusion::common::Result<Arc<dyn TableProvider>> {
        let usage = "as_of(TABLE, TIME) takes a table name and an event time (milliseconds since the epoch, or a timestamp such as '2026-12-03T10:00:00Z')";
        let [table, time] = args.exprs() else {
            return Err(DataFusionError::Plan(format!("{usage}; it was given {} arguments", args.exprs().len())));
        };
        let Some(ScalarValue::Utf8(Some(name))) = literal(table) else {
            return Err(DataFusionError::Plan(format!(
                "{usage}; its first argument is not a table name in quotes: {table}"
            )));
        };
        let schema = lock(&self.tables)
            .schemas()
            .find(|(table, _)| *table == name)
            .map(|(_, schema)| schema.clone())
            .ok_or_else(|| DataFusionError::Plan(format!("as_of: no table `{name}`")))?;
        let millis = match literal(time).map(|value| value.cast_to(&time_type())) {
            Some(Ok(ScalarValue::TimestampMillisecond(Some(millis), _))) => millis,
            _ => return Err(DataFusionError::Plan(format!("{usage}; its second argument is not a time: {time}"))),
        };
        let time = EventTime::try_from(millis)
            .map_err(|_| DataFusionError::Plan(format!("as_of: the time {millis} is before 1970")))?;
        let mut requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        match *requested {
            Some(earlier) if earlier != time => {
                return Err(DataFusionError::Plan(format!(
                    "a query reads every table as of one time, and as_of() is given {earlier} and {time}"
                )))
            }
            _ => *requested = Some(time),
        }
        Ok(Arc::new(LiveTable { name, schema, tables: self.tables.clone(), at: self.at.clone() }))
    }
}

/// The value of a literal argument (also one under a cast, as `TIMESTAMP '...'` is).
fn literal(expr: &Expr) -> Option<ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value.clone()),
        Expr::Cast(cast) => literal(&cast.expr)?.cast_to(cast.field.data_type()).ok(),
        _ => None,
    }
}

/// The tables a plan reads, subqueries included.
fn read_tables(plan: &LogicalPlan) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            names.insert(scan.table_name.table().to_owned());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    names
}

/// `schema` with the query's time in its metadata.
fn with_as_of(schema: SchemaRef, as_of: EventTime) -> SchemaRef {
    let mut metadata = schema.metadata().clone();
    metadata.insert(AS_OF_KEY.to_owned(), as_of.to_string());
    Arc::new(schema.as_ref().clone().with_metadata(metadata))
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn millis(time: EventTime) -> i64 {
    i64::try_from(time).unwrap_or(i64::MAX)
}

/// A live table as DataFusion sees it: read as of the query's pinned time when scanned.
#[derive(Debug)]
struct LiveTable {
    name: String,
    schema: SchemaRef,
    tables: SharedTables,
    at: Arc<OnceLock<EventTime>>,
}

#[async_trait]
impl TableProvider for LiveTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let Some(&at) = self.at.get() else {
            return Err(DataFusionError::Internal(format!(
                "table `{}` scanned before its query was pinned",
                self.name
            )));
        };
        let snapshot =
            lock(&self.tables).read(&self.name, at).map_err(|err| DataFusionError::External(Box::new(err)))?;
        let batches = snapshot.batches().map_err(|err| DataFusionError::External(Box::new(err)))?;
        MemTable::try_new(self.schema.clone(), vec![batches])?.scan(state, projection, filters, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::store::{append_schema, Cell, Retention};
    use arrow_array::{Array, StringArray, TimestampMillisecondArray};
    use arrow_schema::{Field, Schema};
    use std::sync::Mutex;

    fn text(value: &str) -> Cell {
        Cell::Text(value.to_owned())
    }

    /// `nodes` (a collection: node_id, status) and `changes` (append: time, node_id).
    fn tables() -> SharedTables {
        let mut tables = Tables::default();
        let nodes = Arc::new(Schema::new(vec![
            Field::new("node_id", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
        ]));
        tables.add_collection("nodes", nodes);
        tables.add_append(
            "changes",
            append_schema(vec![Field::new("node_id", DataType::Utf8, false)]),
            Retention::Rows(100),
        );
        Arc::new(Mutex::new(tables))
    }

    async fn rows(engine: &QueryEngine, sql: &str) -> (EventTime, Vec<RecordBatch>) {
        let planned = engine.plan(sql, None).await.unwrap();
        let as_of = planned.as_of;
        let schema = planned.schema.clone();
        let batches: Vec<RecordBatch> =
            planned.run().await.unwrap().map(|batch| batch.unwrap()).collect::<Vec<_>>().await;
        for batch in &batches {
            assert_eq!(batch.schema(), schema, "every batch has the planned schema");
        }
        assert_eq!(schema.metadata()[AS_OF_KEY], as_of.to_string());
        (as_of, batches)
    }

    fn strings(batches: &[RecordBatch], column: usize) -> Vec<String> {
        batches
            .iter()
            .flat_map(|batch| {
                let array = batch.column(column).as_any().downcast_ref::<StringArray>().unwrap();
                (0..array.len()).map(|i| array.value(i).to_owned()).collect::<Vec<_>>()
            })
            .collect()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn a_query_reads_every_table_as_of_the_time_all_have_completed() {
        let shared = tables();
        {
            let mut tables = lock(&shared);
            tables.update(
                "nodes",
                [(vec![text("a"), text("healthy")], 10, 1), (vec![text("b"), text("healthy")], 10, 1)],
            );
            tables.update("changes", [(vec![text("a")], 10, 1)]);
            tables.advance("nodes", 10).unwrap();
            tables.advance("changes", 10).unwrap();
            // At 20, `a` turns unhealthy: the collection has completed 20, the changes only 15.
            tables.update(
                "nodes",
                [(vec![text("a"), text("healthy")], 20, -1), (vec![text("a"), text("unhealthy")], 20, 1)],
            );
            tables.update("changes", [(vec![text("a")], 20, 1)]);
            tables.advance("nodes", 20).unwrap();
            tables.advance("changes", 15).unwrap();
        }
        let engine = QueryEngine::new(shared.clone());
        runtime().block_on(async {
            // Alone, the collection reads as of 20.
            let (as_of, batches) = rows(&engine, "SELECT status FROM nodes WHERE node_id = 'a'").await;
            assert_eq!((as_of, strings(&batches, 0)), (20, vec!["unhealthy".to_owned()]));
            // With the changes, both as of 15: `a` is still healthy there, and no change at 20.
            let (as_of, batches) = rows(
                &engine,
                "SELECT n.status, (SELECT count(*) FROM changes) AS changes, edgeflow_as_of() AS at FROM nodes n WHERE n.node_id = 'a'",
            )
            .await;
            assert_eq!((as_of, strings(&batches, 0)), (15, vec!["healthy".to_owned()]));
            let counts = batches[0].column(1).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
            assert_eq!(counts.value(0), 1);
            let at = batches[0].column(2).as_any().downcast_ref::<TimestampMillisecondArray>().unwrap();
            assert_eq!(at.value(0), 15);
        });
    }

    #[test]
    fn as_of_reads_an_earlier_time_of_an_append_table() {
        let shared = tables();
        {
            let mut tables = lock(&shared);
            for (time, node) in [(10, "a"), (20, "b"), (30, "c")] {
                tables.update("changes", [(vec![text(node)], time, 1)]);
            }
            tables.advance("changes", 30).unwrap();
            tables.advance("nodes", 30).unwrap();
        }
        let engine = QueryEngine::new(shared);
        runtime().block_on(async {
            let (as_of, batches) = rows(&engine, "SELECT node_id FROM as_of('changes', 20) ORDER BY node_id").await;
            assert_eq!((as_of, strings(&batches, 0)), (20, vec!["a".to_owned(), "b".to_owned()]));
            let (as_of, batches) =
                rows(&engine, "SELECT node_id FROM as_of('changes', '1970-01-01T00:00:00.010Z')").await;
            assert_eq!((as_of, strings(&batches, 0)), (10, vec!["a".to_owned()]));
            let later = engine.plan("SELECT * FROM as_of('changes', 40)", None).await.unwrap().run().await;
            let err = match later {
                Ok(mut stream) => stream.next().await.unwrap().unwrap_err().to_string(),
                Err(err) => err.to_string(),
            };
            assert!(err.contains("complete up to 30"), "{err}");
            let mixed = engine
                .plan("SELECT * FROM as_of('changes', 10) a, as_of('changes', 20) b", None)
                .await
                .unwrap_err()
                .to_string();
            assert!(mixed.contains("one time"), "{mixed}");
            let unknown = engine.plan("SELECT * FROM as_of('nowhere', 10)", None).await.unwrap_err().to_string();
            assert!(unknown.contains("no table `nowhere`"), "{unknown}");
        });
    }

    #[test]
    fn a_planned_time_stays_readable_until_the_query_has_run() {
        let shared = tables();
        {
            let mut tables = lock(&shared);
            tables.update("nodes", [(vec![text("a"), text("healthy")], 10, 1)]);
            tables.advance("nodes", 10).unwrap();
            tables.advance("changes", 10).unwrap();
        }
        let engine = QueryEngine::new(shared.clone());
        runtime().block_on(async {
            let planned = engine.plan("SELECT status FROM nodes", None).await.unwrap();
            assert_eq!(planned.as_of, 10);
            {
                // Both tables move on, `a` changes at 20: without the hold, the collection
                // would fold 20 in and 10 could no longer be read.
                let mut tables = lock(&shared);
                tables.update(
                    "nodes",
                    [(vec![text("a"), text("healthy")], 20, -1), (vec![text("a"), text("unhealthy")], 20, 1)],
                );
                tables.advance("nodes", 30).unwrap();
                tables.advance("changes", 30).unwrap();
            }
            let batches: Vec<RecordBatch> = planned.run().await.unwrap().map(|b| b.unwrap()).collect().await;
            assert_eq!(strings(&batches, 0), ["healthy"]);
            // Once run, the hold is gone: the next advance folds, and 10 is too old.
            lock(&shared).advance("nodes", 31).unwrap();
            lock(&shared).advance("changes", 31).unwrap();
            assert!(matches!(lock(&shared).read("nodes", 10), Err(SnapshotError::TooOld { .. })));
        });
    }

    #[test]
    fn only_queries_are_answered_and_errors_say_what_is_wrong() {
        let shared = tables();
        lock(&shared).advance("nodes", 5).unwrap();
        let engine = QueryEngine::new(shared);
        runtime().block_on(async {
            let refused = engine.plan("CREATE TABLE t (x INT)", None).await.unwrap_err().to_string();
            assert!(refused.contains("only queries"), "{refused}");
            let refused = engine.plan("DROP TABLE nodes", None).await.unwrap_err().to_string();
            assert!(refused.contains("only queries"), "{refused}");
            let unknown = engine.plan("SELECT * FROM nowhere", None).await.unwrap_err();
            assert!(matches!(unknown, QueryError::Sql(_)) && unknown.to_string().contains("nowhere"), "{unknown}");
            let bad = engine.plan("SELEC 1", None).await.unwrap_err();
            assert!(matches!(bad, QueryError::Sql(_)), "{bad}");
            // `changes` has completed nothing yet: the query says so.
            let waiting = engine.plan("SELECT * FROM changes", None).await.unwrap_err();
            assert!(waiting.to_string().contains("no complete time yet"), "{waiting}");
        });
    }

    /// A subscription starts with the result, then sends what changed at each later time,
    /// or progress when nothing did.
    #[test]
    fn a_subscription_sends_the_result_then_its_changes_and_progress() {
        let shared = tables();
        {
            let mut tables = lock(&shared);
            tables.update(
                "nodes",
                [(vec![text("a"), text("healthy")], 10, 1), (vec![text("b"), text("healthy")], 10, 1)],
            );
            tables.advance("nodes", 10).unwrap();
            tables.advance("changes", 10).unwrap();
        }
        let engine = QueryEngine::new(shared.clone());
        runtime().block_on(async {
            let (schema, mut changes) = engine.subscribe("SELECT node_id, status FROM nodes").await.unwrap();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            assert_eq!(names, ["time", "progressed", "diff", "node_id", "status"]);
            let rows = |batch: &RecordBatch| -> Vec<(i64, bool, Option<i64>, Option<String>)> {
                let time = batch.column(0).as_any().downcast_ref::<TimestampMillisecondArray>().unwrap();
                let progressed = batch.column(1).as_any().downcast_ref::<arrow_array::BooleanArray>().unwrap();
                let diff = batch.column(2).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
                let status = batch.column(4).as_any().downcast_ref::<StringArray>().unwrap();
                (0..batch.num_rows())
                    .map(|i| {
                        (
                            time.value(i),
                            progressed.value(i),
                            diff.is_valid(i).then(|| diff.value(i)),
                            status.is_valid(i).then(|| status.value(i).to_owned()),
                        )
                    })
                    .collect()
            };
            let healthy = Some("healthy".to_owned());
            let first = changes.next().await.unwrap().unwrap();
            assert_eq!(rows(&first), [(10, false, Some(1), healthy.clone()), (10, false, Some(1), healthy.clone())]);
            {
                let mut tables = lock(&shared);
                tables.update(
                    "nodes",
                    [(vec![text("a"), text("healthy")], 20, -1), (vec![text("a"), text("degraded")], 20, 1)],
                );
                tables.advance("nodes", 20).unwrap();
                tables.advance("changes", 20).unwrap();
            }
            let second = changes.next().await.unwrap().unwrap();
            assert_eq!(
                rows(&second),
                [(20, false, Some(-1), healthy), (20, false, Some(1), Some("degraded".to_owned()))]
            );
            lock(&shared).advance("nodes", 30).unwrap();
            lock(&shared).advance("changes", 30).unwrap();
            let third = changes.next().await.unwrap().unwrap();
            assert_eq!(rows(&third), [(30, true, None, None)]);
        });
    }

    #[test]
    fn parameters_are_typed_and_bound() {
        let shared = tables();
        {
            let mut tables = lock(&shared);
            tables
                .update("nodes", [(vec![text("a"), text("healthy")], 1, 1), (vec![text("b"), text("degraded")], 1, 1)]);
            tables.advance("nodes", 1).unwrap();
            tables.advance("changes", 1).unwrap();
        }
        let engine = QueryEngine::new(shared);
        runtime().block_on(async {
            let sql = "SELECT status FROM nodes WHERE node_id = $1";
            assert_eq!(engine.parameters(sql).await.unwrap(), [("$1".to_owned(), Some(DataType::Utf8))]);
            let planned = engine.plan(sql, Some(vec![ScalarValue::Utf8(Some("b".into()))])).await.unwrap();
            let batches: Vec<RecordBatch> = planned.run().await.unwrap().map(|b| b.unwrap()).collect().await;
            assert_eq!(strings(&batches, 0), ["degraded"]);
        });
    }
}
