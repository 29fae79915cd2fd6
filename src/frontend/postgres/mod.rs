//! The PostgreSQL wire protocol on its own port, so psql, the PostgreSQL JDBC and ODBC
//! drivers, psycopg, SQLAlchemy and the BI tools built on them can query the region.
//!
//! It is a front end like the others: every query goes through the one entry point,
//! [`FederationService::start`](crate::frontend::FederationService::start), as the
//! identity of the client certificate, so admission, audit, members' rules and the
//! partial-answer policy are the same as on the gRPC, Flight SQL and HTTP ports.
//! What this door adds:
//!
//! - **Identity**: TLS with a client certificate from the region CA, required before
//!   the session starts (a connection without TLS, or whose identity the region does
//!   not know, is refused with SQLSTATE 28000). The user name a client sends is not an
//!   identity: the certificate is.
//! - **Protocol** (pgwire): simple and extended query protocol; parameters are bound as
//!   typed values into the plan, never spliced into SQL; answers stream with the
//!   client's fetch size (portal suspension), so a large answer holds a batch, not the
//!   answer; cancel requests cancel the federated query; errors carry the SQLSTATE of
//!   their kind ([`Error::sqlstate`]).
//! - **Catalog** ([`catalog`]): `pg_catalog` and `information_schema` over the
//!   canonical datasets' schemas, answered here without reading any rows.
//! - **Settings** ([`session`]): `SET fedgate.purpose`, `fedgate.allow_partial`,
//!   `fedgate.timeout` (and `statement_timeout`); every answer ends with a notice of
//!   its per-member summary, a `WARNING` when the answer is partial.

pub mod catalog;
pub mod session;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, into_pg_type};
use arrow_pg::row_encoder::RowEncoder;
use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser as SqlParser;
use futures::{Sink, SinkExt, Stream, StreamExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{
    ExtendedQueryHandler, SimpleQueryHandler, send_execution_response, send_query_response,
    send_ready_for_query,
};
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::data::DataRow;
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::response::{EmptyQueryResponse, NoticeResponse};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;
use tokio::net::TcpListener;

use self::catalog::{Catalog, Catalogs, Route};
use self::session::{Command, Notice, Session};
use super::{Ask, Current, Outcome, Started};
use crate::error::{Error, Result};

/// The PostgreSQL door of one gateway, shared by its connections.
pub struct Door {
    current: Current,
    catalogs: Catalogs,
    /// Sessions by backend process id, for cancel requests (which arrive on a
    /// connection of their own, naming the process id and secret key).
    sessions: Mutex<HashMap<i32, (SecretKey, Weak<Session>)>>,
    /// Process ids (counted) and secret keys (random) for cancel requests.
    keys: RandomPidSecretKeyGenerator,
    /// One permit per open session (`[postgres] max_connections`).
    connections: Arc<tokio::sync::Semaphore>,
}

/// The handlers pgwire asks for, all backed by one [`Door`].
#[derive(Clone)]
pub struct Handlers(Arc<Door>);

/// A parsed statement of the extended protocol.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// A session statement (`SET`, `SHOW`, `BEGIN`, ...).
    Command(Command),
    /// A catalog query, planned at this gateway.
    Catalog(Box<LogicalPlan>),
    /// A query of the canonical datasets: its text, answer schema and the types the
    /// planner inferred for its placeholders (`$1`, `$2`, ...).
    Datasets {
        sql: String,
        schema: SchemaRef,
        params: Vec<Option<DataType>>,
    },
}

/// The extended protocol's parser (it plans, to describe parameters and answers).
pub struct Parser(Arc<Door>);

impl Door {
    /// A door over the configuration versions `current` yields.
    pub fn new(current: Current, max_connections: usize) -> Arc<Door> {
        Arc::new(Door {
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            current,
            catalogs: Catalogs::default(),
            sessions: Mutex::new(HashMap::new()),
            keys: RandomPidSecretKeyGenerator::default(),
        })
    }

