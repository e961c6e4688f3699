//! `sde_shares(person, value, contributes)`: what disclosure control needs to know about the
//! people behind one SUM or AVG cell, computed in the same pass as the query's own aggregate.
//!
//! Per group it keeps each person's total of `value` and whether any of their rows
//! `contributes`, and returns a struct:
//! - `people`: distinct non-NULL persons;
//! - `contributors`: those with a contributing row;
//! - `delta`, `scale`, `seed`: each person's total flattened ([`super::noise`]): what to take
//!   off the cell's sum, the noise's scale, and a fingerprint of who contributes what.
//!
//! People are told apart by the same fixed 64-bit hash as [`super::people_at_least`]. Two
//! people whose hashes collide (about one chance in 10^8 among a million people) count as one
//! person whose total is both of theirs: fewer people and a larger contribution, flattened as
//! one. Rows without a person are kept apart as one unknown contributor: they are flattened
//! like a person's total, but do not count as people.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, ListArray, StructArray, UInt8Array, UInt64Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Float64Type, UInt8Type, UInt64Type};
use datafusion::common::{ScalarValue, internal_err};
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature, Volatility,
};

use super::fingerprint::hash_rows;
use super::noise::{Flattened, Flattening, flatten, term};

#[derive(Debug, PartialEq, Eq, Hash)]
struct Shares {
    flattening: Flattening,
    signature: Signature,
}

/// Each person's share of a cell, summarised per group (see the module). `value` must be a
/// `Float64` and `contributes` a `Boolean` (NULL is false). Never registered in a catalogue, so queries cannot
/// call it.
pub fn shares(person: Expr, value: Expr, contributes: Expr, flattening: Flattening) -> Expr {
    let udaf = AggregateUDF::from(Shares {
        flattening,
        signature: Signature::any(3, Volatility::Immutable),
    });
    udaf.call(vec![person, value, contributes])
}

/// The fields of the summary.
fn summary_fields() -> Fields {
    Fields::from(vec![
        Field::new("people", DataType::Int64, false),
        Field::new("contributors", DataType::Int64, false),
        Field::new("delta", DataType::Float64, false),
        Field::new("scale", DataType::Float64, false),
        Field::new("seed", DataType::UInt64, false),
    ])
}

impl AggregateUDFImpl for Shares {
    fn name(&self) -> &str {
        "sde_shares"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DFResult<DataType> {
        if args.get(1) != Some(&DataType::Float64) || args.get(2) != Some(&DataType::Boolean) {
            return internal_err!("sde_shares takes (person, Float64, Boolean), not {args:?}");
        }
        Ok(DataType::Struct(summary_fields()))
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(One(Groups::new(self.flattening))))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        let list = |what: &str, item: DataType| {
            Arc::new(Field::new(
                format!("{}[{what}]", args.name),
                DataType::List(Arc::new(Field::new_list_field(item, true))),
                true,
            ))
        };
        Ok(vec![
            list("persons", DataType::UInt64),
            list("totals", DataType::Float64),
            list("flags", DataType::UInt8),
        ])
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups::new(self.flattening)))
    }
}

/// Flags of a share. `KNOWN` appears only in partial states, to tell persons from the unknown.
const VALUED: u8 = 1;
const CONTRIBUTES: u8 = 2;
const KNOWN: u8 = 4;

/// One person's share of a group's cell.
#[derive(Debug, Clone, Copy, Default)]
struct Share {
    total: f64,
    flags: u8,
}

impl Share {
    fn add(&mut self, value: Option<f64>, contributes: bool) {
        if let Some(v) = value {
            self.total += v;
            self.flags |= VALUED;
        }
        if contributes {
            self.flags |= CONTRIBUTES;
        }
    }

    fn merge(&mut self, other: Share) {
        self.total += other.total;
        self.flags |= other.flags & (VALUED | CONTRIBUTES);
    }
}

/// The keys are already hashes: used as they are.
#[derive(Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What a group's shares come to (see the module).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    people: i64,
    contributors: i64,
    flattened: Flattened,
    seed: u64,
}

/// The shares of one group: by person hash, and rows without a person together.
#[derive(Debug, Default)]
struct Group {
    known: HashMap<u64, Share, BuildHasherDefault<AsIs>>,
    unknown: Option<Share>,
}

impl Group {
    fn share(&mut self, person: Option<u64>) -> &mut Share {
        match person {
            Some(hash) => self.known.entry(hash).or_default(),
            None => self.unknown.get_or_insert_default(),
        }
    }

