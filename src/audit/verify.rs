//! Reading a log back: the scan of its records and checkpoints at open (a torn tail set aside),
//! and offline verification of a whole log folder with only the public key. Appending stays in
//! [`super`] and its writer.

use super::*;

/// Bytes after the last complete record: a write the crash cut short.
pub(super) struct Torn {
    pub(super) bytes: Vec<u8>,
}

pub(super) struct Scan {
    pub(super) records: Vec<Record>,
    pub(super) tree: Tree,
    pub(super) offsets: Vec<u64>,
    pub(super) end: u64,
    pub(super) torn: Option<Torn>,
}

/// Reads a log: every record's hash, its link to the one before and its sequence number. Bytes
/// after the last newline are a torn write, returned apart; damage anywhere else is an error.
pub(super) fn scan(path: &Path) -> Result<Scan, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(path)(e)),
    };
    let damaged = |seq, reason: String| AuditError::Damaged {
        path: path.to_owned(),
        seq,
        reason,
    };
    let mut scan = Scan {
        records: Vec::new(),
        tree: Tree::new(),
        offsets: vec![0],
        end: 0,
        torn: None,
    };
    let mut prev = GENESIS.to_owned();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let seq = scan.records.len() as u64;
        let Some(newline) = rest.iter().position(|b| *b == b'\n') else {
            scan.torn = Some(Torn { bytes: rest.to_vec() });
            break;
        };
        let line = &rest[..newline];
        rest = &rest[newline + 1..];
        let record: Record = serde_json::from_slice(line)
            .map_err(|e| damaged(seq, format!("unreadable record (edited or corrupted): {e}")))?;
        if record.seq != seq {
            return Err(damaged(seq, format!("sequence number {} out of order", record.seq)));
        }
        if record.prev_hash != prev {
            return Err(damaged(seq, "does not link to the record before it".into()));
        }
        if record_hash(record.seq, &record.time, &record.prev_hash, &record.entry) != record.hash {
            return Err(damaged(seq, "content does not match its hash".into()));
        }
        let leaf = checkpoint::leaf(&record.hash).ok_or_else(|| damaged(seq, "malformed hash".into()))?;
        scan.tree.push(leaf);
        scan.end += newline as u64 + 1;
        scan.offsets.push(scan.end);
        prev = record.hash.clone();
        scan.records.push(record);
    }
    Ok(scan)
}

/// Moves a torn tail aside (to `<file>.torn-<offset>`), truncates the file to its last complete
/// line and says so loudly; returns the note recorded in the log.
pub(super) fn set_aside(path: &Path, end: u64, torn: &Torn) -> Result<String, AuditError> {
    let aside = PathBuf::from(format!("{}.torn-{end}", path.display()));
    std::fs::write(&aside, &torn.bytes).map_err(io(&aside))?;
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io(path))?;
    file.set_len(end).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    let note = format!(
        "torn last write after byte {end} of {}: {} bytes (sha256 {}) moved to {}; it was never acknowledged, so nothing it describes was released",
        path.display(),
        torn.bytes.len(),
        hex::encode(Sha256::digest(&torn.bytes)),
        aside.display()
    );
    tracing::error!(%note, "audit log recovered after a crash");
    Ok(note)
}

pub(super) struct CheckpointScan {
    pub(super) checkpoints: Vec<Checkpoint>,
    pub(super) end: u64,
    pub(super) torn: Option<Torn>,
}

pub(super) fn scan_checkpoints(path: &Path) -> Result<CheckpointScan, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(path)(e)),
    };
    let mut out = CheckpointScan {
        checkpoints: Vec::new(),
        end: 0,
        torn: None,
    };
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let Some(newline) = rest.iter().position(|b| *b == b'\n') else {
            out.torn = Some(Torn { bytes: rest.to_vec() });
            break;
        };
        let c: Checkpoint = serde_json::from_slice(&rest[..newline]).map_err(|e| AuditError::BadCheckpoint {
            path: path.to_owned(),
            index: out.checkpoints.len(),
            reason: format!("unreadable: {e}"),
        })?;
        out.checkpoints.push(c);
        out.end += newline as u64 + 1;
        rest = &rest[newline + 1..];
    }
    Ok(out)
}

