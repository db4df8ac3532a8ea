"""Job queue HTTP server: accepts jobs, streams their progress live, and lets operators steer.

    python server.py [--host HOST] [--port PORT] [--redis-url URL] [--token-file FILE]

POST /submit {"input": "..."} stores a job and queues it in one step (also later: "delay" or
"run_at"; or many: "inputs"; a "priority" from 1 to 9, higher first; a "group" that shares the
queue fairly with the others); GET /status?id=ID reads it; GET /ws?id=ID (WebSocket) and GET
/events?id=ID (Server-Sent Events) send the job's current state, then each change (and its
progress and output as a handler streams them), and close once it has ended (&after=SEQ: the
job's messages after that one, from its history in Redis, then the live ones); GET
/jobs/ID/output is what it has streamed so far; GET /healthz says whether Redis answers. For
operators: GET /jobs lists a state's jobs, POST /jobs/ID/cancel and /jobs/ID/retry steer one,
GET /queues lists the queues, PUT /queues/NAME sets a queue's limits (rate, concurrency, and
each group's), POST /queues/NAME/pause and /resume stop and restart its starts, GET /stats and
/metrics (Prometheus) count, and GET / is a live dashboard fed by GET /feed. With a token set,
every request but /healthz and the dashboard's files must carry it. Every error is JSON:
{"error": "..."}. The server holds one pub/sub subscription per queue (sharded: on a Redis
Cluster, on the node of the queue's slot) and fans each message out to the watchers of that job,
so any number of servers can share one Redis with any number of workers (see worker.py); the
numbers live in Redis, so every server reports the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import resource
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from redis.asyncio import cluster as redis_cluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, NoScriptError, OutOfMemoryError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from store import (
    CANCEL,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DUE,
    HISTORY,
    LIST,
    PREFIX,
    QUEUE,
    QUEUE_NAME,
    REDIS_ERRORS,
    RETENTION,
    RETRY,
    RUNTIME_BUCKETS,
    SCHEDULE,
    SCHEDULE_TICK,
    SETTINGS,
    STATES,
    STATS,
    SUBMIT,
    TERMINAL,
    UNAVAILABLE,
    UNLOCK,
    UNSCHEDULE,
    WAIT_MS,
    WRITABLE,
    AsyncClient,
    Keys,
    Nodes,
    Submission,
    connect_async,
    expires_of,
    from_env,
    group_of,
    new_jobs,
    next_tick,
    non_empty,
    now,
    number,
    plan_ticks,
    priority_of,
    queues_to_tick,
    redis_said,
    redis_url,
    rfc3339,
    schedule_fields,
    schedule_shown,
    settings_fields,
    settings_of,
    submit_args,
)

log = logging.getLogger("server")

MAX_INPUT_BYTES = 1 << 20  # request bodies above this are refused with 413
HEARTBEAT = 30.0  # seconds between WebSocket pings and SSE keepalive comments
POOL_SIZE = 128  # Redis connections; a request waits for a free one rather than failing
POOL_WAIT = 5.0  # seconds a request waits for a pooled connection before 503
BACKLOG = 32  # messages kept for a watcher that reads slowly (then it reads the job's history)
HISTORY_PAGE = 500  # messages of a job's history read at once
RESUBSCRIBE_MAX = 1.0  # seconds between tries to subscribe again, at most (a failover: ~2-3 s)
ID_PATTERN = re.compile(r"[0-9a-f]{32}")
CURSOR = re.compile(r"([0-9]{1,17})-([0-9a-f]{32})")  # a next_cursor of GET /jobs
TOTALS = ("submitted", "done", "failed", "retried", "cancelled")  # {prefix}:counters
PAGE, MAX_PAGE = 50, 500  # jobs per page of GET /jobs: by default, at most
IDEMPOTENCY_TTL = 86_400  # seconds an Idempotency-Key is remembered
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")  # printable ASCII
FEED_EVERY = 0.25  # seconds between the batches of /feed
UNRUN = (NoScriptError, AskError, TryAgainError)  # a script refused, unrun (AskError: MOVED too)
LINGER = 10.0  # seconds a queue nobody watches stays followed (one who watches job after job)
FEED_SUBSCRIBE = 2.0  # seconds a /feed waits for its subscriptions before it opens, at most
FEED_MAX = 500  # jobs in one batch at most: the newest changed (the page shows fewer)
FEED_CUT = 256  # characters of a result or an error a /feed message carries at most
FEED_STALL = 10.0  # seconds a /feed write may wait on a reader before it is cut off
STATIC = Path(__file__).resolve().parent / "static"  # the dashboard
STATIC_FILES = frozenset(("index.html", "app.js", "style.css"))
MESSAGE_FIELDS = ("id", "status", "result", "error", "attempts", "updated", "version")


@dataclass(frozen=True)
class Update:
    """One message of one job (a state; or progress, output: see worker.Output), as sent to
    watchers: JSON encoded once for all of them. `seq` numbers a job's messages from 1 (0: a
    state published by a program older than seq)."""

    version: int
    terminal: bool
    data: bytes
    seq: int = 0
    kind: str = "state"


class Watcher:
    """The updates waiting for one WebSocket or SSE stream. None means: the server is closing.
    A job's watcher is `resumable`: should it fall BACKLOG messages behind, it drops them all
    and is `behind`: it reads what it missed from the job's history (see relay). A /feed
    stream's drops the oldest and is `overflowed`: it must start over."""

    def __init__(self, resumable: bool = False) -> None:
        self._pending: deque[Update | None] = deque()
        self._ready = asyncio.Event()
        self.resumable = resumable
        self.overflowed = False
        self.behind = False
        self.first: Update | None = None  # a job's state when it began watching
        self.floor = 0  # ... and the seq of the job's last message then

    def put(self, update: Update | None) -> None:
        if self._pending and self._pending[-1] is None:
            return  # closing: nothing more is sent
        if update is not None and len(self._pending) >= BACKLOG:
            self.overflowed = True
            if self.resumable:  # all of them are in the job's history
                self._pending.clear()
                self.catch_up()
                return
            self._pending.popleft()
        self._pending.append(update)
        self._ready.set()

    def catch_up(self) -> None:
        """Have the stream read the job's history before its next live message."""
        self.behind = True
        self._ready.set()

    async def get(self) -> Update | None:
        """The next update; or, when `behind` (nothing pending then), the last one again."""
        while not self._pending and not self.behind:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft() if self._pending else CATCH_UP


CATCH_UP = Update(0, False, b"")  # what Watcher.get returns when it is to read history
OUTPUT_HEAD = '{"type":"output","id":"'  # how an output message (worker.Output) begins


async def read_job(redis: AsyncClient, key: str) -> dict[str, str]:
    """A job hash as a dict ({} if there is no such job)."""
    return await redis.hgetall(key)  # type: ignore[return-value]  # decode_responses=True


def update_from_job(job: dict[str, str]) -> Update:
    """The state message for a job hash as read from Redis (the same shape the worker
    publishes), with the seq of the job's last state."""
    message: dict[str, str | int] = {"type": "state"}
    message |= {f: job.get(f, "") for f in MESSAGE_FIELDS}
    message["attempts"] = int(job.get("attempts", 0))
    message["version"] = version = int(job.get("version", 0))
    message["seq"] = seq = state_seq(job)
    return Update(version, job["status"] in TERMINAL, json.dumps(message).encode(), seq)


def state_seq(job: dict[str, str]) -> int:
    """The seq of a job's last state: its last message's, unless output came after it (the
    worker then noted the state's as it wrote the first)."""
    seq = int(job.get("seq", 0))
    return seq if int(job.get("output_seq", 0)) < seq else int(job.get("state_seq", 0))


class Topic:
    """The watchers of one job, and the newest state of it this server has seen.

    A topic lives from its first watcher's registration to its last one's leaving; every change
    published in that time reaches `latest`, so a watcher joining later can start from it
    without reading Redis."""

    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()
        self.latest: Update | None = None
        self.seq = 0  # of the job's newest message this server has seen
        self.loading: asyncio.Task[tuple[Update | None, int]] | None = None

    def note(self, update: Update) -> bool:
        """Keep a state if it is newer than `latest`; True if it is."""
        if update.kind == "state" and (self.latest is None
                                       or update.version > self.latest.version):
            self.latest = update
            return True
        return False

    def offer(self, update: Update) -> None:
        """A message from pub/sub: to every watcher (each skips what it has sent). A state
        without a seq (from an older program) only if it is newer."""
        newer = self.note(update)
        self.seq = max(self.seq, update.seq)
        if update.seq or newer:
            for watcher in self.watchers:
                watcher.put(update)


