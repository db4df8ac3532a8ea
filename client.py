"""Submit jobs to the job queue server, follow them and manage them: a command line and a library.

    python client.py "hello world"               # prints HELLO WORLD
    python client.py --no-wait "hello"           # prints the job id and returns
    python client.py --delay 30 "later"          # the job runs in 30 s; waits for it
    python client.py --watch ID                  # follows a job submitted earlier
    python client.py --list failed --limit 20    # the 20 newest failed jobs, one line each
    python client.py --retry ID                  # runs a failed or cancelled job again, waits
    python client.py --cancel ID                 # cancels a queued, delayed or running job
    python client.py --stats                     # counts, workers and Redis memory, a few lines
    python client.py --queue emails "hi"         # the job goes to (and is followed in) a queue
    python client.py --priority 8 --group acme "x"  # starts before priority 5; acme shares fairly
    python client.py --queues                    # every queue: length, running, paused, limits
    python client.py --queue emails --concurrency 4 --rate-limit 10/1   # a queue's limits
    python client.py --queue emails --group-concurrency none            # none: no such limit
    python client.py --queue emails --pause      # starts nothing until --resume (still queues)
    python client.py --expires-in 300 "now or never"   # cancelled if not started within 300 s
    python client.py --schedule nightly --cron "0 3 * * *" --timezone Europe/Paris "backup"
    python client.py --schedule ping --every 60 --overlap skip "ping"  # a job every minute
    python client.py --schedules                 # every schedule: when, next run, runs, last job
    python client.py --pause-schedule nightly    # and --resume-schedule, --delete-schedule
    JOBS_TOKEN=secret python client.py "hi"      # a server started with a token needs it

Every submit carries an `Idempotency-Key` of its own (a uuid4, made once per submit). A submit
that gets no answer (connection refused or dropped, no answer in time, 502, 503 or 504) is sent
again, the same request with the same key, with backoff, for up to 10 s: the server makes one
job of it however many of the tries reached it, so retrying can never submit twice.

Progress goes to stderr, the result to stdout. The client follows the job over the WebSocket;
if the connection drops (a server restart, say) it asks /status and reconnects until --timeout.
Exit status: 0 done (or: cancel accepted, list and stats printed), 1 failed or cancelled,
2 usage or connection error or the server refused (a 401 says a token is needed), 3 timed out
(130: Ctrl+C, which leaves the job as it is). A cancelled job exits 1 like a failed one: either
way it gave no result, and stderr says which.

As a library, plain functions that print nothing and return the job (or queue) as a dict:

    import client
    job = client.submit("hello world", server="http://127.0.0.1:8080", priority=7, group="acme")
    job = client.wait(job["id"], timeout=30)   # job["status"]: "done", "failed" or "cancelled"
    print(job["result"])
    client.set_queue("default", concurrency=4, rate_limit={"jobs": 10, "per": 1})  # None removes
    client.pause("default"); client.resume("default")
    client.queues()                            # [{"name", "length", "running", "paused", ...}]
    client.queue("default")["settings"]        # {"rate_limit": {"jobs": 10, "per": 1}, ...}
    client.set_schedule("nightly", "backup", cron="0 3 * * *", timezone="Europe/Paris")
    client.set_schedule("ping", "ping", every=60, queue="emails", overlap="skip")
    client.schedules()                         # [{"name", "cron", "next_run", "runs", ...}]
    client.pause_schedule("ping"); client.resume_schedule("ping"); client.delete_schedule("ping")
    client.enqueue("hello", redis_url="redis://localhost:6379/0")  # no HTTP: needs redis-py

They raise `TimeoutError` when the job has not ended in time, and `ServerError` when the server
cannot be reached or refuses (a bad priority, group, limit or schedule: 400; an unknown
schedule: 404) (`.status`: the HTTP status or None; `.error`: the server's text),
`TokenNeeded` (a `ServerError`) on a 401. `submit` sends its submit again when it gets no
answer, with the same Idempotency-Key (see above), for up to `retry_for` seconds. With
`token=None` they send the token in the environment variable JOBS_TOKEN, if set, as the
command line does. Progress is logged at INFO on this module's logger. From async code, use
the async pieces they are made of:
`async with open_session(token) as s: job = await wait_for_end(s, server, job_id)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import aiohttp
from aiohttp import WSCloseCode

DEFAULT_SERVER = "http://127.0.0.1:8080"
DEFAULT_QUEUE = "default"
STATES = ("queued", "delayed", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
DONE, FAILED, ERROR, TIMED_OUT = 0, 1, 2, 3  # exit status; a cancelled job exits FAILED
RECONNECT_CAP = 2.0  # seconds between reconnection tries at most
PAGE = 500  # most jobs GET /jobs gives at once
PREVIEW = 40  # characters of a job's input that --list shows
PRIORITIES = range(1, 10)  # a job's priority: higher starts first
DEFAULT_PRIORITY = 5
GROUP_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
LIMITS = ("rate_limit", "concurrency", "group_rate_limit", "group_concurrency")  # of a queue
SUBMIT_RETRY_FOR = 10.0  # seconds a submit that got no answer is sent again for (same key)
TRY_TIMEOUT = 10.0  # seconds one try of a submit waits for its answer
NO_ANSWER = (502, 503, 504)  # a proxy's (or the server's) "not now": the submit is sent again
OVERLAP = ("allow", "skip")  # what a schedule's tick does while its last job has not ended

log = logging.getLogger(__name__)
Job = dict[str, Any]
Queue = dict[str, Any]  # as GET /queues/NAME gives it: name, length, running, paused, settings
Schedule = dict[str, Any]  # as GET /schedules/NAME gives it: name, cron or every, next_run, ...
T = TypeVar("T")


class ServerError(Exception):
    """The server cannot be reached (`status` None), or refused a request (`status` its HTTP
    status, `error` its own words); the message says which, in one line."""

    def __init__(self, message: str, status: int | None = None, error: str = "") -> None:
        super().__init__(message)
        self.status, self.error = status, error


class TokenNeeded(ServerError):
    """401: the server wants a token, and none (or not its own) was sent."""


Unreachable = ServerError  # the name before there were other refusals than "cannot reach"


def server_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with a host."""
    try:
        url = urllib.parse.urlsplit(text)
        ok = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:  # from urlsplit (a bad IPv6 address) or .port (not 0-65535)
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    return text


