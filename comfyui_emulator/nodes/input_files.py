"""The base of the audio and video loaders: one input names a file in the input folder."""

from __future__ import annotations

import hashlib
import os
from typing import Any, ClassVar

from ..folders import Folders
from .base import Node


class InputFileNode(Node):
    """A loader whose input `VALIDATE_ARGS[0]` names a file under the input folder (or, with a
    `name [output]` suffix, another folder), checked like ComfyUI's VALIDATE_INPUTS."""

    FILE_KIND: ClassVar[str] = "input"  # in the message: "Invalid <kind> file: <name>"

    @classmethod
    def file_name(cls, inputs: dict[str, Any]) -> str:
        return str(inputs[cls.VALIDATE_ARGS[0]])

    @classmethod
    def is_changed(cls, folders: Folders, inputs: dict[str, Any]) -> Any:
        # The file's hash, so replacing an input file with the same name re-runs the node.
        with open(folders.annotated_path(cls.file_name(inputs)), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def validate(cls, folders: Folders, **values: Any) -> bool | str:
        name = cls.file_name(values)
        path = folders.annotated_path(name)
        if not folders.inside(folders.root.as_posix(), path) or not os.path.exists(path):
            return f"Invalid {cls.FILE_KIND} file: {name}"
        return True
