//! Safe Outputs, the aggregate rules and the per-person rewrite: which aggregates may run over
//! person-level rows, and the rewrite of each such aggregate so that the same execution counts
//! the distinct people behind every group and cell and applies the disclosure rules to its
//! output before anything else reads it.
//!
//! It adds plan nodes only under the reserved `__sde_` prefix and never changes what the
//! researcher's own aggregates compute.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::utils::expr::COUNT_STAR_EXPANSION;
use datafusion::common::{Column, ScalarValue};
use datafusion::functions::core::expr_fn::get_field;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Expr, Filter, LogicalPlan, Projection, cast, lit, when};

use crate::disclosure::cellkey::{Counted, cell_key};
use crate::disclosure::{Disclosure, people_at_least, shares};

use super::PolicyError;
use super::lineage::{Id, Mask, bare_identifier, no_identifier};
use super::people::{most_rows_per_person, one_per_person};

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

/// `expr` as a column of the aggregate `aggr`: pushed as `name` unless an aggregate computes it
/// already (one computation, and no two columns the optimiser would see as one).
fn push_once(aggr: &mut Vec<Expr>, expr: Expr, name: String) -> Expr {
    let same = aggr.iter().find_map(|e| match e {
        Expr::Alias(a) if *a.expr == expr => Some(a.name.clone()),
        _ => None,
    });
    let name = same.unwrap_or_else(|| {
        aggr.push(expr.alias(name.clone()));
        name
    });
    Expr::Column(Column::new_unqualified(name))
}

/// The name of a variant's people column for identifier `j`.
pub(super) fn variant_people(j: usize) -> String {
    format!("__sde_vpeople_{j}")
}

/// The rewrite's state over one plan: the rules, the next fresh name, the cells it made.
pub(super) struct Rewriter {
    pub(super) disclosure: Disclosure,
    pub(super) next_id: usize,
    /// The names of the checked aggregate cells, in the order they were made.
    pub(super) checked: Vec<String>,
    /// Whether groups may be judged by their rows where each person has at most a known number
    /// of them ([`super::Permit::from_rows`]); and whether any was.
    from_rows: bool,
    pub(super) told_from_rows: bool,
}

impl Rewriter {
    pub(super) fn new(disclosure: Disclosure, from_rows: bool) -> Self {
        Self {
            disclosure,
            next_id: 0,
            checked: vec![],
            from_rows,
            told_from_rows: false,
        }
    }