def number(text: str) -> float:
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, more than 0."""
    if (value := number(text)) <= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range (more than 0)")
    return value


def delay(text: str) -> float:
    """An argparse type: a finite number of seconds, at least 0."""
    if (value := number(text)) < 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at least 0)")
    return value


def queue_name(text: str) -> str:
    """An argparse type: a queue's name."""
    if not re.fullmatch(r"[a-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue name (a-z, 0-9, _ and -, "
                                         f"1 to 64 characters)")
    return text


def schedule_name(text: str) -> str:
    """An argparse type: a schedule's name (the characters of a queue's)."""
    if not re.fullmatch(r"[a-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a schedule name (a-z, 0-9, _ and -, "
                                         f"1 to 64 characters)")
    return text


def cron(text: str) -> str:
    """An argparse type: a cron expression's shape, five fields (the server checks each)."""
    if len(text.split()) != 5:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cron expression: five fields, "
                                         f"minute hour day-of-month month day-of-week (like "
                                         f"'*/5 * * * *')")
    return " ".join(text.split())


def every(text: str) -> int | float:
    """An argparse type: a schedule's period, at least 1 second (60, not 60.0, in the request)."""
    if (value := number(text)) < 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at least 1 second)")
    return int(value) if value.is_integer() else value


def priority(text: str) -> int:
    """An argparse type: a job's priority, a whole number from 1 to 9."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value not in PRIORITIES:
        raise argparse.ArgumentTypeError(f"{text} is out of range (1 to 9; higher starts first)")
    return value


def group_name(text: str) -> str:
    """An argparse type: a job's group."""
    if not GROUP_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a group name (A-Z, a-z, 0-9, _ . : "
                                         f"and -, 1 to 128 characters)")
    return text


def none_or(kind: Callable[[str], T]) -> Callable[[str], T | None]:
    """An argparse type: `none` (the limit is removed), or what kind takes."""
    def convert(text: str) -> T | None:
        return None if text == "none" else kind(text)
    return convert


def rate(text: str) -> dict[str, int | float]:
    """An argparse type: a rate limit, J/S: at most J jobs start in any S seconds."""
    jobs, slash, per = text.partition("/")
    try:
        value = {"jobs": int(jobs), "per": float(per)}
    except ValueError:
        value = {}
    if not slash or not value or not math.isfinite(value["per"]) or value["jobs"] < 1 \
            or value["per"] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not JOBS/SECONDS (like 10/60: at most 10 "
                                         f"jobs start in any 60 s; both more than 0), or none")
    if value["per"].is_integer():  # 60, not 60.0, in the request
        value["per"] = int(value["per"])
    return value


def whole(text: str) -> int:
    """An argparse type: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at least 1)")
    return value


def token_text(text: str) -> str:
    """An argparse type for a token; its message never shows the token."""
    try:
        return check_token(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_token(token: str) -> str:
    if not token:
        raise ValueError("the token is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in token):  # a token file's newline, say
        raise ValueError("the token holds a control character (a line break?)")
    return token


def open_session(token: str | None = None) -> aiohttp.ClientSession:
    """A session that sends `Authorization: Bearer <token>` on every request, the WebSocket's
    included. token None: the environment variable JOBS_TOKEN if it is set, else no token."""
    if token is None:
        token = os.environ.get("JOBS_TOKEN")
    headers = {} if token is None else {"Authorization": f"Bearer {check_token(token)}"}
    return aiohttp.ClientSession(headers=headers,
                                 timeout=aiohttp.ClientTimeout(sock_connect=5))


async def request_json(session: aiohttp.ClientSession, method: str, url: str,
                       **kwargs: Any) -> dict[str, Any]:
    """The JSON object a request is answered with ({} for an empty answer: a 204). ServerError
    with `status` None when no answer came, with the status and the server's words (or the
    start of a proxy's page) for an error."""
    try:
        async with session.request(method, url, **kwargs) as response:
            text = (await response.read()).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError)
                           else type(exc).__name__)
        raise ServerError(f"cannot reach {url}: {why}") from None
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = None
    if response.status >= 400:
        error = (str(body.get("error", body)) if isinstance(body, dict)
                 else " ".join(text.split())[:200] or str(response.reason))
        kind = TokenNeeded if response.status == 401 else ServerError
        raise kind(f"server said {response.status}: {error}", response.status, error)
    if not isinstance(body, dict):
        raise ServerError(f"cannot reach {url}: it answered {response.status} with no JSON object")
    return body


def job_url(server: str, job_id: str, action: str) -> str:
    return f"{server}/jobs/{urllib.parse.quote(job_id, safe='')}/{action}"


def on(queue: str, **params: str) -> dict[str, str]:
    """Query parameters, with the queue's name unless it is the default."""
    return params | ({} if queue == DEFAULT_QUEUE else {"queue": queue})


def given(**fields: Any) -> dict[str, Any]:
    """A request's body: the fields given (None: not given, the server's default)."""
    return {name: value for name, value in fields.items() if value is not None}


async def submit_job(session: aiohttp.ClientSession, server: str, text: str,
                     delay: float | None = None, queue: str = DEFAULT_QUEUE,
                     priority: int | None = None, group: str | None = None,
                     expires_in: float | None = None, *, key: str | None = None,
                     retry_for: float = SUBMIT_RETRY_FOR) -> Job:
    """POST /submit with an Idempotency-Key (`key`, else a new uuid4), the job as the server
    stored it. A try that gets no answer (the server cannot be reached, the connection drops,
    nothing comes within TRY_TIMEOUT s, or a 502, 503 or 504) is sent again, the same bytes with
    the same key, with backoff, until `retry_for` seconds have passed: the server makes one job
    however many of the tries reached it, and answers a later one with that job (200, as it is
    now). Then the last ServerError is raised, saying how many tries there were."""
    body = json.dumps(given(input=text, delay=delay, queue=None if queue == DEFAULT_QUEUE
                            else queue, priority=priority, group=group,
                            expires_in=expires_in)).encode()  # the same bytes on every try
    headers = {"Content-Type": "application/json", "Idempotency-Key": key or uuid.uuid4().hex}
    url, timeout = f"{server}/submit", aiohttp.ClientTimeout(total=TRY_TIMEOUT, sock_connect=5)
    start, pause, tries = time.monotonic(), 0.1, 1
    while True:
        try:
            job = await request_json(session, "POST", url, data=body, headers=headers,
                                     timeout=timeout)
        except ServerError as exc:
            answered = exc.status is not None and exc.status not in NO_ANSWER
            if answered or time.monotonic() + pause > start + retry_for:
                if tries == 1:
                    raise
                raise type(exc)(f"{exc} (after {tries} tries in {time.monotonic() - start:.0f}s, "
                                f"each with the same Idempotency-Key)", exc.status,
                                exc.error) from None
            log.debug("submit, try %d: %s; sending it again in %.1fs", tries, exc, pause)
        else:
            if tries > 1:
                log.info("submit answered at try %d (the same Idempotency-Key each time: one "
                         "job)", tries)
            return job
        await asyncio.sleep(pause)
        pause, tries = min(pause * 2, RECONNECT_CAP), tries + 1


