//! Safe Data at the door: raw extracts (CSV or Parquet) become pseudonymised, versioned
//! Parquet datasets, so nothing identifiable ever reaches the query engine.
//!
//! An ingest, driven by a spec ([`spec::IngestSpec`]):
//! 1. reads the extract; every column must be named by a rule (keep, drop, pseudonymise,
//!    generalise, identifier), so nothing passes through by default;
//! 2. turns the NHS number into `person_id`, a keyed HMAC-SHA-256 of the normalised,
//!    check-digit-validated number ([`nhs`]), and generalises dates of birth, postcodes and
//!    dates ([`generalise`]);
//! 3. quarantines rows it cannot process safely (missing or invalid NHS number, missing or
//!    invalid values): they are counted by reason in the manifest — never their values — and
//!    kept out of the data;
//! 4. scans the output for direct identifiers ([`scan`]) and refuses the version if any is found;
//! 5. writes a new immutable version with a manifest and content hash ([`version`]), and
//!    publishes it to the served folder if the spec says so.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, NaiveDate, Utc};
use datafusion::arrow;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Builder, Int32Builder, RecordBatch, StringBuilder,
};
use datafusion::arrow::compute::{CastOptions, cast_with_options, filter};
use datafusion::arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};

/// The privacy unit: the pseudonymised person identifier that ingest writes into every dataset.
pub const PERSON_ID: &str = "person_id";

pub mod generalise;
pub mod nhs;
pub mod scan;
pub mod spec;
mod transform;
pub mod version;
use transform::Rows;

pub use version::{Manifest, content_hash};

use nhs::{LinkageKey, Pseudonymiser};
use spec::{Action, ColumnRule, Generalisation, IngestSpec, InputFormat};

/// Rows per batch read from an extract.
const BATCH_ROWS: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest spec: {0}")]
    Spec(String),
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("linkage key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("cannot read the extract {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("extract {path}: {message}")]
    Columns { path: PathBuf, message: String },
    #[error("cannot write the pseudonymised dataset: {0}")]
    Write(String),
    #[error(
        "dataset {dataset} refused by the identifier scan: {findings}. Drop, pseudonymise or generalise \
         the column in the ingest spec, or mark it as an identifier only the engine may use"
    )]
    Identifiers { dataset: String, findings: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |source| IngestError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What an ingest produced.
#[derive(Debug, Clone)]
pub struct IngestReport {
    pub manifest: Manifest,
    /// The new version's folder.
    pub dir: PathBuf,
    /// Where it was published, if it was.
    pub published: Option<PathBuf>,
}

/// Runs the ingest described by the spec file at `path`; `SDE_INGEST__KEY_FILE`, if set,
/// names the key file instead of the spec.
pub fn run(path: &Path) -> Result<IngestReport, IngestError> {
    let (spec, text) = IngestSpec::load(path, std::env::var_os(spec::KEY_FILE_ENV))?;
    let key = read_key(&spec.key_file)?;
    ingest(&spec, &text, &key, Utc::now())
}

/// A short human report of an ingest: the version, rows, throughput and quarantine counts.
pub fn describe(report: &IngestReport, elapsed: std::time::Duration) -> String {
    let m = &report.manifest;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut text = format!(
        "dataset {} version {}\n  content hash {}\n  {} rows read, {} written, {} quarantined in {:.2}s ({:.0} rows/s)\n  version folder {}",
        m.dataset,
        m.version,
        m.content_hash,
        m.source_rows,
        m.rows,
        m.quarantined.values().sum::<u64>(),
        secs,
        m.source_rows as f64 / secs,
        report.dir.display()
    );
    if let Some(published) = &report.published {
        text.push_str(&format!("\n  published to {}", published.display()));
    }
    for (reason, n) in &m.quarantined {
        text.push_str(&format!("\n  quarantined: {reason}: {n}"));
    }
    text
}

/// Reads a hex key file.
pub fn read_key(path: &Path) -> Result<LinkageKey, IngestError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    LinkageKey::from_hex(&text).map_err(|message| IngestError::Key {
        path: path.to_owned(),
        message,
    })
}

