"""OpenTelemetry traces: a real `loopbridge serve` sends a span per HTTP request (named by
route template) and per turn to an OTLP/HTTP collector when OTEL_EXPORTER_OTLP_ENDPOINT
is set; without it nothing is sent and the SDK is never imported."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.polling import until
from tests.sse import turn

trace_service_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the otel extra is not installed (pip install -e '.[test,otel]')",
)

LOOPBRIDGE = Path(sys.executable).parent / "loopbridge"
SERVING = re.compile(r"serving the Loop API on (http://\S+)/api/v1")
# What only tracing imports (opentelemetry-api itself comes with fastapi and mcp).
TRACING_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter")
# `loopbridge serve`, telling at exit which tracing modules the process imported.
SERVE = f"""
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(
    sorted(m for m in sys.modules if m.startswith({TRACING_MODULES!r}))), flush=True))
from bridge.cli import main
main(["serve", "--port", "0"])
"""


class Collector:
    """A fake OTLP/HTTP collector: the spans of every `POST /v1/traces`."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []

    async def traces(self, request: web.Request) -> web.Response:
        body = trace_service_pb2.ExportTraceServiceRequest()
        body.ParseFromString(await request.read())
        for resource_spans in body.resource_spans:
            self.resources.append(_attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name,
                        "kind": span.kind,
                        "attributes": _attributes(span.attributes),
                    })  # fmt: skip
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [span for span in self.spans if span["name"] == name]


def _attributes(pairs: Any) -> dict[str, Any]:
    values = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[tuple[str, Collector]]:
    sink = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        await runner.cleanup()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "LOOPBRIDGE_HOME": str(home), "LOOPBRIDGE_SANDBOX": "local", **extra}


async def _token(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        LOOPBRIDGE, "tokens", "create", "--user", "alice", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode().strip().splitlines()[-1]


async def serve_a_turn(env: dict[str, str]) -> tuple[str, str, list[str], str]:
    """Serve, create a loop and run one turn through the API, stop the server.

    The loop's and turn's ids, the tracing modules the server imported, what it logged."""
    token = await _token(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            while not (found := SERVING.search((await proc.stdout.readline()).decode())):
                assert proc.returncode is None, "loopbridge serve ended before it served"
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=found.group(1) + "/api/v1", headers=headers, timeout=60
        ) as http:
            created = await http.post("/loops", json={})
            assert created.status_code == 201, created.text
            loop_id = created.json()["id"]
            seen = await turn(http, loop_id, "hello")
            assert seen[-1].name == "done", seen
            turn_id = seen[-1].data["turn_id"]
        proc.terminate()
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    modules = next(line for line in out.decode().splitlines() if line.startswith("MODULES "))
    return loop_id, turn_id, json.loads(modules.removeprefix("MODULES ")), err.decode()


async def test_requests_and_turns_are_traced(standin, tmp_path):
    async with collector() as (url, sink):
        env = _env(
            tmp_path,
            OTEL_EXPORTER_OTLP_ENDPOINT=url,
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        )
        loop_id, turn_id, modules, _ = await serve_a_turn(env)
        assert "opentelemetry.sdk.trace" in modules

        # The server flushes its batch at stop; wait for the collector all the same.
        await until(lambda: sink.named("turn"), what="the turn's span")
        [turn_span] = sink.named("turn")
        assert turn_span["attributes"]["loop_id"] == loop_id
        assert turn_span["attributes"]["turn_id"] == turn_id
        assert turn_span["attributes"]["trigger"] == "message"
        assert turn_span["attributes"]["ended"] == "done"
        assert turn_span["attributes"]["usage.output_tokens"] > 0

        await until(
            lambda: sink.named("POST /api/v1/loops/{loop_id}/messages"),
            what="the message request's span",
        )
        [message] = sink.named("POST /api/v1/loops/{loop_id}/messages")
        assert message["kind"] == 2  # SPAN_KIND_SERVER
        assert message["attributes"]["http.route"] == "/api/v1/loops/{loop_id}/messages"
        assert message["attributes"]["http.response.status_code"] == 200
        [created] = sink.named("POST /api/v1/loops")
        assert created["attributes"]["http.response.status_code"] == 201
        # Ids are in attributes where they belong, never in a span's name.
        assert not [span["name"] for span in sink.spans if loop_id in span["name"]]
        assert all(r["service.name"] == "loopbridge" for r in sink.resources)
        assert all(r["deployment.environment"] == "test" for r in sink.resources)


async def test_without_the_endpoint_nothing_is_traced(standin, tmp_path):
    async with collector() as (url, sink):
        # An exporter would honour the traces endpoint; only the general one turns traces on.
        env = _env(tmp_path, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=url + "/v1/traces")
        _, _, modules, _ = await serve_a_turn(env)
        assert modules == []
        # The process has ended: anything it would have sent has been sent.
        assert sink.spans == []


async def test_without_the_extra_serve_warns_and_runs(standin, tmp_path):
    # A module named `opentelemetry.sdk` that cannot be imported stands for a missing extra.
    blocker = tmp_path / "blocker"
    (blocker / "opentelemetry" / "sdk").mkdir(parents=True)
    (blocker / "opentelemetry" / "sdk" / "__init__.py").write_text("raise ImportError\n")
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(blocker))
    *_, logged = await serve_a_turn(env)
    warnings = [line for line in logged.splitlines() if "loopbridge[otel]" in line]
    assert len(warnings) == 1, logged
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in warnings[0]
