"""The bench's systems, one small adapter each: how to enqueue through its own API, how to run a
worker at its README's defaults, how to read every result back, how many jobs it has yet to
finish (read from its own Redis keys). tests/bench.py runs this file as a program inside each
peer's own venv (made by the bench under .bench/venvs/NAME):

    python tests/bench_peers.py produce NAME --url URL [--function upper|wait_20ms]
    python tests/bench_peers.py work NAME --url URL [--concurrency N]

`produce` answers on its standard output, a line per command read on its standard input:
"ready" once connected; "enqueue N" (the texts "job 0" ... "job N-1", or "enqueue warm" for
the text "warm up") is answered "enqueued" when its API has accepted them all; "check" reads
back the result of every job enqueued since the last check, through the system's own result
API, and answers "checked N" if each is its text upper-cased ("wrong: ..." if not). The
adapters import their library inside their methods: the bench's own process imports this
module for the names, versions and key counts alone. Ours (name "ours") submits over HTTP with
the bench's own Python; its URL is the server's. "ours-py" enqueues with client.enqueue, the
Python producer that runs the server's SUBMIT script on Redis itself (no HTTP, as the peers
enqueue); its URL is Redis's.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis

FUNCTIONS = ("upper", "wait_20ms")  # the CPU-trivial job and the I/O-bound one
WIDTH = 64  # enqueues (and result reads) at once, where the API is async
RESULT_TIMEOUT = 120  # seconds any one result may take to be read back


# -- the jobs, in the shapes each system calls them ----------------------------------------------

def upper(text: str) -> str:
    return text.upper()


def wait_20ms(text: str) -> str:
    time.sleep(0.02)
    return text.upper()


async def upper_async(text: str) -> str:
    return text.upper()


async def await_20ms(text: str) -> str:
    await asyncio.sleep(0.02)
    return text.upper()


async def upper_ctx(ctx: Any, text: str) -> str:  # arq and SAQ pass a context first
    return text.upper()


async def await_20ms_ctx(ctx: Any, text: str) -> str:
    return await await_20ms(text)


async def upper_bullmq(job: Any, token: str) -> str:  # BullMQ passes the job and a lock token
    return str(job.data["text"]).upper()


async def await_20ms_bullmq(job: Any, token: str) -> str:
    return await await_20ms(str(job.data["text"]))


async def in_batches(items: Iterable[Any], call: Callable[[Any], Awaitable[Any]],
                     width: int = WIDTH) -> list[Any]:
    """call(item) for every item, `width` at a time; the answers in the items' order."""
    items = list(items)
    out: list[Any] = [None] * len(items)
    indexes = iter(range(len(items)))

    async def lane() -> None:
        for i in indexes:
            out[i] = await call(items[i])
    await asyncio.gather(*(lane() for _ in range(width)))
    return out


def hosted(url: str) -> tuple[str, int]:
    """host and port of a redis:// URL."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


class Adapter:
    """One system. requirements: what pip installs in its venv (psutil and redis besides);
    at_once: jobs one worker command runs at once at its defaults, worker_shape says how;
    hundred: its setting for 100 at once ("" if it has none), as the I/O table labels it."""

    name = ""
    requirements: tuple[str, ...] = ()
    at_once = 1
    worker_shape = "1 process, 1 job at once"
    hundred = ""

    def __init__(self, url: str, function: str = "upper") -> None:
        self.url, self.function = url, function

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        """Of the jobs enqueued since Redis was flushed, those not yet finished, from the
        system's own keys (cheap: it is polled)."""
        raise NotImplementedError

    async def open(self) -> None:
        """Connect, as a producer."""

    async def close(self) -> None:
        pass

    async def enqueue(self, texts: list[str]) -> list[Any]:
        """Enqueue a job per text; a handle for each, to read its result by."""
        raise NotImplementedError

    async def results(self, handles: list[Any]) -> list[str]:
        raise NotImplementedError

    def work(self, concurrency: int | None) -> None:
        """Run one worker command until killed (concurrency: None for its default)."""
        raise NotImplementedError


