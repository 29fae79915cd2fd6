//! The tools people already use, against a running region: Flight SQL (partial
//! answers are visible), progress messages on `Federation.Query`, published services
//! checked at start, and one trace across gateways exported over OTLP.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_flight::decode::DecodedPayload;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AttrValue;

use crate::proxy::Fault;
use crate::support::{OFFICE, PER_MEMBER, Region, patch_region};

/// Fever-clinic hospitals per member: Hefei serves no list and is never asked.
const CLINICS: &str =
    "SELECT member, count(*) AS hospitals FROM fever_clinics GROUP BY member ORDER BY member";

/// A Flight SQL client of `member`'s gateway as the regional office.
fn flight_sql(region: &Region, member: &str) -> FlightSqlServiceClient<tonic::transport::Channel> {
    flight_sql_as(region, crate::support::OFFICE, member)
}

/// Runs `sql` over Flight SQL: the rows' `member` column and the `app_metadata` of
/// every message that carried one.
async fn flight_query(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> Result<(Vec<String>, Vec<serde_json::Value>), arrow_flight::error::FlightError> {
    let (batches, metadata) = flight_batches(client, sql).await?;
    Ok((crate::support::column_strings(&batches, "member"), metadata))
}

#[tokio::test]
async fn flight_sql_answers_carry_the_summary_and_partial_answers_are_never_silent() {
    let region = Region::start_only(Some(&["shanghai", "hangzhou", "hefei", "anji"])).await;
    // The office asks through its own gateway, which speaks for it to every member.
    let mut client = flight_sql(&region, crate::support::OFFICE);

    // Suzhou's gateway is down: by default the answer fails and names it.
    let e = flight_query(&mut client, CLINICS).await.unwrap_err();
    assert!(e.to_string().contains("suzhou"), "{e}");

    // Asked for, the partial answer comes with a summary that says what is missing.
    client.set_header(fedgate::frontend::flight_sql::ALLOW_PARTIAL_HEADER, "true");
    let (members, metadata) = flight_query(&mut client, CLINICS).await.unwrap();
    assert_eq!(members, ["anji", "hangzhou", "shanghai"]);
    assert_eq!(metadata.len(), 1, "one summary, at the end: {metadata:?}");
    let summary = &metadata[0];
    assert_eq!(summary["partial"], true, "{summary}");
    assert_eq!(summary["rows"], 3, "{summary}");
    let states: BTreeMap<String, String> = summary["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["member"].as_str().unwrap().to_string(),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states["suzhou"], "unavailable", "{summary}");
    for m in ["shanghai", "hangzhou", "anji"] {
        assert_eq!(states[m], "ok", "{m}: {summary}");
    }
}

#[tokio::test]
async fn progress_messages_show_members_still_running() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|_| {}).await;
    proxies["suzhou"].set(Fault::Delay(Duration::from_millis(900)));
    let client = region.client("hangzhou");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (_, summary) = client
        .query_watched(
            fedgate::proto::v1::QueryRequest {
                sql: PER_MEMBER.into(),
                timeout_ms: 10_000,
                progress: true,
                ..Default::default()
            },
            |_| Ok(()),
            move |p| log.lock().unwrap().push(p.clone()),
        )
        .await
        .unwrap();
    assert!(!summary.partial, "{summary:?}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.is_empty(),
        "a query of about a second reports progress"
    );
    let running = fedgate::proto::v1::MemberState::Running as i32;
    assert!(
        seen.iter().any(|p| p
            .members
            .iter()
            .any(|m| m.member == "suzhou" && m.state == running)),
        "the delayed member shows as running: {seen:?}"
    );
    // Progress is only ever sent before the summary, and only when asked for.
    let quiet = Arc::new(Mutex::new(0));
    let count = quiet.clone();
    client
        .query_watched(
            fedgate::proto::v1::QueryRequest {
                sql: PER_MEMBER.into(),
                timeout_ms: 10_000,
                ..Default::default()
            },
            |_| Ok(()),
            move |_| *count.lock().unwrap() += 1,
        )
        .await
        .unwrap();
    assert_eq!(*quiet.lock().unwrap(), 0);
}

