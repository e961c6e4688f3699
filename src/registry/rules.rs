//! The access rules, written once and declaratively in Cedar (`config/policies/*.cedar`, over the
//! schema `sde.cedarschema`), so that a board can read exactly what the software enforces.
//!
//! At each call the registry builds the Cedar entities (user, organisation, project) from its
//! tables and asks [`RuleSet::decide`]. A refusal names the rule that refused: the `@rule`
//! annotation of the first matching `forbid` (files in name order, policies in file order).
//! Nothing is permitted unless a `permit` says so, and evaluation errors refuse (fail closed).
//!
//! The rule set's hash (SHA-256 over the files, in order, names and contents) is recorded with
//! every audit record.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use chrono::NaiveDate;
use sha2::{Digest, Sha256};

/// The rule set shipped with the gateway, as files: the demo writes these, and tests use them.
pub const SHIPPED: [(&str, &str); 5] = [
    ("sde.cedarschema", include_str!("../../config/policies/sde.cedarschema")),
    (
        "10-safe-people.cedar",
        include_str!("../../config/policies/10-safe-people.cedar"),
    ),
    ("20-roles.cedar", include_str!("../../config/policies/20-roles.cedar")),
    (
        "30-safe-projects.cedar",
        include_str!("../../config/policies/30-safe-projects.cedar"),
    ),
    ("90-permit.cedar", include_str!("../../config/policies/90-permit.cedar")),
];

const SCHEMA_FILE: &str = "sde.cedarschema";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read the access rules in {path}: {message}")]
    Read { path: String, message: String },
    #[error("access rules {file} are not valid Cedar: {message}")]
    Parse { file: String, message: String },
    #[error("access rules do not match the schema: {0}")]
    Invalid(String),
    #[error("access rule without a @rule annotation in {0}")]
    Unnamed(String),
}

/// What the rules are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Query,
    Administer,
    /// A board decision in one board role.
    Decide(&'static str),
    /// A board grant of more release budget, in one board role.
    GrantBudget(&'static str),
    /// A board member's signature of a change that widens an approved project, in one role.
    SignChange(&'static str),
    /// An output checker's reading of, or decision on, a release request of a project.
    Review,
    Audit,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Query => "query",
            Action::Administer => "administer",
            Action::Decide(_) => "decide",
            Action::GrantBudget(_) => "grant_budget",
            Action::SignChange(_) => "sign_change",
            Action::Review => "review",
            Action::Audit => "audit",
        }
    }
}

/// The rule named when no `permit` covers an action.
const NOT_PERMITTED: &str = "safe-settings/not-permitted";

/// An organisation as the rules see it.
#[derive(Debug, Clone)]
pub struct OrganisationFacts {
    pub id: String,
    pub accreditation: String,
    pub dspt_status: String,
    pub dspt_expiry: NaiveDate,
}

/// A user as the rules see it.
#[derive(Debug, Clone)]
pub struct UserFacts {
    pub id: String,
    pub organisation: OrganisationFacts,
    pub roles: Vec<String>,
    pub suspended: bool,
    pub accreditation_expiry: NaiveDate,
    pub training_date: NaiveDate,
}

/// A project as the rules see it.
#[derive(Debug, Clone)]
pub struct ProjectFacts {
    pub id: String,
    pub state: String,
    pub start_date: NaiveDate,
    pub end_date: NaiveDate,
    pub members: Vec<String>,
    pub parties: Vec<String>,
    pub approved_by: Vec<String>,
    pub rejected: bool,
}

