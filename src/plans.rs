//! The plans of repeated statements, kept so that a statement a project sends again is not
//! parsed, planned, checked and optimised again (JDBC prepares every query; dashboards and
//! notebooks send the same ones over and over).
//!
//! A plan is kept under its project scope (the project, the snapshot of the data it reads, its
//! cohort), its grants, the disclosure rules in force and the SQL text. A change to any of them
//! (a new dataset version, a revoked column, a stricter rule) makes another key, so the
//! statement is planned and checked afresh under what holds then; Safe People and Safe Projects
//! are judged at every call before any lookup. Only plans whose functions are all immutable are
//! kept (`now()` is folded into a plan when it is optimised), and only statements of at most
//! [`MAX_SQL_BYTES`]. Each run of a kept plan gets disclosure functions of its own
//! ([`Permit::rebound`]), so what one run withholds is never counted in another's report.
//!
//! A kept statement's physical plans are kept too ([`Physical`]): planning a statement
//! physically (its scans, the optimiser's passes) took as long as running a small query. Each
//! is used by one run at a time, with its own disclosure functions whose tally is reset
//! before each run, and its operators' state reset by DataFusion ([`reset_plan_states`]). Only
//! plans made of operators that reset completely are kept, none with a dynamic filter (whose
//! state a reset would not reach), none holding a baseline's result (kept, and bounded, by
//! [`crate::baselines`]); each for [`MAX_RUNS`] runs at most, fewer where its
//! scans gather many metrics ([`MAX_METRICS`]), and [`MAX_IDLE`] across all statements.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::disclosure::{Disclosure, Rules};
use crate::policy::Permit;
use crate::recent::{self, Recent};
use crate::registry::ProjectAccess;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;

/// Plans kept at most (a plan is a few kilobytes).
const MAX_ENTRIES: usize = 1024;
/// Longest statement whose plan is kept.
pub const MAX_SQL_BYTES: usize = 16 << 10;
/// Physical plans kept per statement: one for each of the queries that can run at once
/// (`limits.max_concurrent_queries` as shipped); a run finding none free plans afresh.
const MAX_PHYSICAL: usize = 8;
/// Physical plans kept, not running, across all statements.
pub const MAX_IDLE: usize = 64;
/// Runs of one physical plan at most.
pub const MAX_RUNS: u32 = 64;
/// Metrics one physical plan may gather before it is replaced: DataFusion's Parquet scan adds
/// its metrics (about 50 for each file it opens) to the plan at every run, so a plan reading
/// many files runs fewer times. With [`MAX_IDLE`], kept plans hold a few tens of MiB at most.
pub const MAX_METRICS: usize = 4096;
/// Operators that [`reset_plan_states`] leaves with nothing of an earlier run: fresh metrics
/// and streams, a scan's work queue made again. Any other operator keeps its plan from being
/// run twice.
const RESETTABLE: [&str; 10] = [
    "AggregateExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "CooperativeExec",
    "DataSourceExec",
    "FilterExec",
    "ProjectionExec",
    "RepartitionExec",
    "SortExec",
    "SortPreservingMergeExec",
];

/// Which of a statement's plans: people told from rows ([`Permit::from_rows`]) or counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    FromRows,
    Counted,
}

/// A physical plan of a kept statement and the permit whose disclosure functions it calls (so
/// whose tally reports what a run withheld), used by one run at a time.
#[derive(Debug)]
pub struct Physical {
    pub plan: Arc<dyn ExecutionPlan>,
    pub permit: Permit,
    variant: Variant,
    partitions: usize,
    runs: u32,
    /// Runs it may serve: [`MAX_RUNS`], fewer where a run adds many metrics (counted after
    /// its first run); 0 where it may not run again (see [`reusable`]).
    max_runs: Option<u32>,
}

