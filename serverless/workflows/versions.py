"""Versions and aliases of the hosted workflows, on the shared disk beside their files:

    <WORKFLOWS_DIR>/<id>.json                          the newest version (what the bare id runs, unless
                                                       the `default` alias is set), with owner and flag
    <WORKFLOWS_DIR>/<id>.versions/<n>.json             version n: written once, create-exclusive (two
                                                       instances registering at once get n and n+1),
                                                       never changed
    <WORKFLOWS_DIR>/<id>.versions/aliases/<name>.json  `{"version": n, ...}`, replaced whole when moved

Every instance reads these files on each call (the parsed ones are kept while unchanged), so a
version or an alias move made through one instance is seen by all. The functions here block (file
I/O on NAS): `WorkflowStore` runs them in a thread.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import NotFound
from .atomic import write_file

FOLDER_SUFFIX = ".versions"
ALIASES = "aliases"
SUFFIX = ".json"
MAX_ADD_TRIES = 64  # instances registering the same workflow at once each take the next number


def registered_by(owner: str | None, label: str | None = None) -> dict[str, Any] | None:
    """Who registered a version, as stored with it and shown by `GET .../versions`: the API key's
    digest, shortened, and its label (audit); None: keys are off."""
    if owner is None:
        return None
    return {"key": owner[:16]} if label is None else {"key": owner[:16], "label": label}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Version:
    """One version as listed: its number, when and by whom it was registered."""

    number: int
    created: str
    created_by: dict[str, Any] | None

    def to_payload(self, aliases: list[str]) -> dict[str, Any]:
        return {"version": self.number, "created": self.created, "created_by": self.created_by, "aliases": aliases}


class VersionFolder:
    """The versions and aliases of each workflow in `folder` (blocking calls)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _root(self, workflow_id: str) -> Path:
        return self.folder / (workflow_id + FOLDER_SUFFIX)

    def path(self, workflow_id: str, number: int) -> Path:
        return self._root(workflow_id) / f"{number}{SUFFIX}"

    def _alias_path(self, workflow_id: str, name: str) -> Path:
        return self._root(workflow_id) / ALIASES / (name + SUFFIX)

    def numbers(self, workflow_id: str) -> list[int]:
        """Its version numbers, oldest first."""
        try:
            names = [entry.name for entry in os.scandir(self._root(workflow_id)) if entry.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        stems = (name[: -len(SUFFIX)] for name in names if name.endswith(SUFFIX))
        return sorted(int(stem) for stem in stems if stem.isdigit() and not stem.startswith("0"))

    def add(self, workflow_id: str, prompt: dict[str, Any], by: dict[str, Any] | None, created: float = 0.0) -> int:
        """Store `prompt` as the next version; its number."""
        document = {"version": 0, "created": iso(created or time.time()), "created_by": by, "prompt": prompt}
        for _ in range(MAX_ADD_TRIES):
            number = max(self.numbers(workflow_id), default=0) + 1
            document["version"] = number
            try:
                write_file(self.path(workflow_id, number), document, exclusive=True)
            except FileExistsError:
                continue  # another instance took that number first
            return number
        raise RuntimeError(f"could not number a new version of {workflow_id!r}")

    def describe(self, workflow_id: str, number: int) -> Version:
        """Version `number`'s registration record; NotFound when there is none."""
        try:
            with open(self.path(workflow_id, number), "rb") as f:
                modified = os.fstat(f.fileno()).st_mtime
                document = json.loads(f.read())
        except FileNotFoundError:
            raise NotFound(f"workflow {workflow_id!r} has no version {number}") from None
        except (ValueError, UnicodeDecodeError):
            document = {}
        document = document if isinstance(document, dict) else {}
        created = document.get("created")
        created = created if isinstance(created, str) else iso(modified)
        by = document.get("created_by") if isinstance(document.get("created_by"), dict) else None
        return Version(number, created, by)

    def remove(self, workflow_id: str, number: int) -> None:
        try:
            self.path(workflow_id, number).unlink()
        except FileNotFoundError:
            raise NotFound(f"workflow {workflow_id!r} has no version {number}") from None

    def remove_all(self, workflow_id: str) -> None:
        shutil.rmtree(self._root(workflow_id), ignore_errors=True)

    def aliases(self, workflow_id: str) -> dict[str, int]:
        """Each alias and the version it names."""
        try:
            names = sorted(entry.name for entry in os.scandir(self._root(workflow_id) / ALIASES))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found = {}
        for name in names:
            if name.endswith(SUFFIX) and not name.startswith("."):
                number = self.alias(workflow_id, name[: -len(SUFFIX)])
                if number is not None:
                    found[name[: -len(SUFFIX)]] = number
        return found

    def alias(self, workflow_id: str, name: str) -> int | None:
        """The version `name` names; None when there is no such alias."""
        try:
            document = json.loads(self._alias_path(workflow_id, name).read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
            return None
        number = document.get("version") if isinstance(document, dict) else None
        return number if isinstance(number, int) and not isinstance(number, bool) and number > 0 else None

    def set_alias(self, workflow_id: str, name: str, number: int, by: dict[str, Any] | None) -> None:
        document = {"alias": name, "version": number, "moved": iso(time.time()), "moved_by": by}
        write_file(self._alias_path(workflow_id, name), document)

    def remove_alias(self, workflow_id: str, name: str) -> None:
        try:
            self._alias_path(workflow_id, name).unlink()
        except FileNotFoundError:
            raise NotFound(f"workflow {workflow_id!r} has no alias {name!r}") from None
