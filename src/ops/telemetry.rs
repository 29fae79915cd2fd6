//! Logs and traces: the process's `tracing` subscriber, optional OTLP export of
//! spans, and W3C trace context carried between gateways in gRPC metadata.
//!
//! A federated query is one trace: the coordinator's `query` span is the parent of a
//! `member_call` span per member; each sub-query carries the member call's context
//! (`traceparent`) to the member, whose `execute` span continues the same trace.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::error::{Error, Result};

/// The installed telemetry; keep it for the life of the process and call
/// [`Telemetry::shutdown`] before exiting so that buffered spans are sent.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans buffered so far.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "Flushing spans to the OTLP collector failed");
        }
    }

    /// Sends what is buffered and stops exporting.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// How the process logs and traces.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Log filter (`RUST_LOG` syntax); `default_filter` when absent or invalid.
    pub filter: Option<String>,
    /// The filter used when none is given.
    pub default_filter: String,
    /// One JSON object per log line instead of text.
    pub json: bool,
    /// Export spans to this OTLP/gRPC collector.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service_name: String,
}

/// Installs the process-wide subscriber. Logs go to standard error; spans of
/// fedgate's own code go to the OTLP collector if one is configured. Must be called
/// inside a Tokio runtime when exporting (the exporter's gRPC channel lives there).
pub fn init(s: &Settings) -> Result<Telemetry> {
    let filter = s
        .filter
        .as_deref()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&s.default_filter));
    // Colours only on a terminal: a log written to a file or a collector gets plain
    // text, without escape codes (and none when NO_COLOR is set).
    let ansi = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if s.json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let (otel, provider) = match &s.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| Error::Config(format!("OTLP exporter for {endpoint}: {e}")))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(s.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("fedgate");
            // Spans of fedgate's own code only: the query, member calls, and the
            // data owner's execution, whatever the log filter says.
            let only_ours = tracing_subscriber::filter::Targets::new()
                .with_target("fedgate", tracing::Level::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(only_ours)
                .boxed();
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| Error::Internal(format!("installing the log subscriber: {e}")))?;
    Ok(Telemetry { provider })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context into outgoing gRPC metadata (`traceparent`,
/// `tracestate`). Nothing is written when spans are not being traced.
pub fn inject(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the trace context in incoming gRPC metadata, if any.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    use opentelemetry::trace::TraceContextExt;
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` (hex), if it is being traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
