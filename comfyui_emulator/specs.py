"""Node definitions as `/object_info` publishes them, read from the packaged `object_info.json`.

The file holds ComfyUI 0.3.64's entries for the node classes the emulator implements (the audio
nodes as they load when torchaudio is installed, VHS_LoadVideo as Video Helper Suite 1.7 declares it,
with a short description); the file lists of the loaders are filled in from the input folder when
asked, as ComfyUI does, and so are the model loaders' from the models folder when there is one.
"""

from __future__ import annotations

import copy
import json
import mimetypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folders import Folders

SPEC_FILE = Path(__file__).with_name("object_info.json")
CUSTOM_NODES = {"VHS_LoadVideo"}  # from a custom node pack (Video Helper Suite), not ComfyUI's own


def _of_types(*types: str) -> Callable[[str], bool]:
    """Files whose mimetype (from the name) is of one of these top-level types."""
    return lambda name: (mimetypes.guess_type(name)[0] or "").split("/")[0] in types


@dataclass(frozen=True)
class FileList:
    """A loader input listing the input folder: which files, and where the list goes."""

    input: str
    keep: Callable[[str], bool] = lambda name: True
    in_options: bool = False  # a V3 COMBO: the list is the `options` of the input's extra dict


def _vhs_video(name: str) -> bool:
    """Video Helper Suite lists files by extension."""
    return "." in name and name.rsplit(".", 1)[1].lower() in ("webm", "mp4", "mkv", "gif", "mov")


INPUT_FILE_LISTS = {
    "LoadImage": FileList("image", _of_types("image")),
    "LoadImageMask": FileList("image"),
    "LoadAudio": FileList("audio", _of_types("audio", "video")),
    "LoadVideo": FileList("file", _of_types("video"), in_options=True),
    "VHS_LoadVideo": FileList("video", _vhs_video),
}
# Loader inputs listing a models folder (ComfyUI's `folder_paths.get_filename_list(<folder>)`).
MODEL_FILE_LISTS = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints")}
InputInfo = tuple[Any, str | None, dict[str, Any]]


class NodeSpecs:
    """Lookup of node input/output definitions by class_type."""

    def __init__(self, folders: Folders, entries: dict[str, dict[str, Any]]) -> None:
        self._folders = folders
        self._entries = entries

    @classmethod
    def load(cls, folders: Folders) -> NodeSpecs:
        return cls(folders, json.loads(SPEC_FILE.read_text(encoding="utf-8")))

    def without(self, class_types: set[str]) -> NodeSpecs:
        """These specs but `class_types` (nodes not loaded)."""
        return NodeSpecs(self._folders, {k: v for k, v in self._entries.items() if k not in class_types})

    def has(self, class_type: Any) -> bool:
        return isinstance(class_type, str) and class_type in self._entries

    def class_types(self) -> list[str]:
        return list(self._entries)

    def entry(self, class_type: str) -> dict[str, Any]:
        """The full `/object_info` entry (a copy, with live file lists)."""
        entry = copy.deepcopy(self._entries[class_type])
        model_list = MODEL_FILE_LISTS.get(class_type)
        if model_list is not None:
            names = self._folders.model_files(model_list[1])
            if names is not None:
                entry["input"]["required"][model_list[0]][0] = names
        listing = INPUT_FILE_LISTS.get(class_type)
        if listing is not None:
            spec = entry["input"]["required"][listing.input]
            if listing.in_options:
                spec[1]["options"] = self._input_files(listing.keep)
            else:
                spec[0] = self._input_files(listing.keep)
        return entry

    def input_types(self, class_type: str) -> dict[str, dict[str, Any]]:
        """`{"required": {...}, "optional": {...}, "hidden": {...}}` like INPUT_TYPES()."""
        if class_type in INPUT_FILE_LISTS or class_type in MODEL_FILE_LISTS:
            return self.entry(class_type)["input"]  # type: ignore[no-any-return]
        return self._entries[class_type]["input"]  # type: ignore[no-any-return]

    def input_info(
        self, class_type: str, name: str, types: dict[str, dict[str, Any]] | None = None
    ) -> InputInfo | tuple[None, None, None]:
        """(type, category, extra options) of one input, or (None, None, None) if it has none."""
        types = types or self.input_types(class_type)
        for category in ("required", "optional", "hidden"):
            spec = types.get(category, {}).get(name)
            if spec is not None:
                if isinstance(spec, str):  # hidden inputs are bare strings such as "PROMPT"
                    return spec, category, {}
                return spec[0], category, (spec[1] if len(spec) > 1 else {})
        return None, None, None

    def declared_inputs(self, class_type: str) -> list[str]:
        """Required then optional input names, in the node's declared order."""
        order = self._entries[class_type].get("input_order", {})
        return [*order.get("required", []), *order.get("optional", [])]

    def hidden_inputs(self, class_type: str) -> dict[str, str]:
        hidden = self._entries[class_type]["input"].get("hidden", {})
        # V3 nodes publish `["PROMPT"]` where V1 nodes publish `"PROMPT"`.
        return {name: kind if isinstance(kind, str) else kind[0] for name, kind in hidden.items()}

    def return_types(self, class_type: str) -> list[str]:
        return list(self._entries[class_type]["output"])

    def is_output(self, class_type: str) -> bool:
        return bool(self._entries[class_type].get("output_node"))

    def _input_files(self, keep: Callable[[str], bool]) -> list[str]:
        folder = self._folders.input
        try:
            names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if keep(n))
