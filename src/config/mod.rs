//! Configuration in two phases: [`raw`] mirrors the TOML files; this module validates
//! them once into typed values (parsed identities, endpoints, Arrow types, durations,
//! compiled access rules), collecting every problem with its file and key.

pub mod access;
pub mod limits;
pub mod raw;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sha2::{Digest, Sha256};

use crate::trust::identity::{self, Kind, Principal};
use access::{AccessLevel, AccessRule, Mask};
use raw::*;

/// The implicit column of every canonical dataset naming the answering member.
pub const MEMBER_COLUMN: &str = "member";

/// One configuration problem, located by file and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// The key path inside it, e.g. `mappings[1].fields.county_code`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// All problems found in a configuration.
#[derive(Debug, Clone, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    fn add(&mut self, file: &Path, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl From<Problems> for crate::Error {
    fn from(p: Problems) -> Self {
        crate::Error::Config(p.to_string())
    }
}

/// The validated region file.
#[derive(Debug)]
pub struct Region {
    /// Where it was read from.
    pub path: PathBuf,
    /// Region name.
    pub name: String,
    /// The CA bundle path.
    pub ca_path: PathBuf,
    /// Members in file order.
    pub members: Vec<Member>,
    /// Canonical datasets in file order.
    pub datasets: Vec<Dataset>,
    /// Published services in file order.
    pub services: Vec<Service>,
    /// Hash of the file's bytes.
    pub digest: String,
    by_identity: HashMap<Principal, usize>,
}

/// A published service: a named query with typed parameters.
#[derive(Debug, Clone)]
pub struct Service {
    /// Name.
    pub name: String,
    /// What it answers.
    pub description: String,
    /// Principal patterns that may call it.
    pub callers: Vec<String>,
    /// Canonical SQL with `$name` placeholders.
    pub sql: String,
    /// The purpose every call states, if the service has one.
    pub purpose: Option<String>,
    /// Parameters in file order.
    pub params: Vec<ServiceParam>,
}

/// A parameter of a published service.
#[derive(Debug, Clone)]
pub struct ServiceParam {
    /// Name.
    pub name: String,
    /// Arrow type of the bound value.
    pub data_type: DataType,
    /// The type as written in the config (`utf8`, `int64`, ...).
    pub type_name: String,
    /// What to pass.
    pub description: String,
}

impl Service {
    /// Whether `p` may call this service.
    pub fn allows(&self, p: &Principal) -> bool {
        self.callers
            .iter()
            .any(|c| crate::trust::identity::matches_pattern(c, p))
    }
}

/// A validated member entry.
#[derive(Debug, Clone)]
pub struct Member {
    /// Short name.
    pub name: String,
    /// City, county or office.
    pub kind: Kind,
    /// Certificate identity.
    pub principal: Principal,
    /// Its gateway, if it runs one.
    pub endpoint: Option<Endpoint>,
    /// Datasets its gateway serves.
    pub serves: BTreeSet<String>,
}

/// A gateway endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://host:port`.
    pub url: String,
    /// The host part, for TLS server-name checks.
    pub host: String,
    /// The port.
    pub port: u16,
}

/// A canonical dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Table name.
    pub name: String,
    /// What it holds.
    pub description: String,
    /// Its declared fields (without `member`).
    pub fields: Vec<CanonicalField>,
    /// Arrow schema: the fields, all nullable, then `member` (not null).
    pub schema: SchemaRef,
    /// How coordinators may reuse member answers (`None`: never).
    pub cache: Option<limits::CachePolicy>,
}

/// A field of a canonical dataset.
#[derive(Debug, Clone)]
pub struct CanonicalField {
    /// Column name.
    pub name: String,
    /// Arrow type.
    pub data_type: DataType,
    /// Description.
    pub description: String,
    /// Unit.
    pub unit: String,
}

impl Region {
    /// Looks up a member by name.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Whether `p` is the identity of a member with a gateway (an endpoint).
    pub fn has_gateway(&self, p: &Principal) -> bool {
        self.member_by_principal(p)
            .is_some_and(|m| m.endpoint.is_some())
    }

    /// The member whose identity is `p`, if any.
    pub fn member_by_principal(&self, p: &Principal) -> Option<&Member> {
        self.by_identity.get(p).map(|&i| &self.members[i])
    }

