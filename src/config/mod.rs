//! Typed configuration: a TOML file, overridden by `SDE_…` environment variables, validated
//! before any port is bound. Every key is documented in `config/gateway.example.toml`.
//!
//! An environment variable names a key by its path in upper case, sections joined by a double
//! underscore: `SDE_LISTEN`, `SDE_DISCLOSURE__THRESHOLD`, `SDE_TLS__CERT`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::disclosure::DisclosureConfig;

mod validate;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var} cannot set `{key}`: {message}")]
    Env { var: String, key: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the gRPC port (Flight SQL) listens on.
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    pub identity: IdentityConfig,
    pub registry: RegistryConfig,
    pub data: DataConfig,
    pub audit: AuditConfig,
    #[serde(default)]
    pub disclosure: DisclosureConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain presented by the server.
    pub cert: PathBuf,
    /// PEM private key of the server certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s) that issue approved client tools their certificates (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Whether clients must present a certificate from `client_ca`.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Mutual TLS: whether a client certificate is asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    Off,
    /// A certificate is asked for; if one is sent it must come from `client_ca`.
    Optional,
    /// Only clients with a certificate from `client_ca` can connect.
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// The only signature algorithm accepted: `ES256` or `RS256`.
    pub algorithm: String,
    /// PEM public key (or certificate) that verifies token signatures. Exactly one of this and
    /// `jwks_url`.
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// An OIDC provider's JWKS URL: the key a token's `kid` names is taken from there.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CA certificate(s) trusted for an https `jwks_url` instead of the public web roots.
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// Fewest seconds between two fetches of the key set, however many unknown `kid`s arrive.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_seconds: u64,
    /// A fetched key set is used for at most this many seconds, then fetched again.
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache_seconds: u64,
    /// Clock skew tolerated on `exp`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// The claim that names the user, as the registry knows them: `sub` (the default), or
    /// another string claim such as `preferred_username` or `oid`.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
}

fn default_user_claim() -> String {
    "sub".into()
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            algorithm: "ES256".into(),
            public_key: None,
            jwks_url: None,
            jwks_ca: None,
            jwks_min_refresh_seconds: default_jwks_min_refresh(),
            jwks_cache_seconds: default_jwks_cache(),
            leeway_seconds: default_leeway(),
            user_claim: default_user_claim(),
        }
    }
}

fn default_jwks_min_refresh() -> u64 {
    60
}

fn default_jwks_cache() -> u64 {
    600
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// SQLite database of organisations, users, projects, approvals and grants.
    pub path: PathBuf,
    /// Folder of the access rules: `sde.cedarschema` and `*.cedar` policies.
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    /// Data protection training older than this many months has lapsed.
    #[serde(default = "default_training_months")]
    pub training_months: u32,
}

fn default_policies() -> PathBuf {
    PathBuf::from("policies")
}

fn default_training_months() -> u32 {
    12
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Folder holding one sub-folder of Parquet files per dataset, and `opt_outs/`.
    pub dir: PathBuf,
    /// Per dataset, columns besides `person_id` that are identifiers: usable only as join keys
    /// or inside COUNT(DISTINCT …), never output, grouped on or filtered.
    #[serde(default)]
    pub identifiers: std::collections::BTreeMap<String, Vec<String>>,
    /// Folder of kept dataset versions (`<versions>/<dataset>/<version>/`, written by `ingest`),
    /// read for grants that name a version. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<PathBuf>,
    /// Folder where the gateway keeps each dataset as it serves it: with the people on the
    /// opt-out register removed, written once per dataset version and register version and
    /// checked at every start. Optional; without it, opted-out people are removed beneath every
    /// scan of every query (an anti-join per table), which is slower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<PathBuf>,
    /// Per dataset, the columns its served copy is sorted by (with `served`). A query filtering
    /// on them reads only the row groups and pages whose statistics can match: choose the
    /// columns researchers filter on most, e.g. `patients = ["district", "age"]`. Changing them
    /// rebuilds the copy at the next start.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub served_sort_by: std::collections::BTreeMap<String, Vec<String>>,
    /// Strings in results as Arrow `Utf8View` (true, the default: what DataFusion computes) or
    /// as plain `Utf8` (false), for clients and SQL layers that cannot read string views.
    #[serde(default = "string_view_default")]
    pub string_view: bool,
}

