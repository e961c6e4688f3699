//! Safe Outputs, the statistical part: what may be released of an aggregate, judged per cell by
//! the number of distinct people behind it.
//!
//! The policy step rewrites every person-level aggregate so that, in the same execution, each
//! group carries its count of distinct people and each cell its count of contributing people.
//! The functions here are then applied *directly on the aggregate's output*, before anything
//! else in the query can use it:
//! - a group backed by fewer than `threshold` people is withheld (its key alone can disclose);
//! - a cell with fewer than `threshold` contributing people is NULL (so, without GROUP BY,
//!   small and absent look the same);
//! - released counts are rounded to the nearest `rounding`.
//!
//! The functions are volatile scalar UDFs built per query, never registered in a catalogue, so a
//! researcher cannot call them; each counts what it withheld for the result's metadata.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use datafusion::arrow::compute::{cast, nullif};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use serde::Serialize;

use crate::config::DisclosureConfig;

/// The disclosure rules in force for one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Rules {
    /// Fewest distinct people behind a released group or cell.
    pub threshold: u64,
    /// Released counts are rounded to the nearest multiple of this.
    pub rounding: u64,
}

impl From<&DisclosureConfig> for Rules {
    fn from(c: &DisclosureConfig) -> Self {
        Self {
            threshold: c.threshold,
            rounding: c.rounding,
        }
    }
}

/// What disclosure control withheld while one query ran.
#[derive(Debug, Default)]
pub struct Withheld {
    groups: AtomicU64,
    cells: AtomicU64,
}

impl Withheld {
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }
    pub fn cells(&self) -> u64 {
        self.cells.load(Ordering::Relaxed)
    }
}

/// Builds the disclosure expressions for one query; all share one [`Withheld`] tally.
#[derive(Debug, Clone)]
pub struct Disclosure {
    rules: Rules,
    withheld: Arc<Withheld>,
}

impl Disclosure {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            withheld: Arc::default(),
        }
    }

    pub fn rules(&self) -> Rules {
        self.rules
    }

    pub fn withheld(&self) -> Arc<Withheld> {
        Arc::clone(&self.withheld)
    }

    fn call(&self, kind: Kind, args: Vec<Expr>) -> Expr {
        let udf = CellRule {
            kind,
            rules: self.rules,
            withheld: Arc::clone(&self.withheld),
            signature: Signature::variadic_any(Volatility::Volatile),
        };
        ScalarUDF::new_from_impl(udf).call(args)
    }

    /// True where the group is backed by at least `threshold` people. `people` holds one
    /// distinct-person count per identifier in the aggregate's input; the smallest governs.
    pub fn keep_group(&self, people: Vec<Expr>) -> Expr {
        self.call(Kind::KeepGroup, people)
    }

    /// A count, rounded, or NULL where fewer than `threshold` people contribute.
    pub fn count_cell(&self, value: Expr, people: Vec<Expr>) -> Expr {
        self.call(Kind::CountCell, [vec![value], people].concat())
    }

    /// A sum or mean, or NULL where fewer than `threshold` people contribute.
    pub fn value_cell(&self, value: Expr, people: Vec<Expr>) -> Expr {
        self.call(Kind::ValueCell, [vec![value], people].concat())
    }

    /// Describes the rules and what was withheld, for the result's schema metadata.
    pub fn report(&self, checked_columns: &[String]) -> HashMap<String, String> {
        HashMap::from([
            (
                "sde.rules".to_owned(),
                serde_json::to_string(&self.rules).expect("rules serialise"),
            ),
            ("sde.checked_columns".to_owned(), checked_columns.join(",")),
            ("sde.groups_withheld".to_owned(), self.withheld.groups().to_string()),
            ("sde.cells_suppressed".to_owned(), self.withheld.cells().to_string()),
            (
                "sde.withheld_rule".to_owned(),
                format!(
                    "safe-outputs/threshold: groups and cells backed by fewer than {} people are withheld; counts rounded to the nearest {}",
                    self.rules.threshold, self.rules.rounding
                ),
            ),
        ])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    KeepGroup,
    CountCell,
    ValueCell,
}

#[derive(Debug)]
struct CellRule {
    kind: Kind,
    rules: Rules,
    withheld: Arc<Withheld>,
    signature: Signature,
}

impl PartialEq for CellRule {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.rules == other.rules && Arc::ptr_eq(&self.withheld, &other.withheld)
    }
}
impl Eq for CellRule {}
impl Hash for CellRule {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.rules.hash(state);
        Arc::as_ptr(&self.withheld).hash(state);
    }
}

