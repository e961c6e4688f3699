//! Property test: random aggregate queries over the demo tables, each checked against an
//! independent per-person computation on the raw Parquet (plain DataFusion, no gateway).
//! No released group may be backed by fewer than 10 people, no released count may be
//! unrounded, and every releasable group must be released with the right value.
//!
//! Runs `SDE_PROPERTY_CASES` queries (default 300) through the gateway's own walk in-process.

use std::collections::HashMap;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sde_gateway::Error;
use sde_gateway::gateway::CallContext;
use sde_gateway::identity::Subject;

use crate::helpers::*;

const KEYS: [&str; 5] = ["p.sex", "p.age_band", "p.ethnicity", "p.district", "p.imd_decile"];
const FILTERS: [&str; 8] = [
    "p.age >= 65",
    "p.sex = 'F'",
    "p.district IN ('Harlow', 'Basildon')",
    "p.imd_decile <= 3",
    "p.ethnicity <> 'White'",
    "p.age BETWEEN 18 AND 64",
    "p.district = 'Maldon'",
    "p.age >= 95",
];
/// Whether `released` is what a true count of `truth` may be released as: perturbed by at most
/// the p-table's D (3), then rounded to 5 (at most 2 more).
fn released_for(released: i64, truth: i64) -> bool {
    (released - truth).abs() <= 5
}

/// Joins and the distinct-person column they make available.
const FROMS: [(&str, &str); 3] = [
    ("patients p", "p.person_id"),
    (
        "patients p JOIN asc_services a ON a.person_id = p.person_id",
        "a.person_id",
    ),
    (
        "patients p JOIN ews_referrals r ON r.person_id = p.person_id",
        "r.person_id",
    ),
];

fn rows_by_key(batches: &[RecordBatch], keys: usize) -> HashMap<Vec<String>, Vec<Option<i64>>> {
    let mut out = HashMap::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let key = (0..keys)
                .map(|c| array_value_to_string(b.column(c), r).unwrap())
                .collect();
            let values = (keys..b.num_columns())
                .map(|c| {
                    let col = b.column(c);
                    (!col.is_null(r)).then(|| col.as_primitive::<Int64Type>().value(r))
                })
                .collect();
            out.insert(key, values);
        }
    }
    out
}

/// How many random queries a test runs: `SDE_PROPERTY_CASES`, default 300.
fn cases() -> usize {
    std::env::var("SDE_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// A gateway taking hundreds of queries a minute from one user (above the per-user rate limit),
/// and that user's calls.
async fn busy_gateway() -> (TestGateway, CallContext) {
    let gw = spawn_gateway_with(|c| c.limits.user_queries_per_minute = 1_000_000).await;
    let call = CallContext {
        authenticated: Ok(Subject { user: "alice".into() }),
        project: Some(PROJECT.into()),
        client_tool: None,
    };
    (gw, call)
}

/// `n` different keys of `from`, in random order.
fn pick<'a>(rng: &mut SmallRng, from: &[&'a str], n: usize) -> Vec<&'a str> {
    let mut keys = Vec::new();
    while keys.len() < n {
        let k = from[rng.random_range(0..from.len())];
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

/// `sql` through the gateway's own walk: planned and executed, then released.
async fn through_gateway(gw: &TestGateway, call: &CallContext, sql: &str) -> Result<Vec<RecordBatch>, Error> {
    let planned = gw.core.plan_query(call, sql).await?;
    Ok(gw.core.run_query(call, &planned.handle).await?.batches)
}

#[tokio::test]
async fn random_aggregates_never_release_small_or_unrounded_cells() {
    let cases = cases();
    let (gw, call) = busy_gateway().await;
    let mut rng = SmallRng::seed_from_u64(7);
    let (mut released, mut cells) = (0, 0);
    for case in 0..cases {
        let n_keys = rng.random_range(0..=2);
        let keys = pick(&mut rng, &KEYS, n_keys);
        let (from, person) = FROMS[rng.random_range(0..FROMS.len())];
        let filter = (rng.random_bool(0.6)).then(|| FILTERS[rng.random_range(0..FILTERS.len())]);
        let where_ = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        let group_by = if keys.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {}", keys.join(", "))
        };
        let select_keys: String = keys.iter().map(|k| format!("{k}, ")).collect();
        let sql = format!(
            "SELECT {select_keys}COUNT(*) AS n, COUNT(DISTINCT {person}) AS people FROM {from}{where_}{group_by}"
        );
        let got = match through_gateway(&gw, &call, &sql).await {
            Ok(batches) => batches,
            Err(e) => panic!("case {case}: {sql}: {e}"),
        };
        released += 1;
        // Independent truth: per group, distinct people (opt-outs removed from every table).
        let not_opted_out = format!(
            "{person} NOT IN (SELECT person_id FROM opt_outs) AND p.person_id NOT IN (SELECT person_id FROM opt_outs)"
        );
        let condition = match filter {
            Some(f) => format!("({f}) AND {not_opted_out}"),
            None => not_opted_out.clone(),
        };
        let raw_sql = format!(
            "SELECT {select_keys}COUNT(*) AS n, COUNT(DISTINCT {person}) AS people, COUNT(DISTINCT p.person_id) AS pp
             FROM {from} WHERE {condition}{group_by}"
        );
        let filtered = rows_by_key(&raw(&world_data(), &raw_sql).await, keys.len());
        // Without the filter: where it leaves out 1 to 9 of a group's people it is of low
        // effect, and the group is answered as if it were not there.
        let raw_all = format!(
            "SELECT {select_keys}COUNT(*) AS n, COUNT(DISTINCT {person}) AS people, COUNT(DISTINCT p.person_id) AS pp
             FROM {from} WHERE {not_opted_out}{group_by}"
        );
        let unfiltered = rows_by_key(&raw(&world_data(), &raw_all).await, keys.len());
        let people_of = |t: Option<&Vec<Option<i64>>>| t.map_or(0, |t| t[1].unwrap().min(t[2].unwrap()));
        let truth: HashMap<Vec<String>, Vec<Option<i64>>> = unfiltered
            .iter()
            .filter_map(|(key, all)| {
                let low = filter.is_some() && (1..10).contains(&(people_of(Some(all)) - people_of(filtered.get(key))));
                match low {
                    true => Some((key.clone(), all.clone())),
                    false => filtered.get(key).map(|t| (key.clone(), t.clone())),
                }
            })
            .collect();
        let got = rows_by_key(&got, keys.len());
        for (key, values) in &got {
            // Without GROUP BY the one row is always there; its cells carry the verdict.
            let (n, people, pp) = match truth.get(key) {
                Some(t) => (t[0].unwrap(), t[1].unwrap(), t[2].unwrap()),
                None if keys.is_empty() => (0, 0, 0),
                None => panic!("case {case}: {sql}: released a group that does not exist"),
            };
            if keys.is_empty() && people.min(pp) < 10 {
                assert!(
                    values.iter().all(Option::is_none),
                    "case {case}: {sql}: small total released"
                );
                continue;
            }
            assert!(
                people.min(pp) >= 10,
                "case {case}: {sql}: released {key:?} backed by {people} people"
            );
            for (value, raw_value) in values.iter().zip([n, people]) {
                if let Some(v) = value {
                    cells += 1;
                    assert_eq!(v % 5, 0, "case {case}: {sql}: unrounded count");
                    assert!(
                        released_for(*v, raw_value),
                        "case {case}: {sql}: {v} released for {raw_value} ({key:?})"
                    );
                }
            }
        }
        if !keys.is_empty() {
            for (key, t) in &truth {
                let releasable = t[1].unwrap().min(t[2].unwrap()) >= 10;
                assert_eq!(
                    got.contains_key(key),
                    releasable,
                    "case {case}: {sql}: group {key:?} with {t:?}"
                );
            }
        }
    }
    eprintln!("{cases} random queries: {released} released ({cells} non-NULL cells checked)");
    assert!(released > cases / 3, "most random queries should be answerable");
}

