"""Job management (commit a44ef16): delayed and bulk submits, GET /jobs, cancel, retry,
/stats, /metrics, /feed and access control, against a real Redis. The server runs in this
process (aiohttp_client on make_app); workers run in this process step by step (a Worker
object) where a test needs each step exact, and as processes (stopped by pid) where it needs
them to run on their own.

    python3 -m pytest tests/test_manage.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from server import MESSAGE_FIELDS
from store import MAX_BULK, MAX_DELAY, RUNTIME_BUCKETS, STATES, Keys
from tests import handlers
from tests.conftest import (
    Procs,
    call,
    delete_prefix,
    eventually,
    free_port,
    fuzz,
    plain,
    stop,
)
from worker import Worker

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

TOKEN = "t0k-7f3c9e1d-never-echoed"
SUMMARY = {"id", "status", "input", "result", "error", "attempts", "created", "updated",
           "version", "priority", "group"}


# -- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture
def make_worker(redis_url: str, prefix: str) -> Iterator[Callable[..., Worker]]:
    """Workers driven step by step from the test (not their run loop); closed at teardown."""
    made: list[Worker] = []

    def make(handler: Callable[[str], str] = handlers.flaky, **kwargs: Any) -> Worker:
        made.append(Worker(redis_url, handler, prefix=prefix, backoff=0.0, **kwargs))
        return made[-1]

    yield make
    for worker in made:
        worker.redis.close()


async def work_one(worker: Worker) -> str:
    """Take the next job and run it to its outcome, as a worker's loop would; its id."""
    slot = worker.slots[0]
    job = await asyncio.to_thread(worker.take, slot)
    assert job is not None
    await asyncio.to_thread(worker.process, slot, job, False)
    return job.id


def keys_of(r: redis.Redis, prefix: str) -> list[str]:
    return sorted(r.scan_iter(match=f"{prefix}:*", count=1000))


def hget(r: redis.Redis, prefix: str, job_id: str, field: str) -> str | None:
    return r.hget(Keys(prefix).job(job_id), field)  # type: ignore[return-value]


async def wait_status(r: redis.Redis, prefix: str, job_id: str, status: str,
                      within: float = 15.0) -> float:
    """Until the job is in that state; returns the monotonic time it was seen there."""
    async def there() -> bool:
        return hget(r, prefix, job_id, "status") == status
    await eventually(there, within, f"job {job_id} to be {status}")
    return time.monotonic()


async def start_worker(procs: Procs, r: redis.Redis, prefix: str, *args: str) -> Any:
    """A worker process, once its lease is in Redis (so it is taking jobs)."""
    before = set(r.scan_iter(match=f"{prefix}:lease:*"))
    proc = procs.worker("--lease", "10", *args)

    async def leased() -> bool:
        assert proc.poll() is None, procs.log(proc)
        return bool(set(r.scan_iter(match=f"{prefix}:lease:*")) - before)
    await eventually(leased, 15, "the worker's lease")
    return proc


async def stats(client: Client) -> dict[str, Any]:
    return await call(client, "GET", "/stats", 200)  # type: ignore[no-any-return]


def since(stamp: str, other: str) -> float:
    return (datetime.fromisoformat(stamp) - datetime.fromisoformat(other)).total_seconds()


# 1 -- every error --------------------------------------------------------------------------------

HEX = "0123456789abcdef" * 2


@pytest.mark.parametrize("query", [
    {},
    {"status": "bogus"},
    {"status": "QUEUED"},
    {"status": ""},
    {"status": "queued", "limit": "0"},
    {"status": "queued", "limit": "501"},
    {"status": "queued", "limit": "-1"},
    {"status": "queued", "limit": "abc"},
    {"status": "queued", "limit": "1.5"},
    {"status": "queued", "limit": ""},
    {"status": "queued", "limit": "\u00b2"},  # a digit to str.isdigit(), not to int()
    {"status": "queued", "cursor": "nonsense"},
    {"status": "queued", "cursor": "1732999999123456"},
    {"status": "queued", "cursor": "-" + HEX},
    {"status": "queued", "cursor": "1732999999123456-" + HEX.upper()},
    {"status": "queued", "cursor": "1..2-" + HEX},  # matches the cursor pattern, not a number
    {"status": "queued", "cursor": "1e-" + HEX},
])
async def test_jobs_rejects_a_bad_query(client: Client, query: dict[str, str]) -> None:
    await call(client, "GET", "/jobs?" + urlencode(query), 400)


BAD_SUBMITS = [
    (b'{"input": "x", "delay": -1}', '"delay" must be'),
    (b'{"input": "x", "delay": -0.001}', '"delay" must be'),
    (b'{"input": "x", "delay": NaN}', '"delay" must be'),
    (b'{"input": "x", "delay": Infinity}', '"delay" must be'),
    (b'{"input": "x", "delay": -Infinity}', '"delay" must be'),
    (b'{"input": "x", "delay": %d}' % (MAX_DELAY + 1), '"delay" must be'),
    (b'{"input": "x", "delay": 1e300}', '"delay" must be'),
    (b'{"input": "x", "delay": true}', '"delay" must be'),
    (b'{"input": "x", "delay": false}', '"delay" must be'),
    (b'{"input": "x", "delay": "5"}', '"delay" must be'),
    (b'{"input": "x", "delay": [5]}', '"delay" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09:30:00"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "tomorrow"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": ""}', '"run_at" must be'),
    (b'{"input": "x", "run_at": 1764581400}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-13-01T09:30:00+00:00"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "9999-12-31T00:00:00+00:00"}', '"run_at" must be within'),
    # ISO 8601 forms that datetime.fromisoformat takes but RFC 3339 does not:
    (b'{"input": "x", "run_at": "2026-W49-2T09:30:00+01:00"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "20261201T093000+0100"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09+01:00"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09:30+01:00"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09:30:00+01"}', '"run_at" must be'),
    ('{"input": "x", "run_at": "2026-12-0\u0661T09:30:00Z"}'.encode(), '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09:30:61Z"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09:30:00+01:60"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "2026-12-01T09:30:00+24:00"}', '"run_at" must be'),
    (b'{"input": "x", "run_at": "9999-12-31T23:59:60Z"}', '"run_at" must be within'),
    (b'{"input": "x", "delay": 5, "run_at": "2026-12-01T09:30:00+01:00"}', "not both"),
    (b'{"input": "x", "inputs": ["y"]}', "not both"),
    (b'{"inputs": []}', '"inputs" must be a list'),
    (json.dumps({"inputs": ["x"] * (MAX_BULK + 1)}).encode(), '"inputs" must be a list'),
    (b'{"inputs": "abc"}', '"inputs" must be a list'),
    (b'{"inputs": {"a": "b"}}', '"inputs" must be a list'),
    (b'{"inputs": ["a", 1]}', 'every one of "inputs"'),
    (b'{"inputs": ["a", null]}', 'every one of "inputs"'),
    (b'{"inputs": ["a", ["b"]]}', 'every one of "inputs"'),
    (b'{"inputs": ["a", "\\ud800"]}', "not valid Unicode"),
    (b'{"inputs": ["a"], "delay": -5}', '"delay" must be'),
]


