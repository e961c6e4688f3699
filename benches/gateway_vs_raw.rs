//! The gateway against the raw engine, on the same Parquet files in one run (issue 7).
//!
//! For each query of a fixed set, four ways:
//! 1. `flight`: end to end through the gateway — Flight SQL over TLS with a signed token, Safe
//!    People and Safe Projects, the plan checks, Safe Outputs and the audit log;
//! 2. `raw`: plain DataFusion in this process on the raw files, the same SQL;
//! 3. `core`: the gateway's own walk in this process, without the network;
//! 4. `tmpfs log`: as `flight`, to a second gateway whose audit log is on a tmpfs, so that the
//!    cost of the disk's durable writes shows apart from the rest.
//!
//! Then the small query at 1, 8 and 32 concurrent Flight SQL clients (throughput, p50, p99,
//! errors), 64 concurrent heavy queries (completed, refused, errors), and the peak memory of the
//! process. The report is printed and written between the `gateway_vs_raw` markers of
//! `docs/benchmarks.md`.
//!
//! Run: `cargo bench --bench gateway_vs_raw -- [PEOPLE] [RUNS]` (defaults 1000000 and 10). The
//! demo world is made once in target/bench-gateway-PEOPLE.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use sde_gateway::demo::{self, DemoOptions};
use sde_gateway::engine::LocalStore;
use sde_gateway::gateway::{CallContext, Core};
use sde_gateway::identity::Subject;
use sde_gateway::registry::admin;
use sde_gateway::registry::rules::RuleSet;
use sde_gateway::registry::{BOARD_ROLES, Registry};
use sde_gateway::{Gateway, GatewayConfig};
use tonic::transport::Channel;

mod common;
use common::{percentile, timed, timing};

const PROJECT: &str = "bench";
const USER: &str = "alice";
/// A query that touches little data: the smallest dataset, one small column.
const SMALL: &str = "SELECT outcome, COUNT(*) AS n FROM ews_referrals GROUP BY outcome";
const HEAVY: &str = "SELECT snomed_code, COUNT(DISTINCT person_id) AS people FROM gp_events GROUP BY 1";

const QUERIES: [(&str, &str); 12] = [
    (
        "age band x sex x district",
        "SELECT age_band, sex, district, COUNT(*) AS n FROM patients GROUP BY 1, 2, 3",
    ),
    (
        "worked example",
        "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex",
    ),
    (
        "EWS -> ASC pathway",
        "SELECT r.outcome, COUNT(DISTINCT a.person_id) AS people FROM ews_referrals r JOIN asc_services a ON r.person_id = a.person_id WHERE a.start_date > r.referral_date GROUP BY 1",
    ),
    (
        "EWS source -> ASC service",
        "SELECT r.referral_source, a.service_type, COUNT(DISTINCT r.person_id) AS people FROM ews_referrals r JOIN asc_services a ON r.person_id = a.person_id GROUP BY 1, 2",
    ),
    (
        "mean weekly cost by service",
        "SELECT service_type, AVG(weekly_cost) AS mean_cost, SUM(weekly_cost) AS total FROM asc_services GROUP BY 1",
    ),
    (
        "GP codes, distinct people",
        "SELECT snomed_code, COUNT(DISTINCT person_id) AS people FROM gp_events GROUP BY 1",
    ),
    (
        "GP events by year",
        "SELECT date_part('year', event_date) AS year, COUNT(*) AS events FROM gp_events GROUP BY 1",
    ),
    (
        "cohort: 65+ by district, ethnicity",
        "SELECT district, ethnicity, COUNT(*) AS n FROM patients WHERE age >= 65 GROUP BY 1, 2",
    ),
    (
        "cohort: diabetes by age band",
        "SELECT p.age_band, COUNT(DISTINCT p.person_id) AS people FROM patients p JOIN gp_events g ON p.person_id = g.person_id WHERE g.snomed_code = '44054006' GROUP BY 1",
    ),
    (
        "IMD decile x ASC service",
        "SELECT p.imd_decile, a.service_type, COUNT(DISTINCT p.person_id) AS people FROM patients p JOIN asc_services a ON p.person_id = a.person_id GROUP BY 1, 2",
    ),
    (
        "one district (filtered count)",
        "SELECT COUNT(*) AS n FROM patients WHERE district = 'Maldon'",
    ),
    ("small query", SMALL),
];

