//! PostgreSQL-compatible databases behind a member.
//!
//! A [`PgDatabase`] is one database with a connection pool, a
//! [`RemoteDatabase`](super::remote::RemoteDatabase): its tables' columns are
//! discovered from the catalog and their types mapped faithfully to Arrow, and the
//! statements [`super::pushdown`] writes for it run here and stream back as Arrow
//! batches.
//!
//! Every value is read in PostgreSQL's binary format after a cast, chosen from the
//! Arrow type the plan expects, in the SQL itself (`CAST(c0 AS int8)`). PostgreSQL
//! therefore always sends exactly the type the decoder expects, whatever type its own
//! functions return (`sum(bigint)` is `numeric` there, `Int64` here).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use futures::StreamExt;
use tokio_postgres::types::{FromSql, Type};

use super::columns::{Batch, Col, decimal, misfit};
use super::remote::{BatchSender, Dialect, RemoteDatabase};
use crate::config::{Database, DatabaseTls};
use crate::error::{Error, Result};

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from the Unix epoch to PostgreSQL's epoch.
const PG_EPOCH_DAYS: i32 = 10_957;

/// One database: its pool and what was learned about it.
pub struct PgDatabase {
    name: String,
    /// `host:port/dbname`, for messages.
    place: String,
    pool: deadpool_postgres::Pool,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// 0 unknown, 1 byte-wise ("C") text ordering, 2 another collation.
    c_collation: AtomicU8,
    /// Whether a column of a type that is not text there (json, uuid, interval,
    /// citext, ...) is read as text: such a column compares by its own rules in the
    /// database, so no comparison of text is pushed.
    opaque_text: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgDatabase({} at {})", self.name, self.place)
    }
}

impl PgDatabase {
    /// Prepares a pool for `db`. Nothing connects until the first use.
    pub fn new(db: &Database) -> Result<Arc<PgDatabase>> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&db.host)
            .port(db.port)
            .dbname(&db.dbname)
            .user(&db.user)
            .application_name("fedgate")
            .connect_timeout(db.connect_timeout)
            // Canonical timestamps are UTC and dates are ISO: the session must agree
            // with DataFusion for casts pushed into the database to mean the same.
            // The operator's own settings come first, so these win whatever they say
            // (configuration refuses them anyway).
            .options(session_options(&db.settings));
        if let Some(p) = db.password.expose() {
            cfg.password(p);
        }
        let client_config = match &db.tls {
            DatabaseTls::Disable => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                crate::trust::tls::database_client_config(None, None)?
            }
            DatabaseTls::VerifyFull { ca, client } => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                crate::trust::tls::database_client_config(
                    Some(ca),
                    client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                )?
            }
        };
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config);
        let manager = deadpool_postgres::Manager::from_config(
            cfg,
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(db.pool_size)
            .wait_timeout(Some(db.connect_timeout))
            .create_timeout(Some(db.connect_timeout))
            .recycle_timeout(Some(db.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("database {}: {e}", db.name)))?;
        Ok(Arc::new(PgDatabase {
            name: db.name.clone(),
            place: format!("{}:{}/{}", db.host, db.port, db.dbname),
            pool,
            tls,
            c_collation: AtomicU8::new(0),
            opaque_text: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    fn pool_error(&self, e: deadpool_postgres::PoolError) -> Error {
        use deadpool_postgres::PoolError as P;
        match e {
            P::Backend(e) => self.error(&e),
            P::Timeout(_) => Error::Database {
                database: self.name.clone(),
                unavailable: true,
                reason: format!("no connection to {} within the connect timeout", self.place),
            },
            other => Error::Database {
                database: self.name.clone(),
                unavailable: true,
                reason: format!("{}: {other}", self.place),
            },
        }
    }

    /// Classifies a database error: who is at fault and whether a retry may help.
    pub fn error(&self, e: &tokio_postgres::Error) -> Error {
        let Some(db) = e.as_db_error() else {
            // No answer from the server: refused, reset, timed out or closed.
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                reason = format!("{reason}: {s}");
                src = s.source();
            }
            return Error::Database {
                database: self.name.clone(),
                unavailable: true,
                reason: format!("{}: {reason}", self.place),
            };
        };
        let code = db.code().code();
        let text = format!("{} ({code})", db.message());
        match &code[..2] {
            // Data exceptions (division by zero, a value out of range) come from the
            // caller's query. The server's message may quote the value ("invalid input
            // syntax for type integer: ..."), which the caller's grant may not cover:
            // only the kind of exception is passed on.
            "22" => Error::InvalidQuery(format!(
                "database {}: {} ({code})",
                self.name,
                crate::owner::source::remote::data_exception(code)
            )),
            // The server is shutting down or out of resources: it may answer later.
            "53" | "57" if code != "57014" => Error::Database {
                database: self.name.clone(),
                unavailable: true,
                reason: text,
            },
            _ => Error::Database {
                database: self.name.clone(),
                unavailable: false,
                reason: text,
            },
        }
    }
}

#[async_trait]
impl RemoteDatabase for PgDatabase {
    fn name(&self) -> &str {
        &self.name
    }

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    /// Ordering comparisons of text are pushed only under the "C" collation.
    fn byte_wise_text(&self) -> bool {
        self.c_collation.load(Ordering::Relaxed) == 1 && !self.opaque_text.load(Ordering::Relaxed)
    }

    /// Equality of text is byte-wise under every deterministic collation.
    fn text_equality(&self) -> bool {
        !self.opaque_text.load(Ordering::Relaxed)
    }

    fn readable(&self, t: &DataType) -> bool {
        pg_cast(t).is_some()
    }

    fn statement(&self, inner: &str, fields: &[Arc<Field>]) -> Result<String> {
        typed_select(inner, fields, None, None)
    }

    async fn run(&self, sql: &str, schema: SchemaRef, tx: &BatchSender) -> Result<()> {
        run(self, sql, schema, tx).await
    }

    /// Reads a table's columns from the catalog and maps their types to Arrow.
    async fn discover(&self, schema: &str, table: &str) -> Result<SchemaRef> {
        let client = self.client().await?;
        if self.c_collation.load(Ordering::Relaxed) == 0 {
            let row = client
                .query_one(
                    "SELECT datcollate::text FROM pg_database WHERE datname = current_database()",
                    &[],
                )
                .await
                .map_err(|e| self.error(&e))?;
            let collate: String = row.get(0);
            let c = matches!(collate.as_str(), "C" | "POSIX" | "C.UTF-8" | "C.utf8");
            self.c_collation
                .store(if c { 1 } else { 2 }, Ordering::Relaxed);
        }
        let qualified = format!("{}.{}", quote(schema), quote(table));
        let rows = client
            .query(
                "SELECT a.attname::text, t.typname::text, a.atttypmod, a.attnotnull \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&qualified],
            )
            .await
            .map_err(|e| self.error(&e))?;
        if rows.is_empty() {
            return Err(Error::Database {
                database: self.name.clone(),
                unavailable: false,
                reason: format!("table {schema}.{table} does not exist (or has no columns)"),
            });
        }
        let fields: Vec<Field> = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let typname: String = r.get(1);
                let typmod: i32 = r.get(2);
                let not_null: bool = r.get(3);
                let t = arrow_type(&typname, typmod);
                if t == DataType::Utf8
                    && !matches!(typname.as_str(), "text" | "varchar" | "bpchar" | "name")
                {
                    self.opaque_text.store(true, Ordering::Relaxed);
                }
                Field::new(name, t, !not_null)
            })
            .collect();
        Ok(Arc::new(Schema::new(fields)))
    }
}

