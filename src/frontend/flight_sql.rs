//! Arrow Flight SQL on the client port, so ADBC, the Flight SQL JDBC driver, pyarrow
//! and BI tools can query the region as one database.
//!
//! The service is a front end of the same [`FederationService`](crate::frontend::FederationService) as `Federation.Query`:
//! the caller is the certificate's identity, admission, planning, member scans,
//! audit and metrics are the same. What Flight SQL adds:
//!
//! - statements, whose ticket is the SQL text itself, and prepared statements with
//!   parameters, whose handle is the SQL and, once bound over `DoPut`, the values
//!   (the protocol's updated handle): the gateway keeps nothing per statement, and a
//!   ticket or handle is run as whoever presents it, like the SQL it carries. The
//!   values are bound into the plan as typed values, never written into SQL;
//! - the catalog calls clients use to list tables and columns: one catalog named
//!   after the region, one schema `canonical`, one table per canonical dataset; the
//!   type list (`GetXdbcTypeInfo`) of the canonical types; the key calls, which are
//!   empty because canonical datasets declare no keys;
//! - the per-member summary: every answer ends with an empty record batch whose
//!   `app_metadata` is the summary as JSON. An answer missing members fails unless
//!   the caller sent the call header `x-fedgate-allow-partial: true`; then the rows
//!   come with a summary that says `"partial": true`.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetCrossReference,
    CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys, CommandGetPrimaryKeys,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, Nullable,
    ProstMessageExt, Searchable, SqlInfo, TicketStatementQuery, XdbcDataType,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc,
    Ticket,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{ParamValues, ScalarValue};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{Ask, Current, Outcome, Started};
use crate::error::Error;
use crate::proto::grpc_timeout;
use crate::trust::identity::Principal;
use crate::trust::tls::caller;

/// The call header that lets an answer miss members (as `allow_partial`).
pub const ALLOW_PARTIAL_HEADER: &str = "x-fedgate-allow-partial";

/// The one schema name the canonical datasets are listed under.
pub const SCHEMA_NAME: &str = crate::coordinator::CANONICAL_SCHEMA;

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// Flight SQL under the configuration in force when each call arrives.
#[derive(Clone)]
pub struct FlightSql {
    current: Current,
}

impl FlightSql {
    /// The service over the gateway's live configuration.
    pub fn new(current: Current) -> FlightSql {
        FlightSql { current }
    }
}

fn allow_partial<T>(req: &Request<T>) -> bool {
    req.metadata()
        .get(ALLOW_PARTIAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The SQL a ticket or prepared-statement handle carries.
fn sql_of(bytes: &[u8], what: &str) -> Result<String, Status> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::InvalidQuery(format!("the {what} is not UTF-8 SQL")).to_status())
}

fn flight_error(e: FlightError) -> Status {
    Status::internal(e.to_string())
}

fn arrow_status(e: impl std::fmt::Display) -> Status {
    Error::Internal(format!("arrow: {e}")).to_status()
}

/// What a prepared statement's handle carries. The handle lives with the client: the
/// SQL, and once the client bound values over `DoPut`, those values as one row of
/// Arrow IPC (Flight SQL lets the server answer `DoPut` with an updated handle, so a
/// stateless server can take parameters). A handle is run as whoever presents it,
/// so a forged one can do no more than the SQL and values it carries.
#[derive(Clone, PartialEq, prost::Message)]
struct Handle {
    #[prost(string, tag = "1")]
    sql: String,
    #[prost(bytes = "vec", optional, tag = "2")]
    params: Option<Vec<u8>>,
}

/// The first bytes of every handle this gateway issues.
const HANDLE_PREFIX: &[u8] = b"fedgate.prepared.v1:";

/// The most bytes of Arrow IPC a bound parameter row may take (the values of one
/// row; a larger row is refused at `DoPut`).
const MAX_PARAM_BYTES: usize = 1 << 20;

impl Handle {
    fn encode_handle(&self) -> Vec<u8> {
        let mut out = HANDLE_PREFIX.to_vec();
        self.encode(&mut out).expect("a Vec grows as needed");
        out
    }

