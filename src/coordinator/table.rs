//! Canonical datasets as DataFusion tables at the coordinator.
//!
//! A [`FederatedTable`] is one canonical dataset. DataFusion plans a query against it
//! and hands [`FederatedTable::scan`] the projection, the filters and the limit; the
//! scan turns them into one canonical SQL sub-query, drops the members the filters on
//! `member` exclude, and returns a [`FederatedScanExec`] with one partition per member
//! (a union of member scans that DataFusion runs concurrently).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::FutureExt;

use super::client::{MemberClient, SubQuery};
use super::results::{CachePolicy, Flight, ResultCache, ResultKey};
use super::state::QueryState;
use crate::config::{Dataset, MEMBER_COLUMN, quote_ident};
use crate::coordinator::scan::Phase;
use crate::coordinator::scan::ScanCache;
use crate::coordinator::scan::ScanStream;
use crate::coordinator::scan::Tee;

/// A canonical dataset served by the members listed in the region file.
#[derive(Debug)]
pub struct FederatedTable {
    dataset: Dataset,
    /// Members that serve the dataset, in region order.
    servers: Vec<String>,
    clients: Arc<HashMap<String, MemberClient>>,
    /// The coordinator's cache of member answers (`None` when disabled).
    results: Option<Arc<ResultCache>>,
}

impl fmt::Debug for MemberClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemberClient({})", self.name())
    }
}

impl FederatedTable {
    /// A table for `dataset` served by `servers`.
    pub fn new(
        dataset: Dataset,
        servers: Vec<String>,
        clients: Arc<HashMap<String, MemberClient>>,
        results: Option<Arc<ResultCache>>,
    ) -> Self {
        FederatedTable {
            dataset,
            servers,
            clients,
            results,
        }
    }
}

/// Removes table qualifiers: member sub-queries name the dataset itself, whatever
/// alias the caller's query gave it.
fn unqualify(e: &Expr) -> DfResult<Expr> {
    e.clone()
        .transform(|e| {
            Ok(match e {
                Expr::Column(c) if c.relation.is_some() => {
                    Transformed::yes(Expr::Column(Column::new_unqualified(c.name)))
                }
                other => Transformed::no(other),
            })
        })
        .map(|t| t.data)
}

fn to_sql(e: &Expr) -> DfResult<String> {
    let e = unqualify(e)?;
    Ok(super::unparse::unparser().expr_to_sql(&e)?.to_string())
}

/// True when `e` references only the `member` column.
fn only_member(e: &Expr) -> bool {
    let mut cols = 0;
    let mut other = false;
    let _ = e.apply(|n| {
        if let Expr::Column(c) = n {
            cols += 1;
            other |= c.name != MEMBER_COLUMN;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    cols > 0 && !other
}

/// The members of `members` that the filters mentioning only `member` keep, in the
/// order given: a filter that is false or NULL for a member's name excludes it
/// without asking it. Each filter is made into a physical expression once and
/// evaluated over the names still kept, so every (member, filter) pair is evaluated
/// exactly when it would be by trying the filters member by member.
pub(crate) fn kept<'a>(
    state: &dyn Session,
    filters: &[Expr],
    members: &'a [String],
) -> DfResult<Vec<&'a String>> {
    let mut kept: Vec<&String> = members.iter().collect();
    let mut member_filters = filters.iter().filter(|f| only_member(f)).peekable();
    if member_filters.peek().is_none() {
        return Ok(kept);
    }
    let schema = Arc::new(Schema::new(vec![Field::new(
        MEMBER_COLUMN,
        DataType::Utf8,
        false,
    )]));
    let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
    for f in member_filters {
        if kept.is_empty() {
            break;
        }
        let names = StringArray::from_iter_values(kept.iter().map(|m| m.as_str()));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(names)])?;
        let pe = state.create_physical_expr(unqualify(f)?, &df_schema)?;
        let v = pe.evaluate(&batch)?.into_array(kept.len())?;
        // A filter that does not evaluate to booleans keeps every member.
        if let Some(b) = v
            .as_any()
            .downcast_ref::<datafusion::arrow::array::BooleanArray>()
        {
            let mut i = 0;
            kept.retain(|_| {
                let keep = b.is_valid(i) && b.value(i);
                i += 1;
                keep
            });
        }
    }
    Ok(kept)
}

