//! The SQL renderer: an `arbitrary`-derived, grammar-aware description of a researcher's
//! statement over the demo tables, rendered to SQL text.
//!
//! The structure is shallow by construction (every recursive position goes through [`Sub`],
//! which stops descending at [`MAX_NESTING`], so generating, rendering and dropping it never
//! recurse deeply), and deep statements come from repetition counts instead ([`Deep`],
//! [`DeepQuery`]): `n` parentheses, `n` chained operators, `n` nested subqueries, up to a few
//! thousand, so every complexity limit of the gateway is reached and passed. Rendering stops
//! adding text past [`MAX_SQL`] bytes (a little over the gateway's default
//! `limits.max_sql_bytes`, so the length refusal is reached too); a clause rendered whole and
//! then inserted can take the text past it once more, to at most about twice the cap.
//!
//! Column references pick from the relations in scope (tables, aliases, derived tables and CTEs
//! with the columns they output), so most statements plan and reach the policy checks rather
//! than stopping at "column not found".

use arbitrary::{Arbitrary, Unstructured};

mod ast;
mod deep;
mod expr;
mod from;
mod names;
mod render;
mod select;
mod terms;
#[cfg(test)]
mod tests;

pub use ast::*;
use render::Renderer;

/// The rendered SQL is cut off past this many bytes (the default limit is 1 MiB).
pub const MAX_SQL: usize = (1 << 20) + 4096;
/// Deepest nesting of the generated structure itself; deeper statements come from repetition.
pub const MAX_NESTING: u32 = 24;
/// Largest repetition count ("a few thousand").
pub const MAX_REPEAT: usize = 5000;

/// The demo schema: each table and its columns (the registry's demo datasets).
pub const TABLES: &[(&str, &[&str])] = &sde_gateway::registry::seed::DEMO_DATASETS;

/// Resets the nesting counter (after a panic in a previous input, say).
pub fn reset() {
    ast::NESTING.with(|n| n.set(0));
}

/// Renders the fuzz input's bytes: a first byte 0 takes the rest as raw SQL (so plain SQL seeds
/// can be given to the structured target); anything else is the structured grammar.
pub fn render_bytes(data: &[u8]) -> String {
    reset();
    if let Some((0, rest)) = data.split_first() {
        return String::from_utf8_lossy(rest).into_owned();
    }
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => render(&input),
        Err(_) => String::from_utf8_lossy(data).into_owned(),
    }
}

/// Renders one input to SQL.
pub fn render(input: &Input) -> String {
    let mut r = Renderer::default();
    match input {
        Input::Query(q) => {
            r.query(q);
        }
        Input::Aggregate(a) => {
            r.aggregate(a, None);
        }
        Input::Deep(d) => r.deep_query(d),
        Input::Statement(kind, q) => r.statement(*kind, q),
        Input::Spliced(a, raw) => {
            r.aggregate(a, Some(raw));
        }
        Input::Several(a, b) => {
            r.query(a);
            r.push("; ");
            r.query(b);
        }
        Input::Raw(s) => r.push(s),
    }
    r.out
}
