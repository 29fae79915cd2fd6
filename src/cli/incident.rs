//! `fedgate incident`: declare, renew, end, show and publish incident declarations;
//! `fedgate audit report --incident N`; and `fedgate receipt verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};

use fedgate::tools::client::Client;
use fedgate::tools::incident::{self as tool, Draft};
use fedgate::trust::tls::TlsMaterial;

/// A region identity: the CA bundle, a certificate and its key (to sign with, or,
/// when only checking, to load the CA with).
#[derive(clap::Args)]
pub(crate) struct Identity {
    /// The region CA bundle (PEM).
    #[arg(long, env = "FEDGATE_CA")]
    ca: PathBuf,
    /// The certificate (PEM): the declarer's when signing, any of the region's when
    /// only checking.
    #[arg(long, env = "FEDGATE_CERT")]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "FEDGATE_KEY")]
    key: PathBuf,
}

impl Identity {
    fn material(&self, crls: &[PathBuf]) -> Result<TlsMaterial> {
        Ok(TlsMaterial::load_with_crls(
            &self.ca, crls, &self.cert, &self.key,
        )?)
    }
}

/// The signing identity, and where to deliver what it signs.
#[derive(clap::Args)]
pub(crate) struct Signer {
    #[command(flatten)]
    id: Identity,
    /// A gateway to deliver the declaration to every member through (optional: the
    /// file can be delivered later with `fedgate incident publish`).
    #[arg(long, env = "FEDGATE_GATEWAY")]
    gateway: Option<String>,
}

