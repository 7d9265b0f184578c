"""OpenTelemetry traces of HTTP requests and turns, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

OpenTelemetry is an extra (`pip install 'loopbridge[otel]'`) and is imported only
here, only when that variable is set. Spans go out over OTLP/HTTP in batches from
the SDK's own thread; the standard `OTEL_*` variables (headers, timeouts, batch
delays, resource attributes, service name) apply as the SDK reads them.

HTTP requests are traced by FastAPI itself once a tracer provider is set: a server
span per request named by method and route template (never an id), plus spans of
its own steps; its send wrapper costs a few dict reads per chunk, no span per chunk
(the ASGI instrumentation package would add one per chunk, so it is not used). The
in-process MCP server of the share tool adds its own spans too. Turns are traced
here, through the engine's hook (core/tracing.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from core import tracing
from core.usage import Usage

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from core.runtime import Turn

log = logging.getLogger(__name__)

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_NAME = "loopbridge"
USAGE_FIELDS = tuple(field.name for field in fields(Usage))


def setup() -> TracerProvider | None:
    """Trace requests and the engine's turns; None when traces are off or cannot be.

    Call before the app serves, and `shutdown` at stop.
    """
    if not os.environ.get(ENDPOINT):
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "%s is set but OpenTelemetry is not installed: serving without traces "
            "(pip install 'loopbridge[otel]')", ENDPOINT,
        )  # fmt: skip
        return None
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = provider.get_tracer("loopbridge")
    tracing.set_turn_tracer(TurnSpans(tracer))
    log.info("sending traces to %s", os.environ[ENDPOINT])
    return provider


async def shutdown(provider: TracerProvider) -> None:
    """Send what is still batched; the exporter blocks, so off the event loop."""
    tracing.set_turn_tracer(tracing.TurnTracer())
    await asyncio.to_thread(provider.shutdown)


class TurnSpans(tracing.TurnTracer):
    """A `turn` span from the turn's `started` to its terminal event."""

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import context, trace

        self.tracer = tracer
        self._trace = trace
        # A turn is a trace of its own: the worker task that runs it was made in
        # whichever request first woke the loop, whose span it must not hang under.
        self._root = context.Context()

    def started(self, loop_id: str, turn: Turn) -> Any:
        attributes = {"loop_id": loop_id, "turn_id": turn.id, "trigger": turn.trigger}
        return self.tracer.start_span("turn", context=self._root, attributes=attributes)

    def ended(self, span: Any, turn: Turn) -> None:
        span.set_attribute("ended", turn.ended or "")
        if turn.error is not None:
            span.set_attribute("error.code", turn.error["code"])
            span.set_status(self._trace.StatusCode.ERROR, turn.error["message"])
        if turn.usage is not None:
            span.set_attributes(
                {f"usage.{name}": getattr(turn.usage, name) for name in USAGE_FIELDS}
            )
        span.end()
