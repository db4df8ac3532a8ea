"""Job queue worker: takes jobs from Redis, runs a handler on each, records the outcome.

    python worker.py [--redis-url URL] [--handler MODULE:FUNCTION] [--max-attempts N] [--lease S]

It blocks on Redis for the next job (BLMOVE from the queue into a processing list it owns),
keeps a lease while it lives, and finishes each job with one Lua script (status, result,
removal from the processing list, expiry, publish). A worker whose lease expires is presumed
dead: any live worker puts its jobs back on the queue. Delivery is therefore at-least-once, so
handlers should be idempotent. A handler that raises is retried with exponential backoff, up to
--max-attempts tries; then the job is failed and its id kept on the dead-letter list.

First SIGTERM/SIGINT: take no new job, finish the current one within --grace seconds, exit 0.
Second signal, or the grace running out: put the job back on the queue, exit 1, even if the
handler never returns (the handler runs on the main thread; a keeper thread renews the lease
and carries out the cold stop).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import NamedTuple, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger("worker")

PREFIX = "{jobs}"  # the braces are a Redis Cluster hash tag: all keys share one slot
TERMINAL = ("done", "failed")
RETENTION = 86_400  # seconds a finished job is kept
DEAD_MAX = 10_000  # ids kept on the dead-letter list
BLOCK = 1  # seconds BLMOVE blocks, so a stop flag is seen at least this often
MAINTAIN_EVERY = 1.0  # seconds between promoting due retries and reclaiming dead workers' jobs
REDIS_RETRY_CAP = 5.0  # seconds between tries while Redis is unreachable

T = TypeVar("T")
Handler = Callable[[str], str]


class Job(NamedTuple):
    """A job this worker has taken and marked running."""

    id: str
    input: str
    attempt: int

    @classmethod
    def started(cls, reply: list[str] | None) -> Job | None:
        """The job a script's start() returned, if any: [id, input, attempt] or nil."""
        return cls(str(reply[0]), str(reply[1]), int(reply[2])) if reply else None


class Keys:
    """Every Redis key of one deployment; all share the prefix and so one cluster slot."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}:queue"  # list of ids; LPUSH to add, BLMOVE from the right to take
        self.delayed = f"{prefix}:delayed"  # sorted set: ids waiting out a retry, by due time
        self.dead = f"{prefix}:dead"  # list of ids of failed jobs, newest first
        self.workers = f"{prefix}:workers"  # set of worker names that may hold jobs
        self.events = f"{prefix}:events"  # pub/sub channel: one JSON message per change

    def job(self, job_id: str) -> str:  # hash: the job's fields
        return f"{self.prefix}:job:{job_id}"

    def processing(self, worker: str) -> str:  # list of ids the worker has taken
        return f"{self.prefix}:processing:{worker}"

    def lease(self, worker: str) -> str:  # exists while the worker is alive (TTL --lease)
        return f"{self.prefix}:lease:{worker}"


def now() -> str:
    """The current time in RFC 3339 with an offset."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def upper(text: str) -> str:
    """The default handler."""
    return text.upper()


# Redis 7 script flags, checked before a script runs, so a refused script has written nothing.
# WRITES: refused while Redis refuses writes (full, READONLY, NOREPLICAS, MISCONF). ALLOW_OOM:
# refused for all of those but a full memory, for scripts that free memory or cost next to none
# (finishing and reclaiming jobs, renewing the lease), so that workers drain a full Redis.
WRITES = "#!lua\n"
ALLOW_OOM = "#!lua flags=allow-oom\n"

