//! The `fedgate` binary: parses the command line ([`cli`]), sets up logging and
//! telemetry, runs the command and turns its result into an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use fedgate::config::MemberConfig;

use cli::{Cli, Command, run};

#[global_allocator]
static ALLOCATOR: cli::allocator::Allocator = cli::allocator::Allocator;

fn main() -> ExitCode {
    // A misspelt allocator would otherwise be the default without a word, and a bad
    // worker thread count a panic of the runtime's: both are named and refused first.
    if let Some(problem) = cli::allocator::problem().or_else(cli::worker_threads_problem) {
        eprintln!("fedgate: {problem}");
        return ExitCode::from(2);
    }
    // The runtime as `#[tokio::main]` builds it: one worker thread per core, or
    // `TOKIO_WORKER_THREADS` (checked above), which tokio reads itself.
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run_command()),
        Err(e) => {
            eprintln!("fedgate: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command() -> ExitCode {
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
