//! Safe People, first half: who is asking. A bearer token (JWT) is verified against the key and
//! the one algorithm in config — signature, `iss`, `aud` and `exp` (judged by the injected
//! clock) — and yields the subject's user id. The key is either a static PEM key or the key the
//! token's `kid` names in an identity provider's JWKS ([`jwks`]). Whether that user may do
//! anything is the registry's question, not the token's: roles and organisation come from the
//! registry.
//!
//! Safe Settings: the approved client tool a call comes from is named by the subject CN of its
//! mutual-TLS certificate ([`client_tool`]).

pub mod client_tool;
pub mod issue;
pub mod jwks;

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;
use crate::config::IdentityConfig;
use crate::recent::{self, Recent};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("safe-people/authentication: no bearer token; send `authorization: Bearer <token>`")]
    Missing,
    #[error("safe-people/authentication: the authorization header is not of the form `Bearer <token>`")]
    Malformed,
    #[error("safe-people/authentication: the token is not valid: {0}")]
    Invalid(String),
    #[error("safe-people/authentication: the token has expired; request a new one")]
    Expired,
    #[error("cannot load the token verification key {path}: {message}")]
    Key { path: String, message: String },
    #[error("cannot use the identity provider's key set: {0}")]
    Jwks(String),
    #[error(
        "safe-people/authentication: the identity provider's signing keys cannot be fetched just now, so no token can be checked; try again later"
    )]
    KeysUnavailable,
    #[error(
        "safe-people/authentication: the client certificate names no tool (subject CN); ask the platform team for an approved tool's certificate"
    )]
    UnnamedTool,
}

/// The claims sde-gateway reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    /// Any other claims, of which `identity.user_claim` may name the user.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The identity a verified token proves: only the user id. Everything else about the user is
/// looked up in the registry at each call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub user: String,
}

/// The outcome of authentication for one request, set by the transport layer in the request's
/// extensions so that every call — including refused ones — can be audited.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Result<Subject, IdentityError>);

fn algorithm(name: &str) -> Result<Algorithm, IdentityError> {
    match name {
        "ES256" => Ok(Algorithm::ES256),
        "RS256" => Ok(Algorithm::RS256),
        other => Err(IdentityError::Invalid(format!("algorithm {other} is not allowed"))),
    }
}

/// Where the key that checks a token's signature comes from.
enum Keys {
    Static(Arc<DecodingKey>),
    Jwks(Box<jwks::Jwks>),
}

/// A token whose signature and claims were checked, and the key that checked it.
struct Verified {
    key: Arc<DecodingKey>,
    user: String,
    exp: i64,
}

/// Tokens verified lately, at most (a client sends the same token with every call).
const VERIFIED_TOKENS: usize = 4096;

