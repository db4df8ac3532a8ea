"""Live progress and output (issue 17): a handler's progress and pieces reach every watcher of
its job as they are made, numbered (seq) with its states; a watcher that joins late or
reconnects with after=SEQ (or an EventSource's Last-Event-ID) gets exactly what it missed, once.
Real programs (server.py, worker.py) against the test's Redis, and on the cluster marker's
Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from playwright.sync_api import expect

from store import HISTORY, Client, Keys
from tests.conftest import ROOT, Procs, RedisServer, Subscription, free_port, wait_until

Message = tuple[int, str]  # (seq, the message as sent)


@pytest.fixture
def server(procs: Procs) -> Iterator[str]:
    port = free_port()
    procs.server(port)
    yield f"http://127.0.0.1:{port}"


def post(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST JSON with plain HTTP (no event loop: Playwright's sync API keeps one running)."""
    request = urllib.request.Request(base + path, data=json.dumps(body or {}).encode(),
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def submit(base: str, text: str) -> str:
    return str(post(base, "/submit", {"input": text})["id"])


def spec(**fields: Any) -> str:
    return json.dumps(fields)


def history(r: Client, prefix: str, job_id: str, queue: str = "default") -> list[Message]:
    """What the job's history holds: every message ever sent about it that it keeps, in
    order (as the server reads it: a lazy job's are rebuilt)."""
    keys = Keys(prefix, queue)
    reply = r.register_script(HISTORY)(keys=[keys.job(job_id), keys.history(job_id)],
                                       args=[keys.prefix, "", 0, job_id, 0, 1_000_000])
    first, entries = int(reply[0]), reply[1:]
    return [(first + n, data) for n, data in enumerate(entries)]


async def ws_messages(session: aiohttp.ClientSession, base: str, job_id: str,
                      after: int | None = None) -> AsyncGenerator[Message, None]:
    params = {"id": job_id} | ({} if after is None else {"after": str(after)})
    async with session.ws_connect(f"{base}/ws", params=params) as ws:
        async for message in ws:
            assert message.type is aiohttp.WSMsgType.TEXT, message
            yield json.loads(message.data)["seq"], message.data
        assert ws.close_code == 1000


async def sse_messages(session: aiohttp.ClientSession, base: str, job_id: str,
                       after: int | None = None, last_event_id: int | None = None
                       ) -> AsyncGenerator[Message, None]:
    """As an EventSource reads them: the id and data of each event."""
    params = {"id": job_id} | ({} if after is None else {"after": str(after)})
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with session.get(f"{base}/events", params=params, headers=headers) as response:
        if response.status == 204:
            return
        assert response.status == 200, await response.text()
        fields: dict[str, str] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if not line and fields:
                assert json.loads(fields["data"])["seq"] == int(fields["id"])
                yield int(fields["id"]), fields["data"]
                fields = {}
            elif line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value


async def read_all(messages: AsyncIterator[Message]) -> list[Message]:
    return [message async for message in messages]


def read(base: str, job_id: str, kind: str = "ws", **kwargs: Any) -> list[Message]:
    async def go() -> list[Message]:
        async with aiohttp.ClientSession() as s:
            source = ws_messages if kind == "ws" else sse_messages
            return await asyncio.wait_for(read_all(source(s, base, job_id, **kwargs)), 30)
    return asyncio.run(go())


def decoded(messages: list[Message]) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in messages]


def assert_whole(messages: list[Message]) -> None:
    """Numbered from 1, no gap, no duplicate."""
    assert [seq for seq, _ in messages] == list(range(1, len(messages) + 1))


