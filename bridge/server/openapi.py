"""The OpenAPI document as the contract: error codes per operation, security schemes, typed
stream events; and the docs page, served from local assets."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema
from swagger_ui_bundle import swagger_ui_path

from bridge.contract.events import EVENT_DATA, FRAMES
from bridge.server import errors
from bridge.server.auth import SESSION_COOKIE

API = "/api/v1"
OPENAPI_URL = f"{API}/openapi.json"
DOCS_URL = f"{API}/docs"
DOCS_ASSETS = f"{DOCS_URL}/assets"
SCHEMAS = "#/components/schemas/"

# Limits checked before any route runs, so every operation can answer them.
EVERY_REQUEST = ("content_too_large", "headers_too_large")
# What the credential check (and its rate limit) answers.
CREDENTIALS = ("missing_credentials", "invalid_token", "too_many_requests")
# A query, header or body that does not fit the operation's schema.
MALFORMED = ("invalid_request",)
# A body that is not plain JSON (RFC 8259), or does not fit the operation's schema.
MALFORMED_JSON = ("invalid_request", "invalid_json")

LIST_LOOPS = """The caller's own loops, most recently active first.

**[ext] Metadata filters:** any number of query parameters `metadata.KEY=VALUE` keep the
loops whose `metadata` holds exactly that value under `KEY` (several filters AND together),
e.g. `?metadata.slack_thread=C123:1716.42`. A `KEY` may not hold `"` or NUL
(`400 invalid_request`)."""
CURSOR = (
    "a loop id from a previous page (`last_id` for `after`, `first_id` for `before`); "
    "an empty value is the same as none; an id that is not one of the caller's loops is "
    "`400 invalid_cursor`"
)
TURN_CURSOR = (
    "a turn id from a previous page (`last_id`); an empty value is the same as none; "
    "an id that is not a turn of this loop is `400 invalid_cursor`"
)
IDEMPOTENCY = (
    "a client-chosen key (≤ 256 characters): the same key and body replay the turn's "
    "events instead of running it again (24 h); the same key with another body is "
    "`409 idempotency_key_reused`; an empty value is the same as none"
)
RESUME = (
    "[ext] resume after this event id (from either stream of this loop): the stored "
    "events after it come first, then the live ones; an id ahead of the loop's newest is "
    "`400 invalid_last_event_id`"
)
SEND_STREAM = (
    "The turn's events: first `started` (idle loop) or `queued` (busy loop), then the "
    "turn, up to its terminal event (`done`, `interrupted` or `error`). Closing the stream "
    "does not cancel the turn. Response header `X-Turn-Id` names the turn."
)
WATCH_STREAM = (
    "Every event of the loop from now on (after `Last-Event-ID` when given); a `snapshot` "
    "first when a turn is running. The stream stays open until the client leaves."
)

STATUS_TEXT = {
    400: "Bad request",
    401: "Missing or invalid credentials",
    403: "Not allowed",
    404: "Not found",
    409: "Conflict",
    429: "Too many requests",
    431: "Request headers too large",
    500: "The turn or its sandbox failed",
    503: "Not ready",
}

SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "la_ + 48 lowercase hex",
        "description": "An API token (`loopbridge tokens create`, or `POST /api/v1/me/tokens`).",
    },
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": SESSION_COOKIE,
        "description": "[ext] A browser session, set by `POST /api/v1/login`.",
    },
}
# The default of every operation; the others say otherwise in `openapi_extra`.
TOKEN_OR_SESSION: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]
SESSION_ONLY: dict[str, Any] = {"security": [{"session": []}]}
PUBLIC: dict[str, Any] = {"security": []}

FRAMING = """\
Server-Sent Events. Each event is one frame: `event: <name>`, `data: <one JSON object>`
and, for every event except `ping`, `id: <integer>` (its resume point for `Last-Event-ID`,
the same on every stream of the loop). The schema describes one frame; `data` holds the
JSON text of the event's typed payload (`contentSchema`). `done`, `interrupted` and `error`
end a turn; `POST /messages` closes after its own turn's terminal event, `GET /events` stays
open across turns. `ping` comes every 15 s."""


def error_responses(*codes: str, auth: bool = True) -> dict[int | str, dict[str, Any]]:
    """The error answers of one operation: per status, exactly the codes it can carry.

    Every operation can answer the request limits; `auth` adds the credential check's.
    """
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys((*EVERY_REQUEST, *(CREDENTIALS if auth else ()), *codes)):
        status, _ = errors.status_of(code)
        by_status.setdefault(status, []).append(code)
    return {status: _error_response(status, found) for status, found in sorted(by_status.items())}


def _error_response(status: int, codes: list[str]) -> dict[str, Any]:
    kinds = {errors.status_of(code)[1] for code in codes}
    assert len(kinds) == 1, f"{status} mixes error types {kinds}"
    listed = ", ".join(f"`{code}`" for code in codes)
    response: dict[str, Any] = {
        "description": f"{STATUS_TEXT.get(status, 'Error')}: `error.code` is one of {listed}.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["type", "code", "message"],
                            "properties": {
                                "type": {"type": "string", "const": kinds.pop()},
                                "code": {"type": "string", "enum": codes},
                                "message": {"type": "string"},
                            },
                        }
                    },
                }
            }
        },
    }
    if status == 429:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before trying again",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return response


# Schemas that request bodies refer to, added to the document's components.
_BODY_SCHEMAS: dict[str, Any] = {}


def union_body(title: str, adapter: TypeAdapter[Any]) -> dict[str, Any]:
    """The `content` of a request body that is one of several models, validated in the handler.

    Its top level lists every property (so a reader sees them all in one place) and takes
    no others; `oneOf` then says which combinations make a body.
    """
    schema = adapter.json_schema(ref_template=SCHEMAS + "{model}")
    models = schema.pop("$defs", {})
    _BODY_SCHEMAS.update(models)
    properties: dict[str, Any] = {}
    for choice in schema["anyOf"]:  # the union's own models, not the ones they nest
        properties.update(models[choice["$ref"].removeprefix(SCHEMAS)]["properties"])
    body = {
        "title": title,
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "oneOf": schema["anyOf"],
    }
    return {"application/json": {"schema": body}}


def model_body(model: type[BaseModel]) -> dict[str, Any]:
    """The `content` of an optional JSON body read by the handler itself; the models it
    nests go to the document's components."""
    schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
    _BODY_SCHEMAS.update(schema.pop("$defs", {}))
    return {"application/json": {"schema": schema}}