    fn decode_handle(bytes: &[u8]) -> Result<Handle, Status> {
        let bad = || {
            Error::InvalidQuery(
                "the prepared statement handle was not issued by a fedgate gateway; \
                 create the prepared statement again"
                    .into(),
            )
            .to_status()
        };
        let body = bytes.strip_prefix(HANDLE_PREFIX).ok_or_else(bad)?;
        Handle::decode(body).map_err(|_| bad())
    }

    /// The bound values, in placeholder order (`$1` or the first `?` first).
    fn values(&self) -> Result<Option<ParamValues>, Status> {
        let Some(ipc) = &self.params else {
            return Ok(None);
        };
        if ipc.len() > MAX_PARAM_BYTES {
            return Err(Error::InvalidQuery(format!(
                "the prepared statement handle's values take {} bytes, more than the {MAX_PARAM_BYTES} allowed",
                ipc.len()
            ))
            .to_status());
        }
        let batch = row_from_ipc(ipc)?;
        check_value_types(&batch)?;
        let values = (0..batch.num_columns())
            .map(|i| ScalarValue::try_from_array(batch.column(i), 0).map(Into::into))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidQuery(format!("a bound parameter: {e}")).to_status())?;
        Ok(Some(ParamValues::List(values)))
    }
}

/// The most messages a `DoPut` of values may take.
const MAX_PARAM_MESSAGES: usize = 16;

/// How long a `DoPut` of values may take to arrive.
const PARAM_READ_TIME: Duration = Duration::from_secs(30);

/// Bound values are of the kinds a canonical query compares with: numbers, text,
/// booleans, dates and NULL. Anything else (lists, structs, time zones the gateway
/// does not know) is refused by name before it reaches the planner.
fn check_value_types(row: &RecordBatch) -> Result<(), Status> {
    for f in row.schema().fields() {
        let ok = matches!(
            f.data_type(),
            DataType::Null
                | DataType::Boolean
                | DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64
                | DataType::Float32
                | DataType::Float64
                | DataType::Decimal128(..)
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Date32
                | DataType::Date64
        );
        if !ok {
            return Err(Error::InvalidQuery(format!(
                "binding parameters: the value {:?} is of type {}; values are numbers, text, \
                 booleans, dates or NULL",
                f.name(),
                f.data_type()
            ))
            .to_status());
        }
    }
    Ok(())
}

/// One row of bound values as an Arrow IPC stream.
fn row_to_ipc(row: &RecordBatch) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &row.schema())
        .map_err(arrow_status)?;
    w.write(row).map_err(arrow_status)?;
    w.finish().map_err(arrow_status)?;
    drop(w);
    Ok(out)
}

/// The row of bound values a handle carries (checked: one row).
fn row_from_ipc(ipc: &[u8]) -> Result<RecordBatch, Status> {
    let bad = |why: String| {
        Error::InvalidQuery(format!("the prepared statement handle's values: {why}")).to_status()
    };
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(ipc, None)
        .map_err(|e| bad(e.to_string()))?;
    let mut rows = None;
    for b in reader {
        let b = b.map_err(|e| bad(e.to_string()))?;
        if b.num_rows() == 0 {
            continue;
        }
        if rows.is_some() || b.num_rows() != 1 {
            return Err(bad("more than one row".into()));
        }
        rows = Some(b);
    }
    rows.ok_or_else(|| bad("no row".into()))
}

/// The parameter schema of a prepared statement: `$1`, `$2`, ... with the types the
/// planner infers (`Null` where it cannot).
fn parameter_schema(types: &[Option<DataType>]) -> Schema {
    Schema::new(
        types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Field::new(
                    format!("${}", i + 1),
                    t.clone().unwrap_or(DataType::Null),
                    true,
                )
            })
            .collect::<Vec<_>>(),
    )
}