@pytest.mark.cluster
def test_progress_and_output_reach_a_watcher_in_order(procs: Procs, server: str, r: Client,
                                                       prefix: str) -> None:
    procs.worker("--handler", "handlers:stream")
    job_id = submit(server, spec(pieces=50, seconds=0.5, every=10))
    messages = read(server, job_id, after=0)
    assert_whole(messages)
    assert messages == history(r, prefix, job_id)  # the same bytes, live or from history
    got = decoded(messages)
    states = [m for m in got if m["type"] == "state"]
    assert [m["status"] for m in states] == ["queued", "running", "done"]
    assert states[-1]["result"] == "streamed 50" and got[-1] == states[-1]
    output = [m for m in got if m["type"] == "output"]
    assert "".join(m["data"] for m in output) == "".join(f"{i} " for i in range(50))
    assert all(m["id"] == job_id and m["attempt"] == 1 for m in output)
    progress = [m for m in got if m["type"] == "progress"]
    assert [(m["done"], m["total"], m["message"]) for m in progress] == [
        (n, 50, f"{n} pieces") for n in range(10, 51, 10)]
    assert 2 < len(output) < 50  # written in batches, while it ran (0.5 s, 50 ms apart)
    assert got.index(progress[0]) < got.index(states[-1])

    async def text() -> tuple[str, dict[str, str]]:
        async with aiohttp.ClientSession() as s, \
                s.get(f"{server}/jobs/{job_id}/output") as response:
            assert response.status == 200 and response.content_type == "text/plain"
            return await response.text(), dict(response.headers)
    body, headers = asyncio.run(text())
    assert body == "".join(f"{i} " for i in range(50))
    assert (headers["Job-Status"], headers["Job-Attempt"]) == ("done", "1")


@pytest.mark.parametrize("handler", ["words", "async_words"])
def test_a_generator_streams_its_pieces_and_returns_them_joined(
        procs: Procs, server: str, handler: str) -> None:
    procs.worker("--handler", f"handlers:{handler}")
    job_id = submit(server, "the quick brown fox")
    got = decoded(read(server, job_id, after=0))
    assert got[-1]["result"] == "the quick brown fox "
    assert "".join(m["data"] for m in got if m["type"] == "output") == "the quick brown fox "


def test_a_generator_that_returns_a_value_has_it_as_its_result(procs: Procs,
                                                                server: str) -> None:
    procs.worker("--handler", "handlers:returns_its_own")
    got = decoded(read(server, submit(server, "x"), after=0))
    assert got[-1]["result"] == "the result"
    assert [m["data"] for m in got if m["type"] == "output"] == ["working... "]


def test_a_job_that_emits_nothing_has_only_its_states(procs: Procs, server: str) -> None:
    procs.worker()
    job_id = submit(server, "hello")
    got = decoded(read(server, job_id, after=0))
    assert [(m["type"], m["status"], m["seq"]) for m in got] == [
        ("state", "queued", 1), ("state", "running", 2), ("state", "done", 3)]
    # Without after: the current state first (with its seq), as before.
    assert decoded(read(server, job_id)) == [got[-1]]


@pytest.mark.cluster
def test_a_silent_job_stores_no_history_and_every_path_replays_byte_for_byte(
        procs: Procs, server: str, r: Client, prefix: str, tmp_path: Path) -> None:
    """A job that only goes queued, running, ended stores no history: its messages are rebuilt
    from its hash (it costs what it did before histories). Every other path stores them from
    where it leaves that one. Either way the history is exactly what was published."""
    queues = {name: Keys(prefix, name) for name in ("default", "again", "idle")}
    published = {name: Subscription(r, keys.events) for name, keys in queues.items()}
    procs.worker("--handler", "handlers:fails_once", "--max-attempts", "1")
    procs.worker("--handler", "handlers:fails_once", "--queues", "again")
    (tmp_path / "seen").touch()
    jobs = {  # name: (queue, id)
        "plain": ("default", submit(server, str(tmp_path / "seen"))),  # done at once
        "failed": ("default", submit(server, str(tmp_path / "once"))),  # fails: 1 attempt
        "retried": ("again", str(post(server, "/submit", {
            "input": str(tmp_path / "twice"), "queue": "again"})["id"])),  # done at the 2nd
        "cancelled": ("idle", str(post(server, "/submit", {
            "input": "no worker takes it", "queue": "idle"})["id"])),
    }
    assert decoded(read(server, jobs["failed"][1]))[-1]["status"] == "failed"
    post(server, f"/jobs/{jobs['failed'][1]}/retry")  # by hand: its second try is done
    post(server, f"/jobs/{jobs['cancelled'][1]}/cancel?queue=idle")
    assert decoded(read(server, jobs["failed"][1]))[-1]["status"] == "done"
    wait_until(lambda: all(
        json.loads(history(r, prefix, job_id, queue)[-1][1])["status"] in ("done", "cancelled")
        for queue, job_id in jobs.values()), what="every job to end")
    sent: dict[str, list[Message]] = {job_id: [] for _, job_id in jobs.values()}
    for subscription in published.values():
        while (message := subscription.get(timeout=1)) is not None:
            data = message["data"]
            sent[json.loads(data)["id"]].append((json.loads(data)["seq"], data))
    statuses = {name: [json.loads(data)["status"] for _, data in sent[job_id]]
                for name, (_, job_id) in jobs.items()}
    assert statuses == {"plain": ["queued", "running", "done"],
                        "failed": ["queued", "running", "failed", "queued", "running", "done"],
                        "retried": ["queued", "running", "delayed", "queued", "running", "done"],
                        "cancelled": ["queued", "cancelled"]}
    for name, (queue, job_id) in jobs.items():
        assert_whole(sent[job_id])
        assert history(r, prefix, job_id, queue) == sent[job_id], name
        stored = r.exists(queues[queue].history(job_id)) == 1
        assert stored == (name in ("failed", "retried")), name
    for name in ("plain", "failed"):  # and so a watcher gets them, after any of them
        job_id = jobs[name][1]
        for after in range(len(sent[job_id])):
            assert read(server, job_id, after=after) == sent[job_id][after:], (name, after)
        assert read(server, job_id, "sse", after=1) == sent[job_id][1:]


