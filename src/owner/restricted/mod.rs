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

mod aggregate;
mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{TableProvider, TableType, source_as_provider};
use datafusion::logical_expr::{Expr, LogicalPlan, col};
use datafusion::physical_plan::ExecutionPlan;

use crate::config::MEMBER_COLUMN;
use crate::owner::policy::{AccessLevel, Grant};
use aggregate::cells_node;
use verify::verify_node;

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

#[cfg(test)]
mod tests;
