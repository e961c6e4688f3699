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

pub mod cellkey;
mod cells;
mod config;
mod fingerprint;
pub mod noise;
mod people;
pub mod ptable;
mod shares;
pub use config::DisclosureConfig;
pub use noise::{Flattening, PerturbationKey};
pub use people::people_at_least;
pub use ptable::PTable;
pub use shares::shares;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cells::people_from_rows;

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
    /// Counts: the p-table's maximum noise D ([`ptable`]); 0 for none (records written before
    /// counts were perturbed).
    #[serde(default)]
    pub count_noise_max: u64,
    /// …and its variance V, in hundredths.
    #[serde(default)]
    pub count_noise_variance_hundredths: u64,
    /// Set only for a result that two output checkers approved ([`crate::review`]): groups and
    /// cells are withheld below this many people instead of `threshold` (everything else,
    /// low-effect conditions included, still judged by `threshold`). 0 for every other query.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub release_floor: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Rules {
    /// The defaults: 10 people, rounding to 5; counts perturbed by a p-table of D 3, V 2;
    /// sums and means flattened (2 outliers to the mean of the next 3) with noise of half that
    /// mean (docs/disclosure.md says why).
    pub const DEFAULT: Rules = Rules {
        threshold: 10,
        rounding: 5,
        flatten_outliers: 2,
        flatten_group: 3,
        noise_percent: 50,
        count_noise_max: 3,
        count_noise_variance_hundredths: 200,
        release_floor: 0,
    };

    /// Fewest people behind a group or cell that is not withheld: the threshold, or for a
    /// reviewed release its floor.
    pub fn withhold_below(&self) -> i64 {
        match self.release_floor {
            0 => self.threshold as i64,
            floor => floor.min(self.threshold) as i64,
        }
    }

    /// The p-table of counts, or None where counts are not perturbed (D 0).
    pub fn ptable(&self) -> Result<Option<PTable>, ptable::PTableError> {
        match self.count_noise_max {
            0 => Ok(None),
            d => PTable::new(d as u32, self.count_noise_variance_hundredths as f64 / 100.0).map(Some),
        }
    }

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
            count_noise_max: c.count_noise_max,
            count_noise_variance_hundredths: (c.count_noise_variance * 100.0).round() as u64,
            release_floor: 0,
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
    /// Released cells that are NULL (too few people contribute to them).
    cells_threshold: AtomicU64,
}

impl Withheld {
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }
    pub fn cells(&self) -> u64 {
        self.cells_threshold.load(Ordering::Relaxed)
    }
    /// Back to nothing withheld, for another run of the same functions.
    fn reset(&self) {
        for c in [&self.groups, &self.cells_threshold] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Withheld groups and cells by the rule that withheld them.
    pub fn by_rule(&self) -> serde_json::Value {
        serde_json::json!({
            "safe-outputs/threshold (groups)": self.groups(),
            "safe-outputs/threshold (cells)": self.cells_threshold.load(Ordering::Relaxed),
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
            count_noise_max: self.count_noise_max,
            count_noise_variance_hundredths: self.count_noise_variance_hundredths,
            release_floor: self.release_floor,
        }
    }
}

/// Builds the disclosure expressions for one query; all share one [`Withheld`] tally.
#[derive(Debug, Clone)]
pub struct Disclosure {
    rules: Rules,
    key: Option<Arc<PerturbationKey>>,
    /// The counts' p-table (None: not perturbed), or why the rules make none.
    ptable: Arc<Result<Option<PTable>, ptable::PTableError>>,
    withheld: Arc<Withheld>,
    /// Whether its functions tally into `withheld` (not for the alternatives a query computes
    /// and does not release, see [`Disclosure::untallied`]).
    tally: bool,
}

impl Disclosure {
    /// Rules for one query, with the key that seeds the noise of sums and means (without one,
    /// no sum or mean can be released: the policy refuses them).
    pub fn new(rules: Rules, key: Option<Arc<PerturbationKey>>) -> Self {
        Self {
            rules,
            key,
            ptable: Arc::new(rules.ptable()),
            withheld: Arc::default(),
            tally: true,
        }
    }

    /// The same rules, for cells that are computed but released only if chosen: their
    /// functions tally nowhere the result's metadata reads (what is released is tallied by
    /// [`Disclosure::released`]).
    pub fn untallied(&self) -> Self {
        Self {
            withheld: Arc::default(),
            tally: false,
            ..self.clone()
        }
    }

    pub fn rules(&self) -> Rules {
        self.rules
    }

    pub fn key(&self) -> Option<&Arc<PerturbationKey>> {
        self.key.as_ref()
    }

    /// The record keys of counts' cell keys (none without a perturbation key).
    pub fn record_keys(&self) -> Option<cellkey::RecordKeys> {
        self.key.as_ref().map(|k| k.record_keys())
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
            tally: self.tally,
            rules: self.rules,
            key: self.key.clone(),
            ptable: Arc::clone(&self.ptable),
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
                        Some(rule) if rule.tally => Ok(Transformed::yes(self.call(rule.kind, f.args))),
                        _ => Ok(Transformed::no(Expr::ScalarFunction(f))),
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

    /// Whether `f` is a disclosure function that tallies nothing ([`Disclosure::untallied`]):
    /// a pure function of its arguments, so a plan calling it can be computed once and reused.
    pub fn is_untallied_cell_rule(f: &ScalarUDF) -> bool {
        f.inner().downcast_ref::<CellRule>().is_some_and(|rule| !rule.tally)
    }

    /// True where the group is backed by at least `threshold` people. `people` holds one
    /// distinct-person count per identifier in the aggregate's input; the smallest governs.
    pub fn keep_group(&self, people: Vec<Expr>) -> Expr {
        self.call(Kind::KeepGroup, people)
    }

    /// A count, perturbed by the p-table at its cell key (the sum of `keys`, one per
    /// identifier, from [`cellkey::cell_key`]) and rounded; NULL where fewer than `threshold`
    /// people contribute. `contributors[j]` and `group_people[j]` are, per identifier, the
    /// people behind the cell and behind its group. A count with a condition of its own (a
    /// FILTER, `COUNT(x)`) also has the count and keys `unconditioned`: where the condition
    /// leaves out of the group between 1 and threshold − 1 people, it is of low effect and the
    /// unconditioned count is released instead, as if the condition were not there.
    pub fn count_cell(
        &self,
        value: Expr,
        keys: Vec<Expr>,
        contributors: Vec<Expr>,
        group_people: Vec<Expr>,
        unconditioned: Option<(Expr, Vec<Expr>)>,
    ) -> Expr {
        let kind = Kind::CountCell {
            keys: keys.len(),
            unconditioned: unconditioned.is_some(),
        };
        let (u_value, u_keys) = match unconditioned {
            Some((v, k)) => (vec![v], k),
            None => (vec![], vec![]),
        };
        self.call(
            kind,
            [vec![value], keys, contributors, group_people, u_value, u_keys].concat(),
        )
    }

    /// A sum (`rows` None) or mean (`rows` its count of values), flattened and perturbed by
    /// the largest of `perturbations` (structs of `delta`, `scale`, `seed`, one per identifier,
    /// from [`shares`]); or NULL where too few people contribute to it.
    pub fn value_cell(
        &self,
        value: Expr,
        rows: Option<Expr>,
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
            [vec![value, rows], perturbations, contributors, group_people].concat(),
        )
    }

    /// A released cell, as it is: counted in the result's tally of withheld cells where NULL.
    pub fn released(&self, cell: Expr) -> Expr {
        self.call(Kind::Released, vec![cell])
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
                    "safe-outputs/threshold: groups and cells backed by fewer than {} people are withheld; counts perturbed by at most {} (cell key) and rounded to the nearest {}",
                    self.rules.threshold, self.rules.count_noise_max, self.rules.rounding
                ),
            ),
        ])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    KeepGroup,
    /// A count, perturbed at the sum of this many cell keys; with its unconditioned count.
    CountCell {
        keys: usize,
        unconditioned: bool,
    },
    /// A released cell, tallied where NULL.
    Released,
    /// A sum or a mean, perturbed by the largest of this many flattenings.
    ValueCell {
        mean: bool,
        perturbations: usize,
    },
    /// People told from rows, with the most rows one person has.
    PeopleFromRows(u64),
    /// A cell's contributors told from rows, with the most rows one person has.
    ContributorsFromRows(u64),
}

