//! Configuration in two phases: [`raw`] mirrors the TOML files; the other modules
//! validate them once into typed values (parsed identities, endpoints, Arrow types,
//! durations, compiled access rules), collecting every problem with its file and key
//! ([`problems`]). The region file becomes a [`Region`] ([`region`]); a member file, read
//! with its region file, a [`MemberConfig`] ([`member`]) with its sources and mappings
//! ([`sources`]), limits ([`limits`]) and access rules ([`access`]). Configuration
//! imports no module that uses it.

pub mod access;
pub mod limits;
pub mod member;
pub mod problems;
pub mod raw;
pub mod region;
pub mod sources;

pub use limits::Limits;
pub use member::{HttpConfig, MemberConfig};
pub use problems::{Problem, Problems};
pub use region::{CanonicalField, Dataset, Endpoint, Member, Region, Service, ServiceParam};
pub use sources::{
    CodeTable, Database, DatabaseKind, DatabaseTls, Dialect, FieldMapping, Mapping, Secret, Source,
    SourceFormat, SourceKind,
};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// The implicit column of every canonical dataset naming the answering member.
pub const MEMBER_COLUMN: &str = "member";

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

pub(crate) fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 64
}

/// The names declared in one list of a configuration file (datasets, a dataset's
/// fields, services, parameters, sources, code tables, databases): each must be a valid
/// name and be declared once. Every list checks its names through this, so every list
/// words its problems the same way.
pub(crate) struct Declared {
    what: &'static str,
    seen: BTreeSet<String>,
}

impl Declared {
    /// An empty list of `what`s ("dataset", "field", ...).
    pub(crate) fn new(what: &'static str) -> Declared {
        Declared {
            what,
            seen: BTreeSet::new(),
        }
    }

    /// Checks the name at `key` (the key of the entry; the problem is reported at its
    /// `.name`) and remembers it. True when the name is valid and new.
    pub(crate) fn check(&mut self, path: &Path, key: &str, name: &str, pr: &mut Problems) -> bool {
        let what = self.what;
        let mut ok = true;
        if !valid_name(name) {
            pr.add(
                path,
                format!("{key}.name"),
                format!("{name:?} is not a valid {what} name (lowercase letters, digits, '_')"),
            );
            ok = false;
        }
        if !self.seen.insert(name.to_string()) {
            pr.add(
                path,
                format!("{key}.name"),
                format!("{what} {name:?} is declared twice"),
            );
            ok = false;
        }
        ok
    }

    /// True when `name` was declared.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.seen.contains(name)
    }
}

/// Resolves `p` relative to the directory of the file `base`.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

pub(crate) fn read_file(path: &Path, pr: &mut Problems) -> Result<String, Problems> {
    std::fs::read_to_string(path).map_err(|e| {
        pr.add(path, "", format!("cannot read: {e}"));
        std::mem::take(pr)
    })
}

pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
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

#[cfg(test)]
mod tests {
    use super::region::parse_endpoint;
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
    fn member_locations_are_checked_for_their_ranges() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", "x");
        let with = |loc: &str| {
            REGION.replace(
                "serves = [\"census\"]\n",
                &format!("serves = [\"census\"]\nlocation = {loc}\n"),
            )
        };
        let p = write(
            dir.path(),
            "region.toml",
            &with("{ lon = 117.23, lat = 31.82 }"),
        );
        let r = Region::load(&p).unwrap();
        let hefei = r.member("hefei").unwrap();
        assert_eq!(
            hefei.location,
            Some(region::Location {
                lon: 117.23,
                lat: 31.82
            })
        );
        assert_eq!(r.member("coordination").unwrap().location, None);

