//! Integers never wrap. DataFusion adds, subtracts and multiplies integers with wrapping
//! arithmetic, in expressions and in `SUM`, so a value past the BIGINT range comes back as a
//! wrong number. In every project's session:
//! - `SUM` over integers adds in 128 bits and fails the query with `safe-settings/overflow` when
//!   a total (or a partition's running total, grouped) leaves the range; over floats and
//!   decimals, and for `SUM(DISTINCT …)`, it is DataFusion's own;
//! - `+`, `-` and `*` between integers are rewritten (an analyzer rule, after type coercion) to
//!   calls of Arrow's checked kernels, which fail the query the same way.
//!
//! An error, not NULL: a NULL would silently leave a row out of the aggregate above it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::numeric;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type, UInt64Type};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, BinaryExpr, ColumnarValue, Documentation, EmitTo, Expr, ExprSchemable,
    GroupsAccumulator, LogicalPlan, Operator, ReversedUDAF, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    SetMonotonicity, Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::prelude::SessionContext;
use datafusion_functions_aggregate_common::aggregate::groups_accumulator::prim_op::PrimitiveGroupsAccumulator;

/// The refusal, as the error the query fails with.
pub const OVERFLOW: &str =
    "safe-settings/overflow: a SUM left the BIGINT range; cast its argument to DOUBLE or DECIMAL to add larger values";

fn overflow() -> DataFusionError {
    DataFusionError::Execution(OVERFLOW.into())
}

/// Registers the checked `sum` in `ctx` in place of DataFusion's, and the rule that makes
/// integer `+`, `-` and `*` checked.
pub fn register(ctx: &SessionContext) {
    if let Some(inner) = ctx.state().aggregate_functions().get("sum") {
        ctx.register_udaf(AggregateUDF::new_from_impl(CheckedSum(Arc::clone(inner))));
    }
    ctx.add_analyzer_rule(Arc::new(CheckArithmetic));
}

/// `a + b`, `a - b`, `a * b` over integers of one type, with Arrow's checked kernels.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CheckedOp {
    op: Operator,
    name: &'static str,
    signature: Signature,
}

impl CheckedOp {
    fn udf(op: Operator) -> ScalarUDF {
        let name = match op {
            Operator::Plus => "sde_checked_add",
            Operator::Minus => "sde_checked_sub",
            _ => "sde_checked_mul",
        };
        ScalarUDF::new_from_impl(Self {
            op,
            name,
            signature: Signature::any(2, Volatility::Immutable),
        })
    }
}

impl ScalarUDFImpl for CheckedOp {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [l, r] if l == r && l.is_integer() => Ok(l.clone()),
            other => exec_err!("{} takes two integers of one type, not {other:?}", self.name),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let [l, r] = &args.args[..] else {
            return exec_err!("{} takes two arguments", self.name);
        };
        let (l, r) = (l.to_array(args.number_rows)?, r.to_array(args.number_rows)?);
        let out = match self.op {
            Operator::Plus => numeric::add(&l, &r),
            Operator::Minus => numeric::sub(&l, &r),
            _ => numeric::mul(&l, &r),
        }
        .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?;
        match scalar {
            true => Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?)),
            false => Ok(ColumnarValue::Array(out)),
        }
    }
}

/// The analyzer rule that makes integer arithmetic checked (after type coercion, so both
/// sides have one type).
#[derive(Debug)]
struct CheckArithmetic;

