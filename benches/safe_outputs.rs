//! What Safe Outputs costs: for each query, on the demo world at a given size,
//! - `check`: planning the SQL, the plan checks and the disclosure rewrite (no execution);
//! - `gateway`: executing the permitted (rewritten) plan in the project's session;
//! - `guarded`: the same SQL executed as written in the same session (opt-outs removed, no
//!   disclosure control) — the difference to `gateway` is the per-person work;
//! - `raw`: the same SQL in plain DataFusion on the raw Parquet files.
//!
//! Run: `cargo bench --bench safe_outputs -- [PEOPLE] [RUNS]` (defaults 1000000 and 10). Data is
//! generated into target/bench-world-PEOPLE once. Medians in milliseconds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use datafusion::prelude::SessionContext;
use sde_gateway::disclosure::Rules;
use sde_gateway::engine::Engine;
use sde_gateway::policy;
use sde_gateway::registry::{ProjectAccess, seed::DEMO_DATASETS};

mod common;
use common::time;

const QUERIES: [(&str, &str); 6] = [
    (
        "worked example",
        "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex",
    ),
    (
        "age x sex x district",
        "SELECT age_band, sex, district, COUNT(*) AS n FROM patients GROUP BY 1, 2, 3",
    ),
    (
        "EWS -> ASC pathway",
        "SELECT r.outcome, COUNT(DISTINCT a.person_id) AS people FROM ews_referrals r JOIN asc_services a ON r.person_id = a.person_id WHERE a.start_date > r.referral_date GROUP BY 1",
    ),
    (
        "mean weekly cost",
        "SELECT service_type, AVG(weekly_cost) AS mean_cost, SUM(weekly_cost) AS total FROM asc_services GROUP BY 1",
    ),
    (
        "GP codes, people",
        "SELECT snomed_code, COUNT(DISTINCT person_id) AS people FROM gp_events GROUP BY 1",
    ),
    (
        "small query",
        "SELECT COUNT(*) AS n FROM patients WHERE district = 'Maldon'",
    ),
];

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let people: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-world-{people}"));
    let dir = sde_gateway::demo::ensure_data(&dir, people, sde_gateway::demo::DEFAULT_SEED).expect("demo data");

    let engine = Engine::open(&dir, &Default::default()).await.expect("engine");
    let grants: BTreeMap<String, Vec<String>> = DEMO_DATASETS
        .iter()
        .map(|(d, cols)| (d.to_string(), cols.iter().map(|c| c.to_string()).collect()))
        .collect();
    let access = ProjectAccess {
        project: "bench".into(),
        grants,
        cohort: None,
        disclosure: Default::default(),
        versions: Default::default(),
    };
    let raw = SessionContext::new();
    for (dataset, _) in DEMO_DATASETS {
        raw.register_parquet(dataset, dir.join(dataset).to_str().unwrap(), Default::default())
            .await
            .unwrap();
    }

    println!("{people} people, median of {runs} runs, milliseconds\n");
    println!("| query | check | gateway | guarded | raw | gateway / raw |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, sql) in QUERIES {
        let ctx = engine.session(&access).unwrap();
        let check = time(runs, || async {
            policy::plan_and_check(&ctx, sql, Rules::DEFAULT, &Default::default())
                .await
                .unwrap();
        })
        .await
        .median;
        let permit = policy::plan_and_check(&ctx, sql, Rules::DEFAULT, &Default::default())
            .await
            .unwrap();
        let gateway = time(runs, || async {
            ctx.execute_logical_plan(permit.plan().clone())
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
        })
        .await
        .median;
        let guarded = time(runs, || async {
            ctx.sql(sql).await.unwrap().collect().await.unwrap();
        })
        .await
        .median;
        let plain = time(runs, || async {
            raw.sql(sql).await.unwrap().collect().await.unwrap();
        })
        .await
        .median;
        println!(
            "| {name} | {check:.1} | {gateway:.1} | {guarded:.1} | {plain:.1} | {:.2} |",
            gateway / plain
        );
    }
}
