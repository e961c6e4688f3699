//! Total expressions: no value in the data can make a query fail. An error that only some rows
//! raise tells whoever wrote the query that such a row exists ("this division fails only if
//! the person I mean is in the table"), so every row-level expression is made total, by an
//! analyzer rule run after type coercion in every project's session:
//! - `CAST` is `TRY_CAST`: a value that does not convert is NULL;
//! - integer `+`, `-`, `*`, `/`, `%` (operands of one integer type) are computed per value with
//!   checked arithmetic: a result past the type's range, a division by zero and `MIN / -1` are
//!   NULL (DataFusion's own would wrap, or fail the query);
//! - `/` and `%` on other numbers divide by `NULLIF(divisor, 0)`, so division by zero is NULL;
//! - every other scalar function call is evaluated as DataFusion would, and where that fails
//!   for a batch its halves are evaluated apart, down to the failing rows, which are NULL (`to_date('x')`,
//!   `chr(-1)`, `factorial(100)` and the like). A call on constants alone fails as before: that
//!   depends on the SQL, and is found while planning.
//!
//! What is left as an error depends on the SQL alone and is found while planning (an unknown
//! column, a literal that does not parse where a literal must). The disclosure functions
//! ([`crate::disclosure`]) are not touched: their errors are the rules' own.
//!
//! This module owns the rewrite and the wrappers; it never changes what a total expression
//! returns where the original succeeds.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, UInt64Array, new_null_array};
use datafusion::arrow::compute::{cast, concat};
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type, UInt64Type};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TryCast, Volatility,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::prelude::SessionContext;

use crate::disclosure::Disclosure;

/// Registers the rule that makes every expression of a plan total (see the module docs).
pub fn register(ctx: &SessionContext) {
    ctx.add_analyzer_rule(Arc::new(MakeTotal));
}

/// `a op b` over integers of one type, per value, NULL where the checked operation fails.
#[derive(Debug, PartialEq, Eq, Hash)]
struct IntegerOp {
    op: Operator,
    name: &'static str,
    signature: Signature,
}

const INTEGER_OPS: [(Operator, &str); 5] = [
    (Operator::Plus, "sde_checked_add"),
    (Operator::Minus, "sde_checked_sub"),
    (Operator::Multiply, "sde_checked_mul"),
    (Operator::Divide, "sde_checked_div"),
    (Operator::Modulo, "sde_checked_rem"),
];

impl IntegerOp {
    fn udf(op: Operator, name: &'static str) -> ScalarUDF {
        ScalarUDF::new_from_impl(Self {
            op,
            name,
            signature: Signature::any(2, Volatility::Immutable),
        })
    }
}

/// Applies `f` per value of two arrays of one length; NULL in, or `None` out, is NULL.
fn per_value<T: Copy, A: FromIterator<Option<T>>>(
    l: impl Iterator<Item = Option<T>>,
    r: impl Iterator<Item = Option<T>>,
    f: fn(T, T) -> Option<T>,
) -> A {
    l.zip(r).map(|(a, b)| a.zip(b).and_then(|(a, b)| f(a, b))).collect()
}

impl IntegerOp {
    /// Computes in 64 bits (signed or not, as the type), then casts back to the operands'
    /// type, where a value out of its range becomes NULL.
    fn compute(&self, l: &ArrayRef, r: &ArrayRef) -> Result<ArrayRef> {
        let t = l.data_type();
        let out: ArrayRef = if t.is_unsigned_integer() {
            let (l, r) = (cast(l, &DataType::UInt64)?, cast(r, &DataType::UInt64)?);
            let (l, r) = (l.as_primitive::<UInt64Type>(), r.as_primitive::<UInt64Type>());
            let f: fn(u64, u64) -> Option<u64> = match self.op {
                Operator::Plus => u64::checked_add,
                Operator::Minus => u64::checked_sub,
                Operator::Multiply => u64::checked_mul,
                Operator::Divide => u64::checked_div,
                _ => u64::checked_rem,
            };
            Arc::new(per_value::<u64, UInt64Array>(l.iter(), r.iter(), f))
        } else {
            let (l, r) = (cast(l, &DataType::Int64)?, cast(r, &DataType::Int64)?);
            let (l, r) = (l.as_primitive::<Int64Type>(), r.as_primitive::<Int64Type>());
            let f: fn(i64, i64) -> Option<i64> = match self.op {
                Operator::Plus => i64::checked_add,
                Operator::Minus => i64::checked_sub,
                Operator::Multiply => i64::checked_mul,
                Operator::Divide => i64::checked_div,
                _ => i64::checked_rem,
            };
            Arc::new(per_value::<i64, Int64Array>(l.iter(), r.iter(), f))
        };
        Ok(cast(&out, t)?)
    }
}

