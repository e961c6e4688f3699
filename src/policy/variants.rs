//! Safe Outputs, conditions of low effect: an aggregate whose rows pass conditions
//! ([`super::conditions`]) is answered, per group, as if each condition that changes the
//! group's people by fewer than `threshold` were not there. So "everyone" and "everyone but X"
//! get one answer, whether or not X is in the group, and nothing marks that it happened.
//!
//! In one execution: the aggregate is rewritten ([`Rewriter::protect`]) once per subset of its
//! conditions (2^k variants for k conditions, at most [`MOST_CONDITIONS`]), each counting its
//! groups' people exactly. Per group, condition `i` is of low effect where the variant without
//! it has between 1 and threshold − 1 more people than the variant with all of them; the group
//! is released from the variant without the conditions of low effect (unless, together, they
//! leave out threshold people or more: then from the variant with all), kept or withheld by
//! its people there.
//!
//! ```text
//! Projection  keys, cells → CASE choice WHEN r THEN variant r's cell … (sde_released)
//!   Filter    sde_keep_group(the chosen variant's people)
//!     Join    on group keys: the variant without any condition, then each other variant
//! ```

use std::sync::Arc;

use datafusion::common::{Column, NullEquality};
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::logical_expr::{Aggregate, Expr, Filter, JoinType, LogicalPlan, LogicalPlanBuilder, Projection, lit};

use super::PolicyError;
use super::conditions::strip;
use super::lineage::Mask;
use super::protect::{Rewriter, variant_people};

/// The most conditions one aggregate's rows may pass: 2^3 = 8 variants are computed.
pub(super) const MOST_CONDITIONS: usize = 3;

impl Rewriter {
    /// [`Rewriter::protect`], with every condition of low effect treated as absent per group.
    pub(super) fn protect_judged(&mut self, agg: Aggregate, in_mask: &Mask) -> Result<LogicalPlan, PolicyError> {
        let df = PolicyError::from_df;
        let input = Arc::unwrap_or_clone(Arc::clone(&agg.input));
        let (_, k) = strip(input.clone(), 0).map_err(df)?;
        if k == 0 {
            return self.protect(agg, in_mask, false);
        }
        if k > MOST_CONDITIONS {
            return Err(PolicyError::Unsupported(
                "an aggregate may be filtered by at most 3 conditions (WHERE and join conditions); use IN (…), BETWEEN or GROUP BY for the others",
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let n_group = agg.schema.fields().len() - agg.aggr_expr.len();
        let all = (1u64 << k) - 1;
        // The variants' cells are computed and only the chosen ones released: they tally nowhere.
        let untallied = self.disclosure.untallied();
        let tallied = std::mem::replace(&mut self.disclosure, untallied);
        let mut variants = Vec::with_capacity(1 << k);
        let made = (0..=all).try_for_each(|removed| {
            let stripped = strip(input.clone(), removed).map_err(df)?.0;
            let variant =
                Aggregate::try_new(Arc::new(stripped), agg.group_expr.clone(), agg.aggr_expr.clone()).map_err(df)?;
            let plan = self.protect(variant, in_mask, true)?;
            // The variant without any condition is the baseline, reused across queries.
            let alias = match removed == all {
                true => format!("{}{id}", super::BASELINE),
                false => format!("__sde_variant_{id}_{removed}"),
            };
            let plan = LogicalPlanBuilder::from(plan)
                .alias(alias.clone())
                .and_then(|b| b.build());
            variants.push((alias, plan.map_err(df)?));
            Ok::<_, PolicyError>(())
        });
        self.disclosure = tallied;
        made?;
        let people = variants[0].1.schema().fields().len() - agg.schema.fields().len();
        let field = |alias: &str, name: &str| Expr::Column(Column::new(Some(alias), name));
        let keys = |alias: &str| -> Vec<Column> {
            agg.schema
                .fields()
                .iter()
                .take(n_group)
                .map(|f| Column::new(Some(alias), f.name()))
                .collect()
        };
        // Every group is in the variant without conditions: the others join it.
        let (base, base_plan) = variants.pop().expect("at least two variants");
        let mut joined = LogicalPlanBuilder::from(base_plan);
        for (alias, plan) in &variants {
            joined = match n_group {
                0 => joined.cross_join(plan.clone()),
                _ => joined.join_detailed(
                    plan.clone(),
                    JoinType::Left,
                    (keys(&base), keys(alias)),
                    None,
                    NullEquality::NullEqualsNull,
                ),
            }
            .map_err(df)?;
        }
        let joined = joined.build().map_err(df)?;
        let alias_of = |removed: u64| match removed == all {
            true => base.clone(),
            false => variants[removed as usize].0.clone(),
        };
        let people_of =
            |removed: u64, j: usize| coalesce(vec![field(&alias_of(removed), &variant_people(j)), lit(0i64)]);
        // Condition i is of low effect where removing it adds 1 to threshold − 1 people.
        let threshold = self.disclosure.rules().threshold as i64;
        let choice = (0..k)
            .map(|i| {
                let added: Vec<Expr> = (0..people).map(|j| people_of(1 << i, j) - people_of(0, j)).collect();
                let few = added.iter().map(|a| a.clone().lt(lit(threshold))).reduce(Expr::and);
                let some = added.into_iter().map(|a| a.gt_eq(lit(1i64))).reduce(Expr::or);
                let low = few.zip(some).map(|(f, s)| f.and(s)).unwrap_or(lit(false));
                datafusion::logical_expr::when(low, lit(1i64 << i)).otherwise(lit(0i64))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(df)?
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("at least one condition");
        let pick_by = |choice: &Expr, column: &dyn Fn(u64) -> Expr| -> Result<Expr, PolicyError> {
            let mut case = datafusion::logical_expr::case(choice.clone());
            for removed in 0..=all {
                case = case.when(lit(removed as i64), column(removed));
            }
            case.end().map_err(df)
        };
        // Conditions each of low effect may together leave out many people: then none is
        // treated as absent, and the group is answered as asked.
        let together = pick_by(&choice, &|r| people_of(r, 0))? - people_of(0, 0);
        let choice = datafusion::logical_expr::when(together.lt(lit(threshold)), choice)
            .otherwise(lit(0i64))
            .map_err(df)?;
        let pick = |column: &dyn Fn(u64) -> Expr| pick_by(&choice, column);
        let mut plan = joined;
        if n_group > 0 {
            let chosen = (0..people)
                .map(|j| pick(&|r| people_of(r, j)))
                .collect::<Result<Vec<_>, _>>()?;
            let keep = self.disclosure.keep_group(chosen);
            plan = LogicalPlan::Filter(Filter::try_new(keep, Arc::new(plan)).map_err(df)?);
        }
        let mut exprs = Vec::with_capacity(agg.schema.fields().len());
        for (idx, (qualifier, f)) in agg.schema.iter().enumerate() {
            let name = f.name();
            let value = match idx < n_group {
                true => field(&base, name),
                false => {
                    self.checked.push(name.clone());
                    self.disclosure.released(pick(&|r| field(&alias_of(r), name))?)
                }
            };
            exprs.push(value.alias_qualified(qualifier.cloned(), name));
        }
        Ok(LogicalPlan::Projection(
            Projection::try_new(exprs, Arc::new(plan)).map_err(df)?,
        ))
    }
}
