"""Audio nodes of comfy_extras.nodes_audio: LoadAudio (input folder) and SaveAudio (FLAC into output/).

An AUDIO value is 16-bit PCM. A PCM WAV file is decoded for real (standard library); other formats
need FFmpeg, which ComfyUI has (PyAV) and the emulator has not: such a file becomes one second of
noise drawn from the file's SHA-256, so the output still depends on the input. SaveAudio writes a
real FLAC file whose STREAMINFO holds the MD5 of the samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import wave
from dataclasses import dataclass, field
from typing import Any

from . import flac
from .base import Node, NodeContext, NodeOutput
from .input_files import InputFileNode
from .save import save_path

STAND_IN_RATE = 44100


@dataclass(frozen=True)
class Audio:
    """AUDIO: a batch of one clip (ComfyUI's waveform `[1, channels, samples]` plus sample rate)."""

    sample_rate: int
    channels: int
    pcm: bytes = field(repr=False)  # 16-bit signed little-endian, channels interleaved

    @property
    def samples(self) -> int:
        return len(self.pcm) // (2 * self.channels)


class LoadAudio(InputFileNode):
    CLASS_TYPE = "LoadAudio"
    VALIDATE_ARGS = ("audio",)
    FILE_KIND = "audio"

    def run(self, ctx: NodeContext, audio: str, **_: Any) -> NodeOutput:
        with open(self.folders.annotated_path(audio), "rb") as f:
            data = f.read()
        return NodeOutput((read_wav(data) or _stand_in(data),))


class SaveAudio(Node):
    """Writes `<prefix>_<counter>_.flac` into output/ and reports it under the `audio` key."""

    CLASS_TYPE = "SaveAudio"

    def run(
        self,
        ctx: NodeContext,
        audio: Audio,
        filename_prefix: str = "ComfyUI",
        prompt: Any = None,
        extra_pnginfo: Any = None,
        **_: Any,
    ) -> NodeOutput:
        folder, name, counter, subfolder = save_path(filename_prefix, self.folders.output, 0, 0)
        file = f"{name.replace('%batch_num%', '0')}_{counter:05}_.flac"
        data = flac.encode(audio.pcm, audio.channels, audio.sample_rate, _metadata(prompt, extra_pnginfo))
        with open(os.path.join(folder, file), "wb") as f:
            f.write(data)
        return NodeOutput(ui={"audio": [{"filename": file, "subfolder": subfolder, "type": "output"}]})


def read_wav(data: bytes) -> Audio | None:
    """The samples of a PCM WAV file as 16-bit, or None when `data` is not one."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError):
        return None
    if width == 2:
        pcm = frames
    elif width == 1:  # unsigned 8-bit
        pcm = bytes(b for sample in frames for b in (0, sample ^ 0x80))
    else:  # 24 or 32 bits: the two most significant bytes of each little-endian sample
        pcm = b"".join(frames[i + width - 2 : i + width] for i in range(0, len(frames), width))
    return Audio(rate, channels, pcm)


def _stand_in(data: bytes) -> Audio:
    rng = random.Random(hashlib.sha256(data).digest())
    return Audio(STAND_IN_RATE, 1, rng.randbytes(2 * STAND_IN_RATE))


def _metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    """What ComfyUI stores in the container's metadata: the prompt and the workflow."""
    tags = {"prompt": json.dumps(prompt)} if prompt is not None else {}
    if isinstance(extra_pnginfo, dict):
        tags.update({key: json.dumps(value) for key, value in extra_pnginfo.items()})
    return tags