class Hub:
    """A pub/sub subscription per queue it follows: those whose jobs somebody watches, and while
    a /feed is open all in the registry; on the node that holds the queue's slot, each message
    fanned out to the watchers of that job. A queue nobody watches for LINGER s is let go: its
    messages would cost this server a read and a parse each, for nobody."""

    def __init__(self, redis: AsyncClient, nodes: Nodes, prefix: str) -> None:
        self.redis = redis
        self.nodes = nodes
        self.prefix = prefix
        self.queues: dict[str, Keys] = {}  # by name
        self.listeners: dict[str, asyncio.Task[None]] = {}  # followed, by queue name
        self.subscribed: dict[str, asyncio.Event] = {}  # ... set once its subscription is
        self.unwatched: dict[str, float] = {}  # followed queues nobody watches: since when
        self.stopping: set[asyncio.Task[None]] = set()  # listeners of queues let go
        self.topics: dict[tuple[str, str], Topic] = {}  # by queue and job id
        self.feeds: set[Watcher] = set()  # /feed streams: every change, in batches
        self.batch: dict[str, str] = {}  # the newest message of each job changed since the last
        self.queues[DEFAULT_QUEUE] = Keys(prefix)
        self.history = redis.register_script(HISTORY)  # a job's messages after one (Stream)

    def queue(self, name: str) -> Keys:
        """A queue's keys (made anew for a name not registered: names come from requests)."""
        return self.queues.get(name) or Keys(self.prefix, name)

    async def registered(self, keys: Keys) -> bool:
        """Whether a job was ever submitted to that queue (it is in the registry)."""
        if keys.name not in self.queues:
            if not await self.redis.sismember(keys.registry, keys.name):
                return False
            self.queues[keys.name] = keys
        return True

    async def register(self, keys: Keys) -> None:
        """Add a queue to the registry (before its first job is stored)."""
        if keys.name not in self.queues:
            await self.redis.sadd(keys.registry, keys.name)
            self.queues[keys.name] = keys

    def follow(self, keys: Keys) -> None:
        """Subscribe to a queue's events from now on, for as long as somebody watches it."""
        if keys.name not in self.listeners:
            self.subscribed[keys.name] = subscribed = asyncio.Event()
            self.listeners[keys.name] = asyncio.create_task(self.listen(keys, subscribed))

    async def learn_queues(self) -> None:
        """Know every queue in the registry (those of other servers' submits too)."""
        for name in await self.redis.smembers(Keys(self.prefix).registry):
            self.queues.setdefault(str(name), Keys(self.prefix, str(name)))

    async def follow_all(self, within: float = 0.0) -> None:
        """Follow every queue in the registry (for /feed); and wait up to `within` s for the
        subscriptions (a change before one is confirmed would reach no feed)."""
        await self.learn_queues()
        for keys in self.queues.values():
            self.follow(keys)
        if within:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(event.wait() for event in self.subscribed.values())), within)

    async def let_go(self) -> None:
        """Stop following the queues nobody has watched for LINGER s (no watcher of any of
        their jobs, no /feed open)."""
        watched = set(self.listeners) if self.feeds else {name for name, _ in self.topics}
        now = time.monotonic()
        # All decided and taken out before any await: a watcher that comes meanwhile follows anew
        for name in list(self.listeners):
            if name in watched:
                self.unwatched.pop(name, None)
            elif now - self.unwatched.setdefault(name, now) >= LINGER:
                del self.unwatched[name], self.subscribed[name]
                self.stopping.add(self.listeners.pop(name))
        for task in list(self.stopping):
            with contextlib.suppress(Exception):  # its own error: it is stopping anyway
                await cancel_and_wait(task)
            self.stopping.discard(task)

    def watchers(self) -> int:
        return sum(len(topic.watchers) for topic in self.topics.values()) + len(self.feeds)

    async def send_batches(self, every: float) -> None:
        """Every `every` seconds, send the feeds what changed since: one JSON array, encoded
        once for all, so a busy queue cannot swamp a browser. Every 5 s with feeds, follow the
        queues registered meanwhile. Each round, let go of the queues nobody watches."""
        rounds = 0
        while True:
            await asyncio.sleep(every)
            rounds += 1
            await self.let_go()
            if self.feeds and rounds % max(int(5 / every), 1) == 0:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.follow_all()
            if self.batch:
                data = ("[" + ",".join(self.batch.values()) + "]").encode()
                self.batch = {}
                for feed in self.feeds:
                    feed.put(Update(0, False, data))

    @contextlib.asynccontextmanager
    async def watch(self, keys: Keys, job_id: str) -> AsyncIterator[tuple[Watcher, Topic] | None]:
        """Register a watcher, then note the job's state in it (`first`) and the seq of the
        job's last message then (`floor`): every message after `floor` reaches the watcher
        live, or (behind) from the history. None: no such job."""
        if not await self.registered(keys):
            yield None  # no job was ever submitted to that queue
            return
        watcher, name = Watcher(resumable=True), (keys.name, job_id)
        topic = self.topics.setdefault(name, Topic())
        topic.watchers.add(watcher)
        self.follow(keys)
        try:
            if topic.latest is not None:
                watcher.first, watcher.floor = topic.latest, topic.seq
            else:  # one read serves every watcher that arrives while it runs
                if topic.loading is None or topic.loading.done():
                    topic.loading = asyncio.create_task(self.load(keys, job_id, topic))
                    # Its error goes to every waiter; retrieve it even if all have gone.
                    topic.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
                watcher.first, watcher.floor = await asyncio.shield(topic.loading)
            yield (watcher, topic) if watcher.first is not None else None
        finally:
            topic.watchers.discard(watcher)
            if not topic.watchers:
                del self.topics[name]

    async def load(self, keys: Keys, job_id: str, topic: Topic) -> tuple[Update | None, int]:
        """The job's state and the seq of its last message, read together (None: no job)."""
        job = await read_job(self.redis, keys.job(job_id))
        if not job:
            return None, 0
        state, seq = update_from_job(job), int(job.get("seq", 0))
        topic.note(state)
        topic.seq = max(topic.seq, seq)
        return state, seq

    def close(self) -> None:
        for topic in self.topics.values():
            for watcher in topic.watchers:
                watcher.put(None)
        for feed in self.feeds:
            feed.put(None)

    async def resync(self, keys: Keys) -> None:
        """Pub/sub drops what is published while it is not subscribed: re-read the watched
        jobs of that queue."""
        names = [name for name in self.topics if name[0] == keys.name]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, job_id in names:
                pipe.hgetall(keys.job(job_id))
            jobs = await pipe.execute()
        for name, job in zip(names, jobs, strict=True):
            if job and name in self.topics:
                topic, update = self.topics[name], update_from_job(job)
                if not update.seq:
                    topic.offer(update)
                    continue
                seen, newer = topic.seq, topic.note(update)
                topic.seq = max(topic.seq, int(job.get("seq", 0)))
                if topic.seq > seen or newer:  # missed: each watcher reads it from the history
                    for watcher in topic.watchers:
                        watcher.catch_up()

    def dispatch(self, keys: Keys, data: str) -> None:
        if data.startswith(OUTPUT_HEAD):  # the worker's, the bulk of a stream: not parsed
            topic = self.topics.get((keys.name, data[len(OUTPUT_HEAD):len(OUTPUT_HEAD) + 32]))
            if topic is not None and data.endswith("}") and ':' in data:
                seq = data[data.rindex(":") + 1:-1]
                if seq.isdigit():
                    topic.offer(Update(0, False, data.encode(), int(seq), "output"))
            return
        try:
            message = json.loads(data)
            update = parsed(message, data.encode())
            job_id = message["id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed message on %s: %.200r", keys.events, data)
            return
        if (topic := self.topics.get((keys.name, job_id))) is not None:
            topic.offer(update)
        if update.kind == "progress" and self.feeds:  # the page shows it on running jobs
            name = f"{keys.name}/{job_id}/progress"
            self.batch.pop(name, None)
            self.batch[name] = json.dumps({"queue": keys.name} | message)
        if update.kind == "state" and self.feeds:  # the newest FEED_MAX jobs changed
            message["queue"] = keys.name
            # the page shows the start of a result or error
            message["result"] = str(message.get("result", ""))[:FEED_CUT]
            message["error"] = str(message.get("error", ""))[:FEED_CUT]
            name = f"{keys.name}/{job_id}"
            self.batch.pop(name, None)
            self.batch[name] = json.dumps(message)
            if len(self.batch) > FEED_MAX:
                del self.batch[next(iter(self.batch))]

    async def listen(self, keys: Keys, subscribed: asyncio.Event) -> None:
        """Follow a queue's events until let go: SSUBSCRIBE on the node that holds its slot, and
        after any loss (of the connection, or of the slot, which Redis then unsubscribes)
        subscribe again where the slot is now. Each confirmation resyncs the watched jobs."""
        delay = 0.1
        while True:
            pubsub = None
            try:
                pubsub = (await self.nodes.of(keys.events)).pubsub()
                await pubsub.ssubscribe(keys.events)
                while True:
                    # A finite wait lets the health check notice a silently dead connection.
                    message = await pubsub.get_message(timeout=HEARTBEAT)
                    if message is None:
                        continue
                    if message["type"] == "smessage":
                        self.dispatch(keys, message["data"])
                    elif message["type"] == "ssubscribe":  # also after redis-py reconnects
                        log.info("subscribed to %s", keys.events)
                        await self.resync(keys)
                        subscribed.set()
                        delay = 0.1
                    elif message["type"] == "sunsubscribe":
                        raise RedisConnectionError("the slot moved to another node")
            except REDIS_ERRORS as exc:
                log.warning("pub/sub connection lost (%s); resubscribing in %.1fs",
                            redis_said(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESUBSCRIBE_MAX)
                await self.nodes.refresh(exc)
            finally:
                if pubsub is not None:  # closed to the end even if cancelled again, so that its
                    await asyncio.shield(pubsub.aclose())  # connection goes back to the pool

    async def stop(self) -> None:
        for task in [*self.listeners.values(), *self.stopping]:
            with contextlib.suppress(Exception):  # a listener's own error: it is stopping
                await cancel_and_wait(task)
        await self.nodes.aclose()
        await self.nodes.client.aclose()


def parsed(message: dict[str, Any], data: bytes) -> Update:
    """A job's message (as published, and as kept in its history) as an Update; KeyError,
    TypeError or ValueError if it is not one."""
    kind, seq = message.get("type", "state"), int(message.get("seq") or 0)
    if kind == "state":
        return Update(int(message["version"]), message["status"] in TERMINAL, data, seq)
    return Update(0, False, data, seq, str(kind))


class Scripts:
    """The store's scripts the server runs, registered with its client."""

    def __init__(self, redis: AsyncClient) -> None:
        (self.submit, self.writable, self.cancel, self.retry, self.list, self.stats,
         self.settings, self.queue, self.schedule, self.unschedule, self.due, self.tick) = (
            redis.register_script(s) for s in (
                SUBMIT, WRITABLE, CANCEL, RETRY, LIST, STATS, SETTINGS, QUEUE, SCHEDULE,
                UNSCHEDULE, DUE, SCHEDULE_TICK))
        self.unlock = redis.register_script(UNLOCK)


class Submits:
    """SUBMIT for the requests that submit: those that reach it in the same turn of the event
    loop go to their queue's node in one pipeline (one connection taken from the pool, one
    write, one wake-up for every reply), and with --min-replicas one WAIT confirms them all."""

    def __init__(self, nodes: Nodes, script: AsyncScript, replicas: int) -> None:
        self.nodes, self.script, self.replicas = nodes, script, replicas
        self.waiting: dict[str, list[tuple[list[Any], asyncio.Future[tuple[Any, int]]]]] = {}
        self.sending: set[asyncio.Task[None]] = set()

    async def run(self, key: str, args: list[Any]) -> tuple[Any, int]:
        """SUBMIT's reply for these arguments (key: the queue's list), and how many replicas
        acknowledged it (0 without --min-replicas)."""
        if key not in self.waiting:  # the first of a batch: it is sent on the loop's next turn
            self.waiting[key] = []
            task = asyncio.create_task(self.send(key))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)
        future = asyncio.get_running_loop().create_future()
        self.waiting[key].append((args, future))
        reply, acked = await future
        return reply, acked

    async def send(self, key: str) -> None:
        batch = self.waiting.pop(key)
        try:
            replies = await self.pipelined(key, [args for args, _ in batch])
        except Exception as exc:  # the connection's: each request answers it (a 503)
            replies = [exc] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its request was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def pipelined(self, key: str, batch: list[list[Any]]) -> list[Any]:
        """One (reply, acked) or an error per SUBMIT; what Redis refused unrun (it lost the
        script, or the queue's slot is moving or has moved) is sent once more (again)."""
        try:
            replies = await self.sent(key, batch)
        except REDIS_ERRORS as exc:  # on a cluster, the node may have died or lost the slot
            await self.nodes.refresh(exc)
            raise
        if refused := [i for i, reply in enumerate(replies) if isinstance(reply, UNRUN)]:
            try:
                again = await self.again(key, [batch[i] for i in refused], replies[refused[0]])
            except REDIS_ERRORS as exc:  # theirs alone: the others are stored
                again = [exc] * len(refused)
            for i, reply in zip(refused, again, strict=True):
                replies[i] = reply
        return replies

    async def sent(self, key: str, batch: list[list[Any]]) -> list[Any]:
        """The SUBMITs as one pipeline to the node of key, with --min-replicas its WAIT last:
        one (reply, acked) or an error each."""
        async with (await self.nodes.of(key)).pipeline(transaction=False) as pipe:
            for args in batch:
                pipe.evalsha(self.script.sha, 1, key, *args)
            if self.replicas:
                pipe.execute_command("WAIT", self.replicas, WAIT_MS)
            replies = await pipe.execute(raise_on_error=False)
        acked = replies.pop() if self.replicas else 0
        if isinstance(acked, Exception):
            raise acked
        return [reply if isinstance(reply, Exception) else (reply, acked) for reply in replies]

    async def again(self, key: str, batch: list[list[Any]], refusal: Exception) -> list[Any]:
        """SUBMITs that Redis refused unrun, sent once more. Through the client's own script
        call, which loads the script and follows a cluster's MOVED, ASK and TRYAGAIN; with
        --min-replicas (its WAIT must share the writes' connection) as a pipeline again, after
        learning where the slot is and loading the script there."""
        if not self.replicas:
            replies = await asyncio.gather(*(self.script(keys=[key], args=args)
                                             for args in batch), return_exceptions=True)
            return [reply if isinstance(reply, Exception) else (reply, 0) for reply in replies]
        await self.nodes.refresh(refusal)  # a MOVED: learn where the slot is now
        await (await self.nodes.of(key)).script_load(self.script.script)
        return await self.sent(key, batch)


