"""Benchmark: this job queue against nine peers, on one machine, in one run: arq, RQ, SAQ,
Celery, Dramatiq, streaq, taskiq (with taskiq-redis), huey and BullMQ for Python.

    python3 -m pip install '.[bench]' && python3 tests/bench.py [--jobs 10000] [--only io]

Starts its own redis-server (persistence off) on a free port and prints three tables. In the
first two, every system runs the same job against the same Redis, flushed before each
measurement; the third, ours alone on one Redis and on Redis Clusters.

The peers install from PyPI, each into a venv of its own, .bench/venvs/NAME (gitignored):
made on first use (python3 -m venv, then pip install of the peer at the version pinned in
tests/bench_peers.py, psutil and redis), again when the pins change, otherwise reused; arq
pins an older redis-py than the rest. tests/bench_peers.py holds an adapter per system: how
it enqueues, through its own API; how one worker command runs at its README's defaults; how
every result is read back; how many jobs it has yet to finish, read from its own keys. The
bench runs each system's producer and workers as processes of that venv's python (ours: of
this Python; its producer submits over HTTP, POST /submit, to our server). Where the API is
async (ours, arq, SAQ, streaq, taskiq, BullMQ) 64 enqueues are in flight at once; RQ, Celery,
Dramatiq and huey enqueue one after another, as their APIs do. The row ours-py is ours
enqueueing through client.enqueue (the server's SUBMIT script, run on Redis by the producer
itself: no HTTP, and no server running, as for a peer), one job after another, as its API is
synchronous. One worker, at its defaults:
- ours: worker.py, 1 process, 16 slots (a line logged per job, at INFO, as by default);
- arq: its worker, max_jobs 10; RQ: SimpleWorker (no fork per job, as arq and SAQ), 1 job at
  once; SAQ: its Worker, concurrency 10; streaq: its Worker, concurrency 16; BullMQ for
  Python: a Worker, concurrency 1; huey: RedisHuey's consumer, 1 worker thread;
- Celery (Redis broker and result backend): `celery worker`, its prefork pool, a child
  process per core (2 here); Dramatiq (its Redis broker, the Results middleware with its
  Redis backend): its CLI, a process per core, 8 threads each; taskiq (RedisStreamBroker,
  RedisAsyncResultBackend): `taskiq worker`, 2 processes, up to 100 async tasks each;
- the peers log warnings only (their per-job INFO lines, where they have any, are off).
A job is done when its system says so in Redis, polled every 10 ms: ours, its queue and
processing lists; arq, its queue; RQ, its queue and started-job registry; SAQ, its incomplete
set; Celery, its queue and unacked messages (a message is acked as its task starts), then its
result keys; Dramatiq, its message hash (acked after the result is stored); huey, its results
hash; taskiq, its consumer group's lag and pending; streaq, its results index; BullMQ, its
completed set. After each timed interval (untimed), every result is read back through the
system's own API and checked to be its input upper-cased: ours GET /status; arq
Job.result(); RQ Job.return_value(); SAQ Job.refresh(); Celery ResultSet.join_native();
Dramatiq Message.get_result(); huey Result.get(preserve=True); taskiq wait_result(); BullMQ
Job.fromId(); streaq, its result keys through its own deserializer (its Task.result()
subscribes to a channel per task: some 80 reads/s). What was wrong is printed under the
tables.

The CPU-trivial table (--only cpu for it alone): the job upper-cases a string.
- enqueue/s: jobs accepted per second with no worker running, from the producer's first
  enqueue to the last accepted;
- drain: N jobs already queued, 1 or 2 workers started, from the first job done to the last;
- end to end: 1 or 2 workers running, a warm-up job done and read back, every process idle
  (each under a fifth of a core), N jobs enqueued, from the first enqueue to the last done;
- beside each row, CPU µs per job during its end to end with 2 workers (psutil, user +
  system, before and after), of each kind of process: the producer, our server (ours only),
  the workers (with their children), Redis (the bench's redis-server), all of them; and the
  cores the rest of the machine kept busy meanwhile (it is shared: jobs/s moves with it, CPU
  per job much less);
- ceiling: a redis-py loop on one connection doing per job the Redis work of a reliable
  queue (LPUSH; then BLMOVE, HSET, LREM, PUBLISH);
- latency: 500 sequential submit → WebSocket `done`, p50 and p99;
- fan-out: W WebSocket watchers of one job on one server: time to connect them, time from the
  worker's publish to the last watcher hearing it, server RSS per watcher.

The I/O-bound table (--only io for it alone): the job waits 20 ms (time.sleep in a plain
handler: ours plain, RQ, Celery, Dramatiq, huey; asyncio.sleep in an async one: ours async,
arq, SAQ, streaq, taskiq, BullMQ), then upper-cases the string. 2 workers, run as for end to
end with --io-jobs jobs. Ours plain and async at 16 (the default) and 100 jobs at once per
worker; each peer at its defaults and, where it has a setting for it, at 100 at once per
worker: arq max_jobs,
SAQ, streaq and BullMQ concurrency, Celery --pool threads --concurrency 100, Dramatiq
--processes 1 --threads 100, huey -w 100 (RQ has none; taskiq's default is 100 async tasks a
process already). Beside each row: the limit W x N x 50 jobs/s (W workers running N jobs at
once, each job 20 ms) and the share of it reached; the RSS of the larger worker (with its
children) at the end; CPU µs per job of each kind of process, as above.

The cluster table (--only cluster for it alone; it needs redis-cli, and pytest: it builds its
clusters with tests/topologies.py): end to end as above, spread over 4 queues a, b, c, d (each
its own hash tag {jobs:NAME}, so its own slot): 2 worker processes of 12 slots each
(--queues a,b,c,d), N jobs submitted over HTTP, 64 at a time, to each queue in turn; from the
first submit to the last job done. Each row has its own Redis, server and workers: one Redis;
a cluster of 1 master (cluster mode and redis-py's cluster client, nothing split); of 3
masters (the queues on all 3, and which master has which is printed); the same with a replica
each (asynchronous replication, none waits for it); and with --min-replicas 1 (each submit and
each finish WAITs for the replica). Beside jobs/s: CPU s per 1,000 jobs (psutil) of the Redis
masters, of the replicas, of our server, workers and this process (the submitter), of all of
them; the ratios to one Redis; the cores the rest of the machine kept busy meanwhile. All of
it shares the machine's cores, so jobs/s is about (cores - others) / CPU per job: on a small
machine a cluster can only cost, not gain, and jobs/s moves with the others' load; CPU per
job is the comparison that holds.

The scaling model printed under it, on paper: a Redis serves from one core, so 1 / (its CPU
per job) is the jobs/s one master takes with its core saturated (some 10,000 on the 2-core
machine of issue 9: 0.1 s per 1,000 jobs, ~45 commands a job, most inside 3 scripts); 100,000
jobs/s then needs 100 x (CPU s per 1,000 jobs) masters, by Redis CPU alone, and more for
headroom, replicas and WAIT (the rows say how much). CPU per job measured below saturation
over-counts a little (a busy Redis serves more commands per wakeup), so this errs on the safe
side. Other limits: our server and workers spend some 4 times Redis's CPU per job, so they
need 4 cores for each Redis core (a trivial job; a real one more); a queue's keys share one
slot, so one queue never gets past one master: spread a busy load over several queues, and
check where they land (slots are hashed, not balanced: these 4 queues put 2 on one of 3
masters); each replica receives every write again, over the network.

--only takes a table or a system (ours or a peer's name), and may be given more than once:
--only io --only ours --only celery. Not collected by pytest (its name does not start with
test_).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil
import redis

if TYPE_CHECKING:
    import aiohttp  # imported where used, as before (the I/O jobs are now in bench_peers)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from store import Keys, connect  # noqa: E402
from tests.bench_peers import ADAPTERS, PEERS, in_batches  # noqa: E402

KEYS = Keys()
VENVS = ROOT / ".bench" / "venvs"  # each peer's own venv (gitignored), made once
PEERS_FILE = ROOT / "tests" / "bench_peers.py"
STEP = 0.01  # seconds between two reads of a system's progress during a timed interval
SLOWEST = 20  # jobs/s: a system slower than this is taken as stuck (the bench stops)
TABLES = ("cpu", "io", "cluster")
CLUSTER_QUEUES = ("a", "b", "c", "d")
CLUSTER_CONCURRENCY = 12  # jobs at once per worker process in the cluster table: 3 per queue
# What the server and workers log when all is well (a line per job done, at INFO)
ROUTINE = re.compile(r"job \w+: done$|listening on|subscribed to|waiting for jobs on")


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


def venv_python(name: str) -> str:
    """The python of the peer's own venv under .bench/venvs, made the first time (and again
    when its requirements change): python3 -m venv, then pip install of the pinned peer,
    psutil and redis."""
    folder = VENVS / name
    wanted = "\n".join([*ADAPTERS[name].requirements, "psutil", "redis"])
    stamp = folder / "bench-requirements.txt"
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"bench: making {folder} ({', '.join(wanted.split())}) ...", file=sys.stderr,
              flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
            subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q",
                            *wanted.split()], check=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as exc:
            raise SystemExit(f"bench: could not make the venv of {name}: {exc}") from None
        stamp.write_text(wanted)
    return str(folder / "bin" / "python")


class Peer:
    """A peer, driven through tests/bench_peers.py in its own venv: workers and a producer are
    processes of that venv's python. function: the job; concurrency: the workers' setting for
    jobs at once (None: the default)."""

    def __init__(self, name: str, url: str, function: str = "upper",
                 concurrency: int | None = None) -> None:
        self.name, self.url, self.function, self.concurrency = name, url, function, concurrency
        self.adapter = ADAPTERS[name](url, function)
        self.python = venv_python(name)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return self.adapter.remaining(r, enqueued)

    def start_workers(self, count: int) -> list[subprocess.Popen[bytes]]:
        concurrency = ["--concurrency", str(self.concurrency)] if self.concurrency else []
        return [subprocess.Popen([self.python, str(PEERS_FILE), "work", self.name, "--url",
                                  self.url, *concurrency], env=self.env, cwd=ROOT / "tests",
                                 stdout=subprocess.DEVNULL, stderr=log_file(self.name))
                for _ in range(count)]

    def producer(self) -> Producer:
        return Producer(self.python, [self.name, "--url", self.url, "--function", self.function],
                        self.env)


def log_file(name: str) -> IO[bytes]:
    """Where a system's processes write their stderr: bench-logs-*/NAME.log (appended)."""
    global LOGS
    LOGS = LOGS or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    return (LOGS / f"{name}.log").open("ab")


