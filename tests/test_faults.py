"""Fault injection: real processes against real redis-server instances of the tests' own, killed,
restarted, paused and flooded, checking that the README's guarantees hold. The longest tests
are marked `slow` (skip them with -m "not slow"); CI runs them all.

Scenarios tested elsewhere: a server restart under a waiting client
(test_client.py::test_client_survives_a_server_restart), run_all.sh stopped and broken every
way (test_run_all.py), warm and cold worker stops (test_worker.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from store import Keys
from tests.conftest import (
    Procs,
    RedisServer,
    Subscription,
    delete_prefix,
    enqueue,
    free_port,
    fuzz,
    plain,
    processing_keys,
    wait_until,
)

Stack = tuple[Procs, RedisServer, redis.Redis, str]


@pytest.fixture
def stack(own_redis: RedisServer, prefix: str, tmp_path: Path) -> Iterator[Stack]:
    """Procs, the Redis they use, a client of it, and the key prefix."""
    procs = Procs(own_redis.url, prefix, tmp_path)
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    yield procs, own_redis, client, prefix
    procs.stop_all()
    client.close()


def statuses(r: redis.Redis, prefix: str, ids: list[str]) -> list[dict[str, str]]:
    with r.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hgetall(Keys(prefix).job(job_id))
        return pipe.execute()


def all_done(r: redis.Redis, prefix: str, ids: list[str]) -> bool:
    return all(job.get("status") == "done" for job in statuses(r, prefix, ids))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# The fault tests that involve workers run with one slot per worker, and with ten.
concurrency = pytest.mark.parametrize("concurrency", [1, 10])


async def read_all(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Every message until the server closes the stream."""
    return [json.loads(m.data) async for m in ws if m.type is aiohttp.WSMsgType.TEXT]


async def watch(session: aiohttp.ClientSession, base: str, job_id: str) -> list[dict[str, Any]]:
    """Follow one job over the WebSocket until the server closes the stream."""
    async with session.ws_connect(f"{base}/ws", params={"id": job_id}) as ws:
        return await read_all(ws)


# 1 -----------------------------------------------------------------------------------------------

@pytest.mark.slow
@concurrency
def test_workers_killed_under_load(stack: Stack, concurrency: int) -> None:
    procs, _, r, prefix = stack
    events = Subscription(r, Keys(prefix).events)
    ids = {enqueue(r, prefix, f"job {i}"): f"JOB {i}" for i in range(1200 * concurrency)}
    spawn = lambda: procs.worker("--handler", "handlers:pause", "--lease", "2.5",  # noqa: E731
                                 "--concurrency", str(concurrency))
    workers = [spawn() for _ in range(3)]
    rng, kills, deadline = random.Random(7), 0, time.monotonic() + 180
    while not all_done(r, prefix, list(ids)):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(rng.uniform(0.5, 1.0))  # the kill rhythm, not a wait for a result
        victim = rng.choice(workers)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        workers[workers.index(victim)] = spawn()
        kills += 1
    assert kills >= 3
    done = events.done(timeout=1)
    events.close()
    jobs = statuses(r, prefix, list(ids))
    assert [job["result"] for job in jobs] == list(ids.values())
    assert done == dict.fromkeys(ids, 1), "some job was recorded done more than once, or never"
    assert max(int(job["attempts"]) for job in jobs) >= 2, "no job was retried"
    wait_until(lambda: not processing_keys(r, prefix), timeout=10, what="processing lists to empty")
    assert r.llen(Keys(prefix).queue) == 0


# 2 -----------------------------------------------------------------------------------------------

