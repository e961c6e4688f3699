//! The `[disclosure]` section of the gateway's configuration: the rules' defaults, the floors
//! no configuration may go below, the perturbation key's file and per-dataset overrides.
//! The gateway's `config` module assembles it with the other sections and validates it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisclosureConfig {
    /// Fewest distinct people behind a released group or cell.
    pub threshold: u64,
    /// Released counts are rounded to the nearest multiple of this.
    pub rounding: u64,
    /// Sums and means: this many largest contributions are flattened…
    pub flatten_outliers: u64,
    /// …to the mean of the next this many (the top group).
    pub flatten_group: u64,
    /// Noise added to sums and means: its standard deviation in percent of the top group's mean.
    pub noise_percent: u64,
    /// Counts: the maximum noise D of the p-table (cell-key perturbation; 0 for none)…
    pub count_noise_max: u64,
    /// …and the noise's variance V (above 0, below D(D+1)/3).
    pub count_noise_variance: f64,
    /// The secret that seeds the noise (64 hex digits), made at first start if missing.
    pub perturbation_key: PathBuf,
    /// No configuration (gateway, dataset or project) may set `threshold` below this.
    pub floor_threshold: u64,
    /// No configuration may set `rounding` below this.
    pub floor_rounding: u64,
    /// Cells each project may release (the release budget) before more need a board grant;
    /// 0 for no budget.
    pub release_budget_cells: u64,
    /// Stricter rules for particular datasets, e.g. `[disclosure.datasets.gp_events]` with
    /// `threshold = 20`. A query runs under the strictest rules of the datasets it reads.
    #[serde(default)]
    pub datasets: std::collections::BTreeMap<String, super::Overrides>,
}

impl Default for DisclosureConfig {
    fn default() -> Self {
        Self {
            threshold: 10,
            rounding: 5,
            flatten_outliers: 2,
            flatten_group: 3,
            noise_percent: 50,
            count_noise_max: 3,
            count_noise_variance: 2.0,
            perturbation_key: PathBuf::from("perturbation.key"),
            floor_threshold: 10,
            floor_rounding: 5,
            release_budget_cells: 250_000,
            datasets: Default::default(),
        }
    }
}
