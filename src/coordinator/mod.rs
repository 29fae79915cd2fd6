//! The coordinator: plans a canonical SQL query as a union of member scans, runs the
//! member scans concurrently and merges their answers.
//!
//! Per query: a DataFusion session whose tables are the region's canonical datasets
//! ([`table::FederatedTable`]), carrying the query's [`state::QueryState`] as a config
//! extension so every member scan can report its outcome. The final aggregation,
//! sorting and limits run here, on the rows the members returned.

pub mod breaker;
pub mod client;
pub mod pushdown;
pub mod results;
pub mod scan;
pub mod state;
pub mod table;
pub mod unparse;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::TableReference;
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::config::MemberConfig;
use crate::error::{Error, Result};
use crate::ops::audit::AuditLog;
use crate::owner::member::MemberEngine;
use crate::owner::session::session_config;
use crate::proto::v1::peer_client::PeerClient;
use crate::proto::v1::{CatalogRequest, DatasetAccess};
use crate::trust::identity::Principal;
use crate::trust::tls::{Connector, TlsMaterial};
use client::MemberClient;
use state::QueryState;
use table::FederatedTable;

/// Bound parameter values as part of a plan cache key: names sorted, each value with
/// its type (`county_code=Utf8("330523")`), so equal values give equal keys.
fn params_key(p: &datafusion::common::ParamValues) -> String {
    use datafusion::common::ParamValues;
    match p {
        ParamValues::Map(m) => {
            let mut v: Vec<String> = m
                .iter()
                .map(|(k, x)| format!("{k}={:?}", x.value))
                .collect();
            v.sort();
            v.join(",")
        }
        ParamValues::List(l) => l
            .iter()
            .map(|x| format!("{:?}", x.value))
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// Options a caller sets on a query.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Return the answering members' rows when some members fail.
    pub allow_partial: bool,
    /// The whole query's time budget.
    pub timeout: Duration,
    /// Push aggregates and top-k into member sub-queries (off only to compare).
    pub pushdown: bool,
    /// Reuse plans of earlier identical queries (off only to compare).
    pub plan_cache: bool,
    /// Why the data is asked for; sent with every sub-query.
    pub purpose: Option<String>,
    /// Values bound to the query's `$name` placeholders (published services).
    pub params: Option<datafusion::common::ParamValues>,
    /// The origin's assertion, sent with every sub-query (see [`crate::trust::assertion`]).
    pub assertion: Option<Arc<Vec<u8>>>,
    /// The incident the query is asked under (a signed declaration), sent with every
    /// sub-query; each owner decides what it opens.
    pub incident: Option<Arc<Vec<u8>>>,
    /// Ask every member for a signed statement of its answer.
    pub receipt: bool,
    /// The query's span: member calls are its children, and its trace context
    /// travels with every sub-query.
    pub span: tracing::Span,
}

impl Default for QueryOptions {
    fn default() -> Self {
        QueryOptions {
            allow_partial: false,
            timeout: Duration::from_secs(30),
            pushdown: true,
            plan_cache: true,
            purpose: None,
            params: None,
            assertion: None,
            incident: None,
            receipt: false,
            span: tracing::Span::none(),
        }
    }
}

/// What a cached plan depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    /// The query as parsed and printed, or (with `exact`) the text as received.
    sql: String,
    exact: bool,
    version: String,
    scope: String,
    pushdown: bool,
}

/// A cached physical plan and an estimate of the bytes it holds, made from the
/// logical plan it was planned from (a physical plan's expressions cannot be walked
/// generically), for the cache's weigher.
#[derive(Clone)]
struct CachedPlan {
    plan: Arc<dyn ExecutionPlan>,
    bytes: usize,
}

/// Where a query's physical plan came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanFrom {
    /// The plan cache: the same query was planned before.
    Cache,
    /// A written plan of the same shape, bound to this query's values, then optimized
    /// and planned physically.
    Shape,
    /// The optimized plan of the same shape, bound to this query's values, then
    /// planned physically: the optimizer did not run for this query.
    ShapeOptimized,
    /// As `ShapeOptimized`, and the physical plan was an earlier query's of the shape,
    /// run with this query's member SQL ([`pushdown::KeptPlans`]): binding was all the
    /// planning this query had.
    ShapeReused,
    /// The query's text, planned from scratch.
    Text,
}

impl PlanFrom {
    fn word(self) -> &'static str {
        match self {
            PlanFrom::Cache => "cache",
            PlanFrom::Shape => "bound",
            // The planning event's phases say `reused` for the physical plan.
            PlanFrom::ShapeOptimized | PlanFrom::ShapeReused => "bound optimized",
            PlanFrom::Text => "text",
        }
    }
}

/// A shape's plans ([`crate::owner::shape`]): its written plan and, made the second
/// time a query of the shape comes, its optimized plan with the placeholders still in
/// place (`None` inside when the optimizer's output cannot take values: see
/// [`Shape::optimized`]), and the physical plans kept for its queries
/// ([`pushdown::KeptPlans`]).
#[derive(Debug)]
struct Shape {
    planned: crate::owner::shape::Planned,
    takes: Takes,
    optimized: tokio::sync::OnceCell<Option<datafusion::logical_expr::LogicalPlan>>,
    kept: Arc<pushdown::KeptPlans>,
}

/// What values a shape's optimized plan may be bound with.
#[derive(Debug)]
enum Takes {
    /// A shape's constants, which `Planned::values` makes of exactly their
    /// placeholders' types.
    Constants,
    /// A prepared statement's values, when every placeholder is only compared
    /// ([`crate::owner::shape::placeholders_only_compared`]): each of exactly its
    /// placeholder's type, one of the kinds member SQL holds as written
    /// ([`crate::owner::shape::compared_kind`]).
    Compared(HashMap<String, datafusion::arrow::datatypes::DataType>),
    /// None: a prepared statement with a placeholder elsewhere (a `LIMIT`, a select
    /// list), whose written plan is bound and optimized for each run's values.
    Nothing,
}

