"""What a caller asked of its image outputs (pure values): `output_format`, `output_quality`,
`output_max_side`. The conversion itself (Pillow) is `serverless.delivery.convert`'s; a job spec
names these without loading it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ImageFormat = Literal["png", "jpeg", "webp"]
FORMATS: dict[str, ImageFormat] = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
MIME: dict[ImageFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSION: dict[ImageFormat, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True, slots=True)
class Conversion:
    """What a caller asked of its image outputs; all None: nothing (outputs pass unchanged)."""

    format: ImageFormat | None = None
    quality: int | None = None
    max_side: int | None = None

    @property
    def active(self) -> bool:
        return self.format is not None or self.quality is not None or self.max_side is not None


NO_CONVERSION = Conversion()
