"""ComfyUI's folders, when they are on our disk (ComfyUI runs beside us, as on FC).

Then an output is read from ComfyUI's output (or temp) folder instead of fetched through `/view`,
and an input written into its input folder instead of posted to `/upload/image`: ComfyUI does
less per job. Every path is confined to its folder: a history entry's `subfolder` or `filename`
naming `..` or an absolute path is refused, whatever it resolves to. Blocking; call in a thread.
"""

from __future__ import annotations

import itertools
import mimetypes
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError

# Served as downloads rather than rendered, as ComfyUI's `/view` does: the same type either way.
UNSAFE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


@dataclass(frozen=True, slots=True)
class Folders:
    """ComfyUI's folders on our disk; None where ComfyUI's HTTP API is to be used."""

    output: Path | None = None
    temp: Path | None = None
    input: Path | None = None

    def for_type(self, kind: str) -> Path | None:
        """The folder of a history item's `type` (`output`, `temp`, `input`)."""
        return {"output": self.output, "temp": self.temp, "input": self.input}.get(kind)


MAX_BASES = 64  # folders whose resolved path is kept (`_base`)
_bases: dict[Path, str] = {}


def confined(folder: Path, subfolder: str, filename: str) -> Path:
    """`folder/subfolder/filename` resolved (symlinks followed); OutputError when it names an
    absolute path or leads outside `folder`."""
    if not filename or os.path.isabs(subfolder) or os.path.isabs(filename):
        raise OutputError(f"output {filename!r} in {subfolder!r} is not a relative path: refused")
    base = _base(folder)
    path = os.path.realpath(os.path.join(base, subfolder, filename))
    if path == base or not path.startswith(base if base.endswith(os.sep) else base + os.sep):
        raise OutputError(f"output {filename!r} in {subfolder!r} leads outside ComfyUI's folder: refused")
    return Path(path)


def _base(folder: Path) -> str:
    """The folder resolved, kept once it is a directory: ComfyUI's folders do not move while it
    runs, and an output read (in a thread that takes turns with the event loop at each system
    call) then resolves only its own path."""
    base = _bases.get(folder)
    if base is None:
        base = os.path.realpath(folder)
        if len(_bases) < MAX_BASES and os.path.isdir(base):
            _bases[folder] = base
    return base


def read_output(path: Path, with_content: bool, limit: int | None = None) -> tuple[bytes | None, str, int] | None:
    """The file's bytes (None when not asked for), its type as `/view` would serve it, and its
    size; None when there is no such file (the caller falls back to `/view`), or, with `limit`,
    when it is bigger than that."""
    try:
        if with_content:
            with open(path, "rb") as f:
                if limit is not None and os.fstat(f.fileno()).st_size > limit:
                    return None
                content: bytes | None = f.read()
            size = len(content or b"")
        else:
            content, size = None, path.stat().st_size
    except OSError:  # missing, a folder, unreadable: `/view` decides
        return None
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return content, ("application/octet-stream" if content_type in UNSAFE_TYPES else content_type), size


PROC_FD = "/proc/self/fd"  # where Linux tells what an open file descriptor names
NAMES_OPEN_FILES = os.path.isdir(PROC_FD)


def read_small(folder: Path, subfolder: str, filename: str, limit: int) -> tuple[bytes, str, int] | None:
    """`folder/subfolder/filename` read whole when it is a regular file of at most `limit` bytes
    (its bytes, type and size as `read_output` gives them); None when it is not there, not a
    regular file, bigger, or leads outside `folder`. In a handful of system calls (each one a
    thread's turn with the event loop): the file is opened, then the kernel's name for what was
    opened is checked to lie inside the folder, instead of resolving the path one component
    at a time (`confined`); where that name cannot be read, `confined` checks first."""
    if not filename or os.path.isabs(subfolder) or os.path.isabs(filename):
        return None
    base = _base(folder)
    path = os.path.join(base, subfolder, filename)
    checked = not NAMES_OPEN_FILES
    if checked:
        try:
            path = str(confined(folder, subfolder, filename))
        except OutputError:
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO does not block the thread
    except OSError:
        return None
    try:
        if not checked:
            path = os.readlink(f"{PROC_FD}/{fd}")
            if path == base or not path.startswith(base if base.endswith(os.sep) else base + os.sep):
                return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        content = os.read(fd, info.st_size + 1) if info.st_size else b""
        if len(content) > limit:
            return None
    except OSError:
        return None
    finally:
        os.close(fd)
    content_type = mimetypes.guess_type(os.path.basename(path))[0] or "application/octet-stream"  # as `read_output`
    return content, ("application/octet-stream" if content_type in UNSAFE_TYPES else content_type), len(content)


def write_input(folder: Path, name: str, data: bytes) -> None:
    """Write `data` as `folder/name`, atomically: ComfyUI never sees a half-written file."""
    path = confined(folder, "", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def started_folders(command: list[str], cwd: str) -> Folders:
    """The folders of the ComfyUI we start with `command` in `cwd`: those its flags name, else
    its own beside its `main.py` (as ComfyUI's `folder_paths` derives them). Nothing when the
    command runs no `main.py`: then where its folders are is not known."""
    scripts = [arg for arg in command if os.path.basename(arg) == "main.py"]
    if not scripts:
        return Folders()
    flags = {name: value for name, value in itertools.pairwise(command) if name.startswith("--")}
    root = Path(cwd or ".")
    base = root / flags.get("--base-directory", os.path.dirname(scripts[0]) or ".")
    temp_base = root / flags["--temp-directory"] if "--temp-directory" in flags else base
    return Folders(
        output=(root / flags.get("--output-directory", base / "output")).absolute(),
        temp=(temp_base / "temp").absolute(),
        input=(root / flags.get("--input-directory", base / "input")).absolute(),
    )
