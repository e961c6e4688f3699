//! AdminService (`proto/sde/v1/admin.proto`): a thin adapter from gRPC messages to the registry's
//! changes, each run through [`Core::admin`] — Safe People, the access rules, the change, its audit
//! record, then the commit.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::admin_service_server::AdminService;
use super::proto::{self as pb};
use super::{call_context, status};
use crate::gateway::Core;
use crate::registry::admin::{self, Approval, Grant, Organisation, Project, User};
use crate::registry::changes::{self, Widening};
use crate::registry::rules::Action;
use crate::registry::{BOARD_ROLES, Refusal, RegistryError};

pub struct AdminApi {
    core: Arc<Core>,
}

impl AdminApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Runs one administrative call for `request`'s caller and maps its outcome to gRPC.
    async fn call<M, T, R>(
        &self,
        request: Request<M>,
        name: &str,
        action: Action,
        project: Option<&str>,
        change: impl FnOnce(
            &rusqlite::Connection,
            &crate::registry::Principal,
            chrono::NaiveDate,
        ) -> Result<T, RegistryError>,
    ) -> Result<Response<R>, Status>
    where
        M: serde::Serialize,
        R: From<T>,
    {
        let call = call_context(&request);
        self.core
            .admin(&call, name, request.get_ref(), action, project, change)
            .await
            .map(|value| Response::new(R::from(value)))
            .map_err(status)
    }
}

/// Applies a widening change to project `id` (`available`: the engine's datasets and columns,
/// which a grant needs).
fn apply(
    c: &rusqlite::Connection,
    id: &str,
    change: &Widening,
    available: Option<&std::collections::BTreeMap<String, Vec<String>>>,
) -> Result<Project, RegistryError> {
    match change {
        Widening::Member { user } => admin::add_member(c, id, user),
        Widening::Grant { dataset, columns } => {
            admin::grant(c, id, dataset, columns, available.unwrap_or(&Default::default()))
        }
    }
}

