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
            count_noise_max: 3,
            count_noise_variance_hundredths: 200,
            release_floor: 0,
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
        kind: Kind::CountCell {
            keys: 1,
            unconditioned: false,
        },
        tally: true,
        rules: d.rules,
        key: None,
        ptable: Arc::clone(&d.ptable),
        withheld: d.withheld(),
        signature: Signature::variadic_any(Volatility::Volatile),
    };
    // Cell keys whose p-table noise is 0 and +3 (D 3).
    let table = Rules::DEFAULT.ptable().unwrap().unwrap();
    let key_of = |noise: i64| (0..=255u8).find(|&k| table.noise(k) == noise).unwrap() as i64;
    let counts: ArrayRef = Arc::new(Int64Array::from(vec![12, 9, 40, 40, 12]));
    let keys: ArrayRef = Arc::new(Int64Array::from(vec![
        key_of(0),
        key_of(0),
        key_of(0),
        key_of(0),
        key_of(3),
    ]));
    let people: ArrayRef = Arc::new(Int64Array::from(vec![10, 9, 3, 30, 10]));
    let group: ArrayRef = Arc::new(Int64Array::from(vec![10, 9, 3, 31, 10]));
    let args = ScalarFunctionArgs {
        args: vec![
            ColumnarValue::Array(counts),
            ColumnarValue::Array(keys),
            ColumnarValue::Array(people),
            ColumnarValue::Array(group),
        ],
        arg_fields: vec![],
        number_rows: 5,
        return_field: Arc::new(datafusion::arrow::datatypes::Field::new("c", DataType::Int64, true)),
        config_options: Default::default(),
    };
    let out = udf.invoke_with_args(args).unwrap().into_array(5).unwrap();
    let out = out.as_primitive::<Int64Type>();
    // 12 → 10; 9 people → NULL; 3 people → NULL; 30 of a group of 31 → 40 (a count without a
    // condition of its own has no count to fall back to); 12 at a key of noise +3 → 15.
    assert_eq!(
        out.iter().collect::<Vec<_>>(),
        [Some(10), None, None, Some(40), Some(15)]
    );
    assert_eq!(d.withheld().cells(), 2);
}
