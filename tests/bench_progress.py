"""Benchmark of live progress and output (issue 17): how late a piece reaches a watcher, and
what streaming costs a handler.

    python3 tests/bench_progress.py [--rounds 3]

Starts its own redis-server (persistence off) on a free port, a server and one worker (with
the handlers of tests/handlers.py), on an otherwise idle machine, and prints:

- latency, piece → watcher: the handler `paced` emits pieces each holding the time.time() it
  was emitted at; a WebSocket watcher of the job (after=0) notes when each message arrives, and
  each piece in it counts (pieces given close together arrive merged). Steady: 400 pieces one
  every 10 ms (a batch every 50 ms carries 5); sparse: 40 pieces one every 200 ms (each
  written at once). p50, p99, max. Same machine, so one clock.
- 20,000 tokens: the handler `tokens` makes 20,000 tokens, each with about 50 us of work,
  and emits them one at a time (`ctx.emit`), or returns them joined at once; the try's run
  time (its `running` state's `updated` to its `done` one), median of --rounds, and the ratio.

Not collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on {port}")
        time.sleep(0.02)


async def watch(base: str, text: str) -> list[tuple[float, dict[str, object]]]:
    """Submit a job and follow it from its first message: (arrival time, message) each."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/submit", json={"input": text}) as response:
            job_id = (await response.json())["id"]
        got = []
        async with s.ws_connect(f"{base}/ws", params={"id": job_id, "after": "0"}) as ws:
            async for frame in ws:
                got.append((time.time(), json.loads(frame.data)))
        return got


def latencies(got: list[tuple[float, dict[str, object]]]) -> list[float]:
    """Milliseconds from each piece's emission to its message's arrival."""
    return [(arrived - float(stamp)) * 1000 for arrived, m in got if m["type"] == "output"
            for stamp in str(m["data"]).split()]


def run_time(got: list[tuple[float, dict[str, object]]]) -> float:
    """Seconds from the job's running state to its done one (the worker's clock)."""
    stamps = {m["status"]: datetime.fromisoformat(str(m["updated"])) for _, m in got
              if m["type"] == "state"}
    return (stamps["done"] - stamps["running"]).total_seconds()


def percentiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return (f"p50 {statistics.median(values):6.1f} ms   p99 {cuts[98]:6.1f} ms   "
            f"max {max(values):6.1f} ms   ({len(values)} pieces)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each 20,000-token job")
    args = parser.parse_args(argv)
    redis_port, http_port = free_port(), free_port()
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    procs = [subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", folder,
                               "--logfile", os.path.join(folder, "redis.log")])]
    try:
        wait_for_port(redis_port)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port",
                                       str(http_port)], env=env, stderr=subprocess.DEVNULL))
        wait_for_port(http_port)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--handler",
                                       "handlers:bench", "--concurrency", "1"], env=env,
                                      stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{http_port}"
        asyncio.run(watch(base, "paced 5 0.01"))  # warm up
        print(f"\n{os.cpu_count()} cores, Python {sys.version.split()[0]}")
        print("latency, piece -> watcher (WebSocket, after=0):")
        for name, text in (("steady, every 10 ms ", "paced 400 0.01"),
                           ("sparse, every 200 ms", "paced 40 0.2")):
            print(f"  {name}  {percentiles(latencies(asyncio.run(watch(base, text))))}")
        times: dict[str, list[float]] = {"streamed": [], "joined": []}
        for _ in range(args.rounds):
            for mode in times:
                got = asyncio.run(watch(base, f"tokens 20000 {mode}"))
                times[mode].append(run_time(got))
        streamed, joined = (statistics.median(times[mode]) for mode in ("streamed", "joined"))
        print(f"20,000 tokens of ~50 us each, run time (median of {args.rounds}): streamed one "
              f"at a time {streamed:.3f} s, returned joined {joined:.3f} s: "
              f"ratio {streamed / joined:.2f}")
        print(f"  each run: streamed {', '.join(f'{t:.3f}' for t in times['streamed'])}; "
              f"joined {', '.join(f'{t:.3f}' for t in times['joined'])}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
