//! The gateway's own behaviour as an oracle, scored as an attacker scores it: over many target
//! people, each picked out by quasi-identifiers (age, district, sex) that only they share, half
//! of them in adult social care (`asc_services`) and half not, found from the raw data. The
//! attacker sends one query per target and guesses "member" from what comes back.
//!
//! Errors: a value that fails only on the target's row (a division by zero, a cast, a function,
//! an overflow) must not fail the query, or the failure itself says the target is there.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::DataType;

use crate::helpers::*;

/// A target: the condition that picks them out, and whether they use adult social care.
struct Target {
    condition: String,
    member: bool,
}

/// `per_class` members and `per_class` non-members, each alone on (age, district, sex) among
/// the people not opted out, in pseudonym order (pseudonyms are keyed hashes: no pattern).
async fn targets(per_class: usize) -> Vec<Target> {
    let rows = raw(
        &world_data(),
        "WITH p AS (SELECT * FROM patients WHERE person_id NOT IN (SELECT person_id FROM opt_outs)),
              alone AS (SELECT age, district, sex FROM p GROUP BY 1, 2, 3 HAVING COUNT(*) = 1),
              asc AS (SELECT DISTINCT person_id FROM asc_services)
         SELECT p.age, p.district, p.sex, asc.person_id IS NOT NULL AS member
         FROM p JOIN alone ON p.age = alone.age AND p.district = alone.district AND p.sex = alone.sex
         LEFT JOIN asc ON asc.person_id = p.person_id
         ORDER BY p.person_id",
    )
    .await;
    let mut out = Vec::new();
    let (mut members, mut others) = (0, 0);
    for b in &rows {
        let (age, district, sex) = (
            datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap(),
            datafusion::arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap(),
            datafusion::arrow::compute::cast(b.column(2), &DataType::Utf8).unwrap(),
        );
        let (age, district, sex) = (
            age.as_string::<i32>(),
            district.as_string::<i32>(),
            sex.as_string::<i32>(),
        );
        let member = b.column(3).as_boolean();
        for i in 0..b.num_rows() {
            let m = member.value(i);
            let count = if m { &mut members } else { &mut others };
            if *count >= per_class {
                continue;
            }
            *count += 1;
            out.push(Target {
                condition: format!(
                    "p.age = {} AND p.district = '{}' AND p.sex = '{}'",
                    age.value(i),
                    district.value(i),
                    sex.value(i)
                ),
                member: m,
            });
        }
    }
    assert_eq!((members, others), (per_class, per_class), "enough isolated targets");
    out
}

#[tokio::test]
async fn a_value_that_fails_on_one_persons_row_does_not_fail_the_query() {
    // An attacker with many queries: the per-user rate limit is not the defence tested here.
    let gw = spawn_gateway_with(|c| c.limits.user_queries_per_minute = 100_000).await;
    let targets = targets(25).await;
    let join = "FROM patients p JOIN asc_services a ON a.person_id = p.person_id";
    let spellings: [fn(&str) -> String; 4] = [
        |p| format!("SUM(10 / CASE WHEN {p} THEN 0 ELSE 1 END)"),
        |p| format!("SUM(CAST(CASE WHEN {p} THEN 'x' ELSE '1' END AS INT))"),
        |p| format!("SUM(date_part('year', to_date(CASE WHEN {p} THEN 'not a date' ELSE '2020-01-31' END)))"),
        |p| format!("SUM(CASE WHEN {p} THEN 9223372036854775807 ELSE 1 END + 1)"),
    ];
    let mut right = 0;
    let mut guesses = 0;
    let mut failures = vec![];
    for spelling in spellings {
        for t in &targets {
            let sql = format!("SELECT COUNT(*) AS n, {} AS s {join}", spelling(&t.condition));
            let outcome = gw.query_as("alice", PROJECT, &sql).await;
            let failed = outcome.is_err();
            if let Err(e) = outcome {
                failures.push(format!("{sql}: {}", e.message()));
            }
            // The attacker's guess: a failure means the target's row was there.
            right += usize::from(failed == t.member);
            guesses += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} queries failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    // Nothing fails, so the error oracle guesses "not a member" every time: right for the half
    // that are not, which is chance (members and non-members are equally many).
    assert_eq!(right * 2, guesses, "membership accuracy from errors is chance");
}