#[derive(Debug)]
struct CellRule {
    kind: Kind,
    tally: bool,
    rules: Rules,
    key: Option<Arc<PerturbationKey>>,
    ptable: Arc<Result<Option<PTable>, ptable::PTableError>>,
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
            Kind::CountCell { .. } => "sde_count_cell",
            Kind::ValueCell { .. } => "sde_value_cell",
            Kind::Released => "sde_released",
            Kind::PeopleFromRows(_) => "sde_people_from_rows",
            Kind::ContributorsFromRows(_) => "sde_contributors_from_rows",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(match self.kind {
            Kind::KeepGroup => DataType::Boolean,
            Kind::CountCell { .. } | Kind::PeopleFromRows(_) | Kind::ContributorsFromRows(_) => DataType::Int64,
            Kind::ValueCell { .. } | Kind::Released => arg_types
                .first()
                .cloned()
                .ok_or_else(|| DataFusionError::Internal("sde_value_cell needs a value".into()))?,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let rows = args.number_rows;
        // Every argument as an array of the batch's rows (a constant one included).
        let arrays = args
            .args
            .iter()
            .map(|a| a.to_array(rows))
            .collect::<DFResult<Vec<_>>>()?;
        let threshold = self.rules.withhold_below();
        let out: ArrayRef = match self.kind {
            Kind::KeepGroup => {
                let people = fewest_people(&arrays, rows)?;
                let keep = BooleanArray::from_iter(people.values().iter().map(|&n| Some(n >= threshold)));
                if self.tally {
                    self.withheld
                        .groups
                        .fetch_add((rows - keep.true_count()) as u64, Ordering::Relaxed);
                }
                Arc::new(keep)
            }
            Kind::PeopleFromRows(most) => Arc::new(people_from_rows(&arrays[0], None, most, threshold)?),
            Kind::ContributorsFromRows(most) => {
                Arc::new(people_from_rows(&arrays[1], Some(&arrays[0]), most, threshold)?)
            }
            Kind::Released => {
                if self.tally {
                    let nulls = arrays[0].null_count() as u64;
                    self.withheld.cells_threshold.fetch_add(nulls, Ordering::Relaxed);
                }
                Arc::clone(&arrays[0])
            }
            Kind::CountCell { keys, unconditioned } => self.count_cells(&arrays, rows, keys, unconditioned)?,
            Kind::ValueCell { mean, perturbations } => self.value_cells(&arrays, rows, mean, perturbations)?,
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
mod tests;