/// Verifies bearer tokens with a pinned algorithm and a static public key or a JWKS.
///
/// A client sends the same token with every call, so a token's signature is checked once: the
/// token is remembered (by its SHA-256) with its subject, expiry and the key that checked it.
/// A remembered token still has its expiry judged by the clock at every call, and counts only
/// while the key that checked it is the one the token names now: once the identity provider
/// stops publishing that key (or publishes another under its `kid`), it is refused or checked
/// afresh. Tokens that fail are never remembered.
pub struct TokenVerifier {
    keys: Keys,
    algorithm: Algorithm,
    validation: Validation,
    leeway: i64,
    clock: SharedClock,
    verified: Recent<Arc<Verified>>,
    /// The claim naming the user (`identity.user_claim`).
    user_claim: String,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl TokenVerifier {
    pub fn from_config(config: &IdentityConfig, clock: SharedClock) -> Result<Self, IdentityError> {
        let alg = algorithm(&config.algorithm)?;
        let keys = match (&config.public_key, &config.jwks_url) {
            (Some(path), None) => Keys::Static(Arc::new(static_key(path, alg)?)),
            (None, Some(url)) => {
                let ca = config.jwks_ca.as_deref().map(read_key).transpose()?;
                Keys::Jwks(Box::new(jwks::Jwks::new(
                    url,
                    ca.as_deref(),
                    alg,
                    config.jwks_min_refresh_seconds,
                    config.jwks_cache_seconds,
                    Arc::clone(&clock),
                )?))
            }
            _ => {
                return Err(IdentityError::Jwks(
                    "set exactly one of identity.public_key and identity.jwks_url".into(),
                ));
            }
        };
        // `Validation::new` pins the algorithm: a token whose header names another (or `none`)
        // is refused before its signature is looked at.
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Expiry is judged against the injected clock below, not the library's wall clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        Ok(Self {
            keys,
            algorithm: alg,
            validation,
            leeway: config.leeway_seconds as i64,
            clock,
            verified: Recent::new(VERIFIED_TOKENS),
            user_claim: config.user_claim.clone(),
        })
    }

    /// The JWKS behind this verifier, if it uses one.
    pub fn jwks(&self) -> Option<&jwks::Jwks> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Static(_) => None,
        }
    }

    /// Verifies the value of an `authorization` header.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Subject, IdentityError> {
        let header = header.ok_or(IdentityError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(IdentityError::Malformed)?;
        self.verify(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Subject, IdentityError> {
        if token.len() > 16 * 1024 {
            return Err(IdentityError::Invalid("token too long".into()));
        }
        let key = match &self.keys {
            Keys::Static(key) => Arc::clone(key),
            Keys::Jwks(jwks) => {
                // The header is read (unverified) only to pick the key; a token naming another
                // algorithm is refused here, before it can make the gateway fetch anything.
                let header = jsonwebtoken::decode_header(token).map_err(|e| IdentityError::Invalid(e.to_string()))?;
                if header.alg != self.algorithm {
                    return Err(IdentityError::Invalid(format!(
                        "algorithm {:?} is not allowed",
                        header.alg
                    )));
                }
                let kid = header
                    .kid
                    .ok_or_else(|| IdentityError::Invalid("the token names no signing key (`kid`)".into()))?;
                jwks.key(&kid).await?
            }
        };
        let id = recent::key(&[token]);
        let verified = match self.verified.get(&id) {
            Some(seen) if Arc::ptr_eq(&seen.key, &key) => seen,
            _ => {
                let verified = Arc::new(self.check(token, key)?);
                self.verified.put(&id, Arc::clone(&verified));
                verified
            }
        };
        if verified.exp + self.leeway <= self.clock.now().timestamp() {
            return Err(IdentityError::Expired);
        }
        Ok(Subject {
            user: verified.user.clone(),
        })
    }

    /// Checks the token's signature with `key`, and its claims.
    fn check(&self, token: &str, key: Arc<DecodingKey>) -> Result<Verified, IdentityError> {
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let user = match self.user_claim.as_str() {
            "sub" => claims.sub,
            claim => match claims.other.get(claim) {
                Some(serde_json::Value::String(user)) => user.clone(),
                _ => {
                    return Err(IdentityError::Invalid(format!(
                        "the token has no `{claim}` claim naming the user"
                    )));
                }
            },
        };
        if user.is_empty() {
            return Err(IdentityError::Invalid("empty subject".into()));
        }
        Ok(Verified {
            key,
            user,
            exp: claims.exp,
        })
    }
}

/// Signs tokens; the demo world uses it to issue a token for each demo user.
pub struct TokenIssuer {
    key: EncodingKey,
    header: Header,
    issuer: String,
    audience: String,
}

impl TokenIssuer {
    /// `private_pem` is a PKCS#8 PEM key for `algorithm`.
    pub fn new(private_pem: &[u8], algorithm_name: &str, issuer: &str, audience: &str) -> Result<Self, IdentityError> {
        let alg = algorithm(algorithm_name)?;
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem),
            _ => EncodingKey::from_ec_pem(private_pem),
        }
        .map_err(|e| IdentityError::Key {
            path: "<signing key>".into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            key,
            header: Header::new(alg),
            issuer: issuer.into(),
            audience: audience.into(),
        })
    }

    /// Names the signing key in each token's header (`kid`), as an identity provider that
    /// publishes a JWKS does.
    pub fn with_key_id(mut self, kid: &str) -> Self {
        self.header.kid = Some(kid.into());
        self
    }

    pub fn issue(&self, user: &str, issued_at: i64, lifetime_secs: i64) -> String {
        self.issue_with(user, issued_at, lifetime_secs, serde_json::Map::new())
    }

    /// A token for subject `sub` carrying `other` claims too (as providers add
    /// `preferred_username`, `email`, …).
    pub fn issue_with(
        &self,
        sub: &str,
        issued_at: i64,
        lifetime_secs: i64,
        other: serde_json::Map<String, serde_json::Value>,
    ) -> String {
        let claims = Claims {
            sub: sub.into(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: issued_at,
            exp: issued_at + lifetime_secs,
            other,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).expect("claims always encode")
    }
}

