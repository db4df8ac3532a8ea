"""client.py against a real server and worker, as a user runs it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, Procs, free_port, wait_until


def client(procs: Procs, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, env=procs.env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def server(procs: Procs) -> Iterator[str]:
    port = free_port()
    procs.server(port)
    yield f"http://127.0.0.1:{port}"


def test_hello_world(procs: Procs, server: str) -> None:
    procs.worker()
    result = client(procs, "--server", server, "hello world")
    assert (result.returncode, result.stdout) == (0, "HELLO WORLD\n"), result.stderr
    assert "submitted job" in result.stderr


def test_failed_job_exits_1(procs: Procs, server: str) -> None:
    procs.worker("--handler", "handlers:fail", "--max-attempts", "1")
    result = client(procs, "--server", server, "x")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "failed: ValueError: cannot handle 'x'" in result.stderr


def test_no_wait_then_watch(procs: Procs, server: str) -> None:
    submitted = client(procs, "--server", server, "--no-wait", "later")
    assert submitted.returncode == 0
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    procs.worker()
    watched = client(procs, "--server", server, "--watch", job_id)
    assert (watched.returncode, watched.stdout) == (0, "LATER\n")


def test_timeout_exits_3(procs: Procs, server: str) -> None:
    result = client(procs, "--server", server, "--timeout", "0.5", "nobody works")
    assert result.returncode == 3
    assert "timed out after 0.5s" in result.stderr


@pytest.mark.parametrize("args", [
    ["--watch", "0" * 32],
    ["--server", "http://127.0.0.1:1", "x"],
])
def test_connection_errors_exit_2_in_one_line(procs: Procs, server: str,
                                              args: list[str]) -> None:
    result = client(procs, "--server", server, *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["x", "--watch", "0" * 32]])
def test_usage_errors_exit_2(procs: Procs, args: list[str]) -> None:
    result = client(procs, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_client_survives_a_server_restart(procs: Procs) -> None:
    port = free_port()
    server = procs.server(port)
    procs.worker("--handler", "handlers:slow")
    waiting = procs.start(sys.executable, "client.py", "--server", f"http://127.0.0.1:{port}",
                          "3", log="client.log")
    wait_until(lambda: "running" in procs.log(waiting), what="the client to see the job run")
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    procs.server(port)
    assert waiting.wait(timeout=60) == 0
    log = procs.log(waiting)
    assert "connection to" in log and "lost" in log
    assert log.rstrip().endswith("3")  # stdout and stderr share the log: the result is last


@pytest.mark.parametrize(("program", "flag"), [
    ("server.py", "--allowed-origins"), ("worker.py", "--max-attempts"), ("client.py", "--watch")])
def test_help(procs: Procs, program: str, flag: str) -> None:
    result = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, env=procs.env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("usage:") and flag in result.stdout


def test_ctrl_c_is_quiet(procs: Procs, server: str) -> None:
    waiting = procs.start(sys.executable, "client.py", "--server", server, "nobody works",
                          log="client.log")
    wait_until(lambda: "submitted job" in procs.log(waiting), what="the client to submit")
    waiting.send_signal(signal.SIGINT)
    assert waiting.wait(timeout=20) == 130
    assert "Traceback" not in procs.log(waiting)
    assert "interrupted" in procs.log(waiting)
