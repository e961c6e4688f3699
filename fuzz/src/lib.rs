//! The fuzz harness: the gateway's whole parse -> policy -> plan path over the demo schema, with
//! no network. One [`SessionContext`] holds the demo tables as guarded tables (as the policy
//! unit tests build them); each input's SQL goes through
//! [`sde_gateway::policy::plan_and_check`], and a permit is optimised and planned physically,
//! as the gateway does before it executes. Refusals are fine; only panics, aborts, stack
//! overflows and timeouts are bugs.
//!
//! `SDE_FUZZ_EXECUTE=1` also executes the physical plans (on the few rows of the demo tables);
//! off by default, as the brief is the planning path.

use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{Array, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use sde_gateway::disclosure::Rules;
use sde_gateway::engine::GuardedTable;
use sde_gateway::policy::{StatementLimits, plan_and_check};

pub mod sql;

/// `limits.max_value_bytes`, as the gateway's default.
pub const MAX_VALUE_BYTES: usize = 8192;

fn table(schema: Arc<Schema>, columns: Vec<Arc<dyn Array>>) -> Arc<dyn TableProvider> {
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).expect("demo batch");
    Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("demo table"))
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn strings(values: impl IntoIterator<Item = String>) -> Arc<dyn Array> {
    Arc::new(StringArray::from(values.into_iter().collect::<Vec<_>>()))
}

/// The demo schema, guarded, in a session configured as the gateway's
/// ([`sde_gateway::engine::Engine::session_with_runtime`]): catalogue `sde.public`, no
/// information schema, the capped functions and the checked arithmetic registered.
pub fn build_session() -> SessionContext {
    const PEOPLE: usize = 24;
    let pid = |i: usize| format!("p{i:03}");
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_default_catalog_and_schema(sde_gateway::engine::CATALOG, sde_gateway::engine::SCHEMA)
        .with_create_default_catalog_and_schema(true)
        .with_information_schema(false)
        .with_extension(Arc::new(sde_gateway::disclosure::PerturbationKey::from_bytes([1; 32])));
    let ctx = SessionContext::new_with_config(config);
    sde_gateway::engine::capped::register(&ctx, MAX_VALUE_BYTES);
    sde_gateway::engine::overflow::register(&ctx);
    sde_gateway::engine::total::register(&ctx);

    let districts = ["North", "South", "East", "West"];
    let patients = table(
        Arc::new(Schema::new(vec![
            utf8("person_id"),
            utf8("sex"),
            Field::new("age", DataType::Int64, false),
            utf8("age_band"),
            utf8("ethnicity"),
            utf8("district"),
            Field::new("imd_decile", DataType::Int64, false),
        ])),
        vec![
            strings((0..PEOPLE).map(pid)),
            strings((0..PEOPLE).map(|i| ["F", "M"][i % 2].to_owned())),
            Arc::new(Int64Array::from(
                (0..PEOPLE).map(|i| (i * 4) as i64).collect::<Vec<_>>(),
            )),
            strings((0..PEOPLE).map(|i| format!("{}-{}", i * 4 / 10 * 10, i * 4 / 10 * 10 + 9))),
            strings((0..PEOPLE).map(|i| ["White", "Asian", "Black", "Mixed", "Other"][i % 5].to_owned())),
            strings((0..PEOPLE).map(|i| districts[i % 4].to_owned())),
            Arc::new(Int64Array::from(
                (0..PEOPLE).map(|i| (i % 10 + 1) as i64).collect::<Vec<_>>(),
            )),
        ],
    );
    let events = PEOPLE * 2;
    let gp_events = table(
        Arc::new(Schema::new(vec![
            utf8("person_id"),
            Field::new("event_date", DataType::Date32, false),
            utf8("snomed_code"),
        ])),
        vec![
            strings((0..events).map(|i| pid(i % PEOPLE))),
            Arc::new(Date32Array::from(
                (0..events).map(|i| 19_000 + i as i32 * 7).collect::<Vec<_>>(),
            )),
            strings((0..events).map(|i| ["44054006", "38341003", "195967001"][i % 3].to_owned())),
        ],
    );
    let services = PEOPLE;
    let asc_services = table(
        Arc::new(Schema::new(vec![
            utf8("person_id"),
            utf8("service_type"),
            utf8("primary_support_reason"),
            Field::new("start_date", DataType::Date32, false),
            Field::new("end_date", DataType::Date32, true),
            Field::new("weekly_cost", DataType::Float64, false),
        ])),
        vec![
            strings((0..services).map(|i| pid(i * 3 % PEOPLE))),
            strings((0..services).map(|i| ["Home care", "Residential", "Day care"][i % 3].to_owned())),
            strings((0..services).map(|i| ["Physical", "Memory", "Learning"][i % 3].to_owned())),
            Arc::new(Date32Array::from(
                (0..services).map(|i| 18_500 + i as i32).collect::<Vec<_>>(),
            )),
            Arc::new(Date32Array::from(
                (0..services)
                    .map(|i| (i % 4 != 0).then_some(19_500 + i as i32))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                (0..services).map(|i| 100.0 + 37.5 * i as f64).collect::<Vec<_>>(),
            )),
        ],
    );
    let referrals = PEOPLE;
    let ews_referrals = table(
        Arc::new(Schema::new(vec![
            utf8("person_id"),
            Field::new("referral_date", DataType::Date32, false),
            utf8("referral_source"),
            utf8("service"),
            utf8("outcome"),
        ])),
        vec![
            strings((0..referrals).map(|i| pid(i * 5 % PEOPLE))),
            Arc::new(Date32Array::from(
                (0..referrals).map(|i| 19_200 + i as i32 * 3).collect::<Vec<_>>(),
            )),
            strings((0..referrals).map(|i| ["School", "GP", "Police", "Self"][i % 4].to_owned())),
            strings((0..referrals).map(|i| ["Early help", "Social care"][i % 2].to_owned())),
            strings((0..referrals).map(|i| ["Closed", "Open", "Escalated"][i % 3].to_owned())),
        ],
    );
    let opt_outs = table(
        Arc::new(Schema::new(vec![utf8("person_id")])),
        vec![strings([pid(7), pid(13)])],
    );
    let guarded = |name: &str, source: Arc<dyn TableProvider>| GuardedTable::new(name, source, Arc::clone(&opt_outs));
    for (name, table) in [
        ("patients", guarded("patients", patients).with_one_row_per_person()),
        ("gp_events", guarded("gp_events", gp_events)),
        (
            "asc_services",
            guarded("asc_services", asc_services).with_most_rows_per_person(3),
        ),
        ("ews_referrals", guarded("ews_referrals", ews_referrals)),
    ] {
        ctx.register_table(name, Arc::new(table)).expect("register demo table");
    }
    ctx
}

