//! Telemetry reaches a real OTLP receiver: a tonic server implementing the collector's
//! TraceService and MetricsService (from the OpenTelemetry protobuf definitions), started inside
//! the test. Spans must arrive with the right structure and attributes and without SQL; metrics
//! must arrive over OTLP and on the optional Prometheus listener.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};
use tracing_subscriber::layer::SubscriberExt;

// Its own process: `tracing` caches, per call site, whether any subscriber wants its spans,
// and with the other tests' gateways starting and stopping subscribers in the same process
// the step spans were sometimes judged unwanted and never reached this test's subscriber.
#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;

/// What the receiver has been sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<Metric>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let metrics = request
            .into_inner()
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics);
        self.metrics.lock().unwrap().extend(metrics);
        Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// Starts the receiver on an ephemeral port; returns it and its `http://` endpoint.
async fn start_receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .add_service(MetricsServiceServer::new(receiver.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    (receiver, endpoint)
}

fn attributes(attrs: &[KeyValue]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            any_value::Value::IntValue(i) => Some((kv.key.clone(), i.to_string())),
            _ => None,
        })
        .collect()
}

/// Exports what the gateway has buffered. The export runs on this runtime's connection, so the
/// blocking flush goes to another thread while this one keeps driving it.
async fn flush(gw: &TestGateway) {
    let telemetry = gw.telemetry.clone();
    tokio::task::spawn_blocking(move || telemetry.flush()).await.unwrap();
}

// One thread: the test's subscriber (the gateway's span pipeline) sees every span the server
// makes, since every task runs here.
#[tokio::test]
async fn spans_arrive_over_otlp_with_a_child_per_step_and_no_sql() {
    let (receiver, endpoint) = start_receiver().await;
    let gw = spawn_gateway_with(|c| c.telemetry.otlp_endpoint = Some(endpoint)).await;
    let tracer = gw.telemetry.tracer().expect("spans are exported");
    let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
    let _guard = tracing::subscriber::set_default(subscriber);

    let sql = "SELECT age_band, COUNT(*) AS n FROM patients WHERE district <> 'Nowhere-Secret' GROUP BY age_band";
    gw.query_as("alice", PROJECT, sql).await.unwrap();
    // A scheduled export can be in flight while the flush runs, so a batch may arrive after the
    // flush returns: wait (bounded) until both requests' steps have all arrived.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let spans = loop {
        flush(&gw).await;
        let spans = receiver.spans.lock().unwrap().clone();
        let requests_done =
            steps_of(&spans, "query.execute").len() >= 7 && steps_of(&spans, "query.release").len() >= 3;
        if requests_done || std::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let request = spans
        .iter()
        .find(|s| {
            s.name == "request" && attributes(&s.attributes).get("call").map(String::as_str) == Some("query.execute")
        })
        .unwrap_or_else(|| panic!("no request span for the query among {:?}", names(&spans)));
    let attrs = attributes(&request.attributes);
    assert_eq!(attrs["user"], "alice");
    assert_eq!(attrs["organisation"], "ecc");
    assert_eq!(attrs["project"], PROJECT);
    assert_eq!(attrs["outcome"], "accepted");
    assert!(attrs["rpc"].ends_with("/GetFlightInfo"), "{attrs:?}");

    let children = steps_of(&spans, "query.execute");
    assert_eq!(
        children,
        [
            "authenticate",
            "authorise",
            // The received record, on the log before anything runs.
            "audit",
            "plan",
            "check",
            "execute",
            "disclose",
            "audit"
        ],
        "the walk's steps, in order, as children of the request span"
    );
    // The release (DoGet) is its own request, authorised again and audited.
    let release_children = steps_of(&spans, "query.release");
    assert_eq!(release_children, ["authenticate", "authorise", "audit"]);

    // No span carries the SQL or its literals.
    for span in &spans {
        for value in attributes(&span.attributes).values() {
            assert!(
                !value.contains("Nowhere-Secret") && !value.to_uppercase().contains("SELECT"),
                "span {} carries SQL: {value}",
                span.name
            );
        }
    }
}