LOGS: Path | None = None


class Producer:
    """A process enqueueing through a system's own API, and reading every result back:
    tests/bench_peers.py produce (its docstring has the protocol)."""

    def __init__(self, python: str, args: list[str], env: dict[str, str]) -> None:
        self.name = args[0]
        self.proc = subprocess.Popen([python, str(PEERS_FILE), "produce", *args], env=env,
                                     cwd=ROOT / "tests", stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log_file(self.name))
        self.ask("", 120)

    def ask(self, command: str, timeout: float) -> str:
        """Send a command (none: wait for "ready") and return the answer, within timeout s."""
        assert self.proc.stdin and self.proc.stdout
        if command:
            self.proc.stdin.write(f"{command}\n".encode())
            self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise SystemExit(f"bench: the {self.name} producer did not answer "
                             f"{command or 'at start'!r} in {timeout:.0f} s; see {LOGS}")
        answer = self.proc.stdout.readline().decode().strip()
        if not answer:
            raise SystemExit(f"bench: the {self.name} producer exited; see {LOGS}")
        return answer


class Run:
    """A system at work on a flushed Redis: its producer, its workers, how many jobs were
    enqueued; each process stopped in close()."""

    def __init__(self, system: Ours | Peer, r: redis.Redis) -> None:
        r.flushall()
        self.system, self.r, self.enqueued = system, r, 0
        self.workers: list[subprocess.Popen[bytes]] = []
        self.producer = system.producer()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        stop([self.producer.proc, *self.workers])

    def start_workers(self, count: int) -> None:
        self.workers += self.system.start_workers(count)

    def enqueue(self, n: int) -> float:
        """Enqueue n jobs (0: one warm-up job); the seconds until the producer had them all
        accepted."""
        began = time.perf_counter()
        answer = self.producer.ask(f"enqueue {n or 'warm'}", 600)
        took = time.perf_counter() - began
        assert answer == "enqueued", answer
        self.enqueued += n or 1
        return took

    def left(self) -> int:
        """Jobs not yet finished; stops the bench if a worker exited."""
        if any(proc.poll() is not None for proc in self.workers):
            raise SystemExit(f"bench: a {self.system.name} worker exited; see {LOGS}")
        return self.system.remaining(self.r, self.enqueued)

    def until(self, left: int) -> float:
        """Wait until at most `left` jobs are left; the time.perf_counter() then."""
        deadline = time.perf_counter() + 60 + self.enqueued / SLOWEST
        while (now := self.left()) > left:
            if time.perf_counter() > deadline:
                raise SystemExit(f"bench: {self.system.name} still had {now} of "
                                 f"{self.enqueued} jobs to finish; see {LOGS}")
            time.sleep(STEP)
        return time.perf_counter()

    def check(self) -> str:
        """Read back every result since the last check: "" if each was right, else what was
        wrong."""
        answer = self.producer.ask("check", 600)
        return "" if answer.startswith("checked ") else f"{self.system.name}: {answer}"

    def groups(self, redis_pid: int, server_pid: int | None) -> dict[str, list[psutil.Process]]:
        """The processes of each kind, children included."""
        return {"producer": tree([self.producer.proc]), "workers": tree(self.workers),
                "server": [psutil.Process(server_pid)] if server_pid else [],
                "redis": [psutil.Process(redis_pid)]}


