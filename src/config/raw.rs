//! The serde mirror of the configuration files: what TOML says, before validation.
//!
//! Every struct rejects unknown keys, so a misspelt key is an error that names it
//! instead of a setting silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `region.toml`: the same file at every member.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    /// Region name, the first segment of every identity (`fedgate://<region>/...`).
    pub region: String,
    /// CA bundle (PEM) that all members' and clients' certificates chain to.
    pub ca: PathBuf,
    /// Certificate revocation lists issued by the region CA (PEM or DER): a
    /// certificate they name is refused everywhere, reloaded when the files change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crls: Vec<PathBuf>,
    /// Members and known clients.
    #[serde(default)]
    pub members: Vec<RawMember>,
    /// Canonical datasets.
    #[serde(default)]
    pub datasets: Vec<RawDataset>,
    /// Published services: named, parameterised queries for portals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<RawService>,
}

/// A published service: a named query over the canonical datasets whose parameters
/// are bound as typed values, never spliced into its text.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Name in `Federation.Invoke` and `POST /v1/services/{name}`.
    pub name: String,
    /// What it answers, for the people who call it.
    #[serde(default)]
    pub description: String,
    /// Principal patterns that may call it (`fedgate://yrd/county/*`).
    pub callers: Vec<String>,
    /// The canonical SQL, with `$name` placeholders for the parameters.
    pub sql: String,
    /// The purpose every call states (members' rules may grant access for it); a
    /// caller may add a case reference after ':'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Its parameters.
    #[serde(default)]
    pub params: Vec<RawParam>,
}

/// A parameter of a published service.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawParam {
    /// Name (`$name` in the SQL; the key in a JSON body).
    pub name: String,
    /// `utf8`, `int64`, `float64`, `boolean` or `date`.
    #[schemars(extend("enum" = ["utf8", "string", "text", "int64", "bigint", "float64", "double", "boolean", "bool", "date", "date32"]))]
    #[serde(rename = "type")]
    pub data_type: String,
    /// What to pass.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A region member: a gateway (with an endpoint) or a client-only identity.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMember {
    /// Short name, unique in the region.
    pub name: String,
    /// `city`, `county` or `office`.
    #[schemars(extend("enum" = ["city", "county", "office"]))]
    pub kind: String,
    /// Certificate identity; defaults to `fedgate://<region>/<kind>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `https://host:port` of its gateway; absent for client-only members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Canonical datasets its gateway serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serves: Vec<String>,
    /// Where the member is, for the map on the status board (and nothing else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<RawLocation>,
}

/// A point on the map, in degrees (WGS-84, or GCJ-02 as Chinese map services give
/// them: the few hundred metres between the two do not show on a regional map).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLocation {
    /// Longitude, -180 to 180 (east is positive).
    #[schemars(range(min = -180.0, max = 180.0))]
    pub lon: f64,
    /// Latitude, -90 to 90 (north is positive).
    #[schemars(range(min = -90.0, max = 90.0))]
    pub lat: f64,
}

/// A canonical dataset of the region.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDataset {
    /// Table name in SQL.
    pub name: String,
    /// What the dataset holds.
    #[serde(default)]
    pub description: String,
    /// Its fields (the implicit `member` column is added by fedgate).
    pub fields: Vec<RawField>,
    /// How long coordinators may reuse a member's answer for the same caller and
    /// sub-query, e.g. `"5m"` (no caching without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_fresh_for: Option<String>,
    /// How long after that a cached answer may stand in for a member that fails
    /// (marked stale in the summary), e.g. `"1h"`; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_stale_for: Option<String>,
}

/// A field of a canonical dataset.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawField {
    /// Column name.
    pub name: String,
    /// `utf8`, `int64`, `float64`, `boolean` or `date`.
    #[schemars(extend("enum" = ["utf8", "string", "text", "int64", "bigint", "float64", "double", "boolean", "bool", "date", "date32"]))]
    #[serde(rename = "type")]
    pub data_type: String,
    /// What the field means.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Unit of measure, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

/// One member's own file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMemberConfig {
    /// This gateway's member name in the region file.
    pub member: String,
    /// Path of the region file (relative to this file).
    pub region: PathBuf,
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// This gateway's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The HTTP port: status board, metrics, JSON API (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<RawHttp>,
    /// The PostgreSQL wire protocol port for SQL clients and BI tools (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<RawPostgres>,
    /// Trace export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<RawTelemetry>,
    /// Probes, draining on SIGTERM and connection age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<RawLifecycle>,
    /// Limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// Admission of client queries per principal class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admission: Vec<RawAdmission>,
    /// Admission of sub-queries other gateways send here, per class of their origin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subquery_admission: Vec<RawAdmission>,
    /// Databases (PostgreSQL or a database speaking its protocol) that sources read.
    #[serde(default)]
    pub databases: Vec<RawDatabase>,
    /// Local data sources.
    #[serde(default)]
    pub sources: Vec<RawSource>,
    /// Code tables used by mappings.
    #[serde(default)]
    pub code_tables: Vec<RawCodeTable>,
    /// Mappings from local sources onto canonical datasets.
    #[serde(default)]
    pub mappings: Vec<RawMapping>,
    /// Access rules for this member's data.
    #[serde(default)]
    pub access: Vec<RawAccessRule>,
    /// File holding the secret key of `hmac` masks (at least 16 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_key: Option<PathBuf>,
    /// Environment variable holding the secret key of `hmac` masks instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_key_env: Option<String>,
    /// The audit log (default: `audit/<member>.log` beside this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<PathBuf>,
    /// Audit records also shipped as JSON lines, for a SIEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_export: Option<RawAuditExport>,
}

