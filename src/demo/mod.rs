//! The demo world of `shared/DESIGN.md`, created by `serve --demo` in one step: synthetic raw
//! extracts (`raw/`) with their ingest specs (`ingest/`), pseudonymised by the real ingest
//! under a demo linkage key (`keys/ingest-hmac.key`) into `versions/` and `data/`, a CA and
//! server certificate, a token signing key, a seeded registry and a
//! signed token for each demo user. Everything is made here, on this machine; nothing is fetched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::config::{
    AuditConfig, DataConfig, DisclosureConfig, GatewayConfig, IdentityConfig, LimitsConfig, RegistryConfig, TlsConfig,
};
use crate::identity::TokenIssuer;
use crate::registry::rules::RuleSet;
use crate::registry::{Registry, seed};

pub mod data;

pub const DEMO_ISSUER: &str = "https://sde-demo.invalid/issuer";
pub const DEMO_AUDIENCE: &str = "sde-gateway";
/// The checkpoint public key, next to `audit/`.
pub const AUDIT_PUBLIC_KEY: &str = "audit.pub";
/// Default number of synthetic people.
pub const DEFAULT_PEOPLE: usize = 20_000;
pub const DEFAULT_SEED: u64 = 2026;
/// Approved client tools: the demo CA issues each a client certificate, `tls/clients/<tool>.pem`
/// and `.key`, whose subject CN names the tool (`sde-cli`: the gateway's own command line, for
/// `--client-cert` where mutual TLS is required).
pub const DEMO_TOOLS: [&str; 3] = ["dbeaver", "adbc-python", "sde-cli"];
/// Demo tokens are valid for a day and re-issued at every start.
const TOKEN_LIFETIME_SECS: i64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write the demo world in {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot make demo certificates or keys: {0}")]
    Crypto(#[from] rcgen::Error),
    #[error(transparent)]
    Data(#[from] data::DemoDataError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
}

/// Where and how big the demo world is.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub people: usize,
    pub seed: u64,
    /// Use data from this folder instead of `<dir>/data` (tests share one generated world).
    pub data_dir: Option<PathBuf>,
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), DemoError> {
    write_as(path, contents.as_ref(), 0o666)
}

/// Writes a secret (a private key, a token): readable by its owner only, from the moment the
/// file is made. The gateway refuses to start with a secret that others can read.
fn write_secret(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), DemoError> {
    write_as(path, contents.as_ref(), 0o600)?;
    // A file that existed already keeps its mode when opened: made owner-only too.
    make_owner_only(path)
}

/// Writes `contents` to `path`, creating its folder, and the file with `mode` (Unix).
fn write_as(path: &Path, contents: &[u8], mode: u32) -> Result<(), DemoError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DemoError::Io { path, source }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io(path))?;
    std::io::Write::write_all(&mut file, contents).map_err(io(path))
}

