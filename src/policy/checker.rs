//! Safe Outputs, the plan walk: visits the logical plan bottom-up, tracks which columns are
//! identifiers ([`super::lineage`]), refuses what may not reach an output, and hands every
//! aggregate over person-level rows to the per-person rewrite ([`super::protect`]).
//!
//! It owns the walk's state ([`Checker`]) and the rules for each kind of plan node; the
//! aggregate rewrite and the people-counting helpers live in their own modules.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::expr::InSubquery;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Aggregate, Distinct, Expr, JoinType, LogicalPlan, Operator, Projection, Subquery};

use crate::disclosure::Disclosure;
use crate::engine::{GuardedTable, PERSON_ID};

use super::PolicyError;
use super::check_statement_kind;
use super::lineage::{
    HIDDEN_PID, Id, Mask, bare_identifier, bare_kind, both_sides_schema, has_person, is_identifier_column,
    no_identifier,
};
use super::protect::Rewriter;

/// The walk's state: the aggregate rewrite's, and the identifier masks of the subqueries seen.
pub(super) struct Checker {
    pub(super) rewriter: Rewriter,
    /// Identifier masks of rewritten subquery plans, keyed by the plan's address.
    subquery_masks: HashMap<usize, Mask>,
}

impl Checker {
    pub(super) fn new(disclosure: Disclosure, from_rows: bool) -> Self {
        Self {
            rewriter: Rewriter::new(disclosure, from_rows),
            subquery_masks: HashMap::new(),
        }
    }
}

pub(super) fn key(plan: &Arc<LogicalPlan>) -> usize {
    Arc::as_ptr(plan) as usize
}

impl Checker {
    #[recursive::recursive]
    pub(super) fn visit(&mut self, plan: LogicalPlan) -> Result<(LogicalPlan, Mask), PolicyError> {
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
                    Expr::Placeholder(_) => Some(PolicyError::Unsupported("parameters ($1, ?) need a prepared statement with their values bound; otherwise write the values into the query")),
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
                    let plan = self.rewriter.protect_judged(a, &masks[0])?;
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
                let name = format!("{HIDDEN_PID}{}", self.rewriter.next_id);
                self.rewriter.next_id += 1;
                exprs.push(Expr::Column(column).alias(name));
                mask.push(Id::Person);
            }
        }
        let plan = Projection::try_new(exprs, p.input).map_err(PolicyError::from_df)?;
        Ok((LogicalPlan::Projection(plan), mask))
    }
}
