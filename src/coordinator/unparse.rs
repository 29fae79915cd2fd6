//! Writing plans and expressions back to SQL for members.
//!
//! DataFusion's default unparser dialect compiles a regular expression for every
//! identifier it writes, to decide whether the identifier needs quotes. A federated
//! plan writes member SQL several times (filters offered to a scan, each pushed
//! aggregate or top-k, each scan), and those compilations were about a quarter of the
//! time it took to plan a small query anew. [`MemberDialect`] makes the same decision
//! with a plain character check, so the SQL members receive is unchanged.

use datafusion::sql::sqlparser::keywords::ALL_KEYWORDS;
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::Dialect;

/// DataFusion's default unparser dialect without the per-identifier regular
/// expression. The default dialect overrides only the quoting decision, so every other
/// choice is the trait's default here too.
pub struct MemberDialect;

impl Dialect for MemberDialect {
    fn identifier_quote_style(&self, identifier: &str) -> Option<char> {
        // The default dialect quotes an identifier that does not match
        // `^[a-zA-Z_][a-zA-Z0-9_]*$`, that has an ASCII capital letter (an unquoted
        // name is folded to lower case when parsed), or that is a keyword other than
        // `ID`. A plain identifier is ASCII, so its ASCII upper case is its upper case.
        let mut chars = identifier.chars();
        let plain = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain || identifier.bytes().any(|b| b.is_ascii_uppercase()) {
            return Some('"');
        }
        let upper = identifier.to_ascii_uppercase();
        // The keyword list is sorted (sqlparser's tokenizer searches it the same way).
        let keyword = upper != "ID" && ALL_KEYWORDS.binary_search(&upper.as_str()).is_ok();
        keyword.then_some('"')
    }
}

/// An unparser writing SQL exactly as DataFusion's default one does.
pub fn unparser() -> Unparser<'static> {
    Unparser::new(&MemberDialect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::unparser::dialect::DefaultDialect;

    #[test]
    fn quotes_exactly_the_identifiers_the_default_dialect_quotes() {
        let mut names: Vec<String> = [
            "",
            "x",
            "_",
            "_x1",
            "county_code",
            "member",
            "id",
            "ID",
            "Id",
            "select",
            "SELECT",
            "user",
            "count",
            "1a",
            "a-b",
            "a b",
            "c0",
            "pop_total",
            "straße",
            "ß",
            "ı",
            "名前",
            "a\"b",
            "sum(census.pop_total)",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every keyword, in lower case (as a column may be named) and as written.
        for k in ALL_KEYWORDS {
            names.push(k.to_string());
            names.push(k.to_lowercase());
        }
        for n in &names {
            assert_eq!(
                MemberDialect.identifier_quote_style(n),
                DefaultDialect {}.identifier_quote_style(n),
                "{n:?}"
            );
        }
    }

    /// A filter is pushed into a member scan when its text can be written, which is
    /// decided once with a placeholder in a shape's optimized plan; the member SQL is
    /// written later with the value bound. Every value a shape binds must therefore be
    /// writable, or a query would fail where its first of the shape did not.
    #[test]
    fn every_value_a_shape_binds_can_be_written_into_member_sql() {
        use crate::owner::shape::{Kind, Literal, value_as};
        use datafusion::arrow::datatypes::{DataType, TimeUnit};
        use datafusion::common::ScalarValue;
        use datafusion::logical_expr::{col, lit};
        let literals = [
            (Kind::Integer, "42"),
            (Kind::Integer, "-7"),
            (Kind::Fraction, "12.5"),
            (Kind::Text, "O'Brien \\ 西湖区"),
            (Kind::Text, "2024-02-29"),
            (Kind::Text, "2024-02-29 12:30:00.5"),
        ];
        let types = [
            DataType::Int8,
            DataType::Int16,
            DataType::Int32,
            DataType::Int64,
            DataType::UInt8,
            DataType::UInt16,
            DataType::UInt32,
            DataType::UInt64,
            DataType::Float16,
            DataType::Float32,
            DataType::Float64,
            DataType::Decimal32(9, 2),
            DataType::Decimal64(18, 2),
            DataType::Decimal128(38, 4),
            DataType::Decimal256(76, 4),
            DataType::Utf8,
            DataType::LargeUtf8,
            DataType::Utf8View,
            DataType::Date32,
            DataType::Date64,
            DataType::Timestamp(TimeUnit::Second, None),
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            DataType::Timestamp(TimeUnit::Nanosecond, Some("+08:00".into())),
            DataType::Boolean,
            DataType::Binary,
        ];
        let mut bound = 0;
        for (kind, text) in literals {
            let literal = Literal {
                kind,
                text: text.into(),
            };
            for t in &types {
                let Some(v) = value_as(&literal, t) else {
                    continue;
                };
                bound += 1;
                let e = col("x").eq(lit(v.clone()));
                assert!(
                    unparser().expr_to_sql(&e).is_ok(),
                    "{v:?} as {t} cannot be written"
                );
            }
        }
        // Integers into every integer, decimal and float64 type, at least.
        assert!(bound >= 20, "{bound}");
        // A prepared statement's values of the kinds it may bind as they are.
        let mut kinds = 0;
        for t in types
            .iter()
            .filter(|t| crate::owner::shape::compared_kind(t))
        {
            let v = ["1", "2024-02-29", "2024-02-29 12:30:00.5", "true"]
                .iter()
                .find_map(|s| {
                    ScalarValue::Utf8(Some(s.to_string()))
                        .cast_to(t)
                        .ok()
                        .filter(|v| !v.is_null())
                })
                .unwrap_or_else(|| panic!("no sample value of {t}"));
            kinds += 1;
            let e = col("x").eq(lit(v.clone()));
            assert!(
                unparser().expr_to_sql(&e).is_ok(),
                "{v:?} as {t} cannot be written"
            );
        }
        assert!(kinds >= 20, "{kinds}");
    }
}
