"""Fast decoders: image files into the model's input tensor, several times cheaper than PIL.

A decoder works from bytes: ``Decoder.decode(data)``. Called with a sample's location
(``decoder(loc)``) it reads the bytes through its source's reader (``data.sources.Reader``) first,
so it works the same on files, table rows and tar members. Two ways to turn bytes into a
normalised ``[3, size, size]`` float tensor:

``plain``  the reference: :func:`features.images.load_image` (PIL) and the backbone's own transform.
``fast``   JPEG files are decoded by libjpeg-turbo in strict mode (:func:`features.images.jpeg_pixels`,
           EXIF orientation applied) and resized, cropped and normalised with torch on uint8 pixels.
           A JPEG whose short side is at least four times the resize target is decoded at a reduced
           DCT scale (to at least twice the target), several times faster. Every other format, a CMYK
           JPEG, or a JPEG libjpeg refuses goes through ``load_image``, so a bad file fails with the
           same recorded reason as on the plain path.

Both paths refuse a JPEG whose data libjpeg reports as damaged (a recorded failure starting with
``damaged JPEG data``); with ``allow_damaged`` they decode it as libjpeg would and set
:attr:`Decoder.note` to ``"damaged"`` for that sample (the store keeps it as the row's note).

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

import numpy as np
import torch

from featurebank.data.sources import FileReader, Reader, UnreadableSample
from featurebank.features.preprocessing import Preprocessing
from featurebank.features.choices import DECODERS, DEFAULT_DECODER
from featurebank.features.images import (
    JPEG_MAGIC, ImageError, complete_jpeg, decode_image, jpeg_damage, jpeg_header, jpeg_orientation, jpeg_pixels,
)

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
                 pixels: bool = False, allow_damaged: bool = False):
        if mode not in DECODERS:
            raise ValueError(f"decoder mode must be 'fast' or 'plain', not {mode!r}")
        self.pre, self.mode, self.pixels, self.allow_damaged = pre, mode, pixels, allow_damaged
        self.note = ""  # of the last sample decoded: "damaged" when it was decoded although damaged
        self.reader = reader if reader is not None else FileReader()
        self.timings = {"read": 0.0, "decode": 0.0}
        self._transform = None
        s = 1.0 / (255.0 * np.asarray(pre.std, np.float32))
        self._scale = torch.from_numpy(s).view(3, 1, 1)
        self._shift = torch.from_numpy(np.asarray(pre.mean, np.float32) / np.asarray(pre.std, np.float32)).view(3, 1, 1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_transform"] = None
        return state

    def as_pixels(self) -> Decoder:
        """The same decoder returning uint8 pixels [size, size, 3] instead of normalised floats."""
        return Decoder(self.pre, self.mode, self.reader, pixels=True, allow_damaged=self.allow_damaged)

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
        self.note = ""
        try:
            if self.mode == "plain":
                img, damage = decode_image(data, allow_damaged=self.allow_damaged)
                self.note = "damaged" if damage else ""
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
        return pixels if pixels is not None else pil_pixels(data, allow_damaged=self.allow_damaged, decoder=self)

    def _jpeg(self, data: bytes) -> torch.Tensor | None:
        """Decode a JPEG with libjpeg-turbo (strict: damage raises ImageError unless allowed); None sends
        the file to the PIL path (CMYK, odd headers, files libjpeg refuses: PIL decodes them or names
        the problem)."""
        head = jpeg_header(data)
        if head is None or head[2] not in (1, 3) or head[0] * head[1] == 0:
            return None
        # a large JPEG: DCT-scaled decode to at least twice the target; the antialiased resize that
        # follows then sees enough pixels to match a full decode (cosine > 0.999)
        scaled = 2 * self.pre.resize if min(head[0], head[1]) >= 4 * self.pre.resize else None
        pixels, damage = jpeg_pixels(data, scaled, self.allow_damaged)
        if pixels is None:
            return None
        self.note = "damaged" if damage else ""
        if pixels.strides[0] < 0 or pixels.strides[1] < 0 or not pixels.flags.c_contiguous:
            pixels = np.ascontiguousarray(pixels)  # an EXIF-oriented view: torch wants positive strides
        return torch.from_numpy(pixels).permute(2, 0, 1)

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


def pil_pixels(data, min_size: int | None = None, allow_damaged: bool = False, decoder: Decoder | None = None) -> torch.Tensor:
    """Decode bytes (or a local file) with ``decode_image`` (every format, every oddity) into uint8 [3, H, W].
    A damaged JPEG raises ImageError unless ``allow_damaged``; then ``decoder.note`` says so."""
    img, damage = decode_image(data, min_size=min_size, allow_damaged=allow_damaged)
    if decoder is not None:
        decoder.note = "damaged" if damage else ""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def read_for_gpu(loc, decoder: Decoder):
    """On a CPU worker: ("jpeg", bytes as a uint8 tensor) for a JPEG the device can decode, or
    ("pixels", the finished tensor) decoded on the CPU for anything else (other formats, CMYK, EXIF
    orientation other than 1, damaged data). Raises ImageError (a damaged JPEG unless the decoder
    allows them; then ``decoder.note`` says so).

    The device decoder does not report damaged data, so every JPEG's data is checked here first by
    libjpeg-turbo at the smallest DCT scale (:func:`features.images.jpeg_damage`): its entropy-coded
    data is read in full on the CPU, the rest of the decode happens on the device."""
    data = decoder.read(loc)
    decoder.note = ""
    if device_decodable(data):
        return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return "pixels", decoder.decode(data)


def device_decodable(data: bytes) -> bool:
    """True for a whole, undamaged JPEG (gray or RGB, EXIF orientation 1) that the device decoder takes
    as it is; everything else is decoded on the CPU (the device decoder ignores EXIF orientation and
    does not report damaged data)."""
    if data[:3] != JPEG_MAGIC:
        return False
    head = jpeg_header(data)
    return bool(head is not None and head[2] in (1, 3) and head[0] * head[1] > 0 and complete_jpeg(data)
                and jpeg_orientation(data) == 1 and not jpeg_damage(data))


def decode_jpegs_on_device(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """A batch of JPEG byte tensors decoded on ``device`` into uint8 [3, H, W], one call for the batch;
    None for a file the device could not decode (the caller decodes it on the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    kw = {"apply_exif_orientation": True} if _decode_jpeg_supports_exif() else {}
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device, **kw))
    except Exception:  # one bad file spoils the batch call: decode one by one to find it
        images = []
        for buf in jpegs:
            try:
                images.append(decode_jpeg(buf, mode=ImageReadMode.RGB, device=device, **kw))
            except Exception:
                images.append(None)
        return images


def decode_on_device(jpegs: list[torch.Tensor], paths: list, decoder: Decoder, device: torch.device):
    """Decode a batch of JPEG byte tensors on ``device`` and finish them there.

    Returns (tensors, failures): one tensor or None per input, and (position, reason) for the files
    that neither the device nor the CPU fallback could decode.
    """
    out, failures = [], []
    for k, img in enumerate(decode_jpegs_on_device(jpegs, device)):
        try:
            out.append(decoder.finish(img) if img is not None else decoder(paths[k]).to(device, non_blocking=True))
        except ImageError as exc:
            out.append(None)
            failures.append((k, str(exc)))
    return out, failures
