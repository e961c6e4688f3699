//! Datasets as served: each dataset version with the people on the opt-out register already
//! removed, written once per (dataset version, opt-out register version) into the configured
//! `data.served` folder, so queries do not pay an anti-join under every scan.
//!
//! A copy is derived only from data the engine has verified and scanned, and is checked again
//! at every start: its record (`_served.json`) must name the source's and the register's
//! content hashes, and its own files must still hash to what the record says. Anything else is
//! rebuilt. The record also holds facts the policy relies on: whether every row has a
//! `person_id`, and the most rows any one person has, so that a count of rows tells at least
//! how many people are behind it (all of them, where no person has two rows).
//!
//! Copies do not pile up: a gateway touches the records of the copies it serves at start and
//! every hour, and at start removes the copies nobody has touched for a day (those of an older
//! opt-out register or dataset version, or of an older format), with any leftovers of
//! interrupted builds. Gateways sharing the folder keep each other's copies while they run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::catalog::TableProvider;
use datafusion::common::Column;
use datafusion::config::TableParquetOptions;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::provider_as_source;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::functions_aggregate::expr_fn::{count, max, sum};
use datafusion::logical_expr::{Expr, JoinType, LogicalPlanBuilder};
use datafusion::prelude::{DataFrame, SessionContext, col, lit, when};

use super::{EngineError, PERSON_ID, join_people, open_listing_as};
use crate::ingest::version;
use sha2::{Digest, Sha256};

const RECORD: &str = "_served.json";
/// How copies are written; a copy in another format is rebuilt. Format 7: Snappy, as the ingest
/// writes, except `person_id`, stored without compression (random pseudonyms barely compress,
/// and every query that counts people reads them) but dictionary-encoded, as a person's rows
/// repeat the pseudonym, with dictionary pages of up to [`DICTIONARY_BYTES`] (format 4 had
/// the default 1 MiB); the record holds the most rows one person has (format 5 did not) and
/// the columns the copy is sorted by (format 6 was never sorted).
const FORMAT: u32 = 7;
/// Rows per row group of a sorted copy (written as one file): several row groups, so that a
/// scan still spreads over the cores, each covering a narrow range of the sort, so that a
/// filter on the sort columns skips the others by their statistics.
const SORTED_ROW_GROUP_ROWS: usize = 256 * 1024;
/// Largest dictionary page: a row group's pseudonyms fit in it (up to 1M rows of 32-character
/// pseudonyms, 32 MiB), so `person_id` stays dictionary-encoded throughout instead of falling
/// back to plain strings after the first 1 MiB (DataFusion's default), and is read as indices
/// into one dictionary.
const DICTIONARY_BYTES: usize = 48 << 20;

/// A copy whose record nobody has touched for this long is removed at start.
pub(crate) const UNUSED_FOR: Duration = Duration::from_secs(24 * 3600);
/// How often a running gateway touches the records of the copies it serves.
pub(crate) const TOUCH_EVERY: Duration = Duration::from_secs(3600);

/// What was written, checked again at every start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    #[serde(default)]
    format: u32,
    dataset: String,
    source_hash: String,
    opt_outs_hash: String,
    /// Content hash of the copy's own Parquet files.
    content_hash: String,
    rows: u64,
    /// The columns the copy is sorted by (none: the source's order).
    #[serde(default)]
    sort_by: Vec<String>,
    /// Rows with a `person_id`, distinct `person_id`s, and the most rows any one of them has.
    rows_with_person: u64,
    people: u64,
    most_rows_per_person: u64,
}

/// A dataset version as served.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub dir: PathBuf,
    pub table: Arc<ListingTable>,
    /// Where every row has a `person_id`: the most rows any one person has (1: no two rows
    /// share one).
    pub most_rows_per_person: Option<u64>,
}

/// A dataset version to serve.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    pub dataset: &'a str,
    pub table: &'a Arc<ListingTable>,
    /// Its content hash.
    pub hash: &'a str,
    /// The columns its copy is sorted by.
    pub sort_by: &'a [String],
}