    /// Looks up a canonical dataset.
    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// Members whose gateways serve `dataset`, in file order.
    pub fn servers_of<'a>(&'a self, dataset: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.members
            .iter()
            .filter(move |m| m.serves.contains(dataset))
    }

    /// Reads and validates a region file.
    pub fn load(path: &Path) -> Result<Region, Problems> {
        let mut problems = Problems::default();
        let text = read_file(path, &mut problems)?;
        let raw: RawRegion = parse_toml(path, &text, &mut problems)?;
        let region = Region::validate(path, &text, raw, &mut problems);
        match region {
            Some(r) if problems.is_empty() => Ok(r),
            _ => Err(problems),
        }
    }

    fn validate(path: &Path, text: &str, raw: RawRegion, pr: &mut Problems) -> Option<Region> {
        if !valid_name(&raw.region) {
            pr.add(
                path,
                "region",
                "must be lowercase letters, digits, '-' or '_'",
            );
        }
        let ca_path = resolve(path, &raw.ca);
        if !ca_path.is_file() {
            pr.add(
                path,
                "ca",
                format!("CA bundle {} does not exist", ca_path.display()),
            );
        }
        let mut datasets = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, d) in raw.datasets.iter().enumerate() {
            let key = format!("datasets[{i}]");
            if !valid_name(&d.name) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!(
                        "{:?} is not a valid table name (lowercase letters, digits, '_')",
                        d.name
                    ),
                );
            }
            if !seen.insert(d.name.clone()) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!("dataset {:?} is declared twice", d.name),
                );
            }
            let mut fields = Vec::new();
            let mut fseen = BTreeSet::new();
            for (j, f) in d.fields.iter().enumerate() {
                let fkey = format!("{key}.fields[{j}]");
                if f.name == MEMBER_COLUMN {
                    pr.add(
                        path,
                        format!("{fkey}.name"),
                        "`member` is implicit in every dataset and cannot be declared",
                    );
                } else if !valid_name(&f.name) {
                    pr.add(
                        path,
                        format!("{fkey}.name"),
                        format!("{:?} is not a valid column name", f.name),
                    );
                }
                if !fseen.insert(f.name.clone()) {
                    pr.add(
                        path,
                        format!("{fkey}.name"),
                        format!("field {:?} is declared twice", f.name),
                    );
                }
                match parse_type(&f.data_type) {
                    Some(t) => fields.push(CanonicalField {
                        name: f.name.clone(),
                        data_type: t,
                        description: f.description.clone(),
                        unit: f.unit.clone(),
                    }),
                    None => pr.add(
                        path,
                        format!("{fkey}.type"),
                        format!(
                            "unknown type {:?}; use utf8, int64, float64, boolean or date",
                            f.data_type
                        ),
                    ),
                }
            }
            if d.fields.is_empty() {
                pr.add(
                    path,
                    format!("{key}.fields"),
                    "a dataset needs at least one field",
                );
            }
            let cache = cache_policy(path, &key, d, pr);
            datasets.push(Dataset {
                name: d.name.clone(),
                description: d.description.clone(),
                schema: canonical_schema(&fields),
                fields,
                cache,
            });
        }
        let mut members = Vec::new();
        let mut by_identity = HashMap::new();
        let mut names = BTreeSet::new();
        for (i, m) in raw.members.iter().enumerate() {
            let key = format!("members[{i}]");
            if !names.insert(m.name.clone()) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!("member {:?} is listed twice", m.name),
                );
            }
            let Some(kind) = Kind::parse(&m.kind) else {
                pr.add(
                    path,
                    format!("{key}.kind"),
                    format!("unknown kind {:?}; use city, county or office", m.kind),
                );
                continue;
            };
            let principal = match &m.identity {
                Some(uri) => Principal::parse(uri),
                None => Principal::new(&raw.region, kind, &m.name),
            };
            let principal = match principal {
                Ok(p) if p.region() != raw.region => {
                    pr.add(
                        path,
                        format!("{key}.identity"),
                        format!("identity {p} is not in region {:?}", raw.region),
                    );
                    continue;
                }
                Ok(p) => p,
                Err(e) => {
                    pr.add(path, format!("{key}.identity"), e.to_string());
                    continue;
                }
            };
            let endpoint = match &m.endpoint {
                None => None,
                Some(url) => match parse_endpoint(url) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        pr.add(path, format!("{key}.endpoint"), e);
                        None
                    }
                },
            };
            if endpoint.is_none() && !m.serves.is_empty() {
                pr.add(
                    path,
                    format!("{key}.serves"),
                    "a member that serves datasets needs an endpoint",
                );
            }
            for s in &m.serves {
                if !seen.contains(s) {
                    pr.add(
                        path,
                        format!("{key}.serves"),
                        format!("unknown dataset {s:?}"),
                    );
                }
            }
            if by_identity
                .insert(principal.clone(), members.len())
                .is_some()
            {
                pr.add(
                    path,
                    format!("{key}.identity"),
                    format!("identity {principal} is used by two members"),
                );
            }
            members.push(Member {
                name: m.name.clone(),
                kind,
                principal,
                endpoint,
                serves: m.serves.iter().cloned().collect(),
            });
        }
        let services = validate_services(path, &raw.services, pr);
        Some(Region {
            path: path.to_path_buf(),
            name: raw.region,
            ca_path,
            members,
            datasets,
            services,
            digest: hex::encode(Sha256::digest(text.as_bytes())),
            by_identity,
        })
    }
}

/// Checks the published services' names, callers and parameters. That the SQL plans,
/// and that its placeholders are exactly the declared parameters with the declared
/// types, is checked when a coordinator is built from the configuration (planning
/// needs the datasets' tables).
fn validate_services(path: &Path, raw: &[RawService], pr: &mut Problems) -> Vec<Service> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, s) in raw.iter().enumerate() {
        let key = format!("services[{i}]");
        if !valid_name(&s.name) {
            pr.add(
                path,
                format!("{key}.name"),
                format!(
                    "{:?} is not a valid service name (lowercase letters, digits, '_')",
                    s.name
                ),
            );
        }
        if !names.insert(s.name.clone()) {
            pr.add(
                path,
                format!("{key}.name"),
                format!("service {:?} is declared twice", s.name),
            );
        }
        if s.callers.is_empty() {
            pr.add(
                path,
                format!("{key}.callers"),
                "names no caller; list the principal patterns that may call the service",
            );
        }
        for c in &s.callers {
            if let Err(e) = crate::trust::identity::validate_pattern(c) {
                pr.add(path, format!("{key}.callers"), e);
            }
        }
        if s.sql.trim().is_empty() {
            pr.add(path, format!("{key}.sql"), "is empty");
        }
        if let Some(p) = &s.purpose
            && let Err(why) = access::validate_purpose(p)
        {
            pr.add(path, format!("{key}.purpose"), why);
        }
        let mut params = Vec::new();
        let mut pnames = BTreeSet::new();
        for (j, p) in s.params.iter().enumerate() {
            let pkey = format!("{key}.params[{j}]");
            if !valid_name(&p.name) {
                pr.add(
                    path,
                    format!("{pkey}.name"),
                    format!("{:?} is not a valid parameter name", p.name),
                );
            }
            if !pnames.insert(p.name.clone()) {
                pr.add(
                    path,
                    format!("{pkey}.name"),
                    format!("parameter {:?} is declared twice", p.name),
                );
            }
            match parse_type(&p.data_type) {
                Some(t) => params.push(ServiceParam {
                    name: p.name.clone(),
                    data_type: t,
                    type_name: p.data_type.clone(),
                    description: p.description.clone(),
                }),
                None => pr.add(
                    path,
                    format!("{pkey}.type"),
                    format!(
                        "unknown type {:?}; use utf8, int64, float64, boolean or date",
                        p.data_type
                    ),
                ),
            }
        }
        out.push(Service {
            name: s.name.clone(),
            description: s.description.clone(),
            callers: s.callers.clone(),
            sql: s.sql.clone(),
            purpose: s.purpose.clone(),
            params,
        });
    }
    out
}

/// The HTTP port of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Mutual TLS (callers identified by certificate); otherwise plain HTTP on
    /// loopback, every caller acting as this member.
    pub tls: bool,
}

/// Limits of a gateway, with defaults applied.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deadline for queries that state none.
    pub default_timeout: Duration,
    /// Longest deadline a caller may ask for.
    pub max_timeout: Duration,
    /// Queries coordinated at once.
    pub max_concurrent_queries: usize,
    /// Sub-queries answered for peers at once.
    pub max_concurrent_subqueries: usize,
    /// Most hops a sub-query may have taken.
    pub max_hops: u32,
    /// When a member's circuit breaker opens and for how long.
    pub breaker: limits::BreakerSettings,
    /// Retries of a sub-query whose member could not be reached, within the retry
    /// budget.
    pub retries: u32,
    /// Bytes of member answers cached as coordinator.
    pub result_cache_bytes: u64,
    /// Memory one query may use at this coordinator, and one sub-query in this
    /// member's own engine.
    pub query_memory_bytes: u64,
    /// Most rows one answer may have.
    pub max_rows: Option<u64>,
    /// Admission limits per principal class.
    pub classes: BTreeMap<crate::trust::identity::Kind, limits::ClassLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_concurrent_queries: 64,
            max_concurrent_subqueries: 128,
            max_hops: 3,
            breaker: Default::default(),
            retries: 1,
            result_cache_bytes: 64 * 1024 * 1024,
            query_memory_bytes: 1024 * 1024 * 1024,
            max_rows: None,
            classes: BTreeMap::new(),
        }
    }
}

