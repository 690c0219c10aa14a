"""A deterministic stand-in for a diffusion result: the same digest always draws the same picture."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageOps


def render(digest: bytes, width: int, height: int) -> Image.Image:
    """An RGB picture (sky-like gradient plus shapes) fully determined by `digest` and the size."""
    rng = random.Random(digest)
    top, bottom = _colour(rng), _colour(rng)
    gradient = Image.linear_gradient("L").resize((width, height))
    picture = ImageOps.colorize(gradient, black=top, white=bottom).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.randint(4, 9)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = x0 + rng.randint(1, max(1, width // 2))
        y1 = y0 + rng.randint(1, max(1, height // 2))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=_colour(rng))
        else:
            draw.rectangle((x0, y0, x1, y1), fill=_colour(rng))
    return picture


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)
