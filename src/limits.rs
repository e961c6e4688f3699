//! Safe Settings under load: what keeps the gateway up when a researcher sends too much.
//!
//! - **Memory**: every query's DataFusion runtime draws from one gateway-wide pool
//!   (`limits.memory_pool_bytes`) through its own per-query cap (`limits.query_memory_bytes`), so
//!   one heavy query fails with `ResourcesExhausted` instead of starving the others. Spilling to
//!   disk is off: the container's root filesystem is read-only and a bound is a bound.
//! - **Concurrency**: at most `limits.max_concurrent_queries` run at once; up to
//!   `limits.max_queued_queries` wait (at most `limits.queue_timeout_seconds`); beyond that a
//!   query is refused at once.
//! - **Rate**: each user may start `limits.user_queries_per_minute` queries a minute (a token
//!   bucket, so a burst of that size is allowed and it refills continuously).
//!
//! The deadline and the result-size caps are applied by the walk (`src/gateway/`), which owns the
//! query's future: dropping it (deadline, client gone) drops the DataFusion streams, which stops
//! their tasks and returns their memory to the pool.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result as DFResult;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryLimit, MemoryPool, MemoryReservation};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::engine::LocalStore;

/// A refusal by a load limit. Each names its rule and the config key behind it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    #[error(
        "safe-settings/concurrency: the gateway is running as many queries as it may ({running}) and its queue is full; try again shortly"
    )]
    QueueFull { running: usize },
    #[error(
        "safe-settings/concurrency: the query waited {waited_seconds} s for one of the {running} query slots; try again shortly"
    )]
    QueueTimeout { running: usize, waited_seconds: u64 },
    #[error(
        "safe-settings/rate-limit: you may start {per_minute} queries a minute; wait a few seconds before sending more"
    )]
    RateLimited { per_minute: u32 },
    #[error(
        "safe-settings/concurrency: you already have {0} queries running or queued, as many as one user may; wait for one to finish"
    )]
    UserBusy(usize),
    #[error(
        "safe-settings/deadline: the query ran longer than {0} s and was stopped; filter earlier, join fewer tables or aggregate sooner"
    )]
    Deadline(u64),
    #[error(
        "safe-settings/result-size: the result holds more than {0} bytes; aggregate further or select fewer columns"
    )]
    ResultTooLarge(usize),
    #[error("safe-settings/overflow: a DECIMAL result left its 38 digits; cast to DOUBLE to work with larger values")]
    Overflow,
    #[error("safe-settings/shutdown: the gateway is shutting down and stopped the query; send it again shortly")]
    ShuttingDown,
}

/// A per-query view of the gateway-wide pool: a reservation must fit both the query's own cap
/// and what the gateway has left.
#[derive(Debug)]
pub struct QueryPool {
    shared: Arc<dyn MemoryPool>,
    limit: usize,
    used: AtomicUsize,
}

impl fmt::Display for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query pool (used {} of {} bytes; gateway pool {})",
            self.used.load(Ordering::Relaxed),
            self.limit,
            self.shared
        )
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "sde-query"
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DFResult<()> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let new = used.checked_add(additional)?;
                (new <= self.limit).then_some(new)
            })
            .map_err(|used| {
                datafusion::error::DataFusionError::ResourcesExhausted(format!(
                    "query memory cap: {additional} more bytes for {} would exceed {} (already {used})",
                    reservation.consumer().name(),
                    self.limit
                ))
            })?;
        if let Err(e) = self.shared.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// A token bucket per user.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The gateway's load limits, shared by every call.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    pool: Arc<dyn MemoryPool>,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    in_flight: Arc<AtomicI64>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Per user, queries running or queued.
    per_user: Arc<Mutex<HashMap<String, usize>>>,
    /// Query calls between their start and their audit record.
    calls: Arc<AtomicI64>,
    /// Set when the shutdown grace period is over: running queries stop.
    cut_off: tokio::sync::watch::Sender<bool>,
    /// Cores this gateway's queries share.
    cores: usize,
    /// What every query's runtime shares: DataFusion's caches of file listings, Parquet
    /// metadata and file statistics (datasets are immutable versions), and no disk.
    shared: Arc<RuntimeEnv>,
}

