//! The bundled sample region: `federation-configs/demo`, materialized with fresh
//! certificates into a folder where each member can run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::raw::{RawMemberConfig, RawRegion};
use crate::error::{Error, Result};
use crate::trust::identity::{Kind, Principal};
use crate::trust::pki::{self, Ca};

/// The example queries `fedgate demo` runs, with what each shows.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "Fever-clinic hospitals per member (Hefei serves no list and is not asked)",
        "SELECT member, count(*) AS hospitals FROM fever_clinics GROUP BY member ORDER BY member",
    ),
    (
        "Counties with the most fever-clinic hospitals across the delta (join with divisions)",
        "SELECT f.county_code, d.name AS county, count(*) AS hospitals \
         FROM fever_clinics f JOIN divisions d ON f.county_code = d.code \
         GROUP BY f.county_code, d.name ORDER BY hospitals DESC, f.county_code LIMIT 8",
    ),
    (
        "Share of residents aged 65 and over, highest counties",
        "SELECT member, county_code, county_name, share_65_plus_pct \
         FROM census ORDER BY share_65_plus_pct DESC, county_code LIMIT 8",
    ),
    (
        "Population and residents aged 65+ per member",
        "SELECT member, sum(pop_total) AS population, \
         CAST(round(sum(pop_total * share_65_plus_pct / 100)) AS BIGINT) AS aged_65_plus \
         FROM census GROUP BY member ORDER BY population DESC",
    ),
    (
        "Pipelines in service under two districts, across departments and cities \
         (Hangzhou: three departments' databases, PostgreSQL and MariaDB; Suzhou: its data lake over Arrow Flight SQL)",
        "SELECT member, county_code, department, count(*) AS sections, \
         round(sum(length_m) / 1000, 1) AS km FROM underground_pipelines \
         WHERE county_code IN ('330106', '320508') AND in_service \
         GROUP BY member, county_code, department ORDER BY member, county_code, department",
    ),
    (
        "Only Hangzhou is asked (the filter on member prunes the others)",
        "SELECT county_name, pop_total FROM census WHERE member = 'hangzhou' \
         ORDER BY pop_total DESC LIMIT 3",
    ),
];

/// One example of the data owners' access rules at work.
pub struct AccessExample {
    /// What it shows.
    pub title: &'static str,
    /// Whose certificate the query is sent with (a member or client name).
    pub caller: &'static str,
    /// The gateway it is sent to.
    pub gateway: &'static str,
    /// The purpose stated, or empty.
    pub purpose: &'static str,
    /// The SQL.
    pub sql: &'static str,
    /// Whether the owners refuse it.
    pub refused: bool,
}

/// The access examples `fedgate demo` runs: enrollment (generated people) is served by
/// Hangzhou and Suzhou, whose rules differ by caller and purpose.
pub const ACCESS_EXAMPLES: &[AccessExample] = &[
    AccessExample {
        title: "aggregate(k=10) for the regional office: enrolled people per county and scheme",
        caller: "coordination",
        gateway: "coordination",
        purpose: "",
        sql: "SELECT member, county_code, scheme, count(*) AS people FROM enrollment \
              GROUP BY member, county_code, scheme ORDER BY member, county_code, scheme LIMIT 8",
        refused: false,
    },
    AccessExample {
        title: "aggregate(k=10): the office cannot read records",
        caller: "coordination",
        gateway: "coordination",
        purpose: "",
        sql: "SELECT name, phone FROM enrollment LIMIT 3",
        refused: true,
    },
    AccessExample {
        title: "masked for Anji handling an insurance transfer (purpose required)",
        caller: "anji",
        gateway: "anji",
        purpose: "insurance-transfer: AJ-2026-0117",
        sql: "SELECT member, id_number, name, phone, county_code, scheme FROM enrollment \
              WHERE name LIKE '欧阳%' ORDER BY member, id_number LIMIT 4",
        refused: false,
    },
    AccessExample {
        title: "masked: a filter on the hidden digits finds nothing (it sees the masked value)",
        caller: "anji",
        gateway: "anji",
        purpose: "insurance-transfer: AJ-2026-0117",
        sql: "SELECT count(*) AS matches FROM enrollment WHERE id_number LIKE '3301061987%'",
        refused: false,
    },
    AccessExample {
        title: "denied: the same caller without a purpose",
        caller: "anji",
        gateway: "anji",
        purpose: "",
        sql: "SELECT count(*) FROM enrollment",
        refused: true,
    },
    AccessExample {
        title: "verify for another city: is this ID enrolled, and where? (1 = yes)",
        caller: "hefei",
        gateway: "hefei",
        purpose: "",
        sql: "SELECT member, count(*) AS enrolled FROM enrollment \
              WHERE id_number = '330106198703151232' GROUP BY member",
        refused: false,
    },
    AccessExample {
        title: "verify: the record itself is refused",
        caller: "hefei",
        gateway: "hefei",
        purpose: "",
        sql: "SELECT name, phone FROM enrollment WHERE id_number = '330106198703151232'",
        refused: true,
    },
    AccessExample {
        title: "keyed hashes for a duplicate check: people enrolled in both cities, IDs unreadable",
        caller: "shanghai",
        gateway: "shanghai",
        purpose: "duplicate-check: SH-2026-0042",
        sql: "SELECT h.id_number AS hashed_id, h.county_code AS hangzhou_county, s.county_code AS suzhou_county \
              FROM enrollment h JOIN enrollment s ON h.id_number = s.id_number \
              WHERE h.member = 'hangzhou' AND s.member = 'suzhou' ORDER BY hashed_id LIMIT 3",
        refused: false,
    },
];

