//! The audit log: an append-only file of JSON lines. A record is synced to disk before what it
//! describes is released; if it cannot be made durable, the caller releases nothing. The one
//! record that may wait for the next fsync ([`Durability::Deferred`]) is a result's hand-over,
//! which the durable record of its execution already describes: it is written before the rows
//! leave and synced within `deferred_sync`.
//!
//! Tamper evidence comes in two layers. Each record holds its SHA-256 hash and the hash of the
//! one before (a hash chain), so `verify` names the first record whose content, order or link is
//! wrong. The record hashes are also the leaves of an RFC 6962 Merkle tree whose size and root
//! are signed (Ed25519) in checkpoints, every `checkpoint_records` records or `checkpoint_seconds`
//! and at shutdown; holding only the public key, an auditor detects any edit, deletion,
//! reordering or truncation of signed records, and checks inclusion and consistency proofs.
//!
//! Appends go through one writer thread that drains a queue, writes every waiting record, syncs
//! once and only then answers every waiter (group commit), so concurrent queries share an fsync.
//! After a crash, a torn last record (never acknowledged) is moved aside, reported in the server
//! log and recorded in the log itself; damage anywhere else stops the gateway from starting.

pub mod checkpoint;
mod result;
mod verify;
mod writer;
pub use verify::{Verified, verify, verify_dir};
use verify::{check_checkpoints, scan, scan_checkpoints, set_aside};

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use checkpoint::Tree;
pub use checkpoint::{Checkpoint, PublicKey, SigningKey};
pub use result::result_hash;

pub const LOG_FILE: &str = "audit.log";
pub const CHECKPOINT_FILE: &str = "checkpoints.log";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log {path} is damaged at record {seq}: {reason}")]
    Damaged { path: PathBuf, seq: u64, reason: String },
    #[error("audit checkpoint {index} in {path} is bad: {reason}")]
    BadCheckpoint {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("audit signing key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the audit writer is unavailable: {0}")]
    Unavailable(String),
}

/// What happened, as told by the caller. The log adds sequence, time and chain.
///
/// Optional fields added after the first release are left out of the record when empty, so the
/// hashes of records written before them still verify.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The call: `query.plan`, `query.release`, `metadata.tables`, `handshake`, …
    pub call: String,
    pub user: Option<String>,
    pub organisation: Option<String>,
    pub roles: Vec<String>,
    /// The approved client tool the call came from (subject CN of its mutual-TLS certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tool: Option<String>,
    pub project: Option<String>,
    pub sql: Option<String>,
    /// SHA-256 of the optimised logical plan (its indented display).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// SHA-256 of the access rules in force (the Cedar policies and schema, `config/policies/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// The data the query read: dataset → `version@content-hash` ([`crate::engine::Engine::fingerprints`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub snapshot: std::collections::BTreeMap<String, String>,
    /// `accepted`, `refused` or `failed`.
    pub decision: String,
    /// The rule behind a refusal (or the disclosure rules applied to a release, as JSON).
    pub rule: Option<String>,
    /// SHA-256 of the released result ([`crate::gateway::result_hash`]).
    pub result_hash: Option<String>,
    pub rows: Option<u64>,
    pub groups_withheld: Option<u64>,
    pub cells_withheld: Option<u64>,
    /// Cells an executed query released (or, refused for not fitting in its project's release
    /// budget, spent), charged to that budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cells_released: Option<u64>,
    pub duration_ms: Option<u64>,
    /// What an administrative change asked for (its request, as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A record as stored: the entry plus its place in the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    pub prev_hash: String,
    #[serde(flatten)]
    pub entry: Entry,
    pub hash: String,
}

/// Proof of a record's place in the log, returned to the client with a released result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub hash: String,
}

/// Cells charged per project by the `query.execute` and `release.publish` (a reviewed release,
/// [`crate::review`]) records among `records`: released by the accepted ones, spent by those
/// refused for not fitting. The release records that repeat an
/// execution at DoGet are not counted again.
fn released_cells(records: &[Record]) -> std::collections::BTreeMap<String, u64> {
    let mut released = std::collections::BTreeMap::new();
    for r in records {
        let e = &r.entry;
        if let ("query.execute" | "release.publish", Some(project), Some(cells)) =
            (e.call.as_str(), &e.project, e.cells_released)
        {
            *released.entry(project.clone()).or_insert(0u64) += cells;
        }
    }
    released
}

