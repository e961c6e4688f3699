//! The JWKS cache against a real HTTP server started in the test, on the injected clock.

use std::convert::Infallible;
use std::sync::Mutex;

use base64::Engine;
use chrono::TimeZone;
use http_body_util::Full;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::config::IdentityConfig;
use crate::identity::{TokenIssuer, TokenVerifier};

const MIN_REFRESH: i64 = 60;
const CACHE: i64 = 600;

/// A JWKS endpoint on 127.0.0.1:0 whose answer the test can change, counting requests.
#[derive(Clone)]
pub(crate) struct JwksServer {
    pub url: String,
    answer: Arc<Mutex<(u16, String)>>,
    pub hits: Arc<AtomicU64>,
}

impl JwksServer {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Over TLS with `acceptor` (https://), or plain http.
    pub async fn start_with(acceptor: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        let server = Self {
            url,
            answer: Arc::new(Mutex::new((200, r#"{"keys":[]}"#.into()))),
            hits: Arc::new(AtomicU64::new(0)),
        };
        let (answer, hits) = (Arc::clone(&server.answer), Arc::clone(&server.hits));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, hits) = (Arc::clone(&answer), Arc::clone(&hits));
                let service = hyper::service::service_fn(move |_request| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = answer.lock().unwrap().clone();
                    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                            }
                        }
                    }
                });
            }
        });
        server
    }

    pub fn publish(&self, keys: &[serde_json::Value]) {
        *self.answer.lock().unwrap() = (200, serde_json::json!({ "keys": keys }).to_string());
    }

    pub fn fail(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.into());
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An ES256 signing key and its public JWK.
pub(crate) struct SigningKey {
    pub kid: String,
    pub key: KeyPair,
}

impl SigningKey {
    pub fn new(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    pub fn jwk(&self) -> serde_json::Value {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let point = self.key.public_key_raw();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
        })
    }

    pub fn issuer(&self) -> TokenIssuer {
        TokenIssuer::new(self.key.serialize_pem().as_bytes(), "ES256", "iss", "aud")
            .unwrap()
            .with_key_id(&self.kid)
    }
}

struct Setup {
    server: JwksServer,
    verifier: TokenVerifier,
    clock: ManualClock,
}

impl Setup {
    async fn new() -> Self {
        let server = JwksServer::start().await;
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap());
        let config = IdentityConfig {
            issuer: "iss".into(),
            audience: "aud".into(),
            jwks_url: Some(server.url.clone()),
            jwks_min_refresh_seconds: MIN_REFRESH as u64,
            jwks_cache_seconds: CACHE as u64,
            ..IdentityConfig::default()
        };
        let verifier = TokenVerifier::from_config(&config, Arc::new(clock.clone())).unwrap();
        Self {
            server,
            verifier,
            clock,
        }
    }

    fn advance(&self, seconds: i64) {
        self.clock.set(self.clock.now() + chrono::Duration::seconds(seconds));
    }

    fn token(&self, key: &SigningKey) -> String {
        key.issuer().issue("alice", self.clock.now().timestamp(), 3600)
    }

    fn fetches(&self) -> u64 {
        self.verifier.jwks().unwrap().fetches()
    }
}

fn invalid(result: Result<crate::identity::Subject, IdentityError>) -> bool {
    matches!(result, Err(IdentityError::Invalid(_)))
}

#[tokio::test]
async fn rotation_to_a_new_kid_takes_one_refresh_and_the_old_key_goes_with_it() {
    let s = Setup::new().await;
    let (a, b) = (SigningKey::new("key-a"), SigningKey::new("key-b"));
    s.server.publish(&[a.jwk()]);
    assert_eq!(s.verifier.verify(&s.token(&a)).await.unwrap().user, "alice");
    assert_eq!(s.verifier.verify(&s.token(&a)).await.unwrap().user, "alice");
    assert_eq!((s.fetches(), s.server.hits()), (1, 1), "the key set is cached");

    // The provider rotates: B replaces A.
    s.server.publish(&[b.jwk()]);
    s.advance(MIN_REFRESH);
    assert_eq!(s.verifier.verify(&s.token(&b)).await.unwrap().user, "alice");
    assert_eq!(s.server.hits(), 2, "one refresh for the new kid");
    assert_eq!(s.verifier.verify(&s.token(&b)).await.unwrap().user, "alice");
    assert_eq!(s.server.hits(), 2);
    // A is no longer published, so its tokens are refused (without another fetch: too soon).
    assert!(invalid(s.verifier.verify(&s.token(&a)).await));
    assert_eq!(s.server.hits(), 2);
}

