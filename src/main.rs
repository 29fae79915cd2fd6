//! The `fedgate` command line: serve, query, check, pki, audit, demo.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use datafusion::arrow::record_batch::RecordBatch;

use fedgate::config::MemberConfig;
use fedgate::config::raw::RawRegion;
use fedgate::gateway::Gateway;
use fedgate::ops::audit::Receipt;
use fedgate::tools::client::{Answer, Client, format_summary};
use fedgate::trust::identity::Principal;
use fedgate::trust::pki::{self, Ca};

/// Exit code of a query whose answer is partial (some members are missing).
const EXIT_PARTIAL: u8 = 3;

#[derive(Parser)]
#[command(
    name = "fedgate",
    version,
    about = "A regional cross-city federation gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `fedgate=debug`.
    #[arg(long, global = true, env = "FEDGATE_LOG")]
    log: Option<String>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a member gateway.
    Serve {
        /// The member config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a SQL query through a gateway and print rows and the per-member summary.
    Query {
        #[command(flatten)]
        conn: Connection,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Return the answering members' rows even if some members fail.
        #[arg(long)]
        allow_partial: bool,
        /// Time budget for the whole query, e.g. `2s`.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Diagnosis: do not push aggregates and top-k into member sub-queries.
        #[arg(long)]
        no_pushdown: bool,
        /// Diagnosis: plan anew even if the plan is cached.
        #[arg(long)]
        no_plan_cache: bool,
        /// Why the data is needed: a purpose code, optionally with a case number
        /// (`epidemic-response: HZ-2026-0042`). Members may require one and record it.
        #[arg(long)]
        purpose: Option<String>,
        /// Do not show each member's progress while the query runs (shown only when
        /// standard error is a terminal).
        #[arg(long)]
        no_progress: bool,
        /// The SQL (canonical datasets; DataFusion dialect).
        sql: String,
    },
    /// Call a published service of the region with typed parameters
    /// (`fedgate call fever_clinics_near county_code=330523`; `n:=5` for numbers).
    Call {
        #[command(flatten)]
        conn: Connection,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Return the answering members' rows even if some members fail.
        #[arg(long)]
        allow_partial: bool,
        /// Time budget, e.g. `2s`.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// A case reference for the service's purpose (`enrollment-check: AJ-7`).
        #[arg(long)]
        purpose: Option<String>,
        /// Do not show progress.
        #[arg(long)]
        no_progress: bool,
        /// The service's name.
        service: String,
        /// Parameters: NAME=VALUE sends text, NAME:=VALUE a number or true/false.
        params: Vec<String>,
    },
    /// Show the coordinator's plan and the exact SQL each member would receive.
    Explain {
        #[command(flatten)]
        conn: Connection,
        /// The SQL.
        sql: String,
    },
    /// List the canonical datasets, their fields, the members serving them, and what
    /// each member lets you do with each dataset and field.
    Describe {
        #[command(flatten)]
        conn: Connection,
        /// Describe access as it would be for queries stating this purpose.
        #[arg(long)]
        purpose: Option<String>,
    },
    /// Validate a member config with its region file, certificates and sources.
    Check {
        /// The member config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// A development certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Work with a gateway's tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Load a gateway with queries and report latency percentiles and throughput.
    ///
    /// Closed loop by default (`--concurrency` callers); `--rate` switches to an open
    /// loop at that arrival rate, with latency measured from each query's due time.
    /// Exits with 1 if any query failed or came back partial.
    Bench {
        #[command(flatten)]
        conn: Connection,
        /// SQL to send; repeat for several, used in turn. `{n}` is replaced by a
        /// number drawn from `--range` for each query.
        #[arg(long, required = true)]
        sql: Vec<String>,
        /// Range of `{n}`, e.g. `1..1000000` (inclusive).
        #[arg(long, default_value = "1..1000000", value_parser = parse_range)]
        range: (i64, i64),
        /// Callers in a closed loop.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Open loop: queries started per second.
        #[arg(long, conflicts_with = "concurrency")]
        rate: Option<f64>,
        /// Closed loop: the interval one caller is expected to keep, for
        /// coordinated-omission correction of its latencies.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "rate")]
        expected_interval: Option<Duration>,
        /// Measured time.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Stop after this many measured queries, if sooner.
        #[arg(long)]
        requests: Option<u64>,
        /// Unmeasured warm-up time.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Each query's deadline.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Count partial answers as answers.
        #[arg(long)]
        allow_partial: bool,
        /// Seed of the `{n}` sequence.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start the bundled sample region on loopback and run the example queries.
    Demo {
        /// Keep the generated region (certificates and configs) in this folder.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run the example queries and exit.
        #[arg(long)]
        once: bool,
        /// First port to use (default: the ports in the templates, 7101 and up).
        #[arg(long)]
        port_base: Option<u16>,
        /// The sample region's templates.
        #[arg(long, default_value_os_t = fedgate::tools::demo::default_source())]
        source: PathBuf,
    },
}

#[derive(clap::Args)]
struct Connection {
    /// Gateway URL, e.g. https://127.0.0.1:7101.
    #[arg(long, env = "FEDGATE_GATEWAY")]
    gateway: String,
    /// The region CA bundle (PEM).
    #[arg(long, env = "FEDGATE_CA")]
    ca: PathBuf,
    /// This client's certificate (PEM).
    #[arg(long, env = "FEDGATE_CERT")]
    cert: PathBuf,
    /// This client's private key (PEM).
    #[arg(long, env = "FEDGATE_KEY")]
    key: PathBuf,
    /// Your own organization's gateway URL, when --gateway is another's: before each
    /// query it signs an origin assertion that lets --gateway speak for you.
    #[arg(long, env = "FEDGATE_HOME")]
    home: Option<String>,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a region CA (`ca.crt`, `ca.key`) in a folder.
    Init {
        /// Output folder.
        #[arg(long)]
        dir: PathBuf,
        /// Region name.
        #[arg(long)]
        region: String,
    },
    /// Issue a member or client certificate signed by the region CA.
    Issue {
        /// Folder holding `ca.crt` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Identity URI, e.g. fedgate://yrd/city/hangzhou.
        #[arg(long)]
        identity: String,
        /// Host names or IP addresses the certificate is valid for as a server
        /// (default: localhost, 127.0.0.1, ::1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Output folder (default: the CA folder); files are `<name>.crt`/`.key`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain without changing it; exits 1 if it is broken.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// A receipt kept elsewhere, `SEQ:HASH`: the log must still hold that record
        /// with that hash. Without one, records cut from the end cannot be noticed.
        #[arg(long, value_parser = parse_receipt)]
        head: Option<Receipt>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// A table, then the per-member summary.
    Table,
    /// CSV with a header; the summary on standard error.
    Csv,
    /// A JSON array of objects; the summary on standard error.
    Json,
    /// An Arrow IPC stream (binary; redirect it to a file or a program); the
    /// summary on standard error.
    Arrow,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    // A gateway exports its spans where its member file says; an invalid file is
    // reported by `serve` itself.
    let (otlp_endpoint, service_name) = match &cli.command {
        Command::Serve { config } => match MemberConfig::load(config) {
            Ok(c) => (
                c.otlp_endpoint.clone(),
                format!("fedgate-{}", c.member.name),
            ),
            Err(_) => (None, "fedgate".to_string()),
        },
        _ => (None, "fedgate".to_string()),
    };
    let telemetry = match fedgate::ops::telemetry::init(&fedgate::ops::telemetry::Settings {
        filter: cli.log.clone(),
        default_filter: default_log.to_string(),
        json: cli.log_json,
        otlp_endpoint,
        service_name,
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

async fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Serve { config } => serve(&config).await,
        Command::Query {
            conn,
            format,
            allow_partial,
            timeout,
            no_pushdown,
            no_plan_cache,
            purpose,
            no_progress,
            sql,
        } => {
            let client = connect(&conn)?;
            let progress = show_progress(no_progress);
            let req = fedgate::proto::v1::QueryRequest {
                sql,
                allow_partial,
                timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                no_pushdown,
                no_plan_cache,
                purpose: purpose.unwrap_or_default(),
                progress,
            };
            run_query(&client, Request::Query(req), format, progress).await
        }
        Command::Call {
            conn,
            format,
            allow_partial,
            timeout,
            purpose,
            no_progress,
            service,
            params,
        } => {
            let client = connect(&conn)?;
            let progress = show_progress(no_progress);
            let req = fedgate::proto::v1::InvokeRequest {
                service,
                params: parse_params(&params)?,
                allow_partial,
                timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                purpose: purpose.unwrap_or_default(),
                progress,
            };
            run_query(&client, Request::Invoke(req), format, progress).await
        }
        Command::Explain { conn, sql } => {
            let client = connect(&conn)?;
            let e = client
                .explain(&sql)
                .await
                .map_err(|s| anyhow!(fedgate::tools::client::describe_status(&s)))?;
            println!("coordinator plan:\n{}", e.plan);
            for s in e.subqueries {
                println!("{} -> [{}]:\n  {}", s.dataset, s.members.join(", "), s.sql);
            }
            for s in e.database_statements {
                if s.error.is_empty() {
                    println!("{} -> database {}:\n  {}", s.member, s.database, s.sql);
                } else {
                    println!("{} could not explain: {}", s.member, s.error);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { conn, purpose } => {
            let client = connect(&conn)?;
            let d = client
                .describe(purpose.as_deref())
                .await
                .map_err(|s| anyhow!(fedgate::tools::client::describe_status(&s)))?;
            println!(
                "region {} (config {}), you are {}",
                d.region, d.config_version, d.caller
            );
            for ds in d.datasets {
                println!(
                    "\n{} — {}\n  served by: {}",
                    ds.name,
                    ds.description,
                    ds.members.join(", ")
                );
                for f in ds.fields {
                    let unit = if f.unit.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", f.unit)
                    };
                    println!(
                        "  {:<22} {:<8}{unit} {}",
                        f.name, f.data_type, f.description
                    );
                }
                if !ds.access.is_empty() {
                    println!("  your access:");
                }
                for a in &ds.access {
                    let level = if a.level == "aggregate" {
                        format!("aggregate(k={})", a.min_group)
                    } else {
                        a.level.clone()
                    };
                    let special: Vec<String> = a
                        .fields
                        .iter()
                        .filter(|f| {
                            f.access != "rows" && f.access != "denied"
                                || a.level != "denied" && f.access == "denied"
                        })
                        .map(|f| format!("{}={}", f.field, f.access))
                        .collect();
                    let rule = if a.rule.is_empty() {
                        "default deny".to_string()
                    } else {
                        a.rule.clone()
                    };
                    println!(
                        "    {:<12} {:<16} {rule}{}",
                        a.member,
                        level,
                        if special.is_empty() {
                            String::new()
                        } else {
                            format!("  fields: {}", special.join(", "))
                        }
                    );
                    if a.level == "denied" || a.level == "unknown" {
                        println!("    {:<12} {}", "", a.reason);
                    }
                }
            }
            if !d.services.is_empty() {
                println!("\npublished services (fedgate call NAME PARAM=VALUE ...):");
            }
            for s in d.services {
                let params: Vec<String> = s
                    .params
                    .iter()
                    .map(|p| format!("{}: {}", p.name, p.data_type))
                    .collect();
                let callable = if s.callable {
                    "you may call it"
                } else {
                    "not open to you"
                };
                println!("  {}({}) — {callable}", s.name, params.join(", "));
                println!("    {}", s.description);
                if !s.purpose.is_empty() {
                    println!("    states the purpose {:?}", s.purpose);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => check(&config).await,
        Command::Pki { command } => pki_command(command),
        Command::Audit {
            command: AuditCommand::Verify { file, head },
        } => audit_verify(&file, head.as_ref()),
        Command::Bench {
            conn,
            sql,
            range,
            concurrency,
            rate,
            expected_interval,
            duration,
            requests,
            warmup,
            timeout,
            allow_partial,
            seed,
            json,
        } => {
            let load = fedgate::tools::loadgen::Load {
                sql,
                range,
                mode: match rate {
                    Some(rate) => fedgate::tools::loadgen::Mode::Open { rate },
                    None => fedgate::tools::loadgen::Mode::Closed {
                        concurrency,
                        expected_interval,
                    },
                },
                duration,
                max_requests: requests,
                warmup,
                timeout,
                allow_partial,
                seed,
            };
            bench(&connect(&conn)?, &load, json).await
        }
        Command::Demo {
            dir,
            once,
            port_base,
            source,
        } => demo(dir, once, port_base, &source).await,
    }
}

fn parse_range(s: &str) -> Result<(i64, i64), String> {
    let (lo, hi) = s
        .split_once("..")
        .ok_or_else(|| format!("range {s:?} must be LOW..HIGH"))?;
    let num = |t: &str| {
        t.trim()
            .parse::<i64>()
            .map_err(|_| format!("range {s:?}: {t:?} is not an integer"))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo > hi {
        return Err(format!("range {s:?} is empty"));
    }
    Ok((lo, hi))
}

async fn bench(
    client: &Client,
    load: &fedgate::tools::loadgen::Load,
    json: bool,
) -> Result<ExitCode> {
    let r = fedgate::tools::loadgen::run(client, load)
        .await
        .map_err(|e| anyhow!(e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let l = &r.latency_us;
        println!(
            "{} queries in {:.1} s ({} ok, {} failed): {:.1} answers/s",
            r.requests,
            r.elapsed_s,
            r.ok,
            r.failed(),
            r.throughput
        );
        println!(
            "latency µs: p50 {} · p90 {} · p99 {} · p99.9 {} · max {} · mean {:.0}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        for (code, n) in &r.errors {
            println!("failed with {code}: {n}");
        }
        if let Some(e) = &r.first_error {
            println!("first failure: {e}");
        }
    }
    Ok(if r.failed() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn connect(c: &Connection) -> Result<Client> {
    let client = Client::connect(&c.gateway, &c.ca, &c.cert, &c.key)?;
    Ok(match &c.home {
        Some(home) => client.with_home(Client::connect(home, &c.ca, &c.cert, &c.key)?),
        None => client,
    })
}

async fn serve(config: &Path) -> Result<ExitCode> {
    let cfg = MemberConfig::load(config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    let mut gw = Gateway::start(Arc::new(cfg), None).await?;
    eprintln!(
        "fedgate: member {} serving on https://{}",
        gw.member, gw.addr
    );
    if let Some(h) = gw.http_addr {
        eprintln!("fedgate: status board, metrics and JSON API on {h}");
    }
    tokio::select! {
        r = gw.wait() => { r?; }
        _ = shutdown_signal() => {
            eprintln!("fedgate: shutting down, letting in-flight queries finish");
            gw.shutdown().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// What `fedgate query` and `fedgate call` send.
enum Request {
    Query(fedgate::proto::v1::QueryRequest),
    Invoke(fedgate::proto::v1::InvokeRequest),
}

/// Progress is shown on a terminal only, so scripts reading standard error see
/// only the summary.
fn show_progress(disabled: bool) -> bool {
    use std::io::IsTerminal;
    !disabled && std::io::stderr().is_terminal()
}

/// Parameters as httpie writes them: `NAME=VALUE` is text, `NAME:=VALUE` a JSON
/// number or boolean (`limit:=10`, `designated:=true`).
fn parse_params(
    params: &[String],
) -> Result<std::collections::HashMap<String, fedgate::proto::v1::ParamValue>> {
    use fedgate::proto::v1::{ParamValue, param_value::Value};
    let mut out = std::collections::HashMap::new();
    for p in params {
        let (name, value) = if let Some((n, v)) = p.split_once(":=") {
            let value = match serde_json::from_str::<serde_json::Value>(v) {
                Ok(serde_json::Value::Bool(b)) => Value::Boolean(b),
                Ok(serde_json::Value::Number(n)) => match n.as_i64() {
                    Some(i) => Value::Int64(i),
                    None => Value::Float64(n.as_f64().unwrap_or(f64::NAN)),
                },
                _ => bail!(
                    "parameter {n}: {v:?} after := must be a number or true/false \
                     (text is NAME=VALUE)"
                ),
            };
            (n, value)
        } else if let Some((n, v)) = p.split_once('=') {
            (n, Value::Text(v.to_string()))
        } else {
            bail!("parameter {p:?} is not NAME=VALUE (text) or NAME:=VALUE (number, true/false)");
        };
        if out
            .insert(name.to_string(), ParamValue { value: Some(value) })
            .is_some()
        {
            bail!("parameter {name} is given twice");
        }
    }
    Ok(out)
}

/// One line of progress: elapsed time and each member's state and rows so far.
fn progress_line(p: &fedgate::proto::v1::Progress) -> String {
    let members: Vec<String> = p
        .members
        .iter()
        .map(|m| {
            let state = fedgate::tools::client::state_word(m.state);
            if m.rows > 0 {
                format!("{} {state} {}", m.member, m.rows)
            } else {
                format!("{} {state}", m.member)
            }
        })
        .collect();
    format!(
        "{:>6.1}s  {}",
        p.elapsed_us as f64 / 1e6,
        members.join(" · ")
    )
}

/// Runs a query or service call, writing rows as they arrive (all at once for a
/// table), and returns the exit code: 0 complete, 3 partial (some members'
/// rows are missing), 1 failed.
async fn run_query(
    client: &Client,
    req: Request,
    format: Format,
    progress: bool,
) -> Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    if matches!(format, Format::Arrow) && std::io::stdout().is_terminal() {
        bail!(
            "--format arrow writes a binary Arrow IPC stream; redirect it to a file or a program"
        );
    }
    let on_progress = move |p: &fedgate::proto::v1::Progress| {
        if progress {
            // Redrawn in place: carriage return, then clear the line.
            eprint!("\r\x1b[2K{}", progress_line(p));
            let _ = std::io::stderr().flush();
        }
    };
    let mut out = Output::new(format);
    let mut sink = |b: RecordBatch| {
        out.write(b)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    };
    let answer = match req {
        Request::Query(q) => client.query_watched(q, &mut sink, on_progress).await,
        Request::Invoke(q) => client.invoke_watched(q, &mut sink, on_progress).await,
    };
    if progress {
        eprint!("\r\x1b[2K");
    }
    match answer {
        Ok((schema, summary)) => {
            out.finish(schema, &summary)?;
            Ok(if summary.partial {
                ExitCode::from(EXIT_PARTIAL)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(f) => {
            if let Some(s) = &f.summary {
                eprint!("{}", format_summary(s));
            }
            bail!("query failed: {f}")
        }
    }
}

/// Where the rows of `fedgate query` go, batch by batch.
enum Output {
    /// Collected, for a table that needs every row to size its columns.
    Table(Vec<RecordBatch>),
    Csv(Box<datafusion::arrow::csv::Writer<std::io::Stdout>>),
    Json(datafusion::arrow::json::ArrayWriter<std::io::Stdout>, bool),
    /// Opened with the first batch's schema (or the summary's, if there is none).
    Arrow(Option<datafusion::arrow::ipc::writer::StreamWriter<std::io::Stdout>>),
}

impl Output {
    fn new(format: Format) -> Output {
        match format {
            Format::Table => Output::Table(Vec::new()),
            Format::Csv => Output::Csv(Box::new(
                datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(std::io::stdout()),
            )),
            Format::Json => Output::Json(
                datafusion::arrow::json::ArrayWriter::new(std::io::stdout()),
                false,
            ),
            Format::Arrow => Output::Arrow(None),
        }
    }

    fn write(&mut self, b: RecordBatch) -> Result<()> {
        match self {
            Output::Table(v) => v.push(b),
            Output::Csv(w) => w.write(&b)?,
            Output::Json(w, any) => {
                w.write(&b)?;
                *any = true;
            }
            Output::Arrow(w) => {
                if w.is_none() {
                    *w = Some(datafusion::arrow::ipc::writer::StreamWriter::try_new(
                        std::io::stdout(),
                        &b.schema(),
                    )?);
                }
                if let Some(w) = w {
                    w.write(&b)?;
                }
            }
        }
        Ok(())
    }

    fn finish(
        self,
        schema: datafusion::arrow::datatypes::SchemaRef,
        summary: &fedgate::proto::v1::QuerySummary,
    ) -> Result<()> {
        use std::io::Write;
        match self {
            Output::Table(batches) => {
                let a = Answer {
                    schema,
                    batches,
                    summary: summary.clone(),
                };
                print_answer(&a)?;
                return Ok(());
            }
            Output::Csv(w) => w.into_inner().flush()?,
            Output::Json(mut w, any) => {
                w.finish()?;
                let mut out = w.into_inner();
                if !any {
                    // An empty answer is an empty array, not nothing.
                    write!(out, "[]")?;
                }
                writeln!(out)?;
            }
            Output::Arrow(w) => {
                let mut w = match w {
                    Some(w) => w,
                    None => datafusion::arrow::ipc::writer::StreamWriter::try_new(
                        std::io::stdout(),
                        &schema,
                    )?,
                };
                w.finish()?;
            }
        }
        eprint!("{}", format_summary(summary));
        Ok(())
    }
}

/// Prints an answer as a table, then its per-member summary.
fn print_answer(a: &Answer) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let batches = with_schema(a);
    writeln!(
        out,
        "{}",
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
    )?;
    write!(out, "{}", format_summary(&a.summary))?;
    Ok(())
}

/// The batches, or one empty batch so that an empty answer still shows its columns.
fn with_schema(a: &Answer) -> Vec<RecordBatch> {
    if a.batches.is_empty() {
        vec![RecordBatch::new_empty(a.schema.clone())]
    } else {
        a.batches.clone()
    }
}

async fn check(config: &Path) -> Result<ExitCode> {
    let r = fedgate::tools::check::check(config).await;
    for c in &r.checked {
        println!("ok: {c}");
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    for e in &r.errors {
        println!("error: {e}");
    }
    if r.errors.is_empty() {
        println!(
            "{}: valid ({} warnings)",
            config.display(),
            r.warnings.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{}: {} errors, {} warnings",
            config.display(),
            r.errors.len(),
            r.warnings.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn pki_command(cmd: PkiCommand) -> Result<ExitCode> {
    match cmd {
        PkiCommand::Init { dir, region } => {
            Principal::new(&region, fedgate::trust::identity::Kind::Office, "x")
                .context("region name")?;
            if dir.join("ca.key").exists() {
                bail!(
                    "{} already holds a CA key; refusing to overwrite it",
                    dir.display()
                );
            }
            let ca = Ca::generate(&region)?;
            let (crt, key) = pki::write_ca(&ca, &dir)?;
            println!("created {} and {}", crt.display(), key.display());
        }
        PkiCommand::Issue {
            ca_dir,
            identity,
            hosts,
            days,
            out,
        } => {
            let principal = Principal::parse(&identity)?;
            let ca = Ca::load(&ca_dir.join("ca.crt"), &ca_dir.join("ca.key"))?;
            let hosts = if hosts.is_empty() {
                pki::default_hosts()
            } else {
                hosts
            };
            let issued = ca.issue(&principal, &hosts, days)?;
            let out = out.unwrap_or(ca_dir);
            let (crt, key) = pki::write_issued(&issued, &out, principal.name())?;
            println!(
                "issued {principal}: {} and {}",
                crt.display(),
                key.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses `SEQ:HASH` as printed by `fedgate audit verify`.
fn parse_receipt(s: &str) -> Result<Receipt, String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not SEQ:HASH"))?;
    let seq = seq
        .trim()
        .parse()
        .map_err(|e| format!("`{seq}` is not a record number: {e}"))?;
    let hash = hash.trim().to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{hash}` is not a SHA-256 hash (64 hex digits)"));
    }
    Ok(Receipt { seq, hash })
}

fn audit_verify(file: &Path, head: Option<&Receipt>) -> Result<ExitCode> {
    let report = match head {
        Some(h) => fedgate::ops::audit::verify_against(file, h)?,
        None => fedgate::ops::audit::verify(file)?,
    };
    let verified = match report.records {
        0 => "no record verifies".to_string(),
        1 => "1 record verifies".to_string(),
        n => format!("{n} records verify"),
    };
    match &report.broken {
        None => {
            println!(
                "ok: {verified}; head seq {} hash {}",
                report.head.seq, report.head.hash
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(b) => {
            println!("broken: record {} (line {}): {}", b.seq, b.line, b.problem);
            println!(
                "{verified} before it (last good: seq {} hash {})",
                report.head.seq, report.head.hash
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Starts a local PostgreSQL server on a free loopback port and loads the sample
/// region's databases into it.
async fn start_demo_database(
    source: &Path,
) -> Result<fedgate::tools::local_postgres::LocalPostgres> {
    let pg = fedgate::tools::local_postgres::LocalPostgres::launch(None).await?;
    fedgate::tools::demo::load_databases(&pg, &source.join("data")).await?;
    Ok(pg)
}

async fn demo(
    dir: Option<PathBuf>,
    once: bool,
    port_base: Option<u16>,
    source: &Path,
) -> Result<ExitCode> {
    let region_path = source.join("region.toml");
    let text = std::fs::read_to_string(&region_path)
        .with_context(|| format!("reading the sample region {}", region_path.display()))?;
    let template: RawRegion = toml::from_str(&text)?;
    // Bind every gateway's port first, so the configs written name ports that are ours.
    let mut listeners = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for (i, m) in template
        .members
        .iter()
        .filter(|m| m.endpoint.is_some())
        .enumerate()
    {
        let wanted = match port_base {
            Some(b) => b
                .checked_add(i as u16)
                .ok_or_else(|| anyhow!("--port-base too high"))?,
            None => m
                .endpoint
                .as_deref()
                .and_then(|e| e.rsplit(':').next()?.parse().ok())
                .unwrap_or(0),
        };
        let l = match tokio::net::TcpListener::bind(("127.0.0.1", wanted)).await {
            Ok(l) => l,
            Err(e) if port_base.is_none() => {
                eprintln!(
                    "note: port {wanted} is taken ({e}); using a free port for {}",
                    m.name
                );
                tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?
            }
            Err(e) => bail!("cannot listen on 127.0.0.1:{wanted}: {e}"),
        };
        ports.insert(m.name.clone(), l.local_addr()?.port());
        listeners.insert(m.name.clone(), l);
    }
    let (dir, _temp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("fedgate-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // Hangzhou's pipelines live in three departments' PostgreSQL databases: start a
    // throwaway server for them. Without one, that dataset is reported unavailable
    // at Hangzhou and everything else still runs.
    let pg = match start_demo_database(source).await {
        Ok(pg) => Some(pg),
        Err(e) => {
            eprintln!(
                "note: no PostgreSQL for Hangzhou's pipelines ({e}); they will be reported unavailable"
            );
            None
        }
    };
    let region = fedgate::tools::demo::materialize_with_database(
        source,
        &dir,
        &|name, template| match name.strip_suffix("/http") {
            None => ports[name],
            // HTTP ports: the gateway's port + 1000 with --port-base, else the
            // template's port if it is free, else any free port.
            Some(member) => match port_base {
                Some(_) => ports[member].saturating_add(1000),
                None if std::net::TcpListener::bind(("127.0.0.1", template)).is_ok() => template,
                None => 0,
            },
        },
        pg.as_ref().map(|p| (p.port, p.password.as_str())),
    )?;
    let mut gateways = Vec::new();
    for (name, path, _) in &region.gateways {
        let cfg = MemberConfig::load(path).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
        let l = listeners
            .remove(name)
            .ok_or_else(|| anyhow!("no listener for {name}"))?;
        gateways.push(Gateway::start(Arc::new(cfg), Some(l)).await?);
    }
    println!("fedgate demo: region yrd in {}", dir.display());
    for ((name, path, endpoint), g) in region.gateways.iter().zip(&gateways) {
        println!(
            "  {name:<12} {endpoint}   (fedgate serve --config {})",
            path.display()
        );
        if let Some(h) = g.http_addr {
            let tls = MemberConfig::load(path)
                .ok()
                .and_then(|c| c.http)
                .is_some_and(|h| h.tls);
            let url = if tls {
                format!("https://{h}/ (mutual TLS: a client certificate is needed)")
            } else {
                format!("http://{h}/ (loopback; callers act as {name})")
            };
            println!("               status board, /metrics, JSON API: {url}");
        }
    }
    let (client_name, cert, key) = region
        .clients
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the sample region has no office identity"))?;
    // The office queries through its own gateway, which speaks for it to the owners.
    let gateway = region
        .gateways
        .iter()
        .find(|(n, _, _)| *n == client_name)
        .map(|(_, _, e)| e.clone())
        .ok_or_else(|| anyhow!("the office {client_name} has no gateway"))?;
    println!("\nQuery the region as the regional office ({client_name}):");
    println!("  export FEDGATE_GATEWAY={gateway}");
    println!("  export FEDGATE_CA={}", region.ca.display());
    println!("  export FEDGATE_CERT={}", cert.display());
    println!("  export FEDGATE_KEY={}", key.display());
    println!("  fedgate query \"SELECT member, count(*) FROM fever_clinics GROUP BY member\"");

    let client = Client::connect(&gateway, &region.ca, &cert, &key)?;
    let mut failures = 0;
    for (title, sql) in fedgate::tools::demo::EXAMPLES {
        println!("\n== {title}\n{sql}");
        // Without a database server, Hangzhou's pipelines are unavailable: the
        // example then shows a partial answer that says so, rather than failing.
        let partial = pg.is_none() && sql.contains("underground_pipelines");
        match client
            .query(sql, partial, Some(Duration::from_secs(30)))
            .await
        {
            Ok(a) => print_answer(&a)?,
            Err(f) => {
                failures += 1;
                println!("query failed: {f}");
            }
        }
    }
    println!("\n\n### The data owners' access rules at work (enrollment: generated people)");
    for ex in fedgate::tools::demo::ACCESS_EXAMPLES {
        let certs = dir.join("certs");
        let endpoint = region
            .gateways
            .iter()
            .find(|(n, _, _)| n == ex.gateway)
            .map(|(_, _, e)| e.clone())
            .ok_or_else(|| anyhow!("no gateway {}", ex.gateway))?;
        let client = Client::connect(
            &endpoint,
            &region.ca,
            &certs.join(format!("{}.crt", ex.caller)),
            &certs.join(format!("{}.key", ex.caller)),
        )?;
        let purpose = if ex.purpose.is_empty() {
            String::new()
        } else {
            format!(" --purpose '{}'", ex.purpose)
        };
        println!(
            "\n== {}\n(as {} via {}{purpose})\n{}",
            ex.title, ex.caller, ex.gateway, ex.sql
        );
        let req = fedgate::proto::v1::QueryRequest {
            sql: ex.sql.to_string(),
            purpose: ex.purpose.to_string(),
            timeout_ms: 30_000,
            ..Default::default()
        };
        match (client.query_with(req).await, ex.refused) {
            (Ok(a), false) => print_answer(&a)?,
            (Err(f), true) => println!("refused, as the rules say: {f}"),
            (Ok(a), true) => {
                failures += 1;
                print_answer(&a)?;
                println!("UNEXPECTED: this should have been refused");
            }
            (Err(f), false) => {
                failures += 1;
                println!("query failed: {f}");
            }
        }
    }
    if once {
        for g in gateways {
            g.shutdown().await;
        }
        if failures > 0 {
            bail!("{failures} example queries failed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!("\nServing until interrupted (Ctrl-C).");
    shutdown_signal().await;
    for g in gateways {
        g.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}
