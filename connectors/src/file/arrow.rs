//! The `file` sink's `format: arrow`: inference results as an Arrow IPC stream, in record
//! batches of up to 8,192 rows (a batch whenever 8,192 rows are waiting, and at each flush).
//! Columnar and binary: the output floats are copied, not formatted, so writing a result
//! costs a fraction of its JSON line, and the file loads straight into
//! pyarrow, pandas, Polars or DataFusion (`pyarrow.ipc.open_stream(path).read_all()`).
//!
//! The columns mirror the JSON fields of [`InferenceResult`]:
//!
//! | column | Arrow type | null |
//! | --- | --- | --- |
//! | `id`, `model`, `status` | Utf8 | no |
//! | `version` | UInt64 | when no model ran |
//! | `error`, `node` | Utf8 | when absent |
//! | `outputs` | `Map<Utf8, Struct<shape: List<UInt64>, data: List<Float32>>>` | no (empty unless `ok`) |
//! | `timestamp` | Timestamp(ms, UTC) | no |
//! | `queue_ms`, `compute_ms`, `finished_at` | Float64 | no |
//! | `batch_size` | UInt32 | no |
//!
//! The stream ends with the IPC end-of-stream marker when the sink closes; a reader of a
//! file still being written sees every batch flushed so far.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    ArrayBuilder, Float32Builder, Float64Builder, ListBuilder, StringBuilder, TimestampMillisecondBuilder,
    UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, MapArray, RecordBatch, StructArray};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use edgeflow_operators::InferenceResult;

use crate::{ConnectorError, Sink};

/// Rows of a full record batch: a batch is written once it has this many rows, and at each
/// flush.
const BATCH_ROWS: usize = 8192;

/// The Arrow types of the results file.
struct Layout {
    schema: SchemaRef,
    /// `outputs`' `entries` field (the map's key-value struct).
    entries: FieldRef,
    /// Fields of an entry: `key`, `value`.
    entry_fields: Fields,
    /// Fields of a value: `shape`, `data`.
    value_fields: Fields,
    /// The item fields of the `shape` and `data` lists.
    shape_item: FieldRef,
    data_item: FieldRef,
}

impl Layout {
    fn new() -> Self {
        let shape_item = Arc::new(Field::new("item", DataType::UInt64, false));
        let data_item = Arc::new(Field::new("item", DataType::Float32, false));
        let value_fields = Fields::from(vec![
            Field::new("shape", DataType::List(shape_item.clone()), false),
            Field::new("data", DataType::List(data_item.clone()), false),
        ]);
        let entry_fields = Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Struct(value_fields.clone()), false),
        ]);
        let entries = Arc::new(Field::new("entries", DataType::Struct(entry_fields.clone()), false));
        let schema = Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("model", DataType::Utf8, false),
            Field::new("version", DataType::UInt64, true),
            Field::new("status", DataType::Utf8, false),
            Field::new("error", DataType::Utf8, true),
            Field::new("outputs", DataType::Map(entries.clone(), false), false),
            Field::new("node", DataType::Utf8, true),
            Field::new("timestamp", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
            Field::new("queue_ms", DataType::Float64, false),
            Field::new("compute_ms", DataType::Float64, false),
            Field::new("batch_size", DataType::UInt32, false),
            Field::new("finished_at", DataType::Float64, false),
        ]);
        Self { schema: Arc::new(schema), entries, entry_fields, value_fields, shape_item, data_item }
    }
}

/// Column builders for the results since the last flush.
struct Columns {
    id: StringBuilder,
    model: StringBuilder,
    version: UInt64Builder,
    status: StringBuilder,
    error: StringBuilder,
    /// Where each row's outputs start in the three output columns, plus one end.
    output_offsets: Vec<i32>,
    output_names: StringBuilder,
    output_shapes: ListBuilder<UInt64Builder>,
    output_data: ListBuilder<Float32Builder>,
    node: StringBuilder,
    timestamp: TimestampMillisecondBuilder,
    queue_ms: Float64Builder,
    compute_ms: Float64Builder,
    batch_size: UInt32Builder,
    finished_at: Float64Builder,
}

/// How much the last batch held: the next one starts with room for as much, so that the
/// builders do not grow (and copy) their buffers as rows arrive.
#[derive(Clone, Copy, Default)]
struct Sizes {
    rows: usize,
    id_bytes: usize,
    tensors: usize,
    dims: usize,
    values: usize,
}

