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

On a CPU, decoding runs in worker processes (DataLoader) and every backbone runs in a thread of its
own on the shared decoded batches, taking turns batch by batch while the decoders work on (see
:class:`_Lanes`); each is charged its share of the time while several run at once, and ``per_second`` is the rate each
backbone reached inside the sweep (images per second of its share). On CUDA the JPEGs are decoded
once on the device and each backbone's resize and normalisation runs there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurebank.data.sources import Source, open_source
from featurebank.features.backbones import FINAL_LAYERS, BackboneError, create_backbone
from featurebank.features.decode import Decoder, decode_jpegs_on_device
from featurebank.features.choices import CALIBRATION_SAMPLES
from featurebank.features.engine import (
    ExtractResult, Listing, ModalityError, StoreRun, WriterThread, check_labels_kept, commit_store, extract,
    forward_precision, plan_store, sample_fingerprints, say_listing_notes, store_config,
)
from featurebank.features.image_prepare import (
    SampleFiles, calibration_images, calibration_set, sample_decoder,
)
from featurebank.features.images import ImageError
from featurebank.features.options import ExtractOptions
from featurebank.features.registry import build_backbone, modality_of
from featurebank.features.executors import (
    FileDataset, collate, mp_context, row_notes, start_loader, timed_batches, worker_started,
)
from featurebank.features.device import pick_device, usable_cores
from featurebank.features.runtimes import check_precision, create_runtime, expected as expected_runtime
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
    if all(layer == FINAL for layer in layers):
        dims = [int(base.dim)] * len(layers)  # the pooled output: the width the backbone declares
    else:
        dims = _tap_widths(taps, base.preprocessing.size)
    per_layer = [dataclasses.replace(base, model=None, layer="pooled" if layer == FINAL else layer, dim=d)
                 for layer, d in zip(layers, dims)]
    tap_backbone = dataclasses.replace(base, model=taps, layer="taps:" + "|".join(layers), dim=int(sum(dims)))
    return Candidate(base.name, layers, tap_backbone, per_layer, dims)


def _tap_widths(taps: Taps, size: int) -> list[int]:
    """Each tap's width, pooled as --layer pools it, from one eager forward pass of one image: a small
    one first (64 px: the widths are channels, which do not depend on the input's size, and a forward
    pass at full size cost about a second per backbone on a loaded 2-core machine), the model's own
    size where the model takes no other (a ViT's patch grid)."""
    with torch.inference_mode():
        if size > 64:
            try:
                taps(torch.zeros(1, 3, 64, 64))
                return list(taps.widths)
            except Exception:
                taps._outs = {}
        taps(torch.zeros(1, 3, size, size))
    return list(taps.widths)


# ------------------------------------------------------------------------------------------ decoding