/// Makes an existing secret readable by its owner only (a world made by an older build).
fn make_owner_only(path: &Path) -> Result<(), DemoError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| DemoError::Io {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Creates whatever part of the demo world is missing in `opts.dir`, re-issues the tokens, and
/// returns the config that serves it (also written to `<dir>/gateway.toml`).
pub fn prepare(opts: &DemoOptions, now: DateTime<Utc>) -> Result<GatewayConfig, DemoError> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
        path: dir.clone(),
        source,
    })?;
    let data_dir = match &opts.data_dir {
        Some(data_dir) => data_dir.clone(),
        None => ensure_data(dir, opts.people, opts.seed)?,
    };
    // Kept versions live beside the data folder, where the demo's ingest puts them.
    let versions = data_dir.parent().map(|p| p.join("versions")).filter(|p| p.is_dir());
    // Served copies (opted-out people removed) beside it too.
    let served = data_dir.parent().map(|p| p.join("served"));

    let tls = dir.join("tls");
    let issued = |tool: &str| tls.join("clients").join(format!("{tool}.pem")).exists();
    if !tls.join("server.pem").exists() || !DEMO_TOOLS.iter().all(|t| issued(t)) {
        make_certificates(&tls)?;
    }
    let keys = dir.join("keys");
    let private = keys.join("jwt-signing.key");
    let public = keys.join("jwt-signing.pub.pem");
    if !private.exists() || !public.exists() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        write_secret(&private, key.serialize_pem())?;
        write(&public, key.public_key_pem())?;
    }
    make_owner_only(&private)?;
    // The perturbation key, derived from the world's seed so that the demo's perturbed figures
    // are the same on every machine (the README and guides print them). A real deployment's
    // key is random, made at first start.
    let perturbation = dir.join("perturbation.key");
    if !perturbation.exists() {
        use sha2::{Digest, Sha256};
        let key = Sha256::new()
            .chain_update(b"sde-gateway demo perturbation key")
            .chain_update(opts.seed.to_le_bytes())
            .finalize();
        write_secret(&perturbation, hex::encode(key))?;
    }
    make_owner_only(&perturbation)?;
    make_owner_only(&tls.join("server.key"))?;
    for tool in DEMO_TOOLS {
        make_owner_only(&tls.join("clients").join(format!("{tool}.key")))?;
    }
    // The demo serves the rules this binary ships, rewritten at every start.
    let policies = dir.join("policies");
    RuleSet::write_shipped(&policies).map_err(|source| DemoError::Io {
        path: policies.clone(),
        source,
    })?;
    let registry_path = dir.join("registry.db");
    if !registry_path.exists() {
        let registry = Registry::open(&registry_path, RuleSet::shipped(), 12)?;
        seed::demo(&registry, now.date_naive())?;
    }
    let private_pem = std::fs::read(&private).map_err(|source| DemoError::Io {
        path: private.clone(),
        source,
    })?;
    let issuer = TokenIssuer::new(&private_pem, "ES256", DEMO_ISSUER, DEMO_AUDIENCE)?;
    for (user, _, _) in seed::DEMO_USERS {
        write_secret(
            &dir.join("tokens").join(format!("{user}.jwt")),
            issuer.issue(user, now.timestamp(), TOKEN_LIFETIME_SECS),
        )?;
    }

    let config = GatewayConfig {
        listen: opts.listen,
        tls: TlsConfig {
            cert: tls.join("server.pem"),
            key: tls.join("server.key"),
            // Mutual TLS is off in the demo so any Flight SQL client can connect; the demo CA has
            // issued certificates for the approved tools (`tls/clients/`) for trying it on.
            client_ca: None,
            client_auth: Default::default(),
        },
        identity: IdentityConfig {
            issuer: DEMO_ISSUER.into(),
            audience: DEMO_AUDIENCE.into(),
            algorithm: "ES256".into(),
            public_key: Some(public),
            leeway_seconds: 30,
            ..IdentityConfig::default()
        },
        registry: RegistryConfig {
            path: registry_path,
            policies,
            training_months: 12,
        },
        data: DataConfig {
            dir: data_dir,
            identifiers: Default::default(),
            versions,
            served,
            // Researchers filter patients by district and age most: those queries read a
            // fraction of the copy.
            served_sort_by: [("patients".to_owned(), vec!["district".to_owned(), "age".to_owned()])].into(),
            string_view: true,
        },
        audit: demo_audit(dir)?,
        disclosure: DisclosureConfig {
            perturbation_key: perturbation,
            ..Default::default()
        },
        limits: LimitsConfig::default(),
        telemetry: Default::default(),
    };
    config.validate()?;
    write(&dir.join("gateway.toml"), config.to_toml())?;
    Ok(config)
}

