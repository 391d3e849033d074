"""The sweep: one dataset embedded by several backbones, and several layers of each, in one pass.

Each (backbone, layer, precision) gets an ordinary store: the file, fingerprint and guarantees of
``featurebank extract --backbone B --layer L`` (features.engine.extract), so either command reuses
what the other wrote. A store that is already complete is reused without a forward pass, and a
backbone whose stores are all complete is not even run; a killed sweep resumes from the parts its
stores committed.

What it saves over one extraction per (backbone, layer):

- **one read and one decode per sample** for every image backbone: the bytes are read once and
  decoded once at the resolution the most demanding backbone needs (:meth:`Decoder.decode_pixels`),
  then each backbone's own resize, crop and normalisation runs on those pixels (:class:`SharedDecoder`);
- **one forward pass per backbone** for all of its layers: :class:`Taps` runs the model once and returns
  every requested layer, each global-average-pooled as ``--layer`` pools it, side by side in one row;
  the row is cut back into one store per layer. ``final`` is the model's own pooled output.

Texts: one extraction per text backbone (each has its own tokenizer, so each text is tokenised once
per tokenizer); text backbones have no layers to choose.

Decoding runs in worker processes (DataLoader) while this process runs the backbones one after the
other on each batch, so every backbone's forward time is measured on its own: ``per_second`` is the
rate each backbone reached inside the sweep (images per second of its forward passes).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurebank.data.sources import Source, open_source
from featurebank.features.backbones import FINAL_LAYERS, BackboneError, create_backbone
from featurebank.features.decode import Decoder
from featurebank.features.choices import CALIBRATION_SAMPLES
from featurebank.features.engine import (
    ExtractResult, Listing, ModalityError, extract, forward_precision, labels_changed, store_config,
)
from featurebank.features.image_prepare import (
    SampleFiles, calibration_images, calibration_set, first_images, sample_decoder,
)
from featurebank.features.images import ImageError
from featurebank.features.options import ExtractOptions
from featurebank.features.registry import build_backbone, modality_of
from featurebank.features.executors import mp_context, worker_started
from featurebank.features.device import pick_device, usable_cores
from featurebank.features.runtimes import check_precision, create_runtime
from featurebank.features.store import DEFAULT_STORE_DIR, DTYPES, StoreConfig, StoreError, StoreWriter, atomic_write, store_path

FINAL = "final"
#: images per decoded batch handed from the decoding workers to the backbones
SWEEP_BATCH = 64
#: up to this many images to embed, decoding runs in this process (no worker processes to start)
INLINE_DECODE_UP_TO = 64


class SweepError(ValueError):
    """A sweep that cannot run as asked (one line, before any work)."""


def layer_name(layer: str | None) -> str:
    """``final`` for the model's pooled output (no layer, ``final`` or ``pooled``), else the node name."""
    return FINAL if layer in (None, "", *FINAL_LAYERS) else layer


# ------------------------------------------------------------------------------------------ the model


