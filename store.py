"""The Redis side of the job queue, shared by server.py and worker.py: the key layout, the Lua
scripts that change a job (each one atomic, each declaring what it needs with Redis 7 script
flags), and how both programs read their settings.

Not a program: `python server.py` and `python worker.py` import it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.connection import parse_url

PREFIX = "{jobs}"  # the braces are a Redis Cluster hash tag: a queue's keys share one slot
DEFAULT_QUEUE = "default"  # its keys have the prefix itself; another queue's, see Keys
QUEUE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
STATES = ("queued", "delayed", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
RETENTION = 86_400  # seconds a finished job is kept
DEAD_MAX = 10_000  # ids kept on the dead-letter list
MAX_BULK = 1_000  # jobs one submit may carry
PRIORITIES = range(1, 10)  # a job's priority: higher starts first
DEFAULT_PRIORITY = 5
GROUP_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # a job's group: fair share, group limits
WAKE_MAX = 64  # idle slots one change wakes at once, at most (each woken slot wakes the next)
SCAN_MAX = 1_000  # groups one take looks at, at most (those held back by a limit are skipped)
# A queue's settings, as PUT /queues/NAME takes them: a limit is a whole number of jobs, a rate
# limit jobs per seconds. Stored in the queue's settings hash, flat (see SETTINGS).
LIMITS = ("concurrency", "group_concurrency")
RATE_LIMITS = ("rate_limit", "group_rate_limit")
# Upper bounds (seconds) of the run-time histogram's buckets, as Prometheus counts them.
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

T = TypeVar("T")
N = TypeVar("N", int, float)
EMPTY, HELD = -1, -2  # why a take started no job: none queued; held back by a pause or a limit


class Job(NamedTuple):
    """A job a worker has taken and marked running."""

    id: str
    input: str
    attempt: int

    @classmethod
    def taken(cls, reply: list[Any]) -> tuple[Job | None, int]:
        """What take() returned: (the job started, 0), or (None, why none): EMPTY, HELD, or
        the milliseconds until a rate limit lets one start."""
        if reply[0] is None:
            return None, int(reply[1])
        return cls(str(reply[0]), str(reply[1]), int(reply[2])), 0


class Keys:
    """Every Redis key of one queue of a deployment; all share the queue's prefix and so one
    cluster slot. The default queue's prefix is the deployment's ({jobs}), so data from before
    named queues is the default queue's; another queue's puts its name inside the hash tag
    ({jobs:emails}), or after the prefix when it has none. The scripts build the same names
    from the prefix (see LUA_PRELUDE)."""

    def __init__(self, prefix: str = PREFIX, queue: str = DEFAULT_QUEUE) -> None:
        self.name = queue
        self.registry = f"{prefix}:queues"  # set of the queues' names, in the default's slot
        # hash: every schedule's name -> the queue its jobs go to (see SCHEDULE), in the same
        self.schedule_registry = f"{prefix}:schedules:registry"
        if queue != DEFAULT_QUEUE:
            prefix = f"{prefix[:-1]}:{queue}}}" if prefix.endswith("}") else f"{prefix}:{queue}"
        self.prefix = prefix
        self.queue = f"{prefix}:queue"  # list of ids; LPUSH to add, BLMOVE from the right to take
        self.delayed = f"{prefix}:delayed"  # sorted set: ids of delayed jobs, by due time
        self.dead = f"{prefix}:dead"  # list of ids of failed jobs, newest first
        self.workers = f"{prefix}:workers"  # set of slots (<worker>/<n>) that may hold jobs
        self.events = f"{prefix}:events"  # pub/sub channel: one JSON message per change
        self.counters = f"{prefix}:counters"  # hash: submitted, done, failed, retried, cancelled
        self.runtime = f"{prefix}:runtime"  # hash: the run-time histogram (see RUNTIME_BUCKETS)
        # Dispatch (see take() in LUA_PRELUDE): `queue` holds the queued jobs of priority 5
        # without a group; ready() those of the others.
        self.priorities = f"{prefix}:priorities"  # sorted set: the priorities with queued jobs
        self.settings = f"{prefix}:settings"  # hash: paused, limits (see SETTINGS)
        self.group_running = f"{prefix}:group_running"  # hash: group -> its jobs running
        self.rate = f"{prefix}:rate"  # sorted set: the starts in the rate limit's window
        self.wake = f"{prefix}:wake"  # list of tokens: each wakes one idle slot (BLPOP)
        self.timer = f"{prefix}:timer"  # the slot that waits for a rate limit to free; PX
        self.expiry = f"{prefix}:expiry"  # sorted set: queued jobs by when they expire
        self.schedules = f"{prefix}:schedules"  # sorted set: the queue's schedules by next_run

    def schedule(self, name: str) -> str:  # hash: a schedule whose jobs go to this queue
        return f"{self.prefix}:schedule:{name}"

    def idempotency(self, digest: str) -> str:  # string: "<body digest> <ids>", TTL
        return f"{self.prefix}:idempotency:{digest}"

    def ready(self, priority: int = DEFAULT_PRIORITY, group: str = "") -> str:
        """The list of a priority's and group's queued jobs (LPUSH to add, RPOP to take)."""
        if priority == DEFAULT_PRIORITY and not group:
            return self.queue
        return f"{self.prefix}:queue:{priority}:{group}"

    def groups(self, priority: int) -> str:  # list: the ring of groups with queued jobs
        return f"{self.prefix}:groups:{priority}"

    def group_rate(self, group: str) -> str:  # sorted set: a group's starts in its window
        return f"{self.rate}:{group}"

    def job(self, job_id: str) -> str:  # hash: the job's fields
        return f"{self.prefix}:job:{job_id}"

    def index(self, status: str) -> str:  # sorted set: ids in that state, by when they entered
        return f"{self.prefix}:index:{status}"

    def processing(self, slot: str) -> str:  # list of the id the slot has taken (or none)
        return f"{self.prefix}:processing:{slot}"

    def lease(self, worker: str) -> str:  # hash: the worker's host, pid...; TTL --lease
        return f"{self.prefix}:lease:{worker}"

    def stop(self, worker: str) -> str:  # set: ids of its running jobs asked to stop
        return f"{self.prefix}:stop:{worker}"

    def history(self, job_id: str) -> str:  # list: the job's messages, in seq order (OUTPUT)
        return f"{self.prefix}:history:{job_id}"


def now() -> str:
    """The current time in RFC 3339 with an offset."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="microseconds")


def bucket(seconds: float) -> str:
    """The run-time histogram bucket of a try that took this long: its upper bound, or +Inf."""
    return next((f"{b:g}" for b in RUNTIME_BUCKETS if seconds <= b), "+Inf")


# Redis 7 script flags, checked before a script runs, so a refused script has written nothing.
# WRITES: refused while Redis refuses writes (full, READONLY, NOREPLICAS, MISCONF). ALLOW_OOM:
# refused for all of those but a full memory, for scripts that free memory or cost next to none
# (finishing, cancelling and reclaiming jobs, renewing the lease), so that workers drain a full
# Redis. READS: writes nothing, so runs whatever Redis refuses.
WRITES = "#!lua\n"
ALLOW_OOM = "#!lua flags=allow-oom\n"
READS = "#!lua flags=no-writes\n"

