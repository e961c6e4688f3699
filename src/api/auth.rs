//! The authentication layer, a tower service in front of the Flight SQL and admin services.
//! For every request it verifies the bearer token (asynchronously: a token signed with a new
//! identity-provider key may need one JWKS fetch) and names the client tool from the mutual-TLS
//! certificate, and records both in the request's extensions. It never rejects by itself, so
//! that refusals are audited by the service with the rest of the call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::identity::client_tool::{self, ClientTool};
use crate::identity::{Authenticated, IdentityError, TokenVerifier};
use crate::telemetry::Metrics;
use tracing::Instrument;

/// Wraps a gRPC service with authentication.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    verifier: Arc<TokenVerifier>,
    /// With `tls.client_auth = "required"`, a certificate that names no tool refuses the call.
    require_tool: bool,
    metrics: Metrics,
}

impl<S> Authenticate<S> {
    pub fn new(inner: S, verifier: Arc<TokenVerifier>, require_tool: bool, metrics: Metrics) -> Self {
        Self {
            inner,
            verifier,
            require_tool,
            metrics,
        }
    }
}

impl<S: NamedService> NamedService for Authenticate<S> {
    const NAME: &'static str = S::NAME;
}

/// The tool named by the client certificate of the connection, if one was presented.
fn tool_of<B>(request: &http::Request<B>) -> Option<String> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())?;
    client_tool::name_from_der(certs.first()?)
}

impl<S> tower_service::Service<http::Request<Body>> for Authenticate<S>
where
    S: tower_service::Service<http::Request<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = Arc::clone(&self.verifier);
        let require_tool = self.require_tool;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let span = tracing::info_span!("step", otel.name = "authenticate", step = "authenticate");
            let tool = tool_of(&request);
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().map_err(|_| ()));
            let outcome = async {
                match header {
                    _ if require_tool && tool.is_none() => Err(IdentityError::UnnamedTool),
                    None => verifier.verify_header(None).await,
                    Some(Err(())) => Err(IdentityError::Malformed),
                    Some(Ok(value)) => verifier.verify_header(Some(value)).await,
                }
            }
            .instrument(span)
            .await;
            metrics.step("authenticate", started.elapsed());
            request.extensions_mut().insert(Authenticated(outcome));
            request.extensions_mut().insert(ClientTool(tool));
            inner.call(request).await
        })
    }
}
