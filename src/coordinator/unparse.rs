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
}
