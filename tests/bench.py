"""Benchmark: this job queue against arq, RQ and SAQ, on one machine, in one run.

    python3 -m pip install '.[bench]' && python3 tests/bench.py [--jobs 10000]

Starts its own redis-server (persistence off) on a free port and prints one table. Every
system runs the same job (upper-case a string) against the same Redis, flushed between runs.
- enqueue/s: jobs accepted per second with no worker running (ours: HTTP POST /submit from 64
  concurrent submitters; peers: their own enqueue API, 64 at a time where it is async);
- drain: N jobs already queued, 1 or 2 worker processes (peers at their default concurrency),
  from the first job done to the last;
- end to end: workers running, N jobs enqueued (ours over HTTP, 64 at a time), from the first
  enqueue to the last job done;
- ceiling: a redis-py loop on one connection doing per job the Redis work of a reliable
  queue (LPUSH; then BLMOVE, HSET, LREM, PUBLISH);
- latency: 500 sequential submit → WebSocket `done`, p50 and p99;
- fan-out: W WebSocket watchers of one job on one server: time to connect them, time from the
  worker's publish to the last watcher hearing it, server RSS per watcher.
Not collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from worker import Keys  # noqa: E402

KEYS = Keys()
PEERS = ("arq", "rq", "saq")


def upper(text: str) -> str:
    return text.upper()


async def upper_async(ctx: Any, text: str) -> str:  # arq and SAQ call (ctx, *args)
    return text.upper()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 600.0, step: float = 0.002) -> float:
    """Poll until predicate() is truthy; return the time.perf_counter() when it was."""
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise SystemExit(f"bench: timed out waiting for {predicate}")
        time.sleep(step)
    return time.perf_counter()


# -- peer workers: `bench.py --peer-worker NAME --port P` runs one in this process ---------------

def run_peer_worker(name: str, port: int) -> None:
    if name == "rq":
        from rq import Queue, SimpleWorker
        conn = redis.Redis(port=port)
        SimpleWorker([Queue(connection=conn)], connection=conn).work(logging_level="WARNING")
    elif name == "arq":
        from arq.connections import RedisSettings
        from arq.worker import func, run_worker

        run_worker({"functions": [func(upper_async, name="upper")],
                    "redis_settings": RedisSettings(port=port)})
    elif name == "saq":
        from saq import Queue, Worker

        async def main() -> None:
            worker = Worker(Queue.from_url(f"redis://127.0.0.1:{port}"),
                            functions=[("upper", upper_async)])
            await worker.start()
        asyncio.run(main())


class Peer:
    """Enqueue and count through a peer's own API."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port

    async def enqueue(self, texts: list[str]) -> None:
        if self.name == "rq":
            from rq import Queue
            queue = Queue(connection=redis.Redis(port=self.port))
            for text in texts:  # RQ's API is synchronous
                queue.enqueue("bench.upper", text)
        elif self.name == "arq":
            from arq import create_pool
            from arq.connections import RedisSettings
            pool = await create_pool(RedisSettings(port=self.port))
            await in_batches(texts, lambda text: pool.enqueue_job("upper", text))
            await pool.aclose()
        else:
            from saq import Queue
            saq_queue = Queue.from_url(f"redis://127.0.0.1:{self.port}")
            await in_batches(texts, lambda text: saq_queue.enqueue("upper", text=text))
            await saq_queue.disconnect()

    def remaining(self, r: redis.Redis) -> int:
        """Jobs not yet finished, read from the peer's own keys."""
        if self.name == "rq":
            return int(r.llen("rq:queue:default")) + int(r.zcard("rq:wip:default"))
        if self.name == "arq":
            return int(r.zcard("arq:queue"))
        return int(r.zcard("saq:default:incomplete"))

    def start_workers(self, count: int) -> list[subprocess.Popen[bytes]]:
        return [subprocess.Popen([sys.executable, __file__, "--peer-worker", self.name,
                                  "--port", str(self.port)], stderr=subprocess.DEVNULL)
                for _ in range(count)]