def queue_url(server: str, name: str, action: str = "") -> str:
    return f"{server}/queues/{urllib.parse.quote(name, safe='')}" + (f"/{action}" if action else "")


async def queue_request(session: aiohttp.ClientSession, server: str, name: str,
                        action: str = "", settings: dict[str, Any] | None = None) -> Queue:
    """GET a queue (no action, no settings), PUT its settings, or POST pause or resume."""
    if settings is not None:
        return await request_json(session, "PUT", queue_url(server, name), json=settings)
    method = "POST" if action else "GET"
    return await request_json(session, method, queue_url(server, name, action))


def schedule_url(server: str, name: str = "", action: str = "") -> str:
    return (f"{server}/schedules" + (f"/{urllib.parse.quote(name, safe='')}" if name else "")
            + (f"/{action}" if action else ""))


def schedule_body(text: str, *, cron: str | None = None, timezone: str | None = None,
                  every: float | None = None, queue: str | None = None,
                  priority: int | None = None, group: str | None = None,
                  expires_in: float | None = None, overlap: str | None = None) -> dict[str, Any]:
    """PUT /schedules/NAME's body: the job each tick makes (`text` its input), and when."""
    return given(cron=cron, timezone=timezone, every=every, input=text,
                 queue=None if queue == DEFAULT_QUEUE else queue, priority=priority,
                 group=group, expires_in=expires_in, overlap=overlap)


async def job_messages(session: aiohttp.ClientSession, server: str, job_id: str,
                       queue: str = DEFAULT_QUEUE, after: int = 0) -> AsyncGenerator[Job, None]:
    """The job's messages after the one numbered `after` (0: all of them), over the WebSocket,
    until its end: its states ({"type": "state", "status", ...}), progress and output, each
    with its `seq`. When the connection drops, it reconnects and goes on after the last one it
    gave: none is missed, none comes twice."""
    delay, seen, ended = 0.1, after, False
    while True:
        try:
            async with session.ws_connect(f"{server}/ws",
                                          params=on(queue, id=job_id, after=str(seen))) as ws:
                delay = 0.1
                async for frame in ws:
                    if frame.type is not aiohttp.WSMsgType.TEXT:
                        break
                    message: Job = json.loads(frame.data)
                    seen = int(message.get("seq", seen))
                    # A job run again (retried by hand) has ended before: its end is the last
                    # message, after which the server closes the stream.
                    ended = message.get("type", "state") == "state" \
                        and message["status"] in TERMINAL
                    yield message
            if ended and ws.close_code == WSCloseCode.OK:
                return
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise TokenNeeded(f"server said 401 to the WebSocket of job {job_id}",
                                  401, exc.message) from None
            if exc.status in (400, 403, 404):
                raise ServerError(f"server refused to follow job {job_id}: {exc.status} "
                                  f"{exc.message}", exc.status, exc.message) from None
        except aiohttp.ClientError:
            pass
        log.info("connection to %s lost; reconnecting in %.1fs", server, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_CAP)


async def follow_to_end(session: aiohttp.ClientSession, server: str, job_id: str,
                        queue: str = DEFAULT_QUEUE, after: int = 0,
                        show: Callable[[Job], None] | None = None, quiet: int = 0) -> Job:
    """Follow the job until it ends (see job_messages), logging each change of status (but
    of the states numbered up to `quiet`: those were before) and giving every message to
    `show`; the last state (a message: id, status, result, error, attempts, updated, version,
    seq)."""
    last: Job = {}
    async for message in job_messages(session, server, job_id, queue, after):
        if show is not None:
            show(message)
        if message.get("type", "state") != "state":
            continue
        if message["status"] != last.get("status") and message.get("seq", quiet + 1) > quiet:
            log.info("job %s: %s", job_id, message["status"])
        last = message
    return last


async def wait_for_end(session: aiohttp.ClientSession, server: str, job_id: str,
                       queue: str = DEFAULT_QUEUE, show: Callable[[Job], None] | None = None,
                       submitted: bool = False) -> Job:
    """The job once it has ended: GET /status, then follow it if it has not (the job with
    the fields of its last message over them), logging its status then and each change. With
    `show`, every message of the job from its first is given to it (its output, say), the job
    followed even if it has ended. `submitted`: just now, so `queued` goes without saying. No
    deadline of its own: run it under `asyncio.timeout`."""
    job = await request_json(session, "GET", f"{server}/status", params=on(queue, id=job_id))
    seq = int(job.get("seq", 0))  # of its last message so far
    if not (submitted and job["status"] == "queued"):
        log.info("job %s: %s", job_id, job["status"])
    if job["status"] in TERMINAL and show is None:
        return job
    last = await follow_to_end(session, server, job_id, queue, 0 if show else seq, show, seq)
    return {**job, **{k: v for k, v in last.items() if k != "type"}}


def too_late(timeout: float, job_id: str) -> TimeoutError:
    return TimeoutError(f"timed out after {timeout:g}s waiting for job {job_id}")


