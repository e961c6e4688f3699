//! Safe People and Safe Projects: the registry of organisations, users, projects, board
//! approvals and grants, in an embedded SQLite database.
//!
//! [`Registry::authorise`] is the single decision made at every call: the user and their
//! organisation are accredited today, and (for data calls) the project is approved by the whole
//! board, inside its dates, has the user as a member and the organisation as a party. Each way of
//! failing is its own [`Refusal`], so the researcher is told which rule applies.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use chrono::NaiveDate;
use rusqlite::{Connection, OptionalExtension, params};

mod schema;
pub mod seed;

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
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Why a call is refused by Safe People or Safe Projects. The message names the rule and what
/// to do; it never reveals anything about other users or projects.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    #[error("safe-people/unknown-user: user {0} is not registered with this environment")]
    UnknownUser(String),
    #[error("safe-people/user-suspended: your access is suspended; contact the platform administrators")]
    UserSuspended,
    #[error(
        "safe-people/accreditation-expired: your accreditation expired on {0}; renew it with the platform administrators"
    )]
    AccreditationExpired(NaiveDate),
    #[error(
        "safe-people/training-lapsed: your data protection training ({0}) is older than {1} months; complete it again"
    )]
    TrainingLapsed(NaiveDate, u32),
    #[error("safe-people/organisation-not-accredited: your organisation {0} is not accredited ({1})")]
    OrganisationNotAccredited(String, String),
    #[error(
        "safe-people/organisation-dspt: your organisation {0} does not hold a current Data Security and Protection Toolkit ({1})"
    )]
    OrganisationDspt(String, String),
    #[error("safe-people/role: this call needs the {0} role")]
    MissingRole(&'static str),
    #[error("safe-projects/no-project: name the project with the `x-sde-project` header")]
    NoProject,
    #[error("safe-projects/not-a-member: project {0} does not exist or you are not a member of it")]
    NotAMember(String),
    #[error("safe-projects/not-approved: project {0} is not approved; awaiting {1}")]
    NotApproved(String, String),
    #[error("safe-projects/state: project {0} is {1}, so it cannot be used for queries")]
    ProjectState(String, String),
    #[error("safe-projects/not-started: project {0} starts on {1}")]
    NotStarted(String, NaiveDate),
    #[error("safe-projects/ended: project {0} ended on {1}")]
    Ended(String, NaiveDate),
    #[error("safe-projects/organisation-not-party: your organisation is not a party to project {0}")]
    OrganisationNotParty(String),
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
}

/// The registry. SQLite calls are short (indexed point look-ups), so one connection behind a
/// mutex serves the gateway.
pub struct Registry {
    conn: Mutex<Connection>,
    /// How recent data protection training must be, in months.
    pub training_months: u32,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn date(field: &'static str, value: String) -> Result<NaiveDate, RegistryError> {
    NaiveDate::parse_from_str(&value, "%Y-%m-%d").map_err(|_| RegistryError::BadDate { field, value })
}

impl Registry {
    /// Opens (creating and migrating if needed) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            training_months: 12,
        })
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

    pub(crate) fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        f(&mut conn)
    }

    /// Safe People: the user is registered, not suspended, accredited and trained, and their
    /// organisation is accredited with a current DSPT, all judged on `today`.
    pub fn principal(&self, user: &str, today: NaiveDate) -> Result<Principal, RegistryError> {
        self.with_conn(|conn| {
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
            let Some((org, suspended, accr, training, org_accr, dspt, dspt_expiry)) = row else {
                return Err(Refusal::UnknownUser(user.to_owned()).into());
            };
            if suspended {
                return Err(Refusal::UserSuspended.into());
            }
            let accr = date("users.accreditation_expiry", accr)?;
            if accr < today {
                return Err(Refusal::AccreditationExpired(accr).into());
            }
            let training = date("users.training_date", training)?;
            if training < today - chrono::Months::new(self.training_months) {
                return Err(Refusal::TrainingLapsed(training, self.training_months).into());
            }
            if org_accr != "accredited" {
                return Err(Refusal::OrganisationNotAccredited(org, org_accr).into());
            }
            let dspt_expiry = date("organisations.dspt_expiry", dspt_expiry)?;
            if dspt != "standards_met" {
                return Err(Refusal::OrganisationDspt(org, dspt).into());
            }
            if dspt_expiry < today {
                return Err(Refusal::OrganisationDspt(org, format!("expired on {dspt_expiry}")).into());
            }
            let mut stmt = conn.prepare_cached("SELECT role FROM user_roles WHERE user_id = ?1 ORDER BY role")?;
            let roles = stmt
                .query_map(params![user], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Principal {
                user: user.to_owned(),
                organisation: org,
                roles,
            })
        })
    }

    /// Safe Projects: `principal` is a researcher who may query `project` today.
    pub fn project_access(
        &self,
        principal: &Principal,
        project: &str,
        today: NaiveDate,
    ) -> Result<ProjectAccess, RegistryError> {
        if !principal.has_role("researcher") {
            return Err(Refusal::MissingRole("researcher").into());
        }
        self.with_conn(|conn| {
            let row = conn
                .query_row(
                    "SELECT p.state, p.start_date, p.end_date, p.cohort, p.disclosure
                     FROM projects p JOIN project_members m ON m.project_id = p.id
                     WHERE p.id = ?1 AND m.user_id = ?2",
                    params![project, principal.user],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ))
                    },
                )
                .optional()?;
            let Some((state, start, end, cohort, disclosure)) = row else {
                return Err(Refusal::NotAMember(project.to_owned()).into());
            };
            if !matches!(state.as_str(), "approved" | "active") {
                if state == "submitted" || state == "draft" {
                    let missing = missing_approvals(conn, project)?;
                    return Err(Refusal::NotApproved(project.to_owned(), missing.join(", ")).into());
                }
                return Err(Refusal::ProjectState(project.to_owned(), state).into());
            }
            // The state says approved; the approvals table must agree, role by role.
            let missing = missing_approvals(conn, project)?;
            if !missing.is_empty() {
                return Err(Refusal::NotApproved(project.to_owned(), missing.join(", ")).into());
            }
            let start = date("projects.start_date", start)?;
            let end = date("projects.end_date", end)?;
            if today < start {
                return Err(Refusal::NotStarted(project.to_owned(), start).into());
            }
            if today > end {
                return Err(Refusal::Ended(project.to_owned(), end).into());
            }
            let party: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM project_parties WHERE project_id = ?1 AND organisation_id = ?2)",
                params![project, principal.organisation],
                |r| r.get(0),
            )?;
            if !party {
                return Err(Refusal::OrganisationNotParty(project.to_owned()).into());
            }
            let mut stmt = conn.prepare_cached(
                "SELECT dataset, column_name FROM grants WHERE project_id = ?1 ORDER BY dataset, position",
            )?;
            let mut grants: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for row in stmt.query_map(params![project], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })? {
                let (dataset, column) = row?;
                grants.entry(dataset).or_default().push(column);
            }
            let disclosure = match disclosure {
                Some(json) => {
                    serde_json::from_str(&json).map_err(|_| RegistryError::BadDisclosure(project.to_owned()))?
                }
                None => Default::default(),
            };
            Ok(ProjectAccess {
                project: project.to_owned(),
                grants,
                cohort,
                disclosure,
            })
        })
    }
}

