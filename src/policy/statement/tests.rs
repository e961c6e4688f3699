use datafusion::prelude::SessionContext;

use super::*;

fn admit_on(sql: &str, limits: &StatementLimits) -> Result<(), String> {
    let state = SessionContext::new().state();
    admit(&state, sql, limits).map(drop).map_err(|e| e.to_string())
}

/// [`admit_on`] on a thread with a small stack (256 KiB): it must not overflow it.
fn admit_on_small_stack(sql: String, limits: StatementLimits) -> Result<(), String> {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || admit_on(&sql, &limits))
        .unwrap()
        .join()
        .expect("no overflow")
}

fn refused(sql: &str, rule: &str, key: &str) {
    let err = admit_on(sql, &StatementLimits::default()).expect_err(sql.get(..80).unwrap_or(sql));
    assert!(err.starts_with(rule), "{err}");
    assert!(err.contains(key), "{err}");
}

fn chain(op: &str, n: usize) -> String {
    let terms: Vec<String> = (0..n).map(|i| format!("age <> {i}")).collect();
    format!("SELECT COUNT(*) FROM patients WHERE {}", terms.join(op))
}

#[test]
fn chains_past_the_depth_limit_are_refused_naming_the_key() {
    let l = StatementLimits::default();
    // Ten times the limit, of every kind of chain.
    refused(
        &chain(" AND ", 10 * l.max_expression_depth),
        "safe-settings/complexity",
        "limits.max_expression_depth",
    );
    refused(
        &chain(" OR ", 10 * l.max_expression_depth),
        "safe-settings/complexity",
        "limits.max_expression_depth",
    );
    for op in ["||", "+", "*", "-", "/", "%", "=", "<", "AND", "OR"] {
        let terms = vec!["'a'"; 10 * l.max_expression_depth].join(&format!(" {op} "));
        refused(
            &format!("SELECT COUNT(*) FROM t WHERE {terms} IS NULL"),
            "safe-settings/complexity",
            "max_expression_depth",
        );
    }
    let nested = format!(
        "{}age{}",
        "abs(".repeat(10 * l.max_expression_depth),
        ")".repeat(10 * l.max_expression_depth)
    );
    assert!(admit_on(&format!("SELECT SUM({nested}) FROM t"), &l).is_err());
}

#[test]
fn a_statement_at_the_limits_is_admitted() {
    let l = StatementLimits::default();
    // A chain one short of the depth limit (the WHERE's own expression is one level).
    assert!(admit_on(&chain(" AND ", l.max_expression_depth / 2), &l).is_ok());
    let branches: Vec<String> = (0..l.max_case_branches)
        .map(|i| format!("WHEN age = {i} THEN {i}"))
        .collect();
    let sql = format!("SELECT SUM(CASE {} END) FROM patients", branches.join(" "));
    assert!(admit_on(&sql, &l).is_ok());
}

#[test]
fn the_longest_deepest_statement_is_walked_and_dropped_on_its_own_stack() {
    // A chain as deep as max_sql_bytes of SQL can make: refused, and neither the parse, the walk
    // nor dropping the tree overflows the calling thread's stack, which here is small.
    let limits = StatementLimits::default();
    let body = "1+".repeat((limits.max_sql_bytes - 64) / 2);
    let sql = format!("SELECT SUM({body}1) FROM t");
    assert!(sql.len() <= limits.max_sql_bytes);
    let err = admit_on_small_stack(sql, limits).unwrap_err();
    assert!(err.contains("limits.max_expression_depth"), "{err}");
}

#[test]
fn copy_and_explain_around_the_deepest_query_are_refused_before_planning() {
    // DataFusion's own statements wrap a query this walk does not see; they are refused by kind
    // here, on the gate's stack, before DataFusion's planner could recurse through the query.
    let limits = StatementLimits::default();
    let body = "1+".repeat((limits.max_sql_bytes - 128) / 2);
    for (sql, kind) in [
        (format!("COPY (SELECT SUM({body}1) FROM t) TO '/tmp/x.csv'"), "COPY"),
        (
            format!("EXPLAIN COPY (SELECT SUM({body}1) FROM t) TO '/tmp/x.csv'"),
            "EXPLAIN",
        ),
    ] {
        assert!(sql.len() <= limits.max_sql_bytes);
        let err = admit_on_small_stack(sql, limits).unwrap_err();
        assert!(err.starts_with("safe-outputs/single-query"), "{err}");
        assert!(err.ends_with(kind), "{err}");
    }
    let err = admit_on("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'", &limits).unwrap_err();
    assert!(err.starts_with("safe-outputs/single-query"), "{err}");
}

