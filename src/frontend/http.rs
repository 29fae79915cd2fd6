//! The HTTP port of a gateway: the status board, Prometheus metrics and a JSON API
//! for portals and the board's query console.
//!
//! Routes: `GET /` (the board, plain HTML/JS served from the binary), `GET /healthz`,
//! `GET /livez` and `GET /readyz` (the probes, also served alone on `[lifecycle]
//! probes` by [`serve_probes`]), `GET /metrics`, `GET /v1/status`, `GET /v1/history`,
//! `GET /v1/board/map.svg` and `GET /v1/board/charts.svg` (the board's pictures,
//! [`pictures`]), `GET /v1/services`, `POST /v1/query`, `POST /v1/services/{name}`.
//!
//! Who the caller is: with `tls = true` (the default) the port speaks HTTPS with
//! mutual TLS and the caller is the identity in its certificate, as on the gRPC
//! port. With `tls = false` the port is plain HTTP on a loopback address, and every
//! caller acts as this member itself (its own operators and a portal on the same
//! host). Queries go through the same [`FederationService`](crate::frontend::FederationService)
//! as gRPC: admission, audit, metrics, and each member's own access rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::{Ask, Current, FederationService, Outcome, Started, pictures};
use crate::error::{Error, Result};
use crate::ops::audit::AuditLog;
use crate::ops::lifecycle::{Lifecycle, Phase};
use crate::proto::state_code;
use crate::proto::v1::QuerySummary;
use crate::trust::identity::Principal;

/// Most rows a JSON answer may have: JSON is for portals and the console. Larger
/// answers belong on Flight SQL or `Federation.Query`, which stream Arrow.
pub const MAX_JSON_ROWS: u64 = 100_000;

/// The caller of a request, as the connection established it.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

/// The serial number of the caller's certificate, on a mutual-TLS connection.
#[derive(Debug, Clone)]
pub struct CallerSerial(pub Arc<[u8]>);

#[derive(Clone)]
struct AppState {
    current: Current,
    audit: Arc<AuditLog>,
}

/// A JSON error with an HTTP status of its own (for refusals that are about HTTP,
/// not about a query).
fn http_error(status: StatusCode, code: &'static str, message: String) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// Requests with a body must say it is JSON. Besides naming the format, this keeps
/// other web sites a browser visits from posting here: a cross-site request with
/// this content type needs a CORS preflight, which this port never grants.
async fn json_bodies_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if req.method() == axum::http::Method::POST && !json {
        return http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_argument",
            "send the request body as JSON with Content-Type: application/json".into(),
        );
    }
    next.run(req).await
}

/// On the plain loopback port, only requests addressed to a loopback name are
/// served: a web page whose name an attacker points at 127.0.0.1 (DNS rebinding)
/// would otherwise read this member's data as if it were this member.
async fn loopback_host_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return http_error(
            StatusCode::MISDIRECTED_REQUEST,
            "permission_denied",
            format!(
                "this port serves requests addressed to 127.0.0.1, ::1 or localhost only, not {host:?}"
            ),
        );
    }
    next.run(req).await
}

/// `GET /livez` and `GET /readyz`. They tell only the gateway's phase, so they need no
/// identity: an orchestrator's probe presents no client certificate.
pub fn probe_routes(lifecycle: Arc<Lifecycle>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "live\n" }))
        .route(
            "/readyz",
            get(|State(l): State<Arc<Lifecycle>>| async move {
                let phase = l.phase();
                let status = if phase == Phase::Ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    status,
                    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
                    format!("{}\n", phase.as_str()),
                )
            }),
        )
        .with_state(lifecycle)
}

/// Serves the probes alone on a plain-HTTP listener until `shutdown` resolves; every
/// other path is 404. It starts before the gateway's sources load, so `/readyz`
/// answers "starting" while they do.
pub async fn serve_probes(
    listener: tokio::net::TcpListener,
    lifecycle: Arc<Lifecycle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = probe_routes(lifecycle).fallback(|| async {
        (
            StatusCode::NOT_FOUND,
            "this port answers GET /livez and GET /readyz only\n",
        )
    });
    serve_plain(listener, app, MAX_PROBE_CONNECTIONS, shutdown).await;
}

