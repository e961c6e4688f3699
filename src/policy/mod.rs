//! Safe Outputs, the structural part: checks and rewrites on DataFusion's logical plan, never on
//! the SQL text, so no spelling of a query (CTEs, subqueries, aliases, casing, comments) can
//! dodge them.
//!
//! What this module guarantees for a plan it permits:
//! - it is a single read-only query over granted tables;
//! - no row-level data reaches the output: every path from a table to the result passes through
//!   an aggregate, and every aggregate over person-level rows is *protected* — rewritten so that
//!   the same execution counts the distinct people behind each group and each cell, and the
//!   disclosure rules are applied to its output before anything else can use it;
//! - only COUNT, COUNT(DISTINCT), SUM and AVG aggregate person-level rows;
//! - identifiers (`person_id`) appear only as equi-join keys, in `person_id IN (SELECT
//!   person_id …)`, or inside COUNT(DISTINCT …).
//!
//! Identifiers are tracked by lineage: a column is an identifier if it is one in a table, or a
//! bare pass-through of one. Projections that would drop every identifier of person-level rows
//! get them appended (as `__sde_pid_N`), so people can always be counted where the rows are
//! aggregated. A plan is person-level exactly when its output still carries identifiers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::NullEquality;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::utils::expr::COUNT_STAR_EXPANSION;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::datasource::source_as_provider;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::functions::core::expr_fn::get_field;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, sum};
use datafusion::logical_expr::expr::{AggregateFunction, InSubquery};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, Filter, JoinType, LogicalPlan, Operator, Projection, Subquery, lit, when,
};
use datafusion::logical_expr::{ExprSchemable, LogicalPlanBuilder, cast};
use datafusion::prelude::SessionContext;

use crate::disclosure::{Disclosure, Overrides, Rules, largest, people_at_least, shares};
use crate::engine::{GuardedTable, PERSON_ID};

pub mod statement;
pub use statement::StatementLimits;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("safe-outputs/single-query: only a single read-only SELECT query is accepted, not {0}")]
    NotAQuery(String),
    #[error(
        "safe-outputs/aggregate-only: the result would contain row-level data; every output column must be a GROUP BY key or an aggregate (COUNT, COUNT(DISTINCT …), SUM, AVG)"
    )]
    RowLevel,
    #[error("safe-outputs/allowed-aggregates: {function} is not allowed: {advice}")]
    Function { function: String, advice: &'static str },
    #[error(
        "safe-outputs/identifiers: {column} is an identifier; it may appear only as an equi-join key (a.person_id = b.person_id), in person_id IN (SELECT person_id …), or inside COUNT(DISTINCT …), not {place}"
    )]
    Identifier { column: String, place: &'static str },
    #[error("safe-outputs/unsupported: {0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Differencing(#[from] crate::disclosure::DifferencingRefused),
    #[error("safe-outputs/query-too-long: the SQL text is {0} bytes; the limit is {1}")]
    TooLong(usize, usize),
    #[error("safe-outputs/invalid-query: {0}")]
    Sql(String),
    #[error(
        "safe-settings/complexity: the query's {what} is {value}, more than the limit of {max} (limits.{key}); {advice}"
    )]
    Complexity {
        what: &'static str,
        value: usize,
        max: usize,
        key: &'static str,
        advice: &'static str,
    },
    #[error(
        "safe-settings/functions: {function} is not allowed: {reason}; the functions a query may call are listed in docs/disclosure.md"
    )]
    FunctionNotAllowed { function: String, reason: &'static str },
}

impl PolicyError {
    fn into_df(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }

    fn from_df(e: DataFusionError) -> Self {
        match e {
            DataFusionError::External(inner) => match inner.downcast::<PolicyError>() {
                Ok(p) => *p,
                Err(other) => PolicyError::Sql(other.to_string()),
            },
            DataFusionError::Context(_, inner) => Self::from_df(*inner),
            DataFusionError::SQL(e, _) => PolicyError::Sql(e.to_string()),
            other => PolicyError::Sql(other.strip_backtrace()),
        }
    }
}

/// A plan that passed every check, rewritten for disclosure control. Only this module can make
/// one (its fields are private), and the gateway executes nothing else.
#[derive(Debug, Clone)]
pub struct Permit {
    plan: LogicalPlan,
    /// The same query counting people from rows where it can (see [`Permit::from_rows`]).
    from_rows: Option<LogicalPlan>,
    disclosure: Disclosure,
    checked: Vec<String>,
}

impl Permit {
    pub fn plan(&self) -> &LogicalPlan {
        &self.plan
    }

    /// Where some aggregate reads a table whose rows each have a person, none more than a known
    /// number, and needs to know only whether each group has `threshold` people: the plan that
    /// tells its people from its rows instead of reading who they are
    /// ([`Disclosure::people_from_rows`]). It releases exactly what [`Permit::plan`] releases,
    /// or fails with [`crate::disclosure::Unsettled`] where rows cannot tell; then
    /// [`Permit::plan`] runs.
    pub fn from_rows(&self) -> Option<&LogicalPlan> {
        self.from_rows.as_ref()
    }

    pub fn disclosure(&self) -> &Disclosure {
        &self.disclosure
    }

    /// This permit and `optimised` (one of its plans, optimised) with disclosure functions of
    /// their own, so that what one run withholds is not counted in another's report (a kept
    /// plan run again).
    pub fn rebound(&self, optimised: &LogicalPlan) -> datafusion::error::Result<(Permit, LogicalPlan)> {
        let disclosure = Disclosure::new(self.disclosure.rules());
        let plan = disclosure.rebind(self.plan.clone())?;
        let from_rows = self.from_rows.clone().map(|p| disclosure.rebind(p)).transpose()?;
        let optimised = disclosure.rebind(optimised.clone())?;
        let permit = Permit {
            plan,
            from_rows,
            disclosure,
            checked: self.checked.clone(),
        };
        Ok((permit, optimised))
    }

    /// Output columns whose values passed through disclosure control.
    pub fn checked_columns(&self) -> &[String] {
        &self.checked
    }
}

/// Plans `sql` in the project's session and checks it; a refusal names its rule.
pub async fn plan_and_check(
    ctx: &SessionContext,
    sql: &str,
    rules: Rules,
    limits: &StatementLimits,
) -> Result<Permit, PolicyError> {
    plan_and_check_with(ctx, sql, rules, &Default::default(), limits).await
}

/// As [`plan_and_check`], tightening `rules` with the overrides of every dataset the query reads.
pub async fn plan_and_check_with(
    ctx: &SessionContext,
    sql: &str,
    rules: Rules,
    dataset_rules: &BTreeMap<String, Overrides>,
    limits: &StatementLimits,
) -> Result<Permit, PolicyError> {
    let plan = plan_sql(ctx, sql, limits).await?;
    check_with(plan, rules, dataset_rules)
}