/// A query call in progress, from its start to its audit record.
#[derive(Debug)]
pub struct Call(Arc<AtomicI64>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running query's slot. Dropping it (the query finished, failed, hit its deadline or its
/// client went away) frees the slot and lowers the in-flight count.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _user: UserSlot,
    in_flight: Arc<AtomicI64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One of a user's queries, running or queued.
#[derive(Debug)]
struct UserSlot {
    user: String,
    per_user: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut per_user = self.per_user.lock().expect("per-user lock");
        if let Some(n) = per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

/// The runtime every query's own is made from: no spilling to disk, and the local file system
/// read through [`LocalStore`].
fn shared_runtime() -> Arc<RuntimeEnv> {
    let runtime = RuntimeEnvBuilder::new()
        .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
        .build_arc()
        .expect("a runtime without disk builds");
    runtime.register_object_store(
        ObjectStoreUrl::local_filesystem().as_ref(),
        Arc::new(LocalStore::default()),
    );
    runtime
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            config: config.clone(),
            pool: Arc::new(GreedyMemoryPool::new(config.memory_pool_bytes)),
            slots: Arc::new(Semaphore::new(config.max_concurrent_queries)),
            queued: AtomicUsize::new(0),
            in_flight: Arc::new(AtomicI64::new(0)),
            buckets: Mutex::new(HashMap::new()),
            per_user: Default::default(),
            calls: Arc::new(AtomicI64::new(0)),
            cut_off: tokio::sync::watch::channel(false).0,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            shared: shared_runtime(),
        }
    }

    /// Marks a query call in progress until the returned guard drops.
    pub fn call(&self) -> Call {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Call(Arc::clone(&self.calls))
    }

    /// Query calls in progress (admitted or not, audit record not yet written).
    pub fn calls(&self) -> i64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops every running and queued query (the shutdown grace period is over).
    pub fn cut_off(&self) {
        self.cut_off.send_replace(true);
    }

    /// Completes once [`Limits::cut_off`] has been called.
    pub async fn cut(&self) {
        let mut rx = self.cut_off.subscribe();
        let _ = rx.wait_for(|cut| *cut).await;
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Queries executing now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How many partitions (threads) the query being planned now should run on: all the cores
    /// while it runs alone, fewer as more queries run at once. Under load, splitting each query
    /// across cores that other queries already keep busy only adds exchanges between threads and
    /// a second aggregation phase; each query on one core does the same work with less overhead.
    /// Results do not depend on it.
    pub fn partitions(&self) -> usize {
        let running = usize::try_from(self.in_flight()).unwrap_or(0);
        partitions_for(self.cores, running)
    }

    /// Queries waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Bytes reserved in the gateway-wide memory pool now.
    pub fn memory_reserved(&self) -> usize {
        self.pool.reserved()
    }

    /// The deadline of one query.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_secs(self.config.query_timeout_seconds)
    }

    /// A DataFusion runtime for one query: its own memory cap inside the gateway's pool, no
    /// spilling to disk, the gateway's caches of Parquet metadata and file listings.
    pub fn runtime(&self) -> DFResult<Arc<RuntimeEnv>> {
        let pool = QueryPool {
            shared: Arc::clone(&self.pool),
            limit: self.config.query_memory_bytes,
            used: AtomicUsize::new(0),
        };
        RuntimeEnvBuilder::from_runtime_env(&self.shared)
            .with_memory_pool(Arc::new(pool))
            .build_arc()
    }

    /// The runtime of the sessions kept across queries (which plan, but whose queries run
    /// under a runtime of their own): the shared caches, and the gateway-wide pool.
    pub fn session_runtime(&self) -> DFResult<Arc<RuntimeEnv>> {
        RuntimeEnvBuilder::from_runtime_env(&self.shared)
            .with_memory_pool(Arc::clone(&self.pool))
            .build_arc()
    }

    /// Takes one of `user`'s rate-limit tokens, or refuses.
    pub fn check_rate(&self, user: &str) -> Result<(), LimitError> {
        let per_minute = self.config.user_queries_per_minute;
        let capacity = f64::from(per_minute);
        let mut buckets = self.buckets.lock().expect("rate-limit lock");
        let now = Instant::now();
        // Forget users whose buckets are full again, so the map stays small.
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.updated).as_secs() < 60);
        }
        let bucket = buckets.entry(user.to_owned()).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * capacity / 60.0;
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.updated = now;
        if bucket.tokens < 1.0 {
            return Err(LimitError::RateLimited { per_minute });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Waits for a query slot: at once if one is free, else in the queue (bounded in length and
    /// in time).
    pub async fn admit(&self, user: &str) -> Result<Slot, LimitError> {
        let user = self.user_slot(user)?;
        let running = self.config.max_concurrent_queries;
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let queued = self.queued.fetch_add(1, Ordering::SeqCst);
                let _leave = Leave(&self.queued);
                if queued >= self.config.max_queued_queries {
                    return Err(LimitError::QueueFull { running });
                }
                let wait = Duration::from_secs(self.config.queue_timeout_seconds);
                match tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        return Err(LimitError::QueueTimeout {
                            running,
                            waited_seconds: wait.as_secs(),
                        });
                    }
                }
            }
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            _permit: permit,
            _user: user,
            in_flight: Arc::clone(&self.in_flight),
        })
    }
}