class Taps(nn.Module):
    """One forward pass of ``model``, several outputs: each of ``layers`` (a module name, or ``final`` for
    the model's own output) global-average-pooled to [B, C] exactly as ``--layer`` pools it
    (features.backbones), concatenated in the order given. Forward hooks, as for ``--layer``: timm's
    TF-ported models branch on shapes, which FX tracing cannot follow."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model, self.layers = model, list(layers)
        self._outs: dict[str, torch.Tensor] = {}
        self.widths: list[int] = []
        for name in dict.fromkeys(n for n in self.layers if n != FINAL):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                nodes = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
                raise BackboneError(f"layer '{name}' is not a node of this model; some nodes: "
                                    f"{', '.join(nodes[-12:])}") from None
            module.register_forward_hook(self._keeper(name))

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self._outs[name] = output
        return keep

    def forward(self, x):
        final = self.model(x)
        parts = []
        for name in self.layers:
            out = final if name == FINAL else self._outs[name]
            parts.append(out.flatten(2).mean(-1) if out.ndim == 4 else out.flatten(1))
        self._outs = {}
        if not torch.jit.is_tracing():  # measured once in eager mode (candidate()); a trace keeps no Python ints
            self.widths = [int(p.shape[1]) for p in parts]
        return torch.cat(parts, 1)


@dataclass
class Candidate:
    """One backbone of a sweep: the model with all its taps, and one store backbone per layer (the
    Backbone that ``extract --layer`` would build: same name, weights, preprocessing, layer and dim)."""

    name: str
    layers: list[str]
    taps: object  # a features.backbones.Backbone whose model is a Taps
    per_layer: list  # Backbone per layer (model None: only its identity is used, for the store's fingerprint)
    dims: list[int]


def candidate(name: str, layers: list[str], arch: str | None = None) -> Candidate:
    """Build ``name`` once and describe every layer of it that the sweep embeds."""
    base = create_backbone(name, arch=arch)
    model = base.model
    taps = Taps(model, layers)
    taps.eval()
    size = base.preprocessing.size
    with torch.inference_mode():
        taps(torch.zeros(1, 3, size, size))
    dims = list(taps.widths)  # each tap's width, pooled as --layer pools it
    per_layer = [dataclasses.replace(base, model=None, layer="pooled" if layer == FINAL else layer, dim=d)
                 for layer, d in zip(layers, dims)]
    tap_backbone = dataclasses.replace(base, model=taps, layer="taps:" + "|".join(layers), dim=int(sum(dims)))
    return Candidate(base.name, layers, tap_backbone, per_layer, dims)


# ------------------------------------------------------------------------------------------ decoding


class SharedDecoder:
    """One read and one decode of a sample for several backbones: the bytes through the source's
    reader once, the pixels decoded once by the decoder that needs the most of them (the largest
    resize target: a large JPEG is decoded at a reduced DCT scale that still suits every backbone),
    then each backbone's own resize, crop and normalisation (:meth:`Decoder.finish`). Returns one
    tensor per decoder, or raises ImageError (the sample is then recorded as a failure in every
    store that needed it). ``plain`` decoders decode per backbone (the reference path, PIL)."""

    def __init__(self, decoders: list[Decoder]):
        self.decoders = decoders
        self.big = max(decoders, key=lambda d: (d.pre.resize, d.pre.size))
        self.timings = {"read": 0.0, "decode": 0.0}

    def __call__(self, loc) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        try:
            data = self.big.read(loc)
        finally:
            self.timings["read"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            if any(d.mode == "plain" for d in self.decoders):
                return [d.decode(data) for d in self.decoders]
            pixels = self.big.decode_pixels(data)
            return [d.finish(pixels) for d in self.decoders]
        finally:
            self.timings["decode"] += time.perf_counter() - t1


class _Samples(torch.utils.data.Dataset):
    """Per item (position, tensors per backbone or None, reason or None, seconds)."""

    def __init__(self, files, dec: SharedDecoder):
        self.files, self.dec = files, dec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        t0 = time.perf_counter()
        try:
            return i, self.dec(self.files[i]), None, time.perf_counter() - t0
        except ImageError as exc:
            return i, None, str(exc), time.perf_counter() - t0
        except Exception as exc:  # a decoder bug must cost one file, not the sweep
            return i, None, f"cannot decode: {type(exc).__name__}: {exc}", time.perf_counter() - t0


def _collate(items):
    good = [(i, t) for i, t, _, _ in items if t is not None]
    return {
        "idx": [i for i, _ in good],
        "per_backbone": [torch.stack([t[k] for _, t in good]) for k in range(len(good[0][1]))] if good else [],
        "bad": [(i, r) for i, _, r, _ in items if r is not None],
        "decode_s": sum(s for *_, s in items),
    }


# ------------------------------------------------------------------------------------------ results


@dataclass
class StoreResult:
    """One (backbone, layer) store of a sweep."""

    backbone: str
    layer: str
    path: Path
    dim: int
    result: ExtractResult
    per_second: float | None = None  # this backbone's forward rate inside the sweep (images or texts per second)
    precision: str = "f32"

    def as_dict(self) -> dict:
        r = self.result
        return {"backbone": self.backbone, "layer": self.layer, "store": str(self.path), "dim": self.dim,
                "precision": self.precision, "embedded": r.embedded, "reused": r.reused, "failed": r.failed,
                "rows": r.rows, "per_second": None if self.per_second is None else round(self.per_second, 2),
                "store_bytes": self.path.stat().st_size if self.path.exists() else None}


@dataclass
class SweepResult:
    dataset: str
    modality: str
    stores: list[StoreResult] = field(default_factory=list)
    seconds: float = 0.0
    embedded_samples: int = 0  # samples decoded and embedded by at least one backbone
    stages: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        ran = sum(1 for s in self.stores if s.result.embedded or s.result.failed)
        reused = len(self.stores) - ran
        rate = ""
        if self.embedded_samples and self.seconds:
            rate = f", {self.embedded_samples / self.seconds:.1f} samples/s end to end"
        return (f"sweep of {self.dataset}: {len(self.stores)} stores, {ran} written, {reused} reused without a "
                f"forward pass, {self.embedded_samples} samples embedded in {self.seconds:.1f} s{rate}")

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "modality": self.modality, "seconds": round(self.seconds, 2),
                "embedded_samples": self.embedded_samples, "stages": {k: round(v, 3) for k, v in self.stages.items()},
                "stores": [s.as_dict() for s in self.stores]}


def _rate_file(path: Path) -> Path:
    return path.with_name(path.name + ".speed.json")


def recorded_rate(path: str | os.PathLike) -> dict | None:
    """The forward rate last measured for a store (written beside it by a sweep), or None."""
    try:
        return json.loads(_rate_file(Path(path)).read_text())
    except (OSError, ValueError):
        return None


def _record_rate(path: Path, per_second: float, images: int, runtime: str) -> None:
    try:
        atomic_write(_rate_file(path), json.dumps({"per_second": round(per_second, 3), "images": images,
                                                   "runtime": runtime, "measured": "forward passes inside a sweep"}))
    except OSError:
        pass  # a measurement, not data: the store is complete without it


# ------------------------------------------------------------------------------------------ the sweep


@dataclass
class _Plan:
    """One store to fill: its writer and which samples (positions in the source) it still needs."""

    backbone: str
    layer: str
    store_backbone: object
    config: StoreConfig
    path: Path
    writer: StoreWriter | None = None
    need: np.ndarray | None = None  # bool per sample of the source
    reused: int = 0
    stale: bool = False
    agreed: frozenset = frozenset()  # what computed its rows ("openvino f32", ...): they passed the agreement check


def parse_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [x.strip() for x in items if x and x.strip()]


def sweep(source: Source | str | os.PathLike, backbones: list[str], layers: list[str] | None = None,
          store_dir: str | os.PathLike = DEFAULT_STORE_DIR, options: ExtractOptions | None = None,
          **settings) -> SweepResult:
    """Embed ``source`` with every backbone of ``backbones`` at every layer of ``layers`` (default
    ``["final"]``, the pooled output), one store each, and return what happened per store.

    Image backbones share one read and decode per sample and run once per batch for all their
    layers; text backbones run one extraction each (features.engine.extract). ``options`` are extract's
    (:class:`features.options.ExtractOptions`; ``settings``: its fields by keyword) and mean what they
    mean there; ``workers`` is the number of decoding processes here; ``compile`` (torch.compile) is
    not used by the sweep's forward passes, ``layout`` neither, and ``allow_damaged`` is refused."""
    t0 = time.perf_counter()
    o = ExtractOptions.of(options, **settings)
    if o.allow_damaged:  # the shared decode records no "damaged" notes yet: refused rather than ignored
        raise SweepError("sweep does not take --allow-damaged: extract each backbone with featurebank extract "
                         "--allow-damaged, and sweep reuses those stores")
    if not isinstance(source, Source):
        source = open_source(source, o.dataset)
    backbones = list(dict.fromkeys(parse_list(backbones)))
    layers = list(dict.fromkeys(layer_name(x) for x in parse_list(layers) or [FINAL]))
    if not backbones:
        raise SweepError("give at least one backbone: --backbones efficientnet_lite0,efficientnet_lite1")
    if o.dtype not in DTYPES:
        raise ValueError(f"dtype must be {' or '.join(DTYPES)}, not {o.dtype!r}")
    check_precision(o.precision)
    out = SweepResult(o.dataset or source.name, source.modality)
    if source.modality != "image":  # the shared read and decode is the images'; others: one extraction each
        _sweep_each(source, backbones, layers, store_dir, o, out)
        out.seconds = time.perf_counter() - t0
        return out
    return _sweep_images(source, backbones, layers, store_dir, o, out, t0)


