"""Every input is accounted for: unusual images are embedded *correctly*, hostile files are recorded.

One extraction runs over a folder that mixes every kind of file the store must handle; each file must
end up either as an embedding (equal to that of a plain RGB version of the same picture) or in the
store's failures table with a one-line reason.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from PIL import Image

# Internals, on purpose: decoders and the engine's extract with the session's lite0 object (built once), whose
# ExtractResult lists each failure and reason.
from featurebank.data.sources import escape_id, unescape_id
from featurebank.features.backbones import create_backbone
from featurebank.features.engine import extract
from featurebank.features.images import ImageError, load_image
from featurebank.features.store import strings, read_features

COFFEE = Image.fromarray(skimage.data.coffee()).resize((96, 64), Image.BICUBIC)
CAT = Image.fromarray(skimage.data.chelsea()).resize((96, 64), Image.BICUBIC)
PALETTE = COFFEE.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)


def png_bytes(arr: np.ndarray, depth: int, color_type: int, width=None, height=None, data=True) -> bytes:
    """A PNG written by hand: any bit depth, or a header that claims any size (without the data)."""
    h, w = arr.shape[:2] if arr is not None else (height, width)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    if data:
        rows = (b"\x00" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))
        out += chunk(b"IDAT", zlib.compress(b"".join(rows)))
    return out + chunk(b"IEND", b"")


def exif_rotated_jpeg(img: Image.Image) -> bytes:
    """The picture stored rotated, with EXIF orientation 6 ('rotate 90 CW to display') to undo it."""
    stored = img.transpose(Image.Transpose.ROTATE_90)  # 90 CCW; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def backbone():
    return create_backbone()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, backbone):
    """A folder mixing every kind of file, extracted once; returns (root, store features, failures)."""
    root = tmp_path_factory.mktemp("hostile") / "mixed"
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    gray = COFFEE.convert("L")
    files = {
        # references: plain 8-bit RGB / grey PNGs of the same pictures
        good / "ref_rgb.png": save(COFFEE, "PNG"),
        good / "ref_gray.png": save(gray, "PNG"),
        good / "ref_cat.png": save(CAT, "PNG"),
        # valid but unusual
        good / "gray16.png": png_bytes(np.asarray(gray).astype(np.uint16) * 257, 16, 0),
        good / "rgb16.png": png_bytes(np.asarray(COFFEE).astype(np.uint16) * 257, 16, 2),
        good / "exif_rotated.jpg": exif_rotated_jpeg(COFFEE),
        good / "upright.jpg": save(COFFEE, "JPEG", quality=100, subsampling=0),
        good / "cmyk.jpg": save(COFFEE.convert("CMYK"), "JPEG", quality=95),
        good / "rgba.png": save(COFFEE.convert("RGBA"), "PNG"),
        good / "palette.png": save(PALETTE, "PNG"),
        good / "palette_as_rgb.png": save(PALETTE.convert("RGB"), "PNG"),
        good / "anim.gif": b"",  # written below
        good / "first_frame.gif": save(COFFEE.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        good / "lossless.webp": save(COFFEE, "WEBP", lossless=True),
        good / "pic.tiff": save(COFFEE, "TIFF"),
        good / "pic.bmp": save(COFFEE, "BMP"),
        good / "large.jpg": save(COFFEE.resize((6000, 4000), Image.BILINEAR), "JPEG", quality=80),
        good / "tiny.png": save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        good / "with space ü.png": save(COFFEE, "PNG"),
        # unusable
        bad / "truncated.jpg": save(COFFEE, "JPEG")[:800],
        bad / "truncated.png": save(COFFEE, "PNG")[:500],
        bad / "corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(300),
        bad / "empty.jpg": b"",
        bad / "text.png": b"this is not an image\n" * 10,
        bad / "bomb.png": png_bytes(None, 8, 2, width=100_000, height=100_000, data=False),
    }
    frame0 = COFFEE.convert("P", palette=Image.Palette.ADAPTIVE)
    files[good / "anim.gif"] = save(frame0, "GIF", save_all=True, append_images=[
        CAT.convert("P", palette=Image.Palette.ADAPTIVE)], duration=100, loop=0)
    for path, data in files.items():
        path.write_bytes(data)
    non_utf8 = os.fsdecode(bytes(good) + b"/caf\xe9.png")
    Path(non_utf8).write_bytes(save(COFFEE, "PNG"))
    (bad / "folder.jpg").mkdir()
    (bad / "dangling.png").symlink_to(bad / "no-such-file.png")
    os.mkfifo(bad / "fifo.png")
    unreadable = bad / "unreadable.png"
    unreadable.write_bytes(save(COFFEE, "PNG"))
    unreadable.chmod(0)
    store = tmp_path_factory.mktemp("hostile-store")
    t0 = time.perf_counter()
    result = extract(root, backbone, store, progress=False, workers=0, batch_size=8)
    seconds = time.perf_counter() - t0
    feats = read_features(result.path)
    with h5py.File(result.path, "r") as f:
        failures = dict(zip(strings(f["failures/ids"]), strings(f["failures/reasons"])))
    yield root, feats, failures, result, seconds, non_utf8
    unreadable.chmod(0o644)


def emb(feats, sample_id: str) -> np.ndarray:
    return feats.X[feats.ids.index(escape_id(sample_id))]


def test_every_file_is_embedded_or_recorded_with_a_reason(hostile):
    root, feats, failures, result, seconds, _ = hostile
    listed = {escape_id(os.path.relpath(os.path.join(d, n), root))
              for d, dirs, names in os.walk(root) for n in names + [x for x in dirs if "." in x]}
    assert listed == set(feats.ids) | set(failures), "a file is neither embedded nor recorded"
    assert not set(feats.ids) & set(failures)
    readable_as_root = {"bad/unreadable.png"} if os.geteuid() == 0 else set()  # root reads a chmod 000 file
    assert set(feats.ids) - readable_as_root == {i for i in listed if i.startswith("good/")}
    assert set(failures) | readable_as_root == {i for i in listed if i.startswith("bad/")}
    for reason in failures.values():
        assert reason and "\n" not in reason and len(reason) < 300
    assert "directory" in failures["bad/folder.jpg"]
    assert "not found" in failures["bad/dangling.png"]
    assert "empty" in failures["bad/empty.jpg"]
    assert "regular" in failures["bad/fifo.png"]
    assert "bomb" in failures["bad/bomb.png"] or "limit" in failures["bad/bomb.png"]
    assert "recognised" in failures["bad/text.png"]
    if not readable_as_root:
        assert "permission" in failures["bad/unreadable.png"]
    # the run's summary counts both
    assert result.embedded == len(feats.ids) and result.failed == len(failures) == result.failed_total
    assert f"embedded {len(feats.ids)}" in result.summary() and f"failed {len(failures)}" in result.summary()
    print(f"hostile folder: {len(feats.ids)} embedded, {len(failures)} recorded in {seconds:.1f} s")


@pytest.mark.parametrize("variant, reference, min_cos", [
    ("good/gray16.png", "good/ref_gray.png", 0.9999),  # 16-bit scaled to 8 bits, not clipped to white
    ("good/rgb16.png", "good/ref_rgb.png", 0.9999),
    ("good/exif_rotated.jpg", "good/upright.jpg", 0.999),  # EXIF orientation applied
    ("good/cmyk.jpg", "good/upright.jpg", 0.99),  # CMYK converted, not inverted
    ("good/rgba.png", "good/ref_rgb.png", 0.9999),  # opaque alpha composited away
    ("good/palette.png", "good/palette_as_rgb.png", 0.9999),
    ("good/anim.gif", "good/first_frame.gif", 0.9999),  # first frame of an animation
    ("good/lossless.webp", "good/ref_rgb.png", 0.9999),
    ("good/pic.tiff", "good/ref_rgb.png", 0.9999),
    ("good/pic.bmp", "good/ref_rgb.png", 0.9999),
    ("good/large.jpg", "good/ref_rgb.png", 0.98),  # 6000x4000 decoded, resized like any other
    ("good/with space ü.png", "good/ref_rgb.png", 0.9999),
])
def test_unusual_images_embed_like_their_plain_version(hostile, variant, reference, min_cos):
    _, feats, _, _, _, _ = hostile
    a, b = emb(feats, variant), emb(feats, reference)
    assert cosine(a, b) >= min_cos
    # and the comparison means something: another picture is far from both
    assert cosine(a, emb(feats, "good/ref_cat.png")) < 0.9


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    gray = np.asarray(COFFEE.convert("L"))
    (tmp_path / "g16.png").write_bytes(png_bytes(gray.astype(np.uint16) * 257, 16, 0))
    decoded = np.asarray(load_image(tmp_path / "g16.png"))[..., 0]
    assert np.abs(decoded.astype(int) - gray).max() <= 1
    assert Image.open(tmp_path / "g16.png").convert("RGB").getextrema()[0][0] == 255  # what PIL alone does


def test_exif_orientation_and_tiny_image_are_decoded_correctly(tmp_path):
    (tmp_path / "r.jpg").write_bytes(exif_rotated_jpeg(COFFEE))
    assert load_image(tmp_path / "r.jpg").size == COFFEE.size
    (tmp_path / "t.png").write_bytes(save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"))
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (200, 30, 30)


def test_non_utf8_file_name_round_trips(hostile):
    root, feats, _, _, _, non_utf8 = hostile
    stored = escape_id(os.path.relpath(non_utf8, root))
    assert stored == "good/caf\\xe9.png" and stored in feats.ids
    assert os.path.exists(os.path.join(root, unescape_id(stored)))
    assert cosine(emb(feats, "good/caf\udce9.png"), emb(feats, "good/ref_rgb.png")) >= 0.9999
    assert unescape_id(escape_id("a\\b\udcff")) == "a\\b\udcff"


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (12_000, 12_000), (11_000, 11_000)])
def test_decompression_bomb_is_refused_without_allocating(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(None, 8, 2, width=width, height=height, data=False))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ImageError):
        load_image(path)
    assert time.perf_counter() - t0 < 1.0
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grew_mib < 50, f"peak memory grew by {grew_mib:.0f} MiB"
