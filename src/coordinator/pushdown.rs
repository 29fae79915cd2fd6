//! Pushing work beyond projection and filters into member sub-queries.
//!
//! [`MemberPushdown`] is a DataFusion optimizer rule. It looks for a part of the
//! logical plan that reads one canonical dataset through nothing but projections,
//! filters and aliases, topped by an aggregate or by a sort with a limit, and cuts it
//! in two: the part each member can run alone, written back to SQL with DataFusion's
//! unparser and sent to every member, and the part that must see all members' rows,
//! kept at the coordinator.
//!
//! - `GROUP BY` that includes `member`: no group spans two members, so each member
//!   runs the whole aggregate (any function) and the coordinator only unions.
//! - Other aggregates: members compute partial aggregates (COUNT, SUM, MIN, MAX; AVG
//!   as a sum and a count), grouped by the query's keys plus the arguments of
//!   DISTINCT aggregates; the coordinator combines the partials (a sum of counts, a
//!   sum of sums, a min of mins, ...) and computes DISTINCT aggregates over the
//!   members' distinct values, which is exact.
//! - `ORDER BY ... LIMIT k`: each member returns its own top k; the coordinator
//!   takes the top k of those.
//!
//! Anything else (other aggregate functions, joins across datasets, subqueries)
//! stays at the coordinator over the members' filtered rows: correct first.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{
    Column, ParamValues, Result as DfResult, ScalarValue, internal_err, plan_err,
};
use datafusion::datasource::{TableProvider, TableType, provider_as_source, source_as_provider};
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::min_max::{max_udaf, min_udaf};
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, Projection, Sort, TableScan, cast, col, lit,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use datafusion::physical_plan::ExecutionPlan;

use super::table::FederatedTable;
use crate::config::MEMBER_COLUMN;

/// The optimizer rule. Planning without it (for comparisons) leaves the splitting out.
#[derive(Debug, Default)]
pub struct MemberPushdown;

