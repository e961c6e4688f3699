//! Cells and groups judged by people: thresholds, rounding, opt-outs, disclosure before
//! arithmetic, conditional aggregates, flattening and noise of sums, conditions of low effect.

use super::*;

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
