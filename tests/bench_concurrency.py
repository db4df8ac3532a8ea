"""How many slots a worker wants: end to end with 2 workers at each --concurrency given, for
one handler, the jobs submitted over HTTP to a server (the path users take; 64 at a time, as
tests/bench.py's producer), each level with a Redis and a server of its own; the median of the
rounds. What docs/workers.md's table of the default comes from.

    python3 tests/bench_concurrency.py [--handler bench_peers:wait_20ms] [--jobs 2000]
                                       [--levels 1,10,16,32,100] [--rounds 2]

Handlers (tests/bench_peers.py): upper (the default, CPU-trivial), upper_async, wait_20ms,
await_20ms. Prints, per level, jobs/s and the CPU µs per job of the server, the workers and
Redis. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import bench


def run(concurrency: int, handler: str, n: int) -> dict[str, Any]:
    proc, port = bench.start_redis()
    system = bench.Ours(port, bench.free_port(), handler or None, concurrency)
    server = system.start_server()
    try:
        with bench.Run(system, redis.Redis(port=port, decode_responses=True)) as started:
            started.start_workers(2)
            return bench.end_to_end(started, n, proc.pid, server.pid)
    finally:
        bench.stop([server, proc])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handler", default="", help="MODULE:FUNCTION (default: upper-case)")
    parser.add_argument("--jobs", type=int, default=10_000, help="N (default %(default)s)")
    parser.add_argument("--levels", default="1,10,16,32,100",
                        help="the --concurrency values, comma-separated (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="default %(default)s")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    got: dict[int, list[dict[str, Any]]] = {level: [] for level in levels}
    for _ in range(args.rounds):
        for level in levels:  # the levels alternate within each round
            got[level].append(run(level, args.handler, args.jobs))
    print(f"{args.handler or 'upper'}, 2 workers, N = {args.jobs:,}, median of {args.rounds}")
    print(f"{'slots':>5} {'jobs/s':>7} {'server µs':>9} {'workers µs':>10} {'Redis µs':>8}")
    for level, runs in got.items():
        rate, server, workers, redis_cpu = (statistics.median(m[key] for m in runs)
                                            for key in ("rate", "server", "workers", "redis"))
        print(f"{level:5} {rate:7,.0f} {server:9,.0f} {workers:10,.0f} {redis_cpu:8,.0f}")


if __name__ == "__main__":
    main()