def blocking(token: str | None, call: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
    """Run `call` with a session of its own (see open_session), from code that is not async."""
    async def go() -> T:
        async with open_session(token) as s:
            return await call(s)
    return asyncio.run(go())


def submit(text: str, *, server: str = DEFAULT_SERVER, token: str | None = None,
           delay: float | None = None, queue: str = DEFAULT_QUEUE, priority: int | None = None,
           group: str | None = None, expires_in: float | None = None,
           idempotency_key: str | None = None, retry_for: float = SUBMIT_RETRY_FOR) -> Job:
    """Submit a job (POST /submit) and return it as the server stored it: `status` "queued",
    or "delayed" with `run_at` when `delay` (seconds, at least 0) is given. `priority`: 1 to 9,
    higher starts first (None: the server's default, 5); `group`: jobs of one group share the
    queue fairly with other groups, and a queue's group limits count each group on its own.
    `expires_in`: seconds (more than 0) the job has to start in, counted from when it is due;
    not started by then, it ends "cancelled" (`error` "expired: ...") and never runs.

    It sends an Idempotency-Key, `idempotency_key` (1 to 255 printable ASCII characters; keep
    one per logical job to submit it again safely, even from another process) or a new uuid4,
    and sends the very same request again while it gets no answer (cannot connect, a dropped
    connection, nothing within 10 s, a 502, 503 or 504), with backoff, for up to `retry_for`
    seconds (0: one try): the server makes one job however many tries reach it, and a try
    after the first that did gets that job as it is now.

    token: sent as `Authorization: Bearer <token>`; None: the environment variable JOBS_TOKEN
    if set, else none. Raises ServerError (TokenNeeded on a 401) if the server cannot be
    reached or refuses (a 400 for a bad delay, priority, group, expires_in or key; a 409 for a
    key sent before with another body), ValueError for an empty token."""
    return blocking(token, lambda s: submit_job(
        s, server.rstrip("/"), text, delay, queue, priority, group, expires_in,
        key=idempotency_key, retry_for=retry_for))


def enqueue(text: str | list[str], *, redis_url: str = "redis://localhost:6379/0",
            queue: str = DEFAULT_QUEUE, priority: int | None = None, group: str | None = None,
            delay: float | None = None, expires_in: float | None = None,
            prefix: str | None = None) -> Job | list[Job]:
    """Submit without HTTP, for code that runs beside the workers: the same SUBMIT script the
    server runs, on a Redis connection kept per URL, with the same checks (ValueError says what
    is wrong) and the same job (every server's watchers see it at once). A list of texts is one
    bulk submit, all stored or none. `prefix`: the deployment's (JOBS_PREFIX, else {jobs}).
    Needs the redis package, imported here: the rest of this module speaks HTTP with aiohttp
    alone. Returns the job (a list of them for a list) as stored."""
    import store
    if not store.QUEUE_NAME.fullmatch(queue):
        raise ValueError("queue must be a name of 1 to 64 characters a-z, 0-9, _ and -")
    asked = store.Submission.of(given(
        **({"inputs": text} if isinstance(text, list) else {"input": text}), priority=priority,
        group=group, delay=delay, expires_in=expires_in))
    producer = Producer.of(redis_url, prefix or os.environ.get("JOBS_PREFIX") or store.PREFIX)
    jobs = producer.submit(asked, queue)
    return jobs if isinstance(text, list) else jobs[0]


class Producer:
    """enqueue()'s connection to one Redis: a client, the SUBMIT script, the queues known to
    be in the registry. One per URL and prefix, made on first use."""

    made: ClassVar[dict[tuple[str, str], Producer]] = {}

    def __init__(self, redis_url: str, prefix: str) -> None:
        import store
        self.prefix, self.registered = prefix, set[str]()
        self.redis = store.connect(redis_url, decode_responses=True, client_name="jobs-producer")
        self.script = self.redis.register_script(store.SUBMIT)

    @classmethod
    def of(cls, redis_url: str, prefix: str) -> Producer:
        if (redis_url, prefix) not in cls.made:
            cls.made[redis_url, prefix] = cls(redis_url, prefix)
        return cls.made[redis_url, prefix]

    def submit(self, asked: Any, queue: str) -> list[Job]:
        import store
        keys = store.Keys(self.prefix, queue)
        if queue not in self.registered:  # as a server registers a queue before its first job
            self.redis.sadd(keys.registry, queue)
            self.registered.add(queue)
        jobs = store.new_jobs(asked.texts, asked.due, queue, asked.priority, asked.group,
                              asked.expires_in)
        self.script(keys=[keys.queue], args=store.submit_args(
            keys.prefix, store.RETENTION, jobs, asked.due))
        return [job | {"group": job.get("group")} for job in jobs]


def queue_call(name: str, server: str, token: str | None, action: str = "",
               settings: dict[str, Any] | None = None) -> Queue:
    return blocking(token, lambda s: queue_request(s, server.rstrip("/"), name, action,
                                                   settings))


def queues(*, server: str = DEFAULT_SERVER, token: str | None = None) -> list[Queue]:
    """Every queue (GET /queues), by name: each a dict with `name`, `length` (jobs queued),
    `running`, `paused`, `held_back` (queued jobs a pause or a limit holds back now) and
    `settings` (see set_queue). Raises ServerError as `submit` does."""
    async def go() -> list[Queue]:
        async with open_session(token) as s:
            reply = await request_json(s, "GET", f"{server.rstrip('/')}/queues")
            return list(reply["queues"])
    return asyncio.run(go())


def queue(name: str, *, server: str = DEFAULT_SERVER, token: str | None = None) -> Queue:
    """One queue (GET /queues/NAME), as `queues` gives each. ServerError 404: never used."""
    return queue_call(name, server, token)


def set_queue(name: str, *, server: str = DEFAULT_SERVER, token: str | None = None,
              **settings: Any) -> Queue:
    """Change a queue's limits (PUT /queues/NAME), those named and no others; the queue after.

        set_queue("emails", rate_limit={"jobs": 10, "per": 60}, concurrency=4,
                  group_rate_limit={"jobs": 1, "per": 1}, group_concurrency=None)

    rate_limit: at most `jobs` of the queue start in any `per` seconds (also a (jobs, per)
    tuple); concurrency: at most that many run at once, over all workers; group_rate_limit and
    group_concurrency: the same for each group on its own. None removes a limit. Raises
    ServerError 400 for a bad value (nothing is changed then), TypeError for an unknown name."""
    if unknown := set(settings) - set(LIMITS):
        raise TypeError(f"set_queue() got unknown settings: {', '.join(sorted(unknown))} "
                        f"(it takes {', '.join(LIMITS)})")
    body = {name: {"jobs": value[0], "per": value[1]} if isinstance(value, tuple) else value
            for name, value in settings.items()}
    return queue_call(name, server, token, settings=body)


def pause(name: str, *, server: str = DEFAULT_SERVER, token: str | None = None) -> Queue:
    """Pause a queue (POST /queues/NAME/pause): it takes submits but starts none of its jobs
    until `resume`; those running finish. The queue after."""
    return queue_call(name, server, token, "pause")


def resume(name: str, *, server: str = DEFAULT_SERVER, token: str | None = None) -> Queue:
    """Start a paused queue's jobs again (POST /queues/NAME/resume). The queue after."""
    return queue_call(name, server, token, "resume")


def schedules(*, server: str = DEFAULT_SERVER, token: str | None = None) -> list[Schedule]:
    """Every schedule (GET /schedules), by name: each a dict with `name`, `cron` and `timezone`
    or `every` (seconds), the job it makes (`input`, `queue`, `priority`, `group`,
    `expires_in`), `overlap`, `paused`, `next_run` (RFC 3339, in the schedule's zone),
    `last_job` (the id of the last job it made, or None) and `runs`. Raises ServerError as
    `submit` does."""
    url = schedule_url(server.rstrip("/"))
    return list(blocking(token, lambda s: request_json(s, "GET", url))["schedules"])


def schedule(name: str, *, server: str = DEFAULT_SERVER, token: str | None = None) -> Schedule:
    """One schedule (GET /schedules/NAME), as `schedules` gives each. ServerError 404: none
    of that name."""
    url = schedule_url(server.rstrip("/"), name)
    return blocking(token, lambda s: request_json(s, "GET", url))


def set_schedule(name: str, input: str, *, cron: str | None = None,
                 timezone: str | None = None, every: float | None = None,
                 queue: str | None = None, priority: int | None = None,
                 group: str | None = None, expires_in: float | None = None,
                 overlap: str | None = None, server: str = DEFAULT_SERVER,
                 token: str | None = None) -> Schedule:
    """Create or replace a schedule (PUT /schedules/NAME): at each tick, a job of `input`. The
    ticks: `cron` ("*/5 * * * *": minute, hour, day of month, month, day of week) in
    `timezone` (an IANA name, default UTC), or `every` seconds (at least 1; the multiples of it
    since 1970). The job: `queue`, `priority`, `group` and `expires_in` as `submit` takes them.
    `overlap` "skip": no job while the last one has not ended (default "allow"). None: not
    given. The schedule after; ServerError 400 for a bad value (the server says which)."""
    url = schedule_url(server.rstrip("/"), name)
    body = schedule_body(input, cron=cron, timezone=timezone, every=every, queue=queue,
                         priority=priority, group=group, expires_in=expires_in,
                         overlap=overlap)
    return blocking(token, lambda s: request_json(s, "PUT", url, json=body))


def delete_schedule(name: str, *, server: str = DEFAULT_SERVER,
                    token: str | None = None) -> None:
    """Delete a schedule (DELETE /schedules/NAME); the jobs it made stay. ServerError 404: none
    of that name."""
    url = schedule_url(server.rstrip("/"), name)
    blocking(token, lambda s: request_json(s, "DELETE", url))


def pause_schedule(name: str, *, server: str = DEFAULT_SERVER,
                   token: str | None = None) -> Schedule:
    """Pause a schedule (POST /schedules/NAME/pause): its ticks pass without a job until
    `resume_schedule`. The schedule after."""
    url = schedule_url(server.rstrip("/"), name, "pause")
    return blocking(token, lambda s: request_json(s, "POST", url))


def resume_schedule(name: str, *, server: str = DEFAULT_SERVER,
                    token: str | None = None) -> Schedule:
    """Resume a paused schedule (POST /schedules/NAME/resume): jobs again from its next tick on
    (the ticks it missed while paused make none). The schedule after."""
    url = schedule_url(server.rstrip("/"), name, "resume")
    return blocking(token, lambda s: request_json(s, "POST", url))


def wait(job_id: str, *, server: str = DEFAULT_SERVER, token: str | None = None,
         timeout: float = 60.0, queue: str = DEFAULT_QUEUE) -> Job:
    """Wait for the job to end and return its final state: `status` "done" (with `result`),
    "failed" (with `error`) or "cancelled". It follows the job over the WebSocket and, if the
    connection drops, asks /status and reconnects until the timeout.

    token: as for `submit`. Raises TimeoutError if the job has not ended within `timeout`
    seconds (the job carries on), ServerError (TokenNeeded on a 401) if the server cannot be
    reached, or refuses (a 404 for an unknown id)."""
    async def go() -> Job:
        async with open_session(token) as s, asyncio.timeout(timeout):
            return await wait_for_end(s, server.rstrip("/"), job_id, queue)
    try:
        return asyncio.run(go())
    except TimeoutError:
        raise too_late(timeout, job_id) from None


def follow(job_id: str, *, server: str = DEFAULT_SERVER, token: str | None = None,
           queue: str = DEFAULT_QUEUE, after: int = 0) -> Iterator[Job]:
    """The job's messages, as they come, until it ends: each a dict with its `type` ("state":
    status, result, error, attempts...; "progress": done, total, message; "output": data;
    "trimmed": missed) and `seq` (1, 2, ...), from the one after `after` (0: from the first,
    however long ago it was sent). A dropped connection is resumed where it was: none is
    missed, none comes twice. token: as for `submit`. Raises ServerError (TokenNeeded on a
    401) if the server refuses (a 404 for an unknown id).

        for message in client.follow(job["id"]):
            if message["type"] == "output":
                print(message["data"], end="", flush=True)"""
    loop = asyncio.new_event_loop()

    async def opened() -> aiohttp.ClientSession:
        return open_session(token)
    try:
        session = loop.run_until_complete(opened())
        messages = job_messages(session, server.rstrip("/"), job_id, queue, after)
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(messages))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(messages.aclose())
            loop.run_until_complete(session.close())
    finally:
        loop.close()


