//! The SQL a member accepts and the sessions it plans in: one query statement and nothing
//! else, bounded in size and nesting before any planning, and the DataFusion session
//! settings every member context is built with.

use std::sync::Arc;

use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::physical_optimizer::projection_pushdown::ProjectionPushdown;
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

/// The least a plan cache ([`plan_cache`]) charges an entry, in bytes.
pub const PLAN_ENTRY_BYTES: u64 = 64 * 1024;

/// A cache of plans (at coordinators and members) holding at most `entries` plans of
/// ordinary queries, and at most `entries` × [`PLAN_ENTRY_BYTES`] of charged bytes.
/// An entry is charged the bytes `weigh` estimates it holds (its key's text and its
/// plans: [`logical_plan_bytes`], [`physical_plan_bytes`]) or `PLAN_ENTRY_BYTES`,
/// whichever is more. A caller may send texts of up to [`MAX_QUERY_BYTES`], and a plan
/// may be far larger than its text (a CTE is planned again at every reference);
/// counted by entries alone, a flood of such queries would keep gigabytes, and
/// weighed so they take the place of other plans instead. Parts of a value filled
/// after it is stored are not weighed, so they must hold nothing a caller sizes.
pub fn plan_cache<K, V>(
    entries: u64,
    idle: std::time::Duration,
    weigh: impl Fn(&K, &V) -> usize + Send + Sync + 'static,
) -> moka::future::Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .max_capacity(entries * PLAN_ENTRY_BYTES)
        .weigher(move |k, v| plan_charge(weigh(k, v)))
        .time_to_idle(idle)
        .build()
}

fn plan_charge(bytes: usize) -> u32 {
    (bytes as u64)
        .max(PLAN_ENTRY_BYTES)
        .min(u64::from(u32::MAX)) as u32
}

/// An estimate of the bytes a logical plan holds: a kilobyte per node, 128 bytes per
/// expression node, and the bytes of its text and binary constants.
pub fn logical_plan_bytes(plan: &LogicalPlan) -> usize {
    weighed(plan, 1024, 128)
}

/// The most bytes of text and binary constants a plan kept for a shape's later values
/// may hold (a coordinator's `KeptPlans`, an owner's `ReusedStatement`). A kept plan
/// holds the values of the query it was made for that stay in the gateway (a `HAVING`
/// over a final aggregate, a comparison the database cannot be given), while the
/// shape cache charges each plan a shape may keep as one copy of the shape's written
/// plan, whose values are placeholders: without this bound a caller could park
/// megabytes per kept plan, uncounted, for as long as the shape is cached. A query
/// holding more is planned physically each time.
pub const MOST_KEPT_CONSTANT_BYTES: usize = 4 << 10;

/// The bytes of the text and binary constants in `plan`'s expressions, subqueries
/// included (a scan's source is not an expression of the plan).
pub fn constant_bytes(plan: &LogicalPlan) -> usize {
    weighed(plan, 0, 0)
}

