"""Job queue worker: takes jobs from Redis, runs a handler on each, records the outcome.

    python worker.py [--redis-url URL] [--handler MODULE:FUNCTION] [--concurrency N]
                     [--queues NAME,...] [--timeout S] [--max-attempts N] [--lease S]
                     [--max-output BYTES]

It runs up to --concurrency jobs at once, in as many slots: each a thread with one loop of
take, run, finish, the same whatever the handler; a plain handler is called on the slot's
thread, an `async def` one awaited on one event loop that all slots share. A slot takes its next
job with one Lua script that decides which job runs (the highest priority first, the groups of
a priority in turn, none that a pause or a limit holds back) and moves it into a processing list
of the slot's own; when none may start, the slot blocks on Redis (BLPOP) until a change wakes
it or a rate limit frees. Each job is finished with one script (status, result, removal from the
list, expiry, publish), which also takes the slot's next job (none: the slot waits again at
once, without another take). With --queues, each slot waits on
one of them in turn, and takes from the others when its own has nothing to start.
A handler may report as it runs: one that takes a second parameter gets the job's Context
(ctx.progress(done, total=None, message=""), ctx.emit(text)); a generator (plain or async)
streams each string it yields, and its result is the pieces joined. A writer thread writes
what they give in batches (at most every 50 ms, or at 64 KiB), before the try's outcome; each
message is numbered, kept in the job's history (--max-output bytes of it) and published.
One lease covers the whole worker (a copy in each queue): a worker whose lease expires is
presumed dead, and any live worker puts its jobs back on the queue. --redis-url may name one
Redis, a master through Sentinel, or a Redis Cluster (each queue in one slot). Delivery is
therefore at-least-once, so handlers should be idempotent. A try that raises or runs past
--timeout is retried with exponential backoff, up to --max-attempts tries; then the job is
failed and its id kept on the dead-letter list. A handler that raises RetryLater(seconds) (from
worker import RetryLater) has its job run again that much later, the try not counted. A running
job cancelled over HTTP is stopped as a try past its time limit is (within about a second) and
recorded `cancelled`.

First SIGTERM/SIGINT: take no new job, finish those running within --grace seconds, exit 0.
Second signal, or the grace running out: put them back on the queue, exit 1, even if a handler
never returns (a keeper thread renews the lease, times tries out, and does the cold stop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import inspect
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import FrameType
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff
from redis.commands.core import Script

from store import (
    ALLOW_OOM,
    DEFAULT_QUEUE,
    DUE,
    EMPTY,
    FINISH,
    HELD,
    LEASE,
    OUTPUT,
    PREFIX,
    RECLAIM,
    REDIS_ERRORS,
    RETENTION,
    SCHEDULE_TICK,
    TAKE,
    UNAVAILABLE,
    UNSCHEDULE,
    WAIT_MS,
    WRITES,
    Client,
    Job,
    Keys,
    bucket,
    connect,
    from_env,
    non_empty,
    now,
    number,
    on_node,
    plan_ticks,
    queue_names,
    queues_to_tick,
    redis_said,
    redis_url,
    refresh,
    rfc3339,
)

log = logging.getLogger("worker")

BLOCK = 1  # seconds a BLPOP for a wake-up blocks, so a stop flag is seen at least this often
PRECISE = 0.2  # the last seconds of a timed wait are slept here: a BLPOP times out ~0.1 s late
MAINTAIN_EVERY = 1.0  # seconds between reclaim rounds: a slot's strays; dead workers, retries
REDIS_RETRY_CAP = 5.0  # seconds between tries while Redis is unreachable
CONCURRENCY = 16  # jobs in flight per worker: enough for jobs that wait (docs/workers.md)
TIMEOUT = 300.0  # seconds a try may run
TICK = 0.25  # seconds between the keeper's looks at the slots' deadlines
HARD_STOP = 10.0  # seconds a cold stop may take giving jobs back before the process just exits
MAX_LATER = 366 * 86_400  # seconds RetryLater may ask for at most (as a submit's delay)
MAX_OUTPUT = 1 << 20  # bytes of a job's progress and output kept, by default (the newest)
FLUSH_EVERY = 0.05  # seconds between two writes of a try's progress and output, at least
FLUSH_BYTES = 64 * 1024  # ... unless this much is waiting: written at once

T = TypeVar("T")
# A handler takes the input (and, if it has a second parameter, the job's Context) and returns
# the result: a plain function, an async one, or a generator (plain or async) whose pieces are
# the output and, joined, the result.
Handler = Callable[..., str | Awaitable[str] | Iterator[str] | AsyncIterator[str]]
Tried = tuple[bool, str]  # how a try went: (True, result) or (False, error)


def upper(text: str) -> str:
    """The default handler."""
    return text.upper()


CANCELLED = "cancelled while running"


class RetryLater(Exception):  # a request, not an error: no Error in its name
    """Raise in a handler to run the job again `seconds` from now (say, the API it calls said
    429), without counting the try against --max-attempts."""

    def __init__(self, seconds: float) -> None:
        if not (isinstance(seconds, int | float) and 0 <= seconds <= MAX_LATER):
            raise ValueError(f"RetryLater takes seconds from 0 to {MAX_LATER}, not {seconds!r}")
        super().__init__(f"asked to run again in {seconds:g} s")
        self.seconds = float(seconds)


class Interrupted(Exception):
    """Raised in a plain handler's thread when its try runs past --timeout or is cancelled."""