#[test]
fn flat_code_lists_stay_cheap() {
    let codes: Vec<String> = (0..10_000).map(|i| format!("'{:09}'", 100_000_000 + i)).collect();
    let sql = format!(
        "SELECT COUNT(*) FROM gp_events WHERE snomed_code IN ({})",
        codes.join(", ")
    );
    assert!(sql.len() > 64 * 1024);
    assert!(admit_on(&sql, &StatementLimits::default()).is_ok());
    let tight = StatementLimits {
        max_in_list_items: 1000,
        ..Default::default()
    };
    assert!(admit_on(&sql, &tight).unwrap_err().contains("limits.max_in_list_items"));
}

#[test]
fn each_complexity_limit_is_enforced() {
    let l = StatementLimits::default();
    let branches: Vec<String> = (0..10 * l.max_case_branches)
        .map(|i| format!("WHEN age = {i} THEN {i}"))
        .collect();
    refused(
        &format!("SELECT SUM(CASE {} END) FROM patients", branches.join(" ")),
        "safe-settings/complexity",
        "limits.max_case_branches",
    );
    let joins: String = (0..10 * l.max_joins)
        .map(|i| format!(" JOIN patients p{i} USING (person_id)"))
        .collect();
    refused(
        &format!("SELECT COUNT(*) FROM patients{joins}"),
        "safe-settings/complexity",
        "limits.max_joins",
    );
    let commas: Vec<String> = (0..=l.max_joins + 1).map(|i| format!("patients p{i}")).collect();
    refused(
        &format!("SELECT COUNT(*) FROM {}", commas.join(", ")),
        "safe-settings/complexity",
        "limits.max_joins",
    );
    let mut sub = "SELECT COUNT(*) FROM patients".to_owned();
    for _ in 0..=l.max_subquery_depth {
        sub = format!("SELECT COUNT(*) FROM ({sub}) s");
    }
    refused(&sub, "safe-settings/complexity", "limits.max_subquery_depth");
    refused(
        &cte_chain(l.max_ctes + 1),
        "safe-settings/complexity",
        "limits.max_ctes",
    );
    let union = vec!["SELECT person_id FROM patients"; l.max_set_operations + 2].join(" UNION ALL ");
    refused(
        &format!("SELECT COUNT(DISTINCT person_id) FROM ({union}) u"),
        "safe-settings/complexity",
        "limits.max_set_operations",
    );
    let terms: Vec<String> = (0..l.max_expression_nodes).map(|i| format!("abs(age) = {i}")).collect();
    refused(
        &format!("SELECT {} FROM patients", terms.join(", ")),
        "safe-settings/complexity",
        "limits.max_expression_nodes",
    );
    let long = "x".repeat(l.max_value_bytes + 1);
    refused(
        &format!("SELECT COUNT(*) FROM patients WHERE district = '{long}'"),
        "safe-settings/complexity",
        "limits.max_value_bytes",
    );
    refused(
        &format!("SELECT {} FROM t", "1".repeat(l.max_sql_bytes)),
        "safe-outputs/query-too-long",
        "limit",
    );
}

#[test]
fn only_allowlisted_functions_and_no_table_functions() {
    for sql in [
        "SELECT COUNT(*) FROM range(1000000000)",
        "SELECT COUNT(*) FROM generate_series(1, 1000000000)",
        "SELECT COUNT(*) FROM unnest([1, 2, 3])",
        "SELECT SUM(cardinality(array_repeat(age, 1000000000))) FROM patients",
        "SELECT SUM(cardinality(string_to_array(district, ''))) FROM patients",
        "SELECT COUNT(*) FROM patients WHERE random() < 0.5",
        "SELECT SUM(age) FROM patients WHERE [1, 2] IS NOT NULL",
        "SELECT COUNT(*) FROM patients WHERE no_such_function(age) = 1",
    ] {
        let err = admit_on(sql, &StatementLimits::default()).unwrap_err();
        assert!(err.starts_with("safe-settings/functions:"), "{sql}: {err}");
    }
    for sql in [
        "SELECT district, SUM(length(repeat(district, 3))) FROM patients GROUP BY 1",
        "SELECT date_trunc('month', event_date), COUNT(*) FROM gp_events GROUP BY 1",
        "SELECT COUNT(*) FROM patients WHERE lower(district) LIKE 'b%' AND coalesce(age, 0) > 40",
    ] {
        assert!(admit_on(sql, &StatementLimits::default()).is_ok(), "{sql}");
    }
}