@pytest.mark.cluster
def test_after_last_event_id_and_the_end(procs: Procs, server: str, r: Client,
                                         prefix: str) -> None:
    procs.worker("--handler", "handlers:stream")
    job_id = submit(server, spec(pieces=30, seconds=0.3, every=10))
    whole = read(server, job_id, after=0)
    last = whole[-1][0]
    for kind in ("ws", "sse"):
        assert read(server, job_id, kind, after=5) == whole[5:]
        assert read(server, job_id, kind, after=last) == []  # ended: nothing after the end
    # An EventSource reconnects to the URL it was made with: its Last-Event-ID wins.
    assert read(server, job_id, "sse", after=0, last_event_id=7) == whole[7:]
    assert read(server, job_id, "sse", after=0, last_event_id=last) == []  # 204

    async def status(**headers: str) -> int:
        async with aiohttp.ClientSession() as s, \
                s.get(f"{server}/events", params={"id": job_id}, headers=headers) as response:
            return response.status
    assert asyncio.run(status(**{"Last-Event-ID": str(last)})) == 204
    assert asyncio.run(status(**{"Last-Event-ID": "x"})) == 400


def test_history_is_bounded_and_a_late_watcher_is_told_what_it_missed(
        procs: Procs, server: str, r: Client, prefix: str) -> None:
    procs.worker("--handler", "handlers:stream", "--max-output", "400")
    job_id = submit(server, spec(pieces=200, seconds=1.0, every=50))
    live = read(server, job_id, "ws", after=0)  # joined before much was made: misses little
    late = decoded(read(server, job_id, "sse", after=0))
    assert late[0]["type"] == "trimmed" and late[0]["id"] == job_id
    kept = history(r, prefix, job_id)
    assert late[0]["missed"] == late[0]["seq"] == kept[0][0] - 1
    assert [m["seq"] for m in late[1:]] == [seq for seq, _ in kept]
    assert sum(len(data) for _, data in kept[:-1]) <= 400 + 200  # states are not counted
    assert late[-1]["status"] == "done" and late[-1]["result"] == "streamed 200"
    assert live[-1][1] == kept[-1][1]
    body = post_get_text(server, f"/jobs/{job_id}/output")
    assert body and "199 " in body and not body.startswith("0 ")


def post_get_text(base: str, path: str) -> str:
    async def go() -> str:
        async with aiohttp.ClientSession() as s, s.get(base + path) as response:
            return await response.text()
    return asyncio.run(go())


@pytest.mark.cluster
@pytest.mark.parametrize("handler", ["stream", "words"])
def test_a_cancelled_stream_ends_with_its_cancelled_state(procs: Procs, server: str,
                                                          handler: str) -> None:
    procs.worker("--handler", f"handlers:{handler}")
    text = spec(pieces=100_000, seconds=100) if handler == "stream" else "a " * 10_000
    job_id = submit(server, text)

    async def go() -> list[Message]:
        got: list[Message] = []
        async with aiohttp.ClientSession() as s:
            async for message in ws_messages(s, server, job_id, after=0):
                got.append(message)
                if json.loads(message[1])["type"] == "output" and len(got) == 4:
                    async with s.post(f"{server}/jobs/{job_id}/cancel") as response:
                        assert response.status == 202
        return got
    got = asyncio.run(asyncio.wait_for(go(), 30))
    assert_whole(got)
    assert decoded(got)[-1]["status"] == "cancelled"


