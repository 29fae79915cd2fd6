//! `aggregate` and `verify` grants by construction, at the data owner.
//!
//! Under such a grant the caller's expressions never run over records. The dataset's
//! name resolves, in the context the caller's query is planned in, to a [`Withheld`]
//! table: it has the dataset's columns, so the query plans, but it holds no records
//! and any attempt to read it fails. [`rewrite`] then replaces every read of it with
//! a plan the owner wrote itself, and translates the caller's expressions onto that
//! plan's output:
//!
//! - **aggregate(k).** The owner's plan is the dataset's *cells*: one row per
//!   combination of the rule's dimension values (and `member`) that holds at least k
//!   records, with the number of records and, for every numeric field, its sum and
//!   the number of its non-null values. The caller's filters and groupings must be
//!   expressions of dimensions; its aggregates are rewritten onto the cells
//!   (`count(*)` is the sum of the counts, `sum(x)` the sum of the sums, `avg(x)`
//!   their ratio; `min`, `max` and `DISTINCT` aggregates of dimensions are the same
//!   over cells as over records). What cannot be said over cells is refused with a
//!   message that says what can. Every released number is a function of whole cells
//!   of at least k records, so the difference of two answers is again a sum over
//!   whole cells: zero or at least k records.
//! - **verify.** The owner takes the caller's equalities `field = constant` (the field
//!   as it is, the constant of the field's exact type: no casts of a field, no
//!   functions), checks that they state the rule's keys, and runs its own existence
//!   check: a count of the matching records, grouped by `member` if the caller asked,
//!   turned into 1 or 0. Only the constants the caller wrote reach the owner's plan.
//!
//! Whatever the translation gets wrong, it cannot release records: the only plans
//! that read them are the owner's, and a read of a [`Withheld`] table that was not
//! replaced fails when the plan is executed (and is refused before that, by the final
//! check in [`rewrite`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::datasource::{TableProvider, TableType, source_as_provider};
use datafusion::functions::expr_fn::{coalesce, nullif};
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Cast, Distinct, Expr, ExprSchemable, Filter, LogicalPlan, Operator,
    Projection, TryCast, cast, col, lit, when,
};
use datafusion::physical_plan::ExecutionPlan;

use crate::config::MEMBER_COLUMN;
use crate::owner::policy::{AccessLevel, Grant};

/// The alias of the owner's plan of cells.
const CELLS: &str = "__fedgate_cells";
/// The alias of the owner's record view in an existence check.
const RECORDS: &str = "__fedgate_records";
/// The cells' column with the number of records in each cell.
pub const CELL_COUNT: &str = "__fedgate_n";

/// A dataset under an `aggregate` or `verify` grant, as the caller's query sees it:
/// its columns, and no records.
#[derive(Debug)]
pub struct Withheld {
    dataset: String,
    schema: SchemaRef,
}

impl Withheld {
    /// The table standing for `dataset`, with the schema of its canonical view.
    pub fn new(dataset: &str, schema: SchemaRef) -> Withheld {
        Withheld {
            dataset: dataset.to_string(),
            schema,
        }
    }
}

#[async_trait]
impl TableProvider for Withheld {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        datafusion::common::plan_err!(
            "the records of dataset {} are not readable under this caller's grant",
            self.dataset
        )
    }
}

/// The owner's own plan for a dataset under a restricted grant.
#[derive(Debug, Clone)]
pub enum Owned {
    /// `aggregate`: the cells (see the module comment).
    Cells {
        /// The plan of the cells: dimensions, `member`, [`CELL_COUNT`] and the
        /// measures' sums and counts.
        plan: LogicalPlan,
        /// Per numeric field: the cells' columns of its sum and of its count.
        measures: BTreeMap<String, (String, String)>,
    },
    /// `verify`: the dataset's records as the grant shows them (masks applied).
    Records {
        /// The plan of the records.
        plan: LogicalPlan,
    },
}

/// A restricted dataset: the grant, the dataset's field types and the owner's plan.
#[derive(Debug, Clone)]
pub struct Restricted {
    /// The grant deciding it.
    pub grant: Grant,
    /// The canonical fields and `member`, with their types.
    pub fields: Vec<(String, DataType)>,
    /// The owner's plan.
    pub owned: Owned,
}