/// Ingests `spec` (whose text was `spec_text`) under `key`, as of `now`.
pub fn ingest(
    spec: &IngestSpec,
    spec_text: &str,
    key: &LinkageKey,
    now: DateTime<Utc>,
) -> Result<IngestReport, IngestError> {
    let inputs = input_files(spec)?;
    let plan = Plan::new(spec, &inputs)?;
    let dataset_dir = spec.versions.join(&spec.dataset);
    std::fs::create_dir_all(&dataset_dir).map_err(io(&dataset_dir))?;
    let incoming = dataset_dir.join(format!(".incoming-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&incoming).map_err(io(&incoming))?;
    let result = write_version(spec, spec_text, key, now, &plan, &inputs, &incoming, &dataset_dir);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&incoming);
    }
    let (manifest, dir) = result?;
    let published = match &spec.publish {
        Some(root) => {
            let target = root.join(&spec.dataset);
            version::publish(&dir, &target).map_err(io(&target))?;
            Some(target)
        }
        None => None,
    };
    Ok(IngestReport {
        manifest,
        dir,
        published,
    })
}

#[allow(clippy::too_many_arguments)]
fn write_version(
    spec: &IngestSpec,
    spec_text: &str,
    key: &LinkageKey,
    now: DateTime<Utc>,
    plan: &Plan,
    inputs: &[(PathBuf, InputFormat)],
    incoming: &Path,
    dataset_dir: &Path,
) -> Result<(Manifest, PathBuf), IngestError> {
    let counts = transform_files(plan, inputs, key, incoming)?;
    let identifiers = spec.identifiers();
    let findings = scan::scan_dir(incoming, &identifiers).map_err(|e| IngestError::Write(e.to_string()))?;
    if !findings.is_empty() {
        return Err(IngestError::Identifiers {
            dataset: spec.dataset.clone(),
            findings: findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        });
    }
    let content_hash = content_hash(incoming).map_err(io(incoming))?;
    let version = version::version_id(now, &content_hash);
    let manifest = Manifest {
        dataset: spec.dataset.clone(),
        version: version.clone(),
        content_hash,
        rows: counts.rows_out,
        created: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        spec_hash: hex::encode(Sha256::digest(spec_text.as_bytes())),
        identifiers,
        source_rows: counts.rows_in,
        quarantined: counts.quarantined,
    };
    version::write_manifest(incoming, &manifest).map_err(io(incoming))?;
    for file in std::fs::read_dir(incoming).map_err(io(incoming))? {
        let path = file.map_err(io(incoming))?.path();
        let mut permissions = std::fs::metadata(&path).map_err(io(&path))?.permissions();
        permissions.set_readonly(true);
        std::fs::set_permissions(&path, permissions).map_err(io(&path))?;
    }
    let dir = dataset_dir.join(&version);
    std::fs::rename(incoming, &dir).map_err(io(&dir))?;
    Ok((manifest, dir))
}

/// The extract's files with their formats, in file-name order.
fn input_files(spec: &IngestSpec) -> Result<Vec<(PathBuf, InputFormat)>, IngestError> {
    let format_of = |path: &Path| {
        spec.format.or_else(|| match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Some(InputFormat::Csv),
            Some("parquet") => Some(InputFormat::Parquet),
            _ => None,
        })
    };
    let input = &spec.input;
    let files: Vec<(PathBuf, InputFormat)> = if input.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(io(input))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io(input))?;
        paths.sort();
        paths
            .into_iter()
            .filter_map(|p| {
                let ext_ok = p.extension().is_some_and(|e| e == "csv" || e == "parquet");
                (ext_ok && p.is_file()).then(|| format_of(&p).map(|f| (p, f)))?
            })
            .collect()
    } else {
        let format = format_of(input).ok_or_else(|| {
            IngestError::Spec(format!(
                "cannot tell the format of {}: name it .csv or .parquet, or set `format`",
                input.display()
            ))
        })?;
        std::fs::metadata(input).map_err(io(input))?;
        vec![(input.clone(), format)]
    };
    if files.is_empty() {
        return Err(IngestError::Spec(format!(
            "no CSV or Parquet files in {}",
            input.display()
        )));
    }
    Ok(files)
}

/// The extract's columns as read: CSV columns are all text; Parquet columns keep their types.
fn input_schema(path: &Path, format: InputFormat) -> Result<SchemaRef, IngestError> {
    let read_err = |message: String| IngestError::Read {
        path: path.to_owned(),
        message,
    };
    let file = File::open(path).map_err(io(path))?;
    match format {
        InputFormat::Csv => {
            let (schema, _) = arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(BufReader::new(file), Some(0))
                .map_err(|e| read_err(e.to_string()))?;
            let fields: Vec<Field> = schema
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), DataType::Utf8, true))
                .collect();
            Ok(Arc::new(Schema::new(fields)))
        }
        InputFormat::Parquet => Ok(ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| read_err(e.to_string()))?
            .schema()
            .clone()),
    }
}

