//! Safe Data at query time. Each project gets a DataFusion [`SessionContext`] whose catalogue
//! holds only its granted datasets, each exposing only its granted columns. Every scan of a
//! granted table removes the people on the opt-out register (an anti-join on `person_id`) and
//! keeps only the project's cohort, *under* the scan, so no query — however written — sees an
//! opted-out person or one outside the cohort. The opt-out register itself is never registered
//! in any catalogue, so it cannot be named in SQL.
//!
//! Nothing unscanned is served: every dataset folder is checked when it is opened. A folder
//! with a manifest (written by `ingest`) must match its content hash, or it is refused; every
//! folder's schema and a sample of its values go through the identifier scan, and a column
//! that looks like a direct identifier refuses the dataset unless it is marked as an
//! identifier (in the manifest or the config), which the policy then treats like `person_id`.
//! [`Engine::snapshot`] names the version and content hash of each dataset served.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{Expr, JoinType, LogicalPlanBuilder, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::ingest::{scan, version};
use crate::registry::ProjectAccess;

pub mod capped;
mod guarded;
pub mod overflow;
mod served;
mod session;
mod store;
pub use guarded::GuardedTable;
use guarded::join_people;
pub mod total;

pub use store::LocalStore;

pub use crate::ingest::PERSON_ID;
/// The dataset holding the opt-out register. Never queryable.
pub const OPT_OUTS: &str = "opt_outs";
/// The dataset a project's cohort predicate is written against.
pub const POPULATION: &str = "patients";
/// Catalogue and schema under which a project's tables are listed.
pub const CATALOG: &str = "sde";
pub const SCHEMA: &str = "public";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("data folder {0} has no opt-out register ({OPT_OUTS}/); refusing to serve data without it")]
    NoOptOuts(String),
    #[error("cannot open dataset {dataset}: {source}")]
    Dataset { dataset: String, source: DataFusionError },
    #[error("cannot read data folder {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("project grants dataset {0}, which is not loaded")]
    UnknownDataset(String),
    #[error("project grants column {dataset}.{column}, which does not exist")]
    UnknownColumn { dataset: String, column: String },
    #[error("dataset {0} has no {PERSON_ID} column, so people cannot be counted in it")]
    NoPersonId(String),
    #[error("the project's cohort filter is not valid: {0}")]
    Cohort(DataFusionError),
    #[error("query execution failed: {0}")]
    Execution(DataFusionError),
    #[error("dataset {dataset}: its files do not match its manifest ({detail}); refusing to serve it")]
    Tampered { dataset: String, detail: String },
    #[error(
        "dataset {dataset} refused by the identifier scan: {findings}. Re-ingest it with the column dropped, \
         pseudonymised or generalised, or mark the column as an identifier"
    )]
    Identifiers { dataset: String, findings: String },
    #[error("project grants version {version} of dataset {dataset}, which is not kept in the versions folder")]
    UnknownVersion { dataset: String, version: String },
}

/// Which bytes a dataset is: the version id (from the manifest, or `unversioned-…` for a
/// folder without one) and the SHA-256 content hash of its Parquet files
/// ([`crate::ingest::content_hash`]). Audit records carry it so replay reads the same data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatasetVersion {
    pub version: String,
    pub content_hash: String,
}

/// A checked dataset folder, ready to be opened.
struct Checked {
    version: DatasetVersion,
    /// Identifier columns the manifest marks (besides `person_id`).
    identifiers: Vec<String>,
}

