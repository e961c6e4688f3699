//! What the operator sees: logs, spans and metrics.
//!
//! - **Spans**: one `request` span per gRPC call (from [`RequestSpanLayer`]), carrying the user,
//!   organisation, project and outcome once the walk learns them, with a child span per step of
//!   the walk (`authenticate`, `authorise`, `plan`, `check`, `execute`, `disclose`, `audit`).
//!   Spans never carry SQL text, literals or data. They go to the OTLP/gRPC collector named by
//!   `telemetry.otlp_endpoint`, if any.
//! - **Metrics** ([`Metrics`]): requests by call, outcome and rule; latency per step; cells and
//!   groups withheld; queries in flight and queued; memory reserved. Pushed over OTLP when an
//!   endpoint is set and, when `telemetry.metrics_listen` is set, scraped as Prometheus text
//!   from `/metrics` on that separate admin listener.
//!
//! Each [`Telemetry`] owns its providers (no global meter), so several gateways in one process
//! (the tests) do not mix their figures. In the binary, [`init_logging`] installs the one
//! process-wide subscriber and [`Telemetry::install`] plugs the span exporter into it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, ObservableGauge};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tonic::codegen::{Service, http};
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, filter::LevelFilter, reload};

use crate::config::TelemetryConfig;
use crate::limits::Limits;

/// The steps of one query's walk, as named in spans and in the step-latency histogram.
pub const STEPS: [&str; 7] = [
    "authenticate",
    "authorise",
    "plan",
    "check",
    "execute",
    "disclose",
    "audit",
];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the OTLP exporter for telemetry.otlp_endpoint: {0}")]
    Otlp(String),
    #[error("cannot set up the Prometheus exporter: {0}")]
    Prometheus(String),
    #[error("cannot bind telemetry.metrics_listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<Registry, SdkTracer>;
static SPAN_EXPORT: OnceLock<reload::Handle<Option<OtelLayer>, Registry>> = OnceLock::new();

/// The binary's subscriber: logs to stderr (filtered by `RUST_LOG`, default `info`) and a slot
/// for the span exporter, filled by [`Telemetry::install`] once the config is known.
pub fn init_logging() {
    let (spans, handle) = reload::Layer::new(None::<OtelLayer>);
    // Colours only on a terminal, and never where NO_COLOR is set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    tracing_subscriber::registry()
        .with(spans.with_filter(LevelFilter::INFO))
        .with(logs)
        .init();
    let _ = SPAN_EXPORT.set(handle);
}

