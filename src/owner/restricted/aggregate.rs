//! `aggregate(k)` by construction: the caller's plan over the withheld dataset is
//! translated onto the owner's plan of cells. Filters and groupings must be expressions of
//! dimensions; aggregates are rewritten onto the cells' counts and sums; what cells cannot
//! say is refused with a message that says what can.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::functions::expr_fn::{coalesce, nullif};
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Cast, Distinct, Expr, ExprSchemable, Filter, LogicalPlan, Operator,
    Projection, TryCast, cast, col, lit, when,
};

use super::CELL_COUNT;
use super::CELLS;
use super::Out;
use super::Rec;
use super::Val;
use super::describe_node;

/// An expression over the cells' columns computing `e` (over the caller's
/// record-level input), when every column it reads is constant within a cell.
pub(super) fn dim_expr(e: &Expr, schema: &DFSchema, cols: &[Val]) -> Option<Expr> {
    let mut ok = true;
    let out = e
        .clone()
        .transform_up(|x| {
            let replaced = match &x {
                Expr::Column(c) => match schema.index_of_column(c).ok().map(|i| &cols[i]) {
                    Some(Val::Dim(d)) => Some(d.clone()),
                    _ => None,
                },
                Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::OuterReferenceColumn(..)
                | Expr::AggregateFunction(_)
                | Expr::WindowFunction(_)
                | Expr::Placeholder(_) => None,
                _ => return Ok(Transformed::no(x)),
            };
            match replaced {
                Some(d) => Ok(Transformed::yes(d)),
                None => {
                    ok = false;
                    Ok(Transformed::no(x))
                }
            }
        })
        .ok()?
        .data;
    ok.then_some(out)
}

/// A non-null numeric constant.
pub(super) fn number(e: &Expr) -> Option<ScalarValue> {
    match e {
        Expr::Literal(v, _)
            if !v.is_null() && (v.data_type().is_integer() || v.data_type().is_floating()) =>
        {
            Some(v.clone())
        }
        Expr::Negative(x) => number(x).and_then(|v| v.arithmetic_negate().ok()),
        _ => None,
    }
}

