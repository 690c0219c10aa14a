"""A hosted workflow as callers name it (pure): `<id>` (its newest version, or the one its
`default` alias names), `<id>@<n>` (version n) or `<id>@<alias>`. Every place that takes a
workflow id (the run path, `?workflow_id=`, GenStudio, batches, the CLI and clients) reads it
with `parse_ref`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidParams
from .store import validate_workflow_id

DEFAULT_ALIAS = "default"
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
MAX_VERSION = 10**9


@dataclass(frozen=True, slots=True)
class WorkflowRef:
    """What `<id>[@<n>|@<alias>]` names; neither `version` nor `alias`: the bare id."""

    workflow_id: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.workflow_id}@{self.version}"
        return self.workflow_id if self.alias is None else f"{self.workflow_id}@{self.alias}"


def validate_alias(name: str) -> str:
    """An alias names a file too: a letter, then up to 63 letters, digits, '.', '_' or '-'."""
    if not ALIAS_RE.fullmatch(name):
        raise InvalidParams(
            "an alias is a letter then up to 63 letters, digits, '.', '_' or '-' (a number names a version)",
            raw={"alias": name[:200]},
        )
    return name


def parse_version(text: str) -> int:
    if not text.isdigit() or text.startswith("0") or int(text) > MAX_VERSION:
        raise InvalidParams(f"{text[:50]!r} is not a version number (1, 2, ...)", raw={"version": text[:50]})
    return int(text)


def parse_ref(text: str) -> WorkflowRef:
    """`<id>`, `<id>@<n>` or `<id>@<alias>`; InvalidParams naming what is wrong."""
    workflow_id, at, ref = text.partition("@")
    validate_workflow_id(workflow_id)
    if not at:
        return WorkflowRef(workflow_id)
    if ref[:1].isdigit():
        return WorkflowRef(workflow_id, version=parse_version(ref))
    return WorkflowRef(workflow_id, alias=validate_alias(ref))