/// The SQL of a dataset's cells over `records` (the SQL of its record view under
/// the grant), and the cells' columns per numeric field.
pub fn cells_sql(
    records: &str,
    fields: &[(String, DataType)],
    grant: &Grant,
    min_group: u64,
) -> (String, BTreeMap<String, (String, String)>) {
    use crate::config::quote_ident;
    let mut groups: Vec<String> = grant.dimensions.iter().map(|d| quote_ident(d)).collect();
    groups.push(quote_ident(MEMBER_COLUMN));
    let mut select = groups.clone();
    // Counts are written as sums of ones: a member whose dataset spans several
    // databases splits an aggregate into partial ones whose combined count is
    // nullable, and the plan above must agree with that.
    select.push(format!("sum(1) AS {}", quote_ident(CELL_COUNT)));
    let mut measures = BTreeMap::new();
    for (i, (name, t)) in fields.iter().enumerate() {
        if !matches!(t, DataType::Int64 | DataType::Float64) || grant.dimensions.contains(name) {
            continue;
        }
        let (s, c) = (format!("__fedgate_sum_{i}"), format!("__fedgate_count_{i}"));
        select.push(format!("sum({}) AS {}", quote_ident(name), quote_ident(&s)));
        select.push(format!(
            "sum(CASE WHEN {} IS NULL THEN 0 ELSE 1 END) AS {}",
            quote_ident(name),
            quote_ident(&c)
        ));
        measures.insert(name.clone(), (s, c));
    }
    // The threshold filters the grouped rows by their alias (a HAVING would name the
    // aggregate, which the SQL written for a database cannot refer to).
    let sql = format!(
        "SELECT * FROM (SELECT {} FROM ({records}) AS r GROUP BY {}) AS c WHERE {} >= {min_group}",
        select.join(", "),
        groups.join(", "),
        quote_ident(CELL_COUNT)
    );
    (sql, measures)
}

/// What a column of the caller's plan holds, over cells.
#[derive(Debug, Clone)]
enum Val {
    /// The same for every record of a cell: this expression over the cells' columns.
    Dim(Expr),
    /// A linear function of one numeric field: per cell, the sum of its values and
    /// the number of its non-null values.
    Lin { sum: Expr, count: Expr },
    /// A record-level value that cannot be said over cells (what it is, for
    /// messages).
    Record,
}

/// What a column of the caller's plan holds, under `verify`.
#[derive(Debug, Clone)]
enum Key {
    /// A field of the dataset, as it is.
    Field(String),
    /// Anything else.
    Other,
}

/// The caller's plan, from a read of a restricted dataset up to the node being
/// translated.
enum Rec<'r> {
    Cells {
        dataset: String,
        r: &'r Restricted,
        /// The cells with the caller's filters applied so far.
        plan: LogicalPlan,
        cols: Vec<Val>,
    },
    Verify {
        dataset: String,
        r: &'r Restricted,
        cols: Vec<Key>,
        /// The equalities stated so far.
        stated: Vec<(String, ScalarValue)>,
    },
}

impl Rec<'_> {
    fn shared_as(&self) -> String {
        let (d, r) = match self {
            Rec::Cells { dataset, r, .. } | Rec::Verify { dataset, r, .. } => (dataset, r),
        };
        format!(
            "dataset {d} is shared with this caller as {} only ({})",
            r.grant.level,
            r.grant.rule_name()
        )
    }

    fn dims(&self) -> String {
        let r = match self {
            Rec::Cells { r, .. } | Rec::Verify { r, .. } => r,
        };
        let mut d: Vec<&str> = r.grant.dimensions.iter().map(String::as_str).collect();
        d.push(MEMBER_COLUMN);
        d.join(", ")
    }
}

enum Out<'r> {
    /// A plan that reads no records of a restricted dataset.
    Plan(LogicalPlan),
    /// Records of a restricted dataset still flow here.
    Rec(Rec<'r>),
}