/// The canonical types, as `GetXdbcTypeInfo` lists them.
fn xdbc_types() -> &'static XdbcTypeInfoData {
    static TYPES: OnceLock<XdbcTypeInfoData> = OnceLock::new();
    TYPES.get_or_init(|| {
        let mut b = XdbcTypeInfoDataBuilder::new();
        // (name, type, column size, literal prefix/suffix, case sensitive, searchable)
        let types = [
            (
                "BIGINT",
                XdbcDataType::XdbcBigint,
                Some(19),
                None,
                false,
                Searchable::Basic,
            ),
            (
                "BOOLEAN",
                XdbcDataType::XdbcBit,
                Some(1),
                None,
                false,
                Searchable::Basic,
            ),
            (
                "DATE",
                XdbcDataType::XdbcDate,
                Some(10),
                Some("DATE '"),
                false,
                Searchable::Basic,
            ),
            (
                "DOUBLE",
                XdbcDataType::XdbcDouble,
                Some(15),
                None,
                false,
                Searchable::Basic,
            ),
            (
                "VARCHAR",
                XdbcDataType::XdbcVarchar,
                None,
                Some("'"),
                true,
                Searchable::Full,
            ),
        ];
        for (name, ty, size, prefix, case_sensitive, searchable) in types {
            b.append(XdbcTypeInfo {
                type_name: name.into(),
                data_type: ty,
                column_size: size,
                literal_prefix: prefix.map(Into::into),
                literal_suffix: prefix.map(|_| "'".into()),
                create_params: None,
                nullable: Nullable::NullabilityNullable,
                case_sensitive,
                searchable,
                unsigned_attribute: matches!(
                    ty,
                    XdbcDataType::XdbcBigint | XdbcDataType::XdbcDouble
                )
                .then_some(false),
                fixed_prec_scale: false,
                auto_increment: None,
                local_type_name: Some(name.into()),
                minimum_scale: None,
                maximum_scale: None,
                sql_data_type: ty,
                datetime_subcode: None,
                num_prec_radix: matches!(ty, XdbcDataType::XdbcBigint | XdbcDataType::XdbcDouble)
                    .then_some(10),
                interval_precision: None,
            });
        }
        b.build().expect("static type info builds")
    })
}

/// The schema of `GetPrimaryKeys` answers.
fn primary_keys_schema() -> SchemaRef {
    let text = |n: &str, nullable| Field::new(n, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("catalog_name", true),
        text("db_schema_name", true),
        text("table_name", false),
        text("column_name", false),
        text("key_name", true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

/// The schema of `GetExportedKeys`, `GetImportedKeys` and `GetCrossReference`.
fn foreign_keys_schema() -> SchemaRef {
    let text = |n: &str, nullable| Field::new(n, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}

/// What the server says about itself (GetSqlInfo).
fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "fedgate");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.build().expect("static SQL info builds")
    })
}

/// A FlightInfo whose one endpoint's ticket is `ticket` (a Flight SQL command).
fn info(
    schema: &Schema,
    ticket: &impl ProstMessageExt,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(arrow_status)?
        .with_endpoint(endpoint)
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

/// One batch as a complete Flight stream.
fn one_batch(schema: SchemaRef, batch: RecordBatch) -> Response<DoGetStream> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async { Ok(batch) }))
        .map_err(flight_error);
    Response::new(Box::pin(stream))
}

/// The final message of an answer: an empty batch carrying the summary as JSON.
fn summary_message(schema: &Schema, summary: &serde_json::Value) -> Result<FlightData, Status> {
    let empty = RecordBatch::new_empty(Arc::new(schema.clone()));
    let mut data =
        arrow_flight::utils::batches_to_flight_data(schema, vec![empty]).map_err(arrow_status)?;
    let mut last = data
        .pop()
        .ok_or_else(|| Status::internal("encoding the summary batch gave no message"))?;
    last.app_metadata = serde_json::to_vec(summary)
        .map_err(|e| Status::internal(e.to_string()))?
        .into();
    Ok(last)
}

/// Streams a started query as Flight data: schema, batches, the summary message,
/// then the error if the answer is incomplete.
fn answer(started: Started, observer_bytes: impl Fn(u64) + Send + Sync + 'static) -> DoGetStream {
    let Started {
        schema,
        batches,
        outcome,
        ..
    } = started;
    let batches = batches.map(Ok);
    let data = FlightDataEncoderBuilder::new()
        .with_schema(schema.clone())
        .build(batches)
        .map_err(flight_error)
        .inspect_ok(move |d| observer_bytes((d.data_header.len() + d.data_body.len()) as u64));
    let tail = futures::stream::once(async move {
        let mut out = Vec::new();
        let Outcome { summary, failure } = outcome.wait().await;
        if let Some(s) = summary {
            out.push(summary_message(
                &schema,
                &crate::frontend::http::summary_json(&s),
            ));
        }
        if let Some(e) = failure {
            out.push(Err(e.to_status()));
        }
        futures::stream::iter(out)
    })
    .flatten();
    Box::pin(data.chain(tail))
}

