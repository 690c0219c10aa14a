"""The README's examples, run as written: every shell and Python block that talks to the API on
127.0.0.1:9000 is executed (in README order) against an app and the emulator, with the README's own
OSS bucket served by the local OSS server. A block passes when it exits 0 and no answer it prints
is an error the README does not announce next to it."""

from __future__ import annotations

import gc
import io
import os
import re
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.oss_server import LocalOss
from tests.servers import ROOT, InProcessApp, InProcessEmulator

README = ROOT / "README.md"
API = "127.0.0.1:9000"
BUCKET = "my-bucket"  # the README's
KEY_ID, SECRET = "LTAI...", "..."  # the README's placeholders: the local OSS server accepts them
FENCE = re.compile(r"^```(sh|bash|python)\n(.*?)^```", re.M | re.S)
ERROR_CODE = re.compile(r'"error_code":\s*"([A-Z_]+)"')


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str

    @property
    def last(self) -> bool:
        """Blocks that take the instance out of service run after all others."""
        return "/pre-stop" in self.text


def blocks() -> list[Block]:
    text = README.read_text()
    found = []
    for match in FENCE.finditer(text):
        if API in match.group(2):
            found.append(Block(text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2)))
    return sorted(found, key=lambda block: block.last)


def test_the_readme_has_runnable_examples():
    assert len(blocks()) >= 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the examples run: the repository's example files, nothing else of it to write over."""
    path = tmp_path_factory.mktemp("readme")
    for name in ("examples", "tests"):
        (path / name).symlink_to(ROOT / name)
    return path


@pytest.fixture(scope="module")
def readme_api(workdir: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import base_env

    root = tmp_path_factory.mktemp("readme-emulator")
    emulator = InProcessEmulator(root)
    oss = LocalOss({KEY_ID: (SECRET, None)}, [BUCKET], region="cn-hangzhou")
    oss.put_object(BUCKET, "in/cat.png", (ROOT / "examples" / "cat.png").read_bytes(), "image/png")
    logs = tmp_path_factory.mktemp("readme-app")
    env = {
        **base_env(emulator.url, logs / "status"),
        "WORKFLOWS_DIR": str(logs / "workflows"),
        "OSS_BUCKET_DOMAIN": f"{BUCKET}.oss-cn-hangzhou.aliyuncs.com",
        "OSS_ENDPOINT": oss.endpoint,
        "OSS_SIGN_ENDPOINT": oss.endpoint,
        "OSS_EXPIRES_IN_SECOND": "3600",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
    }
    app = InProcessApp(logs, env)
    yield app, emulator
    app.stop()
    emulator.stop()
    oss.stop()


def for_this_run(block: Block, app: InProcessApp, emulator: InProcessEmulator) -> str:
    """The block's code aimed at the test's app and emulator instead of the README's addresses."""
    code = block.text.replace(f"http://{API}", app.url).replace(f"ws://{API}", app.url.replace("http", "ws"))
    return code.replace("http://127.0.0.1:8188", emulator.url)


# As in a checkout after `make serve` or `pip install .`: the venv's tools, the package importable.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def judged(block: Block, returncode: int, stdout: str, stderr: str) -> str | None:
    """Why the block failed, or None: it must exit 0 and print no error it does not announce."""
    if returncode != 0:
        return f"README.md:{block.line} failed ({returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    for code_name in ERROR_CODE.findall(stdout):
        if code_name not in block.text:
            return f"README.md:{block.line} answered {code_name}:\n{stdout[-3000:]}"
    return None


# The Python examples first: the shell examples end with the one taking the instance out of service.
@pytest.mark.parametrize(
    "block", [b for b in blocks() if b.language == "python"], ids=lambda block: f"README.md:{block.line}"
)
def test_a_readme_python_example_runs_as_written(block: Block, readme_api, workdir: Path, monkeypatch):
    """As `python -c` runs it from the work folder (a namespace of its own, `__name__` "__main__",
    its exit status that of a `SystemExit` or 1 for an exception), in this interpreter."""
    app, emulator = readme_api
    monkeypatch.chdir(workdir)
    out, err, returncode = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            exec(
                compile(for_this_run(block, app, emulator), f"README.md:{block.line}", "exec"), {"__name__": "__main__"}
            )
        except SystemExit as exit:
            returncode = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        except BaseException:
            traceback.print_exc()
            returncode = 1
    gc.collect()  # what it left open (a websocket, a client) is closed, as its exit would close it
    failure = judged(block, returncode, out.getvalue(), err.getvalue())
    assert failure is None, failure


@pytest.mark.timeout(360)  # some 60 curl and python3 runs and 20 jobs: 11 s alone, 120 s was hit at load 13
def test_the_readme_shell_examples_run_as_written(readme_api, workdir: Path, tmp_path: Path):
    """Every shell block in README order, each in a subshell of its own (`set -euo pipefail`, its
    own output and exit status) of one bash process, rather than one bash process per block."""
    app, emulator = readme_api
    shell = [b for b in blocks() if b.language != "python"]
    script = []
    for n, block in enumerate(shell):
        (tmp_path / f"{n}.sh").write_text(for_this_run(block, app, emulator))
        script.append(
            f'( cd "$WORKDIR"; set -euo pipefail; . "$BLOCKS/{n}.sh" ) >"$BLOCKS/{n}.out" 2>"$BLOCKS/{n}.err"; '
            f'echo $? >"$BLOCKS/{n}.rc"'
        )
    env = {**ENV, "WORKDIR": str(workdir), "BLOCKS": str(tmp_path)}
    try:
        subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, timeout=330, check=True)
    except subprocess.TimeoutExpired:
        stuck = next(n for n in range(len(shell)) if not (tmp_path / f"{n}.rc").exists())
        output = [(tmp_path / f"{stuck}{kind}").read_text()[-3000:] for kind in (".out", ".err")]  # made as it began
        pytest.fail(f"README.md:{shell[stuck].line} did not end within 330 s:\n{output[0]}\n{output[1]}")

    failures = []
    for n, block in enumerate(shell):
        read = (tmp_path / f"{n}.out").read_text(), (tmp_path / f"{n}.err").read_text()
        failure = judged(block, int((tmp_path / f"{n}.rc").read_text()), *read)
        if failure:
            failures.append(failure)
    assert len(shell) >= 8 and not failures, "\n\n".join(failures)
