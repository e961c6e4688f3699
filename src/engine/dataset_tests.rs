//! The engine serves only checked datasets: manifests verified, identifiers scanned, versions
//! pinned by grants honoured. Built with the real ingest on real CSV and Parquet files.

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use parquet::arrow::ArrowWriter;

use super::*;
use crate::ingest::{self, IngestReport, spec::IngestSpec};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn spec(dataset: &str, extra_rules: &str) -> String {
    format!(
        r#"
dataset = "{dataset}"
input = "raw/{dataset}.csv"
extract_date = "2025-12-31"
versions = "versions"
publish = "data"
key_file = "key"
[[columns]]
name = "nhs_number"
action = "pseudonymise"
{extra_rules}"#
    )
}

const PEOPLE_RULES: &str = r#"
[[columns]]
name = "household"
action = "identifier"
[[columns]]
name = "sex"
action = "keep"
"#;

/// Ingests `rows` (CSV text without header) as `dataset` in `root`.
fn ingest_csv(root: &Path, dataset: &str, header: &str, rows: &str, rules: &str) -> IngestReport {
    std::fs::create_dir_all(root.join("raw")).unwrap();
    std::fs::write(root.join("key"), KEY).unwrap();
    std::fs::write(root.join(format!("raw/{dataset}.csv")), format!("{header}\n{rows}")).unwrap();
    let text = spec(dataset, rules);
    let spec = IngestSpec::parse(&text, root, None).unwrap();
    ingest::ingest(
        &spec,
        &text,
        &ingest::read_key(&spec.key_file).unwrap(),
        chrono::Utc::now(),
    )
    .unwrap()
}

const PEOPLE_V1: &str = "9434765919,H1,F\n4010232137,H1,M\n9990000026,H2,F\n";
const PEOPLE_V2: &str = "9434765919,H1,F\n4010232137,H1,M\n9990000026,H2,F\n9990000034,H3,M\n9990000042,H3,F\n";

/// A data folder with `people` (two versions) and `opt_outs` (one person).
fn world(root: &Path) -> (IngestReport, IngestReport) {
    let header = "nhs_number,household,sex";
    let v1 = ingest_csv(root, "people", header, PEOPLE_V1, PEOPLE_RULES);
    let v2 = ingest_csv(root, "people", header, PEOPLE_V2, PEOPLE_RULES);
    ingest_csv(root, OPT_OUTS, "nhs_number", "9990000042\n", "");
    (v1, v2)
}

fn access(versions: &[(&str, &str)]) -> ProjectAccess {
    ProjectAccess {
        project: "p".into(),
        grants: BTreeMap::from([("people".to_owned(), vec![PERSON_ID.to_owned(), "sex".to_owned()])]),
        cohort: None,
        disclosure: Default::default(),
        versions: versions.iter().map(|(d, v)| (d.to_string(), v.to_string())).collect(),
    }
}

async fn count_people(engine: &Engine, access: &ProjectAccess) -> i64 {
    let ctx = engine.session(access).unwrap();
    let batches = ctx
        .sql("SELECT COUNT(*) FROM people")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[tokio::test]
async fn the_snapshot_names_each_served_version_and_grants_can_pin_an_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (v1, v2) = world(root);
    let engine = Engine::open_with_versions(&root.join("data"), Some(&root.join("versions")), &BTreeMap::new())
        .await
        .unwrap();
    let people = &engine.snapshot()["people"];
    assert_eq!(people.version, v2.manifest.version);
    assert_eq!(people.content_hash, v2.manifest.content_hash);
    assert_eq!(
        people.content_hash,
        ingest::content_hash(&root.join("data/people")).unwrap()
    );
    assert!(engine.snapshot().contains_key(OPT_OUTS));

    // Latest: five people, one opted out. Pinned to v1: three people.
    assert_eq!(count_people(&engine, &access(&[])).await, 4);
    let pinned = access(&[("people", &v1.manifest.version)]);
    assert_eq!(count_people(&engine, &pinned).await, 3);
    assert_eq!(
        engine.snapshot_for(&pinned).unwrap()["people"].version,
        v1.manifest.version
    );
    assert_eq!(
        engine.snapshot_for(&access(&[])).unwrap()["people"].version,
        v2.manifest.version
    );

    let unknown = access(&[("people", "20200101T000000000Z-000000000000")]);
    assert!(matches!(
        engine.session(&unknown),
        Err(EngineError::UnknownVersion { .. })
    ));
    // Without the versions folder, a pinned grant cannot be served.
    let latest_only = Engine::open(&root.join("data"), &BTreeMap::new()).await.unwrap();
    assert!(matches!(
        latest_only.session(&pinned),
        Err(EngineError::UnknownVersion { .. })
    ));
}