#[async_trait]
impl TableProvider for FederatedTable {
    fn schema(&self) -> SchemaRef {
        self.dataset.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // A filter the unparser can write as SQL is evaluated exactly by every
        // member (they run the same engine); anything else stays at the coordinator.
        Ok(filters
            .iter()
            .map(|f| match to_sql(f) {
                Ok(_) => TableProviderFilterPushDown::Exact,
                Err(_) => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let full = &self.dataset.schema;
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..full.fields().len()).collect(),
        };
        let schema = Arc::new(full.project(&indices)?);
        let sql = self.scan_sql(projection, filters, limit)?;
        self.member_exec(state, filters, schema, sql, None)
    }
}

impl FederatedTable {
    /// The SQL a scan of this dataset sends each member for `projection`, `filters`
    /// and `limit` ([`TableProvider::scan`]'s; the coordinator's kept plans write a
    /// later query's with it).
    pub fn scan_sql(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<String> {
        let full = &self.dataset.schema;
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..full.fields().len()).collect(),
        };
        // With no columns wanted (count(*)), ask for `member` and keep only the row count.
        let cols: Vec<String> = if indices.is_empty() {
            vec![MEMBER_COLUMN.to_string()]
        } else {
            indices
                .iter()
                .map(|&i| quote_ident(full.field(i).name()))
                .collect()
        };
        let mut sql = format!(
            "SELECT {} FROM {}",
            cols.join(", "),
            quote_ident(&self.dataset.name)
        );
        let conds: Vec<String> = filters.iter().map(to_sql).collect::<DfResult<_>>()?;
        if !conds.is_empty() {
            let parts: Vec<String> = conds.iter().map(|c| format!("({c})")).collect();
            sql.push_str(&format!(" WHERE {}", parts.join(" AND ")));
        }
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        Ok(sql)
    }

    /// The canonical dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// A scan of this dataset's members that sends each the same `sql`, whose
    /// answer has `schema` once `projection` (of the answer's columns) is applied.
    /// Members that `filters` on `member` exclude are pruned and recorded as such.
    pub fn member_exec(
        &self,
        state: &dyn Session,
        filters: &[Expr],
        schema: SchemaRef,
        sql: String,
        projection: Option<Vec<usize>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.member_exec_for(
            state,
            filters,
            schema,
            sql,
            projection,
            None,
            self.dataset.cache,
        )
    }

    /// The members that serve this dataset and that `filters` on `member` keep.
    pub fn targets(&self, state: &dyn Session, filters: &[Expr]) -> DfResult<Vec<String>> {
        Ok(kept(state, filters, &self.servers)?
            .into_iter()
            .cloned()
            .collect())
    }

    /// Like [`FederatedTable::member_exec`]; with `whole`, the sub-query is a whole
    /// query (named by that label in the summary) sent to one member only. Answers
    /// are cached under `cache` when the coordinator keeps a cache.
    #[allow(clippy::too_many_arguments)]
    pub fn member_exec_for(
        &self,
        state: &dyn Session,
        filters: &[Expr],
        schema: SchemaRef,
        sql: String,
        projection: Option<Vec<usize>>,
        whole: Option<(&str, &str)>,
        cache: Option<CachePolicy>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let label = whole
            .map(|(_, l)| l)
            .unwrap_or(&self.dataset.name)
            .to_string();
        // A whole query names its one member; the others are not asked.
        let candidates: Vec<String> = match whole {
            Some((only, _)) => self
                .servers
                .iter()
                .filter(|m| *m == only)
                .cloned()
                .collect(),
            None => self.servers.clone(),
        };
        let keep = kept(state, filters, &candidates)?;
        let mut targets = Vec::new();
        let mut pruned = Vec::new();
        for m in &self.servers {
            if !candidates.contains(m) {
                pruned.push((m.clone(), label.clone()));
                continue;
            }
            if !keep.contains(&m) {
                pruned.push((m.clone(), self.dataset.name.clone()));
                continue;
            }
            let client =
                self.clients.get(m).cloned().ok_or_else(|| {
                    DataFusionError::Internal(format!("no client for member {m}"))
                })?;
            targets.push(client);
        }
        let cache = cache.zip(self.results.clone());
        Ok(Arc::new(FederatedScanExec::new(
            label, schema, sql, targets, pruned, projection, cache,
        )))
    }
}

