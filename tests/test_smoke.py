from tests.sse import names, text_of, turn


async def test_text_turn(server):
    r = await server.http.post("/loops", json={"title": "t"})
    assert r.status_code == 201, r.text
    loop = r.json()["id"]
    evs = await turn(server.http, loop, "hello")
    print(names(evs))
    assert names(evs)[0] == "started"
    assert names(evs)[-1] == "done"
    assert text_of(evs) == "Echo #1: hello"
