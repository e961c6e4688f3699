//! Baselines, computed once and reused.
//!
//! Disclosure control judges each condition of an aggregate against the same groups *without*
//! the query's conditions (conditions of low effect, see `policy::variants`). That baseline
//! depends on the project's data (dataset versions, cohort) and on the shape of the query,
//! never on its conditions, so many different queries share it; computing it anew each time
//! would scan the whole population for every filtered query. Here it is computed once per scope
//! (project and data snapshot) and plan, kept in memory (bounded), and put into later plans in
//! place of the aggregate. Its cells are released only if chosen, so its disclosure functions
//! tally nothing and are pure; a baseline whose plan calls any other function that is not
//! immutable is always computed afresh.

use std::sync::Arc;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::error::Result as DFResult;
use datafusion::execution::{SessionState, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, ScalarUDF, SubqueryAlias, Volatility};

use crate::disclosure::Disclosure;
use crate::policy::is_baseline;
use crate::recent::{self, Recent};

/// Baselines kept at most; beyond it the least recently used half is forgotten. With
/// [`MAX_BYTES`], the cache holds at most 256 MiB outside the queries' memory pool.
const MAX_ENTRIES: usize = 256;
/// Largest baseline kept, in bytes (a baseline has one row per group of the query).
const MAX_BYTES: usize = 1 << 20;

pub struct Baselines {
    entries: Recent<Arc<MemTable>>,
}

impl Default for Baselines {
    fn default() -> Self {
        Self {
            entries: Recent::new(MAX_ENTRIES),
        }
    }
}

impl std::fmt::Debug for Baselines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baselines").field("entries", &self.len()).finish()
    }
}

impl Baselines {
    /// Replaces each baseline in the optimised `plan` by its result for `scope`,
    /// computing (and keeping) those not yet known; transformed if any was replaced.
    pub async fn substitute(
        &self,
        state: &SessionState,
        task: &Arc<TaskContext>,
        plan: LogicalPlan,
        scope: &str,
    ) -> DFResult<Transformed<LogicalPlan>> {
        let mut wanted: Vec<LogicalPlan> = Vec::new();
        plan.apply(|node| {
            if let LogicalPlan::SubqueryAlias(a) = node
                && is_baseline(a.alias.table())
                && only_immutable(&a.input, Disclosure::is_untallied_cell_rule)?
            {
                wanted.push(a.input.as_ref().clone());
                return Ok(TreeNodeRecursion::Jump);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if wanted.is_empty() {
            return Ok(Transformed::no(plan));
        }
        // Each baseline's plan and its result, found again below by the plan itself.
        let mut tables: Vec<(LogicalPlan, Arc<MemTable>)> = Vec::with_capacity(wanted.len());
        for input in wanted {
            let key = key(scope, &input);
            let table = match self.entries.get(&key) {
                Some(table) => table,
                None => {
                    let (table, bytes) = compute(state, task, &input).await?;
                    let table = Arc::new(table);
                    if bytes <= MAX_BYTES {
                        self.entries.put(&key, Arc::clone(&table));
                    }
                    table
                }
            };
            tables.push((input, table));
        }
        plan.transform_up(|node| match node {
            LogicalPlan::SubqueryAlias(a) if is_baseline(a.alias.table()) => {
                match tables.iter().find(|(input, _)| input == a.input.as_ref()) {
                    Some((_, table)) => {
                        let scan = LogicalPlanBuilder::scan(
                            a.alias.table(),
                            provider_as_source(Arc::clone(table) as _),
                            None,
                        )?
                        .build()?;
                        let alias = SubqueryAlias::try_new(Arc::new(scan), a.alias.clone())?;
                        Ok(Transformed::yes(LogicalPlan::SubqueryAlias(alias)))
                    }
                    None => Ok(Transformed::no(LogicalPlan::SubqueryAlias(a))),
                }
            }
            other => Ok(Transformed::no(other)),
        })
    }

    /// Baselines kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a baseline is: its scope and its (optimised) plan, as text.
fn key(scope: &str, input: &LogicalPlan) -> String {
    recent::key(&[scope, &input.display_indent_schema().to_string()])
}

/// Whether every function `plan` calls is immutable (so its result, or its optimised plan, can
/// be reused), scalar functions for which `allowed` holds aside.
pub(crate) fn only_immutable(plan: &LogicalPlan, allowed: impl Fn(&ScalarUDF) -> bool) -> DFResult<bool> {
    let mut immutable = true;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                let volatility = match e {
                    Expr::ScalarFunction(f) if allowed(&f.func) => None,
                    Expr::ScalarFunction(f) => Some(f.func.signature().volatility),
                    Expr::AggregateFunction(f) => Some(f.func.signature().volatility),
                    Expr::WindowFunction(_) => Some(Volatility::Volatile),
                    _ => None,
                };
                if volatility.is_some_and(|v| v != Volatility::Immutable) {
                    immutable = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    Ok(immutable)
}

/// Runs a baseline's (optimised) plan, as part of the query's `task` (its memory pool), and
/// holds its result as a table with the plan's schema; returns it and its size in bytes.
async fn compute(state: &SessionState, task: &Arc<TaskContext>, input: &LogicalPlan) -> DFResult<(MemTable, usize)> {
    let physical = state.query_planner().create_physical_plan(input, state).await?;
    let physical = crate::limits::interruptible(physical)?;
    let batches = datafusion::physical_plan::collect(physical, Arc::clone(task)).await?;
    let schema = Arc::new(input.schema().as_arrow().clone());
    let batches = batches
        .into_iter()
        .map(|b| RecordBatch::try_new(Arc::clone(&schema), b.columns().to_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    Ok((MemTable::try_new(schema, vec![batches])?, bytes))
}