#[test]
fn nul_bytes_and_odd_unicode_in_literals_are_just_text() {
    for lit in [
        "\u{0}",
        "\u{202e}evil",
        "\u{1F600}\u{FE0F}",
        "a\u{0301}",
        "\u{FFFF}",
        "'' ''",
    ] {
        let escaped = lit.replace('\'', "''");
        let sql = format!("SELECT COUNT(*) FROM patients WHERE district = '{escaped}'");
        assert!(admit_on(&sql, &StatementLimits::default()).is_ok(), "{sql:?}");
    }
}

#[test]
fn every_limit_is_documented_for_operators() {
    let doc = include_str!("../../../docs/operator.md");
    let example = include_str!("../../../config/gateway.example.toml");
    for key in [
        "max_sql_bytes",
        "max_parse_steps_per_token",
        "max_expression_depth",
        "max_expression_nodes",
        "max_in_list_items",
        "max_case_branches",
        "max_joins",
        "max_subquery_depth",
        "max_set_operations",
        "max_plan_depth",
        "max_ctes",
        "max_value_bytes",
    ] {
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/operator.md does not document {key}"
        );
        assert!(
            example.contains(&format!("\n{key} = ")),
            "the example config does not set {key}"
        );
    }
}

#[test]
fn the_longest_chain_of_set_operations_accepted_plans_on_a_small_stack() {
    // DataFusion's SQL planner walks a chain of set operations recursively, and so do the
    // optimizer and physical planner after it; the cap on the key keeps that walk short. Two
    // MiB is tokio's default worker stack, an eighth of the gateway's.
    let limits = StatementLimits {
        max_set_operations: crate::config::MAX_SET_OPERATIONS,
        ..StatementLimits::default()
    };
    let chain = vec!["SELECT 1 AS x"; crate::config::MAX_SET_OPERATIONS + 1].join(" UNION ALL ");
    let sql = format!("SELECT COUNT(*) FROM ({chain}) u");
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let ctx = SessionContext::new();
                let plan = crate::policy::plan_sql(&ctx, &sql, &limits).await.expect("admitted");
                let state = ctx.state();
                let optimised = state.optimize(&plan).expect("optimised");
                state.create_physical_plan(&optimised).await.expect("planned");
            });
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
}

fn cte_chain(n: usize) -> String {
    let ctes: Vec<String> = (1..n)
        .map(|i| format!("c{i} AS (SELECT x + 1 AS x FROM c{})", i - 1))
        .collect();
    format!(
        "WITH c0 AS (SELECT 1 AS x), {} SELECT COUNT(*) FROM c{}",
        ctes.join(", "),
        n - 1
    )
}

/// The default limits, but as many CTEs as the plan depth allows.
fn deep_limits() -> StatementLimits {
    StatementLimits {
        max_ctes: usize::MAX,
        ..StatementLimits::default()
    }
}

async fn plan_on(sql: &str) -> Result<LogicalPlan, String> {
    crate::policy::plan_sql(&SessionContext::new(), sql, &deep_limits())
        .await
        .map_err(|e| e.to_string())
}