class Ours:
    def __init__(self, port: int, http_port: int) -> None:
        self.name, self.port, self.base = "ours", port, f"http://127.0.0.1:{http_port}"
        self.env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}

    async def enqueue(self, texts: list[str]) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            async def submit(text: str) -> None:
                async with session.post(f"{self.base}/submit", json={"input": text}) as resp:
                    assert resp.status == 201
            await in_batches(texts, submit)

    def remaining(self, r: redis.Redis) -> int:
        with r.pipeline(transaction=False) as pipe:
            pipe.llen(KEYS.queue)
            for name in r.smembers(KEYS.workers):
                pipe.llen(KEYS.processing(str(name)))
            return sum(pipe.execute())

    def start_workers(self, count: int) -> list[subprocess.Popen[bytes]]:
        return [subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=self.env,
                                 stderr=subprocess.DEVNULL) for _ in range(count)]

    def start_server(self) -> subprocess.Popen[bytes]:
        port = int(self.base.rsplit(":", 1)[1])
        proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port)],
                                env=self.env, stderr=subprocess.DEVNULL)
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
        return proc


async def in_batches(items: list[str], call: Callable[[str], Any], width: int = 64) -> None:
    """Run call(item) for every item, `width` at a time."""
    iterator = iter(items)

    async def lane() -> None:
        for item in iterator:
            await call(item)
    await asyncio.gather(*(lane() for _ in range(width)))


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def measure(system: Any, r: redis.Redis, n: int) -> dict[str, float]:
    """enqueue/s, drain and end-to-end jobs/s with 1 and 2 worker processes."""
    texts = [f"job {i}" for i in range(n)]
    out: dict[str, float] = {}
    r.flushall()
    began = time.perf_counter()
    asyncio.run(system.enqueue(texts))
    out["enqueue"] = n / (time.perf_counter() - began)
    for workers in (1, 2):
        if workers == 2:  # the first pass queued them already
            r.flushall()
            asyncio.run(system.enqueue(texts))
        procs = system.start_workers(workers)

        def left(procs: list[subprocess.Popen[bytes]] = procs) -> int:
            if any(proc.poll() is not None for proc in procs):
                raise SystemExit(f"bench: a {system.name} worker exited; see it run alone with "
                                 "--peer-worker NAME --port PORT")
            return int(system.remaining(r))

        first = wait_for(lambda: left() < n)
        last = wait_for(lambda: left() == 0)
        out[f"drain{workers}"] = (n - 1) / (last - first)
        r.flushall()
        asyncio.run(system.enqueue(["warm up"]))
        wait_for(lambda: left() == 0)
        began = time.perf_counter()
        asyncio.run(system.enqueue(texts))
        last = wait_for(lambda: left() == 0)
        out[f"e2e{workers}"] = n / (last - began)
        stop(procs)
    return out


def ceiling(r: redis.Redis, n: int) -> float:
    r.flushall()
    for i in range(n):
        r.lpush("q", f"{i:032x}")
    began = time.perf_counter()
    for _ in range(n):
        job_id = str(r.blmove("q", "p", 1, "RIGHT", "LEFT"))
        r.hset(f"job:{job_id}", mapping={"status": "done", "result": "X"})
        r.lrem("p", 1, job_id)
        r.publish("events", job_id)
    return n / (time.perf_counter() - began)


async def latency(ours: Ours, count: int = 500) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            began = time.perf_counter()
            async with session.post(f"{ours.base}/submit", json={"input": f"l{i}"}) as resp:
                job_id = (await resp.json())["id"]
            async with session.ws_connect(f"{ours.base}/ws", params={"id": job_id}) as ws:
                async for message in ws:
                    if json.loads(message.data)["status"] == "done":
                        times.append(time.perf_counter() - began)
    return times