/// The board role named in a decision, as one of the three the rules know.
fn board_role(role: &str) -> Result<&'static str, RegistryError> {
    BOARD_ROLES
        .into_iter()
        .find(|r| *r == role)
        .ok_or_else(|| Refusal::InvalidChange(format!("role must be one of {}", BOARD_ROLES.join(", "))).into())
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_organisation(&self, r: Request<pb::Organisation>) -> Result<Response<pb::Organisation>, Status> {
        let org = Organisation::from(r.get_ref().clone());
        self.call(r, "create_organisation", Action::Administer, None, |c, _, _| {
            admin::create_organisation(c, &org)
        })
        .await
    }

    async fn update_organisation(&self, r: Request<pb::Organisation>) -> Result<Response<pb::Organisation>, Status> {
        let org = Organisation::from(r.get_ref().clone());
        self.call(r, "update_organisation", Action::Administer, None, |c, _, _| {
            admin::update_organisation(c, &org)
        })
        .await
    }

    async fn list_organisations(
        &self,
        r: Request<pb::ListOrganisationsRequest>,
    ) -> Result<Response<pb::ListOrganisationsResponse>, Status> {
        self.call(r, "list_organisations", Action::Administer, None, |c, _, _| {
            admin::list_organisations(c)
        })
        .await
    }

    async fn suspend_organisation(
        &self,
        r: Request<pb::SuspendOrganisationRequest>,
    ) -> Result<Response<pb::Organisation>, Status> {
        let (id, withdraw) = (r.get_ref().id.clone(), r.get_ref().withdraw);
        let state = if withdraw { "withdrawn" } else { "suspended" };
        self.call(r, "suspend_organisation", Action::Administer, None, |c, _, _| {
            admin::set_accreditation(c, &id, state)
        })
        .await
    }

    async fn reinstate_organisation(
        &self,
        r: Request<pb::ReinstateOrganisationRequest>,
    ) -> Result<Response<pb::Organisation>, Status> {
        let id = r.get_ref().id.clone();
        self.call(r, "reinstate_organisation", Action::Administer, None, |c, _, _| {
            admin::set_accreditation(c, &id, "accredited")
        })
        .await
    }

    async fn create_user(&self, r: Request<pb::User>) -> Result<Response<pb::User>, Status> {
        let user = User::from(r.get_ref().clone());
        self.call(r, "create_user", Action::Administer, None, |c, _, _| {
            admin::create_user(c, &user)
        })
        .await
    }

    async fn update_user(&self, r: Request<pb::User>) -> Result<Response<pb::User>, Status> {
        let user = User::from(r.get_ref().clone());
        self.call(r, "update_user", Action::Administer, None, |c, _, _| {
            admin::update_user(c, &user)
        })
        .await
    }

    async fn list_users(&self, r: Request<pb::ListUsersRequest>) -> Result<Response<pb::ListUsersResponse>, Status> {
        let org = Some(r.get_ref().organisation.clone()).filter(|o| !o.is_empty());
        self.call(r, "list_users", Action::Administer, None, |c, _, _| {
            admin::list_users(c, org.as_deref())
        })
        .await
    }

    async fn suspend_user(&self, r: Request<pb::SuspendUserRequest>) -> Result<Response<pb::User>, Status> {
        let (id, suspended) = (r.get_ref().id.clone(), r.get_ref().suspended);
        self.call(r, "suspend_user", Action::Administer, None, |c, _, _| {
            admin::set_suspended(c, &id, suspended)
        })
        .await
    }

    async fn create_project(&self, r: Request<pb::Project>) -> Result<Response<pb::Project>, Status> {
        let project = Project::from(r.get_ref().clone());
        let cohort = self.check_cohort(&project.cohort);
        self.call(r, "create_project", Action::Administer, None, |c, _, _| {
            cohort?;
            admin::create_project(c, &project)
        })
        .await
    }

    async fn update_project(&self, r: Request<pb::Project>) -> Result<Response<pb::Project>, Status> {
        let project = Project::from(r.get_ref().clone());
        let cohort = self.check_cohort(&project.cohort);
        let id = project.id.clone();
        self.call(r, "update_project", Action::Administer, Some(&id), |c, _, _| {
            cohort?;
            admin::update_project(c, &project)
        })
        .await
    }

    async fn get_project(&self, r: Request<pb::ProjectRef>) -> Result<Response<pb::Project>, Status> {
        let id = r.get_ref().id.clone();
        self.call(r, "get_project", Action::Administer, Some(&id), |c, _, _| {
            admin::project(c, &id)
        })
        .await
        .map(|p| p.map(|p| self.described(p)))
    }

    async fn list_projects(
        &self,
        r: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let mut listed: Response<pb::ListProjectsResponse> = self
            .call(r, "list_projects", Action::Administer, None, |c, _, _| {
                admin::list_projects(c)
            })
            .await?;
        let projects = std::mem::take(&mut listed.get_mut().projects);
        listed.get_mut().projects = projects.into_iter().map(|p| self.described(p)).collect();
        Ok(listed)
    }

    async fn submit_project(&self, r: Request<pb::ProjectRef>) -> Result<Response<pb::Project>, Status> {
        let id = r.get_ref().id.clone();
        self.call(r, "submit_project", Action::Administer, Some(&id), |c, _, _| {
            admin::transition(c, &id, &["draft"], "submitted")
        })
        .await
    }

    async fn approve_project(&self, r: Request<pb::DecisionRequest>) -> Result<Response<pb::Project>, Status> {
        self.decision(r, true).await
    }

    async fn reject_project(&self, r: Request<pb::DecisionRequest>) -> Result<Response<pb::Project>, Status> {
        self.decision(r, false).await
    }

    async fn grant_release_budget(&self, r: Request<pb::BudgetGrant>) -> Result<Response<pb::Project>, Status> {
        let g = r.get_ref().clone();
        self.board(
            r,
            "grant_release_budget",
            &g.role,
            Action::GrantBudget,
            &g.project,
            |c, principal, role, today| {
                crate::registry::budget::grant(c, &g.project, role, &principal.user, g.cells, &g.comment, today)
            },
        )
        .await
        .map(|p| p.map(|p| self.described(p)))
    }

    async fn activate_project(&self, r: Request<pb::ProjectStateRequest>) -> Result<Response<pb::Project>, Status> {
        let id = r.get_ref().project.clone();
        self.call(r, "activate_project", Action::Administer, Some(&id), |c, _, _| {
            admin::transition(c, &id, &["approved"], "active")
        })
        .await
    }

    async fn suspend_project(&self, r: Request<pb::ProjectStateRequest>) -> Result<Response<pb::Project>, Status> {
        let id = r.get_ref().project.clone();
        self.call(r, "suspend_project", Action::Administer, Some(&id), |c, _, _| {
            admin::transition(c, &id, &["approved", "active"], "suspended")
        })
        .await
    }

    async fn end_project(&self, r: Request<pb::ProjectStateRequest>) -> Result<Response<pb::Project>, Status> {
        let id = r.get_ref().project.clone();
        self.call(r, "end_project", Action::Administer, Some(&id), |c, _, _| {
            admin::transition(c, &id, &["approved", "active", "suspended"], "ended")
        })
        .await
    }

    async fn add_member(&self, r: Request<pb::MemberRequest>) -> Result<Response<pb::Project>, Status> {
        let (id, user) = (r.get_ref().project.clone(), r.get_ref().user.clone());
        let now = self.now();
        self.call(r, "add_member", Action::Administer, Some(&id), |c, principal, _| {
            let change = Widening::Member { user };
            match changes::held(c, &id)? {
                true => changes::hold(c, &id, &change, &principal.user, &now, |c, w| apply(c, &id, w, None)),
                false => apply(c, &id, &change, None),
            }
        })
        .await
        .map(|p| p.map(|p| self.described(p)))
    }

    async fn remove_member(&self, r: Request<pb::MemberRequest>) -> Result<Response<pb::Project>, Status> {
        let (id, user) = (r.get_ref().project.clone(), r.get_ref().user.clone());
        self.call(r, "remove_member", Action::Administer, Some(&id), |c, _, _| {
            admin::remove_member(c, &id, &user)
        })
        .await
    }

    async fn grant_dataset(&self, r: Request<pb::GrantRequest>) -> Result<Response<pb::Project>, Status> {
        let g = r.get_ref().clone();
        let available = self.core.engine.columns();
        let now = self.now();
        self.call(
            r,
            "grant_dataset",
            Action::Administer,
            Some(&g.project),
            |c, principal, _| {
                let change = Widening::Grant {
                    dataset: g.dataset,
                    columns: g.columns,
                };
                let id = &g.project;
                match changes::held(c, id)? {
                    true => changes::hold(c, id, &change, &principal.user, &now, |c, w| {
                        apply(c, id, w, Some(&available))
                    }),
                    false => apply(c, id, &change, Some(&available)),
                }
            },
        )
        .await
        .map(|p| p.map(|p| self.described(p)))
    }

    async fn sign_change(&self, r: Request<pb::ChangeDecision>) -> Result<Response<pb::Project>, Status> {
        let d = r.get_ref().clone();
        let available = self.core.engine.columns();
        let now = self.now();
        self.board(
            r,
            "sign_change",
            &d.role,
            Action::SignChange,
            &d.project,
            |c, principal, role, _| {
                changes::sign(
                    c,
                    &d.project,
                    d.change,
                    role,
                    &principal.user,
                    !d.reject,
                    &d.comment,
                    &now,
                    |c, w| apply(c, &d.project, w, Some(&available)),
                )
            },
        )
        .await
        .map(|p| p.map(|p| self.described(p)))
    }

    async fn revoke_dataset(&self, r: Request<pb::GrantRequest>) -> Result<Response<pb::Project>, Status> {
        let g = r.get_ref().clone();
        self.call(r, "revoke_dataset", Action::Administer, Some(&g.project), |c, _, _| {
            admin::revoke(c, &g.project, &g.dataset, &g.columns)
        })
        .await
    }
}

