"""The Slack Web API client the adapter uses: slack-sdk's, with every call and 429 counted."""

from __future__ import annotations

from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters import metrics

PLATFORM = "slack"


def _status(outcome: Any) -> str:
    """`ok`, Slack's error name (`msg_too_long`, `ratelimited` …), or `failed`."""
    if isinstance(outcome, SlackApiError):
        return str(outcome.response.get("error") or outcome.response.status_code)
    if isinstance(outcome, Exception):
        return "failed"
    return "ok"


class CountingWebClient(AsyncWebClient):
    async def api_call(self, api_method: str, **kwargs: Any) -> Any:
        return await metrics.counted(
            PLATFORM,
            api_method,
            lambda: super(CountingWebClient, self).api_call(api_method, **kwargs),
            _status,
        )


class CountingRateLimitHandler(AsyncRateLimitErrorRetryHandler):
    """Waits out a 429 like its parent, and counts it."""

    async def _can_retry_async(
        self, *, state: Any, request: Any, response: Any = None, error: Any = None
    ) -> bool:
        if response is not None and response.status_code == 429:
            method = request.url.rsplit("/", 1)[-1]
            metrics.RATE_LIMITED.labels(PLATFORM, method).inc()
        return await super()._can_retry_async(
            state=state, request=request, response=response, error=error
        )
