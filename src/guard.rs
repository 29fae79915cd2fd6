//! Checks and rewrites a sub-query under the grants of its permit, at the data owner.
//!
//! Masks need no check here: a masked dataset is planned against a view in which the
//! masked fields already are masked, so every filter, ordering, grouping or function a
//! caller writes sees only the masked value. Datasets shared as `aggregate` or
//! `verify` need more, because the shape of the query decides what leaves; this
//! module walks the caller's logical plan (before optimization, so it sees what the
//! caller wrote) and follows which columns still hold record-level data of such a
//! dataset.
//!
//! **aggregate(k).** The dataset is planned against a view that keeps only records
//! whose *cell* (their combination of values of the rule's dimension fields) holds at
//! least k records. A query may filter and group only by dimensions, and aggregate
//! with COUNT, SUM and AVG (MIN and MAX over dimensions only). Every group and every
//! filtered set is then a union of whole cells, so each released number covers at
//! least k records, and the difference of any two answers is again a sum over whole
//! cells: differencing cannot isolate a group smaller than k. Record-level rows,
//! orderings or limits of records, joins of records and subqueries are refused.
//!
//! **verify.** The query must be a COUNT over the dataset filtered by equalities
//! `field = value` that state at least the rule's keys, grouped by nothing but
//! `member`. Each count is rewritten to 1 (a record exists) or 0, so the answer is
//! yes or no and never the record, nor how many records match.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Distinct, Expr, LogicalPlan, LogicalPlanBuilder, Operator, lit, when,
};

use crate::config::MEMBER_COLUMN;
use crate::policy::{AccessLevel, Grant};

/// What a column of a record-level intermediate result holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A function of dimension fields (or a constant).
    Dim,
    /// A dataset field passed through unchanged.
    Field,
    /// Anything else computed from non-dimension fields.
    Derived,
}

/// Record-level data of a restricted dataset flowing through the plan.
#[derive(Debug, Clone)]
struct Raw<'g> {
    dataset: String,
    grant: &'g Grant,
    /// One entry per output column.
    cols: Vec<(Class, Option<String>)>,
    /// `verify`: fields stated by an equality so far.
    stated: BTreeSet<String>,
}

enum Flow<'g> {
    /// Nothing record-level of a restricted dataset.
    Safe,
    Raw(Raw<'g>),
}

/// Checks `plan` against the grants and returns it rewritten for `verify` grants.
/// The error is an explanation for the caller.
pub fn guard(plan: LogicalPlan, grants: &BTreeMap<String, Grant>) -> Result<LogicalPlan, String> {
    let restricted = grants
        .values()
        .any(|g| matches!(g.level, AccessLevel::Aggregate { .. } | AccessLevel::Verify));
    if !restricted {
        return Ok(plan);
    }
    refuse_subqueries(&plan, grants)?;
    if let Flow::Raw(raw) = flow(&plan, grants)? {
        return Err(match raw.grant.level {
            AccessLevel::Verify => format!(
                "{}; this query returns its records: ask only whether a record exists, \
                 e.g. SELECT count(*) FROM {} WHERE {} = '...'",
                shared_as(&raw),
                raw.dataset,
                first_key(raw.grant)
            ),
            _ => format!(
                "{}; this query returns its records: ask for aggregates (count, sum, avg) \
                 grouped by its dimensions ({})",
                shared_as(&raw),
                dims(raw.grant)
            ),
        });
    }
    if grants.values().any(|g| g.level == AccessLevel::Verify) {
        cap_verifications(plan, grants)
    } else {
        Ok(plan)
    }
}

fn shared_as(raw: &Raw) -> String {
    format!(
        "dataset {} is shared with this caller as {} only ({})",
        raw.dataset,
        raw.grant.level,
        raw.grant.rule_name()
    )
}

fn dims(g: &Grant) -> String {
    let mut d: Vec<&str> = g.dimensions.iter().map(String::as_str).collect();
    d.push(MEMBER_COLUMN);
    d.join(", ")
}

fn first_key(g: &Grant) -> &str {
    g.keys.iter().next().map(String::as_str).unwrap_or("key")
}

