//! Arrow Flight SQL on the client port, so ADBC, the Flight SQL JDBC driver, pyarrow
//! and BI tools can query the region as one database.
//!
//! The service is a front end of the same [`FederationService`](crate::frontend::FederationService) as `Federation.Query`:
//! the caller is the certificate's identity, admission, planning, member scans,
//! audit and metrics are the same. What Flight SQL adds:
//!
//! - statements and prepared statements (without parameters) whose ticket or handle
//!   is the SQL text itself, run as whoever presents it;
//! - the catalog calls clients use to list tables and columns: one catalog named
//!   after the region, one schema `canonical`, one table per canonical dataset;
//! - the per-member summary: every answer ends with an empty record batch whose
//!   `app_metadata` is the summary as JSON. An answer missing members fails unless
//!   the caller sent the call header `x-fedgate-allow-partial: true`; then the rows
//!   come with a summary that says `"partial": true`.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc,
    Ticket,
};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::arrow::record_batch::RecordBatch;
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
    let batches = tokio_stream::wrappers::ReceiverStream::new(batches).map(Ok);
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
    async fn run(
        &self,
        origin: Principal,
        sql: String,
        partial: bool,
        timeout: Option<Duration>,
        assertion: Option<std::sync::Arc<Vec<u8>>>,
    ) -> Result<Response<DoGetStream>, Status> {
        let g = self.current.load();
        let ask = Ask {
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

    async fn schema_of(&self, origin: Principal, sql: &str) -> Result<SchemaRef, Status> {
        let g = self.current.load();
        g.coordinator()
            .schema_of(origin, sql)
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
        let schema = self.schema_of(origin, &query.query).await?;
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
        let origin = caller(&request)?;
        let sql = sql_of(&ticket.statement_handle, "ticket")?;
        self.run(
            origin,
            sql,
            allow_partial(&request),
            grpc_timeout(&request),
            super::query::assertion_of(&request),
        )
        .await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let origin = caller(&request)?;
        let schema = self.schema_of(origin, &query.query).await?;
        let IpcMessage(schema_bytes) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(arrow_status)?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: schema_bytes,
            parameter_schema: Default::default(),
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
        let sql = sql_of(&cmd.prepared_statement_handle, "handle")?;
        let schema = self.schema_of(origin, &sql).await?;
        info(&schema, &cmd, request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let origin = caller(&request)?;
        let sql = sql_of(&cmd.prepared_statement_handle, "handle")?;
        self.run(
            origin,
            sql,
            allow_partial(&request),
            grpc_timeout(&request),
            super::query::assertion_of(&request),
        )
        .await
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

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        Err(Status::unimplemented(format!(
            "fedgate does not serve the Flight SQL ticket {}; it serves statements, \
             prepared statements and the catalog calls",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
