//! The Arrow Flight SQL server over a pipeline's live tables.
//!
//! - Queries: `CommandStatementQuery` and prepared statements (with `$1`-style parameters
//!   bound by `DoPut`). `GetFlightInfo` plans the query and pins its time; the ticket names
//!   the planned query, so `DoGet` sends exactly the schema that `FlightInfo` gave, the time
//!   included (metadata key `edgeflow.as_of`), and streams the batches as DataFusion makes
//!   them.
//! - Catalog: `GetCatalogs` (`edgeflow`), `GetDbSchemas` (`live`), `GetTables` (with or
//!   without each table's schema), `GetTableTypes` (`TABLE`), `GetSqlInfo`.
//! - Security: every call but the handshake needs `authorization: Bearer TOKEN` with a
//!   configured token (compared in constant time); the handshake takes `Basic` credentials
//!   whose password is a token and answers with the bearer header. Without configured
//!   tokens (loopback only, see the `serve` section) calls need none. TLS with `rustls`,
//!   optionally requiring client certificates.
//! - Errors: bad SQL, unknown tables and parameters are `InvalidArgument` with DataFusion's
//!   message; a table that has completed no time yet is `Unavailable`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    Any, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use futures::{Stream, TryStreamExt};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::query::{Planned, QueryEngine, QueryError, CATALOG, HOLD, SCHEMA};
use crate::config::serve::FlightConfig;

/// The type URL of a subscription ticket (a protobuf `Any` whose value is the SQL).
pub const SUBSCRIBE_TYPE: &str = "type.googleapis.com/edgeflow.Subscribe";

/// The table type every live table has in `GetTables`.
const TABLE_TYPE: &str = "TABLE";

type DataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// The Flight SQL service over one pipeline's tables.
#[derive(Clone)]
pub struct LiveFlightSql {
    engine: QueryEngine,
    /// SHA-256 of each accepted token (none: no authentication).
    tokens: Arc<Vec<[u8; 32]>>,
    /// Queries planned by `GetFlightInfo`, waiting for their `DoGet`.
    planned: Arc<Mutex<HashMap<u64, (Instant, Planned)>>>,
    /// Prepared statements: their SQL and bound parameters.
    prepared: Arc<Mutex<HashMap<u64, Prepared>>>,
    next_id: Arc<AtomicU64>,
    sql_info: Arc<SqlInfoData>,
}

impl std::fmt::Debug for LiveFlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFlightSql").field("tokens", &self.tokens.len()).finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
struct Prepared {
    sql: String,
    params: Option<Vec<ScalarValue>>,
}