/// Most connections an HTTP port holds at once; more wait in the kernel's accept
/// queue until one ends. With [`HEADER_READ_TIMEOUT`], a client that opens
/// connections and sends nothing, or sends a byte at a time, holds a port's slots
/// for seconds and never exhausts the process's file descriptors.
const MAX_CONNECTIONS: usize = 512;

/// The probe port's cap: it needs no identity, so whoever reaches it can open
/// connections; an orchestrator probes with one or two at a time.
const MAX_PROBE_CONNECTIONS: usize = 32;

/// How long a connection may take to send a request's headers, counted from when it
/// opens or finishes its previous request, so an idle kept-alive HTTP/1 connection
/// is closed after this too.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection server for one HTTP version: chosen up front (plain ports speak
/// HTTP/1, the TLS port what ALPN settled), because detecting the version reads
/// the first bytes with no deadline at all.
fn connection_builder(
    h2: bool,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // An HTTP/2 connection that stops answering pings is closed.
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    if h2 { b.http2_only() } else { b.http1_only() }
}

/// Serves `app` over plain HTTP/1 on `listener`, at most `limit` connections at a
/// time, until `shutdown` resolves; then waits for the requests in flight.
async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: Router,
    limit: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limit));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = connection_builder(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, for instance: wait rather than spin.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        serve_one(&builder, &graceful, tcp, app.clone(), slot);
    }
    // The port is freed at once; the connections still open finish their requests.
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one connection in a task of its own, watched by `graceful`, holding its
/// `slot` of the port's connection cap until it ends.
fn serve_one<I>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    io: I,
    app: Router,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let served = builder.serve_connection(
        hyper_util::rt::TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(app),
    );
    let watched = graceful.watch(served.into_owned());
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = watched.await {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    });
}

/// The HTTP routes. Each request needs a [`Caller`] extension.
pub fn router(current: Current, audit: Arc<AuditLog>, lifecycle: Arc<Lifecycle>) -> Router {
    Router::new()
        .route("/", get(board_html))
        .route("/board.js", get(board_js))
        .route("/board.css", get(board_css))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/history", get(history))
        .route("/v1/board/map.svg", get(map_svg))
        .route("/v1/board/charts.svg", get(charts_svg))
        .route("/v1/audit", get(audit_tail))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/services", get(services))
        .route("/v1/query", post(query))
        .route("/v1/services/{name}", post(invoke))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(json_bodies_only))
        .layer(axum::middleware::from_fn_with_state(
            current.clone(),
            known_callers_only,
        ))
        .with_state(AppState { current, audit })
        // Merged after the identity layer, which therefore does not apply to them.
        .merge(probe_routes(lifecycle))
}

/// Every route, the board's page and `/metrics` included, answers only identities the
/// region knows, as the gRPC port does.
async fn known_callers_only(
    State(current): State<Current>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(Caller(who)) = req.extensions().get::<Caller>().cloned() else {
        return http_error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the connection established no identity".into(),
        );
    };
    let g = current.load();
    if let Err(e) = known(&g, &who) {
        return error_response(&e, None);
    }
    // Every request, not only the handshake: a revocation reaches a kept-alive
    // connection as soon as the lists reload.
    if let Some(CallerSerial(serial)) = req.extensions().get::<CallerSerial>()
        && let Err(e) = super::not_revoked(&g, &who, serial)
    {
        return error_response(&e, None);
    }
    next.run(req).await
}

/// What the board's page may load and run: its own script, style sheet and requests
/// (and the inline empty icon), nothing from elsewhere, no plug-ins, no framing. A
/// second line of defence behind the board writing untrusted text as text only.
const BOARD_POLICY: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
                            base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(BOARD_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn board_html() -> Response {
    asset("text/html; charset=utf-8", include_str!("web/index.html"))
}

async fn board_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("web/board.js"),
    )
}