def tree(procs: list[subprocess.Popen[bytes]]) -> list[psutil.Process]:
    """The processes and all their children."""
    out = []
    for proc in procs:
        parent = psutil.Process(proc.pid)
        out += [parent, *parent.children(recursive=True)]
    return out


def cpu_per_job(groups: dict[str, list[psutil.Process]], since: dict[str, float],
                n: int) -> dict[str, float]:
    """CPU µs per job of each group since `since` (cpu_of(groups) at the start)."""
    now = cpu_of(groups)
    return {name: (now[name] - since[name]) / n * 1e6 for name in groups}


def cpu_of(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    return {name: sum(map(cpu_seconds, group)) for name, group in groups.items()}


class Ours:
    def __init__(self, port: int, http_port: int, handler: str | None = None,
                 concurrency: int | None = None, *, url: str | None = None,
                 queues: tuple[str, ...] = (), min_replicas: int = 0) -> None:
        """handler: worker.py's --handler, a function of this module (None: its default);
        concurrency: worker.py's --concurrency (None: its default); url: REDIS_URL (None: the
        Redis at port); queues: jobs are submitted to each in turn, and workers take from all
        (--queues; none: the default queue); min_replicas: the server's and workers'
        --min-replicas. stderr: where the server's and workers' logs go."""
        self.name, self.port, self.base = "ours", port, f"http://127.0.0.1:{http_port}"
        self.queues = queues
        self.env = {**os.environ, "REDIS_URL": url or f"redis://127.0.0.1:{port}/0"}
        if min_replicas:
            self.env["JOBS_MIN_REPLICAS"] = str(min_replicas)
        self.flags = [*(["--handler", handler] if handler else []),
                      *(["--concurrency", str(concurrency)] if concurrency else []),
                      *(["--queues", ",".join(queues)] if queues else [])]
        self.stderr: int | IO[bytes] = subprocess.DEVNULL
        if handler:  # worker.py imports tests/bench_peers.py as `bench_peers`
            self.env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))

    def with_worker(self, handler: str, concurrency: int) -> Ours:
        """The same server and Redis, workers started with these settings."""
        return Ours(self.port, int(self.base.rsplit(":", 1)[1]), handler, concurrency)

    async def enqueue(self, texts: list[str]) -> None:
        import aiohttp
        queues = itertools.cycle([{"queue": name} for name in self.queues] or [{}])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            async def submit(text: str) -> None:
                async with session.post(f"{self.base}/submit",
                                        json={"input": text, **next(queues)}) as resp:
                    assert resp.status == 201, f"{resp.status} {await resp.text()}"
            await in_batches(texts, submit)

    def remaining(self, r: redis.Redis, enqueued: int = 0) -> int:
        with r.pipeline(transaction=False) as pipe:
            pipe.llen(KEYS.queue)
            for name in r.smembers(KEYS.workers):
                pipe.llen(KEYS.processing(str(name)))
            return sum(pipe.execute())

    def producer(self) -> Producer:
        """Submits over HTTP, 64 at a time, from a process of its own like a peer's."""
        return Producer(sys.executable, ["ours", "--url", self.base], self.env)

    def start_workers(self, count: int) -> list[subprocess.Popen[bytes]]:
        return [subprocess.Popen([sys.executable, str(ROOT / "worker.py"), *self.flags],
                                 env=self.env, stderr=self.stderr)
                for _ in range(count)]

    def start_server(self) -> subprocess.Popen[bytes]:
        port = int(self.base.rsplit(":", 1)[1])
        proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port)],
                                env=self.env, stderr=self.stderr)
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
        return proc