/// A local source.
#[derive(Debug, Clone)]
pub struct Source {
    /// Name used by mappings.
    pub name: String,
    /// Where its rows come from.
    pub kind: SourceKind,
}

/// Where a source's rows come from.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// A file read by the gateway.
    File {
        /// File format.
        format: SourceFormat,
        /// Absolute or config-relative resolved path.
        path: PathBuf,
        /// CSV delimiter.
        delimiter: u8,
    },
    /// A table in one of the member's databases.
    Postgres {
        /// The database's name in `[[databases]]`.
        database: String,
        /// Schema on the server.
        schema: String,
        /// Table (or view) on the server.
        table: String,
    },
}

/// Supported local file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// Comma-separated values with a header row; every column is read as text.
    Csv,
    /// Apache Parquet; column types are the file's.
    Parquet,
}

/// A PostgreSQL-compatible database.
#[derive(Debug, Clone)]
pub struct Database {
    /// Name used by sources.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database name on the server.
    pub dbname: String,
    /// User.
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Secret,
    /// Transport security.
    pub tls: DatabaseTls,
    /// Most connections held open.
    pub pool_size: usize,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
}

/// How a gateway secures its connections to a database.
#[derive(Debug, Clone)]
pub enum DatabaseTls {
    /// Plain TCP (a database on loopback or a trusted network).
    Disable,
    /// TLS; the server's certificate must chain to `ca` and name the host.
    VerifyFull {
        /// CA bundle.
        ca: PathBuf,
        /// Client certificate and key, when the server asks for one.
        client: Option<(PathBuf, PathBuf)>,
    },
}

/// A secret that never appears in logs or debug output.
#[derive(Clone, Default)]
pub struct Secret(Option<String>);

impl Secret {
    /// A secret.
    pub fn new(s: String) -> Secret {
        Secret(Some(s))
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "<secret>"
        } else {
            "<none>"
        })
    }
}

/// A code table.
#[derive(Debug, Clone)]
pub struct CodeTable {
    /// Name used by mappings.
    pub name: String,
    /// Normalized key to code (file entries and aliases).
    pub entries: BTreeMap<String, String>,
}

/// How one canonical field is computed from local columns.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMapping {
    /// SQL expression over local columns giving the raw value.
    pub expr: String,
    /// Translate through this code table.
    pub code_table: Option<String>,
    /// Parse as a date with this format.
    pub date_format: Option<String>,
}

/// A mapping from a local source onto a canonical dataset.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Canonical dataset.
    pub dataset: String,
    /// Local source name.
    pub source: String,
    /// Optional predicate over local columns.
    pub filter: Option<String>,
    /// Canonical field name to mapping, in canonical field order.
    pub fields: Vec<(String, FieldMapping)>,
    /// Index in the member file (for problem keys).
    pub index: usize,
}

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
    /// OTLP/gRPC endpoint spans are exported to, if any.
    pub otlp_endpoint: Option<String>,
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
    /// Version: a hash of the region and member files.
    pub version: String,
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
        let http = raw.http.as_ref().and_then(|h| {
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
        });
        let otlp_endpoint = match raw.telemetry.as_ref().and_then(|t| t.otlp_endpoint.clone()) {
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
        };
        let cert_path = resolve(path, &raw.cert);
        let key_path = resolve(path, &raw.key);
        for (k, p) in [("cert", &cert_path), ("key", &key_path)] {
            if !p.is_file() {
                pr.add(path, k, format!("{} does not exist", p.display()));
            }
        }
        let mut limits = validate_limits(path, &raw.limits, pr);
        limits.classes =
            validate_admission(path, &raw.admission, limits.max_concurrent_queries, pr);

        let databases = validate_databases(path, &raw.databases, pr);
        let mut sources = Vec::new();
        let mut source_names = BTreeSet::new();
        for (i, s) in raw.sources.iter().enumerate() {
            let key = format!("sources[{i}]");
            if !valid_name(&s.name) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!("{:?} is not a valid name", s.name),
                );
            }
            if !source_names.insert(s.name.clone()) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!("source {:?} is declared twice", s.name),
                );
            }
            if let Some(kind) = validate_source_kind(path, &key, s, &databases, pr) {
                sources.push(Source {
                    name: s.name.clone(),
                    kind,
                });
            }
        }

        let mut code_tables = Vec::new();
        for (i, t) in raw.code_tables.iter().enumerate() {
            let key = format!("code_tables[{i}]");
            if !valid_name(&t.name) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!("{:?} is not a valid name", t.name),
                );
            }
            let mut entries = BTreeMap::new();
            if let Some(p) = &t.path {
                let p = resolve(path, p);
                let kc = t.key_column.as_deref().unwrap_or("name");
                let cc = t.code_column.as_deref().unwrap_or("code");
                match read_code_file(&p, kc, cc) {
                    Ok(rows) => {
                        for (k, v) in rows {
                            entries.insert(normalize_key(&k), v);
                        }
                    }
                    Err(e) => pr.add(path, format!("{key}.path"), e),
                }
            }
            for (alias, code) in &t.aliases {
                entries.insert(normalize_key(alias), code.clone());
            }
            if entries.is_empty() {
                pr.add(
                    path,
                    key.clone(),
                    "code table has no entries (give a path or aliases)",
                );
            }
            code_tables.push(CodeTable {
                name: t.name.clone(),
                entries,
            });
        }

        let mut mappings = Vec::new();
        let mut mapped = BTreeSet::new();
        for (i, m) in raw.mappings.iter().enumerate() {
            let key = format!("mappings[{i}]");
            let Some(ds) = region.dataset(&m.dataset) else {
                pr.add(
                    path,
                    format!("{key}.dataset"),
                    format!("{:?} is not a canonical dataset of the region", m.dataset),
                );
                continue;
            };
            mapped.insert(m.dataset.clone());
            if !source_names.contains(&m.source) {
                pr.add(
                    path,
                    format!("{key}.source"),
                    format!("unknown source {:?}", m.source),
                );
            }
            for f in m.fields.keys() {
                if f == MEMBER_COLUMN {
                    pr.add(
                        path,
                        format!("{key}.fields.{f}"),
                        "`member` is set by fedgate and cannot be mapped",
                    );
                } else if !ds.fields.iter().any(|c| &c.name == f) {
                    pr.add(
                        path,
                        format!("{key}.fields.{f}"),
                        format!("dataset {} has no field {f:?}", ds.name),
                    );
                }
            }
            let mut fields = Vec::new();
            for cf in &ds.fields {
                let fkey = format!("{key}.fields.{}", cf.name);
                let Some(rf) = m.fields.get(&cf.name) else {
                    pr.add(path, fkey, format!("canonical field {:?} is not mapped (map it to \"NULL\" if the source has no value)", cf.name));
                    continue;
                };
                match field_mapping(rf, &code_tables, &cf.data_type) {
                    Ok(fm) => fields.push((cf.name.clone(), fm)),
                    Err(e) => pr.add(path, fkey, e),
                }
            }
            mappings.push(Mapping {
                dataset: m.dataset.clone(),
                source: m.source.clone(),
                filter: m.filter.clone(),
                fields,
                index: i,
            });
        }
        if mapped != member.serves {
            let declared: Vec<_> = member.serves.iter().cloned().collect();
            let have: Vec<_> = mapped.iter().cloned().collect();
            pr.add(
                path,
                "mappings",
                format!(
                    "the region file says member {} serves {:?}, but this file maps {:?}",
                    member.name, declared, have
                ),
            );
        }

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

        let version = {
            let mut h = Sha256::new();
            h.update(region.digest.as_bytes());
            h.update(text.as_bytes());
            hex::encode(&h.finalize()[..6])
        };
        Some(MemberConfig {
            path: path.to_path_buf(),
            member,
            listen: listen?,
            http,
            otlp_endpoint,
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
            version,
            region,
        })
    }
}