    /// Every share with its person hash, flagged `KNOWN` unless it is the unknown one.
    fn entries(&self) -> impl Iterator<Item = (u64, Share)> + '_ {
        let known = self.known.iter().map(|(&hash, &share)| {
            (
                hash,
                Share {
                    flags: share.flags | KNOWN,
                    ..share
                },
            )
        });
        known.chain(self.unknown.map(|share| (0, share)))
    }

    fn summary(&self, flattening: Flattening) -> Summary {
        let mut contributors = 0;
        let mut seed = 0u64;
        let mut totals = Vec::new();
        let known = self.known.iter().map(|(&hash, share)| (Some(hash), share));
        for (hash, share) in known.chain(self.unknown.iter().map(|share| (None, share))) {
            if hash.is_some() && share.flags & CONTRIBUTES != 0 {
                contributors += 1;
            }
            if share.flags & VALUED == 0 {
                continue;
            }
            seed = seed.wrapping_add(term(hash.unwrap_or(0), share.total));
            totals.push(share.total);
        }
        Summary {
            people: self.known.len() as i64,
            contributors,
            flattened: flatten(&mut totals, flattening),
            seed,
        }
    }

    fn size(&self) -> usize {
        self.known.capacity() * (std::mem::size_of::<(u64, Share)>() + 1)
    }
}

/// The accumulator for grouped aggregates.
#[derive(Debug)]
struct Groups {
    flattening: Flattening,
    groups: Vec<Group>,
    hashes: Vec<u64>,
}

/// The three arguments (or state columns) of a batch, checked for their types.
fn arguments(values: &[ArrayRef]) -> DFResult<(&ArrayRef, &Float64Array, &BooleanArray)> {
    match (
        values.first(),
        values.get(1).and_then(|v| v.as_primitive_opt::<Float64Type>()),
        values.get(2).and_then(|v| v.as_boolean_opt()),
    ) {
        (Some(person), Some(value), Some(contributes)) => Ok((person, value, contributes)),
        _ => internal_err!("sde_shares takes (person, Float64, Boolean)"),
    }
}

fn included(opt_filter: Option<&BooleanArray>, row: usize) -> bool {
    opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
}