@pytest.mark.parametrize("handler", ["words", "async_words"])
def test_a_time_limit_stops_a_generator(procs: Procs, server: str, handler: str) -> None:
    procs.worker("--handler", f"handlers:{handler}", "--timeout", "0.5", "--max-attempts", "1")
    job_id = submit(server, "a " * 1000)
    got = decoded(read(server, job_id, after=0))
    assert got[-1]["status"] == "failed" and "timed out" in got[-1]["error"]
    assert any(m["type"] == "output" for m in got)


def test_a_retried_try_is_told_apart_by_attempt(procs: Procs, server: str, tmp_path: Path
                                               ) -> None:
    procs.worker("--handler", "handlers:fails_after_output")
    job_id = submit(server, str(tmp_path / "once"))
    got = decoded(read(server, job_id, after=0))
    output = [(m["attempt"], m["data"]) for m in got if m["type"] == "output"]
    assert output == [(1, "first try "), (2, "second try ")]
    assert got[-1]["status"] == "done" and got[-1]["attempts"] == 2


def test_metrics_count_output_bytes(procs: Procs, server: str) -> None:
    procs.worker("--handler", "handlers:words")
    read(server, submit(server, "héllo wörld"), after=0)  # "héllo " "wörld ": 7 + 7 bytes
    metrics = post_get_text(server, "/metrics")
    assert "jobs_output_bytes_total 14" in metrics.splitlines(), metrics


# -- the targets: 200 watchers joining at random moments and resuming at random --------------

