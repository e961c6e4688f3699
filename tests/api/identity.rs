//! Identity providers and approved client tools, end to end: tokens checked against a JWKS
//! served by a real HTTP server started in the test (key rotation, no refresh storm), and mutual
//! TLS with real certificates (required, optional, another CA, a certificate naming no tool).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow_flight::sql::client::FlightSqlServiceClient;
use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use sde_gateway::audit::Record;
use sde_gateway::config::ClientAuth;
use sde_gateway::demo;
use sde_gateway::identity::TokenIssuer;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::helpers::*;

const COUNT_BY_SEX: &str = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";

/// A JWKS endpoint on 127.0.0.1:0 serving whatever keys the test publishes, counting requests.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<String>>,
    hits: Arc<AtomicU64>,
}

impl JwksServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(r#"{"keys":[]}"#.to_owned()));
        let hits = Arc::new(AtomicU64::new(0));
        let (k, h) = (Arc::clone(&keys), Arc::clone(&hits));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (k, h) = (Arc::clone(&k), Arc::clone(&h));
                let service = hyper::service::service_fn(move |_| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = k.lock().unwrap().clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Self { url, keys, hits }
    }

    /// The same over HTTPS, with a certificate for 127.0.0.1 from `ca`, as a real provider
    /// serves its key set.
    async fn start_tls(ca: &OtherCa) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params
            .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
            .unwrap();
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(r#"{"keys":[]}"#.to_owned()));
        let hits = Arc::new(AtomicU64::new(0));
        let (k, h) = (Arc::clone(&keys), Arc::clone(&hits));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (k, h, acceptor) = (Arc::clone(&k), Arc::clone(&h), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let body = k.lock().unwrap().clone();
                        async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, keys, hits }
    }

    fn publish(&self, keys: &[&ProviderKey]) {
        let keys: Vec<_> = keys.iter().map(|k| k.jwk()).collect();
        *self.keys.lock().unwrap() = serde_json::json!({ "keys": keys }).to_string();
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An identity provider's ES256 signing key, named by `kid`.
struct ProviderKey {
    kid: String,
    key: KeyPair,
}

impl ProviderKey {
    fn new(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let point = self.key.public_key_raw();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
        })
    }

    fn token(&self, user: &str) -> String {
        TokenIssuer::new(
            self.key.serialize_pem().as_bytes(),
            "ES256",
            demo::DEMO_ISSUER,
            demo::DEMO_AUDIENCE,
        )
        .unwrap()
        .with_key_id(&self.kid)
        .issue(user, chrono::Utc::now().timestamp(), 600)
    }
}

async fn spawn_with_jwks(jwks: &JwksServer, min_refresh_seconds: u64) -> TestGateway {
    let url = jwks.url.clone();
    spawn_gateway_with(move |c| {
        c.identity.public_key = None;
        c.identity.jwks_url = Some(url);
        c.identity.jwks_min_refresh_seconds = min_refresh_seconds;
    })
    .await
}

async fn query_with_token(
    gw: &TestGateway,
    token: String,
) -> Result<Vec<datafusion::arrow::record_batch::RecordBatch>, tonic::Status> {
    query(&mut gw.client_with(Some(token), Some(PROJECT)).await, COUNT_BY_SEX).await
}

