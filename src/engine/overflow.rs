//! Integer sums never wrap. DataFusion adds integers in `SUM` with wrapping arithmetic, so a
//! total past the BIGINT range would come back as a wrong number. In every project's session
//! `SUM` over integers adds exactly, in 128 bits (partial sums travel between partitions as
//! `DECIMAL(38, 0)`), and a total outside the range is NULL, as a group with no values. Over
//! floats and decimals, and for `SUM(DISTINCT …)`, it is DataFusion's own.
//!
//! NULL, not an error: an error that only some data raise would tell the query's author that
//! such data exist ([`super::total`] makes row-level arithmetic total the same way).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Decimal128Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef, Int64Type, UInt64Type};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::{AggregateOrderSensitivity, format_state_name};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, GroupsAccumulator, ReversedUDAF,
    SetMonotonicity, Signature,
};
use datafusion::prelude::SessionContext;

/// Registers the checked `sum` in `ctx` in place of DataFusion's.
pub fn register(ctx: &SessionContext) {
    if let Some(inner) = ctx.state().aggregate_functions().get("sum") {
        ctx.register_udaf(AggregateUDF::new_from_impl(CheckedSum(Arc::clone(inner))));
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CheckedSum(Arc<AggregateUDF>);

fn integer(t: &DataType) -> bool {
    matches!(t, DataType::Int64 | DataType::UInt64)
}

impl AggregateUDFImpl for CheckedSum {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn aliases(&self) -> &[String] {
        self.0.aliases()
    }
    fn signature(&self) -> &Signature {
        self.0.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.0.return_type(arg_types)
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.0.coerce_types(arg_types)
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        if args.is_distinct || !integer(args.return_field.data_type()) {
            return self.0.state_fields(args);
        }
        let name = format_state_name(args.name, "sum");
        Ok(vec![Arc::new(Field::new(name, state_type(), true))])
    }
    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let t = args.return_field.data_type().clone();
        if args.is_distinct || !integer(&t) {
            return self.0.accumulator(args);
        }
        Ok(Box::new(Checked {
            sum: 0,
            seen: false,
            unsigned: t == DataType::UInt64,
        }))
    }
    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.0.groups_accumulator_supported(args)
    }
    fn create_groups_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        let t = args.return_field.data_type().clone();
        if args.is_distinct || !integer(&t) {
            return self.0.create_groups_accumulator(args);
        }
        Ok(Box::new(CheckedGroups {
            sums: vec![],
            seen: vec![],
            unsigned: t == DataType::UInt64,
        }))
    }
    fn reverse_expr(&self) -> ReversedUDAF {
        ReversedUDAF::Identical
    }
    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.0.inner().order_sensitivity()
    }
    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.0.default_value(data_type)
    }
    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.0.inner().set_monotonicity(data_type)
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.0.documentation()
    }
}

/// The state of both accumulators: the exact sum so far in 128 bits, NULL before any value.
fn state_type() -> DataType {
    DataType::Decimal128(38, 0)
}

/// A sum read out: the total where it is within the type's range, else NULL (as no values).
fn read_out(sum: i128, seen: bool, unsigned: bool) -> ScalarValue {
    let in_range = match unsigned {
        true => (0..=u64::MAX as i128).contains(&sum),
        false => (i64::MIN as i128..=i64::MAX as i128).contains(&sum),
    };
    match (unsigned, seen && in_range) {
        (true, ok) => ScalarValue::UInt64(ok.then_some(sum as u64)),
        (false, ok) => ScalarValue::Int64(ok.then_some(sum as i64)),
    }
}

/// `values` as exact 128-bit numbers, NULL kept.
fn wide(values: &ArrayRef, unsigned: bool) -> Result<Vec<Option<i128>>> {
    Ok(match values.data_type() {
        DataType::Decimal128(_, _) => values.as_primitive::<Decimal128Type>().iter().collect(),
        _ if unsigned => {
            let v = cast(values, &DataType::UInt64)?;
            v.as_primitive::<UInt64Type>()
                .iter()
                .map(|v| v.map(i128::from))
                .collect()
        }
        _ => {
            let v = cast(values, &DataType::Int64)?;
            v.as_primitive::<Int64Type>()
                .iter()
                .map(|v| v.map(i128::from))
                .collect()
        }
    })
}

/// The ungrouped checked sum.
#[derive(Debug)]
struct Checked {
    sum: i128,
    seen: bool,
    unsigned: bool,
}

