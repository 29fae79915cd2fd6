//! Canonical datasets as DataFusion tables at the coordinator.
//!
//! A [`FederatedTable`] is one canonical dataset. DataFusion plans a query against it
//! and hands [`FederatedTable::scan`] the projection, the filters and the limit; the
//! scan turns them into one canonical SQL sub-query, drops the members the filters on
//! `member` exclude, and returns a [`FederatedScanExec`] with one partition per member
//! (a union of member scans that DataFusion runs concurrently).

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing::Instrument;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, RecordBatchOptions, StringArray};
use datafusion::arrow::compute::cast;
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
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};

use super::client::{MemberClient, MemberStream, SubQuery};
use super::results::{CachePolicy, CachedAnswer, Flight, LeaderGuard, ResultCache, ResultKey};
use super::state::QueryState;
use crate::config::{Dataset, MEMBER_COLUMN, quote_ident};
use crate::error::{Error, MemberFailure, Result};

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
        self.member_exec(state, filters, schema, sql, None)
    }
}

impl FederatedTable {
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
        // good for one query and must not stand behind a later one.
        if let Some((policy, results)) = self
            .cache
            .as_ref()
            .filter(|_| state.origin == state.coordinator)
        {
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

enum Phase {
    /// An identical sub-query is in flight: wait for it, then use its answer from
    /// the cache, or ask the member (the future kept here) if it stored none.
    Waiting(
        BoxFuture<'static, ()>,
        Option<BoxFuture<'static, Result<MemberStream>>>,
    ),
    Connecting(BoxFuture<'static, Result<MemberStream>>),
    Streaming(MemberStream),
    /// Serving a cached answer: fresh, or stale in place of the member's failure.
    Replay {
        batches: std::vec::IntoIter<RecordBatch>,
        age: Duration,
        failure: Option<Error>,
    },
    Done,
}

/// A scan's use of the coordinator's result cache.
struct ScanCache {
    policy: CachePolicy,
    results: Arc<ResultCache>,
    key: ResultKey,
    /// The answer being collected for the cache, while this scan leads its key.
    tee: Option<Tee>,
}

struct Tee {
    batches: Vec<RecordBatch>,
    bytes: u64,
    /// Released (waking identical sub-queries) when the answer is stored or given
    /// up on.
    _guard: LeaderGuard,
}

/// One member's part of a scan: records the member's outcome in the query state,
/// enforces the member deadline, and shapes batches to the expected schema.
struct ScanStream {
    phase: Phase,
    deadline: Pin<Box<tokio::time::Sleep>>,
    member: String,
    dataset: String,
    state: Arc<QueryState>,
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    received: Arc<std::sync::atomic::AtomicU64>,
    note: Arc<crate::owner::Note>,
    /// A remote member's breaker, told when the member runs out of its budget.
    health: Option<Arc<crate::coordinator::breaker::MemberHealth>>,
    /// The result cache, for datasets whose answers may be reused.
    cache: Option<ScanCache>,
    rows: u64,
    started: Instant,
    /// The member call's span, open for as long as the scan runs.
    _span: tracing::Span,
}

impl ScanStream {
    /// A cached answer fresh enough to serve without asking the member.
    fn fresh_hit(&self, now: Instant) -> Option<Arc<CachedAnswer>> {
        let c = self.cache.as_ref()?;
        c.results.get(&c.key).filter(|h| h.is_fresh(now))
    }

    /// Serves `hit` from now on; `failure` is the member's failure it stands in for.
    fn start_replay(&mut self, hit: Arc<CachedAnswer>, now: Instant, failure: Option<Error>) {
        if let Some(c) = &mut self.cache {
            c.tee = None;
        }
        self.note.set_access(hit.access.clone());
        if let Some(h) = &hit.audit_hash {
            let _ = self.note.audit_hash.set(h.clone());
        }
        self.phase = Phase::Replay {
            batches: hit.batches.clone().into_iter(),
            age: hit.age(now),
            failure,
        };
    }

    /// The next batch of a cached answer, or its end (recorded in the summary).
    fn replay_next(&mut self) -> Poll<Option<DfResult<RecordBatch>>> {
        let Phase::Replay { batches, .. } = &mut self.phase else {
            return Poll::Ready(None);
        };
        match batches.next() {
            Some(b) => match self.shape(b) {
                Ok(b) => {
                    self.rows += b.num_rows() as u64;
                    Poll::Ready(Some(Ok(b)))
                }
                // No second stand-in for a cached answer that does not fit.
                Err(e) => self.give_up(e),
            },
            None => {
                self.finish_replay();
                Poll::Ready(None)
            }
        }
    }

    fn finish_replay(&mut self) {
        if let Phase::Replay { age, failure, .. } = std::mem::replace(&mut self.phase, Phase::Done)
        {
            self.record_bytes();
            match failure {
                None => self
                    .state
                    .cached(&self.member, &self.dataset, self.rows, age),
                Some(e) => self
                    .state
                    .stale(&self.member, &self.dataset, self.rows, age, &e),
            }
        }
    }

    /// Keeps a copy of a member's batch for the cache, until the answer outgrows
    /// what one entry may hold.
    fn tee(&mut self, b: &RecordBatch) {
        let Some(c) = &mut self.cache else { return };
        let Some(t) = &mut c.tee else { return };
        let size = b.get_array_memory_size() as u64;
        if t.bytes + size > c.results.max_entry_bytes() {
            c.tee = None;
        } else {
            t.bytes += size;
            t.batches.push(b.clone());
        }
    }

    /// Stores a complete answer collected by [`ScanStream::tee`].
    fn store(&mut self) {
        let Some(c) = &mut self.cache else { return };
        let Some(t) = c.tee.take() else { return };
        c.results.insert(
            c.key.clone(),
            CachedAnswer {
                rows: t.batches.iter().map(|b| b.num_rows() as u64).sum(),
                batches: t.batches,
                bytes: t.bytes,
                stored: Instant::now(),
                access: self.note.access(),
                audit_hash: self.note.audit_hash.get().cloned(),
                policy: c.policy,
            },
        );
        // The guard drops here, after the answer is stored.
    }

    /// A cached answer that may stand in for this member's failure `e`: only when
    /// no row of the member's own answer was passed on, and never for a refusal.
    fn stale_for(&mut self, e: &Error) -> Option<Arc<CachedAnswer>> {
        let c = self.cache.as_mut()?;
        c.tee = None;
        let denied = matches!(
            e,
            Error::Member {
                failure: MemberFailure::Denied,
                ..
            }
        );
        if self.rows > 0 || denied {
            return None;
        }
        c.results
            .get(&c.key)
            .filter(|h| h.is_usable_stale(Instant::now()))
    }
}

impl ScanStream {
    /// Moves the byte count and the member's note into the query state (once, when
    /// the scan ends).
    fn record_bytes(&self) {
        let n = self.received.swap(0, std::sync::atomic::Ordering::Relaxed);
        if n > 0 {
            self.state.received(&self.member, &self.dataset, n);
        }
        self.state.noted(&self.member, &self.dataset, &self.note);
    }
}

impl ScanStream {
    /// The member failed: its stale answer stands in if there is one, else the
    /// failure is recorded.
    fn fail(&mut self, e: Error) -> Poll<Option<DfResult<RecordBatch>>> {
        if let Some(hit) = self.stale_for(&e) {
            tracing::warn!(query_id = %self.state.query_id, member = %self.member, error = %e, "Member failed; serving its cached answer");
            self.start_replay(hit, Instant::now(), Some(e));
            return self.replay_next();
        }
        self.give_up(e)
    }

    /// Records the failure and ends this member's part (the query fails unless
    /// partial answers are allowed).
    fn give_up(&mut self, e: Error) -> Poll<Option<DfResult<RecordBatch>>> {
        self.phase = Phase::Done;
        self.record_bytes();
        self.state.failed(
            &self.member,
            &self.dataset,
            &e,
            self.rows,
            self.started.elapsed(),
        );
        tracing::warn!(query_id = %self.state.query_id, member = %self.member, error = %e, "Member did not answer");
        if self.state.allow_partial {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Err(e.into_datafusion())))
        }
    }

    fn timed_out(&mut self) -> Poll<Option<DfResult<RecordBatch>>> {
        let budget = self
            .state
            .member_deadline
            .saturating_duration_since(self.started);
        if let Some(h) = &self.health {
            h.timed_out(Instant::now(), budget);
        }
        let e = Error::Member {
            member: self.member.clone(),
            failure: MemberFailure::TimedOut,
            reason: format!("no complete answer within its budget of {budget:?}"),
        };
        self.fail(e)
    }

    /// Casts a member's batch to the canonical types and drops columns not asked for.
    fn shape(&self, b: RecordBatch) -> Result<RecordBatch> {
        let b = match &self.projection {
            Some(p) if !p.is_empty() => b.project(p).map_err(|e| Error::Member {
                member: self.member.clone(),
                failure: MemberFailure::Failed,
                reason: format!("answer lacks expected columns: {e}"),
            })?,
            _ => b,
        };
        if self.schema.fields().is_empty() {
            let opts = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
            return RecordBatch::try_new_with_options(self.schema.clone(), vec![], &opts)
                .map_err(|e| Error::Internal(e.to_string()));
        }
        if b.schema() == self.schema {
            return Ok(b);
        }
        if b.num_columns() != self.schema.fields().len() {
            return Err(Error::Member {
                member: self.member.clone(),
                failure: MemberFailure::Failed,
                reason: format!(
                    "answered {} columns, expected {}",
                    b.num_columns(),
                    self.schema.fields().len()
                ),
            });
        }
        let cols = b
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(c, f)| cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Member {
                member: self.member.clone(),
                failure: MemberFailure::Failed,
                reason: format!("answer does not fit the canonical schema: {e}"),
            })?;
        RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| Error::Member {
            member: self.member.clone(),
            failure: MemberFailure::Failed,
            reason: format!("answer does not fit the canonical schema: {e}"),
        })
    }
}