/// What a statement ticket carries: the planned query's number, and its SQL and parameters
/// to plan it again if the planned one has gone (expired, or fetched twice).
#[derive(serde::Serialize, serde::Deserialize)]
struct TicketBody {
    id: u64,
    sql: String,
    #[serde(default)]
    params: Option<Vec<String>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `presented` is one of `tokens`, comparing digests in constant time.
fn accepted(tokens: &[[u8; 32]], presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    let presented = digest(presented);
    tokens.iter().fold(subtle::Choice::from(0), |found, token| found | token.ct_eq(&presented)).into()
}

fn status_of(err: QueryError) -> Status {
    match err {
        QueryError::Sql(message) => Status::invalid_argument(message),
        QueryError::Snapshot(err @ super::store::SnapshotError::Unknown(_)) => {
            Status::invalid_argument(err.to_string())
        }
        QueryError::Snapshot(err) => Status::unavailable(err.to_string()),
        QueryError::Execution(message) => Status::internal(message),
    }
}

fn internal(what: &str, err: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {err}"))
}

impl LiveFlightSql {
    /// The service answering with `engine`, accepting `tokens`.
    pub fn new(engine: QueryEngine, tokens: &[String]) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "edgeflow");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        let sql_info = info.build().expect("the SQL info values have their documented types");
        Self {
            engine,
            tokens: Arc::new(tokens.iter().map(|t| digest(t)).collect()),
            planned: Arc::default(),
            prepared: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            sql_info: Arc::new(sql_info),
        }
    }

    /// The gRPC service to serve.
    pub fn into_service(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self).max_decoding_message_size(64 << 20)
    }

    /// Refuses a call without an accepted bearer token (when tokens are configured).
    fn authorize(&self, metadata: &MetadataMap) -> Result<(), Status> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("no `authorization` header: send `Bearer TOKEN`"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("the `authorization` header is not text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("the `authorization` header is not `Bearer TOKEN`"))?;
        if accepted(&self.tokens, token.trim()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the token is not accepted"))
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Plans `sql` and keeps it for its `DoGet`: the `FlightInfo` with its schema and ticket.
    async fn flight_info(
        &self,
        sql: String,
        params: Option<Vec<ScalarValue>>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let planned = self.engine.plan(&sql, params.clone()).await.map_err(status_of)?;
        let schema = planned.schema.clone();
        let id = self.id();
        {
            let mut waiting = self.planned.lock().unwrap_or_else(|p| p.into_inner());
            waiting.retain(|_, (at, _)| at.elapsed() < HOLD);
            waiting.insert(id, (Instant::now(), planned));
        }
        let body = TicketBody { id, sql, params: params.map(|p| p.iter().map(encode_param).collect()) };
        let handle = serde_json::to_vec(&body).map_err(|err| internal("cannot encode the ticket", err))?;
        let ticket = TicketStatementQuery { statement_handle: handle.into() };
        let ticket = Ticket { ticket: ticket.as_any().encode_to_vec().into() };
        FlightInfo::new().try_with_schema(&schema).map_err(|err| internal("cannot encode the schema", err)).map(
            |info| {
                info.with_endpoint(FlightEndpoint::new().with_ticket(ticket))
                    .with_descriptor(descriptor)
                    .with_ordered(true)
            },
        )
    }

    /// A metadata command's `FlightInfo`: its schema, and the command itself as the ticket.
    fn command_info(
        &self,
        command: &impl ProstMessageExt,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let ticket = Ticket { ticket: command.as_any().encode_to_vec().into() };
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|err| internal("cannot encode the schema", err))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor))
    }
}

/// A stream of one batch.
fn one_batch(schema: SchemaRef, batch: Result<RecordBatch, FlightError>) -> DataStream {
    let batches = futures::stream::once(async move { batch });
    Box::pin(FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(Status::from))
}

/// A parameter as text in a ticket (its Arrow type and value), to plan a query again.
fn encode_param(value: &ScalarValue) -> String {
    serde_json::to_string(&(value.data_type().to_string(), value.to_string(), value.is_null())).unwrap_or_default()
}

fn decode_param(text: &str) -> Result<ScalarValue, Status> {
    let bad = |why: String| Status::invalid_argument(format!("the ticket's parameter `{text}` {why}"));
    let (kind, value, null): (String, String, bool) =
        serde_json::from_str(text).map_err(|err| bad(format!("does not decode: {err}")))?;
    let data_type: DataType = kind.parse().map_err(|err| bad(format!("has no type: {err}")))?;
    if null {
        return ScalarValue::try_from(&data_type).map_err(|err| bad(err.to_string()));
    }
    ScalarValue::try_from_string(value, &data_type).map_err(|err| bad(err.to_string()))
}

