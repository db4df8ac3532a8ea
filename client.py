"""Submit a job to the job queue server and wait for its result.

    python client.py "hello world"          # prints HELLO WORLD
    python client.py --no-wait "hello"      # prints the job id and returns
    python client.py --watch ID             # follows a job submitted earlier

Progress goes to stderr, the result to stdout. The client follows the job over the WebSocket;
if the connection drops (a server restart, say) it asks /status and reconnects until --timeout.
Exit status: 0 done, 1 failed, 2 usage or connection error, 3 timed out (130: Ctrl+C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import urllib.parse
from typing import Any

import aiohttp

DONE, FAILED, UNREACHABLE, TIMED_OUT = 0, 1, 2, 3
RECONNECT_CAP = 2.0  # seconds between reconnection tries at most


class Unreachable(Exception):
    """The server cannot be reached, or refused the request; the message says why."""


def say(message: str) -> None:
    print(f"client: {message}", file=sys.stderr, flush=True)


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


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, more than 0."""
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range (more than 0)")
    return value


async def request_json(session: aiohttp.ClientSession, method: str, url: str,
                       **kwargs: Any) -> dict[str, Any]:
    try:
        async with session.request(method, url, **kwargs) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError) as exc:
        raise Unreachable(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status >= 400:
        raise Unreachable(f"server said {response.status}: {body.get('error', body)}")
    return body  # type: ignore[no-any-return]


def outcome(job: dict[str, Any]) -> int | None:
    """Print a terminal job's result (stdout) or error (stderr); None if it is not over."""
    if job["status"] == "done":
        print(job["result"], flush=True)
        return DONE
    if job["status"] == "failed":
        say(f"job {job['id']} failed: {job.get('error', '')}")
        return FAILED
    return None


async def follow(session: aiohttp.ClientSession, server: str, job_id: str) -> int:
    """Follow the job over the WebSocket until it ends, reconnecting after drops."""
    delay, last = 0.1, ""
    while True:
        try:
            async with session.ws_connect(f"{server}/ws", params={"id": job_id}) as ws:
                delay = 0.1
                async for message in ws:
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        break
                    job = json.loads(message.data)
                    if job["status"] != last:
                        say(f"job {job_id}: {job['status']}")
                        last = job["status"]
                    if (code := outcome(job)) is not None:
                        return code
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (400, 403, 404):
                raise Unreachable(f"server refused to follow job {job_id}: {exc.status} "
                                  f"{exc.message}") from None
        except aiohttp.ClientError:
            pass
        say(f"connection to {server} lost; reconnecting in {delay:.1f}s")
        try:  # the end may have come while we were away
            job = await request_json(session, "GET", f"{server}/status", params={"id": job_id})
            if (code := outcome(job)) is not None:
                return code
        except Unreachable:
            pass
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_CAP)


async def run(args: argparse.Namespace) -> int:
    server = args.server.rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_connect=5)) as session:
        try:
            job_id = args.watch
            if job_id is None:
                job = await request_json(session, "POST", f"{server}/submit",
                                         json={"input": args.text})
                job_id = job["id"]
                if args.no_wait:
                    print(job_id)
                    return DONE
                say(f"submitted job {job_id}")
            else:  # fail fast on an unknown id or a server that is not there
                await request_json(session, "GET", f"{server}/status", params={"id": job_id})
            return await asyncio.wait_for(follow(session, server, job_id), args.timeout)
        except Unreachable as exc:
            say(str(exc))
            return UNREACHABLE
        except TimeoutError:
            say(f"timed out after {args.timeout:g}s waiting for job {job_id}")
            return TIMED_OUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 done, 1 failed, 2 usage or connection error, 3 timed out")
    parser.add_argument("text", nargs="?", help="the job's input")
    server = os.environ.get("JOBS_SERVER", "http://127.0.0.1:8080")
    try:
        server_url(server)
    except argparse.ArgumentTypeError as exc:
        parser.exit(2, f"{parser.prog}: error: environment variable JOBS_SERVER={server!r}: "
                       f"{exc}\n")
    parser.add_argument("--server", type=server_url, default=server,
                        help="server URL (env JOBS_SERVER; default %(default)s)")
    parser.add_argument("--timeout", type=seconds, default=60.0,
                        help="seconds to wait for the job to end (default %(default)s)")
    parser.add_argument("--watch", metavar="ID",
                        help="follow an existing job instead of submitting one")
    parser.add_argument("--no-wait", action="store_true",
                        help="submit, print the job id, and exit")
    args = parser.parse_args(argv)
    if (args.text is None) == (args.watch is None):
        parser.error("give either TEXT to submit or --watch ID, not both or neither")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