class Ours(Adapter):
    """Our server's HTTP API: POST /submit, GET /status?id=. (Its workers and the count of
    jobs left are bench.py's Ours: they need our worker.py and keys.)"""

    name = "ours"

    async def open(self) -> None:
        import aiohttp
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=WIDTH))

    async def close(self) -> None:
        await self.session.close()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        async def submit(text: str) -> str:
            async with self.session.post(f"{self.url}/submit", json={"input": text}) as resp:
                assert resp.status == 201, f"{resp.status} {await resp.text()}"
                return str((await resp.json())["id"])
        return await in_batches(texts, submit)

    async def results(self, handles: list[Any]) -> list[str]:
        async def read(job_id: str) -> str:
            async with self.session.get(f"{self.url}/status", params={"id": job_id}) as resp:
                return str((await resp.json()).get("result"))
        return await in_batches(handles, read)


class OursPython(Ours):
    """client.enqueue(text, redis_url=...): one after another, as its API is synchronous (as
    RQ's, Celery's, Dramatiq's and huey's); results read from the jobs' hashes in Redis (what
    GET /status reads: there is no server here)."""

    name = "ours-py"

    async def open(self) -> None:
        self.redis = redis.Redis.from_url(self.url, decode_responses=True)

    async def close(self) -> None:
        self.redis.close()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        import client

        def run() -> list[str]:
            jobs = [client.enqueue(text, redis_url=self.url) for text in texts]
            return [str(job["id"]) for job in jobs if isinstance(job, dict)]
        return await asyncio.to_thread(run)

    async def results(self, handles: list[Any]) -> list[str]:
        import store
        keys = store.Keys()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in handles:
                pipe.hget(keys.job(job_id), "result")
            return [str(result) for result in pipe.execute()]


class Arq(Adapter):
    """arq: results kept an hour by default (arq:result:ID), read with Job.result()."""

    name, requirements, at_once, hundred = "arq", ("arq==0.28.0",), 10, "max_jobs=100"
    worker_shape = "1 process, max_jobs 10"

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return int(r.zcard("arq:queue"))

    async def open(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings
        self.pool = await create_pool(RedisSettings.from_dsn(self.url))

    async def close(self) -> None:
        await self.pool.aclose()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        return await in_batches(texts, lambda text: self.pool.enqueue_job(self.function, text))

    async def results(self, handles: list[Any]) -> list[str]:
        return await in_batches(handles, lambda job: job.result(timeout=RESULT_TIMEOUT))

    def work(self, concurrency: int | None) -> None:
        from arq.connections import RedisSettings
        from arq.worker import func, run_worker
        run_worker({"functions": [func(upper_ctx, name="upper"),
                                  func(await_20ms_ctx, name="wait_20ms")],
                    "redis_settings": RedisSettings.from_dsn(self.url),
                    **({"max_jobs": concurrency} if concurrency else {})})


class RQ(Adapter):
    """RQ: SimpleWorker (the job runs in the worker's process, no fork per job, as arq and SAQ
    run theirs); results kept 500 s by default, read with Job.return_value()."""

    name, requirements = "rq", ("rq==2.12.0",)
    worker_shape = "SimpleWorker, 1 job at once"

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return int(r.llen("rq:queue:default")) + int(r.zcard("rq:wip:default"))

    async def open(self) -> None:
        from rq import Queue
        self.queue = Queue(connection=redis.Redis.from_url(self.url))

    async def enqueue(self, texts: list[str]) -> list[Any]:
        return [self.queue.enqueue(f"bench_peers.{self.function}", text) for text in texts]

    async def results(self, handles: list[Any]) -> list[str]:
        return [wait_sync(functools.partial(job.return_value, refresh=True)) for job in handles]

    def work(self, concurrency: int | None) -> None:
        from rq import Queue, SimpleWorker
        connection = redis.Redis.from_url(self.url)
        SimpleWorker([Queue(connection=connection)], connection=connection).work(
            logging_level="WARNING")


def wait_sync(read: Callable[[], Any], step: float = 0.01) -> Any:
    """read() until it is not None, for at most RESULT_TIMEOUT seconds."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    while (value := read()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no result")
        time.sleep(step)
    return value


class Saq(Adapter):
    """SAQ: a job's result is kept 600 s after it finishes by default (saq:job:...), read with
    Job.refresh()."""

    name, at_once, hundred = "saq", 10, "concurrency=100"
    requirements = ("saq==0.26.4", "typing_extensions")  # saq imports it, and does not require it
    worker_shape = "1 process, concurrency 10"

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return int(r.zcard("saq:default:incomplete"))

    async def open(self) -> None:
        from saq import Queue
        self.queue = Queue.from_url(self.url)

    async def close(self) -> None:
        await self.queue.disconnect()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        return await in_batches(texts, lambda text: self.queue.enqueue(self.function, text=text))

    async def results(self, handles: list[Any]) -> list[str]:
        async def read(job: Any) -> Any:
            await job.refresh(until_complete=RESULT_TIMEOUT)
            return job.result if job.status == "complete" else f"{job.status}: {job.error}"
        return await in_batches(handles, read)

    def work(self, concurrency: int | None) -> None:
        from saq import Queue, Worker

        async def main() -> None:
            worker = Worker(Queue.from_url(self.url),
                            functions=[("upper", upper_ctx), ("wait_20ms", await_20ms_ctx)],
                            **({"concurrency": concurrency} if concurrency else {}))
            await worker.start()
        asyncio.run(main())


def celery_app(url: str) -> Any:
    from celery import Celery
    app = Celery("bench", broker=url, backend=url)
    app.task(name="upper")(upper)
    app.task(name="wait_20ms")(wait_20ms)
    return app


class CeleryPeer(Adapter):
    """Celery, the Redis broker and result backend (celery-task-meta-ID, kept a day), results
    read with ResultSet.join_native(). One worker command is its prefork pool, a child process
    per core. A message is acked as its task starts (acks_late off, the default): the jobs not
    yet finished are those queued or unacked, then, once none is, the results still missing."""

    name, requirements, hundred = "celery", ("celery[redis]==5.7.0",), "threads, 100"
    at_once = os.cpu_count() or 1
    worker_shape = f"prefork, {at_once} child processes"
    count_results = "return #redis.call('KEYS', 'celery-task-meta-*')"

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        waiting = int(r.llen("celery")) + int(r.hlen("unacked"))
        return waiting or enqueued - int(r.eval(self.count_results, 0))

    async def open(self) -> None:
        self.app = celery_app(self.url)

    async def enqueue(self, texts: list[str]) -> list[Any]:
        task = self.app.tasks[self.function]
        return [task.delay(text) for text in texts]

    async def results(self, handles: list[Any]) -> list[str]:
        from celery.result import ResultSet
        return list(ResultSet(handles).join_native(timeout=RESULT_TIMEOUT))

    def work(self, concurrency: int | None) -> None:
        hundred = ["--pool", "threads", "--concurrency", str(concurrency)] if concurrency else []
        celery_app(self.url).worker_main(["worker", "--loglevel", "WARNING", *hundred])


def dramatiq_setup() -> None:
    """Dramatiq's broker and actors (its CLI calls this in each worker process it starts)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    url = os.environ["BENCH_REDIS_URL"]
    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url)))
    dramatiq.set_broker(broker)
    for function in (upper, wait_20ms):
        dramatiq.actor(function, actor_name=function.__name__, store_results=True)