class SharedDecoder:
    """One read and one decode of a sample for several backbones: the bytes through the source's
    reader once, the pixels decoded once by the decoder that needs the most of them (the largest
    resize target: a large JPEG is decoded at a reduced DCT scale that still suits every backbone),
    then each backbone's own resize, crop and normalisation (:meth:`Decoder.finish`). Returns one
    tensor per decoder, or raises ImageError (the sample is then recorded as a failure in every
    store that needed it). ``plain`` decoders decode per backbone (the reference path, PIL).

    ``note`` is what the decoders said about the last sample ("damaged": decoded although libjpeg
    reported damaged data, with ``allow_damaged``), as :attr:`Decoder.note` is for one decoder."""

    def __init__(self, decoders: list[Decoder]):
        self.decoders = decoders
        self.big = max(decoders, key=lambda d: (d.pre.resize, d.pre.size))
        self.timings = {"read": 0.0, "decode": 0.0}
        self.note = ""

    def __call__(self, loc) -> list[torch.Tensor]:
        return self.decode(self.read(loc))

    def read(self, loc) -> bytes:
        t0 = time.perf_counter()
        try:
            return self.big.read(loc)
        finally:
            self.timings["read"] += time.perf_counter() - t0

    def decode(self, data: bytes) -> list[torch.Tensor]:
        t1 = time.perf_counter()
        self.note = ""
        try:
            if any(d.mode == "plain" for d in self.decoders):
                out = [d.decode(data) for d in self.decoders]
                self.note = next((d.note for d in self.decoders if d.note), "")
                return out
            self.big.note = ""
            pixels = self.big.decode_pixels(data)
            self.note = self.big.note
            return [d.finish(pixels) for d in self.decoders]
        finally:
            self.timings["decode"] += time.perf_counter() - t1

    def finish_on_device(self, jpegs: list[torch.Tensor], locs: list, device: torch.device):
        """The GPU path: a batch of JPEG byte tensors decoded once on ``device`` (in full, one call for
        the batch, as :func:`features.decode.decode_on_device` does for one backbone), then each
        backbone's resize, crop and normalisation there. A file the device cannot decode is decoded
        on the CPU (:meth:`__call__`) and moved. Returns (per file a list of tensors per backbone, or
        None; failures as (position, reason); notes as (position, note))."""
        out, failures, notes = [], [], []
        for k, img in enumerate(decode_jpegs_on_device(jpegs, device)):
            try:
                if img is not None:
                    out.append([d.finish(img) for d in self.decoders])
                else:
                    out.append([t.to(device, non_blocking=True) for t in self(locs[k])])
                    if self.note:
                        notes.append((k, self.note))
            except ImageError as exc:
                out.append(None)
                failures.append((k, str(exc)))
        return out, failures, notes


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
    """One store to fill: its side of the extraction (features.engine.StoreRun: its writer, what to embed,
    what its commit needs) and which samples (positions in the source) it still needs."""

    backbone: str
    layer: str
    store_backbone: object
    config: StoreConfig
    path: Path
    run: StoreRun | None = None
    need: np.ndarray | None = None  # bool per sample of the source

    @property
    def writer(self) -> StoreWriter:
        return self.run.writer


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
    not used by the sweep's forward passes, ``layout`` only for its ``gpu_decode`` (the tests' way to run
    the GPU path on a CPU, as for extract); ``allow_damaged`` means what it means
    for extract() (damaged JPEGs embedded and noted "damaged" in every store, as extract notes them)."""
    t0 = time.perf_counter()
    o = ExtractOptions.of(options, **settings)
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
    cands = [candidate(b, layers) for b in backbones]
    dev = pick_device(o.device)  # once for the whole sweep
    precision, amp = forward_precision(cands[0].taps, dev, o)
    o = o.but(precision=precision, amp=amp, calibration_samples=o.calibration_samples or CALIBRATION_SAMPLES)
    listing = Listing.columns(source)
    say_listing_notes(source, o.say)
    fingerprints = sample_fingerprints(source, o.content_hash)  # once for every store
    plans = [[_Plan(c.taps.name, layer, sb, config, store_path(store_dir, out.dataset, config))
              for layer, sb in zip(c.layers, c.per_layer) for config in [store_config(sb, o)]] for c in cands]
    try:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {store_dir} ({exc.strerror or exc})") from None
    with ExitStack() as stack:
        for row in plans:
            for p in row:
                _open_plan(stack, p, source, listing, fingerprints, o, out.dataset)
        # which backbones run at all, and on which samples (the union of their layers' needs)
        active = [(c, row, np.logical_or.reduce([p.need for p in row])) for c, row in zip(cands, plans)]
        active = [(c, row, need) for c, row, need in active if need.any()]
        for c in cands:
            if not any(c is a for a, _, _ in active):
                o.say(f"  {c.taps.name}: every store complete, reused without a forward pass")
        rates: dict[int, float] = {}
        if active:
            rates = _embed_images(source, active, list(listing.ids), fingerprints, dev, o.batch_size, o.workers,
                                  o.progress, out, o.say, decoder=o.decoder, runtime=o.runtime, precision=o.precision,
                                  amp=o.amp, calibration_samples=o.calibration_samples, dataset=out.dataset,
                                  allow_damaged=o.allow_damaged,
                                  gpu_decode=dev.type == "cuda" or bool(o.layout is not None and o.layout.gpu_decode))
        for c, row in zip(cands, plans):
            for p in row:
                out.stores.append(_finish_plan(p, source, rates.get(id(c)), o.precision, t0))
    out.seconds = time.perf_counter() - t0
    return out


def _open_plan(stack: ExitStack, p: _Plan, source: Source, listing: Listing, fingerprints, o: ExtractOptions,
               dataset: str) -> None:
    """Open the store's writer and plan it as extract plans its store (features.engine.plan_store)."""
    relabel = check_labels_kept(p.path, source, listing.labels)
    writer = stack.enter_context(StoreWriter(p.path, p.config, dataset, lock_timeout=o.lock_timeout,
                                             rows_per_part=o.rows_per_part, seconds_per_part=o.seconds_per_part,
                                             say=o.say))
    p.run = plan_store(writer, source, listing, o, relabel, fingerprints)
    p.need = np.zeros(len(fingerprints), bool)
    p.need[p.run.todo] = True