impl FlightSql {
    async fn run<T>(
        &self,
        request: &Request<T>,
        sql: String,
        params: Option<ParamValues>,
    ) -> Result<Response<DoGetStream>, Status> {
        let origin = caller(request)?;
        let partial = allow_partial(request);
        let timeout = grpc_timeout(request);
        let assertion = super::query::assertion_of(request);
        let g = self.current.load();
        let ask = Ask {
            params,
            allow_partial: partial,
            timeouts: timeout.into_iter().collect(),
            assertion,
            ..Ask::sql(sql)
        };
        let started = g.start(origin, ask).await.map_err(|e| e.to_status())?;
        let observer = g.observer().clone();
        Ok(Response::new(answer(started, move |n| {
            observer.bytes_sent("client", n)
        })))
    }

    /// The answer schema of `sql` and its placeholders' inferred types, without
    /// binding or running it.
    async fn describe(&self, sql: &str) -> Result<(SchemaRef, Vec<Option<DataType>>), Status> {
        let g = self.current.load();
        g.coordinator()
            .describe(sql)
            .await
            .map_err(|e| e.to_status())
    }

    /// The schema the answer to `sql` (with `params` bound) will be streamed with,
    /// from the plan it will run.
    async fn schema_of(
        &self,
        origin: Principal,
        sql: &str,
        params: Option<ParamValues>,
    ) -> Result<SchemaRef, Status> {
        let g = self.current.load();
        g.coordinator()
            .schema_of(origin, sql, params)
            .await
            .map_err(|e| e.to_status())
    }