class Pinger:
    """Pings every open WebSocket from one loop, and drops a peer that has not answered the
    previous round's ping by the next. One timer for the whole server: aiohttp's own heartbeat
    keeps one per socket and re-arms it when the peer's close reply arrives, which kept every
    closed socket in memory for a whole interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.sockets: dict[web.WebSocketResponse, asyncio.Transport] = {}
        self.silent: set[web.WebSocketResponse] = set()  # pinged, no pong yet

    def add(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.sockets[ws] = transport

    def heard(self, ws: web.WebSocketResponse) -> None:
        self.silent.discard(ws)

    def discard(self, ws: web.WebSocketResponse) -> None:
        self.sockets.pop(ws, None)
        self.silent.discard(ws)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for ws in self.silent:
                if (transport := self.sockets.pop(ws, None)) is not None:
                    transport.abort()  # a dead peer may never drain what close() would flush
            self.silent = set(self.sockets)
            # A ping is written at once, but may then wait on a full send buffer: one task each,
            # so a slow peer delays nobody, and none outlives the round.
            pings = [asyncio.create_task(ping(ws)) for ws in self.silent]
            if pings:
                _, late = await asyncio.wait(pings, timeout=self.interval)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)


async def ping(ws: web.WebSocketResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await ws.ping()


REDIS = web.AppKey[AsyncClient]("redis")
SUBMITS = web.AppKey("submits", Submits)
HUB = web.AppKey("hub", Hub)
ORIGINS = web.AppKey("origins", frozenset)
SCRIPTS = web.AppKey("scripts", Scripts)
RETENTION_S = web.AppKey("retention", int)
TOKEN = web.AppKey("token", str)
MIN_REPLICAS = web.AppKey("min_replicas", int)
IDEMPOTENCY_TTL_S = web.AppKey("idempotency_ttl", int)
LOCAL_ONLY = web.AppKey("local_only", bool)
REQUESTS = web.AppKey("requests", Counter)
PINGER = web.AppKey("pinger", Pinger)


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel a task and wait until it has ended. Cancel again while it runs: on Python 3.11,
    a cancel that lands as an inner asyncio.wait_for completes (as in redis-py's connect) is
    swallowed (CPython gh-86296, fixed in 3.12)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.result()  # an error in the task is not hidden


def error(status: type[web.HTTPError], message: str) -> web.HTTPError:
    """An HTTP error with the JSON body every error here has."""
    return status(text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give aiohttp's own errors (404, 405, 413) JSON bodies; Redis outages and refusals
    (error replies) a 503, and a full Redis a 507."""
    try:
        return await handler(request)
    except web.HTTPError as exc:
        if exc.content_type == "application/json":
            raise
        message = {
            404: "no such endpoint; see README.md for the API",
            405: f"{request.method} is not allowed here",
            413: f"request body too large; the limit is {request.client_max_size} bytes",
        }.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": message}, status=exc.status, headers=headers)
    except ConnectionResetError:  # the client hung up (say, mid-handshake): none to answer
        return web.Response(status=499)
    except UNAVAILABLE as exc:
        log.warning("%s %s: redis unavailable: %s", request.method, request.path, exc)
        raise error(web.HTTPServiceUnavailable,
                    "the job store (Redis) is unavailable; try again shortly") from None
    except OutOfMemoryError as exc:
        log.warning("%s %s: redis is full: %s", request.method, request.path, redis_said(exc))
        raise error(web.HTTPInsufficientStorage,
                    "the job store is full (Redis reached its maxmemory); nothing was stored. "
                    "Try again once workers have drained the queue") from None
    except ResponseError as exc:  # READONLY, NOREPLICAS, MISCONF, BUSY, ...
        log.warning("%s %s: redis refused: %s", request.method, request.path, redis_said(exc))
        stored = "; nothing was stored" if request.method == "POST" else ""
        message = f"the job store (Redis) refused the request{stored}. Redis said: "
        raise error(web.HTTPServiceUnavailable, message + redis_said(exc)) from None
    except web.HTTPException:
        raise
    except Exception:  # a bug: said in the log, and as JSON like every other error
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error; the server's log says more"},
                                 status=500)