fn record_hash(seq: u64, time: &str, prev_hash: &str, entry: &Entry) -> String {
    let body = serde_json::to_vec(&(seq, time, prev_hash, entry)).expect("entry serialises");
    hex::encode(Sha256::digest(body))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// When an appended record must be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before the caller hears back (sharing the fsync with every record waiting then).
    Now,
    /// Written before the caller hears back (so it outlives a crash of the gateway, though not a
    /// power cut), and synced by the next fsync, at most [`Options::deferred_sync`] later, and
    /// before any checkpoint signs it. For a record whose call releases nothing that an earlier
    /// durable record does not already describe: the hand-over of a result recorded at execution.
    Deferred,
}

/// How the log is written.
#[derive(Debug, Clone)]
pub struct Options {
    pub checkpoint_records: u64,
    pub checkpoint_interval: Duration,
    /// Most records per fsync; 1 disables group commit.
    pub max_batch: usize,
    /// Longest a [`Durability::Deferred`] record waits for its fsync; zero syncs it at once.
    pub deferred_sync: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(60),
            max_batch: 512,
            deferred_sync: Duration::from_millis(5),
        }
    }
}

impl From<&crate::config::AuditConfig> for Options {
    fn from(c: &crate::config::AuditConfig) -> Self {
        Self {
            checkpoint_records: c.checkpoint_records,
            checkpoint_interval: Duration::from_secs(c.checkpoint_seconds),
            max_batch: c.max_batch,
            deferred_sync: Duration::from_millis(c.delivery_sync_ms),
        }
    }
}

/// What readers share with the writer: the tree, where each record starts, the checkpoints.
struct State {
    tree: Tree,
    /// Byte offset of each record; the last element is the end of the written log.
    offsets: Vec<u64>,
    checkpoints: Vec<Checkpoint>,
    /// How many records are durable (the rest are deferred ones awaiting their fsync).
    durable: u64,
}

/// The append-only, checkpointed log. Clones share one writer.
#[derive(Clone)]
pub struct AuditLog {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    tx: mpsc::Sender<writer::Msg>,
    public_key: PublicKey,
    /// Cells charged to each project's executed queries, as the log stood when opened.
    released: Arc<std::collections::BTreeMap<String, u64>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("path", &self.path).finish()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

impl AuditLog {
    /// Opens the log in `dir` with default options.
    pub fn open(dir: &Path, key: SigningKey) -> Result<Self, AuditError> {
        Self::open_with(dir, key, Options::default())
    }

    /// Opens the log in `dir`: checks the whole log against its checkpoints (refusing a damaged
    /// or truncated log), moves a torn last record aside and records that it did, signs a
    /// checkpoint over anything not yet covered, and starts the writer.
    pub fn open_with(dir: &Path, key: SigningKey, options: Options) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOG_FILE);
        let ckpt_path = dir.join(CHECKPOINT_FILE);
        let public_key = key.public_key();
        let scan = scan(&path)?;
        let torn = match &scan.torn {
            Some(torn) => Some(set_aside(&path, scan.end, torn)?),
            None => None,
        };
        let ckpts = scan_checkpoints(&ckpt_path)?;
        if let Some(t) = &ckpts.torn {
            set_aside(&ckpt_path, ckpts.end, t)?;
        }
        check_checkpoints(&ckpt_path, &scan.tree, &ckpts.checkpoints, Some(&public_key))?;
        let released = Arc::new(released_cells(&scan.records));
        let (next_seq, last_hash) = scan
            .records
            .last()
            .map(|r| (r.seq + 1, r.hash.clone()))
            .unwrap_or((0, GENESIS.to_owned()));
        let state = Arc::new(Mutex::new(State {
            durable: scan.tree.len(),
            tree: scan.tree,
            offsets: scan.offsets,
            checkpoints: ckpts.checkpoints,
        }));
        let mut writer = writer::Writer::new(&path, &ckpt_path, key, options, Arc::clone(&state), next_seq, last_hash)?;
        if let Some(note) = torn {
            writer.append_now(Entry {
                call: "audit.recovery".into(),
                decision: "recovered".into(),
                rule: Some(note),
                ..Default::default()
            })?;
        }
        writer.checkpoint()?;
        let tx = writer::start(writer).map_err(io(&path))?;
        Ok(Self {
            path,
            state,
            tx,
            public_key,
            released,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    fn request<T>(&self, make: impl FnOnce(writer::Reply<T>) -> writer::Msg) -> Result<T, AuditError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?;
        rx.blocking_recv()
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }

    async fn request_async<T>(&self, make: impl FnOnce(writer::Reply<T>) -> writer::Msg) -> Result<T, AuditError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?;
        rx.await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }

    /// Appends `entry`; returns only once the record is durable. Not for async contexts.
    pub fn append_blocking(&self, entry: Entry) -> Result<Receipt, AuditError> {
        self.request(|reply| writer::Msg::Append(Box::new(entry), Durability::Now, reply))
    }