impl ScalarUDFImpl for IntegerOp {
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
        let rows = if scalar { 1 } else { args.number_rows };
        let out = self.compute(&l.to_array(rows)?, &r.to_array(rows)?)?;
        match scalar {
            true => Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?)),
            false => Ok(ColumnarValue::Array(out)),
        }
    }
}

/// A scalar function that cannot fail on data: where the function fails for a batch, each row
/// is evaluated alone and the failing rows are NULL.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Total {
    inner: Arc<ScalarUDF>,
}

impl ScalarUDFImpl for Total {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let field = self.inner.return_field_from_args(args)?;
        Ok(Arc::new(field.as_ref().clone().with_nullable(true)))
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let inner = self.inner.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Total { inner: Arc::new(inner) }))
    }
    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        // What the function simplifies to is made total in turn (`now()` to a literal, a
        // constant folded, one function into another).
        Ok(match self.inner.simplify(args, info)? {
            ExprSimplifyResult::Simplified(e) => ExprSimplifyResult::Simplified(total(e)?.data),
            ExprSimplifyResult::Original(args) => ExprSimplifyResult::Original(args),
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        // Constants only: a failure depends on the SQL, not on data, and planning relies on
        // it (constant folding leaves a call that fails for what simplifies it later, `now()`).
        if args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
            return self.inner.invoke_with_args(args);
        }
        self.rows_apart(&args, 0, args.number_rows).map(ColumnarValue::Array)
    }
}

impl Total {
    /// `len` rows from `offset`, where evaluating them together fails: each half is tried in
    /// turn, down to single rows, which are NULL where they fail. A few failing rows cost a few
    /// times the batch's own evaluation, not a call per row.
    fn rows_apart(&self, args: &ScalarFunctionArgs, offset: usize, len: usize) -> Result<ArrayRef> {
        let call = ScalarFunctionArgs {
            args: args
                .args
                .iter()
                .map(|a| match a {
                    ColumnarValue::Array(a) => ColumnarValue::Array(a.slice(offset, len)),
                    ColumnarValue::Scalar(s) => ColumnarValue::Scalar(s.clone()),
                })
                .collect(),
            number_rows: len,
            ..args.clone()
        };
        if let Ok(value) = self.inner.invoke_with_args(call).and_then(|v| v.to_array(len)) {
            return Ok(value);
        }
        if len <= 1 {
            return Ok(new_null_array(args.return_field.data_type(), len));
        }
        let half = len / 2;
        let (first, second) = (
            self.rows_apart(args, offset, half)?,
            self.rows_apart(args, offset + half, len - half)?,
        );
        Ok(concat(&[first.as_ref(), second.as_ref()])?)
    }
}

/// Whether `f` is already total, or a disclosure function (whose errors are the rules').
fn leave_as_is(f: &ScalarUDF) -> bool {
    let inner = f.inner();
    Disclosure::is_cell_rule(f)
        || inner.downcast_ref::<Total>().is_some()
        || inner.downcast_ref::<IntegerOp>().is_some()
}

/// `e` made total (see the module docs). `type_of` gives an operand's type where it is known;
/// arithmetic whose operand types are unknown is left as it is.
fn total_with(e: Expr, type_of: &dyn Fn(&Expr) -> Option<DataType>) -> Result<Transformed<Expr>> {
    e.transform_up(|e| match e {
        Expr::Cast(c) => Ok(Transformed::yes(Expr::TryCast(TryCast::new_from_field(
            c.expr, c.field,
        )))),
        Expr::ScalarFunction(f) if !leave_as_is(&f.func) => {
            let wrapped = ScalarUDF::new_from_impl(Total { inner: f.func });
            Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                Arc::new(wrapped),
                f.args,
            ))))
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let types = (type_of(&left), type_of(&right));
            let integer_op = INTEGER_OPS.iter().find(|(o, _)| *o == op);
            match (types, integer_op) {
                ((Some(l), Some(r)), Some((op, name))) if l == r && l.is_integer() => {
                    let udf = Arc::new(IntegerOp::udf(*op, name));
                    Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                        udf,
                        vec![*left, *right],
                    ))))
                }
                ((_, Some(r)), _) if matches!(op, Operator::Divide | Operator::Modulo) && r.is_numeric() => {
                    let zero = ScalarValue::new_zero(&r)?;
                    let right = datafusion::functions::expr_fn::nullif(*right, Expr::Literal(zero, None));
                    Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
                        left,
                        op,
                        Box::new(right),
                    ))))
                }
                _ => Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr { left, op, right }))),
            }
        }
        other => Ok(Transformed::no(other)),
    })
}

/// `e` made total where its operand types are not at hand (what a function simplifies to).
fn total(e: Expr) -> Result<Transformed<Expr>> {
    total_with(e, &|_| None)
}

/// The analyzer rule (after type coercion, so arithmetic operands have their final types).
#[derive(Debug)]
struct MakeTotal;