# Lua shared by the scripts. Every script takes ARGV[1] = prefix, ARGV[2] = now (RFC 3339),
# ARGV[3] = retention, and its own arguments after those; it names the keys from the prefix
# (all in the prefix's slot; KEYS[1] routes the call). bump() is every change of state: it
# stamps it, raises `version` (so watchers drop stale messages) and moves the id between the
# state indexes (sorted by Redis's clock in microseconds); emit() publishes the new state on the
# queue's channel, with sharded pub/sub (SPUBLISH): on a cluster it reaches the nodes of the
# queue's slot only, and on one Redis it is the same as PUBLISH.
# Every message of a job (its states, and its progress and output, see OUTPUT) is numbered
# from 1 (`seq` in the job's hash: the last one's number) and kept in the
# job's history, a list of the messages as published, oldest first (`dropped`: how many the
# bound dropped from its head, so the message at index i is number dropped + i + 1), so that a
# watcher can ask for the messages after one it saw (HISTORY). A list, not a stream: Redis
# gives a new stream a 4 KiB node, which would have been most of a small job's memory.
# Most jobs only ever go queued, running, ended, and emit nothing: such a job is `lazy`, it has
# no history list, and its messages are rebuilt when asked for (rebuilt()): the first from its
# hash's `created`, the running one from `started`, the last from its hash as it is now, so a
# job that emits nothing costs what it did before histories. Any other change, and its first
# progress or output, store its messages so far (materialize()) and every one after.
LUA_PRELUDE = """
local P, NOW, RETENTION = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function job_key(id) return P .. ':job:' .. id end
local function clock()  -- Redis's time: unix seconds, and microseconds as a score string
  local t = redis.call('TIME')
  return tonumber(t[1]), t[1] .. string.format('%06d', t[2])
end
-- A state message: the job's fields as emit() reads them (status, result, error, attempts,
-- updated, version), in one order, so that one rebuilt is the one published, byte for byte.
local function state_message(id, f, seq)
  return '{"type":"state","id":' .. cjson.encode(id) .. ',"status":' .. cjson.encode(f[1])
    .. ',"result":' .. cjson.encode(f[2] or '') .. ',"error":' .. cjson.encode(f[3] or '')
    .. ',"attempts":' .. (tonumber(f[4]) or 0) .. ',"updated":' .. cjson.encode(f[5])
    .. ',"version":' .. (tonumber(f[6]) or 0) .. ',"seq":' .. seq .. '}'
end
-- A lazy job's messages from..to (to: at most its last), from one read of its hash: queued at
-- `created`, running at `started`, the last as the hash is now.
local function rebuilt(id, from, to)
  local f = redis.call('HMGET', job_key(id), 'status', 'result', 'error', 'attempts', 'updated',
                       'version', 'seq', 'created', 'started')
  local last, out = tonumber(f[7]), {}
  for n = from, math.min(to, last) do
    out[#out + 1] = n == last and state_message(id, f, n)
      or n == 1 and state_message(id, {'queued', '', '', 0, f[8], 1}, 1)
      or state_message(id, {'running', '', '', 1, f[9], 2}, 2)
  end
  return out
end
-- A lazy job's messages so far go to its history, and from now on every one (see above).
local function materialize(id)
  if not redis.call('HGET', job_key(id), 'lazy') then return end
  redis.call('RPUSH', P .. ':history:' .. id, unpack(rebuilt(id, 1, math.huge)))
  redis.call('HDEL', job_key(id), 'lazy', 'started')
end
local ENDED = {done = true, failed = true, cancelled = true}
local function emit(id)
  local key, history = job_key(id), P .. ':history:' .. id
  local f = redis.call('HMGET', key, 'status', 'result', 'error', 'attempts', 'updated',
                      'version', 'lazy')
  local seq = redis.call('HINCRBY', key, 'seq', 1)
  local m = state_message(id, f, seq)
  if f[7] then  -- lazy: rebuilt when asked for; its start is noted for that
    if f[1] == 'running' then redis.call('HSET', key, 'started', f[5]) end
  else
    redis.call('RPUSH', history, m)
    if ENDED[f[1]] then
      redis.call('EXPIRE', history, RETENTION)  -- the history expires with the job
    end
  end
  redis.call('SPUBLISH', P .. ':events', m)
end
local function owner(slot) return string.match(slot or '', '^(.+)/%d+$') or slot or '' end
-- Returns Redis's time in unix seconds.
local function bump(id, status)
  local key = job_key(id)
  local f = redis.call('HMGET', key, 'status', 'worker', 'cancel_requested', 'group', 'lazy',
                      'seq')
  local old = f[1]
  local rebuildable = old == 'queued' and f[6] == '1' and (status == 'running'
                                                           or status == 'cancelled')
                      or old == 'running' and f[6] == '2' and ENDED[status]
  if f[5] and not rebuildable then
    materialize(id)  -- off the path whose messages can be rebuilt: stored from now on
  end
  if old then redis.call('ZREM', P .. ':index:' .. old, id) end
  if old == 'running' and f[3] then  -- a stop request is over once the try is
    redis.call('SREM', P .. ':stop:' .. owner(f[2]), id)
  end
  if (old == 'running') ~= (status == 'running') then  -- the jobs each group runs
    local running = P .. ':group_running'
    if redis.call('HINCRBY', running, f[4] or '', old == 'running' and -1 or 1) <= 0 then
      redis.call('HDEL', running, f[4] or '')
    end
  end
  local seconds, score = clock()
  redis.call('ZADD', P .. ':index:' .. status, score, id)
  redis.call('HSET', key, 'status', status, 'updated', NOW)
  redis.call('HINCRBY', key, 'version', 1)
  return seconds
end
local function count(name, n) redis.call('HINCRBY', P .. ':counters', name, n or 1) end
-- End a job: it, and its place in its state's index, are kept RETENTION seconds; counted in
-- the totals and (done, failed) in its minute's.
local function ended(id, status)
  local seconds, index = bump(id, status), P .. ':index:' .. status
  redis.call('EXPIRE', job_key(id), RETENTION)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. (seconds - RETENTION) .. '000000')
  redis.call('EXPIRE', index, RETENTION)
  count(status)
  if status ~= 'cancelled' then
    local minute = P .. ':minute:' .. math.floor(seconds / 60)
    redis.call('HINCRBY', minute, status, 1)
    redis.call('EXPIRE', minute, 7200)
  end
end
-- End a queued job not started by the time its submit gave (expires_in): cancelled.
local function expire(id)
  ended(id, 'cancelled')
  redis.call('HSET', job_key(id), 'error', 'expired: not started within ' ..
             (redis.call('HGET', job_key(id), 'expires_in') or '?') .. ' s')
  emit(id)
end
-- Fail a job for good, its id at the head of the dead-letter list.
local function fail(id, error)
  ended(id, 'failed')
  redis.call('HSET', job_key(id), 'error', error)
  redis.call('LPUSH', P .. ':dead', id)
  redis.call('LTRIM', P .. ':dead', 0, DEAD_MAX - 1)
end
-- Where queued jobs wait: a list per priority and group (LPUSH to add, RPOP to take: FIFO); the
-- default priority's jobs without a group in the queue's own list, as before priorities. A
-- ring per priority of the groups that have jobs (a group at most once), and the priorities
-- that have jobs. A take rotates the ring of the highest priority: the groups take turns.
local function ready_key(priority, group)
  if priority == '5' and group == '' then return P .. ':queue' end
  return P .. ':queue:' .. priority .. ':' .. group
end
-- Up to n idle slots (WAKE_MAX at most) waiting on the queue are woken: one token each.
local function wake(n)
  local key = P .. ':wake'
  for _ = redis.call('LLEN', key) + 1, math.min(n, WAKE_MAX) do redis.call('LPUSH', key, 1) end
end
-- Queue a job where a take finds it: last in its priority and group, or first (head: a job
-- given back). priority and group are read from the job when not given.
local function push(id, head, priority, group)
  if not priority then
    local f = redis.call('HMGET', job_key(id), 'priority', 'group')
    priority, group = f[1] or '5', f[2] or ''
  end
  if redis.call(head and 'RPUSH' or 'LPUSH', ready_key(priority, group), id) == 1 then
    redis.call('LPUSH', P .. ':groups:' .. priority, group)
    redis.call('ZADD', P .. ':priorities', priority, priority)
  end
end
-- After ids left a group's list: the group leaves its ring once it has none (and the priority,
-- once no group has).
local function drop(priority, group)
  if redis.call('EXISTS', ready_key(priority, group)) == 0 then
    local ring = P .. ':groups:' .. priority
    redis.call('LREM', ring, 0, group)
    if redis.call('EXISTS', ring) == 0 then redis.call('ZREM', P .. ':priorities', priority) end
  end
end
-- Take a queued job off its list (cancelled; or ended by hand). Returns whether it was there.
local function unqueue(id)
  local f = redis.call('HMGET', job_key(id), 'priority', 'group')
  local priority, group = f[1] or '5', f[2] or ''
  local removed = redis.call('LREM', ready_key(priority, group), 0, id)
  drop(priority, group)
  return removed > 0
end
-- Store and queue (or delay until `due`, unix time) jobs given from ARGV[first] on: n, n
-- field-value pairs every job gets (priority and group among them, if any), then id-input
-- pairs, one per job. A job already stored (sent again after a lost reply) is left alone.
-- `expires` ('' for none): the unix time by which a job must have started, or it ends
-- cancelled (see expire()). Returns the ids.
local function add_jobs(first, due, expires)
  local n = tonumber(ARGV[first])
  local fields = {unpack(ARGV, first + 1, first + 2 * n)}
  local status = due == '' and 'queued' or 'delayed'
  local priority, group = '5', ''
  for i = 1, #fields, 2 do
    if fields[i] == 'priority' then priority = fields[i + 1] end
    if fields[i] == 'group' then group = fields[i + 1] end
  end
  local _, score = clock()
  local ids, stored = {}, 0
  for i = first + 1 + 2 * n, #ARGV, 2 do
    local id = ARGV[i]
    ids[#ids + 1] = id
    if redis.call('EXISTS', job_key(id)) == 0 then
      redis.call('HSET', job_key(id), 'id', id, 'input', ARGV[i + 1], unpack(fields))
      if due == '' then redis.call('HSET', job_key(id), 'lazy', 1) end  -- see emit()
      redis.call('ZADD', P .. ':index:' .. status, score, id)
      if due == '' then
        push(id, false, priority, group)
      else
        redis.call('ZADD', P .. ':delayed', due, id)
      end
      if expires ~= '' then redis.call('ZADD', P .. ':expiry', expires, id) end
      emit(id)
      stored = stored + 1
    end
  end
  count('submitted', stored)
  if due == '' then wake(stored) end
  return ids
end
-- The queue's settings (see SETTINGS), as numbers.
local function settings()
  local s, f = {}, redis.call('HGETALL', P .. ':settings')
  for i = 1, #f, 2 do s[f[i]] = tonumber(f[i + 1]) end
  return s
end
local function us(n) return string.format('%.0f', n) end  -- Lua prints big numbers as 1.7e+15
-- Milliseconds until the sliding window `key` (the starts of the last `per` seconds, by Redis's
-- clock in microseconds) has room for one more of `jobs`: 0 if it has now.
local function rate_wait(key, jobs, per, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', us(now - per * 1e6))
  local n = redis.call('ZCARD', key)
  if n < jobs then return 0 end
  local first = redis.call('ZRANGE', key, n - jobs, n - jobs, 'WITHSCORES')  -- leaves last
  return math.max(math.ceil((tonumber(first[2]) + per * 1e6 - now) / 1000), 1)
end
local function started(key, per, now, id, attempt)
  redis.call('ZADD', key, us(now), id .. ':' .. attempt .. ':' .. us(now))  -- one per start
  redis.call('PEXPIRE', key, math.ceil(per * 1000) + 1000)
end
-- A queue as GET /queues shows it: {length, running, paused, settings, held_back}; held_back
-- counts the queued jobs a limit or a pause holds back now. Reads only.
local function describe()
  local s, raw = settings(), redis.call('HGETALL', P .. ':settings')
  local _, score = clock()
  local now = tonumber(score)
  local out = {length = redis.call('ZCARD', P .. ':index:queued'),
               running = redis.call('ZCARD', P .. ':index:running'),
               paused = s.paused == 1, settings = {}, held_back = 0}
  for i = 1, #raw, 2 do out.settings[raw[i]] = tonumber(raw[i + 1]) end
  local function full(key, jobs, per)
    return redis.call('ZCOUNT', key, '(' .. us(now - per * 1e6), '+inf') >= jobs
  end
  if s.paused or (s.concurrency and out.running >= s.concurrency)
     or (s.rate_jobs and full(P .. ':rate', s.rate_jobs, s.rate_per)) then
    out.held_back = out.length
  elseif s.group_concurrency or s.group_rate_jobs then
    local looked = 0
    for _, priority in ipairs(redis.call('ZRANGE', P .. ':priorities', 0, -1)) do
      for _, group in ipairs(redis.call('LRANGE', P .. ':groups:' .. priority, 0,
                                        SCAN_MAX - looked - 1)) do
        looked = looked + 1
        if (s.group_concurrency and (tonumber(redis.call('HGET', P .. ':group_running', group))
                                     or 0) >= s.group_concurrency)
           or (s.group_rate_jobs and full(P .. ':rate:' .. group, s.group_rate_jobs,
                                          s.group_rate_per)) then
          out.held_back = out.held_back + redis.call('LLEN', ready_key(priority, group))
        end
      end
    end
  end
  return out
end
-- Start the job the slot whose list is `processing` takes: {id, input, attempt}, and its
-- `worker` field the slot; or {false, why} if none may start now: why is EMPTY (no job is
-- queued), HELD (jobs are, but a pause or a concurrency limit holds them back: a wake-up comes
-- when that changes), or the milliseconds until a rate limit lets one start. With claim, the
-- slot then holds the queue's timer (it waits exactly that long; the other slots wait for a
-- wake-up meanwhile) or, if another slot holds it, gets HELD. The highest priority first; in
-- it, the groups in turn (those held back by their limits skipped); in a group, first in first
-- out. Run again after a lost reply, it returns the job it started.
local EMPTY, HELD = -1, -2
local function take(processing, claim)
  local slot = string.sub(processing, #P + 13)  -- after '<prefix>:processing:'
  local held = redis.call('LINDEX', processing, 0)
  if held then
    local f = redis.call('HMGET', job_key(held), 'status', 'worker', 'input', 'attempts')
    if f[1] == 'running' and f[2] == slot then return {held, f[3], tonumber(f[4])} end
    redis.call('LREM', processing, 0, held)  -- a stray (a worker before this take's time)
    if f[1] == 'queued' then push(held, true) end
  end
  if redis.call('EXISTS', P .. ':priorities') == 0 then  -- no job is queued
    redis.call('DEL', P .. ':wake')
    return {false, EMPTY}
  end
  local s, timer = settings(), P .. ':timer'
  local _, score = clock()
  local now, wait = tonumber(score), EMPTY
  local looked = 0
  if s.paused or (s.concurrency and redis.call('ZCARD', P .. ':index:running') >= s.concurrency)
  then
    wait = HELD
  elseif s.rate_jobs then
    wait = rate_wait(P .. ':rate', s.rate_jobs, s.rate_per, now)
  end
  if wait == 0 or wait == EMPTY then
    wait = EMPTY
    for _, priority in ipairs(redis.call('ZRANGE', P .. ':priorities', '+inf', '-inf', 'BYSCORE',
                                         'REV')) do
      local ring = P .. ':groups:' .. priority
      for _ = 1, redis.call('LLEN', ring) do
        if looked >= SCAN_MAX then break end
        local group = redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
        if not group then break end
        looked = looked + 1
        local free = 0
        if s.group_concurrency and (tonumber(redis.call('HGET', P .. ':group_running', group))
                                    or 0) >= s.group_concurrency then
          free = HELD
        elseif s.group_rate_jobs then
          free = rate_wait(P .. ':rate:' .. group, s.group_rate_jobs, s.group_rate_per, now)
        end
        local list = ready_key(priority, group)
        while free == 0 and looked < SCAN_MAX do  -- the group's first job that may start
          local id = redis.call('RPOP', list)
          if not id then break end
          looked = looked + 1
          local key = job_key(id)
          local f = redis.call('HMGET', key, 'status', 'input', 'expires_at')
          local deadline = f[3] and redis.call('ZSCORE', P .. ':expiry', id)
          if deadline then  -- its first start: from now on it cannot expire
            redis.call('ZREM', P .. ':expiry', id)
            if f[1] == 'queued' and tonumber(deadline) * 1e6 < now then
              expire(id)
              f[1] = 'expired'
            end
          end
          if f[1] == 'queued' then  -- else a leftover (ended meanwhile): dropped
            drop(priority, group)
            redis.call('LPUSH', processing, id)
            bump(id, 'running')
            redis.call('HSET', key, 'worker', slot)
            local attempt = redis.call('HINCRBY', key, 'attempts', 1)
            if s.rate_jobs then started(P .. ':rate', s.rate_per, now, id, attempt) end
            if s.group_rate_jobs then
              started(P .. ':rate:' .. group, s.group_rate_per, now, id, attempt)
            end
            emit(id)
            if redis.call('GET', timer) == slot then redis.call('DEL', timer) end
            if redis.call('EXISTS', P .. ':priorities') == 1 then wake(1) end  -- more
            return {id, f[2], attempt}
          end
        end
        drop(priority, group)
        if free == HELD and wait == EMPTY then
          wait = HELD
        elseif free > 0 and (wait <= 0 or free < wait) then
          wait = free
        end
      end
    end
    if looked >= SCAN_MAX and wait <= 0 then wait = 1000 end  -- more groups: look again in 1 s
  end
  redis.call('DEL', P .. ':wake')  -- none may start: the tokens would wake slots for nothing
  if wait > 0 and claim then  -- one slot waits for the limit to free; the others for a wake-up
    local holder = redis.call('GET', timer)
    if holder and holder ~= slot then return {false, HELD} end
    redis.call('SET', timer, slot, 'PX', wait + 250)
  end
  return {false, wait}
end
""".replace("DEAD_MAX", str(DEAD_MAX)).replace("WAKE_MAX", str(WAKE_MAX)).replace(
    "SCAN_MAX", str(SCAN_MAX))