/// The audit log under `audit/`, its checkpoint signing key (made once and kept, so the log stays
/// verifiable across restarts) and, next to the log, the public key auditors verify with.
fn demo_audit(dir: &Path) -> Result<AuditConfig, DemoError> {
    let signing_key = dir.join("audit-signing.key");
    if !signing_key.exists() {
        write_secret(&signing_key, crate::audit::SigningKey::generate_pem())?;
    }
    make_owner_only(&signing_key)?;
    let pem = std::fs::read_to_string(&signing_key).map_err(|source| DemoError::Io {
        path: signing_key.clone(),
        source,
    })?;
    let key = crate::audit::SigningKey::from_pem(&pem).map_err(|e| DemoError::Io {
        path: signing_key.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    write(&dir.join(AUDIT_PUBLIC_KEY), key.public_key().to_pem())?;
    Ok(AuditConfig {
        dir: dir.join("audit"),
        signing_key,
        checkpoint_records: 1000,
        checkpoint_seconds: 60,
        max_batch: 512,
        delivery_sync_ms: 5,
    })
}

/// File name, under `<world>/keys/`, of the demo's HMAC linkage key.
pub const INGEST_KEY: &str = "ingest-hmac.key";

/// Builds the demo's data under `root` unless it already holds data of the same size and seed:
/// raw extracts in `root/raw/`, one ingest spec per dataset in `root/ingest/`, a linkage key
/// derived from the seed in `root/keys/`, then the real ingest into `root/versions/`, published to
/// `root/data/`. Returns the data folder.
pub fn ensure_data(root: &Path, people: usize, seed: u64) -> Result<PathBuf, DemoError> {
    let data_dir = root.join("data");
    let marker = data_dir.join(".demo-world");
    // The stamp names the generator version, so data from an older generator is remade.
    let stamp = format!("generator=3 people={people} seed={seed}\n");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == stamp) {
        return Ok(data_dir);
    }
    let started = std::time::Instant::now();
    let key = root.join("keys").join(INGEST_KEY);
    // Derived from the seed, like the perturbation key, so that the demo's pseudonyms, and so
    // its record keys and perturbed figures, are the same on every machine. A real deployment's
    // linkage key is random (`LinkageKey::generate_hex`). Whoever holds the key can recompute
    // pseudonyms: owner only.
    write_secret(&key, demo_linkage_key(seed))?;
    let summary = data::generate(&root.join("raw"), people, seed)?;
    let generated_ms = started.elapsed().as_millis() as u64;
    let versions = root.join("versions");
    let served = root.join("served");
    if served.exists() {
        std::fs::remove_dir_all(&served).map_err(|source| DemoError::Io {
            path: served.clone(),
            source,
        })?;
    }
    for spec in data::write_specs(&root.join("ingest"))? {
        let (spec, text) = crate::ingest::spec::IngestSpec::load(&spec, None)?;
        // A new world: versions of an older one would not link with it.
        let old = versions.join(&spec.dataset);
        if old.exists() {
            remove_versions(&old)?;
        }
        let key = crate::ingest::read_key(&spec.key_file)?;
        crate::ingest::ingest(&spec, &text, &key, Utc::now())?;
    }
    tracing::info!(
        people = summary.people,
        generated_ms,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "demo data generated and ingested"
    );
    write(&marker, stamp)?;
    Ok(data_dir)
}

/// The demo world's linkage key: 32 bytes, in hex, derived from the world's seed.
fn demo_linkage_key(seed: u64) -> String {
    use sha2::{Digest, Sha256};
    let key = Sha256::new()
        .chain_update(b"sde-gateway demo linkage key")
        .chain_update(seed.to_le_bytes())
        .finalize();
    hex::encode(key)
}

/// Removes a dataset's old versions (their files are read-only, as versions are immutable).
fn remove_versions(dir: &Path) -> Result<(), DemoError> {
    let io = |source| DemoError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::remove_dir_all(dir).map_err(io)
}

/// A demo CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate for
/// each approved demo tool.
fn make_certificates(dir: &Path) -> Result<(), DemoError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "sde-gateway demo CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write(&dir.join("ca.pem"), ca_cert.pem())?;
    write(&dir.join("server.pem"), server_cert.pem())?;
    write_secret(&dir.join("server.key"), server_key.serialize_pem())?;
    for tool in DEMO_TOOLS {
        let (cert, key) = client_certificate(&issuer, tool)?;
        write(&dir.join("clients").join(format!("{tool}.pem")), cert)?;
        write_secret(&dir.join("clients").join(format!("{tool}.key")), key)?;
    }
    Ok(())
}

/// A client certificate (PEM) and its key naming `tool` in its subject CN, issued by `issuer`.
pub fn client_certificate(
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    tool: &str,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, tool);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}
