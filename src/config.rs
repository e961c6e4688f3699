//! Typed configuration: a TOML file, overridden by `SDE_…` environment variables, validated
//! before any port is bound. Every key is documented in `config/gateway.example.toml`.
//!
//! An environment variable names a key by its path in upper case, sections joined by a double
//! underscore: `SDE_LISTEN`, `SDE_DISCLOSURE__THRESHOLD`, `SDE_TLS__CERT`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisclosureConfig {
    /// Fewest distinct people behind a released group or cell.
    pub threshold: u64,
    /// Released counts are rounded to the nearest multiple of this.
    pub rounding: u64,
    /// Sums and means: this many largest contributions are flattened…
    pub flatten_outliers: u64,
    /// …to the mean of the next this many (the top group).
    pub flatten_group: u64,
    /// Noise added to sums and means: its standard deviation in percent of the top group's mean.
    pub noise_percent: u64,
    /// The secret that seeds the noise (64 hex digits), made at first start if missing.
    pub perturbation_key: PathBuf,
    /// No configuration (gateway, dataset or project) may set `threshold` below this.
    pub floor_threshold: u64,
    /// No configuration may set `rounding` below this.
    pub floor_rounding: u64,
    /// Stricter rules for particular datasets, e.g. `[disclosure.datasets.gp_events]` with
    /// `threshold = 20`. A query runs under the strictest rules of the datasets it reads.
    #[serde(default)]
    pub datasets: std::collections::BTreeMap<String, crate::disclosure::Overrides>,
}

impl Default for DisclosureConfig {
    fn default() -> Self {
        Self {
            threshold: 10,
            rounding: 5,
            flatten_outliers: 2,
            flatten_group: 3,
            noise_percent: 50,
            perturbation_key: PathBuf::from("perturbation.key"),
            floor_threshold: 10,
            floor_rounding: 5,
            datasets: Default::default(),
        }
    }
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