    /// The identity of a connection's client certificate, if the region knows it.
    fn identify<C: ClientInfo>(&self, client: &C) -> Result<crate::trust::identity::Principal> {
        if !client.is_secure() {
            return Err(Error::Unauthenticated(
                "this port takes TLS connections with a client certificate from the region \
                 CA only (libpq: sslmode=verify-full sslrootcert=... sslcert=... sslkey=...)"
                    .into(),
            ));
        }
        let cert = client
            .client_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| {
                Error::Unauthenticated(
                    "the connection presented no client certificate; present one issued by \
                     the region CA (libpq: sslcert=... sslkey=...)"
                        .into(),
                )
            })?;
        let p = crate::trust::identity::principal_from_cert(cert.as_ref())?;
        super::known_identity(&self.current.load().config().region, &p)?;
        Ok(p)
    }

    fn remember(&self, pid: i32, key: SecretKey, s: &Arc<Session>) {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, w)| w.strong_count() > 0);
        m.insert(pid, (key, Arc::downgrade(s)));
    }

    fn catalog(&self) -> Result<Arc<Catalog>> {
        self.catalogs.of(self.current.load().config())
    }

    /// Plans one statement's text (for the extended protocol's Parse).
    async fn prepare(&self, sql: &str) -> Result<Option<Prepared>> {
        check_length(sql)?;
        if sql.trim().trim_end_matches(';').trim().is_empty() {
            return Ok(None);
        }
        if let Some(c) = session::command(sql) {
            return Ok(Some(Prepared::Command(c)));
        }
        let stmt = parse_one(sql)?;
        let catalog = self.catalog()?;
        match catalog.route(&stmt)? {
            Route::Catalog => Ok(Some(Prepared::Catalog(Box::new(catalog.plan(sql).await?)))),
            Route::Datasets => {
                let g = self.current.load();
                let (schema, params) = g.coordinator().describe(sql).await?;
                Ok(Some(Prepared::Datasets {
                    sql: sql.to_string(),
                    schema,
                    params,
                }))
            }
        }
    }

    /// The response to a session statement.
    fn command(&self, session: &Session, c: &Command, format: &Format) -> Result<Response> {
        Ok(match c {
            Command::Set { name, value } => {
                session.set(name, value)?;
                Response::Execution(Tag::new("SET"))
            }
            Command::Reset { name } => {
                session.reset(name);
                Response::Execution(Tag::new("RESET"))
            }
            Command::Show { name } => {
                let (_, rows) = session.show(name)?;
                let fields = Arc::new(show_fields(name, format));
                let all = fields.len() == 2;
                let f = fields.clone();
                let rows = rows.into_iter().map(move |(k, v)| {
                    let mut e = DataRowEncoder::new(f.clone());
                    if all {
                        e.encode_field(&k)?;
                    }
                    e.encode_field(&v)?;
                    Ok(e.take_row())
                });
                Response::Query(QueryResponse::new(fields, futures::stream::iter(rows)))
            }
            Command::Transaction { begin: true, tag } => Response::TransactionStart(Tag::new(tag)),
            Command::Transaction { begin: false, tag } => Response::TransactionEnd(Tag::new(tag)),
            Command::Discard => Response::Execution(Tag::new("DISCARD ALL")),
            Command::Savepoint { tag } => Response::Execution(Tag::new(tag)),
        })
    }

    /// Answers a catalog query.
    async fn catalog_answer(
        &self,
        session: &Session,
        plan: LogicalPlan,
        format: &Format,
        options: Arc<FormatOptions>,
    ) -> Result<Response> {
        // Catalog queries read no rows, but a caller's expressions still cost CPU
        // (`generate_series`): they get the same time budget as any query.
        let g = self.current.load();
        let limits = &g.config().limits;
        let budget = session
            .ask_settings()
            .timeouts
            .into_iter()
            .min()
            .unwrap_or(limits.default_timeout)
            .min(limits.max_timeout);
        let deadline = (tokio::time::Instant::now() + budget, budget);
        let fields = fields_of(plan.schema().as_arrow(), format, options)?;
        let batches = self.catalog()?.run(plan).await?;
        Ok(Response::Query(QueryResponse::new(
            fields.clone(),
            rows(
                batches,
                fields,
                session.cancelled(),
                None,
                None,
                Some(deadline),
            ),
        )))
    }

    /// Starts a query of the canonical datasets through the federation entry point.
    async fn dataset_answer(
        &self,
        session: &Arc<Session>,
        sql: String,
        params: Option<ParamValues>,
        format: &Format,
        options: Arc<FormatOptions>,
    ) -> Result<Response> {
        let s = session.ask_settings();
        let ask = Ask {
            params,
            allow_partial: s.allow_partial,
            timeouts: s.timeouts,
            purpose: s.purpose,
            ..Ask::sql(sql)
        };
        let g = self.current.load();
        let mut cancelled = session.cancelled();
        // A cancel request while the query waits for admission or plans ends it too.
        let started: Started = tokio::select! {
            s = g.start(session.origin.clone(), ask) => s?,
            _ = cancelled.changed() => return Err(canceled_error()),
        };
        let fields = fields_of(&started.schema, format, options)?;
        let Started {
            batches, outcome, ..
        } = started;
        let batches = batches.map(Ok);
        Ok(Response::Query(QueryResponse::new(
            fields.clone(),
            rows(
                batches,
                fields,
                cancelled,
                Some(outcome),
                Some(session.clone()),
                None,
            ),
        )))
    }

    /// Answers one statement of a simple query.
    async fn simple_statement(
        &self,
        session: &Arc<Session>,
        text: &str,
        stmt: Option<&Statement>,
        options: Arc<FormatOptions>,
    ) -> Result<Response> {
        check_length(text)?;
        let format = Format::UnifiedText;
        if let Some(c) = session::command(text) {
            return self.command(session, &c, &format);
        }
        let parsed;
        let stmt = match stmt {
            Some(s) => s,
            None => {
                parsed = parse_one(text)?;
                &parsed
            }
        };
        let catalog = self.catalog()?;
        match catalog.route(stmt)? {
            Route::Catalog => {
                let plan = catalog.plan(text).await?;
                self.catalog_answer(session, plan, &format, options).await
            }
            Route::Datasets => {
                self.dataset_answer(session, text.to_string(), None, &format, options)
                    .await
            }
        }
    }
}

