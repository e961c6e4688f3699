//! Board review of changes: a change that widens what an approved project can see — a dataset
//! or columns granted, a member added — does not take effect when an administrator makes it.
//! It is held as a pending change until the project's three board roles have each signed it
//! again; one refusal drops it. Narrowing changes (revoking, removing a member) and changes to
//! projects the board has not yet approved (drafts, submissions) take effect at once.
//!
//! A held change is checked when it is made, by applying it inside a savepoint that is then
//! rolled back, so a change that could never apply is refused then, not when the board signs.
//! Whether a caller may sign, and in which role, is for the rules (`sign_change`).

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::admin::{Approval, Project, project};
use super::{BOARD_ROLES, Refusal, RegistryError};

/// Project states in which a widening change waits for the board.
pub const HELD_STATES: [&str; 3] = ["approved", "active", "suspended"];

/// What a change widens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Widening {
    Grant { dataset: String, columns: Vec<String> },
    Member { user: String },
}

impl Widening {
    pub fn describe(&self) -> String {
        match self {
            Widening::Grant { dataset, columns } => format!("grant {dataset}: {}", columns.join(", ")),
            Widening::Member { user } => format!("add member {user}"),
        }
    }
}

/// A change waiting for the board.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChange {
    pub id: u64,
    pub change: String,
    pub requested_by: String,
    pub requested_at: String,
    pub signatures: Vec<Approval>,
}

/// Whether a widening change to `project` must wait for the board.
pub fn held(conn: &Connection, id: &str) -> Result<bool, RegistryError> {
    Ok(HELD_STATES.contains(&project(conn, id)?.state.as_str()))
}

/// Holds `change` to `id` for the board, after checking that `apply` accepts it.
pub fn hold(
    conn: &Connection,
    id: &str,
    change: &Widening,
    by: &str,
    now: &str,
    apply: impl FnOnce(&Connection, &Widening) -> Result<Project, RegistryError>,
) -> Result<Project, RegistryError> {
    conn.execute_batch("SAVEPOINT held_change")?;
    let checked = apply(conn, change);
    conn.execute_batch("ROLLBACK TO held_change; RELEASE held_change")?;
    checked?;
    conn.execute(
        "INSERT INTO pending_changes (project_id, change, requested_by, requested_at, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
        params![id, serde_json::to_string(change).expect("change serialises"), by, now],
    )?;
    project(conn, id)
}

/// Every change waiting for the board, by project, oldest first.
pub fn all_pending(conn: &Connection) -> Result<Vec<(String, PendingChange)>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT project_id FROM pending_changes WHERE state = 'pending' ORDER BY project_id",
    )?;
    let projects = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut all = Vec::new();
    for project in projects {
        for change in pending(conn, &project)? {
            all.push((project.clone(), change));
        }
    }
    Ok(all)
}

/// The changes to `id` that wait for the board, oldest first.
pub fn pending(conn: &Connection, id: &str) -> Result<Vec<PendingChange>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, change, requested_by, requested_at FROM pending_changes
         WHERE project_id = ?1 AND state = 'pending' ORDER BY id",
    )?;
    let mut changes = stmt
        .query_map(params![id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(id, change, requested_by, requested_at)| PendingChange {
            id: id as u64,
            change: serde_json::from_str::<Widening>(&change).map_or(change, |w| w.describe()),
            requested_by,
            requested_at,
            signatures: vec![],
        })
        .collect::<Vec<_>>();
    let mut stmt = conn.prepare_cached(
        "SELECT role, user_id, decision, decided_at, comment FROM change_signatures WHERE change_id = ?1 ORDER BY role",
    )?;
    for c in &mut changes {
        c.signatures = stmt
            .query_map(params![c.id as i64], Approval::from_row)?
            .collect::<Result<_, _>>()?;
    }
    Ok(changes)
}

/// A board member's signature (or refusal) of pending change `change` to `id` in `role`. The
/// third board role's signature applies it with `apply`; a refusal drops it.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    conn: &Connection,
    id: &str,
    change: u64,
    role: &str,
    user: &str,
    approve: bool,
    comment: &str,
    now: &str,
    apply: impl FnOnce(&Connection, &Widening) -> Result<Project, RegistryError>,
) -> Result<Project, RegistryError> {
    let held: Option<String> = conn
        .query_row(
            "SELECT change FROM pending_changes WHERE id = ?1 AND project_id = ?2 AND state = 'pending'",
            params![change as i64, id],
            |r| r.get(0),
        )
        .optional()?;
    let held = held.ok_or_else(|| Refusal::NotFound(format!("no pending change {change} to project {id}")))?;
    let signed = conn.execute(
        "INSERT OR IGNORE INTO change_signatures (change_id, role, user_id, decision, decided_at, comment)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            change as i64,
            role,
            user,
            if approve { "approved" } else { "rejected" },
            now,
            comment
        ],
    )?;
    if signed == 0 {
        return Err(Refusal::InvalidChange(format!("change {change} is already signed as {role}")).into());
    }
    if !approve {
        conn.execute(
            "UPDATE pending_changes SET state = 'rejected' WHERE id = ?1",
            params![change as i64],
        )?;
        return project(conn, id);
    }
    let signatures: i64 = conn.query_row(
        "SELECT COUNT(*) FROM change_signatures WHERE change_id = ?1 AND decision = 'approved'",
        params![change as i64],
        |r| r.get(0),
    )?;
    if signatures as usize == BOARD_ROLES.len() {
        let widening: Widening = serde_json::from_str(&held)
            .map_err(|e| Refusal::InvalidChange(format!("change {change} cannot be read: {e}")))?;
        apply(conn, &widening)?;
        conn.execute(
            "UPDATE pending_changes SET state = 'applied' WHERE id = ?1",
            params![change as i64],
        )?;
    }
    project(conn, id)
}