@pytest.mark.slow
@concurrency
async def test_redis_restarts_lose_nothing(stack: Stack, concurrency: int) -> None:
    procs, own_redis, r, prefix = stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = procs.server(port)
    workers = [procs.worker("--handler", "handlers:slow", "--concurrency", str(concurrency))
               for _ in range(2)]
    ids = [enqueue(r, prefix, "0.05") for _ in range(300 * concurrency)]
    async with aiohttp.ClientSession() as session:
        # Connected before the restarts (one that connects while Redis is down gets a 503).
        sockets = await asyncio.gather(*(session.ws_connect(f"{base}/ws", params={"id": job_id})
                                         for job_id in ids[::10 * concurrency]))
        watchers = [asyncio.create_task(read_all(ws)) for ws in sockets]
        for enough in (50 * concurrency, 150 * concurrency):  # restart twice: jobs queued,
            # running and done
            await asyncio.to_thread(wait_until, lambda n=enough: sum(
                j["status"] == "done" for j in statuses(r, prefix, ids)) > n)
            own_redis.stop(signal.SIGTERM)
            own_redis.start()  # same port, same AOF folder
        await asyncio.to_thread(wait_until, lambda: all_done(r, prefix, ids), 120)
        streams = await asyncio.wait_for(asyncio.gather(*watchers), 60)
    assert all(stream[-1]["status"] == "done" for stream in streams)
    assert [p.poll() for p in (server, *workers)] == [None, None, None]
    assert not processing_keys(r, prefix)
    assert r.llen(Keys(prefix).queue) == 0


# 3 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("concurrency", "handler"), [
    (1, "handlers:slow"), (10, "handlers:slow"), (10, "handlers:asleep")])
async def test_redis_outage_gives_503_and_nothing_spins(stack: Stack, concurrency: int,
                                                        handler: str) -> None:
    procs, own_redis, r, prefix = stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = procs.server(port)
    worker = procs.worker("--handler", handler, "--concurrency", str(concurrency))
    ids = [enqueue(r, prefix, "1") for _ in range(concurrency)]  # every slot busy
    wait_until(lambda: all(job["status"] == "running" for job in statuses(r, prefix, ids)))
    assert own_redis.proc is not None
    outage = 6.0
    cpu = {p.pid: cpu_seconds(p.pid) for p in (server, worker)}
    os.kill(own_redis.proc.pid, signal.SIGSTOP)  # hung, not gone: connections just wait
    began = time.monotonic()
    try:
        # The handler ends during the outage; its result must be recorded afterwards.
        timeout = aiohttp.ClientTimeout(total=15)  # a hang detector, not a speed requirement
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for method, path, body in [("POST", "/submit", {"input": "x"}),
                                       ("GET", f"/status?id={ids[0]}", None),
                                       ("GET", "/healthz", None)]:
                async with session.request(method, base + path, json=body) as response:
                    assert response.status == 503, path
                    assert "unavailable" in (await response.json())["error"]
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - began)))  # the outage itself
        for pid, before in cpu.items():
            assert cpu_seconds(pid) - before < outage / 3, f"pid {pid} spun during the outage"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    wait_until(lambda: all_done(r, prefix, ids), 30)  # each result held through the outage
    assert [p.poll() for p in (server, worker)] == [None, None]
    async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as response:
        assert response.status == 200


# 4 -----------------------------------------------------------------------------------------------

async def test_lost_subscriptions_lose_no_terminal_message(stack: Stack) -> None:
    procs, _, r, prefix = stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.server(port)
    ids = [enqueue(r, prefix, f"job {i}") for i in range(200)]
    async with aiohttp.ClientSession() as session:
        watchers = [asyncio.create_task(watch(session, base, job_id)) for job_id in ids]
        for _ in range(2):  # one job at a time each: slow enough for many kills meanwhile
            procs.worker("--handler", "handlers:pause", "--concurrency", "1")
        kills = 0
        while not all(w.done() for w in watchers):
            kills += r.client_kill_filter(_type="pubsub")
            await asyncio.sleep(0.02)
        streams = [w.result() for w in watchers]
    assert kills > 5
    assert [s[-1]["result"] for s in streams] == [f"JOB {i}" for i in range(200)]


# 7 -----------------------------------------------------------------------------------------------