/// The statements of a simple query, each with its text: the text as sent when it is
/// one statement, as printed by the parser when there are several. Text that does not
/// parse is returned whole, for the session statements the parser does not know
/// (`SHOW TRANSACTION ISOLATION LEVEL`) or for its syntax error to be reported.
fn split(query: &str) -> Vec<(String, Option<Statement>)> {
    if check_length(query).is_err() {
        // Not parsed at all: the statement's answer is the length error.
        return vec![(query.to_string(), None)];
    }
    match SqlParser::parse_sql(&PostgreSqlDialect {}, query) {
        Ok(stmts) if stmts.len() == 1 => {
            let s = stmts.into_iter().next();
            vec![(query.trim().trim_end_matches(';').to_string(), s)]
        }
        Ok(stmts) => stmts
            .into_iter()
            .map(|s| (s.to_string(), Some(s)))
            .collect(),
        Err(_) => vec![(query.trim().trim_end_matches(';').to_string(), None)],
    }
}

/// Refuses a query text longer than any door accepts, before anything parses it.
fn check_length(sql: &str) -> Result<()> {
    let max = crate::owner::session::MAX_QUERY_BYTES;
    if sql.len() > max {
        return Err(Error::InvalidQuery(format!(
            "the query is {} bytes long, more than the {max} a gateway accepts",
            sql.len()
        )));
    }
    Ok(())
}

/// Parses exactly one statement.
fn parse_one(sql: &str) -> Result<Statement> {
    let mut stmts = SqlParser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| Error::InvalidQuery(format!("syntax error: {e}")))?;
    match stmts.len() {
        1 => Ok(stmts.remove(0)),
        n => Err(Error::InvalidQuery(format!(
            "a prepared statement holds one statement, not {n}"
        ))),
    }
}

/// The PostgreSQL columns of an Arrow schema.
fn fields_of(
    schema: &datafusion::arrow::datatypes::Schema,
    format: &Format,
    options: Arc<FormatOptions>,
) -> Result<Arc<Vec<FieldInfo>>> {
    arrow_schema_to_pg_fields(schema, format, Some(options))
        .map(Arc::new)
        .map_err(|e| {
            Error::InvalidQuery(format!(
                "the answer has a column type this port cannot send: {e}"
            ))
        })
}

/// The columns `SHOW name` answers with: the setting's value under its name, or for
/// `SHOW ALL` each setting's name and value (as PostgreSQL does).
fn show_fields(name: &str, format: &Format) -> Vec<FieldInfo> {
    let column = session::canonical_name(name);
    let names = if column == "all" {
        vec!["name".to_string(), "setting".to_string()]
    } else {
        vec![column]
    };
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| FieldInfo::new(n, None, None, Type::TEXT, format.format_for(i)))
        .collect()
}

/// The error a cancel request ends a query with.
fn canceled_error() -> Error {
    Error::Cancelled("canceling statement due to user request".into())
}

