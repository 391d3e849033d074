"""Fast decoders: image files into the model's input tensor, several times cheaper than PIL.

A decoder works from bytes: ``Decoder.decode(data)``. Called with a sample's location
(``decoder(loc)``) it reads the bytes through its source's reader (``data.sources.Reader``) first,
so it works the same on files, table rows and tar members. Two ways to turn bytes into a
normalised ``[3, size, size]`` float tensor:

``plain``  the reference: :func:`features.images.load_image` (PIL) and the backbone's own transform.
``fast``   JPEG files are decoded by libjpeg through ``torchvision.io.decode_jpeg`` (EXIF orientation
           applied) and resized, cropped and normalised with torch on uint8 pixels. A JPEG whose
           short side is at least four times the resize target is decoded at a reduced DCT scale by
           PIL's ``draft`` instead (to at least twice the target), several times faster. Every
           other format, a CMYK JPEG, or a JPEG libjpeg refuses goes through ``load_image``, so a bad
           file fails with the same recorded reason as on the plain path.

The geometry (short side to ``resize``, centre crop ``size``) is torchvision's, so the fast path
agrees with the plain one to a cosine of about 0.9999 per embedding.

``Decoder(..., pixels=True)`` (or :meth:`Decoder.as_pixels`) stops before normalising: it returns the
cropped uint8 pixels ``[size, size, 3]`` (HWC, the order they are decoded in), for a runtime that
normalises inside its own graph (the OpenVINO runtime does). Normalising on floats was a fifth of
the decoder's cost per image, and uint8 batches are a quarter of the bytes to hand between processes.

For the GPU, :func:`read_for_gpu` only reads a JPEG's bytes on the CPU and :func:`decode_on_device`
decodes a whole batch of them with ``decode_jpeg(..., device=...)`` and resizes on the device.
"""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
import torch

from featurebank.data.sources import FileReader, Reader, UnreadableSample
from featurebank.features.backbones import Preprocessing
from featurebank.features.images import ImageError, load_image
from featurebank.features.names import DECODERS, DEFAULT_DECODER  # noqa: F401 - declared with the other option values

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def complete_jpeg(data: bytes) -> bool:
    """True when the file ends with the end-of-image marker. libjpeg decodes a truncated file into a
    partly grey picture with only a warning; such files go to load_image, which refuses them."""
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


def _decode_jpeg_supports_exif() -> bool:
    from torchvision.io import decode_jpeg

    try:
        return "apply_exif_orientation" in inspect.signature(decode_jpeg).parameters
    except (TypeError, ValueError):
        return False


