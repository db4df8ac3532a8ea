"""server.py in process (aiohttp_client), against a real Redis; jobs are moved along by a
Worker object of this process, or by writing to Redis directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient

import server
from server import SUBMITS
from store import Client as RedisClient
from store import Keys, new_jobs, on_node, submit_args
from tests.conftest import RedisServer, free_port, wait_until
from worker import Worker

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def worker(redis_url: str, prefix: str) -> Worker:
    """A worker driven step by step from the test (not its run loop)."""
    return Worker(redis_url, prefix=prefix, backoff=0.0)


async def submit(client: Client, text: str = "hello world") -> dict[str, Any]:
    response = await client.post("/submit", json={"input": text})
    assert response.status == 201, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def work_one(worker: Worker) -> None:
    """Take the next job and run it to its outcome, as the worker's loop would (whether or not
    the server's subscription is confirmed yet: what it missed, a watcher reads from the
    history)."""
    slot = worker.slots[0]
    job = await asyncio.to_thread(worker.take, slot)
    assert job is not None
    await asyncio.to_thread(worker.process, slot, job)


async def assert_error(response: aiohttp.ClientResponse, status: int, words: str) -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert words in body["error"], body


def kill_subscriptions(r: RedisClient, prefix: str) -> int:
    """CLIENT KILL the pub/sub connections of servers where the queue's channel is (on a
    cluster, the node of its slot); returns how many there were."""
    node = on_node(r, Keys(prefix).events)
    subscribers = [c for c in node.client_list()
                   if c["name"] == "jobs-server" and c["ssub"] != "0"]
    for c in subscribers:
        node.client_kill_filter(_id=c["id"])
    return len(subscribers)


def job_keys(r: RedisClient, prefix: str) -> list[str]:
    return list(r.scan_iter(match=f"{prefix}:*"))


# -- submit and status ---------------------------------------------------------------------------

@pytest.mark.cluster
async def test_submit_stores_and_queues_the_job(client: Client, r: RedisClient,
                                                prefix: str) -> None:
    job = await submit(client)
    assert re.fullmatch(r"[0-9a-f]{32}", job["id"])
    assert job | {"id": "", "created": "", "updated": ""} == {
        "id": "", "input": "hello world", "status": "queued", "result": "", "error": "",
        "attempts": 0, "created": "", "updated": "", "version": 1, "seq": 1, "queue": "default",
        "priority": 5, "group": None}
    assert datetime.fromisoformat(job["created"]).utcoffset() is not None
    keys = Keys(prefix)
    assert r.lrange(keys.queue, 0, -1) == [job["id"]]
    assert r.hget(keys.job(job["id"]), "input") == "hello world"


async def test_ids_are_unique(client: Client) -> None:
    jobs = await asyncio.gather(*(submit(client) for _ in range(50)))
    assert len({job["id"] for job in jobs}) == 50


@pytest.mark.cluster
async def test_submits_that_meet_share_one_pipeline_and_a_lost_script_is_loaded_again(
        client: Client, r: RedisClient, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """20 submits in one turn of the loop reach Redis as one pipeline, each answered with its
    own job. After SCRIPT FLUSH (as after a restart), what Redis refused unrun is sent once
    more (the client loads the script), and stored once."""
    app = client.app
    assert app is not None
    submits, keys = app[SUBMITS], Keys(prefix)
    pipelines: list[int] = []
    pipelined = submits.pipelined

    async def counted(key: str, batch: list[list[Any]]) -> list[Any]:
        pipelines.append(len(batch))
        replies: list[Any] = await pipelined(key, batch)
        return replies

    monkeypatch.setattr(submits, "pipelined", counted)
    for flush in (True, False):
        if flush:
            r.script_flush()
        pipelines.clear()
        jobs = [new_jobs([f"t{i}"]) for i in range(20)]
        replies = await asyncio.gather(*(submits.run(keys.queue, submit_args(
            prefix, 60, job, None)) for job in jobs))
        assert pipelines == [20]
        assert replies == [([0], 0)] * 20
        for job in jobs:
            assert r.hget(keys.job(str(job[0]["id"])), "input") == job[0]["input"]
    assert r.llen(keys.queue) == 40


@pytest.mark.cluster
async def test_status_follows_the_job(client: Client, worker: Worker) -> None:
    job = await submit(client)
    response = await client.get("/status", params={"id": job["id"]})
    assert (await response.json())["status"] == "queued"
    await work_one(worker)
    body = await (await client.get("/status", params={"id": job["id"]})).json()
    assert (body["status"], body["result"], body["attempts"]) == ("done", "HELLO WORLD", 1)


@pytest.mark.parametrize(("body", "words"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b'["hello"]', "must be a JSON object"),
    (b'"hello"', "must be a JSON object"),
    (b"{}", '"input" is missing or not a string'),
    (b'{"input": 42}', '"input" is missing or not a string'),
    (b'{"input": null}', '"input" is missing or not a string'),
    (b'{"input": "\\ud800"}', "not valid Unicode"),
])
async def test_submit_rejects_bad_input(client: Client, r: redis.Redis, prefix: str,
                                        body: bytes, words: str) -> None:
    response = await client.post("/submit", data=body,
                                 headers={"Content-Type": "application/json"})
    await assert_error(response, 400, words)
    assert job_keys(r, prefix) == []  # nothing half-written


async def test_submit_refuses_a_large_body_before_reading_it(make_client: MakeClient,
                                                             r: redis.Redis,
                                                             prefix: str) -> None:
    client = await make_client(max_input_bytes=1000)
    response = await client.post("/submit", json={"input": "x" * 2000})
    await assert_error(response, 413, "limit is 1000 bytes")

    async def chunks() -> Any:  # no Content-Length: refused once the limit is passed
        for _ in range(100):
            yield b"x" * 500

    response = await client.post("/submit", data=chunks())
    await assert_error(response, 413, "too large")
    assert (await submit(client, "x" * 900))["input"] == "x" * 900
    assert sorted(k.split(":")[1] for k in job_keys(r, prefix)) == [  # one job, nothing else
        "counters", "groups", "index", "job", "priorities", "queue", "wake"]  # no history: lazy


async def test_status_errors(client: Client) -> None:
    await assert_error(await client.get("/status"), 400, "missing query parameter: id")
    await assert_error(await client.get("/status", params={"id": "0" * 32}), 404, "no job")
    await assert_error(await client.get("/status", params={"id": "../x"}), 404, "no job")


async def test_unknown_routes_and_methods_get_json_errors(client: Client) -> None:
    await assert_error(await client.get("/nope"), 404, "no such endpoint")
    await assert_error(await client.get("/submit"), 405, "GET is not allowed")


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "redis": "ok"}


async def test_redis_unreachable_is_503_and_the_server_stays_up(make_client: MakeClient) -> None:
    client = await make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    await assert_error(await client.get("/healthz"), 503, "unavailable")
    await assert_error(await client.post("/submit", json={"input": "x"}), 503, "unavailable")
    await assert_error(await client.get("/status", params={"id": "a" * 32}), 503, "unavailable")
    await assert_error(await client.get("/events", params={"id": "a" * 32}), 503, "unavailable")
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect("/ws", params={"id": "a" * 32})
    assert caught.value.status == 503


@pytest.mark.cluster
async def test_hundreds_of_concurrent_submits_all_succeed(client: Client) -> None:
    responses = await asyncio.gather(
        *(client.post("/submit", json={"input": str(i)}) for i in range(500)))
    assert [resp.status for resp in responses] == [201] * 500


# -- live updates --------------------------------------------------------------------------------

async def read_ws(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    messages = []
    async for message in ws:
        assert message.type is aiohttp.WSMsgType.TEXT
        messages.append(json.loads(message.data))
    return messages


async def watch_it_run(client: Client, job_id: str,
                       worker: Worker) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """Watch a job over the WebSocket while the worker runs it: the first message, the rest,
    and the close code."""
    async with client.ws_connect("/ws", params={"id": job_id}) as ws:
        first = await ws.receive_json(timeout=5)
        await work_one(worker)
        rest = await asyncio.wait_for(read_ws(ws), 5)
    return first, rest, ws.close_code


@pytest.mark.cluster
async def test_websocket_first_state_then_each_change_then_close(client: Client,
                                                                 worker: Worker) -> None:
    job = await submit(client)
    first, rest, close_code = await watch_it_run(client, job["id"], worker)
    assert (first["id"], first["status"]) == (job["id"], "queued")
    assert [m["status"] for m in rest] == ["running", "done"]
    assert rest[-1]["result"] == "HELLO WORLD"
    assert close_code == aiohttp.WSCloseCode.OK


async def test_websocket_on_a_finished_job_sends_it_and_closes(client: Client,
                                                               worker: Worker) -> None:
    job = await submit(client)
    await work_one(worker)
    async with client.ws_connect("/ws", params={"id": job["id"]}) as ws:
        messages = await asyncio.wait_for(read_ws(ws), 5)
    assert [(m["status"], m["result"]) for m in messages] == [("done", "HELLO WORLD")]
    assert ws.close_code == aiohttp.WSCloseCode.OK


@pytest.mark.cluster
async def test_failed_job_message_carries_the_error(client: Client, redis_url: str,
                                                    prefix: str) -> None:
    def fail(text: str) -> str:
        raise RuntimeError("no thanks")

    worker = Worker(redis_url, fail, prefix=prefix, max_attempts=1)
    job = await submit(client)
    _, messages, _ = await watch_it_run(client, job["id"], worker)
    assert messages[-1]["status"] == "failed"
    assert messages[-1]["error"] == "RuntimeError: no thanks"


async def test_websocket_refusals_come_before_the_upgrade(client: Client) -> None:
    for params, status in [({}, 400), ({"id": "0" * 32}, 404), ({"id": "zz"}, 404)]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await client.ws_connect("/ws", params=params)
        assert caught.value.status == status
    job = await submit(client)
    response = await client.get("/ws", params={"id": job["id"]})  # not an upgrade
    await assert_error(response, 400, "speaks WebSocket")


async def test_origin_check(make_client: MakeClient) -> None:
    client = await make_client(allowed_origins=frozenset({"https://app.example"}))
    job = await submit(client)
    params = {"id": job["id"]}
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect("/ws", params=params, origin="https://evil.example")
    assert caught.value.status == 403
    response = await client.get("/events", params=params, headers={"Origin": "https://evil.ex"})
    await assert_error(response, 403, "origin https://evil.ex is not allowed")
    same = f"http://{client.host}:{client.port}"
    for origin in ("https://app.example", same, None):
        ws = await client.ws_connect("/ws", params=params, origin=origin)
        assert (await ws.receive_json(timeout=5))["status"] == "queued"
        await ws.close()


def sse_events(text: str) -> list[tuple[int, dict[str, Any]]]:
    """The (id, message) of each event in a text/event-stream body; comments left out."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n")
                      if line and not line.startswith(":"))
        if fields:
            events.append((int(fields["id"]), json.loads(fields["data"])))
    return events