/// Compiles the access rules, checking every name they use against the datasets this
/// member serves.
fn validate_access(
    path: &Path,
    raw: &[RawAccessRule],
    region: &Region,
    served: &[&Dataset],
    pr: &mut Problems,
) -> Vec<AccessRule> {
    let mut access = Vec::new();
    for (i, a) in raw.iter().enumerate() {
        let key = format!("access[{i}]");
        for p in &a.principals {
            if let Err(e) = identity::validate_pattern(p) {
                pr.add(path, format!("{key}.principals"), e);
            }
        }
        if a.principals.is_empty() {
            pr.add(path, format!("{key}.principals"), "names no principal");
        }
        for p in &a.via {
            if let Err(e) = identity::validate_pattern(p) {
                pr.add(path, format!("{key}.via"), e);
            }
        }
        for d in &a.datasets {
            if d != "*" && region.dataset(d).is_none() {
                pr.add(
                    path,
                    format!("{key}.datasets"),
                    format!("unknown dataset {d:?}"),
                );
            }
        }
        // The datasets the rule can apply to here, to check field names against.
        let covered: Vec<&Dataset> = served
            .iter()
            .copied()
            .filter(|d| a.datasets.iter().any(|x| x == "*" || x == &d.name))
            .collect();
        let field = |name: &str| -> Option<&CanonicalField> {
            covered
                .iter()
                .find_map(|d| d.fields.iter().find(|f| f.name == name))
        };
        let known = |name: &str| name == MEMBER_COLUMN || field(name).is_some();
        let mut masks = BTreeMap::new();
        for (f, m) in &a.fields {
            let fkey = format!("{key}.fields.{f}");
            let Some(mask) = Mask::parse(m) else {
                pr.add(
                    path,
                    fkey,
                    format!("unknown mask {m:?}; use {}", Mask::NAMES),
                );
                continue;
            };
            match field(f) {
                None => pr.add(
                    path,
                    fkey,
                    format!("no dataset this rule covers here has a field {f:?}"),
                ),
                Some(cf) if mask != Mask::Deny && cf.data_type != DataType::Utf8 => pr.add(
                    path,
                    fkey,
                    format!(
                        "mask {m} works on text, but {f} is {}; use deny to withhold it",
                        cf.data_type
                    ),
                ),
                Some(_) => {
                    masks.insert(f.clone(), mask);
                }
            }
        }
        let names = |list: &[String], what: &str, pr: &mut Problems| -> BTreeSet<String> {
            for f in list {
                if !known(f) {
                    pr.add(
                        path,
                        format!("{key}.{what}"),
                        format!("no dataset this rule covers here has a field {f:?}"),
                    );
                }
                if masks.contains_key(f) {
                    pr.add(
                        path,
                        format!("{key}.{what}"),
                        format!(
                            "{f} is masked by this rule, so it cannot also be one of its {what}"
                        ),
                    );
                }
            }
            list.iter().cloned().collect()
        };
        let dimensions = names(&a.dimensions, "dimensions", pr);
        let keys = names(&a.keys, "keys", pr);
        for p in &a.purposes {
            if p.is_empty() || p.contains(':') || p.chars().any(char::is_whitespace) {
                pr.add(
                    path,
                    format!("{key}.purposes"),
                    format!("{p:?} is not a purpose code (one word, no ':' or spaces)"),
                );
            }
        }
        let misplaced = |what: &str, present: bool, pr: &mut Problems| {
            if present {
                pr.add(
                    path,
                    format!("{key}.{what}"),
                    format!("{what} does not apply to level {:?}", a.level),
                );
            }
        };
        let level = match a.level.as_str() {
            "rows" => {
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                misplaced("keys", !a.keys.is_empty(), pr);
                AccessLevel::Rows
            }
            "masked" => {
                if a.fields.is_empty() {
                    pr.add(
                        path,
                        format!("{key}.fields"),
                        "a masked rule must name the fields it masks",
                    );
                }
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                misplaced("keys", !a.keys.is_empty(), pr);
                AccessLevel::Masked
            }
            "aggregate" => {
                misplaced("keys", !a.keys.is_empty(), pr);
                match a.min_group {
                    Some(k) if k >= 2 => AccessLevel::Aggregate { min_group: k },
                    Some(k) => {
                        pr.add(
                            path,
                            format!("{key}.min_group"),
                            format!("{k} would release single records; use 2 or more"),
                        );
                        continue;
                    }
                    None => {
                        pr.add(
                            path,
                            format!("{key}.min_group"),
                            "an aggregate rule needs min_group (the smallest group released)",
                        );
                        continue;
                    }
                }
            }
            "verify" => {
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                if a.keys.is_empty() {
                    pr.add(
                        path,
                        format!("{key}.keys"),
                        "a verify rule needs keys: the fields every verification must state",
                    );
                }
                AccessLevel::Verify
            }
            "deny" => {
                misplaced("fields", !a.fields.is_empty(), pr);
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                misplaced("keys", !a.keys.is_empty(), pr);
                AccessLevel::Deny
            }
            other => {
                pr.add(
                    path,
                    format!("{key}.level"),
                    format!("unknown level {other:?}; use rows, masked, aggregate, verify or deny"),
                );
                continue;
            }
        };
        access.push(AccessRule {
            index: i,
            principals: a.principals.clone(),
            datasets: a.datasets.clone(),
            level,
            masks,
            dimensions,
            keys,
            purposes: a.purposes.clone(),
            via: a.via.clone(),
        });
    }
    access
}

