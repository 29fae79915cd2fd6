//! Moves work into the databases behind a member.
//!
//! [`push_into_databases`] runs on a member's optimized logical plans. It finds the
//! largest sub-plans that read tables of a single database and whose every operator
//! and expression means the same there as in DataFusion, unparses each into the
//! database's SQL dialect and replaces it with a scan of that statement's result. What cannot go (a
//! mapping's code-table lookup, a mask, a join across two databases) stays in the
//! gateway, above the scans, so the answer is the same either way: correct first,
//! then fast.
//!
//! "Means the same" is decided conservatively, node by node and expression by
//! expression, for each dialect: an allow-list, not a deny-list. Casts are pushed only
//! where both engines cannot fail and agree on the value; comparisons of text only
//! where the database compares text byte-wise, as DataFusion does (PostgreSQL's
//! equality always is, its ordering only under the "C" collation; MySQL's case- and
//! accent-insensitive collations make even equality differ). MySQL's division gives
//! decimals and NULL for a zero divisor, its `CONCAT` is NULL when any argument is,
//! it sorts NULLs first and has no FULL JOIN: those stay in the gateway, or are
//! written so that they mean the same (NULL ordering).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, JoinType, NullEquality, ScalarValue, TableReference};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::expr::{AggregateFunction, Cast};
use datafusion::logical_expr::{
    BinaryExpr, Distinct, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, Operator, SortExpr,
    SubqueryAlias, TableScan, TableScanBuilder,
};
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::{CustomDialectBuilder, DefaultDialect, PostgreSqlDialect};

use super::remote::{Dialect, RemoteDatabase, RemoteQuery, RemoteTable, same};

/// A database's handle, as the rule passes it around.
type Db = Arc<dyn RemoteDatabase>;

/// What the rule needs to know of a database to decide what may go there.
#[derive(Debug, Clone, Copy)]
struct Target {
    dialect: Dialect,
    byte_wise: bool,
    equality: bool,
    concat: bool,
}

impl Target {
    fn of(db: &dyn RemoteDatabase) -> Target {
        Target {
            dialect: db.dialect(),
            byte_wise: db.byte_wise_text(),
            equality: db.text_equality(),
            concat: db.pipes_concatenate(),
        }
    }

    /// Whether `<`, `ORDER BY`, `MIN` and `BETWEEN` of text mean the same there.
    fn text_order(self) -> bool {
        self.byte_wise
    }

    /// Whether `=`, `IN`, `LIKE`, `GROUP BY` and `DISTINCT` of text mean the same there.
    fn text_equality(self) -> bool {
        self.equality
    }

    fn mysql(self) -> bool {
        self.dialect == Dialect::MySql
    }
}

/// Moves what it can of an optimized logical plan into the databases it reads. It
/// runs after DataFusion's optimizer has finished (not as one of its rules), so that
/// the sub-plans it hands to databases are already simplified, pruned and with
/// filters pushed down, and the optimizer never has to see through them.
pub fn push_into_databases(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    let plan = plan
        .transform_up(|node| match split_over_union(&node)? {
            Some(split) => Ok(Transformed::yes(split)),
            None => Ok(Transformed::no(node)),
        })?
        .data;
    // The scans this creates are numbered within the plan, so that two plans that
    // differ only in their statements' text are equal (see `ReusedStatement`).
    let mut scans = 0;
    let (plan, owner) = push(plan, &mut scans)?;
    match owner {
        Some(db) => remote_scan(plan, db, &mut scans),
        None => Ok(plan),
    }
}

