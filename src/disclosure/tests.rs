use super::*;

#[test]
fn overrides_only_tighten() {
    let o = Overrides {
        threshold: Some(3),
        rounding: Some(10),
        flatten_outliers: Some(1),
        noise_percent: Some(80),
    };
    let r = Rules::DEFAULT.tightened(&o);
    assert_eq!(
        r,
        Rules {
            threshold: 10,
            rounding: 10,
            flatten_outliers: 2,
            flatten_group: 3,
            noise_percent: 80,
        }
    );
}

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
    let d = Disclosure::new(Rules::DEFAULT, None);
    let udf = CellRule {
        kind: Kind::CountCell,
        rules: d.rules,
        key: None,
        withheld: d.withheld(),
        signature: Signature::variadic_any(Volatility::Volatile),
    };
    let counts: ArrayRef = Arc::new(Int64Array::from(vec![12, 9, 40, 40]));
    let people: ArrayRef = Arc::new(Int64Array::from(vec![10, 9, 3, 30]));
    let group: ArrayRef = Arc::new(Int64Array::from(vec![10, 9, 3, 31]));
    let args = ScalarFunctionArgs {
        args: vec![
            ColumnarValue::Array(counts),
            ColumnarValue::Array(Arc::new(BooleanArray::from(vec![false; 4]))),
            ColumnarValue::Array(people),
            ColumnarValue::Array(group),
        ],
        arg_fields: vec![],
        number_rows: 4,
        return_field: Arc::new(datafusion::arrow::datatypes::Field::new("c", DataType::Int64, true)),
        config_options: Default::default(),
    };
    let out = udf.invoke_with_args(args).unwrap().into_array(4).unwrap();
    let out = out.as_primitive::<Int64Type>();
    // 12 → 10; 9 people → NULL; 3 people → NULL; 30 of a group of 31 → NULL (the one left
    // out would be revealed by the difference with the group).
    assert_eq!(out.iter().collect::<Vec<_>>(), [Some(10), None, None, None]);
    assert_eq!(d.withheld().cells(), 3);
}
