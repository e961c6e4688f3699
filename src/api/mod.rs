//! The transport: thin gRPC adapters over [`crate::gateway::Core`]. This is the only place that
//! knows gRPC status codes: [`status`] maps every domain error to one, with a message that names
//! the rule and the fix and never contains data, paths or internal dumps.

pub mod admin;
pub mod audit;
pub mod audit_client;
pub mod auth;
pub mod client;
pub mod flight_sql;
mod metadata;
pub mod poll;
pub mod proto;
pub mod review;
mod strings;

use tonic::{Code, Status};

use crate::error::Error;
use crate::identity::client_tool::ClientTool;
use crate::identity::{Authenticated, IdentityError};
use crate::limits::LimitError;
use crate::registry::{Refusal, RegistryError};

/// The header naming the project a call belongs to.
pub const PROJECT_HEADER: &str = "x-sde-project";
/// Response headers carrying the audit receipt of a released result.
pub const RECEIPT_SEQ_HEADER: &str = "x-sde-audit-seq";
pub const RECEIPT_HASH_HEADER: &str = "x-sde-audit-hash";

/// Maps a domain error to a gRPC status. Exhaustive on purpose: a new variant must be placed.
pub fn status(error: Error) -> Status {
    use crate::engine::EngineError;
    let (code, message) = match &error {
        // The gateway cannot check any token just now: not the caller's fault.
        Error::Identity(IdentityError::KeysUnavailable) => (Code::Unavailable, error.to_string()),
        Error::Identity(e) => (Code::Unauthenticated, e.to_string()),
        Error::Registry(RegistryError::Refused(Refusal::NoProject | Refusal::InvalidChange(_))) => {
            (Code::InvalidArgument, error.to_string())
        }
        Error::Registry(RegistryError::Refused(Refusal::NotFound(_))) => (Code::NotFound, error.to_string()),
        Error::Registry(RegistryError::Refused(r)) => (Code::PermissionDenied, r.to_string()),
        Error::Registry(
            RegistryError::Database(_)
            | RegistryError::BadDate { .. }
            | RegistryError::BadDisclosure(_)
            | RegistryError::Rules(_)
            | RegistryError::MixedVersions(..)
            | RegistryError::NoSuchGrant(..),
        ) => (
            Code::Internal,
            "the registry is unavailable; try again later".to_owned(),
        ),
        Error::Policy(e) => (Code::InvalidArgument, e.to_string()),
        Error::Engine(EngineError::Execution(df)) => match df.find_root() {
            datafusion::error::DataFusionError::ResourcesExhausted(_) => (
                Code::ResourceExhausted,
                "safe-settings/memory: the query needed more memory than one query may use (limits.query_memory_bytes) \
                 or the gateway had left; filter earlier, join fewer tables or group by fewer columns"
                    .to_owned(),
            ),
            // Execution errors can quote values from the data (a failed cast, say): never sent.
            _ => (
                Code::InvalidArgument,
                "safe-settings/execution: the query failed while running (for example a value could not be converted); check types and casts"
                    .to_owned(),
            ),
        },
        Error::Engine(_) => (
            Code::Internal,
            "the project's data could not be opened; contact the platform team".to_owned(),
        ),
        Error::Audit(_) => (
            Code::Unavailable,
            "the audit log is unavailable, so nothing was released; try again later".to_owned(),
        ),
        Error::UnknownStatement => (Code::NotFound, error.to_string()),
        Error::TooManyRows(_) | Error::Budget(_) => (Code::ResourceExhausted, error.to_string()),
        Error::Limit(LimitError::Deadline(_)) => (Code::DeadlineExceeded, error.to_string()),
        Error::Limit(LimitError::ShuttingDown) => (Code::Unavailable, error.to_string()),
        Error::Limit(LimitError::Overflow) => (Code::InvalidArgument, error.to_string()),
        Error::Limit(
            LimitError::QueueFull { .. }
            | LimitError::QueueTimeout { .. }
            | LimitError::RateLimited { .. }
            | LimitError::UserBusy(_)
            | LimitError::ResultTooLarge(_),
        ) => (Code::ResourceExhausted, error.to_string()),
        Error::Internal(_) => (Code::Internal, "internal error".to_owned()),
        Error::Replay(_) => (Code::FailedPrecondition, error.to_string()),
    };
    match code {
        Code::Internal | Code::Unavailable => tracing::error!(error = %error, "call failed"),
        _ => tracing::debug!(error = %error, "call refused"),
    }
    Status::new(code, message)
}

