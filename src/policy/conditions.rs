//! Safe Outputs, the conditions an aggregate's rows pass: each conjunct of each WHERE (and of
//! each filter below it, in subqueries in FROM) and each condition of an inner join other than
//! `a.x = b.y`, numbered in one fixed order. [`strip`] gives the plan without a chosen set of
//! them, so the rewrite can judge each condition's effect on a group's people and answer as if
//! a condition of low effect were not there ([`super::variants`]).
//!
//! Pure functions of plans; the schema of a stripped plan is the schema of the plan.

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Expr, Filter, JoinType, LogicalPlan, Operator, lit};

/// Whether a join condition only joins (`a.x = b.y`): it is kept, never a condition to judge.
fn joins_only(e: &Expr) -> bool {
    matches!(e, Expr::BinaryExpr(b) if b.op == Operator::Eq
        && matches!(*b.left, Expr::Column(_)) && matches!(*b.right, Expr::Column(_)))
}

/// `plan` without the conditions whose numbers are set in `removed` (bit `i` for condition
/// `i`), and how many conditions it has. A filter left without conditions filters nothing.
pub(super) fn strip(plan: LogicalPlan, removed: u64) -> DFResult<(LogicalPlan, usize)> {
    let mut next = 0usize;
    let mut keep = |conditions: Vec<Expr>| -> Vec<Expr> {
        conditions
            .into_iter()
            .filter(|_| {
                let i = next;
                next += 1;
                i >= 64 || removed & (1 << i) == 0
            })
            .collect()
    };
    let plan = plan
        .transform_down(|node| match node {
            LogicalPlan::Filter(f) => {
                let conjuncts: Vec<Expr> = split_conjunction(&f.predicate).into_iter().cloned().collect();
                let n = conjuncts.len();
                let kept = keep(conjuncts);
                if kept.len() == n {
                    return Ok(Transformed::no(LogicalPlan::Filter(f)));
                }
                let predicate = kept.into_iter().reduce(Expr::and).unwrap_or(lit(true));
                Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                    predicate, f.input,
                )?)))
            }
            LogicalPlan::Join(mut j) if j.join_type == JoinType::Inner && j.filter.is_some() => {
                let filter = j.filter.take().expect("checked");
                let (joining, conditions): (Vec<Expr>, Vec<Expr>) =
                    split_conjunction(&filter).into_iter().cloned().partition(joins_only);
                let n = conditions.len();
                let kept = keep(conditions);
                let changed = kept.len() != n;
                j.filter = joining.into_iter().chain(kept).reduce(Expr::and);
                Ok(Transformed::new_transformed(LogicalPlan::Join(j), changed))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data;
    Ok((plan, next))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn plan(sql: &str) -> LogicalPlan {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Int64, false),
        ]));
        for t in ["t", "u"] {
            let table = MemTable::try_new(Arc::clone(&schema), vec![vec![]]).unwrap();
            ctx.register_table(t, Arc::new(table)).unwrap();
        }
        ctx.state().create_logical_plan(sql).await.unwrap()
    }

    #[tokio::test]
    async fn conditions_are_numbered_once_and_stripped_by_number() {
        let sql = "SELECT COUNT(*) FROM t JOIN u ON t.id = u.id AND u.a > t.a \
                   WHERE t.a > 1 AND (t.b < 2 OR t.b > 5) AND t.id IN (SELECT id FROM u WHERE b = 3)";
        let p = plan(sql).await;
        let (same, n) = strip(p.clone(), 0).unwrap();
        // WHERE: 3 conjuncts; the subquery's own filter is not the aggregate's; ON: 1 condition.
        assert_eq!(n, 4);
        assert_eq!(same, p);
        let all = strip(p.clone(), 0b1111).unwrap().0;
        let text = all.display_indent().to_string();
        assert!(
            !text.contains("t.a > Int64(1)") && !text.contains("u.a > t.a"),
            "{text}"
        );
        assert!(text.contains("t.id = u.id"), "the join itself is kept: {text}");
        assert_eq!(all.schema(), p.schema());
        // One condition at a time: exactly that one goes.
        for i in 0..n {
            let (one, m) = strip(p.clone(), 1 << i).unwrap();
            assert_eq!(m, n);
            assert_ne!(one, p, "condition {i}");
        }
    }
}
