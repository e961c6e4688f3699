//! The table a project's session scans: a granted dataset with only its granted columns, and
//! the people on the opt-out register and outside the project's cohort removed beneath every
//! scan, so that no query, however written, sees them. It also carries what the policy may
//! rely on about its rows (identifier columns, the most rows one person has). Which datasets
//! and columns are granted is decided in [`super`]; this module only enforces it.

use super::*;

/// A granted dataset as a project sees it: granted columns only, opt-outs and people outside
/// the cohort removed beneath every scan.
#[derive(Debug)]
pub struct GuardedTable {
    pub(super) name: String,
    pub(super) schema: SchemaRef,
    pub(super) source: Arc<dyn TableProvider>,
    /// The opt-out register to remove beneath every scan; `None` when `source` is a served
    /// copy that has none of its people.
    pub(super) opt_outs: Option<Arc<dyn TableProvider>>,
    /// Where every row has a `person_id`: the most rows any one person has (known for served
    /// copies; 1 where no two rows share one).
    pub(super) most_rows_per_person: Option<u64>,
    /// Identifier columns besides `person_id`.
    pub(super) identifiers: Vec<String>,
    pub(super) cohort: Option<Cohort>,
}

impl GuardedTable {
    /// Guards `source` (every column granted, no cohort); for tests and tools.
    pub fn new(name: &str, source: Arc<dyn TableProvider>, opt_outs: Arc<dyn TableProvider>) -> Self {
        Self {
            name: name.to_owned(),
            schema: source.schema(),
            source,
            opt_outs: Some(opt_outs),
            most_rows_per_person: None,
            identifiers: vec![],
            cohort: None,
        }
    }

    /// Marks more columns as identifiers.
    pub fn with_identifiers(mut self, columns: &[&str]) -> Self {
        self.identifiers.extend(columns.iter().map(|c| c.to_string()));
        self
    }

    /// Marks the source as having one row per person, each with a `person_id` (so a count of
    /// rows is a count of people); for tests and tools.
    pub fn with_one_row_per_person(self) -> Self {
        self.with_most_rows_per_person(1)
    }

    /// Marks the source as having a `person_id` on every row and at most `most` rows per
    /// person (so a count of rows divided by `most` is at least the people); for tests and tools.
    pub fn with_most_rows_per_person(mut self, most: u64) -> Self {
        self.most_rows_per_person = Some(most.max(1));
        self
    }

    /// Whether every row has a `person_id` and no two rows share one.
    pub fn one_row_per_person(&self) -> bool {
        self.most_rows_per_person == Some(1)
    }

    /// Where every row has a `person_id`: the most rows any one person has.
    pub fn most_rows_per_person(&self) -> Option<u64> {
        self.most_rows_per_person
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
pub(super) fn join_people(
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
pub(super) fn unqualify(expr: &Expr) -> DFResult<Expr> {
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
        if self.opt_outs.is_none() && self.cohort.is_none() {
            // A served copy with nothing to remove: its own scan, with the granted columns
            // mapped to the copy's (filters are used to prune; they are applied again above).
            let source = self.source.schema();
            let wanted: Vec<&str> = match projection {
                Some(indices) => indices.iter().map(|&i| self.schema.field(i).name().as_str()).collect(),
                None => self.schema.fields().iter().map(|f| f.name().as_str()).collect(),
            };
            let indices = wanted
                .into_iter()
                .map(|c| source.index_of(c))
                .collect::<Result<Vec<_>, _>>()?;
            let filters = filters.iter().map(unqualify).collect::<DFResult<Vec<_>>>()?;
            return self.source.scan(state, Some(&indices), &filters, None).await;
        }
        let mut plan = LogicalPlanBuilder::scan(name, provider_as_source(Arc::clone(&self.source)), None)?;
        if let Some(cohort) = &self.cohort {
            plan = join_people(plan, name, &cohort.population, Some(&cohort.expr), JoinType::LeftSemi)?;
        }
        if let Some(opt_outs) = &self.opt_outs {
            plan = join_people(plan, name, opt_outs, None, JoinType::LeftAnti)?;
        }
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
