"""Job queue HTTP server: accepts jobs and streams their progress live.

    python server.py [--host HOST] [--port PORT] [--redis-url URL]

POST /submit {"input": "..."} stores a job and queues it in one step; GET /status?id=ID reads
it; GET /ws?id=ID (WebSocket) and GET /events?id=ID (Server-Sent Events) send the job's current
state, then each change, and close after `done` or `failed`; GET /healthz says whether Redis
answers. Every error is JSON: {"error": "..."}. The server holds one Redis pub/sub subscription
and fans each message out to the watchers of that job, so any number of servers can share one
Redis with any number of workers (see worker.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from store import (
    PREFIX,
    SUBMIT,
    TERMINAL,
    WRITABLE,
    Keys,
    from_env,
    non_empty,
    now,
    number,
    redis_said,
    redis_url,
)

log = logging.getLogger("server")

MAX_INPUT_BYTES = 1 << 20  # request bodies above this are refused with 413
HEARTBEAT = 30.0  # seconds between WebSocket pings and SSE keepalive comments
POOL_SIZE = 128  # Redis connections; a request waits for a free one rather than failing
POOL_WAIT = 5.0  # seconds a request waits for a pooled connection before 503
BACKLOG = 32  # messages kept for a watcher that reads slowly; older ones are dropped
ID_PATTERN = re.compile(r"[0-9a-f]{32}")
MESSAGE_FIELDS = ("id", "status", "result", "error", "attempts", "updated", "version")


@dataclass(frozen=True)
class Update:
    """One state of one job, as sent to watchers: JSON encoded once for all of them."""

    version: int
    terminal: bool
    data: bytes


class Watcher:
    """The updates waiting for one WebSocket or SSE stream. None means: the server is closing."""

    def __init__(self) -> None:
        self._pending: deque[Update | None] = deque(maxlen=BACKLOG)
        self._ready = asyncio.Event()

    def put(self, update: Update | None) -> None:
        self._pending.append(update)
        self._ready.set()

    async def get(self) -> Update | None:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()

    def peek(self) -> Update | None:
        """The next update without taking it: right after registering, the job's state."""
        return self._pending[0] if self._pending else None


async def read_job(redis: Redis, key: str) -> dict[str, str]:
    """A job hash as a dict ({} if there is no such job)."""
    return await redis.hgetall(key)  # type: ignore[return-value]  # decode_responses=True


def update_from_job(job: dict[str, str]) -> Update:
    """The message for a job hash as read from Redis (the same shape the worker publishes)."""
    message: dict[str, str | int] = {f: job.get(f, "") for f in MESSAGE_FIELDS}
    message["attempts"] = int(job.get("attempts", 0))
    message["version"] = version = int(job.get("version", 0))
    return Update(version, job["status"] in TERMINAL, json.dumps(message).encode())


class Topic:
    """The watchers of one job, and the newest state of it this server has seen.

    A topic lives from its first watcher's registration to its last one's leaving; every change
    published in that time reaches `latest`, so a watcher joining later can start from it
    without reading Redis."""

    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()
        self.latest: Update | None = None
        self.loading: asyncio.Task[None] | None = None

    def offer(self, update: Update) -> None:
        if self.latest is None or update.version > self.latest.version:
            self.latest = update
            for watcher in self.watchers:
                watcher.put(update)