#[tokio::test]
async fn tokens_from_the_identity_provider_follow_its_key_rotation() {
    let jwks = JwksServer::start().await;
    let (a, b) = (ProviderKey::new("2026-11-a"), ProviderKey::new("2026-11-b"));
    jwks.publish(&[&a]);
    // Minimum interval 0 here so the rotation needs no waiting; the interval has its own test.
    let gw = spawn_with_jwks(&jwks, 0).await;
    assert_eq!(jwks.hits(), 1, "the key set is fetched at start-up");
    query_with_token(&gw, a.token("alice"))
        .await
        .expect("A's token is accepted");
    assert_eq!(jwks.hits(), 1, "then served from the cache");
    // The demo's static key is no longer trusted.
    let demo_token = query_with_token(&gw, gw.token("alice")).await.unwrap_err();
    assert_eq!(demo_token.code(), Code::Unauthenticated, "{demo_token:?}");

    jwks.publish(&[&a, &b]);
    query_with_token(&gw, b.token("alice"))
        .await
        .expect("B's token is accepted");
    assert_eq!(
        jwks.hits(),
        2,
        "one refresh for B's new kid (the demo token names no kid: no fetch)"
    );
    jwks.publish(&[&b]);
    query_with_token(&gw, b.token("alice")).await.unwrap();
    assert_eq!(jwks.hits(), 2);

    // A token with A's kid but signed by another key is refused, and the refusal is audited.
    let forged = ProviderKey {
        kid: a.kid.clone(),
        key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
    };
    let refused = query_with_token(&gw, forged.token("alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let records = sde_gateway::audit::verify(&gw.audit_log()).unwrap();
    let last = records.last().unwrap();
    assert_eq!(
        (last.entry.decision.as_str(), last.entry.user.as_deref()),
        ("refused", None)
    );
}

#[tokio::test]
async fn tokens_with_unknown_kids_do_not_make_the_gateway_flood_the_provider() {
    let jwks = JwksServer::start().await;
    let a = ProviderKey::new("a");
    jwks.publish(&[&a]);
    let gw = spawn_with_jwks(&jwks, 3600).await;
    for i in 0..10 {
        let stranger = ProviderKey::new(&format!("made-up-{i}"));
        let refused = query_with_token(&gw, stranger.token("alice")).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(refused.message().contains("does not publish"), "{}", refused.message());
    }
    assert_eq!(
        jwks.hits(),
        1,
        "only the start-up fetch: refreshes are at least an hour apart here"
    );
    query_with_token(&gw, a.token("alice")).await.unwrap();
}

/// A CA of the test's own, and a client certificate it issued.
struct OtherCa {
    pem: String,
    params: CertificateParams,
    key: KeyPair,
}

impl OtherCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { pem, params, key }
    }

    fn client(&self, tool: Option<&str>) -> (String, String) {
        let issuer = Issuer::from_params(&self.params, &self.key);
        match tool {
            Some(tool) => demo::client_certificate(&issuer, tool).unwrap(),
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
                let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
                params.distinguished_name = rcgen::DistinguishedName::new();
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, "no tool named");
                (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
            }
        }
    }
}