    /// Rewrites an aggregate over person-level rows so that disclosure control applies to its
    /// output. The result has the aggregate's columns, names and order (values may be NULL):
    ///
    /// ```text
    /// Projection   cells → sde_count_cell / sde_value_cell (threshold, rounding, cell keys;
    ///                                                       flattening, noise)
    ///   Filter     sde_keep_group (groups backed by too few people are withheld)
    ///     Aggregate  the original aggregates + people per group and per cell + cell keys
    ///                + each person's share of each SUM and AVG cell (`sde_shares`, flattening)
    /// ```
    ///
    /// A `variant` (one of the alternatives [`super::variants`] chooses from per group) has no
    /// Filter, counts its groups' people exactly, and ends with them: `variant_people(j)` per
    /// identifier.
    pub(super) fn protect(
        &mut self,
        agg: Aggregate,
        in_mask: &Mask,
        variant: bool,
    ) -> Result<LogicalPlan, PolicyError> {
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
        // The aggregate's output holds each distinct key once (`GROUP BY a, a` has one `a`
        // column), so the rewrite works on the distinct keys: its columns are then the keys
        // followed by the cells, as every index below assumes.
        let mut group_expr: Vec<Expr> = Vec::with_capacity(agg.group_expr.len());
        for g in &agg.group_expr {
            if !group_expr.contains(g) {
                group_expr.push(g.clone());
            }
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
        // Whether exact people counts per group are needed: for conditions of low effect (a
        // filtered input) and for cells with their own condition (people left out of the
        // group). Otherwise the rules only ask whether a group has `threshold` people.
        let mut exact = variant;
        // Flattening needs each person's total of each SUM and AVG cell: `sde_shares` keeps them
        // in the main aggregate's own pass. With one identifier and outside a variant, the
        // people of the group and the contributors of each cell with a condition are counted
        // from those shares too, rather than by distinct counts beside them.
        let has_sums = agg.aggr_expr.iter().any(|e| {
            matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(f)
                if matches!(f.func.name().to_lowercase().as_str(), "sum" | "avg" | "mean"))
        });
        // Told from rows (in the plan that may, [`Permit::from_rows`]): over a table whose people
        // each have at most a known number of rows, without a WHERE (which needs people counted
        // for conditions of low effect), FILTER (which leaves rows out of a cell) or cell
        // counting people (which reads every identifier anyway), the groups' people and the
        // cells' contributors are bounded by rows, never reading who they belong to. Sums and means are flattened per
        // person (their people's totals), so an aggregate with one is never told from rows.
        let told = self.from_rows
            && !has_sums
            && !variant
            && !ids.is_empty()
            && most_rows.iter().all(|m| m.is_some_and(|m| m > 1))
            && agg.aggr_expr.iter().all(|e| {
                matches!(e.clone().unalias_nested().data, Expr::AggregateFunction(AggregateFunction { params, .. })
                    if params.filter.is_none()
                        && !(params.distinct && params.args.iter().any(|a| bare_identifier(a, &schema, in_mask))))
            });
        let per_person_counts = has_sums && ids.len() == 1 && !unique[0] && !variant && !told;
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

        // Per aggregate: its cell keys (a count's; None for a sum or mean) and the people who
        // contribute to it.
        let mut cells = Vec::with_capacity(agg.aggr_expr.len());
        // Whether a cell counts the group's people exactly (then so does the group, in one count).
        let mut group_counted = false;
        // Per SUM or AVG cell and identifier, its `sde_shares` call.
        let mut sum_shares: Vec<(usize, usize)> = Vec::new();
        // Per SUM or AVG cell: its flattenings (one per identifier) and, for a mean, its values.
        let mut perturbations: HashMap<usize, Vec<Expr>> = HashMap::new();
        let mut mean_rows: HashMap<usize, Expr> = HashMap::new();
        let flattening = self.disclosure.rules().flattening();
        // Told from rows: the contributors' row counts (cell, identifier).
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
            // A count's cell key, per identifier, over what it counts: distinct people for
            // COUNT(DISTINCT …) (where one person can have several rows), else rows. A count
            // with a condition of its own also has its count and keys without it, released
            // where the condition is of low effect ([`Disclosure::count_cell`]).
            let mut keys = None;
            let mut unconditioned = None;
            if is_count {
                let people: Vec<bool> = unique.iter().map(|u| params.distinct && !u).collect();
                let contributes = condition.clone().unwrap_or(lit(true));
                keys = Some(self.count_keys(&mut aggr, &ids, &people, contributes, |j| {
                    format!("__sde_key_{id}_{i}_{j}")
                })?);
                if condition.is_some() {
                    let Expr::AggregateFunction(mut whole) = e.clone().unalias_nested().data else {
                        unreachable!("matched above")
                    };
                    whole.params.filter = None;
                    let (value, contributes) = match params.distinct {
                        true => {
                            let arg = params.args.first().cloned().unwrap_or(lit(1));
                            (Expr::AggregateFunction(whole), arg.is_not_null())
                        }
                        false => (count(lit(1)), lit(true)),
                    };
                    let value = push_once(&mut aggr, value, format!("__sde_uvalue_{id}_{i}"));
                    let u_keys = self.count_keys(&mut aggr, &ids, &people, contributes, |j| {
                        format!("__sde_ukey_{id}_{i}_{j}")
                    })?;
                    unconditioned = Some((value, u_keys));
                }
            }
            if !is_count {
                let arg = params.args.first().cloned().unwrap_or(lit(0));
                if self.disclosure.key().is_none() {
                    return Err(PolicyError::Unsupported(
                        "sums and means need the gateway's perturbation key, which this session lacks",
                    ));
                }
                // A mean's noise is shared out over its values.
                if name != "sum" {
                    aggr.push(count(arg.clone()).alias(format!("__sde_rows_{id}_{i}")));
                    mean_rows.insert(i, col(format!("__sde_rows_{id}_{i}")));
                }
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
            cells.push((keys, contributors, unconditioned));
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

        let n_group = group_expr.len();
        for (k, (j, value, contributes)) in shares_of.into_iter().enumerate() {
            aggr.push(shares(ids[j].clone(), value, contributes, flattening).alias(format!("__sde_shares_{id}_{k}")));
        }
        let main = Aggregate::try_new(Arc::clone(&agg.input), group_expr.clone(), aggr).map_err(df)?;
        // Every index below assumes the keys then the cells, in both aggregates; fail closed
        // on any aggregate whose columns are laid out otherwise.
        let laid_out = |a: &Aggregate, cells: usize| {
            a.group_expr_len().is_ok_and(|n| n == n_group) && a.schema.fields().len() == n_group + cells
        };
        if !laid_out(&agg, agg.aggr_expr.len()) || !laid_out(&main, main.aggr_expr.len()) {
            return Err(PolicyError::Unsupported(
                "this GROUP BY cannot be checked; group by each key once, by plain columns or expressions",
            ));
        }
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
        if told {
            self.told_from_rows = true;
            let rows = |j: usize| col(people_name(j));
            let exprs = plan
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
            plan = LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan)).map_err(df)?);
        }
        // Each SUM or AVG cell is flattened per identifier, from the shares' summaries.
        for (i, k) in sum_shares {
            perturbations
                .entry(i)
                .or_default()
                .push(col(format!("__sde_shares_{id}_{k}")));
        }

        // A variant is judged with the others before its groups are kept or withheld.
        if n_group > 0 && !variant {
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
            let (keys, contributors, unconditioned) = &cells[i];
            let cell = if let Some(keys) = keys {
                self.disclosure.count_cell(
                    column,
                    keys.clone(),
                    contributors.clone(),
                    group_people.clone(),
                    unconditioned.clone(),
                )
            } else {
                let perturbations = perturbations.remove(&i).unwrap_or_default();
                self.disclosure.value_cell(
                    column,
                    mean_rows.remove(&i),
                    perturbations,
                    contributors.clone(),
                    group_people.clone(),
                )
            };
            exprs.push(cell.alias_qualified(qualifier.cloned(), field.name()));
            if !variant {
                self.checked.push(field.name().clone());
            }
        }
        if variant {
            for (j, people) in group_people.iter().enumerate() {
                exprs.push(people.clone().alias(variant_people(j)));
            }
        }
        let projection = Projection::try_new(exprs, Arc::new(plan)).map_err(df)?;
        Ok(LogicalPlan::Projection(projection))
    }

    /// Pushes onto `aggr` the cell key of a count per identifier (`people[j]`: counting distinct
    /// people, else rows) over the rows where `contributes`, named by `name`; returns their
    /// columns. None are computed where counts are not perturbed.
    fn count_keys(
        &self,
        aggr: &mut Vec<Expr>,
        ids: &[Expr],
        people: &[bool],
        contributes: Expr,
        name: impl Fn(usize) -> String,
    ) -> Result<Vec<Expr>, PolicyError> {
        if self.disclosure.rules().count_noise_max == 0 {
            return Ok(vec![]);
        }
        let Some(record_keys) = self.disclosure.record_keys() else {
            return Err(PolicyError::Unsupported(
                "counts need the gateway's perturbation key, which this session lacks",
            ));
        };
        let mut keys = Vec::with_capacity(ids.len());
        for (j, person) in ids.iter().enumerate() {
            let counted = match people[j] {
                true => Counted::People,
                false => Counted::Rows,
            };
            let key = cell_key(person.clone(), contributes.clone(), record_keys, counted);
            keys.push(push_once(aggr, key, name(j)));
        }
        Ok(keys)
    }
}