# KEYS: queue. ARGV: (prefix, now, retention), due (unix time, or '' to queue now), expires
# (the unix time by which each must have started, or ''), idempotency key ('' for none: else a
# digest of the client's key), the request's digest, how long (s) the key is kept, then jobs
# as add_jobs() takes them (from ARGV[9]). Stores and queues (or delays) them all in one step,
# or none: refused before it runs while Redis refuses writes. Returns {0} once stored; with a
# key seen before, stores nothing and returns {1, ids} if the digest is the same (a replay),
# {2, ids} if not (ids: the first request's, comma-separated). Sent again (a client's retry
# after a lost reply), it leaves the jobs it already stored alone.
SUBMIT = WRITES + LUA_PRELUDE + """
local key = ARGV[6] ~= '' and P .. ':idempotency:' .. ARGV[6]
local seen = key and redis.call('GET', key)
if seen then
  local digest, ids = string.match(seen, '^(%S+) (.*)$')
  return {digest == ARGV[7] and 1 or 2, ids}
end
local ids = add_jobs(9, ARGV[4], ARGV[5])
if key then redis.call('SET', key, ARGV[7] .. ' ' .. table.concat(ids, ','), 'EX', ARGV[8]) end
return {0}
"""
# Writes nothing, but declares that it may: Redis refuses it exactly when it refuses a submit.
WRITABLE = WRITES + "return 1"

# KEYS: the slot's processing list. ARGV: (prefix, now, retention), claim (1/0: hold the timer
# if a rate limit is full). Starts the next job the slot may take (see take()): {id, input,
# attempt}, or {nil, why}. Refused while Redis is full, as a push would be: the job waits for
# memory.
TAKE = WRITES + LUA_PRELUDE + """
return take(KEYS[1], ARGV[4] == '1')
"""

