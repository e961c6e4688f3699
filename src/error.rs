//! The gateway's error: one variant per domain module, so the transport can map each to the
//! right gRPC code in one place (`api::status`).

use crate::audit::AuditError;
use crate::engine::EngineError;
use crate::identity::IdentityError;
use crate::limits::LimitError;
use crate::policy::PolicyError;
use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Budget(#[from] crate::budget::Exhausted),
    #[error("protocol/unknown-statement: unknown or expired statement handle; send the query again")]
    UnknownStatement,
    #[error("safe-outputs/result-size: the result has more than {0} rows; aggregate further")]
    TooManyRows(usize),
    #[error("internal error: {0}")]
    Internal(String),
    /// An auditor's replay that cannot be carried out (data changed, not a released query).
    #[error("{0}")]
    Replay(String),
}

impl Error {
    /// The rule a refusal names, for the audit record.
    pub fn rule(&self) -> String {
        let text = self.to_string();
        match text.split_once(':') {
            Some((rule, _)) if rule.contains('/') && !rule.contains(' ') => rule.to_owned(),
            _ => match self {
                _ if self.is_memory_exhausted() => "safe-settings/memory".into(),
                Error::Identity(_) => "safe-people/authentication".into(),
                Error::Policy(_) => "safe-outputs/invalid-query".into(),
                Error::UnknownStatement => "protocol/unknown-statement".into(),
                _ => "internal".into(),
            },
        }
    }

    /// Whether this is a refusal by a rule (as opposed to a failure of the gateway).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::Identity(_)
                | Error::Registry(RegistryError::Refused(_))
                | Error::Policy(_)
                | Error::UnknownStatement
                | Error::TooManyRows(_)
                | Error::Budget(_)
                | Error::Replay(_)
                | Error::Limit(_)
        ) || self.is_memory_exhausted()
    }

    /// Whether the query ran out of memory (its own cap or the gateway's pool).
    pub fn is_memory_exhausted(&self) -> bool {
        matches!(self, Error::Engine(EngineError::Execution(e))
            if matches!(e.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_)))
    }
}