def _sweep_each(source: Source, backbones: list[str], layers: list[str], store_dir, o: ExtractOptions,
                out: SweepResult) -> None:
    """One extraction per backbone (texts: each has its own tokenizer, so nothing is shared)."""
    if layers != [FINAL]:
        raise SweepError(f"{source.name} holds {source.modality}s: --layers applies to image backbones only")
    # a text backbone's precision comes from its build, and extract's image-only options stay at their defaults
    each = ExtractOptions(dataset=o.dataset, batch_size=o.batch_size, device=o.device, dtype=o.dtype,
                                  content_hash=o.content_hash, retry_failures=o.retry_failures,
                                  lock_timeout=o.lock_timeout, rows_per_part=o.rows_per_part,
                                  seconds_per_part=o.seconds_per_part, progress=o.progress, say=o.say,
                                  runtime=o.runtime)
    for b in backbones:
        bb = build_backbone(b, long_text=o.long_text, precision=o.precision)
        if bb.modality != source.modality:
            raise ModalityError(f"{b} embeds {bb.modality}s but {source.name} holds {source.modality}s: use "
                                f"{source.modality} backbones")
        t1 = time.perf_counter()
        r = extract(source, bb, store_dir, each)
        rate = None
        if r.embedded:
            rate = r.embedded / max(1e-9, r.stages.get("forward", time.perf_counter() - t1))
            _record_rate(r.path, rate, r.embedded, r.layout)
        else:
            rate = (recorded_rate(r.path) or {}).get("per_second")
        o.say(f"  {bb.name}: {r.summary()}")
        out.stores.append(StoreResult(bb.name, FINAL, r.path, bb.dim, r, rate, "f32"))
        out.embedded_samples = max(out.embedded_samples, r.embedded)


