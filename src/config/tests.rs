use super::*;

fn sample(dir: &Path) -> String {
    for f in ["cert.pem", "key.pem", "jwt.pub"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    r#"
listen = "127.0.0.1:0"
[tls]
cert = "cert.pem"
key = "key.pem"
[identity]
issuer = "iss"
audience = "aud"
algorithm = "ES256"
public_key = "jwt.pub"
[registry]
path = "registry.db"
[data]
dir = "data"
[audit]
dir = "audit"
signing_key = "audit.key"
"#
    .to_owned()
}

#[test]
fn env_overrides_and_floor_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample(dir.path());
    let env = vec![("SDE_DISCLOSURE__THRESHOLD".to_owned(), "25".to_owned())];
    let c = GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t")).unwrap();
    assert_eq!(c.disclosure.threshold, 25);
    assert_eq!(c.tls.cert, dir.path().join("cert.pem"));

    let env = vec![("SDE_DISCLOSURE__THRESHOLD".to_owned(), "3".to_owned())];
    let err = GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t")).unwrap_err();
    assert!(err.to_string().contains("disclosure.threshold"), "{err}");
}

#[test]
fn the_example_config_parses_with_every_documented_key() {
    let text = include_str!("../../config/gateway.example.toml");
    let config: GatewayConfig = toml::from_str(text).expect("example config parses");
    assert_eq!(config.disclosure.threshold, 10);
    // Uncommenting the dataset example must parse too.
    let text = text.replace(
        "# [disclosure.datasets.gp_events]\n# threshold = 20",
        "[disclosure.datasets.gp_events]\nthreshold = 20",
    );
    let config: GatewayConfig = toml::from_str(&text).expect("dataset overrides parse");
    assert_eq!(config.disclosure.datasets["gp_events"].threshold, Some(20));
    // And the served copies' order.
    let text = text.replace(
        "# patients = [\"district\", \"age\"]",
        "patients = [\"district\", \"age\"]",
    );
    let config: GatewayConfig = toml::from_str(&text).expect("served order parses");
    assert_eq!(config.data.served_sort_by["patients"], ["district", "age"]);
    // And the telemetry examples.
    let text = text
        .replace("# otlp_endpoint", "otlp_endpoint")
        .replace("# service_name", "service_name")
        .replace("# metrics_interval_seconds", "metrics_interval_seconds")
        .replace("# metrics_listen", "metrics_listen");
    let config: GatewayConfig = toml::from_str(&text).expect("telemetry keys parse");
    assert_eq!(config.telemetry.metrics_interval_seconds, Some(30));
    assert_eq!(
        config.limits,
        crate::config::LimitsConfig::default(),
        "the example shows the defaults"
    );
}

#[test]
fn operations_keys_are_validated_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample(dir.path());
    let load = |var: &str, value: &str| {
        let env = vec![(var.to_owned(), value.to_owned())];
        GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t"))
    };
    let c = load("SDE_TELEMETRY__METRICS_LISTEN", "127.0.0.1:9464").unwrap();
    assert_eq!(c.telemetry.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(
        c.with_env(std::iter::empty()).unwrap().telemetry.metrics_listen,
        c.telemetry.metrics_listen
    );
    for (var, value, key) in [
        (
            "SDE_LIMITS__QUERY_MEMORY_BYTES",
            "99999999999999",
            "limits.query_memory_bytes",
        ),
        ("SDE_LIMITS__MEMORY_POOL_BYTES", "0", "limits.memory_pool_bytes"),
        (
            "SDE_LIMITS__USER_QUERIES_PER_MINUTE",
            "0",
            "limits.user_queries_per_minute",
        ),
        (
            "SDE_TELEMETRY__OTLP_ENDPOINT",
            "collector:4317",
            "telemetry.otlp_endpoint",
        ),
        (
            "SDE_TELEMETRY__METRICS_INTERVAL_SECONDS",
            "0",
            "telemetry.metrics_interval_seconds",
        ),
        ("SDE_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0x", "metrics_listen"),
    ] {
        let err = load(var, value).unwrap_err().to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
    let text = text.replace("127.0.0.1:0", "127.0.0.1:50051");
    let env = vec![("SDE_TELEMETRY__METRICS_LISTEN".to_owned(), "0.0.0.0:50051".to_owned())];
    let err = GatewayConfig::from_toml(&text, dir.path(), env.into_iter(), Path::new("t")).unwrap_err();
    assert!(err.to_string().contains("telemetry.metrics_listen"), "{err}");
}

#[test]
fn the_versions_folder_is_optional_resolved_and_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample(dir.path());
    let c = GatewayConfig::from_toml(&text, dir.path(), std::iter::empty(), Path::new("t")).unwrap();
    assert_eq!(c.data.versions, None);
    let env = || vec![("SDE_DATA__VERSIONS".to_owned(), "versions".to_owned())].into_iter();
    let err = GatewayConfig::from_toml(&text, dir.path(), env(), Path::new("t")).unwrap_err();
    assert!(err.to_string().contains("data.versions"), "{err}");
    std::fs::create_dir_all(dir.path().join("versions")).unwrap();
    let c = GatewayConfig::from_toml(&text, dir.path(), env(), Path::new("t")).unwrap();
    assert_eq!(c.data.versions, Some(dir.path().join("versions")));
}

