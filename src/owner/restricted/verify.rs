//! `verify` by construction: the caller's equalities `field = constant` over the rule's
//! keys become the owner's own existence check, and only the constants reach the owner's
//! plan.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Cast, Expr, LogicalPlan, Operator, Projection, cast, col, lit, when,
};

use super::CELL_COUNT;
use super::Key;
use super::Out;
use super::Owned;
use super::RECORDS;
use super::Rec;
use super::Restricted;
use super::aggregate::agg;
use super::aggregate::number;
use super::describe_node;
use crate::config::MEMBER_COLUMN;

pub(super) fn verify_node<'r>(
    plan: &LogicalPlan,
    schema: &DFSchema,
    rec: Rec<'r>,
) -> Result<Out<'r>, String> {
    let Rec::Verify {
        dataset,
        r,
        cols,
        stated,
    } = &rec
    else {
        unreachable!("verify")
    };
    let field_at =
        |c: &Column| -> Option<&Key> { schema.index_of_column(c).ok().map(|i| &cols[i]) };
    let next = |cols: Vec<Key>, stated: Vec<(String, ScalarValue)>| {
        Ok(Out::Rec(Rec::Verify {
            dataset: dataset.clone(),
            r,
            cols,
            stated,
        }))
    };
    match plan {
        LogicalPlan::SubqueryAlias(_) => next(cols.clone(), stated.clone()),
        LogicalPlan::Projection(p) => {
            let new_cols = p
                .expr
                .iter()
                .map(|e| match e.clone().unalias() {
                    Expr::Column(c) => field_at(&c).cloned().unwrap_or(Key::Other),
                    _ => Key::Other,
                })
                .collect();
            next(new_cols, stated.clone())
        }
        LogicalPlan::Filter(f) => {
            let mut stated = stated.clone();
            for c in split_conjunction(&f.predicate) {
                let s = stated_value(c, &field_at, r).ok_or_else(|| {
                    format!(
                        "{}; a verification states values with field = value joined by AND \
                         (the field as it is, the value of the field's own type), and {c} is not of that form",
                        rec.shared_as()
                    )
                })?;
                stated.push(s);
            }
            next(cols.clone(), stated)
        }
        LogicalPlan::Aggregate(a) => verify_aggregate(a, &rec, &field_at).map(Out::Plan),
        other => Err(format!(
            "{}; {} over its records is not allowed",
            rec.shared_as(),
            describe_node(other)
        )),
    }
}

/// `field = constant` (either way round), the field as it is and the constant of the
/// field's own type.
pub(super) fn stated_value<'a>(
    e: &Expr,
    field_at: &dyn Fn(&Column) -> Option<&'a Key>,
    r: &Restricted,
) -> Option<(String, ScalarValue)> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = e
    else {
        return None;
    };
    let (c, v) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), v) | (v, Expr::Column(c)) if !matches!(v, Expr::Column(_)) => (c, v),
        _ => return None,
    };
    let Key::Field(name) = field_at(c)? else {
        return None;
    };
    let (_, t) = r.fields.iter().find(|(f, _)| f == name)?;
    let value = constant(v, t)?;
    Some((name.clone(), value))
}

/// A caller's constant of type `t`: a literal of that type, or a literal cast to it
/// (`DATE '2024-01-01'`). The cast is of the caller's own constant, never of a field.
pub(super) fn constant(v: &Expr, t: &DataType) -> Option<ScalarValue> {
    let value = match v {
        Expr::Literal(s, _) => s.clone(),
        Expr::Cast(Cast { expr, field }) if field.data_type() == t => match expr.as_ref() {
            Expr::Literal(s, _) => s.cast_to(t).ok()?,
            _ => return None,
        },
        _ => return None,
    };
    (!value.is_null() && &value.data_type() == t).then_some(value)
}

pub(super) fn verify_aggregate<'a>(
    a: &Aggregate,
    rec: &Rec,
    field_at: &dyn Fn(&Column) -> Option<&'a Key>,
) -> Result<LogicalPlan, String> {
    let Rec::Verify { r, stated, .. } = rec else {
        unreachable!("verify")
    };
    for g in &a.group_expr {
        let member = matches!(g, Expr::Column(c) if matches!(field_at(c), Some(Key::Field(n)) if n == MEMBER_COLUMN));
        if !member {
            return Err(format!(
                "{}; a verification can be grouped only by member, not by {g}",
                rec.shared_as()
            ));
        }
    }
    for e in &a.aggr_expr {
        let ok = match e.clone().unalias() {
            Expr::AggregateFunction(f) => {
                let p = &f.params;
                f.func.name() == "count"
                    && !p.distinct
                    && p.filter.is_none()
                    && p.order_by.is_empty()
                    && p.args.iter().all(|x| number(x).is_some())
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "{}; a verification can only count(*) the records that match",
                rec.shared_as()
            ));
        }
    }
    let missing: Vec<&str> = r
        .grant
        .keys
        .iter()
        .filter(|k| !stated.iter().any(|(f, _)| f == *k))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{}; a verification must state {} exactly (field = value)",
            rec.shared_as(),
            missing.join(" and ")
        ));
    }
    let Owned::Records { plan: records } = &r.owned else {
        unreachable!("verify grants have a records plan")
    };
    // The owner's existence check: its own record view, its own filter built from
    // the stated constants, its own count.
    let field = |f: &str| col(Column::new(Some(RECORDS), f));
    let mut check = datafusion::logical_expr::LogicalPlanBuilder::from(records.clone())
        .alias(RECORDS)
        .map_err(|e| e.to_string())?;
    if let Some(pred) = stated
        .iter()
        .map(|(f, v)| field(f).eq(lit(v.clone())))
        .reduce(Expr::and)
    {
        check = check.filter(pred).map_err(|e| e.to_string())?;
    }
    let grouped = !a.group_expr.is_empty();
    let counted = check
        .aggregate(
            if grouped {
                vec![field(MEMBER_COLUMN)]
            } else {
                vec![]
            },
            vec![agg(sum_udaf(), lit(1i64), false, None).alias(CELL_COUNT)],
        )
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    let g = a.group_expr.len();
    let mut exprs = Vec::with_capacity(a.schema.fields().len());
    for (i, (q, f)) in a.schema.iter().enumerate() {
        let e = if i < g {
            col(Column::new(Some(RECORDS), MEMBER_COLUMN))
        } else {
            when(
                col(Column::new_unqualified(CELL_COUNT)).gt(lit(0i64)),
                lit(1i64),
            )
            .otherwise(lit(0i64))
            .map_err(|e| e.to_string())?
        };
        let e = if f.data_type() == &DataType::Int64 || i < g {
            e
        } else {
            cast(e, f.data_type().clone())
        };
        exprs.push(e.alias_qualified(q.cloned(), f.name()));
    }
    Projection::try_new(exprs, Arc::new(counted))
        .map(LogicalPlan::Projection)
        .map_err(|e| e.to_string())
}