/// Tables with several rows per person, each with its own grouping keys: without filters, the
/// gateway first tells people from rows (at most 3 referrals, 18 care episodes per person
/// here) and counts them where rows cannot settle a group.
const TABLES: [(&str, &[&str]); 2] = [
    (
        "ews_referrals",
        &[
            "referral_source",
            "service",
            "outcome",
            "date_part('year', referral_date)",
        ],
    ),
    (
        "asc_services",
        &[
            "service_type",
            "primary_support_reason",
            "date_part('year', start_date)",
            "end_date IS NULL",
        ],
    ),
];

#[tokio::test]
async fn random_counts_over_several_rows_per_person_release_exactly_the_groups_with_enough_people() {
    let cases = cases() / 3;
    let (gw, call) = busy_gateway().await;
    let mut rng = SmallRng::seed_from_u64(11);
    let mut withheld = 0;
    for case in 0..cases {
        let (table, columns) = TABLES[rng.random_range(0..TABLES.len())];
        let n_keys = rng.random_range(0..=3);
        let keys = pick(&mut rng, columns, n_keys);
        let select_keys: String = keys.iter().map(|k| format!("{k}, ")).collect();
        let group_by = match keys.is_empty() {
            true => String::new(),
            false => format!(" GROUP BY {}", keys.join(", ")),
        };
        let people = match rng.random_bool(0.3) {
            true => ", COUNT(DISTINCT person_id) AS people",
            false => "",
        };
        let sql = format!("SELECT {select_keys}COUNT(*) AS n{people} FROM {table}{group_by}");
        let got = through_gateway(&gw, &call, &sql)
            .await
            .unwrap_or_else(|e| panic!("case {case}: {sql}: {e}"));
        let raw_sql = format!(
            "SELECT {select_keys}COUNT(*) AS n, COUNT(DISTINCT person_id) AS people FROM {table}
             WHERE person_id NOT IN (SELECT person_id FROM opt_outs){group_by}"
        );
        let truth = rows_by_key(&raw(&world_data(), &raw_sql).await, keys.len());
        let got = rows_by_key(&got, keys.len());
        for (key, t) in &truth {
            let (n, people) = (t[0].unwrap(), t[1].unwrap());
            let want = (people >= 10).then_some([n, people]);
            match (got.get(key), want) {
                (Some(values), Some(want)) => {
                    for (v, w) in values.iter().zip(want) {
                        let ok = v.is_some_and(|v| v % 5 == 0 && released_for(v, w));
                        assert!(ok, "case {case}: {sql}: {key:?} with {t:?} released as {values:?}");
                    }
                }
                (None, None) => withheld += 1,
                // Without GROUP BY the one row is always there, its cells NULL when small.
                (Some(values), None) if keys.is_empty() => {
                    assert!(
                        values.iter().all(Option::is_none),
                        "case {case}: {sql}: small total released"
                    )
                }
                (got, _) => panic!("case {case}: {sql}: {key:?} with {t:?} released as {got:?}"),
            }
        }
        assert!(
            got.keys().all(|k| truth.contains_key(k)),
            "case {case}: {sql}: released a group that does not exist"
        );
    }
    eprintln!("{cases} random counts over several rows per person: {withheld} small groups withheld");
    assert!(withheld > 0, "the random queries should meet small groups");
}
