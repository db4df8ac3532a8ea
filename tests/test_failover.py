"""Failover: the server and workers follow a new master by themselves, without a restart, when
the master they use is SIGKILLed under load: over Redis Sentinel (REDIS_URL
redis+sentinel://...), and over Redis Cluster (redis+cluster://: the master of a busy queue's
slot). Each test builds its own topology (tests/topologies.py) and runs real processes on it.

Over Sentinel:
- the core path: submit, follow over /ws to done, /status;
- the master killed under load with --min-replicas 1: no accepted (201) job is lost, each is
  done once, refusals are JSON 503s, and submits are accepted again once a replica is back;
- the same kill with --min-replicas 0: the accepted jobs lost with the master's last writes
  are counted and printed (allowed), the rest all end done.
Over a cluster, with load on two queues whose slots are on different masters, and the master
of the first killed:
- --min-replicas 1: no accepted job of either queue is lost, each is done once; the killed
  shard's queue accepts nothing while its new master has no replica, and again once the old
  master is back as that replica;
- --min-replicas 0: the first queue's accepted jobs lost with the killed master's last writes
  are counted and printed; none of the second queue's are lost; the rest all end done.
In each: every watched job's watcher gets one terminal message, the server subscribes to the
killed master's queue again where it is now, and no process dies, restarts or logs a traceback.

Run: python3 -m pytest tests/test_failover.py -s (-s shows the figures)."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import aiohttp
import pytest
import redis
from redis.asyncio.connection import parse_url

from store import DEFAULT_QUEUE, ClusterConnection, Keys
from tests.conftest import Procs, eventually, free_port, wait_until
from tests.topologies import Cluster, Sentinels, Server

SUBMITTERS = 4  # clients posting jobs back to back (over a cluster: to each of two queues)
WATCH_EVERY = 10  # every 10th job accepted in a queue is followed over /ws
LOAD_BEFORE = 1.5  # seconds of load before the master is killed
LOAD_AFTER = 2.0  # seconds of load after the failover (and the replica's return)
DURATIONS = ("0.02", "0.03", "0.04", "0.05")  # inputs of handlers:slow, seconds each job takes
REFUSED_PAUSE = 0.05  # a submitter's pause after a refusal, as a client backs off
# A submitter's shortest interval between submits: at most 400 a second to a queue, about what
# its 20 worker slots finish, so the jobs left to drain after the load stay few however fast
# the machine is.
SUBMIT_EVERY = 0.01
DRAIN_TIMEOUT = 40.0  # seconds the accepted jobs may take to end after the load
TERMINAL = {"done", "failed", "cancelled"}
NOT_CONFIRMED = "not confirmed by 1 replica"  # a --min-replicas 1 submit's 503


class Answer(NamedTuple):
    """A submit not answered 201, with monotonic times."""

    sent: float
    when: float  # answered
    status: int
    body: str


@dataclass
class Load:
    """What the submitters and watchers of one queue saw, with monotonic times."""

    keys: Keys
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> when it was a 201
    sent: dict[str, float] = field(default_factory=dict)  # job id -> when its POST went out
    refused: list[Answer] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)  # no HTTP answer at all
    watchers: dict[str, asyncio.Task[Stream]] = field(default_factory=dict)
    handshakes_refused: int = 0  # /ws upgrades answered 503 (then tried again)

    @property
    def queue(self) -> dict[str, str]:
        """The queue, as a request names it (the default queue: by naming none)."""
        return {} if self.keys.name == DEFAULT_QUEUE else {"queue": self.keys.name}


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
            async with session.ws_connect(f"{base}/ws",
                                          params={"id": job_id, **load.queue}) as ws:
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
    """POST jobs to the load's queue back to back until stop is set; record every answer."""
    while not stop.is_set():
        sent = time.monotonic()
        try:
            async with session.post(f"{base}/submit", json={"input": rng.choice(DURATIONS),
                                                            **load.queue}) as response:
                status, body = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            load.errors.append((time.monotonic(), repr(exc)))
            continue
        if status == 201:
            job_id = json.loads(body)["id"]
            load.accepted[job_id], load.sent[job_id] = time.monotonic(), sent
            if len(load.accepted) % WATCH_EVERY == 0:
                load.watchers[job_id] = asyncio.create_task(follow(session, base, job_id, load))
            await asyncio.sleep(sent + SUBMIT_EVERY - time.monotonic())  # pace, not a wait
        else:
            load.refused.append(Answer(sent, time.monotonic(), status, body))
            await asyncio.sleep(REFUSED_PAUSE)  # a client's backoff, not a wait for a result