/// Where a source's rows come from, with every mistake in its keys reported.
fn validate_source_kind(
    path: &Path,
    key: &str,
    s: &RawSource,
    databases: &[Database],
    pr: &mut Problems,
) -> Option<SourceKind> {
    let misplaced = |pr: &mut Problems, k: &str, why: &str| {
        pr.add(path, format!("{key}.{k}"), why.to_string());
    };
    match s.format.as_str() {
        "csv" | "parquet" => {
            let format = if s.format == "csv" {
                SourceFormat::Csv
            } else {
                SourceFormat::Parquet
            };
            if s.database.is_some() {
                misplaced(pr, "database", "only postgres sources have a database");
            }
            if s.table.is_some() {
                misplaced(pr, "table", "only postgres sources have a table");
            }
            let delimiter = match s.delimiter.as_deref() {
                None => b',',
                Some(d) if d.len() == 1 && format == SourceFormat::Csv => d.as_bytes()[0],
                Some(_) if format != SourceFormat::Csv => {
                    misplaced(pr, "delimiter", "only csv sources have a delimiter");
                    b','
                }
                Some(d) => {
                    pr.add(
                        path,
                        format!("{key}.delimiter"),
                        format!("{d:?} must be one ASCII character"),
                    );
                    b','
                }
            };
            let Some(p) = &s.path else {
                misplaced(pr, "path", "a file source needs a path");
                return None;
            };
            let p = resolve(path, p);
            if !p.is_file() {
                pr.add(
                    path,
                    format!("{key}.path"),
                    format!("{} does not exist", p.display()),
                );
            }
            Some(SourceKind::File {
                format,
                path: p,
                delimiter,
            })
        }
        "postgres" => {
            for (k, set) in [
                ("path", s.path.is_some()),
                ("delimiter", s.delimiter.is_some()),
            ] {
                if set {
                    misplaced(pr, k, "a postgres source reads a table, not a file");
                }
            }
            let Some(db) = &s.database else {
                misplaced(
                    pr,
                    "database",
                    "a postgres source needs database = NAME of a [[databases]] entry",
                );
                return None;
            };
            if !databases.iter().any(|d| &d.name == db) {
                let known: Vec<&str> = databases.iter().map(|d| d.name.as_str()).collect();
                pr.add(
                    path,
                    format!("{key}.database"),
                    format!("no database named {db:?} (declared: {known:?})"),
                );
            }
            let Some(table) = &s.table else {
                misplaced(
                    pr,
                    "table",
                    "a postgres source needs table = \"schema.table\"",
                );
                return None;
            };
            let (schema, table) = match table.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => ("public".to_string(), table.clone()),
            };
            if schema.is_empty() || table.is_empty() || table.contains('.') {
                pr.add(
                    path,
                    format!("{key}.table"),
                    format!(
                        "{:?} is not table or schema.table",
                        s.table.as_deref().unwrap_or("")
                    ),
                );
                return None;
            }
            Some(SourceKind::Postgres {
                database: db.clone(),
                schema,
                table,
            })
        }
        other => {
            pr.add(
                path,
                format!("{key}.format"),
                format!("unknown format {other:?}; use csv, parquet or postgres"),
            );
            None
        }
    }
}

/// Validates the `[[databases]]` entries; passwords are read here, once.
fn validate_databases(path: &Path, raw: &[RawDatabase], pr: &mut Problems) -> Vec<Database> {
    let mut out: Vec<Database> = Vec::new();
    for (i, d) in raw.iter().enumerate() {
        let key = format!("databases[{i}]");
        if !valid_name(&d.name) {
            pr.add(
                path,
                format!("{key}.name"),
                format!("{:?} is not a valid name", d.name),
            );
        }
        if out.iter().any(|o| o.name == d.name) {
            pr.add(
                path,
                format!("{key}.name"),
                format!("database {:?} is declared twice", d.name),
            );
        }
        let password = read_secret(
            path,
            (&format!("{key}.password_file"), d.password_file.as_ref()),
            (&format!("{key}.password_env"), d.password_env.as_ref()),
            pr,
        )
        .map(|(_, b)| {
            let text = String::from_utf8_lossy(&b);
            Secret(Some(text.trim_end_matches(['\r', '\n']).to_string()))
        })
        .unwrap_or_default();
        let file = |k: &str, p: &Option<PathBuf>, pr: &mut Problems| -> Option<PathBuf> {
            let p = resolve(path, p.as_ref()?);
            if !p.is_file() {
                pr.add(
                    path,
                    format!("{key}.{k}"),
                    format!("{} does not exist", p.display()),
                );
            }
            Some(p)
        };
        let ca = file("ca", &d.ca, pr);
        let cert = file("cert", &d.cert, pr);
        let client_key = file("key", &d.key, pr);
        let tls = match d.tls.as_deref().unwrap_or("disable") {
            "disable" => {
                for (k, set) in [
                    ("ca", ca.is_some()),
                    ("cert", cert.is_some()),
                    ("key", client_key.is_some()),
                ] {
                    if set {
                        pr.add(
                            path,
                            format!("{key}.{k}"),
                            "only used with tls = \"verify-full\"",
                        );
                    }
                }
                DatabaseTls::Disable
            }
            "verify-full" => {
                let client = match (cert, client_key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => {
                        pr.add(
                            path,
                            format!("{key}.cert"),
                            "a client certificate needs both cert and key",
                        );
                        None
                    }
                };
                match ca {
                    Some(ca) => DatabaseTls::VerifyFull { ca, client },
                    None => {
                        pr.add(
                            path,
                            format!("{key}.ca"),
                            "tls = \"verify-full\" needs ca = FILE with the CA that signed the server's certificate",
                        );
                        DatabaseTls::Disable
                    }
                }
            }
            other => {
                pr.add(
                    path,
                    format!("{key}.tls"),
                    format!("unknown tls mode {other:?}; use disable or verify-full"),
                );
                DatabaseTls::Disable
            }
        };
        let pool_size = d.pool_size.unwrap_or(8);
        if pool_size == 0 {
            pr.add(path, format!("{key}.pool_size"), "must be at least 1");
        }
        let connect_timeout = match d.connect_timeout.as_deref() {
            None => Duration::from_secs(5),
            Some(t) => match humantime::parse_duration(t) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    pr.add(
                        path,
                        format!("{key}.connect_timeout"),
                        format!("{t:?} is not a duration such as \"5s\""),
                    );
                    Duration::from_secs(5)
                }
            },
        };
        if d.host.is_empty() {
            pr.add(path, format!("{key}.host"), "must not be empty");
        }
        out.push(Database {
            name: d.name.clone(),
            host: d.host.clone(),
            port: d.port.unwrap_or(5432),
            dbname: d.dbname.clone(),
            user: d.user.clone(),
            password,
            tls,
            pool_size: pool_size.max(1),
            connect_timeout,
        });
    }
    out
}