# KEYS: job, processing, queue. ARGV: (prefix, now, retention), id, outcome (done, failed,
# retry, later, cancelled), result, error, due (unix; retry, later), run_at (RFC 3339; retry,
# later), take next (1/0), attempt, run time (seconds), its histogram bucket. Returns {held,
# next}: held is 0 if the slot no longer holds this try of the job (reclaimed, or recorded by
# the keeper: timed out, cancelled); next is what TAKE returns for the slot's next job, in the
# same round trip, or nil: not asked for. `later` (the handler raised RetryLater) delays the
# job without counting the try. A job asked to stop ends `cancelled`, whatever the try's
# outcome. Registered twice: with WRITES to take the next job, and with ALLOW_OOM to finish
# alone when Redis is full (a new job waits for memory).
FINISH = LUA_PRELUDE + """
local id, outcome = ARGV[4], ARGV[5]
local held = 0
if redis.call('HGET', KEYS[1], 'attempts') == ARGV[11] then
  held = redis.call('LREM', KEYS[2], 1, id)
end
if held == 1 then
  if redis.call('HEXISTS', KEYS[1], 'cancel_requested') == 1 then outcome = 'cancelled' end
  if outcome == 'retry' or outcome == 'later' then
    bump(id, 'delayed')
    redis.call('HSET', KEYS[1], 'error', ARGV[7], 'run_at', ARGV[9])
    redis.call('ZADD', P .. ':delayed', ARGV[8], id)
    if outcome == 'later' then
      redis.call('HINCRBY', KEYS[1], 'attempts', -1)
    else
      count('retried')
    end
  elseif outcome == 'failed' then
    fail(id, ARGV[7])
  elseif outcome == 'cancelled' then
    ended(id, 'cancelled')
  else
    ended(id, 'done')
    redis.call('HSET', KEYS[1], 'result', ARGV[6], 'error', '')
  end
  redis.call('HINCRBY', P .. ':runtime', ARGV[13], 1)
  redis.call('HINCRBY', P .. ':runtime', 'count', 1)
  redis.call('HINCRBYFLOAT', P .. ':runtime', 'sum', ARGV[12])
  emit(id)
end
if ARGV[10] == '1' then return {held, take(KEYS[2], false)} end
if held == 1 and redis.call('EXISTS', P .. ':priorities') == 1 then wake(1) end  -- a limit freed
return {held, false}
"""

# KEYS: queue. ARGV: (prefix, now, retention), now (unix), max attempts (0: no limit), scan
# (1/0), worker ('' or the name whose stop requests to return), then slots whose jobs to give
# back (a cold stop's). Puts back, first in their priority and group, the unfinished jobs of
# those slots and, with scan, of every slot whose worker's lease expired (which also leave the
# set of slots), failing those out of attempts and cancelling those asked to stop; queues the
# delayed jobs that are due. Returns {requeued, queued from
# delayed, ids of the worker's running jobs asked to stop}. A slot is named <worker>/<n>.
RECLAIM = ALLOW_OOM + LUA_PRELUDE + """
local max, moved = tonumber(ARGV[5]), 0
local scan, idle, lost, alive = ARGV[6] == '1', {}, {}, {}
for i = 8, #ARGV do idle[ARGV[i]] = true end
for _, w in ipairs(scan and redis.call('SMEMBERS', P .. ':workers') or {}) do
  local owner = string.match(w, '^(.+)/%d+$') or w
  if alive[owner] == nil then
    alive[owner] = redis.call('EXISTS', P .. ':lease:' .. owner) == 1
  end
  if not idle[w] and not alive[owner] then lost[#lost + 1] = w end
end
local function requeue(w)
  local processing = P .. ':processing:' .. w
  for _, id in ipairs(redis.call('LRANGE', processing, 0, -1)) do
    local key = job_key(id)
    local f = redis.call('HMGET', key, 'status', 'attempts', 'cancel_requested', 'worker')
    local status, attempts = f[1], tonumber(f[2]) or 0
    if status == 'running' and f[4] ~= w then
      status = 'stray'  -- a duplicate entry of a job another slot runs: dropped
    elseif status == 'running' and f[3] then
      ended(id, 'cancelled')
    elseif status == 'running' and max > 0 and attempts >= max then
      fail(id, 'worker ' .. w .. ' stopped on the last attempt')
    elseif status == 'running' or status == 'queued' then
      if status == 'running' then
        bump(id, 'queued')
        redis.call('HSET', key, 'error', 'worker ' .. w .. ' stopped before finishing; retrying')
        count('retried')
      end
      push(id, true)
    end
    if status == 'running' then emit(id) end
    if status == 'running' or status == 'queued' then moved = moved + 1 end
  end
  redis.call('DEL', processing)
end
for w in pairs(idle) do requeue(w) end
for _, w in ipairs(lost) do
  requeue(w)
  redis.call('SREM', P .. ':workers', w)
  redis.call('DEL', P .. ':stop:' .. owner(w))
end
local due = scan and redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', ARGV[4], 'LIMIT', 0,
                                1000) or {}
for _, id in ipairs(due) do
  redis.call('ZREM', P .. ':delayed', id)
  local status = redis.call('HGET', job_key(id), 'status')
  if status == 'delayed' then
    bump(id, 'queued')
    emit(id)
  end
  if status == 'delayed' or status == 'queued' then push(id) end
end
if moved + #due > 0 then wake(moved + #due) end
if scan then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', ARGV[4], 'LIMIT', 0,
                                 1000)) do  -- queued past their time: none takes them now
    local status = redis.call('HGET', job_key(id), 'status')
    if status ~= 'delayed' then  -- (one due but not yet moved to the queue: the next round)
      redis.call('ZREM', P .. ':expiry', id)
    end
    if status == 'queued' then
      unqueue(id)
      expire(id)
    end
  end
  -- Jobs on the queue's own list that no ring names (pushed there by a server older than
  -- priorities) are found; and should a wake-up have been lost (a slot killed between popping
  -- it and taking), queued jobs that may start wake a slot.
  if redis.call('EXISTS', KEYS[1]) == 1 and not redis.call('LPOS', P .. ':groups:5', '') then
    redis.call('LPUSH', P .. ':groups:5', '')
    redis.call('ZADD', P .. ':priorities', 5, 5)
  end
  local s = settings()
  if redis.call('EXISTS', P .. ':priorities') == 1 and not s.paused
     and redis.call('EXISTS', P .. ':timer') == 0
     and not (s.concurrency and redis.call('ZCARD', P .. ':index:running') >= s.concurrency) then
    wake(1)
  end
end
local stop = ARGV[7] ~= '' and redis.call('SMEMBERS', P .. ':stop:' .. ARGV[7]) or {}
return {moved, #due, stop}
"""

# KEYS: lease. ARGV: (prefix, now, retention), lease in ms, host, pid, concurrency, started,
# then the worker's slots. Renews the lease (a hash saying who the worker is and when it was
# last heard of) and (re-)registers the slots.
LEASE = ALLOW_OOM + LUA_PRELUDE + """
redis.call('HSET', KEYS[1], 'host', ARGV[5], 'pid', ARGV[6], 'concurrency', ARGV[7],
           'started', ARGV[8], 'heartbeat', NOW)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', P .. ':workers', unpack(ARGV, 9))
"""

# KEYS: job. ARGV: (prefix, now, retention), id. A queued or delayed job is taken off the queue
# or the delayed set and ends `cancelled`; a running one gets `cancel_requested` and its id is
# handed to its worker (which stops it within a second, and records it, or, should that worker
# be dead, whoever reclaims its jobs does). Returns the status it had ('' if no such job).
CANCEL = ALLOW_OOM + LUA_PRELUDE + """
local id = ARGV[4]
local f = redis.call('HMGET', KEYS[1], 'status', 'worker', 'cancel_requested')
local status = f[1] or ''
if status == 'queued' or status == 'delayed' then
  unqueue(id)
  redis.call('ZREM', P .. ':delayed', id)
  redis.call('ZREM', P .. ':expiry', id)
  ended(id, 'cancelled')
  emit(id)
elseif status == 'running' then
  if not f[3] then redis.call('HSET', KEYS[1], 'cancel_requested', NOW) end
  local stop = P .. ':stop:' .. owner(f[2])
  redis.call('SADD', stop, id)
  redis.call('EXPIRE', stop, RETENTION)
end
return status
"""

# KEYS: queue. ARGV: (prefix, now, retention), id, or '' for every job on the dead-letter list.
# Puts a failed or cancelled job back on the queue with its attempts reset. Returns the status
# it had ('' if no such job) for one, and how many went back for all.
RETRY = WRITES + LUA_PRELUDE + """
local function retry(id, one)
  local key = job_key(id)
  local status = redis.call('HGET', key, 'status') or ''
  if status == 'failed' or status == 'cancelled' then
    if one then redis.call('LREM', P .. ':dead', 0, id) end
    redis.call('PERSIST', key)
    redis.call('PERSIST', P .. ':history:' .. id)
    bump(id, 'queued')
    redis.call('HSET', key, 'attempts', 0, 'result', '', 'error', '')
    redis.call('HDEL', key, 'cancel_requested', 'run_at')
    push(id)
    wake(1)
    count('retried')
    emit(id)
  end
  return status
end
if ARGV[4] ~= '' then return retry(ARGV[4], true) end
local retried = 0
for _, id in ipairs(redis.call('LRANGE', P .. ':dead', 0, -1)) do
  if retry(id, false) == 'failed' then retried = retried + 1 end
end
redis.call('DEL', P .. ':dead')
return retried
"""

# KEYS: queue. ARGV: (prefix, now, retention), then field-value pairs of the queue's settings
# ('' removes one): paused (1), concurrency, group_concurrency, rate_jobs and rate_per,
# group_rate_jobs and group_rate_per. Idle slots wake to take what the change lets start.
SETTINGS = WRITES + LUA_PRELUDE + """
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', P .. ':settings', ARGV[i])
  else
    redis.call('HSET', P .. ':settings', ARGV[i], ARGV[i + 1])
  end
end
redis.call('DEL', P .. ':timer')  -- a wait for a limit that may have changed
wake(WAKE_MAX)
""".replace("WAKE_MAX", str(WAKE_MAX))

# KEYS: queue. ARGV: (prefix, now, retention). describe() as JSON.
QUEUE = READS + LUA_PRELUDE + """
return cjson.encode(describe())
"""

# Schedules: each in the slot of the queue its jobs go to, a hash {prefix}:schedule:<name>
# (next_run: the unix time of its next tick, as text), and in that queue's {prefix}:schedules
# sorted set (names by next_run); the registry {jobs}:schedules (name -> queue) lists them all.