@pytest.mark.cluster
async def test_server_events_stream(client: Client, worker: Worker) -> None:
    job = await submit(client)
    response = await client.get("/events", params={"id": job["id"]})
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
    assert [(i, m["status"]) for i, m in sse_events(first.decode())] == [(1, "queued")]
    await work_one(worker)
    rest = (await asyncio.wait_for(response.content.read(), 5)).decode()  # ends after done
    events = sse_events(rest)
    assert [m["status"] for _, m in events] == ["running", "done"]
    assert all(i == m["version"] for i, m in events)  # the id of an event is its version


async def test_an_eventsource_reconnecting_after_the_end_is_told_to_stop(
        client: Client, worker: Worker) -> None:
    """An EventSource reconnects whenever a stream ends; 204 is what stops it."""
    job = await submit(client)
    await work_one(worker)
    response = await client.get("/events", params={"id": job["id"]})
    [(last, message)] = sse_events(await response.text())  # a first connection: the end, once
    assert message["status"] == "done"
    reconnect = await client.get("/events", params={"id": job["id"]},
                                 headers={"Last-Event-ID": str(last)})
    assert (reconnect.status, await reconnect.read()) == (204, b"")
    # One that missed the end (it dropped before `done` arrived) still gets it.
    missed = await client.get("/events", params={"id": job["id"]},
                              headers={"Last-Event-ID": str(last - 1)})
    assert [m["status"] for _, m in sse_events(await missed.text())] == ["done"]
    await assert_error(await client.get("/events", params={"id": job["id"]},
                                        headers={"Last-Event-ID": "x"}), 400, "Last-Event-ID")