/// A fedgate error as PostgreSQL reports it: its SQLSTATE and message.
fn pg_error(e: &Error) -> PgWireError {
    let mut info = ErrorInfo::new("ERROR".into(), e.sqlstate().into(), e.to_string());
    if let Some(ms) = e.retry_after().map(|d| d.as_millis()) {
        info.hint = Some(format!("retry in {ms} ms"));
    }
    PgWireError::UserError(Box::new(info))
}

/// The notice that ends an answer: its per-member summary.
fn summary_notice(s: &crate::proto::v1::QuerySummary) -> Notice {
    let members: Vec<String> = s
        .members
        .iter()
        .map(|m| {
            let state = crate::proto::state_code(m.state);
            if m.reason.is_empty() {
                format!("{} {state} ({} rows)", m.member, m.rows)
            } else {
                format!("{} {state}: {}", m.member, m.reason)
            }
        })
        .collect();
    let head = if s.partial {
        "partial answer"
    } else {
        "answer"
    };
    Notice {
        severity: if s.partial { "WARNING" } else { "NOTICE" },
        code: if s.partial { "01000" } else { "00000" },
        message: format!(
            "fedgate {head}: {} rows in {:.1} ms, query {}; members: {}",
            s.rows,
            s.elapsed_us as f64 / 1000.0,
            s.query_id,
            members.join("; ")
        ),
        detail: serde_json::to_string(&crate::frontend::http::summary_json(s)).ok(),
    }
}

/// The rows of an answer: batches encoded as they come; at the end, the outcome's
/// summary queued as a notice and its failure, if any, as the last item; a cancel
/// request ends it with SQLSTATE 57014, dropping the batches (which cancels the
/// federated query).
fn rows(
    batches: impl Stream<Item = Result<RecordBatch>> + Send + Unpin + 'static,
    fields: Arc<Vec<FieldInfo>>,
    cancel: tokio::sync::watch::Receiver<u64>,
    outcome: Option<super::query::PendingOutcome>,
    session: Option<Arc<Session>>,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static {
    struct State<B> {
        batches: Option<B>,
        outcome: Option<super::query::PendingOutcome>,
        cancel: tokio::sync::watch::Receiver<u64>,
        deadline: Option<(tokio::time::Instant, std::time::Duration)>,
        rows: Option<RowEncoder>,
        fields: Arc<Vec<FieldInfo>>,
        session: Option<Arc<Session>>,
    }
    let st = State {
        batches: Some(batches),
        outcome,
        cancel,
        deadline,
        rows: None,
        fields,
        session,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(enc) = st.rows.as_mut() {
                if let Some(r) = enc.next_row() {
                    return Some((r, st));
                }
                st.rows = None;
            }
            let batches = st.batches.as_mut()?;
            // The federation path keeps its own deadline; catalog answers get the door's.
            let deadline = st.deadline;
            let expired = async move {
                match deadline {
                    Some((at, budget)) => {
                        tokio::time::sleep_until(at).await;
                        Error::DeadlineExceeded(budget)
                    }
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                _ = st.cancel.changed() => Err(canceled_error()),
                e = expired => Err(e),
                b = batches.next() => Ok(b),
            };
            match next {
                Err(e) => {
                    st.batches = None;
                    st.outcome = None;
                    return Some((Err(pg_error(&e)), st));
                }
                Ok(Some(Ok(b))) => st.rows = Some(RowEncoder::new(b, st.fields.clone())),
                Ok(Some(Err(e))) => {
                    st.batches = None;
                    return Some((Err(pg_error(&e)), st));
                }
                Ok(None) => {
                    st.batches = None;
                    let outcome = st.outcome.take()?;
                    let Outcome { summary, failure } = tokio::select! {
                        biased;
                        _ = st.cancel.changed() => {
                            return Some((Err(pg_error(&canceled_error())), st));
                        }
                        o = outcome.wait() => o,
                    };
                    if let (Some(s), Some(session)) = (&summary, &st.session) {
                        session.notice(summary_notice(s));
                    }
                    return failure.map(|e| (Err(pg_error(&e)), st));
                }
            }
        }
    })
}

