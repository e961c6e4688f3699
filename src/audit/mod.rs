//! The audit log, first cut: an append-only file of JSON lines, each record holding the hash of
//! the one before (a hash chain), written and synced to disk *before* the result it describes is
//! released. If a record cannot be made durable, the caller releases nothing.
//!
//! `verify` re-reads a log and names the first record whose content or link does not match, so
//! editing, deleting, reordering or truncating in the middle is detected.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const LOG_FILE: &str = "audit.log";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log {path} is damaged at record {seq}: {reason}")]
    Damaged { path: PathBuf, seq: u64, reason: String },
    #[error("the audit writer is unavailable: {0}")]
    Unavailable(String),
}

/// What happened, as told by the caller. The log adds sequence, time and chain.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The call: `query.plan`, `query.release`, `metadata.tables`, `handshake`, …
    pub call: String,
    pub user: Option<String>,
    pub organisation: Option<String>,
    pub roles: Vec<String>,
    pub project: Option<String>,
    pub sql: Option<String>,
    /// `accepted`, `refused` or `failed`.
    pub decision: String,
    /// The rule behind a refusal (or the disclosure rules applied to a release).
    pub rule: Option<String>,
    /// SHA-256 of the released result (Arrow IPC bytes).
    pub result_hash: Option<String>,
    pub rows: Option<u64>,
    pub groups_withheld: Option<u64>,
    pub cells_withheld: Option<u64>,
    pub duration_ms: Option<u64>,
    /// SHA-256 of the access rules (Cedar policies and schema) in force.
    #[serde(default)]
    pub policy_hash: Option<String>,
    /// What an administrative change asked for (its request, as JSON).
    #[serde(default)]
    pub detail: Option<String>,
    /// The approved client tool the call came from (subject CN of its mutual-TLS certificate).
    /// Left out of the record when there is none, so records written before this field existed
    /// hash the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tool: Option<String>,
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

fn record_hash(seq: u64, time: &str, prev_hash: &str, entry: &Entry) -> String {
    let body = serde_json::to_vec(&(seq, time, prev_hash, entry)).expect("entry serialises");
    hex::encode(Sha256::digest(body))
}

struct Writer {
    file: File,
    next_seq: u64,
    last_hash: String,
}

/// The append-only, hash-chained log.
#[derive(Clone)]
pub struct AuditLog {
    path: PathBuf,
    writer: Arc<Mutex<Writer>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("path", &self.path).finish()
    }
}

impl AuditLog {
    /// Opens the log in `dir`, verifying the existing chain to find where to continue.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let path = dir.join(LOG_FILE);
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let (next_seq, last_hash) = if path.exists() {
            let records = verify(&path)?;
            records
                .last()
                .map(|r| (r.seq + 1, r.hash.clone()))
                .unwrap_or((0, GENESIS.to_owned()))
        } else {
            (0, GENESIS.to_owned())
        };
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        Ok(Self {
            path,
            writer: Arc::new(Mutex::new(Writer {
                file,
                next_seq,
                last_hash,
            })),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entry` and syncs it to disk; returns only once the record is durable.
    pub fn append_blocking(&self, entry: Entry) -> Result<Receipt, AuditError> {
        let mut w = self
            .writer
            .lock()
            .map_err(|_| AuditError::Unavailable("writer lock poisoned".into()))?;
        let seq = w.next_seq;
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let hash = record_hash(seq, &time, &w.last_hash, &entry);
        let record = Record {
            seq,
            time,
            prev_hash: w.last_hash.clone(),
            entry,
            hash: hash.clone(),
        };
        let mut line = serde_json::to_vec(&record).expect("record serialises");
        line.push(b'\n');
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        w.file.write_all(&line).map_err(io)?;
        w.file.sync_data().map_err(io)?;
        w.next_seq = seq + 1;
        w.last_hash = hash.clone();
        Ok(Receipt { seq, hash })
    }

    /// Appends without blocking the async runtime.
    pub async fn append(&self, entry: Entry) -> Result<Receipt, AuditError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(entry))
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?
    }
}

/// Reads and checks a whole log: every record's hash, its link to the one before and its
/// sequence number. Returns the records, or the first damaged one.
pub fn verify(path: &Path) -> Result<Vec<Record>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let damaged = |seq, reason: String| AuditError::Damaged {
        path: path.to_owned(),
        seq,
        reason,
    };
    let mut records: Vec<Record> = Vec::new();
    let mut prev = GENESIS.to_owned();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let seq = i as u64;
        let line = line.map_err(|source| AuditError::Io {
            path: path.to_owned(),
            source,
        })?;
        let record: Record = serde_json::from_slice(&line)
            .map_err(|e| damaged(seq, format!("unreadable record (torn write or edit): {e}")))?;
        if record.seq != seq {
            return Err(damaged(seq, format!("sequence number {} out of order", record.seq)));
        }
        if record.prev_hash != prev {
            return Err(damaged(seq, "does not link to the record before it".into()));
        }
        if record_hash(record.seq, &record.time, &record.prev_hash, &record.entry) != record.hash {
            return Err(damaged(seq, "content does not match its hash".into()));
        }
        prev = record.hash.clone();
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> Entry {
        Entry {
            call: "query.release".into(),
            decision: "accepted".into(),
            rows: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn chain_survives_reopen_and_detects_edits_deletions_and_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        for n in 0..3 {
            log.append_blocking(entry(n)).unwrap();
        }
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append_blocking(entry(3)).unwrap().seq, 3);
        let path = dir.path().join(LOG_FILE);
        assert_eq!(verify(&path).unwrap().len(), 4);

        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();
        let check = |text: String| {
            std::fs::write(&path, text).unwrap();
            verify(&path).unwrap_err().to_string()
        };
        assert!(check(original.replace("\"rows\":1", "\"rows\":9")).contains("record 1"));
        assert!(check([lines[0], lines[2], lines[3]].join("\n")).contains("record 1"));
        assert!(check([lines[0], lines[2], lines[1], lines[3]].join("\n")).contains("record 1"));
        assert!(check(format!("{}\n{}", lines[0], &lines[1][..10])).contains("record 1"));
    }
}