/// The loaded, validated rule set.
pub struct RuleSet {
    policies: PolicySet,
    schema: Schema,
    /// Policy id → (precedence, rule name).
    names: HashMap<PolicyId, (usize, String)>,
    hash: String,
    authorizer: Authorizer,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl RuleSet {
    /// Loads `sde.cedarschema` and every `*.cedar` file of `dir`.
    pub fn load(dir: &Path) -> Result<Self, RulesError> {
        let read_err = |message: String| RulesError::Read {
            path: dir.display().to_string(),
            message,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(e.to_string()))? {
            let path = entry.map_err(|e| read_err(e.to_string()))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name == SCHEMA_FILE || name.ends_with(".cedar") {
                let text = std::fs::read_to_string(&path).map_err(|e| read_err(format!("{name}: {e}")))?;
                files.push((name, text));
            }
        }
        Self::from_files(files)
    }

    /// The rules shipped with the gateway.
    pub fn shipped() -> Self {
        Self::from_files(SHIPPED.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect())
            .expect("shipped rules are valid")
    }

    /// Writes the shipped rules to `dir` (the demo world's copy).
    pub fn write_shipped(dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in SHIPPED {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(())
    }

    fn from_files(mut files: Vec<(String, String)>) -> Result<Self, RulesError> {
        files.sort();
        let mut hasher = Sha256::new();
        for (name, text) in &files {
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
        }
        let hash = hex::encode(hasher.finalize());
        let schema_text = files
            .iter()
            .find(|(n, _)| n == SCHEMA_FILE)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| RulesError::Read {
                path: SCHEMA_FILE.into(),
                message: "the schema file is missing".into(),
            })?;
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_text).map_err(|e| RulesError::Parse {
            file: SCHEMA_FILE.into(),
            message: e.to_string(),
        })?;
        let mut policies = PolicySet::new();
        let mut names = HashMap::new();
        for (name, text) in files.iter().filter(|(n, _)| n.ends_with(".cedar")) {
            let parsed = PolicySet::from_str(text).map_err(|e| RulesError::Parse {
                file: name.clone(),
                message: e.to_string(),
            })?;
            // `from_str` numbers a file's policies in order: policy0, policy1, …
            let mut in_file: Vec<_> = parsed.policies().collect();
            in_file.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(0)
            });
            for policy in in_file {
                let rule = policy
                    .annotation("rule")
                    .ok_or_else(|| RulesError::Unnamed(name.clone()))?
                    .to_owned();
                let id = PolicyId::new(format!("{name}#{}", names.len()));
                names.insert(id.clone(), (names.len(), rule));
                policies
                    .add(policy.new_id(id))
                    .map_err(|e| RulesError::Invalid(e.to_string()))?;
            }
        }
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !validation.validation_passed() {
            let errors: Vec<String> = validation.validation_errors().map(|e| e.to_string()).collect();
            return Err(RulesError::Invalid(errors.join("; ")));
        }
        Ok(Self {
            policies,
            schema,
            names,
            hash,
            authorizer: Authorizer::new(),
        })
    }

    /// SHA-256 of the rule files: recorded with every audit record.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Decides `action` by `user` on `project` (or on the registry, for calls without one).
    /// `Err` carries the name of the rule that refused.
    pub fn decide(
        &self,
        user: &UserFacts,
        action: Action,
        project: Option<&ProjectFacts>,
        today: NaiveDate,
        training_cutoff: NaiveDate,
    ) -> Result<(), String> {
        match self.evaluate(user, action, project, today, training_cutoff) {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "access rules could not be evaluated; refusing");
                Err("safe-settings/rules-error".into())
            }
        }
    }

    fn evaluate(
        &self,
        user: &UserFacts,
        action: Action,
        project: Option<&ProjectFacts>,
        today: NaiveDate,
        training_cutoff: NaiveDate,
    ) -> Result<Result<(), String>, String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let mut entities = vec![organisation_entity(&user.organisation)?, user_entity(user)?];
        let resource = match project {
            Some(p) => {
                // Members and parties are referenced; they need not be loaded to be compared.
                entities.push(project_entity(p)?);
                uid("Project", &p.id)
            }
            None => {
                let registry = uid("Registry", "registry");
                entities.push(Entity::new_no_attrs(registry.clone(), HashSet::new()));
                registry
            }
        };
        let entities = Entities::from_entities(entities, Some(&self.schema)).map_err(|e| err(&e))?;
        let mut context = vec![
            ("today".to_owned(), day(today)),
            ("training_cutoff".to_owned(), day(training_cutoff)),
        ];
        if let Action::Decide(role) | Action::GrantBudget(role) | Action::SignChange(role) = action {
            context.push(("role".to_owned(), RestrictedExpression::new_string(role.to_owned())));
        }
        let action_uid = uid("Action", action.name());
        let context = Context::from_pairs(context).map_err(|e| err(&e))?;
        let request = Request::new(uid("User", &user.id), action_uid, resource, context, Some(&self.schema))
            .map_err(|e| err(&e))?;
        let response = self.authorizer.is_authorized(&request, &self.policies, &entities);
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        if response.decision() == Decision::Allow {
            return Ok(Ok(()));
        }
        // The first forbid that matched, by precedence; otherwise nothing permitted the action.
        let refused_by = response
            .diagnostics()
            .reason()
            .filter_map(|id| self.names.get(id))
            .min_by_key(|(order, _)| *order)
            .map(|(_, rule)| rule.clone())
            .unwrap_or_else(|| NOT_PERMITTED.to_owned());
        Ok(Err(refused_by))
    }
}