#[tokio::test]
async fn manifest_marked_identifiers_are_identifiers_for_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    world(root);
    let engine = Engine::open(&root.join("data"), &BTreeMap::new()).await.unwrap();
    let mut access = access(&[]);
    access.grants.get_mut("people").unwrap().push("household".into());
    let ctx = engine.session(&access).unwrap();
    let table = ctx.table_provider("people").await.unwrap();
    let guarded = GuardedTable::as_guarded(table.as_ref()).unwrap();
    assert!(guarded.is_identifier("household"));
    assert!(!guarded.is_identifier("sex"));
    let plan = ctx
        .state()
        .create_logical_plan("SELECT household, COUNT(*) FROM people GROUP BY household")
        .await
        .unwrap();
    let refused = crate::policy::check(plan, crate::disclosure::Rules::DEFAULT, None)
        .err()
        .unwrap();
    assert!(refused.to_string().contains("safe-outputs/identifiers"), "{refused}");
    let plan = ctx
        .state()
        .create_logical_plan("SELECT sex, COUNT(*) FROM people GROUP BY sex")
        .await
        .unwrap();
    let key = std::sync::Arc::new(crate::disclosure::PerturbationKey::from_bytes([1; 32]));
    assert!(crate::policy::check(plan, crate::disclosure::Rules::DEFAULT, Some(key)).is_ok());
}

#[tokio::test]
async fn a_folder_whose_files_do_not_match_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    world(root);
    let people = root.join("data/people");
    let part = crate::ingest::version::parquet_files(&people).unwrap()[0].clone();
    std::fs::copy(&part, people.join("part-9999.parquet")).unwrap();
    let err = Engine::open(&root.join("data"), &BTreeMap::new()).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::Tampered { dataset, .. } if dataset == "people"),
        "{err}"
    );
}

#[tokio::test]
async fn a_dataset_with_direct_identifiers_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Folders without manifests, as an operator might copy them in by hand.
    let write = |dataset: &str, columns: Vec<(&str, Vec<&str>)>| {
        std::fs::create_dir_all(data.join(dataset)).unwrap();
        let fields: Vec<Field> = columns
            .iter()
            .map(|(n, _)| Field::new(*n, DataType::Utf8, false))
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let arrays = columns
            .into_iter()
            .map(|(_, v)| Arc::new(StringArray::from(v)) as Arc<dyn Array>)
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
        let file = std::fs::File::create(data.join(dataset).join("part-0.parquet")).unwrap();
        let mut writer = ArrowWriter::try_new(file, schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };
    write(OPT_OUTS, vec![(PERSON_ID, vec!["a"])]);
    write(
        "contacts",
        vec![
            (PERSON_ID, vec!["a", "b"]),
            ("contact", vec!["none", "x.y@example.org"]),
        ],
    );
    let err = Engine::open(&data, &BTreeMap::new()).await.unwrap_err().to_string();
    assert!(
        err.contains("dataset contacts refused") && err.contains("column contact holds email addresses"),
        "{err}"
    );
    assert!(!err.contains("example.org"), "{err}");
    // Marked as an identifier in the config, the column is exempt (and policed as one).
    let marked = BTreeMap::from([("contacts".to_owned(), vec!["contact".to_owned()])]);
    let engine = Engine::open(&data, &marked).await.unwrap();
    assert!(engine.snapshot()["contacts"].version.starts_with("unversioned-"));
}

/// The engine over `root`'s data and versions, served from copies in `root/served`.
async fn open_served(root: &Path) -> Engine {
    Engine::open_with_versions(&root.join("data"), Some(&root.join("versions")), &BTreeMap::new())
        .await
        .unwrap()
        .serve_from(&root.join("served"), &BTreeMap::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn served_copies_leave_out_opted_out_people_and_are_rebuilt_when_they_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (v1, v2) = world(root);
    let visits = "[[columns]]\nname = \"clinic\"\naction = \"keep\"\n";
    // Two visits of one person: not one row per person.
    ingest_csv(
        root,
        "visits",
        "nhs_number,clinic",
        "9434765919,A\n9434765919,B\n4010232137,A\n",
        visits,
    );
    // Every person opted out: an empty copy, still served.
    ingest_csv(root, "lonely", "nhs_number,clinic", "9990000042,A\n", visits);
    let served = root.join("served");
    let open = || open_served(root);
    let engine = open().await;
    let pinned = access(&[("people", &v1.manifest.version)]);
    assert_eq!(count_people(&engine, &access(&[])).await, 4);
    assert_eq!(count_people(&engine, &pinned).await, 3);

    // The copy of the latest version: five people less the one opted out, one row each.
    let copy = served.join("people").join(format!(
        "{}-{}-v7",
        &v2.manifest.content_hash[..16],
        &engine.snapshot()[OPT_OUTS].content_hash[..16]
    ));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy.join("_served.json")).unwrap()).unwrap();
    assert_eq!((record["rows"].as_u64(), record["people"].as_u64()), (Some(4), Some(4)));
    assert_eq!(record["most_rows_per_person"].as_u64(), Some(1));
    let guarded = |engine: &Engine, access: &ProjectAccess, dataset: &str| {
        let ctx = engine.session(access).unwrap();
        let table = futures::executor::block_on(ctx.table_provider(dataset)).unwrap();
        GuardedTable::as_guarded(table.as_ref()).unwrap().most_rows_per_person()
    };
    assert_eq!(guarded(&engine, &access(&[]), "people"), Some(1));
    let mut to_visits = access(&[]);
    to_visits.grants = BTreeMap::from([("visits".to_owned(), vec![PERSON_ID.to_owned(), "clinic".to_owned()])]);
    // Two rows of one person: the most any person has.
    assert_eq!(guarded(&engine, &to_visits, "visits"), Some(2));
    let mut to_lonely = access(&[]);
    to_lonely.grants = BTreeMap::from([("lonely".to_owned(), vec![PERSON_ID.to_owned(), "clinic".to_owned()])]);
    let ctx = engine.session(&to_lonely).unwrap();
    let rows = ctx
        .sql("SELECT COUNT(*) FROM lonely")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(rows[0].column(0).as_primitive::<Int64Type>().value(0), 0);
    // Without served copies nothing is known about rows per person.
    let plain = Engine::open(&root.join("data"), &BTreeMap::new()).await.unwrap();
    assert_eq!(guarded(&plain, &access(&[]), "people"), None);

    // A copy edited after it was written is not served: it is rebuilt from the checked source.
    let part = crate::ingest::version::parquet_files(&copy).unwrap()[0].clone();
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[8] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    let engine = open().await;
    assert_eq!(count_people(&engine, &access(&[])).await, 4);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy.join("_served.json")).unwrap()).unwrap();
    assert_eq!(
        record["content_hash"].as_str().unwrap(),
        crate::ingest::version::content_hash(&copy).unwrap()
    );
}

