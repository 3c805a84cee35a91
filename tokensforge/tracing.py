"""OpenTelemetry traces (SPEC §2 "Tracing"), on only when the standard OTEL_* variables ask for them.

With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, each process builds
an SDK tracer provider that exports over OTLP/HTTP in batches; the SDK itself reads the rest of the
standard variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`,
`OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`…). Every proxied request is a SERVER span (continuing an
incoming W3C `traceparent`) with children: admission (rate limits), the hold, one CLIENT span per
upstream attempt (whose context goes upstream as `traceparent`) and settlement. The request span
carries the GenAI semantic-convention attributes and the gateway's own (`tokensforge.*`).

Unset, nothing here creates an object per request: `ON` is False, the middleware and the lifecycle test
it (or a None span) and do nothing else, and the OpenTelemetry SDK is never imported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from .receipts import Trace

log = logging.getLogger("tokensforge.tracing")

#: the client endpoints whose requests are traced (each one runs a Lifecycle)
PROXIED = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"})
_OPERATION = {"chat.completions": "chat", "embeddings": "embeddings", "responses": "chat", "messages": "chat"}

ON = False  # read per request: the only cost of tracing when it is off
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
#: the current request's server span, set by the middleware for the handler's task (and what it awaits)
REQUEST_SPAN: ContextVar[Span | None] = ContextVar("tokensforge_request_span", default=None)


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, the SDK not disabled)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup() -> None:
    """Build this process's tracer provider (once): OTLP/HTTP exporter, batch processor, the resource
    and sampler the OTEL_* variables describe."""
    global ON, _provider, _tracer
    if _provider is not None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "tokensforge"}))
    _provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER[_ARG]
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("tokensforge")
    ON = True
    log.info("tracing on: OTLP/HTTP export of every proxied request's spans")


def shutdown() -> None:
    """Export what is still buffered and stop (the process is ending)."""
    global ON, _provider, _tracer
    provider, _provider, _tracer, ON = _provider, None, None, False
    if provider is not None:
        provider.shutdown()


# ------------------------------------------------------------------ spans

def server_span(method: str, path: str, headers: Mapping[str, str]) -> Span:
    """The request's SERVER span, continuing the caller's `traceparent` if it sent one."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    return _tracer.start_span(f"{method} {path}", context=extract(headers), kind=SpanKind.SERVER,
                              attributes={"http.request.method": method, "url.path": path})


def request_span(endpoint: str) -> tuple[Span | None, bool]:
    """The span a Lifecycle reports to: the middleware's server span, else (a request the gateway
    makes itself, e.g. a research section) a new one it owns. (None, False) when tracing is off."""
    span = REQUEST_SPAN.get()
    if span is not None or _tracer is None:
        return span, False
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(f"tokensforge {endpoint}", kind=SpanKind.INTERNAL), True


_NOOP = contextlib.nullcontext()


def child(parent: Span | None, name: str) -> contextlib.AbstractContextManager[Span | None]:
    """A child span of `parent` for a `with` block (ended, errors recorded); a shared no-op when None."""
    if parent is None or _tracer is None:
        return _NOOP
    return _child(parent, name)


@contextlib.contextmanager
def _child(parent: Span, name: str) -> Iterator[Span]:
    from opentelemetry.trace import set_span_in_context, use_span

    assert _tracer is not None
    span = _tracer.start_span(name, context=set_span_in_context(parent))
    with use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def attempt_span(parent: Span, channel: str, kind: str, upstream_model: str, endpoint: str,
                 headers: MutableMapping[str, str]) -> Span:
    """One upstream attempt (CLIENT); its context is added to `headers` as `traceparent`."""
    from opentelemetry.propagate import inject
    from opentelemetry.trace import SpanKind, set_span_in_context

    assert _tracer is not None
    operation = _OPERATION.get(endpoint, "chat")
    span = _tracer.start_span(f"{operation} {upstream_model}", context=set_span_in_context(parent),
                              kind=SpanKind.CLIENT, attributes={
                                  "gen_ai.operation.name": operation, "gen_ai.provider.name": kind,
                                  "gen_ai.request.model": upstream_model, "tokensforge.channel": channel})
    inject(headers, context=set_span_in_context(span))
    return span


def end_attempt(span: Span, outcome: str, status: int | None, error: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("tokensforge.attempt.outcome", outcome)
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if outcome != "ok":
        span.set_status(Status(StatusCode.ERROR, error or outcome))
    span.end()


def finish_request(span: Span, trace: Trace, *, end: bool) -> None:
    """The request's outcome on its span: GenAI semconv attributes and the gateway's own."""
    route = trace.route
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": _OPERATION.get(trace.endpoint, "chat"),
        "tokensforge.request_id": trace.request_id, "tokensforge.status": trace.status,
        "tokensforge.reserved_nanos": trace.reserved_nanos, "tokensforge.charge_nanos": trace.charge_nanos,
        "tokensforge.fallback": trace.fallback_kind,
    }
    if trace.selected_model is not None:
        attributes["gen_ai.request.model"] = trace.selected_model
    if trace.upstream_model is not None:
        attributes["gen_ai.response.model"] = trace.upstream_model
    if route is not None:
        attributes.update({"tokensforge.route.id": route.id, "tokensforge.route.kind": route.kind,
                           "tokensforge.bucket": route.bucket})
    if trace.served_by is not None:
        attributes["tokensforge.channel"] = trace.served_by
    usage = trace.usage
    if usage is not None:
        attributes.update({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                           "gen_ai.usage.output_tokens": usage.completion_tokens,
                           "gen_ai.usage.cache_read.input_tokens": usage.cache_read_tokens,
                           "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_tokens
                           + usage.cache_write_1h_tokens})
    if trace.ledger_entry_id is not None:
        attributes["tokensforge.ledger_entry_id"] = trace.ledger_entry_id
    if trace.error is not None:
        attributes["error.type"] = str(trace.error.get("code"))
    span.set_attributes(attributes)
    if end:
        end_server_span(span, None)


def end_server_span(span: Span, status: int | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
    span.end()
