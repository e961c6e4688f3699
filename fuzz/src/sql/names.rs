//! Lists of odd names and literals the grammar picks from: relations and columns that are not
//! granted or are spelled oddly, functions off the allowlist, aggregates, window calls, Arrow
//! type names, and edge-case literals.

/// Relation names that are not granted tables, or are spelled oddly.
pub(super) const ODD_TABLES: &[&str] = &[
    "opt_outs",
    "sde.public.patients",
    "public.gp_events",
    "\"Patients\"",
    "\"patients\"",
    "information_schema.tables",
    "information_schema.columns",
    "datafusion.public.patients",
    "__sde_people",
    "no_such_table",
    "\"pat\u{202E}ients\"",
    "sde.\"public\".\"asc_services\"",
];

/// Column names that do not exist, are reserved, or are identifiers spelled differently.
pub(super) const ODD_COLUMNS: &[&str] = &[
    "nhs_number",
    "__sde_pid_0",
    "__sde_side_0_u0",
    "\"person_id\"",
    "\"Person_Id\"",
    "PERSON_ID",
    "\"age\"",
    "rowid",
    "_rowid",
    "ctid",
    "\"\u{1F600}\"",
    "\"a\u{0}b\"",
    "no_such_column",
    "*",
];

/// Function names that are *not* on the gateway's allowlist (and some that do not exist).
pub(super) const EXCLUDED_FUNCTIONS: &[&str] = &[
    "random", "uuid", "make_array", "array_agg", "range", "generate_series", "unnest",
    "string_to_array", "regexp_match", "get_field", "struct", "named_struct", "map", "flatten",
    "cardinality", "array_length", "array_repeat", "array_element", "list_concat", "md5",
    "sha256", "digest", "encode", "decode", "version", "arrow_metadata", "uuid_generate",
    "pg_sleep", "sleep", "nextval", "current_user", "union_tag", "union_extract", "map_keys",
    "array_to_string", "make_map", "overlay_", "no_such_function", "CoUnT", "SUM", "row_number",
    "first_value", "lag", "lead", "rank", "ntile", "nth_value", "median", "min", "max",
    "approx_distinct", "approx_percentile_cont", "string_agg", "stddev", "var_pop", "corr",
    "covar_samp", "bit_and", "bool_or", "grouping", "bit_xor", "regr_slope",
    "approx_median", "array_distinct", "array_sort", "strpos", "date_part", "sde_concat_operator",
];

/// Aggregate and window function names, beyond those with their own variant.
pub(super) const OTHER_AGGREGATES: &[&str] = &[
    "median", "stddev", "stddev_pop", "var", "var_pop", "var_samp", "approx_distinct",
    "approx_median", "first_value", "last_value", "bit_and", "bit_or", "bit_xor", "bool_and",
    "bool_or", "string_agg", "corr", "covar_pop", "covar_samp", "regr_slope", "regr_count",
    "approx_percentile_cont", "approx_percentile_cont_with_weight", "percentile_cont",
    "nth_value", "grouping", "array_agg", "min", "max", "count", "sum", "avg", "mean",
];

pub(super) const WINDOW_FUNCTIONS: &[&str] = &[
    "row_number()", "rank()", "dense_rank()", "percent_rank()", "cume_dist()", "ntile(4)",
    "lag(age)", "lead(age, 1, 0)", "first_value(age)", "last_value(district)", "nth_value(age, 2)",
];

pub(super) const ARROW_TYPES: &[&str] = &[
    "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt64", "Float16", "Float32", "Float64",
    "Utf8", "LargeUtf8", "Utf8View", "Binary", "BinaryView", "Boolean", "Date32", "Date64",
    "Decimal128(38, 10)", "Decimal256(76, 40)", "Decimal128(1, 0)", "Decimal32(9, 2)",
    "Timestamp(Nanosecond, None)", "Timestamp(Second, Some(\"+00:00\"))", "Time64(Nanosecond)",
    "Duration(Second)", "Interval(MonthDayNano)", "Dictionary(Int32, Utf8)",
    "Dictionary(Int8, Int64)", "List(Int64)", "FixedSizeBinary(3)", "Null", "garbage",
    "Struct(\"a\": Int32)", "Map(\"entries\": Struct(\"key\": Utf8, \"value\": Int64), false)", "",
];

/// Odd literals: NUL bytes, huge and tiny numbers, Unicode edge cases.
pub(super) const ODD_LITERALS: &[&str] = &[
    "'\0'",
    "'a\0b'",
    "E'\\x00'",
    "E'\\u0000'",
    "'\u{202E}A\u{202D}'",
    "'\u{200F}\u{05D0}\u{200E}'",
    "'\u{1F600}\u{1F469}\u{200D}\u{1F4BB}'",
    "'e\u{301}\u{301}\u{301}'",
    "'\u{FEFF}'",
    "'\u{200B}'",
    "'\u{FFFD}'",
    "'\u{10FFFF}'",
    "'\u{0130}'",
    "'ß'",
    "''''",
    "'\\'",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "170141183460469231731687303715884105727",
    "340282366920938463463374607431768211456",
    "1e308",
    "1e309",
    "-1e309",
    "1e-400",
    "0e0",
    "-0.0",
    ".5",
    "5.",
    "0x7fffffffffffffff",
    "0xFFFFFFFFFFFFFFFFFF",
    "'NaN'::DOUBLE",
    "'Infinity'::DOUBLE",
    "'-inf'::DOUBLE",
    "99999999999999999999999999999999999999.99999999999999999999999999999999999999",
    "0.000000000000000000000000000000000000000000000000000000000000000000000000000000001",
    "DATE '9999-12-31'",
    "DATE '0001-01-01'",
    "DATE '-1000000-01-01'",
    "DATE '2024-02-30'",
    "TIMESTAMP '262143-12-31 23:59:59'",
    "TIMESTAMP '1677-09-21 00:12:44'",
    "INTERVAL '9223372036854775807' SECOND",
    "INTERVAL '1000000000 years'",
    "INTERVAL '-2147483648 months'",
    "X'00FF'",
    "X'0'",
    "B'0101'",
    "N'national'",
    "U&'\\0041'",
    "$$dollar$$",
    "'2024-01-01'::DATE",
    "CAST(NULL AS INT)",
    "NULL::TEXT",
    "1::BIGINT UNSIGNED",
    "-(-9223372036854775808)",
    "~0",
    "1/0",
    "0/0.0",
    "-9223372036854775808 / -1",
    "9223372036854775807 + 1",
    "2 ^ 1000",
    "10000000000 * 10000000000",
];
