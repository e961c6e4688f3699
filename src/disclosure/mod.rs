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
//! - released counts are rounded to the nearest `rounding`;
//! - sums and means are flattened and perturbed ([`noise`]): no one person can move a released
//!   sum by more than the noise, nor make it NULL.
//!
//! The functions are volatile scalar UDFs built per query, never registered in a catalogue, so a
//! researcher cannot call them; each counts what it withheld for the result's metadata.

mod config;
pub mod noise;
mod people;
pub mod ptable;
mod shares;
pub use config::DisclosureConfig;
pub use noise::{Flattening, PerturbationKey};
pub use people::people_at_least;
pub use shares::shares;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, StructArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, UInt64Type};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, lit,
};
use serde::Serialize;

/// The disclosure rules in force for one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct Rules {
    /// Fewest distinct people behind a released group or cell.
    pub threshold: u64,
    /// Released counts are rounded to the nearest multiple of this.
    pub rounding: u64,
    /// Sums and means: the largest contributions flattened ([`noise`]).
    pub flatten_outliers: u64,
    /// …to the mean of this many next largest (the top group).
    pub flatten_group: u64,
    /// The noise's standard deviation, in percent of the top group's mean.
    pub noise_percent: u64,
}

impl Rules {
    /// The defaults: 10 people, rounding to 5; sums and means flattened (2 outliers to the mean
    /// of the next 3) with noise of half that mean (docs/disclosure.md says why).
    pub const DEFAULT: Rules = Rules {
        threshold: 10,
        rounding: 5,
        flatten_outliers: 2,
        flatten_group: 3,
        noise_percent: 50,
    };

    /// The flattening of a person's contributions.
    pub fn flattening(&self) -> Flattening {
        Flattening {
            outliers: self.flatten_outliers as usize,
            group: self.flatten_group.max(1) as usize,
        }
    }
}

impl From<&DisclosureConfig> for Rules {
    fn from(c: &DisclosureConfig) -> Self {
        Self {
            threshold: c.threshold,
            rounding: c.rounding,
            flatten_outliers: c.flatten_outliers,
            flatten_group: c.flatten_group,
            noise_percent: c.noise_percent,
        }
    }
}

/// Raised while a query runs when a group's rows alone cannot show that it has enough people
/// (see [`Disclosure::people_from_rows`]). Never a refusal: the query runs again, counting the
/// people themselves.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("internal: a group's rows do not show enough people; its people must be counted")]
pub struct Unsettled;

/// What disclosure control withheld while one query ran.
#[derive(Debug, Default)]
pub struct Withheld {
    groups: AtomicU64,
    /// Cells withheld because too few people contribute to them.
    cells_threshold: AtomicU64,
    /// Count cells withheld because their condition leaves a small set of the group's people out.
    cells_difference: AtomicU64,
    /// Cells withheld because the query's filters leave a small set of their group's people out.
    cells_differencing: AtomicU64,
}