/// Quotes an identifier for PostgreSQL.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The Arrow type of a PostgreSQL column type. Types without an exact Arrow
/// counterpart (json, uuid, intervals, arrays, ...) are read as their text form.
pub fn arrow_type(typname: &str, typmod: i32) -> DataType {
    match typname {
        "int2" => DataType::Int16,
        "int4" => DataType::Int32,
        "int8" => DataType::Int64,
        "float4" => DataType::Float32,
        "float8" => DataType::Float64,
        "bool" => DataType::Boolean,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        "numeric" => {
            // typmod packs (precision << 16 | scale) + 4; -1 means unconstrained.
            if typmod >= 4 {
                let p = (((typmod - 4) >> 16) & 0xffff) as u8;
                let s = ((typmod - 4) & 0x7ff) as i8;
                if (1..=38).contains(&p) && (0..=p as i8).contains(&s) {
                    return DataType::Decimal128(p, s);
                }
            }
            // Unconstrained numeric: 38 digits, 10 after the point. Values that do not
            // fit (more places, more digits) fail the query with a clear error naming
            // the column rather than losing digits silently (see `pg_cast`).
            DataType::Decimal128(38, 10)
        }
        _ => DataType::Utf8,
    }
}

/// The PostgreSQL type a column is cast to so that it arrives as `t`.
fn pg_cast(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::Int16 => "int2".into(),
        DataType::Int32 => "int4".into(),
        DataType::Int64 => "int8".into(),
        DataType::Float32 => "float4".into(),
        DataType::Float64 => "float8".into(),
        DataType::Boolean => "bool".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Date32 => "date".into(),
        // PostgreSQL keeps microseconds; a plan wanting another unit reads nothing
        // from the database and converts in the gateway.
        DataType::Timestamp(TimeUnit::Microsecond, None) => "timestamp".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "timestamptz".into(),
        // Decimals travel as text at the database's own scale and are parsed exactly:
        // a value with more places than the plan's scale fails the query. A cast to
        // numeric(p,s) would round it in the database, silently.
        DataType::Decimal128(..) => "numeric".into(),
        DataType::Null => "text".into(),
        _ => return None,
    })
}