async def test_an_eventsource_reconnecting_mid_job_gets_only_what_it_missed(
        client: Client, worker: Worker) -> None:
    job = await submit(client)
    response = await client.get("/events", params={"id": job["id"]},
                                headers={"Last-Event-ID": "1"})  # it has seen `queued`
    await work_one(worker)
    events = sse_events((await asyncio.wait_for(response.content.read(), 5)).decode())
    assert [m["status"] for _, m in events] == ["running", "done"]


async def test_events_errors(client: Client) -> None:
    await assert_error(await client.get("/events"), 400, "missing query parameter: id")
    await assert_error(await client.get("/events", params={"id": "1" * 32}), 404, "no job")


async def test_a_peer_that_stops_answering_pings_is_dropped(make_client: MakeClient) -> None:
    client = await make_client(heartbeat=0.2)
    job = await submit(client)
    ws = await client.ws_connect("/ws", params={"id": job["id"]}, autoping=False)
    assert (await ws.receive_json(timeout=5))["status"] == "queued"
    kinds = []
    while (message := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.PING:
        kinds.append(message.type)  # never answered
    assert kinds and message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await ws.close()


@pytest.mark.cluster
async def test_changes_while_pubsub_was_down_are_pushed_after_resubscribe(
        client: Client, worker: Worker, r: RedisClient, prefix: str) -> None:
    job = await submit(client)
    async with client.ws_connect("/ws", params={"id": job["id"]}) as ws:
        assert (await ws.receive_json(timeout=5))["status"] == "queued"
        # Finish the job without a message, as if it were published while the server was
        # not subscribed; then cut the subscription: the resync after it must find the change.
        r.hset(Keys(prefix).job(job["id"]),
               mapping={"status": "done", "result": "SET BY HAND", "version": 5})
        # The server's, on the node of the slot, once it is there: the first message does not
        # wait for it (on a cluster the server may still be learning the slots).
        await asyncio.to_thread(wait_until, lambda: kill_subscriptions(r, prefix),
                                what="the server's subscription to kill")
        messages = await asyncio.wait_for(read_ws(ws), 10)
    assert messages[-1]["status"] == "done"
    assert messages[-1]["result"] == "SET BY HAND"


def subscribers(r: RedisClient, prefix: str) -> int:
    """Subscriptions to the queue's channel, on the node of its slot (on a cluster): where the
    scripts SPUBLISH."""
    channel = Keys(prefix).events
    return int(dict(on_node(r, channel).pubsub_shardnumsub(channel))[channel])


@pytest.mark.cluster
async def test_one_subscription_however_many_watchers(client: Client, r: RedisClient,
                                                      prefix: str) -> None:
    job = await submit(client)
    sockets = [await client.ws_connect("/ws", params={"id": job["id"]}) for _ in range(20)]
    for ws in sockets:
        await ws.receive_json(timeout=5)
    # The first messages do not wait for the subscription: wait for it here.
    count = await asyncio.to_thread(wait_until, lambda: subscribers(r, prefix),
                                    what="the server's subscription")
    assert count == 1
    for ws in sockets:
        await ws.close()


@pytest.mark.cluster
async def test_a_queue_is_followed_only_while_somebody_watches_it(
        client: Client, worker: Worker, r: RedisClient, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No subscription for jobs nobody watches; one from a watcher's arrival until LINGER s
    after the last one left; and a /feed opens once it is subscribed, so the page's first read
    misses nothing."""
    monkeypatch.setattr(server, "LINGER", 0.5)
    job = await submit(client)
    await work_one(worker)
    assert subscribers(r, prefix) == 0
    job = await submit(client)
    async with client.ws_connect("/ws", params={"id": job["id"]}) as ws:
        assert (await ws.receive_json(timeout=5))["status"] == "queued"
        await asyncio.to_thread(wait_until, lambda: subscribers(r, prefix) == 1, 10,
                                "a subscription")
        await work_one(worker)
        assert [m["status"] for m in await asyncio.wait_for(read_ws(ws), 10)] == [
            "running", "done"]
    await asyncio.to_thread(wait_until, lambda: subscribers(r, prefix) == 0, 10,
                            "the queue let go")
    response = await client.get("/feed")
    assert await asyncio.wait_for(response.content.readline(), 5) == b": connected\n"
    assert subscribers(r, prefix) == 1
    response.close()


async def test_shutdown_closes_watchers_going_away(client: Client) -> None:
    job = await submit(client)
    ws = await client.ws_connect("/ws", params={"id": job["id"]})
    await ws.receive_json(timeout=5)
    await client.server.close()  # runs on_shutdown
    message = await ws.receive(timeout=5)
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()


async def test_watcher_sees_job_of_another_server(make_client: MakeClient,
                                                  worker: Worker) -> None:
    first, second = await make_client(), await make_client()
    job = await submit(first)
    _, messages, _ = await watch_it_run(second, job["id"], worker)
    assert messages[-1]["result"] == "HELLO WORLD"


async def test_a_busy_redis_is_503_with_what_redis_said(make_client: MakeClient,
                                                        own_redis: RedisServer) -> None:
    """Every error reply is a JSON answer, never a 500: here BUSY (a script that runs on)."""
    client = await make_client(redis_url=own_redis.url)
    r = redis.Redis.from_url(own_redis.url)
    r.config_set("busy-reply-threshold", 50)  # ms a script runs before others get BUSY

    def spin() -> None:
        with contextlib.suppress(redis.ResponseError):  # "killed by SCRIPT KILL"
            r.eval("while true do end", 0)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        probe = redis.Redis.from_url(own_redis.url)

        def busy() -> bool:
            try:
                probe.ping()
                return False
            except redis.ResponseError as exc:
                return "BUSY" in str(exc)

        await asyncio.to_thread(wait_until, busy, what="Redis to be BUSY")
        await assert_error(await client.post("/submit", json={"input": "x"}), 503, "BUSY")
        await assert_error(await client.get("/status", params={"id": "a" * 32}), 503, "BUSY")
        health = await client.get("/healthz")
        assert health.status == 200
        assert "refuses writes: BUSY" in (await health.json())["redis"]
    finally:
        probe.script_kill()
        spinner.join()
        probe.close()
        r.close()


# -- who may ask ----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["rebind.example", "rebind.example:8080", "10.0.0.1"])
async def test_without_a_token_only_loopback_names_are_answered(make_client: MakeClient,
                                                                host: str) -> None:
    """A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) is same-origin as
    far as Origin goes; its Host header still names that site."""
    client = await make_client()
    for method, path in [("GET", "/jobs?status=failed"), ("POST", "/jobs/retry-failed"),
                         ("GET", "/stats")]:
        response = await client.request(method, path, headers={"Host": host,
                                                               "Origin": f"http://{host}"})
        await assert_error(response, 421, "loopback address only")
    for host in ["localhost:8080", "127.0.0.1", "[::1]:80"]:
        assert (await client.get("/stats", headers={"Host": host})).status == 200
    settings: list[dict[str, Any]] = [{"token": "t"}, {"insecure_no_auth": True}]
    for kwargs in settings:  # then Host is not the guard
        other = await make_client(**kwargs)
        response = await other.get("/stats", headers={"Host": host, "Authorization": "Bearer t"})
        assert response.status == 200


async def test_a_bug_is_a_json_500(client: Client, r: redis.Redis, prefix: str) -> None:
    r.hset(Keys(prefix).lease("w"), mapping={"pid": "not a number"})  # not what workers write
    r.sadd(Keys(prefix).workers, "w/0")
    await assert_error(await client.get("/stats"), 500, "internal error")


async def test_feed_messages_carry_the_start_of_a_long_result(client: Client,
                                                              worker: Worker) -> None:
    async with client.get("/feed") as feed:
        assert await feed.content.readline() == b": connected\n"
        await submit(client, "x" * 10_000)
        await work_one(worker)
        seen: dict[str, Any] = {}
        while seen.get("status") != "done":
            line = await asyncio.wait_for(feed.content.readline(), 10)
            if line.startswith(b"data: "):
                seen = json.loads(line[6:])[-1]
    assert seen["result"] == "X" * 256


async def test_queues_followed_do_not_take_the_requests_connections(
        make_client: MakeClient, r: RedisClient, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscription holds its connection for good: with more queues followed than the pool
    has connections, requests must still get theirs (subscriptions have a pool of their own)."""
    monkeypatch.setattr("server.POOL_SIZE", 3)
    client = await make_client()
    queues = [f"q{n}" for n in range(5)]
    ids = {}
    for queue in queues:
        response = await client.post("/submit", json={"input": "x", "queue": queue})
        assert response.status == 201, await response.text()
        ids[queue] = (await response.json())["id"]
    response = await client.get("/stats")
    assert response.status == 200, await response.text()
    assert set((await response.json())["queues"]) == {"default", *queues}
    feed = await client.get("/feed")  # follows every queue in the registry: 6 in all
    assert feed.status == 200, await feed.text()
    await asyncio.to_thread(wait_until, lambda: sum(
        n for _, n in r.pubsub_shardnumsub(*(Keys(prefix, q).events for q in ["default", *queues]))
    ) >= 3, what="the subscriptions to take every connection of their pool")
    for queue, job_id in ids.items():  # each request gets a connection, and at once
        response = await client.get("/status", params={"id": job_id, "queue": queue},
                                    timeout=aiohttp.ClientTimeout(total=4))
        assert response.status == 200, await response.text()
    feed.close()