/// The restricted dataset a plan node reads, if any. The SQL planner inlines a view
/// as an alias, named as the query wrote the table, over the view's plan; a caller
/// cannot take the alias away (its own aliases wrap it), so every read of a dataset
/// is found. A caller's own alias that happens to carry a restricted dataset's name
/// is treated as that dataset, which only restricts more. A table scan of the name
/// (a dataset registered as a table, as in tests) counts too.
fn restricted_scan<'g>(
    plan: &LogicalPlan,
    grants: &'g BTreeMap<String, Grant>,
) -> Option<(String, &'g Grant)> {
    let name = match plan {
        LogicalPlan::TableScan(scan) => scan.table_name.table().to_string(),
        LogicalPlan::SubqueryAlias(a) => a.alias.table().to_string(),
        _ => return None,
    };
    let g = grants.get(&name)?;
    matches!(g.level, AccessLevel::Aggregate { .. } | AccessLevel::Verify).then_some((name, g))
}

/// Subqueries could read record-level data and hand it to an outer query in ways
/// that are hard to follow, so a query reading a restricted dataset may not use them.
fn refuse_subqueries(plan: &LogicalPlan, grants: &BTreeMap<String, Grant>) -> Result<(), String> {
    let mut touches = None;
    let mut subquery = false;
    plan.apply_with_subqueries(|p| {
        if let Some((d, g)) = restricted_scan(p, grants) {
            touches = Some((d, g.level, g.rule_name()));
        }
        for e in p.expressions() {
            if e.exists(|x| {
                Ok(matches!(
                    x,
                    Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)
                ))
            })
            .unwrap_or(true)
            {
                subquery = true;
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| e.to_string())?;
    match touches {
        Some((d, level, rule)) if subquery => Err(format!(
            "dataset {d} is shared with this caller as {level} only ({rule}); queries over it cannot use subqueries"
        )),
        _ => Ok(()),
    }
}

fn flow<'g>(plan: &LogicalPlan, grants: &'g BTreeMap<String, Grant>) -> Result<Flow<'g>, String> {
    if let Some((dataset, grant)) = restricted_scan(plan, grants) {
        let cols = plan
            .schema()
            .fields()
            .iter()
            .map(|f| {
                let name = f.name().clone();
                let class = match grant.level {
                    AccessLevel::Aggregate { .. }
                        if name == MEMBER_COLUMN || grant.dimensions.contains(&name) =>
                    {
                        Class::Dim
                    }
                    _ => Class::Field,
                };
                (class, Some(name))
            })
            .collect();
        return Ok(Flow::Raw(Raw {
            dataset,
            grant,
            cols,
            stated: BTreeSet::new(),
        }));
    }
    let inputs = plan.inputs();
    let mut flows = Vec::with_capacity(inputs.len());
    for i in &inputs {
        flows.push(flow(i, grants)?);
    }
    let raw_inputs: Vec<&Raw> = flows
        .iter()
        .filter_map(|f| match f {
            Flow::Raw(r) => Some(r),
            Flow::Safe => None,
        })
        .collect();
    let Some(raw) = raw_inputs.first().map(|r| (*r).clone()) else {
        return Ok(Flow::Safe);
    };
    if inputs.len() > 1 {
        return Err(format!(
            "{}; its records cannot be joined or combined with other rows (aggregate first)",
            shared_as(&raw)
        ));
    }
    let input_schema = inputs[0].schema();
    let verify = raw.grant.level == AccessLevel::Verify;
    match plan {
        LogicalPlan::SubqueryAlias(_) => Ok(Flow::Raw(raw)),
        LogicalPlan::Projection(p) => {
            let mut cols = Vec::with_capacity(p.expr.len());
            for e in &p.expr {
                let c = class_of(e, input_schema, &raw.cols)?;
                if verify && c.0 != Class::Field && !is_literal(e) {
                    return Err(format!(
                        "{}; a verification can only name fields, not compute with them",
                        shared_as(&raw)
                    ));
                }
                cols.push(c);
            }
            Ok(Flow::Raw(Raw { cols, ..raw }))
        }
        LogicalPlan::Filter(f) => {
            if verify {
                let mut stated = raw.stated.clone();
                for c in split_conjunction(&f.predicate) {
                    stated.insert(equality_field(c, input_schema, &raw).ok_or_else(|| {
                        format!(
                            "{}; a verification states values with field = value joined by AND, \
                             and {c} is not of that form",
                            shared_as(&raw)
                        )
                    })?);
                }
                return Ok(Flow::Raw(Raw { stated, ..raw }));
            }
            let (class, _) = class_of(&f.predicate, input_schema, &raw.cols)?;
            if class != Class::Dim {
                return Err(format!(
                    "{}; answers can be filtered only by its dimensions ({}), and the filter {} uses other fields",
                    shared_as(&raw),
                    dims(raw.grant),
                    f.predicate
                ));
            }
            Ok(Flow::Raw(raw))
        }
        LogicalPlan::Aggregate(a) => {
            if verify {
                check_verification(a, &raw)?;
            } else {
                check_aggregate(a, &raw)?;
            }
            Ok(Flow::Safe)
        }
        LogicalPlan::Distinct(Distinct::All(_))
            if !verify && raw.cols.iter().all(|(c, _)| *c == Class::Dim) =>
        {
            // DISTINCT over dimensions only is a GROUP BY without aggregates: it lists
            // cells, each of which holds at least k records.
            Ok(Flow::Safe)
        }
        other => Err(format!(
            "{}; {} over its records is not allowed",
            shared_as(&raw),
            describe_node(other)
        )),
    }
}

