//! Safe Settings, the statement gate: the researcher's SQL is parsed and bounded here, before
//! DataFusion plans anything.
//!
//! What this module guarantees for a statement it admits:
//! - it is at most `limits.max_sql_bytes` long and parses as one statement, in a number of
//!   parser steps bounded by its length ([`parse`]: the parser backtracks, and nested
//!   failures would otherwise cost it time exponential in their depth);
//! - it is not one of DataFusion's own statements (`COPY … TO`, `EXPLAIN`, `CREATE EXTERNAL
//!   TABLE`, `RESET`), whose inner query this gate cannot bound: those are refused here, before
//!   DataFusion's planner walks them (`safe-outputs/single-query`);
//! - its complexity is within the `limits.*` bounds ([`StatementLimits`]): expression depth,
//!   expression nodes (the plain literals of an `IN (…)` list are not counted, so code lists of
//!   tens of thousands of codes stay cheap), CASE branches, joins, subquery nesting, set
//!   operations chained in one query, CTEs in one WITH, and the length of each string literal;
//! - every function it calls is on the gateway's allowlist ([`functions`]): scalar functions
//!   by name; aggregate and window functions are judged by the structural checks in
//!   [`crate::policy`]; no table functions at all (`range`, `generate_series`, `unnest`, …).
//!
//! The parse and the walk run on a stack of their own ([`stack_bytes`]), sized for the deepest
//! tree `max_sql_bytes` of SQL can build (a flat chain `1+1+1…` parses into a tree as deep as it
//! is long), and the walk stops descending at the depth limit. A refused statement is dropped
//! on that stack too. Everything downstream (DataFusion's planner, optimizer and executor,
//! our own plan walks) then only ever sees trees the limits admit.
//!
//! One bound is checked on the logical plan instead, right after DataFusion's SQL planner made
//! it and before any other walk of it ([`bound_plan`]): its depth, `limits.max_plan_depth`. A
//! chain of CTEs each reading the last is shallow as SQL and deep as a plan.
//!
//! Refusals name the rule (`safe-settings/complexity`, `safe-settings/functions`), the limit,
//! the statement's value and the config key. They depend on the SQL alone, never on data.

use std::ops::ControlFlow;

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SessionState;
use datafusion::logical_expr::expr::{Exists, InSubquery};
use datafusion::logical_expr::{Expr as PlanExpr, LogicalPlan};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, Expr, Query, SetExpr, TableFactor, Visit, Visitor};

use super::PolicyError;
use crate::config::LimitsConfig;

mod bind;
pub mod functions;
pub mod parse;

/// The bounds a statement must stay within; each is a `limits.*` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementLimits {
    pub max_sql_bytes: usize,
    pub max_parse_steps_per_token: usize,
    pub max_expression_depth: usize,
    pub max_expression_nodes: usize,
    pub max_in_list_items: usize,
    pub max_case_branches: usize,
    pub max_joins: usize,
    pub max_subquery_depth: usize,
    pub max_set_operations: usize,
    pub max_ctes: usize,
    pub max_plan_depth: usize,
    pub max_value_bytes: usize,
}

impl From<&LimitsConfig> for StatementLimits {
    fn from(c: &LimitsConfig) -> Self {
        Self {
            max_sql_bytes: c.max_sql_bytes,
            max_parse_steps_per_token: c.max_parse_steps_per_token,
            max_expression_depth: c.max_expression_depth,
            max_expression_nodes: c.max_expression_nodes,
            max_in_list_items: c.max_in_list_items,
            max_case_branches: c.max_case_branches,
            max_joins: c.max_joins,
            max_subquery_depth: c.max_subquery_depth,
            max_set_operations: c.max_set_operations,
            max_ctes: c.max_ctes,
            max_plan_depth: c.max_plan_depth,
            max_value_bytes: c.max_value_bytes,
        }
    }
}

impl Default for StatementLimits {
    fn default() -> Self {
        Self::from(&LimitsConfig::default())
    }
}

/// Stack bytes per byte of SQL text: a byte of SQL adds at most half a level to the tree
/// (`+1` is two bytes), and dropping or walking one level takes well under 256 bytes of stack
/// even in a debug build (measured by the test at the limit).
const STACK_PER_SQL_BYTE: usize = 256;

