//! Safe People and Safe Projects: the registry of organisations, users, projects, board
//! approvals and grants, in an embedded SQLite database.
//!
//! The decisions are made by the Cedar rules in `config/policies/` (see [`rules`]); the registry
//! supplies the facts. At every call, [`Registry::principal`] checks that the user and their
//! organisation are accredited today, and (for data calls) [`Registry::project_access`] that the
//! project is approved by the whole board, inside its dates, has the user as a member and the
//! organisation as a party. Each way of failing is its own [`Refusal`], naming its rule.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use chrono::NaiveDate;
use rusqlite::{Connection, OptionalExtension, params};

use rules::{Action, OrganisationFacts, ProjectFacts, RuleSet, UserFacts};

pub mod admin;
pub mod budget;
pub mod changes;
mod refusal;
pub mod releases;
pub mod rules;
mod schema;
pub mod seed;

pub use refusal::Refusal;

/// The three board roles whose approval a project needs.
pub const BOARD_ROLES: [&str; 3] = ["board:caldicott_guardian", "board:ccio", "board:public_representative"];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("registry holds an invalid date in {field}: {value}")]
    BadDate { field: &'static str, value: String },
    #[error("registry holds invalid disclosure settings for project {0}")]
    BadDisclosure(String),
    #[error("project {0} is granted columns of dataset {1} at different versions")]
    MixedVersions(String, String),
    #[error("project {0} has no grant on dataset {1}")]
    NoSuchGrant(String, String),
    #[error(transparent)]
    Rules(#[from] rules::RulesError),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// A user who passed Safe People today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub organisation: String,
    pub roles: Vec<String>,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// What a project may see: dataset → granted columns, and the cohort filter on its scans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectAccess {
    pub project: String,
    pub grants: BTreeMap<String, Vec<String>>,
    /// A SQL predicate every scan of the project's tables must satisfy (e.g. `age >= 18`).
    pub cohort: Option<String>,
    /// Disclosure settings stricter than the gateway's, agreed for this project.
    pub disclosure: crate::disclosure::Overrides,
    /// Datasets granted at a named version (dataset → version id); the rest read the latest.
    pub versions: BTreeMap<String, String>,
}

/// The registry. Reads (the checks made at every call) share one connection behind a mutex;
/// administrative changes use a second connection, each in a transaction that commits only once
/// its audit record is durable (see [`Registry::begin`]). SQLite in WAL mode keeps the two apart:
/// a check never sees a change that is not committed.
pub struct Registry {
    conn: Mutex<Connection>,
    writer: tokio::sync::Mutex<Connection>,
    rules: RuleSet,
    /// Data-call decisions granted, by (user, project, day), with the registry version they
    /// were made at ([`Registry::data_access`]).
    granted: Mutex<HashMap<(String, String, NaiveDate), Granted>>,
    /// How recent data protection training must be, in months.
    pub training_months: u32,
}

/// A data call refused: the principal if Safe People passed, and why.
pub type DataRefusal = (Option<Principal>, RegistryError);

/// A granted data-call decision and the registry version it was made at.
struct Granted {
    version: (i64, i64),
    principal: Principal,
    access: ProjectAccess,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

pub(crate) fn date(field: &'static str, value: String) -> Result<NaiveDate, RegistryError> {
    NaiveDate::parse_from_str(&value, "%Y-%m-%d").map_err(|_| RegistryError::BadDate { field, value })
}

fn connect(path: &Path) -> Result<Connection, RegistryError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Registry {
    /// Opens (creating and migrating if needed) the registry at `path`, deciding with `rules`.
    pub fn open(path: &Path, rules: RuleSet, training_months: u32) -> Result<Self, RegistryError> {
        let conn = connect(path)?;
        schema::migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            writer: tokio::sync::Mutex::new(connect(path)?),
            rules,
            granted: Mutex::new(HashMap::new()),
            training_months,
        })
    }

    /// Where the registry stands: moves with every change committed by another connection
    /// (`data_version`, e.g. an administrative change) and every row changed through the reading
    /// connection (`total_changes()`).
    fn version(&self) -> Result<(i64, i64), RegistryError> {
        self.with_conn(|c| {
            // Asked at every data call: the statement is prepared once.
            let committed = c.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
            Ok((committed, c.total_changes() as i64))
        })
    }

    /// Safe People, then Safe Projects, for a data call: [`Registry::principal`], then
    /// [`Registry::project_access`]. A decision that grants access is remembered until the
    /// registry changes or the day does; refusals are always decided afresh. On refusal, the
    /// principal if Safe People passed.
    pub fn data_access(
        &self,
        user: &str,
        project: &str,
        today: NaiveDate,
    ) -> Result<(Principal, ProjectAccess), Box<DataRefusal>> {
        let version = self.version().map_err(|e| Box::new((None, e)))?;
        let key = (user.to_owned(), project.to_owned(), today);
        if let Some(g) = self.granted.lock().expect("granted lock").get(&key)
            && g.version == version
        {
            return Ok((g.principal.clone(), g.access.clone()));
        }
        let principal = self.principal(user, today).map_err(|e| Box::new((None, e)))?;
        let access = match self.project_access(&principal, project, today) {
            Ok(access) => access,
            Err(e) => return Err(Box::new((Some(principal), e))),
        };
        let mut granted = self.granted.lock().expect("granted lock");
        if granted.len() >= 10_000 {
            granted.clear();
        }
        let remembered = Granted {
            version,
            principal: principal.clone(),
            access: access.clone(),
        };
        granted.insert(key, remembered);
        Ok((principal, access))
    }

    /// The hash of the access rules in force, recorded with every audit record.
    pub fn rules_hash(&self) -> &str {
        self.rules.hash()
    }

    /// Sets a project's disclosure overrides (they can only make its rules stricter).
    pub fn set_project_disclosure(
        &self,
        project: &str,
        overrides: &crate::disclosure::Overrides,
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_string(overrides).expect("overrides serialise");
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE projects SET disclosure = ?1 WHERE id = ?2",
                params![json, project],
            )?;
            Ok(())
        })
    }

    /// Pins every granted column of `dataset` for `project` to `version` (`None`: the latest).
    pub fn set_grant_version(&self, project: &str, dataset: &str, version: Option<&str>) -> Result<(), RegistryError> {
        self.with_conn(|conn| {
            let changed = conn.execute(
                "UPDATE grants SET version = ?1 WHERE project_id = ?2 AND dataset = ?3",
                params![version, project, dataset],
            )?;
            if changed == 0 {
                return Err(RegistryError::NoSuchGrant(project.to_owned(), dataset.to_owned()));
            }
            Ok(())
        })
    }

    pub(crate) fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        f(&mut conn)
    }

    fn training_cutoff(&self, today: NaiveDate) -> NaiveDate {
        today - chrono::Months::new(self.training_months)
    }

    /// Asks the rules; a refusal is explained with the facts behind it.
    fn decide(
        &self,
        user: &UserFacts,
        action: Action,
        project: Option<(&ProjectFacts, &Connection)>,
        today: NaiveDate,
    ) -> Result<(), RegistryError> {
        let facts = project.map(|(p, _)| p);
        let Err(rule) = self
            .rules
            .decide(user, action, facts, today, self.training_cutoff(today))
        else {
            return Ok(());
        };
        let org = &user.organisation;
        let project_id = || facts.map(|p| p.id.clone()).unwrap_or_default();
        let refusal = match rule.as_str() {
            "safe-people/user-suspended" => Refusal::UserSuspended,
            "safe-people/accreditation-expired" => Refusal::AccreditationExpired(user.accreditation_expiry),
            "safe-people/training-lapsed" => Refusal::TrainingLapsed(user.training_date, self.training_months),
            "safe-people/organisation-not-accredited" => {
                Refusal::OrganisationNotAccredited(org.id.clone(), org.accreditation.clone())
            }
            "safe-people/organisation-dspt" if org.dspt_status != "standards_met" => {
                Refusal::OrganisationDspt(org.id.clone(), org.dspt_status.clone())
            }
            "safe-people/organisation-dspt" => {
                Refusal::OrganisationDspt(org.id.clone(), format!("expired on {}", org.dspt_expiry))
            }
            "safe-people/role-researcher" => Refusal::MissingRole("researcher"),
            "safe-people/role-admin" => Refusal::MissingRole("admin"),
            "safe-people/role-auditor" => Refusal::MissingRole("auditor"),
            "safe-people/role-output-checker" => Refusal::MissingRole("output-checker"),
            "safe-projects/board-role" => match action {
                Action::Decide(role) | Action::GrantBudget(role) | Action::SignChange(role) => {
                    Refusal::BoardRole(role.to_owned())
                }
                _ => Refusal::Rule(rule),
            },
            "safe-projects/not-a-member" => Refusal::NotAMember(project_id()),
            "safe-projects/rejected" => Refusal::Rejected(project_id()),
            "safe-projects/not-approved" => {
                let missing = match project {
                    Some((p, conn)) => missing_approvals(conn, &p.id)?.join(", "),
                    None => String::new(),
                };
                Refusal::NotApproved(project_id(), missing)
            }
            "safe-projects/state" => {
                Refusal::ProjectState(project_id(), facts.map(|p| p.state.clone()).unwrap_or_default())
            }
            "safe-projects/not-started" => {
                Refusal::NotStarted(project_id(), facts.map(|p| p.start_date).unwrap_or(today))
            }
            "safe-projects/ended" => Refusal::Ended(project_id(), facts.map(|p| p.end_date).unwrap_or(today)),
            "safe-projects/organisation-not-party" => Refusal::OrganisationNotParty(project_id()),
            "safe-projects/conflict-of-interest" => Refusal::ConflictOfInterest(project_id()),
            "safe-projects/budget-state" => {
                Refusal::BudgetState(project_id(), facts.map(|p| p.state.clone()).unwrap_or_default())
            }
            "safe-projects/not-submitted" => {
                Refusal::NotSubmitted(project_id(), facts.map(|p| p.state.clone()).unwrap_or_default())
            }
            _ => Refusal::Rule(rule),
        };
        Err(refusal.into())
    }

    /// Safe People: the user is registered, not suspended, accredited and trained, and their
    /// organisation is accredited with a current DSPT, all judged on `today` by the rules.
    pub fn principal(&self, user: &str, today: NaiveDate) -> Result<Principal, RegistryError> {
        let facts = self.with_conn(|conn| user_facts(conn, user))?;
        self.decide(&facts, Action::Connect, None, today)?;
        Ok(Principal {
            user: facts.id,
            organisation: facts.organisation.id,
            roles: facts.roles,
        })
    }

    /// A call without a project (administration, audit) by a user who passed Safe People.
    pub fn authorise(&self, principal: &Principal, action: Action, today: NaiveDate) -> Result<(), RegistryError> {
        let facts = self.with_conn(|conn| user_facts(conn, &principal.user))?;
        self.decide(&facts, action, None, today)
    }

    /// Safe Projects: `principal` is a researcher who may query `project` today.
    pub fn project_access(
        &self,
        principal: &Principal,
        project: &str,
        today: NaiveDate,
    ) -> Result<ProjectAccess, RegistryError> {
        self.with_conn(|conn| {
            let user = user_facts(conn, &principal.user)?;
            // A project that does not exist has no members: the rules refuse it exactly as one
            // the user is not a member of, so nobody learns which projects exist.
            let facts = project_facts(conn, project)?.unwrap_or_else(|| ProjectFacts {
                id: project.to_owned(),
                state: "unknown".into(),
                start_date: today,
                end_date: today,
                members: vec![],
                parties: vec![],
                approved_by: vec![],
                rejected: false,
            });
            self.decide(&user, Action::Query, Some((&facts, conn)), today)?;
            load_access(conn, project)
        })
    }

    /// Starts an administrative change: a transaction on the writer connection that is rolled
    /// back unless [`Change::commit`] is called (after the change's audit record is durable).
    pub async fn begin(&self) -> Result<Change<'_>, RegistryError> {
        let conn = self.writer.lock().await;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Change {
            conn,
            registry: self,
            open: true,
        })
    }
}