impl Shape {
    fn new(planned: crate::owner::shape::Planned) -> Shape {
        Shape {
            planned,
            takes: Takes::Constants,
            optimized: tokio::sync::OnceCell::new(),
            kept: Arc::default(),
        }
    }

    /// A prepared statement's shape: its written plan, and what its optimized plan
    /// may be bound with.
    fn prepared(
        plan: datafusion::logical_expr::LogicalPlan,
        stmt: &datafusion::sql::parser::Statement,
    ) -> Shape {
        let typed = || {
            let mut types = HashMap::new();
            for (id, field) in plan.get_parameter_fields().ok()? {
                let field = field?;
                let t = field.data_type();
                if !field.metadata().is_empty() || !crate::owner::shape::compared_kind(t) {
                    return None;
                }
                types.insert(id, t.clone());
            }
            Some(types)
        };
        let takes = match crate::owner::shape::placeholders_only_compared(stmt) {
            true => typed().map_or(Takes::Nothing, Takes::Compared),
            false => Takes::Nothing,
        };
        Shape {
            planned: crate::owner::shape::Planned::prepared(plan),
            takes,
            optimized: tokio::sync::OnceCell::new(),
            kept: Arc::default(),
        }
    }

    /// Whether `values` may be bound into the optimized plan.
    fn takes(&self, values: &datafusion::common::ParamValues) -> bool {
        match &self.takes {
            Takes::Constants => true,
            Takes::Nothing => false,
            Takes::Compared(types) => types.iter().all(|(id, t)| {
                values
                    .get_placeholders_with_values(id)
                    .is_ok_and(|v| v.value.data_type() == *t && v.metadata.is_none())
            }),
        }
    }

    /// The shape's optimized plan with `values` bound, or `None` when the shape's
    /// plan cannot be optimized before its values are known.
    ///
    /// Optimizing with placeholders is sound for a shape because of what a shape
    /// lifts: only constants compared in `WHERE` and `HAVING` (never a `LIMIT`, a
    /// position, a select-list value), each bound as exactly its placeholder's type.
    /// Every optimizer rule must keep a plan's meaning for any value of an expression
    /// it cannot fold, and a placeholder is such an expression. What depends on the
    /// value itself runs after binding: the members pruned by `member` and the
    /// member SQL are made by physical planning from the bound filters, the scans the
    /// pushdown rule made are bound ([`pushdown::bind`]) and, unless the query is
    /// sent whole, written again from their bound plans
    /// ([`pushdown::write_member_sql`]), and a whole query is sent
    /// ([`pushdown::push_whole_query`]) only as decided over the bound plan. A shape that reads the clock
    /// ([`crate::owner::session::reads_the_clock`]) is not reused.
    async fn optimized(
        &self,
        state: &SessionState,
        values: &datafusion::common::ParamValues,
    ) -> Option<datafusion::logical_expr::LogicalPlan> {
        if !self.takes(values) {
            return None;
        }
        let optimized = self
            .optimized
            .get_or_init(|| async {
                crate::owner::shape::optimize_with_placeholders(state, &self.planned.plan)
            })
            .await
            .as_ref()?;
        let bound = pushdown::bind(optimized.clone(), values).ok()?;
        // Lifted constants are only compared, never copied into rows, so no optimizer
        // rule of today moves one into an output column; the bound plan is checked
        // as the optimizer's last rule checks every plan all the same, so the bound
        // holds whatever a rule does.
        crate::owner::bounded::check_projected_constants(&bound).ok()?;
        Some(bound)
    }
}

/// A query's logical plan as [`Coordinator::written`] gives it.
// One per query, made and taken apart once: boxing the larger variant would only add
// an allocation.
#[allow(clippy::large_enum_variant)]
enum Logical {
    /// Every value in place, to be optimized.
    Written(datafusion::logical_expr::LogicalPlan),
    /// A shape's optimized plan with this query's values bound, its member SQL not
    /// written yet ([`pushdown::bind`]); `written` is the shape's written plan, which
    /// names the datasets the text names; `kept` the shape's kept physical plans.
    Optimized {
        written: datafusion::logical_expr::LogicalPlan,
        optimized: datafusion::logical_expr::LogicalPlan,
        kept: Option<Arc<pushdown::KeptPlans>>,
        /// The values bound, for planning `written` with them should the member SQL
        /// not be writable.
        values: datafusion::common::ParamValues,
    },
}

/// A query whose plan is built and whose member scans start as the stream is read.
pub struct RunningQuery {
    /// The answer's schema.
    pub schema: SchemaRef,
    /// The merged answer.
    pub stream: SendableRecordBatchStream,
    /// Per-member outcomes, complete once the stream has ended.
    pub state: Arc<QueryState>,
    /// Whether the plan came from the plan cache.
    pub plan_cached: bool,
    /// Whether the plan was bound from a cached shape (the same query with other
    /// constants, or a prepared statement with other values) instead of planned from
    /// its text.
    pub plan_bound: bool,
    /// Whether the plan was bound from the optimized plan of its shape: only
    /// physical planning ran for this query's values.
    pub plan_bound_optimized: bool,
    /// Whether, beyond that, the physical plan of an earlier query of the shape was
    /// run with this query's member SQL: no planning ran but binding.
    pub plan_reused: bool,
    /// Time from SQL text to a physical plan.
    pub planning: Duration,
}

/// How a query would run.
#[derive(Debug, Clone)]
pub struct Explained {
    /// The coordinator's physical plan.
    pub plan: String,
    /// Each member scan: dataset, members asked, SQL.
    pub subqueries: Vec<(String, Vec<String>, String)>,
    /// What each member would send to its databases: member, then (database, SQL)
    /// pairs or why the member could not say.
    pub database_statements: Vec<(String, Result<Vec<DatabaseStatement>>)>,
}

/// A statement a member sends to one of its databases: (database, SQL).
pub type DatabaseStatement = (String, String);