/// A project granting every demo dataset to alice, approved by the whole board (made once).
async fn bench_project(config: &GatewayConfig, columns: &std::collections::BTreeMap<String, Vec<String>>) {
    let registry = Registry::open(&config.registry.path, RuleSet::shipped(), 12).expect("registry");
    let change = registry.begin().await.expect("registry transaction");
    let conn = change.conn();
    if admin::project(conn, PROJECT).is_ok() {
        return;
    }
    let today = chrono::Utc::now().date_naive();
    let day = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
    let project = admin::Project {
        id: PROJECT.into(),
        title: "Benchmark".into(),
        purpose: "Measure the gateway".into(),
        lawful_basis: "n/a".into(),
        start_date: day(today - chrono::Days::new(1)),
        end_date: day(today + chrono::Days::new(365)),
        parties: vec!["ecc".into()],
        ..Default::default()
    };
    admin::create_project(conn, &project).expect("project");
    admin::add_member(conn, PROJECT, USER).expect("member");
    for (dataset, cols) in columns {
        admin::grant(conn, PROJECT, dataset, cols, columns).expect("grant");
    }
    admin::transition(conn, PROJECT, &["draft"], "submitted").expect("submit");
    for (role, user) in BOARD_ROLES.iter().zip(["guardian", "ccio", "public-rep"]) {
        admin::decide(conn, PROJECT, role, user, true, "", today).expect("approval");
    }
    change.commit().expect("commit");
}

async fn flight_client(dir: &Path, addr: std::net::SocketAddr) -> FlightSqlServiceClient<Channel> {
    let channel = sde_gateway::api::client::tls_channel(
        &format!("https://{addr}"),
        &dir.join("tls/ca.pem"),
        "localhost",
        None,
        &Default::default(),
    )
    .await
    .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(std::fs::read_to_string(dir.join(format!("tokens/{USER}.jwt"))).unwrap());
    client.set_header("x-sde-project", PROJECT);
    client
}

async fn flight_query(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<usize, String> {
    let info = client.execute(sql.to_owned(), None).await.map_err(|e| e.to_string())?;
    let ticket = info.endpoint[0].ticket.clone().ok_or("no ticket")?;
    let batches: Vec<_> = client
        .do_get(ticket)
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(batches.iter().map(|b| b.num_rows()).sum())
}

/// The walk in process; a refusal (at this size, differencing can refuse a query) is an
/// outcome like any other, reported with the timings.
async fn core_query(core: &Core, call: &CallContext, sql: &str) -> Result<(), String> {
    let planned = core.plan_query(call, sql).await.map_err(|e| e.rule())?;
    core.run_query(call, &planned.handle).await.map_err(|e| e.rule())?;
    Ok(())
}

/// A second gateway on the same world whose audit log is on a tmpfs (`/dev/shm`): every record
/// is still written, hash-chained and synced, but the sync costs next to nothing. Flight SQL
/// through it against through the first splits the cost of the disk's durable writes from the
/// rest of the gateway's. `None` where there is no `/dev/shm`.
async fn tmpfs_gateway(config: &GatewayConfig) -> Option<TmpfsGateway> {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return None;
    }
    let audit = shm.join(format!("sde-gateway-bench-{}", std::process::id()));
    let mut config = config.clone();
    config.audit.dir = audit.clone();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.telemetry.metrics_listen = None;
    let gateway = Gateway::build(&config)
        .await
        .expect("the gateway with its log on a tmpfs");
    let addr = gateway.local_addr();
    tokio::spawn(gateway.run(std::future::pending()));
    Some(TmpfsGateway { addr, audit })
}

/// Makes every record of the gateway's log durable now (with a checkpoint over them).
async fn sync_log(core: &Core) {
    let audit = core.audit.clone();
    tokio::task::spawn_blocking(move || audit.checkpoint_blocking())
        .await
        .unwrap()
        .expect("the bench's audit log syncs");
}

/// The gateway of [`tmpfs_gateway`]: its address, and its audit log's folder, removed (memory
/// freed) when this is dropped.
struct TmpfsGateway {
    addr: std::net::SocketAddr,
    audit: PathBuf,
}

impl Drop for TmpfsGateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.audit);
    }
}

/// The machine, for the report: CPU model, cores and memory.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {memory}")
}

fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// What a closed loop of clients measured: each client sends its next query as soon as its
/// last one returns.
struct Load {
    per_second: f64,
    p50: f64,
    p99: f64,
    errors: usize,
}

