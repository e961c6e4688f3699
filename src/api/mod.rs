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
pub mod proto;

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
        Error::TooManyRows(_) => (Code::ResourceExhausted, error.to_string()),
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
