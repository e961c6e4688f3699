//! The hash of a released result, as a receipt and a replay name it.
//!
//! A query's rows come back in an order that can vary between runs (partitions finish in any
//! order), so the hash is over the *set* of rows: SHA-256 of the schema (each field's name, type
//! and nullability; the metadata describing disclosure control, by key) and then the rows in
//! Arrow's row format, sorted, each preceded by its length. Two results hash alike exactly when
//! they hold the same rows under the same schema and disclosure description.

use std::collections::BTreeMap;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use sha2::{Digest, Sha256};

pub fn result_hash(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String, ArrowError> {
    let mut h = Sha256::new();
    h.update(b"sde-gateway result v1\n");
    for f in schema.fields() {
        h.update(format!("{}\0{}\0{}\n", f.name(), f.data_type(), f.is_nullable()));
    }
    let metadata: BTreeMap<&String, &String> = schema.metadata().iter().collect();
    for (k, v) in metadata {
        h.update(format!("{k}\0{v}\n"));
    }
    let converter = RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let mut rows: Vec<Vec<u8>> = Vec::new();
    for batch in batches {
        let converted = converter.convert_columns(batch.columns())?;
        rows.extend(converted.iter().map(|r| r.as_ref().to_vec()));
    }
    rows.sort_unstable();
    h.update((rows.len() as u64).to_be_bytes());
    for row in rows {
        h.update((row.len() as u64).to_be_bytes());
        h.update(row);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(schema: &SchemaRef, keys: &[&str], n: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(n.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn row_order_and_batching_do_not_change_the_hash_but_any_value_does() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("sex", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let one = result_hash(&schema, &[batch(&schema, &["F", "M"], &[10, 20])]).unwrap();
        let split = result_hash(&schema, &[batch(&schema, &["M"], &[20]), batch(&schema, &["F"], &[10])]).unwrap();
        assert_eq!(one, split);
        assert_ne!(
            one,
            result_hash(&schema, &[batch(&schema, &["F", "M"], &[10, 25])]).unwrap()
        );
        let described = Arc::new(schema.as_ref().clone().with_metadata([("k".into(), "v".into())].into()));
        assert_ne!(
            one,
            result_hash(&described, &[batch(&described, &["F", "M"], &[10, 20])]).unwrap()
        );
    }
}