struct Harness {
    ctx: SessionContext,
    runtime: tokio::runtime::Runtime,
    execute: bool,
    /// `SDE_FUZZ_LAST=FILE`: each statement is written there before it runs, to find the one
    /// that killed the process where libFuzzer could not keep it (a stack overflow).
    last: Option<std::path::PathBuf>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| Harness {
        ctx: build_session(),
        // One worker with tokio's default stack (2 MiB), smaller than the gateway's
        // (`WORKER_STACK_BYTES`): the query path must not depend on a large stack.
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("tokio runtime"),
        execute: std::env::var_os("SDE_FUZZ_EXECUTE").is_some_and(|v| v == "1"),
        last: std::env::var_os("SDE_FUZZ_LAST").map(std::path::PathBuf::from),
    })
}

/// What one statement came to (for the debugging tools; the fuzz targets ignore it).
#[derive(Debug)]
pub enum Outcome {
    Refused(String),
    Permitted { optimised: bool, physical: bool },
}

/// Plans and checks `sql` as the gateway would; a permit is optimised and planned physically
/// (both its plans: the one counting people, and the one telling them from rows).
pub fn run(sql: &str) -> Outcome {
    let h = harness();
    if let Some(path) = &h.last {
        let _ = std::fs::write(path, sql);
    }
    let sql = sql.to_owned();
    let work = h.runtime.spawn(async move {
        let sql = sql.as_str();
        let permit = match plan_and_check(&h.ctx, sql, Rules::DEFAULT, &StatementLimits::default()).await {
            Ok(permit) => permit,
            Err(refusal) => return Outcome::Refused(refusal.to_string()),
        };
        let state = h.ctx.state();
        let (mut optimised_all, mut physical_all) = (true, true);
        for plan in std::iter::once(permit.plan()).chain(permit.from_rows()) {
            let optimised = match state.optimize(plan) {
                Ok(optimised) => optimised,
                Err(_) => {
                    optimised_all = false;
                    physical_all = false;
                    continue;
                }
            };
            match state.create_physical_plan(&optimised).await {
                Ok(physical) => {
                    if h.execute {
                        let _ = datafusion::physical_plan::collect(physical, h.ctx.task_ctx()).await;
                    }
                }
                Err(_) => physical_all = false,
            }
        }
        Outcome::Permitted {
            optimised: optimised_all,
            physical: physical_all,
        }
    });
    match h.runtime.block_on(work) {
        Ok(outcome) => outcome,
        // A panic on the worker is a bug: re-raise it on libFuzzer's thread.
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}
