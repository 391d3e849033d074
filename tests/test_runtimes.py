"""Runtimes compute the same numbers as the eager f32 module, and precision is part of a store's identity.

On real photos (scikit-image's), each runtime and precision against eager torch f32 on the same
decoded tensors: OpenVINO f32 to a cosine of 0.9999 per image, from a fresh conversion and from the
cached one; bf16 to 0.99; int8 is judged by the probes (docs/engine.md), here only bounded. A store
of one precision is never reused by another, f32 runtimes share one, and ``auto`` falls back to torch
in one line when OpenVINO cannot be trusted with a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

# Internals, on purpose: the runtimes (torch, OpenVINO, int8) against the eager module directly: internals by design.
from featurebank.features.backbones import Backbone, Preprocessing, create_backbone
from featurebank.features.decode import Decoder
from featurebank.features.engine import extract
from featurebank.features.device import Layout
from featurebank.features.runtimes import Runtime, RuntimeUnavailable, cosines, create_runtime
from featurebank.features.runtimes.openvino_runtime import OpenVINORuntime, cache_dir, cpu_has_bf16, float_model_path
from featurebank.features.runtimes.torch_runtime import TorchRuntime
from featurebank.features.store import read_features

quiet = {"progress": False, "say": lambda s: None}


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 JPEGs of real photos at photo sizes, in two class folders."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for c in ("x", "y"):
        (root / c).mkdir()
    k = 0
    for name in ("coffee", "chelsea", "astronaut", "rocket", "camera", "cat"):
        a = getattr(data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        for size in ((500, 375), (333, 250)):
            Image.fromarray(a).resize(size, Image.BICUBIC).save(root / "xy"[k % 2] / f"{name}-{size[0]}.jpg", quality=90)
            k += 1
    return root


@pytest.fixture(scope="module")
def batch(lite0, photos) -> torch.Tensor:
    dec = Decoder(lite0.preprocessing)
    return torch.stack([dec(p) for p in sorted(photos.rglob("*.jpg"))])


@pytest.fixture(scope="module")
def eager(lite0, batch) -> np.ndarray:
    return TorchRuntime(lite0).embed(batch)


def test_openvino_f32_matches_eager_fresh_and_cached(lite0, batch, eager, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache"))
    fresh = OpenVINORuntime(lite0, "f32", batch=5)  # converts into the empty cache; 12 = 5 + 5 + a padded 2
    assert float_model_path(lite0).is_file()
    meta = json.loads((float_model_path(lite0).parent / "meta.json").read_text())
    assert meta["kind"] == "float" and meta["conversion_seconds"] > 0
    cached = OpenVINORuntime(lite0, "f32", batch=5)  # reads what the first one saved
    a, b = fresh.embed(batch), cached.embed(batch)
    assert cosines(a, eager).min() >= 0.9999
    assert cosines(b, eager).min() >= 0.9999
    assert cosines(a, b).min() >= 0.999999  # saved without FP16 compression


def test_openvino_keeps_every_image_of_a_partial_batch_in_order(lite0, batch, eager):
    rt = OpenVINORuntime(lite0, "f32", batch=8)
    tags = dict(rt.map([("first", batch[:8]), ("rest", batch[8:])]))  # the second is padded from 4 to 8
    assert tags["rest"].shape == (4, lite0.dim)
    assert cosines(np.concatenate([tags["first"], tags["rest"]]), eager).min() >= 0.9999


def test_openvino_embeds_an_intermediate_layer(batch):
    bb = create_backbone("efficientnet_lite0", layer="blocks.5")
    ov = OpenVINORuntime(bb, "f32", batch=12).embed(batch)
    assert cosines(ov, TorchRuntime(bb).embed(batch)).min() >= 0.9999


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16")
def test_openvino_bf16_matches_eager_to_099(lite0, batch, eager):
    assert cosines(OpenVINORuntime(lite0, "bf16", batch=12).embed(batch), eager).min() >= 0.99


def test_bf16_is_refused_in_one_line_where_the_cpu_lacks_it(lite0, monkeypatch):
    import featurebank.features.runtimes.openvino_runtime as ovr

    monkeypatch.setattr(ovr, "cpu_has_bf16", lambda: False)  # the capability query, as on an older CPU
    with pytest.raises(RuntimeUnavailable, match="bf16 support") as err:
        create_runtime("openvino", lite0, torch.device("cpu"), "bf16")
    assert "\n" not in str(err.value)


def test_precisions_never_share_a_store_and_f32_runtimes_do(lite0, photos, eager, tmp_path):
    files = sorted(photos.rglob("*.jpg"))
    r_torch = extract(photos, lite0, tmp_path, runtime="torch", workers=0, **quiet)
    r_ov = extract(photos, lite0, tmp_path, runtime="openvino", retry_failures=True, **quiet)
    assert r_ov.path == r_torch.path and r_ov.embedded == 0 and r_ov.reused == len(files)  # one store at f32
    (files[0]).touch()  # changed: embedded again, by OpenVINO, into the same store
    files[0].write_bytes(files[0].read_bytes())
    r_ov = extract(photos, lite0, tmp_path, runtime="openvino", **quiet)
    assert r_ov.path == r_torch.path and r_ov.embedded == 1
    with h5py.File(r_ov.path) as f:
        assert json.loads(f.attrs["runtimes"]) == ["openvino f32", "torch f32"] and f.attrs["precision"] == "f32"
    feats = read_features(r_ov.path)
    order = [feats.ids.index(str(p.relative_to(photos))) for p in files]
    assert cosines(feats.X[order], eager).min() >= 0.9999  # rows of both runtimes agree with eager f32

    if cpu_has_bf16():
        r_bf16 = extract(photos, lite0, tmp_path, runtime="openvino", precision="bf16", **quiet)
        assert r_bf16.path != r_torch.path and r_bf16.embedded == len(files)  # nothing reused across precisions
        with h5py.File(r_bf16.path) as f:
            assert f.attrs["precision"] == "bf16" and json.loads(f.attrs["config"])["precision"] == "bf16"
            assert f.attrs["fingerprint"] != read_features(r_torch.path).fingerprint


def test_int8_is_calibrated_once_on_the_train_split_and_cached(lite0, photos, eager, tmp_path, monkeypatch):
    import shutil

    shared = float_model_path(lite0).parent  # the float model the quantizer starts from, from the shared cache
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(shared, cache_dir() / "openvino" / shared.name)
    said = []
    r = extract(photos, lite0, tmp_path / "s", precision="int8", calibration_samples=8, progress=False, say=said.append)
    assert r.embedded == 12 and any("calibrating int8" in s for s in said)
    with h5py.File(r.path) as f:
        config = json.loads(f.attrs["config"])
        assert config["precision"] == "int8" and "nncf" in config["int8_recipe"]["method"]
        assert f.attrs["runtime"] == "openvino int8"
    feats = read_features(r.path)
    files = sorted(photos.rglob("*.jpg"))
    cos = cosines(feats.X[[feats.ids.index(str(p.relative_to(photos))) for p in files]], eager)
    assert np.median(cos) >= 0.9  # int8 is judged by the probes (docs/engine.md); this only bounds it
    said.clear()
    again = extract(photos, lite0, tmp_path / "s2", precision="int8", calibration_samples=8, progress=False, say=said.append)
    assert again.embedded == 12 and not any("calibrating" in s for s in said)  # the cached quantized model
    assert np.allclose(read_features(again.path).X, feats.X, atol=1e-5)
    # another folder that happens to have the same name calibrates on its own images
    other = tmp_path / "elsewhere" / photos.name
    shutil.copytree(photos, other)
    said.clear()
    extract(other, lite0, tmp_path / "s4", precision="int8", calibration_samples=8, progress=False, say=said.append)
    assert any("calibrating int8" in s for s in said)
    with pytest.raises(RuntimeUnavailable, match="int8 needs the OpenVINO runtime"):
        extract(photos, lite0, tmp_path / "s3", runtime="torch", precision="int8", **quiet)


class _Noisy(torch.nn.Module):
    """A model whose output is not a function of its input alone: OpenVINO converts it, but cannot agree."""

    def forward(self, x):
        return x.mean((2, 3)) + torch.rand(x.shape[0], 3)


def test_auto_falls_back_to_torch_in_one_line(photos, tmp_path):
    pre = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
    noisy = Backbone("test:noisy", _Noisy().eval(), pre, "0" * 64, 3)
    said = []
    r = extract(photos, noisy, tmp_path, progress=False, say=said.append)
    lines = [s for s in said if s.startswith("runtime: torch")]
    assert len(lines) == 1 and "disagrees" in lines[0] and "\n" not in lines[0]
    assert "torch f32" in r.layout and r.embedded == 12


def test_pixel_decoders_are_the_normalising_ones_before_normalisation(lite0, photos):
    """Decoder(pixels=True) hands uint8 pixels to a runtime that normalises in its graph: normalised
    by the backbone's mean and std they are exactly the normalising decoder's output (fast and plain)."""
    pre = lite0.preprocessing
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    for mode in ("fast", "plain"):
        dec = Decoder(pre, mode)
        for p in sorted(photos.rglob("*.jpg"))[:4]:
            px = dec.as_pixels()(p)
            assert px.dtype == torch.uint8 and px.shape == (pre.size, pre.size, 3)
            again = (px.permute(2, 0, 1).float() / 255 - mean) / std
            assert torch.allclose(again, dec(p), atol=1e-5), mode


def test_openvino_takes_pixels_and_floats_alike_and_cuts_batches_into_requests(lite0, photos, batch, eager):
    rt = OpenVINORuntime(lite0, "f32", batch=2)
    assert rt.takes_pixels and rt.requests >= 2
    dec = Decoder(lite0.preprocessing, pixels=True)
    pixels = torch.stack([dec(p) for p in sorted(photos.rglob("*.jpg"))])
    out = list(rt.map([("a", pixels[:7]), ("b", pixels[7:8]), ("c", batch[8:])]))  # 4 requests, 1, 2 (floats)
    assert [t for t, _ in out] == ["a", "b", "c"]  # in order, each batch whole
    got = np.concatenate([e for _, e in out])
    assert got.shape == (12, lite0.dim) and cosines(got, eager).min() >= 0.9999


def test_a_rerun_trusts_the_agreement_its_store_already_passed(lite0, photos, tmp_path, monkeypatch):
    from featurebank.features import image_prepare  # the image prepare step runs the agreement check

    r = extract(photos, lite0, tmp_path, **quiet)  # auto: OpenVINO after the agreement check
    with h5py.File(r.path) as f:
        assert "openvino f32" in json.loads(f.attrs["runtimes"])

    def no_check():
        raise AssertionError("the agreement check ran again")

    rt = create_runtime("auto", lite0, torch.device("cpu"), "f32", first_batch=no_check, agreed={"openvino f32"})
    assert rt.name == "openvino"
    monkeypatch.setattr(image_prepare, "first_images", lambda *a, **k: no_check())
    files = sorted(photos.rglob("*.jpg"))
    files[0].write_bytes(files[0].read_bytes())  # one changed file: the rerun embeds it without a check
    r2 = extract(photos, lite0, tmp_path, **quiet)
    assert r2.embedded == 1 and "openvino" in r2.layout


def test_cuda_autocast_is_the_precision_the_store_records():
    from featurebank.features.device import cuda_precision

    gpu = torch.device("cuda")  # explicit amp settings only: nothing here touches a device
    assert cuda_precision(gpu, "f32", "fp32") == "f32"
    assert cuda_precision(gpu, "f32", "bf16") == "bf16"
    assert cuda_precision(gpu, "f32", "fp16") == "fp16"
    assert cuda_precision(gpu, "bf16", "fp16") == "bf16"  # --precision bf16 means bf16 autocast
    rt = TorchRuntime(create_backbone("efficientnet_lite0"), gpu, "fp16")
    assert rt.amp_dtype() is torch.float16 and TorchRuntime(rt.backbone, gpu, "f32").amp_dtype() is None


class _SerialRuntime(Runtime):
    """A runtime written as a new one would be: a Runtime subclass of features/runtimes/base.py and
    nothing else (the eager module, one batch after another, in the calling process)."""

    name = "serial"

    def __init__(self, backbone, device=None, precision="f32", batch=None, **context):
        self.backbone, self.precision, self.batches = backbone, precision, 0
        self.model = backbone.model.eval()

    def layout(self, device, n_items, batch, workers):
        return Layout(device.type, 0, 1, 0)

    def map(self, batches, timer=None):
        for tag, x in batches:
            self.batches += 1
            with torch.inference_mode():
                yield tag, self.model(x).float().numpy()


def test_a_new_runtime_is_one_class_and_one_line_in_the_table(lite0, photos, batch, eager, tmp_path, monkeypatch):
    """What docs/architecture.md says a new runtime touches, and nothing more: its class, one line in
    runtimes.TABLE and its name in choices.RUNTIMES. The engine, the run paths and the store take it
    through the protocol alone, and f32 rows of it share the store of the other runtimes."""
    import featurebank.features.runtimes as runtimes

    made = []

    class Serial(_SerialRuntime):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(runtimes, "TABLE", (Serial, *runtimes.TABLE))  # the one line, first in auto's order
    monkeypatch.setattr(runtimes, "BY_NAME", {cls.name: cls for cls in runtimes.TABLE})
    monkeypatch.setattr(runtimes, "RUNTIMES", (*runtimes.RUNTIMES, "serial"))  # its name, as features.choices declares
    r = extract(photos, lite0, tmp_path, runtime="serial", **quiet)
    assert r.embedded == 12 and "serial f32" in r.layout and made[-1].batches >= 1
    with h5py.File(r.path) as f:
        assert f.attrs["runtime"] == "serial f32"
    feats = read_features(r.path)
    files = sorted(photos.rglob("*.jpg"))
    assert cosines(feats.X[[feats.ids.index(str(p.relative_to(photos))) for p in files]], eager).min() >= 0.9999
    # auto asks it first: it serves, after agreeing with the eager module on the first images
    said = []
    rt = create_runtime("auto", lite0, torch.device("cpu"), "f32", first_batch=lambda: batch[:4], say=said.append)
    assert rt.name == "serial" and not said and rt.batches == 1