# -- the master killed: how each topology does it ----------------------------------------------

class Master(Protocol):
    """The master a test kills, and where each queue's jobs are afterwards."""

    def kill(self) -> None: ...

    def wait_failover(self) -> None: ...

    def rejoin(self) -> None: ...

    def holder(self, keys: Keys) -> Server: ...


class SentinelMaster:
    """The master the Sentinels name: the one of every queue."""

    def __init__(self, sentinels: Sentinels) -> None:
        self.sentinels = sentinels
        self.old: Server | None = None

    def kill(self) -> None:
        self.old = self.sentinels.kill_master()

    def wait_failover(self) -> None:
        self.sentinels.wait_failover()

    def rejoin(self) -> None:
        assert self.old is not None
        self.sentinels.rejoin(self.old)

    def holder(self, keys: Keys) -> Server:
        return self.sentinels.master_server()


class ClusterMaster:
    """The master of one queue's slot in a cluster."""

    def __init__(self, cluster: Cluster, keys: Keys) -> None:
        self.cluster = cluster
        self.old = cluster.master_of(keys.queue)

    def kill(self) -> None:
        self.cluster.kill(self.old)

    def wait_failover(self) -> None:
        self.cluster.wait_failover(self.old)

    def rejoin(self) -> None:
        self.cluster.rejoin(self.old)

    def holder(self, keys: Keys) -> Server:
        return self.cluster.master_of(keys.queue)


# -- reading what Redis holds ------------------------------------------------------------------

def jobs_on(server: Server, keys: Keys, ids: list[str]) -> dict[str, dict[str, str]]:
    """The hashes of a queue's jobs on one Redis ({} for a job it does not hold)."""
    client = server.client()
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            return dict(zip(ids, pipe.execute(), strict=True))
    finally:
        client.close()


def wait_ended(server: Server, keys: Keys, ids: list[str], timeout: float, what: str) -> None:
    """Wait until every one of the jobs has ended (reading only those that had not yet)."""
    pending = set(ids)

    def ended() -> bool:
        jobs = jobs_on(server, keys, list(pending))
        pending.difference_update(i for i, job in jobs.items() if job.get("status") in TERMINAL)
        return not pending

    wait_until(ended, timeout, what)


def check_done_once(server: Server, keys: Keys, ids: list[str]) -> dict[str, dict[str, str]]:
    """Every one of ids is done on server, and no job of the queue was done twice: the script
    that marks a job done raises the `done` total in the same step (replicated with it, so lost
    with it), so on the master that survived the total counts each done the queue kept; the
    index of done jobs holds each job once. They agree only if none was done twice (each new
    test's queue starts empty: no total from before). The jobs' hashes."""
    jobs = jobs_on(server, keys, ids)
    assert [job_id for job_id, job in jobs.items() if not job] == [], "accepted jobs lost"
    statuses = collections.Counter(job["status"] for job in jobs.values())
    assert statuses == {"done": len(ids)}, statuses
    total = int(server.call("HGET", keys.counters, "done") or 0)
    distinct = int(server.call("ZCARD", keys.index("done")))
    assert total == distinct >= len(ids), f"{total} dones recorded for {distinct} jobs done"
    return jobs


def check_watchers(load: Load, streams: list[Stream], jobs: dict[str, dict[str, str]]) -> None:
    """Each watcher got exactly one terminal message, done, last, then close 1000; versions
    only rose; and the job has not changed since the done its watcher got."""
    assert load.watchers, f"no job of {load.keys.name} was watched"
    for job_id, stream in zip(load.watchers, streams, strict=True):
        ends = [m for m in stream.messages if m["status"] in TERMINAL]
        assert [m["status"] for m in ends] == ["done"], (job_id, stream.messages)
        assert stream.messages[-1] is ends[0] and stream.close_code == 1000, stream
        versions = [int(m["version"]) for m in stream.messages]
        assert versions == sorted(set(versions)), (job_id, versions)
        assert versions[-1] == int(jobs[job_id]["version"]), (job_id, jobs[job_id])


