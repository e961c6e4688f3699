//! What identity costs per call: verifying a token with a static key and with a cached JWKS key
//! (the common case), and a JWKS fetch over loopback HTTP (the rare case: a new `kid`).
//!
//! Run: `cargo bench --bench identity -- [RUNS]` (default 2000; add `--profile dev` to skip the
//! release build). Medians in microseconds.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use sde_gateway::clock::SystemClock;
use sde_gateway::config::IdentityConfig;
use sde_gateway::identity::{TokenIssuer, TokenVerifier};

fn median_us(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Serves `body` at http://127.0.0.1:PORT/jwks.
async fn jwks_server(body: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            let service = hyper::service::service_fn(move |_| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    url
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|r| r.parse().ok()).unwrap_or(2000);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt.pub"), key.public_key_pem()).unwrap();
    let point = key.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
    }]});
    let url = jwks_server(jwk.to_string()).await;
    let base = IdentityConfig {
        issuer: "iss".into(),
        audience: "aud".into(),
        ..IdentityConfig::default()
    };
    let static_config = IdentityConfig {
        public_key: Some(dir.path().join("jwt.pub")),
        ..base.clone()
    };
    let jwks_config = IdentityConfig {
        jwks_url: Some(url),
        jwks_min_refresh_seconds: 0,
        ..base
    };
    let token = TokenIssuer::new(key.serialize_pem().as_bytes(), "ES256", "iss", "aud")
        .unwrap()
        .with_key_id("k1")
        .issue("alice", chrono::Utc::now().timestamp(), 3600);

    for (name, config) in [("static key", &static_config), ("JWKS, cached", &jwks_config)] {
        let verifier = TokenVerifier::from_config(config, Arc::new(SystemClock)).unwrap();
        verifier.verify(&token).await.unwrap();
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            verifier.verify(&token).await.unwrap();
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        println!(
            "verify, {name:<14} median {:>8.1} us over {runs} runs",
            median_us(samples)
        );
    }
    // A fresh verifier each time: the first token fetches the key set.
    let fetch_runs = runs.min(200);
    let mut samples = Vec::with_capacity(fetch_runs);
    for _ in 0..fetch_runs {
        let verifier = TokenVerifier::from_config(&jwks_config, Arc::new(SystemClock)).unwrap();
        let started = Instant::now();
        verifier.verify(&token).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "verify, JWKS fetch + verify (loopback http) median {:>8.1} us over {fetch_runs} runs",
        median_us(samples)
    );
}