#[test]
fn the_example_config_parses_with_identity_providers_and_mtls() {
    let text = include_str!("../../config/gateway.example.toml");
    // So must the JWKS and mutual-TLS examples.
    let text = text
        .replace("public_key = ", "# public_key = ")
        .replace("# jwks_url = ", "jwks_url = ")
        .replace("# jwks_ca = ", "jwks_ca = ")
        .replace("client_auth = \"off\"", "client_auth = \"required\"")
        .replace("# client_ca = ", "client_ca = ");
    let config: GatewayConfig = toml::from_str(&text).expect("JWKS and mTLS examples parse");
    assert!(config.identity.public_key.is_none() && config.identity.jwks_url.is_some());
    assert!(config.identity.jwks_ca.is_some() && config.tls.client_ca.is_some());
    assert_eq!(config.tls.client_auth, ClientAuth::Required);
}

fn load(text: &str, dir: &Path) -> Result<GatewayConfig, ConfigError> {
    GatewayConfig::from_toml(text, dir, std::iter::empty(), Path::new("t"))
}

#[test]
fn exactly_one_of_a_static_key_and_a_jwks_url_and_only_https_or_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample(dir.path());
    let without_key = text.replace("public_key = \"jwt.pub\"", "");
    let err = load(&without_key, dir.path()).unwrap_err();
    assert!(err.to_string().contains("identity.public_key"), "{err}");

    let env = |url: &str| vec![("SDE_IDENTITY__JWKS_URL".to_owned(), url.to_owned())].into_iter();
    let c = GatewayConfig::from_toml(
        &without_key,
        dir.path(),
        env("https://login.example.org/jwks"),
        Path::new("t"),
    )
    .unwrap();
    assert_eq!(c.identity.jwks_url.as_deref(), Some("https://login.example.org/jwks"));
    assert_eq!(
        (c.identity.jwks_min_refresh_seconds, c.identity.jwks_cache_seconds),
        (60, 600)
    );
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9/jwks",
    ] {
        GatewayConfig::from_toml(&without_key, dir.path(), env(url), Path::new("t")).unwrap();
    }
    for url in [
        "http://login.example.org/jwks",
        "ftp://x/jwks",
        "not a url",
        "https:///jwks",
    ] {
        let err = GatewayConfig::from_toml(&without_key, dir.path(), env(url), Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("identity.jwks_url"), "{url}: {err}");
    }
    let both = GatewayConfig::from_toml(&text, dir.path(), env("https://x.org/jwks"), Path::new("t")).unwrap_err();
    assert!(both.to_string().contains("not both"), "{both}");
    let ca_without_url = text.replace("[registry]", "jwks_ca = \"jwt.pub\"\n[registry]");
    let err = load(&ca_without_url, dir.path()).unwrap_err();
    assert!(err.to_string().contains("identity.jwks_ca"), "{err}");
}

#[test]
fn client_auth_needs_a_client_ca_and_a_client_ca_needs_client_auth() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample(dir.path());
    assert_eq!(load(&text, dir.path()).unwrap().tls.client_auth, ClientAuth::Off);
    let with = |extra: &str| text.replace("[identity]", &format!("{extra}\n[identity]"));
    for mode in ["optional", "required"] {
        let err = load(&with(&format!("client_auth = \"{mode}\"")), dir.path()).unwrap_err();
        assert!(err.to_string().contains("tls.client_ca"), "{err}");
    }
    let c = load(
        &with("client_ca = \"cert.pem\"\nclient_auth = \"required\""),
        dir.path(),
    )
    .unwrap();
    assert_eq!(c.tls.client_auth, ClientAuth::Required);
    assert_eq!(c.tls.client_ca, Some(dir.path().join("cert.pem")));
    let err = load(&with("client_ca = \"cert.pem\""), dir.path()).unwrap_err();
    assert!(err.to_string().contains("tls.client_auth"), "{err}");
    let err = load(
        &with("client_ca = \"missing.pem\"\nclient_auth = \"optional\""),
        dir.path(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tls.client_ca"), "{err}");
    let err = load(&with("client_auth = \"sometimes\""), dir.path()).unwrap_err();
    assert!(err.to_string().contains("sometimes"), "{err}");
}

#[test]
fn unknown_keys_and_bad_algorithms_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample(dir.path()).replace("ES256", "none");
    let err = GatewayConfig::from_toml(&text, dir.path(), std::iter::empty(), Path::new("t")).unwrap_err();
    assert!(err.to_string().contains("identity.algorithm"), "{err}");
    let text = sample(dir.path()) + "\nbogus = 1\n";
    let err = GatewayConfig::from_toml(&text, dir.path(), std::iter::empty(), Path::new("t")).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}
