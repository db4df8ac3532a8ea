"""Exactly once (issue 18): idempotent submits, jobs that expire before they start, and
schedules whose every tick makes one job, whichever processes run or die."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from server import make_app
from store import RETENTION, SUBMIT, Cron, Keys, new_jobs, submit_args
from tests.conftest import Procs, free_port, job, wait_until
from worker import Worker

Client = TestClient[Any, Any]


async def post(client: Client, body: Any, key: str | None = None,
               path: str = "/submit") -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    response = await client.post(path, data=json.dumps(body), headers=headers)
    return response.status, await response.json(), response


# -- idempotency keys -----------------------------------------------------------------------------

@pytest.mark.cluster
async def test_a_key_sent_again_gets_the_same_job(client: Client, r: Any, prefix: str) -> None:
    status, first, response = await post(client, {"input": "once"}, "order-17")
    assert status == 201 and "Idempotent-Replayed" not in response.headers
    status, again, response = await post(client, {"input": "once"}, "order-17")
    assert status == 200 and response.headers["Idempotent-Replayed"] == "true"
    assert again["id"] == first["id"] and again["status"] == "queued"
    status, conflict, _ = await post(client, {"input": "twice"}, "order-17")
    assert status == 409 and conflict["id"] == first["id"] and "different" in conflict["error"]
    assert r.zcard(Keys(prefix).index("queued")) == 1
    status, other, _ = await post(client, {"input": "once", "queue": "other"}, "order-17")
    assert status == 201 and other["id"] != first["id"]  # a key is scoped to its queue


async def test_a_bulk_submit_takes_one_key(client: Client, r: Any, prefix: str) -> None:
    status, first, _ = await post(client, {"inputs": ["a", "b", "c"]}, "batch-1")
    assert status == 201
    status, again, response = await post(client, {"inputs": ["a", "b", "c"]}, "batch-1")
    assert status == 200 and response.headers["Idempotent-Replayed"] == "true"
    assert [j["id"] for j in again["jobs"]] == [j["id"] for j in first["jobs"]]
    assert r.zcard(Keys(prefix).index("queued")) == 3


async def test_a_replay_of_an_expired_job_gives_its_id(client: Client, r: Any,
                                                       prefix: str) -> None:
    status, first, _ = await post(client, {"input": "gone"}, "k")
    r.delete(Keys(prefix).job(first["id"]))  # as retention does
    status, again, _ = await post(client, {"input": "gone"}, "k")
    assert (status, again) == (200, {"id": first["id"]})


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é"])
async def test_a_bad_key_is_400_and_stores_nothing(client: Client, r: Any, prefix: str,
                                                   key: str) -> None:
    response = await client.post("/submit", data=b'{"input": "x"}',
                                 headers={"Idempotency-Key": key})
    body = await response.json()
    assert response.status == 400 and "Idempotency-Key" in body["error"], body
    assert not r.exists(Keys(prefix).index("queued"))


async def test_the_key_is_kept_for_the_ttl(aiohttp_client: Any, redis_url: str, r: Any,
                                           prefix: str) -> None:
    client = await aiohttp_client(make_app(redis_url, prefix=prefix, idempotency_ttl=60))
    await post(client, {"input": "x"}, "ttl")
    [key] = list(r.scan_iter(match=f"{prefix}:idempotency:*"))
    assert 55 <= r.ttl(key) <= 60


@pytest.mark.cluster
def test_fifty_clients_sending_the_same_keys_make_one_job_each(procs: Procs, r: Any,
                                                               prefix: str) -> None:
    """50 clients each send the same 1,000 keys in an order of their own, some keys twice,
    and drop one request in 20 before its answer: exactly 1,000 jobs, and every answer for a
    key carries one id."""
    port = free_port()
    procs.server(port)
    keys = [f"key-{n:04d}" for n in range(1000)]
    answers: dict[str, set[str]] = defaultdict(set)

    async def one_client(seed: int) -> None:
        rng = random.Random(seed)
        order = keys + rng.sample(keys, 100)
        rng.shuffle(order)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for key in order:
                body = json.dumps({"input": key}).encode()
                if rng.random() < 0.05:
                    await dropped(port, key, body)
                    continue
                async with session.post("/submit", data=body,
                                        headers={"Idempotency-Key": key}) as response:
                    assert response.status in (200, 201), await response.text()
                    answers[key].add((await response.json())["id"])

    async def run() -> None:
        await asyncio.gather(*(one_client(seed) for seed in range(50)))

    asyncio.run(run())
    assert r.zcard(Keys(prefix).index("queued")) == 1000
    assert all(len(ids) == 1 for ids in answers.values()) and len(answers) == 1000


async def dropped(port: int, key: str, body: bytes) -> None:
    """Send a submit and hang up before the answer (at a random point of the request)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"POST /submit HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    writer.write(request[:random.randint(len(request) // 2, len(request))])
    await writer.drain()
    writer.close()
    await writer.wait_closed()


