//! The registry's administrative changes: organisations, users, projects and their lifecycle,
//! board decisions, members and grants. Each function works inside the caller's transaction
//! ([`super::Registry::begin`]), validates its input and says what is wrong in words an
//! administrator can act on. Who may make a change is the rules' business, not these functions'.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{BOARD_ROLES, Refusal, RegistryError};

/// Roles a user may hold.
pub const ROLES: [&str; 7] = [
    "researcher",
    "admin",
    "auditor",
    "output-checker",
    "board:caldicott_guardian",
    "board:ccio",
    "board:public_representative",
];
const DSPT_STATUSES: [&str; 3] = ["standards_met", "approaching_standards", "not_met"];
const ACCREDITATIONS: [&str; 3] = ["accredited", "suspended", "withdrawn"];

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Organisation {
    pub id: String,
    pub name: String,
    pub ico_registration: String,
    pub dspt_status: String,
    pub dspt_expiry: String,
    pub accreditation: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub organisation: String,
    pub display_name: String,
    pub roles: Vec<String>,
    pub accreditation_expiry: String,
    pub training_date: String,
    pub suspended: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub dataset: String,
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approval {
    pub role: String,
    pub user: String,
    pub decision: String,
    pub decided_at: String,
    pub comment: String,
}

impl Approval {
    /// A board decision from a row of `role, user_id, decision, decided_at, comment` (of
    /// `approvals` or `change_signatures`).
    pub(super) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
        Ok(Approval {
            role: r.get(0)?,
            user: r.get(1)?,
            decision: r.get(2)?,
            decided_at: r.get(3)?,
            comment: r.get(4)?,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Project {
    pub id: String,
    pub title: String,
    pub purpose: String,
    pub justification: String,
    pub lawful_basis: String,
    pub start_date: String,
    pub end_date: String,
    pub cohort: String,
    pub parties: Vec<String>,
    pub state: String,
    pub members: Vec<String>,
    pub grants: Vec<Grant>,
    pub approvals: Vec<Approval>,
    pub requested: Vec<Grant>,
    /// Cells the board has granted beyond the gateway's base release budget.
    pub budget_granted: u64,
    /// A request for more cells waits for the board.
    pub budget_requested: bool,
}

fn invalid(message: impl Into<String>) -> RegistryError {
    Refusal::InvalidChange(message.into()).into()
}

fn not_found(message: impl Into<String>) -> RegistryError {
    Refusal::NotFound(message.into()).into()
}

/// Identifiers are short and plain, so they are safe in logs, headers and file names.
fn check_id(what: &str, id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} id `{id}` must be 1-64 characters of a-z, 0-9, '-', '_' or '.'"
        )))
    }
}

fn check_date(field: &str, value: &str) -> Result<NaiveDate, RegistryError> {
    NaiveDate::parse_from_str(value, "%Y-%m-%d").map_err(|_| invalid(format!("{field} must be a date YYYY-MM-DD")))
}

fn check_one_of(field: &str, value: &str, allowed: &[&str]) -> Result<(), RegistryError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(invalid(format!("{field} must be one of {}", allowed.join(", "))))
    }
}