impl Columns {
    fn new(layout: &Layout, sizes: Sizes) -> Self {
        let Sizes { rows, id_bytes, tensors, dims, values } = sizes;
        let mut output_offsets = Vec::with_capacity(rows + 1);
        output_offsets.push(0);
        let text = |bytes_per_row: usize| StringBuilder::with_capacity(rows, rows * bytes_per_row);
        Self {
            id: StringBuilder::with_capacity(rows, id_bytes),
            model: text(8),
            version: UInt64Builder::with_capacity(rows),
            status: text(2),
            error: text(0),
            output_offsets,
            output_names: StringBuilder::with_capacity(tensors, tensors * 8),
            output_shapes: ListBuilder::with_capacity(UInt64Builder::with_capacity(dims), tensors)
                .with_field(layout.shape_item.clone()),
            output_data: ListBuilder::with_capacity(Float32Builder::with_capacity(values), tensors)
                .with_field(layout.data_item.clone()),
            node: text(0),
            timestamp: TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            queue_ms: Float64Builder::with_capacity(rows),
            compute_ms: Float64Builder::with_capacity(rows),
            batch_size: UInt32Builder::with_capacity(rows),
            finished_at: Float64Builder::with_capacity(rows),
        }
    }

    fn sizes(&mut self) -> Sizes {
        Sizes {
            rows: self.rows(),
            id_bytes: self.id.values_slice().len(),
            tensors: self.output_names.len(),
            dims: self.output_shapes.values().len(),
            values: self.output_data.values().len(),
        }
    }

    fn rows(&self) -> usize {
        self.output_offsets.len() - 1
    }

    fn append(&mut self, result: &InferenceResult) -> Result<(), ArrowError> {
        self.id.append_value(&result.id);
        self.model.append_value(&result.model);
        self.version.append_option(result.version);
        self.status.append_value(result.status.as_str());
        self.error.append_option(result.error.as_deref());
        for (name, tensor) in &result.outputs {
            self.output_names.append_value(name);
            for &dim in &tensor.shape {
                self.output_shapes.values().append_value(dim as u64);
            }
            self.output_shapes.append(true);
            self.output_data.values().append_slice(&tensor.data);
            self.output_data.append(true);
        }
        let end = i32::try_from(self.output_names.len())
            .map_err(|_| ArrowError::ComputeError("more than 2^31 output tensors in one flush".into()))?;
        self.output_offsets.push(end);
        self.node.append_option(result.node.as_deref());
        self.timestamp.append_value(i64::try_from(result.timestamp).unwrap_or(i64::MAX));
        self.queue_ms.append_value(result.queue_ms);
        self.compute_ms.append_value(result.compute_ms);
        self.batch_size.append_value(result.batch_size);
        self.finished_at.append_value(result.finished_at);
        Ok(())
    }

    /// The rows since the last call as one record batch; the builders start empty again,
    /// with room for as many rows.
    fn finish(&mut self, layout: &Layout) -> Result<RecordBatch, ArrowError> {
        let sizes = self.sizes();
        std::mem::replace(self, Columns::new(layout, sizes)).into_batch(layout)
    }

    fn into_batch(mut self, layout: &Layout) -> Result<RecordBatch, ArrowError> {
        let value = StructArray::try_new(
            layout.value_fields.clone(),
            vec![Arc::new(self.output_shapes.finish()) as ArrayRef, Arc::new(self.output_data.finish())],
            None,
        )?;
        let entries = StructArray::try_new(
            layout.entry_fields.clone(),
            vec![Arc::new(self.output_names.finish()) as ArrayRef, Arc::new(value)],
            None,
        )?;
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.output_offsets));
        let outputs = MapArray::try_new(layout.entries.clone(), offsets, entries, None, false)?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.id.finish()),
            Arc::new(self.model.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.error.finish()),
            Arc::new(outputs),
            Arc::new(self.node.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.queue_ms.finish()),
            Arc::new(self.compute_ms.finish()),
            Arc::new(self.batch_size.finish()),
            Arc::new(self.finished_at.finish()),
        ];
        RecordBatch::try_new(layout.schema.clone(), columns)
    }
}

