//! Plan checks and rewrites on small in-memory tables.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use super::people::{one_row_per_person, same_person};
use super::*;
use crate::engine::GuardedTable;
use crate::engine::PERSON_ID;
use datafusion::common::Column;

/// The default rules with counts unperturbed, so that expected counts are exact here; the
/// p-table's noise is tested in `disclosure` and through the gateway (`tests/api`).
const RULES: Rules = Rules {
    count_noise_max: 0,
    ..Rules::DEFAULT
};

fn table(schema: Arc<Schema>, columns: Vec<Arc<dyn Array>>) -> Arc<dyn TableProvider> {
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).unwrap();
    Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())
}

/// District A: 12 people; B: 9 people; C: 31 people of whom one (c30) has opted out.
/// Person a0 has 20 visits costing 1000 each; everyone else in A has one visit costing 10.
fn session() -> SessionContext {
    let mut ids = vec![];
    let mut districts = vec![];
    let mut ages = vec![];
    for (d, n) in [("A", 12), ("B", 9), ("C", 31)] {
        for i in 0..n {
            ids.push(format!("{}{i}", d.to_lowercase()));
            districts.push(d.to_owned());
            ages.push(20 + i as i64);
        }
    }
    let patients = table(
        Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("district", DataType::Utf8, false),
            Field::new("age", DataType::Int64, false),
        ])),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(districts)),
            Arc::new(Int64Array::from(ages)),
        ],
    );
    let mut v_ids = vec!["a0".to_owned(); 20];
    let mut costs = vec![1000.0; 20];
    for i in 1..12 {
        v_ids.push(format!("a{i}"));
        costs.push(10.0);
    }
    let visits = table(
        Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("cost", DataType::Float64, false),
            Field::new("clinic_id", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from(v_ids)),
            Arc::new(Float64Array::from(costs)),
            Arc::new(StringArray::from(
                (0..31).map(|i| format!("clinic-{}", i % 3)).collect::<Vec<_>>(),
            )),
        ],
    );
    let opt_outs = table(
        Arc::new(Schema::new(vec![Field::new("person_id", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["c30"]))],
    );
    // The key that seeds the noise of sums and means, as the engine gives every session.
    let key = Arc::new(crate::disclosure::PerturbationKey::from_bytes([42; 32]));
    let ctx = SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_extension(key));
    ctx.register_table(
        "patients",
        // One row per person, as a served copy of the population table is: people are counted
        // as rows where the rows are this table's.
        Arc::new(GuardedTable::new("patients", patients, Arc::clone(&opt_outs)).with_one_row_per_person()),
    )
    .unwrap();
    ctx.register_table(
        "visits",
        Arc::new(GuardedTable::new("visits", visits, Arc::clone(&opt_outs)).with_identifiers(&["clinic_id"])),
    )
    .unwrap();
    ctx.register_table(
        "episodes",
        // At most 3 rows per person, each with a person, as a served copy records.
        Arc::new(GuardedTable::new("episodes", episodes(), Arc::clone(&opt_outs)).with_most_rows_per_person(3)),
    )
    .unwrap();
    ctx.register_table(
        "stays",
        Arc::new(GuardedTable::new("stays", stays(), opt_outs).with_most_rows_per_person(2)),
    )
    .unwrap();
    ctx
}

/// Hospital stays, at most 2 per person, each 1.5 hours:
/// - ward A: 15 people with 2 stays costing 3 each;
/// - ward B: 2 people with 2 stays costing 100 each (they dominate its cost), 16 people with
///   one costing 0.5;
/// - ward C: 12 people with 2 stays costing 3 each, lasting 1 day each except C0's (0 days: one
///   person of the ward is not among those with days).
fn stays() -> Arc<dyn TableProvider> {
    let (mut ids, mut wards, mut costs, mut days) = (vec![], vec![], vec![], vec![]);
    for (ward, people, each, cost) in [
        ("A", 15, 2, 3.0),
        ("B", 2, 2, 100.0),
        ("B", 16, 1, 0.5),
        ("C", 12, 2, 3.0),
    ] {
        for i in 0..people {
            for _ in 0..each {
                ids.push(format!("{ward}{each}-{i}"));
                wards.push(ward);
                costs.push(cost);
                days.push(if ward == "C" && i == 0 { 0.0 } else { 1.0 });
            }
        }
    }
    let hours = vec![1.5; ids.len()];
    table(
        Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("ward", DataType::Utf8, false),
            Field::new("hours", DataType::Float64, false),
            Field::new("cost", DataType::Float64, false),
            Field::new("days", DataType::Float64, false),
        ])),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(wards)),
            Arc::new(Float64Array::from(hours)),
            Arc::new(Float64Array::from(costs)),
            Arc::new(Float64Array::from(days)),
        ],
    )
}