/// Limits of a gateway.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Deadline for queries that state none, e.g. `"30s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<String>,
    /// Longest deadline a caller may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout: Option<String>,
    /// Queries this gateway coordinates at once; more are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_queries: Option<usize>,
    /// Sub-queries this gateway answers for peers at once; more are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_subqueries: Option<usize>,
    /// Most gateway-to-gateway hops a sub-query may have taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hops: Option<u32>,
    /// Consecutive failures of a member that open its circuit breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_failures: Option<u32>,
    /// How long an open breaker refuses before a health probe, e.g. `"10s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_open_for: Option<String>,
    /// Retries of a sub-query whose member could not be reached (0 to 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Memory one query may use at this coordinator for merging, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_memory_bytes: Option<u64>,
    /// Most rows one answer may have (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// Bytes of member answers this gateway keeps cached as coordinator (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_cache_bytes: Option<u64>,
}

/// What one principal class may use of a gateway's query slots.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    #[schemars(extend("enum" = ["office", "city", "county"]))]
    /// `office`, `city` or `county`.
    pub class: String,
    /// Slots only this class may use.
    #[serde(default)]
    pub reserved: usize,
    /// Most queries this class may run here at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// Most queries one origin (principal) of this class may run here at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_origin: Option<usize>,
    /// `normal` or `low`: sub-queries of a `low` class run on the owner's
    /// low-priority threads (`[[subquery_admission]]` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["normal", "low"]))]
    pub priority: Option<String>,
    /// Sustained queries per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Queries allowed at once above the rate (default: the rate, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<f64>,
}

/// A local data source: a file, or a table in one of the member's databases.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Name used by mappings.
    pub name: String,
    /// `csv`, `parquet`, or the kind of the database holding the table: `postgres`,
    #[schemars(extend("enum" = ["csv", "parquet", "postgres", "mysql", "flight-sql"]))]
    /// `mysql` or `flight-sql`.
    pub format: String,
    /// File path (relative to the member file), for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// CSV field delimiter, one character; default `,`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// The database (a `[[databases]]` name), for a table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The table, `schema.table` or `table` (schema `public` in PostgreSQL, the
    /// connection's database in MySQL, none in Flight SQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

/// A database that sources read.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// Name used by sources.
    pub name: String,
    /// `postgres` (default; PostgreSQL and the databases speaking its protocol),
    /// `mysql` (MySQL, MariaDB and the databases speaking its protocol) or `flight-sql`
    /// (an engine serving Arrow Flight SQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["postgres", "mysql", "flight-sql"]))]
    pub kind: Option<String>,
    /// The SQL a `flight-sql` engine speaks: `datafusion` (default), `mysql` or
    /// `postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["datafusion", "mysql", "postgres"]))]
    pub dialect: Option<String>,
    /// Host name or IP address.
    pub host: String,
    /// Port; default 5432 (postgres) or 3306 (mysql); required for flight-sql.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Database name on the server (postgres and mysql).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
    /// User to connect as (postgres and mysql).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// File holding the password (relative to the member file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `disable` (default) or `verify-full` (TLS, server certificate checked against
    /// `ca` and the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["disable", "verify-full"]))]
    pub tls: Option<String>,
    /// CA bundle (PEM) that signed the server's certificate, for `verify-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), when the server asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Most connections held open; default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// How long to wait for a connection, e.g. `"5s"`; default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// PostgreSQL run-time settings every session of this gateway starts with, e.g.
    /// `{ max_parallel_workers_per_gather = "0" }` (PostgreSQL databases only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<BTreeMap<String, String>>,
}

/// A code table: local names to canonical codes.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCodeTable {
    /// Name used by mappings.
    pub name: String,
    /// CSV file with a key column and a code column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Key column in the file; default `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_column: Option<String>,
    /// Code column in the file; default `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_column: Option<String>,
    /// Extra keys (misspellings, abolished names) and the code they stand for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, String>,
}

/// How one local source becomes (part of) a canonical dataset.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    /// Canonical dataset.
    pub dataset: String,
    /// Local source.
    pub source: String,
    /// Optional SQL predicate over local columns selecting the rows that belong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Canonical field name to its definition.
    pub fields: BTreeMap<String, RawFieldMapping>,
}

