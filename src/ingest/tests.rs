//! Ingest end to end on real CSV and Parquet files: pseudonyms link across datasets and runs,
//! nothing identifiable survives, bad rows are quarantined and the identifier scan refuses
//! leftovers.

use std::collections::BTreeSet;
use std::path::Path;

use datafusion::arrow::array::{Date32Array, StringArray};
use datafusion::arrow::util::display::array_value_to_string;

use super::*;

const KEY_A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const KEY_B: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/// Valid NHS numbers (check digits computed), as they might be typed.
const ALICE: &str = "943 476 5919";
const BOB: &str = "4010232137";
const CAROL: &str = "9990000026";

const PEOPLE_CSV: &str = "\
nhs_number,name,date_of_birth,sex,postcode,imd
943 476 5919,Margaret Smith,1950-06-15,F,CM1 2AB,3
4010232137,John Taylor,2001-01-31,M,SS14 3AB,7
9990000026,Olivia Patel,1938-12-31,F,co15 1jt,5
9434765918,Typo Person,1960-01-01,M,CM1 2AB,4
,No Number,1970-01-01,F,CM1 2AB,4
9990000034,Bad Date,1970-02-30,F,CM1 2AB,4
9990000042,Far Away,1970-02-03,F,EH1 1AA,4
";

const PEOPLE_SPEC: &str = r#"
dataset = "people"
input = "raw/people.csv"
extract_date = "2025-12-31"
versions = "versions"
publish = "data"
key_file = "keys/a.key"

[[columns]]
name = "nhs_number"
action = "pseudonymise"

[[columns]]
name = "name"
action = "drop"

[[columns]]
name = "sex"
action = "keep"

[[columns]]
name = "date_of_birth"
action = "generalise"
to = "age"

[[columns]]
name = "date_of_birth"
action = "generalise"
to = "age_band"
output = "age_band"

[[columns]]
name = "date_of_birth"
action = "generalise"
to = "year_of_birth"
output = "year_of_birth"

[[columns]]
name = "postcode"
action = "generalise"
to = "postcode_district"
output = "district"
[columns.map]
CM1 = "Chelmsford"
SS14 = "Basildon"
CO15 = "Tendring"

[[columns]]
name = "imd"
action = "keep"
type = "int32"
output = "imd_decile"
"#;

const EVENTS_SPEC: &str = r#"
dataset = "events"
input = "raw/events.parquet"
extract_date = "2025-12-31"
versions = "versions"
key_file = "keys/a.key"

[[columns]]
name = "nhs"
action = "pseudonymise"

[[columns]]
name = "event_date"
action = "generalise"
to = "month"
output = "event_month"

[[columns]]
name = "code"
action = "keep"
"#;

struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("raw")).unwrap();
        std::fs::create_dir_all(root.join("keys")).unwrap();
        std::fs::write(root.join("keys/a.key"), KEY_A).unwrap();
        std::fs::write(root.join("keys/b.key"), KEY_B).unwrap();
        std::fs::write(root.join("raw/people.csv"), PEOPLE_CSV).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("nhs", DataType::Utf8, true),
            Field::new("event_date", DataType::Date32, false),
            Field::new("code", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec![CAROL, ALICE, ALICE, "1234567890"])),
                Arc::new(Date32Array::from(vec![20_000, 20_010, 20_020, 20_030])),
                Arc::new(StringArray::from(vec!["38341003", "44054006", "44054006", "35489007"])),
            ],
        )
        .unwrap();
        let file = File::create(root.join("raw/events.parquet")).unwrap();
        let mut writer = ArrowWriter::try_new(file, schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        Self { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn ingest(&self, spec: &str, key: &str) -> Result<IngestReport, IngestError> {
        let spec_text = spec.replace("keys/a.key", key);
        let spec = IngestSpec::parse(&spec_text, self.root(), None)?;
        let key = read_key(&spec.key_file)?;
        ingest(&spec, &spec_text, &key, Utc::now())
    }
}

fn read_dir_batches(dir: &Path) -> Vec<RecordBatch> {
    version::parquet_files(dir)
        .unwrap()
        .into_iter()
        .flat_map(|path| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(Result::unwrap)
        })
        .collect()
}

