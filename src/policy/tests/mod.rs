//! Plan checks and rewrites on small in-memory tables: the shared tables and helpers here, the
//! tests in one module per concern.

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

mod cells;
mod perturbation;
mod rows;
mod statements;

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
