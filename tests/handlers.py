"""Handlers the tests load into worker processes with --handler handlers:NAME."""

import asyncio
import contextlib
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Generator, Iterator

from worker import Context, RetryLater


def slow(text: str) -> str:
    """Sleep for the number of seconds given as input, then return it."""
    time.sleep(float(text))
    return text


def fail(text: str) -> str:
    raise ValueError(f"cannot handle {text!r}")


def not_a_string(text: str) -> int:
    return len(text)


def pause(text: str) -> str:
    """A job that takes a little time: upper-case after 10 ms."""
    time.sleep(0.01)
    return text.upper()


def stubborn(text: str) -> str:
    """A handler that never returns and swallows whatever is raised in it."""
    while True:
        with contextlib.suppress(BaseException):  # deliberately deaf
            time.sleep(0.1)


def gate(path: str) -> str:
    """Wait until the file named by the input exists (the test opens the gate), then return."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return "through"


def spin(text: str) -> str:
    """Compute for the number of seconds given as input: pure Python, so interruptible."""
    end = time.monotonic() + float(text)
    while time.monotonic() < end:
        pass
    return text


async def asleep(text: str) -> str:
    """The async twin of slow: await for the number of seconds given as input."""
    await asyncio.sleep(float(text))
    return text


def fails_once(path: str) -> str:
    """Fail the first time it sees an input (a file path: it creates the file), then succeed."""
    try:
        with open(path, "x"):
            pass
    except FileExistsError:
        return "second try"
    raise RuntimeError("first try fails")


def demo(text: str) -> str:
    """For the dashboard's screenshot: "fail ..." raises, "sleep N" sleeps N s, else upper-case."""
    if text.startswith("fail"):
        raise ValueError(f"cannot handle {text!r}")
    if text.startswith("sleep "):
        time.sleep(float(text.split()[1]))
    return text.upper()


def flaky(text: str) -> str:
    """By the input: "always:..." fails every try; "once:PATH" fails the try that creates the
    file PATH (atomically, so workers in other processes agree) and succeeds after; anything
    else succeeds, upper-cased."""
    kind, _, rest = text.partition(":")
    if kind == "always":
        raise ValueError(f"{text} always fails")
    if kind == "once":
        try:
            os.close(os.open(rest, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return text.upper()
        raise ValueError(f"{text} fails on its first try")
    return text.upper()


def nap(text: str) -> str:
    """Sleep for the number of seconds given as input in 10 ms steps of Python code, so an
    exception raised into the thread (a cancel, a timeout) lands within 10 ms."""
    end = time.monotonic() + float(text)
    while time.monotonic() < end:
        time.sleep(0.01)
    return text


def record(text: str) -> str:
    """Input {"log": PATH, "name": N, "sleep": S, "later": PATH}: append "TIME start N" to the
    log as the handler begins and "TIME end N" as it ends (time.time(); one write each, so
    processes may share the log), sleeping S seconds between. With "later", raise
    RetryLater(0.5) the first time (the try that creates the file PATH)."""
    spec = json.loads(text)
    write = functools.partial(_append, spec["log"], spec["name"])
    write("start")
    if later := spec.get("later"):
        try:
            os.close(os.open(later, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            write("later")
            raise RetryLater(0.5)
    time.sleep(spec.get("sleep", 0))
    write("end")
    return str(spec["name"])


def _append(path: str, name: str, what: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{time.time():.6f} {what} {name}\n".encode())
    finally:
        os.close(fd)


def stream(text: str, ctx: Context) -> str:
    """Input {"pieces": N, "seconds": S, "every": K, "gate": PATH}: emit N pieces ("<i> ")
    over S seconds, and a progress every K pieces; with "gate", wait for the file PATH to
    exist first (the test opens it). Returns "streamed N"."""
    spec = json.loads(text)
    if gate := spec.get("gate"):
        while not os.path.exists(gate):
            time.sleep(0.01)
    pieces, every = int(spec["pieces"]), int(spec.get("every", 0))
    start = time.monotonic()
    for i in range(pieces):
        ctx.emit(f"{i} ")
        if every and (i + 1) % every == 0:
            ctx.progress(i + 1, pieces, f"{i + 1} pieces")
        pause = start + spec.get("seconds", 0) * (i + 1) / pieces - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return f"streamed {pieces}"


def words(text: str) -> Iterator[str]:
    """A generator: each word of the input (with its space), 20 ms apart; "sleep N" first
    naps N s in 10 ms steps (interruptible)."""
    if text.startswith("sleep "):
        nap(text.split()[1])
    for word in text.split(" "):
        yield word + " "
        time.sleep(0.02)


async def async_words(text: str) -> AsyncIterator[str]:
    """words() as an async generator."""
    if text.startswith("sleep "):
        await asyncio.sleep(float(text.split()[1]))
    for word in text.split(" "):
        yield word + " "
        await asyncio.sleep(0.02)


def returns_its_own(text: str) -> Generator[str, None, str]:
    """A generator that returns a result of its own: the pieces are output only."""
    yield "working... "
    return "the result"


def tokens(text: str, ctx: Context) -> str:
    """Input "N": emit N tokens one at a time, each made with about 50 us of work (the bench's
    streaming row); "N joined": the same work, the tokens returned at once."""
    n, _, mode = text.partition(" ")
    made = []
    for i in range(int(n)):
        end = time.perf_counter() + 50e-6
        while time.perf_counter() < end:
            pass
        token = f"t{i} "
        if mode == "joined":
            made.append(token)
        else:
            ctx.emit(token)
            made.append(token)
    return "".join(made)


def fails_after_output(path: str, ctx: Context) -> str:
    """Emit a piece, then fail the try that creates the file PATH; the next try succeeds."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        ctx.emit("second try ")
        return "second try"
    ctx.emit("first try ")
    raise RuntimeError("first try fails")


def bench(text: str, ctx: Context) -> str:
    """For tests/bench_progress.py: "paced N S" emits N pieces, each the time.time() it was
    emitted at, S seconds apart; "tokens N MODE" is tokens("N MODE")."""
    kind, _, rest = text.partition(" ")
    if kind == "tokens":
        return tokens(rest, ctx)
    n, interval = rest.split()
    for _ in range(int(n)):
        ctx.emit(f"{time.time():.6f} ")
        time.sleep(float(interval))
    return "paced"