/// Scans one canonical dataset at several members, one partition per member.
///
/// As planned (and cached), the node holds nothing of a particular query; each run
/// uses a copy bound to that query's [`QueryState`] ([`FederatedScanExec::bind`]), so a
/// plan can be cached and run again, also concurrently, for identical queries.
pub struct FederatedScanExec {
    dataset: String,
    schema: SchemaRef,
    sql: String,
    targets: Vec<MemberClient>,
    /// Members not asked (member, dataset label), for the summary.
    pruned: Vec<(String, String)>,
    /// The query this copy runs for (`None` in a plan as planned).
    state: Option<Arc<QueryState>>,
    properties: Arc<PlanProperties>,
    /// Columns of the members' answers to keep (all when `None`).
    projection: Option<Vec<usize>>,
    /// Whether and how long members' answers are reused, and where they are kept.
    cache: Option<(CachePolicy, Arc<ResultCache>)>,
}

impl FederatedScanExec {
    fn new(
        dataset: String,
        schema: SchemaRef,
        sql: String,
        targets: Vec<MemberClient>,
        pruned: Vec<(String, String)>,
        projection: Option<Vec<usize>>,
        cache: Option<(CachePolicy, Arc<ResultCache>)>,
    ) -> Self {
        let partitions = targets.len().max(1);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        FederatedScanExec {
            dataset,
            schema,
            sql,
            targets,
            pruned,
            state: None,
            properties,
            projection,
            cache,
        }
    }

    /// A copy that runs for query `qs`, after recording in it which members this
    /// scan asks and which it prunes.
    pub fn bind(&self, qs: Arc<QueryState>) -> FederatedScanExec {
        for (m, d) in &self.pruned {
            qs.pruned(m, d);
        }
        for t in &self.targets {
            qs.asked(t.name(), &self.dataset);
        }
        FederatedScanExec {
            dataset: self.dataset.clone(),
            schema: self.schema.clone(),
            sql: self.sql.clone(),
            targets: self.targets.clone(),
            pruned: self.pruned.clone(),
            state: Some(qs),
            properties: self.properties.clone(),
            projection: self.projection.clone(),
            cache: self.cache.clone(),
        }
    }

    /// This scan sending `sql` instead of its own text (a shape's kept plan run for
    /// another query of the shape: [`super::pushdown::KeptPlans`]).
    pub(crate) fn with_sql(&self, sql: String) -> FederatedScanExec {
        FederatedScanExec {
            dataset: self.dataset.clone(),
            schema: self.schema.clone(),
            sql,
            targets: self.targets.clone(),
            pruned: self.pruned.clone(),
            state: self.state.clone(),
            properties: self.properties.clone(),
            projection: self.projection.clone(),
            cache: self.cache.clone(),
        }
    }

    /// The dataset scanned.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// The SQL each member receives.
    pub fn member_sql(&self) -> &str {
        &self.sql
    }

    /// The members asked.
    pub fn members(&self) -> Vec<&str> {
        self.targets.iter().map(|t| t.name()).collect()
    }
}

impl fmt::Debug for FederatedScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FederatedScanExec({})", self.dataset)
    }
}

