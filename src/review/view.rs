//! A release request as an output checker sees it: the proposed release, row by row, each cell
//! with its true value (computed without disclosure control), the value the release would
//! carry and what the author received, and whether the rules withheld it.
//!
//! Rows are matched across the three results by their key columns (every column not under
//! disclosure control); rows with equal keys (no GROUP BY, say) are matched in order. A row of
//! the proposed release with no row in the author's result is a withheld group.

use std::collections::{HashMap, VecDeque};

use datafusion::arrow::array::Array;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::error::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellView {
    pub column: String,
    pub true_value: String,
    pub release_value: String,
    pub author_value: String,
    pub outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowView {
    pub keys: Vec<String>,
    /// The distinct people behind the row's group ([`super::people`]); empty where that cannot
    /// be said.
    pub people: String,
    pub cells: Vec<CellView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewView {
    pub key_columns: Vec<String>,
    pub rows: Vec<RowView>,
}

const NULL: &str = "NULL";

/// One result as rows of displayed values, by column name.
pub(super) struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub(super) fn of(batches: &[RecordBatch]) -> Result<Table, Error> {
        let columns = batches
            .first()
            .map(|b| b.schema().fields().iter().map(|f| f.name().clone()).collect())
            .unwrap_or_default();
        let options = FormatOptions::default();
        let mut rows = Vec::new();
        for batch in batches {
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Internal(format!("review view: {e}")))?;
            for i in 0..batch.num_rows() {
                rows.push(
                    batch
                        .columns()
                        .iter()
                        .zip(&formatters)
                        .map(|(c, f)| (!c.is_null(i)).then(|| f.value(i).to_string()))
                        .collect(),
                );
            }
        }
        Ok(Table { columns, rows })
    }

    fn index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    fn key(&self, row: &[Option<String>], keys: &[String]) -> Vec<Option<String>> {
        keys.iter()
            .map(|k| self.index(k).and_then(|i| row[i].clone()))
            .collect()
    }

    /// Row numbers by key, in order.
    fn by_key(&self, keys: &[String]) -> HashMap<Vec<Option<String>>, VecDeque<usize>> {
        let mut map: HashMap<_, VecDeque<usize>> = HashMap::new();
        for (i, row) in self.rows.iter().enumerate() {
            map.entry(self.key(row, keys)).or_default().push_back(i);
        }
        map
    }

    fn value(&self, row: Option<usize>, column: &str) -> Option<String> {
        let (row, i) = (row?, self.index(column)?);
        self.rows[row][i].clone()
    }
}

fn shown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| NULL.to_owned())
}

/// The checker's view of `proposed` (the release), beside `author` (what the author received)
/// and `truth` (the values without disclosure control), with `people` behind each group where
/// known (the group columns' names, and their table with a `people` column). `checked` are the
/// columns under disclosure control; `threshold` is quoted in the outcomes.
pub fn compare(
    checked: &[String],
    threshold: u64,
    author: &[RecordBatch],
    proposed: &[RecordBatch],
    truth: &[RecordBatch],
    people: Option<(Vec<String>, Table)>,
) -> Result<ReviewView, Error> {
    let (author, proposed, truth) = (Table::of(author)?, Table::of(proposed)?, Table::of(truth)?);
    let key_columns: Vec<String> = proposed
        .columns
        .iter()
        .filter(|c| !checked.contains(c))
        .cloned()
        .collect();
    let values: Vec<&String> = proposed.columns.iter().filter(|c| checked.contains(c)).collect();
    let (mut author_rows, mut truth_rows) = (author.by_key(&key_columns), truth.by_key(&key_columns));
    // People by group, where the groups are exactly the result's key columns.
    let people: HashMap<Vec<Option<String>>, String> = people
        .filter(|(names, _)| names.len() == key_columns.len() && key_columns.iter().all(|k| names.contains(k)))
        .map(|(_, t)| {
            t.rows
                .iter()
                .enumerate()
                .map(|(i, r)| (t.key(r, &key_columns), shown(&t.value(Some(i), "people"))))
                .collect()
        })
        .unwrap_or_default();
    let rows = proposed
        .rows
        .iter()
        .map(|row| {
            let key = proposed.key(row, &key_columns);
            let take = |m: &mut HashMap<_, VecDeque<usize>>| m.get_mut(&key).and_then(VecDeque::pop_front);
            let (a, t) = (take(&mut author_rows), take(&mut truth_rows));
            let cells = values
                .iter()
                .map(|column| {
                    let release = proposed.index(column).and_then(|i| row[i].clone());
                    let given = author.value(a, column);
                    let outcome = match (a, &given, &release) {
                        (None, _, _) => format!("withheld: group of fewer than {threshold} people"),
                        (Some(_), None, Some(_)) => format!("withheld: fewer than {threshold} people contribute"),
                        _ => "released".to_owned(),
                    };
                    CellView {
                        column: (*column).clone(),
                        true_value: shown(&truth.value(t, column)),
                        release_value: shown(&release),
                        author_value: shown(&given),
                        outcome,
                    }
                })
                .collect();
            RowView {
                people: people.get(&key).cloned().unwrap_or_default(),
                keys: key.iter().map(shown).collect(),
                cells,
            }
        })
        .collect();
    Ok(ReviewView { key_columns, rows })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn table(keys: &[&str], values: &[Option<i64>]) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("district", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        vec![
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(keys.to_vec())),
                    Arc::new(Int64Array::from(values.to_vec())),
                ],
            )
            .unwrap(),
        ]
    }

    #[test]
    fn withheld_cells_and_groups_are_told_apart_and_matched_by_key() {
        // The author got A (released) and B (cell withheld); C was withheld as a group. The
        // true values come back in another order.
        let author = table(&["A", "B"], &[Some(20), None]);
        let proposed = table(&["A", "B", "C"], &[Some(20), Some(5), Some(0)]);
        let truth = table(&["C", "B", "A"], &[Some(2), Some(6), Some(21)]);
        let people = Table {
            columns: vec!["district".into(), "people".into()],
            rows: [("B", "6"), ("A", "21"), ("C", "2")]
                .iter()
                .map(|(d, n)| vec![Some(d.to_string()), Some(n.to_string())])
                .collect(),
        };
        let v = compare(
            &["n".into()],
            10,
            &author,
            &proposed,
            &truth,
            Some((vec!["district".into()], people)),
        )
        .unwrap();
        let by_group: Vec<&str> = v.rows.iter().map(|r| r.people.as_str()).collect();
        assert_eq!(by_group, vec!["21", "6", "2"]);
        assert_eq!(v.key_columns, vec!["district".to_owned()]);
        let cells: Vec<(&str, &str, &str, &str)> = v
            .rows
            .iter()
            .map(|r| {
                let c = &r.cells[0];
                (
                    c.true_value.as_str(),
                    c.release_value.as_str(),
                    c.author_value.as_str(),
                    c.outcome.as_str(),
                )
            })
            .collect();
        assert_eq!(
            cells,
            vec![
                ("21", "20", "20", "released"),
                ("6", "5", "NULL", "withheld: fewer than 10 people contribute"),
                ("2", "0", "NULL", "withheld: group of fewer than 10 people"),
            ]
        );
    }
}