def shown(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it (a hash from Redis, or as new_jobs made it): its numbers as
    numbers, and last its `priority` (5 for a job stored before priorities) and `group` (null
    when it has none)."""
    rest = {name: value for name, value in job.items()
            if name not in ("priority", "group", "state_seq", "output_seq", "stored", "dropped",
                            "lazy", "started")}
    if "expires_in" in job:
        rest["expires_in"] = float(job["expires_in"])
    if "progress" in rest:  # the newest progress of a try, as the worker's Context gave it
        rest["progress"] = json.loads(rest["progress"])
    if "seq" in rest:  # of the job's last message (after=SEQ: what comes next)
        rest["seq"] = int(rest["seq"])
    return rest | {"attempts": int(job.get("attempts", 0)), "version": int(job.get("version", 0)),
                   "priority": int(job.get("priority", DEFAULT_PRIORITY)),
                   "group": job.get("group") or None}


def queue_of(request: web.Request, name: object = None) -> Keys:
    """The keys of the queue a request names (`queue` in its query, or given: from its body);
    the default queue if none."""
    name = request.query.get("queue", DEFAULT_QUEUE) if name is None else name
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise error(web.HTTPBadRequest, "queue must be a name of 1 to 64 characters a-z, 0-9, "
                                        "_ and -")
    return request.app[HUB].queue(name)


def job_id_of(request: web.Request) -> str:
    job_id = request.match_info.get("id") or request.query.get("id", "")
    if not job_id:
        raise error(web.HTTPBadRequest, "missing query parameter: id")
    if not ID_PATTERN.fullmatch(job_id):
        raise error(web.HTTPNotFound, "no job with that id")
    return job_id


def idempotency_of(request: web.Request, body: bytes) -> tuple[str, str, int]:
    """SUBMIT's idempotency arguments: digests of the Idempotency-Key and of the body, and how
    long to keep the key; none without the header."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return "", "", 0
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise error(web.HTTPBadRequest, "Idempotency-Key must be 1 to 255 printable ASCII "
                                        "characters")
    return (hashlib.sha256(key.encode()).hexdigest(), hashlib.sha256(body).hexdigest(),
            request.app[IDEMPOTENCY_TTL_S])


async def replayed(request: web.Request, keys: Keys, reply: list[Any],
                   bulk: bool) -> web.Response:
    """The answer to a submit whose Idempotency-Key was seen before: the first request's jobs
    as they are now (200; `{"id": ...}` alone for one expired meanwhile) if the body is the
    same, else 409."""
    ids = str(reply[1]).split(",")
    if reply[0] == 2:
        raise web.HTTPConflict(text=json.dumps({
            "error": "this Idempotency-Key was used with a different body; send a new key "
                     "for a new job", "id": ids[0]}), content_type="application/json")
    jobs = [shown({"queue": keys.name} | job) if (job := await read_job(
        request.app[REDIS], keys.job(job_id))) else {"id": job_id} for job_id in ids]
    headers = {"Idempotent-Replayed": "true"}
    return web.json_response({"jobs": jobs} if bulk else jobs[0], headers=headers)


async def object_of(request: web.Request, example: str) -> dict[str, Any]:
    """A request's body: a JSON object (else 400, saying what to send: `example`)."""
    size, limit = request.content_length or 0, request.client_max_size
    if size > limit:  # refused unread; json_errors words it like the 413 of read() below
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    body = await request.read()  # stops with 413 as soon as the limit is passed
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise error(web.HTTPBadRequest, f"body is not valid JSON; send {example}") from None
    if not isinstance(data, dict):
        raise error(web.HTTPBadRequest, f"body must be a JSON object: {example}")
    return data


async def submit(request: web.Request) -> web.Response:
    data = await object_of(request, '{"input": "..."}')
    idempotency = idempotency_of(request, await request.read())
    try:
        asked = Submission.of(data)
    except ValueError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    keys, due = queue_of(request, data.get("queue")), asked.due
    jobs = new_jobs(asked.texts, due, keys.name, asked.priority, asked.group, asked.expires_in)
    args = submit_args(keys.prefix, request.app[RETENTION_S], jobs, due, idempotency)
    await request.app[HUB].register(keys)
    reply, acked = await request.app[SUBMITS].run(keys.queue, args)
    if acked < (wanted := request.app[MIN_REPLICAS]):
        raise error(web.HTTPServiceUnavailable,
                    f"the job was not confirmed by {wanted} replica(s) of Redis within "
                    f"{WAIT_MS} ms, so it is not accepted: a failover could lose it. It may "
                    f"still run; submit again (it may then run twice) or check its status")
    if reply[0]:
        return await replayed(request, keys, reply, "inputs" in data)
    if "inputs" in data:
        return web.json_response({"jobs": [shown(job) for job in jobs]}, status=201)
    where = f"/status?id={jobs[0]['id']}" + (f"&queue={keys.name}" if data.get("queue") else "")
    return web.json_response(shown(jobs[0]), status=201, headers={"Location": where})


async def status(request: web.Request) -> web.Response:
    return await job_reply(request, queue_of(request), job_id_of(request))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while Redis answers; the body says whether it takes writes too."""
    try:
        await request.app[SCRIPTS].writable(keys=[request.app[HUB].queue(DEFAULT_QUEUE).queue],
                                            args=[])
    except ResponseError as exc:
        return web.json_response({"status": "ok", "redis": f"refuses writes: {redis_said(exc)}"})
    return web.json_response({"status": "ok", "redis": "ok"})


def common(request: web.Request, keys: Keys) -> list[str | int]:
    """The arguments every script takes first (see store.LUA_PRELUDE)."""
    return [keys.prefix, now(), request.app[RETENTION_S]]


async def job_reply(request: web.Request, keys: Keys, job_id: str,
                    status: int = 200) -> web.Response:
    """The job as JSON (404 if there is none); `queue` for one stored before queues."""
    job = await read_job(request.app[REDIS], keys.job(job_id))
    if not job:
        raise error(web.HTTPNotFound, "no job with that id")
    return web.json_response(shown({"queue": keys.name} | job), status=status)


def conflict(job_id: str, status: str, rule: str) -> web.HTTPError:
    return web.HTTPConflict(text=json.dumps({"error": f"job {job_id} is {status}; {rule}",
                                             "status": status}),
        content_type="application/json")


async def list_jobs(request: web.Request) -> web.Response:
    """GET /jobs?status=S&limit=N&cursor=C: that state's jobs, newest first, a page at a time
    (one script call: a ZRANGE and an HMGET per job)."""
    status = request.query.get("status", "")
    if status not in STATES:
        raise error(web.HTTPBadRequest, f"status must be one of: {', '.join(STATES)}")
    text = request.query.get("limit", str(PAGE))
    limit = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= limit <= MAX_PAGE:
        raise error(web.HTTPBadRequest, f"limit must be a whole number from 1 to {MAX_PAGE}")
    keys, score, after = queue_of(request), "+inf", ""
    if cursor := request.query.get("cursor"):
        if not (match := CURSOR.fullmatch(cursor)):
            raise error(web.HTTPBadRequest, "cursor must be a next_cursor this server gave")
        score, after = match.groups()
    reply = await request.app[SCRIPTS].list(keys=[keys.index(status)],
                                            args=[*common(request, keys), score, after, limit])
    next_cursor = "-".join(reply.pop()) if reply and len(reply[-1]) == 2 else None
    jobs = [shown({"id": entry[0], **dict(zip(entry[1::2], entry[2::2], strict=True))})
            for entry in reply]
    return web.json_response({"jobs": jobs, "next_cursor": next_cursor})


async def retry(request: web.Request) -> web.Response:
    """POST /jobs/{id}/retry: a failed or cancelled job back on the queue, attempts reset."""
    job_id, keys = job_id_of(request), queue_of(request)
    was = await request.app[SCRIPTS].retry(keys=[keys.queue], args=[*common(request, keys), job_id])
    if not was:
        raise error(web.HTTPNotFound, "no job with that id")
    if was not in ("failed", "cancelled"):
        raise conflict(job_id, was, "only a failed or cancelled job can be retried")
    return await job_reply(request, keys, job_id)


async def retry_failed(request: web.Request) -> web.Response:
    """POST /jobs/retry-failed: every job on the dead-letter list back on the queue."""
    keys = queue_of(request)
    retried = await request.app[SCRIPTS].retry(keys=[keys.queue], args=[*common(request, keys), ""])
    return web.json_response({"retried": retried})


async def cancel(request: web.Request) -> web.Response:
    """POST /jobs/{id}/cancel: a queued or delayed job ends `cancelled` now (200); a running
    one is asked to stop (202), and ends `cancelled` once its worker has stopped it."""
    job_id, keys = job_id_of(request), queue_of(request)
    was = await request.app[SCRIPTS].cancel(keys=[keys.job(job_id)],
                                            args=[*common(request, keys), job_id])
    if not was:
        raise error(web.HTTPNotFound, "no job with that id")
    if was in TERMINAL:
        raise conflict(job_id, was, "it has ended, and cannot be cancelled")
    return await job_reply(request, keys, job_id, 202 if was == "running" else 200)


# -- queues: their limits, and pausing them ----------------------------------------------------

async def describe(request: web.Request, keys: Keys) -> dict[str, Any]:
    """A queue as GET /queues shows it: one script call."""
    queue = json.loads(await request.app[SCRIPTS].queue(keys=[keys.queue],
                                                        args=common(request, keys)))
    return {"name": keys.name, "length": queue["length"], "running": queue["running"],
            "paused": bool(queue["paused"]), "held_back": queue["held_back"],
            "settings": settings_of(queue["settings"] or {})}


async def named_queue(request: web.Request, create: bool = False) -> Keys:
    """The queue a path names (400 if that is no queue name). One neither used nor configured
    is 404, unless `create`: then it is registered (its settings may come before its jobs)."""
    keys = queue_of(request, request.match_info["name"])
    if create:
        await request.app[HUB].register(keys)
    elif not await request.app[HUB].registered(keys):
        raise error(web.HTTPNotFound, f"no queue named {keys.name!r}: none of its jobs was "
                                      f"ever submitted, nor its settings set")
    return keys


async def list_queues(request: web.Request) -> web.Response:
    """GET /queues: every queue in the registry (the default one always), by name."""
    hub = request.app[HUB]
    names = {DEFAULT_QUEUE, *(str(n) for n in await request.app[REDIS].smembers(
        hub.queue(DEFAULT_QUEUE).registry))}
    return web.json_response(
        {"queues": [await describe(request, hub.queue(name)) for name in sorted(names)]})


async def get_queue(request: web.Request) -> web.Response:
    """GET /queues/NAME: one queue (404 if it was never used)."""
    return web.json_response(await describe(request, await named_queue(request)))


async def change(request: web.Request, keys: Keys, fields: list[str | int | float]) -> None:
    if fields:
        await request.app[SCRIPTS].settings(keys=[keys.queue],
                                            args=[*common(request, keys), *fields])


async def set_queue(request: web.Request) -> web.Response:
    """PUT /queues/NAME {"rate_limit": {"jobs": J, "per": S}, "concurrency": C,
    "group_rate_limit": ..., "group_concurrency": ...}: sets those it names (null removes
    one), keeps the others; all checked first, so a bad one changes nothing (400)."""
    data = await object_of(request, '{"concurrency": 4, "rate_limit": {"jobs": 10, "per": 1}}')
    try:
        fields = settings_fields(data)
    except ValueError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    keys = await named_queue(request, create=True)
    await change(request, keys, fields)
    return web.json_response(await describe(request, keys))


async def pause_or_resume(request: web.Request) -> web.Response:
    """POST /queues/NAME/pause: its jobs start no more (submits still queue; the running ones
    end as they would). POST /queues/NAME/resume: they start again."""
    keys = await named_queue(request, create=True)
    await change(request, keys, ["paused", 1 if request.match_info["action"] == "pause" else ""])
    return web.json_response(await describe(request, keys))


# -- schedules: a job every tick, made by whichever process comes first ------------------------

def schedule_name(request: web.Request) -> str:
    if not QUEUE_NAME.fullmatch(name := request.match_info["name"]):
        raise error(web.HTTPBadRequest, "a schedule's name is 1 to 64 characters a-z, 0-9, _ "
                                        "and -")
    return name


@contextlib.asynccontextmanager
async def changing(request: web.Request, name: str) -> AsyncIterator[None]:
    """Hold the schedule's name while changing it (a PUT moving it from one queue's slot to
    another's writes two slots and the registry: not one script): a key with a token of this
    request's, which expires in 5 s should this server die meanwhile. 503 after 5 s."""
    redis, token = request.app[REDIS], uuid.uuid4().hex
    lock = request.app[HUB].queue(DEFAULT_QUEUE).schedule_registry + ":" + name
    deadline = time.monotonic() + 5.0
    while not await redis.set(lock, token, nx=True, px=5000):
        if time.monotonic() > deadline:
            raise error(web.HTTPServiceUnavailable, f"schedule {name!r} is being changed by "
                                                    "another request; try again")
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        await request.app[SCRIPTS].unlock(keys=[lock], args=[token])


async def read_schedule(request: web.Request, name: str) -> tuple[Keys, dict[str, str]]:
    """The queue a schedule's jobs go to, and its fields (404 if there is no such schedule)."""
    hub, redis = request.app[HUB], request.app[REDIS]
    queue = await redis.hget(hub.queue(DEFAULT_QUEUE).schedule_registry, name)
    fields = {} if queue is None else await redis.hgetall(hub.queue(str(queue)).schedule(name))
    if not fields:
        raise error(web.HTTPNotFound, f"no schedule named {name!r}")
    return hub.queue(str(queue)), fields  # type: ignore[return-value]


async def put_schedule(request: web.Request) -> web.Response:
    """PUT /schedules/NAME: create or replace a schedule ({"cron": ..., "timezone": ...} or
    {"every": S}, and its job's "input", "queue", "priority", "group", "expires_in"; "overlap").
    It lives in its queue's slot, beside the jobs it makes; the registry says which queue.
    Changes of one schedule are made one at a time (see changing), so concurrent PUTs leave
    one schedule, in the queue the registry names."""
    name, redis, scripts = schedule_name(request), request.app[REDIS], request.app[SCRIPTS]
    data = await object_of(request, '{"every": 60, "input": "..."}')

    def job_fields(body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body.get("input"), str):
            raise ValueError('"input" is required: a string, the input of each job it makes')
        return {"input": body["input"],
                "queue": queue_of(request, body.get("queue", DEFAULT_QUEUE)).name,
                "priority": priority_of(body), "group": group_of(body),
                "expires_in": expires_of(body)}

    try:
        fields = schedule_fields(data, job_fields)
    except ValueError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    keys, hub = request.app[HUB].queue(fields["queue"]), request.app[HUB]
    fields["next_run"] = repr(next_tick(fields, time.time()))
    await hub.register(keys)
    async with changing(request, name):
        was = await redis.hget(keys.schedule_registry, name)
        await scripts.schedule(keys=[keys.queue], args=[
            *common(request, keys), name, 1, *(item for pair in fields.items() for item in pair)])
        await redis.hset(keys.schedule_registry, name, keys.name)
        if was is not None and was != keys.name:
            old = hub.queue(str(was))
            await scripts.unschedule(keys=[old.queue], args=[*common(request, old), name])
    return web.json_response(schedule_shown(name, fields))


async def get_schedule(request: web.Request) -> web.Response:
    name = schedule_name(request)
    return web.json_response(schedule_shown(name, (await read_schedule(request, name))[1]))


async def list_schedules(request: web.Request) -> web.Response:
    hub, redis = request.app[HUB], request.app[REDIS]
    registry: dict[str, str] = await redis.hgetall(  # type: ignore[assignment]
        hub.queue(DEFAULT_QUEUE).schedule_registry)
    schedules = []
    for name, queue in sorted(registry.items()):
        fields: dict[str, str] = await redis.hgetall(  # type: ignore[assignment]
            hub.queue(queue).schedule(name))
        if fields:
            schedules.append(schedule_shown(name, fields))
    return web.json_response({"schedules": schedules})


async def delete_schedule(request: web.Request) -> web.Response:
    name = schedule_name(request)
    async with changing(request, name):
        keys, _ = await read_schedule(request, name)
        await request.app[REDIS].hdel(keys.schedule_registry, name)
        await request.app[SCRIPTS].unschedule(keys=[keys.queue], args=[*common(request, keys),
                                                                        name])
    return web.Response(status=204)


async def pause_or_resume_schedule(request: web.Request) -> web.Response:
    """POST /schedules/NAME/pause: its ticks pass without a job; /resume: they make them
    again, from the next tick on (no catching up on the paused ones)."""
    name = schedule_name(request)
    async with changing(request, name):
        keys, _ = await read_schedule(request, name)
        paused = "1" if request.match_info["action"] == "pause" else ""
        await request.app[SCRIPTS].schedule(keys=[keys.queue], args=[
            *common(request, keys), name, 0, "paused", paused])
    return web.json_response(schedule_shown(name, (await read_schedule(request, name))[1]))


async def tick_schedules(app: web.Application) -> None:
    """Task: make the jobs of the schedules' ticks that are due, as every worker does too
    (SCHEDULE_TICK lets one process make each tick's job); a round a second, or at the next
    tick."""
    hub, scripts, retention = app[HUB], app[SCRIPTS], app[RETENTION_S]
    default = hub.queue(DEFAULT_QUEUE)
    while True:
        wait = 1.0
        try:
            at = time.time()
            due = {DEFAULT_QUEUE: await scripts.due(keys=[default.queue],
                                                    args=[default.prefix, now(), retention, at])}
            for queue in queues_to_tick(due[DEFAULT_QUEUE]):
                keys = hub.queue(queue)
                due[queue] = await scripts.due(keys=[keys.queue],
                                               args=[keys.prefix, now(), retention, at])
            plan = plan_ticks(hub.prefix, retention, due, at)
            for keys, name in plan.orphans:
                await scripts.unschedule(keys=[keys.queue], args=[keys.prefix, now(), retention,
                                                                  name])
            for keys, args in plan.ticks:
                await scripts.tick(keys=[keys.queue], args=args)
            wait = plan.wait
        except REDIS_ERRORS as exc:  # said by the requests that meet it; tried again
            log.debug("schedules: %s", exc)
        await asyncio.sleep(max(wait, 0.01))


# -- counting: /stats and /metrics -------------------------------------------------------------

async def queue_stats(request: web.Request, keys: Keys) -> dict[str, Any]:
    """One queue's numbers: one script call."""
    stats = json.loads(await request.app[SCRIPTS].stats(keys=[keys.queue],
                                                        args=common(request, keys)))
    return {
        "jobs": {state: stats["jobs"][state] for state in STATES},
        "queue_length": stats["queue_length"],
        "delayed": stats["delayed"],
        "dead_letter": stats["dead_letter"],
        "paused": bool(stats["paused"]),
        "held_back": stats["held_back"],
        "oldest_queued_age": None if stats["oldest_queued_age"] is False
                             else stats["oldest_queued_age"],
        "totals": {name: stats["totals"].get(name, 0) for name in TOTALS},
        "output_bytes": stats["totals"].get("output_bytes", 0),
        "done_per_minute": [{"minute": rfc3339(m), "done": done, "failed": failed}
                            for m, done, failed in stats["minutes"]],
        "workers": [{"name": w["name"], "host": w.get("host", ""), "pid": int(w.get("pid", 0)),
                     "concurrency": int(w.get("concurrency", 0)), "running": w["running"] or [],
                     "started": w.get("started", ""), "last_heartbeat": w.get("heartbeat", "")}
                    for w in stats["workers"] or []],
        "runtime": stats["runtime"] or {},
    }


async def read_stats(request: web.Request) -> dict[str, Any]:
    """The numbers of /stats and /metrics: of the queue named, or of every queue in the
    registry added up (with each queue's own under "queues"); and Redis's memory."""
    if "queue" in request.query:
        queues = [queue_of(request)]
    else:
        hub = request.app[HUB]
        await hub.learn_queues()
        queues = [hub.queue(name) for name in sorted(hub.queues)]
    each = {keys.name: await queue_stats(request, keys) for keys in queues}
    total: dict[str, Any] = {
        "jobs": {state: sum(s["jobs"][state] for s in each.values()) for state in STATES}}
    for field in ("queue_length", "delayed", "dead_letter", "held_back"):
        total[field] = sum(s[field] for s in each.values())
    if "queue" in request.query:
        total["paused"] = each[queues[0].name]["paused"]
    ages = [s["oldest_queued_age"] for s in each.values() if s["oldest_queued_age"] is not None]
    total["oldest_queued_age"] = max(ages, default=None)
    total["totals"] = {name: sum(s["totals"][name] for s in each.values()) for name in TOTALS}
    total["output_bytes"] = sum(s["output_bytes"] for s in each.values())
    minutes: dict[str, Counter[str]] = {}
    for s in each.values():
        for m in s["done_per_minute"]:
            minutes.setdefault(m["minute"], Counter()).update(done=m["done"], failed=m["failed"])
    total["done_per_minute"] = [{"minute": m, "done": c["done"], "failed": c["failed"]}
                                for m, c in sorted(minutes.items())][-60:]
    workers: dict[str, dict[str, Any]] = {}
    for s in each.values():
        for w in s["workers"]:
            workers.setdefault(w["name"], w | {"running": []})["running"] += w["running"]
    total["workers"] = sorted(workers.values(), key=lambda w: w["name"])
    total["redis"] = await memory(request.app[REDIS])
    total["runtime"] = dict(sum((Counter(s["runtime"]) for s in each.values()), Counter()))
    if "queue" not in request.query:
        total["queues"] = {name: {field: s[field] for field in (
            "jobs", "queue_length", "delayed", "dead_letter", "oldest_queued_age", "totals",
            "paused", "held_back")} for name, s in each.items()}
    return total


async def memory(redis: AsyncClient) -> dict[str, int]:
    """Redis's memory used, and its limit (0: none); a cluster's added up over its masters."""
    if not isinstance(redis, redis_cluster.RedisCluster):
        info = await redis.info("memory")
        return {"used_memory": info["used_memory"], "maxmemory": info["maxmemory"]}
    nodes = [await redis.info("memory", target_nodes=node) for node in redis.get_primaries()]
    limits = [node["maxmemory"] for node in nodes]
    return {"used_memory": sum(node["used_memory"] for node in nodes),
            "maxmemory": 0 if 0 in limits else sum(limits)}


async def stats(request: web.Request) -> web.Response:
    numbers = await read_stats(request)
    del numbers["runtime"]  # in /metrics
    return web.json_response(numbers)


async def schedule_runs(request: web.Request) -> list[tuple[str, int]]:
    """(name, jobs made) of each schedule, by name."""
    hub, redis = request.app[HUB], request.app[REDIS]
    registry = await redis.hgetall(hub.queue(DEFAULT_QUEUE).schedule_registry)
    return [(str(name), int(await redis.hget(hub.queue(str(queue)).schedule(str(name)), "runs")
                            or 0)) for name, queue in sorted(registry.items())]


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the numbers of /stats in Prometheus's text format, and this server's."""
    s = await read_stats(request)
    paused = ({name: q["paused"] for name, q in s["queues"].items()} if "queues" in s
              else {request.query["queue"]: s["paused"]})
    out: list[str] = []

    def metric(name: str, kind: str, text: str, samples: dict[str, float]) -> None:
        out.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        out.extend(f"{name}{labels} {value!r}" for labels, value in samples.items())

    metric("jobs_submitted_total", "counter", "Jobs submitted.",
           {"": s["totals"]["submitted"]})
    metric("jobs_finished_total", "counter", "Jobs that ended, by how.",
           {f'{{status="{k}"}}': s["totals"][k] for k in TERMINAL})
    metric("jobs_retried_total", "counter", "Jobs sent back for another try.",
           {"": s["totals"]["retried"]})
    metric("jobs_output_bytes_total", "counter",
           "Bytes of output that running jobs streamed (UTF-8), as written to Redis.",
           {"": s["output_bytes"]})
    metric("jobs", "gauge", "Jobs in each state.",
           {f'{{status="{k}"}}': n for k, n in s["jobs"].items()})
    metric("jobs_queue_length", "gauge", "Jobs waiting on the queue.", {"": s["queue_length"]})
    metric("jobs_dead_letter", "gauge", "Ids on the dead-letter list.", {"": s["dead_letter"]})
    metric("jobs_held_back", "gauge",
           "Queued jobs held back now by a pause or a limit (rate, concurrency, a group's).",
           {"": s["held_back"]})
    metric("jobs_queue_paused", "gauge", "Whether a queue is paused (1) or not (0).",
           {f'{{queue="{name}"}}': int(flag) for name, flag in paused.items()})
    metric("jobs_oldest_queued_age_seconds", "gauge",
           "How long the oldest queued job has waited (0: none waits).",
           {"": s["oldest_queued_age"] or 0})
    metric("jobs_workers", "gauge", "Workers alive.", {"": len(s["workers"])})
    metric("jobs_worker_slots", "gauge", "Jobs the workers alive can run at once.",
           {"": sum(w["concurrency"] for w in s["workers"])})
    runtime, cumulative = s["runtime"], 0
    buckets = {}
    for bound in (*(f"{b:g}" for b in RUNTIME_BUCKETS), "+Inf"):
        cumulative += runtime.get(bound, 0)
        buckets[f'_bucket{{le="{bound}"}}'] = cumulative
    metric("jobs_run_seconds", "histogram", "How long tries ran.",
           buckets | {"_sum": runtime.get("sum", 0), "_count": runtime.get("count", 0)})
    metric("jobs_schedule_runs_total", "counter", "Jobs each schedule has made.",
           {f'{{schedule="{name}"}}': runs for name, runs in (await schedule_runs(request))})
    metric("redis_used_memory_bytes", "gauge", "Memory Redis uses.",
           {"": s["redis"]["used_memory"]})
    metric("redis_maxmemory_bytes", "gauge", "Redis's maxmemory (0: no limit).",
           {"": s["redis"]["maxmemory"]})
    metric("server_watchers", "gauge", "Streams this server has open (/ws, /events, /feed).",
           {"": request.app[HUB].watchers()})
    metric("server_requests_total", "counter", "Requests this server answered.",
           {f'{{route="{route}",code="{code}"}}': n
            for (route, code), n in sorted(request.app[REQUESTS].items())})
    return web.Response(body="\n".join(out).encode() + b"\n",
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@contextlib.asynccontextmanager
async def watching(request: web.Request) -> AsyncIterator[Stream]:
    """Check the request, then watch the job: a Stream of its messages, from its current
    state, or (after=SEQ; for /events, a Last-Event-ID header wins) the messages after SEQ."""
    job_id, keys = job_id_of(request), queue_of(request)
    after = after_of(request)
    check_origin(request)
    async with request.app[HUB].watch(keys, job_id) as watching:
        if watching is None:
            raise error(web.HTTPNotFound, "no job with that id")
        yield Stream(request.app[HUB], keys, job_id, *watching, after)


def check_origin(request: web.Request) -> None:
    """A browser's request from another site: refused, unless that origin is allowed."""
    origin = request.headers.get("Origin")
    allowed = request.app[ORIGINS]
    if origin is not None and "*" not in allowed and origin not in allowed \
            and origin != f"{request.scheme}://{request.host}":
        raise error(web.HTTPForbidden, f"origin {origin} is not allowed")


async def read_until_closed(ws: web.WebSocketResponse, watcher: Watcher, pinger: Pinger) -> None:
    """Answer the peer's pings and note its pongs until it closes or goes; then end the relay."""
    try:
        async for message in ws:
            if message.type is WSMsgType.PING:
                await ws.pong(message.data)
            elif message.type is WSMsgType.PONG:
                pinger.heard(ws)
    finally:
        watcher.put(None)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=False)  # the app's Pinger pings; the reader answers
    if not ws.can_prepare(request).ok:
        raise error(web.HTTPBadRequest, "this endpoint speaks WebSocket; use /events for SSE")
    async with watching(request) as watcher:
        await ws.prepare(request)
        pinger = request.app[PINGER]
        pinger.add(ws, request.transport)  # type: ignore[arg-type]  # set while connected
        reader = asyncio.create_task(read_until_closed(ws, watcher.watcher, pinger))
        try:
            finished = await watcher.relay(lambda u: ws.send_frame(u.data, WSMsgType.TEXT))
        except ConnectionError:  # the peer went away mid-send
            finished = False
        finally:
            pinger.discard(ws)
            await cancel_and_wait(reader)
        # Closed here, with no reader in another task: aiohttp's close() then waits for the
        # peer's close reply before it drops the connection. With a concurrent reader it drops
        # it at once, and a peer whose reply then fails to send reports 1006, not our 1000.
        with contextlib.suppress(ConnectionError):
            await ws.close(code=WSCloseCode.OK if finished else WSCloseCode.GOING_AWAY)
    return ws