#[test]
fn a_plan_past_the_depth_limit_is_refused_and_one_at_it_is_walked_on_a_small_stack() {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let l = deep_limits();
                let err = plan_on(&cte_chain(2 * l.max_plan_depth)).await.unwrap_err();
                assert!(err.starts_with("safe-settings/complexity"), "{err}");
                assert!(err.contains("limits.max_plan_depth"), "{err}");
                // The longest chain admitted, through the policy's own walks and DataFusion's
                // optimizer and physical planner.
                let mut n = l.max_plan_depth / 2 + 2; // about two levels a CTE
                while plan_on(&cte_chain(n)).await.is_err() {
                    n -= 1;
                }
                assert!(n >= l.max_plan_depth / 4, "only {n} CTEs admitted");
                let ctx = SessionContext::new();
                let sql = cte_chain(n);
                let plan = crate::policy::plan_sql(&ctx, &sql, &l).await.unwrap();
                let state = ctx.state();
                let optimised = state.optimize(&plan).expect("optimised");
                state.create_physical_plan(&optimised).await.expect("planned");
                let _ = crate::policy::plan_and_check(&ctx, &sql, crate::disclosure::Rules::DEFAULT, &l).await;
            });
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
}

/// Statements of every kind the parser has a special path for, each parsed with the budgeted
/// dialect and with DataFusion's own.
const PARSER_CORPUS: &[&str] = &[
    "SELECT district, COUNT(*) FROM patients GROUP BY district",
    "SELECT CAST(age AS INT), TRY_CAST(age AS BIGINT), age::DOUBLE FROM patients",
    "SELECT EXTRACT(YEAR FROM referral_date), date_part('month', referral_date) FROM ewb",
    "SELECT SUBSTRING(district FROM 1 FOR 3), SUBSTRING(district, 1, 3) FROM patients",
    "SELECT TRIM(BOTH 'x' FROM district), TRIM(district), POSITION('a' IN district) FROM patients",
    "SELECT CEIL(age TO DAY), FLOOR(age), OVERLAY(district PLACING 'x' FROM 1 FOR 2) FROM patients",
    "SELECT INTERVAL '1 day', INTERVAL '2' MONTH, DATE '2024-01-01', TIMESTAMP '2024-01-01 00:00:00'",
    "SELECT CASE WHEN age < 18 THEN 'child' WHEN age < 65 THEN 'adult' ELSE 'older' END FROM patients",
    "SELECT CASE sex WHEN 'F' THEN 1 ELSE 0 END FROM patients",
    "SELECT COUNT(*) FROM patients WHERE NOT age IN (1, 2, 3) AND district NOT LIKE 'A%'",
    "SELECT COUNT(*) FROM patients WHERE age BETWEEN 18 AND 65 AND district IS NOT NULL",
    "SELECT COUNT(*) FROM patients p WHERE EXISTS (SELECT 1 FROM asc_services a WHERE a.person_id = p.person_id)",
    "SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM ewb)",
    "SELECT (SELECT COUNT(*) FROM ewb), COUNT(*) FROM patients",
    "WITH a AS (SELECT * FROM patients), b AS (SELECT * FROM a) SELECT COUNT(*) FROM b",
    "SELECT district, SUM(age) OVER (PARTITION BY sex ORDER BY age ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM patients",
    "SELECT lag(age, 1) OVER w, nth_value(age, 2) OVER w FROM patients WINDOW w AS (ORDER BY age)",
    "SELECT COUNT(*) FILTER (WHERE age > 3), COUNT(DISTINCT district) FROM patients",
    "SELECT district FROM patients GROUP BY ROLLUP (district, sex)",
    "SELECT a.x FROM (SELECT 1 AS x UNION ALL SELECT 2 EXCEPT SELECT 3) a ORDER BY 1 DESC NULLS LAST LIMIT 10 OFFSET 2",
    "SELECT p.district FROM patients p LEFT JOIN ewb e ON e.person_id = p.person_id AND e.referral_date > DATE '2020-01-01'",
    "SELECT \"district\", `sex` FROM patients",
    "SELECT 'it''s', E'a\\nb', X'ff', 1e10, -1.5, +2, 0x1F FROM patients",
    "SELECT COALESCE(NULL, 1), NULLIF(age, 0), GREATEST(1, 2), IF(age > 1, 1, 0) FROM patients",
    "SELECT approx_percentile_cont(age, 0.5), percentile_cont(0.5) WITHIN GROUP (ORDER BY age) FROM patients",
    "SELECT ARRAY[1, 2], [1, 2], STRUCT(1 AS a), MAP {'a': 1}, x -> x + 1",
    "SELECT COUNT(*) FROM patients WHERE district ILIKE '%a%' OR district SIMILAR TO 'a' OR district ~ 'a'",
    "SELECT age IS DISTINCT FROM 1, age <=> 1, age << 1, age # 1 FROM patients",
    "SELECT * EXCLUDE (age) FROM patients",
    "EXPLAIN SELECT 1",
    "SELECT 1; SELECT 2",
    "",
    "SELECT CAST(age AS) FROM patients",
    "SELECT CAST(CAST(CAST(age AS INT AS INT) AS INT) FROM patients",
    "SELECT interval FROM t",
    "SELECT MAX(interval), cast FROM t",
    "SELECT 1 FROM t WHERE",
    "SELECT 'unterminated",
];

