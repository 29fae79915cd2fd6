//! A client for a gateway's `Federation` service over mutual TLS, used by the CLI,
//! the demo and the tests.

use std::path::Path;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use futures::StreamExt;
use tonic::transport::Channel;

use crate::arrow_ipc::{self, Decoded};
use crate::error::{Error, Result};
use crate::proto::v1::federation_client::FederationClient;
use crate::proto::v1::{
    DescribeRequest, DescribeResponse, ExplainRequest, ExplainResponse, InvokeRequest, Progress,
    QueryRequest, QueryResponse, QuerySummary, VouchRequest, query_response,
};
use crate::trust::tls::{Connector, TlsMaterial};

/// A connected client.
#[derive(Clone)]
pub struct Client {
    inner: FederationClient<Channel>,
    gateway: String,
    /// The caller's own gateway, when it is not this one (see [`Client::with_home`]).
    home: Option<Box<Client>>,
}

/// A query's complete answer.
#[derive(Debug)]
pub struct Answer {
    /// The schema (also when there are no rows).
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// The per-member summary.
    pub summary: QuerySummary,
}

/// A failed query: the status, and the summary if the gateway sent one.
#[derive(Debug)]
pub struct Failure {
    /// The gRPC status.
    pub status: tonic::Status,
    /// Per-member outcomes, when the gateway got as far as planning.
    pub summary: Option<QuerySummary>,
}

/// A call refused before any answer: no summary.
impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        Failure {
            status,
            summary: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", describe_status(&self.status))
    }
}

/// The message of a status, with transport failures explained. A status the gateway
/// sent is its own explanation; only one made here from a failed connection (which
/// carries its cause as a source) is explained.
pub fn describe_status(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    if std::error::Error::source(s).is_none() {
        return format!("{:?}: {text}", s.code());
    }
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let t = e.to_string();
        if !text.contains(&t) {
            text = format!("{text}: {t}");
        }
        src = e.source();
    }
    format!(
        "{:?}: {}",
        s.code(),
        crate::trust::tls::explain_transport_error(&text)
    )
}

