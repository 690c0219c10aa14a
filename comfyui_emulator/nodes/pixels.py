"""IMAGE and MASK values as ComfyUI holds them: float32 tensors, converted from and to bytes the
way ComfyUI converts them.

ComfyUI loads a picture as `np.array(img).astype(np.float32) / 255.0`, computes on float32, and
saves with `np.clip(255. * i, 0, 255).astype(np.uint8)`: truncation, not rounding. A `Frame` keeps
each channel as a Pillow "F" (float32) image, so the same arithmetic gives the same bytes:
LoadImage -> ImageInvert -> SaveImage turns 200 into 54 (1 - 200/255 in float32 is 0.21176469,
times 255 is 53.999996), as ComfyUI does, not 55.

Why Pillow's float operations are exact here: a 256-entry table of Python floats (`v / 255`
divided in double) is stored as float32 by `point(table, "F")`, and rounding a double quotient to
float32 is the correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits); `point(lambda x: x * a
+ b)` on an "F" image computes `x * a + b` in double, exact for the scales used here, then stores it
as float32, which is float32 arithmetic's one rounding; converting "F" to "L" clips to 0..255 and
truncates. tests/test_emulator_nodes.py checks all this against numpy's float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

# float32(v / 255) for every byte, as ComfyUI's loaders compute it.
_UNIT = [v / 255 for v in range(256)]

Band = Image.Image  # one channel, mode "F"


def to_float(band: Image.Image) -> Band:
    """An 8-bit channel ("L") as float32 `v / 255`."""
    return band.point(_UNIT, "F")


def to_bytes(band: Band) -> Image.Image:
    """A float32 channel as ComfyUI saves it: `clip(255 * x, 0, 255)` truncated to uint8 ("L")."""
    return band.point(lambda x: x * 255.0).convert("L")


def one_minus(band: Band) -> Band:
    """`1.0 - x` in float32 (ImageInvert, and masks from alpha)."""
    return band.point(lambda x: x * -1.0 + 1.0)


def filled(size: tuple[int, int], byte: int) -> Band:
    """A channel of `float32(byte / 255)` everywhere, as `torch.full(..., byte / 0xFF)` makes it."""
    return Image.new("F", size, _UNIT[byte])


@dataclass(frozen=True, slots=True, repr=False)
class Frame:
    """One image of an IMAGE batch: ComfyUI's float32 `[height, width, 3]`, one "F" image per channel."""

    bands: tuple[Band, Band, Band]

    @classmethod
    def of_picture(cls, picture: Image.Image) -> Frame:
        """A decoded picture as ComfyUI's loaders turn it into a tensor (RGB, `v / 255`)."""
        red, green, blue = picture.convert("RGB").split()
        return cls((to_float(red), to_float(green), to_float(blue)))

    @classmethod
    def filled(cls, size: tuple[int, int], rgb: tuple[int, int, int]) -> Frame:
        return cls((filled(size, rgb[0]), filled(size, rgb[1]), filled(size, rgb[2])))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.bands[0].size

    def map(self, operation: Callable[[Band], Band]) -> Frame:
        """The frame with `operation` applied to each channel."""
        red, green, blue = self.bands
        return Frame((operation(red), operation(green), operation(blue)))

    def picture(self) -> Image.Image:
        """The 8-bit RGB picture SaveImage writes (and what Pillow-based operations work on)."""
        red, green, blue = (to_bytes(band) for band in self.bands)
        return Image.merge("RGB", (red, green, blue))

    def __repr__(self) -> str:
        width, height = self.size
        return f"<IMAGE float32 [{height}, {width}, 3]>"
