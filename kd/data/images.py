"""Image decoding shared by the data sources and the image cache: any image as 8-bit RGB, resized by its short side."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

import numpy as np
from PIL import Image

from kd.errors import KDError
from kd.files import printable

DRAFT_GAP = 2.0  # libjpeg may decode a JPEG at 1/2, 1/4 or 1/8 scale while both sides stay >= 2x the target


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, each greyscale mode scaled from the range it means: 16- and 32-bit integers from 0..65535
    (PIL's convert would clip them to white) unless they stay within 0..255, 32-bit floats (a float TIFF) from 0..1
    (PIL's would round them to black) unless they go above 1; NaN reads as 0. PIL converts the colour modes."""
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), posinf=0.0, neginf=0.0)
        top = pixels.max(initial=0.0)
        scale = (255.0 if image.mode == "F" and top <= 1 else
                 255 / 65535 if image.mode.startswith("I;16") or top > 255 else 1.0)
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8))
    return image.convert("RGB")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Turn any failure to read image ``path`` into a KDError naming it.

    PIL's decoders raise more than OSError on a damaged file (SyntaxError, ValueError, EOFError), and a
    header claiming more pixels than PIL's limit (a decompression bomb) raises DecompressionBombError.
    """
    try:
        yield
    except KDError:
        raise
    except Exception as exc:  # whatever a damaged or hostile file makes a decoder raise
        raise KDError(f"cannot read image {printable(path)}: {str(exc) or type(exc).__name__}") from None


def _open(path: str) -> Image.Image:
    """PIL's lazy image of file ``path``; refused if it is no regular file (opening a named pipe blocks forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError("not a regular file (a pipe, a device or a socket)")
    return Image.open(path)


def check_header(path: str) -> None:
    """Read only the header of image ``path`` (fast): a KDError naming it if that fails or claims too many pixels."""
    with reading(path), _open(path):
        pass


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB, with an error that names the file when it cannot be read."""
    with reading(path), _open(path) as image:
        return to_rgb(image)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` and the aspect ratio kept (rounded)."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def resize_short(image: Image.Image, short_side: int) -> np.ndarray:
    """An RGB image as HWC uint8 with its short side resized to ``short_side`` (bilinear, antialiased)."""
    return np.asarray(image.resize(resized_size(*image.size, short_side), Image.Resampling.BILINEAR))


def decode_resized(path: str, short_side: int) -> np.ndarray:
    """One image file as HWC uint8 RGB with its short side resized to ``short_side`` (bilinear, antialiased).

    A JPEG is decoded by libjpeg at a reduced scale (``Image.draft``) that keeps both sides at least
    twice the target (as Pillow's ``thumbnail`` does): about 2x faster on large photos, within about
    1 grey level on average of a full decode. Other images go through :func:`load_rgb`, as in
    training. Errors are KDErrors naming the file.
    """
    with reading(path), _open(path) as image:
        size = resized_size(*image.size, short_side)
        if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
            image.draft("RGB", (int(size[0] * DRAFT_GAP), int(size[1] * DRAFT_GAP)))
            if image.size[0] >= size[0] and image.size[1] >= size[1]:  # always, by draft's rounding
                return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    return resize_short(load_rgb(path), short_side)