    /// Appends `entry`; completes only once the record is durable (sharing an fsync with every
    /// other record waiting at the time).
    pub async fn append(&self, entry: Entry) -> Result<Receipt, AuditError> {
        self.append_as(entry, Durability::Now).await
    }

    /// Appends `entry`; completes once the record is written, or durable, as `durability` says.
    pub async fn append_as(&self, entry: Entry, durability: Durability) -> Result<Receipt, AuditError> {
        self.request_async(|reply| writer::Msg::Append(Box::new(entry), durability, reply))
            .await
    }

    /// Queues `entry` without waiting for it to be durable: for a call abandoned half-way (the
    /// client went away), where nobody is left to wait and nothing is released. Works outside an
    /// async context too (from a `Drop`).
    pub fn append_detached(&self, entry: Entry) {
        let (reply, _) = tokio::sync::oneshot::channel();
        if self
            .tx
            .send(writer::Msg::Append(Box::new(entry), Durability::Now, reply))
            .is_err()
        {
            tracing::error!("an abandoned call could not be recorded: the audit writer has stopped");
        }
    }

    /// Signs a checkpoint over every durable record now (if any is not yet covered).
    pub fn checkpoint_blocking(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.request(writer::Msg::Checkpoint)
    }

    /// Signs a final checkpoint and stops the writer; later appends fail (nothing is released).
    pub async fn close(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.request_async(writer::Msg::Close).await
    }

    /// Cells charged to each project (`cells_released` of its `query.execute` records), as the
    /// log stood when opened: what the release budgets ([`crate::budget`]) start from.
    pub fn released_cells(&self) -> &std::collections::BTreeMap<String, u64> {
        &self.released
    }

    /// Number of records written (deferred ones may not be durable yet).
    pub fn len(&self) -> u64 {
        self.state.lock().expect("audit state").tree.len()
    }

    /// Number of durable records: [`Self::len`] less the deferred ones awaiting their fsync.
    pub fn durable_len(&self) -> u64 {
        self.state.lock().expect("audit state").durable
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.state.lock().expect("audit state").checkpoints.last().cloned()
    }

    /// The checkpoint of exactly `size` records, if one was signed.
    pub fn checkpoint_of(&self, size: u64) -> Option<Checkpoint> {
        let state = self.state.lock().expect("audit state");
        state.checkpoints.iter().rev().find(|c| c.size == size).cloned()
    }

    /// Inclusion proof of record `seq` in the tree of `size` records.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Option<Vec<String>> {
        let state = self.state.lock().expect("audit state");
        (seq < size && size <= state.tree.len()).then(|| checkpoint::prove_inclusion(&state.tree, seq, size))
    }

    /// Consistency proof from the tree of `old` records to that of `new` records.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Option<Vec<String>> {
        let state = self.state.lock().expect("audit state");
        if old == 0 || old > new || new > state.tree.len() {
            return None;
        }
        Some(if old == new {
            Vec::new()
        } else {
            checkpoint::prove_consistency(&state.tree, old, new)
        })
    }

    /// Reads durable records from `from` on, in order, keeping those `keep` accepts, at most
    /// `limit`. Each is checked against its leaf in the tree as it is read.
    pub fn read(&self, from: u64, limit: usize, keep: impl Fn(&Record) -> bool) -> Result<Vec<Record>, AuditError> {
        let (start, end, leaves) = {
            let state = self.state.lock().expect("audit state");
            let n = state.tree.len();
            if from >= n {
                return Ok(Vec::new());
            }
            (
                state.offsets[from as usize],
                state.offsets[n as usize],
                state.tree.items()[from as usize..].to_vec(),
            )
        };
        let mut file = File::open(&self.path).map_err(io(&self.path))?;
        file.seek(SeekFrom::Start(start)).map_err(io(&self.path))?;
        let reader = BufReader::new(file.take(end - start));
        let mut out = Vec::new();
        for (line, leaf) in reader.split(b'\n').zip(leaves) {
            let line = line.map_err(io(&self.path))?;
            let record: Record = serde_json::from_slice(&line).map_err(|e| AuditError::Damaged {
                path: self.path.clone(),
                seq: from,
                reason: format!("unreadable after it was written: {e}"),
            })?;
            if checkpoint::leaf(&record.hash) != Some(leaf)
                || record_hash(record.seq, &record.time, &record.prev_hash, &record.entry) != record.hash
            {
                return Err(AuditError::Damaged {
                    path: self.path.clone(),
                    seq: record.seq,
                    reason: "changed on disk after it was written".into(),
                });
            }
            if keep(&record) {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One record, checked against the tree.
    pub fn record(&self, seq: u64) -> Result<Option<Record>, AuditError> {
        Ok(self.read(seq, 1, |_| true)?.into_iter().next().filter(|r| r.seq == seq))
    }
}

#[cfg(test)]
mod tests;
