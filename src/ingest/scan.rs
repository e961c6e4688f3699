//! The identifier scan: before a dataset is served (and at the end of every ingest) its schema
//! and a sample of its values are checked for direct identifiers — NHS numbers with a valid
//! check digit, full postcodes, names, email addresses, phone numbers and full dates of birth —
//! in any text column, free text included. Columns marked as identifiers (the pseudonym
//! `person_id` and any the spec or config marks) are exempt: only the engine may use them.
//! A finding names the column and the kind of identifier, never the values.

use std::fs::File;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::nhs;
use super::version::parquet_files;

/// Rows read from the start of each Parquet file.
pub const SAMPLE_ROWS_PER_FILE: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdentifierKind {
    NhsNumber,
    Postcode,
    Name,
    Email,
    Phone,
    DateOfBirth,
}

impl std::fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NhsNumber => "NHS numbers",
            Self::Postcode => "full postcodes",
            Self::Name => "names",
            Self::Email => "email addresses",
            Self::Phone => "phone numbers",
            Self::DateOfBirth => "full dates of birth",
        })
    }
}

/// A column that looks like a direct identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub column: String,
    pub kind: IdentifierKind,
    /// How many sampled values matched (0 where the column's name alone gave it away).
    pub matches: usize,
    pub sampled: usize,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.matches == 0 {
            write!(f, "column {} is named as {}", self.column, self.kind)
        } else {
            write!(
                f,
                "column {} holds {} ({} of {} sampled values)",
                self.column, self.kind, self.matches, self.sampled
            )
        }
    }
}

/// Findings in a sample of every Parquet file directly in `dir`.
pub fn scan_dir(dir: &Path, exempt: &[String]) -> Result<Vec<Finding>, parquet::errors::ParquetError> {
    let mut totals: Vec<Finding> = Vec::new();
    for path in parquet_files(dir)? {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path)?)?
            .with_batch_size(SAMPLE_ROWS_PER_FILE)
            .with_limit(SAMPLE_ROWS_PER_FILE)
            .build()?;
        for batch in reader {
            merge(&mut totals, scan_batch(&batch?, exempt));
        }
    }
    Ok(totals)
}

/// Adds `more` into `totals`, one finding per (column, kind).
pub fn merge(totals: &mut Vec<Finding>, more: Vec<Finding>) {
    for f in more {
        match totals.iter_mut().find(|t| t.column == f.column && t.kind == f.kind) {
            Some(t) => {
                t.matches += f.matches;
                t.sampled += f.sampled;
            }
            None => totals.push(f),
        }
    }
}

/// Findings in one batch; columns named in `exempt` are skipped.
pub fn scan_batch(batch: &RecordBatch, exempt: &[String]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name();
        if exempt.iter().any(|e| e == name) {
            continue;
        }
        if let Some(finding) = full_dates_of_birth(name, column) {
            findings.push(finding);
            continue;
        }
        if let Some(finding) = numeric_nhs_numbers(name, column) {
            findings.push(finding);
            continue;
        }
        if let Some(kind) = kind_by_name(name, field.data_type()) {
            findings.push(Finding {
                column: name.clone(),
                kind,
                matches: 0,
                sampled: 0,
            });
            continue;
        }
        let mut counts = [0usize; 6];
        let mut sampled = 0;
        let mut tally = |text: &str| {
            sampled += 1;
            for kind in kinds_in(text) {
                counts[kind as usize] += 1;
            }
        };
        match column.data_type() {
            DataType::Utf8 => column.as_string::<i32>().iter().flatten().for_each(&mut tally),
            DataType::LargeUtf8 => column.as_string::<i64>().iter().flatten().for_each(&mut tally),
            DataType::Utf8View => column.as_string_view().iter().flatten().for_each(&mut tally),
            _ => continue,
        }
        for kind in ALL_KINDS {
            if counts[kind as usize] > 0 {
                findings.push(Finding {
                    column: name.clone(),
                    kind,
                    matches: counts[kind as usize],
                    sampled,
                });
            }
        }
    }
    findings
}

const ALL_KINDS: [IdentifierKind; 6] = [
    IdentifierKind::NhsNumber,
    IdentifierKind::Postcode,
    IdentifierKind::Name,
    IdentifierKind::Email,
    IdentifierKind::Phone,
    IdentifierKind::DateOfBirth,
];

