"""`comfy-serverless keys add|list|revoke`: edit API_KEYS_FILE on the machine that holds it.

    comfy-serverless keys add --label shop [--workflows sdxl,upscale] [--raw no] [--admin no]
                              [--rate 5/s] [--concurrency 2]      (prints the new key, once)
    comfy-serverless keys list
    comfy-serverless keys revoke LABEL

`--file` / API_KEYS_FILE names the file. A new key is stored as its SHA-256 (`sha256:<hex>`): the
file never holds it, so it is shown this once. Every edit is atomic (a temporary file renamed
over the old one, under a lock beside it): a server reading the file (every
`tenants.keys.POLL_INTERVAL` seconds) sees the old lines or the new, never half, and takes them
without a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..tenants.keyfile import KeyFileError, digest_of, format_line, line_digest, parse, parse_line


class KeysUsage(Exception):
    """A bad `keys` argument or file (exit 2)."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="API keys in API_KEYS_FILE (on the server's machine)")
    actions = keys.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", default=os.environ.get("API_KEYS_FILE"), help="the keys file (env API_KEYS_FILE)")
    add = actions.add_parser("add", parents=[common], help="make a key; prints it once")
    add.add_argument("--label", required=True, help="its name in usage, metrics and logs")
    add.add_argument("--workflows", help="hosted workflow ids it may run, comma-separated ('*': all)")
    add.add_argument("--raw", choices=("yes", "no"), help="may it send workflows of its own")
    add.add_argument("--admin", choices=("yes", "no"), help="may it register workflows, read others' usage")
    add.add_argument("--rate", help="jobs it may start per second, e.g. 5/s")
    add.add_argument("--concurrency", type=int, help="its jobs running at once")
    actions.add_parser("list", parents=[common], help="the keys (labels and rights; never a key)")
    actions.add_parser("revoke", parents=[common], help="remove a key").add_argument("label")


def run(args: argparse.Namespace) -> str:
    """The command's output (KeysUsage for a bad argument or file)."""
    if not args.file:
        raise KeysUsage("name the keys file: --file PATH or API_KEYS_FILE")
    path = Path(args.file)
    if args.action == "add":
        return add(path, args)
    if args.action == "revoke":
        return revoke(path, args.label)
    return listing(path)


def _options(args: argparse.Namespace) -> list[str]:
    options = [f"label={args.label}"]
    for name in ("workflows", "raw", "admin", "rate", "concurrency"):
        value = getattr(args, name)
        if value is not None:
            options.append(f"{name}={value}")
    return options


def add(path: Path, args: argparse.Namespace) -> str:
    key = "sk-" + secrets.token_urlsafe(32)
    line = format_line(digest_of(key), _options(args))
    try:
        parse_line(line)
    except KeyFileError as exc:
        raise KeysUsage(str(exc).removeprefix("a key line: ")) from None
    with _editing(path) as lines:
        if args.label in _labels(lines):
            raise KeysUsage(f"a key labelled {args.label!r} exists already: revoke it first or pick another label")
        lines.append(line)
    return key


def revoke(path: Path, label: str) -> str:
    with _editing(path) as lines:
        kept = [line for line in lines if _label_of(line) != label]
        if len(kept) == len(lines):
            raise KeysUsage(f"no key labelled {label!r} in {path}")
        lines[:] = kept
    return f"revoked {label}"


def listing(path: Path) -> str:
    try:
        entries = parse(path.read_text())
    except FileNotFoundError:
        return ""
    except (OSError, KeyFileError) as exc:
        raise KeysUsage(f"{path}: {exc}") from None
    rows = []
    for entry in entries:
        rights = entry.rights
        workflows = "*" if rights.workflows is None else ",".join(sorted(rights.workflows)) or "-"
        rows.append(
            f"{entry.label}\tsha256:{entry.digest.hex()[:12]}…\tworkflows={workflows} raw={_yn(rights.raw)} "
            f"admin={_yn(rights.admin)} rate={f'{rights.rate:g}/s' if rights.rate else '-'} "
            f"concurrency={rights.concurrency or '-'}"
        )
    return "\n".join(rows)


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _label_of(line: str) -> str | None:
    try:
        entry = parse_line(line)
    except KeyFileError:
        return None
    return entry.label if entry is not None else None


def _labels(lines: list[str]) -> set[str]:
    return {label for label in map(_label_of, lines) if label is not None}


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[list[str]]:
    """The file's lines to change in place; written back atomically (temp file, fsync, rename)
    under an exclusive lock on `<file>.lock`, so two edits never lose one another's line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):  # a file the server refuses is not made worse
            try:
                parse_line(line, number)
            except KeyFileError as exc:
                raise KeysUsage(f"{path}: {exc}") from None
        yield lines
        if len({line_digest(line) for line in lines if line_digest(line)}) < sum(1 for x in lines if line_digest(x)):
            raise KeysUsage("the same key is in the file twice")
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write("".join(f"{line}\n" for line in lines))
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o600)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