/// The session of a connection that passed startup, if its certificate is not revoked
/// by the lists in force: asked before every statement, so that a revocation reaches a
/// session opened before it as soon as the lists reload.
fn session_of<C: ClientInfo>(door: &Door, client: &C) -> PgWireResult<Arc<Session>> {
    let session = client
        .session_extensions()
        .get::<Arc<Session>>()
        .map(|s| (*s).clone())
        .ok_or_else(|| {
            pg_error(&Error::Unauthenticated(
                "the session has not started".into(),
            ))
        })?;
    let serial = client
        .client_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::trust::tls::serial_of(c.as_ref()))
        .unwrap_or_else(|| Arc::from(&[][..]));
    super::not_revoked(&door.current.load(), &session.origin, &serial).map_err(|e| pg_error(&e))?;
    Ok(session)
}

/// Sends the notices queued during the last command.
async fn send_notices<C>(client: &mut C, session: &Session) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for n in session.take_notices() {
        let mut info = ErrorInfo::new(n.severity.into(), n.code.into(), n.message);
        info.detail = n.detail;
        client
            .feed(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(
                info,
            )))
            .await?;
    }
    Ok(())
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(self.clone())
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(self.clone())
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(self.clone())
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(self.clone())
    }
}

#[async_trait]
impl StartupHandler for Handlers {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let PgWireFrontendMessage::Startup(ref startup) = message else {
            return Ok(());
        };
        protocol_negotiation(client, startup).await?;
        save_startup_parameters_to_metadata(client, startup);
        let origin = match self.0.identify(client) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, peer = %client.socket_addr(), "PostgreSQL connection refused");
                return Err(pg_error(&e));
            }
        };
        // The permit lives in the session and is released when the connection ends.
        let Ok(permit) = self.0.connections.clone().try_acquire_owned() else {
            let e = Error::Overloaded(
                "this gateway's PostgreSQL port has all its connections open \
                 ([postgres] max_connections); close one or try again later"
                    .into(),
            );
            tracing::warn!(origin = %origin, "PostgreSQL connection refused: too many open");
            return Err(pg_error(&e));
        };
        client.session_extensions().insert(permit);
        let (pid, key) = self.0.keys.generate(client);
        client.set_pid_and_secret_key(pid, key.clone());
        let session = Arc::new(Session::new(origin, client.metadata()));
        self.0.remember(pid, key, &session);
        client.session_extensions().insert::<Arc<Session>>(session);
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = "16.6 (fedgate)".into();
        params.search_path = catalog::SCHEMA.into();
        params.is_superuser = false;
        params.default_transaction_read_only = true;
        finish_authentication(client, &params).await
    }
}