impl AnalyzerRule for MakeTotal {
    fn name(&self) -> &str {
        "sde_make_total"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            // Expressions read the inputs' columns (both sides, for a join's condition).
            let schema = match &node.inputs()[..] {
                [] => Arc::clone(node.schema()),
                [only] => Arc::clone(only.schema()),
                inputs => {
                    let mut all = DFSchema::empty();
                    inputs.iter().for_each(|i| all.merge(i.schema()));
                    Arc::new(all)
                }
            };
            let names = NamePreserver::new(&node);
            node.map_expressions(|e| {
                let name = names.save(&e);
                let type_of = |x: &Expr| x.get_type(schema.as_ref()).ok();
                Ok(total_with(e, &type_of)?.update_data(|e| name.restore(e)))
            })
        })
        .map(|t| t.data)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int32Array, StringArray};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    use super::*;

    /// The first column of `sql` over `t` (`v` BIGINT, `i` INT, `s` text, `d` DOUBLE).
    async fn column(sql: &str) -> std::result::Result<Vec<String>, String> {
        let ctx = SessionContext::new();
        register(&ctx);
        let batch = RecordBatch::try_from_iter([
            (
                "v",
                Arc::new(Int64Array::from(vec![i64::MAX, 7, 0, i64::MIN])) as ArrayRef,
            ),
            ("i", Arc::new(Int32Array::from(vec![i32::MAX, 2, 0, -1])) as ArrayRef),
            (
                "s",
                Arc::new(StringArray::from(vec!["2020-01-31", "12", "x", "-3"])) as ArrayRef,
            ),
            (
                "d",
                Arc::new(datafusion::arrow::array::Float64Array::from(vec![1.5, 2.0, 0.0, -1.0])) as ArrayRef,
            ),
        ])
        .unwrap();
        ctx.register_batch("t", batch).unwrap();
        let batches = ctx
            .sql(sql)
            .await
            .map_err(|e| e.to_string())?
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let text = pretty_format_batches(&batches).unwrap().to_string();
        Ok(text
            .lines()
            .skip(3)
            .filter(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').trim().to_owned())
            .collect())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn integer_arithmetic_is_null_where_it_would_overflow_or_divide_by_zero() {
        for (sql, want) in [
            ("SELECT v + 1 FROM t", ["", "8", "1", "-9223372036854775807"]),
            ("SELECT v * 2 FROM t", ["", "14", "0", ""]),
            ("SELECT v - 1 FROM t", ["9223372036854775806", "6", "-1", ""]),
            ("SELECT 10 / v FROM t", ["0", "1", "", "0"]),
            ("SELECT v / -1 FROM t", ["-9223372036854775807", "-7", "0", ""]),
            ("SELECT 10 % v FROM t", ["10", "3", "", "10"]),
            ("SELECT i + i FROM t", ["", "4", "0", "-2"]),
            ("SELECT 1 / i FROM t", ["0", "0", "", "-1"]),
        ] {
            assert_eq!(column(sql).await.unwrap(), strings(&want), "{sql}");
        }
        // Other numbers: division by zero is NULL too.
        let out = column("SELECT CAST(v AS DECIMAL(20, 0)) / CAST(i AS DECIMAL(10, 0)) FROM t")
            .await
            .unwrap();
        assert_eq!(out[2], "", "{out:?}");
        assert_eq!(column("SELECT 1.0 % d FROM t").await.unwrap()[2], "");
        // DECIMAL past 38 digits is DataFusion's own: it fails (the one overflow left).
        let wide = "CAST(v AS DECIMAL(38, 0)) * CAST(v AS DECIMAL(38, 0)) * CAST(v AS DECIMAL(38, 0))";
        let out = column(&format!("SELECT {wide} FROM t")).await;
        assert!(out.is_err(), "{out:?}");
    }

    #[tokio::test]
    async fn casts_and_functions_that_fail_on_a_value_are_null_for_that_value() {
        assert_eq!(
            column("SELECT CAST(s AS BIGINT) FROM t").await.unwrap(),
            strings(&["", "12", "", "-3"])
        );
        assert_eq!(
            column("SELECT CAST(s AS DATE) FROM t").await.unwrap(),
            strings(&["2020-01-31", "", "", ""])
        );
        assert_eq!(
            column("SELECT to_date(s) FROM t").await.unwrap(),
            strings(&["2020-01-31", "", "", ""])
        );
        assert_eq!(column("SELECT chr(i) FROM t").await.unwrap()[3], "");
        // A function of constants only, and functions that simplify (now()), still work.
        assert_eq!(column("SELECT abs(-2) FROM t").await.unwrap()[0], "2");
        let now = column("SELECT now() > to_timestamp('2020-01-01') FROM t").await;
        assert_eq!(now.as_ref().map(|c| c[0].as_str()), Ok("true"), "{now:?}");
        // Where nothing fails, nothing changes.
        assert_eq!(
            column("SELECT upper(s) || 'a' FROM t").await.unwrap(),
            strings(&["2020-01-31a", "12a", "Xa", "-3a"])
        );
    }
}