async def fan_out(ours: Ours, server_pid: int, watchers: int) -> dict[str, float]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rss_before = psutil.Process(server_pid).memory_info().rss
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"{ours.base}/submit", json={"input": "fan"}) as resp:
            job_id = (await resp.json())["id"]
        began = time.perf_counter()
        sockets = await asyncio.gather(*(session.ws_connect(f"{ours.base}/ws",
                                                            params={"id": job_id})
                                         for _ in range(watchers)))
        await asyncio.gather(*(ws.receive_json() for ws in sockets))  # the first state
        connected = time.perf_counter() - began
        rss_per_watcher = (psutil.Process(server_pid).memory_info().rss - rss_before) / watchers

        heard: list[float] = []

        async def hear(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for message in ws:
                if json.loads(message.data)["status"] == "done":
                    heard.append(time.time())
                    updated = json.loads(message.data)["updated"]
                    published.append(datetime.fromisoformat(updated).timestamp())

        published: list[float] = []
        listeners = [asyncio.create_task(hear(ws)) for ws in sockets]
        workers = ours.start_workers(1)
        await asyncio.gather(*listeners)
        stop(workers)
    assert len(heard) == watchers
    return {"connect": connected, "last": max(heard) - published[0], "rss": rss_per_watcher}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="N (default %(default)s)")
    parser.add_argument("--watchers", type=int, default=10_000,
                        help="WebSocket watchers for fan-out (default %(default)s)")
    parser.add_argument("--only", choices=("ours", *PEERS), help="measure one system only")
    parser.add_argument("--peer-worker", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_worker:
        return run_peer_worker(args.peer_worker, args.port)

    port, folder = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", folder,
                                   "--logfile", os.path.join(folder, "redis.log")])
    r = redis.Redis(port=port, decode_responses=True)
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
    ours = Ours(port, free_port())
    server = ours.start_server()
    rows = []
    try:
        candidates: list[Ours | Peer] = [ours, *(Peer(p, port) for p in PEERS)]
        systems = [s for s in candidates if args.only in (None, s.name)]
        for system in systems:
            print(f"bench: {system.name} ...", file=sys.stderr, flush=True)
            rows.append((system.name, measure(system, r, args.jobs)))
        r.flushall()
        worker_proc = ours.start_workers(1)
        asyncio.run(ours.enqueue(["warm up"]))
        wait_for(lambda: ours.remaining(r) == 0)
        print("bench: latency, fan-out ...", file=sys.stderr, flush=True)
        lat = sorted(asyncio.run(latency(ours)))
        worker_rss = psutil.Process(worker_proc[0].pid).memory_info().rss
        stop(worker_proc)
        fan = asyncio.run(fan_out(ours, server.pid, args.watchers))
        server_rss = psutil.Process(server.pid).memory_info().rss
        top = ceiling(r, args.jobs)
        version = r.info("server")["redis_version"]
    finally:
        stop([server, redis_proc])
    print(f"\njobs/s, N = {args.jobs:,}, {os.cpu_count()} cores, redis-server {version}, "
          f"Python {sys.version.split()[0]}")
    print(f"{'system':8} {'enqueue':>9} {'drain 1w':>9} {'drain 2w':>9} {'e2e 1w':>9} "
          f"{'e2e 2w':>9}")
    for name, m in rows:
        print(f"{name:8} " + " ".join(f"{m[k]:9,.0f}" for k in
                                      ("enqueue", "drain1", "drain2", "e2e1", "e2e2")))
    print(f"\nceiling (one connection, LPUSH; BLMOVE HSET LREM PUBLISH): {top:,.0f} jobs/s")
    print(f"latency submit→done over WebSocket, 500 sequential: p50 "
          f"{statistics.median(lat) * 1000:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms")
    print(f"fan-out, {args.watchers:,} watchers of one job: connect {fan['connect']:.2f} s, "
          f"publish→last heard {fan['last'] * 1000:.0f} ms, "
          f"server RSS {fan['rss'] / 1024:.1f} KiB/watcher")
    print(f"RSS: worker {worker_rss / 2**20:.1f} MiB, server {server_rss / 2**20:.1f} MiB "
          f"(after fan-out)")


if __name__ == "__main__":
    main()
