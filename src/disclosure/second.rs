//! The second largest value of a group, for the dominance rule: a group's two largest
//! contributions are compared with its total. Kept as the two largest values seen, so it costs
//! a comparison per row (an ordered `NTH_VALUE` would hold and sort every value of the group).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::ScalarValue;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, Expr, Signature, Volatility};

#[derive(Debug, PartialEq, Eq, Hash)]
struct SecondLargest {
    signature: Signature,
}

/// `sde_second_largest(x)`: the second largest non-NULL `x` of the group (NULL with fewer than
/// two values). Never registered in a catalogue, so queries cannot call it.
pub fn second_largest(value: Expr) -> Expr {
    let udaf = AggregateUDF::from(SecondLargest {
        signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
    });
    udaf.call(vec![value])
}

impl AggregateUDFImpl for SecondLargest {
    fn name(&self) -> &str {
        "sde_second_largest"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Float64)
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::<Top2>::default())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        Ok(["first", "second"]
            .into_iter()
            .map(|n| Arc::new(Field::new(format!("{}[{n}]", args.name), DataType::Float64, true)))
            .collect())
    }
}

/// The two largest values seen.
#[derive(Debug, Default)]
struct Top2 {
    first: Option<f64>,
    second: Option<f64>,
}

impl Top2 {
    fn add(&mut self, v: f64) {
        match self.first {
            Some(first) if v > first => {
                self.second = Some(first);
                self.first = Some(v);
            }
            Some(_) => self.second = Some(self.second.map_or(v, |s| s.max(v))),
            None => self.first = Some(v),
        }
    }

    fn add_all(&mut self, values: &ArrayRef) {
        for v in values.as_primitive::<Float64Type>().iter().flatten() {
            self.add(v);
        }
    }
}

impl Accumulator for Top2 {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        self.add_all(&values[0]);
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        self.add_all(&states[0]);
        self.add_all(&states[1]);
        Ok(())
    }

    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        Ok(vec![
            ScalarValue::Float64(self.first),
            ScalarValue::Float64(self.second),
        ])
    }

    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        Ok(ScalarValue::Float64(self.second))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Float64Array;

    fn top2(values: &[Option<f64>]) -> Option<f64> {
        let mut acc = Top2::default();
        let array: ArrayRef = Arc::new(Float64Array::from(values.to_vec()));
        acc.update_batch(&[array]).unwrap();
        acc.second
    }

    #[test]
    fn the_second_largest_counts_ties_and_skips_nulls() {
        assert_eq!(top2(&[]), None);
        assert_eq!(top2(&[Some(3.0)]), None);
        assert_eq!(top2(&[Some(1.0), None, Some(5.0), Some(3.0)]), Some(3.0));
        assert_eq!(top2(&[Some(5.0), Some(5.0), Some(1.0)]), Some(5.0));
        assert_eq!(top2(&[Some(1.0), Some(2.0), Some(3.0), Some(4.0)]), Some(3.0));
    }

    #[test]
    fn partial_states_merge_to_the_same_answer() {
        let mut a = Top2::default();
        let mut b = Top2::default();
        a.update_batch(&[Arc::new(Float64Array::from(vec![9.0, 1.0])) as ArrayRef])
            .unwrap();
        b.update_batch(&[Arc::new(Float64Array::from(vec![7.0, 8.0])) as ArrayRef])
            .unwrap();
        let state: Vec<ArrayRef> = b.state().unwrap().into_iter().map(|s| s.to_array().unwrap()).collect();
        a.merge_batch(&state).unwrap();
        assert_eq!(a.evaluate().unwrap(), ScalarValue::Float64(Some(8.0)));
    }
}