/// Verifies a dataset folder against its manifest (if any) and runs the identifier scan.
fn check_folder(dataset: &str, dir: &Path, config_identifiers: &[String]) -> Result<Checked, EngineError> {
    let tampered = |detail: String| EngineError::Tampered {
        dataset: dataset.to_owned(),
        detail,
    };
    let io = |source| EngineError::Io {
        path: dir.display().to_string(),
        source,
    };
    let manifest = version::read_manifest(dir).map_err(|e| tampered(format!("unreadable manifest: {e}")))?;
    let content_hash = version::content_hash(dir).map_err(io)?;
    let (version, identifiers) = match manifest {
        Some(m) if m.dataset != dataset => return Err(tampered(format!("manifest names dataset {}", m.dataset))),
        Some(m) if m.content_hash != content_hash => return Err(tampered("content hash differs".into())),
        Some(m) => (m.version, m.identifiers),
        None => (format!("unversioned-{}", &content_hash[..12]), vec![]),
    };
    let mut exempt = vec![PERSON_ID.to_owned()];
    exempt.extend(config_identifiers.iter().cloned());
    exempt.extend(identifiers.iter().cloned());
    let findings = scan::scan_dir(dir, &exempt).map_err(|e| EngineError::Dataset {
        dataset: dataset.to_owned(),
        source: DataFusionError::ParquetError(Box::new(e)),
    })?;
    if !findings.is_empty() {
        return Err(EngineError::Identifiers {
            dataset: dataset.to_owned(),
            findings: findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        });
    }
    Ok(Checked {
        version: DatasetVersion { version, content_hash },
        identifiers: identifiers.into_iter().filter(|c| c != PERSON_ID).collect(),
    })
}

/// Sub-folders of `dir` not starting with `.`, by name.
fn sub_folders(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, EngineError> {
    let io = |source| EngineError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().map_err(io)?.is_dir() && !name.starts_with('.') {
            folders.push((name, entry.path()));
        }
    }
    folders.sort();
    Ok(folders)
}