async fn board_css() -> Response {
    asset("text/css; charset=utf-8", include_str!("web/board.css"))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> Response {
    error_response(
        &Error::NotFound(
            "no such path; the API is GET /v1/status, GET /v1/history, GET /v1/board/map.svg, \
             GET /v1/board/charts.svg, GET /v1/services, POST /v1/query, \
             POST /v1/services/{name}, GET /v1/audit, GET /v1/audit/verify, GET /metrics, GET /healthz, \
             GET /livez, GET /readyz"
                .into(),
        ),
        None,
    )
}

async fn metrics(State(app): State<AppState>) -> Response {
    let g = app.current.load();
    let breakers: Vec<(String, &'static str)> = g
        .coordinator()
        .breaker_states()
        .into_iter()
        .filter(|(_, s)| *s != "local")
        .collect();
    let text = g.observer().render(
        &breakers,
        &g.admission(),
        app.audit.written(),
        g.coordinator().tls_expiries(),
        app.audit.export_progress().map(|p| {
            (
                p.seq.load(std::sync::atomic::Ordering::Relaxed),
                p.broken_at.load(std::sync::atomic::Ordering::Relaxed),
            )
        }),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// The HTTP status and JSON code of an error, from its gRPC code (which
/// [`Error::to_status`] decides, in one place).
fn http_code(e: &Error) -> (StatusCode, &'static str) {
    use tonic::Code;
    match e.to_status().code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        Code::Aborted => (StatusCode::BAD_GATEWAY, "aborted"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

fn error_response(e: &Error, summary: Option<&QuerySummary>) -> Response {
    let (status, code) = http_code(e);
    let mut body = json!({ "error": { "code": code, "message": e.to_string() } });
    if let Some(s) = summary {
        body["summary"] = summary_json(s);
    }
    let mut r = (status, axum::Json(body)).into_response();
    if let Error::Busy { retry_after, .. } = e {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// A query summary as JSON (the HTTP API and Flight SQL's summary message).
pub fn summary_json(s: &QuerySummary) -> serde_json::Value {
    let mut v = json!({
        "query_id": s.query_id,
        "rows": s.rows,
        "elapsed_ms": s.elapsed_us as f64 / 1000.0,
        "partial": s.partial,
        "config_version": s.config_version,
        "bytes_received": s.bytes_received,
        // Where the plan came from: the plan cache, an earlier query's physical plan
        // of the same shape run with this query's member SQL, a shape's optimized or
        // written plan bound to this query's values, or planned from the text.
        "plan": if s.plan_cached {
            "cached"
        } else if s.plan_reused {
            "reused"
        } else if s.plan_bound_optimized {
            "bound optimized"
        } else if s.plan_bound {
            "bound"
        } else {
            "planned"
        },
        "members": s.members.iter().map(|m| json!({
            "member": m.member,
            "state": state_code(m.state),
            "rows": m.rows,
            "elapsed_ms": m.elapsed_us as f64 / 1000.0,
            "reason": m.reason,
            "age_ms": m.age_ms,
            "member_elapsed_ms": m.member_elapsed_us as f64 / 1000.0,
            "datasets": m.datasets,
            "access": m.access,
        })).collect::<Vec<_>>(),
    });
    // The signed receipt, when one was asked for (`fedgate receipt verify` reads it).
    if !s.receipt.is_empty() {
        use base64::Engine as _;
        v["receipt"] = json!(base64::engine::general_purpose::STANDARD.encode(&s.receipt));
    }
    v
}

/// Refuses callers the region does not know, as the gRPC port does.
fn known(g: &FederationService, caller: &Principal) -> Result<()> {
    super::known_identity(&g.config().region, caller)
}

fn services_json(g: &FederationService) -> serde_json::Value {
    json!(
        g.config()
            .region
            .services
            .iter()
            .map(|s| json!({
                "name": s.name,
                "description": s.description,
                "callers": s.callers,
                "purpose": s.purpose,
                "params": s.params.iter().map(|p| json!({
                    "name": p.name,
                    "type": p.type_name,
                    "description": p.description,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

async fn services(
    State(app): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
) -> Response {
    let g = app.current.load();
    if let Err(e) = known(&g, &who) {
        return error_response(&e, None);
    }
    axum::Json(json!({ "services": services_json(&g) })).into_response()
}

/// Most records `GET /v1/audit` returns at once.
const MAX_AUDIT_PAGE: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditPage {
    /// How many of the latest records (default 50).
    limit: Option<usize>,
}

/// The audit log is this member's own record of who read what: only its own identity
/// (its operators, on the plain loopback port or with the gateway's certificate) may
/// browse or verify it.
fn operator_only(g: &FederationService, who: &Principal) -> Option<Response> {
    (who != &g.config().member.principal).then(|| {
        http_error(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "the audit log is shown to this member's own identity ({}) only",
                g.config().member.principal
            ),
        )
    })
}

/// `GET /v1/audit?limit=N`: the latest records, newest last, as the log holds them.
async fn audit_tail(
    State(app): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    axum::extract::Query(page): axum::extract::Query<AuditPage>,
) -> Response {
    let g = app.current.load();
    if let Some(r) = operator_only(&g, &who) {
        return r;
    }
    let limit = page.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_AUDIT_PAGE {
        return http_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("limit must be from 1 to {MAX_AUDIT_PAGE}"),
        );
    }
    let path = app.audit.path().to_path_buf();
    let read = tokio::task::spawn_blocking(move || crate::ops::audit::tail(&path, limit)).await;
    match read {
        Ok(Ok(lines)) => {
            let records: Vec<serde_json::Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_slice(l).ok())
                .collect();
            axum::Json(json!({
                "log": app.audit.path().display().to_string(),
                "head": { "seq": app.audit.head().seq, "hash": app.audit.head().hash },
                "records": records,
            }))
            .into_response()
        }
        Ok(Err(e)) => error_response(&e, None),
        Err(e) => error_response(&Error::Internal(e.to_string()), None),
    }
}

/// `GET /v1/audit/verify`: the whole chain checked, as `fedgate audit verify` does.
async fn audit_verify(
    State(app): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
) -> Response {
    let g = app.current.load();
    if let Some(r) = operator_only(&g, &who) {
        return r;
    }
    let path = app.audit.path().to_path_buf();
    match tokio::task::spawn_blocking(move || crate::ops::audit::verify(&path)).await {
        Ok(Ok(report)) => axum::Json(json!({
            "records": report.records,
            "head": { "seq": report.head.seq, "hash": report.head.hash },
            "broken": report.broken.map(|b| json!({
                "seq": b.seq, "line": b.line, "problem": b.problem,
            })),
        }))
        .into_response(),
        Ok(Err(e)) => error_response(&e, None),
        Err(e) => error_response(&Error::Internal(e.to_string()), None),
    }
}

async fn status(
    State(app): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
) -> Response {
    let g = app.current.load();
    if let Err(e) = known(&g, &who) {
        return error_response(&e, None);
    }
    let region = &g.config().region;
    let breakers = g.coordinator().breaker_states();
    // This member's own identity (its operators) sees every recent query and the
    // last error of each member; any other caller sees only its own queries, and no
    // error text that another caller's query produced.
    let operator = who == g.config().member.principal;
    let mut seen = g.observer().members();
    if !operator {
        seen.values_mut().for_each(|s| s.last_error = None);
    }
    let recent: Vec<_> = g
        .observer()
        .recent()
        .into_iter()
        .filter(|r| operator || r.origin == who.uri())
        .collect();
    let members: Vec<serde_json::Value> = region
        .members
        .iter()
        .map(|m| {
            let s = seen.get(&m.name).cloned().unwrap_or_default();
            json!({
                "name": m.name,
                "kind": m.kind.to_string(),
                "identity": m.principal.uri(),
                "endpoint": m.endpoint.as_ref().map(|e| e.url.clone()),
                "serves": m.serves,
                "local": m.name == g.config().member.name,
                "breaker": breakers.get(&m.name).copied().unwrap_or("none"),
                "last_state": s.last_state,
                "last_latency_ms": s.last_latency_ms,
                "calls": s.calls,
                "failures": s.failures,
                "last_error": s.last_error,
                "seen": seen_of(&g, m, &breakers, &s).word(),
                "location": m.location.map(|l| json!({ "lon": l.lon, "lat": l.lat })),
            })
        })
        .collect();
    let datasets: Vec<serde_json::Value> = region
        .datasets
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "description": d.description,
                "members": region.servers_of(&d.name).map(|m| m.name.clone()).collect::<Vec<_>>(),
                "fields": d.fields.iter().map(|f| json!({
                    "name": f.name,
                    "type": f.data_type.to_string(),
                    "unit": f.unit,
                    "description": f.description,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(json!({
        "region": region.name,
        "member": g.config().member.name,
        "config_version": g.config().version,
        "caller": who.uri(),
        "members": members,
        "datasets": datasets,
        "services": services_json(&g),
        "recent": recent,
        "admission": g.admission().into_iter().collect::<BTreeMap<_, _>>(),
    }))
    .into_response()
}

/// How this gateway sees a member, for the board's table and map.
fn seen_of(
    g: &FederationService,
    m: &crate::config::region::Member,
    breakers: &BTreeMap<String, &'static str>,
    s: &crate::ops::observe::MemberSeen,
) -> pictures::Seen {
    pictures::seen(
        m.name == g.config().member.name,
        m.endpoint.is_some(),
        breakers.get(&m.name).copied().unwrap_or("none"),
        s.last_state,
    )
}

/// An SVG picture. The policy forbids any script or outside resource even when
/// the picture is opened on its own rather than inside the board.
fn svg_response(body: String) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; sandbox"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /v1/board/map.svg`: the region's members on a map, coloured by their state
/// as this gateway sees them.
async fn map_svg(State(app): State<AppState>) -> Response {
    let g = app.current.load();
    let region = &g.config().region;
    let breakers = g.coordinator().breaker_states();
    let seen = g.observer().members();
    let mut places = Vec::new();
    let mut unplaced = Vec::new();
    for m in &region.members {
        let s = seen.get(&m.name).cloned().unwrap_or_default();
        let Some(at) = m.location else {
            unplaced.push(m.name.clone());
            continue;
        };
        // The last state and latency only: the last error text is for this member's
        // operators (as on `/v1/status`), and the map is shown to every caller.
        let detail = match (s.last_state, s.last_latency_ms) {
            (Some(state), Some(ms)) => format!("last sub-query {state} in {ms:.1} ms"),
            _ => String::new(),
        };
        places.push(pictures::Place {
            name: m.name.clone(),
            kind: m.kind.to_string(),
            lon: at.lon,
            lat: at.lat,
            seen: seen_of(&g, m, &breakers, &s),
            detail,
        });
    }
    svg_response(pictures::map_svg(
        &region.name,
        &g.config().member.name,
        &places,
        &unplaced,
    ))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The members a coordinator sends sub-queries to: those whose gateway serves data.
fn gateway_members(g: &FederationService) -> Vec<String> {
    g.config()
        .region
        .members
        .iter()
        .filter(|m| m.endpoint.is_some() && !m.serves.is_empty())
        .map(|m| m.name.clone())
        .collect()
}

/// `GET /v1/board/charts.svg`: each member's last hour of sub-queries.
async fn charts_svg(State(app): State<AppState>) -> Response {
    let g = app.current.load();
    let now = std::time::SystemTime::now();
    svg_response(pictures::charts_svg(
        &gateway_members(&g),
        &g.observer().history(now),
        unix_now(),
    ))
}

/// `GET /v1/history`: the charts' numbers, minute by minute.
async fn history(State(app): State<AppState>) -> Response {
    let g = app.current.load();
    let now = std::time::SystemTime::now();
    // Members a reload removed drop out at once, not after their hour.
    let mut members = g.observer().history(now);
    members.retain(|m, _| g.config().region.member(m).is_some());
    axum::Json(json!({
        "now": unix_now(),
        "minutes": crate::ops::history::MINUTES,
        "members": members,
    }))
    .into_response()
}

/// `POST /v1/query`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    sql: String,
    #[serde(default)]
    allow_partial: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    purpose: Option<String>,
    /// A signed incident declaration, as `fedgate incident declare` writes it
    /// (standard base64).
    #[serde(default)]
    incident: Option<String>,
    /// Return a signed receipt in the summary (`"receipt"`, base64).
    #[serde(default)]
    receipt: bool,
}

/// Options a service call may carry beside its parameters, as query-string
/// parameters (the body holds only the service's own parameters).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CallOptions {
    #[serde(default)]
    allow_partial: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    purpose: Option<String>,
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Error::InvalidQuery(format!("the request body is not what this call takes: {e}"))
    })
}

/// The origin assertion an HTTP caller sent (`fedgate-origin-assertion`, base64).
fn assertion_header(headers: &http::HeaderMap) -> Result<Option<std::sync::Arc<Vec<u8>>>> {
    use base64::Engine as _;
    let Some(v) = headers.get(crate::trust::assertion::HTTP_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        Error::InvalidQuery(format!(
            "header {} is not standard base64",
            crate::trust::assertion::HTTP_HEADER
        ))
    };
    let text = v.to_str().map_err(|_| bad())?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(|b| Some(std::sync::Arc::new(b)))
        .map_err(|_| bad())
}

async fn query(
    State(app): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let g = app.current.load();
    if let Err(e) = known(&g, &who) {
        return error_response(&e, None);
    }
    let q: QueryBody = match parse_json(&body) {
        Ok(q) => q,
        Err(e) => return error_response(&e, None),
    };
    let assertion = match assertion_header(&headers) {
        Ok(a) => a,
        Err(e) => return error_response(&e, None),
    };
    let incident = match q.incident.as_deref().map(|t| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(t.trim())
            .map_err(|_| Error::InvalidQuery("incident is not standard base64".into()))
    }) {
        None => None,
        Some(Ok(b)) => Some(std::sync::Arc::new(b)),
        Some(Err(e)) => return error_response(&e, None),
    };
    let ask = Ask {
        assertion,
        incident,
        receipt: q.receipt,
        allow_partial: q.allow_partial,
        timeouts: q
            .timeout_ms
            .map(std::time::Duration::from_millis)
            .into_iter()
            .collect(),
        purpose: q.purpose.unwrap_or_default(),
        ..Ask::sql(q.sql)
    };
    match g.start(who, ask).await {
        Ok(started) => answer(started, None).await,
        Err(e) => error_response(&e, None),
    }
}

async fn invoke(
    State(app): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    Path(name): Path<String>,
    options: std::result::Result<
        axum::extract::Query<CallOptions>,
        axum::extract::rejection::QueryRejection,
    >,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let g = app.current.load();
    if let Err(e) = known(&g, &who) {
        return error_response(&e, None);
    }
    let options = match options {
        Ok(axum::extract::Query(o)) => o,
        Err(e) => {
            return error_response(
                &Error::InvalidQuery(format!(
                    "the query string takes only allow_partial, timeout_ms and purpose: {e}"
                )),
                None,
            );
        }
    };
    let fed = &g;
    let given = serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| Error::InvalidQuery(format!("the request body is not JSON: {e}")))
        .and_then(|v| crate::frontend::services::given_from_json(&v));
    let ask =
        given.and_then(|given| fed.service_ask(&who, &name, &given, options.purpose.as_deref()));
    let mut ask = match ask {
        Ok(a) => a,
        Err(e) => return error_response(&fed.refuse_service(&who, &name, e), None),
    };
    ask.allow_partial = options.allow_partial;
    ask.assertion = match assertion_header(&headers) {
        Ok(a) => a,
        Err(e) => return error_response(&e, None),
    };
    ask.timeouts = options
        .timeout_ms
        .map(std::time::Duration::from_millis)
        .into_iter()
        .collect();
    match fed.start(who, ask).await {
        Ok(started) => answer(started, Some(&name)).await,
        Err(e) => error_response(&e, None),
    }
}

/// Collects a started query into one JSON document: columns, rows (as objects, with
/// explicit nulls) and the summary.
async fn answer(started: Started, service: Option<&str>) -> Response {
    let Started {
        schema,
        mut batches,
        outcome,
        ..
    } = started;
    let mut rows = Vec::new();
    let mut count = 0u64;
    let mut writer = arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::JsonArray>(&mut rows);
    let mut failure = None;
    while let Some(b) = batches.recv().await {
        count += b.num_rows() as u64;
        if count > MAX_JSON_ROWS {
            // Dropping the receiver cancels the query; it is recorded as cancelled.
            failure = Some(Error::TooLarge(format!(
                "the answer has more than {MAX_JSON_ROWS} rows, the most a JSON answer \
                 carries; aggregate or narrow it, or use Flight SQL or Federation.Query"
            )));
            break;
        }
        if let Err(e) = writer.write(&b) {
            failure = Some(Error::Internal(format!("writing JSON: {e}")));
            break;
        }
    }
    if let Some(e) = failure {
        drop(batches);
        let summary = outcome.wait().await.summary;
        return error_response(&e, summary.as_ref());
    }
    if let Err(e) = writer.finish() {
        return error_response(&Error::Internal(format!("writing JSON: {e}")), None);
    }
    drop(writer);
    let Outcome { summary, failure } = outcome.wait().await;
    if let Some(e) = failure {
        return error_response(&e, summary.as_ref());
    }
    let Some(summary) = summary else {
        return error_response(
            &Error::Internal("the query ended without a summary".into()),
            None,
        );
    };
    if rows.is_empty() {
        rows.extend_from_slice(b"[]");
    }
    let columns: Vec<serde_json::Value> = schema
        .fields()
        .iter()
        .map(|f| json!({ "name": f.name(), "type": f.data_type().to_string() }))
        .collect();
    // The rows are spliced in as the Arrow JSON writer wrote them, not parsed again.
    let mut body = Vec::with_capacity(rows.len() + 512);
    body.extend_from_slice(b"{\"columns\":");
    body.extend_from_slice(&serde_json::to_vec(&columns).unwrap_or_default());
    body.extend_from_slice(b",\"rows\":");
    body.extend_from_slice(&rows);
    body.extend_from_slice(b",\"summary\":");
    body.extend_from_slice(&serde_json::to_vec(&summary_json(&summary)).unwrap_or_default());
    if let Some(name) = service {
        body.extend_from_slice(b",\"service\":");
        body.extend_from_slice(&serde_json::to_vec(name).unwrap_or_default());
    }
    body.push(b'}');
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Serves the HTTP port until `shutdown` resolves. `tls` is the gateway's live TLS
/// configuration for mutual TLS, or `None` for plain HTTP acting as `me`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    me: Principal,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    match tls {
        None => {
            let app = router
                .layer(axum::middleware::from_fn(loopback_host_only))
                .layer(Extension(Caller(me)));
            serve_plain(listener, app, MAX_CONNECTIONS, shutdown).await;
        }
        Some(tls) => {
            use futures::StreamExt;
            use tonic::transport::server::Connected;
            let mut incoming = crate::trust::tls::incoming(listener, tls);
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            let (h1, h2) = (connection_builder(false), connection_builder(true));
            tokio::pin!(shutdown);
            loop {
                // A slot first: without one, finished handshakes wait in the
                // channel and new connections in the kernel's queue.
                let slot = tokio::select! {
                    s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
                    _ = &mut shutdown => break,
                };
                let conn = tokio::select! {
                    c = incoming.next() => c,
                    _ = &mut shutdown => break,
                };
                let Some(Ok(conn)) = conn else {
                    if conn.is_none() {
                        break;
                    }
                    continue;
                };
                let info = conn.connect_info();
                let app = router
                    .clone()
                    .layer(Extension(Caller(info.principal)))
                    .layer(Extension(CallerSerial(info.serial)));
                let builder = if conn.negotiated_h2() { &h2 } else { &h1 };
                serve_one(builder, &graceful, conn, app, slot);
            }
            graceful.shutdown().await;
        }
    }
}