#[tonic::async_trait]
impl FlightSqlService for LiveFlightSql {
    type FlightService = LiveFlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let mut bearer = None;
        if !self.tokens.is_empty() {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| Status::unauthenticated("no `authorization` header: send `Basic` credentials whose password is a token, or `Bearer TOKEN`"))?;
            let token = if let Some(encoded) = header.strip_prefix("Basic ") {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| Status::unauthenticated("the `Basic` credentials are not base64"))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| Status::unauthenticated("the `Basic` credentials are not text"))?;
                let (_, password) = text
                    .split_once(':')
                    .ok_or_else(|| Status::unauthenticated("the `Basic` credentials are not `user:password`"))?;
                password.to_owned()
            } else if let Some(token) = header.strip_prefix("Bearer ") {
                token.trim().to_owned()
            } else {
                return Err(Status::unauthenticated("the `authorization` header is neither `Basic` nor `Bearer`"));
            };
            if !accepted(&self.tokens, &token) {
                return Err(Status::unauthenticated("the token is not accepted"));
            }
            bearer = Some(token);
        }
        let reply = HandshakeResponse { protocol_version: 0, payload: Default::default() };
        let mut response: Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])));
        if let Some(token) = bearer {
            let value =
                format!("Bearer {token}").parse().map_err(|_| Status::internal("the token is not a header value"))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        Ok(Response::new(self.flight_info(query.query, None, request.into_inner()).await?))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let prepared = prepared_of(&self.prepared, &query.prepared_statement_handle)?;
        Ok(Response::new(self.flight_info(prepared.sql, prepared.params, request.into_inner()).await?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        let body: TicketBody = serde_json::from_slice(&ticket.statement_handle)
            .map_err(|err| Status::invalid_argument(format!("the ticket is not one of this server's: {err}")))?;
        let waiting = self.planned.lock().unwrap_or_else(|p| p.into_inner()).remove(&body.id);
        let planned = match waiting {
            Some((_, planned)) => planned,
            None => {
                let params = body
                    .params
                    .as_ref()
                    .map(|p| p.iter().map(|t| decode_param(t)).collect::<Result<Vec<_>, _>>())
                    .transpose()?;
                self.engine.plan(&body.sql, params).await.map_err(status_of)?
            }
        };
        let schema = planned.schema.clone();
        let batches = planned.run().await.map_err(status_of)?.map_err(|err| FlightError::ExternalError(Box::new(err)));
        let stream = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.into_builder().schema();
        Ok(Response::new(self.command_info(&query, &schema, request.into_inner())?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        let schema = builder.schema();
        Ok(Response::new(one_batch(schema, builder.build())))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(self.command_info(&query, &schema, request.into_inner())?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        let schema = builder.schema();
        Ok(Response::new(one_batch(schema, builder.build())))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(self.command_info(&query, &schema, request.into_inner())?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        let mut builder = query.into_builder();
        for (name, table_schema) in self.engine.tables() {
            builder.append(CATALOG, SCHEMA, name, TABLE_TYPE, &table_schema).map_err(Status::from)?;
        }
        let schema = builder.schema();
        Ok(Response::new(one_batch(schema, builder.build())))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.into_builder().schema();
        Ok(Response::new(self.command_info(&query, &schema, request.into_inner())?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(TABLE_TYPE);
        let schema = builder.schema();
        Ok(Response::new(one_batch(schema, builder.build())))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.clone().into_builder(&self.sql_info).schema();
        Ok(Response::new(self.command_info(&query, &schema, request.into_inner())?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        let builder = query.into_builder(&self.sql_info);
        let schema = builder.schema();
        Ok(Response::new(one_batch(schema, builder.build())))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.authorize(request.metadata())?;
        let parameters = self.engine.parameters(&query.query).await.map_err(status_of)?;
        let parameter_schema = Schema::new(
            parameters
                .iter()
                .map(|(name, kind)| Field::new(name, kind.clone().unwrap_or(DataType::Utf8), true))
                .collect::<Vec<_>>(),
        );
        // The result's schema, planned with every parameter null (types are all it needs).
        let nulls = parameters
            .iter()
            .map(|(_, kind)| {
                ScalarValue::try_from(kind.as_ref().unwrap_or(&DataType::Utf8))
                    .map_err(|err| Status::invalid_argument(err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dataset = self
            .engine
            .plan(&query.query, (!nulls.is_empty()).then_some(nulls))
            .await
            .map_err(status_of)?
            .schema
            .clone();
        let id = self.id();
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Prepared { sql: query.query, params: None });
        let encode = |schema: &Schema| -> Result<prost::bytes::Bytes, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &Default::default())
                .try_into()
                .map_err(|err: arrow_schema::ArrowError| internal("cannot encode the schema", err))?;
            Ok(bytes)
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: id.to_string().into_bytes().into(),
            dataset_schema: encode(&dataset)?,
            parameter_schema: encode(&parameter_schema)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.authorize(request.metadata())?;
        let handle = query.prepared_statement_handle.clone();
        prepared_of(&self.prepared, &handle)?;
        let stream = request.into_inner().map_err(FlightError::from);
        let batches: Vec<RecordBatch> = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream)
            .try_collect()
            .await
            .map_err(|err| Status::invalid_argument(format!("the parameters do not decode: {err}")))?;
        let Some(batch) = batches.iter().find(|batch| batch.num_rows() > 0) else {
            return Err(Status::invalid_argument("no parameter values were sent"));
        };
        if batches.iter().map(RecordBatch::num_rows).sum::<usize>() > 1 {
            return Err(Status::invalid_argument("parameters for one execution only: send one row"));
        }
        let params = batch
            .columns()
            .iter()
            .map(|column: &ArrayRef| ScalarValue::try_from_array(column, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| Status::invalid_argument(format!("a parameter is not a value: {err}")))?;
        let id = handle_id(&handle)?;
        if let Some(prepared) = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            prepared.params = Some(params);
        }
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle) })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        self.authorize(request.metadata())?;
        let id = handle_id(&query.prepared_statement_handle)?;
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}

    /// Subscriptions: a ticket that is a protobuf `Any` of type [`SUBSCRIBE_TYPE`] whose
    /// value is the query's SQL (UTF-8) streams the query's changes until the client goes.
    async fn do_get_fallback(&self, request: Request<Ticket>, message: Any) -> Result<Response<DataStream>, Status> {
        self.authorize(request.metadata())?;
        if message.type_url != SUBSCRIBE_TYPE {
            return Err(Status::invalid_argument(format!(
                "this server does not answer `{}` tickets (a subscription's is `{SUBSCRIBE_TYPE}`)",
                message.type_url
            )));
        }
        let sql = String::from_utf8(message.value.to_vec())
            .map_err(|_| Status::invalid_argument("the subscription's query is not UTF-8 text"))?;
        let (schema, changes) = self.engine.subscribe(&sql).await.map_err(status_of)?;
        let changes = changes.map_err(|err| FlightError::ExternalError(Box::new(err)));
        let stream = FlightDataEncoderBuilder::new().with_schema(schema).build(changes).map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn handle_id(handle: &[u8]) -> Result<u64, Status> {
    std::str::from_utf8(handle)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Status::invalid_argument("the prepared statement's handle is not one of this server's"))
}

fn prepared_of(prepared: &Mutex<HashMap<u64, Prepared>>, handle: &[u8]) -> Result<Prepared, Status> {
    let id = handle_id(handle)?;
    prepared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned()
        .ok_or_else(|| Status::invalid_argument("no such prepared statement (closed, or from before a restart)"))
}

/// The gRPC server with `config`'s TLS, if any: the certificate, key and client CA are read
/// and checked here, so that a pipeline with unusable TLS files does not start.
pub fn server(config: &FlightConfig) -> anyhow::Result<tonic::transport::Server> {
    use anyhow::Context;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read the Flight TLS file `{}`", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        let mut settings = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &tls.client_ca {
            settings = settings.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(settings).with_context(|| {
            format!("the Flight TLS certificate `{}` or key `{}` is not usable", tls.cert.display(), tls.key.display())
        })?;
    }
    Ok(builder)
}

/// Serves `service` with `server` on `listener` until `shutdown` resolves.
pub async fn serve(
    service: LiveFlightSql,
    mut server: tonic::transport::Server,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    server
        .add_service(service.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("the Flight SQL server stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_matched_whole() {
        let tokens = vec![digest("a-very-long-token-0001")];
        assert!(accepted(&tokens, "a-very-long-token-0001"));
        assert!(!accepted(&tokens, "a-very-long-token-000"));
        assert!(!accepted(&tokens, "a-very-long-token-00011"));
        assert!(!accepted(&tokens, ""));
    }

    #[test]
    fn parameters_survive_a_ticket() {
        for value in [
            ScalarValue::Utf8(Some("n'1".into())),
            ScalarValue::Int64(Some(-3)),
            ScalarValue::Float64(Some(0.25)),
            ScalarValue::Boolean(Some(true)),
            ScalarValue::Int64(None),
        ] {
            assert_eq!(decode_param(&encode_param(&value)).unwrap(), value);
        }
    }
}