#[tokio::test]
async fn a_token_checked_before_is_refused_once_its_key_is_withdrawn() {
    let s = Setup::new().await;
    let (a, b) = (SigningKey::new("key-a"), SigningKey::new("key-b"));
    s.server.publish(&[a.jwk()]);
    let token = s.token(&a);
    assert_eq!(s.verifier.verify(&token).await.unwrap().user, "alice");
    // The same token again is not checked again, but its key still is looked up.
    assert_eq!(s.verifier.verify(&token).await.unwrap().user, "alice");

    // The provider withdraws A (say it leaked): the very same token is refused.
    s.server.publish(&[b.jwk()]);
    s.advance(CACHE);
    assert!(invalid(s.verifier.verify(&token).await));
}

#[tokio::test]
async fn a_token_checked_before_is_checked_again_when_its_kid_names_another_key() {
    let s = Setup::new().await;
    let a = SigningKey::new("key-a");
    s.server.publish(&[a.jwk()]);
    let token = s.token(&a);
    assert_eq!(s.verifier.verify(&token).await.unwrap().user, "alice");

    // The provider publishes another key under the same kid: the token's signature no longer
    // holds, even though it was accepted a moment ago.
    let other = SigningKey::new("key-a");
    s.server.publish(&[other.jwk()]);
    s.advance(CACHE);
    assert!(invalid(s.verifier.verify(&token).await));
}

#[tokio::test]
async fn unknown_kids_cannot_cause_a_refresh_storm() {
    let s = Setup::new().await;
    let a = SigningKey::new("key-a");
    s.server.publish(&[a.jwk()]);
    s.verifier.verify(&s.token(&a)).await.unwrap();
    assert_eq!(s.server.hits(), 1);

    // Many tokens naming keys nobody published, all at once: no fetch within the interval.
    let strangers: Vec<SigningKey> = (0..20).map(|i| SigningKey::new(&format!("made-up-{i}"))).collect();
    let tokens: Vec<String> = strangers.iter().map(|k| s.token(k)).collect();
    let results = futures::future::join_all(tokens.iter().map(|t| s.verifier.verify(t))).await;
    assert!(results.into_iter().all(invalid));
    assert_eq!(s.server.hits(), 1, "within the minimum interval nothing is fetched");

    // Once the interval has passed, a burst of unknown kids causes exactly one fetch.
    s.advance(MIN_REFRESH);
    let results = futures::future::join_all(tokens.iter().map(|t| s.verifier.verify(t))).await;
    assert!(results.into_iter().all(invalid));
    assert_eq!(s.server.hits(), 2, "single flight: one fetch for the whole burst");
    // Known keys keep working throughout.
    s.verifier.verify(&s.token(&a)).await.unwrap();
    assert_eq!(s.server.hits(), 2);
}

#[tokio::test]
async fn right_kid_with_the_wrong_key_or_algorithm_is_refused() {
    let s = Setup::new().await;
    let a = SigningKey::new("key-a");
    s.server.publish(&[a.jwk()]);
    let now = s.clock.now().timestamp();

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = b64.encode(format!(
        r#"{{"sub":"alice","iss":"iss","aud":"aud","exp":{},"iat":{now}}}"#,
        now + 600
    ));
    // alg: none, no signature.
    let none = format!(
        "{}.{claims}.",
        b64.encode(r#"{"alg":"none","typ":"JWT","kid":"key-a"}"#)
    );
    assert!(invalid(s.verifier.verify(&none).await));
    // HS256 keyed with A's public key (the classic algorithm confusion) and with a guess.
    for secret in [a.key.public_key_pem().into_bytes(), b"secret".to_vec()] {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("key-a".into());
        let token = jsonwebtoken::encode(
            &header,
            &crate::identity::Claims {
                sub: "alice".into(),
                iss: "iss".into(),
                aud: "aud".into(),
                exp: now + 600,
                iat: now,
                other: Default::default(),
            },
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert!(invalid(s.verifier.verify(&token).await));
    }
    // A token without a kid cannot pick a key.
    let no_kid = TokenIssuer::new(a.key.serialize_pem().as_bytes(), "ES256", "iss", "aud")
        .unwrap()
        .issue("alice", now, 600);
    assert!(invalid(s.verifier.verify(&no_kid).await));
    assert_eq!(
        s.server.hits(),
        0,
        "none of these made the gateway fetch: header checks come first"
    );

    // Signed by another key that claims A's kid.
    let impostor = SigningKey::new("key-a");
    assert!(invalid(s.verifier.verify(&s.token(&impostor)).await));
    s.verifier.verify(&s.token(&a)).await.unwrap();
    assert_eq!(s.server.hits(), 1);
}

#[tokio::test]
async fn keys_that_do_not_fit_the_pinned_algorithm_are_ignored() {
    let s = Setup::new().await;
    let (es384, enc, no_alg, good) = (
        SigningKey::new("labelled-es384"),
        SigningKey::new("for-encryption"),
        SigningKey::new("no-alg"),
        SigningKey::new("good"),
    );
    let mut labelled = es384.jwk();
    labelled["alg"] = "ES384".into();
    let mut encryption = enc.jwk();
    encryption["use"] = "enc".into();
    let mut unlabelled = no_alg.jwk();
    unlabelled.as_object_mut().unwrap().remove("alg");
    let odd = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "odd", "alg": "EdDSA"});
    let future = serde_json::json!({"kty": "ML-DSA", "alg": "ML-DSA-65", "kid": "future"});
    s.server
        .publish(&[labelled, encryption, unlabelled, odd, future, good.jwk()]);
    assert!(invalid(s.verifier.verify(&s.token(&es384)).await));
    assert!(invalid(s.verifier.verify(&s.token(&enc)).await));
    // A P-256 key with no `alg` fits ES256 by its type; an unreadable key does not spoil the set.
    s.verifier.verify(&s.token(&no_alg)).await.unwrap();
    s.verifier.verify(&s.token(&good)).await.unwrap();
}

