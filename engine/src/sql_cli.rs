//! `edgeflow sql`: a query against a running pipeline's Flight SQL server, printed as a
//! table, JSON lines, CSV or an Arrow IPC stream.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::array::RecordBatch;
use futures::TryStreamExt;

/// How `edgeflow sql` prints a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table, then the time the query read as of.
    Table,
    /// One JSON object per row.
    Json,
    /// CSV with a header line.
    Csv,
    /// An Arrow IPC stream (the schema with its `edgeflow.as_of` metadata, then the batches).
    Arrow,
}

/// Where and how to query.
#[derive(Debug)]
pub struct SqlOptions {
    /// `HOST:PORT` of the server.
    pub server: String,
    /// Bearer token, if the server wants one.
    pub token: Option<String>,
    /// Connect with TLS, trusting this CA (PEM) or the system's roots.
    pub tls: bool,
    /// The CA certificate to trust (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for a server that asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The query.
    pub sql: String,
    /// Output format.
    pub format: Format,
    /// Subscribe: print the query's changes as they happen, until interrupted.
    pub subscribe: bool,
}

/// Runs the query and prints its result to standard output.
pub fn run(options: &SqlOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if options.subscribe {
        return runtime.block_on(subscribe(options));
    }
    let batches = runtime.block_on(query(options))?;
    print(&batches.0, &batches.1, options.format)
}

/// Prints the query's changes batch by batch as the server sends them.
async fn subscribe(options: &SqlOptions) -> anyhow::Result<()> {
    use arrow_flight::sql::Any;
    use datafusion::arrow;
    use prost::Message;
    let mut client = connect(options).await?;
    let any = Any {
        type_url: crate::serve::flight::SUBSCRIBE_TYPE.to_owned(),
        value: options.sql.clone().into_bytes().into(),
    };
    let ticket = arrow_flight::Ticket { ticket: any.encode_to_vec().into() };
    let mut changes = client.do_get(ticket).await.map_err(explain)?;
    let stdout = std::io::stdout();
    let mut csv_header = true;
    let mut ipc: Option<arrow::ipc::writer::StreamWriter<std::io::Stdout>> = None;
    while let Some(batch) = changes.try_next().await.map_err(explain)? {
        let mut out = stdout.lock();
        match options.format {
            Format::Table => writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&[batch])?)?,
            Format::Json => {
                let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
                writer.write(&batch)?;
                writer.finish()?;
            }
            Format::Csv => {
                let mut writer = arrow::csv::WriterBuilder::new().with_header(csv_header).build(&mut out);
                writer.write(&batch)?;
                csv_header = false;
            }
            Format::Arrow => {
                drop(out);
                let writer = match ipc.as_mut() {
                    Some(writer) => writer,
                    None => ipc.insert(arrow::ipc::writer::StreamWriter::try_new(std::io::stdout(), &batch.schema())?),
                };
                writer.write(&batch)?;
                writer.flush()?;
                continue;
            }
        }
        out.flush()?;
    }
    Ok(())
}

async fn connect(options: &SqlOptions) -> anyhow::Result<FlightSqlServiceClient<tonic::transport::Channel>> {
    let scheme = if options.tls { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", options.server))
        .with_context(|| format!("`{}` is not HOST:PORT", options.server))?;
    if options.tls {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match &options.ca {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("cannot read the CA file `{}`", ca.display()))?;
                tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = &options.identity {
            let read =
                |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()));
            tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).context("the TLS settings are not usable")?;
    }
    let channel = endpoint.connect().await.map_err(|err| {
        // The transport's own error hides the cause (a refused certificate, say) in its source.
        let mut message = format!("cannot connect to the Flight SQL server at {}: {err}", options.server);
        let mut cause = std::error::Error::source(&err);
        while let Some(inner) = cause {
            message.push_str(&format!(": {inner}"));
            cause = inner.source();
        }
        anyhow!(message)
    })?;
    let mut client = FlightSqlServiceClient::new(channel);
    if let Some(token) = &options.token {
        client.set_token(token.clone());
    }
    Ok(client)
}

async fn query(options: &SqlOptions) -> anyhow::Result<(datafusion::arrow::datatypes::SchemaRef, Vec<RecordBatch>)> {
    let mut client = connect(options).await?;
    let info = client.execute(options.sql.clone(), None).await.map_err(explain)?;
    let schema = std::sync::Arc::new(info.clone().try_decode_schema().context("the server's schema does not decode")?);
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.ok_or_else(|| anyhow!("the server sent an endpoint without a ticket"))?;
        let stream = client.do_get(ticket).await.map_err(explain)?;
        let mut fetched: Vec<RecordBatch> = stream.try_collect().await.map_err(explain)?;
        batches.append(&mut fetched);
    }
    Ok((schema, batches))
}

/// The server's message, without the transport's wrapping.
fn explain(err: arrow_flight::error::FlightError) -> anyhow::Error {
    match err {
        arrow_flight::error::FlightError::Tonic(status) => {
            anyhow!("the server refused the query ({:?}): {}", status.code(), status.message())
        }
        other => anyhow!("{other}"),
    }
}

fn print(
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    format: Format,
) -> anyhow::Result<()> {
    use datafusion::arrow;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Table => {
            writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(batches)?)?;
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            let as_of = schema.metadata().get(crate::serve::query::AS_OF_KEY).and_then(|t| t.parse::<i64>().ok());
            match as_of {
                Some(millis) => writeln!(out, "({rows} rows, as of {} = {millis} ms)", format_time(millis))?,
                None => writeln!(out, "({rows} rows)")?,
            }
        }
        Format::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Format::Csv if batches.is_empty() => {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            writeln!(out, "{}", names.join(","))?;
        }
        Format::Csv => {
            let mut writer = arrow::csv::Writer::new(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Arrow => {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    out.flush()?;
    Ok(())
}

fn format_time(millis: i64) -> String {
    match datafusion::arrow::temporal_conversions::timestamp_ms_to_datetime(millis) {
        Some(time) => time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => millis.to_string(),
    }
}
