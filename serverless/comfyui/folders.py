"""ComfyUI's folders, when they are on our disk (ComfyUI runs beside us, as on FC).

Then an output is read from ComfyUI's output (or temp) folder instead of fetched through `/view`,
and an input written into its input folder instead of posted to `/upload/image`: ComfyUI does
less per job. Every path is confined to its folder: a history entry's `subfolder` or `filename`
naming `..` or an absolute path is refused, whatever it resolves to. Blocking; call in a thread,
except `read_cached`, which never waits for a disk: a small output ComfyUI has just written, on a
local filesystem, is read from the page cache on the event loop (`preadv` with `RWF_NOWAIT` reads
only what is cached), saving the job's end a trip to a thread; anything else (a miss, NAS, a big
file) is left to `read_item` in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mimetypes
import os
import re
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
_local: dict[str, bool] = {}  # a kept folder's resolved path -> on a local filesystem (`read_cached`)

# Filesystems whose cached pages `read_cached` may read on the event loop: a path's lookup there
# is a dentry-cache hit for a file just written. Network and FUSE filesystems (NFS, SMB, a NAS)
# may wait on a server for the lookup itself: always a thread.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "ramfs", "overlay"})
CACHED_UP_TO = 256 * 1024  # bytes `read_cached` copies on the event loop (tens of microseconds)
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
MOUNTINFO = "/proc/self/mountinfo"


def confined(folder: Path, subfolder: str, filename: str) -> Path:
    """`folder/subfolder/filename` resolved (symlinks followed); OutputError when it names an
    absolute path or leads outside `folder`."""
    if not filename or os.path.isabs(subfolder) or os.path.isabs(filename):
        raise OutputError(f"output {filename!r} in {subfolder!r} is not a relative path: refused")
    base = _base(folder)
    path = os.path.realpath(os.path.join(base, subfolder, filename))
    if path == base or not _inside(path, base):
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
            _local[base] = filesystem_type(base) in LOCAL_FILESYSTEMS
            _bases[folder] = base
    return base


def filesystem_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem `path` (resolved) lies on, from the mount table (blocking:
    read once per folder); None when it cannot be told."""
    if mountinfo is None:
        try:
            with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
                mountinfo = f.read()
        except OSError:
            return None
    best, kind = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point if point.endswith("/") else point + "/")
        if inside and len(point) >= best:  # the deepest mount holding it; a later one over it wins
            best, kind = len(point), fields[fields.index("-", 6) + 1]
    return kind


def _unescape(field: str) -> str:
    """A mount table field: space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def read_cached(
    folder: Path, subfolder: str, filename: str, limit: int = CACHED_UP_TO
) -> tuple[bytes, str, int] | None:
    """`read_item` of a file, when that waits for no disk (on the event loop): the folder was
    read before (`read_item`, in a thread: its path resolved, its filesystem told local), the
    file is regular, at most `limit` bytes, and every byte of it is in the page cache (ComfyUI
    has just written it). None otherwise, and for a name that leads outside the folder: the
    caller then reads it in a thread, which tells missing from refused."""
    base = _bases.get(folder)
    if base is None or not _local.get(base) or _NOWAIT is None or not _relative(subfolder, filename):
        return None
    plain = not subfolder and _plain(filename)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (os.O_NOFOLLOW if plain else 0)
    try:
        fd = os.open(os.path.join(base, subfolder, filename), flags)
    except OSError:
        return None
    try:
        path = os.path.join(base, filename) if plain else os.readlink(f"{PROC_FD}/{fd}")
        if not plain and (path == base or not _inside(path, base)):
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        buffer = bytearray(info.st_size)
        if info.st_size and os.preadv(fd, [buffer], 0, _NOWAIT) != info.st_size:
            return None  # part of it is not cached, or it changed meanwhile
    except OSError:  # BlockingIOError: not in the page cache
        return None
    finally:
        os.close(fd)
    return bytes(buffer), _served_type(Path(path)), info.st_size


def read_item(
    folder: Path, subfolder: str, filename: str, with_content: bool, limit: int | None = None
) -> tuple[bytes | None, str, int] | None:
    """`read_output` of `folder/subfolder/filename`, confined to `folder` (OutputError when it
    leads outside). A job's usual output, a plain name in the folder itself, is read in four
    system calls (open refusing a symlink, fstat, read, close) rather than resolving its path
    first: this runs in a thread that takes the GIL back after each call, from an event loop
    that is busy with the job's last messages just then. A symlink is resolved and checked."""
    if with_content and not subfolder and _plain(filename):
        path = os.path.join(_base(folder), filename)  # inside the folder: no separator, no `..`
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return None  # missing, unreadable: `/view` decides
        else:  # not a symlink
            try:
                return _read_open(fd, Path(path), limit)
            finally:
                os.close(fd)
    if with_content and NAMES_OPEN_FILES and _relative(subfolder, filename):
        return _read_named(folder, subfolder, filename, limit)
    return read_output(confined(folder, subfolder, filename), with_content, limit)