/// Where the sample region's templates live in a source checkout.
pub fn default_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("federation-configs/demo")
}

/// A materialized region.
#[derive(Debug, Clone)]
pub struct Materialized {
    /// The folder.
    pub dir: PathBuf,
    /// `region.toml` in it.
    pub region: PathBuf,
    /// Member gateways: name, config file, endpoint.
    pub gateways: Vec<(String, PathBuf, String)>,
    /// The CA certificate.
    pub ca: PathBuf,
    /// Offices' identities, which their people and tools query with: name,
    /// certificate, key. An office with a gateway shares the identity with it.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Copies the templates in `src` to `dst`, giving each gateway the port `port(name,
/// template_port)` on 127.0.0.1 (and its HTTP port `port("<name>/http", template)`), and creates a CA with a certificate for every member.
/// Members' databases keep their template address and get a random password: with no
/// server there, the datasets they hold are reported unavailable.
pub fn materialize(
    src: &Path,
    dst: &Path,
    port: &dyn Fn(&str, u16) -> u16,
) -> Result<Materialized> {
    materialize_with_database(src, dst, port, &DatabaseServers::default())
}

/// The local database servers a materialized region's databases are on: each kind's
/// port and password (none: the template's address and a random password).
#[derive(Debug, Clone, Default)]
pub struct DatabaseServers {
    /// The PostgreSQL server, loaded by [`load_databases`].
    pub postgres: Option<(u16, String)>,
    /// The MariaDB server, loaded by [`load_mysql_databases`].
    pub mysql: Option<(u16, String)>,
}

/// The engines the sample region's members read over Arrow Flight SQL, each a folder
/// of templates under the region's (`<engine>/region.toml` and a member file): Suzhou's
/// data lake, an analytical engine as a Doris or StarRocks cluster would be. The one
/// Flight SQL server this machine has is fedgate, so the lake is a gateway of a
/// region of its own, with its own CA; Suzhou's gateway reads it with a certificate
/// of that CA, as it would present to the engine.
pub const ENGINES: &[&str] = &["lake"];

/// Every gateway the materialized sample region runs, as (name, template port): the
/// region's members that have an endpoint, in region order, then the engines' (named
/// `<engine>/<member>`). A port base numbers them in this order, so the members' ports
/// stay where they were; [`Materialized::gateways`] starts the engines first.
pub fn gateway_templates(src: &Path) -> Result<Vec<(String, u16)>> {
    let mut out = Vec::new();
    let mut add = |dir: &Path, prefix: &str| -> Result<()> {
        let path = dir.join("region.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        let region: RawRegion =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        for m in &region.members {
            if let Some(ep) = &m.endpoint {
                out.push((format!("{prefix}{}", m.name), template_port(ep)));
            }
        }
        Ok(())
    };
    add(src, "")?;
    for engine in ENGINES {
        let dir = src.join(engine);
        if dir.join("region.toml").is_file() {
            add(&dir, &format!("{engine}/"))?;
        }
    }
    Ok(out)
}

/// The port of a template endpoint or address (`https://127.0.0.1:7101`), 0 if none.
fn template_port(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Like [`materialize`], with the members' databases on the local `servers`. The
/// engines of [`ENGINES`] are materialized into their folders under `dst` first, and
/// their gateways come first in [`Materialized::gateways`]: a Flight SQL database of a
/// member whose template port is an engine gateway's template port is given that
/// gateway's port.
pub fn materialize_with_database(
    src: &Path,
    dst: &Path,
    port: &dyn Fn(&str, u16) -> u16,
    servers: &DatabaseServers,
) -> Result<Materialized> {
    let mut engines = Vec::new();
    let engine_ports = std::cell::RefCell::new(BTreeMap::new());
    for engine in ENGINES {
        let dir = src.join(engine);
        if !dir.join("region.toml").is_file() {
            continue;
        }
        let prefix = format!("{engine}/");
        let m = materialize_region(
            &dir,
            &dst.join(engine),
            &|name, template| {
                let p = port(&format!("{prefix}{name}"), template);
                if !name.ends_with("/http") && !name.ends_with("/postgres") {
                    engine_ports.borrow_mut().insert(template, p);
                }
                p
            },
            servers,
            &BTreeMap::new(),
        )?;
        engines.extend(
            m.gateways
                .into_iter()
                .map(|(n, path, ep)| (format!("{prefix}{n}"), path, ep)),
        );
    }
    let mut region = materialize_region(src, dst, port, servers, &engine_ports.into_inner())?;
    engines.append(&mut region.gateways);
    region.gateways = engines;
    Ok(region)
}

/// Materializes one region's templates (see [`materialize_with_database`]).
fn materialize_region(
    src: &Path,
    dst: &Path,
    port: &dyn Fn(&str, u16) -> u16,
    servers: &DatabaseServers,
    engine_ports: &BTreeMap<u16, u16>,
) -> Result<Materialized> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Config(format!("{what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(dst).map_err(|e| io("creating", dst, e))?;
    let region_src = src.join("region.toml");
    let text = std::fs::read_to_string(&region_src).map_err(|e| io("reading", &region_src, e))?;
    let mut region: RawRegion = toml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", region_src.display())))?;
    let port_of = port;
    let mut ports = BTreeMap::new();
    for m in &mut region.members {
        if let Some(ep) = &m.endpoint {
            let p = port(&m.name, template_port(ep));
            m.endpoint = Some(format!("https://127.0.0.1:{p}"));
            ports.insert(m.name.clone(), p);
        }
    }
    let region_dst = dst.join("region.toml");
    write(
        &region_dst,
        &toml::to_string_pretty(&region).map_err(|e| Error::Internal(e.to_string()))?,
    )?;

    let mut gateways = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| io("reading", src, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && p.file_name() != Some("region.toml".as_ref())
        })
        .collect();
    entries.sort();
    for p in entries {
        let text = std::fs::read_to_string(&p).map_err(|e| io("reading", &p, e))?;
        let mut m: RawMemberConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        let port = *ports.get(&m.member).ok_or_else(|| {
            Error::Config(format!(
                "{}: member {} has no endpoint",
                p.display(),
                m.member
            ))
        })?;
        m.listen = format!("127.0.0.1:{port}");
        if let Some(h) = &mut m.http {
            // The HTTP port is asked for under `<member>/http`; 0 lets the gateway
            // pick a free one (it reports the address it bound).
            let p = port_of(&format!("{}/http", m.member), template_port(&h.listen));
            h.listen = format!("127.0.0.1:{p}");
        }
        if let Some(pg) = &mut m.postgres {
            // Likewise the PostgreSQL port, under `<member>/postgres`.
            let p = port_of(&format!("{}/postgres", m.member), template_port(&pg.listen));
            pg.listen = format!("127.0.0.1:{p}");
        }
        if let Some(key) = &m.hmac_key {
            // A fresh secret per materialized region, never one kept in the
            // repository; members naming the same file share it (so their keyed
            // hashes of the same value agree and can be joined).
            let path = dst.join(key);
            if !path.exists() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
                }
                let secret = format!(
                    "{}{}\n",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                );
                write(&path, &secret)?;
            }
        }
        for d in &mut m.databases {
            let db = match d.kind.as_deref() {
                Some("mysql") => servers.mysql.as_ref(),
                Some("flight-sql") => {
                    // An engine of the sample region: its gateway's port.
                    if let Some(p) = d.port.and_then(|t| engine_ports.get(&t)) {
                        d.port = Some(*p);
                    }
                    None
                }
                _ => servers.postgres.as_ref(),
            };
            if let Some((port, _)) = db {
                d.port = Some(*port);
            }
            if let Some(file) = &d.password_file {
                let path = dst.join(file);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
                }
                let password = match db {
                    Some((_, pw)) => pw.clone(),
                    None => uuid::Uuid::new_v4().simple().to_string(),
                };
                write(&path, &password)?;
            }
        }
        let out = dst.join(p.file_name().unwrap_or_default());
        write(
            &out,
            &toml::to_string_pretty(&m).map_err(|e| Error::Internal(e.to_string()))?,
        )?;
        gateways.push((m.member.clone(), out, format!("https://127.0.0.1:{port}")));
    }
    // Region order, so the first gateway is the first member of the region file.
    let order = |n: &str| {
        region
            .members
            .iter()
            .position(|m| m.name == n)
            .unwrap_or(usize::MAX)
    };
    gateways.sort_by_key(|(n, _, _)| order(n));
    if src.join("data").is_dir() {
        copy_dir(&src.join("data"), &dst.join("data"))?;
    }

    let certs = dst.join("certs");
    let ca = Ca::generate(&region.region)?;
    let (ca_path, _) = pki::write_ca(&ca, &certs)?;
    let mut clients = Vec::new();
    for m in &region.members {
        let kind = Kind::parse(&m.kind)
            .ok_or_else(|| Error::Config(format!("member {}: bad kind", m.name)))?;
        let principal = match &m.identity {
            Some(uri) => Principal::parse(uri)?,
            None => Principal::new(&region.region, kind, &m.name)?,
        };
        let issued = ca.issue(&principal, &pki::default_hosts(), 365)?;
        let (crt, key) = pki::write_issued(&issued, &certs, &m.name)?;
        if kind == Kind::Office {
            clients.push((m.name.clone(), crt, key));
        }
    }
    Ok(Materialized {
        dir: dst.to_path_buf(),
        region: region_dst,
        gateways,
        ca: ca_path,
        clients,
    })
}