#[test]
fn the_budgeted_dialect_parses_as_the_generic_one() {
    let state = SessionContext::new().state();
    let limits = StatementLimits::default();
    for sql in PARSER_CORPUS {
        let ours = parse::parse(&state, sql, &limits).map_err(|e| e.to_string());
        let theirs = state
            .sql_to_statement(sql, &state.config().options().sql_parser.dialect)
            .map_err(|e| PolicyError::from_df(e).to_string());
        assert_eq!(format!("{ours:?}"), format!("{theirs:?}"), "{sql}");
    }
}

#[test]
fn a_statement_that_parses_without_backtracking_stays_far_below_the_parse_budget() {
    use datafusion::sql::parser::DFParserBuilder;
    // Steps per token of the corpus, and of a 10 000-code list: the budget's headroom.
    let long_list = format!(
        "SELECT COUNT(*) FROM gp_events WHERE code IN ({})",
        (0..10_000).map(|i| format!("'C{i:05}'")).collect::<Vec<_>>().join(", ")
    );
    let mut worst = 0.0_f64;
    for sql in PARSER_CORPUS.iter().copied().chain([long_list.as_str()]) {
        let dialect = parse::Budgeted::new(usize::MAX);
        let Ok(mut parser) = DFParserBuilder::new(sql).with_dialect(&dialect).build() else {
            continue;
        };
        let tokens = datafusion::sql::sqlparser::tokenizer::Tokenizer::new(&dialect, sql)
            .tokenize()
            .unwrap()
            .into_iter()
            .filter(|t| !matches!(t, datafusion::sql::sqlparser::tokenizer::Token::Whitespace(_)))
            .count();
        if parser.parse_statements().is_ok() {
            worst = worst.max(dialect.steps() as f64 / tokens as f64);
        }
    }
    let budget = StatementLimits::default().max_parse_steps_per_token as f64;
    assert!(worst * 2.0 <= budget, "{worst:.2} steps a token, budget {budget}");
}

#[test]
fn nested_failing_keyword_expressions_are_refused_within_the_parse_budget() {
    // Each of these makes the parser re-read the inside once per level for every level: without
    // the budget 40 levels take it longer than anyone waits, and 6 540 (the fuzzer's find) more.
    let l = StatementLimits::default();
    for (open, depth) in [
        ("CAST(", 40),
        ("CAST(", 6_540),
        ("lag(CAST(", 40),
        ("nth_value(lag(CAST(", 40),
        ("TRY_CAST(", 40),
        ("EXTRACT(YEAR FROM ", 40),
        ("SUBSTRING(", 40),
        ("TRIM(", 40),
        ("POSITION(", 40),
        ("CEIL(", 40),
        ("FLOOR(", 40),
        ("OVERLAY(", 40),
        ("NOT (", 40),
        ("CASE WHEN ", 40),
        ("EXISTS (SELECT ", 40),
        ("INTERVAL (", 40),
    ] {
        let sql = format!("SELECT {}age FROM patients", open.repeat(depth));
        let err = admit_on(&sql, &l).expect_err(open);
        assert!(
            err.starts_with("safe-settings/complexity") && err.contains("limits.max_parse_steps_per_token")
                || err.starts_with("safe-outputs/invalid-query"),
            "{open} x {depth}: {err}"
        );
    }
    // The fuzzer's statement shape is refused by the budget, not by a parse error.
    let sql = format!("SELECT {}age FROM patients", "CAST(".repeat(40));
    let err = admit_on(&sql, &l).unwrap_err();
    assert!(err.contains("limits.max_parse_steps_per_token"), "{err}");
}
