//! Safe Outputs, counting people: which identifier columns of a plan name the same person on
//! every row, and how many rows a person may have.
//!
//! Pure questions about plans; nothing here rewrites the researcher's query.

use datafusion::common::Column;

use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan, Operator};

use crate::engine::{GuardedTable, PERSON_ID};

/// `ids`, the identifier columns of `plan`, with those an inner join on them makes equal on
/// every row ([`same_person`]) kept once: counting people by either gives the same figure in
/// every group and under every condition. Of two, the one a cell counts distinct people of
/// (`counted`) is kept, so that the cell and its group's people are one count.
pub(super) fn one_per_person(plan: &LogicalPlan, ids: Vec<Column>, counted: &[Column]) -> Vec<Column> {
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
/// the join's own equalities count: they are what [`super::conditions::strip`] keeps, so the
/// same holds in every variant of the plan. Anything else (outer joins, a WHERE
/// equality, a chain of joins) is not known.
#[recursive::recursive]
pub(super) fn same_person(plan: &LogicalPlan, a: &Column, b: &Column) -> bool {
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
pub(super) fn column_at(plan: &LogicalPlan, index: usize) -> Column {
    Column::from(plan.schema().qualified_field(index))
}

/// Whether every row of `plan` has a different, non-NULL `column` (see [`most_rows_per_person`]).
#[cfg(test)]
pub(super) fn one_row_per_person(plan: &LogicalPlan, column: &Column) -> bool {
    most_rows_per_person(plan, column) == Some(1)
}

/// The most rows of `plan` that share one `column`, every row having one, known because the
/// column is the `person_id` of a table that has at most that many rows per person, each with
/// a `person_id`, reached through filters, renames and semi- or anti-joins only (which drop
/// rows but never repeat one). Anything else: not known.
#[recursive::recursive]
pub(super) fn most_rows_per_person(plan: &LogicalPlan, column: &Column) -> Option<u64> {
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