/// An administrative change in progress (see [`Registry::begin`]).
pub struct Change<'a> {
    conn: tokio::sync::MutexGuard<'a, Connection>,
    registry: &'a Registry,
    open: bool,
}

impl Change<'_> {
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Requires `action` of `principal` under the rules, judged inside this transaction.
    pub fn authorise(
        &self,
        principal: &Principal,
        action: Action,
        project: Option<&str>,
        today: NaiveDate,
    ) -> Result<(), RegistryError> {
        let user = user_facts(&self.conn, &principal.user)?;
        let facts = match project {
            Some(id) => {
                Some(project_facts(&self.conn, id)?.ok_or_else(|| Refusal::NotFound(format!("no project {id}")))?)
            }
            None => None,
        };
        self.registry
            .decide(&user, action, facts.as_ref().map(|f| (f, &*self.conn)), today)
    }

    pub fn commit(mut self) -> Result<(), RegistryError> {
        self.open = false;
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// A project's grants (with the versions they name), cohort and disclosure overrides, as they are
/// now. The caller has decided who may see them.
fn load_access(conn: &Connection, project: &str) -> Result<ProjectAccess, RegistryError> {
    let (cohort, disclosure): (Option<String>, Option<String>) = conn
        .query_row(
            "SELECT cohort, disclosure FROM projects WHERE id = ?1",
            params![project],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .ok_or_else(|| Refusal::NotAMember(project.to_owned()))?;
    let mut stmt = conn.prepare_cached(
        "SELECT dataset, column_name, version FROM grants WHERE project_id = ?1 ORDER BY dataset, position",
    )?;
    let mut grants: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut versions: BTreeMap<String, Option<String>> = BTreeMap::new();
    for row in stmt.query_map(params![project], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })? {
        let (dataset, column, version) = row?;
        // Every column of a dataset must be granted at the same version.
        if versions.entry(dataset.clone()).or_insert_with(|| version.clone()) != &version {
            return Err(RegistryError::MixedVersions(project.to_owned(), dataset));
        }
        grants.entry(dataset).or_default().push(column);
    }
    let versions = versions.into_iter().filter_map(|(d, v)| Some((d, v?))).collect();
    let disclosure = match disclosure {
        Some(json) => serde_json::from_str(&json).map_err(|_| RegistryError::BadDisclosure(project.to_owned()))?,
        None => Default::default(),
    };
    Ok(ProjectAccess {
        project: project.to_owned(),
        grants,
        cohort: cohort.filter(|c| !c.trim().is_empty()),
        disclosure,
        versions,
    })
}

/// The user and their organisation as the rules see them.
fn user_facts(conn: &Connection, user: &str) -> Result<UserFacts, RegistryError> {
    let row = conn
        .query_row(
            "SELECT u.organisation_id, u.suspended, u.accreditation_expiry, u.training_date,
                    o.accreditation, o.dspt_status, o.dspt_expiry
             FROM users u JOIN organisations o ON o.id = u.organisation_id
             WHERE u.id = ?1",
            params![user],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            },
        )
        .optional()?;
    let Some((org, suspended, accr, training, accreditation, dspt_status, dspt_expiry)) = row else {
        return Err(Refusal::UnknownUser(user.to_owned()).into());
    };
    let mut stmt = conn.prepare_cached("SELECT role FROM user_roles WHERE user_id = ?1 ORDER BY role")?;
    let roles = stmt
        .query_map(params![user], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(UserFacts {
        id: user.to_owned(),
        organisation: OrganisationFacts {
            id: org,
            accreditation,
            dspt_status,
            dspt_expiry: date("organisations.dspt_expiry", dspt_expiry)?,
        },
        roles,
        suspended,
        accreditation_expiry: date("users.accreditation_expiry", accr)?,
        training_date: date("users.training_date", training)?,
    })
}

/// The project as the rules see it; `None` if there is no such project.
pub(crate) fn project_facts(conn: &Connection, project: &str) -> Result<Option<ProjectFacts>, RegistryError> {
    let row = conn
        .query_row(
            "SELECT state, start_date, end_date FROM projects WHERE id = ?1",
            params![project],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)),
        )
        .optional()?;
    let Some((state, start, end)) = row else {
        return Ok(None);
    };
    let list = |sql: &str| -> Result<Vec<String>, RegistryError> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params![project], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    };
    let rejected: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM approvals WHERE project_id = ?1 AND decision = 'rejected')",
        params![project],
        |r| r.get(0),
    )?;
    Ok(Some(ProjectFacts {
        id: project.to_owned(),
        state,
        start_date: date("projects.start_date", start)?,
        end_date: date("projects.end_date", end)?,
        members: list("SELECT user_id FROM project_members WHERE project_id = ?1")?,
        parties: list("SELECT organisation_id FROM project_parties WHERE project_id = ?1")?,
        approved_by: list("SELECT role FROM approvals WHERE project_id = ?1 AND decision = 'approved'")?,
        rejected,
    }))
}