def _sweep_images(source: Source, backbones: list[str], layers: list[str], store_dir, o: ExtractOptions,
                  out: SweepResult, t0: float) -> SweepResult:
    """Image backbones: one read and decode per sample for all, one forward pass per backbone for its layers."""
    for b in backbones:
        if modality_of(b) != "image":
            raise ModalityError(f"{b} embeds {modality_of(b)}s but {source.name} holds images: use image backbones")
    dev = pick_device(o.device)  # once for the whole sweep
    precision, amp = forward_precision("image", dev, o)
    o = o.but(precision=precision, amp=amp, calibration_samples=o.calibration_samples or CALIBRATION_SAMPLES)
    cands = [candidate(b, layers) for b in backbones]
    listing = Listing.of(source, o.content_hash)
    plans = [[_Plan(c.taps.name, layer, sb, config, store_path(store_dir, out.dataset, config))
              for layer, sb in zip(c.layers, c.per_layer) for config in [store_config(sb, o)]] for c in cands]
    try:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {store_dir} ({exc.strerror or exc})") from None
    with ExitStack() as stack:
        for row in plans:
            for p in row:
                _open_plan(stack, p, listing, o, out.dataset)
        # which backbones run at all, and on which samples (the union of their layers' needs)
        active = [(c, row, np.logical_or.reduce([p.need for p in row])) for c, row in zip(cands, plans)]
        active = [(c, row, need) for c, row, need in active if need.any()]
        for c in cands:
            if not any(c is a for a, _, _ in active):
                o.say(f"  {c.taps.name}: every store complete, reused without a forward pass")
        rates: dict[int, float] = {}
        if active:
            rates = _embed_images(source, active, listing.ids, listing.content, dev, o.batch_size, o.workers,
                                  o.progress, out, o.say, decoder=o.decoder, runtime=o.runtime, precision=o.precision,
                                  amp=o.amp, calibration_samples=o.calibration_samples, dataset=out.dataset)
        for c, row in zip(cands, plans):
            for p in row:
                out.stores.append(_finish_plan(p, listing, rates.get(id(c)), o.precision, t0))
    out.seconds = time.perf_counter() - t0
    return out


