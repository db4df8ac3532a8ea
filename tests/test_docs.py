"""The docs stay true.

- The README's examples run: for each `./run_all.sh` line of the README (the quick start's,
  and the handler section's with its JOB_HANDLER), run_all.sh is started as written (its own
  Redis, on a free port), the README's `# NAME.py` Python blocks are put where the worker finds
  them, and every `console` block of the sections that use that setup is run: each `$ command`
  (`\\` continues it) must print exactly the lines shown below it, job ids, times and worker
  names aside (an id shown twice must be the same id twice). A `sh` block is not run.
- The quick start's test command is the one `.ci/run` runs (the run command's `./run_all.sh`
  is run above; its `pip install .` is the test command's `pip install '.[test]'` less the
  extra, which CI runs).
- A `console` block of a docs page is run as it is, with no system started (a bad setting's
  error, say), and must print what the page shows.
- docs/settings.md lists every flag, variable and default that each program's `--help` (and
  `run_all.sh`'s own code) has, and nothing they do not.
- Every relative link and #anchor in README.md, CHANGELOG.md and docs/ resolves.
"""

from __future__ import annotations

import functools
import json
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_until
from tests.test_run_all import RunAll

README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SETTINGS = ROOT / "docs" / "settings.md"

# What an example's output may differ in: a job id, a time, a worker's name.
ID = r"[0-9a-f]{32}"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)"
WORKER = r"[^\s\"/]+-\d+-[0-9a-f]+/\d+"
# The client's line for a job it finds still running: the README says it may show or not.
RUNNING = re.compile(f"client: job {ID}: running")
VARYING = re.compile(f"(?P<id>{ID})|(?P<time>{TIME})|(?P<worker>{WORKER})")


@dataclass
class Block:
    """A fenced block of a Markdown file: its language, its lines, and the ## section it is in."""

    lang: str
    lines: list[str]
    section: str


def blocks(path: Path) -> list[Block]:
    found: list[Block] = []
    section, fence, lines = "", None, list[str]()
    for line in path.read_text().splitlines():
        if fence is None and line.startswith("## "):
            section = line[3:].strip()
        elif fence is None and line.startswith("```"):
            fence, lines = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            found.append(Block(fence, lines, section))
            fence = None
        elif fence is not None:
            lines.append(line)
    return found


@dataclass
class Step:
    command: str
    output: list[str]


def transcript(block: Block) -> list[Step]:
    """A console block as commands (`$ ...`, continued by a trailing backslash) and the lines
    each prints."""
    steps: list[Step] = []
    continued = False
    for line in block.lines:
        if continued:
            steps[-1].command += "\n" + line
        elif line.startswith("$ "):
            steps.append(Step(line[2:], []))
        else:
            assert steps, f"output before any command in {block.section!r}: {line!r}"
            steps[-1].output.append(line)
        continued = line.endswith("\\") and not steps[-1].output
    for step in steps:
        while step.output and not step.output[-1].strip():
            step.output.pop()
    return steps


@dataclass
class Setup:
    """One way the README starts the system, and the examples run against it."""

    env: dict[str, str]
    sections: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def run_all_env(block: Block) -> dict[str, str] | None:
    """The variables a `sh` block's `./run_all.sh` line sets, or None if it has none."""
    for line in block.lines:
        command = line.split("#")[0].split("&&")[-1]
        words = shlex.split(command)
        if "./run_all.sh" in words:
            assigned = words[:words.index("./run_all.sh")]
            assert all(re.fullmatch(r"[A-Z_]+=.*", w) for w in assigned), line
            return dict(word.split("=", 1) for word in assigned)
    return None


def setups() -> list[Setup]:
    """The README's setups in order; a section with no `./run_all.sh` of its own uses the last
    one started before it ("with the quick start running")."""
    found: list[Setup] = []
    for block in blocks(README):
        if block.lang == "sh" and (env := run_all_env(block)) is not None:
            found.append(Setup(env))
        elif block.lang == "console":
            assert found, f"a console block in {block.section!r} before any ./run_all.sh"
            if block.section not in found[-1].sections:
                found[-1].sections.append(block.section)
            found[-1].steps += transcript(block)
    return found


def modules() -> dict[str, str]:
    """The README's Python blocks that name their file on their first line: `# NAME.py`."""
    named: dict[str, str] = {}
    for block in blocks(README):
        if block.lang == "python" and (match := re.fullmatch(r"# (\w+\.py)",
                                                             "".join(block.lines[:1]))):
            named[match[1]] = "\n".join(block.lines) + "\n"
    return named


