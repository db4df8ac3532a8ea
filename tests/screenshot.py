"""Take docs/dashboard.png: the dashboard at 1280x900 with a few jobs in every state.

    python3 -m tests.screenshot [--out docs/dashboard.png]

Runs by hand, from the project's folder: uses the Redis at REDIS_URL (default the local one,
under a key prefix of its own that it deletes afterwards) or, if none answers there, a
throwaway redis-server; starts server.py and two workers, and Debian's chromium (or $CHROMIUM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ROOT, Procs, RedisServer, delete_prefix, free_port, wait_until


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def counts(base: str) -> dict[str, int]:
    return dict(get(f"{base}/stats")["jobs"])


def fill(base: str) -> None:
    """Two or three jobs in each state, made in an order that puts every state on the first
    screen of the newest-first table: cancelled, then done and failed, then two running (each
    worker's one slot busy), two queued behind them, and two delayed."""
    for text in ["old newsletter", "duplicate import"]:
        job = post(f"{base}/submit", {"input": text, "delay": 3600})
        post(f"{base}/jobs/{job['id']}/cancel", {})
    for text in ["resize cat.jpg", "fail: no such file", "send welcome mail"]:
        post(f"{base}/submit", {"input": text})
    wait_until(lambda: counts(base)["done"] == 2 and counts(base)["failed"] == 1,
               what="the first jobs to end")
    for _ in range(2):
        post(f"{base}/submit", {"input": "sleep 120"})
    wait_until(lambda: counts(base)["running"] == 2, what="two jobs to run")
    for text in ["report 2026-11", "rebuild search index"]:
        post(f"{base}/submit", {"input": text})
    for text in ["nightly backup", "weekly digest"]:
        post(f"{base}/submit", {"input": text, "delay": 3600})


def shoot(base: str, out: Path) -> None:
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if executable is None:
        raise SystemExit("screenshot: needs chromium (apt-get install chromium, or set CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/")
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#jobs tbody tr")).to_have_count(11)
        expect(page.locator("#workers tbody tr")).to_have_count(2)
        expect(page.locator("#count-cancelled")).to_have_text("2")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png",
                        help="where to write the PNG (default %(default)s)")
    args = parser.parse_args(argv)
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    folder = Path(tempfile.mkdtemp(prefix="jobs-screenshot-"))
    own = None if RedisServer.answers(redis.Redis.from_url(url)) else RedisServer(folder)
    if own is not None:
        own.start()
        url = own.url
    prefix = f"{{shot-{uuid.uuid4().hex[:8]}}}"
    procs = Procs(url, prefix, folder)
    try:
        port = free_port()
        procs.server(port)
        for _ in range(2):
            procs.worker("--handler", "handlers:demo", "--concurrency", "1",
                         "--max-attempts", "1")
        base = f"http://127.0.0.1:{port}"
        fill(base)
        shoot(base, args.out)
        print(f"screenshot: wrote {args.out}")
    finally:
        procs.stop_all()
        client = redis.Redis.from_url(url)
        delete_prefix(client, prefix)
        client.close()
        if own is not None:
            own.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
