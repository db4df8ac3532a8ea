"""The Redis side of the job queue, shared by server.py and worker.py: the key layout, the Lua
scripts that change a job (each one atomic, each declaring what it needs with Redis 7 script
flags), and how both programs read their settings.

Not a program: `python server.py` and `python worker.py` import it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar

import redis
from redis.connection import parse_url

PREFIX = "{jobs}"  # the braces are a Redis Cluster hash tag: all keys share one slot
TERMINAL = ("done", "failed")
RETENTION = 86_400  # seconds a finished job is kept
DEAD_MAX = 10_000  # ids kept on the dead-letter list

T = TypeVar("T")
N = TypeVar("N", int, float)


class Job(NamedTuple):
    """A job a worker has taken and marked running."""

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
        self.workers = f"{prefix}:workers"  # set of slots (<worker>/<n>) that may hold jobs
        self.events = f"{prefix}:events"  # pub/sub channel: one JSON message per change

    def job(self, job_id: str) -> str:  # hash: the job's fields
        return f"{self.prefix}:job:{job_id}"

    def processing(self, slot: str) -> str:  # list of the id the slot has taken (or none)
        return f"{self.prefix}:processing:{slot}"

    def lease(self, worker: str) -> str:  # exists while the worker is alive (TTL --lease)
        return f"{self.prefix}:lease:{worker}"


def now() -> str:
    """The current time in RFC 3339 with an offset."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


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
-- Mark a job just moved into `processing` (a slot's list) running: {id, input, attempt}, and
-- record the slot in its `worker` field. False, and nothing done, if it is no longer in the
-- list (reclaimed meanwhile); false, and dropped from the list, if it is not `queued` (a
-- duplicate entry, or finished). Run twice for one take (a reply lost), the same answer.
local function start(prefix, processing, id, now, channel)
  local key = prefix .. ':job:' .. id
  if not redis.call('LPOS', processing, id) then return false end
  local slot = string.sub(processing, #prefix + 13)  -- after '<prefix>:processing:'
  local f = redis.call('HMGET', key, 'status', 'worker', 'input', 'attempts')
  if f[1] == 'running' and f[2] == slot then return {id, f[3], tonumber(f[4])} end
  if f[1] ~= 'queued' then
    redis.call('LREM', processing, 1, id)
    return false
  end
  bump(key, 'running', now)
  redis.call('HSET', key, 'worker', slot)
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  emit(key, channel)
  return {id, f[3], attempts}
end
"""

# KEYS: job, queue. ARGV: id, then the job's fields and values. Stores and queues in one step,
# or is refused before it runs while Redis refuses writes (full, READONLY, NOREPLICAS, MISCONF).
SUBMIT = WRITES + """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('LPUSH', KEYS[2], ARGV[1])
"""
# Writes nothing, but declares that it may: Redis refuses it exactly when it refuses a submit.
WRITABLE = WRITES + "return 1"

# KEYS: processing. ARGV: prefix, id (just taken by BLMOVE), now, channel.
START = ALLOW_OOM + LUA_PRELUDE + """
return start(ARGV[1], KEYS[1], ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: job, processing, dead, delayed, queue. ARGV: id, outcome (done/failed/retry), result,
# error, now, channel, retention, due time, dead max, prefix, take next (1/0), attempt. Returns
# {held, next}: held is 0 if the slot no longer holds this try of the job (the job was
# reclaimed, or the keeper recorded the try timed out: that outcome stands); next is the next
# job, taken and started in the same round trip (as by START), or nil: none waiting, or not
# asked for. Registered twice: with WRITES to take the next job, and with ALLOW_OOM to finish
# alone when Redis is full (a new job waits, as BLMOVE does, until memory is back).
FINISH = LUA_PRELUDE + """
local held = 0
if redis.call('HGET', KEYS[1], 'attempts') == ARGV[12] then
  held = redis.call('LREM', KEYS[2], 1, ARGV[1])
end
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
# (0: no limit), retention, dead max, scan (1/0), then slots that hold no job now (their lists
# hold only strays: a BLMOVE whose reply was lost). Puts back at the head of the queue the
# unfinished jobs of those slots and, with scan, of every slot whose worker's lease expired
# (which also leave the set of slots), failing those out of attempts, and moves retries that
# are due onto the queue. A slot is named <worker>/<n>; the lease is the worker's.
RECLAIM = ALLOW_OOM + LUA_PRELUDE + """
local prefix, channel, now = ARGV[1], ARGV[2], ARGV[3]
local max, moved = tonumber(ARGV[5]), 0
local scan, idle, lost, alive = ARGV[8] == '1', {}, {}, {}
for i = 9, #ARGV do idle[ARGV[i]] = true end
for _, w in ipairs(scan and redis.call('SMEMBERS', KEYS[2]) or {}) do
  local owner = string.match(w, '^(.+)/%d+$') or w
  if alive[owner] == nil then
    alive[owner] = redis.call('EXISTS', prefix .. ':lease:' .. owner) == 1
  end
  if not idle[w] and not alive[owner] then lost[#lost + 1] = w end
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
local due = scan and redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[4], 'LIMIT', 0, 1000) or {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[4], id)
  redis.call('LPUSH', KEYS[1], id)
end
return {moved, #due}
"""

# KEYS: lease, workers. ARGV: lease in ms, then the worker's slots. Renews the lease, and
# (re-)registers the slots.
LEASE = ALLOW_OOM + """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], unpack(ARGV, 2))
"""


def redis_said(exc: redis.RedisError) -> str:
    """An error reply as Redis said it (redis-py takes the code off some: OOM, READONLY)."""
    code = getattr(exc, "status_code", None)
    return f"{code} {exc}" if code and not str(exc).startswith(code) else str(exc)

# -- settings: argparse types, also applied to environment variables (see from_env) ----------

def number(kind: type[N], low: N, high: N | None = None, *,
           above: bool = False) -> Callable[[str], N]:
    """An argparse type: text to a finite int or float, at least low (more than low if above),
    at most high."""
    what = "a whole number" if kind is int else "a number"
    limits = (f"{low:g} to {high:g}" if high is not None
              else f"more than {low:g}" if above else f"at least {low:g}")

    def convert(text: str) -> N:
        try:
            value = kind(text)
            if not math.isfinite(value):
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({limits})")
        return value

    return convert


def redis_url(text: str) -> str:
    """An argparse type: a URL redis-py accepts (redis://, rediss://, unix://)."""
    try:
        parse_url(text)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def non_empty(text: str) -> str:
    """An argparse type: any text but none."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def from_env(parser: argparse.ArgumentParser, name: str, kind: Callable[[str], T],
             default: T) -> T:
    """A flag's default: environment variable NAME converted by the flag's type, or default if
    it is unset. Checked now, so a bad variable is an error even when the flag is given."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return kind(text)
    except argparse.ArgumentTypeError as exc:
        # parser.exit, not parser.error: the parser is still being built, its usage line partial
        parser.exit(2, f"{parser.prog}: error: environment variable {name}={text!r}: {exc}\n")
