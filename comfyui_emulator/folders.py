"""The emulator's file areas: `input/`, `output/` and `temp/` under one root, as ComfyUI has them, and
ComfyUI's models folder (`--models-dir`) when one is given."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

FOLDER_TYPES = ("input", "output", "temp")
# ComfyUI 0.3.64's `folder_paths.supported_pt_extensions` and the folders its search skips.
MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})
EXCLUDED_DIRS = frozenset({".git"})


@dataclass(frozen=True)
class Folders:
    """Absolute paths of the three folders; strings because ComfyUI's path checks work on strings."""

    root: Path
    models: Path | None = None  # ComfyUI's `models/` (checkpoints/, loras/, ...); None: the recorded lists

    @property
    def input(self) -> str:
        return os.path.abspath(self.root / "input")

    @property
    def output(self) -> str:
        return os.path.abspath(self.root / "output")

    @property
    def temp(self) -> str:
        return os.path.abspath(self.root / "temp")

    def model_files(self, folder: str) -> list[str] | None:
        """The files ComfyUI lists for a models folder (`folder_paths.get_filename_list`): every
        file under `<models>/<folder>` with a model extension, links followed, relative names with
        `/`, sorted; read afresh on each call (ComfyUI re-lists per request). None without a
        models folder."""
        if self.models is None:
            return None
        base = os.path.join(os.path.abspath(self.models), folder)
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
            relative = os.path.relpath(dirpath, base)
            for name in filenames:
                if os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS:
                    found.append(name if relative == "." else f"{relative}/{name}".replace(os.sep, "/"))
        return sorted(found)

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
