//! MySQL-protocol databases behind a member: MySQL and MariaDB, and the engines that
//! speak their protocol (TiDB, OceanBase, Doris, StarRocks).
//!
//! A [`MySqlDatabase`] is one database with a connection pool, a
//! [`RemoteDatabase`]. Every session is set up so that what is pushed into it means
//! what it means in DataFusion: UTC, ANSI string concatenation, no backslash escapes in
//! literals, and a byte-wise collation with no padding for literals (columns keep their
//! own; text comparisons are pushed only when every text column compares byte-wise,
//! see [`super::pushdown`]).
//!
//! Statements run over the binary protocol, so numbers arrive as numbers (no
//! round trip through text for doubles), decimals as their exact text and dates as
//! dates. Each value is converted to the Arrow type the plan expects and a value that
//! does not fit it fails the query with a clear error: the database's `SUM` of integers
//! is a DECIMAL, read here as the Int64 DataFusion's plan says it is.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use mysql_async::Value;
use mysql_async::prelude::Queryable;

use super::columns::{Batch, Col, decimal, misfit};
use super::remote::{BatchSender, Dialect, RemoteDatabase};
use crate::config::{Database, DatabaseTls};
use crate::error::{Error, Result};

/// What every session runs first, as one statement: the driver runs a list of them
/// in reverse order, and `SET NAMES` after the collation would undo it. The collation
/// of literals is MariaDB's byte-wise one without padding, or MySQL 8's
/// (`utf8mb4_0900_bin`), whichever the server has.
const SESSION_SETUP: &str = "SET character_set_client = 'utf8mb4', \
     character_set_results = 'utf8mb4', \
     collation_connection = IF(VERSION() LIKE '%MariaDB%', 'utf8mb4_nopad_bin', 'utf8mb4_0900_bin'), \
     time_zone = '+00:00', \
     sql_mode = 'NO_BACKSLASH_ESCAPES,PIPES_AS_CONCAT,ONLY_FULL_GROUP_BY,STRICT_ALL_TABLES,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO'";

/// One database: its pool and what was learned about it.
pub struct MySqlDatabase {
    name: String,
    /// `host:port/dbname`, for messages.
    place: String,
    pool: mysql_async::Pool,
    /// How to open a connection outside the pool (to stop a statement when the pool
    /// is full).
    opts: mysql_async::Opts,
    connect_timeout: Duration,
    /// Whether every text column discovered so far compares byte-wise, without
    /// padding (`utf8mb4_nopad_bin`, `utf8mb4_0900_bin`, binary strings).
    byte_wise: AtomicBool,
}

impl fmt::Debug for MySqlDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MySqlDatabase({} at {})", self.name, self.place)
    }
}

impl MySqlDatabase {
    /// Prepares a pool for `db`. Nothing connects until the first use.
    pub fn new(db: &Database) -> Result<Arc<MySqlDatabase>> {
        let ssl = match &db.tls {
            DatabaseTls::Disable => None,
            DatabaseTls::VerifyFull { ca, client } => {
                // The driver builds its TLS configuration with the process's default
                // crypto provider: make it the one every other connection here uses.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut ssl = mysql_async::SslOpts::default()
                    .with_root_certs(vec![ca.clone().into()])
                    .with_disable_built_in_roots(true);
                if let Some((cert, key)) = client {
                    ssl = ssl.with_client_identity(Some(mysql_async::ClientIdentity::new(
                        cert.clone().into(),
                        key.clone().into(),
                    )));
                }
                Some(ssl)
            }
        };
        let pool_opts = mysql_async::PoolOpts::default()
            .with_constraints(
                mysql_async::PoolConstraints::new(0, db.pool_size.max(1))
                    .ok_or_else(|| Error::Config(format!("database {}: bad pool size", db.name)))?,
            )
            .with_inactive_connection_ttl(Duration::from_secs(60));
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(db.host.clone())
            .tcp_port(db.port)
            .db_name(Some(db.dbname.clone()))
            .user(Some(db.user.clone()))
            .pass(db.password.expose().map(str::to_string))
            // The driver would otherwise switch to a local socket it finds on its own,
            // bypassing TLS and the configured address.
            .prefer_socket(false)
            .ssl_opts(ssl)
            .pool_opts(pool_opts)
            .setup(vec![SESSION_SETUP.to_string()]);
        Ok(Arc::new(MySqlDatabase {
            name: db.name.clone(),
            place: format!("{}:{}/{}", db.host, db.port, db.dbname),
            pool: mysql_async::Pool::new(opts.clone()),
            opts: opts.into(),
            connect_timeout: db.connect_timeout,
            byte_wise: AtomicBool::new(true),
        }))
    }