class OursPython(Ours):
    """Ours, enqueueing with client.enqueue (SUBMIT run on Redis itself: no HTTP, and no server
    running, as a peer has none); its workers are ours."""

    def __init__(self, port: int) -> None:
        super().__init__(port, 0)
        self.name = "ours-py"

    def producer(self) -> Producer:
        env = {**self.env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        return Producer(sys.executable, ["ours-py", "--url", self.env["REDIS_URL"]], env)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill each process and its children (some peers' workers start processes of their own,
    in sessions of their own), by pid."""
    for proc in procs:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        proc.kill()
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait()
        psutil.wait_procs(family, timeout=10)


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of the process; of one that has exited (a worker's short-lived
    child), the last read (its time after that is lost)."""
    try:
        times = proc.cpu_times()
    except psutil.NoSuchProcess:
        return LAST_CPU.get(proc.pid, 0.0)
    LAST_CPU[proc.pid] = float(times.user + times.system)
    return LAST_CPU[proc.pid]


LAST_CPU: dict[int, float] = {}


def rss(proc: psutil.Process) -> int:
    """Resident memory of the process in bytes (0 once it has exited)."""
    try:
        return int(proc.memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


def settle(procs: list[subprocess.Popen[bytes]], window: float = 0.25, most: float = 0.2,
           timeout: float = 60.0) -> None:
    """Wait until each process (and each of its children) uses under `most` of a core over
    `window` seconds: started up and idle."""
    watched = tree(procs)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        before = [cpu_seconds(proc) for proc in watched]
        time.sleep(window)
        if all(cpu_seconds(proc) - cpu < most * window for proc, cpu in zip(watched, before,
                                                                              strict=True)):
            return
    raise SystemExit("bench: the workers never went idle")


def end_to_end(run: Run, n: int, redis_pid: int, server_pid: int | None) -> dict[str, Any]:
    """The shared timing: with the run's workers started, a warm-up job done and read back, the
    processes idle, N jobs enqueued, from the first enqueue to the last job done; jobs/s, CPU
    µs per job of each kind of process (psutil, user + system, children included), the
    workers' RSS at the end (the largest worker with its children). Then every result is read
    back (not timed): what was wrong, if anything, in out["wrong"]."""
    run.enqueue(0)
    run.until(0)
    wrong = run.check()
    settle(run.workers)
    groups = run.groups(redis_pid, server_pid)
    since, busy = cpu_of(groups), busy_seconds()
    began = time.perf_counter()
    run.enqueue(n)
    last = run.until(0)
    cpu = cpu_per_job(groups, since, n)
    others = (busy_seconds() - busy - sum(cpu.values()) * n / 1e6) / (last - began)
    out = {"rate": n / (last - began), **cpu, "others": others,
           "rss": max(sum(map(rss, tree([worker]))) for worker in run.workers)}
    problem = wrong or run.check()
    return {**out, **({"wrong": problem} if problem else {})}


def measure(system: Ours | Peer, r: redis.Redis, n: int, redis_pid: int,
            server_pid: int | None) -> dict[str, Any]:
    """The CPU-trivial table's row: enqueue/s (no worker running), drain and end-to-end jobs/s
    with 1 and 2 worker processes; the CPU per job of the end to end with 2."""
    out: dict[str, Any] = {}
    wrong: list[str] = []
    for workers in (1, 2):
        with Run(system, r) as run:
            took = run.enqueue(n)
            if workers == 1:
                out["enqueue"] = n / took
            run.start_workers(workers)
            first, last = run.until(n - 1), run.until(0)
            out[f"drain{workers}"] = (n - 1) / (last - first)
            wrong.append(run.check())
        with Run(system, r) as run:
            run.start_workers(workers)
            e2e = end_to_end(run, n, redis_pid, server_pid)
            out[f"e2e{workers}"] = e2e.pop("rate")
            wrong.append(str(e2e.pop("wrong", "")))
            if workers == 2:
                out["cpu"] = e2e
    if any(wrong):
        out["wrong"] = "; ".join(filter(None, wrong))
    return out


def measure_io(system: Ours | Peer, r: redis.Redis, n: int, redis_pid: int,
               server_pid: int | None) -> dict[str, Any]:
    """The I/O-bound table's row: end_to_end with 2 workers."""
    with Run(system, r) as run:
        run.start_workers(2)
        return end_to_end(run, n, redis_pid, server_pid)


def io_rows(ours: Ours, url: str, names: list[str]) -> list[tuple[str, Ours | Peer, int]]:
    """The I/O-bound table's rows: (label, system, jobs each worker runs at once); ours plain
    and async at 16 (the default) and 100, each peer at its defaults and, where it has a setting
    for it, at 100 at once."""
    rows: list[tuple[str, Ours | Peer, int]] = []
    if "ours" in names:
        for concurrency in (16, 100):
            rows += [(f"ours {kind} N={concurrency}",
                      ours.with_worker(f"bench_peers:{handler}", concurrency), concurrency)
                     for kind, handler in (("plain", "wait_20ms"), ("async", "await_20ms"))]
    for name in (name for name in PEERS if name in names):
        adapter = ADAPTERS[name]
        rows.append((f"{name} default ({adapter.at_once})", Peer(name, url, "wait_20ms"),
                     adapter.at_once))
        if adapter.hundred:
            rows.append((f"{name} {adapter.hundred}", Peer(name, url, "wait_20ms", 100), 100))
    return rows


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


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    """A throwaway redis-server, persistence off, on a free port, in a temp folder; once it
    answers."""
    port, folder = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", folder,
                             "--logfile", os.path.join(folder, "redis.log")])
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
    return proc, port


