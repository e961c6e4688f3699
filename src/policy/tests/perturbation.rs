//! Cell-key perturbation of counts: the same people give the same count, however spelled.

use super::*;

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