fn column_values(batches: &[RecordBatch], column: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let array = b.column_by_name(column).unwrap();
            (0..array.len())
                .map(|i| array_value_to_string(array, i).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every value of every column, rendered as text, plus the manifest's text.
fn everything_written(dir: &Path) -> String {
    let mut text = std::fs::read_to_string(dir.join(version::MANIFEST)).unwrap();
    for batch in read_dir_batches(dir) {
        for column in batch.columns() {
            for i in 0..column.len() {
                text.push_str(&array_value_to_string(column, i).unwrap());
                text.push('\n');
            }
        }
    }
    text
}

#[test]
fn an_extract_becomes_a_pseudonymised_linked_versioned_dataset() {
    let world = World::new();
    let report = world.ingest(PEOPLE_SPEC, "keys/a.key").unwrap();
    let m = &report.manifest;
    assert_eq!((m.source_rows, m.rows), (7, 3));
    let quarantined: Vec<(&str, u64)> = m.quarantined.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        quarantined,
        [
            ("date_of_birth: not a valid date", 1),
            ("nhs_number: check digit invalid", 1),
            ("nhs_number: missing", 1),
            ("postcode: outside the mapped area", 1),
        ]
    );
    assert_eq!(m.identifiers, ["person_id"]);
    assert_eq!(m.content_hash, content_hash(&report.dir).unwrap());

    let batches = read_dir_batches(&report.dir);
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "person_id",
            "sex",
            "age",
            "age_band",
            "year_of_birth",
            "district",
            "imd_decile"
        ]
    );
    assert_eq!(batches[0].schema().field(6).data_type(), &DataType::Int32);
    assert_eq!(column_values(&batches, "age"), ["75", "24", "87"]);
    assert_eq!(column_values(&batches, "age_band"), ["75-79", "20-24", "85-89"]);
    assert_eq!(
        column_values(&batches, "district"),
        ["Chelmsford", "Basildon", "Tendring"]
    );

    // Nothing identifiable anywhere in the output: no NHS number (in any spacing), name,
    // postcode or full date of birth, in the data or in the manifest.
    let written = everything_written(&report.dir);
    let published = everything_written(report.published.as_ref().unwrap());
    for raw in [
        "9434765919",
        ALICE,
        BOB,
        "9990000026",
        "9434765918",
        "9990000034",
        "9990000042",
        "Margaret",
        "Smith",
        "Taylor",
        "Patel",
        "Typo",
        "CM1 2AB",
        "SS14 3AB",
        "co15 1jt",
        "CO15 1JT",
        "EH1",
        "1950-06-15",
        "2001-01-31",
        "1938-12-31",
        "1970-02-30",
    ] {
        assert!(!written.contains(raw), "{raw} leaked into the output");
        assert!(!published.contains(raw), "{raw} leaked into the published copy");
    }
    // The version is immutable; the published folder is the same bytes.
    assert!(
        std::fs::metadata(report.dir.join(version::MANIFEST))
            .unwrap()
            .permissions()
            .readonly()
    );
    assert_eq!(
        content_hash(report.published.as_ref().unwrap()).unwrap(),
        m.content_hash
    );
    assert_eq!(
        version::read_manifest(report.published.as_ref().unwrap())
            .unwrap()
            .as_ref(),
        Some(m)
    );
}

