"""Decoding encoded images (bytes from any source, or a local file) into RGB pictures, robustly.

Every input either decodes into a correct RGB image or raises :class:`ImageError` with a one-line
reason: the engine records the reason and goes on. Valid but unusual files are decoded *correctly*:
EXIF orientation applied, 16-bit scaled to 8-bit, CMYK/palette/alpha converted, first frame of an
animation. A header that claims more pixels than ``MAX_PIXELS`` is refused before any allocation.

JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` in strict mode: the same library and the
same settings as PIL's JPEG decoder (accurate integer DCT, smooth chroma upsampling), so the pixels
are PIL's to the bit, but every warning libjpeg gives about the data ("Corrupt JPEG data: premature
end of data segment", "... extraneous bytes before marker", "bad Huffman code", "Premature end of
JPEG file") is raised for the file instead of being printed on stderr (torchvision's decoder) or
dropped (PIL's). Such a file is *damaged*: libjpeg made up the pixels it could not read. It is
refused with that reason unless the caller allows damaged files (``--allow-damaged``), in which
case it is decoded as libjpeg would and the damage is returned with it, to be counted as a note.
Four-component (CMYK/YCCK) JPEGs are checked the same way and then decoded by PIL, which handles
Adobe's inverted CMYK.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

MAX_PIXELS = 120_000_000  # a 12000 x 10000 photo; above this a header is treated as a decompression bomb
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """A file that cannot be used as an image; the message is the reason recorded in the store."""


DAMAGED = "damaged JPEG data"  # how a damage reason starts (failures) and the note of a row embedded anyway
DAMAGED_HINT = "--allow-damaged embeds such files anyway"
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def is_damage(reason: str) -> bool:
    """True for a failure recorded because a decoder reported damaged data (see :data:`DAMAGED`)."""
    return reason.startswith(DAMAGED)


def complete_jpeg(data: bytes) -> bool:
    """True when the file ends with the end-of-image marker (the GPU path's first, cheap check)."""
    return data.rstrip(b"\0")[-2:] == JPEG_END


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, or None when it cannot be found."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 10 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return w, h, data[i + 9]
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, 1 when it has none or it cannot be read."""
    i, n = 2, min(len(data), 1 << 17)
    while i + 4 <= n and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            break
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
            tiff = data[i + 10:i + 2 + length]
            order = "little" if tiff[:2] == b"II" else "big"
            try:
                ifd = int.from_bytes(tiff[4:8], order)
                for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
                    e = ifd + 2 + 12 * k
                    if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
                        value = int.from_bytes(tiff[e + 8:e + 10], order)
                        return value if 1 <= value <= 8 else 1
            except (IndexError, ValueError):
                return 1
            return 1
        i += 2 + length
    return 1


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels [H, W, C] stored with EXIF ``orientation`` turned upright, as PIL's ``exif_transpose`` does
    (a view; negative strides for the flipped ones)."""
    if orientation in (5, 6, 7, 8):
        a = a.transpose(1, 0, 2)  # 5: transpose; 6, 7, 8 start from it
        return {5: a, 6: a[:, ::-1], 7: a[::-1, ::-1], 8: a[::-1]}[orientation]
    return {2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1]}.get(orientation, a)


def _libjpeg(data: bytes, colorspace: str, allow_damaged: bool, **scale) -> tuple[np.ndarray | None, str]:
    """libjpeg-turbo's decode in strict mode: (pixels, "") for a whole file, (pixels, reason) for a
    damaged one when ``allow_damaged`` (else ImageError), (None, "") for one it cannot decode at all
    (PIL then judges it and names the reason)."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace, strict=True, **scale), ""
    except ValueError as exc:
        strict_error = str(exc).splitlines()[0] if str(exc) else "unknown libjpeg warning"
    try:  # a warning, or an error? libjpeg decodes past a warning, not past an error
        pixels = simplejpeg.decode_jpeg(data, colorspace, strict=False, **scale)
    except ValueError:
        return None, ""
    reason = f"{DAMAGED} ({strict_error})"
    if not allow_damaged:
        raise ImageError(f"{reason}: {DAMAGED_HINT}")
    return pixels, reason


def jpeg_damage(data: bytes) -> str:
    """The damage libjpeg reports in a JPEG's data ("" for none, or when it cannot decode the file at
    all), found by decoding it at the smallest DCT scale: every entropy-coded byte is still read."""
    head = jpeg_header(data)
    if head is None or head[0] * head[1] == 0 or head[0] * head[1] > MAX_PIXELS:
        return ""
    return _libjpeg(data, "CMYK" if head[2] == 4 else "RGB", True, min_height=1, min_width=1)[1]


def jpeg_pixels(data: bytes, min_size: int | None = None, allow_damaged: bool = False) -> tuple[np.ndarray | None, str]:
    """A JPEG's upright RGB pixels [H, W, 3] (uint8, maybe a strided view) and the damage libjpeg
    reported ("" for none; damage raises ImageError unless ``allow_damaged``).

    ``min_size``: the smallest side the caller needs; the JPEG is then decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps both sides at least that large, several times faster.
    (None, damage) for a file this path leaves to PIL (CMYK/YCCK, after its data was checked; an
    unreadable header; a file libjpeg-turbo refuses)."""
    head = jpeg_header(data)
    if head is None:
        return None, ""
    w, h, components = head
    if w * h > MAX_PIXELS:
        raise ImageError(f"image claims {w}x{h} pixels, above the {MAX_PIXELS:,} limit (decompression bomb?)")
    if w * h == 0:
        return None, ""
    if components == 4:  # checked here (at the smallest scale, cheap), decoded by PIL
        _, damage = _libjpeg(data, "CMYK", allow_damaged, min_height=1, min_width=1)
        return None, damage
    if components not in (1, 3):
        return None, ""
    scale = {"min_height": min_size, "min_width": min_size} if min_size else {}
    pixels, damage = _libjpeg(data, "RGB", allow_damaged, **scale)
    if pixels is None:
        return None, ""
    return orient(pixels, jpeg_orientation(data)), damage


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
    ImageError with the reason (a damaged JPEG included).

    ``min_size``: the smallest side the caller needs; large JPEGs are then decoded at a reduced
    scale (DCT scaling) that still covers it, which is several times faster.
    """
    return decode_image(data, min_size)[0]


def decode_image(data: bytes | str | os.PathLike, min_size: int | None = None,
                 allow_damaged: bool = False) -> tuple[Image.Image, str]:
    """:func:`load_image` that also returns the damage a decoder reported ("" for none); with
    ``allow_damaged`` a damaged JPEG is decoded as libjpeg would instead of raising ImageError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        data = read_local(data)
    if len(data) == 0:
        raise ImageError("empty file")
    damage = ""
    if bytes(data[:3]) == JPEG_MAGIC:
        pixels, damage = jpeg_pixels(bytes(data), min_size, allow_damaged)
        if pixels is not None:
            return Image.fromarray(np.ascontiguousarray(pixels)), damage
    return _pil_image(data, min_size), damage


def _pil_image(data, min_size: int | None = None) -> Image.Image:
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
