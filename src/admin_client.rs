//! `sde-gateway admin …`: a command-line client of AdminService over TLS, printing readable
//! tables. It holds no rights of its own: the gateway decides with the caller's token.

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::api::client::{Bearer, tls_channel};
use crate::api::proto::admin_service_client::AdminServiceClient;
use crate::api::proto::{self as pb};
use crate::registry::admin::ROLES;

/// The Data Security and Protection Toolkit statuses.
const DSPT: [&str; 3] = ["standards_met", "approaching_standards", "not_met"];

/// Where the gateway is and who is calling.
#[derive(Debug, Args)]
pub struct Connection {
    /// Gateway address (`host:port`, or `https://host:port`).
    #[arg(long, visible_alias = "server", default_value = "127.0.0.1:50051", global = true)]
    pub addr: String,
    /// CA certificate that signed the gateway's TLS certificate.
    #[arg(long, default_value = ".sde-demo/tls/ca.pem", global = true)]
    pub ca: PathBuf,
    /// File holding the caller's bearer token.
    #[arg(
        long,
        visible_alias = "token-file",
        default_value = ".sde-demo/tokens/admin.jwt",
        global = true
    )]
    pub token: PathBuf,
    /// Name the server certificate must carry.
    #[arg(long, visible_alias = "domain", default_value = "localhost", global = true)]
    pub server_name: String,
    #[command(flatten)]
    pub client: crate::api::client::ClientCert,
    /// Print the service's replies as JSON (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    /// An AdminService client over TLS carrying the caller's token.
    pub async fn open(&self) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
        let bearer = Bearer::from_file(&self.token)?;
        let channel = tls_channel(&self.addr, &self.ca, &self.server_name, None, &self.client).await?;
        Ok(AdminServiceClient::with_interceptor(channel, bearer))
    }
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List organisations.
    Orgs,
    /// Register an accredited organisation.
    CreateOrg {
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        ico: String,
        /// DSPT status.
        #[arg(long, default_value = "standards_met", value_parser = PossibleValuesParser::new(DSPT))]
        dspt_status: String,
        /// DSPT expiry, YYYY-MM-DD.
        #[arg(long)]
        dspt_expiry: String,
    },
    /// Change an organisation: only the fields given.
    UpdateOrg {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        ico: Option<String>,
        #[arg(long, value_parser = PossibleValuesParser::new(DSPT))]
        dspt_status: Option<String>,
        /// DSPT expiry, YYYY-MM-DD.
        #[arg(long)]
        dspt_expiry: Option<String>,
    },
    /// Suspend (or with --withdraw, withdraw) an organisation's accreditation.
    SuspendOrg {
        id: String,
        #[arg(long)]
        withdraw: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Restore an organisation's accreditation.
    ReinstateOrg { id: String },
    /// List users (of one organisation with --org).
    Users {
        #[arg(long)]
        org: Option<String>,
    },
    /// Register a user.
    CreateUser {
        id: String,
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Roles, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(ROLES))]
        roles: Vec<String>,
        /// Accreditation expiry, YYYY-MM-DD.
        #[arg(long)]
        accredited_until: String,
        /// Date of the last data protection training, YYYY-MM-DD.
        #[arg(long)]
        trained_on: String,
    },
    /// Change a user: only the fields given (--roles replaces the roles).
    UpdateUser {
        id: String,
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Roles, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(ROLES))]
        roles: Option<Vec<String>>,
        /// Accreditation expiry, YYYY-MM-DD.
        #[arg(long)]
        accredited_until: Option<String>,
        /// Date of the last data protection training, YYYY-MM-DD.
        #[arg(long)]
        trained_on: Option<String>,
    },
    /// Suspend a user (or reinstate with --reinstate).
    SuspendUser {
        id: String,
        #[arg(long)]
        reinstate: bool,
    },
    /// List projects.
    Projects,
    /// Show one project: proposal, state, members, grants and board decisions.
    Project { id: String },
    /// Propose a project (as a draft).
    CreateProject {
        id: String,
        #[arg(long)]
        title: String,
        #[arg(long)]
        purpose: String,
        #[arg(long, default_value = "")]
        justification: String,
        #[arg(long)]
        lawful_basis: String,
        #[arg(long)]
        start: String,
        #[arg(long)]
        end: String,
        /// A SQL predicate on `patients` applied under every scan, e.g. "age >= 65".
        #[arg(long, default_value = "")]
        cohort: String,
        /// Party organisations, comma separated.
        #[arg(long, value_delimiter = ',')]
        parties: Vec<String>,
    },
    /// Submit a draft to the board.
    Submit { id: String },
    /// Approve a submitted project in one of your board roles.
    Approve {
        id: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Reject a submitted project in one of your board roles.
    Reject {
        id: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Grant an approved or active project more release budget (cells), in one of your board
    /// roles.
    GrantBudget {
        id: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        cells: u64,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Sign (or with --reject refuse) a change that widens an approved project, in one board
    /// role; the third role's signature applies it.
    SignChange {
        project: String,
        change: u64,
        #[arg(long)]
        role: String,
        #[arg(long)]
        reject: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// approved -> active.
    Activate { id: String },
    /// Suspend an approved or active project.
    SuspendProject { id: String },
    /// End a project.
    End { id: String },
    /// Add a member to a project.
    AddMember { project: String, user: String },
    /// Remove a member from a project.
    RemoveMember { project: String, user: String },
    /// Grant columns of a dataset to a project.
    Grant {
        project: String,
        dataset: String,
        /// Columns, comma separated.
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
    },
    /// Revoke columns (or, with none named, the whole dataset) from a project.
    Revoke {
        project: String,
        dataset: String,
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
    },
}

/// Runs one admin command and prints its outcome.
pub async fn run(connection: &Connection, command: AdminCommand) -> anyhow::Result<()> {
    let mut client = connection.open().await?;
    let state = |id: String| pb::ProjectStateRequest {
        project: id,
        reason: String::new(),
    };
    let project = match command {
        AdminCommand::Orgs => {
            let list = client.list_organisations(pb::ListOrganisationsRequest {}).await?;
            emit(connection.json, &list.into_inner().organisations[..], print_orgs);
            return Ok(());
        }
        AdminCommand::CreateOrg {
            id,
            name,
            ico,
            dspt_status,
            dspt_expiry,
        } => {
            let org = pb::Organisation {
                id,
                name,
                ico_registration: ico,
                dspt_status,
                dspt_expiry,
                accreditation: String::new(),
            };
            emit(
                connection.json,
                &[client.create_organisation(org).await?.into_inner()][..],
                print_orgs,
            );
            return Ok(());
        }
        AdminCommand::UpdateOrg {
            id,
            name,
            ico,
            dspt_status,
            dspt_expiry,
        } => {
            let listed = client.list_organisations(pb::ListOrganisationsRequest {}).await?;
            let Some(mut org) = listed.into_inner().organisations.into_iter().find(|o| o.id == id) else {
                anyhow::bail!("registry/not-found: no organisation {id}");
            };
            set(&mut org.name, name);
            set(&mut org.ico_registration, ico);
            set(&mut org.dspt_status, dspt_status);
            set(&mut org.dspt_expiry, dspt_expiry);
            emit(
                connection.json,
                &[client.update_organisation(org).await?.into_inner()][..],
                print_orgs,
            );
            return Ok(());
        }
        AdminCommand::UpdateUser {
            id,
            org,
            name,
            roles,
            accredited_until,
            trained_on,
        } => {
            let listed = client.list_users(pb::ListUsersRequest::default()).await?;
            let Some(mut user) = listed.into_inner().users.into_iter().find(|u| u.id == id) else {
                anyhow::bail!("registry/not-found: no user {id}");
            };
            set(&mut user.organisation, org);
            set(&mut user.display_name, name);
            set(&mut user.roles, roles);
            set(&mut user.accreditation_expiry, accredited_until);
            set(&mut user.training_date, trained_on);
            emit(
                connection.json,
                &[client.update_user(user).await?.into_inner()][..],
                print_users,
            );
            return Ok(());
        }
        AdminCommand::SuspendOrg { id, withdraw, reason } => {
            let m = pb::SuspendOrganisationRequest { id, withdraw, reason };
            emit(
                connection.json,
                &[client.suspend_organisation(m).await?.into_inner()][..],
                print_orgs,
            );
            return Ok(());
        }
        AdminCommand::ReinstateOrg { id } => {
            let m = pb::ReinstateOrganisationRequest { id };
            emit(
                connection.json,
                &[client.reinstate_organisation(m).await?.into_inner()][..],
                print_orgs,
            );
            return Ok(());
        }
        AdminCommand::Users { org } => {
            let m = pb::ListUsersRequest {
                organisation: org.unwrap_or_default(),
            };
            emit(
                connection.json,
                &client.list_users(m).await?.into_inner().users[..],
                print_users,
            );
            return Ok(());
        }
        AdminCommand::CreateUser {
            id,
            org,
            name,
            roles,
            accredited_until,
            trained_on,
        } => {
            let user = pb::User {
                id,
                organisation: org,
                display_name: name,
                roles,
                accreditation_expiry: accredited_until,
                training_date: trained_on,
                suspended: false,
            };
            emit(
                connection.json,
                &[client.create_user(user).await?.into_inner()][..],
                print_users,
            );
            return Ok(());
        }
        AdminCommand::SuspendUser { id, reinstate } => {
            let m = pb::SuspendUserRequest {
                id,
                suspended: !reinstate,
                reason: String::new(),
            };
            emit(
                connection.json,
                &[client.suspend_user(m).await?.into_inner()][..],
                print_users,
            );
            return Ok(());
        }
        AdminCommand::Projects => {
            let list = client.list_projects(pb::ListProjectsRequest {}).await?.into_inner();
            emit(connection.json, &list.projects[..], |projects| {
                println!("{:<20} {:<10} {:<11} {:<11} TITLE", "ID", "STATE", "START", "END");
                for p in projects {
                    println!(
                        "{:<20} {:<10} {:<11} {:<11} {}",
                        p.id, p.state, p.start_date, p.end_date, p.title
                    );
                }
            });
            return Ok(());
        }
        AdminCommand::Project { id } => client.get_project(pb::ProjectRef { id }).await?,
        AdminCommand::CreateProject {
            id,
            title,
            purpose,
            justification,
            lawful_basis,
            start,
            end,
            cohort,
            parties,
        } => {
            let p = pb::Project {
                id,
                title,
                purpose,
                justification,
                lawful_basis,
                start_date: start,
                end_date: end,
                cohort,
                parties,
                ..Default::default()
            };
            client.create_project(p).await?
        }
        AdminCommand::Submit { id } => client.submit_project(pb::ProjectRef { id }).await?,
        AdminCommand::Approve { id, role, comment } => {
            let m = pb::DecisionRequest {
                project: id,
                role,
                comment,
            };
            client.approve_project(m).await?
        }
        AdminCommand::Reject { id, role, comment } => {
            let m = pb::DecisionRequest {
                project: id,
                role,
                comment,
            };
            client.reject_project(m).await?
        }
        AdminCommand::GrantBudget {
            id,
            role,
            cells,
            comment,
        } => {
            let m = pb::BudgetGrant {
                project: id,
                role,
                cells,
                comment,
            };
            client.grant_release_budget(m).await?
        }
        AdminCommand::SignChange {
            project,
            change,
            role,
            reject,
            comment,
        } => {
            let m = pb::ChangeDecision {
                project,
                change,
                role,
                reject,
                comment,
            };
            client.sign_change(m).await?
        }
        AdminCommand::Activate { id } => client.activate_project(state(id)).await?,
        AdminCommand::SuspendProject { id } => client.suspend_project(state(id)).await?,
        AdminCommand::End { id } => client.end_project(state(id)).await?,
        AdminCommand::AddMember { project, user } => client.add_member(pb::MemberRequest { project, user }).await?,
        AdminCommand::RemoveMember { project, user } => {
            client.remove_member(pb::MemberRequest { project, user }).await?
        }
        AdminCommand::Grant {
            project,
            dataset,
            columns,
        } => {
            let m = pb::GrantRequest {
                project,
                dataset,
                columns,
            };
            client.grant_dataset(m).await?
        }
        AdminCommand::Revoke {
            project,
            dataset,
            columns,
        } => {
            let m = pb::GrantRequest {
                project,
                dataset,
                columns,
            };
            client.revoke_dataset(m).await?
        }
    };
    emit(connection.json, &project.into_inner(), print_project);
    Ok(())
}

/// Replaces `field` with `value` where one was given.
fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// Prints `value` as JSON (`--json`), or as `text` does.
pub(crate) fn emit<T: serde::Serialize + ?Sized>(json: bool, value: &T, text: impl FnOnce(&T)) {
    match json {
        true => println!("{}", serde_json::to_string_pretty(value).expect("replies serialise")),
        false => text(value),
    }
}

fn print_orgs(orgs: &[pb::Organisation]) {
    println!(
        "{:<12} {:<12} {:<22} {:<11} {:<10} NAME",
        "ID", "ACCREDITED", "DSPT", "DSPT UNTIL", "ICO"
    );
    for o in orgs {
        println!(
            "{:<12} {:<12} {:<22} {:<11} {:<10} {}",
            o.id, o.accreditation, o.dspt_status, o.dspt_expiry, o.ico_registration, o.name
        );
    }
}

fn print_users(users: &[pb::User]) {
    println!(
        "{:<12} {:<10} {:<11} {:<11} {:<9} ROLES",
        "ID", "ORG", "ACCREDITED", "TRAINED", "SUSPENDED"
    );
    for u in users {
        println!(
            "{:<12} {:<10} {:<11} {:<11} {:<9} {}",
            u.id,
            u.organisation,
            u.accreditation_expiry,
            u.training_date,
            if u.suspended { "yes" } else { "no" },
            u.roles.join(", ")
        );
    }
}

fn print_project(p: &pb::Project) {
    println!("project       {} ({})", p.id, p.state);
    println!("title         {}", p.title);
    println!("purpose       {}", p.purpose);
    if !p.justification.is_empty() {
        println!("justification {}", p.justification);
    }
    println!("lawful basis  {}", p.lawful_basis);
    println!("dates         {} to {}", p.start_date, p.end_date);
    let cohort = if p.cohort.is_empty() { "everyone" } else { &p.cohort };
    println!("cohort        {cohort}");
    println!("parties       {}", p.parties.join(", "));
    println!("members       {}", p.members.join(", "));
    for g in &p.grants {
        println!("grant         {}: {}", g.dataset, g.columns.join(", "));
    }
    if p.release_budget_cells > 0 {
        let waiting = if p.budget_requested {
            "; a request for more waits for the board"
        } else {
            ""
        };
        println!(
            "budget        {} of {} cells released{waiting}",
            p.cells_released, p.release_budget_cells
        );
    }
    for a in &p.approvals {
        let comment = if a.comment.is_empty() {
            String::new()
        } else {
            format!(" — {}", a.comment)
        };
        println!(
            "board         {} {} by {} on {}{comment}",
            a.role, a.decision, a.user, a.decided_at
        );
    }
    for c in &p.pending_changes {
        let signed: Vec<&str> = c.signatures.iter().map(|s| s.role.as_str()).collect();
        println!(
            "pending       change {}: {} (by {} on {}); signed by {}",
            c.id,
            c.change,
            c.requested_by,
            c.requested_at,
            if signed.is_empty() {
                "none yet".to_owned()
            } else {
                signed.join(", ")
            }
        );
    }
}
