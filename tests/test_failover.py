"""Failover: the server and workers find the master through Sentinel (REDIS_URL
redis+sentinel://...) and follow it when it is killed, without a restart. Each test builds its
own master, replica and 3 Sentinels (tests/topologies.py) and runs real processes against them.

- the core path over Sentinel: submit, follow over /ws to done, /status;
- the master SIGKILLed under load with --min-replicas 1: no accepted (201) job is lost, each is
  done once, refusals are JSON 503s, and submits are accepted again once a replica is back;
- the same kill with --min-replicas 0: the accepted jobs lost with the master's last writes
  are counted and printed (allowed), the rest all end done.

Run: python3 -m pytest tests/test_failover.py -s (-s shows the figures)."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis
from redis.asyncio.connection import parse_url

from store import ClusterConnection, Keys
from tests.conftest import Procs, free_port, wait_until
from tests.topologies import HOST, Sentinels, Server

SUBMITTERS = 4  # clients posting jobs back to back
WATCH_EVERY = 10  # every 10th accepted job is followed over /ws
LOAD_BEFORE = 1.5  # seconds of load before the master is killed
LOAD_AFTER = 2.0  # seconds of load after the failover (and the replica's return)
DURATIONS = ("0.02", "0.03", "0.04", "0.05")  # inputs of handlers:slow, seconds each job takes
REFUSED_PAUSE = 0.05  # a submitter's pause after a refusal, as a client backs off
DRAIN_TIMEOUT = 40.0  # seconds the accepted jobs may take to end after the load
TERMINAL = {"done", "failed", "cancelled"}


@pytest.fixture
def stack(sentinels: Sentinels, procs: Procs) -> Procs:
    """procs whose programs get REDIS_URL=the Sentinels' URL (stopped before the Sentinels)."""
    procs.redis_url = sentinels.url
    return procs


def no_traceback(procs: Procs, *started: Any) -> None:
    for proc in started:
        log = procs.log(proc)
        assert "Traceback" not in log and "Error handling request" not in log, \
            f"pid {proc.pid}:\n{log[-3000:]}"


def jobs_on(server: Server, prefix: str, ids: list[str]) -> dict[str, dict[str, str]]:
    """The hashes of ids on one Redis ({} for a job it does not hold)."""
    client = server.client()
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(Keys(prefix).job(job_id))
            return dict(zip(ids, pipe.execute(), strict=True))
    finally:
        client.close()


def ended(server: Server, prefix: str, ids: list[str]) -> bool:
    return all(job.get("status") in TERMINAL for job in jobs_on(server, prefix, ids).values())


@dataclass
class Load:
    """What the submitters and watchers saw, with monotonic times."""

    accepted: dict[str, float] = field(default_factory=dict)  # job id -> when it was a 201
    refused: list[tuple[float, int, str]] = field(default_factory=list)  # when, status, body
    errors: list[tuple[float, str]] = field(default_factory=list)  # no HTTP answer at all
    watchers: dict[str, asyncio.Task[Stream]] = field(default_factory=dict)
    handshakes_refused: int = 0  # /ws upgrades answered 503 (then tried again)


@dataclass
class Stream:
    messages: list[dict[str, Any]]
    close_code: int | None