#[tokio::test]
async fn an_old_cache_is_refreshed_and_never_used_once_the_provider_fails() {
    let s = Setup::new().await;
    let a = SigningKey::new("key-a");
    s.server.publish(&[a.jwk()]);
    s.verifier.verify(&s.token(&a)).await.unwrap();
    s.advance(CACHE);
    s.verifier.verify(&s.token(&a)).await.unwrap();
    assert_eq!(s.server.hits(), 2, "an expired cache is fetched again");

    // The provider breaks; once the cache is past its age, tokens are refused (fail closed).
    s.server.fail(500, "oops");
    s.advance(CACHE - 1);
    s.verifier.verify(&s.token(&a)).await.unwrap();
    s.advance(1);
    assert_eq!(
        s.verifier.verify(&s.token(&a)).await,
        Err(IdentityError::KeysUnavailable)
    );
    s.server.fail(200, "not json");
    s.advance(MIN_REFRESH);
    assert_eq!(
        s.verifier.verify(&s.token(&a)).await,
        Err(IdentityError::KeysUnavailable)
    );
    assert_eq!(s.server.hits(), 4);
    // It recovers at the next allowed refresh.
    s.server.publish(&[a.jwk()]);
    s.advance(MIN_REFRESH);
    s.verifier.verify(&s.token(&a)).await.unwrap();
}

#[test]
fn only_https_or_loopback_http_urls_are_accepted() {
    let clock: SharedClock = Arc::new(ManualClock::new(Utc::now()));
    let new = |url: &str| Jwks::new(url, None, Algorithm::ES256, 60, 600, Arc::clone(&clock));
    assert!(new("https://login.example.org/jwks").is_ok());
    assert!(new("http://127.0.0.1:8080/jwks").is_ok());
    assert!(matches!(new("ftp://example.org/jwks"), Err(IdentityError::Jwks(_))));
    assert!(matches!(new("not a url"), Err(IdentityError::Jwks(_))));
    let err = Jwks::new(
        "https://login.example.org/jwks",
        Some(b"not pem"),
        Algorithm::ES256,
        60,
        600,
        Arc::clone(&clock),
    )
    .unwrap_err();
    assert!(err.to_string().contains("identity.jwks_ca"), "{err}");
}

/// A CA (PEM) and a TLS acceptor presenting a certificate it issued for 127.0.0.1.
fn tls_server() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer};
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca_pem, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn an_https_provider_is_trusted_only_through_the_configured_ca() {
    let (ca_pem, acceptor) = tls_server();
    let server = JwksServer::start_with(Some(acceptor)).await;
    let a = SigningKey::new("key-a");
    server.publish(&[a.jwk()]);
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap());
    let (other_ca, _) = tls_server();
    for (ca, trusted) in [
        (Some(ca_pem.as_bytes()), true),
        (None, false),
        (Some(other_ca.as_bytes()), false),
    ] {
        let jwks = Jwks::new(&server.url, ca, Algorithm::ES256, 60, 600, Arc::new(clock.clone())).unwrap();
        let found = jwks.key("key-a").await;
        assert_eq!(found.is_ok(), trusted, "CA given: {}", ca.is_some());
        if !trusted {
            assert!(matches!(found, Err(IdentityError::KeysUnavailable)));
        }
    }
    assert_eq!(server.hits(), 1, "only the trusted connection got as far as HTTP");
}

#[tokio::test]
async fn an_oversized_key_set_is_not_read() {
    let s = Setup::new().await;
    let a = SigningKey::new("key-a");
    // A valid document holding A, padded past the size cap with keys that would be ignored.
    let padding = serde_json::json!({"kty": "oct", "kid": "pad", "k": "x".repeat(MAX_BODY)});
    s.server.publish(&[padding, a.jwk()]);
    assert_eq!(
        s.verifier.verify(&s.token(&a)).await,
        Err(IdentityError::KeysUnavailable)
    );
    s.server.publish(&[a.jwk()]);
    s.advance(MIN_REFRESH);
    s.verifier.verify(&s.token(&a)).await.unwrap();
}