/// Reads a secret given either as a file (relative to the member file) or as an
/// environment variable, never both: the key it was given under and its bytes, or
/// `None` (with the problem recorded when one was given but cannot be read).
fn read_secret(
    path: &Path,
    (file_key, file): (&str, Option<&PathBuf>),
    (env_key, env): (&str, Option<&String>),
    pr: &mut Problems,
) -> Option<(String, Vec<u8>)> {
    match (file, env) {
        (Some(_), Some(_)) => {
            pr.add(
                path,
                file_key,
                format!("set {file_key} or {env_key}, not both"),
            );
            None
        }
        (Some(f), None) => {
            let full = resolve(path, f);
            match std::fs::read(&full) {
                Ok(b) => Some((file_key.to_string(), b)),
                Err(e) => {
                    pr.add(path, file_key, format!("reading {}: {e}", full.display()));
                    None
                }
            }
        }
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) => Some((env_key.to_string(), v.into_bytes())),
            Err(_) => {
                pr.add(
                    path,
                    env_key,
                    format!("environment variable {var} is not set"),
                );
                None
            }
        },
        (None, None) => None,
    }
}

/// Reads the `hmac` masks' key when a rule uses one.
fn load_hmac_key(
    path: &Path,
    raw: &RawMemberConfig,
    access: &[AccessRule],
    pr: &mut Problems,
) -> Arc<[u8]> {
    let used = access
        .iter()
        .any(|r| r.masks.values().any(|m| *m == Mask::Hmac));
    let key = read_secret(
        path,
        ("hmac_key", raw.hmac_key.as_ref()),
        ("hmac_key_env", raw.hmac_key_env.as_ref()),
        pr,
    )
    .map(|(k, b)| (k, b.trim_ascii().to_vec()));
    if used && raw.hmac_key.is_none() && raw.hmac_key_env.is_none() {
        pr.add(
            path,
            "hmac_key",
            "an access rule uses the hmac mask, so the member needs a secret key (hmac_key = FILE or hmac_key_env = VAR)",
        );
    }
    match key {
        Some((k, b)) if b.len() < 16 => {
            pr.add(
                path,
                k,
                "the hmac key is shorter than 16 bytes; use a long random secret",
            );
            Arc::from(Vec::new())
        }
        Some((_, b)) => Arc::from(b),
        None => Arc::from(Vec::new()),
    }
}

/// A duration setting: `None` when absent or wrong (wrong ones are reported).
fn duration_setting(
    path: &Path,
    key: String,
    v: &Option<String>,
    pr: &mut Problems,
) -> Option<Duration> {
    let s = v.as_ref()?;
    match humantime::parse_duration(s) {
        Ok(d) => Some(d),
        Err(e) => {
            pr.add(
                path,
                key,
                format!("{s:?} is not a duration like \"30s\": {e}"),
            );
            None
        }
    }
}

fn cache_policy(
    path: &Path,
    key: &str,
    d: &RawDataset,
    pr: &mut Problems,
) -> Option<limits::CachePolicy> {
    let fresh = duration_setting(
        path,
        format!("{key}.cache_fresh_for"),
        &d.cache_fresh_for,
        pr,
    );
    let stale = duration_setting(
        path,
        format!("{key}.cache_stale_for"),
        &d.cache_stale_for,
        pr,
    );
    if d.cache_stale_for.is_some() && d.cache_fresh_for.is_none() {
        pr.add(
            path,
            format!("{key}.cache_stale_for"),
            "needs cache_fresh_for (answers are cached only for datasets that set it)",
        );
    }
    if fresh.is_some_and(|f| f.is_zero()) {
        pr.add(
            path,
            format!("{key}.cache_fresh_for"),
            "must be greater than zero (leave it out to cache nothing)",
        );
        return None;
    }
    Some(limits::CachePolicy {
        fresh_for: fresh?,
        stale_for: stale.unwrap_or_default(),
    })
}

fn validate_limits(path: &Path, raw: &RawLimits, pr: &mut Problems) -> Limits {
    let mut l = Limits::default();
    let mut dur = |key: &str, v: &Option<String>, slot: &mut Duration| {
        if let Some(s) = v {
            match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => *slot = d,
                Ok(_) => pr.add(path, format!("limits.{key}"), "must be greater than zero"),
                Err(e) => pr.add(
                    path,
                    format!("limits.{key}"),
                    format!("{s:?} is not a duration like \"30s\": {e}"),
                ),
            }
        }
    };
    dur(
        "default_timeout",
        &raw.default_timeout,
        &mut l.default_timeout,
    );
    dur("max_timeout", &raw.max_timeout, &mut l.max_timeout);
    dur(
        "breaker_open_for",
        &raw.breaker_open_for,
        &mut l.breaker.open_for,
    );
    if l.default_timeout > l.max_timeout {
        pr.add(
            path,
            "limits.default_timeout",
            "is longer than limits.max_timeout",
        );
    }
    if let Some(n) = raw.max_concurrent_queries {
        l.max_concurrent_queries = n.max(1);
    }
    if let Some(n) = raw.max_concurrent_subqueries {
        l.max_concurrent_subqueries = n.max(1);
    }
    if let Some(n) = raw.max_hops {
        l.max_hops = n.max(1);
    }
    match raw.breaker_failures {
        Some(0) => pr.add(
            path,
            "limits.breaker_failures",
            "must be at least 1 (a breaker that opens without failures would refuse every member)",
        ),
        Some(n) => l.breaker.failures = n,
        None => {}
    }
    if let Some(n) = raw.result_cache_bytes {
        l.result_cache_bytes = n;
    }
    match raw.query_memory_bytes {
        Some(n) if n < 1024 * 1024 => pr.add(
            path,
            "limits.query_memory_bytes",
            format!("{n} is less than 1 MiB; no query could merge in that"),
        ),
        Some(n) => l.query_memory_bytes = n,
        None => {}
    }
    match raw.max_rows {
        Some(0) => pr.add(path, "limits.max_rows", "must be at least 1"),
        n => l.max_rows = n,
    }
    match raw.retries {
        Some(n) if n > 3 => pr.add(
            path,
            "limits.retries",
            format!("{n} is more than 3: retries multiply the load on a member that is failing"),
        ),
        Some(n) => l.retries = n,
        None => {}
    }
    l
}