/// The startup `options` of a session: the operator's settings, then the gateway's
/// own. PostgreSQL splits the string at white space and takes a backslash as escaping
/// the next character, so both are escaped in values.
fn session_options(settings: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in settings {
        out.push_str("-c ");
        out.push_str(name);
        out.push('=');
        for c in value.chars() {
            if c == '\\' || c.is_whitespace() {
                out.push('\\');
            }
            out.push(c);
        }
        out.push(' ');
    }
    out.push_str("-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3");
    out
}

/// The SQL that reads `inner` (whose columns are, by position, `fields`) with every
/// column cast to the type its field expects, optionally only `projection`.
pub fn typed_select(
    inner: &str,
    fields: &[Arc<Field>],
    projection: Option<&[usize]>,
    limit: Option<usize>,
) -> Result<String> {
    let names: Vec<String> = (0..fields.len()).map(|i| format!("c{i}")).collect();
    let all: Vec<usize> = (0..fields.len()).collect();
    let cols: Vec<String> = projection
        .unwrap_or(&all)
        .iter()
        .map(|&i| {
            let f = &fields[i];
            let t = pg_cast(f.data_type()).ok_or_else(|| {
                Error::Internal(format!(
                    "column {} of type {} cannot be read from a database",
                    f.name(),
                    f.data_type()
                ))
            })?;
            Ok(if matches!(f.data_type(), DataType::Decimal128(..)) {
                format!("CAST(CAST(q.c{i} AS {t}) AS text)")
            } else {
                format!("CAST(q.c{i} AS {t})")
            })
        })
        .collect::<Result<_>>()?;
    let select = if cols.is_empty() {
        // A projection of no columns still needs the row count.
        "NULL".to_string()
    } else {
        cols.join(", ")
    };
    let mut sql = if fields.is_empty() {
        format!("SELECT {select} FROM ({inner}) AS q")
    } else {
        format!("SELECT {select} FROM ({inner}) AS q({})", names.join(", "))
    };
    if let Some(n) = limit {
        sql.push_str(&format!(" LIMIT {n}"));
    }
    Ok(sql)
}

/// Runs `sql` and sends its rows in batches. When the receiver goes away (the query
/// was cancelled or its deadline passed), the statement is cancelled in the database
/// too rather than left running.
async fn run(db: &PgDatabase, sql: &str, schema: SchemaRef, tx: &BatchSender) -> Result<()> {
    let client = tokio::select! {
        c = db.client() => c?,
        _ = tx.closed() => return Ok(()),
    };
    let started = tokio::select! {
        // Parse, bind and execute go in one message and one round trip: the statement
        // has no parameters, so nothing needs describing first (`query_raw` would
        // prepare it in a round trip of its own). Every column it returns is cast to
        // a built-in type (`typed_select`; the sessions' search path cannot be set),
        // so the client never has to look a type up while the rows wait behind it.
        r = client.query_typed_raw(sql, std::iter::empty::<(&(dyn tokio_postgres::types::ToSql + Sync), Type)>()) => r,
        _ = tx.closed() => {
            cancel_query(db, client).await;
            return Ok(());
        }
    };
    let rows = started.map_err(|e| db.error(&e))?;
    futures::pin_mut!(rows);
    let mut batch = Batch::new(&schema);
    loop {
        let next = tokio::select! {
            r = rows.next() => r,
            _ = tx.closed() => {
                cancel_query(db, client).await;
                return Ok(());
            }
        };
        match next {
            None => break,
            Some(Err(e)) => return Err(db.error(&e)),
            Some(Ok(row)) => {
                push_row(&mut batch, &row, &schema)?;
                if batch.full() {
                    let b = std::mem::replace(&mut batch, Batch::new(&schema)).finish(&schema)?;
                    if tx.send(Ok(b)).await.is_err() {
                        cancel_query(db, client).await;
                        return Ok(());
                    }
                }
            }
        }
    }
    if batch.len() > 0 {
        let _ = tx.send(Ok(batch.finish(&schema)?)).await;
    }
    Ok(())
}

/// Cancels the statement running on `client` and closes its connection instead of
/// handing it back to the pool: the cancel request reaches the backend on its own
/// schedule, and on a pooled connection it could cancel the next statement run there
/// ("canceling statement due to user request" in another query, seen under load).
async fn cancel_query(db: &PgDatabase, client: deadpool_postgres::Object) {
    let token = client.cancel_token();
    drop(deadpool_postgres::Object::take(client));
    if let Err(e) = token.cancel_query(db.tls.clone()).await {
        tracing::warn!(database = %db.name, error = %e, "Could not cancel a database query");
    } else {
        tracing::debug!(database = %db.name, "Cancelled a database query");
    }
}

