//! Mapping local sources onto canonical datasets.
//!
//! A mapping is, in effect, a view: for each canonical field an SQL expression over
//! the source's local columns, optionally translated through a code table or parsed as
//! a date, and finally converted to the canonical type. [`view_sql`] writes that view
//! as SQL, so DataFusion can still push filters through it to the source.
//!
//! Conversions never drop a row: a value that does not translate or parse becomes
//! NULL, and [`unmapped_values`] (run by `fedgate check`) counts such values so that
//! nothing is lost silently.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Date32Builder, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::cast::as_string_array;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use crate::config::{
    CanonicalField, CodeTable, Dataset, FieldMapping, MEMBER_COLUMN, Mapping, normalize_key,
    quote_ident,
};

/// Name of the SQL function that translates through code table `t`.
pub fn code_function_name(table: &str) -> String {
    format!("code_{}", table.replace('-', "_"))
}

/// The SQL function that parses text as a date with a chrono format, or gives NULL.
pub const PARSE_DATE: &str = "fedgate_parse_date";

/// Registers the mapping functions (code tables, date parsing) in `ctx`.
pub fn register_functions(ctx: &SessionContext, tables: &[CodeTable]) {
    for t in tables {
        ctx.register_udf(ScalarUDF::from(CodeLookup::new(t)));
    }
    ctx.register_udf(ScalarUDF::from(ParseDate::new()));
}

/// The SQL type name DataFusion casts to for a canonical type.
pub fn sql_type(t: &DataType) -> &'static str {
    match t {
        DataType::Int64 => "BIGINT",
        DataType::Float64 => "DOUBLE",
        DataType::Boolean => "BOOLEAN",
        DataType::Date32 => "DATE",
        _ => "VARCHAR",
    }
}

/// The SQL expression computing one canonical field from local columns.
pub fn field_sql(f: &CanonicalField, m: &FieldMapping) -> String {
    let raw = format!("({})", m.expr);
    let converted = if let Some(t) = &m.code_table {
        format!("{}(CAST({raw} AS VARCHAR))", code_function_name(t))
    } else if let Some(fmt) = &m.date_format {
        format!("{PARSE_DATE}(CAST({raw} AS VARCHAR), {})", sql_string(fmt))
    } else {
        raw
    };
    format!("TRY_CAST({converted} AS {})", sql_type(&f.data_type))
}

/// The SQL of one mapping: a SELECT over the local source producing the canonical
/// columns in canonical order, then `member`.
pub fn mapping_sql(ds: &Dataset, m: &Mapping, member: &str) -> String {
    let mut cols: Vec<String> = ds
        .fields
        .iter()
        .zip(&m.fields)
        .map(|(f, (_, fm))| format!("{} AS {}", field_sql(f, fm), quote_ident(&f.name)))
        .collect();
    cols.push(format!("{} AS {MEMBER_COLUMN}", sql_string(member)));
    let mut sql = format!("SELECT {} FROM {}", cols.join(", "), quote_ident(&m.source));
    if let Some(f) = &m.filter {
        sql.push_str(&format!(" WHERE ({f})"));
    }
    sql
}