def outcome(job: Job, shown: Shown | None = None) -> int:
    """Print an ended job's result (stdout) or what became of it (stderr); the exit status.
    After its output was shown, the result is printed only if it is not that output."""
    if shown is not None:
        shown.done()
    if job["status"] == "done":
        if shown is None or not shown.printed:
            print(job["result"], flush=True)
        elif shown.attempt != job.get("attempts") or job["result"] != "".join(shown.output):
            print("" if shown.at_line_start else "\n", job["result"], sep="", flush=True)
        elif not shown.at_line_start:
            print(flush=True)
        return DONE
    if job["status"] == "failed":
        log.error("job %s failed: %s", job["id"], job.get("error", ""))
    else:  # by hand, or it expired before it started (its error says so)
        why = job.get("error")
        log.error("job %s was cancelled%s", job["id"], f" ({why})" if why else "")
    return FAILED


class Shown:
    """Shows a job's messages as they come (wait_for_end's `show`): its output on stdout,
    each piece as it arrives; its progress on stderr, as a bar redrawn in place when stderr is
    a terminal, else as a line per change."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.attempt: int | None = None  # whose output is shown
        self.output: list[str] = []  # that try's pieces
        self.printed = False  # any output at all
        self.at_line_start = True  # stdout
        self.bar = ""  # on stderr now (a terminal's)

    def __call__(self, message: Job) -> None:
        kind = message.get("type")
        if kind == "output":
            if message["attempt"] != self.attempt:
                if self.printed:
                    self.newline()
                    self.log("job %s: the output of try %d", message["id"], message["attempt"])
                self.attempt, self.output = message["attempt"], []
            self.clear()
            sys.stdout.write(message["data"])
            sys.stdout.flush()
            self.output.append(message["data"])
            self.printed = True
            self.at_line_start = message["data"].endswith("\n")
            self.draw()
        elif kind == "progress":
            done, total = message["done"], message["total"]
            fraction = done if total is None else done / total if total else 0.0
            amount = f"{fraction:.0%}" if total is None else f"{done:g}/{total:g}"
            text = " ".join(filter(None, (amount, message.get("message", ""))))
            if self.tty:
                filled = round(max(0.0, min(fraction, 1.0)) * 20)
                self.bar = f"[{'#' * filled}{'.' * (20 - filled)}] {text}"[:100]
                self.draw()
            else:
                log.info("job %s: %s", message["id"], text)
        elif kind == "trimmed":
            self.log("job %s: its %d oldest messages are no longer kept", message["id"],
                     message["missed"])
        elif message.get("status") in TERMINAL:
            self.done()

    def newline(self) -> None:
        if not self.at_line_start:
            sys.stdout.write("\n")
            self.at_line_start = True

    def log(self, text: str, *args: object) -> None:
        self.clear()
        log.info(text, *args)
        self.draw()

    def clear(self) -> None:
        if self.tty and self.bar:
            sys.stderr.write("\r\x1b[K")

    def draw(self) -> None:
        if self.tty and self.bar:
            sys.stderr.write("\r" + self.bar)
            sys.stderr.flush()

    def done(self) -> None:
        """The job ended: the bar goes."""
        self.clear()
        self.bar = ""


def when(stamp: str | None) -> str:
    """An RFC 3339 time to the second, as the server gave it (UTC)."""
    try:
        return datetime.fromisoformat(stamp or "").isoformat(timespec="seconds")
    except ValueError:
        return stamp or "-"


def ago(stamp: str | None) -> str:
    try:
        return f"{(datetime.now(UTC) - datetime.fromisoformat(stamp or '')).total_seconds():.0f}s"
    except (ValueError, TypeError):
        return "?"


def line(job: Job) -> str:
    """One job of --list: id, status, updated, the input's start on one line."""
    text = " ".join(job.get("input", "").split())
    preview = text if len(text) <= PREVIEW else text[:PREVIEW - 1] + "…"
    return f"{job['id']}  {job['status']:<9}  {when(job.get('updated'))}  {preview}"


