//! Keeping the gateway up under load: the memory limit refuses the heavy query while another
//! user's query succeeds, the deadline, the concurrency cap and its queue, per-user rates, the
//! result-size cap, a client going away, graceful shutdown, and config validation.
//!
//! Heavy queries are real cross joins of the demo tables (`patients × asc_services` is 38 million
//! rows; times `ews_referrals` it never finishes on this machine). No assertion depends on how
//! fast the machine is: waits poll a condition with a generous ceiling.

use std::time::Duration;

use tonic::Code;

use crate::helpers::*;

/// Never finishes here: 20 000 × 1 893 × 1 108 rows, counted.
const ENDLESS: &str = "SELECT COUNT(*) AS n FROM patients p CROSS JOIN asc_services a CROSS JOIN ews_referrals e";
/// Grows a hash table per group (and the distinct people behind each) until memory runs out.
const MEMORY_HOG: &str = "SELECT p.age, p.imd_decile, a.weekly_cost, a.start_date, COUNT(*) AS n \
     FROM patients p CROSS JOIN asc_services a GROUP BY p.age, p.imd_decile, a.weekly_cost, a.start_date";
const SMALL: &str = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";

/// Waits until `done()` holds; fails after two minutes (a ceiling, not a timing assertion).
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let give_up = std::time::Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(std::time::Instant::now() < give_up, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes `dave` (accredited, `ecc`) a member of the demo project, so two users can query it.
fn add_dave(config: &sde_gateway::GatewayConfig) {
    let conn = rusqlite::Connection::open(&config.registry.path).unwrap();
    conn.execute("INSERT INTO project_members VALUES (?1, 'dave')", [PROJECT])
        .unwrap();
}

fn audit_records(gw: &TestGateway) -> Vec<serde_json::Value> {
    std::fs::read_to_string(gw.audit_log())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_limit_refuses_the_heavy_query_while_another_users_query_succeeds() {
    let gw = spawn_gateway_with(|c| {
        add_dave(c);
        c.limits.query_memory_bytes = 16 * 1024 * 1024;
        c.limits.memory_pool_bytes = 64 * 1024 * 1024;
    })
    .await;
    let core = gw.core.clone();
    let hog = {
        let mut client = gw.client("alice", PROJECT).await;
        tokio::spawn(async move { query(&mut client, MEMORY_HOG).await })
    };
    // While the hog runs (or as soon as it has been admitted), dave's query goes through.
    eventually("the heavy query is running", || {
        core.limiter.in_flight() >= 1 || hog.is_finished()
    })
    .await;
    let small = gw.query_as("dave", PROJECT, SMALL).await;
    assert!(small.is_ok(), "dave's query failed: {small:?}");

    let err = hog.await.unwrap().expect_err("the cross join must not succeed");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("safe-settings/memory"), "{}", err.message());
    assert!(err.message().contains("limits.query_memory_bytes"), "{}", err.message());
    eventually("the pool is empty again", || core.limiter.memory_reserved() == 0).await;

    let refused = audit_records(&gw)
        .into_iter()
        .find(|r| r["user"] == "alice" && r["call"] == "query.execute")
        .unwrap();
    assert_eq!(refused["decision"], "refused");
    assert_eq!(refused["rule"], "safe-settings/memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_deadline_is_stopped() {
    let gw = spawn_gateway_with(|c| c.limits.query_timeout_seconds = 1).await;
    let err = gw.query_as("alice", PROJECT, ENDLESS).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().starts_with("safe-settings/deadline"), "{}", err.message());
    assert_eq!(gw.core.limiter.in_flight(), 0);
    eventually("the pool is empty again", || gw.core.limiter.memory_reserved() == 0).await;
    // The gateway is still there for the next query.
    gw.query_as("alice", PROJECT, SMALL).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_beyond_the_slots_queue_then_are_refused() {
    let gw = spawn_gateway_with(|c| {
        add_dave(c);
        c.limits.max_concurrent_queries = 1;
        c.limits.max_queued_queries = 1;
    })
    .await;
    let core = gw.core.clone();
    let endless = {
        let mut client = gw.client("alice", PROJECT).await;
        tokio::spawn(async move { query(&mut client, ENDLESS).await })
    };
    eventually("the endless query holds the slot", || core.limiter.in_flight() == 1).await;
    let queued = {
        let mut client = gw.client("dave", PROJECT).await;
        tokio::spawn(async move { query(&mut client, SMALL).await })
    };
    eventually("dave's query is queued", || core.limiter.queued() == 1).await;

    // Slot taken, queue full: refused at once, naming the rule.
    let err = gw.query_as("dave", PROJECT, SMALL).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("safe-settings/concurrency"),
        "{}",
        err.message()
    );

    // The endless query's client goes away: its slot passes to the queued query.
    endless.abort();
    let released = queued.await.unwrap();
    assert!(released.is_ok(), "{released:?}");
    eventually("nothing is in flight", || core.limiter.in_flight() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_going_away_stops_its_query_and_is_audited() {
    let gw = spawn_gateway().await;
    let core = gw.core.clone();
    let endless = {
        let mut client = gw.client("alice", PROJECT).await;
        tokio::spawn(async move { query(&mut client, ENDLESS).await })
    };
    eventually("the query is running", || core.limiter.in_flight() == 1).await;
    eventually("the query holds memory", || core.limiter.memory_reserved() > 0).await;
    endless.abort();
    // The handler was dropped: slot and memory are back, and the call is on the record.
    eventually("nothing is in flight", || core.limiter.in_flight() == 0).await;
    eventually("the pool is empty again", || core.limiter.memory_reserved() == 0).await;
    eventually("the cancellation is audited", || {
        audit_records(&gw)
            .iter()
            .any(|r| r["decision"] == "cancelled" && r["user"] == "alice" && r["rule"] == "client/cancelled")
    })
    .await;
}

#[tokio::test]
async fn each_user_has_a_rate_limit() {
    let gw = spawn_gateway_with(|c| {
        add_dave(c);
        c.limits.user_queries_per_minute = 2;
    })
    .await;
    for _ in 0..2 {
        gw.query_as("alice", PROJECT, SMALL).await.unwrap();
    }
    let err = gw.query_as("alice", PROJECT, SMALL).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("safe-settings/rate-limit"),
        "{}",
        err.message()
    );
    gw.query_as("dave", PROJECT, SMALL).await.unwrap();
}

#[tokio::test]
async fn a_result_over_the_size_cap_is_refused() {
    let gw = spawn_gateway_with(|c| c.limits.max_result_bytes = 64).await;
    let err = gw.query_as("alice", PROJECT, SMALL).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("safe-settings/result-size"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_in_flight_calls_finish_then_checkpoints_the_audit_log() {
    let mut gw = spawn_gateway_with(|c| c.limits.shutdown_grace_seconds = 600).await;
    let core = gw.core.clone();
    // A DoGet stream opened before shutdown...
    let mut client = gw.client("alice", PROJECT).await;
    let info = client.execute(SMALL.to_owned(), None).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let stream = client.do_get(ticket).await.unwrap();
    // ...and a query still running when it begins (a cross join of two million rows).
    let running = {
        let mut client = gw.client("alice", PROJECT).await;
        let sql = "SELECT COUNT(*) AS n FROM asc_services a CROSS JOIN ews_referrals e";
        tokio::spawn(async move { client.execute(sql.to_owned(), None).await })
    };
    eventually("the query is running", || core.limiter.in_flight() == 1).await;
    gw.shut_down().await.expect("clean shutdown");

    use futures::TryStreamExt;
    let batches: Vec<_> = stream.try_collect().await.expect("the open stream finishes");
    assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
    let finished = running.await.unwrap();
    assert!(finished.is_ok(), "the in-flight query finishes: {finished:?}");

    // Nothing new is accepted.
    let ca = std::fs::read(gw.path("tls/ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let refused = tonic::transport::Endpoint::from_shared(format!("https://{}", gw.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    assert!(refused.is_err(), "the port is closed after shutdown");

    // The log is intact, and a signed checkpoint covers every record, both calls' included.
    let records = signed_to_the_end(&gw);
    let calls: Vec<&str> = records.iter().map(|r| r.entry.call.as_str()).collect();
    assert_eq!(calls.iter().filter(|c| **c == "query.execute").count(), 2, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == "query.release").count(), 1, "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_running_queries_are_stopped_and_recorded() {
    let mut gw = spawn_gateway_with(|c| c.limits.shutdown_grace_seconds = 1).await;
    let core = gw.core.clone();
    let endless = {
        let mut client = gw.client("alice", PROJECT).await;
        tokio::spawn(async move { client.execute(ENDLESS.to_owned(), None).await })
    };
    eventually("the query is running", || core.limiter.in_flight() == 1).await;
    gw.shut_down().await.expect("shutdown");
    assert_eq!(core.limiter.in_flight(), 0, "the query was stopped");
    let err = crate::helpers::status(endless.await.unwrap().unwrap_err());
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("safe-settings/shutdown"), "{}", err.message());
    let records = signed_to_the_end(&gw);
    assert_eq!(
        records.last().unwrap().entry.rule.as_deref(),
        Some("safe-settings/shutdown")
    );
}

/// The audit log after shutdown: verified with only the public key, and its last checkpoint
/// signs every record.
fn signed_to_the_end(gw: &crate::helpers::TestGateway) -> Vec<sde_gateway::audit::Record> {
    let key = sde_gateway::audit::PublicKey::load(&gw.path(sde_gateway::demo::AUDIT_PUBLIC_KEY)).unwrap();
    let verified = sde_gateway::audit::verify_dir(&gw.config.audit.dir, &key).unwrap();
    assert_eq!(verified.unsigned, 0, "the shutdown checkpoint covers every record");
    verified.records
}

#[tokio::test]
async fn config_errors_name_the_key_and_stop_before_serving() {
    let gw = spawn_gateway().await;
    let file = gw.path("gateway.toml");
    let cases = [
        (
            "SDE_LIMITS__QUERY_MEMORY_BYTES",
            "99999999999999",
            "limits.query_memory_bytes",
        ),
        (
            "SDE_LIMITS__MAX_CONCURRENT_QUERIES",
            "0",
            "limits.max_concurrent_queries",
        ),
        ("SDE_LIMITS__QUERY_TIMEOUT_SECONDS", "0", "limits.query_timeout_seconds"),
        (
            "SDE_TELEMETRY__OTLP_ENDPOINT",
            "collector:4317",
            "telemetry.otlp_endpoint",
        ),
        ("SDE_TELEMETRY__METRICS_LISTEN", "not-an-address", "metrics_listen"),
        ("SDE_LIMITS__SHUTDOWN_GRACE_SECONDS", "soon", "shutdown_grace_seconds"),
        ("SDE_AUDIT__DELIVERY_SYNC_MS", "60000", "audit.delivery_sync_ms"),
    ];
    for (var, value, key) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
            .args(["serve", "--config"])
            .arg(&file)
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(
            stderr.contains(key),
            "{var}={value}: the error does not name {key}: {stderr}"
        );
        assert!(
            !stderr.contains("serving"),
            "{var}={value}: served before validating: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_passes_while_serving_and_fails_after_shutdown() {
    let mut gw = spawn_gateway().await;
    let probe = |addr: std::net::SocketAddr, ca: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
                .args(["health", "--addr", &addr.to_string(), "--ca"])
                .arg(ca)
                .output()
                .unwrap()
        })
    };
    let up = probe(gw.addr, gw.path("tls/ca.pem")).await.unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), "SERVING");
    // A CA that did not sign the server's certificate: the probe fails (TLS is checked).
    let wrong_ca = gw.path("wrong-ca.pem");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&wrong_ca, other.cert.pem()).unwrap();
    let untrusted = probe(gw.addr, wrong_ca).await.unwrap();
    assert!(!untrusted.status.success());
    gw.shut_down().await.unwrap();
    let down = probe(gw.addr, gw.path("tls/ca.pem")).await.unwrap();
    assert!(!down.status.success(), "the probe fails once the gateway is gone");
}

