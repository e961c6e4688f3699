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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::disclosure::{Disclosure, Rules};
use crate::policy::Permit;
use crate::recent::{self, Recent};
use crate::registry::ProjectAccess;
use datafusion::logical_expr::LogicalPlan;

/// Plans kept at most (a plan is a few kilobytes).
const MAX_ENTRIES: usize = 1024;
/// Longest statement whose plan is kept.
pub const MAX_SQL_BYTES: usize = 16 << 10;

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
}

impl Ready {
    /// The same plan with disclosure functions of its own.
    pub fn rebound(&self) -> datafusion::error::Result<Ready> {
        let (permit, optimised) = self.permit.rebound(&self.optimised)?;
        let from_rows = match &self.from_rows {
            Some(plan) => Some(permit.disclosure().rebind(plan.clone())?),
            None => None,
        };
        Ok(Ready {
            permit,
            optimised,
            from_rows,
            unsettled: Arc::clone(&self.unsettled),
            plan_hash: self.plan_hash.clone(),
        })
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
}

impl Default for Plans {
    fn default() -> Self {
        Self {
            entries: Recent::new(MAX_ENTRIES),
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

    /// A kept plan, with disclosure functions of its own.
    pub fn get(&self, key: &str) -> Option<datafusion::error::Result<Ready>> {
        self.entries.get(key).map(|ready| ready.rebound())
    }

    /// Keeps `ready` under `key` if its plan calls only immutable functions.
    pub fn keep(&self, key: &str, ready: &Ready) -> datafusion::error::Result<()> {
        if crate::baselines::only_immutable(ready.permit.plan(), Disclosure::is_cell_rule)? {
            self.entries.put(key, Arc::new(ready.clone()));
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
