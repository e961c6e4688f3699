//! `sde_people_at_least(person)`: the number of distinct people in a group, counted only up to
//! a cap (the threshold). Where disclosure control only asks "at least `threshold` people?",
//! counting further is wasted work: once a group has shown `cap` different people it ignores
//! the rest of its rows, so the cost is a comparison per row instead of a hash-set insert of
//! every identifier.
//!
//! People are told apart by their fingerprint ([`super::fingerprint`]), a fixed 64-bit hash of
//! their identifier. Two people whose fingerprints collide count as one, so the count can only
//! fall short (more is withheld, never less), and the same data always gives the same count
//! (replays match).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::ScalarValue;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature, Volatility,
};

use super::fingerprint::hash_rows;

#[derive(Debug, PartialEq, Eq, Hash)]
struct PeopleAtLeast {
    cap: usize,
    signature: Signature,
}

/// Distinct non-NULL `person` values of the group, counted up to `cap`. Never registered in a
/// catalogue, so queries cannot call it.
pub fn people_at_least(person: Expr, cap: usize) -> Expr {
    let udaf = AggregateUDF::from(PeopleAtLeast {
        cap,
        signature: Signature::any(1, Volatility::Immutable),
    });
    udaf.call(vec![person])
}

impl AggregateUDFImpl for PeopleAtLeast {
    fn name(&self) -> &str {
        "sde_people_at_least"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(One {
            cap: self.cap,
            seen: Vec::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        let item = Arc::new(Field::new_list_field(DataType::UInt64, true));
        Ok(vec![Arc::new(Field::new(
            format!("{}[people]", args.name),
            DataType::List(item),
            true,
        ))])
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups {
            cap: self.cap,
            seen: Vec::new(),
            hashes: Vec::new(),
        }))
    }
}

/// Adds `hash` to `set` unless it is there or the set is full.
fn insert(set: &mut Vec<u64>, cap: usize, hash: u64) {
    if set.len() < cap && !set.contains(&hash) {
        set.push(hash);
    }
}

/// Adds the people of partial state `row` of `lists` to `set`.
fn merge_row(set: &mut Vec<u64>, cap: usize, lists: &ListArray, row: usize) {
    if lists.is_valid(row) {
        for &hash in lists.value(row).as_primitive::<UInt64Type>().values() {
            insert(set, cap, hash);
        }
    }
}

fn as_lists(sets: &[Vec<u64>]) -> ArrayRef {
    Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
        sets.iter().map(|s| Some(s.iter().map(|h| Some(*h)))),
    ))
}