impl Registry {
    /// A project's grants, cohort and disclosure overrides as they are now, with no check of
    /// who asks: for an auditor's replay of a query the project ran.
    pub fn project_data(&self, project: &str) -> Result<ProjectAccess, RegistryError> {
        self.with_conn(|conn| {
            let (cohort, disclosure) = conn
                .query_row(
                    "SELECT cohort, disclosure FROM projects WHERE id = ?1",
                    params![project],
                    |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?)),
                )
                .optional()?
                .ok_or_else(|| Refusal::NotAMember(project.to_owned()))?;
            let mut stmt = conn.prepare_cached(
                "SELECT dataset, column_name FROM grants WHERE project_id = ?1 ORDER BY dataset, position",
            )?;
            let mut grants: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for row in stmt.query_map(params![project], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })? {
                let (dataset, column) = row?;
                grants.entry(dataset).or_default().push(column);
            }
            let disclosure = match disclosure {
                Some(json) => {
                    serde_json::from_str(&json).map_err(|_| RegistryError::BadDisclosure(project.to_owned()))?
                }
                None => Default::default(),
            };
            Ok(ProjectAccess {
                project: project.to_owned(),
                grants,
                cohort,
                disclosure,
            })
        })
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
mod tests {
    use super::*;

    fn demo_registry() -> (Registry, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("r.db")).unwrap();
        seed::demo(&reg, NaiveDate::from_ymd_opt(2026, 11, 24).unwrap()).unwrap();
        (reg, dir)
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 24).unwrap()
    }

    fn refusal(e: RegistryError) -> Refusal {
        match e {
            RegistryError::Refused(r) => r,
            other => panic!("expected a refusal, got {other}"),
        }
    }

    #[test]
    fn alice_may_query_her_project() {
        let (reg, _d) = demo_registry();
        let alice = reg.principal("alice", today()).unwrap();
        assert_eq!(alice.organisation, "ecc");
        let access = reg.project_access(&alice, "ews-asc-linkage", today()).unwrap();
        assert_eq!(
            access.grants.keys().collect::<Vec<_>>(),
            ["asc_services", "ews_referrals", "patients"]
        );
    }

    #[test]
    fn each_demo_refusal_names_its_rule() {
        let (reg, _d) = demo_registry();
        assert!(matches!(
            refusal(reg.principal("bob", today()).unwrap_err()),
            Refusal::AccreditationExpired(_)
        ));
        assert!(matches!(
            refusal(reg.principal("carol", today()).unwrap_err()),
            Refusal::OrganisationDspt(..)
        ));
        assert!(matches!(
            refusal(reg.principal("mallory", today()).unwrap_err()),
            Refusal::UnknownUser(_)
        ));
        let dave = reg.principal("dave", today()).unwrap();
        assert!(matches!(
            refusal(reg.project_access(&dave, "ews-asc-linkage", today()).unwrap_err()),
            Refusal::NotAMember(_)
        ));
        let alice = reg.principal("alice", today()).unwrap();
        match refusal(reg.project_access(&alice, "gp-trends", today()).unwrap_err()) {
            Refusal::NotApproved(_, missing) => assert_eq!(missing, "board:public_representative"),
            other => panic!("{other}"),
        }
        assert!(matches!(
            refusal(reg.project_access(&alice, "old-study", today()).unwrap_err()),
            Refusal::ProjectState(..) | Refusal::Ended(..)
        ));
        let admin = reg.principal("admin", today()).unwrap();
        assert!(matches!(
            refusal(reg.project_access(&admin, "ews-asc-linkage", today()).unwrap_err()),
            Refusal::MissingRole("researcher")
        ));
    }

    #[test]
    fn accreditation_and_training_expire_with_time() {
        let (reg, _d) = demo_registry();
        let later = today() + chrono::Months::new(24);
        assert!(matches!(
            refusal(reg.principal("alice", later).unwrap_err()),
            Refusal::AccreditationExpired(_) | Refusal::TrainingLapsed(..)
        ));
    }
}
