"""The `comfy-serverless` CLI (`python -m serverless.cli`) against the app and the emulator: run
writes the PNGs and prints the seeds, bad usage is one line and exit 2, progress renders in a
pseudo-terminal, hosted workflows, and (with job control merged) --async then task and cancel."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import requests
from PIL import Image

from serverless.cli import main as cli_main
from tests.helpers import running_prompt, txt2img, wait_until
from tests.servers import ROOT, App, Emulator

CLI = [sys.executable, "-m", "serverless.cli"]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`comfy-serverless ARGS` with COMFY_SERVERLESS_URL=url, run in this process (its `main`, as
    the console script calls it): what it printed and its exit code. The tests of what only a
    process shows (a pseudo-terminal, a closed pipe) start one instead."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, {"COMFY_SERVERLESS_URL": url}), redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code if isinstance(exit_.code, int) else 2
    return subprocess.CompletedProcess([*CLI, *args], code, out.getvalue(), err.getvalue())


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


def test_workflows_versions_and_alias_and_a_run_of_a_version(hosted: App, workflow_file: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.json"
    second.write_text(json.dumps(txt2img(seed=222, size=24)))
    assert cli(hosted.url, "workflows", "put", "v", str(workflow_file)).stdout.startswith("v@1:")
    assert cli(hosted.url, "workflows", "put", "v", str(second)).stdout.startswith("v@2:")
    moved = cli(hosted.url, "workflows", "alias", "v", "prod", "1")
    assert moved.returncode == 0 and moved.stdout.strip() == "v@prod -> 1"
    listed = cli(hosted.url, "workflows", "versions", "v").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["1", "2"] and listed[0].endswith("\tprod")
    shown = json.loads(cli(hosted.url, "workflows", "show", "v@2").stdout)
    assert shown["version"] == 2
    ran = cli(hosted.url, "run", "--workflow-id", "v@prod", "--out", str(tmp_path / "o"))
    assert ran.returncode == 0, ran.stderr
    assert cli(hosted.url, "workflows", "rm", "v@2").returncode == 0
    assert [line.split("\t")[0] for line in cli(hosted.url, "workflows", "versions", "v").stdout.splitlines()] == ["1"]


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
    task = cli(app.url, "task", "cli-cancel-1", "--json")
    assert task.returncode == 0, task.stderr
    assert json.loads(task.stdout)["state"] in ("queued", "running")
    cancel = cli(app.url, "cancel", "cli-cancel-1")
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["state"] == "cancelling"
    follow = cli(app.url, "events", "cli-cancel-1", "--follow")
    assert follow.returncode == 5  # the job ended cancelled
    assert json.loads(follow.stdout.splitlines()[-1])["error_code"] == "EXECUTION_INTERRUPTED"
    assert cli(app.url, "cancel", "cli-cancel-1").returncode == 3  # already finished: 409


@pytest.mark.parametrize(("fmt", "suffix", "pillow_format"), [("jpeg", ".jpg", "JPEG"), ("webp", ".webp", "WEBP")])
def test_converted_outputs_are_saved_under_their_formats_extension(
    app: App, workflow_file: Path, tmp_path: Path, fmt: str, suffix: str, pillow_format: str
) -> None:
    out = tmp_path / "out"
    done = cli(app.url, "run", str(workflow_file), "--format", fmt, "--quality", "80", "--out", str(out))
    assert done.returncode == 0, done.stderr
    saved = sorted(out.iterdir())
    assert [p.suffix for p in saved] == [suffix]
    assert Image.open(saved[0]).format == pillow_format
    assert f"wrote {saved[0]}" in done.stdout


def finished_task(url: str, task_id: str, workflow_file: Path) -> None:
    started = cli(url, "run", str(workflow_file), "--async", "--task-id", task_id)
    assert started.returncode == 0, started.stderr
    wait_until(lambda: json.loads(cli(url, "task", task_id, "--json").stdout)["state"] == "succeeded")


def test_task_summarises_a_finished_task_and_saves_its_outputs_with_out(
    app: App, workflow_file: Path, tmp_path: Path
) -> None:
    finished_task(app.url, "cli-task-summary", workflow_file)
    shown = cli(app.url, "task", "cli-task-summary")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "task cli-task-summary  succeeded  100%"
    assert any(line.startswith("output ComfyUI_") and "image/png" in line for line in lines), shown.stdout
    assert max(len(line) for line in lines) < 200  # a summary, not the base64 of the outputs
    out = tmp_path / "saved"
    saved = cli(app.url, "task", "cli-task-summary", "--out", str(out))
    assert saved.returncode == 0, saved.stderr
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (24, 24)
    assert f"wrote {pngs[0]}" in saved.stdout


def cli_into_a_closed_pipe(url: str, *args: str) -> tuple[int, str]:
    """`cli` with stdout a pipe whose reading end is closed (block-buffered, as a process's
    stdout into a pipe is): its exit code and what it wrote to stderr."""
    read, write = os.pipe()
    os.close(read)
    out = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write, "w")), encoding="utf-8")
    err = io.StringIO()
    try:
        with mock.patch.dict(os.environ, {"COMFY_SERVERLESS_URL": url}), redirect_stdout(out), redirect_stderr(err):
            code = cli_main(list(args))
    finally:
        try:
            out.close()
        except BrokenPipeError:  # what the CLI left in the buffer (it points stdout at /dev/null first)
            pass
    return code, err.getvalue()


def test_a_reader_that_leaves_early_gets_no_traceback(hosted: App, workflow_file: Path) -> None:
    """As `comfy-serverless ... | head` whose head has exited: the pipe's reading end is closed
    before the CLI writes its first line (short answers too, which stay in stdout's buffer). One
    command in a process of its own (exit 141, and no traceback when Python flushes stdout at
    exit); each command's own way of writing in this process."""
    assert cli(hosted.url, "workflows", "put", "t", str(workflow_file)).returncode == 0
    finished_task(hosted.url, "cli-pipe", workflow_file)
    env = {**os.environ, "COMFY_SERVERLESS_URL": hosted.url}
    proc = subprocess.Popen(
        [*CLI, "task", "cli-pipe"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 141, stderr
    assert stderr == ""
    for command in (
        ["task", "cli-pipe"],
        ["task", "cli-pipe", "--json"],
        ["events", "cli-pipe"],
        ["workflows", "show", "t"],
    ):
        assert cli_into_a_closed_pipe(hosted.url, *command) == (141, ""), command


def test_run_without_a_workflow_says_what_to_give(app: App, workflow_file: Path) -> None:
    neither = cli(app.url, "run")
    assert neither.returncode == 2
    assert "give a WORKFLOW.json file or --workflow-id ID" in neither.stderr and "not both" not in neither.stderr
    both = cli(app.url, "run", str(workflow_file), "--workflow-id", "x")
    assert both.returncode == 2 and "not both" in both.stderr


def test_a_url_without_a_scheme_is_taken_as_http_and_a_bad_one_is_usage(hosted: App) -> None:
    listed = cli(hosted.url, "--url", hosted.url.removeprefix("http://"), "workflows", "list")
    assert listed.returncode == 0, listed.stderr
    bad = cli(hosted.url, "--url", "ftp://127.0.0.1:9", "workflows", "list")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--url" in bad.stderr


@pytest.mark.parametrize("command", [["workflows", "list"], ["task", "some-task"], ["run", "WORKFLOW"]])
def test_a_server_that_is_not_this_api_is_named_so(emulator: Emulator, workflow_file: Path, command: list[str]) -> None:
    """The URL of ComfyUI itself (here the emulator) instead of this API's."""
    args = [str(workflow_file) if arg == "WORKFLOW" else arg for arg in command]
    done = cli(emulator.url, *args)
    assert done.returncode == 4, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "this is not a ComfyUI Serverless API" in done.stderr and "UNCLASSIFY" not in done.stderr


def test_workflows_show_prints_chinese_titles_as_text(hosted: App, tmp_path: Path) -> None:
    workflow = txt2img(size=24)
    workflow["6"]["_meta"] = {"title": "正向提示词"}
    path = tmp_path / "zh.json"
    path.write_text(json.dumps(workflow, ensure_ascii=False), encoding="utf-8")
    assert cli(hosted.url, "workflows", "put", "zh", str(path)).returncode == 0
    shown = cli(hosted.url, "workflows", "show", "zh")
    assert shown.returncode == 0, shown.stderr
    assert "正向提示词" in shown.stdout and "\\u" not in shown.stdout


@pytest.mark.parametrize(("region", "scheme"), [("oss-cn-hangzhou", "oss"), ("us-east-1", "s3"), ("auto", "s3")])
def test_report_names_an_uploaded_output_by_its_kind_of_bucket(
    region: str, scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from serverless.cli import report
    from serverless.client.results import parse_result

    oss = {"region": region, "bucket": "outs", "object": "p/1.png", "url": "https://signed", "expire": 1}
    item = {"node_id": "9", "batch_id": 0, "output": {"type": "images", "raw": {"filename": "a.png"}, "oss": oss}}
    report(parse_result({"type": "serverless_api", "data": {"results": [item]}}), None)

    assert capsys.readouterr().out.splitlines()[0] == f"{scheme}://outs/p/1.png  https://signed"


def test_run_with_previews_saves_the_frames_of_the_image_forming(deployment, tmp_path: Path) -> None:
    deployed = deployment(step_delay=0.05)
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(txt2img(seed=31, steps=20, size=128)))
    frames = tmp_path / "frames"
    done = cli(deployed.url, "run", str(workflow), "--previews", str(frames), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    saved = sorted(frames.glob("preview-*.jpg"))
    assert len(saved) >= 3, saved
    assert all(Image.open(path).format == "JPEG" for path in saved)
    steps = [int(path.stem.rsplit("step", 1)[1]) for path in saved]
    assert steps == sorted(steps) and saved[0].name.startswith("preview-0001-step")
