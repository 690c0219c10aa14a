"""The lines of `API_KEYS_FILE` (pure: parsing and formatting, no I/O).

    <key | sha256:<64 hex>> [workflows=a,b|*] [raw=yes|no] [admin=yes|no] [rate=N/s] [concurrency=N] [label=name]

A plain line (a key alone) has every right, as an `API_KEYS` key does. A line that names any
right (`workflows=`, `raw=`, `admin=`) has only the rights it names: `key workflows=sdxl` may
run the hosted workflow `sdxl` and nothing else. `rate=` and `concurrency=` limit a key without
taking rights away; `label=` names the key in usage, metrics and logs (default: `key-` and the
first 8 hex digits of its digest). A key may be stored as `sha256:` and the hex SHA-256 of the
key, which is how `comfy-serverless keys add` writes it: the file then holds no key at all.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

MIN_KEY_LENGTH = 16
_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
_LABEL = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_WORKFLOW_ID = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_RIGHTS = ("workflows", "raw", "admin")
_OPTIONS = (*_RIGHTS, "rate", "concurrency", "label")


class KeyFileError(ValueError):
    """A line of the keys file that cannot be used; the message names the line (never its key)."""


@dataclass(frozen=True, slots=True)
class Rights:
    """What a key may do. `workflows`: hosted ids it may run (None: every one); `raw`: send its
    own workflows (and use ComfyUI's own API); `admin`: register and delete workflows, read dead
    letters and other keys' usage. `rate`: jobs it may start per second (0: no limit);
    `concurrency`: its jobs running at once (0: no limit; more wait behind its own)."""

    workflows: frozenset[str] | None = None
    raw: bool = True
    admin: bool = True
    rate: float = 0.0
    concurrency: int = 0

    def may_run(self, workflow_id: str) -> bool:
        """Whether a hosted workflow `workflow_id` (a version suffix `@n` aside) is in scope."""
        return self.workflows is None or workflow_id.partition("@")[0] in self.workflows


EVERY_RIGHT = Rights()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One accepted key: the SHA-256 digest of the key, its label and its rights."""

    digest: bytes
    label: str
    rights: Rights

    @property
    def owner(self) -> str:
        """The id its tasks are stored under (`serverless.auth`): 32 hex digits of the digest."""
        return self.digest.hex()[:32]


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def default_label(digest: bytes) -> str:
    return f"key-{digest.hex()[:8]}"


def plain_key(key: str) -> KeyEntry:
    """An `API_KEYS` key: every right."""
    check_key(key)
    digest = digest_of(key)
    return KeyEntry(digest, default_label(digest), EVERY_RIGHT)


def check_key(key: str) -> None:
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() or c == "," for c in key):
        raise KeyFileError(f"every key must be at least {MIN_KEY_LENGTH} characters, without spaces or commas")


def parse_line(line: str, number: int = 0) -> KeyEntry | None:
    """One line of the file (None for a blank line or a `#` comment)."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    where = f"line {number}" if number else "a key line"
    first, options = words[0], words[1:]
    matched = _DIGEST.fullmatch(first)
    if matched is not None:
        digest = bytes.fromhex(matched.group(1))
    else:
        try:
            check_key(first)
        except KeyFileError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        digest = digest_of(first)
    given: dict[str, str] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not eq or name not in _OPTIONS:
            raise KeyFileError(f"{where}: unknown option {option[:40]!r} (known: {', '.join(_OPTIONS)})")
        if name in given:
            raise KeyFileError(f"{where}: {name}= given twice")
        given[name] = value
    try:
        rights = _rights(given)
    except KeyFileError as exc:
        raise KeyFileError(f"{where}: {exc}") from None
    label = given.get("label") or default_label(digest)
    if not _LABEL.fullmatch(label):
        raise KeyFileError(f"{where}: label= must be 1-64 letters, digits, '_', '.', '@' or '-'")
    return KeyEntry(digest, label, rights)


def _rights(given: dict[str, str]) -> Rights:
    scoped = any(name in given for name in _RIGHTS)
    rights = Rights(workflows=frozenset() if scoped else None, raw=not scoped, admin=not scoped)
    if "workflows" in given:
        names = [name for name in given["workflows"].split(",") if name]
        if "*" in names:
            rights = replace(rights, workflows=None)
        else:
            for name in names:
                if not _WORKFLOW_ID.fullmatch(name):
                    raise KeyFileError(f"workflows=: {name[:40]!r} is not a workflow id")
            rights = replace(rights, workflows=frozenset(names))
    if "raw" in given:
        rights = replace(rights, raw=_yes(given["raw"], "raw"))
    if "admin" in given:
        rights = replace(rights, admin=_yes(given["admin"], "admin"))
    if "rate" in given:
        rights = replace(rights, rate=_rate(given["rate"]))
    if "concurrency" in given:
        value = given["concurrency"]
        if not value.isdigit() or int(value) < 1:
            raise KeyFileError("concurrency= must be a whole number of at least 1")
        rights = replace(rights, concurrency=int(value))
    return rights


def _yes(value: str, name: str) -> bool:
    if value not in ("yes", "no"):
        raise KeyFileError(f"{name}= must be yes or no")
    return value == "yes"


def _rate(value: str) -> float:
    number, slash, unit = value.partition("/")
    try:
        rate = float(number)
    except ValueError:
        rate = -1.0
    if (slash and unit != "s") or not rate > 0 or rate == float("inf"):
        raise KeyFileError("rate= must be a positive number per second, like rate=5/s")
    return rate


def parse(text: str) -> tuple[KeyEntry, ...]:
    """Every key of a file's text; KeyFileError naming the first bad line."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = parse_line(line, number)
        if entry is not None:
            entries.append(entry)
    return tuple(entries)


def format_line(digest: bytes, options: Iterable[str]) -> str:
    """A line as `keys add` writes it: the key's digest, never the key."""
    return " ".join([f"sha256:{digest.hex()}", *options])


def line_digest(line: str) -> bytes | None:
    """The digest a line stands for (a key or `sha256:`), None for a blank or comment line."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    matched = _DIGEST.fullmatch(words[0])
    return bytes.fromhex(matched.group(1)) if matched is not None else digest_of(words[0])