/// The first half of [`plan_and_check_with`]: SQL to an (unchecked) logical plan.
pub async fn plan_sql(ctx: &SessionContext, sql: &str, limits: &StatementLimits) -> Result<LogicalPlan, PolicyError> {
    let state = ctx.state();
    let statement = statement::admit(&state, sql, limits)?;
    let plan = state.statement_to_plan(statement).await.map_err(PolicyError::from_df)?;
    statement::bound_plan(&plan, limits)?;
    Ok(plan)
}

/// The second half of [`plan_and_check_with`]: the checks and rewrites, under the strictest
/// rules of the datasets the plan reads.
pub fn check_with(
    plan: LogicalPlan,
    rules: Rules,
    dataset_rules: &BTreeMap<String, Overrides>,
) -> Result<Permit, PolicyError> {
    check_statement_kind(&plan)?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|e| PolicyError::NotAQuery(e.strip_backtrace()))?;
    let rules = datasets_read(&plan)
        .iter()
        .filter_map(|d| dataset_rules.get(d))
        .fold(rules, |r, o| r.tightened(o));
    check(plan, rules)
}

/// Whether a plan reads a table known to have at most some number of rows per person, more
/// than one (where people might be told from rows).
fn several_rows_per_person(plan: &LogicalPlan) -> bool {
    let mut found = false;
    for_each_guarded(plan, |guarded| {
        found |= guarded.most_rows_per_person().is_some_and(|most| most > 1)
    });
    found
}

/// The granted datasets a plan reads, subqueries included.
pub fn datasets_read(plan: &LogicalPlan) -> Vec<String> {
    let mut out = Vec::new();
    for_each_guarded(plan, |guarded| out.push(guarded.dataset().to_owned()));
    out
}

/// Calls `f` with each granted table a plan scans, subqueries included.
fn for_each_guarded(plan: &LogicalPlan, mut f: impl FnMut(&GuardedTable)) {
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
            && let Some(guarded) = GuardedTable::as_guarded(provider.as_ref())
        {
            f(guarded);
        }
        Ok(TreeNodeRecursion::Continue)
    });
}

fn check_statement_kind(plan: &LogicalPlan) -> Result<(), PolicyError> {
    let kind = match plan {
        LogicalPlan::Dml(_) => "a data change (INSERT, UPDATE, DELETE)",
        LogicalPlan::Ddl(_) => "a definition (CREATE, DROP)",
        LogicalPlan::Copy(_) => "COPY",
        LogicalPlan::Statement(_) => "a statement (SET, transactions, PREPARE)",
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => "EXPLAIN",
        LogicalPlan::DescribeTable(_) => "DESCRIBE",
        _ => return Ok(()),
    };
    Err(PolicyError::NotAQuery(kind.into()))
}

/// Prefix of every name the rewrite adds; queries may not use it.
const RESERVED: &str = "__sde_";

/// Whether a side aggregate's alias names a differencing baseline: the query's groups counted
/// without its filters (see [`Checker::protect`]).
pub fn is_differencing_baseline(alias: &str) -> bool {
    alias.starts_with("__sde_side_") && alias.ends_with("_u0")
}

/// Refuses a query that names a relation or column with the rewrite's reserved prefix.
fn check_reserved_names(plan: &LogicalPlan) -> Result<(), PolicyError> {
    let reserved = |name: &str| name.to_lowercase().starts_with(RESERVED);
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        found = matches!(node, LogicalPlan::SubqueryAlias(a) if reserved(a.alias.table()))
            || node.expressions().iter().any(|e| {
                // The search cannot fail; if it did, the query is refused.
                e.exists(|e| Ok(matches!(e, Expr::Alias(a) if reserved(&a.name))))
                    .unwrap_or(true)
            });
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })
    .map_err(PolicyError::from_df)?;
    match found {
        true => Err(PolicyError::Unsupported(
            "names starting with __sde_ are reserved for the gateway",
        )),
        false => Ok(()),
    }
}

/// Checks and rewrites an (unoptimised) logical plan: once counting people one by one, and,
/// where rows can tell enough people for some aggregate, once more telling them from rows.
pub fn check(plan: LogicalPlan, rules: Rules) -> Result<Permit, PolicyError> {
    check_reserved_names(&plan)?;
    let disclosure = Disclosure::new(rules);
    let rewrite = |plan: LogicalPlan, from_rows: bool| {
        let mut checker = Checker {
            disclosure: disclosure.clone(),
            next_id: 0,
            subquery_masks: HashMap::new(),
            checked: vec![],
            from_rows,
            told_from_rows: false,
        };
        let (plan, mask) = checker.visit(plan)?;
        if mask.iter().any(|&m| m != Id::No) {
            return Err(PolicyError::RowLevel);
        }
        Ok((plan, checker))
    };
    let several_rows = several_rows_per_person(&plan);
    let (exact, checker) = rewrite(plan.clone(), false)?;
    // Only an optimisation: if it cannot be made, the query still runs, counting people.
    let from_rows = match several_rows.then(|| rewrite(plan, true)) {
        Some(Ok((from_rows, c))) if c.told_from_rows => Some(from_rows),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no plan telling people from rows");
            None
        }
        _ => None,
    };
    Ok(Permit {
        checked: output_names(&exact, &checker.checked),
        plan: exact,
        from_rows,
        disclosure,
    })
}

/// The names, in the result, of the columns computed from checked aggregate cells.
#[recursive::recursive]
fn output_names(plan: &LogicalPlan, checked: &[String]) -> Vec<String> {
    match plan {
        LogicalPlan::Projection(p) => p
            .expr
            .iter()
            .zip(p.schema.fields())
            .filter(|(e, _)| e.column_refs().iter().any(|c| checked.contains(&c.name)))
            .map(|(_, f)| f.name().clone())
            .collect(),
        LogicalPlan::Sort(_) | LogicalPlan::Limit(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            output_names(plan.inputs()[0], checked)
        }
        _ => checked.to_vec(),
    }
}

/// Prefix of identifier columns appended to projections so people can be counted.
const HIDDEN_PID: &str = "__sde_pid_";

/// The schema a join condition is written against: both inputs, side by side (for every join
/// type, unlike the join's output schema).
fn both_sides_schema(j: &datafusion::logical_expr::Join) -> datafusion::error::Result<DFSchemaRef> {
    Ok(Arc::new(j.left.schema().join(j.right.schema())?))
}

/// For each output field of a plan: is it an identifier?
type Mask = Vec<Id>;