/// An aggregate over a union (a dataset mapped from several tables) as a final
/// aggregate over the union of per-input partial aggregates, so that each input's
/// database can compute its own part: COUNT and SUM become SUM of the parts, MIN and
/// MAX of the parts, AVG (of integers and floats) the sum of the parts' sums over the
/// sum of their counts. `None` when the aggregate is not of that form (other
/// functions, DISTINCT, FILTER, grouping on expressions), and it stays whole.
fn split_over_union(plan: &LogicalPlan) -> DfResult<Option<LogicalPlan>> {
    use datafusion::functions_aggregate::{count::count_udaf, sum::sum_udaf};
    let LogicalPlan::Aggregate(agg) = plan else {
        return Ok(None);
    };
    let LogicalPlan::Union(union) = below_aliases(&agg.input) else {
        return Ok(None);
    };
    let in_schema = agg.input.schema();
    // Positions in the union's output of the grouping columns and aggregate arguments.
    let position = |e: &Expr| -> Option<usize> {
        match e {
            Expr::Column(c) => in_schema.index_of_column(c).ok(),
            _ => None,
        }
    };
    let mut groups = Vec::new();
    for g in &agg.group_expr {
        match position(g) {
            Some(i) => groups.push(i),
            None => return Ok(None),
        }
    }
    if agg.schema.fields().len() != groups.len() + agg.aggr_expr.len() {
        return Ok(None);
    }
    // Each aggregate as (function, its argument: a literal as in count(*), or a
    // position in the union's output).
    let mut parts = Vec::new();
    for e in &agg.aggr_expr {
        let e = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(AggregateFunction { func, params }) = e else {
            return Ok(None);
        };
        let plain = !params.distinct
            && params.filter.is_none()
            && params.order_by.is_empty()
            && params.args.len() == 1;
        if !plain || !matches!(func.name(), "count" | "sum" | "min" | "max" | "avg") {
            return Ok(None);
        }
        let arg = match &params.args[0] {
            Expr::Literal(..) => None,
            a => match position(a) {
                Some(i) => Some(i),
                None => return Ok(None),
            },
        };
        // AVG is split as a sum and a count, for integers and floats only: a
        // decimal average's scale would differ from DataFusion's own.
        if func.name() == "avg" {
            let numeric = arg.is_some_and(|i| {
                matches!(
                    in_schema.field(i).data_type(),
                    DataType::Int16
                        | DataType::Int32
                        | DataType::Int64
                        | DataType::Float32
                        | DataType::Float64
                )
            });
            if !numeric {
                return Ok(None);
            }
        }
        parts.push((func.clone(), params.args[0].clone(), arg));
    }
    let call = |f: Arc<datafusion::logical_expr::AggregateUDF>, arg: Expr| {
        Expr::AggregateFunction(AggregateFunction::new_udf(
            f,
            vec![arg],
            false,
            None,
            vec![],
            None,
        ))
    };
    let partial_col = |k: usize| Expr::Column(Column::new_unqualified(format!("__p{k}")));
    let mut partials = Vec::new();
    for input in &union.inputs {
        let col = |i: usize| {
            let (q, f) = input.schema().qualified_field(i);
            Expr::Column(Column::new(q.cloned(), f.name()))
        };
        let group: Vec<Expr> = groups
            .iter()
            .enumerate()
            .map(|(k, &i)| col(i).alias(format!("__g{k}")))
            .collect();
        let mut aggs = Vec::new();
        for (func, literal, arg) in &parts {
            let a = arg.map(col).unwrap_or_else(|| literal.clone());
            if func.name() == "avg" {
                let k = aggs.len();
                aggs.push(call(sum_udaf(), a.clone()).alias(format!("__p{k}")));
                aggs.push(call(count_udaf(), a).alias(format!("__p{}", k + 1)));
            } else {
                let k = aggs.len();
                aggs.push(call(func.clone(), a).alias(format!("__p{k}")));
            }
        }
        partials.push(
            LogicalPlanBuilder::from(input.as_ref().clone())
                .aggregate(group, aggs)?
                .build()?,
        );
    }
    let mut builder = LogicalPlanBuilder::from(partials.remove(0));
    for p in partials {
        builder = builder.union(p)?;
    }
    let final_groups: Vec<Expr> = (0..groups.len())
        .map(|k| Expr::Column(Column::new_unqualified(format!("__g{k}"))))
        .collect();
    // Combining aggregates, and for each original aggregate the expression over them.
    let mut combine = Vec::new();
    let mut results = Vec::new();
    let mut k = 0;
    for (func, _, _) in &parts {
        match func.name() {
            "avg" => {
                combine.push(call(sum_udaf(), partial_col(k)).alias(format!("__f{k}")));
                combine.push(call(sum_udaf(), partial_col(k + 1)).alias(format!("__f{}", k + 1)));
                let f = |k: usize| {
                    Expr::Cast(Cast::new(
                        Box::new(Expr::Column(Column::new_unqualified(format!("__f{k}")))),
                        DataType::Float64,
                    ))
                };
                // No non-NULL value in the group: AVG is NULL, not 0/0.
                results.push(
                    f(k) / datafusion::functions::expr_fn::nullif(
                        f(k + 1),
                        datafusion::prelude::lit(0.0),
                    ),
                );
                k += 2;
            }
            name => {
                let f = if matches!(name, "count" | "sum") {
                    sum_udaf()
                } else {
                    func.clone()
                };
                combine.push(call(f, partial_col(k)).alias(format!("__f{k}")));
                results.push(Expr::Column(Column::new_unqualified(format!("__f{k}"))));
                k += 1;
            }
        }
    }
    let builder = builder.aggregate(final_groups, combine)?;
    // The original aggregate's columns, under their original names and types.
    let mut out = Vec::new();
    for (i, (q, f)) in agg.schema.iter().enumerate() {
        let e = if i < groups.len() {
            Expr::Column(Column::new_unqualified(format!("__g{i}")))
        } else {
            results[i - groups.len()].clone()
        };
        out.push(
            Expr::Cast(Cast::new(Box::new(e), f.data_type().clone()))
                .alias_qualified(q.cloned(), f.name()),
        );
    }
    Ok(Some(builder.project(out)?.build()?))
}

/// The database and remote name of a scan, when it reads a database table.
fn table_of(scan: &TableScan) -> Option<(Db, String, String)> {
    let provider = source_as_provider(&scan.source).ok()?;
    let any: &dyn std::any::Any = provider.as_ref();
    let table = any.downcast_ref::<RemoteTable>()?;
    let (schema, name) = table.remote_name();
    Some((
        table.database().clone(),
        schema.to_string(),
        name.to_string(),
    ))
}

/// Rewrites the children of `plan` and says which database, if exactly one, could run
/// all of `plan`.
fn push(plan: LogicalPlan, scans: &mut u64) -> DfResult<(LogicalPlan, Option<Db>)> {
    if let LogicalPlan::TableScan(scan) = &plan {
        let owner = table_of(scan)
            .filter(|_| scan.filters.is_empty())
            .map(|(db, _, _)| db);
        return Ok((plan, owner));
    }
    let mut owners: Vec<Option<Db>> = Vec::new();
    let plan = plan
        .map_children(|c| {
            let (c, o) = push(c, scans)?;
            owners.push(o);
            Ok(Transformed::no(c))
        })?
        .data;
    if owners.is_empty() {
        return Ok((plan, None));
    }
    let sole = owners[0].clone().filter(|first| {
        owners
            .iter()
            .all(|o| o.as_ref().is_some_and(|o| same(o, first)))
    });
    if let Some(db) = sole
        && node_ok(&plan, db.as_ref())
    {
        return Ok((plan, Some(db)));
    }
    // This node stays in the gateway: each child that a database can run entirely
    // becomes a scan of that database's answer.
    let mut owners = owners.into_iter();
    let plan = plan
        .map_children(|c| match owners.next().flatten() {
            Some(db) => Ok(Transformed::yes(remote_scan(c, db, scans)?)),
            None => Ok(Transformed::no(c)),
        })?
        .data;
    Ok((plan, None))
}

/// Whether a name can be written into SQL as a quoted identifier: the unparser's
/// quoting leaves a quote after a backslash as it is, which would end the identifier
/// early. Names from a caller's query (aliases) are the caller's to choose.
fn safe_ident(name: &str) -> bool {
    !name.contains(['"', '`', '\'', '\\'])
}