impl AdminApi {
    /// The time a change is recorded with, to the second.
    fn now(&self) -> String {
        self.core.clock.now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    /// A project as the registry has it, with its release budget as the gateway counts it and
    /// the changes that wait for its board.
    fn described(&self, mut p: pb::Project) -> pb::Project {
        p.pending_changes = self
            .core
            .registry
            .with_conn(|c| changes::pending(c, &p.id))
            .unwrap_or_default()
            .into_iter()
            .map(|c| pb::PendingChange {
                id: c.id,
                change: c.change,
                requested_by: c.requested_by,
                requested_at: c.requested_at,
                signatures: c.signatures.into_iter().map(Into::into).collect(),
            })
            .collect();
        let budgets = &self.core.budgets;
        if budgets.enabled() {
            let granted = self.core.registry.budget_granted(&p.id).unwrap_or(0);
            p.release_budget_cells = budgets.base().saturating_add(granted);
            p.cells_released = budgets.used(&p.id);
        }
        p
    }

    fn check_cohort(&self, cohort: &str) -> Result<(), RegistryError> {
        if cohort.trim().is_empty() {
            return Ok(());
        }
        self.core
            .engine
            .check_cohort(cohort)
            .map_err(|e| Refusal::InvalidChange(format!("cohort: {e}")).into())
    }

    /// A board decision, judged by the rules for the role the caller decides as.
    async fn decision(&self, r: Request<pb::DecisionRequest>, approve: bool) -> Result<Response<pb::Project>, Status> {
        let d = r.get_ref().clone();
        let name = if approve { "approve_project" } else { "reject_project" };
        self.board(
            r,
            name,
            &d.role,
            Action::Decide,
            &d.project,
            |c, principal, role, today| admin::decide(c, &d.project, role, &principal.user, approve, &d.comment, today),
        )
        .await
    }

    /// A call made in one board role: the role must be one of the three (otherwise refused, and
    /// audited like any other call); then the rules judge `action` in that role on `project`.
    #[allow(clippy::too_many_arguments)]
    async fn board<M, T, R>(
        &self,
        r: Request<M>,
        name: &str,
        role: &str,
        action: fn(&'static str) -> Action,
        project: &str,
        change: impl FnOnce(
            &rusqlite::Connection,
            &crate::registry::Principal,
            &'static str,
            chrono::NaiveDate,
        ) -> Result<T, RegistryError>,
    ) -> Result<Response<R>, Status>
    where
        M: serde::Serialize,
        R: From<T>,
    {
        let role = match board_role(role) {
            Ok(role) => role,
            Err(e) => {
                return self
                    .call(r, name, Action::Connect, None, |_, _, _| Err::<T, _>(e))
                    .await;
            }
        };
        self.call(r, name, action(role), Some(project), |c, principal, today| {
            change(c, principal, role, today)
        })
        .await
    }
}

// ---- Conversions between the wire messages and the registry's types ----

impl From<pb::Organisation> for Organisation {
    fn from(o: pb::Organisation) -> Self {
        Self {
            id: o.id,
            name: o.name,
            ico_registration: o.ico_registration,
            dspt_status: o.dspt_status,
            dspt_expiry: o.dspt_expiry,
            accreditation: o.accreditation,
        }
    }
}

impl From<Organisation> for pb::Organisation {
    fn from(o: Organisation) -> Self {
        Self {
            id: o.id,
            name: o.name,
            ico_registration: o.ico_registration,
            dspt_status: o.dspt_status,
            dspt_expiry: o.dspt_expiry,
            accreditation: o.accreditation,
        }
    }
}

impl From<Vec<Organisation>> for pb::ListOrganisationsResponse {
    fn from(list: Vec<Organisation>) -> Self {
        Self {
            organisations: list.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::User> for User {
    fn from(u: pb::User) -> Self {
        Self {
            id: u.id,
            organisation: u.organisation,
            display_name: u.display_name,
            roles: u.roles,
            accreditation_expiry: u.accreditation_expiry,
            training_date: u.training_date,
            suspended: u.suspended,
        }
    }
}

impl From<User> for pb::User {
    fn from(u: User) -> Self {
        Self {
            id: u.id,
            organisation: u.organisation,
            display_name: u.display_name,
            roles: u.roles,
            accreditation_expiry: u.accreditation_expiry,
            training_date: u.training_date,
            suspended: u.suspended,
        }
    }
}

impl From<Vec<User>> for pb::ListUsersResponse {
    fn from(list: Vec<User>) -> Self {
        Self {
            users: list.into_iter().map(Into::into).collect(),
        }
    }
}

fn grants_from(list: Vec<pb::Grant>) -> Vec<Grant> {
    list.into_iter()
        .map(|g| Grant {
            dataset: g.dataset,
            columns: g.columns,
        })
        .collect()
}

fn grants_to(list: Vec<Grant>) -> Vec<pb::Grant> {
    list.into_iter()
        .map(|g| pb::Grant {
            dataset: g.dataset,
            columns: g.columns,
        })
        .collect()
}

impl From<pb::Project> for Project {
    fn from(p: pb::Project) -> Self {
        Self {
            id: p.id,
            title: p.title,
            purpose: p.purpose,
            justification: p.justification,
            lawful_basis: p.lawful_basis,
            start_date: p.start_date,
            end_date: p.end_date,
            cohort: p.cohort,
            parties: p.parties,
            requested: grants_from(p.requested),
            // Output only: state, members, grants and approvals change through their own calls.
            ..Default::default()
        }
    }
}

impl From<Project> for pb::Project {
    fn from(p: Project) -> Self {
        Self {
            id: p.id,
            title: p.title,
            purpose: p.purpose,
            justification: p.justification,
            lawful_basis: p.lawful_basis,
            start_date: p.start_date,
            end_date: p.end_date,
            cohort: p.cohort,
            parties: p.parties,
            state: p.state,
            members: p.members,
            grants: grants_to(p.grants),
            approvals: p.approvals.into_iter().map(Into::into).collect(),
            requested: grants_to(p.requested),
            release_budget_cells: 0,
            cells_released: 0,
            budget_requested: p.budget_requested,
            pending_changes: vec![],
        }
    }
}

impl From<Approval> for pb::Approval {
    fn from(a: Approval) -> Self {
        Self {
            role: a.role,
            user: a.user,
            decision: a.decision,
            decided_at: a.decided_at,
            comment: a.comment,
        }
    }
}

impl From<Vec<Project>> for pb::ListProjectsResponse {
    fn from(list: Vec<Project>) -> Self {
        Self {
            projects: list.into_iter().map(Into::into).collect(),
        }
    }
}