impl Groups {
    fn new(flattening: Flattening) -> Self {
        Self {
            flattening,
            groups: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// Adds the rows of a batch, row `i` to group `group_indices[i]`.
    fn add(&mut self, values: &[ArrayRef], group_indices: &[usize], opt_filter: Option<&BooleanArray>) -> DFResult<()> {
        let (person, value, contributes) = arguments(values)?;
        hash_rows(person, &mut self.hashes)?;
        // A person's rows mostly come one after another: they are summed here, and their
        // group's table is looked up once for the run of them, not once per row.
        let mut run: Option<(usize, Option<u64>, Share)> = None;
        for (row, &g) in group_indices.iter().enumerate() {
            if !included(opt_filter, row) {
                continue;
            }
            let hash = person.is_valid(row).then(|| self.hashes[row]);
            let (value, contributes) = (
                value.is_valid(row).then(|| value.value(row)),
                contributes.is_valid(row) && contributes.value(row),
            );
            match &mut run {
                Some((group, person, share)) if *group == g && *person == hash => share.add(value, contributes),
                _ => {
                    if let Some((group, person, share)) = run.take() {
                        self.groups[group].share(person).merge(share);
                    }
                    let mut share = Share::default();
                    share.add(value, contributes);
                    run = Some((g, hash, share));
                }
            }
        }
        if let Some((group, person, share)) = run {
            self.groups[group].share(person).merge(share);
        }
        Ok(())
    }

    /// Merges partial states, row `i` into group `group_indices[i]`.
    fn merge(&mut self, states: &[ArrayRef], group_indices: &[usize]) -> DFResult<()> {
        let [persons, totals, flags] = states else {
            return internal_err!("sde_shares: three state columns expected");
        };
        let (persons, totals, flags) = (
            persons.as_list::<i32>(),
            totals.as_list::<i32>(),
            flags.as_list::<i32>(),
        );
        for (row, &g) in group_indices.iter().enumerate() {
            if persons.is_null(row) {
                continue;
            }
            let (p, t, f) = (persons.value(row), totals.value(row), flags.value(row));
            let (p, t, f) = (
                p.as_primitive::<UInt64Type>(),
                t.as_primitive::<Float64Type>(),
                f.as_primitive::<UInt8Type>(),
            );
            // Room for them all at once, rather than growing the table as they come.
            self.groups[g].known.reserve(p.len());
            for k in 0..p.len() {
                let flags = f.value(k);
                let person = (flags & KNOWN != 0).then(|| p.value(k));
                self.groups[g].share(person).merge(Share {
                    total: t.value(k),
                    flags,
                });
            }
        }
        Ok(())
    }
}

/// The partial states of `groups`: three lists per group, written in one pass over the shares.
fn states(groups: &[Group]) -> DFResult<Vec<ArrayRef>> {
    let entries: usize = groups
        .iter()
        .map(|g| g.known.len() + usize::from(g.unknown.is_some()))
        .sum();
    let (mut persons, mut totals, mut flags) = (
        Vec::with_capacity(entries),
        Vec::with_capacity(entries),
        Vec::with_capacity(entries),
    );
    let mut lengths = Vec::with_capacity(groups.len());
    for group in groups {
        let before = persons.len();
        for (hash, share) in group.entries() {
            persons.push(hash);
            totals.push(share.total);
            flags.push(share.flags);
        }
        lengths.push(persons.len() - before);
    }
    let offsets = OffsetBuffer::<i32>::from_lengths(lengths);
    let list = |item: DataType, values: ArrayRef| -> DFResult<ArrayRef> {
        let field = Arc::new(Field::new_list_field(item, true));
        Ok(Arc::new(ListArray::try_new(field, offsets.clone(), values, None)?))
    };
    Ok(vec![
        list(DataType::UInt64, Arc::new(UInt64Array::from(persons)))?,
        list(DataType::Float64, Arc::new(Float64Array::from(totals)))?,
        list(DataType::UInt8, Arc::new(UInt8Array::from(flags)))?,
    ])
}

fn summaries(groups: &[Group], flattening: Flattening) -> ArrayRef {
    let summaries: Vec<_> = groups.iter().map(|g| g.summary(flattening)).collect();
    let int = |f: fn(&Summary) -> i64| -> ArrayRef { Arc::new(Int64Array::from_iter_values(summaries.iter().map(f))) };
    let float =
        |f: fn(&Summary) -> f64| -> ArrayRef { Arc::new(Float64Array::from_iter_values(summaries.iter().map(f))) };
    Arc::new(StructArray::new(
        summary_fields(),
        vec![
            int(|s| s.people),
            int(|s| s.contributors),
            float(|s| s.flattened.delta),
            float(|s| s.flattened.scale),
            Arc::new(UInt64Array::from_iter_values(summaries.iter().map(|s| s.seed))),
        ],
        None,
    ))
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DFResult<()> {
        self.groups.resize_with(total_num_groups, Group::default);
        self.add(values, group_indices, opt_filter)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DFResult<ArrayRef> {
        Ok(summaries(&emit_to.take_needed(&mut self.groups), self.flattening))
    }

    fn state(&mut self, emit_to: EmitTo) -> DFResult<Vec<ArrayRef>> {
        states(&emit_to.take_needed(&mut self.groups))
    }

    fn merge_batch(&mut self, values: &[ArrayRef], group_indices: &[usize], total_num_groups: usize) -> DFResult<()> {
        self.groups.resize_with(total_num_groups, Group::default);
        self.merge(values, group_indices)
    }

    /// Each row as a partial state of its own (used when DataFusion skips partial aggregation).
    fn convert_to_state(&self, values: &[ArrayRef], opt_filter: Option<&BooleanArray>) -> DFResult<Vec<ArrayRef>> {
        let rows = values.first().map_or(0, |v| v.len());
        let mut each = Groups {
            groups: (0..rows).map(|_| Group::default()).collect(),
            ..Groups::new(self.flattening)
        };
        let indices: Vec<usize> = (0..rows).collect();
        each.add(values, &indices, opt_filter)?;
        states(&each.groups)
    }

    fn size(&self) -> usize {
        self.groups.capacity() * std::mem::size_of::<Group>()
            + self.groups.iter().map(Group::size).sum::<usize>()
            + self.hashes.capacity() * 8
    }
}

/// The accumulator of an aggregate without groups: one group.
#[derive(Debug)]
struct One(Groups);

impl Accumulator for One {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        let rows = values.first().map_or(0, |v| v.len());
        self.0.update_batch(values, &vec![0; rows], None, 1)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        let rows = states.first().map_or(0, |v| v.len());
        self.0.merge_batch(states, &vec![0; rows], 1)
    }

    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        self.0.groups.resize_with(1, Group::default);
        states(&self.0.groups)?
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }

    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        self.0.groups.resize_with(1, Group::default);
        ScalarValue::try_from_array(&summaries(&self.0.groups, self.0.flattening), 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + GroupsAccumulator::size(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::functions::core::expr_fn::get_field;
    use datafusion::prelude::{SessionContext, col};

    use super::*;

    type Row = (&'static str, Option<&'static str>, Option<f64>);
    type Figures = (i64, i64, f64, f64);
    const ONE_AND_ONE: Flattening = Flattening { outliers: 1, group: 1 };

    /// Table `t` of `(g, person, v)` rows, spread over several partitions (so partial states
    /// merge).
    fn context(rows: &[Row]) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, false),
            Field::new("person", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ]));
        let batches: Vec<RecordBatch> = rows
            .chunks(2)
            .map(|chunk| {
                let g: StringArray = chunk.iter().map(|r| Some(r.0)).collect();
                let p: StringArray = chunk.iter().map(|r| r.1).collect();
                let v: Float64Array = chunk.iter().map(|r| r.2).collect();
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(g), Arc::new(p), Arc::new(v)]).unwrap()
            })
            .collect();
        let ctx = SessionContext::new();
        let mut partitions: Vec<Vec<RecordBatch>> = batches.into_iter().map(|b| vec![b]).collect();
        if partitions.is_empty() {
            partitions.push(vec![]);
        }
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, partitions).unwrap()))
            .unwrap();
        ctx
    }

    /// Per group (or for the whole table), with contributors being rows with `v > 1`.
    async fn summarise(rows: &[Row], grouped: bool) -> Vec<Figures> {
        let contributes = col("v").gt(datafusion::prelude::lit(1.0));
        let groups = if grouped { vec![col("g")] } else { vec![] };
        let mut df = context(rows)
            .table("t")
            .await
            .unwrap()
            .aggregate(
                groups,
                vec![shares(col("person"), col("v"), contributes, ONE_AND_ONE).alias("s")],
            )
            .unwrap();
        if grouped {
            df = df.sort(vec![col("g").sort(true, true)]).unwrap();
        }
        let fields = ["people", "contributors", "delta", "scale"].map(|f| get_field(col("s"), f));
        let out = df.select(fields.to_vec()).unwrap().collect().await.unwrap();
        let mut result = Vec::new();
        for b in out {
            let int = |c: usize, i: usize| {
                b.column(c)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .value(i)
            };
            let float = |c: usize, i: usize| b.column(c).as_primitive::<Float64Type>().value(i);
            for i in 0..b.num_rows() {
                result.push((int(0, i), int(1, i), float(2, i), float(3, i)));
            }
        }
        result
    }

    const ROWS: [Row; 10] = [
        // a: p1 has 5 + -9 = -4 (magnitude 4), p2 has 3, p3 has no value; a row without a person.
        ("a", Some("p1"), Some(5.0)),
        ("a", Some("p2"), Some(3.0)),
        ("a", Some("p1"), Some(-9.0)),
        ("a", Some("p3"), None),
        ("a", None, Some(2.0)),
        // b: one person with one contributing row and one that is not.
        ("b", Some("p1"), Some(1.0)),
        ("b", Some("p1"), Some(7.0)),
        // c: nobody has a value.
        ("c", Some("p4"), None),
        ("c", Some("p5"), None),
        ("c", None, None),
    ];

    #[tokio::test]
    async fn each_persons_total_is_summarised_per_group() {
        assert_eq!(
            summarise(&ROWS, true).await,
            [
                // people p1 p2 p3; contributors p1 (5) p2 (3); totals -4, 3 and the unknown 2:
                // the outlier -4 flattened to -3 (the next one's magnitude).
                (3, 2, -1.0, 3.0),
                // One total (8): nothing to flatten it to.
                (1, 1, 8.0, 0.0),
                (2, 0, 0.0, 0.0),
            ]
        );
    }

    #[tokio::test]
    async fn without_groups_the_whole_table_is_one_group() {
        // p1: 5 - 9 + 1 + 7 = 4; p2: 3; unknown 2; p3, p4, p5 no value.
        assert_eq!(summarise(&ROWS, false).await, [(5, 2, 1.0, 3.0)]);
        assert_eq!(summarise(&[], false).await, [(0, 0, 0.0, 0.0)]);
    }

    #[test]
    fn the_seed_is_who_contributes_what_in_any_order() {
        let seed = |shares: &[(u64, f64)]| {
            let mut g = Group::default();
            for &(p, v) in shares {
                g.share(Some(p)).add(Some(v), true);
            }
            g.summary(ONE_AND_ONE).seed
        };
        assert_eq!(
            seed(&[(1, 5.0), (2, 5.0), (3, 1.0)]),
            seed(&[(3, 1.0), (1, 5.0), (2, 5.0)])
        );
        assert_ne!(seed(&[(1, 5.0), (2, 5.0)]), seed(&[(1, 5.0), (2, 5.5)]));
        assert_ne!(seed(&[(1, 5.0), (2, 5.0)]), seed(&[(1, 5.0), (4, 5.0)]));
    }
}