#[async_trait]
impl CancelHandler for Handlers {
    async fn on_cancel_request(&self, req: CancelRequest) {
        // Keys are compared as bytes: a cancel request arrives on a connection of its
        // own, before any protocol version is agreed, so its key may decode in
        // another form than the one the session was given.
        let found = {
            let m = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
            m.get(&req.pid)
                .filter(|(key, _)| key.to_bytes() == req.secret_key.to_bytes())
                .and_then(|(_, s)| s.upgrade())
        };
        match found {
            Some(s) => {
                tracing::info!(origin = %s.origin, "PostgreSQL cancel request");
                s.cancel();
            }
            None => tracing::debug!(pid = req.pid, "cancel request for no session"),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Handlers {
    /// Runs each statement in turn and sends its response, then its notices, then the
    /// next; the first error ends the query (as PostgreSQL does).
    async fn on_query<C>(&self, client: &mut C, query: Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        let session = session_of(&self.0, client)?;
        let mut status = client.transaction_status();
        client.set_state(PgWireConnectionState::QueryInProgress);
        let statements = split(&query.query);
        if statements.iter().all(|(t, _)| t.trim().is_empty()) {
            client
                .feed(PgWireBackendMessage::EmptyQueryResponse(
                    EmptyQueryResponse::new(),
                ))
                .await?;
        }
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        for (text, stmt) in statements.iter().filter(|(t, _)| !t.trim().is_empty()) {
            let sent = match self
                .0
                .simple_statement(&session, text, stmt.as_ref(), options.clone())
                .await
            {
                Ok(Response::Query(r)) => send_query_response(client, r, true).await,
                Ok(Response::TransactionStart(tag)) => {
                    status = status.to_in_transaction_state();
                    send_execution_response(client, tag).await
                }
                Ok(Response::TransactionEnd(tag)) => {
                    status = status.to_idle_state();
                    send_execution_response(client, tag).await
                }
                Ok(Response::Execution(tag)) => send_execution_response(client, tag).await,
                Ok(_) => Ok(()),
                Err(e) => Err(pg_error(&e)),
            };
            send_notices(client, &session).await?;
            if let Err(e) = sent {
                let info = match e {
                    PgWireError::UserError(info) => *info,
                    other => ErrorInfo::new("ERROR".into(), "XX000".into(), other.to_string()),
                };
                client
                    .feed(PgWireBackendMessage::ErrorResponse(info.into()))
                    .await?;
                status = status.to_error_state();
                break;
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        client.set_transaction_status(status);
        send_ready_for_query(client, status).await
    }

    async fn do_query<C>(&self, _client: &mut C, _query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        // `on_query` above answers every simple query itself.
        Err(pg_error(&Error::Internal(
            "simple queries are answered by on_query".into(),
        )))
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        // Only a session that passed startup plans anything.
        session_of(&self.0, client)?;
        self.0.prepare(sql).await.map_err(|e| pg_error(&e))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        let types: Vec<Option<DataType>> = match stmt {
            Prepared::Command(_) => Vec::new(),
            Prepared::Catalog(plan) => placeholder_types(plan).map_err(|e| pg_error(&e))?,
            Prepared::Datasets { params, .. } => params.clone(),
        };
        types
            .iter()
            .map(|t| match t {
                Some(t) => into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let format = format.cloned().unwrap_or_default();
        match stmt {
            Prepared::Command(Command::Show { name }) => Ok(show_fields(name, &format)),
            Prepared::Command(_) => Ok(Vec::new()),
            Prepared::Catalog(plan) => {
                arrow_schema_to_pg_fields(plan.schema().as_arrow(), &format, None)
            }
            Prepared::Datasets { schema, .. } => arrow_schema_to_pg_fields(schema, &format, None),
        }
    }
}

/// The inferred types of a plan's placeholders, in order (`$1`, `$2`, ...).
fn placeholder_types(plan: &LogicalPlan) -> Result<Vec<Option<DataType>>> {
    let found = plan.get_parameter_types().map_err(Error::from_datafusion)?;
    crate::coordinator::ordered_placeholders(found)
}

/// The values a portal binds, decoded with the types the client declared or the
/// planner inferred.
fn bound_values(portal: &Portal<Prepared>, inferred: &[Option<DataType>]) -> Result<ParamValues> {
    let refs: Vec<Option<&DataType>> = inferred.iter().map(|t| t.as_ref()).collect();
    arrow_pg::datatypes::df::deserialize_parameters(portal, &refs)
        .map_err(|e| Error::InvalidQuery(format!("binding parameters: {e}")))
}

#[async_trait]
impl ExtendedQueryHandler for Handlers {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        Arc::new(Parser(self.0.clone()))
    }

    /// Executes as pgwire does (rows up to the client's fetch size, then a suspended
    /// portal), then sends the notices the answer queued (its summary, once its last
    /// row is out), before the client's Sync is answered.
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let r = self._on_execute(client, message).await;
        if let Ok(session) = session_of(&self.0, client) {
            send_notices(client, &session).await?;
        }
        r
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = session_of(&self.0, client)?;
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let format = &portal.result_column_format;
        let r = match &portal.statement.statement {
            Prepared::Command(c) => self.0.command(&session, c, format),
            Prepared::Catalog(plan) => {
                let run = async {
                    let inferred = placeholder_types(plan)?;
                    let plan = if inferred.is_empty() {
                        (**plan).clone()
                    } else {
                        let values = bound_values(portal, &inferred)?;
                        plan.clone()
                            .replace_params_with_values(&values)
                            .map_err(Error::from_datafusion)?
                    };
                    self.0.catalog_answer(&session, plan, format, options).await
                };
                run.await
            }
            Prepared::Datasets { sql, params, .. } => {
                let values = if params.is_empty() {
                    Ok(None)
                } else {
                    bound_values(portal, params).map(Some)
                };
                match values {
                    Ok(v) => {
                        self.0
                            .dataset_answer(&session, sql.clone(), v, format, options)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        r.map_err(|e| pg_error(&e))
    }
}

/// Serves the PostgreSQL protocol on `listener` until `shutdown` resolves. Each
/// connection takes the TLS configuration in force when it arrives (certificates are
/// reloaded like the other ports').
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    door: Arc<Door>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                let handlers = Handlers(door.clone());
                tokio::spawn(async move {
                    if let Err(e) =
                        pgwire::tokio::process_socket(socket, Some(acceptor), handlers).await
                    {
                        tracing::debug!(%peer, error = %e, "PostgreSQL connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
