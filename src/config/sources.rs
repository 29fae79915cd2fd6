//! A member's local data validated: sources (files and databases), database connections
//! and their secrets, code tables, and the mappings of local tables to canonical datasets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema};

use super::access::AccessRule;
use super::access::Mask;
use super::problems::Problems;
use super::quote_ident;
use super::raw::*;
use super::region::{Member, Region};
use super::resolve;
use super::{Declared, MEMBER_COLUMN, normalize_key};

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
    Table {
        /// The database's name in `[[databases]]`.
        database: String,
        /// Schema on the server (the database in MySQL; empty for none).
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

/// The SQL a database speaks, which decides what may be pushed into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL and the databases that speak its SQL (openGauss, KingbaseES, ...).
    Postgres,
    /// MySQL and MariaDB, and the engines that speak their SQL (TiDB, OceanBase, Doris,
    /// StarRocks).
    MySql,
    /// An engine built on DataFusion (another fedgate region, Ballista, InfluxDB 3).
    DataFusion,
}

impl Dialect {
    /// The dialect's name in configuration and messages.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::MySql => "mysql",
            Dialect::DataFusion => "datafusion",
        }
    }
}

/// The protocol a database is reached with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// PostgreSQL's wire protocol.
    Postgres,
    /// MySQL's wire protocol.
    MySql,
    /// Arrow Flight SQL, with the SQL dialect the engine speaks.
    FlightSql(Dialect),
}

impl DatabaseKind {
    /// The kind's name in configuration (a table source's `format`).
    pub fn name(self) -> &'static str {
        match self {
            DatabaseKind::Postgres => "postgres",
            DatabaseKind::MySql => "mysql",
            DatabaseKind::FlightSql(_) => "flight-sql",
        }
    }
}

/// A database behind a member.
#[derive(Debug, Clone)]
pub struct Database {
    /// Name used by sources.
    pub name: String,
    /// The protocol it is reached with.
    pub kind: DatabaseKind,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database name on the server (empty for Flight SQL).
    pub dbname: String,
    /// User (empty for Flight SQL, which authenticates with the client certificate).
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Secret,
    /// Transport security.
    pub tls: DatabaseTls,
    /// Most connections held open.
    pub pool_size: usize,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// PostgreSQL run-time settings each session starts with, by name (lower case),
    /// checked: only settings of how a statement is planned and resourced.
    pub settings: Vec<(String, String)>,
}