class Dramatiq(Adapter):
    """Dramatiq, its Redis broker and the Results middleware with its Redis backend, results
    read with Message.get_result(block=True). One worker command (its CLI) starts a process
    per core, each of 8 threads. A message stays in dramatiq:default.msgs until acked, after
    its result is stored."""

    name, requirements, hundred = "dramatiq", ("dramatiq[redis]==2.2.1",), "1 process, 100 threads"
    at_once = (os.cpu_count() or 1) * 8
    worker_shape = f"{os.cpu_count() or 1} processes x 8 threads"

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return int(r.hlen("dramatiq:default.msgs"))

    async def open(self) -> None:
        import dramatiq
        os.environ["BENCH_REDIS_URL"] = self.url
        dramatiq_setup()
        self.broker = dramatiq.get_broker()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        actor = self.broker.get_actor(self.function)
        return [actor.send(text) for text in texts]

    async def results(self, handles: list[Any]) -> list[str]:
        return [message.get_result(block=True, timeout=RESULT_TIMEOUT * 1000)
                for message in handles]

    def work(self, concurrency: int | None) -> None:
        from dramatiq.cli import main
        os.environ["BENCH_REDIS_URL"] = self.url
        hundred = ["--processes", "1", "--threads", str(concurrency)] if concurrency else []
        sys.argv = ["dramatiq", "bench_peers:dramatiq_setup", *hundred]
        sys.exit(main())