/// Creates the sample region's MariaDB databases on `db` and loads them: every
/// `schema.mysql.sql` under `data` holds sections headed `-- database: NAME`; each
/// section's tables are created in that database and filled from the CSV file named
/// after the table. Empty fields are NULL and `t`/`f` in a BOOLEAN column are 1/0, as
/// PostgreSQL's COPY reads the same files.
pub async fn load_mysql_databases(
    db: &crate::tools::local_mariadb::LocalMariaDb,
    data: &Path,
) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let mut scripts = Vec::new();
    find_files(data, "schema.mysql.sql", &mut scripts);
    let mut conn = db.connect(None).await?;
    let fail = |what: String, e: mysql_async::Error| Error::Config(format!("{what}: {e}"));
    for script in scripts {
        let text = std::fs::read_to_string(&script)
            .map_err(|e| Error::Config(format!("reading {}: {e}", script.display())))?;
        let dir = script.parent().unwrap_or(data);
        for section in text.split("-- database: ").skip(1) {
            let (name, ddl) = section.split_once('\n').unwrap_or((section, ""));
            let name = name.trim();
            conn.query_drop(format!(
                "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
            ))
            .await
            .map_err(|e| fail(format!("creating database {name}"), e))?;
            conn.query_drop(format!("USE `{name}`"))
                .await
                .map_err(|e| fail(format!("using database {name}"), e))?;
            conn.query_drop(ddl)
                .await
                .map_err(|e| fail(format!("{} ({name})", script.display()), e))?;
            for stmt in ddl.split(';') {
                let Some(rest) = stmt.split("CREATE TABLE").nth(1) else {
                    continue;
                };
                let table = rest.split('(').next().unwrap_or("").trim();
                let booleans: Vec<String> = conn
                    .exec(
                        "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
                         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND COLUMN_TYPE = 'tinyint(1)'",
                        (name, table),
                    )
                    .await
                    .map_err(|e| fail(format!("reading the columns of {table}"), e))?;
                let csv = dir.join(format!("{table}.csv"));
                let (header, rows) = read_text_csv(&csv)?;
                let flags: Vec<bool> = header.iter().map(|h| booleans.contains(h)).collect();
                let cols: Vec<String> = header.iter().map(|h| format!("`{h}`")).collect();
                let marks = vec!["?"; cols.len()].join(", ");
                let insert = format!(
                    "INSERT INTO `{table}` ({}) VALUES ({marks})",
                    cols.join(", ")
                );
                let params = rows.into_iter().map(|r| {
                    r.into_iter()
                        .zip(&flags)
                        .map(|(v, &flag)| match (v, flag) {
                            (None, _) => mysql_async::Value::NULL,
                            (Some(v), true) if v == "t" => mysql_async::Value::Int(1),
                            (Some(v), true) if v == "f" => mysql_async::Value::Int(0),
                            (Some(v), _) => mysql_async::Value::Bytes(v.into_bytes()),
                        })
                        .collect::<Vec<_>>()
                });
                conn.exec_batch(insert, params)
                    .await
                    .map_err(|e| fail(format!("loading {table}"), e))?;
            }
        }
    }
    let _ = conn.disconnect().await;
    Ok(())
}

