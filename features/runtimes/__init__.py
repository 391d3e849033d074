"""Runtimes: what turns a prepared batch into numpy embeddings [B, D], for images and texts alike. For
images the batch is a normalised float tensor [B, 3, H, W], or uint8 pixels [B, H, W, 3] for a runtime
that normalises in its own graph (``takes_pixels``: OpenVINO); for texts token ids and mask [B, L].

A runtime owns how the forward pass uses the machine (replicas, threads, autocast, out-of-memory
back-off for torch; infer requests, streams and the precision hint for OpenVINO). The protocol is
``features.runtimes.base.Runtime``; the engine (features.engine) and the run paths (features.executors)
call nothing else. Adding a runtime means one module here (a ``Runtime`` subclass), one line in
:data:`TABLE` and its name in ``features.choices.RUNTIMES``: neither the store, nor the sources, nor the
probes, nor the engine change.

``precision`` is how the forward pass computes (f32, bf16, int8); it is part of the store's fingerprint
(features.store.StoreConfig, from :func:`fingerprint`). Runtimes at f32 share a store: they agree to a
cosine of 0.9999 per image on real photos (tests/test_runtimes.py), and the store records which runtime
wrote it.

``runtime="auto"`` (the default, :func:`create_runtime`): each runtime of :data:`TABLE` in turn is asked
whether it can serve the backbone on this device at this precision; the first that can and builds is
kept, provided its embeddings of the first batch still to embed agree with the reference runtime's
(the eager torch module at f32; :data:`AGREEMENT`); otherwise the next, with one line saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
import torch

from featurebank.features.choices import CALIBRATION_SAMPLES, RUNTIMES
from featurebank.features.runtimes.base import (  # noqa: F401 - the protocol, re-exported for its callers
    AGREEMENT, CHECK_IMAGES, Runtime, RuntimeUnavailable, check_precision, cosines,
)
from featurebank.features.runtimes.openvino_runtime import OpenVINORuntime
from featurebank.features.runtimes.torch_runtime import TorchRuntime

#: every runtime, in auto's order of preference; the last one (the eager module) is the reference the
#: others must agree with, and runs wherever the others cannot
TABLE: tuple[type[Runtime], ...] = (OpenVINORuntime, TorchRuntime)
BY_NAME = {cls.name: cls for cls in TABLE}
if set(BY_NAME) != set(RUNTIMES) - {"auto"}:
    raise ImportError(f"features.choices.RUNTIMES {RUNTIMES} must name the runtimes of TABLE ({', '.join(BY_NAME)}) and auto")
REFERENCE = TABLE[-1]

#: (runtime, backbone identity, precision, first batch) -> worst cosine: a process that extracts the same
#: data again (a flow, a server, a benchmark's warm-up) does not repeat the same comparison
_AGREED: dict[tuple, float] = {}


def candidates(runtime: str, device: torch.device) -> list[type[Runtime]]:
    """The runtimes ``runtime`` may use on ``device``, in order: the named one, or for ``auto`` those of
    :data:`TABLE` that run on this device."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime != "auto":
        return [BY_NAME[runtime]]
    return [cls for cls in TABLE if cls.devices is None or device.type in cls.devices]


def usable(runtime: str, backbone, device: torch.device, precision: str) -> list[type[Runtime]]:
    """The runtimes :func:`create_runtime` may try for ``backbone``, in order: the named one, or for ``auto``
    those of :data:`TABLE` that run on ``device`` and do not refuse it (``backbone`` None: any backbone)."""
    return [cls for cls in candidates(runtime, device)
            if runtime != "auto" or cls.refuses(backbone, device, precision) is None]


def expected(runtime: str, backbone, device: torch.device, precision: str) -> type[Runtime]:
    """The runtime :func:`create_runtime` tries first for ``backbone`` (the first of :func:`usable`). Its
    class says what its input will be (``takes_pixels``, ``pipelined``) before it is built, so decoding can
    start while it builds (features.sweep); building may still refuse it, or auto's agreement check pass
    it over, and then the caller starts again."""
    return next(iter(usable(runtime, backbone, device, precision)), REFERENCE)