impl AnalyzerRule for CheckArithmetic {
    fn name(&self) -> &str {
        "sde_check_arithmetic"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        let udfs = [Operator::Plus, Operator::Minus, Operator::Multiply].map(|op| (op, Arc::new(CheckedOp::udf(op))));
        plan.transform_up_with_subqueries(|node| {
            let Some(schema) = node.inputs().first().map(|i| Arc::clone(i.schema())) else {
                return Ok(Transformed::no(node));
            };
            let names = NamePreserver::new(&node);
            node.map_expressions(|e| {
                let name = names.save(&e);
                let rewritten = e.transform_up(|e| {
                    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &e else {
                        return Ok(Transformed::no(e));
                    };
                    let Some((_, udf)) = udfs.iter().find(|(o, _)| o == op) else {
                        return Ok(Transformed::no(e));
                    };
                    let (lt, rt) = (left.get_type(schema.as_ref()), right.get_type(schema.as_ref()));
                    match (lt, rt) {
                        (Ok(l), Ok(r)) if l == r && l.is_integer() => Ok(Transformed::yes(Expr::ScalarFunction(
                            ScalarFunction::new_udf(Arc::clone(udf), vec![(**left).clone(), (**right).clone()]),
                        ))),
                        _ => Ok(Transformed::no(e)),
                    }
                })?;
                Ok(rewritten.update_data(|e| name.restore(e)))
            })
        })
        .map(|t| t.data)
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
        self.0.state_fields(args)
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
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&overflowed);
        let inner: Box<dyn GroupsAccumulator> = match t {
            DataType::Int64 => Box::new(PrimitiveGroupsAccumulator::<Int64Type, _>::new(&t, move |x, y| match x
                .checked_add(y)
            {
                Some(v) => *x = v,
                None => flag.store(true, Ordering::Relaxed),
            })),
            DataType::UInt64 => Box::new(PrimitiveGroupsAccumulator::<UInt64Type, _>::new(
                &t,
                move |x, y| match x.checked_add(y) {
                    Some(v) => *x = v,
                    None => flag.store(true, Ordering::Relaxed),
                },
            )),
            _ => return self.0.create_groups_accumulator(args),
        };
        Ok(Box::new(CheckedGroups { inner, overflowed }))
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

/// The ungrouped checked sum (its state is the sum so far, of the return type).
#[derive(Debug)]
struct Checked {
    sum: i128,
    seen: bool,
    unsigned: bool,
}

impl Checked {
    /// Adds in 128 bits (which no realistic number of 64-bit values can overflow); the range
    /// is checked where the total is read, so only a total past the range fails.
    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        let target = if self.unsigned {
            DataType::UInt64
        } else {
            DataType::Int64
        };
        let values = cast(values, &target)?;
        if let Some(v) = values.as_any().downcast_ref::<UInt64Array>() {
            self.seen |= v.null_count() < v.len();
            self.sum += v.iter().flatten().map(i128::from).sum::<i128>();
        } else if let Some(v) = values.as_any().downcast_ref::<Int64Array>() {
            self.seen |= v.null_count() < v.len();
            self.sum += v.iter().flatten().map(i128::from).sum::<i128>();
        }
        Ok(())
    }

    fn checked(&self) -> Result<ScalarValue> {
        let in_range = if self.unsigned {
            (0..=u64::MAX as i128).contains(&self.sum)
        } else {
            (i64::MIN as i128..=i64::MAX as i128).contains(&self.sum)
        };
        if self.seen && !in_range {
            return Err(overflow());
        }
        Ok(self.value())
    }

    fn value(&self) -> ScalarValue {
        match (self.unsigned, self.seen) {
            (true, true) => ScalarValue::UInt64(Some(self.sum as u64)),
            (true, false) => ScalarValue::UInt64(None),
            (false, true) => ScalarValue::Int64(Some(self.sum as i64)),
            (false, false) => ScalarValue::Int64(None),
        }
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
        Ok(vec![self.checked()?])
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.checked()
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
}

/// DataFusion's grouped sum with checked additions: an overflow in any group fails the query.
struct CheckedGroups {
    inner: Box<dyn GroupsAccumulator>,
    overflowed: Arc<AtomicBool>,
}

impl CheckedGroups {
    fn check(&self) -> Result<()> {
        match self.overflowed.load(Ordering::Relaxed) {
            true => Err(overflow()),
            false => Ok(()),
        }
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
        self.inner
            .update_batch(values, group_indices, opt_filter, total_num_groups)?;
        self.check()
    }
    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> Result<()> {
        self.inner.merge_batch(values, group_indices, total_num_groups)?;
        self.check()
    }
    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.check()?;
        self.inner.evaluate(emit_to)
    }
    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.check()?;
        self.inner.state(emit_to)
    }
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::record_batch::RecordBatch;

    use super::*;

    async fn sum(sql: &str) -> std::result::Result<String, String> {
        let ctx = SessionContext::new();
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
    async fn an_integer_sum_past_the_range_fails_instead_of_wrapping() {
        for sql in ["SELECT g, SUM(v) FROM t GROUP BY g", "SELECT SUM(v) FROM t WHERE v > 0"] {
            let err = sum(sql).await.unwrap_err();
            assert!(err.contains("safe-settings/overflow"), "{sql}: {err}");
        }
        // A total in range is exact, though a running total passed the range on the way.
        assert!(
            sum("SELECT SUM(v) FROM t")
                .await
                .unwrap()
                .contains(&(i64::MAX - 4).to_string())
        );
        assert!(sum("SELECT SUM(v) FROM t WHERE v < 2").await.unwrap().contains("-3"));
        assert!(
            sum("SELECT g, SUM(v) FROM t WHERE g = 2 GROUP BY g")
                .await
                .unwrap()
                .contains("-5")
        );
        assert!(sum("SELECT SUM(CAST(v AS DOUBLE)) FROM t").await.is_ok());
        // Expression arithmetic is checked too, where DataFusion's would wrap.
        for sql in [
            "SELECT SUM(v * 2) FROM t",
            "SELECT g, SUM(v + v) FROM t GROUP BY g",
            "SELECT COUNT(*) FROM t WHERE v - (-v) > 0",
        ] {
            let err = sum(sql).await.unwrap_err().to_lowercase();
            assert!(err.contains("overflow"), "{sql}: {err}");
        }
        assert!(
            sum("SELECT SUM(v * 1) + 0 FROM t WHERE v < 2")
                .await
                .unwrap()
                .contains("-3")
        );
    }
}
