"""The node classes the emulator really executes, by class_type.

Their input/output definitions live in `../object_info.json`; every class here has an entry there.
"""

from __future__ import annotations

from .audio import LoadAudio, SaveAudio
from .base import Interrupted, Node, NodeContext, NodeOutput
from .images import EmptyImage, ImageAddNoise, ImageBlur, ImageInvert, ImageScale
from .loaders import LoadImage, LoadImageMask
from .preview_any import PreviewAny
from .save import PreviewImage, SaveImage
from .txt2img import (
    CheckpointLoaderSimple,
    CLIPTextEncode,
    EmptyLatentImage,
    KSampler,
    LatentUpscale,
    VAEDecode,
)
from .video import LoadVideo, SaveVideo, VHSLoadVideo

NODE_CLASSES: dict[str, type[Node]] = {
    cls.CLASS_TYPE: cls
    for cls in (
        CheckpointLoaderSimple,
        CLIPTextEncode,
        VAEDecode,
        EmptyLatentImage,
        KSampler,
        LatentUpscale,
        SaveImage,
        PreviewImage,
        LoadImage,
        LoadImageMask,
        ImageScale,
        ImageInvert,
        EmptyImage,
        ImageAddNoise,
        ImageBlur,
        LoadAudio,
        SaveAudio,
        LoadVideo,
        SaveVideo,
        VHSLoadVideo,
        PreviewAny,
    )
}

__all__ = ["NODE_CLASSES", "Interrupted", "Node", "NodeContext", "NodeOutput"]