def computed_precision(runtime: str, device: torch.device, precision: str, amp: str) -> str:
    """The precision the rows will be computed in on ``device`` (on CUDA torch's autocast dtype), as the
    store's fingerprint records it, from the runtime that would serve."""
    first = usable(runtime, None, device, precision)
    return first[0].computes(device, precision, amp) if first else precision


def fingerprint(runtime: str, precision: str, calibration_samples: int = CALIBRATION_SAMPLES) -> dict | None:
    """What else the store's fingerprint covers of how rows are computed at ``precision`` (the int8
    recipe), from the runtime ``runtime`` names, or for ``auto`` the first of :data:`TABLE` that has
    something to say; None for most precisions (f32 runtimes share a store)."""
    for cls in (TABLE if runtime == "auto" else candidates(runtime, torch.device("cpu"))):
        if (covered := cls.fingerprint(precision, calibration_samples)) is not None:
            return covered
    return None


def _identity(backbone) -> str:
    """What the agreement check's result depends on: the backbone's identity (what its store's fingerprint
    covers: the model and how its input is prepared)."""
    import json

    return json.dumps(backbone.identity, sort_keys=True, default=str)


def _digest(x) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in (x if isinstance(x, tuple) else (x,)):
        h.update(np.ascontiguousarray(t.cpu().numpy() if isinstance(t, torch.Tensor) else t).tobytes())
    return h.hexdigest()


def create_runtime(runtime: str, backbone, device: torch.device | str, precision: str = "f32", batch: int | None = None,
                   first_batch: Callable[[], object | None] | None = None, say: Callable[[str], None] = print,
                   agreed: Collection[str] = (), **context) -> Runtime:
    """The runtime that embeds ``backbone`` on ``device`` at ``precision``.

    ``auto``: the first runtime of :data:`TABLE` that can serve (see the module docstring), saying in one
    line why each one before it was passed over; an explicit runtime that cannot run raises
    RuntimeUnavailable. ``batch``: samples per forward pass (None: the runtime's own choice).
    ``first_batch()``: the first batch still to embed, for the agreement check; ``agreed``: what computed the
    store's rows (``"openvino f32"``, ...): a runtime found there at this precision passed the check
    for this store already, so a rerun does not pay for it again (nor does the same comparison run twice in
    a process). ``context``: what some runtimes need (int8: ``calibration``, ``int8_key``,
    ``calibration_samples``), given to each.
    """
    device = torch.device(device)
    if not (precision == "fp16" and device.type == "cuda"):  # fp16: CUDA autocast (features.device.cuda_precision)
        check_precision(precision)
    chain = candidates(runtime, device)
    tried = usable(runtime, backbone, device, precision)
    if not tried:  # nothing can: the reason of the last one asked (the reference runtime for auto)
        raise RuntimeUnavailable(chain[-1].refuses(backbone, device, precision) if chain
                                 else f"no runtime runs on {device.type}")
    for k, cls in enumerate(tried):
        last = k == len(tried) - 1
        if runtime != "auto" and (why := cls.refuses(backbone, device, precision)):
            raise RuntimeUnavailable(f"{why}: use --runtime {REFERENCE.name}" if cls.devices else why)
        try:
            rt = cls(backbone, device=device, precision=precision, batch=batch, say=say, **context)
        except RuntimeUnavailable as exc:
            if last:
                raise
            say(f"runtime: {tried[k + 1].name} ({exc})")
            continue
        if (runtime != "auto" or cls is REFERENCE or last or f"{cls.name} {precision}" in agreed or first_batch is None
                or precision not in AGREEMENT):
            return rt
        x = first_batch()
        n = 0 if x is None else len(x[0] if isinstance(x, tuple) else x)  # a text batch is (ids, mask)
        if not n:
            return rt
        key = (cls.name, _identity(backbone), precision, _digest(x))
        if key not in _AGREED:
            eager = REFERENCE(backbone, device=device, precision="f32", batch=n).embed(x)
            _AGREED[key] = float(cosines(rt.embed(x), eager).min())
        if _AGREED[key] >= AGREEMENT[precision]:
            return rt
        say(f"runtime: {tried[k + 1].name} ({cls.name} {precision} disagrees with the eager model on the first "
            f"batch: cosine {_AGREED[key]:.6f} < {AGREEMENT[precision]})")
        rt.close()
    raise AssertionError("unreachable: the last usable runtime is returned")