# KEYS: queue. ARGV: (prefix, now, retention), name, replace (1: the whole schedule; 0: the
# fields given, if the schedule exists), then field-value pairs (next_run among them).
# Returns whether it was written.
SCHEDULE = WRITES + LUA_PRELUDE + """
local key = P .. ':schedule:' .. ARGV[4]
if ARGV[5] == '1' then
  redis.call('DEL', key)
elseif redis.call('EXISTS', key) == 0 then
  return 0
end
redis.call('HSET', key, unpack(ARGV, 6))
redis.call('ZADD', P .. ':schedules', redis.call('HGET', key, 'next_run'), ARGV[4])
return 1
"""

# KEYS: queue. ARGV: (prefix, now, retention), name. Deletes the schedule; returns whether
# there was one.
UNSCHEDULE = WRITES + LUA_PRELUDE + """
redis.call('ZREM', P .. ':schedules', ARGV[4])
return redis.call('DEL', P .. ':schedule:' .. ARGV[4])
"""

# KEYS: a lock. ARGV: its holder's token. Deletes it if that holder still holds it.
UNLOCK = ALLOW_OOM + """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

# KEYS: queue. ARGV: (prefix, now, retention), now (unix). The queue's schedules whose tick is
# due, each {name, field, value, ...}, after the time of the next tick of the others ('' if
# none); with the default queue's prefix, first the registry of schedules {name, queue, ...}.
DUE = READS + LUA_PRELUDE + """
local registry = redis.call('HGETALL', P .. ':schedules:registry')
local out = {registry, ''}
local later = redis.call('ZRANGEBYSCORE', P .. ':schedules', '(' .. ARGV[4], '+inf', 'WITHSCORES',
                         'LIMIT', 0, 1)
