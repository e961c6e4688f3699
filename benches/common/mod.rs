//! Timing shared by the bench binaries (each includes it with `mod common;`, and not every
//! bench reads every figure).
#![allow(dead_code)]

use std::time::Instant;

/// The `p` quantile (0 to 1) of sorted samples, by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Median and 95th percentile, in milliseconds.
pub struct Timing {
    pub median: f64,
    pub p95: f64,
}

/// Median and 95th percentile of samples in milliseconds.
pub fn timing(mut times: Vec<f64>) -> Timing {
    times.sort_by(f64::total_cmp);
    Timing {
        median: percentile(&times, 0.5),
        p95: percentile(&times, 0.95),
    }
}

/// How long `f` takes, in milliseconds.
pub async fn timed<Fut: std::future::Future>(f: Fut) -> f64 {
    let start = Instant::now();
    f.await;
    start.elapsed().as_secs_f64() * 1000.0
}

/// Runs `f` once to warm up, then `runs` times, timing each run.
pub async fn time<F, Fut>(runs: usize, mut f: F) -> Timing
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f().await; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f().await;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    timing(times)
}
