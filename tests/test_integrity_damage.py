"""Damage is detected, not reused: damaged JPEGs (issue 19, item 3) and damaged stores (item 4).

Damaged JPEGs are real ones: a photo encoded by PIL, then 40 bytes of its scan data inverted, the
middle third of its scan zeroed, or cut in half with an end-of-image marker put back. libjpeg decodes
each of them into a picture with made-up blocks and only a warning; both decoders must record them
as failures with that warning as the reason, unless ``allow_damaged``.

Damaged stores are real HDF5 files whose bytes are changed on disk inside one chunk of a dataset
(found with ``dset.id.get_chunk_info``), as a failing disk would, or whose rows hold NaN.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import PHOTOS, damaged, jpeg, write_damaged_folder
from PIL import Image, ImageOps

import featurebank.features.store as store_module
import featurebank.features.store.schema as store_schema
from featurebank.features.backbones import create_backbone
from featurebank.features.decode import Decoder, read_for_gpu
from featurebank.features.engine import extract
from featurebank.features.images import DAMAGED, ImageError, decode_image, jpeg_pixels
from featurebank.features.store import (
    FORMAT_VERSION, StoreError, StoreWriter, check_store, read_features, store_path, strings,
)
from featurebank.pipelines.cli import main

@pytest.fixture(scope="module")
def backbone():
    return create_backbone()


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two classes: three whole JPEGs in a, and in b three damaged copies of the third (each damage gives a
    libjpeg warning for this photo; some damage of other photos decodes without one, see docs/integrity.md)."""
    return write_damaged_folder(tmp_path / "photos")


def run(source, backbone, store_dir, **kw):
    return extract(source, backbone, store_dir, progress=False, workers=0, batch_size=8, **kw)


# ------------------------------------------------------------------------------------- damaged JPEGs


@pytest.mark.parametrize("mode", ["fast", "plain"])
def test_each_decoder_refuses_damaged_jpegs_with_libjpegs_reason_and_decodes_them_when_allowed(backbone, mode):
    whole = jpeg(2)
    pre = backbone.preprocessing
    strict, lenient = Decoder(pre, mode), Decoder(pre, mode, allow_damaged=True)
    assert strict.decode(whole).shape == (3, 224, 224) and strict.note == ""
    for name, data in damaged(whole).items():
        with pytest.raises(ImageError) as info:
            strict.decode(data)
        reason = str(info.value)
        assert reason.startswith(DAMAGED) and "Corrupt JPEG data" in reason and "\n" not in reason, (name, reason)
        assert "--allow-damaged" in reason
        x = lenient.decode(data)
        assert x.shape == (3, 224, 224) and lenient.note == "damaged", name
        assert lenient.decode(whole) is not None and lenient.note == ""  # the note is per sample
    # the GPU layout's reader (run here on the CPU) checks the data before handing the bytes to the device
    gpu = Decoder(pre, "fast")
    for data in damaged(whole).values():
        with pytest.raises(ImageError, match=DAMAGED):
            read_for_gpu_bytes(data, gpu)
    assert read_for_gpu_bytes(whole, gpu)[0] == "jpeg"


def read_for_gpu_bytes(data: bytes, dec: Decoder):
    class Bytes:  # a reader that hands over the bytes given (as a source's reader does)
        def read(self, loc):
            return data

    dec.reader = Bytes()
    return read_for_gpu("x.jpg", dec)


@pytest.mark.parametrize("decoder", ["fast", "plain"])
def test_damaged_jpegs_are_recorded_as_failures_not_embedded(tmp_path, folder, backbone, decoder):
    r = run(folder, backbone, tmp_path / "store", decoder=decoder)
    assert (r.embedded, r.failed) == (3, 3)
    with h5py.File(r.path, "r") as f:
        failures = dict(zip(strings(f["failures/ids"]), strings(f["failures/reasons"])))
    assert set(failures) == {"b/inverted.jpg", "b/zeroed.jpg", "b/half.jpg"}
    for reason in failures.values():
        assert reason.startswith(DAMAGED) and "Corrupt JPEG data" in reason
    assert set(read_features(r.path).ids) == {"a/0.jpg", "a/1.jpg", "a/2.jpg"}