/// Whether the database can run this operator (its inputs already can).
fn node_ok(plan: &LogicalPlan, db: &dyn RemoteDatabase) -> bool {
    let t = Target::of(db);
    let out_ok = plan.schema().iter().all(|(q, f)| {
        db.readable(f.data_type())
            && safe_ident(f.name())
            && q.is_none_or(|q| safe_ident(&q.to_string()))
    });
    if !out_ok {
        return false;
    }
    // Whether grouping or deduplicating by these expressions means the same there.
    let groups_ok = |exprs: &[Expr], schema: &DFSchema| {
        t.text_equality() || !exprs.iter().any(|e| is_text(e, schema))
    };
    match plan {
        // A projection over a LIMIT or an ORDER BY stays in the gateway: the unparser
        // writes the LIMIT (or the sort) as a derived table of its own while the
        // projection goes on naming the tables inside it (`SELECT "h"."x" FROM (... AS
        // "h" LIMIT 5) AS "derived_limit"`), which the database refuses. The LIMIT and
        // the ORDER BY still run in the database; the gateway projects their rows, in
        // their order.
        LogicalPlan::Projection(p) => {
            !limit_below(&p.input) && p.expr.iter().all(|e| expr_ok(e, p.input.schema(), t))
        }
        // A filter over an aggregate (a HAVING) stays in the gateway: DataFusion's
        // unparser writes it over a derived table that does not name the
        // aggregate's columns, which the database then cannot find.
        LogicalPlan::Filter(f) => {
            expr_ok(&f.predicate, f.input.schema(), t) && !over_aggregate(&f.input)
        }
        LogicalPlan::Aggregate(a) => {
            a.group_expr.iter().all(|e| expr_ok(e, a.input.schema(), t))
                && groups_ok(&a.group_expr, a.input.schema())
                && a.aggr_expr.iter().all(|e| expr_ok(e, a.input.schema(), t))
        }
        LogicalPlan::Sort(s) => {
            // ORDER BY over a projection names its output columns unqualified (see
            // `to_sql`), so their names must be unique.
            let unique = match below_aliases(&s.input) {
                LogicalPlan::Projection(p) => {
                    let names: std::collections::BTreeSet<&str> = p
                        .schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect();
                    names.len() == p.schema.fields().len()
                }
                _ => true,
            };
            unique
                && s.expr.iter().all(|k| {
                    expr_ok(&k.expr, s.input.schema(), t)
                        && (t.text_order() || !is_text(&k.expr, s.input.schema()))
                })
        }
        LogicalPlan::Limit(l) => {
            let lit = |e: &Option<Box<Expr>>| {
                e.as_deref()
                    .is_none_or(|e| matches!(e, Expr::Literal(ScalarValue::Int64(_), _)))
            };
            // MySQL has no OFFSET without a LIMIT.
            let offset_alone = l.fetch.is_none() && l.skip.is_some();
            lit(&l.skip) && lit(&l.fetch) && !(t.mysql() && offset_alone)
        }
        LogicalPlan::SubqueryAlias(_) => true,
        LogicalPlan::Distinct(Distinct::All(input)) => {
            let cols: Vec<Expr> = input
                .schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect();
            groups_ok(&cols, input.schema())
        }
        LogicalPlan::Union(_) => true,
        LogicalPlan::Join(j) => {
            let kinds = if t.mysql() {
                // MySQL has no FULL JOIN.
                matches!(
                    j.join_type,
                    JoinType::Inner | JoinType::Left | JoinType::Right
                )
            } else {
                matches!(
                    j.join_type,
                    JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
                )
            };
            kinds
                && j.null_equality == NullEquality::NullEqualsNothing
                && j.on.iter().all(|(l, r)| {
                    expr_ok(l, &j.schema, t)
                        && expr_ok(r, &j.schema, t)
                        && (t.text_equality() || !is_text(l, &j.schema))
                })
                && j.filter.as_ref().is_none_or(|f| expr_ok(f, &j.schema, t))
        }
        // Window functions stay in the gateway: DataFusion's unparser writes a window
        // under a filter as a derived table whose columns the filter cannot name.
        _ => false,
    }
}

/// Whether the first node under any subquery aliases and projections is an aggregate.
fn over_aggregate(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::SubqueryAlias(a) => over_aggregate(&a.input),
        LogicalPlan::Projection(p) => over_aggregate(&p.input),
        p => matches!(p, LogicalPlan::Aggregate(_)),
    }
}

/// The first node under any subquery aliases.
fn below_aliases(plan: &LogicalPlan) -> &LogicalPlan {
    match plan {
        LogicalPlan::SubqueryAlias(a) => below_aliases(&a.input),
        p => p,
    }
}

