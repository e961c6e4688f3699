//! The hostile corpus: queries meant to take the gateway down (deep chains of every operator,
//! huge CASEs, nested calls, size-amplifying functions in filters and aggregates, huge IN lists,
//! overflowing sums, NUL bytes and odd Unicode), each with what the gateway must do. Shared by
//! the integration tests (`hostile.rs`) and the soak tool (`benches/soak.rs`).

#![allow(dead_code)]

/// What the gateway must do with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Refused with this rule.
    Refused(&'static str),
    /// Answered (possibly with cells withheld).
    Answered,
    /// Answered or refused with a `safe-…` rule; never an internal error or a crash.
    Either,
}

fn chain(op: &str, n: usize, term: impl Fn(usize) -> String) -> String {
    (0..n).map(term).collect::<Vec<_>>().join(op)
}

/// Every hostile query, named, with its expected outcome; those that test a limit go ten times
/// past its default.
pub fn hostile() -> Vec<(String, String, Expect)> {
    use Expect::*;
    let complexity = Refused("safe-settings/complexity");
    let functions = Refused("safe-settings/functions");
    let mut out: Vec<(String, String, Expect)> = Vec::new();
    let mut add = |name: &str, sql: String, expect: Expect| out.push((name.to_owned(), sql, expect));
    // Ten times the default limits, of each kind.
    add(
        "1000 AND conjuncts",
        format!(
            "SELECT COUNT(*) FROM patients WHERE {}",
            chain(" AND ", 1000, |i| format!("age <> {i}"))
        ),
        complexity,
    );
    add(
        "2000 OR terms",
        format!(
            "SELECT COUNT(*) FROM patients WHERE {}",
            chain(" OR ", 2000, |i| format!("age = {i}"))
        ),
        complexity,
    );
    add(
        "2000-term || chain",
        format!(
            "SELECT COUNT(*) FROM patients WHERE district = {}",
            chain(" || ", 2000, |_| "'a'".into())
        ),
        complexity,
    );
    for op in [
        "+", "-", "*", "/", "%", "<", "=", "<>", "AND", "OR", "||", "&", "|", "<<", ">>",
    ] {
        add(
            &format!("1000-deep chain of {op}"),
            format!(
                "SELECT COUNT(*) FROM patients WHERE ({}) IS NULL",
                chain(&format!(" {op} "), 1000, |_| "age".into())
            ),
            complexity,
        );
    }
    add(
        "CASE with 5000 branches in SUM",
        format!(
            "SELECT SUM(CASE {} END) FROM patients",
            chain(" ", 5000, |i| format!("WHEN age = {i} THEN {i}"))
        ),
        complexity,
    );
    add(
        "CASE with 1000 branches in SUM",
        format!(
            "SELECT SUM(CASE {} END) FROM patients",
            chain(" ", 1000, |i| format!("WHEN age = {i} THEN {i}"))
        ),
        complexity,
    );
    add(
        "nested function calls 1000 deep",
        format!(
            "SELECT SUM({}age{}) FROM patients",
            "abs(".repeat(1000),
            ")".repeat(1000)
        ),
        Either,
    );
    add(
        "parentheses 1000 deep",
        format!(
            "SELECT COUNT(*) FROM patients WHERE {}age > 1{}",
            "(".repeat(1000),
            ")".repeat(1000)
        ),
        Either,
    );
    add(
        "160 joins",
        format!(
            "SELECT COUNT(*) FROM patients p{}",
            (0..160)
                .map(|i| format!(" JOIN asc_services a{i} ON a{i}.person_id = p.person_id"))
                .collect::<String>()
        ),
        complexity,
    );
    add(
        "subqueries 80 deep",
        (0..80).fold("SELECT COUNT(*) AS n FROM patients".to_owned(), |q, _| {
            format!("SELECT SUM(n) AS n FROM ({q}) s")
        }),
        Either,
    );
    add(
        "5000 UNION ALLs",
        format!(
            "SELECT COUNT(DISTINCT person_id) AS n FROM ({}) u",
            chain(" UNION ALL ", 5000, |i| [
                "SELECT person_id FROM patients",
                "SELECT person_id FROM gp_events"
            ][i % 2]
                .to_owned())
        ),
        complexity,
    );
    add(
        "3000 chained CTEs",
        format!(
            "WITH c0 AS (SELECT * FROM patients), {} SELECT district, COUNT(*) AS n FROM c2999 GROUP BY district",
            chain(", ", 2999, |i| format!("c{} AS (SELECT * FROM c{i})", i + 1))
        ),
        complexity,
    );
    add(
        "6540 unclosed CASTs in a window call",
        format!(
            "SELECT nth_value(lag({}age), 1) OVER () FROM patients",
            "CAST(".repeat(6540)
        ),
        complexity,
    );
    add(
        "100000 expression nodes",
        format!(
            "SELECT COUNT(*) FROM patients WHERE coalesce(age, {}) > 0",
            chain(", ", 100_000, |i| i.to_string())
        ),
        complexity,
    );
    // Memory: functions whose output grows with an argument.
    add(
        "repeat 1e8 in SUM(length())",
        "SELECT SUM(length(repeat(district, 100000000))) FROM patients".into(),
        Either,
    );
    add(
        "repeat 1e12 in a filter",
        "SELECT COUNT(*) FROM patients WHERE repeat(district, 1000000000000) = 'x'".into(),
        Either,
    );
    add(
        "lpad 2e9",
        "SELECT SUM(length(lpad(district, 2000000000, 'x'))) FROM patients".into(),
        Either,
    );
    add(
        "rpad 2e9 in GROUP BY",
        "SELECT rpad(district, 2000000000) AS d, COUNT(*) FROM patients GROUP BY 1".into(),
        Either,
    );
    add(
        "replace amplification",
        format!(
            "SELECT SUM(length(replace(district, '', '{}'))) FROM patients",
            "y".repeat(4000)
        ),
        Either,
    );
    add(
        "regexp_replace with $0",
        "SELECT SUM(length(regexp_replace(district, '.', '$0$0$0$0$0$0$0$0', 'g'))) FROM patients".into(),
        Either,
    );
    add(
        "concat of repeats",
        format!(
            "SELECT SUM(length(concat({}))) FROM patients",
            chain(", ", 200, |_| "repeat(district, 1000)".into())
        ),
        Either,
    );
    add(
        "|| of repeats",
        format!(
            "SELECT SUM(length({})) FROM patients",
            chain(" || ", 90, |_| "repeat(district, 1000)".into())
        ),
        Either,
    );
    add(
        "array_repeat",
        "SELECT SUM(cardinality(array_repeat(age, 1000000000))) FROM patients".into(),
        functions,
    );
    add(
        "string_to_array",
        "SELECT SUM(cardinality(string_to_array(district, ''))) FROM patients".into(),
        functions,
    );
    add(
        "range table",
        "SELECT COUNT(*) FROM range(10000000000)".into(),
        functions,
    );
    add(
        "generate_series table",
        "SELECT COUNT(*) FROM generate_series(1, 10000000000)".into(),
        functions,
    );
    add(
        "generate_series scalar",
        "SELECT SUM(cardinality(generate_series(1, age * 1000000))) FROM patients".into(),
        functions,
    );
    add(
        "unnest",
        "SELECT COUNT(*) FROM unnest(make_array(1, 2, 3))".into(),
        functions,
    );
    add(
        "random",
        "SELECT COUNT(*) FROM patients WHERE random() < 0.5".into(),
        functions,
    );
    // Arithmetic: a value past the range is NULL, as a division by zero (no data-dependent error).
    add(
        "SUM overflow",
        "SELECT SUM(CAST(age AS BIGINT) * 1000000000000000) FROM patients".into(),
        Answered,
    );
    add(
        "SUM of huge constants",
        "SELECT SUM(9223372036854775807) FROM patients".into(),
        Answered,
    );
    add(
        "product overflow",
        "SELECT SUM(age * 9223372036854775807) FROM patients".into(),
        Answered,
    );
    add(
        "division by zero on some rows",
        "SELECT SUM(100 / (age - 40)) AS s, COUNT(*) AS n FROM patients".into(),
        Answered,
    );
    add(
        "a cast that fails on some rows",
        "SELECT COUNT(*) AS n FROM patients WHERE CAST(district AS INT) = 1 OR age > 0".into(),
        Answered,
    );
    // Text.
    add(
        "NUL byte in a literal",
        "SELECT COUNT(*) FROM patients WHERE district = 'a\u{0}b'".into(),
        Answered,
    );
    add(
        "odd Unicode in literals",
        "SELECT COUNT(*) FROM patients WHERE district IN ('\u{202e}x', '\u{1F600}', 'e\u{301}', '\u{FEFF}', '\u{FFFF}')".into(),
        Answered,
    );
    add(
        "10000-code IN list",
        format!(
            "SELECT COUNT(*) FROM patients WHERE district NOT IN ({})",
            chain(", ", 10_000, |i| format!("'{:09}'", 100_000_000 + i))
        ),
        Answered,
    );
    // DataFusion's own statements around a query deeper than any limit admits (found by the
    // fuzzer: COPY's query reached DataFusion's planner unbounded).
    let deep = chain(" OR ", 60_000, |i| format!("age = {i}"));
    add(
        "COPY of a 60000-term OR chain",
        format!("COPY (SELECT COUNT(*) FROM patients WHERE {deep}) TO '/tmp/leak.csv'"),
        Refused("safe-outputs/single-query"),
    );
    add(
        "EXPLAIN of a 400000-deep + chain",
        format!("EXPLAIN SELECT SUM({}age) FROM patients", "1+".repeat(400_000)),
        Refused("safe-outputs/single-query"),
    );
    add(
        "statement past the size cap",
        format!(
            "SELECT COUNT(*) FROM patients WHERE district = '{}'",
            "x".repeat(2 << 20)
        ),
        Refused("safe-outputs/query-too-long"),
    );
    add(
        "literal past max_value_bytes",
        format!(
            "SELECT COUNT(*) FROM patients WHERE district = '{}'",
            "x".repeat(10_000)
        ),
        complexity,
    );
    out
}

/// Ordinary queries a researcher sends, answered in a few milliseconds.
pub fn ordinary() -> Vec<&'static str> {
    vec![
        "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
        "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band",
        "SELECT district, COUNT(DISTINCT person_id) AS people FROM patients GROUP BY district",
        "SELECT service_type, SUM(weekly_cost) AS cost FROM asc_services GROUP BY service_type",
        "SELECT referral_source, COUNT(*) AS n FROM ews_referrals GROUP BY referral_source",
        "SELECT COUNT(*) AS n FROM patients WHERE age >= 65",
    ]
}