def test_allow_damaged_embeds_them_as_a_note_and_each_rerun_follows_the_option(tmp_path, folder, backbone):
    r = run(folder, backbone, tmp_path / "store", allow_damaged=True)
    assert (r.embedded, r.failed, r.notes) == (6, 0, {"damaged": 3})
    assert "3 damaged images embedded anyway (--allow-damaged)" in r.summary()
    with h5py.File(r.path, "r") as f:
        notes = dict(zip(strings(f["ids"]), strings(f["notes"])))
    assert {i for i, n in notes.items() if n == "damaged"} == {"b/inverted.jpg", "b/zeroed.jpg", "b/half.jpg"}
    # the same option again: everything reused
    again = run(folder, backbone, tmp_path / "store", allow_damaged=True)
    assert (again.embedded, again.reused, again.notes) == (0, 6, {"damaged": 3})
    # without the option, the rows embedded from damaged files are not reused: they become failures
    strict = run(folder, backbone, tmp_path / "store")
    assert (strict.embedded, strict.reused, strict.failed, strict.rows) == (0, 3, 3, 3)
    assert all(reason.startswith(DAMAGED) for _, reason in strict.failures)
    # and with it again, the samples recorded as damaged are tried again (no --retry-failures needed)
    back = run(folder, backbone, tmp_path / "store", allow_damaged=True)
    assert (back.embedded, back.reused, back.failed, back.rows, back.notes) == (3, 3, 0, 6, {"damaged": 3})


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_pixels_are_pils_to_the_bit_with_exif_orientation_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(1, size=(64, 48), exif=exif.tobytes())
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got, damage = jpeg_pixels(data)
    assert damage == "" and np.array_equal(got, want)


@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2},
                                     {"progressive": True}, {"grey": True}])
