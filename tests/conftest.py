"""Shared fixtures: a real Redis (REDIS_URL, default the local one), a key prefix per test,
and processes that are always stopped by their pid.

A test marked `cluster` runs twice: as [redis] against that Redis, and as [cluster] against a
Redis Cluster of 3 masters and 3 replicas, one for the whole session, started at the first
such test (pytest_generate_tests parametrizes the `backend` fixture; redis_url follows it, and
with it r, prefix, procs and every fixture built on them). -k "[cluster" selects the cluster
runs alone, -k "not [cluster" leaves them out."""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import redis
import redis.cluster
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, settings

from server import make_app
from store import RETENTION, SUBMIT, Client, Keys, connect, new_jobs, submit_args

if TYPE_CHECKING:  # tests.topologies imports this module: imported where used
    from playwright.sync_api import Browser, ConsoleMessage, Page

    from tests.topologies import Cluster, Sentinels, Topology

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
TopologyT = TypeVar("TopologyT", bound="Topology")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, what: str = "") -> T:
    """Poll until predicate() is truthy, failing the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)
    return value


async def eventually(predicate: Callable[[], Awaitable[T]], within: float = 15.0,
                     what: str = "") -> T:
    deadline = time.monotonic() + within
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)
    return value


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Stop a process we started, by its pid, and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(timeout=30)


class Procs:
    """Starts the project's programs as subprocesses; stops every one of them at teardown."""

    def __init__(self, redis_url: str, prefix: str, tmp: Path) -> None:
        self.redis_url, self.prefix, self.tmp = redis_url, prefix, tmp
        self.started: list[subprocess.Popen[Any]] = []
        self.logs: dict[int, Path] = {}

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "REDIS_URL": self.redis_url, "JOBS_PREFIX": self.prefix,
                "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PYTHONUNBUFFERED": "1",
                **extra}

    def start(self, *args: str, log: str = "", **kwargs: Any) -> subprocess.Popen[str]:
        path = self.tmp / (log or f"proc{len(self.started)}.log")
        with open(path, "w") as out:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    text=True, env=kwargs.pop("env", self.env()), **kwargs)
        self.started.append(proc)
        self.logs[proc.pid] = path
        return proc

    def worker(self, *args: str) -> subprocess.Popen[str]:
        return self.start(sys.executable, "worker.py", "--lease", "3", "--backoff", "0.05",
                          *args, log=f"worker{len(self.started)}.log")

    def server(self, port: int, *args: str) -> subprocess.Popen[str]:
        proc = self.start(sys.executable, "server.py", "--port", str(port), *args,
                          log=f"server{len(self.started)}.log")
        wait_until(lambda: port_open(port) or proc.poll() is not None, what="server to listen")
        assert proc.poll() is None, "server exited at start"
        return proc

    def log(self, proc: subprocess.Popen[str]) -> str:
        return self.logs[proc.pid].read_text()

    def stop_all(self) -> None:
        for proc in self.started:
            stop(proc)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def enqueue(client: Client, prefix: str, text: str, queue: bool = True) -> str:
    """Queue a job the way POST /submit does (or only store it); return its id."""
    jobs, keys = new_jobs([text]), Keys(prefix)
    if queue:
        client.register_script(SUBMIT)(keys=[keys.queue],
                                       args=submit_args(prefix, RETENTION, jobs, None))
    else:
        client.hset(keys.job(str(jobs[0]["id"])), mapping=jobs[0])  # type: ignore[arg-type]
    return str(jobs[0]["id"])


def job(client: Client, prefix: str, job_id: str) -> dict[str, str]:
    return client.hgetall(Keys(prefix).job(job_id))  # type: ignore[return-value]


def processing_keys(client: Client, prefix: str) -> list[str]:
    """The processing lists that exist (an empty list is no key). On a cluster, scan_iter
    scans every master."""
    return list(client.scan_iter(match=f"{prefix}:processing:*"))