@pytest.mark.parametrize(("body", "words"), BAD_SUBMITS)
async def test_submit_rejects_a_bad_schedule_or_bulk(client: Client, r: redis.Redis,
                                                     prefix: str, body: bytes,
                                                     words: str) -> None:
    response = await client.post("/submit", data=body,
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400, await response.text()
    assert words in (await response.json())["error"]
    assert keys_of(r, prefix) == []  # nothing stored, nothing counted


@pytest.mark.parametrize(("run_at", "utc"), [
    ("2020-01-01T00:00:00-07:00", "2020-01-01T07:00:00.000000+00:00"),
    ("2020-01-01t07:00:00.25z", "2020-01-01T07:00:00.250000+00:00"),
    ("2020-01-01 07:00:00Z", "2020-01-01T07:00:00.000000+00:00"),
    ("2016-12-31T23:59:60Z", "2017-01-01T00:00:00.000000+00:00"),  # a leap second
])
async def test_run_at_takes_rfc_3339(client: Client, run_at: str, utc: str) -> None:
    job = await call(client, "POST", "/submit", 201, json={"input": "x", "run_at": run_at})
    assert (job["status"], job["run_at"]) == ("delayed", utc)


async def test_a_run_at_long_past_is_no_server_error(client: Client) -> None:
    """Year 1 with a positive offset is year 0 in UTC: a valid time, long past."""
    response = await client.post(
        "/submit", json={"input": "x", "run_at": "0001-01-01T00:00:00+01:00"})
    assert response.status in (201, 400), await response.text()
    assert response.content_type == "application/json"


async def test_submit_accepts_the_edges(client: Client, r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    for delay in (0, 0.5, MAX_DELAY):
        before = time.time()
        job = await call(client, "POST", "/submit", 201, json={"input": "x", "delay": delay})
        assert job["status"] == "delayed"
        due = datetime.fromisoformat(job["run_at"]).timestamp()
        assert before + delay - 0.01 <= due <= time.time() + delay + 0.01
        assert r.zscore(keys.delayed, job["id"]) == pytest.approx(due, abs=1e-3)
    many = await call(client, "POST", "/submit", 201,
                      json={"inputs": [str(i) for i in range(MAX_BULK)]})
    assert [job["input"] for job in many["jobs"]] == [str(i) for i in range(MAX_BULK)]
    assert {job["status"] for job in many["jobs"]} == {"queued"}
    assert r.llen(keys.queue) == MAX_BULK
    assert (await stats(client))["totals"]["submitted"] == MAX_BULK + 3
    bulk_later = await call(client, "POST", "/submit", 201,
                            json={"inputs": ["a", "b"], "run_at": "2020-01-01T00:00:00-07:00"})
    assert {(j["status"], j["run_at"]) for j in bulk_later["jobs"]} == {
        ("delayed", "2020-01-01T07:00:00.000000+00:00")}


@pytest.mark.parametrize("body", [
    b"not json", b"[1]", b'"' + TOKEN.encode() + b'"', b"{}", b'{"token": 5}',
    b'{"token": null}', b"[" * 50_000,  # json.loads raises RecursionError, not ValueError
], ids=["not-json", "a-list", "a-string", "no-token", "a-number", "null", "nested"])
async def test_login_rejects_a_bad_body(make_client: MakeClient, body: bytes) -> None:
    client = await make_client(token=TOKEN)
    response = await client.post("/login", data=body)
    assert response.status == 400, await response.text()
    assert "error" in await response.json()
    assert "Set-Cookie" not in response.headers


async def test_login_with_an_unencodable_token_is_refused(make_client: MakeClient) -> None:
    client = await make_client(token=TOKEN)
    response = await client.post("/login", data=b'{"token": "\\ud800"}')
    assert response.status in (400, 401), await response.text()
    assert "error" in await response.json()


async def test_access_control_with_a_token(make_client: MakeClient, r: redis.Redis,
                                           prefix: str) -> None:
    client = await make_client(token=TOKEN)
    bodies: list[bytes] = []

    async def expect(method: str, path: str, status: int, **kwargs: Any) -> aiohttp.ClientResponse:
        response = await client.request(method, path, **kwargs)
        bodies.append(await response.read())
        assert response.status == status, (method, path, kwargs, bodies[-1][:300])
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
            brought = "Bearer " in kwargs["headers"].get("Authorization", "") \
                or "jobs_token=" in kwargs["headers"].get("Cookie", "")
            assert json.loads(bodies[-1])["error"] == (
                "wrong token" if brought else
                "a token is needed: send Authorization: Bearer <token>"), kwargs
        return response

    good = {"Authorization": f"Bearer {TOKEN}"}
    job = await call(client, "POST", "/submit", 201, json={"input": "x"}, headers=good)
    wrongs: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"}, {"Cookie": "jobs_token=wrong"},
        {"Cookie": f"jobs_token={TOKEN}x"}, {"Cookie": f"other={TOKEN}"}]
    for headers in wrongs:
        for method, path in [("GET", "/stats"), ("GET", "/metrics"), ("GET", "/jobs?status=queued"),
                             ("GET", "/auth"), ("GET", f"/status?id={job['id']}"),
                             ("GET", f"/events?id={job['id']}"), ("GET", "/feed"),
                             ("GET", f"/ws?id={job['id']}"),
                             ("GET", "/nope"), ("POST", "/submit"), ("POST", "/logout"),
                             ("POST", "/jobs/retry-failed"),
                             ("POST", f"/jobs/{job['id']}/cancel"),
                             ("POST", f"/jobs/{job['id']}/retry")]:
            await expect(method, path, 401, headers=headers, json={"input": "y"})
    assert hget(r, prefix, job["id"], "status") == "queued"  # the cancel did nothing
    assert r.llen(Keys(prefix).queue) == 1  # the submits did nothing
    # Open without a token: liveness and the dashboard.
    assert (await expect("GET", "/healthz", 200)).content_type == "application/json"
    assert (await expect("GET", "/", 200)).content_type == "text/html"
    for name, kind in [("index.html", "text/html"), ("app.js", "javascript"),
                       ("style.css", "text/css")]:
        assert kind in (await expect("GET", f"/static/{name}", 200)).content_type
    for name in ("nope.js", "..%2Fserver.py", "index.html%00", "index.html.gz"):
        missing = await expect("GET", f"/static/{name}", 404)
        assert (await missing.json())["error"] == "no such file"
    # With it: a Bearer header (any case of the scheme), or the cookie /login sets.
    for headers in (good, {"Authorization": f"bearer {TOKEN}"},
                    {"Cookie": f"jobs_token={TOKEN}"}):
        assert await (await expect("GET", "/auth", 200, headers=headers)).json() == {
            "auth": "ok"}
        await expect("GET", "/stats", 200, headers=headers)
    response = await expect("POST", "/login", 204, json={"token": TOKEN})
    cookie = SimpleCookie(response.headers["Set-Cookie"])["jobs_token"]
    assert cookie.value == TOKEN
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    response = await expect("POST", "/logout", 204, headers=good)
    assert SimpleCookie(response.headers["Set-Cookie"])["jobs_token"].value == ""
    # The token is in no body, whatever was asked.
    await expect("GET", "/metrics", 200, headers=good)
    await expect("GET", f"/status?id={job['id']}", 200, headers=good)
    assert not [body for body in bodies if TOKEN.encode() in body]


async def test_a_wrong_login_is_401_with_a_challenge(make_client: MakeClient) -> None:
    """Every 401 carries WWW-Authenticate (RFC 9110 15.5.2), as the README says."""
    client = await make_client(token=TOKEN)
    response = await client.post("/login", json={"token": "wrong"})
    body = await response.read()
    assert response.status == 401
    assert json.loads(body)["error"] and TOKEN.encode() not in body
    assert "Set-Cookie" not in response.headers
    assert response.headers.get("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"Cookie: jobs_token=\xff"])
async def test_a_credential_that_is_not_utf8_is_401(make_client: MakeClient,
                                                    header: bytes) -> None:
    """Bytes that are not UTF-8 where the token goes: a wrong token, not a server error."""
    client = await make_client(token=TOKEN)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n" + header
                     + b"\r\nConnection: close\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), reply[:300]
    assert b"WWW-Authenticate: Bearer" in head and "error" in json.loads(body)


async def test_without_a_token_auth_says_none(client: Client) -> None:
    assert await call(client, "GET", "/auth", 200) == {"auth": "none"}
    response = await client.post("/login", json={"token": "anything"})
    assert response.status == 204
    assert "Set-Cookie" not in response.headers


async def test_a_post_from_a_foreign_origin_is_403(make_client: MakeClient, r: redis.Redis,
                                                   prefix: str) -> None:
    client = await make_client(allowed_origins=frozenset({"https://ok.example"}))
    job = await call(client, "POST", "/submit", 201, json={"input": "x"})
    evil = {"Origin": "https://evil.example"}
    for path in ("/submit", "/jobs/retry-failed", f"/jobs/{job['id']}/cancel",
                 f"/jobs/{job['id']}/retry", "/login", "/logout"):
        body = await call(client, "POST", path, 403, json={"input": "y"}, headers=evil)
        assert "https://evil.example" in body["error"]
    assert hget(r, prefix, job["id"], "status") == "queued"
    assert r.llen(Keys(prefix).queue) == 1
    for origin in ("https://ok.example", f"http://{client.host}:{client.port}"):
        await call(client, "POST", "/submit", 201, json={"input": "y"}, headers={"Origin": origin})
    # With a token, the right one does not make a foreign origin's POST pass.
    with_token = await make_client(token=TOKEN)
    await call(with_token, "POST", "/submit", 403, json={"input": "y"},
               headers=evil | {"Authorization": f"Bearer {TOKEN}"})
    assert r.llen(Keys(prefix).queue) == 3


@pytest.mark.parametrize("action", ["retry", "cancel"])
async def test_unknown_and_malformed_ids_are_404(client: Client, r: redis.Redis, prefix: str,
                                                 action: str) -> None:
    for job_id in (uuid.uuid4().hex, "not-an-id", HEX.upper(), HEX[:-1], HEX + "0", "..%2Fx"):
        await call(client, "POST", f"/jobs/{job_id}/{action}", 404)
    assert keys_of(r, prefix) == []


async def test_conflicts_are_409_with_the_status(client: Client, r: redis.Redis, prefix: str,
                                                 make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(max_attempts=1)
    done = (await call(client, "POST", "/submit", 201, json={"input": "ok"}))["id"]
    assert await work_one(worker) == done
    failed = (await call(client, "POST", "/submit", 201, json={"input": "always"}))["id"]
    assert await work_one(worker) == failed
    cancelled = (await call(client, "POST", "/submit", 201, json={"input": "c"}))["id"]
    await call(client, "POST", f"/jobs/{cancelled}/cancel", 200)
    delayed = (await call(client, "POST", "/submit", 201, json={"input": "d", "delay": 60}))["id"]
    running = (await call(client, "POST", "/submit", 201, json={"input": "r"}))["id"]
    slot = worker.slots[0]
    taken = await asyncio.to_thread(worker.take, slot)
    assert taken is not None and taken.id == running
    queued = (await call(client, "POST", "/submit", 201, json={"input": "q"}))["id"]

    conflicts = [("retry", done, "done"), ("retry", delayed, "delayed"),
                 ("retry", running, "running"), ("cancel", done, "done"),
                 ("cancel", failed, "failed"), ("cancel", cancelled, "cancelled")]
    for action, job_id, status in conflicts:
        version = hget(r, prefix, job_id, "version")
        body = await call(client, "POST", f"/jobs/{job_id}/{action}", 409)
        assert body["status"] == status, (action, body)
        assert job_id in body["error"]
        assert (hget(r, prefix, job_id, "status"), hget(r, prefix, job_id, "version")) == (
            status, version)
    body = await call(client, "POST", f"/jobs/{queued}/retry", 409)
    assert body["status"] == "queued"
    assert r.lrange(Keys(prefix).queue, 0, -1) == [queued]
    # A running job asked to stop ends cancelled, whatever its try returns.
    body = await call(client, "POST", f"/jobs/{running}/cancel", 202)
    assert (body["status"], body["cancel_requested"] != "") == ("running", True)
    await asyncio.to_thread(worker.process, slot, taken)
    assert (hget(r, prefix, running, "status"), hget(r, prefix, running, "result")) == (
        "cancelled", "")


async def test_a_bulk_body_over_the_limit_is_413(make_client: MakeClient, r: redis.Redis,
                                                 prefix: str) -> None:
    client = await make_client(max_input_bytes=4096)
    inputs = ["x" * 30] * 200  # about 7 KB
    body = await call(client, "POST", "/submit", 413, json={"inputs": inputs})
    assert "4096" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: 413 once past the limit
        payload = json.dumps({"inputs": inputs}).encode()
        for start in range(0, len(payload), 1000):
            yield payload[start:start + 1000]
    response = await client.post("/submit", data=chunks(),
                                 headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert "error" in await response.json()
    assert keys_of(r, prefix) == []
    fits = await call(client, "POST", "/submit", 201, json={"inputs": ["x" * 30] * 100})
    assert len(fits["jobs"]) == 100


# 2 -- GET /jobs ----------------------------------------------------------------------------------

async def list_all(client: Client, status: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Every page of a state's jobs: the jobs in order, and how many pages it took."""
    jobs: list[dict[str, Any]] = []
    cursor, pages = None, 0
    while True:
        query = {"status": status, "limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        page = await call(client, "GET", "/jobs?" + urlencode(query), 200)
        pages += 1
        assert set(page) == {"jobs", "next_cursor"}
        assert len(page["jobs"]) <= limit
        jobs.extend(page["jobs"])
        if (cursor := page["next_cursor"]) is None:
            return jobs, pages
        assert len(page["jobs"]) == limit  # a page short of the limit is the last
        assert pages < 1000


async def test_jobs_newest_first_with_their_summary(client: Client,
                                                    make_worker: Callable[..., Worker]) -> None:
    ids = [(await call(client, "POST", "/submit", 201, json={"input": f"j{i}"}))["id"]
           for i in range(5)]
    page = await call(client, "GET", "/jobs?status=queued", 200)
    assert [job["id"] for job in page["jobs"]] == ids[::-1]
    assert page["next_cursor"] is None
    assert {frozenset(job) for job in page["jobs"]} == {frozenset(SUMMARY)}
    assert page["jobs"][0] | {"created": "", "updated": ""} == {
        "id": ids[4], "status": "queued", "input": "j4", "result": "", "error": "",
        "attempts": 0, "created": "", "updated": "", "version": 1, "priority": 5, "group": None}
    later = await call(client, "POST", "/submit", 201, json={"input": "l", "delay": 60})
    page = await call(client, "GET", "/jobs?status=delayed", 200)
    assert [(j["id"], j["run_at"]) for j in page["jobs"]] == [(later["id"], later["run_at"])]
    worker = make_worker()
    assert await work_one(worker) == ids[0]
    page = await call(client, "GET", "/jobs?status=done&limit=1", 200)
    assert [(j["id"], j["result"], j["attempts"], j["worker"]) for j in page["jobs"]] == [
        (ids[0], "J0", 1, worker.slots[0].name)]
    assert page["next_cursor"] is None
    # Newest first by when a job entered its state, not when it was created.
    assert await work_one(worker) == ids[1]
    page = await call(client, "GET", "/jobs?status=done", 200)
    assert [job["id"] for job in page["jobs"]] == [ids[1], ids[0]]
    assert (await call(client, "GET", "/jobs?status=running", 200))["jobs"] == []


async def test_paging_walks_every_job_once_across_ties(client: Client, r: redis.Redis,
                                                       prefix: str) -> None:
    first = (await call(client, "POST", "/submit", 201, json={"input": "first"}))["id"]
    bulk = await call(client, "POST", "/submit", 201,
                      json={"inputs": [f"b{i}" for i in range(230)]})
    last = (await call(client, "POST", "/submit", 201, json={"input": "last"}))["id"]
    bulk_ids = {job["id"] for job in bulk["jobs"]}
    index = Keys(prefix).index("queued")
    assert len({r.zscore(index, job_id) for job_id in bulk_ids}) == 1  # one tie of 230
    for limit in (7, 1, 230, 500):
        jobs, pages = await list_all(client, "queued", limit)
        ids = [job["id"] for job in jobs]
        assert len(ids) == len(set(ids)) == 232, limit
        assert ids[0] == last and ids[-1] == first and set(ids[1:-1]) == bulk_ids
        assert pages == -(-232 // limit), limit  # no empty page after a full last one


async def test_input_and_result_are_cut_at_a_character(client: Client,
                                                       make_worker: Callable[..., Worker]) -> None:
    text = "a€" * 100 + "é" * 50 + "😀" * 10  # 1, 3, 2 and 4 byte characters
    job = await call(client, "POST", "/submit", 201, json={"input": text})
    for pad in range(4):  # the 256th byte inside a character of each length
        whole = "x" * pad + text
        padded = await call(client, "POST", "/submit", 201, json={"input": whole})
        listed = await call(client, "GET", "/jobs?status=queued&limit=1", 200)
        cut = listed["jobs"][0]["input"]
        assert listed["jobs"][0]["id"] == padded["id"]
        assert whole.startswith(cut) and 253 <= len(cut.encode()) <= 256, (pad, cut)
        assert len(whole[:len(cut) + 1].encode()) > 256  # as long as fits
    status = await call(client, "GET", f"/status?id={job['id']}", 200)
    assert status["input"] == text  # whole in /status
    worker = make_worker(handler=str.upper)
    assert await work_one(worker) == job["id"]
    listed = await call(client, "GET", "/jobs?status=done", 200)
    result = listed["jobs"][0]["result"]
    assert text.upper().startswith(result) and 253 <= len(result.encode()) <= 256


async def test_expired_jobs_are_skipped(client: Client, r: redis.Redis, prefix: str) -> None:
    ids = [job["id"] for job in (await call(client, "POST", "/submit", 201,
                                            json={"inputs": [str(i) for i in range(10)]}))["jobs"]]
    gone = set(ids[2:5])
    for job_id in gone:
        r.pexpire(Keys(prefix).job(job_id), 1)

    async def expired() -> bool:
        return not any(r.exists(Keys(prefix).job(job_id)) for job_id in gone)
    await eventually(expired, 5, "the jobs to expire")
    page = await call(client, "GET", "/jobs?status=queued&limit=7", 200)
    assert {job["id"] for job in page["jobs"]} == set(ids) - gone
    assert page["next_cursor"] is None  # exactly seven left
    jobs, _ = await list_all(client, "queued", 2)
    assert {job["id"] for job in jobs} == set(ids) - gone


# 3 -- delayed jobs -------------------------------------------------------------------------------

async def test_a_delayed_job_waits_then_runs(client: Client, procs: Procs, r: redis.Redis,
                                             prefix: str) -> None:
    await start_worker(procs, r, prefix)
    before = time.time()
    job = await call(client, "POST", "/submit", 201, json={"input": "later", "delay": 1})
    assert job["status"] == "delayed"
    due = datetime.fromisoformat(job["run_at"]).timestamp()
    assert before + 1 <= due <= time.time() + 1
    assert datetime.fromisoformat(job["run_at"]).utcoffset() == timedelta(0)
    assert r.zscore(Keys(prefix).delayed, job["id"]) == pytest.approx(due, abs=1e-3)
    seen = await call(client, "GET", f"/status?id={job['id']}", 200)
    assert (seen["status"], seen["run_at"]) == ("delayed", job["run_at"])
    await wait_status(r, prefix, job["id"], "done", within=10)
    done = await call(client, "GET", f"/status?id={job['id']}", 200)
    assert (done["result"], done["attempts"], done["run_at"]) == ("LATER", 1, job["run_at"])
    assert time.time() >= due
    assert 0 <= since(done["updated"], job["run_at"]) < 2.5  # due, then within about a second
    assert r.zscore(Keys(prefix).delayed, job["id"]) is None


async def test_a_run_at_in_the_past_runs_at_once(client: Client, procs: Procs, r: redis.Redis,
                                                 prefix: str) -> None:
    await start_worker(procs, r, prefix)
    past = datetime.now(timezone(timedelta(hours=5, minutes=30))) - timedelta(minutes=5)
    submitted = time.monotonic()
    job = await call(client, "POST", "/submit", 201,
                     json={"input": "now", "run_at": past.isoformat()})
    assert job["status"] == "delayed"
    assert datetime.fromisoformat(job["run_at"]) == past
    done = await wait_status(r, prefix, job["id"], "done", within=10)
    assert done - submitted < 2.5
    assert hget(r, prefix, job["id"], "result") == "NOW"


# 4 -- cancel -------------------------------------------------------------------------------------

async def test_cancel_a_queued_job(client: Client, r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    job = await call(client, "POST", "/submit", 201, json={"input": "x"})
    other = await call(client, "POST", "/submit", 201, json={"input": "y"})
    async with client.ws_connect("/ws", params={"id": job["id"]}) as ws:
        assert (await ws.receive_json(timeout=5))["status"] == "queued"
        body = await call(client, "POST", f"/jobs/{job['id']}/cancel", 200)
        assert (body["id"], body["status"], body["version"]) == (job["id"], "cancelled", 2)
        message = await ws.receive_json(timeout=5)
        assert (message["status"], message["version"]) == ("cancelled", 2)
        assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == aiohttp.WSCloseCode.OK
    assert r.lrange(keys.queue, 0, -1) == [other["id"]]
    assert r.zrange(keys.index("cancelled"), 0, -1) == [job["id"]]
    assert r.zrange(keys.index("queued"), 0, -1) == [other["id"]]
    assert 0 < r.ttl(keys.job(job["id"])) <= 86_400
    numbers = await stats(client)
    assert (numbers["totals"]["cancelled"], numbers["jobs"]["cancelled"],
            numbers["jobs"]["queued"], numbers["queue_length"]) == (1, 1, 1, 1)


async def test_cancel_a_delayed_job(client: Client, r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    job = await call(client, "POST", "/submit", 201, json={"input": "x", "delay": 300})
    assert r.zscore(keys.delayed, job["id"]) is not None
    body = await call(client, "POST", f"/jobs/{job['id']}/cancel", 200)
    assert body["status"] == "cancelled"
    assert r.zscore(keys.delayed, job["id"]) is None
    assert r.llen(keys.queue) == 0
    numbers = await stats(client)
    assert (numbers["delayed"], numbers["jobs"]["delayed"], numbers["jobs"]["cancelled"]) == (
        0, 0, 1)


@pytest.mark.parametrize(("handler", "seconds"), [
    ("handlers:slow", "3"),  # time.sleep: the cancel lands when the sleep returns
    ("handlers:nap", "30"),  # Python code: the cancel lands at once
    ("handlers:asleep", "30"),  # async: the task is cancelled
])
async def test_cancel_a_running_job(client: Client, procs: Procs, r: redis.Redis, prefix: str,
                                    handler: str, seconds: str) -> None:
    await start_worker(procs, r, prefix, "--concurrency", "1", "--handler", handler)
    job = await call(client, "POST", "/submit", 201, json={"input": seconds})
    await wait_status(r, prefix, job["id"], "running", within=10)
    async with client.ws_connect("/ws", params={"id": job["id"]}) as ws:
        assert (await ws.receive_json(timeout=5))["status"] == "running"
        asked = time.monotonic()
        first = await call(client, "POST", f"/jobs/{job['id']}/cancel", 202)
        assert first["status"] == "running" and first["cancel_requested"]
        again = await call(client, "POST", f"/jobs/{job['id']}/cancel", 202)
        assert again["cancel_requested"] == first["cancel_requested"]
        message = await ws.receive_json(timeout=10)
        assert message["status"] == "cancelled"
        assert time.monotonic() - asked < 3.0
        assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == aiohttp.WSCloseCode.OK
    version = hget(r, prefix, job["id"], "version")
    # The slot is free again: the next job runs (after the sleep, for time.sleep).
    follow = await call(client, "POST", "/submit", 201, json={"input": "0"})
    await wait_status(r, prefix, follow["id"], "done", within=10)
    if handler != "handlers:slow":
        assert time.monotonic() - asked < 5.0
    ended = await call(client, "GET", f"/status?id={job['id']}", 200)
    assert (ended["status"], ended["result"], str(ended["version"])) == (
        "cancelled", "", version)  # the late result was never recorded
    numbers = await stats(client)
    assert (numbers["totals"]["cancelled"], numbers["totals"]["done"]) == (1, 1)
    assert numbers["jobs"]["running"] == 0
    assert r.smembers(f"{prefix}:stop:" + ended["worker"].rsplit("/", 1)[0]) == set()


async def test_cancel_a_job_whose_worker_died(client: Client, procs: Procs, r: redis.Redis,
                                              prefix: str) -> None:
    """Asked to stop after its worker was killed: whoever reclaims the job ends it cancelled,
    rather than running it again."""
    dead = await start_worker(procs, r, prefix, "--handler", "handlers:slow", "--lease", "3")
    job = await call(client, "POST", "/submit", 201, json={"input": "30"})
    await wait_status(r, prefix, job["id"], "running", within=10)
    stop(dead)  # SIGKILL: its lease runs out within 3 s
    assert (await call(client, "POST", f"/jobs/{job['id']}/cancel", 202))["cancel_requested"]
    await start_worker(procs, r, prefix, "--handler", "handlers:slow", "--lease", "3")
    await wait_status(r, prefix, job["id"], "cancelled", within=10)
    ended = await call(client, "GET", f"/status?id={job['id']}", 200)
    assert (ended["attempts"], ended["result"]) == (1, "")
    assert r.llen(Keys(prefix).queue) == 0
    numbers = await stats(client)
    assert (numbers["totals"]["cancelled"], numbers["totals"]["retried"],
            numbers["jobs"]["running"]) == (1, 0, 0)


# 5 -- retry --------------------------------------------------------------------------------------

async def test_retry_a_failed_job(client: Client, procs: Procs, r: redis.Redis, prefix: str,
                                  tmp_path: Path) -> None:
    keys = Keys(prefix)
    worker = await start_worker(procs, r, prefix, "--max-attempts", "1",
                                "--handler", "handlers:flaky")
    job = await call(client, "POST", "/submit", 201, json={"input": f"once:{tmp_path}/a"})
    await wait_status(r, prefix, job["id"], "failed")
    assert r.lrange(keys.dead, 0, -1) == [job["id"]]
    stop(worker, signal.SIGTERM)  # no worker: the job stays queued while the answer is read
    body = await call(client, "POST", f"/jobs/{job['id']}/retry", 200)
    assert (body["status"], body["attempts"], body["error"], body["result"]) == (
        "queued", 0, "", "")
    assert r.lrange(keys.dead, 0, -1) == []
    assert r.lrange(keys.queue, 0, -1) == [job["id"]]
    assert r.ttl(keys.job(job["id"])) == -1  # kept while it waits again
    await start_worker(procs, r, prefix, "--max-attempts", "1", "--handler", "handlers:flaky")
    await wait_status(r, prefix, job["id"], "done")
    done = await call(client, "GET", f"/status?id={job['id']}", 200)
    assert (done["attempts"], done["result"]) == (1, f"once:{tmp_path}/a".upper())
    numbers = await stats(client)
    assert (numbers["totals"]["retried"], numbers["totals"]["failed"],
            numbers["totals"]["done"], numbers["dead_letter"]) == (1, 1, 1, 0)


async def test_retry_every_failed_job(client: Client, procs: Procs, r: redis.Redis,
                                      prefix: str) -> None:
    keys = Keys(prefix)
    worker = await start_worker(procs, r, prefix, "--max-attempts", "1",
                                "--handler", "handlers:fail")
    ids = [j["id"] for j in (await call(client, "POST", "/submit", 201,
                                        json={"inputs": ["a", "b", "c"]}))["jobs"]]
    for job_id in ids:
        await wait_status(r, prefix, job_id, "failed")
    assert sorted(r.lrange(keys.dead, 0, -1)) == sorted(ids)
    stop(worker, signal.SIGTERM)
    assert await call(client, "POST", "/jobs/retry-failed", 200) == {"retried": 3}
    assert r.llen(keys.dead) == 0
    assert sorted(r.lrange(keys.queue, 0, -1)) == sorted(ids)
    for job_id in ids:
        assert (hget(r, prefix, job_id, "status"), hget(r, prefix, job_id, "attempts")) == (
            "queued", "0")
    assert await call(client, "POST", "/jobs/retry-failed", 200) == {"retried": 0}
    numbers = await stats(client)
    assert (numbers["totals"]["retried"], numbers["jobs"]["queued"],
            numbers["jobs"]["failed"], numbers["dead_letter"]) == (3, 3, 0, 0)


async def test_retry_a_cancelled_job(client: Client, r: redis.Redis, prefix: str,
                                     make_worker: Callable[..., Worker]) -> None:
    keys = Keys(prefix)
    job = await call(client, "POST", "/submit", 201, json={"input": "x", "delay": 300})
    await call(client, "POST", f"/jobs/{job['id']}/cancel", 200)
    body = await call(client, "POST", f"/jobs/{job['id']}/retry", 200)
    assert (body["status"], body["attempts"]) == ("queued", 0)
    assert "run_at" not in body and "cancel_requested" not in body
    assert r.lrange(keys.queue, 0, -1) == [job["id"]]
    assert r.ttl(keys.job(job["id"])) == -1
    assert await work_one(make_worker()) == job["id"]
    assert (hget(r, prefix, job["id"], "status"), hget(r, prefix, job["id"], "result")) == (
        "done", "X")
    assert (await stats(client))["totals"] | {"submitted": 0} == {
        "submitted": 0, "done": 1, "failed": 0, "retried": 1, "cancelled": 1}


# 6 -- /metrics -----------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, name: str | None = None,
           **labels: str) -> float:
    found = [s.value for s in families[family].samples
             if s.name == (name or family) and s.labels == labels]
    assert len(found) == 1, (family, name, labels, families[family].samples)
    return float(found[0])


def assert_metrics_match(families: dict[str, Any], numbers: dict[str, Any]) -> None:
    totals = numbers["totals"]
    assert sample(families, "jobs_submitted", "jobs_submitted_total") == totals["submitted"]
    assert sample(families, "jobs_retried", "jobs_retried_total") == totals["retried"]
    for status in ("done", "failed", "cancelled"):
        assert sample(families, "jobs_finished", "jobs_finished_total",
                      status=status) == totals[status]
    for status in STATES:
        assert sample(families, "jobs", status=status) == numbers["jobs"][status]
    assert sample(families, "jobs_queue_length") == numbers["queue_length"]
    assert sample(families, "jobs_dead_letter") == numbers["dead_letter"]
    assert sample(families, "jobs_workers") == len(numbers["workers"])
    assert sample(families, "jobs_worker_slots") == sum(
        w["concurrency"] for w in numbers["workers"])
    assert sample(families, "redis_maxmemory_bytes") == numbers["redis"]["maxmemory"]


def histogram(families: dict[str, Any]) -> tuple[list[tuple[str, float]], float, float]:
    """The run-time histogram: its (le, cumulative count) buckets, count and sum."""
    family = families["jobs_run_seconds"]
    assert family.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in family.samples
               if s.name == "jobs_run_seconds_bucket"]
    return buckets, sample(families, "jobs_run_seconds", "jobs_run_seconds_count"), sample(
        families, "jobs_run_seconds", "jobs_run_seconds_sum")


async def test_metrics_parse_and_match_stats(client: Client, r: redis.Redis, prefix: str,
                                             make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(max_attempts=2, concurrency=3)
    worker.heartbeat()  # its lease: one worker alive, three slots
    for text in ("ok:1", "ok:2", "always:3"):
        await call(client, "POST", "/submit", 201, json={"input": text})
    for _ in range(3):
        await work_one(worker)
    assert worker.reclaim()[1] == 1  # always:3's retry, due now, queued again
    await work_one(worker)  # and failed for good
    later = await call(client, "POST", "/submit", 201, json={"input": "x", "delay": 300})
    await call(client, "POST", f"/jobs/{later['id']}/cancel", 200)
    await call(client, "POST", "/submit", 201, json={"input": "x", "delay": 300})
    waits = (await call(client, "POST", "/submit", 201, json={"input": "waits"}))["id"]
    numbers = await stats(client)
    assert numbers["jobs"] == {"queued": 1, "delayed": 1, "running": 0, "done": 2, "failed": 1,
                               "cancelled": 1}
    assert numbers["totals"] == {"submitted": 6, "done": 2, "failed": 1, "retried": 1,
                                 "cancelled": 1}
    assert (numbers["queue_length"], numbers["delayed"], numbers["dead_letter"]) == (1, 1, 1)
    assert numbers["oldest_queued_age"] is not None and numbers["oldest_queued_age"] >= 0
    assert [(w["name"], w["concurrency"], w["pid"]) for w in numbers["workers"]] == [
        (worker.name, 3, os.getpid())]
    assert sum(m["done"] for m in numbers["done_per_minute"]) == 2
    assert sum(m["failed"] for m in numbers["done_per_minute"]) == 1
    assert len(numbers["done_per_minute"]) == 60

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    families = parse_metrics(await response.text())
    assert {name: f.type for name, f in families.items()} == {
        "jobs_submitted": "counter", "jobs_finished": "counter", "jobs_retried": "counter",
        "jobs_output_bytes": "counter",
        "jobs": "gauge", "jobs_queue_length": "gauge", "jobs_dead_letter": "gauge",
        "jobs_held_back": "gauge", "jobs_queue_paused": "gauge", "jobs_schedule_runs": "counter",
        "jobs_oldest_queued_age_seconds": "gauge", "jobs_workers": "gauge",
        "jobs_worker_slots": "gauge", "jobs_run_seconds": "histogram",
        "redis_used_memory_bytes": "gauge", "redis_maxmemory_bytes": "gauge",
        "server_watchers": "gauge", "server_requests": "counter"}
    assert_metrics_match(families, numbers)
    assert sample(families, "jobs_oldest_queued_age_seconds") >= numbers["oldest_queued_age"]
    assert sample(families, "redis_used_memory_bytes") > 0
    assert sample(families, "server_watchers") == 0
    assert sample(families, "jobs_output_bytes",
                  "jobs_output_bytes_total") == numbers["output_bytes"] == 0
    assert sample(families, "server_requests", "server_requests_total",
                  route="/submit", code="201") == 6
    assert sample(families, "server_requests", "server_requests_total",
                  route="/stats", code="200") == 1
    buckets, count, total = histogram(families)
    assert [le for le, _ in buckets] == [f"{b:g}" for b in RUNTIME_BUCKETS] + ["+Inf"]
    assert [float(le) for le, _ in buckets] == sorted(float(le) for le, _ in buckets)
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == count == 4  # four tries: two done, two of always:3
    assert 0 < total < 5

    # A job running, and one watcher of it: what each worker runs, and this server's watchers.
    taken = await asyncio.to_thread(worker.take, worker.slots[0])
    assert taken is not None and taken.id == waits
    async with client.ws_connect(f"/ws?id={waits}") as ws:
        assert (await ws.receive_json())["status"] == "running"
        families = parse_metrics(await (await client.get("/metrics")).text())
        assert sample(families, "server_watchers") == 1
    [seen] = (await stats(client))["workers"]
    assert (seen["name"], seen["host"], seen["running"]) == (worker.name, socket.gethostname(),
                                                             [waits])
    started, beat = (datetime.fromisoformat(seen[k]) for k in ("started", "last_heartbeat"))
    assert started <= beat <= datetime.now(UTC)


# 7 -- exact counters under load ------------------------------------------------------------------

async def test_counters_are_exact_after_a_thousand_jobs(client: Client, procs: Procs,
                                                        r: redis.Redis, prefix: str,
                                                        tmp_path: Path) -> None:
    keys = Keys(prefix)

    def text(i: int) -> str:
        if i % 10 == 0:
            return f"always:{i}"
        return f"once:{tmp_path}/{i}" if i % 10 == 1 else f"ok:{i}"

    bulk = await call(client, "POST", "/submit", 201,
                      json={"inputs": [text(i) for i in range(1000)]})
    ids = [job["id"] for job in bulk["jobs"]]
    soon = [j["id"] for j in (await call(client, "POST", "/submit", 201, json={
        "inputs": [f"soon:{i}" for i in range(10)], "delay": 1}))["jobs"]]
    later = [j["id"] for j in (await call(client, "POST", "/submit", 201, json={
        "inputs": [f"later:{i}" for i in range(20)], "delay": 3600}))["jobs"]]
    cancel_queued = [ids[i] for i in range(1000) if i % 20 == 2]  # 50 "ok" jobs
    for job_id in cancel_queued + later[:10]:
        assert (await call(client, "POST", f"/jobs/{job_id}/cancel", 200))["status"] == \
            "cancelled"
    assert r.llen(keys.queue) == 950
    always = {ids[i] for i in range(0, 1000, 10)}
    started = time.monotonic()
    for _ in range(2):
        await start_worker(procs, r, prefix, "--concurrency", "8", "--max-attempts", "2",
                           "--handler", "handlers:flaky")

    async def settled(done: int, failed: int, cancelled: int) -> bool:
        jobs = (await stats(client))["jobs"]
        return (jobs["done"], jobs["failed"], jobs["cancelled"], jobs["queued"],
                jobs["running"]) == (done, failed, cancelled, 0, 0)

    await eventually(lambda: settled(860, 100, 60), 40, "the first 1,030 jobs to end")
    failed_list, _ = await list_all(client, "failed", 50)
    assert {job["id"] for job in failed_list} == always
    assert {job["attempts"] for job in failed_list} == {2}
    # Manual retries: five failed ones one by one, then the whole dead-letter list; five
    # cancelled ones.
    for job_id in sorted(always)[:5]:
        assert (await call(client, "POST", f"/jobs/{job_id}/retry", 200))["id"] == job_id

    async def failed_total(n: int) -> bool:
        return bool((await stats(client))["totals"]["failed"] == n)
    await eventually(lambda: failed_total(105), 20, "the five retried to fail again")
    await eventually(lambda: settled(860, 100, 60), 20, "the five to settle")
    assert await call(client, "POST", "/jobs/retry-failed", 200) == {"retried": 100}
    for job_id in cancel_queued[:5]:
        await call(client, "POST", f"/jobs/{job_id}/retry", 200)
    await eventually(lambda: failed_total(205), 30, "the hundred to fail again")
    await eventually(lambda: settled(865, 100, 55), 20, "every job to end")
    numbers = await stats(client)
    assert numbers["jobs"] == {"queued": 0, "delayed": 10, "running": 0, "done": 865,
                               "failed": 100, "cancelled": 55}
    # retried: 100 once-jobs and 100 always-jobs on their first try; 5 by hand and 5 again on
    # their first try; 100 by retry-failed and 100 again; 5 cancelled ones by hand.
    assert numbers["totals"] == {"submitted": 1030, "done": 865, "failed": 205,
                                 "retried": 415, "cancelled": 60}
    assert (numbers["queue_length"], numbers["delayed"], numbers["dead_letter"]) == (0, 10, 100)
    assert set(r.zrange(keys.delayed, 0, -1)) == set(later[10:])
    assert sorted(r.lrange(keys.dead, 0, -1)) == sorted(always)
    assert numbers["oldest_queued_age"] is None
    for job_id in soon + cancel_queued[:5]:
        assert hget(r, prefix, job_id, "status") == "done"
    assert sum(m["done"] for m in numbers["done_per_minute"]) == 865
    assert sum(m["failed"] for m in numbers["done_per_minute"]) == 205
    assert [len(w["running"]) for w in numbers["workers"]] == [0, 0]
    families = parse_metrics(await (await client.get("/metrics")).text())
    assert_metrics_match(families, numbers)
    buckets, count, _ = histogram(families)
    assert buckets[-1][1] == count == 865 + 205 + 305  # a try per done, failure and retry
    assert time.monotonic() - started < 60


# 8 -- fuzzing the new endpoints ------------------------------------------------------------------

Fuzz = tuple[Procs, Any, str, redis.Redis, str, list[str]]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory,
                single_redis_url: str) -> Iterator[Fuzz]:
    """One server process for every example drawn (no worker: jobs stay where they are), and
    three jobs of its own for the ids to hit."""
    prefix = f"{{fuzz-manage-{os.getpid()}}}"
    procs = Procs(single_redis_url, prefix, tmp_path_factory.mktemp("fuzz-manage"))
    port = free_port()
    server = procs.start(sys.executable, "server.py", "--port", str(port), log="server.log")
    client = redis.Redis.from_url(single_redis_url, decode_responses=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            status, body = plain(base, "POST", "/submit", json.dumps(
                {"inputs": ["f1", "f2", "f3"]}).encode())
            break
        except ConnectionRefusedError:
            assert server.poll() is None and time.monotonic() < deadline, procs.log(server)
            time.sleep(0.05)
    assert status == 201
    ids = [job["id"] for job in body["jobs"]]
    try:
        yield procs, server, base, client, prefix, ids
    finally:
        procs.stop_all()
        delete_prefix(client, prefix)
        client.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
times = (st.datetimes(timezones=st.none() | offsets)  # near the ends of the calendar too
         | st.datetimes(max_value=datetime(1, 1, 3), timezones=offsets)
         | st.datetimes(min_value=datetime(9999, 12, 29), timezones=offsets)
         ).map(datetime.isoformat)
cursors = st.from_regex(r"[0-9][0-9.e+]{0,20}-[0-9a-f]{32}", fullmatch=True)


@fuzz
@given(query=st.fixed_dictionaries(
    {"status": st.sampled_from(STATES) | st.text(max_size=10)},
    optional={"limit": st.integers(-3, 600).map(str) | st.text(max_size=6),
              "cursor": cursors | st.text(max_size=40),
              "x": st.text(max_size=10)}))
def test_fuzz_jobs_queries(fuzz_server: Fuzz, query: dict[str, str]) -> None:
    status, body = plain(fuzz_server[2], "GET", "/jobs?" + urlencode(query))
    assert status in (200, 400), (query, body)
    if status == 200:
        assert set(body) == {"jobs", "next_cursor"}


schedules = {"delay": st.floats() | st.integers(-10, MAX_DELAY + 10) | json_values,
             "run_at": times | st.text(max_size=30) | json_values}


@fuzz
@example(data={"input": "x", "run_at": "0001-01-01T00:00:00+01:00"})  # year 0 in UTC
@given(data=st.fixed_dictionaries({"input": st.text(max_size=10)}, optional=schedules)
       | st.fixed_dictionaries({"inputs": st.lists(st.text(max_size=5), max_size=3)},
                               optional=schedules)
       | st.fixed_dictionaries({}, optional={"input": json_values, "inputs": json_values,
                                            **schedules}))
def test_fuzz_submit_schedules(fuzz_server: Fuzz, data: dict[str, Any]) -> None:
    status, body = plain(fuzz_server[2], "POST", "/submit", json.dumps(data).encode())
    assert status in (201, 400), (data, body)


@fuzz
@given(job_id=st.text(max_size=40) | st.just("f"),
       action=st.sampled_from(["retry", "cancel"]), pick=st.integers(0, 2))
def test_fuzz_retry_and_cancel(fuzz_server: Fuzz, job_id: str, action: str, pick: int) -> None:
    if job_id == "f":
        job_id = fuzz_server[5][pick]
    status, _ = plain(fuzz_server[2], "POST", f"/jobs/{quote(job_id, safe='')}/{action}")
    assert status in (200, 404, 409), (job_id, action, status)


@fuzz
@given(action=st.sampled_from([("GET", "/stats"), ("GET", "/metrics"),
                               ("POST", "/jobs/retry-failed")]),
       query=st.dictionaries(st.sampled_from(["queue", "status", "id", "x"]) | st.text(max_size=5),
                             st.sampled_from(["default", "emails"]) | st.text(max_size=70),
                             max_size=2))
def test_fuzz_stats_metrics_and_retry_failed(fuzz_server: Fuzz, action: tuple[str, str],
                                             query: dict[str, str]) -> None:
    method, path = action
    status, body = plain(fuzz_server[2], method, f"{path}?{urlencode(query)}")
    assert status in (200, 400), (action, query, body)
    if status == 200 and path == "/jobs/retry-failed":
        assert body == {"retried": 0}  # nothing failed here
    elif status == 200 and path == "/metrics":
        assert "jobs_submitted_total" in body and parse_metrics(body)


@pytest.fixture(scope="module")
def fuzz_token_server(tmp_path_factory: pytest.TempPathFactory,
                      single_redis_url: str) -> Iterator[str]:
    """A server process with TOKEN set, for the access fuzzing: its address."""
    prefix = f"{{fuzz-access-{os.getpid()}}}"
    procs = Procs(single_redis_url, prefix, tmp_path_factory.mktemp("fuzz-access"))
    client = redis.Redis.from_url(single_redis_url, decode_responses=True)
    try:
        procs.server(port := free_port(), "--token", TOKEN)
        yield f"http://127.0.0.1:{port}"
        assert not [path for path in procs.logs.values() if TOKEN in path.read_text()]
    finally:
        procs.stop_all()
        delete_prefix(client, prefix)
        client.close()


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    blacklist_characters="\x7f"), max_size=40)
tokens = st.sampled_from([TOKEN, TOKEN + "x", TOKEN[:-1], TOKEN.upper(), ""]) | header_text


@fuzz
@given(action=st.sampled_from([("GET", "/stats"), ("GET", "/metrics"), ("GET", "/auth"),
                               ("GET", "/jobs?status=failed"), ("POST", "/jobs/retry-failed"),
                               ("GET", "/healthz"), ("POST", "/login")]),
       authorization=st.none() | header_text | st.builds(
           "{} {}".format, st.sampled_from(["Bearer", "bearer", "BEARER", "Basic"]), tokens),
       cookie=st.none() | st.builds("jobs_token={}".format, tokens) | header_text,
       login=st.fixed_dictionaries({"token": tokens}) | json_values)
def test_fuzz_access(fuzz_token_server: str, action: tuple[str, str], authorization: str | None,
                     cookie: str | None, login: Any) -> None:
    """Whatever the credentials, the answer is the token's: a request is let through exactly
    when its Bearer header (else its cookie) holds the token; /healthz and /login are open."""
    method, path = action
    headers = {name: value for name, value in (("Authorization", authorization),
                                               ("Cookie", cookie)) if value is not None}
    status, _ = plain(fuzz_token_server, method, path,
                      json.dumps(login).encode() if path == "/login" else None, headers)
    if path == "/healthz":
        assert status == 200
        return
    if path == "/login":
        token = login.get("token") if isinstance(login, dict) else None
        assert status == (400 if not isinstance(token, str) else 204 if token == TOKEN else 401)
        return
    scheme, _, given = (authorization or "").strip(" \t").partition(" ")
    if scheme.lower() == "bearer":
        assert (status != 401) == (given == TOKEN), (authorization, status)
    elif cookie is None or cookie == f"jobs_token={TOKEN}":
        assert (status != 401) == (cookie is not None), (authorization, cookie, status)
    else:  # a cookie header of any text: never let through without the token in it
        assert status == 401 or TOKEN in cookie, (cookie, status)
    assert status in (200, 401), (action, status)


def test_fuzzing_left_no_trace(fuzz_server: Fuzz) -> None:
    """Runs after the fuzz tests (file order): no traceback, and only what accepted submits,
    cancels and retries write, each job whole and in exactly the place its state says."""
    procs, server, base, r, prefix, _ = fuzz_server
    keys = Keys(prefix)
    jobs = {key.rsplit(":", 1)[1]: r.hgetall(key) for key in r.scan_iter(match=keys.job("*"))}
    priorities = [int(str(p)) for p in r.zrange(keys.priorities, 0, -1)]
    lines = {keys.ready(p, str(g)): (p, g) for p in priorities
             for g in r.lrange(keys.groups(p), 0, -1)}
    allowed = {keys.delayed, keys.counters, keys.priorities, keys.wake, *lines,
               *(keys.groups(p) for _, (p, _) in lines.items()),
               *(keys.index(s) for s in STATES), *(keys.job(job_id) for job_id in jobs),
               *(keys.history(job_id) for job_id in jobs)}
    assert set(r.scan_iter(match=f"{prefix}:*")) <= allowed
    queue = [job_id for line in lines for job_id in r.lrange(line, 0, -1)]
    delayed = r.zrange(keys.delayed, 0, -1)
    assert len(queue) == len(set(queue))
    for job_id, job in jobs.items():
        assert set(job) >= {"id", "input", "status", "result", "error", "attempts", "created",
                            "updated", "version"}, job
        assert job["status"] in ("queued", "delayed", "cancelled"), job
        assert (job_id in queue, job_id in delayed) == (job["status"] == "queued",
                                                        job["status"] == "delayed"), job
        assert r.zscore(keys.index(job["status"]), job_id) is not None
        if job["status"] == "delayed":
            assert "run_at" in job and r.zscore(keys.delayed, job_id) is not None, job
    for state in STATES:
        assert r.zcard(keys.index(state)) == sum(j["status"] == state for j in jobs.values())
    counters = r.hgetall(keys.counters)
    assert int(counters["submitted"]) == len(jobs)
    # Only cancelled jobs can be retried here (no worker): each retry undoes one cancel.
    assert int(counters.get("cancelled", 0)) - int(counters.get("retried", 0)) == sum(
        j["status"] == "cancelled" for j in jobs.values())
    status, numbers = plain(base, "GET", "/stats")
    assert status == 200 and numbers["totals"]["submitted"] == len(jobs)
    log = procs.log(server)
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


# 9 -- /feed --------------------------------------------------------------------------------------

async def test_feed_batches_every_change(client: Client, r: redis.Redis, prefix: str,
                                         make_worker: Callable[..., Worker]) -> None:
    response = await client.get("/feed")
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    assert await asyncio.wait_for(response.content.readline(), 5) == b": connected\n"
    events: list[list[dict[str, Any]]] = []
    final: dict[str, str] = {}

    async def read_until(done: Callable[[], bool]) -> None:
        while not done():
            line = await response.content.readline()
            assert line, "the feed ended"
            if line.startswith(b"data: "):
                batch = json.loads(line[6:])
                assert isinstance(batch, list) and batch
                events.append(batch)
                for message in batch:
                    if message["status"] in ("done", "failed", "cancelled"):
                        final[message["id"]] = message["status"]
            else:
                assert line in (b"\n", b": keepalive\n"), line

    bulk = await call(client, "POST", "/submit", 201,
                      json={"inputs": ["ok:1", "ok:2", "ok:3", "ok:4", "always:5"]})
    ids = [job["id"] for job in bulk["jobs"]]

    def queued_seen() -> set[str]:
        return {m["id"] for batch in events for m in batch if m["status"] == "queued"}
    await asyncio.wait_for(read_until(lambda: queued_seen() >= set(ids)), 10)
    # A bulk submit is one script: its five messages arrive together, in one batch (two if a
    # batch's 250 ms ran out in between), not five.
    assert 1 <= len(events) <= 2 and sum(map(len, events)) == 5
    later = (await call(client, "POST", "/submit", 201, json={"input": "x", "delay": 300}))["id"]
    worker = make_worker(max_attempts=1)
    for _ in ids:
        await work_one(worker)
    await call(client, "POST", f"/jobs/{later}/cancel", 200)
    await asyncio.wait_for(read_until(lambda: len(final) == 6), 10)
    response.close()
    assert final == {**{job_id: "done" for job_id in ids[:4]}, ids[4]: "failed",
                     later: "cancelled"}
    seen: dict[str, int] = {}
    for batch in events:
        assert len({m["id"] for m in batch}) == len(batch)  # the newest state of each job
        for message in batch:
            assert set(message) == {*MESSAGE_FIELDS, "queue", "type", "seq"}, message  # its queue
            assert message["version"] > seen.get(message["id"], 0)  # never an older state
            seen[message["id"]] = message["version"]
    assert seen[later] == 2 and seen[ids[0]] == 3  # submitted, cancelled; queued, running, done