def _finish_plan(p: _Plan, source: Source, rate: float | None, precision: str, t0: float) -> StoreResult:
    """Merge what the sweep wrote into one store as extract commits its store, and say what happened to it."""
    r = commit_store(p.run, source)
    if rate is not None:
        _record_rate(p.path, rate, int(r.embedded), "sweep")
    else:
        rate = (recorded_rate(p.path) or {}).get("per_second")
    r.seconds = time.perf_counter() - t0
    return StoreResult(p.backbone, p.layer, p.path, p.store_backbone.dim, r, rate, precision)


#: decoded batches waiting for each backbone (bounds memory: a slow backbone holds the decoders back)
LANE_DEPTH = 2
#: decoded batches each decoding worker keeps ready ahead of the backbones
PREFETCH = 4


def _embed_images(source, active, ids, content, dev, batch_size, workers, progress, out: SweepResult, say, *,
                  decoder, runtime, precision, amp, calibration_samples, dataset, allow_damaged=False,
                  gpu_decode=False) -> dict[int, float]:
    """Decode every sample some active backbone needs once, run each backbone on it, cut its rows into its
    layers' stores. Returns each backbone's forward rate (images/s) by id of its candidate.

    On a CPU (:func:`_run_lanes`) decoding runs in worker processes, started before the runtimes are
    built (for the input each runtime is expected to take; again if one takes another), and every
    backbone has a thread of its own fed from the shared decoded batches (an OpenVINO backbone keeps
    its infer requests busy there, as ``extract`` does with one), the backbones taking turns batch by
    batch while the decoders work on; rows go to the stores through one writer thread. On CUDA
    (:func:`_run_on_device`) the JPEGs are decoded once on the device and each backbone's resize and
    normalisation runs there."""
    from tqdm import tqdm

    union = np.logical_or.reduce([need for _, _, need in active])
    todo = np.flatnonzero(union)
    files = SampleFiles(source, todo)
    if dev.type == "cpu":
        torch.set_num_threads(usable_cores())
    if runtime == "auto" and precision == "f32" and _daemonic():
        say("runtime: torch (inside a daemonic worker process; --runtime openvino to insist)")
        runtime = "torch"
    check_decs = [sample_decoder(source, c.taps, decoder, allow_damaged) for c, _, _ in active]
    n_workers = 0 if _daemonic() else (workers if workers is not None  # a daemonic process may not start any
                                       else 0 if len(todo) <= INLINE_DECODE_UP_TO else usable_cores())

    decoding = _Decoding(files, check_decs, n_workers, batch_size, dev)
    # on a CPU the workers start decoding before the runtimes are built (building three models and
    # auto's agreement checks took a second or more with a core idle), each backbone's input as the
    # runtime it will most likely get takes it; a runtime that turns out otherwise starts them again
    early = not gpu_decode and n_workers > 0
    guess = [(cls.takes_pixels, cls.pipelined) for cls in
             (expected_runtime(runtime, c.taps, dev, precision) for c, _, _ in active)]
    started = decoding.start(guess, False) if early else None
    if early and dev.type == "cpu":
        # meanwhile the workers hold the cores: the agreement checks' eager forwards on one thread (on
        # two, OpenMP's threads spun waiting for each other and the first run took a second longer)
        torch.set_num_threads(1)
    try:
        runtimes = _build_runtimes(source, active, check_decs, dev, runtime, precision, batch_size, say,
                                   calibration_samples, dataset)
        on_device = gpu_decode and all(r.name == "torch" for r in runtimes)
        inputs = [(r.takes_pixels, r.pipelined) for r in runtimes]
        if started is None or inputs != guess:
            started = None  # the workers started on a wrong guess stop as their iterator goes
            started = decoding.start(inputs, on_device)
    except BaseException:
        started = None
        raise
    finally:
        if dev.type == "cpu":
            torch.set_num_threads(usable_cores())
    shared, decoded, t0 = started
    run = _Run(active, runtimes, todo, ids, content)
    bar = tqdm(total=len(todo), unit="img", desc=f"sweep ({len(active)} backbones)", disable=not progress,
               dynamic_ncols=True)
    try:
        if on_device:
            _run_on_device(run, decoded, shared, files, dev, batch_size or SWEEP_BATCH, bar)
        else:
            _run_lanes(run, decoded, bar)
    finally:
        bar.close()
        del decoded
    out.embedded_samples += len(todo)
    # wall time from starting the decoders to the last row handed to the stores (the benchmark sets it
    # beside the sweep's whole time: the rest is building the models (and, where the decoders start
    # after them, the runtimes) and the final merge)
    stages = {"embedding (wall)": time.perf_counter() - t0, **run.stages}
    for a, (c, _, _) in enumerate(active):
        stages[f"forward {c.taps.name}"] = run.forward_s[a]
    out.stages = stages
    rates = {}
    for a, (c, _, _) in enumerate(active):
        if run.images[a] and run.forward_s[a] > 0:
            rates[id(c)] = run.images[a] / run.forward_s[a]
            say(f"  {c.taps.name}: {run.images[a]} images in {run.forward_s[a]:.1f} s of forward passes "
                f"({rates[id(c)]:.1f} images/s, all {len(c.layers)} layers)")
    return rates