/// Rewrites a caller's plan so that every read of a restricted dataset is the owner's
/// plan (cells, or an existence check) and the caller's expressions run only over its
/// output. The error explains to the caller what it may ask instead.
pub fn rewrite(
    plan: LogicalPlan,
    restricted: &BTreeMap<String, Restricted>,
) -> Result<LogicalPlan, String> {
    if restricted.is_empty() {
        return Ok(plan);
    }
    refuse_subqueries(&plan, restricted)?;
    let out = match translate(&plan, restricted)? {
        Out::Plan(p) => p,
        Out::Rec(rec) => {
            return Err(match &rec {
                Rec::Verify { dataset, r, .. } => format!(
                    "{}; this query returns its records: ask only whether a record exists, \
                     e.g. SELECT count(*) FROM {dataset} WHERE {} = '...'",
                    rec.shared_as(),
                    r.grant
                        .keys
                        .iter()
                        .next()
                        .map(String::as_str)
                        .unwrap_or("key")
                ),
                Rec::Cells { .. } => format!(
                    "{}; this query returns its records: ask for aggregates (count, sum, avg) \
                     grouped by its dimensions ({})",
                    rec.shared_as(),
                    rec.dims()
                ),
            });
        }
    };
    // The construction's own check: no read of a withheld table is left.
    if let Some(d) = withheld_read(&out) {
        return Err(format!(
            "dataset {d} is shared with this caller as aggregates or verifications only, \
             and this query reads it in a way that cannot be answered so"
        ));
    }
    Ok(out)
}

