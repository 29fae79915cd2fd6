//! The member file validated together with its region file into one [`MemberConfig`]:
//! identity, listen addresses, limits, sources, mappings and access rules, with a version
//! that is a hash of what it was read from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::access::AccessRule;
use super::access::validate_access;
use super::limits::Limits;
use super::limits::validate_admission;
use super::limits::validate_limits;
use super::parse_toml;
use super::problems::Problems;
use super::raw::*;
use super::read_file;
use super::region::Dataset;
use super::region::Member;
use super::region::Region;
use super::resolve;
use super::sources::CodeTable;
use super::sources::Database;
use super::sources::Mapping;
use super::sources::Source;
use super::sources::load_hmac_key;
use super::sources::validate_databases;
use super::sources::{validate_code_tables, validate_mappings, validate_sources};

/// The HTTP port of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Mutual TLS (callers identified by certificate); otherwise plain HTTP on
    /// loopback, every caller acting as this member.
    pub tls: bool,
}

/// `[lifecycle]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleConfig {
    /// How long the gateway keeps serving after SIGTERM while reporting not ready.
    pub drain: Duration,
    /// The plain-HTTP probe listener, if any.
    pub probes: Option<SocketAddr>,
    /// The longest a connection is kept before the peer is asked to reconnect.
    pub max_connection_age: Duration,
}

/// The default of `[lifecycle] drain`.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// The default of `[lifecycle] max_connection_age`: a revoked certificate's
/// connection ends within this long of the revocation list naming it.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            drain: DEFAULT_DRAIN,
            probes: None,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
        }
    }
}

/// The PostgreSQL wire protocol port of a gateway (always TLS with client certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// The most connections open at once; one more is refused with SQLSTATE 53300.
    pub max_connections: usize,
}

/// The default of `[postgres] max_connections`.
pub const DEFAULT_POSTGRES_CONNECTIONS: usize = 256;

/// A member's validated configuration, with its region.
#[derive(Debug)]
pub struct MemberConfig {
    /// The member file path.
    pub path: PathBuf,
    /// The region.
    pub region: Arc<Region>,
    /// This member's entry in the region.
    pub member: Member,
    /// Listen address.
    pub listen: SocketAddr,
    /// The HTTP port, if any.
    pub http: Option<HttpConfig>,
    /// The PostgreSQL wire protocol port, if it has one.
    pub postgres: Option<PostgresConfig>,
    /// OTLP/gRPC endpoint spans are exported to, if any.
    pub otlp_endpoint: Option<String>,
    /// Probes, drain and connection age.
    pub lifecycle: LifecycleConfig,
    /// Certificate path.
    pub cert_path: PathBuf,
    /// Key path.
    pub key_path: PathBuf,
    /// Limits.
    pub limits: Limits,
    /// Databases that sources read.
    pub databases: Vec<Database>,
    /// Local sources.
    pub sources: Vec<Source>,
    /// Code tables.
    pub code_tables: Vec<CodeTable>,
    /// Mappings.
    pub mappings: Vec<Mapping>,
    /// Access rules, in file order (the first match decides).
    pub access: Vec<AccessRule>,
    /// The secret key of `hmac` masks (empty when no rule uses one).
    pub hmac_key: Arc<[u8]>,
    /// Where this gateway appends its audit records.
    pub audit_path: PathBuf,
    /// Where the audit records are also exported as JSON lines, if anywhere.
    pub audit_export: Option<PathBuf>,
    /// Version: a hash of the region and member files and of every file they name
    /// (code tables, secrets, certificates and keys): a changed code table or key is
    /// a new version.
    pub version: String,
    /// The files beyond the two configuration files that this configuration was read
    /// from, watched for changes like them.
    pub files: Vec<PathBuf>,
}

impl MemberConfig {
    /// Reads and validates a member file together with its region file.
    pub fn load(path: &Path) -> Result<MemberConfig, Problems> {
        let mut pr = Problems::default();
        let text = read_file(path, &mut pr)?;
        let raw: RawMemberConfig = parse_toml(path, &text, &mut pr)?;
        let region_path = resolve(path, &raw.region);
        let region = match Region::load(&region_path) {
            Ok(r) => Arc::new(r),
            Err(mut p) => {
                pr.0.append(&mut p.0);
                return Err(pr);
            }
        };
        let cfg = Self::validate(path, &text, raw, region, &mut pr);
        match cfg {
            Some(c) if pr.is_empty() => Ok(c),
            _ => Err(pr),
        }
    }