async def events(request: web.Request) -> web.StreamResponse:
    async with watching(request) as watcher:
        state, after = watcher.watcher.first, watcher.after
        if after is not None and state is not None and state.terminal \
                and (state.seq or state.version) <= after:
            # Nothing after the end: 204 is what tells an EventSource to stop reconnecting
            # (Last-Event-ID the last seq; or a URL's after=, which it would reconnect to).
            return web.Response(status=204)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(update: Update) -> None:
            await response.write(b"id: %d\ndata: %b\n\n" % (update.seq, update.data))

        sender = asyncio.create_task(watcher.relay(send))
        try:
            while not (await asyncio.wait({sender}, timeout=request.app[PINGER].interval))[0]:
                await response.write(b": keepalive\n\n")
            await sender
        except ConnectionError:
            pass  # the client went away
        finally:
            with contextlib.suppress(ConnectionError):
                await cancel_and_wait(sender)
    return response


async def feed(request: web.Request) -> web.StreamResponse:
    """GET /feed: every change in the deployment, as SSE events each holding a JSON array of
    job messages, at most one per FEED_EVERY s. A reader too slow for it (batches pile up, or a
    write waits FEED_STALL s) is cut off: its EventSource reconnects and the page reads the
    state afresh."""
    check_origin(request)
    hub, watcher = request.app[HUB], Watcher()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    hub.feeds.add(watcher)
    try:
        with contextlib.suppress(*REDIS_ERRORS):  # Redis away: it opens, and follows later
            await hub.follow_all(within=FEED_SUBSCRIBE)
        await response.prepare(request)
        await response.write(b": connected\n\n")
        while not watcher.overflowed:
            try:
                update = await asyncio.wait_for(watcher.get(), request.app[PINGER].interval)
            except TimeoutError:
                update = Update(0, False, b"")
            if update is None:
                break
            data = b"data: %b\n\n" % update.data if update.data else b": keepalive\n\n"
            await asyncio.wait_for(response.write(data), FEED_STALL)
    except TimeoutError:  # a reader that stopped reading: what is buffered for it goes too
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        pass  # the client went away
    finally:
        hub.feeds.discard(watcher)
    return response


