//! `sde_cell_key(person, contributes)`: the cell key of a count, the sum modulo 256 of the
//! record keys of what the count counts, computed in the same pass as the count itself.
//!
//! Each person has a secret **record key** (0–255): the top byte of a keyed mix of the 64-bit
//! fingerprint that tells people apart ([`super::people_at_least`]), keyed by secrets derived
//! from the gateway's perturbation key. Nobody without that key can tell a person's record key,
//! and the same person always has the same one, in every session and after a restart.
//!
//! A count's cell key depends only on what it counts ([`Counted`]):
//! - [`Counted::Rows`] (`COUNT(*)`, `COUNT(x)`): the record keys of its contributing rows, each
//!   row adding its person's key, so the same rows give the same key however the SQL selects
//!   them;
//! - [`Counted::People`] (`COUNT(DISTINCT …)`): the record keys of its distinct contributing
//!   people, each once, so the same people give the same key however many rows each has.
//!
//! The key picks the count's noise from the p-table ([`super::ptable`]). Rows without a person
//! add nothing. Never registered in a catalogue, so queries cannot call it.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::ScalarValue;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature, Volatility,
};

use super::fingerprint::hash_rows;
use super::noise::mix;

/// The secrets that turn a person's fingerprint into their record key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordKeys([u64; 2]);

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKeys(…)")
    }
}

impl RecordKeys {
    pub fn new(secrets: [u64; 2]) -> Self {
        Self(secrets)
    }

    /// The record key (0–255) of the person with fingerprint `person`.
    pub fn of(&self, person: u64) -> u64 {
        mix(mix(person ^ self.0[0]) ^ self.0[1]) >> 56
    }
}

/// What a count counts, and so which record keys make its cell key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counted {
    /// Rows: each contributing row adds its person's record key.
    Rows,
    /// Distinct people: each contributing person adds their record key once.
    People,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CellKey {
    keys: RecordKeys,
    counted: Counted,
    signature: Signature,
}

/// The cell key (0–255, `Int64`) of the rows or people of each group whose `contributes`
/// (a `Boolean`, NULL is false) holds.
pub fn cell_key(person: Expr, contributes: Expr, keys: RecordKeys, counted: Counted) -> Expr {
    let udaf = AggregateUDF::from(CellKey {
        keys,
        counted,
        signature: Signature::any(2, Volatility::Immutable),
    });
    udaf.call(vec![person, contributes])
}

impl AggregateUDFImpl for CellKey {
    fn name(&self) -> &str {
        "sde_cell_key"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(One(self.groups())))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        let kind = match self.counted {
            Counted::Rows => DataType::UInt64,
            Counted::People => DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true))),
        };
        Ok(vec![Arc::new(Field::new(format!("{}[keys]", args.name), kind, true))])
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(self.groups()))
    }
}

impl CellKey {
    fn groups(&self) -> Groups {
        Groups {
            keys: self.keys,
            sums: match self.counted {
                Counted::Rows => Some(Vec::new()),
                Counted::People => None,
            },
            people: Vec::new(),
            hashes: Vec::new(),
        }
    }
}

/// Fingerprints are hashes already: a set of them needs no second hash.
#[derive(Default)]
struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type People = HashSet<u64, BuildHasherDefault<Identity>>;

/// The per-group accumulator: the record keys' running sums (rows), or the fingerprints of the
/// group's contributing people (people).
struct Groups {
    keys: RecordKeys,
    sums: Option<Vec<u64>>,
    people: Vec<People>,
    hashes: Vec<u64>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").field("groups", &self.len()).finish()
    }
}

impl Groups {
    fn len(&self) -> usize {
        self.sums.as_ref().map_or(self.people.len(), Vec::len)
    }

    fn resize(&mut self, groups: usize) {
        match &mut self.sums {
            Some(sums) => sums.resize(groups, 0),
            None => self.people.resize_with(groups, People::default),
        }
    }

