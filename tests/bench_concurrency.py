"""How many slots a worker wants: end to end with 2 workers at each --concurrency given, for
one handler, the jobs enqueued with client.enqueue (no server), each level on a Redis of its
own; the median of the rounds. What docs/workers.md's table of defaults comes from.

    python3 tests/bench_concurrency.py [--handler bench_peers:wait_20ms] [--jobs 2000]
                                       [--levels 1,4,10,32,100] [--rounds 2]

Handlers (tests/bench_peers.py): upper (the default, CPU-trivial), upper_async, wait_20ms,
await_20ms. Prints, per level, jobs/s and the CPU µs per job of the workers and of Redis. Not
collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import bench


def run(concurrency: int, handler: str, n: int) -> dict[str, Any]:
    proc, port = bench.start_redis()
    try:
        system = bench.OursPython(port)
        system.flags = ["--concurrency", str(concurrency),
                        *(["--handler", handler] if handler else [])]
        system.env["PYTHONPATH"] = os.pathsep.join([str(bench.ROOT), str(bench.ROOT / "tests")])
        with bench.Run(system, redis.Redis(port=port, decode_responses=True)) as started:
            started.start_workers(2)
            return bench.end_to_end(started, n, proc.pid, None)
    finally:
        bench.stop([proc])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handler", default="", help="MODULE:FUNCTION (default: upper-case)")
    parser.add_argument("--jobs", type=int, default=10_000, help="N (default %(default)s)")
    parser.add_argument("--levels", default="1,4,10,32,100",
                        help="the --concurrency values, comma-separated (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="default %(default)s")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    got: dict[int, list[dict[str, Any]]] = {level: [] for level in levels}
    for _ in range(args.rounds):
        for level in levels:  # the levels alternate within each round
            got[level].append(run(level, args.handler, args.jobs))
    print(f"{args.handler or 'upper'}, 2 workers, N = {args.jobs:,}, median of {args.rounds}")
    print(f"{'slots':>5} {'jobs/s':>7} {'workers µs':>10} {'Redis µs':>8}")
    for level, runs in got.items():
        rate, workers, redis_cpu = (statistics.median(m[key] for m in runs)
                                    for key in ("rate", "workers", "redis"))
        print(f"{level:5} {rate:7,.0f} {workers:10,.0f} {redis_cpu:8,.0f}")


if __name__ == "__main__":
    main()
