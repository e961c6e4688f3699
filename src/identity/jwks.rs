//! Token verification keys published by an OIDC identity provider at its JWKS URL.
//!
//! Guarantees:
//! - a key is used only if it names a `kid`, is meant for signatures, and fits the one pinned
//!   algorithm (its `alg`, when given, must be that algorithm, and its key type must fit it);
//!   every other key in the set is ignored;
//! - the set is cached; a token whose `kid` is not in the cache, or a cache older than
//!   `jwks_cache_seconds`, causes one fetch, which the verification waits for;
//! - fetches are single-flight and at least `jwks_min_refresh_seconds` apart (measured on the
//!   injected clock), so tokens with made-up `kid`s cannot make the gateway flood the provider;
//! - a cache past its age is never used: if it cannot be refreshed, tokens are refused (fail
//!   closed) until it can;
//! - HTTPS is required except for loopback hosts (checked by the config), answers are capped in
//!   size and time, and redirects are not followed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::IdentityError;
use crate::clock::SharedClock;

/// Longest a fetch of the key set may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest key set accepted, in bytes.
const MAX_BODY: usize = 256 * 1024;

/// The keys of one fetch, by `kid`.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched: Option<DateTime<Utc>>,
}

/// A cached, rate-limited view of an identity provider's key set.
pub struct Jwks {
    url: hyper::Uri,
    /// Client TLS for an `https` URL.
    tls: Option<Arc<rustls::ClientConfig>>,
    algorithm: Algorithm,
    min_refresh: chrono::Duration,
    max_age: chrono::Duration,
    clock: SharedClock,
    current: RwLock<Arc<KeySet>>,
    /// Held while fetching (single flight); holds the time of the last attempt.
    refresh: tokio::sync::Mutex<Option<DateTime<Utc>>>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Jwks {
    /// `ca_pem`, if given, is the only trust anchor for an `https` URL; otherwise the public
    /// web roots are used.
    pub fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        algorithm: Algorithm,
        min_refresh_secs: u64,
        max_age_secs: u64,
        clock: SharedClock,
    ) -> Result<Self, IdentityError> {
        let bad = |message: String| IdentityError::Jwks(format!("identity.jwks_url {url}: {message}"));
        let url: hyper::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        if url.host().is_none() {
            return Err(bad("has no host".into()));
        }
        let tls = match url.scheme_str() {
            Some("https") => Some(Arc::new(client_tls(ca_pem).map_err(bad)?)),
            Some("http") => None,
            _ => return Err(bad("must be an https:// URL".into())),
        };
        Ok(Self {
            url,
            tls,
            algorithm,
            min_refresh: chrono::Duration::seconds(min_refresh_secs as i64),
            max_age: chrono::Duration::seconds(max_age_secs as i64),
            clock,
            current: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        })
    }

    /// How many times the key set has been fetched (successfully or not).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().expect("jwks lock"))
    }

    fn usable(&self, set: &KeySet, kid: &str, now: DateTime<Utc>) -> Option<Arc<DecodingKey>> {
        let fresh = set.fetched.is_some_and(|at| now - at < self.max_age);
        fresh.then(|| set.keys.get(kid).cloned()).flatten()
    }

    /// The key named `kid`, fetching the set at most once if it is unknown or the cache is old.
    pub async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, IdentityError> {
        if let Some(key) = self.usable(&self.current(), kid, self.clock.now()) {
            return Ok(key);
        }
        let mut last_attempt = self.refresh.lock().await;
        // Another call may have fetched while this one waited.
        let now = self.clock.now();
        if let Some(key) = self.usable(&self.current(), kid, now) {
            return Ok(key);
        }
        if last_attempt.is_none_or(|at| now - at >= self.min_refresh) {
            *last_attempt = Some(now);
            self.fetch_now(now).await;
        }
        let set = self.current();
        if let Some(key) = self.usable(&set, kid, now) {
            return Ok(key);
        }
        if set.fetched.is_none_or(|at| now - at >= self.max_age) {
            return Err(IdentityError::KeysUnavailable);
        }
        Err(IdentityError::Invalid(
            "the token is signed with a key the identity provider does not publish".into(),
        ))
    }

    /// Fetches the key set once (at start-up, so a wrong URL shows in the log at once).
    pub async fn warm(&self) {
        let mut last_attempt = self.refresh.lock().await;
        let now = self.clock.now();
        *last_attempt = Some(now);
        self.fetch_now(now).await;
    }

    async fn fetch_now(&self, now: DateTime<Utc>) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, get(&self.url, self.tls.clone())).await {
            Ok(Ok(body)) => parse(&body, self.algorithm),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {} s", FETCH_TIMEOUT.as_secs())),
        };
        match fetched {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "identity provider keys fetched");
                *self.current.write().expect("jwks lock") = Arc::new(KeySet {
                    keys,
                    fetched: Some(now),
                });
            }
            Err(e) => tracing::warn!(url = %self.url, error = %e, "cannot fetch identity provider keys"),
        }
    }
}

/// The keys of a JWKS document that fit `algorithm`, by `kid`. Keys that cannot be read are
/// skipped, so one odd key does not take the others down.
fn parse(body: &[u8], algorithm: Algorithm) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        if !fits(&jwk, algorithm) {
            continue;
        }
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            keys.insert(kid, Arc::new(key));
        }
    }
    Ok(keys)
}

/// Whether a key may verify signatures made with the pinned algorithm.
fn fits(jwk: &Jwk, algorithm: Algorithm) -> bool {
    let pinned = match algorithm {
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::RS256 => KeyAlgorithm::RS256,
        _ => return false,
    };
    let for_signing = matches!(jwk.common.public_key_use, None | Some(PublicKeyUse::Signature));
    let alg_matches = jwk.common.key_algorithm.is_none_or(|a| a == pinned);
    let type_matches = match (&jwk.algorithm, algorithm) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        _ => false,
    };
    for_signing && alg_matches && type_matches
}

fn client_tls(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("identity.jwks_ca is not PEM: {e}"))?;
                roots.add(cert).map_err(|e| format!("identity.jwks_ca: {e}"))?;
            }
            if roots.is_empty() {
                return Err("identity.jwks_ca holds no certificate".into());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One HTTP/1.1 GET; the body if the answer is 200.
async fn get(url: &hyper::Uri, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Bytes, String> {
    let host = url.host().unwrap_or_default();
    let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = url.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let request = hyper::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, url.authority().map_or(host, |a| a.as_str()))
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    match tls {
        None => send(hyper_util::rt::TokioIo::new(tcp), request).await,
        Some(config) => {
            let name = ServerName::try_from(bare_host).map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(hyper_util::rt::TokioIo::new(stream), request).await
        }
    }
}

async fn send<IO>(io: IO, request: hyper::Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let result = if response.status() != http::StatusCode::OK {
        Err(format!("answered {}", response.status()))
    } else {
        Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|e| format!("reading the answer: {e}"))
    };
    connection.abort();
    result
}

#[cfg(test)]
mod tests;