def pattern(line: str, ids: dict[str, str]) -> tuple[re.Pattern[str], dict[str, str]]:
    """A regex for an output line of the README: ids, times and worker names vary, but an id
    already seen must be the job it was then. Returns it with the README ids its groups name."""
    parts, groups, pos = list[str](), dict[str, str](), 0
    for match in VARYING.finditer(line):
        parts.append(re.escape(line[pos:match.start()]))
        pos = match.end()
        shown = match.group()
        if match["id"] and shown in ids:
            parts.append(re.escape(ids[shown]))
        elif match["id"] and shown in groups.values():
            name = next(name for name, value in groups.items() if value == shown)
            parts.append(f"(?P={name})")
        elif match["id"]:
            name = f"id{len(groups)}"
            groups[name] = shown
            parts.append(f"(?P<{name}>{ID})")
        else:
            parts.append(TIME if match["time"] else WORKER)
    parts.append(re.escape(line[pos:]))
    return re.compile("".join(parts)), groups


def ended(port: int, job_id: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status?id={job_id}",
                                timeout=5) as response:
        return json.load(response)["status"] in ("done", "failed", "cancelled")


def in_a_terminal(command: str, env: dict[str, str], timeout: float = 60.0) -> str:
    """What a terminal shows while bash runs the command: its stdout and stderr, in the order
    written, as a reader sees them (curl shows no progress meter on a terminal)."""
    master, terminal = pty.openpty()
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{command!r} still ran after {timeout} s; it printed {shown!r}")
            if not select.select([master], [], [], left)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not data:
                break
            shown += data
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return shown.decode().replace("\r\n", "\n")


def run_step(step: Step, port: int, ids: dict[str, str], env: dict[str, str]) -> None:
    command = re.sub(r"\b(localhost|127\.0\.0\.1):8080\b", rf"\1:{port}", step.command)
    for shown in re.findall(rf"\b{ID}\b", command):
        assert shown in ids, f"{step.command!r} uses a job id no output before it showed"
        command = command.replace(shown, ids[shown])
    for job_id in ids.values():  # a reader runs it after the job ended, as the README shows
        if job_id in command:
            wait_until(functools.partial(ended, port, job_id), timeout=30,
                       what=f"job {job_id} to end")
    output = in_a_terminal(command, env)
    printed = output.splitlines()
    while printed and not printed[-1].strip():
        printed.pop()
    if not any(RUNNING.fullmatch(line) for line in step.output):  # as the README says: the
        printed = [line for line in printed if not RUNNING.fullmatch(line)]  # job's pace
    shown = "\n".join(step.output)
    assert len(printed) == len(step.output), (
        f"$ {step.command}\nprinted:\n{output}\nthe README shows:\n{shown}")
    for got, want in zip(printed, step.output, strict=True):
        regex, groups = pattern(want, ids)
        match = regex.fullmatch(got)
        assert match, f"$ {step.command}\nprinted:\n{got}\nthe README shows:\n{want}"
        ids.update({shown_id: match[name] for name, shown_id in groups.items()})


SETUPS = setups()


def test_the_readme_has_its_examples() -> None:
    """The quick start and the first job, with the client and with curl, are there to run."""
    commands = [step.command for setup in SETUPS for step in setup.steps]
    assert SETUPS and SETUPS[0].env == {}, "the quick start starts ./run_all.sh as it is"
    assert any(c.startswith("python3 client.py") for c in commands)
    assert any(c.startswith("curl -X POST") for c in commands)
    assert any(c.startswith("curl -N") and "/events" in c for c in commands)


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: " ".join(
    f"{k}={v}" for k, v in s.env.items()) or "quick start")
def test_the_readme_examples_print_what_the_readme_shows(setup: Setup, tmp_path: Path) -> None:
    path = tmp_path / "modules"
    path.mkdir()
    for name, text in modules().items():
        (path / name).write_text(text)
    run_all = RunAll(tmp_path, PYTHONPATH=str(path), **setup.env)
    try:
        run_all.ready()
        env = {**os.environ, "JOBS_SERVER": f"http://127.0.0.1:{run_all.port}"}
        env.pop("JOBS_TOKEN", None)
        ids: dict[str, str] = {}
        for step in setup.steps:
            run_step(step, run_all.port, ids, env)
        run_all.proc.terminate()
        assert run_all.finish() == 0, run_all.output()
    finally:
        run_all.kill()


