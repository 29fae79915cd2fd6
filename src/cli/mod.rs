//! The `fedgate` command line: its commands and options, and the dispatch of each command to
//! the module that carries it out ([`query`]: query, call, explain, describe, bench;
//! [`admin`]: serve, check, pki, audit; [`demo`]: the sample region).

mod admin;
pub mod allocator;
mod demo;
mod incident;
mod query;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use admin::AuditCommand;
use admin::PkiCommand;
use admin::audit_verify;
use admin::check;
use admin::pki_command;
use admin::serve;
use demo::demo;
use fedgate::tools::client::Client;
use query::Request;
use query::bench;
use query::describe;
use query::explain;
use query::parse_params;
use query::parse_range;
use query::run_query;
use query::show_progress;

#[derive(clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print the JSON Schema of a configuration file, generated from the code (point an
    /// editor at it: a first line `#:schema ./member.schema.json` for Taplo and Even
    /// Better TOML).
    Schema {
        /// Which file.
        #[arg(value_enum)]
        file: SchemaOf,
    },
}

/// The two kinds of configuration file.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum SchemaOf {
    /// `region.toml`.
    Region,
    /// A member's own file.
    Member,
}

/// Exit code of a query whose answer is partial (some members are missing).
pub(crate) const EXIT_PARTIAL: u8 = 3;

/// Why `TOKIO_WORKER_THREADS` (the runtime's worker thread count, which tokio reads
/// itself and would otherwise refuse with a panic) is not a count, if it is set and
/// is not.
pub(crate) fn worker_threads_problem() -> Option<String> {
    const VARIABLE: &str = "TOKIO_WORKER_THREADS";
    let value = std::env::var_os(VARIABLE)?;
    match value.to_str().map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => None,
        _ => Some(format!(
            "{VARIABLE}={value:?} is not a number of worker threads: use a whole number of \
             at least 1, or leave it unset for one per core"
        )),
    }
}

#[derive(Parser)]
#[command(
    name = "fedgate",
    version,
    about = "A regional cross-city federation gateway"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `fedgate=debug`.
    #[arg(long, global = true, env = "FEDGATE_LOG")]
    pub(crate) log: Option<String>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub(crate) log_json: bool,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Ask under an incident: a declaration file (`fedgate incident declare`). Each
        /// member opens what its own emergency rules give under it, and no more.
        #[arg(long)]
        incident: Option<PathBuf>,
        /// Ask for a signed receipt (each member's statement of what it answered and
        /// the gateway's over the answer) and write it to this file; check it with
        /// `fedgate receipt verify`.
        #[arg(long)]
        receipt: Option<PathBuf>,
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
    /// Configuration files: their JSON Schema, for editors.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Signed receipts of answers (`fedgate query --receipt FILE`).
    Receipt {
        #[command(subcommand)]
        command: incident::ReceiptCommand,
    },
    /// Incident declarations: time-boxed emergency access that each owner honours
    /// under its own emergency rules.
    Incident {
        #[command(subcommand)]
        command: incident::IncidentCommand,
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
pub(crate) struct Connection {
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

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
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

pub(crate) async fn run(cmd: Command) -> Result<ExitCode> {
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
            incident,
            receipt,
            sql,
        } => {
            let client = connect(&conn)?;
            let progress = show_progress(no_progress);
            let incident = match incident {
                Some(f) => fedgate::tools::incident::read_file(&f)?,
                None => Vec::new(),
            };
            let req = fedgate::proto::v1::QueryRequest {
                incident,
                receipt: receipt.is_some(),
                sql,
                allow_partial,
                timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                no_pushdown,
                no_plan_cache,
                purpose: purpose.unwrap_or_default(),
                progress,
            };
            run_query(
                &client,
                Request::Query(req),
                format,
                progress,
                receipt.as_deref(),
            )
            .await
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
            run_query(&client, Request::Invoke(req), format, progress, None).await
        }
        Command::Explain { conn, sql } => explain(&connect(&conn)?, &sql).await,
        Command::Describe { conn, purpose } => describe(&connect(&conn)?, purpose.as_deref()).await,
        Command::Check { config } => check(&config).await,
        Command::Pki { command } => pki_command(command),
        Command::Config {
            command: ConfigCommand::Schema { file },
        } => {
            let schema = match file {
                SchemaOf::Region => fedgate::config::raw::region_schema(),
                SchemaOf::Member => fedgate::config::raw::member_schema(),
            };
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { file, head },
        } => audit_verify(&file, head.as_ref()),
        Command::Audit {
            command:
                AuditCommand::Report {
                    incident: number,
                    logs,
                    json,
                },
        } => incident::report(&number, &logs, json),
        Command::Incident { command } => incident::incident(command).await,
        Command::Receipt { command } => incident::receipt(command),
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
                service: None,
                receipt: false,
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

pub(crate) fn connect(c: &Connection) -> Result<Client> {
    let client = Client::connect(&c.gateway, &c.ca, &c.cert, &c.key)?;
    Ok(match &c.home {
        Some(home) => client.with_home(Client::connect(home, &c.ca, &c.cert, &c.key)?),
        None => client,
    })
}