/// What a column is, by lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Id {
    /// Not an identifier.
    No,
    /// The person identifier: the privacy unit, counted for every cell.
    Person,
    /// Another identifier marked in the dataset config: placed like `person_id`, not counted.
    Other,
}

struct Checker {
    disclosure: Disclosure,
    next_id: usize,
    /// Identifier masks of rewritten subquery plans, keyed by the plan's address.
    subquery_masks: HashMap<usize, Mask>,
    checked: Vec<String>,
    /// Whether groups may be judged by their rows where each person has at most a known number
    /// of them ([`Permit::from_rows`]); and whether any was.
    from_rows: bool,
    told_from_rows: bool,
}

fn key(plan: &Arc<LogicalPlan>) -> usize {
    Arc::as_ptr(plan) as usize
}

/// Looks a column up in a schema and says whether it is an identifier.
fn is_identifier_column(c: &Column, schema: &DFSchemaRef, mask: &Mask) -> bool {
    kind_of(c, schema, mask) != Id::No
}

fn kind_of(c: &Column, schema: &DFSchemaRef, mask: &Mask) -> Id {
    schema.index_of_column(c).map(|i| mask[i]).unwrap_or(Id::No)
}

/// The kind of identifier `expr` is, without aliases, if it is a bare column.
fn bare_kind(expr: &Expr, schema: &DFSchemaRef, mask: &Mask) -> Id {
    match expr.clone().unalias_nested().data {
        Expr::Column(c) => kind_of(&c, schema, mask),
        _ => Id::No,
    }
}

fn has_person(mask: &Mask) -> bool {
    mask.contains(&Id::Person)
}

/// `expr`, without aliases, is a bare identifier column.
fn bare_identifier(expr: &Expr, schema: &DFSchemaRef, mask: &Mask) -> bool {
    bare_kind(expr, schema, mask) != Id::No
}