    fn tables_batch(&self, query: CommandGetTables) -> Result<RecordBatch, Status> {
        let g = self.current.load();
        let region = &g.config().region;
        let mut b = query.into_builder();
        for d in &region.datasets {
            b.append(&region.name, SCHEMA_NAME, &d.name, "TABLE", &d.schema)
                .map_err(arrow_status)?;
        }
        b.build().map_err(arrow_status)
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let origin = caller(&request)?;
        let schema = self.schema_of(origin, &query.query, None).await?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        info(&schema, &ticket, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let sql = sql_of(&ticket.statement_handle, "ticket")?;
        self.run(&request, sql, None).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let origin = caller(&request)?;
        let (mut schema, types) = self.describe(&query.query).await?;
        // Without placeholders, the schema of the plan that will run (the planner's
        // answer schema may say a column cannot be null where the streamed one says
        // it can; clients compare the two).
        if types.is_empty() {
            schema = self.schema_of(origin, &query.query, None).await?;
        }
        let ipc = |schema: &Schema| -> Result<_, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
                .try_into()
                .map_err(arrow_status)?;
            Ok(bytes)
        };
        let handle = Handle {
            sql: query.query,
            params: None,
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.encode_handle().into(),
            dataset_schema: ipc(&schema)?,
            parameter_schema: if types.is_empty() {
                Default::default()
            } else {
                ipc(&parameter_schema(&types))?
            },
        })
    }

    /// Binds values to a prepared statement: one row whose columns are the
    /// placeholders in order. The answer is an updated handle that carries them.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        caller(&request)?;
        let mut handle = Handle::decode_handle(&query.prepared_statement_handle)?;
        let bad =
            |why: String| Error::InvalidQuery(format!("binding parameters: {why}")).to_status();
        // What is read is bounded before it is decoded: a few messages of at most
        // twice the values' limit in all (a stream of dictionary deltas, say, would
        // otherwise grow without end), within the call's time.
        let mut taken = (0usize, 0usize);
        let data = request.into_inner().map(move |m| {
            let m = m.map_err(|s| FlightError::Tonic(Box::new(s)))?;
            taken.0 += 1;
            taken.1 += m.data_header.len() + m.data_body.len() + m.app_metadata.len();
            if taken.0 > MAX_PARAM_MESSAGES || taken.1 > 2 * MAX_PARAM_BYTES {
                return Err(FlightError::ProtocolError(format!(
                    "more than {MAX_PARAM_MESSAGES} messages or {} bytes of values",
                    2 * MAX_PARAM_BYTES
                )));
            }
            Ok(m)
        });
        let mut batches = FlightRecordBatchStream::new_from_flight_data(data);
        let mut row: Option<RecordBatch> = None;
        let read = async {
            while let Some(b) = batches.next().await {
                let b = b.map_err(|e| bad(e.to_string()))?;
                if b.num_rows() == 0 {
                    continue;
                }
                // One execution per prepared statement: several rows would ask for one
                // answer per row, which Flight SQL's single result stream cannot tell
                // apart.
                if row.is_some() || b.num_rows() > 1 {
                    return Err(bad(
                        "one row of values is bound at a time; execute once per row".into(),
                    ));
                }
                row = Some(b);
            }
            Ok(())
        };
        tokio::time::timeout(PARAM_READ_TIME, read)
            .await
            .map_err(|_| {
                bad(format!(
                    "the values did not arrive within {PARAM_READ_TIME:?}"
                ))
            })??;
        let row = row.ok_or_else(|| bad("no row of values was sent".into()))?;
        // Whether the values fit the placeholders is checked where they are bound
        // into the plan, when the statement is executed: planning it here as well
        // would plan every execution twice.
        check_value_types(&row)?;
        let ipc = row_to_ipc(&row)?;
        if ipc.len() > MAX_PARAM_BYTES {
            return Err(bad(format!(
                "the values take {} bytes, more than the {MAX_PARAM_BYTES} allowed",
                ipc.len()
            )));
        }
        handle.params = Some(ipc);
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle.encode_handle().into()),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // The handle is the SQL itself; nothing is held on the server.
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let origin = caller(&request)?;
        let handle = Handle::decode_handle(&cmd.prepared_statement_handle)?;
        let params = handle.values()?;
        let schema = self.schema_of(origin, &handle.sql, params).await?;
        info(&schema, &cmd, request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let handle = Handle::decode_handle(&cmd.prepared_statement_handle)?;
        let params = handle.values()?;
        self.run(&request, handle.sql, params).await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let schema = query.into_builder().schema();
        info(&schema, &query, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append(&self.current.load().config().region.name);
        let schema = b.schema();
        Ok(one_batch(schema, b.build().map_err(arrow_status)?))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let schema = query.clone().into_builder().schema();
        info(&schema, &query, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append(&self.current.load().config().region.name, SCHEMA_NAME);
        let schema = b.schema();
        Ok(one_batch(schema, b.build().map_err(arrow_status)?))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let schema = query.clone().into_builder().schema();
        info(&schema, &query, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(one_batch(schema, self.tables_batch(query)?))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let schema = query.into_builder().schema();
        info(&schema, &query, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append("TABLE");
        let schema = b.schema();
        Ok(one_batch(schema, b.build().map_err(arrow_status)?))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let schema = query.clone().into_builder(sql_info()).schema();
        info(&schema, &query, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let b = query.into_builder(sql_info());
        let schema = b.schema();
        Ok(one_batch(schema, b.build().map_err(arrow_status)?))
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let schema = query.into_builder(xdbc_types()).schema();
        info(&schema, &query, request.into_inner())
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let b = query.into_builder(xdbc_types());
        let schema = b.schema();
        Ok(one_batch(schema, b.build().map_err(arrow_status)?))
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        info(&primary_keys_schema(), &query, request.into_inner())
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let schema = primary_keys_schema();
        Ok(one_batch(schema.clone(), RecordBatch::new_empty(schema)))
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        info(&foreign_keys_schema(), &query, request.into_inner())
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let schema = foreign_keys_schema();
        Ok(one_batch(schema.clone(), RecordBatch::new_empty(schema)))
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        info(&foreign_keys_schema(), &query, request.into_inner())
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let schema = foreign_keys_schema();
        Ok(one_batch(schema.clone(), RecordBatch::new_empty(schema)))
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        info(&foreign_keys_schema(), &query, request.into_inner())
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let schema = foreign_keys_schema();
        Ok(one_batch(schema.clone(), RecordBatch::new_empty(schema)))
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        Err(Status::unimplemented(format!(
            "fedgate does not serve the Flight SQL ticket {}; it serves queries \
             (statements and prepared statements) and the catalog calls; it changes no data",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