def busy_seconds() -> float:
    """CPU seconds the machine has spent busy, all cores (steal, idle and iowait not)."""
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system + times.irq + times.softirq)


def measure_spread(url: str, redis_pids: dict[str, list[int]], n: int,
                   min_replicas: int = 0) -> tuple[dict[str, float], list[str]]:
    """The cluster table's row: a server and 2 workers on the Redis at url, taking from the 4
    queues; a warm-up job on each, the processes idle, then N jobs submitted over HTTP (64 at
    a time) to each queue in turn, from the first submit to the last job done. CPU seconds per
    1,000 jobs of each group of redis_pids ("masters", "replicas"), the server, the workers
    and this process (the submitter); the cores the rest of the machine kept busy meanwhile
    (other processes, and kernel network work charged to none). And the lines the server and
    workers logged that are not routine."""
    ours = Ours(0, free_port(), concurrency=CLUSTER_CONCURRENCY, url=url,
                queues=CLUSTER_QUEUES, min_replicas=min_replicas)
    client = connect(url, decode_responses=True)
    counters = [Keys(queue=name).counters for name in CLUSTER_QUEUES]
    log = Path(tempfile.mkdtemp(prefix="bench-logs-")) / "stderr.log"
    procs: list[subprocess.Popen[bytes]] = []

    def done() -> int:
        if any(proc.poll() is not None for proc in procs):
            raise SystemExit(f"bench: our server or a worker exited; see {log}")
        return sum(int(client.hget(key, "done") or 0) for key in counters)

    with log.open("wb") as ours.stderr:
        try:
            procs += [ours.start_server(), *ours.start_workers(2)]
            asyncio.run(ours.enqueue(list(CLUSTER_QUEUES)))  # one to each queue
            wait_for(lambda: done() == len(CLUSTER_QUEUES), step=0.05)
            settle(procs)
            groups = {**{name: [psutil.Process(pid) for pid in pids]
                         for name, pids in redis_pids.items()},
                      "server": [psutil.Process(procs[0].pid)],
                      "workers": [psutil.Process(proc.pid) for proc in procs[1:]],
                      "submitter": [psutil.Process()]}

            def cpu() -> dict[str, float]:
                return {name: sum(map(cpu_seconds, group)) for name, group in groups.items()}
            before, busy_before = cpu(), busy_seconds()
            began = time.perf_counter()
            asyncio.run(ours.enqueue([f"job {i}" for i in range(n)]))
            last = wait_for(lambda: done() == len(CLUSTER_QUEUES) + n, step=0.05)
            after, busy = cpu(), busy_seconds() - busy_before
        finally:
            stop(procs)
            client.close()
    used = {name: after[name] - before[name] for name in groups}
    out = {"rate": n / (last - began),
           "others": (busy - sum(used.values())) / (last - began),
           **{name: seconds / n * 1000 for name, seconds in used.items()}}
    logged = [line for line in log.read_text(errors="replace").splitlines()
              if not ROUTINE.search(line)]
    if logged:
        logged.append(f"(all in {log})")
    else:
        shutil.rmtree(log.parent)
    return out, logged


