//! The 64-bit fingerprint that tells people apart: XXH3-64 (seed 0) of the person identifier's
//! text. It is the same on every machine, CPU and build, so the record keys, people sets and
//! noise seeds built on it — and so every released value — replay alike wherever the gateway
//! runs. An identifier stored as a number is fingerprinted by its decimal text, so one person is
//! one fingerprint whichever type a dataset stores their identifier in.

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result as DFResult;
use twox_hash::XxHash3_64;

/// The fingerprint of one identifier's text.
fn fingerprint(text: &[u8]) -> u64 {
    XxHash3_64::oneshot(text)
}

/// Fills `hashes` with the fingerprint of each row of `values` (0 where the row is NULL; callers
/// skip NULL rows).
pub(super) fn hash_rows(values: &ArrayRef, hashes: &mut Vec<u64>) -> DFResult<()> {
    hashes.clear();
    hashes.reserve(values.len());
    let text = |row: Option<&[u8]>| row.map_or(0, fingerprint);
    match values.data_type() {
        DataType::Utf8 => hashes.extend(values.as_string::<i32>().iter().map(|s| text(s.map(str::as_bytes)))),
        DataType::LargeUtf8 => hashes.extend(values.as_string::<i64>().iter().map(|s| text(s.map(str::as_bytes)))),
        DataType::Utf8View => hashes.extend(values.as_string_view().iter().map(|s| text(s.map(str::as_bytes)))),
        DataType::Binary => hashes.extend(values.as_binary::<i32>().iter().map(text)),
        DataType::LargeBinary => hashes.extend(values.as_binary::<i64>().iter().map(text)),
        DataType::BinaryView => hashes.extend(values.as_binary_view().iter().map(text)),
        _ => return hash_rows(&cast(values, &DataType::Utf8)?, hashes),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray, StringViewArray};

    use super::*;

    #[test]
    fn fingerprints_are_fixed_values_on_every_machine() {
        // XXH3-64 reference values (the `xxhash` reference library's): a hash that varied by
        // CPU or build would fail here.
        assert_eq!(fingerprint(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(fingerprint(b"abc"), 0x78af_5f94_892f_3950);
    }

    #[test]
    fn one_identifier_is_one_fingerprint_in_every_type() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        hash_rows(
            &(Arc::new(StringArray::from(vec![Some("123"), None])) as ArrayRef),
            &mut a,
        )
        .unwrap();
        hash_rows(
            &(Arc::new(StringViewArray::from(vec![Some("123"), None])) as ArrayRef),
            &mut b,
        )
        .unwrap();
        hash_rows(&(Arc::new(Int64Array::from(vec![Some(123), None])) as ArrayRef), &mut c).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, vec![fingerprint(b"123"), 0]);
    }
}