/// The PostgreSQL settings an operator may give a member's sessions: how the
/// database plans a statement and what it may spend on it, never what a statement
/// means. A setting outside the list could change a pushed statement's answer
/// silently (`search_path` can put another `substr` or `date` before PostgreSQL's
/// own, `IntervalStyle` and `bytea_output` change values read as text), so the list
/// allows rather than forbids. The gateway's own settings (UTC, ISO dates, exact
/// floats) are not on it either.
fn settable(name: &str) -> bool {
    const NAMES: [&str; 27] = [
        "work_mem",
        "hash_mem_multiplier",
        "temp_buffers",
        "effective_cache_size",
        "effective_io_concurrency",
        "random_page_cost",
        "seq_page_cost",
        "cpu_tuple_cost",
        "cpu_index_tuple_cost",
        "cpu_operator_cost",
        "parallel_setup_cost",
        "parallel_tuple_cost",
        "parallel_leader_participation",
        "min_parallel_table_scan_size",
        "min_parallel_index_scan_size",
        "max_parallel_workers_per_gather",
        "default_statistics_target",
        "from_collapse_limit",
        "join_collapse_limit",
        "cursor_tuple_fraction",
        "plan_cache_mode",
        "jit",
        "jit_above_cost",
        "jit_inline_above_cost",
        "jit_optimize_above_cost",
        "statement_timeout",
        "lock_timeout",
    ];
    const PREFIXES: [&str; 2] = ["enable_", "geqo"];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The `settings` of a `[[databases]]` entry, checked.
fn database_settings(
    path: &Path,
    key: &str,
    kind: DatabaseKind,
    settings: Option<&BTreeMap<String, String>>,
    pr: &mut Problems,
) -> Vec<(String, String)> {
    let Some(settings) = settings else {
        return Vec::new();
    };
    if !matches!(kind, DatabaseKind::Postgres) {
        pr.add(
            path,
            format!("{key}.settings"),
            format!(
                "settings are given to PostgreSQL sessions only; a {} database has none here",
                kind.name()
            ),
        );
        return Vec::new();
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in settings {
        let at = format!("{key}.settings.{name}");
        // PostgreSQL reads names without regard to case.
        let lower = name.to_ascii_lowercase();
        let plain = lower
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain || !settable(&lower) {
            pr.add(
                path,
                at,
                "only settings of how PostgreSQL plans a statement and what it may spend on it \
                 are given to the gateway's sessions (work_mem, max_parallel_workers_per_gather, \
                 enable_*, jit, statement_timeout, ...): another could change what a statement \
                 the gateway sends means",
            );
            continue;
        }
        if value.is_empty() || value.chars().any(char::is_control) {
            pr.add(
                path,
                at,
                "a setting's value must not be empty or hold control characters",
            );
            continue;
        }
        if out.iter().any(|(n, _)| *n == lower) {
            pr.add(
                path,
                at,
                "set twice (names are read without regard to case)",
            );
            continue;
        }
        out.push((lower, value.clone()));
    }
    out
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

/// Where a source's rows come from, with every mistake in its keys reported.
pub(super) fn validate_source_kind(
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
                misplaced(pr, "database", "only database sources have a database");
            }
            if s.table.is_some() {
                misplaced(pr, "table", "only database sources have a table");
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
        kind @ ("postgres" | "mysql" | "flight-sql") => {
            for (k, set) in [
                ("path", s.path.is_some()),
                ("delimiter", s.delimiter.is_some()),
            ] {
                if set {
                    misplaced(pr, k, "a database source reads a table, not a file");
                }
            }
            let Some(db) = &s.database else {
                misplaced(
                    pr,
                    "database",
                    "a database source needs database = NAME of a [[databases]] entry",
                );
                return None;
            };
            let declared = databases.iter().find(|d| &d.name == db);
            match declared {
                None => {
                    let known: Vec<&str> = databases.iter().map(|d| d.name.as_str()).collect();
                    pr.add(
                        path,
                        format!("{key}.database"),
                        format!("no database named {db:?} (declared: {known:?})"),
                    );
                }
                Some(d) if d.kind.name() != kind => pr.add(
                    path,
                    format!("{key}.format"),
                    format!(
                        "database {db:?} is a {} database, so this source's format is {:?}",
                        d.kind.name(),
                        d.kind.name()
                    ),
                ),
                Some(_) => {}
            }
            let Some(table) = &s.table else {
                misplaced(
                    pr,
                    "table",
                    "a database source needs table = \"schema.table\" or \"table\"",
                );
                return None;
            };
            // A bare table name is in PostgreSQL's `public` schema, in the MySQL
            // connection's own database, and in no schema at all in Flight SQL.
            let default_schema = match declared.map(|d| d.kind) {
                Some(DatabaseKind::MySql) => declared.map(|d| d.dbname.clone()).unwrap_or_default(),
                Some(DatabaseKind::FlightSql(_)) => String::new(),
                _ => "public".to_string(),
            };
            let (schema, table) = match table.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => (default_schema, table.clone()),
            };
            let bare_ok = kind == "flight-sql" && !table.contains('.');
            if (schema.is_empty() && !bare_ok) || table.is_empty() || table.contains('.') {
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
            Some(SourceKind::Table {
                database: db.clone(),
                schema,
                table,
            })
        }
        other => {
            pr.add(
                path,
                format!("{key}.format"),
                format!(
                    "unknown format {other:?}; use csv, parquet, postgres, mysql or flight-sql"
                ),
            );
            None
        }
    }
}

/// Validates the `[[databases]]` entries; passwords are read here, once.
pub(super) fn validate_databases(
    path: &Path,
    raw: &[RawDatabase],
    pr: &mut Problems,
) -> Vec<Database> {
    let mut out: Vec<Database> = Vec::new();
    let mut names = Declared::new("database");
    for (i, d) in raw.iter().enumerate() {
        let key = format!("databases[{i}]");
        names.check(path, &key, &d.name, pr);
        let kind = database_kind(path, &key, d, pr);
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
        if matches!(kind, DatabaseKind::FlightSql(_)) && matches!(tls, DatabaseTls::Disable) {
            pr.add(
                path,
                format!("{key}.tls"),
                "a flight-sql database is reached only with tls = \"verify-full\" (its client certificate is how the engine knows the member)",
            );
        }
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
        let settings = database_settings(path, &key, kind, d.settings.as_ref(), pr);
        let port = match (kind, d.port) {
            (_, Some(p)) => p,
            (DatabaseKind::Postgres, None) => 5432,
            (DatabaseKind::MySql, None) => 3306,
            (DatabaseKind::FlightSql(_), None) => {
                pr.add(
                    path,
                    format!("{key}.port"),
                    "a flight-sql database needs port = N (Flight SQL has no usual port)",
                );
                0
            }
        };
        out.push(Database {
            name: d.name.clone(),
            kind,
            host: d.host.clone(),
            port,
            dbname: d.dbname.clone().unwrap_or_default(),
            user: d.user.clone().unwrap_or_default(),
            password,
            tls,
            pool_size: pool_size.max(1),
            connect_timeout,
            settings,
        });
    }
    out
}

/// The kind of a `[[databases]]` entry, with the keys only some kinds have checked.
fn database_kind(path: &Path, key: &str, d: &RawDatabase, pr: &mut Problems) -> DatabaseKind {
    let kind = match d.kind.as_deref().unwrap_or("postgres") {
        "postgres" => DatabaseKind::Postgres,
        "mysql" => DatabaseKind::MySql,
        "flight-sql" => DatabaseKind::FlightSql(match d.dialect.as_deref() {
            None | Some("datafusion") => Dialect::DataFusion,
            Some("mysql") => Dialect::MySql,
            Some("postgres") => Dialect::Postgres,
            Some(other) => {
                pr.add(
                    path,
                    format!("{key}.dialect"),
                    format!("unknown dialect {other:?}; use datafusion, mysql or postgres"),
                );
                Dialect::DataFusion
            }
        }),
        other => {
            pr.add(
                path,
                format!("{key}.kind"),
                format!("unknown kind {other:?}; use postgres, mysql or flight-sql"),
            );
            DatabaseKind::Postgres
        }
    };
    if d.dialect.is_some() && !matches!(kind, DatabaseKind::FlightSql(_)) {
        pr.add(
            path,
            format!("{key}.dialect"),
            format!(
                "only flight-sql databases have a dialect; a {} database speaks its own",
                kind.name()
            ),
        );
    }
    if matches!(kind, DatabaseKind::FlightSql(_)) {
        for (k, set) in [
            ("dbname", d.dbname.is_some()),
            ("user", d.user.is_some()),
            ("password_file", d.password_file.is_some()),
            ("password_env", d.password_env.is_some()),
        ] {
            if set {
                pr.add(
                    path,
                    format!("{key}.{k}"),
                    "a flight-sql database is reached with TLS and a client certificate (ca, cert, key), not a database name, user or password",
                );
            }
        }
    } else {
        for (k, set) in [("dbname", d.dbname.is_some()), ("user", d.user.is_some())] {
            if !set {
                pr.add(
                    path,
                    format!("{key}.{k}"),
                    format!("a {} database needs {k} = \"...\"", kind.name()),
                );
            }
        }
    }
    kind
}

/// Reads a secret given either as a file (relative to the member file) or as an
/// environment variable, never both: the key it was given under and its bytes, or
/// `None` (with the problem recorded when one was given but cannot be read).
pub(super) fn read_secret(
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
pub(super) fn load_hmac_key(
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

pub(super) fn field_mapping(
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

pub(super) fn read_code_file(
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

/// Validates `[[sources]]`: names, and each source's kind against the declared
/// databases. Returns the sources and the names declared (also the invalid ones, so a
/// mapping of a misspelt source is not reported twice).
pub(super) fn validate_sources(
    path: &Path,
    raw: &[RawSource],
    databases: &[Database],
    pr: &mut Problems,
) -> (Vec<Source>, Declared) {
    let mut sources = Vec::new();
    let mut names = Declared::new("source");
    for (i, s) in raw.iter().enumerate() {
        let key = format!("sources[{i}]");
        names.check(path, &key, &s.name, pr);
        if let Some(kind) = validate_source_kind(path, &key, s, databases, pr) {
            sources.push(Source {
                name: s.name.clone(),
                kind,
            });
        }
    }
    (sources, names)
}

/// Validates `[[code_tables]]`: each read from its file and aliases, keys normalized.
pub(super) fn validate_code_tables(
    path: &Path,
    raw: &[RawCodeTable],
    pr: &mut Problems,
) -> Vec<CodeTable> {
    let mut code_tables = Vec::new();
    let mut names = Declared::new("code table");
    for (i, t) in raw.iter().enumerate() {
        let key = format!("code_tables[{i}]");
        names.check(path, &key, &t.name, pr);
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
    code_tables
}

/// Validates `[[mappings]]`: each maps every field of a canonical dataset from a
/// declared source, and together they map exactly the datasets the region file says
/// this member serves.
pub(super) fn validate_mappings(
    path: &Path,
    raw: &[RawMapping],
    region: &Region,
    member: &Member,
    source_names: &Declared,
    code_tables: &[CodeTable],
    pr: &mut Problems,
) -> Vec<Mapping> {
    let mut mappings = Vec::new();
    let mut mapped = std::collections::BTreeSet::new();
    for (i, m) in raw.iter().enumerate() {
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
            match field_mapping(rf, code_tables, &cf.data_type) {
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
    mappings
}