class Hub:
    """One pub/sub subscription for the whole server, fanned out to watchers by job id."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.topics: dict[str, Topic] = {}

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Watcher | None]:
        """Register a watcher, then give it the job's state (None: no such job). Registering
        first means no change can fall between the state read and the first message."""
        watcher = Watcher()
        topic = self.topics.setdefault(job_id, Topic())
        topic.watchers.add(watcher)
        try:
            if topic.latest is not None:
                watcher.put(topic.latest)
            else:  # one read serves every watcher that arrives while it runs
                if topic.loading is None or topic.loading.done():
                    topic.loading = asyncio.create_task(self.load(job_id, topic))
                    # Its error goes to every waiter; retrieve it even if all have gone.
                    topic.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
                await asyncio.shield(topic.loading)
            yield watcher if topic.latest is not None else None
        finally:
            topic.watchers.discard(watcher)
            if not topic.watchers:
                del self.topics[job_id]

    async def load(self, job_id: str, topic: Topic) -> None:
        job = await read_job(self.redis, self.keys.job(job_id))
        if job:
            topic.offer(update_from_job(job))

    def close(self) -> None:
        for topic in self.topics.values():
            for watcher in topic.watchers:
                watcher.put(None)

    async def resync(self) -> None:
        """Pub/sub drops what is published while it is disconnected: re-read watched jobs."""
        ids = list(self.topics)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            jobs = await pipe.execute()
        for job_id, job in zip(ids, jobs, strict=True):
            if job and job_id in self.topics:
                self.topics[job_id].offer(update_from_job(job))

    def dispatch(self, data: str) -> None:
        try:
            message = json.loads(data)
            job_id, version, status = message["id"], int(message["version"]), message["status"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed message on %s: %.200r", self.keys.events, data)
            return
        if (topic := self.topics.get(job_id)) is not None:
            topic.offer(Update(version, status in TERMINAL, data.encode()))

    async def listen(self) -> None:
        """Follow the events channel forever, resubscribing (and resyncing) after any loss."""
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.events)
                while True:
                    # A finite wait lets the health check notice a silently dead connection.
                    message = await pubsub.get_message(timeout=HEARTBEAT)
                    if message is None:
                        continue
                    if message["type"] == "message":
                        self.dispatch(message["data"])
                    elif message["type"] == "subscribe":  # also after redis-py reconnects
                        log.info("subscribed to %s", self.keys.events)
                        await self.resync()
                        delay = 0.1
            except RedisError as exc:
                log.warning("pub/sub connection lost (%s); resubscribing in %.1fs",
                            redis_said(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]


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


REDIS = web.AppKey("redis", Redis)
HUB = web.AppKey("hub", Hub)
KEYS = web.AppKey("keys", Keys)
ORIGINS = web.AppKey("origins", frozenset)
SUBMIT_SCRIPT = web.AppKey("submit", AsyncScript)
WRITABLE_SCRIPT = web.AppKey("writable", AsyncScript)
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
    except (RedisConnectionError, RedisTimeoutError) as exc:
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


def new_job(text: str) -> dict[str, str | int]:
    """A job as first stored: every field there, queued, version 1."""
    created = now()
    return {"id": uuid.uuid4().hex, "input": text, "status": "queued", "result": "", "error": "",
            "attempts": 0, "created": created, "updated": created, "version": 1}


def job_id_of(request: web.Request) -> str:
    job_id = request.query.get("id", "")
    if not job_id:
        raise error(web.HTTPBadRequest, "missing query parameter: id")
    if not ID_PATTERN.fullmatch(job_id):
        raise error(web.HTTPNotFound, "no job with that id")
    return job_id


async def submit(request: web.Request) -> web.Response:
    size, limit = request.content_length or 0, request.client_max_size
    if size > limit:  # refused unread; json_errors words it like the 413 of read() below
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    body = await request.read()  # stops with 413 as soon as the limit is passed
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise error(web.HTTPBadRequest, 'body is not valid JSON; send {"input": "..."}') from None
    if not isinstance(data, dict):
        raise error(web.HTTPBadRequest, 'body must be a JSON object: {"input": "..."}')
    text = data.get("input")
    if not isinstance(text, str):
        raise error(web.HTTPBadRequest, '"input" is missing or not a string')
    try:
        text.encode()
    except UnicodeEncodeError:
        raise error(web.HTTPBadRequest, '"input" is not valid Unicode (lone surrogate)') from None
    job = new_job(text)
    job_id, keys = str(job["id"]), request.app[KEYS]
    fields = [item for pair in job.items() for item in pair]
    await request.app[SUBMIT_SCRIPT](keys=[keys.job(job_id), keys.queue], args=[job_id, *fields])
    return web.json_response(job, status=201, headers={"Location": f"/status?id={job_id}"})


async def status(request: web.Request) -> web.Response:
    job_id = job_id_of(request)
    job = await read_job(request.app[REDIS], request.app[KEYS].job(job_id))
    if not job:
        raise error(web.HTTPNotFound, "no job with that id")
    return web.json_response(job | {"attempts": int(job.get("attempts", 0)),
                                    "version": int(job.get("version", 0))})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while Redis answers; the body says whether it takes writes too."""
    try:
        await request.app[WRITABLE_SCRIPT](keys=[], args=[])
    except ResponseError as exc:
        return web.json_response({"status": "ok", "redis": f"refuses writes: {redis_said(exc)}"})
    return web.json_response({"status": "ok", "redis": "ok"})


@contextlib.asynccontextmanager
async def watching(request: web.Request) -> AsyncIterator[Watcher]:
    """Check the request, then watch the job; its current state is the first message."""
    job_id = job_id_of(request)
    origin = request.headers.get("Origin")
    allowed = request.app[ORIGINS]
    if origin is not None and "*" not in allowed and origin not in allowed \
            and origin != f"{request.scheme}://{request.host}":
        raise error(web.HTTPForbidden, f"origin {origin} is not allowed")
    async with request.app[HUB].watch(job_id) as watcher:
        if watcher is None:
            raise error(web.HTTPNotFound, "no job with that id")
        yield watcher