fn validate_admission(
    path: &Path,
    raw: &[RawAdmission],
    total: usize,
    pr: &mut Problems,
) -> BTreeMap<crate::trust::identity::Kind, limits::ClassLimits> {
    use limits::{ClassLimits, Rate};
    let mut out = BTreeMap::new();
    for (i, a) in raw.iter().enumerate() {
        let key = format!("admission[{i}]");
        let Some(kind) = crate::trust::identity::Kind::parse(&a.class) else {
            pr.add(
                path,
                format!("{key}.class"),
                format!(
                    "{:?} is not a principal class (office, city or county)",
                    a.class
                ),
            );
            continue;
        };
        if let Some(max) = a.max_concurrent
            && (max == 0 || max < a.reserved)
        {
            pr.add(
                path,
                format!("{key}.max_concurrent"),
                format!(
                    "{max} must be at least 1 and at least the {} reserved",
                    a.reserved
                ),
            );
        }
        let rate = match a.rate_per_second {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                pr.add(
                    path,
                    format!("{key}.rate_per_second"),
                    format!("{r} must be a positive number"),
                );
                None
            }
            Some(r) => {
                let burst = a.burst.unwrap_or(r.max(1.0));
                if !(burst.is_finite() && burst >= 1.0) {
                    pr.add(
                        path,
                        format!("{key}.burst"),
                        format!("{burst} must be at least 1"),
                    );
                }
                Some(Rate {
                    per_second: r,
                    burst,
                })
            }
            None => {
                if a.burst.is_some() {
                    pr.add(path, format!("{key}.burst"), "needs rate_per_second");
                }
                None
            }
        };
        let limits = ClassLimits {
            reserved: a.reserved,
            max_concurrent: a.max_concurrent,
            rate,
        };
        match out.entry(kind) {
            std::collections::btree_map::Entry::Occupied(_) => pr.add(
                path,
                format!("{key}.class"),
                format!("{} is listed twice", a.class),
            ),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(limits);
            }
        }
    }
    let reserved: usize = out.values().map(|c| c.reserved).sum();
    if reserved > total {
        pr.add(
            path,
            "admission",
            format!(
                "the classes reserve {reserved} slots, more than limits.max_concurrent_queries ({total})"
            ),
        );
    }
    out
}

fn field_mapping(
    raw: &RawFieldMapping,
    tables: &[CodeTable],
    target: &DataType,
) -> Result<FieldMapping, String> {
    let detail = match raw {
        RawFieldMapping::Expr(e) => RawFieldDetail {
            expr: Some(e.clone()),
            ..Default::default()
        },
        RawFieldMapping::Detailed(d) => d.clone(),
    };
    let expr = match (&detail.column, &detail.expr) {
        (Some(c), None) => quote_ident(c),
        (None, Some(e)) if !e.trim().is_empty() => e.clone(),
        (None, Some(_)) => return Err("expression is empty".into()),
        (Some(_), Some(_)) => return Err("give either column or expr, not both".into()),
        (None, None) => return Err("give a column or an expr".into()),
    };
    if let Some(t) = &detail.code_table {
        if !tables.iter().any(|c| &c.name == t) {
            return Err(format!("unknown code table {t:?}"));
        }
        if target != &DataType::Utf8 {
            return Err(format!(
                "a code table yields text, but the field is {target}"
            ));
        }
    }
    if let Some(f) = &detail.date_format {
        if target != &DataType::Date32 {
            return Err(format!(
                "date_format is only for date fields, this one is {target}"
            ));
        }
        if detail.code_table.is_some() {
            return Err("a field cannot use both code_table and date_format".into());
        }
        if f.is_empty() {
            return Err("date_format is empty".into());
        }
    }
    Ok(FieldMapping {
        expr,
        code_table: detail.code_table,
        date_format: detail.date_format,
    })
}

/// Builds the Arrow schema of a canonical dataset: its fields (nullable, since a
/// member may lack a value) followed by the non-null `member` column.
pub fn canonical_schema(fields: &[CanonicalField]) -> SchemaRef {
    let mut v: Vec<Field> = fields
        .iter()
        .map(|f| Field::new(&f.name, f.data_type.clone(), true))
        .collect();
    v.push(Field::new(MEMBER_COLUMN, DataType::Utf8, false));
    Arc::new(Schema::new(v))
}

/// Parses a canonical type name.
pub fn parse_type(s: &str) -> Option<DataType> {
    Some(match s {
        "utf8" | "string" | "text" => DataType::Utf8,
        "int64" | "bigint" => DataType::Int64,
        "float64" | "double" => DataType::Float64,
        "boolean" | "bool" => DataType::Boolean,
        "date" | "date32" => DataType::Date32,
        _ => return None,
    })
}

/// Normalizes a code-table key: surrounding and inner white space (including the
/// full-width space U+3000) is removed, because published lists write "丰 县" for "丰县".
pub fn normalize_key(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Quotes an SQL identifier (any characters) for DataFusion.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 64
}

fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} must start with https:// (every port is mutual TLS)"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once("]:")
            .ok_or_else(|| format!("{url:?} needs a port"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{url:?} needs a port"))?;
        (h.to_string(), p)
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{url:?} has a bad port"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} has a bad host"));
    }
    Ok(Endpoint {
        url: format!("https://{rest}"),
        host,
        port,
    })
}

/// Resolves `p` relative to the directory of the file `base`.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn read_file(path: &Path, pr: &mut Problems) -> Result<String, Problems> {
    std::fs::read_to_string(path).map_err(|e| {
        pr.add(path, "", format!("cannot read: {e}"));
        std::mem::take(pr)
    })
}

fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    pr: &mut Problems,
) -> Result<T, Problems> {
    toml::from_str(text).map_err(|e| {
        let key = e
            .span()
            .map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                format!("line {line}")
            })
            .unwrap_or_default();
        pr.add(path, key, e.message().to_string());
        std::mem::take(pr)
    })
}