/// Creates the sample region's databases on `pg` and loads them: every `schema.sql`
/// under `data` holds sections headed `-- database: NAME`; each section's tables are
/// created in that database and filled from the CSV file named after the table.
pub async fn load_databases(
    pg: &crate::tools::local_postgres::LocalPostgres,
    data: &Path,
) -> Result<()> {
    let mut scripts = Vec::new();
    find_files(data, "schema.sql", &mut scripts);
    let admin = pg.connect("postgres").await?;
    let fail = |what: String, e: tokio_postgres::Error| {
        Error::Config(format!(
            "{what}: {}",
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or(e.to_string())
        ))
    };
    for script in scripts {
        let text = std::fs::read_to_string(&script)
            .map_err(|e| Error::Config(format!("reading {}: {e}", script.display())))?;
        let dir = script.parent().unwrap_or(data);
        for section in text.split("-- database: ").skip(1) {
            let (name, ddl) = section.split_once('\n').unwrap_or((section, ""));
            let name = name.trim();
            admin
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
                .map_err(|e| fail(format!("creating database {name}"), e))?;
            let client = pg.connect(name).await?;
            client
                .batch_execute(ddl)
                .await
                .map_err(|e| fail(format!("{} ({name})", script.display()), e))?;
            for stmt in ddl.split(';') {
                let Some(rest) = stmt.split("CREATE TABLE").nth(1) else {
                    continue;
                };
                let table = rest.split('(').next().unwrap_or("").trim();
                let short = table.rsplit('.').next().unwrap_or(table);
                let csv = dir.join(format!("{short}.csv"));
                let bytes = std::fs::read(&csv)
                    .map_err(|e| Error::Config(format!("reading {}: {e}", csv.display())))?;
                let sink = client
                    .copy_in(&format!(
                        "COPY {table} FROM STDIN WITH (FORMAT csv, HEADER true)"
                    ))
                    .await
                    .map_err(|e| fail(format!("loading {table}"), e))?;
                futures::pin_mut!(sink);
                use futures::SinkExt;
                sink.send(bytes::Bytes::from(bytes))
                    .await
                    .map_err(|e| fail(format!("loading {table}"), e))?;
                sink.finish()
                    .await
                    .map_err(|e| fail(format!("loading {table}"), e))?;
            }
        }
    }
    Ok(())
}