fn is_text(e: &Expr, schema: &DFSchema) -> bool {
    matches!(
        e.get_type(schema),
        Ok(DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
    )
}

/// Scalar functions that PostgreSQL (and DataFusion) have under the same name with the
/// same meaning. Not `upper` and `lower`: DataFusion maps every letter by Unicode's
/// full case mapping (`ß` to `SS`), databases map one character to one, and
/// PostgreSQL under the "C" character type only ASCII letters.
const FUNCTIONS: &[&str] = &[
    "btrim",
    "ltrim",
    "rtrim",
    "character_length",
    "substr",
    "coalesce",
    "nullif",
    "abs",
    "concat",
    "replace",
    "left",
    "right",
];

/// Scalar functions that MySQL has under the same name with the same meaning. Not
/// `upper` and `lower` (see [`FUNCTIONS`]), `CONCAT` (NULL when any argument is), `SUBSTR`, `LEFT` and `RIGHT` (negative
/// positions and lengths mean other things) or the trims (`TRIM` only, no `BTRIM`).
const MYSQL_FUNCTIONS: &[&str] = &["character_length", "coalesce", "nullif", "abs", "replace"];

/// Whether an expression means the same in the database.
fn expr_ok(e: &Expr, schema: &DFSchema, t: Target) -> bool {
    let mut ok = true;
    let _ = e.apply(|e| {
        let this = match e {
            Expr::Alias(a) => {
                safe_ident(&a.name)
                    && a.relation
                        .as_ref()
                        .is_none_or(|r| safe_ident(&r.to_string()))
            }
            Expr::Column(c) => {
                safe_ident(&c.name)
                    && c.relation
                        .as_ref()
                        .is_none_or(|r| safe_ident(&r.to_string()))
            }
            Expr::Literal(v, _) => match v {
                ScalarValue::Null
                | ScalarValue::Boolean(_)
                | ScalarValue::Int16(_)
                | ScalarValue::Int32(_)
                | ScalarValue::Int64(_)
                | ScalarValue::Date32(_)
                | ScalarValue::Decimal128(..) => true,
                // The unparser's quoting leaves a quote after a backslash, and a
                // doubled quote, as they are: such text would end the literal early
                // in the database. It stays in the gateway.
                // PostgreSQL's char(n) (and MySQL's CHAR) compares without trailing
                // blanks, and a member reads such a column without them: a literal
                // that ends in a blank would match there and not here.
                ScalarValue::Utf8(v) => v.as_deref().is_none_or(|v| {
                    !v.contains(['\'', '\\'])
                        && (t.dialect == Dialect::DataFusion || !v.ends_with(' '))
                }),
                // MySQL reads `1.5` as an exact decimal, not a double.
                ScalarValue::Float64(_) => !t.mysql(),
                _ => false,
            },
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                binary_ok(left, *op, right, schema, t)
            }
            Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::Negative(_) => true,
            // CASE x WHEN 'a' compares text.
            Expr::Case(c) => {
                t.text_equality() || c.expr.as_ref().is_none_or(|e| !is_text(e, schema))
            }
            Expr::InList(l) => t.text_equality() || !is_text(&l.expr, schema),
            Expr::Between(b) => t.text_order() || !is_text(&b.expr, schema),
            Expr::Like(l) => {
                // MySQL's default LIKE escape under NO_BACKSLASH_ESCAPES is not
                // DataFusion's: patterns with a backslash stay in the gateway.
                let backslash = matches!(l.pattern.as_ref(),
                    Expr::Literal(ScalarValue::Utf8(Some(p)), _) if p.contains('\\'));
                let literal = matches!(l.pattern.as_ref(), Expr::Literal(..));
                !l.case_insensitive
                    && l.escape_char.is_none()
                    && t.text_equality()
                    && !(t.mysql() && (backslash || !literal))
            }
            Expr::Cast(Cast { expr, field }) => cast_ok(expr, field.data_type(), schema, t),
            Expr::TryCast(c) => cast_ok(&c.expr, c.field.data_type(), schema, t),
            Expr::ScalarFunction(f) => {
                let list = if t.mysql() {
                    MYSQL_FUNCTIONS
                } else {
                    FUNCTIONS
                };
                // NULLIF compares its arguments.
                let compares_text =
                    f.func.name() == "nullif" && f.args.first().is_some_and(|a| is_text(a, schema));
                list.contains(&f.func.name()) && (t.text_equality() || !compares_text)
            }
            Expr::AggregateFunction(AggregateFunction { func, params }) => {
                let name = func.name();
                let plain = params.filter.is_none()
                    && params.order_by.is_empty()
                    && params.null_treatment.is_none();
                let text_arg = params.args.first().is_some_and(|a| is_text(a, schema));
                let min_max_text = matches!(name, "min" | "max") && text_arg && !t.text_order();
                let distinct_text = params.distinct && text_arg && !t.text_equality();
                // MySQL averages integers and decimals as decimals rounded to four more
                // places; DataFusion averages them as doubles.
                let float_arg = params.args.first().is_some_and(|a| {
                    matches!(
                        a.get_type(schema),
                        Ok(DataType::Float32 | DataType::Float64)
                    )
                });
                let avg_differs = name == "avg" && t.mysql() && !float_arg;
                plain
                    && !min_max_text
                    && !distinct_text
                    && !avg_differs
                    && (matches!(name, "count" | "sum" | "min" | "max" | "avg"))
                    && (!params.distinct || name == "count")
            }
            _ => false,
        };
        if this {
            Ok(TreeNodeRecursion::Continue)
        } else {
            ok = false;
            Ok(TreeNodeRecursion::Stop)
        }
    });
    ok
}

fn binary_ok(left: &Expr, op: Operator, right: &Expr, schema: &DFSchema, t: Target) -> bool {
    use Operator::*;
    let float_or_decimal = |e: &Expr| {
        matches!(
            e.get_type(schema),
            Ok(DataType::Float16
                | DataType::Float32
                | DataType::Float64
                | DataType::Decimal128(..)
                | DataType::Decimal256(..))
        )
    };
    let text = is_text(left, schema) || is_text(right, schema);
    // MySQL computes in BIGINT, DOUBLE and DECIMAL and subtracts dates as numbers: its
    // arithmetic means DataFusion's only on those types.
    let mysql_number = |e: &Expr| {
        matches!(
            e.get_type(schema),
            Ok(DataType::Int64 | DataType::Float64 | DataType::Decimal128(..))
        )
    };
    match op {
        And | Or => true,
        StringConcat => t.concat,
        Plus | Minus | Multiply => !t.mysql() || (mysql_number(left) && mysql_number(right)),
        // MySQL has no IS [NOT] DISTINCT FROM.
        IsDistinctFrom | IsNotDistinctFrom => !t.mysql() && (t.text_equality() || !text),
        Eq | NotEq => t.text_equality() || !text,
        Lt | LtEq | Gt | GtEq => t.text_order() || !text,
        // Integer division truncates in PostgreSQL as in DataFusion; float division
        // by zero is an error in PostgreSQL but infinity in DataFusion, and decimal
        // division rounds to different scales, so only integer division goes. MySQL
        // divides integers into decimals and gives NULL for a zero divisor, so no
        // division goes there.
        Divide | Modulo => match t.dialect {
            Dialect::DataFusion => true,
            Dialect::MySql => false,
            Dialect::Postgres => !(float_or_decimal(left) || float_or_decimal(right)),
        },
        _ => false,
    }
}

