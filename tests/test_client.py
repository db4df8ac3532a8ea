"""client.py against a real server and worker, as a user runs it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

import client as library
from tests.conftest import ROOT, Procs, free_port, port_open, stop, wait_until


def client(procs: Procs, *args: str, timeout: float = 60,
           token: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run client.py; JOBS_TOKEN is set only if a token is given, whatever the caller's is."""
    env = {name: value for name, value in procs.env().items() if name != "JOBS_TOKEN"}
    if token is not None:
        env["JOBS_TOKEN"] = token
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library reads JOBS_TOKEN: none from the environment of whoever runs the tests."""
    monkeypatch.delenv("JOBS_TOKEN", raising=False)


@pytest.mark.cluster
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
    ["--server", "http://127.0.0.1:1", "--timeout", "1", "x"],
])
def test_connection_errors_exit_2_in_one_line(procs: Procs, server: str,
                                              args: list[str]) -> None:
    result = client(procs, "--server", server, *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    [], ["x", "--watch", "0" * 32], ["--stats", "--list", "done"], ["--delay", "1", "--stats"],
    ["--delay", "-1", "x"], ["--limit", "5", "x"], ["--list", "done", "--limit", "0"],
    ["--list", "finished"], ["--no-wait", "--watch", "0" * 32], ["--token", "", "x"]])
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


def test_library_submit_then_wait_returns_the_done_job(procs: Procs, server: str) -> None:
    job = library.submit("hello library", server=server)
    assert job["status"] == "queued" and re.fullmatch(r"[0-9a-f]{32}", job["id"])
    procs.worker()  # started after the submit, so wait() follows the job over the WebSocket
    done = library.wait(job["id"], server=server, timeout=30)
    assert (done["id"], done["status"], done["result"]) == (job["id"], "done", "HELLO LIBRARY")
    assert (done["input"], done["created"]) == ("hello library", job["created"])


def test_library_wait_raises_on_timeout_and_on_refusal(procs: Procs, server: str) -> None:
    job = library.submit("nobody works", server=server)
    with pytest.raises(TimeoutError, match=r"timed out after 0.3s waiting for job"):
        library.wait(job["id"], server=server, timeout=0.3)
    with pytest.raises(library.ServerError) as refused:
        library.wait("0" * 32, server=server)
    assert refused.value.status == 404 and refused.value.error
    with pytest.raises(library.ServerError, match="cannot reach") as unreachable:
        library.submit("x", server=f"http://127.0.0.1:{free_port()}", retry_for=0)
    assert unreachable.value.status is None


def test_submit_with_a_delay_is_delayed_then_runs(procs: Procs, server: str) -> None:
    job = library.submit("later", server=server, delay=60)
    assert job["status"] == "delayed" and job["run_at"]
    procs.worker()
    result = client(procs, "--server", server, "--delay", "0.5", "soon")
    assert (result.returncode, result.stdout) == (0, "SOON\n"), result.stderr
    delayed = client(procs, "--server", server, "--list", "delayed")
    assert job["id"] in delayed.stdout, delayed.stderr


def test_list_done_shows_a_finished_job(procs: Procs, server: str) -> None:
    procs.worker()
    job = library.submit("listed   with\nspaces", server=server)
    library.wait(job["id"], server=server, timeout=30)
    listed = client(procs, "--server", server, "--list", "done")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(job["id"]))
    assert re.fullmatch(rf"{job['id']}  done       \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\S*"
                        r"  listed with spaces", line), line
    assert "1 done job" in listed.stderr
    assert client(procs, "--server", server, "--list", "failed").stdout == ""


def test_list_follows_the_cursor_up_to_the_limit(procs: Procs, server: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    procs.worker()
    ids = [library.submit(f"job {n}", server=server)["id"] for n in range(5)]
    for job_id in ids:
        library.wait(job_id, server=server, timeout=30)
    monkeypatch.setattr(library, "PAGE", 2)  # pages of 2, so 3 requests for 5 jobs
    assert library.main(["--server", server, "--list", "done", "--limit", "4"]) == 0
    shown = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(shown) == 4 and set(shown) < set(ids)
    assert library.main(["--server", server, "--list", "done", "--limit", "9"]) == 0
    assert sorted(line.split()[0] for line in capsys.readouterr().out.splitlines()) == sorted(ids)
    more = client(procs, "--server", server, "--list", "done", "--limit", "2")
    assert len(more.stdout.splitlines()) == 2 and "there are more" in more.stderr


def test_cancel_a_delayed_job(procs: Procs, server: str) -> None:
    job = library.submit("never", server=server, delay=60)
    cancelled = client(procs, "--server", server, "--cancel", job["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {job['id']}: cancelled" in cancelled.stderr
    assert library.wait(job["id"], server=server, timeout=5)["status"] == "cancelled"
    watched = client(procs, "--server", server, "--watch", job["id"])
    assert (watched.returncode, watched.stdout) == (1, "")
    assert f"job {job['id']} was cancelled" in watched.stderr
    again = client(procs, "--server", server, "--cancel", job["id"])
    assert again.returncode == 2 and "409" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr


def test_cancel_a_running_job_ends_its_watcher(procs: Procs, server: str) -> None:
    procs.worker("--handler", "handlers:asleep")
    job = library.submit("30", server=server)
    watching = procs.start(sys.executable, "client.py", "--server", server, "--watch", job["id"],
                           log="watch.log")
    wait_until(lambda: "running" in procs.log(watching), what="the job to run")
    cancelled = client(procs, "--server", server, "--cancel", job["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancel requested" in cancelled.stderr
    assert watching.wait(timeout=15) == 1
    assert f"job {job['id']} was cancelled" in procs.log(watching)


def test_retry_a_failed_job(procs: Procs, server: str) -> None:
    failing = procs.worker("--handler", "handlers:fail", "--max-attempts", "1")
    job = library.submit("again", server=server)
    assert library.wait(job["id"], server=server, timeout=30)["status"] == "failed"
    stop(failing, signal.SIGTERM)
    procs.worker()  # the fixed handler
    retried = client(procs, "--server", server, "--retry", job["id"])
    assert (retried.returncode, retried.stdout) == (0, "AGAIN\n"), retried.stderr
    assert f"retried job {job['id']}" in retried.stderr
    refused = client(procs, "--server", server, "--retry", job["id"])  # done: not retried
    assert refused.returncode == 2 and "409" in refused.stderr


def test_stats(procs: Procs, server: str) -> None:
    procs.worker("--concurrency", "3")
    library.wait(library.submit("counted", server=server)["id"], server=server, timeout=30)
    stats = client(procs, "--server", server, "--stats")
    assert stats.returncode == 0, stats.stderr
    lines = stats.stdout.splitlines()
    assert lines[0].startswith("jobs ") and " done 1 " in f"{lines[0]} "
    assert any(line.startswith("workers    1, 3 slots, 0 busy") for line in lines), lines
    assert any(line.startswith("redis ") and "MiB used" in line for line in lines), lines


@pytest.fixture
def token_server(procs: Procs) -> Iterator[tuple[str, str]]:
    """A server started with JOBS_TOKEN, and that token."""
    port, token = free_port(), f"tok-{uuid.uuid4().hex}"
    proc = procs.start(sys.executable, "server.py", "--port", str(port), log="server.log",
                       env=procs.env(JOBS_TOKEN=token))
    wait_until(lambda: port_open(port) or proc.poll() is not None, what="server to listen")
    assert proc.poll() is None, procs.log(proc)
    yield f"http://127.0.0.1:{port}", token


def test_without_the_token_one_line_and_exit_2(procs: Procs,
                                               token_server: tuple[str, str]) -> None:
    server, token = token_server
    for args in (["x"], ["--list", "done"], ["--stats"], ["--watch", "0" * 32],
                 ["--cancel", "0" * 32], ["--retry", "0" * 32]):
        refused = client(procs, "--server", server, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert refused.stdout == ""
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "needs a token: give --token or set JOBS_TOKEN" in refused.stderr, refused.stderr
    wrong = client(procs, "--server", server, "--token", "not-it", "x")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert "refused the token: check --token or JOBS_TOKEN" in wrong.stderr, wrong.stderr
    assert token not in wrong.stderr


def test_the_token_works_and_is_never_printed(procs: Procs,
                                             token_server: tuple[str, str]) -> None:
    server, token = token_server
    procs.worker()
    by_flag = client(procs, "--server", server, "--token", token, "by flag")
    assert (by_flag.returncode, by_flag.stdout) == (0, "BY FLAG\n"), by_flag.stderr
    by_env = client(procs, "--server", server, "by env", token=token)
    assert (by_env.returncode, by_env.stdout) == (0, "BY ENV\n"), by_env.stderr
    listed = client(procs, "--server", server, "--list", "done", token=token)
    assert listed.returncode == 0 and "by env" in listed.stdout, listed.stderr
    results = [by_flag, by_env, listed]
    results += [client(procs, "--server", server, *args, token=token)
                for args in (["--stats"], ["--help"], ["--token", token, "--help"])]
    assert [r.returncode for r in results] == [0] * len(results)
    assert not [r.args for r in results if token in r.stdout + r.stderr]
    logs = {path.name: path.read_text() for path in procs.logs.values()}
    assert "listening" in logs["server.log"] and "waiting for jobs" in "".join(logs.values())
    assert not [name for name, text in logs.items() if token in text]


def test_library_with_a_token(procs: Procs, token_server: tuple[str, str]) -> None:
    server, token = token_server
    procs.worker()
    with pytest.raises(library.TokenNeeded) as refused:
        library.submit("no token", server=server)
    assert refused.value.status == 401 and token not in str(refused.value)
    job = library.submit("library", server=server, token=token)
    assert library.wait(job["id"], server=server, token=token)["result"] == "LIBRARY"
    with pytest.raises(library.TokenNeeded):
        library.wait(job["id"], server=server)


def test_library_takes_the_token_from_jobs_token(procs: Procs, token_server: tuple[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    server, token = token_server
    procs.worker()
    monkeypatch.setenv("JOBS_TOKEN", token)
    job = library.submit("from the environment", server=server)
    assert library.wait(job["id"], server=server)["result"] == "FROM THE ENVIRONMENT"