/// Care episodes, at most 3 per person: kind X, 20 people with 2 episodes each (40 rows); kind
/// Y, 8 people with 3 each and one with 1 (25 rows, 9 people).
fn episodes() -> Arc<dyn TableProvider> {
    let mut ids = vec![];
    let mut kinds = vec![];
    for (kind, people, each) in [("X", 20, 2), ("Y", 8, 3), ("Y", 1, 1)] {
        for i in 0..people {
            for _ in 0..each {
                ids.push(format!("{kind}{each}-{i}"));
                kinds.push(kind);
            }
        }
    }
    table(
        Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("kind", DataType::Utf8, false),
        ])),
        vec![Arc::new(StringArray::from(ids)), Arc::new(StringArray::from(kinds))],
    )
}

async fn refusal(sql: &str) -> PolicyError {
    match plan_and_check(&session(), sql, RULES, &Default::default()).await {
        Ok(p) => panic!("{sql} was permitted:\n{}", p.plan().display_indent()),
        Err(e) => e,
    }
}

async fn execute(sql: &str) -> datafusion::error::Result<String> {
    let ctx = session();
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let batches = ctx.execute_logical_plan(permit.plan().clone()).await?.collect().await?;
    Ok(pretty_format_batches(&batches)?.to_string())
}

async fn run(sql: &str) -> String {
    execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `sql` gives what `without` (the same query without a condition of low effect) gives, under
/// the default rules (counts perturbed by their cell keys) with rounding to 1, so the two
/// agree only where they release the same set of people.
async fn as_if_absent(sql: &str, without: &str) {
    let answer = |sql: String| async move {
        let ctx = session();
        let rules = Rules {
            rounding: 1,
            ..Rules::DEFAULT
        };
        let permit = plan_and_check(&ctx, &sql, rules, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let run = async { ctx.execute_logical_plan(permit.plan().clone()).await?.collect().await };
        let batches = run.await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        pretty_format_batches(&batches).unwrap().to_string()
    };
    let (got, want) = (answer(sql.to_owned()).await, answer(without.to_owned()).await);
    let last = got.lines().nth(1).map_or(0, |header| header.matches('|').count() - 2);
    assert!(
        column(&got, last).iter().any(Option::is_some),
        "{sql}: nothing released\n{got}"
    );
    assert_eq!(got, want, "{sql} against {without}");
}

fn assert_table(actual: &str, expected: &[&str]) {
    let actual: Vec<&str> = actual.lines().collect();
    assert_eq!(actual, expected, "\n{}", actual.join("\n"));
}

/// The values of column `c` of a pretty-printed table (NULL as None).
fn column(table: &str, c: usize) -> Vec<Option<f64>> {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1)
        .map(|l| {
            let cell = l.split('|').nth(c + 1).unwrap_or("").trim();
            (!cell.is_empty()).then(|| cell.parse().unwrap_or_else(|e| panic!("{cell}: {e}")))
        })
        .collect()
}

/// Asserts `value` is released, within `spread` of `centre`.
fn near(value: Option<f64>, centre: f64, spread: f64) {
    let v = value.unwrap_or_else(|| panic!("withheld; expected about {centre}"));
    assert!((v - centre).abs() <= spread, "{v} is not within {spread} of {centre}");
}

#[tokio::test]
async fn row_level_output_is_refused_in_every_spelling() {
    for sql in [
        "SELECT age, district FROM patients",
        "WITH t AS (SELECT * FROM patients) SELECT district FROM t",
        "SELECT d FROM (SELECT district AS d FROM patients) x ORDER BY d LIMIT 3",
        "SELECT p.age FROM patients p JOIN visits v ON p.person_id = v.person_id",
        "SELECT age FROM patients UNION ALL SELECT age FROM patients",
    ] {
        let e = refusal(sql).await;
        assert!(
            matches!(e, PolicyError::RowLevel | PolicyError::Unsupported(_)),
            "{sql}: {e}"
        );
    }
}

#[tokio::test]
async fn identifiers_only_in_joins_and_count_distinct() {
    for sql in [
        "SELECT person_id, COUNT(*) FROM visits GROUP BY person_id",
        "SELECT COUNT(*) FROM patients WHERE person_id = 'a0'",
        "SELECT COUNT(*) FROM patients WHERE upper(person_id) LIKE 'A%'",
        "SELECT COUNT(*) FROM (SELECT person_id AS x FROM patients) t WHERE x = 'a0'",
        "SELECT COUNT(*) FROM patients p JOIN visits v ON p.person_id > v.person_id",
        "SELECT SUM(length(person_id)) FROM patients",
        "SELECT COUNT(person_id) FROM patients HAVING COUNT(*) > 1 ORDER BY min(person_id)",
    ] {
        let e = refusal(sql).await;
        assert!(
            matches!(e, PolicyError::Identifier { .. } | PolicyError::Function { .. }),
            "{sql}: {e}"
        );
    }
    // Allowed uses.
    run("SELECT COUNT(DISTINCT person_id) AS people FROM visits").await;
    run("SELECT COUNT(*) FROM patients p JOIN visits v ON p.person_id = v.person_id").await;
    run("SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM visits)").await;
}

#[tokio::test]
async fn single_value_aggregates_collections_and_windows_are_refused() {
    for (sql, name) in [
        ("SELECT MAX(age) FROM patients", "MAX"),
        ("SELECT district, MIN(age) FROM patients GROUP BY district", "MIN"),
        ("SELECT median(age) FROM patients", "MEDIAN"),
        ("SELECT array_agg(district) FROM patients", "ARRAY_AGG"),
        ("SELECT string_agg(district, ',') FROM patients", "STRING_AGG"),
    ] {
        match refusal(sql).await {
            PolicyError::Function { function, .. } => assert_eq!(function, name, "{sql}"),
            e => panic!("{sql}: {e}"),
        }
    }
    assert!(matches!(
        refusal("SELECT age, row_number() OVER (ORDER BY age) FROM patients").await,
        PolicyError::Function { .. }
    ));
    assert!(matches!(
        refusal("SELECT (SELECT age FROM patients LIMIT 1)").await,
        PolicyError::Function { .. }
    ));
}

#[tokio::test]
async fn only_single_read_only_queries() {
    for sql in [
        "CREATE TABLE x AS SELECT 1",
        "DROP TABLE patients",
        "INSERT INTO patients VALUES ('z', 'A', 1)",
        "SET datafusion.execution.batch_size = 1",
        "EXPLAIN SELECT COUNT(*) FROM patients",
        "COPY patients TO '/tmp/x.csv'",
    ] {
        let e = refusal(sql).await;
        assert!(
            matches!(e, PolicyError::NotAQuery(_) | PolicyError::Sql(_)),
            "{sql}: {e}"
        );
    }
    assert!(matches!(refusal("SELECT 1; SELECT 2").await, PolicyError::Sql(_)));
    assert!(matches!(
        refusal("SELECT COUNT(*) FROM opt_outs").await,
        PolicyError::Sql(_)
    ));
}

#[tokio::test]
async fn small_groups_withheld_counts_rounded_opt_outs_excluded() {
    let out = run("SELECT district, COUNT(*) AS n FROM patients GROUP BY district ORDER BY district").await;
    // A has 12 → 10; B has 9 → withheld; C has 31, one opted out → 30.
    assert_table(
        &out,
        &[
            "+----------+----+",
            "| district | n  |",
            "+----------+----+",
            "| A        | 10 |",
            "| C        | 30 |",
            "+----------+----+",
        ],
    );
}

#[tokio::test]
async fn disclosure_applies_before_arithmetic_and_having() {
    // 9 people in B: without GROUP BY the cell is NULL, and so is anything computed from it.
    let out = run("SELECT COUNT(*) * 2 + 1 AS x FROM patients WHERE district = 'B'").await;
    assert_table(&out, &["+---+", "| x |", "+---+", "|   |", "+---+"]);
    // 12 people in A: 12 rounds to 10 before the arithmetic.
    let out = run("SELECT COUNT(*) * 2 + 1 AS x FROM patients WHERE district = 'A'").await;
    assert_table(&out, &["+----+", "| x  |", "+----+", "| 21 |", "+----+"]);
    // HAVING sees rounded values and cannot resurrect a withheld group.
    let out =
        run("SELECT district, COUNT(*) AS n FROM patients GROUP BY district HAVING COUNT(*) < 11 ORDER BY 1").await;
    assert_table(
        &out,
        &[
            "+----------+----+",
            "| district | n  |",
            "+----------+----+",
            "| A        | 10 |",
            "+----------+----+",
        ],
    );
}

#[tokio::test]
async fn rows_are_not_people() {
    // 31 visit rows but only 12 people in A; the threshold is on people.
    let out = run("SELECT COUNT(*) AS n FROM visits").await;
    assert_table(&out, &["+----+", "| n  |", "+----+", "| 30 |", "+----+"]);
    // Visits of people in B: none; of a0 alone: 20 rows, one person → NULL.
    let out = run(
        "SELECT COUNT(*) AS n FROM visits v JOIN patients p ON v.person_id = p.person_id WHERE p.age = 20 AND p.district = 'A'",
    )
    .await;
    assert_table(&out, &["+---+", "| n |", "+---+", "|   |", "+---+"]);
}

#[tokio::test]
async fn conditional_sums_count_only_selected_people() {
    // The CASE selects one person (a0); ELSE 0 must not make everyone a contributor.
    let out = run("SELECT SUM(CASE WHEN v.cost > 100 THEN v.cost ELSE 0 END) AS s FROM visits v").await;
    assert_table(&out, &["+---+", "| s |", "+---+", "|   |", "+---+"]);
}

#[tokio::test]
async fn a_sum_and_conditional_counts_each_count_their_own_people() {
    // One pass flattens the sum (a0's 20 000 counts as 10, the top group's mean) and counts
    // each cell's people: the costly visits are one person's (a0); every visit costs more than
    // 5, so that cell has the group's 12 people (its 31 visits rounded to 30).
    let out = run(
        "SELECT SUM(cost) AS s, COUNT(*) FILTER (WHERE cost > 100) AS costly, COUNT(*) FILTER (WHERE cost > 5) AS over5 FROM visits",
    )
    .await;
    // 11 × 10 + 10 for a0, with noise of half the top group's mean (sd 5, at most 9.5 sd).
    near(column(&out, 0)[0], 120.0, 5.0 * 9.5);
    assert_eq!((column(&out, 1)[0], column(&out, 2)[0]), (None, Some(30.0)), "{out}");
}

#[tokio::test]
async fn distinct_combinations_need_enough_people() {
    let out = run("SELECT DISTINCT district FROM patients ORDER BY district").await;
    assert_table(
        &out,
        &[
            "+----------+",
            "| district |",
            "+----------+",
            "| A        |",
            "| C        |",
            "+----------+",
        ],
    );
}

#[tokio::test]
async fn joins_on_other_keys_count_people_on_both_sides() {
    // Each A patient paired with the one 20-year-old: the right side is a single person.
    let out = run(
        "SELECT COUNT(*) AS n FROM patients p1 JOIN patients p2 ON p1.district = p2.district WHERE p2.age = 20 AND p2.district = 'A'",
    )
    .await;
    assert_table(&out, &["+---+", "| n |", "+---+", "|   |", "+---+"]);
}

#[tokio::test]
async fn post_processing_of_safe_aggregates_is_allowed() {
    let out = run(
        "SELECT COUNT(*) AS districts, SUM(n) AS total FROM (SELECT district, COUNT(*) AS n FROM patients GROUP BY district) t",
    )
    .await;
    assert_table(
        &out,
        &[
            "+-----------+-------+",
            "| districts | total |",
            "+-----------+-------+",
            "| 2         | 40    |",
            "+-----------+-------+",
        ],
    );
}

#[tokio::test]
async fn one_persons_extreme_value_is_flattened_and_every_sum_perturbed() {
    // a0's 20 visits at 1000 count as 10 (the mean of the next people's 10 each): the sum and
    // the mean are released, and say nothing of a0's 20 000.
    let out = run("SELECT SUM(cost) AS s, AVG(cost) AS a, COUNT(*) AS n FROM visits").await;
    let (s, a) = (column(&out, 0)[0], column(&out, 1)[0]);
    near(s, 120.0, 47.5);
    near(a, 120.0 / 31.0, 47.5 / 31.0);
    assert_eq!(column(&out, 2)[0], Some(30.0));
    // The same contributions give the same value however the SQL is spelled, in any session…
    let sql = "SELECT district, SUM(age) AS s FROM patients GROUP BY district ORDER BY district";
    let first = run(sql).await;
    assert_eq!(run(sql).await, first);
    let spelled = "SELECT p.district, SUM(p.age + 0) AS s FROM patients p GROUP BY 1 ORDER BY 1";
    assert_eq!(column(&run(spelled).await, 1), column(&first, 1));
    // …and other contributions other noise. B is withheld (9 people); A (ages 20…31, the two
    // oldest counted as 28) and C (20…49) are near their sums, integers as the column is.
    let sums = column(&first, 1);
    near(sums[0], 301.0, 14.0 * 9.5);
    near(sums[1], 1030.0, 23.0 * 9.5);
    assert!(sums.iter().all(|v| v.is_some_and(|v| v.fract() == 0.0)), "{first}");
    let doubled = "SELECT district, SUM(age * 2) / 2 AS s FROM patients GROUP BY district ORDER BY district";
    assert_ne!(column(&run(doubled).await, 1), sums);
}

#[tokio::test]
async fn conditions_that_leave_out_a_few_people_are_answered_as_if_absent() {
    // "Everyone" and "everyone but a0", in several spellings: one answer, no NULL.
    let all = "SELECT COUNT(*) AS n FROM patients";
    as_if_absent(
        "SELECT COUNT(*) AS n FROM patients WHERE NOT (district = 'A' AND age = 20)",
        all,
    )
    .await;
    as_if_absent(
        "WITH t AS (SELECT * FROM patients WHERE age <> 20) SELECT COUNT(*) AS n FROM t",
        all,
    )
    .await;
    as_if_absent(
        "SELECT COUNT(*) AS n FROM patients WHERE person_id NOT IN (SELECT person_id FROM visits WHERE cost > 100)",
        all,
    )
    .await;
    let by_district = "SELECT district, COUNT(*) AS n FROM patients GROUP BY district ORDER BY district";
    as_if_absent(
        "SELECT district, COUNT(*) AS n FROM patients WHERE age <> 20 GROUP BY district ORDER BY district",
        by_district,
    )
    .await;
    // Judged per condition: the district is kept, the one person is not.
    as_if_absent(
        "SELECT COUNT(*) AS n FROM patients WHERE district = 'C' AND age <> 21",
        "SELECT COUNT(*) AS n FROM patients WHERE district = 'C'",
    )
    .await;
    // A join's own condition, and a cell's FILTER.
    as_if_absent(
        "SELECT COUNT(*) AS n FROM patients p JOIN visits v ON p.person_id = v.person_id AND v.cost < 100",
        "SELECT COUNT(*) AS n FROM patients p JOIN visits v ON p.person_id = v.person_id",
    )
    .await;
    as_if_absent("SELECT COUNT(*) FILTER (WHERE age <> 20) AS n FROM patients", all).await;
    // Excluding many people is not of low effect: the answer is the condition's.
    let c = run("SELECT COUNT(*) AS n FROM patients WHERE district <> 'C'").await;
    assert_eq!(column(&c, 0), [Some(20.0)], "{c}");
    // More conditions than the rewrite judges: refused, whatever the data.
    let e = refusal("SELECT COUNT(*) FROM patients WHERE age > 1 AND age < 90 AND district <> 'Z' AND age <> 50").await;
    assert!(e.to_string().contains("at most 3 conditions"), "{e}");
}

#[tokio::test]
async fn a_sum_a_condition_leaves_one_person_out_of_is_perturbed_not_withheld() {
    // a0 is left out of this sum (a zero adds nothing): no NULL says so; the noise covers it.
    let out = run(
        "SELECT SUM(CASE WHEN cost < 100 THEN cost ELSE 0 END) AS s FROM visits v JOIN patients p USING (person_id)",
    )
    .await;
    near(column(&out, 0)[0], 110.0, 5.0 * 9.5);
}

#[tokio::test]
async fn configured_identifiers_are_placed_like_person_id_but_people_are_still_counted() {
    for sql in [
        "SELECT clinic_id, COUNT(*) FROM visits GROUP BY clinic_id",
        "SELECT COUNT(*) FROM visits WHERE clinic_id = 'clinic-1'",
        "SELECT SUM(length(clinic_id)) FROM visits",
        "SELECT c FROM (SELECT clinic_id AS c FROM visits) t GROUP BY c",
    ] {
        let e = refusal(sql).await;
        assert!(matches!(e, PolicyError::Identifier { .. }), "{sql}: {e}");
    }
    // Counting distinct clinics is allowed; the threshold still counts people (12), not clinics (3).
    let out = run("SELECT COUNT(DISTINCT clinic_id) AS clinics FROM visits").await;
    assert_table(
        &out,
        &[
            "+---------+",
            "| clinics |",
            "+---------+",
            "| 5       |",
            "+---------+",
        ],
    );
}

#[tokio::test]
async fn rows_are_counted_as_people_only_where_each_row_is_a_different_person() {
    let ctx = session();
    let known = |sql: &'static str, qualifier: &'static str| {
        let ctx = ctx.clone();
        async move {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            one_row_per_person(&plan, &Column::new(Some(qualifier), PERSON_ID))
        }
    };
    // The table with one row per person, through filters, renames, projections and IN.
    assert!(known("SELECT person_id FROM patients", "patients").await);
    assert!(known("SELECT person_id FROM patients WHERE age > 30", "patients").await);
    assert!(
        known(
            "SELECT x.person_id FROM (SELECT person_id, age FROM patients) x WHERE age > 30",
            "x"
        )
        .await
    );
    assert!(
        known(
            "SELECT p.person_id FROM patients p WHERE p.person_id IN (SELECT person_id FROM visits)",
            "p"
        )
        .await
    );
    // A join can repeat a person; a table not known to have one row per person may; a union may.
    assert!(
        !known(
            "SELECT p.person_id FROM patients p JOIN visits v ON p.person_id = v.person_id",
            "p"
        )
        .await
    );
    assert!(
        !known(
            "SELECT p.person_id FROM patients p JOIN patients q ON p.age = q.age",
            "p"
        )
        .await
    );
    assert!(!known("SELECT person_id FROM visits", "visits").await);
    assert!(
        !known(
            "SELECT person_id FROM (SELECT person_id FROM patients UNION ALL SELECT person_id FROM patients) u",
            "u"
        )
        .await
    );
}

/// The aggregates of `plan`, once optimised, that `keep` keeps (as text).
fn aggregates(ctx: &SessionContext, plan: &LogicalPlan, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut kept = vec![];
    ctx.state()
        .optimize(plan)
        .unwrap()
        .apply(|node| {
            if let LogicalPlan::Aggregate(a) = node {
                kept.extend(a.aggr_expr.iter().map(|e| e.to_string()).filter(|e| keep(e)));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
    kept
}

/// The aggregates of `plan` that count its rows: COUNT of a constant.
fn counts(ctx: &SessionContext, plan: &LogicalPlan) -> Vec<String> {
    aggregates(ctx, plan, |e| e.starts_with("count(Int"))
}

#[tokio::test]
async fn a_query_counting_rows_where_rows_count_people_is_not_counted_twice() {
    // Each row a person (patients), or people told from rows (episodes): the query's own
    // COUNT(*) is the group's count of people too; the rewrite adds no second count of the rows.
    let ctx = session();
    for sql in [
        "SELECT district, COUNT(*) AS n FROM patients GROUP BY district",
        "SELECT district, COUNT(*) AS n, AVG(age) AS mean_age FROM patients GROUP BY district",
    ] {
        let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
        let counts = counts(&ctx, permit.plan());
        assert_eq!(counts.len(), 1, "{sql}: {counts:?}");
    }
    let sql = "SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind";
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let counts = counts(&ctx, permit.from_rows().expect("a plan from rows"));
    assert_eq!(counts.len(), 1, "{sql}: {counts:?}");
    // What they release is checked as before: B's 9 people withheld, with or without a mean.
    let out = run("SELECT district, COUNT(*) AS n, AVG(age) AS a FROM patients GROUP BY district ORDER BY 1").await;
    assert!(
        out.contains("| A ") && !out.contains("| B ") && out.contains("| C "),
        "{out}"
    );
}

#[tokio::test]
async fn identifiers_are_one_person_only_where_an_inner_join_makes_them_equal() {
    let ctx = session();
    let same = |sql: &'static str, a: (&'static str, &'static str), b: (&'static str, &'static str)| {
        let ctx = ctx.clone();
        async move {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            let LogicalPlan::Projection(p) = plan else {
                panic!("{sql}")
            };
            let input = &p.input;
            same_person(input, &Column::new(Some(a.0), a.1), &Column::new(Some(b.0), b.1))
        }
    };
    let (e, s) = (("e", PERSON_ID), ("s", PERSON_ID));
    // Joined on them, through a rename, a subquery and a filter.
    assert!(
        same(
            "SELECT * FROM episodes e JOIN stays s ON e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(same("SELECT * FROM episodes e JOIN stays s USING (person_id)", e, s).await);
    assert!(
        same(
            "SELECT * FROM episodes e JOIN stays s ON s.ward = 'A' AND s.person_id = e.person_id WHERE e.kind = 'X'",
            e,
            s
        )
        .await
    );
    assert!(
        same(
            "SELECT * FROM (SELECT person_id AS pid FROM episodes) e JOIN stays s ON e.pid = s.person_id",
            ("e", "pid"),
            s
        )
        .await
    );
    // Outer joins leave one side NULL; a WHERE equality is dropped by the baseline (the
    // variant without conditions); other keys do not make the people the same.
    assert!(
        !same(
            "SELECT * FROM episodes e LEFT JOIN stays s ON e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(
        !same(
            "SELECT * FROM episodes e FULL JOIN stays s ON e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(
        !same(
            "SELECT * FROM episodes e, stays s WHERE e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(!same("SELECT * FROM episodes e JOIN stays s ON e.kind = s.ward", e, s).await);
    assert!(
        !same(
            "SELECT * FROM episodes e JOIN stays s ON e.person_id = s.person_id OR e.kind = s.ward",
            e,
            s
        )
        .await
    );

    // Joined so, people are counted once: by the column the query counts, in the query's own
    // distinct count, where the two sides were counted each before (and the group's people
    // once more, up to the threshold).
    let sql = "SELECT e.kind, COUNT(DISTINCT s.person_id) AS people FROM episodes e JOIN stays s \
               ON e.person_id = s.person_id GROUP BY 1";
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let distinct_counts = aggregates(&ctx, permit.plan(), |e| {
        e.contains("DISTINCT") || e.contains("sde_people_at_least")
    });
    assert_eq!(distinct_counts.len(), 1, "{distinct_counts:?}");
    assert!(distinct_counts[0].contains("s.person_id"), "{distinct_counts:?}");
}

/// The plan telling people from rows, executed, if the rewrite made one.
async fn execute_from_rows(sql: &str) -> Option<datafusion::error::Result<String>> {
    let ctx = session();
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let plan = permit.from_rows()?.clone();
    let run = async {
        let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
        Ok(pretty_format_batches(&batches)?.to_string())
    };
    Some(run.await)
}

#[tokio::test]
async fn rows_settle_a_group_only_where_they_prove_enough_people() {
    // 25 rows of Y with at most 3 per person prove only 9 people: the rows cannot settle it.
    // Counted one by one, Y has 9 people and is withheld.
    let sql = "SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind";
    assert_unsettled(sql).await;
    let exact = [
        "+------+----+",
        "| kind | n  |",
        "+------+----+",
        "| X    | 40 |",
        "+------+----+",
    ];
    assert_table(&run(sql).await, &exact);
    // All 65 rows prove at least 22 people: settled, released as counting them would.
    let sql = "SELECT COUNT(*) AS n FROM episodes";
    let total = ["+----+", "| n  |", "+----+", "| 65 |", "+----+"];
    assert_table(&execute_from_rows(sql).await.unwrap().unwrap(), &total);
    assert_table(&run(sql).await, &total);
    // Settled from rows, the table's people are never read (with counts perturbed they are, for
    // the cell keys).
    assert_reads_no_people(sql).await;
}

/// The plan telling people from rows scans tables but never reads `person_id`.
async fn assert_reads_no_people(sql: &str) {
    let ctx = session();
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let optimised = ctx.state().optimize(permit.from_rows().unwrap()).unwrap();
    let mut scans = vec![];
    optimised
        .apply(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                scans.push(
                    scan.projected_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect::<Vec<_>>(),
                );
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
    assert!(
        !scans.is_empty() && scans.iter().all(|s| !s.iter().any(|c| c == PERSON_ID)),
        "{sql}: {scans:?}"
    );
}

/// The plan telling people from rows fails with [`crate::disclosure::Unsettled`].
async fn assert_unsettled(sql: &str) {
    let err = execute_from_rows(sql).await.expect("a plan from rows").unwrap_err();
    assert!(
        matches!(err.find_root(), DataFusionError::External(e) if e.downcast_ref::<crate::disclosure::Unsettled>().is_some()),
        "{sql}: {err}"
    );
}

#[tokio::test]
async fn counts_are_told_from_rows_sums_and_means_flattened_per_person() {
    // Every ward's rows show 10 people or more: counts are told from rows, exact.
    let sql = "SELECT ward, COUNT(*) AS n, COUNT(cost) AS c FROM stays GROUP BY ward ORDER BY ward";
    let out = execute_from_rows(sql).await.unwrap().unwrap();
    assert_eq!(column(&out, 1), [Some(30.0), Some(20.0), Some(25.0)], "{out}");
    assert_eq!(column(&out, 2), [Some(30.0), Some(20.0), Some(25.0)], "{out}");
    assert_reads_no_people(sql).await;
    // Sums and means need each person's total: no plan from rows; 1.5 hours a stay, at most
    // two a person, so the top group's mean is 3 and the noise's sd 1.5.
    let sql = "SELECT ward, COUNT(*) AS n, SUM(hours) AS h, AVG(hours) AS a FROM stays GROUP BY ward ORDER BY ward";
    assert!(execute_from_rows(sql).await.is_none());
    let out = run(sql).await;
    assert_eq!(column(&out, 1), [Some(30.0), Some(20.0), Some(25.0)], "{out}");
    for (h, n) in column(&out, 2).into_iter().zip([30.0, 20.0, 24.0]) {
        near(h, 1.5 * n, 1.5 * 9.5);
    }
    // B's two people with 200 each count as two at the next people's 0.5: B's sum is released
    // near 9, and tells nothing of their 400.
    let out = run("SELECT ward, SUM(cost) AS s FROM stays GROUP BY ward ORDER BY ward").await;
    let s = column(&out, 1);
    near(s[0], 90.0, 3.0 * 9.5);
    near(s[1], 9.0, 0.25 * 9.5);
    near(s[2], 72.0, 3.0 * 9.5);
    // C0 has no days: C's sum is released all the same (no NULL marks who is left out).
    let out = run("SELECT ward, SUM(days) AS d FROM stays GROUP BY ward ORDER BY ward").await;
    assert!(column(&out, 1).iter().all(Option::is_some), "{out}");
}

#[tokio::test]
async fn people_are_told_from_rows_only_where_rows_can_tell() {
    for sql in [
        // Filters and cells with conditions need people counted exactly (conditions of
        // low effect).
        "SELECT kind, COUNT(*) AS n FROM episodes WHERE kind <> 'Z' GROUP BY kind",
        "SELECT kind, COUNT(*) FILTER (WHERE kind = 'X') AS n FROM episodes GROUP BY kind",
        // A table whose most rows per person is not known; a join that can repeat a person.
        "SELECT cost > 500 AS c, COUNT(*) AS n FROM visits GROUP BY 1",
        "SELECT e.kind, COUNT(*) AS n FROM episodes e JOIN visits v ON e.person_id = v.person_id GROUP BY 1",
        // A cell counting people reads who they are anyway.
        "SELECT kind, COUNT(DISTINCT person_id) AS people FROM episodes GROUP BY kind",
        // A table with one row per person counts people as rows.
        "SELECT district, COUNT(*) AS n FROM patients GROUP BY district",
        "SELECT district, SUM(age) AS n FROM patients GROUP BY district",
    ] {
        assert!(execute_from_rows(sql).await.is_none(), "{sql}");
    }
}

#[tokio::test]
async fn a_person_with_many_rows_behind_a_join_is_still_one_person() {
    // a0's 20 visits costing 1000 are 20 rows but one person: the group is withheld.
    let sql = "SELECT p.district, COUNT(*) AS n FROM patients p JOIN visits v ON p.person_id = v.person_id \
               WHERE v.cost > 500 GROUP BY p.district";
    assert_table(&run(sql).await, &["++", "++"]);
}

#[tokio::test]
async fn names_the_rewrite_uses_are_reserved() {
    for sql in [
        "SELECT district, COUNT(*) AS __sde_people_0_0 FROM patients GROUP BY district",
        "SELECT COUNT(*) FROM (SELECT district FROM patients) AS __sde_side_0_u0",
        "WITH __SDE_x AS (SELECT district FROM patients) SELECT COUNT(*) FROM __SDE_x",
    ] {
        let e = refusal(sql).await;
        assert!(e.to_string().contains("reserved"), "{sql}: {e}");
    }
}

#[tokio::test]
async fn a_key_repeated_in_group_by_is_one_key_and_its_cells_are_still_checked() {
    // The aggregate's output holds a repeated key once; its cells are still rounded, withheld
    // and flattened exactly as with the key given once.
    for (once, repeated) in [
        (
            "SELECT district, COUNT(*) AS n FROM patients GROUP BY district ORDER BY 1",
            "SELECT district, COUNT(*) AS n FROM patients GROUP BY district, district, patients.district ORDER BY 1",
        ),
        (
            "SELECT age > 25 AS old, district, COUNT(*) AS n, SUM(age) AS s FROM patients \
             GROUP BY age > 25, district ORDER BY 1, 2",
            "SELECT age > 25 AS old, district, COUNT(*) AS n, SUM(age) AS s FROM patients \
             GROUP BY age > 25, district, age > 25, district, district ORDER BY 1, 2",
        ),
        (
            "SELECT district, SUM(v.cost) AS s, COUNT(*) AS n FROM patients p \
             JOIN visits v ON p.person_id = v.person_id GROUP BY district",
            "SELECT district, SUM(v.cost) AS s, COUNT(*) AS n FROM patients p \
             JOIN visits v ON p.person_id = v.person_id GROUP BY district, p.district, district",
        ),
    ] {
        assert_eq!(run(repeated).await, run(once).await, "{repeated}");
    }
    let once = execute_from_rows("SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind ORDER BY 1").await;
    let repeated = execute_from_rows("SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind, kind ORDER BY 1").await;
    let outcome = |r: Option<datafusion::error::Result<String>>| r.map(|r| r.map_err(|e| e.to_string()));
    let (once, repeated) = (outcome(once), outcome(repeated));
    assert!(once.is_some(), "a plan from rows");
    assert_eq!(repeated, once, "people told from rows");
}

/// `sql` under `rules` with rounding to 1, so a count's noise shows; one value or NULL.
async fn count_under(rules: Rules, sql: &str) -> Option<f64> {
    let ctx = session();
    let rules = Rules { rounding: 1, ..rules };
    let permit = plan_and_check(&ctx, sql, rules, &Default::default()).await.unwrap();
    let batches = ctx
        .execute_logical_plan(permit.plan().clone())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    column(&pretty_format_batches(&batches).unwrap().to_string(), 0)[0]
}

#[tokio::test]
async fn counts_are_perturbed_by_their_cell_key_alike_however_spelled() {
    // District C's 30 people, four ways, counting rows or people: one released value, within
    // the p-table's D (3) of the truth.
    let c = [
        "SELECT COUNT(*) AS n FROM patients WHERE district = 'C'",
        "SELECT COUNT(*) AS n FROM patients WHERE district IN ('C', 'Z')",
        "SELECT COUNT(age) AS n FROM patients WHERE district > 'B'",
        "SELECT COUNT(DISTINCT person_id) AS n FROM patients WHERE NOT district <> 'C'",
    ];
    let first = count_under(Rules::DEFAULT, c[0]).await.unwrap();
    assert!((first - 30.0).abs() <= 3.0, "{first}");
    for sql in &c[1..] {
        assert_eq!(count_under(Rules::DEFAULT, sql).await, Some(first), "{sql}");
    }
    // Different sets of people: different noise, never more than D, withheld alike.
    let mut noisy = 0;
    for age in 21..60 {
        let sql = format!("SELECT COUNT(*) AS n FROM patients WHERE age < {age}");
        let (exact, perturbed) = (count_under(RULES, &sql).await, count_under(Rules::DEFAULT, &sql).await);
        assert_eq!(exact.is_none(), perturbed.is_none(), "{sql}");
        if let (Some(e), Some(p)) = (exact, perturbed) {
            assert!((e - p).abs() <= 3.0, "{sql}: {p} for {e}");
            noisy += usize::from(e != p);
        }
    }
    assert!(noisy >= 5, "only {noisy} counts perturbed");
}