def test_a_deaf_handler_still_lets_the_worker_stop(stack: Stack) -> None:
    procs, _, r, prefix = stack
    job_id = enqueue(r, prefix, "x")
    worker = procs.worker("--handler", "handlers:stubborn", "--grace", "60")
    wait_until(lambda: statuses(r, prefix, [job_id])[0]["status"] == "running")
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: "finishing the jobs running" in procs.log(worker))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 1
    assert statuses(r, prefix, [job_id])[0]["status"] == "queued"
    assert r.lrange(Keys(prefix).queue, 0, -1) == [job_id]


# 8 -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lone_server(tmp_path_factory: pytest.TempPathFactory,
                single_redis_url: str) -> Iterator[tuple[Procs, Any, str, redis.Redis, str]]:
    """One server for all the examples hypothesis draws (no worker: jobs stay queued)."""
    prefix = f"{{fuzz-{os.getpid()}}}"
    procs = Procs(single_redis_url, prefix, tmp_path_factory.mktemp("fuzz"))
    port = free_port()
    server = procs.server(port)
    client = redis.Redis.from_url(single_redis_url, decode_responses=True)
    yield procs, server, f"http://127.0.0.1:{port}", client, prefix
    procs.stop_all()
    delete_prefix(client, prefix)
    client.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


@fuzz
@given(body=st.binary(max_size=300))
def test_fuzz_submit_bytes(lone_server: Any, body: bytes) -> None:
    assert plain(lone_server[2], "POST", "/submit", body)[0] in (201, 400)


@fuzz
@given(value=json_values | st.dictionaries(st.just("input"), json_values, min_size=1))
def test_fuzz_submit_json(lone_server: Any, value: Any) -> None:
    body = json.dumps(value).encode()
    assert plain(lone_server[2], "POST", "/submit", body)[0] in (201, 400)


@fuzz
@given(job_id=st.text(max_size=40))
def test_fuzz_ids(lone_server: Any, job_id: str) -> None:
    from urllib.parse import quote
    for path in ("/status", "/events", "/ws"):
        status, _ = plain(lone_server[2], "GET", f"{path}?id={quote(job_id)}")
        assert status in ((400,) if not job_id else (404, 400)), (path, job_id, status)


@fuzz
@given(frames=st.lists(st.binary(max_size=64) | st.text(max_size=64), max_size=5))
def test_fuzz_websocket_frames(lone_server: Any, frames: list[bytes | str]) -> None:
    _, _, base, r, prefix = lone_server
    job_id = enqueue(r, prefix, "fuzz")

    async def send() -> None:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{base}/ws", params={"id": job_id}) as ws:
            assert (await ws.receive_json(timeout=5))["status"] == "queued"
            for frame in frames:
                await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            await ws.ping()

    asyncio.run(send())


def test_fuzzing_left_no_trace(lone_server: Any) -> None:
    """Runs after the fuzz tests (file order): no traceback, no half-written job."""
    procs, server, _, r, prefix = lone_server
    log = procs.log(server)
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    keys = Keys(prefix)
    jobs = [k for k in r.scan_iter(match=keys.job("*"))]
    assert r.llen(keys.queue) == len(jobs)
    for key in jobs:
        assert set(r.hkeys(key)) >= {"id", "input", "status", "result", "created", "version"}


# 9 -----------------------------------------------------------------------------------------------

@pytest.mark.slow
async def test_many_and_slow_watchers(stack: Stack) -> None:
    procs, _, r, prefix = stack
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20_000)), hard))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = procs.server(port)
    job_id = enqueue(r, prefix, "x" * 200_000)  # big results fill the slow watchers' buffers
    deaf = []
    for _ in range(500):  # WebSocket handshakes that never read a byte after
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /ws?id={job_id} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        deaf.append(sock)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        await follow_many(base, job_id, procs, server.pid, connector)
    finally:
        for sock in deaf:
            sock.close()


