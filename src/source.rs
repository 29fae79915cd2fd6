//! Local data sources: files read through DataFusion.
//!
//! CSV files are read with every column as text. Published tables keep codes with
//! leading zeros (`021`), mixed units and free-form dates, so types are decided by the
//! mapping (a cast, a date format, a code table), never guessed from a sample.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use crate::config::{Source, SourceFormat};
use crate::error::{Error, Result};

/// Registers each source as a table named after it in `ctx`.
pub async fn register_sources(ctx: &SessionContext, sources: &[Source]) -> Result<()> {
    for s in sources {
        register(ctx, s).await.map_err(|e| {
            Error::Config(format!("source {:?} ({}): {e}", s.name, s.path.display()))
        })?;
    }
    Ok(())
}

async fn register(ctx: &SessionContext, s: &Source) -> Result<()> {
    let path = s
        .path
        .to_str()
        .ok_or_else(|| Error::Config("path is not valid UTF-8".into()))?;
    match s.format {
        SourceFormat::Csv => {
            let schema = csv_text_schema(s)?;
            let opts = CsvReadOptions::new()
                .has_header(true)
                .delimiter(s.delimiter)
                .file_extension("")
                .schema(&schema);
            ctx.register_csv(crate::config::quote_ident(&s.name), path, opts)
                .await
                .map_err(|e| Error::Config(e.to_string()))
        }
        SourceFormat::Parquet => ctx
            .register_parquet(
                crate::config::quote_ident(&s.name),
                path,
                ParquetReadOptions::default().file_extension(""),
            )
            .await
            .map_err(|e| Error::Config(e.to_string())),
    }
}

/// Reads a CSV header and returns a schema with every column as nullable text.
fn csv_text_schema(s: &Source) -> Result<Schema> {
    let file = std::fs::File::open(&s.path).map_err(|e| Error::Config(e.to_string()))?;
    let (inferred, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .with_delimiter(s.delimiter)
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