# Lua shared by the scripts: emit() publishes the job's state as JSON after every change, and
# bump() stamps a change; every change raises `version`, so watchers can drop stale messages.
LUA_PRELUDE = """
local function emit(key, channel)
  local f = redis.call('HMGET', key, 'id', 'status', 'result', 'error', 'attempts', 'updated',
                      'version')
  redis.call('PUBLISH', channel, cjson.encode({id = f[1], status = f[2], result = f[3] or '',
    error = f[4] or '', attempts = tonumber(f[5]) or 0, updated = f[6], version = tonumber(f[7])}))
end
local function bump(key, status, now)
  redis.call('HSET', key, 'status', status, 'updated', now)
  redis.call('HINCRBY', key, 'version', 1)
end
-- Fail a job for good: kept `retention` seconds, its id at the head of the dead-letter list.
local function fail(key, id, error, now, retention, dead, dead_max)
  bump(key, 'failed', now)
  redis.call('HSET', key, 'error', error)
  redis.call('EXPIRE', key, retention)
  redis.call('LPUSH', dead, id)
  redis.call('LTRIM', dead, 0, dead_max - 1)
end
-- Mark a job just moved into `processing` running: {id, input, attempt}. One that is not
-- `queued` (a duplicate entry, or already finished) is dropped from the list instead: false.
local function start(prefix, processing, id, now, channel)
  local key = prefix .. ':job:' .. id
  if redis.call('HGET', key, 'status') ~= 'queued' then
    redis.call('LREM', processing, 1, id)
    return false
  end
  bump(key, 'running', now)
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  emit(key, channel)
  return {id, redis.call('HGET', key, 'input'), attempts}
end
"""

# KEYS: processing. ARGV: prefix, id (just taken by BLMOVE), now, channel.
START = ALLOW_OOM + LUA_PRELUDE + """
return start(ARGV[1], KEYS[1], ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: job, processing, dead, delayed, queue. ARGV: id, outcome (done/failed/retry), result,
# error, now, channel, retention, due time, dead max, prefix, take next (1/0). Returns {held,
# next}: held is 0 if this worker no longer holds the job (its lease expired and the job was
# reclaimed: the other try's outcome stands); next is the next job, taken and started in the
# same round trip (as by START), or nil: none waiting, or not asked for. Registered twice: with
# WRITES to take the next job, and with ALLOW_OOM to finish alone when Redis is full (a new job
# waits, as BLMOVE does, until memory is back).
FINISH = LUA_PRELUDE + """
local held = redis.call('LREM', KEYS[2], 1, ARGV[1])
if held == 1 then
  if ARGV[2] == 'retry' then
    bump(KEYS[1], 'queued', ARGV[5])
    redis.call('HSET', KEYS[1], 'error', ARGV[4])
    redis.call('ZADD', KEYS[4], ARGV[8], ARGV[1])
  elseif ARGV[2] == 'failed' then
    fail(KEYS[1], ARGV[1], ARGV[4], ARGV[5], ARGV[7], KEYS[3], ARGV[9])
  else
    bump(KEYS[1], 'done', ARGV[5])
    redis.call('HSET', KEYS[1], 'result', ARGV[3], 'error', '')
    redis.call('EXPIRE', KEYS[1], ARGV[7])
  end
  emit(KEYS[1], ARGV[6])
end
local job = false
while ARGV[11] == '1' and not job do
  local id = redis.call('LMOVE', KEYS[5], KEYS[2], 'RIGHT', 'LEFT')
  if not id then break end
  job = start(ARGV[10], KEYS[2], id, ARGV[5], ARGV[6])
end
return {held, job}
"""

# KEYS: queue, workers, dead, delayed. ARGV: prefix, channel, now, now (unix), max attempts
# (0: no limit), retention, dead max, then workers that hold no job now (their lists hold only
# strays: a BLMOVE whose reply was lost). Puts back at the head of the queue the unfinished jobs
# of those workers and of every worker whose lease expired (which also leave the worker set),
# failing those out of attempts; then moves retries that are due onto the queue.
RECLAIM = ALLOW_OOM + LUA_PRELUDE + """
local prefix, channel, now = ARGV[1], ARGV[2], ARGV[3]
local max, moved = tonumber(ARGV[5]), 0
local idle, lost = {}, {}
for i = 8, #ARGV do idle[ARGV[i]] = true end
for _, w in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not idle[w] and redis.call('EXISTS', prefix .. ':lease:' .. w) == 0 then
    lost[#lost + 1] = w
  end
end
local function requeue(w)
  local processing = prefix .. ':processing:' .. w
  for _, id in ipairs(redis.call('LRANGE', processing, 0, -1)) do
    local key = prefix .. ':job:' .. id
    local status = redis.call('HGET', key, 'status')
    if status == 'running' or status == 'queued' then
      local attempts = tonumber(redis.call('HGET', key, 'attempts')) or 0
      if status == 'running' and max > 0 and attempts >= max then
        fail(key, id, 'worker ' .. w .. ' stopped on the last attempt', now, ARGV[6], KEYS[3],
             ARGV[7])
      else
        if status == 'running' then
          bump(key, 'queued', now)
          redis.call('HSET', key, 'error', 'worker ' .. w .. ' stopped before finishing; retrying')
        end
        redis.call('RPUSH', KEYS[1], id)
      end
      if status == 'running' then emit(key, channel) end
      moved = moved + 1
    end
  end
  redis.call('DEL', processing)
end
for w in pairs(idle) do requeue(w) end
for _, w in ipairs(lost) do
  requeue(w)
  redis.call('SREM', KEYS[2], w)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[4], 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[4], id)
  redis.call('LPUSH', KEYS[1], id)