/// The stack the parse and the walk run on for `max_sql_bytes` of SQL (at least 8 MiB).
pub fn stack_bytes(max_sql_bytes: usize) -> usize {
    max_sql_bytes.saturating_mul(STACK_PER_SQL_BYTE).max(8 << 20)
}

/// Parses `sql` in `state`'s dialect and admits it, or refuses it with the rule it breaks.
pub fn admit(state: &SessionState, sql: &str, limits: &StatementLimits) -> Result<DFStatement, PolicyError> {
    if sql.len() > limits.max_sql_bytes {
        return Err(PolicyError::TooLong(sql.len(), limits.max_sql_bytes));
    }
    stacker::grow(stack_bytes(limits.max_sql_bytes), || {
        let statement = parse::parse(state, sql, limits)?;
        // A refused statement is dropped here, on this stack: its tree may be deep.
        gate(state, &statement, limits)?;
        Ok(statement)
    })
}

/// Parses `sql` (within the parse budget, on the gate's stack) and calls `f` on the statement.
fn parsed<T>(
    sql: &str,
    limits: &StatementLimits,
    f: impl FnOnce(&mut DFStatement) -> Result<T, PolicyError>,
) -> Result<T, PolicyError> {
    if sql.len() > limits.max_sql_bytes {
        return Err(PolicyError::TooLong(sql.len(), limits.max_sql_bytes));
    }
    // The parse needs only the parser's options, not a project's catalogue.
    let state = datafusion::execution::SessionStateBuilder::new().build();
    stacker::grow(stack_bytes(limits.max_sql_bytes), || {
        let mut statement = parse::parse(&state, sql, limits)?;
        f(&mut statement)
    })
}

/// The number of parameters (`?` or `$n` placeholders) `sql` takes.
pub fn parameters(sql: &str, limits: &StatementLimits) -> Result<usize, PolicyError> {
    // Every placeholder is spelled with `?` or `$`: without either, no parse is needed (ADBC
    // prepares every query, most without parameters).
    if !sql.contains(['?', '$']) {
        return Ok(0);
    }
    parsed(sql, limits, bind::count)
}

/// `sql` with its placeholders replaced by literals of `values` ([`bind`]): the SQL that is
/// then admitted, checked, run and recorded like any other.
pub fn bind(
    sql: &str,
    values: &[datafusion::common::ScalarValue],
    limits: &StatementLimits,
) -> Result<String, PolicyError> {
    parsed(sql, limits, |statement| bind::bind(statement, values))
}

/// The complexity bounds and the function allowlist, on a parsed statement.
pub fn gate(state: &SessionState, statement: &DFStatement, limits: &StatementLimits) -> Result<(), PolicyError> {
    // DataFusion's own statements are refused here, before its planner walks them: the query
    // inside `COPY (…) TO` or `EXPLAIN` is not a sqlparser tree this walk could bound.
    let kind = match statement {
        DFStatement::Statement(inner) => return walk_statement(state, inner, limits),
        DFStatement::CreateExternalTable(_) => "a definition (CREATE, DROP)",
        DFStatement::CopyTo(_) => "COPY",
        DFStatement::Explain(_) => "EXPLAIN",
        DFStatement::Reset(_) => "a statement (SET, transactions, PREPARE)",
    };
    Err(PolicyError::NotAQuery(kind.into()))
}