/// Refuses `expr` if it mentions an identifier column anywhere.
fn no_identifier(expr: &Expr, schema: &DFSchemaRef, mask: &Mask, place: &'static str) -> Result<(), PolicyError> {
    let mut found = None;
    expr.apply(|e| {
        if let Expr::Column(c) = e
            && is_identifier_column(c, schema, mask)
        {
            found = Some(c.name.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(PolicyError::from_df)?;
    match found {
        Some(column) => Err(PolicyError::Identifier { column, place }),
        None => Ok(()),
    }
}

fn refuse_function(name: &str) -> PolicyError {
    let advice = match name {
        "min"
        | "max"
        | "median"
        | "first_value"
        | "last_value"
        | "nth_value"
        | "percentile_cont"
        | "percentile_disc"
        | "approx_percentile_cont"
        | "approx_percentile_cont_with_weight"
        | "approx_median" => {
            "it releases a single person's value; use COUNT, SUM or AVG, or GROUP BY a banded value and count"
        }
        "array_agg" | "string_agg" | "list_agg" => "collections release individual values; use COUNT with GROUP BY",
        _ => "only COUNT, COUNT(DISTINCT …), SUM and AVG may aggregate records about people",
    };
    PolicyError::Function {
        function: name.to_uppercase(),
        advice,
    }
}

impl Checker {
    #[recursive::recursive]
    fn visit(&mut self, plan: LogicalPlan) -> Result<(LogicalPlan, Mask), PolicyError> {
        check_statement_kind(&plan)?;
        // Children first: rewrite them and collect their masks.
        let mut masks: Vec<Mask> = Vec::new();
        let plan = plan
            .map_children(|child| {
                let (child, mask) = self.visit(child).map_err(PolicyError::into_df)?;
                masks.push(mask);
                Ok(Transformed::yes(child))
            })
            .map_err(PolicyError::from_df)?
            .data;
        // Then subqueries inside this node's expressions.
        let plan = plan
            .map_subqueries(|sub| match sub {
                LogicalPlan::Subquery(s) => {
                    let inner = Arc::unwrap_or_clone(s.subquery);
                    let (inner, mask) = self.visit(inner).map_err(PolicyError::into_df)?;
                    let inner = Arc::new(inner);
                    self.subquery_masks.insert(key(&inner), mask);
                    Ok(Transformed::yes(LogicalPlan::Subquery(Subquery {
                        subquery: inner,
                        ..s
                    })))
                }
                other => Ok(Transformed::no(other)),
            })
            .map_err(PolicyError::from_df)?
            .data;
        // Rebuild schemas that depend on rewritten children.
        let plan = plan.recompute_schema().map_err(PolicyError::from_df)?;
        self.check_expression_kinds(&plan, &masks)?;
        self.node(plan, masks)
    }

    /// Refuses expression kinds that no safe query needs, and person-level subqueries outside a
    /// `person_id IN (…)` semi-join.
    fn check_expression_kinds(&self, plan: &LogicalPlan, masks: &[Mask]) -> Result<(), PolicyError> {
        let input_schema = plan.inputs().first().map(|i| Arc::clone(i.schema()));
        let person_level = |s: &Subquery| {
            self.subquery_masks
                .get(&key(&s.subquery))
                .map(has_person)
                .unwrap_or(true)
        };
        let mut error = None;
        plan.apply_expressions(|e| {
            e.apply(|e| {
                let refusal = match e {
                    Expr::WindowFunction(_) => Some(PolicyError::Function {
                        function: "window functions".into(),
                        advice: "they release values row by row; use GROUP BY with COUNT, SUM or AVG",
                    }),
                    Expr::ScalarVariable(..) => Some(PolicyError::Unsupported("session variables are not available")),
                    Expr::Placeholder(_) => Some(PolicyError::Unsupported("parameters ($1) are not supported; write values into the query")),
                    Expr::Unnest(_) => Some(PolicyError::Unsupported("UNNEST is not supported")),
                    Expr::OuterReferenceColumn(..) => Some(PolicyError::Unsupported(
                        "correlated subqueries are not supported; use a JOIN on person_id",
                    )),
                    Expr::Exists(_) => Some(PolicyError::Unsupported(
                        "EXISTS is not supported; use person_id IN (SELECT person_id …) or a JOIN",
                    )),
                    Expr::SetComparison(_) => Some(PolicyError::Unsupported("ANY/ALL subqueries are not supported")),
                    Expr::GroupingSet(_) => Some(PolicyError::Unsupported(
                        "GROUPING SETS, ROLLUP and CUBE are not supported; run one query per grouping",
                    )),
                    Expr::ScalarSubquery(s) if person_level(s) => Some(PolicyError::Function {
                        function: "a scalar subquery over records".into(),
                        advice: "it returns one row's value; aggregate it (COUNT, SUM, AVG)",
                    }),
                    Expr::InSubquery(InSubquery { expr, subquery, .. }) if person_level(subquery) => {
                        let mask = &self.subquery_masks[&key(&subquery.subquery)];
                        let semi_join = matches!(plan, LogicalPlan::Filter(_))
                            && mask.as_slice() == [Id::Person]
                            && input_schema.as_ref().is_some_and(|s| bare_kind(expr, s, &masks[0]) == Id::Person);
                        (!semi_join).then_some(PolicyError::Unsupported(
                            "IN (subquery) over records must be person_id IN (SELECT person_id FROM …) with a single table or person_id join",
                        ))
                    }
                    _ => None,
                };
                if let Some(r) = refusal {
                    error = Some(r);
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
        .map_err(PolicyError::from_df)?;
        error.map_or(Ok(()), Err)
    }

    fn node(&mut self, plan: LogicalPlan, masks: Vec<Mask>) -> Result<(LogicalPlan, Mask), PolicyError> {
        let none = |plan: &LogicalPlan| vec![Id::No; plan.schema().fields().len()];
        match plan {
            LogicalPlan::TableScan(ref scan) => {
                let provider = source_as_provider(&scan.source).map_err(PolicyError::from_df)?;
                let guarded = GuardedTable::as_guarded(provider.as_ref()).ok_or(PolicyError::Unsupported(
                    "only the project's granted tables can be queried",
                ))?;
                let mask: Mask = scan
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|f| match f.name().as_str() {
                        PERSON_ID => Id::Person,
                        other if guarded.is_identifier(other) => Id::Other,
                        _ => Id::No,
                    })
                    .collect();
                for f in &scan.filters {
                    no_identifier(f, &scan.projected_schema, &mask, "in a filter")?;
                }
                Ok((plan, mask))
            }
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => {
                let mask = none(&plan);
                Ok((plan, mask))
            }
            LogicalPlan::Projection(p) => self.projection(p, &masks[0]),
            LogicalPlan::Filter(ref f) => {
                for conjunct in split_conjunction(&f.predicate) {
                    if let Expr::InSubquery(InSubquery { expr, .. }) = conjunct
                        && bare_kind(expr, f.input.schema(), &masks[0]) == Id::Person
                    {
                        continue; // a person semi-join, checked with the subquery
                    }
                    no_identifier(conjunct, f.input.schema(), &masks[0], "in a filter (WHERE or HAVING)")?;
                }
                Ok((plan, masks.into_iter().next().expect("filter input")))
            }
            LogicalPlan::Sort(ref s) => {
                for e in &s.expr {
                    no_identifier(&e.expr, s.input.schema(), &masks[0], "in ORDER BY")?;
                }
                Ok((plan, masks.into_iter().next().expect("sort input")))
            }
            LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Subquery(_)
            | LogicalPlan::Repartition(_) => Ok((plan, masks.into_iter().next().expect("one input"))),
            LogicalPlan::Join(ref j) => {
                let (left, right) = (&masks[0], &masks[1]);
                let mut person_key = false;
                for (l, r) in &j.on {
                    let l_id = no_identifier(l, j.left.schema(), left, "").is_err();
                    let r_id = no_identifier(r, j.right.schema(), right, "").is_err();
                    if l_id || r_id {
                        if !(bare_identifier(l, j.left.schema(), left) && bare_identifier(r, j.right.schema(), right)) {
                            let column = if l_id { l } else { r };
                            return Err(PolicyError::Identifier {
                                column: column.schema_name().to_string(),
                                place: "in a join condition other than a.person_id = b.person_id",
                            });
                        }
                        person_key |= bare_kind(l, j.left.schema(), left) == Id::Person
                            && bare_kind(r, j.right.schema(), right) == Id::Person;
                    }
                }
                if let Some(filter) = &j.filter {
                    // Before optimisation, `ON a.person_id = b.person_id` is still a filter.
                    let both = [left.clone(), right.clone()].concat();
                    let schema = both_sides_schema(j).map_err(PolicyError::from_df)?;
                    for conjunct in split_conjunction(filter) {
                        match conjunct {
                            Expr::BinaryExpr(b)
                                if b.op == Operator::Eq
                                    && bare_identifier(&b.left, &schema, &both)
                                    && bare_identifier(&b.right, &schema, &both) =>
                            {
                                person_key |= bare_kind(&b.left, &schema, &both) == Id::Person
                                    && bare_kind(&b.right, &schema, &both) == Id::Person;
                            }
                            other => no_identifier(
                                other,
                                &schema,
                                &both,
                                "in a join condition other than a.person_id = b.person_id",
                            )?,
                        }
                    }
                }
                let semi_drops = |dropped: &Mask| has_person(dropped) && !person_key;
                let mask = match j.join_type {
                    JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
                        [left.clone(), right.clone()].concat()
                    }
                    JoinType::LeftSemi | JoinType::LeftAnti if !semi_drops(right) => left.clone(),
                    JoinType::RightSemi | JoinType::RightAnti if !semi_drops(left) => right.clone(),
                    JoinType::LeftSemi | JoinType::LeftAnti | JoinType::RightSemi | JoinType::RightAnti => {
                        return Err(PolicyError::Unsupported(
                            "a SEMI or ANTI join against records must join on person_id",
                        ));
                    }
                    JoinType::LeftMark | JoinType::RightMark => {
                        return Err(PolicyError::Unsupported("mark joins are not supported"));
                    }
                };
                Ok((plan, mask))
            }
            LogicalPlan::Aggregate(a) => {
                if has_person(&masks[0]) {
                    let plan = self.protect(a, &masks[0])?;
                    let mask = none(&plan);
                    Ok((plan, mask))
                } else {
                    let plan = LogicalPlan::Aggregate(a);
                    let mask = none(&plan);
                    Ok((plan, mask))
                }
            }
            LogicalPlan::Distinct(Distinct::All(input)) => {
                // Group by what the query selected, not by identifiers this check appended.
                let group = input
                    .schema()
                    .columns()
                    .into_iter()
                    .filter(|c| !c.name.starts_with(HIDDEN_PID))
                    .map(Expr::Column)
                    .collect();
                let agg = Aggregate::try_new(input, group, vec![]).map_err(PolicyError::from_df)?;
                self.node(LogicalPlan::Aggregate(agg), masks)
            }
            LogicalPlan::Distinct(Distinct::On(_)) => Err(PolicyError::Unsupported("DISTINCT ON is not supported")),
            LogicalPlan::Window(_) => Err(PolicyError::Function {
                function: "window functions".into(),
                advice: "they release values row by row; use GROUP BY with COUNT, SUM or AVG",
            }),
            LogicalPlan::Union(_) => {
                if masks.iter().flatten().any(|&x| x != Id::No) {
                    return Err(PolicyError::Unsupported(
                        "UNION of records is not supported; aggregate each part, then combine the aggregates",
                    ));
                }
                let mask = none(&plan);
                Ok((plan, mask))
            }
            LogicalPlan::Unnest(_) => Err(PolicyError::Unsupported("UNNEST is not supported")),
            LogicalPlan::RecursiveQuery(_) => Err(PolicyError::Unsupported("recursive queries are not supported")),
            LogicalPlan::Extension(_) => Err(PolicyError::Unsupported("this plan node is not supported")),
            other => Err(PolicyError::NotAQuery(other.display().to_string())),
        }
    }

    /// Checks a projection and makes sure identifiers of person-level rows flow through it.
    fn projection(&mut self, p: Projection, in_mask: &Mask) -> Result<(LogicalPlan, Mask), PolicyError> {
        let schema = Arc::clone(p.input.schema());
        let mut mask = Vec::with_capacity(p.expr.len());
        for e in &p.expr {
            let kind = bare_kind(e, &schema, in_mask);
            if kind == Id::No {
                no_identifier(e, &schema, in_mask, "in a computed column or output")?;
            }
            mask.push(kind);
        }
        let passed: Vec<Column> = p
            .expr
            .iter()
            .filter_map(|e| match e.clone().unalias_nested().data {
                Expr::Column(c) if is_identifier_column(&c, &schema, in_mask) => Some(c),
                _ => None,
            })
            .collect();
        let mut exprs = p.expr;
        for (i, (qualifier, field)) in schema.iter().enumerate() {
            let column = Column::new(qualifier.cloned(), field.name());
            // Only the person identifier must flow on: people are counted where rows aggregate.
            if in_mask[i] == Id::Person && !passed.contains(&column) {
                let name = format!("{HIDDEN_PID}{}", self.next_id);
                self.next_id += 1;
                exprs.push(Expr::Column(column).alias(name));
                mask.push(Id::Person);
            }
        }
        let plan = Projection::try_new(exprs, p.input).map_err(PolicyError::from_df)?;
        Ok((LogicalPlan::Projection(plan), mask))
    }

    /// Rewrites an aggregate over person-level rows so that disclosure control applies to its
    /// output. The result has the aggregate's columns, names and order (values may be NULL):
    ///
    /// ```text
    /// Projection   cells → sde_count_cell / sde_value_cell (threshold, rounding, dominance)
    ///   Filter     sde_keep_group (groups backed by too few people are withheld)
    ///     Filter   sde_no_differencing (only if the input is filtered)
    ///       Join   on group keys with the unfiltered people (only if the input is filtered)
    ///         Aggregate  the original aggregates + people per group and per cell
    ///                    + each person's share of each SUM and AVG cell (`sde_shares`, dominance)
    /// ```
    fn protect(&mut self, agg: Aggregate, in_mask: &Mask) -> Result<LogicalPlan, PolicyError> {
        let schema = Arc::clone(agg.input.schema());
        let ids: Vec<Column> = schema
            .iter()
            .zip(in_mask)
            .filter(|(_, id)| **id == Id::Person)
            .map(|((q, f), _)| Column::new(q.cloned(), f.name()))
            .collect();
        // The identifiers cells count distinct people of.
        let counted: Vec<Column> = agg
            .aggr_expr
            .iter()
            .filter_map(|e| match e.clone().unalias_nested().data {
                Expr::AggregateFunction(AggregateFunction { params, .. }) if params.distinct => {
                    match &params.args[..] {
                        [Expr::Column(c)] => Some(c.clone()),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        let ids: Vec<Expr> = one_per_person(&agg.input, ids, &counted)
            .into_iter()
            .map(Expr::Column)
            .collect();
        for g in &agg.group_expr {
            if matches!(g, Expr::GroupingSet(_)) {
                return Err(PolicyError::Unsupported(
                    "GROUPING SETS, ROLLUP and CUBE are not supported; run one query per grouping",
                ));
            }
            no_identifier(g, &schema, in_mask, "as a GROUP BY key")?;
        }
        let id = self.next_id;
        self.next_id += 1;
        let df = PolicyError::from_df;
        let col = |name: String| Expr::Column(Column::new_unqualified(name));
        let mut aggr = agg.aggr_expr.clone();
        let people_name = |j: usize| format!("__sde_people_{id}_{j}");
        // Where each row is a different person (a table with one row per person, filtered),
        // people are counted as rows: the same figure without hashing every identifier. Where
        // each person has at most a known number of rows, rows can at least show enough people.
        let most_rows: Vec<Option<u64>> = ids
            .iter()
            .map(|p| match p {
                Expr::Column(c) => most_rows_per_person(&agg.input, c),
                _ => None,
            })
            .collect();
        let unique: Vec<bool> = most_rows.iter().map(|m| *m == Some(1)).collect();
        // Whether exact people counts per group are needed: for the differencing check (a
        // filtered input) and for cells with their own condition (people left out of the
        // group). Otherwise the rules only ask whether a group has `threshold` people.
        let unfiltered = without_filters(Arc::unwrap_or_clone(Arc::clone(&agg.input))).map_err(df)?;
        let mut exact = unfiltered.transformed;
        // Dominance needs each person's total of each SUM and AVG cell: `sde_shares` keeps them
        // in the main aggregate's own pass. With one identifier and no differencing check, the
        // people of the group and the contributors of each cell with a condition are counted
        // from those shares too, rather than by distinct counts beside them.
        let has_sums = agg.aggr_expr.iter().any(|e| {
            matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(f)
                if matches!(f.func.name().to_lowercase().as_str(), "sum" | "avg" | "mean"))
        });
        // Told from rows (in the plan that may, [`Permit::from_rows`]): over a table whose people
        // each have at most a known number of rows, without a WHERE (which needs people counted
        // for differencing), FILTER (which leaves rows out of a cell) or cell counting people
        // (which reads every identifier anyway), the groups' people, the cells' contributors and
        // the dominance rules are all bounded by rows, never reading who they belong to.
        let told = self.from_rows
            && !unfiltered.transformed
            && !ids.is_empty()
            && most_rows.iter().all(|m| m.is_some_and(|m| m > 1))
            && agg.aggr_expr.iter().all(|e| {
                matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(AggregateFunction { params, .. })
                    if params.filter.is_none()
                        && !(params.distinct && params.args.iter().any(|a| bare_identifier(a, &schema, in_mask))))
            });
        let per_person_counts = has_sums && ids.len() == 1 && !unique[0] && !unfiltered.transformed && !told;
        // People counted as rows: all of them where each row is a different person; told from
        // rows, a count of rows the projection below judges.
        let as_rows: Vec<bool> = unique.iter().map(|u| *u || told).collect();
        let people_where = |j: usize, person: &Expr, condition: &Expr| -> Result<Expr, PolicyError> {
            Ok(match as_rows[j] {
                true => count(when(condition.clone(), lit(1)).end().map_err(df)?),
                false => count_distinct(when(condition.clone(), person.clone()).end().map_err(df)?),
            })
        };
        let share = |k: usize, what: &str| get_field(col(format!("__sde_shares_{id}_{k}")), what);
        // The `sde_shares` calls: (identifier, the value whose per-person totals are judged
        // (NULL for a count), which rows make a person a contributor), each once.
        let mut shares_of: Vec<(usize, Expr, Expr)> = Vec::new();
        let mut share_of = |j: usize, value: Expr, contributes: Expr| -> usize {
            let call = (j, value, contributes);
            shares_of.iter().position(|c| *c == call).unwrap_or_else(|| {
                shares_of.push(call);
                shares_of.len() - 1
            })
        };
        // Any call's people are the group's: with per-person counts there is one at least.
        let group_people: Vec<Expr> = match per_person_counts {
            true => vec![share(0, "people")],
            false => (0..ids.len()).map(|j| col(people_name(j))).collect(),
        };

        // Per aggregate: whether it is a count and the people who contribute to it.
        let mut cells = Vec::with_capacity(agg.aggr_expr.len());
        // Whether a cell counts the group's people exactly (then so does the group, in one count).
        let mut group_counted = false;
        // Per SUM or AVG cell and identifier, its `sde_shares` call.
        let mut sum_shares: Vec<(usize, usize)> = Vec::new();
        // Told from rows: the SUM and AVG cells, and the contributors' row counts (cell, identifier).
        let mut told_sums: Vec<usize> = Vec::new();
        let mut told_contributors: Vec<(String, usize)> = Vec::new();
        let most = |j: usize| most_rows[j].unwrap_or(1);
        for (i, e) in agg.aggr_expr.iter().enumerate() {
            let Expr::AggregateFunction(AggregateFunction { func, params }) = e.clone().unalias_nested().data else {
                return Err(PolicyError::Unsupported("this aggregate expression is not supported"));
            };
            let name = func.name().to_lowercase();
            let is_count = match name.as_str() {
                "count" => true,
                "sum" | "avg" | "mean" => false,
                other => return Err(refuse_function(other)),
            };
            for arg in &params.args {
                let counts_people =
                    is_count && params.distinct && params.args.len() == 1 && bare_identifier(arg, &schema, in_mask);
                if !counts_people {
                    no_identifier(
                        arg,
                        &schema,
                        in_mask,
                        "inside an aggregate other than COUNT(DISTINCT …)",
                    )?;
                }
            }
            if let Some(filter) = &params.filter {
                no_identifier(filter, &schema, in_mask, "in an aggregate FILTER")?;
            }
            for s in &params.order_by {
                no_identifier(&s.expr, &schema, in_mask, "in an aggregate ORDER BY")?;
            }
            // Who contributes to this cell: people with a row passing the aggregate's FILTER
            // and, for COUNT(x), a non-NULL x; for SUM and AVG, a non-NULL, non-zero value
            // (a zero adds nothing, so `SUM(CASE WHEN … THEN x ELSE 0 END)` counts only the
            // people the CASE selects).
            let mut conditions: Vec<Expr> = params.filter.iter().map(|f| (**f).clone()).collect();
            // COUNT(DISTINCT person_id) over one identifier: its people are the group's.
            let counts_the_group =
                is_count && params.distinct && ids.len() == 1 && params.args.len() == 1 && params.args[0] == ids[0];
            group_counted |= counts_the_group && params.filter.is_none();
            if let Some(arg) = params.args.first()
                && !matches!(arg, Expr::Literal(..))
                && !counts_the_group
            {
                conditions.push(arg.clone().is_not_null());
                if !is_count {
                    conditions.push(arg.clone().not_eq(lit(0)));
                }
            }
            let condition = conditions.into_iter().reduce(Expr::and);
            exact |= condition.is_some();
            if !is_count {
                let arg = params.args.first().cloned().unwrap_or(lit(0));
                if told {
                    // The two largest totals are at most the 2m largest rows (see `largest`).
                    // Without FILTER, a row that does not contribute has a zero or no value: it
                    // adds nothing to the sum or the largest, so they are taken over the
                    // values as they are, and the cell's own SUM is the same aggregate.
                    let k = 2 * (0..ids.len()).map(most).max().unwrap_or(1) as usize;
                    let value = match arg.get_type(schema.as_ref()) {
                        Ok(DataType::Float64) => arg.clone(),
                        _ => cast(arg.clone(), DataType::Float64),
                    };
                    aggr.push(sum(value.clone()).alias(format!("__sde_sum_{id}_{i}")));
                    aggr.push(largest(value, k).alias(format!("__sde_largest_{id}_{i}")));
                    told_sums.push(i);
                } else {
                    let value = match &condition {
                        Some(c) => when(c.clone(), arg).end().map_err(df)?,
                        None => arg,
                    };
                    let value = cast(value, DataType::Float64);
                    let contributes = condition.clone().unwrap_or(lit(true));
                    for j in 0..ids.len() {
                        let k = share_of(j, value.clone(), contributes.clone());
                        sum_shares.push((i, k));
                    }
                }
            }
            let contributors = match condition {
                None => group_people.clone(),
                Some(condition) if per_person_counts => {
                    let k = match sum_shares.last() {
                        Some(&(last, k)) if last == i => k,
                        _ => share_of(0, lit(ScalarValue::Float64(None)), condition),
                    };
                    vec![share(k, "contributors")]
                }
                Some(condition) => {
                    let mut cols = Vec::with_capacity(ids.len());
                    for (j, person) in ids.iter().enumerate() {
                        let name = format!("__sde_contrib_{id}_{i}_{j}");
                        if told {
                            told_contributors.push((name.clone(), j));
                        }
                        aggr.push(people_where(j, person, &condition)?.alias(name.clone()));
                        cols.push(col(name));
                    }
                    cols
                }
            };
            cells.push((is_count, contributors));
        }

        // Where people are counted as rows, a COUNT(*) of the query's own is that count: the
        // people column is then a copy of it (below), not a second count of the same rows.
        let rows_counted = agg
            .aggr_expr
            .iter()
            .position(|e| e.clone().unalias_nested().data == count(lit(COUNT_STAR_EXPANSION)));
        let mut people_as_counted: Vec<(usize, usize)> = Vec::new();
        // With per-person counts, the group's people come from the shares. Told from rows,
        // the people column holds the group's rows until the projection below.
        if !per_person_counts {
            let threshold = self.disclosure.rules().threshold as usize;
            for (j, person) in ids.iter().enumerate() {
                if as_rows[j]
                    && let Some(k) = rows_counted
                {
                    people_as_counted.push((j, k));
                    continue;
                }
                let people = match (as_rows[j], exact) {
                    (true, _) => count(lit(1)),
                    (false, false) if !group_counted => people_at_least(person.clone(), threshold),
                    (false, _) => count_distinct(person.clone()),
                };
                aggr.push(people.alias(people_name(j)));
            }
        }

        let n_group = agg.group_expr.len();
        for (k, (j, value, contributes)) in shares_of.into_iter().enumerate() {
            aggr.push(shares(ids[j].clone(), value, contributes).alias(format!("__sde_shares_{id}_{k}")));
        }
        let main = Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr).map_err(df)?;
        let group_cols: Vec<Column> = agg
            .schema
            .iter()
            .take(n_group)
            .map(|(q, f)| Column::new(q.cloned(), f.name()))
            .collect();
        let mut plan = LogicalPlan::Aggregate(main);
        if !people_as_counted.is_empty() {
            let schema = Arc::clone(plan.schema());
            let mut exprs: Vec<Expr> = schema.columns().into_iter().map(Expr::Column).collect();
            for (j, k) in people_as_counted {
                let (q, f) = schema.qualified_field(n_group + k);
                exprs.push(Expr::Column(Column::new(q.cloned(), f.name())).alias(people_name(j)));
            }
            plan = LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan)).map_err(df)?);
        }
        // A SUM or AVG cell is dominated if it is, judged by the people of any identifier.
        let mut dominated: HashMap<usize, Expr> = HashMap::new();
        if told {
            self.told_from_rows = true;
            let rows = |j: usize| col(people_name(j));
            let mut exprs = plan
                .schema()
                .iter()
                .map(|(q, f)| {
                    let column = Expr::Column(Column::new(q.cloned(), f.name()));
                    let name = f.name();
                    if let Some(j) = (0..ids.len()).find(|&j| *name == people_name(j)) {
                        self.disclosure.people_from_rows(column, most(j)).alias(name)
                    } else if let Some((_, j)) = told_contributors.iter().find(|(c, _)| c == name) {
                        let contributors = self.disclosure.contributors_from_rows(column, rows(*j), most(*j));
                        contributors.alias(name)
                    } else {
                        column
                    }
                })
                .collect::<Vec<_>>();
            for i in told_sums {
                let name = format!("__sde_dominated_{id}_{i}");
                let verdict = self.disclosure.not_dominated_from_rows(
                    col(format!("__sde_sum_{id}_{i}")),
                    col(format!("__sde_largest_{id}_{i}")),
                );
                exprs.push(verdict.alias(name.clone()));
                dominated.insert(i, col(name));
            }
            plan = LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan)).map_err(df)?);
        }
        for (i, k) in sum_shares {
            let verdict = self
                .disclosure
                .dominated(share(k, "total"), share(k, "top1"), share(k, "top2"));
            let either = match dominated.remove(&i) {
                Some(previous) => previous.or(verdict),
                None => verdict,
            };
            dominated.insert(i, either);
        }
        let keys: Vec<Expr> = agg
            .group_expr
            .iter()
            .enumerate()
            .map(|(k, g)| g.clone().alias(format!("__k{k}")))
            .collect();

        // Differencing: the same groups without the query's filters, counting people.
        if unfiltered.transformed {
            let unfiltered = Arc::new(unfiltered.data);
            let counts: Vec<Expr> = ids
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    let people = match p {
                        Expr::Column(c) if one_row_per_person(&unfiltered, c) => count(lit(1)),
                        _ => count_distinct(p.clone()),
                    };
                    people.alias(format!("__sde_unfiltered_{id}_{j}"))
                })
                .collect();
            let side = Aggregate::try_new(unfiltered, keys, counts).map_err(df)?;
            plan = self.join_side(plan, LogicalPlan::Aggregate(side), &group_cols, id, 0, "u")?;
            let unfiltered_people = (0..ids.len())
                .map(|j| col(format!("__sde_unfiltered_{id}_{j}")))
                .collect();
            let check = self.disclosure.no_differencing(group_people.clone(), unfiltered_people);
            plan = LogicalPlan::Filter(Filter::try_new(check, Arc::new(plan)).map_err(df)?);
        }

        if n_group > 0 {
            let keep = self.disclosure.keep_group(group_people.clone());
            plan = LogicalPlan::Filter(Filter::try_new(keep, Arc::new(plan)).map_err(df)?);
        }
        let mut exprs = Vec::with_capacity(agg.schema.fields().len());
        for (idx, (qualifier, field)) in agg.schema.iter().enumerate() {
            let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
            if idx < n_group {
                exprs.push(column);
                continue;
            }
            let i = idx - n_group;
            let (is_count, contributors) = &cells[i];
            let cell = if *is_count {
                self.disclosure
                    .count_cell(column, contributors.clone(), group_people.clone())
            } else {
                let dominated = dominated.remove(&i).unwrap_or(lit(false));
                self.disclosure
                    .value_cell(column, dominated, contributors.clone(), group_people.clone())
            };
            exprs.push(cell.alias_qualified(qualifier.cloned(), field.name()));
            self.checked.push(field.name().clone());
        }
        let projection = Projection::try_new(exprs, Arc::new(plan)).map_err(df)?;
        Ok(LogicalPlan::Projection(projection))
    }

    /// Left-joins a side aggregate (group keys `__k0…` first) to the main aggregate on its group
    /// keys, NULL matching NULL; without group keys both have one row and are cross-joined.
    fn join_side(
        &mut self,
        main: LogicalPlan,
        side: LogicalPlan,
        group_cols: &[Column],
        id: usize,
        j: usize,
        tag: &str,
    ) -> Result<LogicalPlan, PolicyError> {
        let df = PolicyError::from_df;
        let alias = format!("__sde_side_{id}_{tag}{j}");
        let side = LogicalPlanBuilder::from(side)
            .alias(alias.clone())
            .map_err(df)?
            .build()
            .map_err(df)?;
        let builder = LogicalPlanBuilder::from(main);
        let joined = if group_cols.is_empty() {
            builder.cross_join(side)
        } else {
            let side_keys: Vec<Column> = (0..group_cols.len())
                .map(|k| Column::new(Some(alias.as_str()), format!("__k{k}")))
                .collect();
            builder.join_detailed(
                side,
                JoinType::Left,
                (group_cols.to_vec(), side_keys),
                None,
                NullEquality::NullEqualsNull,
            )
        };
        joined.map_err(df)?.build().map_err(df)
    }
}