    async fn conn(&self) -> Result<mysql_async::Conn> {
        match tokio::time::timeout(self.connect_timeout, self.pool.get_conn()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.error(&e)),
            Err(_) => Err(Error::Database {
                database: self.name.clone(),
                unavailable: true,
                reason: format!("no connection to {} within the connect timeout", self.place),
            }),
        }
    }

    /// Classifies a database error: who is at fault and whether a retry may help.
    pub fn error(&self, e: &mysql_async::Error) -> Error {
        match e {
            mysql_async::Error::Server(s) => {
                let text = format!("{} ({})", s.message, s.code);
                match s.code {
                    // A value out of range, division by zero, a bad value for a cast:
                    // the caller's query.
                    // The server's message may quote the value ("Truncated incorrect
                    // DOUBLE value: ..."), which the caller's grant may not cover: only
                    // the kind of error is passed on.
                    1264 | 1292 | 1365 | 1366 | 1690 => Error::InvalidQuery(format!(
                        "database {}: {} ({})",
                        self.name,
                        match s.code {
                            1365 => "division by zero",
                            1264 | 1690 => "a value out of range",
                            _ => "a value of the wrong type",
                        },
                        s.code
                    )),
                    // Too many connections, shutting down, out of memory, lock wait: it
                    // may answer later.
                    1040 | 1053 | 1037 | 1038 | 1041 | 1205 | 1213 => Error::Database {
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
            // No answer from the server: refused, reset, timed out, closed, or the
            // TLS handshake failed.
            other => {
                let mut reason = other.to_string();
                let mut src = std::error::Error::source(other);
                while let Some(s) = src {
                    reason = format!("{reason}: {s}");
                    src = s.source();
                }
                Error::Database {
                    database: self.name.clone(),
                    unavailable: true,
                    reason: format!("{}: {reason}", self.place),
                }
            }
        }
    }

    /// Stops the statement running on connection `id`, from another connection: a
    /// half-read answer would otherwise be read to its end when its connection is
    /// dropped.
    async fn kill(&self, id: u32) {
        // A connection of its own, not from the pool: the pool may be full, with the
        // very connection to stop among its connections.
        let killed = async {
            let mut c = mysql_async::Conn::new(self.opts.clone())
                .await
                .map_err(|e| self.error(&e))?;
            let done = c
                .query_drop(format!("KILL QUERY {id}"))
                .await
                .map_err(|e| self.error(&e));
            let _ = c.disconnect().await;
            done
        };
        match tokio::time::timeout(self.connect_timeout, killed).await {
            Ok(Ok(())) => tracing::debug!(database = %self.name, "Cancelled a database query"),
            Ok(Err(e)) => {
                tracing::warn!(database = %self.name, error = %e, "Could not cancel a database query")
            }
            Err(_) => {
                tracing::warn!(database = %self.name, "Could not cancel a database query in time")
            }
        }
    }
}

/// The Arrow type of a MySQL column, from `information_schema.COLUMNS`: its
/// `DATA_TYPE`, `COLUMN_TYPE` (which says `unsigned` and `tinyint(1)`), precision and
/// scale. Types without an exact Arrow counterpart (TIME, JSON, ENUM, SET, BIT, ...) are
/// read as their text, binary strings as bytes.
pub fn arrow_type(data_type: &str, column_type: &str, precision: u64, scale: u64) -> DataType {
    let unsigned = column_type.contains("unsigned");
    match data_type {
        // MySQL's BOOLEAN is TINYINT(1); a value other than 0 or 1 fails the read.
        "tinyint" if column_type.starts_with("tinyint(1)") && !unsigned => DataType::Boolean,
        "tinyint" => DataType::Int16,
        "smallint" if !unsigned => DataType::Int16,
        "smallint" | "mediumint" => DataType::Int32,
        "int" | "integer" if !unsigned => DataType::Int32,
        "int" | "integer" => DataType::Int64,
        "bigint" if !unsigned => DataType::Int64,
        // BIGINT UNSIGNED goes beyond Int64: exact as a 20-digit decimal.
        "bigint" => DataType::Decimal128(20, 0),
        "year" => DataType::Int16,
        "float" => DataType::Float32,
        "double" | "real" => DataType::Float64,
        "decimal" | "numeric" => {
            if (1..=38).contains(&precision) && scale <= precision {
                DataType::Decimal128(precision as u8, scale as i8)
            } else {
                // Up to 65 digits there: kept exact, as text.
                DataType::Utf8
            }
        }
        "date" => DataType::Date32,
        "datetime" => DataType::Timestamp(TimeUnit::Microsecond, None),
        // Stored in UTC and shown in the session's time zone, which is UTC.
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "bit" => {
            DataType::Binary
        }
        _ => DataType::Utf8,
    }
}

/// Whether a column collation compares byte-wise, without padding, as DataFusion does.
fn byte_wise_collation(collation: Option<&str>) -> bool {
    match collation {
        None => true,
        Some(c) => c.ends_with("_nopad_bin") || c == "utf8mb4_0900_bin" || c == "binary",
    }
}

#[async_trait]
impl RemoteDatabase for MySqlDatabase {
    fn name(&self) -> &str {
        &self.name
    }

    fn dialect(&self) -> Dialect {
        Dialect::MySql
    }

    fn byte_wise_text(&self) -> bool {
        self.byte_wise.load(Ordering::Relaxed)
    }

    fn readable(&self, t: &DataType) -> bool {
        matches!(
            t,
            DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::Float32
                | DataType::Float64
                | DataType::Boolean
                | DataType::Utf8
                | DataType::Binary
                | DataType::Date32
                | DataType::Timestamp(TimeUnit::Microsecond, _)
                | DataType::Decimal128(..)
                | DataType::Null
        )
    }

    /// Read by position, converted in [`Batch`]: MySQL's casts are too few (and
    /// `CAST(3.7 AS SIGNED)` rounds) to ask the database for each type.
    fn statement(&self, inner: &str, _fields: &[Arc<Field>]) -> Result<String> {
        Ok(inner.to_string())
    }

    async fn discover(&self, schema: &str, table: &str) -> Result<SchemaRef> {
        let mut conn = self.conn().await?;
        type Column = (
            String,
            String,
            String,
            Option<u64>,
            Option<u64>,
            String,
            Option<String>,
        );
        let rows: Vec<Column> = conn
            .exec(
                "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_PRECISION, NUMERIC_SCALE, \
                 IS_NULLABLE, COLLATION_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (schema, table),
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
        let mut fields = Vec::with_capacity(rows.len());
        for (name, data_type, column_type, precision, scale, nullable, collation) in rows {
            let t = arrow_type(
                &data_type.to_ascii_lowercase(),
                &column_type.to_ascii_lowercase(),
                precision.unwrap_or(0),
                scale.unwrap_or(0),
            );
            // Text compares as DataFusion compares it only in a byte-wise collation, and
            // only if it is text there: a TIME, JSON, ENUM or wide DECIMAL read as text
            // compares and sorts by its own rules in the database.
            let string = matches!(
                data_type.to_ascii_lowercase().as_str(),
                "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext"
            );
            if t == DataType::Utf8 && (!string || !byte_wise_collation(collation.as_deref())) {
                self.byte_wise.store(false, Ordering::Relaxed);
            }
            fields.push(Field::new(name, t, nullable != "NO"));
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    async fn run(&self, sql: &str, schema: SchemaRef, tx: &BatchSender) -> Result<()> {
        let mut conn = tokio::select! {
            c = self.conn() => c?,
            _ = tx.closed() => return Ok(()),
        };
        let id = conn.id();
        let started = tokio::select! {
            r = conn.exec_iter(sql, ()) => r,
            _ = tx.closed() => {
                self.kill(id).await;
                return Ok(());
            }
        };
        let mut rows = started.map_err(|e| self.error(&e))?;
        let mut batch = Batch::new(&schema);
        loop {
            let next = tokio::select! {
                r = rows.next() => r,
                _ = tx.closed() => {
                    self.kill(id).await;
                    return Ok(());
                }
            };
            match next.map_err(|e| self.error(&e))? {
                None => break,
                Some(row) => {
                    push_row(&mut batch, row.unwrap(), &schema)?;
                    if batch.full() {
                        let b =
                            std::mem::replace(&mut batch, Batch::new(&schema)).finish(&schema)?;
                        if tx.send(Ok(b)).await.is_err() {
                            self.kill(id).await;
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
}

/// An exact integer from a number the database sent (a DECIMAL arrives as its text).
fn integer(v: &Value, field: &Field) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::UInt(u) => i64::try_from(*u).map_err(|_| misfit(field, "an integer out of range")),
        Value::Bytes(b) => {
            let t = std::str::from_utf8(b).map_err(|_| misfit(field, "bytes"))?;
            // `SUM` of integers is a DECIMAL with no fraction, or `.0...` zeros.
            let whole = match t.split_once('.') {
                Some((w, f)) if f.bytes().all(|c| c == b'0') => w,
                Some(_) => return Err(misfit(field, "a number with a fraction")),
                None => t,
            };
            whole
                .parse::<i64>()
                .map_err(|_| misfit(field, "a number out of range"))
        }
        _ => Err(misfit(field, "a value of another type")),
    }
}

fn float(v: &Value, field: &Field) -> Result<f64> {
    match v {
        Value::Double(d) => Ok(*d),
        Value::Float(f) => Ok(f64::from(*f)),
        Value::Int(i) => Ok(*i as f64),
        Value::UInt(u) => Ok(*u as f64),
        Value::Bytes(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
            .ok_or_else(|| misfit(field, "text that is not a number")),
        _ => Err(misfit(field, "a value of another type")),
    }
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(y: i32, m: u32, d: u32) -> Option<i32> {
    chrono::NaiveDate::from_ymd_opt(y, m, d).map(|date| {
        (date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days() as i32
    })
}

/// Appends one row of values to `batch`, converted strictly to the plan's types.
fn push_row(batch: &mut Batch, values: Vec<Value>, schema: &Schema) -> Result<()> {
    if values.len() != batch.cols.len() {
        return Err(Error::Internal(format!(
            "the database answered {} columns where {} were expected",
            values.len(),
            batch.cols.len()
        )));
    }
    for ((col, v), field) in batch.cols.iter_mut().zip(values).zip(schema.fields()) {
        if v == Value::NULL {
            col.append_null();
            continue;
        }
        if matches!(col, Col::Null(_)) {
            return Err(misfit(field, "a value where only NULL was expected"));
        }
        match col {
            Col::I16(b) => b.append_value(
                i16::try_from(integer(&v, field)?)
                    .map_err(|_| misfit(field, "an integer out of range"))?,
            ),
            Col::I32(b) => b.append_value(
                i32::try_from(integer(&v, field)?)
                    .map_err(|_| misfit(field, "an integer out of range"))?,
            ),
            Col::I64(b) => b.append_value(integer(&v, field)?),
            Col::F32(b) => match v {
                Value::Float(f) => b.append_value(f),
                other => b.append_value(float(&other, field)? as f32),
            },
            Col::F64(b) => b.append_value(float(&v, field)?),
            Col::Bool(b) => match integer(&v, field)? {
                0 => b.append_value(false),
                1 => b.append_value(true),
                _ => return Err(misfit(field, "a number other than 0 and 1")),
            },
            Col::Text(b) => match v {
                Value::Bytes(bytes) => b.append_value(
                    std::str::from_utf8(&bytes)
                        .map_err(|_| misfit(field, "text that is not UTF-8"))?,
                ),
                Value::Int(i) => b.append_value(i.to_string()),
                Value::UInt(u) => b.append_value(u.to_string()),
                Value::Time(neg, days, h, m, s, us) => {
                    let sign = if neg { "-" } else { "" };
                    let hours = u64::from(days) * 24 + u64::from(h);
                    if us == 0 {
                        b.append_value(format!("{sign}{hours:02}:{m:02}:{s:02}"))
                    } else {
                        b.append_value(format!("{sign}{hours:02}:{m:02}:{s:02}.{us:06}"))
                    }
                }
                _ => return Err(misfit(field, "a value of another type")),
            },
            Col::Bytes(b) => match v {
                Value::Bytes(bytes) => b.append_value(bytes),
                _ => return Err(misfit(field, "a value of another type")),
            },
            Col::Date(b) => match v {
                Value::Date(y, m, d, ..) => b.append_value(
                    days_from_civil(i32::from(y), u32::from(m), u32::from(d))
                        .ok_or_else(|| misfit(field, "a zero or invalid date"))?,
                ),
                _ => return Err(misfit(field, "a value of another type")),
            },
            Col::Ts(b) => match v {
                Value::Date(y, mo, d, h, mi, s, us) => {
                    let days = days_from_civil(i32::from(y), u32::from(mo), u32::from(d))
                        .ok_or_else(|| misfit(field, "a zero or invalid date"))?;
                    let secs = i64::from(days) * 86_400
                        + i64::from(h) * 3600
                        + i64::from(mi) * 60
                        + i64::from(s);
                    b.append_value(secs * 1_000_000 + i64::from(us))
                }
                _ => return Err(misfit(field, "a value of another type")),
            },
            Col::Dec(b, p, s) => {
                let text = match &v {
                    Value::Bytes(bytes) => std::str::from_utf8(bytes)
                        .map_err(|_| misfit(field, "bytes"))?
                        .to_string(),
                    Value::Int(i) => i.to_string(),
                    Value::UInt(u) => u.to_string(),
                    _ => return Err(misfit(field, "a value of another type")),
                };
                b.append_value(decimal(&text, *p, *s, field)?);
            }
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
        assert_eq!(arrow_type("tinyint", "tinyint(1)", 3, 0), DataType::Boolean);
        assert_eq!(arrow_type("tinyint", "tinyint(4)", 3, 0), DataType::Int16);
        assert_eq!(
            arrow_type("int", "int(10) unsigned", 10, 0),
            DataType::Int64
        );
        assert_eq!(
            arrow_type("bigint", "bigint(20) unsigned", 20, 0),
            DataType::Decimal128(20, 0)
        );
        assert_eq!(
            arrow_type("decimal", "decimal(12,2)", 12, 2),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(
            arrow_type("decimal", "decimal(65,2)", 65, 2),
            DataType::Utf8
        );
        assert_eq!(
            arrow_type("timestamp", "timestamp(6)", 0, 0),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(
            arrow_type("varbinary", "varbinary(16)", 0, 0),
            DataType::Binary
        );
        assert_eq!(arrow_type("json", "longtext", 0, 0), DataType::Utf8);
        assert_eq!(arrow_type("bit", "bit(8)", 8, 0), DataType::Binary);
    }

    #[test]
    fn values_that_do_not_fit_fail_and_never_name_the_value() {
        let int = Field::new("n", DataType::Int64, true);
        assert_eq!(
            integer(&Value::Bytes(b"42.000".to_vec()), &int).unwrap(),
            42
        );
        let e = integer(&Value::Bytes(b"42.5".to_vec()), &int).unwrap_err();
        assert!(e.to_string().contains("fraction"), "{e}");
        assert!(!e.to_string().contains("42"), "{e}");
        let schema = Schema::new(vec![Field::new("d", DataType::Decimal128(5, 1), true)]);
        let mut b = Batch::new(&schema);
        let e = push_row(&mut b, vec![Value::Bytes(b"1.25".to_vec())], &schema).unwrap_err();
        assert!(e.to_string().contains("more places"), "{e}");
        push_row(&mut b, vec![Value::Bytes(b"1.20".to_vec())], &schema).unwrap();
        let flag = Schema::new(vec![Field::new("f", DataType::Boolean, true)]);
        let mut b = Batch::new(&flag);
        assert!(push_row(&mut b, vec![Value::Int(2)], &flag).is_err());
    }

    #[test]
    fn only_byte_wise_collations_without_padding_count_as_byte_wise() {
        assert!(byte_wise_collation(Some("utf8mb4_nopad_bin")));
        assert!(byte_wise_collation(Some("utf8mb4_0900_bin")));
        assert!(!byte_wise_collation(Some("utf8mb4_bin")));
        assert!(!byte_wise_collation(Some("utf8mb4_general_ci")));
    }
}