/// Whether `name` says the column holds dates of birth.
fn is_birth_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains("birth") || lower == "dob" || lower.ends_with("_dob")
}

/// A date column named for births holding full dates: any sampled date that is not the first
/// of its month (a month of birth, as `generalise` to `month` makes, is not a full date).
fn full_dates_of_birth(name: &str, column: &dyn Array) -> Option<Finding> {
    if column.data_type() != &DataType::Date32 || !is_birth_name(name) {
        return None;
    }
    let dates = column.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
    let full = dates
        .iter()
        .flatten()
        .filter(|&days| super::generalise::date_from_days(days).is_some_and(|d| chrono::Datelike::day(&d) != 1))
        .count();
    Some(Finding {
        column: name.to_owned(),
        kind: IdentifierKind::DateOfBirth,
        matches: full,
        sampled: dates.len() - dates.null_count(),
    })
    .filter(|f| f.matches > 0)
}

/// An integer column most of whose values are valid NHS numbers (a random 10-digit number
/// passes the check one time in eleven or so, hence "most" rather than "any").
fn numeric_nhs_numbers(name: &str, column: &dyn Array) -> Option<Finding> {
    use datafusion::arrow::datatypes::{Int64Type, UInt64Type};
    let values: Vec<u64> = match column.data_type() {
        DataType::Int64 => column
            .as_primitive::<Int64Type>()
            .iter()
            .flatten()
            .map(|v| v as u64)
            .collect(),
        DataType::UInt64 => column.as_primitive::<UInt64Type>().iter().flatten().collect(),
        _ => return None,
    };
    let matches = values
        .iter()
        .filter(|&&v| (1_000_000_000..=9_999_999_999).contains(&v) && nhs::normalise(&v.to_string()).is_ok())
        .count();
    (matches > 0 && matches * 2 >= values.len()).then(|| Finding {
        column: name.to_owned(),
        kind: IdentifierKind::NhsNumber,
        matches,
        sampled: values.len(),
    })
}

/// A column whose name says what it holds.
fn kind_by_name(name: &str, data_type: &DataType) -> Option<IdentifierKind> {
    let lower = name.to_ascii_lowercase();
    let kind = match lower.as_str() {
        "nhs" | "nhs_number" | "nhs_no" | "nhsnumber" | "nhs_num" => IdentifierKind::NhsNumber,
        "postcode" | "post_code" | "postal_code" | "full_postcode" => IdentifierKind::Postcode,
        "name" | "full_name" | "forename" | "forenames" | "surname" | "given_name" | "family_name" | "first_name"
        | "last_name" | "patient_name" => IdentifierKind::Name,
        "email" | "email_address" | "e_mail" => IdentifierKind::Email,
        "phone" | "phone_number" | "telephone" | "mobile" | "tel" => IdentifierKind::Phone,
        "address" | "address_line_1" | "address_1" | "street" => IdentifierKind::Postcode,
        _ => {
            // Date32 columns are judged by their values (above); text and finer types by name.
            let full_date = matches!(
                data_type,
                DataType::Date64 | DataType::Timestamp(..) | DataType::Utf8 | DataType::LargeUtf8
            );
            if is_birth_name(name) && full_date {
                IdentifierKind::DateOfBirth
            } else {
                return None;
            }
        }
    };
    Some(kind)
}

/// The kinds of identifier found in one text value.
pub fn kinds_in(text: &str) -> Vec<IdentifierKind> {
    let mut kinds = Vec::new();
    if has_nhs_number(text) {
        kinds.push(IdentifierKind::NhsNumber);
    }
    let words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '@' && c != '.' && c != '\'' && c != '-')
        .map(|w| w.trim_matches(|c| c == '.' || c == '-' || c == '\''))
        .filter(|w| !w.is_empty())
        .collect();
    if has_postcode(&words) {
        kinds.push(IdentifierKind::Postcode);
    }
    if has_name(&words) {
        kinds.push(IdentifierKind::Name);
    }
    if words.iter().any(|w| is_email(w)) {
        kinds.push(IdentifierKind::Email);
    }
    if has_phone(text) {
        kinds.push(IdentifierKind::Phone);
    }
    kinds
}