def ran_twice(procs: Procs, workers: list[subprocess.Popen[str]], ids: list[str]) -> int:
    """How many of ids a handler finished more than once (allowed: delivery is at least
    once), as the workers logged them."""
    done = collections.Counter(id_ for worker in workers
                               for id_ in re.findall(r"job (\w+): done$", procs.log(worker),
                                                     re.MULTILINE))
    return sum(done[job_id] > 1 for job_id in ids)


# -- load, kill, report ------------------------------------------------------------------------

@dataclass
class Failover:
    loads: list[Load]  # the first is the killed master's queue
    master: Master
    session: aiohttp.ClientSession  # the watchers' (close it after them)
    killed: float  # monotonic times
    killed_at: float  # time.time() of the kill, to read the logs by
    failed_over: float
    rejoin_began: float | None
    rejoined: float | None


async def load_and_kill(master: Master, base: str, loads: list[Load], with_replica_back: bool,
                        before_rejoin: Callable[[float], bool] | None = None) -> Failover:
    """SUBMITTERS submitters on each queue (and watchers), under load; the master SIGKILLed
    after LOAD_BEFORE s; load until LOAD_AFTER s after the failover (after the old master is
    back as a replica, if asked, once before_rejoin(when it failed over) is true); then the
    submitters stop. Returns with the watchers still running."""
    stop, rng = asyncio.Event(), random.Random(1)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=20))
    submitters = [asyncio.create_task(submit_until(stop, session, base, load, rng))
                  for load in loads for _ in range(SUBMITTERS)]
    try:
        await asyncio.sleep(LOAD_BEFORE)  # the load before the kill, not a wait for a result
        for load in loads:
            assert load.accepted, f"nothing was accepted in {load.keys.name} before the kill"
        killed, killed_at = time.monotonic(), time.time()  # no refusal is older
        await asyncio.to_thread(master.kill)
        await asyncio.to_thread(master.wait_failover)
        failed_over = time.monotonic()
        rejoin_began = rejoined = None
        if with_replica_back:
            if before_rejoin is not None:
                async def seen() -> bool:
                    return before_rejoin(failed_over)
                await eventually(seen, 30, "what must be seen before the replica is back")
            rejoin_began = time.monotonic()
            await asyncio.to_thread(master.rejoin)
            rejoined = time.monotonic()
        await asyncio.sleep(LOAD_AFTER)  # load after it, not a wait for a result
        stop.set()
        await asyncio.wait_for(asyncio.gather(*submitters), 30)
    except BaseException:
        stop.set()
        watchers = [task for load in loads for task in load.watchers.values()]
        for task in [*submitters, *watchers]:
            task.cancel()
        await asyncio.gather(*submitters, *watchers, return_exceptions=True)
        await session.close()
        raise
    return Failover(loads, master, session, killed, killed_at, failed_over, rejoin_began,
                    rejoined)


def check_refusals(failover: Failover, load: Load) -> None:
    """Every answer but a 201 was a JSON 503 with an error, after the kill; the server always
    answered."""
    assert not load.errors, f"the server did not answer: {load.errors[:5]}"
    for answer in load.refused:
        assert answer.status == 503, answer
        assert isinstance(json.loads(answer.body)["error"], str), answer
        assert answer.when >= failover.killed, f"refused before the kill: {answer}"


def error_of(body: str) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error: {body[:200]!r}"


def resubscribed(procs: Procs, server: subprocess.Popen[str], failover: Failover,
                 keys: Keys) -> float | None:
    """Seconds from the kill until the server's log said it had subscribed to the queue's
    events again (None: it did not)."""
    for line in procs.log(server).splitlines():
        stamp, _, said = line.partition(" server ")
        if said == f"subscribed to {keys.events}":
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if when >= failover.killed_at:
                return when - failover.killed_at
    return None