async def follow(session: aiohttp.ClientSession, base: str, job_id: str, load: Load,
                 within: float = 60.0) -> Stream:
    """Follow a job over /ws until the server ends the stream. An upgrade refused with 503 (the
    master is down) is tried again, as client.py does, until the deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            async with session.ws_connect(f"{base}/ws", params={"id": job_id}) as ws:
                messages = [json.loads(m.data) async for m in ws
                            if m.type is aiohttp.WSMsgType.TEXT]
                return Stream(messages, ws.close_code)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            load.handshakes_refused += 1
            await asyncio.sleep(REFUSED_PAUSE)  # a client's backoff before it tries again


async def submit_until(stop: asyncio.Event, session: aiohttp.ClientSession, base: str,
                       load: Load, rng: random.Random) -> None:
    """POST jobs back to back until stop is set; record every answer."""
    while not stop.is_set():
        try:
            async with session.post(f"{base}/submit",
                                    json={"input": rng.choice(DURATIONS)}) as response:
                status, body = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            load.errors.append((time.monotonic(), repr(exc)))
            continue
        if status == 201:
            job_id = json.loads(body)["id"]
            load.accepted[job_id] = time.monotonic()
            if len(load.accepted) % WATCH_EVERY == 0:
                load.watchers[job_id] = asyncio.create_task(follow(session, base, job_id, load))
        else:
            load.refused.append((time.monotonic(), status, body))
            await asyncio.sleep(REFUSED_PAUSE)  # a client's backoff, not a wait for a result


def start_stack(procs: Procs, min_replicas: int) -> tuple[str, list[Any]]:
    """A server and 2 workers (10 slots each, jobs of 20-50 ms) at --min-replicas."""
    port = free_port()
    server = procs.server(port, "--min-replicas", str(min_replicas))
    workers = [procs.worker("--handler", "handlers:slow", "--lease", "10",
                            "--min-replicas", str(min_replicas)) for _ in range(2)]
    return f"http://127.0.0.1:{port}", [server, *workers]


def rejoin(sentinels: Sentinels, old: Server, new: tuple[str, int]) -> None:
    """Restart the killed master as a replica of the new one, and wait until it has synced and
    the Sentinels count it."""
    old.args = ("--replicaof", HOST, str(new[1]))
    old.start()
    wait_until(lambda: old.info("replication").get("master_link_status") == "up",
               timeout=20, what=f"{old} to sync from the new master")
    wait_until(sentinels.ready, timeout=20, what="the Sentinels to see the replica")


@dataclass
class Failover:
    load: Load
    session: aiohttp.ClientSession  # the watchers' (close it after them)
    killed: float  # monotonic times
    failed_over: float
    rejoined: float | None
    new: Server


async def load_and_kill(sentinels: Sentinels, base: str, with_replica_back: bool) -> Failover:
    """Submitters (and watchers) under load; the master SIGKILLed after LOAD_BEFORE s; load
    until LOAD_AFTER s after the failover (after the old master is back as a replica, if
    asked); then the submitters stop. Returns with the watchers still running."""
    load, stop, rng = Load(), asyncio.Event(), random.Random(1)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=20))
    submitters = [asyncio.create_task(submit_until(stop, session, base, load, rng))
                  for _ in range(SUBMITTERS)]
    try:
        await asyncio.sleep(LOAD_BEFORE)  # the load before the kill, not a wait for a result
        assert load.accepted, "nothing was accepted before the kill"
        killed = time.monotonic()  # the SIGKILL goes out just after: no refusal is older
        old = await asyncio.to_thread(sentinels.kill_master)
        new = await asyncio.to_thread(sentinels.wait_failover)
        failed_over = time.monotonic()
        rejoined = None
        if with_replica_back:
            await asyncio.to_thread(rejoin, sentinels, old, new)
            rejoined = time.monotonic()
        await asyncio.sleep(LOAD_AFTER)  # load after it, not a wait for a result
        stop.set()
        await asyncio.wait_for(asyncio.gather(*submitters), 30)
    except BaseException:
        stop.set()
        for task in [*submitters, *load.watchers.values()]:
            task.cancel()
        await asyncio.gather(*submitters, *load.watchers.values(), return_exceptions=True)
        await session.close()
        raise
    return Failover(load, session, killed, failed_over, rejoined, sentinels.master_server())


def check_refusals(failover: Failover) -> None:
    """Every answer but a 201 was a JSON 503 with an error, during the failover; the server
    always answered."""
    load = failover.load
    assert not load.errors, f"the server did not answer: {load.errors[:5]}"
    for when, status, body in load.refused:
        assert status == 503, (status, body)
        assert isinstance(json.loads(body)["error"], str), body
        assert when >= failover.killed, f"refused before the kill: {body}"


def error_of(body: str) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error: {body[:200]!r}"


def report(name: str, failover: Failover) -> None:
    load, killed = failover.load, failover.killed
    print(f"{name}: failover took {failover.failed_over - killed:.2f}s after the kill"
          + (f", replica back at +{failover.rejoined - killed:.2f}s"
             if failover.rejoined is not None else ""))
    refused = [when for when, _, _ in load.refused]
    window = (f"503s from +{min(refused) - killed:.2f}s to +{max(refused) - killed:.2f}s after "
              f"the kill ({max(refused) - min(refused):.2f}s)" if refused else "no 503")
    print(f"{name}: {len(load.accepted)} submits accepted, {len(load.refused)} refused during "
          f"the failover; {window}; {load.handshakes_refused} /ws upgrades refused")
    edges = [-math.inf, failover.failed_over, failover.rejoined or failover.failed_over, math.inf]
    phases = ["until the failover", "until the replica was back", "after"]
    for phase, begin, end in zip(phases, edges, edges[1:], strict=False):
        errors = collections.Counter(f"{status} {error_of(body)}" for when, status, body in
                                     load.refused if begin <= when < end)
        for error, count in errors.items():
            print(f"{name}:   {phase}: {count} x {error}")


# 1 -----------------------------------------------------------------------------------------------

async def test_the_core_path_over_sentinel(stack: Procs, sentinels: Sentinels) -> None:
    procs = stack
    base, started = start_stack(procs, 0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        ids = []
        for text in DURATIONS:
            async with session.post(f"{base}/submit", json={"input": text}) as response:
                assert response.status == 201, await response.text()
                ids.append((await response.json())["id"])
        stream = await follow(session, base, ids[-1], Load(), within=20)
        assert [m["status"] for m in stream.messages][-1] == "done"
        assert stream.close_code == 1000
        await asyncio.to_thread(wait_until, lambda: ended(sentinels.master_server(),
                                                          procs.prefix, ids), 20)
        for job_id in ids:
            async with session.get(f"{base}/status", params={"id": job_id}) as response:
                assert response.status == 200
                job = await response.json()
            assert (job["status"], job["result"]) == ("done", job["input"])
    assert [p.poll() for p in started] == [None] * 3
    no_traceback(procs, *started)


# 2 -----------------------------------------------------------------------------------------------

async def test_failover_with_min_replicas_1_loses_no_accepted_job(stack: Procs,
                                                                  sentinels: Sentinels) -> None:
    procs = stack
    base, started = start_stack(procs, 1)
    failover = await load_and_kill(sentinels, base, with_replica_back=True)
    load, session = failover.load, failover.session
    report("min-replicas 1", failover)
    try:
        ids = list(load.accepted)
        await asyncio.to_thread(wait_until, lambda: ended(failover.new, procs.prefix, ids),
                                DRAIN_TIMEOUT, "every accepted job to end")
        streams = await asyncio.wait_for(asyncio.gather(*load.watchers.values()), 30)
    finally:
        await session.close()
    jobs = jobs_on(failover.new, procs.prefix, ids)
    assert {job_id for job_id, job in jobs.items() if not job} == set(), "accepted jobs lost"
    statuses = [job["status"] for job in jobs.values()]
    assert statuses.count("done") == len(ids), {s: statuses.count(s) for s in set(statuses)}
    check_refusals(failover)
    assert load.refused, "no submit was refused: did the kill land?"
    assert any(when > (failover.rejoined or 0) for when in load.accepted.values()), \
        "no submit was accepted once the replica was back"
    assert load.watchers, "no job was watched"
    for job_id, stream in zip(load.watchers, streams, strict=True):
        ends = [m for m in stream.messages if m["status"] in TERMINAL]
        assert [m["status"] for m in ends] == ["done"], (job_id, stream.messages)
        assert stream.messages[-1] is ends[0] and stream.close_code == 1000, stream
        versions = [int(m["version"]) for m in stream.messages]
        assert versions == sorted(set(versions)), (job_id, versions)
        # done once: nothing changed it after the done its watcher got
        assert versions[-1] == int(jobs[job_id]["version"]), (job_id, jobs[job_id])
    unconfirmed = sum(procs.log(worker).count("replicas within") for worker in started[1:])
    print(f"min-replicas 1: {len(ids)} accepted jobs all done; {len(streams)} watchers each got "
          f"one done; attempts > 1: {sum(int(j['attempts']) > 1 for j in jobs.values())}; "
          f"finishes the workers logged as unconfirmed: {unconfirmed}")
    assert [p.poll() for p in started] == [None] * 3
    no_traceback(procs, *started)


# 3 -----------------------------------------------------------------------------------------------

async def test_failover_with_min_replicas_0_may_lose_the_last_writes(
        stack: Procs, sentinels: Sentinels) -> None:
    procs = stack
    base, started = start_stack(procs, 0)
    failover = await load_and_kill(sentinels, base, with_replica_back=False)
    load, session = failover.load, failover.session
    report("min-replicas 0", failover)
    try:
        ids = list(load.accepted)
        kept = [job_id for job_id, job in jobs_on(failover.new, procs.prefix, ids).items() if job]
        kept_set = set(kept)
        await asyncio.to_thread(wait_until, lambda: ended(failover.new, procs.prefix, kept),
                                DRAIN_TIMEOUT, "every job that survived to end")
        streams = await asyncio.wait_for(asyncio.gather(
            *(task for job_id, task in load.watchers.items() if job_id in kept_set)), 30)
    finally:
        for task in load.watchers.values():  # a lost job's watcher hears nothing more
            task.cancel()
        await asyncio.gather(*load.watchers.values(), return_exceptions=True)
        await session.close()
    lost = len(ids) - len(kept)
    when = sorted(load.accepted[job_id] - failover.killed for job_id in set(ids) - kept_set)
    print(f"min-replicas 0: lost {lost} of {len(ids)} accepted jobs"
          + (f" (accepted from {when[0]:+.3f}s to {when[-1]:+.3f}s of the kill)" if when else ""))
    jobs = jobs_on(failover.new, procs.prefix, kept)
    statuses = [job["status"] for job in jobs.values()]
    assert statuses.count("done") == len(kept), {s: statuses.count(s) for s in set(statuses)}
    for stream in streams:
        assert [m["status"] for m in stream.messages if m["status"] in TERMINAL] == ["done"]
    check_refusals(failover)
    assert any(when > failover.failed_over for when in load.accepted.values()), \
        "no submit was accepted after the failover"
    assert [p.poll() for p in started] == [None] * 3
    no_traceback(procs, *started)


async def test_requests_wait_for_a_free_connection_over_sentinel_too(
        sentinels: Sentinels, procs: Procs) -> None:
    """Each submit holds a connection for its WAIT (up to 1 s) while the replica does not
    answer: 300 at once are more than the server's 128 connections. Over redis:// the rest wait
    for one; over Sentinel they used to fail at once, "Too many connections" said as 503
    "unavailable"."""
    replica = sentinels.data[1]
    assert replica.proc is not None
    procs.redis_url = sentinels.url
    port = free_port()
    procs.server(port, "--min-replicas", "1")
    replica.proc.send_signal(signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def submit() -> tuple[int, str]:
                async with session.post(f"http://127.0.0.1:{port}/submit",
                                        json={"input": "x"}) as response:
                    return response.status, (await response.json())["error"]
            answers = await asyncio.gather(*(submit() for _ in range(300)))
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    assert {status for status, _ in answers} == {503}
    assert all("not confirmed by 1 replica" in error for _, error in answers), \
        collections.Counter(error for _, error in answers)


async def test_a_cluster_connection_closed_under_a_command_is_a_connection_error(
        redis_url: str) -> None:
    """On a cluster, once a command on a node fails (the node died), redis-py (8.1) closes the
    node's idle connections; a task that had just taken one found it connected, and its write
    then raised AttributeError: the server answered 500 (a submit, a /ws) during the failover.
    The connections of store's cluster client say it as the ConnectionError it is (a 503)."""
    connection = ClusterConnection(**parse_url(redis_url))  # one Redis is enough for one
    await connection.connect()

    async def closed_meanwhile() -> None:  # the other task's close ends while this one waits
        await connection.disconnect()

    connection.check_health = closed_meanwhile  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        await connection.send_command("PING")
    assert not connection.is_connected
