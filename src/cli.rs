//! The command line: `serve` (the demo world or a production config), `admin`, `audit`,
//! `health`, `issue-token`, `ingest` and `demo-data`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::GatewayConfig;
use crate::demo::{self, DemoOptions};
use crate::server::Gateway;

#[derive(Debug, Parser)]
#[command(
    name = "sde-gateway",
    version,
    about = "The front door of a Secure Data Environment: Flight SQL with the Five Safes enforced on every query"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// One parsed command line lives for the life of the process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve Flight SQL over TLS.
    Serve {
        /// Create (if needed) and serve the demo world.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        demo: bool,
        /// Production configuration file (see config/gateway.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Folder of the demo world.
        #[arg(long, default_value = ".sde-demo", requires = "demo")]
        dir: PathBuf,
        /// Address to listen on (demo only; with --config use `listen`).
        #[arg(long, default_value = "127.0.0.1:50051", requires = "demo")]
        listen: SocketAddr,
        /// Number of synthetic people in the demo world.
        #[arg(long, default_value_t = demo::DEFAULT_PEOPLE, requires = "demo")]
        people: usize,
    },
    /// Administer the registry through a running gateway (AdminService).
    Admin {
        #[command(flatten)]
        connection: crate::admin_client::Connection,
        #[command(subcommand)]
        command: crate::admin_client::AdminCommand,
    },
    /// Researchers: ask for the release of a result's withheld cells, follow and fetch it
    /// (ReviewService).
    Release {
        #[command(flatten)]
        connection: crate::admin_client::Connection,
        #[command(subcommand)]
        command: crate::review_client::ReleaseCommand,
    },
    /// Output checkers: review release requests (ReviewService).
    Review {
        #[command(flatten)]
        connection: crate::admin_client::Connection,
        #[command(subcommand)]
        command: crate::review_client::ReviewCommand,
    },
    /// Auditor tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Probe a gateway's gRPC health over TLS (container and Kubernetes health checks): exits 0
    /// when it is SERVING, 1 otherwise.
    Health {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: SocketAddr,
        /// CA certificate (PEM) that signed the gateway's certificate.
        #[arg(long)]
        ca: PathBuf,
        /// Name the gateway's certificate is issued for.
        #[arg(long, default_value = "localhost")]
        domain: String,
        #[command(flatten)]
        client: crate::api::client::ClientCert,
    },
    /// Sign a token for a user, for deployments without an identity provider: with the private
    /// half of `identity.public_key`, for the issuer and audience the config names, checked by
    /// the gateway's own verifier before it is printed (to stdout).
    IssueToken {
        /// The gateway's configuration file (its `[identity]` section is read).
        #[arg(long)]
        config: PathBuf,
        /// The private signing key (PEM), readable by its owner only.
        #[arg(long)]
        signing_key: PathBuf,
        /// The user the token names (`sub`), as registered.
        #[arg(long)]
        user: String,
        /// How long the token lives: `8h`, `30m`, `90s` or seconds; at most 24h.
        #[arg(long, default_value = "8h", value_parser = crate::identity::issue::parse_ttl)]
        ttl: i64,
    },
    /// Pseudonymise a raw extract (CSV or Parquet) into a new dataset version, as its spec says
    /// (see config/ingest.example.toml). SDE_INGEST__KEY_FILE overrides the spec's key file.
    Ingest {
        #[arg(long)]
        spec: PathBuf,
    },
    /// Write the demo's synthetic raw extracts and ingest specs to OUT/raw and OUT/ingest, and
    /// ingest them (key in OUT/keys) into OUT/versions and OUT/data.
    DemoData {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = demo::DEFAULT_PEOPLE)]
        people: usize,
        #[arg(long, default_value_t = demo::DEFAULT_SEED)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify a whole audit log offline: every record's hash, its link to the one before and
    /// its sequence number, and every signed checkpoint (signature, Merkle root, truncation).
    /// Exits 0 when every record is intact and signed; 2 when every record is intact but some
    /// after the last checkpoint are not yet signed (an unsigned tail: the gateway is running,
    /// or stopped abnormally and signs them at its next start); 1 naming the first bad record
    /// or checkpoint.
    Verify {
        /// The audit folder (holding audit.log and checkpoints.log).
        #[arg(long)]
        dir: PathBuf,
        /// The checkpoint public key (PEM), e.g. `.sde-demo/audit.pub`.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// List audit records from a running gateway (role auditor), one JSON record per line.
    Show {
        #[command(flatten)]
        connection: crate::api::audit_client::Connection,
        #[command(flatten)]
        filter: crate::api::audit_client::ShowFilter,
    },
    /// Re-run a released (or executed) query on a running gateway and check it gives the recorded
    /// result.
    Replay {
        /// Sequence number of the query.release (or accepted query.execute) record.
        #[arg(long)]
        seq: u64,
        #[command(flatten)]
        connection: crate::api::audit_client::Connection,
    },
}