        for (loc, want) in [
            (
                "{ lon = 181.0, lat = 31.8 }",
                "members[0].location: longitude 181 is not within -180 to 180 degrees",
            ),
            (
                "{ lon = 117.2, lat = -90.5 }",
                "members[0].location: latitude -90.5 is not within -90 to 90 degrees",
            ),
            (
                "{ lon = nan, lat = 31.8 }",
                "members[0].location: longitude NaN is not within",
            ),
            ("{ lon = 117.2 }", "missing field `lat`"),
            (
                "{ lon = 117.2, lat = 31.8, alt = 3.0 }",
                "unknown field `alt`",
            ),
        ] {
            let p = write(dir.path(), "region.toml", &with(loc));
            let e = Region::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{loc}: {e}");
        }
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
max_concurrent_subqueries = 2
breaker_failures = 0
breaker_open_for = "soon"
retries = 9
[lifecycle]
drain = "later"
probes = "nowhere"
max_connection_age = "10ms"
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
[[subquery_admission]]
class = "county"
reserved = 3
max_per_origin = 0
priority = "urgent"
[[admission]]
class = "county"
priority = "low"
"#,
        );
        let e = MemberConfig::load(&p).unwrap_err().to_string();
        for want in [
            "limits.breaker_failures: must be at least 1",
            "limits.breaker_open_for: \"soon\" is not a duration",
            "limits.retries: 9 is more than 3",
            "lifecycle.drain: \"later\" is not a duration",
            "lifecycle.probes: \"nowhere\" is not host:port",
            "lifecycle.max_connection_age: must be at least 1s",
            "admission[0].class: \"town\" is not a principal class",
            "admission[1].max_concurrent: 2 must be at least 1 and at least the 3 reserved",
            "admission[2].rate_per_second: -1 must be a positive number",
            "admission[3].burst: needs rate_per_second",
            "admission[4].class: city is listed twice",
            "admission: the classes reserve 5 slots, more than limits.max_concurrent_queries (4)",
            "subquery_admission[0].max_per_origin: 0 must be at least 1",
            "subquery_admission[0].priority: \"urgent\" is not a priority (normal or low)",
            "admission[5].priority: applies to sub-queries only",
            "subquery_admission: the classes reserve 3 slots, more than limits.max_concurrent_subqueries (2)",
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
    fn database_kinds_are_checked_with_their_keys() {
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
[[databases]]
name = "shop"
kind = "mysql"
host = "127.0.0.1"
dbname = "shop"
dialect = "mysql"
settings = { sql_mode = "ANSI" }
[[databases]]
name = "lake"
kind = "flight-sql"
host = "127.0.0.1"
dbname = "x"
dialect = "duckdb"
[[databases]]
name = "old"
kind = "oracle"
host = "127.0.0.1"
dbname = "x"
user = "u"
[[databases]]
name = "pg"
host = "127.0.0.1"
dbname = "x"
user = "u"
settings = { max_parallel_workers_per_gather = "0", Work_Mem = "64 MB", enable_hashjoin = "off" }
[[databases]]
name = "pg2"
host = "127.0.0.1"
dbname = "x"
user = "u"
settings = { "work mem" = "1", TimeZone = "Asia/Shanghai", search_path = "x", work_mem = "", WORK_MEM = "1MB", JIT = "off", jit = "on" }
[[sources]]
name = "census"
format = "postgres"
database = "shop"
table = "census"
[[mappings]]
dataset = "census"
source = "census"
fields = { county_code = "code", pop = "pop" }
"#,
        );
        let e = MemberConfig::load(&p).unwrap_err().to_string();
        for want in [
            "databases[0].user: a mysql database needs user",
            "databases[0].dialect: only flight-sql databases have a dialect",
            "databases[1].port: a flight-sql database needs port",
            "databases[1].tls: a flight-sql database is reached only with tls = \"verify-full\"",
            "databases[1].dbname: a flight-sql database is reached with TLS",
            "databases[1].dialect: unknown dialect \"duckdb\"",
            "databases[2].kind: unknown kind \"oracle\"",
            "databases[0].settings: settings are given to PostgreSQL sessions only; a mysql database",
            "databases[4].settings.work mem: only settings of how PostgreSQL plans",
            "databases[4].settings.TimeZone: only settings of how PostgreSQL plans",
            "databases[4].settings.search_path: only settings of how PostgreSQL plans",
            "databases[4].settings.work_mem: a setting's value must not be empty",
            "databases[4].settings.jit: set twice",
            "sources[0].format: database \"shop\" is a mysql database, so this source's format is \"mysql\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        assert!(!e.contains("databases[3]"), "{e}");
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
