//! Arrow record batches on the wire, using Arrow Flight's IPC encoder and decoder.
//!
//! Results cross gateways as Arrow IPC messages ([`ArrowChunk`]: the FlightData
//! header and body). arrow-flight does the encoding, including dictionaries and the
//! splitting of large batches below the gRPC message limit.

use arrow_flight::FlightData;
use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use futures::{Stream, StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::proto::v1::ArrowChunk;

/// Largest IPC message body the encoder aims for (gRPC's default limit is 4 MiB).
const TARGET_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// Encodes a stream of batches (schema first, even when there are no rows).
pub fn encode<S>(schema: SchemaRef, batches: S) -> impl Stream<Item = Result<ArrowChunk>> + Send
where
    S: Stream<Item = Result<RecordBatch>> + Send + 'static,
{
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_max_flight_data_size(TARGET_MESSAGE_BYTES)
        .build(batches.map_err(|e| FlightError::ExternalError(Box::new(e))))
        .map(|r| {
            r.map(|fd| ArrowChunk {
                header: fd.data_header,
                body: fd.data_body,
            })
            .map_err(from_flight)
        })
}

/// A decoded message: the schema, or a batch.
pub enum Decoded {
    /// The stream's schema (always first).
    Schema(SchemaRef),
    /// A record batch.
    Batch(RecordBatch),
}

/// Decodes a stream of chunks into the schema and batches.
pub fn decode<S>(chunks: S) -> impl Stream<Item = Result<Decoded>> + Send
where
    S: Stream<Item = Result<ArrowChunk>> + Send + 'static,
{
    let flight = chunks
        .map_ok(|c| FlightData {
            data_header: c.header,
            data_body: c.body,
            ..Default::default()
        })
        .map_err(|e| FlightError::ExternalError(Box::new(e)));
    FlightDataDecoder::new(flight).filter_map(|r| async move {
        match r {
            Ok(d) => match d.payload {
                DecodedPayload::Schema(s) => Some(Ok(Decoded::Schema(s))),
                DecodedPayload::RecordBatch(b) => Some(Ok(Decoded::Batch(b))),
                DecodedPayload::None => None,
            },
            Err(e) => Some(Err(from_flight(e))),
        }
    })
}

fn from_flight(e: FlightError) -> Error {
    match e {
        FlightError::ExternalError(inner) => match inner.downcast::<Error>() {
            Ok(mine) => *mine,
            Err(other) => Error::Internal(other.to_string()),
        },
        FlightError::Arrow(a) => Error::Internal(format!("arrow: {a}")),
        other => Error::Internal(format!("arrow ipc: {other}")),
    }
}

/// Encodes a result stream as Arrow IPC chunks, counting its rows as they pass.
pub fn counted_chunks(
    stream: datafusion::execution::SendableRecordBatchStream,
) -> (
    impl futures::Stream<Item = crate::Result<crate::proto::v1::ArrowChunk>> + Send,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let rows = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = rows.clone();
    let schema = stream.schema();
    let batches = futures::StreamExt::map(stream, move |r| {
        let b = r.map_err(crate::Error::from_datafusion)?;
        counted.fetch_add(b.num_rows() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(b)
    });
    (encode(schema, batches), rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[tokio::test]
    async fn batches_round_trip_and_empty_results_keep_their_schema() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("西湖区"), None])),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .unwrap();
        let chunks: Vec<_> = encode(
            schema.clone(),
            futures::stream::iter(vec![Ok(batch.clone())]),
        )
        .collect()
        .await;
        let out: Vec<_> = decode(futures::stream::iter(chunks))
            .try_collect()
            .await
            .unwrap();
        assert!(matches!(&out[0], Decoded::Schema(s) if s == &schema));
        assert!(matches!(&out[1], Decoded::Batch(b) if b == &batch));

        let chunks: Vec<_> = encode(schema.clone(), futures::stream::empty())
            .collect()
            .await;
        let out: Vec<_> = decode(futures::stream::iter(chunks))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Decoded::Schema(s) if s == &schema));
    }
}
