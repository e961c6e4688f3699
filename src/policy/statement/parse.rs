//! Safe Settings, the parse: the researcher's SQL text becomes one statement here, in a number
//! of parser steps bounded by the statement's length.
//!
//! The SQL parser backtracks: when a keyword-led expression (`CAST(`, `EXTRACT(`, `NOT`, …)
//! fails to parse, it rewinds and tries the keyword again as a plain name, re-reading
//! everything inside. Nested failures multiply, so a few kilobytes of unclosed `CAST(` take
//! the parser minutes, and its own nesting limit (50 levels) is far too deep to stop it. We
//! therefore count the parser's steps, one per expression term it starts, retries included
//! ([`Budgeted`], a dialect that behaves exactly as DataFusion's `generic` dialect and counts
//! in the one hook the parser calls for each term). The budget is
//! `limits.max_parse_steps_per_token` steps for each token of the statement. Past it, the parse stops at once
//! with the parser's own "recursion limit" error, which no backtracking point swallows, and
//! the statement is refused as too complex. A statement that parses without backtracking
//! takes about one step per term, far below the budget (measured in the tests).
//!
//! This module owns only the text → statement step; the bounds on the parsed statement are
//! [`super::gate`]'s.

use std::any::TypeId;
use std::cell::Cell;

use datafusion::common::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Expr;
use datafusion::sql::sqlparser::dialect::{Dialect, GenericDialect};
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::{PolicyError, StatementLimits};

/// Parses `sql` as one statement in at most `limits.max_parse_steps_per_token` parser steps for
/// each of its tokens (and at least [`MIN_STEPS`]).
pub fn parse(state: &SessionState, sql: &str, limits: &StatementLimits) -> Result<DFStatement, PolicyError> {
    // The budgeted dialect tokenizes exactly as the generic one it forwards to.
    let tokens = Tokenizer::new(&GenericDialect, sql)
        .tokenize_with_location()
        .map_err(|e| PolicyError::from_df(ParserError::from(e).into()))?;
    let terms = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .count();
    let max = terms.saturating_mul(limits.max_parse_steps_per_token).max(MIN_STEPS);
    let dialect = Budgeted::new(max);
    let recursion_limit = state.config().options().sql_parser.recursion_limit.get();
    let parsed = DFParserBuilder::new(tokens)
        .with_dialect(&dialect)
        .with_recursion_limit(recursion_limit)
        .build()
        .and_then(|mut parser| parser.parse_statements());
    if dialect.exhausted() {
        return Err(too_many_steps(dialect.steps(), max));
    }
    let mut statements = parsed.map_err(PolicyError::from_df)?;
    if statements.len() > 1 {
        return Err(PolicyError::from_df(DataFusionError::NotImplemented(
            "The context currently only supports a single SQL statement".into(),
        )));
    }
    statements.pop_front().ok_or_else(|| {
        PolicyError::from_df(DataFusionError::Plan(
            "No SQL statements were provided in the query string".into(),
        ))
    })
}

/// The budget of a statement of very few tokens: a failing parse of this many steps takes
/// well under a millisecond.
pub const MIN_STEPS: usize = 1_000;

fn too_many_steps(steps: usize, max: usize) -> PolicyError {
    PolicyError::Complexity {
        what: "number of parser steps",
        value: steps,
        max,
        key: "max_parse_steps_per_token",
        advice: "the SQL parser had to re-read nested keyword expressions (CAST, EXTRACT, NOT, …) too often, usually because one of them is not closed: check the parentheses",
    }
}

/// DataFusion's `generic` dialect, counting the parser's steps against a budget.
///
/// It is a [`GenericDialect`] to the parser (same [`TypeId`], so every `dialect_of!` check
/// answers as for the generic dialect), and forwards each method the generic dialect overrides;
/// the others keep the trait's defaults, as they do for the generic dialect. When sqlparser is
/// upgraded, compare this list with `sqlparser/src/dialect/generic.rs`; the test
/// `the_budgeted_dialect_parses_as_the_generic_one` parses the test corpus both ways.
#[derive(Debug)]
pub struct Budgeted {
    inner: GenericDialect,
    steps: Cell<usize>,
    max: usize,
}

