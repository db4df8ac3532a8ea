"""Where a job's time goes: ours end to end (2 workers, jobs submitted over HTTP by the bench's
producer), profiled while it runs; what docs/benchmark.md's profile figures come from.

    python3 tests/bench_profile.py [--jobs 40000] [--seconds 8] [--top 25]

Prints, for the server and for one worker, the functions most often on the stack while the
process held the GIL (py-spy record --gil, sampled at 200 Hz for --seconds, as a share of all
samples: a function and everything it called), then the Redis commands per job over a second
run of --jobs / 4 jobs (INFO commandstats: the scripts' own commands included). Needs py-spy
(python3 -m pip install py-spy) and the rights to read another process's memory (root, or
ptrace allowed). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import bench


def top(raw: Path, count: int) -> list[tuple[float, str]]:
    """py-spy's raw output (a stack and its samples per line): the functions on most samples."""
    on: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        total += int(samples)
        names = set()
        for frame in stack.split(";"):
            function, _, where = frame.partition(" (")
            names.add(f"{function} ({where.rsplit('/', 1)[-1].split(':')[0]})")
        for name in names:
            on[name] += int(samples)
    return [(100 * n / max(total, 1), name) for name, n in on.most_common(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40_000, help="default %(default)s")
    parser.add_argument("--seconds", type=int, default=8, help="default %(default)s")
    parser.add_argument("--top", type=int, default=25, help="default %(default)s")
    args = parser.parse_args()
    proc, port = bench.start_redis()
    ours = bench.Ours(port, bench.free_port())
    server = ours.start_server()
    r = redis.Redis(port=port, decode_responses=True)
    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    try:
        with bench.Run(ours, r) as run:
            run.start_workers(2)
            run.enqueue(0)
            run.until(0)
            bench.settle(run.workers)
            load = threading.Thread(target=run.enqueue, args=(args.jobs,))
            load.start()
            time.sleep(1.0)  # under way
            spies = {name: subprocess.Popen(
                ["py-spy", "record", "--gil", "--nonblocking", "-r", "200", "-d",
                 str(args.seconds), "-f", "raw", "-o", str(out / name), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name, pid in (("server", server.pid), ("worker", run.workers[0].pid))}
            for spy in spies.values():
                spy.wait()
            load.join()
            run.until(0)
            for name in spies:
                print(f"\n{name}: share of samples with the GIL held, a function with its callees")
                for share, function in top(out / name, args.top):
                    print(f"{share:5.1f} %  {function}")
            before = {k: v["calls"] for k, v in r.info("commandstats").items()}
            n = args.jobs // 4
            run.enqueue(n)
            run.until(0)
            after = {k: v["calls"] for k, v in r.info("commandstats").items()}
        print(f"\nRedis commands per job ({n:,} jobs, INFO commandstats):")
        for command in sorted(after, key=lambda k: before.get(k, 0) - after[k]):
            if (per := (after[command] - before.get(command, 0)) / n) >= 0.05:
                print(f"{per:6.2f}  {command.removeprefix('cmdstat_')}")
    finally:
        bench.stop([server, proc])


if __name__ == "__main__":
    main()