def report(name: str, failover: Failover) -> None:
    killed = failover.killed
    print(f"{name}: failover took {failover.failed_over - killed:.2f}s after the kill"
          + (f", replica back at +{failover.rejoined - killed:.2f}s (restarted at "
             f"+{failover.rejoin_began - killed:.2f}s)"
             if failover.rejoined is not None and failover.rejoin_began is not None else ""))
    edges = [-math.inf, failover.failed_over, failover.rejoined or failover.failed_over, math.inf]
    phases = ["until the failover", "until the replica was back", "after"]
    for load in failover.loads:
        queue = f"{name} [{load.keys.name}]"
        refused = [answer.when for answer in load.refused]
        window = (f"503s from +{min(refused) - killed:.2f}s to +{max(refused) - killed:.2f}s "
                  f"after the kill ({max(refused) - min(refused):.2f}s)" if refused else "no 503")
        print(f"{queue}: {len(load.accepted)} submits accepted, {len(load.refused)} refused; "
              f"{window}; {load.handshakes_refused} /ws upgrades refused")
        for phase, begin, end in zip(phases, edges, edges[1:], strict=False):
            errors = collections.Counter(f"{a.status} {error_of(a.body)}" for a in load.refused
                                         if begin <= a.when < end)
            for error, count in errors.items():
                print(f"{queue}:   {phase}: {count} x {error}")


def check_processes(procs: Procs, started: list[subprocess.Popen[str]]) -> None:
    """Every process still runs (the same pid: nothing restarted it), and none logged a
    traceback."""
    assert [p.poll() for p in started] == [None] * len(started), \
        [(p.pid, p.poll()) for p in started]
    for proc in started:
        log = procs.log(proc)
        assert "Traceback" not in log and "Error handling request" not in log, \
            f"pid {proc.pid}:\n{log[-3000:]}"


async def no_accepted_job_lost(name: str, failover: Failover, procs: Procs,
                               started: list[subprocess.Popen[str]]) -> None:
    """--min-replicas 1: every job accepted in each queue ends done, once, on the master that
    holds the queue now; each watcher gets one done; refusals were JSON 503s, after the kill;
    the server subscribed to the killed master's queue again; every process lives on."""
    report(name, failover)
    holders = {load.keys.name: failover.master.holder(load.keys) for load in failover.loads}
    try:
        for load in failover.loads:
            await asyncio.to_thread(wait_ended, holders[load.keys.name], load.keys,
                                    list(load.accepted), DRAIN_TIMEOUT,
                                    f"every job accepted in {load.keys.name} to end")
        watchers = [task for load in failover.loads for task in load.watchers.values()]
        streams = await asyncio.wait_for(asyncio.gather(*watchers), 30)
    finally:
        await failover.session.close()
    at = 0
    for load in failover.loads:
        ids = list(load.accepted)
        jobs = check_done_once(holders[load.keys.name], load.keys, ids)
        check_watchers(load, streams[at:at + len(load.watchers)], jobs)
        at += len(load.watchers)
        check_refusals(failover, load)
        print(f"{name} [{load.keys.name}]: {len(ids)} accepted jobs all done once; "
              f"{len(load.watchers)} watchers each got one done; attempts > 1: "
              f"{sum(int(j['attempts']) > 1 for j in jobs.values())}; handlers that finished "
              f"one twice: {ran_twice(procs, started[1:], ids)}")
    killed = failover.loads[0]
    assert killed.refused, "no submit was refused: did the kill land?"
    assert any(when > (failover.rejoined or 0) for when in killed.accepted.values()), \
        "no submit was accepted once the replica was back"
    unconfirmed = sum(procs.log(worker).count("replicas within") for worker in started[1:])
    seconds = resubscribed(procs, started[0], failover, killed.keys)
    print(f"{name}: finishes the workers logged as unconfirmed: {unconfirmed}; the server "
          f"subscribed to {killed.keys.events} again "
          + (f"{seconds:.2f}s after the kill" if seconds is not None else "never"))
    assert seconds is not None, "the server did not subscribe to the killed queue again"
    check_processes(procs, started)