def _build_runtimes(source, active, check_decs, dev, runtime, precision, batch_size, say, calibration_samples,
                    dataset) -> list:
    """Each active backbone's runtime (``auto``'s agreement check on the first images it still needs, read
    and decoded once for all), its stores told which runtime writes them."""
    firsts = _FirstImages(source, check_decs)
    runtimes = []
    for a, (c, row, need) in enumerate(active):
        check_dec = check_decs[a]
        rt = create_runtime(runtime, c.taps, dev, precision, batch_size, say=say,
                            first_batch=lambda a=a, need=need: firsts(a, need),
                            calibration=lambda d=check_dec: calibration_images(d, source, calibration_samples),
                            int8_key=calibration_set(dataset, source.root), calibration_samples=calibration_samples,
                            agreed=frozenset.intersection(*(p.run.runtimes for p in row)))
        runtimes.append(rt)
        for p in row:
            p.writer.runtime = f"{rt.name} {rt.precision}"
        say(f"  {c.taps.name}: layers {', '.join(c.layers)} in one forward pass ({rt.describe()}), "
            f"{int(need.sum())} samples to embed")
    return runtimes


class _Decoding:
    """The sweep's decoding workers: every sample to embed read and decoded once, for every backbone."""

    def __init__(self, files, decoders: list[Decoder], workers: int, batch_size, dev):
        self.files, self.decoders, self.workers, self.batch_size, self.dev = files, decoders, workers, batch_size, dev

    def start(self, inputs: list[tuple[bool, bool]], on_device: bool):
        """The workers, started: each backbone's decoder as its runtime takes its input (``inputs``:
        takes_pixels, pipelined per backbone). Returns the shared decoder, the iterator over the decoded
        batches with how many it delivers (the workers stop when it is dropped) and when they started."""
        shared = SharedDecoder([d.as_pixels() if px else d for d, (px, _) in zip(self.decoders, inputs)])
        # OpenVINO's batch size is per infer request (it cuts a batch into requests), so decoded batches are
        # the sweep's own: large enough that few messages cross between processes, small enough that every
        # decoding worker has several batches in flight
        batch = (decoded_batch(len(self.files), self.workers) if any(p for _, p in inputs)
                 else max(1, self.batch_size or SWEEP_BATCH))
        n = self.workers
        loader = torch.utils.data.DataLoader(
            FileDataset(self.files, shared, on_device), batch_size=batch, num_workers=n, collate_fn=collate,
            pin_memory=self.dev.type == "cuda", prefetch_factor=PREFETCH if n else None, persistent_workers=False,
            worker_init_fn=worker_started if n else None, multiprocessing_context=mp_context() if n else None)
        return shared, (start_loader(loader), len(loader)), time.perf_counter()