/// A value's bytes in PostgreSQL's binary format, whatever its type.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

fn be_i64(b: &[u8]) -> Result<i64> {
    b.try_into()
        .map(i64::from_be_bytes)
        .map_err(|_| Error::Internal("a timestamp is not 8 bytes".into()))
}

fn be_i32(b: &[u8]) -> Result<i32> {
    b.try_into()
        .map(i32::from_be_bytes)
        .map_err(|_| Error::Internal("a date is not 4 bytes".into()))
}

fn get_err(e: tokio_postgres::Error) -> Error {
    Error::Internal(format!("reading a database value: {e}"))
}

/// Appends one row to `batch`, converted strictly to the plan's types.
fn push_row(batch: &mut Batch, row: &tokio_postgres::Row, schema: &Schema) -> Result<()> {
    for (i, (col, field)) in batch.cols.iter_mut().zip(schema.fields()).enumerate() {
        match col {
            Col::I16(b) => b.append_option(row.try_get::<_, Option<i16>>(i).map_err(get_err)?),
            Col::I32(b) => b.append_option(row.try_get::<_, Option<i32>>(i).map_err(get_err)?),
            Col::I64(b) => b.append_option(row.try_get::<_, Option<i64>>(i).map_err(get_err)?),
            Col::F32(b) => b.append_option(row.try_get::<_, Option<f32>>(i).map_err(get_err)?),
            Col::F64(b) => b.append_option(row.try_get::<_, Option<f64>>(i).map_err(get_err)?),
            Col::Bool(b) => b.append_option(row.try_get::<_, Option<bool>>(i).map_err(get_err)?),
            Col::Text(b) => b.append_option(row.try_get::<_, Option<&str>>(i).map_err(get_err)?),
            Col::Date(b) => match row.try_get::<_, Option<Raw>>(i).map_err(get_err)? {
                None => b.append_null(),
                Some(r) => b.append_value(be_i32(r.0)?.saturating_add(PG_EPOCH_DAYS)),
            },
            Col::Ts(b) => match row.try_get::<_, Option<Raw>>(i).map_err(get_err)? {
                None => b.append_null(),
                Some(r) => b.append_value(be_i64(r.0)?.saturating_add(PG_EPOCH_MICROS)),
            },
            Col::Dec(b, p, s) => match row.try_get::<_, Option<&str>>(i).map_err(get_err)? {
                None => b.append_null(),
                Some(t) => b.append_value(decimal(t, *p, *s, field)?),
            },
            // Bytes are read as text (see `pg_cast`): a binary column is not planned.
            Col::Bytes(_) => return Err(misfit(field, "bytes where text was read")),
            Col::Null(n) => *n += 1,
        }
    }
    batch.row_done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_types_map_faithfully() {
        assert_eq!(arrow_type("int4", -1), DataType::Int32);
        assert_eq!(arrow_type("int8", -1), DataType::Int64);
        // numeric(12,2): typmod = (12 << 16 | 2) + 4.
        assert_eq!(
            arrow_type("numeric", (12 << 16 | 2) + 4),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(arrow_type("numeric", -1), DataType::Decimal128(38, 10));
        assert_eq!(
            arrow_type("timestamptz", -1),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(arrow_type("jsonb", -1), DataType::Utf8);
    }

    #[test]
    fn settings_come_first_escaped_and_the_gateways_own_last() {
        let options = session_options(&[
            ("statement_timeout".into(), "5 s".into()),
            ("work_mem".into(), r"a\b".into()),
        ]);
        assert_eq!(
            options,
            r"-c statement_timeout=5\ s -c work_mem=a\\b -c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3"
        );
        assert_eq!(
            session_options(&[]),
            "-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3"
        );
    }

    #[test]
    fn every_column_is_cast_to_the_type_the_plan_expects() {
        let fields = vec![
            Arc::new(Field::new("a", DataType::Int64, true)),
            Arc::new(Field::new("b", DataType::Decimal128(10, 2), true)),
            Arc::new(Field::new("c", DataType::Utf8, true)),
        ];
        let sql = typed_select("SELECT x", &fields, Some(&[2, 0, 1]), Some(5)).unwrap();
        assert_eq!(
            sql,
            "SELECT CAST(q.c2 AS text), CAST(q.c0 AS int8), CAST(CAST(q.c1 AS numeric) AS text) \
             FROM (SELECT x) AS q(c0, c1, c2) LIMIT 5"
        );
        assert!(
            typed_select("SELECT x", &fields, Some(&[]), None)
                .unwrap()
                .starts_with("SELECT NULL FROM")
        );
    }
}