def huey_app(url: str) -> tuple[Any, dict[str, Any]]:
    from huey import RedisHuey
    host, port = hosted(url)
    huey = RedisHuey("bench", host=host, port=port)
    return huey, {"upper": huey.task(name="upper")(upper),
                  "wait_20ms": huey.task(name="wait_20ms")(wait_20ms)}


class Huey(Adapter):
    """huey: RedisHuey, its consumer at its defaults (1 worker thread); results in the hash
    huey.results.bench, read with Result.get(blocking=True, preserve=True) (a read without
    preserve removes them, and they are what is counted)."""

    name, requirements, hundred = "huey", ("huey==3.5.4",), "-w 100"
    worker_shape = "consumer, 1 thread"


    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return enqueued - int(r.hlen("huey.results.bench"))

    async def open(self) -> None:
        _, self.tasks = huey_app(self.url)

    async def enqueue(self, texts: list[str]) -> list[Any]:
        task = self.tasks[self.function]
        return [task(text) for text in texts]

    async def results(self, handles: list[Any]) -> list[str]:
        return [result.get(blocking=True, timeout=RESULT_TIMEOUT, preserve=True)
                for result in handles]

    def work(self, concurrency: int | None) -> None:
        huey, _ = huey_app(self.url)
        huey.create_consumer(**({"workers": concurrency} if concurrency else {})).run()


def taskiq_broker() -> Any:
    """taskiq's stream broker with its Redis result backend (its CLI calls this)."""
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    url = os.environ["BENCH_REDIS_URL"]
    broker = RedisStreamBroker(url).with_result_backend(RedisAsyncResultBackend(url))
    broker.register_task(upper_async, task_name="upper")
    broker.register_task(await_20ms, task_name="wait_20ms")
    return broker


class Taskiq(Adapter):
    """taskiq with taskiq-redis: RedisStreamBroker (a stream and a consumer group, created by
    the producer's startup), RedisAsyncResultBackend, results read with wait_result(). One
    worker command (its CLI) starts 2 processes, each running up to 100 async tasks. A message
    is acked once its result is saved: the jobs not finished are the group's lag and
    pending."""

    name, requirements = "taskiq", ("taskiq==0.13.0", "taskiq-redis==1.2.4")
    at_once = 200
    worker_shape = "2 processes x 100 async tasks"

    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        group = next(g for g in r.xinfo_groups("taskiq") if g["name"] in ("taskiq", b"taskiq"))
        return int(group["lag"] or 0) + int(group["pending"])

    async def open(self) -> None:
        os.environ["BENCH_REDIS_URL"] = self.url
        self.broker = taskiq_broker()
        await self.broker.startup()

    async def close(self) -> None:
        await self.broker.shutdown()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        task = self.broker.find_task(self.function)
        return await in_batches(texts, lambda text: task.kiq(text))

    async def results(self, handles: list[Any]) -> list[str]:
        async def read(task: Any) -> Any:
            result = await task.wait_result(timeout=RESULT_TIMEOUT)
            return result.error if result.is_err else result.return_value
        return await in_batches(handles, read)

    def work(self, concurrency: int | None) -> None:
        from taskiq.__main__ import main
        os.environ["BENCH_REDIS_URL"] = self.url
        sys.argv = ["taskiq", "worker", "bench_peers:taskiq_broker", "--log-level", "WARNING"]
        main()


def streaq_worker(url: str, concurrency: int | None = None) -> tuple[Any, dict[str, Any]]:
    from streaq import Worker
    worker = Worker(redis_url=url, **({"concurrency": concurrency} if concurrency else {}))
    return worker, {"upper": worker.task(name="upper")(upper_async),
                    "wait_20ms": worker.task(name="wait_20ms")(await_20ms)}


class Streaq(Adapter):
    """streaq: its Worker (16 tasks at once by default); results kept 5 minutes (listed in the
    sorted set streaq:default:index:results), read from its result keys with its own
    deserializer: Task.result() subscribes to a channel per task, some 80 reads/s here, and
    64 at once never returned."""

    name, requirements, at_once, hundred = "streaq", ("streaq==7.2.0",), 16, "concurrency=100"
    worker_shape = "1 process, concurrency 16"


    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return enqueued - int(r.zcard("streaq:default:index:results"))

    async def open(self) -> None:
        self.worker, self.tasks = streaq_worker(self.url)
        await self.worker.__aenter__()

    async def close(self) -> None:
        await self.worker.__aexit__(None, None, None)

    async def enqueue(self, texts: list[str]) -> list[Any]:
        task = self.tasks[self.function]

        async def enqueue(text: str) -> Any:
            return await task.enqueue(text)
        return await in_batches(texts, enqueue)

    async def results(self, handles: list[Any]) -> list[str]:
        async def read(task: Any) -> Any:
            raw = await self.worker.redis.get(self.worker.results_key + task.id)
            result = await self.worker.deserialize(raw) if raw else {"s": False, "r": "none"}
            return result["r"] if result["s"] else f"failed: {result['r']}"
        return await in_batches(handles, read)

    def work(self, concurrency: int | None) -> None:
        worker, _ = streaq_worker(self.url, concurrency)
        worker.run_sync()


