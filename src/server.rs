//! Builds and runs the gateway: loads keys, registry, data and audit log from config, binds the
//! port, and serves Flight SQL over TLS with the authentication layer in front.
//!
//! Building is separate from serving: [`Gateway::build`] binds and returns, [`Gateway::local_addr`]
//! tells the port, [`Gateway::run`] serves until the shutdown future completes. `main` and the
//! integration tests use the same path.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::proto::admin_service_server::AdminServiceServer;
use crate::api::{self, admin::AdminApi, auth::Authenticate, flight_sql::FlightSqlApi};
use crate::audit::AuditLog;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{ClientAuth, GatewayConfig};
use crate::engine::Engine;
use crate::gateway::Core;
use crate::identity::TokenVerifier;
use crate::registry::Registry;
use crate::registry::rules::RuleSet;
use crate::telemetry::{RequestSpanLayer, Telemetry, TelemetryError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{what} {path} may be read by others (mode {mode:o}); make it readable by its owner only: chmod 600 {path}"
    )]
    Exposed {
        what: &'static str,
        path: String,
        mode: u32,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("TLS configuration is invalid: {0}")]
    Tls(String),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(String),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Gateway(#[from] crate::Error),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// A bound, ready-to-serve gateway.
pub struct Gateway {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: ServerTlsConfig,
    core: Arc<Core>,
    verifier: Arc<TokenVerifier>,
    telemetry: Telemetry,
    metrics_listener: Option<(TcpListener, SocketAddr)>,
    shutdown_grace: std::time::Duration,
    client_auth: ClientAuth,
    /// Results' strings as plain `Utf8` (`data.string_view = false`).
    plain_strings: bool,
}

/// Refuses a secret file (a private key) that the file's group or others may read: whoever can
/// read it can sign audit checkpoints, impersonate the server or undo the noise.
pub(crate) fn owner_only(what: &'static str, path: &std::path::Path) -> Result<(), ServerError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ServerError::Exposed {
                    what,
                    path: path.display().to_string(),
                    mode,
                });
            }
        }
    }
    Ok(())
}

