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

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
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
}

/// A bound, ready-to-serve gateway.
pub struct Gateway {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: ServerTlsConfig,
    core: Arc<Core>,
    verifier: Arc<TokenVerifier>,
    client_auth: ClientAuth,
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
        let key = read("TLS key", &config.tls.key)?;
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
        let engine = Engine::open(&config.data.dir, &config.data.identifiers)
            .await
            .map_err(crate::Error::from)?;
        let audit = AuditLog::open(&config.audit.dir).map_err(crate::Error::from)?;
        let core = Arc::new(Core::new(
            clock,
            registry,
            engine,
            audit,
            &config.disclosure,
            config.limits.clone(),
        ));
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
        Ok(Self {
            listener,
            local_addr,
            tls,
            core,
            verifier,
            client_auth: config.tls.client_auth,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn core(&self) -> Arc<Core> {
        Arc::clone(&self.core)
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let require_tool = self.client_auth == ClientAuth::Required;
        let flight = Authenticate::new(
            FlightServiceServer::new(FlightSqlApi::new(Arc::clone(&self.core)))
                .max_decoding_message_size(16 * 1024 * 1024),
            Arc::clone(&self.verifier),
            require_tool,
        );
        let admin = Authenticate::new(
            AdminServiceServer::new(AdminApi::new(Arc::clone(&self.core))),
            Arc::clone(&self.verifier),
            require_tool,
        );
        // gRPC health for probes: SERVING while up, NOT_SERVING once shutdown begins. It says
        // nothing but that, so it needs no token and is not audited.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<FlightServiceServer<FlightSqlApi>>().await;
        let shutdown = async move {
            shutdown.await;
            health.set_not_serving::<FlightServiceServer<FlightSqlApi>>().await;
        };
        // Reflection lists the sde.v1 services, so `grpcurl` can call them without the .proto files.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        tracing::info!(addr = %self.local_addr, client_auth = ?self.client_auth, "sde-gateway serving Flight SQL over TLS");
        Server::builder()
            .tls_config(self.tls)
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .add_service(health_service)
            .add_service(reflection)
            .add_service(flight)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}