/// `ids`, the identifier columns of `plan`, with those an inner join on them makes equal on
/// every row ([`same_person`]) kept once: counting people by either gives the same figure in
/// every group and under every condition. Of two, the one a cell counts distinct people of
/// (`counted`) is kept, so that the cell and its group's people are one count.
fn one_per_person(plan: &LogicalPlan, ids: Vec<Column>, counted: &[Column]) -> Vec<Column> {
    let mut kept: Vec<Column> = Vec::new();
    for id in ids {
        match kept.iter_mut().find(|k| same_person(plan, k, &id)) {
            Some(k) if counted.contains(&id) && !counted.contains(k) => *k = id,
            Some(_) => {}
            None => kept.push(id),
        }
    }
    kept
}

/// Whether `a` and `b` hold the same value on every row of `plan` because an inner join made
/// them equal (`ON a.person_id = b.person_id`), through projections, renames and filters. Only
/// the join's own equalities count: they are what [`without_filters`] keeps, so the same holds
/// in the unfiltered plan of the differencing check. Anything else (outer joins, a WHERE
/// equality, a chain of joins) is not known.
#[recursive::recursive]
fn same_person(plan: &LogicalPlan, a: &Column, b: &Column) -> bool {
    let schema = plan.schema();
    let (Ok(ia), Ok(ib)) = (schema.index_of_column(a), schema.index_of_column(b)) else {
        return false;
    };
    match plan {
        LogicalPlan::Filter(f) => same_person(&f.input, a, b),
        LogicalPlan::SubqueryAlias(s) => same_person(&s.input, &column_at(&s.input, ia), &column_at(&s.input, ib)),
        LogicalPlan::Projection(p) => match (
            p.expr[ia].clone().unalias_nested().data,
            p.expr[ib].clone().unalias_nested().data,
        ) {
            (Expr::Column(ca), Expr::Column(cb)) => same_person(&p.input, &ca, &cb),
            _ => false,
        },
        LogicalPlan::Join(j) if j.join_type == JoinType::Inner => {
            let left = j.left.schema().fields().len();
            match (ia < left, ib < left) {
                (true, true) => same_person(&j.left, &column_at(&j.left, ia), &column_at(&j.left, ib)),
                (false, false) => same_person(
                    &j.right,
                    &column_at(&j.right, ia - left),
                    &column_at(&j.right, ib - left),
                ),
                // One on each side: equal where the join says so.
                (a_left, _) => {
                    let (l, r) = if a_left { (ia, ib - left) } else { (ib, ia - left) };
                    let is = |e: &Expr, side: &LogicalPlan, index: usize| matches!(e, Expr::Column(c) if side.schema().index_of_column(c).is_ok_and(|i| i == index));
                    let joins = |x: &Expr, y: &Expr| {
                        (is(x, &j.left, l) && is(y, &j.right, r)) || (is(y, &j.left, l) && is(x, &j.right, r))
                    };
                    let on = j.on.iter().any(|(x, y)| joins(x, y));
                    let filter = j.filter.as_ref().is_some_and(|f| {
                        split_conjunction(f).into_iter().any(
                            |c| matches!(c, Expr::BinaryExpr(e) if e.op == Operator::Eq && joins(&e.left, &e.right)),
                        )
                    });
                    on || filter
                }
            }
        }
        _ => false,
    }
}

