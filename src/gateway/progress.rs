//! How far a query has got, for Flight's PollFlightInfo: the step of the walk it has reached
//! (authorise, plan, check, execute, disclose, audit), each a fixed fraction, and 1.0 once its
//! result waits to be fetched. It says which step a query is in, not how much of the data it
//! has read. A call tracked with [`Progress::track`] updates it from [`reached`], which the
//! walk's steps call; untracked calls pay one task-local lookup.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

tokio::task_local! {
    static PROGRESS: Arc<AtomicU64>;
}

/// One query's progress, from 0.0 to 1.0.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// The query's result is ready.
    pub fn done(&self) {
        self.0.store(1.0f64.to_bits(), Ordering::Relaxed);
    }

    /// Runs `f`, letting the steps it reaches move this progress on.
    pub fn track<F: Future>(&self, f: F) -> impl Future<Output = F::Output> + use<F> {
        PROGRESS.scope(Arc::clone(&self.0), f)
    }
}

/// The fraction a query has reached once it begins `step`.
fn fraction(step: &str) -> Option<f64> {
    Some(match step {
        "authorise" => 0.05,
        "plan" => 0.1,
        "check" => 0.2,
        "execute" => 0.3,
        "disclose" => 0.8,
        "audit" => 0.9,
        _ => return None,
    })
}

/// The tracked query (if any) has begun `step`. Progress never goes back (positive floats order
/// as their bits do).
pub(super) fn reached(step: &str) {
    if let Some(f) = fraction(step) {
        let _ = PROGRESS.try_with(|p| p.fetch_max(f.to_bits(), Ordering::Relaxed));
    }
}