#[cfg(unix)]
#[tokio::test]
async fn secrets_are_owner_only_and_a_gateway_refuses_to_start_with_one_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = demo_world(dir.path()).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // The demo writes every private key and token readable by its owner only.
    let tokens = dir.path().join("tokens");
    let secrets = [
        config.tls.key.clone(),
        config.audit.signing_key.clone(),
        dir.path().join("keys/jwt-signing.key"),
        tokens.join("alice.jwt"),
        dir.path().join("tls/clients/adbc-python.key"),
    ];
    for secret in &secrets {
        assert_eq!(mode(secret), 0o600, "{}", secret.display());
    }
    // Each secret the gateway reads, made readable by others, stops it at start with a message
    // that names the file and the fix.
    let perturbation = config.disclosure.perturbation_key.clone();
    std::fs::write(&perturbation, "00".repeat(32)).unwrap();
    for (secret, what) in [
        (&config.tls.key, "TLS key"),
        (&config.audit.signing_key, "audit signing key"),
        (&perturbation, "perturbation key"),
    ] {
        std::fs::set_permissions(secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = match sde_gateway::Gateway::build(&config).await {
            Ok(_) => panic!("a gateway started with a world-readable {what}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(what) && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    sde_gateway::Gateway::build(&config)
        .await
        .expect("starts once every secret is owner only");
}