/// Splits `https://host:port` into host and port.
pub fn parse_gateway(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| Error::InvalidQuery(format!("gateway {url:?} must be https://host:port")))?
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| Error::InvalidQuery(format!("gateway {url:?} needs a port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse()
        .map_err(|_| Error::InvalidQuery(format!("gateway {url:?} has a bad port")))?;
    Ok((host.to_string(), port))
}

impl Client {
    /// Connects (lazily) to `gateway` with the given CA, certificate and key.
    pub fn connect(gateway: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Client> {
        let tls = TlsMaterial::load(ca, cert, key)?;
        let (host, port) = parse_gateway(gateway)?;
        let channel = Connector::new(tls.client_config()?, &host, port, None)
            .channel(Duration::from_secs(5))?;
        Ok(Client {
            inner: FederationClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            gateway: gateway.to_string(),
            home: None,
        })
    }

    /// Asks through this gateway on behalf of an identity whose own gateway is
    /// `home`: before each query, service call or explanation, `home` signs an origin
    /// assertion for it (`Federation.Vouch`), which goes with the request. Without
    /// one, members refuse a gateway that is not the caller's own.
    pub fn with_home(mut self, home: Client) -> Client {
        self.home = Some(Box::new(home));
        self
    }

    /// Asks this gateway (the caller's own) for an origin assertion: the caller will
    /// send `sql` (or call `service`) stating `purpose` through `gateway` (a member
    /// name, identity or endpoint URL).
    pub async fn vouch(
        &self,
        gateway: &str,
        sql: Option<&str>,
        service: Option<&str>,
        purpose: &str,
    ) -> std::result::Result<Vec<u8>, tonic::Status> {
        self.vouch_under(gateway, sql, service, purpose, None).await
    }

    /// [`Client::vouch`] for a query stating the incident `declaration`.
    pub async fn vouch_under(
        &self,
        gateway: &str,
        sql: Option<&str>,
        service: Option<&str>,
        purpose: &str,
        declaration: Option<&[u8]>,
    ) -> std::result::Result<Vec<u8>, tonic::Status> {
        Ok(self
            .inner
            .clone()
            .vouch(VouchRequest {
                gateway: gateway.to_string(),
                sql: sql.unwrap_or_default().to_string(),
                service: service.unwrap_or_default().to_string(),
                purpose: purpose.to_string(),
                validity_ms: 0,
                incident_sha256: crate::trust::assertion::incident_digest(declaration),
            })
            .await?
            .into_inner()
            .assertion)
    }

    /// Adds the home gateway's assertion to `req`, when this client has a home.
    async fn vouched<T>(
        &self,
        mut req: tonic::Request<T>,
        sql: Option<&str>,
        service: Option<&str>,
        purpose: &str,
        declaration: Option<&[u8]>,
    ) -> std::result::Result<tonic::Request<T>, tonic::Status> {
        if let Some(home) = &self.home {
            let a = home
                .vouch_under(&self.gateway, sql, service, purpose, declaration)
                .await?;
            req.metadata_mut().insert_bin(
                crate::trust::assertion::METADATA_KEY,
                tonic::metadata::MetadataValue::from_bytes(&a),
            );
        }
        Ok(req)
    }

    /// The generated gRPC client, for requests this API does not wrap.
    pub fn raw(&self) -> FederationClient<Channel> {
        self.inner.clone()
    }

    /// The gateway URL.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Runs a query and collects the answer.
    pub async fn query(
        &self,
        sql: &str,
        allow_partial: bool,
        timeout: Option<Duration>,
    ) -> std::result::Result<Answer, Failure> {
        self.query_with(QueryRequest {
            sql: sql.to_string(),
            allow_partial,
            timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
            ..Default::default()
        })
        .await
    }

    /// Runs a query with every request option and collects the answer.
    pub async fn query_with(&self, q: QueryRequest) -> std::result::Result<Answer, Failure> {
        let mut batches = Vec::new();
        let (schema, summary) = self
            .query_each(q, |b| {
                batches.push(b);
                Ok(())
            })
            .await?;
        Ok(Answer {
            schema,
            batches,
            summary,
        })
    }

    /// Runs a query and hands each batch to `sink` as it arrives, keeping none of
    /// them, so an answer of any size runs in bounded memory. Returns the schema and
    /// the summary. An error from `sink` ends the query (the stream is dropped, which
    /// cancels it at the gateway) and is returned as the failure.
    pub async fn query_each(
        &self,
        q: QueryRequest,
        sink: impl FnMut(RecordBatch) -> std::result::Result<(), tonic::Status>,
    ) -> std::result::Result<(SchemaRef, QuerySummary), Failure> {
        self.query_watched(q, sink, |_| {}).await
    }

    /// Like [`Client::query_each`], handing each progress message (sent when the
    /// request asks for progress) to `progress`.
    pub async fn query_watched(
        &self,
        q: QueryRequest,
        sink: impl FnMut(RecordBatch) -> std::result::Result<(), tonic::Status>,
        progress: impl Fn(&Progress) + Send + Sync + 'static,
    ) -> std::result::Result<(SchemaRef, QuerySummary), Failure> {
        let (sql, purpose, incident) = (q.sql.clone(), q.purpose.clone(), q.incident.clone());
        let req = with_deadline(q.timeout_ms, q);
        let req = self
            .vouched(req, Some(&sql), None, &purpose, Some(&incident))
            .await?;
        let stream = self.inner.clone().query(req).await?.into_inner();
        read_answer(stream, sink, progress).await
    }

    /// Calls a published service, streaming its answer like [`Client::query_watched`].
    pub async fn invoke_watched(
        &self,
        q: InvokeRequest,
        sink: impl FnMut(RecordBatch) -> std::result::Result<(), tonic::Status>,
        progress: impl Fn(&Progress) + Send + Sync + 'static,
    ) -> std::result::Result<(SchemaRef, QuerySummary), Failure> {
        let (service, purpose) = (q.service.clone(), q.purpose.clone());
        let req = with_deadline(q.timeout_ms, q);
        let req = self
            .vouched(req, None, Some(&service), &purpose, None)
            .await?;
        let stream = self.inner.clone().invoke(req).await?.into_inner();
        read_answer(stream, sink, progress).await
    }

    /// How the gateway would run `sql`.
    pub async fn explain(&self, sql: &str) -> std::result::Result<ExplainResponse, tonic::Status> {
        let req = tonic::Request::new(ExplainRequest {
            sql: sql.into(),
            purpose: String::new(),
        });
        let req = self.vouched(req, Some(sql), None, "", None).await?;
        Ok(self.inner.clone().explain(req).await?.into_inner())
    }

    /// Lists the canonical datasets.
    pub async fn describe(
        &self,
        purpose: Option<&str>,
    ) -> std::result::Result<DescribeResponse, tonic::Status> {
        Ok(self
            .inner
            .clone()
            .describe(DescribeRequest {
                purpose: purpose.unwrap_or_default().to_string(),
            })
            .await?
            .into_inner())
    }
}

/// A request whose gRPC deadline is a little over the query's own budget (none when
/// the budget is 0), so the gateway can report its summary first.
fn with_deadline<T>(timeout_ms: u64, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if timeout_ms > 0 {
        req.set_timeout(Duration::from_millis(timeout_ms) + Duration::from_millis(500));
    }
    req
}

/// Reads a `Query` or `Invoke` answer: Arrow chunks to `sink`, progress messages to
/// `progress`, and the summary (last).
async fn read_answer(
    stream: tonic::Streaming<QueryResponse>,
    mut sink: impl FnMut(RecordBatch) -> std::result::Result<(), tonic::Status>,
    progress: impl Fn(&Progress) + Send + Sync + 'static,
) -> std::result::Result<(SchemaRef, QuerySummary), Failure> {
    let progress = std::sync::Arc::new(progress);
    let summary = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = summary.clone();
    let status = std::sync::Arc::new(std::sync::Mutex::new(None));
    let failed = status.clone();
    let chunks = stream
        .take_while(move |r| {
            let keep = match r {
                Ok(_) => true,
                Err(s) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                    false
                }
            };
            futures::future::ready(keep)
        })
        .filter_map(move |r| {
            let seen = seen.clone();
            let progress = progress.clone();
            async move {
                match r.ok()?.payload? {
                    query_response::Payload::Arrow(c) => Some(Ok(c)),
                    query_response::Payload::Summary(s) => {
                        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        None
                    }
                    query_response::Payload::Progress(p) => {
                        progress(&p);
                        None
                    }
                }
            }
        });
    let mut decoded = Box::pin(arrow_ipc::decode(chunks));
    let mut schema = None;
    let mut local_failure = None;
    while let Some(d) = decoded.next().await {
        match d {
            Ok(Decoded::Schema(s)) => schema = Some(s),
            Ok(Decoded::Batch(b)) => {
                if let Err(s) = sink(b) {
                    local_failure = Some(s);
                    break;
                }
            }
            Err(e) => {
                local_failure = Some(e.to_status());
                break;
            }
        }
    }
    drop(decoded);
    let summary = summary.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(s) = status.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(Failure { status: s, summary });
    }
    if let Some(status) = local_failure {
        return Err(Failure { status, summary });
    }
    match (schema, summary) {
        (Some(schema), Some(summary)) => Ok((schema, summary)),
        (_, summary) => Err(Failure {
            status: tonic::Status::data_loss("the answer ended without its schema or summary"),
            summary,
        }),
    }
}