async def list_jobs(session: aiohttp.ClientSession, server: str, status: str,
                    limit: int, queue: str = DEFAULT_QUEUE) -> int:
    """Print the newest `limit` jobs in `status`, following the server's cursor."""
    shown, cursor = 0, None
    while shown < limit:
        params = on(queue, status=status, limit=str(min(limit - shown, PAGE)))
        if cursor is not None:
            params["cursor"] = cursor
        page = await request_json(session, "GET", f"{server}/jobs", params=params)
        for job in page["jobs"]:
            print(line(job), flush=True)
        shown += len(page["jobs"])
        if (cursor := page.get("next_cursor")) is None or not page["jobs"]:
            break
    log.info("%d %s job%s%s", shown, status, "" if shown == 1 else "s",
             " (there are more: raise --limit)" if cursor is not None else "")
    return DONE


def limits(settings: dict[str, Any]) -> str:
    """A queue's limits in a few words, as --queues prints them."""
    said = []
    for name in LIMITS:
        value, what = settings.get(name), name.replace("_", " ")
        if isinstance(value, dict):
            said.append(f"{what.removesuffix(' limit')} {value['jobs']}/{value['per']:g}s")
        elif value is not None:
            said.append(f"{what} {value}")
    return ", ".join(said) or "no limits"


def queue_line(queue: Queue) -> str:
    """One queue of --queues: name, paused or not, lengths, limits."""
    return (f"{queue['name']:<16} {'paused' if queue.get('paused') else 'active':<6}  "
            f"{queue.get('length', 0)} queued, {queue.get('running', 0)} running, "
            f"{queue.get('held_back', 0)} held back;  {limits(queue.get('settings', {}))}")


def schedule_line(schedule: Schedule) -> str:
    """One schedule of --schedules: name, paused or not, when, next run, runs, last job."""
    ticks = (f"cron '{schedule['cron']}' {schedule.get('timezone', 'UTC')}"
             if "cron" in schedule else f"every {schedule['every']:g}s")
    runs, queue = schedule.get("runs", 0), schedule.get("queue", DEFAULT_QUEUE)
    return (f"{schedule['name']:<16} {'paused' if schedule.get('paused') else 'active':<6}  "
            f"{ticks:<32}  next {when(schedule.get('next_run'))}  {runs} run"
            f"{'' if runs == 1 else 's'}, last job {schedule.get('last_job') or '-'}"
            + ("" if queue == DEFAULT_QUEUE else f";  queue {queue}"))


def summary(stats: dict[str, Any]) -> list[str]:
    """GET /stats in a few lines for a person (the JSON is one curl away)."""
    jobs, totals, workers = stats.get("jobs", {}), stats.get("totals", {}), stats.get("workers", [])
    hour = stats.get("done_per_minute", [])
    age, redis = stats.get("oldest_queued_age"), stats.get("redis", {})
    busy = sum(len(w.get("running", [])) for w in workers)
    used, most = redis.get("used_memory", 0) / 2**20, redis.get("maxmemory", 0) / 2**20
    return [
        "jobs       " + "  ".join(f"{state} {jobs.get(state, 0)}" for state in STATES),
        f"queue      {stats.get('queue_length', 0)} waiting"
        f" (oldest {'-' if age is None else f'{age:.0f}s'}), {stats.get('delayed', 0)} delayed,"
        f" {stats.get('dead_letter', 0)} dead-lettered, {stats.get('held_back', 0)} held back"
        + (" (paused)" if stats.get("paused") else ""),
        "totals     " + "  ".join(f"{name} {n}" for name, n in totals.items()),
        f"last hour  {sum(m.get('done', 0) for m in hour)} done,"
        f" {sum(m.get('failed', 0) for m in hour)} failed",
        f"workers    {len(workers)}, {sum(w.get('concurrency', 0) for w in workers)} slots,"
        f" {busy} busy",
        *(f"  {w.get('name')}: {len(w.get('running', []))}/{w.get('concurrency')} busy,"
          f" last heartbeat {ago(w.get('last_heartbeat'))} ago" for w in workers),
        f"redis      {used:.1f} MiB used of "
        + (f"{most:.1f} MiB" if most else "no limit (maxmemory 0)"),
    ]