/// The column at `index` of `plan`'s output.
fn column_at(plan: &LogicalPlan, index: usize) -> Column {
    Column::from(plan.schema().qualified_field(index))
}

/// Whether every row of `plan` has a different, non-NULL `column` (see [`most_rows_per_person`]).
fn one_row_per_person(plan: &LogicalPlan, column: &Column) -> bool {
    most_rows_per_person(plan, column) == Some(1)
}

/// The most rows of `plan` that share one `column`, every row having one, known because the
/// column is the `person_id` of a table that has at most that many rows per person, each with
/// a `person_id`, reached through filters, renames and semi- or anti-joins only (which drop
/// rows but never repeat one). Anything else: not known.
#[recursive::recursive]
fn most_rows_per_person(plan: &LogicalPlan, column: &Column) -> Option<u64> {
    let index = plan.schema().index_of_column(column).ok()?;
    match plan {
        LogicalPlan::TableScan(scan) if plan.schema().field(index).name() == PERSON_ID => {
            source_as_provider(&scan.source)
                .ok()
                .as_deref()
                .and_then(GuardedTable::as_guarded)
                .and_then(GuardedTable::most_rows_per_person)
        }
        LogicalPlan::Filter(f) => most_rows_per_person(&f.input, column),
        LogicalPlan::SubqueryAlias(a) => most_rows_per_person(&a.input, &column_at(&a.input, index)),
        LogicalPlan::Projection(p) => match p.expr[index].clone().unalias_nested().data {
            Expr::Column(c) => most_rows_per_person(&p.input, &c),
            _ => None,
        },
        LogicalPlan::Join(j) if matches!(j.join_type, JoinType::LeftSemi | JoinType::LeftAnti) => {
            most_rows_per_person(&j.left, column)
        }
        _ => None,
    }
}

