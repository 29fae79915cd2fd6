//! The data owner's side: canonical views over local sources, run under a permit.
//!
//! A [`MemberEngine`] holds two DataFusion contexts. The private one has the local
//! sources and the mapping functions. The public one, which sub-queries are planned
//! in, holds only the canonical datasets this member serves, each a view built in the
//! private context. A sub-query can therefore name canonical datasets and nothing
//! else: local tables, files and DDL are unreachable from it.
//!
//! Flow: [`MemberEngine::prepare`] (parse, resolve datasets) -> [`crate::policy::authorize`]
//! -> [`MemberEngine::execute`] (which takes the [`Permit`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::catalog::view::ViewTable;
use datafusion::common::TableReference;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::config::{Dataset, MemberConfig};
use crate::error::{Error, Result};
use crate::identity::Principal;
use crate::mapping;
use crate::policy::{self, Permit};

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

/// Parses a caller's SQL: exactly one query statement.
pub fn parse_query(
    state: &datafusion::execution::SessionState,
    sql: &str,
) -> Result<datafusion::sql::parser::Statement> {
    let stmt = state
        .sql_to_statement(sql, &state.config().options().sql_parser.dialect)
        .map_err(Error::from_datafusion)?;
    only_query(&stmt)?;
    Ok(stmt)
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
    cfg
}

/// A parsed sub-query and the canonical datasets it reads.
pub struct Prepared {
    plan: LogicalPlan,
    /// Datasets the query reads.
    pub datasets: BTreeSet<String>,
}

/// A member's local engine.
pub struct MemberEngine {
    config: Arc<MemberConfig>,
    public: SessionContext,
    private: SessionContext,
}

impl MemberEngine {
    /// Registers the sources and builds one view per served dataset.
    pub async fn build(config: Arc<MemberConfig>) -> Result<MemberEngine> {
        let private = SessionContext::new_with_config(session_config());
        crate::source::register_sources(&private, &config.sources).await?;
        mapping::register_functions(&private, &config.code_tables);
        let public = SessionContext::new_with_config(session_config());
        for ds in &config.member.serves {
            let dataset = config
                .region
                .dataset(ds)
                .ok_or_else(|| Error::Config(format!("unknown dataset {ds}")))?;
            let maps: Vec<_> = config
                .mappings
                .iter()
                .filter(|m| &m.dataset == ds)
                .collect();
            let sql = mapping::view_sql(dataset, &maps, &config.member.name);
            let plan = private
                .sql(&sql)
                .await
                .map_err(|e| Error::Config(format!("mapping of dataset {ds}: {e}")))?
                .into_unoptimized_plan();
            let view = ViewTable::new(plan, Some(sql));
            public
                .register_table(TableReference::bare(ds.as_str()), Arc::new(view))
                .map_err(|e| Error::Config(format!("registering dataset {ds}: {e}")))?;
        }
        Ok(MemberEngine {
            config,
            public,
            private,
        })
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
        let state = self.public.state();
        let stmt = parse_query(&state, sql)?;
        let refs = state
            .resolve_table_references(&stmt)
            .map_err(Error::from_datafusion)?;
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
        let plan = plan_query(&state, stmt).await?;
        Ok(Prepared { plan, datasets })
    }

    /// Authorizes a prepared sub-query for `origin` arriving through `via`.
    pub fn authorize(&self, via: &Principal, origin: &Principal, p: &Prepared) -> Result<Permit> {
        policy::authorize(&self.config.access, via, origin, &p.datasets).map_err(|d| {
            Error::PermissionDenied(format!("member {}: {d}", self.config.member.name))
        })
    }

    /// A permit for this member's own operator reading its own data (`fedgate check`).
    pub fn owner_permit(&self, p: &Prepared) -> Permit {
        policy::owner_permit(&self.config.member.principal, &p.datasets)
    }

    /// Runs a prepared sub-query under a permit that covers it.
    pub async fn execute(&self, permit: &Permit, p: Prepared) -> Result<SendableRecordBatchStream> {
        if !p.datasets.is_subset(permit.datasets()) {
            return Err(Error::Internal(
                "permit does not cover the query's datasets".into(),
            ));
        }
        tracing::debug!(origin = %permit.origin(), via = %permit.via(), datasets = ?p.datasets, "Sub-query permitted");
        let df = self
            .public
            .execute_logical_plan(p.plan)
            .await
            .map_err(Error::from_datafusion)?;
        df.execute_stream().await.map_err(Error::from_datafusion)
    }

    /// The whole data-owner path: prepare, authorize, execute.
    pub async fn serve(
        &self,
        via: &Principal,
        origin: &Principal,
        sql: &str,
    ) -> Result<SendableRecordBatchStream> {
        let prepared = self.prepare(sql).await?;
        let permit = self.authorize(via, origin, &prepared)?;
        self.execute(&permit, prepared).await
    }
}