async def cancel(session: aiohttp.ClientSession, server: str, job_id: str,
                 queue: str = DEFAULT_QUEUE) -> int:
    job = await request_json(session, "POST", job_url(server, job_id, "cancel"), params=on(queue))
    if job["status"] == "running":  # 202: its worker stops it within about a second
        log.info("job %s: running; cancel requested", job_id)
    else:
        log.info("job %s: %s", job_id, job["status"])
    return DONE


async def act(session: aiohttp.ClientSession, server: str, args: argparse.Namespace) -> int:
    """Do what the command line asks; the exit status."""
    if args.list:
        return await list_jobs(session, server, args.list, args.limit or 50, args.queue)
    if args.stats:
        stats = await request_json(session, "GET", f"{server}/stats", params=on(args.queue))
        print("\n".join(summary(stats)))
        return DONE
    if args.cancel:
        return await cancel(session, server, args.cancel, args.queue)
    if args.queues:
        for queue in (await request_json(session, "GET", f"{server}/queues"))["queues"]:
            print(queue_line(queue), flush=True)
        return DONE
    if args.pause or args.resume or args.settings:
        action = "pause" if args.pause else "resume" if args.resume else ""
        print(queue_line(await queue_request(session, server, args.queue, action,
                                             args.settings or None)), flush=True)
        return DONE
    if args.schedules:
        listed = (await request_json(session, "GET", schedule_url(server)))["schedules"]
        for schedule in listed:
            print(schedule_line(schedule), flush=True)
        log.info("%d schedule%s", len(listed), "" if len(listed) == 1 else "s")
        return DONE
    if args.schedule is not None:
        body = schedule_body(args.text, cron=args.cron, timezone=args.timezone,
                             every=args.every, queue=args.queue, priority=args.priority,
                             group=args.group, expires_in=args.expires_in, overlap=args.overlap)
        print(schedule_line(await request_json(session, "PUT", schedule_url(
            server, args.schedule), json=body)), flush=True)
        return DONE
    if args.delete_schedule:
        await request_json(session, "DELETE", schedule_url(server, args.delete_schedule))
        log.info("schedule %s deleted", args.delete_schedule)
        return DONE
    if args.pause_schedule or args.resume_schedule:
        name, action = ((args.pause_schedule, "pause") if args.pause_schedule
                        else (args.resume_schedule, "resume"))
        print(schedule_line(await request_json(session, "POST", schedule_url(
            server, name, action))), flush=True)
        return DONE
    job_id, timeout = args.watch, args.timeout
    if args.text is not None:
        job_id = (await submit_job(session, server, args.text, args.delay, args.queue,
                                   args.priority, args.group, args.expires_in,
                                   retry_for=min(SUBMIT_RETRY_FOR, args.timeout)))["id"]
        timeout += args.delay or 0
    elif args.retry:
        job_id = (await request_json(session, "POST", job_url(server, args.retry, "retry"),
                                     params=on(args.queue)))["id"]
    if args.no_wait:
        print(job_id, flush=True)
        return DONE
    if args.watch is None:
        log.info("%s job %s", "retried" if args.retry else "submitted", job_id)
    try:
        async with asyncio.timeout(timeout):
            shown = Shown()
            return outcome(await wait_for_end(session, server, job_id, args.queue, shown,
                                              submitted=args.text is not None), shown)
    except TimeoutError:
        log.error("%s", too_late(timeout, job_id))
        return TIMED_OUT