#[derive(clap::Subcommand)]
pub(crate) enum IncidentCommand {
    /// Sign a new incident declaration with your identity's key, write it to a file
    /// and (with --gateway) deliver it to every member.
    Declare {
        #[command(flatten)]
        signer: Signer,
        /// The incident's number, e.g. HZ-2026-0107.
        #[arg(long)]
        number: String,
        /// What happened, in one line.
        #[arg(long)]
        summary: String,
        /// A canonical dataset it opens; repeat for several.
        #[arg(long = "dataset", required = true)]
        datasets: Vec<String>,
        /// Rows it opens: FIELD=VALUE[,VALUE...]; repeat for several conditions (all
        /// must hold). Without one, every row of the datasets.
        #[arg(long = "scope")]
        scope: Vec<String>,
        /// A purpose code queries under it may state; repeat for several (none: any).
        #[arg(long = "purpose")]
        purposes: Vec<String>,
        /// When it starts, RFC 3339 (default: now).
        #[arg(long)]
        starts: Option<String>,
        /// How long it lasts, e.g. 4h (default 4h; owners honour at most what their
        /// rules say).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        lasts: Option<Duration>,
        /// Where to write the signed declaration.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a renewal of a declaration: the same incident, ending later.
    Renew {
        #[command(flatten)]
        signer: Signer,
        /// The declaration (or latest renewal) to renew.
        #[arg(long)]
        from: PathBuf,
        /// How long from now it lasts, e.g. 4h.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        lasts: Duration,
        /// Where to write the renewal.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign the early end of an incident: no owner honours it once it holds the end.
    End {
        #[command(flatten)]
        signer: Signer,
        /// The declaration to end.
        #[arg(long)]
        from: PathBuf,
        /// Where to write the end.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a declaration file offline against the region CA and print it.
    Show {
        #[command(flatten)]
        id: Identity,
        /// The declaration file.
        file: PathBuf,
    },
    /// Deliver a declaration file to every member through a gateway.
    Publish {
        #[command(flatten)]
        signer: Signer,
        /// The declaration file.
        file: PathBuf,
    },
}

fn material(s: &Signer) -> Result<TlsMaterial> {
    s.id.material(&[])
}

fn write(out: &Path, signed: &[u8]) -> Result<()> {
    std::fs::write(out, tool::to_file_text(signed)).with_context(|| out.display().to_string())
}

async fn publish(s: &Signer, signed: &[u8]) -> Result<ExitCode> {
    let Some(gateway) = &s.gateway else {
        return Ok(ExitCode::SUCCESS);
    };
    let client = Client::connect(gateway, &s.id.ca, &s.id.cert, &s.id.key)?;
    let answer = client
        .raw()
        .declare(fedgate::proto::v1::DeclareRequest {
            declaration: signed.to_vec(),
        })
        .await
        .map_err(|st| anyhow!("{}", fedgate::tools::client::describe_status(&st)))?
        .into_inner();
    let mut unreachable = false;
    for m in &answer.members {
        println!("  {:<14} {:<13} {}", m.member, m.state, m.reason);
        unreachable |= m.state == "unreachable";
    }
    // A member the declaration did not reach does not know of it: an end must be
    // delivered again.
    Ok(if unreachable {
        ExitCode::from(super::EXIT_PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}

fn show(material: &TlsMaterial, signed: &[u8]) -> Result<String> {
    let d = fedgate::trust::incident::verify(material, signed, SystemTime::now())?;
    Ok(tool::describe(&d))
}

pub(crate) async fn incident(cmd: IncidentCommand) -> Result<ExitCode> {
    let now = SystemTime::now();
    match cmd {
        IncidentCommand::Declare {
            signer,
            number,
            summary,
            datasets,
            scope,
            purposes,
            starts,
            lasts,
            out,
        } => {
            let m = material(&signer)?;
            let starts = match starts {
                Some(s) => Some(SystemTime::from(
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .with_context(|| format!("--starts {s:?} is not an RFC 3339 time"))?,
                )),
                None => None,
            };
            let draft = Draft {
                number,
                summary,
                datasets,
                scope: scope
                    .iter()
                    .map(|s| tool::parse_scope(s))
                    .collect::<fedgate::error::Result<_>>()?,
                purposes,
                starts,
                lasts,
            };
            let signed = tool::declare(&m, &draft, now)?;
            write(&out, &signed)?;
            println!("{}", show(&m, &signed)?);
            println!("written to {}", out.display());
            publish(&signer, &signed).await
        }
        IncidentCommand::Renew {
            signer,
            from,
            lasts,
            out,
        } => follow(&signer, &from, Some(lasts), &out, now).await,
        IncidentCommand::End { signer, from, out } => follow(&signer, &from, None, &out, now).await,
        IncidentCommand::Show { id, file } => {
            let m = id.material(&[])?;
            println!("{}", show(&m, &tool::read_file(&file)?)?);
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Publish { signer, file } => {
            let m = material(&signer)?;
            let signed = tool::read_file(&file)?;
            println!("{}", show(&m, &signed)?);
            if signer.gateway.is_none() {
                return Err(anyhow!("publish needs --gateway (or FEDGATE_GATEWAY)"));
            }
            publish(&signer, &signed).await
        }
    }
}

async fn follow(
    signer: &Signer,
    from: &Path,
    lasts: Option<Duration>,
    out: &Path,
    now: SystemTime,
) -> Result<ExitCode> {
    let m = material(signer)?;
    let d = fedgate::trust::incident::verify(&m, &tool::read_file(from)?, now)?;
    let signed = tool::follow_up(&m, &d, lasts, now)?;
    write(out, &signed)?;
    println!("{}", show(&m, &signed)?);
    println!("written to {}", out.display());
    publish(signer, &signed).await
}

/// `fedgate audit report --incident N LOG...`: exits 1 when anything is flagged.
pub(crate) fn report(number: &str, logs: &[String], json: bool) -> Result<ExitCode> {
    let logs: Vec<(String, PathBuf)> = logs
        .iter()
        .map(|l| match l.split_once('=') {
            Some((name, path)) => (name.to_string(), PathBuf::from(path)),
            None => (
                Path::new(l)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| l.clone()),
                PathBuf::from(l),
            ),
        })
        .collect();
    let r = tool::review(number, &logs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", tool::review_text(&r));
    }
    Ok(if r.flagged() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(clap::Subcommand)]
pub(crate) enum ReceiptCommand {
    /// Check a receipt offline against the region CA: every signature, that the
    /// member statements are the ones the coordinator listed, and (with --answer) that
    /// the answer is the one it was signed for. Exit 1 if anything fails.
    Verify {
        #[command(flatten)]
        id: Identity,
        /// The region's revocation lists (PEM), repeated for several: a statement
        /// signed with a certificate they revoke is refused.
        #[arg(long = "crl")]
        crls: Vec<PathBuf>,
        /// The answer as `fedgate query --format arrow` wrote it.
        #[arg(long)]
        answer: Option<PathBuf>,
        /// The receipt file.
        file: PathBuf,
    },
}

pub(crate) fn receipt(cmd: ReceiptCommand) -> Result<ExitCode> {
    let ReceiptCommand::Verify {
        id,
        crls,
        answer,
        file,
    } = cmd;
    let m = id.material(&crls)?;
    let encoded = tool::read_file(&file)?;
    let batches = match &answer {
        Some(path) => {
            let f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
            let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(f, None)
                .with_context(|| format!("{} is not an Arrow IPC stream", path.display()))?;
            let schema = reader.schema();
            Some((
                schema,
                reader
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .with_context(|| format!("reading {}", path.display()))?,
            ))
        }
        None => None,
    };
    let checks = fedgate::trust::receipt::verify(
        &m,
        &encoded,
        batches.as_ref().map(|(s, b)| (s.as_ref(), b.as_slice())),
    );
    let mut failed = false;
    for c in &checks {
        match &c.failure {
            None => println!("ok      {}", c.what),
            Some(why) => {
                failed = true;
                println!("FAILED  {}: {why}", c.what);
            }
        }
    }
    if crls.is_empty() {
        println!("note    no --crl given: revoked certificates are not refused");
    }
    if answer.is_none() {
        println!("note    no --answer given: the answer itself is NOT checked");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