async def count_lost(name: str, failover: Failover, procs: Procs,
                     started: list[subprocess.Popen[str]]) -> dict[str, int]:
    """--min-replicas 0: count and print the accepted jobs of each queue that the master
    holding it now does not have (lost with the killed master's last writes); every other one
    ends done, once; their watchers get one done; refusals were JSON 503s, after the kill; the
    server subscribed to the killed master's queue again; every process lives on. The number
    lost, by queue."""
    report(name, failover)
    holders = {load.keys.name: failover.master.holder(load.keys) for load in failover.loads}
    kept: dict[str, list[str]] = {}
    for load in failover.loads:
        ids = list(load.accepted)
        jobs = jobs_on(holders[load.keys.name], load.keys, ids)
        kept[load.keys.name] = [job_id for job_id, job in jobs.items() if job]
    try:
        for load in failover.loads:
            await asyncio.to_thread(wait_ended, holders[load.keys.name], load.keys,
                                    kept[load.keys.name], DRAIN_TIMEOUT,
                                    f"every job of {load.keys.name} that survived to end")
        streams = {load.keys.name: await asyncio.wait_for(asyncio.gather(
            *(task for job_id, task in load.watchers.items()
              if job_id in set(kept[load.keys.name]))), 30) for load in failover.loads}
    finally:
        for load in failover.loads:  # a lost job's watcher hears nothing more
            for task in load.watchers.values():
                task.cancel()
            await asyncio.gather(*load.watchers.values(), return_exceptions=True)
        await failover.session.close()
    lost = {}
    for load in failover.loads:
        ids, survived = list(load.accepted), set(kept[load.keys.name])
        lost[load.keys.name] = len(ids) - len(survived)
        when = sorted(load.accepted[job_id] - failover.killed for job_id in set(ids) - survived)
        jobs = check_done_once(holders[load.keys.name], load.keys, kept[load.keys.name])
        for stream in streams[load.keys.name]:
            assert [m["status"] for m in stream.messages if m["status"] in TERMINAL] == ["done"]
        check_refusals(failover, load)
        assert any(when > failover.failed_over for when in load.accepted.values()), \
            f"no submit was accepted in {load.keys.name} after the failover"
        print(f"{name} [{load.keys.name}]: lost {lost[load.keys.name]} of {len(ids)} accepted "
              f"jobs" + (f" (accepted from {when[0]:+.3f}s to {when[-1]:+.3f}s of the kill)"
                         if when else "")
              + f"; attempts > 1: {sum(int(j['attempts']) > 1 for j in jobs.values())}; "
                f"handlers that finished one twice: {ran_twice(procs, started[1:], ids)}")
    killed = failover.loads[0].keys
    seconds = resubscribed(procs, started[0], failover, killed)
    print(f"{name}: the server subscribed to {killed.events} again "
          + (f"{seconds:.2f}s after the kill" if seconds is not None else "never"))
    assert seconds is not None, "the server did not subscribe to the killed queue again"
    check_processes(procs, started)
    return lost


# -- over Sentinel -----------------------------------------------------------------------------

@pytest.fixture
def stack(sentinels: Sentinels, procs: Procs) -> Procs:
    """procs whose programs get REDIS_URL=the Sentinels' URL (stopped before the Sentinels)."""
    procs.redis_url = sentinels.url
    return procs


def start_stack(procs: Procs, min_replicas: int, slots: int = 10,
                *worker_args: str) -> tuple[str, list[subprocess.Popen[str]]]:
    """A server and 2 workers (slots each, jobs of 20-50 ms) at --min-replicas."""
    port = free_port()
    server = procs.server(port, "--min-replicas", str(min_replicas))
    workers = [procs.worker("--handler", "handlers:slow", "--lease", "10", "--concurrency",
                            str(slots), "--min-replicas", str(min_replicas), *worker_args)
               for _ in range(2)]
    return f"http://127.0.0.1:{port}", [server, *workers]


async def test_the_core_path_over_sentinel(stack: Procs, sentinels: Sentinels) -> None:
    procs = stack
    base, started = start_stack(procs, 0)
    keys = Keys(procs.prefix)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        ids = []
        for text in DURATIONS:
            async with session.post(f"{base}/submit", json={"input": text}) as response:
                assert response.status == 201, await response.text()
                ids.append((await response.json())["id"])
        stream = await follow(session, base, ids[-1], Load(keys), within=20)
        assert [m["status"] for m in stream.messages][-1] == "done"
        assert stream.close_code == 1000
        await asyncio.to_thread(wait_ended, sentinels.master_server(), keys, ids, 20,
                                "the jobs to end")
        for job_id in ids:
            async with session.get(f"{base}/status", params={"id": job_id}) as response:
                assert response.status == 200
                job = await response.json()
            assert (job["status"], job["result"]) == ("done", job["input"])
    check_processes(procs, started)