/// `e` as a linear function of one numeric field: its per-cell sum and count.
pub(super) fn lin_expr(e: &Expr, schema: &DFSchema, cols: &[Val]) -> Option<(Expr, Expr)> {
    match e {
        Expr::Alias(a) => lin_expr(&a.expr, schema, cols),
        Expr::Column(c) => match &cols[schema.index_of_column(c).ok()?] {
            Val::Lin { sum, count } => Some((sum.clone(), count.clone())),
            _ => None,
        },
        Expr::Cast(Cast { expr, field }) | Expr::TryCast(TryCast { expr, field })
            if field.data_type() == &DataType::Float64 =>
        {
            let (s, c) = lin_expr(expr, schema, cols)?;
            Some((cast(s, DataType::Float64), c))
        }
        Expr::Negative(x) => {
            let (s, c) = lin_expr(x, schema, cols)?;
            Some((Expr::Negative(Box::new(s)), c))
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let float = |x: &Expr| x.get_type(schema).is_ok_and(|t| t.is_floating());
            match (op, number(left), number(right)) {
                (Operator::Multiply, None, Some(k)) => {
                    let (s, c) = lin_expr(left, schema, cols)?;
                    Some((s * lit(k), c))
                }
                (Operator::Multiply, Some(k), None) => {
                    let (s, c) = lin_expr(right, schema, cols)?;
                    Some((lit(k) * s, c))
                }
                // Integer division rounds each record's value, so it is linear only
                // over floating-point values.
                (Operator::Divide, None, Some(k))
                    if float(left)
                        && ScalarValue::new_zero(&k.data_type()).is_ok_and(|z| z != k) =>
                {
                    let (s, c) = lin_expr(left, schema, cols)?;
                    Some((s / lit(k), c))
                }
                (Operator::Plus, None, Some(k)) => {
                    let (s, c) = lin_expr(left, schema, cols)?;
                    Some((s + lit(k) * c.clone(), c))
                }
                (Operator::Plus, Some(k), None) => {
                    let (s, c) = lin_expr(right, schema, cols)?;
                    Some((lit(k) * c.clone() + s, c))
                }
                (Operator::Minus, None, Some(k)) => {
                    let (s, c) = lin_expr(left, schema, cols)?;
                    Some((s - lit(k) * c.clone(), c))
                }
                (Operator::Minus, Some(k), None) => {
                    let (s, c) = lin_expr(right, schema, cols)?;
                    Some((lit(k) * c.clone() - s, c))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

pub(super) fn cells_node<'r>(
    plan: &LogicalPlan,
    schema: &DFSchema,
    rec: Rec<'r>,
) -> Result<Out<'r>, String> {
    let Rec::Cells {
        dataset,
        r,
        plan: cells,
        cols,
    } = &rec
    else {
        unreachable!("cells")
    };
    let next = |plan: LogicalPlan, cols: Vec<Val>| {
        Ok(Out::Rec(Rec::Cells {
            dataset: dataset.clone(),
            r,
            plan,
            cols,
        }))
    };
    match plan {
        LogicalPlan::SubqueryAlias(_) => next(cells.clone(), cols.clone()),
        LogicalPlan::Projection(p) => {
            let new_cols = p
                .expr
                .iter()
                .map(|e| {
                    if let Some(d) = dim_expr(e, schema, cols) {
                        Val::Dim(d)
                    } else if let Some((sum, count)) = lin_expr(e, schema, cols) {
                        Val::Lin { sum, count }
                    } else {
                        Val::Record
                    }
                })
                .collect();
            next(cells.clone(), new_cols)
        }
        LogicalPlan::Filter(f) => {
            let Some(pred) = dim_expr(&f.predicate, schema, cols) else {
                return Err(format!(
                    "{}; answers can be filtered only by its dimensions ({}), and the filter {} uses other fields",
                    rec.shared_as(),
                    rec.dims(),
                    f.predicate
                ));
            };
            let filtered =
                Filter::try_new(pred, Arc::new(cells.clone())).map_err(|e| e.to_string())?;
            next(LogicalPlan::Filter(filtered), cols.clone())
        }
        LogicalPlan::Aggregate(a) => cells_aggregate(a, schema, &rec).map(Out::Plan),
        LogicalPlan::Distinct(Distinct::All(_)) => {
            // DISTINCT over dimensions lists cells, each of at least k records.
            let mut exprs = Vec::with_capacity(cols.len());
            for (v, (q, f)) in cols.iter().zip(plan.schema().iter()) {
                let Val::Dim(d) = v else {
                    return Err(format!(
                        "{}; DISTINCT may list only its dimensions ({})",
                        rec.shared_as(),
                        rec.dims()
                    ));
                };
                exprs.push(d.clone().alias_qualified(q.cloned(), f.name()));
            }
            let p =
                Projection::try_new(exprs, Arc::new(cells.clone())).map_err(|e| e.to_string())?;
            Ok(Out::Plan(LogicalPlan::Distinct(Distinct::All(Arc::new(
                LogicalPlan::Projection(p),
            )))))
        }
        other => Err(format!(
            "{}; {} over its records is not allowed (aggregate first)",
            rec.shared_as(),
            describe_node(other)
        )),
    }
}

/// How one of the caller's aggregates is computed from aggregates over cells.
pub(super) enum Combine {
    /// A count: the sum of per-cell counts, 0 over no cells.
    Count(usize),
    /// The aggregate over cells as it is.
    Plain(usize),
    /// A mean: a sum over a count.
    Mean(usize, usize),
}

pub(super) fn agg(
    f: Arc<datafusion::logical_expr::AggregateUDF>,
    arg: Expr,
    distinct: bool,
    filter: Option<Expr>,
) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        f,
        vec![arg],
        distinct,
        filter.map(Box::new),
        vec![],
        None,
    ))
}