fn describe_node(p: &LogicalPlan) -> &'static str {
    match p {
        LogicalPlan::Sort(_) => "ORDER BY",
        LogicalPlan::Limit(_) => "LIMIT",
        LogicalPlan::Window(_) => "a window function",
        LogicalPlan::Distinct(_) => "DISTINCT",
        LogicalPlan::Unnest(_) => "UNNEST",
        _ => "this operation",
    }
}

fn is_literal(e: &Expr) -> bool {
    matches!(unalias(e), Expr::Literal(..))
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        Expr::Cast(c) => unalias(&c.expr),
        Expr::TryCast(c) => unalias(&c.expr),
        other => other,
    }
}

/// The class of an expression over a record-level input, and the dataset field it
/// passes through unchanged, if it does.
fn class_of(
    e: &Expr,
    schema: &DFSchema,
    cols: &[(Class, Option<String>)],
) -> Result<(Class, Option<String>), String> {
    let class = |c: &Column| -> Result<&(Class, Option<String>), String> {
        let i = schema
            .index_of_column(c)
            .map_err(|_| format!("column {c} is not known here"))?;
        Ok(&cols[i])
    };
    match unalias(e) {
        Expr::Column(c) => return Ok(class(c)?.clone()),
        // A field scaled or shifted by a constant is still that field's value
        // (`x * 1.0` is how the coordinator asks for a sum as doubles); a comparison
        // or a function of it is not.
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(
                op,
                Operator::Plus | Operator::Minus | Operator::Multiply | Operator::Divide
            ) && (is_literal(left) || is_literal(right)) =>
        {
            let other = if is_literal(left) { right } else { left };
            let c = class_of(other, schema, cols)?;
            if c.0 == Class::Field {
                return Ok((Class::Field, None));
            }
        }
        _ => {}
    }
    let mut all_dim = true;
    for c in e.column_refs() {
        if class(c)?.0 != Class::Dim {
            all_dim = false;
        }
    }
    Ok((if all_dim { Class::Dim } else { Class::Derived }, None))
}

/// `field = literal` (either way round): the field stated.
fn equality_field(e: &Expr, schema: &DFSchema, raw: &Raw) -> Option<String> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = unalias(e)
    else {
        return None;
    };
    let (c, v) = match (unalias(left), unalias(right)) {
        (Expr::Column(c), v @ Expr::Literal(..)) | (v @ Expr::Literal(..), Expr::Column(c)) => {
            (c, v)
        }
        _ => return None,
    };
    if matches!(v, Expr::Literal(s, _) if s.is_null()) {
        return None;
    }
    let i = schema.index_of_column(c).ok()?;
    match &raw.cols[i] {
        (Class::Field, Some(name)) => Some(name.clone()),
        _ => None,
    }
}

fn aggregate_calls(a: &Aggregate) -> Result<Vec<&AggregateFunction>, String> {
    a.aggr_expr
        .iter()
        .map(|e| match unalias(e) {
            Expr::AggregateFunction(f) => Ok(f),
            other => Err(format!("{other} is not an aggregate function")),
        })
        .collect()
}