def cluster_rows(n: int) -> list[tuple[str, dict[str, float], str, list[str]]]:
    """The cluster table's rows: (label, measure_spread's numbers, where the queues are, the
    lines logged not routine), on one Redis, then on clusters: one master (cluster mode
    alone); 3 masters without replicas, with a replica each (asynchronous), and with a replica
    each and --min-replicas 1 (the server and workers WAIT for it)."""
    from tests.topologies import Cluster  # imports the server, and pytest: here only

    proc, port = start_redis()
    try:
        print("bench: cluster table, one Redis ...", file=sys.stderr, flush=True)
        numbers, logged = measure_spread(f"redis://127.0.0.1:{port}/0", {"masters": [proc.pid]}, n)
        rows = [("one Redis", numbers, "", logged)]
    finally:
        stop([proc])
    for label, count, replicas, min_replicas in (("cluster, 1 master", 1, 0, 0),
                                                 ("cluster, 3 masters", 3, 0, 0),
                                                 ("cluster, 3 masters + 3 replicas", 3, 1, 0),
                                                 ("  the same, --min-replicas 1", 3, 1, 1)):
        print(f"bench: cluster table, {label} ...", file=sys.stderr, flush=True)
        with Cluster(count, replicas) as cluster:
            masters = cluster.masters()
            where = {name: cluster.master_of(Keys(queue=name).queue) for name in CLUSTER_QUEUES}
            if count > 1 and len(set(where.values())) < 2:
                raise SystemExit(f"bench: the queues are all on one master: {where}")
            placed = " ".join(f"{name}→{node.name}" for name, node in where.items()) + \
                f" (masters used: {len(set(where.values()))} of {len(masters)})"
            pids = {"masters": [node.proc.pid for node in masters if node.proc],
                    "replicas": [node.proc.pid for node in cluster.nodes
                                 if node.proc and node not in masters]}
            numbers, logged = measure_spread(cluster.url, pids, n, min_replicas)
            rows.append((label, numbers, placed, logged))
    return rows