    /// Adds each counted row of `values` (person, contributes) to its group.
    fn add(&mut self, values: &[ArrayRef], groups: &[usize], filter: Option<&BooleanArray>) -> DFResult<()> {
        let (person, contributes) = (&values[0], values[1].as_boolean());
        hash_rows(person, &mut self.hashes)?;
        let counted = |row: usize| {
            person.is_valid(row)
                && contributes.is_valid(row)
                && contributes.value(row)
                && filter.is_none_or(|f| f.is_valid(row) && f.value(row))
        };
        for (row, (&group, &hash)) in groups.iter().zip(&self.hashes).enumerate() {
            if !counted(row) {
                continue;
            }
            match &mut self.sums {
                Some(sums) => sums[group] = sums[group].wrapping_add(self.keys.of(hash)),
                None => {
                    self.people[group].insert(hash);
                }
            }
        }
        Ok(())
    }

    /// The cell keys of the groups `emit_to` takes.
    fn keys_of(&mut self, emit_to: EmitTo) -> Int64Array {
        let keys = self.keys;
        match &mut self.sums {
            Some(sums) => Int64Array::from_iter_values(emit_to.take_needed(sums).into_iter().map(|s| (s & 255) as i64)),
            None => Int64Array::from_iter_values(emit_to.take_needed(&mut self.people).iter().map(|set| {
                let sum = set.iter().fold(0u64, |s, &h| s.wrapping_add(keys.of(h)));
                (sum & 255) as i64
            })),
        }
    }

    /// The partial states of the groups `emit_to` takes.
    fn states_of(&mut self, emit_to: EmitTo) -> ArrayRef {
        match &mut self.sums {
            Some(sums) => Arc::new(UInt64Array::from(emit_to.take_needed(sums))),
            None => Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
                emit_to
                    .take_needed(&mut self.people)
                    .iter()
                    .map(|set| Some(set.iter().map(|h| Some(*h)))),
            )),
        }
    }

    fn merge(&mut self, states: &ArrayRef, groups: &[usize]) {
        match &mut self.sums {
            Some(sums) => {
                let partial = states.as_primitive::<UInt64Type>();
                for (row, &group) in groups.iter().enumerate() {
                    if partial.is_valid(row) {
                        sums[group] = sums[group].wrapping_add(partial.value(row));
                    }
                }
            }
            None => {
                let lists = states.as_list::<i32>();
                for (row, &group) in groups.iter().enumerate() {
                    if lists.is_valid(row) {
                        let people = &mut self.people[group];
                        people.extend(lists.value(row).as_primitive::<UInt64Type>().values().iter().copied());
                    }
                }
            }
        }
    }
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DFResult<()> {
        self.resize(total_num_groups);
        self.add(values, group_indices, opt_filter)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DFResult<ArrayRef> {
        Ok(Arc::new(self.keys_of(emit_to)))
    }

    fn state(&mut self, emit_to: EmitTo) -> DFResult<Vec<ArrayRef>> {
        Ok(vec![self.states_of(emit_to)])
    }

    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> DFResult<()> {
        self.resize(total_num_groups);
        self.merge(&values[0], group_indices);
        Ok(())
    }

    /// Each row as a partial state of its own (used when DataFusion skips partial aggregation).
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> DFResult<Vec<ArrayRef>> {
        let mut each = Groups {
            keys: self.keys,
            sums: self.sums.as_ref().map(|_| Vec::new()),
            people: Vec::new(),
            hashes: Vec::new(),
        };
        let rows = values[0].len();
        each.resize(rows);
        let groups: Vec<usize> = (0..rows).collect();
        each.add(values, &groups, opt_filter)?;
        Ok(vec![each.states_of(EmitTo::All)])
    }

    fn size(&self) -> usize {
        self.sums.as_ref().map_or(0, |s| s.capacity() * 8)
            + self.people.capacity() * std::mem::size_of::<People>()
            + self.people.iter().map(|s| s.capacity() * 16).sum::<usize>()
            + self.hashes.capacity() * 8
    }
}

/// The accumulator of a count without groups: one group of [`Groups`].
#[derive(Debug)]
struct One(Groups);

