//! What every database behind a member has in common, whatever its protocol.
//!
//! A [`RemoteDatabase`] is one database (PostgreSQL, a MySQL-protocol server or a
//! Flight SQL engine) that the member reaches over the network. Each mapped table
//! becomes a [`RemoteTable`] in the member's private context. Work is pushed into the
//! database by [`super::pushdown`], which turns whole sub-plans over one database into
//! one statement in the database's [`Dialect`]; what runs there is a [`RemoteExec`],
//! which streams the answer back as Arrow batches whose types are exactly the plan's:
//! each database's reader converts what the server sends into the type the plan
//! expects, and fails the query (never rounds or truncates silently) when a value
//! does not fit.

use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};

pub use crate::config::Dialect;
use crate::error::{Error, Result};

/// Rows per Arrow batch read from a database.
pub const BATCH_ROWS: usize = 8192;

/// Where batches of an answer go; closed when the query was cancelled.
pub type BatchSender = tokio::sync::mpsc::Sender<DfResult<RecordBatch>>;

/// One database behind a member.
#[async_trait]
pub trait RemoteDatabase: Send + Sync + fmt::Debug {
    /// The database's name in the member file.
    fn name(&self) -> &str;

    /// The SQL it speaks.
    fn dialect(&self) -> Dialect;

    /// Whether text compares and sorts byte-wise there, as it does in DataFusion:
    /// comparisons, orderings and groupings of text are pushed only then (PostgreSQL
    /// compares text for equality byte-wise under every deterministic collation, so
    /// there this governs ordering only).
    fn byte_wise_text(&self) -> bool;

    /// Whether `=`, `IN`, `GROUP BY` and `DISTINCT` of text mean there what they mean in
    /// DataFusion. By default when text compares byte-wise.
    fn text_equality(&self) -> bool {
        self.byte_wise_text()
    }

    /// Whether `a || b` concatenates there. It does in PostgreSQL and DataFusion and in
    /// the MySQL sessions a member sets up (`PIPES_AS_CONCAT`); in an engine of the
    /// MySQL dialect whose session the member does not set (Doris, StarRocks over
    /// Flight SQL) it is a logical OR.
    fn pipes_concatenate(&self) -> bool {
        true
    }

    /// Whether values of type `t` can be read from it.
    fn readable(&self, t: &arrow::datatypes::DataType) -> bool;

    /// Reads a table's columns and maps their types to Arrow.
    async fn discover(&self, schema: &str, table: &str) -> Result<SchemaRef>;

    /// The statement sent to the database to read `inner`, whose columns are, by
    /// position, `fields`.
    fn statement(&self, inner: &str, fields: &[Arc<Field>]) -> Result<String>;

    /// Runs `sql` and sends its rows as batches of `schema`. When the receiver goes
    /// away (the query was cancelled or its deadline passed), the statement is
    /// cancelled in the database too rather than left running.
    async fn run(&self, sql: &str, schema: SchemaRef, tx: &BatchSender) -> Result<()>;
}

/// What a SQLSTATE data exception (class 22) is, in words that carry no value.
pub fn data_exception(code: &str) -> &'static str {
    match code {
        "22012" => "division by zero",
        "22003" => "a value out of range",
        "22001" => "a string too long",
        "22007" | "22008" => "an invalid date or time",
        "22P02" | "22018" => "a value of the wrong type",
        _ => "a data exception",
    }
}

/// Whether two handles are the same database.
pub fn same(a: &Arc<dyn RemoteDatabase>, b: &Arc<dyn RemoteDatabase>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// Quotes an identifier in `dialect`.
pub fn quote(dialect: Dialect, ident: &str) -> String {
    let q = if dialect == Dialect::MySql { '`' } else { '"' };
    format!("{q}{}{q}", ident.replace(q, &format!("{q}{q}")))
}

/// The statement that reads every column of `schema.table` (`table` alone when the
/// schema is empty).
fn select_all(dialect: Dialect, schema: &str, table: &str, cols: &Schema) -> String {
    let names: Vec<String> = cols
        .fields()
        .iter()
        .map(|f| quote(dialect, f.name()))
        .collect();
    let table = if schema.is_empty() {
        quote(dialect, table)
    } else {
        format!("{}.{}", quote(dialect, schema), quote(dialect, table))
    };
    format!("SELECT {} FROM {table}", names.join(", "))
}

/// A table in a database, as the member's private context sees it, with the name the
/// pushdown rule writes into SQL.
#[derive(Debug)]
pub struct RemoteTable {
    schema_name: String,
    table: String,
    all: RemoteQuery,
}

impl RemoteTable {
    /// Discovers `schema.table` in `db`.
    pub async fn discover(
        db: Arc<dyn RemoteDatabase>,
        schema: &str,
        table: &str,
    ) -> Result<RemoteTable> {
        let cols = db.discover(schema, table).await?;
        let sql = select_all(db.dialect(), schema, table, &cols);
        Ok(RemoteTable {
            schema_name: schema.to_string(),
            table: table.to_string(),
            all: RemoteQuery::new(db, sql, cols),
        })
    }

    /// The database.
    pub fn database(&self) -> &Arc<dyn RemoteDatabase> {
        &self.all.db
    }

    /// The table's qualified name in the database (an empty schema for none).
    pub fn remote_name(&self) -> (&str, &str) {
        (&self.schema_name, &self.table)
    }
}

#[async_trait]
impl TableProvider for RemoteTable {
    fn schema(&self) -> SchemaRef {
        self.all.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters stay in the plan, where the pushdown rule moves whole sub-plans
        // (filters included) into the database when every expression can go there.
        self.all.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.all.scan(state, projection, filters, limit).await
    }
}

/// The result of SQL run in a database, as a table the pushdown rule scans.
#[derive(Debug)]
pub struct RemoteQuery {
    db: Arc<dyn RemoteDatabase>,
    /// The SQL whose columns are, by position, `schema`'s fields.
    sql: String,
    schema: SchemaRef,
}

impl RemoteQuery {
    /// A query whose result has `schema` (by position).
    pub fn new(db: Arc<dyn RemoteDatabase>, sql: String, schema: SchemaRef) -> RemoteQuery {
        RemoteQuery { db, sql, schema }
    }

    /// The database it runs in.
    pub(crate) fn db(&self) -> &Arc<dyn RemoteDatabase> {
        &self.db
    }

    /// Its SQL, before the database's statement wraps it.
    pub(crate) fn sql(&self) -> &str {
        &self.sql
    }

    /// What it answers, by position.
    pub(crate) fn read_schema(&self) -> &SchemaRef {
        &self.schema
    }
}

#[async_trait]
impl TableProvider for RemoteQuery {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        RemoteExec::try_new(
            self.db.clone(),
            &self.sql,
            self.schema.clone(),
            projection.cloned(),
            limit,
        )
        .map(|e| Arc::new(e) as Arc<dyn ExecutionPlan>)
        .map_err(Error::into_datafusion)
    }
}