/// A caller that stops reading mid-answer (its stream dropped) cancels the query at
/// the coordinator, which still records it, as cancelled, with the rows it had sent.
#[tokio::test]
async fn a_caller_that_goes_away_mid_answer_is_recorded_as_cancelled() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|_| {}).await;
    proxies["suzhou"].set(Fault::Delay(Duration::from_millis(900)));
    let client = region.client("hangzhou");
    let sql = "SELECT member, hospital_name FROM fever_clinics";
    let before = crate::support::audit_records(&region.audit_log("hangzhou")).len();
    let mut received = 0;
    let e = client
        .query_each(
            fedgate::proto::v1::QueryRequest {
                sql: sql.into(),
                timeout_ms: 10_000,
                ..Default::default()
            },
            |b| {
                // The first batch comes from a member that answers at once; Suzhou's
                // is still on its way when the caller goes.
                received += b.num_rows();
                Err(tonic::Status::cancelled("the caller stops reading"))
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stops reading"), "{e}");
    assert!(received > 0);
    let record = crate::support::awaited_record(
        &region.audit_log("hangzhou"),
        before,
        |r| r["entry"]["kind"] == "query",
        Duration::from_secs(10),
        "the abandoned query was never recorded",
    )
    .await;
    assert_eq!(record["entry"]["decision"], "cancelled", "{record}");
    assert_eq!(
        record["entry"]["sql_sha256"],
        fedgate::ops::audit::sql_hash(sql),
        "{record}"
    );
    let rows = record["entry"]["rows"].as_u64().unwrap();
    assert!(
        rows >= received as u64,
        "the record counts the {received} rows the caller saw: {record}"
    );
}

/// A caller that keeps its stream open but stops reading cannot hold a query (its
/// admission slot, the members' work) past the query's deadline: the coordinator
/// gives up at the deadline, even while it waits to hand the caller more rows, and
/// records the query as failed.
#[tokio::test]
async fn a_caller_that_stops_reading_does_not_hold_the_query_past_its_deadline() {
    let region = Region::start().await;
    // Far more than the buffers between the query and the caller hold (the batches'
    // channel, HTTP/2's window, the sockets): about 10 MB per part, 24 batches.
    let part = "SELECT repeat(hospital_name, 2000) AS r FROM fever_clinics";
    let sql = [part; 6].join(" UNION ALL ");
    let before = crate::support::audit_records(&region.audit_log(OFFICE)).len();
    let mut stream = region
        .client(OFFICE)
        .raw()
        .query(fedgate::proto::v1::QueryRequest {
            sql: sql.clone(),
            timeout_ms: 1_500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The schema arrives; then the caller reads nothing more, and keeps the stream.
    stream.message().await.unwrap().unwrap();
    let record = crate::support::awaited_record(
        &region.audit_log(OFFICE),
        before,
        |r| r["entry"]["kind"] == "query",
        Duration::from_secs(15),
        "a caller that stopped reading held the query 15 s past its 1.5 s deadline",
    )
    .await;
    assert_eq!(record["entry"]["decision"], "failed", "{record}");
    assert!(
        record["entry"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deadline")),
        "{record}"
    );
    assert_eq!(
        record["entry"]["sql_sha256"],
        fedgate::ops::audit::sql_hash(&sql),
        "{record}"
    );
    // Reading on, the caller gets what was already on its way, then the summary (not
    // complete) and the deadline's error.
    let mut summary = None;
    let end = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if let Some(fedgate::proto::v1::query_response::Payload::Summary(s)) = m.payload {
                    summary = Some(s);
                }
            }
            Ok(None) => panic!("the answer ended without saying why"),
            Err(e) => break e,
        }
    };
    assert!(end.message().contains("deadline"), "{end:?}");
    let summary = summary.expect("the summary comes before the error");
    assert!(summary.partial, "{summary:?}");
    assert_eq!(
        Some(summary.rows),
        record["entry"]["rows"].as_u64(),
        "the summary and the record count the same rows"
    );
}

#[tokio::test]
async fn a_service_whose_placeholders_are_not_its_parameters_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let layout = fedgate::tools::demo::materialize(
        &fedgate::tools::demo::default_source(),
        dir.path(),
        &|_, p| p,
    )
    .unwrap();
    let cases = [
        (
            "SELECT * FROM census WHERE county_code = $code AND pop_total > $min",
            vec![("code", "utf8")],
            "placeholder $min is not a declared parameter",
        ),
        (
            "SELECT * FROM census WHERE county_code = $code",
            vec![("code", "utf8"), ("unused", "int64")],
            "parameter unused is declared but the SQL has no $unused placeholder",
        ),
        (
            "SELECT * FROM census WHERE pop_total > $min",
            vec![("min", "utf8")],
            "parameter min is declared utf8 but used where Int64 is expected",
        ),
    ];
    for (sql, params, want) in cases {
        patch_region(&layout, |r| {
            r.services = vec![fedgate::config::raw::RawService {
                name: "s".into(),
                description: String::new(),
                callers: vec!["*".into()],
                sql: sql.into(),
                purpose: None,
                params: params
                    .iter()
                    .map(|(n, t)| fedgate::config::raw::RawParam {
                        name: n.to_string(),
                        data_type: t.to_string(),
                        description: String::new(),
                    })
                    .collect(),
            }];
        });
        let cfg = fedgate::config::MemberConfig::load(&layout.dir.join("hefei.toml")).unwrap();
        let e = match fedgate::gateway::Gateway::start(Arc::new(cfg), None).await {
            Ok(_) => panic!("{sql} with {params:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{e}");
        assert!(e.contains("service s"), "{e}");
        // `fedgate check` finds the same before anything is started.
        let report = fedgate::tools::check::check(&layout.dir.join("hefei.toml")).await;
        assert!(
            report
                .errors
                .iter()
                .any(|p| p.key == "services[0]" && p.message.contains(want)),
            "{:?}",
            report.errors
        );
    }
}

/// An OTLP/gRPC collector that keeps every span it is sent.
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    member: String,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let member = s
                        .attributes
                        .iter()
                        .find(|a| a.key == "member")
                        .and_then(|a| a.value.as_ref()?.value.as_ref())
                        .map(|v| match v {
                            AttrValue::StringValue(s) => s.clone(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    spans.push(Span {
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        member,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn one_federated_query_is_one_trace_across_the_gateways() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The process-wide subscriber: this test runs in a process of its own under
    // nextest. Every gateway below exports to the collector.
    let telemetry = fedgate::ops::telemetry::init(&fedgate::ops::telemetry::Settings {
        default_filter: "warn".into(),
        otlp_endpoint: Some(format!("http://{addr}")),
        service_name: "fedgate-test".into(),
        ..Default::default()
    })
    .unwrap();
    let region = Region::start().await;
    let a = region
        .client("shanghai")
        .query(CLINICS, false, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(!a.summary.partial);
    telemetry.flush();
    let remote = ["hangzhou", "suzhou", "anji"];
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = collector.0.lock().unwrap().clone();
        let executes = spans.iter().filter(|s| s.name == "execute").count();
        if spans.iter().any(|s| s.name == "query") && executes >= remote.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        telemetry.flush();
    }
    let query = spans
        .iter()
        .find(|s| s.name == "query" && s.member == "shanghai")
        .unwrap_or_else(|| panic!("no query span from shanghai in {spans:#?}"));
    let trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == query.trace_id)
        .collect();
    // The coordinator: one member call per member asked, children of the query.
    let calls: BTreeMap<&str, &Span> = trace
        .iter()
        .filter(|s| s.name == "member_call")
        .map(|s| (s.member.as_str(), *s))
        .collect();
    for m in ["shanghai", "hangzhou", "suzhou", "anji"] {
        let call = calls
            .get(m)
            .unwrap_or_else(|| panic!("no member_call span for {m} in {trace:#?}"));
        assert_eq!(call.parent, query.span_id, "{m}");
    }
    // Each remote member: its execute span is in the same trace, a child of the
    // coordinator's call to it, carried there in the gRPC metadata.
    for m in remote {
        let exec = trace
            .iter()
            .find(|s| s.name == "execute" && s.member == m)
            .unwrap_or_else(|| panic!("no execute span at {m} in the query's trace: {trace:#?}"));
        assert_eq!(exec.parent, calls[m].span_id, "{m}");
    }
    telemetry.shutdown();
}

#[tokio::test]
async fn describe_lists_the_published_services_and_whether_the_caller_may_call_them() {
    let region = Region::start_only(Some(&["anji"])).await;
    let callable = |d: &fedgate::proto::v1::DescribeResponse| -> BTreeMap<String, bool> {
        d.services
            .iter()
            .map(|s| (s.name.clone(), s.callable))
            .collect()
    };
    let office = region.client("anji").describe(None).await.unwrap();
    assert_eq!(
        callable(&office),
        BTreeMap::from([
            ("enrollment_check".to_string(), false),
            ("fever_clinics_near".to_string(), true),
        ])
    );
    let county = region
        .client_as("anji", "anji")
        .describe(None)
        .await
        .unwrap();
    assert!(
        callable(&county).values().all(|c| *c),
        "{:?}",
        county.services
    );
    let check = county
        .services
        .iter()
        .find(|s| s.name == "enrollment_check")
        .unwrap();
    assert_eq!(check.purpose, "enrollment-check");
    assert_eq!(check.params[0].name, "id_number");
    assert_eq!(check.params[0].data_type, "utf8");
}

#[tokio::test]
async fn a_service_plan_is_reused_only_for_the_same_values() {
    let region = Region::start().await;
    let anji = region.client_as("anji", "anji");
    let call = |county: &'static str| {
        let anji = anji.clone();
        async move {
            let mut counties = Vec::new();
            let (_, summary) = anji
                .invoke_watched(
                    fedgate::proto::v1::InvokeRequest {
                        service: "fever_clinics_near".into(),
                        params: [(
                            "county_code".to_string(),
                            fedgate::proto::v1::ParamValue {
                                value: Some(fedgate::proto::v1::param_value::Value::Text(
                                    county.into(),
                                )),
                            },
                        )]
                        .into(),
                        timeout_ms: 20_000,
                        ..Default::default()
                    },
                    |b| {
                        counties.extend(crate::support::column_strings(&[b], "county_code"));
                        Ok(())
                    },
                    |_| {},
                )
                .await
                .unwrap();
            (counties, summary.plan_cached)
        }
    };
    let (hz, cached) = call("330106").await;
    assert!(!cached);
    assert!(
        !hz.is_empty() && hz.iter().all(|c| c.starts_with("3301")),
        "{hz:?}"
    );
    let (again, cached) = call("330106").await;
    assert!(cached, "the same values reuse the plan");
    assert_eq!(again, hz);
    // Other values are another plan: a plan made for Hangzhou's code must never
    // answer for Suzhou's.
    let (sz, cached) = call("320508").await;
    assert!(!cached);
    assert!(
        !sz.is_empty() && sz.iter().all(|c| c.starts_with("3205")),
        "{sz:?}"
    );
}

/// A service whose query one member answers alone, with a parameter of each kind:
/// the values are bound at the coordinator and reach the member as typed literals
/// of the sub-query (a query with placeholders is never sent whole as written).
#[tokio::test]
async fn a_service_answered_by_one_member_gets_its_values_there() {
    let region = Region::start_patched(None, &|layout| {
        crate::support::patch_region(layout, |r| {
            r.services.push(fedgate::config::raw::RawService {
                name: "hangzhou_big_counties".into(),
                description: String::new(),
                callers: vec!["fedgate://yrd/county/*".into()],
                sql: "SELECT county_code FROM census WHERE member = 'hangzhou' \
                      AND pop_total > $min AND county_code <> $except ORDER BY county_code"
                    .into(),
                purpose: None,
                params: vec![
                    fedgate::config::raw::RawParam {
                        name: "min".into(),
                        data_type: "int64".into(),
                        description: String::new(),
                    },
                    fedgate::config::raw::RawParam {
                        name: "except".into(),
                        data_type: "utf8".into(),
                        description: String::new(),
                    },
                ],
            })
        })
    })
    .await;
    let anji = region.client_as("anji", "anji");
    let expected = anji
        .query(
            "SELECT county_code FROM census WHERE member = 'hangzhou' \
             AND pop_total > 1000000 AND county_code <> '330106' ORDER BY county_code",
            false,
            None,
        )
        .await
        .unwrap();
    let expected = crate::support::column_strings(&expected.batches, "county_code");
    assert!(expected.len() >= 2, "{expected:?}");
    use fedgate::proto::v1::{ParamValue, param_value::Value};
    let mut got = Vec::new();
    let (_, summary) = anji
        .invoke_watched(
            fedgate::proto::v1::InvokeRequest {
                service: "hangzhou_big_counties".into(),
                params: [
                    (
                        "min".to_string(),
                        ParamValue {
                            value: Some(Value::Int64(1_000_000)),
                        },
                    ),
                    (
                        "except".to_string(),
                        ParamValue {
                            value: Some(Value::Text("330106".into())),
                        },
                    ),
                ]
                .into(),
                timeout_ms: 20_000,
                ..Default::default()
            },
            |b| {
                got.extend(crate::support::column_strings(&[b], "county_code"));
                Ok(())
            },
            |_| {},
        )
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(got, expected);
    assert_eq!(
        crate::support::member_state(&summary, "hangzhou"),
        fedgate::proto::v1::MemberState::Ok
    );
}

/// Runs `sql` over Flight SQL: every batch and the `app_metadata` of every message
/// that carried one.
async fn flight_batches(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> Result<
    (
        Vec<datafusion::arrow::record_batch::RecordBatch>,
        Vec<serde_json::Value>,
    ),
    arrow_flight::error::FlightError,
> {
    let info = client.execute(sql.to_string(), None).await?;
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut data = client.do_get(ticket).await?.into_inner();
    let (mut batches, mut metadata) = (Vec::new(), Vec::new());
    while let Some(d) = data.try_next().await? {
        if !d.app_metadata().is_empty() {
            metadata.push(serde_json::from_slice(&d.app_metadata()).unwrap());
        }
        if let DecodedPayload::RecordBatch(b) = d.payload {
            batches.push(b);
        }
    }
    Ok((batches, metadata))
}

/// A Flight SQL client of `gateway` as `who`.
fn flight_sql_as(
    region: &Region,
    who: &str,
    gateway: &str,
) -> FlightSqlServiceClient<tonic::transport::Channel> {
    let certs = region.layout.dir.join("certs");
    let tls = fedgate::trust::tls::TlsMaterial::load(
        &region.layout.ca,
        &certs.join(format!("{who}.crt")),
        &certs.join(format!("{who}.key")),
    )
    .unwrap();
    let channel = fedgate::trust::tls::Connector::new(
        tls.client_config().unwrap(),
        "127.0.0.1",
        region.port(gateway),
        None,
    )
    .channel(Duration::from_secs(5))
    .unwrap();
    FlightSqlServiceClient::new(channel)
}

/// `POST /v1/query` on `gateway`'s HTTP port, over mutual TLS as `who` when the port
/// has TLS (HTTP/1.1 by hand: the tests have no HTTP client crate). The status line
/// and body.
async fn http_query(region: &Region, who: &str, gateway: &str, sql: &str) -> (u16, String) {
    let body = serde_json::json!({ "sql": sql }).to_string();
    http_request(region, who, gateway, "POST", "/v1/query", &body).await
}

/// One HTTP/1.1 request on `gateway`'s HTTP port as `who` (over mutual TLS when the
/// port has TLS; a plain loopback port acts as the gateway's own member).
pub(crate) async fn http_request(
    region: &Region,
    who: &str,
    gateway: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = region.gateways[gateway].http_addr.expect("an HTTP port");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        addr.port(),
        body.len()
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut raw = Vec::new();
    let tls = fedgate::config::MemberConfig::load(
        &region
            .layout
            .gateways
            .iter()
            .find(|(n, _, _)| n == gateway)
            .unwrap()
            .1,
    )
    .unwrap()
    .http
    .is_some_and(|h| h.tls);
    if tls {
        let certs = region.layout.dir.join("certs");
        let material = fedgate::trust::tls::TlsMaterial::load(
            &region.layout.ca,
            &certs.join(format!("{who}.crt")),
            &certs.join(format!("{who}.key")),
        )
        .unwrap();
        let mut config = (*material.client_config().unwrap()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let _ = s.read_to_end(&mut raw).await;
    } else {
        let mut s = tcp;
        s.write_all(request.as_bytes()).await.unwrap();
        s.read_to_end(&mut raw).await.unwrap();
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Attacks of every class the owner-side suite generates (derived tables, CTEs,
/// renames, unions, joins, casts, arithmetic, CASE, NULL tricks, errors), sent
/// through gRPC, Flight SQL and the JSON API, as the office (`aggregate`, k = 10)
/// through its own gateway and as Hefei (`verify`) through its own: no answer and no
/// error holds an ID, name or phone of a person, each front end answers or refuses
/// alike, and every count the office gets is of at least 10 people.
#[tokio::test]
async fn restricted_grants_hold_on_every_front_end() {
    let region = Region::start().await;
    let mut secrets = Vec::new();
    for m in ["hangzhou", "suzhou"] {
        let rows = region
            .owner_rows(m, "SELECT id_number, name, phone FROM enrollment")
            .await;
        for c in ["id_number", "name", "phone"] {
            secrets.extend(
                crate::support::column_strings(&rows, c)
                    .into_iter()
                    .filter(|s| s.chars().count() >= 2),
            );
        }
    }
    assert!(secrets.len() > 3000, "{}", secrets.len());
    let id = "330106198703151232";
    let office_attacks = [
        "SELECT id FROM (SELECT id_number AS id, county_code FROM enrollment) t",
        "WITH t AS (SELECT name AS county_code FROM enrollment) \
         SELECT county_code, count(*) AS n FROM t GROUP BY county_code",
        "SELECT county_code AS c, count(*) AS n FROM (SELECT phone AS county_code FROM enrollment) \
         GROUP BY county_code",
        "SELECT name FROM enrollment UNION SELECT phone FROM enrollment",
        "SELECT a.county_code, count(*) AS n FROM enrollment a JOIN enrollment b \
         ON a.id_number = b.id_number GROUP BY a.county_code",
        "SELECT count(*) AS n FROM enrollment WHERE CAST(substr(id_number, 1, 1) AS INT) = 3",
        &format!("SELECT count(CASE WHEN id_number = '{id}' THEN 1 END) AS n FROM enrollment"),
        "SELECT count(nullif(name, '')) AS n FROM enrollment",
        "SELECT sum(1 / (birth_year - 1987)) AS s FROM enrollment",
        "SELECT count(*) AS n FROM enrollment WHERE CAST(name AS INT) > 0",
        "SELECT max(phone) AS p FROM enrollment",
        "SELECT county_code, count(*) AS n FROM enrollment GROUP BY county_code ORDER BY county_code",
    ];
    let verify_attacks = [
        &format!("SELECT name, phone FROM enrollment WHERE id_number = '{id}'") as &str,
        &format!(
            "SELECT count(*) AS n FROM (SELECT name AS id_number FROM enrollment) WHERE id_number = '{id}'"
        ),
        &format!(
            "WITH t AS (SELECT phone AS id_number FROM enrollment) SELECT count(*) AS n FROM t WHERE id_number = '{id}'"
        ),
        "SELECT count(*) AS n FROM enrollment WHERE id_number LIKE '3301%'",
        "SELECT count(*) AS n FROM enrollment WHERE CAST(id_number AS INT) = 5",
        &format!(
            "SELECT member, count(*) AS enrolled FROM enrollment WHERE id_number = '{id}' GROUP BY member"
        ),
    ];
    let cases: Vec<(&str, &[&str])> = vec![
        (crate::support::OFFICE, &office_attacks),
        ("hefei", &verify_attacks),
    ];
    for (who, attacks) in cases {
        let grpc = region.client_as(who, who);
        let mut flight = flight_sql_as(&region, who, who);
        for (i, sql) in attacks.iter().enumerate() {
            let g = grpc.query(sql, false, None).await;
            let f = flight_batches(&mut flight, sql).await;
            let (status, h) = http_query(&region, who, who, sql).await;
            let outcomes = [
                (
                    "gRPC",
                    g.is_ok(),
                    match &g {
                        Ok(a) => datafusion::arrow::util::pretty::pretty_format_batches(&a.batches)
                            .unwrap()
                            .to_string(),
                        Err(e) => e.to_string(),
                    },
                ),
                (
                    "Flight SQL",
                    f.is_ok(),
                    match &f {
                        Ok((batches, meta)) => format!(
                            "{}\n{meta:?}",
                            datafusion::arrow::util::pretty::pretty_format_batches(batches)
                                .unwrap()
                        ),
                        Err(e) => e.to_string(),
                    },
                ),
                ("HTTP", status == 200, h),
            ];
            // A value the caller wrote itself may come back in a refusal that quotes
            // its expression; anything else is a record's.
            for (front, _, text) in &outcomes {
                if let Some(s) = secrets
                    .iter()
                    .find(|s| text.contains(s.as_str()) && !sql.contains(s.as_str()))
                {
                    panic!("{who} via {front}: {sql}\nholds the record value {s:?}:\n{text}");
                }
            }
            // Every attack is refused; the last query of each list is the legitimate
            // question, answered.
            assert_eq!(
                outcomes[0].1,
                i + 1 == attacks.len(),
                "{who} via gRPC: {sql}: {}",
                outcomes[0].2
            );
            assert!(
                outcomes.iter().all(|o| o.1 == outcomes[0].1),
                "{who}: the front ends disagree on {sql}: {:?}",
                outcomes.iter().map(|o| (o.0, o.1)).collect::<Vec<_>>()
            );
            if who == crate::support::OFFICE
                && let Ok(a) = &g
                && let Some(col) = a.schema.fields().iter().position(|f| f.name() == "n")
            {
                for b in &a.batches {
                    let n = datafusion::arrow::compute::cast(
                        b.column(col),
                        &datafusion::arrow::datatypes::DataType::Int64,
                    )
                    .unwrap();
                    let n = n
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::Int64Array>()
                        .unwrap();
                    assert!(
                        n.iter().flatten().all(|v| v == 0 || v >= 10),
                        "{sql}: a count of fewer than 10 people: {n:?}"
                    );
                }
            }
        }
    }
}

/// Flight SQL prepared statements take parameters (`?` as JDBC and ADBC write them, or
/// `$1`), bound over DoPut into an updated handle as typed values, and the metadata
/// calls BI drivers make are answered.
#[tokio::test]
async fn flight_sql_prepared_statements_bind_typed_values_and_drivers_metadata_answers() {
    use arrow_flight::sql::{
        CommandGetPrimaryKeys, CommandGetTables, CommandGetXdbcTypeInfo,
        CommandPreparedStatementQuery, ProstMessageExt,
    };
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;

    let region = Region::start().await;
    let mut client = flight_sql(&region, crate::support::OFFICE);
    let one = |name: &str, values: Arc<dyn datafusion::arrow::array::Array>| {
        let field = Field::new(name, values.data_type().clone(), true);
        RecordBatch::try_new(Arc::new(Schema::new(vec![field])), vec![values]).unwrap()
    };
    async fn rows_of(
        client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
        info: arrow_flight::FlightInfo,
    ) -> Result<Vec<datafusion::arrow::record_batch::RecordBatch>, arrow_flight::error::FlightError>
    {
        let ticket = info.endpoint[0].ticket.clone().unwrap();
        client.do_get(ticket).await?.try_collect().await
    }

    // The answer written with the literal, through a name qualified as clients list it.
    let (literal, _) = flight_batches(
        &mut client,
        "SELECT county_name, pop_total FROM yrd.canonical.census WHERE county_code = '330523'",
    )
    .await
    .unwrap();
    let literal_rows = crate::support::column_strings(&literal, "county_name");
    assert_eq!(literal_rows.len(), 1, "{literal_rows:?}");

    // `?` placeholder: the parameter schema says what the planner inferred, and the
    // bound value gives the literal's answer.
    let mut stmt = client
        .prepare(
            "SELECT county_name, pop_total FROM census WHERE county_code = ?".into(),
            None,
        )
        .await
        .unwrap();
    let params = stmt.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 1, "{params:?}");
    assert_eq!(params.field(0).data_type(), &DataType::Utf8);
    stmt.set_parameters(one("$1", Arc::new(StringArray::from(vec!["330523"]))))
        .unwrap();
    let info = stmt.execute().await.unwrap();
    let got = rows_of(&mut client, info).await.unwrap();
    assert_eq!(
        crate::support::column_strings(&got, "county_name"),
        literal_rows
    );
    // A value that would be SQL if spliced into the text is a value: it matches nothing.
    stmt.set_parameters(one(
        "$1",
        Arc::new(StringArray::from(vec!["330523' OR '1'='1"])),
    ))
    .unwrap();
    let info = stmt.execute().await.unwrap();
    let hostile = rows_of(&mut client, info).await.unwrap();
    assert_eq!(hostile.iter().map(|b| b.num_rows()).sum::<usize>(), 0);

    // `$1` with an integer, run twice with different values.
    let mut big = client
        .prepare(
            "SELECT count(*) AS n FROM census WHERE pop_total > $1".into(),
            None,
        )
        .await
        .unwrap();
    let mut counts = Vec::new();
    for threshold in [0i64, 1_000_000] {
        big.set_parameters(one("$1", Arc::new(Int64Array::from(vec![threshold]))))
            .unwrap();
        let info = big.execute().await.unwrap();
        let b = rows_of(&mut client, info).await.unwrap();
        let n = b
            .iter()
            .find(|b| b.num_rows() == 1)
            .map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .value(0)
            })
            .unwrap();
        counts.push(n);
    }
    assert!(
        counts[0] > counts[1] && counts[1] > 0,
        "more counties above 0 than above a million: {counts:?}"
    );

    // Bad bindings are refused with what is wrong.
    let mut two = client
        .prepare(
            "SELECT county_name FROM census WHERE county_code = ? AND pop_total > ?".into(),
            None,
        )
        .await
        .unwrap();
    two.set_parameters(one("$1", Arc::new(StringArray::from(vec!["330523"]))))
        .unwrap();
    let e = two.execute().await.unwrap_err().to_string();
    assert!(
        e.contains("binding parameters") && e.contains("placeholder with id $2"),
        "{e}"
    );
    two.set_parameters(
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("a", DataType::Utf8, true),
                Field::new("b", DataType::Int64, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec!["330523", "330522"])),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let e = two.execute().await.unwrap_err().to_string();
    assert!(e.contains("one row of values"), "{e}");
    // Values are of the kinds a query compares with, not lists or structs.
    let list = datafusion::arrow::array::ListArray::from_iter_primitive::<
        datafusion::arrow::datatypes::Int64Type,
        _,
        _,
    >(vec![Some(vec![Some(1), Some(2)])]);
    stmt.set_parameters(one("$1", Arc::new(list))).unwrap();
    let e = stmt.execute().await.unwrap_err().to_string();
    assert!(e.contains("values are numbers, text"), "{e}");
    let e = client
        .prepare(
            "SELECT county_name FROM census WHERE county_code = ? AND pop_total > $2".into(),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("either ? or $1"), "{e}");

    // A handle the gateway did not issue is refused, and so is one whose values were
    // altered into something that is not one row.
    for (handle, why) in [
        (
            b"SELECT * FROM enrollment".to_vec(),
            "not issued by a fedgate gateway",
        ),
        (
            b"fedgate.prepared.v1:\x0a\x08SELECT 1\x12\x03abc".to_vec(),
            "the prepared statement handle's values",
        ),
    ] {
        let cmd = CommandPreparedStatementQuery {
            prepared_statement_handle: handle.into(),
        };
        let ticket = arrow_flight::Ticket::new(prost::Message::encode_to_vec(&cmd.as_any()));
        let e = match client.do_get(ticket).await {
            Ok(s) => match s.try_collect::<Vec<_>>().await {
                Ok(b) => panic!("a forged handle was answered: {b:?}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(e.contains(why), "{e}");
    }

    // Metadata drivers ask for: the canonical types, keys (none declared), and tables
    // filtered by a name pattern.
    let info = client
        .get_xdbc_type_info(CommandGetXdbcTypeInfo { data_type: None })
        .await
        .unwrap();
    let types = rows_of(&mut client, info).await.unwrap();
    let mut names = crate::support::column_strings(&types, "type_name");
    names.sort();
    assert_eq!(names, ["BIGINT", "BOOLEAN", "DATE", "DOUBLE", "VARCHAR"]);
    let info = client
        .get_primary_keys(CommandGetPrimaryKeys {
            catalog: None,
            db_schema: Some("canonical".into()),
            table: "census".into(),
        })
        .await
        .unwrap();
    let keys = rows_of(&mut client, info).await.unwrap();
    assert_eq!(keys.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    assert!(keys.is_empty() || keys[0].schema().field_with_name("key_sequence").is_ok());
    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: Some("canonical".into()),
            table_name_filter_pattern: Some("cen%".into()),
            table_types: vec![],
            include_schema: false,
        })
        .await
        .unwrap();
    let tables = rows_of(&mut client, info).await.unwrap();
    assert_eq!(
        crate::support::column_strings(&tables, "table_name"),
        ["census"]
    );
}

/// A member's audit records are exported as JSON lines (schema `fedgate.audit.v1`) as
/// its log holds them, and its own operators browse and verify the log over HTTP;
/// any other identity is refused.
#[tokio::test]
async fn audit_records_are_exported_and_browsable_by_the_members_own_operators_only() {
    let region = Region::start_patched(None, &|layout| {
        crate::support::patch_member(layout, "hangzhou", |m| {
            m.audit_export = Some(fedgate::config::raw::RawAuditExport {
                path: "export/hangzhou.jsonl".into(),
            })
        })
    })
    .await;
    let a = region
        .client(OFFICE)
        .query(crate::support::PER_MEMBER, false, None)
        .await
        .unwrap();
    assert!(a.summary.members.iter().any(|m| m.member == "hangzhou"));
    let log = crate::support::audit_records(&region.audit_log("hangzhou"));
    let last = log.last().unwrap().clone();
    let sink = region.layout.dir.join("export/hangzhou.jsonl");
    let started = std::time::Instant::now();
    let exported = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&sink)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["hash"] == last["hash"]) {
            break lines;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not exported: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(exported.len(), log.len());
    for (e, l) in exported.iter().zip(&log) {
        assert_eq!(e["schema"], "fedgate.audit.v1");
        assert_eq!(e["member_identity"], "fedgate://yrd/city/hangzhou");
        assert_eq!(
            (&e["seq"], &e["hash"], &e["entry"]),
            (&l["seq"], &l["hash"], &l["entry"])
        );
    }

    // Hangzhou's plain loopback port acts as Hangzhou itself: its operators.
    let (code, body) =
        http_request(&region, OFFICE, "hangzhou", "GET", "/v1/audit?limit=2", "").await;
    assert_eq!(code, 200, "{body}");
    let page: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let records = page["records"].as_array().unwrap();
    assert!(!records.is_empty() && records.len() <= 2);
    assert_eq!(records.last().unwrap()["hash"], last["hash"]);
    let (code, body) =
        http_request(&region, OFFICE, "hangzhou", "GET", "/v1/audit/verify", "").await;
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(report["broken"].is_null(), "{report}");
    assert_eq!(report["records"].as_u64().unwrap() as usize, log.len());
    let (code, _) = http_request(&region, OFFICE, "hangzhou", "GET", "/v1/audit?limit=0", "").await;
    assert_eq!(code, 400);
    // Over mutual TLS: the office's gateway shows its own log to the office, and not
    // to another member.
    let (code, _) = http_request(&region, OFFICE, OFFICE, "GET", "/v1/audit", "").await;
    assert_eq!(code, 200);
    for path in ["/v1/audit", "/v1/audit/verify"] {
        let (code, body) = http_request(&region, "hefei", OFFICE, "GET", path, "").await;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("own identity"), "{body}");
    }
}

/// The board's pictures over the office's mutual-TLS HTTP port: every member is on
/// the map (the sample region places them all) with the state the office's gateway
/// saw in the query it just coordinated, the charts and `/v1/history` count that
/// query's sub-queries, and the SVG is served so that it can run nothing even when
/// opened on its own.
#[tokio::test]
async fn the_board_draws_each_member_on_the_map_and_its_last_hour_in_charts() {
    let region = Region::start().await;
    let answer = region
        .client(OFFICE)
        .query(crate::support::PER_MEMBER, false, None)
        .await
        .unwrap();
    let asked: Vec<&str> = answer
        .summary
        .members
        .iter()
        .filter(|m| m.state == fedgate::proto::v1::MemberState::Ok as i32)
        .map(|m| m.member.as_str())
        .collect();
    assert!(asked.len() >= 5, "{:?}", answer.summary);

    let (status, map) = http_request(&region, OFFICE, OFFICE, "GET", "/v1/board/map.svg", "").await;
    assert_eq!(status, 200, "{map}");
    let head = map.to_ascii_lowercase();
    assert!(head.contains("content-type: image/svg+xml"), "{map}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; sandbox"),
        "{map}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{map}");
    for m in &asked {
        assert!(
            map.contains(&format!("<g data-member=\"{m}\" data-state=\"up\">")),
            "{m} is not drawn as up: {map}"
        );
    }
    assert!(map.contains("<g data-member=\"coordination\" data-state=\"this gateway\">"));
    assert!(!map.contains("Not on the map"), "{map}");

    let (status, history) = http_request(&region, OFFICE, OFFICE, "GET", "/v1/history", "").await;
    assert_eq!(status, 200, "{history}");
    let json: serde_json::Value =
        serde_json::from_str(&history[history.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    let (status, charts) =
        http_request(&region, OFFICE, OFFICE, "GET", "/v1/board/charts.svg", "").await;
    assert_eq!(status, 200, "{charts}");
    for m in &asked {
        let minutes = json["members"][m].as_array().unwrap();
        let calls: u64 = minutes.iter().map(|x| x["calls"].as_u64().unwrap()).sum();
        assert_eq!(calls, 1, "{m}: {json}");
        assert!(minutes[0]["p50_ms"].as_f64().unwrap() > 0.0, "{json}");
        assert!(
            charts.contains(&format!(
                "<g data-member=\"{m}\" data-calls=\"1\" data-failures=\"0\">"
            )),
            "{m}: {charts}"
        );
    }
    // The office's gateway serves no data, so no coordinator asks it: no chart.
    assert!(!charts.contains("data-member=\"coordination\""), "{charts}");
}