end
return {moved, #due}
"""

# KEYS: lease, workers. ARGV: lease in ms, worker name. Renews the lease, and re-registers.
LEASE = ALLOW_OOM + """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
"""


def redis_said(exc: redis.RedisError) -> str:
    """An error reply as Redis said it (redis-py takes the code off some: OOM, READONLY)."""
    code = getattr(exc, "status_code", None)
    return f"{code} {exc}" if code and not str(exc).startswith(code) else str(exc)


class Backoff:
    """Waits between tries of a Redis step while Redis is unreachable or refuses it: 0.1 s,
    doubling up to REDIS_RETRY_CAP. Logs the first failure of a run of them, and the end."""

    def __init__(self) -> None:
        self.delay = 0.0

    def wait(self, exc: redis.RedisError) -> None:
        if not self.delay:
            if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                problem = f"redis unavailable ({exc})"
            elif isinstance(exc, redis.exceptions.OutOfMemoryError):
                problem = f"redis is full, taking no new job ({redis_said(exc)})"
            else:
                problem = f"redis refused a command ({redis_said(exc)})"
            log.warning("%s; retrying every %gs at most", problem, REDIS_RETRY_CAP)
        self.delay = min(self.delay * 2 or 0.1, REDIS_RETRY_CAP)
        time.sleep(self.delay)

    def done(self) -> None:
        if self.delay:
            log.info("redis works again")
            self.delay = 0.0


def load_handler(spec: str) -> Handler:
    """Import MODULE:FUNCTION, or explain in one line why it cannot be."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SystemExit(f"worker: --handler must look like MODULE:FUNCTION, not {spec!r}")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"worker: cannot load handler {spec!r}: {exc}") from None
    if not callable(handler):
        raise SystemExit(f"worker: handler {spec!r} is not callable")
    return handler  # type: ignore[no-any-return]


class Worker:
    """One worker process: a loop of take, run, finish, with a lease kept alive throughout."""

    def __init__(
        self,
        redis_url: str,
        handler: Handler = upper,
        *,
        max_attempts: int = 3,
        lease: float = 30.0,
        grace: float = 10.0,
        backoff: float = 1.0,
        retention: int = RETENTION,
        prefix: str = PREFIX,
    ) -> None:
        self.handler = handler
        self.max_attempts = max_attempts
        self.lease = lease
        self.grace = grace
        self.backoff = backoff
        self.retention = retention
        self.keys = Keys(prefix)
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.redis = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            client_name="jobs-worker",
            socket_connect_timeout=2.0,
            socket_timeout=BLOCK + 5.0,  # longer than the BLMOVE block
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 2),
        )
        self._start = self.redis.register_script(START)
        self._finish_take = self.redis.register_script(WRITES + FINISH)
        self._finish = self.redis.register_script(ALLOW_OOM + FINISH)
        self._reclaim = self.redis.register_script(RECLAIM)
        self._lease = self.redis.register_script(LEASE)
        self.stopping = False  # the first signal: take no new job
        self.cold = False  # the second: give the job back and exit now
        self._stop_deadline = float("inf")  # monotonic time when the grace runs out
        self._wake = threading.Event()  # wakes the keeper thread early
        self._next_maintain = 0.0

    # -- signals -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only set flags: the handler may be running on this (the main) thread, and the keeper
        thread does what must happen even if the handler never returns."""
        if self.stopping:
            self.cold = True
        else:
            log.info("%s: finishing the current job, then exiting (signal again to stop now)",
                     signal.Signals(signum).name)
            self._stop_deadline = time.monotonic() + self.grace
            self.stopping = True
        self._wake.set()  # safe here: no other code of the main thread takes this Event's lock

    def keeper(self) -> None:
        """Thread: renew the lease every --lease/3 s whatever the main thread is doing (a long
        handler included); on a cold stop, give this worker's jobs back and exit the process."""
        renewed = True
        while not (self.cold or time.monotonic() >= self._stop_deadline):
            try:
                self.heartbeat()
                renewed = True
            except redis.RedisError as exc:
                if renewed:  # once a run of failures: the main loop says what Redis does
                    log.warning("cannot renew the lease (%s); retrying", redis_said(exc))
                renewed = False
            self._wake.wait(min(self.lease / 3, max(self._stop_deadline - time.monotonic(), 0)))
            self._wake.clear()
        if not self.cold:
            log.warning("grace of %.1fs ran out", self.grace)
        log.warning("stopping now: giving this worker's jobs back to the queue")
        try:
            self.reclaim(self.name, max_attempts=0)
            # Not leaving the worker set: should a finish in flight on the main thread take one
            # more job, any worker reclaims it once it sees the lease gone.
            self.redis.delete(self.keys.lease(self.name))
        except redis.RedisError as exc:
            log.warning("could not give jobs back (%s); others will once the lease expires",
                        exc)
        logging.shutdown()
        os._exit(1)

    # -- Redis steps ---------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew the lease (and re-register, in case this worker was presumed dead)."""
        self._lease(keys=[self.keys.lease(self.name), self.keys.workers],
                    args=[int(self.lease * 1000), self.name])

    def reclaim(self, *idle: str, max_attempts: int | None = None) -> tuple[int, int]:
        """Requeue what the idle workers named hold (strays) and the jobs of workers whose
        lease expired; move due retries onto the queue. Returns (jobs requeued, retries moved)."""
        k = self.keys
        moved, due = self._reclaim(
            keys=[k.queue, k.workers, k.dead, k.delayed],
            args=[k.prefix, k.events, now(), time.time(),
                  self.max_attempts if max_attempts is None else max_attempts,
                  self.retention, DEAD_MAX, *idle],
        )
        if moved:
            log.warning("requeued %d job(s) of stopped worker(s) or stray(s)", moved)
        self._next_maintain = time.monotonic() + MAINTAIN_EVERY
        return int(moved), int(due)

    def take(self) -> Job | None:
        """Block up to BLOCK seconds for a job; return it once it is running."""
        processing = self.keys.processing(self.name)
        taken = self.redis.blmove(self.keys.queue, processing, BLOCK, "RIGHT", "LEFT")
        if taken is None:
            return None
        started = self._start(keys=[processing],
                              args=[self.keys.prefix, taken, now(), self.keys.events])
        return Job.started(started)

    def finish(self, job_id: str, outcome: str, result: str = "", error: str = "",
               due: float = 0.0) -> Job | None:
        """Record done/failed/retry atomically, and take the next job in the same round trip
        unless the worker is stopping, maintenance is due (it runs with no job held) or Redis is
        full. A result is dropped if the job was reclaimed meanwhile."""
        k = self.keys
        keys = [k.job(job_id), k.processing(self.name), k.dead, k.delayed, k.queue]

        def args(take_next: bool) -> list[str | int | float]:
            return [job_id, outcome, result, error, now(), k.events, self.retention, due,
                    DEAD_MAX, k.prefix, int(take_next)]

        chain = not self.stopping and time.monotonic() < self._next_maintain
        try:
            held, taken = (self._finish_take if chain else self._finish)(keys=keys,
                                                                          args=args(chain))
        except redis.exceptions.OutOfMemoryError:  # refused before it ran: finish alone
            held, taken = self._finish(keys=keys, args=args(False))
        if not held:
            log.warning("job %s was reclaimed while this worker ran it; dropping this result",
                        job_id)
        return Job.started(taken)

    # -- running a job -------------------------------------------------------------------------

    def run_handler(self, text: str) -> tuple[bool, str]:
        """Call the handler on this thread: (True, result) or (False, error)."""
        try:
            result = self.handler(text)
            if not isinstance(result, str):
                raise TypeError(f"handler returned {type(result).__name__}, not str")
            return True, result
        except Exception as exc:  # the handler's failure is the job's, not the worker's
            return False, f"{type(exc).__name__}: {exc}"

    def until_recorded(self, step: Callable[[], T]) -> T:
        """Run a Redis step until Redis takes it: a result is never dropped for an outage or
        a refusal."""
        backoff = Backoff()
        while True:
            try:
                result = step()
                backoff.done()
                return result
            except redis.RedisError as exc:
                # A reply may have been lost with a job taken in it: take none until the next
                # maintenance, which runs with no job held and puts such strays back.
                self._next_maintain = 0.0
                backoff.wait(exc)

    def process(self, job: Job) -> Job | None:
        """Run one job to its outcome; return the next one if finishing took it."""
        job_id, attempt = job.id, job.attempt
        log.debug("job %s: running (attempt %d)", job_id, attempt)
        ok, value = self.run_handler(job.input)
        if ok:
            taken = self.until_recorded(lambda: self.finish(job_id, "done", result=value))
            log.info("job %s: done", job_id)
        elif attempt < self.max_attempts:
            delay = self.backoff * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
            taken = self.until_recorded(lambda: self.finish(job_id, "retry", error=value,
                                                            due=time.time() + delay))
            log.warning("job %s: %s; retrying in %.1fs", job_id, value, delay)
        else:
            taken = self.until_recorded(lambda: self.finish(job_id, "failed", error=value))
            log.error("job %s: failed after %d attempts: %s", job_id, attempt, value)
        return taken

    def step(self) -> None:
        """One turn of the loop: tidy up while holding no job, then take jobs and run them back
        to back for as long as finishing one takes the next."""
        if time.monotonic() >= self._next_maintain:
            self.reclaim(self.name)  # holding no job, anything in our own list is a stray
        job = self.take()
        while job is not None:
            job = self.process(job)

    def run(self) -> int:
        """Work until the first signal, then return 0 (a cold stop exits from the keeper)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        threading.Thread(target=self.keeper, name="keeper", daemon=True).start()
        log.info("worker %s: waiting for jobs on %s", self.name, self.keys.queue)
        backoff = Backoff()
        while not self.stopping:
            try:
                self.step()
                backoff.done()
            except redis.RedisError as exc:  # unreachable, or refusing: full, READONLY, ...
                self._next_maintain = 0.0  # a job taken but not started is put back first
                backoff.wait(exc)
        self.close()
        log.info("worker %s: stopped", self.name)
        return 0

    def close(self) -> None:
        """Leave the worker set (holding no job)."""
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.lease(self.name), self.keys.processing(self.name))
                pipe.srem(self.keys.workers, self.name)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not deregister (%s); the lease will expire in %.0fs",
                        exc, self.lease)
        self.redis.close()


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=env("REDIS_URL", "redis://localhost:6379/0"),
                        help="Redis to work against (env REDIS_URL; default %(default)s)")
    parser.add_argument("--handler", default=env("JOB_HANDLER", ""),
                        help="MODULE:FUNCTION taking the input str, returning the result str "
                             "(env JOB_HANDLER; default: upper-case the input)")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="tries before a job is failed (default %(default)s)")
    parser.add_argument("--lease", type=float, default=30.0,
                        help="seconds without a heartbeat before this worker's jobs are given "
                             "to others (default %(default)s)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds a stop waits for the current job (default %(default)s)")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="seconds before the first retry, doubling after (default %(default)s)")
    parser.add_argument("--retention", type=int, default=int(env("JOBS_RETENTION", RETENTION)),
                        help="seconds a finished job is kept (env JOBS_RETENTION; "
                             "default %(default)s)")
    parser.add_argument("--prefix", default=env("JOBS_PREFIX", PREFIX),
                        help="key prefix of this deployment (env JOBS_PREFIX; default %(default)s)")
    args = parser.parse_args(argv)
    if args.max_attempts < 1 or args.lease <= BLOCK * 2 or args.grace < 0 or args.backoff < 0:
        parser.error(f"need --max-attempts >= 1, --lease > {BLOCK * 2:g}, "
                     "--grace >= 0, --backoff >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(message)s")
    handler = load_handler(args.handler) if args.handler else upper
    worker = Worker(args.redis_url, handler, max_attempts=args.max_attempts, lease=args.lease,
                    grace=args.grace, backoff=args.backoff, retention=args.retention,
                    prefix=args.prefix)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())

