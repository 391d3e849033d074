"""A ``timm:`` backbone whose weights are not cached answers at once when the hub cannot be reached (one
line, no retries: it printed 22 lines of retries over 53 s), and cached weights load without asking it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ops_images import write_folder

ROOT = Path(__file__).resolve().parents[1]


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def _offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_ENDPOINT": _dead_endpoint(),
                  "PYTHONPATH": str(ROOT)}


def test_uncached_timm_weights_are_one_line_at_once_when_the_hub_cannot_be_reached(tmp_path):
    write_folder(tmp_path / "digits", n_per_class=2)
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "extract", str(tmp_path / "digits"),
                           "--backbone", "timm:resnet18", "--store", str(tmp_path / "store")],
                          env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "weights for timm:resnet18 (timm/resnet18.a1_in1k) are not in the local cache" in done.stderr
    assert "cannot be reached" in done.stderr and "retry" not in done.stderr.lower()
    assert seconds < 45, seconds  # process start and imports included; the hub's retries took 53 s
    assert not (tmp_path / "store").exists()


def test_cached_timm_weights_load_without_the_hub(tmp_path, monkeypatch):
    """Weights put in the Hugging Face cache the way a download leaves them load with the hub unreachable."""
    import timm
    import torch
    from safetensors.torch import save_file

    env = _offline_env(tmp_path)
    for key in ("HF_HOME", "HF_ENDPOINT", "TORCH_HOME"):
        monkeypatch.setenv(key, env[key])
    snapshot = Path(env["HF_HOME"]) / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))

    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)  # it reads HF_HOME when imported
    try:
        from featurebank.features.backbones import create_backbone

        t = time.monotonic()
        backbone = create_backbone("timm:resnet18")
        assert time.monotonic() - t < 30
        got = backbone.model.state_dict()
        assert torch.equal(got["conv1.weight"], weights["conv1.weight"])  # the cached file's weights, not others
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