fn string_view_default() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Folder of the append-only, hash-chained audit log.
    pub dir: PathBuf,
    /// PEM (PKCS#8) Ed25519 private key that signs the log's checkpoints. Auditors verify them
    /// with the matching public key, kept apart from the log.
    pub signing_key: PathBuf,
    /// A signed checkpoint is written once this many records have been added since the last one…
    #[serde(default = "default_checkpoint_records")]
    pub checkpoint_records: u64,
    /// …or once this many seconds have passed with records not yet covered (and at shutdown).
    #[serde(default = "default_checkpoint_seconds")]
    pub checkpoint_seconds: u64,
    /// Most records written with one fsync (group commit); 1 syncs every record on its own.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Handing over a result (DoGet) releases nothing its durable execution record (SQL, caller,
    /// project, result hash, rows, what was withheld) does not already describe, so its delivery
    /// record is written before the rows leave and synced with the next fsync, at most this many
    /// milliseconds later. 0 syncs it before the rows leave (one more fsync a query).
    #[serde(default = "default_delivery_sync_ms")]
    pub delivery_sync_ms: u64,
}

fn default_checkpoint_records() -> u64 {
    1000
}
fn default_checkpoint_seconds() -> u64 {
    60
}
fn default_max_batch() -> usize {
    512
}
/// Longest `audit.delivery_sync_ms` allowed: a delivery record is durable within a second.
pub const MAX_DELIVERY_SYNC_MS: u64 = 1000;

fn default_delivery_sync_ms() -> u64 {
    5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest SQL text accepted, in bytes.
    pub max_sql_bytes: usize,
    /// Most SQL parser steps (expression terms started, retries included) per token of the
    /// statement: the parser backtracks, and nested failing expressions multiply its work.
    pub max_parse_steps_per_token: usize,
    /// Deepest expression nesting a statement may have (each AND, OR, ||, arithmetic operator,
    /// function call or parenthesis in a chain adds a level).
    pub max_expression_depth: usize,
    /// Most expression nodes in a statement (the plain literals of an IN list are not counted).
    pub max_expression_nodes: usize,
    /// Most items in all of a statement's IN (…) lists together.
    pub max_in_list_items: usize,
    /// Most WHEN branches in one CASE.
    pub max_case_branches: usize,
    /// Most joins in a statement (every JOIN and every extra table in a FROM list).
    pub max_joins: usize,
    /// Deepest nesting of subqueries (CTEs, derived tables, IN/EXISTS/scalar subqueries).
    pub max_subquery_depth: usize,
    /// Most set operations (UNION, INTERSECT, EXCEPT) chained in one query.
    pub max_set_operations: usize,
    /// Most CTEs in one WITH clause.
    pub max_ctes: usize,
    /// Deepest logical plan a statement may make (each CTE, derived table, join, filter,
    /// projection or aggregate over another is a level).
    pub max_plan_depth: usize,
    /// Longest value, in bytes, a literal may be or a growing function (`repeat`, `lpad`,
    /// `concat`, `||`, …) may make; a longer result is NULL.
    pub max_value_bytes: usize,
    /// Most rows a single result may hold.
    pub max_result_rows: usize,
    /// How long a planned statement waits for its DoGet before it is forgotten.
    pub statement_ttl_seconds: u64,
    /// Most bytes (Arrow, in memory) a single result may hold.
    pub max_result_bytes: usize,
    /// Memory all running queries together may reserve (DataFusion memory pool), in bytes.
    pub memory_pool_bytes: usize,
    /// Memory one query may reserve, in bytes: one heavy query cannot starve the others.
    pub query_memory_bytes: usize,
    /// Longest a query may run (planning, execution and disclosure control), in seconds.
    pub query_timeout_seconds: u64,
    /// Queries executing at once; more wait in a queue.
    pub max_concurrent_queries: usize,
    /// Queries one user may have running or queued at once, so one user cannot take every slot.
    pub max_concurrent_queries_per_user: usize,
    /// Queries waiting for a slot; beyond this a query is refused at once.
    pub max_queued_queries: usize,
    /// Longest a query waits in the queue before it is refused, in seconds.
    pub queue_timeout_seconds: u64,
    /// Queries one user may start per minute (a token bucket refilled continuously).
    pub user_queries_per_minute: u32,
    /// At shutdown, how long in-flight calls may take to finish before they are cut off.
    pub shutdown_grace_seconds: u64,
}

