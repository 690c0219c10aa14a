"""The emulator's file areas: `input/`, `output/` and `temp/` under one root, as ComfyUI has them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

FOLDER_TYPES = ("input", "output", "temp")


@dataclass(frozen=True)
class Folders:
    """Absolute paths of the three folders; strings because ComfyUI's path checks work on strings."""

    root: Path

    @property
    def input(self) -> str:
        return os.path.abspath(self.root / "input")

    @property
    def output(self) -> str:
        return os.path.abspath(self.root / "output")

    @property
    def temp(self) -> str:
        return os.path.abspath(self.root / "temp")

    def by_type(self, type_name: str | None) -> str | None:
        """The folder for a `type` query/form value ("input", "output", "temp"); None if unknown."""
        if type_name in FOLDER_TYPES:
            return str(getattr(self, str(type_name)))
        return None

    def prepare(self) -> None:
        """Create the folders; empty `temp/` first, as ComfyUI does when it starts."""
        shutil.rmtree(self.temp, ignore_errors=True)
        for name in FOLDER_TYPES:
            os.makedirs(getattr(self, name), exist_ok=True)

    def annotated_path(self, name: str, default: str | None = None) -> str:
        """Path of a LoadImage-style name, honouring ComfyUI's `name [output]` style suffixes."""
        for type_name in FOLDER_TYPES:
            suffix = f" [{type_name}]"
            if name.endswith(suffix):
                return os.path.join(str(self.by_type(type_name)), name[: -len(suffix)])
        return os.path.join(default or self.input, name)

    def inside(self, base: str, path: str) -> bool:
        """True when `path` stays inside `base` once resolved (no `..` escape)."""
        base = os.path.abspath(base)
        return os.path.commonpath((base, os.path.abspath(path))) == base
