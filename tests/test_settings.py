"""Bad settings get the same care as bad requests: in every program, a flag or environment
variable of the wrong type or out of range is one line naming it and exit 2, before anything
starts. No Redis is needed: REDIS_URL points where nothing listens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.test_run_all import RunAll

# program, setting (a flag or an environment variable), then bad values: of the wrong type,
# then out of range (a prefix has only one way to be wrong: empty)
BAD = [
    ("server.py", "--port", "abc", "0", "65536"),
    ("server.py", "PORT", "abc", "0"),
    ("server.py", "--max-input-bytes", "1.5", "0"),
    ("server.py", "MAX_INPUT_BYTES", "abc", "-1"),
    ("server.py", "--redis-url", "localhost:6379", "redis://localhost:99999/0"),
    ("server.py", "REDIS_URL", "localhost:6379", "redis://localhost:99999/0"),
    ("server.py", "--prefix", ""),
    ("server.py", "JOBS_PREFIX", ""),
    ("server.py", "--redis-url", "redis+sentinel://h/svc", "redis+sentinel://h:1/",
     "redis+sentinel://h:1/svc/x"),
    ("worker.py", "--redis-url", "redis+cluster://h", "redis+cluster://h:1/0",
     "redis+cluster://h:1,h2"),
    ("server.py", "--min-replicas", "one", "-1"),
    ("server.py", "JOBS_MIN_REPLICAS", "1.5", "-1"),
    ("worker.py", "--min-replicas", "one", "-1"),
    ("worker.py", "JOBS_MIN_REPLICAS", "x"),
    ("server.py", "--retention", "1.5", "0"),
    ("server.py", "JOBS_RETENTION", "abc", "-1"),
    ("server.py", "--token", ""),
    ("server.py", "JOBS_TOKEN", ""),
    ("server.py", "--token-file", "/no/such/file"),
    ("worker.py", "--redis-url", "localhost:6379", "redis://localhost:99999/0"),
    ("worker.py", "REDIS_URL", "localhost:6379", "redis://localhost:99999/0"),
    ("worker.py", "--handler", "nocolon", "no_such_module:f", "handlers:nope"),
    ("worker.py", "JOB_HANDLER", "nocolon", "handlers:nope"),
    ("worker.py", "--concurrency", "abc", "0"),
    ("worker.py", "WORKER_CONCURRENCY", "2.5", "0"),
    ("worker.py", "--timeout", "abc", "-1"),
    ("worker.py", "JOB_TIMEOUT", "inf", "-1"),
    ("worker.py", "--max-attempts", "abc", "0"),
    ("worker.py", "--lease", "abc", "2"),
    ("worker.py", "--grace", "nan", "-1"),
    ("worker.py", "--backoff", "abc", "-0.5"),
    ("worker.py", "--retention", "1.5", "0"),
    ("worker.py", "JOBS_RETENTION", "abc", "-1"),
    ("worker.py", "--prefix", ""),
    ("worker.py", "JOBS_PREFIX", ""),
    ("client.py", "--server", "localhost:8080", "ftp://x", "http://", "http://x:99999"),
    ("client.py", "JOBS_SERVER", "localhost:8080", "ftp://x"),
    ("client.py", "--timeout", "abc", "0", "-1"),
]


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a program to its end (a started server or worker would not end: the timeout fails
    the test and kills it), with Redis and the server where nothing listens."""
    nowhere = f"127.0.0.1:{free_port()}"
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PORT": str(free_port()),
               "REDIS_URL": f"redis://{nowhere}/0", "JOBS_SERVER": f"http://{nowhere}", **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=20)


@pytest.mark.parametrize(("program", "setting", "value"), [
    pytest.param(program, setting, value, id=f"{program} {setting}={value}")
    for program, setting, *values in BAD for value in values])
def test_a_bad_setting_is_one_line_and_exit_2(program: str, setting: str, value: str) -> None:
    flag = setting.startswith("--")
    args = [f"{setting}={value}"] if flag else []
    result = run(program, *args, *(["x"] if program == "client.py" else []),
                 **({} if flag else {setting: value}))
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    named = f"argument {setting}: " if flag else f"environment variable {setting}={value!r}: "
    assert last.startswith(f"{program}: error: {named}"), result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_the_environment_is_checked_even_when_a_flag_overrides_it() -> None:
    result = run("server.py", "--port", "8080", "--check", PORT="abc")
    assert result.returncode == 2
    assert result.stderr == ("server.py: error: environment variable PORT='abc': "
                             "'abc' is not a whole number\n")


@pytest.mark.parametrize("args", [
    ["server.py"], ["worker.py"], ["worker.py", "--handler", "handlers:fail", "--lease", "2.5"],
    ["server.py", "--redis-url", "redis+sentinel://a:26379,[::1]:26380/jobs/2"],
    ["worker.py", "--min-replicas", "1", "--redis-url", "redis+sentinel://:pw@a:1/jobs"],
    ["server.py", "--redis-url", "redis+cluster://a:7000,[::1]:7001"],
    ["worker.py", "--redis-url", "redis+cluster://:pw@a:7000"]])
def test_check_with_good_settings_exits_0_without_redis(args: list[str]) -> None:
    result = run(*args, "--check")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(("variable", "value"), [
    ("WORKERS", "abc"), ("WORKERS", "0"), ("PYTHON", "no-such-python"),
    ("PORT", "abc"), ("MAX_INPUT_BYTES", "0"), ("REDIS_URL", "localhost:6379"),
    ("JOBS_PREFIX", ""), ("JOB_HANDLER", "nocolon"), ("JOBS_RETENTION", "-1"),
    ("WORKER_CONCURRENCY", "0"), ("JOB_TIMEOUT", "x"),
])
def test_run_all_starts_nothing_with_a_bad_setting(tmp_path: Path, variable: str,
                                                   value: str) -> None:
    run_all = RunAll(tmp_path, **{variable: value})
    try:
        assert run_all.finish() == 2  # finish() also checks that nothing is left running
        output = run_all.output()
        assert len(output.splitlines()) == 1 and f"{variable}={value!r}" in output, output
        assert not (run_all.data / "redis.sock").exists()
        assert not (run_all.data / "redis.log").exists()
    finally:
        run_all.kill()



@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_the_server_will_not_listen_beyond_loopback_without_a_token(host: str,
                                                                    tmp_path: Path) -> None:
    refused = run("server.py", "--host", host, "--check")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        f"server: refusing to listen on {host} without a token: anyone who can reach it could "
        f"read, submit and cancel jobs. Set JOBS_TOKEN (or --token-file), listen on 127.0.0.1, "
        f"or pass --insecure-no-auth.\n")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    for args, env in [(["--insecure-no-auth"], {}), ([], {"JOBS_TOKEN": "s3cret-token"}),
                      (["--token-file", str(token)], {})]:
        result = run("server.py", "--host", host, *args, "--check", **env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    result = run("server.py", "--host", host, "--check")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_token_file_must_hold_a_token_and_excludes_token(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = run("server.py", "--token-file", str(empty), "--check")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"server.py: error: argument --token-file: {empty} holds no token")
    result = run("server.py", "--token", "a", "--token-file", str(empty), "--check")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr.splitlines()[-1]
