//! The attack classes of `shared/attacks.md`, each in several spellings, through the real
//! gateway on the demo data. Each case asserts the rule that refuses it or the cells withheld.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use tonic::Code;

use crate::helpers::*;

async fn refused(gw: &TestGateway, sql: &str, rule: &str) {
    let err = gw.query_as("alice", PROJECT, sql).await.expect_err(sql);
    assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
    assert!(
        err.message().contains(rule),
        "{sql}: expected {rule}, got {}",
        err.message()
    );
}

async fn released(gw: &TestGateway, sql: &str) -> Vec<RecordBatch> {
    gw.query_as("alice", PROJECT, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

fn text(b: &RecordBatch, column: usize, row: usize) -> String {
    array_value_to_string(b.column(column), row).unwrap()
}

/// The single value of a one-row, one-column result (None for NULL).
fn single_i64(batches: &[RecordBatch]) -> Option<i64> {
    let c = batches[0].column(0);
    (!c.is_null(0)).then(|| c.as_primitive::<Int64Type>().value(0))
}

#[tokio::test]
async fn row_level_output() {
    let gw = spawn_gateway().await;
    for sql in [
        "SELECT age, district FROM patients",
        "select * from patients limit 1",
        "WITH x AS (SELECT age FROM patients) SELECT age FROM x",
        "SELECT p.age FROM (SELECT * FROM patients) p WHERE p.age > 100",
        "SELECT CAST(age AS VARCHAR) || district FROM patients ORDER BY 1",
        "SELECT r.service FROM ews_referrals r JOIN asc_services a ON r.person_id = a.person_id",
    ] {
        refused(&gw, sql, "safe-outputs/aggregate-only").await;
    }
}

#[tokio::test]
async fn identifier_exposure_and_targeting() {
    let gw = spawn_gateway().await;
    for sql in [
        "SELECT person_id, COUNT(*) FROM asc_services GROUP BY person_id",
        "SELECT pid, COUNT(*) FROM (SELECT person_id AS pid FROM asc_services) GROUP BY 1",
        "SELECT COUNT(*) FROM patients WHERE person_id = '0123456789abcdef'",
        "SELECT COUNT(*) FROM patients WHERE person_id LIKE '0%'",
        "SELECT COUNT(*) FROM patients HAVING MAX(person_id) > ''",
        "SELECT SUM(CASE WHEN person_id = 'x' THEN 1 ELSE 0 END) FROM patients",
        "SELECT COUNT(*) FROM patients p JOIN asc_services a ON p.person_id < a.person_id",
        "SELECT COUNT(*) FILTER (WHERE substr(person_id, 1, 1) = 'a') FROM patients",
    ] {
        let err = gw.query_as("alice", PROJECT, sql).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}");
        assert!(
            err.message().contains("safe-outputs/identifiers") || err.message().contains("allowed-aggregates"),
            "{sql}: {}",
            err.message()
        );
    }
}

#[tokio::test]
async fn one_persons_value_and_collections() {
    let gw = spawn_gateway().await;
    for sql in [
        "SELECT MAX(age) FROM patients",
        "SELECT district, min(weekly_cost) FROM asc_services a JOIN patients p USING (person_id) GROUP BY 1",
        "SELECT median(weekly_cost) FROM asc_services",
        "SELECT approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY weekly_cost) FROM asc_services",
        "SELECT array_agg(district) FROM patients",
        "SELECT string_agg(service, ',') FROM ews_referrals",
        "SELECT first_value(age ORDER BY age DESC) FROM patients",
    ] {
        refused(&gw, sql, "safe-outputs/allowed-aggregates").await;
    }
    refused(
        &gw,
        "SELECT age, rank() OVER (ORDER BY age) FROM patients",
        "safe-outputs/allowed-aggregates",
    )
    .await;
    refused(
        &gw,
        "SELECT (SELECT age FROM patients ORDER BY age DESC LIMIT 1) AS oldest",
        "safe-outputs/allowed-aggregates",
    )
    .await;
}

#[tokio::test]
async fn small_cells_are_withheld_and_counts_rounded() {
    let gw = spawn_gateway().await;
    let sql = "SELECT district, ethnicity, COUNT(*) AS n FROM patients GROUP BY 1, 2";
    let got = released(&gw, sql).await;
    let raw_groups = raw(
        &world_data(),
        "SELECT COUNT(*) FROM (SELECT DISTINCT district, ethnicity FROM patients)",
    )
    .await;
    let raw_groups = raw_groups[0].column(0).as_primitive::<Int64Type>().value(0) as usize;
    let released_groups: usize = got.iter().map(|b| b.num_rows()).sum();
    assert!(
        released_groups < raw_groups,
        "small district × ethnicity groups must be withheld"
    );
    for b in &got {
        for n in b.column(2).as_primitive::<Int64Type>().iter().flatten() {
            assert!(n >= 10 && n % 5 == 0, "count {n} is small or unrounded");
        }
    }
    // The same query through a CTE and with ORDER/LIMIT withholds the same groups.
    let cte = released(&gw, "WITH c AS (SELECT district d, ethnicity e, COUNT(*) n FROM patients GROUP BY 1, 2) SELECT * FROM c ORDER BY n LIMIT 1000").await;
    assert_eq!(cte.iter().map(|b| b.num_rows()).sum::<usize>(), released_groups);
}

#[tokio::test]
async fn rows_are_not_people() {
    let gw = spawn_gateway().await;
    // Every released service_type count is backed by ≥ 10 people, whatever the row count.
    let got = released(&gw, "SELECT service_type, COUNT(*) AS n FROM asc_services GROUP BY 1").await;
    let people = raw(
        &world_data(),
        "SELECT service_type, COUNT(DISTINCT person_id) AS people FROM asc_services
         WHERE person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY 1",
    )
    .await;
    let small: Vec<String> = people
        .iter()
        .flat_map(|b| {
            let counts = b.column(1).as_primitive::<Int64Type>().clone();
            (0..b.num_rows())
                .filter(move |&i| counts.value(i) < 10)
                .map(move |i| text(b, 0, i))
        })
        .collect();
    for b in &got {
        for i in 0..b.num_rows() {
            assert!(!small.contains(&text(b, 0, i)));
        }
    }
}

#[tokio::test]
async fn conditional_aggregates_and_flattening() {
    let gw = spawn_gateway().await;
    // One age among ASC users: few people, so NULL — however the condition is written.
    for sql in [
        "SELECT SUM(CASE WHEN p.age = 99 THEN a.weekly_cost ELSE 0 END) FROM asc_services a JOIN patients p USING (person_id)",
        "SELECT SUM(a.weekly_cost) FILTER (WHERE p.age = 99) FROM asc_services a JOIN patients p USING (person_id)",
        "SELECT AVG(CASE WHEN p.age = 99 THEN a.weekly_cost END) FROM asc_services a JOIN patients p USING (person_id)",
    ] {
        let got = released(&gw, sql).await;
        assert!(got[0].column(0).is_null(0), "{sql} released {:?}", got[0].column(0));
    }
    // Flattening: each released district total of weekly cost is its people's totals with the
    // two largest counted as the mean of the next three, within the noise (sd half that mean;
    // a draw is within 9.5 sd), so no one person's cost shows through.
    let got = released(
        &gw,
        "SELECT p.district, SUM(a.weekly_cost) AS total FROM asc_services a JOIN patients p ON a.person_id = p.person_id GROUP BY 1",
    )
    .await;
    let per_person = raw(
        &world_data(),
        "SELECT p.district, a.person_id, SUM(a.weekly_cost) AS c FROM asc_services a JOIN patients p ON a.person_id = p.person_id
         WHERE a.person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY 1, 2",
    )
    .await;
    let mut by_district: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for b in &per_person {
        for i in 0..b.num_rows() {
            by_district
                .entry(text(b, 0, i))
                .or_default()
                .push(b.column(2).as_primitive::<Float64Type>().value(i));
        }
    }
    for b in &got {
        for i in 0..b.num_rows() {
            assert!(b.column(1).is_valid(i), "a district total is withheld");
            let mut c = by_district[&text(b, 0, i)].clone();
            c.sort_by(|x, y| y.total_cmp(x));
            let top_group = (c[2] + c[3] + c[4]) / 3.0;
            let flattened = c[2..].iter().sum::<f64>() + 2.0 * top_group;
            let total = b.column(1).as_primitive::<Float64Type>().value(i);
            assert!(
                (total - flattened).abs() <= 9.5 * 0.5 * top_group + 1e-6,
                "{total} is not the flattened {flattened} within the noise"
            );
        }
    }
}

/// A district and age shared by a handful of (not opted-out) people.
async fn small_group() -> (String, String) {
    let small = raw(
        &world_data(),
        "SELECT district, age, COUNT(*) AS n FROM patients WHERE person_id NOT IN (SELECT person_id FROM opt_outs)
         GROUP BY 1, 2 HAVING COUNT(*) BETWEEN 1 AND 9 ORDER BY age DESC LIMIT 1",
    )
    .await;
    (text(&small[0], 0, 0), text(&small[0], 1, 0))
}

/// `sql` gets the answer of `without`, the same query without its condition of low effect.
async fn as_if_absent(gw: &TestGateway, sql: &str, without: &str) {
    let mut client = gw.client("alice", PROJECT).await;
    let (schema, got) = query_described(&mut client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let (want_schema, want) = query_described(&mut client, without).await.unwrap();
    // The values, not the column names (a FILTER names its column).
    let text = |b: &[RecordBatch]| {
        let table = datafusion::arrow::util::pretty::pretty_format_batches(b)
            .unwrap()
            .to_string();
        let cells = |l: &str| l.split('|').map(|c| c.trim().to_owned()).collect::<Vec<_>>();
        table
            .lines()
            .skip(3)
            .filter(|l| l.starts_with('|'))
            .map(cells)
            .collect::<Vec<_>>()
    };
    assert_eq!(text(&got), text(&want), "{sql} against {without}");
    assert_eq!(
        schema.metadata()["sde.withheld_by_rule"],
        want_schema.metadata()["sde.withheld_by_rule"],
        "{sql}: the metadata says nothing of it"
    );
}

#[tokio::test]
async fn a_small_group_left_out_is_answered_as_if_it_were_not() {
    let gw = spawn_gateway().await;
    let (district, age) = small_group().await;
    let all = "SELECT COUNT(*) FROM patients";
    let by_sex = "SELECT sex, COUNT(*) FROM patients GROUP BY sex ORDER BY sex";
    for (sql, without) in [
        (
            format!("SELECT COUNT(*) FROM patients WHERE NOT (age = {age} AND district = '{district}')"),
            all,
        ),
        (
            format!(
                "SELECT sex, COUNT(*) FROM patients WHERE age <> {age} OR district <> '{district}' GROUP BY sex ORDER BY sex"
            ),
            by_sex,
        ),
        (
            format!(
                "SELECT COUNT(*) FROM patients WHERE person_id NOT IN (SELECT person_id FROM patients WHERE age = {age} AND district = '{district}')"
            ),
            all,
        ),
        (
            format!("SELECT COUNT(*) FILTER (WHERE age <> {age} OR district <> '{district}') FROM patients"),
            all,
        ),
    ] {
        as_if_absent(&gw, &sql, without).await;
    }
}

#[tokio::test]
async fn arithmetic_happens_after_disclosure_control() {
    let gw = spawn_gateway().await;
    for sql in [
        "SELECT COUNT(*) * 2 + 1 FROM patients WHERE age > 98 AND district = 'Maldon'",
        "SELECT CAST(COUNT(*) AS DOUBLE) / 3 FROM patients WHERE age > 98 AND district = 'Maldon'",
    ] {
        let got = released(&gw, sql).await;
        assert!(got[0].column(0).is_null(0), "{sql} revealed a small count");
    }
    let n =
        single_i64(&released(&gw, "SELECT COUNT(*) * 2 + 1 FROM patients WHERE district = 'Maldon'").await).unwrap();
    assert_eq!((n - 1) / 2 % 5, 0, "the count was rounded before the arithmetic");
}

#[tokio::test]
async fn other_statements_and_data_not_granted() {
    let gw = spawn_gateway().await;
    for sql in [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO patients VALUES ('a', 'F', 1, '0-4', 'White', 'Harlow', 1)",
        "DROP TABLE patients",
        "COPY (SELECT 1) TO '/tmp/out.csv'",
        "EXPLAIN SELECT COUNT(*) FROM patients",
        "SET datafusion.execution.batch_size = 1",
        "CREATE EXTERNAL TABLE e STORED AS PARQUET LOCATION '/etc'",
    ] {
        let err = gw.query_as("alice", PROJECT, sql).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
    }
    for sql in [
        "SELECT COUNT(*) FROM gp_events",
        "SELECT COUNT(*) FROM '/etc/passwd'",
        "SELECT COUNT(*) FROM opt_outs",
    ] {
        let err = gw.query_as("alice", PROJECT, sql).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(
            !err.message().contains("/work") && !err.message().contains(".parquet"),
            "{}",
            err.message()
        );
    }
}

#[tokio::test]
async fn opted_out_people_are_never_counted() {
    let gw = spawn_gateway().await;
    let counted = single_i64(&released(&gw, "SELECT COUNT(DISTINCT person_id) FROM patients").await).unwrap();
    let expected = raw(
        &world_data(),
        "SELECT COUNT(*) FROM patients WHERE person_id NOT IN (SELECT person_id FROM opt_outs)",
    )
    .await;
    let expected = expected[0].column(0).as_primitive::<Int64Type>().value(0);
    // Perturbed by at most 3, then rounded to 5.
    assert!(
        counted % 5 == 0 && (counted - expected).abs() <= 5,
        "{counted} for {expected}"
    );
    assert!(expected < PEOPLE as i64 * 98 / 100);
}

#[tokio::test]
async fn identifiers_marked_in_the_config_are_guarded_too() {
    let gw = spawn_gateway_with(|c| {
        c.data
            .identifiers
            .insert("ews_referrals".into(), vec!["referral_source".into()]);
    })
    .await;
    for sql in [
        "SELECT referral_source, COUNT(*) FROM ews_referrals GROUP BY 1",
        "SELECT COUNT(*) FROM ews_referrals WHERE referral_source = 'GP'",
    ] {
        refused(&gw, sql, "safe-outputs/identifiers").await;
    }
    released(
        &gw,
        "SELECT COUNT(DISTINCT referral_source) AS sources FROM ews_referrals",
    )
    .await;
}
