//! The catalog a PostgreSQL client sees: `pg_catalog` and `information_schema` over
//! the canonical datasets, as tables of one schema `canonical` in a database named
//! after the region.
//!
//! Clients (psql's `\dt` and `\d`, the JDBC driver's metadata calls, SQLAlchemy
//! reflection, DBeaver's and Metabase's sync) send their own catalog queries. They
//! are answered at this gateway from a DataFusion session whose only tables are the
//! canonical datasets' *schemas* (empty tables) and the catalog tables of
//! `datafusion-pg-catalog`: a catalog query can read names and types, never rows,
//! whatever it says. Queries that read datasets go the federation path instead
//! ([`route`] decides), and a query mixing both is refused.

use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::MemTable;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::sqlparser::ast::{ObjectName, Statement, visit_relations};
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::StreamExt;

use crate::config::MemberConfig;
use crate::error::{Error, Result};

/// The one schema the canonical datasets are listed under.
pub const SCHEMA: &str = crate::coordinator::CANONICAL_SCHEMA;

/// Memory one catalog query may use: catalog answers are small.
const CATALOG_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Where a statement is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Only catalog tables, or no table at all (`SELECT 1`, `SELECT version()`): here.
    Catalog,
    /// Canonical datasets (or names that are neither): the federation path.
    Datasets,
}

/// The catalog session of the configuration version in force, built once per version.
#[derive(Default)]
pub struct Catalogs {
    built: Mutex<Option<(String, Arc<Catalog>)>>,
}

/// One configuration version's catalog session.
pub struct Catalog {
    ctx: SessionContext,
    /// The region's name (the database and catalog name clients see).
    pub region: String,
    datasets: Vec<String>,
    catalog_tables: Vec<String>,
    parser: PostgresCompatibilityParser,
}

impl Catalogs {
    /// The catalog of `config`'s version.
    pub fn of(&self, config: &MemberConfig) -> Result<Arc<Catalog>> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, c)) = built.as_ref()
            && *v == config.version
        {
            return Ok(c.clone());
        }
        let c = Arc::new(Catalog::build(config)?);
        *built = Some((config.version.clone(), c.clone()));
        Ok(c)
    }
}

/// `version()` as PostgreSQL words it, naming fedgate.
fn version_udf() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    let text = format!(
        "PostgreSQL 16.6 (fedgate {}, a federation gateway; PostgreSQL wire protocol)",
        env!("CARGO_PKG_VERSION")
    );
    create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(
                datafusion::scalar::ScalarValue::Utf8(Some(text.clone())),
            ))
        }),
    )
}

/// `to_regtype(name)`: NULL, the answer for a type that does not exist. psycopg and
/// SQLAlchemy ask it for extension types (`hstore`), which a gateway never has.
fn to_regtype_udf() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Immutable,
        Arc::new(|_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(
                datafusion::scalar::ScalarValue::Int32(None),
            ))
        }),
    )
}

/// `json_build_object(key, value, ...)`: a JSON object of the pairs, as text.
/// SQLAlchemy's column reflection names it in branches for identity columns and
/// collations, which datasets never have, but the statement must plan.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: datafusion::logical_expr::Signature,
}

impl datafusion::logical_expr::ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::common::Result<datafusion::logical_expr::ColumnarValue> {
        use datafusion::scalar::ScalarValue as S;
        if !args.args.len().is_multiple_of(2) {
            return datafusion::common::plan_err!(
                "json_build_object takes pairs of keys and values"
            );
        }
        let arrays = datafusion::logical_expr::ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = datafusion::arrow::array::StringBuilder::new();
        for row in 0..args.number_rows {
            let mut object = serde_json::Map::new();
            for pair in arrays.chunks(2) {
                let key = S::try_from_array(&pair[0], row)?;
                let value = S::try_from_array(&pair[1], row)?;
                let json = match &value {
                    v if v.is_null() => serde_json::Value::Null,
                    S::Boolean(Some(b)) => serde_json::Value::Bool(*b),
                    S::Int8(Some(_))
                    | S::Int16(Some(_))
                    | S::Int32(Some(_))
                    | S::Int64(Some(_))
                    | S::UInt8(Some(_))
                    | S::UInt16(Some(_))
                    | S::UInt32(Some(_))
                    | S::UInt64(Some(_))
                    | S::Float32(Some(_))
                    | S::Float64(Some(_)) => serde_json::from_str(&value.to_string())
                        .unwrap_or(serde_json::Value::String(value.to_string())),
                    other => serde_json::Value::String(other.to_string()),
                };
                object.insert(key.to_string(), json);
            }
            out.append_value(serde_json::Value::Object(object).to_string());
        }
        Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
            out.finish(),
        )))
    }
}