impl DisplayAs for FederatedScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "FederatedScanExec: dataset={}, members=[{}], member_sql={}",
            self.dataset,
            self.members().join(", "),
            self.sql
        )
    }
}

impl ExecutionPlan for FederatedScanExec {
    fn name(&self) -> &str {
        "FederatedScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _ctx: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let state = self.state.clone().ok_or_else(|| {
            DataFusionError::Internal("a federated scan ran without being bound to a query".into())
        })?;
        let Some(target) = self.targets.get(partition).cloned() else {
            // No member to ask (all pruned): an empty partition.
            return Ok(Box::pin(RecordBatchStreamAdapter::new(
                self.schema.clone(),
                futures::stream::empty(),
            )));
        };
        let now = Instant::now();
        let budget = state.member_deadline.saturating_duration_since(now);
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let note = Arc::new(crate::owner::Note::default());
        if state.receipt {
            let _ = note
                .sub_query_sha256
                .set(crate::ops::audit::sql_hash(&self.sql));
        }
        let span = tracing::info_span!(
            parent: &state.span,
            "member_call",
            member = %target.name(),
            dataset = %self.dataset,
        );
        let q = SubQuery {
            span: span.clone(),
            sql: self.sql.clone(),
            origin: state.origin.clone(),
            query_id: state.query_id.clone(),
            budget,
            path: vec![state.coordinator.uri()],
            received: received.clone(),
            purpose: state.purpose.clone(),
            assertion: state.assertion.clone(),
            incident: state.incident.clone(),
            receipt: state.receipt,
            note: note.clone(),
        };
        let member = target.name().to_string();
        let health = target.health().cloned();
        tracing::debug!(query_id = %state.query_id, %member, dataset = %self.dataset, sql = %self.sql, "Member scan");
        let connect = async move { target.run(q).await }
            .instrument(span.clone())
            .boxed();
        let mut phase = Phase::Connecting(connect);
        let mut cache = None;
        // Answers are kept and reused only for this gateway's own identity: a member
        // answers any other origin on the strength of that query's assertion, which is
        // good for one query and must not stand behind a later one. Nor under an
        // incident: what it opened must not be served after it ends. Nor with a
        // receipt asked for: a cached answer has no member's statement of this query.
        if let Some((policy, results)) = self.cache.as_ref().filter(|_| {
            state.origin == state.coordinator && state.incident.is_none() && !state.receipt
        }) {
            let key = ResultKey {
                member: member.clone(),
                sql: self.sql.clone(),
                origin: state.origin.uri(),
                purpose: state.purpose.clone(),
            };
            let mut tee = None;
            if !results.get(&key).is_some_and(|h| h.is_fresh(now)) {
                match results.flight(&key) {
                    Flight::Lead(guard) => {
                        tee = Some(Tee {
                            batches: Vec::new(),
                            bytes: 0,
                            _guard: guard,
                        })
                    }
                    Flight::Follow(mut rx) => {
                        let Phase::Connecting(connect) = phase else {
                            unreachable!("the phase was set just above")
                        };
                        phase = Phase::Waiting(
                            async move {
                                // Woken when the leader is done, whether it stored an
                                // answer or failed.
                                let _ = rx.wait_for(|done| *done).await;
                            }
                            .boxed(),
                            Some(connect),
                        );
                    }
                }
            }
            cache = Some(ScanCache {
                policy: *policy,
                results: results.clone(),
                key,
                tee,
            });
        }
        let mut stream = ScanStream {
            phase,
            deadline: Box::pin(tokio::time::sleep_until(state.member_deadline.into())),
            member,
            dataset: self.dataset.clone(),
            state: state.clone(),
            schema: self.schema.clone(),
            projection: self.projection.clone(),
            received,
            note,
            health,
            cache,
            rows: 0,
            started: now,
            _span: span,
        };
        if let Some(hit) = stream.fresh_hit(now) {
            stream.start_replay(hit, now, None);
        }
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}