/// The names of the child spans of the (first) request span for `call`, in the order they
/// started (batches may arrive out of order).
fn steps_of<'a>(spans: &'a [Span], call: &str) -> Vec<&'a str> {
    let Some(request) = spans
        .iter()
        .find(|s| s.name == "request" && attributes(&s.attributes).get("call").map(String::as_str) == Some(call))
    else {
        return Vec::new();
    };
    let mut children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == request.span_id && s.trace_id == request.trace_id)
        .collect();
    children.sort_by_key(|s| s.start_time_unix_nano);
    children.into_iter().map(|s| s.name.as_str()).collect()
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// The metric named `name` (the last export holding it).
fn metric<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
    metrics.iter().rev().find(|m| m.name == name).unwrap_or_else(|| {
        panic!(
            "no metric {name} among {:?}",
            metrics.iter().map(|m| &m.name).collect::<Vec<_>>()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_arrive_over_otlp_and_on_the_prometheus_listener() {
    let (receiver, endpoint) = start_receiver().await;
    let gw = spawn_gateway_with(|c| {
        c.telemetry.otlp_endpoint = Some(endpoint);
        c.telemetry.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    gw.query_as(
        "alice",
        PROJECT,
        "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex",
    )
    .await
    .unwrap();
    gw.query_as("alice", PROJECT, "SELECT person_id FROM patients")
        .await
        .unwrap_err();
    flush(&gw).await;

    let metrics = receiver.metrics.lock().unwrap().clone();
    // Requests by outcome and rule.
    let Some(metric::Data::Sum(requests)) = &metric(&metrics, "sde.requests").data else {
        panic!("sde.requests is not a sum")
    };
    let outcomes: Vec<BTreeMap<String, String>> =
        requests.data_points.iter().map(|p| attributes(&p.attributes)).collect();
    assert!(
        outcomes
            .iter()
            .any(|a| a["call"] == "query.execute" && a["outcome"] == "accepted"),
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|a| a["outcome"] == "refused" && a.get("rule").is_some_and(|r| r.starts_with("safe-outputs/"))),
        "{outcomes:?}"
    );
    // Latency per step.
    let Some(metric::Data::Histogram(steps)) = &metric(&metrics, "sde.step.duration").data else {
        panic!("sde.step.duration is not a histogram")
    };
    let mut seen: Vec<String> = steps
        .data_points
        .iter()
        .map(|p| attributes(&p.attributes)["step"].clone())
        .collect();
    seen.sort();
    let mut want: Vec<String> = sde_gateway::telemetry::STEPS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    // Cells withheld, queries in flight, memory reserved.
    for name in [
        "sde.cells.withheld",
        "sde.groups.withheld",
        "sde.queries.in_flight",
        "sde.memory.reserved",
    ] {
        metric(&metrics, name);
    }

    // The same figures as Prometheus text on the admin listener.
    let addr = gw.metrics_addr.expect("metrics listener bound");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    for needle in [
        "sde_requests_total{",
        "outcome=\"accepted\"",
        "sde_step_duration_seconds_bucket{",
        "sde_queries_in_flight",
        "sde_memory_reserved_bytes",
        "sde_cells_withheld_total",
    ] {
        assert!(text.contains(needle), "no {needle} in\n{text}");
    }
}

#[tokio::test]
async fn no_metrics_port_unless_configured() {
    let gw = spawn_gateway().await;
    assert_eq!(gw.metrics_addr, None);
    assert!(gw.telemetry.tracer().is_none());
}

/// The binary's own path: its process-wide subscriber takes the span exporter from the config
/// (`SDE_TELEMETRY__OTLP_ENDPOINT`), and SIGTERM flushes what is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exports_spans_and_flushes_them_at_sigterm() {
    let (receiver, endpoint) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
        .args([
            "serve",
            "--demo",
            "--people",
            "2000",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(dir.path())
        .env("SDE_TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .env("SDE_TELEMETRY__METRICS_INTERVAL_SECONDS", "3600")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (ready, serving) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut ready = Some(ready);
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving Flight SQL") {
                ready.take().map(|r| r.send(()));
            }
        }
    });
    serving.await.expect("the gateway starts");

    let url = format!("https://127.0.0.1:{port}");
    let channel = sde_gateway::api::client::tls_channel(
        &url,
        &dir.path().join("tls/ca.pem"),
        "localhost",
        None,
        &Default::default(),
    )
    .await
    .unwrap();
    let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    client.set_token(std::fs::read_to_string(dir.path().join("tokens/alice.jwt")).unwrap());
    client.set_header("x-sde-project", PROJECT);
    query(&mut client, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .unwrap();

    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "clean exit on SIGTERM");
    let spans = receiver.spans.lock().unwrap().clone();
    let request = spans
        .iter()
        .find(|s| attributes(&s.attributes).get("call").map(String::as_str) == Some("query.execute"))
        .unwrap_or_else(|| panic!("no query span among {:?}", names(&spans)));
    assert_eq!(attributes(&request.attributes)["user"], "alice");
    assert!(
        spans
            .iter()
            .any(|s| s.name == "execute" && s.parent_span_id == request.span_id)
    );
}