# -- a job's messages: its history, after=SEQ, its output so far (issue 17) -----------------

def after_of(request: web.Request) -> int | None:
    """The seq a watcher has seen (None: it names none and starts from the job's current
    state): an EventSource's Last-Event-ID when it reconnects, else the URL's `after`."""
    for name, value in (("Last-Event-ID", request.headers.get("Last-Event-ID")),
                        ("after", request.query.get("after"))):
        if not value or (name == "Last-Event-ID" and request.path != "/events"):
            continue  # an empty Last-Event-ID: none seen
        if not (value.isascii() and value.isdigit() and len(value) <= 18):
            raise error(web.HTTPBadRequest, f"{name} must be the seq of a message this server "
                                            f"sent (a whole number), or 0 for the whole history")
        return int(value)
    return None


def from_history(seq: int, data: str) -> Update:
    """A message of a job's history (number seq) as the Update it was published as."""
    if data.startswith(('{"type":"output"', '{"type":"progress"')):  # made by the worker
        return Update(0, False, data.encode(), seq, data[9:data.index('"', 9)])
    return parsed(json.loads(data), data.encode())


class Stream:
    """What one watcher of a job is sent: every message after `sent`, once, in order. Live
    messages come through its Watcher; whatever it did not get that way (it joined with
    after=SEQ, fell BACKLOG behind, a gap in the seqs, the server resubscribed) is read from
    the job's history first. Its sends wait for its peer only."""

    def __init__(self, hub: Hub, keys: Keys, job_id: str, watcher: Watcher, topic: Topic,
                 after: int | None) -> None:
        self.hub, self.keys, self.job_id = hub, keys, job_id
        self.watcher, self.topic, self.after = watcher, topic, after
        self.sent, self.version = 0, 0

    async def relay(self, send: Callable[[Update], Awaitable[object]]) -> bool:
        """Send the messages until the job's terminal state; True once it is sent, False if
        the server closes (or the peer went away)."""
        watcher, first = self.watcher, self.watcher.first
        assert first is not None  # a job being watched
        if self.after is None:  # today's start: the current state, then what comes after
            await send(first)
            if first.terminal:
                return True
            self.sent, self.version = max(watcher.floor, first.seq), first.version
        else:
            self.sent = self.after
            watcher.catch_up()
        while True:
            latest = self.topic.latest
            if latest is not None and 0 < latest.seq <= self.sent:  # all sent, seq-wise
                if 0 < self.version < latest.version:  # a state in no history (set by hand)
                    await send(latest)
                    self.version = latest.version
                if latest.terminal:
                    return True  # it ended, and that was sent (or came before `after`)
            update = await watcher.get()
            if update is None:
                return False
            if update is CATCH_UP:
                watcher.behind = False
                for update in await self.history():
                    if await self.deliver(update, send):
                        return True
                continue
            if update.seq and update.seq > self.sent + 1:  # a gap: read it from the history
                watcher.catch_up()
            elif (update.seq > self.sent or (not update.seq and update.version > self.version)) \
                    and await self.deliver(update, send):
                return True

    async def deliver(self, update: Update, send: Callable[[Update], Awaitable[object]]) -> bool:
        """Send one message; True if it is the job's end."""
        if update.seq and update.seq <= self.sent:
            return False
        await send(update)
        self.sent = update.seq or self.sent
        self.version = max(self.version, update.version)
        latest = self.topic.latest  # a job run again by hand has ended before: not that end
        return update.terminal and (latest is None or update.version >= latest.version)

    async def history(self) -> list[Update]:
        """The job's messages after `sent`, a page of them (catch_up again if there is more);
        first a `trimmed` message if the oldest of them are no longer kept."""
        reply = await self.hub.history(
            keys=[self.keys.job(self.job_id), self.keys.history(self.job_id)],
            args=[self.keys.prefix, "", 0, self.job_id, self.sent, HISTORY_PAGE])
        if not reply:  # the job is gone (expired)
            return []
        first, entries = int(reply[0]), reply[1:]
        if len(entries) == HISTORY_PAGE:
            self.watcher.catch_up()
        updates = [from_history(first + n, data) for n, data in enumerate(entries)]
        if updates and updates[0].seq > self.sent + 1:
            seq = updates[0].seq - 1
            data = json.dumps({"type": "trimmed", "id": self.job_id, "seq": seq,
                               "missed": seq - self.sent}).encode()
            updates.insert(0, Update(0, False, data, seq, "trimmed"))
        return updates


