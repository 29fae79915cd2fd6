//! The `fedgate` binary: parses the command line ([`cli`]), sets up logging and
//! telemetry, runs the command and turns its result into an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use fedgate::config::MemberConfig;

use cli::{Cli, Command, run};

#[global_allocator]
static ALLOCATOR: cli::allocator::Allocator = cli::allocator::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    // A misspelt allocator would otherwise be the default without a word.
    if let Some(problem) = cli::allocator::problem() {
        eprintln!("fedgate: {problem}");
        return ExitCode::from(2);
    }
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
