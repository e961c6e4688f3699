//! Functions whose output grows with an argument, capped: `repeat`, `lpad`, `rpad`, `replace`,
//! `regexp_replace`, `concat`, `concat_ws`, `overlay`, and the `||` operator (rewritten to a
//! capped call by [`CapConcat`]). DataFusion evaluates expressions outside its memory pool, so
//! `repeat(district, 100000000)` over a table would allocate gigabytes before anything could
//! count them; here each row's output size is bounded *before* the function runs, from its
//! arguments alone, and a row whose result could exceed `limits.max_value_bytes` gets NULL (its
//! arguments are set to NULL first, so the function never builds the long value).
//!
//! A NULL, not an error: an error for one row would stop the whole query on one person's value.
//! The bound is an upper bound (a character counts as 4 bytes where the length is in
//! characters), so a result near the cap may be NULL though it would have fitted.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array};
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::compute::{cast, nullif, or};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::prelude::SessionContext;

/// How a capped function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: len(s) × n.
    Repeat,
    /// `lpad(s, n [, fill])`, `rpad`: n characters.
    Pad,
    /// `replace(s, from, to)`: each character of s (and the gap at the end) replaced by `to`.
    Replace,
    /// `regexp_replace(s, pattern, replacement …)`: as `replace`, and a replacement naming a
    /// group (`$0`, `${name}`, `\\1`) may repeat up to all of s each time.
    RegexpReplace,
    /// `concat(…)`, `concat_ws(sep, …)`, `overlay(…)`, `||`: the sum of the arguments.
    Sum,
}

/// A capped wrapper of DataFusion's function of the same name.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Capped {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    max: usize,
    /// `||`: NULL if any argument is NULL (concat skips NULLs).
    strict: bool,
    name: String,
}

/// Registers the capped wrappers in `ctx` in place of DataFusion's functions, and the rule that
/// turns `a || b` on text into a capped call.
pub fn register(ctx: &SessionContext, max_value_bytes: usize) {
    let state = ctx.state();
    for (name, growth) in [
        ("repeat", Growth::Repeat),
        ("lpad", Growth::Pad),
        ("rpad", Growth::Pad),
        ("replace", Growth::Replace),
        ("regexp_replace", Growth::RegexpReplace),
        ("concat", Growth::Sum),
        ("concat_ws", Growth::Sum),
        ("overlay", Growth::Sum),
    ] {
        if let Some(inner) = state.scalar_functions().get(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Capped {
                inner: Arc::clone(inner),
                growth,
                max: max_value_bytes,
                strict: false,
                name: name.to_owned(),
            }));
        }
    }
    if let Some(concat) = state.scalar_functions().get("concat") {
        ctx.add_analyzer_rule(Arc::new(CapConcat(Arc::new(ScalarUDF::new_from_impl(Capped {
            inner: Arc::clone(concat),
            growth: Growth::Sum,
            max: max_value_bytes,
            strict: true,
            name: "sde_concat_operator".into(),
        })))));
    }
}

impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        &self.name
    }
    fn aliases(&self) -> &[String] {
        if self.strict { &[] } else { self.inner.aliases() }
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let rows = if scalar { 1 } else { args.number_rows };
        let arrays: Vec<ArrayRef> = args.args.iter().map(|a| a.to_array(rows)).collect::<Result<_>>()?;
        let over = self.over(&arrays)?;
        if over.true_count() == 0 {
            return self.inner.invoke_with_args(args);
        }
        if scalar {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from(
                args.return_field.data_type(),
            )?));
        }
        // The rows over the cap run on NULL arguments, so nothing long is built, and are NULL.
        let masked = arrays
            .iter()
            .map(|a| nullif(a, &over).map(ColumnarValue::Array))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let out = self
            .inner
            .invoke_with_args(ScalarFunctionArgs { args: masked, ..args })?;
        let out = out.to_array(rows)?;
        Ok(ColumnarValue::Array(nullif(&out, &over)?))
    }
}

