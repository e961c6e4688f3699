//! Dataset versions. Each ingest writes a new, immutable version folder holding its Parquet
//! files and a manifest (`_manifest.json`: dataset, version id, content hash, rows, creation
//! time, spec hash, identifier columns, quarantine counts). The content hash is what an audit
//! record names, so a replay can prove it reads the very bytes the query read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of a version's manifest. The leading `_` keeps Parquet readers (DataFusion
/// listing by extension, pyarrow datasets) from taking it for data.
pub const MANIFEST: &str = "_manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub dataset: String,
    pub version: String,
    /// [`content_hash`] of the version's Parquet files.
    pub content_hash: String,
    pub rows: u64,
    /// RFC 3339, UTC.
    pub created: String,
    /// SHA-256 of the spec text the version was made with.
    pub spec_hash: String,
    /// Output columns only the engine may use (the pseudonym and any `identifier` columns).
    pub identifiers: Vec<String>,
    /// Rows of the extract that were read.
    pub source_rows: u64,
    /// Quarantined rows by reason (counts only, never values).
    pub quarantined: BTreeMap<String, u64>,
}

/// The `.parquet` files directly in `dir`, in file-name order.
pub fn parquet_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_file() && path.extension().is_some_and(|e| e == "parquet") {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// SHA-256, in lower-case hex, over the `.parquet` files directly in `dir` in file-name order:
/// for each file its name (UTF-8), a zero byte, its length (8 bytes, big-endian), then its bytes.
pub fn content_hash(dir: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in parquet_files(dir)? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        hasher.update(len.to_be_bytes());
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Reads `dir/_manifest.json`, if there is one.
pub fn read_manifest(dir: &Path) -> std::io::Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn write_manifest(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    std::fs::write(dir.join(MANIFEST), json)
}

/// A version id: creation time (sortable) and the start of the content hash.
pub fn version_id(created: chrono::DateTime<chrono::Utc>, content_hash: &str) -> String {
    format!("{}-{}", created.format("%Y%m%dT%H%M%S%3fZ"), &content_hash[..12])
}

/// Replaces the Parquet files and manifest of `target` with hard links to (or, across file
/// systems, copies of) those of `version`. The new folder is assembled beside `target` and
/// swapped in with renames, so a reader never sees a mix of two versions' files.
pub fn publish(version: &Path, target: &Path) -> std::io::Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.publishing"));
    let old = parent.join(format!(".{name}.replaced"));
    for stale in [&staging, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale)?;
        }
    }
    std::fs::create_dir_all(&staging)?;
    let mut files = parquet_files(version)?;
    files.push(version.join(MANIFEST));
    for file in files {
        let to = staging.join(file.file_name().expect("a file name"));
        if std::fs::hard_link(&file, &to).is_err() {
            std::fs::copy(&file, &to)?;
        }
    }
    if target.exists() {
        std::fs::rename(target, &old)?;
    }
    std::fs::rename(&staging, target)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_hash_covers_names_order_and_bytes_of_parquet_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.parquet"), b"two").unwrap();
        std::fs::write(d.join("a.parquet"), b"one").unwrap();
        let first = content_hash(d).unwrap();
        assert_eq!(first.len(), 64);
        // Files other than Parquet (the manifest) do not count.
        std::fs::write(d.join(MANIFEST), b"{}").unwrap();
        assert_eq!(content_hash(d).unwrap(), first);
        // The layout is exactly: name, 0, length (u64 BE), bytes — in name order.
        let mut h = Sha256::new();
        for (name, bytes) in [("a.parquet", b"one"), ("b.parquet", b"two")] {
            h.update(name.as_bytes());
            h.update([0u8]);
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        assert_eq!(first, hex::encode(h.finalize()));
        // Any change of bytes or names changes the hash.
        std::fs::write(d.join("b.parquet"), b"tw0").unwrap();
        assert_ne!(content_hash(d).unwrap(), first);
        std::fs::write(d.join("b.parquet"), b"two").unwrap();
        std::fs::rename(d.join("b.parquet"), d.join("c.parquet")).unwrap();
        assert_ne!(content_hash(d).unwrap(), first);
    }
}
