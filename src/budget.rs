//! Release budgets: each project may release so many cells (`disclosure.release_budget_cells`,
//! plus what its board has granted since), and no more until the board grants more.
//!
//! Every released cell is one more measurement of the people behind it; averaging many
//! distinct decompositions of the same people is bounded only by how many measurements a
//! project can take. A query is charged the cells it releases (the non-NULL values of its
//! checked columns, and at least one: an empty answer is an answer too) when it executes,
//! before its result can be fetched. A result that does not fit in what is left is refused with
//! `safe-outputs/release-budget`, and spends what was left: so whether a result fits — which
//! depends on the data — is told once per budget, never for free, and once a budget is spent
//! every query is refused alike. A request for more is recorded in the registry for the board.
//!
//! What each project has used lives in the audit log: each accepted `query.execute` record
//! states its `cells_released`, and the tally starts from the log when the gateway starts
//! ([`crate::audit::AuditLog::released_cells`]), so it survives restarts and an auditor can
//! recount it. The charge is taken here, under one lock, before the record is written: two
//! queries cannot both spend the last cells.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// The cells each project has released, against its budget.
#[derive(Debug)]
pub struct Budgets {
    /// Cells every project may release before any board grant; 0: no budget.
    base: u64,
    used: Mutex<HashMap<String, u64>>,
}

/// Where a project's budget stands after a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The project's whole budget: the gateway's base and the board's grants.
    pub budget: u64,
    /// Cells released so far, this result's included.
    pub used: u64,
}

impl Standing {
    pub fn remaining(&self) -> u64 {
        self.budget.saturating_sub(self.used)
    }

    /// The keys a released result's schema metadata carries.
    pub fn metadata(&self) -> [(String, String); 2] {
        [
            ("sde.budget_cells".to_owned(), self.budget.to_string()),
            ("sde.budget_remaining".to_owned(), self.remaining().to_string()),
        ]
    }
}

/// A result the project's budget could not cover: the budget is now spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "safe-outputs/release-budget: project {project} has spent its release budget of {budget} cells (this result did not fit in the {spent} left, which it used up); a request for more has been recorded for the board"
)]
pub struct Exhausted {
    pub project: String,
    pub budget: u64,
    /// What was left, and is now spent by the refused result.
    pub spent: u64,
}

impl Budgets {
    /// Budgets of `base` cells a project, starting from what the audit log says each project
    /// has released.
    pub fn new(base: u64, released: &BTreeMap<String, u64>) -> Self {
        Self {
            base,
            used: Mutex::new(released.iter().map(|(p, c)| (p.clone(), *c)).collect()),
        }
    }

    /// Whether there are budgets at all.
    pub fn enabled(&self) -> bool {
        self.base > 0
    }

    /// Charges `project` (whose board has granted `granted` cells beyond the base) `cells` (at
    /// least one), or, if they do not fit, spends what is left and refuses. Without budgets,
    /// charges nothing and returns `None`.
    pub fn charge(&self, project: &str, granted: u64, cells: u64) -> Result<Option<Standing>, Exhausted> {
        if !self.enabled() {
            return Ok(None);
        }
        let budget = self.base.saturating_add(granted);
        let mut used = self.used.lock().expect("budget lock");
        let spent = used.entry(project.to_owned()).or_insert(0);
        let after = spent.saturating_add(cells.max(1));
        if after > budget {
            let left = budget.saturating_sub(*spent);
            *spent = (*spent).max(budget);
            return Err(Exhausted {
                project: project.to_owned(),
                budget,
                spent: left,
            });
        }
        *spent = after;
        Ok(Some(Standing { budget, used: after }))
    }

    /// Gives back a charge whose result was never recorded (its audit record failed).
    pub fn refund(&self, project: &str, cells: u64) {
        let mut used = self.used.lock().expect("budget lock");
        if let Some(spent) = used.get_mut(project) {
            *spent = spent.saturating_sub(cells);
        }
    }

    /// Cells `project` has released.
    pub fn used(&self, project: &str) -> u64 {
        self.used
            .lock()
            .expect("budget lock")
            .get(project)
            .copied()
            .unwrap_or(0)
    }

    /// The base budget of every project.
    pub fn base(&self) -> u64 {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_budget_and_refuses_past_it() {
        let budgets = Budgets::new(10, &BTreeMap::from([("p".to_owned(), 4)]));
        assert_eq!(budgets.charge("p", 0, 3), Ok(Some(Standing { budget: 10, used: 7 })));
        // A result that does not fit spends what is left.
        let refused = budgets.charge("p", 0, 4).unwrap_err();
        assert_eq!((refused.spent, refused.budget), (3, 10));
        assert!(refused.to_string().starts_with("safe-outputs/release-budget: "));
        assert_eq!(budgets.used("p"), 10);
        // Spent, every query is refused alike, even one releasing nothing.
        assert_eq!(budgets.charge("p", 0, 0).unwrap_err().spent, 0);
        // A board grant makes room.
        assert_eq!(budgets.charge("p", 5, 5).unwrap().unwrap().remaining(), 0);
        // Other projects have budgets of their own; an empty answer costs a cell.
        assert_eq!(budgets.charge("q", 0, 0).unwrap().unwrap().used, 1);
    }

    #[test]
    fn a_refund_gives_back_a_charge() {
        let budgets = Budgets::new(10, &BTreeMap::new());
        budgets.charge("p", 0, 7).unwrap();
        budgets.refund("p", 7);
        assert_eq!(budgets.used("p"), 0);
    }

    #[test]
    fn without_a_base_nothing_is_charged() {
        let budgets = Budgets::new(0, &BTreeMap::new());
        assert_eq!(budgets.charge("p", 0, u64::MAX), Ok(None));
        assert_eq!(budgets.used("p"), 0);
    }
}