/// Runs one statement in a database and streams its rows as Arrow batches.
#[derive(Debug)]
pub struct RemoteExec {
    db: Arc<dyn RemoteDatabase>,
    sql: String,
    /// What the statement answers, by position.
    read: SchemaRef,
    /// The columns of `read` this plan passes on, and at most how many rows.
    projection: Option<Vec<usize>>,
    limit: Option<usize>,
    props: Arc<PlanProperties>,
}

impl RemoteExec {
    fn try_new(
        db: Arc<dyn RemoteDatabase>,
        inner: &str,
        read: SchemaRef,
        projection: Option<Vec<usize>>,
        limit: Option<usize>,
    ) -> Result<RemoteExec> {
        let fields: Vec<Arc<Field>> = read.fields().iter().cloned().collect();
        let sql = db.statement(inner, &fields)?;
        let schema = match &projection {
            Some(p) => Arc::new(
                read.project(p)
                    .map_err(|e| Error::Internal(e.to_string()))?,
            ),
            None => read.clone(),
        };
        let props = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(RemoteExec {
            db,
            sql,
            read,
            projection,
            limit,
            props,
        })
    }

    /// The same statement around another query of the same columns (`inner`, as
    /// [`RemoteQuery`] holds it), with the same projection and limit.
    pub(crate) fn with_inner(&self, inner: &str) -> Result<RemoteExec> {
        RemoteExec::try_new(
            self.db.clone(),
            inner,
            self.read.clone(),
            self.projection.clone(),
            self.limit,
        )
    }

    /// What the statement answers, by position.
    pub(crate) fn read_schema(&self) -> &SchemaRef {
        &self.read
    }

    /// The database this runs in.
    pub fn database(&self) -> &str {
        self.db.name()
    }

    /// The statement sent to the database.
    pub fn sql(&self) -> &str {
        &self.sql
    }
}

impl DisplayAs for RemoteExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "DatabaseExec: database={} sql={}",
            self.db.name(),
            self.sql
        )
    }
}

impl ExecutionPlan for RemoteExec {
    fn name(&self) -> &str {
        "DatabaseExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "DatabaseExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "DatabaseExec has one partition, not {partition}"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<DfResult<RecordBatch>>(2);
        let db = self.db.clone();
        let sql = self.sql.clone();
        let read = self.read.clone();
        tokio::spawn(async move {
            if let Err(e) = db.run(&sql, read, &tx).await {
                let _ = tx.send(Err(e.into_datafusion())).await;
            }
        });
        let projection = self.projection.clone();
        // The statement is read whole, by position; a projection or row limit that
        // DataFusion gives the scan is applied here, as the rows arrive. Once the limit
        // is met the channel is dropped, which stops the statement in the database.
        let stream = futures::stream::unfold((rx, self.limit), move |(mut rx, left)| {
            let projection = projection.clone();
            async move {
                if left == Some(0) {
                    return None;
                }
                let b = rx.recv().await?.and_then(|b| match &projection {
                    Some(p) => Ok(b.project(p)?),
                    None => Ok(b),
                });
                let (b, left) = match (b, left) {
                    (Ok(b), Some(n)) => {
                        let take = b.num_rows().min(n);
                        (Ok(b.slice(0, take)), Some(n - take))
                    }
                    (Ok(b), None) => (Ok(b), None),
                    // An error is the last thing the stream tells.
                    (Err(e), _) => (Err(e), Some(0)),
                };
                Some((b, (rx, left)))
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.props.eq_properties.schema().clone(),
            stream,
        )))
    }
}
