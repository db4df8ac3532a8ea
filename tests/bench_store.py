"""Redis's side of a job: redis-server CPU time per job, for the checkout given (compare two
checkouts side by side, alternating, since the machine is shared and noisy).

    python3 tests/bench_store.py [CHECKOUT]      # default: this one

Starts a throwaway redis-server, submits 5,000 jobs through the SUBMIT script, then takes,
starts and finishes them with one in-process worker slot (no chaining), and prints redis-server's
CPU time and the wall time per job for each half, and Redis's memory per job kept (used_memory
after them, less before). Not collected by pytest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

TREE = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(TREE))
os.chdir(TREE)

import redis  # noqa: E402

import server  # noqa: E402
import store  # noqa: E402
from worker import Worker  # noqa: E402

N = 5_000


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        measure(r, f"redis://127.0.0.1:{port}/0", psutil.Process(proc.pid))
    finally:
        proc.terminate()
        proc.wait()


def measure(r: redis.Redis, url: str, redis_process: psutil.Process) -> None:
    worker = Worker(url, concurrency=1)
    slot = worker.slots[0]
    submit = r.register_script(store.SUBMIT)
    keys = store.Keys()
    memory0 = int(r.info("memory")["used_memory"])
    cpu0, t0 = redis_process.cpu_times(), time.perf_counter()
    for i in range(N):
        if hasattr(store, "new_jobs"):
            jobs = store.new_jobs([f"job {i}"])
            submit(keys=[keys.queue], args=store.submit_args(keys.prefix, 86_400, jobs, None))
        elif hasattr(server, "new_jobs"):  # the versions before priorities
            jobs = server.new_jobs([f"job {i}"])
            old = server.submit_args  # type: ignore[attr-defined]
            submit(keys=[keys.queue], args=old(keys.prefix, 86_400, jobs, None))
        else:  # the version before bulk submits
            job = server.new_job(f"job {i}")  # type: ignore[attr-defined]
            fields = [x for kv in job.items() for x in kv]
            submit(keys=[keys.job(job["id"]), keys.queue], args=[job["id"], *fields])
    cpu1, t1 = redis_process.cpu_times(), time.perf_counter()
    job, done = worker.take(slot), 0
    while job is not None:
        done += 1
        job = worker.process(slot, job)
    cpu2, t2 = redis_process.cpu_times(), time.perf_counter()
    memory = (int(r.info("memory")["used_memory"]) - memory0) / N

    def per_job(a: Any, b: Any) -> float:
        return float(b.user + b.system - a.user - a.system) * 1e6 / N

    print(f"{TREE.name}: {done} jobs; submit: redis CPU {per_job(cpu0, cpu1):.0f} µs/job, wall "
          f"{(t1 - t0) * 1e6 / N:.0f} µs/job; take+start+finish: redis CPU "
          f"{per_job(cpu1, cpu2):.0f} µs/job, wall {(t2 - t1) * 1e6 / N:.0f} µs/job; redis "
          f"memory {memory:.0f} B/job kept")


if __name__ == "__main__":
    main()
