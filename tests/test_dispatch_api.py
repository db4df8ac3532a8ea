"""Issue 15's API (priorities, groups, a queue's limits, pausing), as the server, the client and
its library show it, against a real Redis. No worker runs here: what a worker starts, and when
a limit holds it back, is test_worker's; this is what a caller sends and is shown.

    python3 -m pytest tests/test_dispatch_api.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient
from playwright.sync_api import Page, expect
from prometheus_client.parser import text_string_to_metric_families

import client as library
from store import Keys
from tests.conftest import ROOT, Console, Procs, call, free_port

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

TOKEN = "dispatch-test-token"
NO_LIMITS = {"rate_limit": None, "concurrency": None, "group_rate_limit": None,
             "group_concurrency": None}
QUEUE_FIELDS = {"name", "length", "running", "paused", "held_back", "settings"}


def keys_of(r: redis.Redis, prefix: str) -> list[str]:
    return sorted(r.scan_iter(match=f"{prefix}:*", count=1000))


def settings_hash(r: redis.Redis, prefix: str, queue: str = "default") -> dict[str, str]:
    return r.hgetall(Keys(prefix, queue).settings)  # type: ignore[return-value]


# -- priority and group of a job -------------------------------------------------------------------

@pytest.mark.cluster
async def test_priority_and_group_are_stored_and_shown_everywhere(
        client: Client, r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    job = await call(client, "POST", "/submit", 201,
                     json={"input": "x", "priority": 8, "group": "Cust-1:eu.west_2"})
    assert (job["priority"], job["group"]) == (8, "Cust-1:eu.west_2")
    plain = await call(client, "POST", "/submit", 201, json={"input": "y"})
    assert (plain["priority"], plain["group"]) == (5, None)
    stored = r.hgetall(keys.job(job["id"]))
    assert (stored["priority"], stored["group"]) == ("8", "Cust-1:eu.west_2")
    assert r.hget(keys.job(plain["id"]), "priority") == "5"
    assert not r.hexists(keys.job(plain["id"]), "group")  # only when given
    for shown, want in ((job, (8, "Cust-1:eu.west_2")), (plain, (5, None))):
        status = await call(client, "GET", f"/status?id={shown['id']}", 200)
        assert (status["priority"], status["group"]) == want
    page = await call(client, "GET", "/jobs?status=queued", 200)
    assert {j["id"]: (j["priority"], j["group"]) for j in page["jobs"]} == {
        job["id"]: (8, "Cust-1:eu.west_2"), plain["id"]: (5, None)}
    # A bulk submit: one priority and one group for all its jobs.
    bulk = await call(client, "POST", "/submit", 201,
                      json={"inputs": ["a", "b", "c"], "priority": 2, "group": "batch",
                            "delay": 60})
    assert {(j["priority"], j["group"], j["status"]) for j in bulk["jobs"]} == {
        (2, "batch", "delayed")}
    page = await call(client, "GET", "/jobs?status=delayed", 200)
    assert {(j["priority"], j["group"]) for j in page["jobs"]} == {(2, "batch")}
    assert len(page["jobs"]) == 3


async def test_the_edges_are_accepted(client: Client) -> None:
    for priority in (1, 9):
        job = await call(client, "POST", "/submit", 201, json={"input": "x", "priority": priority})
        assert job["priority"] == priority
    job = await call(client, "POST", "/submit", 201, json={"input": "x", "group": "g" * 128})
    assert job["group"] == "g" * 128
    # null is as if not given, like "delay": null.
    job = await call(client, "POST", "/submit", 201,
                     json={"input": "x", "priority": None, "group": None})
    assert (job["priority"], job["group"]) == (5, None)


async def test_a_job_stored_before_priorities_shows_priority_5(client: Client, r: redis.Redis,
                                                               prefix: str) -> None:
    job_id, keys = "a" * 32, Keys(prefix)
    r.hset(keys.job(job_id), mapping={"id": job_id, "input": "old", "status": "queued",
                                      "attempts": 0, "version": 1, "updated": "x"})
    r.zadd(keys.index("queued"), {job_id: 1})
    status = await call(client, "GET", f"/status?id={job_id}", 200)
    assert (status["priority"], status["group"]) == (5, None)
    [listed] = (await call(client, "GET", "/jobs?status=queued", 200))["jobs"]
    assert (listed["priority"], listed["group"]) == (5, None)


BAD_JOBS = [
    ({"priority": 0}, '"priority" must be a whole number from 1 to 9'),
    ({"priority": 10}, '"priority" must be'),
    ({"priority": -5}, '"priority" must be'),
    ({"priority": 5.0}, '"priority" must be'),
    ({"priority": 5.5}, '"priority" must be'),
    ({"priority": "5"}, '"priority" must be'),
    ({"priority": True}, '"priority" must be'),
    ({"priority": [5]}, '"priority" must be'),
    ({"priority": 2**70}, '"priority" must be'),
    ({"group": ""}, '"group" must be 1 to 128 characters'),
    ({"group": "g" * 129}, '"group" must be'),
    ({"group": "a b"}, '"group" must be'),
    ({"group": "a/b"}, '"group" must be'),
    ({"group": "é"}, '"group" must be'),
    ({"group": "a\n"}, '"group" must be'),
    ({"group": 7}, '"group" must be'),
    ({"group": ["a"]}, '"group" must be'),
    ({"inputs": ["a", "b"], "priority": 0}, '"priority" must be'),
    ({"inputs": ["a", "b"], "group": "x y"}, '"group" must be'),
]


@pytest.mark.parametrize(("fields", "words"), BAD_JOBS)
async def test_a_bad_priority_or_group_is_400_and_stores_nothing(
        client: Client, r: redis.Redis, prefix: str, fields: dict[str, Any], words: str) -> None:
    body = ({"input": "x"} if "inputs" not in fields else {}) | fields
    error = await call(client, "POST", "/submit", 400, json=body)
    assert words in error["error"]
    assert keys_of(r, prefix) == []  # nothing stored, nothing counted, no queue registered


# -- a queue's settings: PUT /queues/NAME, GET /queues ---------------------------------------------

@pytest.mark.cluster
async def test_put_changes_what_it_names_and_keeps_the_rest(client: Client, r: redis.Redis,
                                                            prefix: str) -> None:
    queue = await call(client, "PUT", "/queues/default", 200,
                       json={"rate_limit": {"jobs": 10, "per": 1.5}, "concurrency": 4})
    assert set(queue) == QUEUE_FIELDS
    assert queue["name"] == "default" and queue["paused"] is False
    assert queue["settings"] == NO_LIMITS | {"rate_limit": {"jobs": 10, "per": 1.5},
                                             "concurrency": 4}
    queue = await call(client, "PUT", "/queues/default", 200,
                       json={"group_rate_limit": {"jobs": 1, "per": 60},
                             "group_concurrency": 2})
    assert queue["settings"] == {"rate_limit": {"jobs": 10, "per": 1.5}, "concurrency": 4,
                                 "group_rate_limit": {"jobs": 1, "per": 60},
                                 "group_concurrency": 2}
    queue = await call(client, "PUT", "/queues/default", 200,
                       json={"rate_limit": None, "group_concurrency": None})
    assert queue["settings"] == NO_LIMITS | {"concurrency": 4,
                                             "group_rate_limit": {"jobs": 1, "per": 60}}
    assert await call(client, "GET", "/queues/default", 200) == queue
    unchanged = await call(client, "PUT", "/queues/default", 200, json={})
    assert unchanged == queue
    assert settings_hash(r, prefix) == {"concurrency": "4", "group_rate_jobs": "1",
                                        "group_rate_per": "60"}
    queue = await call(client, "PUT", "/queues/default", 200,
                       json={"concurrency": None, "group_rate_limit": None})
    assert queue["settings"] == NO_LIMITS
    assert settings_hash(r, prefix) == {}


BAD_SETTINGS = [
    ({"concurrency": 0}, '"concurrency" must be a whole number'),
    ({"concurrency": -1}, '"concurrency" must be'),
    ({"concurrency": 1.5}, '"concurrency" must be'),
    ({"concurrency": 2.0}, '"concurrency" must be'),
    ({"concurrency": "3"}, '"concurrency" must be'),
    ({"concurrency": True}, '"concurrency" must be'),
    ({"concurrency": 1_000_001}, '"concurrency" must be'),
    ({"group_concurrency": 0}, '"group_concurrency" must be'),
    ({"rate_limit": {"jobs": 0, "per": 1}}, '"rate_limit" must be {"jobs": J, "per": S}'),
    ({"rate_limit": {"jobs": 1}}, '"rate_limit" must be'),
    ({"rate_limit": {"jobs": 1, "per": 0}}, '"rate_limit" must be'),
    ({"rate_limit": {"jobs": 1, "per": 86_401}}, '"rate_limit" must be'),
    ({"rate_limit": {"jobs": 1.5, "per": 1}}, '"rate_limit" must be'),
    ({"rate_limit": {"jobs": 1, "per": "1"}}, '"rate_limit" must be'),
    ({"rate_limit": {"jobs": 1, "per": 1, "burst": 2}}, '"rate_limit" must be'),
    ({"rate_limit": [10, 1]}, '"rate_limit" must be'),
    ({"rate_limit": 10}, '"rate_limit" must be'),
    ({"group_rate_limit": {"jobs": True, "per": 1}}, '"group_rate_limit" must be'),
    ({"paused": True}, 'unknown setting "paused"'),
    ({"priority": 5}, 'unknown setting "priority"'),
    # a good setting beside a bad one: neither is applied
    ({"concurrency": 3, "rate_limit": {"jobs": 0, "per": 1}}, '"rate_limit" must be'),
    ({"rate_limit": {"jobs": 5, "per": 1}, "group_concurrency": -2}, '"group_concurrency"'),
]


@pytest.mark.parametrize(("body", "words"), BAD_SETTINGS)
async def test_a_bad_setting_is_400_and_changes_nothing(
        client: Client, r: redis.Redis, prefix: str, body: dict[str, Any], words: str) -> None:
    before = await call(client, "PUT", "/queues/default", 200,
                        json={"concurrency": 7, "group_rate_limit": {"jobs": 2, "per": 30}})
    stored = settings_hash(r, prefix)
    error = await call(client, "PUT", "/queues/default", 400, json=body)
    assert words in error["error"]
    assert settings_hash(r, prefix) == stored
    assert await call(client, "GET", "/queues/default", 200) == before
    # a queue never used is not registered by a refused PUT either
    await call(client, "PUT", "/queues/fresh", 400, json=body)
    await call(client, "GET", "/queues/fresh", 404)


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'"x"', b"null", b"[" * 50_000])
async def test_a_put_body_that_is_no_json_object_is_400(client: Client, r: redis.Redis,
                                                        prefix: str, body: bytes) -> None:
    error = await call(client, "PUT", "/queues/default", 400, data=body,
                       headers={"Content-Type": "application/json"})
    assert "JSON" in error["error"]
    assert keys_of(r, prefix) == []


async def test_get_queues_lists_every_queue_by_name(client: Client) -> None:
    listed = await call(client, "GET", "/queues", 200)
    assert listed == {"queues": [{"name": "default", "length": 0, "running": 0, "paused": False,
                                  "held_back": 0, "settings": NO_LIMITS}]}
    await call(client, "POST", "/submit", 201, json={"input": "a", "queue": "emails"})
    await call(client, "POST", "/submit", 201, json={"inputs": ["a", "b"]})
    # Limits may come before a queue's first job: the PUT makes the queue known.
    await call(client, "PUT", "/queues/reports", 200, json={"concurrency": 1})
    queues = (await call(client, "GET", "/queues", 200))["queues"]
    assert [(q["name"], q["length"], q["settings"]["concurrency"]) for q in queues] == [
        ("default", 2, None), ("emails", 1, None), ("reports", 0, 1)]
    assert all(set(q) == QUEUE_FIELDS for q in queues)
    for queue in queues:
        assert await call(client, "GET", f"/queues/{queue['name']}", 200) == queue


async def test_an_unknown_or_bad_queue_name(client: Client, r: redis.Redis,
                                            prefix: str) -> None:
    error = await call(client, "GET", "/queues/never-used", 404)
    assert "never-used" in error["error"]
    for name in ("Emails", "a%20b", "x" * 65, "%C3%A9"):
        await call(client, "GET", f"/queues/{name}", 400)
        await call(client, "PUT", f"/queues/{name}", 400, json={"concurrency": 1})
        await call(client, "POST", f"/queues/{name}/pause", 400)
    assert keys_of(r, prefix) == []
    await call(client, "DELETE", "/queues/default", 405)
    await call(client, "POST", "/queues", 405)


# -- pause and resume ------------------------------------------------------------------------------

@pytest.mark.cluster
async def test_a_paused_queue_takes_submits_and_says_so(client: Client, r: redis.Redis,
                                                        prefix: str) -> None:
    await call(client, "POST", "/submit", 201, json={"inputs": ["a", "b"], "queue": "emails"})
    paused = await call(client, "POST", "/queues/emails/pause", 200)
    assert set(paused) == QUEUE_FIELDS
    assert (paused["name"], paused["paused"], paused["length"], paused["held_back"]) == (
        "emails", True, 2, 2)
    assert await call(client, "POST", "/queues/emails/pause", 200) == paused  # idempotent
    job = await call(client, "POST", "/submit", 201, json={"input": "c", "queue": "emails"})
    assert job["status"] == "queued"
    queue = await call(client, "GET", "/queues/emails", 200)
    assert (queue["paused"], queue["length"], queue["held_back"]) == (True, 3, 3)
    one = await call(client, "GET", "/stats?queue=emails", 200)
    assert (one["paused"], one["held_back"]) == (True, 3)
    every = await call(client, "GET", "/stats", 200)
    assert (every["queues"]["emails"]["paused"], every["queues"]["default"]["paused"]) == (
        True, False)
    assert every["held_back"] == 3
    assert (await call(client, "GET", "/stats?queue=default", 200))["paused"] is False
    # A pause keeps the limits, and a PUT keeps the pause.
    queue = await call(client, "PUT", "/queues/emails", 200, json={"concurrency": 2})
    assert (queue["paused"], queue["settings"]["concurrency"]) == (True, 2)
    resumed = await call(client, "POST", "/queues/emails/resume", 200)
    assert (resumed["paused"], resumed["held_back"], resumed["settings"]["concurrency"]) == (
        False, 0, 2)
    assert (await call(client, "GET", "/stats?queue=emails", 200))["paused"] is False
    assert settings_hash(r, prefix, "emails") == {"concurrency": "2"}


async def test_a_queue_can_be_paused_before_its_first_job(client: Client) -> None:
    paused = await call(client, "POST", "/queues/later/pause", 200)
    assert (paused["name"], paused["paused"], paused["length"]) == ("later", True, 0)
    assert [q["name"] for q in (await call(client, "GET", "/queues", 200))["queues"]] == [
        "default", "later"]
    assert (await call(client, "POST", "/queues/later/resume", 200))["paused"] is False


async def test_metrics_count_the_held_back_and_the_paused(client: Client) -> None:
    await call(client, "POST", "/submit", 201, json={"inputs": ["a", "b"]})
    await call(client, "POST", "/submit", 201, json={"input": "c", "queue": "emails"})
    await call(client, "POST", "/queues/emails/pause", 200)

    async def families(query: str = "") -> dict[str, Any]:
        response = await client.get(f"/metrics{query}")
        assert response.status == 200
        return {f.name: f for f in text_string_to_metric_families(await response.text())}

    def samples(family: Any) -> dict[str, float]:
        return {s.labels.get("queue", ""): s.value for s in family.samples}

    every = await families()
    assert every["jobs_held_back"].type == every["jobs_queue_paused"].type == "gauge"
    assert samples(every["jobs_held_back"]) == {"": 1}
    assert samples(every["jobs_queue_paused"]) == {"default": 0, "emails": 1}
    one = await families("?queue=emails")
    assert samples(one["jobs_held_back"]) == {"": 1}
    assert samples(one["jobs_queue_paused"]) == {"emails": 1}
    await call(client, "POST", "/queues/default/pause", 200)
    every = await families()
    assert samples(every["jobs_held_back"]) == {"": 3}
    assert samples(every["jobs_queue_paused"]) == {"default": 1, "emails": 1}


# -- access: the new routes are guarded like the others ----------------------------------------

async def test_a_foreign_origin_cannot_change_a_queue(make_client: MakeClient, r: redis.Redis,
                                                      prefix: str) -> None:
    client = await make_client(allowed_origins=frozenset({"https://ok.example"}))
    evil = {"Origin": "https://evil.example"}
    await call(client, "PUT", "/queues/default", 403, json={"concurrency": 1}, headers=evil)
    for action in ("pause", "resume"):
        await call(client, "POST", f"/queues/default/{action}", 403, headers=evil)
    assert keys_of(r, prefix) == []
    await call(client, "PUT", "/queues/default", 200, json={"concurrency": 1},
               headers={"Origin": "https://ok.example"})
    await call(client, "POST", "/queues/default/pause", 200,
               headers={"Origin": f"http://{client.host}:{client.port}"})


async def test_with_a_token_the_queue_routes_need_it(make_client: MakeClient, r: redis.Redis,
                                                     prefix: str) -> None:
    client = await make_client(token=TOKEN)
    for method, path in (("GET", "/queues"), ("GET", "/queues/default"),
                         ("PUT", "/queues/default"), ("POST", "/queues/default/pause"),
                         ("POST", "/queues/default/resume")):
        await call(client, method, path, 401, json={"concurrency": 1})
    assert keys_of(r, prefix) == []
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    queue = await call(client, "PUT", "/queues/default", 200, json={"concurrency": 1},
                       headers=bearer)
    assert queue["settings"]["concurrency"] == 1


# -- the client: command line and library ----------------------------------------------------------

def run_client(procs: Procs, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in procs.env().items() if name != "JOBS_TOKEN"}
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def server(procs: Procs, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("JOBS_TOKEN", raising=False)  # the library reads it
    port = free_port()
    procs.server(port)
    yield f"http://127.0.0.1:{port}"


def test_the_command_line_submits_with_a_priority_and_a_group(procs: Procs, server: str) -> None:
    submitted = run_client(procs, "--server", server, "--no-wait", "--priority", "9",
                           "--group", "acme:eu", "urgent")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    with urllib.request.urlopen(f"{server}/status?id={job_id}", timeout=10) as response:
        job = json.loads(response.read())
    assert (job["input"], job["priority"], job["group"]) == ("urgent", 9, "acme:eu")
    assert library.queue("default", server=server)["length"] == 1
    plain = library.submit("plain", server=server)
    assert (plain["priority"], plain["group"]) == (5, None)
    shown = library.submit("x", server=server, priority=1, group="g", queue="emails")
    assert (shown["priority"], shown["group"], shown["queue"]) == (1, "g", "emails")


def test_the_command_line_sets_limits_pauses_and_lists(procs: Procs, server: str) -> None:
    given = run_client(procs, "--server", server, "--queue", "emails", "--concurrency", "4",
                       "--rate-limit", "10/60", "--group-rate-limit", "1/0.5",
                       "--group-concurrency", "2")
    assert given.returncode == 0, given.stderr
    assert given.stdout.split() == [
        "emails", "active", "0", "queued,", "0", "running,", "0", "held", "back;", "rate",
        "10/60s,", "concurrency", "4,", "group", "rate", "1/0.5s,", "group", "concurrency", "2"]
    assert library.queue("emails", server=server)["settings"] == {
        "rate_limit": {"jobs": 10, "per": 60}, "concurrency": 4,
        "group_rate_limit": {"jobs": 1, "per": 0.5}, "group_concurrency": 2}
    removed = run_client(procs, "--server", server, "--queue", "emails", "--rate-limit", "none",
                         "--group-concurrency", "none")
    assert removed.returncode == 0, removed.stderr
    assert library.queue("emails", server=server)["settings"] == NO_LIMITS | {
        "concurrency": 4, "group_rate_limit": {"jobs": 1, "per": 0.5}}
    paused = run_client(procs, "--server", server, "--queue", "emails", "--pause")
    assert (paused.returncode, paused.stdout.split()[:2]) == (0, ["emails", "paused"])
    run_client(procs, "--server", server, "--no-wait", "--queue", "emails", "waits")
    listed = run_client(procs, "--server", server, "--queues")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["default", "active"], ["emails", "paused"]]
    assert "1 queued, 0 running, 1 held back;  concurrency 4, group rate 1/0.5s" in lines[1]
    assert "no limits" in lines[0]
    stats = run_client(procs, "--server", server, "--queue", "emails", "--stats")
    assert "1 held back (paused)" in stats.stdout, stats.stdout
    resumed = run_client(procs, "--server", server, "--queue", "emails", "--resume")
    assert (resumed.returncode, resumed.stdout.split()[:2]) == (0, ["emails", "active"])


@pytest.mark.parametrize(("args", "words"), [
    (["--priority", "0", "x"], "argument --priority: 0 is out of range"),
    (["--priority", "high", "x"], "argument --priority: 'high' is not a whole number"),
    (["--group", "a b", "x"], "argument --group: 'a b' is not a group name"),
    (["--priority", "3", "--stats"], "--priority goes with TEXT"),
    (["--group", "g", "--watch", "0" * 32], "--group goes with TEXT"),
    (["--concurrency", "0"], "argument --concurrency: 0 is out of range"),
    (["--rate-limit", "10"], "argument --rate-limit: '10' is not JOBS/SECONDS"),
    (["--rate-limit", "10/0"], "is not JOBS/SECONDS"),
    (["--group-rate-limit", "a/b"], "is not JOBS/SECONDS"),
    (["--concurrency", "2", "--pause"], "the limits"),
    (["--concurrency", "2", "x"], "the limits"),
    (["--pause", "--resume"], "not allowed with argument"),
    (["--queues", "--queue", "Bad"], "argument --queue"),
])
def test_bad_flags_are_one_line_and_exit_2(procs: Procs, args: list[str], words: str) -> None:
    result = run_client(procs, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_value_the_server_refuses_is_one_line_and_exit_2(procs: Procs, server: str) -> None:
    for args in (["--rate-limit", "1000000/1"], ["--concurrency", "2000000"],
                 ["--group-rate-limit", "1/100000"]):
        result = run_client(procs, "--server", server, *args)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert "server said 400" in line and "must be" in line, line
        assert result.stdout == ""
    assert library.queue("default", server=server)["settings"] == NO_LIMITS


def test_the_library_steers_queues(procs: Procs, server: str) -> None:
    queue = library.set_queue("reports", server=server, rate_limit=(5, 2), concurrency=3)
    assert queue["settings"] == NO_LIMITS | {"rate_limit": {"jobs": 5, "per": 2},
                                             "concurrency": 3}
    queue = library.set_queue("reports", server=server, concurrency=None,
                              group_rate_limit={"jobs": 1, "per": 10})
    assert queue["settings"] == NO_LIMITS | {"rate_limit": {"jobs": 5, "per": 2},
                                             "group_rate_limit": {"jobs": 1, "per": 10}}
    assert library.pause("reports", server=server)["paused"] is True
    assert library.queue("reports", server=server)["paused"] is True
    assert library.resume("reports", server=server)["paused"] is False
    assert [q["name"] for q in library.queues(server=server)] == ["default", "reports"]
    with pytest.raises(library.ServerError) as refused:
        library.set_queue("reports", server=server, concurrency=0)
    assert refused.value.status == 400 and '"concurrency" must be' in refused.value.error
    with pytest.raises(library.ServerError) as unknown:
        library.queue("nope", server=server)
    assert unknown.value.status == 404
    with pytest.raises(TypeError, match="burst"):
        library.set_queue("reports", server=server, burst=3)
    with pytest.raises(library.ServerError) as bad:
        library.submit("x", server=server, priority=11)
    assert bad.value.status == 400 and '"priority"' in bad.value.error


# -- the dashboard ------------------------------------------------------------------------------

def test_the_dashboard_shows_priorities_groups_and_steers_a_queue(
        page: Page, procs: Procs, server: str) -> None:
    def send(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(f"{server}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    before = send("POST", "/submit", {"input": "seeded", "priority": 8, "group": "acme"})
    console = Console(page)
    page.goto(f"{server}/")
    expect(page.locator("#live")).to_have_text("live")
    row = page.locator(f'tr[data-id="{before["id"]}"]')  # from GET /jobs
    expect(row.locator(".priority")).to_have_text("8")
    expect(row.locator(".group")).to_have_text("acme")
    after = send("POST", "/submit", {"input": "fed", "priority": 2, "group": "beta"})
    row = page.locator(f'tr[data-id="{after["id"]}"]')  # from /feed, then GET /status
    expect(row.locator(".priority")).to_have_text("2")
    expect(row.locator(".group")).to_have_text("beta")
    page.fill("#submit-input", "from the page")
    page.select_option("#submit-priority", "9")
    page.fill("#submit-group", "gamma")
    page.click("#submit-button")
    row = page.locator("#jobs tbody tr", has_text="from the page")
    expect(row.locator(".priority")).to_have_text("9")
    expect(row.locator(".group")).to_have_text("gamma")

    queue = page.locator('#queues tr[data-queue="default"]')
    expect(queue.locator(".state")).to_have_text("active")
    queue.locator("button.pause").click()
    expect(queue.locator(".state")).to_have_text("paused")
    assert send("GET", "/queues/default")["paused"] is True
    expect(page.locator("#held-back")).to_have_text("3 (paused)")
    queue.locator("button.resume").click()
    expect(queue.locator(".state")).to_have_text("active")
    assert send("GET", "/queues/default")["paused"] is False

    queue.locator("button.limits").click()
    page.fill("#limit-concurrency", "3")
    page.fill("#limit-rate-jobs", "10")
    page.fill("#limit-rate-per", "60")
    page.click("#limits-save")
    expect(page.locator("#limits-form")).to_be_hidden()
    expect(queue).to_contain_text("10 per 60 s")
    assert send("GET", "/queues/default")["settings"] == NO_LIMITS | {
        "concurrency": 3, "rate_limit": {"jobs": 10, "per": 60}}
    queue.locator("button.limits").click()
    expect(page.locator("#limit-concurrency")).to_have_value("3")
    page.fill("#limit-concurrency", "")  # empty: no such limit
    page.click("#limits-save")
    expect(page.locator("#limits-form")).to_be_hidden()
    assert send("GET", "/queues/default")["settings"] == NO_LIMITS | {
        "rate_limit": {"jobs": 10, "per": 60}}
    assert console.messages == []
