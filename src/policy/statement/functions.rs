//! The function allowlist: the only scalar functions a researcher's SQL may call.
//!
//! Aggregate and window functions are not judged here: the structural checks in
//! [`crate::policy`] hold their own, shorter list (COUNT, COUNT(DISTINCT), SUM, AVG; no window
//! functions) and explain each refusal. Table functions are never allowed.
//!
//! Left out, with the reason (docs/disclosure.md repeats this list):
//! - **collections and generators** (`make_array`, every `array_*`/`list_*`, `string_to_array`,
//!   `regexp_match`, `range`, `generate_series`, `unnest`, `map*`, `struct`, `named_struct`,
//!   `get_field`, `flatten`): a collection carries row-level values past the aggregate-only
//!   rule, and its size grows with its arguments;
//! - **non-deterministic** (`random`, `uuid`): the same query on the same data must give the same
//!   answer, so an auditor can replay it and a researcher cannot average noise away;
//! - **anything not named below**: unknown functions are refused, not guessed at.
//!
//! Functions whose output grows with an argument (`repeat`, `lpad`, `rpad`, `replace`,
//! `regexp_replace`, `concat`, `concat_ws`, `overlay` and the `||` operator) are allowed, capped by
//! `limits.max_value_bytes` at execution ([`crate::engine::capped`]).

use datafusion::execution::SessionState;

use crate::policy::PolicyError;

/// Scalar functions a query may call, by their DataFusion names and aliases.
pub const SCALAR: &[&str] = &[
    // conditional and types
    "coalesce",
    "nullif",
    "nvl",
    "nvl2",
    "greatest",
    "least",
    "arrow_cast",
    "arrow_typeof",
    // numbers
    "abs",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "cbrt",
    "ceil",
    "cos",
    "cosh",
    "cot",
    "degrees",
    "exp",
    "factorial",
    "floor",
    "gcd",
    "isnan",
    "iszero",
    "lcm",
    "ln",
    "log",
    "log10",
    "log2",
    "nanvl",
    "pi",
    "power",
    "pow",
    "radians",
    "round",
    "signum",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
    // text
    "ascii",
    "bit_length",
    "btrim",
    "char_length",
    "character_length",
    "chr",
    "concat",
    "concat_ws",
    "contains",
    "ends_with",
    "find_in_set",
    "initcap",
    "instr",
    "left",
    "length",
    "levenshtein",
    "lower",
    "lpad",
    "ltrim",
    "octet_length",
    "overlay",
    "position",
    "repeat",
    "replace",
    "reverse",
    "right",
    "rpad",
    "rtrim",
    "split_part",
    "starts_with",
    "strpos",
    "substr",
    "substr_index",
    "substring",
    "substring_index",
    "to_hex",
    "translate",
    "trim",
    "upper",
    // regular expressions (Rust's regex: linear time, no backtracking)
    "regexp_like",
    "regexp_replace",
    "regexp_count",
    "regexp_instr",
    // dates and times
    "current_date",
    "current_time",
    "now",
    "today",
    "date_bin",
    "date_part",
    "datepart",
    "date_trunc",
    "datetrunc",
    "from_unixtime",
    "make_date",
    "to_char",
    "date_format",
    "to_date",
    "to_local_time",
    "to_timestamp",
    "to_timestamp_seconds",
    "to_timestamp_millis",
    "to_timestamp_micros",
    "to_timestamp_nanos",
    "to_unixtime",
];

/// Why a well-known function is left out, for its refusal.
fn excluded_because(name: &str) -> &'static str {
    match name {
        "range" | "generate_series" | "unnest" => {
            "it generates rows or collections whose size grows with its arguments"
        }
        "random" | "uuid" => "its answer changes from run to run, so results could not be replayed or compared",
        n if n.starts_with("array") || n.starts_with("list") || n.starts_with("map") || n.contains("struct") => {
            "collections carry row-level values and grow with their arguments"
        }
        "make_array" | "string_to_array" | "regexp_match" | "get_field" | "flatten" | "cardinality" => {
            "collections carry row-level values and grow with their arguments"
        }
        _ => "only functions on the allowlist can be called",
    }
}

/// Whether a scalar call by `name` is allowed; aggregate and window functions pass to the
/// structural checks.
pub fn scalar_allowed(state: &SessionState, name: &str) -> Result<(), PolicyError> {
    let lower = name.to_lowercase();
    if SCALAR.contains(&lower.as_str())
        || state.aggregate_functions().contains_key(&lower)
        || state.window_functions().contains_key(&lower)
    {
        return Ok(());
    }
    Err(PolicyError::FunctionNotAllowed {
        function: lower.clone(),
        reason: excluded_because(&lower),
    })
}

/// The refusal of a table function (`FROM range(…)`, `FROM unnest(…)`).
pub fn table_function(source: &str) -> PolicyError {
    let name: String = source
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect::<String>()
        .to_lowercase();
    PolicyError::FunctionNotAllowed {
        function: name,
        reason: "table functions are not allowed: a query reads granted tables only",
    }
}

/// The refusal of an array, map or struct literal, or a lambda.
pub fn collection() -> PolicyError {
    PolicyError::FunctionNotAllowed {
        function: "array, map or struct literal".into(),
        reason: "collections carry row-level values and grow with their arguments",
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    #[test]
    fn every_allowed_function_exists_in_the_engine() {
        let state = SessionContext::new().state();
        let missing: Vec<_> = SCALAR
            .iter()
            .filter(|f| !state.scalar_functions().contains_key(**f))
            .collect();
        assert!(missing.is_empty(), "not registered: {missing:?}");
    }

    #[test]
    fn the_documented_list_is_the_allowlist() {
        let doc = include_str!("../../../docs/disclosure.md");
        for f in SCALAR {
            assert!(doc.contains(&format!("`{f}`")), "docs/disclosure.md does not list {f}");
        }
    }

    #[test]
    fn aggregates_pass_to_the_structural_checks_and_others_are_refused() {
        let state = SessionContext::new().state();
        assert!(scalar_allowed(&state, "SUM").is_ok());
        assert!(
            scalar_allowed(&state, "max").is_ok(),
            "refused later, with its own reason"
        );
        for f in [
            "random",
            "range",
            "array_repeat",
            "string_to_array",
            "unnest",
            "no_such_function",
        ] {
            let e = scalar_allowed(&state, f).unwrap_err().to_string();
            assert!(e.starts_with("safe-settings/functions:"), "{e}");
        }
    }
}