/// The dataset of a withheld table the plan still reads, if any.
fn withheld_read(plan: &LogicalPlan) -> Option<String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|p| {
        if let Some(w) = withheld(p) {
            found = Some(w.dataset.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn withheld(p: &LogicalPlan) -> Option<Arc<Withheld>> {
    let LogicalPlan::TableScan(scan) = p else {
        return None;
    };
    let provider = source_as_provider(&scan.source).ok()?;
    let any: Arc<dyn std::any::Any + Send + Sync> = provider;
    any.downcast::<Withheld>().ok()
}

/// Subqueries are not translated: a query over a restricted dataset may not use them.
fn refuse_subqueries(
    plan: &LogicalPlan,
    restricted: &BTreeMap<String, Restricted>,
) -> Result<(), String> {
    let mut touches = None;
    let mut subquery = false;
    plan.apply_with_subqueries(|p| {
        if let Some(w) = withheld(p)
            && let Some(r) = restricted.get(&w.dataset)
        {
            touches = Some((w.dataset.clone(), r.grant.level, r.grant.rule_name()));
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

fn translate<'r>(
    plan: &LogicalPlan,
    restricted: &'r BTreeMap<String, Restricted>,
) -> Result<Out<'r>, String> {
    if let Some(w) = withheld(plan) {
        let r = restricted.get(&w.dataset).ok_or_else(|| {
            format!(
                "dataset {} is withheld without a grant (internal error)",
                w.dataset
            )
        })?;
        return Ok(Out::Rec(start(plan, &w.dataset, r)?));
    }
    let inputs = plan.inputs();
    let mut outs = Vec::with_capacity(inputs.len());
    for i in &inputs {
        outs.push(translate(i, restricted)?);
    }
    if outs.iter().all(|o| matches!(o, Out::Plan(_))) {
        let new_inputs: Vec<LogicalPlan> = outs
            .into_iter()
            .map(|o| match o {
                Out::Plan(p) => p,
                Out::Rec(_) => unreachable!("all plans"),
            })
            .collect();
        if new_inputs.is_empty() {
            return Ok(Out::Plan(plan.clone()));
        }
        let rebuilt = plan
            .with_new_exprs(plan.expressions(), new_inputs)
            .map_err(|e| e.to_string())?;
        return Ok(Out::Plan(rebuilt));
    }
    if outs.len() > 1 {
        let rec = outs
            .into_iter()
            .find_map(|o| match o {
                Out::Rec(r) => Some(r),
                Out::Plan(_) => None,
            })
            .expect("one input is record-level");
        return Err(format!(
            "{}; its records cannot be joined or combined with other rows (aggregate first)",
            rec.shared_as()
        ));
    }
    let Some(Out::Rec(rec)) = outs.pop() else {
        unreachable!("one record-level input")
    };
    let input_schema = inputs[0].schema();
    match rec {
        Rec::Cells { .. } => cells_node(plan, input_schema, rec),
        Rec::Verify { .. } => verify_node(plan, input_schema, rec),
    }
}

/// The record-level state at a read of a restricted dataset.
fn start<'r>(scan: &LogicalPlan, dataset: &str, r: &'r Restricted) -> Result<Rec<'r>, String> {
    let LogicalPlan::TableScan(s) = scan else {
        unreachable!("withheld tables are table scans")
    };
    if !s.filters.is_empty() || s.fetch.is_some() {
        return Err(format!("dataset {dataset}: unexpected scan options"));
    }
    let names: Vec<String> = scan
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    match (&r.grant.level, &r.owned) {
        (AccessLevel::Aggregate { .. }, Owned::Cells { plan, measures }) => {
            let cell = |c: &str| col(Column::new(Some(CELLS), c));
            let cols = names
                .iter()
                .map(|n| {
                    if n == MEMBER_COLUMN || r.grant.dimensions.contains(n) {
                        Val::Dim(cell(n))
                    } else if let Some((s, c)) = measures.get(n) {
                        Val::Lin {
                            sum: cell(s),
                            count: cell(c),
                        }
                    } else {
                        Val::Record
                    }
                })
                .collect();
            let plan = datafusion::logical_expr::LogicalPlanBuilder::from(plan.clone())
                .alias(CELLS)
                .and_then(|b| b.build())
                .map_err(|e| e.to_string())?;
            Ok(Rec::Cells {
                dataset: dataset.to_string(),
                r,
                plan,
                cols,
            })
        }
        (AccessLevel::Verify, Owned::Records { .. }) => Ok(Rec::Verify {
            dataset: dataset.to_string(),
            r,
            cols: names.into_iter().map(Key::Field).collect(),
            stated: Vec::new(),
        }),
        (level, _) => Err(format!(
            "dataset {dataset}: no owner's plan for level {level} (internal error)"
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

/// An expression over the cells' columns computing `e` (over the caller's
/// record-level input), when every column it reads is constant within a cell.
fn dim_expr(e: &Expr, schema: &DFSchema, cols: &[Val]) -> Option<Expr> {
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
fn number(e: &Expr) -> Option<ScalarValue> {
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
fn lin_expr(e: &Expr, schema: &DFSchema, cols: &[Val]) -> Option<(Expr, Expr)> {
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

fn cells_node<'r>(plan: &LogicalPlan, schema: &DFSchema, rec: Rec<'r>) -> Result<Out<'r>, String> {
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
enum Combine {
    /// A count: the sum of per-cell counts, 0 over no cells.
    Count(usize),
    /// The aggregate over cells as it is.
    Plain(usize),
    /// A mean: a sum over a count.
    Mean(usize, usize),
}

fn agg(
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

fn cells_aggregate(a: &Aggregate, schema: &DFSchema, rec: &Rec) -> Result<LogicalPlan, String> {
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

fn not_over_cells(rec: &Rec, e: &Expr) -> String {
    format!(
        "{}; {e} cannot be computed from its cells: aggregate a numeric field as it is \
         (count, sum, avg of the field, scaled or shifted by a constant), count(*), or \
         any of count, sum, avg, min, max of its dimensions ({})",
        rec.shared_as(),
        rec.dims()
    )
}

fn verify_node<'r>(plan: &LogicalPlan, schema: &DFSchema, rec: Rec<'r>) -> Result<Out<'r>, String> {
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
fn stated_value<'a>(
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
fn constant(v: &Expr, t: &DataType) -> Option<ScalarValue> {
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

fn verify_aggregate<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::policy::Grant;
    use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    const K: u64 = 5;

    /// A record: id, name, county, sex, age, score.
    type Person = (String, String, &'static str, &'static str, Option<i64>, f64);

    /// Cells (county, sex): a/f 7, a/m 6, b/f 5 are released; b/m 2 and c/f 1 are
    /// below k = 5.
    fn people() -> Vec<Person> {
        let mut out = Vec::new();
        for (county, sex, n) in [
            ("a", "f", 7),
            ("a", "m", 6),
            ("b", "f", 5),
            ("b", "m", 2),
            ("c", "f", 1),
        ] {
            for _ in 0..n {
                let k = out.len() as i64;
                let age = (k % 4 != 3).then_some(20 + 3 * k);
                out.push((
                    format!("p{k}"),
                    format!("name{k}"),
                    county,
                    sex,
                    age,
                    k as f64 * 0.5,
                ));
            }
        }
        out
    }

    fn released(p: &Person) -> bool {
        let n = people().iter().filter(|q| q.2 == p.2 && q.3 == p.3).count() as u64;
        n >= K
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("county", DataType::Utf8, true),
            Field::new("sex", DataType::Utf8, true),
            Field::new("age", DataType::Int64, true),
            Field::new("score", DataType::Float64, true),
            Field::new(MEMBER_COLUMN, DataType::Utf8, true),
        ]))
    }

    fn batch(people: &[Person]) -> RecordBatch {
        let s = |f: &dyn Fn(&Person) -> String| {
            Arc::new(StringArray::from(people.iter().map(f).collect::<Vec<_>>())) as _
        };
        RecordBatch::try_new(
            schema(),
            vec![
                s(&|p| p.0.clone()),
                s(&|p| p.1.clone()),
                s(&|p| p.2.to_string()),
                s(&|p| p.3.to_string()),
                Arc::new(Int64Array::from(
                    people.iter().map(|p| p.4).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    people.iter().map(|p| p.5).collect::<Vec<_>>(),
                )),
                s(&|_| "m1".to_string()),
            ],
        )
        .unwrap()
    }

    fn grant(level: AccessLevel) -> Grant {
        Grant {
            rule: 3,
            level,
            masks: BTreeMap::new(),
            dimensions: ["county", "sex"].iter().map(|s| s.to_string()).collect(),
            keys: ["id"].iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The caller's context (the dataset withheld) and the owner's plans, as the
    /// member engine builds them.
    async fn setup(level: AccessLevel) -> (SessionContext, BTreeMap<String, Restricted>) {
        let private = SessionContext::new();
        private
            .register_table(
                "records",
                Arc::new(MemTable::try_new(schema(), vec![vec![batch(&people())]]).unwrap()),
            )
            .unwrap();
        let records = "SELECT * FROM records";
        let fields: Vec<(String, DataType)> = schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        let g = grant(level);
        let plan = |sql: String| {
            let private = private.clone();
            async move { private.sql(&sql).await.unwrap().into_unoptimized_plan() }
        };
        let owned = match level {
            AccessLevel::Aggregate { min_group } => {
                let (sql, measures) = cells_sql(records, &fields, &g, min_group);
                Owned::Cells {
                    plan: plan(sql).await,
                    measures,
                }
            }
            _ => Owned::Records {
                plan: plan(records.to_string()).await,
            },
        };
        let caller = SessionContext::new();
        caller
            .register_table("t", Arc::new(Withheld::new("t", schema())))
            .unwrap();
        let mut r = BTreeMap::new();
        r.insert(
            "t".to_string(),
            Restricted {
                grant: g,
                fields,
                owned,
            },
        );
        (caller, r)
    }

    async fn run(level: AccessLevel, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let (ctx, r) = setup(level).await;
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let plan = rewrite(plan, &r)?;
        let batches = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|e| e.to_string())?
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let mut rows = Vec::new();
        for b in &batches {
            for i in 0..b.num_rows() {
                rows.push(
                    b.columns()
                        .iter()
                        .map(|c| {
                            datafusion::arrow::util::display::array_value_to_string(c, i).unwrap()
                        })
                        .collect(),
                );
            }
        }
        Ok(rows)
    }

    const AGG: AccessLevel = AccessLevel::Aggregate { min_group: K };

    fn row(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn aggregates_are_computed_from_cells_of_at_least_k() {
        let p: Vec<Person> = people().into_iter().filter(released).collect();
        let count = |c: &str| p.iter().filter(|x| x.2 == c).count().to_string();
        assert_eq!(
            run(
                AGG,
                "SELECT county, count(*) AS n FROM t GROUP BY county ORDER BY county"
            )
            .await
            .unwrap(),
            vec![row(&["a", &count("a")]), row(&["b", &count("b")])]
        );
        let ages: Vec<i64> = p.iter().filter_map(|x| x.4).collect();
        let sum: i64 = ages.iter().sum();
        let avg = sum as f64 / ages.len() as f64;
        assert_eq!(
            run(
                AGG,
                "SELECT sum(age), avg(age), count(age), count(*), sum(score * 2 + 1) FROM t"
            )
            .await
            .unwrap(),
            vec![row(&[
                &sum.to_string(),
                &format!("{avg:?}"),
                &ages.len().to_string(),
                &p.len().to_string(),
                &format!("{:?}", p.iter().map(|x| x.5 * 2.0 + 1.0).sum::<f64>())
            ])]
        );
        // The coordinator's partial average, a derived table, a CTE, DISTINCT, a
        // FILTER and dimension-only min/max all read cells.
        let f: Vec<&Person> = p.iter().filter(|x| x.3 == "f").collect();
        for (sql, want) in [
            (
                "SELECT count(CAST(age AS DOUBLE) * 1.0) FROM t",
                ages.len().to_string(),
            ),
            (
                "SELECT count(*) FROM (SELECT * FROM t WHERE sex = 'f') s",
                f.len().to_string(),
            ),
            (
                "WITH x AS (SELECT county, count(*) AS n FROM t GROUP BY county) SELECT max(n) FROM x",
                count("a"),
            ),
            ("SELECT count(DISTINCT county) FROM t", "2".into()),
            (
                "SELECT count(*) FILTER (WHERE sex = 'm') FROM t",
                p.iter().filter(|x| x.3 == "m").count().to_string(),
            ),
            ("SELECT max(county) FROM t", "b".into()),
            ("SELECT count(*) FROM t WHERE county = 'c'", "0".into()),
        ] {
            assert_eq!(run(AGG, sql).await.unwrap(), vec![vec![want]], "{sql}");
        }
        assert_eq!(
            run(AGG, "SELECT DISTINCT county FROM t ORDER BY county")
                .await
                .unwrap(),
            vec![row(&["a"]), row(&["b"])]
        );
    }

    #[tokio::test]
    async fn what_cells_cannot_say_is_refused_whatever_the_query_calls_it() {
        for (bad, why) in [
            ("SELECT * FROM t", "returns its records"),
            ("SELECT id FROM t LIMIT 1", "LIMIT"),
            // Derived tables and CTEs that relabel record fields as dimensions.
            (
                "SELECT county, count(*) FROM (SELECT id AS county FROM t) x GROUP BY county",
                "grouped only",
            ),
            (
                "WITH x AS (SELECT name AS sex, county FROM t) SELECT sex, count(*) FROM x GROUP BY sex",
                "grouped only",
            ),
            (
                "SELECT count(*) FROM (SELECT county, id AS sex FROM t) x WHERE sex = 'p3'",
                "filtered only",
            ),
            // Casts, arithmetic and CASE as filters.
            (
                "SELECT count(CASE WHEN id = 'p3' THEN 1 END) FROM t",
                "cannot be computed from its cells",
            ),
            (
                "SELECT count(nullif(id, 'p3')) FROM t",
                "cannot be computed from its cells",
            ),
            (
                "SELECT sum(CASE WHEN age > 30 THEN 1 ELSE 0 END) FROM t",
                "cannot be computed from its cells",
            ),
            (
                "SELECT sum(age / age) FROM t",
                "cannot be computed from its cells",
            ),
            ("SELECT count(*) FROM t WHERE age > 30", "filtered only"),
            (
                "SELECT count(*) FROM t WHERE CAST(id AS INT) = 3",
                "filtered only",
            ),
            ("SELECT max(age) FROM t", "one record's value"),
            ("SELECT count(DISTINCT name) FROM t", "cannot be computed"),
            ("SELECT age, count(*) FROM t GROUP BY age", "grouped only"),
            (
                "SELECT count(*) FROM t a JOIN t b ON a.county = b.county",
                "joined",
            ),
            (
                "SELECT county FROM t UNION ALL SELECT county FROM t",
                "combined",
            ),
            ("SELECT county, row_number() OVER () FROM t", "window"),
            ("SELECT array_agg(county) FROM t", "not allowed"),
            (
                "SELECT count(*) FROM t WHERE county IN (SELECT county FROM t)",
                "subqueries",
            ),
            ("SELECT count(*) FILTER (WHERE id = 'p3') FROM t", "FILTER"),
            (
                "SELECT county, count(*) FROM t GROUP BY ROLLUP (county)",
                "grouped only",
            ),
        ] {
            let e = run(AGG, bad).await.unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.contains("aggregate(k=5)") && e.contains("access[3]"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn verifications_run_the_owners_existence_check_on_stated_constants() {
        let v = AccessLevel::Verify;
        for (sql, want) in [
            (
                "SELECT count(*) AS n FROM t WHERE id = 'p3'",
                vec![row(&["1"])],
            ),
            (
                "SELECT count(*) FROM t WHERE id = 'nobody'",
                vec![row(&["0"])],
            ),
            (
                "SELECT count(*) FROM t WHERE id = 'p3' AND name = 'name4'",
                vec![row(&["0"])],
            ),
            (
                "SELECT count(*) FROM t WHERE 'name2' = name AND id = 'p2' AND age = 26",
                vec![row(&["1"])],
            ),
            (
                "SELECT member, count(*) FROM t WHERE id = 'p3' GROUP BY member",
                vec![row(&["m1", "1"])],
            ),
            (
                "SELECT member, count(*) FROM t WHERE id = 'nobody' GROUP BY member",
                vec![],
            ),
            // A rename is followed by position: the key is what the column holds.
            (
                "SELECT count(*) FROM (SELECT name AS id, id AS name FROM t) x WHERE id = 'name3' AND name = 'p3'",
                vec![row(&["1"])],
            ),
        ] {
            assert_eq!(run(v, sql).await.unwrap(), want, "{sql}");
        }
        for (bad, why) in [
            ("SELECT name FROM t WHERE id = 'p3'", "returns its records"),
            (
                "SELECT count(*) FROM t WHERE name = 'name3'",
                "must state id",
            ),
            (
                "SELECT count(*) FROM (SELECT name AS id FROM t) x WHERE id = 'name3'",
                "must state id",
            ),
            ("SELECT count(*) FROM t WHERE id LIKE 'p%'", "field = value"),
            (
                "SELECT count(*) FROM t WHERE id = 'p3' OR id = 'p4'",
                "field = value",
            ),
            ("SELECT count(*) FROM t WHERE id IS NULL", "field = value"),
            (
                "SELECT count(*) FROM t WHERE upper(id) = 'P3'",
                "field = value",
            ),
            // A key compared through a (lossy) cast, or with a constant of another type.
            (
                "SELECT count(*) FROM t WHERE CAST(id AS VARCHAR(1)) = 'p'",
                "field = value",
            ),
            ("SELECT count(*) FROM t WHERE id = 3", "field = value"),
            (
                "SELECT count(*) FROM t WHERE id = 'p3' AND CAST(age AS INT) = 29",
                "field = value",
            ),
            (
                "SELECT name, count(*) FROM t WHERE id = 'p3' GROUP BY name",
                "only by member",
            ),
            ("SELECT count(name) FROM t WHERE id = 'p3'", "only count(*)"),
            ("SELECT sum(age) FROM t WHERE id = 'p3'", "only count(*)"),
            (
                "SELECT count(*) FROM t a JOIN t b ON a.id = b.id WHERE a.id = 'p3'",
                "joined",
            ),
        ] {
            let e = run(v, bad).await.unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_withheld_table_that_is_read_fails_instead_of_answering() {
        let (ctx, _) = setup(AGG).await;
        // Planned without the rewrite, the caller's query has nothing to read.
        let e = ctx
            .sql("SELECT id FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not readable"), "{e}");
    }
}
