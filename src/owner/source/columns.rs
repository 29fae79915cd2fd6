//! Arrow columns filled row by row from a database's values, in exactly the types the
//! plan expects: the builders the PostgreSQL and MySQL clients share, the batch they
//! end in, and the strict conversions both need (a value that does not fit fails,
//! never rounds, and the failure names the column, never the value).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use super::remote::BATCH_ROWS;
use crate::error::{Error, Result};

/// One column being built.
pub(super) enum Col {
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Text(StringBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
    Dec(Decimal128Builder, u8, i8),
    Null(usize),
}

impl Col {
    /// Appends a NULL, whatever the column's type.
    pub(super) fn append_null(&mut self) {
        match self {
            Col::I16(b) => b.append_null(),
            Col::I32(b) => b.append_null(),
            Col::I64(b) => b.append_null(),
            Col::F32(b) => b.append_null(),
            Col::F64(b) => b.append_null(),
            Col::Bool(b) => b.append_null(),
            Col::Text(b) => b.append_null(),
            Col::Bytes(b) => b.append_null(),
            Col::Date(b) => b.append_null(),
            Col::Ts(b) => b.append_null(),
            Col::Dec(b, _, _) => b.append_null(),
            Col::Null(n) => *n += 1,
        }
    }
}

/// Rows being gathered into one Arrow batch of the plan's schema.
pub(super) struct Batch {
    pub(super) cols: Vec<Col>,
    len: usize,
}

impl Batch {
    /// Empty columns for `schema`: every type a source reads has its builder, and the
    /// types a database's values are read as text for end as text (cast at the end).
    pub(super) fn new(schema: &Schema) -> Batch {
        let n = BATCH_ROWS;
        let cols = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Int16 => Col::I16(Int16Builder::with_capacity(n)),
                DataType::Int32 => Col::I32(Int32Builder::with_capacity(n)),
                DataType::Int64 => Col::I64(Int64Builder::with_capacity(n)),
                DataType::Float32 => Col::F32(Float32Builder::with_capacity(n)),
                DataType::Float64 => Col::F64(Float64Builder::with_capacity(n)),
                DataType::Boolean => Col::Bool(BooleanBuilder::with_capacity(n)),
                DataType::Binary => Col::Bytes(BinaryBuilder::with_capacity(n, n * 16)),
                DataType::Date32 => Col::Date(Date32Builder::with_capacity(n)),
                DataType::Timestamp(TimeUnit::Microsecond, _) => {
                    Col::Ts(TimestampMicrosecondBuilder::with_capacity(n))
                }
                DataType::Decimal128(p, s) => Col::Dec(Decimal128Builder::with_capacity(n), *p, *s),
                DataType::Null => Col::Null(0),
                _ => Col::Text(StringBuilder::with_capacity(n, n * 16)),
            })
            .collect();
        Batch { cols, len: 0 }
    }

    /// Counts a row whose every column has been appended.
    pub(super) fn row_done(&mut self) {
        self.len += 1;
    }

    /// Rows gathered so far.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds as many rows as one batch should.
    pub(super) fn full(&self) -> bool {
        self.len >= BATCH_ROWS
    }

    /// The batch, with the plan's schema.
    pub(super) fn finish(self, schema: &SchemaRef) -> Result<RecordBatch> {
        let arrays: Vec<ArrayRef> = self
            .cols
            .into_iter()
            .zip(schema.fields())
            .map(|(c, f)| -> Result<ArrayRef> {
                Ok(match c {
                    Col::I16(mut b) => Arc::new(b.finish()),
                    Col::I32(mut b) => Arc::new(b.finish()),
                    Col::I64(mut b) => Arc::new(b.finish()),
                    Col::F32(mut b) => Arc::new(b.finish()),
                    Col::F64(mut b) => Arc::new(b.finish()),
                    Col::Bool(mut b) => Arc::new(b.finish()),
                    Col::Text(mut b) => {
                        let a: ArrayRef = Arc::new(b.finish());
                        if f.data_type() == &DataType::Utf8 {
                            a
                        } else {
                            arrow::compute::cast(&a, f.data_type())
                                .map_err(|e| Error::Internal(e.to_string()))?
                        }
                    }
                    Col::Bytes(mut b) => Arc::new(b.finish()),
                    Col::Date(mut b) => Arc::new(b.finish()),
                    Col::Ts(mut b) => Arc::new(b.finish().with_data_type(f.data_type().clone())),
                    Col::Dec(mut b, p, s) => Arc::new(
                        b.finish()
                            .with_precision_and_scale(p, s)
                            .map_err(|e| Error::Internal(e.to_string()))?,
                    ),
                    Col::Null(n) => arrow::array::new_null_array(&DataType::Null, n),
                })
            })
            .collect::<Result<_>>()?;
        RecordBatch::try_new_with_options(
            schema.clone(),
            arrays,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(self.len)),
        )
        .map_err(|e| Error::Internal(format!("building a batch from database rows: {e}")))
    }
}

/// A value that does not fit the type the plan expects. It names the column and the
/// type, never the value: the error may travel to a caller whose grant does not cover
/// the raw column.
pub(super) fn misfit(field: &Field, what: &str) -> Error {
    Error::Internal(format!(
        "the database answered {what} for column {} of type {}",
        field.name(),
        field.data_type()
    ))
}

/// A decimal from the text a database sent, exactly: more fraction digits than the
/// scale (other than trailing zeros) or more digits than the precision fail. Arrow's
/// parser would cut the extra places, and an answer must not change a value.
pub(super) fn decimal(text: &str, precision: u8, scale: i8, field: &Field) -> Result<i128> {
    if let Some((_, frac)) = text.split_once('.')
        && frac.trim_end_matches('0').len() > scale.max(0) as usize
    {
        return Err(misfit(field, "a decimal with more places"));
    }
    arrow::compute::kernels::cast_utils::parse_decimal::<arrow::datatypes::Decimal128Type>(
        text, precision, scale,
    )
    .map_err(|_| misfit(field, "a decimal that does not fit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_or_refused_without_their_value() {
        let f = Field::new("price", DataType::Decimal128(5, 2), true);
        assert_eq!(decimal("123.40", 5, 2, &f).unwrap(), 12340);
        assert_eq!(decimal("-1.5000", 5, 2, &f).unwrap(), -150);
        assert_eq!(decimal("7", 5, 2, &f).unwrap(), 700);
        for bad in ["1.234", "0.0000001", "1234.5", "NaN", "1e400"] {
            let e = decimal(bad, 5, 2, &f).unwrap_err().to_string();
            assert!(e.contains("column price"), "{bad}: {e}");
            assert!(!e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_batch_has_the_plans_types_and_counts_its_rows() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, true),
            Field::new("t", DataType::LargeUtf8, true),
            Field::new("z", DataType::Null, true),
        ]));
        let mut b = Batch::new(&schema);
        for i in 0..3 {
            match &mut b.cols[0] {
                Col::I64(c) => c.append_value(i),
                _ => panic!("not Int64"),
            }
            match &mut b.cols[1] {
                Col::Text(c) => c.append_value(format!("v{i}")),
                _ => panic!("not text"),
            }
            b.cols[2].append_null();
            b.row_done();
        }
        assert_eq!(b.len(), 3);
        assert!(!b.full());
        let batch = b.finish(&schema).unwrap();
        assert_eq!(batch.schema(), schema);
        assert_eq!(batch.num_rows(), 3);
    }
}