/// Writes inference results to a file as an Arrow IPC stream.
pub struct ArrowResultSink {
    path: String,
    layout: Layout,
    columns: Columns,
    writer: StreamWriter<BufWriter<File>>,
}

impl std::fmt::Debug for ArrowResultSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrowResultSink").field("path", &self.path).field("rows", &self.columns.rows()).finish()
    }
}

impl ArrowResultSink {
    /// Creates (or replaces) `path` and writes the stream's schema to it.
    pub fn create(path: &Path) -> Result<Self, ConnectorError> {
        let shown = path.display().to_string();
        let file = File::create(path).map_err(|source| ConnectorError::Write { path: shown.clone(), source })?;
        let layout = Layout::new();
        let writer = StreamWriter::try_new(BufWriter::with_capacity(1 << 16, file), &layout.schema)
            .map_err(|err| arrow_error(&shown, err))?;
        let columns = Columns::new(&layout, Sizes::default());
        Ok(Self { path: shown, layout, columns, writer })
    }

    /// Writes the rows since the last batch, if any, as a record batch.
    fn write_batch(&mut self) -> Result<(), ConnectorError> {
        if self.columns.rows() > 0 {
            let batch = self.columns.finish(&self.layout).map_err(|err| arrow_error(&self.path, err))?;
            self.writer.write(&batch).map_err(|err| arrow_error(&self.path, err))?;
        }
        Ok(())
    }

    /// The Arrow schema of the files this sink writes.
    pub fn schema() -> SchemaRef {
        Layout::new().schema
    }
}

fn arrow_error(path: &str, err: ArrowError) -> ConnectorError {
    let source = match err {
        ArrowError::IoError(_, source) => source,
        other => std::io::Error::other(other.to_string()),
    };
    ConnectorError::Write { path: path.to_owned(), source }
}

impl Sink for ArrowResultSink {
    /// Only results have columns here; the pipeline's validation sends nothing else.
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        let start = String::from_utf8_lossy(&record[..record.len().min(80)]).into_owned();
        Err(ConnectorError::Config {
            connector: "file",
            reason: format!("`format: arrow` writes inference results only, not `{start}`"),
        })
    }

    fn write_result(&mut self, result: &InferenceResult) -> Result<(), ConnectorError> {
        self.columns.append(result).map_err(|err| arrow_error(&self.path, err))?;
        // Full batches go out as they fill: the writes spread over the run, rather than
        // coming in one burst of megabytes at each flush while the worker waits.
        if self.columns.rows() >= BATCH_ROWS {
            self.write_batch()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.write_batch()?;
        self.writer.flush().map_err(|err| arrow_error(&self.path, err))
    }
}

