//! Plans reused across literal values: a query's *shape* is its statement with the
//! constants of its filters replaced by placeholders, so that two lookups that differ
//! only in the key they look up share one logical plan (written, and then optimized
//! with its placeholders in place), as a prepared statement would.
//!
//! Only what is safe by construction is lifted out of the text:
//!
//! - a number or single-quoted string that is one side of a comparison (`=`, `<>`,
//!   `<`, `<=`, `>`, `>=`), an item of an `IN` list, or a bound of a `BETWEEN`, whose
//!   other side is not itself a constant;
//! - and only in `WHERE` and `HAVING` clauses (of the query, its common table
//!   expressions, derived tables and set operations), never in a select list, whose
//!   column names would then name a placeholder, nor in `LIMIT`, `GROUP BY` or
//!   `ORDER BY`, where a number means a count or a position.
//!
//! A value is bound as the type the planner gave its placeholder (the type of what it
//! is compared with), and only where that gives the comparison the planner would have
//! made with the constant in place: an integer with any integer type, `float64` or a
//! decimal, a fraction with `float64` only, a string with a string, date or timestamp
//! type (the same cast the planner's coercion applies). Any other pairing, a value
//! that does not fit, or a shape the planner cannot type makes the query plan as
//! written: reuse is a shortcut that is never the only way to an answer.
//!
//! The first query of a shape binds its values into the written plan, which is then
//! optimized and planned physically as any other. From the second on, the shape's
//! own plan is optimized once with its placeholders in place and each query binds its
//! values into that (at the coordinator; at a data owner only under grants that do
//! not rewrite the plan), so only physical planning runs per value. Every decision
//! that depends on a value is made after binding and sees the value: which members
//! hold the key, the member SQL written, what a data owner sends to its databases and,
//! under `aggregate` and `verify` grants, the owner's rewrite and its checks.

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Query, SetExpr, Statement, TableFactor, Value, visit_expressions,
    visit_expressions_mut,
};
use std::ops::ControlFlow;

/// The most constants a shape lifts; a statement with more is planned as written.
pub const MAX_LITERALS: usize = 256;

/// What kind of constant a placeholder stands for, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer that fits `i64`.
    Integer,
    /// A number with a fraction or an exponent.
    Fraction,
    /// A single-quoted string.
    Text,
}

/// A constant lifted out of a statement.
#[derive(Debug, Clone)]
pub struct Literal {
    pub kind: Kind,
    pub text: String,
}

/// A statement with its filter constants replaced by `$1`, `$2`, ... in the order they
/// were lifted, and the constants in that order.
#[derive(Debug, Clone)]
pub struct Shaped {
    pub statement: datafusion::sql::parser::Statement,
    pub literals: Vec<Literal>,
}

impl Shaped {
    /// The cache key of the shape: its text and the kind of every constant, so that
    /// `x = 1` and `x = 1.5` are different shapes.
    pub fn key(&self) -> String {
        let kinds: String = self
            .literals
            .iter()
            .map(|l| match l.kind {
                Kind::Integer => 'i',
                Kind::Fraction => 'f',
                Kind::Text => 't',
            })
            .collect();
        format!("{}\u{0}{kinds}", self.statement)
    }
}