/// A copy of a (cached) physical plan for one query: every node with fresh execution
/// state (`reset_state`, as DataFusion does to run a plan again), every member scan
/// bound to the query's state. The plan given is not changed.
fn bind(plan: Arc<dyn ExecutionPlan>, state: &Arc<QueryState>) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    plan.transform_up(|node| {
        let any: &dyn std::any::Any = node.as_ref();
        if let Some(scan) = any.downcast_ref::<table::FederatedScanExec>() {
            let bound: Arc<dyn ExecutionPlan> = Arc::new(scan.bind(state.clone()));
            return Ok(Transformed::yes(bound));
        }
        Ok(Transformed::yes(node.reset_state()?))
    })
    .map(|t| t.data)
    .map_err(Error::from_datafusion)
}

fn collect_scans(
    plan: &dyn datafusion::physical_plan::ExecutionPlan,
    out: &mut Vec<(String, Vec<String>, String)>,
) {
    let any: &dyn std::any::Any = plan;
    if let Some(scan) = any.downcast_ref::<table::FederatedScanExec>() {
        out.push((
            scan.dataset().to_string(),
            scan.members().into_iter().map(String::from).collect(),
            scan.member_sql().to_string(),
        ));
    }
    for child in plan.children() {
        collect_scans(child.as_ref(), out);
    }
}

/// The one schema the canonical datasets are listed under by the front ends that
/// list tables (Flight SQL, the PostgreSQL port), in a catalog named after the region.
pub const CANONICAL_SCHEMA: &str = "canonical";

/// Positional placeholders `$1..$n` in order, with the types the planner inferred; a
/// named placeholder or a gap is an error.
pub fn ordered_placeholders(
    found: std::collections::HashMap<String, Option<datafusion::arrow::datatypes::DataType>>,
) -> Result<Vec<Option<datafusion::arrow::datatypes::DataType>>> {
    let mut out = vec![None; found.len()];
    for (name, t) in found {
        let i: usize = name
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .filter(|i| (1..=out.len()).contains(i))
            .ok_or_else(|| {
                Error::InvalidQuery(format!(
                    "placeholder {name}: only positional parameters $1, $2, ... can be bound here"
                ))
            })?;
        out[i - 1] = t;
    }
    Ok(out)
}