impl Limits {
    /// Counts one more query for `user`, or refuses if they have as many as one user may.
    fn user_slot(&self, user: &str) -> Result<UserSlot, LimitError> {
        let cap = self.config.max_concurrent_queries_per_user;
        let mut per_user = self.per_user.lock().expect("per-user lock");
        let n = per_user.entry(user.to_owned()).or_insert(0);
        if *n >= cap {
            return Err(LimitError::UserBusy(cap));
        }
        *n += 1;
        Ok(UserSlot {
            user: user.to_owned(),
            per_user: Arc::clone(&self.per_user),
        })
    }
}

/// The cores divided among the queries running (counting the one being planned), at least one.
fn partitions_for(cores: usize, running: usize) -> usize {
    (cores / running.max(1)).max(1)
}

/// Makes every operator of `plan` give way to the runtime regularly (Tokio's cooperative
/// budget). Without it an operator that turns one input batch into many (a cross join) can run
/// for minutes inside one poll, and neither the deadline nor a departed client could stop it.
pub fn interruptible(plan: Arc<dyn ExecutionPlan>) -> DFResult<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        Ok(Transformed::yes(
            Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
        ))
    })
    .map(|t| t.data)
}

/// Leaves the queue when the wait ends, however it ends (the caller may be dropped mid-wait).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::MemoryConsumer;

    fn limits(adjust: impl FnOnce(&mut LimitsConfig)) -> Limits {
        let mut config = LimitsConfig::default();
        adjust(&mut config);
        Limits::new(&config)
    }

    #[test]
    fn queries_read_local_files_through_the_gateways_store() {
        let runtime = limits(|_| {}).runtime().unwrap();
        let store = runtime.object_store(ObjectStoreUrl::local_filesystem()).unwrap();
        assert!(store.to_string().starts_with("LocalStore"), "{store}");
    }

    #[test]
    fn the_cores_are_divided_among_the_queries_running() {
        assert_eq!(partitions_for(2, 1), 2);
        assert_eq!(partitions_for(2, 2), 1);
        assert_eq!(partitions_for(2, 8), 1);
        assert_eq!(partitions_for(8, 3), 2);
        assert_eq!(partitions_for(4, 0), 4);
    }

    #[tokio::test]
    async fn a_query_planned_alone_gets_every_core_and_fewer_under_load() {
        let mut l = limits(|c| c.max_concurrent_queries_per_user = 8);
        l.cores = 4;
        let first = l.admit("alice").await.unwrap();
        assert_eq!(l.partitions(), 4);
        let more: Vec<Slot> = futures::future::try_join_all((0..3).map(|_| l.admit("alice")))
            .await
            .unwrap();
        assert_eq!(l.partitions(), 1);
        drop(more);
        assert_eq!(l.partitions(), 4);
        drop(first);
    }

    #[test]
    fn a_query_is_capped_by_its_own_limit_and_by_the_gateway_pool() {
        let l = limits(|c| {
            c.memory_pool_bytes = 1000;
            c.query_memory_bytes = 600;
        });
        let a = l.runtime().unwrap();
        let b = l.runtime().unwrap();
        let ra = MemoryConsumer::new("a").register(&a.memory_pool);
        ra.try_grow(600).unwrap();
        // Over its own cap.
        assert!(ra.try_grow(1).is_err());
        // b has its own cap, but the gateway has only 400 left.
        let rb = MemoryConsumer::new("b").register(&b.memory_pool);
        assert!(rb.try_grow(500).is_err());
        assert_eq!(
            b.memory_pool.reserved(),
            0,
            "a failed reservation leaves nothing behind"
        );
        rb.try_grow(400).unwrap();
        assert_eq!(l.memory_reserved(), 1000);
        drop(ra);
        drop(rb);
        assert_eq!(l.memory_reserved(), 0);
    }

    #[test]
    fn each_user_has_their_own_bucket() {
        let l = limits(|c| c.user_queries_per_minute = 2);
        l.check_rate("alice").unwrap();
        l.check_rate("alice").unwrap();
        let err = l.check_rate("alice").unwrap_err();
        assert!(err.to_string().starts_with("safe-settings/rate-limit"), "{err}");
        l.check_rate("dave").unwrap();
    }

    #[tokio::test]
    async fn slots_queue_then_refuse() {
        let l = limits(|c| {
            c.max_concurrent_queries = 1;
            c.max_queued_queries = 0;
        });
        let slot = l.admit("alice").await.unwrap();
        assert_eq!(l.in_flight(), 1);
        let err = l.admit("dave").await.unwrap_err();
        assert!(matches!(err, LimitError::QueueFull { .. }), "{err}");
        assert_eq!(l.queued(), 0);
        drop(slot);
        assert_eq!(l.in_flight(), 0);
        let _slot = l.admit("dave").await.unwrap();
    }

    #[tokio::test]
    async fn one_user_cannot_take_every_slot() {
        let l = limits(|c| {
            c.max_concurrent_queries = 4;
            c.max_concurrent_queries_per_user = 2;
        });
        let a = l.admit("alice").await.unwrap();
        let _b = l.admit("alice").await.unwrap();
        let err = l.admit("alice").await.unwrap_err();
        assert!(matches!(err, LimitError::UserBusy(2)), "{err}");
        let _c = l.admit("dave").await.unwrap();
        drop(a);
        let _d = l.admit("alice").await.unwrap();
    }

    #[tokio::test]
    async fn a_queued_query_waits_at_most_the_queue_timeout() {
        let l = limits(|c| {
            c.max_concurrent_queries = 1;
            c.queue_timeout_seconds = 1;
        });
        let _slot = l.admit("alice").await.unwrap();
        let err = l.admit("dave").await.unwrap_err();
        assert!(
            matches!(err, LimitError::QueueTimeout { waited_seconds: 1, .. }),
            "{err}"
        );
        assert_eq!(l.queued(), 0);
    }
}