def raise_in_thread(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise exc in that thread at its next Python instruction (None: withdraw one pending).
    A thread blocked inside C (a sleep, a socket read) sees it only once it is back."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               None if exc is None else ctypes.py_object(exc))


class Slot:
    """One of a worker's places for a job: a thread. In each queue it has a processing list that
    holds the job it has taken from there, and nothing between jobs. It waits on its own queue
    and takes from the others too (`queues`, its own first). While a handler runs, `job`,
    `taken_from` and `deadline` say what, from which queue and until when, and interrupt() asks
    it to stop (`why`: timed out, or cancelled): an exception raised in its thread, or the task
    awaiting an async handler cancelled."""

    def __init__(self, name: str, keys: Keys, queues: list[Keys]) -> None:
        self.name = name  # <worker>/<n>: a member of each queue's workers set
        self.keys = keys  # of the queue it waits on
        self.queues = [keys, *(other for other in queues if other is not keys)]
        self.processing = keys.processing(name)
        self.taken_from = keys  # the queue of the job it took last
        self.waits: tuple[Keys, float] = (keys, -1.0)  # with none taken: where, how long
        self.empty = False  # finishing found its only queue empty: wait, no take first
        self.retake: Keys | None = None  # the queue whose take's reply was lost
        self.lock = threading.Lock()  # the slot's runner and the keeper
        self.job: Job | None = None
        self.deadline = float("inf")
        self.began = 0.0  # monotonic time the try began
        self.why = ""  # why the try was interrupted ("": it was not)
        self.interrupted = False  # once per try
        self.thread_id: int | None = None
        self.task: asyncio.Task[Any] | None = None  # awaiting an async handler
        self.loop: asyncio.AbstractEventLoop | None = None  # the one async handlers run on
        self.stopped = threading.Event()  # its loop has ended
        self.output: Output | None = None  # the running try's progress and output not written

    def idle(self) -> bool:
        """True once it can take no job any more: its loop ended, or it holds one."""
        return self.stopped.is_set() or self.job is not None

    def begin(self, job: Job, timeout: float) -> None:
        with self.lock:
            self.job, self.task, self.interrupted, self.why = job, None, False, ""
            self.began = time.monotonic()
            self.deadline = self.began + timeout if timeout else float("inf")

    def end(self) -> None:
        """The handler is over: nothing can be raised into it any more."""
        with self.lock:
            self.job, self.deadline, self.task = None, float("inf"), None
            if self.thread_id is not None:  # a timeout raised too late is withdrawn
                raise_in_thread(self.thread_id, None)

    def interrupt(self, why: str) -> None:
        """Call with the lock held and a job running."""
        self.interrupted, self.why = True, why
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.cancel, self.job)
        elif self.thread_id is not None:
            raise_in_thread(self.thread_id, Interrupted)

    def cancel(self, job: Job | None) -> None:
        """In the event loop's thread: cancel the task awaiting that job's handler (suspended
        there, so the cancel lands in the handler); one not begun yet sees `interrupted`."""
        if self.job is job and self.task is not None:
            self.task.cancel()


class Output:
    """A try's progress and output on their way to Redis: what the handler gave and no write
    has taken yet, in order, the output pieces given one after another merged (up to
    FLUSH_BYTES) and a progress superseded by the next one given right after it. The handler's
    thread (or the event loop) only appends, under a lock held for no I/O; writes (worker.write)
    take the lot, one at a time and in order."""

    def __init__(self, job: Job, keys: Keys, slot: str, wake: threading.Event) -> None:
        self.job, self.keys, self.slot = job, keys, slot
        self.lock = threading.Lock()  # the pending messages: the handler's and the writes'
        self.writing = threading.Lock()  # one write at a time, so they land in order
        self.pending: list[tuple[str, Any]] = []  # ("output", [pieces]) or ("progress", {...})
        self.size = 0  # characters pending
        self.last = 0  # ... in the last message
        self.since = 0.0  # monotonic time the oldest pending message was given
        self.written = -FLUSH_EVERY  # monotonic time of the last write
        self.progress: str = ""  # the newest progress given since the last write, as JSON
        self.unsent: tuple[list[str], int] = ([], 0)  # made, but Redis was out of reach
        self.wake = wake  # the worker's writer thread

    def add(self, kind: str, value: Any, size: int) -> None:
        with self.lock:
            empty = not self.pending
            if kind == "output" and not empty and self.pending[-1][0] == "output" \
                    and self.last < FLUSH_BYTES:
                self.pending[-1][1].append(value)
                self.last += size
            elif kind == "progress" and not empty and self.pending[-1][0] == "progress":
                self.pending[-1] = (kind, value)
            else:
                self.pending.append((kind, [value] if kind == "output" else value))
                self.last = size
            if kind == "progress":
                self.progress = json.dumps(value, separators=(",", ":"))
            self.size += size
            if empty:
                self.since = time.monotonic()
            due = empty or self.size >= FLUSH_BYTES
        if due:  # the writer looks when the first message comes and when a batch is full
            self.wake.set()

    def due(self, now: float) -> float:
        """When the pending messages are to be written (inf: none pending)."""
        if not self.pending and not self.unsent[0]:
            return float("inf")
        if self.size >= FLUSH_BYTES:
            return now
        return max(self.since, self.written + FLUSH_EVERY)

    def take(self) -> tuple[list[str], int, str]:
        """Take what is pending: the messages as OUTPUT takes them, the output's bytes, and the
        newest progress ('' if none)."""
        with self.lock:
            pending, progress = self.pending, self.progress
            self.pending, self.size, self.progress = [], 0, ""
            self.written = time.monotonic()
        (messages, size), self.unsent = self.unsent, ([], 0)
        head = {"id": self.job.id, "attempt": self.job.attempt}
        for kind, value in pending:
            if kind == "output":
                data = "".join(value)
                size += len(data.encode(errors="surrogatepass"))
                body: dict[str, Any] = {"type": "output", **head, "data": data}
            else:
                body = {"type": "progress", **head, **value}
            messages.append(json.dumps(body, separators=(",", ":"))[:-1] + ',"seq":')
        return messages, size, progress

    def give_back(self, messages: list[str], size: int, progress: str) -> None:
        """Keep messages a write could not deliver (Redis out of reach) for the next one."""
        with self.lock:
            self.unsent = messages, size
            self.progress = self.progress or progress