impl Withheld {
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }
    pub fn cells(&self) -> u64 {
        [&self.cells_threshold, &self.cells_difference, &self.cells_differencing]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
    /// Back to nothing withheld, for another run of the same functions.
    fn reset(&self) {
        for c in [
            &self.groups,
            &self.cells_threshold,
            &self.cells_difference,
            &self.cells_differencing,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Withheld groups and cells by the rule that withheld them.
    pub fn by_rule(&self) -> serde_json::Value {
        serde_json::json!({
            "safe-outputs/threshold (groups)": self.groups(),
            "safe-outputs/threshold (cells)": self.cells_threshold.load(Ordering::Relaxed),
            "safe-outputs/cell-difference": self.cells_difference.load(Ordering::Relaxed),
            "safe-outputs/differencing": self.cells_differencing.load(Ordering::Relaxed),
        })
    }
}

/// Stricter settings for a dataset (gateway config) or a project (registry). A query runs under
/// the strictest combination of the gateway's rules and those of every dataset it reads and its
/// project, so an override can only tighten, and never go below the gateway's floor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub threshold: Option<u64>,
    pub rounding: Option<u64>,
    pub flatten_outliers: Option<u64>,
    pub noise_percent: Option<u64>,
}

impl Rules {
    /// The stricter of `self` and `o`.
    pub fn tightened(self, o: &Overrides) -> Rules {
        Rules {
            threshold: self.threshold.max(o.threshold.unwrap_or(0)),
            rounding: self.rounding.max(o.rounding.unwrap_or(0)),
            flatten_outliers: self.flatten_outliers.max(o.flatten_outliers.unwrap_or(0)),
            flatten_group: self.flatten_group,
            noise_percent: self.noise_percent.max(o.noise_percent.unwrap_or(0)),
        }
    }
}

/// Builds the disclosure expressions for one query; all share one [`Withheld`] tally.
#[derive(Debug, Clone)]
pub struct Disclosure {
    rules: Rules,
    key: Option<Arc<PerturbationKey>>,
    withheld: Arc<Withheld>,
}

impl Disclosure {
    /// Rules for one query, with the key that seeds the noise of sums and means (without one,
    /// no sum or mean can be released: the policy refuses them).
    pub fn new(rules: Rules, key: Option<Arc<PerturbationKey>>) -> Self {
        Self {
            rules,
            key,
            withheld: Arc::default(),
        }
    }

    pub fn rules(&self) -> Rules {
        self.rules
    }

    pub fn key(&self) -> Option<&Arc<PerturbationKey>> {
        self.key.as_ref()
    }

    pub fn withheld(&self) -> Arc<Withheld> {
        Arc::clone(&self.withheld)
    }

    /// Zeroes the tally, for another run of the same plan: only by the run that has the plan
    /// to itself ([`crate::plans::Plans::take`]).
    pub fn reset(&self) {
        self.withheld.reset();
    }

    fn call(&self, kind: Kind, args: Vec<Expr>) -> Expr {
        let udf = CellRule {
            kind,
            rules: self.rules,
            key: self.key.clone(),
            withheld: Arc::clone(&self.withheld),
            signature: Signature::variadic_any(Volatility::Volatile),
        };
        ScalarUDF::new_from_impl(udf).call(args)
    }

    /// `plan` with its disclosure functions tallying into this query's counts (a kept plan run
    /// again, see [`crate::plans`]).
    pub fn rebind(&self, plan: LogicalPlan) -> DFResult<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            node.map_expressions(|e| {
                e.transform_up(|e| match e {
                    Expr::ScalarFunction(f) => match f.func.inner().downcast_ref::<CellRule>() {
                        Some(rule) => Ok(Transformed::yes(self.call(rule.kind, f.args))),
                        None => Ok(Transformed::no(Expr::ScalarFunction(f))),
                    },
                    other => Ok(Transformed::no(other)),
                })
            })
        })
        .map(|t| t.data)
    }

    /// Whether `f` is one of the disclosure functions (volatile only because they tally).
    pub fn is_cell_rule(f: &ScalarUDF) -> bool {
        f.inner().downcast_ref::<CellRule>().is_some()
    }

    /// True where the group is backed by at least `threshold` people. `people` holds one
    /// distinct-person count per identifier in the aggregate's input; the smallest governs.
    pub fn keep_group(&self, people: Vec<Expr>) -> Expr {
        self.call(Kind::KeepGroup, people)
    }

    /// A count, rounded; or NULL where it fails its own check or `differs` (see
    /// [`Disclosure::differs`]). `contributors[j]` and `group_people[j]` are, per identifier,
    /// the people behind the cell and behind its group.
    pub fn count_cell(&self, value: Expr, differs: Expr, contributors: Vec<Expr>, group_people: Vec<Expr>) -> Expr {
        self.call(
            Kind::CountCell,
            [vec![value, differs], contributors, group_people].concat(),
        )
    }

    /// A sum (`rows` None) or mean (`rows` its count of values), flattened and perturbed by
    /// the largest of `perturbations` (structs of `delta`, `scale`, `seed`, one per identifier,
    /// from [`shares`]); or NULL where too few people contribute to it, or its group `differs`.
    pub fn value_cell(
        &self,
        value: Expr,
        rows: Option<Expr>,
        differs: Expr,
        perturbations: Vec<Expr>,
        contributors: Vec<Expr>,
        group_people: Vec<Expr>,
    ) -> Expr {
        let kind = Kind::ValueCell {
            mean: rows.is_some(),
            perturbations: perturbations.len(),
        };
        let rows = rows.unwrap_or(lit(ScalarValue::Int64(None)));
        self.call(
            kind,
            [vec![value, rows, differs], perturbations, contributors, group_people].concat(),
        )
    }

    /// The people behind each group of an aggregate over rows each with a person, no person
    /// having more than `most` of them, told from the group's count of `rows` without reading
    /// who they are: at least `rows / most` (rounded up). Where that is below the threshold the
    /// rows cannot settle whether the group may be released, and the query fails with
    /// [`Unsettled`] (to be run again counting the people). So every figure this returns is a
    /// lower bound of the people that passes the threshold: groups and cells judged by it are
    /// released exactly when they would be by their people counted one by one.
    pub fn people_from_rows(&self, rows: Expr, most: u64) -> Expr {
        self.call(Kind::PeopleFromRows(most.max(1)), vec![rows])
    }

    /// The people contributing to a cell of such a group (see [`Disclosure::people_from_rows`]),
    /// told from its count of `contributing` rows and of all its `rows`: where every row
    /// contributes, so does every person, and the cell's people are the group's. Otherwise the
    /// rows cannot tell how many people the cell's condition leaves out, and the query fails
    /// with [`Unsettled`].
    pub fn contributors_from_rows(&self, contributing: Expr, rows: Expr, most: u64) -> Expr {
        self.call(Kind::ContributorsFromRows(most.max(1)), vec![contributing, rows])
    }

    /// True where a group's filtered people (`people[j]`) fall short of its unfiltered people
    /// (`unfiltered[j]`) by between 1 and threshold − 1: the query's filters leave a small set
    /// out ("everyone" minus "everyone but X" would describe X), and the group's cells are
    /// withheld. Per group, never the whole query.
    pub fn differs(&self, people: Vec<Expr>, unfiltered: Vec<Expr>) -> Expr {
        self.call(Kind::Differs, [people, unfiltered].concat())
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
            ("sde.withheld_by_rule".to_owned(), self.withheld.by_rule().to_string()),
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
    /// A sum or a mean, perturbed by the largest of this many flattenings.
    ValueCell {
        mean: bool,
        perturbations: usize,
    },
    Differs,
    /// People told from rows, with the most rows one person has.
    PeopleFromRows(u64),
    /// A cell's contributors told from rows, with the most rows one person has.
    ContributorsFromRows(u64),
}