fn check_aggregate(a: &Aggregate, raw: &Raw) -> Result<(), String> {
    let schema = a.input.schema();
    for g in &a.group_expr {
        if class_of(g, schema, &raw.cols)?.0 != Class::Dim {
            return Err(format!(
                "{}; answers can be grouped only by its dimensions ({}), not by {g}",
                shared_as(raw),
                dims(raw.grant)
            ));
        }
    }
    for f in aggregate_calls(a)? {
        let name = f.func.name();
        let p = &f.params;
        let dims_only = match name {
            "count" | "sum" | "avg" => false,
            "min" | "max" => true,
            other => {
                return Err(format!(
                    "{}; the aggregate {other} is not allowed (use count, sum, avg, or min/max of a dimension)",
                    shared_as(raw)
                ));
            }
        };
        if !p.order_by.is_empty() {
            return Err(format!(
                "{}; ordered aggregates are not allowed",
                shared_as(raw)
            ));
        }
        if let Some(filter) = &p.filter
            && class_of(filter, schema, &raw.cols)?.0 != Class::Dim
        {
            return Err(format!(
                "{}; an aggregate FILTER may use only dimensions ({})",
                shared_as(raw),
                dims(raw.grant)
            ));
        }
        for arg in &p.args {
            let (class, _) = class_of(arg, schema, &raw.cols)?;
            let ok = match class {
                Class::Dim => true,
                Class::Field => !dims_only,
                Class::Derived => false,
            };
            if !ok {
                return Err(if dims_only {
                    format!(
                        "{}; {name} would reveal one record's value: use it on dimensions ({}) only",
                        shared_as(raw),
                        dims(raw.grant)
                    )
                } else {
                    format!(
                        "{}; aggregate a field as it is ({name}(field)), not an expression over other fields such as {arg}",
                        shared_as(raw)
                    )
                });
            }
        }
    }
    Ok(())
}

fn check_verification(a: &Aggregate, raw: &Raw) -> Result<(), String> {
    let schema = a.input.schema();
    for g in &a.group_expr {
        let member = matches!(class_of(g, schema, &raw.cols)?, (Class::Field, Some(n)) if n == MEMBER_COLUMN);
        if !member {
            return Err(format!(
                "{}; a verification can be grouped only by member, not by {g}",
                shared_as(raw)
            ));
        }
    }
    for f in aggregate_calls(a)? {
        let p = &f.params;
        if f.func.name() != "count"
            || p.distinct
            || p.filter.is_some()
            || !p.order_by.is_empty()
            || !p.args.iter().all(is_literal)
        {
            return Err(format!(
                "{}; a verification can only count(*) the records that match",
                shared_as(raw)
            ));
        }
    }
    let missing: Vec<&str> = raw
        .grant
        .keys
        .iter()
        .filter(|k| !raw.stated.contains(*k))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{}; a verification must state {} exactly (field = value)",
            shared_as(raw),
            missing.join(" and ")
        ));
    }
    Ok(())
}