impl Drop for ArrowResultSink {
    /// Writes what is left and the end-of-stream marker.
    fn drop(&mut self) {
        let finished = self.flush().and_then(|()| self.writer.finish().map_err(|err| arrow_error(&self.path, err)));
        if let Err(err) = finished {
            tracing::error!(path = %self.path, %err, "cannot finish the Arrow results file");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, TimestampMillisecondType, UInt64Type};
    use arrow_array::Array;
    use edgeflow_operators::{ResultStatus, Tensor};

    use super::*;

    fn result(index: u64) -> InferenceResult {
        let ok = index % 3 != 2;
        let outputs = if ok {
            BTreeMap::from([
                ("label".to_owned(), Tensor { shape: vec![1], data: vec![index as f32] }),
                ("scores".to_owned(), Tensor { shape: vec![1, 3], data: vec![0.25, -1.5, f32::MIN_POSITIVE] }),
            ])
        } else {
            BTreeMap::new()
        };
        InferenceResult {
            id: format!("req-{index}"),
            model: "m".into(),
            version: ok.then_some(7),
            status: if ok { ResultStatus::Ok } else { ResultStatus::Expired },
            error: (!ok).then(|| "deadline \"passed\"".to_owned()),
            outputs,
            node: index.is_multiple_of(2).then(|| format!("edge-{index}")),
            timestamp: 1_700_000_000_000 + index,
            queue_ms: 0.5 * index as f64,
            compute_ms: 1.25,
            batch_size: 4,
            finished_at: 1_700_000_000_002.5 + index as f64,
        }
    }

    /// Every field of every result comes back from the file, across two flushes (two
    /// batches), with rows without outputs in between.
    #[test]
    fn results_round_trip_through_the_ipc_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.arrows");
        let written: Vec<InferenceResult> = (0..7).map(result).collect();
        {
            let mut sink = ArrowResultSink::create(&path).unwrap();
            for (index, result) in written.iter().enumerate() {
                sink.write_result(result).unwrap();
                if index == 3 {
                    sink.flush().unwrap();
                }
            }
            sink.flush().unwrap();
            assert!(sink
                .write(b"{\"node_id\":\"edge-1\"}")
                .unwrap_err()
                .to_string()
                .contains("inference results only"));
        }
        let reader = arrow_ipc::reader::StreamReader::try_new(File::open(&path).unwrap(), None).unwrap();
        assert_eq!(reader.schema(), ArrowResultSink::schema());
        let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).collect::<Vec<_>>(), vec![4, 3]);
        let mut read = Vec::new();
        for batch in &batches {
            let strings = |name: &str| batch.column_by_name(name).unwrap().as_string::<i32>().clone();
            let f64s = |name: &str| batch.column_by_name(name).unwrap().as_primitive::<Float64Type>().clone();
            let (id, model, status, error, node) =
                (strings("id"), strings("model"), strings("status"), strings("error"), strings("node"));
            let version = batch.column_by_name("version").unwrap().as_primitive::<UInt64Type>().clone();
            let timestamp =
                batch.column_by_name("timestamp").unwrap().as_primitive::<TimestampMillisecondType>().clone();
            let (queue, compute, finished) = (f64s("queue_ms"), f64s("compute_ms"), f64s("finished_at"));
            let batch_size =
                batch.column_by_name("batch_size").unwrap().as_primitive::<arrow_array::types::UInt32Type>();
            let outputs = batch.column_by_name("outputs").unwrap().as_map();
            for row in 0..batch.num_rows() {
                let entries = outputs.value(row);
                let names = entries.column(0).as_string::<i32>();
                let values = entries.column(1).as_struct();
                let mut tensors = BTreeMap::new();
                for entry in 0..entries.len() {
                    let shape = values.column(0).as_list::<i32>().value(entry);
                    let data = values.column(1).as_list::<i32>().value(entry);
                    tensors.insert(
                        names.value(entry).to_owned(),
                        Tensor {
                            shape: shape.as_primitive::<UInt64Type>().values().iter().map(|&d| d as usize).collect(),
                            data: data.as_primitive::<Float32Type>().values().to_vec(),
                        },
                    );
                }
                let text =
                    |column: &arrow_array::StringArray| (!column.is_null(row)).then(|| column.value(row).to_owned());
                read.push(InferenceResult {
                    id: id.value(row).to_owned(),
                    model: model.value(row).to_owned(),
                    version: (!version.is_null(row)).then(|| version.value(row)),
                    status: ResultStatus::ALL.into_iter().find(|s| s.as_str() == status.value(row)).unwrap(),
                    error: text(&error),
                    outputs: tensors,
                    node: text(&node),
                    timestamp: timestamp.value(row) as u64,
                    queue_ms: queue.value(row),
                    compute_ms: compute.value(row),
                    batch_size: batch_size.value(row),
                    finished_at: finished.value(row),
                });
            }
        }
        assert_eq!(read, written);
    }

    /// A batch goes out whenever BATCH_ROWS rows wait, not only at a flush.
    #[test]
    fn full_batches_are_written_as_they_fill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.arrows");
        {
            let mut sink = ArrowResultSink::create(&path).unwrap();
            for index in 0..(BATCH_ROWS as u64 * 2 + 5) {
                sink.write_result(&result(index)).unwrap();
            }
            assert_eq!(sink.columns.rows(), 5, "two full batches left the builders");
        }
        let reader = arrow_ipc::reader::StreamReader::try_new(File::open(&path).unwrap(), None).unwrap();
        let rows: Vec<usize> = reader.map(|batch| batch.unwrap().num_rows()).collect();
        assert_eq!(rows, vec![BATCH_ROWS, BATCH_ROWS, 5], "the rest is written when the sink closes");
    }

    #[test]
    fn an_unwritable_path_is_a_clear_error() {
        let err = ArrowResultSink::create(Path::new("/nonexistent-dir/results.arrows")).unwrap_err();
        assert!(err.to_string().contains("cannot write `/nonexistent-dir/results.arrows`"), "{err}");
    }
}