if later[2] then out[2] = later[2] end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', P .. ':schedules', '-inf', ARGV[4], 'LIMIT', 0,
                                 100)) do
  local f = redis.call('HGETALL', P .. ':schedule:' .. name)
  table.insert(f, 1, name)
  out[#out + 1] = f
end
return out
"""

# KEYS: queue. ARGV: (prefix, now, retention), name, the next_run its caller read, the one
# after it, expires (as SUBMIT's), then one job as add_jobs() takes them (from ARGV[8]). Makes
# the tick's job, and moves the schedule to its next tick, only if the schedule is still at the
# tick its caller read: any number of processes may try a tick, and exactly one makes its job.
# A paused schedule moves on and makes none; so does one with overlap "skip" whose last job
# has not ended. Returns 1 if it made the job.
SCHEDULE_TICK = WRITES + LUA_PRELUDE + """
local key = P .. ':schedule:' .. ARGV[4]
local f = redis.call('HMGET', key, 'next_run', 'paused', 'overlap', 'last_job')
if f[1] ~= ARGV[5] then return 0 end  -- made by another process, or the schedule changed
redis.call('HSET', key, 'next_run', ARGV[6])
redis.call('ZADD', P .. ':schedules', ARGV[6], ARGV[4])
if f[2] == '1' then return 0 end
if f[3] == 'skip' and f[4] then
  local status = redis.call('HGET', job_key(f[4]), 'status')
  if status == 'queued' or status == 'delayed' or status == 'running' then
    redis.call('HINCRBY', key, 'skipped', 1)
    return 0
  end
end
redis.call('HSET', key, 'last_job', add_jobs(8, '', ARGV[7])[1])
redis.call('HINCRBY', key, 'runs', 1)
return 1
"""

# KEYS: the index of a state. ARGV: (prefix, now, retention), the score and the id of the last
# job of the previous page ('+inf' and '' for the first page), limit. The next page of that
# state's jobs, newest first: {{id, field, value, ...}, ...}, plus the cursor of the page after
# as a last element {score, id} when there is one. Jobs whose hash has expired are skipped (a
# page ends early, with a cursor, after 2,000 entries looked at: an index left by eviction). Cuts
# input and result to 256 bytes (at a UTF-8 character boundary).
LIST = READS + LUA_PRELUDE + """
local max, after, limit = ARGV[4], ARGV[5], tonumber(ARGV[6])
local fields = {'status', 'input', 'result', 'error', 'attempts', 'created', 'updated', 'version',
                'run_at', 'worker', 'cancel_requested', 'priority', 'group', 'progress'}
local function cut(s)
  if #s <= 256 then return s end
  local n = 256
  while n > 0 and string.byte(s, n + 1) >= 128 and string.byte(s, n + 1) < 192 do n = n - 1 end
  return string.sub(s, 1, n)
end
local jobs, offset, cursor, seen = {}, 0, nil, 0
while #jobs <= limit do
  local batch = redis.call('ZRANGE', KEYS[1], max, '-inf', 'BYSCORE', 'REV', 'LIMIT', offset,
                           limit + 1 - #jobs, 'WITHSCORES')
  if #batch == 0 then break end
  offset = offset + #batch / 2
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    if seen == 2000 then  -- so many expired: end the page early, with where to go on
      jobs[#jobs + 1] = cursor or {max, after}
      return jobs
    end
    seen = seen + 1
    if not (score == max and id >= after) then  -- a tie the previous page ended in
      local f = redis.call('HMGET', job_key(id), unpack(fields))
      if f[1] and #jobs < limit then
        local job = {id}
        for j, name in ipairs(fields) do
          if f[j] then
            job[#job + 1] = name
            job[#job + 1] = (name == 'input' or name == 'result') and cut(f[j]) or f[j]
          end
        end
        jobs[#jobs + 1] = job
      elseif f[1] then
        jobs[#jobs + 1] = cursor  -- there is more: end with the cursor of this page's last
        return jobs
      end
      cursor = {score, id}
    end
  end
end
return jobs
"""

# KEYS: queue. ARGV: (prefix, now, retention). The numbers of /stats and /metrics as JSON.
STATS = READS + LUA_PRELUDE + """
local seconds, score = clock()
local out = {jobs = {}, totals = {}, minutes = {}, workers = {}, runtime = {}}
for _, s in ipairs({'queued', 'delayed', 'running', 'done', 'failed', 'cancelled'}) do
  out.jobs[s] = redis.call('ZCARD', P .. ':index:' .. s)
end
local queue = describe()
out.queue_length, out.paused, out.held_back = queue.length, queue.paused, queue.held_back
out.delayed = redis.call('ZCARD', P .. ':delayed')
out.dead_letter = redis.call('LLEN', P .. ':dead')
local oldest = redis.call('ZRANGE', P .. ':index:queued', 0, 0, 'WITHSCORES')
out.oldest_queued_age = oldest[2] and (tonumber(score) - tonumber(oldest[2])) / 1e6 or false
local totals = redis.call('HGETALL', P .. ':counters')
for i = 1, #totals, 2 do out.totals[totals[i]] = tonumber(totals[i + 1]) end
local runtime = redis.call('HGETALL', P .. ':runtime')
for i = 1, #runtime, 2 do out.runtime[runtime[i]] = tonumber(runtime[i + 1]) end
local minute = math.floor(seconds / 60)
for m = minute - 59, minute do
  local f = redis.call('HMGET', P .. ':minute:' .. m, 'done', 'failed')
  out.minutes[#out.minutes + 1] = {m * 60, tonumber(f[1]) or 0, tonumber(f[2]) or 0}
end
local owners = {}
for _, w in ipairs(redis.call('SMEMBERS', P .. ':workers')) do
  local owner = string.match(w, '^(.+)/%d+$') or w
  if owners[owner] == nil then
    local key = P .. ':lease:' .. owner  -- a hash (a worker older than /stats: a string)
    local lease = redis.call('TYPE', key).ok == 'hash' and redis.call('HGETALL', key) or {}
    owners[owner] = false
    if #lease > 0 then
      local worker = {name = owner, running = {}}
      for i = 1, #lease, 2 do worker[lease[i]] = lease[i + 1] end
      owners[owner] = worker
      out.workers[#out.workers + 1] = worker
    end
  end
  local job = owners[owner] and redis.call('LINDEX', P .. ':processing:' .. w, 0)
  if job then table.insert(owners[owner].running, job) end
end
return cjson.encode(out)
"""


# -- a running job's progress and output (issue 17) ------------------------------------------

# KEYS: job, its history (Keys.history). ARGV: (prefix, now, retention), id, attempt, slot,
# the history's bound (bytes of progress and output kept), the output's bytes (counted in
# output_bytes), the job's newest progress as JSON ('' if none here), then the messages, each
# a JSON object without its end: `seq` is added here (each message ends `"seq":` before it).
# Appends them to the history, numbered on from the job's states, and publishes each; past the
# bound, the oldest messages go (never the newest). Only the try that runs now writes: 0 if
# this one no longer is the job's (ended, timed out, reclaimed), else the last seq. Refused
# while Redis refuses writes (full): the pieces are lost, the job carries on.
OUTPUT = WRITES + LUA_PRELUDE + """
local f = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'worker', 'seq', 'output_seq')
if f[1] ~= 'running' or f[2] ~= ARGV[5] or f[3] ~= ARGV[6] then return 0 end
materialize(ARGV[4])  -- a job that streams keeps every message
if (tonumber(f[5]) or 0) < tonumber(f[4]) then  -- the last message was a state: its number
  redis.call('HSET', KEYS[1], 'state_seq', f[4])
end
local added, seq = 0, 0
for i = 10, #ARGV do
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local m = ARGV[i] .. seq .. '}'
  redis.call('RPUSH', KEYS[2], m)
  redis.call('SPUBLISH', P .. ':events', m)
  added = added + #m
end
redis.call('HSET', KEYS[1], 'output_seq', seq)
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[9]) end
if tonumber(ARGV[8]) > 0 then count('output_bytes', tonumber(ARGV[8])) end
local max, stored = tonumber(ARGV[7]), redis.call('HINCRBY', KEYS[1], 'stored', added)
if stored > max then  -- drop the oldest until what is left fits (the newest always stays)
  local dropped = 0
  while stored > max and redis.call('LLEN', KEYS[2]) > 1 do
    local m = redis.call('LPOP', KEYS[2])
    if string.find(m, '^{"type":"[op]') then stored = stored - #m end  -- progress, output
    dropped = dropped + 1
  end
  redis.call('HSET', KEYS[1], 'stored', stored)
  redis.call('HINCRBY', KEYS[1], 'dropped', dropped)
end
return seq
"""

# KEYS: job, its history. ARGV: (prefix, now, retention), id, after, count. The job's
# messages after number `after`, at most `count` of them: {number of the first given, message,
# ...} ({} if there is no job). The first may be later than after + 1: those between were
# dropped (see OUTPUT). A lazy job's are rebuilt (see emit()).
HISTORY = READS + LUA_PRELUDE + """
local f = redis.call('HMGET', KEYS[1], 'status', 'dropped', 'lazy')
if not f[1] then return {} end
local dropped = tonumber(f[2]) or 0
local first, count = math.max(tonumber(ARGV[5]) + 1, dropped + 1), tonumber(ARGV[6])
local out = {first}
local from = first - dropped - 1
local messages = f[3] and rebuilt(ARGV[4], first, first + count - 1)  -- a lazy job's
                 or redis.call('LRANGE', KEYS[2], from, from + count - 1)
for _, m in ipairs(messages) do out[#out + 1] = m end
return out
"""

def settings_of(flat: dict[str, Any]) -> dict[str, Any]:
    """A queue's settings as the API shows them, from its settings hash (or QUEUE's JSON)."""
    def number(name: str) -> int | float | None:
        value = flat.get(name)
        return None if value is None else int(float(value)) if float(value).is_integer() \
            else float(value)
    shown: dict[str, Any] = {}
    for name in ("rate_limit", "concurrency", "group_rate_limit", "group_concurrency"):
        if name in LIMITS:
            shown[name] = number(name)
        else:
            stem = name.removesuffix("_limit")
            jobs, per = number(f"{stem}_jobs"), number(f"{stem}_per")
            shown[name] = None if jobs is None else {"jobs": jobs, "per": per}
    return shown


def settings_fields(changes: dict[str, Any]) -> list[str | int | float]:
    """SETTINGS' field-value pairs for a PUT /queues/NAME body; ValueError says what is wrong
    (and then nothing may be changed)."""
    fields: list[str | int | float] = []
    for name, value in changes.items():
        if name in LIMITS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= 1_000_000):
                raise ValueError(f'"{name}" must be a whole number from 1 to 1000000, or null')
            fields += [name, "" if value is None else value]
        elif name in RATE_LIMITS:
            stem = name.removesuffix("_limit")
            if value is None:
                fields += [f"{stem}_jobs", "", f"{stem}_per", ""]
                continue
            jobs, per = (value.get("jobs"), value.get("per")) if isinstance(value, dict) \
                else (None, None)
            if not isinstance(value, dict) or set(value) != {"jobs", "per"} \
                    or isinstance(jobs, bool) or not isinstance(jobs, int) \
                    or not 1 <= jobs <= 100_000 or isinstance(per, bool) \
                    or not isinstance(per, int | float) or not 0.001 <= per <= 86_400:
                raise ValueError(f'"{name}" must be {{"jobs": J, "per": S}} (J a whole number '
                                 f'from 1 to 100000, S seconds from 0.001 to 86400), or null')
            fields += [f"{stem}_jobs", jobs, f"{stem}_per", per]
        else:
            raise ValueError(f'unknown setting "{name}"; a queue takes rate_limit, '
                             f'concurrency, group_rate_limit and group_concurrency')
    return fields


# -- jobs as SUBMIT stores them ----------------------------------------------------------------

# What a submit may ask for, checked the same for POST /submit and client.enqueue: ValueError
# says what is wrong, in words a user can act on.
MAX_DELAY = 366 * 86_400  # seconds a job may be delayed at most (or expire in, at most)
RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:([0-9]{2})(\.[0-9]+)?"
                     r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")  # fromisoformat takes more


def texts_of(data: dict[str, object]) -> list[str]:
    """The inputs of a submit: {"input": "..."} or {"inputs": ["...", ...]}."""
    if "inputs" in data:
        texts = data["inputs"]
        if "input" in data:
            raise ValueError('give "input" or "inputs", not both')
        if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_BULK:
            raise ValueError(f'"inputs" must be a list of 1 to {MAX_BULK} strings')
    else:
        texts = [data.get("input")]
    for text in texts:
        if not isinstance(text, str):
            name = '"input"' if "inputs" not in data else 'every one of "inputs"'
            raise ValueError(f"{name} is missing or not a string")
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError("an input is not valid Unicode (lone surrogate)") from None
    return texts  # type: ignore[return-value]  # checked above


def priority_of(data: dict[str, object]) -> int:
    """A submit's "priority": a whole number from 1 to 9 (higher starts first), 5 if none."""
    priority = data.get("priority")
    if priority is None:
        return DEFAULT_PRIORITY
    if isinstance(priority, bool) or not isinstance(priority, int) or priority not in PRIORITIES:
        raise ValueError(f'"priority" must be a whole number from '
                                        f'{PRIORITIES[0]} to {PRIORITIES[-1]} (higher starts '
                                        f'first; default {DEFAULT_PRIORITY})')
    return priority


def group_of(data: dict[str, object]) -> str | None:
    """A submit's "group": 1 to 128 characters A-Z, a-z, 0-9, _ . : and -; None if none."""
    group = data.get("group")
    if group is not None and not (isinstance(group, str) and GROUP_NAME.fullmatch(group)):
        raise ValueError('"group" must be 1 to 128 characters A-Z, a-z, 0-9, '
                                        '_ . : and -')
    return group


def expires_of(data: dict[str, object]) -> float | None:
    """A submit's "expires_in": seconds (above 0) by which its jobs must have started (counted
    from when they are due), or they end cancelled; None if not given."""
    expires_in = data.get("expires_in")
    if expires_in is None:
        return None
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) \
            or not 0 < expires_in <= MAX_DELAY:
        raise ValueError(
                    f'"expires_in" must be a number of seconds above 0, at most {MAX_DELAY}')
    return float(expires_in)


def due_of(data: dict[str, object]) -> float | None:
    """When a submit wants its jobs to run (unix time), if later: "delay" seconds from now,
    or "run_at" an RFC 3339 time with an offset."""
    delay, run_at = data.get("delay"), data.get("run_at")
    if delay is not None and run_at is not None:
        raise ValueError('give "delay" or "run_at", not both')
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | float) \
                or not 0 <= delay <= MAX_DELAY:
            raise ValueError(
                        f'"delay" must be a number of seconds from 0 to {MAX_DELAY}')
        return time.time() + delay
    if run_at is not None:
        due = None
        if isinstance(run_at, str) and (match := RFC3339.fullmatch(run_at)):
            leap = match[1] == "60"  # RFC 3339 has leap seconds (datetime has not): :59 + 1 s
            with contextlib.suppress(ValueError):
                due = datetime.fromisoformat(
                    (run_at[:17] + "59" + run_at[19:] if leap else run_at).upper()
                ).timestamp() + leap
        if due is None:
            raise ValueError('"run_at" must be an RFC 3339 time with an offset, like '
                             '2026-12-01T09:30:00+01:00')
        if due > time.time() + MAX_DELAY:
            raise ValueError(f'"run_at" must be within {MAX_DELAY} s from now')
        return max(due, 0.0)  # past: due now (before 1970: stored as 1970)
    return None


class Submission(NamedTuple):
    """What a submit asks for (a POST /submit body, or client.enqueue's arguments), checked."""

    texts: list[str]
    due: float | None
    priority: int
    group: str | None
    expires_in: float | None

    @classmethod
    def of(cls, data: dict[str, object]) -> Submission:
        """ValueError says what is wrong."""
        return cls(texts_of(data), due_of(data), priority_of(data), group_of(data),
                   expires_of(data))


def new_jobs(texts: list[str], due: float | None = None, queue: str = DEFAULT_QUEUE,
             priority: int = DEFAULT_PRIORITY, group: str | None = None,
             expires_in: float | None = None) -> list[dict[str, str | int]]:
    """Jobs as first stored: every field there, queued (or delayed until `due`), version 1;
    `group` only when they have one; with `expires_in`, when they must have started by (from
    now, or from `due`)."""
    created = now()
    fields: dict[str, str | int] = {
        "queue": queue, "status": "queued" if due is None else "delayed", "result": "",
        "error": "", "attempts": 0, "created": created, "updated": created, "version": 1,
        "seq": 1, "priority": priority}  # seq: its first message (counted by emit(), not stored)
    if group is not None:
        fields["group"] = group
    if due is not None:
        fields["run_at"] = rfc3339(due)
    if expires_in is not None:
        fields["expires_in"] = f"{expires_in:g}"
        fields["expires_at"] = rfc3339((time.time() if due is None else due) + expires_in)
    return [{"id": uuid.uuid4().hex, "input": text, **fields} for text in texts]


def submit_args(prefix: str, retention: int, jobs: list[dict[str, str | int]],
                due: float | None, idempotency: tuple[str, str, int] = ("", "", 0)
                ) -> list[str | int | float]:
    """The SUBMIT script's arguments for these jobs (made by new_jobs with the same due);
    `idempotency`: the digest of the client's key ("" for none), the digest of the request,
    and how long to keep the key."""
    shared = [item for name, value in jobs[0].items() if name not in ("id", "input", "seq")
              for item in (name, value)]
    expires = jobs[0].get("expires_at")
    return [prefix, now(), retention, "" if due is None else due,
            "" if expires is None else datetime.fromisoformat(str(expires)).timestamp(),
            *idempotency, len(shared) // 2, *shared,
            *(item for job in jobs for item in (job["id"], job["input"]))]


def redis_said(exc: Exception) -> str:
    """An error reply as Redis said it (redis-py takes the code off some: OOM, READONLY)."""
    code = getattr(exc, "status_code", None)
    return f"{code} {exc}" if code and not str(exc).startswith(code) else str(exc)

# -- schedules: when the next tick is ------------------------------------------------------

CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
               ("day of week", 0, 7))
CRON_NAMES = {3: ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                  "dec"),
              4: ("sun", "mon", "tue", "wed", "thu", "fri", "sat")}


class Cron(NamedTuple):
    """A 5-field cron expression (minute hour day-of-month month day-of-week, as crontab(5):
    `*`, `a-b`, `*/n`, `a-b/n`, lists, and month and day names; Sunday is 0 or 7; when both
    day fields are restricted, a day matching either runs), in a time zone."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 Monday ... 6 Sunday, as datetime.weekday()
    any_day: bool  # the day-of-month field is *
    any_weekday: bool  # the day-of-week field is *
    zone: ZoneInfo

    @classmethod
    def parse(cls, text: str, zone: str = "UTC") -> Cron:
        """ValueError says what is wrong."""
        try:
            tz = ZoneInfo(zone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(f"{zone!r} is not an IANA time zone (like Europe/Paris)") from None
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(f"{text!r} is not a cron expression of 5 fields "
                             "(minute hour day-of-month month day-of-week)")
        sets = [cron_field(field, n) for n, field in enumerate(fields)]
        weekdays = frozenset((day - 1) % 7 for day in sets[4])  # cron 0/7 Sunday -> 6
        return cls(sets[0], sets[1], sets[2], sets[3], weekdays, fields[2] == "*",
                   fields[4] == "*", tz)

    def day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        in_month, in_week = day.day in self.days, day.weekday() in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def after(self, moment: datetime) -> datetime:
        """The first tick strictly after moment (aware), in the schedule's zone. A local time
        that does not exist that day (the clocks jump over it) is skipped; one that happens
        twice (they go back) runs once, at its first occurrence."""
        start = moment.astimezone(self.zone)
        day = start.date()
        for _ in range(366 * 8):  # Feb 29 on a Monday comes within 28 years; 8 is plenty
            if self.day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        wall = datetime(day.year, day.month, day.day, hour, minute)
                        local = wall.replace(tzinfo=self.zone)  # fold=0: the first occurrence
                        if local.astimezone(UTC).astimezone(self.zone).replace(
                                tzinfo=None) != wall:
                            continue  # in a gap: does not exist that day
                        if local.astimezone(UTC) > moment.astimezone(UTC):
                            return local
            day += timedelta(days=1)
        raise ValueError("this cron expression never matches")


def cron_field(text: str, n: int) -> frozenset[int]:
    """The values one field of a cron expression allows."""
    name, low, high = CRON_FIELDS[n]
    names = CRON_NAMES.get(n, ())

    def value(part: str) -> int:
        if part.lower() in names:
            return names.index(part.lower()) + (1 if n == 3 else 0)
        if not part.isdigit() or not low <= int(part) <= high:
            raise ValueError(f"{part!r} is not a {name} ({low}-{high})")
        return int(part)

    found: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        if step_text and (not step_text.isdigit() or int(step_text) == 0):
            raise ValueError(f"{item!r}: the step must be a whole number above 0")
        step = int(step_text or 1)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (value(end) for end in span.split("-", 1))
            if first > last:
                raise ValueError(f"{item!r}: a range must go upwards")
        else:
            first = value(span)
            last = high if step_text else first
        found.update(range(first, last + 1, step))
    return frozenset(found)


# -- schedules: what PUT /schedules/NAME takes, and each tick's job -----------------------------

OVERLAP = ("allow", "skip")


def schedule_fields(body: dict[str, Any], checked: Callable[[dict[str, Any]], dict[str, Any]]
                    ) -> dict[str, str]:
    """A PUT /schedules/NAME body as the schedule's hash holds it; ValueError says what is
    wrong. `checked` checks the job's own fields (input, queue, priority, group, expires_in)
    as a submit does, returning them."""
    known = {"cron", "timezone", "every", "overlap", "input", "queue", "priority", "group",
             "expires_in"}
    if unknown := sorted(set(body) - known):
        raise ValueError(f'unknown field "{unknown[0]}"; a schedule takes '
                         f'{", ".join(sorted(known))}')
    if ("cron" in body) == ("every" in body):
        raise ValueError('give "cron" (with "timezone" if not UTC) or "every" (seconds), '
                         'one of them')
    fields: dict[str, str] = {}
    if "cron" in body:
        cron, zone = body["cron"], body.get("timezone", "UTC")
        if not isinstance(cron, str) or not isinstance(zone, str):
            raise ValueError('"cron" and "timezone" must be strings')
        Cron.parse(cron, zone)
        fields |= {"cron": cron, "timezone": zone}
    else:
        every = body["every"]
        if "timezone" in body:
            raise ValueError('"timezone" goes with "cron"; "every" counts seconds')
        if isinstance(every, bool) or not isinstance(every, int | float) \
                or not 1 <= every <= 366 * 86_400:
            raise ValueError('"every" must be a number of seconds from 1 to 31622400')
        fields["every"] = f"{every:g}"
    overlap = body.get("overlap", "allow")
    if overlap not in OVERLAP:
        raise ValueError('"overlap" must be "allow" (the default: a tick makes its job even '
                         'while the last one runs) or "skip"')
    fields["overlap"] = overlap
    job = checked(body)
    fields |= {name: str(value) for name, value in job.items() if value is not None}
    return fields


def next_tick(fields: dict[str, str], after: float) -> float:
    """The schedule's first tick strictly after `after` (unix time): a cron's next match in its
    zone, or the next whole multiple of `every` seconds since the epoch."""
    if "every" in fields:
        every = float(fields["every"])
        return (math.floor(after / every) + 1) * every
    cron = Cron.parse(fields["cron"], fields.get("timezone", "UTC"))
    return cron.after(datetime.fromtimestamp(after, UTC)).timestamp()


def tick_args(keys: Keys, name: str, fields: dict[str, str], now_unix: float,
              retention: int) -> list[str | int | float] | None:
    """SCHEDULE_TICK's arguments for the schedule's tick that is due (None if none is): the
    tick read, the next one after now (ticks missed while nothing ran make one job: catch up
    once), and the tick's job, whose id is made of the schedule's name and the tick's time."""
    tick = fields["next_run"]
    if float(tick) > now_unix:
        return None
    job = new_jobs([fields["input"]], None, keys.name, int(fields.get("priority", 5)),
                   fields.get("group"), float(fields["expires_in"])
                   if "expires_in" in fields else None)[0]
    job["id"] = hashlib.sha256(f"{name}@{tick}".encode()).hexdigest()[:32]
    job["schedule"], job["scheduled_for"] = name, rfc3339(float(tick))
    args = submit_args(keys.prefix, retention, [job], None)
    return [*args[:3], name, tick, repr(next_tick(fields, now_unix)), args[4], *args[8:]]


class Ticks(NamedTuple):
    """What a round of ticking does, read from DUE's replies (see plan_ticks)."""

    ticks: list[tuple[Keys, list[str | int | float]]]  # SCHEDULE_TICK's queue, and its arguments
    orphans: list[tuple[Keys, str]]  # schedules left in a queue the registry no longer names
    wait: float  # seconds until a tick is due (1 at most: a PUT may come meanwhile)


def plan_ticks(prefix: str, retention: int, due: dict[str, list[Any]], now_unix: float) -> Ticks:
    """A round of ticking, for any process (workers and servers all tick, and SCHEDULE_TICK
    lets one make each job): `due` has DUE's reply for the default queue and for each queue the
    registry names (queues_to_tick says which)."""
    registry = pairs(due[DEFAULT_QUEUE][0])
    ticks, orphans, wait = [], [], 1.0
    for queue, (_, later, *schedules) in due.items():
        keys = Keys(prefix, queue)
        if later:
            wait = min(wait, max(float(later) - now_unix, 0.0))
        for name, *flat in schedules:
            if registry.get(name) != queue:
                orphans.append((keys, name))
            elif (args := tick_args(keys, name, pairs(flat), now_unix, retention)) is not None:
                ticks.append((keys, args))
    return Ticks(ticks, orphans, wait)


def queues_to_tick(default_reply: list[Any]) -> set[str]:
    """The queues other than the default whose schedules to read: those the registry names."""
    return set(pairs(default_reply[0]).values()) - {DEFAULT_QUEUE}


def pairs(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def schedule_shown(name: str, fields: dict[str, str]) -> dict[str, Any]:
    """A schedule as the API shows it."""
    zone = ZoneInfo(fields.get("timezone", "UTC"))
    shown: dict[str, Any] = {"name": name}
    shown |= ({"cron": fields["cron"], "timezone": fields.get("timezone", "UTC")}
              if "cron" in fields else {"every": float(fields["every"])
                                        if "." in fields["every"] else int(fields["every"])})
    shown |= {"input": fields["input"], "queue": fields.get("queue", DEFAULT_QUEUE),
              "priority": int(fields.get("priority", DEFAULT_PRIORITY)),
              "group": fields.get("group"),
              "expires_in": float(fields["expires_in"]) if "expires_in" in fields else None,
              "overlap": fields.get("overlap", "allow"), "paused": fields.get("paused") == "1",
              "next_run": datetime.fromtimestamp(float(fields["next_run"]), zone).isoformat(),
              "last_job": fields.get("last_job"), "runs": int(fields.get("runs", 0))}
    return shown


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


def addresses(netloc: str) -> tuple[list[tuple[str, int]], str | None]:
    """[:PASSWORD@]HOST:PORT[,HOST:PORT...]: the addresses, and the password if any."""
    userinfo, _, hosts = netloc.rpartition("@")
    found = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not HOST:PORT")
        found.append((host.strip("[]"), int(port)))
    return found, urllib.parse.unquote(userinfo.partition(":")[2]) if userinfo else None


class Sentinel(NamedTuple):
    """A redis+sentinel:// URL: where the sentinels are, and what to ask them for."""

    addresses: list[tuple[str, int]]
    service: str
    db: int
    password: str | None

    @classmethod
    def parse(cls, text: str) -> Sentinel:
        """redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"""
        netloc, _, path = text.removeprefix(SENTINEL_SCHEME).partition("/")
        found, password = addresses(netloc)
        service, _, db = path.partition("/")
        if not service or (db and not db.isdigit()):
            raise ValueError("give the service name, and a database number if any: "
                             "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
        return cls(found, service, int(db or 0), password)


class Cluster(NamedTuple):
    """A redis+cluster:// URL: nodes to ask for the rest (one is enough)."""

    addresses: list[tuple[str, int]]
    password: str | None

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]"""
        netloc, _, path = text.removeprefix(CLUSTER_SCHEME).partition("/")
        if path:
            raise ValueError("a cluster has no databases: redis+cluster://HOST:PORT[,HOST:PORT...]")
        return cls(*addresses(netloc))


SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
WAIT_MS = 1_000  # how long a write waits for --min-replicas replicas to acknowledge it
# A client of one Redis, of the master a Sentinel names, or of a cluster (by key).
Client = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
# What a client raises when Redis is out of reach or refuses. A cluster client raises more than
# RedisError: RedisClusterException while it cannot learn the slots (no node answers), and
# ClusterError once it has followed too many redirections (slots moving).
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
               redis.exceptions.RedisClusterException)


def redis_url(text: str) -> str:
    """An argparse type: a URL redis-py accepts (redis://, rediss://, unix://),
    redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] or
    redis+cluster://HOST:PORT[,HOST:PORT...]."""
    try:
        if text.startswith(SENTINEL_SCHEME):
            Sentinel.parse(text)
        elif text.startswith(CLUSTER_SCHEME):
            Cluster.parse(text)
        else:
            parse_url(text)  # type: ignore[no-untyped-call,unused-ignore]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def connect(url: str, **options: Any) -> Client:
    """A client of the Redis at url; through Sentinel, of the master it names now and after a
    failover (a command during one fails with a ConnectionError, as when Redis is down); of a
    cluster, sending each command to the master of its key's slot (and learning the new one
    after a failover from the error that the old one is gone)."""
    if url.startswith(CLUSTER_SCHEME):
        cluster = Cluster.parse(url)
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(*a)  # type: ignore[no-untyped-call,unused-ignore]
                           for a in cluster.addresses],
            password=cluster.password, **options)
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **options)
    where = Sentinel.parse(url)
    sentinels = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        where.addresses, sentinel_kwargs=SENTINEL_OPTIONS)
    master = sentinels.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        where.service, db=where.db, password=where.password, **options)
    return cast(redis.Redis, master)


