//! Engines that speak Arrow Flight SQL behind a member: Doris, StarRocks, Dremio,
//! InfluxDB 3, Ballista, or another fedgate region.
//!
//! A [`FlightSqlDatabase`] is one engine reached over one gRPC channel (TLS with the
//! engine's CA and, where it asks, the member's client certificate). A table's columns
//! are the schema the engine announces for `SELECT * ... LIMIT 0`. What
//! [`super::pushdown`] writes runs as one statement, in the SQL dialect the member file
//! names for the engine, and its answer streams back as Arrow; each column is cast,
//! by position, to the type the plan expects, and a value that does not fit fails the
//! query rather than being turned into NULL.

use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::CastOptions;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::sql::client::FlightSqlServiceClient;
use async_trait::async_trait;
use futures::TryStreamExt;
use tonic::transport::Channel;

use super::remote::{BatchSender, Dialect, RemoteDatabase, quote};
use crate::config::{Database, DatabaseTls};
use crate::error::{Error, Result};

/// One Flight SQL engine.
pub struct FlightSqlDatabase {
    name: String,
    /// `host:port`, for messages.
    place: String,
    dialect: Dialect,
    channel: Channel,
}

impl fmt::Debug for FlightSqlDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlightSqlDatabase({} at {})", self.name, self.place)
    }
}

impl FlightSqlDatabase {
    /// Prepares a channel to `db`, whose SQL is `dialect`. Nothing connects until the
    /// first use.
    pub fn new(db: &Database, dialect: Dialect) -> Result<Arc<FlightSqlDatabase>> {
        let place = format!("{}:{}", db.host, db.port);
        let channel = match &db.tls {
            DatabaseTls::Disable => {
                let uri = if db.host.contains(':') {
                    format!("http://[{}]:{}", db.host, db.port)
                } else {
                    format!("http://{place}")
                };
                tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| Error::Config(format!("database {}: {e}", db.name)))?
                    .connect_timeout(db.connect_timeout)
                    .tcp_nodelay(true)
                    .connect_lazy()
            }
            DatabaseTls::VerifyFull { ca, client } => {
                let mut config = crate::trust::tls::database_client_config(
                    Some(ca),
                    client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                )?;
                // gRPC runs over HTTP/2, which TLS must agree on.
                config.alpn_protocols = vec![b"h2".to_vec()];
                crate::trust::tls::Connector::new(Arc::new(config), &db.host, db.port, None)
                    .channel(db.connect_timeout)?
            }
        };
        Ok(Arc::new(FlightSqlDatabase {
            name: db.name.clone(),
            place,
            dialect,
            channel,
        }))
    }

    fn client(&self) -> FlightSqlServiceClient<Channel> {
        FlightSqlServiceClient::new(self.channel.clone())
    }

    /// Classifies an engine's error: who is at fault and whether a retry may help.
    fn error(&self, e: arrow_flight::error::FlightError) -> Error {
        use arrow_flight::error::FlightError as F;
        match e {
            F::Tonic(status) => {
                use tonic::Code;
                let unavailable = matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Aborted
                        | Code::Unknown
                );
                // An engine's message may quote values; one that could not be reached
                // is said so by its code and transport error only.
                let mut reason = if unavailable {
                    format!("{:?}", status.code())
                } else {
                    format!("{} ({:?})", status.message(), status.code())
                };
                let mut src = std::error::Error::source(&*status);
                while let Some(s) = src {
                    reason = format!("{reason}: {s}");
                    src = s.source();
                }
                Error::Database {
                    database: self.name.clone(),
                    unavailable,
                    reason: format!("{}: {reason}", self.place),
                }
            }
            other => Error::Database {
                database: self.name.clone(),
                unavailable: false,
                reason: format!("{}: {other}", self.place),
            },
        }
    }

    /// The statement's answer, asked once more when the first attempt failed on the
    /// link itself (the engine closed an aged connection as the call started): no row
    /// has been read at that point, so asking again on a fresh connection repeats
    /// nothing. The engine's own refusals are not retried.
    async fn answer(
        &self,
        sql: &str,
    ) -> Result<Vec<arrow_flight::decode::FlightRecordBatchStream>> {
        match self.try_answer(sql).await {
            Err(Attempt::Link(e)) => {
                tracing::debug!(database = %self.name, error = %e, "Flight SQL link failed before the answer; asking again");
                self.try_answer(sql).await.map_err(|a| match a {
                    Attempt::Link(e) => self.error(e),
                    Attempt::Failed(e) => e,
                })
            }
            Err(Attempt::Failed(e)) => Err(e),
            Ok(streams) => Ok(streams),
        }
    }

    /// The statement's answer, endpoint by endpoint: the engine must answer from
    /// itself (a ticket without locations, or its own), not send the gateway to other
    /// servers it was not configured to trust.
    async fn try_answer(
        &self,
        sql: &str,
    ) -> std::result::Result<Vec<arrow_flight::decode::FlightRecordBatchStream>, Attempt> {
        let failed = |e: arrow_flight::error::FlightError| match &e {
            arrow_flight::error::FlightError::Tonic(s) if crate::error::link_failed(s) => {
                Attempt::Link(e)
            }
            _ => Attempt::Failed(self.error(e)),
        };
        let mut client = self.client();
        let info = client
            .execute(sql.to_string(), None)
            .await
            .map_err(failed)?;
        let mut streams = Vec::new();
        for endpoint in info.endpoint {
            let elsewhere = endpoint
                .location
                .iter()
                .any(|l| !l.uri.is_empty() && l.uri != "arrow-flight-reuse-connection://?");
            if elsewhere {
                return Err(Attempt::Failed(Error::Database {
                    database: self.name.clone(),
                    unavailable: false,
                    reason: format!(
                        "{}: the engine answers from other servers, which a member does not follow",
                        self.place
                    ),
                }));
            }
            let ticket = endpoint.ticket.ok_or_else(|| {
                Attempt::Failed(Error::Database {
                    database: self.name.clone(),
                    unavailable: false,
                    reason: format!("{}: an endpoint without a ticket", self.place),
                })
            })?;
            streams.push(client.do_get(ticket).await.map_err(failed)?);
        }
        Ok(streams)
    }
}

