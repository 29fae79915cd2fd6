//! Local data sources: files read through DataFusion, and tables in databases.
//!
//! CSV files are read with every column as text. Published tables keep codes with
//! leading zeros (`021`), mixed units and free-form dates, so types are decided by the
//! mapping (a cast, a date format, a code table), never guessed from a sample.
//! Database tables keep the types their columns have ([`postgres::arrow_type`],
//! [`mysql::arrow_type`], or the Arrow types a Flight SQL engine answers with).

mod columns;
pub mod flight_sql;
pub mod mysql;
pub mod postgres;
pub mod pushdown;
pub mod remote;

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use crate::config::{Database, DatabaseKind, Source, SourceFormat, SourceKind};
use crate::error::{Error, Result};
use remote::{RemoteDatabase, RemoteTable};

/// The member's databases by name.
pub type Databases = BTreeMap<String, Arc<dyn RemoteDatabase>>;

/// Prepares the connection pool (or channel) of a database. Nothing connects until
/// the first use.
pub fn open(db: &Database) -> Result<Arc<dyn RemoteDatabase>> {
    Ok(match db.kind {
        DatabaseKind::Postgres => postgres::PgDatabase::new(db)?,
        DatabaseKind::MySql => mysql::MySqlDatabase::new(db)?,
        DatabaseKind::FlightSql(dialect) => flight_sql::FlightSqlDatabase::new(db, dialect)?,
    })
}

/// Registers a file source as a table named after it in `ctx`. A file that cannot be
/// read is a configuration error.
pub async fn register_file(ctx: &SessionContext, s: &Source) -> Result<()> {
    let SourceKind::File {
        format,
        path,
        delimiter,
    } = &s.kind
    else {
        return Err(Error::Internal(format!("source {} is not a file", s.name)));
    };
    let text = path
        .to_str()
        .ok_or_else(|| Error::Config(format!("source {:?}: path is not valid UTF-8", s.name)))?;
    let wrap = |e: String| Error::Config(format!("source {:?} ({}): {e}", s.name, path.display()));
    match format {
        SourceFormat::Csv => {
            let schema = csv_text_schema(path, *delimiter).map_err(|e| wrap(e.to_string()))?;
            let opts = CsvReadOptions::new()
                .has_header(true)
                .delimiter(*delimiter)
                .file_extension("")
                .schema(&schema);
            ctx.register_csv(crate::config::quote_ident(&s.name), text, opts)
                .await
                .map_err(|e| wrap(e.to_string()))
        }
        SourceFormat::Parquet => ctx
            .register_parquet(
                crate::config::quote_ident(&s.name),
                text,
                ParquetReadOptions::default().file_extension(""),
            )
            .await
            .map_err(|e| wrap(e.to_string())),
    }
}

/// Registers a database table as a table named after its source in `ctx`, after
/// reading its columns from the database. Fails when the database cannot be reached
/// or the table is missing; the caller decides what that costs.
pub async fn register_table(ctx: &SessionContext, s: &Source, dbs: &Databases) -> Result<()> {
    let SourceKind::Table {
        database,
        schema,
        table,
    } = &s.kind
    else {
        return Err(Error::Internal(format!("source {} is not a table", s.name)));
    };
    let db = dbs
        .get(database)
        .ok_or_else(|| Error::Internal(format!("no database {database}")))?;
    let t = RemoteTable::discover(db.clone(), schema, table).await?;
    ctx.register_table(crate::config::quote_ident(&s.name), Arc::new(t))
        .map_err(|e| Error::Internal(format!("registering source {}: {e}", s.name)))?;
    Ok(())
}

/// Reads a CSV header and returns a schema with every column as nullable text.
fn csv_text_schema(path: &std::path::Path, delimiter: u8) -> Result<Schema> {
    let file = std::fs::File::open(path).map_err(|e| Error::Config(e.to_string()))?;
    let (inferred, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .with_delimiter(delimiter)
        .infer_schema(file, Some(0))
        .map_err(|e| Error::Config(format!("reading the header: {e}")))?;
    if inferred.fields().is_empty() {
        return Err(Error::Config("the file has no header row".into()));
    }
    Ok(Schema::new(
        inferred
            .fields()
            .iter()
            .map(|f| Arc::new(Field::new(f.name(), DataType::Utf8, true)))
            .collect::<Vec<_>>(),
    ))
}
