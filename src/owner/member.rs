//! The data owner's side: canonical views over local sources, run under a permit.
//!
//! A [`MemberEngine`] holds two DataFusion contexts. The private one has the local
//! sources and the mapping functions. The public one, which sub-queries are planned
//! in, holds only the canonical datasets this member serves, each a view built in the
//! private context. A sub-query can therefore name canonical datasets and nothing
//! else: local tables, files and DDL are unreachable from it.
//!
//! Flow: [`MemberEngine::prepare`] (parse, resolve datasets) -> [`crate::owner::policy::authorize`]
//! -> [`MemberEngine::execute`] (which takes the [`Permit`], plans the query among
//! views that apply the permit's grants, and rewrites it with [`crate::owner::restricted`]).
//!
//! Physical plans are cached, keyed by the sub-query's text, the permit's grants and
//! the size and modification time of every source file: a plan holds the file sizes
//! it was planned with, and reading a grown CSV file only up to its old size would be
//! a silently short answer. A cached plan runs as a copy with fresh execution state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use datafusion::catalog::view::ViewTable;
use datafusion::common::TableReference;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

use sha2::{Digest, Sha256};

use crate::config::{Dataset, MEMBER_COLUMN, MemberConfig, quote_ident};
use crate::error::{Error, Result};
use crate::owner::mapping;
use crate::owner::masking::Mask;
use crate::owner::policy::{self, AccessLevel, Grant, Permit};
use crate::owner::restricted::{self, Owned, Restricted};
use crate::owner::session::member_context;
use crate::owner::session::parse_query;
use crate::owner::session::plan_query;
use crate::owner::session::sequential_context;
use crate::trust::identity::Principal;

/// A parsed sub-query and the canonical datasets it reads.
pub struct Prepared {
    statement: datafusion::sql::parser::Statement,
    /// The text it was parsed from (part of the plan cache's key).
    sql: String,
    /// Datasets the query reads.
    pub datasets: BTreeSet<String>,
}

/// What a cached member plan depends on besides the engine itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MemberPlanKey {
    sql: String,
    /// The permit's grants, in full (levels, masks, dimensions, keys, rules), and its
    /// description, which the plan's audit hash covers.
    access: String,
    /// (path, length, modification time) of every file source, so that a changed
    /// file is planned anew.
    files: Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)>,
}

/// A planned sub-query: the context it was planned in (its task context runs it),
/// the physical plan and the plan's audit hash.
struct CachedPlan {
    ctx: SessionContext,
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    plan_sha256: String,
    /// An estimate of the bytes the plan holds, from the logical plan it was planned
    /// from and its database statements, for the cache's weigher.
    bytes: usize,
}

/// A sub-query's shape planned in the context of its grants
/// ([`crate::owner::shape`]): the written plan, before any value is bound and before
/// the grants' rewrite, which runs on every bound copy.
struct ShapedPlan {
    granted: Granted,
    planned: crate::owner::shape::Planned,
    /// Under grants that rewrite nothing (`rows`, masked or not), the shape's plan
    /// optimized among the grants' views with its placeholders in place, made when
    /// the second sub-query of the shape comes (`None` inside: it could not be).
    optimized: tokio::sync::OnceCell<Option<LogicalPlan>>,
    /// The physical plan of the first bound optimized plan that ran exactly one
    /// statement in a database, which later ones differing only in that statement
    /// reuse with their own ([`crate::owner::source::pushdown::ReusedStatement`]).
    statement: std::sync::OnceLock<crate::owner::source::pushdown::ReusedStatement>,
}

impl ShapedPlan {
    /// The shape's optimized plan with `values` bound, or `None` when the grants
    /// rewrite the plan (`aggregate`, `verify`: the rewrite and its checks work on the
    /// written plan with every value in place) or the shape could not be optimized
    /// with placeholders.
    ///
    /// A shape lifts only constants compared in `WHERE` and `HAVING`, bound as exactly
    /// their placeholders' types, and every optimizer rule keeps a plan's meaning for
    /// any value of an expression it cannot fold. The plan is optimized among the
    /// views that apply the grants, as any sub-query is, so every expression the
    /// caller wrote still sees masked values. What depends on a value runs after
    /// binding: what goes into a database ([`crate::owner::source::pushdown`]) and
    /// the pruning of files by their statistics (physical planning). A shape that
    /// reads the clock ([`crate::owner::session::reads_the_clock`]) is not reused.
    async fn optimized(&self, values: &datafusion::common::ParamValues) -> Option<LogicalPlan> {
        if !self.granted.restricted.is_empty() {
            return None;
        }
        let optimized = self
            .optimized
            .get_or_init(|| async {
                let state = self.granted.ctx.state();
                crate::owner::shape::optimize_with_placeholders(&state, &self.planned.plan)
            })
            .await
            .as_ref()?;
        // A value missing for a placeholder fails the binding.
        let bound = optimized.clone().with_param_values(values.clone()).ok()?;
        // As the optimizer's last rule checks every plan (lifted constants are only
        // compared, so no rule of today copies one into an output column).
        crate::owner::bounded::check_projected_constants(&bound).ok()?;
        Some(bound)
    }
}

/// Plans kept per member. Sub-queries repeat (dashboards, the coordinator's own
/// cached plans); a few hundred distinct ones cover a busy member.
const PLAN_CACHE_ENTRIES: u64 = 512;

/// A sub-query running under a permit.
pub struct Executed {
    /// Its answer.
    pub stream: SendableRecordBatchStream,
    /// SHA-256 (hex) of the plan as run: the caller's query after the rewrite its
    /// grants imposed, with the grants themselves.
    pub plan_sha256: String,
}