async def a_watcher(session: aiohttp.ClientSession, base: str, job_id: str, kind: str,
                    rng: random.Random, join_within: float) -> list[Message]:
    """Join at a random moment, from the start (after=0); drop the connection 3 times at
    random and resume after the last message seen (an EventSource's way over SSE: the URL it
    was made with, and Last-Event-ID)."""
    await asyncio.sleep(rng.uniform(0, join_within))
    got: list[Message] = []
    for drops_left in (3, 2, 1, 0):
        limit = rng.randint(1, 40) if drops_left else None
        last = got[-1][0] if got else None
        source = (ws_messages(session, base, job_id, after=last or 0) if kind == "ws"
                  else sse_messages(session, base, job_id, after=0, last_event_id=last))
        async with contextlib.aclosing(source) as messages:
            async for message in messages:
                got.append(message)
                if limit is not None and (limit := limit - 1) == 0:
                    break
            else:
                if drops_left:  # ended before this watcher dropped it: still resumes
                    continue
                return got
        await asyncio.sleep(rng.uniform(0, 0.3))
    return got


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["ws", "sse"])
def test_200_watchers_joining_and_resuming_at_random_see_the_same_sequence(
        procs: Procs, server: str, r: Client, prefix: str, tmp_path: Path, kind: str) -> None:
    """2,000 pieces over 4 s, progress every 100; 200 watchers joining before, during and
    after it, each dropping its connection 3 times: all see exactly the job's history."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    procs.worker("--handler", "handlers:stream")
    gate = tmp_path / "gate"
    job_id = submit(server, spec(pieces=2000, seconds=4, every=100, gate=str(gate)))

    async def go() -> list[list[Message]]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            watchers = [asyncio.create_task(a_watcher(s, server, job_id, kind,
                                                      random.Random(rng.random()), 7.0))
                        for _ in range(200)]
            await asyncio.sleep(1.0)
            gate.touch()  # the job starts: a sixth of the watchers joined before
            return await asyncio.wait_for(asyncio.gather(*watchers), 60)
    seen = asyncio.run(go())
    whole = history(r, prefix, job_id)
    assert_whole(whole)
    got = decoded(whole)
    assert got[-1]["status"] == "done"
    assert "".join(m["data"] for m in got if m["type"] == "output") == \
        "".join(f"{i} " for i in range(2000))
    assert sum(m["type"] == "progress" for m in got) == 20
    for n, messages in enumerate(seen):
        assert messages == whole, f"watcher {n} (seed {seed})"


def client(procs: Procs, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, env=procs.env(),
                          capture_output=True, text=True, timeout=60)


def test_the_client_prints_the_output_as_it_comes(procs: Procs, server: str) -> None:
    procs.worker("--handler", "handlers:words")
    result = client(procs, "--server", server, "one two three")
    assert (result.returncode, result.stdout) == (0, "one two three \n"), result.stderr  # once


def test_the_client_shows_progress_and_a_result_that_is_not_the_output(procs: Procs,
                                                                       server: str) -> None:
    procs.worker("--handler", "handlers:stream")
    job_id = submit(server, spec(pieces=20, seconds=0.4, every=5))
    result = client(procs, "--server", server, "--watch", job_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{i} " for i in range(20)) + "\nstreamed 20\n"
    assert "20/20 20 pieces" in result.stderr  # stderr is no terminal: a line per change


def test_the_client_prints_a_result_other_than_the_output(procs: Procs, server: str) -> None:
    procs.worker("--handler", "handlers:returns_its_own")
    result = client(procs, "--server", server, "x")
    assert (result.returncode, result.stdout) == (0, "working... \nthe result\n"), result.stderr


def test_the_library_follows_a_job(procs: Procs, server: str) -> None:
    import client as library
    procs.worker("--handler", "handlers:words")
    job_id = submit(server, "one two")
    messages = list(library.follow(job_id, server=server))
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert messages[-1]["status"] == "done"
    assert "".join(m["data"] for m in messages if m["type"] == "output") == "one two "


def test_a_full_redis_refuses_pieces_and_the_result_still_counts(
        own_redis: RedisServer, tmp_path: Path) -> None:
    """On a Redis of the test's own (it is made full: the suite's shared one is not)."""
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    procs, prefix = Procs(own_redis.url, "{full}", tmp_path), "{full}"
    try:
        port = free_port()
        procs.server(port)
        worker = procs.worker("--handler", "handlers:stream")
        gate = tmp_path / "gate"
        job_id = submit(f"http://127.0.0.1:{port}",
                        spec(pieces=400, seconds=2, every=0, gate=str(gate)))
        wait_until(lambda: r.hget(Keys(prefix).job(job_id), "status") == "running",
                   what="the job to run")
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", max(int(r.info("memory")["used_memory"]) - 2**20, 1))
        gate.touch()
        wait_until(lambda: r.hget(Keys(prefix).job(job_id), "status") == "done",
                   what="the job to end", timeout=30)
        assert r.hget(Keys(prefix).job(job_id), "result") == "streamed 400"
        assert "refused a job's output" in procs.log(worker)
    finally:
        procs.stop_all()
        r.close()


async def test_a_slow_watcher_reads_what_it_missed_from_the_history(
        procs: Procs, server: str, r: Client, prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, aiohttp_client: Any, redis_url: str) -> None:
    """A watcher whose sends wait (a slow peer) falls BACKLOG behind: it drops what is
    pending and reads it from the history, delaying nobody; it misses nothing."""
    import server as server_module
    monkeypatch.setattr(server_module, "BACKLOG", 4)
    app = server_module.make_app(redis_url, prefix=prefix)
    await aiohttp_client(app)
    hub = app[server_module.HUB]
    gate = tmp_path / "gate"
    job_id = await asyncio.to_thread(
        submit, server, spec(pieces=200, seconds=1, every=20, gate=str(gate)))
    procs.worker("--handler", "handlers:stream")
    keys = Keys(prefix)
    slow, sent = asyncio.Event(), []
    fast: list[Message] = []

    async def slow_send(update: Any) -> None:
        await slow.wait()
        sent.append((update.seq, update.data.decode()))

    async def fast_send(update: Any) -> None:
        fast.append((update.seq, update.data.decode()))

    async with hub.watch(keys, job_id) as a, hub.watch(keys, job_id) as b:
        assert a is not None and b is not None
        streams = [server_module.Stream(hub, keys, job_id, *a, 0),
                   server_module.Stream(hub, keys, job_id, *b, 0)]
        relays = [asyncio.create_task(streams[0].relay(slow_send)),
                  asyncio.create_task(streams[1].relay(fast_send))]
        gate.touch()
        await asyncio.wait_for(relays[1], 30)  # the fast one ends, the slow one waits
        assert a[0].overflowed and not relays[0].done()
        slow.set()
        assert await asyncio.wait_for(relays[0], 30)
    whole = await asyncio.to_thread(history, r, prefix, job_id)
    assert sent == fast == whole


def test_a_stream_goes_on_across_a_sentinel_failover(sentinels: Any, procs: Procs) -> None:
    """Over Sentinel, the master is killed while a job streams: the worker writes on to the new
    master, the job ends done, a follower that was watching (client.follow) gets to its end,
    and the job's history is whole: numbered without a gap, each piece once and in order."""
    import threading

    import client as library
    procs.redis_url = sentinels.url
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.server(port)
    procs.worker("--handler", "handlers:stream", "--lease", "10")
    job_id = submit(base, spec(pieces=300, seconds=4, every=50))
    followed: list[dict[str, Any]] = []
    follower = threading.Thread(target=lambda: followed.extend(library.follow(job_id,
                                                                              server=base)))
    follower.start()
    wait_until(lambda: sum(m.get("type") == "output" for m in followed) >= 3,
               what="output to flow")
    sentinels.kill_master()
    sentinels.wait_failover()
    follower.join(timeout=60)
    assert not follower.is_alive() and followed[-1]["status"] == "done"
    got = decoded(read(base, job_id, after=0))
    assert [m["seq"] for m in got] == list(range(1, len(got) + 1))
    assert got[-1]["status"] == "done" and got[-1]["result"] == "streamed 300"
    numbers = [int(n) for m in got if m["type"] == "output" for n in m["data"].split()]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 299  # none twice, in order