/// A field definition: an SQL expression over local columns, or a table.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawFieldMapping {
    /// An SQL expression over local columns.
    Expr(String),
    /// A column or expression with a conversion.
    Detailed(RawFieldDetail),
}

/// A field definition with a conversion.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFieldDetail {
    /// A local column, taken as is (any characters; quoting is done for you).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// An SQL expression over local columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expr: Option<String>,
    /// Translate the value through this code table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_table: Option<String>,
    /// Parse the value as a date with this chrono format, e.g. `"%Y/%m/%d"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_format: Option<String>,
}

impl<'de> Deserialize<'de> for RawFieldMapping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Hand-written rather than `untagged` so that a bad key inside the table form
        // is reported as such, not as "did not match any variant".
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawFieldMapping;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "an SQL expression string or a table with column/expr/code_table/date_format",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(RawFieldMapping::Expr(s.to_string()))
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                m: M,
            ) -> Result<Self::Value, M::Error> {
                RawFieldDetail::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(RawFieldMapping::Detailed)
            }
        }
        d.deserialize_any(V)
    }
}

/// An access rule at the data owner.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAccessRule {
    /// Principal patterns: an identity, `fedgate://yrd/county/*`, or `*`.
    pub principals: Vec<String>,
    /// Canonical datasets, or `*`.
    pub datasets: Vec<String>,
    #[schemars(extend("enum" = ["rows", "masked", "aggregate", "verify", "deny"]))]
    /// `rows`, `masked`, `aggregate`, `verify` or `deny`.
    pub level: String,
    /// Field masks: field name to `id_keep_ends`, `id_region`, `phone`, `surname`,
    /// `hmac` or `deny`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// `aggregate`: the smallest group released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_group: Option<u64>,
    /// `aggregate`: fields answers may be grouped and filtered by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<String>,
    /// `verify`: fields every verification must state exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Purpose codes, one of which a query must state for this rule to apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<String>,
    /// Patterns of the gateways through which this rule accepts its principals (the
    /// coordinator that forwards the sub-query); empty: any gateway entitled to speak
    /// for the origin. A query asked at this member's own gateway always qualifies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
    /// An emergency rule: it applies only to a query asked under an incident declared
    /// by one of these declarers and in force, to the datasets and rows the
    /// declaration's scope names. Without it the rule applies in peacetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<RawIncidentRule>,
}

/// `incident = { declarers = [...], max_hours = N }` of an emergency access rule.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawIncidentRule {
    /// Patterns of the identities whose declarations this member honours.
    pub declarers: Vec<String>,
    /// The longest window (from start to end) honoured, in hours; a declaration with a
    /// longer one opens nothing here (a renewal can extend it in steps).
    #[schemars(range(min = 1, max = 168))]
    pub max_hours: u64,
}

/// `[http]`: the gateway's HTTP port.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// Mutual TLS with the gateway's certificate, callers identified by theirs
    /// (default). `false` serves plain HTTP, allowed on loopback addresses only, and
    /// every caller acts as this member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}

/// `[postgres]`: the gateway's PostgreSQL wire protocol port. Always TLS with a client
/// certificate from the region CA: the certificate is the caller's identity.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// The most connections the port keeps open at once (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
}

/// `[lifecycle]`: how the gateway tells orchestrators it is ready, how it stops, and
/// how long a connection may live.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    /// After SIGTERM the gateway reports itself not ready at once and keeps serving
    /// for this long, so that load balancers stop sending, then stops accepting, lets
    /// in-flight queries finish and exits, e.g. `"10s"` (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<String>,
    /// A plain-HTTP listener, `host:port`, answering only `GET /livez` and
    /// `GET /readyz` (no data, no identity), for orchestrators that cannot present a
    /// client certificate (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<String>,
    /// The longest a caller's or peer's connection is kept, e.g. `"30m"` (the
    /// default); then it is asked to reconnect, which checks its certificate, and
    /// revocation, again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_age: Option<String>,
}

/// `[audit_export]`: the audit records as JSON lines (schema `fedgate.audit.v1`) in a
/// file a log shipper forwards.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAuditExport {
    /// The JSON-lines file (relative to this file); a cursor is kept beside it.
    pub path: PathBuf,
}

/// `[telemetry]`: where spans go.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// The JSON Schema of `region.toml` (draft 2020-12), generated from [`RawRegion`], for
/// editors (`fedgate config schema region`).
pub fn region_schema() -> serde_json::Value {
    let mut s = schemars::schema_for!(RawRegion).to_value();
    s["title"] = "fedgate region file (region.toml)".into();
    s
}

/// The JSON Schema of a member file (draft 2020-12), generated from
/// [`RawMemberConfig`] (`fedgate config schema member`).
pub fn member_schema() -> serde_json::Value {
    let mut s = schemars::schema_for!(RawMemberConfig).to_value();
    s["title"] = "fedgate member file (<member>.toml)".into();
    s
}