/// Runs a parsed command line to completion.
/// `audit verify`'s exit status for an intact log with an unsigned tail (damage exits 1).
pub const UNSIGNED_TAIL_EXIT: i32 = 2;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::IssueToken {
            config,
            signing_key,
            user,
            ttl,
        } => {
            crate::server::owner_only("signing key", &signing_key)?;
            let config = GatewayConfig::load(&config)?;
            let token = crate::identity::issue::issue_token(&config.identity, &signing_key, &user, ttl).await?;
            println!("{token}");
        }
        Command::Serve {
            demo: true,
            dir,
            listen,
            people,
            ..
        } => {
            let started = std::time::Instant::now();
            let opts = DemoOptions {
                dir: dir.clone(),
                listen,
                people,
                seed: demo::DEFAULT_SEED,
                data_dir: None,
            };
            let config = tokio::task::spawn_blocking(move || demo::prepare(&opts, chrono::Utc::now())).await??;
            // `SDE_…` variables apply to the demo too (telemetry and limits in a container).
            let config = config.with_env(std::env::vars())?;
            let gateway = Gateway::build(&config).await?;
            eprintln!(
                "sde-gateway demo ready in {} ms: Flight SQL over TLS on {}\n  CA certificate: {}\n  tokens:         {}\n  project header: x-sde-project: ews-asc-linkage",
                started.elapsed().as_millis(),
                gateway.local_addr(),
                dir.join("tls/ca.pem").display(),
                dir.join("tokens/<user>.jwt").display(),
            );
            gateway.run(shutdown_signal()).await?;
        }
        Command::Serve { config: Some(path), .. } => {
            let config = GatewayConfig::load(&path)?;
            let gateway = Gateway::build(&config).await?;
            gateway.run(shutdown_signal()).await?;
        }
        Command::Serve { .. } => anyhow::bail!("serve needs --demo or --config FILE"),
        Command::Admin { connection, command } => crate::admin_client::run(&connection, command).await?,
        Command::Release { connection, command } => crate::review_client::release(&connection, command).await?,
        Command::Review { connection, command } => crate::review_client::review(&connection, command).await?,
        Command::Audit {
            command: AuditCommand::Verify { dir, public_key },
        } => {
            let key = crate::audit::PublicKey::load(&public_key)?;
            let v = crate::audit::verify_dir(&dir, &key)?;
            let last = v.checkpoints.last().map(|c| c.root.as_str()).unwrap_or("(empty log)");
            println!(
                "audit log intact: {} records, {} signed checkpoints, latest root {last}; {} records after it not yet signed",
                v.records.len(),
                v.checkpoints.len(),
                v.unsigned
            );
            if v.unsigned > 0 {
                // Intact but not all signed: a gateway that is running, or one that stopped
                // abnormally (it signs the tail when it next starts). Not tampering (exit 1).
                eprintln!(
                    "{} records after the last signed checkpoint (unsigned tail): intact in the hash chain, not yet signed",
                    v.unsigned
                );
                std::process::exit(UNSIGNED_TAIL_EXIT);
            }
        }
        Command::Health {
            addr,
            ca,
            domain,
            client,
        } => health(addr, &ca, &domain, &client).await?,
        Command::Ingest { spec } => {
            let started = std::time::Instant::now();
            let report = tokio::task::spawn_blocking(move || crate::ingest::run(&spec)).await??;
            println!("{}", crate::ingest::describe(&report, started.elapsed()));
        }
        Command::Audit {
            command: AuditCommand::Show { connection, filter },
        } => crate::api::audit_client::show(&connection, filter).await?,
        Command::Audit {
            command: AuditCommand::Replay { seq, connection },
        } => crate::api::audit_client::replay(&connection, seq).await?,
        Command::DemoData { out, people, seed } => {
            let started = std::time::Instant::now();
            let data = tokio::task::spawn_blocking(move || demo::ensure_data(&out, people, seed)).await??;
            println!(
                "{people} people written and ingested in {:.1}s; data in {}",
                started.elapsed().as_secs_f64(),
                data.display()
            );
        }
    }
    Ok(())
}

/// One gRPC health check over TLS, bounded to a few seconds.
async fn health(
    addr: SocketAddr,
    ca: &std::path::Path,
    domain: &str,
    client: &crate::api::client::ClientCert,
) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let timeout = Some(std::time::Duration::from_secs(3));
    let channel = crate::api::client::tls_channel(&format!("https://{addr}"), ca, domain, timeout, client).await?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await?
        .into_inner();
    if reply.status() != ServingStatus::Serving {
        anyhow::bail!("gateway at {addr} is {:?}", reply.status());
    }
    println!("SERVING");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