    /// Checks every rule a config must meet, naming the key that breaks one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.audit.max_batch == 0 || self.audit.checkpoint_records == 0 || self.audit.checkpoint_seconds == 0 {
            return invalid(
                "audit.max_batch",
                "audit.max_batch, checkpoint_records and checkpoint_seconds must be at least 1".into(),
            );
        }
        if self.audit.delivery_sync_ms > MAX_DELIVERY_SYNC_MS {
            return invalid(
                "audit.delivery_sync_ms",
                format!("must be at most {MAX_DELIVERY_SYNC_MS} (a delivery record is durable within that)"),
            );
        }
        let d = &self.disclosure;
        if d.floor_threshold < 2 {
            return invalid("disclosure.floor_threshold", "must be at least 2".into());
        }
        if d.floor_rounding < 1 {
            return invalid("disclosure.floor_rounding", "must be at least 1".into());
        }
        if d.threshold < d.floor_threshold {
            return invalid(
                "disclosure.threshold",
                format!("{} is below the floor of {}", d.threshold, d.floor_threshold),
            );
        }
        if d.rounding < d.floor_rounding {
            return invalid(
                "disclosure.rounding",
                format!("{} is below the floor of {}", d.rounding, d.floor_rounding),
            );
        }
        for o in d.datasets.values() {
            if o.threshold.is_some_and(|t| t < d.floor_threshold) {
                return invalid(
                    "disclosure.datasets.*.threshold",
                    format!("below the floor of {}", d.floor_threshold),
                );
            }
            if o.rounding.is_some_and(|r| r < d.floor_rounding) {
                return invalid(
                    "disclosure.datasets.*.rounding",
                    format!("below the floor of {}", d.floor_rounding),
                );
            }
        }
        if d.flatten_group == 0 || d.flatten_outliers + d.flatten_group >= d.floor_threshold.max(2) {
            return invalid(
                "disclosure.flatten_group",
                "must be at least 1, and flatten_outliers + flatten_group below floor_threshold".into(),
            );
        }
        if d.noise_percent == 0 || d.noise_percent > 1000 {
            return invalid("disclosure.noise_percent", "must be between 1 and 1000".into());
        }
        if !matches!(self.identity.algorithm.as_str(), "ES256" | "RS256") {
            return invalid("identity.algorithm", "must be ES256 or RS256".into());
        }
        if self.identity.issuer.is_empty() {
            return invalid("identity.issuer", "must not be empty".into());
        }
        if self.identity.audience.is_empty() {
            return invalid("identity.audience", "must not be empty".into());
        }
        if self.limits.max_sql_bytes == 0 {
            return invalid("limits.max_sql_bytes", "must be greater than 0".into());
        }
        if self.limits.max_sql_bytes > 16 * 1024 * 1024 {
            return invalid("limits.max_sql_bytes", "must be at most 16777216 (16 MiB)".into());
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_parse_steps_per_token", l.max_parse_steps_per_token),
            ("limits.max_expression_depth", l.max_expression_depth),
            ("limits.max_expression_nodes", l.max_expression_nodes),
            ("limits.max_case_branches", l.max_case_branches),
            ("limits.max_plan_depth", l.max_plan_depth),
            ("limits.max_value_bytes", l.max_value_bytes),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
        }
        if l.max_set_operations > MAX_SET_OPERATIONS {
            return invalid(
                "limits.max_set_operations",
                format!("must be at most {MAX_SET_OPERATIONS}: the planner's walks of a chain are sized for that"),
            );
        }
        if l.max_plan_depth > MAX_PLAN_DEPTH {
            return invalid(
                "limits.max_plan_depth",
                format!("must be at most {MAX_PLAN_DEPTH}: the gateway's plan walks are sized for that"),
            );
        }
        if l.max_expression_depth > 1000 {
            return invalid(
                "limits.max_expression_depth",
                "must be at most 1000: the engine's walks are sized for that".into(),
            );
        }
        if self.limits.max_result_rows == 0 {
            return invalid("limits.max_result_rows", "must be greater than 0".into());
        }
        self.validate_operations()?;
        self.validate_identity_keys()?;
        self.validate_client_auth()?;
        for (key, path) in [
            ("tls.cert", Some(&self.tls.cert)),
            ("tls.key", Some(&self.tls.key)),
            ("tls.client_ca", self.tls.client_ca.as_ref()),
            ("identity.public_key", self.identity.public_key.as_ref()),
            ("identity.jwks_ca", self.identity.jwks_ca.as_ref()),
        ] {
            if let Some(path) = path.filter(|p| !p.is_file()) {
                return invalid(key, format!("file {} does not exist", path.display()));
            }
        }
        if !self.registry.policies.is_dir() {
            return invalid(
                "registry.policies",
                format!("folder {} does not exist", self.registry.policies.display()),
            );
        }
        if self.registry.training_months == 0 {
            return invalid("registry.training_months", "must be at least 1".into());
        }
        if !self.data.dir.is_dir() {
            return invalid("data.dir", format!("folder {} does not exist", self.data.dir.display()));
        }
        if let Some(versions) = self.data.versions.as_ref().filter(|v| !v.is_dir()) {
            return invalid("data.versions", format!("folder {} does not exist", versions.display()));
        }
        Ok(())
    }

    /// Limits and telemetry: every bound positive, the per-query memory within the pool, the
    /// metrics port distinct from the gRPC port, the OTLP endpoint a URL.
    fn validate_operations(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_result_bytes", l.max_result_bytes as u64),
            ("limits.memory_pool_bytes", l.memory_pool_bytes as u64),
            ("limits.query_memory_bytes", l.query_memory_bytes as u64),
            ("limits.query_timeout_seconds", l.query_timeout_seconds),
            ("limits.max_concurrent_queries", l.max_concurrent_queries as u64),
            (
                "limits.max_concurrent_queries_per_user",
                l.max_concurrent_queries_per_user as u64,
            ),
            ("limits.queue_timeout_seconds", l.queue_timeout_seconds),
            ("limits.user_queries_per_minute", u64::from(l.user_queries_per_minute)),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
        }
        if l.query_memory_bytes > l.memory_pool_bytes {
            return invalid(
                "limits.query_memory_bytes",
                format!(
                    "{} is more than the whole pool (limits.memory_pool_bytes = {})",
                    l.query_memory_bytes, l.memory_pool_bytes
                ),
            );
        }
        let t = &self.telemetry;
        if let Some(endpoint) = &t.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL such as http://otel-collector:4317".into(),
            );
        }
        if t.metrics_interval_seconds == Some(0) {
            return invalid("telemetry.metrics_interval_seconds", "must be greater than 0".into());
        }
        if let Some(addr) = t.metrics_listen
            && addr.port() != 0
            && addr.port() == self.listen.port()
        {
            return invalid(
                "telemetry.metrics_listen",
                format!("port {} is the gRPC port (`listen`); choose another", addr.port()),
            );
        }
        Ok(())
    }

    /// Tokens are checked with exactly one of a static key and a JWKS URL; the URL is https,
    /// or http to a loopback host (tests, a provider on the same machine).
    fn validate_identity_keys(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        let id = &self.identity;
        let Some(url) = &id.jwks_url else {
            if id.public_key.is_none() {
                return invalid("identity.public_key", "set it, or identity.jwks_url");
            }
            if id.jwks_ca.is_some() {
                return invalid("identity.jwks_ca", "is only used with identity.jwks_url");
            }
            return Ok(());
        };
        if id.public_key.is_some() {
            return invalid(
                "identity.jwks_url",
                "set either identity.public_key or identity.jwks_url, not both",
            );
        }
        let Ok(uri) = url.parse::<http::Uri>() else {
            return invalid("identity.jwks_url", "is not a URL");
        };
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        match uri.scheme_str() {
            _ if host.is_empty() => return invalid("identity.jwks_url", "names no host"),
            Some("https") => {}
            Some("http") if loopback => {}
            _ => {
                return invalid(
                    "identity.jwks_url",
                    "must be https:// (http:// only for a loopback host)",
                );
            }
        }
        if id.jwks_cache_seconds == 0 {
            return invalid("identity.jwks_cache_seconds", "must be at least 1");
        }
        Ok(())
    }

    /// A client CA is needed exactly when client certificates are asked for.
    fn validate_client_auth(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        match (self.tls.client_auth, &self.tls.client_ca) {
            (ClientAuth::Off, Some(_)) => invalid(
                "tls.client_auth",
                "is \"off\" but tls.client_ca is set; set it to \"optional\" or \"required\", or remove tls.client_ca",
            ),
            (ClientAuth::Optional | ClientAuth::Required, None) => invalid(
                "tls.client_ca",
                "must name the CA of approved client tools when tls.client_auth is on",
            ),
            _ => Ok(()),
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
mod tests {
    use super::*;

    fn sample(dir: &Path) -> String {
        for f in ["cert.pem", "key.pem", "jwt.pub"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        r#"
listen = "127.0.0.1:0"
[tls]
cert = "cert.pem"
key = "key.pem"
[identity]
issuer = "iss"
audience = "aud"
algorithm = "ES256"
public_key = "jwt.pub"
[registry]
path = "registry.db"
[data]
dir = "data"
[audit]
dir = "audit"
signing_key = "audit.key"
"#
        .to_owned()
    }

    #[test]
    fn env_overrides_and_floor_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path());
        let env = vec![("SDE_DISCLOSURE__THRESHOLD".to_owned(), "25".to_owned())];
        let c = GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t")).unwrap();
        assert_eq!(c.disclosure.threshold, 25);
        assert_eq!(c.tls.cert, dir.path().join("cert.pem"));

        let env = vec![("SDE_DISCLOSURE__THRESHOLD".to_owned(), "3".to_owned())];
        let err = GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("disclosure.threshold"), "{err}");
    }

    #[test]
    fn the_example_config_parses_with_every_documented_key() {
        let text = include_str!("../config/gateway.example.toml");
        let config: GatewayConfig = toml::from_str(text).expect("example config parses");
        assert_eq!(config.disclosure.threshold, 10);
        // Uncommenting the dataset example must parse too.
        let text = text.replace(
            "# [disclosure.datasets.gp_events]\n# threshold = 20",
            "[disclosure.datasets.gp_events]\nthreshold = 20",
        );
        let config: GatewayConfig = toml::from_str(&text).expect("dataset overrides parse");
        assert_eq!(config.disclosure.datasets["gp_events"].threshold, Some(20));
        // And the served copies' order.
        let text = text.replace(
            "# patients = [\"district\", \"age\"]",
            "patients = [\"district\", \"age\"]",
        );
        let config: GatewayConfig = toml::from_str(&text).expect("served order parses");
        assert_eq!(config.data.served_sort_by["patients"], ["district", "age"]);
        // And the telemetry examples.
        let text = text
            .replace("# otlp_endpoint", "otlp_endpoint")
            .replace("# service_name", "service_name")
            .replace("# metrics_interval_seconds", "metrics_interval_seconds")
            .replace("# metrics_listen", "metrics_listen");
        let config: GatewayConfig = toml::from_str(&text).expect("telemetry keys parse");
        assert_eq!(config.telemetry.metrics_interval_seconds, Some(30));
        assert_eq!(
            config.limits,
            crate::config::LimitsConfig::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn operations_keys_are_validated_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path());
        let load = |var: &str, value: &str| {
            let env = vec![(var.to_owned(), value.to_owned())];
            GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t"))
        };
        let c = load("SDE_TELEMETRY__METRICS_LISTEN", "127.0.0.1:9464").unwrap();
        assert_eq!(c.telemetry.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            c.with_env(std::iter::empty()).unwrap().telemetry.metrics_listen,
            c.telemetry.metrics_listen
        );
        for (var, value, key) in [
            (
                "SDE_LIMITS__QUERY_MEMORY_BYTES",
                "99999999999999",
                "limits.query_memory_bytes",
            ),
            ("SDE_LIMITS__MEMORY_POOL_BYTES", "0", "limits.memory_pool_bytes"),
            (
                "SDE_LIMITS__USER_QUERIES_PER_MINUTE",
                "0",
                "limits.user_queries_per_minute",
            ),
            (
                "SDE_TELEMETRY__OTLP_ENDPOINT",
                "collector:4317",
                "telemetry.otlp_endpoint",
            ),
            (
                "SDE_TELEMETRY__METRICS_INTERVAL_SECONDS",
                "0",
                "telemetry.metrics_interval_seconds",
            ),
            ("SDE_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0x", "metrics_listen"),
        ] {
            let err = load(var, value).unwrap_err().to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
        let text = text.replace("127.0.0.1:0", "127.0.0.1:50051");
        let env = vec![("SDE_TELEMETRY__METRICS_LISTEN".to_owned(), "0.0.0.0:50051".to_owned())];
        let err = GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("telemetry.metrics_listen"), "{err}");
    }

    #[test]
    fn the_versions_folder_is_optional_resolved_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path());
        let c = GatewayConfig::from_toml(&text, dir.path(), std::iter::empty(), Path::new("t")).unwrap();
        assert_eq!(c.data.versions, None);
        let env = || vec![("SDE_DATA__VERSIONS".to_owned(), "versions".to_owned())].into_iter();
        let err = GatewayConfig::from_toml(&text, dir.path(), env(), Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("data.versions"), "{err}");
        std::fs::create_dir_all(dir.path().join("versions")).unwrap();
        let c = GatewayConfig::from_toml(&text, dir.path(), env(), Path::new("t")).unwrap();
        assert_eq!(c.data.versions, Some(dir.path().join("versions")));
    }

    #[test]
    fn the_example_config_parses_with_identity_providers_and_mtls() {
        let text = include_str!("../config/gateway.example.toml");
        // So must the JWKS and mutual-TLS examples.
        let text = text
            .replace("public_key = ", "# public_key = ")
            .replace("# jwks_url = ", "jwks_url = ")
            .replace("# jwks_ca = ", "jwks_ca = ")
            .replace("client_auth = \"off\"", "client_auth = \"required\"")
            .replace("# client_ca = ", "client_ca = ");
        let config: GatewayConfig = toml::from_str(&text).expect("JWKS and mTLS examples parse");
        assert!(config.identity.public_key.is_none() && config.identity.jwks_url.is_some());
        assert!(config.identity.jwks_ca.is_some() && config.tls.client_ca.is_some());
        assert_eq!(config.tls.client_auth, ClientAuth::Required);
    }

    fn load(text: &str, dir: &Path) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::from_toml(text, dir, std::iter::empty(), Path::new("t"))
    }

    #[test]
    fn exactly_one_of_a_static_key_and_a_jwks_url_and_only_https_or_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path());
        let without_key = text.replace("public_key = \"jwt.pub\"", "");
        let err = load(&without_key, dir.path()).unwrap_err();
        assert!(err.to_string().contains("identity.public_key"), "{err}");

        let env = |url: &str| vec![("SDE_IDENTITY__JWKS_URL".to_owned(), url.to_owned())].into_iter();
        let c = GatewayConfig::from_toml(
            &without_key,
            dir.path(),
            env("https://login.example.org/jwks"),
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.identity.jwks_url.as_deref(), Some("https://login.example.org/jwks"));
        assert_eq!(
            (c.identity.jwks_min_refresh_seconds, c.identity.jwks_cache_seconds),
            (60, 600)
        );
        for url in [
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/jwks",
        ] {
            GatewayConfig::from_toml(&without_key, dir.path(), env(url), Path::new("t")).unwrap();
        }
        for url in [
            "http://login.example.org/jwks",
            "ftp://x/jwks",
            "not a url",
            "https:///jwks",
        ] {
            let err = GatewayConfig::from_toml(&without_key, dir.path(), env(url), Path::new("t")).unwrap_err();
            assert!(err.to_string().contains("identity.jwks_url"), "{url}: {err}");
        }
        let both = GatewayConfig::from_toml(&text, dir.path(), env("https://x.org/jwks"), Path::new("t")).unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        let ca_without_url = text.replace("[registry]", "jwks_ca = \"jwt.pub\"\n[registry]");
        let err = load(&ca_without_url, dir.path()).unwrap_err();
        assert!(err.to_string().contains("identity.jwks_ca"), "{err}");
    }

    #[test]
    fn client_auth_needs_a_client_ca_and_a_client_ca_needs_client_auth() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path());
        assert_eq!(load(&text, dir.path()).unwrap().tls.client_auth, ClientAuth::Off);
        let with = |extra: &str| text.replace("[identity]", &format!("{extra}\n[identity]"));
        for mode in ["optional", "required"] {
            let err = load(&with(&format!("client_auth = \"{mode}\"")), dir.path()).unwrap_err();
            assert!(err.to_string().contains("tls.client_ca"), "{err}");
        }
        let c = load(
            &with("client_ca = \"cert.pem\"\nclient_auth = \"required\""),
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.tls.client_auth, ClientAuth::Required);
        assert_eq!(c.tls.client_ca, Some(dir.path().join("cert.pem")));
        let err = load(&with("client_ca = \"cert.pem\""), dir.path()).unwrap_err();
        assert!(err.to_string().contains("tls.client_auth"), "{err}");
        let err = load(
            &with("client_ca = \"missing.pem\"\nclient_auth = \"optional\""),
            dir.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("tls.client_ca"), "{err}");
        let err = load(&with("client_auth = \"sometimes\""), dir.path()).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_algorithms_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path()).replace("ES256", "none");
        let err = GatewayConfig::from_toml(&text, dir.path(), std::iter::empty(), Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("identity.algorithm"), "{err}");
        let text = sample(dir.path()) + "\nbogus = 1\n";
        let err = GatewayConfig::from_toml(&text, dir.path(), std::iter::empty(), Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
