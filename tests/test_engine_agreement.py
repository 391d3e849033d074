"""The fast engine computes the same embeddings as the straightforward path.

Reference: PIL decoding (features.images.load_image), the backbone's own transform, fp32, one
process, no engine at all. Scheduling-only differences (replica processes, batching) must agree to a
cosine of 0.9999 per image; moving decoding and resizing to torchvision (or to the GPU) to 0.999.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Internals, on purpose: the engine's fast paths (decoders, layouts, run paths) against the straightforward one:
# internals by design.
from featurebank.features.backbones import create_backbone
from featurebank.features.decode import Decoder, decode_on_device
from featurebank.features.engine import extract
from featurebank.features.executors import FileDataset, collate
from featurebank.features.images import load_image
from featurebank.features.device import Layout
from featurebank.features.store import read_features


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in ("coffee", "chelsea", "astronaut", "rocket", "camera", "cat"):
        a = getattr(data, name)()
        out[name] = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    return out


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """16 real photos in the shapes users have (JPEG at photo sizes, PNG, grey, rotated by EXIF, one
    large enough for DCT-scaled decoding) and one broken file."""
    root = tmp_path_factory.mktemp("photos")
    for c in ("x", "y"):
        (root / c).mkdir()
    k = 0
    for name, a in _photos().items():
        im = Image.fromarray(a)
        for size in ((500, 375), (333, 250)):
            im.resize(size, Image.BICUBIC).save(root / "xy"[k % 2] / f"{name}-{size[0]}.jpg", quality=90)
            k += 1
    im = Image.fromarray(_photos()["coffee"])
    im.resize((1100, 820), Image.BICUBIC).save(root / "x" / "coffee-large.jpg", quality=92)  # draft path
    im.save(root / "y" / "coffee.png")
    Image.fromarray(_photos()["camera"][..., 0]).save(root / "x" / "camera-grey.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(_photos()["chelsea"]).save(root / "y" / "chelsea-exif.jpg", quality=90, exif=exif)
    (root / "x" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a real jpeg")
    return root


def _reference(backbone, paths: list[Path]) -> dict[str, np.ndarray]:
    """PIL + the backbone's reference transform + fp32 in this process, one image at a time."""
    t = backbone.preprocessing.transform()
    out = {}
    with torch.inference_mode():
        for p in paths:
            try:
                x = t(load_image(p))[None]
            except Exception:
                continue
            out[p] = backbone.model(x)[0].float().numpy()
    return out


@pytest.fixture(scope="module")
def reference(lite0, photos):
    paths = sorted(photos.rglob("*.*"))
    ref = _reference(lite0, paths)
    return {str(p.relative_to(photos)): v for p, v in ref.items()}


def _cosines(ref: dict, features) -> dict[str, float]:
    out = {}
    for i, x in zip(features.ids, features.X):
        r = ref[i]
        out[i] = float(np.dot(r, x) / (np.linalg.norm(r) * np.linalg.norm(x)))
    return out


def _check(result, ref, minimum: float):
    f = read_features(result.path)
    assert sorted(f.ids) == sorted(ref), "every readable photo is embedded"
    cos = _cosines(ref, f)
    worst = min(cos, key=cos.get)
    assert cos[worst] >= minimum, f"{worst}: cosine {cos[worst]:.6f} < {minimum}"
    assert [i for i, _ in result.failures] == ["x/broken.jpg"], "the broken file is recorded, with its reason"
    assert result.failures[0][1]
    return cos


def test_replicas_with_plain_decoding_match_to_1e4(lite0, photos, reference, tmp_path):
    r = extract(photos, lite0, tmp_path, workers=2, batch_size=3, decoder="plain", runtime="torch", progress=False,
                say=lambda s: None)
    assert r.layout.startswith("cpu: 2 replicas")
    _check(r, reference, 0.9999)


def test_fast_decoding_in_replicas_matches_to_1e3(lite0, photos, reference, tmp_path):
    r = extract(photos, lite0, tmp_path, workers=2, batch_size=4, runtime="torch", progress=False, say=lambda s: None)
    assert r.embedded == len(reference) and r.failed == 1
    assert {"read", "decode", "forward"} <= set(r.stages)
    _check(r, reference, 0.999)


def test_fast_decoding_in_one_process_matches_to_1e3(lite0, photos, reference, tmp_path):
    r = extract(photos, lite0, tmp_path, workers=0, batch_size=5, runtime="torch", progress=False, say=lambda s: None)
    assert r.layout.startswith("cpu: 1 process")
    _check(r, reference, 0.999)


def test_gpu_batch_decoding_logic_on_the_cpu(lite0, photos, reference):
    """The GPU path's batching (JPEG bytes from the loader, batch decoding, finishing on the device,
    the fallback for other formats and broken files) run with device=cpu."""
    paths = sorted(str(p) for p in photos.rglob("*.*"))
    dec = Decoder(lite0.preprocessing)
    batch = collate([FileDataset(paths, dec, gpu_decode=True)[i] for i in range(len(paths))])
    assert batch["jpeg_sizes"] and batch["pixels"] is not None  # JPEG bytes and the PNG decoded on the CPU
    jpegs = list(torch.split(batch["jpeg_bytes"], batch["jpeg_sizes"]))
    tensors, fails = decode_on_device(jpegs, [paths[i] for i in batch["jpeg_idx"]], dec, torch.device("cpu"))
    bad = [paths[i] for i, _ in batch["bad"]] + [paths[batch["jpeg_idx"][k]] for k, _ in fails]
    assert [Path(p).name for p in bad] == ["broken.jpg"]
    got = {paths[i]: t for i, t in zip(batch["jpeg_idx"], tensors) if t is not None}
    got.update({paths[i]: t for i, t in zip(batch["pixel_idx"], batch["pixels"])})
    with torch.inference_mode():
        emb = lite0.model(torch.stack(list(got.values())).contiguous(memory_format=torch.channels_last)).numpy()
    for p, e in zip(got, emb):
        r = reference[str(Path(p).relative_to(photos))]
        assert np.dot(r, e) / (np.linalg.norm(r) * np.linalg.norm(e)) >= 0.999, p


def test_gpu_loop_with_device_decoding_runs_on_the_cpu(lite0, photos, reference, tmp_path):
    """The whole one-process GPU loop (loader workers sending JPEG bytes, batch decoding and finishing
    on the device, the CPU fallback, the writer thread), with the CPU as the device."""
    lay = Layout("cpu", replicas=0, threads=2, loader_workers=1, gpu_decode=True)
    r = extract(photos, lite0, tmp_path, device="cpu", batch_size=6, layout=lay, progress=False, say=lambda s: None)
    assert "GPU JPEG decoding" in r.layout and r.stages.get("decode (device)", 0) > 0
    assert r.stages.get("write (thread)", -1) >= 0
    _check(r, reference, 0.999)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16", "fp32"])
def test_gpu_path_matches(lite0, photos, reference, tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    r = extract(photos, lite0, tmp_path, device="cuda", amp=amp, progress=False, say=lambda s: None)
    assert r.layout.startswith("cuda")
    _check(r, reference, 0.999)