async def follow_many(base: str, job_id: str, procs: Procs, server_pid: int,
                      connector: aiohttp.TCPConnector) -> None:
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = await asyncio.gather(*(session.ws_connect(f"{base}/ws", params={"id": job_id})
                                         for _ in range(4500)))
        firsts = await asyncio.gather(*(ws.receive_json(timeout=30) for ws in sockets))
        assert {m["status"] for m in firsts} == {"queued"}
        rss_before = rss_bytes(server_pid)
        procs.worker()
        ends = await asyncio.wait_for(asyncio.gather(*map(read_all, sockets)), 60)
        assert all(end[-1]["status"] == "done" for end in ends)
        growth = rss_bytes(server_pid) - rss_before
    # Each deaf watcher may hold its last message and a write buffer; nothing more.
    assert growth < 500 * 2 * 420_000 + 50_000_000, f"server grew by {growth} bytes"


# 10 ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finished_jobs_expire_and_nothing_grows(stack: Stack) -> None:
    procs, _, r, prefix = stack
    with r.pipeline(transaction=False) as pipe:
        for i in range(10_000):
            pipe.hset(Keys(prefix).job(f"{i:032x}"),
                      mapping={"id": f"{i:032x}", "input": "a", "status": "queued", "version": 1})
            pipe.lpush(Keys(prefix).queue, f"{i:032x}")
        pipe.execute()
    procs.worker("--retention", "2")
    procs.worker("--retention", "2")
    wait_until(lambda: r.llen(Keys(prefix).queue) == 0, 120, what="the queue to drain")
    # After the retention, what is left is the two workers' bookkeeping, the registry of
    # queues, the totals, the run-time histogram and the last hour's per-minute counts (at most
    # two minutes here).
    def kinds() -> list[str]:
        return sorted(k.split(":")[1] for k in r.scan_iter(match=f"{prefix}:*"))

    wait_until(lambda: not {"job", "index"} & set(kinds()), 30, what="finished jobs to expire")
    left = kinds()
    assert [k for k in left if k != "minute"] == ["counters", "lease", "lease", "queues",
                                                  "runtime", "workers"]
    assert 1 <= left.count("minute") <= 2


# 11 ----------------------------------------------------------------------------------------------
# Streams end cleanly, seen by clients that are not ours.

@pytest.fixture
def done_jobs(procs: Procs, r: redis.Redis, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """A server (its address) and 50 jobs a worker has finished."""
    port = free_port()
    procs.server(port)
    ids = [enqueue(r, prefix, f"job {i}") for i in range(50)]
    procs.worker()
    wait_until(lambda: all_done(r, prefix, ids), what="the jobs to be done")
    yield f"127.0.0.1:{port}", ids


def test_a_watcher_reading_in_its_own_task_sees_close_1000(
        done_jobs: tuple[str, list[str]]) -> None:
    """The report's client: each watcher in its own event loop and session, reading in a task of
    its own (as asyncio.wait_for does). The server used to drop the connection before the
    watcher's close reply, which aiohttp's client then reported as 1006 about half the time."""
    address, ids = done_jobs

    async def watch(job_id: str) -> tuple[list[str], int | None]:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"ws://{address}/ws", params={"id": job_id}) as ws:
            statuses = await asyncio.wait_for(read_all(ws), 20)
        return [m["status"] for m in statuses], ws.close_code

    seen = [asyncio.run(watch(job_id)) for job_id in ids]
    assert seen == [(["done"], 1000)] * len(ids)


class RawWebSocket:
    """A WebSocket client on a bare socket: it sees exactly what the server puts on the wire."""

    def __init__(self, address: str, path: str) -> None:
        host, port = address.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        head = self.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def read_until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(end)
        return head

    def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the server (unmasked): (opcode, payload)."""
        first, second = self.read_exactly(2)
        size = second & 0x7F
        if size >= 126:
            size = int.from_bytes(self.read_exactly(2 if size == 126 else 8), "big")
        return first & 0x0F, self.read_exactly(size)

    def send_close(self, code: int) -> None:
        payload, mask = code.to_bytes(2, "big"), os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + masked)

    def closed_by_peer(self) -> bool:
        """True if the server has closed the connection (EOF waiting), without blocking."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # nothing to read: still open
            return False
        finally:
            self.sock.settimeout(10)