def _open_plan(stack: ExitStack, p: _Plan, listing: Listing, o: ExtractOptions, dataset: str) -> None:
    """Open the store's writer and find which samples it still needs (as extract's reuse plan does)."""
    p.writer = stack.enter_context(StoreWriter(p.path, p.config, dataset, lock_timeout=o.lock_timeout,
                                               rows_per_part=o.rows_per_part, seconds_per_part=o.seconds_per_part,
                                               say=o.say))
    index = p.writer.index()
    need = np.zeros(len(listing.ids), bool)
    for k, (i, c) in enumerate(zip(listing.ids, listing.content)):
        if index.content.get(i) == c:
            p.reused += 1
        elif o.retry_failures or index.failures.get(i, (None, None))[1] != c:
            need[k] = True
    p.need = need
    p.stale = listing.stale(index)
    p.agreed = frozenset(index.runtimes)


def _finish_plan(p: _Plan, listing: Listing, rate: float | None, precision: str, t0: float) -> StoreResult:
    """Merge what the sweep wrote into one store and say what happened to it."""
    w = p.writer
    r = ExtractResult(path=p.path, reused=p.reused)
    r.embedded = w.added_rows
    r.failures = list(w.added_failures)
    r.failed = len(r.failures)
    if (p.need.any() or p.stale or w.needs_merge() or not p.path.exists()
            or labels_changed(p.path, listing.ids, listing.labels, listing.splits, listing.classes)):
        counts = w.finish(listing.ids, listing.labels, listing.splits, listing.content, class_names=listing.classes)
        r.removed, r.rows, r.failed_total = counts["removed"], counts["rows"], counts["failures"]
    else:
        index = w.index()
        r.rows, r.failed_total = len(index.content), len(index.failures)
    if rate is not None:
        _record_rate(p.path, rate, int(r.embedded), "sweep")
    else:
        rate = (recorded_rate(p.path) or {}).get("per_second")
    r.seconds = time.perf_counter() - t0
    return StoreResult(p.backbone, p.layer, p.path, p.store_backbone.dim, r, rate, precision)