#[tokio::test]
async fn served_copies_are_sorted_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    world(root);
    let open = |sort_by: BTreeMap<String, Vec<String>>| async move {
        Engine::open(&root.join("data"), &BTreeMap::new())
            .await
            .unwrap()
            .serve_from(&root.join("served"), &sort_by)
            .await
    };
    let sorted = open(BTreeMap::from([("people".to_owned(), vec!["sex".to_owned()])]))
        .await
        .unwrap();
    let copy = sorted
        .served_dirs()
        .into_iter()
        .find(|d| d.starts_with(root.join("served/people")))
        .unwrap();
    // The rows, in the order written: F, F, M, M (the source has them mixed).
    let mut sexes = vec![];
    for part in crate::ingest::version::parquet_files(&copy).unwrap() {
        let file = std::fs::File::open(part).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let sex = datafusion::arrow::compute::cast(batch.column_by_name("sex").unwrap(), &DataType::Utf8).unwrap();
            sexes.extend(sex.as_string::<i32>().iter().map(|s| s.unwrap().to_owned()));
        }
    }
    assert_eq!(sexes, ["F", "F", "M", "M"]);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy.join("_served.json")).unwrap()).unwrap();
    assert_eq!(record["sort_by"], serde_json::json!(["sex"]));
    assert_eq!(count_people(&sorted, &access(&[])).await, 4);
    // Unsorted, it is another copy; sorted by what the dataset does not have, none is served.
    let unsorted = open(BTreeMap::new()).await.unwrap();
    assert!(!unsorted.served_dirs().contains(&copy));
    let unknown = open(BTreeMap::from([("people".to_owned(), vec!["age".to_owned()])])).await;
    assert!(matches!(unknown, Err(EngineError::UnknownColumn { .. })), "{unknown:?}");
    let unknown = open(BTreeMap::from([("nobody".to_owned(), vec!["sex".to_owned()])])).await;
    assert!(matches!(unknown, Err(EngineError::UnknownDataset(_))), "{unknown:?}");
}

#[tokio::test]
async fn served_copies_nobody_uses_are_removed_after_a_day() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    world(root);
    let served = root.join("served");
    let open = || open_served(root);
    let engine = open().await;
    let in_use = engine.served_dirs();
    assert!(!in_use.is_empty());
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
    let age = |dir: &std::path::Path, when: std::time::SystemTime| {
        std::fs::File::options()
            .append(true)
            .open(dir.join("_served.json"))
            .unwrap()
            .set_modified(when)
            .unwrap();
    };
    let people = served.join("people");
    let fake = |name: &str| {
        let d = people.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("_served.json"), "{}").unwrap();
        d
    };
    let old = fake("0000000000000000-0000000000000000-v3");
    age(&old, two_days_ago);
    let recent = fake("1111111111111111-1111111111111111-v4");
    let stale = fake(".stale-interrupted");
    let building = fake(".tmp-building");
    // Copies in use are kept however old their mark, and marked again.
    age(&in_use[0], two_days_ago);

    let engine = open().await;
    assert_eq!(engine.served_dirs(), in_use);
    assert!(in_use.iter().all(|d| d.exists()));
    assert!(!old.exists(), "a copy unused for two days is removed");
    assert!(!stale.exists(), "leftovers of a removal are removed");
    assert!(recent.exists() && building.exists(), "recently used copies are kept");
    let marked = std::fs::metadata(in_use[0].join("_served.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(marked > two_days_ago + std::time::Duration::from_secs(3600));
    assert_eq!(count_people(&engine, &access(&[])).await, 4);
}