/// Dataset → granted columns, in table order.
pub(crate) fn grants(conn: &Connection, project: &str) -> Result<BTreeMap<String, Vec<String>>, RegistryError> {
    let mut stmt = conn
        .prepare_cached("SELECT dataset, column_name FROM grants WHERE project_id = ?1 ORDER BY dataset, position")?;
    let mut grants: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in stmt.query_map(params![project], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })? {
        let (dataset, column) = row?;
        grants.entry(dataset).or_default().push(column);
    }
    Ok(grants)
}

impl Registry {
    /// Requires `action` of `principal` on `project` under the rules (on the reader connection:
    /// for calls that change nothing in the registry).
    pub fn authorise_on(
        &self,
        principal: &Principal,
        action: Action,
        project: &str,
        today: NaiveDate,
    ) -> Result<(), RegistryError> {
        self.with_conn(|conn| {
            let user = user_facts(conn, &principal.user)?;
            let facts =
                project_facts(conn, project)?.ok_or_else(|| Refusal::NotFound(format!("no project {project}")))?;
            self.decide(&user, action, Some((&facts, conn)), today)
        })
    }

    /// A project's grants, cohort and disclosure overrides as they are now, with no check of
    /// who asks: for an auditor's replay of a query the project ran.
    pub fn project_data(&self, project: &str) -> Result<ProjectAccess, RegistryError> {
        self.with_conn(|conn| load_access(conn, project))
    }
}

/// Board roles that have not (yet) approved `project`.
fn missing_approvals(conn: &Connection, project: &str) -> Result<Vec<&'static str>, RegistryError> {
    let mut missing = Vec::new();
    for role in BOARD_ROLES {
        let approved: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM approvals WHERE project_id = ?1 AND role = ?2 AND decision = 'approved')",
            params![project, role],
            |r| r.get(0),
        )?;
        if !approved {
            missing.push(role);
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests;