class Bullmq(Adapter):
    """BullMQ for Python: a Worker runs 1 job at once by default; completed jobs are kept (the
    sorted set bull:bench:completed), their return values in their hashes, read back with
    Job.fromId()."""

    name, requirements, hundred = "bullmq", ("bullmq==3.4.4",), "concurrency=100"
    worker_shape = "1 process, concurrency 1"


    def remaining(self, r: redis.Redis, enqueued: int) -> int:
        return enqueued - int(r.zcard("bull:bench:completed"))

    async def open(self) -> None:
        from bullmq import Queue
        self.queue = Queue("bench", {"connection": self.url})

    async def close(self) -> None:
        await self.queue.close()

    async def enqueue(self, texts: list[str]) -> list[Any]:
        return await in_batches(texts, lambda text: self.queue.add(self.function,
                                                                   {"text": text}))

    async def results(self, handles: list[Any]) -> list[str]:
        from bullmq import Job

        async def read(job: Any) -> Any:
            return (await Job.fromId(self.queue, job.id)).returnvalue
        return await in_batches(handles, read)

    def work(self, concurrency: int | None) -> None:
        from bullmq import Worker

        async def process(job: Any, token: str) -> str:
            return await (upper_bullmq if job.name == "upper" else await_20ms_bullmq)(job, token)

        async def main() -> None:
            worker = Worker("bench", process, {"connection": self.url,
                                               **({"concurrency": concurrency}
                                                  if concurrency else {})})
            try:
                await asyncio.Event().wait()
            finally:
                await worker.close()
        asyncio.run(main())


ADAPTERS: dict[str, type[Adapter]] = {a.name: a for a in (
    Ours, OursPython, Arq, RQ, Saq, CeleryPeer, Dramatiq, Streaq, Taskiq, Huey, Bullmq)}
PEERS = tuple(name for name in ADAPTERS if not name.startswith("ours"))


async def produce(adapter: Adapter, answer: Callable[[str], None]) -> None:
    """The producer's loop (see the docstring)."""
    await adapter.open()
    pending: list[tuple[str, Any]] = []
    try:
        answer("ready")
        while line := await asyncio.to_thread(sys.stdin.readline):
            command, _, argument = line.strip().partition(" ")
            if command == "enqueue":
                texts = ["warm up"] if argument == "warm" else \
                    [f"job {i}" for i in range(int(argument))]
                pending += zip(texts, await adapter.enqueue(texts), strict=True)
                answer("enqueued")
            elif command == "check":
                got = await adapter.results([handle for _, handle in pending])
                wrong = [(text, result) for (text, _), result in zip(pending, got, strict=True)
                         if result != text.upper()]
                answer(f"wrong: {len(wrong)} of {len(got)}, e.g. {wrong[:3]}" if wrong
                       else f"checked {len(got)}")
                pending.clear()
    finally:
        await adapter.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("produce", "work"), help="producer or worker")
    parser.add_argument("name", choices=ADAPTERS, help="the system")
    parser.add_argument("--url", required=True, help="Redis URL (ours: the server's URL)")
    parser.add_argument("--function", choices=FUNCTIONS, default="upper",
                        help="the job the producer enqueues (default %(default)s)")
    parser.add_argument("--concurrency", type=int,
                        help="the worker's jobs at once (default: the system's default)")
    args = parser.parse_args(argv)
    adapter = ADAPTERS[args.name](args.url, args.function)
    if args.role == "work":
        return adapter.work(args.concurrency)
    # the answers go to the real standard output; anything a library prints, to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def answer(line: str) -> None:
        print(line, file=out, flush=True)
    asyncio.run(produce(adapter, answer))


if __name__ == "__main__":
    main()