impl Budgeted {
    pub fn new(max: usize) -> Self {
        Self {
            inner: GenericDialect,
            steps: Cell::new(0),
            max,
        }
    }

    /// The steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps.get()
    }

    fn exhausted(&self) -> bool {
        self.steps.get() > self.max
    }
}

macro_rules! forward {
    ($($method:ident),* $(,)?) => {
        $(fn $method(&self) -> bool {
            self.inner.$method()
        })*
    };
}

impl Dialect for Budgeted {
    fn dialect(&self) -> TypeId {
        TypeId::of::<GenericDialect>()
    }

    /// Called by the parser at the start of every expression term: the step counter.
    fn parse_prefix(&self, parser: &mut Parser) -> Option<Result<Expr, ParserError>> {
        self.steps.set(self.steps.get().saturating_add(1));
        if self.exhausted() {
            // The one error every backtracking point passes on instead of retrying.
            return Some(Err(ParserError::RecursionLimitExceeded));
        }
        self.inner.parse_prefix(parser)
    }

    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        self.inner.is_delimited_identifier_start(ch)
    }

    fn is_identifier_start(&self, ch: char) -> bool {
        self.inner.is_identifier_start(ch)
    }

    fn is_identifier_part(&self, ch: char) -> bool {
        self.inner.is_identifier_part(ch)
    }

    forward!(
        supports_unicode_string_literal,
        supports_partition_by_after_order_by,
        supports_array_join_syntax,
        supports_group_by_expr,
        supports_group_by_with_modifier,
        supports_left_associative_joins_without_parens,
        supports_connect_by,
        supports_match_recognize,
        supports_pipe_operator,
        supports_start_transaction_modifier,
        supports_window_function_null_treatment_arg,
        supports_dictionary_syntax,
        supports_window_clause_named_window_reference,
        supports_parenthesized_set_variables,
        supports_select_wildcard_except,
        support_map_literal_syntax,
        allow_extract_custom,
        allow_extract_single_quotes,
        supports_extract_comma_syntax,
        supports_create_view_comment_syntax,
        supports_parens_around_table_factor,
        supports_values_as_table_factor,
        supports_create_index_with_clause,
        supports_explain_with_utility_options,
        supports_limit_comma,
        supports_update_order_by,
        supports_from_first_select,
        supports_projection_trailing_commas,
        supports_asc_desc_in_column_definition,
        supports_try_convert,
        supports_bitwise_shift_operators,
        supports_comment_on,
        supports_load_extension,
        supports_named_fn_args_with_assignment_operator,
        supports_struct_literal,
        supports_empty_projections,
        supports_nested_comments,
        supports_multiline_comment_hints,
        supports_user_host_grantee,
        supports_string_escape_constant,
        supports_array_typedef_with_brackets,
        supports_match_against,
        supports_set_names,
        supports_comma_separated_set_assignments,
        supports_filter_during_aggregation,
        supports_select_wildcard_exclude,
        supports_data_type_signed_suffix,
        supports_interval_options,
        supports_quote_delimited_string,
        supports_select_wildcard_replace,
        supports_select_wildcard_ilike,
        supports_select_wildcard_rename,
        supports_optimize_table,
        supports_install,
        supports_detach,
        supports_prewhere,
        supports_with_fill,
        supports_limit_by,
        supports_interpolate,
        supports_settings,
        supports_select_format,
        supports_comment_optimizer_hint,
        supports_constraint_keyword_without_name,
        supports_key_column_option,
        supports_comma_separated_trim,
        supports_cte_without_as,
        supports_select_item_multi_column_alias,
        supports_xml_expressions,
    );
}
