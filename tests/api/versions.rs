//! Dataset versions through the front door: a project whose grant names a version reads that
//! version; without one it reads the latest. Both worlds are made by the real ingest.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use sde_gateway::demo;
use sde_gateway::ingest::{self, spec::IngestSpec, version};
use sde_gateway::registry::Registry;

use crate::helpers::*;

fn count(batches: &[datafusion::arrow::record_batch::RecordBatch]) -> i64 {
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

/// People in a patients folder who have not opted out.
async fn expected(patients: &std::path::Path, opt_outs: &std::path::Path) -> i64 {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet("patients", patients.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    ctx.register_parquet("opt_outs", opt_outs.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let sql = "SELECT COUNT(*) FROM patients WHERE person_id NOT IN (SELECT person_id FROM opt_outs)";
    count(&ctx.sql(sql).await.unwrap().collect().await.unwrap())
}

/// A count as released: perturbed by at most D (3), then rounded to 5.
fn near(released: i64, truth: i64) {
    assert!(
        released % 5 == 0 && (released - truth).abs() <= 5,
        "{released} released for {truth}"
    );
}

#[tokio::test]
async fn a_grant_pinned_to_a_version_reads_that_version() {
    let world = tempfile::tempdir().unwrap();
    let root = world.path().to_owned();
    let (data, half) = tokio::task::spawn_blocking(move || {
        let data = demo::ensure_data(&root, 2_000, 7).unwrap();
        // A second, unpublished version of patients from an extract of the first 800 rows.
        let csv = std::fs::read_to_string(root.join("raw/patients/part-0.csv")).unwrap();
        let head: String = csv.lines().take(801).map(|l| format!("{l}\n")).collect();
        std::fs::create_dir_all(root.join("raw-half")).unwrap();
        std::fs::write(root.join("raw-half/patients.csv"), head).unwrap();
        let spec = std::fs::read_to_string(root.join("ingest/patients.toml"))
            .unwrap()
            .replace("input = \"../raw/patients\"", "input = \"../raw-half\"")
            .replace("publish = \"../data\"\n", "");
        let path = root.join("ingest/patients-half.toml");
        std::fs::write(&path, spec).unwrap();
        let (spec, text) = IngestSpec::load(&path, None).unwrap();
        let key = ingest::read_key(&spec.key_file).unwrap();
        let report = ingest::ingest(&spec, &text, &key, chrono::Utc::now()).unwrap();
        (data, report)
    })
    .await
    .unwrap();
    let latest = version::read_manifest(&data.join("patients")).unwrap().unwrap();
    assert_ne!(latest.version, half.manifest.version);

    let versions = world.path().join("versions");
    let (data_dir, versions_dir) = (data.clone(), versions.clone());
    let gw = spawn_gateway_with(move |config| {
        config.data.dir = data_dir;
        config.data.versions = Some(versions_dir);
    })
    .await;
    let registry = Registry::open(
        &gw.config.registry.path,
        sde_gateway::registry::rules::RuleSet::shipped(),
        12,
    )
    .unwrap();
    let sql = "SELECT COUNT(*) AS n FROM patients";

    let all = count(&gw.query_as("alice", PROJECT, sql).await.unwrap());
    near(all, expected(&data.join("patients"), &data.join("opt_outs")).await);

    registry
        .set_grant_version(PROJECT, "patients", Some(&half.manifest.version))
        .unwrap();
    let pinned = count(&gw.query_as("alice", PROJECT, sql).await.unwrap());
    near(pinned, expected(&half.dir, &data.join("opt_outs")).await);
    assert!(
        pinned < all,
        "the pinned version holds fewer people ({pinned} vs {all})"
    );

    registry.set_grant_version(PROJECT, "patients", None).unwrap();
    assert_eq!(count(&gw.query_as("alice", PROJECT, sql).await.unwrap()), all);
}
