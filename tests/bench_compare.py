"""Two checkouts side by side: the CPU-trivial row of tests/bench.py (ours over HTTP) for each,
alternating in every round (the machine is shared and noisy: only ratios within a round hold).

    python3 tests/bench_compare.py BEFORE AFTER [--rounds 3] [--jobs 10000]

BEFORE and AFTER are checkouts (git worktree add /tmp/before REV). Each measurement runs that
checkout's server.py and worker.py, with a redis-server of its own, through this checkout's
tests/bench.py measure(). Prints each round's row, then the median over the rounds of AFTER's
ratio to BEFORE, per column. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import bench

COLUMNS = ("enqueue", "drain1", "drain2", "e2e1", "e2e2")


def row(tree: Path, n: int) -> dict[str, float]:
    bench.ROOT = tree  # the server and workers are started from the checkout's files
    proc, port = bench.start_redis()
    ours = bench.Ours(port, bench.free_port())
    server = ours.start_server()
    try:
        m = bench.measure(ours, redis.Redis(port=port, decode_responses=True), n, proc.pid,
                          server.pid)
    finally:
        bench.stop([server, proc])
    if "wrong" in m:
        raise SystemExit(f"bench_compare: {tree}: {m['wrong']}")
    return {**{k: m[k] for k in COLUMNS},
            **{f"cpu {k}": m["cpu"][k] for k in ("server", "workers", "redis")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3, help="default %(default)s")
    parser.add_argument("--jobs", type=int, default=10_000, help="N (default %(default)s)")
    args = parser.parse_args()
    ratios: list[dict[str, float]] = []
    for i in range(args.rounds):
        before, after = row(args.before, args.jobs), row(args.after, args.jobs)
        for name, got in (("before", before), ("after", after)):
            print(f"round {i + 1} {name:6} " + "  ".join(f"{k} {v:,.0f}" for k, v in got.items()),
                  flush=True)
        ratios.append({k: after[k] / before[k] for k in after})
    print("after / before, median of the rounds: " + "  ".join(
        f"{k} {statistics.median(r[k] for r in ratios):.3f}" for k in ratios[0]))


if __name__ == "__main__":
    main()
