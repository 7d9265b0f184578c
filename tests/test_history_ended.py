"""A history item's `ended` is always one the contract lists, at every stage of a turn."""

from __future__ import annotations

from tests.polling import until
from tests.sse import events, names, turn

# The contract's list (spec: history item).
ENDED = {"done", "interrupted", "error", "running", "queued"}


async def history(server, loop: str) -> list[str]:
    r = await server.http.get(f"/loops/{loop}/messages")
    assert r.status_code == 200, r.text
    ended = [item["ended"] for item in r.json()["data"]]
    assert set(ended) <= ENDED, ended
    return ended


async def test_every_stage_of_a_turn_shows_a_listed_ended(server):
    loop = (await server.http.post("/loops", json={})).json()["id"]
    slow = events(server.http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 3]]"})
    async for ev in slow:
        if ev.name == "assistant_delta":
            break
    queued = events(server.http, "POST", f"/loops/{loop}/messages", json={"content": "next"})
    assert (await anext(queued)).name == "queued"
    assert await history(server, loop) == ["running", "queued"]

    assert (await server.http.post(f"/loops/{loop}/interrupt")).status_code == 202
    async for ev in slow:
        if ev.name == "interrupted":
            break
    rest = [ev.name async for ev in queued]
    assert rest[-1] == "done", rest
    await slow.aclose()
    failed = await turn(server.http, loop, "[[fail]]")
    assert names(failed)[-1] == "error"
    assert await history(server, loop) == ["interrupted", "done", "error"]
    # And the same once every turn is read from its row: no ended turn waits for its write.
    runtime = server.engine._runtimes.get(loop)
    await until(lambda: runtime is None or not runtime.unsaved, what="the turns' rows")
    assert await history(server, loop) == ["interrupted", "done", "error"]