/// The SQL of a canonical dataset's view at a member: the union of its mappings.
pub fn view_sql(ds: &Dataset, mappings: &[&Mapping], member: &str) -> String {
    mappings
        .iter()
        .map(|m| mapping_sql(ds, m, member))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Values of one field that did not convert, with counts, most frequent first.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmapped {
    /// The canonical field.
    pub field: String,
    /// Raw value and how many rows carry it.
    pub values: Vec<(String, u64)>,
}

/// Counts, for each field of `m`, the rows whose source columns all have values but
/// whose canonical value is NULL: a code that did not translate, a date or number that
/// did not parse, a CASE with no matching branch. Each is reported with the source
/// values that produced it.
pub async fn unmapped_values(
    ctx: &SessionContext,
    ds: &Dataset,
    m: &Mapping,
) -> Result<Vec<Unmapped>, String> {
    let source = ctx
        .table(quote_ident(&m.source))
        .await
        .map_err(|e| format!("source {}: {e}", m.source))?;
    let schema = source.schema().clone();
    let mut out = Vec::new();
    for (f, (_, fm)) in ds.fields.iter().zip(&m.fields) {
        let parsed = ctx
            .parse_sql_expr(&fm.expr, &schema)
            .map_err(|e| format!("field {}: {e}", f.name))?;
        let mut cols: Vec<String> = parsed
            .column_refs()
            .iter()
            .map(|c| c.name.clone())
            .collect();
        cols.sort();
        cols.dedup();
        if cols.is_empty() {
            continue; // A constant: nothing from the source can go missing.
        }
        let quoted: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
        let present = quoted
            .iter()
            .map(|c| format!("{c} IS NOT NULL"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let value = if quoted.len() == 1 {
            format!("CAST({} AS VARCHAR)", quoted[0])
        } else {
            format!("concat_ws(' | ', {})", quoted.join(", "))
        };
        let mut cond = format!("{present} AND {} IS NULL", field_sql(f, fm));
        if let Some(filter) = &m.filter {
            cond = format!("({filter}) AND {cond}");
        }
        let sql = format!(
            "SELECT {value} AS v, count(*) AS n FROM {} WHERE {cond} GROUP BY 1 ORDER BY n DESC, v",
            quote_ident(&m.source)
        );
        let batches = ctx
            .sql(&sql)
            .await
            .map_err(|e| format!("field {}: {e}", f.name))?
            .collect()
            .await
            .map_err(|e| format!("field {}: {e}", f.name))?;
        let mut values = Vec::new();
        for b in &batches {
            let v = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8)
                .map_err(|e| e.to_string())?;
            let v = as_string_array(&v).map_err(|e| e.to_string())?;
            let n = b
                .column(1)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .ok_or("count is not Int64")?;
            for i in 0..b.num_rows() {
                values.push((v.value(i).to_string(), n.value(i) as u64));
            }
        }
        if !values.is_empty() {
            out.push(Unmapped {
                field: f.name.clone(),
                values,
            });
        }
    }
    Ok(out)
}

/// An SQL string literal.
pub fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The code for `key` (white space ignored), if the table has one.
pub fn lookup<'a>(entries: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    entries.get(&normalize_key(key)).map(String::as_str)
}

/// Days since 1970-01-01 of `text` read with the chrono `format`, or `None`.
pub fn parse_date(text: &str, format: &str) -> Option<i32> {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    let d = chrono::NaiveDate::parse_from_str(text.trim(), format).ok()?;
    i32::try_from((d - epoch).num_days()).ok()
}

/// `code_<table>(text)`: the code for a (normalized) key, or NULL.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CodeLookup {
    name: String,
    entries: Arc<BTreeMap<String, String>>,
    signature: Signature,
}