def connect_async(url: str, **options: Any) -> AsyncClient:
    """connect() for asyncio; for one Redis and Sentinel, a request waits up to `timeout` s
    for one of its `max_connections` (a cluster has as many per node, and fails at once)."""
    if url.startswith(CLUSTER_SCHEME):
        cluster = Cluster.parse(url)
        options.pop("timeout", None)
        # A command sent before the client knows the slots (at start, or after it has closed
        # its nodes) goes to an arbitrary node, whose MOVED it then follows; by default every
        # 5th MOVED makes it close every connection, the ones that commands are using too.
        # With no retries, those commands fail (ConnectionError, or AttributeError from a
        # socket closed under them): several requests at once after the start did. 0: a MOVED
        # only corrects that slot's node.
        client = redis.asyncio.cluster.RedisCluster(
            startup_nodes=[redis.asyncio.cluster.ClusterNode(*a) for a in cluster.addresses],
            password=cluster.password, reinitialize_steps=0, **options)
        # No parameter takes it: the nodes learnt from now on (all but the seeds) are made with
        # these settings.
        client.connection_kwargs["connection_class"] = ClusterConnection
        return client
    if not url.startswith(SENTINEL_SCHEME):
        return redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool.from_url(
            url, **options))
    where = Sentinel.parse(url)
    sentinels = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        where.addresses, sentinel_kwargs=SENTINEL_OPTIONS)
    master = sentinels.master_for(where.service, db=where.db, password=where.password,
                                  connection_pool_class=BlockingSentinelPool, **options)
    return cast(redis.asyncio.Redis, master)


