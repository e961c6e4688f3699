//! A project's session: a DataFusion context whose catalogue holds only the project's granted
//! datasets, each as a [`GuardedTable`] exposing only its granted columns, with the gateway's
//! functions, limits and perturbation key. The datasets themselves are opened and checked in
//! [`super`].

use super::*;

impl Engine {
    /// A session for one project: only granted tables and columns, each guarded.
    /// The session carries the perturbation key as a config extension (see
    /// [`crate::policy::plan_and_check`]), so that a plan built in it can release sums.
    pub fn session(&self, access: &ProjectAccess) -> Result<SessionContext, EngineError> {
        let partitions = SessionConfig::new().target_partitions();
        self.session_with_runtime(access, Arc::new(RuntimeEnv::default()), partitions)
    }

    /// As [`Engine::session`], running under `runtime` (the query's memory pool) on
    /// `partitions` partitions.
    pub fn session_with_runtime(
        &self,
        access: &ProjectAccess,
        runtime: Arc<RuntimeEnv>,
        partitions: usize,
    ) -> Result<SessionContext, EngineError> {
        let mut config = SessionConfig::new()
            .with_target_partitions(partitions)
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(false);
        if let Some(key) = &self.perturbation_key {
            config = config.with_extension(Arc::clone(key));
        }
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        capped::register(&ctx, self.max_value_bytes);
        overflow::register(&ctx);
        total::register(&ctx);
        let cohort = match &access.cohort {
            Some(sql) => Some(self.cohort_expr(&ctx, sql)?),
            None => None,
        };
        let population = match access.grants.contains_key(POPULATION) {
            true => Some(self.table_for(access, POPULATION)?.0),
            false => self.datasets.get(POPULATION),
        };
        for (dataset, columns) in &access.grants {
            let source = self.source_for(access, dataset)?;
            let table = GuardedTable {
                name: dataset.clone(),
                schema: granted_schema(dataset, &source.table.schema(), columns)?,
                source: source.table,
                opt_outs: source.opt_outs,
                most_rows_per_person: source.most_rows_per_person,
                identifiers: self.identifiers.get(dataset).cloned().unwrap_or_default(),
                cohort: match (&cohort, population) {
                    (Some(expr), Some(population)) => Some(Cohort {
                        expr: expr.clone(),
                        population: Arc::clone(population) as Arc<dyn TableProvider>,
                    }),
                    (Some(_), None) => return Err(EngineError::UnknownDataset(POPULATION.into())),
                    (None, _) => None,
                },
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
                let source = self.source_for(access, dataset)?;
                Ok((
                    dataset.clone(),
                    granted_schema(dataset, &source.table.schema(), columns)?,
                ))
            })
            .collect()
    }

    /// Every dataset's columns, for checking grants.
    pub fn columns(&self) -> BTreeMap<String, Vec<String>> {
        self.datasets
            .iter()
            .map(|(name, table)| {
                let columns = table.schema().fields().iter().map(|f| f.name().clone()).collect();
                (name.clone(), columns)
            })
            .collect()
    }

    /// Checks that a cohort predicate is a valid expression over the population table.
    pub fn check_cohort(&self, sql: &str) -> Result<(), EngineError> {
        self.cohort_expr(&SessionContext::new(), sql).map(|_| ())
    }

    pub(super) fn cohort_expr(&self, ctx: &SessionContext, sql: &str) -> Result<Expr, EngineError> {
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
