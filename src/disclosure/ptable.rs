//! The perturbation table of cell-key perturbation for counts (as ONS and ABS publish tables):
//! a cell's key (0–255, the sum of its people's record keys mod 256) picks the noise added to
//! its count, so the same set of people always gets the same noise, however the SQL is spelled.
//!
//! The noise is an integer in −D..=D whose distribution has mean 0 and variance V, with the most
//! entropy any such distribution has: p(j) ∝ exp(−λ·j²), λ solved for V (the maximum-entropy
//! method of sdcTools' `ptable`). The key acts as a uniform draw: the noise is the inverse of the
//! distribution's CDF at (key + ½) / 256. Small values are not this table's concern: cells behind
//! fewer than the threshold of people are withheld before any noise, so a released count is at
//! least threshold − D before rounding.

/// The noise for each of the 256 cell keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PTable {
    noise: [i8; 256],
}

/// Why a (D, V) pair makes no table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PTableError {
    #[error("the maximum noise D must be 1 to 100, not {0}")]
    Max(u32),
    #[error("the variance V must be above 0 and below D(D+1)/3 = {limit} (the uniform spread), not {variance}")]
    Variance { variance: f64, limit: f64 },
}

/// The variance of p(j) ∝ exp(−λ·j²) over −d..=d.
fn variance(d: i32, lambda: f64) -> f64 {
    let (mut weight, mut moment) = (0.0, 0.0);
    for j in -d..=d {
        let p = (-lambda * f64::from(j * j)).exp();
        weight += p;
        moment += p * f64::from(j * j);
    }
    moment / weight
}

impl PTable {
    /// The table for maximum noise `max` (D) and variance `v` (V).
    pub fn new(max: u32, v: f64) -> Result<Self, PTableError> {
        if !(1..=100).contains(&max) {
            return Err(PTableError::Max(max));
        }
        let d = max as i32;
        let limit = f64::from(d * (d + 1)) / 3.0;
        if !(v > 0.0 && v < limit) {
            return Err(PTableError::Variance { variance: v, limit });
        }
        // The variance falls as λ grows: bisect on λ ≥ 0.
        let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
        while variance(d, hi) > v {
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            match variance(d, mid) > v {
                true => lo = mid,
                false => hi = mid,
            }
        }
        let lambda = (lo + hi) / 2.0;
        let weights: Vec<f64> = (-d..=d).map(|j| (-lambda * f64::from(j * j)).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut noise = [0i8; 256];
        for (key, n) in noise.iter_mut().enumerate() {
            let u = (key as f64 + 0.5) / 256.0;
            let mut cumulative = 0.0;
            *n = max as i8;
            for (j, w) in (-d..=d).zip(&weights) {
                cumulative += w / total;
                if u < cumulative {
                    *n = j as i8;
                    break;
                }
            }
        }
        Ok(Self { noise })
    }

    /// The noise of a cell with this key.
    pub fn noise(&self, cell_key: u8) -> i64 {
        i64::from(self.noise[usize::from(cell_key)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(t: &PTable) -> (f64, f64) {
        let noise: Vec<f64> = (0..=255u8).map(|k| t.noise(k) as f64).collect();
        let mean = noise.iter().sum::<f64>() / 256.0;
        let var = noise.iter().map(|n| (n - mean).powi(2)).sum::<f64>() / 256.0;
        (mean, var)
    }

    #[test]
    fn noise_stays_within_d_with_mean_zero_and_the_variance_asked() {
        for (d, v) in [(3, 1.5), (4, 2.0), (5, 3.0), (10, 12.0)] {
            let t = PTable::new(d, v).unwrap();
            assert!((0..=255u8).all(|k| t.noise(k).abs() <= i64::from(d)));
            let (mean, var) = moments(&t);
            // 256 keys quantise the distribution: within a few percent of its moments.
            assert!(mean.abs() < 0.05, "D {d} V {v}: mean {mean}");
            assert!((var - v).abs() < 0.1 * v, "D {d} V {v}: variance {var}");
            // The table spreads out to (near) D, not only around 0.
            let widest = (0..=255u8).map(|k| t.noise(k).abs()).max().unwrap();
            assert!(widest >= i64::from(d) - 1, "D {d} V {v}: widest {widest}");
        }
    }

    #[test]
    fn one_key_one_noise_and_keys_spread_over_the_noise() {
        let t = PTable::new(5, 3.0).unwrap();
        assert_eq!(t, PTable::new(5, 3.0).unwrap());
        let zeros = (0..=255u8).filter(|&k| t.noise(k) == 0).count();
        assert!(zeros < 128, "{zeros} keys give no noise");
    }

    #[test]
    fn impossible_tables_are_refused() {
        assert_eq!(PTable::new(0, 1.0), Err(PTableError::Max(0)));
        assert!(matches!(PTable::new(2, 0.0), Err(PTableError::Variance { .. })));
        // D(D+1)/3 = 2 for D = 2: the uniform's variance, the most any table can have.
        assert!(matches!(PTable::new(2, 2.0), Err(PTableError::Variance { .. })));
    }
}