fn entity(uid: EntityUid, attrs: HashMap<String, RestrictedExpression>) -> Result<Entity, String> {
    Entity::new(uid, attrs, HashSet::new()).map_err(|e| e.to_string())
}

fn uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(kind).expect("entity type names are fixed"),
        EntityId::new(id),
    )
}

fn day(date: NaiveDate) -> RestrictedExpression {
    RestrictedExpression::new_datetime(date.format("%Y-%m-%d").to_string())
}

fn strings(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().map(|v| RestrictedExpression::new_string(v.clone())))
}

fn refs(kind: &str, ids: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(ids.iter().map(|id| RestrictedExpression::new_entity_uid(uid(kind, id))))
}

fn organisation_entity(org: &OrganisationFacts) -> Result<Entity, String> {
    entity(
        uid("Organisation", &org.id),
        HashMap::from([
            (
                "accreditation".to_owned(),
                RestrictedExpression::new_string(org.accreditation.clone()),
            ),
            (
                "dspt_status".to_owned(),
                RestrictedExpression::new_string(org.dspt_status.clone()),
            ),
            ("dspt_expiry".to_owned(), day(org.dspt_expiry)),
        ]),
    )
}

fn user_entity(user: &UserFacts) -> Result<Entity, String> {
    entity(
        uid("User", &user.id),
        HashMap::from([
            (
                "organisation".to_owned(),
                RestrictedExpression::new_entity_uid(uid("Organisation", &user.organisation.id)),
            ),
            ("roles".to_owned(), strings(&user.roles)),
            ("suspended".to_owned(), RestrictedExpression::new_bool(user.suspended)),
            ("accreditation_expiry".to_owned(), day(user.accreditation_expiry)),
            ("training_date".to_owned(), day(user.training_date)),
        ]),
    )
}

