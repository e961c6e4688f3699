//! `sde_largest(value)`: the sum of the `k` largest magnitudes of `value` in a group, without
//! reading who the rows belong to. Where no person has more than `m` rows, two people's totals
//! together are at most the sum of the `2m` largest magnitudes, which bounds the dominance rules
//! from the rows alone (see [`super::Disclosure::not_dominated_from_rows`]).
//!
//! Each group keeps at most `k` magnitudes in a min-heap: a row smaller than the smallest kept
//! costs one comparison. Magnitudes are compared by their bits, which order non-negative floats
//! as their values do (a NaN sorts above infinity, and makes the sum NaN).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, ListArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{ScalarValue, internal_err};
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature, Volatility,
};

#[derive(Debug, PartialEq, Eq, Hash)]
struct Largest {
    k: usize,
    signature: Signature,
}

/// The sum of the `k` largest magnitudes of `value` (a `Float64`) in the group; NULL where it
/// has no value. Never registered in a catalogue, so queries cannot call it.
pub fn largest(value: Expr, k: usize) -> Expr {
    let udaf = AggregateUDF::from(Largest {
        k: k.max(1),
        signature: Signature::any(1, Volatility::Immutable),
    });
    udaf.call(vec![value])
}

impl AggregateUDFImpl for Largest {
    fn name(&self) -> &str {
        "sde_largest"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DFResult<DataType> {
        if args != [DataType::Float64] {
            return internal_err!("sde_largest takes a Float64, not {args:?}");
        }
        Ok(DataType::Float64)
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(One(self.groups())))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        let item = Arc::new(Field::new_list_field(DataType::Float64, true));
        Ok(vec![Arc::new(Field::new(
            format!("{}[largest]", args.name),
            DataType::List(item),
            true,
        ))])
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(self.groups()))
    }
}

impl Largest {
    fn groups(&self) -> Groups {
        Groups {
            k: self.k,
            heaps: Vec::new(),
        }
    }
}

/// A group's largest magnitudes, as bits, smallest on top.
type Heap = BinaryHeap<Reverse<u64>>;

/// Keeps `value`'s magnitude in `heap` if it is among the `k` largest seen.
fn keep(heap: &mut Heap, k: usize, value: f64) {
    let bits = value.abs().to_bits();
    if heap.len() < k {
        heap.push(Reverse(bits));
    } else if let Some(mut smallest) = heap.peek_mut()
        && bits > smallest.0
    {
        *smallest = Reverse(bits);
    }
}

fn sum(heap: &Heap) -> Option<f64> {
    (!heap.is_empty()).then(|| heap.iter().map(|b| f64::from_bits(b.0)).sum())
}

fn as_lists(heaps: &[Heap]) -> ArrayRef {
    Arc::new(ListArray::from_iter_primitive::<Float64Type, _, _>(
        heaps.iter().map(|h| Some(h.iter().map(|b| Some(f64::from_bits(b.0))))),
    ))
}

/// The per-group accumulator.
#[derive(Debug)]
struct Groups {
    k: usize,
    heaps: Vec<Heap>,
}