impl OptimizerRule for MemberPushdown {
    fn name(&self) -> &str {
        "fedgate_member_pushdown"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> DfResult<Transformed<LogicalPlan>> {
        let rewritten = match &plan {
            LogicalPlan::Aggregate(agg) => push_aggregate(agg)?,
            LogicalPlan::Sort(sort) if sort.fetch.is_some() => push_top_k(sort)?,
            _ => None,
        };
        Ok(match rewritten {
            Some(p) => Transformed::yes(p),
            None => Transformed::no(plan),
        })
    }
}

/// The federated scan under `plan` when `plan` is only projections, filters and
/// aliases over it, with no subqueries.
fn single_dataset(plan: &LogicalPlan) -> Option<(&TableScan, Arc<FederatedTable>)> {
    let exprs_ok = |exprs: &[Expr]| exprs.iter().all(|e| !has_subquery(e));
    match plan {
        LogicalPlan::Projection(p) if exprs_ok(&p.expr) => single_dataset(&p.input),
        LogicalPlan::Filter(f) if !has_subquery(&f.predicate) => single_dataset(&f.input),
        LogicalPlan::SubqueryAlias(a) => single_dataset(&a.input),
        LogicalPlan::TableScan(scan) if scan.fetch.is_none() && exprs_ok(&scan.filters) => {
            let provider = source_as_provider(&scan.source).ok()?;
            let any: Arc<dyn std::any::Any + Send + Sync> = provider;
            let table = any.downcast::<FederatedTable>().ok()?;
            Some((scan, table))
        }
        _ => None,
    }
}

fn has_subquery(e: &Expr) -> bool {
    let mut found = false;
    let _ = e.apply(|n| {
        if matches!(
            n,
            Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::OuterReferenceColumn(..)
        ) {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// True when `e` is the dataset's own `member` column, passed through unchanged.
fn is_member_column(e: &Expr, input: &LogicalPlan) -> bool {
    let Expr::Column(c) = e else { return false };
    if c.name != MEMBER_COLUMN {
        return false;
    }
    // Every projection on the way down must pass `member` through as a column.
    let mut plan = input;
    loop {
        match plan {
            LogicalPlan::Projection(p) => {
                let passes = p.expr.iter().any(|x| match x {
                    Expr::Column(inner) => inner.name == MEMBER_COLUMN,
                    _ => false,
                });
                if !passes {
                    return false;
                }
                plan = &p.input;
            }
            LogicalPlan::Filter(f) => plan = &f.input,
            LogicalPlan::SubqueryAlias(a) => plan = &a.input,
            LogicalPlan::TableScan(_) => return true,
            _ => return false,
        }
    }
}

/// The part of a plan each member runs, written as SQL.
#[derive(Debug, Clone)]
struct MemberSide {
    /// The plan the SQL is written from. In a plan optimized from a shape it holds
    /// the shape's placeholders; [`bind`] binds the values into it and
    /// [`write_member_sql`] writes the SQL again from it.
    plan: LogicalPlan,
    /// Whether the SQL names its columns `c0, c1, ...` itself.
    alias: bool,
    sql: String,
    /// The schema of the member's answer, columns named `c0, c1, ...` by position.
    schema: SchemaRef,
}

/// The member-side plan as SQL, and the schema of its answer with columns named
/// `c0, c1, ...` by position. With `alias`, the SQL itself names its columns so (an
/// aggregate's output names are long expressions); without it, the plan is written as
/// is (a sort must stay outermost so that its LIMIT stays in the same query).
fn member_sql(plan: LogicalPlan, alias: bool) -> DfResult<MemberSide> {
    let fields = plan.schema().fields().clone();
    let written = if alias {
        let exprs: Vec<Expr> = (0..fields.len())
            .map(|i| {
                let (q, f) = plan.schema().qualified_field(i);
                Expr::Column(Column::new(q.cloned(), f.name())).alias(format!("c{i}"))
            })
            .collect();
        LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan.clone()))?)
    } else {
        plan.clone()
    };
    let sql = super::unparse::unparser()
        .plan_to_sql(&written)?
        .to_string();
    let schema = Arc::new(Schema::new(
        fields
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    Ok(MemberSide {
        plan,
        alias,
        sql,
        schema,
    })
}

/// A scan of the pushed part, followed by a projection restoring the replaced
/// plan's column names and qualifiers (`like`), so the rest of the plan is unchanged.
fn pushed_scan(
    table: Arc<FederatedTable>,
    scan: &TableScan,
    side: MemberSide,
) -> DfResult<LogicalPlanBuilder> {
    let pruning: Vec<Expr> = scan.filters.clone();
    let provider = PushedTable {
        cache: table.dataset().cache,
        table,
        sql: Some(side.sql.clone()),
        schema: side.schema.clone(),
        pruning,
        whole: None,
        side: Some(side),
    };
    LogicalPlanBuilder::scan("pushed", provider_as_source(Arc::new(provider)), None)
}

fn restore_names(
    builder: LogicalPlanBuilder,
    like: &LogicalPlan,
    from: &[String],
) -> DfResult<LogicalPlan> {
    let exprs = from
        .iter()
        .map(|name| col(Column::new_unqualified(name)))
        .collect();
    restore_exprs(builder, like, exprs)
}

/// A projection computing `exprs`, each under the name and qualifier of the column
/// of `like` at its position.
fn restore_exprs(
    builder: LogicalPlanBuilder,
    like: &LogicalPlan,
    exprs: Vec<Expr>,
) -> DfResult<LogicalPlan> {
    let exprs: Vec<Expr> = exprs
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let (q, f) = like.schema().qualified_field(i);
            e.alias_qualified(q.cloned(), f.name())
        })
        .collect();
    builder.project(exprs)?.build()
}

fn push_top_k(sort: &Sort) -> DfResult<Option<LogicalPlan>> {
    let Some((scan, table)) = single_dataset(&sort.input) else {
        return Ok(None);
    };
    let member_plan = LogicalPlan::Sort(sort.clone());
    let Ok(side) = member_sql(member_plan, false) else {
        return Ok(None);
    };
    let names: Vec<String> = side
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let restored = restore_names(pushed_scan(table, scan, side)?, &sort.input, &names)?;
    Ok(Some(
        LogicalPlanBuilder::from(restored)
            .sort_with_limit(sort.expr.clone(), sort.fetch)?
            .build()?,
    ))
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

fn agg(
    func: Arc<datafusion::logical_expr::AggregateUDF>,
    args: Vec<Expr>,
    filter: Option<Box<Expr>>,
) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        func,
        args,
        false,
        filter,
        vec![],
        None,
    ))
}

