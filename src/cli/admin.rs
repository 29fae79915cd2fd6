//! The operator commands: `serve` a gateway, `check` a configuration, the development
//! `pki`, and `audit verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;

use fedgate::config::MemberConfig;
use fedgate::gateway::Gateway;
use fedgate::ops::audit::Receipt;
use fedgate::trust::identity::Principal;
use fedgate::trust::pki::{self, Ca};

#[derive(Subcommand)]
pub(crate) enum PkiCommand {
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
    /// Issue a new certificate and key for the identity and host names of an existing
    /// certificate, replacing its files (each through a rename, so a gateway watching
    /// them reloads once it sees both). The old certificate stays valid until it
    /// expires or is revoked.
    Renew {
        /// Folder holding `ca.crt` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate to renew (PEM); replaced by the new one.
        #[arg(long)]
        cert: PathBuf,
        /// Its key, replaced by the new key (default: the certificate's path with the
        /// extension `.key`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Add certificates to the region's revocation list (`ca.crl` in the CA folder),
    /// or, with none, issue the list again with a new next-update date. Gateways whose
    /// region file names the list (`crls`) refuse the certificates on new connections
    /// once they reload, and end older connections at `[lifecycle] max_connection_age`.
    Revoke {
        /// Folder holding `ca.crt` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Certificates (PEM) to revoke.
        #[arg(long = "cert")]
        certs: Vec<PathBuf>,
        /// Days until the list's next update.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check an audit log's hash chain without changing it; exits 1 if it is broken.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// A receipt kept elsewhere, `SEQ:HASH`: the log must still hold that record
        /// with that hash. Without one, records cut from the end cannot be noticed.
        #[arg(long, value_parser = parse_receipt)]
        head: Option<Receipt>,
    },
    /// The after-action review of an incident over one or more members' logs: every
    /// declaration taken, every query and sub-query asked under it (refused ones
    /// too), and any access outside the declared window or datasets, which is flagged
    /// (exit 1, as for a broken chain).
    Report {
        /// The incident's number.
        #[arg(long)]
        incident: String,
        /// The audit logs, each `FILE` or `NAME=FILE`.
        #[arg(required = true)]
        logs: Vec<String>,
        /// Print the review as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn serve(config: &Path) -> Result<ExitCode> {
    let cfg = MemberConfig::load(config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    let mut gw = Gateway::start(Arc::new(cfg), None).await?;
    // The runtime's worker threads are one per core unless TOKIO_WORKER_THREADS says
    // otherwise (BENCHMARKS.md measures one against two); the line says which.
    eprintln!(
        "fedgate: member {} serving on https://{} (allocator {}, {} worker threads)",
        gw.member,
        gw.addr,
        super::allocator::name(),
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    if let Some(h) = gw.http_addr {
        eprintln!("fedgate: status board, metrics and JSON API on {h}");
    }
    if let Some(p) = gw.probes_addr {
        eprintln!("fedgate: probes (GET /livez, GET /readyz) on http://{p}");
    }
    tokio::select! {
        r = gw.wait() => { r?; }
        _ = shutdown_signal() => {
            // Not ready at once, still serving for the drain period, so that what load
            // balancers send before they notice is answered; a second signal cuts the
            // period short. Then no new connections, and the queries in flight finish.
            gw.begin_drain().await;
            eprintln!(
                "fedgate: draining for {} (not ready, still serving); a second signal stops sooner",
                humantime::format_duration(gw.drain_period())
            );
            tokio::select! {
                _ = tokio::time::sleep(gw.drain_period()) => {}
                _ = shutdown_signal() => {}
            }
            eprintln!("fedgate: shutting down, letting in-flight queries finish");
            tokio::select! {
                _ = gw.shutdown() => {}
                _ = shutdown_signal() => {
                    eprintln!("fedgate: stopping now, without the queries in flight");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn shutdown_signal() {
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

pub(crate) async fn check(config: &Path) -> Result<ExitCode> {
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

pub(crate) fn pki_command(cmd: PkiCommand) -> Result<ExitCode> {
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
        PkiCommand::Renew {
            ca_dir,
            cert,
            key,
            days,
        } => {
            let ca = Ca::load(&ca_dir.join("ca.crt"), &ca_dir.join("ca.key"))?;
            let old = std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            let (old_serial, _) = pki::serial_of(&old)?;
            let (principal, issued) = ca.renew(&old, days)?;
            let key = key.unwrap_or_else(|| cert.with_extension("key"));
            // The key first: a gateway that reloads between the two renames sees the
            // old certificate with the new key, refuses that pair and keeps running
            // until it sees the new certificate too.
            pki::write_atomically(&key, &issued.key_pem, true)?;
            pki::write_atomically(&cert, &issued.cert_pem, false)?;
            println!(
                "renewed {principal} for {days} days: {} and {} (the old certificate, serial {}, stays valid until it expires or is revoked)",
                cert.display(),
                key.display(),
                hex::encode(old_serial)
            );
        }
        PkiCommand::Revoke {
            ca_dir,
            certs,
            days,
        } => {
            let ca = Ca::load(&ca_dir.join("ca.crt"), &ca_dir.join("ca.key"))?;
            let path = ca_dir.join("ca.crl");
            let mut revoked = match std::fs::read(&path) {
                Ok(bytes) => pki::revoked_in(&bytes)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let now = chrono::Utc::now().timestamp();
            for c in &certs {
                let pem = std::fs::read_to_string(c)
                    .with_context(|| format!("reading {}", c.display()))?;
                let (serial, principal) = pki::serial_of(&pem)?;
                if revoked.iter().any(|r| r.serial == serial) {
                    println!("{principal} ({}) was already revoked", c.display());
                    continue;
                }
                println!("revoking {principal}: serial {}", hex::encode(&serial));
                revoked.push(pki::Revoked { serial, at: now });
            }
            let pem = ca.revocation_list(&revoked, days)?;
            pki::write_atomically(&path, &pem, false)?;
            println!(
                "wrote {} ({} revoked, next update in {days} days)",
                path.display(),
                revoked.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses `SEQ:HASH` as printed by `fedgate audit verify`.
pub(crate) fn parse_receipt(s: &str) -> Result<Receipt, String> {
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

pub(crate) fn audit_verify(file: &Path, head: Option<&Receipt>) -> Result<ExitCode> {
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
