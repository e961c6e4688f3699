//! Crash safety: a real `sde-gateway` process serving concurrent Flight SQL clients is killed
//! with SIGKILL mid-load, restarted on the same log, and the log must verify with every receipt
//! a client received in it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use sde_gateway::audit::{PublicKey, verify_dir};
use sde_gateway::demo;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::helpers::*;

/// A gateway child process, killed (SIGKILL) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sde-gateway serve --config` and waits for the line saying where it listens; the rest
/// of its log is kept (and the pipe drained, so the child never blocks on it).
fn start(config: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving") {
                let port: String = line
                    .split("127.0.0.1:")
                    .nth(1)
                    .unwrap_or("")
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                let _ = tx.send(port);
            }
            lines.lock().unwrap().push(line);
        }
    });
    let port = rx
        .recv()
        .unwrap_or_else(|_| panic!("gateway did not start: {:?}", log.lock().unwrap()));
    Server {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        child,
        log,
    }
}

/// Queries as alice until the connection fails; sends each receipt once the whole result is in.
async fn client_loop(dir: std::path::PathBuf, addr: SocketAddr, receipts: tokio::sync::mpsc::Sender<(u64, String)>) {
    let ca = std::fs::read(dir.join("tls/ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let Ok(endpoint) = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
    else {
        return;
    };
    let Ok(channel) = endpoint.connect().await else { return };
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(std::fs::read_to_string(dir.join("tokens/alice.jwt")).unwrap());
    client.set_header("x-sde-project", PROJECT);
    loop {
        let Ok(info) = client
            .execute("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex".into(), None)
            .await
        else {
            return;
        };
        let Ok(stream) = client.do_get(info.endpoint[0].ticket.clone().unwrap()).await else {
            return;
        };
        let receipt = {
            let headers = stream.headers();
            let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
            (header("x-sde-audit-seq").parse().unwrap(), header("x-sde-audit-hash"))
        };
        if stream.try_collect::<Vec<_>>().await.is_err() {
            return;
        }
        if receipts.send(receipt).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_load_reopens_with_every_released_result_recorded() {
    let dir = tempfile::tempdir().unwrap();
    demo_world(dir.path()).await;
    let config = dir.path().join("gateway.toml");
    let public = PublicKey::load(&dir.path().join(demo::AUDIT_PUBLIC_KEY)).unwrap();

    let server = tokio::task::spawn_blocking({
        let config = config.clone();
        move || start(&config)
    })
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(client_loop(dir.path().to_owned(), server.addr, tx.clone())))
        .collect();
    drop(tx);
    let mut received = Vec::new();
    while received.len() < 40 {
        received.push(rx.recv().await.expect("clients keep receiving results"));
    }
    // SIGKILL while the clients are still querying.
    drop(server);
    for c in clients {
        let _ = c.await;
    }
    while let Some(r) = rx.recv().await {
        received.push(r);
    }

    // Restart on the same log: it opens cleanly (a torn tail would be moved aside and recorded)
    // and signs a checkpoint over everything before serving.
    let restarted = tokio::task::spawn_blocking(move || start(&config)).await.unwrap();
    let v = verify_dir(&dir.path().join("audit"), &public).expect("the log verifies after the crash");
    assert_eq!(v.unsigned, 0);
    for (seq, hash) in &received {
        let record = &v.records[*seq as usize];
        assert_eq!(&record.hash, hash, "receipt {seq} is in the log");
        assert_eq!(record.entry.call, "query.release");
    }
    let log = restarted.log.lock().unwrap().join("\n");
    let torn = v.records.iter().any(|r| r.entry.call == "audit.recovery");
    assert_eq!(
        torn,
        log.contains("recovered after a crash"),
        "a torn tail is reported in the server log"
    );
}

/// `sde-gateway audit verify` on a folder: its exit status and what it printed.
fn verify_cli(dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
        .args(["audit", "verify", "--dir"])
        .arg(dir.join("audit"))
        .arg("--public-key")
        .arg(dir.join(demo::AUDIT_PUBLIC_KEY))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_running_when_the_process_is_killed_is_on_record() {
    let dir = tempfile::tempdir().unwrap();
    demo_world(dir.path()).await;
    let config = dir.path().join("gateway.toml");
    let server = tokio::task::spawn_blocking({
        let config = config.clone();
        move || start(&config)
    })
    .await
    .unwrap();
    // A query that would run until its deadline (a cross join of three tables).
    let slow = "SELECT COUNT(*) AS n FROM patients p CROSS JOIN asc_services a CROSS JOIN ews_referrals e".to_owned();
    let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(std::fs::read_to_string(dir.path().join("tokens/alice.jwt")).unwrap());
    client.set_header("x-sde-project", PROJECT);
    let running = tokio::spawn(async move { client.execute(slow, None).await.map(|_| ()) });
    // Wait until the gateway has the query on record, then kill it (as the OOM killer would).
    let log = dir.path().join("audit").join("audit.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("query.received")
    {
        assert!(std::time::Instant::now() < deadline, "no received record");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(server);
    assert!(running.await.unwrap().is_err(), "the client sees the connection go");

    // On record, though it never finished; the log is intact with an unsigned tail (exit 2).
    let records = sde_gateway::audit::verify(&log).expect("the chain is intact");
    let last = records.last().unwrap();
    assert_eq!(last.entry.call, "query.received");
    assert!(last.entry.sql.as_deref().unwrap().contains("CROSS JOIN ews_referrals"));
    let (code, text) = verify_cli(dir.path());
    assert_eq!(code, sde_gateway::cli::UNSIGNED_TAIL_EXIT, "{text}");
    assert!(text.contains("(unsigned tail)"), "{text}");

    // The next start signs the tail: exit 0.
    let restarted = tokio::task::spawn_blocking(move || start(&config)).await.unwrap();
    let (code, text) = verify_cli(dir.path());
    assert_eq!(code, 0, "{text}");
    drop(restarted);

    // Tampering is told apart: exit 1.
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"received\"", "\"accepted\"", 1)).unwrap();
    assert_eq!(verify_cli(dir.path()).0, 1);
}
