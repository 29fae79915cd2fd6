//! Moves work into the databases behind a member.
//!
//! [`push_into_databases`] runs on a member's optimized logical plans. It finds the
//! largest sub-plans that read tables of a single database and whose every operator
//! and expression means the same there as in DataFusion, unparses each into
//! PostgreSQL SQL and replaces it with a scan of that SQL's result. What cannot go (a
//! mapping's code-table lookup, a mask, a join across two databases) stays in the
//! gateway, above the scans, so the answer is the same either way: correct first,
//! then fast.
//!
//! "Means the same" is decided conservatively, node by node and expression by
//! expression: an allow-list, not a deny-list. Casts are pushed only where both
//! engines cannot fail and agree on the value; ordering comparisons of text only where
//! the database compares text byte-wise, as DataFusion does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, JoinType, NullEquality, ScalarValue, TableReference};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::expr::{AggregateFunction, Cast};
use datafusion::logical_expr::{
    BinaryExpr, Distinct, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, Operator,
    SubqueryAlias, TableScan, TableScanBuilder,
};
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::PostgreSqlDialect;

use super::postgres::{PgDatabase, PgQuery, PgTable, readable};

/// Names of the scans this rule creates; unique within a process.
static SCANS: AtomicU64 = AtomicU64::new(0);

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
    let (plan, owner) = push(plan)?;
    match owner {
        Some(db) => remote_scan(plan, db),
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
fn table_of(scan: &TableScan) -> Option<(Arc<PgDatabase>, String, String)> {
    let provider = source_as_provider(&scan.source).ok()?;
    let any: &dyn std::any::Any = provider.as_ref();
    let table = any.downcast_ref::<PgTable>()?;
    let (schema, name) = table.remote_name();
    Some((
        table.database().clone(),
        schema.to_string(),
        name.to_string(),
    ))
}

/// Rewrites the children of `plan` and says which database, if exactly one, could run
/// all of `plan`.
fn push(plan: LogicalPlan) -> DfResult<(LogicalPlan, Option<Arc<PgDatabase>>)> {
    if let LogicalPlan::TableScan(scan) = &plan {
        let owner = table_of(scan)
            .filter(|_| scan.filters.is_empty())
            .map(|(db, _, _)| db);
        return Ok((plan, owner));
    }
    let mut owners: Vec<Option<Arc<PgDatabase>>> = Vec::new();
    let plan = plan
        .map_children(|c| {
            let (c, o) = push(c)?;
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
            .all(|o| o.as_ref().is_some_and(|o| Arc::ptr_eq(o, first)))
    });
    if let Some(db) = sole
        && node_ok(&plan, &db)
    {
        return Ok((plan, Some(db)));
    }
    // This node stays in the gateway: each child that a database can run entirely
    // becomes a scan of that database's answer.
    let mut owners = owners.into_iter();
    let plan = plan
        .map_children(|c| match owners.next().flatten() {
            Some(db) => Ok(Transformed::yes(remote_scan(c, db)?)),
            None => Ok(Transformed::no(c)),
        })?
        .data;
    Ok((plan, None))
}

/// Whether the database can run this operator (its inputs already can).
fn node_ok(plan: &LogicalPlan, db: &PgDatabase) -> bool {
    let c = db.c_collation();
    let out_ok = plan
        .schema()
        .fields()
        .iter()
        .all(|f| readable(f.data_type()));
    if !out_ok {
        return false;
    }
    match plan {
        // A projection over a LIMIT stays in the gateway: the unparser writes the LIMIT
        // as a derived table of its own while the projection goes on naming the
        // tables inside it (`SELECT "h"."x" FROM (... AS "h" LIMIT 5) AS
        // "derived_limit"`), which the database refuses. The LIMIT itself still runs in
        // the database; the gateway projects at most its rows.
        LogicalPlan::Projection(p) => {
            !limit_below(&p.input) && p.expr.iter().all(|e| expr_ok(e, p.input.schema(), c))
        }
        // A filter over an aggregate (a HAVING) stays in the gateway: DataFusion's
        // unparser writes it over a derived table that does not name the
        // aggregate's columns, which the database then cannot find.
        LogicalPlan::Filter(f) => {
            expr_ok(&f.predicate, f.input.schema(), c) && !over_aggregate(&f.input)
        }
        LogicalPlan::Aggregate(a) => {
            a.group_expr.iter().all(|e| expr_ok(e, a.input.schema(), c))
                && a.aggr_expr.iter().all(|e| expr_ok(e, a.input.schema(), c))
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
                    expr_ok(&k.expr, s.input.schema(), c)
                        && (c || !is_text(&k.expr, s.input.schema()))
                })
        }
        LogicalPlan::Limit(l) => {
            let lit = |e: &Option<Box<Expr>>| {
                e.as_deref()
                    .is_none_or(|e| matches!(e, Expr::Literal(ScalarValue::Int64(_), _)))
            };
            lit(&l.skip) && lit(&l.fetch)
        }
        LogicalPlan::SubqueryAlias(_) => true,
        LogicalPlan::Distinct(Distinct::All(_)) => true,
        LogicalPlan::Union(_) => true,
        LogicalPlan::Join(j) => {
            matches!(
                j.join_type,
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
            ) && j.null_equality == NullEquality::NullEqualsNothing
                && j.on
                    .iter()
                    .all(|(l, r)| expr_ok(l, &j.schema, c) && expr_ok(r, &j.schema, c))
                && j.filter.as_ref().is_none_or(|f| expr_ok(f, &j.schema, c))
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

/// Scalar functions that PostgreSQL has under the same name with the same meaning.
const FUNCTIONS: &[&str] = &[
    "lower",
    "upper",
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

/// Whether an expression means the same in the database.
fn expr_ok(e: &Expr, schema: &DFSchema, c_collation: bool) -> bool {
    let mut ok = true;
    let _ = e.apply(|e| {
        let this = match e {
            Expr::Alias(_) | Expr::Column(_) => true,
            Expr::Literal(v, _) => matches!(
                v,
                ScalarValue::Null
                    | ScalarValue::Boolean(_)
                    | ScalarValue::Int16(_)
                    | ScalarValue::Int32(_)
                    | ScalarValue::Int64(_)
                    | ScalarValue::Float64(_)
                    | ScalarValue::Utf8(_)
                    | ScalarValue::Date32(_)
                    | ScalarValue::Decimal128(..)
            ),
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                binary_ok(left, *op, right, schema, c_collation)
            }
            Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::Negative(_)
            | Expr::InList(_)
            | Expr::Case(_) => true,
            Expr::Between(b) => c_collation || !is_text(&b.expr, schema),
            Expr::Like(l) => !l.case_insensitive && l.escape_char.is_none(),
            Expr::Cast(Cast { expr, field }) => cast_ok(expr, field.data_type(), schema),
            Expr::TryCast(t) => cast_ok(&t.expr, t.field.data_type(), schema),
            Expr::ScalarFunction(f) => FUNCTIONS.contains(&f.func.name()),
            Expr::AggregateFunction(AggregateFunction { func, params }) => {
                let name = func.name();
                let plain = params.filter.is_none()
                    && params.order_by.is_empty()
                    && params.null_treatment.is_none();
                let min_max_text = matches!(name, "min" | "max")
                    && !c_collation
                    && params.args.first().is_some_and(|a| is_text(a, schema));
                plain
                    && !min_max_text
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

fn binary_ok(left: &Expr, op: Operator, right: &Expr, schema: &DFSchema, c: bool) -> bool {
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
    match op {
        Eq | NotEq | And | Or | Plus | Minus | Multiply | StringConcat => true,
        IsDistinctFrom | IsNotDistinctFrom => true,
        Lt | LtEq | Gt | GtEq => c || !(is_text(left, schema) || is_text(right, schema)),
        // Integer division truncates in both; float division by zero is an error in
        // PostgreSQL but infinity in DataFusion, and decimal division rounds to
        // different scales, so only integer division goes.
        Divide | Modulo => !(float_or_decimal(left) || float_or_decimal(right)),
        _ => false,
    }
}

/// Casts that cannot fail and give the same value in both engines.
fn cast_ok(e: &Expr, to: &DataType, schema: &DFSchema) -> bool {
    use DataType::*;
    let Ok(from) = e.get_type(schema) else {
        return false;
    };
    if &from == to {
        return true;
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

/// Whether `plan` is a LIMIT that the unparser writes as a derived table under a
/// projection: one with no aggregate in the same SELECT (an aggregate below keeps the
/// projection, the LIMIT and the aggregate in one SELECT).
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
    matches!(plan, LogicalPlan::Limit(l) if !aggregate_in_select(&l.input))
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
fn remote_scan(plan: LogicalPlan, db: Arc<PgDatabase>) -> DfResult<LogicalPlan> {
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
    let sql = to_sql(plan)?;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), f.is_nullable()))
        .collect();
    let provider = PgQuery::new(db, sql, Arc::new(Schema::new(fields)));
    let name = format!("__fedgate_db_{}", SCANS.fetch_add(1, Ordering::Relaxed));
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

/// The PostgreSQL SQL of a sub-plan: local table names become the database's, and
/// `TRY_CAST`s (allowed only where they cannot fail) become `CAST`s.
pub fn to_sql(plan: LogicalPlan) -> DfResult<String> {
    // DataFusion copies a LIMIT's row count (skip plus fetch) into the scan below it
    // and keeps the LIMIT. The unparser writes both into the same SELECT, where the
    // scan's count replaces the LIMIT's and its OFFSET is lost (`LIMIT 5 OFFSET 2`
    // answered 7 rows). When the statement carries the LIMIT, the scan's copy is
    // dropped.
    let has_limit = plan.exists(|p| Ok(matches!(p, LogicalPlan::Limit(_))))?;
    let plan = plan
        .transform_up(|node| {
            let node = node
                .map_expressions(|e| {
                    e.transform(|e| match e {
                        Expr::TryCast(t) => Ok(Transformed::yes(Expr::Cast(Cast::new_from_field(
                            t.expr, t.field,
                        )))),
                        e => Ok(Transformed::no(e)),
                    })
                })?
                .data;
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
            let remote =
                TableScanBuilder::new(TableReference::partial(schema, name), scan.source.clone())
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
    let statement = Unparser::new(&PostgreSqlDialect {}).plan_to_sql(&plan)?;
    Ok(statement.to_string())
}