async def output(request: web.Request) -> web.Response:
    """GET /jobs/ID/output: the output the job's latest try has made so far, joined, as text
    (as much of it as the history keeps: see worker.py --max-output)."""
    job_id, keys = job_id_of(request), queue_of(request)
    redis = request.app[REDIS]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.job(job_id), ["status", "attempts", "dropped"])
        pipe.lrange(keys.history(job_id), 0, -1)
        (status, attempts, dropped), entries = await pipe.execute()
    if status is None:
        raise error(web.HTTPNotFound, "no job with that id")
    pieces, trimmed = [], bool(dropped and int(dropped))
    for data in entries:
        if data.startswith('{"type":"output"'):
            message = json.loads(data)
            if message["attempt"] == int(attempts or 0):
                pieces.append(message["data"])
    return web.Response(text="".join(pieces), content_type="text/plain", charset="utf-8",
                        headers={"Job-Status": status, "Job-Attempt": str(attempts or 0),
                                 "Output-Trimmed": "yes" if trimmed else "no"})


# -- access control, the dashboard, and counting requests ------------------------------------

COOKIE = "jobs_token"
OPEN = frozenset({"/", "/healthz", "/login"})  # with /static/: no token needed


def same(given: str, token: str) -> bool:
    """Constant-time comparison; any text (a header's undecodable bytes, lone surrogates)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def unauthorized(message: str) -> web.HTTPError:
    return web.HTTPUnauthorized(text=json.dumps({"error": message}),
                                content_type="application/json",
                                headers={"WWW-Authenticate": "Bearer"})


def credential(request: web.Request) -> str:
    """The token a request brings: its Bearer header, else the cookie /login set."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given if scheme.lower() == "bearer" else request.cookies.get(COOKIE, "")