/// The shape of `stmt`, or `None` when it has no constant to lift or already holds
/// placeholders of its own (a prepared statement is its own shape).
pub fn shape(stmt: &datafusion::sql::parser::Statement) -> Option<Shaped> {
    let datafusion::sql::parser::Statement::Statement(inner) = stmt else {
        return None;
    };
    let Statement::Query(query) = inner.as_ref() else {
        return None;
    };
    let mut has_placeholder = false;
    let _ = visit_expressions(query.as_ref(), |e| {
        if let Expr::Value(v) = e
            && matches!(v.value, Value::Placeholder(_))
        {
            has_placeholder = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if has_placeholder {
        return None;
    }
    let mut query = query.clone();
    let mut literals = Vec::new();
    lift_query(&mut query, &mut |e| lift(e, &mut literals));
    // A long IN list is a shape of its own for every length: it is planned as written
    // rather than cached with a placeholder per item.
    if literals.is_empty() || literals.len() > MAX_LITERALS {
        return None;
    }
    Some(Shaped {
        statement: datafusion::sql::parser::Statement::Statement(Box::new(Statement::Query(query))),
        literals,
    })
}

/// Whether every placeholder of a prepared statement stands where a shape lifts a
/// constant (one side of a comparison whose other side is not a constant, an `IN`
/// list's item, a `BETWEEN` bound, in `WHERE` and `HAVING`). Its values are then only
/// compared, as a shape's constants are, and a plan optimized with its placeholders in
/// place holds for every value. A placeholder anywhere else (a select list, a
/// `LIMIT`, a function's argument) makes it `false`.
pub fn placeholders_only_compared(stmt: &datafusion::sql::parser::Statement) -> bool {
    let datafusion::sql::parser::Statement::Statement(inner) = stmt else {
        return false;
    };
    let Statement::Query(query) = inner.as_ref() else {
        return false;
    };
    let is_placeholder =
        |e: &Expr| matches!(e, Expr::Value(v) if matches!(v.value, Value::Placeholder(_)));
    let mut query = query.clone();
    let mut compared = 0;
    // Each placeholder in a lifted position is replaced by a number, so that any left
    // afterwards stands elsewhere.
    lift_query(&mut query, &mut |e| {
        if is_placeholder(e)
            && let Expr::Value(v) = e
        {
            v.value = Value::Number("0".into(), false);
            compared += 1;
        }
    });
    let mut elsewhere = false;
    let _ = visit_expressions(query.as_ref(), |e| {
        if is_placeholder(e) {
            elsewhere = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    compared > 0 && !elsewhere
}

/// A shape's plan optimized once with its placeholders in place, for its queries to
/// bind their values into; `None` when the plan reads the clock (such a plan belongs to
/// each query, [`crate::owner::session::reads_the_clock`]) or cannot be optimized
/// before its values are known (logged at `debug`; its queries are then optimized for
/// their values).
pub fn optimize_with_placeholders(
    state: &datafusion::execution::SessionState,
    plan: &LogicalPlan,
) -> Option<LogicalPlan> {
    if crate::owner::session::reads_the_clock(plan) {
        return None;
    }
    state
        .optimize(plan)
        .inspect_err(|e| {
            tracing::debug!(target: "fedgate::planning", error = %e, "A shape's plan could not be optimized with placeholders; its queries are optimized for their values")
        })
        .ok()
}

/// Whether a prepared statement's value of type `t` may be bound into a plan optimized
/// with its placeholder in place: the kinds a shape binds its constants as (numbers,
/// text, dates, timestamps) and booleans, which member SQL writes as they are.
pub fn compared_kind(t: &DataType) -> bool {
    use DataType::*;
    t.is_integer()
        || matches!(
            t,
            Float32
                | Float64
                | Decimal32(..)
                | Decimal64(..)
                | Decimal128(..)
                | Decimal256(..)
                | Utf8
                | LargeUtf8
                | Utf8View
                | Date32
                | Date64
                | Timestamp(..)
                | Boolean
        )
}

/// Calls `at` on every expression in a position a shape lifts a constant from.
fn lift_query(q: &mut Query, at: &mut dyn FnMut(&mut Expr)) {
    if let Some(with) = &mut q.with {
        for cte in &mut with.cte_tables {
            lift_query(&mut cte.query, at);
        }
    }
    lift_set(&mut q.body, at);
}

fn lift_set(s: &mut SetExpr, at: &mut dyn FnMut(&mut Expr)) {
    match s {
        SetExpr::Select(select) => {
            for from in &mut select.from {
                lift_table(&mut from.relation, at);
                for join in &mut from.joins {
                    lift_table(&mut join.relation, at);
                }
            }
            if let Some(e) = &mut select.selection {
                lift_filter(e, at);
            }
            if let Some(e) = &mut select.having {
                lift_filter(e, at);
            }
        }
        SetExpr::Query(q) => lift_query(q, at),
        SetExpr::SetOperation { left, right, .. } => {
            lift_set(left, at);
            lift_set(right, at);
        }
        _ => {}
    }
}

fn lift_table(t: &mut TableFactor, at: &mut dyn FnMut(&mut Expr)) {
    match t {
        TableFactor::Derived { subquery, .. } => lift_query(subquery, at),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => {
            lift_table(&mut table_with_joins.relation, at);
            for join in &mut table_with_joins.joins {
                lift_table(&mut join.relation, at);
            }
        }
        _ => {}
    }
}

/// Lifts the constants of one filter expression (subqueries within it included: their
/// select lists name nothing the caller sees).
fn lift_filter(e: &mut Expr, at: &mut dyn FnMut(&mut Expr)) {
    let _ = visit_expressions_mut(e, |e| {
        match e {
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                if !is_constant(left) {
                    at(right);
                } else if !is_constant(right) {
                    at(left);
                }
            }
            Expr::InList { expr, list, .. } if !is_constant(expr) => {
                list.iter_mut().for_each(&mut *at);
            }
            Expr::Between {
                expr, low, high, ..
            } if !is_constant(expr) => {
                at(low);
                at(high);
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
}

fn is_comparison(op: &BinaryOperator) -> bool {
    use BinaryOperator::*;
    matches!(op, Eq | NotEq | Lt | LtEq | Gt | GtEq)
}

fn is_constant(e: &Expr) -> bool {
    matches!(e, Expr::Value(_))
}

/// Replaces a liftable constant by the next placeholder.
fn lift(e: &mut Expr, out: &mut Vec<Literal>) {
    let Expr::Value(v) = e else {
        return;
    };
    let literal = match &v.value {
        Value::Number(n, false) if n.parse::<i64>().is_ok() => Literal {
            kind: Kind::Integer,
            text: n.clone(),
        },
        Value::Number(n, false) if n.parse::<f64>().is_ok_and(f64::is_finite) => Literal {
            kind: Kind::Fraction,
            text: n.clone(),
        },
        Value::SingleQuotedString(s) => Literal {
            kind: Kind::Text,
            text: s.clone(),
        },
        _ => return,
    };
    out.push(literal);
    v.value = Value::Placeholder(format!("${}", out.len()));
}

/// A shape's written plan and the type the planner gave each of its placeholders.
#[derive(Debug)]
pub struct Planned {
    pub plan: LogicalPlan,
    types: Vec<DataType>,
}

impl Planned {
    /// The planned shape, or `None` when a placeholder has no type (it is compared
    /// with something the planner cannot type) or carries field metadata.
    pub fn new(plan: LogicalPlan, placeholders: usize) -> Option<Planned> {
        let fields = plan.get_parameter_fields().ok()?;
        if fields.len() != placeholders {
            return None;
        }
        let mut types = Vec::with_capacity(placeholders);
        for i in 1..=placeholders {
            let field = fields.get(&format!("${i}"))?.as_ref()?;
            if !field.metadata().is_empty() {
                return None;
            }
            types.push(field.data_type().clone());
        }
        Some(Planned { plan, types })
    }

    /// A prepared statement's written plan: its values are the caller's, typed by
    /// the caller, and bound with [`LogicalPlan::with_param_values`].
    pub fn prepared(plan: LogicalPlan) -> Planned {
        Planned {
            plan,
            types: Vec::new(),
        }
    }

    /// `literals` as the values of the placeholders, each of exactly its
    /// placeholder's type, or `None` when a value cannot be bound as that type with
    /// the meaning the constant had.
    pub fn values(&self, literals: &[Literal]) -> Option<ParamValues> {
        if literals.len() != self.types.len() {
            return None;
        }
        let values = literals
            .iter()
            .zip(&self.types)
            .map(|(l, t)| value_as(l, t))
            .collect::<Option<Vec<ScalarValue>>>()?;
        Some(ParamValues::from(values))
    }
}

/// `literal` as a value of type `to`, where that is what the planner's coercion
/// would have compared: see the module's documentation.
pub(crate) fn value_as(literal: &Literal, to: &DataType) -> Option<ScalarValue> {
    use DataType::*;
    let value = match literal.kind {
        Kind::Integer => {
            let allowed = to.is_integer()
                || matches!(to, Float64 | Decimal32(..) | Decimal64(..))
                || matches!(to, Decimal128(..) | Decimal256(..));
            if !allowed {
                return None;
            }
            ScalarValue::Int64(Some(literal.text.parse().ok()?))
        }
        Kind::Fraction => {
            if to != &Float64 {
                return None;
            }
            ScalarValue::Float64(Some(literal.text.parse().ok()?))
        }
        Kind::Text => {
            // A string compared with a timestamp is compared in nanoseconds whatever
            // the timestamp's unit; cast to a coarser unit it would lose its fraction
            // (`'... 00:00:00.5'` against seconds), so only nanoseconds bind.
            let allowed = matches!(
                to,
                Utf8 | LargeUtf8 | Utf8View | Date32 | Date64 | Timestamp(TimeUnit::Nanosecond, _)
            );
            if !allowed {
                return None;
            }
            ScalarValue::Utf8(Some(literal.text.clone()))
        }
    };
    if &value.data_type() == to {
        return Some(value);
    }
    // A cast that fails (out of range, not a date) refuses the binding, and the query
    // is planned as written, where the planner reports it in its own words.
    let cast = value.cast_to(to).ok()?;
    (!cast.is_null()).then_some(cast)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> datafusion::sql::parser::Statement {
        let state = datafusion::prelude::SessionContext::new().state();
        crate::owner::session::parse_query(&state, sql).unwrap()
    }

    fn shaped(sql: &str) -> Option<(String, Vec<String>)> {
        shape(&parse(sql)).map(|s| {
            (
                s.statement.to_string(),
                s.literals.into_iter().map(|l| l.text).collect(),
            )
        })
    }

    #[test]
    fn filter_constants_are_lifted_in_order_and_nothing_else() {
        let (text, values) = shaped(
            "SELECT county_code, x > 5 AS big FROM readings \
             WHERE id = 42 AND county_code IN ('330110', '330106') AND x BETWEEN 1 AND 2.5 \
             GROUP BY 1, 2 HAVING count(*) >= 3 ORDER BY 1 LIMIT 10",
        )
        .unwrap();
        assert_eq!(values, ["42", "330110", "330106", "1", "2.5", "3"]);
        assert!(text.contains("x > 5 AS big"), "{text}");
        assert!(text.contains("id = $1"), "{text}");
        assert!(text.contains("IN ($2, $3)"), "{text}");
        assert!(text.contains("BETWEEN $4 AND $5"), "{text}");
        assert!(text.contains("count(*) >= $6"), "{text}");
        assert!(text.contains("GROUP BY 1, 2"), "{text}");
        assert!(text.contains("LIMIT 10"), "{text}");
    }

    #[test]
    fn derived_tables_ctes_and_set_operations_are_shaped_too() {
        let (_, values) = shaped(
            "WITH a AS (SELECT * FROM t WHERE k = 'a') \
             SELECT * FROM (SELECT * FROM a WHERE v < 7) d WHERE v > 1 \
             UNION ALL SELECT * FROM t WHERE k = 'b'",
        )
        .unwrap();
        assert_eq!(values, ["a", "7", "1", "b"]);
    }

    #[test]
    fn statements_without_liftable_constants_or_with_placeholders_have_no_shape() {
        for sql in [
            "SELECT count(*) FROM t",
            "SELECT * FROM t WHERE 1 = 1",
            "SELECT * FROM t WHERE x = -5",
            "SELECT * FROM t WHERE b = true",
            "SELECT * FROM t WHERE x = $1 AND y = 2",
            "SELECT * FROM t WHERE name LIKE 'a%'",
            "SELECT * FROM t WHERE d = DATE '2024-01-01'",
        ] {
            assert!(shaped(sql).is_none(), "{sql}");
        }
        let items = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let sql = |n: usize| format!("SELECT * FROM t WHERE k IN ({})", items(n));
        assert!(shaped(&sql(MAX_LITERALS)).is_some());
        assert!(shaped(&sql(MAX_LITERALS + 1)).is_none());
    }

    #[test]
    fn prepared_statements_qualify_only_when_every_placeholder_is_compared() {
        for sql in [
            "SELECT * FROM t WHERE x = $1",
            "SELECT * FROM t WHERE $1 < x AND y IN ($2, $3) AND z BETWEEN $4 AND $5",
            "SELECT k, count(*) FROM t GROUP BY k HAVING count(*) > $1",
            "WITH c AS (SELECT * FROM t WHERE x = $1) SELECT * FROM c",
            "SELECT * FROM (SELECT * FROM t WHERE x <> $1) AS d WHERE y = $2",
            "SELECT * FROM t WHERE x IN (SELECT y FROM u WHERE z = $1)",
        ] {
            assert!(placeholders_only_compared(&parse(sql)), "{sql}");
        }
        for sql in [
            "SELECT * FROM t",
            "SELECT * FROM t WHERE x = 1",
            "SELECT $1 AS v FROM t WHERE x = $2",
            "SELECT * FROM t WHERE x = $1 LIMIT $2",
            "SELECT * FROM t WHERE x = $1 + 1",
            "SELECT * FROM t WHERE x = lower($1)",
            "SELECT * FROM t WHERE $1 = $2",
            "SELECT * FROM t WHERE x LIKE $1",
            "SELECT * FROM t ORDER BY x LIMIT $1",
            "SELECT * FROM t WHERE x IN (SELECT $1 FROM u)",
        ] {
            assert!(!placeholders_only_compared(&parse(sql)), "{sql}");
        }
    }

    #[test]
    fn kinds_of_constants_are_part_of_the_key() {
        let a = shape(&parse("SELECT * FROM t WHERE x = 1")).unwrap();
        let b = shape(&parse("SELECT * FROM t WHERE x = 1.5")).unwrap();
        let c = shape(&parse("SELECT * FROM t WHERE x = '1'")).unwrap();
        let d = shape(&parse("SELECT * FROM t WHERE x = 2")).unwrap();
        assert_ne!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_eq!(a.key(), d.key());
    }

    #[test]
    fn values_bind_only_where_the_comparison_keeps_its_meaning() {
        use DataType::*;
        let int = |t: &str| Literal {
            kind: Kind::Integer,
            text: t.into(),
        };
        let frac = |t: &str| Literal {
            kind: Kind::Fraction,
            text: t.into(),
        };
        let text = |t: &str| Literal {
            kind: Kind::Text,
            text: t.into(),
        };
        assert_eq!(
            value_as(&int("7"), &Int32),
            Some(ScalarValue::Int32(Some(7)))
        );
        assert_eq!(
            value_as(&int("7"), &Float64),
            Some(ScalarValue::Float64(Some(7.0)))
        );
        // Out of the column's range: planned as written (where it compares false).
        assert_eq!(value_as(&int("3000000000"), &Int32), None);
        // A float32 column is compared as float64 by the planner.
        assert_eq!(value_as(&int("16777217"), &Float32), None);
        // 2.5 compared with an integer column is not 2.
        assert_eq!(value_as(&frac("2.5"), &Int64), None);
        assert_eq!(
            value_as(&frac("2.5"), &Float64),
            Some(ScalarValue::Float64(Some(2.5)))
        );
        // A string compared with a number is not cast to one.
        assert_eq!(value_as(&text("5"), &Int64), None);
        assert_eq!(value_as(&int("5"), &Utf8), None);
        assert_eq!(
            value_as(&text("2024-02-29"), &Date32),
            ScalarValue::Utf8(Some("2024-02-29".into()))
                .cast_to(&Date32)
                .ok()
        );
        assert_eq!(value_as(&text("not a date"), &Date32), None);
        // Seconds would cut the fraction the planner compares in nanoseconds.
        let at = "2024-01-01 00:00:00.5";
        assert_eq!(
            value_as(&text(at), &Timestamp(TimeUnit::Second, None)),
            None
        );
        assert_eq!(
            value_as(&text(at), &Timestamp(TimeUnit::Nanosecond, None)),
            ScalarValue::Utf8(Some(at.into()))
                .cast_to(&Timestamp(TimeUnit::Nanosecond, None))
                .ok()
        );
        assert_eq!(value_as(&text("x"), &Boolean), None);
    }
}