class _FirstImages:
    """The first images each backbone still needs, for ``auto``'s agreement check (features.runtimes), read
    and decoded once for every backbone that needs the same ones (:class:`SharedDecoder`) instead of once
    per backbone: with camera-size photos that was a second or more per backbone."""

    def __init__(self, source, decoders: list[Decoder]):
        self.source, self.shared = source, SharedDecoder(decoders)
        self._done: dict[tuple, list | None] = {}

    def __call__(self, a: int, need: np.ndarray) -> torch.Tensor | None:
        from featurebank.features.runtimes import CHECK_IMAGES

        key = tuple(int(k) for k in np.flatnonzero(need)[:CHECK_IMAGES])
        if key not in self._done:
            files, got = SampleFiles(self.source, key), []
            for j in range(len(files)):
                try:
                    got.append(self.shared(files[j]))
                except Exception:  # a file that does not decode is left out, as first_images leaves it
                    continue
            self._done[key] = [torch.stack([t[b] for t in got]) for b in range(len(self.shared.decoders))] if got else None
        per_backbone = self._done[key]
        return None if per_backbone is None else per_backbone[a]


class _Run:
    """What the image paths share: the active backbones, their runtimes and stores, the writer thread
    (StoreWriter is not thread-safe: every store's rows and failures go through one thread), the
    forward time charged to each backbone and the stage timings."""

    def __init__(self, active, runtimes, todo, ids, content):
        self.active, self.runtimes, self.todo, self.ids, self.content = active, runtimes, todo, ids, content
        self.forward_s = [0.0] * len(active)
        self.images = [0] * len(active)
        self.stages = {"wait for decode": 0.0, "read+decode (workers)": 0.0}
        self.writes = WriterThread(depth=16, name="featurebank-sweep-writer")

    def batches(self, decoded):
        """The batches of ``decoded`` (the started loader's iterator and how many batches it delivers: see
        :class:`_Decoding`), timing the wait for them."""
        return timed_batches(*decoded, self._time)

    def _time(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds

    def failures(self, bad) -> None:
        """(position in todo, reason) -> a failure in every store that needed the sample."""
        if not bad:
            return
        for _, row, _ in self.active:
            for p in row:
                ks = [int(self.todo[j]) for j, _ in bad if p.need[self.todo[j]]]
                if ks:
                    reasons = [r for j, r in bad if p.need[self.todo[j]]]
                    self.writes.put(p.writer.add_failures, [self.ids[k] for k in ks], reasons,
                                    [self.content[k] for k in ks])

    def mine(self, a: int, idx) -> np.ndarray:
        """Of the batch's positions ``idx`` (in todo), which backbone ``a`` needs (bool)."""
        return self.active[a][2][self.todo[np.asarray(idx, np.int64)]]

    def rows(self, a: int, ks: np.ndarray, emb: np.ndarray, notes) -> None:
        """Backbone ``a``'s rows for the samples ``ks`` (positions in the source), cut into its layers."""
        c, row, _ = self.active[a]
        self.images[a] += len(ks)
        off = 0
        for p, d in zip(row, c.dims):
            take = p.need[ks]
            if take.any():
                kk = ks[take]
                args = [[self.ids[k] for k in kk], emb[take, off:off + d], [self.content[k] for k in kk]]
                if notes is not None:
                    args.append([n for n, t in zip(notes, take) if t])
                self.writes.put(p.writer.add, *args)
            off += d

    def close(self) -> None:
        t0 = time.perf_counter()
        self.writes.close()
        self.stages["write (wait at the end)"] = time.perf_counter() - t0
        self.stages["write (thread)"] = self.writes.busy


class _Shares:
    """Forward time charged to each backbone when they run at once: while n backbones are running,
    each is charged 1/n of the wall time (they share the cores), so that a backbone's images over its
    charged seconds is its rate inside the sweep, and the charges add up to the time some backbone ran."""

    def __init__(self, n: int):
        self.charged = [0.0] * n
        self._running: set[int] = set()
        self._last = time.perf_counter()
        self._lock = threading.Lock()

    def _advance(self) -> None:
        now = time.perf_counter()
        if self._running:
            share = (now - self._last) / len(self._running)
            for a in self._running:
                self.charged[a] += share
        self._last = now

    def start(self, a: int) -> None:
        with self._lock:
            self._advance()
            self._running.add(a)

    def stop(self, a: int) -> None:
        with self._lock:
            self._advance()
            self._running.discard(a)


class _Lanes:
    """One thread ("lane") per backbone, each taking decoded batches from a bounded queue of its own; an
    error in a lane stops the others and is raised in the caller at its next hand-over or at the end.

    The lanes take turns, batch by batch, in the order the batches were handed out (a ticket per
    hand-over): a lane starts its batch when the lane before it has handed all of its batch to the
    runtime. An asynchronous runtime's last requests of one batch still run while the next lane's first
    ones start, so no core waits at a hand-over, and only one model's streams run at a time otherwise:
    three OpenVINO models side by side (six stream threads on two cores, beside the decoders) ran
    about 6 % slower than the same models in turn (benchmarks/extraction.py --backbones)."""

    def __init__(self, run: _Run):
        self.run = run
        n = len(run.active)
        self.shares = _Shares(n)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.queues = [queue.Queue(maxsize=LANE_DEPTH) for _ in range(n)]
        self._tickets = 0  # handed out (by the one thread that hands batches over)
        self._serving = 0  # the ticket whose lane may run
        self._turn = threading.Condition()
        self.threads = [threading.Thread(target=self._lane, args=(a,), name=f"featurebank-sweep-{a}", daemon=True)
                        for a in range(n)]
        for t in self.threads:
            t.start()

    def _next_turn(self) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()

    def _take(self, a: int):
        """Lane a's batches, each when its turn comes, until the end mark (None) or a stop; not
        running while it waits. Its turn ends when it asks for the next batch (or ends)."""
        holding = False
        try:
            while not self.stop.is_set():
                self.shares.stop(a)
                if holding:
                    holding = False
                    self._next_turn()
                try:
                    item = self.queues[a].get(timeout=0.5)
                except queue.Empty:
                    self.shares.start(a)
                    continue
                if item is None:
                    self.shares.start(a)
                    return
                ticket, payload = item
                with self._turn:
                    while self._serving != ticket and not self.stop.is_set():
                        self._turn.wait(0.5)
                holding = True
                self.shares.start(a)
                if self.stop.is_set():
                    return
                yield payload
        finally:
            if holding:
                self._next_turn()

    def _lane(self, a: int) -> None:
        rt, shares = self.run.runtimes[a], self.shares
        try:
            with torch.inference_mode():
                shares.start(a)
                if rt.pipelined:
                    for (ks, notes), emb in rt.map(self._take(a)):
                        self.run.rows(a, ks, np.asarray(emb, np.float32), notes)
                else:
                    for (ks, notes), x in self._take(a):
                        self.run.rows(a, ks, np.asarray(rt.embed(x), np.float32), notes)
        except BaseException as exc:
            self.errors.append(exc)
            self.stop.set()
            with self._turn:
                self._turn.notify_all()
        finally:
            shares.stop(a)

    def hand(self, a: int, item) -> None:
        """Put into lane a's queue (with the next ticket), waiting while it is full, unless a lane failed."""
        if item is not None:
            item = (self._tickets, item)
        while True:
            if self.errors:
                raise self.errors[0]
            try:
                self.queues[a].put(item, timeout=0.5)
                break
            except queue.Full:
                pass
        if item is not None:
            self._tickets += 1

    def finish(self) -> None:
        for a in range(len(self.queues)):
            self.hand(a, None)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self.stop.set()
        with self._turn:
            self._turn.notify_all()
        for t in self.threads:
            t.join(timeout=30)


def _run_lanes(run: _Run, decoded, bar) -> None:
    """A CPU: decoded batches from the loader's worker processes; one thread per backbone (:class:`_Lanes`)
    runs its runtime on them, in turns: an asynchronous runtime (OpenVINO) through ``map``, which keeps
    every infer request busy while the next batch is taken, a synchronous one (torch) through ``embed``.
    Rows go to the writer thread. Decoding runs beside the backbones, and a hand-over leaves no core idle while
    another backbone has work."""
    lanes = _Lanes(run)
    try:
        for b in run.batches(decoded):
            run.failures(b["bad"])
            idx = b["pixel_idx"]
            if idx:
                pos = run.todo[np.asarray(idx, np.int64)]
                for a in range(len(run.active)):
                    mine = run.mine(a, idx)
                    if not mine.any():
                        continue
                    x = b["pixels"][a]
                    sel = np.flatnonzero(mine)
                    if len(sel) < len(idx):
                        x = x[torch.from_numpy(sel)]
                    lanes.hand(a, ((pos[sel], row_notes([idx[j] for j in sel], b["notes"])), x))
            bar.update(len(idx) + len(b["bad"]))
        lanes.finish()
    finally:
        lanes.close()
        run.close()
    run.forward_s = list(lanes.shares.charged)


def _run_on_device(run: _Run, decoded, shared: SharedDecoder, files, dev, batch: int, bar) -> None:
    """CUDA (or a CPU whose forced layout says ``gpu_decode``, as the tests run it): the loader's workers
    read each JPEG's bytes (other formats, rotated and damaged JPEGs are decoded on the CPU there); this
    process decodes the batch once on the device and runs each backbone's resize and normalisation there
    (:meth:`SharedDecoder.finish_on_device`), then each backbone's forward pass (torch, autocast at the
    store's precision)."""
    for rt in run.runtimes:  # the model on the device, autocast at the store's precision (folded in by the engine)
        rt.prepare(len(run.todo), batch)
    cuda = dev.type == "cuda"
    try:
        for b in run.batches(decoded):
            bad, notes = list(b["bad"]), list(b["notes"])
            order = list(b["pixel_idx"])
            parts = ([[x.to(dev, non_blocking=True)] for x in b["pixels"]] if b["pixels"] is not None
                     else [[] for _ in run.runtimes])
            if b["jpeg_sizes"]:
                t0 = time.perf_counter()
                jpegs = list(torch.split(b["jpeg_bytes"], b["jpeg_sizes"]))
                ji = b["jpeg_idx"]
                tensors, fails, jnotes = shared.finish_on_device(jpegs, [files[i] for i in ji], dev)
                bad.extend((ji[k], r) for k, r in fails)
                notes.extend((ji[k], nt) for k, nt in jnotes)
                ok = [k for k, t in enumerate(tensors) if t is not None]
                if ok:
                    for a in range(len(parts)):
                        parts[a].append(torch.stack([tensors[k][a] for k in ok]))
                    order.extend(ji[k] for k in ok)
                if cuda:
                    torch.cuda.synchronize(dev)
                run.stages["decode (device)"] = run.stages.get("decode (device)", 0.0) + time.perf_counter() - t0
            run.failures(bad)
            if order:
                pos = run.todo[np.asarray(order, np.int64)]
                for a, rt in enumerate(run.runtimes):
                    mine = run.mine(a, order)
                    if not mine.any():
                        continue
                    x = torch.cat(parts[a]) if len(parts[a]) > 1 else parts[a][0]
                    sel = np.flatnonzero(mine)
                    if len(sel) < len(order):
                        x = x[torch.from_numpy(sel).to(dev)]
                    t1 = time.perf_counter()
                    _, emb = next(iter(rt.map([(None, x)])))  # channels_last and the copy back: the runtime's
                    run.forward_s[a] += time.perf_counter() - t1
                    run.rows(a, pos[sel], emb, row_notes([order[j] for j in sel], notes))
            bar.update(len(order) + len(bad))
    finally:
        run.close()


def decoded_batch(n: int, workers: int) -> int:
    """Images per decoded batch for ``n`` images and ``workers`` decoding processes: SWEEP_BATCH, or fewer
    (down to 8) so that each worker gets at least two batches. (Four, while the workers started after
    the runtimes were built: the backbones then waited on the first batches. Started before, they find
    them ready, and batches of 60 instead of 30 halve the turns the backbones take on 240 camera-size
    photos: 8.25 s instead of 8.45, three runs each.)"""
    return int(max(8, min(SWEEP_BATCH, n // (2 * max(1, workers)))))


def _daemonic() -> bool:
    import multiprocessing as mp

    return mp.current_process().daemon