    fn validate(
        path: &Path,
        text: &str,
        raw: RawMemberConfig,
        region: Arc<Region>,
        pr: &mut Problems,
    ) -> Option<MemberConfig> {
        let Some(member) = region.member(&raw.member).cloned() else {
            pr.add(
                path,
                "member",
                format!(
                    "{:?} is not a member of region {:?} ({})",
                    raw.member,
                    region.name,
                    region.path.display()
                ),
            );
            return None;
        };
        if member.endpoint.is_none() {
            pr.add(
                path,
                "member",
                format!(
                    "member {:?} has no endpoint in the region file, so it cannot run a gateway",
                    member.name
                ),
            );
        }
        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                pr.add(
                    path,
                    "listen",
                    format!("{:?} is not host:port: {e}", raw.listen),
                );
                None
            }
        };
        let http = raw.http.as_ref().and_then(|h| validate_http(path, h, pr));
        let postgres = raw
            .postgres
            .as_ref()
            .and_then(|p| validate_postgres(path, p, pr));
        let otlp_endpoint = validate_otlp(path, raw.telemetry.as_ref(), pr);
        let lifecycle = validate_lifecycle(path, raw.lifecycle.as_ref(), pr);
        let cert_path = resolve(path, &raw.cert);
        let key_path = resolve(path, &raw.key);
        for (k, p) in [("cert", &cert_path), ("key", &key_path)] {
            if !p.is_file() {
                pr.add(path, k, format!("{} does not exist", p.display()));
            }
        }
        let mut limits = validate_limits(path, &raw.limits, pr);
        limits.classes = validate_admission(
            path,
            "admission",
            &raw.admission,
            ("max_concurrent_queries", limits.max_concurrent_queries),
            pr,
        );
        limits.subquery_classes = validate_admission(
            path,
            "subquery_admission",
            &raw.subquery_admission,
            (
                "max_concurrent_subqueries",
                limits.max_concurrent_subqueries,
            ),
            pr,
        );

        let databases = validate_databases(path, &raw.databases, pr);
        let (sources, source_names) = validate_sources(path, &raw.sources, &databases, pr);

        let code_tables = validate_code_tables(path, &raw.code_tables, pr);
        let mappings = validate_mappings(
            path,
            &raw.mappings,
            &region,
            &member,
            &source_names,
            &code_tables,
            pr,
        );

        let served: Vec<&Dataset> = member
            .serves
            .iter()
            .filter_map(|d| region.dataset(d))
            .collect();
        let access = validate_access(path, &raw.access, &region, &served, pr);
        let hmac_key = load_hmac_key(path, &raw, &access, pr);
        let audit_path = match &raw.audit {
            Some(p) => resolve(path, p),
            None => resolve(path, Path::new(&format!("audit/{}.log", member.name))),
        };

        let audit_export = raw.audit_export.as_ref().map(|e| resolve(path, &e.path));
        if audit_export.as_ref() == Some(&audit_path) {
            pr.add(
                path,
                "audit_export.path",
                "must not be the audit log itself".to_string(),
            );
        }
        let files = named_files(path, &raw, &region, &databases, (&cert_path, &key_path));
        let version = {
            let mut h = Sha256::new();
            h.update(region.digest.as_bytes());
            h.update(text.as_bytes());
            // Each file by name and content; a secret given in the environment by its
            // value. Only a hash of them is kept, so the version tells nothing of them.
            for f in &files {
                h.update(f.to_string_lossy().as_bytes());
                h.update([0u8]);
                h.update(Sha256::digest(std::fs::read(f).unwrap_or_default()));
            }
            h.update(Sha256::digest(&hmac_key));
            for d in &databases {
                h.update(Sha256::digest(d.password.expose().unwrap_or("")));
            }
            hex::encode(&h.finalize()[..6])
        };
        Some(MemberConfig {
            path: path.to_path_buf(),
            member,
            listen: listen?,
            http,
            postgres,
            otlp_endpoint,
            lifecycle,
            cert_path,
            key_path,
            limits,
            databases,
            sources,
            code_tables,
            mappings,
            access,
            hmac_key,
            audit_path,
            audit_export,
            version,
            files,
            region,
        })
    }
}