/// The largest `limits.max_set_operations` accepted: DataFusion's SQL planner walks a chain of
/// set operations recursively (a test plans a chain this long on a 2 MiB stack).
pub const MAX_SET_OPERATIONS: usize = 200;

/// The largest `limits.max_plan_depth` accepted (a test checks a plan this deep on a 2 MiB stack).
pub const MAX_PLAN_DEPTH: usize = 250;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sql_bytes: 1024 * 1024,
            max_parse_steps_per_token: 4,
            max_expression_depth: 100,
            max_expression_nodes: 10_000,
            max_in_list_items: 100_000,
            max_case_branches: 100,
            max_joins: 16,
            max_subquery_depth: 8,
            max_set_operations: 64,
            max_ctes: 100,
            max_plan_depth: 250,
            max_value_bytes: 8 * 1024,
            max_result_rows: 100_000,
            statement_ttl_seconds: 300,
            max_result_bytes: 64 * 1024 * 1024,
            memory_pool_bytes: 2 * 1024 * 1024 * 1024,
            query_memory_bytes: 512 * 1024 * 1024,
            query_timeout_seconds: 120,
            max_concurrent_queries: 8,
            max_concurrent_queries_per_user: 4,
            max_queued_queries: 64,
            queue_timeout_seconds: 30,
            user_queries_per_minute: 120,
            shutdown_grace_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector endpoint (e.g. `http://otel-collector:4317`) for spans and metrics;
    /// unset, nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute of exported spans and metrics.
    pub service_name: Option<String>,
    /// How often metrics are pushed over OTLP, in seconds (default 30).
    pub metrics_interval_seconds: Option<u64>,
    /// Address of the admin listener serving Prometheus text at `/metrics`; unset (the
    /// default), no second port is opened.
    pub metrics_listen: Option<SocketAddr>,
}

fn default_leeway() -> u64 {
    30
}

impl GatewayConfig {
    /// Reads `path`, applies `SDE_…` overrides from the environment, resolves relative paths
    /// against the file's folder and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base, std::env::vars(), path)
    }

    /// This config with `SDE_…` overrides from `env` applied and validated again (the demo's
    /// config is built in code, not read from a file).
    pub fn with_env(&self, env: impl Iterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        Self::from_toml(&self.to_toml(), Path::new(""), env, Path::new("(demo config)"))
    }

    /// Parses TOML text with the given environment; `base` anchors relative paths.
    pub fn from_toml(
        text: &str,
        base: &Path,
        env: impl Iterator<Item = (String, String)>,
        origin: &Path,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: origin.to_owned(),
            message,
        };
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        apply_env(&mut value, env)?;
        let mut config: GatewayConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.registry.path,
            &mut self.registry.policies,
            &mut self.data.dir,
            &mut self.audit.dir,
            &mut self.audit.signing_key,
            &mut self.disclosure.perturbation_key,
        ]
        .into_iter()
        .chain(self.data.versions.as_mut())
        .chain(self.data.served.as_mut())
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        for path in [
            &mut self.tls.client_ca,
            &mut self.identity.public_key,
            &mut self.identity.jwks_ca,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    /// Writes the config as TOML (paths as given); used by the demo so that
    /// `serve --config .sde-demo/gateway.toml` serves the same world.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Sets `SDE_A__B=value` as key `a.b`. Values are parsed as TOML scalars where they can be
/// (numbers, booleans) and taken as strings otherwise.
fn apply_env(table: &mut toml::Table, env: impl Iterator<Item = (String, String)>) -> Result<(), ConfigError> {
    for (var, raw) in env {
        let Some(path) = var.strip_prefix("SDE_") else { continue };
        let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        let key = keys.join(".");
        let value = parse_scalar(&raw);
        let mut node = &mut *table;
        for section in &keys[..keys.len() - 1] {
            let entry = node
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        key,
                        message: format!("`{section}` is not a section"),
                    });
                }
            };
        }
        node.insert(keys[keys.len() - 1].clone(), value);
    }
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    toml::Value::String(raw.to_owned())
}

#[cfg(test)]
mod tests;