async def test_failover_with_min_replicas_1_loses_no_accepted_job(stack: Procs,
                                                                  sentinels: Sentinels) -> None:
    procs = stack
    base, started = start_stack(procs, 1)
    failover = await load_and_kill(SentinelMaster(sentinels), base, [Load(Keys(procs.prefix))],
                                   with_replica_back=True)
    await no_accepted_job_lost("min-replicas 1", failover, procs, started)


async def test_failover_with_min_replicas_0_may_lose_the_last_writes(
        stack: Procs, sentinels: Sentinels) -> None:
    procs = stack
    base, started = start_stack(procs, 0)
    failover = await load_and_kill(SentinelMaster(sentinels), base, [Load(Keys(procs.prefix))],
                                   with_replica_back=False)
    await count_lost("min-replicas 0", failover, procs, started)


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
    assert all(NOT_CONFIRMED in error for _, error in answers), \
        collections.Counter(error for _, error in answers)


# -- over a cluster ----------------------------------------------------------------------------

def two_queues(cluster: Cluster, prefix: str) -> tuple[Keys, Keys]:
    """Two queues whose slots are on different masters (the prefix is each test's own, so
    where its queues land differs from test to test)."""
    first = Keys(prefix, "q0")
    owner = cluster.master_of(first.queue)
    for n in range(1, 100):
        second = Keys(prefix, f"q{n}")
        if cluster.master_of(second.queue) is not owner:
            return first, second
    raise LookupError(f"no queue of {prefix} away from {owner}")


def cluster_load(cluster: Cluster, procs: Procs,
                 min_replicas: int) -> tuple[str, list[subprocess.Popen[str]], list[Load]]:
    """A server, and 2 workers taking from both queues of two_queues (10 slots on each)."""
    loads = [Load(keys) for keys in two_queues(cluster, procs.prefix)]
    base, started = start_stack(procs, min_replicas, 20,
                                "--queues", ",".join(load.keys.name for load in loads))
    return base, started, loads


async def test_cluster_failover_with_min_replicas_1_loses_no_accepted_job(
        cluster_stack: Procs, cluster: Cluster) -> None:
    procs = cluster_stack
    base, started, loads = cluster_load(cluster, procs, 1)
    killed = loads[0]

    def refused_unconfirmed(failed_over: float) -> bool:
        """The killed queue's submits sent once its new master served (it has no replica)
        were refused: SUBMITTERS of them."""
        return sum(NOT_CONFIRMED in a.body for a in killed.refused
                   if a.sent > failed_over) >= SUBMITTERS

    failover = await load_and_kill(ClusterMaster(cluster, killed.keys), base, loads,
                                   with_replica_back=True, before_rejoin=refused_unconfirmed)
    assert failover.rejoin_began is not None
    # Until the old master was back, its queue accepted nothing sent once the replica had
    # taken over: the one replica it had was the promoted one.
    accepted = [job_id for job_id, sent in killed.sent.items()
                if failover.failed_over < sent and killed.accepted[job_id] < failover.rejoin_began]
    assert accepted == [], "accepted with no replica to confirm it"
    await no_accepted_job_lost("cluster, min-replicas 1", failover, procs, started)


async def test_cluster_failover_with_min_replicas_0_may_lose_the_last_writes(
        cluster_stack: Procs, cluster: Cluster) -> None:
    procs = cluster_stack
    base, started, loads = cluster_load(cluster, procs, 0)
    failover = await load_and_kill(ClusterMaster(cluster, loads[0].keys), base, loads,
                                   with_replica_back=False)
    lost = await count_lost("cluster, min-replicas 0", failover, procs, started)
    assert lost[loads[1].keys.name] == 0, "a queue whose master lived lost jobs"


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