def stream_response(
    description: str, headers: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """A `text/event-stream` answer. Failures of the turn itself (`agent_failed`,
    `sandbox_spawn_failed`, `sandbox_evicted`) arrive in it as `error` events."""
    response = {
        "description": f"{description}\n\n{FRAMING}",
        "content": {"text/event-stream": {"schema": {"$ref": SCHEMAS + "LoopEvent"}}},
    }
    if headers:
        response["headers"] = headers
    return {200: response}


TURN_ID_HEADER = {
    "X-Turn-Id": {
        "description": "the id of the turn this message started (or replays)",
        "required": True,
        "schema": {"type": "string"},
    }
}


def _event_schemas() -> dict[str, Any]:
    """Each event's payload, its frame, and `LoopEvent`: one of the frames, by name."""
    _, top = models_json_schema(
        [(model, "serialization") for model in EVENT_DATA.values()],
        ref_template=SCHEMAS + "{model}",
    )
    schemas: dict[str, Any] = dict(top["$defs"])
    mapping: dict[str, str] = {}
    for name, model in EVENT_DATA.items():
        # The frame's data is JSON text on the wire; its schema is the event's model.
        frame = FRAMES[name].__name__
        properties: dict[str, Any] = {
            "event": {"type": "string", "const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": SCHEMAS + model.__name__},
            },
        }
        if name != "ping":
            properties["id"] = {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "the event's id in its loop: a resume point for Last-Event-ID",
            }
        schemas[frame] = {
            "title": frame,
            "description": model.__doc__ or name,
            "type": "object",
            "required": ["event", "data", *(["id"] if name != "ping" else [])],
            "properties": properties,
        }
        mapping[name] = SCHEMAS + frame
    schemas["LoopEvent"] = {
        "title": "LoopEvent",
        "description": FRAMING,
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "event", "mapping": mapping},
    }
    return schemas


def _finish(doc: dict[str, Any]) -> dict[str, Any]:
    for item in doc["paths"].values():
        for operation in item.values():
            # FastAPI documents a 422 for every validation; this server answers 400.
            operation["responses"].pop("422", None)
            for parameter in operation.get("parameters", []):
                _not_null(parameter["schema"])
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for name, schema in {**_BODY_SCHEMAS, **_event_schemas()}.items():
        assert schemas.get(name, schema) == schema, f"two schemas named {name}"
        schemas[name] = schema
    components["securitySchemes"] = SECURITY_SCHEMES
    doc["security"] = TOKEN_OR_SESSION
    return doc


def _not_null(schema: dict[str, Any]) -> None:
    """An optional query or header parameter is absent or a string, never JSON null."""
    options = schema.get("anyOf", [])
    if len(options) == 2 and {"type": "null"} in options:
        schema.pop("anyOf")
        schema.update(next(o for o in options if o != {"type": "null"}))


def install(app: FastAPI) -> None:
    """Serve the finished document at OPENAPI_URL and Swagger UI, offline, at DOCS_URL."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _finish(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} — docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            # No badge from the public validator: the page calls nothing but this server.
            swagger_ui_parameters={"validatorUrl": None},
        )


def operation_id(route: APIRoute) -> str:
    """Operation ids are the handlers' names: `create_loop`, `send_message`, …"""
    return route.name