@web.middleware
async def access(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Without a token (and without --insecure-no-auth), only requests addressed to a loopback
    name are answered. With a token set, every request but OPEN ones needs it (a Bearer
    header, or the cookie /login sets). A browser's POST or PUT must come from this server's
    origin (or an allowed one)."""
    if request.app[LOCAL_ONLY] and not loopback(request.url.host or ""):
        # Without a token, only loopback is listened on; a page from another site whose name
        # resolves to 127.0.0.1 (DNS rebinding) still says its own name in Host.
        raise error(web.HTTPMisdirectedRequest,
                    f"this server answers requests to a loopback address only, not to "
                    f"{request.host!r}; set a token to serve others")
    token = request.app[TOKEN]
    public = request.path in OPEN or request.path.startswith("/static/")
    if token and not public and not same(given := credential(request), token):
        raise unauthorized("wrong token" if given else
                           "a token is needed: send Authorization: Bearer <token>")
    if request.method not in ("GET", "HEAD"):  # POST, PUT: they change something
        check_origin(request)
    return await handler(request)


@web.middleware
async def count_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count what this server answered, by route and status code, for /metrics."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    code = 500
    try:
        response = await handler(request)
        code = response.status
        return response
    except web.HTTPException as exc:
        code = exc.status
        raise
    finally:
        request.app[REQUESTS][route, code] += 1


async def login(request: web.Request) -> web.Response:
    """POST /login {"token": "..."}: the dashboard's sign-in, kept in an HttpOnly cookie."""
    try:
        given = (await request.json()).get("token")
    except (ValueError, AttributeError, RecursionError):
        given = None
    if not isinstance(given, str):
        raise error(web.HTTPBadRequest, 'send {"token": "..."}')
    token = request.app[TOKEN]
    if token and not same(given, token):
        raise unauthorized("wrong token")
    response = web.Response(status=204)
    if token:
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                            secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/")
    return response


async def whoami(request: web.Request) -> web.Response:
    """GET /auth: 401 if a token is needed and missing (see access()), else whether one is."""
    return web.json_response({"auth": "ok" if request.app[TOKEN] else "none"})


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """GET /static/NAME: one of the dashboard's files (a fixed set: no path is looked up)."""
    if (name := request.match_info["name"]) not in STATIC_FILES:
        raise error(web.HTTPNotFound, "no such file")
    return web.FileResponse(STATIC / name)


def make_app(
    redis_url: str,
    *,
    prefix: str = PREFIX,
    allowed_origins: frozenset[str] = frozenset(),
    max_input_bytes: int = MAX_INPUT_BYTES,
    heartbeat: float = HEARTBEAT,
    retention: int = RETENTION,
    token: str = "",
    insecure_no_auth: bool = False,
    min_replicas: int = 0,
    idempotency_ttl: int = IDEMPOTENCY_TTL,
) -> web.Application:
    """The application; its Redis client and pub/sub listener live as long as it runs. With a
    token, every request but /healthz and the dashboard's files must carry it."""
    app = web.Application(middlewares=[count_requests, json_errors, access],
                          client_max_size=max_input_bytes)
    app[ORIGINS] = allowed_origins
    app[PINGER] = Pinger(heartbeat)
    app[RETENTION_S] = retention
    app[TOKEN] = token
    app[LOCAL_ONLY] = not (token or insecure_no_auth)
    app[MIN_REPLICAS] = min_replicas
    app[IDEMPOTENCY_TTL_S] = idempotency_ttl
    app[REQUESTS] = Counter()

    # No retries of redis-py's own: a submit sent again after a lost reply could queue its
    # jobs twice. A request that meets an outage is answered 503; its client retries.
    options: dict[str, Any] = {
        "max_connections": POOL_SIZE, "decode_responses": True, "client_name": "jobs-server",
        "socket_connect_timeout": 1.0, "socket_timeout": 2.0,
        "health_check_interval": int(HEARTBEAT), "retry": Retry(NoBackoff(), 0),
        "timeout": POOL_WAIT}

    async def redis_client(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = connect_async(redis_url, **options)
        app[SCRIPTS] = Scripts(app[REDIS])
        app[SUBMITS] = Submits(Nodes(app[REDIS], POOL_WAIT), app[SCRIPTS].submit, min_replicas)
        yield
        await app[SUBMITS].nodes.aclose()
        await app[REDIS].aclose()

    async def listener(app: web.Application) -> AsyncIterator[None]:
        # Subscriptions hold their connections for good: from a client (a pool) of their own,
        # so that however many queues are followed, requests keep theirs.
        subscriber = connect_async(redis_url, **options)
        app[HUB] = hub = Hub(app[REDIS], Nodes(subscriber, POOL_WAIT), prefix)
        tasks = [asyncio.create_task(app[PINGER].run()),
                 asyncio.create_task(hub.send_batches(FEED_EVERY)),
                 asyncio.create_task(tick_schedules(app))]
        yield
        for task in tasks:
            await cancel_and_wait(task)
        await hub.stop()

    async def close_watchers(app: web.Application) -> None:
        app[HUB].close()

    app.cleanup_ctx.extend([redis_client, listener])
    app.on_shutdown.append(close_watchers)
    app.router.add_post("/submit", submit)
    app.router.add_get("/status", status)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_post("/jobs/retry-failed", retry_failed)
    app.router.add_post("/jobs/{id}/retry", retry)
    app.router.add_post("/jobs/{id}/cancel", cancel)
    app.router.add_get("/jobs/{id}/output", output)
    app.router.add_get("/queues", list_queues)
    app.router.add_get("/queues/{name}", get_queue)
    app.router.add_put("/queues/{name}", set_queue)
    app.router.add_post("/queues/{name}/{action:pause|resume}", pause_or_resume)
    app.router.add_get("/schedules", list_schedules)
    app.router.add_get("/schedules/{name}", get_schedule)
    app.router.add_put("/schedules/{name}", put_schedule)
    app.router.add_delete("/schedules/{name}", delete_schedule)
    app.router.add_post("/schedules/{name}/{action:pause|resume}", pause_or_resume_schedule)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/feed", feed)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/auth", whoami)
    app.router.add_get("/", dashboard)
    app.router.add_get("/static/{name}", static_file)
    return app


@functools.lru_cache(maxsize=256)  # asked on every request without a token: parsed once
def loopback(host: str) -> bool:
    """Whether an address to listen on can only be reached from this machine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    port, size = number(int, 1, 65535), number(int, 1)
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"),
                        help="address to listen on (env HOST; default %(default)s)")
    parser.add_argument("--port", type=port, default=from_env(parser, "PORT", port, 8080),
                        help="port to listen on (env PORT; default %(default)s)")
    parser.add_argument("--redis-url", type=redis_url,
                        default=from_env(parser, "REDIS_URL", redis_url, "redis://localhost:6379/0"),
                        help="Redis to use: redis://, rediss://, unix://, "
                             "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] or "
                             "redis+cluster://HOST:PORT[,HOST:PORT...] "
                             "(env REDIS_URL; default %(default)s)")
    parser.add_argument("--allowed-origins", default=env("ALLOWED_ORIGINS", ""),
                        help="comma-separated browser origins allowed to follow jobs (/ws, "
                             "/events, /feed) and to POST, or * (env ALLOWED_ORIGINS; same-origin "
                             "and no-Origin clients always are)")
    parser.add_argument("--max-input-bytes", type=size,
                        default=from_env(parser, "MAX_INPUT_BYTES", size, MAX_INPUT_BYTES),
                        help="largest request body accepted (env MAX_INPUT_BYTES; "
                             "default %(default)s)")
    parser.add_argument("--prefix", type=non_empty,
                        default=from_env(parser, "JOBS_PREFIX", non_empty, PREFIX),
                        help="key prefix of this deployment (env JOBS_PREFIX; default %(default)s)")
    parser.add_argument("--retention", type=size,
                        default=from_env(parser, "JOBS_RETENTION", size, RETENTION),
                        help="seconds a cancelled job is kept, as worker.py keeps finished "
                             "ones (env JOBS_RETENTION; default %(default)s)")
    parser.add_argument("--min-replicas", type=number(int, 0),
                        default=from_env(parser, "JOBS_MIN_REPLICAS", number(int, 0), 0),
                        help="a submit is accepted only once this many replicas of Redis have it "
                             "(WAIT, up to 1 s; else 503) (env JOBS_MIN_REPLICAS; default "
                             "%(default)s)")
    parser.add_argument("--idempotency-ttl", type=size,
                        default=from_env(parser, "JOBS_IDEMPOTENCY_TTL", size, IDEMPOTENCY_TTL),
                        help="seconds a submit's Idempotency-Key is remembered: the same key "
                             "and body within it get the first job again (env "
                             "JOBS_IDEMPOTENCY_TTL; default %(default)s)")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--token", type=non_empty,
                        default=from_env(parser, "JOBS_TOKEN", non_empty, None),
                        help="require this token of every client (env JOBS_TOKEN; prefer it or "
                             "--token-file: a flag shows in the process list)")
    secret.add_argument("--token-file", type=argparse.FileType("r"),
                        help="read the token from the first line of this file")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="listen on a non-loopback address without a token (only behind "
                             "something that checks who may connect)")
    parser.add_argument("--check", action="store_true",
                        help="check the settings, then exit 0 without starting "
                             "(Redis is not contacted)")
    args = parser.parse_args(argv)
    token = args.token or ""
    if args.token_file is not None:
        with args.token_file:
            token = args.token_file.readline().strip()
        if not token:
            parser.error(f"argument --token-file: {args.token_file.name} holds no token")
    if not (token or args.insecure_no_auth or loopback(args.host)):
        parser.exit(2, f"server: refusing to listen on {args.host} without a token: anyone who "
                       f"can reach it could read, submit and cancel jobs. Set JOBS_TOKEN (or "
                       f"--token-file), listen on 127.0.0.1, or pass --insecure-no-auth.\n")
    if args.check:
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(message)s")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a watcher is a file descriptor
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    origins = frozenset(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    app = make_app(args.redis_url, prefix=args.prefix, allowed_origins=origins,
                   max_input_bytes=args.max_input_bytes, retention=args.retention, token=token,
                   insecure_no_auth=args.insecure_no_auth, min_replicas=args.min_replicas,
                   idempotency_ttl=args.idempotency_ttl)
    try:
        web.run_app(app, host=args.host, port=args.port, shutdown_timeout=2.0,
                    access_log=None, print=lambda _: log.info("listening on http://%s:%d",
                                                             args.host, args.port))
    except OSError as exc:
        raise SystemExit(f"server: cannot listen on {args.host}:{args.port}: {exc}") from None


if __name__ == "__main__":
    main()