pub(super) fn cells_aggregate(
    a: &Aggregate,
    schema: &DFSchema,
    rec: &Rec,
) -> Result<LogicalPlan, String> {
    let Rec::Cells {
        plan: cells, cols, ..
    } = rec
    else {
        unreachable!("cells")
    };
    let n = || col(Column::new(Some(CELLS), CELL_COUNT));
    let mut groups = Vec::with_capacity(a.group_expr.len());
    for g in &a.group_expr {
        let t = match g {
            Expr::GroupingSet(_) => None,
            g => dim_expr(g, schema, cols),
        };
        let Some(t) = t else {
            return Err(format!(
                "{}; answers can be grouped only by its dimensions ({}), not by {g}",
                rec.shared_as(),
                rec.dims()
            ));
        };
        groups.push(t.alias(format!("__fedgate_g{}", groups.len())));
    }
    let mut aggs: Vec<Expr> = Vec::new();
    let mut push = |e: Expr| {
        aggs.push(e.alias(format!("__fedgate_a{}", aggs.len())));
        aggs.len() - 1
    };
    let mut combine = Vec::with_capacity(a.aggr_expr.len());
    for e in &a.aggr_expr {
        let f = match e {
            Expr::AggregateFunction(f) => f,
            Expr::Alias(al) => match al.expr.as_ref() {
                Expr::AggregateFunction(f) => f,
                other => return Err(format!("{other} is not an aggregate function")),
            },
            other => return Err(format!("{other} is not an aggregate function")),
        };
        let name = f.func.name();
        let p = &f.params;
        if !p.order_by.is_empty() || p.null_treatment.is_some() {
            return Err(format!(
                "{}; ordered aggregates are not allowed",
                rec.shared_as()
            ));
        }
        let filter = match &p.filter {
            None => None,
            Some(x) => Some(dim_expr(x, schema, cols).ok_or_else(|| {
                format!(
                    "{}; an aggregate FILTER may use only its dimensions ({})",
                    rec.shared_as(),
                    rec.dims()
                )
            })?),
        };
        let star = p.args.is_empty() || (p.args.len() == 1 && number(&p.args[0]).is_some());
        let arg = (p.args.len() == 1).then(|| &p.args[0]);
        let dim = arg.and_then(|x| dim_expr(x, schema, cols));
        let linear = arg.and_then(|x| lin_expr(x, schema, cols));
        let sum = sum_udaf();
        let counted = |d: &Expr| {
            when(d.clone().is_null(), lit(0i64))
                .otherwise(n())
                .expect("a CASE with one branch")
        };
        let c = match (name, p.distinct) {
            ("count", false) if star => Combine::Count(push(agg(sum, n(), false, filter))),
            ("count", false) => match (&dim, &linear) {
                (Some(d), _) => Combine::Count(push(agg(sum, counted(d), false, filter))),
                (None, Some((_, c))) => Combine::Count(push(agg(sum, c.clone(), false, filter))),
                _ => return Err(not_over_cells(rec, e)),
            },
            ("sum", false) => match (&dim, &linear) {
                (Some(d), _) => Combine::Plain(push(agg(sum, d.clone() * n(), false, filter))),
                (None, Some((s, _))) => Combine::Plain(push(agg(sum, s.clone(), false, filter))),
                _ => return Err(not_over_cells(rec, e)),
            },
            ("avg", false) => match (&dim, &linear) {
                (Some(d), _) => Combine::Mean(
                    push(agg(
                        sum.clone(),
                        cast(d.clone(), DataType::Float64) * n(),
                        false,
                        filter.clone(),
                    )),
                    push(agg(sum, counted(d), false, filter)),
                ),
                (None, Some((s, c))) => Combine::Mean(
                    push(agg(sum.clone(), s.clone(), false, filter.clone())),
                    push(agg(sum, c.clone(), false, filter)),
                ),
                _ => return Err(not_over_cells(rec, e)),
            },
            // Over dimensions, these are the same over cells as over records.
            ("min" | "max", _) | ("count" | "sum" | "avg", true) => match &dim {
                Some(d) => Combine::Plain(push(agg(f.func.clone(), d.clone(), p.distinct, filter))),
                None if matches!(name, "min" | "max") => {
                    return Err(format!(
                        "{}; {name} would reveal one record's value: use it on its dimensions ({}) only",
                        rec.shared_as(),
                        rec.dims()
                    ));
                }
                None => return Err(not_over_cells(rec, e)),
            },
            (other, _) => {
                return Err(format!(
                    "{}; the aggregate {other} is not allowed (use count, sum, avg, or min/max of a dimension)",
                    rec.shared_as()
                ));
            }
        };
        combine.push(c);
    }
    let over = Aggregate::try_new(Arc::new(cells.clone()), groups, aggs)
        .map(LogicalPlan::Aggregate)
        .map_err(|e| e.to_string())?;
    let g = a.group_expr.len();
    let out = |i: usize| col(Column::new_unqualified(format!("__fedgate_a{i}")));
    let mut exprs = Vec::with_capacity(a.schema.fields().len());
    for (i, (q, field)) in a.schema.iter().enumerate() {
        let e = if i < g {
            col(Column::new_unqualified(format!("__fedgate_g{i}")))
        } else {
            match combine[i - g] {
                Combine::Count(j) => coalesce(vec![out(j), lit(0i64)]),
                Combine::Plain(j) => out(j),
                Combine::Mean(s, c) => {
                    cast(out(s), DataType::Float64)
                        / nullif(cast(out(c), DataType::Float64), lit(0f64))
                }
            }
        };
        let t = e.get_type(over.schema()).map_err(|e| e.to_string())?;
        let e = if &t == field.data_type() {
            e
        } else {
            cast(e, field.data_type().clone())
        };
        exprs.push(e.alias_qualified(q.cloned(), field.name()));
    }
    Projection::try_new(exprs, Arc::new(over))
        .map(LogicalPlan::Projection)
        .map_err(|e| e.to_string())
}

pub(super) fn not_over_cells(rec: &Rec, e: &Expr) -> String {
    format!(
        "{}; {e} cannot be computed from its cells: aggregate a numeric field as it is \
         (count, sum, avg of the field, scaled or shifted by a constant), count(*), or \
         any of count, sum, avg, min, max of its dimensions ({})",
        rec.shared_as(),
        rec.dims()
    )
}
