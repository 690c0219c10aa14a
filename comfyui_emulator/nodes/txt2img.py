"""The text-to-image chain without a model: CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage,
KSampler and VAEDecode.

Values carry a digest of everything that shaped them, so VAEDecode draws a picture that depends
only on checkpoint, prompts, seed, sampler settings and size: same inputs, same pixels.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from .base import Node, NodeContext, NodeOutput
from .picture import render
from .pixels import Frame


@dataclass(frozen=True)
class Model:
    """MODEL, CLIP and VAE outputs alike: a named part of a checkpoint."""

    kind: str
    ckpt_name: str


@dataclass(frozen=True)
class Conditioning:
    text: str
    ckpt_name: str


@dataclass(frozen=True)
class Latent:
    """LATENT: size in latent pixels (1/8 of the image) and the digest of how it was sampled."""

    width: int
    height: int
    batch_size: int
    digest: str = ""


class CheckpointLoaderSimple(Node):
    CLASS_TYPE = "CheckpointLoaderSimple"

    def run(self, ctx: NodeContext, ckpt_name: str, **_: Any) -> NodeOutput:
        ctx.load_model(ckpt_name)
        return NodeOutput(tuple(Model(kind, ckpt_name) for kind in ("MODEL", "CLIP", "VAE")))


class CLIPTextEncode(Node):
    CLASS_TYPE = "CLIPTextEncode"

    def run(self, ctx: NodeContext, text: str, clip: Model, **_: Any) -> NodeOutput:
        return NodeOutput((Conditioning(text, clip.ckpt_name),))


class EmptyLatentImage(Node):
    CLASS_TYPE = "EmptyLatentImage"

    def run(self, ctx: NodeContext, width: int, height: int, batch_size: int = 1, **_: Any) -> NodeOutput:
        return NodeOutput((Latent(width // 8, height // 8, batch_size),))


class KSampler(Node):
    """Sleeps `step_delay` per step and reports each step, like a real sampler's progress bar, with
    a preview of the latent at that step (noise giving way to the picture VAEDecode will draw)."""

    CLASS_TYPE = "KSampler"

    def run(
        self,
        ctx: NodeContext,
        model: Model,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        denoise: float = 1.0,
        **_: Any,
    ) -> NodeOutput:
        recipe = [
            model.ckpt_name,
            seed,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive.text,
            negative.text,
            latent_image.width,
            latent_image.height,
            latent_image.batch_size,
            denoise,
            latent_image.digest,
        ]
        digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()
        size = (max(1, latent_image.width), max(1, latent_image.height))
        for step in range(1, steps + 1):
            ctx.sleep(ctx.step_delay())
            ctx.progress(step, steps, _latent_preview(digest, seed, size, step / steps))
        return NodeOutput((replace(latent_image, digest=digest),))


def _latent_preview(digest: str, seed: int, size: tuple[int, int], done: float) -> Image.Image:
    """What a latent-to-RGB preview looks like at a step: latent-sized, the seed's noise fading
    into the picture."""
    picture = render(digest.encode(), *size)
    noise = Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))
    return Image.blend(noise, picture, done)


class VAEDecode(Node):
    CLASS_TYPE = "VAEDecode"

    def run(self, ctx: NodeContext, samples: Latent, vae: Model, **_: Any) -> NodeOutput:
        width, height = samples.width * 8, samples.height * 8
        images = [
            Frame.of_picture(render(f"{samples.digest}:{vae.ckpt_name}:{index}".encode(), width, height))
            for index in range(samples.batch_size)
        ]
        return NodeOutput((images,))


class LatentUpscale(Node):
    """Resizes a latent (a hires-fix workflow samples again after it); 0 keeps the aspect ratio."""

    CLASS_TYPE = "LatentUpscale"

    def run(self, ctx: NodeContext, samples: Latent, width: int, height: int, **_: Any) -> NodeOutput:
        if width == 0 and height == 0:
            return NodeOutput((samples,))
        if width == 0:
            width = max(8, height * samples.width // max(samples.height, 1))
        if height == 0:
            height = max(8, width * samples.height // max(samples.width, 1))
        digest = hashlib.sha256(f"{samples.digest}:{width}x{height}".encode()).hexdigest()
        return NodeOutput((Latent(width // 8, height // 8, samples.batch_size, digest),))