/// Checks folders in parallel (hashing and scanning are the slow part of opening).
fn check_all(
    folders: &[(String, std::path::PathBuf)],
    identifiers: &BTreeMap<String, Vec<String>>,
) -> Vec<Result<Checked, EngineError>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = folders
            .iter()
            .map(|(dataset, dir)| {
                let config = identifiers.get(dataset).map(Vec::as_slice).unwrap_or_default();
                scope.spawn(move || check_folder(dataset, dir, config))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

/// The loaded datasets; shared by every project's session.
#[derive(Debug)]
pub struct Engine {
    datasets: BTreeMap<String, Arc<ListingTable>>,
    opt_outs: Arc<ListingTable>,
    /// Per dataset, columns besides `person_id` that are identifiers (config and manifests).
    identifiers: BTreeMap<String, Vec<String>>,
    /// Version and content hash of each dataset in the data folder, `opt_outs` included.
    snapshot: BTreeMap<String, DatasetVersion>,
    /// Kept versions, by (dataset, version id), for grants that name a version.
    versions: BTreeMap<(String, String), (Arc<ListingTable>, DatasetVersion)>,
    /// The folder of each (dataset, version id) opened, to hash again for replay.
    folders: BTreeMap<(String, String), std::path::PathBuf>,
    /// Copies without opted-out people, by (dataset, content hash of the version copied).
    served: BTreeMap<(String, String), served::Served>,
    /// The cap on values growing functions make (`limits.max_value_bytes`, see [`capped`]).
    max_value_bytes: usize,
    /// The key that seeds the noise of sums and means, handed to every session.
    perturbation_key: Option<Arc<crate::disclosure::PerturbationKey>>,
}

impl Engine {
    /// Opens every sub-folder of `dir` as a Parquet dataset. `opt_outs/` must exist.
    /// `identifiers` names, per dataset, the columns besides `person_id` that are identifiers.
    pub async fn open(dir: &Path, identifiers: &BTreeMap<String, Vec<String>>) -> Result<Self, EngineError> {
        Self::open_with_versions(dir, None, identifiers).await
    }

    /// As [`Engine::open`], also opening the kept versions under `versions`
    /// (`<versions>/<dataset>/<version>/`) for grants that name one.
    pub async fn open_with_versions(
        dir: &Path,
        versions: Option<&Path>,
        identifiers: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, EngineError> {
        let ctx = SessionContext::new();
        let mut datasets = BTreeMap::new();
        let mut opt_outs = None;
        let mut snapshot = BTreeMap::new();
        let mut identifiers = identifiers.clone();
        let mut folders = BTreeMap::new();
        let served = sub_folders(dir)?;
        let checked = check_all(&served, &identifiers);
        for ((name, path), checked) in served.into_iter().zip(checked) {
            let checked = checked?;
            let table = open_listing(&ctx, &path).await.map_err(|source| EngineError::Dataset {
                dataset: name.clone(),
                source,
            })?;
            if table.schema().field_with_name(PERSON_ID).is_err() {
                return Err(EngineError::NoPersonId(name));
            }
            add_identifiers(&mut identifiers, &name, checked.identifiers);
            folders.insert((name.clone(), checked.version.version.clone()), path);
            snapshot.insert(name.clone(), checked.version);
            if name == OPT_OUTS {
                opt_outs = Some(table);
            } else {
                datasets.insert(name, table);
            }
        }
        let opt_outs = opt_outs.ok_or_else(|| EngineError::NoOptOuts(dir.display().to_string()))?;
        check_columns(&datasets, &identifiers)?;
        let mut engine = Self {
            datasets,
            opt_outs,
            identifiers,
            snapshot,
            versions: BTreeMap::new(),
            folders,
            served: BTreeMap::new(),
            max_value_bytes: crate::config::LimitsConfig::default().max_value_bytes,
            perturbation_key: None,
        };
        if let Some(versions) = versions {
            engine.open_versions(&ctx, versions).await?;
        }
        Ok(engine)
    }

    /// Opens `<versions>/<dataset>/<version>/` for every dataset served. A version that is the
    /// one served reuses its table; the others are verified and scanned like the data folder.
    async fn open_versions(&mut self, ctx: &SessionContext, root: &Path) -> Result<(), EngineError> {
        let mut folders = Vec::new();
        for (dataset, dataset_dir) in sub_folders(root)? {
            if !self.datasets.contains_key(&dataset) {
                continue;
            }
            for (version, dir) in sub_folders(&dataset_dir)? {
                if self.snapshot.get(&dataset).is_some_and(|s| s.version == version) {
                    let table = Arc::clone(&self.datasets[&dataset]);
                    self.versions
                        .insert((dataset.clone(), version), (table, self.snapshot[&dataset].clone()));
                } else {
                    folders.push((dataset.clone(), version, dir));
                }
            }
        }
        let named: Vec<(String, std::path::PathBuf)> =
            folders.iter().map(|(d, _, dir)| (d.clone(), dir.clone())).collect();
        let checked = check_all(&named, &self.identifiers);
        for ((dataset, version, dir), checked) in folders.into_iter().zip(checked) {
            let checked = checked?;
            if checked.version.version != version {
                return Err(EngineError::Tampered {
                    dataset,
                    detail: format!("folder {version} holds version {}", checked.version.version),
                });
            }
            let table = open_listing(ctx, &dir).await.map_err(|source| EngineError::Dataset {
                dataset: dataset.clone(),
                source,
            })?;
            if table.schema().field_with_name(PERSON_ID).is_err() {
                return Err(EngineError::NoPersonId(dataset));
            }
            add_identifiers(&mut self.identifiers, &dataset, checked.identifiers);
            self.folders.insert((dataset.clone(), version.clone()), dir);
            self.versions.insert((dataset, version), (table, checked.version));
        }
        Ok(())
    }

    /// Serves every dataset version opened from a copy under `dir` with the people on the
    /// opt-out register already removed (see [`served`]), built now where missing, instead of
    /// removing them beneath every scan. `sort_by` names, per dataset, the columns its copy is
    /// sorted by.
    pub async fn serve_from(
        mut self,
        dir: &Path,
        sort_by: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, EngineError> {
        check_columns(&self.datasets, sort_by)?;
        let opt_outs_hash = self.snapshot[OPT_OUTS].content_hash.clone();
        let mut tables: Vec<(String, Arc<ListingTable>, String)> = self
            .datasets
            .iter()
            .map(|(d, t)| (d.clone(), Arc::clone(t), self.snapshot[d].content_hash.clone()))
            .collect();
        for ((dataset, _), (table, version)) in &self.versions {
            tables.push((dataset.clone(), Arc::clone(table), version.content_hash.clone()));
        }
        for (dataset, table, hash) in tables {
            if self.served.contains_key(&(dataset.clone(), hash.clone())) {
                continue;
            }
            let source = served::Source {
                dataset: &dataset,
                table: &table,
                hash: &hash,
                sort_by: sort_by.get(&dataset).map(Vec::as_slice).unwrap_or_default(),
            };
            let copy = served::ensure(dir, source, &self.opt_outs, &opt_outs_hash).await?;
            self.served.insert((dataset, hash), copy);
        }
        let in_use = self.served_dirs();
        served::touch(&in_use);
        let removed = served::prune(dir, &in_use, served::UNUSED_FOR);
        if removed > 0 {
            tracing::info!(removed, "unused served copies removed");
        }
        Ok(self)
    }

    fn served_dirs(&self) -> Vec<std::path::PathBuf> {
        self.served.values().map(|s| s.dir.clone()).collect()
    }

    /// Runs for as long as the gateway does, marking its served copies as in use every hour,
    /// so that another gateway sharing the folder does not remove them.
    pub fn keep_served_copies(&self) -> impl Future<Output = ()> + Send + 'static {
        let in_use = self.served_dirs();
        async move {
            let mut every = tokio::time::interval(served::TOUCH_EVERY);
            loop {
                every.tick().await;
                served::touch(&in_use);
            }
        }
    }

    /// What a session scans for `dataset`: the served copy if there is one (opted-out people
    /// already removed, and whether it has one row per person), else the version itself with
    /// the opt-out register still to remove beneath every scan.
    fn source_for(&self, access: &ProjectAccess, dataset: &str) -> Result<Source, EngineError> {
        let (table, version) = self.table_for(access, dataset)?;
        Ok(match self.served.get(&(dataset.to_owned(), version.content_hash)) {
            Some(copy) => Source {
                table: Arc::clone(&copy.table) as _,
                opt_outs: None,
                most_rows_per_person: copy.most_rows_per_person,
            },
            None => Source {
                table: Arc::clone(table) as _,
                opt_outs: Some(Arc::clone(&self.opt_outs) as _),
                most_rows_per_person: None,
            },
        })
    }

    /// Version and content hash of each dataset served as the latest, `opt_outs` included.
    pub fn snapshot(&self) -> &BTreeMap<String, DatasetVersion> {
        &self.snapshot
    }

    /// The versions a project's session reads: each granted dataset (at its granted version)
    /// and the opt-out register.
    pub fn snapshot_for(&self, access: &ProjectAccess) -> Result<BTreeMap<String, DatasetVersion>, EngineError> {
        let mut out = BTreeMap::new();
        for dataset in access.grants.keys() {
            out.insert(dataset.clone(), self.table_for(access, dataset)?.1);
        }
        if let Some(opt_outs) = self.snapshot.get(OPT_OUTS) {
            out.insert(OPT_OUTS.to_owned(), opt_outs.clone());
        }
        Ok(out)
    }

    /// The table a project reads for `dataset`: the version its grant names, else the latest.
    fn table_for(
        &self,
        access: &ProjectAccess,
        dataset: &str,
    ) -> Result<(&Arc<ListingTable>, DatasetVersion), EngineError> {
        match access.versions.get(dataset) {
            Some(version) => self
                .versions
                .get(&(dataset.to_owned(), version.clone()))
                .map(|(table, v)| (table, v.clone()))
                .ok_or_else(|| EngineError::UnknownVersion {
                    dataset: dataset.to_owned(),
                    version: version.clone(),
                }),
            None => {
                let table = self
                    .datasets
                    .get(dataset)
                    .ok_or_else(|| EngineError::UnknownDataset(dataset.to_owned()))?;
                Ok((table, self.snapshot[dataset].clone()))
            }
        }
    }

    /// What an audit record names for each dataset behind a project's result: `version@hash`,
    /// as opened (the version a grant names, else the latest; the opt-out register included).
    /// The population table, which a cohort filter reads, is included as served.
    pub fn fingerprints(&self, access: &ProjectAccess) -> Result<BTreeMap<String, String>, EngineError> {
        let mut read = self.snapshot_for(access)?;
        if let Some(population) = self.snapshot.get(POPULATION) {
            read.entry(POPULATION.to_owned()).or_insert_with(|| population.clone());
        }
        Ok(read
            .into_iter()
            .map(|(dataset, v)| (dataset, format!("{}@{}", v.version, v.content_hash)))
            .collect())
    }

    /// The fingerprint of `dataset` as `access` would read it, with the content hash computed
    /// from the files on disk now, so a replay notices data changed under a running gateway.
    /// `None` if the dataset or its version is no longer there.
    pub fn fingerprint_now(&self, access: &ProjectAccess, dataset: &str) -> Option<String> {
        // Granted datasets at their granted version; others (the opt-out register, the population
        // a cohort reads) as served.
        let version = match self.table_for(access, dataset) {
            Ok((_, version)) if access.grants.contains_key(dataset) => version,
            _ => self.snapshot.get(dataset)?.clone(),
        };
        let folder = self.folders.get(&(dataset.to_owned(), version.version.clone()))?;
        let hash = version::content_hash(folder).ok()?;
        Some(format!("{}@{hash}", version.version))
    }

    pub fn dataset_names(&self) -> impl Iterator<Item = &str> {
        self.datasets.keys().map(String::as_str)
    }

    /// Sets the cap on values growing functions make (`limits.max_value_bytes`).
    pub fn with_max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Sets the key that seeds the noise of sums and means (`disclosure.perturbation_key`).
    pub fn with_perturbation_key(mut self, key: crate::disclosure::PerturbationKey) -> Self {
        self.perturbation_key = Some(Arc::new(key));
        self
    }
}

/// Refuses a config naming, per dataset, columns (identifiers, sort columns) of a dataset that
/// is not served or that it does not have.
fn check_columns(
    datasets: &BTreeMap<String, Arc<ListingTable>>,
    columns: &BTreeMap<String, Vec<String>>,
) -> Result<(), EngineError> {
    for (dataset, columns) in columns {
        let table = datasets
            .get(dataset)
            .ok_or_else(|| EngineError::UnknownDataset(dataset.clone()))?;
        if let Some(column) = columns.iter().find(|c| table.schema().field_with_name(c).is_err()) {
            return Err(EngineError::UnknownColumn {
                dataset: dataset.clone(),
                column: column.clone(),
            });
        }
    }
    Ok(())
}

/// Adds manifest-marked identifiers to the config's, without repeats.
fn add_identifiers(identifiers: &mut BTreeMap<String, Vec<String>>, dataset: &str, more: Vec<String>) {
    if more.is_empty() {
        return;
    }
    let columns = identifiers.entry(dataset.to_owned()).or_default();
    for column in more {
        if !columns.contains(&column) {
            columns.push(column);
        }
    }
}

/// The Parquet files directly in `dir`, as a listing table to configure.
fn listing(dir: &Path) -> DFResult<ListingTableConfig> {
    let url = ListingTableUrl::parse(dir.to_string_lossy())?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    Ok(ListingTableConfig::new(url).with_listing_options(options))
}

async fn open_listing(ctx: &SessionContext, dir: &Path) -> DFResult<Arc<ListingTable>> {
    let config = listing(dir)?.infer_schema(&ctx.state()).await?;
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// As [`open_listing`], with the schema given rather than read from the files (a folder may
/// hold none: a served copy of a dataset whose every person opted out).
fn open_listing_as(dir: &Path, schema: SchemaRef) -> DFResult<Arc<ListingTable>> {
    Ok(Arc::new(ListingTable::try_new(listing(dir)?.with_schema(schema))?))
}

/// What a session scans for one dataset ([`Engine::source_for`]).
struct Source {
    table: Arc<dyn TableProvider>,
    opt_outs: Option<Arc<dyn TableProvider>>,
    most_rows_per_person: Option<u64>,
}

#[derive(Debug, Clone)]
struct Cohort {
    /// Predicate over the population table's columns.
    expr: Expr,
    population: Arc<dyn TableProvider>,
}

#[cfg(test)]
mod dataset_tests;
