"""Runtimes: what turns a prepared batch into numpy embeddings [B, D]. For images the batch is a
normalised float tensor [B, 3, H, W], or uint8 pixels [B, H, W, 3] for a runtime that normalises in its
own graph (``takes_pixels``: OpenVINO); for texts (features.runtimes.text) token ids and mask [B, L].

A runtime owns how the forward pass uses the machine (replicas and threads for torch; infer requests
and streams for OpenVINO). The protocol is ``features.runtimes.base.Runtime``. The engine (features.engine) decides
what to embed and commits it; the run paths (features.executors) feed decoded batches to a runtime and
hand its embeddings to the store. Adding a runtime means one module here and one line in
:func:`create_runtime`: neither the store, nor the sources, nor the probes change.

``precision`` is how the forward pass computes (f32, bf16, int8); it is part of the store's fingerprint
(features.store.StoreConfig). Runtimes at f32 share a store: they agree to a cosine of 0.9999 per image
on real photos (tests/test_runtimes.py), and the store records which runtime wrote it.

``runtime="auto"`` (the default): OpenVINO on a CPU when it is installed, the backbone converts and
its embeddings of the dataset's first images agree with the eager torch module; otherwise torch, with
one line saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from featurebank.features.choices import CALIBRATION_SAMPLES, PRECISIONS, RUNTIMES  # noqa: F401 - declared with the other option values

from featurebank.features.runtimes.base import (  # noqa: F401 - the protocol, re-exported for its callers
    AGREEMENT, CHECK_IMAGES, Runtime, RuntimeUnavailable, check_precision, cosines,
)


def create_runtime(runtime: str, backbone, device: torch.device, precision: str = "f32", batch: int | None = None,
                   first_images: Callable[[], torch.Tensor | None] | None = None, say: Callable[[str], None] = print,
                   calibration: Callable[[], Iterable[torch.Tensor]] | None = None, int8_key: str = "",
                   calibration_samples: int = CALIBRATION_SAMPLES, agreed: bool = False) -> Runtime:
    """The runtime that embeds ``backbone`` on ``device`` at ``precision``.

    ``auto``: OpenVINO on a CPU when it is installed, the backbone converts and (f32, bf16) it agrees
    with the eager module on ``first_images()``; otherwise torch, saying why in one line. An explicit
    ``openvino`` that cannot run raises RuntimeUnavailable; ``torch`` runs f32 (and bf16 by autocast).
    ``batch``: images per forward pass (None: the runtime's own choice, 32 for torch on a CPU, 2 per
    OpenVINO infer request). ``calibration()`` yields the int8 calibration batches, ``int8_key`` names the calibration set in
    the quantized model's cache key. ``agreed``: the check already passed for this store (its rows
    were computed by OpenVINO at this precision), so a rerun does not pay for it again.
    """
    from featurebank.features.runtimes.torch_runtime import TorchRuntime

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if not (precision == "fp16" and device.type == "cuda"):  # fp16: CUDA autocast (features.device.cuda_precision)
        check_precision(precision)
    if runtime == "torch" or (runtime == "auto" and device.type != "cpu"):
        if precision == "int8":
            raise RuntimeUnavailable("precision int8 needs the OpenVINO runtime on a CPU (--runtime openvino)")
        return TorchRuntime(backbone, device, precision, batch or 32)
    if device.type != "cpu":
        raise RuntimeUnavailable(f"the OpenVINO runtime runs on the CPU here, not on {device.type}: use --runtime torch")
    try:
        from featurebank.features.runtimes.openvino_runtime import OpenVINORuntime

        ov = OpenVINORuntime(backbone, precision, batch, calibration=calibration, int8_key=int8_key,
                             calibration_samples=calibration_samples, say=say)
    except RuntimeUnavailable as exc:
        if runtime == "openvino" or precision == "int8":
            raise
        say(f"runtime: torch ({exc})")
        return TorchRuntime(backbone, device, precision, batch or 32)
    if runtime == "auto" and precision in AGREEMENT and first_images is not None and not agreed:
        x = first_images()
        if x is not None and len(x):
            eager = TorchRuntime(backbone, device, "f32", len(x)).embed(x)
            worst = float(cosines(ov.embed(x), eager).min())
            if worst < AGREEMENT[precision]:
                say(f"runtime: torch (OpenVINO {precision} disagrees with the eager model on the first "
                    f"{len(x)} images: cosine {worst:.6f} < {AGREEMENT[precision]})")
                ov.close()
                return TorchRuntime(backbone, device, precision, batch or 32)
    return ov