/// `fedgate_like_escape(pattern, escape)`: the pattern rewritten from an escape
/// character of the client's choosing (`LIKE 'pg/_%' ESCAPE '/'`, as SQLAlchemy
/// writes) to the backslash, the one DataFusion's LIKE knows.
fn like_escape_udf() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    create_udf(
        LIKE_ESCAPE,
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            use datafusion::arrow::array::AsArray;
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let (Some(patterns), Some(escapes)) = (
                arrays[0].as_string_opt::<i32>(),
                arrays[1].as_string_opt::<i32>(),
            ) else {
                return datafusion::common::plan_err!("LIKE ... ESCAPE takes text");
            };
            let out: datafusion::arrow::array::StringArray = patterns
                .iter()
                .zip(escapes.iter())
                .map(|(p, e)| {
                    let (p, e) = (p?, e?.chars().next()?);
                    let mut out = String::with_capacity(p.len());
                    let mut chars = p.chars();
                    while let Some(c) = chars.next() {
                        if c == e {
                            if let Some(next) = chars.next() {
                                out.push('\\');
                                out.push(next);
                            }
                        } else if c == '\\' {
                            out.push_str("\\\\");
                        } else {
                            out.push(c);
                        }
                    }
                    Some(out)
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// The name of [`like_escape_udf`].
const LIKE_ESCAPE: &str = "fedgate_like_escape";

/// Moves `LIKE ... ESCAPE 'c'` (any `c` but the backslash) onto the backslash.
fn rewrite_like_escapes(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{
        Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments,
        Ident, Value,
    };
    let _ = datafusion::sql::sqlparser::ast::visit_expressions_mut(stmt, |e| {
        if let Expr::Like {
            pattern,
            escape_char,
            ..
        }
        | Expr::ILike {
            pattern,
            escape_char,
            ..
        } = e
            && let Some(esc) = escape_char
            && let Value::SingleQuotedString(c) = &esc.value
            && c.chars().count() == 1
            && c != "\\"
        {
            let arg = |x: Expr| FunctionArg::Unnamed(FunctionArgExpr::Expr(x));
            let escape = Expr::value(Value::SingleQuotedString(c.clone()));
            let call = Expr::Function(Function {
                name: ObjectName::from(vec![Ident::new(LIKE_ESCAPE)]),
                uses_odbc_syntax: false,
                parameters: FunctionArguments::None,
                args: FunctionArguments::List(FunctionArgumentList {
                    duplicate_treatment: None,
                    args: vec![arg((**pattern).clone()), arg(escape)],
                    clauses: vec![],
                }),
                filter: None,
                null_treatment: None,
                over: None,
                within_group: vec![],
            });
            **pattern = call;
            *escape_char = None;
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// `pg_collation_is_visible(oid)`: true. Visibility is about the search path, and
/// everything a client can see in this catalog is on it.
fn collation_visible_udf() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    create_udf(
        "pg_collation_is_visible",
        vec![DataType::Int64],
        DataType::Boolean,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let out: datafusion::arrow::array::BooleanArray = (0..arrays[0].len())
                .map(|i| (!arrays[0].is_null(i)).then_some(true))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `pg_get_serial_sequence(table, column)`: NULL, as for every column without a
/// sequence (datasets have none). SQLAlchemy's column reflection asks it.
fn no_serial_sequence_udf() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    create_udf(
        "pg_get_serial_sequence",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(
                datafusion::scalar::ScalarValue::Utf8(None),
            ))
        }),
    )
}

impl Catalog {
    fn build(config: &MemberConfig) -> Result<Catalog> {
        let region = &config.region;
        let internal = |e: &dyn std::fmt::Display| Error::Internal(format!("catalog: {e}"));
        let mut cfg = SessionConfig::new()
            .with_default_catalog_and_schema(region.name.as_str(), SCHEMA)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(true)
            .with_target_partitions(1);
        cfg.options_mut().sql_parser.map_string_types_to_utf8view = false;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(CATALOG_MEMORY_BYTES, 1.0)
            .build_arc()
            .map_err(|e| internal(&e))?;
        let ctx = SessionContext::new_with_config_rt(cfg, runtime);
        for d in &region.datasets {
            let empty =
                MemTable::try_new(d.schema.clone(), vec![vec![]]).map_err(|e| internal(&e))?;
            ctx.register_table(d.name.as_str(), Arc::new(empty))
                .map_err(|e| internal(&e))?;
        }
        datafusion_pg_catalog::setup_pg_catalog(&ctx, &region.name, EmptyContextProvider)
            .map_err(|e| internal(&e))?;
        // Drivers read the server's version from `version()` in PostgreSQL's words
        // (SQLAlchemy parses "PostgreSQL <major>.<minor>").
        ctx.register_udf(version_udf());
        ctx.register_udf(to_regtype_udf());
        ctx.register_udf(no_serial_sequence_udf());
        ctx.register_udf(like_escape_udf());
        ctx.register_udf(collation_visible_udf());
        ctx.register_udf(datafusion::logical_expr::ScalarUDF::new_from_impl(
            JsonBuildObject {
                signature: datafusion::logical_expr::Signature::variadic_any(
                    datafusion::logical_expr::Volatility::Immutable,
                ),
            },
        ));
        crate::owner::bounded::bound_functions(&ctx);
        // Catalog tables have rows (pg_proc thousands): a constant in the select list
        // is copied into each, as over datasets.
        ctx.add_optimizer_rule(Arc::new(crate::owner::bounded::ProjectedConstants));
        let catalog_tables = ctx
            .catalog(&region.name)
            .and_then(|c| c.schema("pg_catalog"))
            .map(|s| s.table_names())
            .unwrap_or_default();
        Ok(Catalog {
            ctx,
            region: region.name.clone(),
            datasets: region.datasets.iter().map(|d| d.name.clone()).collect(),
            catalog_tables,
            parser: PostgresCompatibilityParser::new(),
        })
    }

    /// Where `stmt` is answered. A statement reading both catalog tables and datasets
    /// is refused: catalog answers are made here, dataset answers by the members, and
    /// the two do not join.
    pub fn route(&self, stmt: &Statement) -> Result<Route> {
        let (mut catalog, mut data) = (false, false);
        let _ = visit_relations(stmt, |name: &ObjectName| {
            if self.is_catalog_table(name) {
                catalog = true;
            } else {
                data = true;
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        match (catalog, data) {
            (true, true) => Err(Error::InvalidQuery(
                "a query may read the catalog (pg_catalog, information_schema) or the \
                 canonical datasets, not both"
                    .into(),
            )),
            (_, true) => Ok(Route::Datasets),
            _ => Ok(Route::Catalog),
        }
    }

    fn is_catalog_table(&self, name: &ObjectName) -> bool {
        let parts: Vec<String> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(|i| i.value.to_ascii_lowercase()))
            .collect();
        match parts.as_slice() {
            [table] => {
                self.catalog_tables.iter().any(|t| t == table)
                    && !self.datasets.iter().any(|d| d == table)
            }
            [schema, _] | [_, schema, _] => {
                schema == "pg_catalog" || schema == "information_schema"
            }
            _ => false,
        }
    }

    /// Plans a catalog query: the client's text through the PostgreSQL compatibility
    /// rewrites, then DataFusion, refusing anything but a query.
    pub async fn plan(&self, sql: &str) -> Result<LogicalPlan> {
        let mut stmts = self
            .parser
            .parse(sql)
            .map_err(|e| Error::InvalidQuery(format!("syntax error: {e}")))?;
        if stmts.len() != 1 {
            return Err(Error::InvalidQuery(format!(
                "expected one statement, found {}",
                stmts.len()
            )));
        }
        let mut stmt = stmts.remove(0);
        rewrite_like_escapes(&mut stmt);
        if !matches!(stmt, Statement::Query(_)) {
            return Err(Error::InvalidQuery(
                "only queries (SELECT) are accepted; statements that define or change data \
                 are not supported"
                    .into(),
            ));
        }
        let state = self.ctx.state();
        let plan = state
            .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
                stmt,
            )))
            .await
            .map_err(Error::from_datafusion)?;
        crate::owner::session::query_only()
            .verify_plan(&plan)
            .map_err(|e| Error::InvalidQuery(e.to_string()))?;
        Ok(plan)
    }

    /// Runs a planned catalog query on the process's low-priority lane
    /// (`owner::lanes`): a caller's expressions over the catalog cost CPU that no
    /// admission slot accounts for, so they get what the machine has left over. The
    /// batches come back over a channel; dropping the stream (the client's deadline,
    /// a cancel, a closed connection) aborts the task at its next yield.
    pub async fn run(
        &self,
        plan: LogicalPlan,
    ) -> Result<impl futures::Stream<Item = Result<RecordBatch>> + Send + Unpin + 'static> {
        let df = self
            .ctx
            .execute_logical_plan(plan)
            .await
            .map_err(Error::from_datafusion)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let task = crate::owner::lanes::handle(true).spawn(async move {
            let mut stream = match df.execute_stream().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(Error::from_datafusion(e))).await;
                    return;
                }
            };
            while let Some(b) = stream.next().await {
                if tx.send(b.map_err(Error::from_datafusion)).await.is_err() {
                    return;
                }
            }
        });
        let guard = AbortOnDrop(task.abort_handle());
        Ok(Box::pin(futures::stream::unfold(
            (rx, guard),
            |(mut rx, guard)| async move { rx.recv().await.map(|b| (b, (rx, guard))) },
        )))
    }
}

/// Aborts a task when the stream holding it is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
