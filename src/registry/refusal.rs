//! Every way Safe People or Safe Projects refuses a call, each naming its rule.

use chrono::NaiveDate;

/// Why a call is refused by Safe People or Safe Projects. The message names the rule (the
/// `@rule` of the Cedar policy that refused, see `config/policies/`) and what to do; it never
/// reveals anything about other users or projects.
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
    #[error("safe-people/role-{0}: this call needs the {0} role")]
    MissingRole(&'static str),
    #[error("safe-projects/board-role: deciding as {0} needs that board role")]
    BoardRole(String),
    #[error("safe-projects/no-project: name the project with the `x-sde-project` header")]
    NoProject,
    #[error("safe-projects/not-a-member: project {0} does not exist or you are not a member of it")]
    NotAMember(String),
    #[error("safe-projects/rejected: project {0} was rejected by the board")]
    Rejected(String),
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
    #[error(
        "safe-projects/conflict-of-interest: you are a member of project {0}, so you cannot decide on it or review its outputs"
    )]
    ConflictOfInterest(String),
    #[error("safe-projects/not-submitted: project {0} is {1}; the board decides only on submitted projects")]
    NotSubmitted(String, String),
    #[error(
        "safe-projects/budget-state: project {0} is {1}; release budget is granted only to approved or active projects"
    )]
    BudgetState(String, String),
    #[error("{0}: refused by this environment's access rules")]
    Rule(String),
    #[error("registry/invalid: {0}")]
    InvalidChange(String),
    #[error("registry/not-found: {0}")]
    NotFound(String),
}
