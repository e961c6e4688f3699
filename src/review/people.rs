//! The people behind each group of a result, for an output checker: the query's first
//! aggregate (as written, before any rewrite) with its aggregates replaced by a count of the
//! distinct `person_id` of its input, on the project's guarded tables. Shown to checkers only.
//!
//! Groups are named by the aggregate's group columns. Where the query groups by something other
//! than plain columns, or its input has no `person_id`, there is nothing to show and the view
//! says so rather than guess.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, col};
use datafusion::prelude::SessionContext;

use super::view::Table;
use crate::engine::PERSON_ID;
use crate::error::Error;

/// Distinct people per group: the group columns' names and a table of those columns and
/// `people`; None where the query does not group by plain columns of a table with people.
pub async fn per_group(session: &SessionContext, sql: &str) -> Result<Option<(Vec<String>, Table)>, Error> {
    let err = |e: datafusion::error::DataFusionError| Error::Internal(format!("people behind the groups: {e}"));
    let plan = session.state().create_logical_plan(sql).await.map_err(err)?;
    let mut aggregate = None;
    plan.apply(|node| {
        if let LogicalPlan::Aggregate(a) = node {
            aggregate = Some(a.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(err)?;
    let Some(aggregate) = aggregate else {
        return Ok(None);
    };
    let mut names = Vec::new();
    for e in &aggregate.group_expr {
        match e {
            Expr::Column(c) => names.push(c.name.clone()),
            _ => return Ok(None),
        }
    }
    let Some(person) = aggregate
        .input
        .schema()
        .columns()
        .into_iter()
        .find(|c| c.name == PERSON_ID)
    else {
        return Ok(None);
    };
    let counted = LogicalPlanBuilder::from(aggregate.input.as_ref().clone())
        .aggregate(
            aggregate.group_expr.clone(),
            vec![count_distinct(col(person)).alias("people")],
        )
        .and_then(LogicalPlanBuilder::build)
        .map_err(err)?;
    let batches = session
        .execute_logical_plan(counted)
        .await
        .map_err(err)?
        .collect()
        .await
        .map_err(err)?;
    Ok(Some((names, Table::of(&batches)?)))
}