fn static_key(path: &Path, alg: Algorithm) -> Result<DecodingKey, IdentityError> {
    let pem = read_key(path)?;
    match alg {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
        _ => DecodingKey::from_ec_pem(&pem),
    }
    .map_err(|e| IdentityError::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn read_key(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|e| IdentityError::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn setup() -> (TokenVerifier, TokenIssuer, ManualClock, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join("jwt.pub"), key.public_key_pem()).unwrap();
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap());
        let config = IdentityConfig {
            issuer: "iss".into(),
            audience: "aud".into(),
            algorithm: "ES256".into(),
            public_key: Some(dir.path().join("jwt.pub")),
            leeway_seconds: 0,
            ..IdentityConfig::default()
        };
        let verifier = TokenVerifier::from_config(&config, Arc::new(clock.clone())).unwrap();
        let issuer = TokenIssuer::new(key.serialize_pem().as_bytes(), "ES256", "iss", "aud").unwrap();
        (verifier, issuer, clock, dir)
    }

    #[tokio::test]
    async fn valid_token_then_expired_by_the_clock() {
        let (verifier, issuer, clock, _dir) = setup();
        let now = clock.now().timestamp();
        let token = issuer.issue("alice", now, 60);
        assert_eq!(verifier.verify(&token).await.unwrap().user, "alice");
        clock.set(clock.now() + chrono::Duration::seconds(61));
        assert_eq!(verifier.verify(&token).await, Err(IdentityError::Expired));
    }

    #[tokio::test]
    async fn wrong_issuer_audience_alg_none_and_tampering_are_refused() {
        let (verifier, _issuer, clock, _dir) = setup();
        let now = clock.now().timestamp();
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = other_key.serialize_pem();
        for (iss, aud) in [("other", "aud"), ("iss", "other")] {
            let token = TokenIssuer::new(pem.as_bytes(), "ES256", iss, aud)
                .unwrap()
                .issue("alice", now, 60);
            assert!(matches!(verifier.verify(&token).await, Err(IdentityError::Invalid(_))));
        }
        // Signed by another key.
        let forged = TokenIssuer::new(pem.as_bytes(), "ES256", "iss", "aud")
            .unwrap()
            .issue("alice", now, 60);
        assert!(matches!(verifier.verify(&forged).await, Err(IdentityError::Invalid(_))));
        // alg: none with no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(format!(
                r#"{{"sub":"alice","iss":"iss","aud":"aud","exp":{},"iat":0}}"#,
                now + 60
            ))
        );
        assert!(matches!(verifier.verify(&none).await, Err(IdentityError::Invalid(_))));
        assert_eq!(verifier.verify_header(None).await, Err(IdentityError::Missing));
        assert_eq!(
            verifier.verify_header(Some("Basic abc")).await,
            Err(IdentityError::Malformed)
        );
    }
}