#[test]
fn the_same_number_links_across_datasets_and_runs_under_one_key_only() {
    let world = World::new();
    let people = world.ingest(PEOPLE_SPEC, "keys/a.key").unwrap();
    let events = world.ingest(EVENTS_SPEC, "keys/a.key").unwrap();
    let again = world.ingest(PEOPLE_SPEC, "keys/a.key").unwrap();
    let other_key = world.ingest(PEOPLE_SPEC, "keys/b.key").unwrap();

    let ids = |report: &IngestReport| column_values(&read_dir_batches(&report.dir), "person_id");
    let (p, e, a, o) = (ids(&people), ids(&events), ids(&again), ids(&other_key));
    // people: alice, bob, carol; events: carol, alice, alice (the bad number quarantined).
    assert_eq!(e, [p[2].clone(), p[0].clone(), p[0].clone()]);
    assert_eq!(p, a, "a second run with the same key gives the same pseudonyms");
    let overlap: BTreeSet<&String> = p.iter().filter(|id| o.contains(id)).collect();
    assert!(overlap.is_empty(), "another key gives other pseudonyms");
    assert_eq!(p[0].len(), nhs::PERSON_ID_LEN);

    // Each run is its own version; the same content gives the same hash.
    assert_ne!(people.dir, again.dir);
    assert_eq!(people.manifest.content_hash, again.manifest.content_hash);
    assert_ne!(people.manifest.content_hash, other_key.manifest.content_hash);
    assert_eq!(
        column_values(&read_dir_batches(&events.dir), "event_month")[0],
        "2024-10-01"
    );
    assert_eq!(events.manifest.quarantined["nhs: check digit invalid"], 1);
}

#[test]
fn the_scan_refuses_a_leftover_nhs_number_column() {
    let world = World::new();
    // The spec keeps a copy of the NHS number under another name.
    let spec = EVENTS_SPEC.replace(
        "[[columns]]\nname = \"code\"",
        "[[columns]]\nname = \"nhs\"\naction = \"keep\"\noutput = \"ref\"\n\n[[columns]]\nname = \"code\"",
    );
    let err = world.ingest(&spec, "keys/a.key").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, IngestError::Identifiers { .. }), "{message}");
    assert!(
        message.contains("dataset events") && message.contains("column ref holds NHS numbers"),
        "{message}"
    );
    assert!(!message.contains(ALICE) && !message.contains("9434765919"), "{message}");
    // Nothing was left behind as a version.
    let versions: Vec<_> = std::fs::read_dir(world.root().join("versions/events"))
        .unwrap()
        .collect();
    assert!(versions.is_empty());
}

#[test]
fn the_scan_refuses_postcodes_hidden_in_free_text() {
    let world = World::new();
    std::fs::write(
        world.root().join("raw/notes.csv"),
        "nhs_number,note\n9434765919,Home visit went well\n4010232137,moved house to SS14 3AB recently\n",
    )
    .unwrap();
    let spec = r#"
dataset = "notes"
input = "raw/notes.csv"
extract_date = "2025-12-31"
versions = "versions"
key_file = "keys/a.key"
[[columns]]
name = "nhs_number"
action = "pseudonymise"
[[columns]]
name = "note"
action = "keep"
"#;
    let err = world.ingest(spec, "keys/a.key").unwrap_err().to_string();
    assert!(err.contains("column note holds full postcodes (1 of 2"), "{err}");
    assert!(!err.contains("SS14"), "{err}");
}

#[test]
fn every_extract_column_must_be_named_and_bad_keys_are_refused() {
    let world = World::new();
    let spec = PEOPLE_SPEC.replace(
        "name = \"name\"\naction = \"drop\"",
        "name = \"sex\"\naction = \"drop\"",
    );
    let spec = spec.replace("[[columns]]\nname = \"sex\"\naction = \"keep\"\n", "");
    let err = world.ingest(&spec, "keys/a.key").unwrap_err().to_string();
    assert!(err.contains("column name is named by no rule"), "{err}");

    std::fs::write(world.root().join("keys/short.key"), "abcd").unwrap();
    let err = world.ingest(PEOPLE_SPEC, "keys/short.key").unwrap_err().to_string();
    assert!(err.contains("at least 32"), "{err}");
}