/// Who is calling (as the authentication layer found) and for which project.
pub(crate) fn call_context<T>(request: &tonic::Request<T>) -> crate::gateway::CallContext {
    let authenticated = request
        .extensions()
        .get::<Authenticated>()
        .map(|a| a.0.clone())
        .unwrap_or(Err(IdentityError::Missing));
    let project = request
        .metadata()
        .get(PROJECT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|p| !p.is_empty() && p.len() <= 128)
        .map(str::to_owned);
    let client_tool = request.extensions().get::<ClientTool>().and_then(|t| t.0.clone());
    crate::gateway::CallContext {
        authenticated,
        project,
        client_tool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitError;
    use crate::policy::PolicyError;

    /// Every refusal and limit a caller can meet: its gRPC code, and a message that starts with
    /// the rule it names (`family/rule: …`).
    #[test]
    fn the_error_map_gives_each_refusal_its_code_and_its_rule_first() {
        let date = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let refused = |r: Refusal| Error::Registry(RegistryError::Refused(r));
        let cases: Vec<(Error, Code)> = vec![
            // Safe People: who is asking.
            (IdentityError::Missing.into(), Code::Unauthenticated),
            (IdentityError::Malformed.into(), Code::Unauthenticated),
            (
                IdentityError::Invalid("bad signature".into()).into(),
                Code::Unauthenticated,
            ),
            (IdentityError::Expired.into(), Code::Unauthenticated),
            (IdentityError::UnnamedTool.into(), Code::Unauthenticated),
            (IdentityError::KeysUnavailable.into(), Code::Unavailable),
            (refused(Refusal::UnknownUser("x".into())), Code::PermissionDenied),
            (refused(Refusal::UserSuspended), Code::PermissionDenied),
            (refused(Refusal::AccreditationExpired(date)), Code::PermissionDenied),
            (refused(Refusal::TrainingLapsed(date, 12)), Code::PermissionDenied),
            (refused(Refusal::MissingRole("admin")), Code::PermissionDenied),
            // Safe Projects.
            (refused(Refusal::NoProject), Code::InvalidArgument),
            (refused(Refusal::NotAMember("p".into())), Code::PermissionDenied),
            (
                refused(Refusal::NotApproved("p".into(), "ccio".into())),
                Code::PermissionDenied,
            ),
            (refused(Refusal::Ended("p".into(), date)), Code::PermissionDenied),
            (refused(Refusal::InvalidChange("x".into())), Code::InvalidArgument),
            (refused(Refusal::NotFound("x".into())), Code::NotFound),
            // Safe Outputs and Safe Settings, before anything runs.
            (PolicyError::RowLevel.into(), Code::InvalidArgument),
            (PolicyError::NotAQuery("COPY".into()).into(), Code::InvalidArgument),
            (PolicyError::TooLong(70_000, 65_536).into(), Code::InvalidArgument),
            (
                PolicyError::Complexity {
                    what: "expression depth",
                    value: 300,
                    max: 250,
                    key: "max_expression_depth",
                    advice: "simplify it",
                }
                .into(),
                Code::InvalidArgument,
            ),
            // Limits: always RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, never INTERNAL.
            (
                LimitError::RateLimited { per_minute: 60 }.into(),
                Code::ResourceExhausted,
            ),
            (LimitError::QueueFull { running: 8 }.into(), Code::ResourceExhausted),
            (
                LimitError::QueueTimeout {
                    running: 8,
                    waited_seconds: 30,
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (LimitError::UserBusy(4).into(), Code::ResourceExhausted),
            (LimitError::ResultTooLarge(1 << 20).into(), Code::ResourceExhausted),
            (Error::TooManyRows(10_000), Code::ResourceExhausted),
            (LimitError::Deadline(60).into(), Code::DeadlineExceeded),
            (
                Error::Engine(crate::engine::EngineError::Execution(
                    datafusion::error::DataFusionError::ResourcesExhausted("pool".into()),
                )),
                Code::ResourceExhausted,
            ),
            (LimitError::ShuttingDown.into(), Code::Unavailable),
            (LimitError::Overflow.into(), Code::InvalidArgument),
            // The protocol.
            (Error::UnknownStatement, Code::NotFound),
        ];
        for (error, code) in cases {
            let shown = format!("{error:?}");
            let status = status(error);
            assert_eq!(status.code(), code, "{shown}: {}", status.message());
            let (rule, _) = status
                .message()
                .split_once(": ")
                .unwrap_or_else(|| panic!("{shown}: no rule in {:?}", status.message()));
            assert!(
                rule.contains('/') && !rule.contains(' ') && rule.len() > 3,
                "{shown}: the message does not start with its rule: {:?}",
                status.message()
            );
        }
    }
}