fn read_code_file(
    path: &Path,
    key_col: &str,
    code_col: &str,
) -> Result<Vec<(String, String)>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use arrow::array::Array;
    let mut rdr = arrow::csv::reader::Format::default().with_header(true);
    rdr = rdr.with_delimiter(b',');
    let (schema, _) = rdr
        .infer_schema(&file, Some(0))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let text_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let ki = text_schema
        .index_of(key_col)
        .map_err(|_| format!("{} has no column {key_col:?}", path.display()))?;
    let ci = text_schema
        .index_of(code_col)
        .map_err(|_| format!("{} has no column {code_col:?}", path.display()))?;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reader = arrow::csv::ReaderBuilder::new(text_schema)
        .with_header(true)
        .build(file)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("{}: {e}", path.display()))?;
        let k = arrow::array::cast::as_string_array(batch.column(ki));
        let c = arrow::array::cast::as_string_array(batch.column(ci));
        for i in 0..batch.num_rows() {
            if k.is_valid(i) && c.is_valid(i) {
                out.push((k.value(i).to_string(), c.value(i).to_string()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const REGION: &str = r#"
region = "yrd"
ca = "ca.crt"
[[members]]
name = "hefei"
kind = "city"
endpoint = "https://127.0.0.1:7000"
serves = ["census"]
[[members]]
name = "coordination"
kind = "office"
[[datasets]]
name = "census"
fields = [ { name = "county_code", type = "utf8" }, { name = "pop", type = "int64" } ]
"#;

    #[test]
    fn unknown_keys_are_rejected_with_their_name_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", "x");
        let p = write(
            dir.path(),
            "region.toml",
            &REGION.replace("kind = \"office\"", "kind = \"office\"\ncolour = \"red\""),
        );
        let e = Region::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.contains("line 12"), "{e}");
    }

    #[test]
    fn resilience_settings_are_checked_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", "x");
        let p = write(
            dir.path(),
            "region.toml",
            &REGION.replace(
                "name = \"census\"\n",
                "name = \"census\"\ncache_stale_for = \"1h\"\n",
            ),
        );
        let e = Region::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("datasets[0].cache_stale_for: needs cache_fresh_for"),
            "{e}"
        );
        let p = write(
            dir.path(),
            "region.toml",
            &REGION.replace(
                "name = \"census\"\n",
                "name = \"census\"\ncache_fresh_for = \"0s\"\n",
            ),
        );
        let e = Region::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("datasets[0].cache_fresh_for: must be greater than zero"),
            "{e}"
        );

        write(dir.path(), "region.toml", REGION);
        let p = write(
            dir.path(),
            "hefei.toml",
            r#"
member = "hefei"
region = "region.toml"
listen = "127.0.0.1:7000"
cert = "missing.crt"
key = "missing.key"
[limits]
max_concurrent_queries = 4
breaker_failures = 0
breaker_open_for = "soon"
retries = 9
[[admission]]
class = "town"
[[admission]]
class = "county"
reserved = 3
max_concurrent = 2
[[admission]]
class = "city"
reserved = 2
rate_per_second = -1
[[admission]]
class = "office"
burst = 5
[[admission]]
class = "city"
"#,
        );
        let e = MemberConfig::load(&p).unwrap_err().to_string();
        for want in [
            "limits.breaker_failures: must be at least 1",
            "limits.breaker_open_for: \"soon\" is not a duration",
            "limits.retries: 9 is more than 3",
            "admission[0].class: \"town\" is not a principal class",
            "admission[1].max_concurrent: 2 must be at least 1 and at least the 3 reserved",
            "admission[2].rate_per_second: -1 must be a positive number",
            "admission[3].burst: needs rate_per_second",
            "admission[4].class: city is listed twice",
            "admission: the classes reserve 5 slots, more than limits.max_concurrent_queries (4)",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn http_telemetry_and_services_are_checked_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", "x");
        let p = write(
            dir.path(),
            "region.toml",
            &format!(
                "{REGION}\n[[services]]\nname = \"Near\"\ncallers = []\nsql = \" \"\n\
                 purpose = \":x\"\nparams = [{{ name = \"n\", type = \"decimal\" }}, \
                 {{ name = \"n\", type = \"int64\" }}]\n"
            ),
        );
        let e = Region::load(&p).unwrap_err().to_string();
        for want in [
            "services[0].name: \"Near\" is not a valid service name",
            "services[0].callers: names no caller",
            "services[0].sql: is empty",
            "services[0].purpose: the stated purpose has no code",
            "services[0].params[0].type: unknown type \"decimal\"",
            "services[0].params[1].name: parameter \"n\" is declared twice",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        write(dir.path(), "region.toml", REGION);
        let p = write(
            dir.path(),
            "hefei.toml",
            r#"
member = "hefei"
region = "region.toml"
listen = "127.0.0.1:7000"
cert = "missing.crt"
key = "missing.key"
[http]
listen = "0.0.0.0:8000"
tls = false
[telemetry]
otlp_endpoint = "collector:4317"
"#,
        );
        let e = MemberConfig::load(&p).unwrap_err().to_string();
        for want in [
            "http.tls: plain HTTP acts as this member for every caller, so it may listen on a loopback address only, not 0.0.0.0:8000",
            "telemetry.otlp_endpoint: \"collector:4317\" is not an http:// or https:// URL",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn member_problems_are_all_reported_with_keys() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", "x");
        write(dir.path(), "region.toml", REGION);
        let p = write(
            dir.path(),
            "hefei.toml",
            r#"
member = "hefei"
region = "region.toml"
listen = "127.0.0.1:7000"
cert = "missing.crt"
key = "missing.key"
[limits]
default_timeout = "soon"
[[sources]]
name = "census"
format = "xlsx"
path = "nope.csv"
[[mappings]]
dataset = "census"
source = "census"
fields = { county_code = { column = "code", code_table = "nope" }, extra = "1" }
[[access]]
principals = ["fedgate://yrd/town/*"]
datasets = ["*"]
level = "rows"
"#,
        );
        let e = MemberConfig::load(&p).unwrap_err().to_string();
        for want in [
            "cert: ",
            "missing.crt does not exist",
            "limits.default_timeout",
            "sources[0].format: unknown format \"xlsx\"",
            "mappings[0].fields.extra: dataset census has no field \"extra\"",
            "mappings[0].fields.county_code: unknown code table \"nope\"",
            "mappings[0].fields.pop: canonical field \"pop\" is not mapped",
            "access[0].principals",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn access_rule_problems_name_the_rule_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", "x");
        write(dir.path(), "region.toml", REGION);
        let p = write(
            dir.path(),
            "hefei.toml",
            r#"
member = "hefei"
region = "region.toml"
listen = "127.0.0.1:7000"
cert = "ca.crt"
key = "ca.crt"
[[sources]]
name = "census"
format = "csv"
path = "ca.crt"
[[mappings]]
dataset = "census"
source = "census"
fields = { county_code = "code", pop = "pop" }
[[access]]
principals = ["fedgate://yrd/*"]
datasets = ["census"]
level = "masked"
fields = { pop = "phone", county_code = "blur", town = "deny" }
[[access]]
principals = ["fedgate://yrd/*"]
datasets = ["census"]
level = "aggregate"
min_group = 1
dimensions = ["county", "pop"]
[[access]]
principals = ["fedgate://yrd/*"]
datasets = ["census"]
level = "aggregate"
[[access]]
principals = ["fedgate://yrd/*"]
datasets = ["census"]
level = "verify"
purposes = ["a b"]
[[access]]
principals = ["fedgate://yrd/*"]
datasets = ["census"]
level = "rows"
min_group = 5
fields = { county_code = "hmac" }
[[access]]
principals = ["fedgate://yrd/*"]
datasets = ["census"]
level = "share"
"#,
        );
        let e = MemberConfig::load(&p).unwrap_err().to_string();
        for want in [
            "access[0].fields.pop: mask phone works on text, but pop is Int64",
            "access[0].fields.county_code: unknown mask \"blur\"",
            "access[0].fields.town: no dataset this rule covers here has a field \"town\"",
            "access[1].min_group: 1 would release single records",
            "access[1].dimensions: no dataset this rule covers here has a field \"county\"",
            "access[2].min_group: an aggregate rule needs min_group",
            "access[3].keys: a verify rule needs keys",
            "access[3].purposes: \"a b\" is not a purpose code",
            "access[4].min_group: min_group does not apply to level \"rows\"",
            "hmac_key: an access rule uses the hmac mask",
            "access[5].level: unknown level \"share\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn endpoints_and_keys_parse() {
        assert_eq!(parse_endpoint("https://127.0.0.1:7001").unwrap().port, 7001);
        assert_eq!(parse_endpoint("https://[::1]:7001").unwrap().host, "::1");
        assert!(parse_endpoint("http://127.0.0.1:7001").is_err());
        assert!(parse_endpoint("https://127.0.0.1").is_err());
        assert_eq!(normalize_key(" 丰 县\u{3000}"), "丰县");
    }
}