fn required(field: &str, value: &str) -> Result<(), RegistryError> {
    if value.trim().is_empty() {
        Err(invalid(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// Maps a uniqueness violation to a clear message.
fn exists(what: &str, id: &str) -> impl FnOnce(rusqlite::Error) -> RegistryError {
    let message = format!("{what} {id} already exists");
    move |e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => invalid(message),
        other => other.into(),
    }
}

// ---- Organisations ----

fn check_organisation(org: &Organisation) -> Result<(), RegistryError> {
    check_id("organisation", &org.id)?;
    required("name", &org.name)?;
    required("ico_registration", &org.ico_registration)?;
    check_one_of("dspt_status", &org.dspt_status, &DSPT_STATUSES)?;
    check_date("dspt_expiry", &org.dspt_expiry)?;
    check_one_of("accreditation", &org.accreditation, &ACCREDITATIONS)
}

pub fn create_organisation(conn: &Connection, org: &Organisation) -> Result<Organisation, RegistryError> {
    let mut org = org.clone();
    if org.accreditation.is_empty() {
        org.accreditation = "accredited".into();
    }
    check_organisation(&org)?;
    conn.execute(
        "INSERT INTO organisations (id, name, ico_registration, dspt_status, dspt_expiry, accreditation)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            org.id,
            org.name,
            org.ico_registration,
            org.dspt_status,
            org.dspt_expiry,
            org.accreditation
        ],
    )
    .map_err(exists("organisation", &org.id))?;
    organisation(conn, &org.id)
}

pub fn update_organisation(conn: &Connection, org: &Organisation) -> Result<Organisation, RegistryError> {
    let mut org = org.clone();
    if org.accreditation.is_empty() {
        org.accreditation = organisation(conn, &org.id)?.accreditation;
    }
    check_organisation(&org)?;
    conn.execute(
        "UPDATE organisations SET name = ?2, ico_registration = ?3, dspt_status = ?4, dspt_expiry = ?5,
         accreditation = ?6 WHERE id = ?1",
        params![
            org.id,
            org.name,
            org.ico_registration,
            org.dspt_status,
            org.dspt_expiry,
            org.accreditation
        ],
    )?;
    organisation(conn, &org.id)
}

/// Suspends, withdraws or restores an organisation's accreditation; every user of a suspended or
/// withdrawn organisation is refused at their next call.
pub fn set_accreditation(conn: &Connection, id: &str, accreditation: &str) -> Result<Organisation, RegistryError> {
    check_one_of("accreditation", accreditation, &ACCREDITATIONS)?;
    let changed = conn.execute(
        "UPDATE organisations SET accreditation = ?2 WHERE id = ?1",
        params![id, accreditation],
    )?;
    if changed == 0 {
        return Err(not_found(format!("no organisation {id}")));
    }
    organisation(conn, id)
}

pub fn organisation(conn: &Connection, id: &str) -> Result<Organisation, RegistryError> {
    list_organisations_where(conn, Some(id))?
        .pop()
        .ok_or_else(|| not_found(format!("no organisation {id}")))
}

pub fn list_organisations(conn: &Connection) -> Result<Vec<Organisation>, RegistryError> {
    list_organisations_where(conn, None)
}

fn list_organisations_where(conn: &Connection, id: Option<&str>) -> Result<Vec<Organisation>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, ico_registration, dspt_status, dspt_expiry, accreditation FROM organisations
         WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        Ok(Organisation {
            id: r.get(0)?,
            name: r.get(1)?,
            ico_registration: r.get(2)?,
            dspt_status: r.get(3)?,
            dspt_expiry: r.get(4)?,
            accreditation: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- Users ----

fn check_user(conn: &Connection, user: &User) -> Result<(), RegistryError> {
    check_id("user", &user.id)?;
    organisation(conn, &user.organisation)?;
    check_date("accreditation_expiry", &user.accreditation_expiry)?;
    check_date("training_date", &user.training_date)?;
    if user.roles.is_empty() {
        return Err(invalid("a user needs at least one role"));
    }
    for role in &user.roles {
        check_one_of("role", role, &ROLES)?;
    }
    Ok(())
}

fn write_roles(conn: &Connection, user: &User) -> Result<(), RegistryError> {
    conn.execute("DELETE FROM user_roles WHERE user_id = ?1", params![user.id])?;
    for role in &user.roles {
        conn.execute(
            "INSERT OR IGNORE INTO user_roles (user_id, role) VALUES (?1, ?2)",
            params![user.id, role],
        )?;
    }
    Ok(())
}

pub fn create_user(conn: &Connection, user: &User) -> Result<User, RegistryError> {
    check_user(conn, user)?;
    let name = if user.display_name.is_empty() {
        &user.id
    } else {
        &user.display_name
    };
    conn.execute(
        "INSERT INTO users (id, organisation_id, display_name, accreditation_expiry, training_date, suspended)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            user.id,
            user.organisation,
            name,
            user.accreditation_expiry,
            user.training_date,
            user.suspended
        ],
    )
    .map_err(exists("user", &user.id))?;
    write_roles(conn, user)?;
    self::user(conn, &user.id)
}

pub fn update_user(conn: &Connection, user: &User) -> Result<User, RegistryError> {
    self::user(conn, &user.id)?;
    check_user(conn, user)?;
    conn.execute(
        "UPDATE users SET organisation_id = ?2, display_name = ?3, accreditation_expiry = ?4, training_date = ?5,
         suspended = ?6 WHERE id = ?1",
        params![
            user.id,
            user.organisation,
            user.display_name,
            user.accreditation_expiry,
            user.training_date,
            user.suspended
        ],
    )?;
    write_roles(conn, user)?;
    self::user(conn, &user.id)
}

pub fn set_suspended(conn: &Connection, id: &str, suspended: bool) -> Result<User, RegistryError> {
    let changed = conn.execute("UPDATE users SET suspended = ?2 WHERE id = ?1", params![id, suspended])?;
    if changed == 0 {
        return Err(not_found(format!("no user {id}")));
    }
    user(conn, id)
}

pub fn user(conn: &Connection, id: &str) -> Result<User, RegistryError> {
    list_users_where(conn, None, Some(id))?
        .pop()
        .ok_or_else(|| not_found(format!("no user {id}")))
}

pub fn list_users(conn: &Connection, organisation: Option<&str>) -> Result<Vec<User>, RegistryError> {
    list_users_where(conn, organisation, None)
}

fn list_users_where(conn: &Connection, org: Option<&str>, id: Option<&str>) -> Result<Vec<User>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, organisation_id, display_name, accreditation_expiry, training_date, suspended FROM users
         WHERE (?1 IS NULL OR organisation_id = ?1) AND (?2 IS NULL OR id = ?2) ORDER BY id",
    )?;
    let mut users = stmt
        .query_map(params![org, id], |r| {
            Ok(User {
                id: r.get(0)?,
                organisation: r.get(1)?,
                display_name: r.get(2)?,
                roles: vec![],
                accreditation_expiry: r.get(3)?,
                training_date: r.get(4)?,
                suspended: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut roles = conn.prepare_cached("SELECT role FROM user_roles WHERE user_id = ?1 ORDER BY role")?;
    for user in &mut users {
        user.roles = roles
            .query_map(params![user.id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
    }
    Ok(users)
}

// ---- Projects ----

fn check_project(conn: &Connection, p: &Project) -> Result<(), RegistryError> {
    check_id("project", &p.id)?;
    required("title", &p.title)?;
    required("purpose", &p.purpose)?;
    required("lawful_basis", &p.lawful_basis)?;
    let start = check_date("start_date", &p.start_date)?;
    let end = check_date("end_date", &p.end_date)?;
    if end < start {
        return Err(invalid("end_date is before start_date"));
    }
    for party in &p.parties {
        organisation(conn, party)?;
    }
    Ok(())
}

fn write_parties(conn: &Connection, p: &Project) -> Result<(), RegistryError> {
    conn.execute("DELETE FROM project_parties WHERE project_id = ?1", params![p.id])?;
    for party in &p.parties {
        conn.execute(
            "INSERT OR IGNORE INTO project_parties (project_id, organisation_id) VALUES (?1, ?2)",
            params![p.id, party],
        )?;
    }
    Ok(())
}

/// A new project, as a `draft` proposal.
pub fn create_project(conn: &Connection, p: &Project) -> Result<Project, RegistryError> {
    check_project(conn, p)?;
    let requested = serde_json::to_string(&p.requested).expect("grants serialise");
    conn.execute(
        "INSERT INTO projects (id, title, purpose, justification, lawful_basis, state, start_date, end_date, cohort, requested)
         VALUES (?1, ?2, ?3, ?4, ?5, 'draft', ?6, ?7, ?8, ?9)",
        params![
            p.id,
            p.title,
            p.purpose,
            p.justification,
            p.lawful_basis,
            p.start_date,
            p.end_date,
            p.cohort,
            requested
        ],
    )
    .map_err(exists("project", &p.id))?;
    write_parties(conn, p)?;
    project(conn, &p.id)
}

/// Changes a proposal; only drafts can change (the board decides on what was submitted).
pub fn update_project(conn: &Connection, p: &Project) -> Result<Project, RegistryError> {
    let current = project(conn, &p.id)?;
    if current.state != "draft" {
        return Err(invalid(format!(
            "project {} is {}; only a draft can be changed",
            p.id, current.state
        )));
    }
    check_project(conn, p)?;
    let requested = serde_json::to_string(&p.requested).expect("grants serialise");
    conn.execute(
        "UPDATE projects SET title = ?2, purpose = ?3, justification = ?4, lawful_basis = ?5, start_date = ?6,
         end_date = ?7, cohort = ?8, requested = ?9 WHERE id = ?1",
        params![
            p.id,
            p.title,
            p.purpose,
            p.justification,
            p.lawful_basis,
            p.start_date,
            p.end_date,
            p.cohort,
            requested
        ],
    )?;
    write_parties(conn, p)?;
    project(conn, &p.id)
}

/// Moves a project from one of `from` to `to`.
pub fn transition(conn: &Connection, id: &str, from: &[&str], to: &str) -> Result<Project, RegistryError> {
    let current = project(conn, id)?;
    if !from.contains(&current.state.as_str()) {
        return Err(invalid(format!(
            "project {id} is {}; it can become {to} only from {}",
            current.state,
            from.join(" or ")
        )));
    }
    if to == "submitted" && current.parties.is_empty() {
        return Err(invalid(format!("project {id} names no party organisation")));
    }
    conn.execute("UPDATE projects SET state = ?2 WHERE id = ?1", params![id, to])?;
    project(conn, id)
}

/// Records a board member's decision in one board role. Three approvals approve the project;
/// one rejection rejects it. Whether `user` may decide is for the rules, asked before this.
pub fn decide(
    conn: &Connection,
    id: &str,
    role: &str,
    user: &str,
    approve: bool,
    comment: &str,
    today: NaiveDate,
) -> Result<Project, RegistryError> {
    check_one_of("role", role, &BOARD_ROLES)?;
    let decided: Option<String> = conn
        .query_row(
            "SELECT decision FROM approvals WHERE project_id = ?1 AND role = ?2",
            params![id, role],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(decision) = decided {
        return Err(invalid(format!("{role} has already {decision} project {id}")));
    }
    let decision = if approve { "approved" } else { "rejected" };
    conn.execute(
        "INSERT INTO approvals (project_id, role, user_id, decision, decided_at, comment) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, role, user, decision, today.format("%Y-%m-%d").to_string(), comment],
    )?;
    if !approve {
        return transition(conn, id, &["submitted"], "rejected");
    }
    let approvals: i64 = conn.query_row(
        "SELECT COUNT(*) FROM approvals WHERE project_id = ?1 AND decision = 'approved'",
        params![id],
        |r| r.get(0),
    )?;
    if approvals as usize == BOARD_ROLES.len() {
        return transition(conn, id, &["submitted"], "approved");
    }
    project(conn, id)
}

pub fn add_member(conn: &Connection, id: &str, member: &str) -> Result<Project, RegistryError> {
    project(conn, id)?;
    user(conn, member)?;
    conn.execute(
        "INSERT OR IGNORE INTO project_members (project_id, user_id) VALUES (?1, ?2)",
        params![id, member],
    )?;
    project(conn, id)
}

pub fn remove_member(conn: &Connection, id: &str, member: &str) -> Result<Project, RegistryError> {
    let changed = conn.execute(
        "DELETE FROM project_members WHERE project_id = ?1 AND user_id = ?2",
        params![id, member],
    )?;
    if changed == 0 {
        return Err(not_found(format!("{member} is not a member of project {id}")));
    }
    project(conn, id)
}

/// Grants columns of a dataset; `available` is what the engine holds (dataset → columns).
pub fn grant(
    conn: &Connection,
    id: &str,
    dataset: &str,
    columns: &[String],
    available: &BTreeMap<String, Vec<String>>,
) -> Result<Project, RegistryError> {
    project(conn, id)?;
    let known = available
        .get(dataset)
        .ok_or_else(|| invalid(format!("there is no dataset {dataset}")))?;
    if columns.is_empty() {
        return Err(invalid("name the columns to grant"));
    }
    for column in columns {
        if !known.contains(column) {
            return Err(invalid(format!("dataset {dataset} has no column {column}")));
        }
    }
    for column in columns {
        let position = known.iter().position(|c| c == column).unwrap_or(0) as i64;
        conn.execute(
            "INSERT OR IGNORE INTO grants (project_id, dataset, column_name, position) VALUES (?1, ?2, ?3, ?4)",
            params![id, dataset, column, position],
        )?;
    }
    project(conn, id)
}

/// Revokes columns of a dataset, or the whole dataset when `columns` is empty.
pub fn revoke(conn: &Connection, id: &str, dataset: &str, columns: &[String]) -> Result<Project, RegistryError> {
    project(conn, id)?;
    let changed = if columns.is_empty() {
        conn.execute(
            "DELETE FROM grants WHERE project_id = ?1 AND dataset = ?2",
            params![id, dataset],
        )?
    } else {
        let mut n = 0;
        for column in columns {
            n += conn.execute(
                "DELETE FROM grants WHERE project_id = ?1 AND dataset = ?2 AND column_name = ?3",
                params![id, dataset, column],
            )?;
        }
        n
    };
    if changed == 0 {
        return Err(not_found(format!("project {id} holds no such grant on {dataset}")));
    }
    project(conn, id)
}

pub fn project(conn: &Connection, id: &str) -> Result<Project, RegistryError> {
    list_projects_where(conn, Some(id))?
        .pop()
        .ok_or_else(|| not_found(format!("no project {id}")))
}

pub fn list_projects(conn: &Connection) -> Result<Vec<Project>, RegistryError> {
    list_projects_where(conn, None)
}

fn list_projects_where(conn: &Connection, id: Option<&str>) -> Result<Vec<Project>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, title, purpose, justification, lawful_basis, start_date, end_date, COALESCE(cohort, ''), state, requested
         FROM projects WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
    )?;
    let mut projects = stmt
        .query_map(params![id], |r| {
            let requested: String = r.get(9)?;
            Ok(Project {
                id: r.get(0)?,
                title: r.get(1)?,
                purpose: r.get(2)?,
                justification: r.get(3)?,
                lawful_basis: r.get(4)?,
                start_date: r.get(5)?,
                end_date: r.get(6)?,
                cohort: r.get(7)?,
                state: r.get(8)?,
                requested: serde_json::from_str(&requested).unwrap_or_default(),
                ..Default::default()
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for p in &mut projects {
        let list = |sql: &str| -> Result<Vec<String>, RegistryError> {
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params![p.id], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        };
        p.parties = list("SELECT organisation_id FROM project_parties WHERE project_id = ?1 ORDER BY organisation_id")?;
        p.members = list("SELECT user_id FROM project_members WHERE project_id = ?1 ORDER BY user_id")?;
        p.grants = super::grants(conn, &p.id)?
            .into_iter()
            .map(|(dataset, columns)| Grant { dataset, columns })
            .collect();
        let mut stmt = conn.prepare_cached(
            "SELECT role, user_id, decision, decided_at, comment FROM approvals WHERE project_id = ?1 ORDER BY role",
        )?;
        p.approvals = stmt
            .query_map(params![p.id], Approval::from_row)?
            .collect::<Result<_, _>>()?;
        p.budget_granted = super::budget::granted(conn, &p.id)?;
        p.budget_requested = super::budget::requested(conn, &p.id)?;
    }
    Ok(projects)
}