def delete_prefix(client: Client, prefix: str) -> None:
    """Delete the keys of prefix's queues: the default's ({test-x}:...) and, for a prefix with
    a hash tag, the named queues' ({test-x:emails}:...), on every master of a cluster."""
    patterns = [f"{prefix}:*"] + ([f"{prefix[:-1]}:*}}:*"] if prefix.endswith("}") else [])
    keys = [key for pattern in patterns for key in client.scan_iter(match=pattern, count=1000)]
    if keys:
        client.delete(*keys)  # a cluster client sends each slot's keys to its master


class Subscription:
    """A sharded pub/sub subscription (SSUBSCRIBE, as the scripts SPUBLISH), confirmed before
    anything is published; on a cluster, on the node of the channel's slot."""

    def __init__(self, client: Client, channel: str) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.ssubscribe(channel)
        confirmed = wait_until(lambda: self.get(timeout=1), what="the subscription")
        assert confirmed is not None and confirmed["type"] == "ssubscribe", confirmed

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None if none comes within timeout seconds."""
        if isinstance(self.pubsub, redis.cluster.ClusterPubSub):
            return self.pubsub.get_sharded_message(timeout=timeout)  # type: ignore[no-any-return]
        return self.pubsub.get_message(timeout=timeout)  # type: ignore[no-any-return]

    def done(self, timeout: float) -> collections.Counter[str]:
        """How many `done` messages each job got, until none comes for timeout seconds."""
        done: collections.Counter[str] = collections.Counter()
        while (message := self.get(timeout)) is not None:
            event = json.loads(message["data"])
            if event["status"] == "done":
                done[event["id"]] += 1
        return done

    def close(self) -> None:
        self.pubsub.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked cluster runs as [redis] and [cluster]; marked cluster(only=True), as
    [cluster] alone."""
    marker = metafunc.definition.get_closest_marker("cluster")
    if marker is not None:
        backends = ["cluster"] if marker.kwargs.get("only") else ["redis", "cluster"]
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """What redis_url points at: "redis", or "cluster" in a marked test's [cluster] run."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> str:
    """The Redis of this test: the session's one Redis, or the session's cluster."""
    if backend == "cluster":
        return str(request.getfixturevalue("shared_cluster").url)
    return str(request.getfixturevalue("single_redis_url"))


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[Cluster]:
    """The session's Redis Cluster (3 masters, 3 replicas) for the [cluster] runs, started when
    the first asks for it and stopped, each node by its pid, at the end. Each test's keys are
    under a prefix of its own, as on the one Redis; a test that kills nodes builds its own
    (the `cluster` fixture)."""
    from tests.topologies import Cluster
    yield from running(Cluster(), "shared cluster")


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    """REDIS_URL (default the local Redis); if none answers there and REDIS_URL is not set,
    a throwaway redis-server of the session's own, so the tests need only the binary."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if RedisServer.answers(redis.Redis.from_url(url)) or "REDIS_URL" in os.environ:
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail(f"no Redis answers at {url}, and redis-server is not installed to start one")
    folder = Path(tempfile.mkdtemp(prefix="jobs-test-redis-"))
    server = RedisServer(folder)
    server.start()
    yield server.url
    server.stop(signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted before and after."""
    name = f"{{test-{uuid.uuid4().hex[:12]}}}"
    client = connect(redis_url, decode_responses=True)
    try:
        client.ping()
    except (redis.ConnectionError, redis.exceptions.RedisClusterException) as exc:
        pytest.fail(f"tests need a Redis at {redis_url} (set REDIS_URL): {exc}")
    yield name
    delete_prefix(client, name)
    client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[Client]:
    """A client of the test's Redis: on a cluster, a cluster client (commands go by key)."""
    client = connect(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def procs(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(redis_url, prefix, tmp_path)
    yield p
    p.stop_all()


HTTPClient = TestClient[Any, Any]  # of an in-process server
MakeClient = Callable[..., Awaitable[HTTPClient]]


@pytest.fixture
async def make_client(aiohttp_client: Any, redis_url: str, prefix: str) -> MakeClient:
    """An in-process server (make_app, its settings given) and a client of it; `redis_url`
    may be given too."""
    async def make(**kwargs: Any) -> HTTPClient:
        return await aiohttp_client(  # type: ignore[no-any-return]
            make_app(kwargs.pop("redis_url", redis_url), prefix=prefix, **kwargs))
    return make


@pytest.fixture
async def client(make_client: MakeClient) -> HTTPClient:
    return await make_client()


async def call(client: HTTPClient, method: str, path: str, expect: int, **kwargs: Any) -> Any:
    """Make a request, check its status (and that an error is JSON {"error": "..."}), return
    the JSON body (None if there is none)."""
    response = await client.request(method, path, **kwargs)
    body = await response.read()
    assert response.status == expect, (method, path, response.status, body[:500])
    if response.status >= 400:
        assert response.content_type == "application/json", body[:500]
        assert isinstance(json.loads(body)["error"], str)
    return json.loads(body) if body else None


@pytest.fixture
def server(procs: Procs) -> Iterator[str]:
    """A server process of the test's own; its address."""
    port = free_port()
    procs.server(port)
    yield f"http://127.0.0.1:{port}"


class RedisServer:
    """A redis-server of the test's own on a free port, with AOF in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.folder / "redis.log")])
        wait_until(lambda: self.answers(redis.Redis(port=self.port)),
                   what="redis-server to answer")

    @staticmethod
    def answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)
            self.proc = None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed on PATH for the restart tests")
    folder = Path(tempfile.mkdtemp(prefix="jobs-redis-"))
    server = RedisServer(folder)
    server.start()
    yield server
    server.stop(signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


# -- a real browser, and Redis topologies, for the tests that need them ------------------------

class Console:
    """What the page said on its console, and the errors it threw."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        page.on("console", self.heard)
        page.on("pageerror", lambda exc: self.messages.append(f"pageerror: {exc}"))

    def heard(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.messages.append(f"{message.type}: {message.text} ({message.location})")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, driven by Playwright (CHROMIUM: another executable)."""
    from playwright.sync_api import sync_playwright
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if executable is None:
        pytest.fail("the browser tests need chromium: apt-get install chromium (or set CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


def running(topology: TopologyT, what: str) -> Iterator[TopologyT]:
    """A fixture's topology: started (the time it took printed), then stopped, each process
    reaped by its pid and the folder gone."""
    from tests.topologies import timed
    try:
        timed(f"{what} start", topology.start)
        yield topology
    finally:
        topology.stop()
    assert not any(server.alive() for server in topology.servers)
    assert not topology.root.exists()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A Redis Cluster of 3 masters and 3 replicas of the test's own (tests/topologies.py)."""
    from tests.topologies import Cluster
    yield from running(Cluster(), "cluster")


@pytest.fixture
def cluster_stack(cluster: Cluster, procs: Procs) -> Procs:
    """procs whose programs get REDIS_URL=the cluster's URL (stopped before the cluster)."""
    procs.redis_url = cluster.url
    return procs


@pytest.fixture
def sentinels() -> Iterator[Sentinels]:
    """A master, a replica and 3 Sentinels of the test's own (tests/topologies.py)."""
    from tests.topologies import Sentinels
    yield from running(Sentinels(), "sentinel")


# -- fuzzing the server over a plain socket -----------------------------------------------------

fuzz = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def plain(base: str, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A request over a plain socket: (status, JSON body, or the text of /metrics); an error
    body must be JSON, and a 401 must say how to authenticate."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        payload = response.read()
        assert response.status < 500, (method, path, body, response.status, payload[:300])
        if response.status == 204:
            return response.status, None
        if response.status == 200 and path.startswith("/metrics"):
            return response.status, payload.decode()
        parsed = json.loads(payload)
        if response.status >= 400:
            assert isinstance(parsed["error"], str), parsed
        if response.status == 401:
            assert response.getheader("WWW-Authenticate") == "Bearer"
        return response.status, parsed
    finally:
        connection.close()
