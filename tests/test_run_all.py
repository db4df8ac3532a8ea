"""run_all.sh as a user runs it: started, used, and stopped every way it can be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_until


def session(sid: int) -> list[str]:
    """Every process still in the session, as 'pid command'."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True,
                         text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class RunAll:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.port = free_port()
        self.data = tmp / "data"
        self.log = tmp / "run_all.log"
        environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        environ |= {"PORT": str(self.port), "DATA_DIR": str(self.data), "WORKERS": "2",
                    "PYTHON": sys.executable, **env}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([str(ROOT / "run_all.sh")], env=environ, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def ready(self) -> None:
        wait_until(lambda: healthy(self.port) or self.proc.poll() is not None, timeout=30,
                   what="run_all.sh to serve")
        assert self.proc.poll() is None, self.output()

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def finish(self) -> int:
        code = self.proc.wait(timeout=60)
        assert session(self.proc.pid) == [], self.output()
        return code

    def kill(self) -> None:  # teardown: whatever a failed test left
        for line in session(self.proc.pid):
            os.kill(int(line.split()[0]), signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def run_all(tmp_path: Path) -> Iterator[RunAll]:
    started = RunAll(tmp_path)
    yield started
    started.kill()


def hello(port: int) -> str:
    return subprocess.run([sys.executable, "client.py", "--server", f"http://127.0.0.1:{port}",
                           "hello world"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout


def test_ctrl_c_stops_everything(run_all: RunAll) -> None:
    run_all.ready()
    assert hello(run_all.port) == "HELLO WORLD\n"
    assert any("redis-server" in line for line in session(run_all.proc.pid))
    os.killpg(run_all.proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C does
    assert run_all.finish() == 0
    output = run_all.output()
    assert "stopped" in output
    assert output.count("worker") and "signal again to stop now" in output
    assert list(run_all.data.glob("appendonly*")), "Redis kept no AOF"


def test_sigterm_to_the_script_alone_stops_everything(run_all: RunAll) -> None:
    run_all.ready()
    run_all.proc.send_signal(signal.SIGTERM)
    assert run_all.finish() == 0


@pytest.mark.parametrize("which", ["worker.py", "server.py", "redis-server"])
def test_a_child_dying_stops_the_rest(run_all: RunAll, which: str) -> None:
    run_all.ready()
    victim = next(pid for pid in run_all.children()
                  if which in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(victim, signal.SIGKILL)
    assert run_all.finish() == 1
    assert f"(pid {victim}) exited on its own" in run_all.output()


def test_uses_redis_url_when_set(tmp_path: Path, redis_url: str, prefix: str) -> None:
    run_all = RunAll(tmp_path, REDIS_URL=redis_url, JOBS_PREFIX=prefix)
    try:
        run_all.ready()
        assert not any("redis-server" in line for line in session(run_all.proc.pid))
        assert hello(run_all.port) == "HELLO WORLD\n"
        run_all.proc.send_signal(signal.SIGTERM)
        assert run_all.finish() == 0
    finally:
        run_all.kill()


def test_missing_redis_server_says_how_to_get_it(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "bash"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    result = subprocess.run([str(bin_dir / "bash"), str(ROOT / "run_all.sh")],
                            env={"PATH": str(bin_dir), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "redis-server not found" in result.stderr and "apt-get" in result.stderr