impl Capped {
    /// Rows whose output could exceed the cap (and, for `||`, rows with a NULL argument).
    fn over(&self, arrays: &[ArrayRef]) -> Result<BooleanArray> {
        let rows = arrays.first().map_or(0, |a| a.len());
        let text = |i: usize| arrays.get(i).map(bytes).transpose();
        let number = |i: usize| arrays.get(i).map(counts).transpose();
        let zeros = || vec![0u64; rows];
        let bound: Vec<u64> = match self.growth {
            Growth::Repeat => {
                let (s, n) = (text(0)?.unwrap_or_else(zeros), number(1)?.unwrap_or_else(zeros));
                s.iter().zip(&n).map(|(s, n)| s.saturating_mul(*n)).collect()
            }
            Growth::Pad => number(1)?
                .unwrap_or_else(zeros)
                .iter()
                .map(|n| n.saturating_mul(4))
                .collect(),
            Growth::Replace | Growth::RegexpReplace => {
                let s = text(0)?.unwrap_or_else(zeros);
                let to = text(2)?.unwrap_or_else(zeros);
                let groups = match (self.growth, arrays.get(2)) {
                    (Growth::RegexpReplace, Some(a)) => names_groups(a)?,
                    _ => vec![false; rows],
                };
                s.iter()
                    .zip(&to)
                    .zip(&groups)
                    .map(|((s, to), g)| {
                        let each = if *g { to.saturating_mul((*s).max(1)) } else { *to };
                        (s + 1).saturating_mul(each.max(1))
                    })
                    .collect()
            }
            Growth::Sum => {
                let mut total = zeros();
                for i in 0..arrays.len() {
                    let b = text(i)?.unwrap_or_else(zeros);
                    total.iter_mut().zip(&b).for_each(|(t, b)| *t = t.saturating_add(*b));
                }
                if self.name == "concat_ws" {
                    let sep = text(0)?.unwrap_or_else(zeros);
                    let n = arrays.len() as u64;
                    total
                        .iter_mut()
                        .zip(&sep)
                        .for_each(|(t, s)| *t = t.saturating_add(s.saturating_mul(n)));
                }
                total
            }
        };
        let max = self.max as u64;
        let over = BooleanArray::from_iter(bound.iter().map(|b| Some(*b > max)));
        if !self.strict {
            return Ok(over);
        }
        arrays.iter().try_fold(over, |acc, a| {
            let nulls = datafusion::arrow::compute::is_null(a)?;
            Ok(or(&acc, &nulls)?)
        })
    }
}

/// Each row's length in bytes (text and binary) or a fixed bound for anything else printed as
/// text (numbers, dates); 0 for NULL.
fn bytes(array: &ArrayRef) -> Result<Vec<u64>> {
    let lengths = match array.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => length(array)?,
        DataType::Null => return Ok(vec![0; array.len()]),
        DataType::Dictionary(_, _) => return bytes(&cast(array, &DataType::Utf8)?),
        _ => return Ok(vec![64; array.len()]),
    };
    let lengths = cast(&lengths, &DataType::Int64)?;
    let lengths = lengths.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
    Ok(lengths.iter().map(|l| l.unwrap_or(0).max(0) as u64).collect())
}

/// Whether each row's replacement text may name a group (`$…` or `\\…`).
fn names_groups(array: &ArrayRef) -> Result<Vec<bool>> {
    let text = cast(array, &DataType::Utf8)?;
    let text = text
        .as_any()
        .downcast_ref::<datafusion::arrow::array::StringArray>()
        .expect("cast to Utf8");
    Ok(text
        .iter()
        .map(|t| t.is_some_and(|t| t.contains('$') || t.contains('\\')))
        .collect())
}

/// Each row's value as a count (negative and NULL as 0; anything not a number as 0).
fn counts(array: &ArrayRef) -> Result<Vec<u64>> {
    if !array.data_type().is_integer() {
        return Ok(vec![0; array.len()]);
    }
    let values = cast(array, &DataType::Int64)?;
    let values = values.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
    Ok(values.iter().map(|v| v.unwrap_or(0).max(0) as u64).collect())
}

/// The analyzer rule that turns `a || b` over text into the capped, NULL-strict concatenation
/// (after type coercion, so both sides are text of one type).
#[derive(Debug)]
struct CapConcat(Arc<ScalarUDF>);