/// Opens the served copy of `source` under `root`, building it first if it is missing or does
/// not match.
pub(crate) async fn ensure(
    root: &Path,
    source: Source<'_>,
    opt_outs: &Arc<ListingTable>,
    opt_outs_hash: &str,
) -> Result<Served, EngineError> {
    let Source { dataset, hash, .. } = source;
    let mut name = format!("{}-{}-v{FORMAT}", &hash[..16], &opt_outs_hash[..16]);
    // Copies sorted otherwise are other copies (gateways sharing the folder may differ).
    if !source.sort_by.is_empty() {
        let digest = Sha256::digest(source.sort_by.join("\n"));
        name.push_str(&format!("-s{}", hex::encode(&digest[..4])));
    }
    let dir = root.join(dataset).join(name);
    let wanted = |r: &Record| {
        r.format == FORMAT
            && r.dataset == dataset
            && r.source_hash == hash
            && r.opt_outs_hash == opt_outs_hash
            && r.sort_by == source.sort_by
    };
    let record = match check(&dir)? {
        Some(record) if wanted(&record) => record,
        stale => {
            if stale.is_some() || dir.exists() {
                tracing::warn!(dataset, dir = %dir.display(), "served copy does not match; rebuilding it");
                // If another gateway removed it already, so much the better.
                let _ = remove(&dir);
            }
            build(&dir, source, opt_outs, opt_outs_hash).await?
        }
    };
    let table = open_listing_as(&dir, source.table.schema()).map_err(|source| EngineError::Dataset {
        dataset: dataset.to_owned(),
        source,
    })?;
    Ok(Served {
        dir,
        table,
        // With no rows at all, every row is a different person.
        most_rows_per_person: (record.rows_with_person == record.rows).then_some(record.most_rows_per_person.max(1)),
    })
}

/// Marks the copies in `dirs` as in use now.
pub(crate) fn touch(dirs: &[PathBuf]) {
    for dir in dirs {
        let touched = std::fs::File::options()
            .append(true)
            .open(dir.join(RECORD))
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::warn!(dir = %dir.display(), error = %e, "could not mark a served copy as in use");
        }
    }
}

/// Removes the copies under `root` that are not in `in_use` and were not touched for
/// `unused_for`, and the leftovers of interrupted builds; returns how many were removed.
pub(crate) fn prune(root: &Path, in_use: &[PathBuf], unused_for: Duration) -> usize {
    let folders = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for dataset in folders(root) {
        for copy in folders(&dataset) {
            let name = copy
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let touched = std::fs::metadata(copy.join(RECORD))
                .or_else(|_| std::fs::metadata(&copy))
                .and_then(|m| m.modified())
                .unwrap_or(now);
            let unused = now.duration_since(touched).unwrap_or_default() >= unused_for;
            if in_use.contains(&copy) || !(unused || name.starts_with(".stale-")) {
                continue;
            }
            match remove(&copy) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(dir = %copy.display(), error = %e, "could not remove an unused served copy"),
            }
        }
    }
    removed
}