/// The batches of one extract file.
fn read_batches(
    path: &Path,
    format: InputFormat,
    schema: &SchemaRef,
) -> Result<Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>, IngestError> {
    let read_err = |message: String| IngestError::Read {
        path: path.to_owned(),
        message,
    };
    let file = File::open(path).map_err(io(path))?;
    Ok(match format {
        InputFormat::Csv => Box::new(
            arrow::csv::ReaderBuilder::new(Arc::clone(schema))
                .with_header(true)
                .with_batch_size(BATCH_ROWS)
                .build(BufReader::with_capacity(1 << 20, file))
                .map_err(|e| read_err(e.to_string()))?,
        ),
        InputFormat::Parquet => Box::new(
            ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| read_err(e.to_string()))?
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| read_err(e.to_string()))?,
        ),
    })
}

/// What one output column is made from.
#[derive(Debug)]
struct Step {
    source: usize,
    rule: ColumnRule,
    field: Field,
}

/// The spec checked against the extract's schema.
#[derive(Debug)]
struct Plan {
    input: SchemaRef,
    steps: Vec<Step>,
    output: SchemaRef,
    extract_date: NaiveDate,
}

impl Plan {
    fn new(spec: &IngestSpec, inputs: &[(PathBuf, InputFormat)]) -> Result<Self, IngestError> {
        let (first, format) = &inputs[0];
        let input = input_schema(first, *format)?;
        for (path, format) in &inputs[1..] {
            if input_schema(path, *format)? != input {
                return Err(IngestError::Columns {
                    path: path.clone(),
                    message: format!("its columns differ from those of {}", first.display()),
                });
            }
        }
        let named = |c: &str| spec.columns.iter().any(|r| r.name == c);
        if let Some(unnamed) = input.fields().iter().find(|f| !named(f.name())) {
            return Err(IngestError::Columns {
                path: first.clone(),
                message: format!(
                    "column {} is named by no rule in the spec; say whether to keep, drop, pseudonymise, \
                     generalise or mark it as an identifier",
                    unnamed.name()
                ),
            });
        }
        let mut steps = Vec::new();
        for rule in spec.columns.iter().filter(|r| r.action != Action::Drop) {
            let source = input.index_of(&rule.name).map_err(|_| IngestError::Columns {
                path: first.clone(),
                message: format!("the spec names column {}, which the extract does not have", rule.name),
            })?;
            let data_type = match (rule.action, rule.to) {
                (Action::Pseudonymise, _) => DataType::Utf8,
                (Action::Generalise, Some(Generalisation::YearOfBirth | Generalisation::Age)) => DataType::Int32,
                (Action::Generalise, Some(Generalisation::AgeBand | Generalisation::PostcodeDistrict)) => {
                    DataType::Utf8
                }
                (Action::Generalise, _) => DataType::Date32,
                _ => rule
                    .data_type
                    .map(|t| t.arrow())
                    .unwrap_or_else(|| input.field(source).data_type().clone()),
            };
            let nullable = rule.nullable && rule.action != Action::Pseudonymise;
            steps.push(Step {
                source,
                field: Field::new(rule.output_name(), data_type, nullable),
                rule: rule.clone(),
            });
        }
        let output = Arc::new(Schema::new(steps.iter().map(|s| s.field.clone()).collect::<Vec<_>>()));
        Ok(Self {
            input,
            steps,
            output,
            extract_date: spec.extract_date,
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    rows_in: u64,
    rows_out: u64,
    quarantined: BTreeMap<String, u64>,
}

/// Transforms every input file into `out/part-NNNN.parquet`, files spread over threads.
fn transform_files(
    plan: &Plan,
    inputs: &[(PathBuf, InputFormat)],
    key: &LinkageKey,
    out: &Path,
) -> Result<Counts, IngestError> {
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(inputs.len());
    let results: Vec<Result<Counts, IngestError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let next = &next;
                scope.spawn(move || {
                    let mut counts = Counts::default();
                    let mut rows = Rows::new(Pseudonymiser::new(key));
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some((path, format)) = inputs.get(k) else { break };
                        let target = out.join(format!("part-{k:04}.parquet"));
                        rows.transform_file(plan, path, *format, &target, &mut counts)?;
                    }
                    Ok(counts)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    let mut total = Counts::default();
    for counts in results {
        let counts = counts?;
        total.rows_in += counts.rows_in;
        total.rows_out += counts.rows_out;
        for (reason, n) in counts.quarantined {
            *total.quarantined.entry(reason).or_default() += n;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
