"""Video nodes: LoadVideo and SaveVideo (comfy_extras.nodes_video) and Video Helper Suite's
VHS_LoadVideo.

The emulator has no FFmpeg. A VIDEO is the file it was loaded from, and SaveVideo copies it into
output/ (ComfyUI's SaveVideo with format and codec "auto" copies the streams as they are), so the
saved video is the loaded one. VHS_LoadVideo decodes what Pillow can (GIF, animated WebP) into
frames; any other file becomes one 64x64 frame coloured by the first three bytes of the file's
SHA-256, so the output still depends on the input. `force_rate` and the custom size are ignored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageSequence, UnidentifiedImageError

from ..folders import Folders
from .base import ImageBatch, Node, NodeContext, NodeOutput
from .input_files import InputFileNode
from .pixels import Frame
from .save import save_path

STAND_IN_SIZE = (64, 64)
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class Video:
    """VIDEO: ComfyUI's VideoFromFile, a video read lazily from its file."""

    path: str


class LoadVideo(InputFileNode):
    CLASS_TYPE = "LoadVideo"
    VALIDATE_ARGS = ("file",)
    FILE_KIND = "video"

    @classmethod
    def is_changed(cls, folders: Folders, inputs: dict[str, Any]) -> Any:
        # ComfyUI uses the modification time, to avoid hashing large videos.
        return os.path.getmtime(folders.annotated_path(cls.file_name(inputs)))

    def run(self, ctx: NodeContext, file: str, **_: Any) -> NodeOutput:
        return NodeOutput((Video(self.folders.annotated_path(file)),))


class SaveVideo(Node):
    """Writes `<prefix>_<counter>_.mp4` into output/; reports it as ComfyUI's PreviewVideo does."""

    CLASS_TYPE = "SaveVideo"

    def run(self, ctx: NodeContext, video: Video, filename_prefix: str = "video/ComfyUI", **_: Any) -> NodeOutput:
        folder, name, counter, subfolder = save_path(filename_prefix, self.folders.output, 0, 0)
        file = f"{name}_{counter:05}_.mp4"
        shutil.copyfile(video.path, os.path.join(folder, file))
        saved = {"filename": file, "subfolder": subfolder, "type": "output"}
        return NodeOutput(ui={"images": [saved], "animated": [True]})


class VHSLoadVideo(InputFileNode):
    """Outputs IMAGE frames, frame_count, audio (None here) and video_info."""

    CLASS_TYPE = "VHS_LoadVideo"
    VALIDATE_ARGS = ("video",)
    FILE_KIND = "video"

    @classmethod
    def is_changed(cls, folders: Folders, inputs: dict[str, Any]) -> Any:
        # Video Helper Suite hashes the path and the modification time, not the content.
        path = folders.annotated_path(cls.file_name(inputs))
        return hashlib.sha256(f"{path}{os.path.getmtime(path)}".encode()).hexdigest()

    def run(
        self,
        ctx: NodeContext,
        video: str,
        frame_load_cap: int = 0,
        skip_first_frames: int = 0,
        select_every_nth: int = 1,
        **_: Any,
    ) -> NodeOutput:
        all_frames, fps = _frames(self.folders.annotated_path(video))
        frames = all_frames[skip_first_frames :: max(1, select_every_nth)]
        if frame_load_cap > 0:
            frames = frames[:frame_load_cap]
        if not frames:
            raise RuntimeError("No frames generated")
        width, height = frames[0].size
        loaded_fps = fps / max(1, select_every_nth)
        info = {
            "source_fps": fps,
            "source_frame_count": len(all_frames),
            "source_duration": len(all_frames) / fps,
            "source_width": width,
            "source_height": height,
            "loaded_fps": loaded_fps,
            "loaded_frame_count": len(frames),
            "loaded_duration": len(frames) / loaded_fps,
            "loaded_width": width,
            "loaded_height": height,
        }
        return NodeOutput((frames, len(frames), None, info))


def _frames(path: str) -> tuple[ImageBatch, float]:
    """Every frame Pillow can decode (same size as the first), and the frame rate."""
    try:
        with Image.open(path) as source:
            duration = source.info.get("duration") or 0
            frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(source)]
        fps = 1000 / duration if duration else DEFAULT_FPS
        return [Frame.of_picture(f) for f in frames if f.size == frames[0].size], fps
    except (UnidentifiedImageError, OSError):
        with open(path, "rb") as f:
            colour = tuple(hashlib.sha256(f.read()).digest()[:3])
        return [Frame.of_picture(Image.new("RGB", STAND_IN_SIZE, colour))], DEFAULT_FPS