/// `node` bytes per plan node (subqueries included), `expr` per expression node, and
/// the bytes of every text and binary constant.
fn weighed(plan: &LogicalPlan, node: usize, expr: usize) -> usize {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::Expr;
    let mut bytes = 0usize;
    let _ = plan.apply_with_subqueries(|n| {
        bytes = bytes.saturating_add(node);
        n.apply_expressions(|e| {
            e.apply(|e| {
                bytes = bytes.saturating_add(expr);
                if let Expr::Literal(v, _) = e {
                    bytes = bytes
                        .saturating_add(crate::owner::bounded::literal_text_bytes(v).unwrap_or(0));
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    bytes
}

/// An estimate of the bytes a physical plan holds: a kilobyte per node and the text
/// `text` finds in each (the SQL a member scan or a database statement sends).
pub fn physical_plan_bytes(
    plan: &dyn datafusion::physical_plan::ExecutionPlan,
    text: fn(&dyn datafusion::physical_plan::ExecutionPlan) -> usize,
) -> usize {
    1024 + text(plan)
        + plan
            .children()
            .iter()
            .map(|c| physical_plan_bytes(c.as_ref(), text))
            .sum::<usize>()
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
    // Plans are planned once and run many times, each run from a copy of the plan
    // (`reset_state` on every node). DataFusion's physical scalar subquery keeps its
    // results in a container that every copy shares and that a new copy clears, so a
    // query started while another copy runs made the first fail ("evaluated before
    // the subquery was executed"). Without it, an uncorrelated scalar subquery is
    // planned as a join, whose copies share nothing.
    cfg.options_mut()
        .optimizer
        .enable_physical_uncorrelated_scalar_subquery = false;
    // An aggregate's dynamic filter (its running minimum or maximum, pushed into a
    // file's scan at planning) is shared by every copy too, and no copy resets it: a
    // query asked again started with the last run's bound and skipped the rows that
    // hold its answer (a minimum over Parquet came back NULL).
    cfg.options_mut()
        .optimizer
        .enable_aggregate_dynamic_filter_pushdown = false;
    cfg
}

/// A copy of a physical plan with fresh execution state in every node
/// (`reset_state`, as DataFusion does to run a plan again: file scans get a new
/// shared work queue, for one). The plan given is not changed, so concurrent
/// queries can each run their own copy of one cached plan. What DataFusion keeps
/// across such copies is turned off in [`session_config`].
pub fn fresh_copy(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    plan.transform_up(|node| Ok(Transformed::yes(node.reset_state()?)))
        .map(|t| t.data)
        .map_err(Error::from_datafusion)
}

/// A task context to run one query's physical plan planned in `state`: a memory pool
/// of its own (`pool_bytes`, which one query's operators track: aggregates, sorts,
/// joins) and no disk (spilling off: records are never written to disk on a caller's
/// behalf).
///
/// It holds no function maps. A physical plan holds every function it calls itself;
/// DataFusion reads a task's maps only in its `information_schema` tables (off in the
/// sessions whose plans run with this task, members' and coordinators',
/// [`session_config`]; the PostgreSQL port's catalog session turns them on and runs
/// with a task of its own) and when a plan is deserialized, which fedgate never does. Copying the session's maps (hundreds of functions, each named
/// by a string of its own) was about a tenth of a member's time planning a small
/// sub-query.
pub fn query_task(
    state: &datafusion::execution::SessionState,
    pool_bytes: usize,
) -> Result<Arc<datafusion::execution::TaskContext>> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    let pool = Arc::new(datafusion::execution::memory_pool::GreedyMemoryPool::new(
        pool_bytes,
    ));
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(
        state.runtime_env(),
    )
    .with_memory_pool(pool)
    .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
    .build_arc()
    .map_err(Error::from_datafusion)?;
    Ok(Arc::new(datafusion::execution::TaskContext::new(
        None,
        state.session_id().to_string(),
        state.config().clone(),
        Default::default(),
        Default::default(),
        Default::default(),
        Default::default(),
        runtime,
    )))
}

/// Whether `plan` calls a function whose value is fixed per query rather than per
/// row: `now()`, `current_date`, `current_time` and the like (DataFusion's `Stable`
/// functions), which the optimizer folds into the time its session says the query
/// started. Such a plan belongs to its query alone: it is optimized with this query's
/// start time and never cached or reused across constants, at coordinators and
/// members alike. Views are part of a written plan, so a mapping that reads the clock
/// counts.
pub fn reads_the_clock(plan: &LogicalPlan) -> bool {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, Volatility};
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|x| {
                if let Expr::ScalarFunction(f) = x
                    && f.func.signature().volatility == Volatility::Stable
                {
                    found = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    found
}

/// DataFusion's physical optimizer rules, with projections embedded into filters
/// before the sorts a plan needs are decided.
///
/// DataFusion forgets that an expression is constant when a projection that keeps only
/// some of its input columns is embedded into the filter that made it constant (the
/// projected equivalence class loses its constant). A sort placed earlier had dropped
/// that key as constant (`WHERE TRY_CAST(n AS BIGINT) = 13 ORDER BY qty, id` sorts
/// each partition by `id` only), the merge above still asks for `qty, id`, and the
/// finished plan fails DataFusion's own ordering check. Embedding the projections
/// first decides the sorts on the properties the finished plan has: the sort then
/// keeps the key, which costs nothing when it is constant.
pub fn physical_rules() -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let mut rules = PhysicalOptimizer::new().rules;
    let at = rules
        .iter()
        .position(|r| r.name() == "EnsureRequirements")
        .unwrap_or(0);
    rules.insert(at, Arc::new(ProjectionPushdown::new()));
    rules
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
    rules.push(Arc::new(crate::owner::bounded::ProjectedConstants));
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .with_optimizer_rules(rules)
        .with_physical_optimizer_rules(physical_rules())
        .build();
    let ctx = SessionContext::new_with_state(state);
    crate::owner::bounded::bound_functions(&ctx);
    ctx
}

/// Where planning time goes, phase by phase, reported at `debug` on the target
/// `fedgate::planning` (the planning profile's recipe: `FEDGATE_LOG=fedgate::planning=debug`,
/// or a subscriber of its own, as `benches/pushdown.rs` has).
pub struct Phases {
    at: std::time::Instant,
    done: Vec<(&'static str, u64)>,
}

impl Phases {
    /// Starts the first phase now.
    pub fn start() -> Phases {
        Phases {
            at: std::time::Instant::now(),
            done: Vec::with_capacity(6),
        }
    }

    /// Starts the first phase at `at`.
    pub fn since(at: std::time::Instant) -> Phases {
        Phases {
            at,
            done: Vec::with_capacity(6),
        }
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done
            .push((name, now.duration_since(self.at).as_micros() as u64));
        self.at = now;
    }

    /// The phases as `name=µs` pairs, in order.
    fn joined(&self) -> String {
        let pairs: Vec<String> = self
            .done
            .iter()
            .map(|(n, us)| format!("{n}={us}"))
            .collect();
        pairs.join(" ")
    }

    /// Reports the phases of one plan made at `side` (`coordinator` or `member`).
    pub fn report(&self, side: &'static str, from: &'static str) {
        if tracing::enabled!(target: "fedgate::planning", tracing::Level::DEBUG) {
            tracing::debug!(target: "fedgate::planning", side, from, phases = %self.joined(), "Planned");
        }
    }

    /// Reports the phases of one sub-query answered by this data owner, on the target
    /// `fedgate::phases` (with its audit records' write and wait: the recipe is
    /// `FEDGATE_LOG=fedgate::phases=debug`).
    pub fn report_sub_query(&self) {
        if tracing::enabled!(target: "fedgate::phases", tracing::Level::DEBUG) {
            tracing::debug!(target: "fedgate::phases", phases = %self.joined(), "Sub-query answered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::physical_plan::ExecutionPlan;

    /// A plan cache keeps as many ordinary entries as it is sized for, and a flood of
    /// megabyte-long texts, each asked for before it is kept (so that the cache's
    /// admission, which favours what is asked for often, takes it), never makes it
    /// hold more than its bytes: one such text at a time fits a cache of 64 entries
    /// when an entry is charged three times its text.
    #[tokio::test]
    async fn a_plan_cache_is_bounded_in_bytes_by_the_texts_it_holds() {
        let cache =
            plan_cache::<String, ()>(64, std::time::Duration::from_secs(60), |k, _| 3 * k.len());
        for i in 0..64 {
            cache.insert(format!("SELECT {i}"), ()).await;
        }
        cache.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), 64);
        let long = |i: usize| format!("SELECT '{}' -- {i}", "x".repeat(MAX_QUERY_BYTES - 32));
        for i in 0..8 {
            for _ in 0..4 {
                assert!(cache.get(&long(i)).await.is_none());
            }
            cache.insert(long(i), ()).await;
            cache.run_pending_tasks().await;
            assert!(
                cache.weighted_size() <= 64 * PLAN_ENTRY_BYTES,
                "{} bytes charged",
                cache.weighted_size()
            );
        }
        let kept = cache
            .iter()
            .filter(|(k, _)| k.len() > PLAN_ENTRY_BYTES as usize)
            .count();
        // Charged three megabytes each against four: one is kept, having pushed
        // ordinary entries out.
        assert_eq!(kept, 1, "{} entries", cache.entry_count());
        assert!(cache.entry_count() < 64, "{} entries", cache.entry_count());
    }

    /// A common table expression is planned again at every reference: the estimate of
    /// a plan's bytes counts every copy, with its constants, where its text counts
    /// them once.
    #[tokio::test]
    async fn a_plans_estimated_bytes_count_every_copy_of_a_common_table_expression() {
        let ctx = SessionContext::new_with_config(session_config());
        ctx.sql("CREATE TABLE t (k INT, note VARCHAR) AS VALUES (1, 'a')")
            .await
            .unwrap();
        let list = (0..1000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let note = "n".repeat(10_000);
        let refs = vec!["SELECT * FROM a"; 40].join(" UNION ALL ");
        let sql =
            format!("WITH a AS (SELECT * FROM t WHERE k IN ({list}) AND note <> '{note}') {refs}");
        let plan = ctx.state().create_logical_plan(&sql).await.unwrap();
        let bytes = logical_plan_bytes(&plan);
        // 40 copies, each of a thousand compared values and the 10 KB constant.
        assert!(
            bytes > 40 * (1000 * 128 + 10_000),
            "{bytes} bytes for {}",
            sql.len()
        );
        assert!(bytes > 20 * sql.len(), "{bytes} bytes for {}", sql.len());
    }

    /// Writes `values` as a Parquet file of one column, in row groups of `rows`.
    fn write_ints(path: &std::path::Path, column: &str, values: Vec<i64>, rows: usize) {
        let schema = Arc::new(Schema::new(vec![Field::new(
            column,
            DataType::Int64,
            false,
        )]));
        let props = datafusion::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(rows))
            .build();
        let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            schema.clone(),
            Some(props),
        )
        .unwrap();
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values))]).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// Runs a copy of `physical` as a cached plan is run ([`fresh_copy`], in a query's
    /// own task).
    fn run_copy(
        physical: &Arc<dyn ExecutionPlan>,
        state: &datafusion::execution::SessionState,
    ) -> datafusion::execution::SendableRecordBatchStream {
        datafusion::physical_plan::execute_stream(
            fresh_copy(physical.clone()).unwrap(),
            query_task(state, 1 << 24).unwrap(),
        )
        .unwrap()
    }

    /// Every cell of `batches` (integer columns), row by row.
    async fn cells(stream: datafusion::execution::SendableRecordBatchStream) -> Vec<Option<i64>> {
        let batches = datafusion::physical_plan::common::collect(stream)
            .await
            .unwrap();
        let mut out = Vec::new();
        for b in &batches {
            for r in 0..b.num_rows() {
                for c in b.columns() {
                    let c = c.as_any().downcast_ref::<Int64Array>().unwrap();
                    out.push(c.is_valid(r).then(|| c.value(r)));
                }
            }
        }
        out
    }

    /// Plans `sql` in `state`.
    async fn physical_of(
        state: &datafusion::execution::SessionState,
        sql: &str,
    ) -> Arc<dyn ExecutionPlan> {
        let plan = state.create_logical_plan(sql).await.unwrap();
        state.create_physical_plan(&plan).await.unwrap()
    }

    /// Queries over a Parquet file in several row groups, each run again and again from
    /// copies of one physical plan made as cached plans are run: every run answers
    /// what the file holds. DataFusion's dynamic filters (an aggregate's running
    /// minimum, a top-k's running threshold) are pushed into the file's scan at
    /// planning; a copy kept the last run's, and a minimum asked again found no row.
    #[tokio::test]
    async fn copies_of_one_plan_answer_over_a_file_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.parquet");
        // Row groups of ten values each; the smallest values in the last, the
        // largest in the first.
        let values: Vec<i64> = (0..50).map(|i| 1000 - i * 7).collect();
        write_ints(&path, "x", values.clone(), 10);
        let ctx = member_context();
        ctx.register_parquet("t", path.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        let state = ctx.state();
        // The filter keeps the answers from coming from the file's statistics alone.
        let mut kept: Vec<i64> = values.into_iter().filter(|x| x % 7 != 3).collect();
        kept.sort_unstable_by(|a, b| b.cmp(a));
        let cases = [
            (
                "SELECT min(x) AS lo, max(x) AS hi FROM t WHERE x % 7 <> 3",
                vec![kept.last().copied(), kept.first().copied()],
            ),
            (
                "SELECT x FROM t WHERE x % 7 <> 3 ORDER BY x DESC LIMIT 3",
                kept[..3].iter().copied().map(Some).collect(),
            ),
        ];
        for (sql, want) in cases {
            let physical = physical_of(&state, sql).await;
            for run in 0..4 {
                assert_eq!(
                    cells(run_copy(&physical, &state)).await,
                    want,
                    "{sql}, run {run}"
                );
            }
        }
    }

    /// A join whose smaller side is read again at every run, from copies of one
    /// physical plan made as cached plans are run: the dynamic filter DataFusion pushes
    /// from the join into the larger side's scan follows the keys of each run, not the
    /// first run's (here the smaller file stands for a database table whose rows change
    /// between runs; a file's own changes give a member a new plan).
    #[tokio::test]
    async fn copies_of_a_join_follow_the_keys_of_each_run() {
        let dir = tempfile::tempdir().unwrap();
        let (big, small) = (
            dir.path().join("big.parquet"),
            dir.path().join("small.parquet"),
        );
        write_ints(&big, "x", (0..100).collect(), 10);
        write_ints(&small, "k", vec![3, 5], 10);
        let ctx = member_context();
        ctx.register_parquet("big", big.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        ctx.register_parquet("small", small.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        let state = ctx.state();
        let physical = physical_of(
            &state,
            "SELECT b.x FROM small s JOIN big b ON b.x = s.k ORDER BY b.x",
        )
        .await;
        let shown = datafusion::physical_plan::displayable(physical.as_ref())
            .indent(true)
            .to_string();
        assert!(
            shown.contains("DynamicFilter"),
            "the join's filter is pushed into the larger scan:\n{shown}"
        );
        // Two keys each time: the file keeps its length, which the plan read when it
        // listed the file.
        for keys in [vec![3, 5], vec![3, 5], vec![70, 90], vec![4, 41]] {
            write_ints(&small, "k", keys.clone(), 10);
            let want: Vec<Option<i64>> = keys.into_iter().map(Some).collect();
            assert_eq!(cells(run_copy(&physical, &state)).await, want);
        }
    }

    /// Two runs of one planned query with an uncorrelated scalar subquery, each from
    /// its own copy of the plan (as cached plans run), the second started while the
    /// first is midway: both answer every row they should.
    #[tokio::test]
    async fn copies_of_a_plan_with_a_scalar_subquery_run_at_once() {
        use futures::StreamExt;
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        // 0..400 in four batches: the average is 199.5, so 200 rows are above it.
        let batches: Vec<_> = (0..4)
            .map(|b| {
                RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from_iter_values(
                        (0..100).map(|i| b * 100 + i),
                    ))],
                )
                .unwrap()
            })
            .collect();
        let ctx = context_with(
            session_config()
                .with_target_partitions(1)
                .with_batch_size(50),
        );
        let t = datafusion::datasource::MemTable::try_new(schema, vec![batches]).unwrap();
        ctx.register_table("t", Arc::new(t)).unwrap();
        let state = ctx.state();
        let physical =
            physical_of(&state, "SELECT x FROM t WHERE x > (SELECT avg(x) FROM t)").await;
        let mut first = run_copy(&physical, &state);
        let mut rows = first.next().await.unwrap().unwrap().num_rows();
        let second = run_copy(&physical, &state);
        while let Some(b) = first.next().await {
            rows += b.unwrap().num_rows();
        }
        assert_eq!(rows, 200);
        assert_eq!(cells(second).await.len(), 200);
    }

    /// A query's task holds no function maps, and plans calling scalar, aggregate and
    /// window functions (fedgate's bounded ones too) still run in it and answer what
    /// the session itself answers.
    #[tokio::test]
    async fn a_query_task_without_function_maps_runs_every_kind_of_function() {
        let ctx = member_context();
        let sql = "SELECT upper(a) AS u, repeat(a, 2) AS r, count(*) OVER () AS w, \
                   sum(n) OVER (ORDER BY n) AS s, approx_distinct(n) OVER () AS d \
                   FROM (VALUES ('x', 1), ('y', 2), ('x', 3)) AS t(a, n) ORDER BY n";
        let expected = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let grouped = "SELECT a, count(*) AS c, array_agg(n ORDER BY n) AS l \
                       FROM (VALUES ('x', 1), ('y', 2), ('x', 3)) AS t(a, n) \
                       GROUP BY a ORDER BY a";
        let expected_grouped = ctx.sql(grouped).await.unwrap().collect().await.unwrap();
        let state = ctx.state();
        let task = query_task(&state, 1 << 20).unwrap();
        assert!(task.scalar_functions().is_empty());
        assert!(task.aggregate_functions().is_empty());
        assert!(task.window_functions().is_empty());
        for (sql, expected) in [(sql, expected), (grouped, expected_grouped)] {
            let plan = state.create_logical_plan(sql).await.unwrap();
            let physical = state.create_physical_plan(&plan).await.unwrap();
            let got = datafusion::physical_plan::collect(physical, task.clone())
                .await
                .unwrap();
            assert_eq!(
                datafusion::arrow::util::pretty::pretty_format_batches(&got)
                    .unwrap()
                    .to_string(),
                datafusion::arrow::util::pretty::pretty_format_batches(&expected)
                    .unwrap()
                    .to_string(),
                "{sql}"
            );
        }
    }

    /// An ORDER BY key made constant by a filter on a mapped expression, over a file
    /// read in two partitions: DataFusion alone fails its own ordering check here.
    #[tokio::test]
    async fn a_sort_key_made_constant_by_a_filter_plans_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ship.csv");
        let mut text = String::from("编号,数量,类别\n");
        for i in 0..40 {
            text.push_str(&format!(
                "{},{},{}\n",
                40 - i,
                i % 3 + 12,
                ["A", "C"][i % 2]
            ));
        }
        std::fs::write(&path, text).unwrap();
        let ctx = member_context();
        // Every column read as text, as file sources are.
        let text_schema = datafusion::arrow::datatypes::Schema::new(
            ["编号", "数量", "类别"]
                .map(|n| {
                    datafusion::arrow::datatypes::Field::new(
                        n,
                        datafusion::arrow::datatypes::DataType::Utf8,
                        true,
                    )
                })
                .to_vec(),
        );
        ctx.register_csv(
            "ship",
            path.to_str().unwrap(),
            datafusion::prelude::CsvReadOptions::new().schema(&text_schema),
        )
        .await
        .unwrap();
        ctx.sql(
            "CREATE VIEW shipments AS SELECT TRY_CAST(\"编号\" AS BIGINT) AS id, \
             TRY_CAST(\"数量\" AS BIGINT) AS qty, \"类别\" AS category FROM ship",
        )
        .await
        .unwrap();
        let batches = ctx
            .sql(
                "SELECT id, qty FROM shipments WHERE qty BETWEEN 13 AND 13 AND category < 'B' \
                 ORDER BY qty, id LIMIT 20",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let a = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .unwrap();
                a.values().to_vec()
            })
            .collect();
        // Rows i with i % 3 == 1 (qty 13) and i even (category A): i = 4, 10, 16, ...
        let want: Vec<i64> = {
            let mut w: Vec<i64> = (0..40)
                .filter(|i| i % 3 == 1 && i % 2 == 0)
                .map(|i| 40 - i)
                .collect();
            w.sort();
            w
        };
        assert_eq!(ids, want);
    }
}