/// Reads a secret file, refusing it where others may read it ([`owner_only`]).
fn read_secret(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    owner_only(what, path)?;
    read(what, path)
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl Gateway {
    /// Opens everything the config names and binds the listen address.
    pub async fn build(config: &GatewayConfig) -> Result<Self, ServerError> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: &GatewayConfig, clock: SharedClock) -> Result<Self, ServerError> {
        // One crypto provider for the whole process (aws-lc-rs); a second install is harmless.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let cert = read("TLS certificate", &config.tls.cert)?;
        let key = read_secret("TLS key", &config.tls.key)?;
        owner_only("audit signing key", &config.audit.signing_key)?;
        owner_only("perturbation key", &config.disclosure.perturbation_key)?;
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &config.tls.client_ca {
            let ca = Certificate::from_pem(read("TLS client CA", ca)?);
            tls = tls
                .client_ca_root(ca)
                .client_auth_optional(config.tls.client_auth != ClientAuth::Required);
        }
        let verifier =
            Arc::new(TokenVerifier::from_config(&config.identity, Arc::clone(&clock)).map_err(crate::Error::from)?);
        if let Some(jwks) = verifier.jwks() {
            jwks.warm().await;
        }
        let rules = RuleSet::load(&config.registry.policies)
            .map_err(|e| crate::Error::from(crate::registry::RegistryError::from(e)))?;
        tracing::info!(rules = %rules.hash(), "access rules loaded");
        let registry = Registry::open(&config.registry.path, rules, config.registry.training_months)
            .map_err(crate::Error::from)?;
        let mut engine = Engine::open_with_versions(
            &config.data.dir,
            config.data.versions.as_deref(),
            &config.data.identifiers,
        )
        .await
        .map_err(crate::Error::from)?
        .with_max_value_bytes(config.limits.max_value_bytes)
        .with_perturbation_key(
            crate::disclosure::PerturbationKey::load_or_create(&config.disclosure.perturbation_key).map_err(
                |source| ServerError::Read {
                    what: "perturbation key",
                    path: config.disclosure.perturbation_key.display().to_string(),
                    source,
                },
            )?,
        );
        if let Some(served) = &config.data.served {
            engine = engine
                .serve_from(served, &config.data.served_sort_by)
                .await
                .map_err(crate::Error::from)?;
            tokio::spawn(engine.keep_served_copies());
        }
        let audit = crate::audit::SigningKey::load(&config.audit.signing_key)
            .and_then(|key| AuditLog::open_with(&config.audit.dir, key, (&config.audit).into()))
            .map_err(crate::Error::from)?;
        let telemetry = Telemetry::new(&config.telemetry)?;
        telemetry.install();
        let core = Arc::new(
            Core::new(
                clock,
                registry,
                engine,
                audit,
                &config.disclosure,
                config.limits.clone(),
            )
            .with_metrics(telemetry.metrics().clone()),
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics_listener = telemetry.bind_metrics().await?;
        Ok(Self {
            listener,
            local_addr,
            tls,
            core,
            verifier,
            telemetry,
            metrics_listener,
            shutdown_grace: std::time::Duration::from_secs(config.limits.shutdown_grace_seconds),
            client_auth: config.tls.client_auth,
            plain_strings: !config.data.string_view,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn core(&self) -> Arc<Core> {
        Arc::clone(&self.core)
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Where Prometheus text is served (`telemetry.metrics_listen`), if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight calls finish
    /// within `limits.shutdown_grace_seconds`, closes the audit log (flushed, checkpointed) and
    /// flushes telemetry.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let require_tool = self.client_auth == ClientAuth::Required;
        let metrics = self.core.metrics.clone();
        let audit_service = Authenticate::new(
            api::proto::audit_service_server::AuditServiceServer::new(api::audit::AuditApi::new(Arc::clone(
                &self.core,
            ))),
            Arc::clone(&self.verifier),
            require_tool,
            metrics.clone(),
        );
        let flight = Authenticate::new(
            FlightServiceServer::new(api::poll::Polled::new(
                FlightSqlApi::new(Arc::clone(&self.core)).with_plain_strings(self.plain_strings),
                std::time::Duration::from_secs(self.core.limits.statement_ttl_seconds),
            ))
            .max_decoding_message_size(16 * 1024 * 1024),
            Arc::clone(&self.verifier),
            require_tool,
            metrics.clone(),
        );
        let admin = Authenticate::new(
            AdminServiceServer::new(AdminApi::new(Arc::clone(&self.core))),
            Arc::clone(&self.verifier),
            require_tool,
            metrics.clone(),
        );
        let review = Authenticate::new(
            api::proto::review_service_server::ReviewServiceServer::new(api::review::ReviewApi::new(Arc::clone(
                &self.core,
            )))
            .max_encoding_message_size(64 * 1024 * 1024),
            Arc::clone(&self.verifier),
            require_tool,
            metrics,
        );
        // gRPC health for probes: SERVING while up, NOT_SERVING once shutdown begins. It says
        // nothing but that, so it needs no token and is not audited.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<FlightServiceServer<api::poll::Polled>>().await;
        let (began, shutdown_began) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutdown: no new calls; in-flight calls may finish");
            health.set_not_serving::<FlightServiceServer<api::poll::Polled>>().await;
            let _ = began.send(true);
        };
        // Reflection lists the sde.v1 services, so `grpcurl` can call them without the .proto
        // files: `grpc.reflection.v1`, and `v1alpha` for older grpcurl and Postman.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(api::proto::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let reflection = reflection()
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        if let Some((listener, addr)) = self.metrics_listener {
            let telemetry = self.telemetry.clone();
            let mut stop = shutdown_began.clone();
            tracing::info!(%addr, "Prometheus metrics on /metrics");
            tokio::spawn(async move {
                let stop = async move {
                    let _ = stop.wait_for(|b| *b).await;
                };
                if let Err(e) = telemetry.serve_metrics(listener, stop).await {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            });
        }
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        tracing::info!(addr = %self.local_addr, client_auth = ?self.client_auth, "sde-gateway serving Flight SQL over TLS");
        let serve = Server::builder()
            .layer(RequestSpanLayer)
            .tls_config(self.tls)
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(flight)
            .add_service(admin)
            .add_service(review)
            .add_service(audit_service)
            .serve_with_incoming_shutdown(incoming, shutdown);
        let outcome = drain(serve, shutdown_began, self.shutdown_grace).await;
        if self.core.limiter.calls() > 0 {
            // Grace is over: stop what still runs, and let each call write its audit record.
            self.core.limiter.cut_off();
            let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while self.core.limiter.calls() > 0 && tokio::time::Instant::now() < give_up {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        // Nothing more will be appended: make the log durable and checkpoint it.
        if let Err(e) = self.core.audit.close().await {
            tracing::error!(error = %e, "cannot close the audit log");
        }
        let telemetry = self.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        tracing::info!("shutdown complete");
        outcome
    }
}

/// Runs the server; once shutdown has begun, gives in-flight calls `grace` to finish.
async fn drain(
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    mut began: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) -> Result<(), ServerError> {
    tokio::pin!(serve);
    tokio::select! {
        outcome = &mut serve => return Ok(outcome?),
        _ = began.wait_for(|b| *b) => {}
    }
    match tokio::time::timeout(grace, serve).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "shutdown: grace period over; cutting off in-flight calls"
            );
            Ok(())
        }
    }
}