@pytest.mark.parametrize("page", PAGES[2:], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_transcripts_of_docs_pages_print_what_they_show(page: Path) -> None:
    """A docs page's console blocks need no running system (a bad setting, say): each runs as
    it is, and prints what the page shows."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOBS_TOKEN", "PORT")}
    for block in blocks(page):
        if block.lang == "console":
            for step in transcript(block):
                run_step(step, 8080, {}, env)


def test_every_handler_the_readme_names_loads(tmp_path: Path) -> None:
    """Each MODULE:FUNCTION of the README's own modules loads in a worker (--check)."""
    for name, text in modules().items():
        (tmp_path / name).write_text(text)
    names = {name.removesuffix(".py") for name in modules()}
    specs = {spec for spec in re.findall(r"\b(\w+:\w+)\b", README.read_text())
             if spec.split(":")[0] in names}
    assert specs, "the README names none of its handlers"
    for spec in sorted(specs):
        checked = subprocess.run([sys.executable, "worker.py", "--handler", spec, "--check"],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                                 capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, f"{spec}: {checked.stderr}"


def test_the_quick_start_tests_with_the_command_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command, verbatim:") + 1]
    quick_start = next(b for b in blocks(README) if b.section == "Quick start" and b.lang == "sh")
    commands = [line.split("#")[0].strip() for line in quick_start.lines]
    assert commands == ["python3 -m pip install . && ./run_all.sh", command]


# --- settings ---------------------------------------------------------------------------------

@dataclass
class Option:
    env: str
    default: str


def help_options(program: str) -> dict[str, Option]:
    """Every option and positional argument that `PROGRAM --help` lists (but --help), with
    the variable and default its help names ("" if none)."""
    text = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, check=True,
                          env={**os.environ, "COLUMNS": "1000"}, capture_output=True,
                          text=True, timeout=30).stdout
    entries: list[str] = []
    listing = False
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            listing = line in ("options:", "positional arguments:")
        elif listing and re.match(r"  \S", line):
            entries.append(line.strip())
        elif listing and line.startswith("   "):  # its help, on the lines below
            entries[-1] += "  " + line.strip()
    options: dict[str, Option] = {}
    for entry in entries:
        invocation, _, helptext = entry.partition("  ")
        names = re.findall(r"--[a-z][a-z-]*", invocation) or [invocation.strip()]
        env = re.search(r"\benv ([A-Z_]+)", helptext)
        default = re.search(r"\bdefault:? ([^;)]+)", helptext)
        for name in names:
            if name != "--help":
                options[name] = Option(env[1] if env else "", default[1].strip() if default else "")
    return options


def settings_table(program: str) -> dict[str, Option]:
    """The rows of docs/settings.md's table under `## PROGRAM`: first cell, env, default."""
    text = SETTINGS.read_text()
    section = text.split(f"\n## {program}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, Option] = {}
    for line in section.splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        if program == "run_all.sh":  # env | default | what
            rows[cells[0]] = Option(cells[0], cells[1])
        else:  # flag | env | default | what
            rows[cells[0]] = Option(cells[1], cells[2])
    return rows


def same_default(documented: str, helped: str) -> bool:
    if documented in ("none", "unset"):
        documented = ""
    try:
        return float(documented) == float(helped)
    except ValueError:
        return documented == helped


@pytest.mark.parametrize("program", ["server.py", "worker.py", "client.py"])
def test_the_settings_page_lists_every_flag_of_each_program(program: str) -> None:
    helped, documented = help_options(program), settings_table(program)
    assert set(helped) - set(documented) == set(), f"in {program} --help, not in settings.md"
    assert set(documented) - set(helped) == set(), f"in settings.md, not in {program} --help"
    for name, option in helped.items():
        row = documented[name]
        assert row.env == option.env, f"{program} {name}: env {row.env!r}, --help {option.env!r}"
        if option.default:
            assert same_default(row.default, option.default), (
                f"{program} {name}: default {row.default!r}, --help {option.default!r}")


def test_the_settings_page_lists_every_variable_of_run_all() -> None:
    script = (ROOT / "run_all.sh").read_text()
    defaults = {name: value.replace("$PWD/", "./")
                for name, value in re.findall(r"\$\{(\w+):-([^}]*)\}", script)}
    documented = settings_table("run_all.sh")
    assert set(documented) == set(defaults)
    for name, value in defaults.items():
        assert same_default(documented[name].default, value), (name, documented[name], value)


# --- links ------------------------------------------------------------------------------------

def prose(path: Path) -> str:
    """The Markdown outside fenced blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the file's headings (their inline code kept as text)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in found:
            n += 1
            unique = f"{slug}-{n}"
        found.add(unique)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert broken == [], f"{page.relative_to(ROOT)}: " + "; ".join(broken)
