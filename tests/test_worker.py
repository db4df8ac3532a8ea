"""worker.py: step by step in this process, and as real processes that are signalled and
killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import ROOT, Procs, enqueue, job, processing_keys, wait_until
from worker import RETENTION, Keys, Worker


def run_next(worker: Worker) -> str:
    """Take the next job and run it to its outcome; return its id."""
    taken = worker.take()
    assert taken is not None, "no job was waiting"
    assert worker.process(taken) is None  # nothing chained: heartbeat and maintenance are due
    return taken.id


def lose(worker: Worker) -> None:
    """Make the worker look dead: its lease expires at once."""
    worker.redis.delete(worker.keys.lease(worker.name))


def test_done_job_has_its_result_and_expires(r: redis.Redis, redis_url: str,
                                             prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    job_id = enqueue(r, prefix, "hello world")
    worker.heartbeat()
    run_next(worker)
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["result"], stored["attempts"]) == ("done", "HELLO WORLD", "1")
    keys = Keys(prefix)
    assert 0 < r.ttl(keys.job(job_id)) <= RETENTION
    assert r.llen(keys.processing(worker.name)) == 0
    assert r.llen(keys.queue) == 0


def test_finishing_a_job_takes_the_next_in_the_same_call(r: redis.Redis, redis_url: str,
                                                          prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    first, second = enqueue(r, prefix, "one"), enqueue(r, prefix, "two")
    worker.heartbeat()
    worker.reclaim()  # neither a heartbeat nor maintenance is due now: chaining is allowed
    taken = worker.take()
    assert taken is not None and taken.id == first
    chained = worker.process(taken)
    assert chained is not None and (chained.id, chained.input) == (second, "two")
    assert status_of(r, prefix, second) == "running"
    assert r.lrange(Keys(prefix).processing(worker.name), 0, -1) == [second]
    assert worker.process(chained) is None  # the queue is empty
    assert [job(r, prefix, i)["result"] for i in (first, second)] == ["ONE", "TWO"]


def test_raising_handler_is_retried_then_failed_and_dead_lettered(r: redis.Redis,
                                                                  redis_url: str,
                                                                  prefix: str) -> None:
    def broken(text: str) -> str:
        raise ValueError("broken")

    worker = Worker(redis_url, broken, prefix=prefix, max_attempts=3, backoff=0.0)
    job_id = enqueue(r, prefix, "x")
    keys = Keys(prefix)
    for attempt in (1, 2):
        run_next(worker)
        stored = job(r, prefix, job_id)
        assert (stored["status"], stored["attempts"], stored["error"]) == (
            "queued", str(attempt), "ValueError: broken")
        assert r.zscore(keys.delayed, job_id) is not None  # waiting out its backoff
        assert worker.reclaim() == (0, 1)  # due at once (backoff 0): moved to the queue
    run_next(worker)
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["attempts"], stored["error"]) == (
        "failed", "3", "ValueError: broken")
    assert r.lrange(keys.dead, 0, -1) == [job_id]
    assert r.ttl(keys.job(job_id)) > 0


def test_backoff_doubles(r: redis.Redis, redis_url: str, prefix: str) -> None:
    def broken(text: str) -> str:
        raise ValueError("broken")

    worker = Worker(redis_url, broken, prefix=prefix, max_attempts=5, backoff=10.0)
    job_id = enqueue(r, prefix, "x")
    delays = []
    for _ in range(3):
        before = time.time()
        run_next(worker)
        delays.append(r.zscore(Keys(prefix).delayed, job_id) - before)  # type: ignore[operator]
        r.zadd(Keys(prefix).delayed, {job_id: 0})  # due now
        worker.reclaim()
    assert 8 <= delays[0] <= 12.5 and 16 <= delays[1] <= 24.5 and 32 <= delays[2] <= 48.5


def test_a_handler_may_succeed_on_a_retry(r: redis.Redis, redis_url: str, prefix: str) -> None:
    calls = []

    def flaky(text: str) -> str:
        calls.append(text)
        if len(calls) == 1:
            raise ConnectionError("try again")
        return "ok"

    worker = Worker(redis_url, flaky, prefix=prefix, backoff=0.0)
    job_id = enqueue(r, prefix, "x")
    run_next(worker)
    worker.reclaim()
    run_next(worker)
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["result"], stored["attempts"]) == ("done", "ok", "2")


def test_a_handler_must_return_a_string(r: redis.Redis, redis_url: str, prefix: str) -> None:
    worker = Worker(redis_url, len, prefix=prefix, max_attempts=1)  # type: ignore[arg-type]
    job_id = enqueue(r, prefix, "abc")
    run_next(worker)
    assert job(r, prefix, job_id)["error"] == "TypeError: handler returned int, not str"


def test_jobs_of_a_lost_worker_are_requeued_and_its_late_result_dropped(
        r: redis.Redis, redis_url: str, prefix: str) -> None:
    lost, alive = (Worker(redis_url, prefix=prefix) for _ in range(2))
    keys = Keys(prefix)
    job_id = enqueue(r, prefix, "hello")
    lost.heartbeat()
    alive.heartbeat()
    taken = lost.take()
    assert taken is not None
    assert alive.reclaim() == (0, 0)  # the lease is alive: nothing to reclaim
    lose(lost)
    assert alive.reclaim() == (1, 0)
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["attempts"]) == ("queued", "1")
    assert "stopped before finishing" in stored["error"]
    assert r.lrange(keys.queue, 0, -1) == [job_id]
    assert not r.exists(keys.processing(lost.name))
    assert not r.sismember(keys.workers, lost.name)
    assert run_next(alive) == job_id
    lost.finish(job_id, "done", result="LATE")  # the lost worker comes back: dropped
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["result"], stored["attempts"]) == ("done", "HELLO", "2")


def test_a_job_that_loses_its_worker_on_the_last_attempt_fails(
        r: redis.Redis, redis_url: str, prefix: str) -> None:
    lost, alive = (Worker(redis_url, prefix=prefix, max_attempts=1) for _ in range(2))
    job_id = enqueue(r, prefix, "poison")
    lost.heartbeat()
    assert lost.take() is not None
    lose(lost)
    alive.reclaim()
    stored = job(r, prefix, job_id)
    assert stored["status"] == "failed"
    assert r.lrange(Keys(prefix).dead, 0, -1) == [job_id]


def test_a_duplicate_queue_entry_runs_once(r: redis.Redis, redis_url: str, prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    job_id = enqueue(r, prefix, "once")
    r.lpush(Keys(prefix).queue, job_id)
    run_next(worker)
    assert worker.take() is None  # the second entry is dropped, not run
    assert job(r, prefix, job_id)["attempts"] == "1"
    assert r.llen(Keys(prefix).processing(worker.name)) == 0


# -- real processes ------------------------------------------------------------------------------

def status_of(r: redis.Redis, prefix: str, job_id: str) -> str:
    return job(r, prefix, job_id).get("status", "")


def test_sigkilled_worker_loses_no_job(procs: Procs, r: redis.Redis, prefix: str) -> None:
    job_id = enqueue(r, prefix, "1.5")
    victim = procs.worker("--handler", "handlers:slow")
    wait_until(lambda: status_of(r, prefix, job_id) == "running", what="job to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    procs.worker("--handler", "handlers:slow")
    wait_until(lambda: status_of(r, prefix, job_id) == "done", timeout=30, what="job to finish")
    stored = job(r, prefix, job_id)
    assert (stored["result"], stored["attempts"]) == ("1.5", "2")
    assert not processing_keys(r, prefix)


def test_first_signal_finishes_the_job_then_exits_0(procs: Procs, r: redis.Redis,
                                                    prefix: str) -> None:
    job_id = enqueue(r, prefix, "1")
    worker = procs.worker("--handler", "handlers:slow")
    wait_until(lambda: status_of(r, prefix, job_id) == "running", what="job to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert status_of(r, prefix, job_id) == "done"
    assert not r.smembers(Keys(prefix).workers)


@pytest.mark.parametrize("how", ["second signal", "grace runs out"])
def test_cold_stop_gives_the_job_back(procs: Procs, r: redis.Redis, prefix: str,
                                      how: str) -> None:
    job_id = enqueue(r, prefix, "60")  # a handler that will not finish in time
    worker = procs.worker("--handler", "handlers:slow", "--grace", "0.5")
    wait_until(lambda: status_of(r, prefix, job_id) == "running", what="job to start")
    worker.send_signal(signal.SIGINT)
    if how == "second signal":
        wait_until(lambda: "finishing the current job" in procs.log(worker))
        worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=20) == 1
    keys = Keys(prefix)
    assert status_of(r, prefix, job_id) == "queued"
    assert r.lrange(keys.queue, 0, -1) == [job_id]
    assert not processing_keys(r, prefix)
    assert not list(r.scan_iter(match=f"{prefix}:lease:*"))  # others may reclaim at once


@pytest.mark.parametrize(("spec", "words"), [
    ("nocolon", "must look like MODULE:FUNCTION"),
    ("no_such_module:f", "cannot load handler"),
    ("handlers:nope", "cannot load handler"),
])
def test_bad_handler_is_one_clear_line(procs: Procs, spec: str, words: str) -> None:
    result = subprocess.run([sys.executable, "worker.py", "--handler", spec], cwd=ROOT,
                            env=procs.env(), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flags_are_usage_errors(procs: Procs) -> None:
    result = subprocess.run([sys.executable, "worker.py", "--lease", "1"], cwd=ROOT,
                            env=procs.env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--lease" in result.stderr


def test_a_job_stranded_with_a_live_worker_is_run(procs: Procs, r: redis.Redis,
                                                  prefix: str) -> None:
    """A BLMOVE whose reply was lost (connection cut as Redis ran it) leaves the id in a live
    worker's processing list, where no lease expiry will ever find it."""
    procs.worker()
    keys = Keys(prefix)
    name = wait_until(lambda: r.srandmember(keys.workers), what="the worker to register")
    job_id = enqueue(r, prefix, "stranded", queue=False)
    r.lpush(keys.processing(str(name)), job_id)  # as if the worker's BLMOVE had put it there
    wait_until(lambda: status_of(r, prefix, job_id) == "done", timeout=20, what="the job to run")
    assert job(r, prefix, job_id)["result"] == "STRANDED"