/// How an attempt at an answer failed: on the link (worth one more try) or otherwise.
enum Attempt {
    Link(arrow_flight::error::FlightError),
    Failed(Error),
}

/// The Arrow type a column announced by an engine is read as: the types the member's
/// plans work with, widened where that is exact (unsigned integers to wider signed
/// ones, `BIGINT UNSIGNED` to a 20-digit decimal) and otherwise as text.
pub fn arrow_type(t: &DataType) -> DataType {
    match t {
        DataType::Int8 | DataType::UInt8 | DataType::Int16 => DataType::Int16,
        DataType::UInt16 | DataType::Int32 => DataType::Int32,
        DataType::UInt32 | DataType::Int64 => DataType::Int64,
        DataType::UInt64 => DataType::Decimal128(20, 0),
        DataType::Float16 | DataType::Float32 => DataType::Float32,
        DataType::Float64 => DataType::Float64,
        DataType::Boolean => DataType::Boolean,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => DataType::Binary,
        DataType::Date32 => DataType::Date32,
        // Date64 counts milliseconds and may carry a time of day: kept exactly.
        DataType::Date64 => DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
        DataType::Timestamp(unit, tz) => DataType::Timestamp(*unit, tz.clone()),
        DataType::Decimal128(p, s) => DataType::Decimal128(*p, *s),
        DataType::Null => DataType::Null,
        _ => DataType::Utf8,
    }
}

#[async_trait]
impl RemoteDatabase for FlightSqlDatabase {
    fn name(&self) -> &str {
        &self.name
    }

    fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// An engine built on DataFusion compares text as DataFusion does; of the others
    /// the member knows nothing, so text comparisons stay in the gateway.
    fn byte_wise_text(&self) -> bool {
        self.dialect == Dialect::DataFusion
    }