async def run(args: argparse.Namespace) -> int:
    server = args.server.rstrip("/")
    async with open_session(args.token) as s:
        try:
            return await act(s, server, args)
        except TokenNeeded as exc:
            if args.token is None:
                log.error("%s needs a token: give --token or set JOBS_TOKEN (%s)", server,
                          exc.error)
            else:
                log.error("%s refused the token: check --token or JOBS_TOKEN (%s)", server,
                          exc.error)
            return ERROR
        except ServerError as exc:
            log.error("%s", exc)
            return ERROR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="A submit carries an Idempotency-Key of its own, and one that gets no answer "
               "(no connection, a dropped one, a 502, 503 or 504) is sent again with the same "
               "key for up to 10 s (or --timeout): safe, since the server makes one job of "
               "it however many tries reach it. "
               "Exit status: 0 done (--cancel, --pause, --resume, limits, and the schedule "
               "flags: accepted; --list, --stats, --queues, --schedules: printed), 1 failed or "
               "cancelled (an expired job is cancelled), 2 usage or connection error or "
               "refused by the server (401: a token is needed; 400: a bad value; 404: no such "
               "schedule), 3 timed out")
    server = os.environ.get("JOBS_SERVER", DEFAULT_SERVER)
    token = os.environ.get("JOBS_TOKEN")
    for name, check, value in (("JOBS_SERVER", server_url, server),
                               ("JOBS_TOKEN", token_text, token)):
        try:
            if value is not None:
                check(value)
        except argparse.ArgumentTypeError as exc:
            shown = "" if name == "JOBS_TOKEN" else f"={value!r}"  # a secret is never shown
            parser.exit(2, f"{parser.prog}: error: environment variable {name}{shown}: {exc}\n")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("text", nargs="?", metavar="TEXT",
                      help="the input of a job to submit (with --schedule: of each job it makes)")
    what.add_argument("--watch", metavar="ID",
                      help="follow an existing job instead of submitting one")
    what.add_argument("--list", metavar="STATUS", choices=STATES,
                      help=f"print the newest jobs in STATUS ({', '.join(STATES)}), one line "
                           "each: id, status, updated, the input's start")
    what.add_argument("--retry", metavar="ID",
                      help="run a failed or cancelled job again (attempts from 0), and wait")
    what.add_argument("--cancel", metavar="ID",
                      help="cancel a queued, delayed or running job (a running one stops "
                           "within about a second)")
    what.add_argument("--stats", action="store_true",
                      help="print the server's counts, workers and Redis memory in a few lines")
    what.add_argument("--queues", action="store_true",
                      help="print every queue, one line each: paused or active, jobs queued, "
                           "running and held back (by a pause or a limit), its limits")
    what.add_argument("--pause", action="store_true",
                      help="pause the --queue: it still takes submits, but starts none of its "
                           "jobs until --resume (those running finish); prints the queue")
    what.add_argument("--resume", action="store_true",
                      help="start the paused --queue's jobs again; prints the queue")
    what.add_argument("--schedules", action="store_true",
                      help="print every schedule, one line each: name, paused or active, its "
                           "cron and zone or its period, next run, runs, last job")
    what.add_argument("--delete-schedule", type=schedule_name, metavar="NAME",
                      help="delete a schedule (the jobs it made stay)")
    what.add_argument("--pause-schedule", type=schedule_name, metavar="NAME",
                      help="pause a schedule: its ticks pass without a job until "
                           "--resume-schedule; prints the schedule")
    what.add_argument("--resume-schedule", type=schedule_name, metavar="NAME",
                      help="resume a paused schedule from its next tick on (the ticks missed "
                           "while paused make no job); prints the schedule")
    # A schedule: its name and ticks here, its job's input as TEXT (with --queue, --priority,
    # --group and --expires-in as for a submit).
    parser.add_argument("--schedule", type=schedule_name, metavar="NAME",
                        help="create or replace the schedule NAME (a-z, 0-9, _ and -, 1 to 64 "
                             "characters): a job of TEXT at each tick of --cron or --every, to "
                             "the --queue, with --priority, --group, --expires-in and "
                             "--overlap; prints the schedule")
    parser.add_argument("--cron", type=cron, metavar="EXPR",
                        help="with --schedule: its ticks, a cron expression of five fields "
                             "(minute hour day-of-month month day-of-week, like '*/5 * * * *')")
    parser.add_argument("--timezone", metavar="ZONE",
                        help="with --cron: the IANA zone its times are in, like Europe/Paris "
                             "(UTC if not given)")
    parser.add_argument("--every", type=every, metavar="SECONDS",
                        help="with --schedule: a tick every SECONDS (at least 1), at the "
                             "multiples of it since 1970")
    parser.add_argument("--overlap", choices=OVERLAP,
                        help="with --schedule: skip makes no job while its last one has not "
                             "ended; allow (if not given) makes one at every tick")
    # A queue's limits, kept in Redis for every worker and server: given alone (with --queue),
    # those named change and the others stay.
    for flag, kind, metavar, text in (
            ("--rate-limit", rate, "J/S", "at most J jobs of the --queue start in any S seconds "
                                          "(like 10/60)"),
            ("--concurrency", whole, "C", "at most C jobs of the --queue run at once, over all "
                                          "workers"),
            ("--group-rate-limit", rate, "J/S", "at most J jobs of each group of the --queue "
                                                "start in any S seconds"),
            ("--group-concurrency", whole, "C", "at most C jobs of each group of the --queue run "
                                                "at once")):
        parser.add_argument(flag, type=none_or(kind), metavar=metavar, default=argparse.SUPPRESS,
                            help=f"{text}; none removes it. Given alone, the queue's other "
                                 f"limits stay; prints the queue")
    parser.add_argument("--server", type=server_url, default=server,
                        help="server URL (env JOBS_SERVER; default %(default)s)")
    parser.add_argument("--token", type=token_text, default=token,
                        help="the token of a server started with one, sent as 'Authorization: "
                             "Bearer' (env JOBS_TOKEN, which is safer: a flag shows in ps)")
    parser.add_argument("--timeout", type=seconds, default=60.0, metavar="SECONDS",
                        help="seconds to wait for the job to end, after its --delay "
                             "(default %(default)s); a submit that gets no answer is sent "
                             "again, with the same Idempotency-Key, for up to 10 s of it")
    parser.add_argument("--queue", type=queue_name, default=DEFAULT_QUEUE, metavar="NAME",
                        help="the queue of the job(s) (a --schedule's too), of --stats, and the "
                             "one --pause, --resume and the limits change: a-z, 0-9, _ and -, "
                             "1 to 64 characters (default %(default)s)")
    parser.add_argument("--delay", type=delay, metavar="SECONDS",
                        help="with TEXT: run the job SECONDS from now (status delayed until)")
    parser.add_argument("--expires-in", type=seconds, metavar="SECONDS",
                        help="with TEXT: the job must start within SECONDS (more than 0) of "
                             "being due, else it ends cancelled and never runs")
    parser.add_argument("--priority", type=priority, metavar="N",
                        help=f"with TEXT: the job's priority, 1 to 9: a higher one starts "
                             f"first (default {DEFAULT_PRIORITY})")
    parser.add_argument("--group", type=group_name, metavar="NAME",
                        help="with TEXT: the job's group (A-Z, a-z, 0-9, _ . : and -, 1 to 128 "
                             "characters): groups take turns, and the group limits count each "
                             "on its own")
    parser.add_argument("--no-wait", action="store_true",
                        help="with TEXT or --retry: print the job id and exit")
    parser.add_argument("--limit", type=whole, metavar="N",
                        help="with --list: how many jobs at most (default 50)")
    args = parser.parse_args(argv)
    args.settings = {name: getattr(args, name) for name in LIMITS if hasattr(args, name)}
    actions = ("text", "watch", "list", "retry", "cancel", "stats", "queues", "pause", "resume",
               "schedules", "schedule", "delete_schedule", "pause_schedule", "resume_schedule")
    if args.settings and any(getattr(args, name) not in (None, False) for name in actions):
        parser.error("the limits (--rate-limit, --concurrency, --group-rate-limit, "
                     "--group-concurrency) go alone, with --queue")
    if args.schedule is not None:
        if args.text is None:
            parser.error("--schedule NAME needs the TEXT of the jobs it makes, and --cron or "
                         "--every")
        if (args.cron is None) == (args.every is None):
            parser.error("--schedule takes --cron EXPR or --every SECONDS, one of them")
        for flag in ("delay", "no_wait"):
            if getattr(args, flag) not in (None, False):
                parser.error(f"--{flag.replace('_', '-')} is for a submit, not a --schedule")
    for flag in ("cron", "every", "overlap"):
        if getattr(args, flag) is not None and args.schedule is None:
            parser.error(f"--{flag} goes with --schedule")
    if args.timezone is not None and args.cron is None:
        parser.error("--timezone goes with --cron (--every counts seconds, in no zone)")
    if not args.settings and all(getattr(args, name) in (None, False) for name in actions):
        parser.error("give TEXT, or one of --watch --list --retry --cancel --stats --queues "
                     "--pause --resume --schedules --schedule --delete-schedule "
                     "--pause-schedule --resume-schedule, or limits to set")
    for name in ("delay", "priority", "group", "expires_in"):
        if getattr(args, name) is not None and args.text is None:
            parser.error(f"--{name.replace('_', '-')} goes with TEXT")
    if args.no_wait and args.text is None and args.retry is None:
        parser.error("--no-wait goes with TEXT or --retry")
    if args.limit is not None and args.list is None:
        parser.error("--limit goes with --list")
    logging.basicConfig(format="client: %(message)s")  # to stderr
    log.setLevel(logging.INFO)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