async def latency(ours: Ours, count: int = 500) -> list[float]:
    import aiohttp
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
    import aiohttp
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
    parser.add_argument("--jobs", type=int, default=10_000,
                        help="N of the CPU-trivial and cluster tables (default %(default)s)")
    parser.add_argument("--io-jobs", type=int, default=2_000,
                        help="N of the I/O-bound table (default %(default)s)")
    parser.add_argument("--watchers", type=int, default=10_000,
                        help="WebSocket watchers for fan-out (default %(default)s)")
    parser.add_argument("--only", choices=(*TABLES, "ours", "ours-py", *PEERS), action="append",
                        help="measure one table (cluster: ours on one Redis and on local "
                             "Redis Clusters, and a scaling model: see the docstring), or one "
                             "system, only; may be repeated (--only io --only celery)")
    args = parser.parse_args(argv)
    only = set(args.only or ())
    tables = [t for t in TABLES if not only & set(TABLES) or t in only]
    names = [s for s in ("ours", "ours-py", *PEERS) if not only - set(TABLES) or s in only]

    clustered = cluster_rows(args.jobs) if "cluster" in tables and "ours" in names else []
    redis_proc, port = start_redis()
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis(port=port, decode_responses=True)
    ours = Ours(port, free_port())
    server = ours.start_server()
    rows: list[tuple[str, dict[str, Any]]] = []
    io: list[tuple[str, int, dict[str, Any]]] = []
    try:
        if "cpu" in tables:
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                system = ours if name == "ours" else OursPython(port) if name == "ours-py" \
                    else Peer(name, url)
                if name == "ours-py":
                    stop([server])  # not needed by client.enqueue: no server, as for a peer
                rows.append((name, measure(system, r, args.jobs, redis_proc.pid,
                                           server.pid if name == "ours" else None)))
                if name == "ours-py":
                    server = ours.start_server()
        if "cpu" in tables and "ours" in names:
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
        if "io" in tables:
            for label, system, concurrency in io_rows(ours, url, names):
                print(f"bench: I/O-bound, {label} ...", file=sys.stderr, flush=True)
                io.append((label, 2 * concurrency * 50,
                           measure_io(system, r, args.io_jobs, redis_proc.pid,
                                      server.pid if system.name == "ours" else None)))
        version = r.info("server")["redis_version"]
    finally:
        stop([server, redis_proc])
    print(f"\n{os.cpu_count()} cores, redis-server {version}, Python {sys.version.split()[0]}")
    cpu_head = (f"{'producer':>8} {'server':>6} {'workers':>7} {'Redis':>5} {'all':>6} "
                f"{'others':>6}")
    if rows:
        print(f"\nCPU-trivial job, jobs/s, N = {args.jobs:,}; CPU µs per job in e2e 2w, of "
              f"each kind of process; others: cores the rest of the machine kept busy then")
        print(f"{'system':8} {'enqueue':>8} {'drain 1w':>8} {'drain 2w':>8} {'e2e 1w':>8} "
              f"{'e2e 2w':>8} | {cpu_head}")
        for name, m in rows:
            print(f"{name:8} " + " ".join(f"{m[k]:8,.0f}" for k in
                                          ("enqueue", "drain1", "drain2", "e2e1", "e2e2"))
                  + f" | {cpu_columns(m['cpu'])}")
        print(f"a worker (1w, 2w) is one worker command at its defaults: "
              f"{'; '.join(worker_is(name) for name, _ in rows)}")
    if rows and "ours" in names:
        print(f"\nceiling (one connection, LPUSH; BLMOVE HSET LREM PUBLISH): {top:,.0f} jobs/s")
        print(f"latency submit→done over WebSocket, 500 sequential: p50 "
              f"{statistics.median(lat) * 1000:.2f} ms, p99 "
              f"{lat[int(len(lat) * 0.99)] * 1000:.2f} ms")
        print(f"fan-out, {args.watchers:,} watchers of one job: connect {fan['connect']:.2f} s, "
              f"publish→last heard {fan['last'] * 1000:.0f} ms, "
              f"server RSS {fan['rss'] / 1024:.1f} KiB/watcher")
        print(f"RSS: worker {worker_rss / 2**20:.1f} MiB, server {server_rss / 2**20:.1f} MiB "
              f"(after fan-out)")
    if io:
        print(f"\nI/O-bound job (waits 20 ms), 2 idle workers, N = {args.io_jobs:,}, first "
              "enqueue to last done; limit = 2 workers x jobs at once x 50/s; RSS of the "
              "larger worker (with its children); CPU µs per job of each kind of process; "
              "others: cores the rest of the machine kept busy")
        print(f"{'system':34} {'jobs/s':>6} {'limit':>6} {'%limit':>6} {'RSS MiB':>7} | "
              f"{cpu_head}")
        for label, limit, m in io:
            print(f"{label:34} {m['rate']:6,.0f} {limit:6,} {m['rate'] / limit:6.0%} "
                  f"{m['rss'] / 2**20:7.1f} | {cpu_columns(m)}")
    wrong = [m["wrong"] for _, m in rows if "wrong" in m] + \
        [f"{label}: {m['wrong']}" for label, _, m in io if "wrong" in m]
    if rows or io:
        print("results read back: " + ("; ".join(wrong) if wrong else
                                       "every job's, each its input upper-cased"))
    if clustered:
        print_cluster(clustered, args.jobs)