impl CodeLookup {
    fn new(t: &CodeTable) -> Self {
        CodeLookup {
            name: code_function_name(&t.name),
            entries: Arc::new(t.entries.clone()),
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for CodeLookup {
    fn name(&self) -> &str {
        &self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        map_text(args, |s| lookup(&self.entries, s).map(str::to_string))
    }
}

/// The body of a one-argument text function: `f` of every non-NULL value (NULL stays
/// NULL, and so does a value `f` has no answer for).
pub fn map_text(
    args: ScalarFunctionArgs,
    f: impl Fn(&str) -> Option<String>,
) -> DfResult<ColumnarValue> {
    let input = args.args[0].to_array(args.number_rows)?;
    let input = as_string_array(&input)?;
    let out: StringArray = input.iter().map(|v| v.and_then(&f)).collect();
    Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
}

/// `fedgate_parse_date(text, format)`: the date, or NULL when the text does not parse.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ParseDate {
    signature: Signature,
}

impl ParseDate {
    fn new() -> Self {
        ParseDate {
            signature: Signature::exact(
                vec![DataType::Utf8, DataType::Utf8],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for ParseDate {
    fn name(&self) -> &str {
        PARSE_DATE
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Date32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        let text = args.args[0].to_array(n)?;
        let text = as_string_array(&text)?;
        let fmt = args.args[1].to_array(n)?;
        let fmt = as_string_array(&fmt)?;
        let mut b = Date32Builder::with_capacity(n);
        for i in 0..n {
            if text.is_null(i) || fmt.is_null(i) {
                b.append_null();
                continue;
            }
            b.append_option(parse_date(text.value(i), fmt.value(i)));
        }
        Ok(ColumnarValue::Array(Arc::new(b.finish())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::canonical_schema;
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;

    fn dataset() -> Dataset {
        let fields = vec![
            CanonicalField {
                name: "county_code".into(),
                data_type: DataType::Utf8,
                description: String::new(),
                unit: String::new(),
            },
            CanonicalField {
                name: "pop".into(),
                data_type: DataType::Int64,
                description: String::new(),
                unit: String::new(),
            },
            CanonicalField {
                name: "published_on".into(),
                data_type: DataType::Date32,
                description: String::new(),
                unit: String::new(),
            },
        ];
        Dataset {
            name: "t".into(),
            description: String::new(),
            schema: canonical_schema(&fields),
            fields,
            cache: None,
        }
    }

    fn fm(expr: &str, code: Option<&str>, date: Option<&str>) -> FieldMapping {
        FieldMapping {
            expr: expr.into(),
            code_table: code.map(Into::into),
            date_format: date.map(Into::into),
        }
    }

    async fn ctx_with(rows: &[(&str, &str, &str)]) -> SessionContext {
        let ctx = SessionContext::new_with_config(crate::owner::session::session_config());
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            datafusion::arrow::datatypes::Field::new("区县", DataType::Utf8, true),
            datafusion::arrow::datatypes::Field::new("人口_万人", DataType::Utf8, true),
            datafusion::arrow::datatypes::Field::new("日期", DataType::Utf8, true),
        ]));
        let col = |i: usize| -> ArrayRef {
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| {
                        let v = [r.0, r.1, r.2][i];
                        if v.is_empty() {
                            None
                        } else {
                            Some(v.to_string())
                        }
                    })
                    .collect::<Vec<_>>(),
            ))
        };
        let batch = RecordBatch::try_new(schema.clone(), vec![col(0), col(1), col(2)]).unwrap();
        ctx.register_table(
            "src",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
        )
        .unwrap();
        let mut entries = BTreeMap::new();
        entries.insert("西湖区".to_string(), "330106".to_string());
        entries.insert(normalize_key("下城区"), "330105".to_string());
        register_functions(
            &ctx,
            &[CodeTable {
                name: "district".into(),
                entries,
            }],
        );
        ctx
    }

    fn mapping() -> Mapping {
        Mapping {
            dataset: "t".into(),
            source: "src".into(),
            filter: None,
            fields: vec![
                ("county_code".into(), fm("\"区县\"", Some("district"), None)),
                (
                    "pop".into(),
                    fm(
                        "round(TRY_CAST(\"人口_万人\" AS DOUBLE) * 10000)",
                        None,
                        None,
                    ),
                ),
                (
                    "published_on".into(),
                    fm("\"日期\"", None, Some("%Y/%m/%d")),
                ),
            ],
            index: 0,
        }
    }

    #[tokio::test]
    async fn renames_expressions_code_tables_and_dates() {
        let ctx = ctx_with(&[
            ("西湖区", "111.2992", "2020/01/22"),
            (" 下城 区", "52.6096", "2020/1/23"),
            ("钱塘新区", "bad", "22.01.2020"),
            ("", "", ""),
        ])
        .await;
        let sql = mapping_sql(&dataset(), &mapping(), "hangzhou");
        let out = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        let text = pretty_format_batches(&out).unwrap().to_string();
        let expected = "\
+-------------+---------+--------------+----------+
| county_code | pop     | published_on | member   |
+-------------+---------+--------------+----------+
| 330106      | 1112992 | 2020-01-22   | hangzhou |
| 330105      | 526096  | 2020-01-23   | hangzhou |
|             |         |              | hangzhou |
|             |         |              | hangzhou |
+-------------+---------+--------------+----------+";
        assert_eq!(text, expected);
    }

    proptest::proptest! {
        #[test]
        fn white_space_anywhere_in_a_name_does_not_change_its_code(
            name in "[\u{4e00}-\u{9fa5}]{1,6}",
            spaces in proptest::collection::vec((0usize..7, proptest::sample::select(vec![' ', '\u{3000}', '\t'])), 0..4),
        ) {
            let mut entries = BTreeMap::new();
            entries.insert(normalize_key(&name), "330106".to_string());
            let mut spaced: Vec<char> = name.chars().collect();
            for (at, c) in spaces {
                spaced.insert(at.min(spaced.len()), c);
            }
            let spaced: String = spaced.into_iter().collect();
            proptest::prop_assert_eq!(lookup(&entries, &spaced), Some("330106"));
            proptest::prop_assert_eq!(lookup(&entries, &format!("{name}市")), None);
        }

        #[test]
        fn every_published_date_format_round_trips(
            days in -20_000i32..40_000,
            format in proptest::sample::select(vec!["%Y-%m-%d", "%Y/%m/%d", "%Y%m%d", "%Y年%m月%d日"]),
        ) {
            let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(days as i64);
            let text = date.format(format).to_string();
            proptest::prop_assert_eq!(parse_date(&text, format), Some(days));
            proptest::prop_assert_eq!(parse_date(&format!("{text}x"), format), None);
        }
    }

    #[tokio::test]
    async fn bad_values_are_counted_not_dropped() {
        let ctx = ctx_with(&[
            ("西湖区", "1", "2020/01/22"),
            ("钱塘新区", "x", "2020-01-22"),
            ("钱塘新区", "2", "2020/01/22"),
            ("市直", "3", "2020/01/22"),
        ])
        .await;
        let un = unmapped_values(&ctx, &dataset(), &mapping()).await.unwrap();
        assert_eq!(un.len(), 3, "{un:?}");
        assert_eq!(un[0].field, "county_code");
        assert_eq!(
            un[0].values,
            vec![("钱塘新区".to_string(), 2), ("市直".to_string(), 1)]
        );
        assert_eq!(un[1].field, "pop");
        assert_eq!(un[1].values, vec![("x".to_string(), 1)]);
        assert_eq!(un[2].values, vec![("2020-01-22".to_string(), 1)]);
    }
}
