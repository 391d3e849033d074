"""Extraction benchmark: is the end-to-end path as fast as the bare model?

    python benchmarks/extraction.py                 # 1,000 generated 500x375 JPEGs, default backbone
    python benchmarks/extraction.py --memory        # and the flat-memory run (2,000 vs 20,000 images)
    python benchmarks/extraction.py --scale         # peak memory of extract and rerun at 100,000 and 1,000,000 rows

In one run, for the same backbone, batch size, dtype and device:
  (a) bare forward: images/s of the model on tensors already in memory, measured by this file's own
      code (not through the project's runtimes), the best over the ways worth trying on this machine:
      torch eager over process x thread layouts (CPU: 1 process x N threads, N x 1, N/2 x 2), and on a
      CPU OpenVINO (convert_model, static batch, THROUGHPUT hint, explicit inference precision,
      AsyncInferQueue) at the precision asked for (--precision; int8 quantized here by NNCF);
  (b) end to end: images/s from image files to a finished HDF5 store, through ``features.engine.extract``
      (startup, listing, writing and the final merge included);
  (c) decode ceiling: images/s the engine's decoders reach on all cores with the model idle (on a
      CPU the better of two passes);
  (d) the stages of (b): read, decode and transform, host-to-device copy, forward, write, in
      milliseconds per image summed over processes (core-ms on a CPU).
It prints (b) / (a) and (b) / ceiling, where on a CPU the ceiling is 1 / (1/(a) + 1/(c)) (decoding and
the forward pass share the cores, so their costs per image add up) and on a GPU min((a), (c)); the
stages; writes JSON (--json) and appends a row to BENCHMARKS.md.

The sweep (``--backbones A,B[,C]``, optionally ``--layers L1,L2``): in one run, the sweep's end-to-end rate
(features.sweep: one read and decode per image for every backbone, one forward pass per backbone for all
its layers) against separate extractions of the same backbones one after the other (one per backbone
and layer) and against the sweep's own ceiling on a CPU, 1 / (sum_k 1/a_k + 1/c): a_k each backbone's
bare OpenVINO forward (all its layers' taps), c the shared decoder's rate on all cores. ``--camera``
uses camera-size photos (4000x3000 JPEGs cut from scikit-image's photos, upscaled), where decoding
costs more than the forward pass.

Memory at scale (``--scale``, ``--scale-rows 10000,100000`` for a quick look): HF-style Parquet of tiny PNGs
and a trivial TorchScript backbone; extract, then the rerun over the unchanged source, at each size in a
fresh process; prints the peak memory of each process tree, its growth per added sample, extract()'s time
per sample and the rerun's time.

It generates its own input (photo-like JPEGs, from scikit-image's sample photos when installed) or
takes a folder of images (--data). It needs torch, torchvision, timm, h5py, numpy, pillow, simplejpeg, filelock
and tqdm; not Prefect, and it runs from a source checkout without installing the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from checkout import ROOT, use_checkout  # noqa: E402

use_checkout()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featurebank.data.sources import Source, open_source  # noqa: E402
from featurebank.features.backbones import (  # noqa: E402
    DEFAULT_BACKBONE, Backbone, Preprocessing, create_backbone, random_weights_backbone,
)
from featurebank.features.decode import Decoder  # noqa: E402
from featurebank.features.engine import extract  # noqa: E402
from featurebank.features.executors import FileDataset, collate, mp_context, steady_allocator  # noqa: E402
from featurebank.features.device import DEFAULT_AMP, choose_layout, pick_amp, pick_device, usable_cores  # noqa: E402
from featurebank.features.choices import RUNTIMES  # noqa: E402

# ------------------------------------------------------------------------------------------ the input


def _photos() -> list[np.ndarray]:
    try:
        from skimage import data

        names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "immunohistochemistry", "hubble_deep_field"]
        out = []
        for n in names:
            try:
                a = getattr(data, n)()
            except Exception:
                continue
            out.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
        if out:
            return out
    except ImportError:
        pass
    rng = np.random.default_rng(0)  # no sample photos: smooth random fields with texture
    out = []
    for _ in range(4):
        low = rng.random((12, 16, 3))
        big = np.kron(low, np.ones((50, 50, 1))) * 200 + rng.normal(0, 12, (600, 800, 3))
        out.append(np.clip(big, 0, 255).astype(np.uint8))
    return out


def make_images(folder: Path, n: int, size: tuple[int, int], quality: int = 90) -> Path:
    """``n`` JPEG files of ``size`` (w, h) in two class folders, each a different crop of a real photo."""
    from PIL import Image

    marker = folder / f".made-{n}-{size[0]}x{size[1]}"
    if marker.exists():
        return folder
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(p) for p in _photos()]
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
    w, h = size
    for k in range(n):
        src = photos[k % len(photos)]
        sw, sh = src.size
        scale = max(w / sw, h / sh) * (1 + 0.5 * rng.random())
        im = src.resize((max(w, int(sw * scale)), max(h, int(sh * scale))), Image.BILINEAR)
        x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        im = im.crop((x, y, x + w, y + h))
        if k % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im.save(folder / "ab"[k % 2] / f"img{k:06d}.jpg", quality=quality)
    marker.touch()
    return folder


def random_backbone(name: str) -> Backbone:
    """The architecture of ``name`` with random weights (seeded, and identified by their sha256, so a
    converted model in the cache is this one): throughput is the same, no download needed."""
    import dataclasses
    import hashlib

    torch.manual_seed(0)
    bb = random_weights_backbone(name)
    h = hashlib.sha256()
    for key, t in bb.model.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return dataclasses.replace(bb, weights_sha256=h.hexdigest())


# ------------------------------------------------------------------------------------ (a) bare forward


def _bare_worker(model, shape, batch, threads, seconds, dtype_name, start, out):
    if start is not None:  # a replica of its own, set up like the engine's
        steady_allocator()
    torch.set_num_threads(threads)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up
        if start is not None:
            start.wait()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
        out.put(n / (time.perf_counter() - t0))


class _ListQueue:
    def __init__(self):
        self.items = []

    def put(self, x):
        self.items.append(x)


def bare_forward_cpu(model, shape, batch, seconds, layouts=None) -> tuple[float, dict]:
    """The best images/s over process x thread layouts, each measured for ``seconds``."""
    cores = usable_cores()
    if layouts is None:
        layouts = {(1, cores), (cores, 1)}
        if cores >= 4:
            layouts.add((cores // 2, 2))
    model = model.to(memory_format=torch.channels_last).eval()
    results = {}
    for procs, threads in sorted(layouts):
        if procs == 1:  # one model on all threads: in this process
            before = torch.get_num_threads()
            q = _ListQueue()
            _bare_worker(model, shape, batch, threads, seconds, "float32", None, q)
            torch.set_num_threads(before)
            results[f"{procs}x{threads}"] = round(q.items[0], 2)
            continue
        ctx = mp_context(threads)
        start, out = ctx.Barrier(procs), ctx.Queue()
        ps = [ctx.Process(target=_bare_worker, args=(model, shape, batch, threads, seconds, "float32", start, out))
              for _ in range(procs)]
        for p in ps:
            p.start()
        rate = sum(out.get() for _ in ps)
        for p in ps:
            p.join()
        results[f"{procs}x{threads}"] = round(rate, 2)
    best = max(results.values())
    return best, results


#: request batches the OpenVINO sweep tries: small ones keep a request's activations in the caches
OV_BATCHES = (1, 2, 4, 32)


def bare_forward_openvino(model, shape, batch, seconds, precision="f32", calibration=None,
                          batches=OV_BATCHES) -> tuple[float, dict]:
    """OpenVINO's own throughput on the CPU, set up here independently of features.runtimes: convert the
    eval-mode module under no_grad, (int8: NNCF post-training quantization on ``calibration``, a list
    of [1, 3, H, W] arrays), a static batch, the THROUGHPUT hint, the inference precision stated
    explicitly, AsyncInferQueue. Swept over request batches (``batches``, each for ``seconds`` / 2)
    with two requests per stream, and at ``batch`` (the issue's reference: batch 32) with as many
    requests as OpenVINO finds optimal; returns the best."""
    import openvino as ov

    t0 = time.perf_counter()
    with torch.no_grad():
        base = ov.convert_model(model.eval(), example_input=torch.zeros(1, *shape))
    if precision == "int8":
        import nncf

        base = nncf.quantize(base, nncf.Dataset(calibration), subset_size=len(calibration))
    prep = time.perf_counter() - t0
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    info, best = {}, 0.0
    plan = [(b, "2 per stream") for b in batches] + ([(batch, "optimal")] if batch not in batches or len(batches) > 1 else [])
    for b, rule in plan:
        m = base.clone()
        m.reshape([b, *shape])
        compiled = core.compile_model(m, "CPU", config)
        optimal = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        streams = int(compiled.get_property("NUM_STREAMS"))
        nreq = optimal if rule == "optimal" else max(optimal, 2 * streams)
        q = ov.AsyncInferQueue(compiled, nreq)
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        for _ in range(nreq):  # warm-up
            q.start_async({0: x})
        q.wait_all()
        t1, n = time.perf_counter(), 0
        while time.perf_counter() - t1 < (seconds if len(plan) == 1 else seconds / 2):
            q.start_async({0: x})
            n += b
        q.wait_all()
        rate = n / (time.perf_counter() - t1)
        key = f"openvino {precision}, batch {b}, {nreq} requests"
        info[key] = round(rate, 2)
        if rule == "optimal":
            info["openvino_batch32"] = round(rate, 2)
        best = max(best, rate)
    info["openvino_prepare_s"] = round(prep, 1)
    return best, info


def reference_images(pre: Preprocessing, paths: list[str], n: int) -> list[np.ndarray]:
    """``n`` images decoded by PIL with the reference transform, as [1, 3, H, W] arrays (int8 calibration)."""
    from featurebank.features.images import load_image

    tf = pre.transform()
    return [tf(load_image(p))[None].numpy() for p in paths[:n]]


def bare_forward_cuda(model, shape, batch, seconds, amp, compile_model) -> tuple[float, dict]:
    from featurebank.features.runtimes.torch_runtime import Forward

    dev = torch.device("cuda")
    model = model.to(dev).to(memory_format=torch.channels_last).eval()
    if compile_model:
        model = torch.compile(model)
    fwd = Forward(model, dev, pick_amp(dev, amp), batch)
    x = torch.randn(batch, *shape, device=dev).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        fwd(x)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fwd(x).cpu()  # the embeddings come back to the host, as in the pipeline
        n += batch
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    return rate, {f"1 process, batch {fwd.max_batch}": round(rate, 2)}


# ---------------------------------------------------------------------------------- (c) decode ceiling


def _time_decodes(dec, paths, out) -> None:
    """Decode ``paths`` on one thread with ``dec`` and put (count, seconds) on ``out``."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for p in paths:
        try:
            dec(p)
        except Exception:
            pass
    out.put((len(paths), time.perf_counter() - t0))


def _decode_worker(pre, paths, out, pixels=False):
    _time_decodes(Decoder(pre, pixels=pixels), paths, out)


def decode_ceiling_cpu(pre: Preprocessing, paths: list[str], pixels: bool = False) -> float:
    """Images/s of the engine's decoders on all cores; ``pixels``: to uint8 pixels, as the engine decodes
    for a runtime that normalises inside its graph (OpenVINO)."""
    cores = usable_cores()
    ctx = mp_context()
    out = ctx.Queue()
    t0 = time.perf_counter()
    ps = [ctx.Process(target=_decode_worker, args=(pre, paths[r::cores], out, pixels)) for r in range(cores)]
    for p in ps:
        p.start()
    got = [out.get() for _ in ps]
    for p in ps:
        p.join()
    wall = time.perf_counter() - t0
    return sum(n for n, _ in got) / wall


def decode_ceiling_cuda(pre: Preprocessing, paths: list[str], batch: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    from featurebank.features.decode import decode_on_device

    dev = torch.device("cuda")
    dec = Decoder(pre)
    loader = DataLoader(FileDataset(paths, dec, True), batch_size=batch, num_workers=workers, collate_fn=collate,
                        pin_memory=True, prefetch_factor=4 if workers else None)
    t0, n = time.perf_counter(), 0
    for b in loader:
        parts = [b["pixels"].to(dev, non_blocking=True)] if b["pixels"] is not None else []
        if b["jpeg_sizes"]:
            jpegs = list(torch.split(b["jpeg_bytes"], b["jpeg_sizes"]))
            ts, _ = decode_on_device(jpegs, [paths[i] for i in b["jpeg_idx"]], dec, dev)
            parts.extend(t[None] for t in ts if t is not None)
        if parts:
            torch.cat(parts).contiguous(memory_format=torch.channels_last)
        n += len(b["jpeg_idx"]) + len(b["pixel_idx"])
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- (b) end to end


def end_to_end(folder: Path, backbone: Backbone, batch, device, amp, compile_model, workers, runtime="auto",
               precision="f32") -> tuple[float, dict]:
    """(b), then the incremental rerun: the same folder grown by 1 % new files, into the same store."""
    from featurebank.data.sources import Sample
    from featurebank.features.store import library_versions

    library_versions()  # the store imports these to record them: a one-off cost of any process, not timed
    options = dict(batch_size=batch, device=device, workers=workers, amp=amp, compile=compile_model,
                   runtime=runtime, precision=precision, progress=False, say=print)
    with tempfile.TemporaryDirectory(prefix="fb-bench-store-") as store:
        t0 = time.perf_counter()
        r = extract(folder, backbone, store, **options)
        wall = time.perf_counter() - t0
        if r.rows != r.embedded or r.failed:
            raise SystemExit(f"benchmark store is wrong: {r.summary()}")
        src = open_source(folder)
        new = open_source(make_images(folder.parent / f"{folder.name}-grown", max(1, len(src.samples) // 100), (500, 375)))
        grown = Source(src.name, src.root, src.samples + [Sample(f"grown/{s.id}", s.loc, s.label) for s in new.samples])
        t0 = time.perf_counter()
        r2 = extract(grown, backbone, store, **options)
        rerun = time.perf_counter() - t0
        if r2.embedded != len(new.samples) or r2.reused != len(src.samples):
            raise SystemExit(f"incremental rerun is wrong: {r2.summary()}")
    return r.embedded / wall, {"seconds": round(wall, 2), "images": r.embedded, "layout": r.layout, "stages": r.stages,
                               "rerun_new": r2.embedded, "rerun_seconds": round(rerun, 2),
                               "rerun_share": round(rerun / wall, 4)}


def process_startup() -> float:
    """Seconds for a fresh interpreter to import the engine and the Prefect flows (reported apart from
    extraction times; a Prefect temporary server adds 10-20 s more on top of this, per process)."""
    import importlib.util

    # a GPU machine may have no Prefect: then the engine's imports alone (the benchmark must still finish)
    flows = ", featurebank.pipelines.flows" if importlib.util.find_spec("prefect") else ""
    imports = "import featurebank.features.engine" + flows
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"from checkout import use_checkout; use_checkout(); {imports}"], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    return time.perf_counter() - t0


def stage_breakdown(stages: dict, n: int) -> dict:
    """Seconds per stage -> milliseconds per image, in the issue's five stages."""
    groups = {
        "read": ["read"],
        "decode+transform": ["decode", "read+decode (workers)", "decode (device)"],
        "copy": ["copy"],
        "forward": ["forward"],
        "write": ["write", "write (thread)"],
        "waiting": ["blocked on writer", "wait for decode"],
    }
    out = {g: round(1000 * sum(stages.get(k, 0.0) for k in keys) / max(1, n), 3) for g, keys in groups.items()}
    if "read+decode (workers)" in stages:
        out["note"] = "decode+transform includes reading (DataLoader workers)"
    return out


# ------------------------------------------------------------------------------------------- memory


def _anon_rss(pid: int) -> int | None:
    """Anonymous memory (heap, tensors) of one process, from /proc (Linux): its proportional share
    (Pss_Anon), so that pages a forked replica still shares with its parent count once in the
    tree's sum rather than once per process; RssAnon where the kernel has no Pss_Anon."""
    for name, key in ((f"/proc/{pid}/smaps_rollup", "Pss_Anon:"), (f"/proc/{pid}/status", "RssAnon:")):
        try:
            with open(name) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    return None


def _tree_rss(pid: int) -> tuple[int, int]:
    """(resident bytes of the process tree, of its root alone). Anonymous memory where the system
    reports it: library code is file-backed and comes and goes with the page cache, which would
    drown a 20 MB signal in noise; elsewhere the full resident set."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = root = 0
    for q in procs:
        rss = _anon_rss(q.pid)
        if rss is None:
            try:
                rss = q.memory_info().rss
            except psutil.Error:
                continue
        total += rss
        root = rss if q.pid == pid else root
    return total, root


def _peak_rss_of(cmd: list[str]) -> tuple[int, int, float]:
    """Run ``cmd`` and sample the resident memory of its process tree; (peak bytes, peak of the root
    process alone, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak, peak_root, stop = 0, 0, threading.Event()

    def sample():
        nonlocal peak, peak_root
        while not stop.is_set():
            total, root = _tree_rss(proc.pid)
            peak, peak_root = max(peak, total), max(peak_root, root)
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    if rc:
        raise SystemExit(f"memory run failed: {' '.join(cmd)} (exit {rc})")
    return peak, peak_root, time.perf_counter() - t0


def _memory_child(folder: str, n: int, size: int, backbone: str, batch, device) -> None:
    """Child process of the memory run: extract the first ``n`` images at ``size`` px."""
    bb = create_backbone(backbone)
    p = bb.preprocessing
    bb = dataclasses.replace(bb, preprocessing=Preprocessing(size, int(size / 0.875), p.interpolation, p.mean, p.std))
    src = open_source(folder)
    src = Source(src.name, src.root, src.samples[:n])
    with tempfile.TemporaryDirectory(prefix="fb-bench-mem-") as store:
        r = extract(src, bb, store, batch_size=batch, device=device, progress=False, say=lambda s: None)
    assert r.embedded == n, r.summary()


def memory_run(work: Path, backbone: str, batch, device, small=2000, large=20000, size=64) -> dict:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return {"skipped": "psutil is not installed"}
    folder = make_images(work / f"mem-{size}", large, (size, size))
    out = {"image_px": size, "input_px": size}
    for n in (small, large):
        cmd = [sys.executable, __file__, "--_memory-child", str(folder), str(n), str(size), backbone,
               str(batch or 0), device or "auto"]
        peak, peak_root, secs = _peak_rss_of(cmd)
        out[f"peak_rss_mb_{n}"] = round(peak / 2**20, 1)
        out[f"peak_rss_mb_{n}_parent_only"] = round(peak_root / 2**20, 1)
        out[f"seconds_{n}"] = round(secs, 1)
    out["growth_mb"] = round(out[f"peak_rss_mb_{large}"] - out[f"peak_rss_mb_{small}"], 1)
    out["flat"] = out["growth_mb"] < 20
    return out


# ------------------------------------------------------------------------------------ memory at scale

SCALE_ROWS = (100_000, 1_000_000)
SCALE_FILE_ROWS = 100_000  # rows per Parquet file (HF writes shards of a few hundred MB)
SCALE_GROUP_ROWS = 1_000  # rows per row group


def make_scale_parquet(folder: Path, n: int, distinct: int = 512) -> Path:
    """HF-style Parquet of ``n`` tiny PNGs (an ``image`` struct ``{bytes, path}``, a ``label`` with
    ``ClassLabel`` names in the schema's metadata): ``distinct`` different 8x8 PNGs, cycled, written file by
    file and row group by row group (the writer's memory stays flat). Written once per ``n``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from featurebank.data.files import atomic_path

    marker = folder / f".made-{n}"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    classes = [f"class{c}" for c in range(10)]
    features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    files = -(-n // SCALE_FILE_ROWS)
    for f in range(files):
        lo, hi = f * SCALE_FILE_ROWS, min(n, (f + 1) * SCALE_FILE_ROWS)
        with atomic_path(folder / f"train-{f:05d}-of-{files:05d}.parquet") as tmp, pq.ParquetWriter(tmp, schema) as w:
            for a in range(lo, hi, SCALE_GROUP_ROWS):
                ks = range(a, min(hi, a + SCALE_GROUP_ROWS))
                w.write_table(pa.table({"image": [{"bytes": pngs[k % distinct], "path": f"img{k:08d}.png"} for k in ks],
                                        "label": [k % len(classes) for k in ks]}, schema=schema))
    marker.touch()
    return folder


def make_trivial_torchscript(path: Path) -> Path:
    """A trivial TorchScript backbone (a 1x1 convolution to 8 channels, then the global average): the
    forward pass costs next to nothing, so the framework's own cost shows."""
    if path.exists():
        return path

    class Trivial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Trivial().eval()), str(path))
    return path


def _scale_child(source: str, store: str, checkpoint: str, runtime: str, out: str) -> None:
    """Child process of the scale run: one extract (or rerun) of the Parquet source into ``store``."""
    pre = Preprocessing(16, 18, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # tiny input
    bb = create_backbone(checkpoint, preprocessing=pre)
    t0 = time.perf_counter()
    r = extract(source, bb, store, runtime=runtime, progress=False, say=lambda s: None)
    Path(out).write_text(json.dumps({"embedded": r.embedded, "reused": r.reused, "rows": r.rows, "failed": r.failed,
                                     "extract_s": time.perf_counter() - t0, "layout": r.layout}))


def scale_run(a, work: Path) -> dict:
    """Peak memory of extract and of the rerun over the unchanged source, at each of ``a.scale_rows`` rows of
    HF-style Parquet of tiny PNGs, each in a fresh process (the process tree's peak, sampled every 20 ms)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return {"skipped": "psutil is not installed"}
    sizes = sorted(int(v) for v in str(a.scale_rows).split(","))
    checkpoint = make_trivial_torchscript(work / "trivial.ts")
    out = {"sizes": sizes, "runtime": a.runtime, "runs": {}}
    for n in sizes:
        t0 = time.perf_counter()
        source = make_scale_parquet(work / f"scale-parquet-{n}", n)
        print(f"scale: {n:,} rows of Parquet ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory(prefix="fb-bench-scale-", dir=work) as store:
            run = {}
            for phase in ("extract", "rerun"):
                result = Path(store) / f"{phase}.json"
                cmd = [sys.executable, __file__, "--_scale-child", str(source), str(Path(store) / "stores"),
                       str(checkpoint), a.runtime, str(result)]
                peak, peak_root, secs = _peak_rss_of(cmd)
                got = json.loads(result.read_text())
                want_embedded = n if phase == "extract" else 0
                if got["embedded"] != want_embedded or got["rows"] != n or got["failed"]:
                    raise SystemExit(f"scale run at {n} rows ({phase}) is wrong: {got}")
                run[phase] = {"peak_mb": round(peak / 2**20, 1), "peak_mb_parent_only": round(peak_root / 2**20, 1),
                              "seconds": round(secs, 1), "extract_s": round(got["extract_s"], 1),
                              "us_per_sample": round(1e6 * got["extract_s"] / n, 1), "layout": got["layout"]}
                print(f"scale: {n:,} rows, {phase}: peak {run[phase]['peak_mb']} MB (this process alone "
                      f"{run[phase]['peak_mb_parent_only']} MB), extract() {run[phase]['extract_s']} s = "
                      f"{run[phase]['us_per_sample']} us per sample ({secs:.1f} s with start-up)", flush=True)
            out["runs"][n] = run
    lo, hi = sizes[0], sizes[-1]
    for phase in ("extract", "rerun"):
        grow = out["runs"][hi][phase]["peak_mb"] - out["runs"][lo][phase]["peak_mb"]
        out[f"{phase}_growth_mb"] = round(grow, 1)
        out[f"{phase}_growth_bytes_per_sample"] = round(grow * 2**20 / max(1, hi - lo), 1)
        print(f"scale: {phase} peak {out['runs'][lo][phase]['peak_mb']} MB at {lo:,} -> "
              f"{out['runs'][hi][phase]['peak_mb']} MB at {hi:,}: {grow:+.1f} MB "
              f"({out[f'{phase}_growth_bytes_per_sample']:+.1f} bytes per sample)", flush=True)
    return out


# ------------------------------------------------------------------------------------------ recording


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import h5py
    import PIL
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        import openvino

        versions["openvino"] = openvino.__version__.split("-")[0]
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": usable_cores(), "gpu": gpu, "versions": versions}


HEADER = """# Extraction benchmarks

Rows are appended by `python benchmarks/extraction.py` (see docs/engine.md); each is one run on the
machine it names. Columns:

- **bare (a)**: images/s of the backbone's forward pass on tensors already in memory (same batch size,
  dtype and memory format), the best over process x thread layouts (the winning layout in brackets),
  measured before (b) and again after it; the mean of the two.
- **decode (c)**: images/s the engine's decoders reach on all cores with the model idle.
- **e2e (b)**: images/s from JPEG files on disk to a finished HDF5 store through `extract()`, startup,
  listing, writing and the final merge included.
- **ratio**: (b) / min((a), (c)); with `--repeat` the lower median over repeats, whose (a), (b), (c)
  the row shows (best in brackets).
- **stages**: milliseconds per image in read / decode+transform / copy / forward / write, summed over
  processes (core-ms on a CPU; on a GPU decode and forward are device time).
- **rerun +1 %**: time of a rerun over the same folder grown by 1 % new files (into the same store: only
  the new files are embedded) as a share of the full run's time; process start-up (interpreter and
  imports) is measured apart and shown in brackets (before the repeats from 2026-12-02 06:20 on); it
  varies from 9.5 to 105 s between runs on this machine, before the repeats as after them, cause not
  found; a Prefect temporary server adds 10-20 s per process.
- **memory**: growth of the peak resident memory of the extraction's process tree from 2,000 to
  20,000 images (64 px files, 64 px model input), when run with `--memory`: anonymous memory, each
  process's proportional share (pages a forked replica shares with its parent count once).

| date (UTC) | machine | versions | backbone | device, batch, amp | images | layout | bare (a) | decode (c) \
| e2e (b) | ratio | stages (ms/img) | rerun +1 % | memory |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


RUNTIMES_HEADER = """
## Runtimes and precisions (from `--runtime` / `--precision` on)

Columns as above, except:

- **bare (a)**: the fastest bare forward pass this machine has for the same weights at the same
  precision, measured by the benchmark's own code in the same run: torch eager over process x thread
  layouts and, on a CPU, OpenVINO called directly (static batch, THROUGHPUT hint, explicit inference
  precision, async requests; int8 quantized by NNCF on 300 of the images), swept over 1, 2, 4 and 32
  images per request (rows from 2026-12-02 on; before, batch 32 only). The winner in brackets, and
  OpenVINO at batch 32 with its optimal number of requests beside it.
- **decode (c)**: to uint8 pixels when the engine's runtime normalises inside its graph (OpenVINO, rows
  from 2026-12-02 on), else to normalised floats; the better of two passes per repeat (rows from
  2026-12-02 05:30 on).
- **ceiling**: on a CPU decoding and the forward pass share the cores, so the pipeline cannot beat
  1 / (1/(a) + 1/(c)); on a GPU min((a), (c)).
- **(b)/(a)** and **(b)/ceiling**: end to end against the bare model, and against that ceiling.

| date (UTC) | machine | versions | backbone | device, batch, precision | engine runtime | images | bare (a) \
| decode (c) | ceiling | e2e (b) | (b)/(a) | (b)/ceiling | stages (ms/img) | rerun +1 % | memory |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""
RUNTIMES_MARK = "## Runtimes and precisions"


SOURCES_HEADER = """
## Parquet and WebDataset against the folder

`benchmarks/extraction.py --source parquet|webdataset --repeat 3`: the same JPEGs end to end (files to a
finished store) from a folder and from HF-style Parquet or WebDataset tars, alternated in one run;
ratio = format / folder images/s (median of the repeats); rerun = a rerun over the unchanged format
source as a share of its full run.

| date (UTC) | machine | backbone | images | source | folder img/s | source img/s | ratio (median) | rerun |
|---|---|---|---|---|---:|---:|---:|---:|
"""


SCALE_MARK = "## Memory at scale"
SCALE_HEADER = f"""
{SCALE_MARK}

Rows appended by `python benchmarks/extraction.py --scale [--scale-rows 100000,1000000]`: HF-style Parquet of
tiny PNGs (8x8, an `image` struct `{{bytes, path}}` and a `label` ClassLabel; files of 100,000 rows, row groups
of 1,000), a trivial TorchScript backbone (a 1x1 convolution and the global average, 16 px input), so that
the framework's own cost shows. Each extract, and the rerun over the unchanged source into the same store
(nothing to embed), runs in a fresh process; **peak** is the peak anonymous resident memory of its process
tree (children included; each process's proportional share), sampled every 20 ms. **growth** is the peak at
the larger size less the peak at the smaller, also per added sample; **us/sample** is extract()'s time per
sample (timings on a loaded machine are not comparable between rows).

| date (UTC) | machine | versions | runtime | rows | extract peak (MB) | rerun peak (MB) | extract growth \
| rerun growth | us/sample extract | rerun (s) |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def record_scale(path: Path, report: dict) -> None:
    t, m = report["scale"], report["machine"]
    if "runs" not in t:
        return
    v = m["versions"]
    lo, hi = t["sizes"][0], t["sizes"][-1]
    runs = t["runs"]
    row = [time.strftime("%Y-%m-%d %H:%M", time.gmtime()), f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}",
           ", ".join(f"{k} {v[k]}" for k in ("torch", "openvino", "h5py", "numpy") if k in v), t["runtime"],
           f"{lo:,} -> {hi:,}",
           f"{runs[lo]['extract']['peak_mb']} -> {runs[hi]['extract']['peak_mb']}",
           f"{runs[lo]['rerun']['peak_mb']} -> {runs[hi]['rerun']['peak_mb']}",
           f"{t['extract_growth_mb']:+.1f} MB ({t['extract_growth_bytes_per_sample']:+.0f} B/sample)",
           f"{t['rerun_growth_mb']:+.1f} MB ({t['rerun_growth_bytes_per_sample']:+.0f} B/sample)",
           f"{runs[lo]['extract']['us_per_sample']} / {runs[hi]['extract']['us_per_sample']}",
           f"{runs[lo]['rerun']['extract_s']} / {runs[hi]['rerun']['extract_s']}"]
    insert_row(path, SCALE_MARK, SCALE_HEADER, "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")


def record_sources(path: Path, report: dict) -> None:
    """Add a row to the sources table of BENCHMARKS.md (made on first use), keeping it contiguous."""
    t, m = report["sources"], report["machine"]
    med = sorted(t["runs"], key=lambda r: r["ratio"])[(len(t["runs"]) - 1) // 2]
    load = f", load {t['load'][0]:.1f}-{t['load'][1]:.1f}" if t.get("load") else ""
    row = [time.strftime("%Y-%m-%d %H:%M", time.gmtime()), f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}{load}",
           report["backbone"], t["images"], t["source"], f"{med['folder']:.1f}", f"{med[t['source']]:.1f}",
           f"{t['ratio_median']:.3f}", f"{100 * t['rerun_share_median']:.1f} %"]
    insert_row(path, "## Parquet and WebDataset against the folder", SOURCES_HEADER,
                "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")


def record(path: Path, report: dict) -> None:
    if "scale" in report:
        record_scale(path, report)
        return
    if "sweep" in report:
        record_sweep(path, report)
        return
    if "sources" in report:
        record_sources(path, report)
        return
    if not path.exists():
        path.write_text(HEADER)
    m = report["machine"]
    v = m["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "torchvision", "timm", "openvino", "h5py", "numpy") if k in v)
    mem = report.get("memory") or {}
    mem_s = (f"+{mem['growth_mb']} MB ({mem[f'peak_rss_mb_{2000}']} -> {mem[f'peak_rss_mb_{20000}']} MB)"
             if "growth_mb" in mem else mem.get("skipped", "not run"))
    t = report.get("throughput")
    if t:
        st = t["stages_ms_per_image"]
        stages = " / ".join(f"{st.get(k, 0):.1f}" for k in ("read", "decode+transform", "copy", "forward", "write"))
        ratio = f"{t['ratio_median']:.3f} ({t['ratio_best']:.3f})" if len(t["ratios"]) > 1 else f"{t['ratio_median']:.3f}"
        b32 = t["bare_layouts"].get("openvino_batch32")
        b32 = f"; batch {report.get('bare_batch', 32)}: {b32:.1f}" if b32 else ""
        cells = [report.get("runtime", ""), t["images_desc"], f"{t['bare_forward']:.1f} [{t['bare_best_layout']}{b32}]",
                 f"{t['decode_ceiling']:.1f}", f"{t['ceiling']:.1f}", f"{t['end_to_end']:.1f}", f"{t['ratio_bare']:.3f}",
                 ratio, stages, f"{100 * t['rerun_share']:.1f} % (start-up {t['process_startup_s']} s)"]
    else:
        cells = ["-"] * 10
    load = f", load {t['load'][0]:.1f}-{t['load'][1]:.1f}" if t.get("load") else ""
    row = [time.strftime("%Y-%m-%d %H:%M", time.gmtime()), f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}{load}",
           versions, report["backbone"], f"{report['device']}, {report['batch_size']}, {report.get('precision', 'f32')}",
           *cells, mem_s]
    insert_row(path, RUNTIMES_MARK, RUNTIMES_HEADER, "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")


def insert_row(path: Path, mark: str, header: str, line: str) -> None:
    """Add ``line`` at the end of the table under the heading ``mark`` (made from ``header`` on first use)."""
    text = path.read_text() if path.exists() else HEADER
    if mark not in text:
        text = text.rstrip("\n") + "\n" + header
    lines = text.split("\n")
    end = next(k for k, x in enumerate(lines) if x.startswith(mark)) + 1
    while end < len(lines) and not lines[end].startswith("|"):
        end += 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, line)
    path.write_text("\n".join(lines) if text.endswith("\n") else "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="generated images (default 1000)")
    ap.add_argument("--size", default="500x375", help="generated image size WxH (default 500x375)")
    ap.add_argument("--data", help="a folder of images to use instead of generated ones")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the engine's choice)")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--random-weights", action="store_true",
                    help="an untrained model of the backbone's architecture (throughput only; tv:/timm: names)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's choice")
    ap.add_argument("--amp", default=DEFAULT_AMP, help="CUDA autocast: auto, bf16, fp16, fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    ap.add_argument("--runtime", default="auto", choices=RUNTIMES, help="the engine's runtime")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "int8"],
                    help="how the forward pass computes, in (a) and (b)")
    ap.add_argument("--workers", type=int, default=None, help="override the engine's layout")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each bare-forward measurement")
    ap.add_argument("--repeat", type=int, default=1, help="repeat (a), (c), (b) and report the median ratio")
    ap.add_argument("--memory", action="store_true", help="also run the flat-memory check (2,000 vs 20,000 images)")
    ap.add_argument("--memory-only", action="store_true", help="only the flat-memory check")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--workdir", help="where generated images are kept (default: a temporary folder)")
    ap.add_argument("--no-record", action="store_true", help="do not append a row to BENCHMARKS.md")
    ap.add_argument("--source", default="folder", choices=("folder", "parquet", "webdataset"),
                    help="also measure end to end from the same JPEGs stored as HF-style Parquet or WebDataset "
                         "tars, side by side with the folder (ratio printed)")
    ap.add_argument("--backbones", help="the sweep: comma-separated backbones, measured against separate extractions "
                    "and the ceiling 1/(sum 1/a_k + 1/c)")
    ap.add_argument("--layers", default="final", help="the sweep's layers of every backbone (default: final)")
    ap.add_argument("--camera", action="store_true", help="camera-size input: 4000x3000 JPEGs (default 60 of them)")
    ap.add_argument("--scale", action="store_true",
                    help="memory at scale: peak memory of extract and of the rerun over the unchanged source at "
                         "100,000 and 1,000,000 rows of HF-style Parquet of tiny PNGs (a trivial TorchScript backbone)")
    ap.add_argument("--scale-rows", default=",".join(map(str, SCALE_ROWS)),
                    help="the sizes --scale compares, smallest and largest (default 100000,1000000; quick: 10000,100000)")
    ap.add_argument("--_memory-child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--_scale-child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._memory_child:
        folder, n, size, backbone, batch, device = a._memory_child
        _memory_child(folder, int(n), int(size), backbone, int(batch) or None, None if device == "auto" else device)
        return {}
    if a._scale_child:
        _scale_child(*a._scale_child)
        return {}

    dev = pick_device(None if a.device == "auto" else a.device)
    tmp = tempfile.TemporaryDirectory(prefix="fb-bench-") if not a.workdir else None
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    name = a.backbone + (" (random weights)" if a.random_weights else "")
    report = {"machine": machine(), "backbone": name, "device": dev.type, "amp": "fp32", "batch_size": a.batch_size}
    print(f"machine: {report['machine']}")
    try:
        if a.scale:
            report["backbone"] = "trivial TorchScript (1x1 conv, 16 px)"
            report["scale"] = scale_run(a, work)
        elif a.backbones:
            report["sweep"] = sweep_benchmark(a, work)
        elif not a.memory_only and a.source != "folder":
            report["sources"] = compare_sources(a, work)
        elif not a.memory_only:
            report["throughput"] = throughput(a, dev, work, report)
        if a.memory or a.memory_only:
            print("memory: 2,000 then 20,000 images of 64 px ...", flush=True)
            report["memory"] = memory_run(work, a.backbone, a.batch_size, None if a.device == "auto" else a.device)
            print(f"memory: {json.dumps(report['memory'])}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if not a.no_record:
        record(ROOT / "BENCHMARKS.md", report)
        print(f"row appended to {ROOT / 'BENCHMARKS.md'}")
    return report


def _warm_runtime(folder: Path, backbone: Backbone, batch: int | None, runtime: str, precision: str) -> str:
    """Make the runtime's one-off work (OpenVINO conversion, int8 calibration) happen before (b) is
    timed, exactly as extract() will do it; returns which runtime extract() will use."""
    from featurebank.features.choices import CALIBRATION_SAMPLES
    from featurebank.features.image_prepare import (SampleFiles, calibration_images, calibration_set, first_images,
                                                    sample_decoder)
    from featurebank.features.runtimes import create_runtime

    src = open_source(folder)
    dec = sample_decoder(src, backbone)
    files = SampleFiles(src, list(range(len(src.samples))))
    rt = create_runtime(runtime, backbone, torch.device("cpu"), precision, batch, say=print,
                        first_batch=lambda: first_images(dec, files),
                        calibration=lambda: calibration_images(dec, src, CALIBRATION_SAMPLES),
                        int8_key=calibration_set(src.name, src.root), calibration_samples=CALIBRATION_SAMPLES)
    return rt.describe()


def throughput(a, dev: torch.device, work: Path, report: dict) -> dict:
    if a.data:
        folder = Path(a.data)
        desc = f"{folder.name}"
    else:
        w, h = (int(v) for v in a.size.lower().split("x"))
        folder = make_images(work / f"jpeg-{w}x{h}-{a.images}", a.images, (w, h))
        desc = f"{a.images} JPEG {w}x{h}"
    src = open_source(folder)
    paths = [str(s.loc) for s in src.samples]
    backbone = random_backbone(a.backbone) if a.random_weights else create_backbone(a.backbone)
    pre = backbone.preprocessing
    shape = (3, pre.size, pre.size)
    amp_dtype = pick_amp(dev, a.amp) if dev.type == "cuda" else None
    report["amp"] = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    report["precision"] = a.precision
    layout = choose_layout(dev, len(paths), a.batch_size or 32, a.workers, backbone.model, pre.size)
    if dev.type == "cuda" and a.batch_size is None:
        from featurebank.features.runtimes.torch_runtime import Forward

        probe = Forward(backbone.model.to(dev).to(memory_format=torch.channels_last), dev, amp_dtype, 512)
        batch = probe.probe(shape, min(512, len(paths)))
        torch.cuda.empty_cache()
    else:
        batch = a.batch_size or 32
    # on a CPU the engine picks its own batch unless --batch-size says (OpenVINO: 2 per request)
    engine_batch = a.batch_size if dev.type == "cpu" else batch
    report["batch_size"], report["bare_batch"] = engine_batch or "auto", batch
    engine_rt = _warm_runtime(folder, backbone, engine_batch, a.runtime, a.precision) if dev.type == "cpu" else "torch"
    report["runtime"] = engine_rt
    print(f"{desc}: {backbone.name} at {pre.size} px on {dev.type}, batch {batch}, {a.precision}; "
          f"engine runtime: {engine_rt}", flush=True)
    calibration = reference_images(pre, paths, 300) if (dev.type == "cpu" and a.precision == "int8") else None
    # timed before the repeats, so that it is not measured in their wake (it still varies: 9.5-105 s)
    startup = process_startup()
    runs = []
    for _ in range(a.repeat):
        if dev.type == "cuda":
            bare, layouts = bare_forward_cuda(backbone.model, shape, batch, a.seconds, a.amp, a.compile)
            ceiling = decode_ceiling_cuda(pre, paths, batch, layout.loader_workers)
            bare_ov = None
        else:
            bare_torch, layouts = bare_forward_cpu(backbone.model, shape, batch, a.seconds)
            bare_ov, ov_info = bare_forward_openvino(backbone.model, shape, batch, a.seconds, a.precision, calibration)
            layouts.update(ov_info)
            bare = max(bare_torch, bare_ov)
            # the best of two: one pass (under a second) has read as low as 152 img/s against 1,000+ in
            # the next, and a low ceiling would flatter (b)/ceiling
            ceiling = max(decode_ceiling_cpu(pre, paths, pixels=engine_rt.startswith("openvino")) for _ in range(2))
        print(f"  (a) bare forward: {bare:.1f} img/s (torch layouts and OpenVINO: {layouts})", flush=True)
        print(f"  (c) decode ceiling: {ceiling:.1f} img/s", flush=True)
        e2e, info = end_to_end(folder, backbone, engine_batch, None if a.device == "auto" else a.device, a.amp, a.compile,
                               a.workers, a.runtime, a.precision)
        print(f"  (b) end to end: {e2e:.1f} img/s ({info['images']} images in {info['seconds']} s, {info['layout']})")
        print(f"  rerun with {info['rerun_new']} new files (1 %): {info['rerun_seconds']} s = "
              f"{100 * info['rerun_share']:.1f} % of the full run", flush=True)
        if dev.type == "cpu":
            # the fastest bare forward measured again after (b): on a machine whose load drifts, the mean
            # of the two brackets (b) (on a quiet machine they agree and the mean is either)
            if bare_ov is not None and bare_ov >= bare_torch:
                best = max((k for k in layouts if k.startswith("openvino ")), key=layouts.get)
                best_batch = int(best.split("batch ")[1].split(",")[0])
                again, _ = bare_forward_openvino(backbone.model, shape, best_batch, a.seconds, a.precision, calibration,
                                                 batches=(best_batch,))
            else:
                best = max((k for k in layouts if "x" in k and not k.startswith("openvino")), key=layouts.get)
                procs, threads = (int(v) for v in best.split("x"))
                again, _ = bare_forward_cpu(backbone.model, shape, batch, a.seconds, [(procs, threads)])
            layouts[best + " (after b)"] = round(again, 2)
            bare = (layouts[best] + again) / 2
            print(f"  (a) bare forward again after (b): {again:.1f} img/s -> (a) = mean {bare:.1f}", flush=True)
            # decoding and the forward pass share the cores: their costs per image add up
            limit = 1 / (1 / bare + 1 / ceiling)
        else:
            limit = min(bare, ceiling)
        ratio = e2e / limit
        stages = stage_breakdown(info["stages"], info["images"])
        print(f"  (d) stages, ms per image: {stages}")
        print(f"  ratios: (b)/(a) = {e2e / bare:.3f}; (b)/ceiling = {ratio:.3f} "
              f"(ceiling {'1/(1/a+1/c)' if dev.type == 'cpu' else 'min(a, c)'} = {limit:.1f} img/s)", flush=True)
        if "openvino_batch32" in layouts:
            print(f"  (b) / OpenVINO at batch {batch} with its optimal requests (the issue's recipe, "
                  f"{layouts['openvino_batch32']:.1f} img/s) = {e2e / layouts['openvino_batch32']:.3f}", flush=True)
        runs.append({"bare_forward": bare, "bare_layouts": layouts, "decode_ceiling": ceiling, "end_to_end": e2e,
                     "ceiling": limit, "ratio": ratio, "ratio_bare": e2e / bare, "info": info,
                     "stages_ms_per_image": stages})
    ratios = [x["ratio"] for x in runs]
    med = sorted(runs, key=lambda x: x["ratio"])[(len(runs) - 1) // 2]  # the median run (lower middle)
    numeric = {k: v for k, v in med["bare_layouts"].items() if not k.endswith("_s") and not k.startswith("openvino_")}
    out = {
        "images_desc": desc, "layout": med["info"]["layout"], "bare_forward": med["bare_forward"],
        "bare_best_layout": max(numeric, key=numeric.get).replace(" (after b)", ""),
        "bare_layouts": med["bare_layouts"], "ceiling": med["ceiling"], "ratio_bare": med["ratio_bare"],
        "decode_ceiling": med["decode_ceiling"], "end_to_end": med["end_to_end"],
        "ratios": [round(x, 4) for x in ratios], "ratio_median": statistics.median_low(ratios), "ratio_best": max(ratios),
        "stages_ms_per_image": med["stages_ms_per_image"], "runs": runs,
        "rerun_share": med["info"]["rerun_share"], "process_startup_s": round(startup, 2),
    }
    print(f"process start-up (interpreter + imports, apart from the times above): {out['process_startup_s']} s")
    print(f"(b)/ceiling: median {out['ratio_median']:.3f}, best {out['ratio_best']:.3f} over {len(ratios)} run(s); "
          f"(b)/(a) of the median run {out['ratio_bare']:.3f}")
    return out


def compare_sources(a, work: Path) -> dict:
    """End to end from the same JPEGs as a folder and as ``a.source`` (Parquet or WebDataset), alternated
    in one run, ``a.repeat`` times: the median of format/folder, and the cost of a rerun over the
    unchanged format source (it reads no image bytes) as a share of its full run."""
    from featurebank.data.demo import folder_items, write_parquet, write_webdataset
    from featurebank.features.store import library_versions

    w, h = (int(v) for v in a.size.lower().split("x"))
    folder = Path(a.data) if a.data else make_images(work / f"jpeg-{w}x{h}-{a.images}", a.images, (w, h))
    other = work / f"{folder.name}-{a.source}"
    if not other.exists():
        items, classes = folder_items(folder)
        files = max(1, len(items) // 500)
        (write_parquet(items, classes, other, files=files) if a.source == "parquet"
         else write_webdataset(items, other, shards=files))
    backbone = random_backbone(a.backbone) if a.random_weights else create_backbone(a.backbone)
    library_versions()
    options = dict(batch_size=a.batch_size, device=None if a.device == "auto" else a.device, workers=a.workers,
                   progress=False, say=lambda s: None)
    runs = []
    for k in range(a.repeat):
        rates = {}
        for name, loc in ((("folder", folder), (a.source, other)) if k % 2 == 0 else ((a.source, other), ("folder", folder))):
            with tempfile.TemporaryDirectory(prefix="fb-bench-src-") as store:
                t0 = time.perf_counter()
                r = extract(loc, backbone, store, **options)
                wall = time.perf_counter() - t0
                if r.failed or r.embedded != r.rows:
                    raise SystemExit(f"benchmark store is wrong: {r.summary()}")
                rates[name] = r.embedded / wall
                if name == a.source:
                    t0 = time.perf_counter()
                    again = extract(loc, backbone, store, **options)
                    rates["rerun_share"] = (time.perf_counter() - t0) / wall
                    if again.embedded:
                        raise SystemExit(f"rerun over the unchanged source embedded again: {again.summary()}")
        ratio = rates[a.source] / rates["folder"]
        print(f"  folder {rates['folder']:.1f} img/s, {a.source} {rates[a.source]:.1f} img/s: ratio {ratio:.3f}; "
              f"rerun over the unchanged {a.source} source: {100 * rates['rerun_share']:.1f} % of its full run", flush=True)
        runs.append(rates | {"ratio": ratio})
    ratios = [r["ratio"] for r in runs]
    out = {"source": a.source, "images": len(folder_items(folder)[0]), "runs": runs,
           "ratio_median": statistics.median_low(ratios),
           "rerun_share_median": statistics.median_low([r["rerun_share"] for r in runs])}
    print(f"{a.source} / folder end to end: median {out['ratio_median']:.3f} over {len(ratios)} run(s); "
          f"rerun {100 * out['rerun_share_median']:.1f} % of a full run")
    return out


# ------------------------------------------------------------------------------------------- the sweep

SWEEP_MARK = "## Sweep: several backbones over one decode"
SWEEP_COLUMNS = ("| date (UTC) | machine | backbones | layers | images | a_k (img/s) | c | ceiling | sweep (b) | "
                 "separate | (b)/ceiling | (b)/separate | sweep / 1 extraction |")
SWEEP_HEADER = f"""
{SWEEP_MARK}

Rows appended by `python benchmarks/extraction.py --backbones A,B[,C] [--layers L1,L2] [--camera]`:
**sweep (b)** images/s end to end through `featurebank.features.sweep.sweep` (one read and decode per
image, one forward pass per backbone for all its layers, one store per backbone and layer);
**separate** images/s of the same stores made by one `extract()` per backbone and layer, one after the
other; **a_k** each backbone's bare OpenVINO forward (all its layers) on tensors in memory; **c** the
shared decoder on all cores; **ceiling** 1 / (sum 1/a_k + 1/c); **ratio** (b) / ceiling; **1-extraction**
the sweep's time over one extraction of the first backbone (final layer). Every timing builds its models
inside it. In brackets after (b)/ceiling (rows from 2026-12-05 on): the same ratio for the sweep's
embedding alone, from starting its decoders to its last row (building the models and runtimes, and the
stores' final merge, left out).

{SWEEP_COLUMNS}
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def record_sweep(path: Path, report: dict) -> None:
    t, m = report["sweep"], report["machine"]
    load = f", load {t['load'][0]:.1f}-{t['load'][1]:.1f}" if t.get("load") else ""
    row = [time.strftime("%Y-%m-%d %H:%M", time.gmtime()), f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}{load}",
           ", ".join(t["backbones"]), ", ".join(t["layers"]), t["images_desc"],
           " / ".join(f"{v:.1f}" for v in t["bare"].values()), f"{t['decode_ceiling']:.1f}", f"{t['ceiling']:.1f}",
           f"{t['sweep']:.1f}", f"{t['separate']:.1f}",
           f"{t['ratio_ceiling']:.3f}" + (f" (embedding {t['ratio_loop_ceiling']:.3f})" if t.get("ratio_loop_ceiling") else ""),
           f"{t['ratio_separate']:.2f}",
           f"{t['sweep_over_one']:.2f}"]
    insert_row(path, SWEEP_MARK, SWEEP_HEADER, "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")


def _shared_decode_worker(pres, paths, out):
    from featurebank.features.sweep import SharedDecoder

    _time_decodes(SharedDecoder([Decoder(p, pixels=True) for p in pres]), paths, out)


def shared_decode_ceiling(pres: list[Preprocessing], paths: list[str]) -> float:
    """Images/s of the sweep's shared decoder (one decode, one resize and crop per backbone) on all cores."""
    cores = usable_cores()
    ctx = mp_context()
    out = ctx.Queue()
    t0 = time.perf_counter()
    ps = [ctx.Process(target=_shared_decode_worker, args=(pres, paths[r::cores], out)) for r in range(cores)]
    for p in ps:
        p.start()
    got = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(n for n, _ in got) / (time.perf_counter() - t0)


def sweep_benchmark(a, work: Path) -> dict:
    """The sweep against separate extractions and against its ceiling 1 / (sum 1/a_k + 1/c), in one run."""
    from featurebank.features.store import library_versions
    from featurebank.features.sweep import candidate, parse_list, sweep

    names = parse_list(a.backbones)
    layers = parse_list(a.layers) or ["final"]
    load0 = os.getloadavg()[0]  # other work on the machine: shown in the row (the ratios are noisy under load)
    if a.data:
        folder, desc = Path(a.data), Path(a.data).name
    else:
        w, h = (4000, 3000) if a.camera else (int(v) for v in a.size.lower().split("x"))
        n = a.images if not a.camera or a.images != 1000 else 60
        folder = make_images(work / f"jpeg-{w}x{h}-{n}", n, (w, h), quality=92 if a.camera else 90)
        desc = f"{n} JPEG {w}x{h}"
    paths = [str(s.loc) for s in open_source(folder).samples]
    library_versions()
    quiet = dict(progress=False, say=lambda s: None, batch_size=a.batch_size, runtime=a.runtime, precision=a.precision)
    cands = [candidate(nm, layers) for nm in names]
    print(f"sweep benchmark: {desc}; backbones {', '.join(names)}; layers {', '.join(layers)}", flush=True)
    # one-off work (conversions of the taps and of each single layer, compilation) before anything is timed
    few = make_images(work / "warm", 4, (320, 240))
    with tempfile.TemporaryDirectory(prefix="fb-bench-warm-") as store:
        sweep(few, names, layers, store, **quiet)
        for c in cands:
            for layer in layers:
                extract(few, create_backbone(c.name, layer=None if layer == "final" else layer), store, **quiet)
    runs = []
    for _ in range(a.repeat):
        bare = {}
        for c in cands:
            pre = c.taps.preprocessing
            bare[c.name], _ = bare_forward_openvino(c.taps.model, (3, pre.size, pre.size), 32, a.seconds, a.precision,
                                                    batches=(1, 2, 4))
        ceiling_c = max(shared_decode_ceiling([c.taps.preprocessing for c in cands], paths) for _ in range(2))
        ceiling = 1 / (sum(1 / v for v in bare.values()) + 1 / ceiling_c)
        print(f"  a_k bare forward: {', '.join(f'{k} {v:.1f}' for k, v in bare.items())} img/s; c shared decode "
              f"{ceiling_c:.1f} img/s; ceiling 1/(sum 1/a_k + 1/c) = {ceiling:.1f} img/s", flush=True)
        with tempfile.TemporaryDirectory(prefix="fb-bench-sweep-") as store:
            t0 = time.perf_counter()
            r = sweep(folder, names, layers, store, **quiet)
            wall_sweep = time.perf_counter() - t0
            if any(s.result.rows != len(paths) for s in r.stores):
                raise SystemExit(f"sweep stores are wrong: {r.summary()}")
        walls = {}
        with tempfile.TemporaryDirectory(prefix="fb-bench-sep-") as store:
            for c in cands:
                for layer in layers:
                    t0 = time.perf_counter()  # the model is built inside the timing, as the sweep builds its own
                    bb = create_backbone(c.name, layer=None if layer == "final" else layer)
                    e = extract(folder, bb, store, **quiet)
                    walls[f"{c.name}:{layer}"] = time.perf_counter() - t0
                    if e.rows != len(paths):
                        raise SystemExit(f"extraction is wrong: {e.summary()}")
        first = walls[f"{cands[0].name}:{layers[0]}"] if layers[0] == "final" else None
        if first is None:  # one extraction of the first backbone's pooled output, for the 1.1x rule
            with tempfile.TemporaryDirectory(prefix="fb-bench-one-") as store:
                t0 = time.perf_counter()
                extract(folder, create_backbone(cands[0].name), store, **quiet)
                first = time.perf_counter() - t0
        n = len(paths)
        run = {"bare": bare, "decode_ceiling": ceiling_c, "ceiling": ceiling, "sweep": n / wall_sweep,
               "separate": n / sum(walls.values()), "separate_walls": {k: round(v, 2) for k, v in walls.items()},
               "sweep_seconds": round(wall_sweep, 2), "one_extraction_seconds": round(first, 2),
               "sweep_over_one": wall_sweep / first, "stages": r.stages}
        run["ratio_ceiling"] = run["sweep"] / ceiling
        run["ratio_separate"] = run["sweep"] / run["separate"]
        loop = r.stages.get("embedding (wall)")
        run["loop"] = n / loop if loop else None  # decoders started to last row: models and merge left out
        run["ratio_loop_ceiling"] = run["loop"] / ceiling if loop else None
        print(f"  sweep end to end {run['sweep']:.1f} img/s ({wall_sweep:.1f} s) = {run['ratio_ceiling']:.3f} of the "
              f"ceiling {ceiling:.1f}", flush=True)
        if loop:
            print(f"    of which embedding {loop:.1f} s ({run['loop']:.1f} img/s = {run['ratio_loop_ceiling']:.3f} of the "
                  f"ceiling); the other {wall_sweep - loop:.1f} s build the models and merge the stores",
                  flush=True)
        print(f"  separate extractions {run['separate']:.1f} img/s ({sum(walls.values()):.1f} s: "
              f"{', '.join(f'{k} {v:.1f} s' for k, v in walls.items())}): the sweep is {run['ratio_separate']:.2f}x "
              f"their speed", flush=True)
        print(f"  sweep / one extraction of {cands[0].name} (time) = {run['sweep_over_one']:.2f}", flush=True)
        runs.append(run)
    med = sorted(runs, key=lambda x: x["ratio_ceiling"])[(len(runs) - 1) // 2]
    loop = f", embedding alone {med['ratio_loop_ceiling']:.3f}" if med.get("ratio_loop_ceiling") else ""
    print(f"sweep result ({desc}, {', '.join(names)}; layers {', '.join(layers)}): sweep/ceiling "
          f"{med['ratio_ceiling']:.3f}{loop} (goal >= 0.85); sweep/separate {med['ratio_separate']:.2f}x (goal > 1); "
          f"sweep/one extraction {med['sweep_over_one']:.2f}" + (f" (median of {len(runs)} repeats)" if len(runs) > 1 else ""),
          flush=True)
    load = sorted((load0, os.getloadavg()[0]))
    print(f"load average (1 min) {load[0]:.1f}-{load[1]:.1f} on {usable_cores()} cores", flush=True)
    return {**med, "load": load, "backbones": names, "layers": layers, "images_desc": desc, "runs": runs,
            "ratios_ceiling": [round(x["ratio_ceiling"], 4) for x in runs]}


if __name__ == "__main__":
    main()