/// A TLS channel to the gateway, presenting `client` (certificate and key PEM) if given. The
/// error is the connection's, for servers that refuse the handshake.
async fn channel_as(gw: &TestGateway, client: Option<(String, String)>) -> Result<Channel, tonic::transport::Error> {
    let ca = std::fs::read(gw.path("tls/ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", gw.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Alice's worked-example query over a channel presenting `client`.
async fn query_as_tool(gw: &TestGateway, client: Option<(String, String)>) -> Result<(), String> {
    let channel = channel_as(gw, client).await.map_err(|e| format!("connect: {e}"))?;
    let mut flight = FlightSqlServiceClient::new(channel);
    flight.set_token(gw.token("alice"));
    flight.set_header("x-sde-project", PROJECT);
    query(&mut flight, COUNT_BY_SEX)
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn demo_tool(gw: &TestGateway, tool: &str) -> (String, String) {
    let read = |ext: &str| std::fs::read_to_string(gw.path(&format!("tls/clients/{tool}.{ext}"))).unwrap();
    (read("pem"), read("key"))
}

fn records(gw: &TestGateway) -> Vec<Record> {
    sde_gateway::audit::verify(&gw.audit_log()).expect("chain verifies")
}

async fn spawn_with_client_auth(mode: ClientAuth, ca: Option<String>) -> TestGateway {
    spawn_gateway_with(move |c| {
        let path = c.tls.cert.with_file_name("client-ca.pem");
        let demo_ca = c.tls.cert.with_file_name("ca.pem");
        std::fs::write(&path, ca.unwrap_or_else(|| std::fs::read_to_string(demo_ca).unwrap())).unwrap();
        c.tls.client_ca = Some(path);
        c.tls.client_auth = mode;
    })
    .await
}

#[tokio::test]
async fn with_client_auth_required_only_approved_tools_can_call_and_the_audit_names_them() {
    let gw = spawn_with_client_auth(ClientAuth::Required, None).await;

    let without = query_as_tool(&gw, None).await;
    assert!(without.is_err(), "a client without a certificate must not get through");
    let rogue = OtherCa::new("someone else's CA");
    let foreign = query_as_tool(&gw, Some(rogue.client(Some("dbeaver")))).await;
    assert!(foreign.is_err(), "a certificate from another CA must be refused");
    assert!(
        records(&gw).is_empty(),
        "refused at the handshake, before any call: {:?}",
        records(&gw)
    );

    query_as_tool(&gw, Some(demo_tool(&gw, "dbeaver")))
        .await
        .expect("an approved tool can call");
    let records = records(&gw);
    assert!(records.len() >= 2, "plan and release are recorded");
    for record in &records {
        assert_eq!(record.entry.client_tool.as_deref(), Some("dbeaver"), "{record:?}");
        assert!(
            matches!(record.entry.decision.as_str(), "accepted" | "received"),
            "{record:?}"
        );
    }
}

#[tokio::test]
async fn a_required_certificate_must_name_its_tool() {
    let ca = OtherCa::new("tool CA");
    let gw = spawn_with_client_auth(ClientAuth::Required, Some(ca.pem.clone())).await;
    let refused = query_as_tool(&gw, Some(ca.client(None))).await.unwrap_err();
    assert!(
        refused.starts_with("Unauthenticated") && refused.contains("names no tool"),
        "{refused}"
    );
    let last = records(&gw).pop().unwrap();
    assert_eq!(
        (last.entry.decision.as_str(), last.entry.client_tool),
        ("refused", None)
    );

    query_as_tool(&gw, Some(ca.client(Some("jdbc-client")))).await.unwrap();
    assert_eq!(
        records(&gw).pop().unwrap().entry.client_tool.as_deref(),
        Some("jdbc-client")
    );
}

#[tokio::test]
async fn with_client_auth_optional_a_certificate_is_recorded_when_sent() {
    let gw = spawn_with_client_auth(ClientAuth::Optional, None).await;
    query_as_tool(&gw, None).await.expect("no certificate is fine");
    assert!(records(&gw).iter().all(|r| r.entry.client_tool.is_none()));
    let before = records(&gw).len();
    query_as_tool(&gw, Some(demo_tool(&gw, "adbc-python"))).await.unwrap();
    let records = records(&gw);
    assert!(
        records[before..]
            .iter()
            .all(|r| r.entry.client_tool.as_deref() == Some("adbc-python"))
    );
    // A certificate from another CA is still refused.
    let rogue = OtherCa::new("someone else's CA");
    assert!(query_as_tool(&gw, Some(rogue.client(Some("dbeaver")))).await.is_err());
}

#[tokio::test]
async fn when_the_provider_cannot_be_reached_tokens_are_refused_as_unavailable() {
    let jwks = JwksServer::start().await;
    *jwks.keys.lock().unwrap() = "this is not a key set".into();
    let gw = spawn_with_jwks(&jwks, 3600).await;
    let a = ProviderKey::new("a");
    let refused = query_with_token(&gw, a.token("alice")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("try again later"), "{}", refused.message());
    let last = records(&gw).pop().unwrap();
    assert_eq!(last.entry.decision, "refused");
}

#[tokio::test]
async fn issue_token_signs_a_token_the_gateway_accepts_and_refuses_what_it_would_not() {
    let gw = spawn_gateway().await;
    let issue = |key: &std::path::Path, user: &str, ttl: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
            .args(["issue-token", "--config"])
            .arg(gw.path("gateway.toml"))
            .arg("--signing-key")
            .arg(key)
            .args(["--user", user, "--ttl", ttl])
            .output()
            .unwrap()
    };
    // With the deployment's key: a token alice can query with.
    let out = issue(&gw.path("keys/jwt-signing.key"), "alice", "10m");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut client = gw.client_with(Some(token), Some(PROJECT)).await;
    query(&mut client, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .expect("the issued token is accepted");
    // Another key, a lifetime past a day, a key others can read: nothing is printed.
    let other = gw.path("other.key");
    std::fs::write(
        &other,
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem(),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for (key, ttl, says) in [
        (other.clone(), "10m", "does not pass this gateway's check"),
        (gw.path("keys/jwt-signing.key"), "2d", "a lifetime"),
        (gw.path("keys/jwt-signing.key"), "25h", "at most 24h"),
    ] {
        let out = issue(&key, "alice", ttl);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{ttl}: {stderr}");
        assert!(stderr.contains(says), "{ttl}: {stderr}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = issue(&other, "alice", "10m");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("chmod 600"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_client_auth_required_the_gateways_own_commands_present_a_client_certificate() {
    let gw = spawn_with_client_auth(ClientAuth::Required, None).await;
    let run = |args: &[&str], cert: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"));
        command.args(args).arg("--ca").arg(gw.path("tls/ca.pem"));
        if cert {
            command
                .arg("--client-cert")
                .arg(gw.path("tls/clients/sde-cli.pem"))
                .arg("--client-key")
                .arg(gw.path("tls/clients/sde-cli.key"));
        }
        let out = command.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let addr = gw.addr.to_string();
    let health = ["health", "--addr", addr.as_str()];
    assert!(!run(&health, false).0, "no certificate, no handshake");
    let (ok, err) = run(&health, true);
    assert!(ok, "{err}");

    let token = gw.path("tokens/admin.jwt");
    let admin = [
        "admin",
        "orgs",
        "--addr",
        addr.as_str(),
        "--token",
        token.to_str().unwrap(),
    ];
    let (ok, err) = run(&admin, true);
    assert!(ok, "{err}");
    let last = records(&gw).pop().unwrap();
    assert_eq!(
        (last.entry.call.as_str(), last.entry.client_tool.as_deref()),
        ("admin.list_organisations", Some("sde-cli"))
    );

    let token = gw.path("tokens/auditor.jwt");
    let audit = [
        "audit",
        "show",
        "--limit",
        "1",
        "--server",
        addr.as_str(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    let (ok, err) = run(&audit, true);
    assert!(ok, "{err}");
    // Refusals read as the rule and its message, not as a gRPC dump.
    let token = gw.path("tokens/alice.jwt");
    let refused = [
        "admin",
        "orgs",
        "--addr",
        addr.as_str(),
        "--token",
        token.to_str().unwrap(),
    ];
    let (ok, err) = run(&refused, true);
    assert!(!ok);
    assert!(
        err.starts_with("error: safe-people/role-admin: this call needs the admin role (PermissionDenied)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oidc_provider_over_https_names_users_by_the_configured_claim() {
    // The provider: its key set over HTTPS under its own CA, tokens whose `sub` is opaque and
    // whose `preferred_username` is the registry's user id.
    let ca = OtherCa::new("identity provider CA");
    let jwks = JwksServer::start_tls(&ca).await;
    let key = ProviderKey::new("idp-2026-12");
    jwks.publish(&[&key]);
    let ca_path = std::env::temp_dir().join(format!("idp-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let (url, ca_file) = (jwks.url.clone(), ca_path.clone());
    let gw = spawn_gateway_with(move |c| {
        c.identity.public_key = None;
        c.identity.jwks_url = Some(url);
        c.identity.jwks_ca = Some(ca_file);
        c.identity.user_claim = "preferred_username".into();
    })
    .await;
    assert!(jwks.hits() >= 1, "the key set was fetched over https");
    let token = |claims: serde_json::Value| {
        TokenIssuer::new(
            key.key.serialize_pem().as_bytes(),
            "ES256",
            demo::DEMO_ISSUER,
            demo::DEMO_AUDIENCE,
        )
        .unwrap()
        .with_key_id(&key.kid)
        .issue_with(
            "f3c9a1e0-opaque-subject",
            chrono::Utc::now().timestamp(),
            600,
            claims.as_object().unwrap().clone(),
        )
    };
    query_with_token(&gw, token(serde_json::json!({ "preferred_username": "alice" })))
        .await
        .expect("alice, named by preferred_username");
    let last = records(&gw).pop().unwrap();
    assert_eq!(last.entry.user.as_deref(), Some("alice"));
    let err = query_with_token(&gw, token(serde_json::json!({}))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("no `preferred_username` claim"), "{err:?}");
    let err = query_with_token(&gw, token(serde_json::json!({ "preferred_username": 7 })))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let _ = std::fs::remove_file(ca_path);
}