impl Stream for ScanStream {
    type Item = DfResult<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Past its budget a member is cancelled, even if its answer is ready now:
        // the time left belongs to the merge.
        if !matches!(this.phase, Phase::Done | Phase::Replay { .. })
            && Instant::now() >= this.state.member_deadline
        {
            return this.timed_out();
        }
        loop {
            match &mut this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Replay { .. } => return this.replay_next(),
                Phase::Waiting(wait, connect) => match wait.poll_unpin(cx) {
                    Poll::Ready(()) => {
                        let connect = connect.take();
                        let now = Instant::now();
                        match (this.fresh_hit(now), connect) {
                            (Some(hit), _) => this.start_replay(hit, now, None),
                            (None, Some(c)) => this.phase = Phase::Connecting(c),
                            (None, None) => {
                                return this.fail(Error::Internal(
                                    "a waiting member scan lost its request".into(),
                                ));
                            }
                        }
                    }
                    Poll::Pending => break,
                },
                Phase::Connecting(f) => match f.poll_unpin(cx) {
                    Poll::Ready(Ok(s)) => this.phase = Phase::Streaming(s),
                    Poll::Ready(Err(e)) => return this.fail(e),
                    Poll::Pending => break,
                },
                Phase::Streaming(s) => match s.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(b))) => {
                        this.tee(&b);
                        match this.shape(b) {
                            Ok(b) => {
                                this.rows += b.num_rows() as u64;
                                return Poll::Ready(Some(Ok(b)));
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return this.fail(e),
                    Poll::Ready(None) => {
                        this.phase = Phase::Done;
                        this.store();
                        this.record_bytes();
                        this.state.answered(
                            &this.member,
                            &this.dataset,
                            this.rows,
                            this.started.elapsed(),
                        );
                        return Poll::Ready(None);
                    }
                    Poll::Pending => break,
                },
            }
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return this.timed_out();
        }
        Poll::Pending
    }
}

impl Drop for ScanStream {
    fn drop(&mut self) {
        // Dropped before the end: the coordinator needed no more rows (a LIMIT was
        // met) or the query ended for another reason. The member was not at fault.
        if matches!(self.phase, Phase::Replay { .. }) {
            self.finish_replay();
        } else if !matches!(self.phase, Phase::Done) {
            self.record_bytes();
            self.state.answered(
                &self.member,
                &self.dataset,
                self.rows,
                self.started.elapsed(),
            );
        }
    }
}