/// The gateway's instruments.
#[derive(Clone)]
pub struct Metrics {
    requests: Counter<u64>,
    step: Histogram<f64>,
    cells_withheld: Counter<u64>,
    groups_withheld: Counter<u64>,
    meter: Meter,
    /// Observable gauges live as long as the handles do.
    gauges: Arc<std::sync::Mutex<Vec<ObservableGauge<i64>>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    fn new(meter: Meter) -> Self {
        Self {
            requests: meter
                .u64_counter("sde.requests")
                .with_description("Calls by call, outcome (accepted, refused, failed, cancelled) and rule")
                .build(),
            step: meter
                .f64_histogram("sde.step.duration")
                .with_unit("s")
                .with_description("Time spent in each step of the walk")
                .with_boundaries(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .build(),
            cells_withheld: meter
                .u64_counter("sde.cells.withheld")
                .with_description("Cells suppressed by disclosure control")
                .build(),
            groups_withheld: meter
                .u64_counter("sde.groups.withheld")
                .with_description("Groups withheld by disclosure control")
                .build(),
            meter,
            gauges: Default::default(),
        }
    }

    /// Instruments that record nothing (a gateway built without telemetry).
    pub fn disabled() -> Self {
        Self::new(opentelemetry::metrics::noop::NoopMeterProvider::new().meter("sde-gateway"))
    }

    /// Observes the load limits: queries in flight and queued, memory reserved.
    pub fn observe(&self, limits: &Arc<Limits>) {
        let (a, b, c) = (Arc::clone(limits), Arc::clone(limits), Arc::clone(limits));
        let gauges = vec![
            self.meter
                .i64_observable_gauge("sde.queries.in_flight")
                .with_description("Queries executing now")
                .with_callback(move |o| o.observe(a.in_flight(), &[]))
                .build(),
            self.meter
                .i64_observable_gauge("sde.queries.queued")
                .with_description("Queries waiting for a slot now")
                .with_callback(move |o| o.observe(b.queued() as i64, &[]))
                .build(),
            self.meter
                .i64_observable_gauge("sde.memory.reserved")
                .with_unit("By")
                .with_description("Bytes reserved in the gateway's query memory pool")
                .with_callback(move |o| o.observe(c.memory_reserved() as i64, &[]))
                .build(),
        ];
        self.gauges.lock().expect("gauges lock").extend(gauges);
    }

    /// One call's outcome.
    pub fn request(&self, call: &str, outcome: &str, rule: Option<&str>) {
        let mut attributes = vec![
            KeyValue::new("call", call.to_owned()),
            KeyValue::new("outcome", outcome.to_owned()),
        ];
        if let Some(rule) = rule {
            attributes.push(KeyValue::new("rule", rule.to_owned()));
        }
        self.requests.add(1, &attributes);
    }

    /// Time spent in one step.
    pub fn step(&self, step: &'static str, elapsed: Duration) {
        self.step.record(elapsed.as_secs_f64(), &[KeyValue::new("step", step)]);
    }

    /// What disclosure control withheld from one result.
    pub fn withheld(&self, cells: u64, groups: u64) {
        self.cells_withheld.add(cells, &[]);
        self.groups_withheld.add(groups, &[]);
    }
}

/// A gateway's telemetry: its span and metric pipelines and its instruments.
#[derive(Clone)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: SdkMeterProvider,
    prometheus: Option<prometheus::Registry>,
    metrics: Metrics,
    metrics_listen: Option<SocketAddr>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("spans_exported", &self.tracer_provider.is_some())
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Builds the pipelines `config` asks for. Must run inside the Tokio runtime (the OTLP
    /// client's connection lives there).
    pub fn new(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone().unwrap_or_else(|| "sde-gateway".into()))
            .build();
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
        let mut tracer_provider = None;
        if let Some(endpoint) = &config.otlp_endpoint {
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            tracer_provider = Some(
                SdkTracerProvider::builder()
                    .with_resource(resource.clone())
                    .with_batch_exporter(spans)
                    .build(),
            );
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let interval = Duration::from_secs(config.metrics_interval_seconds.unwrap_or(30));
            meters = meters.with_reader(PeriodicReader::builder(metrics).with_interval(interval).build());
        }
        let mut prometheus = None;
        if config.metrics_listen.is_some() {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .without_target_info()
                .build()
                .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
            meters = meters.with_reader(exporter);
            prometheus = Some(registry);
        }
        let meter_provider = meters.build();
        let metrics = Metrics::new(meter_provider.meter("sde-gateway"));
        Ok(Self {
            tracer_provider,
            meter_provider,
            prometheus,
            metrics,
            metrics_listen: config.metrics_listen,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A tracer on this gateway's span pipeline (none without an OTLP endpoint).
    pub fn tracer(&self) -> Option<SdkTracer> {
        self.tracer_provider.as_ref().map(|p| p.tracer("sde-gateway"))
    }

    /// Plugs this gateway's span pipeline into the process-wide subscriber of [`init_logging`]
    /// (the binary); a no-op where that subscriber is not installed (tests bring their own).
    pub fn install(&self) {
        if let (Some(handle), Some(tracer)) = (SPAN_EXPORT.get(), self.tracer()) {
            let layer = tracing_opentelemetry::layer().with_tracer(tracer);
            if let Err(e) = handle.reload(Some(layer)) {
                tracing::warn!(error = %e, "cannot install the span exporter");
            }
        }
    }

    /// The metrics as Prometheus text (empty without `telemetry.metrics_listen`).
    pub fn prometheus_text(&self) -> String {
        let Some(registry) = &self.prometheus else {
            return String::new();
        };
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap_or_default()
    }

    /// Binds the admin listener, if configured: Prometheus text at `/metrics`, nothing else.
    pub async fn bind_metrics(&self) -> Result<Option<(tokio::net::TcpListener, SocketAddr)>, TelemetryError> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        Ok(Some((listener, local)))
    }

    /// Serves `/metrics` on `listener` until `shutdown` completes.
    pub async fn serve_metrics(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let telemetry = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let telemetry = telemetry.clone();
                async move {
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        telemetry.prometheus_text(),
                    )
                }
            }),
        );
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    }

    /// Exports what is buffered now. Blocks: call it off the async runtime (`spawn_blocking`).
    pub fn flush(&self) {
        if let Some(p) = &self.tracer_provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "span export failed");
        }
        if let Err(e) = self.meter_provider.force_flush() {
            tracing::debug!(error = %e, "metric export failed");
        }
    }

    /// Exports what is buffered and stops the pipelines. Blocks, as [`Telemetry::flush`].
    pub fn shutdown(&self) {
        if let Some(p) = &self.tracer_provider {
            let _ = p.shutdown();
        }
        let _ = self.meter_provider.shutdown();
    }
}

/// A `request` span around every gRPC call (except health checks), with the fields the walk
/// fills in. The span is entered while the inner service is called, so the authentication layer's
/// `authenticate` span is its child.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSpanLayer;

impl<S> tower_layer::Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RequestSpan<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let span = if path.starts_with("/grpc.health.") {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "request",
                rpc = %path,
                user = tracing::field::Empty,
                organisation = tracing::field::Empty,
                project = tracing::field::Empty,
                call = tracing::field::Empty,
                outcome = tracing::field::Empty,
                rule = tracing::field::Empty,
            )
        };
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        future.instrument(span)
    }
}