async def relay(watcher: Watcher, send: Callable[[Update], Awaitable[object]],
                sent: int = 0) -> bool:
    """Send each state newer than `sent` in order; True after a terminal one, False if the
    server closes (or the peer went away)."""
    while (update := await watcher.get()) is not None:
        if update.version > sent:
            await send(update)
            sent = update.version
            if update.terminal:
                return True
    return False


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
        reader = asyncio.create_task(read_until_closed(ws, watcher, pinger))
        try:
            finished = await relay(watcher, lambda u: ws.send_frame(u.data, WSMsgType.TEXT))
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


def last_event_id(request: web.Request) -> int:
    """The version an EventSource saw last before reconnecting (0 on a first connection)."""
    value = request.headers.get("Last-Event-ID", "")
    if not value:
        return 0
    if not value.isdigit():
        raise error(web.HTTPBadRequest, "Last-Event-ID must be an event id this server sent")
    return int(value)


async def events(request: web.Request) -> web.StreamResponse:
    seen = last_event_id(request)
    async with watching(request) as watcher:
        state = watcher.peek()
        if seen and state is not None and state.terminal and state.version <= seen:
            # A reconnect after the end: 204 is what tells an EventSource to stop reconnecting.
            return web.Response(status=204)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(update: Update) -> None:
            await response.write(b"id: %d\ndata: %b\n\n" % (update.version, update.data))

        sender = asyncio.create_task(relay(watcher, send, seen))
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


def make_app(
    redis_url: str,
    *,
    prefix: str = PREFIX,
    allowed_origins: frozenset[str] = frozenset(),
    max_input_bytes: int = MAX_INPUT_BYTES,
    heartbeat: float = HEARTBEAT,
) -> web.Application:
    """The application; its Redis client and pub/sub listener live as long as it runs."""
    app = web.Application(middlewares=[json_errors], client_max_size=max_input_bytes)
    app[KEYS] = Keys(prefix)
    app[ORIGINS] = allowed_origins
    app[PINGER] = Pinger(heartbeat)

    async def redis_client(app: web.Application) -> AsyncIterator[None]:
        pool = BlockingConnectionPool.from_url(
            redis_url, max_connections=POOL_SIZE, timeout=POOL_WAIT, decode_responses=True,
            client_name="jobs-server",
            socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=int(HEARTBEAT),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        app[REDIS] = Redis.from_pool(pool)
        app[SUBMIT_SCRIPT] = app[REDIS].register_script(SUBMIT)
        app[WRITABLE_SCRIPT] = app[REDIS].register_script(WRITABLE)
        yield
        await app[REDIS].aclose()

    async def listener(app: web.Application) -> AsyncIterator[None]:
        app[HUB] = hub = Hub(app[REDIS], app[KEYS])
        tasks = [asyncio.create_task(hub.listen()), asyncio.create_task(app[PINGER].run())]
        yield
        for task in tasks:
            await cancel_and_wait(task)

    async def close_watchers(app: web.Application) -> None:
        app[HUB].close()

    app.cleanup_ctx.extend([redis_client, listener])
    app.on_shutdown.append(close_watchers)
    app.router.add_post("/submit", submit)
    app.router.add_get("/status", status)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/events", events)
    app.router.add_get("/healthz", healthz)
    return app


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
                        help="Redis to use (env REDIS_URL; default %(default)s)")
    parser.add_argument("--allowed-origins", default=env("ALLOWED_ORIGINS", ""),
                        help="comma-separated browser origins allowed on /ws and /events, or * "
                             "(env ALLOWED_ORIGINS; same-origin and no-Origin clients always are)")
    parser.add_argument("--max-input-bytes", type=size,
                        default=from_env(parser, "MAX_INPUT_BYTES", size, MAX_INPUT_BYTES),
                        help="largest request body accepted (env MAX_INPUT_BYTES; "
                             "default %(default)s)")
    parser.add_argument("--prefix", type=non_empty,
                        default=from_env(parser, "JOBS_PREFIX", non_empty, PREFIX),
                        help="key prefix of this deployment (env JOBS_PREFIX; default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="check the settings, then exit 0 without starting "
                             "(Redis is not contacted)")
    args = parser.parse_args(argv)
    if args.check:
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(message)s")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a watcher is a file descriptor
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    origins = frozenset(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    app = make_app(args.redis_url, prefix=args.prefix, allowed_origins=origins,
                   max_input_bytes=args.max_input_bytes)
    try:
        web.run_app(app, host=args.host, port=args.port, shutdown_timeout=2.0,
                    access_log=None, print=lambda _: log.info("listening on http://%s:%d",
                                                             args.host, args.port))
    except OSError as exc:
        raise SystemExit(f"server: cannot listen on {args.host}:{args.port}: {exc}") from None


if __name__ == "__main__":
    main()