/// The plan without its row filters (WHERE, HAVING below this point, IN-subquery filters and
/// the extra conditions of inner joins): the population the query would otherwise cover.
fn without_filters(plan: LogicalPlan) -> datafusion::error::Result<Transformed<LogicalPlan>> {
    plan.transform_up(|node| match node {
        LogicalPlan::Filter(f) => Ok(Transformed::yes(Arc::unwrap_or_clone(f.input))),
        LogicalPlan::Join(mut j) if j.join_type == JoinType::Inner && j.filter.is_some() => {
            // Keep the join itself (column = column, as in `ON a.person_id = b.person_id`); drop
            // the conditions that only filter rows.
            let filter = j.filter.take().expect("checked");
            let conjuncts = split_conjunction(&filter);
            let (keys, filters): (Vec<&Expr>, Vec<&Expr>) = conjuncts.into_iter().partition(|c| {
                matches!(c, Expr::BinaryExpr(b) if b.op == Operator::Eq
                    && matches!(*b.left, Expr::Column(_)) && matches!(*b.right, Expr::Column(_)))
            });
            j.filter = keys.into_iter().cloned().reduce(Expr::and);
            Ok(Transformed::new_transformed(LogicalPlan::Join(j), !filters.is_empty()))
        }
        other => Ok(Transformed::no(other)),
    })
}

#[cfg(test)]
mod tests;
