"""Schemathesis hooks for the run in tests/test_openapi.py (loaded by SCHEMATHESIS_HOOKS).

`positive_data_acceptance` expects a request that fits the schema to be taken. Some of the
contract's refusals depend on what exists, which no schema can say: a cursor naming no loop,
a vault, profile or repo that is not configured, an archived loop, a `Last-Event-ID` ahead of
the loop, metadata or content over their byte limits. This check is that one, except that a
400 carrying one of exactly those codes is a correct answer. Any other 400 (a shape the schema
allows, such as `content: ""` before) still fails it.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

BEYOND_THE_SCHEMA = frozenset(
    {
        "invalid_cursor",
        "invalid_last_event_id",
        "unknown_profile",
        "unknown_vault",
        "unknown_repo",
        "loop_archived",
        "metadata_too_large",
        "content_too_large",
        # Attachments name files that must exist, under rules of where a path may lead.
        "invalid_path",
        "attachment_not_found",
        "attachment_too_large",
        # A branch needs a repo; `since` may not come after `until` (one field depends on
        # another).
        "invalid_branch",
        "invalid_usage_query",
    }
)


def _code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def positive_data_acceptance_but_state(ctx, response, case):  # type: ignore[no-untyped-def]
    if response.status_code == 400 and _code(response.content) in BEYOND_THE_SCHEMA:
        return None
    return positive_data_acceptance(ctx, response, case)
