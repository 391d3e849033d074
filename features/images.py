"""Decoding encoded images (bytes from any source, or a local file) into RGB pictures, robustly.

Every input either decodes into a correct RGB image or raises :class:`ImageError` with a one-line
reason: the engine records the reason and goes on. Valid but unusual files are decoded *correctly*:
EXIF orientation applied, 16-bit scaled to 8-bit, CMYK/palette/alpha converted, first frame of an
animation. A header that claims more pixels than ``MAX_PIXELS`` is refused before any allocation.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

MAX_PIXELS = 120_000_000  # a 12000 x 10000 photo; above this a header is treated as a decompression bomb
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """A file that cannot be used as an image; the message is the reason recorded in the store."""


def content_fingerprint(path: str | os.PathLike, content_hash: bool = False) -> str:
    """A local file's fingerprint (kept for callers of the old engine; sources fingerprint their own samples)."""
    from featurebank.data.sources import file_fingerprint

    return file_fingerprint(path, content_hash)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: scale the full range to 8 bits; a plain convert("RGB")
        # clips at 255 and turns most 16-bit images white
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() <= 65535 else float(a.max())
        a = np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(a).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (Adobe inversion handled by PIL), YCbCr, 16-bit RGB


def read_local(path: str | os.PathLike) -> bytes:
    """A local file's bytes, or ImageError with the reason (missing, directory, FIFO, empty, permission)."""
    from featurebank.data.sources import UnreadableSample, read_file

    try:
        return read_file(path)
    except UnreadableSample as exc:
        raise ImageError(str(exc)) from None


def load_image(data: bytes | str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes (or a local file, read first) into an RGB PIL image, or raise
    ImageError with the reason.

    ``min_size``: the smallest side the caller needs; large JPEGs are then decoded at a reduced
    scale (DCT scaling) that still covers it, which is several times faster.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        data = read_local(data)
    if len(data) == 0:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit and refuses at twice it (at open, from the header alone);
            # the MAX_PIXELS check below is the one limit that applies below that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        f"image claims {w}x{h} pixels, above the {MAX_PIXELS:,} limit (decompression bomb?)"
                    )
                if min_size and img.format == "JPEG":
                    orientation = img.getexif().get(0x0112, 1)
                    need = (min_size, min_size)
                    img.draft("RGB", need if orientation in (1, 2, 3, 4) else need[::-1])
                img.load()  # an animation (GIF, APNG, WebP, multi-page TIFF) opens at its first frame
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error, IndexError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot decode: {msg}") from None