    /// The member sets no session mode on a Flight SQL engine: in the MySQL dialect
    /// `||` keeps the engine's default meaning, OR.
    fn pipes_concatenate(&self) -> bool {
        self.dialect != Dialect::MySql
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
                | DataType::Timestamp(..)
                | DataType::Decimal128(..)
                | DataType::Null
        )
    }

    fn statement(&self, inner: &str, _fields: &[Arc<Field>]) -> Result<String> {
        Ok(inner.to_string())
    }

    async fn discover(&self, schema: &str, table: &str) -> Result<SchemaRef> {
        let name = if schema.is_empty() {
            quote(self.dialect, table)
        } else {
            format!(
                "{}.{}",
                quote(self.dialect, schema),
                quote(self.dialect, table)
            )
        };
        let mut client = self.client();
        let info = client
            .execute(format!("SELECT * FROM {name} LIMIT 0"), None)
            .await
            .map_err(|e| self.error(e))?;
        let announced = info.try_decode_schema().map_err(|e| Error::Database {
            database: self.name.clone(),
            unavailable: false,
            reason: format!("{}: the schema of {name}: {e}", self.place),
        })?;
        let fields: Vec<Field> = announced
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), arrow_type(f.data_type()), f.is_nullable()))
            .collect();
        if fields.is_empty() {
            return Err(Error::Database {
                database: self.name.clone(),
                unavailable: false,
                reason: format!("table {name} has no columns"),
            });
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    async fn run(&self, sql: &str, schema: SchemaRef, tx: &BatchSender) -> Result<()> {
        // Dropping the streams (the receiver went away) cancels the calls, and with
        // them the statement in the engine.
        let streams = tokio::select! {
            s = self.answer(sql) => s?,
            _ = tx.closed() => return Ok(()),
        };
        for mut stream in streams {
            loop {
                let next = tokio::select! {
                    b = stream.try_next() => b.map_err(|e| self.error(e))?,
                    _ = tx.closed() => return Ok(()),
                };
                let Some(batch) = next else { break };
                let batch = conform(&batch, &schema).map_err(|e| Error::Database {
                    database: self.name.clone(),
                    unavailable: false,
                    reason: e,
                })?;
                if tx.send(Ok(batch)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// `batch` with its columns, by position, cast to `schema`'s types. A value that does
/// not fit fails (the message names the column and types, never the value).
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> std::result::Result<RecordBatch, String> {
    if batch.num_columns() != schema.fields().len() {
        return Err(format!(
            "the engine answered {} columns where {} were expected",
            batch.num_columns(),
            schema.fields().len()
        ));
    }
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                return Ok(c.clone());
            }
            let refused = || {
                format!(
                    "column {} of type {} cannot be read as {}",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                )
            };
            let cast = arrow::compute::cast_with_options(c, f.data_type(), &strict)
                .map_err(|_| refused())?;
            // A cast that succeeds may still round (a decimal's scale, a double to a
            // float, nanoseconds to microseconds): it must come back to the same
            // values, or the answer would not be the engine's.
            let back = arrow::compute::cast_with_options(&cast, c.data_type(), &strict)
                .map_err(|_| refused())?;
            if back.as_ref() != c.as_ref() {
                return Err(refused());
            }
            Ok(cast)
        })
        .collect::<std::result::Result<_, String>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| format!("building a batch from the engine's answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    #[test]
    fn announced_types_widen_exactly_or_become_text() {
        assert_eq!(arrow_type(&DataType::UInt32), DataType::Int64);
        assert_eq!(arrow_type(&DataType::UInt64), DataType::Decimal128(20, 0));
        assert_eq!(arrow_type(&DataType::LargeUtf8), DataType::Utf8);
        assert_eq!(
            arrow_type(&DataType::Date64),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None)
        );
    }

    #[test]
    fn answers_are_cast_to_the_plan_and_values_that_do_not_fit_fail() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int32, true)]));
        let small = RecordBatch::try_from_iter(vec![(
            "x",
            Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
        )])
        .unwrap();
        let b = conform(&small, &schema).unwrap();
        assert_eq!(b.column(0).data_type(), &DataType::Int32);
        let big = RecordBatch::try_from_iter(vec![(
            "x",
            Arc::new(Int64Array::from(vec![1, i64::MAX])) as ArrayRef,
        )])
        .unwrap();
        let e = conform(&big, &schema).unwrap_err();
        assert!(e.contains("cannot be read as Int32"), "{e}");
        assert!(!e.contains(&i64::MAX.to_string()), "{e}");
        let text = RecordBatch::try_from_iter(vec![(
            "x",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        )])
        .unwrap();
        assert!(conform(&text, &schema).is_err());
        // A decimal whose scale would shrink is refused rather than rounded.
        let narrow = Arc::new(Schema::new(vec![Field::new(
            "d",
            DataType::Decimal128(10, 1),
            true,
        )]));
        let exact = RecordBatch::try_from_iter(vec![(
            "x",
            Arc::new(
                arrow::array::Decimal128Array::from(vec![125, 120])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ) as ArrayRef,
        )])
        .unwrap();
        assert!(conform(&exact, &narrow).is_err());
    }
}