impl Groups {
    fn add(&mut self, values: &ArrayRef, group_indices: &[usize], opt_filter: Option<&BooleanArray>) {
        let values = values.as_primitive::<Float64Type>();
        for (row, &group) in group_indices.iter().enumerate() {
            if values.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row)) {
                keep(&mut self.heaps[group], self.k, values.value(row));
            }
        }
    }
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DFResult<()> {
        self.heaps.resize_with(total_num_groups, Heap::new);
        self.add(&values[0], group_indices, opt_filter);
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DFResult<ArrayRef> {
        let heaps = emit_to.take_needed(&mut self.heaps);
        Ok(Arc::new(Float64Array::from_iter(heaps.iter().map(sum))))
    }

    fn state(&mut self, emit_to: EmitTo) -> DFResult<Vec<ArrayRef>> {
        Ok(vec![as_lists(&emit_to.take_needed(&mut self.heaps))])
    }

    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> DFResult<()> {
        self.heaps.resize_with(total_num_groups, Heap::new);
        let lists = values[0].as_list::<i32>();
        for (row, &group) in group_indices.iter().enumerate() {
            if lists.is_valid(row) {
                for &value in lists.value(row).as_primitive::<Float64Type>().values() {
                    keep(&mut self.heaps[group], self.k, value);
                }
            }
        }
        Ok(())
    }

    /// Each row as a partial state of its own (used when DataFusion skips partial aggregation).
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> DFResult<Vec<ArrayRef>> {
        let rows = values[0].len();
        let mut each = Groups {
            k: self.k,
            heaps: vec![Heap::new(); rows],
        };
        each.add(&values[0], &(0..rows).collect::<Vec<_>>(), opt_filter);
        Ok(vec![as_lists(&each.heaps)])
    }

    fn size(&self) -> usize {
        self.heaps.capacity() * std::mem::size_of::<Heap>() + self.heaps.iter().map(|h| h.capacity() * 8).sum::<usize>()
    }
}

/// The accumulator of an aggregate without groups: one group.
#[derive(Debug)]
struct One(Groups);

impl Accumulator for One {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        let rows = values[0].len();
        self.0.update_batch(values, &vec![0; rows], None, 1)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        let rows = states[0].len();
        self.0.merge_batch(states, &vec![0; rows], 1)
    }

    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        self.0.heaps.resize_with(1, Heap::new);
        Ok(vec![ScalarValue::List(Arc::new(
            as_lists(&self.0.heaps).as_list::<i32>().clone(),
        ))])
    }

    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        self.0.heaps.resize_with(1, Heap::new);
        Ok(ScalarValue::Float64(sum(&self.0.heaps[0])))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + GroupsAccumulator::size(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::Schema;
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{SessionContext, col};

    use super::*;

    /// Sums of the 3 largest magnitudes of `v`, per group `g` (or over all rows), the rows
    /// spread over several partitions so that partial states merge.
    async fn largest_three(rows: &[(i64, Option<f64>)], grouped: bool) -> Vec<Option<f64>> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let mut partitions: Vec<Vec<RecordBatch>> = rows
            .chunks(2)
            .map(|chunk| {
                let g = datafusion::arrow::array::Int64Array::from_iter_values(chunk.iter().map(|r| r.0));
                let v = Float64Array::from_iter(chunk.iter().map(|r| r.1));
                vec![RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(g), Arc::new(v)]).unwrap()]
            })
            .collect();
        if partitions.is_empty() {
            partitions.push(vec![]);
        }
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, partitions).unwrap()))
            .unwrap();
        let groups = if grouped { vec![col("g")] } else { vec![] };
        let mut df = ctx
            .table("t")
            .await
            .unwrap()
            .aggregate(groups, vec![largest(col("v"), 3).alias("s")])
            .unwrap();
        if grouped {
            df = df.sort(vec![col("g").sort(true, true)]).unwrap();
        }
        let out = df.select(vec![col("s")]).unwrap().collect().await.unwrap();
        out.iter()
            .flat_map(|b| b.column(0).as_primitive::<Float64Type>().iter().collect::<Vec<_>>())
            .collect()
    }

    const ROWS: [(i64, Option<f64>); 9] = [
        // 1: magnitudes 1, 9, 4, 7, 2: the largest three make 20.
        (1, Some(1.0)),
        (1, Some(-9.0)),
        (1, Some(4.0)),
        (1, None),
        (1, Some(7.0)),
        (1, Some(2.0)),
        // 2: fewer than three values; 3: none.
        (2, Some(5.0)),
        (2, Some(5.0)),
        (3, None),
    ];

    #[tokio::test]
    async fn the_largest_magnitudes_are_summed_per_group() {
        assert_eq!(largest_three(&ROWS, true).await, [Some(20.0), Some(10.0), None]);
        assert_eq!(largest_three(&ROWS, false).await, [Some(21.0)]);
        assert_eq!(largest_three(&[], false).await, [None]);
    }
}