/// Views planned for one combination of grants: (dataset, deciding rule) pairs.
/// A grant context's key: each dataset with its rule and, under an incident, the
/// scope (two incidents under one rule open different rows).
type GrantKey = Vec<(String, usize, Option<policy::Scope>)>;

/// A member's local engine.
pub struct MemberEngine {
    config: Arc<MemberConfig>,
    public: SessionContext,
    private: SessionContext,
    /// The mapping view's SQL per served dataset.
    views: std::sync::RwLock<BTreeMap<String, String>>,
    /// The member's databases.
    databases: crate::owner::source::Databases,
    /// Datasets whose database tables could not be read yet, with the reason. They are
    /// tried again when a query asks for them; the other datasets are served meanwhile.
    pending: tokio::sync::Mutex<BTreeMap<String, Error>>,
    /// Contexts whose datasets are views under particular grants. The number of
    /// distinct keys is bounded by the rules and datasets, but the map is cleared if it
    /// ever grows past [`MAX_GRANT_CONTEXTS`], to bound memory whatever the callers do.
    granted: Mutex<HashMap<GrantKey, Granted>>,
    /// Physical plans of sub-queries planned before (see the module comment).
    plans: moka::future::Cache<MemberPlanKey, Arc<CachedPlan>>,
    /// Plans by shape (the sub-query's text with its filter constants lifted out), with
    /// the same grants and files: the written plan and, under grants that rewrite
    /// nothing, its optimized form ([`ShapedPlan`]); `None` marks a shape planned as
    /// written.
    shapes: moka::future::Cache<MemberPlanKey, Arc<Option<ShapedPlan>>>,
}

const MAX_GRANT_CONTEXTS: usize = 256;

/// A context for one combination of grants: rows-level datasets are views applying
/// their masks, restricted ones ([`crate::owner::restricted`]) are withheld tables with the
/// owner's own plans beside them.
#[derive(Clone)]
struct Granted {
    ctx: SessionContext,
    restricted: Arc<BTreeMap<String, Restricted>>,
}

impl MemberEngine {
    /// Registers the sources and builds one view per served dataset. A file that
    /// cannot be read is an error; a database that cannot be reached (or lacks a
    /// table) only makes the datasets that read it unavailable until it can be.
    pub async fn build(config: Arc<MemberConfig>) -> Result<MemberEngine> {
        let private = member_context();
        let mut databases = crate::owner::source::Databases::new();
        for db in &config.databases {
            databases.insert(db.name.clone(), crate::owner::source::open(db)?);
        }
        for s in &config.sources {
            if matches!(s.kind, crate::config::SourceKind::File { .. }) {
                crate::owner::source::register_file(&private, s).await?;
            }
        }
        mapping::register_functions(&private, &config.code_tables);
        crate::owner::masking::register(&private, config.hmac_key.clone());
        let mut engine = MemberEngine {
            public: member_context(),
            private,
            views: std::sync::RwLock::new(BTreeMap::new()),
            databases,
            pending: tokio::sync::Mutex::new(BTreeMap::new()),
            granted: Mutex::new(HashMap::new()),
            plans: crate::owner::session::plan_cache(
                PLAN_CACHE_ENTRIES,
                std::time::Duration::from_secs(600),
                |k: &MemberPlanKey, p: &Arc<CachedPlan>| k.sql.len() + k.access.len() + p.bytes,
            ),
            // A shape's optimized plan and its kept statement plan, made later, are
            // charged as two more copies of its written plan (the kept plan holds no
            // statement text, and at most `session::MOST_KEPT_CONSTANT_BYTES` of the
            // values that stay in the gateway).
            shapes: crate::owner::session::plan_cache(
                PLAN_CACHE_ENTRIES,
                std::time::Duration::from_secs(600),
                |k: &MemberPlanKey, s: &Arc<Option<ShapedPlan>>| {
                    k.sql.len()
                        + k.access.len()
                        + s.as_ref().as_ref().map_or(0, |s| {
                            3 * crate::owner::session::logical_plan_bytes(&s.planned.plan)
                        })
                },
            ),
            config,
        };
        for ds in engine.config.member.serves.clone() {
            if let Err(e) = engine.build_dataset(&ds).await {
                match e {
                    Error::Database { .. } => {
                        tracing::warn!(dataset = %ds, error = %e, "Dataset unavailable until its database answers");
                        engine.pending.get_mut().insert(ds, e);
                    }
                    e => return Err(e),
                }
            }
        }
        Ok(engine)
    }