class Context:
    """The second argument of a handler that takes two: the job (`id`, `attempt`, `input`),
    and ways to say how it is going while it runs. Neither waits for Redis: what is given is
    written in batches (at most every 50 ms, or once 64 KiB wait), and every watcher gets it."""

    def __init__(self, output: Output) -> None:
        self._output = output
        self.id, self.attempt, self.input = output.job.id, output.job.attempt, output.job.input

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """How far the job is: `done` a fraction (0 to 1) when total is None, else a count
        of `total`; `message` a few words on what it is doing."""
        for name, value in (("done", done), ("total", total)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise TypeError(f"progress: {name} must be a finite number, not {value!r}")
        if not isinstance(message, str):
            raise TypeError(f"progress: message must be str, not {type(message).__name__}")
        self._output.add("progress", {"done": done, "total": total, "message": message},
                         len(message) + 32)

    def emit(self, text: str) -> None:
        """A piece of the job's output (pieces given close together may reach watchers as
        one message)."""
        if not isinstance(text, str):
            raise TypeError(f"emit takes str, not {type(text).__name__}")
        if text:
            self._output.add("output", text, len(text))


def load_handler(spec: str) -> Handler:
    """An argparse type: import MODULE:FUNCTION, or say in one line why it cannot be."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise argparse.ArgumentTypeError(f"must look like MODULE:FUNCTION, not {spec!r}")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot load handler {spec!r}: {exc}") from None
    if not callable(handler):
        raise argparse.ArgumentTypeError(f"handler {spec!r} is not callable")
    return handler  # type: ignore[no-any-return]


def takes_context(handler: Handler) -> bool:
    """Whether the handler takes a second positional parameter (the job's Context)."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: they take the input
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


class Worker:
    """One worker process: N slots, each a loop of take, run, finish; one lease for all."""

    def __init__(
        self,
        redis_url: str,
        handler: Handler = upper,
        *,
        concurrency: int = CONCURRENCY,
        timeout: float = TIMEOUT,
        max_attempts: int = 3,
        lease: float = 30.0,
        grace: float = 10.0,
        backoff: float = 1.0,
        retention: int = RETENTION,
        prefix: str = PREFIX,
        min_replicas: int = 0,
        queues: tuple[str, ...] = (DEFAULT_QUEUE,),
        max_output: int = MAX_OUTPUT,
    ) -> None:
        self.handler = handler
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)
        self.takes_context = takes_context(handler)
        # Whether the handler can report as it runs; one that cannot costs nothing for it.
        self.streams = self.takes_context or inspect.isgeneratorfunction(handler) \
            or inspect.isasyncgenfunction(handler)
        self.max_output = max_output
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.lease = lease
        self.grace = grace
        self.backoff = backoff
        self.retention = retention
        self.min_replicas = min_replicas
        self.prefix = prefix
        self.queues = [Keys(prefix, queue) for queue in queues]
        self.keys = self.queues[0]
        self.redis_url = redis_url
        self.host, self.started = socket.gethostname(), now()
        self.name = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Slot n waits on queue n modulo the queues, and takes from the others too.
        self.slots = [Slot(f"{self.name}/{n}", self.queues[n % len(self.queues)], self.queues)
                      for n in range(concurrency)]
        self.loop: asyncio.AbstractEventLoop | None = None  # for an async handler, once running
        self.registered = False  # in the registry of queues
        self.troubled = False  # Redis unreachable or refusing: said once, until it works again
        self.redis = self.connected(redis_url)
        self._take = self.redis.register_script(TAKE)
        self._finish_take = self.redis.register_script(WRITES + FINISH)
        self._finish = self.redis.register_script(ALLOW_OOM + FINISH)
        self._reclaim = self.redis.register_script(RECLAIM)
        self._lease = self.redis.register_script(LEASE)
        self._output = self.redis.register_script(OUTPUT)
        self._written = threading.Event()  # wakes the writer: progress or output to write
        self.refused = False  # Redis refused output: said once, until a write works again
        self._due, self._tick, self._unschedule = (self.redis.register_script(script)
                                                   for script in (DUE, SCHEDULE_TICK, UNSCHEDULE))
        self.stopping = False  # the first signal: take no new job
        self.cold = False  # the second: give the jobs back and exit now
        self._stop_deadline = float("inf")  # monotonic time when the grace runs out
        self._wake = threading.Event()  # wakes the keeper thread early
        self._hard_stop = float("inf")  # monotonic time the backstop ends the process at

    def connected(self, redis_url: str) -> Client:
        """The client, once it is made: a cluster's learns the slots as it is made, so it is
        retried until a node answers (no signal handler yet: a signal ends the wait)."""
        return self.until_redis_takes(lambda: connect(redis_url, **self.client_options(),
                                                      retry=redis.retry.Retry(NoBackoff(), 0)))

    def client_options(self) -> dict[str, Any]:
        """A connection for each slot (each blocks one in BLMOVE) and for the keeper (per node,
        on a cluster). No retries of redis-py's own (the callers pass a Retry of none, sync or
        async): a command sent again after a lost reply could run twice; the slots' loops retry
        instead, and put back what a lost reply left behind."""
        return {"decode_responses": True, "client_name": "jobs-worker",
                "max_connections": len(self.slots) + 2, "socket_connect_timeout": 2.0,
                "socket_timeout": BLOCK + 5.0,  # longer than the BLMOVE block
                "health_check_interval": 30}

    # -- signals and the keeper ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only set flags: the keeper thread does what must happen even if no handler returns."""
        if self.stopping:
            self.cold = True
        else:
            log.info("%s: finishing the jobs running, then exiting (signal again to stop now)",
                     signal.Signals(signum).name)
            self._stop_deadline = time.monotonic() + self.grace
            self.stopping = True
        # Should the keeper be stuck on an unresponsive Redis, the process ends all the same
        # (its jobs go back to the queue when its lease expires): see backstop. No thread is
        # started here: the main thread may be starting one, holding threading's own lock.
        self._hard_stop = time.monotonic() + HARD_STOP + (0 if self.cold else self.grace)
        self._wake.set()  # safe here: no other code of the main thread takes this Event's lock

    def backstop(self) -> None:
        """Thread: once a signal has come, end the process at its hard deadline, whatever the
        keeper and the slots are doing."""
        while (left := self._hard_stop - time.monotonic()) > 0:
            time.sleep(min(left, TICK))
        os._exit(1)

    def keeper(self) -> None:
        """Thread: renew the lease every --lease/3 s, stop tries past their deadline or
        cancelled, whatever the slots are doing; on a cold stop, give every slot's job back and
        exit. Returns once the slots have all stopped (a warm stop)."""
        renewed, next_renewal, next_scan, next_ticks = True, 0.0, 0.0, 0.0
        while not (self.cold or time.monotonic() >= self._stop_deadline):
            if all(slot.stopped.is_set() for slot in self.slots):
                return
            if time.monotonic() >= next_scan:  # dead workers' jobs, delayed ones due, cancels
                with contextlib.suppress(*REDIS_ERRORS):  # the slots say what Redis does
                    for keys in self.queues:
                        self.cancel(self.reclaim(keys=keys, stops=True)[2])
                next_scan = time.monotonic() + MAINTAIN_EVERY
            if time.monotonic() >= next_ticks:  # the schedules' ticks due, as servers do too
                wait = MAINTAIN_EVERY
                with contextlib.suppress(*REDIS_ERRORS):
                    wait = self.tick_schedules()
                next_ticks = time.monotonic() + wait
            if time.monotonic() >= next_renewal:
                try:
                    self.heartbeat()
                    renewed, next_renewal = True, time.monotonic() + self.lease / 3
                except REDIS_ERRORS as exc:
                    if renewed:  # once a run of failures: the slots say what Redis does
                        log.warning("cannot renew the lease (%s); retrying", redis_said(exc))
                    renewed, next_renewal = False, time.monotonic() + TICK
            self.stop_late()
            self._wake.wait(min(TICK, max(self._stop_deadline - time.monotonic(), 0)))
            self._wake.clear()
        if not self.cold:
            log.warning("grace of %.1fs ran out", self.grace)
        log.warning("stopping now: giving this worker's jobs back to the queue")
        # Slots waiting for a job leave within BLOCK s (stopping is set); one that took a job
        # after the jobs went back would hold it until the lease expires.
        limit = time.monotonic() + BLOCK + 1.0
        while not all(slot.idle() for slot in self.slots) and time.monotonic() < limit:
            time.sleep(0.01)
        try:
            for keys in self.queues:
                self.reclaim(*self.names(), keys=keys, max_attempts=0, scan=False)
                # Not leaving the worker set: should a finish in flight in a slot take one
                # more job, any worker reclaims it once it sees the lease gone.
                self.redis.delete(keys.lease(self.name))
        except REDIS_ERRORS as exc:
            log.warning("could not give jobs back (%s); others will once the lease expires",
                        exc)
        logging.shutdown()
        os._exit(1)

    def cancel(self, ids: list[str]) -> None:
        """Stop the tries of these jobs (asked to stop over HTTP) now, as at a deadline."""
        for slot in self.slots:
            with slot.lock:
                if slot.job is not None and slot.job.id in ids and slot.why != CANCELLED:
                    slot.why, slot.deadline = CANCELLED, time.monotonic()

    def stop_late(self) -> None:
        """At a try's deadline, interrupt it; if it is still running one TICK later (a plain
        handler blocked inside C, or an async one that blocks the event loop), record it as
        timed out (or cancelled) all the same: its late result will find the job gone from
        its list."""
        for slot in self.slots:
            if self.cold:
                return
            with slot.lock:
                job, late = slot.job, time.monotonic() - slot.deadline
                if job is None or late < 0:
                    continue
                if not slot.interrupted:
                    slot.interrupt(slot.why or self.timed_out)
                    if late < TICK:
                        continue
                slot.deadline = float("inf")
                why, ran, output = slot.why, time.monotonic() - slot.began, slot.output
            try:
                if output is not None and not output.writing.locked():  # never wait on it here
                    self.write(output)
                self.finish(slot, job, *self.outcome(job, (False, why)), ran=ran,
                            take_next=False)
            except REDIS_ERRORS:
                with slot.lock:
                    if slot.job is job:
                        slot.deadline = 0.0  # next tick
                continue
            log.warning("job %s: %s, and still running; its result will be dropped", job.id, why)

    @property
    def timed_out(self) -> str:
        return f"timed out after {self.timeout:g} s"

    # -- Redis steps ---------------------------------------------------------------------------

    def common(self, keys: Keys | None = None) -> list[str | int]:
        """The arguments every script takes first (see store.LUA_PRELUDE), for a queue."""
        return [(keys or self.keys).prefix, now(), self.retention]

    def names(self) -> list[str]:
        """The names of the slots, each of which may take jobs from every queue."""
        return [slot.name for slot in self.slots]

    def heartbeat(self) -> None:
        """Renew the lease in each queue (and re-register the slots, in case the worker was
        presumed dead); the first time, add the queues to the registry."""
        if not self.registered:
            self.redis.sadd(self.keys.registry, *(keys.name for keys in self.queues))
            self.registered = True
        for keys in self.queues:
            self._lease(keys=[keys.lease(self.name)],
                        args=[*self.common(keys), int(self.lease * 1000), self.host, os.getpid(),
                              len(self.slots), self.started, *self.names()])

    def tick_schedules(self) -> float:
        """Make the jobs of the schedules' ticks that are due (SCHEDULE_TICK lets one process
        make each, however many try); return the seconds until the next is due (1 at most)."""
        at, default = time.time(), Keys(self.prefix)
        due = {DEFAULT_QUEUE: self._due(keys=[default.queue], args=[*self.common(default), at])}
        for queue in queues_to_tick(due[DEFAULT_QUEUE]):
            keys = Keys(self.prefix, queue)
            due[queue] = self._due(keys=[keys.queue], args=[*self.common(keys), at])
        plan = plan_ticks(self.prefix, self.retention, due, at)
        for keys, name in plan.orphans:
            self._unschedule(keys=[keys.queue], args=[*self.common(keys), name])
        for keys, args in plan.ticks:
            self._tick(keys=[keys.queue], args=args)
        return plan.wait

    def reclaim(self, *idle: str, keys: Keys | None = None, max_attempts: int | None = None,
                scan: bool = True, stops: bool = False) -> tuple[int, int, list[str]]:
        """In a queue (default: the first): give back the jobs of the slots named and, with
        scan, those of workers whose lease expired, and queue the delayed jobs due. Returns
        (jobs requeued, delayed jobs queued, and with stops: the ids of this worker's jobs
        asked to stop)."""
        keys = keys or self.keys
        moved, due, stops_ = self._reclaim(keys=[keys.queue], args=[
            *self.common(keys), time.time(),
            self.max_attempts if max_attempts is None else max_attempts, int(scan),
            self.name if stops else "", *idle])
        if moved:
            log.warning("requeued %d job(s) of stopped worker(s)", moved)
        return int(moved), int(due), stops_

    def take(self, slot: Slot) -> Job | None:
        """Start the next job the slot may take, from its own queue or else its others (one
        script call each); None if no queue has one to start now. Then `slot.taken_from` is
        the job's queue; or, with none, `slot.waits` says where and how long to wait."""
        why: dict[Keys, int] = {}
        for keys in slot.queues:
            job, why[keys] = self.take_from(slot, keys)
            if job is not None:
                return job
        rated = [(ms, keys) for keys, ms in why.items() if ms > 0]
        if rated:  # hold the timer of the limit that frees first, if no other slot does
            ms, keys = min(rated, key=lambda pair: pair[0])
            job, ms = self.take_from(slot, keys, claim=True)
            if job is not None or ms > 0:
                slot.waits = keys, ms / 1000
                return job
            why[keys] = ms
        slot.waits = slot.keys, -1.0
        if why[slot.keys] == HELD and len(slot.queues) > 1:
            # its own queue held back: wait where new work comes, and look again each BLOCK s
            empty = [keys for keys in slot.queues[1:] if why[keys] == EMPTY]
            slot.waits = (empty[0] if empty else slot.keys), BLOCK
        return None

    def take_from(self, slot: Slot, keys: Keys, claim: bool = False) -> tuple[Job | None, int]:
        """TAKE from one queue; its job, or why none (see store.Job.taken). A take whose reply
        was lost is sent again first, before any other queue's: it returns the job it
        started."""
        if slot.retake is not None and slot.retake is not keys:
            job, why = self.take_from(slot, slot.retake)
            if job is not None:
                return job, why
        try:
            job, why = Job.taken(self._take(keys=[keys.processing(slot.name)],
                                            args=[*self.common(keys), int(claim)]))
        except REDIS_ERRORS:
            slot.retake = keys
            raise
        slot.retake = None
        if job is not None:
            slot.taken_from = keys
        return job, why

    def wait_for_work(self, slot: Slot) -> None:
        """Block until woken on the queue named by `slot.waits` (a submit, a finish, new
        settings), or for as long as it says (a rate limit frees; a held queue is looked at
        again): BLPOP, up to BLOCK s at a time, so a stop is seen."""
        keys, wait = slot.waits
        deadline = time.monotonic() + wait if wait > 0 else float("inf")
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            if left < PRECISE:  # Redis times a BLPOP out at its own pace (hz 10: ~100 ms late)
                time.sleep(left)
                return
            if self.redis.blpop([keys.wake], timeout=min(BLOCK, left - PRECISE)) is not None:
                return

    def finish(self, slot: Slot, job: Job, outcome: str, result: str = "", error: str = "",
               due: float = 0.0, *, ran: float = 0.0, take_next: bool = True) -> Job | None:
        """Record the try's outcome atomically, and take the slot's next job from the same
        queue in the same round trip unless the worker is stopping or Redis is full. A result
        is dropped if the job is no longer the slot's (reclaimed, or timed out by the
        keeper)."""
        keys = slot.taken_from
        processing = keys.processing(slot.name)
        # the next from the same queue; after another queue's job, back to its own first
        chain = take_next and not self.stopping and keys is slot.keys

        def args(take: bool) -> list[str | int | float]:
            return [*self.common(keys), job.id, outcome, result, error, due,
                    rfc3339(due) if due else "", int(take), job.attempt, ran, bucket(ran)]

        script_keys = [keys.job(job.id), processing, keys.queue]
        try:
            held, taken = self.replicated(job, self._finish_take if chain else self._finish,
                                          script_keys, args(chain))
        except redis.exceptions.OutOfMemoryError:  # refused before it ran: finish alone
            held, taken = self.replicated(job, self._finish, script_keys, args(False))
        if not held:
            log.warning("job %s: this try was no longer the slot's (reclaimed, or timed out); "
                        "dropping its result", job.id)
        if not taken:
            return None
        next_job, why = Job.taken(taken)
        if why == EMPTY and len(slot.queues) == 1:  # a take now would find it empty again
            slot.empty, slot.waits = True, (keys, -1.0)
        return next_job

    def replicated(self, job: Job, script: Script, keys: list[str],
                   args: list[str | int | float]) -> Any:
        """Run a finishing script; with --min-replicas, wait (WAIT, on its connection) for that
        many replicas to have it, and say so if they did not."""
        if not self.min_replicas:
            return script(keys=keys, args=args)
        try:
            with on_node(self.redis, keys[0]).pipeline(transaction=False) as pipe:
                script(keys=keys, args=args, client=pipe)
                wait: Any = pipe.execute_command  # untyped in redis-py's sync pipeline
                wait("WAIT", self.min_replicas, WAIT_MS)
                reply, acked = pipe.execute()
        except REDIS_ERRORS as exc:  # on a cluster, the node may have died or lost the slot
            refresh(self.redis, exc)
            raise
        if acked < self.min_replicas:
            log.warning("job %s: its outcome reached %d of %d replicas within %d ms; a "
                        "failover now could lose it (the job would run again)", job.id, acked,
                        self.min_replicas, WAIT_MS)
        return reply

    def writer(self) -> None:
        """Thread: write each running try's progress and output as it becomes due (see
        Output.due): the first message at once, then at most every FLUSH_EVERY s, or as soon
        as FLUSH_BYTES wait. Ends once the slots have."""
        while not all(slot.stopped.is_set() for slot in self.slots):
            self._written.clear()  # before looking: a message given meanwhile sets it again
            wait, now = float(BLOCK), time.monotonic()
            for slot in self.slots:
                if (output := slot.output) is None:
                    continue
                if output.due(now) <= now:
                    self.write(output)
                    wait = min(wait, FLUSH_EVERY)
                else:
                    wait = min(wait, output.due(now) - now)
            self._written.wait(wait)

    def write(self, output: Output, final: bool = False) -> None:
        """Write a try's pending progress and output (one OUTPUT call; one write at a time per
        try, so they land in order). Redis out of reach: kept for the next write (the final one,
        before the try's outcome, waits for Redis as the outcome does). Refused (Redis full):
        dropped; the job carries on, and its result still counts."""
        delay = 0.0
        with output.writing:
            while True:
                messages, size, progress = output.take()
                if not messages:
                    return
                job, keys = output.job, output.keys
                try:
                    self._output(keys=[keys.job(job.id), keys.history(job.id)], args=[
                        *self.common(keys), job.id, job.attempt, output.slot, self.max_output,
                        size, progress, *messages])
                except UNAVAILABLE as exc:
                    refresh(self.redis, exc)
                    output.give_back(messages, size, progress)
                    if not final:
                        return
                    delay = self.retry_delay(exc, delay)
                    time.sleep(delay)
                    continue
                except REDIS_ERRORS as exc:
                    if not self.refused:
                        log.warning("redis refused a job's output (%s); dropping it, the job "
                                    "carries on", redis_said(exc))
                        self.refused = True
                    return
                if self.refused:
                    log.info("redis takes output again")
                    self.refused = False
                return

    def retry_delay(self, exc: Exception, delay: float) -> float:
        """The next wait of a slot retrying a Redis step: 0.1 s, doubling up to
        REDIS_RETRY_CAP. The first failure of a run of them, in any slot, is said in one line."""
        if not self.troubled:
            self.troubled = True
            if isinstance(exc, UNAVAILABLE):
                problem = f"redis unavailable ({exc})"
            elif isinstance(exc, redis.exceptions.OutOfMemoryError):
                problem = f"redis is full, taking no new job ({redis_said(exc)})"
            else:
                problem = f"redis refused a command ({redis_said(exc)})"
            log.warning("%s; retrying every %gs at most", problem, REDIS_RETRY_CAP)
        return min(delay * 2 or 0.1, REDIS_RETRY_CAP)

    def redis_works(self) -> None:
        if self.troubled:
            self.troubled = False
            log.info("redis works again")

    def until_redis_takes(self, step: Callable[[], T]) -> T:
        """Run a Redis step until Redis takes it: a result is never dropped for an outage or
        a refusal."""
        delay = 0.0
        while True:
            try:
                result = step()
                self.redis_works()
                return result
            except REDIS_ERRORS as exc:
                delay = self.retry_delay(exc, delay)
                time.sleep(delay)

    # -- running a job -------------------------------------------------------------------------

    def outcome(self, job: Job, tried: Tried | RetryLater) -> tuple[str, str, str, float]:
        """(outcome, result, error, due) of a try, as finish() takes them, and the log line."""
        if isinstance(tried, RetryLater):
            log.info("job %s: %s", job.id, tried)
            return "later", "", str(tried), time.time() + tried.seconds
        ok, value = tried
        if ok:
            log.info("job %s: done", job.id)
            return "done", value, "", 0.0
        if value == CANCELLED:
            log.warning("job %s: %s", job.id, value)
            return "cancelled", "", value, 0.0
        if job.attempt < self.max_attempts:
            delay = self.backoff * 2 ** (job.attempt - 1) * random.uniform(0.8, 1.2)
            log.warning("job %s: %s; retrying in %.1fs", job.id, value, delay)
            return "retry", "", value, time.time() + delay
        log.error("job %s: failed after %d attempts: %s", job.id, job.attempt, value)
        return "failed", "", value, 0.0

    @staticmethod
    def checked(result: object) -> str:
        if not isinstance(result, str):
            raise TypeError(f"handler returned {type(result).__name__}, not str")
        return result

    def call_handler(self, slot: Slot, job: Job, output: Output | None) -> Tried | RetryLater:
        """Run the handler on the job, up to the timeout: a plain one on this (the slot's)
        thread, an async one awaited on the worker's event loop; given the job's Context if it
        takes one; a generator's pieces written as output. The only place where the kind of
        handler matters."""
        slot.begin(job, self.timeout)
        try:
            if self.loop is None:
                return True, self.checked(self.drain(self.handler(*self.arguments(job, output)),
                                                     output))
            return asyncio.run_coroutine_threadsafe(self.await_handler(slot, job, output),
                                                    self.loop).result()
        except Interrupted:
            return False, slot.why
        except RetryLater as later:
            return later
        except Exception as exc:  # the handler's failure is the job's, not the worker's
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            slot.end()

    def arguments(self, job: Job, output: Output | None) -> tuple[Any, ...]:
        return (job.input, Context(output)) if output and self.takes_context else (job.input,)

    @staticmethod
    def piece(value: object) -> str:
        if not isinstance(value, str):
            raise TypeError(f"handler yielded {type(value).__name__}, not str")
        return value

    @classmethod
    def drain(cls, value: object, output: Output | None) -> object:
        """What a plain handler returned; for a generator, each piece it yields written as
        output, and then what it returned (if not None), else the pieces joined. Interrupted
        (a time limit, a cancel) where it runs, it stops there."""
        if not inspect.isgenerator(value) or output is None:
            return value
        pieces: list[str] = []
        try:
            while True:
                try:
                    piece = cls.piece(next(value))
                except StopIteration as stop:
                    return "".join(pieces) if stop.value is None else stop.value
                pieces.append(piece)
                output.add("output", piece, len(piece))
        finally:
            value.close()

    @classmethod
    async def adrain(cls, value: AsyncIterator[object], output: Output) -> str:
        """drain() for an async generator (which returns nothing: the pieces joined)."""
        pieces: list[str] = []
        try:
            async for item in value:
                piece = cls.piece(item)
                pieces.append(piece)
                output.add("output", piece, len(piece))
        finally:
            await cast(Any, value).aclose()
        return "".join(pieces)

    async def await_handler(self, slot: Slot, job: Job, output: Output | None
                            ) -> Tried | RetryLater:
        """On the event loop: await an async handler in a task of its own, which interrupt()
        cancels (only while the handler is awaited, as asyncio.timeout does)."""
        task = cast(asyncio.Task[Any], asyncio.current_task())
        with slot.lock:
            if slot.interrupted:  # before it began
                return False, slot.why
            slot.task = task
        try:
            async with asyncio.timeout(self.timeout or None) as limit:
                value = self.handler(*self.arguments(job, output))
                if inspect.isasyncgen(value) and output is not None:
                    return True, self.checked(await self.adrain(value, output))
                return True, self.checked(await cast(Awaitable[str], value))
        except asyncio.CancelledError:  # interrupted: nothing else cancels this task
            task.uncancel()
            return False, slot.why
        except TimeoutError:
            if limit.expired():
                return False, self.timed_out
            raise

    def process(self, slot: Slot, job: Job, chain: bool = True) -> Job | None:
        """Run one job to its outcome; return the slot's next one if finishing took it (with
        chain)."""
        output = Output(job, slot.taken_from, slot.name, self._written) if self.streams else None
        slot.output = output
        try:
            tried = self.call_handler(slot, job, output)
        except Interrupted:  # raised as the handler ended, before it could be withdrawn
            slot.end()
            tried = False, slot.why
        if output is not None:
            self.write(output, final=True)  # its output before its outcome
            slot.output = None
        outcome, ran = self.outcome(job, tried), time.monotonic() - slot.began
        return self.until_redis_takes(lambda: self.finish(slot, job, *outcome, ran=ran,
                                                          take_next=chain))

    def work(self, slot: Slot) -> None:
        """Thread: the slot's loop, until the worker stops: take a job and run jobs back to
        back for as long as finishing one takes the next; with none to start, wait until one
        may."""
        slot.thread_id, slot.loop = threading.get_ident(), self.loop
        delay = 0.0
        try:
            while not self.stopping:
                try:
                    job = None if slot.empty else self.take(slot)
                    slot.empty = False
                    if job is None:
                        self.wait_for_work(slot)
                    while job is not None:
                        job = self.process(slot, job)
                    self.redis_works()
                    delay = 0.0
                except REDIS_ERRORS as exc:  # unreachable, or refusing: full, READONLY, ...
                    delay = self.retry_delay(exc, delay)
                    time.sleep(delay)
                except Interrupted:  # not raised in a handler: what it interrupted is redone
                    slot.end()
                except Exception:  # a bug: said, and the slot goes on (its take returns the job
                    log.exception("slot %s", slot.name)  # it holds, if any)
                    slot.end()
                    time.sleep(1.0)
        finally:
            slot.stopped.set()

    # -- the process ---------------------------------------------------------------------------

    def run(self) -> int:
        """Work until the first signal, then return 0 once the slots are idle (a cold stop
        exits from the keeper)."""
        threading.Thread(target=self.backstop, name="backstop", daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.first_heartbeat()
        keeper = threading.Thread(target=self.keeper, name="keeper", daemon=True)
        keeper.start()
        log.info("worker %s: waiting for jobs on %s, %d at a time (%s handler)", self.name,
                 ", ".join(keys.queue for keys in self.queues), len(self.slots),
                 "async" if self.is_async else "plain")
        if self.is_async:  # the loop async handlers are awaited on
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="handlers", daemon=True).start()
        threading.Thread(target=self.writer, name="output", daemon=True).start()
        threads = [threading.Thread(target=self.work, args=(slot,), name=slot.name, daemon=True)
                   for slot in self.slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._wake.set()
        keeper.join()  # so that no heartbeat re-registers the slots once they have left
        self.close()
        log.info("worker %s: stopped", self.name)
        return 0

    def first_heartbeat(self) -> None:
        """Register the slots and take the lease before any slot takes a job: a job taken
        before, by a worker killed before, would sit in a processing list that no reclaim looks
        at (only registered slots' are), running or queued forever. Retried while Redis fails;
        a signal meanwhile ends the wait (the slots then take nothing)."""
        delay = 0.0
        while not self.stopping:  # not until_redis_takes(): a signal ends this wait
            try:
                self.heartbeat()
                self.redis_works()
                return
            except REDIS_ERRORS as exc:
                delay = self.retry_delay(exc, delay)
                time.sleep(delay)

    def close(self) -> None:
        """Leave the worker set (holding no job: whatever a slot's list holds is a stray, and
        goes back to the queue)."""
        try:
            for keys in self.queues:
                names = self.names()
                self.reclaim(*names, keys=keys, max_attempts=0, scan=False)
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(keys.lease(self.name), keys.stop(self.name))
                    pipe.srem(keys.workers, *names)
                    pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("could not deregister (%s); the lease will expire in %.0fs",
                        exc, self.lease)
        self.redis.close()


def main(argv: list[str] | None = None) -> int:
    # Run as a script, this module is __main__: a handler's `from worker import RetryLater`
    # would import it again, as a second module whose RetryLater no except here catches.
    sys.modules.setdefault("worker", sys.modules[__name__])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    whole, seconds = number(int, 1), number(float, 0)
    parser.add_argument("--redis-url", type=redis_url,
                        default=from_env(parser, "REDIS_URL", redis_url, "redis://localhost:6379/0"),
                        help="Redis to work against: as server.py's --redis-url "
                             "(env REDIS_URL; default %(default)s)")
    parser.add_argument("--handler", type=load_handler,
                        default=from_env(parser, "JOB_HANDLER", load_handler, None),
                        help="MODULE:FUNCTION taking the input str, returning the result str "
                             "(env JOB_HANDLER; default: upper-case the input)")
    parser.add_argument("--concurrency", type=whole,
                        default=from_env(parser, "WORKER_CONCURRENCY", whole, CONCURRENCY),
                        help="jobs run at once: threads for a plain handler, tasks on one event "
                             "loop for an async one (env WORKER_CONCURRENCY; default %(default)s)")
    parser.add_argument("--timeout", type=seconds,
                        default=from_env(parser, "JOB_TIMEOUT", seconds, TIMEOUT),
                        help="seconds a try may run before it is interrupted and counted as "
                             "failed; 0: no limit (env JOB_TIMEOUT; default %(default)g)")
    parser.add_argument("--max-attempts", type=whole, default=3,
                        help="tries before a job is failed (default %(default)s)")
    parser.add_argument("--lease", type=number(float, BLOCK * 2, above=True), default=30.0,
                        help="seconds without a heartbeat before this worker's jobs are given "
                             "to others (default %(default)s)")
    parser.add_argument("--grace", type=seconds, default=10.0,
                        help="seconds a stop waits for the jobs running (default %(default)s)")
    parser.add_argument("--backoff", type=seconds, default=1.0,
                        help="seconds before the first retry, doubling after (default %(default)s)")
    parser.add_argument("--retention", type=whole,
                        default=from_env(parser, "JOBS_RETENTION", whole, RETENTION),
                        help="seconds a finished job is kept (env JOBS_RETENTION; "
                             "default %(default)s)")
    parser.add_argument("--prefix", type=non_empty,
                        default=from_env(parser, "JOBS_PREFIX", non_empty, PREFIX),
                        help="key prefix of this deployment (env JOBS_PREFIX; default %(default)s)")
    parser.add_argument("--queues", type=queue_names,
                        default=from_env(parser, "JOB_QUEUES", queue_names, [DEFAULT_QUEUE]),
                        metavar="NAME[,NAME...]",
                        help="comma-separated queues to take jobs from, each slot from one of "
                             "them in turn (no strict priority between them) (env JOB_QUEUES; "
                             "default: default)")
    parser.add_argument("--min-replicas", type=number(int, 0),
                        default=from_env(parser, "JOBS_MIN_REPLICAS", number(int, 0), 0),
                        help="after finishing a job, wait (up to 1 s) for this many replicas of "
                             "Redis to have it (env JOBS_MIN_REPLICAS; default %(default)s)")
    parser.add_argument("--max-output", type=number(int, 0), default=MAX_OUTPUT,
                        metavar="BYTES",
                        help="bytes of a job's progress and output (1 MiB by default) kept for "
                             "watchers that join late or reconnect; past it the oldest go "
                             "(default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="check the settings and load the handler, then exit 0 without "
                             "starting (Redis is not contacted)")
    args = parser.parse_args(argv)
    if args.concurrency < len(args.queues):
        parser.error(f"--concurrency {args.concurrency} is less than the {len(args.queues)} "
                     f"queues: every queue needs a slot")
    if args.check:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(message)s")
    worker = Worker(args.redis_url, args.handler or upper, concurrency=args.concurrency,
                    timeout=args.timeout, max_attempts=args.max_attempts, lease=args.lease,
                    grace=args.grace, backoff=args.backoff, retention=args.retention,
                    prefix=args.prefix, min_replicas=args.min_replicas,
                    queues=tuple(args.queues), max_output=args.max_output)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())

