//! The SQL a member accepts and the sessions it plans in: one query statement and nothing
//! else, bounded in size and nesting before any planning, and the DataFusion session
//! settings every member context is built with.

use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Error, Result};

/// SQL options for anything a caller sends: queries only.
pub fn query_only() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Refuses anything but a single query (SELECT, WITH, VALUES), before planning.
pub fn only_query(stmt: &datafusion::sql::parser::Statement) -> Result<()> {
    use datafusion::sql::parser::Statement;
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    match stmt {
        Statement::Statement(s) if matches!(**s, Sql::Query(_)) => Ok(()),
        _ => Err(Error::InvalidQuery(
            "only queries (SELECT) are accepted; statements that define or change data are not supported".into(),
        )),
    }
}

/// The longest query text a gateway accepts, in bytes.
pub const MAX_QUERY_BYTES: usize = 1 << 20;

/// How deeply a query's expressions may nest (see [`nesting`]).
pub const MAX_NESTING: usize = 256;

/// An upper estimate of how deep the expression trees of `sql` nest, read from its
/// tokens without building them: parentheses, plus the longest run of operators
/// between two separators (a chain `a + b + ... ` is a tree as deep as it is long).
/// Planning and optimizing walk these trees recursively, so a query nested past
/// [`MAX_NESTING`] is refused before anything builds it.
pub fn nesting(sql: &str) -> Result<usize> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| Error::InvalidQuery(format!("the query does not tokenize: {e}")))?;
    // Per open parenthesis: the operators in the current run.
    let mut runs: Vec<usize> = vec![0];
    let mut deepest = 0;
    for t in &tokens {
        match t {
            Token::LParen => runs.push(0),
            Token::RParen => {
                if runs.len() > 1 {
                    runs.pop();
                }
            }
            Token::Comma | Token::SemiColon => *runs.last_mut().expect("one run") = 0,
            Token::Word(w)
                if matches!(
                    w.keyword,
                    Keyword::SELECT
                        | Keyword::FROM
                        | Keyword::WHERE
                        | Keyword::GROUP
                        | Keyword::HAVING
                        | Keyword::ORDER
                        | Keyword::LIMIT
                        | Keyword::ON
                        | Keyword::WHEN
                        | Keyword::THEN
                        | Keyword::ELSE
                        | Keyword::UNION
                ) =>
            {
                *runs.last_mut().expect("one run") = 0
            }
            // A qualified name (`t.x`) builds no deeper tree.
            Token::Whitespace(_) | Token::Word(_) | Token::Number(..) | Token::Period => {}
            Token::SingleQuotedString(_) | Token::DoubleQuotedString(_) => {}
            _ => *runs.last_mut().expect("one run") += 1,
        }
        if let Token::Word(w) = t
            && matches!(w.keyword, Keyword::AND | Keyword::OR | Keyword::NOT)
        {
            *runs.last_mut().expect("one run") += 1;
        }
        deepest = deepest.max(runs.len() + runs.last().copied().unwrap_or(0));
    }
    Ok(deepest)
}

/// Parses a caller's SQL: exactly one query statement, of bounded size and nesting.
pub fn parse_query(
    state: &datafusion::execution::SessionState,
    sql: &str,
) -> Result<datafusion::sql::parser::Statement> {
    if sql.len() > MAX_QUERY_BYTES {
        return Err(Error::InvalidQuery(format!(
            "the query is {} bytes long, more than the {MAX_QUERY_BYTES} a gateway accepts",
            sql.len()
        )));
    }
    let depth = nesting(sql)?;
    if depth > MAX_NESTING {
        return Err(Error::InvalidQuery(format!(
            "the query's expressions nest about {depth} levels deep (parentheses and chained \
             operators), more than the {MAX_NESTING} a gateway plans; split long chains, \
             for example with IN (...) lists"
        )));
    }
    let stmt = state
        .sql_to_statement(sql, &state.config().options().sql_parser.dialect)
        .map_err(Error::from_datafusion)?;
    only_query(&stmt)?;
    Ok(stmt)
}

/// Plans a parsed query, refusing anything that is not read-only.
pub async fn plan_query(
    state: &datafusion::execution::SessionState,
    stmt: datafusion::sql::parser::Statement,
) -> Result<LogicalPlan> {
    let plan = state
        .statement_to_plan(stmt)
        .await
        .map_err(Error::from_datafusion)?;
    query_only()
        .verify_plan(&plan)
        .map_err(|e| Error::InvalidQuery(e.to_string()))?;
    Ok(plan)
}

/// The session settings shared by every context fedgate builds.
pub fn session_config() -> SessionConfig {
    let mut cfg = SessionConfig::new()
        .with_information_schema(false)
        .with_target_partitions(2);
    // Canonical text columns are Utf8 everywhere; keep SQL casts and Parquet reads
    // from switching to the view variant so that every member returns the same types.
    cfg.options_mut().sql_parser.map_string_types_to_utf8view = false;
    cfg.options_mut().execution.parquet.schema_force_view_types = false;
    cfg
}

/// A context of a member's engine.
///
/// Common-subexpression elimination is left out: it puts a projection of
/// `__common_expr` columns under filters, a shape DataFusion's SQL unparser writes as a
/// derived table whose columns the outer query then names by the wrong table. Member
/// plans are small, so computing a repeated expression twice costs little.
pub fn member_context() -> SessionContext {
    context_with(session_config())
}

/// A member context that runs every plan in one partition: its answers are a
/// deterministic function of its inputs (no thread decides which rows come first).
pub(crate) fn sequential_context() -> SessionContext {
    context_with(session_config().with_target_partitions(1))
}

pub(crate) fn context_with(config: SessionConfig) -> SessionContext {
    let mut rules = datafusion::optimizer::Optimizer::new().rules;
    rules.retain(|r| r.name() != "common_sub_expression_eliminate");
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .with_optimizer_rules(rules)
        .build();
    SessionContext::new_with_state(state)
}
