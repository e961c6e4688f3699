//! Magnitude perturbation for SUM and AVG cells: flatten, then add noise seeded by the cell.
//!
//! One extreme value must not be readable from a sum, nor make it NULL, and two sums over
//! people sets that differ by one person must not differ by exactly that person's value:
//! - **flatten**: the `outliers` largest contributions (by magnitude) are replaced by the mean
//!   magnitude of the next `group` (the *top group*), keeping their sign;
//! - **noise**: a normal draw with standard deviation `noise_percent` % of that top-group mean
//!   is added. The draw comes from a keyed hash (HMAC-SHA256 with the gateway's perturbation
//!   key) of the cell's *seed*, a fingerprint of who contributes what, so the same contributions
//!   always get the same noise, however the SQL is spelled, in every session and after a
//!   restart, and averaging reformulations of one cell gains nothing.
//!
//! The per-person contributions come from [`super::shares`] (each person's total in the cell).
//! This module holds the arithmetic and the key; it reads no data.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The secret that seeds the noise. Held like the other keys (a file only the gateway reads);
/// an auditor's replay needs the same key to reproduce a release.
#[derive(Clone, PartialEq, Eq)]
pub struct PerturbationKey([u8; 32]);

impl std::fmt::Debug for PerturbationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerturbationKey(…)")
    }
}

impl PerturbationKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Reads the key (64 hex digits) from `path`, first writing a new random one there, readable
    /// by its owner only, if there is none.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        if !path.exists() {
            let mut key = [0u8; 32];
            aws_lc_rs::rand::fill(&mut key).map_err(|_| std::io::Error::other("no system randomness"))?;
            write_private(path, &hex::encode(key))?;
        }
        let text = std::fs::read_to_string(path)?;
        let bytes = hex::decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes.map(Self).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: a perturbation key is 64 hex digits", path.display()),
            )
        })
    }

    /// The secrets of the record keys of counts ([`super::cellkey`]), derived from this key.
    pub fn record_keys(&self) -> super::cellkey::RecordKeys {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"sde-gateway record keys");
        let out = mac.finalize().into_bytes();
        let word = |i: usize| u64::from_le_bytes(out[i..i + 8].try_into().expect("8 bytes"));
        super::cellkey::RecordKeys::new([word(0), word(8)])
    }

    /// A standard normal draw for `seed` and `salt` (which part of a cell it perturbs).
    pub fn normal(&self, seed: u64, salt: u64) -> f64 {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(&seed.to_le_bytes());
        mac.update(&salt.to_le_bytes());
        let out = mac.finalize().into_bytes();
        let word = |i: usize| u64::from_le_bytes(out[i..i + 8].try_into().expect("8 bytes"));
        // Box–Muller on two uniforms in (0, 1]; the draw is bounded (|z| < 9.5).
        let uniform = |w: u64| ((w >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let (u1, u2) = (uniform(word(0)), uniform(word(8)));
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

/// The flattening parameters, per contributor (a person).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flattening {
    pub outliers: usize,
    pub group: usize,
}

/// What flattening makes of a cell's contributions.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Flattened {
    /// What to take off the cell's sum: each outlier's value less its flattened value.
    pub delta: f64,
    /// The top group's mean magnitude (the noise's scale, before `noise_percent`).
    pub scale: f64,
}

/// Flattens `values`, the largest contributions by magnitude (at least `outliers + group` of
/// them where there are that many), in any order.
pub fn flatten(values: &mut [f64], f: Flattening) -> Flattened {
    let by_magnitude = |a: &f64, b: &f64| b.abs().total_cmp(&a.abs());
    let k = f.outliers + f.group;
    // Only the largest `k` need an order: picked out in linear time, then sorted.
    let values = match values.len() > k && k > 0 {
        true => {
            values.select_nth_unstable_by(k - 1, by_magnitude);
            &mut values[..k]
        }
        false => values,
    };
    values.sort_by(by_magnitude);
    let outliers = f.outliers.min(values.len());
    let top = &values[outliers..values.len().min(outliers + f.group)];
    let scale = match top.len() {
        0 => 0.0,
        n => top.iter().map(|v| v.abs()).sum::<f64>() / n as f64,
    };
    let delta = values[..outliers].iter().map(|v| v - v.signum() * scale).sum();
    Flattened { delta, scale }
}

/// Mixes 64 bits (the splitmix64 finaliser): fingerprints add mixed terms, so that a set's
/// fingerprint does not depend on the order its members arrive in.
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The fingerprint term of one contribution: who (a person hash, or 0 for a row) and how much,
/// at single precision, so that sums taken in another order fingerprint alike.
pub fn term(who: u64, value: f64) -> u64 {
    mix(who ^ mix(u64::from((value as f32).to_bits()).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outliers_take_the_top_groups_mean_and_keep_their_sign() {
        let f = Flattening { outliers: 2, group: 3 };
        let mut v = [1.0, -1000.0, 3.0, 2.0, 4.0, 500.0];
        let out = flatten(&mut v, f);
        // Top group: 4, 3, 2 → mean 3; -1000 → -3 and 500 → 3.
        assert_eq!(out.scale, 3.0);
        assert_eq!(out.delta, (-1000.0 + 3.0) + (500.0 - 3.0));
        assert_eq!(flatten(&mut [], f), Flattened::default());
    }

    #[test]
    fn draws_are_fixed_by_key_seed_and_salt_and_look_standard_normal() {
        let key = PerturbationKey::from_bytes([7; 32]);
        assert_eq!(key.normal(1, 0), key.normal(1, 0));
        assert_ne!(key.normal(1, 0), key.normal(1, 1));
        assert_ne!(key.normal(1, 0), PerturbationKey::from_bytes([8; 32]).normal(1, 0));
        let n = 20_000;
        let draws: Vec<f64> = (0..n).map(|s| key.normal(s, 0)).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean}, variance {var}"
        );
    }

    #[test]
    fn a_fingerprint_is_a_sum_so_order_does_not_matter() {
        let a = term(1, 2.5).wrapping_add(term(2, 7.0));
        let b = term(2, 7.0).wrapping_add(term(1, 2.5));
        assert_eq!(a, b);
        assert_ne!(term(1, 2.5), term(1, 2.6));
        assert_eq!(term(1, 0.1 + 0.2), term(1, 0.3));
    }

    #[test]
    fn a_new_key_file_is_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perturbation.key");
        let key = PerturbationKey::load_or_create(&path).unwrap();
        assert_eq!(PerturbationKey::load_or_create(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, "short").unwrap();
        assert!(PerturbationKey::load_or_create(&path).is_err());
    }
}