/// Runs of digits, spaces, dashes, brackets and `+`, each reduced to its digits (with a
/// leading `+` kept).
fn number_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run = String::new();
    let mut digits = 0;
    for c in text.chars().chain(std::iter::once('x')) {
        match c {
            '0'..='9' => {
                run.push(c);
                digits += 1;
            }
            '+' if run.is_empty() => run.push(c),
            ' ' | '-' | '(' | ')' if !run.is_empty() => {}
            _ => {
                if digits > 0 {
                    runs.push(std::mem::take(&mut run));
                }
                run.clear();
                digits = 0;
            }
        }
    }
    runs
}

fn has_nhs_number(text: &str) -> bool {
    number_runs(text)
        .iter()
        .any(|run| run.len() == 10 && nhs::normalise(run).is_ok())
}

fn has_phone(text: &str) -> bool {
    number_runs(text).iter().any(|run| {
        (run.len() == 11 && run.starts_with('0') && run.as_bytes()[1] != b'0')
            || (run.starts_with("+44") && run.len() == 13)
    })
}

fn is_email(word: &str) -> bool {
    let Some((local, domain)) = word.split_once('@') else {
        return false;
    };
    !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
}

/// A UK outward code: A9, A9A, A99, AA9, AA9A or AA99.
pub fn is_outward(code: &str) -> bool {
    let b = code.as_bytes();
    let (alpha, digit) = (|c: &u8| c.is_ascii_alphabetic(), |c: &u8| c.is_ascii_digit());
    match b.len() {
        2 => alpha(&b[0]) && digit(&b[1]),
        3 => alpha(&b[0]) && ((digit(&b[1]) && (digit(&b[2]) || alpha(&b[2]))) || (alpha(&b[1]) && digit(&b[2]))),
        4 => alpha(&b[0]) && alpha(&b[1]) && digit(&b[2]) && (digit(&b[3]) || alpha(&b[3])),
        _ => false,
    }
}

/// A UK inward code: 9AA.
pub fn is_inward(code: &str) -> bool {
    let b = code.as_bytes();
    b.len() == 3 && b[0].is_ascii_digit() && b[1].is_ascii_alphabetic() && b[2].is_ascii_alphabetic()
}

/// A full postcode with or without its space (`CM1 1AA`, `cm11aa`).
pub fn is_full_postcode(text: &str) -> bool {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    compact.is_ascii()
        && (5..=7).contains(&compact.len())
        && is_outward(&compact[..compact.len() - 3])
        && is_inward(&compact[compact.len() - 3..])
}

fn has_postcode(words: &[&str]) -> bool {
    words.iter().any(|w| is_full_postcode(w)) || words.windows(2).any(|p| is_outward(p[0]) && is_inward(p[1]))
}

fn has_name(words: &[&str]) -> bool {
    let given = |w: &str| GIVEN_NAMES.iter().any(|n| n.eq_ignore_ascii_case(w));
    let family = |w: &str| FAMILY_NAMES.iter().any(|n| n.eq_ignore_ascii_case(w));
    words
        .windows(2)
        .any(|p| (given(p[0]) && family(p[1])) || (family(p[0]) && given(p[1])))
}

/// Common given names in England and Wales (ONS), without words that are also ordinary
/// English (Grace, May, Will), so that category labels are not taken for names.
pub const GIVEN_NAMES: [&str; 48] = [
    "Oliver",
    "George",
    "Harry",
    "Jack",
    "Jacob",
    "Noah",
    "Charlie",
    "Thomas",
    "Oscar",
    "William",
    "James",
    "Henry",
    "Leo",
    "Alfie",
    "Joshua",
    "Freddie",
    "Archie",
    "Ethan",
    "Isaac",
    "Alexander",
    "Daniel",
    "David",
    "Michael",
    "John",
    "Olivia",
    "Amelia",
    "Isla",
    "Emily",
    "Ava",
    "Jessica",
    "Isabella",
    "Sophia",
    "Mia",
    "Ruby",
    "Lily",
    "Evie",
    "Sophie",
    "Chloe",
    "Ella",
    "Freya",
    "Charlotte",
    "Margaret",
    "Susan",
    "Sarah",
    "Elizabeth",
    "Patricia",
    "Mary",
    "Karen",
];

