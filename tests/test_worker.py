"""worker.py: step by step in this process, and as real processes that are signalled and
killed."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from store import CANCEL, RETENTION, SUBMIT, Client, Keys, new_jobs, submit_args
from tests.conftest import Procs, Subscription, enqueue, job, processing_keys, wait_until
from worker import Worker


def run_next(worker: Worker) -> str:
    """Take the next job into the first slot and run it to its outcome; return its id."""
    taken = worker.take(worker.slots[0])
    assert taken is not None, "no job was waiting"
    assert worker.process(worker.slots[0], taken) is None  # none chained: none was waiting
    return taken.id


def lose(worker: Worker) -> None:
    """Make the worker look dead: its lease expires at once."""
    worker.redis.delete(worker.keys.lease(worker.name))


@pytest.mark.cluster
def test_done_job_has_its_result_and_expires(r: Client, redis_url: str,
                                             prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    job_id = enqueue(r, prefix, "hello world")
    worker.heartbeat()
    run_next(worker)
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["result"], stored["attempts"]) == ("done", "HELLO WORLD", "1")
    keys = Keys(prefix)
    assert 0 < r.ttl(keys.job(job_id)) <= RETENTION
    assert r.llen(worker.slots[0].processing) == 0
    assert r.llen(keys.queue) == 0


def test_finishing_a_job_takes_the_next_in_the_same_call(r: redis.Redis, redis_url: str,
                                                          prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    first, second = enqueue(r, prefix, "one"), enqueue(r, prefix, "two")
    worker.heartbeat()
    slot = worker.slots[0]
    taken = worker.take(slot)
    assert taken is not None and taken.id == first
    chained = worker.process(slot, taken)
    assert chained is not None and (chained.id, chained.input) == (second, "two")
    assert status_of(r, prefix, second) == "running"
    assert r.lrange(slot.processing, 0, -1) == [second]
    assert worker.process(slot, chained) is None  # the queue is empty
    assert [job(r, prefix, i)["result"] for i in (first, second)] == ["ONE", "TWO"]


@pytest.mark.cluster
def test_raising_handler_is_retried_then_failed_and_dead_lettered(r: Client,
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
            "delayed", str(attempt), "ValueError: broken")
        assert r.zscore(keys.delayed, job_id) is not None  # waiting out its backoff
        assert worker.reclaim() == (0, 1, [])  # due at once (backoff 0): moved to the queue
    run_next(worker)
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["attempts"], stored["error"]) == (
        "failed", "3", "ValueError: broken")
    assert r.lrange(keys.dead, 0, -1) == [job_id]
    assert r.ttl(keys.job(job_id)) > 0


@pytest.mark.cluster
def test_backoff_doubles(r: Client, redis_url: str, prefix: str) -> None:
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


@pytest.mark.cluster
def test_jobs_of_a_lost_worker_are_requeued_and_its_late_result_dropped(
        r: Client, redis_url: str, prefix: str) -> None:
    lost, alive = (Worker(redis_url, prefix=prefix) for _ in range(2))
    keys = Keys(prefix)
    job_id = enqueue(r, prefix, "hello")
    lost.heartbeat()
    alive.heartbeat()
    taken = lost.take(lost.slots[3])
    assert taken is not None
    assert alive.reclaim() == (0, 0, [])  # the lease is alive: nothing to reclaim
    lose(lost)
    assert alive.reclaim() == (1, 0, [])
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["attempts"]) == ("queued", "1")
    assert "stopped before finishing" in stored["error"]
    assert r.lrange(keys.queue, 0, -1) == [job_id]
    assert not r.exists(lost.slots[3].processing)
    assert not r.smembers(keys.workers) & {slot.name for slot in lost.slots}
    assert run_next(alive) == job_id
    lost.finish(lost.slots[3], taken, "done", result="LATE")  # it comes back: dropped
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["result"], stored["attempts"]) == ("done", "HELLO", "2")


@pytest.mark.cluster
def test_a_job_that_loses_its_worker_on_the_last_attempt_fails(
        r: Client, redis_url: str, prefix: str) -> None:
    lost, alive = (Worker(redis_url, prefix=prefix, max_attempts=1) for _ in range(2))
    job_id = enqueue(r, prefix, "poison")
    lost.heartbeat()
    assert lost.take(lost.slots[0]) is not None
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
    assert worker.take(worker.slots[0]) is None  # the second entry is dropped, not run
    assert job(r, prefix, job_id)["attempts"] == "1"
    assert r.llen(worker.slots[0].processing) == 0


# -- real processes ------------------------------------------------------------------------------

def status_of(r: Client, prefix: str, job_id: str) -> str:
    return job(r, prefix, job_id).get("status", "")


@pytest.mark.cluster
def test_sigkilled_worker_loses_no_job(procs: Procs, r: Client, prefix: str) -> None:
    job_id = enqueue(r, prefix, "1.5")
    victim = procs.worker("--handler", "handlers:slow")
    wait_until(lambda: status_of(r, prefix, job_id) == "running", what="job to start")
    # Killed as soon as it runs the job: the slot running it is registered already (the first
    # heartbeat comes before the first take), so the next worker's reclaim will find it.
    assert job(r, prefix, job_id)["worker"] in r.smembers(Keys(prefix).workers)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    procs.worker("--handler", "handlers:slow")
    wait_until(lambda: status_of(r, prefix, job_id) == "done", timeout=30, what="job to finish")
    stored = job(r, prefix, job_id)
    assert (stored["result"], stored["attempts"]) == ("1.5", "2")
    assert not processing_keys(r, prefix)


@pytest.mark.cluster
def test_first_signal_finishes_the_job_then_exits_0(procs: Procs, r: Client,
                                                    prefix: str) -> None:
    job_id = enqueue(r, prefix, "1")
    worker = procs.worker("--handler", "handlers:slow")
    wait_until(lambda: status_of(r, prefix, job_id) == "running", what="job to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert status_of(r, prefix, job_id) == "done"
    assert not r.smembers(Keys(prefix).workers)


@pytest.mark.cluster
@pytest.mark.parametrize("how", ["second signal", "grace runs out"])
def test_cold_stop_gives_the_job_back(procs: Procs, r: Client, prefix: str,
                                      how: str) -> None:
    job_id = enqueue(r, prefix, "60")  # a handler that will not finish in time
    worker = procs.worker("--handler", "handlers:slow", "--grace", "0.5")
    wait_until(lambda: status_of(r, prefix, job_id) == "running", what="job to start")
    worker.send_signal(signal.SIGINT)
    if how == "second signal":
        wait_until(lambda: "finishing the jobs running" in procs.log(worker))
        worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=20) == 1
    keys = Keys(prefix)
    assert status_of(r, prefix, job_id) == "queued"
    assert r.lrange(keys.queue, 0, -1) == [job_id]
    assert not processing_keys(r, prefix)
    assert not list(r.scan_iter(match=f"{prefix}:lease:*"))  # others may reclaim at once


def test_a_job_stranded_with_a_live_worker_is_run(procs: Procs, r: redis.Redis,
                                                  prefix: str) -> None:
    """A worker of before the take script (its BLMOVE's reply lost) could leave an id in a
    live slot's processing list, where no lease expiry will ever find it: the slot's next take
    puts it back and runs it (a slot is woken while a queued job waits)."""
    procs.worker("--concurrency", "1")
    keys = Keys(prefix)
    name = wait_until(lambda: r.srandmember(keys.workers), what="the worker to register")
    job_id = enqueue(r, prefix, "stranded")
    r.lmove(keys.queue, keys.processing(str(name)), "RIGHT", "LEFT")  # as that BLMOVE did
    wait_until(lambda: status_of(r, prefix, job_id) == "done", timeout=20, what="the job to run")
    assert job(r, prefix, job_id)["result"] == "STRANDED"


# -- many jobs in flight -------------------------------------------------------------------------

@pytest.mark.cluster
@pytest.mark.parametrize("handler", ["handlers:slow", "handlers:asleep"])
def test_ten_jobs_of_a_sigkilled_worker_are_each_done_once_by_another(
        procs: Procs, r: Client, prefix: str, handler: str) -> None:
    events = Subscription(r, Keys(prefix).events)
    ids = [enqueue(r, prefix, "2") for _ in range(10)]
    victim = procs.worker("--handler", handler, "--concurrency", "10")
    wait_until(lambda: all(status_of(r, prefix, i) == "running" for i in ids), what="10 running")
    keys = Keys(prefix)
    assert len(list(r.scan_iter(match=f"{prefix}:lease:*"))) == 1  # one lease for all ten
    assert r.scard(keys.workers) == 10  # one slot each
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    procs.worker("--handler", handler, "--concurrency", "10")
    wait_until(lambda: all(status_of(r, prefix, i) == "done" for i in ids), timeout=30)
    assert events.done(timeout=0.5) == dict.fromkeys(ids, 1)
    assert [job(r, prefix, i)["attempts"] for i in ids] == ["2"] * 10
    events.close()


@pytest.mark.cluster
@pytest.mark.parametrize("handler", ["handlers:slow", "handlers:asleep"])
def test_a_warm_stop_finishes_every_job_in_flight(procs: Procs, r: Client, prefix: str,
                                                  handler: str) -> None:
    ids = [enqueue(r, prefix, "1") for _ in range(10)]
    worker = procs.worker("--handler", handler, "--concurrency", "10")
    wait_until(lambda: all(status_of(r, prefix, i) == "running" for i in ids), what="10 running")
    queued = enqueue(r, prefix, "1")  # waits: every slot is busy
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert [status_of(r, prefix, i) for i in ids] == ["done"] * 10
    assert status_of(r, prefix, queued) == "queued"
    assert not r.smembers(Keys(prefix).workers)
    assert not processing_keys(r, prefix)


@pytest.mark.cluster
@pytest.mark.parametrize("handler", ["handlers:slow", "handlers:asleep"])
def test_a_cold_stop_gives_every_job_in_flight_back(procs: Procs, r: Client, prefix: str,
                                                    handler: str) -> None:
    ids = [enqueue(r, prefix, "60") for _ in range(10)]
    worker = procs.worker("--handler", handler, "--concurrency", "10", "--grace", "0.5")
    wait_until(lambda: all(status_of(r, prefix, i) == "running" for i in ids), what="10 running")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 1
    assert [status_of(r, prefix, i) for i in ids] == ["queued"] * 10
    assert sorted(r.lrange(Keys(prefix).queue, 0, -1)) == sorted(ids)
    assert not processing_keys(r, prefix)


# -- time limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("handler", "how"), [
    ("handlers:spin", "raised in its thread"),
    ("handlers:slow", "blocked in C: recorded all the same"),
    ("handlers:asleep", "cancelled"),
])
def test_a_try_past_the_timeout_is_retried_then_failed(procs: Procs, r: redis.Redis, prefix: str,
                                                       handler: str, how: str) -> None:
    job_id = enqueue(r, prefix, "30")
    quick = enqueue(r, prefix, "0")  # a slot stays free for other jobs
    worker = procs.worker("--handler", handler, "--concurrency", "2", "--timeout", "0.5",
                          "--max-attempts", "2")
    wait_until(lambda: status_of(r, prefix, job_id) == "failed", timeout=20, what=how)
    stored = job(r, prefix, job_id)
    assert (stored["error"], stored["attempts"]) == ("timed out after 0.5 s", "2")
    assert status_of(r, prefix, quick) == "done"
    assert worker.poll() is None


def test_a_late_result_of_a_timed_out_try_is_dropped(procs: Procs, r: redis.Redis,
                                                     prefix: str) -> None:
    job_id = enqueue(r, prefix, "2")  # time.sleep: Python cannot interrupt it
    worker = procs.worker("--handler", "handlers:slow", "--timeout", "0.5", "--max-attempts", "1")
    wait_until(lambda: status_of(r, prefix, job_id) == "failed", what="the timeout")
    wait_until(lambda: "dropping its result" in procs.log(worker), what="the late result")
    stored = job(r, prefix, job_id)
    assert (stored["status"], stored["result"]) == ("failed", "")


# -- lost replies and races between a take and its start ------------------------------------------

def test_a_take_sent_again_after_a_lost_reply_gives_the_same_answer(
        r: redis.Redis, redis_url: str, prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    slot = worker.slots[0]
    job_id = enqueue(r, prefix, "x")
    other = enqueue(r, prefix, "y")
    first, again = (worker._take(keys=[slot.processing], args=worker.common())
                    for _ in range(2))
    assert first == again == [job_id, "x", 1]
    assert job(r, prefix, job_id)["worker"] == slot.name
    assert r.lrange(slot.processing, 0, -1) == [job_id]
    assert status_of(r, prefix, other) == "queued"


def test_a_warm_stop_puts_a_stray_back(r: redis.Redis, redis_url: str, prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    job_id = enqueue(r, prefix, "x", queue=False)
    r.lpush(worker.slots[4].processing, job_id)  # a lost BLMOVE reply (a worker of before take)
    worker.close()
    assert r.lrange(Keys(prefix).queue, 0, -1) == [job_id]
    assert not processing_keys(r, prefix)


# -- cancel: the stop request reaches the slot, however late it holds the job ------------------

def test_a_stop_request_stays_until_the_try_ends(r: redis.Redis, redis_url: str,
                                                 prefix: str) -> None:
    """The keeper may read the stop set before the slot has begun the job (a started job is
    running in Redis a moment before the slot knows it): the request must still be there at
    its next round, and gone once the try has ended."""
    worker = Worker(redis_url, prefix=prefix)
    slot, keys = worker.slots[0], Keys(prefix)
    job_id = enqueue(r, prefix, "x")
    taken = worker.take(slot)
    assert taken is not None
    cancel = r.register_script(CANCEL)
    assert cancel(keys=[keys.job(job_id)], args=[*worker.common(), job_id]) == "running"
    assert worker.reclaim(stops=True)[2] == [job_id]  # seen by a round with no slot holding it
    assert worker.reclaim(stops=True)[2] == [job_id]  # and by the next
    worker.finish(slot, taken, "done", result="X")  # ended as asked, whatever the try says
    assert (status_of(r, prefix, job_id), job(r, prefix, job_id)["result"]) == ("cancelled", "")
    assert worker.reclaim(stops=True)[2] == [] and not r.exists(keys.stop(worker.name))


def test_a_stray_copy_of_a_job_running_elsewhere_is_dropped(r: redis.Redis, redis_url: str,
                                                            prefix: str) -> None:
    worker = Worker(redis_url, prefix=prefix)
    job_id = enqueue(r, prefix, "x")
    assert worker.take(worker.slots[0]) is not None
    r.lpush(worker.slots[1].processing, job_id)  # a duplicate entry, taken by a lost reply
    assert worker.reclaim(worker.slots[1].name, scan=False)[0] == 0
    assert status_of(r, prefix, job_id) == "running"
    assert job(r, prefix, job_id)["worker"] == worker.slots[0].name
    assert r.llen(Keys(prefix).queue) == 0 and not r.exists(worker.slots[1].processing)


def test_a_submit_sent_again_after_a_lost_reply_changes_nothing(r: redis.Redis, redis_url: str,
                                                                 prefix: str) -> None:
    """The server's client retries a command whose reply was lost: a job stored (and maybe
    started) by the first send is left as it is by the second."""
    keys, jobs = Keys(prefix), new_jobs(["x"])
    submit = r.register_script(SUBMIT)
    args = submit_args(prefix, RETENTION, jobs, None)
    submit(keys=[keys.queue], args=args)
    worker = Worker(redis_url, prefix=prefix)
    assert worker.take(worker.slots[0]) is not None  # started meanwhile
    submit(keys=[keys.queue], args=args)
    assert status_of(r, prefix, str(jobs[0]["id"])) == "running"
    assert r.llen(keys.queue) == 0 and r.hget(keys.counters, "submitted") == "1"