pub use crate::proto::{state_code, state_word};

/// The per-member summary as a small text table.
pub fn format_summary(s: &QuerySummary) -> String {
    let mut out = format!(
        "query {} · {} rows · {:.1} ms (planning {} µs) · {} bytes from members · config {}{}{}\n",
        s.query_id,
        s.rows,
        s.elapsed_us as f64 / 1000.0,
        s.planning_us,
        s.bytes_received,
        s.config_version,
        if s.plan_cached {
            " · cached plan"
        } else if s.plan_reused {
            " · reused plan"
        } else if s.plan_bound_optimized {
            " · bound optimized plan"
        } else if s.plan_bound {
            " · bound plan"
        } else {
            ""
        },
        if s.partial { " · PARTIAL ANSWER" } else { "" }
    );
    let w = s
        .members
        .iter()
        .map(|m| m.member.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!(
        "  {:<w$}  {:<11}  {:>7}  {:>9}  reason\n",
        "member", "status", "rows", "ms"
    ));
    for m in &s.members {
        // An answer says how the member shared the data; anything else says why not.
        let note = if m.reason.is_empty() {
            &m.access
        } else {
            &m.reason
        };
        out.push_str(&format!(
            "  {:<w$}  {:<11}  {:>7}  {:>9.1}  {}\n",
            m.member,
            state_word(m.state),
            m.rows,
            m.elapsed_us as f64 / 1000.0,
            note
        ));
    }
    out
}
