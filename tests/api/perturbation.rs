//! Cell-key perturbation of counts, through the real gateway on the demo world, with rounding
//! set to 1 so the noise itself shows: the same set of rows or people gives one released value
//! however the SQL spells it, and every count is within the p-table's D (3) of the truth.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Int64Type};

use crate::helpers::*;

/// A gateway whose counts are perturbed but not rounded, and that takes many queries a minute.
async fn unrounded_gateway() -> TestGateway {
    spawn_gateway_with(|c| {
        c.limits.user_queries_per_minute = 100_000;
        c.disclosure.rounding = 1;
        c.disclosure.floor_rounding = 1;
    })
    .await
}

/// The one value of a one-cell result.
async fn count(gw: &TestGateway, sql: &str) -> Option<i64> {
    let batches = gw
        .query_as("alice", PROJECT, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let c = datafusion::arrow::compute::cast(batches[0].column(0), &DataType::Int64).unwrap();
    let c = c.as_primitive::<Int64Type>();
    c.is_valid(0).then(|| c.value(0))
}

/// Each value of `column` with its true count of rows and of people (opt-outs removed).
async fn truths(table: &str, column: &str) -> Vec<(String, i64, i64)> {
    let sql = format!(
        "SELECT CAST({column} AS VARCHAR), COUNT(*), COUNT(DISTINCT person_id) FROM {table}
         WHERE person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY 1 ORDER BY 1"
    );
    let mut out = Vec::new();
    for b in raw(&world_data(), &sql).await {
        let v = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let (v, n, p) = (
            v.as_string::<i32>(),
            b.column(1).as_primitive::<Int64Type>(),
            b.column(2).as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            out.push((v.value(i).to_owned(), n.value(i), p.value(i)));
        }
    }
    out
}

#[tokio::test]
async fn one_set_of_people_gets_one_count_however_it_is_spelled_and_within_d() {
    let gw = unrounded_gateway().await;
    let mut noise = Vec::new();
    // Patients: one row per person, so rows and people are one set.
    for (district, _, people) in truths("patients", "district").await {
        let spellings = [
            format!("SELECT COUNT(*) FROM patients WHERE district = '{district}'"),
            format!("SELECT COUNT(*) FROM patients WHERE district IN ('{district}', 'Atlantis')"),
            format!("SELECT COUNT(DISTINCT person_id) FROM patients WHERE district = '{district}'"),
            format!("SELECT COUNT(age) FROM patients WHERE NOT (district <> '{district}')"),
            format!(
                "SELECT n FROM (SELECT district, COUNT(*) AS n FROM patients GROUP BY district) WHERE district = '{district}'"
            ),
        ];
        let first = count(&gw, &spellings[0]).await.expect("a district's count is released");
        for sql in &spellings[1..] {
            assert_eq!(count(&gw, sql).await, Some(first), "{sql}");
        }
        noise.push(first - people);
    }
    // Care services: several rows per person. The people using a service, counted from the
    // service table or through a join with patients, are one set of people.
    for (service, rows, people) in truths("asc_services", "service_type").await {
        let distinct = [
            format!("SELECT COUNT(DISTINCT person_id) FROM asc_services WHERE service_type = '{service}'"),
            format!(
                "SELECT COUNT(DISTINCT p.person_id) FROM patients p JOIN asc_services a ON a.person_id = p.person_id
                 WHERE a.service_type = '{service}'"
            ),
            format!(
                "SELECT COUNT(DISTINCT person_id) FILTER (WHERE service_type = '{service}') FROM asc_services WHERE service_type IN ('{service}')"
            ),
        ];
        let first = count(&gw, &distinct[0]).await.expect("a service's people are released");
        for sql in &distinct[1..] {
            assert_eq!(count(&gw, sql).await, Some(first), "{sql}");
        }
        noise.push(first - people);
        // Its rows, a different set: counted as rows, alike in two spellings.
        let by_rows = count(
            &gw,
            &format!("SELECT COUNT(*) FROM asc_services WHERE service_type = '{service}'"),
        )
        .await;
        let by_rows = by_rows.expect("a service's rows are released");
        let again = format!("SELECT COUNT(service_type) FROM asc_services WHERE service_type LIKE '{service}'");
        assert_eq!(count(&gw, &again).await, Some(by_rows), "{again}");
        noise.push(by_rows - rows);
    }
    eprintln!("{} counts, noise {noise:?}", noise.len());
    assert!(
        noise.iter().all(|n| n.abs() <= 3),
        "a count moved by more than D: {noise:?}"
    );
    assert!(
        noise.iter().filter(|n| **n != 0).count() * 2 >= noise.len(),
        "most counts are perturbed: {noise:?}"
    );
}
