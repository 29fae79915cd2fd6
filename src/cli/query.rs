//! The client commands: `query` and `call` (answers printed as a table, CSV, JSON or Arrow,
//! progress on standard error), `explain`, `describe` and `bench`.

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use datafusion::arrow::record_batch::RecordBatch;

use crate::cli::EXIT_PARTIAL;
use crate::cli::Format;
use fedgate::tools::client::{Answer, Client, format_summary};

pub(crate) fn parse_range(s: &str) -> Result<(i64, i64), String> {
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

pub(crate) async fn bench(
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

/// What `fedgate query` and `fedgate call` send.
pub(crate) enum Request {
    Query(fedgate::proto::v1::QueryRequest),
    Invoke(fedgate::proto::v1::InvokeRequest),
}

/// Progress is shown on a terminal only, so scripts reading standard error see
/// only the summary.
pub(crate) fn show_progress(disabled: bool) -> bool {
    use std::io::IsTerminal;
    !disabled && std::io::stderr().is_terminal()
}

/// Parameters as httpie writes them: `NAME=VALUE` is text, `NAME:=VALUE` a JSON
/// number or boolean (`limit:=10`, `designated:=true`).
pub(crate) fn parse_params(
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
pub(crate) fn progress_line(p: &fedgate::proto::v1::Progress) -> String {
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
pub(crate) async fn run_query(
    client: &Client,
    req: Request,
    format: Format,
    progress: bool,
    receipt: Option<&std::path::Path>,
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
            if let Some(path) = receipt {
                if summary.receipt.is_empty() {
                    bail!("the gateway sent no receipt (the answer is partial)");
                }
                use base64::Engine as _;
                std::fs::write(
                    path,
                    format!(
                        "{}\n",
                        base64::engine::general_purpose::STANDARD.encode(&summary.receipt)
                    ),
                )
                .with_context(|| path.display().to_string())?;
                eprintln!("receipt written to {}", path.display());
            }
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
pub(crate) enum Output {
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
pub(crate) fn print_answer(a: &Answer) -> Result<()> {
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
pub(crate) fn with_schema(a: &Answer) -> Vec<RecordBatch> {
    if a.batches.is_empty() {
        vec![RecordBatch::new_empty(a.schema.clone())]
    } else {
        a.batches.clone()
    }
}

/// `fedgate explain`: the coordinator's plan, each member's sub-query, and the
/// statements each member would send to its databases.
pub(crate) async fn explain(client: &Client, sql: &str) -> Result<ExitCode> {
    let e = client
        .explain(sql)
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

/// `fedgate describe`: the region's datasets, what the caller may see of each at each
/// member and why, and the published services.
pub(crate) async fn describe(client: &Client, purpose: Option<&str>) -> Result<ExitCode> {
    let d = client
        .describe(purpose)
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
