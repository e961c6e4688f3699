//! Safe Data at query time. Each project gets a DataFusion [`SessionContext`] whose catalogue
//! holds only its granted datasets, each exposing only its granted columns. Every scan of a
//! granted table removes the people on the opt-out register (an anti-join on `person_id`) and
//! keeps only the project's cohort, *under* the scan, so no query — however written — sees an
//! opted-out person or one outside the cohort. The opt-out register itself is never registered
//! in any catalogue, so it cannot be named in SQL.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{Expr, JoinType, LogicalPlanBuilder, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::registry::ProjectAccess;

/// The privacy unit: the pseudonymised person identifier present in every dataset.
pub const PERSON_ID: &str = "person_id";
/// The dataset holding the opt-out register. Never queryable.
pub const OPT_OUTS: &str = "opt_outs";
/// The dataset a project's cohort predicate is written against.
pub const POPULATION: &str = "patients";
/// Catalogue and schema under which a project's tables are listed.
pub const CATALOG: &str = "sde";
pub const SCHEMA: &str = "public";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("data folder {0} has no opt-out register ({OPT_OUTS}/); refusing to serve data without it")]
    NoOptOuts(String),
    #[error("cannot open dataset {dataset}: {source}")]
    Dataset { dataset: String, source: DataFusionError },
    #[error("cannot read data folder {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("project grants dataset {0}, which is not loaded")]
    UnknownDataset(String),
    #[error("project grants column {dataset}.{column}, which does not exist")]
    UnknownColumn { dataset: String, column: String },
    #[error("dataset {0} has no {PERSON_ID} column, so people cannot be counted in it")]
    NoPersonId(String),
    #[error("the project's cohort filter is not valid: {0}")]
    Cohort(DataFusionError),
    #[error("query execution failed: {0}")]
    Execution(DataFusionError),
}

/// The loaded datasets; shared by every project's session.
#[derive(Debug)]
pub struct Engine {
    datasets: BTreeMap<String, Arc<ListingTable>>,
    opt_outs: Arc<ListingTable>,
    /// Per dataset, columns besides `person_id` that are identifiers.
    identifiers: BTreeMap<String, Vec<String>>,
}

impl Engine {
    /// Opens every sub-folder of `dir` as a Parquet dataset. `opt_outs/` must exist.
    /// `identifiers` names, per dataset, the columns besides `person_id` that are identifiers.
    pub async fn open(dir: &Path, identifiers: &BTreeMap<String, Vec<String>>) -> Result<Self, EngineError> {
        let io = |source| EngineError::Io {
            path: dir.display().to_string(),
            source,
        };
        let ctx = SessionContext::new();
        let mut datasets = BTreeMap::new();
        let mut opt_outs = None;
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(io)?
            .collect::<Result<_, _>>()
            .map_err(io)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            if !entry.file_type().map_err(io)?.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let table = open_listing(&ctx, &entry.path())
                .await
                .map_err(|source| EngineError::Dataset {
                    dataset: name.clone(),
                    source,
                })?;
            if table.schema().field_with_name(PERSON_ID).is_err() {
                return Err(EngineError::NoPersonId(name));
            }
            if name == OPT_OUTS {
                opt_outs = Some(table);
            } else {
                datasets.insert(name, table);
            }
        }
        let opt_outs = opt_outs.ok_or_else(|| EngineError::NoOptOuts(dir.display().to_string()))?;
        for (dataset, columns) in identifiers {
            let table = datasets
                .get(dataset)
                .ok_or_else(|| EngineError::UnknownDataset(dataset.clone()))?;
            for column in columns {
                if table.schema().field_with_name(column).is_err() {
                    return Err(EngineError::UnknownColumn {
                        dataset: dataset.clone(),
                        column: column.clone(),
                    });
                }
            }
        }
        Ok(Self {
            datasets,
            opt_outs,
            identifiers: identifiers.clone(),
        })
    }

    pub fn dataset_names(&self) -> impl Iterator<Item = &str> {
        self.datasets.keys().map(String::as_str)
    }

    /// A session for one project: only granted tables and columns, each guarded.
    pub fn session(&self, access: &ProjectAccess) -> Result<SessionContext, EngineError> {
        self.session_with_runtime(access, Arc::new(RuntimeEnv::default()))
    }

    /// As [`Engine::session`], running under `runtime` (the query's memory pool).
    pub fn session_with_runtime(
        &self,
        access: &ProjectAccess,
        runtime: Arc<RuntimeEnv>,
    ) -> Result<SessionContext, EngineError> {
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(false);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let cohort = match &access.cohort {
            Some(sql) => Some(self.cohort_expr(&ctx, sql)?),
            None => None,
        };
        for (dataset, columns) in &access.grants {
            let source = self
                .datasets
                .get(dataset)
                .ok_or_else(|| EngineError::UnknownDataset(dataset.clone()))?;
            let table = GuardedTable {
                name: dataset.clone(),
                schema: granted_schema(dataset, &source.schema(), columns)?,
                source: Arc::clone(source) as Arc<dyn TableProvider>,
                opt_outs: Arc::clone(&self.opt_outs) as Arc<dyn TableProvider>,
                identifiers: self.identifiers.get(dataset).cloned().unwrap_or_default(),
                cohort: cohort.clone().map(|expr| Cohort {
                    expr,
                    population: Arc::clone(&self.datasets[POPULATION]) as Arc<dyn TableProvider>,
                }),
            };
            ctx.register_table(dataset.as_str(), Arc::new(table))
                .map_err(|e| EngineError::Dataset {
                    dataset: dataset.clone(),
                    source: e,
                })?;
        }
        Ok(ctx)
    }

    /// Each granted table's schema (granted columns only), by name.
    pub fn granted_schemas(&self, access: &ProjectAccess) -> Result<Vec<(String, SchemaRef)>, EngineError> {
        access
            .grants
            .iter()
            .map(|(dataset, columns)| {
                let source = self
                    .datasets
                    .get(dataset)
                    .ok_or_else(|| EngineError::UnknownDataset(dataset.clone()))?;
                Ok((dataset.clone(), granted_schema(dataset, &source.schema(), columns)?))
            })
            .collect()
    }

    fn cohort_expr(&self, ctx: &SessionContext, sql: &str) -> Result<Expr, EngineError> {
        let population = self
            .datasets
            .get(POPULATION)
            .ok_or_else(|| EngineError::UnknownDataset(POPULATION.into()))?;
        let schema = DFSchema::try_from(population.schema().as_ref().clone()).map_err(EngineError::Cohort)?;
        ctx.state()
            .create_logical_expr(sql, &schema)
            .map_err(EngineError::Cohort)
    }
}