#[derive(Debug)]
struct CellRule {
    kind: Kind,
    rules: Rules,
    key: Option<Arc<PerturbationKey>>,
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
            Kind::ValueCell { .. } => "sde_value_cell",
            Kind::Differs => "sde_differs",
            Kind::PeopleFromRows(_) => "sde_people_from_rows",
            Kind::ContributorsFromRows(_) => "sde_contributors_from_rows",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(match self.kind {
            Kind::KeepGroup | Kind::Differs => DataType::Boolean,
            Kind::CountCell | Kind::PeopleFromRows(_) | Kind::ContributorsFromRows(_) => DataType::Int64,
            Kind::ValueCell { .. } => arg_types
                .first()
                .cloned()
                .ok_or_else(|| DataFusionError::Internal("sde_value_cell needs a value".into()))?,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let threshold = self.rules.threshold as i64;
        let out: ArrayRef = match self.kind {
            Kind::KeepGroup => {
                let people = fewest_people(&arrays, rows)?;
                let keep = BooleanArray::from_iter(people.values().iter().map(|&n| Some(n >= threshold)));
                self.withheld
                    .groups
                    .fetch_add((rows - keep.true_count()) as u64, Ordering::Relaxed);
                Arc::new(keep)
            }
            Kind::PeopleFromRows(most) => Arc::new(people_from_rows(&arrays[0], None, most, threshold)?),
            Kind::ContributorsFromRows(most) => {
                Arc::new(people_from_rows(&arrays[1], Some(&arrays[0]), most, threshold)?)
            }
            Kind::Differs => {
                let (people, unfiltered) = arrays.split_at(arrays.len() / 2);
                let mut differs = vec![false; rows];
                for (p, u) in people.iter().zip(unfiltered) {
                    let p = cast(p, &DataType::Int64)?;
                    let u = cast(u, &DataType::Int64)?;
                    let (p, u) = (p.as_primitive::<Int64Type>(), u.as_primitive::<Int64Type>());
                    for (i, d) in differs.iter_mut().enumerate() {
                        let (p, u) = (p.value(i), if u.is_null(i) { 0 } else { u.value(i) });
                        let excluded = u - p;
                        *d |= p >= threshold && excluded > 0 && excluded < threshold;
                    }
                }
                Arc::new(BooleanArray::from(differs))
            }
            Kind::CountCell => {
                let (value, differs) = (&arrays[0], arrays[1].as_boolean());
                let (contributors, group_people) = arrays[2..].split_at((arrays.len() - 2) / 2);
                let contributors = fewest_people(contributors, rows)?;
                let group_people = fewest_people(group_people, rows)?;
                // A count is withheld if few people contribute to it, or if the people its own
                // condition leaves out of the group are a small (non-empty) set — that set is
                // described by the difference with the group.
                let mut tally = [0u64; 3];
                let withhold: Vec<bool> = (0..rows)
                    .map(|i| {
                        let (c, g) = (contributors.value(i), group_people.value(i));
                        let left_out = g - c;
                        let reason = if c < threshold {
                            Some(0)
                        } else if left_out > 0 && left_out < threshold {
                            Some(1)
                        } else if differs.is_valid(i) && differs.value(i) {
                            Some(2)
                        } else {
                            None
                        };
                        if let Some(r) = reason {
                            tally[r] += 1;
                        }
                        reason.is_some()
                    })
                    .collect();
                self.withheld.cells_threshold.fetch_add(tally[0], Ordering::Relaxed);
                self.withheld.cells_difference.fetch_add(tally[1], Ordering::Relaxed);
                self.withheld.cells_differencing.fetch_add(tally[2], Ordering::Relaxed);
                let value = cast(value, &DataType::Int64)?;
                let value = value.as_primitive::<Int64Type>();
                let base = self.rules.rounding as i64;
                let rounded: Int64Array = (0..rows)
                    .map(|i| (!withhold[i] && !value.is_null(i)).then(|| round_to(value.value(i), base)))
                    .collect();
                Arc::new(rounded)
            }
            Kind::ValueCell { mean, perturbations } => self.value_cells(&arrays, rows, mean, perturbations)?,
        };
        Ok(ColumnarValue::Array(out))
    }
}

impl CellRule {
    /// Sums or means released flattened and perturbed ([`noise`]), NULL where fewer than
    /// `threshold` people contribute or the group differs. Arguments: the cell's values, its
    /// row counts (means), whether its group differs, the flattenings, then contributors and
    /// group people per identifier.
    fn value_cells(&self, arrays: &[ArrayRef], rows: usize, mean: bool, perturbations: usize) -> DFResult<ArrayRef> {
        let Some(key) = &self.key else {
            return Err(DataFusionError::Internal(
                "a value cell without a perturbation key".into(),
            ));
        };
        let values = cast(&arrays[0], &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        let counts = cast(&arrays[1], &DataType::Int64)?;
        let counts = counts.as_primitive::<Int64Type>();
        let differs = arrays[2].as_boolean();
        let flattenings = arrays[3..3 + perturbations]
            .iter()
            .map(|a| {
                let s = a
                    .as_any()
                    .downcast_ref::<StructArray>()
                    .ok_or_else(|| DataFusionError::Internal("a flattening is a struct".into()))?;
                let field = |name: &str| -> DFResult<ArrayRef> {
                    s.column_by_name(name)
                        .cloned()
                        .ok_or_else(|| DataFusionError::Internal(format!("a flattening without {name}")))
                };
                let (d, sc, se) = (field("delta")?, field("scale")?, field("seed")?);
                Ok((
                    d.as_primitive::<Float64Type>().clone(),
                    sc.as_primitive::<Float64Type>().clone(),
                    se.as_primitive::<UInt64Type>().clone(),
                ))
            })
            .collect::<DFResult<Vec<_>>>()?;
        let people = &arrays[3 + perturbations..];
        let contributors = fewest_people(&people[..people.len() / 2], rows)?;
        let threshold = self.rules.threshold as i64;
        let sd = self.rules.noise_percent as f64 / 100.0;
        let salt = u64::from(mean);
        let (mut withheld, mut differencing) = (0, 0);
        let released: Float64Array = (0..rows)
            .map(|i| {
                if contributors.value(i) < threshold {
                    withheld += 1;
                    return None;
                }
                if differs.is_valid(i) && differs.value(i) {
                    differencing += 1;
                    return None;
                }
                if values.is_null(i) {
                    return None;
                }
                // The flattening with the most noise (one per identifier) governs.
                let (delta, scale, seed) = flattenings
                    .iter()
                    .map(|(d, sc, se)| (d.value(i), sc.value(i), se.value(i)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap_or((0.0, 0.0, 0));
                let noise = sd * scale * key.normal(seed, salt);
                let n = match mean {
                    true => counts.value(i).max(1) as f64,
                    false => 1.0,
                };
                Some(values.value(i) + (noise - delta) / n)
            })
            .collect();
        self.withheld.cells_threshold.fetch_add(withheld, Ordering::Relaxed);
        self.withheld
            .cells_differencing
            .fetch_add(differencing, Ordering::Relaxed);
        // Back to the cell's own type: integers to the nearest.
        let target = arrays[0].data_type();
        let released: Float64Array = match target.is_integer() {
            true => released.iter().map(|v| v.map(f64::round)).collect(),
            false => released,
        };
        Ok(cast(&(Arc::new(released) as ArrayRef), target)?)
    }
}

/// People told from a group's `rows` where no person has more than `most` of them: at least
/// `rows / most`, rounded up. With `contributing` rows, those of a cell: the same, where every
/// row contributes. Fails with [`Unsettled`] wherever that does not settle the threshold.
fn people_from_rows(
    rows: &ArrayRef,
    contributing: Option<&ArrayRef>,
    most: u64,
    threshold: i64,
) -> DFResult<Int64Array> {
    let count = |a: &ArrayRef| -> DFResult<Vec<i64>> {
        let a = cast(a, &DataType::Int64)?;
        let a = a.as_primitive::<Int64Type>();
        Ok((0..a.len())
            .map(|i| if a.is_null(i) { 0 } else { a.value(i).max(0) })
            .collect())
    };
    let rows = count(rows)?;
    let contributing = contributing.map(count).transpose()?;
    rows.iter()
        .enumerate()
        .map(|(i, &r)| {
            let people = (r as u64).div_ceil(most) as i64;
            let all_contribute = contributing.as_ref().is_none_or(|c| c[i] == r);
            match all_contribute && people >= threshold {
                true => Ok(Some(people)),
                false => Err(DataFusionError::External(Box::new(Unsettled))),
            }
        })
        .collect()
}

/// Rounds a non-negative count to the nearest multiple of `base` (halves round up).
pub fn round_to(value: i64, base: i64) -> i64 {
    if base <= 1 {
        return value;
    }
    (value + base / 2).div_euclid(base) * base
}

#[cfg(test)]
mod tests;
