//! A dataset's content hash: what an audit record names as the data a query read, and what a
//! replay checks is still there.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// SHA-256 over a dataset folder's Parquet files in file-name order; for each file its name
/// (UTF-8), a zero byte, its length (8 bytes, big-endian) and its bytes. Any added, removed,
/// renamed or changed file changes the hash.
pub fn content_hash(dir: &Path) -> std::io::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    names.sort();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    for name in names {
        let mut file = std::fs::File::open(dir.join(&name))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_covers_names_order_and_bytes_of_parquet_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.parquet"), b"one").unwrap();
        std::fs::write(dir.path().join("b.parquet"), b"two").unwrap();
        let h = content_hash(dir.path()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        assert_eq!(content_hash(dir.path()).unwrap(), h);
        std::fs::write(dir.path().join("b.parquet"), b"twO").unwrap();
        assert_ne!(content_hash(dir.path()).unwrap(), h);
        std::fs::write(dir.path().join("b.parquet"), b"two").unwrap();
        std::fs::rename(dir.path().join("b.parquet"), dir.path().join("c.parquet")).unwrap();
        assert_ne!(content_hash(dir.path()).unwrap(), h);
        // Moving bytes across the file boundary changes it too (lengths are hashed).
        std::fs::write(dir.path().join("a.parquet"), b"onet").unwrap();
        std::fs::write(dir.path().join("c.parquet"), b"wo").unwrap();
        assert_ne!(content_hash(dir.path()).unwrap(), h);
    }
}
