//! The registry's side of release budgets ([`crate::budget`]): the cells a project's board has
//! granted beyond the gateway's base budget, and the requests for more recorded when a
//! project's budget ran out. What each project has released is not here but in the audit log.

use chrono::NaiveDate;
use rusqlite::{Connection, OptionalExtension, params};

use super::admin::{Project, project};
use super::{BOARD_ROLES, Refusal, Registry, RegistryError};

/// Cells the board has granted `project` beyond the base budget.
pub fn granted(conn: &Connection, project: &str) -> Result<u64, RegistryError> {
    let cells: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(cells), 0) FROM budget_grants WHERE project_id = ?1")?
        .query_row(params![project], |r| r.get(0))?;
    Ok(u64::try_from(cells).unwrap_or(0))
}

/// Whether a request for more cells waits for the board.
pub fn requested(conn: &Connection, project: &str) -> Result<bool, RegistryError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM budget_requests WHERE project_id = ?1 AND answered_at IS NULL LIMIT 1")?
        .query_row(params![project], |_| Ok(()))
        .optional()?
        .is_some())
}

/// A board member's grant of `cells` more to `project`, in board role `role`; it answers any
/// open request. Whether `user` may decide is for the rules, asked before this.
pub fn grant(
    conn: &Connection,
    id: &str,
    role: &str,
    user: &str,
    cells: u64,
    comment: &str,
    today: NaiveDate,
) -> Result<Project, RegistryError> {
    if !BOARD_ROLES.contains(&role) {
        return Err(Refusal::InvalidChange(format!("role must be one of {}", BOARD_ROLES.join(", "))).into());
    }
    let cells = i64::try_from(cells)
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| Refusal::InvalidChange("cells must be a positive number".into()))?;
    project(conn, id)?;
    let day = today.format("%Y-%m-%d").to_string();
    conn.execute(
        "INSERT INTO budget_grants (project_id, cells, role, user_id, comment, decided_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, cells, role, user, comment, day],
    )?;
    conn.execute(
        "UPDATE budget_requests SET answered_at = ?2 WHERE project_id = ?1 AND answered_at IS NULL",
        params![id, day],
    )?;
    project(conn, id)
}

impl Registry {
    /// Cells the board has granted `project` beyond the base budget.
    pub fn budget_granted(&self, project: &str) -> Result<u64, RegistryError> {
        self.with_conn(|conn| granted(conn, project))
    }

    /// Records that `user`'s query found `project`'s budget spent (`used` of `budget` cells),
    /// unless a request already waits for the board.
    pub fn request_budget(
        &self,
        project: &str,
        user: &str,
        used: u64,
        budget: u64,
        now: &str,
    ) -> Result<(), RegistryError> {
        self.with_conn(|conn| {
            if requested(conn, project)? {
                return Ok(());
            }
            conn.execute(
                "INSERT INTO budget_requests (project_id, user_id, requested_at, cells_released, budget) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![project, user, now, used as i64, budget as i64],
            )?;
            Ok(())
        })
    }
}
