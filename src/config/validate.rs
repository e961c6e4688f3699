//! Validation of a parsed configuration: every key's value checked, with the key named in
//! the error, before any port is bound. Parsing, overrides and paths stay in [`super`].

use super::*;

impl GatewayConfig {
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
        // Counts are always perturbed, and by less than the threshold, so a released count
        // stays above zero.
        if d.count_noise_max == 0 || d.count_noise_max >= d.floor_threshold {
            return invalid(
                "disclosure.count_noise_max",
                format!("must be at least 1 and below floor_threshold ({})", d.floor_threshold),
            );
        }
        if let Err(e) = crate::disclosure::PTable::new(d.count_noise_max as u32, d.count_noise_variance) {
            return invalid("disclosure.count_noise_variance", e.to_string());
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
    pub(super) fn validate_operations(&self) -> Result<(), ConfigError> {
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
    pub(super) fn validate_identity_keys(&self) -> Result<(), ConfigError> {
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
    pub(super) fn validate_client_auth(&self) -> Result<(), ConfigError> {
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
}