impl Physical {
    /// A plan just made for `variant` on `partitions` partitions, calling `permit`'s
    /// disclosure functions. `reusable` is false where the plan holds a baseline's result.
    pub fn new(
        plan: Arc<dyn ExecutionPlan>,
        permit: Permit,
        variant: Variant,
        partitions: usize,
        reusable: bool,
    ) -> datafusion::error::Result<Self> {
        let max_runs = if reusable && self::reusable(&plan)? {
            None
        } else {
            Some(0)
        };
        Ok(Self {
            plan,
            permit,
            variant,
            partitions,
            runs: 1,
            max_runs,
        })
    }

    /// Whether it may serve another run; after its first, how many its metrics allow.
    fn may_run_again(&mut self) -> bool {
        let max_runs = *self.max_runs.get_or_insert_with(|| {
            let mut metrics = 0;
            let _ = self.plan.apply(|node| {
                metrics += node.metrics().map_or(0, |m| m.iter().count());
                Ok(TreeNodeRecursion::Continue)
            });
            (MAX_METRICS / metrics.max(1)).min(MAX_RUNS as usize) as u32
        });
        self.runs < max_runs
    }
}

/// The physical plans of one statement not running now. Those of every statement count
/// against [`MAX_IDLE`].
#[derive(Debug)]
pub struct Pool {
    free: Mutex<Vec<Physical>>,
    idle: Arc<AtomicUsize>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        let kept = self.free.get_mut().map_or(0, |free| free.len());
        self.idle.fetch_sub(kept, Ordering::Relaxed);
    }
}