/// Per row, the smallest of the people counts (NULL counts as zero people).
fn fewest_people(counts: &[ArrayRef], rows: usize) -> DFResult<Int64Array> {
    let mut fewest = vec![i64::MAX; rows];
    if counts.is_empty() {
        return Err(DataFusionError::Internal(
            "disclosure rule called without people counts".into(),
        ));
    }
    for count in counts {
        let count = cast(count, &DataType::Int64)?;
        let count = count.as_primitive::<Int64Type>();
        for (i, f) in fewest.iter_mut().enumerate() {
            let n = if count.is_null(i) { 0 } else { count.value(i) };
            *f = (*f).min(n);
        }
    }
    Ok(Int64Array::from(fewest))
}

impl ScalarUDFImpl for CellRule {
    fn name(&self) -> &str {
        match self.kind {
            Kind::KeepGroup => "sde_keep_group",
            Kind::CountCell => "sde_count_cell",
            Kind::ValueCell => "sde_value_cell",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(match self.kind {
            Kind::KeepGroup => DataType::Boolean,
            Kind::CountCell => DataType::Int64,
            Kind::ValueCell => arg_types
                .first()
                .cloned()
                .ok_or_else(|| DataFusionError::Internal("sde_value_cell needs a value".into()))?,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let threshold = self.rules.threshold as i64;
        let (value, counts) = match self.kind {
            Kind::KeepGroup => (None, &arrays[..]),
            _ => (Some(&arrays[0]), &arrays[1..]),
        };
        let fewest = fewest_people(counts, rows)?;
        // `small[i]` is true where row i is backed by too few people.
        let small = BooleanArray::from_iter(fewest.values().iter().map(|&n| Some(n < threshold)));
        let n_small = small.true_count() as u64;
        let out: ArrayRef = match self.kind {
            Kind::KeepGroup => {
                self.withheld.groups.fetch_add(n_small, Ordering::Relaxed);
                Arc::new(BooleanArray::from_iter(small.values().iter().map(|s| Some(!s))))
            }
            Kind::CountCell => {
                let value = cast(value.expect("count"), &DataType::Int64)?;
                let value = value.as_primitive::<Int64Type>();
                let base = self.rules.rounding as i64;
                let mut suppressed = 0;
                let rounded: Int64Array = (0..rows)
                    .map(|i| {
                        if small.value(i) {
                            suppressed += 1;
                            None
                        } else if value.is_null(i) {
                            None
                        } else {
                            Some(round_to(value.value(i), base))
                        }
                    })
                    .collect();
                self.withheld.cells.fetch_add(suppressed, Ordering::Relaxed);
                Arc::new(rounded)
            }
            Kind::ValueCell => {
                let value = value.expect("value");
                self.withheld.cells.fetch_add(n_small, Ordering::Relaxed);
                nullif(value.as_ref(), &small)?
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// Rounds a non-negative count to the nearest multiple of `base` (halves round up).
pub fn round_to(value: i64, base: i64) -> i64 {
    if base <= 1 {
        return value;
    }
    (value + base / 2).div_euclid(base) * base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_nearest_five() {
        let r: Vec<i64> = [0, 1, 2, 3, 7, 12, 13, 15, 1002]
            .iter()
            .map(|&v| round_to(v, 5))
            .collect();
        assert_eq!(r, [0, 0, 0, 5, 5, 10, 15, 15, 1000]);
    }

    #[test]
    fn cells_with_few_people_are_null_and_tallied() {
        let d = Disclosure::new(Rules {
            threshold: 10,
            rounding: 5,
        });
        let udf = CellRule {
            kind: Kind::CountCell,
            rules: d.rules,
            withheld: d.withheld(),
            signature: Signature::variadic_any(Volatility::Volatile),
        };
        let counts: ArrayRef = Arc::new(Int64Array::from(vec![12, 9, 40]));
        let people: ArrayRef = Arc::new(Int64Array::from(vec![10, 9, 3]));
        let args = ScalarFunctionArgs {
            args: vec![ColumnarValue::Array(counts), ColumnarValue::Array(people)],
            arg_fields: vec![],
            number_rows: 3,
            return_field: Arc::new(datafusion::arrow::datatypes::Field::new("c", DataType::Int64, true)),
            config_options: Default::default(),
        };
        let out = udf.invoke_with_args(args).unwrap().into_array(3).unwrap();
        let out = out.as_primitive::<Int64Type>();
        assert_eq!(out.iter().collect::<Vec<_>>(), [Some(10), None, None]);
        assert_eq!(d.withheld().cells(), 2);
    }
}