PROC_FD = "/proc/self/fd"  # where Linux names the file an open descriptor is
NAMES_OPEN_FILES = os.path.isdir(PROC_FD)


def _read_named(folder: Path, subfolder: str, filename: str, limit: int | None) -> tuple[bytes | None, str, int] | None:
    """`read_item` of a name in a subfolder (ComfyUI's `filename_prefix` makes them), or a
    symlink: the file is opened, then the kernel's name for what was opened (its path, links
    followed) is checked to lie in the folder, in five system calls rather than one `lstat` per
    component of its path (`confined`). One that cannot be opened is left to `confined` and
    `read_output`, as before: refused when its path leads outside, else missing."""
    base = _base(folder)
    try:
        fd = os.open(os.path.join(base, subfolder, filename), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return read_output(confined(folder, subfolder, filename), True, limit)
    try:
        real = os.readlink(f"{PROC_FD}/{fd}").removesuffix(" (deleted)")
        if real == base or not _inside(real, base):
            raise OutputError(f"output {filename!r} in {subfolder!r} leads outside ComfyUI's folder: refused")
        return _read_open(fd, Path(real), limit)
    finally:
        os.close(fd)


def _relative(subfolder: str, filename: str) -> bool:
    return (
        bool(filename)
        and not os.path.isabs(subfolder)
        and not os.path.isabs(filename)
        and "\0" not in subfolder + filename
    )


def _plain(filename: str) -> bool:
    return bool(filename) and filename not in (".", "..") and "/" not in filename and "\0" not in filename


def _read_open(fd: int, path: Path, limit: int | None) -> tuple[bytes | None, str, int] | None:
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (limit is not None and info.st_size > limit):
            return None
        content = os.read(fd, info.st_size + 1)  # short of that: the whole file (a regular file's read)
        if len(content) > info.st_size:  # it grew since: read to its end
            parts = [content]
            while chunk := os.read(fd, 1024 * 1024):
                parts.append(chunk)
            content = b"".join(parts)
    except OSError:
        return None
    return content, _served_type(path), len(content)


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
    return content, _served_type(path), size


def _served_type(path: Path) -> str:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return "application/octet-stream" if content_type in UNSAFE_TYPES else content_type


def write_input(folder: Path, name: str, data: bytes) -> None:
    """Write `data` as `folder/name`, atomically: ComfyUI never sees a half-written file. A
    plain name, or one in a plain subfolder (`serverless/<hash>.png`, how inputs are staged),
    takes four system calls (its folder resolved once, as ComfyUI's own are): the thread this runs
    in takes the GIL back after each, from an event loop busy starting the job."""
    sub, _, leaf = name.rpartition("/")
    directory = _staging(folder, sub) if _plain(leaf) and (not sub or _plain(sub)) else None
    if directory is not None:
        _write_new(os.path.join(directory, leaf), data)
        return
    path = confined(folder, "", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(str(path), data)


def _staging(folder: Path, sub: str) -> str | None:
    """`folder/sub` resolved, made when missing and kept (as `_base`); None when it leads
    outside `folder` (a symlink)."""
    key = folder / sub
    directory = _bases.get(key)
    if directory is None:
        base = _base(folder)
        directory = os.path.realpath(os.path.join(base, sub))
        if not _inside(directory, base):
            return None
        os.makedirs(directory, exist_ok=True)
        if len(_bases) < MAX_BASES:
            _bases[key] = directory
    return directory


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base if base.endswith(os.sep) else base + os.sep)


def _write_new(path: str, data: bytes) -> None:
    """`data` into a new partial file beside `path` (never through a symlink), renamed onto it."""
    directory, leaf = os.path.split(path)
    partial = os.path.join(directory, f".{leaf}.{uuid.uuid4().hex}.part")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
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