def _embed_images(source, active, ids, content, dev, batch_size, workers, progress, out: SweepResult, say, *,
                  decoder, runtime, precision, amp, calibration_samples, dataset) -> dict[int, float]:
    """Decode every sample some active backbone needs once, run each backbone on the batch, cut its
    rows into its layers' stores. Returns each backbone's forward rate (images/s) by id of its candidate."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    union = np.logical_or.reduce([need for _, _, need in active])
    todo = np.flatnonzero(union)
    files = SampleFiles(source, todo)
    runtimes, decoders = [], []
    if dev.type == "cpu":
        torch.set_num_threads(usable_cores())
    for c, row, need in active:
        check_dec = sample_decoder(source, c.taps, decoder)
        sub = SampleFiles(source, np.flatnonzero(need))
        if runtime == "auto" and precision == "f32" and _daemonic():
            say("runtime: torch (inside a daemonic worker process; --runtime openvino to insist)")
            runtime = "torch"
        rt = create_runtime(runtime, c.taps, dev, precision, batch_size, say=say,
                            first_batch=lambda d=check_dec, s=sub: first_images(d, s),
                            calibration=lambda d=check_dec: calibration_images(d, source, calibration_samples),
                            int8_key=calibration_set(dataset, source.root), calibration_samples=calibration_samples,
                            agreed=frozenset.intersection(*(p.agreed for p in row)))
        for p in row:
            p.writer.runtime = f"{rt.name} {rt.precision}"
        runtimes.append(rt)
        decoders.append(check_dec.as_pixels() if rt.takes_pixels else check_dec)
        say(f"  {c.taps.name}: layers {', '.join(c.layers)} in one forward pass ({rt.describe()}), "
            f"{int(need.sum())} samples to embed")
    shared = SharedDecoder(decoders)
    n_workers = workers if workers is not None else (0 if len(todo) <= INLINE_DECODE_UP_TO or _daemonic()
                                                     else usable_cores())
    # OpenVINO's batch size is per infer request (it cuts a batch into requests), so decoded batches are
    # the sweep's own: large enough that few infer requests idle at each batch's end, small enough that
    # every decoding worker has several batches in flight (with camera-size photos and a few hundred
    # images, batches of 64 left the model idle while the first ones decoded)
    batch = decoded_batch(len(todo), n_workers) if any(r.pipelined for r in runtimes) \
        else max(1, batch_size or SWEEP_BATCH)
    loader = DataLoader(_Samples(files, shared), batch_size=batch, num_workers=n_workers, collate_fn=_collate,
                        prefetch_factor=4 if n_workers else None, persistent_workers=False,
                        worker_init_fn=worker_started if n_workers else None,
                        multiprocessing_context=mp_context() if n_workers else None)
    forward_s = [0.0] * len(active)
    images = [0] * len(active)
    stages = {"wait for decode": 0.0, "read+decode (workers)": 0.0, "write": 0.0}
    bar = tqdm(total=len(todo), unit="img", desc=f"sweep ({len(active)} backbones)", disable=not progress,
               dynamic_ncols=True)
    gc.freeze()  # the decoding workers fork here: keep their collector off this process's objects
    try:
        it = iter(loader)
    finally:
        gc.unfreeze()
    try:
        while True:
            t_wait = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            stages["wait for decode"] += time.perf_counter() - t_wait
            stages["read+decode (workers)"] += b["decode_s"]
            if b["bad"]:
                for _, row, _ in active:
                    for p in row:
                        ks = [int(todo[j]) for j, _ in b["bad"] if p.need[todo[j]]]
                        reasons = [r for j, r in b["bad"] if p.need[todo[j]]]
                        if ks:
                            p.writer.add_failures([ids[k] for k in ks], reasons, [content[k] for k in ks])
            idx = np.asarray(b["idx"], np.int64)
            for a, ((c, row, need), rt) in enumerate(zip(active, runtimes)):
                if not len(idx):
                    break
                pos = todo[idx]
                mine = need[pos]
                if not mine.any():
                    continue
                x = b["per_backbone"][a]
                if not mine.all():
                    x = x[torch.from_numpy(np.flatnonzero(mine))]
                t1 = time.perf_counter()
                emb = np.asarray(rt.embed(x), np.float32)
                forward_s[a] += time.perf_counter() - t1
                images[a] += len(x)
                ks = pos[mine]
                t2 = time.perf_counter()
                off = 0
                for p, d in zip(row, c.dims):
                    take = p.need[ks]
                    if take.any():
                        kk = ks[take]
                        p.writer.add([ids[k] for k in kk], emb[take, off:off + d], [content[k] for k in kk])
                    off += d
                stages["write"] += time.perf_counter() - t2
            bar.update(len(b["idx"]) + len(b["bad"]))
    finally:
        bar.close()
        del it
    out.embedded_samples += len(todo)
    for a, (c, _, _) in enumerate(active):
        stages[f"forward {c.taps.name}"] = forward_s[a]
    out.stages = stages
    rates = {}
    for a, (c, _, _) in enumerate(active):
        if images[a] and forward_s[a] > 0:
            rates[id(c)] = images[a] / forward_s[a]
            say(f"  {c.taps.name}: {images[a]} images in {forward_s[a]:.1f} s of forward passes "
                f"({rates[id(c)]:.1f} images/s, all {len(c.layers)} layers)")
    return rates


def decoded_batch(n: int, workers: int) -> int:
    """Images per decoded batch for ``n`` images and ``workers`` decoding processes: SWEEP_BATCH, or fewer
    (down to 8) so that each worker gets at least four batches."""
    return int(max(8, min(SWEEP_BATCH, n // (4 * max(1, workers)))))


def _daemonic() -> bool:
    import multiprocessing as mp

    return mp.current_process().daemon