# -- a real browser: its EventSource, and the dashboard (last in this file: Playwright's sync
# API keeps an event loop running in this thread from then on, so asyncio.run fails) ---------

# EventSources on one job, opened at the given moments (ms), each with after=0 in its URL; each
# follows until the browser gives up on it for good (the 204 after the end: CLOSED). In
# window.seen, for each: the [lastEventId, data] of its events, its errors (reconnections), and
# whether it is over.
EVENTSOURCES = """([id, delays]) => {
  window.seen = delays.map(() => ({events: [], errors: 0, over: false}));
  delays.forEach((delay, n) => setTimeout(() => {
    const es = new EventSource(`/events?id=${id}&after=0`);
    const seen = window.seen[n];
    es.onmessage = (e) => seen.events.push([e.lastEventId, e.data]);
    es.onerror = () => {
      seen.errors++;
      if (es.readyState === EventSource.CLOSED) { es.close(); seen.over = true; }
    };
  }, delay));
}"""


def test_a_browsers_eventsources_resume_after_a_server_restart(
        browser: Any, procs: Procs, r: Client, prefix: str, tmp_path: Path) -> None:
    """Real EventSources joining before, during and after a job of 2,000 pieces; the server
    is killed and started again as it runs: each reconnects by itself (Last-Event-ID) and
    gets exactly the job's history."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = procs.server(port)
    procs.worker("--handler", "handlers:stream")
    gate = tmp_path / "gate"
    job_id = submit(base, spec(pieces=2000, seconds=4, every=100, gate=str(gate)))
    page = browser.new_page()
    try:
        page.goto(f"{base}/healthz")
        page.evaluate(EVENTSOURCES, [job_id, [0, 500, 2500, 4000, 9000]])
        time.sleep(1.0)
        gate.touch()
        wait_until(lambda: r.hget(Keys(prefix).job(job_id), "seq") not in (None, "1", "2", "3"),
                   what="output to flow")
        time.sleep(1.0)  # mid-stream
        server.kill()
        server.wait()
        procs.server(port)
        page.wait_for_function("window.seen.every((s) => s.over)", timeout=40_000)
        seen = page.evaluate("window.seen")
    finally:
        page.close()
    whole = history(r, prefix, job_id)
    assert_whole(whole)
    assert json.loads(whole[-1][1])["status"] == "done"
    for n, watcher in enumerate(seen):
        assert [(int(i), data) for i, data in watcher["events"]] == whole, f"EventSource {n}"
    assert any(watcher["errors"] > 1 for watcher in seen)  # reconnected after the restart


def test_the_dashboard_shows_progress_and_a_clicked_jobs_output(
        browser: Any, procs: Procs, r: Client, prefix: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.server(port)
    procs.worker("--handler", "handlers:stream")
    page = browser.new_page()
    try:
        page.goto(base)
        job_id = submit(base, spec(pieces=300, seconds=6, every=10))
        row = page.locator(f'#jobs tr[data-id="{job_id}"]')
        expect(row.locator(".progress progress")).to_be_visible(timeout=15_000)
        expect(row.locator(".progress")).to_contain_text("pieces")
        row.locator("td.text").first.click()
        expect(page.locator("#output-panel")).to_be_visible()
        expect(page.locator("#output-text")).to_contain_text("0 1 2 3 ")  # from the first
        expect(page.locator("#output-status")).to_have_text("done", timeout=20_000)
        assert page.locator("#output-text").text_content() == "".join(
            f"{i} " for i in range(300))
    finally:
        page.close()