impl Accumulator for One {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        self.0.resize(1);
        self.0.add(values, &vec![0; values[0].len()], None)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        self.0.resize(1);
        self.0.merge(&states[0], &vec![0; states[0].len()]);
        Ok(())
    }

    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        self.0.resize(1);
        Ok(vec![ScalarValue::try_from_array(&self.0.states_of(EmitTo::All), 0)?])
    }

    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        self.0.resize(1);
        Ok(ScalarValue::Int64(Some(self.0.keys_of(EmitTo::All).value(0))))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.0.size()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{SessionContext, col, lit};

    use super::*;

    const KEYS: RecordKeys = RecordKeys([11, 13]);

    /// Table `t` of `(g, person)` rows, three to a partition (so partial states merge).
    fn context(rows: &[(&str, &str)]) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, false),
            Field::new("person", DataType::Utf8, true),
        ]));
        let partitions = rows
            .chunks(3)
            .map(|chunk| {
                let g: StringArray = chunk.iter().map(|(g, _)| Some(*g)).collect();
                let p: StringArray = chunk.iter().map(|(_, p)| Some(*p)).collect();
                vec![RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(g), Arc::new(p)]).unwrap()]
            })
            .collect();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, partitions).unwrap()))
            .unwrap();
        ctx
    }

    /// The key of each group `g` (sorted by `g`), and of the whole table.
    async fn keys(rows: &[(&str, &str)], counted: Counted) -> (Vec<i64>, i64) {
        let ctx = context(rows);
        let key = || cell_key(col("person"), lit(true), KEYS, counted).alias("k");
        let grouped = ctx
            .table("t")
            .await
            .unwrap()
            .aggregate(vec![col("g")], vec![key()])
            .unwrap();
        let batches = grouped
            .sort(vec![col("g").sort(true, false)])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let per_group = batches
            .iter()
            .flat_map(|b| {
                b.column(1)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        let whole = ctx.table("t").await.unwrap().aggregate(vec![], vec![key()]).unwrap();
        let whole = whole.collect().await.unwrap()[0]
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0);
        (per_group, whole)
    }

    fn fingerprint(person: &str) -> u64 {
        let mut h = Vec::new();
        hash_rows(&(Arc::new(StringArray::from(vec![person])) as ArrayRef), &mut h).unwrap();
        h[0]
    }

    #[tokio::test]
    async fn a_cell_key_sums_record_keys_of_rows_or_of_distinct_people() {
        let rows = [
            ("a", "p1"),
            ("a", "p2"),
            ("a", "p1"),
            ("b", "p3"),
            ("a", "p1"),
            ("b", "p3"),
        ];
        let rk = |p: &str| KEYS.of(fingerprint(p)) as i64;
        let (by_rows, all_rows) = keys(&rows, Counted::Rows).await;
        assert_eq!(by_rows, vec![(3 * rk("p1") + rk("p2")) % 256, (2 * rk("p3")) % 256]);
        assert_eq!(all_rows, (3 * rk("p1") + rk("p2") + 2 * rk("p3")) % 256);
        let (by_people, all_people) = keys(&rows, Counted::People).await;
        assert_eq!(by_people, vec![(rk("p1") + rk("p2")) % 256, rk("p3")]);
        assert_eq!(all_people, (rk("p1") + rk("p2") + rk("p3")) % 256);
        // The same people in another order and other partitions: the same keys.
        let shuffled = [("b", "p3"), ("a", "p1"), ("a", "p2"), ("a", "p1")];
        assert_eq!(keys(&shuffled, Counted::People).await.0, by_people);
    }

    #[test]
    fn record_keys_depend_on_the_secret_and_spread_over_all_256() {
        let other = RecordKeys([12, 13]);
        let people: Vec<u64> = (0..20_000u64).map(mix).collect();
        let differ = people.iter().filter(|&&p| KEYS.of(p) != other.of(p)).count();
        assert!(differ > 19_000, "{differ} of 20 000 keys changed with the secret");
        let mut seen = [0usize; 256];
        for &p in &people {
            seen[KEYS.of(p) as usize] += 1;
        }
        // 20 000 over 256 values: about 78 each; none far off.
        assert!(seen.iter().all(|&n| (40..120).contains(&n)), "{seen:?}");
    }
}