/// Numbers `?` placeholders (as JDBC, ODBC and ADBC write them) `$1`, `$2`, ... in
/// the order they appear in the text, which is the order their values are bound in.
/// A statement mixing `?` with `$n` is refused: which value goes where would be a
/// guess. Whether anything was renumbered is returned.
fn number_question_marks(stmt: &mut datafusion::sql::sqlparser::ast::Statement) -> Result<bool> {
    use datafusion::sql::sqlparser::ast::{Expr, Value, visit_expressions, visit_expressions_mut};
    use std::ops::ControlFlow;
    let (mut marks, mut numbered) = (Vec::new(), false);
    let _ = visit_expressions(stmt, |e| {
        if let Expr::Value(v) = e
            && let Value::Placeholder(p) = &v.value
        {
            if p == "?" {
                marks.push(v.span.start);
            } else {
                numbered = true;
            }
        }
        ControlFlow::<()>::Continue(())
    });
    if marks.is_empty() {
        return Ok(false);
    }
    let refuse = |why: &str| Err(Error::InvalidQuery(format!("placeholders: {why}")));
    if numbered {
        return refuse("use either ? or $1, $2, ... in one statement, not both");
    }
    marks.sort();
    let before = marks.len();
    marks.dedup();
    if marks.len() != before {
        return refuse("the ? placeholders could not be told apart by their place in the text");
    }
    let _ = visit_expressions_mut(stmt, |e| {
        if let Expr::Value(v) = e
            && matches!(&v.value, Value::Placeholder(p) if p == "?")
            && let Ok(i) = marks.binary_search(&v.span.start)
        {
            v.value = Value::Placeholder(format!("${}", i + 1));
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(true)
}

/// Plans and runs federated queries at one gateway.
pub struct Coordinator {
    config: Arc<MemberConfig>,
    clients: Arc<HashMap<String, MemberClient>>,
    tables: Vec<(String, Arc<FederatedTable>)>,
    /// Planning sessions with the pushdown rule and without it.
    sessions: [SessionState; 2],
    /// Physical plans by query, configuration, caller and options. A plan is never
    /// run itself: each query runs a copy with fresh execution state whose member
    /// scans are bound to that query ([`bind`]), so queries sharing a plan share
    /// nothing at run time.
    plans: moka::future::Cache<PlanKey, CachedPlan>,
    /// Written plans by shape (a query's text with its filter constants lifted out,
    /// or a prepared statement's text), by configuration, caller and options: a query
    /// of a known shape is bound, not planned from its text ([`crate::owner::shape`]).
    /// `None` marks a shape the planner could not type, planned as written.
    shapes: moka::future::Cache<PlanKey, Arc<Option<Shape>>>,
    /// When the TLS material the clients use expires (for the metrics).
    expiries: crate::trust::tls::Expiries,
    /// Serial numbers the region's revocation lists name.
    revoked: Arc<std::collections::HashSet<Vec<u8>>>,
}

/// A planning session over the canonical tables, with or without the pushdown rule.
fn planning_session(
    tables: &[(String, Arc<FederatedTable>)],
    pushdown: bool,
) -> Result<SessionState> {
    let mut rules = datafusion::optimizer::Optimizer::new().rules;
    if pushdown {
        // After filters are pushed into scans and before common-subexpression
        // elimination, whose generated projections make member SQL harder to read
        // (and have tripped members' own optimizers).
        let at = rules
            .iter()
            .position(|r| r.name() == "common_sub_expression_eliminate")
            .unwrap_or(rules.len());
        rules.insert(at, Arc::new(pushdown::MemberPushdown));
    }
    rules.push(Arc::new(crate::owner::bounded::ProjectedConstants));
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_config(session_config())
        .with_default_features()
        .with_optimizer_rules(rules)
        .with_physical_optimizer_rules(crate::owner::session::physical_rules())
        .build();
    let ctx = SessionContext::new_with_state(state);
    crate::owner::bounded::bound_functions(&ctx);
    for (name, t) in tables {
        ctx.register_table(TableReference::bare(name.as_str()), t.clone())
            .map_err(|e| Error::Internal(e.to_string()))?;
    }
    Ok(ctx.state())
}

/// Share of a query's budget kept for merging after the members' deadline.
fn merge_reserve(total: Duration) -> Duration {
    (total / 10).clamp(Duration::from_millis(20), Duration::from_secs(2))
}

impl Coordinator {
    /// Whether the revocation lists in force name the certificate with this serial.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        !serial.is_empty() && self.revoked.contains(serial)
    }

    /// When this gateway's certificate, the CA and the revocation lists expire.
    pub fn tls_expiries(&self) -> &crate::trust::tls::Expiries {
        &self.expiries
    }

    /// Builds clients for every member gateway and one table per canonical dataset.
    pub fn new(
        config: Arc<MemberConfig>,
        local: Option<Arc<MemberEngine>>,
        tls: &TlsMaterial,
        audit: Arc<AuditLog>,
        register: Arc<crate::owner::incidents::Register>,
    ) -> Result<Coordinator> {
        let shared_tls = Arc::new(tls.clone());
        let region = config.region.clone();
        let client_cfg = tls.client_config()?;
        let mut clients = HashMap::new();
        for m in &region.members {
            let Some(ep) = &m.endpoint else { continue };
            if m.name == config.member.name {
                if let Some(engine) = &local {
                    clients.insert(
                        m.name.clone(),
                        MemberClient::Local {
                            name: m.name.clone(),
                            engine: engine.clone(),
                            me: config.member.principal.clone(),
                            audit: audit.clone(),
                            register: register.clone(),
                            tls: shared_tls.clone(),
                        },
                    );
                }
                continue;
            }
            let channel = Connector::new(
                client_cfg.clone(),
                &ep.host,
                ep.port,
                Some(m.principal.clone()),
            )
            .channel(Duration::from_secs(5))?;
            clients.insert(
                m.name.clone(),
                MemberClient::Remote {
                    name: m.name.clone(),
                    endpoint: ep.url.clone(),
                    client: PeerClient::new(channel.clone())
                        .max_decoding_message_size(16 * 1024 * 1024),
                    channel,
                    health: Arc::new(breaker::MemberHealth::new(
                        config.limits.breaker,
                        config.limits.retries,
                    )),
                },
            );
        }
        let clients = Arc::new(clients);
        let results = (config.limits.result_cache_bytes > 0)
            .then(|| results::ResultCache::new(config.limits.result_cache_bytes));
        let tables: Vec<(String, Arc<FederatedTable>)> = region
            .datasets
            .iter()
            .map(|d| {
                let servers = region.servers_of(&d.name).map(|m| m.name.clone()).collect();
                (
                    d.name.clone(),
                    Arc::new(FederatedTable::new(
                        d.clone(),
                        servers,
                        clients.clone(),
                        results.clone(),
                    )),
                )
            })
            .collect();
        let sessions = [
            planning_session(&tables, true)?,
            planning_session(&tables, false)?,
        ];
        // A shape keeps at most one physical plan per member for its queries sent
        // whole and a few for its split ones ([`pushdown::KeptPlans`]).
        let kept_plans = config.region.members.len() + pushdown::MOST_SPLIT_PLANS;
        Ok(Coordinator {
            config,
            expiries: tls.expiries.clone(),
            revoked: tls.revoked.clone(),
            clients,
            tables,
            sessions,
            plans: crate::owner::session::plan_cache(
                1024,
                Duration::from_secs(3600),
                |k: &PlanKey, p: &CachedPlan| k.sql.len() + k.scope.len() + p.bytes,
            ),
            // A shape's optimized plan and the physical plans it may keep, made later,
            // are charged when it is cached, as one more copy of its written plan each
            // (the kept plans hold no query's text; each holds a logical plan without
            // the texts and a physical plan, which the estimate of the written plan's
            // nodes covers, and at most `owner::session::MOST_KEPT_CONSTANT_BYTES` of the
            // values that stay at the coordinator).
            shapes: crate::owner::session::plan_cache(
                1024,
                Duration::from_secs(3600),
                move |k: &PlanKey, s: &Arc<Option<Shape>>| {
                    k.sql.len()
                        + k.scope.len()
                        + s.as_ref().as_ref().map_or(0, |s| {
                            (2 + kept_plans)
                                * crate::owner::session::logical_plan_bytes(&s.planned.plan)
                        })
                },
            ),
        })
    }

    /// The configuration this coordinator runs under.
    pub fn config(&self) -> &Arc<MemberConfig> {
        &self.config
    }

    /// The planning session, with or without the pushdown rule. Built once per
    /// coordinator and shared by every query; per-query state travels in the task
    /// context instead, so nothing is rebuilt per query.
    fn session(&self, pushdown: bool) -> &SessionState {
        if pushdown {
            &self.sessions[0]
        } else {
            &self.sessions[1]
        }
    }

    /// The canonical datasets a parsed query reads; any other table is an error that
    /// lists the region's datasets.
    fn datasets_in(
        &self,
        state: &SessionState,
        stmt: &datafusion::sql::parser::Statement,
    ) -> Result<BTreeSet<String>> {
        let mut found = BTreeSet::new();
        for r in state
            .resolve_table_references(stmt)
            .map_err(Error::from_datafusion)?
        {
            match &r {
                TableReference::Bare { table }
                    if self
                        .tables
                        .iter()
                        .any(|(n, _)| n.as_str() == table.as_ref()) =>
                {
                    found.insert(table.to_string());
                }
                _ => {
                    let names: Vec<&str> = self.tables.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(Error::InvalidQuery(format!(
                        "unknown dataset {r}; the region's canonical datasets are: {}",
                        names.join(", ")
                    )));
                }
            }
        }
        Ok(found)
    }

    /// The canonical datasets `sql` reads (what an origin assertion for it covers).
    pub fn datasets_of(&self, sql: &str) -> Result<BTreeSet<String>> {
        let state = self.session(true);
        let (stmt, _) = self.parse(state, sql)?;
        self.datasets_in(state, &stmt)
    }

    /// Parses a caller's query. Datasets may be named as clients list them, qualified
    /// with the schema (`canonical.census`) or with the region's catalog and the
    /// schema (`yrd.canonical.census`); such names are made bare here, and the text
    /// printed from the rewritten statement is returned beside it (a member is sent
    /// bare names only).
    fn parse(
        &self,
        state: &SessionState,
        sql: &str,
    ) -> Result<(datafusion::sql::parser::Statement, Option<String>)> {
        use datafusion::sql::sqlparser::ast::{ObjectNamePart, visit_relations_mut};
        let mut stmt = crate::owner::session::parse_query(state, sql)?;
        let datafusion::sql::parser::Statement::Statement(inner) = &mut stmt else {
            return Ok((stmt, None));
        };
        let schema = CANONICAL_SCHEMA;
        let region = self.config.region.name.as_str();
        let mut rewritten = false;
        let _ = visit_relations_mut(inner.as_mut(), |name| {
            let parts: Vec<Option<String>> = name
                .0
                .iter()
                .map(|p| p.as_ident().map(|i| i.value.clone()))
                .collect();
            let qualified = match parts.as_slice() {
                [Some(s), Some(_)] => s.eq_ignore_ascii_case(schema),
                [Some(c), Some(s), Some(_)] => {
                    c.eq_ignore_ascii_case(region) && s.eq_ignore_ascii_case(schema)
                }
                _ => false,
            };
            if qualified && let Some(ObjectNamePart::Identifier(table)) = name.0.pop() {
                name.0 = vec![ObjectNamePart::Identifier(table)];
                rewritten = true;
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        if let datafusion::sql::parser::Statement::Statement(inner) = &mut stmt {
            rewritten |= number_question_marks(inner.as_mut())?;
        }
        let text = rewritten.then(|| stmt.to_string());
        Ok((stmt, text))
    }

    /// The answer schema of `sql` and the types the planner infers for its
    /// positional placeholders (`$1`, `$2`, ...), without running or binding it: what
    /// the PostgreSQL port's Describe answers for a prepared statement.
    pub async fn describe(
        &self,
        sql: &str,
    ) -> Result<(
        datafusion::arrow::datatypes::SchemaRef,
        Vec<Option<datafusion::arrow::datatypes::DataType>>,
    )> {
        let state = self.session(true);
        let (stmt, _) = self.parse(state, sql)?;
        self.datasets_in(state, &stmt)?;
        let plan = crate::owner::session::plan_query(state, stmt).await?;
        let found = plan.get_parameter_types().map_err(Error::from_datafusion)?;
        let params = ordered_placeholders(found)?;
        Ok((Arc::new(plan.schema().as_arrow().clone()), params))
    }

    /// Plans a caller's SQL into a physical plan, from the plan cache when the same
    /// normalized query was planned under the same configuration for the same caller.
    /// Table names are checked against the canonical datasets first, so an unknown
    /// name is reported with the names that exist. A cached plan comes back as a copy
    /// with fresh execution state.
    async fn plan(
        &self,
        origin: &Principal,
        sql: &str,
        opts: &QueryOptions,
    ) -> Result<(Arc<dyn ExecutionPlan>, PlanFrom)> {
        let state = self.session(opts.pushdown);
        // The key holds everything that changes the plan: the query, the
        // configuration, the caller (whose access scope the plan is made for) and the
        // planner options. The text as received is looked up first, which spares
        // parsing a query repeated verbatim; then the query as parsed and printed, so
        // that spacing and letter case of keywords do not matter.
        // A plan with bound values is made for those values: they are part of the key.
        let bound = opts.params.as_ref().map(params_key);
        let keyed = |text: String| match &bound {
            Some(b) => format!("{text}\u{0}{b}"),
            None => text,
        };
        let exact = PlanKey {
            sql: keyed(sql.to_string()),
            exact: true,
            version: self.config.version.clone(),
            scope: origin.uri(),
            pushdown: opts.pushdown,
        };
        let cache = opts.plan_cache;
        if cache && let Some(p) = self.plans.get(&exact).await {
            return Ok((p.plan, PlanFrom::Cache));
        }
        let mut phases = crate::owner::session::Phases::start();
        let (stmt, rewritten) = self.parse(state, sql)?;
        let sql = rewritten.as_deref().unwrap_or(sql);
        let key = PlanKey {
            sql: keyed(stmt.to_string()),
            exact: false,
            ..exact.clone()
        };
        if cache && let Some(p) = self.plans.get(&key).await {
            self.plans.insert(exact, p.clone()).await;
            return Ok((p.plan, PlanFrom::Cache));
        }
        // A cached plan passed these checks when it was made.
        self.datasets_in(state, &stmt)?;
        phases.mark("parse");
        let (logical, mut from) = self.written(state, stmt, opts, &key, &mut phases).await?;
        phases.mark("written");
        // A plan that reads the clock is this query's alone: optimized with this
        // query's start time (a planning session keeps the time it was made at) and
        // never cached. A shape's optimized plan never reads it.
        let clock =
            matches!(&logical, Logical::Written(w) if crate::owner::session::reads_the_clock(w));
        let now;
        let state = if clock {
            let mut fresh = state.clone();
            fresh.mark_start_execution();
            now = fresh;
            &now
        } else {
            state
        };
        let (written, plan, mut kept, values) = match logical {
            Logical::Written(written) => {
                let plan = state.optimize(&written).map_err(Error::from_datafusion)?;
                (written, plan, None, None)
            }
            Logical::Optimized {
                written,
                optimized,
                kept,
                values,
            } => (written, optimized, kept, Some(values)),
        };
        phases.mark("optimize");
        // A whole query goes to its member as the text written, which for a published
        // service holds the `$name` placeholders, not the values: a member has no way
        // to be given them, and a value must never become SQL text by splicing. Such
        // a query goes as the per-dataset sub-queries unparsed from the bound plan.
        let whole = |plan: &datafusion::logical_expr::LogicalPlan| match opts.pushdown
            && opts.params.is_none()
        {
            true => pushdown::push_whole_query(state, &written, plan, sql)
                .map_err(Error::from_datafusion),
            false => Ok(None),
        };
        let plan = match whole(&plan)? {
            Some(whole) => whole,
            None => match (pushdown::write_member_sql(plan), values) {
                (Ok(plan), _) => plan,
                // Every value a shape binds can be written (the test
                // `every_value_a_shape_binds_can_be_written_into_member_sql`). Were
                // one not, the query is planned from its written plan with its values,
                // as it would be without shapes: the pushdown rule then leaves in the
                // coordinator what it cannot write.
                (Err(_), Some(values)) => {
                    kept = None;
                    from = PlanFrom::Shape;
                    let bound = written
                        .clone()
                        .with_param_values(values)
                        .map_err(|e| Error::InvalidQuery(format!("binding parameters: {e}")))?;
                    let plan = state.optimize(&bound).map_err(Error::from_datafusion)?;
                    whole(&plan)?.unwrap_or(plan)
                }
                (Err(e), None) => return Err(Error::from_datafusion(e)),
            },
        };
        phases.mark("whole");
        let physical = match kept.as_ref().and_then(|k| k.reuse(state, &plan)) {
            Some(physical) => {
                from = PlanFrom::ShapeReused;
                phases.mark("reused");
                physical
            }
            None => {
                let physical = state
                    .query_planner()
                    .create_physical_plan(&plan, state)
                    .await
                    .map_err(Error::from_datafusion)?;
                if let Some(k) = &kept {
                    k.keep(state, &plan, &physical);
                }
                phases.mark("physical");
                physical
            }
        };
        phases.report("coordinator", from.word());
        if cache && !clock {
            let cached = CachedPlan {
                plan: physical.clone(),
                bytes: crate::owner::session::logical_plan_bytes(&plan)
                    + crate::owner::session::physical_plan_bytes(physical.as_ref(), |node| {
                        let any: &dyn std::any::Any = node;
                        any.downcast_ref::<table::FederatedScanExec>()
                            .map_or(0, |s| s.member_sql().len())
                    }),
            };
            self.plans.insert(key, cached.clone()).await;
            self.plans.insert(exact, cached).await;
        }
        Ok((physical, from))
    }

    /// The logical plan of `stmt` with every value bound, and where it came from
    /// ([`crate::owner::shape`]): a query that differs from an earlier one only in the
    /// constants of its filters, or a prepared statement run with new values, is
    /// bound, not planned from its text again: into the shape's optimized plan when
    /// it can be ([`Shape::optimized`]; for a prepared statement only when every
    /// placeholder is only compared, see [`Takes`]), else into its written plan, which
    /// the caller then optimizes. Either way every decision that depends on a value
    /// (members pruned, sub-queries pushed) is made with the value.
    async fn written(
        &self,
        state: &SessionState,
        stmt: datafusion::sql::parser::Statement,
        opts: &QueryOptions,
        key: &PlanKey,
        phases: &mut crate::owner::session::Phases,
    ) -> Result<(Logical, PlanFrom)> {
        use crate::owner::session::plan_query;
        use crate::owner::shape;
        // Bound values replace the placeholders as typed literals before anything is
        // optimized or unparsed into member SQL, so a value is never SQL text.
        let bind = |plan: datafusion::logical_expr::LogicalPlan,
                    values: &datafusion::common::ParamValues| {
            plan.with_param_values(values.clone())
                .map_err(|e| Error::InvalidQuery(format!("binding parameters: {e}")))
        };
        if let Some(values) = &opts.params {
            // A prepared statement is its own shape: its text without the values.
            let shape_key = PlanKey {
                sql: format!("prepared\u{0}{stmt}"),
                ..key.clone()
            };
            if opts.plan_cache
                && let Some(Some(known)) = self.shapes.get(&shape_key).await.as_deref()
            {
                if let Some(optimized) = known.optimized(state, values).await {
                    let written = known.planned.plan.clone();
                    return Ok((
                        Logical::Optimized {
                            written,
                            optimized,
                            kept: Some(known.kept.clone()),
                            values: values.clone(),
                        },
                        PlanFrom::ShapeOptimized,
                    ));
                }
                let plan = bind(known.planned.plan.clone(), values)?;
                return Ok((Logical::Written(plan), PlanFrom::Shape));
            }
            let plan = plan_query(state, stmt.clone()).await?;
            if opts.plan_cache {
                // Typed by the caller's values when bound, not by constants.
                let shape = Shape::prepared(plan.clone(), &stmt);
                self.shapes.insert(shape_key, Arc::new(Some(shape))).await;
            }
            return Ok((Logical::Written(bind(plan, values)?), PlanFrom::Text));
        }
        if opts.plan_cache
            && let Some(shaped) = shape::shape(&stmt)
        {
            let shape_key = PlanKey {
                sql: format!("shape\u{0}{}", shaped.key()),
                ..key.clone()
            };
            let (entry, known) = match self.shapes.get(&shape_key).await {
                Some(entry) => (entry, true),
                None => {
                    // A shape the planner cannot type is remembered as such, and
                    // queries of that shape are planned as written.
                    let planned = plan_query(state, shaped.statement.clone())
                        .await
                        .ok()
                        .and_then(|p| shape::Planned::new(p, shaped.literals.len()));
                    let entry = Arc::new(planned.map(Shape::new));
                    self.shapes.insert(shape_key, entry.clone()).await;
                    (entry, false)
                }
            };
            // Lifting the constants and finding the shape; binding is the next phase.
            phases.mark("shape");
            if let Some(shape) = entry.as_ref().as_ref()
                && let Some(values) = shape.planned.values(&shaped.literals)
            {
                // The first query of a shape is optimized as written, as it would be
                // without shapes; the optimizer runs over the shape itself only when
                // a second one comes.
                if known && let Some(optimized) = shape.optimized(state, &values).await {
                    let written = shape.planned.plan.clone();
                    return Ok((
                        Logical::Optimized {
                            written,
                            optimized,
                            kept: Some(shape.kept.clone()),
                            values,
                        },
                        PlanFrom::ShapeOptimized,
                    ));
                }
                if let Ok(plan) = shape.planned.plan.clone().with_param_values(values) {
                    let from = if known {
                        PlanFrom::Shape
                    } else {
                        PlanFrom::Text
                    };
                    return Ok((Logical::Written(plan), from));
                }
            }
        }
        Ok((
            Logical::Written(plan_query(state, stmt).await?),
            PlanFrom::Text,
        ))
    }

    fn new_state(
        &self,
        query_id: String,
        origin: Principal,
        opts: &QueryOptions,
    ) -> Arc<QueryState> {
        let member_budget = opts.timeout.saturating_sub(merge_reserve(opts.timeout));
        let mut state = QueryState::new(
            query_id,
            origin,
            self.config.member.principal.clone(),
            member_budget,
            opts.allow_partial,
            self.config
                .region
                .members
                .iter()
                .map(|m| m.name.clone())
                .collect(),
        );
        state.purpose = opts.purpose.clone();
        state.assertion = opts.assertion.clone();
        state.incident = opts.incident.clone();
        state.receipt = opts.receipt;
        state.span = opts.span.clone();
        Arc::new(state)
    }

    /// What `origin`, stating `purpose`, may do with each dataset at each member that
    /// serves it. Each member answers for itself (its rules are in its own file); a
    /// member that cannot be reached is listed as `unknown` with the reason.
    pub async fn describe_access(
        &self,
        origin: &Principal,
        purpose: Option<&str>,
    ) -> Vec<DatasetAccess> {
        let region = &self.config.region;
        let asks = region
            .members
            .iter()
            .filter(|m| !m.serves.is_empty())
            .filter_map(|m| self.clients.get(&m.name).map(|c| (m, c)))
            .map(|(m, c)| async move {
                let answer = match c {
                    MemberClient::Local { engine, .. } => {
                        Ok(engine.describe_access(origin, purpose))
                    }
                    MemberClient::Remote {
                        client, endpoint, ..
                    } => {
                        let mut req = tonic::Request::new(CatalogRequest {
                            origin: origin.uri(),
                            purpose: purpose.unwrap_or_default().to_string(),
                        });
                        req.set_timeout(Duration::from_secs(5));
                        client
                            .clone()
                            .catalog(req)
                            .await
                            .map(|r| r.into_inner().access)
                            .map_err(|s| format!("{endpoint}: {}", s.message()))
                    }
                };
                answer.unwrap_or_else(|why| {
                    m.serves
                        .iter()
                        .map(|d| DatasetAccess {
                            member: m.name.clone(),
                            dataset: d.clone(),
                            level: "unknown".into(),
                            reason: format!("the member did not answer: {why}"),
                            ..DatasetAccess::default()
                        })
                        .collect()
                })
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Delivers a signed incident declaration to every member gateway of the region
    /// (this gateway's own data in process). Each member decides for itself whether to
    /// keep it; a member that does not answer is listed as unreachable, with why.
    pub async fn declare(&self, declaration: &[u8]) -> Vec<crate::proto::v1::DeclareOutcome> {
        use crate::proto::v1::{DeclareOutcome, DeclareRequest};
        let region = &self.config.region;
        let asks = region
            .members
            .iter()
            .filter_map(|m| self.clients.get(&m.name).map(|c| (m, c)))
            .map(|(m, c)| async move {
                let outcome = match c {
                    MemberClient::Local {
                        engine,
                        me,
                        audit,
                        register,
                        tls,
                        ..
                    } => crate::owner::incidents::deliver(
                        register,
                        tls,
                        &engine.config().access,
                        audit,
                        me,
                        declaration,
                    )
                    .map_err(|e| ("not_accepted", e.to_string())),
                    MemberClient::Remote {
                        client, endpoint, ..
                    } => {
                        let mut req = tonic::Request::new(DeclareRequest {
                            declaration: declaration.to_vec(),
                        });
                        req.set_timeout(Duration::from_secs(10));
                        client
                            .clone()
                            .declare(req)
                            .await
                            .map(|r| r.into_inner().outcome)
                            .map_err(|s| match s.code() {
                                tonic::Code::PermissionDenied => {
                                    ("not_accepted", s.message().to_string())
                                }
                                _ => ("unreachable", format!("{endpoint}: {}", s.message())),
                            })
                    }
                };
                let (state, reason) = match outcome {
                    Ok(r) => ("kept", r),
                    Err((state, r)) => (state, r),
                };
                DeclareOutcome {
                    member: m.name.clone(),
                    state: state.into(),
                    reason,
                }
            });
        futures::future::join_all(asks).await
    }

    /// A task context for one query ([`crate::owner::session::query_task`]): the
    /// session's configuration with a memory pool of its own, so one query's merge
    /// cannot take the memory of others (`limits.query_memory_bytes`). A query that
    /// needs more fails with a clear error. Spilling is off: members' rows are never
    /// written to the coordinator's disk.
    fn task_for_query(&self, session: usize) -> Result<Arc<datafusion::execution::TaskContext>> {
        crate::owner::session::query_task(
            &self.sessions[session],
            self.config.limits.query_memory_bytes as usize,
        )
    }

    /// Plans `sql` for `origin` and returns the running query.
    pub async fn query(
        &self,
        origin: Principal,
        sql: &str,
        opts: QueryOptions,
    ) -> Result<RunningQuery> {
        let state = self.new_state(uuid::Uuid::new_v4().to_string(), origin.clone(), &opts);
        let started = std::time::Instant::now();
        let (physical, from) = self.plan(&origin, sql, &opts).await?;
        // Plans (cached or not) are never run themselves, only bound copies.
        let physical = bind(physical, &state)?;
        let planning = started.elapsed();
        let task = self.task_for_query(usize::from(!opts.pushdown))?;
        let stream = datafusion::physical_plan::execute_stream(physical, task)
            .map_err(Error::from_datafusion)?;
        Ok(RunningQuery {
            schema: stream.schema(),
            stream,
            state,
            plan_cached: from == PlanFrom::Cache,
            plan_bound: matches!(
                from,
                PlanFrom::Shape | PlanFrom::ShapeOptimized | PlanFrom::ShapeReused
            ),
            plan_bound_optimized: matches!(from, PlanFrom::ShapeOptimized | PlanFrom::ShapeReused),
            plan_reused: from == PlanFrom::ShapeReused,
            planning,
        })
    }

    /// The circuit breaker state of each remote member (`closed`, `open`,
    /// `probing`) and `local` for this gateway's own data.
    pub fn breaker_states(&self) -> std::collections::BTreeMap<String, &'static str> {
        self.clients
            .iter()
            .map(|(name, c)| {
                let state = match c.health() {
                    Some(h) => h.breaker.state_word(),
                    None => "local",
                };
                (name.clone(), state)
            })
            .collect()
    }

    /// The schema `sql`'s answer will have for `origin`, without running it. The
    /// plan is cached, so running the same text next does not plan it again.
    pub async fn schema_of(
        &self,
        origin: Principal,
        sql: &str,
        params: Option<datafusion::common::ParamValues>,
    ) -> Result<datafusion::arrow::datatypes::SchemaRef> {
        let opts = QueryOptions {
            params,
            ..QueryOptions::default()
        };
        let (plan, _) = self.plan(&origin, sql, &opts).await?;
        Ok(plan.schema())
    }

    /// Checks a published service against the canonical datasets: its SQL plans, and
    /// its placeholders are exactly its declared parameters, with the declared types
    /// wherever the planner can infer one.
    pub async fn check_service(&self, service: &crate::config::Service) -> Result<()> {
        let state = self.session(true);
        let stmt = crate::owner::session::parse_query(state, &service.sql)?;
        let plan = crate::owner::session::plan_query(state, stmt).await?;
        let found = plan.get_parameter_types().map_err(Error::from_datafusion)?;
        let mut problems = Vec::new();
        for (name, inferred) in &found {
            let bare = name.trim_start_matches('$');
            match service.params.iter().find(|p| p.name == bare) {
                None => problems.push(format!("placeholder {name} is not a declared parameter")),
                Some(p) => {
                    if let Some(t) = inferred
                        && *t != p.data_type
                    {
                        problems.push(format!(
                            "parameter {bare} is declared {} but used where {t} is expected",
                            p.type_name
                        ));
                    }
                }
            }
        }
        for p in &service.params {
            if !found.contains_key(&format!("${}", p.name)) {
                problems.push(format!(
                    "parameter {} is declared but the SQL has no ${} placeholder",
                    p.name, p.name
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "service {}: {}",
                service.name,
                problems.join("; ")
            )))
        }
    }

    /// The physical plan of `sql` as text, with the SQL each member would receive.
    pub async fn explain(
        &self,
        origin: Principal,
        sql: &str,
        purpose: Option<String>,
        assertion: Option<Arc<Vec<u8>>>,
    ) -> Result<Explained> {
        let opts = QueryOptions::default();
        let (plan, _) = self.plan(&origin, sql, &opts).await?;
        let mut subqueries = Vec::new();
        collect_scans(plan.as_ref(), &mut subqueries);
        // Each member explains its own sub-queries under its own rules, in parallel.
        // One id for the whole explanation: an owner binds an assertion to the first
        // query id it sees, and a join may send it several scans.
        let query_id = format!("explain-{}", uuid::Uuid::new_v4());
        let asks = subqueries.iter().flat_map(|(_, members, sql)| {
            members.iter().filter_map(|m| {
                let client = self.clients.get(m)?;
                let q = client::SubQuery {
                    sql: sql.clone(),
                    origin: origin.clone(),
                    query_id: query_id.clone(),
                    budget: self.config.limits.default_timeout,
                    path: vec![self.config.member.principal.uri()],
                    received: Default::default(),
                    purpose: purpose.clone(),
                    assertion: assertion.clone(),
                    incident: None,
                    receipt: false,
                    note: Default::default(),
                    span: tracing::Span::current(),
                };
                Some(async move { (m.clone(), client.explain(q).await) })
            })
        });
        let database_statements = futures::future::join_all(asks).await;
        Ok(Explained {
            plan: datafusion::physical_plan::displayable(plan.as_ref())
                .indent(true)
                .to_string(),
            subqueries,
            database_statements,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(sql: &str) -> Result<String> {
        let state = crate::owner::session::member_context().state();
        let stmt = crate::owner::session::parse_query(&state, sql)?;
        let datafusion::sql::parser::Statement::Statement(mut inner) = stmt else {
            panic!("not a statement: {sql}");
        };
        number_question_marks(inner.as_mut())?;
        Ok(inner.to_string())
    }

    /// `?` placeholders are numbered in the order of the text, whatever order the
    /// statement's parts are visited in; a `?` inside a text literal is text.
    #[test]
    fn question_marks_are_numbered_in_text_order() {
        let out = numbered(
            "SELECT a, ? AS k FROM t WHERE b = ? AND c IN (?, '?') \
             GROUP BY a HAVING count(*) > ? ORDER BY a LIMIT ?",
        )
        .unwrap();
        assert_eq!(
            out,
            "SELECT a, $1 AS k FROM t WHERE b = $2 AND c IN ($3, '?') \
             GROUP BY a HAVING count(*) > $4 ORDER BY a LIMIT $5"
        );
        // Already numbered, or no placeholders: unchanged.
        assert_eq!(
            numbered("SELECT a FROM t WHERE b = $2 AND c = $1").unwrap(),
            "SELECT a FROM t WHERE b = $2 AND c = $1"
        );
        let e = numbered("SELECT a FROM t WHERE b = ? AND c = $1").unwrap_err();
        assert!(e.to_string().contains("either ? or $1"), "{e}");
    }
}