class ClusterConnection(redis.asyncio.Connection):
    """A connection of the asyncio cluster client. When a command on a node meets a connection
    error (the node died), redis-py (8.1) disconnects that node's idle connections; another
    task may take one of them from the pool meanwhile, and its write then finds the socket gone
    and raises AttributeError, which no caller takes for Redis being unavailable (the server
    answered 500 and logged a traceback). Said as the ConnectionError it is."""

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        if self._writer is None:
            raise redis.ConnectionError("the connection was closed while in use (node lost)")
        await super()._send_packed_command(command)


class BlockingSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool,
                           redis.asyncio.BlockingConnectionPool):
    """Sentinel's pool (the master it names now), waiting up to `timeout` s for a free
    connection, as a redis:// BlockingConnectionPool does, rather than failing at once."""


def moved_or_gone(exc: Exception) -> bool:
    """Whether an error from a cluster node says that its slots are to be learnt again
    (redis-py takes the code off MOVED and ASK, and raises them as their own classes)."""
    return (isinstance(exc, (*UNAVAILABLE, redis.exceptions.AskError))
            or str(exc).startswith(("MOVED", "ASK")))


def refresh(client: Client, after: Exception) -> None:
    """Nodes.refresh() for the sync client."""
    if isinstance(client, redis.cluster.RedisCluster) and moved_or_gone(after):
        with contextlib.suppress(*REDIS_ERRORS):
            client.nodes_manager.initialize()


def on_node(client: Client, key: str) -> redis.Redis:
    """A client of the one node that holds key: the client itself, but on a cluster the node's
    own, for a write and a WAIT that must share a connection."""
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_node_from_key(key)  # type: ignore[no-untyped-call,unused-ignore]
        if node is None:
            raise redis.exceptions.ClusterDownError(f"no node holds the slot of {key}")
        return client.get_redis_connection(node)
    return client


class Nodes:
    """on_node() for asyncio: a client of the one node that holds a key, for a write and a
    WAIT that must share a connection, and for SSUBSCRIBE. After an error there (the node
    died, or the slot moved), refresh() learns the cluster's slots again."""

    def __init__(self, client: AsyncClient, wait: float = 5.0) -> None:
        self.client = client
        self.wait = wait  # seconds a command waits for a free connection to its node
        self.clients: dict[str, redis.asyncio.Redis] = {}  # a cluster's nodes', by name

    async def of(self, key: str) -> redis.asyncio.Redis:
        if not isinstance(self.client, redis.asyncio.cluster.RedisCluster):
            return self.client
        await self.client.initialize()  # once: it learns the slots on first use
        node = self.client.get_node_from_key(key)
        if node is None:
            raise redis.exceptions.ClusterDownError(f"no node holds the slot of {key}")
        if (found := self.clients.get(node.name)) is None:
            self.clients[node.name] = found = redis.asyncio.Redis.from_pool(
                redis.asyncio.BlockingConnectionPool(
                    connection_class=node.connection_class, max_connections=node.max_connections,
                    timeout=self.wait, **node.connection_kwargs))
        return found

    async def refresh(self, after: Exception) -> None:
        """After an error from a node: if it says the node is gone or no longer holds the slot,
        learn the slots again (not after OOM, NOREPLICAS and the like)."""
        if isinstance(self.client, redis.asyncio.cluster.RedisCluster) and moved_or_gone(after):
            with contextlib.suppress(*REDIS_ERRORS):
                await self.client.nodes_manager.initialize()

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


SENTINEL_OPTIONS = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}


def queue_names(text: str) -> list[str]:
    """An argparse type: comma-separated queue names, each [a-z0-9_-]{1,64}."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if not QUEUE_NAME.fullmatch(name):
            raise argparse.ArgumentTypeError(f"{name!r} is not a queue name ([a-z0-9_-]{{1,64}})")
    return list(dict.fromkeys(names))


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