/// The complexity bounds and the function allowlist, on a sqlparser statement.
fn walk_statement(state: &SessionState, inner: &ast::Statement, limits: &StatementLimits) -> Result<(), PolicyError> {
    let mut walk = Walk {
        state,
        limits,
        depth: 0,
        nodes: 0,
        credit: 0,
        in_list_items: 0,
        joins: 0,
        queries: 0,
    };
    match inner.visit(&mut walk) {
        ControlFlow::Break(refusal) => Err(refusal),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Refuses a logical plan deeper than `limits.max_plan_depth` (each node a level, subqueries
/// in expressions included), measured without recursion.
pub fn bound_plan(plan: &LogicalPlan, limits: &StatementLimits) -> Result<(), PolicyError> {
    let mut subqueries: Vec<(Arc<LogicalPlan>, usize)> = Vec::new();
    plan_depth(plan, 1, limits, &mut subqueries)?;
    while let Some((subquery, depth)) = subqueries.pop() {
        plan_depth(&subquery, depth, limits, &mut subqueries)?;
    }
    Ok(())
}

/// Walks `root`'s inputs from `depth`, leaving the subqueries of its expressions in `found`.
fn plan_depth(
    root: &LogicalPlan,
    depth: usize,
    limits: &StatementLimits,
    found: &mut Vec<(Arc<LogicalPlan>, usize)>,
) -> Result<(), PolicyError> {
    let mut pending = vec![(root, depth)];
    while let Some((node, depth)) = pending.pop() {
        if let ControlFlow::Break(refusal) = over(
            "logical plan depth",
            depth,
            limits.max_plan_depth,
            "max_plan_depth",
            "chain fewer CTEs or derived tables, each reading the last",
        ) {
            return Err(refusal);
        }
        pending.extend(node.inputs().into_iter().map(|input| (input, depth + 1)));
        let _ = node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let PlanExpr::ScalarSubquery(sub)
                | PlanExpr::Exists(Exists { subquery: sub, .. })
                | PlanExpr::InSubquery(InSubquery { subquery: sub, .. }) = e
                {
                    found.push((Arc::clone(&sub.subquery), depth + 1));
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
    }
    Ok(())
}

/// The set operations of one query body (not those of the parenthesised queries inside it,
/// which are queries of their own), counted without recursion and stopping past `max`: a
/// chain `a UNION b UNION …` is a tree as deep as it is long.
fn set_operations(body: &SetExpr, max: usize) -> usize {
    let (mut count, mut pending) = (0, vec![body]);
    while let Some(set) = pending.pop() {
        if let SetExpr::SetOperation { left, right, .. } = set {
            count += 1;
            if count > max {
                break;
            }
            pending.extend([left.as_ref(), right.as_ref()]);
        }
    }
    count
}

/// Past its limit (`value > max`): the refusal naming the limit, the statement's value and the
/// key.
fn over(
    what: &'static str,
    value: usize,
    max: usize,
    key: &'static str,
    advice: &'static str,
) -> ControlFlow<PolicyError> {
    if value <= max {
        return ControlFlow::Continue(());
    }
    ControlFlow::Break(PolicyError::Complexity {
        what,
        value,
        max,
        key,
        advice,
    })
}

struct Walk<'a> {
    state: &'a SessionState,
    limits: &'a StatementLimits,
    depth: usize,
    nodes: usize,
    /// IN-list literals still to be visited, which are not counted as nodes.
    credit: usize,
    in_list_items: usize,
    joins: usize,
    queries: usize,
}

impl Walk<'_> {
    fn function(&self, f: &ast::Function) -> Result<(), PolicyError> {
        let name = match f.name.0.as_slice() {
            [part] => part.to_string(),
            _ => f.name.to_string(),
        };
        functions::scalar_allowed(self.state, &name)
    }
}

impl Visitor for Walk<'_> {
    type Break = PolicyError;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<PolicyError> {
        self.queries += 1;
        let l = self.limits;
        let ctes = query.with.as_ref().map_or(0, |with| with.cte_tables.len());
        over(
            "number of CTEs in one WITH",
            ctes,
            l.max_ctes,
            "max_ctes",
            "chain fewer CTEs: fold steps that only rename or filter into one",
        )?;
        let chained = set_operations(&query.body, l.max_set_operations);
        over(
            "chain of set operations",
            chained,
            l.max_set_operations,
            "max_set_operations",
            "combine the tables in one subquery with fewer UNIONs, or split the query",
        )?;
        over(
            "subquery nesting",
            self.queries - 1,
            l.max_subquery_depth,
            "max_subquery_depth",
            "flatten the subqueries into joins or a CTE",
        )?;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<PolicyError> {
        self.queries -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<PolicyError> {
        let joined = match factor {
            TableFactor::Table {
                args: Some(_), name, ..
            } => {
                return ControlFlow::Break(functions::table_function(&name.to_string()));
            }
            TableFactor::TableFunction { .. } | TableFactor::Function { .. } | TableFactor::UNNEST { .. } => {
                return ControlFlow::Break(functions::table_function(&factor.to_string()));
            }
            TableFactor::NestedJoin { table_with_joins, .. } => table_with_joins.joins.len(),
            _ => 0,
        };
        self.joins += joined;
        self.check_joins()
    }

    fn pre_visit_select(&mut self, select: &ast::Select) -> ControlFlow<PolicyError> {
        self.joins += select.from.iter().map(|t| t.joins.len()).sum::<usize>() + select.from.len().saturating_sub(1);
        self.check_joins()
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<PolicyError> {
        let l = self.limits;
        self.depth += 1;
        match expr {
            // A plain literal of an IN list (credited below) is a list item, not a node.
            Expr::Value(_) if self.credit > 0 => self.credit -= 1,
            _ => self.nodes += 1,
        }
        over(
            "expression depth",
            self.depth,
            l.max_expression_depth,
            "max_expression_depth",
            "a long chain of AND, OR, || or arithmetic nests one level per term: use IN (…) for lists of values, or split the query",
        )?;
        match expr {
            Expr::InList { list, .. } => {
                // The list's plain literals are counted as list items, not as expression nodes.
                self.credit += list.iter().filter(|e| matches!(e, Expr::Value(_))).count();
                self.in_list_items += list.len();
                over(
                    "IN-list items",
                    self.in_list_items,
                    l.max_in_list_items,
                    "max_in_list_items",
                    "put the code list in fewer, shorter lists or ask for it to be loaded as a reference dataset",
                )?;
            }
            Expr::Case { conditions, .. } => over(
                "CASE branches",
                conditions.len(),
                l.max_case_branches,
                "max_case_branches",
                "map values with fewer branches, or with IN (…) lists in each branch",
            )?,
            Expr::Function(f) => {
                if let Err(refused) = self.function(f) {
                    return ControlFlow::Break(refused);
                }
            }
            Expr::Array(_) | Expr::Map(_) | Expr::Dictionary(_) | Expr::Struct { .. } | Expr::Lambda(_) => {
                return ControlFlow::Break(functions::collection());
            }
            _ => {}
        }
        over(
            "expression nodes",
            self.nodes,
            l.max_expression_nodes,
            "max_expression_nodes",
            "simplify the expressions, or split the query",
        )?;
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<PolicyError> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_value(&mut self, value: &ast::ValueWithSpan) -> ControlFlow<PolicyError> {
        let l = self.limits;
        let bytes = literal_bytes(&value.value);
        over(
            "bytes in one literal",
            bytes,
            l.max_value_bytes,
            "max_value_bytes",
            "use shorter literals",
        )?;
        ControlFlow::Continue(())
    }
}

impl Walk<'_> {
    fn check_joins(&self) -> ControlFlow<PolicyError> {
        let l = self.limits;
        over(
            "joins",
            self.joins,
            l.max_joins,
            "max_joins",
            "join fewer tables in one query",
        )?;
        ControlFlow::Continue(())
    }
}

/// The length of a literal's text, or 0 for one that is not text.
fn literal_bytes(value: &ast::Value) -> usize {
    use ast::Value::*;
    match value {
        SingleQuotedString(s)
        | DoubleQuotedString(s)
        | EscapedStringLiteral(s)
        | UnicodeStringLiteral(s)
        | NationalStringLiteral(s)
        | HexStringLiteral(s)
        | SingleQuotedByteStringLiteral(s)
        | DoubleQuotedByteStringLiteral(s)
        | TripleSingleQuotedString(s)
        | TripleDoubleQuotedString(s)
        | TripleSingleQuotedByteStringLiteral(s)
        | TripleDoubleQuotedByteStringLiteral(s)
        | SingleQuotedRawStringLiteral(s)
        | DoubleQuotedRawStringLiteral(s)
        | TripleSingleQuotedRawStringLiteral(s)
        | TripleDoubleQuotedRawStringLiteral(s) => s.len(),
        DollarQuotedString(d) => d.value.len(),
        Number(n, _) => n.len(),
        Boolean(_) | Null | Placeholder(_) => 0,
        other => other.to_string().len(),
    }
}

#[cfg(test)]
mod tests;