def test_the_plain_decoder_keeps_pils_pixels(options):
    """Both decoders read JPEGs through libjpeg-turbo in strict mode; the plain one stays the reference:
    its pixels equal PIL's own decode for every chroma subsampling, progressive and greyscale JPEGs."""
    img = Image.fromarray(PHOTOS[0]).resize((97, 61))
    buf = io.BytesIO()
    options = dict(options)
    if options.pop("grey", False):
        img = img.convert("L")
    img.save(buf, "JPEG", quality=85, **options)
    data = buf.getvalue()
    got, damage = decode_image(data)
    assert damage == "" and np.array_equal(np.asarray(got), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


# ------------------------------------------------------------------------------------ damaged stores


def flip_bytes_in_chunk(path: Path, dataset: str, chunk: int, count: int = 8) -> None:
    """Invert ``count`` bytes in the middle of one stored chunk of ``dataset``, on disk."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        at = info.byte_offset + info.size // 2
        fh.seek(at)
        data = fh.read(count)
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture
def small_chunks(monkeypatch):
    """Stores written with chunks of 2 rows, so that a 6-image store has 3 chunks per dataset."""
    monkeypatch.setattr(store_schema, "ROWS_PER_CHUNK", 2)  # the store package reads it from its schema


def make_pets(root: Path, n: int = 6) -> Path:
    for k in range(n):
        (root / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        (root / "ab"[k % 2] / f"{k}.png").write_bytes(png(k))
    return root


def png(k: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PHOTOS[k % 3]).resize((48, 48)).rotate(25 * k).save(buf, "PNG")
    return buf.getvalue()


def test_every_dataset_of_a_store_is_chunk_checksummed(tmp_path, backbone, small_chunks):
    source = make_pets(tmp_path / "pets")
    (source / "a" / "bad.png").write_bytes(b"not a png")
    r = run(source, backbone, tmp_path / "store")
    with h5py.File(r.path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 2
        datasets = []
        f.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        assert {n for n, _ in datasets} >= {"embeddings", "ids", "labels", "splits", "content", "failures/ids",
                                            "failures/reasons", "failures/content"}
        for name, d in datasets:
            if h5py.check_string_dtype(d.dtype) is None:  # numbers: HDF5's Fletcher-32 on every chunk
                assert d.fletcher32 and d.chunks, name
            else:  # strings: a CRC-32 per chunk of their bytes (HDF5 refuses Fletcher-32 on them)
                assert len(d.attrs["crc32"]) == -(-d.shape[0] // d.chunks[0]), name


def test_flipped_bytes_in_an_embeddings_chunk_are_named_and_only_those_rows_embedded_again(
        tmp_path, backbone, small_chunks, capsys):
    source = make_pets(tmp_path / "pets")
    r = run(source, backbone, tmp_path / "store")
    want = read_features(r.path)
    flip_bytes_in_chunk(r.path, "embeddings", 1)  # rows 2-3
    # reading it is refused in one line naming the store and the rows
    for read in (read_features, check_store):
        with pytest.raises(StoreError) as info:
            read(r.path)
        msg = str(info.value)
        assert "\n" not in msg and str(r.path) in msg and "rows 2-3" in msg and "checksum" in msg
    # train on it: one line on stderr, a non-zero exit, no traceback
    code = main(["train", str(r.path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "rows 2-3" in err[0] and "Traceback" not in err[0]
    # extract says so in one line and embeds exactly those two rows again from the source
    lines = []
    again = extract(source, backbone, tmp_path / "store", progress=False, workers=0, batch_size=8, say=lines.append)
    assert (again.embedded, again.reused, again.rows) == (2, 4, 6)
    (line,) = [x for x in lines if "damaged" in x]
    assert str(r.path) in line and "rows 2-3" in line
    got = read_features(again.path)  # whole again, and the same as before the damage
    assert got.ids == want.ids
    np.testing.assert_allclose(got.X, want.X, atol=1e-4, rtol=0)


def flip_string(path: Path, text: str) -> None:
    """Change one byte of the only copy of ``text`` in the file (a string's bytes, in HDF5's heap)."""
    data = bytearray(path.read_bytes())
    at = data.find(text.encode())
    assert at >= 0 and data.find(text.encode(), at + 1) < 0
    data[at + len(text) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damage_in_the_index_datasets_and_the_failures_table_is_found_and_repaired(tmp_path, backbone, small_chunks):
    source = make_pets(tmp_path / "pets")
    (source / "a" / "bad.png").write_bytes(b"not a png")
    r = run(source, backbone, tmp_path / "store")
    want = read_features(r.path)
    assert want.ids == ["a/0.png", "a/2.png", "a/4.png", "b/1.png", "b/3.png", "b/5.png"]
    flip_bytes_in_chunk(r.path, "labels", 0, count=4)  # rows 0-1 (Fletcher-32)
    flip_string(r.path, "b/5.png")  # an id's bytes (CRC-32 of its chunk): rows 4-5
    flip_string(r.path, "not a recognised image format")  # the failures table's one reason
    with pytest.raises(StoreError, match=r"rows 0-1, 4-5 .*checksum error in 'labels'.*checksum error in 'ids'"):
        read_features(r.path)
    said = []
    again = extract(source, backbone, tmp_path / "store", progress=False, workers=0, batch_size=8, say=said.append)
    assert (again.embedded, again.reused, again.failed, again.rows) == (4, 2, 1, 6)  # the failure tried again
    assert any("rows 0-1, 4-5" in x for x in said) and any("failures table" in x for x in said)
    got = read_features(again.path)
    assert got.ids == want.ids and list(got.y) == list(want.y)
    np.testing.assert_allclose(got.X, want.X, atol=1e-4, rtol=0)


def test_nan_or_inf_rows_are_damage(tmp_path, backbone):
    source = make_pets(tmp_path / "pets")
    r = run(source, backbone, tmp_path / "store")
    with h5py.File(r.path, "r+") as f:  # written through HDF5: the checksums match, the numbers are wrong
        f["embeddings"][1, 5] = np.nan
        f["embeddings"][4, 0] = np.inf
    with pytest.raises(StoreError, match=r"rows 1, 4 .*NaN or inf"):
        read_features(r.path)
    again = run(source, backbone, tmp_path / "store")
    assert (again.embedded, again.reused) == (2, 4)
    assert np.isfinite(read_features(again.path).X).all()


def write_format_1(path: Path) -> None:
    """Rewrite a store in the layout of format 1, as featurebank wrote it before the checksums: the same
    datasets and attributes, no filters, ``format_version`` 1."""
    old = path.with_name("old.h5")
    with h5py.File(path, "r") as src, h5py.File(old, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst.attrs["format_version"] = 1
        n, dim = src["embeddings"].shape
        dst.create_dataset("embeddings", data=src["embeddings"][()], chunks=(max(1, min(n, 1024)), dim),
                           maxshape=(None, dim))
        str_dtype = h5py.string_dtype("utf-8")
        for name in ("ids", "content", "splits", "failures/ids", "failures/reasons", "failures/content"):
            dst.create_dataset(name, data=np.array(strings(src[name]), dtype=object), dtype=str_dtype, maxshape=(None,))
        lab = dst.create_dataset("labels", data=src["labels"][()], maxshape=(None,))
        for key, value in src["labels"].attrs.items():
            lab.attrs[key] = value
    os.replace(old, path)


def test_a_format_1_store_is_read_reused_and_rewritten_with_checksums(tmp_path, backbone, capsys):
    source = make_pets(tmp_path / "pets")
    r = run(source, backbone, tmp_path / "store")
    want = read_features(r.path)
    write_format_1(r.path)
    with h5py.File(r.path, "r") as f:
        assert f.attrs["format_version"] == 1 and not f["embeddings"].fletcher32
    old = read_features(r.path)  # read as it is
    assert old.ids == want.ids and np.array_equal(old.X, want.X)
    lines = []
    again = extract(source, backbone, tmp_path / "store", progress=False, workers=0, batch_size=8, say=lines.append)
    # the same file name (the format is not in the fingerprint), every row reused, no forward pass
    assert again.path == r.path == store_path(tmp_path / "store", "pets", store_module.StoreConfig(
        **{k: v for k, v in _config(r.path).items()}))
    assert (again.embedded, again.reused, again.rows) == (0, 6, 6) and "up to date" in again.summary()
    assert any("format 1" in x for x in lines)
    with h5py.File(r.path, "r") as f:
        assert f.attrs["format_version"] == 2 and f["embeddings"].fletcher32 and "crc32" in f["ids"].attrs
    got = read_features(r.path)
    assert got.ids == want.ids and np.array_equal(got.X, want.X)
    # and a damaged format-2 store written from it is caught like any other
    flip_bytes_in_chunk(r.path, "embeddings", 0)
    with pytest.raises(StoreError, match="checksum"):
        check_store(r.path)


def _config(path: Path) -> dict:
    import json

    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["config"])
    fields = store_module.StoreConfig.__dataclass_fields__
    return {k: config[k] for k in fields if k in config}


def test_writer_index_leaves_out_exactly_the_damaged_chunk(tmp_path):
    """At the store's own chunk size (1024 rows): damage in the second chunk costs those 1024 rows only."""
    from featurebank.features.store import ROWS_PER_CHUNK, StoreConfig

    config = StoreConfig("test-backbone", "0" * 64, {"size": 8}, "pool", "avg", "float32", 3)
    n = 2 * ROWS_PER_CHUNK + 10
    ids = [f"x{k:05d}" for k in range(n)]
    path = store_path(tmp_path, "toy", config)
    with StoreWriter(path, config, "toy") as w:
        w.add(ids, np.arange(3 * n, dtype=np.float32).reshape(n, 3), [f"c{k}" for k in range(n)])
        w.finish(ids, ["a"] * n, ["train"] * n, [f"c{k}" for k in range(n)])
    flip_bytes_in_chunk(path, "embeddings", 1)
    said = []
    with StoreWriter(path, config, "toy", say=said.append) as w:
        index = w.index()
    lost = set(ids[ROWS_PER_CHUNK:2 * ROWS_PER_CHUNK])
    assert set(index.content) == set(ids) - lost and index.damaged_rows == ROWS_PER_CHUNK
    assert len(said) == 1 and f"rows {ROWS_PER_CHUNK}-{2 * ROWS_PER_CHUNK - 1}" in said[0]