def test_the_server_closes_with_1000_and_waits_for_the_close_reply(
        done_jobs: tuple[str, list[str]]) -> None:
    """The closing handshake of RFC 6455: the server sends close 1000, then waits for the
    client's close frame before it drops the connection, even from a client slow to answer."""
    address, ids = done_jobs
    for job_id in ids[:10]:
        ws = RawWebSocket(address, f"/ws?id={job_id}")
        try:
            opcode, payload = ws.frame()
            assert (opcode, json.loads(payload)["status"]) == (0x1, "done")
            opcode, payload = ws.frame()
            assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, 1000)
            time.sleep(0.2)  # a client slow to answer, not a wait for the server
            assert not ws.closed_by_peer(), "the server dropped the connection before our reply"
            ws.send_close(1000)
            assert ws.sock.recv(1) == b"", "the server did not close after the handshake"
        finally:
            ws.sock.close()


@pytest.mark.slow
async def test_closed_websockets_do_not_stay_in_memory(stack: Stack) -> None:
    """20,000 jobs submitted and followed over /ws to `done`, 64 at a time: once the first
    rounds have warmed the server up, its RSS stays flat. Each closed socket used to stay in
    memory until its (re-armed) 30 s heartbeat timer fired: about 7 MB more per 1,000."""
    procs, _, _, _ = stack
    port = free_port()
    base = f"127.0.0.1:{port}"
    server = procs.server(port)
    for _ in range(2):
        procs.worker()
    limit = asyncio.Semaphore(64)

    async def one(session: aiohttp.ClientSession) -> str:
        async with limit:
            async with session.post(f"http://{base}/submit", json={"input": "x"}) as response:
                job_id = (await response.json())["id"]
            async with session.ws_connect(f"ws://{base}/ws", params={"id": job_id}) as ws:
                return str((await read_all(ws))[-1]["status"])

    rss = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(5):
            ends = await asyncio.wait_for(
                asyncio.gather(*(one(session) for _ in range(4000))), 120)
            assert set(ends) == {"done"}
            rss.append(rss_bytes(server.pid))
    mib = [round(b / 2**20, 1) for b in rss]
    print(f"server RSS after each round of 4,000 watched jobs: {mib} MiB")
    assert max(rss[2:]) - rss[1] < 16 * 2**20, f"the server kept growing: {mib} MiB"


# 12 ----------------------------------------------------------------------------------------------
# When Redis says no. Each refusal below starts while every slot of two workers runs a job and
# twenty more are queued, and ends once the workers have met it.

