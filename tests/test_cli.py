"""The `comfy-serverless` CLI (`python -m serverless.cli`) against the app and the emulator: run
writes the PNGs and prints the seeds, bad usage is one line and exit 2, progress renders in a
pseudo-terminal, hosted workflows, and (with job control merged) --async then task and cancel."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.helpers import running_prompt, txt2img, wait_until
from tests.servers import ROOT, App, Emulator

CLI = [sys.executable, "-m", "serverless.cli"]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMFY_SERVERLESS_URL": url}
    return subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "txt2img.json"
    path.write_text(json.dumps(txt2img(size=24)))
    return path


@pytest.fixture
def hosted(start_app: Callable[..., App], emulator: Emulator, tmp_path: Path) -> App:
    return start_app(emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))


def test_run_writes_the_pngs_and_prints_the_seeds(app: App, workflow_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = cli(
        app.url,
        "run",
        str(workflow_file),
        "--set",
        "6.text=a cat",
        "--set",
        "3.seed=-1",
        "--set",
        "5.batch_size=2",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (24, 24) for p in pngs)
    assert f"wrote {pngs[0]}" in done.stdout
    seed_lines = [line for line in done.stdout.splitlines() if line.startswith("seed 3.seed=")]
    assert len(seed_lines) == 1 and int(seed_lines[0].split("=")[1]) >= 0


@pytest.mark.parametrize("bad", ["6.text", "text=a cat", "=x", "99.text=a cat"])
def test_bad_set_is_one_line_and_exit_2(app: App, workflow_file: Path, bad: str) -> None:
    done = cli(app.url, "run", str(workflow_file), "--set", bad)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "error" in done.stderr
    assert done.stdout == ""


def test_refused_request_is_one_line_and_exit_3(hosted: App) -> None:
    done = cli(hosted.url, "run", "--workflow-id", "nosuch")
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "NOT_FOUND" in done.stderr


def test_unreachable_server_exits_4(dead_url: str, workflow_file: Path) -> None:
    done = cli(dead_url, "run", str(workflow_file))
    assert done.returncode == 4 and len(done.stderr.strip().splitlines()) == 1


def test_progress_bar_renders_in_a_pseudo_terminal(hosted: App, workflow_file: Path, tmp_path: Path) -> None:
    """rich draws its live bar only on a terminal: run the CLI in a pty and read what it drew."""
    env = {**os.environ, "COMFY_SERVERLESS_URL": hosted.url, "COLUMNS": "120", "TERM": "xterm-256color"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the pty
        os.chdir(ROOT)
        os.execvpe(sys.executable, [*CLI, "run", str(workflow_file), "--out", str(tmp_path)], env)
    drawn = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        drawn += chunk
    _, status = os.waitpid(pid, 0)
    text = drawn.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "━" in text and "100%" in text and "txt2img" in text
    assert "seed 3.seed=" in text


def test_workflows_put_list_show_rm(hosted: App, workflow_file: Path) -> None:
    assert cli(hosted.url, "workflows", "put", "t2i", str(workflow_file)).returncode == 0
    listed = cli(hosted.url, "workflows", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("t2i\t")
    shown = json.loads(cli(hosted.url, "workflows", "show", "t2i").stdout)
    assert "6.text" in {p["name"] for p in shown["parameters"]}
    out = str(Path(hosted.log).parent / "o")
    ran = cli(hosted.url, "run", "--workflow-id", "t2i", "--set", "6.text=a dog", "--out", out)
    assert ran.returncode == 0, ran.stderr
    assert cli(hosted.url, "workflows", "rm", "t2i").returncode == 0
    assert cli(hosted.url, "workflows", "show", "t2i").returncode == 3


def test_async_prints_the_task_id_and_events_prints_its_log(app: App, workflow_file: Path) -> None:
    done = cli(app.url, "run", str(workflow_file), "--async", "--task-id", "cli-async-1")
    assert done.returncode == 0 and done.stdout.strip() == "cli-async-1"
    status = app.url + "/api/serverless/status"
    wait_until(
        lambda: (
            (log := requests.get(status, params={"task_id": "cli-async-1"}, timeout=5).json())
            and log[-1]["type"] == "serverless_api"
        )
    )
    events = cli(app.url, "events", "cli-async-1")
    assert events.returncode == 0 and json.loads(events.stdout.splitlines()[-1])["type"] == "serverless_api"


def test_async_then_task_and_cancel(start_app: Callable[..., App], own_emulator: Emulator, workflow_file: Path) -> None:
    """Needs job control (issue 13): `task` and `cancel` from the CLI, `events --follow`."""
    app = start_app(own_emulator.url)
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.2}, timeout=5).raise_for_status()
    started = cli(app.url, "run", str(workflow_file), "--set", "3.steps=100", "--async", "--task-id", "cli-cancel-1")
    assert started.returncode == 0, started.stderr
    wait_until(lambda: running_prompt(own_emulator.url))
    task = cli(app.url, "task", "cli-cancel-1")
    assert task.returncode == 0, task.stderr
    assert json.loads(task.stdout)["state"] in ("queued", "running")
    cancel = cli(app.url, "cancel", "cli-cancel-1")
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["state"] == "cancelling"
    follow = cli(app.url, "events", "cli-cancel-1", "--follow")
    assert follow.returncode == 5  # the job ended cancelled
    assert json.loads(follow.stdout.splitlines()[-1])["error_code"] == "EXECUTION_INTERRUPTED"
    assert cli(app.url, "cancel", "cli-cancel-1").returncode == 3  # already finished: 409
