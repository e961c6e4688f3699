//! `spawn_gateway()`: a demo world in a temporary folder (sharing one generated data set), the
//! gateway serving it on 127.0.0.1:0, and Flight SQL clients for any demo user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use sde_gateway::api::proto::admin_service_client::AdminServiceClient;
use sde_gateway::demo::{self, DemoOptions};
use sde_gateway::identity::TokenIssuer;
use sde_gateway::{Gateway, GatewayConfig};
use tokio::sync::oneshot;
use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub const PEOPLE: usize = 20_000;
pub const SEED: u64 = 2026;
pub const PROJECT: &str = "ews-asc-linkage";

/// The synthetic data (raw extracts put through the real ingest), made once per build and
/// shared by every test; returns its data folder.
pub fn world_data() -> PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-world-{PEOPLE}-{SEED}"));
        demo::ensure_data(&dir, PEOPLE, SEED).expect("demo data")
    })
    .clone()
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: GatewayConfig,
    /// The walk, for its load figures (queries in flight, memory reserved).
    pub core: std::sync::Arc<sde_gateway::gateway::Core>,
    /// Read by the telemetry tests (`tests/telemetry.rs`).
    #[allow(dead_code)]
    pub telemetry: sde_gateway::telemetry::Telemetry,
    /// The Prometheus listener, when `telemetry.metrics_listen` is set.
    #[allow(dead_code)]
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    run: Option<tokio::task::JoinHandle<Result<(), sde_gateway::server::ServerError>>>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn spawn_gateway() -> TestGateway {
    spawn_gateway_with(|_| {}).await
}

/// A demo world in `dir` (sharing the generated data) listening on 127.0.0.1:0; its config is
/// also written to `dir/gateway.toml`.
pub async fn demo_world(dir: &Path) -> GatewayConfig {
    let opts = DemoOptions {
        dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        people: PEOPLE,
        seed: SEED,
        data_dir: Some(world_data()),
    };
    tokio::task::spawn_blocking(move || demo::prepare(&opts, chrono::Utc::now()))
        .await
        .unwrap()
        .expect("demo world")
}

/// As [`spawn_gateway`], with the demo config adjusted first.
pub async fn spawn_gateway_with(adjust: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_world(dir.path()).await;
    adjust(&mut config);
    let gateway = Gateway::build(&config).await.expect("gateway builds");
    let addr = gateway.local_addr();
    let core = gateway.core();
    let telemetry = gateway.telemetry().clone();
    let metrics_addr = gateway.metrics_addr();
    let (tx, rx) = oneshot::channel();
    let run = tokio::spawn(gateway.run(async {
        let _ = rx.await;
    }));
    TestGateway {
        addr,
        dir,
        config,
        core,
        telemetry,
        metrics_addr,
        shutdown: Some(tx),
        run: Some(run),
    }
}

impl TestGateway {
    /// Begins a graceful shutdown (as SIGTERM does) and waits for the server to finish.
    pub async fn shut_down(&mut self) -> Result<(), sde_gateway::server::ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.run.take() {
            Some(run) => run.await.expect("server task"),
            None => Ok(()),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn token(&self, user: &str) -> String {
        std::fs::read_to_string(self.path(&format!("tokens/{user}.jwt"))).unwrap()
    }

    pub async fn channel(&self) -> Channel {
        let ca = std::fs::read(self.path("tls/ca.pem")).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("TLS connection")
    }

    /// A client with `token` (raw) and `project` headers, either optional.
    pub async fn client_with(&self, token: Option<String>, project: Option<&str>) -> FlightSqlServiceClient<Channel> {
        let mut client = FlightSqlServiceClient::new(self.channel().await);
        if let Some(token) = token {
            client.set_token(token);
        }
        if let Some(project) = project {
            client.set_header("x-sde-project", project);
        }
        client
    }

    pub async fn client(&self, user: &str, project: &str) -> FlightSqlServiceClient<Channel> {
        self.client_with(Some(self.token(user)), Some(project)).await
    }

    pub async fn query_as(&self, user: &str, project: &str, sql: &str) -> Result<Vec<RecordBatch>, Status> {
        query(&mut self.client(user, project).await, sql).await
    }

    /// Signs a token for `user` with the demo world's key, as its identity provider would.
    pub fn mint(&self, user: &str, issued_at: i64, lifetime_secs: i64) -> String {
        let key = std::fs::read(self.path("keys/jwt-signing.key")).unwrap();
        let issuer = TokenIssuer::new(&key, "ES256", demo::DEMO_ISSUER, demo::DEMO_AUDIENCE).unwrap();
        issuer.issue(user, issued_at, lifetime_secs)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub fn audit_log(&self) -> PathBuf {
        self.config.audit.dir.join(sde_gateway::audit::LOG_FILE)
    }
}

/// A gRPC request carrying a bearer token.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

pub fn status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        other => Status::unknown(other.to_string()),
    }
}

/// GetFlightInfo then DoGet; also returns the result schema announced by GetFlightInfo (with
/// the disclosure metadata), which is there even when every group was withheld. It is the
/// schema researchers see: the Python ADBC driver gives its tables the FlightInfo's schema, not
/// the DoGet stream's, so the disclosure report must be in the FlightInfo.
pub async fn query_described(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> Result<(datafusion::arrow::datatypes::Schema, Vec<RecordBatch>), Status> {
    let info = client.execute(sql.to_owned(), None).await.map_err(status)?;
    let schema = info.clone().try_decode_schema().expect("schema");
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let stream = client.do_get(ticket).await.map_err(status)?;
    Ok((schema, stream.try_collect().await.map_err(status)?))
}

/// GetFlightInfo then DoGet on the returned ticket.
pub async fn query(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<Vec<RecordBatch>, Status> {
    let info = client.execute(sql.to_owned(), None).await.map_err(status)?;
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let stream = client.do_get(ticket).await.map_err(status)?;
    stream.try_collect().await.map_err(status)
}

/// Plain DataFusion on the raw Parquet files, for independent expected values.
pub async fn raw(data: &Path, sql: &str) -> Vec<RecordBatch> {
    let ctx = datafusion::prelude::SessionContext::new();
    for dataset in ["patients", "gp_events", "asc_services", "ews_referrals", "opt_outs"] {
        ctx.register_parquet(dataset, data.join(dataset).to_str().unwrap(), Default::default())
            .await
            .unwrap();
    }
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}