    /// Registers the database tables `ds` reads and its view.
    async fn build_dataset(&self, ds: &str) -> Result<()> {
        let config = &self.config;
        let dataset = config
            .region
            .dataset(ds)
            .ok_or_else(|| Error::Config(format!("unknown dataset {ds}")))?;
        let maps: Vec<_> = config.mappings.iter().filter(|m| m.dataset == ds).collect();
        for m in &maps {
            let Some(source) = config.sources.iter().find(|s| s.name == m.source) else {
                continue;
            };
            let registered = self
                .private
                .table_exist(quote_ident(&source.name))
                .unwrap_or(false);
            if !registered {
                crate::owner::source::register_table(&self.private, source, &self.databases)
                    .await?;
            }
        }
        let sql = mapping::view_sql(dataset, &maps, &config.member.name);
        match register_view(&self.private, &self.public, ds, &sql).await {
            Ok(()) => {}
            // A mapped column missing from a database table is the database's news, not
            // a broken file: report it as such.
            Err(e) if maps.iter().any(|m| self.is_database_source(&m.source)) => {
                return Err(Error::Database {
                    database: maps
                        .iter()
                        .filter_map(|m| self.database_of(&m.source))
                        .collect::<Vec<_>>()
                        .join(", "),
                    unavailable: false,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
        self.views
            .write()
            .expect("views")
            .insert(ds.to_string(), sql);
        Ok(())
    }

    fn database_of(&self, source: &str) -> Option<String> {
        self.config.sources.iter().find_map(|s| match &s.kind {
            crate::config::SourceKind::Table { database, .. } if s.name == source => {
                Some(database.clone())
            }
            _ => None,
        })
    }

    fn is_database_source(&self, source: &str) -> bool {
        self.database_of(source).is_some()
    }

    /// Tries again the datasets of `datasets` that were unavailable.
    async fn ensure_available(&self, datasets: &BTreeSet<String>) -> Result<()> {
        let mut pending = self.pending.lock().await;
        for ds in datasets {
            if !pending.contains_key(ds) {
                continue;
            }
            match self.build_dataset(ds).await {
                Ok(()) => {
                    tracing::info!(dataset = %ds, "Dataset available again");
                    pending.remove(ds);
                }
                Err(e) => {
                    pending.insert(ds.clone(), e.clone());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The configuration this engine was built from.
    pub fn config(&self) -> &Arc<MemberConfig> {
        &self.config
    }

    /// The private context with local sources (for `fedgate check`).
    pub fn private_context(&self) -> &SessionContext {
        &self.private
    }

    /// The canonical datasets served here.
    pub fn datasets(&self) -> impl Iterator<Item = &Dataset> {
        self.config
            .member
            .serves
            .iter()
            .filter_map(|d| self.config.region.dataset(d))
    }

    /// Parses a sub-query and finds the canonical datasets it reads.
    pub async fn prepare(&self, sql: &str) -> Result<Prepared> {
        // Read in place: a copy of the session's state (its registries of functions
        // and its configuration) would cost more than parsing a small query.
        let (statement, refs) = {
            let state = self.public.state_ref();
            let state = state.read();
            let statement = parse_query(&state, sql)?;
            let refs = state
                .resolve_table_references(&statement)
                .map_err(Error::from_datafusion)?;
            (statement, refs)
        };
        let mut datasets = BTreeSet::new();
        for r in refs {
            let name = match &r {
                TableReference::Bare { table } => table.to_string(),
                other => {
                    return Err(Error::InvalidQuery(format!(
                        "table {other} is not a canonical dataset (use bare dataset names)"
                    )));
                }
            };
            if !self.config.member.serves.contains(&name) {
                return Err(Error::InvalidQuery(format!(
                    "member {} does not serve dataset {name:?}",
                    self.config.member.name
                )));
            }
            datasets.insert(name);
        }
        self.ensure_available(&datasets).await?;
        Ok(Prepared {
            statement,
            sql: sql.to_string(),
            datasets,
        })
    }

    /// The canonical field names of each dataset.
    fn fields_of<'a>(
        &self,
        datasets: impl IntoIterator<Item = &'a String>,
    ) -> BTreeMap<String, Vec<String>> {
        datasets
            .into_iter()
            .map(|d| {
                let fields = self
                    .config
                    .region
                    .dataset(d)
                    .map(|ds| ds.fields.iter().map(|f| f.name.clone()).collect())
                    .unwrap_or_default();
                (d.clone(), fields)
            })
            .collect()
    }

    /// Authorizes a prepared sub-query for `origin` arriving through `via`.
    pub fn authorize(
        &self,
        via: &Principal,
        origin: &Principal,
        purpose: Option<&str>,
        incident: Option<&policy::Incident<'_>>,
        p: &Prepared,
    ) -> Result<Permit> {
        if let Some(purpose) = purpose {
            policy::validate_purpose(purpose).map_err(Error::InvalidQuery)?;
        }
        policy::authorize(
            &self.config.access,
            via,
            via != &self.config.member.principal,
            origin,
            purpose,
            incident,
            &self.fields_of(&p.datasets),
        )
        .map_err(|d| Error::PermissionDenied(format!("member {}: {d}", self.config.member.name)))
    }

    /// What `origin`, stating `purpose`, may do with each dataset served here, as the
    /// `Describe` answer carries it.
    pub fn describe_access(
        &self,
        origin: &Principal,
        purpose: Option<&str>,
    ) -> Vec<crate::proto::v1::DatasetAccess> {
        use crate::proto::v1::{DatasetAccess, FieldAccess};
        let member = &self.config.member.name;
        self.fields_of(&self.config.member.serves)
            .into_iter()
            .map(|(d, fields)| {
                match policy::grant_for(
                    &self.config.access,
                    None,
                    origin,
                    purpose,
                    None,
                    &d,
                    &fields,
                ) {
                    Ok(g) => {
                        let field_access = |f: &String| -> String {
                            match (g.masks.get(f), g.level) {
                                (Some(Mask::Deny), _) => "denied".into(),
                                (Some(m), _) => format!("masked:{}", m.name()),
                                (None, AccessLevel::Aggregate { .. })
                                    if g.dimensions.contains(f) =>
                                {
                                    "dimension".into()
                                }
                                (None, AccessLevel::Aggregate { .. }) => "measure".into(),
                                (None, AccessLevel::Verify) if g.keys.contains(f) => "key".into(),
                                (None, AccessLevel::Verify) => "field".into(),
                                (None, _) => "rows".into(),
                            }
                        };
                        let (level, min_group) = match g.level {
                            AccessLevel::Aggregate { min_group } => ("aggregate", min_group),
                            AccessLevel::Rows if !g.masks.is_empty() => ("masked", 0),
                            AccessLevel::Rows => ("rows", 0),
                            AccessLevel::Masked => ("masked", 0),
                            AccessLevel::Verify => ("verify", 0),
                            AccessLevel::Deny => ("denied", 0),
                        };
                        DatasetAccess {
                            member: member.clone(),
                            dataset: d.clone(),
                            level: level.into(),
                            rule: g.rule_name(),
                            min_group,
                            fields: fields
                                .iter()
                                .map(|f| FieldAccess {
                                    field: f.clone(),
                                    access: field_access(f),
                                })
                                .collect(),
                            purposes: Vec::new(),
                            reason: g.describe(),
                        }
                    }
                    Err(denial) => DatasetAccess {
                        member: member.clone(),
                        dataset: d.clone(),
                        level: "denied".into(),
                        rule: denial
                            .rule
                            .map(|i| format!("access[{i}]"))
                            .unwrap_or_default(),
                        min_group: 0,
                        fields: fields
                            .iter()
                            .map(|f| FieldAccess {
                                field: f.clone(),
                                access: "denied".into(),
                            })
                            .collect(),
                        purposes: denial.purposes.clone(),
                        reason: denial.to_string(),
                    },
                }
            })
            .collect()
    }

    /// A permit for this member's own operator reading its own data (`fedgate check`).
    pub fn owner_permit(&self, p: &Prepared) -> Permit {
        policy::owner_permit(&self.config.member.principal, &p.datasets)
    }

    /// The context in which a query under `permit` is planned: the plain canonical
    /// views when every grant is rows without masks; otherwise views that apply the
    /// grants' masks and, for `aggregate` and `verify`, withheld tables with the
    /// owner's plans that replace them ([`crate::owner::restricted`]).
    ///
    /// A dataset opened by an incident's scope is, with `materialize`, the scope's
    /// rows computed first by the owner's own plan and held in memory
    /// ([`MemberEngine::scoped_rows`]), so the caller's expressions never run over a
    /// row outside the scope (a view would let the optimizer merge the caller's filter
    /// with the scope's, and evaluate it on every row). Such a context holds this
    /// moment's rows and is not kept.
    async fn context_for(&self, permit: &Permit, materialize: bool) -> Result<Granted> {
        let plain = permit.grants().values().all(policy::Grant::is_plain);
        if plain {
            return Ok(Granted {
                ctx: self.public.clone(),
                restricted: Arc::new(BTreeMap::new()),
            });
        }
        let key: GrantKey = permit
            .grants()
            .iter()
            .map(|(d, g)| (d.clone(), g.rule, g.incident.clone()))
            .collect();
        let scoped = permit.grants().values().any(|g| g.incident.is_some());
        if !scoped && let Some(granted) = self.granted.lock().expect("grant contexts").get(&key) {
            return Ok(granted.clone());
        }
        // Under aggregate and verify grants the caller's plan runs sequentially, so
        // that what it returns (and which rows a LIMIT keeps) depends on the owner's
        // plans' output alone.
        let any_restricted = permit
            .grants()
            .values()
            .any(|g| matches!(g.level, AccessLevel::Aggregate { .. } | AccessLevel::Verify));
        let ctx = if any_restricted {
            sequential_context()
        } else {
            member_context()
        };
        let mut restricted = BTreeMap::new();
        for (d, g) in permit.grants() {
            let base = self.views.read().expect("views").get(d).cloned();
            let (Some(base), Some(ds)) = (base, self.config.region.dataset(d)) else {
                return Err(Error::Internal(format!("no view for dataset {d}")));
            };
            let records = masked_view_sql(ds, &base, g);
            match g.level {
                AccessLevel::Aggregate { .. } | AccessLevel::Verify => {
                    restricted.insert(d.clone(), self.restrict(&ctx, d, &records, g).await?);
                }
                _ if g.incident.is_some() && materialize => {
                    let table = self.scoped_rows(d, &records, g).await?;
                    ctx.register_table(TableReference::bare(d.as_str()), Arc::new(table))
                        .map_err(|e| Error::Config(format!("registering dataset {d}: {e}")))?;
                }
                _ => register_view(&self.private, &ctx, d, &records).await?,
            }
        }
        let granted = Granted {
            ctx,
            restricted: Arc::new(restricted),
        };
        if scoped {
            return Ok(granted);
        }
        let mut map = self.granted.lock().expect("grant contexts");
        if map.len() >= MAX_GRANT_CONTEXTS {
            map.clear();
        }
        map.insert(key, granted.clone());
        Ok(granted)
    }

    /// The rows of dataset `d` that an incident's scope opens (`records`: the view's
    /// SQL, scope included), computed by the owner's plan and held in memory, at most
    /// the sub-query memory limit. A failure is told without its text, which could
    /// quote a value outside the scope.
    async fn scoped_rows(
        &self,
        d: &str,
        records: &str,
        g: &policy::Grant,
    ) -> Result<datafusion::datasource::MemTable> {
        let number = g.incident.as_ref().map(|s| s.number.as_str()).unwrap_or("");
        let plan = self
            .private
            .sql(records)
            .await
            .map_err(|e| Error::Config(format!("owner's plan of dataset {d}: {e}")))?
            .into_unoptimized_plan();
        let physical = physical_plan(&self.private, &plan).await?;
        let schema = physical.schema();
        let limit = self.config.limits.query_memory_bytes as usize;
        let hidden = |e: Error| match e {
            Error::DeadlineExceeded(_) | Error::TooLarge(_) => e,
            other => {
                tracing::warn!(dataset = %d, incident = %number, error = %other, "Reading the rows an incident opens failed");
                Error::Internal(format!(
                    "member {}: reading the rows incident {number} opens in dataset {d}                      failed; its text is not shown; the member's operators can read it in                      their log",
                    self.config.member.name
                ))
            }
        };
        let mut stream =
            datafusion::physical_plan::execute_stream(physical, self.bounded_task(&self.private)?)
                .map_err(|e| hidden(Error::from_datafusion(e)))?;
        let mut batches = Vec::new();
        let mut held = 0usize;
        while let Some(b) = futures::StreamExt::next(&mut stream).await {
            let b = b.map_err(|e| hidden(Error::from_datafusion(e)))?;
            held += b.get_array_memory_size();
            if held > limit {
                return Err(Error::TooLarge(format!(
                    "the rows incident {number} opens in dataset {d} take more than the                      {limit} bytes a sub-query may hold here; ask the declarer to narrow                      its scope"
                )));
            }
            batches.push(b);
        }
        datafusion::datasource::MemTable::try_new(schema, vec![batches])
            .map_err(Error::from_datafusion)
    }

    /// Registers dataset `d` under a restricted grant as a withheld table in `ctx` and
    /// plans the owner's own plan over its records (`records`: the view's SQL).
    async fn restrict(
        &self,
        ctx: &SessionContext,
        d: &str,
        records: &str,
        g: &Grant,
    ) -> Result<Restricted> {
        let plan_of = |sql: String| async move {
            self.private
                .sql(&sql)
                .await
                .map(|df| df.into_unoptimized_plan())
                .map_err(|e| Error::Config(format!("owner's plan of dataset {d}: {e}")))
        };
        let records_plan = plan_of(records.to_string()).await?;
        let schema = Arc::new(records_plan.schema().as_arrow().clone());
        let fields: Vec<(String, datafusion::arrow::datatypes::DataType)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        let owned = match g.level {
            AccessLevel::Aggregate { min_group } => {
                let (sql, measures) = restricted::cells_sql(records, &fields, g, min_group);
                Owned::Cells {
                    plan: plan_of(sql).await?,
                    measures,
                }
            }
            _ => Owned::Records { plan: records_plan },
        };
        ctx.register_table(
            TableReference::bare(d),
            Arc::new(restricted::Withheld::new(d, schema)),
        )
        .map_err(|e| Error::Config(format!("registering dataset {d}: {e}")))?;
        Ok(Restricted {
            grant: g.clone(),
            fields,
            owned,
        })
    }

    /// Runs a prepared sub-query under a permit that covers it: plans it among views
    /// that apply the permit's grants, checks and rewrites it for `aggregate` and
    /// `verify` grants ([`crate::owner::restricted`]), and starts it.
    pub async fn execute(&self, permit: &Permit, p: Prepared) -> Result<Executed> {
        let mut phases = crate::owner::session::Phases::start();
        if !p.datasets.is_subset(&permit.datasets()) {
            return Err(Error::Internal(
                "permit does not cover the query's datasets".into(),
            ));
        }
        let key = MemberPlanKey {
            sql: p.sql.clone(),
            access: format!("{}\n{:?}", permit.describe(), permit.grants()),
            files: self.file_stamps(),
        };
        if let Some(cached) = self.plans.get(&key).await {
            tracing::debug!(origin = %permit.origin(), via = %permit.via(), access = %permit.describe(), "Sub-query permitted (plan cached)");
            let physical = crate::owner::session::fresh_copy(cached.plan.clone())?;
            let stream = datafusion::physical_plan::execute_stream(
                physical,
                self.bounded_task(&cached.ctx)?,
            )
            .map_err(Error::from_datafusion)?;
            return Ok(Executed {
                stream,
                plan_sha256: cached.plan_sha256.clone(),
            });
        }
        phases.mark("key");
        let bound = self.bound_shape(permit, &p, &key).await;
        let from = match &bound {
            Some((_, _, Some(_))) => "bound optimized",
            Some(_) => "bound",
            None => "text",
        };
        // With a shape, its written plan bound (and its optimized plan, when the
        // grants rewrite nothing); then (without one, from the text) the grants'
        // rewrite and the audit hash, over the written plan with its values.
        phases.mark("shape");
        let (ctx, plan, plan_sha256, cells, optimized) = match bound {
            Some((granted, plan, optimized)) => {
                let (ctx, plan, sha, cells) = self
                    .finish(permit, &p.datasets, granted, plan, true)
                    .await?;
                (ctx, plan, sha, cells, optimized)
            }
            None => {
                let (ctx, plan, sha, cells) = self.plan_under(permit, p, true).await?;
                (ctx, plan, sha, cells, None)
            }
        };
        phases.mark("rewrite");
        tracing::debug!(origin = %permit.origin(), via = %permit.via(), access = %permit.describe(), "Sub-query permitted");
        let physical = match optimized {
            Some((optimized, shape)) => {
                let statement = shape.as_ref().as_ref().map(|s| &s.statement);
                physical_plan_of(&ctx.state(), optimized, statement, &mut phases).await?
            }
            None => physical_plan_timed(&ctx, &plan, &mut phases).await?,
        };
        if cells || crate::owner::session::reads_the_clock(&plan) {
            // The plan holds this moment's cells or an incident's rows, or this
            // query's time: it is never reused.
            let stream =
                datafusion::physical_plan::execute_stream(physical, self.bounded_task(&ctx)?)
                    .map_err(Error::from_datafusion)?;
            phases.mark("start");
            phases.report("member", from);
            return Ok(Executed {
                stream,
                plan_sha256,
            });
        }
        self.plans
            .insert(
                key,
                Arc::new(CachedPlan {
                    ctx: ctx.clone(),
                    plan: physical.clone(),
                    plan_sha256: plan_sha256.clone(),
                    bytes: crate::owner::session::logical_plan_bytes(&plan)
                        + crate::owner::session::physical_plan_bytes(physical.as_ref(), |node| {
                            let any: &dyn std::any::Any = node;
                            any.downcast_ref::<crate::owner::source::remote::RemoteExec>()
                                .map_or(0, |e| e.sql().len())
                        }),
                }),
            )
            .await;
        let physical = crate::owner::session::fresh_copy(physical)?;
        phases.mark("cache");
        let stream = datafusion::physical_plan::execute_stream(physical, self.bounded_task(&ctx)?)
            .map_err(Error::from_datafusion)?;
        phases.mark("start");
        phases.report("member", from);
        Ok(Executed {
            stream,
            plan_sha256,
        })
    }

    /// A task context for one sub-query in `ctx` ([`crate::owner::session::query_task`]),
    /// with a memory pool of `limits.query_memory_bytes`, as for a query at the
    /// coordinator: one that needs more fails with the limit named. The process total
    /// is up to `max_concurrent_subqueries` such pools.
    fn bounded_task(
        &self,
        ctx: &SessionContext,
    ) -> Result<Arc<datafusion::execution::TaskContext>> {
        // From the state in place, not a copy of it.
        crate::owner::session::query_task(
            &ctx.state_ref().read(),
            self.config.limits.query_memory_bytes as usize,
        )
    }

    /// Length and modification time of every file source (every entry of a folder
    /// source). A file that cannot be read gets no stamp, and the query then reports
    /// the file's own error when it runs.
    fn file_stamps(&self) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
        let mut out = Vec::new();
        let mut stamp = |path: &std::path::Path| {
            if let Ok(m) = std::fs::metadata(path) {
                out.push((path.to_path_buf(), m.len(), m.modified().ok()));
            }
        };
        for s in &self.config.sources {
            if let crate::config::SourceKind::File { path, .. } = &s.kind {
                if path.is_dir() {
                    if let Ok(entries) = std::fs::read_dir(path) {
                        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
                        files.sort();
                        files.iter().for_each(|f| stamp(f));
                    }
                } else {
                    stamp(path);
                }
            }
        }
        out
    }

    /// The statements a prepared sub-query would send to this member's databases
    /// under `permit`, as (database, SQL) pairs, without running it.
    pub async fn database_queries(
        &self,
        permit: &Permit,
        p: Prepared,
    ) -> Result<Vec<(String, String)>> {
        let (ctx, plan, _, _) = self.plan_under(permit, p, false).await?;
        let physical = physical_plan(&ctx, &plan).await?;
        let mut statements = Vec::new();
        crate::owner::source::pushdown::statements_in(physical.as_ref(), &mut statements);
        let out = statements
            .iter()
            .map(|e| (e.database().to_string(), e.sql().to_string()))
            .collect();
        Ok(out)
    }

    /// Plans a sub-query among the views of its permit and checks it: the context,
    /// the rewritten logical plan, the plan's hash for the audit record, and whether
    /// the plan holds computed cells (`materialize`: the cells of `aggregate` grants
    /// are computed first, see [`MemberEngine::released_cells`]; without it, as for
    /// explaining, the cells' own plan stays in place).
    async fn plan_under(
        &self,
        permit: &Permit,
        p: Prepared,
        materialize: bool,
    ) -> Result<(SessionContext, LogicalPlan, String, bool)> {
        if !p.datasets.is_subset(&permit.datasets()) {
            return Err(Error::Internal(
                "permit does not cover the query's datasets".into(),
            ));
        }
        let granted = self.context_for(permit, materialize).await?;
        let plan = plan_query(&granted.ctx.state(), p.statement).await?;
        self.finish(permit, &p.datasets, granted, plan, materialize)
            .await
    }

    /// The written plan of a sub-query whose shape was planned before under the same
    /// grants and files, bound to this sub-query's constants, with the context it was
    /// planned in; `None` when the sub-query has no shape, the shape could not be
    /// planned or typed, or a value cannot be bound (it is then planned as written).
    /// Never under an incident: its context holds the scope's rows of this moment.
    async fn bound_shape(
        &self,
        permit: &Permit,
        p: &Prepared,
        key: &MemberPlanKey,
    ) -> Option<(
        Granted,
        LogicalPlan,
        Option<(LogicalPlan, Arc<Option<ShapedPlan>>)>,
    )> {
        if permit.grants().values().any(|g| g.incident.is_some()) {
            return None;
        }
        let shaped = crate::owner::shape::shape(&p.statement)?;
        let key = MemberPlanKey {
            sql: format!("shape\u{0}{}", shaped.key()),
            ..key.clone()
        };
        let (entry, known) = match self.shapes.get(&key).await {
            Some(entry) => (entry, true),
            None => {
                let granted = self.context_for(permit, true).await.ok()?;
                let planned = plan_query(&granted.ctx.state(), shaped.statement.clone())
                    .await
                    .ok()
                    .and_then(|plan| {
                        crate::owner::shape::Planned::new(plan, shaped.literals.len())
                    });
                let entry = Arc::new(planned.map(|planned| ShapedPlan {
                    granted,
                    planned,
                    optimized: tokio::sync::OnceCell::new(),
                    statement: std::sync::OnceLock::new(),
                }));
                self.shapes.insert(key, entry.clone()).await;
                (entry, false)
            }
        };
        let shaped_plan = entry.as_ref().as_ref()?;
        let values = shaped_plan.planned.values(&shaped.literals)?;
        let plan = shaped_plan
            .planned
            .plan
            .clone()
            .with_param_values(values.clone())
            .ok()?;
        // The first sub-query of a shape is optimized as written; the optimizer runs
        // over the shape itself only when a second one comes.
        let optimized = if known {
            shaped_plan
                .optimized(&values)
                .await
                .map(|plan| (plan, entry.clone()))
        } else {
            None
        };
        Some((shaped_plan.granted.clone(), plan, optimized))
    }

    /// The rest of planning a sub-query, from its written plan with every value in
    /// place: the cells of `aggregate` grants computed (with `materialize`), the
    /// grants' rewrite and checks, the plan's audit hash.
    async fn finish(
        &self,
        permit: &Permit,
        datasets: &BTreeSet<String>,
        granted: Granted,
        plan: LogicalPlan,
        materialize: bool,
    ) -> Result<(SessionContext, LogicalPlan, String, bool)> {
        let Granted { ctx, restricted } = granted;
        let scoped = permit.grants().values().any(|g| g.incident.is_some());
        let cells = materialize
            && restricted
                .iter()
                .any(|(d, r)| datasets.contains(d) && matches!(r.owned, Owned::Cells { .. }));
        let restricted = if cells {
            Arc::new(self.released_cells(&restricted, datasets).await?)
        } else {
            restricted
        };
        let plan = restricted::rewrite(plan, &restricted).map_err(|why| {
            let passed_over: Vec<&str> = permit
                .grants()
                .values()
                .flat_map(|g| g.passed_over.iter().map(String::as_str))
                .collect();
            let mut m = format!("member {}: {why}", self.config.member.name);
            if !passed_over.is_empty() {
                m.push_str(&format!(" ({})", passed_over.join("; ")));
            }
            Error::PermissionDenied(m)
        })?;
        let plan_sha256 = {
            let mut h = Sha256::new();
            h.update(permit.describe().as_bytes());
            h.update(b"\n");
            h.update(plan.display_indent().to_string().as_bytes());
            hex::encode(h.finalize())
        };
        // A plan holding this moment's cells or an incident's rows is never reused.
        Ok((ctx, plan, plan_sha256, cells || (materialize && scoped)))
    }

    /// Computes the released cells of every `aggregate` dataset in `datasets` and
    /// puts them in place of the cells' plan: an in-memory table holding exactly the
    /// cells of at least k records, sorted by all their columns. The caller's
    /// expressions then run over released cells only, in an order that depends on
    /// them alone (the hash tables that computed them saw withheld groups and
    /// records, and their output order would tell of them).
    async fn released_cells(
        &self,
        restricted: &BTreeMap<String, Restricted>,
        datasets: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Restricted>> {
        use datafusion::logical_expr::{LogicalPlanBuilder, SortExpr};
        let mut out = restricted.clone();
        for (d, r) in restricted {
            let Owned::Cells { plan, measures } = &r.owned else {
                continue;
            };
            if !datasets.contains(d) {
                continue;
            }
            let order: Vec<SortExpr> = plan
                .schema()
                .columns()
                .into_iter()
                .map(|c| datafusion::prelude::col(c).sort(true, true))
                .collect();
            let sorted = LogicalPlanBuilder::from(plan.clone())
                .sort(order)
                .and_then(|b| b.build())
                .map_err(Error::from_datafusion)?;
            let physical = physical_plan(&self.private, &sorted).await?;
            let schema = physical.schema();
            let batches = datafusion::physical_plan::collect(
                physical,
                self.bounded_task(&self.private)?,
            )
            .await
            .map_err(|e| {
                // The caller may not see record values, and a failure's text
                // can quote one (a value that did not convert, a database
                // error): only a memory limit or a deadline is told as it is.
                let full = Error::from_datafusion(e);
                tracing::warn!(dataset = %d, error = %full, "Computing the released cells failed");
                match full {
                    Error::TooLarge(_) | Error::DeadlineExceeded(_) => full,
                    _ => Error::Internal(format!(
                        "member {}: computing the cells of dataset {d} failed; its \
                                 text is not shown under {}; the member's operators can read \
                                 it in their log",
                        self.config.member.name, r.grant.level
                    )),
                }
            })?;
            let table = datafusion::datasource::MemTable::try_new(schema, vec![batches])
                .map_err(Error::from_datafusion)?;
            let scan = LogicalPlanBuilder::scan(
                format!("{d}_cells"),
                datafusion::datasource::provider_as_source(Arc::new(table)),
                None,
            )
            .and_then(|b| b.build())
            .map_err(Error::from_datafusion)?;
            out.insert(
                d.clone(),
                Restricted {
                    grant: r.grant.clone(),
                    fields: r.fields.clone(),
                    owned: Owned::Cells {
                        plan: scan,
                        measures: measures.clone(),
                    },
                },
            );
        }
        Ok(out)
    }
}

/// Optimizes a checked plan, moves what it can into the member's databases
/// ([`crate::owner::source::pushdown`]) and plans its execution.
pub async fn physical_plan(
    ctx: &SessionContext,
    plan: &LogicalPlan,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    physical_plan_timed(ctx, plan, &mut crate::owner::session::Phases::start()).await
}

/// [`physical_plan`], each step's time marked in `phases`.
async fn physical_plan_timed(
    ctx: &SessionContext,
    plan: &LogicalPlan,
    phases: &mut crate::owner::session::Phases,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    let state = ctx.state();
    let optimized = state.optimize(plan).map_err(Error::from_datafusion)?;
    physical_plan_of(&state, optimized, None, phases).await
}

/// [`physical_plan`] of a plan already optimized (a shape's, bound to its values):
/// what goes into the member's databases, then the physical plan. With `statement` (a
/// shape's), a plan that differs from the shape's first plan with one statement only
/// in that statement's text reuses its physical plan with its own statement (the
/// phase `reused` instead of `physical`); the first such plan is kept.
async fn physical_plan_of(
    state: &datafusion::execution::SessionState,
    optimized: LogicalPlan,
    statement: Option<&std::sync::OnceLock<crate::owner::source::pushdown::ReusedStatement>>,
    phases: &mut crate::owner::session::Phases,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    use crate::owner::source::pushdown::ReusedStatement;
    phases.mark("optimize");
    let pushed =
        crate::owner::source::pushdown::push_into_databases(optimized).map_err(engine_failure)?;
    phases.mark("databases");
    if let Some(reused) = statement
        .and_then(std::sync::OnceLock::get)
        .and_then(|w| w.plan_for(&pushed))
    {
        phases.mark("reused");
        return reused.map_err(engine_failure);
    }
    let physical = state
        .query_planner()
        .create_physical_plan(&pushed, state)
        .await
        .map_err(engine_failure)?;
    if let Some(cell) = statement
        && cell.get().is_none()
        && let Some(w) = ReusedStatement::of(&pushed, &physical)
    {
        let _ = cell.set(w);
    }
    phases.mark("physical");
    Ok(physical)
}

/// A failure after the caller's plan was checked and optimized is the member's own:
/// the plan then holds the member's views expanded (its file paths, its local column
/// names and expressions), which its text would show to the caller. The caller is
/// told that planning failed here; the operators read the text in their log.
fn engine_failure(e: datafusion::error::DataFusionError) -> Error {
    match Error::from_datafusion(e) {
        // These name no part of the plan.
        e @ (Error::TooLarge(_) | Error::DeadlineExceeded(_) | Error::Database { .. }) => e,
        e => {
            tracing::warn!(error = %e, "Planning a permitted sub-query failed");
            Error::Internal(
                "the member could not plan this sub-query; its operators can read why in \
                 their log"
                    .into(),
            )
        }
    }
}

/// Plans `sql` in the private context and registers it as view `name` in `public`.
async fn register_view(
    private: &SessionContext,
    public: &SessionContext,
    name: &str,
    sql: &str,
) -> Result<()> {
    let plan = private
        .sql(sql)
        .await
        .map_err(|e| Error::Config(format!("view of dataset {name}: {e}")))?
        .into_unoptimized_plan();
    let view = ViewTable::new(plan, Some(sql.to_string()));
    public
        .register_table(TableReference::bare(name), Arc::new(view))
        .map_err(|e| Error::Config(format!("registering dataset {name}: {e}")))?;
    Ok(())
}

/// The SQL of a dataset's record view under a grant: masked fields masked (or NULL).
/// Under `aggregate` and `verify` grants only the owner's own plans read it.
pub fn masked_view_sql(ds: &Dataset, base: &str, g: &Grant) -> String {
    let mut cols: Vec<String> = ds
        .fields
        .iter()
        .map(|f| {
            let q = quote_ident(&f.name);
            match g.masks.get(&f.name) {
                None => format!("t.{q}"),
                Some(Mask::Deny) => {
                    format!("CAST(NULL AS {}) AS {q}", mapping::sql_type(&f.data_type))
                }
                Some(m) => format!("{}(t.{q}) AS {q}", m.function_name()),
            }
        })
        .collect();
    cols.push(format!("t.{}", quote_ident(MEMBER_COLUMN)));
    let mut sql = format!("SELECT {} FROM ({base}) AS t", cols.join(", "));
    // Under an incident only the rows its scope names are in the view, compared as
    // text to the declared values (quoted here: the values are the declarer's, never
    // the caller's, but are still treated as data).
    if let Some(scope) = &g.incident {
        let conditions: Vec<String> = scope
            .conditions
            .iter()
            .map(|(f, values)| {
                let list: Vec<String> = values
                    .iter()
                    .map(|v| format!("'{}'", v.replace('\'', "''")))
                    .collect();
                format!(
                    "CAST(t.{} AS VARCHAR) IN ({})",
                    quote_ident(f),
                    list.join(", ")
                )
            })
            .collect();
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planning_failure_keeps_the_members_layout_to_itself() {
        // DataFusion's ordering check quotes the whole physical plan: file paths and
        // local column names of the member's views.
        let e = datafusion::error::DataFusionError::Plan(
            "Plan: [\"DataSourceExec: file_groups={1 group: [[/srv/wx/ship.csv]]}, \
             projection=[编号, 数量]\"] does not satisfy order requirements"
                .into(),
        );
        let told = engine_failure(e);
        assert!(matches!(told, Error::Internal(_)), "{told:?}");
        let text = told.to_string();
        assert!(
            !text.contains("ship.csv") && !text.contains("编号"),
            "{text}"
        );
        assert!(text.contains("could not plan"), "{text}");
        // A memory limit names nothing of the plan and is told as it is.
        let e = datafusion::error::DataFusionError::ResourcesExhausted("4 MiB".into());
        assert!(matches!(engine_failure(e), Error::TooLarge(_)));
    }
}