impl Checked {
    /// Adds in 128 bits (which no realistic number of 64-bit values can overflow); the range
    /// is checked where the total is read, so only a total past the range is NULL.
    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        for v in wide(values, self.unsigned)?.into_iter().flatten() {
            self.sum += v;
            self.seen = true;
        }
        Ok(())
    }
}

impl Accumulator for Checked {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.add(&values[0])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.add(&states[0])
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Decimal128(self.seen.then_some(self.sum), 38, 0)])
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(read_out(self.sum, self.seen, self.unsigned))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
}

/// The grouped checked sum: per group, as [`Checked`].
struct CheckedGroups {
    sums: Vec<i128>,
    seen: Vec<bool>,
    unsigned: bool,
}

impl CheckedGroups {
    fn add(&mut self, values: &ArrayRef, groups: &[usize], filter: Option<&BooleanArray>, n: usize) -> Result<()> {
        self.sums.resize(n, 0);
        self.seen.resize(n, false);
        for (row, (v, &g)) in wide(values, self.unsigned)?.into_iter().zip(groups).enumerate() {
            let included = filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            if let (Some(v), true) = (v, included) {
                self.sums[g] += v;
                self.seen[g] = true;
            }
        }
        Ok(())
    }
}

impl GroupsAccumulator for CheckedGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.add(&values[0], group_indices, opt_filter, total_num_groups)
    }
    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> Result<()> {
        self.add(&values[0], group_indices, None, total_num_groups)
    }
    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (sums, seen) = (emit_to.take_needed(&mut self.sums), emit_to.take_needed(&mut self.seen));
        let values = sums
            .into_iter()
            .zip(seen)
            .map(|(s, seen)| read_out(s, seen, self.unsigned));
        ScalarValue::iter_to_array(values)
    }
    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let (sums, seen) = (emit_to.take_needed(&mut self.sums), emit_to.take_needed(&mut self.seen));
        let state: Decimal128Array = sums.into_iter().zip(seen).map(|(s, seen)| seen.then_some(s)).collect();
        Ok(vec![Arc::new(state.with_precision_and_scale(38, 0)?)])
    }
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> Result<Vec<ArrayRef>> {
        let included = |row: usize| opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
        let state: Decimal128Array = wide(&values[0], self.unsigned)?
            .into_iter()
            .enumerate()
            .map(|(row, v)| v.filter(|_| included(row)))
            .collect();
        Ok(vec![Arc::new(state.with_precision_and_scale(38, 0)?)])
    }
    fn size(&self) -> usize {
        self.sums.capacity() * 16 + self.seen.capacity()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::record_batch::RecordBatch;

    use super::*;

    async fn sum(sql: &str) -> std::result::Result<String, String> {
        let ctx = SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(4));
        register(&ctx);
        let v = Int64Array::from(vec![i64::MAX - 1, 1, 1, -5]);
        let g = Int64Array::from(vec![1, 1, 1, 2]);
        let batch =
            RecordBatch::try_from_iter([("v", Arc::new(v) as ArrayRef), ("g", Arc::new(g) as ArrayRef)]).unwrap();
        ctx.register_batch("t", batch).unwrap();
        match ctx.sql(sql).await.unwrap().collect().await {
            Ok(b) => Ok(datafusion::arrow::util::pretty::pretty_format_batches(&b)
                .unwrap()
                .to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn an_integer_sum_past_the_range_is_null_instead_of_wrapping() {
        // Group 1 totals past the range; group 2 does not, and is exact.
        let out = sum("SELECT g, SUM(v) AS s FROM t GROUP BY g ORDER BY g").await.unwrap();
        assert!(out.contains("| 1 |    |") && out.contains("| 2 | -5 |"), "{out}");
        let out = sum("SELECT SUM(v) AS s FROM t WHERE v > 0").await.unwrap();
        assert!(out.contains("|   |"), "{out}");
        // A total in range is exact, though a running total passed the range on the way.
        assert!(
            sum("SELECT SUM(v) FROM t")
                .await
                .unwrap()
                .contains(&(i64::MAX - 4).to_string())
        );
        assert!(sum("SELECT SUM(v) FROM t WHERE v < 2").await.unwrap().contains("-3"));
        assert!(sum("SELECT SUM(CAST(v AS DOUBLE)) FROM t").await.is_ok());
        // Over several partitions, partial sums travel exactly.
        let out = sum("SELECT SUM(v) FROM (SELECT v FROM t UNION ALL SELECT -v FROM t WHERE v > 1)").await;
        assert!(out.unwrap().contains("-3"), "partial sums");
    }
}