/// Runs `query` in a loop in each of `clients` tasks until `duration` has passed since
/// `started`.
async fn closed_loop<C, F, Fut, T, E>(clients: Vec<C>, started: Instant, duration: Duration, query: F) -> Load
where
    C: Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (C, Result<T, E>)> + Send,
{
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let query = query.clone();
            tokio::spawn(async move {
                let (mut times, mut errors) = (Vec::new(), 0usize);
                while started.elapsed() < duration {
                    let t = Instant::now();
                    let (back, outcome) = query(client).await;
                    client = back;
                    match outcome {
                        Ok(_) => times.push(t.elapsed().as_secs_f64() * 1000.0),
                        Err(_) => errors += 1,
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (times, e) = task.await.unwrap();
        all.extend(times);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Load {
        per_second: all.len() as f64 / elapsed,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        errors,
    }
}

/// Plain DataFusion on the served datasets under `data`; with `local_store`, reading the files
/// through the gateway's [`LocalStore`] rather than `object_store`'s `LocalFileSystem`.
async fn raw_context(data: &Path, local_store: bool) -> SessionContext {
    let raw = SessionContext::new();
    if local_store {
        raw.runtime_env().register_object_store(
            ObjectStoreUrl::local_filesystem().as_ref(),
            std::sync::Arc::new(LocalStore::default()),
        );
    }
    for dataset in ["patients", "gp_events", "asc_services", "ews_referrals"] {
        let path = data.join(dataset);
        raw.register_parquet(dataset, path.to_str().unwrap(), Default::default())
            .await
            .unwrap();
    }
    raw
}

/// `clients` Flight SQL clients each sending the small query for `duration`.
async fn concurrent(dir: &Path, addr: std::net::SocketAddr, clients: usize, duration: Duration) -> Load {
    let mut connected = Vec::new();
    for _ in 0..clients {
        connected.push(flight_client(dir, addr).await);
    }
    closed_loop(connected, Instant::now(), duration, |mut client| async move {
        let outcome = flight_query(&mut client, SMALL).await;
        (client, outcome)
    })
    .await
}

/// The same load on plain DataFusion in-process: `clients` tasks sharing one session.
async fn concurrent_raw(raw: &SessionContext, clients: usize, duration: Duration) -> Load {
    let sessions = vec![raw.clone(); clients];
    closed_loop(sessions, Instant::now(), duration, |raw| async move {
        let outcome = match raw.sql(SMALL).await {
            Ok(frame) => frame.collect().await,
            Err(e) => Err(e),
        };
        (raw, outcome)
    })
    .await
}

/// Plain DataFusion's small query on the Parquet files and on the same rows held decoded in
/// memory (a `MemTable`), taking turns, 3 000 runs each way twice: how much of the small
/// query is reading Parquet.
async fn parquet_vs_memory(raw: &SessionContext) {
    let frame = raw.table("ews_referrals").await.unwrap();
    let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
    let table = datafusion::datasource::MemTable::try_new(schema, vec![frame.collect().await.unwrap()]).unwrap();
    let memory = SessionContext::new();
    memory
        .register_table("ews_referrals", std::sync::Arc::new(table))
        .unwrap();
    for (way, ctx) in [
        ("parquet", raw),
        ("memory", &memory),
        ("parquet", raw),
        ("memory", &memory),
    ] {
        let t = common::time(3000, || async {
            ctx.sql(SMALL).await.unwrap().collect().await.unwrap();
        })
        .await;
        eprintln!("{way}: median {:.3} ms, p95 {:.3} ms", t.median, t.p95);
    }
}

/// The floors under any query through the gateway, medians in milliseconds: a bare gRPC call
/// over TLS (the health check), and a small append made durable on the disk the world is on.
async fn floors(dir: &Path, addr: std::net::SocketAddr) -> (f64, f64) {
    let channel = sde_gateway::api::client::tls_channel(
        &format!("https://{addr}"),
        &dir.join("tls/ca.pem"),
        "localhost",
        None,
        &Default::default(),
    )
    .await
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest::default();
    let mut calls = Vec::new();
    for _ in 0..2000 {
        calls.push(timed(async { health.check(check.clone()).await.unwrap() }).await);
    }
    (timing(calls).median, sync_floor(dir, false))
}

/// Median of 2 000 600-byte writes each made durable with `fdatasync`, in a file in `dir`:
/// appended (the file grows, so its size is synced too), or, `overwrite`, over space already
/// written and synced (as a preallocated log would).
fn sync_floor(dir: &Path, overwrite: bool) -> f64 {
    use std::io::{Seek, Write};
    let path = dir.join("fdatasync-floor");
    let mut file = std::fs::File::create(&path).unwrap();
    let line = [b'x'; 600];
    if overwrite {
        file.write_all(&vec![0; 2000 * line.len()]).unwrap();
        file.sync_all().unwrap();
        file.rewind().unwrap();
    }
    let mut syncs = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        file.write_all(&line).and_then(|()| file.sync_data()).unwrap();
        syncs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    std::fs::remove_file(&path).unwrap();
    timing(syncs).median
}

/// Per step, the sum (seconds) and count of the step-latency histogram, from the Prometheus
/// listener.
async fn step_totals(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, (f64, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let mut totals = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("sde_step_duration")) {
        let (Some(step), Some(value)) = (
            line.split("step=\"").nth(1).and_then(|r| r.split('"').next()),
            line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        let entry = totals.entry(step.to_owned()).or_insert((0.0, 0.0));
        if line.contains("_sum") {
            entry.0 += value;
        } else if line.contains("_count") {
            entry.1 += value;
        }
    }
    totals
}

fn step_means(
    before: &std::collections::BTreeMap<String, (f64, f64)>,
    after: &std::collections::BTreeMap<String, (f64, f64)>,
) -> String {
    sde_gateway::telemetry::STEPS
        .iter()
        .filter_map(|step| {
            let (s1, c1) = after.get(*step)?;
            let (s0, c0) = before.get(*step).copied().unwrap_or_default();
            let calls = c1 - c0;
            (calls > 0.0).then(|| format!("{step} {:.2} ms", (s1 - s0) / calls * 1000.0))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replaces the text between the report's markers in `docs/benchmarks.md`.
fn write_report(report: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
    let (start, end) = ("<!-- gateway_vs_raw:start -->", "<!-- gateway_vs_raw:end -->");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let updated = match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{start}\n{report}{}", &text[..a], &text[b..]),
        _ => format!("{text}\n{start}\n{report}{end}\n"),
    };
    std::fs::write(&path, updated).unwrap();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let people: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-gateway-{people}"));
    let opts = DemoOptions {
        dir: dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        people,
        seed: demo::DEFAULT_SEED,
        data_dir: None,
    };
    let config = tokio::task::spawn_blocking(move || demo::prepare(&opts, chrono::Utc::now()))
        .await
        .unwrap()
        .expect("demo world");
    // `SDE_…` overrides apply as for `serve --demo` (`SDE_LIMITS__MAX_CONCURRENT_QUERIES=2`, say).
    let mut config = config.with_env(std::env::vars()).expect("SDE_ overrides");
    // One benchmark user sends every query, so the per-user caps (meant to share the gateway
    // between researchers) are lifted; the gateway-wide limits stay as shipped (or as overridden).
    config.limits.user_queries_per_minute = 1_000_000;
    config.limits.max_concurrent_queries_per_user = 128;
    config.limits.max_queued_queries = 128;
    // Its project would spend the demo's release budget (a day of exploration) in the first
    // minute: the budget is kept, and charged, but never runs out.
    config.disclosure.release_budget_cells = i64::MAX as u64;
    // The Prometheus listener, to read the per-step latency of the small query.
    config.telemetry.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    // Each run writes an audit log of its own: kept across runs, the bench's log grew by tens of
    // thousands of records a run (925 683 after a day of runs), and opening it came to take
    // seconds and most of the process's peak memory before the heavy queries.
    config.audit.dir = dir.join("audit-bench");
    if config.audit.dir.exists() {
        std::fs::remove_dir_all(&config.audit.dir).expect("the last run's audit log removed");
    }

    let gateway = Gateway::build(&config).await.expect("gateway");
    let core = gateway.core();
    bench_project(&config, &core.engine.columns()).await;
    let addr = gateway.local_addr();
    let metrics_addr = gateway.metrics_addr().expect("metrics listener");
    tokio::spawn(gateway.run(std::future::pending()));

    let raw = raw_context(&config.data.dir, false).await;
    let call = CallContext {
        authenticated: Ok(Subject { user: USER.into() }),
        project: Some(PROJECT.into()),
        client_tool: None,
    };
    // For profiling (`perf record`): only the gateway's walk of one query, for 20 s; or, with
    // `flight N` (`raw N`), the small query from N concurrent Flight SQL clients (plain
    // DataFusion tasks) for 20 s, or `tmpfs N` through the gateway whose audit log is on a
    // tmpfs, or `raw-store N` as `raw N` but reading the files through the gateway's
    // `LocalStore`; or `parquet-vs-memory`, or `sync-floors`.
    if let Ok(name) = std::env::var("GATEWAY_VS_RAW_PROFILE") {
        let (way, clients) = name.split_once(' ').unwrap_or((&name, ""));
        if let ("flight" | "tmpfs" | "raw" | "raw-store", Ok(clients)) = (way, clients.parse::<usize>()) {
            let duration = Duration::from_secs(20);
            let load = match way {
                "flight" => concurrent(&dir, addr, clients, duration).await,
                "tmpfs" => {
                    let tmpfs = tmpfs_gateway(&config).await.expect("a tmpfs at /dev/shm");
                    concurrent(&dir, tmpfs.addr, clients, duration).await
                }
                "raw-store" => concurrent_raw(&raw_context(&config.data.dir, true).await, clients, duration).await,
                _ => concurrent_raw(&raw, clients, duration).await,
            };
            eprintln!(
                "{clients} clients: {:.0} queries/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                load.per_second, load.p50, load.p99, load.errors
            );
            return;
        }
        if name == "parquet-vs-memory" {
            parquet_vs_memory(&raw).await;
            return;
        }
        if name == "sync-floors" {
            for _ in 0..2 {
                let (append, overwrite) = (sync_floor(&dir, false), sync_floor(&dir, true));
                eprintln!("fdatasync after a 600-byte append {append:.3} ms, after an overwrite {overwrite:.3} ms");
            }
            return;
        }
        let (_, sql) = QUERIES
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a query name from the set");
        let until = Instant::now() + Duration::from_secs(20);
        let mut runs = 0;
        while Instant::now() < until {
            let _ = core_query(&core, &call, sql).await;
            runs += 1;
        }
        eprintln!("{name}: {runs} runs in 20 s");
        return;
    }
    let mut client = flight_client(&dir, addr).await;
    let tmpfs = tmpfs_gateway(&config).await;
    let mut tmpfs_client = match &tmpfs {
        Some(tmpfs) => Some(flight_client(&dir, tmpfs.addr).await),
        None => None,
    };

    let mut report = format!(
        "Machine: {}. Demo world of {people} people; at least {runs} runs per query after one warm-up (a query of a few milliseconds as many as plain DataFusion makes in 2 s, up to {}), the four ways taking turns; milliseconds.\n\
         Command: `cargo bench --bench gateway_vs_raw -- {people} {runs}`.\n\n\
         | query | runs | raw median | raw p95 | core first run | core median | core p95 | flight median | flight p95 | flight / raw | tmpfs log median | tmpfs log / raw |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        machine(),
        runs * 20
    );
    for (name, sql) in QUERIES {
        let raw_run = || async {
            raw.sql(sql).await.unwrap().collect().await.unwrap();
        };
        raw_run().await; // warm-up
        // A query of a few milliseconds gets more runs (as many as plain DataFusion could make in
        // 2 s, up to 20 times `runs`): its median otherwise moves with the machine by more than
        // the difference being measured.
        let n = runs.max(((2000.0 / timed(raw_run()).await) as usize).min(runs * 20));
        // The gateway's first run of the query: differencing baselines not yet computed.
        let first = Instant::now();
        let outcome = core_query(&core, &call, sql).await;
        let first = first.elapsed().as_secs_f64() * 1000.0;
        let _ = flight_query(&mut client, sql).await; // warm-up
        if let Some(client) = &mut tmpfs_client {
            let _ = flight_query(client, sql).await;
        }
        // The ways in turn, run after run, so that a change in the machine's load falls on all
        // of them alike. After core and flight, the log on this disk is synced, untimed: its
        // last record (the DoGet's, synced after the rows are out) would otherwise be synced by
        // a timer a few ms later, inside the next way's timing.
        let (mut r, mut c, mut f, mut t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            r.push(timed(raw_run()).await);
            c.push(timed(core_query(&core, &call, sql)).await);
            sync_log(&core).await;
            f.push(timed(flight_query(&mut client, sql)).await);
            sync_log(&core).await;
            if let Some(client) = &mut tmpfs_client {
                t.push(timed(flight_query(client, sql)).await);
            }
        }
        let (r, c, f) = (timing(r), timing(c), timing(f));
        let tmpfs_cells = if t.is_empty() {
            "– | –".to_owned()
        } else {
            let t = timing(t);
            format!("{:.1} | {:.2}", t.median, t.median / r.median)
        };
        let name = match outcome {
            Ok(()) => name.to_owned(),
            Err(rule) => format!("{name} (refused: {rule})"),
        };
        let line = format!(
            "| {name} | {n} | {:.1} | {:.1} | {first:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {tmpfs_cells} |\n",
            r.median,
            r.p95,
            c.median,
            c.p95,
            f.median,
            f.p95,
            f.median / r.median
        );
        eprint!("{line}");
        report.push_str(&line);
    }

    report.push_str(&match &tmpfs {
        Some(tmpfs) => format!(
            "\n*tmpfs log*: the same Flight SQL calls to a second gateway on the same world whose audit \
             log is on a tmpfs (`/dev/shm`): every record is still written, hash-chained and synced as on \
             the disk, but there the append and `fdatasync` of the floors below take {:.3} ms. \
             Its difference from *flight* is what this disk's durable writes cost; its difference from \
             *raw* is everything else the gateway adds.\n",
            sync_floor(&tmpfs.audit, false)
        ),
        None => "\n*tmpfs log*: not measured (no tmpfs at `/dev/shm`).\n".to_owned(),
    });

    report.push_str(
        "\nThe small query at 1, 8 and 32 concurrent Flight SQL clients, 10 s each; then the same \
         load on plain DataFusion in-process (tasks sharing one session, no network), 10 s each:\n\n\
         | clients | queries/s | p50 ms | p99 ms | errors | raw queries/s | raw p50 ms | raw p99 ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut steps = String::new();
    for clients in [1, 8, 32] {
        let before = step_totals(metrics_addr).await;
        let gw = concurrent(&dir, addr, clients, Duration::from_secs(10)).await;
        if clients == 1 {
            steps = step_means(&before, &step_totals(metrics_addr).await);
        }
        let raw = concurrent_raw(&raw, clients, Duration::from_secs(10)).await;
        assert_eq!(raw.errors, 0, "plain DataFusion failed the small query");
        let line = format!(
            "| {clients} | {:.0} | {:.1} | {:.1} | {} | {:.0} | {:.1} | {:.1} |\n",
            gw.per_second, gw.p50, gw.p99, gw.errors, raw.per_second, raw.p50, raw.p99
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    report.push_str(&format!(
        "\nWhere the small query's time goes at 1 client (the gateway's `sde.step.duration` histogram, \
         mean per call; `authorise` and `audit` run at GetFlightInfo and again at DoGet, where `audit` \
         only writes the record and leaves its sync to the next fsync): {steps}.\n"
    ));
    let (call, sync) = floors(&dir, addr).await;
    report.push_str(&format!(
        "\nFixed costs of a query through the gateway, medians of 2 000: a bare gRPC call over the same \
         kind of TLS connection (a health check: no token, no audit) {call:.3} ms, paid twice \
         (GetFlightInfo, then DoGet); appending a 600-byte line to a file on this disk and `fdatasync` \
         (an audit record made durable, without the log's own work) {sync:.3} ms, paid once before the \
         FlightInfo goes out (the DoGet's record shares the next fsync).\n"
    ));

    // 64 heavy queries at once: each completes or is refused cleanly; the process survives.
    // The gateway's memory pool is sampled meanwhile.
    let limiter = std::sync::Arc::clone(&core.limiter);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = std::sync::Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut peak = 0usize;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(limiter.memory_reserved());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    let rss_before = peak_memory_mib();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut client = flight_client(&dir, addr).await;
        tasks.push(tokio::spawn(async move { flight_query(&mut client, HEAVY).await }));
    }
    let (mut ok, mut refused) = (0, Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => refused.push(e),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let pool_peak = sampler.await.unwrap();
    refused.sort();
    refused.dedup();
    report.push_str(&format!(
        "\n64 concurrent heavy queries (`{HEAVY}`): {ok} completed, {} refused or failed in {elapsed:.1} s{}.\n\
         Gateway memory pool ({} MiB, {} MiB per query, {} queries at once): peak reservation sampled every 5 ms {:.0} MiB.\n\
         Peak resident memory of the whole process (both gateways, raw engine and clients): {rss_before:.0} MiB before the \
         heavy queries, {:.0} MiB after.\n",
        64 - ok,
        if refused.is_empty() {
            String::new()
        } else {
            format!(" (distinct errors: {})", refused.join("; "))
        },
        config.limits.memory_pool_bytes >> 20,
        config.limits.query_memory_bytes >> 20,
        config.limits.max_concurrent_queries,
        pool_peak as f64 / 1048576.0,
        peak_memory_mib()
    ));
    println!("{report}");
    write_report(&report);
}