/// Casts that cannot fail and give the same value in both engines.
fn cast_ok(e: &Expr, to: &DataType, schema: &DFSchema, t: Target) -> bool {
    use DataType::*;
    let Ok(from) = e.get_type(schema) else {
        return false;
    };
    if &from == to {
        return true;
    }
    if t.dialect == Dialect::DataFusion {
        // The same engine casts the same way; only casts that cannot fail go.
        return matches!(
            (&from, to),
            (Int16, Int32 | Int64)
                | (Int32, Int64)
                | (Int16 | Int32 | Int64 | Float32, Float64)
                | (Int16 | Int32 | Int64 | Utf8 | Date32 | Boolean, Utf8)
                | (Timestamp(_, None), Date32)
                | (Null, _)
        );
    }
    if t.mysql() {
        // MySQL casts to SIGNED, DOUBLE, DECIMAL, CHAR and DATE only; a boolean is a
        // number there (`1`, not `true`), and FLOAT widens through its decimal text.
        return match (&from, to) {
            (Int16, Int32 | Int64) | (Int32, Int64) => true,
            (Int16 | Int32 | Int64, Float64) => true,
            (Int16 | Int32 | Int64, Decimal128(p, s)) => *p as i32 - *s as i32 >= 19,
            (Int16 | Int32 | Int64 | Date32, Utf8) => true,
            (Timestamp(_, None), Date32) => true,
            (Null, Int32 | Int64 | Float64 | Utf8 | Date32 | Decimal128(..)) => true,
            _ => false,
        };
    }
    match (&from, to) {
        (Int16, Int32 | Int64) | (Int32, Int64) => true,
        (Int16 | Int32 | Int64, Float64) => true,
        (Float32, Float64) => true,
        (Int16 | Int32 | Int64, Decimal128(p, s)) => *p as i32 - *s as i32 >= 19,
        (Decimal128(..), Float64) => true,
        (Int16 | Int32 | Int64 | Utf8 | Date32 | Boolean, Utf8) => true,
        (Timestamp(_, None), Date32) => true,
        (Null, _) => true,
        _ => false,
    }
}

/// Whether `plan` is a LIMIT or ORDER BY that the unparser writes as a derived table
/// under a projection: one with no aggregate in the same SELECT (an aggregate below
/// keeps the projection, the LIMIT and the aggregate in one SELECT). The optimizer
/// folds `ORDER BY ... LIMIT` into a sort with a row count, which is written the same.
fn limit_below(plan: &LogicalPlan) -> bool {
    fn aggregate_in_select(p: &LogicalPlan) -> bool {
        match p {
            LogicalPlan::Aggregate(_) => true,
            LogicalPlan::Limit(_) | LogicalPlan::Sort(_) | LogicalPlan::Filter(_) => {
                p.inputs().into_iter().any(aggregate_in_select)
            }
            _ => false,
        }
    }
    match plan {
        LogicalPlan::Limit(l) => !aggregate_in_select(&l.input),
        LogicalPlan::Sort(s) => !aggregate_in_select(&s.input),
        _ => false,
    }
}

/// Whether the top of `plan` is an aggregate, possibly under a LIMIT or ORDER BY: the
/// unparser then writes the aggregates before the groups.
fn aggregate_at_top(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Aggregate(_) => true,
        LogicalPlan::Limit(l) => aggregate_at_top(&l.input),
        LogicalPlan::Sort(s) => aggregate_at_top(&s.input),
        _ => false,
    }
}

/// Replaces `plan`, which `db` can run entirely, with a scan of its answer there.
fn remote_scan(plan: LogicalPlan, db: Db, scans: &mut u64) -> DfResult<LogicalPlan> {
    let schema = plan.schema().clone();
    // The result is read by position, so the SQL must list the columns in the plan's
    // order; the unparser writes an aggregate at the top with its aggregates before
    // its groups (also under a LIMIT or ORDER BY), so it gets a projection in the
    // plan's order.
    let plan = match plan {
        other if aggregate_at_top(&other) => {
            let cols: Vec<Expr> = other
                .schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect();
            LogicalPlan::Projection(datafusion::logical_expr::Projection::try_new(
                cols,
                Arc::new(other),
            )?)
        }
        plan => plan,
    };
    let sql = to_sql(plan, db.dialect())?;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), f.is_nullable()))
        .collect();
    let provider = RemoteQuery::new(db, sql, Arc::new(Schema::new(fields)));
    let name = format!("__fedgate_db_{scans}");
    *scans += 1;
    let scan =
        LogicalPlanBuilder::scan(name.as_str(), provider_as_source(Arc::new(provider)), None)?;
    // The scan's columns are renamed back to what the replaced plan produced, so the
    // operators above it are unchanged.
    let exprs: Vec<Expr> = schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::new(
                Some(TableReference::bare(name.as_str())),
                format!("c{i}"),
            ))
            .alias_qualified(q.cloned(), f.name())
        })
        .collect();
    scan.project(exprs)?.build()
}