/// A CSV file's rows, every field as text and empty fields as `None`.
type TextRows = Vec<Vec<Option<String>>>;

/// A CSV file's header and rows.
fn read_text_csv(path: &Path) -> Result<(Vec<String>, TextRows)> {
    use arrow::array::{Array, AsArray};
    let err = |e: &dyn std::fmt::Display| Error::Config(format!("reading {}: {e}", path.display()));
    let open = || std::fs::File::open(path).map_err(|e| err(&e));
    let (inferred, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .infer_schema(open()?, Some(0))
        .map_err(|e| err(&e))?;
    let header: Vec<String> = inferred.fields().iter().map(|f| f.name().clone()).collect();
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(
        header
            .iter()
            .map(|h| arrow::datatypes::Field::new(h, arrow::datatypes::DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let reader = arrow::csv::ReaderBuilder::new(schema)
        .with_header(true)
        .build(open()?)
        .map_err(|e| err(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        for i in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        let c = c.as_string::<i32>();
                        (!c.is_null(i) && !c.value(i).is_empty()).then(|| c.value(i).to_string())
                    })
                    .collect(),
            );
        }
    }
    Ok((header, rows))
}

fn find_files(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            find_files(&p, name, out);
        } else if p.file_name() == Some(name.as_ref()) {
            out.push(p);
        }
    }
}

fn write(p: &Path, text: &str) -> Result<()> {
    std::fs::write(p, text).map_err(|e| Error::Config(format!("writing {}: {e}", p.display())))
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    let err = |p: &Path, e: std::io::Error| Error::Config(format!("copying {}: {e}", p.display()));
    std::fs::create_dir_all(dst).map_err(|e| err(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| err(src, e))? {
        let entry = entry.map_err(|e| err(src, e))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if from.is_dir() {
            copy_dir(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| err(&from, e))?;
        }
    }
    Ok(())
}