def cpu_columns(m: dict[str, float]) -> str:
    """CPU µs per job of each kind of process, and of all."""
    kinds = ("producer", "server", "workers", "redis")
    return (f"{m['producer']:8,.0f} {m['server']:6,.0f} {m['workers']:7,.0f} "
            f"{m['redis']:5,.0f} {sum(m[k] for k in kinds):6,.0f} {m['others']:6.2f}")


def worker_is(name: str) -> str:
    """What one worker command of the system is, at its defaults."""
    if name.startswith("ours"):
        return f"{name} 1 process, 16 slots"
    adapter = ADAPTERS[name]
    return f"{name} {adapter.worker_shape}"


def print_cluster(rows: list[tuple[str, dict[str, float], str, list[str]]], n: int) -> None:
    """The cluster table, and the scaling model its numbers give."""
    print(f"\n4 queues (a, b, c, d), one Redis vs local clusters: 2 workers x "
          f"{CLUSTER_CONCURRENCY} slots (--queues a,b,c,d), N = {n:,} over HTTP, first submit "
          f"to last done. CPU s per 1,000 jobs: of the Redis masters and replicas, our server, "
          f"workers, the submitter, all these; x: each ratio to one Redis's; others: cores the "
          f"rest of the machine kept busy")
    print(f"{'setup':32} {'jobs/s':>6} {'x':>5} {'masters':>7} {'replicas':>8} {'server':>6} "
          f"{'workers':>7} {'submitter':>9} {'all':>5} {'x':>5} {'others':>6}")
    base = rows[0][1]
    for label, m, _, _ in rows:
        print(f"{label:32} {m['rate']:6,.0f} {m['rate'] / base['rate']:5.2f} "
              f"{m['masters']:7.3f} {m.get('replicas', 0):8.3f} {m['server']:6.3f} "
              f"{m['workers']:7.3f} {m['submitter']:9.3f} {total(m):5.3f} "
              f"{total(m) / total(base):5.2f} {m['others']:6.2f}")
    for label, _, placed, logged in rows:
        if placed:
            print(f"{label.strip()}: {placed}")
        if logged:
            print(f"{label.strip()}: {len(logged) - 1} lines logged not routine, the first: "
                  f"{logged[0]} {logged[-1]}")
    print("model, from each row's CPU per job: jobs/s one saturated master core takes; cores "
          "100,000 jobs/s needs, of Redis masters and of our server + workers + submitter")
    for label, m, _, _ in rows:
        ours = m["server"] + m["workers"] + m["submitter"]
        print(f"  {label.strip():32} {1000 / m['masters']:7,.0f} jobs/s per master core; "
              f"100k jobs/s: {math.ceil(100 * m['masters']):3} masters, "
              f"{math.ceil(100 * ours):3} cores of ours")


def total(m: dict[str, float]) -> float:
    """CPU s per 1,000 jobs of every process the cluster table watched."""
    return sum(m.get(name, 0) for name in ("masters", "replicas", "server", "workers",
                                             "submitter"))


if __name__ == "__main__":
    main()