/// The files a member file names beyond itself and the region file: the region's CA,
/// the gateway's certificate and key, code tables, the HMAC key, and the databases'
/// password files and TLS files, each once, in a stable order.
fn named_files(
    path: &Path,
    raw: &RawMemberConfig,
    region: &Region,
    databases: &[super::sources::Database],
    (cert, key): (&Path, &Path),
) -> Vec<PathBuf> {
    let mut files = std::collections::BTreeSet::new();
    files.insert(region.ca_path.clone());
    files.extend(region.crl_paths.iter().cloned());
    files.insert(cert.to_path_buf());
    files.insert(key.to_path_buf());
    for t in &raw.code_tables {
        if let Some(p) = &t.path {
            files.insert(resolve(path, p));
        }
    }
    if let Some(p) = &raw.hmac_key {
        files.insert(resolve(path, p));
    }
    for d in &raw.databases {
        if let Some(p) = &d.password_file {
            files.insert(resolve(path, p));
        }
    }
    for d in databases {
        if let super::sources::DatabaseTls::VerifyFull { ca, client } = &d.tls {
            files.insert(ca.clone());
            if let Some((c, k)) = client {
                files.insert(c.clone());
                files.insert(k.clone());
            }
        }
    }
    files.into_iter().collect()
}

/// Validates `[http]`: an address, and mutual TLS unless it listens on loopback only.
fn validate_http(path: &Path, h: &RawHttp, pr: &mut Problems) -> Option<HttpConfig> {
    let listen = match h.listen.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => {
            pr.add(
                path,
                "http.listen",
                format!("{:?} is not host:port: {e}", h.listen),
            );
            return None;
        }
    };
    let tls = h.tls.unwrap_or(true);
    if !tls && !listen.ip().is_loopback() {
        pr.add(
            path,
            "http.tls",
            format!(
                "plain HTTP acts as this member for every caller, so it may listen on \
                 a loopback address only, not {listen}; use tls = true"
            ),
        );
        return None;
    }
    Some(HttpConfig { listen, tls })
}

/// Validates `[postgres]`: an address and a positive connection cap.
fn validate_postgres(
    path: &Path,
    p: &super::raw::RawPostgres,
    pr: &mut Problems,
) -> Option<PostgresConfig> {
    let listen = p
        .listen
        .parse::<SocketAddr>()
        .map_err(|e| {
            pr.add(
                path,
                "postgres.listen",
                format!("{:?} is not host:port: {e}", p.listen),
            )
        })
        .ok()?;
    let max_connections = p.max_connections.unwrap_or(DEFAULT_POSTGRES_CONNECTIONS);
    if max_connections == 0 {
        pr.add(
            path,
            "postgres.max_connections",
            "must be at least 1".to_string(),
        );
        return None;
    }
    Some(PostgresConfig {
        listen,
        max_connections,
    })
}

/// Validates `[lifecycle]`: durations, and an address for the probes.
fn validate_lifecycle(
    path: &Path,
    l: Option<&super::raw::RawLifecycle>,
    pr: &mut Problems,
) -> LifecycleConfig {
    let Some(l) = l else {
        return LifecycleConfig::default();
    };
    let drain = super::limits::duration_setting(path, "lifecycle.drain".into(), &l.drain, pr)
        .unwrap_or(DEFAULT_DRAIN);
    let max_connection_age = super::limits::duration_setting(
        path,
        "lifecycle.max_connection_age".into(),
        &l.max_connection_age,
        pr,
    )
    .unwrap_or(DEFAULT_MAX_CONNECTION_AGE);
    // A connection younger than a second would be torn down while it is still
    // completing its handshake; no one means that.
    if max_connection_age < Duration::from_secs(1) {
        pr.add(
            path,
            "lifecycle.max_connection_age",
            "must be at least 1s".to_string(),
        );
    }
    let probes = l.probes.as_ref().and_then(|a| {
        a.parse::<SocketAddr>()
            .map_err(|e| {
                pr.add(
                    path,
                    "lifecycle.probes",
                    format!("{a:?} is not host:port: {e}"),
                )
            })
            .ok()
    });
    LifecycleConfig {
        drain,
        probes,
        max_connection_age,
    }
}

/// Validates `[telemetry] otlp_endpoint`: an http:// or https:// URL.
fn validate_otlp(path: &Path, t: Option<&RawTelemetry>, pr: &mut Problems) -> Option<String> {
    match t.and_then(|t| t.otlp_endpoint.clone()) {
        Some(e) if e.starts_with("http://") || e.starts_with("https://") => Some(e),
        Some(e) => {
            pr.add(
                path,
                "telemetry.otlp_endpoint",
                format!("{e:?} is not an http:// or https:// URL"),
            );
            None
        }
        None => None,
    }
}
