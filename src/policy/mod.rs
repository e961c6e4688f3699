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
//!
//! The walk of a query through this module, one concern per file:
//! - [`statement`]: the SQL text is parsed and bounded (Safe Settings) before anything is planned;
//! - this file: the plan's kind, reserved names, the rules of the datasets read, and the
//!   [`Permit`] the gateway executes;
//! - `checker`: the bottom-up walk of the plan and the rule for each kind of node;
//! - `lineage`: which columns are identifiers, and where they may not go;
//! - `protect`: which aggregates may run over people, and the per-person rewrite of each;
//! - `people`: which identifiers name the same person, and the population without filters.
//!
//! Nothing here reads data or the registry; the rules arrive as [`Rules`].

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;

use crate::disclosure::{Disclosure, Overrides, PerturbationKey, Rules};
use crate::engine::GuardedTable;

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
        let disclosure = Disclosure::new(self.disclosure.rules(), self.disclosure.key().cloned());
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
    check_with(plan, rules, dataset_rules, perturbation_key(ctx))
}

/// The key that seeds the noise of sums and means, which the engine hands to each project's
/// session ([`crate::engine::Engine::with_perturbation_key`]); a session without one can
/// release no sum or mean.
pub fn perturbation_key(ctx: &SessionContext) -> Option<Arc<PerturbationKey>> {
    ctx.state().config().get_extension::<PerturbationKey>()
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
    key: Option<Arc<PerturbationKey>>,
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
    check(plan, rules, key)
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

/// Whether an alias names a baseline: an aggregate's variant without any of its conditions
/// ([`variants`]), which depends on the query's groups and data, never on its conditions.
pub fn is_baseline(alias: &str) -> bool {
    alias.starts_with(BASELINE)
}

/// Prefix of a baseline's alias.
const BASELINE: &str = "__sde_baseline_";

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
pub fn check(plan: LogicalPlan, rules: Rules, key: Option<Arc<PerturbationKey>>) -> Result<Permit, PolicyError> {
    check_reserved_names(&plan)?;
    let disclosure = Disclosure::new(rules, key);
    let rewrite = |plan: LogicalPlan, from_rows: bool| {
        let mut checker = Checker::new(disclosure.clone(), from_rows);
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
        Some(Ok((from_rows, c))) if c.rewriter.told_from_rows => Some(from_rows),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no plan telling people from rows");
            None
        }
        _ => None,
    };
    Ok(Permit {
        checked: output_names(&exact, &checker.rewriter.checked),
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

mod checker;
mod conditions;
mod lineage;
mod people;
mod protect;
mod variants;

use checker::Checker;
use lineage::Id;

#[cfg(test)]
mod tests;
