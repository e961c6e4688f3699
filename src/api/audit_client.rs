//! `sde-gateway audit show|replay`: AuditService clients over TLS, for auditors at a terminal.

use std::path::PathBuf;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::client::{Bearer, tls_channel};
use super::proto::{self, audit_service_client::AuditServiceClient};

/// Where the server is and who the auditor is. The defaults fit the demo world.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Gateway address (`https://host:port`, or `host:port`).
    #[arg(long, visible_alias = "addr", default_value = "https://127.0.0.1:50051")]
    pub server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, default_value = ".sde-demo/tls/ca.pem")]
    pub ca: PathBuf,
    /// Name the server's certificate is checked against.
    #[arg(long, visible_alias = "server-name", default_value = "localhost")]
    pub domain: String,
    /// File holding the auditor's token (JWT).
    #[arg(long, visible_alias = "token", default_value = ".sde-demo/tokens/auditor.jwt")]
    pub token_file: PathBuf,
    #[command(flatten)]
    pub client: crate::api::client::ClientCert,
}

/// The decisions an audit record can hold: a call accepted, refused by a rule or failed; a query
/// received (on record before it runs); a call cancelled by its client; a record recovered at
/// start.
pub const DECISIONS: [&str; 6] = ["accepted", "refused", "failed", "received", "cancelled", "recovered"];

/// Filters for `audit show`; every one given must match.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowFilter {
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub organisation: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    /// What the gateway decided: one of the values below.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(DECISIONS))]
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

/// An AuditService client with the auditor's token.
pub type Client = AuditServiceClient<InterceptedService<Channel, Bearer>>;

async fn connect(c: &Connection) -> anyhow::Result<Client> {
    let bearer = Bearer::from_file(&c.token_file)?;
    let channel = tls_channel(&c.server, &c.ca, &c.domain, None, &c.client).await?;
    Ok(AuditServiceClient::with_interceptor(channel, bearer))
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
