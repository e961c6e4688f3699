//! The local file system under every query, reading small ranges where the query runs.
//!
//! `object_store`'s `LocalFileSystem` hands every read to tokio's blocking pool: a wake-up of
//! another thread and a wake-up back, for each file a query reads. Short queries read a few
//! kilobytes of data pages from each file, mostly from the page cache (the footers are in the
//! gateway's metadata cache), and for them the two hand-offs cost more than the read: on the
//! benchmark's small query they were about half of the process's context switches.
//! [`LocalStore`] makes a call for at most [`INLINE_BYTES`] in all on the calling thread, with
//! the same `open` and positioned reads; a larger read (which may wait on the disk for longer
//! than a runtime thread should be held) and every other call go to `LocalFileSystem`. Nothing is
//! cached: each query reads its pages afresh.

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use futures::stream::BoxStream;

/// The most bytes one call reads on the calling thread.
pub const INLINE_BYTES: u64 = 256 * 1024;

const STORE: &str = "LocalStore";

/// `LocalFileSystem`, reading at most [`INLINE_BYTES`] a call without the blocking pool.
#[derive(Debug, Default)]
pub struct LocalStore {
    inner: LocalFileSystem,
}

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore(small reads inline, {})", self.inner)
    }
}

/// Reads `ranges` (at most [`INLINE_BYTES`] in all) of the file at `path`; an error names the
/// path.
fn read_ranges(path: &std::path::Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
    let failed = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            path: path.display().to_string(),
            source: source.into(),
        },
        _ => Error::Generic {
            store: STORE,
            source: format!("{}: {source}", path.display()).into(),
        },
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    ranges
        .iter()
        .map(|range| {
            let len = usize::try_from(range.end.saturating_sub(range.start)).expect("at most INLINE_BYTES");
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, range.start).map_err(failed)?;
            Ok(Bytes::from(buf))
        })
        .collect()
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let total: u64 = ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum();
        if total > INLINE_BYTES {
            return self.inner.get_ranges(location, ranges).await;
        }
        read_ranges(&self.inner.path_to_filesystem(location)?, ranges)
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::object_store::ObjectStoreExt;
    use futures::TryStreamExt;

    /// A store over a folder holding `data.bin` (bytes 0, 1, 2, … 255, 0, 1, …) of `len` bytes.
    fn store_with(len: usize) -> (tempfile::TempDir, LocalStore, Path) {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
        std::fs::write(dir.path().join("data.bin"), bytes).unwrap();
        let location = Path::from_filesystem_path(dir.path().join("data.bin")).unwrap();
        (dir, LocalStore::default(), location)
    }

    fn expected(range: Range<u64>) -> Bytes {
        range.map(|i| i as u8).collect::<Vec<_>>().into()
    }

    #[tokio::test]
    async fn small_and_large_reads_return_the_bytes_asked_for() {
        let len = 3 * INLINE_BYTES as usize;
        let (_dir, store, location) = store_with(len);
        // Small (on the calling thread), and over the limit in all (through the blocking pool).
        for ranges in [
            vec![0..10, 300..4_396],
            vec![0..INLINE_BYTES, INLINE_BYTES..INLINE_BYTES + 1],
            vec![5..INLINE_BYTES + 1, INLINE_BYTES + 1..2 * INLINE_BYTES],
        ] {
            let read = store.get_ranges(&location, &ranges).await.unwrap();
            let want: Vec<Bytes> = ranges.iter().cloned().map(expected).collect();
            assert_eq!(read, want, "ranges {ranges:?}");
        }
    }

    #[tokio::test]
    async fn a_missing_file_or_a_range_past_the_end_is_an_error() {
        let (dir, store, location) = store_with(100);
        let missing = Path::from_filesystem_path(dir.path()).unwrap().join("missing.bin");
        let err = store
            .get_ranges(&missing, std::slice::from_ref(&(0..10)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = store
            .get_ranges(&location, std::slice::from_ref(&(90..110)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("data.bin"), "{err}");
    }

    #[tokio::test]
    async fn every_other_call_is_the_local_file_systems() {
        let (dir, store, location) = store_with(100);
        let read = ObjectStoreExt::get_range(&store, &location, 10..20).await.unwrap();
        assert_eq!(read, expected(10..20));
        let folder = Path::from_filesystem_path(dir.path()).unwrap();
        let listed: Vec<ObjectMeta> = store.list(Some(&folder)).try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size, 100);
    }
}
