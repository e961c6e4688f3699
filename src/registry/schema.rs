//! Registry schema, migrated forward with SQLite's `user_version`. Each migration runs once, in
//! order, inside a transaction; a database newer than this binary is refused.

use rusqlite::Connection;

use super::RegistryError;

const MIGRATIONS: &[&str] = &[
    // 1: organisations, users, roles, projects, members, parties, approvals, grants.
    "CREATE TABLE organisations (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        ico_registration TEXT NOT NULL,
        dspt_status TEXT NOT NULL CHECK (dspt_status IN ('standards_met', 'approaching_standards', 'not_met')),
        dspt_expiry TEXT NOT NULL,
        accreditation TEXT NOT NULL CHECK (accreditation IN ('accredited', 'suspended', 'withdrawn'))
    );
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        organisation_id TEXT NOT NULL REFERENCES organisations(id),
        display_name TEXT NOT NULL,
        accreditation_expiry TEXT NOT NULL,
        training_date TEXT NOT NULL,
        suspended INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE user_roles (
        user_id TEXT NOT NULL REFERENCES users(id),
        role TEXT NOT NULL,
        PRIMARY KEY (user_id, role)
    );
    CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        purpose TEXT NOT NULL,
        lawful_basis TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('draft', 'submitted', 'approved', 'active', 'ended', 'rejected', 'suspended')),
        start_date TEXT NOT NULL,
        end_date TEXT NOT NULL,
        cohort TEXT
    );
    CREATE TABLE project_members (
        project_id TEXT NOT NULL REFERENCES projects(id),
        user_id TEXT NOT NULL REFERENCES users(id),
        PRIMARY KEY (project_id, user_id)
    );
    CREATE TABLE project_parties (
        project_id TEXT NOT NULL REFERENCES projects(id),
        organisation_id TEXT NOT NULL REFERENCES organisations(id),
        PRIMARY KEY (project_id, organisation_id)
    );
    CREATE TABLE approvals (
        project_id TEXT NOT NULL REFERENCES projects(id),
        role TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id),
        decision TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
        decided_at TEXT NOT NULL,
        PRIMARY KEY (project_id, role)
    );
    CREATE TABLE grants (
        project_id TEXT NOT NULL REFERENCES projects(id),
        dataset TEXT NOT NULL,
        column_name TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (project_id, dataset, column_name)
    );",
    // 2: per-project disclosure overrides (JSON; they can only tighten the gateway's rules).
    "ALTER TABLE projects ADD COLUMN disclosure TEXT",
    // 3: the project proposal as the board reads it (justification, data requested as JSON) and
    // the board's comments on its decisions.
    "ALTER TABLE projects ADD COLUMN justification TEXT NOT NULL DEFAULT '';
    ALTER TABLE projects ADD COLUMN requested TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE approvals ADD COLUMN comment TEXT NOT NULL DEFAULT ''",
    // 4: a grant may name a dataset version (NULL: the latest served).
    "ALTER TABLE grants ADD COLUMN version TEXT",
    // 5: release budgets: the board's grants of more cells, and the requests for them recorded
    // when a project's budget ran out (open until a grant answers them).
    "CREATE TABLE budget_grants (
        project_id TEXT NOT NULL REFERENCES projects(id),
        cells INTEGER NOT NULL CHECK (cells > 0),
        role TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id),
        comment TEXT NOT NULL,
        decided_at TEXT NOT NULL
    );
    CREATE TABLE budget_requests (
        project_id TEXT NOT NULL REFERENCES projects(id),
        user_id TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        cells_released INTEGER NOT NULL,
        budget INTEGER NOT NULL,
        answered_at TEXT
    );",
    // 6: output checking: requests to release a result's withheld cells, and the checkers'
    // reviews of them (`registry::releases`).
    "CREATE TABLE release_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id TEXT NOT NULL REFERENCES projects(id),
        author TEXT NOT NULL REFERENCES users(id),
        receipt_seq INTEGER NOT NULL,
        sql TEXT NOT NULL,
        rules TEXT NOT NULL,
        snapshot TEXT NOT NULL,
        result_hash TEXT NOT NULL,
        justification TEXT NOT NULL,
        state TEXT NOT NULL,
        round INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        released_seq INTEGER,
        released_hash TEXT
    );
    CREATE TABLE release_reviews (
        request_id INTEGER NOT NULL REFERENCES release_requests(id),
        round INTEGER NOT NULL,
        checker TEXT NOT NULL REFERENCES users(id),
        decision TEXT NOT NULL,
        comment TEXT NOT NULL,
        decided_at TEXT NOT NULL
    );",
    // 7: board review of changes that widen an approved project (`registry::changes`).
    "CREATE TABLE pending_changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id TEXT NOT NULL REFERENCES projects(id),
        change TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE change_signatures (
        change_id INTEGER NOT NULL REFERENCES pending_changes(id),
        role TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id),
        decision TEXT NOT NULL,
        decided_at TEXT NOT NULL,
        comment TEXT NOT NULL,
        PRIMARY KEY (change_id, role)
    );",
];

pub(super) fn migrate(conn: &Connection) -> Result<(), RegistryError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(RegistryError::Database(rusqlite::Error::InvalidParameterName(format!(
            "registry schema version {version} is newer than this gateway ({})",
            MIGRATIONS.len()
        ))));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        conn.execute_batch(&format!("BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;", i + 1))?;
    }
    Ok(())
}
