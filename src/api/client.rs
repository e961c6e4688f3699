//! What the command-line clients (`admin`, `release`, `review`, `audit show|replay`, `health`)
//! share: a TLS channel to the gateway that trusts one CA (presenting a client certificate where
//! the gateway requires mutual TLS), and the caller's bearer token on every request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A client certificate and its key (PEM), presented where the gateway requires mutual TLS
/// (`tls.client_auth`): its subject CN names the approved tool.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientCert {
    /// Client certificate (PEM) to present for mutual TLS.
    #[arg(long, requires = "client_key", global = true)]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert", global = true)]
    pub client_key: Option<PathBuf>,
}

/// Connects to `url` (`https://host:port`) over TLS, trusting only the CA in `ca` and checking
/// the server certificate against `domain`. With `timeout`, connecting and each call are bounded.
pub async fn tls_channel(
    url: &str,
    ca: &Path,
    domain: &str,
    timeout: Option<Duration>,
    client: &ClientCert,
) -> anyhow::Result<Channel> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // An address without its scheme (`host:port`, as people type it) is reached over TLS too.
    let url = match url.starts_with("https://") {
        true => url.to_owned(),
        false => format!("https://{url}"),
    };
    let ca_pem = std::fs::read(ca).with_context(|| format!("reading CA certificate {}", ca.display()))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let (Some(cert), Some(key)) = (&client.client_cert, &client.client_key) {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    let mut endpoint = Endpoint::from_shared(url.clone())?.tls_config(tls)?;
    if let Some(t) = timeout {
        endpoint = endpoint.connect_timeout(t).timeout(t);
    }
    endpoint.connect().await.with_context(|| format!("connecting to {url}"))
}

/// Adds `authorization: Bearer <token>` to every request (or nothing, for an anonymous caller).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn token(token: &str) -> anyhow::Result<Self> {
        let header = format!("Bearer {}", token.trim())
            .parse()
            .context("the token is not a valid header value")?;
        Ok(Self(Some(header)))
    }

    /// The token held in `path`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(path).with_context(|| format!("reading token {}", path.display()))?;
        Self::token(&token)
    }

    pub fn anonymous() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.0 {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}