/// Common surnames in England and Wales.
pub const FAMILY_NAMES: [&str; 40] = [
    "Smith", "Jones", "Williams", "Taylor", "Brown", "Davies", "Evans", "Wilson", "Thomas", "Johnson", "Roberts",
    "Robinson", "Thompson", "Wright", "Walker", "White", "Edwards", "Hughes", "Green", "Hall", "Lewis", "Harris",
    "Clarke", "Patel", "Jackson", "Wood", "Turner", "Martin", "Cooper", "Hill", "Ward", "Morris", "Moore", "Clark",
    "Lee", "King", "Baker", "Harrison", "Morgan", "Allen",
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Date32Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    #[test]
    fn each_kind_is_found_in_free_text() {
        use IdentifierKind::*;
        let cases = [
            ("seen 943 476 5919 today", vec![NhsNumber]),
            ("lives at CM1 2AB near the park", vec![Postcode]),
            ("moved to co153jt last year", vec![Postcode]),
            ("spoke to Margaret Smith", vec![Name]),
            ("write to a.b@example.org", vec![Email]),
            ("call 01245 123456", vec![Phone]),
            ("call +44 7700 900123", vec![Phone]),
        ];
        for (text, want) in cases {
            assert_eq!(kinds_in(text), want, "{text}");
        }
        // Ordinary values found in the demo data are not identifiers.
        for text in [
            "9434765918", // check digit wrong
            "44054006",
            "CM1",
            "Home care",
            "White",
            "Black, Black British, Caribbean or African",
            "Referred to ASC",
            "2025-03-01",
            "Support with memory and cognition",
        ] {
            assert!(kinds_in(text).is_empty(), "{text}: {:?}", kinds_in(text));
        }
    }

    #[test]
    fn numeric_nhs_numbers_and_full_dates_of_birth_are_found_by_value() {
        use datafusion::arrow::array::Int64Array;
        let schema = Arc::new(Schema::new(vec![
            Field::new("ref", DataType::Int64, false),
            Field::new("epoch_seconds", DataType::Int64, false),
            Field::new("date_of_birth", DataType::Date32, false),
            Field::new("month_of_birth", DataType::Date32, false),
        ]));
        // 2024-10-01 is day 19997; 19998 is the 2nd.
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![9434765919, 4010232137, 9990000026])),
            Arc::new(Int64Array::from(vec![1_700_000_000, 1_700_000_001, 1_700_000_002])),
            Arc::new(Date32Array::from(vec![19_997, 19_998, 19_997])),
            Arc::new(Date32Array::from(vec![19_997, 19_997, 19_997])),
        ];
        let batch = RecordBatch::try_new(schema, columns).unwrap();
        let got: Vec<(String, IdentifierKind, usize)> = scan_batch(&batch, &[])
            .into_iter()
            .map(|f| (f.column, f.kind, f.matches))
            .collect();
        assert_eq!(
            got,
            [
                ("ref".to_owned(), IdentifierKind::NhsNumber, 3),
                ("date_of_birth".to_owned(), IdentifierKind::DateOfBirth, 1)
            ]
        );
    }

    #[test]
    fn columns_are_judged_by_name_and_by_sampled_values_and_exemptions_hold() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("notes", DataType::Utf8, true),
            Field::new("date_of_birth", DataType::Date32, false),
            Field::new("service", DataType::Utf8, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["9434765919", "x"])),
            Arc::new(StringArray::from(vec![Some("fine"), Some("home is SS14 3AB")])),
            Arc::new(Date32Array::from(vec![0, 1])),
            Arc::new(StringArray::from(vec!["Day care", "Home care"])),
        ];
        let batch = RecordBatch::try_new(schema, columns).unwrap();
        let findings = scan_batch(&batch, &["person_id".to_owned()]);
        let got: Vec<(&str, IdentifierKind, usize)> = findings
            .iter()
            .map(|f| (f.column.as_str(), f.kind, f.matches))
            .collect();
        assert_eq!(
            got,
            [
                ("notes", IdentifierKind::Postcode, 1),
                ("date_of_birth", IdentifierKind::DateOfBirth, 1)
            ]
        );
        assert_eq!(
            findings[0].to_string(),
            "column notes holds full postcodes (1 of 2 sampled values)"
        );
        // Without the exemption the leftover NHS number is found.
        assert!(
            scan_batch(&batch, &[])
                .iter()
                .any(|f| f.column == "person_id" && f.kind == IdentifierKind::NhsNumber)
        );
    }
}