/// The physical plan of a member's plan that runs exactly one statement in a
/// database, kept so that later plans differing from it only in that statement's text
/// reuse it instead of being planned again: a shape's bound queries (`owner::member`)
/// whose values all went into the statement.
///
/// Two plans after [`push_into_databases`] are equal (`LogicalPlan`'s own equality,
/// which leaves out each scan's source) when every node, expression, value, schema and
/// scan name is the same (it leaves out the statistics a scan is asked for too; both
/// plans come from one optimized shape, which asks for the same); the scans' sources
/// are then compared here: each reads the
/// same table, except the one statement, which must be of the same database with the
/// same columns. Physical planning is a function of the plan and its sources, so such
/// a plan gets the kept physical plan with its own SQL in the one statement. A value
/// that stayed in the gateway (one the database's SQL cannot hold as written, say)
/// makes the plans unequal, and the plan is planned as usual.
pub struct ReusedStatement {
    pushed: LogicalPlan,
    /// The tables `pushed` scans, in the order [`sources_of`] gives them.
    sources: Vec<Arc<dyn datafusion::catalog::TableProvider>>,
    physical: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
}

impl ReusedStatement {
    /// `physical`, planned from `pushed`, kept when both run exactly one statement in
    /// a database and `pushed` holds at most
    /// [`crate::owner::session::MOST_KEPT_CONSTANT_BYTES`] of constants.
    pub fn of(
        pushed: &LogicalPlan,
        physical: &Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> Option<ReusedStatement> {
        // The plan kept holds the values that stayed in the gateway, which the shape
        // cache's charge does not count.
        if crate::owner::session::constant_bytes(pushed)
            > crate::owner::session::MOST_KEPT_CONSTANT_BYTES
        {
            return None;
        }
        let sources = sources_of(pushed)?;
        let queries: Vec<&RemoteQuery> = sources.iter().filter_map(as_query).collect();
        let mut statements = Vec::new();
        statements_in(physical.as_ref(), &mut statements);
        if queries.len() != 1
            || statements.len() != 1
            || statements[0].read_schema() != queries[0].read_schema()
        {
            return None;
        }
        // The kept plans hold no statement text: each query runs its own, and the
        // first one's (its constants in place, up to a megabyte) would be kept for as
        // long as the shape is, uncounted by the cache that holds it.
        let physical = physical
            .clone()
            .transform_up(|node| {
                let any: &dyn std::any::Any = node.as_ref();
                match any.downcast_ref::<super::remote::RemoteExec>() {
                    Some(e) => Ok(Transformed::yes(Arc::new(
                        e.with_inner("")
                            .map_err(crate::error::Error::into_datafusion)?,
                    )
                        as Arc<dyn datafusion::physical_plan::ExecutionPlan>)),
                    None => Ok(Transformed::no(node)),
                }
            })
            .ok()?
            .data;
        let pushed = pushed
            .clone()
            .transform_up_with_subqueries(|node| {
                let LogicalPlan::TableScan(mut scan) = node else {
                    return Ok(Transformed::no(node));
                };
                let table = source_as_provider(&scan.source)?;
                scan.source = provider_as_source(textless(&table));
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            })
            .ok()?
            .data;
        Some(ReusedStatement {
            pushed,
            sources: sources.iter().map(textless).collect(),
            physical,
        })
    }

    /// The physical plan of `pushed`, made from the one kept with `pushed`'s SQL in
    /// its statement, when `pushed` differs from the kept plan only in that SQL;
    /// `None` otherwise (it is then planned as usual).
    pub fn plan_for(
        &self,
        pushed: &LogicalPlan,
    ) -> Option<DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>>> {
        if pushed != &self.pushed {
            return None;
        }
        let theirs = sources_of(pushed)?;
        if self.sources.len() != theirs.len() {
            return None;
        }
        let mut statement = None;
        for (a, b) in self.sources.iter().zip(&theirs) {
            match (as_query(a), as_query(b)) {
                (Some(a), Some(b))
                    if statement.is_none()
                        && same(a.db(), b.db())
                        && a.read_schema() == b.read_schema() =>
                {
                    statement = Some(b)
                }
                (None, None) if std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)) => {}
                _ => return None,
            }
        }
        let sql = statement?.sql();
        Some(
            self.physical
                .clone()
                .transform_up(|node| {
                    let any: &dyn std::any::Any = node.as_ref();
                    match any.downcast_ref::<super::remote::RemoteExec>() {
                        Some(e) => Ok(Transformed::yes(Arc::new(
                            e.with_inner(sql)
                                .map_err(crate::error::Error::into_datafusion)?,
                        )
                            as Arc<dyn datafusion::physical_plan::ExecutionPlan>)),
                        None => Ok(Transformed::no(node)),
                    }
                })
                .map(|t| t.data),
        )
    }
}