/// Removes a copy: moved aside first (atomically), so that another gateway sharing the folder
/// never opens half of it.
fn remove(copy: &Path) -> std::io::Result<()> {
    let aside = copy.with_file_name(format!(".stale-{}", uuid::Uuid::new_v4()));
    std::fs::rename(copy, &aside)?;
    std::fs::remove_dir_all(&aside)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The copy's record if the folder holds one and its files still hash to it.
fn check(dir: &Path) -> Result<Option<Record>, EngineError> {
    let Ok(text) = std::fs::read_to_string(dir.join(RECORD)) else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_str::<Record>(&text) else {
        return Ok(None);
    };
    let hash = version::content_hash(dir).map_err(io(dir))?;
    Ok((hash == record.content_hash).then_some(record))
}

/// Writes the copy into a temporary sibling folder, then renames it into place (another
/// process building the same copy at once loses the race harmlessly).
async fn build(
    dir: &Path,
    source: Source<'_>,
    opt_outs: &Arc<ListingTable>,
    opt_outs_hash: &str,
) -> Result<Record, EngineError> {
    let dataset = source.dataset;
    let started = std::time::Instant::now();
    let parent = dir.parent().expect("a served copy has a dataset folder");
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp: PathBuf = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    // Made first: with no rows left, nothing is written and the copy is an empty folder.
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let written = async {
        let Facts {
            rows,
            rows_with_person,
            people,
            most_rows_per_person,
        } = write(&tmp, source, opt_outs)
            .await
            .map_err(|source| EngineError::Dataset {
                dataset: dataset.to_owned(),
                source,
            })?;
        let record = Record {
            format: FORMAT,
            dataset: dataset.to_owned(),
            source_hash: source.hash.to_owned(),
            opt_outs_hash: opt_outs_hash.to_owned(),
            content_hash: version::content_hash(&tmp).map_err(io(&tmp))?,
            rows,
            sort_by: source.sort_by.to_vec(),
            rows_with_person,
            people,
            most_rows_per_person,
        };
        let text = serde_json::to_string_pretty(&record).expect("record serialises");
        std::fs::write(tmp.join(RECORD), text).map_err(io(&tmp))?;
        Ok(record)
    };
    // Whatever fails, no half-written folder is left behind.
    let record = match written.await {
        Ok(record) => record,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let (rows, people) = (record.rows, record.people);
    if std::fs::rename(&tmp, dir).is_err() {
        // Built meanwhile by another process: keep theirs if it checks out.
        let _ = std::fs::remove_dir_all(&tmp);
        return check(dir)?.ok_or_else(|| EngineError::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other("could not put the served copy in place"),
        });
    }
    tracing::info!(
        dataset,
        rows,
        people,
        ms = started.elapsed().as_millis() as u64,
        "served copy written"
    );
    Ok(record)
}

/// What a copy holds, as its record tells the policy.
struct Facts {
    rows: u64,
    rows_with_person: u64,
    people: u64,
    most_rows_per_person: u64,
}

/// Writes `source` without the people of `opt_outs` as Parquet into `dir`, sorted as it asks,
/// and counts what it wrote.
async fn write(dir: &Path, source: Source<'_>, opt_outs: &Arc<ListingTable>) -> DFResult<Facts> {
    let Source { dataset, table, .. } = source;
    let ctx = SessionContext::new();
    let opt_outs = Arc::clone(opt_outs) as _;
    let scan = LogicalPlanBuilder::scan(dataset, provider_as_source(Arc::clone(table) as _), None)?;
    // An anti-join keeps exactly the source's columns.
    let mut plan = join_people(scan, dataset, &opt_outs, None, JoinType::LeftAnti)?;
    if !source.sort_by.is_empty() {
        plan = plan.sort(
            source
                .sort_by
                .iter()
                .map(|c| Expr::Column(Column::from_name(c)).sort(true, false)),
        )?;
    }
    let plan = plan.build()?;
    let path = format!("{}/", dir.display());
    // Snappy, as the ingest writes (cheaper to decode than DataFusion's default, zstd); the
    // pseudonyms uncompressed.
    let mut parquet = TableParquetOptions::default();
    parquet.global.compression = Some("snappy".into());
    parquet.global.dictionary_page_size_limit = DICTIONARY_BYTES;
    if !source.sort_by.is_empty() {
        parquet.global.max_row_group_size = SORTED_ROW_GROUP_ROWS;
    }
    let plain = datafusion::config::ParquetColumnOptions {
        compression: Some("uncompressed".into()),
        ..Default::default()
    };
    parquet.column_specific_options.insert(PERSON_ID.to_owned(), plain);
    DataFrame::new(ctx.state(), plan)
        .write_parquet(
            &path,
            DataFrameWriteOptions::new().with_single_file_output(false),
            Some(parquet),
        )
        .await?;

    let copy = open_listing_as(dir, table.schema())?;
    // One pass: the rows of each person (NULL: the rows without one), then summed up.
    let has_person = col(PERSON_ID).is_not_null();
    let of_people = |e| when(has_person.clone(), e).end();
    let facts = ctx
        .read_table(copy)?
        .aggregate(vec![col(PERSON_ID)], vec![count(lit(1)).alias("n")])?
        .aggregate(
            vec![],
            vec![
                coalesce(vec![sum(col("n")), lit(0i64)]).alias("rows"),
                coalesce(vec![sum(of_people(col("n"))?), lit(0i64)]).alias("rows_with_person"),
                count(col(PERSON_ID)).alias("people"),
                max(of_people(col("n"))?).alias("most"),
            ],
        )?
        .collect()
        .await?;
    // A missing figure is an error, never zero: zero rows and zero people would read as one
    // row per person. Only the most rows per person is NULL, where there is nobody.
    let value = |i: usize| {
        facts
            .first()
            .and_then(|b| b.column(i).as_primitive_opt::<Int64Type>())
            .filter(|a| a.len() == 1)
            .map(|a| a.is_valid(0).then(|| a.value(0) as u64))
            .ok_or_else(|| DataFusionError::Internal(format!("served copy {dataset}: no count {i}")))
    };
    let known = |i: usize| {
        value(i)?.ok_or_else(|| DataFusionError::Internal(format!("served copy {dataset}: a NULL count {i}")))
    };
    Ok(Facts {
        rows: known(0)?,
        rows_with_person: known(1)?,
        people: known(2)?,
        most_rows_per_person: value(3)?.unwrap_or(0),
    })
}