/// How the coordinator combines the partial columns of one aggregate.
enum Final {
    /// `coalesce(sum(p), 0)`: counts.
    SumOfCounts(usize),
    /// `sum(p)`.
    Sum(usize),
    /// `min(p)` / `max(p)`.
    Min(usize),
    Max(usize),
    /// `sum(s) / sum(c)` as a double: averages.
    Avg(usize, usize),
    /// The original DISTINCT aggregate over the distinct values in group column `k`.
    Distinct(AggregateFunction, usize),
}

fn push_aggregate(a: &Aggregate) -> DfResult<Option<LogicalPlan>> {
    let Some((scan, table)) = single_dataset(&a.input) else {
        return Ok(None);
    };
    if a.group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Ok(None);
    }
    let plan = LogicalPlan::Aggregate(a.clone());
    // Grouped by member: each member computes the whole aggregate.
    if a.group_expr.iter().any(|g| is_member_column(g, &a.input)) {
        let Ok(side) = member_sql(plan.clone(), true) else {
            return Ok(None);
        };
        let names: Vec<String> = side
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        return Ok(Some(restore_names(
            pushed_scan(table, scan, side)?,
            &plan,
            &names,
        )?));
    }

    // Partial aggregates at the members, grouped by the query's keys plus the
    // arguments of DISTINCT aggregates.
    let mut groups = a.group_expr.clone();
    let mut partials: Vec<Expr> = Vec::new();
    let mut finals = Vec::new();
    for e in &a.aggr_expr {
        let Expr::AggregateFunction(f) = unalias(e) else {
            return Ok(None);
        };
        let p = &f.params;
        if !p.order_by.is_empty() || p.null_treatment.is_some() {
            return Ok(None);
        }
        if p.distinct {
            if p.args.len() != 1 || p.filter.is_some() {
                return Ok(None);
            }
            let k = match groups.iter().position(|g| g == &p.args[0]) {
                Some(k) => k,
                None => {
                    groups.push(p.args[0].clone());
                    groups.len() - 1
                }
            };
            finals.push(Final::Distinct(f.clone(), k));
            continue;
        }
        let arg = |i: usize| p.args.get(i).cloned();
        let filter = p.filter.clone();
        // The member plans its aggregate before applying our aliases, and DataFusion
        // names an aggregate without its casts: `sum(x)` and `sum(CAST(x AS DOUBLE))`
        // would clash there. AVG's partials are therefore written over `x * 1.0`,
        // which is x as a double exactly (multiplying by 1.0 does not round) and
        // null where x is, under names of their own.
        let mut partial = |e: Expr| {
            partials.push(e);
            partials.len() - 1
        };
        match f.func.name() {
            "count" => finals.push(Final::SumOfCounts(partial(unalias(e).clone()))),
            "sum" => finals.push(Final::Sum(partial(unalias(e).clone()))),
            "min" => finals.push(Final::Min(partial(unalias(e).clone()))),
            "max" => finals.push(Final::Max(partial(unalias(e).clone()))),
            "avg" if p.args.len() == 1 => {
                let x = arg(0).unwrap_or_else(|| lit(ScalarValue::Null));
                let x = cast(x, DataType::Float64) * lit(1.0f64);
                let s = partial(agg(sum_udaf(), vec![x.clone()], filter.clone()));
                let c = partial(agg(count_udaf(), vec![x], filter));
                finals.push(Final::Avg(s, c));
            }
            _ => return Ok(None),
        }
    }
    // Partial columns need unique names for the member's aggregate.
    let partials: Vec<Expr> = partials
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.alias(format!("p{i}")))
        .collect();
    let member_agg = match Aggregate::try_new(a.input.clone(), groups.clone(), partials) {
        Ok(m) => LogicalPlan::Aggregate(m),
        Err(_) => return Ok(None),
    };
    let Ok(side) = member_sql(member_agg, true) else {
        return Ok(None);
    };
    let g = groups.len();
    let c = |i: usize| col(Column::new_unqualified(format!("c{i}")));
    // The coordinator's aggregate holds only aggregate functions (named `a0, a1,
    // ...`); what combines them (the COALESCE of a sum of counts, the division of an
    // average) is a projection above it. Built this way the plan is valid as soon as
    // this rule returns, so no later optimizer pass has to repair it.
    let mut final_aggs: Vec<Expr> = Vec::new();
    let mut final_agg = |e: Expr| {
        let name = format!("a{}", final_aggs.len());
        final_aggs.push(e.alias(name.clone()));
        col(Column::new_unqualified(name))
    };
    let combine: Vec<Expr> = finals
        .into_iter()
        .map(|f| match f {
            Final::SumOfCounts(i) => datafusion::functions::expr_fn::coalesce(vec![
                final_agg(agg(sum_udaf(), vec![c(g + i)], None)),
                lit(0i64),
            ]),
            Final::Sum(i) => final_agg(agg(sum_udaf(), vec![c(g + i)], None)),
            Final::Min(i) => final_agg(agg(min_udaf(), vec![c(g + i)], None)),
            Final::Max(i) => final_agg(agg(max_udaf(), vec![c(g + i)], None)),
            Final::Avg(s, n) => {
                let total = final_agg(agg(sum_udaf(), vec![c(g + s)], None));
                let count = cast(
                    final_agg(agg(sum_udaf(), vec![c(g + n)], None)),
                    DataType::Float64,
                );
                total / datafusion::functions::expr_fn::nullif(count, lit(0f64))
            }
            Final::Distinct(orig, k) => final_agg(Expr::AggregateFunction(
                AggregateFunction::new_udf(orig.func.clone(), vec![c(k)], true, None, vec![], None),
            )),
        })
        .collect();
    let final_groups: Vec<Expr> = (0..a.group_expr.len()).map(c).collect();
    let combined = pushed_scan(table, scan, side)?.aggregate(final_groups, final_aggs)?;
    let mut exprs: Vec<Expr> = (0..a.group_expr.len()).map(c).collect();
    exprs.extend(combine);
    Ok(Some(restore_exprs(combined, &plan, exprs)?))
}