/// Rewrites every count of a verified dataset to 1 (some record matches) or 0.
fn cap_verifications(
    plan: LogicalPlan,
    grants: &BTreeMap<String, Grant>,
) -> Result<LogicalPlan, String> {
    plan.transform_up(|node| {
        let verified = match &node {
            LogicalPlan::Aggregate(a) => {
                matches!(flow(&a.input, grants), Ok(Flow::Raw(r)) if r.grant.level == AccessLevel::Verify)
            }
            _ => false,
        };
        if !verified {
            return Ok(Transformed::no(node.recompute_schema()?));
        }
        let LogicalPlan::Aggregate(a) = &node else {
            unreachable!("checked above")
        };
        let groups = a.group_expr.len();
        let exprs: Vec<Expr> = node
            .schema()
            .iter()
            .enumerate()
            .map(|(i, (q, f))| {
                let c = Expr::Column(Column::new(q.cloned(), f.name()));
                if i < groups {
                    Ok(c)
                } else {
                    Ok(when(c.gt(lit(0i64)), lit(1i64))
                        .otherwise(lit(0i64))?
                        .alias_qualified(q.cloned(), f.name()))
                }
            })
            .collect::<datafusion::error::Result<_>>()?;
        let capped = LogicalPlanBuilder::from(node).project(exprs)?.build()?;
        Ok(Transformed::yes(capped))
    })
    .map(|t| t.data)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;
    use std::sync::Arc;

    fn grant(level: AccessLevel) -> BTreeMap<String, Grant> {
        let mut g = BTreeMap::new();
        g.insert(
            "t".to_string(),
            Grant {
                rule: 3,
                level,
                masks: BTreeMap::new(),
                dimensions: ["county", "sex"].iter().map(|s| s.to_string()).collect(),
                keys: ["id"].iter().map(|s| s.to_string()).collect(),
            },
        );
        g
    }

    async fn check(sql: &str, level: AccessLevel) -> Result<LogicalPlan, String> {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(
            ["id", "name", "county", "sex", "member"]
                .iter()
                .map(|n| Field::new(*n, DataType::Utf8, true))
                .chain([Field::new("age", DataType::Int64, true)])
                .collect::<Vec<_>>(),
        ));
        ctx.register_table(
            "t",
            Arc::new(MemTable::try_new(schema, vec![vec![]]).unwrap()),
        )
        .unwrap();
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        guard(plan, &grant(level))
    }

    const AGG: AccessLevel = AccessLevel::Aggregate { min_group: 5 };

    #[tokio::test]
    async fn aggregates_over_dimensions_pass_and_records_do_not() {
        for ok in [
            "SELECT county, count(*) FROM t GROUP BY county",
            "SELECT county, sex, sum(age), avg(age) FROM t WHERE sex = 'f' GROUP BY county, sex",
            "SELECT member, count(DISTINCT name) FROM t GROUP BY member",
            "SELECT county, sum(CAST(age AS DOUBLE) * 1.0), avg(age - 1) FROM t GROUP BY county",
            "SELECT min(county), count(*) FILTER (WHERE sex = 'm') FROM t",
            "SELECT DISTINCT county, sex FROM t",
            "SELECT x.county, x.n FROM (SELECT county, count(*) AS n FROM t GROUP BY county) x ORDER BY n DESC LIMIT 3",
        ] {
            assert!(
                check(ok, AGG).await.is_ok(),
                "{ok}: {:?}",
                check(ok, AGG).await
            );
        }
        for (bad, why) in [
            ("SELECT * FROM t", "returns its records"),
            ("SELECT age, count(*) FROM t GROUP BY age", "grouped only"),
            (
                "SELECT county, count(*) FROM t WHERE age > 30 GROUP BY county",
                "filtered only",
            ),
            ("SELECT max(age) FROM t", "one record's value"),
            ("SELECT max(age * 1) FROM t", "one record's value"),
            ("SELECT sum(age * age) FROM t", "not an expression"),
            (
                "SELECT sum(CASE WHEN id = 'x' THEN 1 ELSE 0 END) FROM t",
                "not an expression",
            ),
            ("SELECT count(*) FROM (SELECT * FROM t LIMIT 1)", "LIMIT"),
            (
                "SELECT count(*) FROM t a JOIN t b ON a.county = b.county",
                "joined",
            ),
            ("SELECT array_agg(county) FROM t", "not allowed"),
            (
                "SELECT count(*) FROM t WHERE county IN (SELECT county FROM t)",
                "subqueries",
            ),
            ("SELECT count(*) FILTER (WHERE id = 'x') FROM t", "FILTER"),
        ] {
            let e = check(bad, AGG).await.unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.contains("aggregate(k=5)") && e.contains("access[3]"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn verifications_state_keys_by_equality_and_are_capped() {
        let plan = check(
            "SELECT count(*) AS n FROM t WHERE id = 'x' AND name = 'y'",
            AccessLevel::Verify,
        )
        .await
        .unwrap();
        let text = plan.display_indent().to_string();
        assert!(text.contains("CASE WHEN"), "{text}");
        assert!(
            check(
                "SELECT member, count(*) FROM t WHERE id = 'x' GROUP BY member",
                AccessLevel::Verify
            )
            .await
            .is_ok()
        );
        for (bad, why) in [
            ("SELECT name FROM t WHERE id = 'x'", "returns its records"),
            ("SELECT count(*) FROM t WHERE name = 'y'", "must state id"),
            ("SELECT count(*) FROM t WHERE id LIKE 'x%'", "field = value"),
            (
                "SELECT count(*) FROM t WHERE id = 'x' OR id = 'y'",
                "field = value",
            ),
            ("SELECT count(*) FROM t WHERE id IS NULL", "field = value"),
            (
                "SELECT name, count(*) FROM t WHERE id = 'x' GROUP BY name",
                "only by member",
            ),
            ("SELECT count(name) FROM t WHERE id = 'x'", "only count(*)"),
            (
                "SELECT count(*) FROM t WHERE upper(id) = 'X'",
                "field = value",
            ),
        ] {
            let e = check(bad, AccessLevel::Verify).await.unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn rows_and_masked_grants_pass_untouched() {
        for level in [AccessLevel::Rows, AccessLevel::Masked] {
            let plan = check("SELECT * FROM t ORDER BY id LIMIT 3", level)
                .await
                .unwrap();
            assert!(!plan.display_indent().to_string().contains("CASE"));
        }
    }
}