class Decoder:
    """A picklable callable: a sample's location -> normalised float tensor [3, size, size], or
    raises ImageError. ``reader`` (a ``data.sources.Reader``, default: local files) reads the bytes;
    :meth:`decode` works from bytes alone.

    ``timings`` accumulates the seconds spent reading bytes and decoding/transforming them.
    """

    def __init__(self, pre: Preprocessing, mode: str = DEFAULT_DECODER, reader: Reader | None = None,
                 pixels: bool = False):
        if mode not in DECODERS:
            raise ValueError(f"decoder mode must be 'fast' or 'plain', not {mode!r}")
        self.pre, self.mode, self.pixels = pre, mode, pixels
        self.reader = reader if reader is not None else FileReader()
        self.timings = {"read": 0.0, "decode": 0.0}
        self._transform = None
        self._exif = None
        s = 1.0 / (255.0 * np.asarray(pre.std, np.float32))
        self._scale = torch.from_numpy(s).view(3, 1, 1)
        self._shift = torch.from_numpy(np.asarray(pre.mean, np.float32) / np.asarray(pre.std, np.float32)).view(3, 1, 1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_transform"] = None
        return state

    def as_pixels(self) -> Decoder:
        """The same decoder returning uint8 pixels [size, size, 3] instead of normalised floats."""
        return Decoder(self.pre, self.mode, self.reader, pixels=True)

    def read(self, loc) -> bytes:
        """The sample's bytes through the reader (timed), or ImageError with the reason."""
        t0 = time.perf_counter()
        try:
            return self.reader.read(str(loc))
        except UnreadableSample as exc:
            raise ImageError(str(exc)) from None
        finally:
            self.timings["read"] += time.perf_counter() - t0

    def __call__(self, loc) -> torch.Tensor:
        return self.decode(self.read(loc))

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> the model's input tensor, or ImageError with the reason."""
        t1 = time.perf_counter()
        try:
            if self.mode == "plain":
                img = load_image(data)
                if self._transform is None:
                    self._transform = self.pre.transform(normalize=not self.pixels)
                out = self._transform(img)
                return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()) if self.pixels else out
            return self.finish(self.decode_pixels(data))
        finally:
            self.timings["decode"] += time.perf_counter() - t1

    def decode_pixels(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> uint8 [3, H, W] at the resolution this decoder needs (a large JPEG at a
        reduced DCT scale), before any resize: what :meth:`finish` takes. Several backbones' decoders can
        share one call of the one that needs the most pixels (features.sweep). ImageError with the reason."""
        pixels = self._jpeg(data) if data[:3] == JPEG_MAGIC else None
        return pixels if pixels is not None else pil_pixels(data)

    def _jpeg(self, data: bytes) -> torch.Tensor | None:
        """Decode a JPEG with libjpeg; None sends the file to the PIL path (which records why it fails)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        head = jpeg_header(data)
        if head is None or head[2] not in (1, 3) or not complete_jpeg(data):
            return None  # CMYK, odd, truncated or damaged: PIL handles it or names the problem
        w, h, _ = head
        if w * h == 0:
            return None
        if min(w, h) >= 4 * self.pre.resize:
            # DCT-scaled decode to at least twice the target: the antialiased resize that follows
            # then sees enough pixels to match a full decode (cosine > 0.999)
            return pil_pixels(data, 2 * self.pre.resize)
        if self._exif is None:
            self._exif = _decode_jpeg_supports_exif()
        if not self._exif and b"Exif" in data[:65536]:
            return None  # this torchvision cannot apply the orientation: PIL does
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            kw = {"apply_exif_orientation": True} if self._exif else {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pixels = decode_jpeg(buf, mode=ImageReadMode.RGB, **kw)
            if any(not issubclass(w.category, DeprecationWarning) for w in caught):
                return None  # libjpeg complained about the data: let load_image judge the file
            return pixels
        except Exception:
            return None

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] (any device) -> resized, centre-cropped, normalised float [3, size, size]
        (with ``pixels``: the cropped uint8 [size, size, 3])."""
        import torchvision.transforms.v2.functional as F

        mode = F.InterpolationMode.BICUBIC if self.pre.interpolation == "bicubic" else F.InterpolationMode.BILINEAR
        if pixels.device.type != "cpu":
            pixels = pixels.float()  # device kernels for antialiased resizing take floats
        x = F.center_crop(F.resize(pixels, [self.pre.resize], mode, antialias=True), [self.pre.size, self.pre.size])
        if self.pixels:
            if x.dtype != torch.uint8:
                x = x.clamp_(0, 255).round_().to(torch.uint8)
            return x.permute(1, 2, 0)
        if x.device != self._scale.device:  # once per device, not once per image
            self._scale, self._shift = self._scale.to(x.device), self._shift.to(x.device)
        scale, shift = self._scale, self._shift
        if x.dtype == torch.uint8:
            x = x.float()
        else:
            x = x.clamp_(0, 255).round_()  # the uint8 path rounds and clips: keep the device path identical
        return x.mul_(scale).sub_(shift)


def pil_pixels(data, min_size: int | None = None) -> torch.Tensor:
    """Decode bytes (or a local file) with ``load_image`` (every format, every oddity) into uint8 [3, H, W]."""
    img = load_image(data, min_size=min_size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def read_for_gpu(loc, decoder: Decoder):
    """On a CPU worker: ("jpeg", bytes as a uint8 tensor) for a JPEG the device can decode, or
    ("pixels", the finished tensor) decoded on the CPU for anything else (other formats, CMYK, EXIF
    orientation other than 1). Raises ImageError."""
    data = decoder.read(loc)
    if data[:3] == JPEG_MAGIC:
        head = jpeg_header(data)
        # the device decoder ignores EXIF orientation: rotated photos are decoded on the CPU
        if (head is not None and head[2] in (1, 3) and head[0] * head[1] > 0 and complete_jpeg(data)
                and jpeg_orientation(data) == 1):
            return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return "pixels", decoder.decode(data)


def decode_on_device(jpegs: list[torch.Tensor], paths: list, decoder: Decoder, device: torch.device):
    """Decode a batch of JPEG byte tensors on ``device`` and finish them there.

    Returns (tensors, failures): one tensor or None per input, and (position, reason) for the files
    that neither the device nor the CPU fallback could decode.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    kw = {"apply_exif_orientation": True} if _decode_jpeg_supports_exif() else {}
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device, **kw)
    except Exception:  # one bad file spoils the batch call: decode one by one to find it
        images = []
        for buf in jpegs:
            try:
                images.append(decode_jpeg(buf, mode=ImageReadMode.RGB, device=device, **kw))
            except Exception:
                images.append(None)
    out, failures = [], []
    for k, img in enumerate(images):
        try:
            out.append(decoder.finish(img) if img is not None else decoder(paths[k]).to(device, non_blocking=True))
        except ImageError as exc:
            out.append(None)
            failures.append((k, str(exc)))
    return out, failures
