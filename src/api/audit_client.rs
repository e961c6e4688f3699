//! `sde-gateway audit show|replay`: AuditService clients over TLS, for auditors at a terminal.

use std::path::PathBuf;

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::proto::{self, audit_service_client::AuditServiceClient};

/// Where the server is and who the auditor is. The defaults fit the demo world.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Gateway address.
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    pub server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, default_value = ".sde-demo/tls/ca.pem")]
    pub ca: PathBuf,
    /// Name the server's certificate is checked against.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// File holding the auditor's token (JWT).
    #[arg(long, default_value = ".sde-demo/tokens/auditor.jwt")]
    pub token_file: PathBuf,
}

/// Filters for `audit show`; every one given must match.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowFilter {
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub organisation: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    /// accepted, refused, failed or recovered.
    #[arg(long)]
    pub decision: Option<String>,
    /// RFC 3339 lower bound on the record time.
    #[arg(long)]
    pub from: Option<String>,
    /// RFC 3339 upper bound on the record time.
    #[arg(long)]
    pub to: Option<String>,
    /// First sequence number.
    #[arg(long, default_value_t = 0)]
    pub from_seq: u64,
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

/// Adds the bearer token to every request.
pub type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
/// An AuditService client with its token.
pub type Client = AuditServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

async fn connect(c: &Connection) -> anyhow::Result<Client> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca = std::fs::read(&c.ca).with_context(|| format!("reading CA certificate {}", c.ca.display()))?;
    let token =
        std::fs::read_to_string(&c.token_file).with_context(|| format!("reading token {}", c.token_file.display()))?;
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .context("the token file does not hold a token")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(&c.domain);
    let channel = Endpoint::from_shared(c.server.clone())?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", c.server))?;
    let auth: Auth = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    });
    Ok(AuditServiceClient::with_interceptor(channel, auth))
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Prints matching records, one stored JSON record per line.
pub async fn show(c: &Connection, f: ShowFilter) -> anyhow::Result<()> {
    let mut client = connect(c).await?;
    let request = proto::ListRecordsRequest {
        user: f.user.unwrap_or_default(),
        organisation: f.organisation.unwrap_or_default(),
        project: f.project.unwrap_or_default(),
        decision: f.decision.unwrap_or_default(),
        from_time: f.from.unwrap_or_default(),
        to_time: f.to.unwrap_or_default(),
        from_seq: f.from_seq,
        limit: f.limit,
    };
    let records = client.list_records(request).await.map_err(status)?.into_inner().records;
    for r in records {
        println!("{}", r.json);
    }
    Ok(())
}

/// Replays record `seq`; fails unless the replay confirms the recorded result.
pub async fn replay(c: &Connection, seq: u64) -> anyhow::Result<()> {
    let mut client = connect(c).await?;
    let r = client
        .replay(proto::ReplayRequest { seq })
        .await
        .map_err(status)?
        .into_inner();
    println!("record {}: recorded result {}", r.seq, r.recorded_result_hash);
    println!("           replayed result {}", r.replayed_result_hash);
    println!("plan as recorded: {}", if r.plan_matches { "yes" } else { "no" });
    println!("this replay is audit record {} ({})", r.replay_seq, r.replay_hash);
    if r.confirmed {
        println!("confirmed: the replay released the same result");
        Ok(())
    } else {
        anyhow::bail!("MISMATCH: the replayed result differs from the recorded one")
    }
}