/// Whether `plan` can run again after [`reset_plan_states`]: every operator one that the reset
/// leaves with nothing of an earlier run, no dynamic filter in any of their expressions.
pub fn reusable(plan: &Arc<dyn ExecutionPlan>) -> datafusion::error::Result<bool> {
    let mut reusable = true;
    plan.apply(|node| {
        let mut dynamic = false;
        node.apply_expressions(&mut |e| {
            e.apply(|e| {
                dynamic |= e.is::<DynamicFilterPhysicalExpr>();
                Ok(if dynamic {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            })
        })?;
        reusable = !dynamic && RESETTABLE.contains(&node.name());
        Ok(if reusable {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    })?;
    Ok(reusable)
}

/// A permitted plan, optimised, and the hash of its optimised form (for the audit record).
#[derive(Debug, Clone)]
pub struct Ready {
    pub permit: Permit,
    pub optimised: LogicalPlan,
    /// [`Permit::from_rows`], optimised: run first, while it has settled every run so far.
    pub from_rows: Option<LogicalPlan>,
    /// Set once `from_rows` could not settle a group: the statement's later runs (all sharing
    /// this flag through the kept plan) go straight to `optimised`.
    pub unsettled: Arc<AtomicBool>,
    pub plan_hash: String,
    /// Physical plans of this statement not running now (shared by its copies).
    pub physical: Arc<Pool>,
}

impl Ready {
    /// The plan of `variant` (optimised), with disclosure functions of its own (only that
    /// plan is rebound: a run plans one variant).
    pub fn rebound_plan(&self, variant: Variant) -> datafusion::error::Result<(Permit, LogicalPlan)> {
        let plan = match variant {
            Variant::Counted => &self.optimised,
            Variant::FromRows => self.from_rows.as_ref().ok_or_else(|| {
                datafusion::error::DataFusionError::Internal("no plan telling people from rows".into())
            })?,
        };
        self.permit.rebound(plan)
    }

    /// The plan to try first, if any: people told from rows, unless that failed before.
    pub fn first_try(&self) -> Option<&LogicalPlan> {
        self.from_rows
            .as_ref()
            .filter(|_| !self.unsettled.load(Ordering::Relaxed))
    }
}

pub struct Plans {
    entries: Recent<Arc<Ready>>,
    /// Runs that used a kept physical plan.
    reused: AtomicU64,
    /// Physical plans kept, not running, across all statements.
    idle: Arc<AtomicUsize>,
}

impl Default for Plans {
    fn default() -> Self {
        Self {
            entries: Recent::new(MAX_ENTRIES),
            reused: AtomicU64::new(0),
            idle: Arc::default(),
        }
    }
}

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plans").field("entries", &self.len()).finish()
    }
}

impl Plans {
    /// The key of `sql` for a project, or `None` if its plan is not to be kept.
    pub fn key(scope: &str, access: &ProjectAccess, rules: &Rules, sql: &str) -> Option<String> {
        if sql.len() > MAX_SQL_BYTES {
            return None;
        }
        Some(recent::key(&[
            scope,
            &format!("{:?}", access.grants),
            &format!("{rules:?}"),
            sql,
        ]))
    }

    /// A kept plan (to be run through [`Plans::take`] or [`Ready::rebound_plan`]).
    pub fn get(&self, key: &str) -> Option<Arc<Ready>> {
        self.entries.get(key)
    }

    /// Where a new statement's physical plans will be kept.
    pub fn pool(&self) -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::default(),
            idle: Arc::clone(&self.idle),
        })
    }

    /// A physical plan of `ready`'s `variant` on `partitions` partitions kept from an earlier
    /// run, ready to run again: its operators' state and its disclosure tally reset.
    pub fn take(
        &self,
        ready: &Ready,
        variant: Variant,
        partitions: usize,
    ) -> datafusion::error::Result<Option<Physical>> {
        let found = {
            let mut free = ready.physical.free.lock().expect("physical plans lock");
            free.iter()
                .position(|p| p.variant == variant && p.partitions == partitions)
                .map(|i| free.swap_remove(i))
        };
        let Some(mut physical) = found else {
            return Ok(None);
        };
        self.idle.fetch_sub(1, Ordering::Relaxed);
        physical.plan = reset_plan_states(physical.plan)?;
        physical.permit.disclosure().reset();
        physical.runs += 1;
        self.reused.fetch_add(1, Ordering::Relaxed);
        Ok(Some(physical))
    }

    /// Keeps `physical` for `ready`'s later runs, once its run is over and its tally read,
    /// if it can run again.
    pub fn give_back(&self, ready: &Ready, mut physical: Physical) {
        if !physical.may_run_again() {
            return;
        }
        let mut free = ready.physical.free.lock().expect("physical plans lock");
        if free.len() >= MAX_PHYSICAL {
            return;
        }
        // Counted before it is kept, so that concurrent returns never keep more than MAX_IDLE.
        if self.idle.fetch_add(1, Ordering::Relaxed) < MAX_IDLE {
            free.push(physical);
        } else {
            self.idle.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Physical plans kept now, not running.
    pub fn idle(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }

    /// Runs that used a kept physical plan so far.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Keeps `ready` under `key` if its plan calls only immutable functions.
    pub fn keep(&self, key: &str, ready: &Arc<Ready>) -> datafusion::error::Result<()> {
        if crate::baselines::only_immutable(ready.permit.plan(), Disclosure::is_cell_rule)? {
            self.entries.put(key, Arc::clone(ready));
        }
        Ok(())
    }

    /// Plans kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    async fn physical(sql: &str) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from((0..100).collect::<Vec<_>>())),
                Arc::new(Int64Array::from((0..100).map(|i| i % 7).collect::<Vec<_>>())),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        for t in ["t", "u"] {
            let table = MemTable::try_new(Arc::clone(&schema), vec![vec![batch.clone()]]).unwrap();
            ctx.register_table(t, Arc::new(table)).unwrap();
        }
        ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap()
    }

    #[tokio::test]
    async fn only_plans_whose_every_operator_resets_run_again() {
        let aggregate = physical("SELECT b, COUNT(*) FROM t WHERE a > 3 GROUP BY b").await;
        assert!(reusable(&aggregate).unwrap());
        // A join keeps its build side, and its dynamic filter reaches into the probe's scan.
        let join = physical("SELECT t.b, COUNT(*) FROM t JOIN u ON t.a = u.a GROUP BY t.b").await;
        assert!(!reusable(&join).unwrap());
        // The top rows: a sort with a dynamic filter, which a reset would not reach where
        // it was pushed.
        let top = physical("SELECT b, COUNT(*) AS n FROM t GROUP BY b ORDER BY n DESC LIMIT 2").await;
        assert!(!reusable(&top).unwrap());
    }

    /// Takes and gives back `ready`'s plan until it is retired; the runs it served.
    fn runs_served(plans: &Plans, ready: &Ready, plan: Arc<dyn ExecutionPlan>) -> u32 {
        let first = Physical::new(plan, ready.permit.clone(), Variant::Counted, 2, true).unwrap();
        plans.give_back(ready, first);
        let mut runs = 1;
        while let Some(again) = plans.take(ready, Variant::Counted, 2).unwrap() {
            runs += 1;
            plans.give_back(ready, again);
        }
        runs
    }

    fn ready(plans: &Plans) -> Ready {
        let logical = datafusion::logical_expr::LogicalPlanBuilder::empty(false)
            .build()
            .unwrap();
        let permit = crate::policy::check_with(logical, Rules::DEFAULT, &Default::default(), None).unwrap();
        Ready {
            optimised: permit.plan().clone(),
            permit,
            from_rows: None,
            unsettled: Arc::default(),
            plan_hash: String::new(),
            physical: plans.pool(),
        }
    }

    #[tokio::test]
    async fn a_physical_plan_is_kept_for_a_limited_number_of_runs() {
        let plans = Plans::default();
        let ready = ready(&plans);
        let plan = physical("SELECT b, COUNT(*) FROM t GROUP BY b").await;
        plans.give_back(
            &ready,
            Physical::new(Arc::clone(&plan), ready.permit.clone(), Variant::Counted, 2, true).unwrap(),
        );
        assert_eq!(plans.idle(), 1);
        // Another variant or partition count plans afresh.
        assert!(plans.take(&ready, Variant::FromRows, 2).unwrap().is_none());
        assert!(plans.take(&ready, Variant::Counted, 1).unwrap().is_none());
        let kept = plans.take(&ready, Variant::Counted, 2).unwrap().unwrap();
        assert_eq!(plans.idle(), 0);
        drop(kept);
        assert_eq!(runs_served(&plans, &ready, plan), MAX_RUNS);
        // A plan holding a baseline's result is not kept.
        let baseline = physical("SELECT b, COUNT(*) FROM t GROUP BY b").await;
        plans.give_back(
            &ready,
            Physical::new(baseline, ready.permit.clone(), Variant::Counted, 2, false).unwrap(),
        );
        assert_eq!(plans.idle(), 0);
        // Forgetting the statement forgets its kept plans.
        plans.give_back(
            &ready,
            Physical::new(
                physical("SELECT a, COUNT(*) FROM t GROUP BY a").await,
                ready.permit.clone(),
                Variant::Counted,
                2,
                true,
            )
            .unwrap(),
        );
        assert_eq!(plans.idle(), 1);
        drop(ready);
        assert_eq!(plans.idle(), 0);
    }

    #[tokio::test]
    async fn a_plan_scanning_many_files_is_replaced_sooner() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = SessionContext::new();
        for f in 0..8 {
            let sql = format!(
                "COPY (SELECT i % 7 AS b FROM generate_series(1, 1000) AS s(i)) TO '{}/f{f}.parquet'",
                dir.path().display()
            );
            ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        }
        ctx.register_parquet("p", dir.path().to_str().unwrap(), Default::default())
            .await
            .unwrap();
        let plan = ctx
            .sql("SELECT b, COUNT(*) FROM p GROUP BY b")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        datafusion::physical_plan::collect(Arc::clone(&plan), ctx.task_ctx())
            .await
            .unwrap();
        let plans = Plans::default();
        let runs = runs_served(&plans, &ready(&plans), plan);
        assert!((1..MAX_RUNS).contains(&runs), "{runs}");
    }
}