fn project_entity(project: &ProjectFacts) -> Result<Entity, String> {
    entity(
        uid("Project", &project.id),
        HashMap::from([
            (
                "state".to_owned(),
                RestrictedExpression::new_string(project.state.clone()),
            ),
            ("start_date".to_owned(), day(project.start_date)),
            ("end_date".to_owned(), day(project.end_date)),
            ("members".to_owned(), refs("User", &project.members)),
            ("parties".to_owned(), refs("Organisation", &project.parties)),
            ("approved_by".to_owned(), strings(&project.approved_by)),
            ("rejected".to_owned(), RestrictedExpression::new_bool(project.rejected)),
        ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn alice() -> UserFacts {
        UserFacts {
            id: "alice".into(),
            organisation: OrganisationFacts {
                id: "ecc".into(),
                accreditation: "accredited".into(),
                dspt_status: "standards_met".into(),
                dspt_expiry: date("2027-06-30"),
            },
            roles: vec!["researcher".into()],
            suspended: false,
            accreditation_expiry: date("2027-06-30"),
            training_date: date("2026-09-01"),
        }
    }

    fn project() -> ProjectFacts {
        ProjectFacts {
            id: "p".into(),
            state: "active".into(),
            start_date: date("2026-01-01"),
            end_date: date("2027-12-31"),
            members: vec!["alice".into()],
            parties: vec!["ecc".into()],
            approved_by: vec![
                "board:caldicott_guardian".into(),
                "board:ccio".into(),
                "board:public_representative".into(),
            ],
            rejected: false,
        }
    }

    fn decide(user: &UserFacts, action: Action, project: Option<&ProjectFacts>) -> Result<(), String> {
        RuleSet::shipped().decide(user, action, project, date("2026-11-24"), date("2025-11-24"))
    }

    #[test]
    fn shipped_rules_load_and_permit_a_valid_query() {
        let rules = RuleSet::shipped();
        assert_eq!(rules.hash().len(), 64);
        assert_eq!(decide(&alice(), Action::Query, Some(&project())), Ok(()));
        assert_eq!(decide(&alice(), Action::Connect, None), Ok(()));
    }

    #[test]
    fn each_rule_names_itself() {
        let mut u = alice();
        u.suspended = true;
        assert_eq!(
            decide(&u, Action::Connect, None).unwrap_err(),
            "safe-people/user-suspended"
        );
        let mut u = alice();
        u.training_date = date("2025-01-01");
        assert_eq!(
            decide(&u, Action::Query, Some(&project())).unwrap_err(),
            "safe-people/training-lapsed"
        );
        let mut p = project();
        p.approved_by.pop();
        assert_eq!(
            decide(&alice(), Action::Query, Some(&p)).unwrap_err(),
            "safe-projects/not-approved"
        );
        assert_eq!(
            decide(&alice(), Action::Administer, None).unwrap_err(),
            "safe-people/role-admin"
        );
        assert_eq!(
            decide(&alice(), Action::Audit, None).unwrap_err(),
            "safe-people/role-auditor"
        );
        assert_eq!(
            decide(&alice(), Action::Review, Some(&project())).unwrap_err(),
            "safe-people/role-output-checker"
        );
        let mut checker = alice();
        checker.roles = vec!["output-checker".into()];
        assert_eq!(
            decide(&checker, Action::Review, Some(&project())).unwrap_err(),
            "safe-projects/conflict-of-interest"
        );
        let mut other = project();
        other.members = vec!["bob".into()];
        assert_eq!(decide(&checker, Action::Review, Some(&other)), Ok(()));
        let mut board_member = alice();
        board_member.roles = vec!["board:ccio".into()];
        assert_eq!(
            decide(&board_member, Action::SignChange("board:ccio"), Some(&project())).unwrap_err(),
            "safe-projects/conflict-of-interest"
        );
        assert_eq!(
            decide(
                &board_member,
                Action::SignChange("board:caldicott_guardian"),
                Some(&other)
            )
            .unwrap_err(),
            "safe-projects/board-role"
        );
        assert_eq!(
            decide(&board_member, Action::SignChange("board:ccio"), Some(&other)),
            Ok(())
        );
        let mut board = alice();
        board.roles = vec!["board:ccio".into()];
        let mut submitted = project();
        submitted.state = "submitted".into();
        submitted.members.clear();
        assert_eq!(decide(&board, Action::Decide("board:ccio"), Some(&submitted)), Ok(()));
        assert_eq!(
            decide(&board, Action::Decide("board:caldicott_guardian"), Some(&submitted)).unwrap_err(),
            "safe-projects/board-role"
        );
    }

    #[test]
    fn safe_people_rules_come_before_project_rules() {
        let mut u = alice();
        u.organisation.accreditation = "suspended".into();
        let mut p = project();
        p.members.clear();
        assert_eq!(
            decide(&u, Action::Query, Some(&p)).unwrap_err(),
            "safe-people/organisation-not-accredited"
        );
    }

    #[test]
    fn an_invalid_rule_set_is_refused_at_load() {
        let mut files: Vec<_> = SHIPPED.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
        files.push((
            "40-bad.cedar".into(),
            "@rule(\"x\") forbid (principal, action, resource) when { principal.no_such_attribute };".into(),
        ));
        assert!(matches!(RuleSet::from_files(files), Err(RulesError::Invalid(_))));
        let unnamed = vec![
            (SCHEMA_FILE.to_owned(), SHIPPED[0].1.to_owned()),
            ("a.cedar".to_owned(), "permit (principal, action, resource);".to_owned()),
        ];
        assert!(matches!(RuleSet::from_files(unnamed), Err(RulesError::Unnamed(_))));
    }
}