impl AnalyzerRule for CapConcat {
    fn name(&self) -> &str {
        "sde_cap_concat"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            let schema = node.inputs().first().map(|i| Arc::clone(i.schema()));
            let Some(schema) = schema else {
                return Ok(Transformed::no(node));
            };
            let names = NamePreserver::new(&node);
            node.map_expressions(|e| {
                let name = names.save(&e);
                let rewritten = e.transform_up(|e| match &e {
                    Expr::BinaryExpr(BinaryExpr {
                        left,
                        op: Operator::StringConcat,
                        right,
                    }) => {
                        let t = e.get_type(schema.as_ref());
                        let text = |x: &Expr| {
                            x.get_type(schema.as_ref())
                                .is_ok_and(|t| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View))
                        };
                        if !(text(left) && text(right)) {
                            return Ok(Transformed::no(e));
                        }
                        let call = Expr::ScalarFunction(ScalarFunction::new_udf(
                            Arc::clone(&self.0),
                            vec![(**left).clone(), (**right).clone()],
                        ));
                        // Keep the operator's type exactly (concat may pick another text type).
                        let call = match (t, call.get_type(schema.as_ref())) {
                            (Ok(want), Ok(got)) if want != got => {
                                Expr::Cast(datafusion::logical_expr::Cast::new(Box::new(call), want))
                            }
                            _ => call,
                        };
                        Ok(Transformed::yes(call))
                    }
                    _ => Ok(Transformed::no(e)),
                })?;
                // The output keeps the operator's name, so the plan's schema does not change.
                Ok(rewritten.update_data(|e| name.restore(e)))
            })
        })
        .map(|t| t.data)
    }
}

/// A NULL array of `rows` rows, for tests.
#[cfg(test)]
fn nulls(rows: usize) -> ArrayRef {
    datafusion::arrow::array::new_null_array(&DataType::Utf8, rows)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array as I64, StringArray};
    use datafusion::arrow::record_batch::RecordBatch;

    use super::*;

    async fn run(sql: &str) -> Vec<Option<String>> {
        let ctx = SessionContext::new();
        register(&ctx, 100);
        let names = StringArray::from(vec![Some("abc"), Some("a"), None]);
        let n = I64::from(vec![Some(10), Some(1000), Some(5)]);
        let batch =
            RecordBatch::try_from_iter([("s", Arc::new(names) as ArrayRef), ("n", Arc::new(n) as ArrayRef)]).unwrap();
        ctx.register_batch("t", batch).unwrap();
        let out = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let col = cast(out[0].column(0), &DataType::Utf8).unwrap();
        let col = col.as_any().downcast_ref::<StringArray>().unwrap();
        col.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[tokio::test]
    async fn a_row_whose_result_would_pass_the_cap_is_null_and_is_never_built() {
        assert_eq!(
            run("SELECT repeat(s, n) FROM t").await,
            vec![Some("abc".repeat(10)), None, None]
        );
        // 1e12 bytes per row would be built if the cap looked only at the output.
        assert_eq!(
            run("SELECT repeat(s, 1000000000000) FROM t").await,
            vec![None, None, None]
        );
        assert_eq!(run("SELECT lpad(s, 2000000000) FROM t").await, vec![None, None, None]);
        assert_eq!(run("SELECT rpad(s, 5, '-') FROM t").await[0].as_deref(), Some("abc--"));
    }

    #[tokio::test]
    async fn the_concatenation_operator_is_capped_and_stays_null_strict() {
        assert_eq!(
            run("SELECT s || 'x' FROM t").await,
            vec![Some("abcx".into()), Some("ax".into()), None]
        );
        let long = format!("SELECT s || '{}' || '{}' FROM t", "y".repeat(60), "z".repeat(60));
        assert_eq!(run(&long).await, vec![None, None, None]);
        assert_eq!(run("SELECT concat(s, NULL, 'x') FROM t").await[2].as_deref(), Some("x"));
        let nested = "SELECT concat(repeat(s, 30), repeat(s, 30)) FROM t";
        assert_eq!(run(nested).await, vec![None, Some("a".repeat(60)), Some(String::new())]);
    }

    #[test]
    fn nulls_have_no_length() {
        assert_eq!(bytes(&nulls(2)).unwrap(), vec![0, 0]);
    }
}
