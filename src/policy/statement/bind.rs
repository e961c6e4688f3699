//! Bound parameters: the `?` or `$n` placeholders of a prepared statement replaced, in the
//! parsed statement, by literals of the values a client bound, and the statement written out
//! again as SQL. Everything after that judges the bound SQL as it would any query (the gate,
//! the plan checks, disclosure control), and the audit log records it, so a replay needs no
//! parameters.
//!
//! A value becomes a literal node of the syntax tree, never text spliced into the SQL: a
//! string with quotes, `--` or a statement in it stays one string literal (written out with its
//! quotes doubled), so a parameter can stand only where a value could.

use std::ops::ControlFlow;

use datafusion::common::ScalarValue;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{Expr, Value, visit_expressions_mut};

use super::PolicyError;

/// The parameter a placeholder names, from 0: `$n` is n − 1; each `?` the next in order.
fn index(placeholder: &str, next: &mut usize) -> Result<usize, PolicyError> {
    if placeholder == "?" {
        *next += 1;
        return Ok(*next - 1);
    }
    placeholder
        .strip_prefix('$')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .map(|n| n - 1)
        .ok_or_else(|| PolicyError::Sql(format!("placeholder {placeholder} is not ? or $1, $2, …")))
}

/// Number of parameters `statement` takes: the highest `$n`, or the number of `?`.
pub fn count(statement: &mut DFStatement) -> Result<usize, PolicyError> {
    let mut next = 0;
    let mut most = 0;
    let mut error = None;
    walk(statement, |placeholder| match index(placeholder, &mut next) {
        Ok(i) => {
            most = most.max(i + 1);
            None
        }
        Err(e) => {
            error = Some(e);
            None
        }
    });
    error.map_or(Ok(most), Err)
}

/// Replaces every placeholder of `statement` by the literal of its value in `values`.
pub fn bind(statement: &mut DFStatement, values: &[ScalarValue]) -> Result<String, PolicyError> {
    let mut next = 0;
    let mut error = None;
    walk(statement, |placeholder| {
        let literal = index(placeholder, &mut next).and_then(|i| {
            values.get(i).ok_or_else(|| {
                PolicyError::Sql(format!(
                    "placeholder {placeholder} has no bound value ({} bound)",
                    values.len()
                ))
            })
        });
        match literal.and_then(literal_of) {
            Ok(value) => Some(value),
            Err(e) => {
                error.get_or_insert(e);
                None
            }
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    Ok(statement.to_string())
}

/// Calls `f` on each placeholder of `statement`, putting in its place the value `f` returns.
fn walk(statement: &mut DFStatement, mut f: impl FnMut(&str) -> Option<Value>) {
    let DFStatement::Statement(inner) = statement else {
        return;
    };
    let _ = visit_expressions_mut(inner.as_mut(), |e| {
        if let Expr::Value(v) = e
            && let Value::Placeholder(p) = &v.value
            && let Some(value) = f(&p.clone())
        {
            v.value = value;
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The SQL literal of a bound value; dates and times as strings, which DataFusion reads as the
/// column's type where they are compared with one.
fn literal_of(value: &ScalarValue) -> Result<Value, PolicyError> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let unsupported = || {
        PolicyError::Sql(format!(
            "a bound parameter of type {} is not supported; bind numbers, strings, booleans, dates or times",
            value.data_type()
        ))
    };
    Ok(match value {
        ScalarValue::Boolean(Some(b)) => Value::Boolean(*b),
        ScalarValue::Int8(_)
        | ScalarValue::Int16(_)
        | ScalarValue::Int32(_)
        | ScalarValue::Int64(_)
        | ScalarValue::UInt8(_)
        | ScalarValue::UInt16(_)
        | ScalarValue::UInt32(_)
        | ScalarValue::UInt64(_)
        | ScalarValue::Decimal128(..) => Value::Number(value.to_string(), false),
        ScalarValue::Float32(Some(f)) if f.is_finite() => Value::Number(f.to_string(), false),
        ScalarValue::Float64(Some(f)) if f.is_finite() => Value::Number(f.to_string(), false),
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            Value::SingleQuotedString(s.clone())
        }
        ScalarValue::Date32(_)
        | ScalarValue::Date64(_)
        | ScalarValue::TimestampSecond(..)
        | ScalarValue::TimestampMillisecond(..)
        | ScalarValue::TimestampMicrosecond(..)
        | ScalarValue::TimestampNanosecond(..) => Value::SingleQuotedString(value.to_string()),
        _ => return Err(unsupported()),
    })
}