/// Checks every checkpoint against the log: signed by `key` (when given), sizes never
/// shrinking, no larger than the log (else it was truncated), and its root the root of the
/// log's first `size` records (else a signed record was changed).
pub(super) fn check_checkpoints(
    path: &Path,
    tree: &Tree,
    checkpoints: &[Checkpoint],
    key: Option<&PublicKey>,
) -> Result<(), AuditError> {
    let bad = |index, reason: String| AuditError::BadCheckpoint {
        path: path.to_owned(),
        index,
        reason,
    };
    let mut prev_size = 0;
    let mut frontier = checkpoint::Frontier::default();
    for (i, c) in checkpoints.iter().enumerate() {
        if key.is_some_and(|k| !c.signed_by(k)) {
            return Err(bad(
                i,
                "its signature does not verify with the public key (forged or altered)".into(),
            ));
        }
        if c.size < prev_size {
            return Err(bad(i, format!("size {} is smaller than the checkpoint before", c.size)));
        }
        if c.size > tree.len() {
            return Err(AuditError::Damaged {
                path: path.with_file_name(LOG_FILE),
                seq: tree.len(),
                reason: format!(
                    "the log was truncated: checkpoint {i} is signed for {} records, only {} remain",
                    c.size,
                    tree.len()
                ),
            });
        }
        // Sizes never shrink, so the frontier only moves forward: each record is read once.
        for leaf in &tree.items()[frontier.len() as usize..c.size as usize] {
            frontier.push(leaf);
        }
        let root = frontier.root_hex();
        if c.size > 0 && root != c.root {
            return Err(AuditError::Damaged {
                path: path.with_file_name(LOG_FILE),
                seq: prev_size,
                reason: format!(
                    "records {prev_size}..{} do not match signed checkpoint {i}: they were changed after signing",
                    c.size
                ),
            });
        }
        prev_size = c.size;
    }
    Ok(())
}

/// The outcome of an offline verification.
#[derive(Debug)]
pub struct Verified {
    pub records: Vec<Record>,
    pub checkpoints: Vec<Checkpoint>,
    /// Records after the last checkpoint: intact in the chain but not yet signed.
    pub unsigned: u64,
}

/// Verifies a whole log folder offline with only the public key: every record, the chain, every
/// checkpoint's signature and root, and that the log was not truncated. A torn last write is
/// reported as damage (the gateway moves it aside, and records that it did, when it reopens).
pub fn verify_dir(dir: &Path, key: &PublicKey) -> Result<Verified, AuditError> {
    let path = dir.join(LOG_FILE);
    if !path.exists() {
        return Err(io(&path)(std::io::ErrorKind::NotFound.into()));
    }
    let scan = scan(&path)?;
    if scan.torn.is_some() {
        return Err(AuditError::Damaged {
            path,
            seq: scan.records.len() as u64,
            reason: "torn last record (a write cut short by a crash, or a truncation)".into(),
        });
    }
    let ckpt_path = dir.join(CHECKPOINT_FILE);
    let ckpts = scan_checkpoints(&ckpt_path)?;
    if ckpts.torn.is_some() {
        return Err(AuditError::BadCheckpoint {
            path: ckpt_path,
            index: ckpts.checkpoints.len(),
            reason: "torn last checkpoint".into(),
        });
    }
    check_checkpoints(&ckpt_path, &scan.tree, &ckpts.checkpoints, Some(key))?;
    // Records after the last checkpoint (all of them, if the gateway died before its first) are
    // intact in the chain but unsigned: reported as an unsigned tail, which the gateway signs
    // when it next opens the log, not as damage.
    let signed = ckpts.checkpoints.last().map_or(0, |c| c.size);
    Ok(Verified {
        unsigned: scan.tree.len() - signed,
        records: scan.records,
        checkpoints: ckpts.checkpoints,
    })
}

/// Reads and checks a log file's records and chain alone (no checkpoints, no key).
pub fn verify(path: &Path) -> Result<Vec<Record>, AuditError> {
    let scan = scan(path)?;
    match scan.torn {
        Some(_) => Err(AuditError::Damaged {
            path: path.to_owned(),
            seq: scan.records.len() as u64,
            reason: "torn last record".into(),
        }),
        None => Ok(scan.records),
    }
}