def fill_up(r: redis.Redis, own_redis: RedisServer, procs: Procs) -> Callable[[], None]:
    """A full memory: a small maxmemory with noeviction, filled to the brim; then maxmemory
    lowered a little below what is used, so that a few bytes freed do not open it again."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 2**22)
    for i in range(10_000):
        try:
            r.set(f"filler:{i}", "x" * 65536)
        except redis.exceptions.OutOfMemoryError:
            break
    else:
        pytest.fail("Redis never filled up")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 2**19)

    def allow() -> None:
        r.delete(*r.keys("filler:*"))
        r.config_set("maxmemory", 0)
    return allow


def no_replicas(r: redis.Redis, own_redis: RedisServer, procs: Procs) -> Callable[[], None]:
    """Every write refused with NOREPLICAS: one replica is required, and there is none."""
    r.config_set("min-replicas-to-write", 1)

    def allow() -> None:
        r.config_set("min-replicas-to-write", 0)
    return allow


def demoted(r: redis.Redis, own_redis: RedisServer, procs: Procs) -> Callable[[], None]:
    """Demoted with REPLICAOF to a replica of a second Redis that holds the same data (every
    write READONLY), then promoted back."""
    (procs.tmp / "other").mkdir()
    other = RedisServer(procs.tmp / "other")
    other.start()
    assert other.proc is not None
    procs.started.append(other.proc)  # stopped by pid at teardown
    o = redis.Redis(port=other.port, decode_responses=True)
    o.replicaof("127.0.0.1", own_redis.port)
    wait_until(lambda: o.info("replication")["master_link_status"] == "up")
    r.client_pause(10_000, all=False)  # writes wait (not fail) while the roles change
    wait_until(lambda: o.info("replication")["master_repl_offset"]
               == r.info("replication")["master_repl_offset"], what="the replica to catch up")
    o.replicaof("NO", "ONE")
    r.replicaof("127.0.0.1", other.port)
    r.client_unpause()
    wait_until(lambda: r.info("replication")["master_link_status"] == "up")

    def allow() -> None:
        r.replicaof("NO", "ONE")
        o.close()
    return allow


@pytest.mark.parametrize(("refuse", "status", "words", "logged"), [
    (fill_up, 507, "the job store is full", "redis is full"),
    (no_replicas, 503, "NOREPLICAS", "redis refused a command (NOREPLICAS"),
    (demoted, 503, "READONLY", "READONLY"),
], ids=["full", "noreplicas", "readonly"])
@concurrency
async def test_when_redis_says_no_nothing_crashes_and_nothing_is_lost(
        stack: Stack, refuse: Callable[..., Callable[[], None]], status: int, words: str,
        logged: str, concurrency: int) -> None:
    procs, own_redis, r, prefix = stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gate = procs.tmp / "gate"
    server = procs.server(port)
    workers = [procs.worker("--handler", "handlers:gate", "--concurrency", str(concurrency))
               for _ in range(2)]
    async with aiohttp.ClientSession() as session:

        async def submit() -> tuple[int, dict[str, Any]]:
            async with session.post(f"{base}/submit", json={"input": str(gate)}) as response:
                return response.status, await response.json()

        running = [(await submit())[1]["id"] for _ in range(2 * concurrency)]  # every slot
        await asyncio.to_thread(wait_until, lambda: all(
            job["status"] == "running" for job in statuses(r, prefix, running)))
        queued = [(await submit())[1]["id"] for _ in range(20)]
        allow = refuse(r, own_redis, procs)

        refused = [await submit() for _ in range(5)]
        assert [code for code, _ in refused] == [status] * 5
        assert all(words in body["error"] for _, body in refused), refused
        async with session.get(f"{base}/healthz") as response:
            health = await response.json()
        assert response.status == 200 and "refuses writes" in health["redis"], health

        gate.touch()  # the running jobs end now, while Redis refuses
        # A full Redis still takes finished jobs (they free memory); a refusing one takes
        # nothing, and the workers hold their results until it does. (A slot that finished
        # first meets the refusal when it asks for the next job, so wait for both.)
        expected = {"done"} if refuse is fill_up else {"running"}
        await asyncio.to_thread(wait_until, lambda: all(
            logged in procs.log(w) for w in workers) and (expected == {"running"} or {
                job["status"] for job in statuses(r, prefix, running)} == expected),
            what="both workers to meet the refusal")
        ends = [job["status"] for job in statuses(r, prefix, running)]
        assert set(ends) == expected
        assert r.llen(Keys(prefix).queue) == 20  # no new job was taken meanwhile
        allow()

        accepted = running + queued
        await asyncio.to_thread(wait_until, lambda: all_done(r, prefix, accepted), 60)
    assert [p.poll() for p in (server, *workers)] == [None] * 3
    assert len(list(r.scan_iter(match=Keys(prefix).job("*")))) == len(accepted)  # none half-done
    for proc in (server, *workers):
        assert "Traceback" not in procs.log(proc), procs.log(proc)