# -- expiry before start ---------------------------------------------------------------------------

async def test_expires_in_is_checked(client: Client) -> None:
    for bad in (0, -1, "1", True, 1e12):
        status, body, _ = await post(client, {"input": "x", "expires_in": bad})
        assert status == 400 and "expires_in" in body["error"], (bad, body)


@pytest.mark.cluster
def test_a_job_queued_past_its_expiry_is_cancelled_and_never_runs(procs: Procs, r: Any,
                                                                  prefix: str) -> None:
    port = free_port()
    procs.server(port)
    procs.worker("--handler", "handlers:slow", "--concurrency", "1")
    base = f"http://127.0.0.1:{port}"

    async def run() -> tuple[str, str]:
        async with aiohttp.ClientSession(base) as session:
            async with session.post("/submit", json={"input": "5"}) as response:
                blocker = (await response.json())["id"]
            wait_until(lambda: job(r, prefix, blocker)["status"] == "running", what="the 5 s job")
            async with session.post("/submit", json={"input": "0", "expires_in": 1}) as response:
                late = (await response.json())["id"]
            return blocker, late

    blocker, late = asyncio.run(run())
    submitted = time.time()
    wait_until(lambda: job(r, prefix, late)["status"] == "cancelled", 5, what="the expiry")
    ended = time.time()
    stored = job(r, prefix, late)
    assert stored["error"] == "expired: not started within 1 s"
    assert stored["attempts"] == "0" and "worker" not in stored
    assert ended - submitted < 1 + 1.5  # within a second of its expiry (the keeper's round)
    assert job(r, prefix, blocker)["status"] == "running"  # not when a slot came free


def test_a_delayed_jobs_expiry_counts_from_when_it_is_due(r: Any, redis_url: str,
                                                          prefix: str) -> None:
    keys, due = Keys(prefix), time.time() - 0.1  # due now: queued by the next round
    jobs = new_jobs(["x"], due, "default", expires_in=60)
    r.register_script(SUBMIT)(keys=[keys.queue], args=submit_args(
        keys.prefix, RETENTION, jobs, due))
    worker = Worker(redis_url, prefix=prefix)
    worker.reclaim()
    taken = worker.take(worker.slots[0])
    assert taken is not None and taken.id == jobs[0]["id"]


# -- schedules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York"])
@pytest.mark.parametrize("expr", ["30 2 * * *", "0 1 * * *", "30 1 * * *", "*/20 * * * *",
                                  "0 3 * * sun", "15 0-3 * 3,10,11 *", "0 12 1 * 1-5"])
def test_next_run_across_dst_matches_zoneinfo(zone: str, expr: str) -> None:
    """Every tick over three days around each of the next DST changes, against a reference
    that walks every minute in UTC and keeps the local times that match (at their first
    occurrence: fold 0; a local time in a gap never appears)."""
    cron = Cron.parse(expr, zone)
    for change in dst_changes(zone, datetime(2027, 1, 1, tzinfo=UTC), 2):
        start = change - timedelta(days=1, minutes=7)
        end = start + timedelta(days=3)
        expected, minute = [], start.replace(second=0, microsecond=0)
        while minute < end:
            minute += timedelta(minutes=1)
            local = minute.astimezone(cron.zone)
            if (local.fold == 0 and local.minute in cron.minutes and local.hour in cron.hours
                    and cron.day_matches(local.date())):
                expected.append(minute)
        got, moment = [], start
        while (moment := cron.after(moment)) < end:
            got.append(moment.astimezone(UTC))
        assert got == expected