/// The table behind every scan of `plan` (subqueries included), in the order of a
/// walk of the plan; `None` when a scan's source is not a table.
fn sources_of(plan: &LogicalPlan) -> Option<Vec<Arc<dyn datafusion::catalog::TableProvider>>> {
    let mut out = Vec::new();
    let mut all = true;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            match source_as_provider(&scan.source) {
                Ok(p) => out.push(p),
                Err(_) => {
                    all = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .ok()?;
    all.then_some(out)
}

/// `table`, or the same database query without its text if it is one.
fn textless(
    table: &Arc<dyn datafusion::catalog::TableProvider>,
) -> Arc<dyn datafusion::catalog::TableProvider> {
    match as_query(table) {
        Some(q) => Arc::new(RemoteQuery::new(
            q.db().clone(),
            String::new(),
            q.read_schema().clone(),
        )),
        None => table.clone(),
    }
}

/// The database query a table is, if it is one.
fn as_query(table: &Arc<dyn datafusion::catalog::TableProvider>) -> Option<&RemoteQuery> {
    let any: &dyn std::any::Any = table.as_ref();
    any.downcast_ref::<RemoteQuery>()
}

/// The statements a physical plan runs in databases, in the order of a walk of the
/// plan.
pub(crate) fn statements_in<'a>(
    plan: &'a dyn datafusion::physical_plan::ExecutionPlan,
    out: &mut Vec<&'a super::remote::RemoteExec>,
) {
    let any: &dyn std::any::Any = plan;
    if let Some(e) = any.downcast_ref::<super::remote::RemoteExec>() {
        out.push(e);
    }
    for child in plan.children() {
        statements_in(child.as_ref(), out);
    }
}

/// The SQL of a sub-plan in `dialect`: local table names become the database's,
/// `TRY_CAST`s (allowed only where they cannot fail) become `CAST`s, and in MySQL each
/// sort key gets a key before it that puts its NULLs where DataFusion puts them.
pub fn to_sql(plan: LogicalPlan, dialect: Dialect) -> DfResult<String> {
    // DataFusion copies a LIMIT's row count (skip plus fetch) into the scan below it
    // and keeps the LIMIT. The unparser writes both into the same SELECT, where the
    // scan's count replaces the LIMIT's and its OFFSET is lost (`LIMIT 5 OFFSET 2`
    // answered 7 rows). When the statement carries the LIMIT, the scan's copy is
    // dropped.
    let has_limit = plan.exists(|p| Ok(matches!(p, LogicalPlan::Limit(_))))?;
    let plan = plan
        .transform_up(|node| {
            // The schema the node's expressions are evaluated against.
            let input = match &node {
                LogicalPlan::Join(j) => j.schema.clone(),
                n => n
                    .inputs()
                    .first()
                    .map(|i| i.schema().clone())
                    .unwrap_or_else(|| n.schema().clone()),
            };
            let node = node
                .map_expressions(|e| {
                    e.transform(|e| {
                        let c = match e {
                            Expr::TryCast(t) => Cast::new_from_field(t.expr, t.field),
                            Expr::Cast(c) => c,
                            e => return Ok(Transformed::no(e)),
                        };
                        // MySQL cannot write most types in a CAST (`CAST(x AS BOOL)` is
                        // a syntax error); a cast to the type a value already has goes.
                        let same =
                            c.expr.get_type(&input).ok().as_ref() == Some(c.field.data_type());
                        Ok(Transformed::yes(if dialect == Dialect::MySql && same {
                            *c.expr
                        } else {
                            Expr::Cast(c)
                        }))
                    })
                })?
                .data;
            let node = if dialect == Dialect::MySql {
                nulls_as_keys(node)?
            } else {
                node
            };
            // The optimizer copies a LIMIT's row count (skip plus fetch) into the sort
            // below it; the unparser writes both into one SELECT, where the sort's
            // count replaces the LIMIT's (`LIMIT 3 OFFSET 2` became `LIMIT 5 OFFSET 2`).
            // The LIMIT says it all, so the sort's copy is dropped.
            let node = match node {
                LogicalPlan::Limit(mut l) => {
                    if let LogicalPlan::Sort(s) = l.input.as_ref()
                        && s.fetch.is_some()
                    {
                        let mut s = s.clone();
                        s.fetch = None;
                        l.input = Arc::new(LogicalPlan::Sort(s));
                    }
                    LogicalPlan::Limit(l)
                }
                node => node,
            };
            // An alias over a table (`people AS a`, as in a self-join) names the
            // table itself: the table's own alias, added below, would hide it.
            let node = match node {
                LogicalPlan::SubqueryAlias(outer) => match outer.input.as_ref() {
                    // Bottom-up, every database table below has already been given its
                    // own alias: this inner alias is that one.
                    LogicalPlan::SubqueryAlias(inner)
                        if matches!(inner.input.as_ref(), LogicalPlan::TableScan(t)
                            if table_of(t).is_some()) =>
                    {
                        LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(
                            inner.input.clone(),
                            outer.alias.clone(),
                        )?)
                    }
                    _ => LogicalPlan::SubqueryAlias(outer),
                },
                node => node,
            };
            // Only PostgreSQL has `SELECT FROM t` (no columns, as under `count(*)`):
            // elsewhere the SELECT gets one constant column nothing above reads.
            let node = match node {
                LogicalPlan::Projection(p) if p.expr.is_empty() && dialect != Dialect::Postgres => {
                    LogicalPlan::Projection(datafusion::logical_expr::Projection::try_new(
                        vec![datafusion::prelude::lit(1i64).alias("__one")],
                        p.input,
                    )?)
                }
                node => node,
            };
            // The unparser writes ORDER BY into the SELECT of the projection below it,
            // where only the output names (unqualified) denote computed columns.
            if let LogicalPlan::Sort(sort) = &node
                && matches!(below_aliases(&sort.input), LogicalPlan::Projection(_))
            {
                return node.map_expressions(|e| {
                    e.transform(|e| match e {
                        Expr::Column(c) if c.relation.is_some() => Ok(Transformed::yes(
                            Expr::Column(Column::new_unqualified(c.name)),
                        )),
                        e => Ok(Transformed::no(e)),
                    })
                });
            }
            let LogicalPlan::TableScan(scan) = &node else {
                return Ok(Transformed::no(node));
            };
            let Some((_, schema, name)) = table_of(scan) else {
                return Ok(Transformed::no(node));
            };
            let reference = if schema.is_empty() {
                TableReference::bare(name)
            } else {
                TableReference::partial(schema, name)
            };
            let remote = TableScanBuilder::new(reference, scan.source.clone())
                .with_projection(scan.projection.clone())
                .with_filters(scan.filters.clone())
                .with_fetch(if has_limit { None } else { scan.fetch })
                .build()?;
            let alias = SubqueryAlias::try_new(
                Arc::new(LogicalPlan::TableScan(remote)),
                scan.table_name.clone(),
            )?;
            Ok(Transformed::yes(LogicalPlan::SubqueryAlias(alias)))
        })?
        .data;
    let statement = match dialect {
        Dialect::Postgres => Unparser::new(&Postgres).plan_to_sql(&plan)?,
        Dialect::DataFusion => Unparser::new(&DefaultDialect {}).plan_to_sql(&plan)?,
        Dialect::MySql => Unparser::new(&mysql_dialect()).plan_to_sql(&plan)?,
    };
    Ok(statement.to_string())
}