/// The columns of `full` that are granted, in grant order.
fn granted_schema(dataset: &str, full: &SchemaRef, columns: &[String]) -> Result<SchemaRef, EngineError> {
    let fields = columns
        .iter()
        .map(|column| {
            full.field_with_name(column)
                .cloned()
                .map_err(|_| EngineError::UnknownColumn {
                    dataset: dataset.to_owned(),
                    column: column.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(Schema::new(fields)))
}

async fn open_listing(ctx: &SessionContext, dir: &Path) -> DFResult<Arc<ListingTable>> {
    let url = ListingTableUrl::parse(dir.to_string_lossy())?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .infer_schema(&ctx.state())
        .await?;
    Ok(Arc::new(ListingTable::try_new(config)?))
}

#[derive(Debug, Clone)]
struct Cohort {
    /// Predicate over the population table's columns.
    expr: Expr,
    population: Arc<dyn TableProvider>,
}

/// A granted dataset as a project sees it: granted columns only, opt-outs and people outside
/// the cohort removed beneath every scan.
#[derive(Debug)]
pub struct GuardedTable {
    name: String,
    schema: SchemaRef,
    source: Arc<dyn TableProvider>,
    opt_outs: Arc<dyn TableProvider>,
    /// Identifier columns besides `person_id`.
    identifiers: Vec<String>,
    cohort: Option<Cohort>,
}

impl GuardedTable {
    /// Guards `source` (every column granted, no cohort); for tests and tools.
    pub fn new(name: &str, source: Arc<dyn TableProvider>, opt_outs: Arc<dyn TableProvider>) -> Self {
        Self {
            name: name.to_owned(),
            schema: source.schema(),
            source,
            opt_outs,
            identifiers: vec![],
            cohort: None,
        }
    }

    /// Marks more columns as identifiers.
    pub fn with_identifiers(mut self, columns: &[&str]) -> Self {
        self.identifiers.extend(columns.iter().map(|c| c.to_string()));
        self
    }

    /// The dataset name, as granted.
    pub fn dataset(&self) -> &str {
        &self.name
    }

    /// Whether `column` is the person identifier, or another identifier marked in the data
    /// config; both are usable only as join keys or in COUNT(DISTINCT …).
    pub fn is_identifier(&self, column: &str) -> bool {
        column == PERSON_ID || self.identifiers.iter().any(|c| c == column)
    }
}

/// Keeps (semi-join) or removes (anti-join) the rows of `plan` whose person is among the people
/// of `people` (optionally filtered by `filter`).
fn join_people(
    plan: LogicalPlanBuilder,
    name: &str,
    people: &Arc<dyn TableProvider>,
    filter: Option<&Expr>,
    join_type: JoinType,
) -> DFResult<LogicalPlanBuilder> {
    const PEOPLE: &str = "__sde_people";
    let key = |table: &str| Column::new(Some(table), PERSON_ID);
    let mut people = LogicalPlanBuilder::scan(PEOPLE, provider_as_source(Arc::clone(people)), None)?;
    if let Some(filter) = filter {
        people = people.filter(filter.clone())?;
    }
    let people = people.project(vec![Expr::Column(key(PEOPLE))])?.build()?;
    plan.join(people, join_type, (vec![key(name)], vec![key(PEOPLE)]), None)
}

/// Drops qualifiers: filters handed to a scan are qualified with the name the query used.
fn unqualify(expr: &Expr) -> DFResult<Expr> {
    expr.clone()
        .transform(|e| match e {
            Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(c.name)))),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
}

#[async_trait]
impl TableProvider for GuardedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DFResult<Vec<TableProviderFilterPushDown>> {
        // Inexact: filters are used to prune the read, and applied again above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let name = self.name.as_str();
        let mut plan = LogicalPlanBuilder::scan(name, provider_as_source(Arc::clone(&self.source)), None)?;
        if let Some(cohort) = &self.cohort {
            plan = join_people(plan, name, &cohort.population, Some(&cohort.expr), JoinType::LeftSemi)?;
        }
        plan = join_people(plan, name, &self.opt_outs, None, JoinType::LeftAnti)?;
        for filter in filters {
            plan = plan.filter(unqualify(filter)?)?;
        }
        let columns: Vec<Expr> = match projection {
            Some(indices) => indices
                .iter()
                .map(|&i| Expr::Column(Column::new(Some(name), self.schema.field(i).name())))
                .collect(),
            None => self
                .schema
                .fields()
                .iter()
                .map(|f| Expr::Column(Column::new(Some(name), f.name())))
                .collect(),
        };
        let plan = plan.project(columns)?.build()?;
        state.create_physical_plan(&plan).await
    }
}

impl GuardedTable {
    pub fn as_guarded(provider: &dyn TableProvider) -> Option<&GuardedTable> {
        (provider as &dyn Any).downcast_ref::<GuardedTable>()
    }
}