def dst_changes(zone: str, after: datetime, count: int) -> list[datetime]:
    """The next `count` moments (UTC, to the hour) when the zone's UTC offset changes."""
    from zoneinfo import ZoneInfo
    tz, hour = ZoneInfo(zone), after
    found: list[datetime] = []
    while len(found) < count:
        if (hour + timedelta(hours=1)).astimezone(tz).utcoffset() != hour.astimezone(
                tz).utcoffset():
            found.append(hour + timedelta(hours=1))
        hour += timedelta(hours=1)
    return found


@pytest.mark.parametrize("body, words", [
    ({"every": 5}, "input"),
    ({"input": "x"}, "cron"),
    ({"input": "x", "every": 5, "cron": "* * * * *"}, "cron"),
    ({"input": "x", "every": 0.5}, "every"),
    ({"input": "x", "cron": "* * *"}, "5 fields"),
    ({"input": "x", "cron": "61 * * * *"}, "minute"),
    ({"input": "x", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "time zone"),
    ({"input": "x", "every": 5, "timezone": "UTC"}, "timezone"),
    ({"input": "x", "every": 5, "overlap": "maybe"}, "overlap"),
    ({"input": "x", "every": 5, "priority": 10}, "priority"),
    ({"input": "x", "every": 5, "queue": "No Such"}, "queue"),
    ({"input": "x", "every": 5, "expires_in": 0}, "expires_in"),
    ({"input": "x", "every": 5, "colour": "red"}, "colour"),
])
async def test_a_bad_schedule_is_400(client: Client, body: dict[str, Any], words: str) -> None:
    response = await client.put("/schedules/nightly", json=body)
    assert response.status == 400 and words in (await response.json())["error"]
    assert (await client.get("/schedules/nightly")).status == 404


@pytest.mark.cluster
async def test_schedules_are_made_read_paused_and_deleted(client: Client) -> None:
    response = await client.put("/schedules/nightly", json={
        "cron": "30 2 * * *", "timezone": "Europe/Paris", "input": "report",
        "queue": "reports", "priority": 7, "overlap": "skip"})
    made = await response.json()
    assert response.status == 200, made
    assert made | {"next_run": ""} == {
        "name": "nightly", "cron": "30 2 * * *", "timezone": "Europe/Paris", "input": "report",
        "queue": "reports", "priority": 7, "group": None, "expires_in": None, "overlap": "skip",
        "paused": False, "next_run": "", "last_job": None, "runs": 0}
    next_run = datetime.fromisoformat(made["next_run"])
    assert next_run == Cron.parse("30 2 * * *", "Europe/Paris").after(datetime.now(UTC))
    assert next_run.utcoffset() in (timedelta(hours=1), timedelta(hours=2))
    assert (await (await client.get("/schedules")).json()) == {"schedules": [made]}
    metrics = await (await client.get("/metrics")).text()
    assert 'jobs_schedule_runs_total{schedule="nightly"} 0' in metrics.splitlines()
    paused = await (await client.post("/schedules/nightly/pause")).json()
    assert paused["paused"] is True
    resumed = await (await client.post("/schedules/nightly/resume")).json()
    assert resumed["paused"] is False
    assert (await client.delete("/schedules/nightly")).status == 204
    assert (await client.get("/schedules/nightly")).status == 404
    assert (await client.delete("/schedules/nightly")).status == 404
    assert (await client.post("/schedules/nightly/pause")).status == 404


@pytest.mark.cluster
async def test_ten_concurrent_puts_leave_one_schedule_and_one_next_tick(
        client: Client, r: Any, prefix: str) -> None:
    bodies = [{"every": 60 + n, "input": f"v{n}", "queue": "default" if n % 2 else "other"}
              for n in range(10)]
    responses = await asyncio.gather(*(client.put("/schedules/tick", json=b) for b in bodies))
    assert {response.status for response in responses} == {200}
    listed = (await (await client.get("/schedules")).json())["schedules"]
    assert len(listed) == 1
    queue = Keys(prefix, listed[0]["queue"])
    assert r.zrange(queue.prefix + ":schedules", 0, -1) == ["tick"]
    other = Keys(prefix, "other" if listed[0]["queue"] == "default" else "default")
    assert not r.exists(other.prefix + ":schedules") and not r.exists(
        other.prefix + ":schedule:tick")


@pytest.mark.slow
@pytest.mark.cluster
def test_an_every_second_schedule_makes_one_job_a_tick_while_processes_die(
        procs: Procs, r: Any, prefix: str) -> None:
    """3 workers and 2 servers; every 5 s one of them is SIGKILLed and started again. Over 30 s
    the schedule makes 30 jobs (+- 1), one per tick: no tick twice, none skipped."""
    ports = [free_port(), free_port()]
    servers = [procs.server(port) for port in ports]
    workers = [procs.worker("--concurrency", "2") for _ in range(3)]
    response = aiohttp_put(ports[0], "/schedules/beat", {"every": 1, "input": "beat"})
    began = time.time()
    rng = random.Random(18)
    while time.time() - began < 30:
        time.sleep(max(0.0, 5 - (time.time() - began) % 5))
        kind = rng.choice(["server", "worker"])
        if kind == "server":
            n = rng.randrange(2)
            servers[n].send_signal(signal.SIGKILL)
            servers[n].wait()
            servers[n] = procs.server(ports[n])
        else:
            n = rng.randrange(3)
            workers[n].send_signal(signal.SIGKILL)
            workers[n].wait()
            workers[n] = procs.worker("--concurrency", "2")
    ended = time.time()
    aiohttp_put(ports[0], "/schedules/beat/pause", None, method="POST")
    ticks = sorted(datetime.fromisoformat(j["scheduled_for"]).timestamp()
                   for j in scheduled_jobs(r, prefix, "beat"))
    assert response["next_run"]
    in_window = [t for t in ticks if began <= t <= ended]
    assert abs(len(in_window) - 30) <= 1, in_window
    assert len(ticks) == len(set(ticks))  # never two jobs for one tick
    assert all(b - a == 1 for a, b in itertools.pairwise(ticks)), ticks  # none missed


def scheduled_jobs(r: Any, prefix: str, name: str) -> list[dict[str, str]]:
    keys = Keys(prefix)
    ids = dict.fromkeys(i for state in ("queued", "running", "done", "failed")  # a job that
                        for i in r.zrange(keys.index(state), 0, -1))  # moved between reads: once
    return [j for j in (job(r, prefix, i) for i in ids) if j.get("schedule") == name]


def aiohttp_put(port: int, path: str, body: Any, method: str = "PUT") -> Any:
    async def call() -> Any:
        async with aiohttp.ClientSession() as session, session.request(
                method, f"http://127.0.0.1:{port}{path}", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()
    return asyncio.run(call())


@pytest.mark.cluster
def test_missed_ticks_make_one_job_and_overlap_skip_waits(procs: Procs, r: Any,
                                                          prefix: str, tmp_path: Path) -> None:
    """Nothing runs for 3 s of an every-second schedule: once a worker starts, one job for all
    of them ("catch up once"). With overlap skip, no job is made while the last one runs."""
    port = free_port()
    server = procs.server(port)
    aiohttp_put(port, "/schedules/catch", {"every": 1, "input": "0"})
    server.send_signal(signal.SIGKILL)
    server.wait()
    time.sleep(3.5)  # nothing runs: the ticks of these seconds are missed
    procs.worker("--handler", "handlers:slow")
    wait_until(lambda: scheduled_jobs(r, prefix, "catch"), what="the catch-up job")
    first = scheduled_jobs(r, prefix, "catch")
    assert len(first) == 1
    procs.server(port)
    aiohttp_put(port, "/schedules/skip", {"every": 1, "input": "3", "overlap": "skip"})
    wait_until(lambda: any(j["status"] == "done" for j in scheduled_jobs(r, prefix, "skip")),
               15, what="the first skip job to end")
    made = scheduled_jobs(r, prefix, "skip")
    assert len(made) <= 2  # one per 3 s run, not one a second