/// Sends the whole query to one member when every dataset it reads is answered by
/// that member alone (after pruning by `member` and by the catalog): the member runs
/// joins, sorts and everything else itself, and only the final rows travel.
///
/// `plan` is the optimized plan and `written` the plan as written: the member plans
/// the SQL text, which may name datasets the optimizer proved irrelevant (`(x IN
/// (SELECT ...) AND m) OR m` is `m`). The answer does not depend on those, but the
/// member must serve them or it refuses the query, so the query goes whole only
/// when it does.
pub fn push_whole_query(
    state: &dyn Session,
    written: &LogicalPlan,
    plan: &LogicalPlan,
    sql: &str,
) -> DfResult<Option<LogicalPlan>> {
    let mut scans: Vec<(Arc<FederatedTable>, Vec<String>)> = Vec::new();
    let mut unsupported = false;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let provider = source_as_provider(&scan.source)?;
            let any: Arc<dyn std::any::Any + Send + Sync> = provider;
            match any.downcast::<FederatedTable>() {
                Ok(t) => {
                    let targets = t.targets(state, &scan.filters)?;
                    scans.push((t, targets));
                }
                Err(any) => match any.downcast::<PushedTable>() {
                    Ok(p) => {
                        let targets = p.table.targets(state, &p.pruning)?;
                        scans.push((p.table.clone(), targets));
                    }
                    Err(_) => unsupported = true,
                },
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let Some((first, targets)) = scans.first() else {
        return Ok(None);
    };
    if unsupported || targets.len() != 1 || scans.iter().any(|(_, t)| t != targets) {
        return Ok(None);
    }
    let member = targets[0].clone();
    let mut serves_every_named = true;
    written.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let any: Arc<dyn std::any::Any + Send + Sync> = source_as_provider(&scan.source)?;
            if let Ok(t) = any.downcast::<FederatedTable>()
                && !t.targets(state, &[])?.contains(&member)
            {
                serves_every_named = false;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if !serves_every_named {
        return Ok(None);
    }
    let mut datasets: Vec<String> = scans
        .iter()
        .map(|(t, _)| t.dataset().name.clone())
        .collect();
    datasets.sort();
    datasets.dedup();
    let schema = Arc::new(Schema::new(
        plan.schema()
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    // A whole query's answer may be reused only as long as every dataset it reads
    // allows.
    let cache = scans
        .iter()
        .map(|(t, _)| t.dataset().cache)
        .collect::<Option<Vec<_>>>()
        .and_then(|v| v.into_iter().reduce(|a, b| a.min(b)));
    let provider = PushedTable {
        table: first.clone(),
        sql: Some(sql.to_string()),
        schema,
        pruning: vec![],
        whole: Some((member, datasets.join("+"))),
        cache,
        side: None,
    };
    let scan = LogicalPlanBuilder::scan("pushed", provider_as_source(Arc::new(provider)), None)?;
    Ok(Some(restore_names(scan, plan, &names)?))
}

/// The physical plans of a shape's queries, kept so that a later query of the shape
/// whose plan differs from a kept one only in the text its member scans send runs the
/// kept plan with its own texts instead of being planned physically again.
///
/// A plan whose every scan is a pushed sub-query ([`PushedTable`]) or a canonical
/// dataset's own table ([`FederatedTable`], whose member SQL its projection, filters
/// and limit make) depends on the values its scans hold only through the texts its
/// member scans send and the members they ask: each member scan's other inputs (the
/// dataset, the answer's schema, the query's datasets when it is sent whole, how long
/// the answers may be reused, a dataset scan's projection and limit) are compared
/// here, and every node above the scans the logical plans' equality compares, values
/// included. Which members a scan asks depends on the query's values (a filter on
/// `member` prunes them), so the members each scan asks are the key: one plan per
/// member for queries sent whole ([`push_whole_query`]), and for split queries
/// (prepared statements among them, which are never sent whole) one plan per set of
/// members asked, at most [`MOST_SPLIT_PLANS`] of them. No kept plan holds the text
/// of the query it was made for (a text may be a megabyte; each query sends its own),
/// nor its scans' filters.
#[derive(Debug, Default)]
pub struct KeptPlans(std::sync::Mutex<std::collections::HashMap<String, KeptPlan>>);

/// The most split plans a shape keeps: one per set of members its scans ask, and a
/// shape whose values prune members in many ways plans the rarer ones physically.
pub const MOST_SPLIT_PLANS: usize = 4;

#[derive(Debug)]
struct KeptPlan {
    /// The logical plan it was planned from, without its scans' texts and filters.
    logical: LogicalPlan,
    /// The scans of `logical`, in the order [`kept_scans`] lists them (kept so that a
    /// query compares its scans without walking `logical` again).
    scans: Vec<KeptScan>,
    /// The physical plan, without its member scans' texts.
    physical: Arc<dyn ExecutionPlan>,
    /// For each member scan of `physical`, in the order [`with_member_sql`] visits
    /// them, the position of the scan of `logical` it was planned from, in the order
    /// [`kept_scans`] lists them.
    texts_from: Vec<usize>,
}

/// A scan of a plan that may be kept: a pushed sub-query, or a canonical dataset's own
/// table with what DataFusion hands its `scan`.
#[derive(Debug, Clone)]
enum KeptScan {
    Pushed(Arc<PushedTable>),
    Dataset {
        table: Arc<FederatedTable>,
        projection: Option<Vec<usize>>,
        filters: Vec<Expr>,
        fetch: Option<usize>,
    },
}

impl KeptScan {
    /// The SQL its member scan sends.
    fn text(&self) -> Option<String> {
        match self {
            KeptScan::Pushed(p) => p.sql.clone(),
            KeptScan::Dataset {
                table,
                projection,
                filters,
                fetch,
            } => table.scan_sql(projection.as_ref(), filters, *fetch).ok(),
        }
    }

    /// The members it asks (those its filters on `member` keep), as the key lists
    /// them; `None` for a query sent whole, which is kept under its member instead.
    fn targets(&self, state: &dyn Session) -> Option<String> {
        let targets = match self {
            KeptScan::Pushed(p) if p.whole.is_some() => return None,
            KeptScan::Pushed(p) => p.table.targets(state, &p.pruning),
            KeptScan::Dataset { table, filters, .. } => table.targets(state, filters),
        };
        targets.ok().map(|t| t.join("\u{1}"))
    }

    /// Whether two scans at the same place of equal plans (their filters left out)
    /// ask the same of the same members, but for the text they send. The members a
    /// split scan asks are computed from its filters, which hold its values, and
    /// compared in the key ([`kept_key`]) instead of the filters themselves.
    fn same_but_text(&self, other: &KeptScan) -> bool {
        match (self, other) {
            (KeptScan::Pushed(a), KeptScan::Pushed(b)) => {
                Arc::ptr_eq(&a.table, &b.table)
                    && a.schema == b.schema
                    && a.whole == b.whole
                    && a.cache == b.cache
                    && (a.whole.is_none() || a.pruning == b.pruning)
            }
            (
                KeptScan::Dataset {
                    table: a,
                    projection: pa,
                    fetch: fa,
                    ..
                },
                KeptScan::Dataset {
                    table: b,
                    projection: pb,
                    fetch: fb,
                    ..
                },
            ) => Arc::ptr_eq(a, b) && pa == pb && fa == fb,
            _ => false,
        }
    }
}

impl KeptPlans {
    /// The kept physical plan of a query like `plan` (a logical plan ready to be
    /// planned physically), sending `plan`'s own texts; `None` when none is kept for
    /// the members its scans ask or the kept one differs from `plan` in more than
    /// its texts.
    pub fn reuse(&self, state: &dyn Session, plan: &LogicalPlan) -> Option<Arc<dyn ExecutionPlan>> {
        let scans = kept_scans(plan)?;
        let key = kept_key(state, &scans)?;
        let texts: Vec<String> = scans.iter().map(KeptScan::text).collect::<Option<_>>()?;
        // A dataset scan's filters hold the query's values: the plans are compared
        // without them (its texts and the key carry what they decide).
        let filtered = scans
            .iter()
            .any(|s| matches!(s, KeptScan::Dataset { filters, .. } if !filters.is_empty()));
        let without;
        let plan = if filtered {
            without = without_text(plan)?;
            &without
        } else {
            plan
        };
        let (physical, texts_from) = {
            let kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let kept = kept.get(&key)?;
            let same = kept.scans.len() == scans.len()
                && kept.logical == *plan
                && kept
                    .scans
                    .iter()
                    .zip(&scans)
                    .all(|(k, s)| k.same_but_text(s));
            same.then(|| (kept.physical.clone(), kept.texts_from.clone()))?
        };
        with_member_sql(physical, |i, _| texts.get(*texts_from.get(i)?).cloned())
    }

    /// Keeps `physical`, planned from `plan`, for the members `plan`'s scans ask,
    /// unless a plan is kept for them already (or the shape keeps as many split plans
    /// as it may, or a member scan cannot be told from another by its text, or `plan`
    /// holds more than [`crate::owner::session::MOST_KEPT_CONSTANT_BYTES`] of
    /// constants above its scans).
    pub fn keep(&self, state: &dyn Session, plan: &LogicalPlan, physical: &Arc<dyn ExecutionPlan>) {
        let Some(scans) = kept_scans(plan) else {
            return;
        };
        let Some(key) = kept_key(state, &scans) else {
            return;
        };
        let full = |kept: &std::collections::HashMap<String, KeptPlan>| {
            kept.contains_key(&key)
                || (!key.starts_with(WHOLE_KEY)
                    && kept.keys().filter(|k| !k.starts_with(WHOLE_KEY)).count()
                        >= MOST_SPLIT_PLANS)
        };
        if full(&self.0.lock().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let Some(texts) = scans.iter().map(KeptScan::text).collect::<Option<Vec<_>>>() else {
            return;
        };
        // Each member scan was planned from the scan with its text, which must be the
        // only one with it: the kept plan's scans are told apart by position.
        let mut texts_from = Vec::new();
        let Some(physical) = with_member_sql(physical.clone(), |_, scan| {
            let mut with = (0..texts.len()).filter(|&i| texts[i] == scan.member_sql());
            let (Some(from), None) = (with.next(), with.next()) else {
                return None;
            };
            texts_from.push(from);
            Some(String::new())
        }) else {
            return;
        };
        let Some(logical) = without_text(plan) else {
            return;
        };
        // A kept plan holds the values of its query that stay at the coordinator (a
        // `HAVING` over a final aggregate, say), which the shape cache's charge does
        // not count.
        if crate::owner::session::constant_bytes(&logical)
            > crate::owner::session::MOST_KEPT_CONSTANT_BYTES
        {
            return;
        }
        // The kept plan must list the scans the query lists (a filter holding a
        // subquery, were one ever pushed into a scan, would lose its scans with the
        // filters): a plan that no later query could match takes no place.
        let Some(kept_scans) = kept_scans(&logical).filter(|k| k.len() == scans.len()) else {
            return;
        };
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !full(&kept) {
            kept.insert(
                key,
                KeptPlan {
                    logical,
                    scans: kept_scans,
                    physical,
                    texts_from,
                },
            );
        }
    }
}

/// How the key of a plan sent whole begins.
const WHOLE_KEY: &str = "whole\u{0}";

/// What a kept plan is kept under: the member a whole query goes to, or the members
/// each scan of a split one asks, in the order of its scans.
fn kept_key(state: &dyn Session, scans: &[KeptScan]) -> Option<String> {
    if let [KeptScan::Pushed(one)] = scans
        && let Some((member, _)) = &one.whole
    {
        return Some(format!("{WHOLE_KEY}{member}"));
    }
    let mut key = String::from("split");
    for scan in scans {
        key.push('\u{0}');
        key.push_str(&scan.targets(state)?);
    }
    Some(key)
}

/// A plan with the text its scans send left out (equal to the plan as
/// [`LogicalPlan`]'s equality compares, which leaves out scan sources), and with what
/// holds the query's values in its scans: the pruning filters of split pushed scans
/// and the filters of dataset scans. The members a split scan asks are compared in
/// the key ([`kept_key`]), and the rest of what its filters decide is in its text.
fn without_text(plan: &LogicalPlan) -> Option<LogicalPlan> {
    plan.clone()
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(mut scan) = node else {
                return Ok(Transformed::no(node));
            };
            let any: Arc<dyn std::any::Any + Send + Sync> = source_as_provider(&scan.source)?;
            let pushed = match any.downcast::<PushedTable>() {
                Ok(pushed) => pushed,
                Err(any) if any.is::<FederatedTable>() => {
                    scan.filters = vec![];
                    return Ok(Transformed::yes(LogicalPlan::TableScan(scan)));
                }
                Err(_) => return plan_err!("a kept plan scans only datasets and what it pushed"),
            };
            let textless = PushedTable {
                table: pushed.table.clone(),
                sql: Some(String::new()),
                schema: pushed.schema.clone(),
                pruning: match pushed.whole {
                    Some(_) => pushed.pruning.clone(),
                    None => vec![],
                },
                whole: pushed.whole.clone(),
                cache: pushed.cache,
                side: None,
            };
            scan.source = provider_as_source(Arc::new(textless));
            Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
        })
        .ok()
        .map(|t| t.data)
}

/// Every scan of `plan`, in the order it is visited; `None` unless every scan is a
/// pushed sub-query or a canonical dataset and there is one at least.
fn kept_scans(plan: &LogicalPlan) -> Option<Vec<KeptScan>> {
    let mut scans = Vec::new();
    let mut other = false;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let any: Arc<dyn std::any::Any + Send + Sync> = source_as_provider(&scan.source)?;
            match any.downcast::<PushedTable>() {
                Ok(pushed) => scans.push(KeptScan::Pushed(pushed)),
                Err(any) => match any.downcast::<FederatedTable>() {
                    Ok(table) => scans.push(KeptScan::Dataset {
                        table,
                        projection: scan.projection.clone(),
                        filters: scan.filters.clone(),
                        fetch: scan.fetch,
                    }),
                    Err(_) => {
                        other = true;
                        return Ok(TreeNodeRecursion::Stop);
                    }
                },
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .ok()?;
    (!other && !scans.is_empty()).then_some(scans)
}

/// `physical` with each member scan's text replaced by `text` of the scan's position
/// (in the order visited) and the scan; `None` if `text` gives none for a scan, or
/// there is no member scan.
fn with_member_sql(
    physical: Arc<dyn ExecutionPlan>,
    mut text: impl FnMut(usize, &super::table::FederatedScanExec) -> Option<String>,
) -> Option<Arc<dyn ExecutionPlan>> {
    let mut scans = 0;
    let swapped = physical
        .transform_up(|node| {
            let any: &dyn std::any::Any = node.as_ref();
            match any.downcast_ref::<super::table::FederatedScanExec>() {
                Some(scan) => {
                    let Some(sql) = text(scans, scan) else {
                        return internal_err!("no text for member scan {scans}");
                    };
                    scans += 1;
                    let swapped: Arc<dyn ExecutionPlan> = Arc::new(scan.with_sql(sql));
                    Ok(Transformed::yes(swapped))
                }
                None => Ok(Transformed::no(node)),
            }
        })
        .ok()?
        .data;
    (scans > 0).then_some(swapped)
}

/// A member sub-query decided by the planner: the same SQL at every member serving
/// the dataset (or, for a whole query, at one member), with a fixed answer schema.
#[derive(Debug)]
pub struct PushedTable {
    table: Arc<FederatedTable>,
    /// `None` between [`bind`] and [`write_member_sql`].
    sql: Option<String>,
    schema: SchemaRef,
    /// Filters of the original scan, used to prune members by `member`.
    pruning: Vec<Expr>,
    /// For a whole query: the one member and the datasets it reads.
    whole: Option<(String, String)>,
    /// How long the members' answers may be reused.
    cache: Option<super::results::CachePolicy>,
    /// What `sql` was written from (a whole query is sent as its text: none).
    side: Option<MemberSide>,
}

impl PushedTable {
    /// This scan with `values` bound into its member-side plan and its pruning
    /// filters. Its member SQL is written by [`write_member_sql`], only once the plan
    /// is known not to be sent whole: a lookup's plan usually is, and its sub-query's
    /// SQL would be written for nothing.
    fn bind(&self, values: &ParamValues) -> DfResult<PushedTable> {
        let Some(side) = &self.side else {
            return plan_err!("a whole query's scan has no plan to bind values into");
        };
        // A value missing for a placeholder fails the binding; each value is exactly
        // its placeholder's type, so the answer's schema is the one planned.
        let bound = MemberSide {
            plan: side.plan.clone().with_param_values(values.clone())?,
            sql: String::new(),
            ..side.clone()
        };
        Ok(PushedTable {
            table: self.table.clone(),
            sql: None,
            schema: self.schema.clone(),
            pruning: self
                .pruning
                .iter()
                .map(|e| bind_expr(e.clone(), values))
                .collect::<DfResult<_>>()?,
            whole: None,
            cache: self.cache,
            side: Some(bound),
        })
    }

    /// This scan with its member SQL written from its bound member-side plan, when
    /// [`bind`] left it unwritten.
    fn written(&self) -> DfResult<Option<PushedTable>> {
        if self.sql.is_some() {
            return Ok(None);
        }
        let Some(side) = &self.side else {
            return plan_err!("a bound scan without its member-side plan");
        };
        let side = member_sql(side.plan.clone(), side.alias)?;
        Ok(Some(PushedTable {
            table: self.table.clone(),
            sql: Some(side.sql.clone()),
            schema: self.schema.clone(),
            pruning: self.pruning.clone(),
            whole: None,
            cache: self.cache,
            side: Some(side),
        }))
    }
}

/// `e` with every placeholder replaced by its value.
fn bind_expr(e: Expr, values: &ParamValues) -> DfResult<Expr> {
    e.transform_up(|e| match e {
        Expr::Placeholder(p) => {
            let (value, metadata) = values.get_placeholders_with_values(&p.id)?.into_inner();
            Ok(Transformed::yes(Expr::Literal(value, metadata)))
        }
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// A plan optimized with placeholders in place (a shape's, [`crate::owner::shape`])
/// with `values` bound wherever the placeholders went: the plan's own expressions
/// (filters offered to scans included) and the member-side plans and pruning filters
/// of the scans this rule pushed. Their member SQL is written again from their bound
/// plans by [`write_member_sql`], which must run before the plan is planned
/// physically unless the plan is replaced by a whole query. Fails when a placeholder
/// has no value.
pub fn bind(plan: LogicalPlan, values: &ParamValues) -> DfResult<LogicalPlan> {
    plan.with_param_values(values.clone())?
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(mut scan) = node else {
                return Ok(Transformed::no(node));
            };
            let any: Arc<dyn std::any::Any + Send + Sync> = source_as_provider(&scan.source)?;
            match any.downcast::<PushedTable>() {
                Ok(pushed) => {
                    scan.source = provider_as_source(Arc::new(pushed.bind(values)?));
                    Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                }
                Err(_) => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
            }
        })
        .map(|t| t.data)
}

/// `plan` (bound by [`bind`]) with the member SQL of every pushed scan written from
/// its bound member-side plan.
pub fn write_member_sql(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::TableScan(mut scan) = node else {
            return Ok(Transformed::no(node));
        };
        let any: Arc<dyn std::any::Any + Send + Sync> = source_as_provider(&scan.source)?;
        match any.downcast::<PushedTable>().map(|p| p.written()) {
            Ok(Ok(Some(written))) => {
                scan.source = provider_as_source(Arc::new(written));
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) | Err(_) => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
        }
    })
    .map(|t| t.data)
}

#[async_trait]
impl TableProvider for PushedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let Some(sql) = &self.sql else {
            return internal_err!("a pushed scan planned before its member SQL was written");
        };
        self.table.member_exec_for(
            state,
            &self.pruning,
            schema,
            sql.clone(),
            projection.cloned(),
            self.whole.as_ref().map(|(m, l)| (m.as_str(), l.as_str())),
            self.cache,
        )
    }
}