/// PostgreSQL as DataFusion's unparser writes it, except that a cast to text is
/// written `text`, not `varchar`. The two mean the same in PostgreSQL (an unbounded
/// `varchar` uses `text`'s operators, and a cast from `char(n)`, `name` or any other
/// type to either gives the same value), but a cast of a `text` column to `varchar`
/// is a conversion the database evaluates on every row, which also keeps it from
/// handing the table's rows to a sort unprojected: a top-k statement took 1.7 times as
/// long in the database (`EXPLAIN ANALYZE`, BENCHMARKS.md). A cast of a `text` column
/// to `text` is none at all. Every other choice is PostgreSQL's dialect's own.
struct Postgres;

impl datafusion::sql::unparser::dialect::Dialect for Postgres {
    fn use_array_keyword_for_array_literals(&self) -> bool {
        PostgreSqlDialect {}.use_array_keyword_for_array_literals()
    }

    fn supports_qualify(&self) -> bool {
        PostgreSqlDialect {}.supports_qualify()
    }

    fn requires_derived_table_alias(&self) -> bool {
        PostgreSqlDialect {}.requires_derived_table_alias()
    }

    fn supports_empty_select_list(&self) -> bool {
        PostgreSqlDialect {}.supports_empty_select_list()
    }

    fn identifier_quote_style(&self, identifier: &str) -> Option<char> {
        PostgreSqlDialect {}.identifier_quote_style(identifier)
    }

    fn interval_style(&self) -> datafusion::sql::unparser::dialect::IntervalStyle {
        PostgreSqlDialect {}.interval_style()
    }

    fn float64_ast_dtype(&self) -> datafusion::sql::sqlparser::ast::DataType {
        PostgreSqlDialect {}.float64_ast_dtype()
    }

    fn int8_cast_dtype(&self) -> datafusion::sql::sqlparser::ast::DataType {
        PostgreSqlDialect {}.int8_cast_dtype()
    }

    fn distinct_from_style(&self) -> datafusion::sql::unparser::dialect::DistinctFromStyle {
        PostgreSqlDialect {}.distinct_from_style()
    }

    fn scalar_function_to_sql_overrides(
        &self,
        unparser: &Unparser,
        func_name: &str,
        args: &[Expr],
    ) -> DfResult<Option<datafusion::sql::sqlparser::ast::Expr>> {
        PostgreSqlDialect {}.scalar_function_to_sql_overrides(unparser, func_name, args)
    }

    fn utf8_cast_dtype(&self) -> datafusion::sql::sqlparser::ast::DataType {
        datafusion::sql::sqlparser::ast::DataType::Text
    }
}

/// MySQL as the unparser should write it: MariaDB has no column list after a derived
/// table's alias (`AS t(a, b)`), so the names go into the derived table's SELECT.
fn mysql_dialect() -> datafusion::sql::unparser::dialect::CustomDialect {
    use datafusion::sql::sqlparser::ast;
    use datafusion::sql::unparser::dialect::{DateFieldExtractStyle, IntervalStyle};
    let signed = || {
        ast::DataType::Custom(
            ast::ObjectName::from(vec![ast::Ident::new("SIGNED")]),
            vec![],
        )
    };
    CustomDialectBuilder::new()
        .with_identifier_quote_style('`')
        .with_supports_nulls_first_in_sort(false)
        .with_interval_style(IntervalStyle::MySQL)
        .with_utf8_cast_dtype(ast::DataType::Char(None))
        .with_large_utf8_cast_dtype(ast::DataType::Char(None))
        .with_date_field_extract_style(DateFieldExtractStyle::Extract)
        .with_int64_cast_dtype(signed())
        .with_int32_cast_dtype(signed())
        .with_timestamp_cast_dtype(ast::DataType::Datetime(None), ast::DataType::Datetime(None))
        .with_requires_derived_table_alias(true)
        .with_supports_column_alias_in_table_alias(false)
        .build()
}

/// A MySQL sort puts NULLs first in ascending order and last in descending order, and
/// cannot be told otherwise. Each sort key whose values may be NULL gets a key before
/// it, `k IS NULL`, ordered so that the NULLs land where DataFusion's key puts them.
fn nulls_as_keys(node: LogicalPlan) -> DfResult<LogicalPlan> {
    let LogicalPlan::Sort(sort) = node else {
        return Ok(node);
    };
    let schema = sort.input.schema().clone();
    let mut keys = Vec::with_capacity(sort.expr.len() * 2);
    for k in sort.expr {
        if k.expr.nullable(&schema)? {
            keys.push(SortExpr::new(
                Expr::IsNull(Box::new(k.expr.clone())),
                // `false` sorts before `true`: NULLs last is `IS NULL` ascending.
                !k.nulls_first,
                k.nulls_first,
            ));
        }
        keys.push(k);
    }
    Ok(LogicalPlan::Sort(datafusion::logical_expr::Sort {
        expr: keys,
        input: sort.input,
        fetch: sort.fetch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{cast, col, lit};

    #[test]
    fn postgresql_gets_text_casts_as_text_and_everything_else_as_its_dialect_writes_it() {
        let ours = Unparser::new(&Postgres);
        let theirs = Unparser::new(&PostgreSqlDialect {});
        let sql = |u: &Unparser, e: Expr| u.expr_to_sql(&e).unwrap().to_string();
        assert_eq!(
            sql(&ours, cast(col("county_code"), DataType::Utf8)),
            "CAST(\"county_code\" AS TEXT)"
        );
        for e in [
            cast(col("x"), DataType::Float64),
            cast(col("x"), DataType::Int8),
            cast(col("x"), DataType::Int64),
            datafusion::logical_expr::binary_expr(
                col("a"),
                datafusion::logical_expr::Operator::IsNotDistinctFrom,
                col("b"),
            ),
            datafusion::functions::math::expr_fn::round(vec![col("x"), lit(2)]),
            lit(datafusion::common::ScalarValue::new_interval_mdn(1, 2, 3)),
        ] {
            assert_eq!(sql(&ours, e.clone()), sql(&theirs, e));
        }
    }
}