/// The per-group accumulator.
#[derive(Debug)]
struct Groups {
    cap: usize,
    seen: Vec<Vec<u64>>,
    hashes: Vec<u64>,
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DFResult<()> {
        let values = &values[0];
        self.seen.resize_with(total_num_groups, Vec::new);
        // Only rows of groups not yet full are hashed: once a group has shown `cap` people the
        // rest of its rows cost one comparison each.
        let rows: Vec<u32> = group_indices
            .iter()
            .enumerate()
            .filter(|&(row, &group)| {
                self.seen[group].len() < self.cap
                    && values.is_valid(row)
                    && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
            })
            .map(|(row, _)| row as u32)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let rows = UInt32Array::from(rows);
        let wanted = datafusion::arrow::compute::take(values.as_ref(), &rows, None)?;
        hash_rows(&wanted, &mut self.hashes)?;
        for (&row, &hash) in rows.values().iter().zip(&self.hashes) {
            insert(&mut self.seen[group_indices[row as usize]], self.cap, hash);
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DFResult<ArrayRef> {
        let sets = emit_to.take_needed(&mut self.seen);
        Ok(Arc::new(Int64Array::from_iter_values(
            sets.iter().map(|s| s.len() as i64),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> DFResult<Vec<ArrayRef>> {
        Ok(vec![as_lists(&emit_to.take_needed(&mut self.seen))])
    }

    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> DFResult<()> {
        self.seen.resize_with(total_num_groups, Vec::new);
        let lists = values[0].as_list::<i32>();
        for (row, &group) in group_indices.iter().enumerate() {
            merge_row(&mut self.seen[group], self.cap, lists, row);
        }
        Ok(())
    }

    /// Each row as a partial state of its own (used when DataFusion skips partial aggregation).
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> DFResult<Vec<ArrayRef>> {
        let values = &values[0];
        let mut hashes = Vec::new();
        hash_rows(values, &mut hashes)?;
        let sets: Vec<Vec<u64>> = hashes
            .into_iter()
            .enumerate()
            .map(|(row, hash)| {
                let counted = values.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
                if counted { vec![hash] } else { vec![] }
            })
            .collect();
        Ok(vec![as_lists(&sets)])
    }

    fn size(&self) -> usize {
        self.seen.capacity() * std::mem::size_of::<Vec<u64>>()
            + self.seen.iter().map(|s| s.capacity() * 8).sum::<usize>()
            + self.hashes.capacity() * 8
    }
}

/// The accumulator of an aggregate without groups.
#[derive(Debug)]
struct One {
    cap: usize,
    seen: Vec<u64>,
}

impl Accumulator for One {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        if self.seen.len() >= self.cap {
            return Ok(());
        }
        let values = &values[0];
        let mut hashes = Vec::new();
        hash_rows(values, &mut hashes)?;
        for (row, hash) in hashes.into_iter().enumerate() {
            if !values.is_null(row) {
                insert(&mut self.seen, self.cap, hash);
            }
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        let lists = states[0].as_list::<i32>();
        for row in 0..lists.len() {
            merge_row(&mut self.seen, self.cap, lists, row);
        }
        Ok(())
    }

    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::List(Arc::new(
            as_lists(std::slice::from_ref(&self.seen)).as_list::<i32>().clone(),
        ))])
    }

    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        Ok(ScalarValue::Int64(Some(self.seen.len() as i64)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.seen.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{SessionContext, col};

    use super::*;

    /// Table `t` of `(g, person)` rows, spread over several partitions (so partial states merge).
    fn context(rows: &[(&str, Option<&str>)]) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, false),
            Field::new("person", DataType::Utf8, true),
        ]));
        let batches: Vec<RecordBatch> = rows
            .chunks(3)
            .map(|chunk| {
                let g: StringArray = chunk.iter().map(|(g, _)| Some(*g)).collect();
                let p: StringArray = chunk.iter().map(|(_, p)| *p).collect();
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(g), Arc::new(p)]).unwrap()
            })
            .collect();
        let ctx = SessionContext::new();
        let partitions = batches.into_iter().map(|b| vec![b]).collect();
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, partitions).unwrap()))
            .unwrap();
        ctx
    }

    /// Per group `g`, people counted up to `cap`.
    async fn counts(rows: &[(&str, Option<&str>)], cap: usize) -> Vec<(String, i64)> {
        let out = context(rows)
            .table("t")
            .await
            .unwrap()
            .aggregate(vec![col("g")], vec![people_at_least(col("person"), cap).alias("n")])
            .unwrap()
            .sort(vec![col("g").sort(true, true)])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut result = Vec::new();
        for b in out {
            for i in 0..b.num_rows() {
                let g = b.column(0).as_string::<i32>().value(i).to_owned();
                let n = b
                    .column(1)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .value(i);
                result.push((g, n));
            }
        }
        result
    }

    #[tokio::test]
    async fn people_are_counted_once_each_up_to_the_cap() {
        let rows = [
            ("a", Some("p1")),
            ("a", Some("p1")),
            ("a", Some("p2")),
            ("a", None),
            ("b", Some("p1")),
            ("b", Some("p2")),
            ("b", Some("p3")),
            ("b", Some("p4")),
            ("b", Some("p4")),
            ("c", None),
        ];
        assert_eq!(
            counts(&rows, 3).await,
            [("a".into(), 2), ("b".into(), 3), ("c".into(), 0)]
        );
        assert_eq!(
            counts(&rows, 10).await,
            [("a".into(), 2), ("b".into(), 4), ("c".into(), 0)]
        );
    }

    #[tokio::test]
    async fn without_groups_people_are_counted_up_to_the_cap() {
        let rows: Vec<(&str, Option<&str>)> = ["p1", "p2", "p1", "p3", "p4", "p5", "p6", "p2"]
            .iter()
            .map(|p| ("a", Some(*p)))
            .chain([("a", None)])
            .collect();
        for (cap, expected) in [(3, 3), (10, 6)] {
            let out = context(&rows)
                .table("t")
                .await
                .unwrap()
                .aggregate(vec![], vec![people_at_least(col("person"), cap).alias("n")])
                .unwrap()
                .collect()
                .await
                .unwrap();
            let n = out[0]
                .column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0);
            assert_eq!(n, expected, "cap {cap}");
        }
    }
}
